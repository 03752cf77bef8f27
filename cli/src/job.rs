//! Dependencies, start times and jobs on the command line: the `submit`
//! flags `--after/--after-rule/--ref/--at/--delay`, graph files (`weft
//! submit -f graph.yaml|json`), and `weft job get|watch|cancel`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use weft_client::{Client, SubmitOutcome, Task, TaskSpec};
use weft_proto::policy::{MAX_FAIR_WEIGHT, MAX_PRIORITY, MIN_PRIORITY};
use weft_proto::{DependencyRule, TaskId, TaskState};

use crate::exit::{self, UsageError};
use crate::opts::{parse_duration_arg, parse_task_id};
use crate::output::OutputFormat;
use crate::output::{printable, task_json, tasks_table};
use crate::policy_opts::{OnLimit, PolicyOpts, parse_fair_key, parse_rate_use};

/// What a task waits for before it runs (`weft submit`).
#[derive(Args, Debug, Clone, Default)]
pub struct DepOpts {
    /// Run after this task (repeatable). The task is PENDING until the
    /// tasks it runs after meet --after-rule.
    #[arg(long, value_name = "ID", value_parser = parse_task_id)]
    pub after: Vec<TaskId>,
    /// When it runs, given how the --after tasks end: all_succeeded (the
    /// default: upstream_failed as soon as one did not), all_finished (a
    /// cleanup step), any_failed (an error handler: skipped when all
    /// succeeded), any_succeeded (upstream_failed when none did).
    #[arg(long, value_name = "RULE", value_parser = parse_rule)]
    pub after_rule: Option<DependencyRule>,
    /// A name for the task (kept in its record; graph files use it in `after`).
    #[arg(long = "ref", value_name = "NAME")]
    pub ref_name: Option<String>,
    /// Not before this time: RFC 3339 (2026-05-01T12:00:00Z, or with a
    /// ±HH:MM offset), or HH:MM[:SS] in local time (today, or tomorrow if
    /// that time has passed), with the UTC offset of that day and hour (a
    /// DST change in between is followed; a time the change skips, like
    /// 02:30 on a spring-forward night, is 03:30, and a repeated one is
    /// the first still to come). Not a duration: that is --delay. The task is PENDING
    /// until then.
    #[arg(long, value_name = "TIME", value_parser = parse_at, conflicts_with = "delay")]
    pub at: Option<SystemTime>,
    /// Not before this long from now (e.g. 30s, 10m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub delay: Option<Duration>,
    /// Submit the tasks of a graph file (YAML, or JSON by its .json name)
    /// in one call, all or nothing; prints the job id and the task ids.
    /// See the README, "Dependencies, jobs and start times".
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl DepOpts {
    /// True when the task needs more than a plain submit.
    pub fn is_set(&self) -> bool {
        !self.after.is_empty()
            || self.after_rule.is_some()
            || self.ref_name.is_some()
            || self.at.is_some()
            || self.delay.is_some()
    }

    /// `spec` with these settings; --after-rule without --after is a
    /// usage error (it would be ignored).
    pub fn apply(&self, mut spec: TaskSpec) -> Result<TaskSpec, UsageError> {
        if self.after_rule.is_some() && self.after.is_empty() {
            return Err(UsageError(
                "--after-rule needs --after: the rule is about the tasks it runs after".into(),
            ));
        }
        for id in &self.after {
            spec = spec.after(*id);
        }
        if let Some(rule) = self.after_rule {
            spec = spec.after_rule(rule);
        }
        if let Some(name) = &self.ref_name {
            spec = spec.ref_name(name);
        }
        if let Some(at) = self.at {
            spec = spec.not_before(at);
        }
        if let Some(delay) = self.delay {
            spec = spec
                .not_before(after_now(delay).ok_or_else(|| UsageError(too_far("--delay", delay)))?);
        }
        Ok(spec)
    }
}

/// Now plus `delay`, or `None` past what the clock can hold. (A parsed
/// duration is at most 100 years, so this is a safety net.)
fn after_now(delay: Duration) -> Option<SystemTime> {
    SystemTime::now().checked_add(delay)
}

fn too_far(what: &str, delay: Duration) -> String {
    format!("{what} {delay:?} is further ahead than the clock can hold")
}

fn parse_rule(text: &str) -> Result<DependencyRule, String> {
    text.trim()
        .replace('-', "_")
        .to_ascii_lowercase()
        .parse::<DependencyRule>()
        .map_err(|err| err.to_string())
}

/// `--at`: RFC 3339, or HH:MM[:SS] local (today, else tomorrow). A
/// duration is refused: a time from now is `--delay`.
pub fn parse_at(text: &str) -> Result<SystemTime, String> {
    parse_start(text, StartForm::Flag)
}

/// Where a start time was written, so a refused duration is pointed to the
/// right form of `delay`.
#[derive(Clone, Copy, Debug)]
enum StartForm {
    /// `--at` (use `--delay 10m`).
    Flag,
    /// A graph file's `at:` (use `delay: 10m`).
    FileKey,
}

/// [`parse_at`] for `--at` or a graph file's `at:`.
fn parse_start(text: &str, form: StartForm) -> Result<SystemTime, String> {
    let text = text.trim();
    let expected =
        || format!("{text:?}: expected RFC 3339 (2026-05-01T12:00:00Z) or HH:MM[:SS] (e.g. 14:30)");
    // A bare number is seconds to `--delay`, not a time of day.
    let seconds = text.parse::<u64>().ok().map(Duration::from_secs);
    if seconds.is_none() && !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == ':')
    {
        let clock = parse_clock(text).ok_or_else(expected)?;
        return next_at(&chrono::Local, chrono::Utc::now(), clock)
            .ok_or_else(|| format!("{text:?}: no such local time today or tomorrow"));
    }
    if let Some(delay) = seconds.or_else(|| humantime::parse_duration(text).ok()) {
        let delay = humantime::format_duration(delay)
            .to_string()
            .replace(' ', "");
        let (at, delay) = match form {
            StartForm::Flag => ("--at", format!("--delay {delay}")),
            StartForm::FileKey => ("`at`", format!("`delay: {delay}`")),
        };
        return Err(format!(
            "{text:?} is a duration: {at} takes a time (RFC 3339, or HH:MM[:SS] local); \
             for a start this long from now use {delay}"
        ));
    }
    crate::args::parse_rfc3339_arg(text).map_err(|_| expected())
}

