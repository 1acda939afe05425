//! The SimpleLocalnet-style backend: one call to set a node up, then slave or master.
//!
//! This module owns the glue between discovery and the transport: it binds the node's
//! TCP address (its [`NodeId`]), announces it with the node's role, finds slaves by
//! asking the local daemon or by discovering on its own, and runs the slave server or
//! the master's function.

use crate::discovery::MemberId;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::discovery::peers::Peer;
use crate::discovery::{Refusal, Rejection};
use crate::node::control::{self, ControlClient, ControlError};
use crate::node::{Node, NodeOptions};
use crate::runtime::functions::RemoteTable;
use crate::runtime::jobs::SlaveMonitor;
use crate::runtime::logs::LogTargets;
use crate::runtime::master::Master;
use crate::runtime::protocol::NodeId;
use crate::runtime::slave::{self, SlaveOptions};

/// Settings of a backend beyond host, port and functions.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// Node name; default: the host name.
    pub name: Option<String>,
    /// Discovery settings (interfaces, group, port, key, tags, state dir...). Interfaces
    /// default to `lo` when the host is a loopback address, to the interface holding the
    /// host's address when it is one, else to every multicast-capable interface.
    pub discovery: NodeOptions,
    /// Most command jobs a slave runs at once; default: number of CPUs.
    pub slots: Option<usize>,
    /// Let a slave without a key run commands.
    pub insecure: bool,
    /// The local daemon's control socket, asked first when finding slaves.
    pub control: Option<PathBuf>,
    /// Where a slave's log lines go when a master redirects them; default: the targets
    /// of the [`crate::runtime::logs::RedirectLayer`] in the current tracing subscriber.
    pub logs: Option<Arc<LogTargets>>,
}

