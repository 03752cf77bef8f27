//! The dashboard's JSON: the API's protobuf answers (`pb::Task`,
//! `pb::NodeInfo`, `pb::TaskEvent`) as the objects of the HTTP contract
//! (README "Dashboard", its routes table). Only encoding here:
//! what a reader may see was decided by the gRPC service that answered
//! (a task's `secret_env` never leaves it).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use weft_proto::convert::system_time;
use weft_proto::pb;

/// Most bytes of a call task's output put in its JSON (the rest is cut,
/// saying so): the page shows a result, not a download.
const MAX_OUTPUT_BYTES: usize = 64 << 10;

/// A protobuf timestamp as RFC 3339 (UTC, milliseconds); `null` if unset.
pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => Value::String(rfc3339(system_time(t))),
        None => Value::Null,
    }
}

/// A wall-clock time as RFC 3339 (UTC, milliseconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    weft_proto::convert::rfc3339(t, true)
}

/// A task state's name in the contract (`queued`, `running`, ...).
pub(crate) fn state_name(value: i32) -> &'static str {
    match pb::TaskState::try_from(value) {
        Ok(pb::TaskState::Queued) => "queued",
        Ok(pb::TaskState::Assigned) => "assigned",
        Ok(pb::TaskState::Running) => "running",
        Ok(pb::TaskState::Succeeded) => "succeeded",
        Ok(pb::TaskState::Failed) => "failed",
        Ok(pb::TaskState::Cancelled) => "cancelled",
        Ok(pb::TaskState::TimedOut) => "timed_out",
        Ok(pb::TaskState::Pending) => "pending",
        Ok(pb::TaskState::UpstreamFailed) => "upstream_failed",
        Ok(pb::TaskState::Skipped) => "skipped",
        Ok(pb::TaskState::Unspecified) | Err(_) => "unknown",
    }
}

/// The task state a contract name stands for (`None`: not a state).
pub(crate) fn state_from_name(name: &str) -> Option<pb::TaskState> {
    [
        pb::TaskState::Queued,
        pb::TaskState::Assigned,
        pb::TaskState::Running,
        pb::TaskState::Succeeded,
        pb::TaskState::Failed,
        pb::TaskState::Cancelled,
        pb::TaskState::TimedOut,
        pb::TaskState::Pending,
        pb::TaskState::UpstreamFailed,
        pb::TaskState::Skipped,
    ]
    .into_iter()
    .find(|state| state_name(i32::from(*state)) == name)
}

fn outcome_name(value: i32) -> &'static str {
    match pb::Outcome::try_from(value) {
        Ok(pb::Outcome::Succeeded) => "succeeded",
        Ok(pb::Outcome::Failed) => "failed",
        Ok(pb::Outcome::Cancelled) => "cancelled",
        Ok(pb::Outcome::TimedOut) => "timed_out",
        Ok(pb::Outcome::StartFailed) => "start_failed",
        Ok(pb::Outcome::Unspecified) | Err(_) => "",
    }
}

fn string_map(map: &BTreeMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// UTF-8 text of `bytes`, invalid sequences replaced, at most `max` bytes
/// of it (cut at a character boundary).
fn lossy(bytes: &[u8], max: usize) -> (String, bool) {
    let cut = bytes.len() > max;
    let mut kept = &bytes[..bytes.len().min(max)];
    if cut {
        kept = &kept[..kept.len() - incomplete_tail(kept)];
    }
    (String::from_utf8_lossy(kept).into_owned(), cut)
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that is not
/// complete yet (0 to 3): what a split between two pieces of output leaves.
pub(crate) fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: its lead is further back
        }
        let needs = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII, or not a lead byte: nothing to wait for
        };
        return if back < needs { back } else { 0 };
    }
    0
}

