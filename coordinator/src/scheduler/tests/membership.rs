//! Nodes: loss and its requeues, liveness, draining, reconnecting, poison tasks.

use super::*;

#[test]
fn lost_node_requeues_its_attempts_as_the_next_attempt() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.node(S2, reg("n2", 1), 1);
    h.lose(S1);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(assigned(&e, S2), [(id, Attempt(2))]);
    let requeued = h
        .events(id)
        .into_iter()
        .find_map(|e| match e.body {
            EventBody::State {
                state: TaskState::Queued,
                reason,
                ..
            } if e.seq > 0 => Some(reason),
            _ => None,
        })
        .unwrap();
    assert_eq!(requeued, "node n1 lost; retrying as attempt 2");
    assert_eq!(h.record(id).node_losses, 1);
    assert_eq!(h.s.stats().nodes_lost, 1);
}

#[test]
fn lost_attempts_go_before_the_backlog() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let first = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.submit((0..10).map(|_| TaskSpec::call("noop", "")).collect());
    h.node(S2, reg("n2", 1), 0);
    h.effects();
    h.lose(S1);
    h.effects();
    h.s.credits(S2, 1, h.now);
    assert_eq!(assigned(&h.effects(), S2), [(first, Attempt(2))]);
}

#[test]
fn node_losses_count_against_max_attempts() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    for session in [S1, S2] {
        h.node(session, reg("n", 1), 1);
        h.effects();
        h.lose(session);
        h.effects();
    }
    let record = h.record(id);
    assert_eq!(
        (record.state, record.node_losses, record.attempt),
        (TaskState::Failed, 2, Attempt(2))
    );
    assert!(record.error.contains("lost"), "{}", record.error);
}

#[test]
fn silent_node_is_lost_after_the_heartbeat_timeout() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    h.node(S2, reg("n2", 1), 0);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    for _ in 0..6 {
        h.advance(Duration::from_secs(1));
        h.s.heartbeat(S2, h.now);
    }
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(h.s.nodes(h.now.instant).len(), 1);
    assert_eq!(h.record(id).state, TaskState::Queued);
}

#[test]
fn drained_node_gets_no_new_work() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 4);
    let info =
        h.s.drain_node("n1", Some(Duration::from_secs(3)), h.now.instant)
            .unwrap();
    assert_eq!(info.state, weft_proto::NodeState::Draining);
    h.submit(vec![TaskSpec::call("noop", "")]);
    let e = h.effects();
    assert!(assigned(&e, S1).is_empty());
    assert_eq!(e.nodes[&S1].drain, Some(Some(Duration::from_secs(3))));
    h.s.credits(S1, 4, h.now);
    assert!(assigned(&h.effects(), S1).is_empty());
    assert!(matches!(
        h.s.drain_node("nobody", None, h.now.instant),
        Err(Error::NodeNotFound(_))
    ));
    // A drained node that leaves with nothing running is not "lost".
    h.s.node_gone(S1, h.now);
    assert_eq!(h.s.stats().nodes_lost, 0);
}

#[test]
fn reconnecting_node_keeps_its_current_attempts_and_cancels_stale_ones() {
    let mut h = Harness::new();
    let first = reg("n1", 2);
    let node_id = h.node(S1, first.clone(), 2);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    let stale = TaskId::new();
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1)), (stale, Attempt(1))];
    h.s.register_node(S2, again, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(cancels(&e, S2), [(stale, Attempt(1))]);
    // ids[0] carries on under the new session; ids[1] was lost and requeued.
    h.event(S2, ids[0], 1, NodeEventBody::Started);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    assert_eq!(h.record(ids[0]).node_id, Some(node_id));
    assert_eq!(
        (h.record(ids[1]).state, h.record(ids[1]).attempt),
        (TaskState::Queued, Attempt(2))
    );
    assert_eq!(h.s.nodes(h.now.instant)[0].slots_used, 1);
}

#[test]
fn a_task_lost_with_two_different_nodes_while_running_fails_as_poison() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(5)])[0];
    for (session, name) in [(S1, "node-a"), (S2, "node-b")] {
        h.node(session, reg(name, 1), 1);
        h.effects();
        h.event(session, id, h.record(id).attempt.0, NodeEventBody::Started);
        h.effects();
        h.lose(session);
        h.effects();
    }
    let record = h.record(id);
    assert_eq!(
        (record.state, record.failures, record.node_losses),
        (TaskState::Failed, 0, 2)
    );
    assert_eq!(
        record.error,
        "lost with 2 different nodes (node-a, node-b) while running; not retried to protect the cluster (--max-node-losses)"
    );
    assert_eq!(record.last_outcome, None);
    // A third node is never given it.
    h.node(SessionId(3), reg("node-c", 1), 1);
    assert!(assigned(&h.effects(), SessionId(3)).is_empty());
}

#[test]
fn the_same_node_lost_twice_or_a_loss_before_start_is_not_poison() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(5)])[0];
    let node = reg("node-a", 1);
    // Lost twice with the same node id (it reconnects between losses).
    for session in [S1, S2] {
        h.node(session, node.clone(), 1);
        h.effects();
        h.event(session, id, h.record(id).attempt.0, NodeEventBody::Started);
        h.lose(session);
        h.effects();
    }
    // Lost with another node before it started there.
    h.node(SessionId(3), reg("node-b", 1), 1);
    h.effects();
    h.lose(SessionId(3));
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.node_losses, record.attempt),
        (TaskState::Queued, 3, Attempt(4))
    );
    assert_eq!(record.lost_nodes.len(), 1);
}

