//! The addresses of this machine's network interfaces: a coordinator
//! listening on every address (`0.0.0.0` / `::`) puts them in its serving
//! certificate, so a node joining through any of them passes the name
//! check. Reads the interface list (getifaddrs); decides nothing else.

use std::net::{IpAddr, SocketAddr};

/// Every address of an interface that is up, loopback included, without
/// IPv6 link-local ones (they cannot be dialed without a scope, which a
/// certificate cannot name). No duplicates; the system's order.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return found;
    };
    for interface in interfaces {
        if !interface
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_UP)
        {
            continue;
        }
        let Some(address) = interface.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let ip = v6.ip();
            if (ip.segments()[0] & 0xffc0) == 0xfe80 {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        if !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// The extra names of the serving certificate for `listen`: every local
/// interface address when it is the unspecified address (what such a
/// listener is reached by), else none.
pub fn names_for_listen(listen: SocketAddr) -> Vec<String> {
    if !listen.ip().is_unspecified() {
        return Vec::new();
    }
    local_addresses().iter().map(IpAddr::to_string).collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn listening_on_every_address_names_each_interface_address() {
        let names = names_for_listen("0.0.0.0:7070".parse().unwrap());
        assert!(names.contains(&"127.0.0.1".to_owned()), "{names:?}");
        assert!(!names.is_empty());
        assert!(
            local_addresses().contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "loopback is an interface"
        );
        // Every name is an address, and none is link-local IPv6.
        for name in &names {
            let ip: IpAddr = name.parse().unwrap();
            assert!(!name.starts_with("fe80"), "{ip}");
        }
        // A specific listen address adds nothing.
        assert!(names_for_listen("127.0.0.1:7070".parse().unwrap()).is_empty());
    }
}
