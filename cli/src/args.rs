//! The `weft` command line's definition: clap [`Args`] and [`Command`]
//! (the `///` comments are the help text), and [`parse`]. Running a
//! command is `run.rs`'s job; nothing here does I/O.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use weft_proto::{TaskId, TaskState};

use crate::exit;
use crate::opts::{TaskOpts, parse_duration_arg, parse_key_value, parse_task_id, parse_task_state};
use crate::output::OutputFormat;
use weft_client::Trust;

/// `weft list`'s filters.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ListArgs {
    /// Only tasks in this state (pending, queued, assigned, running,
    /// succeeded, failed, cancelled, timed_out, upstream_failed, skipped).
    #[arg(long, value_parser = parse_task_state, value_name = "STATE")]
    pub state: Option<TaskState>,
    /// Only tasks with this label, as KEY=VALUE (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Only tasks whose name contains TEXT (a plain, case-sensitive substring).
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
    /// Only tasks with an attempt (any, not only the latest) on this node, by name or id.
    #[arg(long, value_name = "NAME_OR_ID")]
    pub node: Option<String>,
    /// Only tasks submitted at or after TIME: RFC 3339 (2026-05-01T12:00:00Z,
    /// or with an offset such as +02:00) or a duration ago (10m, 2h, 3d).
    #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
    pub since: Option<SystemTime>,
    /// Only tasks submitted at or before TIME (as for --since).
    #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
    pub until: Option<SystemTime>,
    /// At most this many (1 or more).
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Only the tasks of this job (oldest first; what `weft submit -f` prints).
    #[arg(long, value_parser = crate::opts::parse_task_id, value_name = "JOB")]
    pub job: Option<weft_proto::TaskId>,
}

/// Parses `--since`/`--until`: an RFC 3339 time (`Z` or a `±HH:MM`
/// offset; a bare date-time is UTC) or a duration ago (`10m`, `2h`).
pub fn parse_time_arg(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    let expected =
        "expected an RFC 3339 time (2026-05-01T12:00:00Z) or a duration ago (10m, 2h, 3d)";
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text:?} ago is before 1970"));
    }
    rfc3339_or(text, expected)
}

/// Parses an RFC 3339 time (`Z` or a `±HH:MM` offset; a bare date-time is
/// UTC), and nothing else (`--at` refuses a duration).
pub fn parse_rfc3339_arg(text: &str) -> Result<SystemTime, String> {
    rfc3339_or(
        text.trim(),
        "expected an RFC 3339 time (2026-05-01T12:00:00Z)",
    )
}

/// An RFC 3339 time, or an error that says what was `expected`.
fn rfc3339_or(text: &str, expected: &str) -> Result<SystemTime, String> {
    // humantime reads UTC only: take a numeric offset off and apply it.
    let (local, offset) = match text
        .len()
        .checked_sub(6)
        .and_then(|i| text.get(i..).map(|o| (i, o)))
    {
        Some((i, o))
            if (o.starts_with('+') || o.starts_with('-'))
                && o.as_bytes()[3] == b':'
                && text.contains('T') =>
        {
            let hours: u64 = o[1..3]
                .parse()
                .map_err(|_| format!("{text:?}: {expected}"))?;
            let minutes: u64 = o[4..6]
                .parse()
                .map_err(|_| format!("{text:?}: {expected}"))?;
            let secs = Duration::from_secs(hours * 3600 + minutes * 60);
            (&text[..i], Some((o.starts_with('+'), secs)))
        }
        _ => (text, None),
    };
    let time = humantime::parse_rfc3339_weak(local).map_err(|_| format!("{text:?}: {expected}"))?;
    Ok(match offset {
        // 12:00+02:00 is 10:00Z.
        Some((true, by)) => time
            .checked_sub(by)
            .ok_or_else(|| format!("{text:?} is before 1970"))?,
        Some((false, by)) => time + by,
        None => time,
    })
}

