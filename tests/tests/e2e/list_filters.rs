//! `weft list`: filters by state, label, name, node and time, newest
//! first, with a DURATION column; bad filter values are clear errors (the
//! CLI's usage errors, the service's INVALID_ARGUMENT); a filter that few
//! tasks match pages across the coordinator's bounded scan.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use weft_client::{ListFilter, TaskId, TaskSpec, TaskState};
use weft_proto::pb;
use weft_tests::TestCluster;

/// The ids a `weft -o json list ...` printed, in order.
fn listed(out: &weft_tests::cli::CliOutput) -> Vec<String> {
    assert_eq!(out.code, Some(0), "{out}");
    let tasks: Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    tasks
        .as_array()
        .expect("an array")
        .iter()
        .map(|t| t["id"].as_str().expect("an id").to_owned())
        .collect()
}

fn ids(tasks: &[TaskId]) -> Vec<String> {
    tasks.iter().map(|id| id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_list_filters_by_state_label_name_node_and_time_newest_first() {
    let cluster = TestCluster::builder()
        .nodes(2)
        .node_labels(0, [("zone", "a")])
        .node_labels(1, [("zone", "b")])
        .start()
        .await;
    let client = cluster.client().await;
    let spec = |name: &str, zone: &str| {
        TaskSpec::call("echo", name.to_owned())
            .name(name)
            .label("zone", zone)
    };
    // Oldest first; each on the node of its zone.
    let mut submitted = Vec::new();
    for (name, zone) in [
        ("resize-1", "a"),
        ("thumb-1", "b"),
        ("resize-2", "b"),
        ("thumb-2", "a"),
    ] {
        let id = client.submit(spec(name, zone)).await.expect("submit");
        cluster.wait_for_final(id).await;
        submitted.push(id);
    }
    // One more that waits: no node has zone=c.
    let waiting = client.submit(spec("resize-3", "c")).await.expect("submit");
    submitted.push(waiting);
    let newest_first = |pick: &[usize]| -> Vec<String> {
        let mut picked: Vec<TaskId> = pick.iter().map(|i| submitted[*i]).collect();
        picked.sort_by(|a, b| b.cmp(a));
        ids(&picked)
    };
    let list = |args: &'static [&'static str]| {
        let mut argv = vec!["-o", "json", "list"];
        argv.extend_from_slice(args);
        let cluster = &cluster;
        async move { listed(&cluster.weft(&argv).await) }
    };
    assert_eq!(list(&[]).await, newest_first(&[0, 1, 2, 3, 4]));
    assert_eq!(list(&["--state", "queued"]).await, newest_first(&[4]));
    assert_eq!(list(&["--label", "zone=a"]).await, newest_first(&[0, 3]));
    assert_eq!(
        list(&["--label", "zone=a", "--label", "disk=ssd"]).await,
        Vec::<String>::new(),
        "all must match"
    );
    assert_eq!(
        list(&["--name", "resize"]).await,
        newest_first(&[0, 2, 4]),
        "a substring"
    );
    assert_eq!(
        list(&["--name", "resize", "--state", "succeeded"]).await,
        newest_first(&[0, 2])
    );
    assert_eq!(list(&["--limit", "2"]).await, newest_first(&[3, 4]));

    // By node, name or id: the tasks that ran there.
    let node_a = client.get(submitted[0]).await.expect("get");
    let (a_name, a_id) = (
        node_a.node_name.clone().expect("a node"),
        node_a.node_id.expect("an id"),
    );
    let on_a = cluster
        .weft(&["-o", "json", "list", "--node", &a_name])
        .await;
    assert_eq!(listed(&on_a), newest_first(&[0, 3]));
    let on_a = cluster
        .weft(&["-o", "json", "list", "--node", &a_id.to_string()])
        .await;
    assert_eq!(listed(&on_a), newest_first(&[0, 3]));

    // By time: the id's millisecond is the submit time.
    let since_ms = submitted[2].timestamp_ms();
    let since =
        humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(since_ms))
            .to_string();
    let expected: Vec<usize> = (0..5)
        .filter(|i| submitted[*i].timestamp_ms() >= since_ms)
        .collect();
    let out = cluster
        .weft(&["-o", "json", "list", "--since", &since])
        .await;
    assert_eq!(listed(&out), newest_first(&expected));
    let until: Vec<usize> = (0..5)
        .filter(|i| submitted[*i].timestamp_ms() <= since_ms)
        .collect();
    let out = cluster
        .weft(&["-o", "json", "list", "--until", &since])
        .await;
    assert_eq!(listed(&out), newest_first(&until));
    assert_eq!(list(&["--since", "1h"]).await.len(), 5, "a duration ago");
    assert_eq!(list(&["--until", "1h"]).await, Vec::<String>::new());

    // The text table has a DURATION column for every row.
    let out = cluster.weft(&["list", "--name", "resize"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let mut lines = out.stdout.lines();
    let header = lines.next().expect("a header");
    assert!(header.contains("DURATION"), "{out}");
    let column = header.find("DURATION").expect("DURATION");
    for line in lines {
        let cell = line[column..].split_whitespace().next().unwrap_or("");
        assert!(
            cell.ends_with("ms") || cell.ends_with('s'),
            "a duration in {line:?}: {out}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_filters_are_clear_errors() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    for (args, says) in [
        (&["list", "--label", "zone"][..], "KEY=VALUE"),
        (&["list", "--label", "=a"][..], "the key is empty"),
        (
            &["list", "--label", "zone=a", "--label", "zone=b"][..],
            "one value per label",
        ),
        (&["list", "--since", "yesterday"][..], "RFC 3339"),
        (&["list", "--until", "2026-13-01T00:00:00Z"][..], "RFC 3339"),
        (
            &["list", "--since", "1m", "--until", "2h"][..],
            "--until is before --since",
        ),
        (&["list", "--state", "sleeping"][..], "sleeping"),
    ] {
        let out = cluster.weft(args).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out}");
        assert!(
            out.stderr.contains(says),
            "{args:?} should say {says:?}: {out}"
        );
        assert!(out.stdout.is_empty(), "{out}");
    }
    // The service checks what a client other than the CLI may send.
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let at = |secs| {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    };
    let bad = [
        pb::ListRequest {
            since: at(2_000_000_000),
            until: at(1_000_000_000),
            ..Default::default()
        },
        pb::ListRequest {
            labels: [(String::new(), "a".to_owned())].into(),
            ..Default::default()
        },
        pb::ListRequest {
            since: at(-5),
            ..Default::default()
        },
        pb::ListRequest {
            page_token: "not-an-id".into(),
            ..Default::default()
        },
    ];
    for request in bad {
        let err = raw.list(request.clone()).await.expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{request:?}: {err}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_few_tasks_match_pages_across_the_bounded_scan() {
    // No nodes: everything stays queued.
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let needle = client
        .submit(TaskSpec::call("noop", "").name("needle"))
        .await
        .expect("submit");
    // More than one scan's worth (10,000) of newer tasks after it.
    let hay: Vec<TaskSpec> = (0..12_000)
        .map(|_| TaskSpec::call("noop", "").name("hay"))
        .collect();
    client.submit_many(hay).await.expect("submit many");

    // One call examines at most 10,000 tasks: no match yet, but a token.
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let request = pb::ListRequest {
        name: "needle".into(),
        limit: 10,
        ..Default::default()
    };
    let first = raw.list(request.clone()).await.expect("list").into_inner();
    assert!(first.tasks.is_empty(), "{} tasks", first.tasks.len());
    assert!(!first.next_page_token.is_empty(), "the scan carries on");
    let second = raw
        .list(pb::ListRequest {
            page_token: first.next_page_token,
            ..request
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        second
            .tasks
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>(),
        [needle.to_string()]
    );
    assert!(
        second.next_page_token.is_empty(),
        "nothing older: {}",
        second.next_page_token
    );

    // The client and the CLI page on until they have --limit or the end.
    let filter = ListFilter {
        name: "needle".into(),
        ..ListFilter::default()
    };
    let found = client.list_filtered(&filter, 5).await.expect("list");
    assert_eq!(found.iter().map(|t| t.id).collect::<Vec<_>>(), [needle]);
    let out = cluster
        .weft(&["-o", "json", "list", "--name", "needle"])
        .await;
    assert_eq!(listed(&out), [needle.to_string()]);
    let out = cluster
        .weft(&["-o", "json", "list", "--name", "nothing-matches"])
        .await;
    assert_eq!(listed(&out), Vec::<String>::new());
    // Unfiltered pages are full ones, newest first.
    let newest = client.list(Some(TaskState::Queued), 3).await.expect("list");
    let newest: BTreeSet<TaskId> = newest.iter().map(|t| t.id).collect();
    assert_eq!(newest.len(), 3);
    assert!(!newest.contains(&needle));
    cluster.shutdown().await;
}

/// `weft list | head -1`: once the reader is gone the CLI stops quietly
/// with status 141, as a Unix tool killed by SIGPIPE, not with a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_list_into_a_closed_pipe_stops_quietly() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let specs = (0..50)
        .map(|i| TaskSpec::call("echo", i.to_string()))
        .collect();
    client.submit_many(specs).await.expect("submit");
    for args in [&["list", "--limit", "50"][..], &["-o", "json", "list"]] {
        let (code, stderr) = weft_tests::cli::run_weft_reader_gone(
            &cluster.url(),
            Some(&cluster.admin_token()),
            args,
        )
        .await;
        assert_eq!(code, Some(141), "weft {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "weft {args:?}: {stderr}");
    }
    cluster.shutdown().await;
}
