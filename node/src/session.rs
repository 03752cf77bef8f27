//! One session with the coordinator: dial, `Register`/`Registered`, then
//! the select loop that owns the outgoing side, and the reader. Also the
//! [`NodeCtx`] the node's tasks share.
//!
//! The select loop drains the event channel into batches (through the
//! outbox, `outbox/`), grants credits after `Finished` events, sends
//! heartbeats, `Draining` and, when due, `RenewCertificate` (every message
//! encoded by `codec.rs`; the answer is handed to `renewal.rs`), and
//! watches for silence and for the lease's
//! expiry. A spawned reader task handles what the coordinator sends
//! (`Assign`, `Cancel`, `Drain`, `Heartbeat`), decoded once here through
//! `codec.rs`; its end means the stream is gone and the session ends.
//! Running attempts carry on across a reconnect (`reconnect.rs` dials
//! again) and are listed in the next `Register`; events produced while
//! disconnected wait in the (bounded) event channel and go out after
//! re-registering.
//!
//! Two things make that safe. The lease (`lease.rs`, watched by
//! `lease_watchdog.rs`): a message read after the lease ran out is not
//! acted on, and the session ends. And redelivery (`outbox/redelivery.rs`,
//! `outbox/resend.rs`): `Finished` events, and the `Started` and output
//! chunks of listed attempts, sent to a coordinator that then crashed
//! are sent again after re-registering. This module decides nothing about slots or
//! attempts: it forwards to the executor.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::{NodeId, limits, pb};

use crate::codec;
use crate::config::NodeConfig;
use crate::drain::Drain;
use crate::error::Error;
use crate::events::{self, EventRx};
use crate::executor::Executor;
use crate::handlers::HandlerRegistry;
use crate::lease::Lease;
use crate::lease_watchdog;
use crate::metrics::NodeMetrics;
use crate::outbox::{self, Out, Outbox};
use crate::reaper::Reaper;
use crate::renewal::Credentials;

/// Dial timeout for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the coordinator may take to answer `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// When closing, how long to wait for the coordinator to end its side.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the node's tasks share: config, executor, outbox and the stop
/// signals.
pub(crate) struct NodeCtx {
    pub(crate) config: NodeConfig,
    pub(crate) executor: Executor,
    /// Shared with the executor, which asks it before starting work.
    pub(crate) lease: Arc<Lease>,
    /// What outlives a session on the way out (unsent, redelivery).
    pub(crate) outbox: Outbox,
    pub(crate) tasks: TaskTracker,
    /// Started by SIGTERM, `drain()`, or `Drain`; done when the node stops.
    pub(crate) drain: Drain,
    /// Cancelled to die like a crash: drop everything, report nothing.
    pub(crate) kill: CancellationToken,
    /// The id of the current session; `None` while not registered.
    pub(crate) node_id: watch::Sender<Option<NodeId>>,
    /// The node's certificate, once it has one (loaded at start, or got
    /// by joining); unset for a node without an identity.
    pub(crate) credentials: OnceLock<Arc<Credentials>>,
    /// What `/metrics` shows (see `metrics.rs`).
    pub(crate) metrics: Arc<NodeMetrics>,
}

impl NodeCtx {
    /// A node's shared state, and the receiving end of its event channel
    /// (for the main loop). `reaper`, if any, is told about every exec
    /// task's process group.
    pub(crate) fn new(
        config: NodeConfig,
        handlers: HandlerRegistry,
        reaper: Option<Reaper>,
    ) -> (Arc<Self>, EventRx) {
        let tasks = TaskTracker::new();
        let kill = CancellationToken::new();
        let (events_tx, events_rx) = events::channel();
        let lease = Arc::new(Lease::new(config.lease));
        let metrics = Arc::new(NodeMetrics::default());
        let executor = Executor::new(
            handlers,
            events_tx,
            tasks.clone(),
            kill.clone(),
            lease.clone(),
            config.slots,
            config.prefetch,
        )
        .with_reaper(reaper)
        .with_exec(config.exec.clone())
        .with_metrics(Arc::clone(&metrics));
        let ctx = NodeCtx {
            outbox: Outbox::new(executor.clone(), config.redeliver_window),
            config,
            executor,
            lease,
            tasks,
            drain: Drain::default(),
            kill,
            node_id: watch::Sender::new(None),
            credentials: OnceLock::new(),
            metrics,
        };
        (Arc::new(ctx), events_rx)
    }

    /// Starts draining (once; see [`Drain::request`]).
    pub(crate) fn request_drain(&self, grace: Duration) {
        self.drain
            .request(grace, &self.executor, &self.tasks, &self.kill);
    }

