//! Watchers that never read cost the coordinator a bounded amount
//! (`--watch-buffer-bytes` each) and miss nothing: they fall back to the
//! store and, once they read, get the whole output in order, as a reader
//! that kept up does. A client may hold `--max-streams-per-client` Watch,
//! Run and WaitMany streams at once; one more is RESOURCE_EXHAUSTED naming
//! the flag, other clients are unaffected, and ending a stream frees its
//! place.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tonic::Code;

use weft_client::{EventBody, TaskEvent, TaskSpec, TaskState};
use weft_proto::pb;
use weft_tests::{TestCluster, default_timeout, wait_for, wait_until};

/// Watchers that never read, in the memory scenario: half of them watch
/// from before the task writes, half come once it has written everything.
const STALLED: usize = 50;
/// Lines of `seq 1 LINES`: about 17 MiB of output, 17 times each stalled
/// watcher's budget.
const LINES: u64 = 2_400_000;
/// What the default `--watch-buffer-bytes` is.
const BUDGET: u64 = 1 << 20;

/// `seq 1 LINES`, as the task prints it.
fn expected_output() -> Vec<u8> {
    let mut all = Vec::with_capacity(18 << 20);
    for n in 1..=LINES {
        all.extend_from_slice(n.to_string().as_bytes());
        all.push(b'\n');
    }
    all
}

/// A task that runs `command` once `gate` exists.
fn gated(gate: &Path, command: &str) -> TaskSpec {
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; {command}",
        gate.display()
    );
    TaskSpec::exec(["sh", "-c", script.as_str()]).max_attempts(1)
}

/// A task that prints `seq 1 LINES` in 64 KiB writes (so the node reads
/// full chunks) once `start` exists, then ends once `end` exists.
fn gated_seq(start: &Path, end: &Path) -> TaskSpec {
    gated(
        start,
        &format!(
            "seq 1 {LINES} | dd bs=65536 iflag=fullblock status=none; while [ ! -e '{}' ]; do sleep 0.05; done",
            end.display()
        ),
    )
}

/// Checks one watcher's events as they come: seqs from 0 without a gap or
/// a repeat, output equal to `expected` in order, a final SUCCEEDED task
/// last.
struct Reader<'a> {
    expected: &'a [u8],
    next_seq: u64,
    offset: usize,
    finished: bool,
}

impl<'a> Reader<'a> {
    fn new(expected: &'a [u8]) -> Self {
        Reader {
            expected,
            next_seq: 0,
            offset: 0,
            finished: false,
        }
    }

    fn take(&mut self, who: &str, event: TaskEvent) {
        assert!(!self.finished, "{who}: an event after the final one");
        assert_eq!(event.seq, self.next_seq, "{who}: a gap or a repeat");
        self.next_seq += 1;
        match event.body {
            EventBody::Output { data, .. } => {
                let end = self.offset + data.len();
                assert!(
                    end <= self.expected.len() && self.expected[self.offset..end] == data[..],
                    "{who}: output differs at byte {}",
                    self.offset
                );
                self.offset = end;
            }
            EventBody::Finished(task) => {
                assert_eq!(task.state, TaskState::Succeeded, "{who}: {task:?}");
                self.finished = true;
            }
            EventBody::State { .. } | EventBody::Progress { .. } => {}
        }
    }

    fn has_all_output(&self) -> bool {
        self.offset == self.expected.len()
    }

    fn done(&self, who: &str) {
        assert!(self.finished, "{who}: ended before the final event");
        assert_eq!(self.offset, self.expected.len(), "{who}: output cut short");
    }
}

