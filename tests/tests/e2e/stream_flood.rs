//! A node that floods its stream with small messages, each in its own
//! HTTP/2 frame, shares its connection with other rpcs: the coordinator
//! reads them at once, so HTTP/2 never answers `GOAWAY ENHANCE_YOUR_CALM`
//! for the connection; the session carries on and the other rpcs succeed.
//! A node that sends far more than the coordinator can apply is held back
//! on its own stream, and the connection's other rpcs still succeed.

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use weft_client::{BearerToken, TaskSpec, TaskState};
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::pb::node_task_event::Body as NodeEvent;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{Outcome, TaskId, pb};
use weft_tests::fake_node::{self, register};
use weft_tests::{FakeNode, TestCluster, default_timeout};

/// Messages the flood sends.
const FLOOD: usize = 100_000;
/// Tasks in each `Submit` sent beside the flood.
const SUBMIT_BATCH: usize = 10_000;

/// A connection of a fake node joined as `name` (plain on an insecure
/// cluster), for its session and other rpcs alike.
async fn node_connection(cluster: &TestCluster, name: &str) -> Channel {
    match cluster.join_fake(name).await {
        Some(joined) => fake_node::channel_as(&cluster.url(), joined.identity())
            .await
            .unwrap_or_else(|e| panic!("dialing as {name}: {e}")),
        None => fake_node::channel(&cluster.url()).await,
    }
}

/// The `i`th message of the flood: a heartbeat, an empty grant or one
/// progress event of `task`'s attempt 1, in turn.
fn small_message(i: usize, task: TaskId) -> ToCoordinator {
    match i % 3 {
        0 => ToCoordinator::Heartbeat(pb::Heartbeat {}),
        1 => ToCoordinator::Credits(pb::Credits { grant: 0 }),
        _ => ToCoordinator::Events(pb::TaskEvents {
            events: vec![pb::NodeTaskEvent {
                task_id: task.to_string(),
                attempt: 1,
                body: Some(NodeEvent::Progress(pb::Progress {
                    fraction: 0.5,
                    message: String::new(),
                })),
            }],
        }),
    }
}

/// The coordinator process's resident memory in KiB (process mode).
fn coordinator_rss_kib(cluster: &TestCluster) -> Option<u64> {
    let pid = cluster.coordinator_pid()?;
    weft_cluster::procfs::rss_bytes(pid).map(|bytes| bytes / 1024)
}

/// The coordinator's resident memory before, and its peak while
/// [`sample`](PeakRss::sample) runs (every 20 ms).
struct PeakRss<'a> {
    cluster: &'a TestCluster,
    before: Option<u64>,
    peak: std::cell::Cell<Option<u64>>,
}

impl<'a> PeakRss<'a> {
    fn start(cluster: &'a TestCluster) -> Self {
        let before = coordinator_rss_kib(cluster);
        PeakRss {
            cluster,
            before,
            peak: std::cell::Cell::new(before),
        }
    }

