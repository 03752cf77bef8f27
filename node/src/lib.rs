//! `weft-node`: connects to a Weft coordinator and runs the tasks it is
//! assigned: child processes (exec), async handlers and blocking handlers.
//!
//! [`start`] returns a [`RunningNode`] at once; the node takes its
//! identity (the one in its state dir, or one it joins for with a join
//! token, or none for a coordinator that authenticates no nodes), then
//! dials, registers and reconnects in the background until it is drained
//! (SIGTERM, [`RunningNode::drain`], or the coordinator's `Drain`) or
//! killed, or until reconnecting cannot help (a malformed coordinator
//! address, a refused join token, a revoked node, a `Register` the
//! coordinator refuses for good: [`Error::is_fatal`]; its running tasks
//! are then stopped), which [`RunningNode::wait`] answers.
//!
//! Layout:
//! - `main.rs`: the `weft-node` binary: flags, tracing, signals. Nothing else.
//! - [`config`]: the node's settings, [`NodeConfig`].
//! - [`error`]: the node's error type, [`Error`].
//! - [`identity`]: the state dir (key, certificate, CA, `node.conf`):
//!   loading and atomic saving.
//! - `resolve`: which identity, coordinator and trust a node starts with.
//! - `join`: trading a join token for the node's certificate.
//! - `renewal`: the certificate while the node runs, and its renewal over
//!   the session.
//! - `reconnect`: the main loop: one session after another, reconnect
//!   backoff, the lease watchdog beside it.
//! - `session`: one session: dial, Register/Registered, the select loop
//!   (heartbeats, silence, `Draining`), the reader; the shared `NodeCtx`.
//! - `codec`: the node stream's wire format both ways: assignments,
//!   cancels and `Registered` decoded once; every message the node sends
//!   (`Register`, events, `Credits`, `Draining`, `Heartbeat`) encoded.
//! - `outbox`: event batching, the unsent buffer, credit grants, and
//!   (`outbox::redelivery`) sent results kept to send again after a
//!   reconnect (the coordinator may have crashed before recording them).
//! - `events`: the one outgoing event channel, its events (typed ids, a
//!   domain body, no protobuf), and the per-attempt [`Emitter`].
//! - `drain`: drain supervision: stop taking work, grace, cancel, stop.
//! - `lease`: how long attempts may run without word from the coordinator
//!   (plain state); `lease_watchdog`: stops them when it runs out.
//! - `executor`: takes assignments, spawns started attempts on the task
//!   tracker, reports the ones that never run, cancels and stops.
//! - `slots`: slot and credit accounting and the prefetch queue: a plain
//!   struct, no runtime.
//! - `attempt`: running one attempt: its control, stop reasons, and the
//!   `Finished` it reports.
//! - `process`: child processes in their own process group, streamed output.
//! - [`reaper`]: the process beside the node that kills its exec tasks if
//!   the node is killed outright.
//! - [`handlers`]: the registry of handlers as tower services
//!   ([`HandlerRegistry`]), and the built-ins.
//! - `metrics`: the node's Prometheus metrics; `http`: the listener that
//!   serves them (`/metrics`, `/healthz`; [`RunningNode::serve_http`]).

mod attempt;
mod codec;
pub mod config;
mod drain;
pub mod error;
mod events;
mod executor;
pub mod handlers;
mod http;
pub mod identity;
mod join;
mod lease;
mod lease_watchdog;
mod metrics;
mod outbox;
mod parents;
mod process;
pub mod reaper;
mod reconnect;
mod renewal;
mod resolve;
mod session;
mod slots;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use weft_proto::NodeId;

pub use crate::config::NodeConfig;
pub use crate::error::Error;
pub use crate::events::Emitter;
pub use crate::handlers::{HandlerError, HandlerRegistry, HandlerRequest, HandlerService};

use crate::attempt::StopReason;
use crate::events::EventRx;
use crate::identity::StateDir;
use crate::reaper::Reaper;
use crate::renewal::Credentials;
use crate::resolve::Plan;
use crate::session::NodeCtx;

/// After a drain's grace, how long the node may take to report and close
/// before `drain` gives up and kills it.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);

/// How long `kill` waits for the node's tasks to notice.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Starts a node: returns at once; the session dials and reconnects in the
/// background. Must be called inside a tokio runtime.
pub fn start(mut config: NodeConfig, mut handlers: HandlerRegistry) -> RunningNode {
    handlers.set_blocking_threads(config.blocking_threads);
    // Which identity, coordinator and trust: decided before the node's
    // shared state is made from the config. An error stops the node at
    // once (`wait` answers it).
    let plan = resolve::plan(&mut config, SystemTime::now());
    let reaper = config.reaper.as_deref().and_then(Reaper::start);
    let name = config.name.clone();
    let (ctx, events_rx) = NodeCtx::new(config, handlers, reaper);
    let tasks = ctx.tasks.clone();
    let node_id = ctx.node_id.subscribe();
    let span = info_span!("node", node_name = %name);
    let main = {
        let ctx = ctx.clone();
        tasks.spawn(
            async move {
                let result = run(ctx.clone(), events_rx, plan).await;
                // Whatever still runs (a drain that gave up waiting) dies
                // with the node: no orphans.
                ctx.executor.stop_all(&StopReason::Killed);
                result
            }
            .instrument(span),
        )
    };
    RunningNode {
        name,
        node_id,
        ctx,
        tasks,
        main: Some(main),
    }
}

