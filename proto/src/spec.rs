//! The validated task spec: what to run and under which constraints.
//!
//! `TryFrom<pb::TaskSpec>` is the single place a wire spec is checked, so
//! the coordinator refuses a bad spec with one clear message and every
//! later stage can trust it. The builders are what Rust callers and the CLI
//! use to make specs.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::convert::{ConversionError, duration_from_pb, duration_to_pb};
use crate::pb;

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
    /// Attempts allowed in all (failures and node losses both count).
    pub max_attempts: u32,
    /// Free-form display name.
    pub name: String,
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
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            name: String::new(),
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

    /// Kills the attempt after `timeout`.
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
                if exec
                    .env
                    .keys()
                    .any(|k| k.is_empty() || k.contains(['=', '\0']))
                {
                    return Err(invalid(
                        "exec.env",
                        "names must be non-empty, without '=' or NUL",
                    ));
                }
                if exec.env.values().any(|v| v.contains('\0')) {
                    return Err(invalid("exec.env", "values must not contain NUL bytes"));
                }
                TaskKind::Exec(ExecSpec {
                    argv: exec.argv,
                    env: exec.env.into_iter().collect(),
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
        Ok(TaskSpec {
            kind,
            slots: spec.slots.max(1),
            labels: spec.labels.into_iter().collect(),
            timeout,
            max_attempts,
            name: spec.name,
        })
    }
}

/// The wire form, built from a borrow: what the coordinator sends with
/// every assignment and writes with every task record, without first
/// copying the whole spec only to take it apart.
impl From<&TaskSpec> for pb::TaskSpec {
    fn from(spec: &TaskSpec) -> Self {
        let kind = match &spec.kind {
            TaskKind::Exec(exec) => pb::task_spec::Kind::Exec(pb::ExecSpec {
                argv: exec.argv.clone(),
                env: exec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                cwd: exec.cwd.clone().unwrap_or_default(),
                stdin: exec.stdin.clone(),
            }),
            TaskKind::Call(call) => pb::task_spec::Kind::Call(pb::CallSpec {
                handler: call.handler.clone(),
                input: call.input.clone(),
            }),
        };
        pb::TaskSpec {
            kind: Some(kind),
            slots: spec.slots,
            labels: spec
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: spec.timeout.map(duration_to_pb),
            max_attempts: spec.max_attempts,
            name: spec.name.clone(),
        }
    }
}

/// The wire form of an owned spec (what a client submits): the same
/// message as from a borrow. Payloads (`stdin`, `input`) are shared, not
/// copied.
impl From<TaskSpec> for pb::TaskSpec {
    fn from(spec: TaskSpec) -> Self {
        pb::TaskSpec::from(&spec)
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
