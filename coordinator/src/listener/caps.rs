//! How many connections the listener holds: in total and per peer IP
//! address. A connection is counted from the moment it is accepted (so
//! those still in their handshake count too) until its [`Slot`] is
//! dropped, which the connection's IO carries to its end.
//!
//! A connection past a cap makes room by closing the oldest connection
//! that has not finished its handshake yet (from the same address for the
//! per-address cap, from any for the total), and is refused only when
//! every connection counted against that cap is established. So a flood of
//! connections that never finish their handshake cannot lock anyone out,
//! not even a client on the flood's own address (loopback, a NAT): each new
//! connection gets at least the time the flood takes to open a cap's worth
//! more to finish its handshake, while established connections are never
//! touched.
//!
//! Plain state behind one mutex, taken when a connection is accepted, when
//! its handshake ends and when it ends; nothing here touches a socket.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

/// The connection caps and the counts they are checked against.
#[derive(Debug)]
pub(crate) struct Caps {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only addresses with a connection open: an entry goes when its
    /// count reaches zero, so the map is as large as the peers connected.
    by_ip: HashMap<IpAddr, usize>,
    /// Connections still in their handshake, oldest first, each with
    /// what closes it.
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// The same, by address.
    pending_by_ip: HashMap<IpAddr, BTreeSet<u64>>,
    next: u64,
}

impl Counts {
    fn add(&mut self, ip: IpAddr) {
        self.total += 1;
        *self.by_ip.entry(ip).or_insert(0) += 1;
    }

