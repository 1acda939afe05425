//! The `localnet` command: argument parsing and the subcommands.
//!
//! This file owns the command line: what each subcommand accepts, how its output looks
//! (tables for people, JSON for programs), and exit codes (0 success, 2 usage error,
//! 1 runtime error with a one-line cause).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use localnet::node::control::{self, ControlClient, ControlError, ControlSocket};
use localnet::node::{DEFAULT_GROUP, DEFAULT_PORT};
use localnet::{
    Backend, BackendOptions, ClusterKey, ExecEvent, FindOptions, JobExit, LineSplitter, Master,
    Node, NodeId, NodeOptions, Peer, PeerEvent, RemoteTable, Stream,
};

#[derive(Parser)]
#[command(
    name = "localnet",
    version,
    about = "Zero-configuration discovery of machines on a LAN",
    long_about = "Zero-configuration discovery of machines on a LAN.\n\n\
        Run `localnet daemon` on every machine; `localnet peers` on any of them lists the \
        others. Nodes find each other by IP multicast (group 239.255.76.78, UDP port 7766 by \
        default) on every multicast-capable interface. With a cluster key (`localnet key \
        generate`), every datagram is authenticated and nodes without the key are invisible.\n\n\
        Troubleshooting: if nodes do not see each other, check that the interface is up and has \
        a route for multicast (`ip route get 239.255.76.78`), that no firewall drops UDP port 7766, \
        and that all nodes use the same group, port and key. `--interface lo` keeps everything on \
        this machine.",
    after_help = "Durations are written like 500ms, 2s or 1m. Set LOCALNET_LOG=debug for more logging."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a discovery daemon in the foreground until SIGINT or SIGTERM.
    Daemon(DaemonArgs),
    /// List the peers: asks the local daemon, or discovers on its own when none answers.
    Peers(PeersArgs),
    /// Print one line per peer event (joined, updated, left, failed) from the daemon.
    Watch(WatchArgs),
    /// Show the daemon's status and counters.
    Status(WatchArgs),
    /// Run a slave in the foreground: masters run registered functions and (with a
    /// cluster key, or --insecure) commands on it, until one terminates it.
    Slave(SlaveArgs),
    /// Find slaves, run a command on each, print their output as `name: line`.
    Master(MasterArgs),
    /// Terminate slaves: they kill their jobs, say goodbye and exit.
    Terminate(TerminateArgs),
    /// Manage cluster keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Args, Clone)]
struct NetArgs {
    /// Interface to discover on (repeatable); default: every multicast-capable interface.
    /// `lo` keeps discovery on this machine.
    #[arg(long = "interface", short = 'i', value_name = "IF")]
    interfaces: Vec<String>,
    /// Multicast group (an IPv4 multicast address, 224.0.0.0/4).
    #[arg(long, value_name = "G", default_value_t = DEFAULT_GROUP, value_parser = parse_group)]
    group: Ipv4Addr,
    /// Multicast UDP port (1-65535).
    #[arg(long, value_name = "P", default_value_t = DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Cluster key file: only nodes with the same key see each other.
    #[arg(long, value_name = "F", env = "LOCALNET_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Discovery paths: localnet's own multicast, mDNS/DNS-SD (`_localnet._tcp`), or both.
    /// mDNS is not used on loopback.
    #[arg(long, value_name = "MODE", default_value = "both", value_parser = ["multicast", "mdns", "both"])]
    discovery: String,
}

#[derive(Args)]
struct DaemonArgs {
    /// Name shown to peers; default: the host name.
    #[arg(long, value_name = "N", value_parser = parse_name)]
    name: Option<String>,
    #[command(flatten)]
    net: NetArgs,
    /// Tag announced to peers, as KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Control socket path; default: $LOCALNET_CONTROL, else /run/localnet/control.sock
    /// for root, else $XDG_RUNTIME_DIR/localnet.sock.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Directory where the node id persists across restarts.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How often to announce in small groups; peers declare a node failed about 4
    /// heartbeats after it went silent. Longer means less traffic and slower failure
    /// detection. Large groups announce less often by themselves, to keep the group
    /// within its traffic budget.
    #[arg(long, value_name = "DUR", default_value = "200ms", value_parser = parse_heartbeat, allow_hyphen_values = true)]
    heartbeat: Duration,
}

