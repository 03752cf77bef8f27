//! The W3C trace context a task runs under (`TraceContext` on the wire):
//! parsed and checked once, at the edge, like the rest of the spec.
//!
//! Only the format lives here (what a `traceparent` and a `tracestate` may
//! be, and how one is written back); which spans exist and how their ids
//! are chosen is the coordinator's business (`coordinator/src/trace/`).

use std::fmt;

use crate::convert::ConversionError;
use crate::pb;

/// Longest `tracestate` the W3C spec lets a vendor rely on being passed on.
pub const MAX_TRACESTATE_CHARS: usize = 512;

/// Most `tracestate` list members (W3C).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A parsed W3C trace context: a trace id, the span that is the parent of
/// whatever runs under it, the trace flags, and the vendors' `tracestate`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace (16 bytes, never all zero).
    pub trace_id: [u8; 16],
    /// The parent span (8 bytes, never all zero).
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` header as given (possibly empty).
    pub state: String,
}

impl TraceContext {
    /// A sampled context with no `tracestate`.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8]) -> Self {
        TraceContext {
            trace_id,
            parent_id,
            flags: SAMPLED,
            state: String::new(),
        }
    }

    /// Parses a `traceparent` and a `tracestate` (empty: none). Errors name
    /// the field (`trace.traceparent`, `trace.tracestate`).
    pub fn parse(traceparent: &str, tracestate: &str) -> Result<Self, ConversionError> {
        let (trace_id, parent_id, flags) = parse_traceparent(traceparent)
            .map_err(|reason| invalid("trace.traceparent", reason))?;
        check_tracestate(tracestate).map_err(|reason| invalid("trace.tracestate", reason))?;
        Ok(TraceContext {
            trace_id,
            parent_id,
            flags,
            state: tracestate.to_owned(),
        })
    }

    /// The same trace and state under another parent span.
    pub fn with_parent(&self, parent_id: [u8; 8]) -> Self {
        TraceContext {
            parent_id,
            ..self.clone()
        }
    }

    /// True when the trace is sampled (its spans are to be recorded).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` header: `00-TRACE-PARENT-FLAGS`.
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::TraceContext {
        pb::TraceContext {
            traceparent: self.traceparent(),
            tracestate: self.state.clone(),
        }
    }
}

impl TryFrom<&pb::TraceContext> for TraceContext {
    type Error = ConversionError;

    fn try_from(wire: &pb::TraceContext) -> Result<Self, Self::Error> {
        TraceContext::parse(&wire.traceparent, &wire.tracestate)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.to_string())
            .field("tracestate", &self.state)
            .finish()
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero.
fn parse_traceparent(text: &str) -> Result<([u8; 16], [u8; 8], u8), &'static str> {
    const FORM: &str = "must be 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>";
    let parts: Vec<&str> = text.split('-').collect();
    let [version, trace, parent, flags] = parts[..] else {
        return Err(FORM);
    };
    if version != "00" {
        return Err("only version 00 is supported");
    }
    let trace_id: [u8; 16] = unhex(trace).ok_or(FORM)?;
    let parent_id: [u8; 8] = unhex(parent).ok_or(FORM)?;
    let [flags]: [u8; 1] = unhex(flags).ok_or(FORM)?;
    if trace_id == [0; 16] {
        return Err("the trace-id must not be all zeros");
    }
    if parent_id == [0; 8] {
        return Err("the parent-id must not be all zeros");
    }
    Ok((trace_id, parent_id, flags))
}

/// At most 512 characters and 32 `key=value` members, printable ASCII
/// (it is passed on in an environment variable and a header).
fn check_tracestate(text: &str) -> Result<(), String> {
    if text.len() > MAX_TRACESTATE_CHARS {
        return Err(format!(
            "{} characters is more than the allowed {MAX_TRACESTATE_CHARS}",
            text.len()
        ));
    }
    if !text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) || b == b'\t')
    {
        return Err("must be printable ASCII".to_owned());
    }
    let members: Vec<&str> = text
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    if members.len() > MAX_TRACESTATE_MEMBERS {
        return Err(format!(
            "{} members is more than the allowed {MAX_TRACESTATE_MEMBERS}",
            members.len()
        ));
    }
    if members
        .iter()
        .any(|m| !matches!(m.split_once('='), Some((k, v)) if !k.is_empty() && !v.is_empty()))
    {
        return Err("members must be key=value".to_owned());
    }
    Ok(())
}

/// Lowercase hex digits, exactly `N` bytes' worth.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConversionError {
    ConversionError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_round_trips() {
        let ctx = TraceContext::parse(GOOD, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").unwrap();
        assert_eq!(ctx.traceparent(), GOOD);
        assert!(ctx.sampled());
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let back = TraceContext::try_from(&ctx.to_pb()).unwrap();
        assert_eq!(back, ctx);
        let moved = ctx.with_parent([1; 8]);
        assert_eq!(
            moved.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0101010101010101-01"
        );
    }

    #[test]
    fn a_malformed_traceparent_names_the_field() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            let err = TraceContext::parse(bad, "").unwrap_err().to_string();
            assert!(err.contains("trace.traceparent"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_oversize_tracestate_names_the_field() {
        let long = format!("k={}", "v".repeat(MAX_TRACESTATE_CHARS));
        let many = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in [long.as_str(), many.as_str(), "novalue", "a=b\nc=d"] {
            let err = TraceContext::parse(GOOD, bad).unwrap_err().to_string();
            assert!(err.contains("trace.tracestate"), "{err}");
        }
        let most = (0..MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(TraceContext::parse(GOOD, &most).is_ok());
    }
}