/// A task as the contract's Task object.
pub(crate) fn task(task: &pb::Task) -> Value {
    let mut out = json!({
        "id": task.id,
        "state": state_name(task.state),
        "attempt": task.attempt,
        "node_id": task.node_id,
        "node_name": task.node_name,
        "exit_code": task.exit_code,
        "error": task.error,
        "pending_reason": task.pending_reason,
        "created_at": time(task.created_at.as_ref()),
        "updated_at": time(task.updated_at.as_ref()),
        "failures": task.failures,
        "node_losses": task.node_losses,
        "next_seq": task.next_seq,
        "last_outcome": outcome_name(task.last_outcome),
        "attempts": task.attempts.iter().map(attempt).collect::<Vec<_>>(),
        // A job's first task has its own id as job id.
        "job_id": if task.job_id.is_empty() { task.id.clone() } else { task.job_id.clone() },
        "waiting_for": task.waiting_for,
    });
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    if !task.output.is_empty() {
        let (text, cut) = lossy(&task.output, MAX_OUTPUT_BYTES);
        obj.insert("output".into(), Value::String(text));
        obj.insert("output_truncated".into(), Value::Bool(cut));
    }
    let Some(spec) = &task.spec else {
        obj.insert("name".into(), Value::String(String::new()));
        obj.insert("labels".into(), json!({}));
        obj.insert("env".into(), json!({}));
        return out;
    };
    obj.insert("name".into(), Value::String(spec.name.clone()));
    obj.insert("labels".into(), string_map(&spec.labels));
    obj.insert("slots".into(), json!(spec.slots.max(1)));
    obj.insert(
        "timeout_seconds".into(),
        spec.timeout
            .as_ref()
            .map(|d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9))
            .unwrap_or(Value::Null),
    );
    obj.insert(
        "max_attempts".into(),
        json!(if spec.max_attempts == 0 {
            3
        } else {
            spec.max_attempts
        }),
    );
    policy(obj, spec);
    match &spec.kind {
        Some(pb::task_spec::Kind::Exec(exec)) => {
            obj.insert("kind".into(), json!("exec"));
            obj.insert("command".into(), json!(exec.argv));
            obj.insert("env".into(), string_map(&exec.env));
            obj.insert("cwd".into(), json!(exec.cwd));
        }
        Some(pb::task_spec::Kind::Call(call)) => {
            obj.insert("kind".into(), json!("call"));
            obj.insert("handler".into(), json!(call.handler));
            obj.insert("env".into(), json!({}));
        }
        None => {
            obj.insert("kind".into(), json!(""));
            obj.insert("env".into(), json!({}));
        }
    }
    out
}

