//! Scheduling policy: priorities and aging, fair keys and weights,
//! concurrency keys, rate limits, resources, the limits an admin sets.

use weft_proto::policy::{Limit, LimitKind, OverLimit, RateLimit};

use super::*;

fn one(h: &mut Harness, session: SessionId) -> Vec<TaskId> {
    let e = h.effects();
    assigned(&e, session)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Finishes `id` (attempt 1) on `session` and grants one credit back.
fn done(h: &mut Harness, session: SessionId, id: TaskId) {
    h.finish(session, id, 1, Outcome::Succeeded);
    h.s.credits(session, 1, h.now);
}

fn call(input: &str) -> TaskSpec {
    TaskSpec::call("noop", input.to_owned())
}

fn inputs(h: &Harness, ids: &[TaskId]) -> Vec<String> {
    ids.iter()
        .map(|id| match &h.record(*id).spec.kind {
            weft_proto::TaskKind::Call(c) => String::from_utf8_lossy(&c.input).into_owned(),
            weft_proto::TaskKind::Exec(_) => String::new(),
        })
        .collect()
}

/// Runs a 1-slot node until nothing is left, answering the inputs in the
/// order they were assigned.
fn drain_order(h: &mut Harness, max: usize) -> Vec<String> {
    let mut order = Vec::new();
    for _ in 0..max {
        let got = one(h, S1);
        let Some(id) = got.first().copied() else {
            break;
        };
        order.extend(inputs(h, &[id]));
        done(h, S1, id);
    }
    order
}

#[test]
fn a_higher_priority_is_assigned_first_then_the_oldest() {
    let mut h = Harness::new();
    h.submit(vec![
        call("low").priority(2),
        call("mid-1"),
        call("high").priority(9),
        call("mid-2"),
    ]);
    h.node(S1, reg("n1", 1), 1);
    assert_eq!(drain_order(&mut h, 10), ["high", "mid-1", "mid-2", "low"]);
}

#[test]
fn aging_lets_a_low_priority_task_run_under_a_constant_stream_of_high_priority_work() {
    let aging = Duration::from_secs(10);
    let mut h = Harness::with(SchedulerConfig {
        priority_aging: aging,
        ..config()
    });
    h.node(S1, reg("n1", 1), 1);
    let low = h.submit(vec![call("low").priority(1)])[0];
    // A busy node: something always runs, and a new priority-9 task is
    // always waiting when the slot frees.
    let mut running = h.submit(vec![call("high").priority(9)])[0];
    assert_eq!(one(&mut h, S1), [running]);
    let mut waited = Duration::ZERO;
    loop {
        h.submit(vec![call("high").priority(9)]);
        h.advance(Duration::from_secs(1));
        waited += Duration::from_secs(1);
        done(&mut h, S1, running);
        let got = one(&mut h, S1);
        assert_eq!(got.len(), 1);
        if got[0] == low {
            break;
        }
        running = got[0];
        assert!(waited < aging * 9, "the low-priority task starved");
    }
    // 1 + 8 levels at one per 10 s: it ties with 9 after 80 s, and wins
    // the tie as the oldest.
    assert!(waited >= aging * 8, "it ran after only {waited:?}");
}

#[test]
fn without_aging_priority_is_strict() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let low = h.submit(vec![call("low").priority(1)])[0];
    let mut running = h.submit(vec![call("high").priority(9)])[0];
    assert_eq!(one(&mut h, S1), [running]);
    for _ in 0..100 {
        h.submit(vec![call("high").priority(9)]);
        h.advance(Duration::from_secs(1));
        done(&mut h, S1, running);
        let got = one(&mut h, S1);
        assert_ne!(got[0], low);
        running = got[0];
    }
    assert_eq!(
        h.s.pending_reason(low).as_deref(),
        Some("waiting for a free slot")
    );
}

#[test]
fn fair_keys_interleave_and_a_late_key_gets_its_share_at_once() {
    let mut h = Harness::new();
    h.submit(
        (0..100)
            .map(|i| call(&format!("a{i}")).fair_key("team-a", 1))
            .collect(),
    );
    h.node(S1, reg("n1", 1), 1);
    let first = drain_order(&mut h, 10);
    assert!(first.iter().all(|i| i.starts_with('a')));
    // Team b arrives late with 5: it does not wait behind a's backlog,
    // nor does it run 10 in a row for the credit a has "used".
    h.submit(
        (0..5)
            .map(|i| call(&format!("b{i}")).fair_key("team-b", 1))
            .collect(),
    );
    let next: Vec<String> = drain_order(&mut h, 10)
        .into_iter()
        .map(|i| i[..1].to_owned())
        .collect();
    assert_eq!(next, ["b", "a", "b", "a", "b", "a", "b", "a", "b", "a"][..]);
}