/// `HH:MM` or `HH:MM:SS`, two digits each.
fn parse_clock(text: &str) -> Option<chrono::NaiveTime> {
    let field = |s: &str| (s.len() == 2).then(|| s.parse::<u32>().ok())?;
    match text.split(':').collect::<Vec<_>>().as_slice() {
        [h, m] => chrono::NaiveTime::from_hms_opt(field(h)?, field(m)?, 0),
        [h, m, s] => chrono::NaiveTime::from_hms_opt(field(h)?, field(m)?, field(s)?),
        _ => None,
    }
}

/// The first instant after `now` whose time of day in `tz` is `clock`:
/// today's date there, else tomorrow's, each with the UTC offset `tz` has
/// at that time (not the offset now: a DST change may lie between). A time
/// a change skips (02:30 on a spring-forward night) is read with the
/// offset before the change (03:30 summer time); one a change repeats is
/// its first occurrence still after `now` (the second, once the first has
/// passed).
fn next_at<Tz: chrono::TimeZone>(
    tz: &Tz,
    now: chrono::DateTime<chrono::Utc>,
    clock: chrono::NaiveTime,
) -> Option<SystemTime> {
    use chrono::offset::{LocalResult, Offset};

    let today = now.with_timezone(tz).date_naive();
    let utc = |at: chrono::DateTime<Tz>| at.with_timezone(&chrono::Utc);
    let resolve = |local: chrono::NaiveDateTime| match tz.from_local_datetime(&local) {
        LocalResult::Single(at) => vec![utc(at)],
        LocalResult::Ambiguous(first, second) => vec![utc(first), utc(second)],
        LocalResult::None => {
            let before = tz
                .offset_from_utc_datetime(&(local - chrono::TimeDelta::days(1)))
                .fix()
                .local_minus_utc();
            vec![(local - chrono::TimeDelta::seconds(before.into())).and_utc()]
        }
    };
    [today, today.succ_opt()?]
        .into_iter()
        .flat_map(|date| resolve(date.and_time(clock)))
        .find(|at| *at > now)
        .map(SystemTime::from)
}

/// One task of a graph file. Every key `weft submit` has as a flag.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTask {
    #[serde(rename = "ref")]
    ref_name: Option<String>,
    #[serde(default)]
    after: Vec<String>,
    after_rule: Option<String>,
    exec: Option<Vec<String>>,
    call: Option<String>,
    input: Option<String>,
    stdin: Option<String>,
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    slots: Option<u32>,
    timeout: Option<String>,
    schedule_timeout: Option<String>,
    max_attempts: Option<u32>,
    cwd: Option<String>,
    priority: Option<u8>,
    fair_key: Option<String>,
    fair_weight: Option<u32>,
    #[serde(default)]
    resources: BTreeMap<String, String>,
    concurrency_key: Option<String>,
    max_concurrent: Option<u32>,
    on_limit: Option<String>,
    /// `NAME` or `NAME:UNITS`, as `--rate-limit`.
    #[serde(default)]
    rate_limits: Vec<String>,
    #[serde(default)]
    fail_if_infeasible: bool,
    at: Option<String>,
    delay: Option<String>,
}

fn task_error(index: usize, task: &FileTask, field: &str, why: impl std::fmt::Display) -> String {
    match &task.ref_name {
        Some(name) => format!("task {index} (ref '{name}'): `{field}`: {why}"),
        None => format!("task {index}: `{field}`: {why}"),
    }
}

