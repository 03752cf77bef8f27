//! Dispatch: credits, slots, spreading, labels and handlers, why a task waits, classes, stats and the compact spec.

use super::*;

#[test]
fn assignments_never_exceed_granted_credits() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 2);
    h.submit((0..5).map(|_| TaskSpec::call("noop", "")).collect());
    let e = h.effects();
    assert_eq!(assigned(&e, S1).len(), 2);
    // Nothing more until the node grants again.
    assert!(assigned(&h.effects(), S1).is_empty());
    h.s.credits(S1, 1, h.now);
    assert_eq!(assigned(&h.effects(), S1).len(), 1);
    // Grants past the free slots are capped at the slots not in use.
    h.s.credits(S1, 100, h.now);
    assert_eq!(assigned(&h.effects(), S1).len(), 1);
    let info = &h.s.nodes(h.now.instant)[0];
    assert_eq!((info.slots_used, info.slots_free), (4, 0));
}

/// A node grants a freed slot as soon as it takes the attempt's `Finished`;
/// the grant may be applied before that `Finished` is. The credit is kept
/// until the slot is free here too, never dropped: a dropped credit is one
/// the node counts as granted, so it would never grant it again.
#[test]
fn a_grant_applied_before_its_finished_is_kept_until_the_slot_frees() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let ids = h.submit((0..3).map(|_| TaskSpec::call("noop", "")).collect());
    assert_eq!(assigned(&h.effects(), S1), [(ids[0], Attempt(1))]);
    h.event(S1, ids[0], 1, NodeEventBody::Started);
    h.s.credits(S1, 1, h.now);
    // The slot is still in use here: nothing yet.
    assert!(assigned(&h.effects(), S1).is_empty());
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    assert_eq!(assigned(&h.effects(), S1), [(ids[1], Attempt(1))]);
    // And again, for every task: no credit is ever lost on the way.
    h.s.credits(S1, 1, h.now);
    h.finish(S1, ids[1], 1, Outcome::Succeeded);
    assert_eq!(assigned(&h.effects(), S1), [(ids[2], Attempt(1))]);
}

/// A node's default prefetch (256 per slot, at least 1,024) may exceed `--max-node-slots`:
/// the coordinator caps what it sends, not what it counts. Every credit the
/// node granted is used in the end, without another grant, as the node
/// expects (it grants again only once its window is used).
#[test]
fn credits_past_a_capped_prefetch_are_used_later_not_dropped() {
    let mut h = Harness::new();
    let mut greedy = reg("n1", 1);
    greedy.prefetch = 2_000;
    let greedy = h.s.admit_node(greedy).unwrap();
    assert_eq!(greedy.prefetch, 1024, "capped at max_node_slots");
    h.node(S1, greedy, 1 + 2_000);
    let ids = h.submit((0..2_001).map(|_| TaskSpec::call("noop", "")).collect());
    let first = assigned(&h.effects(), S1);
    assert_eq!(
        first.len(),
        1 + 1024,
        "at most its slot and the capped prefetch"
    );
    let mut all = first.len();
    for (id, _) in first {
        h.finish(S1, id, 1, Outcome::Succeeded);
        all += assigned(&h.effects(), S1).len();
    }
    assert_eq!(all, ids.len(), "every granted credit was used");
}

#[test]
fn multi_slot_tasks_use_that_many_credits() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 3);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").slots(2),
        TaskSpec::call("noop", "").slots(2),
    ]);
    let e = h.effects();
    assert_eq!(assigned(&e, S1), [(ids[0], Attempt(1))]);
    assert_eq!(h.s.nodes(h.now.instant)[0].slots_free, 1);
}

#[test]
fn work_is_spread_round_robin_over_nodes() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 4);
    h.node(S2, reg("n2", 4), 4);
    h.submit((0..4).map(|_| TaskSpec::call("noop", "")).collect());
    let e = h.effects();
    assert_eq!((assigned(&e, S1).len(), assigned(&e, S2).len()), (2, 2));
}

