//! After a coordinator restart: restored attempts claimed, requeued, or recognised as redelivered.

use super::*;

/// Node `n1` on S1 runs `ids[0]` (started) of two submitted tasks; the
/// other stays queued. Returns the harness, the node's registration and ids.
fn one_running_one_queued() -> (Harness, NodeRegistration, Vec<TaskId>) {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    h.event(S1, ids[0], 1, NodeEventBody::Started);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    (h, first, ids)
}

#[test]
fn after_a_restart_a_running_attempt_claimed_by_its_node_carries_on() {
    let (h, first, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1))];
    h.node(S2, again, 0);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    assert_eq!(h.s.stats().recovered_attempts, 1);
    // Well past the grace: nothing is requeued, it still runs.
    for _ in 0..4 {
        h.advance(Duration::from_secs(4));
        h.s.heartbeat(S2, h.now);
        h.effects();
    }
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    h.finish(S2, ids[0], 1, Outcome::Succeeded);
    h.s.credits(S2, 1, h.now);
    let e = h.effects();
    let done = h.record(ids[0]);
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0)
    );
    assert_eq!(done.last_outcome, Some(Outcome::Succeeded));
    assert_eq!(h.s.stats().stale_events_refused, 0);
    // The task that was queued before the restart is still there and runs.
    assert_eq!(assigned(&e, S2), [(ids[1], Attempt(1))]);
}

#[test]
fn after_a_restart_an_absent_nodes_attempts_are_requeued_only_after_the_grace() {
    let (h, _, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    h.effects();
    // Past the heartbeat timeout (5 s) but inside the restart grace (10 s).
    h.advance(Duration::from_secs(9));
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    h.advance(Duration::from_secs(1));
    h.effects();
    let record = h.record(ids[0]);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
}

#[test]
fn after_a_restart_a_node_that_does_not_list_its_attempt_has_it_requeued_at_once() {
    let (h, first, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    h.node(S2, first, 0);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    let record = h.record(ids[0]);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
    assert!(h.s.orphans.is_empty(), "no orphan left waiting");
}

#[test]
fn a_result_redelivered_after_a_restart_is_ignored_quietly() {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(id, Attempt(1))];
    h.node(S2, again, 1);
    h.finish(S2, id, 1, Outcome::Succeeded);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    assert_eq!(h.s.stats().stale_events_refused, 0);
}

fn line(seq: u64) -> NodeEventBody {
    NodeEventBody::Output {
        stream: OutputStream::Stdout,
        data: Bytes::from(format!("line-{seq}\n")),
        seq,
    }
}

fn output_lines(h: &Harness, id: TaskId) -> Vec<String> {
    h.events(id)
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Output { data, .. } => Some(String::from_utf8_lossy(data).trim().to_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn after_a_restart_output_chunks_sent_again_are_dropped_by_seq_and_a_gap_is_counted() {
    let (mut h, first, ids) = one_running_one_queued();
    for seq in 0..3 {
        h.event(S1, ids[0], 1, line(seq));
    }
    h.effects();
    // Read, then the coordinator dies before committing it.
    h.event(S1, ids[0], 1, line(3));
    drop(h.s.take_effects(h.now));
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1))];
    h.node(S2, again.clone(), 0);
    // The node sends again what it kept (here from chunk 1), in order,
    // then its new output; chunk 5 it no longer had.
    for seq in [1, 2, 3, 4, 6] {
        h.event(S2, ids[0], 1, line(seq));
    }
    h.effects();
    assert_eq!(
        output_lines(&h, ids[0]),
        ["line-0", "line-1", "line-2", "line-3", "line-4", "line-6"]
    );
    assert_eq!(h.s.stats().output_chunks_missed, 1);

    // Restored again: the next chunk expected follows the last one stored,
    // past the gap, so nothing is repeated.
    let mut h = h.restart(Duration::from_secs(1));
    let s3 = SessionId(3);
    h.node(s3, again, 0);
    for seq in [4, 5, 6, 7] {
        h.event(s3, ids[0], 1, line(seq));
    }
    h.finish(s3, ids[0], 1, Outcome::Succeeded);
    // Sent again once more after its result was recorded: ignored quietly.
    h.event(s3, ids[0], 1, line(7));
    let e = h.effects();
    assert_eq!(
        output_lines(&h, ids[0]),
        [
            "line-0", "line-1", "line-2", "line-3", "line-4", "line-6", "line-7"
        ]
    );
    assert!(cancels(&e, s3).is_empty());
    assert_eq!(
        (
            h.s.stats().stale_events_refused,
            h.s.stats().output_chunks_missed
        ),
        (0, 0),
        "counted since this restart"
    );
    assert_eq!(h.record(ids[0]).state, TaskState::Succeeded);
}

