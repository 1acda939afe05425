//! Network interfaces and the discovery sockets on them.
//!
//! This module owns choosing interfaces (all multicast-capable ones, or those named) and
//! opening sockets: one multicast socket bound to the group's address and port (shared
//! with other nodes on the host through SO_REUSEADDR/SO_REUSEPORT, joined on every chosen
//! interface), and per interface one unicast socket on an ephemeral port from which every
//! datagram is sent. Replies are addressed to that unicast port, never to the shared
//! group port, where the kernel would hand a unicast datagram to only one of the nodes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
const IFF_MULTICAST: u32 = 0x1000;

/// One IPv4 interface discovery runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its netmask.
    pub netmask: Ipv4Addr,
}

impl Interface {
    /// Whether `ip` is on this interface's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask);
        u32::from(self.ip) & mask == u32::from(ip) & mask
    }
}

/// Why discovery cannot use the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot list network interfaces: {0}")]
    /// The network interfaces could not be listed.
    List(io::Error),
    #[error(
        "no interface named {name} with an IPv4 address (interfaces with IPv4: {available}); \
         check `ip addr` and the --interface option"
    )]
    /// No interface has the requested name and an IPv4 address.
    NoSuchInterface {
        /// The requested interface name.
        name: String,
        /// The interfaces that have IPv4, comma-separated.
        available: String,
    },
    #[error(
        "no multicast-capable network interface is up with an IPv4 address. Check `ip addr` \
         (an interface that is UP, has an IPv4 address and the MULTICAST flag), or pass \
         `--interface lo` to discover nodes on this machine only"
    )]
    /// No multicast-capable interface with IPv4 is up.
    NoInterface,
    #[error("cannot open {what}: {source}")]
    /// A socket could not be opened.
    Socket {
        /// Which socket (e.g. the multicast socket on an interface).
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    #[error(
        "cannot join multicast group {group} on {iface} ({ip}): {source}. Check that the \
         interface is up and multicast-capable (`ip link show {iface}`)"
    )]
    /// The multicast group could not be joined on an interface.
    Join {
        /// The multicast group.
        group: Ipv4Addr,
        /// The interface's name.
        iface: String,
        /// The interface's IPv4 address.
        ip: Ipv4Addr,
        /// The I/O error.
        source: io::Error,
    },
    #[error(
        "cannot send multicast to {group}:{port} on {iface}: {source}. Multicast needs a \
         route: check `ip route get {group}` (add one with `ip route add 224.0.0.0/4 dev {iface}` \
         or a default route), that the interface is up, and that no firewall drops UDP port \
         {port}; on a single machine use `--interface lo`"
    )]
    /// The first probe reached the multicast group on no interface (usually: no route);
    /// this is the first failure.
    Send {
        /// The multicast group.
        group: Ipv4Addr,
        /// The UDP port.
        port: u16,
        /// The interface's name.
        iface: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// The interface's flags (`IFF_UP`, `IFF_MULTICAST`, …), asked of the kernel for the
/// network namespace this process is in (`SIOCGIFFLAGS`). Not from `/sys/class/net`,
/// whose view belongs to the mount namespace and may be another network's (a process
/// moved into a namespace by `setns` or `nsenter --net` still sees the host's sysfs).
fn flags(name: &str) -> Option<u32> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: ifreq is plain data (zero is a valid value); the name fits with its NUL.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, &b) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = b as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into `request`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    Some(u32::from(flags as u16))
}

/// Chooses interfaces: those named (any IPv4 interface, `lo` included), or else every
/// interface that is up, multicast-capable, not loopback, and has an IPv4 address.
pub fn select(names: &[String]) -> Result<Vec<Interface>, NetError> {
    let all: Vec<Interface> = if_addrs::get_if_addrs()
        .map_err(NetError::List)?
        .into_iter()
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(Interface {
                name: i.name,
                ip: v4.ip,
                netmask: v4.netmask,
            }),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        let chosen: Vec<Interface> = all
            .into_iter()
            .filter(|i| {
                flags(&i.name).is_some_and(|f| {
                    f & IFF_UP != 0 && f & IFF_MULTICAST != 0 && f & IFF_LOOPBACK == 0
                })
            })
            .collect();
        if chosen.is_empty() {
            return Err(NetError::NoInterface);
        }
        return Ok(chosen);
    }
    let mut chosen = Vec::new();
    for name in names {
        let mut found: Vec<Interface> = all.iter().filter(|i| &i.name == name).cloned().collect();
        if found.is_empty() {
            let mut available: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
            available.dedup();
            return Err(NetError::NoSuchInterface {
                name: name.clone(),
                available: available.join(", "),
            });
        }
        // One address per interface is enough to send and receive on it.
        found.truncate(1);
        chosen.extend(found);
    }
    chosen.dedup();
    Ok(chosen)
}