/// Weft: run commands and handler calls on a cluster of nodes.
///
/// Start a cluster on this machine with `weft local` (or run
/// `weft-coordinator` and `weft-node`), then `weft run -- CMD ARGS...`.
#[derive(Parser, Debug)]
#[command(name = "weft", version, after_help = exit::EXIT_CODES_HELP)]
pub struct Args {
    /// Coordinator address: HOST:PORT or http(s)://HOST:PORT (no scheme
    /// means https://; http:// reaches a coordinator started with
    /// --insecure); anything else is a usage error (exit 2). Several,
    /// comma-separated (a,b), for coordinators that take over from each
    /// other: the first that answers is used (one CA for all); `run`,
    /// `call` and `watch` follow the task to whichever serves after a
    /// failover, printing each output chunk once. Other calls are not sent
    /// again to another coordinator (a submit may have been recorded).
    #[arg(
        long,
        global = true,
        env = "WEFT_COORDINATOR",
        default_value = "https://127.0.0.1:7070",
        value_name = "ADDRESS"
    )]
    pub coordinator: String,
    /// The cluster CA's certificate (the coordinator's ca.pem, in its data
    /// dir): only a coordinator whose certificate it signed is trusted.
    #[arg(long, global = true, env = "WEFT_CA", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The cluster CA's pin (sha256:HEX, logged by the coordinator at
    /// start), instead of --ca-file. Given on the command line, either
    /// wins over the other's environment variable (--ca-pin over $WEFT_CA);
    /// both on the command line, or both in the environment, is a usage error.
    #[arg(
        long,
        global = true,
        env = "WEFT_CA_PIN",
        value_name = "PIN",
        value_parser = parse_pin
    )]
    pub ca_pin: Option<Trust>,
    /// Client token (`weft_<id>_<secret>`), sent as `authorization: Bearer`
    /// on every call; an empty one is a usage error. Default: $WEFT_TOKEN,
    /// then the context saved by `weft login`.
    #[arg(long, global = true, value_name = "TOKEN", value_parser = parse_token_flag)]
    pub token: Option<String>,
    /// File holding the client token (e.g. DATA_DIR/admin.token on the
    /// coordinator's machine). --token wins over it; it wins over $WEFT_TOKEN.
    #[arg(long, global = true, env = "WEFT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Output format of results on stdout.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Whether `--coordinator` came from the command line or the
    /// environment rather than its default (set by [`parse`]; `bench`
    /// starts its own cluster unless it is set).
    #[arg(skip)]
    pub coordinator_given: bool,
}

/// Parses `--token`: anything but nothing (an empty value, say from an
/// unset shell variable, must not fall back to another token unnoticed).
/// The value is never echoed.
fn parse_token_flag(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err("--token is empty: pass a token, or leave --token out to use --token-file, $WEFT_TOKEN or the `weft login` context".to_owned()),
        token => Ok(token.to_owned()),
    }
}

fn parse_pin(text: &str) -> Result<Trust, String> {
    Trust::pin(text).map_err(|err| err.to_string())
}

impl Args {
    /// How the coordinator's certificate is trusted: --ca-file, else --ca-pin.
    pub fn trust(&self) -> Option<Trust> {
        self.ca_file
            .clone()
            .map(Trust::CaFile)
            .or_else(|| self.ca_pin.clone())
    }
}

/// Parses the process's command line (exiting on a usage error like
/// `Args::parse`) and notes whether `--coordinator` was given.
pub fn parse() -> Args {
    parse_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
}

/// [`parse`] of `argv`: also refuses what clap cannot say by itself (a
/// task flag with `submit -f`, a label or weight given twice), and lets a
/// CA flag win over the other CA's environment variable.
pub fn parse_from<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Args::command();
    let matches = command.try_get_matches_from_mut(argv)?;
    let mut args = Args::from_arg_matches(&matches).map_err(|err| err.format(&mut command))?;
    args.coordinator_given = matches!(
        matches.value_source("coordinator"),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    let conflict = |message: String| {
        command
            .clone()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
    };
    let (keep_file, keep_pin) = ca_sources(
        matches.value_source("ca_file"),
        matches.value_source("ca_pin"),
    )
    .map_err(conflict)?;
    if !keep_file {
        args.ca_file = None;
    }
    if !keep_pin {
        args.ca_pin = None;
    }
    if let Some(task) = task_matches(&matches)
        && let Some(message) = task_flag_given_twice(task)
    {
        return Err(conflict(message));
    }
    if let Some(("submit", submit)) = matches.subcommand()
        && submit.contains_id("file")
        && submit.value_source("file").is_some()
        && let Some(flag) = task_flag_given(submit)
    {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "{flag} cannot be used with -f FILE: the file gives each task its settings (as keys: priority, timeout, labels, ...)"
            ),
        ));
    }
    Ok(args)
}

/// Which of --ca-file and --ca-pin to keep, given where each came from:
/// what the user typed wins over what the shell exported; two typed, or
/// two exported, cannot both be right.
fn ca_sources(file: Option<ValueSource>, pin: Option<ValueSource>) -> Result<(bool, bool), String> {
    use ValueSource::CommandLine;
    match (file, pin) {
        (Some(CommandLine), Some(CommandLine)) => {
            Err("--ca-file and --ca-pin both say which CA to trust: give one".to_owned())
        }
        (Some(CommandLine), Some(_)) => Ok((true, false)),
        (Some(_), Some(CommandLine)) => Ok((false, true)),
        (Some(_), Some(_)) => Err(
            "$WEFT_CA and $WEFT_CA_PIN are both set: unset one, or choose with --ca-file or --ca-pin"
                .to_owned(),
        ),
        (file, pin) => Ok((file.is_some(), pin.is_some())),
    }
}

