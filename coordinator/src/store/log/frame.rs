//! The log's bytes: frames, one per commit, and the records inside them.
//!
//! ```text
//! segment := frame*
//! frame   := len u32 | crc u32 | seq u64 | payload
//!            crc: CRC32C of the store id (u64; 0 in a segment's header
//!            frame), seq and payload
//! payload := record*
//! record  := kind u8 | len u32 (of data) | crc u32 (CRC32C of kind and data) | data
//! data    := key body
//! ```
//! Integers are little-endian. Frames are numbered (`seq`) one after
//! another across segments. The frame's checksum finds a torn commit at
//! the end of the log (recovery cuts it off); its number and the store id
//! in its checksum tell a frame of this log written later from bytes that
//! only look like one (a task's input holding a copy of a segment), so
//! damage is told from a torn tail; each record's own checksum is
//! checked when the record is read alone (`Get`, `Watch` history), so a
//! changed byte is damage, never served. A record's bytes do not depend on
//! where they are, so compaction copies records verbatim.
//!
//! Keys by kind: a task id (16 bytes) for tasks, specs, secrets, expiries
//! and node identities; a task id and a seq (8 bytes) for events; a name (u16 length
//! and UTF-8) for tokens, schedules and limits; none for a segment header.
//! A task record's body starts with its head (state, last change, attempt,
//! outcome: [`TaskHead`]), so recovery indexes it without decoding the rest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_proto::{Attempt, Outcome, TaskState};

use super::super::record::TaskRecord;

/// Bytes before a frame's payload.
pub(super) const FRAME_HEADER: usize = 16;
/// Bytes before a record's data.
pub(super) const RECORD_HEADER: usize = 9;

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
    /// The first record of each segment: format, store id, segment number.
    Header = 0,
    /// A task's record (its latest one wins).
    Task = 1,
    /// One event of a task.
    Event = 2,
    /// A task's secret environment.
    Secrets = 3,
    /// A task's secret environment is gone (the task is final).
    ForgetSecrets = 4,
    /// A task and everything of it is gone (retention).
    Expired = 5,
    /// A cron schedule.
    Schedule = 6,
    /// A cron schedule is deleted.
    DeleteSchedule = 7,
    /// A named limit, keyed "kind/name".
    Limit = 8,
    /// A named limit is deleted.
    DeleteLimit = 9,
    /// A token record.
    Token = 10,
    /// A node identity.
    Node = 11,
    /// A task's spec, written once with its first record (a spec never
    /// changes; the task record, written at every change, leaves it out).
    Spec = 12,
}

impl Kind {
    /// The highest kind there is.
    pub(super) const LAST: Kind = Kind::Spec;
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            0 => Kind::Header,
            1 => Kind::Task,
            2 => Kind::Event,
            3 => Kind::Secrets,
            4 => Kind::ForgetSecrets,
            5 => Kind::Expired,
            6 => Kind::Schedule,
            7 => Kind::DeleteSchedule,
            8 => Kind::Limit,
            9 => Kind::DeleteLimit,
            10 => Kind::Token,
            11 => Kind::Node,
            12 => Kind::Spec,
            _ => return None,
        })
    }

    /// The kind's name, as damage is reported.
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Header => "segment header",
            Kind::Task => "tasks",
            Kind::Event => "events",
            Kind::Secrets | Kind::ForgetSecrets => "secrets",
            Kind::Expired => "expiries",
            Kind::Schedule | Kind::DeleteSchedule => "schedules",
            Kind::Limit | Kind::DeleteLimit => "limits",
            Kind::Token => "tokens",
            Kind::Node => "node_identities",
            Kind::Spec => "specs",
        }
    }
}

/// A record's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Key<'a> {
    /// A segment header's.
    None,
    /// A task or node id.
    Id(u128),
    /// A task id and an event seq.
    Event(u128, u64),
    /// A token id, schedule name or "kind/name" of a limit.
    Name(&'a str),
}

impl Key<'_> {
    fn for_kind(kind: Kind) -> KeyShape {
        match kind {
            Kind::Header => KeyShape::None,
            Kind::Task
            | Kind::Spec
            | Kind::Secrets
            | Kind::ForgetSecrets
            | Kind::Expired
            | Kind::Node => KeyShape::Id,
            Kind::Event => KeyShape::Event,
            Kind::Schedule
            | Kind::DeleteSchedule
            | Kind::Limit
            | Kind::DeleteLimit
            | Kind::Token => KeyShape::Name,
        }
    }

    /// The key as damage names it: ids as ULIDs, as the CLI shows them.
    pub(super) fn describe(self) -> String {
        match self {
            Key::None => String::new(),
            Key::Id(id) => ulid::Ulid(id).to_string(),
            Key::Event(id, seq) => format!("{} event {seq}", ulid::Ulid(id)),
            Key::Name(name) => format!("{name:?}"),
        }
    }
}

