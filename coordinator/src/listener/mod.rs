//! The coordinator's listener, TLS or plaintext alike: the one accept
//! loop, the caps on connections ([`caps`]), and the deadline by which a
//! connection must have finished its TLS handshake and sent the HTTP/2
//! client preface ([`preface`]). Tonic gets only connections that did.
//!
//! What a peer can do to the listener, and what it costs:
//! - Open connections and send nothing (or finish TLS and send nothing):
//!   each holds a descriptor and a small task until `--handshake-timeout`,
//!   then is closed. They count against the caps meanwhile.
//! - Open many: past `--max-connections-per-ip` from its address, or
//!   `--max-connections` in all, a new connection is closed at once, so
//!   one peer never uses up the descriptors.
//! - Exhaust descriptors anyway (other peers, a low `ulimit -n`): `accept`
//!   fails, and the loop waits (5 ms doubling to 1 s) instead of spinning;
//!   the connections waiting in the kernel's backlog are taken once
//!   descriptors are free again.
//!
//! Every warning a peer can cause is rate-limited ([`backoff::Throttle`]).
//! TLS itself is the caller's `handshake` function: this module knows
//! nothing of certificates.

pub(crate) mod backoff;
pub(crate) mod caps;
pub(crate) mod preface;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CoordinatorConfig;

use backoff::{Backoff, Throttle};
use caps::{Caps, Over};
pub(crate) use preface::Greeting;
use preface::{Prefaced, read_greeting};

/// First wait after a failed `accept`; doubles per failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait after a failed `accept`: how late the listener notices
/// that descriptors are free again, at worst.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A warning a peer can cause goes out at most this often.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// Descriptors left to the rest of the process (the store, logs, the
/// CA's files, the runtime) when `--max-connections` is derived from the
/// descriptor limit.
const RESERVED_DESCRIPTORS: u64 = 128;
/// `--max-connections` derived from a very high (or no) descriptor limit
/// is at most this: each connection costs memory too.
const MAX_CONNECTIONS_CEILING: u64 = 100_000;
/// Connections handed to tonic but not yet taken by it.
const HANDOFF: usize = 64;

/// The listener's settings, from [`CoordinatorConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// TLS handshake and HTTP/2 preface, together, within this.
    pub handshake_timeout: Duration,
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
}

impl Limits {
    /// The limits `config` asks for (`--max-connections` derived from the
    /// descriptor limit when not given).
    pub(crate) fn of(config: &CoordinatorConfig) -> Limits {
        Limits {
            handshake_timeout: config.handshake_timeout,
            max_connections: config
                .max_connections
                .unwrap_or_else(default_max_connections),
            max_connections_per_ip: config.max_connections_per_ip,
        }
    }
}

/// `--max-connections` when not given: the process's descriptor limit
/// (soft `RLIMIT_NOFILE`, what `ulimit -n` says) less
/// [`RESERVED_DESCRIPTORS`] (at least half of it), at most
/// [`MAX_CONNECTIONS_CEILING`]. So connections alone never use up the
/// descriptors the store and the rest of the process need.
pub(crate) fn default_max_connections() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _hard)| soft)
        .unwrap_or(MAX_CONNECTIONS_CEILING);
    max_connections_for(soft)
}

