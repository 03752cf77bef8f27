//! `weft local -o json`: one JSON object a program reads to use the cluster.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use weft_tests::process::bin_path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_local_with_json_output_prints_what_a_program_needs_to_use_the_cluster() {
    let mut local = Command::new(bin_path("weft"))
        .args([
            "-o",
            "json",
            "local",
            "--nodes",
            "1",
            "--slots",
            "2",
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
    assert_eq!(info["nodes"], 1, "{info}");
    assert_eq!(info["slots_per_node"], 2, "{info}");
    let url = info["coordinator"].as_str().expect("a coordinator url");
    let ca = info["ca_file"].as_str().expect("a CA file: TLS by default");
    let token = info["token"].as_str().expect("an admin token");

    // What it printed is enough to use the cluster.
    let trust = weft_proto::tls::Trust::CaFile(ca.into());
    let client = weft_client::Client::connect_secure(url, Some(&trust), Some(token))
        .await
        .unwrap();
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(local.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = local.wait().unwrap();
    assert!(status.success(), "weft local exits 0 on Ctrl-C: {status}");
}
