//! The embeddable node: the discovery core driven by tokio over real sockets.
//!
//! This module owns the I/O loop around [`crate::discovery::Discovery`]: it feeds it datagrams
//! from the sockets and timer ticks from the clock, sends what it asks to send, and
//! publishes its peer events. The daemon is this node plus a control socket; the
//! library's one-shot discovery is this node in observer mode.

pub mod control;
mod driver;
pub mod mdns;
pub mod netif;

use crate::discovery::MemberId;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use self::driver::{Clock, Driver, EVENT_BUFFER};
use self::mdns::Mdns;
use self::netif::NetError;
use crate::discovery::peers::{Peer, PeerEvent};
use crate::discovery::{Config, ConfigError, Destination, Discovery, LocalNode, Rejection, Stats};
use crate::key::ClusterKey;

/// Default multicast group.
pub const DEFAULT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 76, 78);
/// Default multicast port.
pub const DEFAULT_PORT: u16 = 7766;

/// Which paths discovery uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// localnet's own multicast protocol only.
    Multicast,
    /// mDNS/DNS-SD only (`_localnet._tcp.local.`).
    Mdns,
    /// Both, merged into one table (the default).
    #[default]
    Both,
}

impl std::str::FromStr for DiscoveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "multicast" => Ok(Self::Multicast),
            "mdns" => Ok(Self::Mdns),
            "both" => Ok(Self::Both),
            _ => Err(format!("{s:?}: expected multicast, mdns or both")),
        }
    }
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Name shown to peers; default: the host name.
    pub name: Option<String>,
    /// Role announced (`daemon`, `slave`, ...).
    pub role: String,
    /// Interfaces to use; empty = every multicast-capable one.
    pub interfaces: Vec<String>,
    /// Multicast group.
    pub group: Ipv4Addr,
    /// Multicast port.
    pub port: u16,
    /// Tags announced.
    pub tags: BTreeMap<String, String>,
    /// Cluster key; `None` = open cluster.
    pub key: Option<ClusterKey>,
    /// Where the node id persists; `None` = a new id every start.
    pub state_dir: Option<PathBuf>,
    /// Transport address to announce; default: this node's unicast discovery port,
    /// with the IP left for receivers to take from the datagram.
    pub transport: Option<SocketAddr>,
    /// Protocol tunables (observer mode among them).
    pub protocol: Config,
    /// Multicast, mDNS or both.
    pub discovery: DiscoveryMode,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            name: None,
            role: "daemon".into(),
            interfaces: Vec::new(),
            group: DEFAULT_GROUP,
            port: DEFAULT_PORT,
            tags: BTreeMap::new(),
            key: None,
            state_dir: None,
            transport: None,
            protocol: Config::default(),
            discovery: DiscoveryMode::Both,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    /// The network could not be used (interfaces, sockets, multicast).
    Net(#[from] NetError),
    #[error(transparent)]
    /// The node's own record cannot be announced.
    Config(#[from] ConfigError),
    #[error("state directory {path}: {source}")]
    /// The state directory could not be read or written.
    State {
        /// The state directory's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("state directory {path}: node-id file holds no valid id; remove it to get a new one")]
    /// The state directory's node-id file holds no valid id.
    BadState {
        /// The state directory's path.
        path: String,
    },
    #[error("the node has stopped")]
    /// The node's task has stopped, so it cannot answer.
    Stopped,
    #[error("{0}")]
    /// mDNS could not start, or failed when it was the only discovery mode (reason held).
    Mdns(String),
}

/// A node's status, as `localnet status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Stable node id.
    pub id: MemberId,
    /// Human name.
    pub name: String,
    /// Role: `daemon`, `slave`, `master`, ...
    pub role: String,
    /// Incarnation: grows each time the node restarts.
    pub incarnation: u64,
    /// Number of peers known.
    pub peers: usize,
    /// The current announcement interval, in milliseconds.
    pub interval_ms: u64,
    /// The unicast addresses the node's sockets are bound to.
    pub unicast: Vec<SocketAddr>,
    /// The multicast group address (`ip:port`), or empty when no sockets are open.
    pub group: String,
    /// Names of the interfaces discovery runs on.
    pub interfaces: Vec<String>,
    /// Whether datagrams are authenticated with a cluster key.
    pub keyed: bool,
    /// The cluster key's public tag (as mDNS announces it), when keyed.
    pub cluster: Option<String>,
    /// Which discovery paths run (multicast, mDNS or both).
    pub discovery: DiscoveryMode,
    /// Whether mDNS is running.
    pub mdns: bool,
    /// Time since the node started, in milliseconds.
    pub uptime_ms: u64,
    /// Counters of the discovery core.
    pub stats: Stats,
    /// Datagrams dropped because the node could not keep up.
    pub dropped_overload: u64,
    /// Sources whose datagrams were refused lately, and why (see [`Rejection`]).
    pub rejections: Vec<Rejection>,
}

enum Command {
    Peers(oneshot::Sender<Vec<Peer>>),
    Status(oneshot::Sender<Status>),
    /// Answered once the core's view is settled ([`Discovery::settled_at`]).
    Settled(oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
}

/// Most callers waiting for a node's view to settle; more are answered at once.
const SETTLE_WAITERS: usize = 64;

/// A cheap, cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<PeerEvent>,
}

impl NodeHandle {
    /// The known peers.
    pub async fn peers(&self) -> Result<Vec<Peer>, NodeError> {
        self.ask(Command::Peers).await
    }

    /// Status and counters.
    pub async fn status(&self) -> Result<Status, NodeError> {
        self.ask(Command::Status).await
    }

    /// Sends the driver a command and waits for its answer.
    async fn ask<T>(&self, command: fn(oneshot::Sender<T>) -> Command) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Waits until the node's view is settled: no more answers to its probes can come
    /// ([`Discovery::settled_at`]: its last probe, plus the longest reply window its
    /// answers announced, plus a margin). A node that speaks no multicast (mDNS only)
    /// never settles: bound this with a timeout, or use [`NodeHandle::wait_settled`].
    pub async fn settled(&self) -> Result<(), NodeError> {
        self.ask(Command::Settled).await
    }

    /// Waits until the node's view is settled ([`NodeHandle::settled`]) or `timeout`
    /// passes, whichever comes first; returns the peers known then. This is how a
    /// one-shot discovery knows it has found everyone who answered, without waiting
    /// for its whole timeout.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<Vec<Peer>, NodeError> {
        match tokio::time::timeout_at(deadline_after(timeout), self.settled()).await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) | Err(_) => self.peers().await,
        }
    }

    /// A stream of peer events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Waits until at least `n` peers are known or `timeout` passes; returns the peers
    /// known then.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Peer>, NodeError> {
        let deadline = deadline_after(timeout);
        let mut events = self.subscribe();
        loop {
            let peers = self.peers().await?;
            if peers.len() >= n {
                return Ok(peers);
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return self.peers().await,
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(NodeError::Stopped),
                Ok(_) => {}
            }
        }
    }
}

