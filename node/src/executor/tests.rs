//! The executor's tests, with real handlers and child processes on a
//! runtime: assignments from the wire, prefetch and slots as the session
//! sees them, each way an attempt ends, cancel, drain, kill and the lease.
//! The pure slot accounting has its own tests in `slots.rs`.

use std::time::Instant as StdInstant;

use weft_proto::{Attempt, TaskId, pb};

use super::*;
use crate::codec;
use crate::events::{self, Event, EventBody as Body, EventRx};
use crate::process::tests::assert_gone_soon;

fn executor(slots: u32) -> (Executor, EventRx) {
    executor_with_lease(slots, Arc::new(Lease::new(None)))
}

fn executor_with_lease(slots: u32, lease: Arc<Lease>) -> (Executor, EventRx) {
    built(HandlerRegistry::with_builtins(), lease, slots, 0)
}

fn prefetching(slots: u32, prefetch: u32) -> (Executor, EventRx) {
    built(
        HandlerRegistry::with_builtins(),
        Arc::new(Lease::new(None)),
        slots,
        prefetch,
    )
}

/// An executor on `registry`'s handlers, one slot.
fn executor_on(registry: HandlerRegistry) -> (Executor, EventRx) {
    built(registry, Arc::new(Lease::new(None)), 1, 0)
}

fn built(
    registry: HandlerRegistry,
    lease: Arc<Lease>,
    slots: u32,
    prefetch: u32,
) -> (Executor, EventRx) {
    let (tx, rx) = events::channel();
    let executor = Executor::new(
        registry,
        tx,
        TaskTracker::new(),
        CancellationToken::new(),
        lease,
        slots,
        prefetch,
    );
    (executor, rx)
}

#[tokio::test]
async fn prefetched_attempts_wait_for_a_slot_and_never_overcommit() {
    let (executor, mut rx) = prefetching(1, 2);
    assert_eq!(
        executor.take_grant(),
        Some(1),
        "no prefetch before a run time is known"
    );
    let (first, first_key) = assignment(TaskSpec::call("noop", "1"));
    executor.assign(first);
    until_finished(&executor, &mut rx, first_key).await;
    // A noop is short: the whole prefetch is used now (slot + 2).
    assert_eq!(executor.take_grant(), Some(3));
    let (long, long_key) = assignment(TaskSpec::call("sleep", "1h"));
    let (queued, queued_key) = assignment(TaskSpec::call("noop", "2"));
    let (cancelled, cancelled_key) = assignment(TaskSpec::call("noop", "3"));
    executor.assign(long);
    executor.assign(queued);
    executor.assign(cancelled);
    assert_eq!((executor.running(), executor.queued()), (1, 2));
    let (over, over_key) = assignment(TaskSpec::call("noop", "4"));
    executor.assign(over);
    let (_, done) = until_finished(&executor, &mut rx, over_key).await;
    assert!(done.error.contains("over capacity"), "{}", done.error);
    // Cancelling a queued attempt reports it without running it.
    executor.cancel(cancelled_key, "by test".into());
    let (seen, done) = until_finished(&executor, &mut rx, cancelled_key).await;
    assert_eq!(
        (outcome(&done), done.error.as_str()),
        (Outcome::Cancelled, "cancelled: by test")
    );
    assert!(
        seen.iter().all(|e| e.task_id != cancelled_key.0),
        "never started: {seen:?}"
    );
    assert_eq!(
        executor.running_keys().len(),
        2,
        "running and queued listed"
    );
    executor.cancel(long_key, String::new());
    until_finished(&executor, &mut rx, long_key).await;
    // The slot freed: the queued one runs.
    let (seen, done) = until_finished(&executor, &mut rx, queued_key).await;
    assert!(matches!(
        seen.last().map(|e| &e.body),
        Some(Body::Started { .. })
    ));
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert_eq!((executor.running(), executor.queued()), (0, 0));
}

#[tokio::test]
async fn draining_reports_queued_attempts_cancelled_at_once() {
    let (executor, mut rx) = prefetching(1, 1);
    let (warm, warm_key) = assignment(TaskSpec::call("noop", ""));
    executor.assign(warm);
    until_finished(&executor, &mut rx, warm_key).await;
    let (long, long_key) = assignment(TaskSpec::call("sleep", "1h"));
    let (queued, queued_key) = assignment(TaskSpec::call("noop", ""));
    executor.assign(long);
    executor.assign(queued);
    executor.set_draining();
    let (_, done) = until_finished(&executor, &mut rx, queued_key).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(done.error.contains("before it started"), "{}", done.error);
    assert_eq!((executor.running(), executor.queued()), (1, 0));
    executor.stop_all(&StopReason::Drained(Duration::ZERO));
    until_finished(&executor, &mut rx, long_key).await;
}

