//! TLS by default: clients, nodes and the CLI trust the cluster CA (file
//! or pin); a plaintext client, a wrong CA or a wrong pin is refused with a
//! message that says what to pass; the serving certificate rotates without
//! dropping live streams; `--insecure` keeps plaintext working, warns, and
//! is the only way to serve plaintext on a non-loopback address.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;
use x509_parser::prelude::*;

use weft_client::{Client, Error, EventBody, TaskSpec, TaskState, Trust};
use weft_coordinator::CoordinatorConfig;
use weft_coordinator::tls::TlsConfig;
use weft_tests::process::spawn;
use weft_tests::{TestCluster, default_timeout, wait_until, weft_at};

/// A second, unrelated CA (another cluster's `ca.pem`).
fn other_ca(dir: &Path) -> std::path::PathBuf {
    let (ca, _) = weft_coordinator::tls::pki::Ca::load_or_create(&dir.join("other-pki"))
        .expect("making another CA");
    ca.cert_path().to_owned()
}

fn pin_of(ca_file: &Path) -> String {
    let pem = std::fs::read(ca_file).expect("reading ca.pem");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("a PEM certificate");
    weft_proto::tls::ca_pin(&der)
}

use rustls::pki_types::pem::PemObject;

/// The serving certificate a fresh handshake gets: (serial, not_after).
async fn served_cert(cluster: &TestCluster) -> (Vec<u8>, i64) {
    let ca = cluster.ca_file().expect("a TLS cluster").to_owned();
    let config = Trust::CaFile(ca).client_config().expect("client config");
    let addr = cluster.url().trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await
        .expect("handshake with the cluster CA");
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("a chain")
        .to_vec();
    let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).expect("a certificate");
    (
        leaf.raw_serial().to_vec(),
        leaf.validity().not_after.timestamp(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_against_the_default_coordinator_fails_clearly() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let plain = cluster.url().replace("https://", "http://");
    // Connecting plainly fails (or, were the connection lazy, the first
    // call does); the message says to dial https with the CA.
    let message = match Client::connect(&plain).await {
        Err(err) => err.to_string(),
        Ok(client) => client
            .nodes()
            .await
            .expect_err("a plaintext call")
            .to_string(),
    };
    assert!(
        message.contains("serves TLS") || message.contains("https://"),
        "{message}"
    );
    // An https address without a CA: says what to pass.
    let err = Client::connect(&cluster.url()).await.expect_err("no CA");
    assert!(matches!(err, Error::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("--ca-file / WEFT_CA"), "{err}");

    // The CLI: http:// against TLS, and https:// without a CA.
    let out = weft_at("http://unregistered", &["--coordinator", &plain, "nodes"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("serves TLS"), "{out}");
    let out = weft_at(
        "https://unregistered",
        &["--coordinator", &cluster.url(), "nodes"],
    )
    .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--ca-file / WEFT_CA"), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_ca_file_or_pin_refuses_the_coordinator() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let url = cluster.url();
    let wrong = other_ca(cluster.dir());
    let err = Client::connect_with(&url, Some(&Trust::CaFile(wrong.clone())))
        .await
        .expect_err("another CA");
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "the coordinator's certificate is not signed by the CA in {}",
            wrong.display()
        )) && message.contains("--ca-file / WEFT_CA"),
        "{message}"
    );
    let wrong_pin = Trust::pin(&pin_of(&wrong)).expect("a pin");
    let err = Client::connect_with(&url, Some(&wrong_pin))
        .await
        .expect_err("another pin");
    assert!(
        err.to_string().contains("does not match the CA pin"),
        "{err}"
    );

    // The right pin works, as the right file does.
    let ca = cluster.ca_file().expect("a TLS cluster").to_owned();
    let pin = pin_of(&ca);
    let token = cluster.admin_token();
    let client = Client::connect_secure(&url, Some(&Trust::pin(&pin).expect("pin")), Some(&token))
        .await
        .expect("the cluster's pin");
    assert_eq!(client.nodes().await.expect("nodes").len(), 1);

    // The CLI: --ca-pin right and wrong, --ca-file wrong.
    let unregistered = "https://unregistered";
    let ok = weft_at(
        unregistered,
        &[
            "--coordinator",
            &url,
            "--token",
            &token,
            "--ca-pin",
            &pin,
            "nodes",
        ],
    )
    .await;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert!(ok.stdout.contains("node-0"), "{ok}");
    let bad = weft_at(
        unregistered,
        &["--coordinator", &url, "--ca-pin", &pin_of(&wrong), "nodes"],
    )
    .await;
    assert_ne!(bad.code, Some(0), "{bad}");
    assert!(bad.stderr.contains("does not match the CA pin"), "{bad}");
    let bad = weft_at(
        unregistered,
        &[
            "--coordinator",
            &url,
            "--ca-file",
            &wrong.display().to_string(),
            "nodes",
        ],
    )
    .await;
    assert_ne!(bad.code, Some(0), "{bad}");
    assert!(bad.stderr.contains("is not signed by the CA in"), "{bad}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_ca_never_registers_and_says_why() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let wrong = other_ca(cluster.dir()).display().to_string();
    let args: Vec<String> = [
        "--coordinator",
        &cluster.url(),
        "--ca-file",
        &wrong,
        "--name",
        "stray",
    ]
    .map(str::to_owned)
    .to_vec();
    let node = spawn("weft-node", &args, cluster.dir(), "stray");
    wait_until(default_timeout(), async || {
        node.log_text().contains("is not signed by the CA in")
    })
    .await
    .unwrap_or_else(|_| panic!("no CA error in the node's log:\n{}", node.log_text()));
    assert!(
        cluster
            .client()
            .await
            .nodes()
            .await
            .expect("nodes")
            .is_empty()
    );
    let _ = node.terminate(default_timeout()).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_rotates_while_streams_and_sessions_carry_on() {
    let lifetime = Duration::from_secs(3);
    let cluster = TestCluster::builder()
        .nodes(1)
        .slots(4)
        .cert_lifetime(lifetime)
        .start()
        .await;
    let client = cluster.client().await;
    let node_before = client.nodes().await.expect("nodes")[0].id;
    let (serial_before, not_after_before) = served_cert(&cluster).await;

    // A task that outlives the first certificate, watched on a stream
    // opened before the rotation.
    let long = client
        .submit(TaskSpec::exec(["sleep", "4"]))
        .await
        .expect("submit");
    let mut watch = client.watch(long, 0).await.expect("watch");

    // Tasks submitted all along, over the connection made before.
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            client
                .submit(TaskSpec::call("echo", format!("t{i}")))
                .await
                .expect("submit"),
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // spreads them over the rotation
    }
    wait_until(default_timeout(), async || {
        served_cert(&cluster).await.0 != serial_before
    })
    .await
    .expect("a new serving certificate within the lifetime");
    let (_, not_after_after) = served_cert(&cluster).await;
    assert!(
        not_after_after > not_after_before,
        "{not_after_after} <= {not_after_before}"
    );
    for i in 20..40 {
        ids.push(
            client
                .submit(TaskSpec::call("echo", format!("t{i}")))
                .await
                .expect("submit after rotation"),
        );
    }

    // The watch opened before the rotation sees the end, past the first
    // certificate's expiry.
    let mut last = None;
    while let Some(event) = watch.next().await {
        let event = event.expect("the watch stream keeps working");
        if let EventBody::Finished(task) = event.body {
            last = Some(task.state);
        }
    }
    assert_eq!(last, Some(TaskState::Succeeded));
    // Nothing lost: every task succeeded, on the node session from before.
    for (i, id) in ids.into_iter().enumerate() {
        let task = cluster.wait_for_final(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert_eq!(task.output, format!("t{i}").into_bytes());
    }
    let nodes = client.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].id, node_before, "the node session was replaced");
    // A new client handshakes with the new certificate.
    let fresh = cluster.client_with(Some(&cluster.admin_token())).await;
    assert_eq!(fresh.nodes().await.expect("nodes").len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_cluster_serves_plaintext_to_clients_nodes_and_the_cli() {
    let cluster = TestCluster::builder().nodes(2).insecure().start().await;
    assert!(cluster.url().starts_with("http://"), "{}", cluster.url());
    assert!(cluster.ca_file().is_none());
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["echo", "plain"]))
        .await
        .expect("submit");
    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    let out = cluster.weft(&["run", "--", "echo", "cli"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "cli\n");
    // The token went over plaintext: said so on stderr.
    assert!(out.stderr.contains("over plaintext"), "{out}");
    // A CA pin with http:// asks for a check plaintext cannot make: refused.
    let pin = format!("sha256:{}", "ab".repeat(32));
    let pinned = cluster.weft(&["--ca-pin", &pin, "nodes"]).await;
    assert_ne!(pinned.code, Some(0), "{pinned}");
    assert!(pinned.stderr.contains("CA or pin was given"), "{pinned}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_a_non_loopback_address_is_refused_unless_insecure() {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let err = weft_coordinator::start(CoordinatorConfig::default(), listener)
        .await
        .expect_err("plaintext on every address");
    assert!(
        err.to_string().contains("refusing to serve plaintext")
            && err.to_string().contains("--insecure"),
        "{err}"
    );
    // TLS on the same address is fine, and so is plaintext with --insecure.
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let tls = CoordinatorConfig {
        tls: Some(TlsConfig {
            pki_dir: Some(dir.path().join("pki")),
            ..TlsConfig::default()
        }),
        ..CoordinatorConfig::default()
    };
    let running = weft_coordinator::start(tls, listener)
        .await
        .expect("TLS on 0.0.0.0");
    assert!(running.url().starts_with("https://"));
    assert!(running.ca_pin().expect("a pin").starts_with("sha256:"));
    running
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let insecure = CoordinatorConfig {
        insecure: true,
        ..CoordinatorConfig::default()
    };
    let running = weft_coordinator::start(insecure, listener)
        .await
        .expect("--insecure");
    running
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_binary_logs_its_ca_and_pin_and_warns_when_insecure() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (label, insecure) in [("secure", false), ("insecure", true)] {
        let addr_file = dir.path().join(format!("{label}.addr"));
        let data = dir.path().join(format!("{label}-data"));
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--addr-file",
            &addr_file.display().to_string(),
            "--data-dir",
            &data.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        if insecure {
            args.push("--insecure".to_owned());
        }
        let mut child = spawn("weft-coordinator", &args, dir.path(), label);
        weft_cluster::wait_for_addr_file(
            &mut child,
            &addr_file,
            default_timeout(),
            Duration::from_millis(10),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log_text()));
        let log = child.log_text();
        if insecure {
            assert!(log.contains("--insecure: serving plaintext"), "{log}");
            assert!(!data.join("ca.pem").exists());
        } else {
            let ca = data.join("ca.pem");
            assert!(log.contains(&format!("ca_file={}", ca.display())), "{log}");
            assert!(log.contains(&format!("ca_pin={}", pin_of(&ca))), "{log}");
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode(&data), 0o700);
            assert_eq!(mode(&ca), 0o600);
            assert_eq!(mode(&data.join("ca.key")), 0o600);
        }
        let _ = child.terminate(default_timeout()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_flag_wins_over_the_other_cas_environment_variable() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let url = cluster.url();
    let ca = cluster
        .ca_file()
        .expect("a TLS cluster")
        .display()
        .to_string();
    let pin = pin_of(cluster.ca_file().expect("a TLS cluster"));
    let wrong = other_ca(cluster.dir());
    let (wrong_pin, wrong) = (pin_of(&wrong), wrong.display().to_string());
    let token = cluster.admin_token();
    let weft = |env: Vec<(&'static str, String)>, args: Vec<&str>| {
        let env: Vec<(&'static str, String)> = env;
        let mut argv = vec![
            "--coordinator".to_owned(),
            url.clone(),
            "--token".to_owned(),
        ];
        argv.push(token.clone());
        argv.extend(args.into_iter().map(str::to_owned));
        argv.push("nodes".to_owned());
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            weft_tests::cli::run_weft_env("https://unregistered", None, &env, &argv, None).await
        }
    };
    // README's quick start exports WEFT_CA, then `weft login ... --ca-pin`:
    // the flag is what is used (the exported file is another cluster's).
    let out = weft(vec![("WEFT_CA", wrong.clone())], vec!["--ca-pin", &pin]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = weft(
        vec![("WEFT_CA_PIN", wrong_pin.clone())],
        vec!["--ca-file", &ca],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    // Both typed, or both exported: a usage error.
    let out = weft(vec![], vec!["--ca-file", &ca, "--ca-pin", &pin]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("give one"), "{out}");
    let both = vec![("WEFT_CA", ca.clone()), ("WEFT_CA_PIN", pin.clone())];
    let out = weft(both, vec![]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("$WEFT_CA and $WEFT_CA_PIN"), "{out}");
    cluster.shutdown().await;
}
