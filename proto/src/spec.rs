//! The validated task spec: what to run and under which constraints.
//!
//! `TryFrom<pb::TaskSpec>` is the single place a wire spec is checked, so
//! the coordinator refuses a bad spec with one clear message and every
//! later stage can trust it. The builders are what Rust callers and the CLI
//! use to make specs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::convert::{ConversionError, duration_from_pb, duration_to_pb, system_time, timestamp};
use crate::pb;
use crate::policy::{
    ConcurrencyLimit, DEFAULT_PRIORITY, Dependency, DependencyRule, MAX_DEPENDENCIES,
    MAX_FAIR_WEIGHT, MAX_PRIORITY, MAX_RATE_LIMIT_USES, RateLimitUse, Resources, check_key,
    check_resources,
};
use crate::trace::TraceContext;

/// Attempts allowed when a spec does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Largest `max_attempts` a spec may ask for.
pub const MAX_MAX_ATTEMPTS: u32 = 100;

/// A validated task spec.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    /// What runs.
    pub kind: TaskKind,
    /// Slots it occupies on its node while it runs (at least 1).
    pub slots: u32,
    /// Node labels that must all match.
    pub labels: BTreeMap<String, String>,
    /// Kill the attempt after this long.
    pub timeout: Option<Duration>,
    /// How long a call may wait for a connected node serving its handler
    /// (`None`: the coordinator's default; zero: forever).
    pub schedule_timeout: Option<Duration>,
    /// Attempts allowed in all (failures and node losses both count).
    pub max_attempts: u32,
    /// Free-form display name.
    pub name: String,
    /// Secret environment variables: given only to the node running an
    /// attempt, never shown to readers (see [`SecretEnv`]).
    pub secret_env: SecretEnv,
    /// The W3C trace context it runs under (the client's, or one the
    /// coordinator started); `None`: no trace.
    pub trace: Option<TraceContext>,
    /// 1 (lowest) to 9 (highest); [`DEFAULT_PRIORITY`] when not said.
    pub priority: u8,
    /// Fair-share key within a priority (empty: the shared key).
    pub fair_key: String,
    /// The key's weight (1 to 1000).
    pub fair_weight: u32,
    /// A concurrency key and its limit.
    pub concurrency: Option<ConcurrencyLimit>,
    /// Units taken from named rate limits when assigned.
    pub rate_limits: Vec<RateLimitUse>,
    /// Node resources held while assigned or running (amounts > 0 only).
    /// Shared by clones of the spec (see [`Resources`]).
    pub resources: Resources,
    /// The tasks it runs after; stored only as [`Dependency::Task`] (the
    /// coordinator resolves refs before anything is committed).
    pub after: Vec<Dependency>,
    /// When it may run given its parents' final states.
    pub after_rule: DependencyRule,
    /// Not queued before this time.
    pub not_before: Option<SystemTime>,
    /// Its name within its Submit, for `after` refs (empty: none).
    pub ref_name: String,
    /// Fail at once when no connected node could ever run it.
    pub fail_if_infeasible: bool,
}

/// Secret environment variables of a task (name -> value). Its `Debug` and
/// `Display` print the names only, so a spec that ends up in a log line
/// never carries the values with it. The values are read only where they
/// are used: [`iter`](Self::iter), [`get`](Self::get).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEnv(BTreeMap<String, String>);

impl SecretEnv {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sets `name` to `value`.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Names and values, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The map itself, for encoding from a borrow (`spec_wire`).
    pub(crate) fn map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The wire form (for `TaskSpec.secret_env` and the store).
    pub fn to_pb(&self) -> BTreeMap<String, String> {
        self.0.clone()
    }
}

impl FromIterator<(String, String)> for SecretEnv {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        SecretEnv(iter.into_iter().collect())
    }
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted)))
            .finish()
    }
}

/// A wire-form secret map as `Debug` may show it: names only.
struct RedactedValues<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedValues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, Redacted)))
            .finish()
    }
}

impl fmt::Display for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, name) in self.0.keys().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        f.write_str("]")
    }
}