/// An assignment of `spec`, decoded from the wire as the session does.
fn assignment(spec: TaskSpec) -> (Assignment, AttemptKey) {
    let task_id = TaskId::new();
    let wire = pb::Assignment {
        task_id: task_id.to_string(),
        attempt: 1,
        spec: Some(spec.into()),
        trace: None,
        parents: Vec::new(),
    };
    (decoded(wire), (task_id, Attempt::FIRST))
}

fn decoded(wire: pb::Assignment) -> Assignment {
    codec::assignment(wire).expect("a valid task id")
}

/// Events until the `Finished` of `key`, which is released like the
/// session would.
async fn until_finished(
    executor: &Executor,
    rx: &mut EventRx,
    key: AttemptKey,
) -> (Vec<Event>, Finished) {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("attempt finishes")
            .expect("channel open");
        let ours = event.task_id == key.0;
        if let (true, Body::Finished(done)) = (ours, &event.body) {
            executor.release(key);
            return (seen, done.clone());
        }
        seen.push(event);
    }
}

fn outcome(done: &Finished) -> Outcome {
    done.outcome
}

#[tokio::test]
async fn idle_is_reached_when_the_last_held_attempt_ends_and_not_before() {
    let (executor, mut rx) = executor(2);
    let (first, first_key) = assignment(TaskSpec::call("sleep", "1h"));
    let (second, second_key) = assignment(TaskSpec::call("sleep", "1h"));
    executor.assign(first);
    executor.assign(second);
    let idle = executor.wait_idle();
    tokio::pin!(idle);
    assert!(futures::poll!(&mut idle).is_pending(), "two attempts held");
    executor.cancel(first_key, "test".into());
    until_finished(&executor, &mut rx, first_key).await;
    assert!(
        futures::poll!(&mut idle).is_pending(),
        "one attempt still held"
    );
    executor.cancel(second_key, "test".into());
    until_finished(&executor, &mut rx, second_key).await;
    tokio::time::timeout(Duration::from_secs(10), idle)
        .await
        .expect("idle once the last attempt is released");
    // And at once when nothing is held.
    tokio::time::timeout(Duration::from_secs(10), executor.wait_idle())
        .await
        .expect("idle already");
}

#[tokio::test]
async fn call_runs_its_handler_and_returns_the_output() {
    let (executor, mut rx) = executor(1);
    let (wire, key) = assignment(TaskSpec::call("sha256", "abc"));
    executor.assign(wire);
    let (seen, done) = until_finished(&executor, &mut rx, key).await;
    assert!(matches!(seen[0].body, Body::Started { .. }));
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert!(done.output.starts_with(b"ba7816bf"));
    assert_eq!(executor.running(), 0);
}

#[tokio::test]
async fn an_exec_task_the_policy_refuses_is_start_failed_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = |program: &str| TaskSpec::exec([program.to_owned(), marker.display().to_string()]);
    let listed = ExecPolicy::programs(["/bin/echo"]).unwrap();
    for (policy, why) in [
        (ExecPolicy::Deny, "does not run exec tasks"),
        (listed, "does not run program \"touch\""),
    ] {
        let (executor, mut rx) = executor(1);
        let executor = executor.with_exec(policy);
        let (wire, key) = assignment(touch("touch"));
        executor.assign(wire);
        let (seen, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::StartFailed);
        assert!(done.error.contains(why), "{}", done.error);
        assert!(
            seen.iter().all(|e| e.task_id != key.0),
            "no Started: {seen:?}"
        );
        // A call task still runs on the same node.
        let (wire, key) = assignment(TaskSpec::call("noop", "x"));
        executor.assign(wire);
        let (_, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::Succeeded);
        assert_eq!(executor.running(), 0);
    }
    assert!(!marker.exists(), "a refused exec task ran");
}