fn max_connections_for(descriptors: u64) -> usize {
    let n = descriptors
        .saturating_sub(RESERVED_DESCRIPTORS)
        .max(descriptors / 2)
        .clamp(1, MAX_CONNECTIONS_CEILING);
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Accepts connections on `listener` until `cancel`, runs `handshake`
/// (TLS, or nothing for plaintext) and reads the `greeting` (the HTTP/2
/// preface for gRPC) on each, concurrently and within
/// `limits.handshake_timeout`, and yields those that made it. Connections
/// over a cap are closed at once.
pub(crate) fn incoming<IO, H, Fut>(
    listener: TcpListener,
    (handshake, greeting): (H, Greeting),
    limits: Limits,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> impl Stream<Item = io::Result<Prefaced<IO>>> + use<IO, H, Fut>
where
    H: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF);
    let handshake = Arc::new(handshake);
    let caps = Caps::new(limits.max_connections, limits.max_connections_per_ip);
    let late = Arc::new(Mutex::new(Throttle::new(WARN_EVERY)));
    let handshakes = tasks.clone();
    tracing::info!(
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        handshake_timeout = ?limits.handshake_timeout,
        "connection limits"
    );
    tasks.spawn(async move {
        let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        let mut failures = Throttle::new(WARN_EVERY);
        let mut refusals = Throttle::new(WARN_EVERY);
        let mut evictions = Throttle::new(WARN_EVERY);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => {
                    backoff.succeeded();
                    accepted
                }
                Err(err) if is_connection_error(&err) => {
                    // That peer left before it was accepted; the listener is fine.
                    tracing::debug!(error = %err, "a connection ended before it was accepted");
                    continue;
                }
                Err(err) => {
                    if let Some(failures) = failures.hit(Instant::now()) {
                        warn_accept_failed(&err, failures, limits);
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.failed()) => continue,
                    }
                }
            };
            let slot = match caps.admit(peer.ip()) {
                Ok(admitted) => {
                    if admitted.evicted > 0
                        && let Some(closed) = evictions.hit_by(Instant::now(), admitted.evicted)
                    {
                        tracing::warn!(
                            peer = %peer.ip(),
                            closed,
                            max_connections = limits.max_connections,
                            max_connections_per_ip = limits.max_connections_per_ip,
                            "at a connection cap: closed the oldest connections still in their handshake to make room for new ones (`closed`: how many since the last report; `peer`: the latest newcomer)"
                        );
                    }
                    admitted.slot
                }
                Err(over) => {
                    drop(tcp);
                    if let Some(refused) = refusals.hit(Instant::now()) {
                        warn_over_cap(over, peer, refused);
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let handshake = Arc::clone(&handshake);
            let tx = tx.clone();
            let cancel = cancel.clone();
            let late = Arc::clone(&late);
            handshakes.spawn(async move {
                let ready = async move {
                    let mut io = handshake(tcp).await?;
                    let head = read_greeting(&mut io, greeting).await?;
                    Ok::<_, io::Error>((io, head))
                };
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = slot.evicted() => {
                        tracing::debug!(%peer, "closed a connection still in its handshake to make room");
                        return;
                    }
                    result = tokio::time::timeout(limits.handshake_timeout, ready) => result,
                };
                match result {
                    Ok(Ok((io, head))) if slot.established() => {
                        let _ = tx.send(Ok(Prefaced::with_head(io, head, slot))).await;
                    }
                    Ok(Ok(_)) => {
                        tracing::debug!(%peer, "closed a connection that finished its handshake as it was closed to make room");
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "closed a connection before HTTP/2");
                    }
                    Err(_) => {
                        let due = late
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .hit(Instant::now());
                        if let Some(closed) = due {
                            tracing::warn!(
                                %peer,
                                closed,
                                handshake_timeout = ?limits.handshake_timeout,
                                "closed connections that did not finish the TLS handshake and send the HTTP/2 preface within --handshake-timeout (`closed`: how many since the last report; `peer`: the latest)"
                            );
                        }
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Errors of one connection that ended before `accept` took it, not of
/// the listener: no reason to wait.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The warning for `failures` failed accepts (the latest `err`): what it
/// means and what to change.
fn warn_accept_failed(err: &io::Error, failures: u64, limits: Limits) {
    use nix::errno::Errno;
    let code = err.raw_os_error();
    if code == Some(Errno::EMFILE as i32) || code == Some(Errno::ENFILE as i32) {
        tracing::warn!(
            error = %err,
            failures,
            max_connections = limits.max_connections,
            max_connections_per_ip = limits.max_connections_per_ip,
            "cannot accept connections: the process is out of file descriptors (`failures`: failed accepts since the last report); retrying with backoff. Raise the descriptor limit (`ulimit -n`, LimitNOFILE= under systemd) or lower --max-connections / --max-connections-per-ip"
        );
    } else if code == Some(Errno::ENOBUFS as i32) || code == Some(Errno::ENOMEM as i32) {
        tracing::warn!(
            error = %err,
            failures,
            "cannot accept connections: out of memory for sockets (`failures`: failed accepts since the last report); retrying with backoff"
        );
    } else {
        tracing::warn!(
            error = %err,
            failures,
            "accepting connections failed (`failures`: how many since the last report); retrying with backoff"
        );
    }
}

/// The warning for `refused` connections closed over a cap (the latest
/// from `peer`, over `over`).
fn warn_over_cap(over: Over, peer: SocketAddr, refused: u64) {
    match over {
        Over::PerIp(limit) => tracing::warn!(
            peer = %peer.ip(),
            refused,
            limit,
            "closed connections over --max-connections-per-ip (`refused`: how many since the last report; `peer`: the latest)"
        ),
        Over::Total(limit) => tracing::warn!(
            peer = %peer.ip(),
            refused,
            limit,
            "closed connections over --max-connections (`refused`: how many since the last report)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::preface::PREFACE;
    use super::{Greeting, Limits, incoming, max_connections_for};

    /// Whether the listener closed `stream` within `within`.
    async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn the_loop_yields_http2_connections_and_closes_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let limits = Limits {
            handshake_timeout: Duration::from_secs(3),
            max_connections: 10,
            max_connections_per_ip: 2,
        };
        let accepted = incoming(
            listener,
            (|tcp| std::future::ready(Ok(tcp)), Greeting::Http2Preface),
            limits,
            cancel.clone(),
            &tasks,
        );
        tokio::pin!(accepted);
        // A client that speaks HTTP/2 gets through, the preface replayed.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        let mut server = accepted.next().await.unwrap().unwrap();
        let mut replayed = [0u8; 24];
        server.read_exact(&mut replayed).await.unwrap();
        assert_eq!(&replayed, PREFACE);
        // A silent one holds the second place this address has ...
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // ... until a newer one needs it: the oldest connection still in its
        // handshake makes room, and the newcomer gets in.
        let mut third = TcpStream::connect(addr).await.unwrap();
        // "At once": well within the handshake deadline.
        let at_once = Duration::from_millis(1500);
        assert!(
            closed(&mut silent, at_once).await,
            "the half-open one made room"
        );
        third.write_all(PREFACE).await.unwrap();
        let third_server = accepted.next().await.unwrap().unwrap();
        // Every connection from this address established: one more is
        // closed at once.
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut fourth, at_once).await, "over the per-IP cap");
        // A silent one is closed after the deadline, not before.
        drop(third_server);
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(
            !closed(&mut silent, at_once).await,
            "closed before the deadline"
        );
        assert!(
            closed(&mut silent, Duration::from_secs(5)).await,
            "silent past the deadline"
        );
        // HTTP/1.1 is closed at once.
        let mut http1 = TcpStream::connect(addr).await.unwrap();
        http1.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(closed(&mut http1, at_once).await, "not HTTP/2");
        // The first connection's place is freed when tonic drops it.
        drop(server);
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(PREFACE).await.unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        let mut another = TcpStream::connect(addr).await.unwrap();
        another.write_all(PREFACE).await.unwrap();
        let _third = accepted.next().await.unwrap().unwrap();
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        drop(client);
    }

    #[test]
    fn the_default_cap_leaves_descriptors_to_the_rest_of_the_process() {
        assert_eq!(max_connections_for(1024), 896);
        assert_eq!(max_connections_for(65_536), 65_408);
        // A small limit keeps half for connections.
        assert_eq!(max_connections_for(200), 100);
        assert_eq!(max_connections_for(1), 1);
        assert_eq!(max_connections_for(0), 1);
        // No limit (RLIM_INFINITY) or a huge one: the ceiling.
        assert_eq!(max_connections_for(u64::MAX), 100_000);
        assert_eq!(max_connections_for(1 << 20), 100_000);
    }
}
