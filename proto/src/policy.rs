//! Scheduling policy a task carries, as domain types: priority, fair keys,
//! concurrency keys, rate-limit uses, resources, dependencies, and the
//! named limits an admin sets. The wire forms are in `common.proto` and
//! `admin.proto`; each `TryFrom` here is the one place its message is
//! checked.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::convert::{ConversionError, duration_from_pb, duration_to_pb};
use crate::ids::TaskId;
use crate::pb;

/// Lowest priority.
pub const MIN_PRIORITY: u8 = 1;
/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;
/// The priority of a task that does not say.
pub const DEFAULT_PRIORITY: u8 = 5;
/// Largest fair weight.
pub const MAX_FAIR_WEIGHT: u32 = 1000;
/// Longest fair key, concurrency key, limit name or `ref`, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Longest resource name, in bytes.
pub const MAX_RESOURCE_NAME_BYTES: usize = 64;
/// Most resources one task or node names.
pub const MAX_RESOURCES: usize = 64;
/// Most tasks one task runs after.
pub const MAX_DEPENDENCIES: usize = 10_000;
/// Most rate limits one task takes units from.
pub const MAX_RATE_LIMIT_USES: usize = 16;
/// Longest rate-limit period.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// A concurrency key and its limit (`TaskSpec.concurrency`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// The key, e.g. `user-42`.
    pub key: String,
    /// Most of its tasks assigned or running at once; 0: the limit set
    /// for the key (`SetLimit`), else none.
    pub max_running: u32,
    /// What happens to a task of a key at its limit.
    pub on_limit: OverLimit,
}

/// What happens to a task whose concurrency key is at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OverLimit {
    /// It waits in the queue.
    #[default]
    Queue,
    /// It is cancelled.
    CancelNewest,
    /// The key's oldest running task is cancelled to make room.
    CancelOldest,
}

/// Units a task takes from a named rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitUse {
    /// The limit's name.
    pub name: String,
    /// Units taken (at least 1).
    pub units: u32,
}

/// A task another runs after.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dependency {
    /// An existing task.
    Task(TaskId),
    /// Another task of the same Submit, by its `ref`. The coordinator
    /// resolves these to [`Dependency::Task`] before anything is stored.
    Ref(String),
}

/// When a task with dependencies may run, given its parents' final states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DependencyRule {
    /// All succeeded; UPSTREAM_FAILED as soon as one did not.
    #[default]
    AllSucceeded,
    /// All final, however they ended.
    AllFinished,
    /// One failed; SKIPPED when all succeeded.
    AnyFailed,
    /// One succeeded; UPSTREAM_FAILED when none did.
    AnySucceeded,
}

impl DependencyRule {
    /// Every rule, in protocol order.
    pub const ALL: &'static [DependencyRule] = &[
        DependencyRule::AllSucceeded,
        DependencyRule::AllFinished,
        DependencyRule::AnyFailed,
        DependencyRule::AnySucceeded,
    ];

    /// The text form (`all_succeeded`).
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyRule::AllSucceeded => "all_succeeded",
            DependencyRule::AllFinished => "all_finished",
            DependencyRule::AnyFailed => "any_failed",
            DependencyRule::AnySucceeded => "any_succeeded",
        }
    }
}

impl fmt::Display for DependencyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DependencyRule {
    type Err = ConversionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().replace('-', "_").to_ascii_lowercase();
        DependencyRule::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == wanted)
            .ok_or_else(|| ConversionError::InvalidValue {
                what: "dependency rule",
                value: shown(s),
                expected: DependencyRule::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl From<DependencyRule> for i32 {
    fn from(rule: DependencyRule) -> i32 {
        let rule = match rule {
            DependencyRule::AllSucceeded => pb::DependencyRule::AllSucceeded,
            DependencyRule::AllFinished => pb::DependencyRule::AllFinished,
            DependencyRule::AnyFailed => pb::DependencyRule::AnyFailed,
            DependencyRule::AnySucceeded => pb::DependencyRule::AnySucceeded,
        };
        rule as i32
    }
}

impl TryFrom<i32> for DependencyRule {
    type Error = ConversionError;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match pb::DependencyRule::try_from(value) {
            Ok(pb::DependencyRule::Unspecified | pb::DependencyRule::AllSucceeded) => {
                Ok(DependencyRule::AllSucceeded)
            }
            Ok(pb::DependencyRule::AllFinished) => Ok(DependencyRule::AllFinished),
            Ok(pb::DependencyRule::AnyFailed) => Ok(DependencyRule::AnyFailed),
            Ok(pb::DependencyRule::AnySucceeded) => Ok(DependencyRule::AnySucceeded),
            Err(_) => Err(invalid("after_rule", &format!("unknown rule {value}"))),
        }
    }
}

impl OverLimit {
    /// The text form (`queue`, `cancel_newest`, `cancel_oldest`).
    pub fn as_str(self) -> &'static str {
        match self {
            OverLimit::Queue => "queue",
            OverLimit::CancelNewest => "cancel_newest",
            OverLimit::CancelOldest => "cancel_oldest",
        }
    }
}

