//! A spec's wire bytes written straight from a borrow: the bytes of
//! `pb::TaskSpec::from(&spec)` (or of the fields a [`SpecFields`] names),
//! without first copying every string, list and map of the spec into a
//! `pb::TaskSpec` only to encode and drop it. The coordinator writes each
//! submitted task's spec this way for its store and each assigned one for
//! its node; a client writes its `Submit`s this way.
//!
//! The bytes are the generated encoder's, field by field in tag order
//! (proto3: a field at its default is not written); the tests hold them
//! equal for specs that set every field.

use prost::encoding::{bool as pbool, btree_map, bytes, int32, message, string, uint32, uint64};

use crate::convert::{duration_to_pb, timestamp};
use crate::pb;
use crate::policy::ConcurrencyLimit;
use crate::spec::{SecretEnv, TaskKind, TaskSpec};

/// Which of a spec's fields go on the wire.
#[derive(Clone, Copy, Debug)]
pub enum SpecFields<'a> {
    /// Every field but `secret_env`: what a store keeps, which never
    /// holds secrets.
    Stored,
    /// Every field, `secret_env` included: what a client submits.
    Submitted,
    /// What an `Assignment` carries (proto/README.md "Assignments"): what
    /// the attempt runs with (the kind, slots, timeout, attempts, name,
    /// resources) and these secrets, the attempt's own; not what only
    /// chose where and when it runs.
    Assigned(Option<&'a SecretEnv>),
}

impl TaskSpec {
    /// Appends this spec's wire bytes (a `pb::TaskSpec`, without a
    /// length prefix) to `buf`, leaving out `secret_env`: what a store
    /// keeps, which never holds secrets.
    pub fn encode_without_secrets(&self, buf: &mut Vec<u8>) {
        self.encode_fields(SpecFields::Stored, buf);
    }

    /// Appends the wire bytes of this spec's `fields` (a `pb::TaskSpec`
    /// without a length prefix) to `buf`.
    pub fn encode_fields(&self, fields: SpecFields<'_>, buf: &mut Vec<u8>) {
        let (all, secrets) = match fields {
            SpecFields::Stored => (true, None),
            SpecFields::Submitted => (true, Some(&self.secret_env)),
            SpecFields::Assigned(secrets) => (false, secrets),
        };
        match &self.kind {
            TaskKind::Call(call) => {
                let len = str_len(1, &call.handler) + bytes_len(2, &call.input);
                prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, buf);
                prost::encoding::encode_varint(len as u64, buf);
                if !call.handler.is_empty() {
                    string::encode(1, &call.handler, buf);
                }
                if !call.input.is_empty() {
                    bytes::encode(2, &call.input, buf);
                }
            }
            TaskKind::Exec(exec) => {
                let cwd = exec.cwd.as_deref().unwrap_or_default();
                let len = string::encoded_len_repeated(1, &exec.argv)
                    + btree_map::encoded_len(
                        string::encoded_len,
                        string::encoded_len,
                        2,
                        &exec.env,
                    )
                    + str_len(3, cwd)
                    + bytes_len(4, &exec.stdin);
                prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, buf);
                prost::encoding::encode_varint(len as u64, buf);
                string::encode_repeated(1, &exec.argv, buf);
                string_map(2, &exec.env, buf);
                if !cwd.is_empty() {
                    crate::wire::put_message(3, cwd.as_bytes(), buf);
                }
                if !exec.stdin.is_empty() {
                    bytes::encode(4, &exec.stdin, buf);
                }
            }
        }
        if self.slots != 0 {
            uint32::encode(3, &self.slots, buf);
        }
        if all {
            string_map(4, &self.labels, buf);
        }
        if let Some(timeout) = self.timeout {
            message::encode(5, &duration_to_pb(timeout), buf);
        }
        if self.max_attempts != 0 {
            uint32::encode(6, &self.max_attempts, buf);
        }
        if !self.name.is_empty() {
            string::encode(7, &self.name, buf);
        }
        if let Some(secrets) = secrets {
            string_map(8, secrets.map(), buf);
        }
        if all {
            self.encode_placement(buf);
        } else {
            resources(&self.resources, buf);
        }
    }

    /// Fields 9 to 21 but `resources` (16) among them: what decides where
    /// and when the task runs.
    fn encode_placement(&self, buf: &mut Vec<u8>) {
        if let Some(timeout) = self.schedule_timeout {
            message::encode(9, &duration_to_pb(timeout), buf);
        }
        if let Some(trace) = &self.trace {
            message::encode(10, &trace.to_pb(), buf);
        }
        let priority = u32::from(self.priority);
        if priority != 0 {
            uint32::encode(11, &priority, buf);
        }
        if !self.fair_key.is_empty() {
            string::encode(12, &self.fair_key, buf);
        }
        if self.fair_weight != 0 {
            uint32::encode(13, &self.fair_weight, buf);
        }
        if let Some(limit) = &self.concurrency {
            encode_concurrency(14, limit, buf);
        }
        for used in &self.rate_limits {
            let len = str_len(1, &used.name) + uint32_len(2, used.units);
            prost::encoding::encode_key(15, prost::encoding::WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(len as u64, buf);
            if !used.name.is_empty() {
                string::encode(1, &used.name, buf);
            }
            if used.units != 0 {
                uint32::encode(2, &used.units, buf);
            }
        }
        resources(&self.resources, buf);
        for dependency in &self.after {
            message::encode(17, &pb::Dependency::from(dependency), buf);
        }
        let rule = i32::from(self.after_rule);
        if rule != 0 {
            int32::encode(18, &rule, buf);
        }
        if let Some(at) = self.not_before {
            message::encode(19, &timestamp(at), buf);
        }
        if !self.ref_name.is_empty() {
            string::encode(20, &self.ref_name, buf);
        }
        if self.fail_if_infeasible {
            pbool::encode(21, &true, buf);
        }
    }

    /// [`encode_without_secrets`](Self::encode_without_secrets) into a
    /// new vector with `spare` bytes of room left after it.
    pub fn to_bytes_without_secrets(&self, spare: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.size_hint() + spare);
        self.encode_without_secrets(&mut buf);
        buf
    }

    /// About how many bytes the spec encodes to (for a buffer's capacity):
    /// its strings, input and maps, plus room for tags and numbers.
    fn size_hint(&self) -> usize {
        let kind = match &self.kind {
            TaskKind::Call(call) => call.handler.len() + call.input.len(),
            TaskKind::Exec(exec) => {
                exec.argv.iter().map(String::len).sum::<usize>()
                    + exec
                        .env
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
                    + exec.stdin.len()
            }
        };
        let maps: usize = self
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
            + self.resources.keys().map(|k| k.len() + 16).sum::<usize>();
        kind + maps + self.name.len() + self.fair_key.len() + self.ref_name.len() + 96
    }
}

