//! Scheduling policy a task carries: priority with aging, weighted fair
//! keys, concurrency keys, rate limits (named token buckets) and node
//! resources.
//!
//! Every scheduling need is part of a task's queue class (`queue.rs`):
//! tasks with the same priority, fair key, concurrency key, rate-limit uses
//! and resources share one class, so dispatch still looks at one head per
//! class and a queued task costs what it did. What a class needs is
//! resolved once, when the class is made ([`ClassPolicy`]: indexes into
//! the key tables here), so an assignment does no hash lookup for it.
//!
//! Cost of one assignment: for each priority with ready tasks, a walk of
//! that priority's classes in fair order (`Queue::levels`) to the first the
//! node may take, usually the first; then the best of those (at most 9) by
//! effective priority. A class looked at costs a head check and its gates:
//! a concurrency key one counter check, rate limits one bucket refill per
//! limit it names (a map lookup by name), resources one comparison per
//! resource on the node. So the cost does not grow with the number of
//! classes, only with those passed over because the node may not take
//! them (a concurrency key at its limit, resources in use). Plain tasks
//! (default priority, no key, no limit, no resource) take none of those
//! branches and allocate nothing.
//!
//! The rules:
//! - Priority 1..=9: across priorities, the class head with the highest
//!   *effective* priority goes first (ties: the oldest). With
//!   `--priority-aging D` (not zero) a head gains one level per `D` it
//!   has waited unserved (since it was submitted or its class was last
//!   served, whichever is later), so a low-priority task under a constant
//!   stream of high-priority work runs at the latest after about
//!   `(9 - p) * D` (then it ties and, as the oldest, goes first); a
//!   backlog that is being served gains nothing. Zero: strict order.
//! - Within one priority: weighted fair queueing by slots (aging never
//!   reorders one priority's keys). Each
//!   fair key has a virtual time, advanced by `slots / weight` at each
//!   assignment; the key with the smallest goes first (ties: the oldest
//!   head). A key whose class queue was empty starts again at the virtual
//!   time of the key last served (the current minimum), so idle keys bank
//!   no credit.
//! - A concurrency key allows at most `max` tasks assigned or running
//!   (from the latest spec that names a max, else the limit set with
//!   `SetLimit`, else none); each end of an attempt frees its slot.
//! - Rate limits are token buckets refilled by `Now`; a class waits while
//!   one of its buckets lacks units and `next_wakeup` includes the refill.
//!   A class taking more units than a bucket's burst can never have them:
//!   it waits, saying so, with no wakeup, until `SetLimit` changes the
//!   bucket.
//! - Resources are held on the node from assignment to the attempt's end.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use weft_proto::policy::{Limit, LimitKind, OverLimit, RateLimit};
use weft_proto::{TaskId, TaskSpec};

/// What a queue class needs, resolved when the class is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClassPolicy {
    /// 1..=9.
    pub priority: u8,
    /// Index into [`Policy::fair`].
    pub fair: u32,
    /// Index into [`Policy::conc`], with the class's over-limit rule.
    pub conc: Option<(u32, OverLimit)>,
    /// Has rate-limit uses or resources (dispatch checks them).
    pub gated: bool,
    /// Needs nothing beyond what plain tasks need: no submit hook.
    pub plain: bool,
}

/// One fair key.
#[derive(Debug)]
pub(crate) struct FairKey {
    pub weight: u32,
    /// Slots served divided by weight, from the floor it (re)started at.
    pub vtime: f64,
    /// Its name (empty once let go: see [`Policy::class_retired`]).
    name: String,
    /// Queue classes that use it.
    classes: u32,
}