impl FromStr for OverLimit {
    type Err = ConversionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().replace('-', "_").to_ascii_lowercase().as_str() {
            "queue" => Ok(OverLimit::Queue),
            "cancel_newest" => Ok(OverLimit::CancelNewest),
            "cancel_oldest" => Ok(OverLimit::CancelOldest),
            _ => Err(ConversionError::InvalidValue {
                what: "over-limit policy",
                value: shown(s),
                expected: "queue, cancel_newest, cancel_oldest".into(),
            }),
        }
    }
}

impl From<OverLimit> for i32 {
    fn from(policy: OverLimit) -> i32 {
        let policy = match policy {
            OverLimit::Queue => pb::OverLimit::Queue,
            OverLimit::CancelNewest => pb::OverLimit::CancelNewest,
            OverLimit::CancelOldest => pb::OverLimit::CancelOldest,
        };
        policy as i32
    }
}

impl TryFrom<pb::ConcurrencyLimit> for ConcurrencyLimit {
    type Error = ConversionError;

    fn try_from(limit: pb::ConcurrencyLimit) -> Result<Self, Self::Error> {
        check_key("concurrency.key", &limit.key)?;
        let on_limit = match pb::OverLimit::try_from(limit.on_limit) {
            Ok(pb::OverLimit::Unspecified | pb::OverLimit::Queue) => OverLimit::Queue,
            Ok(pb::OverLimit::CancelNewest) => OverLimit::CancelNewest,
            Ok(pb::OverLimit::CancelOldest) => OverLimit::CancelOldest,
            Err(_) => {
                return Err(invalid(
                    "concurrency.on_limit",
                    &format!("unknown policy {}", limit.on_limit),
                ));
            }
        };
        Ok(ConcurrencyLimit {
            key: limit.key,
            max_running: limit.max_running,
            on_limit,
        })
    }
}

impl From<&ConcurrencyLimit> for pb::ConcurrencyLimit {
    fn from(limit: &ConcurrencyLimit) -> Self {
        pb::ConcurrencyLimit {
            key: limit.key.clone(),
            max_running: limit.max_running,
            on_limit: i32::from(limit.on_limit),
        }
    }
}

impl TryFrom<pb::Dependency> for Dependency {
    type Error = ConversionError;

    fn try_from(dep: pb::Dependency) -> Result<Self, Self::Error> {
        match (dep.task_id.is_empty(), dep.r#ref.is_empty()) {
            (false, true) => Ok(Dependency::Task(dep.task_id.parse().map_err(|_| {
                invalid(
                    "after.task_id",
                    &format!("'{}' is not a task id", shown(&dep.task_id)),
                )
            })?)),
            (true, false) => {
                check_key("after.ref", &dep.r#ref)?;
                Ok(Dependency::Ref(dep.r#ref))
            }
            _ => Err(invalid(
                "after",
                "each entry names exactly one of task_id and ref",
            )),
        }
    }
}

impl From<&Dependency> for pb::Dependency {
    fn from(dep: &Dependency) -> Self {
        match dep {
            Dependency::Task(id) => pb::Dependency {
                task_id: id.to_string(),
                r#ref: String::new(),
            },
            Dependency::Ref(name) => pb::Dependency {
                task_id: String::new(),
                r#ref: name.clone(),
            },
        }
    }
}

/// Checks a key, limit name or `ref`: 1 to [`MAX_KEY_BYTES`] bytes of
/// `[A-Za-z0-9_.:-]`.
pub fn check_key(field: &'static str, key: &str) -> Result<(), ConversionError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(invalid(
            field,
            &format!("must be 1 to {MAX_KEY_BYTES} bytes long"),
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(
            field,
            &format!("'{key}' holds {c:?}; use letters, digits and _ . : -"),
        ));
    }
    Ok(())
}

/// Checks a resource name: 1 to [`MAX_RESOURCE_NAME_BYTES`] bytes of
/// `[a-z0-9_.-]`.
pub fn check_resource_name(field: &'static str, name: &str) -> Result<(), ConversionError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RESOURCE_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    match ok {
        true => Ok(()),
        false => Err(invalid(
            field,
            &format!(
                "resource name '{}' must be 1 to {MAX_RESOURCE_NAME_BYTES} of a-z 0-9 _ . -",
                shown(name)
            ),
        )),
    }
}

