//! [`ExecPolicy`]: which exec tasks a node runs (`Register.exec` and
//! `Register.exec_allow`), its validation, and the one matching rule the
//! coordinator (to choose nodes) and the node (to refuse what it is
//! assigned anyway) share.
//!
//! The rule: a program on an allow-list matches a task's `argv[0]` as an
//! exact string. An entry is a bare name (no `/`: it matches only a bare
//! `argv[0]` of that name, which the node looks up in its `PATH`) or an
//! absolute path (it matches only `argv[0]` spelled as exactly that path).
//! Nothing is resolved or normalised, so `/usr/bin/python3` on the list does
//! not allow `python3`, nor `python3` allow `/tmp/python3`. Relative paths
//! (`./x`, `bin/x`) are refused as entries: they would depend on the task's
//! `cwd`, which the submitter chooses.
//!
//! An allow-list also refuses a task whose `env` or `secret_env` sets a
//! variable that chooses which code runs (see [`loader_variable`]):
//! `LD_PRELOAD` and the other dynamic-loader variables for any program,
//! and `PATH` when `argv[0]` is a bare name. Both maps count: the node
//! applies `secret_env` after `env`, so either may set them.
//!
//! No I/O here.

use std::collections::BTreeSet;

use crate::convert::ConversionError;
use crate::pb;
use crate::spec::{ExecSpec, TaskKind, TaskSpec};

/// Most programs one allow-list may name.
pub const MAX_EXEC_ALLOW: usize = 1024;
/// Longest program entry, in bytes.
pub const MAX_EXEC_ALLOW_LEN: usize = 4096;

/// Which exec tasks a node runs. Call tasks are never affected.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ExecPolicy {
    /// Any program (what a node that says nothing gets, for compatibility).
    #[default]
    Allow,
    /// No exec task at all.
    Deny,
    /// Only these programs (see the module docs for the matching rule);
    /// never empty.
    Programs(BTreeSet<String>),
}

impl ExecPolicy {
    /// An allow-list of `programs`, each checked (bare name or absolute
    /// path, not empty, not too long; at most [`MAX_EXEC_ALLOW`]).
    pub fn programs<I, S>(programs: I) -> Result<Self, ConversionError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = BTreeSet::new();
        for program in programs {
            let program = program.into();
            if let Some(reason) = entry_error(&program) {
                return Err(invalid(reason, &program));
            }
            set.insert(program);
            if set.len() > MAX_EXEC_ALLOW {
                return Err(ConversionError::Invalid {
                    field: "exec_allow",
                    reason: format!("more than {MAX_EXEC_ALLOW} programs"),
                });
            }
        }
        if set.is_empty() {
            return Err(ConversionError::Invalid {
                field: "exec_allow",
                reason: "an allow-list names at least one program (use EXEC_POLICY_DENY for none)"
                    .into(),
            });
        }
        Ok(ExecPolicy::Programs(set))
    }

    /// True when this node may run a task whose `argv[0]` is `program`.
    pub fn allows_program(&self, program: &str) -> bool {
        match self {
            ExecPolicy::Allow => true,
            ExecPolicy::Deny => false,
            ExecPolicy::Programs(set) => set.contains(program),
        }
    }

    /// True when this node may be given `spec`: any call task, and the
    /// exec tasks it would run ([`refusal`](Self::refusal) with the
    /// names of `spec.secret_env`). An exec task with an empty argv counts
    /// as allowed only where every program is (the node then fails it
    /// `START_FAILED` as it always did).
    pub fn allows(&self, spec: &TaskSpec) -> bool {
        match &spec.kind {
            TaskKind::Call(_) => true,
            TaskKind::Exec(exec) if exec.argv.is_empty() => *self == ExecPolicy::Allow,
            TaskKind::Exec(exec) => self.refusal(exec, spec.secret_env.names()).is_none(),
        }
    }

    /// Why a node with this policy refuses to run `exec`, whose task's
    /// `secret_env` has the names `secret_names`, or `None` when it runs
    /// it. Besides the program, an allow-list refuses a task that sets a
    /// [`loader_variable`] in `env` or `secret_env` (`PATH` only with a
    /// bare name): that variable would choose which code runs.
    pub fn refusal<'a>(
        &self,
        exec: &ExecSpec,
        secret_names: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        let program = exec.argv.first().map_or("", String::as_str);
        match self {
            ExecPolicy::Allow => None,
            ExecPolicy::Deny => {
                Some("this node does not run exec tasks (its exec policy is deny)".into())
            }
            ExecPolicy::Programs(set) if !set.contains(program) => {
                let mut listed: Vec<&str> = set.iter().take(10).map(String::as_str).collect();
                if set.len() > listed.len() {
                    listed.push("...");
                }
                Some(format!(
                    "this node does not run program {program:?} (its exec allow-list: {})",
                    listed.join(", ")
                ))
            }
            ExecPolicy::Programs(_) => {
                if let Some(name) = exec.env.keys().find(|n| loader_variable(program, n)) {
                    return Some(unsafe_env(program, "env", name));
                }
                let name = secret_names
                    .into_iter()
                    .find(|n| loader_variable(program, n))?;
                Some(unsafe_env(program, "secret_env", name))
            }
        }
    }

    /// The policy a node declared in `Register` (`exec`, `exec_allow`).
    /// Unset is [`ExecPolicy::Allow`] (nodes from before the field).
    pub fn from_pb(exec: i32, exec_allow: Vec<String>) -> Result<Self, ConversionError> {
        let policy = pb::ExecPolicy::try_from(exec).map_err(|_| ConversionError::InvalidValue {
            what: "exec",
            value: exec.to_string(),
            expected: "EXEC_POLICY_ALLOW, EXEC_POLICY_DENY, EXEC_POLICY_ALLOW_LIST".into(),
        })?;
        if policy != pb::ExecPolicy::AllowList && !exec_allow.is_empty() {
            return Err(ConversionError::Invalid {
                field: "exec_allow",
                reason: "programs are listed only with EXEC_POLICY_ALLOW_LIST".into(),
            });
        }
        match policy {
            pb::ExecPolicy::Unspecified | pb::ExecPolicy::Allow => Ok(ExecPolicy::Allow),
            pb::ExecPolicy::Deny => Ok(ExecPolicy::Deny),
            pb::ExecPolicy::AllowList => ExecPolicy::programs(exec_allow),
        }
    }

    /// The `Register` fields (`exec`, `exec_allow`) that declare this policy.
    pub fn to_pb(&self) -> (pb::ExecPolicy, Vec<String>) {
        match self {
            ExecPolicy::Allow => (pb::ExecPolicy::Allow, Vec::new()),
            ExecPolicy::Deny => (pb::ExecPolicy::Deny, Vec::new()),
            ExecPolicy::Programs(set) => (pb::ExecPolicy::AllowList, set.iter().cloned().collect()),
        }
    }
}

