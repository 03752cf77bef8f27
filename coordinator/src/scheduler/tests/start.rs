//! The start deadline: attempts a node does not start in time are taken
//! back at no cost to their tasks; a node that starts nothing is lost.

use super::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Lets `by` pass a second at a time, the nodes on `sessions` heartbeating
/// (so only the start deadline can lose them).
fn pass(h: &mut Harness, sessions: &[SessionId], by: Duration) {
    let mut left = by;
    while !left.is_zero() {
        let step = left.min(Duration::from_secs(1));
        for session in sessions {
            h.s.heartbeat(*session, h.now);
        }
        h.advance(step);
        left -= step;
    }
}

#[test]
fn a_node_that_starts_none_of_its_attempts_is_lost_and_they_run_elsewhere_at_no_cost() {
    let mut h = Harness::new();
    h.node(S1, reg("deaf", 2), 2);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").max_attempts(1),
        TaskSpec::call("noop", "").max_attempts(1),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    // Within the deadline nothing happens, heartbeats or not.
    pass(&mut h, &[S1], TIMEOUT - Duration::from_secs(1));
    let effects = h.effects();
    assert!(effects.disconnect.is_empty() && cancels(&effects, S1).is_empty());
    assert!(
        ids.iter()
            .all(|id| h.record(*id).state == TaskState::Assigned)
    );
    // Past it, the node is lost and both attempts go back to the queue as
    // attempt 2, charged nothing (max_attempts 1 and still queued).
    pass(&mut h, &[S1], Duration::from_secs(2));
    let effects = h.effects();
    assert_eq!(effects.disconnect, [S1]);
    for id in &ids {
        let record = h.record(*id);
        assert_eq!(
            (record.state, record.attempt),
            (TaskState::Queued, Attempt(2))
        );
        assert_eq!((record.failures, record.node_losses), (0, 0));
        let reason = h.events(*id).iter().rev().find_map(|e| match &e.body {
            EventBody::State { reason, .. } => Some(reason.clone()),
            _ => None,
        });
        let reason = reason.unwrap_or_default();
        assert!(
            reason.contains("attempt 1 not started by node deaf within --start-timeout (30s)"),
            "{reason}"
        );
    }
    let stats = h.s.stats();
    assert_eq!((stats.attempts_not_started, stats.nodes_stuck), (2, 1));
    assert_eq!(stats.nodes_lost, 1);
    // A node that works runs them.
    h.node(S2, reg("good", 2), 2);
    let sent = assigned(&h.effects(), S2);
    assert_eq!(sent.len(), 2);
    for (id, attempt) in sent {
        assert_eq!(attempt, Attempt(2));
        h.event(S2, id, 2, NodeEventBody::Started);
        h.finish(S2, id, 2, Outcome::Succeeded);
    }
    h.effects();
    assert!(
        ids.iter()
            .all(|id| h.record(*id).state == TaskState::Succeeded)
    );
}

#[test]
fn a_busy_node_gives_back_only_the_attempt_it_held_queued() {
    let mut h = Harness::new();
    let busy = NodeRegistration {
        prefetch: 1,
        ..reg("busy", 1)
    };
    h.node(S1, busy, 2);
    let ids = h.submit(vec![
        TaskSpec::call("sleep", ""),
        TaskSpec::call("noop", ""),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    h.event(S1, ids[0], 1, NodeEventBody::Started);
    h.effects();
    pass(&mut h, &[S1], TIMEOUT + Duration::from_secs(1));
    let effects = h.effects();
    // The node stays; only the queued attempt comes back, and the node is
    // told to drop it.
    assert!(effects.disconnect.is_empty());
    assert_eq!(cancels(&effects, S1), [(ids[1], Attempt(1))]);
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    let back = h.record(ids[1]);
    assert_eq!((back.state, back.attempt), (TaskState::Queued, Attempt(2)));
    assert_eq!((back.failures, back.node_losses), (0, 0));
    // The node's report of the dropped attempt is refused by fencing; the
    // task runs on a node with room.
    h.finish(S1, ids[1], 1, Outcome::Cancelled);
    h.node(S2, reg("free", 1), 1);
    assert_eq!(assigned(&h.effects(), S2), [(ids[1], Attempt(2))]);
    assert_eq!(h.s.stats().attempts_not_started, 1);
    assert_eq!(h.s.stats().nodes_lost, 0);
}

#[test]
fn attempts_started_in_time_are_left_alone() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("sleep", "")])[0];
    h.effects();
    pass(&mut h, &[S1], TIMEOUT - Duration::from_secs(1));
    h.event(S1, id, 1, NodeEventBody::Started);
    pass(&mut h, &[S1], TIMEOUT * 4);
    let effects = h.effects();
    assert!(effects.disconnect.is_empty() && cancels(&effects, S1).is_empty());
    assert_eq!(h.record(id).state, TaskState::Running);
    assert_eq!(h.s.stats().attempts_not_started, 0);
}

