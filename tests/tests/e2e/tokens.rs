//! Client tokens: every TaskService and AdminService rpc needs one, each
//! rpc checks one scope, revoked and expired tokens are refused, the token
//! commands and `weft login` work end to end, and no secret is stored.

use std::time::Duration;

use tonic::Code;

use weft_proto::pb;
use weft_tests::{RawAdmin, RawTasks, TestCluster, default_timeout, wait_for};

const SOME_ID: &str = "01J00000000000000000000000";

/// Calls every TaskService and AdminService rpc once; answers each one's
/// name and status (`Ok` when it got past authentication and its scope,
/// whatever the rpc itself then answered).
async fn call_every_rpc(
    tasks: &mut RawTasks,
    admin: &mut RawAdmin,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    fn past_auth<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
        match r {
            Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => Err(s),
            _ => Ok(()),
        }
    }
    let spec = || pb::TaskSpec {
        kind: Some(pb::task_spec::Kind::Exec(pb::ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        })),
        ..Default::default()
    };
    vec![
        (
            "Submit",
            past_auth(
                tasks
                    .submit(pb::SubmitRequest {
                        tasks: vec![spec()],
                    })
                    .await,
            ),
        ),
        (
            "Get",
            past_auth(
                tasks
                    .get(pb::GetRequest {
                        task_id: SOME_ID.into(),
                    })
                    .await,
            ),
        ),
        (
            "List",
            past_auth(tasks.list(pb::ListRequest::default()).await),
        ),
        (
            "Watch",
            past_auth(
                tasks
                    .watch(pb::WatchRequest {
                        task_id: SOME_ID.into(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "Cancel",
            past_auth(
                tasks
                    .cancel(pb::CancelRequest {
                        task_id: SOME_ID.into(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "WaitMany",
            past_auth(
                tasks
                    .wait_many(pb::WaitManyRequest {
                        task_ids: vec![SOME_ID.into()],
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "WaitManyBatches",
            past_auth(
                tasks
                    .wait_many_batches(pb::WaitManyRequest {
                        task_ids: vec![SOME_ID.into()],
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "Run",
            past_auth(tasks.run(pb::RunRequest { spec: Some(spec()) }).await),
        ),
        (
            "ListNodes",
            past_auth(admin.list_nodes(pb::ListNodesRequest {}).await),
        ),
        (
            "DrainNode",
            past_auth(
                admin
                    .drain_node(pb::DrainNodeRequest {
                        node: "no-such-node".into(),
                        grace: None,
                    })
                    .await,
            ),
        ),
        (
            "ClusterInfo",
            past_auth(admin.cluster_info(pb::ClusterInfoRequest {}).await),
        ),
        (
            "CreateToken",
            past_auth(
                admin
                    .create_token(pb::CreateTokenRequest {
                        scopes: vec!["read".into()],
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "ListTokens",
            past_auth(admin.list_tokens(pb::ListTokensRequest {}).await),
        ),
        (
            "RevokeToken",
            past_auth(
                admin
                    .revoke_token(pb::RevokeTokenRequest {
                        id: "0000000000000000".into(),
                    })
                    .await,
            ),
        ),
    ]
}

/// The scope each rpc needs (the contract in admin.proto).
fn scope_of(rpc: &str) -> &'static str {
    match rpc {
        "Submit" | "Run" => "submit",
        "Cancel" => "cancel",
        "DrainNode" | "CreateToken" | "ListTokens" | "RevokeToken" => "admin",
        _ => "read",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_without_a_valid_token_is_unauthenticated_and_says_how_to_get_one() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let wrong = "weft_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for token in [None, Some("nonsense"), Some(wrong)] {
        let mut tasks = cluster.raw_tasks(token).await;
        let mut admin = cluster.raw_admin(token).await;
        let results = call_every_rpc(&mut tasks, &mut admin).await;
        assert_eq!(results.len(), 14, "every TaskService and AdminService rpc");
        for (rpc, result) in results {
            let status = result.expect_err(rpc);
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{rpc} with {token:?}: {status:?}"
            );
            assert!(
                status.message().contains("weft token create"),
                "{rpc}: {}",
                status.message()
            );
        }
    }
    let mut tasks = cluster.raw_tasks(None).await;
    let status = tasks.list(pb::ListRequest::default()).await.unwrap_err();
    assert!(
        status.message().contains("--token") && status.message().contains("admin.token"),
        "{}",
        status.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_checks_its_one_scope_and_names_the_one_it_lacks() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    for scope in ["read", "submit", "cancel", "admin"] {
        let token = cluster.scoped_token(&[scope]).await;
        let mut tasks = cluster.raw_tasks(Some(&token)).await;
        let mut admin = cluster.raw_admin(Some(&token)).await;
        for (rpc, result) in call_every_rpc(&mut tasks, &mut admin).await {
            let needed = scope_of(rpc);
            if scope == "admin" || scope == needed {
                assert!(result.is_ok(), "{rpc} with scope {scope}: {result:?}");
            } else {
                let status = result.expect_err(rpc);
                assert_eq!(status.code(), Code::PermissionDenied, "{rpc} with {scope}");
                assert!(
                    status.message().contains(&format!("'{needed}'")),
                    "{rpc} with {scope}: {}",
                    status.message()
                );
            }
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_only_token_learns_the_id_and_state_but_not_the_task() {
    // No node: the task stays queued, so it is live when cancelled.
    let cluster = TestCluster::builder().nodes(0).start().await;
    let admin = cluster.client().await;
    let spec = || {
        weft_proto::TaskSpec::exec(["echo", "private-argv"])
            .stdin("private-stdin")
            .env("PRIVATE_ENV", "private-value")
    };
    let mut answers = Vec::new();
    for scopes in [&["cancel"][..], &["cancel", "read"][..]] {
        let id = admin.submit(spec()).await.unwrap();
        let token = cluster.scoped_token(scopes).await;
        let mut tasks = cluster.raw_tasks(Some(&token)).await;
        let task = tasks
            .cancel(pb::CancelRequest {
                task_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(task.id, id.to_string());
        assert_eq!(task.state(), pb::TaskState::Cancelled, "{scopes:?}");
        answers.push(task);
    }
    let [cancel_only, with_read] = &answers[..] else {
        unreachable!()
    };
    assert_eq!(cancel_only.spec, None, "no spec without read");
    assert!(cancel_only.output.is_empty() && cancel_only.error.is_empty());
    assert!(!format!("{cancel_only:?}").contains("private"));
    assert!(
        format!("{with_read:?}").contains("private-argv"),
        "with read the full record: {with_read:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_at_once_and_an_expired_one_once_its_time_passed() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let admin = cluster.client().await;
    let (token, info) = admin
        .create_token(vec!["read".into()], "ci", None)
        .await
        .unwrap();
    let reader = cluster.client_with(Some(&token)).await;
    reader.list(None, 1).await.expect("a fresh token works");
    let revoked = admin.revoke_token(&info.id).await.unwrap();
    assert!(revoked.revoked.is_some());
    let err = reader.list(None, 1).await.unwrap_err();
    assert!(
        matches!(&err, weft_client::Error::Other { code: Code::Unauthenticated, message } if message.contains("revoked")),
        "{err:?}"
    );

    // Expiry is decided by the clock: a 1 s token works, then (polling
    // real state until the clock has passed its expiry) is refused.
    let (short, _) = admin
        .create_token(vec!["read".into()], "short", Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let short_client = cluster.client_with(Some(&short)).await;
    let refused = wait_for(default_timeout(), || {
        let client = short_client.clone();
        async move {
            match client.list(None, 1).await {
                Err(weft_client::Error::Other {
                    code: Code::Unauthenticated,
                    message,
                }) => Some(message),
                _ => None,
            }
        }
    })
    .await
    .expect("the 1 s token expires");
    assert!(refused.contains("expired"), "{refused}");

    let listed = admin.list_tokens().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|t| t.id == info.id && t.revoked.is_some())
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_work_end_to_end_and_refusals_exit_77() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let created = cluster
        .weft(&["token", "create", "--scope", "read", "--name", "dash"])
        .await;
    assert_eq!(created.code, Some(0), "{created}");
    let token = created.stdout.trim().to_owned();
    assert!(
        token.starts_with("weft_") && !token.contains(char::is_whitespace),
        "{created}"
    );
    assert_eq!(
        created.stdout.lines().count(),
        1,
        "the token alone on stdout"
    );

    let listed = cluster.weft(&["token", "list", "-o", "json"]).await;
    assert_eq!(listed.code, Some(0), "{listed}");
    let secret = token_secret(&token).to_owned();
    assert!(
        !listed.stdout.contains(&secret),
        "list never shows a secret: {listed}"
    );
    let all: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
    let entry = all
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "dash"))
        .unwrap_or_else(|| panic!("the new token is listed: {listed}"))
        .clone();
    let id = entry["id"].as_str().unwrap().to_owned();
    assert_eq!(entry["scopes"], serde_json::json!(["read"]));
    let table = cluster.weft(&["token", "list"]).await;
    assert!(
        table.stdout.contains(&id) && table.stdout.contains("active"),
        "{table}"
    );

    let nodes = cluster.weft_as(Some(&token), &[], &["nodes"]).await;
    assert_eq!(nodes.code, Some(0), "a read token lists nodes: {nodes}");
    let denied = cluster
        .weft_as(Some(&token), &[], &["run", "--", "true"])
        .await;
    assert_eq!(denied.code, Some(77), "{denied}");
    assert!(denied.stderr.contains("'submit'"), "{denied}");
    let none = cluster.weft_as(None, &[], &["list"]).await;
    assert_eq!(none.code, Some(77), "{none}");
    assert!(none.stderr.contains("--token"), "{none}");

    let file = cluster.dir().join("dash.token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let by_file = cluster
        .weft_as(None, &[], &["--token-file", file.to_str().unwrap(), "list"])
        .await;
    assert_eq!(by_file.code, Some(0), "{by_file}");

    let revoked = cluster.weft(&["token", "revoke", &id]).await;
    assert_eq!(revoked.code, Some(0), "{revoked}");
    let after = cluster.weft_as(Some(&token), &[], &["nodes"]).await;
    assert_eq!(after.code, Some(77), "{after}");
    assert!(after.stderr.contains("revoked"), "{after}");
    cluster.shutdown().await;
}

/// `weft login` to `cluster` with `token` and its CA file, the context
/// saved under the config home `env` names.
async fn weft_login(
    cluster: &TestCluster,
    token: &str,
    env: &[(&str, &str)],
) -> weft_tests::cli::CliOutput {
    let ca = cluster
        .ca_file()
        .expect("a TLS cluster")
        .display()
        .to_string();
    weft_tests::cli::run_weft_env(
        "",
        None,
        env,
        &["login", &cluster.url(), "--token", token, "--ca-file", &ca],
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_login_saves_a_private_context_that_later_commands_use() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let token = cluster.scoped_token(&["read"]).await;
    let config = cluster.dir().join("config");
    let config_env = [("XDG_CONFIG_HOME", config.to_str().unwrap())];
    let login = weft_login(&cluster, &token, &config_env).await;
    assert_eq!(login.code, Some(0), "{login}");
    let context = config.join("weft").join("context.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&context).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the context file is private");
    }
    // No --coordinator, no WEFT_COORDINATOR, no token: the context's.
    let nodes = weft_tests::cli::run_weft_env("", None, &config_env, &["nodes"], None).await;
    assert_eq!(nodes.code, Some(0), "{nodes}");
    assert!(nodes.stdout.contains("node-0"), "{nodes}");
    // A flag still wins over the context.
    let flagged = weft_tests::cli::run_weft_env(
        "",
        None,
        &config_env,
        &["--token", "weft_bad", "nodes"],
        None,
    )
    .await;
    assert_eq!(flagged.code, Some(77), "{flagged}");
    // A bad token is not saved.
    let bad = weft_login(&cluster, "weft_nope", &config_env).await;
    assert_eq!(bad.code, Some(77), "{bad}");
    assert!(std::fs::read_to_string(&context).unwrap().contains(&token));
    // Another coordinator gets neither the saved token nor its CA: a login
    // there needs its own token.
    let elsewhere = weft_tests::cli::run_weft_env(
        "",
        None,
        &config_env,
        &["login", "http://127.0.0.1:9"],
        None,
    )
    .await;
    assert_eq!(elsewhere.code, Some(2), "{elsewhere}");
    assert!(elsewhere.stderr.contains("needs a token"), "{elsewhere}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_only_token_maps_without_jobs_and_logs_in() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let token = cluster.scoped_token(&["submit"]).await;
    // `map` needs only submit: without -j it cannot read the free slots,
    // so it says so and runs a fixed number at once.
    let mapped = weft_tests::cli::run_weft(
        &cluster.url(),
        Some(&token),
        &["map", "--call", "echo"],
        Some(b"alpha\nbeta\n"),
    )
    .await;
    assert_eq!(mapped.code, Some(0), "{mapped}");
    let mut lines: Vec<&str> = mapped.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["alpha", "beta"], "{mapped}");
    assert!(mapped.stderr.contains("scope read"), "{mapped}");
    assert!(mapped.stderr.contains("-j N"), "{mapped}");

    // `login` saves a token the coordinator knows, whatever its scopes.
    let config = cluster.dir().join("config");
    let config_env = [("XDG_CONFIG_HOME", config.to_str().unwrap())];
    let login = weft_login(&cluster, &token, &config_env).await;
    assert_eq!(login.code, Some(0), "{login}");
    let context = config.join("weft").join("context.json");
    let saved = std::fs::read_to_string(&context).expect("the context is saved");
    assert!(saved.contains(&token), "{saved}");
    // The saved token submits; reading still needs `read` (exit 77).
    let submitted =
        weft_tests::cli::run_weft_env("", None, &config_env, &["submit", "--", "true"], None).await;
    assert_eq!(submitted.code, Some(0), "{submitted}");
    let listed = weft_tests::cli::run_weft_env("", None, &config_env, &["list"], None).await;
    assert_eq!(listed.code, Some(77), "{listed}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_file_is_private_and_no_secret_is_in_the_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = weft_coordinator::CoordinatorConfig {
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    let running = weft_coordinator::start(config, listener).await.unwrap();
    let file = data.join("admin.token");
    assert_eq!(running.admin_token_file(), Some(file.as_path()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin.token is 0600");
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the data dir is 0700");
    }
    let admin_token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    let client = weft_client::Client::connect_with_token(&running.url(), Some(&admin_token))
        .await
        .unwrap();
    let (token, _) = client
        .create_token(vec!["read".into()], "x", None)
        .await
        .unwrap();
    running.shutdown(Duration::from_secs(5)).await.unwrap();

    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(data.join("log")).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    for token in [&admin_token, &token] {
        let secret = token_secret(token);
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a token's secret is in the store file"
        );
    }

    // Restarted on the same data dir: the stored tokens still work and no
    // new admin token is made.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = weft_coordinator::CoordinatorConfig {
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    let running = weft_coordinator::start(config, listener).await.unwrap();
    assert_eq!(running.admin_token_file(), None);
    let client = weft_client::Client::connect_with_token(&running.url(), Some(&token))
        .await
        .unwrap();
    client
        .list(None, 1)
        .await
        .expect("the token survives a restart");
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The secret part of a `weft_<id>_<secret>` token: the id is hex, the
/// secret base64url, which may itself contain `_`.
fn token_secret(token: &str) -> &str {
    token
        .strip_prefix("weft_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(_, secret)| secret)
        .expect("a weft_<id>_<secret> token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ttl_is_refused_by_the_cli_and_by_the_coordinator() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    for role in ["client", "node"] {
        let mut argv = vec!["token", "create", "--role", role, "--ttl", "0s"];
        if role == "client" {
            argv.extend(["--scope", "read"]);
        }
        let out = cluster.weft(&argv).await;
        assert_eq!(out.code, Some(2), "{out}");
        assert!(out.stdout.is_empty(), "no token printed: {out}");
        assert!(out.stderr.contains("more than 0"), "{out}");
    }
    let mut admin = cluster.raw_admin(Some(&cluster.admin_token())).await;
    for (role, scopes) in [("client", vec!["read".to_owned()]), ("node", vec![])] {
        let err = admin
            .create_token(pb::CreateTokenRequest {
                role: role.into(),
                scopes,
                ttl: Some(prost_types::Duration::default()),
                ..Default::default()
            })
            .await
            .expect_err("a token born expired");
        assert_eq!(err.code(), Code::InvalidArgument, "{role}: {err:?}");
        assert!(err.message().contains("ttl"), "{role}: {}", err.message());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_or_a_node_prints_the_result_on_stdout() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    cluster.wait_for_nodes(1).await;
    let created = cluster
        .weft(&[
            "token", "create", "--scope", "read", "--name", "gone", "-o", "json",
        ])
        .await;
    assert_eq!(created.code, Some(0), "{created}");
    let created: serde_json::Value = serde_json::from_str(&created.stdout).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();

    let revoked = cluster.weft(&["token", "revoke", &id]).await;
    assert_eq!(revoked.code, Some(0), "{revoked}");
    assert_eq!(
        revoked.stdout.trim(),
        format!("token {id} revoked"),
        "{revoked}"
    );
    assert!(!revoked.stderr.contains("revoked"), "{revoked}");

    let name = cluster.node_names()[0].clone();
    let revoked = cluster.weft(&["nodes", "revoke", &name]).await;
    assert_eq!(revoked.code, Some(0), "{revoked}");
    assert!(
        revoked.stdout.starts_with(&format!("node {name} (")) && revoked.stdout.contains("revoked"),
        "{revoked}"
    );
    assert!(!revoked.stderr.contains("revoked"), "{revoked}");
    // A revoked weft-node stops by itself (exit 1): not a crash here.
    cluster.kill_node(&name).await;
    cluster.shutdown().await;
}
