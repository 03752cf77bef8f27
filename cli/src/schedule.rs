//! `weft schedule create|list|pause|resume|delete`: cron schedules that
//! submit a task at set times (the coordinator fires them; see the README's
//! "Cron schedules"). Thin: call the [`Client`], print the answer.

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use weft_client::{Client, TaskSpec};
use weft_proto::convert::{rfc3339, system_time};
use weft_proto::pb;

use crate::exit::{self, UsageError};
use crate::opts::TaskOpts;
use crate::output::{OutputFormat, printable, table};
use crate::task::read_input;

/// What a fire does while the previous fire's task is not final.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Overlap {
    /// The fire is recorded as skipped; nothing is submitted.
    Skip,
    /// Submitted anyway: the tasks run side by side or queue.
    Queue,
    /// The previous fire's task is cancelled and this one submitted (with a
    /// full queue the fire is skipped and a running task goes on).
    CancelRunning,
}

/// Which fire times missed while the coordinator was down fire when it is back.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CatchUp {
    /// None: the next fire is the first after the restart.
    None,
    /// The latest missed one only.
    One,
    /// Every missed one, oldest first (at most 1,000: the latest).
    All,
}

/// `weft schedule ...`.
// Parsed once per process: the size of `Create` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create a schedule: `weft schedule create NAME --cron "*/5 * * * *" -- CMD ARGS...`
    /// (or `--call HANDLER [INPUT]`). Needs scope submit.
    ///
    /// Each fire submits the task as a job of its own, exactly once per
    /// fire time, across coordinator restarts. The task's name is
    /// NAME@FIRE_TIME (its --name, or the schedule's, then the fire time in
    /// RFC 3339, UTC); an exec task gets WEFT_SCHEDULE and WEFT_FIRE_TIME
    /// in its environment.
    Create {
        /// The schedule's name: 1-128 characters of A-Z a-z 0-9 _ . : -
        #[arg(value_name = "NAME")]
        schedule: String,
        /// Cron expression: five fields (minute hour day-of-month month
        /// day-of-week), or six with seconds first ("*/10 * * * * *").
        #[arg(long, value_name = "EXPR")]
        cron: String,
        /// IANA time zone the expression is read in (e.g. Europe/Paris).
        #[arg(long = "tz", default_value = "UTC", value_name = "ZONE")]
        time_zone: String,
        /// What a fire does while the previous fire's task is not final.
        #[arg(long, value_enum, default_value_t = Overlap::Skip)]
        overlap: Overlap,
        /// After the coordinator was down: which missed fire times fire.
        #[arg(long, value_enum, default_value_t = CatchUp::One)]
        catch_up: CatchUp,
        /// Task settings (as `weft submit`; --secret-env is refused: a
        /// schedule's spec is readable by `weft schedule list`; the trace,
        /// --traceparent or TRACEPARENT, is not kept: each fire starts its own).
        #[command(flatten)]
        opts: TaskOpts,
        /// Each fire calls this handler; the argument after it is its input (`-`: stdin).
        #[arg(long, value_name = "HANDLER")]
        call: Option<String>,
        /// The command and its arguments, or the call's input with `--call`.
        #[arg(
            trailing_var_arg = true,
            allow_negative_numbers = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// List the schedules: next and last fire, last task, fires and skips. Needs scope read.
    List,
    /// Pause a schedule: it does not fire until resumed. Needs scope submit.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resume a paused schedule: it fires next at the first fire time from
    /// now (what passed while paused is not caught up). Needs scope submit.
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Delete a schedule; the tasks it fired are kept. Needs scope submit.
    Delete {
        /// The schedule's name.
        name: String,
    },
}

