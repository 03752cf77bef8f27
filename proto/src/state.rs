//! The state enums of the domain, with their wire and text forms.
//!
//! The text forms (`queued`, `timed_out`, ...) are what the CLI prints and
//! parses and what JSON output carries.

use std::fmt;
use std::str::FromStr;

use crate::convert::ConversionError;
use crate::pb;

macro_rules! domain_enum {
    (
        $(#[$doc:meta])*
        $name:ident, $pb:ident, $what:literal {
            $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)?
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in protocol order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The lower-case text form (`"timed_out"`).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ConversionError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == wanted)
                    .ok_or_else(|| ConversionError::InvalidValue {
                        what: $what,
                        value: s.chars().take(64).collect(),
                        expected: $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                    })
            }
        }

        impl From<$name> for pb::$pb {
            fn from(value: $name) -> Self {
                match value { $($name::$variant => pb::$pb::$variant),+ }
            }
        }

        impl From<$name> for i32 {
            fn from(value: $name) -> Self {
                pb::$pb::from(value) as i32
            }
        }

        /// The wire value: 0 (unspecified) is a missing field; a value
        /// this side does not know (from a newer peer, or garbage) is an
        /// invalid value that names it. Both are `INVALID_ARGUMENT`.
        impl TryFrom<i32> for $name {
            type Error = ConversionError;

            fn try_from(value: i32) -> Result<Self, Self::Error> {
                match pb::$pb::try_from(value) {
                    $(Ok(pb::$pb::$variant) => Ok($name::$variant),)+
                    Ok(pb::$pb::Unspecified) => Err(ConversionError::MissingField($what)),
                    Err(_) => Err(ConversionError::InvalidValue {
                        what: $what,
                        value: value.to_string(),
                        expected: $name::ALL
                            .iter()
                            .map(|v| format!("{} ({})", v.as_str(), i32::from(*v)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
        }
    };
}

domain_enum!(
    /// Where a task is in its life. See `TaskState` in `common.proto`.
    TaskState, TaskState, "task state" {
        /// Committed, waiting for a node with room.
        Queued = "queued",
        /// Sent to a node, not yet started.
        Assigned = "assigned",
        /// Running on a node.
        Running = "running",
        /// Final: succeeded.
        Succeeded = "succeeded",
        /// Final: failed on its last allowed attempt.
        Failed = "failed",
        /// Final: cancelled by a client.
        Cancelled = "cancelled",
        /// Final: killed for running past its timeout.
        TimedOut = "timed_out",
        /// Waiting for the tasks it runs after, or for its start time.
        Pending = "pending",
        /// Final, without running: its dependency rule can no longer be met.
        UpstreamFailed = "upstream_failed",
        /// Final, without running, not a failure (`any_failed` after all
        /// its parents succeeded).
        Skipped = "skipped",
    }
);

/// How many task states there are (the length of `TaskState::ALL`), for
/// per-state counters.
pub const TASK_STATES: usize = TaskState::ALL.len();

impl TaskState {
    /// True for the states a task never leaves.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Cancelled
                | TaskState::TimedOut
                | TaskState::UpstreamFailed
                | TaskState::Skipped
        )
    }
}

domain_enum!(
    /// How one attempt ended, as its node reports it.
    Outcome, Outcome, "outcome" {
        /// Exit code 0 or handler returned a value.
        Succeeded = "succeeded",
        /// Non-zero exit, signal, handler error: retried under max attempts.
        Failed = "failed",
        /// Stopped on request.
        Cancelled = "cancelled",
        /// Killed for running past the timeout.
        TimedOut = "timed_out",
        /// Could not start (unknown handler, missing binary): not retried.
        StartFailed = "start_failed",
    }
);

domain_enum!(
    /// Which stream an output chunk came from.
    OutputStream, OutputStream, "output stream" {
        /// Standard output.
        Stdout = "stdout",
        /// Standard error.
        Stderr = "stderr",
    }
);

domain_enum!(
    /// Whether a node takes work.
    NodeState, NodeState, "node state" {
        /// Taking work.
        Ready = "ready",
        /// Finishing its work, taking none.
        Draining = "draining",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_state_text_form_round_trips() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>().unwrap(), *state);
            assert_eq!(TaskState::try_from(i32::from(*state)).unwrap(), *state);
        }
        assert_eq!(
            "timed-out".parse::<TaskState>().unwrap(),
            TaskState::TimedOut
        );
    }

    #[test]
    fn unknown_state_lists_the_valid_ones() {
        let err = "done".parse::<TaskState>().unwrap_err().to_string();
        assert!(err.contains("queued") && err.contains("timed_out"), "{err}");
    }

    #[test]
    fn unspecified_state_is_refused() {
        assert_eq!(
            TaskState::try_from(0),
            Err(ConversionError::MissingField("task state"))
        );
    }

    #[test]
    fn an_unknown_wire_value_is_an_invalid_value_naming_it_not_a_missing_field() {
        fn check<T: TryFrom<i32, Error = ConversionError> + fmt::Debug>(what: &str) {
            for value in [99, -1, i32::MAX] {
                let err = T::try_from(value).unwrap_err();
                let ConversionError::InvalidValue {
                    what: said,
                    value: named,
                    ..
                } = &err
                else {
                    panic!("{what} {value}: {err:?}");
                };
                assert_eq!((*said, named.as_str()), (what, &*value.to_string()));
                assert!(err.to_string().contains(&value.to_string()), "{err}");
            }
        }
        check::<TaskState>("task state");
        check::<Outcome>("outcome");
        check::<OutputStream>("output stream");
        check::<NodeState>("node state");
        let err = Outcome::try_from(99).unwrap_err().to_string();
        assert!(err.contains("succeeded (1)"), "{err}");
    }
}
