//! Exit codes of the `weft` command line, and how a final task or an error
//! maps to one. The table is printed in `weft --help` ([`EXIT_CODES_HELP`]);
//! keep the two in step.

use weft_client::{Error, Task};
use weft_proto::{Outcome, TaskState};

/// The task succeeded (or the command did its job).
pub const SUCCESS: u8 = 0;
/// The task failed without an exit code (signal, handler error), or the
/// command failed for another reason.
pub const FAILURE: u8 = 1;
/// Bad usage: a malformed flag, id or spec, a spec or request too large
/// to send, or TLS settings that cannot work (no CA, or a coordinator
/// certificate the given CA or pin does not verify).
pub const USAGE: u8 = 2;
/// The coordinator is unreachable, or the connection to it was lost.
pub const UNAVAILABLE: u8 = 69;
/// No valid token (UNAUTHENTICATED) or a token without the scope the call
/// needs (PERMISSION_DENIED); like sysexits' NOPERM.
pub const NO_PERMISSION: u8 = 77;
/// The task failed because the nodes running it were lost.
pub const NODE_LOST: u8 = 75;
/// The task ran past its timeout.
pub const TIMED_OUT: u8 = 124;
/// The task could not start (unknown handler, missing binary, bad cwd).
pub const START_FAILED: u8 = 127;
/// The task was cancelled (also: Ctrl-C cancelled it).
pub const CANCELLED: u8 = 130;
/// Stdout's reader went away (`| head`), as a tool killed by SIGPIPE
/// ends; `run`, `call` and `map` cancel the tasks they submitted first.
pub const CLOSED_PIPE: u8 = 141;
/// Ctrl-C stopped `watch` before the task finished; the task goes on.
pub const INTERRUPTED: u8 = 3;
/// The task never ran: a task it runs after did not end as its rule needs
/// (UPSTREAM_FAILED).
pub const UPSTREAM_FAILED: u8 = 4;
/// The task never ran, by its rule (SKIPPED: `any_failed` and every task
/// it runs after succeeded).
pub const SKIPPED: u8 = 5;

/// The exit code table, as shown after `weft --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes (task codes from run, call, wait, watch; map exits 1 if any task failed,
69 if one could not be run or followed because no coordinator answered):
  0    the task succeeded
  N    the task's process exited with code N
  1    the task failed without an exit code (signal, handler error), or another error
  2    usage error (bad flag, id, or task spec; a spec or request too large to send;
       no CA for https://, or a coordinator certificate the CA or pin does not verify)
  69   coordinator unreachable, or the connection to it was lost
  77   permission denied: no valid token (pass --token / WEFT_TOKEN / --token-file),
       or the token lacks the scope the command needs
  75   the task failed because its nodes were lost (attempts used up by node losses)
  124  the task timed out
  127  the task failed to start (unknown handler, missing binary, bad cwd)
  3    Ctrl-C stopped `watch` before the task finished (the task goes on)
  4    the task never ran: a task it runs after failed (upstream_failed)
  5    the task never ran, by its rule: skipped (--after-rule any_failed)
  130  the task was cancelled (Ctrl-C on run or call cancels it; 69 instead when
       no coordinator took the cancel: run `weft cancel ID` later)
  141  stdout was closed (`| head`): run, call and map cancel their tasks first,
       watch just stops (the task goes on)";

/// The exit code for a task in its final state (or [`FAILURE`] if it is not
/// final, which a caller should not ask).
///
/// A failed task is classified by `last_outcome` (how its latest attempt
/// ended) when the coordinator sends it; the error-text heuristics are only
/// the fallback for coordinators that do not, and for failures decided by
/// the coordinator itself (e.g. an unknown handler at submit).
pub fn for_task(task: &Task) -> u8 {
    match task.state {
        TaskState::Succeeded => SUCCESS,
        TaskState::TimedOut => TIMED_OUT,
        TaskState::Cancelled => CANCELLED,
        TaskState::Failed => match (task.exit_code, task.last_outcome) {
            (Some(code), _) if code != 0 => u8::try_from(code & 0xff)
                .ok()
                .filter(|c| *c != 0)
                .unwrap_or(FAILURE),
            (_, Some(Outcome::StartFailed)) => START_FAILED,
            (_, Some(Outcome::TimedOut)) => TIMED_OUT,
            // Cancelled by its node (a drain past its grace), not by a
            // client: the coordinator counts that as a node loss.
            (_, Some(Outcome::Cancelled)) => NODE_LOST,
            (_, Some(Outcome::Failed | Outcome::Succeeded)) => FAILURE,
            _ if is_start_failure(&task.error) => START_FAILED,
            // No outcome: the latest attempt was lost with its node (or
            // the task never ran).
            (_, None) if task.node_losses > 0 && task.attempt.0 > 0 => NODE_LOST,
            _ if lost_with_node(task) => NODE_LOST,
            _ => FAILURE,
        },
        TaskState::UpstreamFailed => UPSTREAM_FAILED,
        TaskState::Skipped => SKIPPED,
        TaskState::Pending | TaskState::Queued | TaskState::Assigned | TaskState::Running => {
            FAILURE
        }
    }
}

/// A command line that parses but makes no sense (exit [`USAGE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for a command that ended with `err`.
pub fn for_error(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        return USAGE;
    }
    match err.chain().find_map(|cause| cause.downcast_ref::<Error>()) {
        Some(Error::Unavailable(message)) if is_untrusted_certificate(message) => USAGE,
        Some(Error::Unavailable(_)) => UNAVAILABLE,
        Some(Error::Other {
            code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied,
            ..
        }) => NO_PERMISSION,
        Some(
            Error::InvalidArgument(_)
            // Too large for a message (the coordinator's or this client's
            // limit): bad input, refused the same way every time.
            | Error::TooLarge(_)
            | Error::InvalidAddress(_)
            | Error::InvalidUrl { .. }
            | Error::Tls(_),
        ) => USAGE,
        Some(_) | None => FAILURE,
    }
}