/// A client's cancel of a running task is written with its record: after
/// a restart the node's (cancelled) result ends the task CANCELLED, not
/// run again as a node-side cancel would be.
#[test]
fn a_cancel_of_a_running_task_survives_a_restart() {
    let mut h = Harness::new();
    let node = reg("n1", 1);
    let node_id = node.node_id;
    h.node(S1, node.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("sleep", "").max_attempts(3)])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.effects();
    assert!(h.s.cancel(id, "not needed", h.now));
    assert_eq!(cancels(&h.effects(), S1), [(id, Attempt(1))]);
    // The coordinator restarts before the node's Cancelled result arrives.
    let mut back = h.restart(Duration::from_secs(1));
    back.node(
        S1,
        NodeRegistration {
            node_id,
            running: vec![(id, Attempt(1))],
            ..node
        },
        1,
    );
    back.effects();
    back.finish(S1, id, 1, Outcome::Cancelled);
    back.effects();
    let record = back.record(id);
    assert_eq!(
        (record.state, record.attempt),
        (TaskState::Cancelled, Attempt(1))
    );
}

#[test]
fn a_chunk_larger_than_readers_plan_for_is_stored_in_pieces_of_its_number() {
    let (mut h, first, ids) = one_running_one_queued();
    let max = weft_proto::limits::MAX_OUTPUT_CHUNK;
    let big: Vec<u8> = (0..3 * max + 10).map(|n| (n % 251) as u8).collect();
    h.event(
        S1,
        ids[0],
        1,
        NodeEventBody::Output {
            stream: OutputStream::Stdout,
            data: Bytes::from(big.clone()),
            seq: 0,
        },
    );
    h.effects();
    let pieces = |h: &Harness| -> Vec<(usize, Option<u64>)> {
        h.events(ids[0])
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Output { data, chunk, .. } => Some((data.len(), *chunk)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        pieces(&h),
        [
            (max, Some(0)),
            (max, Some(0)),
            (max, Some(0)),
            (10, Some(0))
        ]
    );
    let stored: Vec<u8> = h
        .events(ids[0])
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Output { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(stored, big, "every byte, in order");
    // After a restart the node sends the chunk again, then the next: the
    // big one is known by its number and not stored twice.
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1))];
    h.node(S2, again, 0);
    h.event(
        S2,
        ids[0],
        1,
        NodeEventBody::Output {
            stream: OutputStream::Stdout,
            data: Bytes::from(big),
            seq: 0,
        },
    );
    h.event(S2, ids[0], 1, line(1));
    h.effects();
    assert_eq!(pieces(&h).len(), 5);
    assert_eq!(h.s.stats().output_chunks_missed, 0);
}

#[test]
fn chunk_numbers_at_the_top_of_their_range_are_taken_once_and_never_wrap() {
    let (mut h, first, ids) = one_running_one_queued();
    let at = |seq: u64| NodeEventBody::Output {
        stream: OutputStream::Stdout,
        data: Bytes::from(format!("at-{}\n", u64::MAX - seq)),
        seq,
    };
    h.event(S1, ids[0], 1, line(0));
    h.event(S1, ids[0], 1, at(u64::MAX - 1));
    h.event(S1, ids[0], 1, at(u64::MAX - 1));
    // The last number: no node counting from 0 gets there; dropped.
    h.event(S1, ids[0], 1, at(u64::MAX));
    h.effects();
    assert_eq!(output_lines(&h, ids[0]), ["line-0", "at-1"]);
    // Restored, the attempt's next chunk is still past the last one taken.
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1))];
    h.node(S2, again, 0);
    h.event(S2, ids[0], 1, at(u64::MAX - 1));
    h.effects();
    assert_eq!(output_lines(&h, ids[0]), ["line-0", "at-1"]);
}