    /// Samples until dropped; never ends.
    async fn sample(&self) {
        loop {
            let now = coordinator_rss_kib(self.cluster);
            self.peak.set(self.peak.get().max(now));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_small_messages_keeps_the_connection_and_its_other_rpcs() {
    // Not lost for silence while the machine is busy with the flood.
    let cluster = TestCluster::builder()
        .nodes(0)
        .heartbeat_timeout(Duration::from_secs(60))
        .start()
        .await;
    let client = cluster.client().await;
    let connection = node_connection(&cluster, "flood").await;
    let mut fake =
        FakeNode::connect_framed(connection.clone(), register("flood", 1, &["flood"])).await;
    let _beats = fake.keep_alive(Duration::from_millis(200));
    let token = BearerToken::new(Some(&cluster.admin_token())).expect("the admin token");
    let mut tasks = TaskServiceClient::with_interceptor(connection, token);

    // An attempt running on the fake node, for the flood's events.
    let id = client
        .submit(TaskSpec::call("flood", "x"))
        .await
        .expect("submit");
    fake.grant(1).await;
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    fake.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;

    let rss = PeakRss::start(&cluster);
    let sample = rss.sample();
    let flood = async {
        let began = Instant::now();
        for i in 0..FLOOD {
            assert!(
                fake.send(small_message(i, id)).await,
                "the stream ended after {i} messages"
            );
        }
        began.elapsed()
    };
    // Other rpcs on the same connection, all through the flood: Gets, and
    // Submits that keep the coordinator's commits busy (their tasks wait
    // for a handler no node serves).
    let others = async {
        for _ in 0..10_000 {
            let got = tasks
                .get(pb::GetRequest {
                    task_id: id.to_string(),
                })
                .await;
            if let Err(status) = got {
                return status;
            }
            let specs = (0..SUBMIT_BATCH)
                .map(|_| pb::TaskSpec::from(TaskSpec::call("nobody", "")))
                .collect();
            if let Err(status) = tasks.submit(pb::SubmitRequest { tasks: specs }).await {
                return status;
            }
        }
        std::future::pending().await
    };
    let (took, others) = tokio::select! {
        took = flood => (took, None),
        failed = others => (Duration::ZERO, Some(failed)),
        () = sample => unreachable!("sampling never ends"),
    };
    if let Some(failed) = others {
        panic!("an rpc on the flooded connection failed: {failed:?}");
    }
    let rate = FLOOD as f64 / took.as_secs_f64();
    eprintln!(
        "flood: {FLOOD} messages in {took:?} ({rate:.0}/s); coordinator RSS before {:?} KiB, \
         peak during {:?} KiB",
        rss.before,
        rss.peak.get()
    );

    // The connection and the session survived: a Get still answers, the
    // running attempt finishes through the session, and new work comes.
    tasks
        .get(pb::GetRequest {
            task_id: id.to_string(),
        })
        .await
        .expect("a Get after the flood");
    fake.finished(id, 1, Outcome::Succeeded, Some(0), b"").await;
    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    let next = client
        .submit(TaskSpec::call("flood", "y"))
        .await
        .expect("submit");
    fake.grant(1).await;
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, next.to_string());
    fake.finished(next, assignment.attempt, Outcome::Succeeded, Some(0), b"")
        .await;
    let task = cluster.wait_for_final(next).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    cluster.shutdown().await;
}

/// Output chunks in each batch of the misbehaving flood.
const CHUNKS: usize = 30;

/// A batch of [`CHUNKS`] output chunks of 32 KiB for `task`'s attempt 1,
/// numbered from `seq`: about 1 MiB.
fn big_batch(task: TaskId, seq: u64, chunk: &bytes::Bytes) -> ToCoordinator {
    let events = (0..CHUNKS as u64)
        .map(|i| pb::NodeTaskEvent {
            task_id: task.to_string(),
            attempt: 1,
            body: Some(NodeEvent::Output(pb::OutputChunk {
                stream: pb::OutputStream::Stdout as i32,
                data: chunk.clone(),
                seq: seq + i,
            })),
        })
        .collect();
    ToCoordinator::Events(pb::TaskEvents { events })
}

/// Output batches the greedy node sends (about 1 MiB each).
const BIG_BATCHES: u64 = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_ahead_of_the_coordinator_is_held_back_on_its_own_stream() {
    // 1 MiB messages: a node is read on while at most 4 MiB ahead of the
    // coordinator. Not lost for silence while the machine is busy.
    let cluster = TestCluster::builder()
        .nodes(0)
        .max_message_size(1024 * 1024)
        .heartbeat_timeout(Duration::from_secs(60))
        .start()
        .await;
    let client = cluster.client().await;
    let connection = node_connection(&cluster, "greedy").await;
    let mut fake =
        FakeNode::connect_framed(connection.clone(), register("greedy", 1, &["greedy"])).await;
    let token = BearerToken::new(Some(&cluster.admin_token())).expect("the admin token");
    let mut tasks = TaskServiceClient::with_interceptor(connection, token);
    let id = client
        .submit(TaskSpec::call("greedy", "x"))
        .await
        .expect("submit");
    fake.grant(1).await;
    fake.next_assignment(default_timeout()).await;
    fake.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;

    // Output as fast as it goes, while Submits on the same connection keep
    // the coordinator's commits busy: the node gets ahead of the driver.
    let chunk = bytes::Bytes::from(vec![b'x'; 32 * 1024]);
    let rss = PeakRss::start(&cluster);
    let sample = rss.sample();
    let flood = async {
        let began = Instant::now();
        for batch in 0..BIG_BATCHES {
            assert!(
                fake.send(big_batch(id, batch * CHUNKS as u64, &chunk))
                    .await,
                "the stream ended after {batch} batches"
            );
        }
        // Then its result: the task ends once everything before it was
        // applied.
        fake.finished(id, 1, Outcome::Succeeded, Some(0), b"").await;
        let task = cluster.wait_for_final(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        began.elapsed()
    };
    let others = async {
        loop {
            let specs = (0..5_000)
                .map(|_| pb::TaskSpec::from(TaskSpec::call("nobody", "")))
                .collect();
            if let Err(status) = tasks.submit(pb::SubmitRequest { tasks: specs }).await {
                return status;
            }
        }
    };
    let took = tokio::select! {
        took = tokio::time::timeout(default_timeout(), flood) => took.expect("the flood goes through, held back"),
        failed = others => panic!("a Submit on the flooded connection failed: {failed:?}"),
        () = sample => unreachable!("sampling never ends"),
    };
    eprintln!(
        "{BIG_BATCHES} output batches of {CHUNKS} x 32 KiB and the result applied in {took:?}; \
         coordinator RSS before {:?} KiB, peak {:?} KiB",
        rss.before,
        rss.peak.get()
    );

    // The session lived on (its result was taken); the connection's other
    // rpcs still answer.
    tasks
        .get(pb::GetRequest {
            task_id: id.to_string(),
        })
        .await
        .expect("a Get on the same connection after the flood");
    if cluster.is_processes() {
        let logs = cluster.logs();
        assert!(
            logs.contains("reading it waits until the coordinator has caught up"),
            "the node got ahead of the coordinator and was held back:\n{logs}"
        );
    }
    cluster.shutdown().await;
}
