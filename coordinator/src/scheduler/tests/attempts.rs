//! Attempts: states and seqs, retries, fencing, cancels, redelivered results.

use super::*;

#[test]
fn a_task_runs_through_its_states_with_gapless_seqs() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    for seq in [0, 1, 1, 2] {
        h.event(
            S1,
            id,
            1,
            NodeEventBody::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from(format!("chunk{seq}")),
                seq,
            },
        );
    }
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(
        h.states(id),
        [
            TaskState::Queued,
            TaskState::Assigned,
            TaskState::Running,
            TaskState::Succeeded
        ]
    );
    let events = h.events(id);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let outputs = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Output { .. }))
        .count();
    assert_eq!(outputs, 3, "the duplicate chunk is dropped");
    let EventBody::Finished(task) = &events.last().unwrap().body else {
        panic!("last event is finished");
    };
    assert_eq!(
        (task.state, task.attempt, task.output.as_ref()),
        (TaskState::Succeeded, Attempt(1), &b"out"[..])
    );
    assert_eq!(task.node_name.as_deref(), Some("n1"));
    assert_eq!(task.next_seq, events.len() as u64);
    assert_eq!(h.s.nodes(h.now.instant)[0].finished, 1);
}

#[test]
fn failures_retry_with_exponential_backoff_until_attempts_run_out() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(3)])[0];
    h.effects();
    h.finish(S1, id, 1, Outcome::Failed);
    h.s.credits(S1, 1, h.now);
    assert!(assigned(&h.effects(), S1).is_empty(), "backoff first");
    assert!(h.s.pending_reason(id).unwrap().contains("retry backoff"));
    assert_eq!(
        h.s.next_wakeup().map(|w| w - h.now.instant),
        Some(Duration::from_millis(100))
    );
    h.advance(Duration::from_millis(99));
    assert!(assigned(&h.effects(), S1).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(2))]);
    h.finish(S1, id, 2, Outcome::Failed);
    h.s.credits(S1, 1, h.now);
    h.advance(Duration::from_millis(199));
    assert!(assigned(&h.effects(), S1).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(3))]);
    h.finish(S1, id, 3, Outcome::Failed);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.failures, record.attempt),
        (TaskState::Failed, 3, Attempt(3))
    );
    assert!(record.error.contains("boom"), "{}", record.error);
}

#[test]
fn start_failed_and_timed_out_are_final_at_once() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::StartFailed);
    h.finish(S1, ids[1], 1, Outcome::TimedOut);
    h.effects();
    let (a, b) = (h.record(ids[0]), h.record(ids[1]));
    assert_eq!((a.state, a.attempt), (TaskState::Failed, Attempt(1)));
    assert!(a.error.starts_with("failed to start"), "{}", a.error);
    assert_eq!((b.state, b.attempt), (TaskState::TimedOut, Attempt(1)));
}

#[test]
fn events_for_a_stale_attempt_are_refused_counted_and_cancelled() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    // Wrong attempt from the right node.
    h.event(S1, id, 7, NodeEventBody::Started);
    // Right attempt from the wrong node.
    h.node(S2, reg("n2", 1), 0);
    h.finish(S2, id, 1, Outcome::Succeeded);
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(id, Attempt(7))]);
    assert_eq!(cancels(&e, S2), [(id, Attempt(1))]);
    assert_eq!(h.s.stats().stale_events_refused, 2);
    assert_eq!(h.record(id).state, TaskState::Assigned);
    // After a loss and requeue, the old node's result for attempt 1 is refused.
    h.s.credits(S2, 1, h.now);
    h.lose(S1);
    h.effects();
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(h.s.stats().stale_events_refused, 3);
    assert_eq!(
        (h.record(id).state, h.record(id).attempt),
        (TaskState::Assigned, Attempt(2))
    );
}

#[test]
fn cancelling_a_queued_task_is_final_at_once() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    assert!(h.s.cancel(id, "", h.now));
    h.node(S1, reg("n1", 1), 1);
    let e = h.effects();
    assert!(
        assigned(&e, S1).is_empty(),
        "the stale queue entry is skipped"
    );
    let record = h.record(id);
    assert_eq!(
        (record.state, record.error.as_str()),
        (TaskState::Cancelled, "cancelled by client")
    );
    assert!(!h.s.cancel(id, "", h.now), "a final task is not live");
}

#[test]
fn cancelling_a_running_task_waits_for_the_node() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    assert!(h.s.cancel(id, "changed my mind", h.now));
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(id, Attempt(1))]);
    assert_eq!(h.record(id).state, TaskState::Running);
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.error.as_str()),
        (TaskState::Cancelled, "changed my mind")
    );
}

#[test]
fn cancelled_running_task_whose_node_is_lost_ends_cancelled() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.s.cancel(id, "", h.now);
    h.s.node_gone(S1, h.now);
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Cancelled);
}

#[test]
fn node_cancelled_attempt_without_client_cancel_is_requeued() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
}

