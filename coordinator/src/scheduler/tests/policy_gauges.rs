//! The policy counts the metrics copy per batch (`Scheduler::gauges`):
//! ready tasks per priority, and ready tasks held back by a concurrency
//! key at its limit, a rate limit without tokens, or resources no node has
//! free.

use weft_proto::policy::{Limit, LimitKind, OverLimit, RateLimit};

use super::*;

fn call(input: &str) -> TaskSpec {
    TaskSpec::call("noop", input.to_owned())
}

#[test]
fn ready_tasks_are_counted_per_priority() {
    let mut h = Harness::new();
    h.submit(vec![
        call("a").priority(9),
        call("b").priority(9),
        call("c"),
        call("d").priority(1),
    ]);
    let g = h.s.gauges(h.now.instant).policy;
    assert_eq!(g.ready_by_priority, [1, 0, 0, 0, 1, 0, 0, 0, 2]);
    assert_eq!(
        (
            g.waiting_concurrency,
            g.waiting_rate_limit,
            g.waiting_resources
        ),
        (0, 0, 0)
    );
}

#[test]
fn tasks_held_back_by_a_key_a_rate_or_resources_are_counted_without_keys() {
    let mut h = Harness::new();
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: LimitKind::Rate(RateLimit::new(1, Duration::from_secs(3600), 1).expect("a rate")),
    });
    h.node(S1, reg("n1", 4), 4);
    h.submit(vec![
        // The key allows one: the second waits.
        call("k1").concurrency("user-42", 1, OverLimit::Queue),
        call("k2").concurrency("user-42", 1, OverLimit::Queue),
        // One token an hour: the second waits.
        call("r1").rate_limit("api", 1),
        call("r2").rate_limit("api", 1),
        // No node has a gpu.
        call("g").resource("gpu", 1),
    ]);
    let _ = h.effects();
    let g = h.s.gauges(h.now.instant).policy;
    assert_eq!(g.waiting_concurrency, 1, "{g:?}");
    assert_eq!(g.waiting_rate_limit, 1, "{g:?}");
    assert_eq!(g.waiting_resources, 1, "{g:?}");
    assert_eq!(g.ready_by_priority[4], 3, "{g:?}");
    let tokens: Vec<(String, u64)> =
        h.s.rate_tokens(h.now.instant)
            .map(|(name, n)| (name.to_owned(), n))
            .collect();
    assert_eq!(tokens, [("api".to_owned(), 0)]);
}

#[test]
fn rate_gauges_read_the_bucket_refilled_to_now() {
    let mut h = Harness::new();
    h.s.set_limit(Limit {
        name: "api".into(),
        kind: LimitKind::Rate(RateLimit::new(10, Duration::from_secs(1), 10).expect("a rate")),
    });
    // Ten credits for eleven tasks: ten drain the bucket, the eleventh
    // waits for a slot, and nothing dispatched later refills the bucket.
    h.node(S1, reg("n1", 10), 10);
    h.submit(
        (0..11)
            .map(|i| call(&i.to_string()).rate_limit("api", 1))
            .collect(),
    );
    assert_eq!(assigned(&h.effects(), S1).len(), 10);
    let tokens =
        |h: &Harness| -> Vec<u64> { h.s.rate_tokens(h.now.instant).map(|(_, n)| n).collect() };
    assert_eq!(tokens(&h), [0]);
    assert_eq!(h.s.gauges(h.now.instant).policy.waiting_rate_limit, 1);

    h.advance(Duration::from_secs(2));
    let available = h.s.limits(h.now.instant)[0].available;
    assert_eq!(available, 10);
    assert_eq!(tokens(&h), [available]);
    let g = h.s.gauges(h.now.instant).policy;
    assert_eq!(g.waiting_rate_limit, 0, "{g:?}");
}
