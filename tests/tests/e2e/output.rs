//! Output streaming, exit codes, retries and the replay of a task's events.

use futures::StreamExt;

use weft_client::{Attempt, EventBody, OutputStream, TaskEvent, TaskSpec, TaskState};
use weft_tests::{TestCluster, default_timeout};

/// Collects a stream of events to its end, failing on an error or a stall.
async fn collect(mut events: weft_client::EventStream) -> Vec<TaskEvent> {
    let mut all = Vec::new();
    loop {
        let next = tokio::time::timeout(default_timeout(), events.next())
            .await
            .unwrap_or_else(|_| panic!("no event for {:?}; so far {all:#?}", default_timeout()));
        match next {
            Some(event) => all.push(event.expect("a healthy event stream")),
            None => return all,
        }
    }
}

/// Output chunks, with consecutive chunks of the same stream joined (the
/// node may split or join reads as it likes).
fn output_of(events: &[TaskEvent]) -> Vec<(OutputStream, String)> {
    let mut out: Vec<(OutputStream, String)> = Vec::new();
    for event in events {
        if let EventBody::Output { stream, data } = &event.body {
            let text = String::from_utf8_lossy(data);
            match out.last_mut() {
                Some((last, joined)) if last == stream => joined.push_str(&text),
                _ => out.push((*stream, text.into_owned())),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_streams_in_order_and_the_exit_code_is_recorded() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    // The pauses order the two pipes' writes in time, so the interleaving
    // on the wire is deterministic.
    let script = "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; exit 3";
    let spec = TaskSpec::exec(["sh", "-c", script]).max_attempts(1);
    let events = collect(client.run(spec).await.expect("run")).await;

    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event.seq, i as u64,
            "seqs count from 0 without gaps: {events:#?}"
        );
    }
    assert!(
        matches!(
            events[0].body,
            EventBody::State {
                state: TaskState::Queued,
                ..
            }
        ),
        "the first event is QUEUED: {:?}",
        events[0]
    );
    assert_eq!(
        output_of(&events),
        vec![
            (OutputStream::Stdout, "out1\n".to_owned()),
            (OutputStream::Stderr, "err1\n".to_owned()),
            (OutputStream::Stdout, "out2\n".to_owned()),
        ]
    );
    let task = events
        .last()
        .and_then(TaskEvent::finished)
        .expect("the last event is the final task")
        .clone();
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.exit_code, Some(3));
    assert_eq!((task.attempt, task.failures), (Attempt(1), 1));
    assert!(
        events.iter().filter(|e| e.finished().is_some()).count() == 1,
        "exactly one finished event"
    );
    for event in &events {
        if let EventBody::Output { .. } = event.body {
            assert_eq!(event.attempt, Attempt(1), "output belongs to attempt 1");
        }
    }
    let stored = client.get(task.id).await.expect("get");
    assert_eq!(
        (stored.state, stored.exit_code),
        (TaskState::Failed, Some(3))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_watcher_replays_every_event_from_the_first_chunk() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let script = "for i in 1 2 3 4 5; do echo line$i; done";
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", script]))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.exit_code),
        (TaskState::Succeeded, Some(0))
    );

    let replay = collect(client.watch(id, 0).await.expect("watch")).await;
    assert_eq!(
        output_of(&replay),
        vec![(
            OutputStream::Stdout,
            "line1\nline2\nline3\nline4\nline5\n".to_owned()
        )]
    );
    assert_eq!(
        replay.last().and_then(TaskEvent::finished).map(|t| t.state),
        Some(TaskState::Succeeded)
    );
    assert_eq!(
        replay.len() as u64,
        done.next_seq,
        "next_seq counts every event"
    );

    // Resuming from the middle gives exactly the tail.
    let from = 2;
    let tail = collect(client.watch(id, from).await.expect("watch from 2")).await;
    assert_eq!(tail.first().map(|e| e.seq), Some(from));
    assert_eq!(tail, replay[from as usize..].to_vec());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_exec_is_retried_and_its_second_attempt_succeeds() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("tried-once");
    // Fails the first time, succeeds once the marker exists.
    let script = r#"if [ -e "$1" ]; then echo second; exit 0; else touch "$1"; exit 1; fi"#;
    let spec =
        TaskSpec::exec(["sh", "-c", script, "sh", &marker.display().to_string()]).max_attempts(3);
    let id = client.submit(spec).await.expect("submit");
    let task = tokio::time::timeout(default_timeout(), client.wait(id))
        .await
        .expect("task finishes in time")
        .expect("wait");
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    assert_eq!(
        (task.attempt, task.failures, task.node_losses),
        (Attempt(2), 1, 0)
    );
    assert_eq!(task.exit_code, Some(0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_its_env_cwd_and_stdin() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let cwd = cluster.dir().display().to_string();
    let spec = TaskSpec::exec(["sh", "-c", r#"echo "$WEFT_T_VAR"; pwd; cat"#])
        .env("WEFT_T_VAR", "hello")
        .cwd(cwd.clone())
        .stdin("from stdin\n");
    let events = collect(client.run(spec).await.expect("run")).await;
    let out: String = output_of(&events)
        .into_iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .map(|(_, t)| t)
        .collect();
    let cwd = std::fs::canonicalize(&cwd).expect("temp dir exists");
    assert_eq!(out, format!("hello\n{}\nfrom stdin\n", cwd.display()));
    cluster.shutdown().await;
}
