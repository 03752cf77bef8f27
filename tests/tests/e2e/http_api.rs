//! The coordinator's HTTP listener and the dashboard's JSON API, at the
//! HTTP level (no browser): who may do what (no token, bad token, session
//! cookie, logout, revoked token, scopes, the CSRF header), what the pages
//! read (overview counts, the task list's pages and filter, a task without
//! its secrets), a task's events stream (history, then live, resumed from
//! `Last-Event-ID` without repeat or gap), the actions (cancel, drain),
//! and the listener's transport rules (HTTPS with the cluster CA;
//! plaintext refused off loopback).

use std::time::Duration;

use serde_json::{Value, json};

use weft_client::{TaskSpec, TaskState};
use weft_proto::NodeState;
use weft_tests::http::{EventStream, HttpClient, SseEvent};
use weft_tests::{TestCluster, default_timeout, wait_for, wait_until};

fn http(cluster: &TestCluster) -> HttpClient {
    HttpClient::new(&cluster.http_url(), cluster.ca_file())
}

/// Logs in with `token`; answers the session cookie (`name=value`).
/// The session cookie's name: `weft_session_PORT`, the dashboard's port.
fn session_cookie(http: &HttpClient) -> String {
    format!("weft_session_{}", http.port())
}

async fn login(http: &HttpClient, token: &str) -> String {
    let body = json!({ "token": token }).to_string().into_bytes();
    let answer = http
        .request(
            "POST",
            "/api/login",
            &[("x-weft-csrf", "1"), ("content-type", "application/json")],
            Some(body),
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let cookie = answer.header("set-cookie");
    cookie
        .split(';')
        .next()
        .expect("a cookie")
        .trim()
        .to_owned()
}

/// A shell task that prints `one`, waits for `file`, then prints `two`.
fn one_then_two(file: &std::path::Path) -> TaskSpec {
    TaskSpec::exec([
        "sh",
        "-c",
        r#"echo one; while [ ! -e "$1" ]; do sleep 0.02; done; echo two"#,
        "sh",
        &file.display().to_string(),
    ])
}

/// Events until one `matches` (inclusive); panics if the stream ends or
/// the default timeout passes first.
async fn events_until(
    stream: &mut EventStream,
    matches: impl Fn(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(default_timeout(), async {
        loop {
            let event = stream
                .next()
                .await
                .unwrap_or_else(|| panic!("the stream ended before the event awaited: {seen:?}"));
            let done = matches(&event);
            seen.push(event);
            if done {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no such event in time: {seen:?}"));
    seen
}

fn is_output(event: &SseEvent, text: &str) -> bool {
    event.event == "output"
        && event.data["text"]
            .as_str()
            .unwrap_or_default()
            .contains(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_working_token_the_api_answers_401_and_the_pages_load() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    // Open without a token: the page, its assets, the health check.
    let health = http.request("GET", "/healthz", &[], None).await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
    let page = http.request("GET", "/", &[], None).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));
    let csp = page.header("content-security-policy");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert_eq!(page.header("x-frame-options"), "DENY");
    assert_eq!(page.header("x-content-type-options"), "nosniff");
    let script = http.request("GET", "/assets/app.js", &[], None).await;
    assert_eq!(script.status, 200);
    assert!(script.header("content-type").starts_with("text/javascript"));
    assert_eq!(
        http.request("GET", "/assets/nope.js", &[], None)
            .await
            .status,
        404
    );
    // The API: no token, a malformed one, an unknown one.
    for path in ["/api/me", "/api/overview", "/api/tasks"] {
        let none = http.request("GET", path, &[], None).await;
        assert_eq!(none.status, 401, "{path}");
        assert!(none.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert_eq!(http.get(path, "garbage").await.status, 401, "{path}");
        let forged = format!("weft_0123456789abcdef_{}", "x".repeat(43));
        assert_eq!(http.get(path, &forged).await.status, 401, "{path}");
        let cookie = format!("{}=not-a-session", session_cookie(&http));
        let cookie = cookie.as_str();
        let stale = http.request("GET", path, &[("cookie", cookie)], None).await;
        assert_eq!(stale.status, 401, "{path}");
    }
    let bad_login = http
        .request(
            "POST",
            "/api/login",
            &[("x-weft-csrf", "1")],
            Some(br#"{"token": "weft_nope"}"#.to_vec()),
        )
        .await;
    assert_eq!(bad_login.status, 401);
    assert!(bad_login.header("set-cookie").is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_cookie_works_until_logout() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    // Without the CSRF header a login is refused.
    let body = json!({ "token": cluster.admin_token() }).to_string();
    let refused = http
        .request("POST", "/api/login", &[], Some(body.clone().into_bytes()))
        .await;
    assert_eq!(refused.status, 403);
    let answer = http
        .request(
            "POST",
            "/api/login",
            &[("x-weft-csrf", "1")],
            Some(body.into_bytes()),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["name"], "admin");
    assert_eq!(
        answer.json()["scopes"],
        json!(["read", "submit", "cancel", "admin"])
    );
    let set = answer.header("set-cookie");
    let named = format!("{}=", session_cookie(&http));
    for attribute in [
        named.as_str(),
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Secure",
    ] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    let me = http
        .request("GET", "/api/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(
        (me.status, me.json()["name"].clone()),
        (200, json!("admin"))
    );
    let logout = http
        .request(
            "POST",
            "/api/logout",
            &[("cookie", &cookie), ("x-weft-csrf", "1")],
            None,
        )
        .await;
    assert_eq!(logout.status, 204);
    assert!(logout.header("set-cookie").contains("Max-Age=0"));
    let after = http
        .request("GET", "/api/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(after.status, 401, "the session ended with the logout");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_at_once_by_bearer_and_by_cookie() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let (token, info) = client
        .create_token(vec!["read".into()], "viewer", None)
        .await
        .expect("a read token");
    let cookie = login(&http, &token).await;
    let me = http
        .request("GET", "/api/me", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(me.json(), json!({ "name": "viewer", "scopes": ["read"] }));
    assert_eq!(http.get("/api/overview", &token).await.status, 200);
    client.revoke_token(&info.id).await.expect("revoke");
    assert_eq!(http.get("/api/overview", &token).await.status, 401);
    let by_cookie = http
        .request("GET", "/api/overview", &[("cookie", &cookie)], None)
        .await;
    assert_eq!(by_cookie.status, 401);
    assert!(
        by_cookie.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("revoked")),
        "{}",
        by_cookie.json()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_reads_and_its_cancel_drain_and_revoke_are_refused() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "300s"))
        .await
        .expect("submit");
    let node = cluster.wait_for_running(id).await;
    let read = cluster.scoped_token(&["read"]).await;
    assert_eq!(http.get("/api/overview", &read).await.status, 200);
    assert_eq!(
        http.get(&format!("/api/tasks/{id}"), &read).await.status,
        200
    );
    let node_page = http.get(&format!("/api/nodes/{node}"), &read).await;
    assert_eq!(node_page.status, 200, "{}", node_page.json());
    let running = node_page.json()["running"].clone();
    assert_eq!(running[0]["task_id"], id.to_string(), "{running}");
    assert_eq!(running[0]["state"], "running", "{running}");
    assert_eq!(running[0]["attempt"], 1, "{running}");
    for path in [
        format!("/api/tasks/{id}/cancel"),
        format!("/api/nodes/{node}/drain"),
        format!("/api/nodes/{node}/revoke"),
    ] {
        let refused = http.post(&path, &read).await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.json());
        assert!(
            refused.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("scope")),
            "{path}: {}",
            refused.json()
        );
    }
    // Without the CSRF header even the admin's POSTs are refused.
    let admin = cluster.admin_token();
    let auth = format!("Bearer {admin}");
    for path in [
        format!("/api/tasks/{id}/cancel"),
        format!("/api/nodes/{node}/drain"),
    ] {
        let refused = http
            .request("POST", &path, &[("authorization", &auth)], None)
            .await;
        assert_eq!(refused.status, 403, "{path}");
    }
    // Nothing happened.
    assert_eq!(client.get(id).await.unwrap().state, TaskState::Running);
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].state, NodeState::Ready);
    client.cancel(id).await.expect("cancel");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_and_the_task_list_show_what_was_submitted() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let token = cluster.admin_token();
    let mut done = Vec::new();
    for i in 0..5 {
        let id = client
            .submit(TaskSpec::call("echo", format!("task {i}")).name(format!("echo-{i}")))
            .await
            .expect("submit");
        done.push(id);
    }
    for id in &done {
        cluster.wait_for_state(*id, TaskState::Succeeded).await;
    }
    let sleeper = client
        .submit(TaskSpec::call("sleep", "300s").name("sleeper"))
        .await
        .expect("submit");
    cluster.wait_for_running(sleeper).await;

    let overview = http.get("/api/overview", &token).await.json();
    assert_eq!(overview["tasks_by_state"]["succeeded"], 5, "{overview}");
    assert_eq!(overview["tasks_by_state"]["running"], 1, "{overview}");
    assert_eq!(overview["tasks_by_state"]["queued"], 0, "{overview}");
    assert_eq!(overview["slots"], 2, "{overview}");
    let nodes = overview["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{overview}");
    assert_eq!(nodes[0]["state"], "connected");
    assert_eq!(nodes[0]["slots_used"], 1);
    assert_eq!(overview["series"]["interval_seconds"], 5);
    assert!(overview["series"]["queue_depth"].is_array());

    // Newest first, two per page, the pages joined give every task once.
    let mut ids = Vec::new();
    let mut token_param = String::new();
    loop {
        let page = http
            .get(
                &format!("/api/tasks?limit=2&page_token={token_param}"),
                &token,
            )
            .await
            .json();
        let tasks = page["tasks"].as_array().expect("tasks");
        assert!(tasks.len() <= 2, "{page}");
        ids.extend(tasks.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        token_param = page["next_page_token"].as_str().unwrap().to_owned();
        if token_param.is_empty() {
            break;
        }
    }
    let mut expected: Vec<String> = done.iter().map(ToString::to_string).collect();
    expected.push(sleeper.to_string());
    expected.reverse();
    assert_eq!(ids, expected, "newest first, each once");

    let running = http.get("/api/tasks?state=running", &token).await.json();
    let running = running["tasks"].as_array().expect("tasks").clone();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0]["id"], sleeper.to_string());
    assert_eq!(running[0]["name"], "sleeper");
    assert_eq!(running[0]["state"], "running");
    let succeeded = http.get("/api/tasks?state=succeeded", &token).await.json();
    assert_eq!(succeeded["tasks"].as_array().unwrap().len(), 5);
    assert_eq!(
        http.get("/api/tasks?state=sleeping", &token).await.status,
        400
    );
    assert_eq!(http.get("/api/tasks/not-an-id", &token).await.status, 400);

    // The name and node filters are the gRPC List's; a task's JSON carries
    // its attempt history.
    let named = http.get("/api/tasks?name=echo-3", &token).await.json();
    let named = named["tasks"].as_array().expect("tasks").clone();
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0]["id"], done[3].to_string());
    let attempts = named[0]["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["number"], 1);
    assert_eq!(attempts[0]["outcome"], "succeeded");
    assert!(attempts[0]["ended_at"].is_string(), "{attempts:?}");
    let node_name = nodes[0]["name"].as_str().expect("node name").to_owned();
    let on_node = http
        .get(&format!("/api/tasks?node={node_name}&limit=100"), &token)
        .await
        .json();
    assert_eq!(on_node["tasks"].as_array().unwrap().len(), 6, "{on_node}");
    let elsewhere = http
        .get("/api/tasks?node=no-such-node", &token)
        .await
        .json();
    assert_eq!(
        elsewhere["tasks"].as_array().unwrap().len(),
        0,
        "{elsewhere}"
    );
    assert_eq!(http.get("/api/tasks?label=nokey", &token).await.status, 400);
    let unknown = weft_proto::TaskId::new();
    assert_eq!(
        http.get(&format!("/api/tasks/{unknown}"), &token)
            .await
            .status,
        404
    );
    assert_eq!(
        http.get("/api/nodes/no-such-node", &token).await.status,
        404
    );
    client.cancel(sleeper).await.expect("cancel");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_s_json_and_events_never_hold_its_secret_values() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let token = cluster.admin_token();
    let secret = format!(
        "s3cr3t-{}",
        weft_proto::TaskId::new().to_string().to_lowercase()
    );
    let id = client
        .submit(
            TaskSpec::exec(["sh", "-c", r#"test -n "$API_KEY" && echo has-key"#])
                .env("PLAIN", "visible")
                .secret_env("API_KEY", &secret),
        )
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Succeeded).await;
    let task = http.get(&format!("/api/tasks/{id}"), &token).await;
    assert_eq!(task.status, 200);
    let text = String::from_utf8_lossy(&task.body).into_owned();
    assert!(!text.contains(&secret), "{text}");
    assert_eq!(task.json()["task"]["env"], json!({ "PLAIN": "visible" }));
    assert_eq!(task.json()["task"]["kind"], "exec");
    let list = http.get("/api/tasks", &token).await;
    assert!(!String::from_utf8_lossy(&list.body).contains(&secret));
    let auth = format!("Bearer {token}");
    let mut events = http
        .events(
            &format!("/api/tasks/{id}/events"),
            &[("authorization", &auth)],
        )
        .await;
    let all = events_until(&mut events, |e| e.event == "finished").await;
    assert!(all.iter().any(|e| is_output(e, "has-key")), "{all:?}");
    assert!(!format!("{all:?}").contains(&secret));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_gives_history_then_live_output_and_resumes_exactly() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let cookie = login(&http, &cluster.admin_token()).await;
    let go = cluster.dir().join("go");
    let id = client.submit(one_then_two(&go)).await.expect("submit");
    let path = format!("/api/tasks/{id}/events");

    // Live: `one` arrives while the task runs (it waits for `go`).
    let mut first = http.events(&path, &[("cookie", &cookie)]).await;
    let before = events_until(&mut first, |e| is_output(e, "one")).await;
    assert_eq!(client.get(id).await.unwrap().state, TaskState::Running);
    assert!(
        before
            .iter()
            .any(|e| e.event == "state" && e.data["state"] == "running"),
        "{before:?}"
    );
    let last = before.last().and_then(|e| e.id).expect("events have ids");
    // The browser goes away; the task goes on and ends meanwhile.
    drop(first);
    std::fs::write(&go, b"").unwrap();
    cluster.wait_for_state(id, TaskState::Succeeded).await;

    // Reconnecting with Last-Event-ID picks up right after it.
    let last_id = last.to_string();
    let mut resumed = http
        .events(&path, &[("cookie", &cookie), ("last-event-id", &last_id)])
        .await;
    let after = events_until(&mut resumed, |e| e.event == "finished").await;
    assert!(
        resumed.next().await.is_none(),
        "the stream ends after finished"
    );
    assert_eq!(
        after.first().and_then(|e| e.id),
        Some(last + 1),
        "{after:?}"
    );
    assert!(after.iter().any(|e| is_output(e, "two")), "{after:?}");
    assert_eq!(after.last().unwrap().data["task"]["state"], "succeeded");

    // Joined, they are exactly the whole history: no repeat, no gap.
    let mut whole = http.events(&path, &[("cookie", &cookie)]).await;
    let all = events_until(&mut whole, |e| e.event == "finished").await;
    let joined: Vec<Option<u64>> = before.iter().chain(&after).map(|e| e.id).collect();
    let expected: Vec<Option<u64>> = all.iter().map(|e| e.id).collect();
    assert_eq!(joined, expected);
    assert_eq!(
        expected,
        (0..expected.len() as u64).map(Some).collect::<Vec<_>>()
    );
    // Past the last event of a finished task: 204, so a browser stops
    // reconnecting.
    let past = format!("{}", expected.len() - 1);
    let stop = http
        .request(
            "GET",
            &path,
            &[("cookie", &cookie), ("last-event-id", &past)],
            None,
        )
        .await;
    assert_eq!(stop.status, 204);
    // `?from_seq=N` starts at N.
    let mut from = http
        .events(
            &format!("{path}?from_seq={}", last + 1),
            &[("cookie", &cookie)],
        )
        .await;
    let again = events_until(&mut from, |e| e.event == "finished").await;
    assert_eq!(again, after);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_printed_in_two_writes_reaches_the_events_stream_whole() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let cookie = login(&http, &cluster.admin_token()).await;
    let go = cluster.dir().join("go");
    // "a€b", the euro sign's three bytes split over two writes with a wait
    // between, so the node reads (and sends) them as two pieces.
    let split = TaskSpec::exec([
        "sh",
        "-c",
        r#"printf 'a\342\202'; while [ ! -e "$1" ]; do sleep 0.02; done; printf '\254b'"#,
        "sh",
        &go.display().to_string(),
    ]);
    let id = client.submit(split).await.expect("submit");
    let path = format!("/api/tasks/{id}/events");
    let mut stream = http.events(&path, &[("cookie", &cookie)]).await;
    // The first piece's whole characters arrive while the task waits.
    let before = events_until(&mut stream, |e| is_output(e, "a")).await;
    std::fs::write(&go, b"").unwrap();
    let after = events_until(&mut stream, |e| e.event == "finished").await;
    let pieces: Vec<String> = before
        .iter()
        .chain(&after)
        .filter(|e| e.event == "output")
        .map(|e| e.data["text"].as_str().unwrap_or_default().to_owned())
        .collect();
    // Two pieces, the split character sent whole with the second.
    assert_eq!(pieces, ["a", "€b"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_token_cancels_a_task_and_an_admin_token_drains_a_node() {
    let cluster = TestCluster::builder().nodes(2).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "300s"))
        .await
        .expect("submit");
    cluster.wait_for_running(id).await;
    let cancel = cluster.scoped_token(&["cancel"]).await;
    let answer = http.post(&format!("/api/tasks/{id}/cancel"), &cancel).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["task"]["id"], id.to_string());
    cluster.wait_for_state(id, TaskState::Cancelled).await;

    let admin = cluster.admin_token();
    let node = cluster.node_names()[0].clone();
    let drained = http.post(&format!("/api/nodes/{node}/drain"), &admin).await;
    assert_eq!(drained.status, 200, "{}", drained.json());
    assert_eq!(drained.json()["node"]["name"], node.as_str());
    assert_eq!(drained.json()["node"]["state"], "draining");
    // The node drains (with nothing running, it leaves).
    wait_until(default_timeout(), async || {
        client.nodes().await.is_ok_and(|nodes| {
            nodes
                .iter()
                .all(|n| n.name != node || n.state == NodeState::Draining)
        })
    })
    .await
    .expect("the node drains");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_with_the_cluster_ca_and_nothing_else() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    assert!(cluster.http_url().starts_with("https://"));
    let http = http(&cluster);
    assert_eq!(http.request("GET", "/healthz", &[], None).await.status, 200);
    // Plaintext HTTP to the TLS port gets no HTTP answer.
    let plain = HttpClient::new(&cluster.http_url().replace("https://", "http://"), None);
    let answer = plain.try_request("GET", "/healthz", &[], None).await;
    assert!(
        answer.as_ref().map_or(true, |a| a.status != 200),
        "{answer:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_on_a_non_loopback_address_without_insecure() {
    // The library's rule (the binary serves TLS unless --insecure): a
    // dashboard without TLS only on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = weft_coordinator::CoordinatorConfig {
        http_listen: Some("0.0.0.0:0".parse().unwrap()),
        ..Default::default()
    };
    let err = weft_coordinator::start(config, listener)
        .await
        .expect_err("plaintext on 0.0.0.0 is refused");
    let message = err.to_string();
    assert!(
        message.contains("--http-listen") && message.contains("loopback"),
        "{message}"
    );
    // On loopback it serves, plaintext.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = weft_coordinator::CoordinatorConfig {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_token_file: Some(dir.path().join("admin.token")),
        ..Default::default()
    };
    let running = weft_coordinator::start(config, listener)
        .await
        .expect("start");
    let url = running.http_url().expect("an HTTP url");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let answer = wait_for(default_timeout(), || async {
        HttpClient::new(&url, None)
            .try_request("GET", "/healthz", &[], None)
            .await
            .ok()
    })
    .await
    .expect("the dashboard answers");
    assert_eq!(answer.status, 200);
    let _ = running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_s_errors_are_json_with_a_status_a_page_can_act_on() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let http = http(&cluster);
    let token = cluster.admin_token();
    let missing = http.get("/api/nope", &token).await;
    assert_eq!(missing.status, 404);
    let body: Value = missing.json();
    assert!(body["error"].is_string(), "{body}");
    let bad = http.get("/api/tasks?limit=many", &token).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("limit"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_local_prints_a_dashboard_url_that_answers_with_its_ca() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut local = Command::new(weft_tests::process::bin_path("weft"))
        .args([
            "-o",
            "json",
            "local",
            "--nodes",
            "1",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config")
        .env_remove("WEFT_TOKEN")
        .env_remove("WEFT_COORDINATOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("weft local starts");
    let mut first = String::new();
    BufReader::new(local.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let info: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
    let dashboard = info["dashboard"].as_str().expect("a dashboard url");
    assert!(dashboard.starts_with("https://127.0.0.1:"), "{info}");
    let ca = info["ca_file"].as_str().expect("a CA file");
    let token = info["token"].as_str().expect("a token");
    let http = HttpClient::new(dashboard, Some(std::path::Path::new(ca)));
    let me = http.get("/api/me", token).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["scopes"][3], "admin");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(local.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(local.wait().unwrap().success());
}

/// A task that waits for `file`, named `name` within its Submit.
fn held(file: &std::path::Path, name: &str) -> TaskSpec {
    TaskSpec::exec([
        "sh",
        "-c",
        r#"while [ ! -e "$1" ]; do sleep 0.02; done"#,
        "sh",
        &file.display().to_string(),
    ])
    .ref_name(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_page_counts_its_states_shows_its_graph_and_cancels_it() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let token = cluster.admin_token();
    let release = cluster.dir().join("release-first");
    // first → second → third, in one Submit.
    let weft_client::SubmitOutcome {
        job_id: job,
        task_ids: ids,
    } = client
        .submit_graph(vec![
            held(&release, "first").name("first"),
            TaskSpec::call("noop", "2")
                .name("second")
                .ref_name("second")
                .after_ref("first"),
            TaskSpec::call("noop", "3")
                .name("third")
                .after_ref("second")
                .after_rule(weft_proto::DependencyRule::AllFinished),
        ])
        .await
        .expect("submit the graph");
    assert_eq!(job, ids[0]);
    cluster.wait_for_running(ids[0]).await;

    let page = http.get(&format!("/api/jobs/{job}"), &token).await;
    assert_eq!(page.status, 200, "{}", page.json());
    let page = page.json();
    assert_eq!(
        page["counts"],
        json!({"running": 1, "pending": 2}),
        "{page}"
    );
    assert_eq!(page["counts_complete"], true);
    let listed: Vec<String> = page["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let want: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(listed, want, "a job's tasks in submission order");

    // A waiting task shows its job, what it runs after and what it waits for.
    let second = http
        .get(&format!("/api/tasks/{}", ids[1]), &token)
        .await
        .json();
    let second = &second["task"];
    assert_eq!(second["state"], "pending", "{second}");
    assert_eq!(second["job_id"], job.to_string());
    assert_eq!(second["ref"], "second");
    assert_eq!(second["after"], json!([ids[0].to_string()]));
    assert_eq!(second["waiting_for"], json!([ids[0].to_string()]));
    assert_eq!(second["after_rule"], "all_succeeded");
    let third = http
        .get(&format!("/api/tasks/{}", ids[2]), &token)
        .await
        .json();
    assert_eq!(third["task"]["after_rule"], "all_finished");
    // The job filter of the task list, with a state.
    let pending = http
        .get(&format!("/api/tasks?job={job}&state=pending"), &token)
        .await
        .json();
    assert_eq!(
        pending["tasks"].as_array().map(Vec::len),
        Some(2),
        "{pending}"
    );

    // A read token may not cancel a job; a cancel token may.
    let reader = cluster.scoped_token(&["read"]).await;
    let refused = http.post(&format!("/api/jobs/{job}/cancel"), &reader).await;
    assert_eq!(refused.status, 403, "{}", refused.json());
    let cancel = cluster.scoped_token(&["cancel"]).await;
    let answer = http.post(&format!("/api/jobs/{job}/cancel"), &cancel).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["cancelled"], 3, "{}", answer.json());
    for id in &ids {
        assert!(cluster.wait_for_final(*id).await.state.is_final());
    }
    let page = http.get(&format!("/api/jobs/{job}"), &token).await.json();
    let live: u64 = ["pending", "queued", "assigned", "running"]
        .iter()
        .filter_map(|s| page["counts"][*s].as_u64())
        .sum();
    assert_eq!(live, 0, "{page}");

    // A job-shaped id (a Submit's first id ends in zero bits) that no Submit made.
    let fresh = weft_proto::TaskId::new().to_string();
    let unknown_job = format!("{}0000000", &fresh[..19]);
    let unknown = http.get(&format!("/api/jobs/{unknown_job}"), &token).await;
    assert_eq!(unknown.status, 404, "{}", unknown.json());
    std::fs::write(&release, b"").expect("release");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_node_resources_and_a_task_s_policy_show_through_the_api() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .node_resources(0, &[("gpu", 2)])
        .start()
        .await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let token = cluster.admin_token();
    client
        .set_limit(&weft_proto::policy::Limit {
            name: "api".into(),
            kind: weft_proto::policy::LimitKind::Rate("100/s".parse().expect("a rate")),
        })
        .await
        .expect("set a rate limit");
    client
        .set_limit(&weft_proto::policy::Limit {
            name: "user-42".into(),
            kind: weft_proto::policy::LimitKind::MaxRunning(2),
        })
        .await
        .expect("set a concurrency limit");
    let limits = http.get("/api/limits", &token).await;
    assert_eq!(limits.status, 200, "{}", limits.json());
    let limits = limits.json();
    let by_name = |name: &str| {
        limits["limits"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == name).cloned())
            .unwrap_or_else(|| panic!("limit {name} in {limits}"))
    };
    assert_eq!(by_name("api")["kind"], "rate");
    assert_eq!(by_name("api")["rate"]["units"], 100);
    assert_eq!(by_name("user-42")["kind"], "concurrency");
    assert_eq!(by_name("user-42")["max_running"], 2);

    // A task holding one gpu: the node shows it used, the task its policy.
    let release = cluster.dir().join("release-gpu");
    let id = client
        .submit(
            held(&release, "gpu-task")
                .resource("gpu", 1)
                .priority(8)
                .fair_key("team-a", 3)
                .rate_limit("api", 1)
                .concurrency("user-42", 0, weft_proto::OverLimit::Queue),
        )
        .await
        .expect("submit");
    let node = cluster.wait_for_running(id).await;
    let page = http.get(&format!("/api/nodes/{node}"), &token).await.json();
    assert_eq!(page["node"]["resources"], json!({"gpu": 2}), "{page}");
    assert_eq!(page["node"]["resources_free"], json!({"gpu": 1}), "{page}");
    let task = http.get(&format!("/api/tasks/{id}"), &token).await.json();
    let task = &task["task"];
    assert_eq!(task["priority"], 8, "{task}");
    assert_eq!(task["fair_key"], "team-a");
    assert_eq!(task["fair_weight"], 3);
    assert_eq!(task["resources"], json!({"gpu": 1}));
    assert_eq!(task["rate_limits"], json!([{"name": "api", "units": 1}]));
    assert_eq!(task["concurrency"]["key"], "user-42");
    std::fs::write(&release, b"").expect("release");
    assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_show_through_the_api_to_a_read_token() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    let spec = weft_proto::pb::ScheduleSpec {
        name: "nightly".into(),
        cron: "0 3 * * *".into(),
        time_zone: "Europe/Paris".into(),
        task: Some(TaskSpec::exec(["true"]).into()),
        overlap: weft_proto::pb::OverlapPolicy::Queue as i32,
        catch_up: weft_proto::pb::CatchUp::None as i32,
    };
    client
        .create_schedule(spec)
        .await
        .expect("create a schedule");
    let reader = cluster.scoped_token(&["read"]).await;
    let answer = http.get("/api/schedules", &reader).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    let all = answer.json();
    let schedules = all["schedules"].as_array().expect("a list");
    assert_eq!(schedules.len(), 1, "{all}");
    let nightly = &schedules[0];
    assert_eq!(nightly["name"], "nightly");
    assert_eq!(nightly["cron"], "0 3 * * *");
    assert_eq!(nightly["time_zone"], "Europe/Paris");
    assert_eq!(nightly["overlap"], "queue");
    assert_eq!(nightly["catch_up"], "none");
    assert_eq!(nightly["paused"], false);
    assert!(nightly["next_fire"].as_str().is_some(), "{nightly}");
    assert_eq!(nightly["last_fire"], Value::Null);
    // Without a token: refused, as every API route.
    let anonymous = http.get("/api/schedules", "").await;
    assert_eq!(anonymous.status, 401);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedules_api_lists_every_page() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let http = http(&cluster);
    let client = cluster.client().await;
    // Near the 64 KiB cap each: more than one 1 MiB ListSchedules page.
    let input = vec![b'x'; 60 * 1024];
    let names: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
    for name in &names {
        let spec = weft_proto::pb::ScheduleSpec {
            name: name.clone(),
            cron: "0 3 * * *".into(),
            task: Some(TaskSpec::call("echo", input.clone()).into()),
            ..Default::default()
        };
        client
            .create_schedule(spec)
            .await
            .expect("create a schedule");
    }
    let first = client.list_schedules_page("", 0).await.expect("a page");
    assert!(!first.next_page_token.is_empty(), "more than one page");
    let answer = http.get("/api/schedules", &cluster.admin_token()).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    let all = answer.json();
    let listed: Vec<&str> = all["schedules"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(listed, names);
    cluster.shutdown().await;
}