/// A `map<string, string>` field.
fn string_map(tag: u32, map: &std::collections::BTreeMap<String, String>, buf: &mut Vec<u8>) {
    btree_map::encode(
        string::encode,
        string::encoded_len,
        string::encode,
        string::encoded_len,
        tag,
        map,
        buf,
    );
}

/// The `resources` field (16).
fn resources(resources: &std::collections::BTreeMap<String, u64>, buf: &mut Vec<u8>) {
    btree_map::encode(
        string::encode,
        string::encoded_len,
        uint64::encode,
        uint64::encoded_len,
        16,
        resources,
        buf,
    );
}

fn encode_concurrency(tag: u32, limit: &ConcurrencyLimit, buf: &mut Vec<u8>) {
    let on_limit = i32::from(limit.on_limit);
    let len = str_len(1, &limit.key)
        + uint32_len(2, limit.max_running)
        + if on_limit != 0 {
            int32::encoded_len(3, &on_limit)
        } else {
            0
        };
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(len as u64, buf);
    if !limit.key.is_empty() {
        string::encode(1, &limit.key, buf);
    }
    if limit.max_running != 0 {
        uint32::encode(2, &limit.max_running, buf);
    }
    if on_limit != 0 {
        int32::encode(3, &on_limit, buf);
    }
}

/// A proto3 string field's length (nothing when empty).
fn str_len(tag: u32, value: &str) -> usize {
    crate::wire::str_field_len(tag, value.as_bytes())
}

/// A proto3 bytes field's length (nothing when empty).
fn bytes_len(tag: u32, value: &::bytes::Bytes) -> usize {
    crate::wire::str_field_len(tag, value)
}

