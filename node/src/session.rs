//! The node's session with the coordinator: dial, `Register`/`Registered`,
//! credits, heartbeats both ways, event batches, and reconnecting with
//! backoff when the coordinator goes away.
//!
//! One loop ([`run`]) owns the outgoing side: it dials, registers, then
//! drains the event channel into `TaskEvents` batches, grants credits after
//! `Finished` events, sends heartbeats and watches for silence. A spawned
//! reader task handles what the coordinator sends (`Assign`, `Cancel`,
//! `Drain`, `Heartbeat`); its end means the stream is gone and the loop
//! reconnects. Running attempts carry on across a reconnect and are listed
//! in the next `Register`; events produced while disconnected wait in the
//! (bounded) event channel and go out after re-registering.
//!
//! Two things make that safe. The lease (`lease.rs`): once nothing has been
//! heard from the coordinator for longer than it, the coordinator has given
//! this node's attempts to others, so a watchdog running beside the
//! sessions stops them (their `Finished` waits for the next session, where
//! the coordinator fences it), and a message read after such a gap is not
//! acted on. And redelivery (`redeliver.rs`): `Finished` events sent to a
//! coordinator that then crashed are sent again after re-registering.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Attempt, NodeId, PROTOCOL_VERSION, TaskId, pb};

use crate::config::NodeConfig;
use crate::error::Error;
use crate::events::EventRx;
use crate::executor::{Executor, StopReason};
use crate::lease::Lease;
use crate::redeliver::Redelivery;

/// Dial timeout for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the coordinator may take to answer `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat settings used when `Registered` leaves them unset.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most events in one `TaskEvents` message.
const MAX_BATCH_EVENTS: usize = 512;
/// Payload bytes after which a batch is sent (well under gRPC's 4 MiB).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// After a drain's grace, how long cancelled attempts may take to report.
const DRAIN_REPORT_WAIT: Duration = Duration::from_secs(5);
/// When closing, how long to wait for the coordinator to end its side.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the node's tasks share: config, executor and the stop signals.
pub(crate) struct NodeCtx {
    pub(crate) config: NodeConfig,
    pub(crate) executor: Executor,
    /// Shared with the executor, which asks it before starting work.
    pub(crate) lease: Arc<Lease>,
    /// Sent `Finished` events, kept to be sent again after a reconnect.
    redelivery: Mutex<Redelivery>,
    /// Events taken from the event channel whose batch could not be sent
    /// because the stream broke; the next session sends them first.
    unsent: Mutex<Vec<pb::NodeTaskEvent>>,
    pub(crate) tasks: TaskTracker,
    /// Cancelled when a drain starts (SIGTERM, `drain()`, or `Drain`).
    pub(crate) drain: CancellationToken,
    /// Cancelled when the drain is done: flush, close the stream, stop.
    pub(crate) stop: CancellationToken,
    /// Cancelled to die like a crash: drop everything, report nothing.
    pub(crate) kill: CancellationToken,
    /// The id of the current session; `None` while not registered.
    pub(crate) node_id: watch::Sender<Option<NodeId>>,
    draining: AtomicBool,
}

impl NodeCtx {
    pub(crate) fn new(
        config: NodeConfig,
        executor: Executor,
        lease: Arc<Lease>,
        tasks: TaskTracker,
        kill: CancellationToken,
    ) -> Self {
        NodeCtx {
            redelivery: Mutex::new(Redelivery::new(config.redeliver_window)),
            unsent: Mutex::new(Vec::new()),
            config,
            executor,
            lease,
            tasks,
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            kill,
            node_id: watch::Sender::new(None),
            draining: AtomicBool::new(false),
        }
    }