#[tokio::test]
async fn an_allow_list_refuses_path_and_ld_preload_set_through_secret_env() {
    // `secret_env` is applied after `env`, so a secret PATH would choose
    // which `echo` runs: a planted one that leaves a marker.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let planted = dir.path().join("bin");
    std::fs::create_dir(&planted).unwrap();
    let echo = planted.join("echo");
    std::fs::write(&echo, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&echo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = planted.display().to_string();
    let listed = ExecPolicy::programs(["echo", "/bin/echo"]).unwrap();
    let (executor, mut rx) = executor(1);
    let executor = executor.with_exec(listed);
    for (spec, why) in [
        (
            TaskSpec::exec(["echo", "hi"]).secret_env("PATH", path.as_str()),
            "PATH in secret_env",
        ),
        (
            TaskSpec::exec(["/bin/echo", "hi"]).secret_env("LD_PRELOAD", "/tmp/x.so"),
            "LD_PRELOAD (in secret_env)",
        ),
    ] {
        let (wire, key) = assignment(spec);
        executor.assign(wire);
        let (seen, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::StartFailed);
        assert!(done.error.contains(why), "{}", done.error);
        assert!(
            seen.iter().all(|e| e.task_id != key.0),
            "no Started: {seen:?}"
        );
    }
    // An ordinary secret is fine.
    let (wire, key) = assignment(TaskSpec::exec(["echo", "hi"]).secret_env("API_KEY", "k"));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert!(!marker.exists(), "the planted echo ran");
}

#[tokio::test]
async fn unknown_handler_cannot_start_and_names_the_known_ones() {
    let (executor, mut rx) = executor(1);
    let (wire, key) = assignment(TaskSpec::call("nope", ""));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::StartFailed);
    assert!(
        done.error.contains("\"nope\"") && done.error.contains("sha256"),
        "{}",
        done.error
    );
}

#[tokio::test]
async fn failures_report_exit_code_or_handler_error() {
    let (executor, mut rx) = executor(2);
    let (exit, exit_key) = assignment(TaskSpec::exec(["sh", "-c", "exit 3"]));
    let (fail, fail_key) = assignment(TaskSpec::call("fail", "broken"));
    executor.assign(exit);
    let (_, done) = until_finished(&executor, &mut rx, exit_key).await;
    assert_eq!((outcome(&done), done.exit_code), (Outcome::Failed, Some(3)));
    assert_eq!(done.error, "exited with code 3");
    executor.assign(fail);
    let (_, done) = until_finished(&executor, &mut rx, fail_key).await;
    assert_eq!(
        (outcome(&done), done.error.as_str()),
        (Outcome::Failed, "broken")
    );
}

#[tokio::test]
async fn timeout_kills_the_process_group_and_reports_timed_out() {
    let (executor, mut rx) = executor(1);
    let spec = TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"])
        .timeout(Duration::from_millis(300));
    let (wire, key) = assignment(spec);
    let start = StdInstant::now();
    executor.assign(wire);
    let (seen, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::TimedOut);
    assert_eq!(done.exit_code, None);
    assert!(start.elapsed() < Duration::from_secs(3));
    let grandchild = seen
        .iter()
        .find_map(|e| match &e.body {
            Body::Output { data, .. } => String::from_utf8_lossy(data).trim().parse::<u32>().ok(),
            _ => None,
        })
        .expect("the script printed its background pid");
    assert_gone_soon(grandchild).await;
}

#[tokio::test]
async fn handler_timeout_reports_timed_out() {
    let (executor, mut rx) = executor(1);
    let (wire, key) = assignment(TaskSpec::call("sleep", "1h").timeout(Duration::from_millis(50)));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::TimedOut);
}

/// An async handler that waits, then holds its thread without yielding (a
/// mistake: such code belongs in a blocking handler), cannot hold its
/// attempt past the timeout: once it waits it runs apart from the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handler_holding_its_thread_after_a_wait_is_timed_out_on_time() {
    let mut registry = HandlerRegistry::with_builtins();
    registry.register_async("hold", |_request| async {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(1500));
        Ok(bytes::Bytes::from_static(b"too late"))
    });
    let (executor, mut rx) = executor_on(registry);
    let (wire, key) = assignment(TaskSpec::call("hold", "").timeout(Duration::from_millis(100)));
    let began = StdInstant::now();
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    let took = began.elapsed();
    assert_eq!(outcome(&done), Outcome::TimedOut);
    assert!(
        took < Duration::from_millis(1000),
        "reported after {took:?}, not at its 100 ms timeout"
    );
}

/// One that holds its thread before its first wait holds its attempt with
/// it, but what it returns past its timeout is a timeout, never a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handler_returning_past_its_timeout_is_timed_out_not_succeeded() {
    let mut registry = HandlerRegistry::with_builtins();
    registry.register_async("hold", |_request| async {
        std::thread::sleep(Duration::from_millis(300));
        Ok(bytes::Bytes::from_static(b"too late"))
    });
    let (executor, mut rx) = executor_on(registry);
    let (wire, key) = assignment(TaskSpec::call("hold", "").timeout(Duration::from_millis(100)));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::TimedOut, "{}", done.error);
    assert!(done.output.is_empty());
}

