//! The task commands: `run`, `call`, `submit`, `watch`, `wait`, `get`,
//! `list`, `cancel`. Each builds a request from its flags, calls the
//! [`Client`], and prints the result with [`output`](crate::output).

use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;
use tokio::io::AsyncReadExt;

use weft_client::{Client, ListFilter, Task, TaskSpec};
use weft_proto::TaskId;

use crate::args::ListArgs;
use crate::exit::{self, UsageError};
use crate::opts::TaskOpts;
use crate::output::{OutputFormat, printable, task_json, task_text, tasks_table};
use crate::stream::{
    CLI_RESUME_WINDOW, Events, Printer, Seen, drive, follow_to_end, run_to_end, write_stdout,
};

/// `weft run -- CMD ARGS...`.
pub async fn run(
    client: &Client,
    format: OutputFormat,
    opts: &TaskOpts,
    command: Vec<String>,
) -> anyhow::Result<u8> {
    let spec = opts.apply(TaskSpec::exec(command))?;
    let mut printer = Printer::new(format, false, true);
    run_to_end(client, spec, &mut printer).await
}

/// `weft call HANDLER [INPUT]`.
pub async fn call(
    client: &Client,
    format: OutputFormat,
    opts: &TaskOpts,
    handler: String,
    input: Option<String>,
) -> anyhow::Result<u8> {
    let input = read_input(input).await?;
    let spec = opts.apply(TaskSpec::call(handler, input))?;
    let mut printer = Printer::new(format, false, true);
    run_to_end(client, spec, &mut printer).await
}

/// `weft submit -- CMD ARGS...` or `weft submit --call HANDLER [INPUT]`.
pub async fn submit(
    client: &Client,
    format: OutputFormat,
    opts: &TaskOpts,
    deps: &crate::job::DepOpts,
    call: Option<String>,
    command: Vec<String>,
) -> anyhow::Result<u8> {
    let spec = match call {
        Some(handler) => {
            if command.len() > 1 {
                return Err(UsageError(format!(
                    "`submit --call {handler}` takes one INPUT argument, got {}",
                    command.len()
                ))
                .into());
            }
            TaskSpec::call(handler, read_input(command.into_iter().next()).await?)
        }
        None if command.is_empty() => {
            return Err(UsageError(
                "nothing to submit: give `-- CMD ARGS...` or `--call HANDLER [INPUT]`".into(),
            )
            .into());
        }
        None => TaskSpec::exec(command),
    };
    let spec = deps.apply(opts.apply(spec)?)?;
    let id = client.submit(spec).await?;
    match format {
        OutputFormat::Text => println!("{id}"),
        OutputFormat::Json => println!("{}", json!({ "id": id.to_string() })),
    }
    Ok(exit::SUCCESS)
}

/// `weft get ID`.
pub async fn get(client: &Client, format: OutputFormat, id: TaskId) -> anyhow::Result<u8> {
    let task = client.get(id).await?;
    print_task(format, &task);
    Ok(exit::SUCCESS)
}

/// `weft watch ID [--from-seq N]`.
pub async fn watch(
    client: &Client,
    format: OutputFormat,
    id: TaskId,
    from_seq: u64,
) -> anyhow::Result<u8> {
    let stream = Events::Followed(client.follow(id, from_seq, CLI_RESUME_WINDOW));
    let mut printer = Printer::new(format, true, false);
    follow_to_end(
        client,
        stream,
        Seen::resuming(id, from_seq),
        &mut printer,
        false,
    )
    .await
}

/// `weft wait ID`: prints the final task, exits with its code.
pub async fn wait(client: &Client, format: OutputFormat, id: TaskId) -> anyhow::Result<u8> {
    let stream = Events::Followed(client.follow(id, 0, CLI_RESUME_WINDOW));
    let mut seen = Default::default();
    let task = drive(client, stream, &mut seen, &mut |_| {}).await?;
    print_task(format, &task);
    Ok(exit::for_task(&task))
}

