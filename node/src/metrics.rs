//! The node's Prometheus metrics: what an operator needs to see one node's
//! health (is it connected, how full are its slots, how do its attempts
//! end and how long they run, how often it lost the coordinator), served
//! as OpenMetrics text on the node's own HTTP listener (`http.rs`).
//!
//! Counters and the run-time histogram are observed where things happen
//! (an attempt started or ended, a session lost, a dial failed); what the
//! node already keeps (slots, the prefetch queue, whether it is connected,
//! the unsent buffer) is read at scrape time ([`NodeMetrics::encode`] is
//! given a [`Snapshot`]), never counted twice. Labels only from fixed sets
//! (outcome); no task ids.
//!
//! No I/O and no decisions here.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use weft_proto::Outcome;

use crate::error::Error;

/// Attempt run times: 1 ms to 6 hours, in seconds (handlers that answer at
/// once up to long batch jobs).
const RUN_SECONDS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    10800.0, 21600.0,
];

/// What the node keeps that a scrape reads as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Slots configured.
    pub slots: u32,
    /// Slots taken by running attempts.
    pub slots_used: u32,
    /// Most prefetch configured (attempts held queued beyond the slots).
    pub prefetch: u32,
    /// Attempts running (holding slots).
    pub running: usize,
    /// Attempts assigned and waiting for a slot (prefetched).
    pub queued: usize,
    /// Registered with the coordinator now.
    pub connected: bool,
    /// Draining (no new work).
    pub draining: bool,
    /// Events taken off for a stream that broke, sent first by the next
    /// session.
    pub unsent: usize,
}

/// The node's metrics. See the module docs.
#[derive(Debug)]
pub(crate) struct NodeMetrics {
    registry: Registry,
    started: Counter,
    /// One per outcome, in `Outcome::ALL` order (made once, then only
    /// incremented: no lookup per attempt).
    finished: Vec<Counter>,
    run: Histogram,
    session_losses: Counter,
    connect_failures: Counter,
    heartbeat_timeouts: Counter,
    slots: Gauge,
    slots_used: Gauge,
    prefetch: Gauge,
    running: Gauge,
    queued: Gauge,
    connected: Gauge,
    draining: Gauge,
    unsent: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        registry.register(
            "weft_node_build",
            "The node's version (always 1)",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::<u64, AtomicU64>::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let connected = gauge(
            &mut registry,
            "weft_node_connected",
            "1 while the node is registered with the coordinator, else 0",
        );
        let draining = gauge(
            &mut registry,
            "weft_node_draining",
            "1 once the node drains (takes no new work), else 0",
        );
        let slots = gauge(&mut registry, "weft_node_slots", "Slots this node offers");
        let slots_used = gauge(
            &mut registry,
            "weft_node_slots_used",
            "Slots taken by running attempts",
        );
        let prefetch = gauge(
            &mut registry,
            "weft_node_prefetch",
            "Most attempts the node may hold queued beyond its slots (--prefetch)",
        );
        let running = gauge(
            &mut registry,
            "weft_node_attempts_running",
            "Attempts running (holding slots)",
        );
        let queued = gauge(
            &mut registry,
            "weft_node_attempts_queued",
            "Attempts assigned and waiting here for a free slot (prefetched)",
        );
        let unsent = gauge(
            &mut registry,
            "weft_node_outbox_unsent",
            "Events whose stream broke before they were sent; the next session sends them first",
        );
        let started = counter(
            &mut registry,
            "weft_node_attempts_started",
            "Attempts started (given their slots)",
        );
        let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "weft_node_attempts_finished",
            "Attempts that ended, by outcome (also those refused or returned without running)",
            family.clone(),
        );
        let finished = Outcome::ALL
            .iter()
            .map(|outcome| {
                family
                    .get_or_create(&[("outcome", outcome.as_str())])
                    .clone()
            })
            .collect();
        let run = Histogram::new(RUN_SECONDS);
        registry.register_with_unit(
            "weft_node_attempt_run",
            "Run time of attempts that ran, from their start to their end",
            Unit::Seconds,
            run.clone(),
        );
        let session_losses = counter(
            &mut registry,
            "weft_node_session_losses",
            "Sessions with the coordinator that ended without a drain (the node reconnects)",
        );
        let connect_failures = counter(
            &mut registry,
            "weft_node_connect_failures",
            "Dials to the coordinator that failed (unreachable, refused, TLS); retried with backoff",
        );
        let heartbeat_timeouts = counter(
            &mut registry,
            "weft_node_heartbeat_timeouts",
            "Sessions given up because the coordinator was silent past its heartbeat timeout",
        );
        NodeMetrics {
            registry,
            started,
            finished,
            run,
            session_losses,
            connect_failures,
            heartbeat_timeouts,
            slots,
            slots_used,
            prefetch,
            running,
            queued,
            connected,
            draining,
            unsent,
        }
    }
}