/// A proto3 uint32 field's length (nothing when zero).
fn uint32_len(tag: u32, value: u32) -> usize {
    match value {
        0 => 0,
        _ => uint32::encoded_len(tag, &value),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use prost::Message;

    use super::*;
    use crate::ids::TaskId;
    use crate::policy::{DependencyRule, OverLimit};

    /// The generated encoder's bytes for `spec` without secrets: what
    /// [`TaskSpec::encode_without_secrets`] must write.
    fn generated(spec: &TaskSpec) -> Vec<u8> {
        let mut wire = pb::TaskSpec::from(spec);
        wire.secret_env.clear();
        wire.encode_to_vec()
    }

    fn ours(spec: &TaskSpec) -> Vec<u8> {
        spec.to_bytes_without_secrets(0)
    }

    /// A spec that sets every field, an exec spec, and plain ones.
    fn every_kind() -> Vec<TaskSpec> {
        let mut every = TaskSpec::call("resize", "input bytes")
            .slots(3)
            .label("gpu", "1")
            .label("zone", "eu")
            .timeout(Duration::from_millis(1_500))
            .max_attempts(7)
            .name("a name")
            .secret_env("API_KEY", "s3cr3t")
            .schedule_timeout(Duration::from_secs(30))
            .priority(9)
            .fair_key("team-a", 4)
            .concurrency("user-42", 2, OverLimit::CancelOldest)
            .rate_limit("api", 3)
            .rate_limit("db", 1)
            .resource("cpu", 2)
            .resource("mem", 1 << 34)
            .after(TaskId::new())
            .after_rule(DependencyRule::AllFinished)
            .not_before(UNIX_EPOCH + Duration::new(1_900_000_000, 5))
            .ref_name("step-1")
            .fail_if_infeasible();
        every.trace = Some(crate::trace::TraceContext {
            state: "vendor=1".into(),
            ..crate::trace::TraceContext::new([7; 16], [9; 8])
        });
        let exec = TaskSpec::exec(["sh", "-c", "echo $X"])
            .env("X", "1")
            .cwd("/tmp")
            .stdin("in")
            .concurrency("k", 0, OverLimit::Queue);
        vec![
            TaskSpec::call("noop", ""),
            TaskSpec::call("noop", "7").priority(1),
            TaskSpec::exec(["true"]),
            // Empty arguments and values are written.
            TaskSpec::exec(["x", "", ""]).env("EMPTY", ""),
            exec,
            every,
        ]
    }

    #[test]
    fn a_spec_encodes_to_the_generated_bytes_without_its_secrets() {
        for spec in &every_kind() {
            assert_eq!(ours(spec), generated(spec), "{spec:?}");
            let back = TaskSpec::try_from(pb::TaskSpec::decode(&ours(spec)[..]).unwrap()).unwrap();
            let mut expected = spec.clone();
            expected.secret_env = crate::spec::SecretEnv::new();
            assert_eq!(back, expected);
        }
    }

    #[test]
    fn a_submitted_spec_encodes_to_the_generated_bytes_secrets_and_all() {
        for spec in &every_kind() {
            let mut ours = Vec::new();
            spec.encode_fields(SpecFields::Submitted, &mut ours);
            assert_eq!(ours, pb::TaskSpec::from(spec).encode_to_vec(), "{spec:?}");
            let back = TaskSpec::try_from(pb::TaskSpec::decode(&ours[..]).unwrap()).unwrap();
            assert_eq!(&back, spec);
        }
    }

    #[test]
    fn an_assigned_spec_carries_what_runs_the_attempt_and_the_secrets_given() {
        let mut secrets = crate::spec::SecretEnv::new();
        secrets.insert("TOKEN", "t0k3n");
        for spec in &every_kind() {
            for given in [None, Some(&secrets)] {
                let mut ours = Vec::new();
                spec.encode_fields(SpecFields::Assigned(given), &mut ours);
                let expected = pb::TaskSpec {
                    kind: Some(pb::task_spec::Kind::from(&spec.kind)),
                    slots: spec.slots,
                    timeout: spec.timeout.map(duration_to_pb),
                    max_attempts: spec.max_attempts,
                    name: spec.name.clone(),
                    secret_env: given.map(SecretEnv::to_pb).unwrap_or_default(),
                    resources: (*spec.resources).clone(),
                    ..pb::TaskSpec::default()
                };
                assert_eq!(ours, expected.encode_to_vec(), "{spec:?}");
            }
        }
    }

    #[test]
    fn the_bytes_are_appended_after_what_the_buffer_holds() {
        let spec = TaskSpec::call("noop", "x").fair_key("team-b", 2);
        let mut buf = b"head".to_vec();
        spec.encode_without_secrets(&mut buf);
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &generated(&spec)[..]);
    }
}
