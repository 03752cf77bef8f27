//! How the CLI prints results: `--output text` (readable blocks and tables)
//! or `--output json` (one JSON object per result, or one per line for
//! event streams). Pure formatting: functions build strings and
//! `serde_json::Value`s; the commands decide where they go.

use std::time::{Duration, SystemTime};

use base64::Engine;
use clap::ValueEnum;
use serde_json::{Value, json};

use weft_client::{ClusterInfo, EventBody, NodeInfo, Task, TaskAttempt, TaskEvent};
use weft_proto::TaskKind;

/// The `--output` format.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Readable text and tables.
    #[default]
    Text,
    /// JSON: one object per result (one per line for event streams).
    Json,
}

/// A task as a JSON object. `node` is the node name of the latest attempt;
/// `output` is the handler's output as UTF-8 (lossy), `output_base64` the
/// exact bytes.
pub fn task_json(task: &Task) -> Value {
    let (kind, command, handler, max_attempts) = match &task.spec {
        Some(spec) => match &spec.kind {
            TaskKind::Exec(exec) => (
                Value::from("exec"),
                Value::from(exec.argv.clone()),
                Value::Null,
                Value::from(spec.max_attempts),
            ),
            TaskKind::Call(call) => (
                Value::from("call"),
                Value::Null,
                Value::from(call.handler.clone()),
                Value::from(spec.max_attempts),
            ),
        },
        None => (Value::Null, Value::Null, Value::Null, Value::Null),
    };
    json!({
        "id": task.id.to_string(),
        "name": task.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        "kind": kind,
        "command": command,
        "handler": handler,
        "state": task.state.as_str(),
        "attempt": task.attempt.0,
        "max_attempts": max_attempts,
        "node": task.node_name,
        "node_id": task.node_id.map(|id| id.to_string()),
        "exit_code": task.exit_code,
        "error": task.error,
        "pending_reason": task.pending_reason,
        "failures": task.failures,
        "node_losses": task.node_losses,
        "output": String::from_utf8_lossy(&task.output),
        "output_base64": base64::engine::general_purpose::STANDARD.encode(&task.output),
        "created_at": task.created_at.map(rfc3339),
        "updated_at": task.updated_at.map(rfc3339),
        "attempts": task.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
        "job_id": task.job_id.map(|j| j.to_string()),
        "waiting_for": task.waiting_for.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "ref": task.spec.as_ref().map(|s| s.ref_name.clone()).unwrap_or_default(),
        "after": task.spec.as_ref().map(|s| after_ids(&s.after)).unwrap_or_default(),
        "after_rule": task.spec.as_ref().filter(|s| !s.after.is_empty()).map(|s| s.after_rule.as_str()),
    })
}

/// The tasks a spec runs after, as text (ids; refs only before Submit).
fn after_ids(after: &[weft_proto::Dependency]) -> Vec<String> {
    after
        .iter()
        .map(|d| match d {
            weft_proto::Dependency::Task(id) => id.to_string(),
            weft_proto::Dependency::Ref(name) => name.clone(),
        })
        .collect()
}

/// One attempt as a JSON object; times RFC 3339 (null: not yet, or
/// never), `duration_ms` its run time so far (null if it never started),
/// `outcome` as its node reported it (null: none, e.g. lost with its node).
pub fn attempt_json(attempt: &TaskAttempt) -> Value {
    json!({
        "number": attempt.number.0,
        "node": attempt.node_name,
        "node_id": attempt.node_id.map(|id| id.to_string()),
        "assigned_at": attempt.assigned_at.map(rfc3339),
        "started_at": attempt.started_at.map(rfc3339),
        "ended_at": attempt.ended_at.map(rfc3339),
        "duration_ms": attempt
            .run_time(SystemTime::now())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        "outcome": attempt.outcome.map(|o| o.as_str()),
        "exit_code": attempt.exit_code,
        "reason": attempt.reason,
    })
}

/// How an attempt stands or ended, in one word: its node's outcome,
/// `running`/`assigned` while on its node, `ended` when it ended with no
/// report (its reason says why).
fn attempt_state(attempt: &TaskAttempt) -> &'static str {
    match (attempt.outcome, attempt.ended_at, attempt.started_at) {
        (Some(outcome), ..) => outcome.as_str(),
        (None, Some(_), _) => "ended",
        (None, None, Some(_)) => "running",
        (None, None, None) => "assigned",
    }
}

