//! The dashboard without tokens (`--no-auth`, loopback only) has no login,
//! so it answers only to a request that names it by an IP address or
//! `localhost`: a web page that rebinds a DNS name of its own to 127.0.0.1
//! (and so is same-origin with the dashboard) cannot drive it. With tokens
//! any name is served: a rebound page has no session.

mod common;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::DEADLINE;
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};

async fn coordinator(auth: bool) -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        auth,
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..CoordinatorConfig::default()
    };
    weft_coordinator::start(config, listener).await.unwrap()
}

/// The status code of `GET path` sent to the dashboard naming it `host`.
async fn status(c: &RunningCoordinator, path: &str, host: &str) -> u16 {
    let addr = c.http_addr().expect("the dashboard listens");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

#[tokio::test]
async fn without_tokens_the_dashboard_answers_only_to_an_address_or_localhost() {
    let c = coordinator(false).await;
    let port = c.http_addr().unwrap().port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(status(&c, "/api/overview", &host).await, 200, "{host}");
    }
    for host in [
        format!("rebound.example:{port}"),
        "rebound.example".to_owned(),
    ] {
        assert_eq!(status(&c, "/api/overview", &host).await, 421, "{host}");
        assert_eq!(status(&c, "/", &host).await, 421, "{host}");
    }
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn with_tokens_the_dashboard_answers_to_any_name() {
    let c = coordinator(true).await;
    let port = c.http_addr().unwrap().port();
    // No session: refused for that, not for the name.
    assert_eq!(
        status(&c, "/api/overview", &format!("weft.example:{port}")).await,
        401
    );
    c.shutdown(DEADLINE).await.unwrap();
}
