use std::time::{Duration, SystemTime};

use weft_proto::{TaskSpec, TaskState};

use super::*;

/// The sample line of `name` (with its labels as written), if any.
fn line<'a>(text: &'a str, sample: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split_once(' ').is_some_and(|(n, _)| n == sample))
        .map(|l| l.rsplit_once(' ').map_or("", |(_, v)| v))
}

#[test]
fn the_text_ends_in_eof_and_types_every_family_with_units_in_the_names() {
    let text = Metrics::default().encode();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for family in [
        "weft_tasks gauge",
        "weft_queue_oldest_age_seconds gauge",
        "weft_task_submit_to_start_seconds histogram",
        "weft_store_commit_seconds histogram",
        "weft_submit_request_size_bytes histogram",
        "weft_tasks_finished counter",
        "weft_build info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "{family}:\n{text}"
        );
    }
    assert!(text.contains("# UNIT weft_store_commit_seconds seconds\n"));
    assert_eq!(
        line(
            &text,
            "weft_tasks_finished_total{kind=\"call\",state=\"failed\"}"
        ),
        Some("0")
    );
}

#[test]
fn every_family_is_documented_in_the_readme() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let text = Metrics::default().encode();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() > 20, "{families:?}");
    for family in families {
        // Counters are documented by their sample name, info by `_info`.
        let written = match text.contains(&format!("# TYPE {family} counter")) {
            true => format!("`{family}_total`"),
            false if family == "weft_build" => "`weft_build_info`".to_owned(),
            false => format!("`{family}`"),
        };
        assert!(
            readme.contains(&written),
            "README's Metrics table lacks {written}"
        );
    }
}

#[test]
fn the_gauges_show_the_batch_the_driver_copied_last() {
    let metrics = Metrics::default();
    let mut tasks = [0; weft_proto::TASK_STATES];
    tasks[0] = 5;
    tasks[2] = 2;
    metrics.set_gauges(&Gauges {
        tasks,
        oldest_ready: Some(SystemTime::now() - Duration::from_secs(30)),
        nodes_ready: 2,
        nodes_draining: 1,
        slots: 8,
        slots_used: 3,
        slots_free: 4,
        node_losses: 6,
        ..Gauges::default()
    });
    let text = metrics.encode();
    assert_eq!(line(&text, "weft_tasks{state=\"queued\"}"), Some("5"));
    assert_eq!(line(&text, "weft_tasks{state=\"running\"}"), Some("2"));
    assert_eq!(line(&text, "weft_nodes{state=\"draining\"}"), Some("1"));
    assert_eq!(line(&text, "weft_slots_used"), Some("3"));
    assert_eq!(line(&text, "weft_node_losses_total"), Some("6"));
    let age: f64 = line(&text, "weft_queue_oldest_age_seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!((30.0..60.0).contains(&age), "{age}");
    metrics.set_gauges(&Gauges::default());
    let text = metrics.encode();
    assert_eq!(line(&text, "weft_queue_oldest_age_seconds"), Some("0.0"));
}

#[test]
fn task_and_edge_observations_show_in_their_families() {
    let metrics = Arc::new(Metrics::default());
    let exec = TaskSpec::exec(["true"]).kind;
    metrics.tasks().finished(&exec, TaskState::TimedOut);
    metrics.tasks().retried(Retry::Node);
    metrics
        .tasks()
        .run
        .observe_duration(Duration::from_millis(3));
    metrics.observe_commit(40, Duration::from_micros(300));
    metrics.observe_submit(10, 2000);
    let open = metrics.open_stream(WatchRpc::Run);
    let text = metrics.encode();
    assert_eq!(
        line(
            &text,
            "weft_tasks_finished_total{kind=\"exec\",state=\"timed_out\"}"
        ),
        Some("1")
    );
    assert_eq!(
        line(&text, "weft_task_retries_total{reason=\"node\"}"),
        Some("1")
    );
    assert_eq!(
        line(&text, "weft_attempt_run_seconds_bucket{le=\"0.001\"}"),
        Some("0")
    );
    assert_eq!(
        line(&text, "weft_attempt_run_seconds_bucket{le=\"0.005\"}"),
        Some("1")
    );
    assert_eq!(
        line(&text, "weft_store_commit_seconds_bucket{le=\"0.0005\"}"),
        Some("1")
    );
    assert_eq!(line(&text, "weft_store_commit_records_sum"), Some("40.0"));
    assert_eq!(
        line(
            &text,
            "weft_submit_request_size_bytes_bucket{le=\"4096.0\"}"
        ),
        Some("1")
    );
    assert_eq!(line(&text, "weft_watch_streams{rpc=\"run\"}"), Some("1"));
    drop(open);
    assert_eq!(
        line(&metrics.encode(), "weft_watch_streams{rpc=\"run\"}"),
        Some("0")
    );
}

#[test]
fn ready_tasks_are_shown_per_priority_and_waits_without_key_labels() {
    let metrics = Metrics::default();
    let mut gauges = crate::scheduler::Gauges::default();
    gauges.policy.count_ready(9, 3);
    gauges.policy.count_ready(1, 2);
    gauges.policy.count_ready(0, 1); // unset: the default, 5
    gauges.policy.waiting_concurrency = 4;
    gauges.policy.waiting_rate_limit = 5;
    gauges.policy.waiting_resources = 6;
    metrics.set_gauges(&gauges);
    let text = metrics.encode();
    assert_eq!(line(&text, "weft_ready_tasks{priority=\"9\"}"), Some("3"));
    assert_eq!(line(&text, "weft_ready_tasks{priority=\"1\"}"), Some("2"));
    assert_eq!(line(&text, "weft_ready_tasks{priority=\"5\"}"), Some("1"));
    assert_eq!(line(&text, "weft_tasks_waiting_concurrency"), Some("4"));
    assert_eq!(line(&text, "weft_tasks_waiting_rate_limit"), Some("5"));
    assert_eq!(line(&text, "weft_tasks_waiting_resources"), Some("6"));
    for state in ["pending", "upstream_failed", "skipped"] {
        assert_eq!(
            line(&text, &format!("weft_tasks{{state=\"{state}\"}}")),
            Some("0"),
            "{state}:\n{text}"
        );
    }
}

#[test]
fn rate_limit_tokens_follow_the_set_of_limits() {
    let metrics = Metrics::default();
    metrics.set_rate_tokens([("api", 7), ("db", 0)].into_iter());
    let text = metrics.encode();
    assert_eq!(
        line(&text, "weft_rate_limit_tokens{limit=\"api\"}"),
        Some("7")
    );
    assert_eq!(
        line(&text, "weft_rate_limit_tokens{limit=\"db\"}"),
        Some("0")
    );
    // A deleted limit leaves the table.
    metrics.set_rate_tokens([("db", 3)].into_iter());
    let text = metrics.encode();
    assert_eq!(line(&text, "weft_rate_limit_tokens{limit=\"api\"}"), None);
    assert_eq!(
        line(&text, "weft_rate_limit_tokens{limit=\"db\"}"),
        Some("3")
    );
}