/// The sockets of one node.
pub struct Sockets {
    /// Receives the group's datagrams (bound to group:port, shared with other nodes).
    pub group: UdpSocket,
    /// Per interface: the socket every datagram is sent from, and unicast answers reach.
    pub unicast: Vec<(Interface, UdpSocket)>,
    /// The group's address.
    pub group_addr: SocketAddrV4,
}

fn sock_err(what: String) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Socket { what, source }
}

/// Opens the sockets for `group:port` on `interfaces`. Needs a tokio runtime.
pub fn open(group: Ipv4Addr, port: u16, interfaces: &[Interface]) -> Result<Sockets, NetError> {
    let what = format!("multicast socket on {group}:{port}");
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err(what.clone()))?;
    socket
        .set_reuse_address(true)
        .map_err(sock_err(what.clone()))?;
    socket
        .set_reuse_port(true)
        .map_err(sock_err(what.clone()))?;
    // Only the groups this socket joined, on the interfaces it joined them on.
    socket
        .set_multicast_all_v4(false)
        .map_err(sock_err(what.clone()))?;
    socket
        .bind(&SocketAddr::V4(SocketAddrV4::new(group, port)).into())
        .map_err(sock_err(what.clone()))?;
    for iface in interfaces {
        socket
            .join_multicast_v4(&group, &iface.ip)
            .map_err(|source| NetError::Join {
                group,
                iface: iface.name.clone(),
                ip: iface.ip,
                source,
            })?;
    }
    socket
        .set_nonblocking(true)
        .map_err(sock_err(what.clone()))?;
    let group_socket = UdpSocket::from_std(socket.into()).map_err(sock_err(what))?;

    let mut unicast = Vec::new();
    for iface in interfaces {
        let what = format!("unicast socket on {} ({})", iface.name, iface.ip);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(sock_err(what.clone()))?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(iface.ip, 0)).into())
            .map_err(sock_err(what.clone()))?;
        s.set_multicast_if_v4(&iface.ip)
            .map_err(sock_err(what.clone()))?;
        s.set_multicast_loop_v4(true)
            .map_err(sock_err(what.clone()))?;
        s.set_multicast_ttl_v4(1).map_err(sock_err(what.clone()))?;
        s.set_nonblocking(true).map_err(sock_err(what.clone()))?;
        let s = UdpSocket::from_std(s.into()).map_err(sock_err(what))?;
        unicast.push((iface.clone(), s));
    }
    Ok(Sockets {
        group: group_socket,
        unicast,
        group_addr: SocketAddrV4::new(group, port),
    })
}

impl Sockets {
    /// The unicast socket to answer `dest` from: the one whose subnet holds it.
    pub fn route(&self, dest: SocketAddr) -> Option<&UdpSocket> {
        let by_subnet = match dest.ip() {
            IpAddr::V4(ip) => self.unicast.iter().find(|(i, _)| i.contains(ip)),
            IpAddr::V6(_) => None,
        };
        by_subnet.or(self.unicast.first()).map(|(_, s)| s)
    }

    /// The local addresses of the unicast sockets.
    pub fn unicast_addrs(&self) -> Vec<SocketAddr> {
        self.unicast
            .iter()
            .filter_map(|(_, s)| s.local_addr().ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_come_from_the_kernel() {
        let lo = super::flags("lo").expect("lo has flags");
        assert_ne!(lo & libc::IFF_LOOPBACK as u32, 0, "{lo:#x}");
        assert_ne!(lo & libc::IFF_UP as u32, 0, "{lo:#x}");
        assert_eq!(super::flags("no-such-if0"), None);
        assert_eq!(super::flags(""), None);
        assert_eq!(super::flags(&"x".repeat(40)), None);
    }

    use super::*;

    #[test]
    fn subnet_match() {
        let i = Interface {
            name: "eth0".into(),
            ip: Ipv4Addr::new(10, 1, 2, 3),
            netmask: Ipv4Addr::new(255, 255, 0, 0),
        };
        assert!(i.contains(Ipv4Addr::new(10, 1, 9, 9)));
        assert!(!i.contains(Ipv4Addr::new(10, 2, 0, 1)));
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let err = select(&["no-such-if0".to_string()]).unwrap_err();
        assert!(
            err.to_string().contains("no interface named no-such-if0"),
            "{err}"
        );
    }

    #[test]
    fn loopback_can_be_chosen_by_name() {
        let lo = select(&["lo".to_string()]).unwrap();
        assert_eq!(lo[0].ip, Ipv4Addr::LOCALHOST);
    }
}
