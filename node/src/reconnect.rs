//! The node's main loop: one session after another, reconnecting with
//! exponential backoff and jitter while the coordinator is away, until the
//! node is drained or killed, or meets an error reconnecting cannot fix (a
//! malformed coordinator address, a `Register` refused for good: see
//! [`Error::is_fatal`]); the lease watchdog runs beside it all along.
//!
//! With several coordinator addresses (standbys on one database, only
//! one of them serving) a session that ends, or a dial that fails, moves
//! the node to the next address at once; it backs off only after a whole
//! round of addresses failed in a row ([`Rotation`]). Every address is
//! checked and given its TLS connector (one trust, each address's host as
//! the server name) before the first dial.
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

/// Which of several coordinator addresses to dial next, and when to back
/// off: after a failure the next address is dialed at once, unless every
/// address failed since the last registration (or the start). Plain state:
/// no clock, no I/O.
#[derive(Debug)]
pub(crate) struct Rotation {
    len: usize,
    next: usize,
    /// Failures in a row since the last registration.
    failed: usize,
}

impl Rotation {
    /// A rotation over `len` addresses (at least one), starting at the
    /// first.
    pub(crate) fn new(len: usize) -> Self {
        Rotation {
            len: len.max(1),
            next: 0,
            failed: 0,
        }
    }

    /// The index of the address to dial now.
    pub(crate) fn current(&self) -> usize {
        self.next
    }

    /// A session registered on the current address: a round starts anew.
    pub(crate) fn registered(&mut self) {
        self.failed = 0;
    }

