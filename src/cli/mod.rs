//! The `localnet` command's subcommands: one module each, over the argument types of
//! [`args`] and the formatting of [`output`]. What they share is here: turning the
//! network options into the library's options, reaching the daemon, finding slaves.

pub mod args;
pub mod copy;
pub mod daemon;
pub mod docs;
pub mod gather;
pub mod key;
pub mod master;
pub mod output;
pub mod peers;
pub mod progress;
pub mod slave;
pub mod stdin;
pub mod terminate;
pub mod watch;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use localnet::control::{self, ControlClient, ControlError};
use localnet::{BackendOptions, ClusterKey, Discovered, Master, NodeId, NodeOptions, Peer};

use args::NetArgs;
use localnet::stdio::OutputStream;

/// The process's output streams, made once in `main` and handed to the subcommands that
/// write job output (see [`localnet::stdio`]: nothing written there blocks the runtime).
#[derive(Clone, Debug)]
pub struct Stdio {
    /// Standard output.
    pub out: OutputStream,
    /// Standard error (log lines too).
    pub err: OutputStream,
}

impl Stdio {
    /// One writer thread per stream; they share a status line (drawn on stderr when it
    /// is a terminal).
    pub fn new() -> Self {
        let (out, err) = OutputStream::pair();
        Self { out, err }
    }

    /// Waits (outside the runtime) until everything queued has been written.
    pub fn flush_blocking(&self) {
        self.out.flush_blocking();
        self.err.flush_blocking();
    }
}

/// Node options from the network options, with the key of --key-file if one is named.
pub fn node_options(net: &NetArgs) -> Result<NodeOptions> {
    let key = match &net.key_file {
        Some(path) => Some(ClusterKey::load(path)?),
        None => None,
    };
    node_options_with_key(net, key)
}

/// Node options for the service roles (daemon, slave) and the commands that act on
/// slaves: without --key-file, the key in systemd's configuration directory or in
/// /etc/localnet/cluster.key is used when present.
pub fn node_options_with_default_key(net: &NetArgs) -> Result<NodeOptions> {
    if net.key_file.is_some() {
        return node_options(net);
    }
    match localnet::service::default_key_file() {
        Some(path) => {
            let key = ClusterKey::load(&path).with_context(|| {
                format!(
                    "{} is present but cannot be used; pass --key-file to choose another",
                    path.display()
                )
            })?;
            tracing::info!(key = %path.display(), "using the cluster key found there");
            node_options_with_key(net, Some(key))
        }
        None => node_options(net),
    }
}

fn node_options_with_key(net: &NetArgs, key: Option<ClusterKey>) -> Result<NodeOptions> {
    Ok(NodeOptions {
        interfaces: net.interfaces.clone(),
        group: net.group,
        port: net.port,
        key,
        discovery: net.discovery.parse().map_err(anyhow::Error::msg)?,
        ..NodeOptions::default()
    })
}

/// An error that ends the command with its own exit status (`master --max-exit`), not
/// the usual 1.
#[derive(Debug)]
pub struct ExitStatus {
    /// The exit status.
    pub code: u8,
    /// What to say on stderr.
    pub why: String,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for ExitStatus {}

/// Backend options for the commands that act on slaves (and the slave itself).
pub fn backend_options(net: &NetArgs, control: Option<PathBuf>) -> Result<BackendOptions> {
    Ok(BackendOptions {
        discovery: node_options_with_default_key(net)?,
        control,
        ..BackendOptions::default()
    })
}

/// A client of the daemon's control socket (the one named, else the default one); no
/// daemon there is an error that says how to start one.
pub async fn connect(control: Option<PathBuf>) -> Result<ControlClient> {
    let path = control.unwrap_or_else(control::default_path);
    ControlClient::connect(&path).await.map_err(|e| match e {
        ControlError::NoDaemon(p) => anyhow::anyhow!(
            "no daemon answers on {p}; start one with `localnet daemon` or name its socket with --control"
        ),
        other => other.into(),
    })
}

/// Finds slaves (see [`localnet::discover_explained`]), with a spinner on a terminal's
/// stderr that counts them. With a `master`, it connects to each slave as soon as it is
/// found ([`Master::prepare`], in the background: a failure is reported when the slave
/// is used), so that the connections are ready when the search ends.
pub async fn find_slaves(
    opts: &BackendOptions,
    wait_for: Option<usize>,
    wait: Duration,
    tags: &BTreeMap<String, String>,
    master: Option<&Master>,
) -> Result<Discovered> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(output::slaves_found_message(0, wait_for));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut connecting = HashSet::new();
    let found = localnet::discover_explained(opts, wait_for, wait, tags, |found: &[Peer]| {
        if let Some(bar) = &progress {
            bar.set_message(output::slaves_found_message(found.len(), wait_for));
        }
        let Some(master) = master else { return };
        for peer in found {
            let node = NodeId::new(peer.addr);
            if connecting.insert(node) {
                let master = master.clone();
                tokio::spawn(async move { master.prepare(node).await });
            }
        }
    })
    .await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(found?)
}