/// One concurrency key.
#[derive(Debug, Default)]
pub(crate) struct ConcKey {
    pub name: String,
    /// The limit set with `SetLimit`, if any.
    pub set: Option<u32>,
    /// The limit in force: the latest spec max or `set`.
    pub max: Option<u32>,
    /// Its tasks assigned or running now.
    pub running: u32,
    /// How many of its tasks are queued, assigned or running (not
    /// pending, not final): what its limit is held against.
    pub live: usize,
    /// Which tasks those are, kept only from the first time a
    /// `cancel_oldest` task of the key finds it at its limit (it is built
    /// then by one pass over the live tasks): only that rule needs them,
    /// and a set kept for every key would cost a hash insert and remove
    /// per task, in whatever order the policy runs them.
    pub ids: Option<crate::IdSet<TaskId>>,
}

impl ConcKey {
    /// True when another task of the key may be assigned.
    pub fn has_room(&self) -> bool {
        self.max.is_none_or(|max| self.running < max)
    }
}

/// One named token bucket.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub rate: RateLimit,
    /// Units in the bucket as of `at`.
    pub tokens: f64,
    pub at: Option<Instant>,
}

impl Bucket {
    fn new(rate: RateLimit) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate.burst),
            at: None,
        }
    }

    /// Adds what accrued since the last refill (never past the burst).
    pub fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let per_sec = f64::from(self.rate.units) / self.rate.period.as_secs_f64();
            self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(self.rate.burst));
        }
        self.at = Some(now);
    }

    /// How long until `units` are in the bucket (zero: now), or `None`
    /// when they never will be: the bucket holds at most its burst, and
    /// that is fewer. Refill first.
    pub fn wait_for(&self, units: u32) -> Option<Duration> {
        if units > self.rate.burst {
            return None;
        }
        let missing = f64::from(units) - self.tokens;
        if missing <= 1e-9 {
            return Some(Duration::ZERO);
        }
        let per_sec = f64::from(self.rate.units) / self.rate.period.as_secs_f64();
        // Rounded up to the next millisecond, so the wakeup finds them.
        let ms = (missing / per_sec * 1000.0).ceil().max(1.0);
        Some(Duration::from_millis(ms as u64))
    }
}

/// The policy state: key tables, buckets, the aging interval.
#[derive(Debug)]
pub(crate) struct Policy {
    /// One level of effective priority per this much waited (zero: none).
    pub aging: Duration,
    pub fair: Vec<FairKey>,
    fair_index: HashMap<String, u32>,
    /// Numbers of fair keys let go, for new keys to take.
    fair_free: Vec<u32>,
    /// The virtual time of the key last served: where an idle key restarts.
    pub fair_floor: f64,
    pub conc: Vec<ConcKey>,
    conc_index: HashMap<String, u32>,
    /// Rate limits by name.
    pub rates: BTreeMap<String, Bucket>,
    /// When a bucket a waiting class needs has its units (set by dispatch).
    pub rate_wakeup: Option<Instant>,
    /// The instant of the latest dispatch (for `pending_reason`).
    pub last_dispatch: Option<Instant>,
}

impl Default for Policy {
    fn default() -> Self {
        let mut policy = Policy {
            aging: Duration::ZERO,
            fair: Vec::new(),
            fair_index: HashMap::new(),
            fair_free: Vec::new(),
            fair_floor: 0.0,
            conc: Vec::new(),
            conc_index: HashMap::new(),
            rates: BTreeMap::new(),
            rate_wakeup: None,
            last_dispatch: None,
        };
        policy.fair_key("", 1);
        policy
    }
}

/// True when a spec needs nothing but the default policy.
pub(crate) fn is_plain(spec: &TaskSpec) -> bool {
    spec.fair_key.is_empty()
        && spec.concurrency.is_none()
        && spec.rate_limits.is_empty()
        && spec.resources.is_empty()
        && !spec.fail_if_infeasible
}