/// The workflow and policy fields of a spec: its ref, what it runs after
/// and by which rule, its start time, priority, fair key, concurrency key,
/// rate limits and resources (the defaults spelled out: priority 5, fair
/// weight 1, concurrency on_limit "queue").
fn policy(obj: &mut Map<String, Value>, spec: &pb::TaskSpec) {
    let rule = match pb::DependencyRule::try_from(spec.after_rule) {
        Ok(pb::DependencyRule::AllFinished) => "all_finished",
        Ok(pb::DependencyRule::AnyFailed) => "any_failed",
        Ok(pb::DependencyRule::AnySucceeded) => "any_succeeded",
        Ok(pb::DependencyRule::AllSucceeded | pb::DependencyRule::Unspecified) | Err(_) => {
            "all_succeeded"
        }
    };
    // Stored with ids only: a ref is resolved at Submit.
    let after: Vec<&str> = spec
        .after
        .iter()
        .map(|d| {
            if d.task_id.is_empty() {
                d.r#ref.as_str()
            } else {
                d.task_id.as_str()
            }
        })
        .collect();
    let concurrency = spec.concurrency.as_ref().map_or(Value::Null, |c| {
        let on_limit = match pb::OverLimit::try_from(c.on_limit) {
            Ok(pb::OverLimit::CancelNewest) => "cancel_newest",
            Ok(pb::OverLimit::CancelOldest) => "cancel_oldest",
            Ok(pb::OverLimit::Queue | pb::OverLimit::Unspecified) | Err(_) => "queue",
        };
        json!({ "key": c.key, "max_running": c.max_running, "on_limit": on_limit })
    });
    obj.insert("ref".into(), json!(spec.r#ref));
    obj.insert("after".into(), json!(after));
    obj.insert("after_rule".into(), json!(rule));
    obj.insert("not_before".into(), time(spec.not_before.as_ref()));
    obj.insert(
        "priority".into(),
        json!(if spec.priority == 0 { 5 } else { spec.priority }),
    );
    obj.insert("fair_key".into(), json!(spec.fair_key));
    obj.insert("fair_weight".into(), json!(spec.fair_weight.max(1)));
    obj.insert("concurrency".into(), concurrency);
    obj.insert(
        "rate_limits".into(),
        json!(
            spec.rate_limits
                .iter()
                .map(|r| json!({ "name": r.name, "units": r.units.max(1) }))
                .collect::<Vec<_>>()
        ),
    );
    obj.insert("resources".into(), number_map(&spec.resources));
    obj.insert("fail_if_infeasible".into(), json!(spec.fail_if_infeasible));
}

/// Name → amount, in name order.
fn number_map(map: &BTreeMap<String, u64>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// A limit and how it stands (`ListLimits`), as the contract's Limit object.
pub(crate) fn limit(info: &pb::LimitInfo) -> Value {
    let limit = info.limit.clone().unwrap_or_default();
    let (kind, rate, max_running) = match &limit.kind {
        Some(pb::limit::Kind::Rate(rate)) => (
            "rate",
            json!({
                "units": rate.units,
                "period_seconds": rate.period.as_ref().map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9),
                "burst": rate.burst,
            }),
            Value::Null,
        ),
        Some(pb::limit::Kind::MaxRunning(max)) => ("concurrency", Value::Null, json!(max)),
        None => ("", Value::Null, Value::Null),
    };
    json!({
        "name": limit.name,
        "kind": kind,
        "rate": rate,
        "max_running": max_running,
        "available": info.available,
        "running": info.running,
        "waiting": info.waiting,
    })
}

/// One cron schedule and how it stands.
pub(crate) fn schedule(schedule: &pb::Schedule) -> Value {
    let spec = schedule.spec.clone().unwrap_or_default();
    let overlap = match pb::OverlapPolicy::try_from(spec.overlap) {
        Ok(pb::OverlapPolicy::Queue) => "queue",
        Ok(pb::OverlapPolicy::CancelRunning) => "cancel_running",
        Ok(pb::OverlapPolicy::Skip | pb::OverlapPolicy::Unspecified) | Err(_) => "skip",
    };
    let catch_up = match pb::CatchUp::try_from(spec.catch_up) {
        Ok(pb::CatchUp::None) => "none",
        Ok(pb::CatchUp::All) => "all",
        Ok(pb::CatchUp::One | pb::CatchUp::Unspecified) | Err(_) => "one",
    };
    json!({
        "name": spec.name,
        "cron": spec.cron,
        "time_zone": spec.time_zone,
        "overlap": overlap,
        "catch_up": catch_up,
        "paused": schedule.paused,
        "created_at": time(schedule.created_at.as_ref()),
        "next_fire": time(schedule.next_fire.as_ref()),
        "last_fire": time(schedule.last_fire.as_ref()),
        "last_task_id": schedule.last_task_id,
        "fired": schedule.fired,
        "skipped": schedule.skipped,
    })
}

/// One entry of a task's attempt history.
fn attempt(attempt: &pb::Attempt) -> Value {
    json!({
        "number": attempt.number,
        "node_id": attempt.node_id,
        "node_name": attempt.node_name,
        "assigned_at": time(attempt.assigned_at.as_ref()),
        "started_at": time(attempt.started_at.as_ref()),
        "ended_at": time(attempt.ended_at.as_ref()),
        "outcome": outcome_name(attempt.outcome),
        "exit_code": attempt.exit_code,
        "reason": attempt.reason,
    })
}

/// A node's state name in the contract.
fn node_state(value: i32) -> &'static str {
    match pb::NodeState::try_from(value) {
        Ok(pb::NodeState::Ready) => "connected",
        Ok(pb::NodeState::Draining) => "draining",
        Ok(pb::NodeState::Unspecified) | Err(_) => "unknown",
    }
}

/// A node as the contract's Node object.
pub(crate) fn node(node: &pb::NodeInfo) -> Value {
    let mut handlers = node.handlers.clone();
    handlers.sort();
    json!({
        "id": node.node_id,
        "name": node.name,
        "state": node_state(node.state),
        "slots": node.slots,
        "slots_used": node.slots_used,
        "slots_free": node.slots_free,
        "labels": string_map(&node.labels),
        "handlers": handlers,
        "heartbeat_age_seconds": node
            .last_heartbeat_age
            .as_ref()
            .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9),
        "running": node.running.len(),
        "finished": node.finished,
        "resources": number_map(&node.resources),
        "resources_free": number_map(&node.resources_free),
    })
}

/// One task event as an SSE event's name and data.
/// An output event's JSON, its bytes given as `text`.
pub(crate) fn output_event(event: &pb::TaskEvent, output: &pb::TaskOutput, text: String) -> Value {
    json!({
        "stream": if output.stream == i32::from(pb::OutputStream::Stderr) { "stderr" } else { "stdout" },
        "text": text,
        "attempt": event.attempt,
        "time": time(event.time.as_ref()),
    })
}