/// Checks a resource map (a task's or a node's) and drops its zero
/// amounts; takes the map, so a valid one is kept, not copied.
pub fn check_resources(
    field: &'static str,
    mut resources: BTreeMap<String, u64>,
) -> Result<BTreeMap<String, u64>, ConversionError> {
    if resources.len() > MAX_RESOURCES {
        return Err(invalid(
            field,
            &format!("at most {MAX_RESOURCES} resources"),
        ));
    }
    for name in resources.keys() {
        check_resource_name(field, name)?;
    }
    resources.retain(|_, amount| *amount > 0);
    Ok(resources)
}

/// The node resources a task holds while it runs: a map of names to
/// amounts (none zero), read through `Deref` as a `BTreeMap`.
///
/// Shared, not copied: a spec cloned for each of its class's tasks (the
/// coordinator rebuilds every assigned task's spec from its class) shares
/// one map, and an empty map allocates nothing.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Resources(Option<std::sync::Arc<BTreeMap<String, u64>>>);

/// What an empty [`Resources`] reads as.
static NO_RESOURCES: BTreeMap<String, u64> = BTreeMap::new();

impl Resources {
    /// Holds `amount` of resource `name` (a zero amount takes it out).
    pub fn insert(&mut self, name: impl Into<String>, amount: u64) {
        let name = name.into();
        if amount == 0 {
            if let Some(map) = &mut self.0 {
                std::sync::Arc::make_mut(map).remove(&name);
                if map.is_empty() {
                    self.0 = None;
                }
            }
            return;
        }
        std::sync::Arc::make_mut(self.0.get_or_insert_default()).insert(name, amount);
    }

    /// The map, copied only when another spec shares it.
    pub fn into_map(self) -> BTreeMap<String, u64> {
        self.0
            .map(std::sync::Arc::unwrap_or_clone)
            .unwrap_or_default()
    }
}

impl std::ops::Deref for Resources {
    type Target = BTreeMap<String, u64>;

    fn deref(&self) -> &BTreeMap<String, u64> {
        self.0.as_deref().unwrap_or(&NO_RESOURCES)
    }
}

impl From<BTreeMap<String, u64>> for Resources {
    /// Zero amounts are dropped, as [`Resources::insert`] does.
    fn from(mut map: BTreeMap<String, u64>) -> Resources {
        map.retain(|_, amount| *amount > 0);
        match map.is_empty() {
            true => Resources(None),
            false => Resources(Some(std::sync::Arc::new(map))),
        }
    }
}

impl<K: Into<String>, const N: usize> From<[(K, u64); N]> for Resources {
    fn from(pairs: [(K, u64); N]) -> Resources {
        Resources::from(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .collect::<BTreeMap<_, _>>(),
        )
    }
}

impl<'a> IntoIterator for &'a Resources {
    type Item = (&'a String, &'a u64);
    type IntoIter = std::collections::btree_map::Iter<'a, String, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Parses one `name=amount` resource as the CLI takes it: a plain integer,
/// or with a size suffix (`k`, `M`, `G`, `T` for powers of 1000; `KiB`,
/// `MiB`, `GiB`, `TiB` for powers of 1024; `B` optional).
pub fn parse_resource(text: &str) -> Result<(String, u64), ConversionError> {
    let Some((name, amount)) = text.split_once('=') else {
        return Err(invalid(
            "resource",
            &format!(
                "'{}' is not name=amount (e.g. cpu=8, mem=32GiB)",
                shown(text)
            ),
        ));
    };
    let name = name.trim();
    check_resource_name("resource", name)?;
    Ok((name.to_owned(), parse_amount(amount.trim())?))
}

/// An integer amount with an optional size suffix (see [`parse_resource`]).
pub fn parse_amount(text: &str) -> Result<u64, ConversionError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let bad = || {
        invalid(
            "resource",
            &format!("'{}' is not an amount (e.g. 8, 500M, 32GiB)", shown(text)),
        )
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match suffix.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    value.checked_mul(multiplier).ok_or_else(bad)
}

/// A named limit an admin sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Its name (a rate limit's, or a concurrency key).
    pub name: String,
    /// What it limits.
    pub kind: LimitKind,
}