/// A node that hands every assignment back unstarted (not draining: a
/// faulty worker) bounces a task free of charge only so many times; then
/// each hand-back counts as a node loss, and the task ends.
#[test]
fn a_task_handed_back_unstarted_again_and_again_ends_failed_after_its_free_requeues() {
    use crate::scheduler::attempts::MAX_FREE_REQUEUES;
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    h.effects();
    let mut rounds = 0u32;
    while h.record(id).state == TaskState::Queued || h.record(id).state == TaskState::Assigned {
        rounds += 1;
        assert!(
            rounds <= 10 * MAX_FREE_REQUEUES,
            "still bouncing after {rounds} rounds"
        );
        let attempt = h.record(id).attempt.0;
        h.finish(S1, id, attempt, Outcome::Cancelled);
        h.s.credits(S1, 1, h.now);
        h.effects();
    }
    let record = h.record(id);
    assert_eq!(record.state, TaskState::Failed, "{record:?}");
    assert_eq!(
        rounds,
        MAX_FREE_REQUEUES + 2,
        "free hand-backs, then its two attempts"
    );
    assert_eq!(record.node_losses, 2);
    assert!(
        record.error.contains("no attempts left"),
        "{}",
        record.error
    );
}

#[test]
fn an_attempt_handed_back_unstarted_is_requeued_without_spending_an_attempt() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(1)])[0];
    h.effects();
    // No Started: the node held it queued (prefetch), then drained.
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (
            record.state,
            record.attempt,
            record.node_losses,
            record.failures
        ),
        (TaskState::Queued, Attempt(2), 0, 0)
    );
}

#[test]
fn a_redelivered_result_is_ignored_quietly() {
    let mut h = Harness::new();
    let first = reg("n1", 2);
    h.node(S1, first.clone(), 2);
    let ids = h.submit(vec![
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", "").max_attempts(2),
    ]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.finish(S1, ids[1], 1, Outcome::Failed);
    h.effects();
    // The node reconnects, lists both attempts and sends both results again.
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1)), (ids[1], Attempt(1))];
    h.node(S2, again, 0);
    h.finish(S2, ids[0], 1, Outcome::Succeeded);
    h.finish(S2, ids[1], 1, Outcome::Failed);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty(), "{:?}", cancels(&e, S2));
    assert_eq!(h.s.stats().stale_events_refused, 0);
    assert_eq!(h.record(ids[0]).state, TaskState::Succeeded);
    assert_eq!(h.events(ids[0]).len(), 4, "no event added by the duplicate");
    assert_eq!(
        (h.record(ids[1]).state, h.record(ids[1]).attempt),
        (TaskState::Queued, Attempt(2))
    );
    // A different result for that attempt is not a duplicate: refused.
    h.finish(S2, ids[0], 1, Outcome::Failed);
    let e = h.effects();
    assert_eq!(cancels(&e, S2), [(ids[0], Attempt(1))]);
    assert_eq!(h.s.stats().stale_events_refused, 1);
}

#[test]
fn last_outcome_says_how_the_latest_attempt_ended() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    h.effects();
    assert_eq!(h.record(id).last_outcome, None);
    h.finish(S1, id, 1, Outcome::Failed);
    h.effects();
    assert_eq!(h.record(id).last_outcome, Some(Outcome::Failed));
    h.s.credits(S1, 1, h.now);
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Assigned);
    assert_eq!(h.record(id).last_outcome, None);
    h.finish(S1, id, 2, Outcome::StartFailed);
    h.effects();
    assert_eq!(
        (h.record(id).state, h.record(id).last_outcome),
        (TaskState::Failed, Some(Outcome::StartFailed))
    );
}

#[test]
fn tasks_finished_counts_final_states_only_and_retention_never_lowers_it() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 3), 3);
    let ids = h.submit(vec![
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", "").max_attempts(2),
    ]);
    h.effects();
    assert_eq!(h.s.stats().tasks_finished, 0);
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.finish(S1, ids[1], 1, Outcome::TimedOut);
    // A failure with attempts left is a retry, not a finish.
    h.finish(S1, ids[2], 1, Outcome::Failed);
    h.effects();
    assert_eq!(h.record(ids[2]).state, TaskState::Queued);
    assert_eq!(h.s.stats().tasks_finished, 2);
    // Retention deletes final tasks: their state counts drop, this does not.
    h.s.forget_expired(&[TaskState::Succeeded, TaskState::TimedOut]);
    let stats = h.s.stats();
    assert_eq!(stats.tasks_finished, 2);
    assert!(
        stats.tasks.iter().all(|(s, n)| !s.is_final() || *n == 0),
        "{:?}",
        stats.tasks
    );
}

#[test]
fn an_event_whose_task_id_could_not_be_read_is_refused_and_counted_without_a_cancel() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    h.effects();
    let unreadable = NodeTaskEvent::unreadable(Attempt(1));
    h.s.node_events(S1, vec![unreadable], h.now);
    let e = h.effects();
    assert_eq!(h.s.stats().stale_events_refused, 1);
    // A Cancel could not name it: the node never sent a readable id.
    assert!(cancels(&e, S1).is_empty());
    assert!(e.disconnect.is_empty(), "the session goes on");
}
