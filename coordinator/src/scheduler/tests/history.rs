//! The attempt history a task's record keeps: one entry per attempt, with
//! its node, when it was assigned, started and ended, and how it ended.

use super::*;
use crate::store::MAX_ATTEMPT_HISTORY;

fn secs(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(n)
}

#[test]
fn each_attempt_is_recorded_with_its_node_times_and_outcome() {
    let mut h = Harness::new();
    // Times from 10 s on (0 is the Unix epoch, which reads as unset).
    h.advance(Duration::from_secs(10));
    let n1 = h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    h.effects();
    h.advance(Duration::from_secs(1));
    h.event(S1, id, 1, NodeEventBody::Started);
    h.effects();
    let running = h.record(id).attempts;
    assert_eq!(running.len(), 1);
    assert_eq!(
        (
            running[0].number,
            running[0].node_id,
            &*running[0].node_name
        ),
        (Attempt(1), n1, "n1")
    );
    assert_eq!(
        (
            running[0].assigned_at,
            running[0].started_at,
            running[0].ended_at
        ),
        (secs(10), Some(secs(11)), None),
        "the current attempt, still open"
    );
    h.advance(Duration::from_secs(2));
    h.finish(S1, id, 1, Outcome::Failed);
    h.effects();
    let queued = h.record(id);
    assert_eq!(queued.state, TaskState::Queued);
    let first = &queued.attempts[0];
    assert_eq!(
        (first.ended_at, first.outcome),
        (Some(secs(13)), Some(Outcome::Failed))
    );
    assert!(first.reason.contains("boom"), "{}", first.reason);
    // The retry runs on another node and succeeds.
    let n2 = h.node(S2, reg("n2", 1), 1);
    h.advance(Duration::from_secs(1));
    h.effects();
    h.event(S2, id, 2, NodeEventBody::Started);
    h.advance(Duration::from_secs(5));
    h.finish(S2, id, 2, Outcome::Succeeded);
    h.effects();
    let done = h.record(id);
    assert_eq!(done.state, TaskState::Succeeded);
    let numbers: Vec<(Attempt, NodeId)> = done
        .attempts
        .iter()
        .map(|a| (a.number, a.node_id))
        .collect();
    assert_eq!(numbers, [(Attempt(1), n1), (Attempt(2), n2)]);
    let second = &done.attempts[1];
    assert_eq!(
        (
            second.assigned_at,
            second.started_at,
            second.ended_at,
            second.outcome
        ),
        (
            secs(14),
            Some(secs(14)),
            Some(secs(19)),
            Some(Outcome::Succeeded)
        )
    );
    assert_eq!(second.reason, "");
    // The finished event's record says the same.
    let finished = h.events(id).into_iter().find_map(|e| match e.body {
        EventBody::Finished(record) => Some(record),
        _ => None,
    });
    assert_eq!(finished.expect("finished").attempts, done.attempts);
}

#[test]
fn an_attempt_lost_with_its_node_ends_without_an_outcome_saying_why() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(3)])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.effects();
    h.lose(S1);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt),
        (TaskState::Queued, Attempt(2))
    );
    let lost = &record.attempts[0];
    assert_eq!((lost.number, lost.outcome), (Attempt(1), None));
    assert!(lost.ended_at.is_some());
    assert!(
        lost.reason.contains("n1") && lost.reason.contains("lost"),
        "{}",
        lost.reason
    );
}

#[test]
fn a_cancelled_queued_task_that_never_ran_has_no_attempts() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.s.cancel(id, "", h.now);
    h.effects();
    let record = h.record(id);
    assert_eq!(record.state, TaskState::Cancelled);
    assert!(record.attempts.is_empty());
}

#[test]
fn the_history_and_the_running_attempt_survive_a_restart() {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(3)])[0];
    h.effects();
    // Attempt 1 handed back unstarted, attempt 2 running when the
    // coordinator restarts.
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.s.credits(S1, 1, h.now);
    h.effects();
    h.advance(Duration::from_secs(1));
    h.event(S1, id, 2, NodeEventBody::Started);
    h.effects();
    let before = h.record(id).attempts;
    assert_eq!(before.len(), 2);
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(id, Attempt(2))];
    h.node(S2, again, 0);
    h.effects();
    h.finish(S2, id, 2, Outcome::Succeeded);
    h.effects();
    let after = h.record(id).attempts;
    assert_eq!(after.len(), 2);
    assert_eq!(after[0], before[0], "the ended attempt is kept as it was");
    assert_eq!(
        (after[1].assigned_at, after[1].started_at, after[1].outcome),
        (
            before[1].assigned_at,
            before[1].started_at,
            Some(Outcome::Succeeded)
        ),
        "the running attempt keeps its times"
    );
}

#[test]
fn the_history_keeps_the_latest_attempts_only() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    // Handed back unstarted costs the task an attempt number (and, past
    // its free hand-backs, a node loss: it has attempts enough for them).
    let total = MAX_ATTEMPT_HISTORY as u32 + 20;
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(total)])[0];
    h.effects();
    for attempt in 1..total {
        h.finish(S1, id, attempt, Outcome::Cancelled);
        h.s.credits(S1, 1, h.now);
        h.effects();
    }
    h.finish(S1, id, total, Outcome::Succeeded);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt),
        (TaskState::Succeeded, Attempt(total))
    );
    let numbers: Vec<u32> = record.attempts.iter().map(|a| a.number.0).collect();
    assert_eq!(numbers.len(), MAX_ATTEMPT_HISTORY);
    assert_eq!(numbers[0], total + 1 - MAX_ATTEMPT_HISTORY as u32);
    assert_eq!(numbers.last(), Some(&total));
}