/// Errors of the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot listen on {addr}: {source}")]
    /// The slave's TCP listener could not be bound.
    Listen {
        /// The address it was to listen on.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error(transparent)]
    /// The discovery node could not start.
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    /// Talking to the local daemon's control socket failed.
    Control(#[from] ControlError),
    #[error("slave: {0}")]
    /// The slave failed while serving (I/O error held).
    Slave(std::io::Error),
}

/// A node of a master/slave cluster, before it takes its role.
///
/// ```no_run
/// # async fn demo() -> Result<(), localnet::BackendError> {
/// use localnet::{Backend, RemoteTable};
/// let backend = Backend::initialize("127.0.0.1", 8080, RemoteTable::new()).await?;
/// println!("I am {}", backend.node_id());
/// backend.start_slave().await?; // returns when a master terminates it
/// # Ok(()) }
/// ```
pub struct Backend {
    table: RemoteTable,
    opts: BackendOptions,
    listener: TcpListener,
    node_id: NodeId,
    announced: SocketAddr,
}

impl Backend {
    /// Binds `host:port` (port 0 = any) with default options.
    pub async fn initialize(
        host: &str,
        port: u16,
        table: RemoteTable,
    ) -> Result<Self, BackendError> {
        Self::initialize_with(host, port, table, BackendOptions::default()).await
    }

    /// Binds `host:port` with `opts`.
    pub async fn initialize_with(
        host: &str,
        port: u16,
        table: RemoteTable,
        mut opts: BackendOptions,
    ) -> Result<Self, BackendError> {
        let addr = format!("{host}:{port}");
        let listen_err = |source| BackendError::Listen {
            addr: addr.clone(),
            source,
        };
        let listener = TcpListener::bind(&addr).await.map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        if opts.discovery.interfaces.is_empty() {
            opts.discovery.interfaces = interfaces_for(local.ip());
        }
        // An unspecified host is announced as such: receivers use the source address.
        let node_id = NodeId::new(if local.ip().is_unspecified() {
            let ip = crate::node::netif::select(&opts.discovery.interfaces)
                .ok()
                .and_then(|i| i.first().map(|i| IpAddr::V4(i.ip)))
                .unwrap_or(local.ip());
            SocketAddr::new(ip, local.port())
        } else {
            local
        });
        Ok(Self {
            table,
            opts,
            listener,
            node_id,
            announced: local,
        })
    }

    /// This node's id (`nid://host:port`).
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn discovery(&self, role: &str) -> NodeOptions {
        let mut d = self.opts.discovery.clone();
        d.role = role.to_string();
        d.transport = Some(self.announced);
        if d.name.is_none() {
            d.name = self.opts.name.clone();
        }
        d
    }

    /// Node ids of every node discovered within `timeout` (any role).
    pub async fn find_peers(&self, timeout: Duration) -> Result<Vec<NodeId>, BackendError> {
        let peers = discover(&self.opts, None, timeout, &BTreeMap::new()).await?;
        Ok(peers.iter().map(|p| NodeId::new(p.addr)).collect())
    }

    /// Serves masters until one terminates this slave; then says goodbye and returns.
    pub async fn start_slave(self) -> Result<(), BackendError> {
        self.start_slave_until(std::future::pending::<()>()).await
    }

    /// Like [`Backend::start_slave`], but also stops when `shutdown` completes (a
    /// signal, say): jobs are killed and the goodbye is sent before it returns.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), localnet::BackendError> {
    /// use localnet::{Backend, RemoteTable};
    /// let backend = Backend::initialize("127.0.0.1", 8080, RemoteTable::new()).await?;
    /// backend
    ///     .start_slave_until(async { tokio::signal::ctrl_c().await.ok(); })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_slave_until(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BackendError> {
        self.start_slave_with(shutdown, |_, _| std::future::pending())
            .await
    }

    /// Like [`Backend::start_slave_until`], and runs `beside(node, monitor)` while the
    /// slave serves (dropped when it ends): what a slave's `--http` endpoint runs, with
    /// the slave's discovery node and its [`SlaveMonitor`].
    pub async fn start_slave_with<F: Future<Output = ()>>(
        self,
        shutdown: impl Future<Output = ()>,
        beside: impl FnOnce(crate::NodeHandle, Arc<SlaveMonitor>) -> F,
    ) -> Result<(), BackendError> {
        let mut discovery = self.discovery("slave");
        let name = discovery
            .name
            .clone()
            .unwrap_or_else(crate::node::host_name);
        discovery.name = Some(name.clone());
        let node = Node::start(discovery.clone()).await?;
        tracing::info!(node = %self.node_id, name = %name, "slave ready");
        let opts = SlaveOptions {
            name,
            slots: self.opts.slots.unwrap_or_else(default_slots),
            tags: discovery.tags.clone(),
            key: discovery.key.clone(),
            insecure: self.opts.insecure,
            table: self.table,
            logs: self.opts.logs.clone(),
            monitor: Some(Arc::new(SlaveMonitor::default())),
        };
        let beside = beside(node.handle(), opts.monitor.clone().unwrap_or_default());
        if opts.key.is_none() && opts.insecure {
            tracing::warn!("--insecure: any host on the LAN can run commands on this slave");
        }
        // What runs beside never ends the slave, even if it ends.
        let beside = async {
            beside.await;
            std::future::pending::<()>().await
        };
        let served = tokio::select! {
            served = slave::serve_until(self.listener, opts, shutdown) => served,
            () = beside => Ok(()),
        };
        node.shutdown().await;
        served.map_err(BackendError::Slave)
    }

    /// A master handle using this backend's key.
    pub fn master(&self) -> Master {
        let name = self
            .opts
            .name
            .clone()
            .unwrap_or_else(crate::node::host_name);
        Master::new(&name, self.opts.discovery.key.clone(), None)
    }

    /// Finds slaves (until every member has answered, for up to 1 s, as SimpleLocalnet
    /// waits), then runs `f` with them.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), localnet::BackendError> {
    /// use localnet::{Backend, RemoteTable};
    /// let backend = Backend::initialize("127.0.0.1", 8084, RemoteTable::new()).await?;
    /// backend
    ///     .start_master(|master, slaves| async move {
    ///         println!("Slaves: {slaves:?}");
    ///         master.terminate_all_slaves().await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_master<F, Fut, T>(self, f: F) -> Result<T, BackendError>
    where
        F: FnOnce(Master, Vec<NodeId>) -> Fut,
        Fut: Future<Output = T>,
    {
        let master = self.master();
        let slaves = self
            .find_slaves(None, Duration::from_secs(1), &BTreeMap::new())
            .await?;
        master.add_known(&slaves);
        Ok(f(master, slaves).await)
    }

    /// Slaves (role `slave`, with all of `tags`), discovered until `wait_for` of them
    /// are known (without `wait_for`: until every member has answered), for at most
    /// `timeout`.
    pub async fn find_slaves(
        &self,
        wait_for: Option<usize>,
        timeout: Duration,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<NodeId>, BackendError> {
        let peers = discover(&self.opts, wait_for, timeout, tags).await?;
        Ok(peers.iter().map(|p| NodeId::new(p.addr)).collect())
    }
}

/// The peers that are slaves with all of `tags` (every peer when `tags` is `None`).
fn select<'a>(
    peers: &'a [Peer],
    want_slaves: bool,
    tags: &BTreeMap<String, String>,
) -> Vec<&'a Peer> {
    peers
        .iter()
        .filter(|p| !want_slaves || (p.role == "slave" && p.verified))
        .filter(|p| tags.iter().all(|(k, v)| p.tags.get(k) == Some(v)))
        .collect()
}