    /// Stops every running attempt if the lease ran out at `now`.
    fn check_lease(&self, now: Instant) {
        lease_watchdog::check(&self.lease, &self.executor, now);
    }
}

/// Dials the coordinator at `url` (as [`weft_proto::tls::dial_plan`]
/// made it: the URL tonic dials and, for TLS, the connector).
pub(crate) async fn dial(
    url: String,
    connector: Option<weft_proto::tls::TlsConnector>,
) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| Error::InvalidUrl {
            url: url.clone(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let plaintext = connector.is_none();
    // With TLS tonic dials `http://` over the connector; say what was
    // really dialed.
    let shown = if plaintext {
        url.clone()
    } else {
        url.replacen("http://", "https://", 1)
    };
    let result = match connector {
        Some(connector) => endpoint.connect_with_connector(connector).await,
        None => endpoint.connect().await,
    };
    result.map_err(|source| {
        let mut cause: &(dyn std::error::Error + 'static) = &source;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let mut reason = cause.to_string();
        if plaintext
            && !reason.contains("refused")
            && let Ok(address) = weft_proto::CoordinatorAddr::parse(&url)
        {
            reason.push_str("; ");
            reason.push_str(&weft_proto::tls::plaintext_hint(&address));
        }
        Error::Connect {
            url: shown,
            reason,
            source,
        }
    })
}

/// How one session ended.
pub(crate) enum SessionEnd {
    /// Drained: the stream was closed on purpose. The node stops.
    Stopped,
    /// Killed: everything dropped. The node stops.
    Killed,
    /// The coordinator went away (or never answered); reconnect.
    Lost { registered: bool, error: Error },
    /// The coordinator refused the node for good (see
    /// [`Error::is_fatal`]). The node stops.
    Fatal(Error),
}

/// Aborts the reader task when the session ends, however it ends.
struct Reader(JoinHandle<Error>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session, from `Register` to its end, over `channel` to
/// `coordinator` (its address, for the logs). `previous` is the node id of
/// the last session (sent so the coordinator keeps it), and becomes this
/// one's.
pub(crate) async fn run(
    ctx: &Arc<NodeCtx>,
    channel: Channel,
    coordinator: &str,
    events: &mut EventRx,
    previous: &mut Option<NodeId>,
) -> SessionEnd {
    let lost = |error| SessionEnd::Lost {
        registered: false,
        error,
    };
    let refused = |status| match Error::register_refused(status) {
        error if error.is_fatal() => SessionEnd::Fatal(error),
        error => lost(error),
    };
    let (out, out_rx) = mpsc::channel::<pb::NodeMessage>(64);
    // Attempts whose lease ran out are stopped before they are listed (the
    // watchdog may not have run yet after a long pause).
    let now = Instant::now();
    ctx.check_lease(now);
    // Exactly these are sent again after Registered, so every attempt listed
    // as finished here gets its result.
    let redeliver = ctx.outbox.redeliverable(now);
    let listed = ctx.outbox.listed(&redeliver);
    // The Started and output those attempts sent on earlier streams, sent
    // again too.
    let resend = ctx.outbox.resendable(&listed, now);
    let running = listed.len();
    let register = codec::register(
        &ctx.config,
        ctx.executor.handler_names(),
        &listed,
        *previous,
    );
    // Queued before the stream opens, so it is the first message.
    if outbox::send(&out, register).await.is_err() {
        return lost(Error::StreamClosed);
    }
    // Whatever --max-message-size the coordinator runs with, it sends
    // nothing larger than the ceiling it may be set to.
    let mut client = NodeServiceClient::new(channel)
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES_CEILING);
    let opened = tokio::select! {
        () = ctx.kill.cancelled() => return SessionEnd::Killed,
        opened = tokio::time::timeout(REGISTER_TIMEOUT, client.connect(ReceiverStream::new(out_rx))) => opened,
    };
    let mut inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return refused(status),
        Err(_) => return lost(Error::Protocol("no answer to Register".into())),
    };
    let first = tokio::select! {
        () = ctx.kill.cancelled() => return SessionEnd::Killed,
        first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()) => first,
    };
    let registered = match first {
        Ok(Ok(Some(pb::CoordinatorMessage {
            body: Some(Inbound::Registered(registered)),
        }))) => registered,
        Ok(Ok(Some(other))) => {
            return lost(Error::Protocol(format!(
                "first message was not Registered: {other:?}"
            )));
        }
        Ok(Ok(None)) => return lost(Error::StreamClosed),
        Ok(Err(status)) => return refused(status),
        Err(_) => {
            return lost(Error::Protocol(format!(
                "no Registered within {REGISTER_TIMEOUT:?}"
            )));
        }
    };
    let codec::Registered {
        node_id,
        heartbeat_interval: interval,
        heartbeat_timeout: silence,
        max_message_size,
    } = match codec::registered(registered) {
        Ok(terms) => terms,
        Err(error) => return lost(error),
    };
    ctx.outbox.set_message_limit(max_message_size);
    // The previous lease, if one runs, is judged before the new one starts.
    let now = Instant::now();
    ctx.check_lease(now);
    if let Err(error) = ctx.lease.fits(interval) {
        return SessionEnd::Fatal(error);
    }
    ctx.lease.begin(silence, interval, now);
    *previous = Some(node_id);
    info!(
        %node_id,
        node_name = %ctx.config.name,
        coordinator,
        running,
        redelivered = redeliver.len(),
        output_resent = resend.len(),
        lease = %ctx.lease.describe(),
        "registered"
    );
    ctx.node_id.send_replace(Some(node_id));

    let mut reader = Reader(ctx.tasks.spawn(read_loop(inbound, ctx.clone())));
    let again = Again { resend, redeliver };
    let end = connected(ctx, &out, events, &mut reader, again, interval, silence).await;
    if let SessionEnd::Stopped = end {
        drop(out); // half-closes our side: the coordinator sees the end
        let _ = tokio::time::timeout(CLOSE_WAIT, &mut reader.0).await;
        info!(%node_id, "stream closed");
    }
    end
}

