//! Node identity rules: events only from the node an attempt is leased
//! to, one connected node per name, revoked nodes cut off.

use super::*;

fn output(seq: u64) -> NodeEventBody {
    NodeEventBody::Output {
        stream: OutputStream::Stdout,
        data: Bytes::from_static(b"forged"),
        seq,
    }
}

#[test]
fn events_for_an_attempt_leased_to_another_node_are_refused_counted_and_cancelled() {
    let mut h = Harness::new();
    h.node(S1, reg("real", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(1))]);
    h.node(S2, reg("thief", 1), 0);
    h.effects();
    let before = h.events(id).len();

    // The thief reports for the real node's current attempt.
    h.event(S2, id, 1, NodeEventBody::Started);
    h.event(S2, id, 1, output(0));
    h.finish(S2, id, 1, Outcome::Succeeded);
    let e = h.effects();
    assert_eq!(
        cancels(&e, S2),
        [(id, Attempt(1))],
        "the sender is told to stop"
    );
    assert!(cancels(&e, S1).is_empty(), "the real node is not");
    assert_eq!(h.s.stats().foreign_events_refused, 3);
    assert_eq!(h.s.stats().stale_events_refused, 3, "fenced like any other");
    assert_eq!(h.events(id).len(), before, "nothing recorded for the task");
    assert_eq!(h.record(id).state, TaskState::Assigned);

    // The real node's report counts.
    h.event(S1, id, 1, NodeEventBody::Started);
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt),
        (TaskState::Succeeded, Attempt(1))
    );
    assert_eq!(record.output, Bytes::from_static(b"out"));
}

#[test]
fn a_name_held_by_another_connected_node_is_refused_and_free_once_it_leaves() {
    let mut h = Harness::new();
    let first = reg("gpu-1", 1);
    let holder = first.node_id;
    let first = h.s.admit_node(first).unwrap();
    h.node(S1, first, 1);
    let err = h.s.admit_node(reg("gpu-1", 1)).unwrap_err();
    assert!(
        matches!(&err, Error::NodeNameTaken { name, holder: h } if name == "gpu-1" && *h == holder),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    // The same node reconnecting keeps its name.
    let mut again = reg("gpu-1", 1);
    again.node_id = holder;
    assert!(h.s.admit_node(again).is_ok());
    // Another name is fine; once the holder left, so is its name.
    assert!(h.s.admit_node(reg("gpu-2", 1)).is_ok());
    h.s.node_gone(S1, h.now);
    assert!(h.s.admit_node(reg("gpu-1", 1)).is_ok());
}

#[test]
fn a_revoked_node_is_cut_off_its_attempts_requeued_and_it_may_not_register_again() {
    let mut h = Harness::new();
    let registration = reg("rogue", 2);
    let rogue = registration.node_id;
    h.node(S1, registration, 2);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    assert_eq!(assigned(&h.effects(), S1).len(), 2);
    h.node(S2, reg("good", 2), 2);

    assert_eq!(h.s.find_node("rogue"), Some((rogue, "rogue".to_owned())));
    assert_eq!(h.s.revoke_node(rogue, h.now), (true, 2));
    let e = h.effects();
    assert_eq!(e.disconnect, [S1], "its stream is closed");
    let mut moved = assigned(&e, S2);
    moved.sort();
    let mut expected: Vec<_> = ids.iter().map(|id| (*id, Attempt(2))).collect();
    expected.sort();
    assert_eq!(moved, expected, "requeued as the next attempt elsewhere");

    // Late reports from the revoked session are refused and counted.
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    assert_eq!(h.s.stats().revoked_node_refusals, 1);
    assert_eq!(h.s.stats().stale_events_refused, 0);
    // It may not come back, with any name.
    let mut back = reg("rogue-2", 1);
    back.node_id = rogue;
    let err = h.s.admit_node(back).unwrap_err();
    assert!(
        matches!(err, Error::NodeRevoked(id) if id == rogue),
        "{err}"
    );
    assert_eq!(h.s.stats().revoked_node_refusals, 2);
    // Revoking a node that is not connected still bars it.
    let absent = NodeId::new();
    assert_eq!(h.s.revoke_node(absent, h.now), (false, 0));
    let mut later = reg("later", 1);
    later.node_id = absent;
    assert!(h.s.admit_node(later).is_err());
}