/// Stands in for a secret value in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Written by hand (`build.rs` skips the derived one) so that
/// `secret_env` shows its names only: every message that holds a spec
/// (`Assignment`, `Task`, `SubmitRequest`, ...) prints through this. A new
/// field of `TaskSpec` is to be added here too.
impl fmt::Debug for pb::TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("kind", &self.kind)
            .field("slots", &self.slots)
            .field("labels", &self.labels)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("name", &self.name)
            .field("secret_env", &RedactedValues(&self.secret_env))
            .field("schedule_timeout", &self.schedule_timeout)
            .field("trace", &self.trace)
            .field("priority", &self.priority)
            .field("fair_key", &self.fair_key)
            .field("fair_weight", &self.fair_weight)
            .field("concurrency", &self.concurrency)
            .field("rate_limits", &self.rate_limits)
            .field("resources", &self.resources)
            .field("after", &self.after)
            .field("after_rule", &self.after_rule)
            .field("not_before", &self.not_before)
            .field("ref", &self.r#ref)
            .field("fail_if_infeasible", &self.fail_if_infeasible)
            .finish()
    }
}

/// Skipped with its message by `build.rs`'s `skip_debug`, so written here.
impl fmt::Debug for pb::task_spec::Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            pb::task_spec::Kind::Exec(exec) => f.debug_tuple("Exec").field(exec).finish(),
            pb::task_spec::Kind::Call(call) => f.debug_tuple("Call").field(call).finish(),
        }
    }
}

/// The two kinds of work.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskKind {
    /// A child process.
    Exec(ExecSpec),
    /// A named handler on the node.
    Call(CallSpec),
}

/// A child process to run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ExecSpec {
    /// Program and arguments (non-empty; argv[0] looked up in PATH).
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` is the node's own.
    pub cwd: Option<String>,
    /// Bytes fed to stdin, which is then closed.
    pub stdin: Bytes,
}

/// A handler call.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CallSpec {
    /// Registered handler name.
    pub handler: String,
    /// Input bytes.
    pub input: Bytes,
}

impl TaskSpec {
    fn with_kind(kind: TaskKind) -> Self {
        TaskSpec {
            kind,
            slots: 1,
            labels: BTreeMap::new(),
            timeout: None,
            schedule_timeout: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            name: String::new(),
            secret_env: SecretEnv::new(),
            trace: None,
            priority: DEFAULT_PRIORITY,
            fair_key: String::new(),
            fair_weight: 1,
            concurrency: None,
            rate_limits: Vec::new(),
            resources: Resources::default(),
            after: Vec::new(),
            after_rule: DependencyRule::AllSucceeded,
            not_before: None,
            ref_name: String::new(),
            fail_if_infeasible: false,
        }
    }

    /// Runs `argv` as a child process.
    pub fn exec<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_kind(TaskKind::Exec(ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecSpec::default()
        }))
    }

    /// Calls handler `handler` with `input`.
    pub fn call(handler: impl Into<String>, input: impl Into<Bytes>) -> Self {
        Self::with_kind(TaskKind::Call(CallSpec {
            handler: handler.into(),
            input: input.into(),
        }))
    }

    /// Sets the slots the task needs.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Requires node label `key=value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Fails a call that waited `timeout` for a connected node serving its
    /// handler (zero: it waits forever).
    pub fn schedule_timeout(mut self, timeout: Duration) -> Self {
        self.schedule_timeout = Some(timeout);
        self
    }

    /// Kills the attempt after `timeout`. Not set: no limit. Zero is not
    /// "no limit": the coordinator refuses such a spec at submit
    /// (`INVALID_ARGUMENT` naming `timeout`), so leave it unset instead.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Allows `n` attempts in all.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets an environment variable (exec tasks; ignored for calls).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        if let TaskKind::Exec(exec) = &mut self.kind {
            exec.env.insert(key.into(), value.into());
        }
        self
    }

    /// Sets a secret environment variable (exec and call tasks): the process
    /// gets it in its environment, a handler on its request; no reader of
    /// the task ever sees it.
    pub fn secret_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.secret_env.insert(key, value);
        self
    }

    /// Runs the task under the W3C trace context `trace` (its spans, and
    /// those of whatever runs it, join that trace).
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Sets the priority, 1 (lowest) to 9 (highest).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Shares the cluster fairly with other keys of its priority, with
    /// `weight` (1 to 1000).
    pub fn fair_key(mut self, key: impl Into<String>, weight: u32) -> Self {
        self.fair_key = key.into();
        self.fair_weight = weight;
        self
    }

    /// At most `max_running` tasks of `key` assigned or running at once (0:
    /// the limit set for the key); `on_limit` says what happens to the rest.
    pub fn concurrency(
        mut self,
        key: impl Into<String>,
        max_running: u32,
        on_limit: crate::policy::OverLimit,
    ) -> Self {
        self.concurrency = Some(ConcurrencyLimit {
            key: key.into(),
            max_running,
            on_limit,
        });
        self
    }

    /// Takes `units` from the rate limit `name` when assigned.
    pub fn rate_limit(mut self, name: impl Into<String>, units: u32) -> Self {
        self.rate_limits.push(RateLimitUse {
            name: name.into(),
            units,
        });
        self
    }

    /// Holds `amount` of node resource `name` while it runs.
    pub fn resource(mut self, name: impl Into<String>, amount: u64) -> Self {
        self.resources.insert(name, amount);
        self
    }

    /// Runs after task `id` (see [`after_rule`](Self::after_rule)).
    pub fn after(mut self, id: crate::ids::TaskId) -> Self {
        self.after.push(Dependency::Task(id));
        self
    }

    /// Runs after the task of the same Submit whose ref is `name`.
    pub fn after_ref(mut self, name: impl Into<String>) -> Self {
        self.after.push(Dependency::Ref(name.into()));
        self
    }

    /// When it may run given its parents' final states.
    pub fn after_rule(mut self, rule: DependencyRule) -> Self {
        self.after_rule = rule;
        self
    }

    /// Not queued before `at`.
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Names it within its Submit, for other tasks' `after_ref`.
    pub fn ref_name(mut self, name: impl Into<String>) -> Self {
        self.ref_name = name.into();
        self
    }

    /// Fails it at once when no connected node could ever run it.
    pub fn fail_if_infeasible(mut self) -> Self {
        self.fail_if_infeasible = true;
        self
    }

    /// Sets the working directory (exec tasks; ignored for calls).
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        if let TaskKind::Exec(exec) = &mut self.kind {
            exec.cwd = Some(cwd.into());
        }
        self
    }

    /// Sets the bytes fed to stdin (exec tasks; ignored for calls).
    pub fn stdin(mut self, stdin: impl Into<Bytes>) -> Self {
        if let TaskKind::Exec(exec) = &mut self.kind {
            exec.stdin = stdin.into();
        }
        self
    }

    /// True when a node with `labels` satisfies every required label.
    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// One line describing what runs, for logs and `weft list`.
    pub fn summary(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        match &self.kind {
            TaskKind::Exec(exec) => exec.argv.join(" "),
            TaskKind::Call(call) => format!("call {}", call.handler),
        }
    }
}