/// Reads a graph file into specs; errors say the line and column (from
/// the parser) or the task's index/ref and field.
pub fn read_graph(path: &Path) -> Result<Vec<TaskSpec>, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| UsageError(format!("reading {}: {err}", path.display())))?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    // A graph file is a list of tasks; a map at the top (`tasks: [...]`,
    // one task without its `- `) is the likeliest slip, so say so plainly.
    let top_is_map = match json {
        true => serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v.is_object()),
        false => serde_norway::from_str::<serde_norway::Value>(&text).is_ok_and(|v| v.is_mapping()),
    };
    if top_is_map {
        return Err(UsageError(format!(
            "{}: a graph file is a list of tasks ({}), not a map",
            path.display(),
            match json {
                true => "[{\"ref\": \"a\", \"exec\": [\"true\"]}, ...]",
                false => "one '- ref: ...' entry per task",
            }
        )));
    }
    let tasks: Vec<FileTask> = if json {
        serde_json::from_str(&text).map_err(|err| {
            UsageError(format!(
                "{}:{}:{}: {err}",
                path.display(),
                err.line(),
                err.column()
            ))
        })?
    } else {
        serde_norway::from_str(&text).map_err(|err| {
            let at = err
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            UsageError(format!("{}{at}: {err}", path.display()))
        })?
    };
    if tasks.is_empty() {
        return Err(UsageError(format!("{}: no tasks", path.display())));
    }
    // An `after` entry is one of these refs first, else a task id.
    let refs: HashSet<&str> = tasks.iter().filter_map(|t| t.ref_name.as_deref()).collect();
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            file_spec(i, t, &refs).map_err(|e| UsageError(format!("{}: {e}", path.display())))
        })
        .collect()
}

fn duration(index: usize, task: &FileTask, field: &str, text: &str) -> Result<Duration, String> {
    parse_duration_arg(text).map_err(|e| task_error(index, task, field, e))
}

/// Task `i` of a graph file whose tasks have `refs`.
fn file_spec(i: usize, t: &FileTask, refs: &HashSet<&str>) -> Result<TaskSpec, String> {
    let mut spec = match (&t.exec, &t.call) {
        (Some(argv), None) if !argv.is_empty() => {
            if t.input.is_some() {
                return Err(task_error(
                    i,
                    t,
                    "input",
                    "only for `call` tasks (exec: stdin)",
                ));
            }
            TaskSpec::exec(argv.clone())
        }
        (None, Some(handler)) => {
            // What only a process has: a call's handler gets `input`.
            for (field, set) in [
                ("stdin", t.stdin.is_some()),
                ("env", !t.env.is_empty()),
                ("cwd", t.cwd.is_some()),
            ] {
                if set {
                    return Err(task_error(
                        i,
                        t,
                        field,
                        "only for `exec` tasks (call: input)",
                    ));
                }
            }
            TaskSpec::call(handler, t.input.clone().unwrap_or_default())
        }
        (Some(_), Some(_)) => {
            return Err(task_error(i, t, "exec", "give `exec` or `call`, not both"));
        }
        _ => {
            return Err(task_error(
                i,
                t,
                "exec",
                "give `exec: [argv...]` or `call: HANDLER`",
            ));
        }
    };
    if let Some(name) = &t.ref_name {
        spec = spec.ref_name(name);
    }
    for dep in &t.after {
        spec = match dep.parse::<TaskId>() {
            Ok(id) if !refs.contains(dep.as_str()) => spec.after(id),
            _ => spec.after_ref(dep),
        };
    }
    if t.after_rule.is_some() && t.after.is_empty() {
        return Err(task_error(i, t, "after_rule", "needs `after`"));
    }
    if let Some(rule) = &t.after_rule {
        spec = spec.after_rule(parse_rule(rule).map_err(|e| task_error(i, t, "after_rule", e))?);
    }
    if let Some(stdin) = &t.stdin {
        spec = spec.stdin(stdin.clone().into_bytes());
    }
    if let Some(name) = &t.name {
        spec = spec.name(name);
    }
    for (k, v) in &t.labels {
        spec = spec.label(k, v);
    }
    for (k, v) in &t.env {
        spec = spec.env(k, v);
    }
    if let Some(n) = t.slots {
        spec = spec.slots(n);
    }
    if let Some(d) = &t.timeout {
        spec = spec.timeout(duration(i, t, "timeout", d)?);
    }
    if let Some(d) = &t.schedule_timeout {
        spec = spec.schedule_timeout(duration(i, t, "schedule_timeout", d)?);
    }
    if let Some(n) = t.max_attempts {
        spec = spec.max_attempts(n);
    }
    if let Some(cwd) = &t.cwd {
        spec = spec.cwd(cwd);
    }
    spec = file_policy(i, t)?.apply(spec);
    match (&t.at, &t.delay) {
        (Some(_), Some(_)) => return Err(task_error(i, t, "at", "give `at` or `delay`, not both")),
        (Some(at), None) => {
            spec = spec.not_before(
                parse_start(at, StartForm::FileKey).map_err(|e| task_error(i, t, "at", e))?,
            )
        }
        (None, Some(d)) => {
            let delay = duration(i, t, "delay", d)?;
            let at = after_now(delay)
                .ok_or_else(|| task_error(i, t, "delay", too_far("delay", delay)))?;
            spec = spec.not_before(at);
        }
        (None, None) => {}
    }
    Ok(spec)
}

