//! localnet: zero-configuration discovery of machines on a LAN.
//!
//! Run `localnet daemon` on every machine; `localnet peers` (or [`find_peers`]) on any
//! of them lists the others within a fraction of a second. The crate is layered (see
//! ARCHITECTURE.md for the map); its public surface is re-exported here:
//!
//! - [`discovery`] (public as a module): the discovery protocol as a pure state machine
//!   (no I/O, no clock), its wire format, its peer table, admission and timers, and (with
//!   the `sim` feature) a simulated LAN for it. [`ClusterKey`]: the optional cluster key.
//! - The tokio shell (private module `node`): [`Node`] and [`NodeHandle`] drive the
//!   discovery core over real sockets and mDNS; [`control`] is the daemon's control socket.
//! - The SimpleLocalnet-style runtime (private module `runtime`): [`Backend`] (one call
//!   to set a node up, then slave or master), [`Master`], [`RemoteTable`], the slave
//!   ([`serve_slave`]); [`protocol`] and [`transport`] are public so that other tools can
//!   speak to a slave.
//! - [`daemon`]: the discovery daemon's loop (control socket, signals, systemd);
//!   [`service`]: systemd integration; [`stdio`]: output that never blocks the runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), localnet::Error> {
//! let peers = localnet::find_peers(std::time::Duration::from_secs(1)).await?;
//! for peer in peers {
//!     println!("{} at {}", peer.name, peer.addr);
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod daemon;
pub mod discovery;
pub mod http;
mod key;
pub mod memory;
mod node;
pub mod nodeset;
mod runtime;
pub mod service;
pub mod stdio;

use std::path::PathBuf;
use std::time::Duration;

use runtime::backend;

/// The daemon's control socket: where it listens, the client that asks it, the requests.
pub use node::control;
/// The master–slave session's frames, public so that a tool (or a test) can speak to a
/// slave or a master directly.
pub use runtime::protocol;
/// Framed, optionally Noise-encrypted TCP between a master and a slave.
pub use runtime::transport;

pub use discovery::MemberId;
pub use discovery::peers::{Peer, PeerEvent, PeerState};
pub use key::{ClusterKey, KeyError};
pub use node::{
    DEFAULT_GROUP, DEFAULT_PORT, DiscoveryMode, Node, NodeError, NodeHandle, NodeOptions, Status,
    host_name,
};
pub use runtime::backend::{
    Backend, BackendError, BackendOptions, Discovered, discover, discover_explained,
};
pub use runtime::functions::error_text;
pub use runtime::functions::{RemoteError, RemoteResult, RemoteTable};
pub use runtime::jobs::{RunningJob, SlaveCounts, SlaveMonitor};
pub use runtime::logs::{LIFECYCLE, LogTargets, RedirectLayer};
pub use runtime::master::{
    CommandJob, CopiedFile, DownloadEvent, ExecEvent, FileDownload, FileUpload, JobInput,
    LineSplitter, LogSink, Master, MasterError, RemoteTask, TERMINATE_TIMEOUT, TerminateReport,
};
pub use runtime::protocol::{INPUT_CHUNK, INPUT_WINDOW, JobExit, NodeId, Stream};
pub use runtime::slave::{
    MAX_CONNECTIONS as MAX_SLAVE_CONNECTIONS, MAX_IN_FLIGHT_PER_SESSION, MAX_IN_FLIGHT_PER_SLAVE,
    SlaveOptions, serve as serve_slave, serve_until as serve_slave_until,
};