#[test]
fn a_node_declaring_more_slots_than_the_limit_is_refused_by_name() {
    let mut h = Harness::new();
    let err = h.s.admit_node(reg("huge", 5000)).unwrap_err();
    assert!(matches!(
        err,
        Error::TooManySlots {
            slots: 5000,
            max: 1024
        }
    ));
    assert_eq!(
        err.to_string(),
        "node declares 5000 slots; this coordinator accepts at most 1024 (--max-node-slots)"
    );
    assert_eq!(h.s.admit_node(reg("max", 1024)).unwrap().slots, 1024);
}

#[test]
fn a_node_gets_at_most_its_slots_plus_a_prefetch_capped_at_the_limit() {
    let mut h = Harness::with(SchedulerConfig {
        max_node_slots: 4,
        ..config()
    });
    let greedy = NodeRegistration {
        prefetch: 1_000_000,
        ..reg("greedy", 4)
    };
    let admitted = h.s.admit_node(greedy).unwrap();
    assert_eq!(admitted.prefetch, 4);
    h.submit((0..20).map(|_| TaskSpec::call("noop", "")).collect());
    h.node(S1, admitted, u32::MAX);
    assert_eq!(assigned(&h.effects(), S1).len(), 8, "4 slots + 4 prefetch");
    h.s.credits(S1, u32::MAX, h.now);
    assert!(
        assigned(&h.effects(), S1).is_empty(),
        "granting again adds nothing"
    );
}

#[test]
fn a_reconnect_replacing_an_open_session_requeues_what_it_never_started_at_no_cost() {
    let mut h = Harness::new();
    let node = reg("n1", 2);
    h.node(S1, node.clone(), 2);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").max_attempts(2),
        TaskSpec::call("noop", "").max_attempts(1),
    ]);
    let (started, unstarted) = (ids[0], ids[1]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    h.event(S1, started, 1, NodeEventBody::Started);
    h.effects();
    // Back on a new stream before the old one ended, listing neither.
    h.s.register_node(S2, node, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    // Never started: its Assign never reached the node; no charge, as
    // when the old stream ends first (`requeue_unclaimed`).
    let record = h.record(unstarted);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 0)
    );
    // Started: a run lost with its node.
    let record = h.record(started);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
    assert_eq!(h.s.stats().nodes_lost, 1);
}

#[test]
fn a_reconnect_replacing_an_open_session_with_nothing_started_loses_no_node() {
    let mut h = Harness::new();
    let node = reg("n1", 1);
    h.node(S1, node.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(1)])[0];
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(1))]);
    h.s.register_node(S2, node, h.now);
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Queued, "not failed");
    assert_eq!(h.s.stats().nodes_lost, 0);
}

#[test]
fn an_operators_drain_outlives_a_reconnect_of_the_same_node() {
    let mut h = Harness::new();
    let node = reg("n1", 2);
    h.node(S1, node.clone(), 2);
    h.s.drain_node("n1", Some(Duration::from_secs(3)), h.now.instant)
        .unwrap();
    h.effects();
    // The node comes back on a new stream before the old one ended.
    h.node(S2, node, 2);
    h.submit(vec![TaskSpec::call("noop", "")]);
    let e = h.effects();
    assert!(assigned(&e, S2).is_empty(), "no new work");
    // The new session is told again (the node may never have heard it).
    assert_eq!(e.nodes.get(&S2).and_then(|o| o.drain), Some(None));
    let nodes = h.s.nodes(h.now.instant);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].state, weft_proto::NodeState::Draining);
}

#[test]
fn revoking_a_node_whose_stream_ended_requeues_its_attempts_when_its_grace_ends_not_before() {
    let mut h = Harness::new();
    let node_id = h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(1))]);
    h.event(S1, id, 1, NodeEventBody::Started);
    h.effects();
    // Its stream ended: its attempt waits the reconnect grace for it, and
    // the node may still be running it (until its lease runs out).
    h.s.node_gone(S1, h.now);
    h.effects();
    assert_eq!(h.s.revoke_node(node_id, h.now), (false, 0));
    h.effects();
    assert_eq!(
        (h.record(id).state, h.record(id).attempt),
        (TaskState::Running, Attempt(1)),
        "not run elsewhere while the revoked node may still run it"
    );
    // It cannot come back: the grace ends and the attempt is requeued,
    // counted as one lost node.
    let grace = h.s.config.reconnect_grace;
    h.advance(grace + Duration::from_millis(1));
    h.effects();
    assert_eq!(
        (h.record(id).state, h.record(id).attempt),
        (TaskState::Queued, Attempt(2))
    );
    assert_eq!(h.s.stats().nodes_lost, 1);
}

#[test]
fn a_stream_that_ends_with_nothing_held_is_not_a_lost_node() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    h.s.node_gone(S1, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert!(h.s.nodes(h.now.instant).is_empty());
    assert_eq!(h.s.stats().nodes_lost, 0);
}