impl TryFrom<pb::TaskSpec> for TaskSpec {
    type Error = ConversionError;

    fn try_from(spec: pb::TaskSpec) -> Result<Self, Self::Error> {
        let kind = match spec.kind {
            None => return Err(ConversionError::MissingField("kind (exec or call)")),
            Some(pb::task_spec::Kind::Exec(exec)) => {
                if exec.argv.is_empty() {
                    return Err(invalid("exec.argv", "must name a program"));
                }
                if exec.argv[0].is_empty() {
                    return Err(invalid("exec.argv", "argv[0] must not be empty"));
                }
                if exec.argv.iter().any(|a| a.contains('\0')) {
                    return Err(invalid("exec.argv", "arguments must not contain NUL bytes"));
                }
                check_env("exec.env", &exec.env)?;
                TaskKind::Exec(ExecSpec {
                    argv: exec.argv,
                    env: exec.env,
                    cwd: (!exec.cwd.is_empty()).then_some(exec.cwd),
                    stdin: exec.stdin,
                })
            }
            Some(pb::task_spec::Kind::Call(call)) => {
                if call.handler.trim().is_empty() {
                    return Err(invalid("call.handler", "must name a handler"));
                }
                TaskKind::Call(CallSpec {
                    handler: call.handler,
                    input: call.input,
                })
            }
        };
        check_env("secret_env", &spec.secret_env)?;
        if spec.labels.keys().any(|k| k.is_empty()) {
            return Err(invalid("labels", "label keys must not be empty"));
        }
        let max_attempts = match spec.max_attempts {
            0 => DEFAULT_MAX_ATTEMPTS,
            n if n > MAX_MAX_ATTEMPTS => {
                return Err(invalid(
                    "max_attempts",
                    &format!("{n} is more than the allowed {MAX_MAX_ATTEMPTS}"),
                ));
            }
            n => n,
        };
        let timeout = match &spec.timeout {
            None => None,
            Some(d) => {
                let d = duration_from_pb("timeout", d)?;
                if d.is_zero() {
                    return Err(invalid("timeout", "must be greater than zero when set"));
                }
                Some(d)
            }
        };
        let schedule_timeout = spec
            .schedule_timeout
            .as_ref()
            .map(|d| duration_from_pb("schedule_timeout", d))
            .transpose()?;
        let trace = spec
            .trace
            .as_ref()
            .map(TraceContext::try_from)
            .transpose()?;
        let priority = match spec.priority {
            0 => DEFAULT_PRIORITY,
            p if p > u32::from(MAX_PRIORITY) => {
                return Err(invalid(
                    "priority",
                    &format!("{p} is outside 1 (lowest) to {MAX_PRIORITY} (highest)"),
                ));
            }
            p => p as u8,
        };
        if !spec.fair_key.is_empty() {
            check_key("fair_key", &spec.fair_key)?;
        }
        let fair_weight = match spec.fair_weight {
            0 => 1,
            w if w > MAX_FAIR_WEIGHT => {
                return Err(invalid(
                    "fair_weight",
                    &format!("{w} is outside 1 to {MAX_FAIR_WEIGHT}"),
                ));
            }
            w => w,
        };
        let concurrency = spec
            .concurrency
            .map(ConcurrencyLimit::try_from)
            .transpose()?;
        if spec.rate_limits.len() > MAX_RATE_LIMIT_USES {
            return Err(invalid(
                "rate_limits",
                &format!("at most {MAX_RATE_LIMIT_USES} per task"),
            ));
        }
        let mut rate_limits = Vec::with_capacity(spec.rate_limits.len());
        for used in spec.rate_limits {
            check_key("rate_limits.name", &used.name)?;
            rate_limits.push(RateLimitUse {
                name: used.name,
                units: used.units.max(1),
            });
        }
        let resources = Resources::from(check_resources("resources", spec.resources)?);
        if spec.after.len() > MAX_DEPENDENCIES {
            return Err(invalid(
                "after",
                &format!("at most {MAX_DEPENDENCIES} tasks to run after"),
            ));
        }
        let after = spec
            .after
            .into_iter()
            .map(Dependency::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let after_rule = DependencyRule::try_from(spec.after_rule)?;
        if !spec.r#ref.is_empty() {
            check_key("ref", &spec.r#ref)?;
        }
        if let Some(at) = &spec.not_before
            && at.seconds > LATEST_START_SECS
        {
            return Err(invalid(
                "not_before",
                "a start time after 9999-12-31T23:59:59Z; give a time in the next 8,000 years",
            ));
        }
        Ok(TaskSpec {
            priority,
            fair_key: spec.fair_key,
            fair_weight,
            concurrency,
            rate_limits,
            resources,
            after,
            after_rule,
            not_before: spec.not_before.as_ref().map(system_time),
            ref_name: spec.r#ref,
            fail_if_infeasible: spec.fail_if_infeasible,
            kind,
            slots: spec.slots.max(1),
            labels: spec.labels,
            timeout,
            schedule_timeout,
            max_attempts,
            name: spec.name,
            secret_env: spec.secret_env.into_iter().collect(),
            trace,
        })
    }
}

/// Environment names must be non-empty, without '=' or NUL; values
/// without NUL (the OS could not pass them on).
fn check_env(field: &'static str, env: &BTreeMap<String, String>) -> Result<(), ConversionError> {
    if env.keys().any(|k| k.is_empty() || k.contains(['=', '\0'])) {
        return Err(invalid(
            field,
            "names must be non-empty, without '=' or NUL",
        ));
    }
    if env.values().any(|v| v.contains('\0')) {
        return Err(invalid(field, "values must not contain NUL bytes"));
    }
    Ok(())
}

/// What a task runs, in its wire form, built from a borrow (its input or
/// stdin shared, not copied).
impl From<&TaskKind> for pb::task_spec::Kind {
    fn from(kind: &TaskKind) -> Self {
        match kind {
            TaskKind::Exec(exec) => pb::task_spec::Kind::Exec(pb::ExecSpec {
                argv: exec.argv.clone(),
                env: exec.env.clone(),
                cwd: exec.cwd.clone().unwrap_or_default(),
                stdin: exec.stdin.clone(),
            }),
            TaskKind::Call(call) => pb::task_spec::Kind::Call(pb::CallSpec {
                handler: call.handler.clone(),
                input: call.input.clone(),
            }),
        }
    }
}

/// The wire form, built from a borrow: what the coordinator sends with
/// every assignment and writes with every task record, without first
/// copying the whole spec only to take it apart.
impl From<&TaskSpec> for pb::TaskSpec {
    fn from(spec: &TaskSpec) -> Self {
        pb::TaskSpec {
            kind: Some(pb::task_spec::Kind::from(&spec.kind)),
            slots: spec.slots,
            labels: spec.labels.clone(),
            timeout: spec.timeout.map(duration_to_pb),
            max_attempts: spec.max_attempts,
            name: spec.name.clone(),
            secret_env: spec.secret_env.to_pb(),
            schedule_timeout: spec.schedule_timeout.map(duration_to_pb),
            trace: spec.trace.as_ref().map(TraceContext::to_pb),
            priority: u32::from(spec.priority),
            fair_key: spec.fair_key.clone(),
            fair_weight: spec.fair_weight,
            concurrency: spec.concurrency.as_ref().map(pb::ConcurrencyLimit::from),
            rate_limits: spec
                .rate_limits
                .iter()
                .map(|used| pb::RateLimitUse {
                    name: used.name.clone(),
                    units: used.units,
                })
                .collect(),
            resources: (*spec.resources).clone(),
            after: spec.after.iter().map(pb::Dependency::from).collect(),
            after_rule: i32::from(spec.after_rule),
            not_before: spec.not_before.map(timestamp),
            r#ref: spec.ref_name.clone(),
            fail_if_infeasible: spec.fail_if_infeasible,
        }
    }
}

/// The wire form of an owned spec (what a client submits): the same
/// message as from a borrow, its strings, lists and maps moved instead of
/// copied (a client building many specs allocates each once).
impl From<TaskSpec> for pb::TaskSpec {
    fn from(spec: TaskSpec) -> Self {
        let kind = match spec.kind {
            TaskKind::Exec(exec) => pb::task_spec::Kind::Exec(pb::ExecSpec {
                argv: exec.argv,
                env: exec.env,
                cwd: exec.cwd.unwrap_or_default(),
                stdin: exec.stdin,
            }),
            TaskKind::Call(call) => pb::task_spec::Kind::Call(pb::CallSpec {
                handler: call.handler,
                input: call.input,
            }),
        };
        pb::TaskSpec {
            kind: Some(kind),
            slots: spec.slots,
            labels: spec.labels,
            timeout: spec.timeout.map(duration_to_pb),
            max_attempts: spec.max_attempts,
            name: spec.name,
            secret_env: spec.secret_env.0,
            schedule_timeout: spec.schedule_timeout.map(duration_to_pb),
            trace: spec.trace.as_ref().map(TraceContext::to_pb),
            priority: u32::from(spec.priority),
            fair_key: spec.fair_key,
            fair_weight: spec.fair_weight,
            concurrency: spec.concurrency.as_ref().map(pb::ConcurrencyLimit::from),
            rate_limits: spec
                .rate_limits
                .into_iter()
                .map(|used| pb::RateLimitUse {
                    name: used.name,
                    units: used.units,
                })
                .collect(),
            resources: spec.resources.into_map(),
            after: spec.after.iter().map(pb::Dependency::from).collect(),
            after_rule: i32::from(spec.after_rule),
            not_before: spec.not_before.map(timestamp),
            r#ref: spec.ref_name,
            fail_if_infeasible: spec.fail_if_infeasible,
        }
    }
}

/// The latest start time a spec may ask for (`not_before`),
/// 9999-12-31T23:59:59Z in seconds since the Unix epoch: times are shown
/// in RFC 3339, whose years have four digits.
const LATEST_START_SECS: i64 = 253_402_300_799;

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
    fn a_start_time_past_the_year_9999_is_refused_and_the_last_second_taken() {
        let at = |seconds| pb::TaskSpec {
            kind: Some(pb::task_spec::Kind::Call(pb::CallSpec {
                handler: "noop".into(),
                input: Default::default(),
            })),
            not_before: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        };
        let last = TaskSpec::try_from(at(LATEST_START_SECS)).expect("9999-12-31T23:59:59Z");
        assert_eq!(
            humantime::format_rfc3339_seconds(last.not_before.expect("a start time")).to_string(),
            "9999-12-31T23:59:59Z"
        );
        for seconds in [LATEST_START_SECS + 1, i64::MAX] {
            let err = TaskSpec::try_from(at(seconds)).expect_err("refused");
            assert!(err.to_string().contains("not_before"), "{err}");
        }
    }

