//! Token model, scopes, token files.
use super::*;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
}

#[test]
fn token_round_trip_and_only_hash_kept() {
    let scopes = Scopes::of([Scope::Read, Scope::Submit]);
    let (record, token) = new_token("ci", scopes, None, now()).unwrap();
    let (id, secret) = parse_token(&token).unwrap();
    assert_eq!(id, record.id);
    assert_eq!(secret.len(), 43, "256 bits, URL-safe base64");
    assert!(
        secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(record.secret_hash, hash_secret(secret));
    assert!(!format!("{record:?}").contains(secret));
    let index = TokenIndex::new(vec![record.clone()]);
    let caller = index.authenticate(&token, now()).unwrap();
    assert_eq!(caller.token_id.as_deref(), Some(record.id.as_str()));
    assert_eq!(caller.scopes, scopes);
}

#[test]
fn wrong_unknown_expired_revoked_are_refused() {
    let (record, token) =
        new_token("t", Scopes::ADMIN, Some(Duration::from_secs(1)), now()).unwrap();
    let index = TokenIndex::new(vec![record.clone()]);
    // One character of the secret changed.
    let mut wrong = token.clone();
    let last = if wrong.ends_with('A') { 'B' } else { 'A' };
    wrong.pop();
    wrong.push(last);
    assert_eq!(index.authenticate(&wrong, now()), Err(AuthError::Invalid));
    assert_eq!(
        index.authenticate("nonsense", now()),
        Err(AuthError::Invalid)
    );
    let (_, other) = new_token("o", Scopes::ADMIN, None, now()).unwrap();
    assert_eq!(index.authenticate(&other, now()), Err(AuthError::Invalid));
    assert!(index.authenticate(&token, now()).is_ok());
    assert_eq!(
        index.authenticate(&token, now() + Duration::from_secs(1)),
        Err(AuthError::Expired(record.id.clone()))
    );
    index.put(TokenRecord {
        revoked: Some(now()),
        ..record.clone()
    });
    assert_eq!(
        index.authenticate(&token, now()),
        Err(AuthError::Revoked(record.id.clone()))
    );
}

#[test]
fn an_admin_token_file_is_adopted() {
    let (_, token) = new_token("admin", Scopes::ADMIN, None, now()).unwrap();
    let record = adopt_token(&format!("{token}\n"), "admin", now()).unwrap();
    let index = TokenIndex::new(vec![record]);
    assert_eq!(
        index.authenticate(&token, now()).unwrap().scopes,
        Scopes::ADMIN
    );
    assert!(adopt_token("garbage", "admin", now()).is_none());
}

#[test]
fn join_tokens_are_not_client_tokens() {
    let (mut record, token) = new_token("n", Scopes::ADMIN, None, now()).unwrap();
    record.kind = TokenKind::NodeJoin;
    let index = TokenIndex::new(vec![record]);
    assert_eq!(index.authenticate(&token, now()), Err(AuthError::Invalid));
}

#[test]
fn a_token_of_a_kind_this_build_does_not_know_is_usable_for_nothing() {
    let (mut record, token) = new_token("later", Scopes::ADMIN, None, now()).unwrap();
    record.kind = TokenKind::from_u8(7);
    assert_eq!(record.kind.to_u8(), 7, "kept as stored");
    let credential = token.strip_prefix(TOKEN_PREFIX).unwrap().to_owned();
    let index = TokenIndex::new(vec![record]);
    assert_eq!(index.authenticate(&token, now()), Err(AuthError::Invalid));
    assert!(index.check_join(&credential, now()).is_err());
}

#[test]
fn scopes_admin_implies_all_and_denial_names_scope() {
    for scope in Scope::ALL {
        assert!(Scopes::ADMIN.allows(scope));
        assert!(Scopes::of([Scope::Admin]).allows(scope));
    }
    let read = Scopes::parse_list(&["read"]).unwrap();
    assert!(read.allows(Scope::Read) && !read.allows(Scope::Submit));
    assert_eq!(
        Scopes::parse_list(&["read,submit", "cancel"]).unwrap(),
        Scopes::of([Scope::Read, Scope::Submit, Scope::Cancel])
    );
    assert!(Scopes::parse_list(&["reed"]).is_err());
    assert!(Scopes::parse_list::<&str>(&[]).is_err());
    let caller = Caller {
        token_id: Some("x".into()),
        scopes: read,
    };
    let err = caller.require(Scope::Submit).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("'submit'"), "{}", err.message());
}

#[test]
fn constant_time_eq_compares_all() {
    let a = [1u8; 32];
    let mut b = a;
    assert!(constant_time_eq(&a, &b));
    b[31] = 2;
    assert!(!constant_time_eq(&a, &b));
}

#[test]
fn a_ttl_whose_expiry_overflows_is_invalid_not_forever() {
    let err = new_token("t", Scopes::ADMIN, Some(Duration::MAX), now()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("ttl"), "{}", err.message());
}

#[test]
fn a_zero_ttl_is_invalid_not_a_token_born_expired() {
    for err in [
        new_token("t", Scopes::ADMIN, Some(Duration::ZERO), now()).unwrap_err(),
        new_join_token("n", Some(Duration::ZERO), 1, now()).unwrap_err(),
    ] {
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("ttl") && err.message().contains("more than 0"),
            "{}",
            err.message()
        );
    }
}