#[test]
fn tasks_go_only_to_nodes_with_their_labels_and_handlers() {
    let mut h = Harness::new();
    h.node(S1, reg("plain", 4), 4);
    let mut gpu = reg("gpu", 4);
    gpu.labels.insert("gpu".into(), "1".into());
    gpu.handlers = vec!["train".into()];
    h.node(S2, gpu, 4);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").label("gpu", "1"),
        TaskSpec::call("train", ""),
        TaskSpec::exec(["true"]).label("gpu", "1"),
    ]);
    let e = h.effects();
    assert!(assigned(&e, S1).is_empty());
    let on_gpu: Vec<TaskId> = assigned(&e, S2).iter().map(|(t, _)| *t).collect();
    assert_eq!(on_gpu, [ids[1], ids[2]]);
    // noop+gpu=1: the gpu node has the label but not the handler.
    assert_eq!(
        h.s.pending_reason(ids[0]).unwrap(),
        "no connected node has all of the labels gpu=1"
    );
}

#[test]
fn pending_reason_says_why_a_task_waits() {
    let mut h = Harness::new();
    let ids = h.submit(vec![
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", "").label("gpu", "1"),
        TaskSpec::call("noop", "").slots(4),
        TaskSpec::call("noop", ""),
    ]);
    h.effects();
    assert_eq!(h.s.pending_reason(ids[0]).unwrap(), "no nodes connected");
    h.node(S1, reg("n1", 2), 1);
    h.effects();
    assert_eq!(
        h.s.pending_reason(ids[1]).unwrap(),
        "no connected node has label gpu=1"
    );
    assert_eq!(
        h.s.pending_reason(ids[2]).unwrap(),
        "needs 4 slots; largest node has 2"
    );
    assert_eq!(
        h.s.pending_reason(ids[3]).unwrap(),
        "waiting for a free slot"
    );
    assert_eq!(
        h.s.pending_reason(ids[0]),
        None,
        "assigned tasks have no pending reason"
    );
}

#[test]
fn a_call_no_connected_node_serves_waits_for_one_up_to_the_schedule_timeout() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let ids = h.submit(vec![TaskSpec::call("nope", ""), TaskSpec::call("late", "")]);
    h.effects();
    // It waits, saying why at once.
    assert_eq!(h.record(ids[0]).state, TaskState::Queued);
    let first = h.events(ids[0]);
    let EventBody::State { reason, .. } = &first[0].body else {
        panic!("a state event first");
    };
    assert!(
        reason.starts_with("waiting: no connected node serves handler 'nope' (known: noop, sleep)")
            && reason.contains("within 60s (schedule timeout)"),
        "{reason}"
    );
    // A node serving `late` comes (a worker back from a restart): it runs.
    let back = NodeRegistration {
        handlers: vec!["late".into()],
        ..reg("worker", 1)
    };
    h.s.heartbeat(S1, h.now);
    h.advance(Duration::from_secs(4));
    h.node(S2, back, 1);
    assert_eq!(assigned(&h.effects(), S2), [(ids[1], Attempt(1))]);
    h.event(S2, ids[1], 1, NodeEventBody::Started);
    // Past the timeout, the other fails, saying why.
    for _ in 0..60 {
        h.s.heartbeat(S1, h.now);
        h.s.heartbeat(S2, h.now);
        h.advance(Duration::from_secs(1));
    }
    h.effects();
    let record = h.record(ids[0]);
    assert_eq!(record.state, TaskState::Failed);
    assert_eq!(
        record.error,
        "unknown handler 'nope': no connected node served it within 60s (schedule timeout; known: late, noop, sleep)"
    );
    assert!(!h.s.is_live(ids[0]));
    assert_eq!(h.record(ids[1]).state, TaskState::Running, "unaffected");
}