/// Every Rust block of README.md, compiled as a doctest so that the README's examples
/// stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Errors of the library's entry points.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// A node (for a discovery of its own) could not start or stopped.
    Node(#[from] NodeError),
    #[error(transparent)]
    /// Talking to the daemon's control socket failed.
    Control(#[from] control::ControlError),
    #[error(transparent)]
    /// The cluster key could not be read.
    Key(#[from] KeyError),
}

/// How [`find_peers_with`] looks for peers.
#[derive(Clone, Debug)]
pub struct FindOptions {
    /// The daemon's control socket, which must then answer; default: `$LOCALNET_CONTROL`
    /// (likewise), else [`control::default_path`] if a daemon answers there, else a
    /// discovery of its own.
    pub control: Option<PathBuf>,
    /// The longest time to look. Without `wait_for`, a discovery of its own returns
    /// sooner, once every member that answers its probes has answered
    /// ([`NodeHandle::wait_settled`]).
    pub timeout: Duration,
    /// Return as soon as this many peers are known.
    pub wait_for: Option<usize>,
    /// How to discover when no daemon answers (the node runs as an observer).
    pub node: NodeOptions,
}

impl Default for FindOptions {
    fn default() -> Self {
        Self {
            control: None,
            timeout: Duration::from_secs(1),
            wait_for: None,
            node: NodeOptions::default(),
        }
    }
}

/// Lists the peers on the LAN: asks the local daemon if one answers on the control
/// socket, else discovers on its own until every member has answered (at most
/// `timeout`).
///
/// ```no_run
/// # async fn demo() -> Result<(), localnet::Error> {
/// let peers = localnet::find_peers(std::time::Duration::from_millis(500)).await?;
/// println!("{} peers", peers.len());
/// # Ok(()) }
/// ```
pub async fn find_peers(timeout: Duration) -> Result<Vec<Peer>, Error> {
    find_peers_with(&FindOptions {
        timeout,
        ..FindOptions::default()
    })
    .await
}

/// Like [`find_peers`], but returns as soon as `n` peers are known (or at `timeout`
/// with those found so far).
///
/// ```no_run
/// # async fn demo() -> Result<(), localnet::Error> {
/// let peers = localnet::find_peers_until(3, std::time::Duration::from_secs(2)).await?;
/// assert!(peers.len() >= 3 || true);
/// # Ok(()) }
/// ```
pub async fn find_peers_until(n: usize, timeout: Duration) -> Result<Vec<Peer>, Error> {
    find_peers_with(&FindOptions {
        timeout,
        wait_for: Some(n),
        ..FindOptions::default()
    })
    .await
}

/// [`find_peers`] with every option. A control socket named in `opts.control` (or
/// `$LOCALNET_CONTROL`) must answer; only when none is named does a missing daemon lead
/// to a discovery of its own.
pub async fn find_peers_with(opts: &FindOptions) -> Result<Vec<Peer>, Error> {
    find_peers_explained(opts).await.map(|(peers, _)| peers)
}

/// [`find_peers_with`], with hints at why fewer than `wait_for` peers were found: what
/// the daemon (or the one-shot node) refused, and why unverified peers are unverified
/// (the same hints as `localnet peers` prints). The hints are empty when enough were found.
pub async fn find_peers_explained(opts: &FindOptions) -> Result<(Vec<Peer>, Vec<String>), Error> {
    let short = |found: &[Peer]| found.is_empty() || opts.wait_for.is_some_and(|n| found.len() < n);
    let explain = |peers: &[Peer], rejections: &[discovery::Rejection]| {
        backend::explain_missing(&backend::Seen {
            peers,
            rejections,
            slaves_with: None,
            keyed: opts.node.key.is_some(),
        })
    };
    // A daemon already knows its peers: no need to wait unless asked to.
    let (path, client) = match control::explicit_path(opts.control.as_deref()) {
        Some(path) => {
            let client = control::connect_named(&path).await?;
            (path, Some(client))
        }
        None => {
            let path = control::default_path();
            match control::ControlClient::connect(&path).await {
                Ok(client) => (path, Some(client)),
                Err(control::ControlError::NoDaemon(_)) => (path, None),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(mut client) = client {
        let peers = client.peers(opts.wait_for, opts.timeout).await?;
        let mut hints = Vec::new();
        if short(&peers) {
            let status = client.status().await?;
            let rejections: Vec<discovery::Rejection> =
                serde_json::from_value(status["rejections"].clone()).unwrap_or_default();
            hints.extend(backend::daemon_key_mismatch(
                status["keyed"].as_bool().unwrap_or(false),
                status["cluster"].as_str(),
                opts.node.key.as_ref(),
                &path,
            ));
            hints.extend(explain(&peers, &rejections));
        }
        return Ok((peers, hints));
    }
    let mut node_opts = opts.node.clone();
    node_opts.protocol.observer = true;
    let started = std::time::Instant::now();
    let node = Node::start(node_opts).await?;
    let handle = node.handle();
    // With no count to wait for, the answer is complete once the view is settled:
    // every member that answers has answered (the timeout stays the upper bound).
    // Settled with nobody found, it waits on for anyone until the timeout: members
    // that cannot answer (a clock off, another key) are heard meanwhile, for the hints.
    let found = match opts.wait_for {
        Some(n) => handle.wait_for(n, opts.timeout).await,
        None => match handle.wait_settled(opts.timeout).await {
            Ok(peers) if peers.is_empty() => {
                let left = opts.timeout.saturating_sub(started.elapsed());
                handle.wait_for(1, left).await
            }
            other => other,
        },
    };
    let mut hints = Vec::new();
    if let Ok(peers) = &found
        && short(peers)
        && let Ok(status) = handle.status().await
    {
        hints = explain(peers, &status.rejections);
    }
    node.shutdown().await;
    Ok((found?, hints))
}

/// Entry points into crate-private decoders for the fuzz tests (`tests/fuzz.rs`); not
/// part of the stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes one master–slave session frame as a session does; whether it decoded.
    pub fn decode_session_frame(bytes: &[u8]) -> bool {
        crate::runtime::protocol::decode(bytes).is_ok()
    }
}
