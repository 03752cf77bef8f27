//! Flags shared by the commands that make tasks (`run`, `submit`, `call`,
//! `map`), the value parsers behind them (`k=v`, durations, ids), and how
//! they apply to a [`TaskSpec`]. No I/O except reading `--stdin-file`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use weft_client::TaskSpec;
use weft_proto::convert::parse_duration;
use weft_proto::{TaskId, TaskState, TraceContext};

/// Constraints and settings of the task(s) a command makes.
#[derive(Args, Debug, Clone, Default)]
pub struct TaskOpts {
    /// Slots the task occupies on its node while it runs.
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// Node label the task requires, as KEY=VALUE (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Kill an attempt that runs longer than this (e.g. 500ms, 30s, 5m); it ends TIMED_OUT.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub timeout: Option<Duration>,
    /// How long a call may wait while no connected node serves its handler
    /// (a worker restarting) before it fails; 0 waits forever (default:
    /// the coordinator's --schedule-timeout, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub schedule_timeout: Option<Duration>,
    /// Attempts allowed in all: default 1 for `run` and `call` (a failure is
    /// shown, not rerun with its output repeated), 3 for `submit` and `map`.
    /// Failures AND lost nodes both count against it.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Environment variable for the process, as KEY=VALUE (repeatable; exec tasks).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Secret environment variable, as KEY=VALUE or as KEY alone to take the
    /// value from this shell's environment (so it shows in neither the shell
    /// history nor `ps`); repeatable. For exec tasks (in the process's
    /// environment, winning over `--env`) and calls (on the handler's
    /// request). Given only to the node running the attempt: `weft get`,
    /// `list` and `watch` never show it, nor does any rpc answer.
    #[arg(long = "secret-env", value_name = "KEY[=VALUE]", value_parser = parse_secret_env)]
    pub secret_env: Vec<SecretArg>,
    /// Working directory on the node (exec tasks; default: the node's own).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Display name of the task (shown by `weft list`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// File whose bytes are fed to the process's stdin (exec tasks).
    #[arg(long, value_name = "FILE")]
    pub stdin_file: Option<PathBuf>,
    /// Continue this W3C trace: the task's spans (when the coordinator
    /// exports traces) become children of this `00-TRACE-SPAN-FLAGS`
    /// context, and the task's process or handler runs in the trace. Read
    /// from TRACEPARENT, as set by otel-cli and the OpenTelemetry SDKs; a
    /// malformed value is ignored with a warning.
    #[arg(long, env = "TRACEPARENT", value_name = "TRACEPARENT")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with --traceparent.
    #[arg(long, env = "TRACESTATE", value_name = "TRACESTATE")]
    pub tracestate: Option<String>,
    /// Scheduling policy (priority, fair key, limits, resources).
    #[command(flatten)]
    pub policy: crate::policy_opts::PolicyOpts,
}

impl TaskOpts {
    /// These settings for a command a person watches (`run`, `call`): one
    /// attempt unless `--max-attempts` says otherwise, so a failing command's
    /// output is not streamed again by retries.
    pub fn interactive(&self) -> TaskOpts {
        TaskOpts {
            max_attempts: Some(self.max_attempts.unwrap_or(1)),
            ..self.clone()
        }
    }