    /// Starts draining (once; later calls are ignored): no more credits,
    /// `Draining` to the coordinator, running attempts get `grace` to
    /// finish, the rest are cancelled and reported, then the node stops.
    pub(crate) fn request_drain(self: &Arc<Self>, grace: Duration) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(?grace, running = self.executor.running(), "draining");
        self.executor.set_draining();
        self.drain.cancel();
        let ctx = self.clone();
        self.tasks
            .spawn(async move { ctx.supervise_drain(grace).await });
    }

    async fn supervise_drain(&self, grace: Duration) {
        tokio::select! {
            () = self.kill.cancelled() => return,
            () = self.executor.wait_idle() => {}
            () = tokio::time::sleep(grace) => {
                let cancelled = self.executor.stop_all(&StopReason::Drained(grace));
                info!(cancelled, "drain grace passed; cancelled the remaining attempts");
                tokio::select! {
                    () = self.kill.cancelled() => return,
                    _ = tokio::time::timeout(DRAIN_REPORT_WAIT, self.executor.wait_idle()) => {}
                }
            }
        }
        info!("drained");
        self.stop.cancel();
    }

    /// If the lease ran out at `now`, stops every running attempt (once per
    /// lease): the coordinator has given them to other nodes.
    pub(crate) fn check_lease(&self, now: Instant) {
        if let Some(silence) = self.lease.check(now) {
            let stopped = self.executor.stop_all(&StopReason::LeaseExpired(silence));
            warn!(
                ?silence,
                stopped, "lease expired: coordinator unreachable; stopping running attempts"
            );
        }
    }

    fn redelivery(&self) -> MutexGuard<'_, Redelivery> {
        // No code panics while holding this lock; recover anyway.
        self.redelivery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn unsent(&self) -> MutexGuard<'_, Vec<pb::NodeTaskEvent>> {
        // No code panics while holding this lock; recover anyway.
        self.unsent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Checks the lease at its deadline and at least every heartbeat interval,
/// whatever the sessions are doing (dialing, waiting to redial, blocked on
/// a full stream). Runs as long as [`run_with`].
async fn watch_lease(ctx: &NodeCtx) {
    loop {
        let next = ctx.lease.next_check(Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = ctx.lease.begun() => {}
        }
        ctx.check_lease(Instant::now());
    }
}

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

/// Dials the coordinator at `url`.
pub(crate) async fn dial(url: String) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| Error::InvalidUrl {
            url: url.clone(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|source| Error::Connect { url, source })
}

/// How one session ended.
enum SessionEnd {
    /// Drained: the stream was closed on purpose. The node stops.
    Stopped,
    /// Killed: everything dropped. The node stops.
    Killed,
    /// The coordinator went away (or never answered); reconnect.
    Lost { registered: bool, error: Error },
}

/// The node's main loop: sessions and reconnects until drained or killed.
pub(crate) async fn run(ctx: Arc<NodeCtx>, events: EventRx) {
    let url = ctx.config.coordinator.clone();
    run_with(ctx, events, move || dial(url.clone())).await;
}

/// [`run`] with the dialer as a parameter, so tests can time reconnects.
pub(crate) async fn run_with<D, F>(ctx: Arc<NodeCtx>, events: EventRx, dial: D)
where
    D: FnMut() -> F,
    F: Future<Output = Result<Channel, Error>>,
{
    tokio::select! {
        () = sessions(&ctx, events, dial) => {}
        () = watch_lease(&ctx) => {}
    }
    ctx.node_id.send_replace(None);
}

