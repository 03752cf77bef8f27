//! The session's tests under a paused clock: acting on coordinator
//! messages against the lease, the watchdog, and what `Register` lists and
//! the next session sends after a stream broke. Over real sockets, the
//! session is tested in `node/tests/session.rs`.

use bytes::Bytes;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::{Attempt, Outcome, TaskId, TaskSpec};

use super::*;
use crate::events::{Event, EventBody, Finished};

/// `Register.running` as sent.
fn register_running(ctx: &NodeCtx, redeliver: &[Event]) -> Vec<pb::AttemptRef> {
    let listed = ctx.outbox.listed(redeliver);
    let message = codec::register(&ctx.config, Vec::new(), &listed, None);
    let Some(Outbound::Register(register)) = message.body else {
        panic!("expected Register, got {message:?}");
    };
    register.running
}

fn node_ctx(config: NodeConfig, handlers: HandlerRegistry) -> (Arc<NodeCtx>, EventRx) {
    NodeCtx::new(config, handlers, None)
}

fn assignment(spec: TaskSpec) -> (pb::Assignment, TaskId) {
    let task_id = TaskId::new();
    let wire = pb::Assignment {
        task_id: task_id.to_string(),
        attempt: 1,
        spec: Some(spec.into()),
        trace: None,
        parents: Vec::new(),
    };
    (wire, task_id)
}

fn assign(assignments: Vec<pb::Assignment>) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        body: Some(Inbound::Assign(pb::Assign { tasks: assignments })),
    }
}

/// The `Finished` of `task_id`, skipping other events, and when it came.
async fn finished_of(rx: &mut EventRx, task_id: TaskId) -> (Finished, Instant) {
    loop {
        let event = rx.recv().await.expect("event channel open");
        if let (true, EventBody::Finished(done)) = (event.task_id == task_id, event.body) {
            return (done, Instant::now());
        }
    }
}

fn assert_lease_expired(done: &Finished) {
    assert_eq!(done.outcome, Outcome::Cancelled, "{done:?}");
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for ")
            && done
                .error
                .ends_with("; the coordinator has reassigned this attempt"),
        "{}",
        done.error
    );
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn the_watchdog_stops_attempts_when_the_lease_runs_out_and_not_before() {
    let mut config = NodeConfig::new("http://unused");
    config.slots = 2;
    let (ctx, mut rx) = node_ctx(config, HandlerRegistry::with_builtins());
    // The watchdog runs from the start, idle until the first lease.
    let watchdog = {
        let ctx = ctx.clone();
        tokio::spawn(async move { lease_watchdog::watch(&ctx.lease, &ctx.executor).await })
    };
    tokio::task::yield_now().await;
    tokio::time::advance(SECOND / 10).await;
    let registered = Instant::now();
    ctx.lease.begin(5 * SECOND, SECOND, registered);
    let (wire, task_id) = assignment(TaskSpec::call("sleep", "1h"));
    handle(&ctx, assign(vec![wire]), registered).unwrap();
    // Heard from the coordinator 2 s in; then nothing more.
    tokio::time::advance(2 * SECOND).await;
    handle(&ctx, heartbeat(), Instant::now()).unwrap();
    let (done, at) = finished_of(&mut rx, task_id).await;
    assert_lease_expired(&done);
    assert_eq!(at - registered, 7 * SECOND, "5 s after the last heartbeat");
    assert!(done.error.contains("for 5.0s"), "{}", done.error);
    watchdog.abort();
}