/// Finds slaves: from the local daemon if one answers, else by discovering on its own.
/// Stops at `wait_for` slaves, without `wait_for` once the discovery is settled (every
/// member has answered), and at the latest at `timeout`.
pub async fn discover(
    opts: &BackendOptions,
    wait_for: Option<usize>,
    timeout: Duration,
    tags: &BTreeMap<String, String>,
) -> Result<Vec<Peer>, BackendError> {
    Ok(
        discover_explained(opts, wait_for, timeout, tags, |_: &[Peer]| {})
            .await?
            .slaves,
    )
}

/// What a search for slaves found, with hints at why others were not found.
#[derive(Clone, Debug, Default)]
pub struct Discovered {
    /// The slaves found (verified, with all the tags asked for).
    pub slaves: Vec<Peer>,
    /// When fewer than asked for (or none) were found: the likely causes seen, one
    /// sentence each (clocks, keys, tags, unverified peers). Empty otherwise.
    pub hints: Vec<String>,
}

/// What a node knew at the end of a search: its peers, its refusals, and its key.
pub struct Seen<'a> {
    /// The peers it lists.
    pub peers: &'a [Peer],
    /// What it refused lately.
    pub rejections: &'a [Rejection],
    /// Only slaves count (with these tags); `None`: every peer counts.
    pub slaves_with: Option<&'a BTreeMap<String, String>>,
    /// Whether the node that searched has a cluster key.
    pub keyed: bool,
}