impl Policy {
    /// The index of fair key `name`, made on first sight with `weight`.
    pub fn fair_key(&mut self, name: &str, weight: u32) -> u32 {
        if let Some(index) = self.fair_index.get(name) {
            return *index;
        }
        let key = FairKey {
            weight: weight.max(1),
            vtime: self.fair_floor,
            name: name.to_owned(),
            classes: 0,
        };
        let index = match self.fair_free.pop() {
            Some(index) => {
                self.fair[index as usize] = key;
                index
            }
            None => {
                self.fair.push(key);
                u32::try_from(self.fair.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.fair_index.insert(name.to_owned(), index);
        index
    }

    /// A queue class with `policy` was retired: a fair key no class uses
    /// any more is let go, and its number goes to the next new key. The
    /// key had no live task, so it was idle: kept, it would restart at
    /// the larger of its virtual time and the floor; let go, a key of
    /// that name restarts at the floor. What it forgets is how far it was
    /// ahead of the floor, which the fair order keeps to about one
    /// service (the key served least goes first). That keeps the table to
    /// the keys in use, not every key ever seen.
    pub fn class_retired(&mut self, policy: ClassPolicy) {
        if policy.fair == 0 {
            return; // the default key (no fair key) stays
        }
        let Some(key) = self.fair.get_mut(policy.fair as usize) else {
            return;
        };
        key.classes = key.classes.saturating_sub(1);
        if key.classes == 0 {
            let name = std::mem::take(&mut key.name);
            self.fair_index.remove(&name);
            self.fair_free.push(policy.fair);
        }
    }

    /// Fair keys kept (tests: what the table holds).
    #[cfg(test)]
    pub fn fair_keys(&self) -> usize {
        self.fair_index.len()
    }

    /// The index of concurrency key `name`, made on first sight.
    pub fn conc_key(&mut self, name: &str) -> u32 {
        if let Some(index) = self.conc_index.get(name) {
            return *index;
        }
        let index = u32::try_from(self.conc.len()).unwrap_or(u32::MAX);
        self.conc.push(ConcKey {
            name: name.to_owned(),
            ..ConcKey::default()
        });
        self.conc_index.insert(name.to_owned(), index);
        index
    }

    /// The concurrency key `name`, if it was ever seen.
    pub fn find_conc(&self, name: &str) -> Option<&ConcKey> {
        self.conc_index.get(name).map(|i| &self.conc[*i as usize])
    }

    /// What a class of `spec` needs.
    pub fn class_policy(&mut self, spec: &TaskSpec) -> ClassPolicy {
        let fair = match spec.fair_key.is_empty() {
            true => 0,
            false => {
                let fair = self.fair_key(&spec.fair_key, spec.fair_weight);
                self.fair[fair as usize].classes += 1;
                fair
            }
        };
        let conc = spec
            .concurrency
            .as_ref()
            .map(|c| (self.conc_key(&c.key), c.on_limit));
        ClassPolicy {
            priority: spec.priority.clamp(1, 9),
            fair,
            conc,
            gated: !spec.rate_limits.is_empty() || !spec.resources.is_empty(),
            plain: is_plain(spec),
        }
    }

    /// A key whose class queue was empty becomes active again: it starts
    /// no lower than the current floor.
    pub fn reactivate(&mut self, fair: u32) {
        if let Some(key) = self.fair.get_mut(fair as usize)
            && key.vtime < self.fair_floor
        {
            key.vtime = self.fair_floor;
        }
    }

    /// The key served `slots`: its virtual time advances.
    pub fn served(&mut self, fair: u32, slots: u32) {
        if let Some(key) = self.fair.get_mut(fair as usize) {
            self.fair_floor = key.vtime;
            key.vtime += f64::from(slots.max(1)) / f64::from(key.weight.max(1));
        }
    }

    /// Effective priority of a head submitted `created_ns` (Unix nanos)
    /// seen at `now_ns`.
    pub fn effective(&self, priority: u8, created_ns: u64, now_ns: u64) -> u64 {
        let aging = self.aging.as_nanos() as u64;
        let levels = match aging {
            0 => 0,
            aging => now_ns.saturating_sub(created_ns) / aging,
        };
        u64::from(priority).saturating_add(levels)
    }

    /// True when every rate limit `spec` names has its units at `now`;
    /// else records when it will (for `next_wakeup`). Units past a
    /// bucket's burst never come: nothing is recorded for them, and only
    /// a `SetLimit` (which dispatches again) can change that.
    pub fn rates_allow(&mut self, spec: &TaskSpec, now: Instant) -> bool {
        for used in &spec.rate_limits {
            let Some(bucket) = self.rates.get_mut(&used.name) else {
                return false;
            };
            bucket.refill(now);
            match bucket.wait_for(used.units) {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => {
                    let at = now + wait;
                    self.rate_wakeup = Some(self.rate_wakeup.map_or(at, |w| w.min(at)));
                    return false;
                }
                None => return false,
            }
        }
        true
    }

    /// Takes the units `spec` uses (after [`rates_allow`](Self::rates_allow)).
    pub fn take_rates(&mut self, spec: &TaskSpec) {
        for used in &spec.rate_limits {
            if let Some(bucket) = self.rates.get_mut(&used.name) {
                bucket.tokens = (bucket.tokens - f64::from(used.units)).max(0.0);
            }
        }
    }

    /// Why a class with `spec` waits on its limits, if it does.
    pub fn limit_reason(&self, spec: &TaskSpec, class: ClassPolicy) -> Option<String> {
        if let Some((index, _)) = class.conc
            && let Some(key) = self.conc.get(index as usize)
            && !key.has_room()
        {
            return Some(format!(
                "concurrency key {} at its limit {}",
                key.name,
                key.max.unwrap_or_default()
            ));
        }
        for used in &spec.rate_limits {
            let Some(bucket) = self.rates.get(&used.name) else {
                return Some(format!(
                    "rate limit {} is not set (weft limit set {} RATE)",
                    used.name, used.name
                ));
            };
            let mut bucket = bucket.clone();
            if let Some(now) = self.last_dispatch {
                bucket.refill(now);
            }
            match bucket.wait_for(used.units) {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => {
                    return Some(format!("rate limit {}: next units in {wait:?}", used.name));
                }
                None => {
                    let burst = bucket.rate.burst;
                    return Some(format!(
                        "rate limit {} holds at most {burst} unit{} (its burst) and this task takes {}: it can never run until the burst is raised (weft limit set {} RATE --burst {})",
                        used.name,
                        if burst == 1 { "" } else { "s" },
                        used.units,
                        used.name,
                        used.units
                    ));
                }
            }
        }
        None
    }

    /// Sets (creates or replaces) a limit. A rate limit's bucket starts
    /// full.
    pub fn set_limit(&mut self, limit: &Limit) {
        match limit.kind {
            LimitKind::Rate(rate) => {
                self.rates.insert(limit.name.clone(), Bucket::new(rate));
            }
            LimitKind::MaxRunning(max) => {
                let index = self.conc_key(&limit.name);
                let key = &mut self.conc[index as usize];
                key.set = Some(max);
                key.max = Some(max);
            }
        }
    }

    /// Removes a limit; false when there is none of that kind and name.
    pub fn delete_limit(&mut self, name: &str, rate: bool) -> bool {
        if rate {
            return self.rates.remove(name).is_some();
        }
        let Some(index) = self.conc_index.get(name) else {
            return false;
        };
        let key = &mut self.conc[*index as usize];
        if key.set.is_none() {
            return false;
        }
        key.set = None;
        key.max = None;
        true
    }

    /// Every limit set, by kind (rate, then concurrency) then name.
    pub fn limits(&self) -> Vec<Limit> {
        let mut limits: Vec<Limit> = self
            .rates
            .iter()
            .map(|(name, bucket)| Limit {
                name: name.clone(),
                kind: LimitKind::Rate(bucket.rate),
            })
            .collect();
        let mut conc: Vec<Limit> = self
            .conc
            .iter()
            .filter_map(|k| {
                k.set.map(|max| Limit {
                    name: k.name.clone(),
                    kind: LimitKind::MaxRunning(max),
                })
            })
            .collect();
        conc.sort_by(|a, b| a.name.cmp(&b.name));
        limits.extend(conc);
        limits
    }
}
