//! The HTTP/2 client preface, read before a connection is handed to tonic:
//! [`read_preface`] reads exactly its 24 bytes (refusing at the first byte
//! that differs), and [`Prefaced`] is the connection tonic gets, which
//! replays them before reading on and carries the connection's [`Slot`]
//! to its end.
//!
//! Why read it here: hyper waits for the preface without a deadline, so a
//! peer that connects (and finishes TLS) but never speaks HTTP/2 would
//! hold a descriptor forever. Reading it ourselves puts it under the same
//! deadline as the TLS handshake. Nothing here decides about deadlines or
//! caps; it only reads, compares and replays.
//!
//! The dashboard's listener speaks HTTP/1.1 as well ([`Greeting::AnyHttp`]):
//! there the first bytes of a request, whatever they are, must come within
//! the deadline; hyper's header timeout covers the rest of the request.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::caps::Slot;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4); gRPC
/// clients dial HTTP/2 directly ("prior knowledge"), over TLS or not.
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection must send first, within the handshake deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// The HTTP/2 client preface (gRPC).
    Http2Preface,
    /// Any first bytes (HTTP/1.1 or HTTP/2: the dashboard, `/metrics`).
    AnyHttp,
}

/// Reads what `greeting` asks for from `io`, and returns the bytes read
/// (to replay) and how many there are.
pub(crate) async fn read_greeting<IO>(
    io: &mut IO,
    greeting: Greeting,
) -> io::Result<([u8; PREFACE.len()], usize)>
where
    IO: AsyncRead + Unpin,
{
    match greeting {
        Greeting::Http2Preface => {
            read_preface(io).await?;
            Ok((*PREFACE, PREFACE.len()))
        }
        Greeting::AnyHttp => {
            let mut head = [0u8; PREFACE.len()];
            let n = io.read(&mut head).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending a request",
                ));
            }
            Ok((head, n))
        }
    }
}

/// Reads the client preface from `io`: `Ok` once all 24 bytes came and
/// match; `InvalidData` at the first byte that does not (without waiting
/// for the rest); `UnexpectedEof` if the peer closes first. Never reads
/// past the preface, so nothing else needs replaying.
pub(crate) async fn read_preface<IO>(io: &mut IO) -> io::Result<()>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = [0u8; PREFACE.len()];
    let mut got = 0;
    while got < PREFACE.len() {
        let n = io.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {got} bytes of the HTTP/2 client preface"),
            ));
        }
        if buf[got..got + n] != PREFACE[got..got + n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client preface (gRPC needs HTTP/2)",
            ));
        }
        got += n;
    }
    Ok(())
}

/// A connection whose preface was read: reads the preface again first,
/// then the connection itself. Holds the connection's place under the
/// caps until it is dropped (when hyper is done with the connection).
#[derive(Debug)]
pub(crate) struct Prefaced<IO> {
    io: IO,
    /// The bytes read before the connection was handed on: the preface,
    /// or the first bytes of a request ([`Greeting::AnyHttp`]).
    head: [u8; PREFACE.len()],
    /// How many bytes of `head` there are.
    head_len: usize,
    /// Bytes of `head` already given back to the reader.
    replayed: usize,
    _slot: Slot,
}

impl<IO> Prefaced<IO> {
    /// `io`, whose preface was read with [`read_preface`], counted by `slot`.
    #[cfg(test)]
    pub(crate) fn new(io: IO, slot: Slot) -> Prefaced<IO> {
        Prefaced::with_head(io, (*PREFACE, PREFACE.len()), slot)
    }

    /// `io`, of which `head` (bytes, length) was read already, counted by
    /// `slot`.
    pub(crate) fn with_head(
        io: IO,
        (head, head_len): ([u8; PREFACE.len()], usize),
        slot: Slot,
    ) -> Prefaced<IO> {
        Prefaced {
            io,
            head,
            head_len: head_len.min(PREFACE.len()),
            replayed: 0,
            _slot: slot,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefaced<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.head_len {
            let rest = &this.head[this.replayed..this.head_len];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefaced<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What tonic records about the connection is the inner stream's: for a
/// TLS stream its peer certificates (`Request::peer_certs()`, which node
/// authentication reads) and its address (`Request::remote_addr()`).
impl<IO: Connected> Connected for Prefaced<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::{Greeting, PREFACE, Prefaced, read_greeting, read_preface};
    use crate::listener::caps::Caps;

    #[tokio::test]
    async fn a_preface_in_pieces_is_read_and_replayed_before_what_follows() {
        let (mut peer, mut server) = duplex(1024);
        let writer = tokio::spawn(async move {
            for piece in PREFACE.chunks(5) {
                peer.write_all(piece).await.unwrap();
                peer.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            peer.write_all(b"SETTINGS").await.unwrap();
            peer
        });
        read_preface(&mut server).await.expect("a preface");
        let _peer = writer.await.unwrap();
        let caps = Caps::new(1, 1);
        let slot = caps.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap().slot;
        let mut prefaced = Prefaced::new(server, slot);
        // Small reads: the replay goes across several.
        let mut seen = Vec::new();
        let mut buf = [0u8; 7];
        while seen.len() < PREFACE.len() + b"SETTINGS".len() {
            let n = prefaced.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&seen[..PREFACE.len()], PREFACE);
        assert_eq!(&seen[PREFACE.len()..], b"SETTINGS");
        // The connection holds its place until it is dropped.
        assert_eq!(caps.open(), 1);
        drop(prefaced);
        assert_eq!(caps.open(), 0);
    }

    #[tokio::test]
    async fn any_http_takes_the_first_bytes_whatever_they_are_and_replays_them() {
        let (mut peer, mut server) = duplex(1024);
        peer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let head = read_greeting(&mut server, Greeting::AnyHttp)
            .await
            .expect("some bytes");
        assert!(head.1 > 0);
        peer.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let caps = Caps::new(1, 1);
        let slot = caps.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap().slot;
        let mut replayed = Prefaced::with_head(server, head, slot);
        let mut seen = vec![0u8; b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".len()];
        replayed.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        // A peer that closes at once sent nothing.
        let (peer, mut server) = duplex(1024);
        drop(peer);
        assert_eq!(
            read_greeting(&mut server, Greeting::AnyHttp)
                .await
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn other_bytes_are_refused_at_once() {
        let (mut peer, mut server) = duplex(1024);
        // An HTTP/1.1 request: the first byte already differs, and the
        // reader does not wait for 24 bytes to say so.
        peer.write_all(b"GET").await.unwrap();
        let err = read_preface(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        // A TLS ClientHello on a plaintext listener.
        let (mut peer, mut server) = duplex(1024);
        peer.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        assert_eq!(
            read_preface(&mut server).await.unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        // Right so far, then wrong.
        let (mut peer, mut server) = duplex(1024);
        peer.write_all(b"PRI * HTTP/1.1").await.unwrap();
        assert_eq!(
            read_preface(&mut server).await.unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn a_peer_that_closes_before_the_preface_is_an_early_end() {
        let (mut peer, mut server) = duplex(1024);
        peer.write_all(&PREFACE[..10]).await.unwrap();
        drop(peer);
        let err = read_preface(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let (peer, mut server) = duplex(1024);
        drop(peer);
        assert_eq!(
            read_preface(&mut server).await.unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn a_silent_peer_keeps_the_reader_waiting_for_the_caller_s_deadline() {
        let (_peer, mut server) = duplex(1024);
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            read_preface(&mut server),
        )
        .await;
        assert!(waited.is_err(), "no deadline of its own: the caller's");
    }
}
