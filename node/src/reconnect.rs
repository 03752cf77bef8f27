//! The node's main loop: one session after another, reconnecting with
//! exponential backoff and jitter while the coordinator is away, until the
//! node is drained or killed, or meets an error reconnecting cannot fix (a
//! malformed coordinator address, a `Register` refused for good: see
//! [`Error::is_fatal`]); the lease watchdog runs beside it all along.
//!
//! The backoff starts again from its minimum once a session registered.
//! Running attempts are not touched here: they carry on across reconnects
//! (the lease decides when they must stop). One session itself (dial,
//! `Register`, the stream) is `session.rs`.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::transport::Channel;
use tracing::{debug, error, warn};

use weft_proto::{CoordinatorAddr, NodeId};

use crate::error::Error;
use crate::events::EventRx;
use crate::lease_watchdog;
use crate::session::{self, NodeCtx, SessionEnd};

/// Exponential reconnect backoff with jitter: each delay is drawn from
/// `[base/2, base]`, and `base` doubles from `min` up to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    /// Delays from about `min` (at least 1 ms) doubling up to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            base: min,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The next delay to wait before dialing again.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.draws += 1;
        let fraction = (self.random.hash_one(self.draws) % 1_000_001) as f64 / 1_000_000.0;
        let delay = self.base.mul_f64(0.5 + 0.5 * fraction);
        self.base = (self.base * 2).min(self.max);
        delay
    }

    /// After a successful registration, start again from `min`.
    pub(crate) fn reset(&mut self) {
        self.base = self.min;
    }
}

/// For a plaintext (`http://`) coordinator address whose session broke
/// before registering the way HTTP/2 breaks against a TLS listener: the
/// hint to dial https with the cluster CA.
fn plaintext_hint(coordinator: &str, error: &Error) -> Option<String> {
    let address = CoordinatorAddr::parse(coordinator).ok()?;
    let broken = matches!(
        error,
        Error::Refused(status) if matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal
        )
    );
    (address.scheme() == weft_proto::address::Scheme::Http && broken)
        .then(|| weft_proto::tls::plaintext_hint(&address))
}

/// The node's main loop: sessions and reconnects until drained or killed
/// (`Ok`), or until a fatal error (`Err`, logged here).
pub(crate) async fn run(ctx: Arc<NodeCtx>, events: EventRx) -> Result<(), Error> {
    let plan = CoordinatorAddr::parse(&ctx.config.coordinator)
        .map_err(Error::from)
        .and_then(|address| {
            // One identity for the node's life: a renewal swaps what it
            // presents, so the connector made here stays right.
            let identity = ctx.credentials.get().map(|c| c.client());
            weft_proto::tls::dial_plan_as(&address, ctx.config.trust.as_ref(), identity)
                .map_err(|err| Error::Tls(err.to_string()))
        });
    let (url, connector) = match plan {
        Ok(plan) => plan,
        Err(err) => {
            error!(error = %err, "stopping the node: reconnecting would not help");
            return Err(err);
        }
    };
    run_with(ctx, events, move || {
        session::dial(url.clone(), connector.clone())
    })
    .await
}

/// [`run`] with the dialer as a parameter, so tests can time reconnects.
pub(crate) async fn run_with<D, F>(ctx: Arc<NodeCtx>, events: EventRx, dial: D) -> Result<(), Error>
where
    D: FnMut() -> F,
    F: Future<Output = Result<Channel, Error>>,
{
    let result = tokio::select! {
        result = sessions(&ctx, events, dial) => result,
        () = lease_watchdog::watch(&ctx.lease, &ctx.executor) => Ok(()),
    };
    ctx.node_id.send_replace(None);
    if let Err(err) = &result {
        error!(error = %err, "stopping the node: reconnecting would not help");
    }
    result
}