/// Runs one `weft schedule` command.
pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: ScheduleCommand,
) -> anyhow::Result<u8> {
    match command {
        ScheduleCommand::Create {
            schedule: name,
            cron,
            time_zone,
            overlap,
            catch_up,
            opts,
            call,
            command,
        } => {
            if !opts.secret_env.is_empty() {
                return Err(UsageError(
                    "--secret-env is not allowed in a schedule: its spec is shown by `weft schedule list`".into(),
                )
                .into());
            }
            let task = match call {
                Some(handler) => {
                    if command.len() > 1 {
                        return Err(UsageError(format!(
                            "`schedule create --call {handler}` takes one INPUT argument, got {}",
                            command.len()
                        ))
                        .into());
                    }
                    TaskSpec::call(handler, read_input(command.into_iter().next()).await?)
                }
                None if command.is_empty() => {
                    return Err(UsageError(
                        "nothing to schedule: give `-- CMD ARGS...` or `--call HANDLER [INPUT]`"
                            .into(),
                    )
                    .into());
                }
                None => TaskSpec::exec(command),
            };
            let mut task = opts.apply(task)?;
            // The shell's TRACEPARENT is this command's trace, not every
            // fire's for months: each fire starts a trace of its own.
            task.trace = None;
            let spec = pb::ScheduleSpec {
                name,
                cron,
                time_zone: match time_zone.as_str() {
                    "UTC" => String::new(),
                    _ => time_zone,
                },
                task: Some(task.into()),
                overlap: match overlap {
                    Overlap::Skip => pb::OverlapPolicy::Skip,
                    Overlap::Queue => pb::OverlapPolicy::Queue,
                    Overlap::CancelRunning => pb::OverlapPolicy::CancelRunning,
                }
                .into(),
                catch_up: match catch_up {
                    CatchUp::None => pb::CatchUp::None,
                    CatchUp::One => pb::CatchUp::One,
                    CatchUp::All => pb::CatchUp::All,
                }
                .into(),
            };
            let schedule = client.create_schedule(spec).await?;
            print_one(format, &schedule, "created");
        }
        ScheduleCommand::List => {
            let schedules = client.list_schedules().await?;
            match format {
                OutputFormat::Text if schedules.is_empty() => eprintln!("weft: no schedules"),
                OutputFormat::Text => println!("{}", schedules_table(&schedules)),
                OutputFormat::Json => {
                    let all: Vec<Value> = schedules.iter().map(schedule_json).collect();
                    println!("{}", Value::from(all));
                }
            }
        }
        ScheduleCommand::Pause { name } => {
            let schedule = client.pause_schedule(&name, true).await?;
            print_one(format, &schedule, "paused");
        }
        ScheduleCommand::Resume { name } => {
            let schedule = client.pause_schedule(&name, false).await?;
            print_one(format, &schedule, "resumed");
        }
        ScheduleCommand::Delete { name } => {
            client.delete_schedule(&name).await?;
            match format {
                OutputFormat::Text => println!("schedule {name} deleted"),
                OutputFormat::Json => println!("{}", json!({ "name": name, "deleted": true })),
            }
        }
    }
    Ok(exit::SUCCESS)
}

fn print_one(format: OutputFormat, schedule: &pb::Schedule, what: &str) {
    match format {
        OutputFormat::Text => {
            let name = schedule.spec.as_ref().map_or("", |s| s.name.as_str());
            let next = time_cell(schedule.next_fire.as_ref());
            println!("schedule {} {what}; next fire: {next}", printable(name));
        }
        OutputFormat::Json => println!("{}", schedule_json(schedule)),
    }
}

fn time_text(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| rfc3339(system_time(t), false))
}

fn time_cell(t: Option<&prost_types::Timestamp>) -> String {
    time_text(t).unwrap_or_else(|| "-".into())
}

fn overlap_text(value: i32) -> &'static str {
    match pb::OverlapPolicy::try_from(value) {
        Ok(pb::OverlapPolicy::Queue) => "queue",
        Ok(pb::OverlapPolicy::CancelRunning) => "cancel-running",
        _ => "skip",
    }
}

fn catch_up_text(value: i32) -> &'static str {
    match pb::CatchUp::try_from(value) {
        Ok(pb::CatchUp::None) => "none",
        Ok(pb::CatchUp::All) => "all",
        _ => "one",
    }
}

/// One schedule as `-o json` prints it.
pub fn schedule_json(schedule: &pb::Schedule) -> Value {
    let spec = schedule.spec.clone().unwrap_or_default();
    let task = spec
        .task
        .and_then(|t| TaskSpec::try_from(t).ok())
        .map(|t| match &t.kind {
            weft_proto::TaskKind::Exec(exec) => json!({ "argv": exec.argv, "name": t.name }),
            weft_proto::TaskKind::Call(call) => json!({ "handler": call.handler, "name": t.name }),
        });
    json!({
        "name": spec.name,
        "cron": spec.cron,
        "time_zone": if spec.time_zone.is_empty() { "UTC".to_owned() } else { spec.time_zone },
        "overlap": overlap_text(spec.overlap),
        "catch_up": catch_up_text(spec.catch_up),
        "task": task,
        "paused": schedule.paused,
        "created_at": time_text(schedule.created_at.as_ref()),
        "next_fire": time_text(schedule.next_fire.as_ref()),
        "last_fire": time_text(schedule.last_fire.as_ref()),
        "last_task_id": (!schedule.last_task_id.is_empty()).then_some(&schedule.last_task_id),
        "fired": schedule.fired,
        "skipped": schedule.skipped,
    })
}

/// The `weft schedule list` table.
pub fn schedules_table(schedules: &[pb::Schedule]) -> String {
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            vec![
                spec.name,
                spec.cron,
                if spec.time_zone.is_empty() {
                    "UTC".into()
                } else {
                    spec.time_zone
                },
                time_cell(s.next_fire.as_ref()),
                time_cell(s.last_fire.as_ref()),
                if s.last_task_id.is_empty() {
                    "-".into()
                } else {
                    s.last_task_id.clone()
                },
                s.fired.to_string(),
                s.skipped.to_string(),
                if s.paused { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "CRON",
            "TZ",
            "NEXT FIRE",
            "LAST FIRE",
            "LAST TASK",
            "FIRED",
            "SKIPPED",
            "PAUSED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fire_time_past_the_year_9999_is_shown_not_a_panic() {
        let far = prost_types::Timestamp {
            seconds: 300_000_000_000,
            nanos: 0,
        };
        assert_eq!(time_cell(Some(&far)), "300000000000s after the Unix epoch");
        assert_eq!(time_cell(None), "-");
    }
}