/// A call done at once, run in its attempt's task, still has its panic
/// caught and reported as the attempt's failure.
#[tokio::test]
async fn an_async_handler_panicking_at_once_fails_its_attempt() {
    let mut registry = HandlerRegistry::with_builtins();
    registry.register_async("boom", |_request| async { panic!("boom at once") });
    let (executor, mut rx) = executor_on(registry);
    let (wire, key) = assignment(TaskSpec::call("boom", ""));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::Failed);
    assert!(done.error.contains("boom at once"), "{}", done.error);
}

#[tokio::test]
async fn cancel_stops_exactly_that_attempt() {
    let (executor, mut rx) = executor(2);
    let (first, first_key) = assignment(TaskSpec::call("sleep", "1h"));
    let (second, second_key) = assignment(TaskSpec::call("sleep", "1h"));
    executor.assign(first);
    executor.assign(second);
    executor.cancel(first_key, "by test".into());
    let (_, done) = until_finished(&executor, &mut rx, first_key).await;
    assert_eq!(
        (outcome(&done), done.error.as_str()),
        (Outcome::Cancelled, "cancelled: by test")
    );
    assert_eq!(executor.running_keys().len(), 1);
    assert_eq!(executor.running_keys()[0].0, second_key.0);
    executor.cancel((TaskId::new(), Attempt::FIRST), "unknown".into()); // ignored
    executor.stop_all(&StopReason::Cancelled(String::new()));
    let (_, done) = until_finished(&executor, &mut rx, second_key).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
}

#[tokio::test]
async fn slots_are_never_overcommitted_and_credits_top_up() {
    let (executor, mut rx) = executor(2);
    assert_eq!(executor.take_grant(), Some(2));
    assert_eq!(executor.take_grant(), None);
    let (big, big_key) = assignment(TaskSpec::call("sleep", "1h").slots(2));
    executor.assign(big);
    let (over, over_key) = assignment(TaskSpec::call("noop", ""));
    executor.assign(over);
    let (_, done) = until_finished(&executor, &mut rx, over_key).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(done.error.contains("over capacity"), "{}", done.error);
    assert_eq!(executor.take_grant(), None, "both slots are in use");
    executor.cancel(big_key, String::new());
    until_finished(&executor, &mut rx, big_key).await;
    assert_eq!(executor.take_grant(), Some(2));
    executor.set_draining();
    executor.reset_window();
    assert_eq!(executor.take_grant(), None, "a draining node never grants");
}

#[tokio::test]
async fn invalid_spec_cannot_start() {
    let (executor, mut rx) = executor(1);
    let task_id = TaskId::new();
    executor.assign(decoded(pb::Assignment {
        task_id: task_id.to_string(),
        attempt: 2,
        spec: Some(pb::TaskSpec::default()),
        trace: None,
        parents: Vec::new(),
    }));
    let (_, done) = until_finished(&executor, &mut rx, (task_id, Attempt(2))).await;
    assert_eq!(outcome(&done), Outcome::StartFailed);
    assert!(done.error.contains("invalid task spec"), "{}", done.error);
}

#[tokio::test]
async fn killed_attempts_report_nothing_and_leave_no_process() {
    let (executor, mut rx) = executor(1);
    let (wire, _key) = assignment(TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"]));
    executor.assign(wire);
    let grandchild = loop {
        let event = rx.recv().await.unwrap();
        if let Body::Output { data, .. } = event.body {
            break String::from_utf8_lossy(&data)
                .trim()
                .parse::<u32>()
                .unwrap();
        }
    };
    executor.stop_all(&StopReason::Killed);
    assert_gone_soon(grandchild).await;
    executor.inner.tasks.close();
    tokio::time::timeout(Duration::from_secs(5), executor.inner.tasks.wait())
        .await
        .unwrap();
    while let Ok(event) = rx.try_recv() {
        assert!(
            !matches!(event.body, Body::Finished(_)),
            "killed attempt reported {event:?}"
        );
    }
}

#[tokio::test]
async fn lease_expiry_stops_running_attempts_and_refuses_new_ones() {
    let lease = Arc::new(Lease::new(Some(Duration::from_millis(200))));
    let (executor, mut rx) = executor_with_lease(2, lease.clone());
    lease.begin(
        Duration::from_secs(5),
        Duration::from_secs(1),
        Instant::now(),
    );
    let (running, running_key) = assignment(TaskSpec::call("sleep", "1h"));
    executor.assign(running);
    let silence = lease
        .check(Instant::now() + Duration::from_secs(3))
        .expect("the lease ran out");
    executor.stop_all(&StopReason::LeaseExpired(silence));
    let (_, done) = until_finished(&executor, &mut rx, running_key).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for 3."),
        "{}",
        done.error
    );
    // An Assign read after the expiry (it raced the disconnect) never runs.
    let (late, late_key) = assignment(TaskSpec::call("sleep", "1h"));
    executor.assign(late);
    let (seen, done) = until_finished(&executor, &mut rx, late_key).await;
    assert!(seen.is_empty(), "not even Started: {seen:?}");
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(done.error.starts_with("lease expired"), "{}", done.error);
    assert_eq!(executor.running(), 0);
}