/// Sessions and reconnects until drained or killed.
async fn sessions<D, F>(ctx: &Arc<NodeCtx>, mut events: EventRx, mut dial: D)
where
    D: FnMut() -> F,
    F: Future<Output = Result<Channel, Error>>,
{
    let mut backoff = Backoff::new(ctx.config.reconnect_min, ctx.config.reconnect_max);
    let mut previous: Option<NodeId> = None;
    loop {
        let dialed = tokio::select! {
            () = ctx.kill.cancelled() => break,
            () = ctx.stop.cancelled() => break,
            dialed = dial() => dialed,
        };
        match dialed {
            Ok(channel) => match session(ctx, channel, &mut events, &mut previous).await {
                SessionEnd::Stopped | SessionEnd::Killed => break,
                SessionEnd::Lost { registered, error } => {
                    ctx.node_id.send_replace(None);
                    warn!(%error, "lost the coordinator; reconnecting");
                    if registered {
                        backoff.reset();
                    }
                }
            },
            Err(error) => warn!(%error, "cannot reach the coordinator"),
        }
        let delay = backoff.next_delay();
        debug!(?delay, "waiting before reconnecting");
        tokio::select! {
            () = ctx.kill.cancelled() => break,
            () = ctx.stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Aborts the reader task when the session ends, however it ends.
struct Reader(JoinHandle<Error>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session, from `Register` to its end.
async fn session(
    ctx: &Arc<NodeCtx>,
    channel: Channel,
    events: &mut EventRx,
    previous: &mut Option<NodeId>,
) -> SessionEnd {
    let lost = |error| SessionEnd::Lost {
        registered: false,
        error,
    };
    let (out, out_rx) = mpsc::channel::<pb::NodeMessage>(64);
    // Attempts whose lease ran out are stopped before they are listed (the
    // watchdog may not have run yet after a long pause).
    let now = Instant::now();
    ctx.check_lease(now);
    // Exactly these are sent again after Registered, so every attempt listed
    // as finished here gets its result.
    let redeliver = ctx.redelivery().snapshot(now);
    let register = pb::Register {
        name: ctx.config.name.clone(),
        labels: ctx.config.labels.clone().into_iter().collect(),
        slots: ctx.config.slots.max(1),
        prefetch: ctx.config.prefetch,
        handlers: ctx.executor.handler_names(),
        protocol_version: PROTOCOL_VERSION.into(),
        running: register_running(ctx, &redeliver),
        previous_node_id: previous.map(|id| id.to_string()).unwrap_or_default(),
    };
    let running = register.running.len();
    // Queued before the stream opens, so it is the first message.
    if out
        .send(message(Outbound::Register(register)))
        .await
        .is_err()
    {
        return lost(Error::StreamClosed);
    }
    let mut client = NodeServiceClient::new(channel);
    let opened = tokio::select! {
        () = ctx.kill.cancelled() => return SessionEnd::Killed,
        opened = tokio::time::timeout(REGISTER_TIMEOUT, client.connect(ReceiverStream::new(out_rx))) => opened,
    };
    let mut inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return lost(Error::Refused(status)),
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
        Ok(Err(status)) => return lost(Error::Refused(status)),
        Err(_) => return lost(Error::Protocol("no Registered within 10s".into())),
    };
    let node_id = match registered.node_id.parse::<NodeId>() {
        Ok(id) => id,
        Err(err) => return lost(Error::Protocol(format!("Registered.node_id: {err}"))),
    };
    let interval = pb_duration(
        registered.heartbeat_interval.as_ref(),
        DEFAULT_HEARTBEAT_INTERVAL,
    );
    let silence = pb_duration(
        registered.heartbeat_timeout.as_ref(),
        DEFAULT_HEARTBEAT_TIMEOUT,
    );
    // The previous lease, if one runs, is judged before the new one starts.
    let now = Instant::now();
    ctx.check_lease(now);
    ctx.lease.begin(silence, interval, now);
    *previous = Some(node_id);
    info!(
        %node_id,
        node_name = %ctx.config.name,
        running,
        redelivered = redeliver.len(),
        lease = ?ctx.lease.length(),
        "registered"
    );
    ctx.node_id.send_replace(Some(node_id));

    let mut reader = Reader(ctx.tasks.spawn(read_loop(inbound, ctx.clone())));
    let end = connected(ctx, &out, events, &mut reader, redeliver, interval, silence).await;
    if let SessionEnd::Stopped = end {
        drop(out); // half-closes our side: the coordinator sees the end
        let _ = tokio::time::timeout(CLOSE_WAIT, &mut reader.0).await;
        info!(%node_id, "stream closed");
    }
    end
}

/// `Register.running`: the attempts this node still runs (or whose
/// `Finished` has not been sent yet, also one whose batch broke with the
/// last stream) AND the recently finished attempts
/// whose `Finished` was sent before and is sent again right after
/// `Registered`. Listing the latter makes a coordinator that restarted
/// before recording their results keep those attempts (rather than requeue
/// them) until the result arrives; one that already recorded them ignores
/// the repeat (or answers Cancel, which drops them from redelivery).
fn register_running(ctx: &NodeCtx, redeliver: &[pb::NodeTaskEvent]) -> Vec<pb::AttemptRef> {
    let mut running = ctx.executor.running_refs();
    running.extend(
        ctx.unsent()
            .iter()
            .filter(|event| matches!(event.body, Some(EventBody::Finished(_))))
            .map(attempt_ref),
    );
    running.extend(redeliver.iter().map(attempt_ref));
    running.sort_by(|a, b| a.task_id.cmp(&b.task_id).then(a.attempt.cmp(&b.attempt)));
    running.dedup();
    running
}

fn attempt_ref(event: &pb::NodeTaskEvent) -> pb::AttemptRef {
    pb::AttemptRef {
        task_id: event.task_id.clone(),
        attempt: event.attempt,
    }
}

/// The registered part of a session.
async fn connected(
    ctx: &Arc<NodeCtx>,
    out: &mpsc::Sender<pb::NodeMessage>,
    events: &mut EventRx,
    reader: &mut Reader,
    redeliver: Vec<pb::NodeTaskEvent>,
    interval: Duration,
    silence: Duration,
) -> SessionEnd {
    let lost = |error| SessionEnd::Lost {
        registered: true,
        error,
    };
    ctx.executor.reset_window();
    let mut told_draining = false;
    // Results first: listed attempts that no longer run stop counting
    // against the slots once their Finished is in; then the free slots are
    // granted.
    if let Err(error) = send_redelivery(out, redeliver).await {
        return lost(error);
    }
    // What the last stream broke on goes out before anything newer.
    let unsent = std::mem::take(&mut *ctx.unsent());
    if !unsent.is_empty() {
        debug!(
            events = unsent.len(),
            "sending events the last stream broke on"
        );
        if let Err(error) = send_events(ctx, out, unsent).await {
            return lost(error);
        }
    }
    if let Err(error) = grant(ctx, out).await {
        return lost(error);
    }
    let mut lease_expired = ctx.lease.subscribe();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let silence_check = tokio::time::sleep(silence);
    tokio::pin!(silence_check);
    loop {
        tokio::select! {
            biased;
            () = ctx.kill.cancelled() => return SessionEnd::Killed,
            () = ctx.drain.cancelled(), if !told_draining => {
                told_draining = true;
                if let Err(error) = send(out, Outbound::Draining(pb::Draining {})).await {
                    return lost(error);
                }
            }
            () = ctx.stop.cancelled() => {
                // Everything already queued goes out before the stream closes.
                while !events.is_empty() {
                    if let Err(error) = send_batch(ctx, out, events, None).await {
                        return lost(error);
                    }
                }
                return SessionEnd::Stopped;
            }
            ended = &mut reader.0 => {
                let error = ended.unwrap_or_else(|err| Error::Protocol(format!("reader task failed: {err}")));
                return lost(error);
            }
            // Ahead of the events: what the stopped attempts report waits
            // for the next session.
            () = lease_expired_signal(&mut lease_expired) => {
                let silence = ctx.lease.overdue(Instant::now()).unwrap_or_default();
                return lost(Error::LeaseExpired(silence));
            }
            first = events.recv() => {
                let Some(first) = first else { return SessionEnd::Stopped };
                match send_batch(ctx, out, events, Some(first)).await {
                    Ok(true) => {
                        if let Err(error) = grant(ctx, out).await {
                            return lost(error);
                        }
                    }
                    Ok(false) => {}
                    Err(error) => return lost(error),
                }
            }
            _ = heartbeat.tick() => {
                if let Err(error) = send(out, Outbound::Heartbeat(pb::Heartbeat {})).await {
                    return lost(error);
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

/// Resolves when the lease expires.
async fn lease_expired_signal(expired: &mut watch::Receiver<bool>) {
    if expired.wait_for(|expired| *expired).await.is_err() {
        // The lease outlives every session; never happens.
        std::future::pending::<()>().await;
    }
}

/// Sends one `TaskEvents` batch: `first` (if any) plus whatever else is
/// ready, within the batch limits. Answers whether the batch held a
/// `Finished`.
async fn send_batch(
    ctx: &NodeCtx,
    out: &mpsc::Sender<pb::NodeMessage>,
    events: &mut EventRx,
    first: Option<pb::NodeTaskEvent>,
) -> Result<bool, Error> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut next = first.or_else(|| events.try_recv().ok());
    while let Some(event) = next {
        bytes += event_size(&event);
        batch.push(event);
        if batch.len() >= MAX_BATCH_EVENTS || bytes >= MAX_BATCH_BYTES {
            break;
        }
        next = events.try_recv().ok();
    }
    if batch.is_empty() {
        return Ok(false);
    }
    send_events(ctx, out, batch).await
}

/// Sends `batch` as `TaskEvents` messages within the batch limits. Slots
/// of finished attempts are released here, so the grant that follows comes
/// after their `Finished`; sent `Finished` events are kept for
/// redelivery. If the stream is gone, the events not sent are kept for the
/// next session (which lists their attempts in `Register`), so a result is
/// never dropped between the channel and a broken stream. Answers whether
/// the batch held a `Finished`.
async fn send_events(
    ctx: &NodeCtx,
    out: &mpsc::Sender<pb::NodeMessage>,
    batch: Vec<pb::NodeTaskEvent>,
) -> Result<bool, Error> {
    let mut any_finished = false;
    let mut rest = batch.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk = next_chunk(&mut rest);
        let mut sent_finished = Vec::new();
        for event in &chunk {
            if let Some(EventBody::Finished(_)) = event.body {
                any_finished = true;
                if let Ok(task_id) = event.task_id.parse::<TaskId>() {
                    let key = (task_id, Attempt(event.attempt));
                    ctx.executor.release(key);
                    sent_finished.push((key, event.clone()));
                }
            }
        }
        let message = message(Outbound::Events(pb::TaskEvents { events: chunk }));
        if let Err(mpsc::error::SendError(unsent)) = out.send(message).await {
            let mut kept = ctx.unsent();
            if let Some(Outbound::Events(pb::TaskEvents { events })) = unsent.body {
                kept.extend(events);
            }
            kept.extend(rest);
            return Err(Error::StreamClosed);
        }
        if !sent_finished.is_empty() {
            let now = Instant::now();
            let mut redelivery = ctx.redelivery();
            for (key, event) in sent_finished {
                redelivery.record(key, event, now);
            }
        }
    }
    Ok(any_finished)
}

/// Sends again the `Finished` events of an earlier session: one batch, or
/// as few as the batch limits allow.
async fn send_redelivery(
    out: &mpsc::Sender<pb::NodeMessage>,
    redeliver: Vec<pb::NodeTaskEvent>,
) -> Result<(), Error> {
    if redeliver.is_empty() {
        return Ok(());
    }
    debug!(events = redeliver.len(), "sending finished events again");
    let mut rest = redeliver.into_iter().peekable();
    while rest.peek().is_some() {
        let events = next_chunk(&mut rest);
        send(out, Outbound::Events(pb::TaskEvents { events })).await?;
    }
    Ok(())
}

/// The next `TaskEvents` worth of `rest`: at least one event, then as many
/// as the batch limits allow.
fn next_chunk(
    rest: &mut std::iter::Peekable<std::vec::IntoIter<pb::NodeTaskEvent>>,
) -> Vec<pb::NodeTaskEvent> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    while let Some(event) = rest.next_if(|event| {
        chunk.is_empty()
            || (chunk.len() < MAX_BATCH_EVENTS && bytes + event_size(event) <= MAX_BATCH_BYTES)
    }) {
        bytes += event_size(&event);
        chunk.push(event);
    }
    chunk
}

fn event_size(event: &pb::NodeTaskEvent) -> usize {
    match &event.body {
        Some(EventBody::Output(chunk)) => chunk.data.len(),
        Some(EventBody::Finished(done)) => done.output.len() + done.error.len(),
        Some(EventBody::Progress(progress)) => progress.message.len(),
        Some(EventBody::Started(_)) | None => 0,
    }
}

/// Grants the free slots (none while draining).
async fn grant(ctx: &NodeCtx, out: &mpsc::Sender<pb::NodeMessage>) -> Result<(), Error> {
    match ctx.executor.take_grant() {
        Some(grant) => {
            debug!(grant, "granting credits");
            send(out, Outbound::Credits(pb::Credits { grant })).await
        }
        None => Ok(()),
    }
}

async fn send(out: &mpsc::Sender<pb::NodeMessage>, body: Outbound) -> Result<(), Error> {
    out.send(message(body))
        .await
        .map_err(|_| Error::StreamClosed)
}

fn message(body: Outbound) -> pb::NodeMessage {
    pb::NodeMessage { body: Some(body) }
}

fn pb_duration(value: Option<&prost_types::Duration>, default: Duration) -> Duration {
    value
        .and_then(|d| weft_proto::convert::duration_from_pb("heartbeat", d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

/// Handles what the coordinator sends, until the stream ends; answers why.
async fn read_loop(mut inbound: Streaming<pb::CoordinatorMessage>, ctx: Arc<NodeCtx>) -> Error {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Error::StreamClosed,
            Err(status) => return Error::Refused(status),
        };
        if let Err(error) = handle(&ctx, message, Instant::now()) {
            return error;
        }
    }
}

/// Acts on one message from the coordinator, read at `now`.
///
/// A message read after the lease ran out (the process was paused, or the
/// network stalled, and this is what was buffered meanwhile) is not acted
/// on: it was sent before the coordinator gave up on this node. The
/// attempts are stopped first and the session ends (`Err`).
fn handle(ctx: &Arc<NodeCtx>, message: pb::CoordinatorMessage, now: Instant) -> Result<(), Error> {
    ctx.check_lease(now);
    ctx.lease.heard(now).map_err(Error::LeaseExpired)?;
    match message.body {
        Some(Inbound::Assign(assign)) => {
            debug!(tasks = assign.tasks.len(), "assigned");
            for assignment in assign.tasks {
                ctx.executor.assign(assignment);
            }
        }
        Some(Inbound::Cancel(cancel)) => match cancel.task_id.parse::<TaskId>() {
            Ok(task_id) => {
                let key = (task_id, Attempt(cancel.attempt));
                // Stale on the coordinator: never send its result again.
                ctx.redelivery().forget(key);
                ctx.executor.cancel(key, cancel.reason);
            }
            Err(err) => warn!(error = %err, "Cancel with an invalid task id; ignored"),
        },
        Some(Inbound::Drain(drain)) => {
            let grace = drain
                .grace
                .as_ref()
                .and_then(|d| weft_proto::convert::duration_from_pb("grace", d).ok())
                .unwrap_or(ctx.config.drain_grace);
            info!(?grace, "coordinator asked this node to drain");
            ctx.request_drain(grace);
        }
        Some(Inbound::Heartbeat(_)) => {}
        Some(Inbound::Registered(_)) => warn!("second Registered on one session; ignored"),
        None => debug!("coordinator message of an unknown kind; ignored"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use weft_proto::{Outcome, TaskSpec};

    use super::*;
    use crate::events;
    use crate::handlers::HandlerRegistry;

    fn node_ctx(config: NodeConfig, handlers: HandlerRegistry) -> (Arc<NodeCtx>, EventRx) {
        let (tx, rx) = events::channel();
        let tasks = TaskTracker::new();
        let kill = CancellationToken::new();
        let lease = Arc::new(Lease::new(config.lease));
        let (slots, prefetch) = (config.slots, config.prefetch);
        let executor = Executor::new(
            handlers,
            tx,
            tasks.clone(),
            kill.clone(),
            lease.clone(),
            slots,
            prefetch,
        );
        (
            Arc::new(NodeCtx::new(config, executor, lease, tasks, kill)),
            rx,
        )
    }

    fn assignment(spec: TaskSpec) -> (pb::Assignment, TaskId) {
        let task_id = TaskId::new();
        let wire = pb::Assignment {
            task_id: task_id.to_string(),
            attempt: 1,
            spec: Some(spec.into()),
        };
        (wire, task_id)
    }

    fn assign(assignments: Vec<pb::Assignment>) -> pb::CoordinatorMessage {
        pb::CoordinatorMessage {
            body: Some(Inbound::Assign(pb::Assign { tasks: assignments })),
        }
    }

    /// The `Finished` of `task_id`, skipping other events, and when it came.
    async fn finished_of(rx: &mut EventRx, task_id: TaskId) -> (pb::Finished, Instant) {
        loop {
            let event = rx.recv().await.expect("event channel open");
            if let (true, Some(EventBody::Finished(done))) =
                (event.task_id == task_id.to_string(), event.body)
            {
                return (done, Instant::now());
            }
        }
    }

    fn assert_lease_expired(done: &pb::Finished) {
        assert_eq!(done.outcome, i32::from(Outcome::Cancelled), "{done:?}");
        assert!(
            done.error
                .starts_with("lease expired: coordinator unreachable for ")
                && done
                    .error
                    .ends_with("; the coordinator has reassigned this attempt"),
            "{}",
            done.error
        );
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_stops_attempts_when_the_lease_runs_out_and_not_before() {
        let mut config = NodeConfig::new("http://unused");
        config.slots = 2;
        let (ctx, mut rx) = node_ctx(config, HandlerRegistry::with_builtins());
        // The watchdog runs from the start, idle until the first lease.
        let watchdog = {
            let ctx = ctx.clone();
            tokio::spawn(async move { watch_lease(&ctx).await })
        };
        tokio::task::yield_now().await;
        tokio::time::advance(SECOND / 10).await;
        let registered = Instant::now();
        ctx.lease.begin(5 * SECOND, SECOND, registered);
        let (wire, task_id) = assignment(TaskSpec::call("sleep", "1h"));
        handle(&ctx, assign(vec![wire]), registered).unwrap();
        // Heard from the coordinator 2 s in; then nothing more.
        tokio::time::advance(2 * SECOND).await;
        handle(&ctx, heartbeat(), Instant::now()).unwrap();
        let (done, at) = finished_of(&mut rx, task_id).await;
        assert_lease_expired(&done);
        assert_eq!(at - registered, 7 * SECOND, "5 s after the last heartbeat");
        assert!(done.error.contains("for 5.0s"), "{}", done.error);
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn messages_read_after_a_gap_past_the_lease_are_not_acted_on() {
        let mut config = NodeConfig::new("http://unused");
        config.slots = 2;
        let (ctx, mut rx) = node_ctx(config, HandlerRegistry::with_builtins());
        ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
        let (wire, running) = assignment(TaskSpec::call("sleep", "1h"));
        handle(&ctx, assign(vec![wire]), Instant::now()).unwrap();
        // The process was stopped for a minute (no timer ran); the first thing
        // it does on resume is read an Assign buffered meanwhile.
        tokio::time::advance(60 * SECOND).await;
        let (late, late_id) = assignment(TaskSpec::call("sleep", "1h"));
        let err = handle(&ctx, assign(vec![late]), Instant::now()).unwrap_err();
        assert!(
            matches!(err, Error::LeaseExpired(gap) if gap == 60 * SECOND),
            "{err}"
        );
        let (done, _) = finished_of(&mut rx, running).await;
        assert_lease_expired(&done);
        assert!(done.error.contains("for 60.0s"), "{}", done.error);
        ctx.executor.release((running, Attempt::FIRST));
        assert_eq!(ctx.executor.running(), 0, "the late Assign was not started");
        while let Ok(event) = rx.try_recv() {
            assert_ne!(event.task_id, late_id.to_string(), "{event:?}");
        }
        // Still expired until the next Registered, whatever arrives.
        assert!(handle(&ctx, heartbeat(), Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_within_the_lease_renews_it() {
        let (ctx, _rx) = node_ctx(NodeConfig::new("http://unused"), HandlerRegistry::new());
        ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
        for _ in 0..10 {
            tokio::time::advance(4 * SECOND).await;
            handle(&ctx, heartbeat(), Instant::now()).unwrap();
        }
        assert_eq!(ctx.lease.overdue(Instant::now()), None);
    }

    fn heartbeat() -> pb::CoordinatorMessage {
        pb::CoordinatorMessage {
            body: Some(Inbound::Heartbeat(pb::Heartbeat {})),
        }
    }

    fn aref(task_id: TaskId, attempt: u32) -> pb::AttemptRef {
        pb::AttemptRef {
            task_id: task_id.to_string(),
            attempt,
        }
    }

    fn finished_event(task_id: TaskId) -> pb::NodeTaskEvent {
        pb::NodeTaskEvent {
            task_id: task_id.to_string(),
            attempt: 1,
            body: Some(EventBody::Finished(pb::Finished::default())),
        }
    }

    /// A node with one `sleep 1h` attempt running; answers its task id.
    fn running_one(ctx: &Arc<NodeCtx>) -> TaskId {
        ctx.lease.begin(5 * SECOND, SECOND, Instant::now());
        let (wire, task_id) = assignment(TaskSpec::call("sleep", "1h"));
        handle(ctx, assign(vec![wire]), Instant::now()).unwrap();
        task_id
    }

    #[tokio::test(start_paused = true)]
    async fn register_lists_running_and_redelivered_attempts_once_each() {
        let (ctx, _rx) = node_ctx(
            NodeConfig::new("http://unused"),
            HandlerRegistry::with_builtins(),
        );
        let running = running_one(&ctx);
        let finished = TaskId::new();
        let redeliver = [finished_event(running), finished_event(finished)];
        let listed = register_running(&ctx, &redeliver);
        let mut expected = vec![aref(running, 1), aref(finished, 1)];
        expected.sort_by(|x, y| x.task_id.cmp(&y.task_id));
        assert_eq!(listed, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_the_broken_stream_did_not_take_is_listed_and_sent_in_the_next_session() {
        let (ctx, _rx) = node_ctx(
            NodeConfig::new("http://unused"),
            HandlerRegistry::with_builtins(),
        );
        let task_id = running_one(&ctx);
        let done = finished_event(task_id);

        // The stream is gone by the time the batch holding the result is
        // sent: the slot is free, and the result waits for the next session.
        let (out, out_rx) = mpsc::channel(4);
        drop(out_rx);
        let sent = send_events(&ctx, &out, vec![done.clone()]).await;
        assert!(matches!(sent, Err(Error::StreamClosed)), "{sent:?}");
        assert!(
            ctx.executor.running_refs().is_empty(),
            "the slot is released"
        );
        assert_eq!(register_running(&ctx, &[]), vec![aref(task_id, 1)]);

        // The next session sends it and keeps it for redelivery.
        let (out, mut out_rx) = mpsc::channel(4);
        let unsent = std::mem::take(&mut *ctx.unsent());
        assert!(
            send_events(&ctx, &out, unsent).await.unwrap(),
            "held a Finished"
        );
        let Some(Outbound::Events(batch)) = out_rx.recv().await.unwrap().body else {
            panic!("expected a TaskEvents message");
        };
        assert_eq!(batch.events, vec![done]);
        assert!(ctx.unsent().is_empty());
        assert_eq!(ctx.redelivery().snapshot(Instant::now()).len(), 1);
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
        let (ctx, rx) = node_ctx(config, HandlerRegistry::new());
        let dials = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (record, counter, stop) = (dials.clone(), count.clone(), ctx.stop.clone());
        let dial = move || {
            record.lock().unwrap().push(Instant::now());
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == 7 {
                stop.cancel();
            }
            async { Err(Error::Protocol("coordinator away".into())) }
        };
        run_with(ctx, rx, dial).await;
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
}