#[test]
fn an_attempt_claimed_unstarted_after_a_reconnect_gets_a_fresh_deadline() {
    let mut h = Harness::new();
    let node = reg("n1", 1);
    let node_id = node.node_id;
    h.node(S1, node.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    // The node reconnects just before the deadline, still holding it.
    pass(&mut h, &[S1], TIMEOUT - Duration::from_secs(1));
    let again = NodeRegistration {
        node_id,
        running: vec![(id, Attempt(1))],
        ..node
    };
    h.s.register_node(S2, again, h.now);
    assert_eq!(h.effects().disconnect, [S1], "the replaced session");
    pass(&mut h, &[S2], Duration::from_secs(2));
    assert!(h.effects().disconnect.is_empty());
    assert_eq!(h.record(id).state, TaskState::Assigned);
    // Its own deadline counts from the claim.
    pass(&mut h, &[S2], TIMEOUT);
    assert_eq!(h.effects().disconnect, [S2]);
    assert_eq!(h.record(id).state, TaskState::Queued);
}

#[test]
fn events_about_many_unknown_attempts_earn_one_cancel_per_attempt() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 0);
    let unknown: Vec<TaskId> = (0..5_000).map(|_| TaskId::new()).collect();
    let events: Vec<NodeTaskEvent> = unknown
        .iter()
        .flat_map(|id| {
            (0..3).map(|seq| NodeTaskEvent {
                task_id: *id,
                attempt: Attempt(1),
                body: NodeEventBody::Output {
                    stream: OutputStream::Stdout,
                    data: Bytes::from_static(b"x"),
                    seq,
                },
            })
        })
        .collect();
    h.s.node_events(S1, events, h.now);
    let effects = h.effects();
    let sent = cancels(&effects, S1);
    assert_eq!(sent.len(), unknown.len());
    let distinct: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!(distinct.len(), unknown.len());
    assert!(effects.disconnect.is_empty());
    // The next batch may order them again (the node may still send them).
    h.event(S1, unknown[0], 1, NodeEventBody::Started);
    assert_eq!(cancels(&h.effects(), S1), [(unknown[0], Attempt(1))]);
}

/// A cancel ordered for an attempt the node holds queued, and the start
/// deadline passing before the node answers: the task ends CANCELLED
/// there, and the node's slot, resources and entry come back although its
/// late answer counts for nothing.
#[test]
fn a_cancelled_attempt_taken_back_at_its_start_deadline_frees_its_node_slot() {
    let mut h = Harness::new();
    let mut node = reg("n1", 2);
    node.resources.insert("gpu".into(), 2);
    h.node(S1, node, 2);
    let ids = h.submit(vec![
        TaskSpec::call("sleep", "a").resource("gpu", 1),
        TaskSpec::call("sleep", "b").resource("gpu", 1),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    let (a, b) = (ids[0], ids[1]);
    h.event(S1, a, 1, NodeEventBody::Started); // busy: b is held queued
    pass(&mut h, &[S1], Duration::from_secs(29));
    h.s.cancel(b, "not needed", h.now);
    assert_eq!(cancels(&h.effects(), S1), [(b, Attempt(1))]);
    // The start deadline passes before the node's answer comes in.
    pass(&mut h, &[S1], Duration::from_secs(2));
    h.effects();
    assert_eq!(h.record(b).state, TaskState::Cancelled);
    h.finish(S1, b, 1, Outcome::Cancelled); // refused: stale
    h.finish(S1, a, 1, Outcome::Succeeded);
    h.s.credits(S1, 2, h.now);
    h.effects();
    let info = &h.s.nodes(h.now.instant)[0];
    assert_eq!(info.running, vec![], "nothing runs on the node");
    assert_eq!(info.slots_used, 0, "no slot is in use");
    assert_eq!(info.resources_free["gpu"], 2, "no gpu is held");
    let more = h.submit(vec![
        TaskSpec::call("sleep", "c").resource("gpu", 1),
        TaskSpec::call("sleep", "d").resource("gpu", 1),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), more.len());
}

#[test]
fn submit_to_start_is_observed_at_a_tasks_first_start_whichever_attempt() {
    let mut h = Harness::new();
    let busy = NodeRegistration {
        prefetch: 1,
        ..reg("busy", 1)
    };
    h.node(S1, busy, 2);
    let ids = h.submit(vec![
        TaskSpec::call("sleep", ""),
        TaskSpec::call("noop", "").max_attempts(2),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    h.event(S1, ids[0], 1, NodeEventBody::Started);
    let observed = |h: &Harness| h.s.metrics.submit_to_start.count();
    assert_eq!(observed(&h), 1);
    // Attempt 1 of the second task is taken back unstarted; attempt 2
    // starts elsewhere: its task's first start.
    pass(&mut h, &[S1], TIMEOUT + Duration::from_secs(1));
    h.node(S2, reg("free", 1), 1);
    assert_eq!(assigned(&h.effects(), S2), [(ids[1], Attempt(2))]);
    h.event(S2, ids[1], 2, NodeEventBody::Started);
    assert_eq!(observed(&h), 2);
    // A retry after an attempt that started is no first start.
    h.finish(S2, ids[1], 2, Outcome::Failed);
    h.s.credits(S2, 1, h.now);
    pass(&mut h, &[S1, S2], Duration::from_secs(1));
    assert_eq!(assigned(&h.effects(), S2), [(ids[1], Attempt(3))]);
    h.event(S2, ids[1], 3, NodeEventBody::Started);
    h.effects();
    assert_eq!(h.record(ids[1]).state, TaskState::Running);
    assert_eq!(observed(&h), 2);
}