/// Environment variables a task may not set on an allow-list node, besides
/// every `LD_*` and `DYLD_*`: glibc's list of variables it drops for
/// set-user-id programs (they choose files that are loaded or read as
/// code or configuration), less `TMPDIR`.
const LOADER_VARIABLES: [&str; 11] = [
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
];

/// True when a task running `program` (its `argv[0]`) may not set `name`
/// on an allow-list node: `LD_*`, `DYLD_*` and the other variables that
/// make the dynamic loader or libc load other code, and `PATH` when
/// `program` is a bare name (that `PATH` would choose the file).
pub fn loader_variable(program: &str, name: &str) -> bool {
    name.starts_with("LD_")
        || name.starts_with("DYLD_")
        || LOADER_VARIABLES.contains(&name)
        || (name == "PATH" && !program.contains('/'))
}

fn unsafe_env(program: &str, field: &str, name: &str) -> String {
    let shown: String = name.chars().take(80).collect();
    if name == "PATH" {
        format!("this node runs {program:?} only from its own PATH; the task sets PATH in {field}")
    } else {
        format!(
            "this node's exec allow-list refuses tasks that set {shown} (in {field}): it would change which code {program:?} loads"
        )
    }
}

/// Why `program` cannot be an allow-list entry.
fn entry_error(program: &str) -> Option<&'static str> {
    if program.is_empty() {
        Some("empty program")
    } else if program.len() > MAX_EXEC_ALLOW_LEN {
        Some("longer than 4096 bytes")
    } else if program.contains('\0') {
        Some("contains a NUL byte")
    } else if program.contains('/') && !program.starts_with('/') {
        Some("a program is a bare name or an absolute path, not a relative path")
    } else {
        None
    }
}