#[test]
fn a_call_a_node_took_then_lost_waits_under_its_retry_policy_not_the_schedule_timeout() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let id = h.submit(vec![TaskSpec::call("late", "")])[0];
    h.effects();
    let worker = NodeRegistration {
        handlers: vec!["late".into()],
        ..reg("worker", 1)
    };
    h.node(S2, worker, 1);
    assert_eq!(assigned(&h.effects(), S2), [(id, Attempt(1))]);
    h.event(S2, id, 1, NodeEventBody::Started);
    h.effects();
    // Its node goes and does not come back; past the schedule timeout no
    // connected node serves `late` again.
    h.s.node_gone(S2, h.now);
    for _ in 0..70 {
        h.s.heartbeat(S1, h.now);
        h.advance(Duration::from_secs(1));
    }
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt),
        (TaskState::Queued, Attempt(2))
    );
}

#[test]
fn a_call_may_set_its_own_schedule_timeout_or_wait_forever() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let ids = h.submit(vec![
        TaskSpec::call("nope", "").schedule_timeout(Duration::from_secs(2)),
        TaskSpec::call("nope", "").schedule_timeout(Duration::ZERO),
    ]);
    h.effects();
    for _ in 0..3 {
        h.s.heartbeat(S1, h.now);
        h.advance(Duration::from_secs(1));
    }
    h.effects();
    let record = h.record(ids[0]);
    assert_eq!(record.state, TaskState::Failed);
    assert!(
        record.error.contains("within 2s (schedule timeout"),
        "{}",
        record.error
    );
    // Zero: it waits as long as it takes (past the coordinator's 60 s).
    for _ in 0..90 {
        h.s.heartbeat(S1, h.now);
        h.advance(Duration::from_secs(1));
    }
    h.effects();
    assert_eq!(h.record(ids[1]).state, TaskState::Queued);
}

#[test]
fn unknown_handler_without_nodes_stays_queued() {
    let mut h = Harness::new();
    let ids = h.submit(vec![TaskSpec::call("nope", "")]);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Queued);
    h.node(S1, reg("n1", 2), 2);
    h.effects();
    assert_eq!(
        h.s.pending_reason(ids[0]).unwrap(),
        "no connected node serves handler 'nope'"
    );
}

#[test]
fn submit_past_max_queued_is_refused_whole() {
    let mut h = Harness::with(SchedulerConfig {
        max_queued: 3,
        ..config()
    });
    h.submit(vec![TaskSpec::call("noop", ""); 2]);
    let batch = vec![
        (TaskId::new(), TaskSpec::call("noop", "")),
        (TaskId::new(), TaskSpec::call("noop", "")),
    ];
    let err = h.s.submit(batch, h.now).unwrap_err();
    assert!(matches!(err, Error::QueueFull { queued: 4, max: 3 }));
    assert_eq!(h.s.stats().tasks[0], (TaskState::Queued, 2));
}

#[test]
fn dispatch_skips_classes_no_node_can_run() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    // Many tasks no node can take, then one it can: it is found at once.
    h.submit(
        (0..1000)
            .map(|_| TaskSpec::call("noop", "").label("gpu", "1"))
            .collect(),
    );
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    let e = h.effects();
    assert_eq!(assigned(&e, S1), [(id, Attempt(1))]);
    assert_eq!(h.s.queue.classes.len(), 2);
}

#[test]
fn cluster_stats_count_tasks_by_state() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let ids = h.submit(vec![TaskSpec::call("noop", ""); 3]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.s.cancel(ids[1], "", h.now);
    h.effects();
    let stats = h.s.stats();
    let count = |s: TaskState| stats.tasks.iter().find(|(t, _)| *t == s).map(|(_, c)| *c);
    assert_eq!(count(TaskState::Succeeded), Some(1));
    assert_eq!(count(TaskState::Cancelled), Some(1));
    assert_eq!(count(TaskState::Assigned), Some(0));
    assert_eq!(count(TaskState::Queued), Some(1));
    assert_eq!((stats.nodes, stats.slots, stats.slots_free), (1, 1, 0));
}