/// True when a connect failed because the coordinator's certificate does
/// not verify against the CA file or pin given, or does not name the host
/// dialed: the settings are wrong, and dialing again will not help. The
/// client reports the handshake as UNAVAILABLE, in the words
/// `weft_proto::tls` explains these failures with (its `HandshakeFailure`
/// `Untrusted` and `WrongName`). With several addresses, every one must
/// have failed that way: one coordinator down among them is unreachable.
fn is_untrusted_certificate(message: &str) -> bool {
    let untrusted = |text: &str| {
        [
            "the coordinator's certificate is not signed by the CA in ",
            "the coordinator's certificate chain does not match ",
            "the coordinator's certificate does not name ",
        ]
        .iter()
        .any(|needle| text.contains(needle))
    };
    // Each address's failure begins with these words (`weft_client`).
    let mut failures = message
        .split("cannot reach coordinator at ")
        .skip(1)
        .peekable();
    match failures.peek() {
        Some(_) => failures.all(untrusted),
        None => untrusted(message),
    }
}

/// The coordinator records why an attempt could not start in the task's
/// error; these are the forms it and the node use.
fn is_start_failure(error: &str) -> bool {
    let error = error.to_ascii_lowercase();
    [
        "unknown handler",
        "failed to start",
        "could not start",
        "start failed",
        "cannot start",
        "no such file or directory",
    ]
    .iter()
    .any(|needle| error.contains(needle))
}