    fn remove(&mut self, ip: IpAddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(from_ip) = self.by_ip.get_mut(&ip) {
            *from_ip = from_ip.saturating_sub(1);
            if *from_ip == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Takes `id` off the connections in their handshake; false if it
    /// was not there (established, or already closed to make room).
    fn settle(&mut self, id: u64) -> bool {
        let Some((ip, _)) = self.pending.remove(&id) else {
            return false;
        };
        if let Some(ids) = self.pending_by_ip.get_mut(&ip) {
            ids.remove(&id);
            if ids.is_empty() {
                self.pending_by_ip.remove(&ip);
            }
        }
        true
    }

    /// Closes the oldest connection still in its handshake (from `ip`, or
    /// from anyone) and uncounts it; false if there is none.
    fn evict_oldest(&mut self, ip: Option<IpAddr>) -> bool {
        let oldest = match ip {
            Some(ip) => self
                .pending_by_ip
                .get(&ip)
                .and_then(|ids| ids.first().copied()),
            None => self.pending.keys().next().copied(),
        };
        let Some(id) = oldest else {
            return false;
        };
        let Some((ip, close)) = self.pending.get(&id).cloned() else {
            return false;
        };
        self.settle(id);
        close.cancel();
        self.remove(ip);
        true
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// `--max-connections` connections are open.
    Total(usize),
    /// `--max-connections-per-ip` connections from this address are open.
    PerIp(usize),
}

impl Caps {
    /// At most `max_total` connections, `max_per_ip` from one address.
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Caps> {
        Arc::new(Caps {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Counts a new connection from `ip` (in its handshake until
    /// [`Slot::established`]), closing the oldest connection still in its
    /// handshake to make room when a cap is reached (answered in
    /// [`Admitted::evicted`]); or says which cap it is over when none can
    /// go. An IPv4 address seen as IPv6 (`::ffff:a.b.c.d`, on a dual-stack
    /// listener) counts as the IPv4 address it is.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Over> {
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let mut evicted = 0;
        if counts.by_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            if !counts.evict_oldest(Some(ip)) {
                return Err(Over::PerIp(self.max_per_ip));
            }
            evicted += 1;
        }
        if counts.total >= self.max_total {
            if !counts.evict_oldest(None) {
                return Err(Over::Total(self.max_total));
            }
            evicted += 1;
        }
        counts.add(ip);
        let id = counts.next;
        counts.next += 1;
        let closed = CancellationToken::new();
        counts.pending.insert(id, (ip, closed.clone()));
        counts.pending_by_ip.entry(ip).or_default().insert(id);
        Ok(Admitted {
            slot: Slot {
                caps: Arc::clone(self),
                ip,
                id,
                closed,
            },
            evicted,
        })
    }

    /// Connections open (accepted and not yet ended).
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    /// Connections open from `ip`.
    #[cfg(test)]
    pub(crate) fn open_from(&self, ip: IpAddr) -> usize {
        self.lock()
            .by_ip
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection let in, and how many in their handshake were closed to
/// make room for it.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub slot: Slot,
    pub evicted: usize,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct Slot {
    caps: Arc<Caps>,
    ip: IpAddr,
    id: u64,
    /// Cancelled when the connection, still in its handshake, was closed
    /// to make room (it is no longer counted then).
    closed: CancellationToken,
}

impl Slot {
    /// Fires when this connection, still in its handshake, is closed to
    /// make room for a newer one: the handshake must stop.
    pub(crate) fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// The connection finished its handshake: it is never closed to make
    /// room from now on. False if it already was.
    pub(crate) fn established(&self) -> bool {
        self.caps.lock().settle(self.id)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.caps.lock();
        let pending = counts.settle(self.id);
        // Closed to make room: already uncounted then.
        if pending || !self.closed.is_cancelled() {
            counts.remove(self.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use std::sync::Arc;

    use futures::FutureExt;

    use super::{Caps, Over, Slot};

    /// A connection from `ip` that finished its handshake.
    fn established(caps: &Arc<Caps>, ip: IpAddr) -> Result<Slot, Over> {
        let slot = caps.admit(ip)?.slot;
        assert!(slot.established());
        Ok(slot)
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_peer_past_its_cap_is_refused_and_others_are_not() {
        let caps = Caps::new(100, 2);
        let first = established(&caps, A).expect("first");
        let _second = established(&caps, A).expect("second");
        assert_eq!(established(&caps, A).unwrap_err(), Over::PerIp(2));
        let _other = established(&caps, B).expect("another peer");
        assert_eq!((caps.open(), caps.open_from(A)), (3, 2));
        // A connection that ends frees its place.
        drop(first);
        let _again = established(&caps, A).expect("a place again");
        assert_eq!(established(&caps, A).unwrap_err(), Over::PerIp(2));
    }

    #[test]
    fn the_total_cap_counts_every_peer() {
        let caps = Caps::new(2, 10);
        let a = established(&caps, A).expect("a");
        let _b = established(&caps, B).expect("b");
        assert_eq!(established(&caps, A).unwrap_err(), Over::Total(2));
        assert_eq!(
            established(&caps, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_err(),
            Over::Total(2)
        );
        drop(a);
        assert!(established(&caps, IpAddr::V4(Ipv4Addr::LOCALHOST)).is_ok());
    }

    #[test]
    fn ended_connections_leave_no_entries_behind() {
        let caps = Caps::new(10, 10);
        let slots: Vec<_> = (0..5)
            .map(|_| established(&caps, A).expect("slot"))
            .collect();
        assert_eq!(caps.open_from(A), 5);
        drop(slots);
        assert_eq!((caps.open(), caps.open_from(A)), (0, 0));
        assert!(caps.lock().by_ip.is_empty());
    }

    #[test]
    fn an_ipv4_address_seen_over_ipv6_counts_as_itself() {
        let caps = Caps::new(10, 1);
        let _v4 = established(&caps, A).expect("v4");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(established(&caps, mapped).unwrap_err(), Over::PerIp(1));
        let _v6 = established(&caps, IpAddr::V6(Ipv6Addr::LOCALHOST)).expect("v6");
    }

    #[test]
    fn a_connection_past_a_cap_closes_the_oldest_still_in_its_handshake() {
        let caps = Caps::new(100, 3);
        let old = established(&caps, A).expect("established");
        let first = caps.admit(A).expect("first half-open").slot;
        let second = caps.admit(A).expect("second half-open").slot;
        // Past the cap: the oldest half-open one goes, not the newcomer,
        // and not the established one.
        let third = caps.admit(A).expect("room made");
        assert_eq!(third.evicted, 1);
        assert!(
            first.evicted().now_or_never().is_some(),
            "the oldest was closed"
        );
        assert!(second.evicted().now_or_never().is_none());
        assert!(!first.established(), "closed connections never count again");
        assert_eq!(caps.open_from(A), 3);
        drop(first);
        assert_eq!(
            caps.open_from(A),
            3,
            "dropping a closed one uncounts nothing"
        );
        // Once every connection from A is established, the next is refused.
        assert!(second.established() && third.slot.established());
        assert_eq!(caps.admit(A).unwrap_err(), Over::PerIp(3));
        // The total cap makes room from anyone's half-open connections.
        let total = Caps::new(2, 10);
        let _b = established(&total, B).expect("b");
        let pending = total.admit(A).expect("a half-open").slot;
        let admitted = total.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("room");
        assert_eq!(admitted.evicted, 1);
        assert!(pending.evicted().now_or_never().is_some());
        assert_eq!(total.open(), 2);
        drop((old, second, pending, admitted));
        assert_eq!(caps.open(), 1);
    }
}