/// What a new session sends again first (see [`Outbox::resume`]).
struct Again {
    /// Output chunks sent on earlier streams.
    resend: Vec<events::Event>,
    /// `Finished` events within the redelivery window.
    redeliver: Vec<events::Event>,
}

/// The registered part of a session.
async fn connected(
    ctx: &Arc<NodeCtx>,
    out: &Out,
    events: &mut EventRx,
    reader: &mut Reader,
    again: Again,
    interval: Duration,
    silence: Duration,
) -> SessionEnd {
    let lost = |error| SessionEnd::Lost {
        registered: true,
        error,
    };
    ctx.executor.reset_window();
    let mut told_draining = false;
    // Kept output, results, then what the last stream broke on, then credits.
    if let Err(error) = ctx.outbox.resume(out, again.resend, again.redeliver).await {
        return lost(error);
    }
    let mut lease_expired = ctx.lease.subscribe();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let silence_check = tokio::time::sleep(silence);
    tokio::pin!(silence_check);
    let (drain_started, stop) = (ctx.drain.started(), ctx.drain.done());
    // Made once, not at each turn of the loop: the loop turns for every
    // batch of events, and a future made anew registers with its token or
    // channel when first polled and unregisters when dropped, each under
    // a lock.
    let killed = ctx.kill.cancelled();
    let draining = drain_started.cancelled();
    let stopped = stop.cancelled();
    let lease_lost = lease_expired_signal(&mut lease_expired);
    tokio::pin!(killed, draining, stopped, lease_lost);
    // Renewal requests go out on this session when due; the answer comes
    // back through the reader (`handle`).
    let credentials = ctx.credentials.get().cloned();
    let renew = tokio::time::sleep_until(renewal_deadline(credentials.as_deref()));
    tokio::pin!(renew);
    loop {
        tokio::select! {
            biased;
            () = &mut killed => return SessionEnd::Killed,
            () = &mut draining, if !told_draining => {
                told_draining = true;
                if let Err(error) = outbox::send(out, codec::draining()).await {
                    return lost(error);
                }
            }
            () = &mut stopped => {
                // Everything already queued goes out before the stream closes.
                while !events.is_empty() {
                    if let Err(error) = ctx.outbox.send_batch(out, events, None).await {
                        return lost(error);
                    }
                }
                return SessionEnd::Stopped;
            }
            ended = &mut reader.0 => {
                let error = ended.unwrap_or_else(|err| Error::Protocol(format!("reader task failed: {err}")));
                if error.is_fatal() {
                    return SessionEnd::Fatal(error);
                }
                return lost(error);
            }
            // Ahead of the events: what the stopped attempts report waits
            // for the next session.
            () = &mut lease_lost => {
                let silence = ctx.lease.overdue(Instant::now()).unwrap_or_default();
                return lost(Error::LeaseExpired(silence));
            }
            first = events.recv() => {
                let Some(first) = first else { return SessionEnd::Stopped };
                match ctx.outbox.send_batch(out, events, Some(first)).await {
                    Ok(true) => {
                        if let Err(error) = ctx.outbox.grant(out).await {
                            return lost(error);
                        }
                    }
                    Ok(false) => {}
                    Err(error) => return lost(error),
                }
            }
            _ = heartbeat.tick() => {
                if let Err(error) = outbox::send(out, codec::heartbeat()).await {
                    return lost(error);
                }
            }
            () = &mut renew, if credentials.is_some() => {
                if let Some(credentials) = &credentials {
                    match credentials.request(SystemTime::now()) {
                        Some(Ok(csr)) => {
                            debug!("asking to renew the node's certificate");
                            if let Err(error) = outbox::send(out, codec::renew_certificate(csr)).await {
                                return lost(error);
                            }
                        }
                        Some(Err(error)) => {
                            warn!(%error, "renewing the node's certificate failed; trying again");
                        }
                        None => {}
                    }
                    renew.as_mut().reset(renewal_deadline(Some(credentials)));
                }
            }
            () = &mut silence_check => {
                let heard = ctx.lease.last_heard().unwrap_or_else(Instant::now);
                if heard.elapsed() >= silence {
                    return lost(Error::HeartbeatTimeout(silence));
                }
                silence_check.as_mut().reset(heard + silence);
            }
        }
    }
}