/// Sessions and reconnects until drained or killed, or a fatal error.
async fn sessions<D, F>(ctx: &Arc<NodeCtx>, mut events: EventRx, mut dial: D) -> Result<(), Error>
where
    D: FnMut() -> F,
    F: Future<Output = Result<Channel, Error>>,
{
    let mut backoff = Backoff::new(ctx.config.reconnect_min, ctx.config.reconnect_max);
    // A node with a certificate is that certificate's node from its first
    // session on.
    let mut previous: Option<NodeId> = ctx.credentials.get().map(|c| c.node_id());
    let stop = ctx.drain.done();
    loop {
        if let Some(expired) = expired(ctx, SystemTime::now()) {
            return Err(expired);
        }
        let dialed = tokio::select! {
            () = ctx.kill.cancelled() => break,
            () = stop.cancelled() => break,
            dialed = dial() => dialed,
        };
        match dialed {
            Ok(channel) => match session::run(ctx, channel, &mut events, &mut previous).await {
                SessionEnd::Stopped | SessionEnd::Killed => break,
                SessionEnd::Fatal(error) => return Err(error),
                SessionEnd::Lost { registered, error } => {
                    ctx.node_id.send_replace(None);
                    ctx.metrics.session_lost(&error);
                    match (registered, plaintext_hint(&ctx.config.coordinator, &error)) {
                        (false, Some(hint)) => {
                            warn!(%error, hint, "lost the coordinator; reconnecting");
                        }
                        _ => warn!(%error, "lost the coordinator; reconnecting"),
                    }
                    if registered {
                        backoff.reset();
                    }
                }
            },
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                ctx.metrics.connect_failed();
                warn!(%error, "cannot reach the coordinator");
            }
        }
        let delay = backoff.next_delay();
        debug!(?delay, "waiting before reconnecting");
        tokio::select! {
            () = ctx.kill.cancelled() => break,
            () = stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    Ok(())
}

/// The error to stop with when the node's certificate expired by `now`
/// (it was away longer than its lifetime): no coordinator accepts it.
fn expired(ctx: &NodeCtx, now: SystemTime) -> Option<Error> {
    let credentials = ctx.credentials.get()?;
    let not_after = credentials.not_after();
    (not_after <= now).then(|| Error::CertificateExpired {
        not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
        state_dir: credentials.store().map_or_else(
            || "(none)".to_owned(),
            |dir| dir.path().display().to_string(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::time::Instant;

    use super::*;

    #[test]
    fn a_plaintext_session_broken_like_http2_against_tls_gets_the_tls_hint() {
        let broken = Error::Refused(tonic::Status::internal("h2 protocol error: http2 error"));
        let hint = plaintext_hint("http://c:1", &broken).expect("a hint");
        assert!(
            hint.contains("https://c:1") && hint.contains("--ca-file"),
            "{hint}"
        );
        assert!(plaintext_hint("https://c:1", &broken).is_none());
        let busy = Error::Refused(tonic::Status::unavailable("shutting down"));
        assert!(plaintext_hint("http://c:1", &busy).is_none());
    }
    use crate::config::NodeConfig;
    use crate::handlers::HandlerRegistry;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let bases = [100, 200, 400, 800, 800, 800];
        for base in bases {
            let delay = backoff.next_delay();
            let base = Duration::from_millis(base);
            assert!(
                delay >= base / 2 && delay <= base,
                "{delay:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_waits_grow_exponentially_while_the_coordinator_is_away() {
        let mut config = NodeConfig::new("http://unused");
        config.reconnect_min = Duration::from_millis(100);
        config.reconnect_max = Duration::from_secs(1);
        let (ctx, rx) = NodeCtx::new(config, HandlerRegistry::new(), None);
        let dials = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (record, counter, stop) = (dials.clone(), count.clone(), ctx.drain.done().clone());
        let dial = move || {
            record.lock().unwrap().push(Instant::now());
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == 7 {
                stop.cancel();
            }
            async { Err(Error::Protocol("coordinator away".into())) }
        };
        run_with(ctx, rx, dial)
            .await
            .expect("stopped by the drain, not by an error");
        let dials = dials.lock().unwrap();
        assert_eq!(dials.len(), 7);
        let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, base) in gaps.iter().zip([100u64, 200, 400, 800, 1000, 1000]) {
            let base = Duration::from_millis(base);
            assert!(
                *gap >= base / 2 && *gap <= base,
                "gap {gap:?} for base {base:?}; all {gaps:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_reconnecting_cannot_fix_stops_the_node_at_once() {
        let (ctx, rx) = NodeCtx::new(
            NodeConfig::new("http://unused"),
            HandlerRegistry::new(),
            None,
        );
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let dial = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let bad = weft_proto::CoordinatorAddr::parse("nope").unwrap_err();
            async move { Err(Error::from(bad)) }
        };
        let result = run_with(ctx, rx, dial).await;
        assert!(
            matches!(result, Err(Error::InvalidAddress(_))),
            "{result:?}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1, "dialed once, no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_certificate_expired_stops_instead_of_dialing() {
        let (ctx, rx) = NodeCtx::new(
            NodeConfig::new("http://unused"),
            HandlerRegistry::new(),
            None,
        );
        let (key_pem, chain_pem, ca_pem) = crate::identity::tests::issued(Duration::from_secs(60));
        let stored = crate::identity::Stored {
            node_id: NodeId::new(),
            name: "n1".into(),
            coordinator: "c:1".into(),
            key_pem,
            chain_pem,
            ca_pem,
        };
        let expired = std::time::SystemTime::now() - Duration::from_secs(10);
        let validity = crate::identity::Validity {
            not_before: expired - Duration::from_secs(60),
            not_after: expired,
        };
        let credentials = crate::renewal::Credentials::new(&stored, validity, None).unwrap();
        ctx.credentials.set(Arc::new(credentials)).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let dial = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::Protocol("unreachable".into())) }
        };
        let err = run_with(ctx, rx, dial).await.unwrap_err();
        assert!(matches!(err, Error::CertificateExpired { .. }), "{err:?}");
        assert!(err.to_string().contains("join again"), "{err}");
        assert_eq!(count.load(Ordering::SeqCst), 0, "never dialed");
    }

    #[tokio::test]
    async fn a_malformed_coordinator_address_stops_the_node_with_its_error() {
        let (ctx, rx) = NodeCtx::new(NodeConfig::new("garbage"), HandlerRegistry::new(), None);
        let err = run(ctx, rx).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid coordinator address 'garbage': expected HOST:PORT or http(s)://HOST:PORT"
        );
    }
}
