//! The identity index and rules.

use std::time::{Duration, SystemTime};

use tonic::{Code, Status};

use super::*;

fn record(name: &str, created_s: u64) -> NodeIdentityRecord {
    NodeIdentityRecord {
        id: NodeId::new(),
        name: name.into(),
        created: SystemTime::UNIX_EPOCH + Duration::from_secs(created_s),
        token_id: "0123456789abcdef".into(),
        revoked: None,
    }
}

#[test]
fn node_names_are_short_plain_words() {
    for good in ["a", "gpu-1", "rack_2.host", &"x".repeat(128)] {
        assert_eq!(validate_name(good), Ok(()), "{good}");
    }
    for bad in ["", "two words", "é", "a/b", &"x".repeat(129)] {
        let err = validate_name(bad).unwrap_err();
        assert!(err.starts_with("name: "), "{err}");
    }
}

#[test]
fn a_node_id_is_no_name_so_selectors_cannot_mistake_one_node_for_another() {
    let id = NodeId::new().to_string();
    for taken in [id.clone(), id.to_lowercase()] {
        let err = validate_name(&taken).unwrap_err();
        assert!(err.starts_with("name: "), "{err}");
        assert!(err.contains("node id"), "{err}");
    }
    // 26 characters that are no id are still a name.
    assert_eq!(validate_name("gpu-node-with-26-chars-abc"), Ok(()));
}

#[test]
fn a_name_is_held_by_the_identity_not_revoked_and_selectors_find_ids_and_names() {
    let old = NodeIdentityRecord {
        revoked: Some(SystemTime::UNIX_EPOCH),
        ..record("gpu-1", 1)
    };
    let live = record("gpu-1", 2);
    let other = record("cpu-1", 3);
    let index = Identities::new(vec![old.clone(), live.clone(), other.clone()]);
    assert_eq!(index.holder("gpu-1"), Some(live.clone()));
    assert_eq!(index.holder("nope"), None);
    assert_eq!(index.find("gpu-1"), Some(live.clone()));
    assert_eq!(index.find(&old.id.to_string()), Some(old.clone()));
    assert_eq!(index.find("cpu-1"), Some(other.clone()));
    assert_eq!(index.revoked(), vec![old.id]);
    // Revoking the holder frees the name; the selector then finds the
    // newest revoked one.
    index.put(NodeIdentityRecord {
        revoked: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(9)),
        ..live.clone()
    });
    assert_eq!(index.holder("gpu-1"), None);
    assert_eq!(index.find("gpu-1").map(|r| r.id), Some(live.id));
    assert_eq!(index.refusals(), 0);
    index.count_refusal();
    assert_eq!(index.refusals(), 1);
}

#[test]
fn a_certified_node_registers_only_as_itself_with_its_joined_name() {
    let joined = record("gpu-1", 1);
    let id = joined.id;
    assert_eq!(
        admit_connect(Some(&joined), "", ""),
        Ok((id, "gpu-1".to_owned()))
    );
    assert_eq!(
        admit_connect(Some(&joined), &id.to_string(), "gpu-1"),
        Ok((id, "gpu-1".to_owned()))
    );
    let status = |r: Result<(NodeId, String), ConnectRefusal>| Status::from(r.unwrap_err());
    let other = NodeId::new().to_string();
    let stolen = status(admit_connect(Some(&joined), &other, ""));
    assert_eq!(stolen.code(), Code::PermissionDenied);
    assert!(stolen.message().contains(&other), "{}", stolen.message());
    assert_eq!(
        status(admit_connect(Some(&joined), "garbage", "")).code(),
        Code::PermissionDenied
    );
    let renamed = status(admit_connect(Some(&joined), "", "gpu-2"));
    assert_eq!(renamed.code(), Code::FailedPrecondition);
    assert!(renamed.message().contains("gpu-1"));
    assert_eq!(
        status(admit_connect(None, "", "")).code(),
        Code::Unauthenticated
    );
    let revoked = NodeIdentityRecord {
        revoked: Some(SystemTime::UNIX_EPOCH),
        ..joined
    };
    assert_eq!(
        status(admit_connect(Some(&revoked), "", "")).code(),
        Code::PermissionDenied
    );
    let none = Status::from(ConnectRefusal::NoCertificate);
    assert_eq!(none.code(), Code::Unauthenticated);
    assert!(none.message().contains("weft token create --role node"));
    assert!(none.message().contains("weft-node --join TOKEN"));
}