    /// `spec` with these settings applied; reads `--stdin-file` if given.
    pub fn apply(&self, spec: TaskSpec) -> anyhow::Result<TaskSpec> {
        let stdin = match &self.stdin_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading --stdin-file {}", path.display()))?,
            ),
            None => None,
        };
        Ok(self.apply_with_stdin(spec, stdin))
    }

    /// `spec` with these settings applied, `stdin` already read.
    pub fn apply_with_stdin(&self, mut spec: TaskSpec, stdin: Option<Vec<u8>>) -> TaskSpec {
        if let Some(slots) = self.slots {
            spec = spec.slots(slots);
        }
        for (key, value) in &self.labels {
            spec = spec.label(key, value);
        }
        if let Some(timeout) = self.timeout {
            spec = spec.timeout(timeout);
        }
        if let Some(timeout) = self.schedule_timeout {
            spec = spec.schedule_timeout(timeout);
        }
        if let Some(n) = self.max_attempts {
            spec = spec.max_attempts(n);
        }
        for (key, value) in &self.env {
            spec = spec.env(key, value);
        }
        for secret in &self.secret_env {
            spec = spec.secret_env(&secret.name, &secret.value);
        }
        if let Some(cwd) = &self.cwd {
            spec = spec.cwd(cwd);
        }
        if let Some(name) = &self.name {
            spec = spec.name(name);
        }
        if let Some(stdin) = stdin {
            spec = spec.stdin(stdin);
        }
        if let Some(trace) = self.trace() {
            spec = spec.trace(trace);
        }
        self.policy.apply(spec)
    }

    /// The trace to continue (`--traceparent`/`TRACEPARENT`), if valid; a
    /// malformed one is said once on stderr and ignored.
    pub fn trace(&self) -> Option<TraceContext> {
        let traceparent = self.traceparent.as_deref().filter(|t| !t.is_empty())?;
        let tracestate = self.tracestate.as_deref().unwrap_or("");
        match TraceContext::parse(traceparent, tracestate) {
            Ok(trace) => Some(trace),
            Err(err) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| eprintln!("weft: not continuing the trace: {err}"));
                None
            }
        }
    }

    /// The labels as a map.
    #[cfg(test)]
    pub fn label_map(&self) -> std::collections::BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }
}

/// Parses `KEY=VALUE` (the value may be empty and may contain `=`).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, _)) if key.trim().is_empty() => Err(format!(
            "expected KEY=VALUE, got {text:?}: the key is empty"
        )),
        Some((key, value)) => Ok((key.trim().to_owned(), value.to_owned())),
        None => Err(format!("expected KEY=VALUE, got {text:?}: no '='")),
    }
}

/// One `--secret-env`: its `Debug` shows the name only, like the spec's.
#[derive(Clone, PartialEq)]
pub struct SecretArg {
    /// The variable's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=<redacted>", self.name)
    }
}

/// Parses `--secret-env KEY=VALUE`, or `--secret-env KEY` with the value
/// from this process's environment.
pub fn parse_secret_env(text: &str) -> Result<SecretArg, String> {
    secret_from(text, |name| std::env::var(name).ok())
}

fn secret_from(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<SecretArg, String> {
    let (name, value) = match text.split_once('=') {
        Some((name, value)) => (name.trim(), value.to_owned()),
        None => {
            let name = text.trim();
            let value = lookup(name).ok_or_else(|| {
                format!(
                    "{name:?} is not set in this environment (give KEY=VALUE, or export {name} first)"
                )
            })?;
            (name, value)
        }
    };
    if name.is_empty() {
        return Err("expected KEY or KEY=VALUE: the key is empty".to_owned());
    }
    Ok(SecretArg {
        name: name.to_owned(),
        value,
    })
}

/// Parses a duration flag (`250ms`, `30s`, `1m30s`).
pub fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|err| err.to_string())
}

/// Parses a task id flag or argument.
pub fn parse_task_id(text: &str) -> Result<TaskId, String> {
    text.parse()
        .map_err(|err: weft_proto::ConversionError| err.to_string())
}

/// Parses a `--state` filter.
pub fn parse_task_state(text: &str) -> Result<TaskState, String> {
    text.parse()
        .map_err(|err: weft_proto::ConversionError| err.to_string())
}

#[cfg(test)]
mod tests {
    use weft_proto::TaskKind;

    use super::*;