    #[test]
    fn a_timeout_or_schedule_timeout_past_a_hundred_years_is_refused() {
        let huge = Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        });
        let call = Some(pb::task_spec::Kind::Call(pb::CallSpec {
            handler: "noop".into(),
            input: Default::default(),
        }));
        let timeout = pb::TaskSpec {
            kind: call.clone(),
            timeout: huge,
            ..Default::default()
        };
        let schedule_timeout = pb::TaskSpec {
            kind: call,
            schedule_timeout: huge,
            ..Default::default()
        };
        for (spec, field) in [(timeout, "timeout"), (schedule_timeout, "schedule_timeout")] {
            let err = TaskSpec::try_from(spec).expect_err("refused");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn spec_round_trips_through_the_wire_form() {
        let spec = TaskSpec::exec(["sh", "-c", "echo hi"])
            .slots(2)
            .label("zone", "a")
            .timeout(Duration::from_secs(3))
            .max_attempts(5)
            .env("A", "1")
            .stdin("in");
        let back = TaskSpec::try_from(pb::TaskSpec::from(spec.clone())).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn an_owned_spec_and_a_borrowed_one_make_the_same_message() {
        let mut every = TaskSpec::exec(["sh", "-c", "echo hi"])
            .slots(2)
            .label("zone", "a")
            .timeout(Duration::from_secs(3))
            .max_attempts(5)
            .env("A", "1")
            .stdin("in")
            .priority(7)
            .fair_key("team-a", 3)
            .concurrency("user-42", 2, crate::OverLimit::CancelOldest)
            .resource("gpu", 2)
            .ref_name("build");
        every.name = "named".into();
        every.secret_env.insert("TOKEN", "s3cret");
        every.schedule_timeout = Some(Duration::from_secs(9));
        every.rate_limits.push(crate::RateLimitUse {
            name: "api".into(),
            units: 3,
        });
        every.not_before = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
        every.fail_if_infeasible = true;
        let call = TaskSpec::call("echo", "input").label("k", "v");
        for spec in [every, call] {
            assert_eq!(pb::TaskSpec::from(spec.clone()), pb::TaskSpec::from(&spec));
        }
    }

    #[test]
    fn defaults_fill_zero_slots_and_attempts() {
        let wire = pb::TaskSpec {
            kind: Some(pb::task_spec::Kind::Call(pb::CallSpec {
                handler: "noop".into(),
                input: Bytes::new(),
            })),
            ..Default::default()
        };
        let spec = TaskSpec::try_from(wire).unwrap();
        assert_eq!((spec.slots, spec.max_attempts), (1, DEFAULT_MAX_ATTEMPTS));
    }

    #[test]
    fn spec_without_kind_or_with_empty_argv_is_refused() {
        let err = TaskSpec::try_from(pb::TaskSpec::default()).unwrap_err();
        assert_eq!(err, ConversionError::MissingField("kind (exec or call)"));
        let empty = pb::TaskSpec::from(TaskSpec::exec(Vec::<String>::new()));
        assert!(
            TaskSpec::try_from(empty)
                .unwrap_err()
                .to_string()
                .contains("exec.argv")
        );
        let blank = pb::TaskSpec::from(TaskSpec::call(" ", ""));
        assert!(
            TaskSpec::try_from(blank)
                .unwrap_err()
                .to_string()
                .contains("call.handler")
        );
    }

    #[test]
    fn secret_env_round_trips_and_is_checked_like_env() {
        let spec = TaskSpec::call("echo", "").secret_env("API_KEY", "s3cr3t");
        let back = TaskSpec::try_from(pb::TaskSpec::from(spec.clone())).unwrap();
        assert_eq!(back.secret_env.get("API_KEY"), Some("s3cr3t"));
        for (name, value) in [("", "v"), ("A=B", "v"), ("A", "x\0y")] {
            let mut wire = pb::TaskSpec::from(TaskSpec::call("echo", ""));
            wire.secret_env.insert(name.into(), value.into());
            let err = TaskSpec::try_from(wire).unwrap_err().to_string();
            assert!(err.contains("secret_env"), "{err}");
        }
    }

    #[test]
    fn debug_and_display_never_show_a_secret_value() {
        let spec = TaskSpec::exec(["true"]).secret_env("API_KEY", "s3cr3t");
        let wire = pb::TaskSpec::from(spec.clone());
        let assign = pb::Assignment {
            task_id: "t".into(),
            attempt: 1,
            spec: Some(wire.clone()),
            trace: None,
            parents: Vec::new(),
        };
        for shown in [
            format!("{spec:?}"),
            format!("{spec:#?}"),
            format!("{}", spec.secret_env),
            format!("{wire:?}"),
            format!("{assign:?}"),
        ] {
            assert!(shown.contains("API_KEY"), "{shown}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[test]
    fn a_trace_context_round_trips_and_a_bad_one_is_refused() {
        let ctx = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "a=b",
        )
        .unwrap();
        let spec = TaskSpec::call("echo", "").trace(ctx);
        let back = TaskSpec::try_from(pb::TaskSpec::from(spec.clone())).unwrap();
        assert_eq!(back, spec);
        let mut wire = pb::TaskSpec::from(TaskSpec::call("echo", ""));
        wire.trace = Some(pb::TraceContext {
            traceparent: "00-zz".into(),
            tracestate: String::new(),
        });
        let err = TaskSpec::try_from(wire).unwrap_err().to_string();
        assert!(err.contains("trace.traceparent"), "{err}");
    }

    #[test]
    fn policy_fields_round_trip_and_defaults_apply() {
        let parent = crate::ids::TaskId::new();
        let spec = TaskSpec::call("noop", "")
            .priority(8)
            .fair_key("team-a", 3)
            .concurrency("user-42", 2, crate::policy::OverLimit::CancelOldest)
            .rate_limit("api", 2)
            .resource("gpu", 1)
            .after(parent)
            .after_ref("prep")
            .after_rule(DependencyRule::AnyFailed)
            .not_before(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000))
            .ref_name("train")
            .fail_if_infeasible();
        let back = TaskSpec::try_from(pb::TaskSpec::from(spec.clone())).unwrap();
        assert_eq!(back, spec);
        let plain = TaskSpec::try_from(pb::TaskSpec::from(TaskSpec::call("noop", ""))).unwrap();
        assert_eq!((plain.priority, plain.fair_weight), (DEFAULT_PRIORITY, 1));
        assert_eq!(plain.after_rule, DependencyRule::AllSucceeded);
    }

    #[test]
    fn out_of_range_policy_fields_are_refused_naming_the_field() {
        type Break = fn(&mut pb::TaskSpec);
        let cases: [(&str, Break); 6] = [
            ("priority", |s| s.priority = 10),
            ("fair_weight", |s| s.fair_weight = 1001),
            ("fair_key", |s| s.fair_key = "a b".into()),
            ("resources", |s| {
                s.resources.insert("GPU".into(), 1);
            }),
            ("concurrency.key", |s| {
                s.concurrency = Some(pb::ConcurrencyLimit::default());
            }),
            ("after_rule", |s| s.after_rule = 99),
        ];
        for (field, break_it) in cases {
            let mut wire = pb::TaskSpec::from(TaskSpec::call("noop", ""));
            break_it(&mut wire);
            let err = TaskSpec::try_from(wire).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn labels_must_all_match() {
        let spec = TaskSpec::call("noop", "")
            .label("gpu", "1")
            .label("zone", "a");
        let mut labels = BTreeMap::from([("gpu".to_owned(), "1".to_owned())]);
        assert!(!spec.matches_labels(&labels));
        labels.insert("zone".into(), "a".into());
        assert!(spec.matches_labels(&labels));
    }
}