#[test]
fn fair_weights_share_slots_in_proportion() {
    let mut h = Harness::new();
    h.submit(
        (0..60)
            .map(|i| call(&format!("a{i}")).fair_key("heavy", 3))
            .collect(),
    );
    h.submit(
        (0..60)
            .map(|i| call(&format!("b{i}")).fair_key("light", 1))
            .collect(),
    );
    h.node(S1, reg("n1", 1), 1);
    let order = drain_order(&mut h, 40);
    let heavy = order.iter().filter(|i| i.starts_with('a')).count();
    assert_eq!((heavy, 40 - heavy), (30, 10));
}

#[test]
fn priority_comes_before_fairness() {
    let mut h = Harness::new();
    h.submit(vec![
        call("a").fair_key("a", 1000),
        call("b").fair_key("b", 1).priority(7),
    ]);
    h.node(S1, reg("n1", 1), 1);
    assert_eq!(drain_order(&mut h, 5), ["b", "a"]);
}

fn keyed(input: &str, key: &str, max: u32, on_limit: OverLimit) -> TaskSpec {
    let mut spec = call(input);
    spec.concurrency = Some(weft_proto::policy::ConcurrencyLimit {
        key: key.into(),
        max_running: max,
        on_limit,
    });
    spec
}

#[test]
fn a_concurrency_key_caps_running_tasks_and_every_attempt_end_frees_a_slot() {
    let mut h = Harness::new();
    let ids = h.submit(
        (0..6)
            .map(|i| keyed(&format!("t{i}"), "user-42", 2, OverLimit::Queue).max_attempts(3))
            .collect(),
    );
    h.node(S1, reg("n1", 8), 8);
    let got = one(&mut h, S1);
    assert_eq!(got, ids[..2]);
    assert_eq!(
        h.s.pending_reason(ids[2]).as_deref(),
        Some("concurrency key user-42 at its limit 2")
    );
    // Success frees a slot.
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    assert_eq!(one(&mut h, S1), [ids[2]]);
    // A failure that is retried frees it too (the retry waits its turn).
    h.finish(S1, ids[1], 1, Outcome::Failed);
    assert_eq!(one(&mut h, S1), [ids[3]]);
    // A cancel frees it once the node reports.
    h.s.cancel(ids[2], "", h.now);
    h.finish(S1, ids[2], 1, Outcome::Cancelled);
    assert_eq!(one(&mut h, S1), [ids[4]]);
    // A lost node frees them all.
    h.node(S2, reg("n2", 8), 8);
    h.lose(S1);
    let again = one(&mut h, S2);
    assert_eq!(again.len(), 2, "{again:?}");
}

#[test]
fn cancel_newest_cancels_a_task_past_the_limit_at_once() {
    let mut h = Harness::new();
    let ids = h.submit(
        (0..3)
            .map(|i| keyed(&format!("t{i}"), "k", 2, OverLimit::CancelNewest))
            .collect(),
    );
    h.effects();
    let record = h.record(ids[2]);
    assert_eq!(record.state, TaskState::Cancelled);
    assert!(
        record.error.contains("concurrency key k at its limit 2"),
        "{}",
        record.error
    );
    h.node(S1, reg("n1", 8), 8);
    assert_eq!(one(&mut h, S1), ids[..2]);
}

#[test]
fn cancel_oldest_cancels_the_oldest_and_the_new_one_takes_its_slot() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 8), 8);
    let first = h.submit(vec![keyed("a", "k", 1, OverLimit::CancelOldest)])[0];
    assert_eq!(one(&mut h, S1), [first]);
    let second = h.submit(vec![keyed("b", "k", 1, OverLimit::CancelOldest)])[0];
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(first, Attempt(1))]);
    assert!(assigned(&e, S1).is_empty(), "waits for the slot to free");
    h.finish(S1, first, 1, Outcome::Cancelled);
    assert_eq!(one(&mut h, S1), [second]);
    let record = h.record(first);
    assert_eq!(record.state, TaskState::Cancelled);
    assert!(record.error.contains("cancel_oldest"), "{}", record.error);
}

