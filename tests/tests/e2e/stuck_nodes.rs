//! Nodes that take work and do not do it: one that never reads its stream
//! (its attempts are taken back after `--start-timeout` and run elsewhere,
//! at no cost to the tasks), and one back from a long partition reporting
//! thousands of attempts the coordinator no longer knows (each gets its
//! Cancel; the session stays).

use std::collections::HashSet;
use std::time::Duration;

use weft_client::{Attempt, TaskId, TaskSpec, TaskState};
use weft_proto::pb;
use weft_proto::pb::coordinator_message::Body as FromCoordinator;
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_tests::fake_node::register;
use weft_tests::{TestCluster, default_timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reads_its_stream_loses_its_tasks_to_a_working_node() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .start_timeout(Duration::from_secs(2))
        .start()
        .await;
    let client = cluster.client().await;

    // It registers, grants its slots and heartbeats, but never reads.
    let deaf = cluster.fake_node(register("deaf", 4, &[])).await;
    let beats = deaf.keep_alive(Duration::from_millis(100));
    deaf.grant(4).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let spec = TaskSpec::exec(["sh", "-c", &format!("echo ran {i}")]).max_attempts(1);
        ids.push(client.submit(spec).await.expect("submit"));
    }
    for id in &ids {
        let sent = cluster
            .wait_for_task(*id, |t| t.state == TaskState::Assigned)
            .await;
        assert_eq!(sent.node_name.as_deref(), Some("deaf"), "{sent:?}");
    }

    // A working node is there too; once the deadline passes, the deaf
    // node's attempts run there as attempt 2, charged nothing.
    let real = cluster.add_node(4, Vec::<(String, String)>::new()).await;
    for (i, id) in ids.iter().enumerate() {
        let done = client.wait(*id).await.expect("wait");
        assert_eq!(
            (done.state, done.attempt, done.failures, done.node_losses),
            (TaskState::Succeeded, Attempt(2), 0, 0),
            "{done:?}"
        );
        assert_eq!(done.node_name.as_deref(), Some(real.as_str()), "task {i}");
    }
    let info = client.cluster_info().await.expect("info");
    assert_eq!(info.attempts_not_started, 4, "{info:?}");
    assert_eq!(info.nodes, 1, "the deaf node was declared lost: {info:?}");
    beats.abort();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reporting_thousands_of_unknown_attempts_gets_a_cancel_for_each_and_keeps_its_session()
 {
    const UNKNOWN: usize = 5_000;
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut node = cluster.fake_node(register("returning", 1, &[])).await;
    let beats = node.keep_alive(Duration::from_millis(100));

    // As after a long partition: results and resent output of attempts
    // this coordinator does not know (or no longer), in one batch.
    let unknown: Vec<TaskId> = (0..UNKNOWN).map(|_| TaskId::new()).collect();
    let mut events = Vec::new();
    for id in &unknown {
        for seq in 0..2 {
            events.push(pb::NodeTaskEvent {
                task_id: id.to_string(),
                attempt: 1,
                body: Some(EventBody::Output(pb::OutputChunk {
                    stream: pb::OutputStream::Stdout as i32,
                    data: b"resent".to_vec().into(),
                    seq,
                })),
            });
        }
        events.push(pb::NodeTaskEvent {
            task_id: id.to_string(),
            attempt: 1,
            body: Some(EventBody::Finished(pb::Finished {
                outcome: pb::Outcome::Succeeded as i32,
                ..pb::Finished::default()
            })),
        });
    }
    assert!(
        node.send(ToCoordinator::Events(pb::TaskEvents { events }))
            .await
    );

    // One Cancel per attempt, each once.
    let mut cancelled = HashSet::new();
    while cancelled.len() < UNKNOWN {
        match node.recv(default_timeout()).await {
            Some(FromCoordinator::Cancel(cancel)) => {
                assert_eq!(cancel.attempt, 1);
                assert!(cancelled.insert(cancel.task_id), "a second Cancel");
            }
            Some(other) => panic!("expected Cancels, got {other:?}"),
            None => panic!("the session ended after {} Cancels", cancelled.len()),
        }
    }
    let expected: HashSet<String> = unknown.iter().map(TaskId::to_string).collect();
    assert_eq!(cancelled, expected);

    // The session is the same and works.
    node.grant(1).await;
    let id = client
        .submit(TaskSpec::exec(["true"]))
        .await
        .expect("submit");
    let assignment = node.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    node.started(id, 1).await;
    node.finished(id, 1, weft_proto::Outcome::Succeeded, Some(0), b"")
        .await;
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.node_name.as_deref()),
        (TaskState::Succeeded, Some("returning"))
    );
    beats.abort();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reads_costs_no_more_than_the_work_its_credits_let_through() {
    const SLOTS: u32 = 1024;
    const INPUT: usize = 16 << 10;
    let cluster = TestCluster::builder()
        .nodes(0)
        .start_timeout(Duration::from_secs(600))
        .start()
        .await;
    let Some(pid) = cluster.coordinator_pid() else {
        // Only a coordinator in its own process has a resident size of
        // its own. WEFT_TEST_MODE=processes runs it.
        println!("skipping: needs the coordinator in its own process (WEFT_TEST_MODE=processes)");
        cluster.shutdown().await;
        return;
    };
    let client = cluster.client().await;
    let rss = || weft_cluster::procfs::rss_bytes(pid).expect("rss");
    // The queue first, with no node: what the tasks themselves cost.
    let specs: Vec<TaskSpec> = (0..4 * SLOTS)
        .map(|i| TaskSpec::call("sha256", vec![u8::try_from(i % 251).unwrap_or(0); INPUT]))
        .collect();
    let submitted = specs.len() as u64;
    client.submit_many(specs).await.expect("submit");
    let queued = rss();
    // Then the most one node may hold: its slots and as much prefetch,
    // granted in full, never read.
    let deaf = cluster
        .fake_node(pb::Register {
            prefetch: SLOTS,
            ..register("deaf", SLOTS, &["sha256"])
        })
        .await;
    let beats = deaf.keep_alive(Duration::from_millis(100));
    deaf.grant(2 * SLOTS).await;
    let held = u64::from(2 * SLOTS);
    let info = weft_tests::wait_for(default_timeout(), || async {
        let info = client.cluster_info().await.ok()?;
        (info.count(TaskState::Assigned) == held).then_some(info)
    })
    .await
    .expect("the node's whole credit assigned");
    assert_eq!(info.count(TaskState::Queued), submitted - held);
    let stuck = rss();
    let sent = held * INPUT as u64;
    println!(
        "coordinator RSS: {} MiB with {submitted} tasks queued ({} MiB of input); {} MiB once a node that never reads holds {held} of them ({} MiB of input)",
        queued >> 20,
        (submitted * INPUT as u64) >> 20,
        stuck >> 20,
        sent >> 20
    );
    // What is sent shares the task table's specs: the node costs about
    // what is in flight towards it, not its tasks again and again.
    let grown = stuck.saturating_sub(queued);
    assert!(
        grown < 2 * sent + (32 << 20),
        "a node holding {} MiB of tasks cost {} MiB",
        sent >> 20,
        grown >> 20
    );
    // Its stream is never drained: closing it ends the session (a peer
    // that never reads would otherwise hold a graceful shutdown for its
    // --shutdown-grace).
    beats.abort();
    drop(deaf);
    cluster.shutdown().await;
}