fn gauge_value(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

impl NodeMetrics {
    /// An attempt was given its slots and starts.
    pub(crate) fn attempt_started(&self) {
        self.started.inc();
    }

    /// An attempt ended with `outcome` (ran or not).
    pub(crate) fn attempt_finished(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome);
        if let Some(counter) = index.and_then(|i| self.finished.get(i)) {
            counter.inc();
        }
    }

    /// An attempt that ran took `took`.
    pub(crate) fn attempt_ran(&self, took: std::time::Duration) {
        self.run.observe(took.as_secs_f64());
    }

    /// A session ended with `error` (the node reconnects).
    pub(crate) fn session_lost(&self, error: &Error) {
        self.session_losses.inc();
        if matches!(error, Error::HeartbeatTimeout(_)) {
            self.heartbeat_timeouts.inc();
        }
    }

    /// A dial failed.
    pub(crate) fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    /// The OpenMetrics text, with `now`'s values for what is read at
    /// scrape time; ends in `# EOF`.
    pub(crate) fn encode(&self, now: &Snapshot) -> String {
        self.slots.set(gauge_value(now.slots));
        self.slots_used.set(gauge_value(now.slots_used));
        self.prefetch.set(gauge_value(now.prefetch));
        self.running.set(gauge_value(now.running));
        self.queued.set(gauge_value(now.queued));
        self.connected.set(i64::from(now.connected));
        self.draining.set(i64::from(now.draining));
        self.unsent.set(gauge_value(now.unsent));
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail; an error would be a bug in an
        // encoding, shown rather than hidden.
        if let Err(err) = encode(&mut text, &self.registry) {
            text.push_str(&format!("# encoding failed: {err}\n# EOF\n"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_scrape_shows_the_snapshot_and_what_was_observed() {
        let metrics = NodeMetrics::default();
        metrics.attempt_started();
        metrics.attempt_finished(Outcome::TimedOut);
        metrics.attempt_ran(Duration::from_millis(3));
        metrics.session_lost(&Error::HeartbeatTimeout(Duration::from_secs(1)));
        let text = metrics.encode(&Snapshot {
            slots: 4,
            slots_used: 1,
            running: 1,
            connected: true,
            ..Snapshot::default()
        });
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "weft_node_slots 4",
            "weft_node_slots_used 1",
            "weft_node_connected 1",
            "weft_node_draining 0",
            "weft_node_attempts_started_total 1",
            "weft_node_attempts_finished_total{outcome=\"timed_out\"} 1",
            "weft_node_attempts_finished_total{outcome=\"succeeded\"} 0",
            "weft_node_attempt_run_seconds_count 1",
            "weft_node_attempt_run_seconds_bucket{le=\"0.005\"} 1",
            "weft_node_session_losses_total 1",
            "weft_node_heartbeat_timeouts_total 1",
            "# TYPE weft_node_attempt_run_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_family_is_documented_in_the_readme() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let text = NodeMetrics::default().encode(&Snapshot::default());
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (family, kind) = line.split_once(' ').unwrap_or((line, ""));
            let written = match kind {
                "counter" => format!("`{family}_total`"),
                "info" => format!("`{family}_info`"),
                _ => format!("`{family}`"),
            };
            assert!(
                readme.contains(&written),
                "README's Metrics table lacks {written}"
            );
        }
    }
}
