//! What `weft top` shows, as plain state: the latest answers, the last
//! error, the throughput history and the scroll position. Updated by the
//! poll loop and the keys, read by [`super::view`]. No I/O and no clock
//! here: every `now` is an argument, so tests drive it by hand.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use weft_client::ClusterInfo;
use weft_proto::NodeInfo;

/// How far back the throughput history goes.
pub const HISTORY: Duration = Duration::from_secs(5 * 60);
/// How far the coordinator's start, as seen from here, may move between
/// two answers before `weft top` takes the answer for another process's (a
/// restart or a failover), at least: the start is taken as the time an
/// answer came less the uptime in it, and an answer comes back up to a
/// poll's deadline late, so the slack is that when it is longer
/// ([`Top::start_slack`]).
pub const START_SLACK: Duration = Duration::from_secs(5);
/// The window "the current rate" is taken over: long enough to smooth a
/// poll that came late, short enough to follow a change within seconds.
pub const CURRENT_WINDOW: Duration = Duration::from_secs(10);

/// One poll's answers.
#[derive(Clone, Debug)]
pub struct Poll {
    /// `ClusterInfo`.
    pub info: ClusterInfo,
    /// `ListNodes`.
    pub nodes: Vec<NodeInfo>,
}

/// Everything the view draws.
#[derive(Debug)]
pub struct Top {
    /// The coordinator's address, as dialled.
    pub coordinator: String,
    /// How often the coordinator is polled.
    pub interval: Duration,
    /// The latest answer to `ClusterInfo` (kept while polls fail: a
    /// monitor shows the last known figures beside the error).
    pub info: Option<ClusterInfo>,
    /// The latest `ListNodes`, in display order ([`sort_nodes`]).
    pub nodes: Vec<NodeInfo>,
    /// Why the latest poll failed; `None` when it answered.
    pub error: Option<String>,
    /// When the latest poll answered.
    pub updated: Option<Instant>,
    /// Finished-task counts over time.
    pub throughput: Throughput,
    /// The first node row shown.
    pub scroll: usize,
}

impl Top {
    /// Nothing polled yet.
    pub fn new(coordinator: String, interval: Duration) -> Self {
        Top {
            coordinator,
            interval,
            info: None,
            nodes: Vec::new(),
            error: None,
            updated: None,
            throughput: Throughput::default(),
            scroll: 0,
        }
    }

    /// Takes a poll's outcome, made at `now`.
    pub fn update(&mut self, poll: Result<Poll, String>, now: Instant) {
        match poll {
            Ok(Poll { info, mut nodes }) => {
                // A coordinator that started again counts from 0 again,
                // and one answering after an outage may be another process
                // (a failover) with a counter of its own: either way the
                // old samples do not compare with the new one. Such a one
                // is known by its start (the time of the answer less its
                // uptime): the same process gives the same start, give or
                // take the slack (an answer may come a poll's deadline
                // late); another started earlier or later. Its uptime
                // alone would not tell: a standby that has run longer than
                // the process before it has a larger uptime, and a larger
                // counter. A counter that went down starts the history
                // over too ([`Throughput::record`]). Failed polls in
                // between alone do not: a coordinator that was slow is the
                // same one.
                let restarted = match (&self.info, self.updated) {
                    (Some(old), Some(then)) => {
                        // (now - uptime) - (then - old uptime), unsigned
                        // and without an `Instant` before the clock's
                        // origin.
                        let wall = now.saturating_duration_since(then);
                        let moved = wall.saturating_add(old.uptime).abs_diff(info.uptime);
                        moved > self.start_slack()
                    }
                    _ => false,
                };
                if restarted {
                    self.throughput = Throughput::default();
                }
                self.throughput.record(now, info.tasks_finished);
                sort_nodes(&mut nodes);
                self.info = Some(info);
                self.nodes = nodes;
                self.error = None;
                self.updated = Some(now);
            }
            Err(error) => self.error = Some(error),
        }
    }

    /// How far the coordinator's start may move between answers from the
    /// same process: [`START_SLACK`], or a poll's deadline when longer.
    pub fn start_slack(&self) -> Duration {
        START_SLACK.max(super::poll_deadline(self.interval))
    }

    /// Moves the node table by `delta` rows, `page` of them visible: never
    /// past the last full page.
    pub fn scroll_by(&mut self, delta: isize, page: usize) {
        let last = self.nodes.len().saturating_sub(page.max(1));
        self.scroll = self.scroll.saturating_add_signed(delta).min(last);
    }