#[test]
fn an_upper_case_id_authenticates_as_its_lower_case_record() {
    let (record, token) = new_token("t", Scopes::ADMIN, None, now()).unwrap();
    let (id, secret) = parse_token(&token).unwrap();
    let upper = format!("{TOKEN_PREFIX}{}_{secret}", id.to_ascii_uppercase());
    assert_ne!(upper, token);
    let index = TokenIndex::new(vec![record.clone()]);
    let caller = index.authenticate(&upper, now()).unwrap();
    assert_eq!(caller.token_id, Some(record.id));
}

#[cfg(unix)]
#[test]
fn an_existing_parent_dir_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    write_token_file(&dir.path().join(ADMIN_TOKEN_FILE), "weft_x").unwrap();
    let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777, "sticky bit and mode kept");
}

#[cfg(unix)]
#[test]
fn only_a_private_own_token_file_is_adopted() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(ADMIN_TOKEN_FILE);
    assert_eq!(read_own_token_file(&path), Ok(None));
    write_token_file(&path, "weft_x").unwrap();
    assert_eq!(read_own_token_file(&path), Ok(Some("weft_x\n".into())));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = read_own_token_file(&path).unwrap_err();
    assert!(err.contains("644"), "{err}");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(read_own_token_file(&link).is_err());
}

#[test]
fn token_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join(ADMIN_TOKEN_FILE);
    write_token_file(&path, "weft_x").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "weft_x\n");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}

#[test]
fn join_tokens_join_until_used_up_expired_or_revoked_and_never_act_as_client_tokens() {
    let index = TokenIndex::default();
    let (record, credential) =
        new_join_token("rack-1", Some(Duration::from_secs(60)), 2, now()).unwrap();
    assert_eq!(
        (record.kind, record.uses, record.used),
        (TokenKind::NodeJoin, 2, 0)
    );
    assert!(!credential.starts_with(TOKEN_PREFIX));
    index.put(record.clone());
    // Not a bearer token, with or without the client prefix.
    let as_bearer = format!("{TOKEN_PREFIX}{credential}");
    assert_eq!(
        index.authenticate(&as_bearer, now()),
        Err(AuthError::Invalid)
    );
    assert_eq!(index.check_join(&credential, now()).unwrap().id, record.id);
    // A client token is not a join token.
    let (client, client_token) = new_token("c", Scopes::ADMIN, None, now()).unwrap();
    index.put(client);
    assert_eq!(
        index.check_join(&client_token, now()),
        Err(JoinRefused::Invalid)
    );
    // A wrong secret.
    let (id, _) = credential.split_once('_').unwrap();
    let wrong = format!("{id}_{}", "A".repeat(43));
    assert_eq!(index.check_join(&wrong, now()), Err(JoinRefused::Invalid));
    // Used up.
    index.put(TokenRecord {
        used: 2,
        ..record.clone()
    });
    let err = index.check_join(&credential, now()).unwrap_err();
    assert!(matches!(err, JoinRefused::UsedUp { uses: 2, .. }), "{err}");
    assert!(err.to_string().contains("weft token create --role node"));
    // Unlimited uses.
    index.put(TokenRecord {
        uses: 0,
        used: 1000,
        ..record.clone()
    });
    assert!(index.check_join(&credential, now()).is_ok());
    // Expired, revoked.
    assert_eq!(
        index.check_join(&credential, now() + Duration::from_secs(61)),
        Err(JoinRefused::Expired(record.id.clone()))
    );
    index.put(TokenRecord {
        revoked: Some(now()),
        ..record.clone()
    });
    assert_eq!(
        index.check_join(&credential, now()),
        Err(JoinRefused::Revoked(record.id.clone()))
    );
}

#[test]
fn a_spec_that_cancels_its_keys_oldest_tasks_needs_the_cancel_scope_too() {
    use weft_proto::pb;
    let request = |scopes: Scopes| {
        let mut request = Request::new(());
        request.extensions_mut().insert(Caller {
            token_id: Some("t1".into()),
            scopes,
        });
        request
    };
    let spec = |on_limit: pb::OverLimit| pb::TaskSpec {
        concurrency: Some(pb::ConcurrencyLimit {
            key: "user-42".into(),
            max_running: 1,
            on_limit: on_limit as i32,
        }),
        ..Default::default()
    };
    let submit = request(Scopes::of([Scope::Submit]));
    let plain = pb::TaskSpec::default();
    let cancels = spec(pb::OverLimit::CancelOldest);
    for ok in [
        vec![plain.clone()],
        vec![
            spec(pb::OverLimit::Queue),
            spec(pb::OverLimit::CancelNewest),
        ],
    ] {
        assert!(require_for_specs(&submit, &ok).is_ok(), "{ok:?}");
    }
    let refused = require_for_specs(&submit, &[plain, cancels.clone()]).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("'cancel' scope"),
        "{}",
        refused.message()
    );
    let both = request(Scopes::of([Scope::Submit, Scope::Cancel]));
    assert!(require_for_specs(&both, [&cancels]).is_ok());
    assert!(require_for_specs(&request(Scopes::ADMIN), [&cancels]).is_ok());
}
