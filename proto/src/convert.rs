//! Conversion errors and the time helpers shared by every crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a protocol message could not become a domain value. The coordinator
/// answers these as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// A field proto3 lets be empty was empty where a value is required.
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// An id that does not parse.
    #[error("invalid {what} {value:?}: expected a 26-character ULID")]
    InvalidId {
        /// Which kind of id.
        what: &'static str,
        /// The offending text (truncated).
        value: String,
    },
    /// A value outside the allowed set.
    #[error("invalid {what} {value:?}: expected one of {expected}")]
    InvalidValue {
        /// What was being parsed.
        what: &'static str,
        /// The offending text (truncated).
        value: String,
        /// The accepted values.
        expected: String,
    },
    /// A field whose value breaks a rule of the spec.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field, as named in the .proto file.
        field: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// A value larger than a configured limit. The coordinator answers
    /// this as `RESOURCE_EXHAUSTED`: not malformed, but too large to take.
    #[error("{what} is {size} bytes; this coordinator takes at most {limit} (--max-message-size)")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size, in bytes (as encoded on the wire).
        size: usize,
        /// The limit, in bytes.
        limit: usize,
    },
}

/// A `std` duration as its protobuf form.
pub fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The longest duration any field takes: 100 years (of 365.25 days). No
/// timeout, grace or lifetime needs more, and every one of them can be
/// added to a clock's reading without overflowing it.
pub const MAX_DURATION_SECS: i64 = 100 * 31_557_600;

/// A protobuf duration as a `std` one; negative or malformed durations, and
/// those over [`MAX_DURATION_SECS`], are refused.
pub fn duration_from_pb(
    field: &'static str,
    d: &prost_types::Duration,
) -> Result<Duration, ConversionError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ConversionError::Invalid {
            field,
            reason: format!(
                "negative or malformed duration {}s {}ns",
                d.seconds, d.nanos
            ),
        });
    }
    if d.seconds > MAX_DURATION_SECS {
        return Err(ConversionError::Invalid {
            field,
            reason: format!(
                "{}s is longer than 100 years ({MAX_DURATION_SECS}s), the most any duration may be",
                d.seconds
            ),
        });
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A wall-clock time as a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// A protobuf timestamp as a wall-clock time (clamped at the epoch).
pub fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// `t` in RFC 3339 (UTC; whole seconds, or milliseconds with `millis`).
/// A time after 9999-12-31, whose year RFC 3339 cannot write, is given as
/// seconds since the Unix epoch instead (humantime's formatter would fail,
/// and `to_string` panic).
pub fn rfc3339(t: SystemTime, millis: bool) -> String {
    const LATEST: Duration = Duration::from_secs(253_402_300_799);
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) if since > LATEST => format!("{}s after the Unix epoch", since.as_secs()),
        _ if millis => humantime::format_rfc3339_millis(t).to_string(),
        _ => humantime::format_rfc3339_seconds(t).to_string(),
    }
}

/// Parses a human duration: `250ms`, `2s`, `1m30s`, `1h`. A bare number is
/// seconds. Used by the CLI flags and the `sleep`/`spin` handlers. Longer
/// than [`MAX_DURATION_SECS`] (100 years) is refused, as the coordinator
/// refuses it: such a duration cannot be added to a clock's reading.
pub fn parse_duration(text: &str) -> Result<Duration, ConversionError> {
    let text = text.trim();
    let too_long = || ConversionError::Invalid {
        field: "duration",
        reason: format!(
            "{:?} is longer than 100 years; a duration is at most 100 years",
            text.chars().take(64).collect::<String>()
        ),
    };
    let duration = match text.parse::<f64>() {
        // `from_secs_f64` would panic past u64::MAX seconds.
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|_| too_long())?
        }
        _ => humantime::parse_duration(text).map_err(|err| match err {
            humantime::DurationError::NumberOverflow => too_long(),
            _ => ConversionError::InvalidValue {
                what: "duration",
                value: text.chars().take(64).collect(),
                expected: "a duration such as 250ms, 2s, 1m30s".to_owned(),
            },
        })?,
    };
    if duration > Duration::from_secs(MAX_DURATION_SECS as u64) {
        return Err(too_long());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_human_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn a_parsed_duration_past_a_hundred_years_is_refused_not_a_panic() {
        let longest = format!("{MAX_DURATION_SECS}");
        assert_eq!(
            parse_duration(&longest).unwrap(),
            Duration::from_secs(MAX_DURATION_SECS as u64)
        );
        for text in [
            "1e20",
            "1e19",
            "300000000000y",
            "101y",
            "3155760001",
            "99999999999999999999999y",
        ] {
            let err = parse_duration(text).expect_err(text).to_string();
            assert!(err.contains("at most 100 years"), "{text}: {err}");
        }
    }

    #[test]
    fn negative_pb_duration_is_refused() {
        let d = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(duration_from_pb("timeout", &d).is_err());
        let back = duration_from_pb("timeout", &duration_to_pb(Duration::from_millis(1500)));
        assert_eq!(back.unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn a_duration_past_a_hundred_years_is_refused_naming_its_field() {
        let secs = |seconds| prost_types::Duration {
            seconds,
            nanos: 999_999_999,
        };
        let longest = duration_from_pb("ttl", &secs(MAX_DURATION_SECS)).expect("100 years");
        assert!(std::time::Instant::now().checked_add(longest).is_some());
        for seconds in [MAX_DURATION_SECS + 1, i64::MAX] {
            let err = duration_from_pb("ttl", &secs(seconds)).expect_err("refused");
            assert!(
                err.to_string().contains("ttl") && err.to_string().contains("100 years"),
                "{err}"
            );
        }
    }
}
