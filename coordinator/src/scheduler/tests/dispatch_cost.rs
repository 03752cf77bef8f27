//! What keeps an assignment cheap with many queue classes: dispatch
//! remembers each class's checked head (`queue::Class::head`), so the
//! next assignment skips the task lookup; whatever takes a remembered
//! head out of QUEUED makes dispatch check again, so the order and the
//! skipping of cancelled tasks are as without it.

use super::*;
use weft_proto::OverLimit;

fn call(input: &str) -> TaskSpec {
    TaskSpec::call("noop", input.to_owned())
}

fn one(h: &mut Harness) -> Vec<TaskId> {
    let e = h.effects();
    assigned(&e, S1).into_iter().map(|(id, _)| id).collect()
}

/// A head dispatch checked (it ranked it, then assigned another class's)
/// and then cancelled while queued is skipped, not assigned.
#[test]
fn a_remembered_head_cancelled_while_queued_is_skipped() {
    let mut h = Harness::new();
    let gpu = h.submit(vec![
        call("gpu-1").priority(9).label("gpu", "1"),
        call("gpu-2").priority(9).label("gpu", "1"),
    ]);
    let low = h.submit(vec![call("low").priority(2)])[0];
    h.node(S1, reg("n1", 1), 1);
    // The gpu class's head was checked (and remembered) for this one,
    // which n1 cannot take.
    assert_eq!(one(&mut h), [low]);
    let class = h.s.tasks.get(&gpu[0]).map(|t| t.class).unwrap();
    assert_eq!(
        h.s.queue.classes[class as usize].head.map(|(id, _)| id),
        Some(gpu[0])
    );
    assert!(h.s.cancel(gpu[0], "", h.now));
    assert_eq!(h.s.queue.classes[class as usize].head, None);
    // A node that can take them gets the next one, not the cancelled one.
    let mut gpu_node = reg("n2", 1);
    gpu_node.labels.insert("gpu".into(), "1".into());
    h.node(S2, gpu_node, 1);
    let e = h.effects();
    assert_eq!(assigned(&e, S2), [(gpu[1], Attempt(1))]);
    assert_eq!(h.record(gpu[0]).state, TaskState::Cancelled);
}

/// An assigned head is forgotten with its entry: the next head is looked
/// up, and a task put back at the front (its node lost) is checked again.
#[test]
fn the_remembered_head_follows_the_front_of_its_queue() {
    let mut h = Harness::new();
    let ids = h.submit(vec![call("a"), call("b"), call("c")]);
    h.node(S1, reg("n1", 1), 1);
    assert_eq!(one(&mut h), [ids[0]]);
    let class = h.s.tasks.get(&ids[1]).map(|t| t.class).unwrap();
    // Assigning drops the entry and what was known of it.
    assert_eq!(h.s.queue.classes[class as usize].head, None);
    h.lose(S1);
    h.effects();
    h.node(S2, reg("n2", 1), 1);
    let e = h.effects();
    // The lost task went back to the front and runs first, on attempt 2.
    assert_eq!(assigned(&e, S2), [(ids[0], Attempt(2))]);
}

/// With many classes (every priority × fair key, as the bench's policy mix
/// makes) the order is the policy's: highest priority first, fair keys
/// fair keys by virtual time within one, and a class emptied by cancels is skipped.
#[test]
fn many_classes_keep_the_policy_order() {
    let mut h = Harness::new();
    let mut specs = Vec::new();
    for p in [3u8, 7] {
        for key in ["x", "y"] {
            for i in 0..3 {
                specs.push(call(&format!("{p}{key}{i}")).priority(p).fair_key(key, 1));
            }
        }
    }
    let ids = h.submit(specs);
    // Every task of priority 7, key y is cancelled while queued.
    for id in &ids[9..12] {
        assert!(h.s.cancel(*id, "", h.now));
    }
    h.node(S1, reg("n1", 1), 1);
    let mut order = Vec::new();
    for _ in 0..20 {
        let got = one(&mut h);
        let Some(id) = got.first().copied() else {
            break;
        };
        order.push(ids.iter().position(|x| *x == id).unwrap());
        h.finish(S1, id, 1, Outcome::Succeeded);
        h.s.credits(S1, 1, h.now);
    }
    // 7x (6..9) first; then priority 3: y, behind x by the three x had
    // (a fair key's virtual time spans priorities), then x.
    assert_eq!(order, [6, 7, 8, 3, 4, 5, 0, 1, 2]);
}

/// Tasks that each came with a fair key of their own make a class each;
/// once they have run, dispatch no longer looks at those classes, so the
/// next assignment's work does not grow with every key ever seen.
#[test]
fn classes_whose_tasks_have_run_are_not_looked_at_again() {
    let mut h = Harness::new();
    let specs = (0..1_000)
        .map(|i| call(&format!("k{i}")).fair_key(format!("user-{i}"), 1))
        .collect();
    let ids = h.submit(specs);
    h.node(S1, reg("n1", 1), 1);
    assert_eq!(h.s.queue.active().count(), 1_000);
    let mut ran = 0;
    while let Some(id) = one(&mut h).first().copied() {
        h.finish(S1, id, 1, Outcome::Succeeded);
        h.s.credits(S1, 1, h.now);
        ran += 1;
    }
    assert_eq!(ran, ids.len());
    assert!(h.s.queue.classes.len() >= 1_000);
    assert!(
        h.s.queue.active().next().is_none(),
        "{:?}",
        h.s.queue.active().count()
    );
    let later = h.submit(vec![call("later").fair_key("user-7", 1)])[0];
    assert_eq!(h.s.queue.active().count(), 1);
    assert_eq!(one(&mut h), [later]);
    assert!(h.s.queue.active().next().is_none());
}