#[tokio::test(start_paused = true)]
async fn messages_read_after_a_gap_past_the_lease_are_not_acted_on() {
    let mut config = NodeConfig::new("http://unused");
    config.slots = 2;
    let (ctx, mut rx) = node_ctx(config, HandlerRegistry::with_builtins());
    ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
    let (wire, running) = assignment(TaskSpec::call("sleep", "1h"));
    handle(&ctx, assign(vec![wire]), Instant::now()).unwrap();
    // The process was stopped for a minute (no timer ran); the first thing
    // it does on resume is read an Assign buffered meanwhile.
    tokio::time::advance(60 * SECOND).await;
    let (late, late_id) = assignment(TaskSpec::call("sleep", "1h"));
    let err = handle(&ctx, assign(vec![late]), Instant::now()).unwrap_err();
    assert!(
        matches!(err, Error::LeaseExpired(gap) if gap == 60 * SECOND),
        "{err}"
    );
    let (done, _) = finished_of(&mut rx, running).await;
    assert_lease_expired(&done);
    assert!(done.error.contains("for 60.0s"), "{}", done.error);
    ctx.executor.release((running, Attempt::FIRST));
    assert_eq!(ctx.executor.running(), 0, "the late Assign was not started");
    while let Ok(event) = rx.try_recv() {
        assert_ne!(event.task_id, late_id, "{event:?}");
    }
    // Still expired until the next Registered, whatever arrives.
    assert!(handle(&ctx, heartbeat(), Instant::now()).is_err());
}

#[tokio::test(start_paused = true)]
async fn a_message_within_the_lease_renews_it() {
    let (ctx, _rx) = node_ctx(NodeConfig::new("http://unused"), HandlerRegistry::new());
    ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
    for _ in 0..10 {
        tokio::time::advance(4 * SECOND).await;
        handle(&ctx, heartbeat(), Instant::now()).unwrap();
    }
    assert_eq!(ctx.lease.overdue(Instant::now()), None);
}

/// The reader acts on each message at once: handling never waits, not on
/// a full event channel nobody drains nor on running work, so no frame of
/// the coordinator's is left unread in HTTP/2 behind slow work (h2 fails
/// the whole connection when too many small ones pile up unread).
#[tokio::test(start_paused = true)]
async fn handling_a_message_never_waits_on_a_full_event_channel_or_running_work() {
    let mut config = NodeConfig::new("http://unused");
    config.slots = 1;
    config.prefetch = 0;
    let (ctx, rx) = node_ctx(config, HandlerRegistry::with_builtins());
    let now = Instant::now();
    ctx.lease.begin(5 * SECOND, SECOND, now);
    // One attempt takes the slot; every other is refused over capacity,
    // and its Finished fills the event channel, then waits beside it.
    for _ in 0..events::EVENT_BUFFER + 500 {
        let (wire, _) = assignment(TaskSpec::call("sleep", "1h"));
        handle(&ctx, assign(vec![wire]), now).unwrap();
        handle(&ctx, heartbeat(), now).unwrap();
    }
    assert_eq!(rx.len(), events::EVENT_BUFFER, "the event channel is full");
    assert_eq!(Instant::now(), now, "nothing waited");
    assert_eq!(ctx.executor.running(), 1);
}

fn heartbeat() -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        body: Some(Inbound::Heartbeat(pb::Heartbeat {})),
    }
}

fn aref(task_id: TaskId, attempt: u32) -> pb::AttemptRef {
    pb::AttemptRef {
        task_id: task_id.to_string(),
        attempt,
    }
}

fn finished_event(task_id: TaskId) -> Event {
    Event {
        task_id,
        attempt: Attempt::FIRST,
        body: EventBody::Finished(Finished {
            outcome: Outcome::Succeeded,
            exit_code: None,
            output: Bytes::new(),
            error: String::new(),
        }),
    }
}

/// A node with one `sleep 1h` attempt running; answers its task id.
fn running_one(ctx: &Arc<NodeCtx>) -> TaskId {
    ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
    let (wire, task_id) = assignment(TaskSpec::call("sleep", "1h"));
    handle(ctx, assign(vec![wire]), Instant::now()).unwrap();
    task_id
}