#[test]
fn cancel_oldest_cancels_nothing_up_to_its_limit_and_one_standing_task_per_task_over_it() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 8), 8);
    let spec = |name: &str| keyed(name, "k", 3, OverLimit::CancelOldest);
    let ids = h.submit(vec![spec("a"), spec("b"), spec("c")]);
    let e = h.effects();
    assert!(
        cancels(&e, S1).is_empty(),
        "at its limit, nothing is cancelled"
    );
    let placed: Vec<TaskId> = assigned(&e, S1).into_iter().map(|(id, _)| id).collect();
    assert_eq!(placed, ids);
    let d = h.submit(vec![spec("d")])[0];
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(ids[0], Attempt(1))]);
    // The first is still on its node, being cancelled: the next over the
    // limit takes the oldest of those still standing.
    let e5 = h.submit(vec![spec("e")])[0];
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(ids[1], Attempt(1))]);
    h.finish(S1, ids[0], 1, Outcome::Cancelled);
    h.finish(S1, ids[1], 1, Outcome::Cancelled);
    let mut next = one(&mut h, S1);
    next.sort();
    assert_eq!(next, [d, e5]);
}

#[test]
fn a_key_counts_its_tasks_from_queued_to_final_and_never_a_pending_one() {
    let mut h = Harness::new();
    let spec = |name: &str| keyed(name, "k", 2, OverLimit::CancelNewest);
    let parent = h.submit(vec![call("parent")])[0];
    // Pending behind its parent: not counted against the key.
    let child = h.submit(vec![spec("child").after(parent)])[0];
    let ids = h.submit(vec![spec("a"), spec("b")]);
    h.effects();
    assert_eq!(h.record(child).state, TaskState::Pending);
    assert_eq!(
        h.record(ids[1]).state,
        TaskState::Queued,
        "two queued: at its limit"
    );
    // Over the limit: cancelled as the newest, and not counted after.
    let c = h.submit(vec![spec("c")])[0];
    h.effects();
    assert_eq!(h.record(c).state, TaskState::Cancelled);
    // A pending task cancelled frees nothing; a queued one does.
    h.s.cancel(child, "", h.now);
    let d = h.submit(vec![spec("d")])[0];
    h.effects();
    assert_eq!(h.record(d).state, TaskState::Cancelled, "still two counted");
    h.s.cancel(ids[0], "", h.now);
    let e = h.submit(vec![spec("e")])[0];
    h.effects();
    assert_eq!(h.record(e).state, TaskState::Queued, "one freed, one taken");
    let f = h.submit(vec![spec("f")])[0];
    h.effects();
    assert_eq!(h.record(f).state, TaskState::Cancelled);
}

#[test]
fn a_pending_task_restored_is_counted_once_when_it_is_queued() {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let spec = |name: &str| keyed(name, "k", 1, OverLimit::CancelNewest);
    let parent = h.submit(vec![call("parent")])[0];
    let child = h.submit(vec![spec("child").after(parent)])[0];
    assert_eq!(one(&mut h, S1), [parent]);
    let mut back = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(parent, Attempt(1))];
    back.node(S1, again, 0);
    back.effects();
    // Nothing of the key is counted: a task under it is queued.
    let other = back.submit(vec![spec("other")])[0];
    back.effects();
    assert_eq!(back.record(other).state, TaskState::Queued);
    back.s.cancel(other, "", back.now);
    back.effects();
    // The parent's result releases the child: counted once, at its limit.
    back.finish(S1, parent, 1, Outcome::Succeeded);
    back.effects();
    assert_eq!(back.record(child).state, TaskState::Queued);
    let late = back.submit(vec![spec("late")])[0];
    back.effects();
    assert_eq!(back.record(late).state, TaskState::Cancelled);
    // The child ends: the key is free again.
    back.s.cancel(child, "", back.now);
    back.effects();
    let last = back.submit(vec![spec("last")])[0];
    back.effects();
    assert_eq!(back.record(last).state, TaskState::Queued);
}