/// A timeout too large to add to the clock means no deadline: the attempt
/// runs, reports, and frees its slot. (The wire refuses such a timeout
/// already; the executor does not count on it.)
#[tokio::test]
async fn a_timeout_too_large_for_the_clock_runs_without_a_deadline() {
    let (executor, mut rx) = executor(1);
    let key = (TaskId::new(), Attempt::FIRST);
    let spec = TaskSpec::call("noop", "x").timeout(Duration::MAX);
    executor.assign(Assignment {
        key,
        spec: Ok(Box::new(spec)),
        parents: Arc::from([]),
    });
    let (seen, done) = until_finished(&executor, &mut rx, key).await;
    assert!(matches!(seen[0].body, Body::Started { .. }), "{seen:?}");
    assert_eq!(outcome(&done), Outcome::Succeeded, "{}", done.error);
    assert_eq!(executor.running(), 0, "the slot is free");
}

/// A task that makes `$WEFT_OUTPUT` a FIFO (or anything but a file) fails
/// saying so; reading it never blocks the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_is_not_a_regular_file_fails_the_attempt_without_blocking() {
    let (executor, mut rx) = executor(1);
    let (wire, key) = assignment(TaskSpec::exec(["sh", "-c", r#"mkfifo "$WEFT_OUTPUT""#]));
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::Failed);
    assert!(
        done.error.contains("$WEFT_OUTPUT is not a regular file"),
        "{}",
        done.error
    );
    assert_eq!(executor.running(), 0);
}

/// A stopped attempt's `$WEFT_OUTPUT` is not read: what is there cannot
/// turn a timeout (retried as such) into a failure.
#[tokio::test]
async fn a_timed_out_exec_task_is_timed_out_whatever_its_output_file_is() {
    let (executor, mut rx) = executor(1);
    let spec = TaskSpec::exec(["sh", "-c", r#"mkdir "$WEFT_OUTPUT"; sleep 100"#])
        .timeout(Duration::from_millis(200));
    let (wire, key) = assignment(spec);
    executor.assign(wire);
    let (_, done) = until_finished(&executor, &mut rx, key).await;
    assert_eq!(outcome(&done), Outcome::TimedOut, "{}", done.error);
    assert!(done.output.is_empty());
}

/// An `Assign` repeating an attempt the node holds is a duplicate even
/// when it could not start (no spec, or refused by the exec policy): the
/// running attempt keeps its slot and reports nothing for it.
#[tokio::test]
async fn a_repeated_assignment_that_cannot_start_leaves_the_running_attempt_alone() {
    for policy in [ExecPolicy::Allow, ExecPolicy::Deny] {
        let (executor, mut rx) = executor(2);
        let executor = executor.with_exec(policy);
        let (wire, key) = assignment(TaskSpec::call("sleep", "1h"));
        let task_id = key.0.to_string();
        executor.assign(wire);
        let repeats = [
            pb::Assignment {
                task_id: task_id.clone(),
                attempt: 1,
                spec: None,
                trace: None,
                parents: Vec::new(),
            },
            pb::Assignment {
                task_id,
                attempt: 1,
                spec: Some(TaskSpec::exec(["true"]).into()),
                trace: None,
                parents: Vec::new(),
            },
        ];
        for repeat in repeats {
            executor.assign(decoded(repeat));
        }
        assert_eq!(executor.running(), 1);
        // A later assignment's events come after anything reported for
        // the repeats: none is the running attempt's Finished.
        let (later, later_key) = assignment(TaskSpec::call("noop", ""));
        executor.assign(later);
        let (seen, done) = until_finished(&executor, &mut rx, later_key).await;
        assert_eq!(outcome(&done), Outcome::Succeeded);
        assert!(
            seen.iter().all(|e| !(e.key() == key && e.is_finished())),
            "{seen:?}"
        );
        assert_eq!(executor.running(), 1, "still running");
        assert!(executor.holds(key));
        executor.cancel(key, String::new());
        let (_, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::Cancelled);
    }
}