/// What a [`Limit`] limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// A token bucket tasks take units from.
    Rate(RateLimit),
    /// Most tasks of the concurrency key assigned or running at once.
    MaxRunning(u32),
}

impl LimitKind {
    /// `"rate"` or `"concurrency"`: how `DeleteLimit` names the kind.
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitKind::Rate(_) => "rate",
            LimitKind::MaxRunning(_) => "concurrency",
        }
    }
}

/// A token bucket: `units` per `period`, holding at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Units added per period.
    pub units: u32,
    /// The period.
    pub period: Duration,
    /// Most units the bucket holds (at least `units`... or 1).
    pub burst: u32,
}

impl RateLimit {
    /// Checks the numbers.
    pub fn new(units: u32, period: Duration, burst: u32) -> Result<Self, ConversionError> {
        if units == 0 {
            return Err(invalid("limit.rate.units", "must be at least 1"));
        }
        if period < Duration::from_millis(1) || period > MAX_RATE_PERIOD {
            return Err(invalid("limit.rate.period", "must be between 1ms and 24h"));
        }
        Ok(RateLimit {
            units,
            period,
            burst: if burst == 0 { units } else { burst },
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.period.as_millis() {
            1000 => "s".to_owned(),
            60_000 => "m".to_owned(),
            3_600_000 => "h".to_owned(),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        write!(f, "{}/{per}", self.units)?;
        if self.burst != self.units {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// `100/s`, `10/m`, `5/h`, `3/500ms`, `20/10s` (burst: the units).
impl FromStr for RateLimit {
    type Err = ConversionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            invalid(
                "rate",
                &format!(
                    "'{}' is not a rate: UNITS/PERIOD, e.g. 100/s, 10/m, 3/500ms",
                    shown(s)
                ),
            )
        };
        let (units, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let units: u32 = units.trim().parse().map_err(|_| bad())?;
        let period = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => crate::convert::parse_duration(other).map_err(|_| bad())?,
        };
        RateLimit::new(units, period, 0)
    }
}

impl TryFrom<pb::Limit> for Limit {
    type Error = ConversionError;

    fn try_from(limit: pb::Limit) -> Result<Self, Self::Error> {
        check_key("limit.name", &limit.name)?;
        let kind = match limit.kind {
            None => {
                return Err(ConversionError::MissingField(
                    "limit.kind (rate or max_running)",
                ));
            }
            Some(pb::limit::Kind::Rate(rate)) => {
                let period = match &rate.period {
                    Some(p) => duration_from_pb("limit.rate.period", p)?,
                    None => return Err(ConversionError::MissingField("limit.rate.period")),
                };
                LimitKind::Rate(RateLimit::new(rate.units, period, rate.burst)?)
            }
            Some(pb::limit::Kind::MaxRunning(0)) => {
                return Err(invalid("limit.max_running", "must be at least 1"));
            }
            Some(pb::limit::Kind::MaxRunning(n)) => LimitKind::MaxRunning(n),
        };
        Ok(Limit {
            name: limit.name,
            kind,
        })
    }
}

impl From<&Limit> for pb::Limit {
    fn from(limit: &Limit) -> Self {
        let kind = match limit.kind {
            LimitKind::Rate(rate) => pb::limit::Kind::Rate(pb::RateLimit {
                units: rate.units,
                period: Some(duration_to_pb(rate.period)),
                burst: rate.burst,
            }),
            LimitKind::MaxRunning(n) => pb::limit::Kind::MaxRunning(n),
        };
        pb::Limit {
            name: limit.name.clone(),
            kind: Some(kind),
        }
    }
}

/// Most characters of a peer's or user's text an error message repeats.
const SHOWN_CHARS: usize = 64;

/// `text` as an error message repeats it: at most [`SHOWN_CHARS`]
/// characters (cut on a character boundary), then `…` if there was more.
/// The text can be as long as the message that carried it.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn invalid(field: &'static str, reason: &str) -> ConversionError {
    ConversionError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_or_id_is_cut_short_in_the_error_that_repeats_it() {
        let long = "é".repeat(10_000);
        let errors = [
            check_resource_name("resources", &long).unwrap_err(),
            Dependency::try_from(pb::Dependency {
                task_id: long.clone(),
                r#ref: String::new(),
            })
            .unwrap_err(),
            long.parse::<DependencyRule>().unwrap_err(),
            long.parse::<OverLimit>().unwrap_err(),
            long.parse::<RateLimit>().unwrap_err(),
            parse_resource(&long).unwrap_err(),
            parse_amount(&long).unwrap_err(),
        ];
        for err in errors {
            let message = err.to_string();
            assert!(message.len() < 400, "{} bytes: {message}", message.len());
            assert!(
                message.contains(&format!("{}…", "é".repeat(SHOWN_CHARS))),
                "{message}"
            );
        }
        // Short text is repeated whole.
        let err = check_resource_name("resources", "GPU").unwrap_err();
        assert!(err.to_string().contains("'GPU' must"), "{err}");
    }

    #[test]
    fn resources_are_shared_by_clones_copied_on_change_and_never_hold_a_zero() {
        let mut a = Resources::from([("gpu", 2), ("cpu", 0)]);
        assert_eq!(a.len(), 1, "a zero amount is dropped");
        let b = a.clone();
        assert!(std::ptr::eq(&*a, &*b), "a clone shares the map");
        a.insert("mem", 4);
        assert_eq!(b.get("mem"), None, "a change leaves the clone as it was");
        assert_eq!(a.get("mem"), Some(&4));
        a.insert("mem", 0);
        a.insert("gpu", 0);
        assert!(a.is_empty());
        assert_eq!(a, Resources::default(), "emptied, it equals a fresh one");
        assert!(
            std::ptr::eq(&*a, &*Resources::default()),
            "an empty one holds no map of its own"
        );
        assert_eq!(
            b.clone().into_map(),
            BTreeMap::from([("gpu".to_owned(), 2)])
        );
        assert_eq!(format!("{b:?}"), r#"{"gpu": 2}"#);
        assert_eq!((&b).into_iter().count(), 1);
    }

    #[test]
    fn amounts_take_decimal_and_binary_suffixes() {
        assert_eq!(parse_amount("8").unwrap(), 8);
        assert_eq!(parse_amount("32GiB").unwrap(), 32 << 30);
        assert_eq!(parse_amount("500M").unwrap(), 500_000_000);
        assert!(parse_amount("1.5G").is_err());
        assert!(parse_amount("99999999999TiB").is_err());
        assert_eq!(parse_resource("mem=2KiB").unwrap(), ("mem".into(), 2048));
        let err = parse_resource("GPU=1").unwrap_err().to_string();
        assert!(err.contains("a-z"), "{err}");
        assert!(parse_resource("gpu").is_err());
    }

    #[test]
    fn rates_parse_and_print() {
        let rate: RateLimit = "100/s".parse().unwrap();
        assert_eq!(
            (rate.units, rate.period, rate.burst),
            (100, Duration::from_secs(1), 100)
        );
        assert_eq!(rate.to_string(), "100/s");
        let rate: RateLimit = "3/500ms".parse().unwrap();
        assert_eq!(rate.period, Duration::from_millis(500));
        for bad in ["", "0/s", "10", "x/s", "10/0s", "10/2d"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("k", "user-42").is_ok());
        assert!(check_key("k", "").is_err());
        assert!(check_key("k", "a b").is_err());
        assert!(check_key("k", &"x".repeat(129)).is_err());
    }

    #[test]
    fn a_dependency_names_exactly_one_target() {
        let id = TaskId::new();
        let dep = Dependency::try_from(pb::Dependency::from(&Dependency::Task(id))).unwrap();
        assert_eq!(dep, Dependency::Task(id));
        assert!(Dependency::try_from(pb::Dependency::default()).is_err());
        let both = pb::Dependency {
            task_id: id.to_string(),
            r#ref: "a".into(),
        };
        assert!(Dependency::try_from(both).is_err());
        let bad = pb::Dependency {
            task_id: "nope".into(),
            r#ref: String::new(),
        };
        assert!(
            Dependency::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("after.task_id")
        );
    }
}