/// The matches of the subcommand that makes tasks from [`TaskOpts`], if
/// that is the one given.
fn task_matches(matches: &clap::ArgMatches) -> Option<&clap::ArgMatches> {
    match matches.subcommand()? {
        ("run" | "call" | "submit" | "map", task) => Some(task),
        ("schedule", schedule) => match schedule.subcommand()? {
            ("create", task) => Some(task),
            _ => None,
        },
        _ => None,
    }
}

/// A task flag given twice with two values, as the message that names
/// both: a label or resource with two values (the same pair twice is
/// harmless), or the fair key's weight both in `--fair-key KEY:WEIGHT`
/// and in `--fair-weight`.
fn task_flag_given_twice(matches: &clap::ArgMatches) -> Option<String> {
    let given = |id: &str| -> Vec<String> {
        matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|text| text.to_string_lossy().into_owned())
            .collect()
    };
    let labels = matches.get_many::<(String, String)>("labels");
    let labels = labels.into_iter().flatten().map(|(k, v)| (k.as_str(), v));
    let resources = matches.get_many::<(String, u64)>("resources");
    let resources = resources
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v));
    if let Some(message) = given_twice(
        "--label",
        "a task requires one value per label",
        labels.zip(given("labels")),
    )
    .or_else(|| {
        given_twice(
            "--resource",
            "a task holds one amount per resource",
            resources.zip(given("resources")),
        )
    }) {
        return Some(message);
    }
    match (
        matches.get_one::<(String, Option<u32>)>("fair_key"),
        matches.get_one::<u32>("fair_weight"),
    ) {
        (Some((key, Some(_))), Some(weight)) => Some(format!(
            "--fair-key {} and --fair-weight {weight} both give the fair key's weight: give it once (--fair-key {key}:{weight}, or --fair-key {key} --fair-weight {weight})",
            given("fair_key").join("")
        )),
        _ => None,
    }
}

/// The first key given twice with two values, as the message that names
/// both and says `why` one is kept.
fn given_twice<'a, V: PartialEq + 'a>(
    flag: &str,
    why: &str,
    values: impl Iterator<Item = ((&'a str, &'a V), String)>,
) -> Option<String> {
    let mut seen: std::collections::BTreeMap<&str, (&V, String)> = Default::default();
    for ((key, value), text) in values {
        match seen.get(key) {
            Some((first, first_text)) if *first != value => {
                return Some(format!(
                    "{flag} {first_text} and {flag} {text}: {why}; give it once"
                ));
            }
            Some(_) => {}
            None => {
                seen.insert(key, (value, text));
            }
        }
    }
    None
}

/// The first task or policy flag given on the command line (not from the
/// environment, nor a default), as `--name`. The trace flags are not
/// counted: they continue the caller's trace, which a file cannot say,
/// and apply to each of its tasks.
fn task_flag_given(matches: &clap::ArgMatches) -> Option<String> {
    let opts = <TaskOpts as clap::Args>::augment_args(clap::Command::new("opts"));
    opts.get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "traceparent" | "tracestate"))
        .find(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .map(|arg| match arg.get_long() {
            Some(long) => format!("--{long}"),
            None => arg.get_id().to_string(),
        })
}