/// A heartbeat between 50 ms and 60 s.
fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&d) {
        return Err(format!("{s} is out of range: use 50ms to 60s"));
    }
    Ok(d)
}

#[derive(Args)]
struct PeersArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket (see `localnet daemon --help`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Return as soon as this many peers are known.
    #[arg(long, value_name = "N")]
    wait_for: Option<usize>,
    /// How long to discover when no daemon answers (and the longest wait for --wait-for).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    timeout: Duration,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args)]
struct WatchArgs {
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket (see `localnet daemon --help`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Args)]
struct SlaveArgs {
    /// Name shown to masters and peers; default: the host name.
    #[arg(long, value_name = "N", value_parser = parse_name)]
    name: Option<String>,
    /// TCP address masters connect to, IP:PORT (port 0 = any free port).
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:0", value_parser = parse_listen)]
    listen: (String, u16),
    /// Tag announced to masters, as KEY=VALUE (repeatable); masters select slaves by tags.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Most command jobs at once; default: number of CPUs.
    #[arg(long, value_name = "N")]
    slots: Option<usize>,
    /// Run commands without a cluster key: anyone on the LAN may then run anything here.
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args)]
struct MasterArgs {
    /// Wait for this many slaves (returns early once they are known; an error if fewer
    /// are found within --wait).
    #[arg(long, value_name = "N")]
    slaves: Option<usize>,
    /// How long to look for slaves.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    wait: Duration,
    /// Only slaves with this tag, KEY=VALUE (repeatable: all must match).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Kill the command on a slave after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, allow_hyphen_values = true)]
    timeout: Option<Duration>,
    /// Print one JSON object per slave's result instead of lines: slave, node,
    /// exit_code, signal, timed_out, error, stdout and stderr (arrays of lines, invalid
    /// UTF-8 replaced), and stdout_base64 / stderr_base64 (the exact bytes) whenever the
    /// lines do not say them exactly (invalid UTF-8, or no newline at the end).
    /// At most 16 MiB of each stream per slave is kept: the rest is read and dropped,
    /// and the object then says "stdout_truncated": true (or "stderr_truncated": true).
    #[arg(long)]
    json: bool,
    /// Copy the job's stdout and stderr byte for byte, without `name: ` prefixes: runs
    /// on exactly one slave (it is an error when the selection matches several).
    #[arg(long, conflicts_with = "json")]
    raw: bool,
    /// Also show the slaves' own log lines, on stderr as `name: LEVEL line`.
    #[arg(long)]
    slave_logs: bool,
    /// A local daemon's control socket to ask for slaves first.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    /// The command to run on every slave.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct TerminateArgs {
    /// Terminate every slave found.
    #[arg(long, conflicts_with = "nodes")]
    all: bool,
    /// Slaves to terminate, as nid://IP:PORT, IP:PORT or name.
    #[arg(value_name = "NODE", required_unless_present = "all")]
    nodes: Vec<String>,
    /// How long to look for slaves.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    wait: Duration,
    /// A local daemon's control socket to ask for slaves first.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new random 256-bit key to a new file (mode 0600).
    Generate {
        /// Where to write it; the file must not exist.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    if s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} contains control characters: use printable ones"
        ));
    }
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The longest duration an option takes (deadlines are computed from it).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A duration longer than zero and at most [`MAX_DURATION`], written like `500ms`, `2s`, `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "{s} is negative: durations are longer than zero, like 500ms, 2s, 1m"
        ));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 500ms, 2s, 1m)"))?;
    if d.is_zero() {
        return Err(format!(
            "{s} is zero: durations are longer than zero, like 500ms, 2s, 1m"
        ));
    }
    if d > MAX_DURATION {
        return Err(format!("{s} is too long: at most 30 days"));
    }
    Ok(d)
}

/// An IPv4 multicast address.
fn parse_group(s: &str) -> Result<Ipv4Addr, String> {
    let group: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address (e.g. 239.255.76.78)"))?;
    if !group.is_multicast() {
        return Err(format!(
            "{group} is not a multicast address (use 224.0.0.0/4, e.g. 239.255.76.78)"
        ));
    }
    Ok(group)
}

/// A node name: not empty, at most 64 bytes, no control characters (tabs and newlines
/// would break tables, logs and `watch` lines).
fn parse_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("a name cannot be empty".into());
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{s:?} contains the control character {c:?}: names are shown in tables, logs and \
             event lines, so use printable characters only"
        ));
    }
    if s.len() > 64 {
        return Err(format!("{s:?} is {} bytes long: at most 64", s.len()));
    }
    Ok(s.to_string())
}

/// A TCP listen address `IP:PORT` (`[v6]:PORT` for IPv6; port 0 = any free port). The
/// host is an address, not a name: nothing is looked up.
fn parse_listen(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected IP:PORT, e.g. 0.0.0.0:0 or 10.0.0.5:8080"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: {port:?} is not a port number (0-65535)"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "{s:?}: {host:?} is not an IP address (names are not looked up; e.g. 0.0.0.0:{port})"
        ));
    }
    Ok((host.to_string(), port))
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on usage errors
    let quiet = !matches!(cli.command, Command::Daemon(_) | Command::Slave(_));
    init_logging(quiet, matches!(cli.command, Command::Slave(_)));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("localnet: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    localnet::stdio::flush_blocking(); // output and log lines still queued
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localnet: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, each cause once: errors that already print
/// their source (`cannot read F: No such file…`) are not followed by it again.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn init_logging(quiet: bool, slave: bool) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::filter_fn};
    let default = if quiet { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_env("LOCALNET_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd with stderr on the journal: native journal entries (syslog
    // priorities, journald's timestamps), or if journald's socket is out of reach,
    // `<N>`-prefixed lines without timestamps on the stream; else text on stderr.
    let journal = localnet::service::stderr_is_journal();
    let journald = journal.then(localnet::service::journald_layer).flatten();
    // Log lines are queued for a thread that writes them: a stuck stderr never blocks
    // the runtime (lines are dropped and counted instead).
    let stream = (journal && journald.is_none()).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(localnet::service::JournalStreamFormat::default())
            .with_writer(localnet::stdio::NonBlockingStderr)
    });
    let local = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(localnet::stdio::NonBlockingStderr)
    });
    // A slave's log lines go to the master that redirected them, else to the local log;
    // its connection lifecycle lines always stay in the local log too.
    let logs = std::sync::Arc::new(localnet::runtime::slave::LogTargets::default());
    let not_redirected = || {
        let logs = logs.clone();
        filter_fn(move |meta| {
            !logs.redirected() || meta.target() == localnet::runtime::slave::LIFECYCLE
        })
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(journald.with_filter(not_redirected()))
        .with(stream.with_filter(not_redirected()))
        .with(local.with_filter(not_redirected()))
        .with(slave.then(|| logs.layer()))
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon(args).await,
        Command::Peers(args) => peers(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Status(args) => status(args).await,
        Command::Slave(args) => slave(args).await,
        Command::Master(args) => master(args).await,
        Command::Terminate(args) => terminate(args).await,
        Command::Key(KeyCommand::Generate { out }) => {
            let key = ClusterKey::generate()?;
            key.write_new(&out)?;
            eprintln!("wrote a new cluster key to {}", out.display());
            Ok(())
        }
    }
}

fn node_options(net: &NetArgs) -> Result<NodeOptions> {
    let key = match &net.key_file {
        Some(path) => Some(ClusterKey::load(path)?),
        None => None,
    };
    node_options_with_key(net, key)
}

/// Node options for the service roles (daemon, slave) and the commands that act on
/// slaves: without --key-file, the key in systemd's configuration directory or in
/// /etc/localnet/cluster.key is used when present.
fn node_options_with_default_key(net: &NetArgs) -> Result<NodeOptions> {
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

async fn daemon(args: DaemonArgs) -> Result<()> {
    let mut opts = node_options_with_default_key(&args.net)?;
    opts.name = args.name;
    opts.tags = args.tags.into_iter().collect::<BTreeMap<_, _>>();
    opts.state_dir = args.state_dir;
    opts.protocol.min_interval_ms = args.heartbeat.as_millis() as u64;
    let path = args.control.unwrap_or_else(control::default_path);
    let control = ControlSocket::bind(&path).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let node = Node::start(opts).await?;
    let handle = node.handle();
    let status = handle.status().await?;
    tracing::info!(
        id = %status.id,
        name = %status.name,
        interfaces = ?status.interfaces,
        group = %status.group,
        control = %path.display(),
        keyed = status.keyed,
        "localnet daemon running"
    );
    let server = tokio::spawn({
        let handle = handle.clone();
        async move { control.serve(handle).await }
    });
    // Sockets are bound and the control socket listens: ready.
    localnet::service::ready(&format!("{} peers known", status.peers));
    let mut events = handle.subscribe();
    let watchdog = localnet::service::watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: leaving");
                break;
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: leaving");
                break;
            }
            event = events.recv() => match event {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(s) = handle.status().await {
                        localnet::service::status(&format!("{} peers known", s.peers));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick(), if watchdog.is_some() => {
                // Ping only when the discovery loop answers: a hung loop gets restarted.
                let alive = tokio::time::timeout(Duration::from_secs(1), handle.status()).await;
                if matches!(alive, Ok(Ok(_))) {
                    localnet::service::watchdog_ping();
                }
            }
        }
    }
    localnet::service::stopping();
    node.shutdown().await;
    server.abort();
    let _ = server.await; // drops the control socket, which removes its file
    tracing::info!("goodbye sent; exiting");
    Ok(())
}

async fn peers(args: PeersArgs) -> Result<()> {
    let opts = FindOptions {
        control: args.control,
        timeout: args.timeout,
        wait_for: args.wait_for,
        node: node_options(&args.net)?,
    };
    let (peers, hints) = localnet::find_peers_explained(&opts).await?;
    let short = args.wait_for.filter(|&n| peers.len() < n);
    if args.json {
        println!("{}", serde_json::to_string(&peers)?);
    } else if peers.is_empty() && short.is_none() {
        eprintln!("no peers found{}", hint_text(&hints));
    } else if !peers.is_empty() {
        println!("{}", peer_table(&peers));
    }
    if let Some(n) = short {
        let why = match hints.is_empty() {
            true => " (a longer --timeout waits longer; check that the others run with the \
                     same --group, --port and key)"
                .to_string(),
            false => hint_text(&hints),
        };
        bail!(
            "found only {} of {n} peers within {}{why}",
            peers.len(),
            humantime::format_duration(args.timeout)
        );
    }
    Ok(())
}

fn peer_table(peers: &[Peer]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header([
        "NAME",
        "ADDRESS",
        "ROLE",
        "STATE",
        "LAST SEEN",
        "VIA",
        "TAGS",
        "ID",
    ]);
    for p in peers {
        // Names and tags come from the network: control characters are shown escaped.
        let tags: Vec<String> = p
            .tags
            .iter()
            .map(|(k, v)| format!("{}={}", k.escape_debug(), v.escape_debug()))
            .collect();
        table.add_row([
            p.name.escape_debug().to_string(),
            p.addr.to_string(),
            p.role.clone(),
            serde_json::to_value(p.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            format!("{}ms", p.last_seen_ms),
            match (p.verified, &p.unverified_reason) {
                (true, _) => p.paths.join("+"),
                (false, Some(why)) => format!("{} (unverified: {why})", p.paths.join("+")),
                (false, None) => format!("{} (unverified)", p.paths.join("+")),
            },
            tags.join(","),
            p.id.to_string(),
        ]);
    }
    table
}

/// Hints at why nodes are missing, as the end of a message: `; seen: A; B`, or nothing.
fn hint_text(hints: &[String]) -> String {
    match hints.is_empty() {
        true => String::new(),
        false => format!("; seen: {}", hints.join("; ")),
    }
}

async fn connect(control: Option<PathBuf>) -> Result<ControlClient> {
    let path = control.unwrap_or_else(control::default_path);
    ControlClient::connect(&path).await.map_err(|e| match e {
        ControlError::NoDaemon(p) => anyhow::anyhow!(
            "no daemon answers on {p}; start one with `localnet daemon` or name its socket with --control"
        ),
        other => other.into(),
    })
}

async fn watch(args: WatchArgs) -> Result<()> {
    let mut client = connect(args.control).await?;
    client.watch().await?;
    loop {
        let event = match client.next_event().await {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(ControlError::Closed(path)) => {
                eprintln!("localnet: the daemon on {path} stopped; no more events");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if args.json {
            println!("{}", serde_json::to_string(&event)?);
        } else {
            let p = event.peer();
            let what = match &event {
                PeerEvent::Joined(_) => "joined ",
                PeerEvent::Updated(_) => "updated",
                PeerEvent::Left(_) => "left   ",
                PeerEvent::Failed(_) => "failed ",
            };
            println!(
                "{what} {} {} {} {}",
                p.name.escape_debug(),
                p.addr,
                p.role.escape_debug(),
                p.id
            );
        }
    }
}

async fn status(args: WatchArgs) -> Result<()> {
    let mut client = connect(args.control).await?;
    let status = client.status().await?;
    if args.json {
        println!("{status}");
    } else {
        print!("{}", status_text(&status));
    }
    Ok(())
}

/// The daemon's status as `field: value` lines, nested objects as `outer.inner`.
fn status_text(status: &serde_json::Value) -> String {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Array(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect();
                out.push((prefix.to_string(), items.join(", ")));
            }
            Value::String(text) => out.push((prefix.to_string(), text.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut fields = Vec::new();
    walk("", status, &mut fields);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| format!("{k:width$}  {}\n", v.escape_debug()))
        .collect()
}

fn backend_options(net: &NetArgs, control: Option<PathBuf>) -> Result<BackendOptions> {
    Ok(BackendOptions {
        discovery: node_options_with_default_key(net)?,
        control,
        ..BackendOptions::default()
    })
}

async fn slave(args: SlaveArgs) -> Result<()> {
    let (host, port) = args.listen;
    let mut opts = backend_options(&args.net, None)?;
    opts.name = args.name;
    opts.discovery.tags = args.tags.into_iter().collect();
    opts.slots = args.slots;
    opts.insecure = args.insecure;
    let backend = Backend::initialize_with(&host, port, builtin_functions(), opts).await?;
    let node = backend.node_id();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tracing::info!(%node, "slave listening");
    // On a signal the slave kills its jobs and says goodbye before it exits, so that
    // peers see it leave rather than fail.
    let signalled = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: leaving"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: leaving"),
        }
    };
    backend.start_slave_until(signalled).await?;
    Ok(())
}

/// Functions every `localnet slave` offers.
fn builtin_functions() -> RemoteTable {
    RemoteTable::new()
        .register("echo", |v| async move { Ok(v) })
        .register("hostname", |_| async move {
            Ok(serde_json::json!(localnet::node::host_name()))
        })
        .register("sleep", |v| async move {
            let ms = v.as_u64().context("sleep takes a number of milliseconds")?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(serde_json::Value::Null)
        })
}

async fn find_slaves_for_cli(
    opts: &BackendOptions,
    wait_for: Option<usize>,
    wait: Duration,
    tags: &BTreeMap<String, String>,
) -> Result<localnet::Discovered> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(slaves_found_message(0, wait_for));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let found = localnet::runtime::backend::discover_explained(opts, wait_for, wait, tags, |n| {
        if let Some(bar) = &progress {
            bar.set_message(slaves_found_message(n, wait_for));
        }
    })
    .await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(found?)
}

/// The spinner's text: `looking for slaves: 2 of 5 found`.
fn slaves_found_message(found: usize, wanted: Option<usize>) -> String {
    match wanted {
        Some(n) => format!("looking for slaves: {found} of {n} found"),
        None => format!("looking for slaves: {found} found"),
    }
}

async fn master(args: MasterArgs) -> Result<()> {
    if args.raw && args.slaves.is_some_and(|n| n != 1) {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--raw runs the command on exactly one slave: leave out --slaves or give --slaves 1",
            )
            .exit();
    }
    let mode = match (args.raw, args.json) {
        (true, _) => OutputMode::Raw,
        (_, true) => OutputMode::Json,
        _ => OutputMode::Prefixed,
    };
    let tags: BTreeMap<String, String> = args.tags.iter().cloned().collect();
    // --raw must know that the selection matches one slave only: it looks for the whole
    // --wait (or takes the daemon's whole list) instead of stopping at the first answer.
    let wanted = if args.raw { None } else { args.slaves };
    // The key is loaded once (a warning about its mode is said once).
    let opts = backend_options(&args.net, args.control.clone())?;
    let localnet::Discovered { slaves, hints } =
        find_slaves_for_cli(&opts, wanted, args.wait, &tags).await?;
    if args.raw && slaves.len() > 1 {
        bail!(
            "--raw runs the command on exactly one slave, but {} match: {}; select one with --tag KEY=VALUE",
            slaves.len(),
            describe_matches(&slaves)
        );
    }
    if let Some(n) = args.slaves
        && slaves.len() < n
    {
        match hints.is_empty() {
            true => bail!(
                "found only {} of {n} slaves within {} (check that they run with the same --group, --port and key, \
                 and `localnet peers` lists them)",
                slaves.len(),
                humantime::format_duration(args.wait)
            ),
            false => bail!(
                "found only {} of {n} slaves within {}{}",
                slaves.len(),
                humantime::format_duration(args.wait),
                hint_text(&hints)
            ),
        }
    }
    if slaves.is_empty() {
        match hints.is_empty() {
            true => bail!(
                "no slaves found within {}; start some with `localnet slave`",
                humantime::format_duration(args.wait)
            ),
            false => bail!(
                "no slaves found within {}{}",
                humantime::format_duration(args.wait),
                hint_text(&hints)
            ),
        }
    }
    let master = Master::new(&localnet::node::host_name(), opts.discovery.key, None);
    let nodes: Vec<NodeId> = slaves.iter().map(|p| NodeId::new(p.addr)).collect();
    master.add_known(&nodes);
    let mut jobs = Vec::new();
    for peer in &slaves {
        let master = master.clone();
        let node = NodeId::new(peer.addr);
        let name = peer.name.clone();
        let argv = args.command.clone();
        let timeout = args.timeout;
        let slave_logs = args.slave_logs;
        jobs.push(tokio::spawn(async move {
            let outcome = run_on_slave(&master, node, &name, argv, timeout, mode, slave_logs).await;
            (name, node, outcome)
        }));
    }
    let mut failures = Vec::new();
    for job in jobs {
        let Ok((name, node, outcome)) = job.await else {
            continue;
        };
        match outcome {
            Ok(exit) if exit.success() => {}
            Ok(exit) => failures.push(format!("{name} ({node}): {}", exit.describe())),
            Err(e) => failures.push(format!("{name} ({node}): {e:#}")),
        }
    }
    // Job output first (it is written by another thread), then the verdict.
    localnet::stdio::flush(localnet::stdio::Target::Stdout).await;
    let verdict: String = failures
        .iter()
        .map(|f| format!("localnet: failed: {f}\n"))
        .collect();
    localnet::stdio::write(localnet::stdio::Target::Stderr, verdict.into_bytes()).await?;
    localnet::stdio::flush(localnet::stdio::Target::Stderr).await;
    if !failures.is_empty() {
        bail!("{} of {} slaves failed", failures.len(), slaves.len());
    }
    Ok(())
}

/// The slaves a selection matched, for an error that asks to narrow it:
/// `s1 (nid://10.0.0.2:7001, who=one), s2 (nid://10.0.0.3:7001, no tags)`.
fn describe_matches(slaves: &[Peer]) -> String {
    slaves
        .iter()
        .map(|p| {
            let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let tags = match tags.is_empty() {
                true => "no tags".to_string(),
                false => tags.join(" "),
            };
            format!("{} ({}, {tags})", p.name, NodeId::new(p.addr))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How `localnet master` shows a job's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutputMode {
    /// Every line as `name: line` (stderr lines on stderr).
    Prefixed,
    /// The job's bytes, exactly (one slave).
    Raw,
    /// One JSON object per slave at the end.
    Json,
}

/// Runs the command on one slave, writing its output as it comes (or, in JSON mode, one
/// object at the end). Output is written by the stdio threads: a slow reader of our
/// stdout slows the job down (backpressure) but never stops the connection's keepalives.
async fn run_on_slave(
    master: &Master,
    node: NodeId,
    name: &str,
    argv: Vec<String>,
    timeout: Option<Duration>,
    mode: OutputMode,
    slave_logs: bool,
) -> Result<JobExit> {
    use localnet::stdio::{self, Target};
    if slave_logs {
        master.redirect_logs_here(&[node]).await?;
    }
    let mut job = master.exec(node, argv, timeout).await?;
    let target = |stream| match stream {
        Stream::Stdout => Target::Stdout,
        Stream::Stderr => Target::Stderr,
    };
    let index = |stream| match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    };
    let prefixed = |lines: Vec<Vec<u8>>| {
        let mut text = Vec::with_capacity(lines.iter().map(|l| l.len() + name.len() + 3).sum());
        for line in lines {
            text.extend_from_slice(name.as_bytes());
            text.extend_from_slice(b": ");
            text.extend_from_slice(&line);
            text.push(b'\n');
        }
        text
    };
    let mut captured = [CappedOutput::default(), CappedOutput::default()];
    let mut splitters = [LineSplitter::default(), LineSplitter::default()];
    let exit = loop {
        match job.next().await {
            Some(ExecEvent::Output(stream, data)) => {
                match mode {
                    OutputMode::Json => captured[index(stream)].push(&data),
                    OutputMode::Raw => stdio::write(target(stream), data)
                        .await
                        .context("writing output")?,
                    OutputMode::Prefixed => {
                        let lines = splitters[index(stream)].push(&data);
                        stdio::write(target(stream), prefixed(lines))
                            .await
                            .context("writing output")?;
                    }
                }
                // Timers and keepalives first (see localnet::runtime::protocol::write_frames).
                tokio::task::yield_now().await;
            }
            Some(ExecEvent::Exit(exit)) => break exit,
            None => bail!("connection to the slave lost"),
        }
    };
    match mode {
        OutputMode::Prefixed => {
            // A last line without a newline gets one: the prefix format needs it.
            for stream in [Stream::Stdout, Stream::Stderr] {
                if let Some(last) = splitters[index(stream)].finish() {
                    stdio::write(target(stream), prefixed(vec![last]))
                        .await
                        .context("writing output")?;
                }
            }
        }
        OutputMode::Json => {
            let mut object = serde_json::json!({
                "slave": name,
                "node": node,
                "exit_code": exit.code,
                "signal": exit.signal,
                "timed_out": exit.timed_out,
                "error": exit.error,
            });
            let mut notes = String::new();
            for (key, output) in [("stdout", &captured[0]), ("stderr", &captured[1])] {
                let bytes = &output.kept;
                let (lines, exact) = json_lines(bytes);
                object[key] = serde_json::json!(lines);
                if !exact {
                    object[format!("{key}_base64")] =
                        serde_json::json!(localnet::runtime::protocol::base64_encode(bytes));
                }
                if output.truncated() {
                    object[format!("{key}_truncated")] = serde_json::json!(true);
                    notes.push_str(&format!(
                        "localnet: {name} ({node}): {key} truncated: kept the first {} of {} bytes \
                         (--json keeps at most {} MiB per stream)\n",
                        bytes.len(),
                        output.total,
                        JSON_OUTPUT_CAP / (1024 * 1024)
                    ));
                }
            }
            let mut line = serde_json::to_vec(&object)?;
            line.push(b'\n');
            stdio::write(Target::Stdout, line)
                .await
                .context("writing output")?;
            if !notes.is_empty() {
                stdio::write(Target::Stderr, notes.into_bytes())
                    .await
                    .context("writing output")?;
            }
        }
        OutputMode::Raw => {}
    }
    Ok(exit)
}

/// Most bytes of one stream (stdout or stderr) of one slave's job that `master --json`
/// keeps for its result object; what comes after is read and dropped (the job is not
/// blocked), and the object says `"stdout_truncated": true` / `"stderr_truncated": true`.
/// Documented in `master --help` (--json) and the README.
const JSON_OUTPUT_CAP: usize = 16 * 1024 * 1024;

/// One stream of a job's output as `master --json` keeps it: the first
/// [`JSON_OUTPUT_CAP`] bytes, and how many there were in all.
#[derive(Default)]
struct CappedOutput {
    kept: Vec<u8>,
    total: u64,
}

impl CappedOutput {
    /// Keeps what fits under the cap, counts the rest.
    fn push(&mut self, data: &[u8]) {
        self.total = self.total.saturating_add(data.len() as u64);
        let room = JSON_OUTPUT_CAP.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Whether bytes were dropped.
    fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }
}

/// A job's output as JSON lines (invalid UTF-8 replaced), and whether the lines say the
/// bytes exactly (valid UTF-8, and empty or ending with a newline).
fn json_lines(bytes: &[u8]) -> (Vec<String>, bool) {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines: Vec<String> = match bytes.is_empty() {
        true => Vec::new(),
        false => body
            .split(|&b| b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect(),
    };
    let exact = std::str::from_utf8(bytes).is_ok() && (bytes.is_empty() || bytes.ends_with(b"\n"));
    (lines, exact)
}

async fn terminate(args: TerminateArgs) -> Result<()> {
    let opts = backend_options(&args.net, args.control)?;
    let master = Master::new(
        &localnet::node::host_name(),
        opts.discovery.key.clone(),
        None,
    );
    let mut targets: Vec<(String, NodeId)> = Vec::new();
    let mut names = Vec::new();
    for n in &args.nodes {
        match n.parse::<NodeId>() {
            Ok(nid) => targets.push((nid.to_string(), nid)),
            Err(_) => names.push(n.clone()),
        }
    }
    if args.all || !names.is_empty() {
        let localnet::Discovered {
            slaves: found,
            hints,
        } = find_slaves_for_cli(&opts, None, args.wait, &BTreeMap::new()).await?;
        // Found none, or not the one named: what was seen may say why.
        let hints = hint_text(&hints);
        for name in &names {
            if !found.iter().any(|p| &p.name == name) {
                bail!(
                    "no slave named {name:?} found within {}{hints}",
                    humantime::format_duration(args.wait)
                );
            }
        }
        if found.is_empty() {
            bail!(
                "no slaves found within {}{hints}",
                humantime::format_duration(args.wait)
            );
        }
        for p in found {
            if args.all || names.contains(&p.name) {
                targets.push((p.name.clone(), NodeId::new(p.addr)));
            }
        }
    }
    if targets.is_empty() {
        bail!(
            "no slaves found within {}",
            humantime::format_duration(args.wait)
        );
    }
    let nodes: Vec<NodeId> = targets.iter().map(|(_, n)| *n).collect();
    let report = master.terminate_slaves(&nodes).await;
    let name_of = |node: &NodeId| {
        targets
            .iter()
            .find(|(_, n)| n == node)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| node.to_string())
    };
    for node in &report.acknowledged {
        println!("terminated {} ({node})", name_of(node));
    }
    for (node, why) in &report.failed {
        eprintln!("localnet: {} ({node}): {why}", name_of(node));
    }
    if !report.failed.is_empty() {
        bail!(
            "{} of {} slaves did not acknowledge",
            report.failed.len(),
            nodes.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_keeps_the_cap_and_counts_the_rest() {
        let mut out = CappedOutput::default();
        out.push(b"abc");
        assert!(!out.truncated());
        out.push(&vec![b'x'; JSON_OUTPUT_CAP]);
        out.push(b"more");
        assert!(out.truncated());
        assert_eq!(out.kept.len(), JSON_OUTPUT_CAP);
        assert_eq!(&out.kept[..4], b"abcx");
        assert_eq!(out.total, JSON_OUTPUT_CAP as u64 + 7);
    }

    #[test]
    fn help_states_the_json_output_cap() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("master")
            .expect("master subcommand")
            .render_long_help()
            .to_string();
        let cap = format!("{} MiB", JSON_OUTPUT_CAP / (1024 * 1024));
        assert!(help.contains(&cap), "{help}");
        let readme = include_str!("../README.md");
        assert!(readme.contains(&cap), "the README states the --json cap");
    }
}