#[test]
fn a_join_id_names_its_time_and_is_repeated_only_by_the_same_token_name_and_key() {
    let at = 1_700_000_000_123;
    let id = join_node_id(at, "tok1", "gpu-1", b"key-a");
    assert_eq!(id.timestamp_ms(), at);
    assert_eq!(id, join_node_id(at, "tok1", "gpu-1", b"key-a"));
    let joined = NodeIdentityRecord {
        id,
        name: "gpu-1".into(),
        created: SystemTime::UNIX_EPOCH + Duration::from_millis(at),
        token_id: "tok1".into(),
        revoked: None,
    };
    let now = joined.created + Duration::from_secs(1);
    assert!(rules::repeats_join(&joined, "tok1", "gpu-1", b"key-a", now));
    assert!(!rules::repeats_join(
        &joined, "tok1", "gpu-1", b"key-b", now
    ));
    assert!(!rules::repeats_join(
        &joined, "tok2", "gpu-1", b"key-a", now
    ));
    assert!(!rules::repeats_join(
        &joined, "tok1", "gpu-2", b"key-a", now
    ));
    // Parts do not run together.
    assert_ne!(id, join_node_id(at, "tok1g", "pu-1", b"key-a"));
    let revoked = NodeIdentityRecord {
        revoked: Some(joined.created),
        ..joined.clone()
    };
    assert!(!rules::repeats_join(
        &revoked, "tok1", "gpu-1", b"key-a", now
    ));
    // An id not made by a join (a random one) is never repeated.
    let random = NodeIdentityRecord {
        id: NodeId::new(),
        ..joined
    };
    assert!(!rules::repeats_join(
        &random, "tok1", "gpu-1", b"key-a", now
    ));
}

#[test]
fn a_join_is_repeated_only_within_ten_minutes_of_it() {
    let at = 1_700_000_000_123;
    let joined = NodeIdentityRecord {
        id: join_node_id(at, "tok1", "gpu-1", b"key-a"),
        name: "gpu-1".into(),
        created: SystemTime::UNIX_EPOCH + Duration::from_millis(at),
        token_id: "tok1".into(),
        revoked: None,
    };
    assert_eq!(REPEAT_WINDOW, Duration::from_secs(600));
    let after = |d: Duration| joined.created + d;
    let repeats = |now| rules::repeats_join(&joined, "tok1", "gpu-1", b"key-a", now);
    assert!(repeats(joined.created));
    assert!(repeats(after(Duration::from_secs(599))));
    assert!(!repeats(after(REPEAT_WINDOW)));
    assert!(!repeats(after(Duration::from_secs(24 * 3600))));
    // A clock set back since the join: still within.
    assert!(repeats(joined.created - Duration::from_secs(5)));
}

#[test]
fn a_join_time_ahead_of_the_clock_is_within_the_window_only_up_to_ten_minutes_ahead() {
    // A coordinator whose clock was ahead at the join, put right since:
    // the join is not repeatable for as long as the clock was wrong.
    let joined = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let id = join_node_id(1_700_000_000_123, "tok1", "gpu-1", b"key-a");
    let before = |d: Duration| joined - d;
    assert!(rules::within_repeat_window(
        id,
        before(Duration::from_secs(1))
    ));
    assert!(rules::within_repeat_window(
        id,
        before(Duration::from_secs(599))
    ));
    assert!(!rules::within_repeat_window(id, before(REPEAT_WINDOW)));
    assert!(!rules::within_repeat_window(
        id,
        before(Duration::from_secs(24 * 3600))
    ));
    assert!(rules::within_repeat_window(id, joined));
}

#[test]
fn a_join_is_repeatable_until_its_node_connects_and_only_for_its_token() {
    let now = SystemTime::now();
    let at = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let joined = NodeIdentityRecord {
        id: join_node_id(at, "tok1", "gpu-1", b"key-a"),
        name: "gpu-1".into(),
        created: now,
        token_id: "tok1".into(),
        revoked: None,
    };
    let index = Identities::new(vec![joined.clone()]);
    assert_eq!(index.repeatable("gpu-1", "tok1", now), Some(joined.clone()));
    assert_eq!(
        index.repeatable("gpu-1", "tok2", now),
        None,
        "another token"
    );
    assert_eq!(index.repeatable("gpu-2", "tok1", now), None, "another name");
    let later = now + REPEAT_WINDOW;
    assert_eq!(index.repeatable("gpu-1", "tok1", later), None, "too late");
    assert!(!index.connected(joined.id));
    index.note_connected(joined.id);
    assert!(index.connected(joined.id));
    assert_eq!(index.repeatable("gpu-1", "tok1", now), None, "connected");
}
