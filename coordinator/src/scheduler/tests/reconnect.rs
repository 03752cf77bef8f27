//! A broken stream is not a lost node: the node's attempts wait the
//! reconnect grace for it to come back and claim them.

use super::*;

#[test]
fn a_node_back_within_the_grace_carries_on_its_attempts_without_a_rerun() {
    let mut h = Harness::new();
    let node = reg("n1", 2);
    let node_id = node.node_id;
    h.node(S1, node.clone(), 2);
    let ids = h.submit(vec![
        TaskSpec::call("sleep", ""),
        TaskSpec::call("noop", ""),
    ]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    h.node(S2, reg("spare", 2), 2);
    h.effects();
    let on_s1 = ids.clone();
    let running = on_s1[0];
    h.event(S1, running, 1, NodeEventBody::Started);
    h.effects();

    // The stream breaks: nothing is requeued, nothing goes to the spare.
    h.s.node_gone(S1, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert!(assigned(&e, S2).is_empty());
    assert_eq!(h.record(running).state, TaskState::Running);
    h.s.heartbeat(S2, h.now);
    h.advance(Duration::from_millis(500));

    // Back within the grace, listing what it holds: it carries on.
    let again = NodeRegistration {
        node_id,
        running: on_s1.iter().map(|id| (*id, Attempt(1))).collect(),
        ..node
    };
    h.s.register_node(SessionId(3), again, h.now);
    let e = h.effects();
    assert!(cancels(&e, SessionId(3)).is_empty());
    assert!(assigned(&e, S2).is_empty());
    h.advance(Duration::from_secs(2));
    h.s.heartbeat(S2, h.now);
    h.s.heartbeat(SessionId(3), h.now);
    assert!(assigned(&h.effects(), S2).is_empty(), "nothing requeued");
    h.finish(SessionId(3), running, 1, Outcome::Succeeded);
    h.effects();
    let done = h.record(running);
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0)
    );
    let stats = h.s.stats();
    assert_eq!(
        (stats.reclaimed_attempts, stats.nodes_lost),
        (on_s1.len() as u64, 0)
    );
}

#[test]
fn a_node_not_back_within_the_grace_is_lost_and_its_attempts_run_elsewhere() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("sleep", "")])[0];
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(1))]);
    h.event(S1, id, 1, NodeEventBody::Started);
    h.node(S2, reg("spare", 1), 1);
    h.effects();
    h.s.node_gone(S1, h.now);
    assert!(assigned(&h.effects(), S2).is_empty());
    assert_eq!(h.s.stats().nodes_lost, 0, "not lost yet");
    h.advance(Duration::from_millis(1001));
    assert_eq!(assigned(&h.effects(), S2), [(id, Attempt(2))]);
    let record = h.record(id);
    assert_eq!((record.node_losses, record.failures), (1, 0));
    assert_eq!(h.s.stats().nodes_lost, 1);
    // Coming back later, its report of attempt 1 is refused.
    let late = NodeRegistration {
        running: vec![(id, Attempt(1))],
        ..reg("n1-late", 1)
    };
    h.s.register_node(SessionId(3), late, h.now);
    assert_eq!(cancels(&h.effects(), SessionId(3)), [(id, Attempt(1))]);
}

#[test]
fn a_draining_node_whose_stream_ends_is_gone_at_once() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("sleep", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.s.node_draining(S1, h.now);
    h.node(S2, reg("spare", 1), 1);
    h.effects();
    h.s.node_gone(S1, h.now);
    assert_eq!(assigned(&h.effects(), S2), [(id, Attempt(2))]);
    assert_eq!(h.s.stats().nodes_lost, 1);
}

#[test]
fn a_task_cancelled_while_its_node_is_away_ends_cancelled_at_once() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("sleep", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.s.cancel(id, "not needed", h.now);
    h.effects();
    h.s.node_gone(S1, h.now);
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Cancelled);
}

/// A harness whose node `n1` (on S1, `slots` slots) runs one started
/// `sleep` task: the node's registration and the task.
fn one_running(slots: u32) -> (Harness, NodeRegistration, TaskId) {
    let mut h = Harness::new();
    let node = reg("n1", slots);
    h.node(S1, node.clone(), slots);
    let id = h.submit(vec![TaskSpec::call("sleep", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    (h, node, id)
}

/// `node` registers again on S2, listing `running`: what it was told.
fn comes_back(
    h: &mut Harness,
    node: &NodeRegistration,
    running: Vec<(TaskId, Attempt)>,
) -> Effects {
    h.node(
        S2,
        NodeRegistration {
            running,
            ..node.clone()
        },
        node.slots,
    );
    h.effects()
}

/// A cancel while the attempt's node is away (the reconnect grace) has no
/// session to go to; the node that comes back and claims the attempt is
/// told to stop it then.
#[test]
fn a_cancel_during_the_reconnect_grace_reaches_the_node_that_claims_the_attempt() {
    let (mut h, node, id) = one_running(1);
    h.s.node_gone(S1, h.now);
    h.effects();
    assert!(h.s.cancel(id, "not needed", h.now));
    h.effects();
    h.advance(Duration::from_millis(100));
    let e = comes_back(&mut h, &node, vec![(id, Attempt(1))]);
    assert_eq!(
        cancels(&e, S2),
        [(id, Attempt(1))],
        "the claimed attempt is told to stop"
    );
}

/// The same after a coordinator restart: a cancel of a restored attempt
/// whose node has not reconnected yet.
#[test]
fn a_cancel_during_the_restart_grace_reaches_the_node_that_claims_the_attempt() {
    let (mut h, node, id) = one_running(1);
    h.effects();
    let mut back = h.restart(Duration::from_secs(1));
    assert!(back.s.cancel(id, "not needed", back.now));
    back.effects();
    let e = comes_back(&mut back, &node, vec![(id, Attempt(1))]);
    assert_eq!(
        cancels(&e, S2),
        [(id, Attempt(1))],
        "the claimed attempt is told to stop"
    );
}

#[test]
fn an_attempt_a_node_lists_twice_when_it_comes_back_holds_one_slot() {
    let (mut h, node, id) = one_running(2);
    h.s.node_gone(S1, h.now);
    h.effects();
    comes_back(&mut h, &node, vec![(id, Attempt(1)), (id, Attempt(1))]);
    assert_eq!(
        h.s.nodes(h.now.instant)[0].slots_used,
        1,
        "one attempt, one slot"
    );
    h.finish(S2, id, 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Succeeded);
    assert_eq!(
        h.s.nodes(h.now.instant)[0].slots_used,
        0,
        "the slot came back"
    );
}