pub(crate) fn event(event: &pb::TaskEvent) -> (&'static str, Value) {
    let time = time(event.time.as_ref());
    match &event.body {
        Some(pb::task_event::Body::State(state)) => (
            "state",
            json!({
                "state": state_name(state.state),
                "node_id": state.node_id,
                "node_name": state.node_name,
                "reason": state.reason,
                "attempt": event.attempt,
                "time": time,
            }),
        ),
        Some(pb::task_event::Body::Output(output)) => (
            "output",
            output_event(
                event,
                output,
                String::from_utf8_lossy(&output.data).into_owned(),
            ),
        ),
        Some(pb::task_event::Body::Progress(progress)) => (
            "progress",
            json!({
                "fraction": progress.fraction,
                "message": progress.message,
                "attempt": event.attempt,
                "time": time,
            }),
        ),
        Some(pb::task_event::Body::Finished(done)) => ("finished", json!({ "task": task(done) })),
        None => ("unknown", json!({ "time": time })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_cut_at_its_limit_is_cut_between_characters() {
        assert_eq!(lossy("€€".as_bytes(), 4), ("€".to_owned(), true));
        assert_eq!(lossy("€€".as_bytes(), 6), ("€€".to_owned(), false));
        assert_eq!(lossy(b"abc", 2), ("ab".to_owned(), true));
        assert_eq!(
            incomplete_tail(&[0xFF, 0xFF]),
            0,
            "not UTF-8: nothing to wait for"
        );
    }

    #[test]
    fn every_state_name_reads_back() {
        for value in 1..=weft_proto::TASK_STATES as i32 {
            let name = state_name(value);
            assert_eq!(state_from_name(name).map(i32::from), Some(value), "{name}");
        }
        assert_eq!(state_from_name("nope"), None);
    }

    #[test]
    fn a_task_shows_its_spec_but_never_a_secret() {
        let mut spec = pb::TaskSpec::from(weft_proto::TaskSpec::exec(["echo", "hi"]));
        spec.secret_env.insert("API_KEY".into(), "hunter2".into());
        let task = pb::Task {
            id: "t1".into(),
            spec: Some(spec),
            state: i32::from(pb::TaskState::Running),
            ..Default::default()
        };
        let value = task_json(&task);
        assert_eq!(value["kind"], "exec");
        assert_eq!(value["command"], json!(["echo", "hi"]));
        assert_eq!(value["state"], "running");
        assert!(!value.to_string().contains("hunter2"));
    }

    #[test]
    fn a_task_shows_its_job_dependencies_and_policy() {
        let spec = weft_proto::TaskSpec::call("noop", "")
            .priority(8)
            .fair_key("team-a", 3)
            .concurrency("user-42", 2, weft_proto::OverLimit::CancelOldest)
            .rate_limit("api", 2)
            .resource("gpu", 1)
            .ref_name("train")
            .after(weft_proto::TaskId::new())
            .after_rule(weft_proto::DependencyRule::AnyFailed);
        let task = pb::Task {
            id: "t2".into(),
            job_id: "t1".into(),
            waiting_for: vec!["t0".into()],
            spec: Some(spec.into()),
            state: i32::from(pb::TaskState::Pending),
            ..Default::default()
        };
        let value = task_json(&task);
        assert_eq!(value["state"], "pending");
        assert_eq!(value["job_id"], "t1");
        assert_eq!(value["waiting_for"], json!(["t0"]));
        assert_eq!(value["ref"], "train");
        assert_eq!(value["after"].as_array().map(Vec::len), Some(1));
        assert_eq!(value["after_rule"], "any_failed");
        assert_eq!(value["priority"], 8);
        assert_eq!(
            (value["fair_key"].clone(), value["fair_weight"].clone()),
            (json!("team-a"), json!(3))
        );
        assert_eq!(
            value["concurrency"],
            json!({"key": "user-42", "max_running": 2, "on_limit": "cancel_oldest"})
        );
        assert_eq!(value["rate_limits"], json!([{"name": "api", "units": 2}]));
        assert_eq!(value["resources"], json!({"gpu": 1}));
        // A job's first task is its own job.
        let first = task_json(&pb::Task {
            id: "t1".into(),
            ..Default::default()
        });
        assert_eq!(first["job_id"], "t1");
    }

    fn task_json(t: &pb::Task) -> Value {
        task(t)
    }
}