    /// The current address failed (or its session ended): moves to the
    /// next one. Answers whether to back off first (a whole round failed).
    pub(crate) fn failed(&mut self) -> bool {
        self.next = (self.next + 1) % self.len;
        self.failed += 1;
        self.failed.is_multiple_of(self.len)
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
    // One identity for the node's life: a renewal swaps what it presents,
    // so the connectors made here stay right.
    let identity = ctx.credentials.get().map(|c| c.client());
    let plans = dial_plans(
        &ctx.config.coordinators,
        ctx.config.trust.as_ref(),
        identity,
    );
    let plans = match plans {
        Ok(plans) => plans,
        Err(err) => {
            error!(error = %err, "stopping the node: reconnecting would not help");
            return Err(err);
        }
    };
    run_with(ctx, events, move |index| {
        let (url, connector) = plans[index % plans.len()].clone();
        session::dial(url, connector)
    })
    .await
}

/// How to dial each of `coordinators` (the URL tonic dials and, for TLS,
/// the connector), in order: every one must parse and fit the trust.
pub(crate) fn dial_plans(
    coordinators: &[String],
    trust: Option<&weft_proto::tls::Trust>,
    identity: Option<Arc<weft_proto::tls::ClientIdentity>>,
) -> Result<Vec<(String, Option<weft_proto::tls::TlsConnector>)>, Error> {
    if coordinators.is_empty() {
        return Err(Error::from(
            weft_proto::address::AddressError(String::new()),
        ));
    }
    coordinators
        .iter()
        .map(|coordinator| {
            let address = CoordinatorAddr::parse(coordinator)?;
            weft_proto::tls::dial_plan_as(&address, trust, identity.clone())
                .map_err(|err| Error::Tls(err.to_string()))
        })
        .collect()
}

/// [`run`] with the dialer as a parameter (given the index of the
/// coordinator address to dial), so tests can time reconnects.
pub(crate) async fn run_with<D, F>(ctx: Arc<NodeCtx>, events: EventRx, dial: D) -> Result<(), Error>
where
    D: FnMut(usize) -> F,
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
    D: FnMut(usize) -> F,
    F: Future<Output = Result<Channel, Error>>,
{
    let mut backoff = Backoff::new(ctx.config.reconnect_min, ctx.config.reconnect_max);
    let addresses = &ctx.config.coordinators;
    let mut rotation = Rotation::new(addresses.len());
    // A node with a certificate is that certificate's node from its first
    // session on.
    let mut previous: Option<NodeId> = ctx.credentials.get().map(|c| c.node_id());
    let stop = ctx.drain.done();
    loop {
        if let Some(expired) = expired(ctx, SystemTime::now()) {
            return Err(expired);
        }
        let index = rotation.current();
        let coordinator = addresses.get(index).map_or("", String::as_str);
        let dialed = tokio::select! {
            () = ctx.kill.cancelled() => break,
            () = stop.cancelled() => break,
            dialed = dial(index) => dialed,
        };
        match dialed {
            Ok(channel) => {
                match session::run(ctx, channel, coordinator, &mut events, &mut previous).await {
                    SessionEnd::Stopped | SessionEnd::Killed => break,
                    SessionEnd::Fatal(error) => return Err(error),
                    SessionEnd::Lost { registered, error } => {
                        ctx.node_id.send_replace(None);
                        ctx.metrics.session_lost(&error);
                        match (registered, plaintext_hint(coordinator, &error)) {
                            (false, Some(hint)) => {
                                warn!(%error, coordinator, hint, "lost the coordinator; reconnecting");
                            }
                            _ => warn!(%error, coordinator, "lost the coordinator; reconnecting"),
                        }
                        if registered {
                            backoff.reset();
                            rotation.registered();
                        }
                    }
                }
            }
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                ctx.metrics.connect_failed();
                warn!(%error, coordinator, "cannot reach the coordinator");
            }
        }
        if !rotation.failed() {
            debug!(
                next = addresses.get(rotation.current()).map_or("", String::as_str),
                "dialing the next coordinator"
            );
            continue;
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
    fn a_failure_moves_to_the_next_address_and_only_a_failed_round_backs_off() {
        let mut rotation = Rotation::new(3);
        assert_eq!(rotation.current(), 0);
        // The first two fail: the next is dialed at once.
        assert!(!rotation.failed());
        assert_eq!(rotation.current(), 1);
        assert!(!rotation.failed());
        assert_eq!(rotation.current(), 2);
        // The third fails too: a whole round, back off, then from the first.
        assert!(rotation.failed());
        assert_eq!(rotation.current(), 0);
        // Registered on the first; its session ends: on to the second at once.
        rotation.registered();
        assert!(!rotation.failed());
        assert_eq!(rotation.current(), 1);
        assert!(!rotation.failed());
        assert!(rotation.failed(), "three in a row since registering");

        let mut one = Rotation::new(1);
        assert!(
            one.failed(),
            "one address: every failure backs off, as before"
        );
        assert_eq!(one.current(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_dials_each_address_at_once_and_waits_only_after_a_round() {
        let mut config = NodeConfig::new("");
        config.coordinators = vec!["http://a:1".into(), "http://b:1".into()];
        config.reconnect_min = Duration::from_millis(100);
        config.reconnect_max = Duration::from_secs(1);
        let (ctx, rx) = NodeCtx::new(config, HandlerRegistry::new(), None);
        let dials = Arc::new(Mutex::new(Vec::new()));
        let (record, stop) = (dials.clone(), ctx.drain.done().clone());
        let dial = move |index: usize| {
            let mut dials = record.lock().unwrap();
            dials.push((index, Instant::now()));
            if dials.len() == 6 {
                stop.cancel();
            }
            async { Err(Error::Protocol("coordinator away".into())) }
        };
        run_with(ctx, rx, dial).await.expect("stopped by the drain");
        let dials = dials.lock().unwrap();
        let order: Vec<usize> = dials.iter().map(|(index, _)| *index).collect();
        assert_eq!(order, [0, 1, 0, 1, 0, 1]);
        for pair in dials.chunks(2) {
            assert_eq!(pair[1].1, pair[0].1, "the second address at once");
        }
        for rounds in dials.windows(3).step_by(2) {
            assert!(rounds[2].1 > rounds[1].1, "a pause after each round");
        }
    }

    #[test]
    fn every_address_is_checked_before_the_first_dial() {
        let ok = dial_plans(&["http://a:1".into(), "http://b:2".into()], None, None).unwrap();
        assert_eq!(ok.len(), 2);
        let bad = dial_plans(&["http://a:1".into(), "nope".into()], None, None).unwrap_err();
        assert!(matches!(bad, Error::InvalidAddress(_)), "{bad:?}");
        let none = dial_plans(&[], None, None).unwrap_err();
        assert!(none.is_fatal(), "{none:?}");
    }

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
        let dial = move |_| {
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
        let dial = move |_| {
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
        let dial = move |_| {
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