enum KeyShape {
    None,
    Id,
    Event,
    Name,
}

/// One record read out of a frame.
#[derive(Clone, Copy, Debug)]
pub(super) struct Raw<'a> {
    pub kind: Kind,
    pub key: Key<'a>,
    pub body: &'a [u8],
    /// The whole record, header included (what compaction copies).
    pub bytes: &'a [u8],
}

/// Appends a record to `buf`; returns its offset in `buf` and its length.
pub(super) fn put(buf: &mut Vec<u8>, kind: Kind, key: Key<'_>, body: &[&[u8]]) -> (usize, u32) {
    put_with(buf, kind, key, |buf| {
        for part in body {
            buf.extend_from_slice(part);
        }
    })
}

/// [`put`] with a body `write` appends to `buf` itself, so an encoder
/// writes it in place instead of into a vector of its own to be copied.
pub(super) fn put_with(
    buf: &mut Vec<u8>,
    kind: Kind,
    key: Key<'_>,
    write: impl FnOnce(&mut Vec<u8>),
) -> (usize, u32) {
    let start = buf.len();
    buf.push(kind as u8);
    buf.extend_from_slice(&[0; 8]);
    let data = buf.len();
    match key {
        Key::None => {}
        Key::Id(id) => buf.extend_from_slice(&id.to_le_bytes()),
        Key::Event(id, seq) => {
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
        }
        Key::Name(name) => {
            // Names are bounded far below 64 KiB by the services (256
            // bytes at most); a longer one is a bug of the caller. Cut at a
            // char boundary rather than corrupting the frame, it could
            // overwrite another name sharing its first 64 KiB.
            debug_assert!(
                name.len() <= usize::from(u16::MAX),
                "a record's name of {} bytes, over 64 KiB",
                name.len()
            );
            let mut end = name.len().min(usize::from(u16::MAX));
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            let len = u16::try_from(end).unwrap_or(u16::MAX);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&name.as_bytes()[..end]);
        }
    }
    write(buf);
    let len = u32::try_from(buf.len() - data).unwrap_or(u32::MAX);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind as u8]), &buf[data..]);
    buf[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
    buf[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    let total = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    (start, total)
}

/// The record at the start of `bytes`, and its length; `check` verifies
/// its checksum (recovery checked the whole frame's already).
pub(super) fn record(bytes: &[u8], check: bool) -> Result<(Raw<'_>, usize), &'static str> {
    let header = bytes
        .get(..RECORD_HEADER)
        .ok_or("a record cut short in its header")?;
    let kind = Kind::from_u8(header[0]).ok_or("a record of an unknown kind")?;
    let len = u32::from_le_bytes(header[1..5].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(header[5..9].try_into().unwrap_or_default());
    let end = RECORD_HEADER
        .checked_add(len)
        .ok_or("a record longer than its frame")?;
    let data = bytes
        .get(RECORD_HEADER..end)
        .ok_or("a record longer than its frame")?;
    if check && crc32c::crc32c_append(crc32c::crc32c(&[header[0]]), data) != crc {
        return Err("checksum mismatch");
    }
    let (key, body) = match Key::for_kind(kind) {
        KeyShape::None => (Key::None, data),
        KeyShape::Id => {
            let id = data.get(..16).ok_or("a record shorter than its key")?;
            (
                Key::Id(u128::from_le_bytes(id.try_into().unwrap_or_default())),
                &data[16..],
            )
        }
        KeyShape::Event => {
            let key = data.get(..24).ok_or("a record shorter than its key")?;
            (
                Key::Event(
                    u128::from_le_bytes(key[..16].try_into().unwrap_or_default()),
                    u64::from_le_bytes(key[16..].try_into().unwrap_or_default()),
                ),
                &data[24..],
            )
        }
        KeyShape::Name => {
            let len = data.get(..2).ok_or("a record shorter than its key")?;
            let len = usize::from(u16::from_le_bytes(len.try_into().unwrap_or_default()));
            let name = data
                .get(2..2 + len)
                .ok_or("a record shorter than its key")?;
            let name = std::str::from_utf8(name).map_err(|_| "a name that is not UTF-8")?;
            (Key::Name(name), &data[2 + len..])
        }
    };
    Ok((
        Raw {
            kind,
            key,
            body,
            bytes: &bytes[..end],
        },
        end,
    ))
}

/// The records of a frame's payload, in order.
pub(super) fn records(
    mut payload: &[u8],
) -> impl Iterator<Item = Result<(usize, Raw<'_>), &'static str>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if payload.is_empty() {
            return None;
        }
        match record(payload, false) {
            Ok((raw, len)) => {
                let this = at;
                at += len;
                payload = &payload[len..];
                Some(Ok((this, raw)))
            }
            Err(err) => {
                payload = &[];
                Some(Err(err))
            }
        }
    })
}

/// Fills in the header of the frame that `buf` holds (its first
/// [`FRAME_HEADER`] bytes were reserved): frame number `seq` of the log
/// of store `salt` (0 for a segment's header frame).
pub(super) fn seal_frame(buf: &mut [u8], salt: u64, seq: u64) {
    let len = u32::try_from(buf.len() - FRAME_HEADER).unwrap_or(u32::MAX);
    let crc = frame_crc(salt, seq, &buf[FRAME_HEADER..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// A frame's checksum.
pub(super) fn frame_crc(salt: u64, seq: u64, payload: &[u8]) -> u32 {
    let head = crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), &seq.to_le_bytes());
    crc32c::crc32c_append(head, payload)
}

/// A frame's header: its payload's length, checksum and number.
pub(super) fn frame_header(header: &[u8]) -> (usize, u32, u64) {
    let word = |from: usize, to: usize| header.get(from..to).unwrap_or_default();
    let len = u32::from_le_bytes(word(0, 4).try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(word(4, 8).try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(word(8, 16).try_into().unwrap_or_default());
    (len, crc, seq)
}

/// A segment header's body: magic, format version, store id, segment number.
pub(super) const MAGIC: &[u8; 8] = b"weft-log";
/// The format this code writes; a newer one is refused.
pub(super) const FORMAT: u32 = 1;

/// A segment header's body.
pub(super) fn header_body(store_id: u64, segment: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&FORMAT.to_le_bytes());
    body.extend_from_slice(&store_id.to_le_bytes());
    body.extend_from_slice(&segment.to_le_bytes());
    body
}

/// A segment header's (format, store id, segment number).
pub(super) fn parse_header(body: &[u8]) -> Option<(u32, u64, u32)> {
    if body.len() < 24 || &body[..8] != MAGIC {
        return None;
    }
    Some((
        u32::from_le_bytes(body[8..12].try_into().ok()?),
        u64::from_le_bytes(body[12..20].try_into().ok()?),
        u32::from_le_bytes(body[20..24].try_into().ok()?),
    ))
}

/// What recovery reads of a task record without decoding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TaskHead {
    /// The state's wire number.
    pub state: u8,
    /// Its last change, in ms since the epoch.
    pub updated_ms: u64,
    /// Its latest attempt.
    pub attempt: u32,
    /// How that attempt ended (the outcome's wire number; 0: none).
    pub outcome: u8,
}

/// Bytes of a [`TaskHead`].
pub(super) const TASK_HEAD: usize = 14;

impl TaskHead {
    /// No head yet: recovery met a task's events or spec before its record.
    pub(super) const NONE: TaskHead = TaskHead {
        state: 0,
        updated_ms: 0,
        attempt: 0,
        outcome: 0,
    };

    pub(super) fn of(record: &TaskRecord) -> TaskHead {
        TaskHead {
            state: state_number(record.state),
            updated_ms: millis(record.updated_at),
            attempt: record.attempt.0,
            outcome: record
                .last_outcome
                .map_or(0, |o| u8::try_from(i32::from(o)).unwrap_or(0)),
        }
    }

    pub(super) fn bytes(self) -> [u8; TASK_HEAD] {
        let mut out = [0; TASK_HEAD];
        out[0] = self.state;
        out[1..9].copy_from_slice(&self.updated_ms.to_le_bytes());
        out[9..13].copy_from_slice(&self.attempt.to_le_bytes());
        out[13] = self.outcome;
        out
    }

    pub(super) fn parse(body: &[u8]) -> Option<TaskHead> {
        let head = body.get(..TASK_HEAD)?;
        Some(TaskHead {
            state: head[0],
            updated_ms: u64::from_le_bytes(head[1..9].try_into().ok()?),
            attempt: u32::from_le_bytes(head[9..13].try_into().ok()?),
            outcome: head[13],
        })
    }

    pub(super) fn task_state(self) -> Option<TaskState> {
        TaskState::try_from(i32::from(self.state)).ok()
    }

    pub(super) fn is_final(self) -> bool {
        self.task_state().is_some_and(TaskState::is_final)
    }

    pub(super) fn attempt(self) -> Attempt {
        Attempt(self.attempt)
    }

    pub(super) fn last_outcome(self) -> Option<Outcome> {
        match self.outcome {
            0 => None,
            n => Outcome::try_from(i32::from(n)).ok(),
        }
    }
}

/// A state's wire number, as the index keys it.
pub(super) fn state_number(state: TaskState) -> u8 {
    u8::try_from(i32::from(state)).unwrap_or(u8::MAX)
}

/// Milliseconds since the epoch.
pub(super) fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The time `ms` after the epoch.
#[allow(dead_code)]
pub(super) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