fn invalid(reason: &str, program: &str) -> ConversionError {
    let shown: String = program.chars().take(80).collect();
    ConversionError::Invalid {
        field: "exec_allow",
        reason: format!("{reason}: {shown:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(programs: &[&str]) -> ExecPolicy {
        ExecPolicy::programs(programs.iter().copied()).expect("valid list")
    }

    #[test]
    fn a_listed_program_matches_only_as_spelled() {
        let policy = list(&["echo", "/usr/bin/python3"]);
        assert!(policy.allows(&TaskSpec::exec(["echo", "hi"])));
        assert!(policy.allows(&TaskSpec::exec(["/usr/bin/python3"])));
        assert!(!policy.allows(&TaskSpec::exec(["/bin/echo", "hi"])));
        assert!(!policy.allows(&TaskSpec::exec(["python3"])));
        assert!(!policy.allows(&TaskSpec::exec(["/tmp/x/echo"])));
        assert!(!policy.allows(&TaskSpec::exec(["sh", "-c", "echo"])));
    }

    #[test]
    fn deny_refuses_every_exec_task_and_no_call_task() {
        let deny = ExecPolicy::Deny;
        assert!(!deny.allows(&TaskSpec::exec(["true"])));
        assert!(deny.allows(&TaskSpec::call("echo", "x")));
        assert!(list(&["true"]).allows(&TaskSpec::call("echo", "x")));
        assert!(ExecPolicy::Allow.allows(&TaskSpec::exec(["anything"])));
    }

    #[test]
    fn an_allow_list_refuses_a_bare_name_whose_task_sets_path() {
        let policy = list(&["echo", "/bin/true"]);
        let mut spec = ExecSpec {
            argv: vec!["echo".into()],
            ..ExecSpec::default()
        };
        assert_eq!(policy.refusal(&spec, []), None);
        spec.env.insert("PATH".into(), "/tmp/evil".into());
        assert!(
            policy
                .refusal(&spec, [])
                .is_some_and(|why| why.contains("PATH"))
        );
        spec.argv = vec!["/bin/true".into()];
        assert_eq!(policy.refusal(&spec, []), None);
        spec.argv = vec!["sh".into()];
        assert!(
            policy
                .refusal(&spec, [])
                .is_some_and(|why| why.contains("\"sh\""))
        );
    }

    #[test]
    fn an_allow_list_refuses_path_and_loader_variables_from_secret_env_too() {
        let policy = list(&["echo", "/bin/true"]);
        let bare = TaskSpec::exec(["echo"]);
        let absolute = TaskSpec::exec(["/bin/true"]);
        assert!(policy.allows(&bare) && policy.allows(&absolute));
        // PATH through secret_env: refused for a bare name, in both the
        // node's check and the coordinator's.
        let sneaky = bare.clone().secret_env("PATH", "/tmp/x");
        assert!(!policy.allows(&sneaky));
        let TaskKind::Exec(exec) = &sneaky.kind else {
            unreachable!()
        };
        let why = policy.refusal(exec, ["PATH"]).expect("refused");
        assert!(why.contains("PATH") && why.contains("secret_env"), "{why}");
        assert!(policy.allows(&absolute.clone().secret_env("PATH", "/tmp/x")));
        // Loader variables: refused for every program, from either map.
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GCONV_PATH",
            "DYLD_INSERT_LIBRARIES",
        ] {
            for spec in [&bare, &absolute] {
                let secret = spec.clone().secret_env(name, "/tmp/x.so");
                assert!(!policy.allows(&secret), "{name} in secret_env");
                let mut env = spec.clone();
                if let TaskKind::Exec(exec) = &mut env.kind {
                    exec.env.insert(name.into(), "/tmp/x.so".into());
                    let why = policy.refusal(exec, []).expect("refused");
                    assert!(why.contains(name) && why.contains("(in env)"), "{why}");
                }
                assert!(!policy.allows(&env), "{name} in env");
                // Nodes without an allow-list are not affected.
                assert!(ExecPolicy::Allow.allows(&secret) && ExecPolicy::Allow.allows(&env));
            }
        }
        // Ordinary variables stay fine.
        assert!(
            policy.allows(
                &bare
                    .clone()
                    .secret_env("API_KEY", "k")
                    .secret_env("HOME", "/h")
            )
        );
    }

    #[test]
    fn bad_entries_and_contradictions_are_refused_naming_the_field() {
        for bad in ["", "./x", "bin/x", "a\0b"] {
            let err = ExecPolicy::programs([bad]).expect_err(bad);
            assert!(err.to_string().contains("exec_allow"), "{err}");
        }
        assert!(ExecPolicy::programs(Vec::<String>::new()).is_err());
        let too_many = (0..=MAX_EXEC_ALLOW).map(|i| format!("p{i}"));
        assert!(ExecPolicy::programs(too_many).is_err());
        assert!(ExecPolicy::from_pb(pb::ExecPolicy::Deny as i32, vec!["x".into()]).is_err());
        assert!(ExecPolicy::from_pb(99, Vec::new()).is_err());
        assert!(ExecPolicy::from_pb(pb::ExecPolicy::AllowList as i32, Vec::new()).is_err());
    }

    #[test]
    fn an_unset_policy_is_allow_and_every_policy_round_trips() {
        assert_eq!(ExecPolicy::from_pb(0, Vec::new()), Ok(ExecPolicy::Allow));
        for policy in [ExecPolicy::Allow, ExecPolicy::Deny, list(&["a", "/b"])] {
            let (exec, allow) = policy.to_pb();
            assert_eq!(ExecPolicy::from_pb(exec as i32, allow), Ok(policy));
        }
    }
}