#[tokio::test(start_paused = true)]
async fn register_lists_running_and_redelivered_attempts_once_each() {
    let (ctx, _rx) = node_ctx(
        NodeConfig::new("http://unused"),
        HandlerRegistry::with_builtins(),
    );
    let running = running_one(&ctx);
    let finished = TaskId::new();
    let redeliver = [finished_event(running), finished_event(finished)];
    let listed = register_running(&ctx, &redeliver);
    let mut expected = vec![aref(running, 1), aref(finished, 1)];
    expected.sort_by(|x, y| x.task_id.cmp(&y.task_id));
    assert_eq!(listed, expected);
}

#[tokio::test(start_paused = true)]
async fn a_result_the_broken_stream_did_not_take_is_listed_and_sent_in_the_next_session() {
    let (ctx, _rx) = node_ctx(
        NodeConfig::new("http://unused"),
        HandlerRegistry::with_builtins(),
    );
    let task_id = running_one(&ctx);
    let done = finished_event(task_id);

    // The stream is gone by the time the batch holding the result is
    // sent: the slot is free, and the result waits for the next session.
    let (out, out_rx) = mpsc::channel(4);
    drop(out_rx);
    let sent = ctx.outbox.send_events(&out, vec![done.clone()]).await;
    assert!(matches!(sent, Err(Error::StreamClosed)), "{sent:?}");
    assert!(
        ctx.executor.running_keys().is_empty(),
        "the slot is released"
    );
    assert_eq!(register_running(&ctx, &[]), vec![aref(task_id, 1)]);

    // The next session sends it and keeps it for redelivery.
    let (out, mut out_rx) = mpsc::channel(4);
    let unsent = ctx.outbox.take_unsent();
    assert!(
        ctx.outbox.send_events(&out, unsent).await.unwrap(),
        "held a Finished"
    );
    let Some(Outbound::Events(batch)) = out_rx.recv().await.unwrap().body else {
        panic!("expected a TaskEvents message");
    };
    assert_eq!(batch.events, vec![codec::event(done)]);
    assert!(ctx.outbox.take_unsent().is_empty());
    assert_eq!(ctx.outbox.redeliverable(Instant::now()).len(), 1);
}

fn chunk_event(task_id: TaskId, seq: u64) -> Event {
    Event {
        task_id,
        attempt: Attempt::FIRST,
        body: EventBody::Output {
            stream: weft_proto::OutputStream::Stdout,
            seq,
            data: Bytes::from(format!("line-{seq}\n")),
        },
    }
}