/// Sentences that say why nodes may be missing from a search's result: refusals (clock
/// off, key mismatch, replays), unverified peers and slaves with other tags.
pub fn explain_missing(seen: &Seen<'_>) -> Vec<String> {
    let mut hints = Vec::new();
    let window_s = crate::discovery::Config::default().replay_window_ms / 1000;
    let counted = |p: &&Peer| seen.slaves_with.is_none() || p.role == "slave";
    for p in seen.peers.iter().filter(counted).filter(|p| !p.verified) {
        let why = p
            .unverified_reason
            .as_deref()
            .unwrap_or("not authenticated");
        hints.push(format!(
            "{} ({}, {}) is seen only through mDNS and not verified: {why}",
            p.name,
            p.addr.ip(),
            p.role
        ));
    }
    let verified = |id: Option<MemberId>| {
        id.is_some_and(|id| seen.peers.iter().any(|p| p.id == id && p.verified))
    };
    let mentioned = |r: &Rejection| {
        seen.peers
            .iter()
            .any(|p| !p.verified && (r.id == Some(p.id) || r.source.ip() == p.addr.ip()))
    };
    for r in seen
        .rejections
        .iter()
        .filter(|r| !verified(r.id) && !mentioned(r))
    {
        let who = match (&r.name, r.id) {
            (Some(name), _) => format!("{name} ({})", r.source.ip()),
            (None, Some(id)) => format!("node {id} ({})", r.source.ip()),
            (None, None) => format!("a node at {}", r.source),
        };
        hints.push(format!(
            "{} datagrams from {who} were refused: {}",
            r.count, r.reason
        ));
    }
    if seen.peers.iter().any(|p| !p.verified) || seen.rejections.iter().any(|r| !verified(r.id)) {
        let mut advice = Vec::new();
        let reasons: Vec<Refusal> = seen.rejections.iter().map(|r| r.reason).collect();
        let texts: Vec<&str> = seen
            .peers
            .iter()
            .filter_map(|p| p.unverified_reason.as_deref())
            .collect();
        if reasons
            .iter()
            .any(|r| matches!(r, Refusal::ClockOff { .. }))
            || texts.iter().any(|t| t.starts_with("clock"))
        {
            advice.push(format!(
                "a keyed cluster refuses clocks more than {window_s} s apart: synchronise them (NTP)"
            ));
        }
        if reasons.iter().any(|r| {
            matches!(
                r,
                Refusal::OtherKey | Refusal::SenderKeyed | Refusal::SenderUnkeyed
            )
        }) || texts.iter().any(|t| t.starts_with("key"))
        {
            advice.push(match seen.keyed {
                true => "give every node the same --key-file".to_string(),
                false => "pass the cluster's --key-file".to_string(),
            });
        }
        hints.extend(advice);
    }
    if let Some(tags) = seen.slaves_with.filter(|t| !t.is_empty()) {
        let wanted: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for p in seen
            .peers
            .iter()
            .filter(|p| p.role == "slave" && p.verified)
        {
            if !tags.iter().all(|(k, v)| p.tags.get(k) == Some(v)) {
                let theirs: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                hints.push(format!(
                    "slave {} has tags [{}], not all of --tag {}",
                    p.name,
                    theirs.join(","),
                    wanted.join(" --tag ")
                ));
            }
        }
    }
    hints
}

/// Whether a daemon's key (its `keyed` and `cluster` status fields) differs from ours:
/// a sentence saying so, when it does.
pub fn daemon_key_mismatch(
    daemon_keyed: bool,
    daemon_cluster: Option<&str>,
    ours: Option<&crate::key::ClusterKey>,
    path: &std::path::Path,
) -> Option<String> {
    let path = path.display();
    match (daemon_keyed, ours) {
        (false, Some(_)) => Some(format!(
            "the daemon on {path} runs without a cluster key but this command has one: it cannot see keyed nodes; give it the key or leave out --control"
        )),
        (true, None) => Some(format!(
            "the daemon on {path} runs with a cluster key but this command has none: pass --key-file"
        )),
        (true, Some(key)) if daemon_cluster.is_some_and(|c| c != key.cluster_tag()) => Some(
            format!("the daemon on {path} uses another cluster key than this command"),
        ),
        _ => None,
    }
}