    #[test]
    fn a_secret_takes_its_value_inline_or_from_the_environment() {
        let env = |name: &str| (name == "API_KEY").then(|| "from-env".to_owned());
        let inline = secret_from("TOKEN=a=b", env).unwrap();
        assert_eq!(
            (inline.name.as_str(), inline.value.as_str()),
            ("TOKEN", "a=b")
        );
        let from_env = secret_from("API_KEY", env).unwrap();
        assert_eq!(from_env.value, "from-env");
        let missing = secret_from("NOT_SET", env).unwrap_err();
        assert!(
            missing.contains("NOT_SET") && missing.contains("export"),
            "{missing}"
        );
        assert!(secret_from("=v", env).is_err());
        assert!(!format!("{inline:?}").contains("a=b"));
        let opts = TaskOpts {
            secret_env: vec![from_env],
            ..TaskOpts::default()
        };
        let spec = opts.apply_with_stdin(TaskSpec::exec(["true"]), None);
        assert_eq!(spec.secret_env.get("API_KEY"), Some("from-env"));
    }

    #[test]
    fn run_and_call_make_one_attempt_unless_told_otherwise() {
        let spec = |opts: TaskOpts| opts.apply_with_stdin(TaskSpec::exec(["true"]), None);
        assert_eq!(spec(TaskOpts::default()).max_attempts, 3);
        assert_eq!(spec(TaskOpts::default().interactive()).max_attempts, 1);
        let five = TaskOpts {
            max_attempts: Some(5),
            ..TaskOpts::default()
        };
        assert_eq!(spec(five.interactive()).max_attempts, 5);
    }

    #[test]
    fn key_value_splits_at_the_first_equals_sign() {
        assert_eq!(parse_key_value("gpu=1"), Ok(("gpu".into(), "1".into())));
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(
            parse_key_value("EMPTY="),
            Ok(("EMPTY".into(), String::new()))
        );
    }

    #[test]
    fn key_value_without_equals_or_key_is_an_error() {
        let err = parse_key_value("gpu").unwrap_err();
        assert!(err.contains("KEY=VALUE") && err.contains("no '='"), "{err}");
        let err = parse_key_value("=1").unwrap_err();
        assert!(err.contains("key is empty"), "{err}");
    }

    #[test]
    fn bad_durations_and_ids_are_refused_with_a_reason() {
        assert_eq!(parse_duration_arg("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration_arg("soon").unwrap_err().contains("duration"));
        assert!(parse_task_id("nope").unwrap_err().contains("task id"));
        assert_eq!(parse_task_state("timed-out"), Ok(TaskState::TimedOut));
    }

    #[test]
    fn options_apply_to_the_spec() {
        let opts = TaskOpts {
            slots: Some(2),
            labels: vec![("zone".into(), "a".into())],
            timeout: Some(Duration::from_secs(3)),
            schedule_timeout: Some(Duration::from_secs(40)),
            max_attempts: Some(5),
            env: vec![("A".into(), "1".into())],
            secret_env: Vec::new(),
            cwd: Some("/tmp".into()),
            name: Some("job".into()),
            stdin_file: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("k=v".into()),
            ..TaskOpts::default()
        };
        let spec = opts.apply_with_stdin(TaskSpec::exec(["true"]), Some(b"in".to_vec()));
        let trace = spec.trace.as_ref().expect("the trace is continued");
        assert_eq!(
            (trace.traceparent().as_str(), trace.state.as_str()),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "k=v"
            )
        );
        let malformed = TaskOpts {
            traceparent: Some("nope".into()),
            ..TaskOpts::default()
        };
        assert_eq!(
            malformed
                .apply_with_stdin(TaskSpec::exec(["true"]), None)
                .trace,
            None
        );
        assert_eq!(spec.slots, 2);
        assert_eq!(spec.labels, opts.label_map());
        assert_eq!(spec.timeout, Some(Duration::from_secs(3)));
        assert_eq!(spec.schedule_timeout, Some(Duration::from_secs(40)));
        assert_eq!((spec.max_attempts, spec.name.as_str()), (5, "job"));
        let TaskKind::Exec(exec) = spec.kind else {
            panic!("not an exec spec")
        };
        assert_eq!(exec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(exec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(&exec.stdin[..], b"in");
    }
}