/// The `weft` subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command on a node; stream its stdout/stderr here and exit with its code.
    ///
    /// Resumes after a dropped connection, on the next of several
    /// --coordinator addresses after a failover, without repeating or
    /// losing output. Ctrl-C cancels the task (exit 130).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Run {
        /// Task settings.
        #[command(flatten)]
        opts: TaskOpts,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Call a handler on a node; stream its output, print what it returns.
    ///
    /// What the handler writes while it runs goes to stdout/stderr as it
    /// comes; what it returns is printed on stdout at the end, unless it is
    /// exactly what it already wrote on stdout (so `weft call echo hi`
    /// prints `hi` once). Ctrl-C cancels the task (exit 130).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Call {
        /// Task settings.
        #[command(flatten)]
        opts: TaskOpts,
        /// Handler name (built-ins: noop, echo, sleep, sha256, fail, spin).
        handler: String,
        /// Input bytes; `-` reads them from stdin; none is empty input (an
        /// input starting with `-` goes after `--`; a negative number may
        /// stand as it is).
        #[arg(allow_negative_numbers = true)]
        input: Option<String>,
    },
    /// Submit a task and print only its id (`--call HANDLER [INPUT]`, or `-- CMD ARGS...`).
    ///
    /// With --after/--ref/--at/--delay the task may wait (PENDING); with
    /// -f FILE, a whole graph of tasks is submitted in one call and the job
    /// id is printed first, then each task's id.
    Submit {
        /// Task settings.
        #[command(flatten)]
        opts: TaskOpts,
        /// Dependencies and start time.
        #[command(flatten)]
        deps: crate::job::DepOpts,
        /// Submit a call of this handler; the argument after it is its input (`-`: stdin).
        #[arg(long, value_name = "HANDLER")]
        call: Option<String>,
        /// The command and its arguments, or the call's input with `--call`
        /// (an input starting with `-` goes after `--`, a negative number
        /// may stand as it is).
        #[arg(
            trailing_var_arg = true,
            allow_negative_numbers = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Show a job (the tasks of one Submit), follow it, or cancel it.
    #[command(subcommand)]
    Job(crate::job::JobCommand),
    /// Show one task.
    Get {
        /// The task id.
        #[arg(value_parser = parse_task_id)]
        id: TaskId,
    },
    /// Follow a task: print its output as `run` does and its state changes on stderr.
    ///
    /// Resumes after a dropped connection (on the next of several
    /// --coordinator addresses after a failover); exits with the task's code like `run`.
    /// Each state line on stderr ends in its event's seq (`attempt 1, seq 4`);
    /// `--from-seq` takes one to show only what came from there on; past
    /// the last event of a task that has ended, it is a usage error (exit
    /// 2) that says the task's last seq. Ctrl-C stops watching (exit 3; the task keeps running) and prints the
    /// `--from-seq` to resume from.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Watch {
        /// The task id.
        #[arg(value_parser = parse_task_id)]
        id: TaskId,
        /// First event to show (0: the whole history).
        #[arg(long, default_value_t = 0, value_name = "N")]
        from_seq: u64,
    },
    /// Wait for a task to finish, print it, and exit with its code like `run`.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Wait {
        /// The task id.
        #[arg(value_parser = parse_task_id)]
        id: TaskId,
    },
    /// Cancel a task, and print it once it has ended.
    ///
    /// A queued task ends at once; a running one when its node has stopped
    /// it, which this waits for up to 5 s. If it has not ended by then, it
    /// says the cancel was requested and the node is stopping it (JSON: the
    /// task with `"cancel_requested": true`).
    Cancel {
        /// The task id.
        #[arg(value_parser = parse_task_id)]
        id: TaskId,
    },
    /// List tasks, newest first, with how long each ran (or has waited).
    ///
    /// Filters combine: a task is listed when it matches every one given.
    /// The coordinator examines a bounded number of tasks per call, so
    /// `list` pages on until it has --limit tasks or none is left.
    List(ListArgs),
    /// List the connected nodes (`weft nodes`), or revoke one (`weft nodes
    /// revoke NODE`).
    Nodes {
        /// What to do; none: list.
        #[command(subcommand)]
        command: Option<NodesCommand>,
    },
    /// Drain a node: it takes no new work and finishes what it runs, then stops.
    Drain {
        /// Node name or id.
        node: String,
        /// How long running tasks may take before they are cancelled (default: the node's own).
        #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
        grace: Option<Duration>,
    },
    /// Show cluster-wide figures.
    Info,
    /// A live view of the cluster in the terminal: nodes, tasks per state,
    /// throughput. q, Esc or Ctrl-C quits; arrows or j/k scroll the nodes.
    ///
    /// Polls ClusterInfo and ListNodes every --interval (scope read). A
    /// coordinator that goes away is shown as an error on screen and polled
    /// again; a token or TLS setup refused at the first poll exits like any
    /// command. Needs a terminal on stdout: programs read `weft info -o
    /// json` and `weft nodes -o json` instead.
    Top {
        /// How often to poll the coordinator (100ms to 10m).
        #[arg(long, default_value = "1s", value_parser = crate::top::parse_interval, value_name = "DURATION")]
        interval: Duration,
    },
    /// Client tokens and node join tokens: create (printed once), list,
    /// revoke. Needs scope admin.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Cron schedules: create, list, pause, resume, delete. Each fire
    /// submits the schedule's task, exactly once per fire time.
    #[command(subcommand)]
    Schedule(crate::schedule::ScheduleCommand),
    /// Named limits: rate limits tasks take units from (`--rate-limit`)
    /// and concurrency keys' limits (`--concurrency-key`): set, list, delete.
    #[command(subcommand)]
    Limit(crate::limit::LimitCommand),
    /// Save a coordinator address and token (per user, 0600) for later
    /// commands given neither flags nor environment.
    ///
    /// Written to $XDG_CONFIG_HOME/weft/context.json (or
    /// ~/.config/weft/context.json). Precedence: flags, then environment
    /// (WEFT_COORDINATOR, WEFT_TOKEN), then this context; its token and
    /// CA are used only for its own coordinator. The token is
    /// checked against the coordinator before it is saved (any scope
    /// passes; an unknown, revoked or expired token exits 77); it is the
    /// global --token (or --token-file's, or $WEFT_TOKEN).
    Login {
        /// Coordinator address (HOST:PORT or http(s)://HOST:PORT).
        url: String,
    },
    /// Run a command (or call a handler) once per line of stdin, in
    /// parallel across the cluster.
    ///
    /// Every `{}` in the arguments is replaced by the line; with no `{}`, the
    /// line is appended as the last argument (like xargs). With `--call
    /// HANDLER`, each line is the input of one call of HANDLER instead, and
    /// each call's result is printed. Tasks start as lines arrive (stdin is
    /// read only as fast as tasks start). Blank lines are skipped; with a
    /// command, a line that is not UTF-8 fails on its own (a call takes its
    /// bytes as they are). Each task's stdout is printed when it finishes; exits 1 if any task failed (69
    /// when a line could not reach a coordinator). When stdout closes (`|
    /// head`), it submits no more lines, cancels what it started, and
    /// exits 141.
    /// With `--output json`, one JSON object per task instead, on its own
    /// line as it finishes: `{"line", "stdout", "task"}` (the task as `weft
    /// get -o json` shows it), or `{"line", "error"}` when it could not run.
    Map {
        /// Tasks in flight at once (default: the cluster's free slots, at
        /// least 1 and at most 512: each is a stream, and a coordinator lets
        /// one client hold 1,024 at once by default; 16 when the token
        /// lacks the read scope to learn them). At most 1,024.
        #[arg(short = 'j', long = "jobs", value_name = "N")]
        jobs: Option<usize>,
        /// Print outputs in input order (default: completion order).
        #[arg(long)]
        keep_order: bool,
        /// Task settings.
        #[command(flatten)]
        opts: TaskOpts,
        /// Call this handler once per line (the line is its input) instead
        /// of running a command; each result is printed, followed by a
        /// newline when it has none.
        #[arg(long, value_name = "HANDLER", conflicts_with = "command")]
        call: Option<String>,
        /// The command template (after `--`).
        #[arg(
            required_unless_present = "call",
            trailing_var_arg = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Run a coordinator and nodes in this process until Ctrl-C.
    ///
    /// Prints the `export` lines another terminal needs (coordinator, CA,
    /// admin token); with `--output json`, one JSON object on one line
    /// instead: `{"coordinator", "ca_file", "token", "nodes", "slots_per_node"}`.
    Local {
        /// Nodes to start.
        #[arg(long, default_value_t = 2, value_name = "N")]
        nodes: usize,
        /// Slots per node (default: number of CPUs).
        #[arg(long, value_name = "S")]
        slots: Option<u32>,
        /// Address to listen on (falls back to a free port if it is taken).
        #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR")]
        listen: SocketAddr,
    },
    /// Start a local cluster and run a mixed demo workload on it.
    ///
    /// With `-o json`, stdout is JSON Lines: one object per line as things
    /// happen, each with an "event" field (cluster, phase, task, requeued,
    /// cancelling, error); the last line is the "summary" object with the
    /// checks and "ok". Exits 1 if a check failed.
    Demo {
        /// Nodes to start.
        #[arg(long, default_value_t = 3, value_name = "N")]
        nodes: usize,
        /// Slots per node.
        #[arg(long, default_value_t = 2, value_name = "S")]
        slots: u32,
    },
    /// Benchmark: the peers' workload protocol against Weft, beside raw gRPC.
    ///
    /// Starts its own cluster (weft-coordinator + 2 × weft-node --slots 1,
    /// found next to this executable or in WEFT_BIN_DIR) unless
    /// --coordinator is given. Build first: `cargo build --release --bins`.
    /// Exits 1 if a step failed.
    Bench(weft_bench::BenchArgs),
    /// Print a shell completion script for weft on stdout.
    ///
    /// bash: `source <(weft completions bash)` in ~/.bashrc, or save it as
    /// /etc/bash_completion.d/weft. zsh: save it as `_weft` in a directory
    /// of your $fpath. fish: save it as ~/.config/fish/completions/weft.fish.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Parses `weft token create --ttl`: a duration, not zero (a token born
/// expired would be refused by every call).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration_arg(text)?;
    if ttl.is_zero() {
        return Err("must be more than 0 (e.g. 1h); leave --ttl out for the default".to_owned());
    }
    Ok(ttl)
}