/// [`discover`], with hints at why fewer slaves than asked for (or none) were found,
/// calling `progress` with the matching slaves known whenever they may have changed
/// (for a progress display, or to connect to each while the search goes on).
pub async fn discover_explained(
    opts: &BackendOptions,
    wait_for: Option<usize>,
    timeout: Duration,
    tags: &BTreeMap<String, String>,
    mut progress: impl FnMut(&[Peer]),
) -> Result<Discovered, BackendError> {
    let want = wait_for.unwrap_or(usize::MAX);
    let short = |found: &[Peer]| found.is_empty() || wait_for.is_some_and(|n| found.len() < n);
    let keyed = opts.discovery.key.is_some();
    let deadline = crate::node::deadline_after(timeout);
    // The local daemon already knows the slaves, when it discovers the same way: ask it
    // if named explicitly (then it must answer), or when discovery is the default one
    // (all interfaces, no key) and a daemon answers on the default socket.
    let default_discovery = opts.discovery.key.is_none() && opts.discovery.interfaces.is_empty();
    let named = control::explicit_path(opts.control.as_deref());
    let path = named.clone().unwrap_or_else(control::default_path);
    let client = match named {
        Some(_) => Some(control::connect_named(&path).await?),
        None if default_discovery => ControlClient::connect(&path).await.ok(),
        None => None,
    };
    if let Some(mut client) = client {
        loop {
            let peers = client.peers(None, Duration::ZERO).await?;
            let found: Vec<Peer> = select(&peers, true, tags).into_iter().cloned().collect();
            progress(&found);
            // With no count to wait for, what the daemon knows is the answer.
            if wait_for.is_none() || found.len() >= want || tokio::time::Instant::now() >= deadline
            {
                let mut hints = Vec::new();
                if short(&found) {
                    let status = client.status().await.unwrap_or_default();
                    let rejections: Vec<Rejection> =
                        serde_json::from_value(status["rejections"].clone()).unwrap_or_default();
                    hints.extend(daemon_key_mismatch(
                        status["keyed"].as_bool().unwrap_or(false),
                        status["cluster"].as_str(),
                        opts.discovery.key.as_ref(),
                        &path,
                    ));
                    hints.extend(explain_missing(&Seen {
                        peers: &peers,
                        rejections: &rejections,
                        slaves_with: Some(tags),
                        keyed,
                    }));
                }
                return Ok(Discovered {
                    slaves: found,
                    hints,
                });
            }
            let step = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(step.min(Duration::from_millis(20))).await;
        }
    }
    let mut node_opts = opts.discovery.clone();
    node_opts.protocol.observer = true;
    let node = Node::start(node_opts).await?;
    let handle = node.handle();
    let mut events = handle.subscribe();
    // With no count to wait for, the search ends once the view is settled: every
    // member that answers the probes has answered (`timeout` stays the upper bound).
    // Settled with no slave at all, it waits on for one until the timeout: nothing is
    // lost by waiting, and members that cannot answer (a clock off, another key) are
    // heard by their heartbeats meanwhile, for the hints.
    let settled = async {
        match wait_for {
            None => handle.settled().await,
            Some(_) => std::future::pending().await,
        }
    };
    tokio::pin!(settled);
    let mut settled_fired = false;
    let (found, peers) = loop {
        let peers = handle.peers().await?;
        let found: Vec<Peer> = select(&peers, true, tags).into_iter().cloned().collect();
        progress(&found);
        if found.len() >= want || (settled_fired && !found.is_empty()) {
            break (found, peers);
        }
        tokio::select! {
            event = tokio::time::timeout_at(deadline, events.recv()) => match event {
                Err(_) => break (found, peers),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break (found, peers),
                Ok(_) => {}
            },
            // Settled: one more look at the table, then done (if it found any).
            _ = &mut settled, if !settled_fired => settled_fired = true,
        }
    };
    let mut hints = Vec::new();
    if short(&found) {
        // What is known now, not at the last event: refusals may have come since.
        let peers = handle.peers().await.unwrap_or(peers);
        let rejections = handle
            .status()
            .await
            .map(|s| s.rejections)
            .unwrap_or_default();
        hints = explain_missing(&Seen {
            peers: &peers,
            rejections: &rejections,
            slaves_with: Some(tags),
            keyed,
        });
    }
    node.shutdown().await;
    Ok(Discovered {
        slaves: found,
        hints,
    })
}

/// `lo` for a loopback host; the interface holding a specific address; else all.
fn interfaces_for(ip: IpAddr) -> Vec<String> {
    if ip.is_loopback() {
        return vec!["lo".into()];
    }
    if ip.is_unspecified() {
        return Vec::new();
    }
    if_addrs::get_if_addrs()
        .ok()
        .and_then(|all| all.into_iter().find(|i| i.ip() == ip).map(|i| vec![i.name]))
        .unwrap_or_default()
}