/// `weft cancel ID`: cancels the task and answers it as it ends. A queued
/// task is cancelled at once; a running one ends when its node has
/// stopped it, which `cancel` waits for up to [`CANCEL_SETTLE`]. If it has
/// not ended by then (or the token may not read it), the answer says the
/// cancel was requested and the node is stopping it (JSON:
/// `"cancel_requested": true` on the task as recorded).
pub async fn cancel(client: &Client, format: OutputFormat, id: TaskId) -> anyhow::Result<u8> {
    let mut task = client
        .cancel(id)
        .await
        .with_context(|| format!("cancelling task {id}"))?;
    if !task.state.is_final() {
        let rest = Events::Followed(client.follow(id, task.next_seq, CANCEL_SETTLE));
        let mut seen = Default::default();
        let mut ignore = |_: &weft_client::TaskEvent| {};
        let settle = drive(client, rest, &mut seen, &mut ignore);
        if let Ok(Ok(done)) = tokio::time::timeout(CANCEL_SETTLE, settle).await {
            task = done;
        }
    }
    let requested = !task.state.is_final();
    match format {
        OutputFormat::Text if requested => println!("{}", cancel_requested_text(&task)),
        OutputFormat::Text => println!("task {id} {}", task.state),
        OutputFormat::Json => {
            let mut json = task_json(&task);
            json["cancel_requested"] = requested.into();
            println!("{json}");
        }
    }
    Ok(exit::SUCCESS)
}

/// What `weft cancel` says of a task still stopping: its node's name
/// [`printable`] (a node names itself).
fn cancel_requested_text(task: &Task) -> String {
    format!(
        "task {}: cancel requested; {} is stopping it (still {})",
        task.id,
        task.node_name
            .as_deref()
            .map(|n| format!("node {}", printable(n)))
            .unwrap_or_else(|| "its node".to_owned()),
        task.state
    )
}

/// How long `weft cancel` waits for a running task's node to stop it.
const CANCEL_SETTLE: Duration = Duration::from_secs(5);

/// `weft list [--state S] [--label K=V]... [--name TEXT] [--node N]
/// [--since T] [--until T] [--limit N]`.
pub async fn list(client: &Client, format: OutputFormat, args: ListArgs) -> anyhow::Result<u8> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && until < since
    {
        return Err(UsageError("--until is before --since".into()).into());
    }
    let mut labels = std::collections::BTreeMap::new();
    for (key, value) in args.labels {
        if let Some(other) = labels.insert(key.clone(), value.clone())
            && other != value
        {
            return Err(UsageError(format!(
                "--label {key}={other} and --label {key}={value}: a task has one value per label, so none would match"
            ))
            .into());
        }
    }
    let filter = ListFilter {
        state: args.state,
        labels,
        name: args.name.unwrap_or_default(),
        node: args.node.unwrap_or_default(),
        since: args.since,
        until: args.until,
        job: args.job,
    };
    let tasks = client.list_filtered(&filter, args.limit).await?;
    match format {
        OutputFormat::Text => println!("{}", tasks_table(&tasks, SystemTime::now())),
        OutputFormat::Json => {
            let all: Vec<_> = tasks.iter().map(task_json).collect();
            println!("{}", serde_json::Value::from(all));
        }
    }
    Ok(exit::SUCCESS)
}

fn print_task(format: OutputFormat, task: &weft_client::Task) {
    let text = match format {
        OutputFormat::Text => task_text(task),
        OutputFormat::Json => task_json(task).to_string(),
    };
    // One write, nothing after it: a reader gone (`| head`) loses nothing.
    let _ = write_stdout(format!("{text}\n").as_bytes());
}

/// A call's input: the argument's bytes, stdin for `-`, empty for none.
pub(crate) async fn read_input(input: Option<String>) -> anyhow::Result<Bytes> {
    match input.as_deref() {
        None => Ok(Bytes::new()),
        Some("-") => {
            let mut buf = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut buf)
                .await
                .context("reading the input from stdin")?;
            Ok(buf.into())
        }
        Some(text) => Ok(Bytes::from(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::TaskState;

    use super::*;

    #[test]
    fn the_node_stopping_a_cancelled_task_is_named_escaped() {
        let task = Task {
            node_name: Some("n\x1b]0;pwn\x07".into()),
            ..crate::testing::task(TaskState::Running)
        };
        let text = cancel_requested_text(&task);
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains("node n\\u{1b}]0;pwn\\u{7} is stopping it (still running)"),
            "{text}"
        );
    }
}