/// A class whose queued tasks were all cancelled leaves the active classes
/// when dispatch finds nothing ready in it, and the classes after it are
/// still looked at in the same assignment.
#[test]
fn a_class_emptied_by_cancels_leaves_the_active_list_and_the_rest_still_run() {
    let mut h = Harness::new();
    let gone = h.submit(vec![call("gone").priority(9), call("gone-too").priority(9)]);
    let mid = h.submit(vec![call("mid").priority(5)])[0];
    let low = h.submit(vec![call("low").priority(1)])[0];
    for id in &gone {
        assert!(h.s.cancel(*id, "", h.now));
    }
    assert_eq!(h.s.queue.active().count(), 3);
    h.node(S1, reg("n1", 1), 1);
    assert_eq!(one(&mut h), [mid]);
    // The cancelled class is gone from the list; the low one waits there.
    assert_eq!(h.s.queue.active().count(), 1);
    h.finish(S1, mid, 1, Outcome::Succeeded);
    h.s.credits(S1, 1, h.now);
    assert_eq!(one(&mut h), [low]);
    assert!(h.s.queue.active().next().is_none());
}

/// With 10,000 classes ready at once (a fair key per task), an assignment
/// looks at the front of its priority's order, not at every class, and
/// the keys are still served oldest first (equal virtual times).
#[test]
fn an_assignment_looks_at_a_few_classes_however_many_are_ready() {
    let mut h = Harness::new();
    let specs = (0..10_000)
        .map(|i| call(&format!("k{i}")).fair_key(format!("user-{i}"), 1))
        .collect();
    let ids = h.submit(specs);
    h.node(S1, reg("n1", 1), 1);
    let mut order = Vec::new();
    let mut most = 0;
    while order.len() < 100 {
        let before = h.s.queue.looked;
        let Some(id) = one(&mut h).first().copied() else {
            break;
        };
        most = most.max(h.s.queue.looked - before);
        order.push(id);
        h.finish(S1, id, 1, Outcome::Succeeded);
        h.s.credits(S1, 1, h.now);
    }
    assert_eq!(order, ids[..100]);
    assert!(most <= 4, "an assignment looked at {most} classes");
}

/// With every priority queued and no head old enough for aging to lift
/// it past the best one found, an assignment looks at the classes of one
/// priority, not at one class per priority; a head aging has lifted to a
/// tie is still looked at, and wins it as the older.
#[test]
fn an_assignment_looks_only_at_priorities_aging_could_lift() {
    let aging = Duration::from_secs(10);
    let mut h = Harness::with(SchedulerConfig {
        priority_aging: aging,
        ..config()
    });
    let specs = (1..=9u8)
        .flat_map(|p| (0..2).map(move |i| call(&format!("{p}-{i}")).priority(p)))
        .collect();
    let ids = h.submit(specs);
    h.node(S1, reg("n1", 1), 1);
    let mut order = vec![one(&mut h)[0]];
    while order.len() < ids.len() {
        h.finish(S1, *order.last().unwrap(), 1, Outcome::Succeeded);
        let before = h.s.queue.looked;
        h.s.credits(S1, 1, h.now);
        let got = one(&mut h);
        assert_eq!(got.len(), 1);
        // The class it assigns from, and at most one entry before it
        // put back in order (the fair key's virtual time moved when a
        // higher priority was served); never a class per priority.
        let looked = h.s.queue.looked - before;
        assert!(looked <= 2, "{looked} classes looked at");
        order.push(got[0]);
    }
    // Highest priority first, oldest first within one.
    let expected: Vec<TaskId> = (0..9)
        .rev()
        .flat_map(|p| [ids[2 * p], ids[2 * p + 1]])
        .collect();
    assert_eq!(order, expected);
    h.finish(S1, *order.last().unwrap(), 1, Outcome::Succeeded);

    // A priority-1 task 80 s old ties a fresh priority-9 one (eight
    // levels, one per 10 s): both are looked at, and the older runs.
    let old = h.submit(vec![call("old").priority(1)])[0];
    for _ in 0..80 {
        h.advance(Duration::from_secs(1));
        h.s.heartbeat(S1, h.now);
    }
    let fresh = h.submit(vec![call("fresh").priority(9)])[0];
    let before = h.s.queue.looked;
    h.s.credits(S1, 1, h.now);
    assert_eq!(one(&mut h), [old]);
    assert_eq!(h.s.queue.looked - before, 2);
    h.finish(S1, old, 1, Outcome::Succeeded);
    h.s.credits(S1, 1, h.now);
    assert_eq!(one(&mut h), [fresh]);
}