    /// Scrolls to the first node (`top`) or the last page.
    pub fn scroll_to_end(&mut self, top: bool, page: usize) {
        self.scroll = match top {
            true => 0,
            false => self.nodes.len().saturating_sub(page.max(1)),
        };
    }
}

/// Nodes by name, numbers in names compared as numbers (`rust-2` before
/// `rust-10`), then by id: a stable order, so rows do not jump between
/// polls.
pub fn sort_nodes(nodes: &mut [NodeInfo]) {
    nodes.sort_by(|a, b| natural(&a.name, &b.name).then_with(|| a.id.cmp(&b.id)));
}

/// Compares two names with runs of digits taken as numbers.
fn natural(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (da.trim_start_matches('0'), db.trim_start_matches('0'));
                let order = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

fn split_digits(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

/// The cluster's finished-task counter (`ClusterInfo.tasks_finished`)
/// sampled at each poll, for the last [`HISTORY`], and always the two
/// newest samples (an interval may be longer than the history).
#[derive(Debug, Default)]
pub struct Throughput {
    samples: VecDeque<(Instant, u64)>,
}

impl Throughput {
    /// Adds a sample. A count lower than the last one means the
    /// coordinator started again: the history starts over.
    pub fn record(&mut self, now: Instant, finished: u64) {
        if self
            .samples
            .back()
            .is_some_and(|(_, last)| finished < *last)
        {
            self.samples.clear();
        }
        self.samples.push_back((now, finished));
        // The front goes only once the sample after it covers the history
        // on its own: the newest is never dropped, so neither is the one
        // before it.
        while self
            .samples
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= HISTORY)
        {
            self.samples.pop_front();
        }
    }

    /// Tasks finished per second between consecutive samples, oldest
    /// first.
    pub fn rates(&self) -> Vec<f64> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|((t0, n0), (t1, n1))| per_second(n1 - n0, t1.duration_since(*t0)))
            .collect()
    }

    /// Tasks finished per second over about the last [`CURRENT_WINDOW`]
    /// (from the newest sample at least that old, else the oldest);
    /// `None` before two samples.
    pub fn current(&self) -> Option<f64> {
        let (newest_at, newest) = *self.samples.back()?;
        let (from_at, from) = *self
            .samples
            .iter()
            .rev()
            .find(|(at, _)| newest_at.duration_since(*at) >= CURRENT_WINDOW)
            .or_else(|| self.samples.front())?;
        (from_at < newest_at).then(|| per_second(newest - from, newest_at - from_at))
    }

    /// How long the history covers.
    pub fn span(&self) -> Duration {
        match (self.samples.front(), self.samples.back()) {
            (Some((first, _)), Some((last, _))) => last.duration_since(*first),
            _ => Duration::ZERO,
        }
    }
}

