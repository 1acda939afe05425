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
use localnet::control::{self, ControlClient, ControlError, ControlSocket};
use localnet::node::{DEFAULT_GROUP, DEFAULT_PORT};
use localnet::{
    Backend, BackendOptions, ClusterKey, ExecEvent, FindOptions, JobExit, Master, Node, NodeId,
    NodeOptions, Peer, PeerEvent, RemoteTable, Stream,
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
    /// Multicast group.
    #[arg(long, value_name = "G", default_value_t = DEFAULT_GROUP)]
    group: Ipv4Addr,
    /// Multicast UDP port.
    #[arg(long, value_name = "P", default_value_t = DEFAULT_PORT)]
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
    #[arg(long, value_name = "N")]
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
    #[arg(long, value_name = "DUR", default_value = "200ms", value_parser = parse_heartbeat)]
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
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
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
    #[arg(long, value_name = "N")]
    name: Option<String>,
    /// TCP address masters connect to (port 0 = any free port).
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:0")]
    listen: String,
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
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    wait: Duration,
    /// Only slaves with this tag, KEY=VALUE (repeatable: all must match).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Kill the command on a slave after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Print one JSON object per slave's result instead of lines.
    #[arg(long)]
    json: bool,
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
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
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
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 2s, 1m)"))
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localnet: error: {e:#}");
            ExitCode::from(1)
        }
    }
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
    let stream = (journal && journald.is_none()).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(localnet::service::JournalStreamFormat::default())
            .with_writer(std::io::stderr)
    });
    let local = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
    });
    // A slave's log lines go to the master that redirected them, else to the local log.
    let not_redirected = || filter_fn(|_| !localnet::slave::logs_redirected());
    tracing_subscriber::registry()
        .with(filter)
        .with(journald.with_filter(not_redirected()))
        .with(stream.with_filter(not_redirected()))
        .with(local.with_filter(not_redirected()))
        .with(slave.then_some(localnet::slave::RedirectLayer))
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
    if !args.net.group.is_multicast() {
        bail!(
            "--group {} is not a multicast address (use 224.0.0.0/4, e.g. 239.255.76.78)",
            args.net.group
        );
    }
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
    if let Some(n) = args.wait_for
        && peers.len() < n
    {
        eprintln!(
            "localnet: found only {} of {n} peers within {}{}",
            peers.len(),
            humantime::format_duration(args.timeout),
            hint_text(&hints)
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&peers)?);
    } else if peers.is_empty() {
        eprintln!("no peers found{}", hint_text(&hints));
    } else {
        println!("{}", peer_table(&peers));
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
        let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.add_row([
            p.name.clone(),
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
        let Some(event) = client.next_event().await? else {
            continue;
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
            println!("{what} {} {} {} {}", p.name, p.addr, p.role, p.id);
        }
    }
}

async fn status(args: WatchArgs) -> Result<()> {
    let mut client = connect(args.control).await?;
    let status = client.status().await?;
    if args.json {
        println!("{status}");
    } else {
        println!("{}", serde_json::to_string_pretty(&status)?);
    }
    Ok(())
}

fn backend_options(net: &NetArgs, control: Option<PathBuf>) -> Result<BackendOptions> {
    Ok(BackendOptions {
        discovery: node_options_with_default_key(net)?,
        control,
        ..BackendOptions::default()
    })
}

fn split_listen(listen: &str) -> Result<(String, u16)> {
    let (host, port) = listen
        .rsplit_once(':')
        .with_context(|| format!("--listen {listen:?}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("--listen {listen:?}: {port:?} is not a port number"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

async fn slave(args: SlaveArgs) -> Result<()> {
    let (host, port) = split_listen(&args.listen)?;
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
    tokio::select! {
        served = backend.start_slave() => served?,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: exiting"),
    }
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
    net: &NetArgs,
    control: Option<PathBuf>,
    wait_for: Option<usize>,
    wait: Duration,
    tags: &BTreeMap<String, String>,
) -> Result<localnet::Discovered> {
    let opts = backend_options(net, control)?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(match wait_for {
            Some(n) => format!("looking for {n} slaves..."),
            None => "looking for slaves...".to_string(),
        });
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let found = localnet::backend::discover_explained(&opts, wait_for, wait, tags).await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(found?)
}

async fn master(args: MasterArgs) -> Result<()> {
    let tags: BTreeMap<String, String> = args.tags.iter().cloned().collect();
    let localnet::Discovered { slaves, hints } = find_slaves_for_cli(
        &args.net,
        args.control.clone(),
        args.slaves,
        args.wait,
        &tags,
    )
    .await?;
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
    let key = node_options_with_default_key(&args.net)?.key;
    let master = Master::new(&localnet::node::host_name(), key, None);
    let nodes: Vec<NodeId> = slaves.iter().map(|p| NodeId::new(p.addr)).collect();
    master.add_known(&nodes);
    let mut jobs = Vec::new();
    for peer in &slaves {
        let master = master.clone();
        let node = NodeId::new(peer.addr);
        let name = peer.name.clone();
        let argv = args.command.clone();
        let timeout = args.timeout;
        let json = args.json;
        jobs.push(tokio::spawn(async move {
            let outcome = run_on_slave(&master, node, &name, argv, timeout, json).await;
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
    for f in &failures {
        eprintln!("localnet: failed: {f}");
    }
    if !failures.is_empty() {
        bail!("{} of {} slaves failed", failures.len(), slaves.len());
    }
    Ok(())
}

/// Runs the command on one slave, printing its output as it comes (or, with `json`,
/// one object at the end).
async fn run_on_slave(
    master: &Master,
    node: NodeId,
    name: &str,
    argv: Vec<String>,
    timeout: Option<Duration>,
    json: bool,
) -> Result<JobExit> {
    use std::io::Write;
    master.redirect_logs_here(&[node]).await?;
    let mut job = master.exec(node, argv, timeout).await?;
    let (mut stdout_lines, mut stderr_lines) = (Vec::new(), Vec::new());
    let exit = loop {
        match job.next().await {
            Some(ExecEvent::Output(stream, lines)) => {
                if json {
                    match stream {
                        Stream::Stdout => stdout_lines.extend(lines),
                        Stream::Stderr => stderr_lines.extend(lines),
                    }
                    continue;
                }
                let mut text =
                    String::with_capacity(lines.iter().map(|l| l.len() + name.len() + 3).sum());
                for line in lines {
                    text.push_str(name);
                    text.push_str(": ");
                    text.push_str(&line);
                    text.push('\n');
                }
                let written = match stream {
                    Stream::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
                    Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
                };
                written.context("writing output")?;
            }
            Some(ExecEvent::Exit(exit)) => break exit,
            None => bail!("connection to the slave lost"),
        }
    };
    if json {
        let object = serde_json::json!({
            "slave": name,
            "node": node,
            "exit_code": exit.code,
            "signal": exit.signal,
            "timed_out": exit.timed_out,
            "error": exit.error,
            "stdout": stdout_lines,
            "stderr": stderr_lines,
        });
        println!("{object}");
    }
    Ok(exit)
}

async fn terminate(args: TerminateArgs) -> Result<()> {
    let key = node_options_with_default_key(&args.net)?.key;
    let master = Master::new(&localnet::node::host_name(), key, None);
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
        } = find_slaves_for_cli(&args.net, args.control, None, args.wait, &BTreeMap::new()).await?;
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