/// Finding a submitted task's class compares it with one or two examples
/// (the last class used, then its bucket's), however many classes differ
/// only by their concurrency key, rate limit or fair weight: a key per
/// user does not make every submit walk every user's class.
#[test]
fn finding_a_class_compares_with_a_few_examples_however_many_keys_there_are() {
    let mut h = Harness::new();
    let keys = 1_500;
    let specs = |round: usize| -> Vec<TaskSpec> {
        (0..keys)
            .flat_map(|k| {
                let input = format!("{round}-{k}");
                [
                    call(&input).concurrency(format!("user-{k}"), 2, OverLimit::Queue),
                    call(&input).rate_limit(format!("api-{k}"), 1),
                    call(&input).fair_key("team", 1 + k as u32),
                ]
            })
            .collect()
    };
    h.submit(specs(0));
    let classes = h.s.queue.classes.len();
    assert_eq!(classes, 3 * keys, "one class per key");
    // The same keys again: each task finds its class among them.
    let before = h.s.queue.compared;
    h.submit(specs(1));
    assert_eq!(h.s.queue.classes.len(), classes, "no class made twice");
    let per_task = (h.s.queue.compared - before) as f64 / (3 * keys) as f64;
    assert!(per_task <= 2.01, "{per_task} comparisons per task");
}

/// Classes are kept for the keys in use, not for every key ever seen: a
/// class whose last live task ended is retired (its cancelled entries
/// dropped, its example let go) and its number goes to the next new
/// class. A job per fair key, run one after another, keeps one class.
#[test]
fn a_class_without_live_tasks_is_retired_and_its_number_reused() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    for job in 0..300 {
        let key = format!("job-{job}");
        let ids = h.submit(vec![
            call("a").fair_key(key.clone(), 1),
            call("b").fair_key(key.clone(), 1),
            call("c").fair_key(key, 1),
        ]);
        // One of them cancelled while queued: its entry is left behind.
        assert!(h.s.cancel(ids[2], "", h.now));
        for id in &ids[..2] {
            assert_eq!(one(&mut h), [*id]);
            h.finish(S1, *id, 1, Outcome::Succeeded);
            h.s.credits(S1, 1, h.now);
        }
    }
    h.effects();
    assert_eq!(h.s.queue.in_use(), 0, "no live task, no class");
    assert!(
        h.s.queue.classes.len() <= 2,
        "{} classes for 300 jobs run one after another",
        h.s.queue.classes.len()
    );
    assert!(h.s.queue.active().next().is_none());
    assert_eq!(
        h.s.queue
            .level_oldest(usize::from(weft_proto::policy::DEFAULT_PRIORITY)),
        u64::MAX
    );
    // Their fair keys went with their classes (the default key stays):
    // the table never held more than the default and two jobs' keys (a
    // job's key is made before the one before it is let go).
    assert_eq!(h.s.queue.policy.fair_keys(), 1);
    assert!(
        h.s.queue.policy.fair.len() <= 3,
        "{}",
        h.s.queue.policy.fair.len()
    );

    // A class with a live task stays: a queued task of an old key still
    // runs after many other keys came and went.
    let old = h.submit(vec![call("old").label("gpu", "1").fair_key("kept", 1)])[0];
    for job in 0..50 {
        let id = h.submit(vec![call("x").fair_key(format!("more-{job}"), 1)])[0];
        assert_eq!(one(&mut h), [id]);
        h.finish(S1, id, 1, Outcome::Succeeded);
        h.s.credits(S1, 1, h.now);
    }
    let mut gpu = reg("n2", 1);
    gpu.labels.insert("gpu".into(), "1".into());
    h.node(S2, gpu, 1);
    let e = h.effects();
    assert_eq!(assigned(&e, S2), [(old, Attempt(1))]);
}

/// A node remembers per class number whether it can run the class; when
/// the number goes to a new class, it is asked again: a node without a
/// label is not sent the new class's task because it could run the old.
#[test]
fn a_reused_class_number_is_checked_again_against_every_node() {
    let mut h = Harness::new();
    h.node(S1, reg("plain", 1), 1);
    let first = h.submit(vec![call("first").fair_key("job-1", 1)])[0];
    assert_eq!(one(&mut h), [first]);
    let number = h.s.tasks.get(&first).map(|t| t.class).unwrap();
    h.finish(S1, first, 1, Outcome::Succeeded);
    h.s.credits(S1, 1, h.now);
    h.effects();
    let gpu_task = h.submit(vec![call("gpu").label("gpu", "1").fair_key("job-2", 1)])[0];
    assert_eq!(
        h.s.tasks.get(&gpu_task).map(|t| t.class),
        Some(number),
        "the retired number is reused"
    );
    assert_eq!(
        one(&mut h),
        Vec::<TaskId>::new(),
        "the plain node lacks the label"
    );
    let mut gpu = reg("gpu", 1);
    gpu.labels.insert("gpu".into(), "1".into());
    h.node(S2, gpu, 1);
    let e = h.effects();
    assert_eq!(assigned(&e, S2), [(gpu_task, Attempt(1))]);
}