#[test]
fn cancel_oldest_on_a_key_first_used_without_it_finds_the_keys_earlier_tasks() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 8), 8);
    // Two tasks under the key with the queue rule, one with another key.
    let queued = h.submit(vec![
        keyed("a", "k", 2, OverLimit::Queue),
        keyed("b", "k", 2, OverLimit::Queue),
        keyed("x", "other", 2, OverLimit::Queue),
    ]);
    h.effects();
    // The first cancel_oldest task at the limit looks them up.
    let c = h.submit(vec![keyed("c", "k", 2, OverLimit::CancelOldest)])[0];
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(queued[0], Attempt(1))]);
    h.finish(S1, queued[0], 1, Outcome::Cancelled);
    assert_eq!(one(&mut h, S1), [c]);
    // Kept from then on: a finished task leaves it, a new one joins it.
    h.finish(S1, queued[1], 1, Outcome::Succeeded);
    let d = h.submit(vec![keyed("d", "k", 2, OverLimit::CancelOldest)])[0];
    let e = h.effects();
    assert!(
        cancels(&e, S1).is_empty(),
        "c and d: at the limit, not over it"
    );
    let f = h.submit(vec![keyed("f", "k", 2, OverLimit::CancelOldest)])[0];
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(c, Attempt(1))]);
    assert_ne!(h.record(d).state, TaskState::Cancelled);
    assert_ne!(h.record(f).state, TaskState::Cancelled);
    assert_ne!(
        h.record(queued[2]).state,
        TaskState::Cancelled,
        "another key"
    );
}

#[test]
fn a_limit_set_by_an_admin_applies_to_a_key_without_a_max_and_a_spec_max_replaces_it() {
    let mut h = Harness::new();
    h.s.set_limit(Limit {
        name: "k".into(),
        kind: LimitKind::MaxRunning(1),
    });
    let ids = h.submit(
        (0..3)
            .map(|i| keyed(&format!("t{i}"), "k", 0, OverLimit::Queue))
            .collect(),
    );
    h.node(S1, reg("n1", 8), 8);
    assert_eq!(one(&mut h, S1), [ids[0]]);
    h.submit(vec![keyed("more", "k", 3, OverLimit::Queue)]);
    assert_eq!(one(&mut h, S1), ids[1..3]);
}

fn rated(input: &str, limit: &str, units: u32) -> TaskSpec {
    let mut spec = call(input);
    spec.rate_limits.push(weft_proto::policy::RateLimitUse {
        name: limit.into(),
        units,
    });
    spec
}

#[test]
fn a_rate_limit_paces_assignments_and_wakes_the_scheduler_for_the_refill() {
    let mut h = Harness::new();
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: LimitKind::Rate(RateLimit::new(2, Duration::from_secs(1), 2).unwrap()),
    });
    let ids = h.submit((0..5).map(|i| rated(&format!("t{i}"), "api", 1)).collect());
    h.node(S1, reg("n1", 8), 8);
    // The bucket starts full: 2 now.
    assert_eq!(one(&mut h, S1), ids[..2]);
    let wake = h.s.next_wakeup().expect("a wakeup for the refill");
    assert_eq!(wake - h.now.instant, Duration::from_millis(500));
    let reason = h.s.pending_reason(ids[2]).unwrap();
    assert!(
        reason.starts_with("rate limit api: next units in"),
        "{reason}"
    );
    h.advance(Duration::from_millis(499));
    assert!(one(&mut h, S1).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(one(&mut h, S1), [ids[2]]);
    h.advance(Duration::from_millis(500));
    assert_eq!(one(&mut h, S1), [ids[3]]);
    let limits = h.s.limits(h.now.instant);
    assert_eq!((limits[0].available, limits[0].waiting), (0, 1));
}

#[test]
fn a_task_taking_more_units_than_its_limits_burst_waits_saying_so_without_waking_until_the_burst_is_raised()
 {
    let mut h = Harness::new();
    let rate = |burst| LimitKind::Rate(RateLimit::new(1, Duration::from_millis(1), burst).unwrap());
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: rate(1),
    });
    let id = h.submit(vec![rated("big", "api", 2)])[0];
    h.node(S1, reg("n1", 8), 8);
    assert!(one(&mut h, S1).is_empty());
    // 10 s of an idle node, woken only when the scheduler asks to be: the
    // bucket never holds 2 units, so nothing it waits for is due.
    let end = h.now.instant + Duration::from_secs(10);
    let mut wakeups = 0;
    while let Some(at) = h.s.next_wakeup().filter(|at| *at <= end) {
        wakeups += 1;
        assert!(wakeups <= 100, "woken again and again for the rate");
        h.advance(at.saturating_duration_since(h.now.instant));
        h.s.heartbeat(S1, h.now);
        assert!(one(&mut h, S1).is_empty());
    }
    let reason = h.s.pending_reason(id).unwrap();
    assert!(
        reason.contains("rate limit api holds at most 1 unit")
            && reason.contains("takes 2")
            && reason.contains("never"),
        "{reason}"
    );
    // Raising the burst lets it run.
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: rate(2),
    });
    assert_eq!(one(&mut h, S1), [id]);
}

