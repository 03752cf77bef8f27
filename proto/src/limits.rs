//! The limits every part of Weft agrees on: how large a gRPC message may
//! be, and what a submitted spec's fields may hold.
//!
//! Two kinds of limit live here. Message sizes: the coordinator's
//! `--max-message-size` (default [`DEFAULT_MAX_MESSAGE_BYTES`], at most
//! [`MAX_MESSAGE_BYTES_CEILING`]) bounds every message it takes and every
//! message it sends a node; nodes and workers decode up to the ceiling, so
//! any coordinator setting fits them, and clients decode up to
//! [`CLIENT_MAX_MESSAGE_BYTES`] (one task's answer holds its spec and its
//! output, each up to the limit). Field limits: [`SpecLimits::check`] is
//! what a coordinator accepts at `Submit`, on top of the structural checks
//! of `TryFrom<pb::TaskSpec>` (which every reader of a spec runs, stored
//! ones included, so it stays as lenient as the store's oldest record).
//!
//! Plain functions and constants: no I/O here.

use std::collections::BTreeMap;

use prost::Message;

use crate::convert::ConversionError;
use crate::pb;

/// Default of the coordinator's `--max-message-size`: the largest gRPC
/// message it decodes (a `Submit`, a node's event batch) and sends a node
/// (an `Assign`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The smallest `--max-message-size` a coordinator accepts: room for a
/// node's event batch ([`MAX_EVENT_BATCH_PAYLOAD`]) and its texts.
pub const MIN_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Payload bytes (output, texts) after which a node sends its event batch:
/// half the smallest message limit, so a full batch with its per-event
/// overhead always fits. One event larger than that goes alone.
pub const MAX_EVENT_BATCH_PAYLOAD: usize = MIN_MAX_MESSAGE_BYTES / 2;

/// Largest output chunk a node sends in one event; a handler's bigger
/// chunk is sent as several.
pub const MAX_OUTPUT_CHUNK: usize = 32 * 1024;

/// The limit a node keeps to when the coordinator's `Registered` does not
/// say (one from before `Registered.max_message_size`): gRPC's default.
pub const LEGACY_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest `--max-message-size` a coordinator accepts, and what nodes
/// and workers decode from it: so a node accepts whatever a coordinator
/// may send.
pub const MAX_MESSAGE_BYTES_CEILING: usize = 64 * 1024 * 1024;

