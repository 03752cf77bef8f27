//! The ids of a task's trace and spans, derived from the task id alone.
//!
//! A coordinator that restarts must name the same spans again: the Assign
//! it sends after the restart parents the worker's spans on the attempt's
//! span, and the root span, exported when the task ends, must be the one
//! its earlier spans named as their parent. Deriving the ids (rather than
//! drawing and storing them) makes that hold with nothing written per task,
//! so a million queued tasks stay as small as without tracing.
//!
//! The mix is SplitMix64's finalizer, written out here so the ids never
//! change with a library or compiler version (an upgrade between an Assign
//! and the attempt's end must not orphan the worker's spans).

use weft_proto::{Attempt, TaskId};

/// Which of a task's spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpanOf {
    /// The task's root span: submitted until final.
    Task,
    /// Request received until the commit acknowledged.
    Submit,
    /// The store commit that made the submit durable.
    Commit,
    /// Waiting in the queue before this attempt was assigned.
    Queued(Attempt),
    /// The attempt: assigned until it ended.
    Attempt(Attempt),
    /// The task's result being recorded.
    Result,
}

impl SpanOf {
    fn tag(self) -> u64 {
        match self {
            SpanOf::Task => 1,
            SpanOf::Submit => 2,
            SpanOf::Commit => 3,
            SpanOf::Result => 4,
            SpanOf::Queued(n) => (5 << 32) | u64::from(n.0),
            SpanOf::Attempt(n) => (6 << 32) | u64::from(n.0),
        }
    }
}

/// The trace of a task that no client trace context came with.
pub(crate) fn trace_id(task: TaskId) -> [u8; 16] {
    let id = task.as_u128();
    let hi = mix(id as u64 ^ 0x7765_6674_7472_6163); // "weftrac"
    let lo = mix((id >> 64) as u64 ^ hi);
    let mut out = [0; 16];
    out[..8].copy_from_slice(&nonzero(hi).to_be_bytes());
    out[8..].copy_from_slice(&lo.to_be_bytes());
    out
}

/// The id of one of a task's spans.
pub(crate) fn span_id(task: TaskId, of: SpanOf) -> [u8; 8] {
    let id = task.as_u128();
    let h = mix(mix(id as u64) ^ mix((id >> 64) as u64 ^ of.tag()));
    nonzero(h).to_be_bytes()
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// W3C ids are never all zeros.
fn nonzero(v: u64) -> u64 {
    if v == 0 { 1 } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct_per_task_and_span() {
        let task = TaskId::from_u128(0x0192_3456_789a_bcde_f012_3456_789a_bcde);
        // Pinned: a change would orphan the spans of tasks in flight.
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(&span_id(task, SpanOf::Task)), "3cc9e016752febfe");
        assert_eq!(
            hex(&span_id(task, SpanOf::Attempt(Attempt(1)))),
            "7cbe079787a04571"
        );
        assert_eq!(hex(&trace_id(task)), "88765cc35d3f4b2bc9a0d4c87dd0f2e1");
        let kinds = [
            SpanOf::Task,
            SpanOf::Submit,
            SpanOf::Commit,
            SpanOf::Result,
            SpanOf::Queued(Attempt(1)),
            SpanOf::Attempt(Attempt(1)),
            SpanOf::Attempt(Attempt(2)),
        ];
        let ids: std::collections::HashSet<[u8; 8]> =
            kinds.iter().map(|k| span_id(task, *k)).collect();
        assert_eq!(ids.len(), kinds.len());
        let other = TaskId::from_u128(task.as_u128() + 1);
        assert_ne!(trace_id(task), trace_id(other));
        assert_ne!(span_id(task, SpanOf::Task), span_id(other, SpanOf::Task));
        assert_ne!(trace_id(task), [0; 16]);
    }
}