fn per_second(tasks: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        tasks as f64 / over.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_with_their_numbers_as_numbers() {
        let mut names = vec!["rust-10", "rust-2", "b", "rust-1", "a-07", "a-7x", "a-6"];
        names.sort_by(|a, b| natural(a, b));
        assert_eq!(
            names,
            ["a-6", "a-07", "a-7x", "b", "rust-1", "rust-2", "rust-10"]
        );
    }

    #[test]
    fn the_rate_follows_the_counter_and_starts_over_after_a_restart() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut tp = Throughput::default();
        assert_eq!(tp.current(), None);
        tp.record(at(0), 100);
        assert_eq!(tp.current(), None);
        tp.record(at(1), 110);
        tp.record(at(2), 130);
        assert_eq!(tp.rates(), [10.0, 20.0]);
        assert_eq!(tp.current(), Some(15.0));
        // Past the window, the rate is over the last ~10 s only.
        for s in 3..=20 {
            tp.record(at(s), 130 + (s - 2) * 5);
        }
        assert_eq!(tp.current(), Some(5.0));
        assert_eq!(tp.span(), Duration::from_secs(20));
        // A smaller count: the coordinator restarted.
        tp.record(at(21), 3);
        assert_eq!(tp.current(), None);
        assert!(tp.rates().is_empty());
    }

    #[test]
    fn the_history_keeps_the_last_minutes_only() {
        let t0 = Instant::now();
        let mut tp = Throughput::default();
        for s in 0..=400 {
            tp.record(t0 + Duration::from_secs(s), s);
        }
        assert_eq!(tp.span(), HISTORY);
        assert_eq!(tp.rates().len(), 300);
    }

    #[test]
    fn polls_further_apart_than_the_history_still_give_a_rate() {
        let t0 = Instant::now();
        let every = Duration::from_secs(6 * 60);
        let mut tp = Throughput::default();
        tp.record(t0, 0);
        tp.record(t0 + every, 720);
        assert_eq!(tp.current(), Some(2.0));
        tp.record(t0 + 2 * every, 1440);
        assert_eq!(tp.rates(), [2.0]);
        assert_eq!(tp.span(), every);
    }

    fn info(finished: u64, uptime: Duration) -> ClusterInfo {
        ClusterInfo {
            version: "9.9.9".into(),
            nodes: 0,
            slots: 0,
            slots_free: 0,
            tasks: Vec::new(),
            uptime,
            stale_events_refused: 0,
            nodes_lost: 0,
            revoked_node_refusals: 0,
            foreign_events_refused: 0,
            attempts_not_started: 0,
            reclaimed_attempts: 0,
            tasks_finished: finished,
        }
    }

    fn poll(finished: u64, uptime_s: u64) -> Result<Poll, String> {
        Ok(Poll {
            info: info(finished, Duration::from_secs(uptime_s)),
            nodes: Vec::new(),
        })
    }

    #[test]
    fn the_history_starts_over_for_a_younger_coordinator() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut top = Top::new("http://a.test:7070".into(), Duration::from_secs(1));
        top.update(poll(100, 1000), at(0));
        top.update(poll(110, 1001), at(1));
        assert_eq!(top.throughput.current(), Some(10.0));
        // An outage, then another coordinator whose uptime grew less than
        // the wall time.
        top.update(Err("cannot reach coordinator".into()), at(2));
        top.update(poll(5000, 1001), at(8));
        assert_eq!(top.throughput.current(), None);
        top.update(poll(5010, 1002), at(9));
        assert_eq!(top.throughput.current(), Some(10.0));
        // No failed poll seen, but the uptime grew 2 s in 60: another
        // process answers now.
        top.update(poll(9000, 1004), at(69));
        assert_eq!(top.throughput.current(), None);
        // A late answer within the slack is the same coordinator.
        top.update(poll(9040, 1006), at(73));
        assert_eq!(top.throughput.current(), Some(10.0));
        // Restarted between two polls: its uptime went down, however
        // little wall time passed.
        top.update(poll(9050, 1), at(74));
        assert_eq!(top.throughput.current(), None);
    }

    #[test]
    fn the_history_starts_over_for_an_older_coordinator() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut top = Top::new("http://a.test:7070".into(), Duration::from_secs(1));
        top.update(poll(100, 1000), at(0));
        top.update(poll(110, 1001), at(1));
        assert_eq!(top.throughput.current(), Some(10.0));
        // An outage, then a standby that has run for a day takes over: a
        // larger uptime and a larger counter of its own, no spike of
        // 4890 tasks in 7 s.
        top.update(Err("cannot reach coordinator".into()), at(2));
        top.update(poll(5000, 90_000), at(8));
        assert_eq!(top.throughput.current(), None);
        top.update(poll(5010, 90_001), at(9));
        assert_eq!(top.throughput.current(), Some(10.0));
        // No failed poll seen, and an older one yet answers at the next
        // tick.
        top.update(poll(9000, 200_000), at(10));
        assert_eq!(top.throughput.current(), None);
        // An answer 4 s late, then one on time: within the slack, the
        // same coordinator.
        top.update(poll(9040, 200_000), at(14));
        top.update(poll(9050, 200_005), at(15));
        assert_eq!(top.throughput.rates(), [10.0, 10.0]);
    }

    #[test]
    fn a_slow_coordinator_keeps_its_history() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let every = Duration::from_secs(30);
        let mut top = Top::new("http://a.test:7070".into(), every);
        // Answered at once, then 20 s late (within a 30 s deadline).
        top.update(poll(0, 1000), at(0));
        top.update(poll(300, 1030), at(50));
        assert_eq!(top.throughput.current(), Some(6.0));
        // A poll that timed out, then the same coordinator again: its
        // uptime kept up with the wall time, its counter went up.
        top.update(
            Err("no answer from the coordinator within 30s".into()),
            at(90),
        );
        top.update(poll(1200, 1120), at(120));
        assert_eq!(top.throughput.rates(), [6.0, 900.0 / 70.0]);
        // After the outage the counter went down: another process.
        top.update(Err("cannot reach coordinator".into()), at(150));
        top.update(poll(10, 1180), at(180));
        assert_eq!(top.throughput.current(), None);
    }
}