#[test]
fn a_queued_task_stays_small_in_the_scheduler() {
    // The queue entry is a bare TaskId; the live entry keeps only what its
    // spec does not share with its class (a small input inline), and its
    // slab slot adds the id. The scale bench's bytes per queued task rest
    // on these figures: grow them only on purpose.
    assert_eq!(std::mem::size_of::<TaskId>(), 16);
    let size = std::mem::size_of::<task::LiveTask>();
    assert!(size <= 72, "LiveTask is {size} bytes");
    assert!(std::mem::size_of::<task::LiveSpec>() <= 24);
}

#[test]
fn specs_kept_compact_come_back_whole_in_records_assignments_and_after_a_restart() {
    let mut h = Harness::new();
    let long = "an input too long to be kept inline: ".repeat(3);
    let specs = vec![
        TaskSpec::call("noop", "first"),
        TaskSpec::call("noop", "7"),
        TaskSpec::call("noop", long.clone()),
        TaskSpec::call("noop", "").name("named"),
        TaskSpec::call("noop", "t").timeout(Duration::from_secs(3)),
        TaskSpec::call("noop", "a").max_attempts(5),
        TaskSpec::exec(["echo", "hi"]).stdin("in"),
    ];
    let ids = h.submit(specs.clone());
    h.effects();
    for (id, spec) in ids.iter().zip(&specs) {
        assert_eq!(*h.record(*id).spec, *spec);
    }
    let mut h = h.restart(Duration::from_secs(1));
    h.node(S1, reg("n1", 10), 10);
    let effects = h.effects();
    let sent: Vec<(TaskId, TaskSpec)> = effects.nodes[&S1]
        .assign
        .iter()
        .map(|a| (a.task_id, TaskSpec::clone(&a.spec)))
        .collect();
    let expected: Vec<(TaskId, TaskSpec)> = ids.iter().copied().zip(specs.clone()).collect();
    assert_eq!(sent, expected);
    h.finish(S1, ids[2], 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(*h.record(ids[2]).spec, specs[2]);
}

#[test]
fn free_slots_never_count_prefetch_credits() {
    let mut h = Harness::new();
    let mut with_prefetch = reg("n1", 2);
    with_prefetch.prefetch = 2;
    // Granted its slots and its prefetch: 4 credits for 2 slots.
    h.node(S1, with_prefetch, 4);
    let stats = h.s.stats();
    assert_eq!((stats.slots, stats.slots_free), (2, 2));
    h.submit(vec![TaskSpec::call("noop", "")]);
    h.effects();
    let stats = h.s.stats();
    assert_eq!((stats.slots, stats.slots_free), (2, 1));
}

/// A task submitted and assigned in one batch is sent with the very spec
/// its Submit's record holds (shared, not rebuilt from its class); one
/// assigned in a later batch gets its spec rebuilt. Either way it is the
/// spec submitted, input and policy included.
#[test]
fn an_assignment_in_its_submits_batch_shares_the_records_spec_and_later_ones_rebuild_it() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 1);
    let spec = |input: &'static str| {
        TaskSpec::call("noop", input)
            .priority(7)
            .fair_key("team-a", 2)
            .concurrency("user-42", 5, weft_proto::OverLimit::Queue)
            .name("job")
    };
    let ids = h.submit(vec![spec("first"), spec("second")]);
    let e = h.effects();
    let sent = &e.nodes[&S1].assign;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].task_id, ids[0]);
    let written = e
        .records
        .iter()
        .find_map(|r| match r {
            Record::Task(t) if t.id == ids[0] => Some(t),
            _ => None,
        })
        .expect("the first task's record");
    assert_eq!(written.state, TaskState::Assigned);
    assert!(Arc::ptr_eq(&sent[0].spec, &written.spec), "shared");
    assert_eq!(*sent[0].spec, spec("first"));
    h.s.credits(S1, 1, h.now);
    let e = h.effects();
    let sent = &e.nodes[&S1].assign;
    assert_eq!(sent[0].task_id, ids[1]);
    assert_eq!(
        *sent[0].spec,
        spec("second"),
        "rebuilt from its class whole"
    );
}