/// A task's attempts as a table: number, node, started, ended, how long
/// it ran, how it ended and why.
pub fn attempts_table(attempts: &[TaskAttempt], now: SystemTime) -> String {
    let time = |t: Option<SystemTime>| t.map_or_else(|| "-".to_owned(), rfc3339);
    let rows = attempts
        .iter()
        .map(|a| {
            vec![
                a.number.to_string(),
                a.node_name.clone(),
                time(a.started_at),
                time(a.ended_at),
                a.run_time(now)
                    .map_or_else(|| "-".to_owned(), short_duration),
                attempt_state(a).to_owned(),
                if a.reason.is_empty() {
                    "-".to_owned()
                } else {
                    a.reason.clone()
                },
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "#", "NODE", "STARTED", "ENDED", "DURATION", "OUTCOME", "REASON",
        ],
        &rows,
    )
}

/// What `weft list`'s DURATION column shows: for a queued task, how long
/// it has waited (since it was submitted or its last attempt ended);
/// otherwise the latest attempt's run time (so far, while it runs), or,
/// for one that never started, how long it waited (until it ended).
pub fn task_duration(task: &Task, now: SystemTime) -> Option<Duration> {
    let last = task.attempts.last();
    if task.state != weft_proto::TaskState::Queued
        && let Some(run) = last.and_then(|a| a.run_time(now))
    {
        return Some(run);
    }
    let since = match last {
        Some(a) if a.ended_at.is_none() => a.assigned_at,
        Some(a) => a.ended_at,
        None => task.created_at,
    }?;
    let until = if task.state.is_final() {
        task.updated_at.unwrap_or(now)
    } else {
        now
    };
    Some(until.duration_since(since).unwrap_or_default())
}

/// Where [`task_text`]'s values start: a value of several lines (an error
/// with its traceback) goes on at this column.
const DETAIL_INDENT: &str = "               ";

/// A task as a readable block of `key: value` lines.
pub fn task_text(task: &Task) -> String {
    let mut lines = vec![
        format!("id:            {}", task.id),
        format!("state:         {}", task.state),
    ];
    if let Some(spec) = &task.spec {
        if !spec.name.is_empty() {
            lines.push(format!("name:          {}", printable(&spec.name)));
        }
        match &spec.kind {
            TaskKind::Exec(exec) => {
                lines.push(format!("command:       {}", shell_words(&exec.argv)))
            }
            TaskKind::Call(call) => {
                lines.push(format!("handler:       {}", printable(&call.handler)))
            }
        }
        lines.push(format!(
            "attempt:       {} of {}",
            task.attempt, spec.max_attempts
        ));
    } else {
        lines.push(format!("attempt:       {}", task.attempt));
    }
    if let Some(job) = task.job_id.filter(|j| *j != task.id) {
        lines.push(format!("job:           {job}"));
    }
    if let Some(spec) = task.spec.as_ref() {
        if !spec.ref_name.is_empty() {
            lines.push(format!("ref:           {}", printable(&spec.ref_name)));
        }
        if !spec.after.is_empty() {
            lines.push(format!(
                "after:         {} ({})",
                after_ids(&spec.after).join(", "),
                spec.after_rule
            ));
        }
    }
    if !task.waiting_for.is_empty() {
        let ids: Vec<String> = task.waiting_for.iter().map(|id| id.to_string()).collect();
        lines.push(format!("waiting for:   {}", ids.join(", ")));
    }
    if let Some(node) = &task.node_name {
        lines.push(format!("node:          {}", printable(node)));
    }
    if let Some(code) = task.exit_code {
        lines.push(format!("exit code:     {code}"));
    }
    if !task.error.is_empty() {
        lines.push(format!(
            "error:         {}",
            printable_lines(&task.error, DETAIL_INDENT)
        ));
    }
    if !task.pending_reason.is_empty() {
        lines.push(format!(
            "waiting:       {}",
            printable(&task.pending_reason)
        ));
    }
    if task.failures > 0 || task.node_losses > 0 {
        lines.push(format!(
            "failures:      {} (node losses: {})",
            task.failures, task.node_losses
        ));
    }
    if let Some(created) = task.created_at {
        lines.push(format!("created:       {}", rfc3339(created)));
    }
    if let Some(updated) = task.updated_at {
        lines.push(format!("updated:       {}", rfc3339(updated)));
    }
    if !task.output.is_empty() {
        lines.push(format!(
            "output:        {}",
            String::from_utf8_lossy(&task.output).trim_end()
        ));
    }
    if !task.attempts.is_empty() {
        lines.push("attempts:".to_owned());
        let table = attempts_table(&task.attempts, SystemTime::now());
        lines.extend(table.lines().map(|line| format!("  {line}")));
    }
    lines.join("\n")
}

/// Tasks as a table: id, state, attempt, node, duration ([`task_duration`]),
/// what.
pub fn tasks_table(tasks: &[Task], now: SystemTime) -> String {
    let rows = tasks
        .iter()
        .map(|task| {
            vec![
                task.id.to_string(),
                task.state.to_string(),
                task.attempt.to_string(),
                task.node_name.clone().unwrap_or_else(|| "-".into()),
                task_duration(task, now).map_or_else(|| "-".to_owned(), short_duration),
                task.spec
                    .as_ref()
                    .map(|s| s.summary())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &["ID", "STATE", "ATTEMPT", "NODE", "DURATION", "TASK"],
        &rows,
    )
}

/// A node as a JSON object.
pub fn node_json(node: &NodeInfo) -> Value {
    json!({
        "id": node.id.to_string(),
        "name": node.name,
        "state": node.state.as_str(),
        "labels": node.labels,
        "slots": node.slots,
        "slots_used": node.slots_used,
        "slots_free": node.slots_free,
        "running": node.running.iter()
            .map(|(id, attempt)| json!({"task_id": id.to_string(), "attempt": attempt.0}))
            .collect::<Vec<_>>(),
        "last_heartbeat_age_ms": u64::try_from(node.last_heartbeat_age.as_millis()).unwrap_or(u64::MAX),
        "handlers": node.handlers,
        "finished": node.finished,
        "resources": node.resources,
        "resources_free": node.resources_free,
    })
}

/// Nodes as a table: name, id, state, slots, running, heartbeat age, labels,
/// and the handlers each serves (sorted; `-` for none).
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let rows = nodes
        .iter()
        .map(|node| {
            let labels = node
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                node.name.clone(),
                node.id.to_string(),
                node.state.to_string(),
                format!("{}/{}", node.slots_used, node.slots),
                node.slots_free.to_string(),
                node.running.len().to_string(),
                short_duration(node.last_heartbeat_age),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels
                },
                resources_cell(node),
                handlers_cell(&node.handlers),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NAME",
            "ID",
            "STATE",
            "USED/SLOTS",
            "FREE",
            "RUNNING",
            "HEARTBEAT",
            "LABELS",
            "RESOURCES",
            "HANDLERS",
        ],
        &rows,
    )
}

/// A node's resources for its table cell: `cpu 6/8 gpu 1/2` (free/total),
/// `-` for none.
fn resources_cell(node: &NodeInfo) -> String {
    if node.resources.is_empty() {
        return "-".into();
    }
    node.resources
        .iter()
        .map(|(name, total)| {
            let free = node.resources_free.get(name).copied().unwrap_or(0);
            format!("{name} {free}/{total}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A node's handlers for its table cell: sorted, comma-separated, `-` for none.
fn handlers_cell(handlers: &[String]) -> String {
    let mut sorted: Vec<&str> = handlers.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    if sorted.is_empty() {
        "-".into()
    } else {
        sorted.join(",")
    }
}

/// Cluster figures as a JSON object.
pub fn cluster_json(info: &ClusterInfo) -> Value {
    let tasks: serde_json::Map<String, Value> = info
        .tasks
        .iter()
        .map(|(state, n)| (state.as_str().to_owned(), Value::from(*n)))
        .collect();
    json!({
        "version": info.version,
        "nodes": info.nodes,
        "slots": info.slots,
        "slots_free": info.slots_free,
        "tasks": tasks,
        "tasks_finished": info.tasks_finished,
        "uptime_s": info.uptime.as_secs_f64(),
        "stale_events_refused": info.stale_events_refused,
        "nodes_lost": info.nodes_lost,
        "revoked_node_refusals": info.revoked_node_refusals,
        "foreign_events_refused": info.foreign_events_refused,
        "attempts_not_started": info.attempts_not_started,
        "reclaimed_attempts": info.reclaimed_attempts,
    })
}

/// Cluster figures as readable text.
pub fn cluster_text(info: &ClusterInfo) -> String {
    let tasks = info
        .tasks
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| format!("{state} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "version:       {}\nuptime:        {}\nnodes:         {} ({} lost since start)\nslots:         {} ({} free)\ntasks:         {}\nfinished:      {} since start\nstale events:  {}\nrefused:       {} from revoked nodes, {} for another node's attempts\nnot started:   {} attempts taken back after --start-timeout\nreclaimed:     {} attempts carried on by nodes back within --reconnect-grace",
        info.version,
        short_duration(info.uptime),
        info.nodes,
        info.nodes_lost,
        info.slots,
        info.slots_free,
        if tasks.is_empty() {
            "none".into()
        } else {
            tasks
        },
        info.tasks_finished,
        info.stale_events_refused,
        info.revoked_node_refusals,
        info.foreign_events_refused,
        info.attempts_not_started,
        info.reclaimed_attempts,
    )
}

/// An event as one JSON object (a line of `run`/`watch --output json`).
/// An output chunk's `data` is UTF-8 (lossy: a character split across
/// chunks, or binary output, is damaged), `data_base64` its exact bytes.
pub fn event_json(event: &TaskEvent) -> Value {
    let mut value = json!({
        "task_id": event.task_id.to_string(),
        "seq": event.seq,
        "attempt": event.attempt.0,
    });
    let body = match &event.body {
        EventBody::State {
            state,
            node_name,
            reason,
        } => json!({"type": "state", "state": state.as_str(), "node": node_name, "reason": reason}),
        EventBody::Output { stream, data } => json!({
            "type": "output",
            "stream": stream.as_str(),
            "data": String::from_utf8_lossy(data),
            "data_base64": base64::engine::general_purpose::STANDARD.encode(data),
        }),
        EventBody::Progress { fraction, message } => {
            json!({"type": "progress", "fraction": fraction, "message": message})
        }
        EventBody::Finished(task) => json!({"type": "finished", "task": task_json(task)}),
    };
    if let (Value::Object(into), Value::Object(from)) = (&mut value, body) {
        into.extend(from);
    }
    value
}

/// `text` safe to show on a terminal: control characters (newlines,
/// ESC starting a terminal escape, NUL) written as Rust escapes (`\n`,
/// `\u{1b}`, `\u{0}`). Names, argv and labels come from whoever
/// submitted the task, and must not move the cursor or retitle the
/// reader's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `text` of several lines (a handler's error: `Type: message`, a blank
/// line, its traceback) safe to show where a value may span lines: each
/// line [`printable`] on its own, tabs kept; lines after the first start
/// with `indent` (blank ones stay empty); trailing line ends dropped. For
/// a one-line place (a table cell, a `job watch` line) use [`printable`].
pub fn printable_lines(text: &str, indent: &str) -> String {
    text.trim_end_matches(['\n', '\r'])
        .split('\n')
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            line.split('\t')
                .map(printable)
                .collect::<Vec<_>>()
                .join("\t")
        })
        .enumerate()
        .map(|(i, line)| match (i, line.is_empty()) {
            (0, _) | (_, true) => line,
            _ => format!("{indent}{line}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain table with a header row; columns padded to their widest cell.
/// Cells are shown [`printable`]: one line per row, no terminal escapes.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| printable(cell).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    (*cell).to_owned()
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|row| line(row.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

/// `1.2s`, `340ms`, `3m12s`: a short age or span for tables.
pub fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let secs = d.as_secs();
        if secs < 3_600 {
            format!("{}m{}s", secs / 60, secs % 60)
        } else {
            format!("{}h{}m", secs / 3_600, (secs % 3_600) / 60)
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    weft_proto::convert::rfc3339(t, true)
}

/// Arguments joined for display as a shell would take them back: bare
/// when nothing in them is special, else in single quotes, or, for one
/// with control characters (a newline in `sh -c` script), as bash's
/// `$'...'` with those escaped, so the line pastes as the same command and
/// moves no cursor. Not an argument with a NUL in it: no shell passes one
/// on (bash cuts `$'a\x00b'` to `a`); it is shown as `\x00` all the same.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if arg.chars().any(char::is_control) {
                ansi_c_quoted(arg)
            } else if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `arg` as bash's ANSI-C quoting: `$'...'` with `\\`, `\'`, `\n`,
/// `\t`, `\r` and other control characters as `\xHH` (a C1 one, past
/// 0xff in no byte, as `\uHHHH`); other Unicode as it is. A NUL is shown
/// as `\x00` but does not paste back: bash ends the word there, as an
/// argument's C string ends there anyway.
fn ansi_c_quoted(arg: &str) -> String {
    let mut out = String::from("$'");
    for c in arg.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\'' => out.push_str(r"\'"),
            '\n' => out.push_str(r"\n"),
            '\t' => out.push_str(r"\t"),
            '\r' => out.push_str(r"\r"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use weft_proto::OutputStream;

    use weft_proto::{Attempt, NodeId, TaskId, TaskSpec, TaskState};

    use super::*;

    fn failed_task() -> Task {
        Task {
            id: TaskId::new(),
            spec: Some(TaskSpec::exec(["sh", "-c", "exit 3"]).name("three")),
            state: TaskState::Failed,
            attempt: Attempt(2),
            node_id: Some(NodeId::new()),
            node_name: Some("n1".into()),
            exit_code: Some(3),
            output: Bytes::from_static(b"\xffhi"),
            error: "exited with code 3".into(),
            pending_reason: String::new(),
            failures: 2,
            node_losses: 0,
            created_at: Some(SystemTime::UNIX_EPOCH),
            updated_at: None,
            next_seq: 9,
            last_outcome: Some(weft_proto::Outcome::Failed),
            attempts: vec![
                TaskAttempt {
                    number: Attempt(1),
                    node_id: None,
                    node_name: "n0".into(),
                    assigned_at: Some(at(10_000)),
                    started_at: None,
                    ended_at: Some(at(11_000)),
                    outcome: None,
                    exit_code: None,
                    reason: "node n0 lost; retrying as attempt 2".into(),
                },
                TaskAttempt {
                    number: Attempt(2),
                    node_id: None,
                    node_name: "n1".into(),
                    assigned_at: Some(at(12_000)),
                    started_at: Some(at(12_500)),
                    ended_at: Some(at(14_000)),
                    outcome: Some(weft_proto::Outcome::Failed),
                    exit_code: Some(3),
                    reason: "exited with code 3".into(),
                },
            ],
            job_id: None,
            waiting_for: Vec::new(),
        }
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn get_shows_each_attempt_with_its_times_duration_and_outcome() {
        let text = task_text(&failed_task());
        let table = text.split_once("attempts:\n").expect("an attempts table").1;
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].trim_start().starts_with("#  NODE  STARTED"),
            "{table}"
        );
        assert!(
            lines[1].contains("n0") && lines[1].contains("ended") && lines[1].contains("lost"),
            "{table}"
        );
        assert!(lines[2].contains("1970-01-01T00:00:12.500Z"), "{table}");
        assert!(
            lines[2].contains("1.5s") && lines[2].contains("failed"),
            "{table}"
        );
        let json = task_json(&failed_task());
        assert_eq!(json["attempts"][1]["duration_ms"], 1500);
        assert_eq!(json["attempts"][1]["outcome"], "failed");
        assert_eq!(json["attempts"][0]["outcome"], Value::Null);
        assert_eq!(json["attempts"][0]["started_at"], Value::Null);
    }

    #[test]
    fn the_duration_is_the_latest_run_or_the_time_queued() {
        let now = at(20_000);
        let mut task = failed_task();
        assert_eq!(
            task_duration(&task, now),
            Some(Duration::from_millis(1_500))
        );
        // Requeued after attempt 2: queued since it ended.
        task.state = TaskState::Queued;
        assert_eq!(task_duration(&task, now), Some(Duration::from_secs(6)));
        // Never assigned: since it was submitted.
        task.attempts.clear();
        task.created_at = Some(at(5_000));
        assert_eq!(task_duration(&task, now), Some(Duration::from_secs(15)));
    }

    #[test]
    fn task_json_has_the_documented_fields() {
        let task = failed_task();
        let value = task_json(&task);
        assert_eq!(value["id"], task.id.to_string());
        assert_eq!(value["state"], "failed");
        assert_eq!(value["attempt"], 2);
        assert_eq!(value["node"], "n1");
        assert_eq!(value["exit_code"], 3);
        assert_eq!(value["error"], "exited with code 3");
        assert_eq!(value["pending_reason"], "");
        assert_eq!(
            (value["failures"].clone(), value["node_losses"].clone()),
            (json!(2), json!(0))
        );
        assert_eq!(value["kind"], "exec");
        assert_eq!(value["command"], json!(["sh", "-c", "exit 3"]));
        assert_eq!(value["output"], "\u{fffd}hi");
        assert_eq!(value["output_base64"], "/2hp");
        assert_eq!(value["created_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(value["updated_at"], Value::Null);
    }

    #[test]
    fn task_json_of_an_unassigned_task_has_null_node_and_exit_code() {
        let mut task = failed_task();
        task.state = TaskState::Queued;
        task.node_name = None;
        task.node_id = None;
        task.exit_code = None;
        let value = task_json(&task);
        assert_eq!(
            (value["node"].clone(), value["exit_code"].clone()),
            (Value::Null, Value::Null)
        );
        assert_eq!(value["state"], "queued");
    }

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let text = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(text, "A     BB\nlong  x");
    }

    #[test]
    fn shell_words_quote_what_a_shell_would_split() {
        let argv = vec!["sh".to_owned(), "-c".to_owned(), "echo it's".to_owned()];
        assert_eq!(shell_words(&argv), r"sh -c 'echo it'\''s'");
    }

    #[test]
    fn output_events_carry_their_exact_bytes_in_base64() {
        let chunk = |data: &'static [u8]| TaskEvent {
            task_id: TaskId::new(),
            seq: 1,
            attempt: Attempt(1),
            body: EventBody::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from_static(data),
            },
        };
        let mut bytes = Vec::new();
        for data in [&b"\xe2\x82"[..], b"\xac"] {
            let value = event_json(&chunk(data));
            let encoded = value["data_base64"].as_str().expect("data_base64");
            bytes.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("base64"),
            );
        }
        assert_eq!(String::from_utf8(bytes).expect("utf-8"), "€");
    }

    #[test]
    fn control_characters_in_a_task_are_escaped_in_tables() {
        let task = Task {
            spec: Some(TaskSpec::exec(["a\nb", "\x1b]0;pwn\x07"])),
            ..failed_task()
        };
        let table = tasks_table(&[task], SystemTime::UNIX_EPOCH);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\x1b'), "{table}");
        assert!(table.contains("a\\nb \\u{1b}]0;pwn\\u{7}"), "{table}");
        assert_eq!(printable("a\0b"), r"a\u{0}b");
    }

    #[test]
    fn control_characters_in_a_task_are_escaped_in_its_detail() {
        let pwn = "\x1b]0;pwn\x07";
        let mut spec = TaskSpec::exec(["echo", pwn]);
        spec.name = format!("name{pwn}");
        spec.ref_name = format!("ref{pwn}");
        let task = Task {
            spec: Some(spec),
            node_name: Some(format!("node{pwn}")),
            error: format!("error{pwn}"),
            pending_reason: format!("waiting{pwn}"),
            ..failed_task()
        };
        let text = task_text(&task);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text}");
        for field in ["name", "ref", "node", "error", "waiting"] {
            assert!(text.contains(&format!("{field}\\u{{1b}}]0;pwn")), "{text}");
        }
        assert!(text.contains(r"echo $'\x1b]0;pwn\x07'"), "{text}");
    }

    #[test]
    fn a_multi_line_error_keeps_its_lines_in_the_detail() {
        let task = Task {
            error: "ValueError: bad\x1b[2J input\n\nTraceback (most recent call last):\n\
                    \tFile \"h.py\", line 3\n"
                .into(),
            ..failed_task()
        };
        let text = task_text(&task);
        let pad = " ".repeat(15);
        let expected = format!(
            "error:         ValueError: bad\\u{{1b}}[2J input\n\n\
             {pad}Traceback (most recent call last):\n{pad}\tFile \"h.py\", line 3\n"
        );
        assert!(text.contains(&expected), "{text}");
        // One line where one line is the form.
        let table = tasks_table(&[task], SystemTime::UNIX_EPOCH);
        assert_eq!(table.lines().count(), 2, "{table}");
    }

    #[test]
    fn an_argument_with_control_characters_is_shown_ansi_c_quoted() {
        let argv = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shell_words(&argv(&["sh", "-c", "set -e\ncurl x"])),
            r"sh -c $'set -e\ncurl x'"
        );
        assert_eq!(
            shell_words(&argv(&["printf", "it's\t\\\r\x1b[0m\u{85}é"])),
            r"printf $'it\'s\t\\\r\x1b[0m\u0085é'"
        );
        // Shown, though a shell would cut the argument at the NUL.
        assert_eq!(shell_words(&argv(&["echo", "a\0b"])), r"echo $'a\x00b'");
        assert_eq!(
            shell_words(&argv(&["echo", "a b", "", "x=1", "it's", "é"])),
            r"echo 'a b' '' x=1 'it'\''s' 'é'"
        );
    }

    #[test]
    fn a_time_past_the_year_9999_is_shown_not_a_panic() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(rfc3339(far), "300000000000s after the Unix epoch");
    }
}
