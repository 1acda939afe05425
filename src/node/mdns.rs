//! The mDNS/DNS-SD path: nodes as `_localnet._tcp.local.` services, through `mdns-sd`.
//!
//! This module owns what localnet publishes over mDNS (one service instance per node,
//! at its transport address, TXT `id`, `role`, `v`, `incarnation`, `name` and its tags) and what
//! it learns by browsing the same service type, turned into [`NodeRecord`]s for the
//! core's peer table. Instance names are the node names, made unique (`name-1a2b3c4d`)
//! when another node already uses one. A clean shutdown unregisters (TTL-0 goodbye).
//! Nodes with a cluster key add TXT `ck`, the key's public cluster tag; browsers keep
//! only services of their own cluster (the same tag, or none for open clusters). TXT
//! records are not authenticated, so what passes is still listed as unverified in a
//! keyed cluster until the node's own authenticated announcement arrives.
//!
//! `mdns-sd` joins the mDNS group on every interface when its daemon starts and is
//! narrowed to the chosen interfaces right after; so this path is never started for
//! loopback-only nodes (mDNS is of no use there), and mDNS queries and answers go only
//! to the interfaces the node was told to use.

use crate::discovery::MemberId;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use crate::discovery::wire::NodeRecord;

/// Version of the TXT record's layout (`v=`): its own, not the datagram format's
/// (`discovery::wire::VERSION`), so that mDNS peers of every localnet agree.
const VERSION: u8 = 1;
use crate::node::netif::Interface;

/// The DNS-SD service type of localnet nodes.
pub const SERVICE_TYPE: &str = "_localnet._tcp.local.";
/// TXT keys with a meaning of their own (tags with these names are not published).
const RESERVED: [&str; 6] = ["id", "role", "v", "inc", "name", "ck"];
/// Timing given to mDNS-only peers (informational: mDNS itself expires them).
const MDNS_INTERVAL_MS: u64 = 60_000;
/// Most mDNS instances tracked (as many as the peer table holds).
const MAX_INSTANCES: usize = 4096;
const MDNS_TTL_MS: u64 = 120_000;

/// What browsing found.
#[derive(Debug)]
pub enum MdnsEvent {
    /// A node's service was resolved.
    Resolved(NodeRecord),
    /// A node's service went away.
    Removed(MemberId),
}

/// A running mDNS path.
pub struct Mdns {
    daemon: ServiceDaemon,
    registered: Option<String>,
}

/// What a node publishes about itself.
#[derive(Clone, Debug)]
pub struct MdnsAdvert {
    /// Stable node id.
    pub id: MemberId,
    /// Human name.
    pub name: String,
    /// Incarnation: grows each time the node restarts.
    pub incarnation: u64,
    /// Role: `daemon`, `slave`, `master`, ...
    pub role: String,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// The node's transport (TCP) port.
    pub port: u16,
}

/// Which cluster a node belongs to: the key's public tag, or `None` for open clusters.
pub type ClusterTag = Option<String>;

/// Whether mDNS can run on these interfaces (it is not started on loopback alone).
pub fn usable_on(interfaces: &[Interface]) -> bool {
    interfaces.iter().any(|i| !i.ip.is_loopback())
}