/// `weft nodes ...`.
#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// Revoke a node (by name or id), connected or not: its stream is
    /// closed at once, its tasks go back to the queue, and its certificate
    /// is refused from then on. Needs scope admin.
    Revoke {
        /// Node name or id.
        node: String,
    },
}

/// What `weft token create --role` makes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    /// A client token with scopes (`--scope`).
    Client,
    /// A node join token, for `weft-node --join TOKEN`.
    Node,
}

/// `weft token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a token; prints it alone on stdout (shown once: the
    /// coordinator keeps only its hash).
    ///
    /// `--role client` (the default) makes a client token with `--scope`.
    /// `--role node` makes a join token: `weft-node --join TOKEN` (or
    /// WEFT_JOIN_TOKEN) trades it for the node's certificate; it carries
    /// the coordinator's address and the CA pin, so a new machine needs
    /// nothing else.
    Create {
        /// client (a bearer token for the CLI and SDKs) or node (a join
        /// token).
        #[arg(long, value_enum, default_value_t = TokenRole::Client)]
        role: TokenRole,
        /// Client tokens: scopes, comma separated or repeated: read (get,
        /// list, watch, wait, nodes, info), submit (run, submit, call,
        /// map), cancel, admin (drain, revoke, tokens; implies all).
        #[arg(long = "scope", value_delimiter = ',', value_name = "SCOPES")]
        scopes: Vec<String>,
        /// A name for people, shown by `weft token list`.
        #[arg(long, default_value = "", value_name = "NAME")]
        name: String,
        /// Lifetime, more than 0 (e.g. 1h, 30d); default: no expiry for
        /// client tokens, 1h for join tokens.
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// Join tokens: how many nodes may join with it (default 1; 0: no
        /// limit).
        #[arg(long, value_name = "N")]
        uses: Option<u32>,
        /// Join tokens: the coordinator address the token names, as the
        /// nodes will reach it (HOST:PORT); default: the coordinator's
        /// first --advertise name, else the address this command reached.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
    },
    /// List tokens (ids, names, scopes, times; never secrets).
    List,
    /// Revoke a token by id: refused from the moment this returns.
    Revoke {
        /// The token's id (`weft token list`).
        id: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn list_filters_parse_and_bad_values_are_refused() {
        let args = Args::try_parse_from([
            "weft",
            "list",
            "--label",
            "zone=a",
            "--label",
            "gpu=1",
            "--name",
            "resize",
            "--node",
            "n1",
            "--since",
            "2026-05-01T12:00:00+02:00",
            "--until",
            "10m",
        ])
        .unwrap();
        let Command::List(list) = args.command else {
            panic!("not list")
        };
        assert_eq!(
            list.labels,
            [("zone".into(), "a".into()), ("gpu".into(), "1".into())]
        );
        assert_eq!(
            (list.name.as_deref(), list.node.as_deref()),
            (Some("resize"), Some("n1"))
        );
        assert_eq!(
            list.since,
            Some(humantime::parse_rfc3339("2026-05-01T10:00:00Z").unwrap())
        );
        let ago = SystemTime::now()
            .duration_since(list.until.unwrap())
            .unwrap();
        assert!(
            ago >= Duration::from_secs(600) && ago < Duration::from_secs(660),
            "{ago:?}"
        );
        for bad in [
            vec!["--label", "zone"],
            vec!["--label", "=a"],
            vec!["--since", "yesterday"],
            vec!["--until", "2026-13-01T00:00:00Z"],
        ] {
            let mut argv = vec!["weft", "list"];
            argv.extend(bad.iter().copied());
            let err = Args::try_parse_from(&argv).unwrap_err().to_string();
            assert!(
                err.contains(bad[1]) || err.contains("KEY=VALUE"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn submit_with_a_file_refuses_task_flags_naming_the_flag() {
        for (flag, value) in [
            ("--priority", "3"),
            ("--timeout", "5s"),
            ("--label", "zone=eu"),
            ("--max-attempts", "2"),
            ("--slots", "2"),
            ("--rate-limit", "api"),
            ("--fail-if-infeasible", ""),
        ] {
            let mut argv = vec!["weft", "submit", "-f", "g.yaml", flag];
            if !value.is_empty() {
                argv.push(value);
            }
            let err = parse_from(&argv).expect_err(flag);
            assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{flag}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("{flag} cannot be used with -f FILE")),
                "{text}"
            );
        }
        // The file alone, and the trace to continue, are fine; without -f
        // the flags are the task's.
        for argv in [
            &["weft", "submit", "-f", "g.yaml"][..],
            &["weft", "submit", "-f", "g.yaml", "--traceparent", "00-x"],
            &["weft", "submit", "--priority", "3", "--", "true"],
        ] {
            parse_from(argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
        }
    }

    #[test]
    fn list_state_help_names_every_state_it_accepts() {
        let mut command = Args::command();
        let help = command
            .find_subcommand_mut("list")
            .expect("list")
            .render_long_help()
            .to_string();
        for state in TaskState::ALL {
            let name = state.as_str();
            assert!(help.contains(name), "{name} missing from: {help}");
            assert!(parse_task_state(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn a_duration_flag_past_a_hundred_years_is_a_usage_error_not_a_panic() {
        for flag in ["--timeout", "--schedule-timeout"] {
            for value in ["1e20", "1e19", "300000000000y"] {
                let err = Args::try_parse_from(["weft", "run", flag, value, "--", "true"])
                    .expect_err(value);
                assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{flag} {value}");
                assert!(err.to_string().contains("at most 100 years"), "{err}");
            }
        }
        let err = Args::try_parse_from(["weft", "submit", "--delay", "1e19", "--", "true"])
            .expect_err("delay");
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
        let err = Args::try_parse_from(["weft", "top", "--interval", "1e20"]).expect_err("top");
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
    }

    #[test]
    fn run_takes_everything_after_the_double_dash_as_the_command() {
        let args =
            Args::try_parse_from(["weft", "run", "--slots", "2", "--", "sh", "-c", "exit 3"])
                .unwrap();
        let Command::Run { opts, command } = args.command else {
            panic!("not run")
        };
        assert_eq!(opts.slots, Some(2));
        assert_eq!(command, ["sh", "-c", "exit 3"]);
    }

    /// The command of a parsed run, submit, map or schedule create.
    fn trailing_command(args: Args) -> Vec<String> {
        match args.command {
            Command::Run { command, .. }
            | Command::Submit { command, .. }
            | Command::Map { command, .. } => command,
            Command::Schedule(crate::schedule::ScheduleCommand::Create { command, .. }) => command,
            other => panic!("no trailing command: {other:?}"),
        }
    }

    #[test]
    fn an_unknown_flag_before_the_command_is_a_usage_error_not_the_command() {
        for head in [
            &["weft", "run"][..],
            &["weft", "-o", "json", "run"],
            &["weft", "submit"],
            &["weft", "map"],
            &["weft", "schedule", "create", "n", "--cron", "* * * * *"],
        ] {
            for (bad, rest) in [
                (&["--bogus"][..], &["--", "true"][..]),
                (&["--tiemout", "5s"], &["--", "echo", "hi"]),
                (&["--bogus"], &["true"]),
            ] {
                let argv = [head, bad, rest].concat();
                let err = parse_from(&argv).expect_err(&argv.join(" "));
                assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{argv:?}: {err}");
                let text = err.to_string();
                assert!(
                    text.contains(&format!("unexpected argument '{}'", bad[0])),
                    "{argv:?}: {text}"
                );
            }
        }
        let err = parse_from(["weft", "run", "--tiemout", "5s", "--", "true"]).unwrap_err();
        assert!(err.to_string().contains("--timeout"), "{err}");
    }

    #[test]
    fn everything_after_the_double_dash_or_the_first_word_is_the_commands() {
        for head in [
            &["weft", "run", "--timeout", "5s"][..],
            &["weft", "submit", "--timeout", "5s"],
            &["weft", "map", "--timeout", "5s"],
            &["weft", "schedule", "create", "n", "--cron", "* * * * *"],
        ] {
            for (rest, command) in [
                (&["--", "ls", "-la"][..], &["ls", "-la"][..]),
                (&["ls", "-la"], &["ls", "-la"]),
                (&["--", "--bogus", "--", "x"], &["--bogus", "--", "x"]),
                (
                    &["sh", "-c", "x", "--timeout", "1s"],
                    &["sh", "-c", "x", "--timeout", "1s"],
                ),
                (&["--", "-"], &["-"]),
            ] {
                let argv = [head, rest].concat();
                let args = parse_from(&argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
                assert_eq!(trailing_command(args), command, "{argv:?}");
            }
        }
        let args = parse_from(["weft", "submit", "--call", "echo", "-"]).unwrap();
        assert_eq!(trailing_command(args), ["-"]);
        // A negative number is a call's input, not a flag.
        let args = parse_from(["weft", "submit", "--call", "square", "-5"]).unwrap();
        assert_eq!(trailing_command(args), ["-5"]);
        let args = parse_from([
            "weft",
            "schedule",
            "create",
            "n",
            "--cron",
            "* * * * *",
            "--call",
            "square",
            "-5",
        ])
        .unwrap();
        assert_eq!(trailing_command(args), ["-5"]);
        let Command::Call { input, .. } = parse_from(["weft", "call", "square", "-5"])
            .unwrap()
            .command
        else {
            panic!("a call");
        };
        assert_eq!(input.as_deref(), Some("-5"));
    }

    #[test]
    fn a_ca_flag_wins_over_the_other_cas_environment_variable() {
        use ValueSource::{CommandLine, EnvVariable};
        // --ca-pin with $WEFT_CA exported, and --ca-file with $WEFT_CA_PIN.
        assert_eq!(
            ca_sources(Some(EnvVariable), Some(CommandLine)),
            Ok((false, true))
        );
        assert_eq!(
            ca_sources(Some(CommandLine), Some(EnvVariable)),
            Ok((true, false))
        );
        assert_eq!(ca_sources(Some(EnvVariable), None), Ok((true, false)));
        assert_eq!(ca_sources(None, Some(CommandLine)), Ok((false, true)));
        assert_eq!(ca_sources(None, None), Ok((false, false)));
        let both = ca_sources(Some(EnvVariable), Some(EnvVariable)).unwrap_err();
        assert!(both.contains("$WEFT_CA and $WEFT_CA_PIN"), "{both}");
        let pin = format!("sha256:{}", "ab".repeat(32));
        let args = parse_from(["weft", "--ca-pin", &pin, "info"]).unwrap();
        assert!(args.ca_pin.is_some());
        let err = parse_from(["weft", "--ca-file", "/ca.pem", "--ca-pin", &pin, "info"])
            .expect_err("both");
        assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{err}");
        assert!(err.to_string().contains("give one"), "{err}");
    }

    #[test]
    fn a_label_resource_or_fair_weight_given_twice_is_a_usage_error_naming_both() {
        for head in [
            &["weft", "run"][..],
            &["weft", "submit"],
            &["weft", "map"],
            &["weft", "schedule", "create", "n", "--cron", "* * * * *"],
        ] {
            for (flags, names) in [
                (
                    &["--label", "a=1", "--label", "a=2"][..],
                    "--label a=1 and --label a=2",
                ),
                (
                    &["--resource", "gpu=1", "--resource", "gpu=2"],
                    "--resource gpu=1 and --resource gpu=2",
                ),
                (
                    &["--fair-key", "team-a:3", "--fair-weight", "5"],
                    "--fair-key team-a:3 and --fair-weight 5",
                ),
            ] {
                let argv = [head, flags, &["--", "true"]].concat();
                let err = parse_from(&argv).expect_err(&argv.join(" "));
                assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{argv:?}: {err}");
                assert!(err.to_string().contains(names), "{argv:?}: {err}");
            }
        }
        let err = parse_from(["weft", "call", "--label", "a=1", "--label", "a=2", "echo"])
            .expect_err("call");
        assert!(
            err.to_string().contains("--label a=1 and --label a=2"),
            "{err}"
        );
        // The same pair twice, two keys, or the weight said once, are fine.
        for argv in [
            &[
                "weft", "run", "--label", "a=1", "--label", "a=1", "--", "true",
            ][..],
            &[
                "weft", "run", "--label", "a=1", "--label", "b=1", "--", "true",
            ],
            &["weft", "submit", "--fair-key", "team-a:3", "--", "true"],
            &[
                "weft",
                "submit",
                "--fair-key",
                "team-a",
                "--fair-weight",
                "5",
                "--",
                "true",
            ],
        ] {
            parse_from(argv).unwrap_or_else(|err| panic!("{argv:?}: {err}"));
        }
    }

    #[test]
    fn a_label_without_equals_is_a_usage_error() {
        let err =
            Args::try_parse_from(["weft", "run", "--label", "gpu", "--", "true"]).unwrap_err();
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn a_zero_token_ttl_or_list_limit_is_a_usage_error() {
        for argv in [
            &["weft", "token", "create", "--scope", "read", "--ttl", "0s"][..],
            &["weft", "token", "create", "--role", "node", "--ttl", "0ms"],
            &["weft", "list", "--limit", "0"],
        ] {
            let err = parse_from(argv).expect_err(&argv.join(" "));
            assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{argv:?}: {err}");
        }
        let err = parse_from(["weft", "token", "create", "--scope", "read", "--ttl", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 0"), "{err}");
        let Command::List(list) = parse_from(["weft", "list", "--limit", "1"])
            .unwrap()
            .command
        else {
            panic!("not list")
        };
        assert_eq!(list.limit, 1);
    }

    #[test]
    fn an_empty_token_flag_is_a_usage_error_not_a_fallback() {
        for empty in ["", "  "] {
            let err = parse_from(["weft", "--token", empty, "info"]).expect_err("empty token");
            assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{err}");
            assert!(err.to_string().contains("--token is empty"), "{err}");
        }
    }

    #[test]
    fn help_states_the_exit_codes() {
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("69")
                && help.contains("77")
                && help.contains("127")
                && help.contains("130"),
            "{help}"
        );
    }

    #[test]
    fn watch_help_says_its_own_ctrl_c_code_and_where_seqs_show() {
        let mut command = Args::command();
        let watch = command
            .find_subcommand_mut("watch")
            .expect("watch")
            .render_long_help()
            .to_string();
        assert!(
            watch.contains("exit 3") && watch.contains("--from-seq"),
            "{watch}"
        );
        assert!(watch.contains("seq 4"), "{watch}");
        assert!(
            watch.contains("3    Ctrl-C stopped `watch`")
                && watch.contains("130  the task was cancelled"),
            "{watch}"
        );
    }
}
