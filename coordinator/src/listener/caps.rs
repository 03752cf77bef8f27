//! How many connections the listener holds: in total and per peer IP
//! address. A connection is counted from the moment it is accepted (so
//! those still in their handshake count too) until its [`Slot`] is
//! dropped, which the connection's IO carries to its end.
//!
//! Plain state behind one mutex, taken once when a connection is accepted
//! and once when it ends; nothing here touches a socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

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

    /// Counts a connection from `ip`, or says which cap it is over. An
    /// IPv4 address seen as IPv6 (`::ffff:a.b.c.d`, on a dual-stack
    /// listener) counts as the IPv4 address it is.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Over> {
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        if counts.total >= self.max_total {
            return Err(Over::Total(self.max_total));
        }
        let from_ip = counts.by_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(Over::PerIp(self.max_per_ip));
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(Slot {
            caps: Arc::clone(self),
            ip,
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

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct Slot {
    caps: Arc<Caps>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.caps.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(from_ip) = counts.by_ip.get_mut(&self.ip) {
            *from_ip = from_ip.saturating_sub(1);
            if *from_ip == 0 {
                counts.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{Caps, Over};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_peer_past_its_cap_is_refused_and_others_are_not() {
        let caps = Caps::new(100, 2);
        let first = caps.admit(A).expect("first");
        let _second = caps.admit(A).expect("second");
        assert_eq!(caps.admit(A).unwrap_err(), Over::PerIp(2));
        let _other = caps.admit(B).expect("another peer");
        assert_eq!((caps.open(), caps.open_from(A)), (3, 2));
        // A connection that ends frees its place.
        drop(first);
        let _again = caps.admit(A).expect("a place again");
        assert_eq!(caps.admit(A).unwrap_err(), Over::PerIp(2));
    }

    #[test]
    fn the_total_cap_counts_every_peer() {
        let caps = Caps::new(2, 10);
        let a = caps.admit(A).expect("a");
        let _b = caps.admit(B).expect("b");
        assert_eq!(caps.admit(A).unwrap_err(), Over::Total(2));
        assert_eq!(
            caps.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_err(),
            Over::Total(2)
        );
        drop(a);
        assert!(caps.admit(IpAddr::V4(Ipv4Addr::LOCALHOST)).is_ok());
    }

    #[test]
    fn ended_connections_leave_no_entries_behind() {
        let caps = Caps::new(10, 10);
        let slots: Vec<_> = (0..5).map(|_| caps.admit(A).expect("slot")).collect();
        assert_eq!(caps.open_from(A), 5);
        drop(slots);
        assert_eq!((caps.open(), caps.open_from(A)), (0, 0));
        assert!(caps.lock().by_ip.is_empty());
    }

    #[test]
    fn an_ipv4_address_seen_over_ipv6_counts_as_itself() {
        let caps = Caps::new(10, 1);
        let _v4 = caps.admit(A).expect("v4");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(caps.admit(mapped).unwrap_err(), Over::PerIp(1));
        let _v6 = caps.admit(IpAddr::V6(Ipv6Addr::LOCALHOST)).expect("v6");
    }
}
