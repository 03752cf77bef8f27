//! Identifier newtypes. Task and node ids are ULIDs: 128 bits, time-ordered,
//! 26 characters on the wire. Keeping them as `u128` inside makes a queued
//! task's id cost 16 bytes instead of a heap string.

use std::fmt;
use std::str::FromStr;

use ulid::Ulid;

use crate::convert::ConversionError;

/// Characters in a task or node id on the wire.
pub const ID_LEN: usize = ulid::ULID_LEN;

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            /// A new id, ordered after ids made earlier in coarser than a millisecond.
            pub fn new() -> Self {
                Self(Ulid::new())
            }

            /// Wraps an existing ULID (from a monotonic generator, or the store).
            pub fn from_ulid(ulid: Ulid) -> Self {
                Self(ulid)
            }

            /// The id as a raw 128-bit number (store keys).
            pub fn as_u128(self) -> u128 {
                self.0.0
            }

            /// From a raw 128-bit number (store keys).
            pub fn from_u128(value: u128) -> Self {
                Self(Ulid(value))
            }

            /// Its 26 characters, written into `buf` (no allocation).
            pub fn to_str(self, buf: &mut [u8; ID_LEN]) -> &str {
                self.0.array_to_str(buf)
            }

            /// Milliseconds since the Unix epoch at which the id was made.
            pub fn timestamp_ms(self) -> u64 {
                self.0.timestamp_ms()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            /// Its 26 characters, padded as `f` asks: written at once,
            /// not through a second formatting pass (ids are formatted for
            /// every record, event and message that names a task).
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0; ulid::ULID_LEN];
                f.pad(self.0.array_to_str(&mut buf))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ConversionError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ulid::from_string(s.trim()).map(Self).map_err(|_| ConversionError::InvalidId {
                    what: $what,
                    value: s.chars().take(64).collect(),
                })
            }
        }
    };
}

ulid_id!(
    /// Identifies a task for its whole life (all attempts).
    TaskId,
    "task id"
);
ulid_id!(
    /// Identifies a node; stable across reconnects of the same node process.
    NodeId,
    "node id"
);

/// The attempt number of a task, from 1. Every assignment is `(TaskId, Attempt)`,
/// and an event for an attempt that is no longer current is refused (fencing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Attempt(pub u32);

impl Attempt {
    /// The first attempt.
    pub const FIRST: Attempt = Attempt(1);

    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_id_round_trips_through_its_string_form() {
        let id = TaskId::new();
        let parsed: TaskId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        assert_eq!(TaskId::from_u128(id.as_u128()), id);
    }

    #[test]
    fn an_id_prints_as_its_ulid_and_honours_width() {
        let id = TaskId::from_u128(0x0193_7c3a_4d2e_11aa_bbcc_ddee_ff00_1122);
        let ulid = ulid::Ulid(id.as_u128()).to_string();
        assert_eq!(ulid.len(), 26);
        assert_eq!(id.to_string(), ulid);
        assert_eq!(NodeId::from_u128(id.as_u128()).to_string(), ulid);
        assert_eq!(
            format!("{id:>30}|{id:<28}|"),
            format!("    {ulid}|{ulid}  |")
        );
        assert_eq!(format!("{:?}", id), format!("TaskId({ulid})"));
    }

    #[test]
    fn malformed_task_id_is_a_conversion_error() {
        let err = "not-an-id".parse::<TaskId>().unwrap_err();
        assert!(err.to_string().contains("task id"), "{err}");
    }
}
