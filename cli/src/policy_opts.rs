//! The scheduling-policy flags of the commands that make tasks (`run`,
//! `submit`, `call`, `map`): priority, fair key, concurrency key, rate
//! limits, resources. Checked when parsed, so applying them cannot fail.

use clap::{Args, ValueEnum};

use weft_client::TaskSpec;
use weft_proto::policy::{
    MAX_FAIR_WEIGHT, MAX_PRIORITY, MIN_PRIORITY, OverLimit, check_key, parse_resource,
};

/// What happens to a task whose concurrency key is at its limit.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLimit {
    /// It waits in the queue until a slot frees.
    Queue,
    /// It is cancelled at once.
    CancelNewest,
    /// The key's oldest task is cancelled; this one takes its slot.
    CancelOldest,
}

/// Scheduling policy of the task(s) a command makes.
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyOpts {
    /// Priority, 1 (lowest) to 9 (highest); default 5. Higher goes first;
    /// a waiting task gains a level per --priority-aging interval of the
    /// coordinator (60s by default), so low priorities are not starved.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(i64::from(MIN_PRIORITY)..=i64::from(MAX_PRIORITY)))]
    pub priority: Option<u8>,
    /// Share the cluster fairly with other keys of the same priority, as
    /// KEY or KEY:WEIGHT (weight 1-1000, default 1): keys get slots in
    /// proportion to their weights while they all have work.
    #[arg(long, value_name = "KEY[:WEIGHT]", value_parser = parse_fair_key)]
    pub fair_key: Option<(String, Option<u32>)>,
    /// The fair key's weight (1-1000), instead of KEY:WEIGHT.
    #[arg(long, value_name = "N", requires = "fair_key", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_FAIR_WEIGHT)))]
    pub fair_weight: Option<u32>,
    /// At most --max-concurrent tasks of this key assigned or running at
    /// once, cluster-wide (without --max-concurrent: the limit set with
    /// `weft limit set KEY --max-concurrent N`, else none).
    #[arg(long, value_name = "KEY", value_parser = parse_key)]
    pub concurrency_key: Option<String>,
    /// The concurrency key's limit (it becomes the key's from now on).
    #[arg(long, value_name = "N", requires = "concurrency_key", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: Option<u32>,
    /// What happens to a task of a key at its limit.
    #[arg(long, value_enum, value_name = "POLICY", requires = "concurrency_key")]
    pub on_limit: Option<OnLimit>,
    /// Take units from a named rate limit (`weft limit set NAME 100/s`)
    /// when assigned, as NAME or NAME:UNITS (default 1). Repeatable.
    #[arg(long = "rate-limit", value_name = "NAME[:UNITS]", value_parser = parse_rate_use)]
    pub rate_limits: Vec<(String, u32)>,
    /// Hold a node resource while the task runs, as name=amount (`gpu=1`,
    /// `mem=4GiB`). Repeatable. Placed only on a node with that much free.
    #[arg(long = "resource", value_name = "NAME=AMOUNT", value_parser = parse_resource_arg)]
    pub resources: Vec<(String, u64)>,
    /// Fail at once if no connected node could ever run the task (a
    /// resource missing or too small everywhere) instead of waiting.
    #[arg(long)]
    pub fail_if_infeasible: bool,
}

impl PolicyOpts {
    /// `spec` with these settings applied.
    pub fn apply(&self, mut spec: TaskSpec) -> TaskSpec {
        if let Some(priority) = self.priority {
            spec = spec.priority(priority);
        }
        if let Some((key, weight)) = &self.fair_key {
            let weight = self.fair_weight.or(*weight).unwrap_or(1);
            spec = spec.fair_key(key, weight);
        }
        if let Some(key) = &self.concurrency_key {
            let on_limit = match self.on_limit.unwrap_or(OnLimit::Queue) {
                OnLimit::Queue => OverLimit::Queue,
                OnLimit::CancelNewest => OverLimit::CancelNewest,
                OnLimit::CancelOldest => OverLimit::CancelOldest,
            };
            spec = spec.concurrency(key, self.max_concurrent.unwrap_or(0), on_limit);
        }
        for (name, units) in &self.rate_limits {
            spec = spec.rate_limit(name, *units);
        }
        for (name, amount) in &self.resources {
            spec = spec.resource(name, *amount);
        }
        if self.fail_if_infeasible {
            spec = spec.fail_if_infeasible();
        }
        spec
    }
}

fn parse_key(text: &str) -> Result<String, String> {
    check_key("key", text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// `KEY` or `KEY:WEIGHT`.
pub fn parse_fair_key(text: &str) -> Result<(String, Option<u32>), String> {
    let (key, weight) = match text.rsplit_once(':') {
        Some((key, weight)) if !weight.is_empty() && weight.bytes().all(|b| b.is_ascii_digit()) => {
            let weight: u32 = weight
                .parse()
                .ok()
                .filter(|w| (1..=MAX_FAIR_WEIGHT).contains(w))
                .ok_or_else(|| format!("weight '{weight}' must be 1 to {MAX_FAIR_WEIGHT}"))?;
            (key, Some(weight))
        }
        _ => (text, None),
    };
    Ok((parse_key(key)?, weight))
}

/// `NAME` or `NAME:UNITS`.
pub fn parse_rate_use(text: &str) -> Result<(String, u32), String> {
    let (name, units) = match text.rsplit_once(':') {
        Some((name, units)) if !units.is_empty() && units.bytes().all(|b| b.is_ascii_digit()) => {
            let units: u32 = units
                .parse()
                .ok()
                .filter(|u| *u >= 1)
                .ok_or_else(|| format!("units '{units}' must be a whole number from 1"))?;
            (name, units)
        }
        _ => (text, 1),
    };
    Ok((parse_key(name)?, units))
}

fn parse_resource_arg(text: &str) -> Result<(String, u64), String> {
    parse_resource(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_units_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_fair_key("team-a").unwrap(), ("team-a".into(), None));
        assert_eq!(
            parse_fair_key("team-a:3").unwrap(),
            ("team-a".into(), Some(3))
        );
        assert!(parse_fair_key("team-a:0").is_err());
        assert!(parse_fair_key("a b").is_err());
        assert_eq!(parse_rate_use("api").unwrap(), ("api".into(), 1));
        assert_eq!(parse_rate_use("api:5").unwrap(), ("api".into(), 5));
        assert!(parse_rate_use("api:0").is_err());
        assert_eq!(
            parse_resource_arg("mem=2GiB").unwrap(),
            ("mem".into(), 2 << 30)
        );
    }

    #[test]
    fn the_flags_apply_to_the_spec() {
        let opts = PolicyOpts {
            priority: Some(8),
            fair_key: Some(("t".into(), Some(2))),
            concurrency_key: Some("user-42".into()),
            max_concurrent: Some(2),
            on_limit: Some(OnLimit::CancelOldest),
            rate_limits: vec![("api".into(), 3)],
            resources: vec![("gpu".into(), 1)],
            fail_if_infeasible: true,
            ..PolicyOpts::default()
        };
        let spec = opts.apply(TaskSpec::call("noop", ""));
        assert_eq!(
            (spec.priority, spec.fair_key.as_str(), spec.fair_weight),
            (8, "t", 2)
        );
        let conc = spec.concurrency.unwrap();
        assert_eq!(
            (conc.key.as_str(), conc.max_running, conc.on_limit),
            ("user-42", 2, OverLimit::CancelOldest)
        );
        assert_eq!(spec.rate_limits[0].units, 3);
        assert_eq!(spec.resources["gpu"], 1);
        assert!(spec.fail_if_infeasible);
    }
}