/// When the session should next ask `credentials` for a renewal request
/// (far away for a node without a certificate).
fn renewal_deadline(credentials: Option<&Credentials>) -> Instant {
    let wait = match credentials {
        Some(credentials) => credentials
            .next_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
        None => Duration::from_secs(24 * 3600),
    };
    Instant::now() + wait
}

/// Resolves when the lease expires.
async fn lease_expired_signal(expired: &mut watch::Receiver<bool>) {
    if expired.wait_for(|expired| *expired).await.is_err() {
        // The lease outlives every session; never happens.
        std::future::pending::<()>().await;
    }
}

/// Handles what the coordinator sends, until the stream ends; answers why.
///
/// Awaits nothing but the next message: [`handle`] acts at once (the
/// executor queues or refuses work, never waits), so HTTP/2 never holds the
/// coordinator's small frames (heartbeats, cancels) unread behind slow
/// work; it fails the whole connection when too many pile up.
async fn read_loop(mut inbound: Streaming<pb::CoordinatorMessage>, ctx: Arc<NodeCtx>) -> Error {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Error::StreamClosed,
            Err(status) => return Error::stream_ended(status),
        };
        if let Err(error) = handle(&ctx, message, Instant::now()) {
            return error;
        }
    }
}

/// Acts on one message from the coordinator, read at `now`: decoded here,
/// then forwarded.
///
/// A message read after the lease ran out (the process was paused, or the
/// network stalled, and this is what was buffered meanwhile) is not acted
/// on: it was sent before the coordinator gave up on this node. The
/// attempts are stopped first and the session ends (`Err`).
fn handle(ctx: &NodeCtx, message: pb::CoordinatorMessage, now: Instant) -> Result<(), Error> {
    ctx.check_lease(now);
    ctx.lease.heard(now).map_err(Error::LeaseExpired)?;
    match message.body {
        Some(Inbound::Assign(assign)) => {
            debug!(tasks = assign.tasks.len(), "assigned");
            for wire in assign.tasks {
                match codec::assignment(wire) {
                    Ok(assignment) => ctx.executor.assign(assignment),
                    Err(err) => warn!(error = %err, "assignment with an invalid task id; ignored"),
                }
            }
        }
        Some(Inbound::Cancel(cancel)) => match codec::cancel(cancel) {
            Ok((key, reason)) => {
                // Stale on the coordinator: never send its output or result
                // again. An attempt still held here has sent no result (or
                // one just now, which the coordinator ignores if it is sent
                // again after a reconnect, as it does any stale result);
                // only one that ended here before the Cancel has one kept.
                ctx.outbox.forget(key, !ctx.executor.holds(key));
                ctx.executor.cancel(key, reason);
            }
            Err(err) => warn!(error = %err, "Cancel with an invalid task id; ignored"),
        },
        Some(Inbound::Drain(drain)) => {
            let grace = codec::drain_grace(&drain).unwrap_or(ctx.config.drain_grace);
            info!(?grace, "coordinator asked this node to drain");
            ctx.request_drain(grace);
        }
        Some(Inbound::Heartbeat(_)) => {}
        Some(Inbound::Certificate(answer)) => match ctx.credentials.get() {
            Some(credentials) => credentials.answer(codec::certificate(answer), SystemTime::now()),
            None => debug!("certificate renewal answer; not asked for"),
        },
        Some(Inbound::Registered(_)) => warn!("second Registered on one session; ignored"),
        None => debug!("coordinator message of an unknown kind; ignored"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