/// What clients decode: one task's answer (`Get`, `Watch`'s `finished`,
/// `WaitMany`) holds its spec and its output, each up to the ceiling.
pub const CLIENT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Room kept in a message for everything around one spec (an `Assign`'s
/// envelope, the assignment's task id and attempt) or one event (a
/// `TaskEvents` envelope, the event's task id and attempt).
pub const ENVELOPE_RESERVE: usize = 1024;

/// Most bytes kept of a text a node reports (a `Finished.error`, a
/// `Progress.message`); longer ones are stored cut, ending in
/// [`TRUNCATED_MARKER`].
pub const MAX_NODE_TEXT_BYTES: usize = 64 * 1024;

/// Ends a text cut to [`MAX_NODE_TEXT_BYTES`].
pub const TRUNCATED_MARKER: &str = "... [truncated]";

/// Longest `call.handler`, in bytes.
pub const MAX_HANDLER_BYTES: usize = 256;
/// Longest task `name`, in bytes.
pub const MAX_TASK_NAME_BYTES: usize = 1024;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 256;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Most labels one spec may require.
pub const MAX_LABELS: usize = 64;
/// Longest `exec.cwd`, in bytes (Linux's `PATH_MAX`).
pub const MAX_CWD_BYTES: usize = 4096;
/// Longest environment variable name (`exec.env`, `secret_env`), in bytes.
pub const MAX_ENV_NAME_BYTES: usize = 256;
/// Most entries of `exec.env`, and of `secret_env`.
pub const MAX_ENV_ENTRIES: usize = 1024;
/// Most entries of `exec.argv`.
pub const MAX_ARGV_ENTRIES: usize = 4096;

/// Longest reason a client gives a `Cancel` or a `CancelJob`, in bytes:
/// it is kept in the record and the final event of every task it cancels
/// (a job's may be many), and sent to their nodes.
pub const MAX_CANCEL_REASON_BYTES: usize = 1024;

/// Checks a `Cancel`'s or `CancelJob`'s `reason`: at most
/// [`MAX_CANCEL_REASON_BYTES`].
pub fn check_cancel_reason(reason: &str) -> Result<(), ConversionError> {
    if reason.len() > MAX_CANCEL_REASON_BYTES {
        return Err(ConversionError::Invalid {
            field: "reason",
            reason: format!("{} bytes; at most {MAX_CANCEL_REASON_BYTES}", reason.len()),
        });
    }
    Ok(())
}

/// Longest node name in a `Register`, in bytes (a joined node's name
/// follows the stricter rule of `Join`; this bounds one under `--no-auth`).
pub const MAX_NODE_NAME_BYTES: usize = 128;
/// Most handlers one node may list in its `Register`.
pub const MAX_NODE_HANDLERS: usize = 4096;

/// Most recently finished results a node keeps to send again after a
/// reconnect; it lists each of them in `Register.running`.
pub const MAX_NODE_RESULTS_KEPT: usize = 10_000;

/// Most entries of a node's `Register.running` that a coordinator with
/// `--max-node-slots` `max_node_slots` takes: twice what a node may hold
/// assigned at once (its slots and a prefetch capped at that limit: the
/// attempts it runs, and as many ended whose results were not sent yet)
/// and the finished results it keeps to send again
/// ([`MAX_NODE_RESULTS_KEPT`]). A node refused here stops, so the bound
/// is loose: it only keeps a peer from listing without end.
pub fn max_register_running(max_node_slots: u32) -> usize {
    usize::try_from(max_node_slots)
        .unwrap_or(usize::MAX)
        .saturating_mul(4)
        .saturating_add(MAX_NODE_RESULTS_KEPT)
}

/// Checks a `Register`'s `running`: at most
/// [`max_register_running`]`(max_node_slots)` entries.
pub fn check_register_running(
    register: &pb::Register,
    max_node_slots: u32,
) -> Result<(), ConversionError> {
    count(
        "running",
        register.running.len(),
        max_register_running(max_node_slots),
    )
}

/// Checks what a node's `Register` declares and the coordinator keeps
/// (its name is written into the record of every task it runs): the name,
/// labels and handler names within their limits and without NUL.
pub fn check_register(register: &pb::Register) -> Result<(), ConversionError> {
    text("name", &register.name, MAX_NODE_NAME_BYTES)?;
    count("labels", register.labels.len(), MAX_LABELS)?;
    for (key, value) in &register.labels {
        text("labels (key)", key, MAX_LABEL_KEY_BYTES)?;
        text("labels (value)", value, MAX_LABEL_VALUE_BYTES)?;
    }
    count("handlers", register.handlers.len(), MAX_NODE_HANDLERS)?;
    for handler in &register.handlers {
        text("handlers", handler, MAX_HANDLER_BYTES)?;
    }
    Ok(())
}

/// The most bytes one spec may take on the wire so that the `Assign`
/// carrying it fits in a message of `max_message_bytes`.
pub fn max_spec_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_sub(ENVELOPE_RESERVE)
}

/// Cuts `text` to at most [`MAX_NODE_TEXT_BYTES`] (on a character
/// boundary), ending it with [`TRUNCATED_MARKER`] when cut.
pub fn truncate_node_text(text: &mut String) {
    if text.len() <= MAX_NODE_TEXT_BYTES {
        return;
    }
    let mut end = MAX_NODE_TEXT_BYTES - TRUNCATED_MARKER.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(TRUNCATED_MARKER);
}