impl Mdns {
    /// Starts the mDNS daemon on `interfaces`, publishes `me` (unless `None`, for
    /// observers) and browses; what it finds arrives on the returned channel.
    pub fn start(
        interfaces: &[Interface],
        me: Option<MdnsAdvert>,
        cluster: ClusterTag,
    ) -> Result<(Self, mpsc::Receiver<MdnsEvent>), String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("cannot start mDNS: {e}"))?;
        daemon
            .disable_interface(IfKind::All)
            .map_err(|e| format!("mDNS interface selection: {e}"))?;
        for iface in interfaces.iter().filter(|i| !i.ip.is_loopback()) {
            daemon
                .enable_interface(IfKind::Name(iface.name.clone()))
                .map_err(|e| format!("mDNS on {}: {e}", iface.name))?;
        }
        let ips: Vec<IpAddr> = interfaces
            .iter()
            .filter(|i| !i.ip.is_loopback())
            .map(|i| IpAddr::V4(i.ip))
            .collect();
        let mut registered = None;
        let own = me.as_ref().map(|m| m.id);
        if let Some(me) = &me {
            let info = service_info(me, &me.name, &ips, &cluster)?;
            registered = Some(info.get_fullname().to_string());
            daemon
                .register(info)
                .map_err(|e| format!("mDNS register: {e}"))?;
        }
        let browse = daemon
            .browse(SERVICE_TYPE)
            .map_err(|e| format!("mDNS browse: {e}"))?;
        let (tx, rx) = mpsc::channel(1024);
        let republish = daemon.clone();
        let subnets: Vec<Interface> = interfaces.to_vec();
        let ours = cluster.clone();
        tokio::spawn(async move {
            let mut ids: HashMap<String, MemberId> = HashMap::new();
            let mut our_fullname = me
                .as_ref()
                .and_then(|m| service_info(m, &m.name, &ips, &ours).ok())
                .map(|i| i.get_fullname().to_string());
            while let Ok(event) = browse.recv_async().await {
                match event {
                    ServiceEvent::ServiceResolved(service) => {
                        let Some(record) = record_of(&service, &subnets) else {
                            continue;
                        };
                        let theirs = service.txt_properties.get_property_val_str("ck");
                        if theirs != ours.as_deref() {
                            continue; // another cluster
                        }
                        if Some(record.id) == own {
                            continue;
                        }
                        // Another node took our instance name: publish a unique one.
                        if our_fullname.as_deref() == Some(service.fullname.as_str())
                            && let Some(me) = &me
                        {
                            let unique =
                                format!("{}-{}", me.name, &me.id.simple().to_string()[..8]);
                            if let Ok(info) = service_info(me, &unique, &ips, &ours) {
                                tracing::info!(name = %unique, "mDNS instance name in use; publishing a unique one");
                                if let Some(old) = our_fullname.take() {
                                    let _ = republish.unregister(&old);
                                }
                                our_fullname = Some(info.get_fullname().to_string());
                                let _ = republish.register(info);
                            }
                        }
                        // Bounded: anyone on the LAN can publish names.
                        if ids.len() < MAX_INSTANCES || ids.contains_key(&service.fullname) {
                            ids.insert(service.fullname.clone(), record.id);
                        } else {
                            tracing::warn!(
                                "more than {MAX_INSTANCES} mDNS instances; ignoring new ones"
                            );
                            continue;
                        }
                        if tx.send(MdnsEvent::Resolved(record)).await.is_err() {
                            return;
                        }
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        if let Some(id) = ids.remove(&fullname)
                            && tx.send(MdnsEvent::Removed(id)).await.is_err()
                        {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok((Self { daemon, registered }, rx))
    }

    /// Unregisters (peers' caches drop the instance at once) and stops.
    pub async fn shutdown(self) {
        if let Some(fullname) = &self.registered
            && let Ok(status) = self.daemon.unregister(fullname)
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
        }
        if let Ok(status) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
        }
    }
}

fn service_info(
    me: &MdnsAdvert,
    instance: &str,
    ips: &[IpAddr],
    cluster: &ClusterTag,
) -> Result<ServiceInfo, String> {
    let host = format!(
        "{}-{}.local.",
        sanitize(&me.name),
        &me.id.simple().to_string()[..8]
    );
    let mut txt: Vec<(String, String)> = vec![
        ("id".into(), me.id.to_string()),
        ("role".into(), me.role.clone()),
        ("v".into(), VERSION.to_string()),
        ("inc".into(), me.incarnation.to_string()),
        ("name".into(), me.name.clone()),
    ];
    if let Some(tag) = cluster {
        txt.push(("ck".into(), tag.clone()));
    }
    for (k, v) in &me.tags {
        if !RESERVED.contains(&k.as_str()) {
            txt.push((k.clone(), v.clone()));
        }
    }
    let txt: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ServiceInfo::new(SERVICE_TYPE, instance, &host, ips, me.port, &txt[..])
        .map_err(|e| format!("mDNS service: {e}"))
}

/// A DNS host label: letters, digits and hyphens.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    if s.is_empty() { "node".into() } else { s }
}

/// A node record from a resolved service, if it is a localnet node of our version.
fn record_of(service: &mdns_sd::ResolvedService, subnets: &[Interface]) -> Option<NodeRecord> {
    let props = &service.txt_properties;
    if props.get_property_val_str("v")? != VERSION.to_string() {
        return None;
    }
    let id = MemberId::parse_str(props.get_property_val_str("id")?).ok()?;
    let incarnation = props.get_property_val_str("inc")?.parse().ok()?;
    let role = props.get_property_val_str("role")?.to_string();
    let instance = service
        .fullname
        .strip_suffix(SERVICE_TYPE)
        .map(|s| s.trim_end_matches('.'))
        .unwrap_or(&service.fullname);
    let name = props
        .get_property_val_str("name")
        .filter(|n| !n.is_empty())
        .unwrap_or(instance)
        .to_string();
    let v4: Vec<Ipv4Addr> = service
        .addresses
        .iter()
        .filter_map(|a| match a.to_ip_addr() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    // Prefer an address on one of our subnets.
    let ip = v4
        .iter()
        .find(|ip| subnets.iter().any(|s| s.contains(**ip)))
        .or(v4.first())?;
    let tags = props
        .iter()
        .filter(|p| !RESERVED.contains(&p.key()))
        .map(|p| (p.key().to_string(), p.val_str().to_string()))
        .collect();
    Some(NodeRecord {
        id,
        name,
        incarnation,
        seq: 0,
        addr: SocketAddr::new(IpAddr::V4(*ip), service.port),
        role,
        tags,
        interval_ms: MDNS_INTERVAL_MS,
        ttl_ms: MDNS_TTL_MS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_labels_are_sanitised() {
        assert_eq!(sanitize("web 01.example"), "web-01-example");
        assert_eq!(sanitize(""), "node");
    }

    #[test]
    fn loopback_alone_never_starts_mdns() {
        let lo = Interface {
            name: "lo".into(),
            ip: Ipv4Addr::LOCALHOST,
            netmask: Ipv4Addr::new(255, 0, 0, 0),
        };
        assert!(!usable_on(std::slice::from_ref(&lo)));
        let eth = Interface {
            name: "eth0".into(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 0, 0),
        };
        assert!(usable_on(&[lo, eth]));
    }

    #[test]
    fn service_info_carries_the_txt_record() {
        let me = MdnsAdvert {
            id: MemberId::from_u128(7),
            name: "alpha".into(),
            incarnation: 42,
            role: "slave".into(),
            tags: [
                ("rack".to_string(), "r1".to_string()),
                ("id".to_string(), "spoof".to_string()),
            ]
            .into(),
            port: 4000,
        };
        let info = service_info(
            &me,
            "alpha",
            &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
            &None,
        )
        .unwrap();
        assert_eq!(info.get_property_val_str("ck"), None);
        let keyed = service_info(&me, "alpha", &[], &Some("0011223344556677".into())).unwrap();
        assert_eq!(keyed.get_property_val_str("ck"), Some("0011223344556677"));
        assert_eq!(info.get_fullname(), "alpha._localnet._tcp.local.");
        assert_eq!(
            info.get_property_val_str("id"),
            Some(MemberId::from_u128(7).to_string().as_str())
        );
        assert_eq!(info.get_property_val_str("inc"), Some("42"));
        assert_eq!(info.get_property_val_str("role"), Some("slave"));
        assert_eq!(info.get_property_val_str("v"), Some("1"));
        assert_eq!(info.get_property_val_str("rack"), Some("r1"));
        assert_eq!(info.get_port(), 4000);
    }
}