#[test]
fn a_task_naming_a_limit_not_set_waits_saying_so_until_it_is_set() {
    let mut h = Harness::new();
    let id = h.submit(vec![rated("t", "nope", 1)])[0];
    h.node(S1, reg("n1", 8), 8);
    assert!(one(&mut h, S1).is_empty());
    let reason = h.s.pending_reason(id).unwrap();
    assert!(reason.contains("rate limit nope is not set"), "{reason}");
    h.s.set_limit(Limit {
        name: "nope".into(),
        kind: LimitKind::Rate("10/s".parse().unwrap()),
    });
    assert_eq!(one(&mut h, S1), [id]);
}

#[test]
fn limits_are_written_and_survive_a_restart_and_delete_is_not_found_twice() {
    let mut h = Harness::new();
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: LimitKind::Rate("100/s".parse().unwrap()),
    });
    h.s.set_limit(Limit {
        name: "user-1".into(),
        kind: LimitKind::MaxRunning(3),
    });
    h.effects();
    let mut back = h.restart(Duration::from_secs(1));
    let names: Vec<(String, &str)> = back
        .s
        .limits(back.now.instant)
        .into_iter()
        .map(|l| (l.limit.name.clone(), l.limit.kind.as_str()))
        .collect();
    assert_eq!(
        names,
        [("api".into(), "rate"), ("user-1".into(), "concurrency")]
    );
    back.s.delete_limit("api", "rate").unwrap();
    assert!(matches!(
        back.s.delete_limit("api", "rate"),
        Err(crate::error::Error::LimitNotFound(_))
    ));
    back.effects();
    let again = back.restart(Duration::from_secs(1));
    assert_eq!(again.s.limits(again.now.instant).len(), 1);
}

fn gpus(n: u64) -> TaskSpec {
    call("g").resource("gpu", n)
}

fn with_gpus(name: &str, n: u64) -> NodeRegistration {
    let mut r = reg(name, 8);
    r.resources.insert("gpu".into(), n);
    r
}

#[test]
fn resources_are_never_over_committed_and_free_again_when_attempts_end() {
    let mut h = Harness::new();
    h.node(S1, with_gpus("two", 2), 8);
    h.node(S2, with_gpus("one", 1), 8);
    let ids = h.submit((0..5).map(|_| gpus(1)).collect());
    let e = h.effects();
    let (on1, on2) = (assigned(&e, S1), assigned(&e, S2));
    assert_eq!((on1.len(), on2.len()), (2, 1));
    let nodes = h.s.nodes(h.now.instant);
    assert!(nodes.iter().all(|n| n.resources_free["gpu"] == 0));
    let waiting = ids
        .iter()
        .find(|id| h.s.pending_reason(**id).is_some())
        .unwrap();
    let reason = h.s.pending_reason(*waiting).unwrap();
    assert_eq!(reason, "waiting for free resources (gpu=1)");
    h.finish(S2, on2[0].0, 1, Outcome::Succeeded);
    assert_eq!(assigned(&h.effects(), S2).len(), 1);
    let big = h.submit(vec![gpus(2)])[0];
    h.finish(S1, on1[0].0, 1, Outcome::Succeeded);
    // One gpu free on "two": the last 1-gpu task fits, the 2-gpu one waits.
    let e = h.effects();
    assert_eq!(assigned(&e, S1).len(), 1);
    assert!(h.s.pending_reason(big).is_some());
}

