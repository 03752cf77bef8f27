//! Built-in handlers for demos, tests and benchmarks: `noop`, `echo`,
//! `sleep`, `sha256`, `fail` (async) and `spin` (blocking).

use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use weft_proto::OutputStream;
use weft_proto::convert::parse_duration;

use super::{HandlerError, HandlerRegistry, HandlerRequest};

impl HandlerRegistry {
    /// The built-ins: noop, echo, sleep, sha256, fail, spin.
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        register(&mut registry);
        registry
    }
}

/// Registers every built-in on `registry`.
pub fn register(registry: &mut HandlerRegistry) {
    registry
        .register_async("noop", noop)
        .register_async("echo", echo)
        .register_async("sleep", sleep)
        .register_async("sha256", sha256)
        .register_async("fail", fail)
        .register_blocking("spin", spin);
}

/// Returns its input unchanged.
pub async fn noop(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    Ok(request.input)
}

/// Writes its input to stdout as an output chunk and returns it.
pub async fn echo(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    request
        .emit
        .output(OutputStream::Stdout, request.input.clone())
        .await;
    Ok(request.input)
}

/// Sleeps for the duration in its input (`250ms`, `2s`); returns nothing.
///
/// tokio's timer works in whole milliseconds and rounds deadlines up, so a
/// plain `tokio::time::sleep(50ms)` lasts about 51 ms. The wait runs on the
/// timer until `TIMER_SLACK` before the deadline and sleeps the rest on
/// the blocking pool, so `sleep` lasts what it says to a fraction of a
/// millisecond without holding a thread for the whole wait.
pub async fn sleep(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    let duration = duration_input(&request.input)?;
    let deadline = Instant::now() + duration;
    let wait = async move {
        if let Some(coarse) = duration.checked_sub(TIMER_SLACK) {
            tokio::time::sleep(coarse).await;
        }
        let rest = deadline.saturating_duration_since(Instant::now());
        if !rest.is_zero() {
            // A join error only means the runtime is shutting down.
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
        }
    };
    tokio::select! {
        () = wait => Ok(Bytes::new()),
        () = request.cancel.cancelled() => Err(HandlerError::Cancelled),
    }
}

/// How much of a `sleep` is left to a precise thread sleep (see [`sleep`]).
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Returns the lowercase hex SHA-256 digest of its input.
pub async fn sha256(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    Ok(Bytes::from(hex::encode(Sha256::digest(&request.input))))
}

/// Fails with its input as the error message (with no input, saying it
/// was asked to fail).
pub async fn fail(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    let message = match request.input.is_empty() {
        true => "the fail handler fails as asked (give it an input to choose the message)".into(),
        false => String::from_utf8_lossy(&request.input).into_owned(),
    };
    Err(HandlerError::Failed(message))
}

/// Burns CPU for the duration in its input (`100ms`), checking for
/// cancellation as it goes; returns nothing. A blocking handler.
pub fn spin(request: HandlerRequest) -> Result<Bytes, HandlerError> {
    let duration = duration_input(&request.input)?;
    let start = Instant::now();
    let mut state = [0u8; 32];
    while start.elapsed() < duration {
        if request.cancel.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        // About a few microseconds of real work between clock checks.
        for _ in 0..64 {
            state = Sha256::digest(state).into();
        }
        std::hint::black_box(&state);
    }
    Ok(Bytes::new())
}

fn duration_input(input: &[u8]) -> Result<Duration, HandlerError> {
    let text = std::str::from_utf8(input).map_err(|_| {
        HandlerError::invalid_input("expected a duration such as 250ms, got non-UTF-8 bytes")
    })?;
    parse_duration(text).map_err(|err| HandlerError::invalid_input(err.to_string()))
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::events;

    async fn call(name: &str, input: &str) -> Result<Bytes, HandlerError> {
        let service = HandlerRegistry::with_builtins()
            .get(name)
            .expect("built-in");
        service
            .oneshot(HandlerRequest::detached(input.to_owned()))
            .await
    }

    #[tokio::test]
    async fn noop_returns_its_input() {
        assert_eq!(call("noop", "same").await.unwrap(), "same");
    }

    #[tokio::test]
    async fn echo_writes_its_input_to_stdout_and_returns_it() {
        let (tx, mut rx) = events::channel();
        let mut request = HandlerRequest::detached("hello");
        request.emit = events::Emitter::new(tx, request.task_id, request.attempt);
        let out = echo(request).await.unwrap();
        assert_eq!(out, "hello");
        let event = rx.recv().await.unwrap();
        let events::EventBody::Output { stream, seq, data } = event.body else {
            panic!("expected an output chunk, got {event:?}");
        };
        assert_eq!((data.as_ref(), seq), (b"hello".as_ref(), 0));
        assert_eq!(stream, OutputStream::Stdout);
    }

    #[tokio::test]
    async fn sleep_waits_for_its_input_and_refuses_bad_input() {
        let start = Instant::now();
        assert_eq!(call("sleep", "30ms").await.unwrap(), "");
        assert!(start.elapsed() >= Duration::from_millis(30));
        let err = call("sleep", "soon").await.unwrap_err();
        assert!(matches!(err, HandlerError::InvalidInput(_)), "{err:?}");
    }

    #[tokio::test]
    async fn sleep_stops_when_cancelled() {
        let request = HandlerRequest::detached("1h");
        request.cancel.cancel();
        assert_eq!(sleep(request).await.unwrap_err(), HandlerError::Cancelled);
    }

    #[tokio::test]
    async fn sha256_returns_the_lowercase_hex_digest() {
        assert_eq!(
            call("sha256", "abc").await.unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn fail_fails_with_its_input_as_the_message() {
        assert_eq!(
            call("fail", "on purpose").await.unwrap_err().to_string(),
            "on purpose"
        );
    }

    #[tokio::test]
    async fn fail_without_input_says_it_failed_as_asked() {
        let message = call("fail", "").await.unwrap_err().to_string();
        assert!(message.contains("fails as asked"), "{message}");
    }

    #[tokio::test]
    async fn spin_burns_for_its_duration_and_checks_cancellation() {
        let start = Instant::now();
        assert_eq!(call("spin", "20ms").await.unwrap(), "");
        assert!(start.elapsed() >= Duration::from_millis(20));
        let request = HandlerRequest::detached("1h");
        request.cancel.cancel();
        assert_eq!(spin(request).unwrap_err(), HandlerError::Cancelled);
        assert!(call("spin", "lots").await.is_err());
    }
}