/// A running node.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use localnet::{Node, NodeOptions};
/// let node = Node::start(NodeOptions {
///     name: Some("worker-1".into()),
///     interfaces: vec!["lo".into()],
///     ..NodeOptions::default()
/// })
/// .await?;
/// let mut events = node.handle().subscribe();
/// let peers = node.handle().wait_for(2, std::time::Duration::from_secs(1)).await?;
/// println!("{} peers", peers.len());
/// if let Ok(event) = events.try_recv() {
///     println!("{}: {}", event.kind(), event.peer().name);
/// }
/// node.shutdown().await; // says goodbye
/// # Ok(()) }
/// ```
pub struct Node {
    handle: NodeHandle,
    task: JoinHandle<()>,
    id: MemberId,
}

impl Node {
    /// Opens the sockets, probes the group and starts the I/O loop.
    pub async fn start(mut opts: NodeOptions) -> Result<Node, NodeError> {
        let interfaces = netif::select(&opts.interfaces)?;
        let use_multicast = opts.discovery != DiscoveryMode::Mdns;
        let use_mdns = opts.discovery != DiscoveryMode::Multicast && mdns::usable_on(&interfaces);
        if opts.discovery == DiscoveryMode::Mdns && !use_mdns {
            return Err(NodeError::Mdns(
                "mDNS is not used on loopback alone: name a network interface, or use --discovery multicast".into(),
            ));
        }
        opts.protocol.multicast = use_multicast;
        let sockets = match use_multicast {
            true => Some(netif::open(opts.group, opts.port, &interfaces)?),
            false => None,
        };
        let clock = Clock::new();
        let id = match &opts.state_dir {
            Some(dir) => load_or_create_id(dir)?,
            None => MemberId::new_v4(),
        };
        let port = sockets
            .as_ref()
            .and_then(|s| s.unicast_addrs().first().map(|a| a.port()))
            .unwrap_or(opts.port);
        let me = LocalNode {
            id,
            name: opts.name.clone().unwrap_or_else(host_name),
            incarnation: clock.now(),
            addr: opts
                .transport
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
            role: opts.role.clone(),
            tags: opts.tags.clone(),
        };
        let seed =
            u64::from_le_bytes(id.as_bytes()[..8].try_into().unwrap_or_default()) ^ clock.now();
        let publish = (!opts.protocol.observer).then(|| mdns::MdnsAdvert {
            id,
            name: me.name.clone(),
            incarnation: me.incarnation,
            role: me.role.clone(),
            tags: me.tags.clone(),
            port: me.addr.port(),
        });
        let mut core = Discovery::new(
            opts.protocol.clone(),
            me,
            opts.key.clone(),
            seed,
            clock.now(),
        )?;
        core.start(clock.now());
        // The first probe tells whether multicast works at all: fail loudly if not.
        let mut first_error = None;
        let mut delivered = false;
        while let Some(tx) = core.poll_transmit() {
            let Some(sockets) = &sockets else { break };
            match tx.dest {
                Destination::Group => {
                    for (iface, socket) in &sockets.unicast {
                        match socket.send_to(&tx.payload, sockets.group_addr).await {
                            Ok(_) => delivered = true,
                            Err(source) => {
                                first_error.get_or_insert(NetError::Send {
                                    group: opts.group,
                                    port: opts.port,
                                    iface: iface.name.clone(),
                                    source,
                                });
                            }
                        }
                    }
                }
                Destination::Unicast(_) => {}
            }
        }
        if let (false, Some(err)) = (delivered, first_error) {
            return Err(err.into());
        }
        let (mdns, mdns_events) = if use_mdns {
            match Mdns::start(
                &interfaces,
                publish,
                opts.key.as_ref().map(ClusterKey::cluster_tag),
            ) {
                Ok((m, rx)) => (Some(m), Some(rx)),
                Err(e) if opts.discovery == DiscoveryMode::Mdns => return Err(NodeError::Mdns(e)),
                Err(e) => {
                    tracing::warn!("{e}; going on with multicast only");
                    (None, None)
                }
            }
        } else {
            (None, None)
        };
        let (commands, command_rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let handle = NodeHandle { commands, events };
        let driver = Driver {
            core,
            sockets: sockets.map(Arc::new),
            mdns,
            discovery: opts.discovery,
            clock,
            events: handle.events.clone(),
            name: opts.name.clone().unwrap_or_else(host_name),
            keyed: opts.key.is_some(),
            cluster: opts.key.as_ref().map(ClusterKey::cluster_tag),
            role: opts.role,
            interfaces: interfaces.into_iter().map(|i| i.name).collect(),
            dropped_overload: Arc::new(AtomicU64::new(0)),
            send_errors: 0,
            next_send_error_log: 0,
            settle_waiters: Vec::new(),
        };
        let task = tokio::spawn(driver.run(command_rx, mdns_events));
        Ok(Node { handle, task, id })
    }

    /// A handle for queries and events.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// This node's id.
    pub fn id(&self) -> MemberId {
        self.id
    }

    /// Says goodbye to the group and stops.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.handle.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// The instant `timeout` from now; a timeout too long to add is a deadline a century
/// away (a library caller's `Duration::MAX` must not panic).
pub(crate) fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

fn load_or_create_id(dir: &Path) -> Result<MemberId, NodeError> {
    let state_err = |source| NodeError::State {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(state_err)?;
    let file = dir.join("node-id");
    match std::fs::read_to_string(&file) {
        Ok(text) => MemberId::parse_str(text.trim()).map_err(|_| NodeError::BadState {
            path: dir.display().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = MemberId::new_v4();
            let tmp = dir.join("node-id.tmp");
            std::fs::write(&tmp, format!("{id}\n")).map_err(state_err)?;
            std::fs::rename(&tmp, &file).map_err(state_err)?;
            Ok(id)
        }
        Err(e) => Err(state_err(e)),
    }
}

/// The host's name, or `localnet` if it has none.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localnet".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::driver::read_loop;
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::net::UdpSocket;

    #[test]
    fn a_deadline_too_far_to_add_does_not_panic() {
        let now = tokio::time::Instant::now();
        assert!(deadline_after(Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365));
        let soon = deadline_after(Duration::from_millis(5));
        assert!(soon >= now + Duration::from_millis(5));
    }

    #[test]
    fn node_id_persists() {
        let dir = std::env::temp_dir().join(format!("localnet-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create_id(&dir).unwrap();
        let b = load_or_create_id(&dir).unwrap();
        assert_eq!(a, b);
        std::fs::write(dir.join("node-id"), "garbage").unwrap();
        assert!(matches!(
            load_or_create_id(&dir),
            Err(NodeError::BadState { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A reader facing a full inbox counts what it drops, in a counter that does not
    /// grow with the flood (it was an unbounded channel of one item per drop).
    #[tokio::test]
    async fn a_full_inbox_is_counted_not_queued() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let counter = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let counter = Arc::clone(&counter);
            async move { read_loop(&socket, tx, &counter).await }
        });
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            sender.send_to(b"x", to).unwrap();
            tokio::task::yield_now().await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while counter.load(Ordering::Relaxed) < 196 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            counter.load(Ordering::Relaxed),
            196,
            "4 queued, the rest counted"
        );
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 4);
        reader.abort();
    }

    /// Two nodes and an observer find each other over loopback multicast.
    #[tokio::test]
    async fn nodes_find_each_other_on_loopback() {
        let port = 20000 + (std::process::id() % 20000) as u16;
        let opts = |name: &str| NodeOptions {
            name: Some(name.into()),
            interfaces: vec!["lo".into()],
            port,
            ..NodeOptions::default()
        };
        let a = Node::start(opts("a")).await.unwrap();
        let b = Node::start(opts("b")).await.unwrap();
        let peers = a
            .handle()
            .wait_for(1, Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].name, "b");
        assert_eq!(peers[0].addr.ip(), Ipv4Addr::LOCALHOST);
        let mut observer_opts = opts("obs");
        observer_opts.protocol.observer = true;
        let obs = Node::start(observer_opts).await.unwrap();
        let seen = obs
            .handle()
            .wait_for(2, Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(seen.len(), 2);
        obs.shutdown().await;
        let mut events = a.handle().subscribe();
        b.shutdown().await;
        let left = tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(left, PeerEvent::Left(p) if p.name == "b"));
        assert!(
            a.handle().peers().await.unwrap().is_empty(),
            "the observer was never listed"
        );
        a.shutdown().await;
    }
}