/// Tasks of one class share their class's resources map (the class
/// compares them equal), whichever batch they are assigned in, so each
/// task's own copy is let go at Submit.
#[test]
fn tasks_of_a_class_share_one_resources_map() {
    let mut h = Harness::new();
    let mut node = reg("n1", 4);
    node.resources.insert("cpu".into(), 8);
    h.node(S1, node, 2);
    let spec = |input: &'static str| TaskSpec::call("noop", input).resource("cpu", 2);
    let ids = h.submit(vec![spec("a"), spec("b"), spec("c")]);
    let e = h.effects();
    let sent = &e.nodes[&S1].assign;
    assert_eq!(sent.len(), 2);
    h.s.credits(S1, 1, h.now);
    let later = h.effects();
    let third = &later.nodes[&S1].assign[0];
    assert_eq!(third.task_id, ids[2]);
    for assignment in [&sent[1], third] {
        assert_eq!(assignment.spec.resources.get("cpu"), Some(&2));
        assert!(
            std::ptr::eq(&*assignment.spec.resources, &*sent[0].spec.resources),
            "one map"
        );
    }
}

/// A committed batch's record buffer, given back emptied, is what a later
/// batch's records are written into (its pages are mapped already); one a
/// burst grew far past a usual batch is let go, not kept.
#[test]
fn a_committed_batchs_record_buffer_holds_a_later_batchs_records_and_a_bursts_is_let_go() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 1);
    let mut committed = h.effects().records;
    committed.reserve(1000);
    let (kept, capacity) = (committed.as_ptr(), committed.capacity());
    h.s.recycle_records(committed);
    // The batch being built took its room before the buffer came back;
    // the one after it is written into the buffer.
    let _ = h.effects();
    h.submit(vec![TaskSpec::call("noop", "x")]);
    let e = h.effects();
    assert_eq!(e.records.as_ptr(), kept);
    assert_eq!(e.records.capacity(), capacity);
    assert!(
        !e.records.is_empty(),
        "the batch's own records, none left over"
    );
    assert!(
        e.records
            .iter()
            .all(|r| matches!(r, Record::Task(_) | Record::Event(_)))
    );

    h.s.recycle_records(Vec::with_capacity(100_000));
    let _ = h.effects();
    assert!(h.effects().records.capacity() < 100_000, "let go");
}

/// A task assigned in its Submit's batch shares its record's spec, and
/// that spec's input is a copy of its own: a decoded Submit's specs slice
/// the request's buffer, which a long-lived task must not keep (a
/// megabyte of request for ten bytes of input).
#[test]
fn a_task_assigned_in_its_submits_batch_keeps_no_part_of_the_request() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 1);
    let request = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let buffer = request.as_ptr() as usize..request.as_ptr() as usize + request.len();
    let specs = vec![
        TaskSpec::call("noop", request.slice(0..10)),
        TaskSpec::call("noop", request.slice(10..20)),
    ];
    drop(request);
    let ids = h.submit(specs);
    let e = h.effects();
    assert_eq!(
        e.nodes[&S1].assign[0].task_id, ids[0],
        "assigned in its batch"
    );
    for id in &ids {
        let live = h.s.tasks.get(id).expect("live");
        let spec = live.spec.to_spec(h.s.queue.example(live.class));
        let TaskKind::Call(call) = &spec.kind else {
            panic!("a call")
        };
        assert_eq!(&call.input[..], &[b'x'; 10][..]);
        let at = call.input.as_ptr() as usize;
        assert!(
            !buffer.contains(&at),
            "task {id} keeps a slice of the request"
        );
    }
}