/// What a coordinator accepts in a submitted spec beyond its structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecLimits {
    /// Most slots a node may declare (`--max-node-slots`): a task asking
    /// for more could never run.
    pub max_slots: u32,
    /// Most bytes the spec may take on the wire ([`max_spec_bytes`] of
    /// `--max-message-size`).
    pub max_spec_bytes: usize,
}

impl SpecLimits {
    /// Checks every field of `spec` against its limit: `Invalid` (naming
    /// the field and the limit) for what no node could run, `TooLarge`
    /// for a spec that would not fit in an `Assign`.
    pub fn check(&self, spec: &pb::TaskSpec) -> Result<(), ConversionError> {
        self.checked_len(spec).map(drop)
    }

    /// [`check`](Self::check), answering the spec's encoded length (what
    /// the size limit was held against), so a caller that needs it does
    /// not walk the spec again.
    pub fn checked_len(&self, spec: &pb::TaskSpec) -> Result<usize, ConversionError> {
        if let Some(kind) = &spec.kind {
            match kind {
                pb::task_spec::Kind::Exec(exec) => {
                    count("exec.argv", exec.argv.len(), MAX_ARGV_ENTRIES)?;
                    if exec.argv.iter().any(|a| a.contains('\0')) {
                        return Err(nul("exec.argv"));
                    }
                    check_env("exec.env", &exec.env)?;
                    text("exec.cwd", &exec.cwd, MAX_CWD_BYTES)?;
                }
                pb::task_spec::Kind::Call(call) => {
                    text("call.handler", &call.handler, MAX_HANDLER_BYTES)?;
                }
            }
        }
        text("name", &spec.name, MAX_TASK_NAME_BYTES)?;
        count("labels", spec.labels.len(), MAX_LABELS)?;
        for (key, value) in &spec.labels {
            text("labels (key)", key, MAX_LABEL_KEY_BYTES)?;
            text("labels (value)", value, MAX_LABEL_VALUE_BYTES)?;
        }
        check_env("secret_env", &spec.secret_env)?;
        if spec.slots > self.max_slots {
            return Err(ConversionError::Invalid {
                field: "slots",
                reason: format!(
                    "{} slots; no node may declare more than {} (--max-node-slots), so it could never run",
                    spec.slots, self.max_slots
                ),
            });
        }
        let size = spec.encoded_len();
        if size > self.max_spec_bytes {
            return Err(ConversionError::TooLarge {
                what: "task spec",
                size,
                limit: self.max_spec_bytes,
            });
        }
        Ok(size)
    }
}

fn check_env(field: &'static str, env: &BTreeMap<String, String>) -> Result<(), ConversionError> {
    count(field, env.len(), MAX_ENV_ENTRIES)?;
    for (name, value) in env {
        if name.len() > MAX_ENV_NAME_BYTES {
            return Err(ConversionError::Invalid {
                field,
                reason: format!(
                    "a name of {} bytes; at most {MAX_ENV_NAME_BYTES}",
                    name.len()
                ),
            });
        }
        if name.contains('\0') || value.contains('\0') {
            return Err(nul(field));
        }
    }
    Ok(())
}

/// A string field: no NUL (it becomes a C string or a key), at most `max` bytes.
fn text(field: &'static str, value: &str, max: usize) -> Result<(), ConversionError> {
    if value.len() > max {
        return Err(ConversionError::Invalid {
            field,
            reason: format!("{} bytes; at most {max}", value.len()),
        });
    }
    if value.contains('\0') {
        return Err(nul(field));
    }
    Ok(())
}

fn count(field: &'static str, n: usize, max: usize) -> Result<(), ConversionError> {
    if n > max {
        return Err(ConversionError::Invalid {
            field,
            reason: format!("{n} entries; at most {max}"),
        });
    }
    Ok(())
}

fn nul(field: &'static str) -> ConversionError {
    ConversionError::Invalid {
        field,
        reason: "must not contain NUL bytes".to_owned(),
    }
}

#[cfg(test)]
mod tests;