/// Number of CPUs.
pub fn default_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, ip: u8, role: &str, verified: bool, tags: &[(&str, &str)]) -> Peer {
        Peer {
            id: MemberId::from_u128(u128::from(ip)),
            name: name.into(),
            addr: SocketAddr::from(([10, 0, 0, ip], 4000)),
            role: role.into(),
            state: crate::PeerState::Alive,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            last_seen_ms: 0,
            incarnation: 1,
            source: SocketAddr::from(([10, 0, 0, ip], 7766)),
            interval_ms: 200,
            ttl_ms: 900,
            paths: vec!["mdns".into()],
            verified,
            unverified_reason: (!verified).then(|| "clock off by 41 s (ahead)".to_string()),
        }
    }

    #[test]
    fn missing_slaves_are_explained_by_clock_key_and_tags() {
        let peers = [
            peer("fast", 2, "slave", false, &[]),
            peer("wrongrack", 3, "slave", true, &[("rack", "r2")]),
            peer("fine", 4, "slave", true, &[("rack", "r1")]),
        ];
        let rejections = [
            Rejection {
                source: "10.0.0.2:7766".parse().unwrap(),
                id: Some(MemberId::from_u128(2)),
                name: Some("fast".into()),
                reason: Refusal::ClockOff { offset_ms: 41_000 },
                count: 9,
                last_ms_ago: 5,
            },
            Rejection {
                source: "10.0.0.9:7766".parse().unwrap(),
                id: None,
                name: Some("stranger".into()),
                reason: Refusal::OtherKey,
                count: 3,
                last_ms_ago: 5,
            },
            // Incidental: a verified peer's duplicate is no cause.
            Rejection {
                source: "10.0.0.4:7766".parse().unwrap(),
                id: Some(MemberId::from_u128(4)),
                name: Some("fine".into()),
                reason: Refusal::Replayed,
                count: 1,
                last_ms_ago: 5,
            },
        ];
        let tags: BTreeMap<String, String> = [("rack".to_string(), "r1".to_string())].into();
        let hints = explain_missing(&Seen {
            peers: &peers,
            rejections: &rejections,
            slaves_with: Some(&tags),
            keyed: true,
        })
        .join("\n");
        assert!(hints.contains("fast (10.0.0.2, slave) is seen only through mDNS and not verified: clock off by 41 s (ahead)"), "{hints}");
        assert!(hints.contains("3 datagrams from stranger (10.0.0.9) were refused: key mismatch (another cluster key)"), "{hints}");
        assert!(hints.contains("more than 30 s apart"), "{hints}");
        assert!(hints.contains("same --key-file"), "{hints}");
        assert!(
            hints.contains("slave wrongrack has tags [rack=r2], not all of --tag rack=r1"),
            "{hints}"
        );
        assert!(!hints.contains("fine"), "{hints}");
        assert_eq!(hints.matches("clock off").count(), 1, "{hints}");
        let key = crate::key::ClusterKey::from_bytes([1; 32]);
        let path = std::path::Path::new("/run/x.sock");
        assert!(
            daemon_key_mismatch(false, None, Some(&key), path)
                .unwrap()
                .contains("without a cluster key but this command has one")
        );
        assert!(
            daemon_key_mismatch(true, Some("beef"), Some(&key), path)
                .unwrap()
                .contains("another cluster key")
        );
        assert_eq!(
            daemon_key_mismatch(true, Some(&key.cluster_tag()), Some(&key), path),
            None
        );
        assert_eq!(daemon_key_mismatch(false, None, None, path), None);
    }

    #[test]
    fn loopback_host_keeps_discovery_on_lo() {
        assert_eq!(
            interfaces_for("127.0.0.1".parse().unwrap()),
            vec!["lo".to_string()]
        );
        assert!(interfaces_for("0.0.0.0".parse().unwrap()).is_empty());
    }
}