/// The node's life: its identity first (loaded, or got by joining), then
/// sessions until it stops.
async fn run(ctx: Arc<NodeCtx>, events: EventRx, plan: Result<Plan, Error>) -> Result<(), Error> {
    let credentials = match plan {
        Ok(Plan::Anonymous) => Ok(None),
        Ok(Plan::Stored(stored, validity)) => {
            let store = ctx.config.state_dir.clone().map(StateDir::new);
            Credentials::new(&stored, validity, store).map(Some)
        }
        Ok(Plan::Join(token)) => match join::join(&ctx, &token).await {
            // Drained or killed before it could join.
            Ok(None) => return Ok(()),
            joined => joined,
        },
        Err(err) => Err(err),
    };
    match credentials {
        Ok(credentials) => {
            if let Some(credentials) = credentials {
                info!(
                    node_id = %credentials.node_id(),
                    coordinators = %ctx.config.coordinators_text(),
                    "connecting with the node's certificate"
                );
                let _ = ctx.credentials.set(Arc::new(credentials));
            }
            reconnect::run(ctx, events).await
        }
        Err(err) => {
            error!(error = %err, "stopping the node");
            Err(err)
        }
    }
}

/// A started node. Dropping it kills the node (and its child processes);
/// call [`RunningNode::drain`] to stop it gracefully.
pub struct RunningNode {
    name: String,
    node_id: watch::Receiver<Option<NodeId>>,
    ctx: Arc<NodeCtx>,
    tasks: TaskTracker,
    /// The main loop; it ends with `Err` when the node stopped on a fatal
    /// error.
    main: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for RunningNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningNode")
            .field("name", &self.name)
            .field("node_id", &self.node_id())
            .finish()
    }
}

impl RunningNode {
    /// The node's name, as registered.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id the coordinator gave this node's current session; `None`
    /// before it registers and while it is disconnected.
    pub fn node_id(&self) -> Option<NodeId> {
        *self.node_id.borrow()
    }

    /// Waits until the node is registered (or `timeout` passes).
    pub async fn registered(&self, timeout: Duration) -> Option<NodeId> {
        let mut node_id = self.node_id.clone();
        let registered = tokio::time::timeout(timeout, node_id.wait_for(Option::is_some)).await;
        match registered {
            Ok(Ok(id)) => *id,
            _ => None,
        }
    }

    /// Drains like SIGTERM: stop taking work (no more credits, `Draining`
    /// sent), let running attempts finish within `grace`, cancel and report
    /// the rest, close the stream, stop. If that takes more than `grace`
    /// plus a margin, the node is killed and this answers `DrainTimedOut`.
    ///
    /// `main` stays in the handle until the drain is done: a drain future
    /// dropped part-way (a second Ctrl-C) drops the handle with it, whose
    /// `Drop` then kills what still runs.
    pub async fn drain(mut self, grace: Duration) -> Result<(), Error> {
        self.ctx.request_drain(grace);
        let Some(main) = self.main.as_mut() else {
            return Ok(());
        };
        let limit = grace + DRAIN_MARGIN;
        let result = match tokio::time::timeout(limit, main).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(Error::Panicked(err.to_string())),
            Err(_) => {
                warn!(node_name = %self.name, "drain overran; killing the node");
                self.kill_now();
                Err(Error::DrainTimedOut(limit))
            }
        };
        self.main = None;
        self.tasks.close();
        let _ = tokio::time::timeout(KILL_WAIT, self.tasks.wait()).await;
        result
    }

    /// Dies abruptly, as a crash would: child process groups are SIGKILLed,
    /// handler tasks are aborted, the stream is dropped, nothing more is
    /// reported.
    pub async fn kill(mut self) {
        self.kill_now();
        if let Some(main) = self.main.take() {
            let _ = tokio::time::timeout(KILL_WAIT, main).await;
        }
        self.tasks.close();
        let _ = tokio::time::timeout(KILL_WAIT, self.tasks.wait()).await;
    }

    /// Waits until the node stops by itself: `Ok` when the coordinator
    /// drained it, the error when it stopped because reconnecting could
    /// not help (see [`Error::is_fatal`]). `Ok` again after that.
    pub async fn wait(&mut self) -> Result<(), Error> {
        let Some(main) = self.main.as_mut() else {
            return Ok(());
        };
        let result = main.await;
        self.main = None;
        match result {
            Ok(result) => result,
            Err(err) => Err(Error::Panicked(err.to_string())),
        }
    }

    /// Serves `/metrics` (OpenMetrics) and `/healthz` over plaintext HTTP
    /// on `listener` until the node is killed or drained; answers the
    /// address it serves on. No token is checked (the node has none to
    /// check against): bind it to loopback, or keep it behind a firewall.
    pub fn serve_http(&self, listener: tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        http::spawn(Arc::clone(&self.ctx), listener);
        Ok(addr)
    }

    fn kill_now(&self) {
        self.ctx.kill.cancel();
        self.ctx.executor.stop_all(&StopReason::Killed);
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        // Safety net: a dropped node must not leave child processes behind.
        if self.main.is_some() {
            self.kill_now();
        }
    }
}