#[test]
fn a_request_no_node_could_satisfy_is_said_at_once_and_fails_with_the_flag() {
    let mut h = Harness::new();
    h.node(S1, with_gpus("two", 2), 8);
    let [wait, fail, none] = h.submit(vec![
        gpus(4),
        gpus(4).fail_if_infeasible(),
        call("t").resource("fpga", 1),
    ])[..] else {
        panic!()
    };
    assert_eq!(
        h.s.pending_reason(wait).as_deref(),
        Some("needs gpu=4; the largest connected node has gpu=2")
    );
    assert_eq!(
        h.s.pending_reason(none).as_deref(),
        Some("needs fpga=1; no connected node has resource fpga")
    );
    h.effects();
    let record = h.record(fail);
    assert_eq!(record.state, TaskState::Failed);
    assert!(
        record.error.starts_with("infeasible: needs gpu=4"),
        "{}",
        record.error
    );
    // With no node connected it waits, flag or not.
    let mut empty = Harness::new();
    let id = empty.submit(vec![gpus(4).fail_if_infeasible()])[0];
    assert_eq!(
        empty.s.pending_reason(id).as_deref(),
        Some("no nodes connected")
    );
}

#[test]
fn a_reclaimed_attempt_holds_its_resources_again_after_a_restart() {
    let mut h = Harness::new();
    let node = with_gpus("two", 2);
    let node_id = node.node_id;
    h.node(S1, node.clone(), 8);
    let ids = h.submit(vec![gpus(2), gpus(1)]);
    assert_eq!(one(&mut h, S1), [ids[0]]);
    let mut back = h.restart(Duration::from_secs(1));
    back.node(
        S1,
        NodeRegistration {
            node_id,
            running: vec![(ids[0], Attempt(1))],
            ..node
        },
        8,
    );
    assert!(one(&mut back, S1).is_empty(), "its gpus are held");
    assert_eq!(back.s.nodes(back.now.instant)[0].resources_free["gpu"], 0);
}

#[test]
fn plain_tasks_keep_one_class_and_policies_make_their_own() {
    let mut q = Queue::default();
    let a = q.class_for(&call("x"));
    let b = q.class_for(&call("y"));
    let c = q.class_for(&call("x").priority(7));
    let d = q.class_for(&call("x").fair_key("t", 1));
    let e = q.class_for(&call("x").resource("gpu", 1));
    assert_eq!(a, b);
    assert!(q.classes[a as usize].policy.plain);
    assert!(a != c && a != d && a != e && c != d && d != e);
    assert!(!q.classes[d as usize].policy.plain);
}

#[test]
fn aging_does_not_undo_fair_sharing_within_a_priority() {
    let mut h = Harness::with(SchedulerConfig {
        priority_aging: Duration::from_secs(1),
        ..config()
    });
    h.submit(
        (0..50)
            .map(|i| call(&format!("a{i}")).fair_key("old", 1))
            .collect(),
    );
    // The old key's backlog has waited long (many aging intervals).
    h.advance(Duration::from_secs(3));
    h.node(S1, reg("n1", 1), 1);
    h.submit(
        (0..3)
            .map(|i| call(&format!("b{i}")).fair_key("new", 1))
            .collect(),
    );
    let order: Vec<String> = drain_order(&mut h, 6)
        .into_iter()
        .map(|i| i[..1].to_owned())
        .collect();
    assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
}

/// The figure, in the scheduler: one key with 100,000 queued, a
/// second submitting 100 later at equal priority, on a 4-slot node. The
/// second's 100 are all assigned within 200 assignments (half the slots).
#[test]
fn a_late_key_with_100_tasks_gets_half_the_slots_beside_a_100_000_task_backlog() {
    let mut h = Harness::with(SchedulerConfig {
        max_queued: 200_000,
        ..config()
    });
    let big: Vec<TaskSpec> = (0..100_000).map(|_| call("a").fair_key("big", 1)).collect();
    h.submit(big);
    h.node(S1, reg("n1", 4), 4);
    // The big key runs alone for a while.
    let mut running: Vec<TaskId> = one(&mut h, S1);
    for _ in 0..250 {
        let id = running.remove(0);
        done(&mut h, S1, id);
        running.extend(one(&mut h, S1));
    }
    let small = h.submit((0..100).map(|_| call("b").fair_key("small", 1)).collect());
    let small: std::collections::HashSet<TaskId> = small.into_iter().collect();
    let (mut assignments, mut small_assigned) = (0, 0);
    while small_assigned < 100 {
        let id = running.remove(0);
        done(&mut h, S1, id);
        for id in one(&mut h, S1) {
            assignments += 1;
            small_assigned += usize::from(small.contains(&id));
            running.push(id);
        }
        assert!(assignments <= 1000, "the late key starved");
    }
    assert!(
        (199..=201).contains(&assignments),
        "100 of the late key took {assignments} assignments"
    );
}