/// True when the attempt that ended the task was lost with its node.
fn lost_with_node(task: &Task) -> bool {
    task.node_losses > 0 && (task.failures == 0 || task.error.to_ascii_lowercase().contains("lost"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState) -> Task {
        crate::testing::task(state)
    }

    #[test]
    fn final_states_map_to_their_documented_codes() {
        assert_eq!(for_task(&task(TaskState::Succeeded)), SUCCESS);
        assert_eq!(for_task(&task(TaskState::TimedOut)), TIMED_OUT);
        assert_eq!(for_task(&task(TaskState::Cancelled)), CANCELLED);
        assert_eq!(for_task(&task(TaskState::Failed)), FAILURE);
    }

    #[test]
    fn a_failed_process_exits_with_its_own_code() {
        let mut failed = task(TaskState::Failed);
        failed.exit_code = Some(3);
        assert_eq!(for_task(&failed), 3);
        failed.exit_code = Some(256); // wraps to 0 on Unix; still a failure
        assert_eq!(for_task(&failed), FAILURE);
        failed.exit_code = Some(-1);
        assert_eq!(for_task(&failed), 255);
    }

    #[test]
    fn start_failures_exit_127() {
        let mut failed = task(TaskState::Failed);
        failed.error = "unknown handler 'nope': no connected node serves it (known: echo)".into();
        assert_eq!(for_task(&failed), START_FAILED);
        failed.error = "failed to start `nope`: No such file or directory".into();
        assert_eq!(for_task(&failed), START_FAILED);
    }

    #[test]
    fn a_task_lost_with_its_nodes_exits_75() {
        let mut lost = task(TaskState::Failed);
        lost.node_losses = 3;
        lost.error = "node n1 lost".into();
        assert_eq!(for_task(&lost), NODE_LOST);
        let mut handler_error = task(TaskState::Failed);
        handler_error.failures = 3;
        handler_error.error = "boom".into();
        assert_eq!(for_task(&handler_error), FAILURE);
    }

    #[test]
    fn last_outcome_decides_before_the_error_text() {
        let mut start = task(TaskState::Failed);
        start.last_outcome = Some(Outcome::StartFailed);
        start.error = "something odd".into();
        assert_eq!(for_task(&start), START_FAILED);
        let mut handler = task(TaskState::Failed);
        handler.last_outcome = Some(Outcome::Failed);
        handler.node_losses = 1;
        handler.error = "lost my temper".into();
        assert_eq!(for_task(&handler), FAILURE);
        let mut poison = task(TaskState::Failed);
        poison.node_losses = 2;
        poison.failures = 1;
        poison.error = "lost with 2 different nodes (a, b) while running; not retried to protect the cluster (--max-node-losses)".into();
        assert_eq!(for_task(&poison), NODE_LOST);
        let mut drained = task(TaskState::Failed);
        drained.last_outcome = Some(Outcome::Cancelled);
        drained.node_losses = 3;
        assert_eq!(for_task(&drained), NODE_LOST);
        let mut cancelled = task(TaskState::Cancelled);
        cancelled.last_outcome = Some(Outcome::Cancelled);
        assert_eq!(for_task(&cancelled), CANCELLED);
    }

    #[test]
    fn errors_map_unreachable_to_69_and_bad_input_to_2() {
        let down = anyhow::Error::new(Error::Unavailable("cannot reach".into()));
        assert_eq!(for_error(&down), UNAVAILABLE);
        let context = down.context("submitting");
        assert_eq!(for_error(&context), UNAVAILABLE);
        let bad = anyhow::Error::new(Error::InvalidArgument("bad spec".into()));
        assert_eq!(for_error(&bad), USAGE);
        let large = Error::TooLarge("spec is 9 bytes, past the limit of 8".into());
        assert_eq!(
            for_error(&anyhow::Error::new(large).context("submitting")),
            USAGE
        );
        assert_eq!(for_error(&anyhow::anyhow!("other")), FAILURE);
        assert_eq!(for_error(&UsageError("two inputs".into()).into()), USAGE);
        let address = weft_proto::CoordinatorAddr::parse("x").unwrap_err();
        assert_eq!(for_error(&Error::InvalidAddress(address).into()), USAGE);
    }

    #[test]
    fn a_certificate_the_ca_or_pin_does_not_verify_is_a_usage_error_not_unreachable() {
        let refused = |why: &str| {
            anyhow::Error::new(Error::Unavailable(format!(
                "cannot reach coordinator at https://10.0.0.1:7070: {why}"
            )))
        };
        let wrong_ca = refused(
            "the coordinator's certificate is not signed by the CA in /tmp/other.pem: pass the cluster's ca.pem (--ca-file / WEFT_CA) or its pin (--ca-pin / WEFT_CA_PIN)",
        );
        assert_eq!(for_error(&wrong_ca), USAGE);
        let wrong_pin = refused(
            "the coordinator's certificate chain does not match the CA pin sha256:00: pass the pin the coordinator printed (--ca-pin / WEFT_CA_PIN) or its ca.pem (--ca-file / WEFT_CA)",
        );
        assert_eq!(for_error(&wrong_pin), USAGE);
        let no_ca = anyhow::Error::new(Error::Tls("no CA for https://".into()));
        assert_eq!(for_error(&no_ca), USAGE);
        // Down, or not answering the handshake: still unreachable.
        assert_eq!(for_error(&refused("connection refused")), UNAVAILABLE);
        assert_eq!(
            for_error(&refused(
                "the coordinator at 10.0.0.1:7070 closed the connection during the TLS handshake"
            )),
            UNAVAILABLE
        );
        // Several addresses: a usage error only when every one refused
        // the certificate; one down among them is unreachable.
        let several = |parts: &[&str]| {
            let all: Vec<String> = parts
                .iter()
                .enumerate()
                .map(|(i, why)| {
                    format!("cannot reach coordinator at https://10.0.0.{i}:7070: {why}")
                })
                .collect();
            anyhow::Error::new(Error::Unavailable(format!(
                "no coordinator answered: {}",
                all.join("; ")
            )))
        };
        let untrusted = "the coordinator's certificate does not name 10.0.0.1";
        assert_eq!(for_error(&several(&[untrusted, untrusted])), USAGE);
        assert_eq!(
            for_error(&several(&[untrusted, "connection refused"])),
            UNAVAILABLE
        );
    }
}
