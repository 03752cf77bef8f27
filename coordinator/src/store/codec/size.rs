//! A task's wire size, estimated without encoding it: what a `List`
//! page's byte budget ([`ListQuery::budget`](crate::store::ListQuery::budget))
//! counts as the scan reads records. No encoding and no allocation here:
//! only lengths are added up.

use weft_proto::{Dependency, TaskKind, TaskSpec};

use crate::store::record::{AttemptRecord, TaskRecord};

/// Room for a string or bytes field's tag and length prefix (a length of
/// up to 2 MiB takes 3 bytes; 10 covers any).
const FIELD: usize = 10;
/// Room for a task's fixed fields: its id, job id and node id (26
/// characters each), state, attempt, exit code, two times, counters,
/// `next_seq` and last outcome, with their tags.
const TASK_FIXED: usize = 200;
/// Room for an attempt's fixed fields: its number, node id, three times,
/// outcome and exit code, with their tags and its own length prefix.
const ATTEMPT_FIXED: usize = 100;
/// Room for a spec's fixed fields: slots, timeouts, retries, trace ids,
/// priority, weights, rule, times and flags, with their tags.
const SPEC_FIXED: usize = 128;

/// About how many bytes `record` takes as the wire shows it (`pb::Task`
/// with its spec, as a field of a `ListResponse`): every variable-length
/// part (output, error, the spec's input or argv, env and stdin, labels,
/// names, attempts' reasons) in full, plus generous room for tags, ids,
/// times and numbers. At or a little over the exact size; the pending
/// reason and `waiting_for`, filled after the store read, are not counted.
pub(crate) fn task_wire_bytes(record: &TaskRecord) -> usize {
    TASK_FIXED
        + text(record.output.len())
        + text(record.error.len())
        + text(record.node_name.as_deref().map_or(0, str::len))
        + record.attempts.iter().map(attempt_bytes).sum::<usize>()
        + FIELD
        + spec_bytes(&record.spec)
}

fn attempt_bytes(attempt: &AttemptRecord) -> usize {
    ATTEMPT_FIXED + text(attempt.node_name.len()) + text(attempt.reason.len())
}

/// The spec as the wire shows it: without its secrets (a record never
/// holds them).
fn spec_bytes(spec: &TaskSpec) -> usize {
    let kind = match &spec.kind {
        TaskKind::Call(call) => text(call.handler.len()) + text(call.input.len()),
        TaskKind::Exec(exec) => {
            exec.argv.iter().map(|arg| text(arg.len())).sum::<usize>()
                + exec
                    .env
                    .iter()
                    .map(|(k, v)| entry(k.len(), v.len()))
                    .sum::<usize>()
                + exec.cwd.as_ref().map_or(0, |cwd| text(cwd.len()))
                + text(exec.stdin.len())
        }
    };
    let labels: usize = spec
        .labels
        .iter()
        .map(|(k, v)| entry(k.len(), v.len()))
        .sum();
    let resources: usize = spec.resources.keys().map(|k| entry(k.len(), 10)).sum();
    let after: usize = spec
        .after
        .iter()
        .map(|dep| match dep {
            Dependency::Task(_) => text(26),
            Dependency::Ref(name) => text(name.len()),
        })
        .sum();
    let limits: usize = spec
        .rate_limits
        .iter()
        .map(|r| text(r.name.len()) + 8)
        .sum();
    SPEC_FIXED
        + kind
        + FIELD
        + labels
        + resources
        + after
        + limits
        + spec
            .concurrency
            .as_ref()
            .map_or(0, |c| text(c.key.len()) + 8)
        + spec.trace.as_ref().map_or(0, |t| text(t.state.len()))
        + text(spec.name.len())
        + text(spec.fair_key.len())
        + text(spec.ref_name.len())
}

/// A string or bytes field of `len` bytes.
fn text(len: usize) -> usize {
    FIELD + len
}

/// A map entry: its own prefix, and its key and value fields.
fn entry(key: usize, value: usize) -> usize {
    FIELD + text(key) + text(value)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use weft_proto::policy::{DependencyRule, OverLimit};
    use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskState, TraceContext};

    use super::*;
    use crate::store::codec::task_to_pb;

    fn encoded(record: &TaskRecord) -> usize {
        prost::encoding::message::encoded_len(1, &task_to_pb(record))
    }

    #[test]
    fn the_estimate_is_at_or_a_little_over_the_encoded_size() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let node = NodeId::new();
        let attempt = AttemptRecord {
            number: Attempt(1),
            node_id: node,
            node_name: Arc::from("node-with-a-longer-name"),
            assigned_at: at,
            started_at: Some(at),
            ended_at: Some(at),
            outcome: Some(Outcome::Failed),
            exit_code: Some(1),
            reason: "exited with code 1".into(),
        };
        let specs = [
            TaskSpec::call("noop", ""),
            TaskSpec::call("resize", vec![7u8; 300_000])
                .name("resize")
                .label("zone", "a"),
            TaskSpec::exec(["sh", "-c", "echo hi"])
                .env("A", "b")
                .label("gpu", "1")
                .label("team", "imaging"),
            // Every fixed field set.
            TaskSpec::exec(["true"])
                .cwd("/tmp")
                .stdin("in")
                .timeout(Duration::from_secs(3600))
                .schedule_timeout(Duration::from_secs(60))
                .max_attempts(5)
                .trace(TraceContext::new([1; 16], [2; 8]))
                .priority(9)
                .fair_key("tenant-1", 3)
                .concurrency("user-42", 4, OverLimit::default())
                .rate_limit("api", 2)
                .resource("gpu", 2)
                .after(TaskId::new())
                .after_rule(DependencyRule::AnyFailed)
                .not_before(at)
                .ref_name("step-1")
                .fail_if_infeasible(),
        ];
        let outputs = [Bytes::new(), Bytes::from(vec![1u8; 2 << 20])];
        for spec in specs {
            for output in outputs.clone() {
                let record = TaskRecord {
                    attempt: Attempt(1),
                    node_id: Some(node),
                    node_name: Some(Arc::clone(&attempt.node_name)),
                    exit_code: Some(1),
                    output,
                    error: "exited with code 1".into(),
                    job_id: Some(TaskId::new()),
                    attempts: vec![attempt.clone(); 3],
                    ..TaskRecord::for_test(
                        TaskId::new(),
                        Arc::new(spec.clone()),
                        TaskState::Failed,
                        at,
                    )
                };
                let (estimate, exact) = (task_wire_bytes(&record), encoded(&record));
                assert!(
                    exact <= estimate && estimate <= exact + 1024,
                    "estimate {estimate}, encoded {exact}"
                );
            }
        }
    }
}
