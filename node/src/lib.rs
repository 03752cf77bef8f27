//! `weft-node`: connects to a Weft coordinator and runs the tasks it is
//! assigned: child processes (exec), async handlers and blocking handlers.
//!
//! [`start`] returns a [`RunningNode`] at once; the node dials, registers
//! and reconnects in the background until it is drained (SIGTERM,
//! [`RunningNode::drain`], or the coordinator's `Drain`) or killed.
//!
//! Layout:
//! - `main.rs`: the `weft-node` binary: flags, tracing, signals. Nothing else.
//! - [`config`]: the node's settings, [`NodeConfig`].
//! - [`error`]: the node's error type, [`Error`].
//! - `session`: dial, Register/Registered, heartbeats, credits, event
//!   batches, reconnect with backoff, drain supervision.
//! - `executor`: runs assignments: task tracker, per-attempt cancellation
//!   tokens, slot accounting, timeouts.
//! - `process`: child processes in their own process group, streamed output.
//! - [`reaper`]: the process beside the node that kills its exec tasks if
//!   the node is killed outright.
//! - `events`: the one outgoing event channel and the per-attempt [`Emitter`].
//! - `lease`: how long attempts may run without word from the coordinator.
//! - `redeliver`: sent `Finished` events kept to send again after a
//!   reconnect (the coordinator may have crashed before recording them).
//! - [`handlers`]: the registry of handlers as tower services
//!   ([`HandlerRegistry`]), and the built-ins.

pub mod config;
pub mod error;
mod events;
mod process;
mod executor;
pub mod handlers;
mod lease;
pub mod reaper;
mod redeliver;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use weft_proto::NodeId;

pub use crate::config::NodeConfig;
pub use crate::error::Error;
pub use crate::events::Emitter;
pub use crate::handlers::{HandlerError, HandlerRegistry, HandlerRequest, HandlerService};

use crate::executor::{Executor, StopReason};
use crate::lease::Lease;
use crate::reaper::Reaper;
use crate::session::NodeCtx;

/// After a drain's grace, how long the node may take to report and close
/// before `drain` gives up and kills it.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);

/// How long `kill` waits for the node's tasks to notice.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Starts a node: returns at once; the session dials and reconnects in the
/// background. Must be called inside a tokio runtime.
pub fn start(config: NodeConfig, mut handlers: HandlerRegistry) -> RunningNode {
    handlers.set_blocking_threads(config.blocking_threads);
    let tasks = TaskTracker::new();
    let kill = CancellationToken::new();
    let (events_tx, events_rx) = events::channel();
    let lease = Arc::new(Lease::new(config.lease));
    let executor = Executor::new(
        handlers,
        events_tx,
        tasks.clone(),
        kill.clone(),
        lease.clone(),
        config.slots,
        config.prefetch,
    )
    .with_reaper(config.reaper.as_deref().and_then(Reaper::start));
    let name = config.name.clone();
    let ctx = Arc::new(NodeCtx::new(config, executor, lease, tasks.clone(), kill));
    let node_id = ctx.node_id.subscribe();
    let span = info_span!("node", node_name = %name);
    let main = {
        let ctx = ctx.clone();
        tasks.spawn(
            async move {
                session::run(ctx.clone(), events_rx).await;
                // Whatever still runs (a drain that gave up waiting) dies
                // with the node: no orphans.
                ctx.executor.stop_all(&StopReason::Killed);
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

/// A started node. Dropping it kills the node (and its child processes);
/// call [`RunningNode::drain`] to stop it gracefully.
pub struct RunningNode {
    name: String,
    node_id: watch::Receiver<Option<NodeId>>,
    ctx: Arc<NodeCtx>,
    tasks: TaskTracker,
    main: Option<JoinHandle<()>>,
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
    pub async fn drain(mut self, grace: Duration) -> Result<(), Error> {
        self.ctx.request_drain(grace);
        let Some(main) = self.main.take() else {
            return Ok(());
        };
        let limit = grace + DRAIN_MARGIN;
        let result = match tokio::time::timeout(limit, main).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(Error::Panicked(err.to_string())),
            Err(_) => {
                warn!(node_name = %self.name, "drain overran; killing the node");
                self.kill_now();
                Err(Error::DrainTimedOut(limit))
            }
        };
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

    /// Waits until the node stops by itself (drained by the coordinator).
    pub async fn wait(&mut self) {
        if let Some(main) = self.main.as_mut() {
            let _ = main.await;
            self.main = None;
        }
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