/// What a session sent, event by event: `(task, Some(seq))` for a chunk,
/// `(task, None)` for a `Finished`; credits as `"credits"`.
fn sent(messages: Vec<pb::NodeMessage>) -> Vec<String> {
    let mut out = Vec::new();
    for message in messages {
        match message.body {
            Some(Outbound::Events(batch)) => {
                for event in batch.events {
                    use weft_proto::pb::node_task_event::Body;
                    let what = match event.body {
                        Some(Body::Output(chunk)) => format!("chunk {}", chunk.seq),
                        Some(Body::Finished(_)) => "finished".to_owned(),
                        Some(Body::Started(_)) => "started".to_owned(),
                        other => format!("{other:?}"),
                    };
                    out.push(format!("{} {what}", &event.task_id[20..]));
                }
            }
            Some(Outbound::Credits(_)) => out.push("credits".to_owned()),
            other => out.push(format!("{other:?}")),
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn output_sent_on_a_broken_stream_is_sent_again_in_order_before_results_and_newer_events() {
    let (ctx, _rx) = node_ctx(
        NodeConfig {
            slots: 2,
            ..NodeConfig::new("http://unused")
        },
        HandlerRegistry::with_builtins(),
    );
    let running = running_one(&ctx);
    let (finished, cancelled) = (TaskId::new(), TaskId::new());
    // Sent on the first stream, which the coordinator read and then died.
    let (out, mut out_rx) = mpsc::channel(16);
    let first = vec![
        chunk_event(running, 0),
        chunk_event(finished, 0),
        chunk_event(running, 1),
        chunk_event(cancelled, 0),
        chunk_event(finished, 1),
        finished_event(finished),
        chunk_event(running, 2),
    ];
    ctx.outbox.send_events(&out, first).await.unwrap();
    while out_rx.try_recv().is_ok() {}
    // The coordinator cancelled one attempt: stale there, never sent again.
    ctx.outbox.forget((cancelled, Attempt::FIRST), true);
    // The stream broke before this one went.
    drop(out_rx);
    let broke = ctx
        .outbox
        .send_events(&out, vec![chunk_event(running, 3)])
        .await;
    assert!(matches!(broke, Err(Error::StreamClosed)), "{broke:?}");

    // The next session, as `run` and `connected` do it.
    let now = Instant::now();
    let redeliver = ctx.outbox.redeliverable(now);
    let listed = ctx.outbox.listed(&redeliver);
    let resend = ctx.outbox.resendable(&listed, now);
    let (out, mut out_rx) = mpsc::channel(16);
    ctx.outbox.resume(&out, resend, redeliver).await.unwrap();
    drop(out);
    let mut messages = Vec::new();
    while let Some(message) = out_rx.recv().await {
        messages.push(message);
    }
    let (r, f) = (&running.to_string()[20..], &finished.to_string()[20..]);
    let mut kept = vec![
        format!("{r} chunk 0"),
        format!("{r} chunk 1"),
        format!("{r} chunk 2"),
    ];
    let theirs = vec![format!("{f} chunk 0"), format!("{f} chunk 1")];
    // Attempt by attempt, each in seq order.
    if finished < running {
        kept.splice(0..0, theirs);
    } else {
        kept.extend(theirs);
    }
    let mut expected = kept;
    expected.push(format!("{f} finished"));
    expected.push(format!("{r} chunk 3"));
    expected.push("credits".to_owned());
    assert_eq!(sent(messages), expected);

    // Kept across sessions until the attempt's result leaves the window.
    let later = Instant::now() + Duration::from_secs(3600);
    let listed = ctx.outbox.listed(&ctx.outbox.redeliverable(later));
    let again = ctx.outbox.resendable(&listed, later);
    assert_eq!(again.len(), 4, "the running attempt's chunks 0..=3 only");
    assert!(again.iter().all(|e| e.task_id == running));
}

/// A `Started` lost with a broken stream (or read by a coordinator that
/// died before recording it) is sent again after re-registering, ahead of
/// the attempt's other events: a coordinator still waiting for it would
/// otherwise take back an attempt that runs.
#[tokio::test(start_paused = true)]
async fn a_running_attempts_started_is_sent_again_first_in_the_next_session() {
    let (ctx, mut rx) = node_ctx(
        NodeConfig::new("http://unused"),
        HandlerRegistry::with_builtins(),
    );
    let running = running_one(&ctx);
    let started = rx.recv().await.expect("the attempt starts");
    assert_eq!(
        (started.task_id, &started.body),
        (running, &EventBody::Started { pid: 0 })
    );
    // Sent on the first stream; the coordinator read it, then died.
    let (out, mut out_rx) = mpsc::channel(16);
    let first = vec![started, chunk_event(running, 0)];
    ctx.outbox.send_events(&out, first).await.unwrap();
    while out_rx.try_recv().is_ok() {}
    drop(out_rx);

    // The next session, as `run` and `connected` do it.
    let now = Instant::now();
    let redeliver = ctx.outbox.redeliverable(now);
    let listed = ctx.outbox.listed(&redeliver);
    let resend = ctx.outbox.resendable(&listed, now);
    let (out, mut out_rx) = mpsc::channel(16);
    ctx.outbox.resume(&out, resend, redeliver).await.unwrap();
    drop(out);
    let mut messages = Vec::new();
    while let Some(message) = out_rx.recv().await {
        messages.push(message);
    }
    let r = &running.to_string()[20..];
    assert_eq!(
        sent(messages),
        [
            format!("{r} started"),
            format!("{r} chunk 0"),
            "credits".to_owned()
        ]
    );
}