/// A graph file task's policy keys, read as `weft submit`'s flags are.
fn file_policy(i: usize, t: &FileTask) -> Result<PolicyOpts, String> {
    let fail = |field: &str, why: String| task_error(i, t, field, why);
    if t.concurrency_key.is_none() {
        for (field, set) in [
            ("max_concurrent", t.max_concurrent.is_some()),
            ("on_limit", t.on_limit.is_some()),
        ] {
            if set {
                return Err(fail(field, "needs `concurrency_key`".into()));
            }
        }
    }
    if t.fair_key.is_none() && t.fair_weight.is_some() {
        return Err(fail("fair_weight", "needs `fair_key`".into()));
    }
    // The ranges the flags take (see PolicyOpts).
    if let Some(p) = t.priority
        && !(MIN_PRIORITY..=MAX_PRIORITY).contains(&p)
    {
        return Err(fail(
            "priority",
            format!("{p} is not in {MIN_PRIORITY}..={MAX_PRIORITY}"),
        ));
    }
    if let Some(w) = t.fair_weight
        && !(1..=MAX_FAIR_WEIGHT).contains(&w)
    {
        return Err(fail(
            "fair_weight",
            format!("{w} is not in 1..={MAX_FAIR_WEIGHT}"),
        ));
    }
    if t.max_concurrent == Some(0) {
        return Err(fail(
            "max_concurrent",
            "0 is not in 1.. (at least 1)".into(),
        ));
    }
    let on_limit = t
        .on_limit
        .as_deref()
        .map(|text| {
            OnLimit::from_str(&text.replace('_', "-"), true).map_err(|_| {
                fail(
                    "on_limit",
                    format!("'{text}': one of queue, cancel-newest, cancel-oldest"),
                )
            })
        })
        .transpose()?;
    let resources = t
        .resources
        .iter()
        .map(|(name, amount)| {
            weft_proto::policy::parse_resource(&format!("{name}={amount}"))
                .map_err(|e| fail("resources", e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(PolicyOpts {
        priority: t.priority,
        fair_key: t
            .fair_key
            .as_deref()
            .map(parse_fair_key)
            .transpose()
            .map_err(|e| fail("fair_key", e))?,
        fair_weight: t.fair_weight,
        concurrency_key: t.concurrency_key.clone(),
        max_concurrent: t.max_concurrent,
        on_limit,
        rate_limits: t
            .rate_limits
            .iter()
            .map(|text| parse_rate_use(text))
            .collect::<Result<_, _>>()
            .map_err(|e| fail("rate_limits", e))?,
        resources,
        fail_if_infeasible: t.fail_if_infeasible,
    })
}

/// Prints what a Submit made: the job id, then each task's id (and ref).
pub fn print_submitted(format: OutputFormat, outcome: &SubmitOutcome, refs: &[String]) {
    match format {
        OutputFormat::Text => {
            println!("job {}", outcome.job_id);
            for (id, name) in outcome.task_ids.iter().zip(refs) {
                match name.as_str() {
                    "" => println!("{id}"),
                    name => println!("{id}  {name}"),
                }
            }
        }
        OutputFormat::Json => {
            let tasks: Vec<_> = outcome
                .task_ids
                .iter()
                .zip(refs)
                .map(|(id, r)| json!({ "id": id.to_string(), "ref": r }))
                .collect();
            println!(
                "{}",
                json!({
                    "job_id": outcome.job_id.to_string(),
                    "task_ids": outcome.task_ids.iter().map(TaskId::to_string).collect::<Vec<_>>(),
                    "tasks": tasks,
                })
            );
        }
    }
}

/// `weft submit -f FILE`; each task continues `trace` if given.
pub async fn submit_file(
    client: &Client,
    format: OutputFormat,
    path: &Path,
    trace: Option<weft_proto::TraceContext>,
) -> anyhow::Result<u8> {
    let mut specs = read_graph(path)?;
    if let Some(trace) = trace {
        specs = specs.into_iter().map(|s| s.trace(trace.clone())).collect();
    }
    let refs: Vec<String> = specs.iter().map(|s| s.ref_name.clone()).collect();
    let outcome = client.submit_graph(specs).await?;
    print_submitted(format, &outcome, &refs);
    Ok(exit::SUCCESS)
}

/// `weft job ...`.
#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Show a job: how many of its tasks are in each state, then its tasks
    /// (oldest first).
    Get {
        /// The job id (what `weft submit -f` prints; the first task's id).
        #[arg(value_parser = parse_task_id)]
        job: TaskId,
    },
    /// Follow a job until every task is final, printing each task as it
    /// ends. Exits 0 when all succeeded, else with the code of the first
    /// task (oldest first) that did not, as `weft wait` would for it
    /// (e.g. 4 upstream_failed, 5 skipped, 130 cancelled). Exits 69 when
    /// the coordinator ends the stream before every task finished, unless
    /// a task already seen did not succeed: the job has failed, and that
    /// task's code is the exit code (of the first such task seen, oldest
    /// first).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Watch {
        /// The job id.
        #[arg(value_parser = parse_task_id)]
        job: TaskId,
    },
    /// Cancel every task of a job that is not final, PENDING ones too.
    Cancel {
        /// The job id.
        #[arg(value_parser = parse_task_id)]
        job: TaskId,
    },
}

/// Runs a `weft job` command.
pub async fn run(client: &Client, format: OutputFormat, command: JobCommand) -> anyhow::Result<u8> {
    match command {
        JobCommand::Get { job } => get(client, format, job).await,
        JobCommand::Watch { job } => watch(client, format, job).await,
        JobCommand::Cancel { job } => {
            let done = client.cancel_job(job, "").await?;
            match format {
                OutputFormat::Text => println!(
                    "job {job}: {} cancelled, {} already final",
                    done.cancelled, done.already_final
                ),
                OutputFormat::Json => println!(
                    "{}",
                    json!({
                        "job_id": job.to_string(),
                        "cancelled": done.cancelled,
                        "already_final": done.already_final,
                    })
                ),
            }
            Ok(exit::SUCCESS)
        }
    }
}

async fn job_tasks(client: &Client, job: TaskId) -> anyhow::Result<Vec<Task>> {
    let tasks = client.job_tasks(job).await?;
    if tasks.is_empty() {
        anyhow::bail!("job {job} not found");
    }
    Ok(tasks)
}

fn counts(tasks: &[Task]) -> Vec<(TaskState, usize)> {
    let mut counts: Vec<(TaskState, usize)> = Vec::new();
    for task in tasks {
        match counts.iter_mut().find(|(s, _)| *s == task.state) {
            Some((_, n)) => *n += 1,
            None => counts.push((task.state, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| TaskState::ALL.iter().position(|x| x == s));
    counts
}

async fn get(client: &Client, format: OutputFormat, job: TaskId) -> anyhow::Result<u8> {
    let tasks = job_tasks(client, job).await?;
    let counts = counts(&tasks);
    match format {
        OutputFormat::Text => {
            let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
            println!("job {job}: {} tasks: {}", tasks.len(), summary.join(", "));
            println!("{}", tasks_table(&tasks, SystemTime::now()));
        }
        OutputFormat::Json => {
            let by_state: serde_json::Map<String, serde_json::Value> = counts
                .iter()
                .map(|(s, n)| (s.as_str().to_owned(), json!(n)))
                .collect();
            println!(
                "{}",
                json!({
                    "job_id": job.to_string(),
                    "counts": by_state,
                    "tasks": tasks.iter().map(task_json).collect::<Vec<_>>(),
                })
            );
        }
    }
    Ok(exit::SUCCESS)
}

async fn watch(client: &Client, format: OutputFormat, job: TaskId) -> anyhow::Result<u8> {
    let tasks = job_tasks(client, job).await?;
    let order: HashMap<TaskId, usize> = tasks.iter().enumerate().map(|(i, t)| (t.id, i)).collect();
    let mut ended: Vec<Option<Task>> = vec![None; tasks.len()];
    let mut stream = client.wait_many(tasks.iter().map(|t| t.id).collect());
    let mut cut = None;
    while let Some(task) = stream.next().await {
        let task = match task {
            Ok(task) => task,
            Err(err) => {
                cut = Some(err);
                break;
            }
        };
        match format {
            OutputFormat::Text => println!("{}", watch_line(&task)),
            OutputFormat::Json => println!("{}", task_json(&task)),
        }
        if let Some(i) = order.get(&task.id) {
            ended[*i] = Some(task);
        }
    }
    watch_exit_code(job, &ended, cut)
}

/// One line of `weft job watch` in text: the task's summary and error
/// [`printable`] (they come from whoever submitted it).
fn watch_line(task: &Task) -> String {
    let what = task.spec.as_ref().map(|s| s.summary()).unwrap_or_default();
    let error = match task.error.as_str() {
        "" => String::new(),
        e => format!(": {e}"),
    };
    format!(
        "{} {} {}",
        task.id,
        task.state,
        printable(&format!("{what}{error}"))
    )
}

/// The exit code of `weft job watch`: the first task's that did not
/// succeed. A stream that ended (or broke, `cut`) before every task was
/// reported is an error (exit 69 when the coordinator went away): the
/// job's outcome is not known. Unless a task seen did not succeed: then
/// the job failed whatever the rest do, and that task's code is kept
/// (with a warning that the watch was cut short).
fn watch_exit_code(
    job: TaskId,
    ended: &[Option<Task>],
    cut: Option<weft_client::Error>,
) -> anyhow::Result<u8> {
    let missing = ended.iter().filter(|task| task.is_none()).count();
    let failed = ended
        .iter()
        .flatten()
        .map(exit::for_task)
        .find(|code| *code != exit::SUCCESS);
    let cause = match (cut, missing) {
        (None, 0) => return Ok(failed.unwrap_or(exit::SUCCESS)),
        (Some(err), _) => anyhow::Error::from(err),
        (None, _) => weft_client::Error::Unavailable(format!(
            "the coordinator ended the stream before {missing} tasks of the job finished; \
             run `weft job watch {job}` again"
        ))
        .into(),
    };
    match failed {
        Some(code) => {
            eprintln!("weft: warning: {cause}; a task of the job did not succeed already");
            Ok(code)
        }
        None => Err(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn a_yaml_graph_reads_into_specs_with_refs_and_rules() {
        let (_dir, path) = write(
            "g.yaml",
            "- ref: a\n  exec: [sh, -c, 'echo hi']\n  labels: {zone: eu}\n- ref: b\n  call: echo\n  input: x\n  after: [a]\n  after_rule: all_finished\n  timeout: 30s\n  priority: 8\n",
        );
        let specs = read_graph(&path).expect("reads");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].ref_name, "a");
        assert_eq!(
            specs[1].after,
            vec![weft_proto::Dependency::Ref("a".into())]
        );
        assert_eq!(specs[1].after_rule, DependencyRule::AllFinished);
        assert_eq!(specs[1].timeout, Some(Duration::from_secs(30)));
        assert_eq!(specs[1].priority, 8);
    }

    #[test]
    fn every_policy_flag_is_a_graph_file_key() {
        let (_dir, path) = write(
            "g.yaml",
            "- call: echo\n  fair_key: team-a\n  fair_weight: 3\n  concurrency_key: user-42\n  max_concurrent: 2\n  on_limit: cancel_oldest\n  rate_limits: [api, 'gpu-api:3']\n  resources: {cpu: 2, mem: 1GiB}\n  fail_if_infeasible: true\n",
        );
        let spec = &read_graph(&path).expect("reads")[0];
        assert_eq!((spec.fair_key.as_str(), spec.fair_weight), ("team-a", 3));
        let limit = spec.concurrency.as_ref().expect("a concurrency key");
        assert_eq!(
            (limit.key.as_str(), limit.max_running, limit.on_limit),
            ("user-42", 2, weft_proto::OverLimit::CancelOldest)
        );
        let uses: Vec<(&str, u32)> = spec
            .rate_limits
            .iter()
            .map(|u| (u.name.as_str(), u.units))
            .collect();
        assert_eq!(uses, [("api", 1), ("gpu-api", 3)]);
        assert_eq!(spec.resources.get("mem"), Some(&(1 << 30)));
        assert!(spec.fail_if_infeasible);

        for (text, key) in [
            (
                "- call: echo\n  max_concurrent: 2\n",
                "`max_concurrent`: needs `concurrency_key`",
            ),
            (
                "- call: echo\n  concurrency_key: k\n  on_limit: drop\n",
                "`on_limit`: 'drop'",
            ),
            ("- call: echo\n  rate_limits: ['api:0']\n", "`rate_limits`"),
            (
                "- call: echo\n  fair_weight: 2\n",
                "`fair_weight`: needs `fair_key`",
            ),
            (
                "- call: echo\n  priority: 0\n",
                "`priority`: 0 is not in 1..=9",
            ),
            ("- call: echo\n  priority: 10\n", "`priority`: 10 is not in"),
            (
                "- call: echo\n  fair_key: k\n  fair_weight: 0\n",
                "`fair_weight`: 0 is not in 1..=1000",
            ),
            (
                "- call: echo\n  fair_key: k\n  fair_weight: 1001\n",
                "`fair_weight`: 1001 is not in",
            ),
            (
                "- call: echo\n  concurrency_key: k\n  max_concurrent: 0\n",
                "`max_concurrent`: 0 is not in 1..",
            ),
            (
                "- call: echo\n  stdin: x\n",
                "`stdin`: only for `exec` tasks",
            ),
            (
                "- call: echo\n  env: {A: b}\n",
                "`env`: only for `exec` tasks",
            ),
            (
                "- call: echo\n  cwd: /tmp\n",
                "`cwd`: only for `exec` tasks",
            ),
            ("- call: echo\n  delay: '1e19'\n", "`delay`:"),
            ("- call: echo\n  delay: '1e20'\n", "`delay`:"),
            ("- call: echo\n  timeout: 1e20\n", "`timeout`:"),
        ] {
            let (_d, path) = write("bad.yaml", text);
            let err = read_graph(&path).unwrap_err().0;
            assert!(err.contains(&format!("task 0: {key}")), "{err}");
        }
    }

    #[test]
    fn a_ref_that_looks_like_a_task_id_is_the_files_own_task() {
        let (own, other) = (TaskId::new().to_string(), TaskId::new());
        let (_d, path) = write(
            "g.yaml",
            &format!(
                "- ref: {own}\n  exec: ['true']\n- exec: ['true']\n  after: ['{own}', '{other}']\n"
            ),
        );
        let specs = read_graph(&path).expect("reads");
        assert_eq!(
            specs[1].after,
            vec![
                weft_proto::Dependency::Ref(own),
                weft_proto::Dependency::Task(other),
            ]
        );
    }

    #[test]
    fn after_rule_without_after_is_a_usage_error() {
        let (_d, path) = write(
            "g.yaml",
            "- ref: a\n  exec: ['true']\n  after_rule: any_failed\n",
        );
        let err = read_graph(&path).unwrap_err().0;
        assert!(
            err.contains("task 0 (ref 'a'): `after_rule`: needs `after`"),
            "{err}"
        );
        let flags = DepOpts {
            after_rule: Some(DependencyRule::AnyFailed),
            ..DepOpts::default()
        };
        let err = flags.apply(TaskSpec::exec(["true"])).unwrap_err().0;
        assert!(err.contains("--after-rule needs --after"), "{err}");
        let flags = DepOpts {
            after: vec![TaskId::new()],
            ..flags
        };
        let spec = flags.apply(TaskSpec::exec(["true"])).expect("applies");
        assert_eq!(spec.after_rule, DependencyRule::AnyFailed);
    }

    #[test]
    fn a_bad_file_says_where() {
        let (_d, path) = write("g.yaml", "- ref: a\n  exec: [sh]\n  bogus: 1\n");
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("g.yaml"), "{err}");
        let (_d, path) = write("g.yaml", "- ref: a\n  exec: [sh\n");
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("g.yaml:"), "line and column: {err}");
        let (_d, path) = write(
            "g.json",
            "[{\"ref\": \"a\", \"exec\": [\"sh\"]}, {\"ref\": \"b\", \"call\": \"echo\", \"timeout\": \"soon\"}]",
        );
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("task 1 (ref 'b'): `timeout`"), "{err}");
        let (_d, path) = write("g.json", "[{\"ref\": \"a\",, }]");
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("g.json:1:"), "{err}");
    }

    #[test]
    fn a_map_at_the_top_is_told_to_be_a_list() {
        for (name, text) in [
            ("g.yaml", "tasks:\n  - ref: a\n    exec: [sh]\n"),
            ("g.yaml", "ref: a\nexec: [sh]\n"),
            (
                "g.json",
                "{\"tasks\": [{\"ref\": \"a\", \"exec\": [\"sh\"]}]}",
            ),
        ] {
            let (_d, path) = write(name, text);
            let err = read_graph(&path).unwrap_err().0;
            assert!(err.contains("a graph file is a list of tasks"), "{err}");
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn at_takes_rfc3339_or_a_clock_time_within_a_day() {
        let at = parse_at("2030-01-01T00:00:00Z").expect("rfc3339");
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_893_456_000
        );
        let soon = parse_at("12:30").expect("clock");
        let ahead = soon.duration_since(SystemTime::now()).expect("future");
        // Within a day, or a day and the hour a fall-back repeats.
        assert!(ahead <= Duration::from_secs(25 * 3_600), "{ahead:?}");
        assert!(parse_at("25:00").is_err());
        assert!(parse_at("noon").is_err());
    }

    #[test]
    fn at_refuses_a_duration_and_points_to_delay() {
        for text in ["10 minutes", "10m", "1h 30m"] {
            let err = parse_at(text).expect_err(text);
            assert!(
                err.contains("is a duration") && err.contains("--delay"),
                "{err}"
            );
        }
        assert!(parse_at("10 minutes").unwrap_err().ends_with("--delay 10m"));
        assert!(parse_at("1h 30m").unwrap_err().ends_with("--delay 1h30m"));
        // A bare number is seconds, not a time of day.
        let err = parse_at("30").unwrap_err();
        assert!(
            err.contains("is a duration") && err.ends_with("--delay 30s"),
            "{err}"
        );
        let offset = parse_at("2030-01-01T02:00:00+02:00").expect("offset");
        assert_eq!(
            offset,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
        );
    }

    #[test]
    fn a_clock_time_tomorrow_takes_tomorrows_utc_offset() {
        use chrono::TimeZone;
        use chrono_tz::Europe::Berlin;

        let utc = |text: &str| chrono::DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        let at = |now: &str, clock: &str| {
            let clock = parse_clock(clock).expect("clock");
            chrono::DateTime::<chrono::Utc>::from(next_at(&Berlin, utc(now), clock).expect("at"))
        };
        // 22:00 summer time on the eve of the change: noon tomorrow is
        // winter time (+01:00), 11:00Z, not 10:00Z.
        assert_eq!(
            at("2026-10-24T20:00:00Z", "12:00"),
            utc("2026-10-25T11:00:00Z")
        );
        // Later today: today's offset.
        assert_eq!(
            at("2026-10-24T08:00:00Z", "12:00"),
            utc("2026-10-24T10:00:00Z")
        );
        // 02:30 happens twice on the night of the change: the first.
        assert_eq!(
            at("2026-10-24T20:00:00Z", "02:30"),
            utc("2026-10-25T00:30:00Z")
        );
        // At 02:10 winter time, past the first 02:40: the second, today.
        assert_eq!(
            at("2026-10-25T01:10:00Z", "02:40"),
            utc("2026-10-25T01:40:00Z")
        );
        // Before the first 02:40 (02:10 summer time): the first.
        assert_eq!(
            at("2026-10-25T00:10:00Z", "02:40"),
            utc("2026-10-25T00:40:00Z")
        );
        // 02:30 does not happen on the spring night: 03:30 summer time.
        assert_eq!(
            at("2026-03-28T20:00:00Z", "02:30"),
            utc("2026-03-29T01:30:00Z")
        );
        // The past today: tomorrow.
        assert_eq!(
            at("2026-07-01T12:00:00Z", "09:15:30"),
            utc("2026-07-02T07:15:30Z")
        );
        assert_eq!(
            Berlin
                .offset_from_utc_datetime(&utc("2026-07-01T00:00:00Z").naive_utc())
                .to_string(),
            "CEST"
        );
    }

    #[test]
    fn clock_times_are_two_digits_a_field() {
        assert_eq!(
            parse_clock("09:05"),
            chrono::NaiveTime::from_hms_opt(9, 5, 0)
        );
        assert_eq!(
            parse_clock("23:59:59"),
            chrono::NaiveTime::from_hms_opt(23, 59, 59)
        );
        for bad in [
            "9:05",
            "24:00",
            "12:60",
            "12:00:60",
            "12",
            "12:00:00:00",
            "::",
        ] {
            assert_eq!(parse_clock(bad), None, "{bad}");
        }
    }

    fn ended(state: TaskState) -> Task {
        Task {
            spec: Some(TaskSpec::exec(["echo", "\x1b]0;pwn\x07"])),
            error: "boom\x1b[2J".into(),
            ..crate::testing::task(state)
        }
    }

    #[test]
    fn watch_fails_when_the_stream_ends_before_every_task() {
        let job = TaskId::new();
        let done = Some(ended(TaskState::Succeeded));
        assert_eq!(
            watch_exit_code(job, std::slice::from_ref(&done), None).unwrap(),
            exit::SUCCESS
        );
        let cancelled = Some(ended(TaskState::Cancelled));
        assert_eq!(
            watch_exit_code(job, &[done.clone(), cancelled], None).unwrap(),
            exit::CANCELLED
        );
        let err = watch_exit_code(job, &[done.clone(), None, None], None).unwrap_err();
        assert_eq!(exit::for_error(&err), exit::UNAVAILABLE);
        assert!(
            err.to_string()
                .contains("before 2 tasks of the job finished"),
            "{err}"
        );
        let lost = weft_client::Error::Unavailable("connection lost".into());
        let err = watch_exit_code(job, &[done, None], Some(lost)).unwrap_err();
        assert_eq!(exit::for_error(&err), exit::UNAVAILABLE);
    }

    #[test]
    fn a_watch_cut_short_after_a_failure_exits_with_the_failures_code() {
        let job = TaskId::new();
        let done = Some(ended(TaskState::Succeeded));
        let cancelled = Some(ended(TaskState::Cancelled));
        assert_eq!(
            watch_exit_code(job, &[done.clone(), None, cancelled.clone()], None).unwrap(),
            exit::CANCELLED
        );
        let lost = weft_client::Error::Unavailable("connection lost".into());
        assert_eq!(
            watch_exit_code(job, &[None, done, cancelled], Some(lost)).unwrap(),
            exit::CANCELLED
        );
    }

    #[test]
    fn a_duration_in_a_graph_files_at_points_to_its_delay_key() {
        let (_d, path) = write("g.yaml", "- exec: [sh]\n  at: 10m\n");
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("use `delay: 10m`"), "{err}");
        assert!(!err.contains("--delay"), "{err}");
        let (_d, path) = write("g.yaml", "- exec: [sh]\n  at: '30'\n");
        let err = read_graph(&path).unwrap_err().0;
        assert!(err.contains("use `delay: 30s`"), "{err}");
    }

    #[test]
    fn watch_lines_escape_control_characters() {
        let line = watch_line(&ended(TaskState::Failed));
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line}");
        assert!(line.ends_with(": boom\\u{1b}[2J"), "{line}");
    }
}