/// Reads a raw Watch stream to its end through `reader`.
async fn read_raw(who: String, mut stream: tonic::Streaming<pb::TaskEvent>, expected: &[u8]) {
    let mut reader = Reader::new(expected);
    loop {
        let next = tokio::time::timeout(default_timeout(), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: no event for {:?}", default_timeout()));
        match next {
            None => break,
            Some(event) => {
                let event = event.unwrap_or_else(|status| panic!("{who}: {status:?}"));
                let event = TaskEvent::try_from(event).unwrap_or_else(|e| panic!("{who}: {e}"));
                reader.take(&who, event);
            }
        }
    }
    reader.done(&who);
}

/// A process's resident memory in bytes (`VmRSS` of `/proc/PID/status`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// Opens `n` Watch streams of `id` from seq 0 on `raw` and never reads them.
async fn stalled_watchers(
    raw: &weft_tests::RawTasks,
    id: weft_client::TaskId,
    n: usize,
) -> Vec<tonic::Streaming<pb::TaskEvent>> {
    let mut stalled = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = raw
            .clone()
            .watch(pb::WatchRequest {
                task_id: id.to_string(),
                from_seq: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        stalled.push(stream);
    }
    stalled
}

/// Reads `events` through `reader` until it has the whole output (or the
/// stream ends).
async fn read_output(who: &str, events: &mut weft_client::EventStream, reader: &mut Reader<'_>) {
    while !reader.has_all_output() {
        let next = tokio::time::timeout(default_timeout(), events.next())
            .await
            .unwrap_or_else(|_| panic!("{who} stalled"));
        let Some(event) = next else { return };
        reader.take(who, event.expect("an event"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_cost_a_bounded_amount_and_then_get_the_whole_output_in_order() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let expected = expected_output();
    let pid = cluster.coordinator_pid();

    // The same output once, read as it comes: the store and the allocator
    // reach the size this much output needs before the baseline.
    let warm = cluster.dir().join("warm.gate");
    std::fs::write(&warm, b"").expect("gate");
    let mut events = client.run(gated_seq(&warm, &warm)).await.expect("run");
    let mut reader = Reader::new(&expected);
    while let Some(event) = events.next().await {
        reader.take("the warm-up run", event.expect("an event"));
    }
    reader.done("the warm-up run");
    let before = pid.map(rss);

    // The most the coordinator's memory reaches from here on.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = pid.map(|pid| {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak.max(rss(pid))
        })
    });

    let (start, end) = (
        cluster.dir().join("start.gate"),
        cluster.dir().join("end.gate"),
    );
    let id = client
        .submit(gated_seq(&start, &end))
        .await
        .expect("submit");
    // Watchers that never read, on one connection of their own: half
    // from before the output, following it live...
    let raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let mut stalled = stalled_watchers(&raw, id, STALLED / 2).await;
    let mut events = client.watch(id, 0).await.expect("watch");
    std::fs::write(&start, b"").expect("gate");
    let mut reader = Reader::new(&expected);
    read_output("the reading watcher", &mut events, &mut reader).await;
    // ...and half once all of it is written, reading it from the store
    // while the task still runs. A late reader that reads its way through
    // the whole history lets them fill what they may hold.
    stalled.extend(stalled_watchers(&raw, id, STALLED - STALLED / 2).await);
    let mut late = client.watch(id, 0).await.expect("watch");
    let mut late_reader = Reader::new(&expected);
    read_output("the late reading watcher", &mut late, &mut late_reader).await;
    std::fs::write(&end, b"").expect("gate");
    for (who, events, reader) in [
        ("the reading watcher", &mut events, &mut reader),
        ("the late reading watcher", &mut late, &mut late_reader),
    ] {
        while let Some(event) = tokio::time::timeout(default_timeout(), events.next())
            .await
            .unwrap_or_else(|_| panic!("{who} stalled"))
        {
            reader.take(who, event.expect("an event"));
        }
        reader.done(who);
    }

    sampling.store(false, Ordering::Relaxed);
    if let (Some(before), Some(sampler)) = (before, sampler) {
        let peak = sampler.await.expect("the sampler");
        let growth = peak.saturating_sub(before);
        eprintln!(
            "coordinator RSS: {} MiB before, {} MiB at most with {STALLED} watchers that never read {} MiB of output ({} MiB more)",
            before >> 20,
            peak >> 20,
            expected.len() >> 20,
            growth >> 20,
        );
        // Each stalled stream holds at most about its budget, plus a
        // quarter of it read from the store and what the HTTP/2 layer
        // buffers; the rest is the store's cache for this output.
        let bound = STALLED as u64 * BUDGET * 3 / 2 + (64 << 20);
        assert!(
            growth < bound,
            "the coordinator grew by {} MiB with {STALLED} stalled watchers (bound {} MiB)",
            growth >> 20,
            bound >> 20
        );
    } else {
        eprintln!("in-process cluster: the coordinator's memory is this process's; not measured");
    }

    // Now they read: each gets the whole output, in order, once.
    let readers = stalled
        .into_iter()
        .enumerate()
        .map(|(i, stream)| read_raw(format!("stalled watcher {i}"), stream, &expected));
    futures::future::join_all(readers).await;
    cluster.shutdown().await;
}

/// The cap in the streams scenario.
const CAP: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_stream_cap_is_refused_naming_the_flag_and_others_are_not_affected() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .max_streams_per_client(CAP)
        .start()
        .await;
    let gate = cluster.dir().join("cap.gate");
    let token = cluster.scoped_token(&["read", "submit"]).await;
    let mut raw = cluster.raw_tasks(Some(&token)).await;
    let id = cluster
        .client()
        .await
        .submit(gated(&gate, "echo done"))
        .await
        .expect("submit");
    let watch = pb::WatchRequest {
        task_id: id.to_string(),
        from_seq: 0,
    };
    let run = || pb::RunRequest {
        spec: Some(gated(&gate, "echo done").into()),
    };
    let wait_many = pb::WaitManyRequest {
        task_ids: vec![id.to_string()],
        ..Default::default()
    };

    // Watch, Run and WaitMany streams all count.
    let mut open = Vec::new();
    for _ in 0..CAP - 2 {
        let stream = raw.watch(watch.clone()).await.expect("watch");
        open.push(Box::new(stream.into_inner()) as Box<dyn std::any::Any + Send>);
    }
    let stream = raw.run(run()).await.expect("run");
    open.push(Box::new(stream.into_inner()));
    let stream = raw.wait_many(wait_many.clone()).await.expect("wait many");
    open.push(Box::new(stream.into_inner()));
    let tasks_before = cluster
        .client()
        .await
        .list(None, 100)
        .await
        .expect("list")
        .len();

    let refused = [
        raw.watch(watch.clone()).await.map(drop),
        raw.run(run()).await.map(drop),
        raw.wait_many(wait_many.clone()).await.map(drop),
    ];
    for refused in refused {
        let status = refused.expect_err("one stream past the cap");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("--max-streams-per-client")
                && status.message().contains(&CAP.to_string()),
            "{status:?}"
        );
    }
    let tasks_after = cluster
        .client()
        .await
        .list(None, 100)
        .await
        .expect("list")
        .len();
    assert_eq!(tasks_after, tasks_before, "a refused Run submitted nothing");

    // Another client (another token) is not affected.
    let other = cluster.scoped_token(&["read"]).await;
    let mut other = cluster.raw_tasks(Some(&other)).await;
    let theirs = other
        .watch(watch.clone())
        .await
        .expect("another client's watch");
    open.push(Box::new(theirs.into_inner()));

    // Ending a stream frees its place.
    drop(open.swap_remove(0));
    let reopened = wait_for(default_timeout(), || {
        let mut raw = raw.clone();
        let watch = watch.clone();
        async move { raw.watch(watch).await.ok() }
    })
    .await
    .expect("a place freed by the stream that ended");
    open.push(Box::new(reopened.into_inner()));

    std::fs::write(&gate, b"").expect("gate");
    let client = cluster.client().await;
    wait_until(default_timeout(), async || {
        client
            .list(None, 100)
            .await
            .is_ok_and(|tasks| tasks.iter().all(|t| t.state.is_final()))
    })
    .await
    .expect("every task ends");
    drop(open);
    cluster.shutdown().await;
}
