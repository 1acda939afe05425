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
use localnet::{ClusterKey, FindOptions, Node, NodeOptions, Peer, PeerEvent};

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
    let quiet = !matches!(cli.command, Command::Daemon(_));
    init_logging(quiet);
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

fn init_logging(quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_env("LOCALNET_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon(args).await,
        Command::Peers(args) => peers(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Status(args) => status(args).await,
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
    Ok(NodeOptions {
        interfaces: net.interfaces.clone(),
        group: net.group,
        port: net.port,
        key,
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
    let mut opts = node_options(&args.net)?;
    opts.name = args.name;
    opts.tags = args.tags.into_iter().collect::<BTreeMap<_, _>>();
    opts.state_dir = args.state_dir;
    let path = args.control.unwrap_or_else(control::default_path);
    let control = ControlSocket::bind(&path).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let node = Node::start(opts).await?;
    let status = node.handle().status().await?;
    tracing::info!(
        id = %status.id,
        name = %status.name,
        interfaces = ?status.interfaces,
        group = %status.group,
        control = %path.display(),
        keyed = status.keyed,
        "localnet daemon running"
    );
    tokio::select! {
        _ = control.serve(node.handle()) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: leaving"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: leaving"),
    }
    node.shutdown().await;
    drop(control);
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
    let peers = localnet::find_peers_with(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string(&peers)?);
    } else if peers.is_empty() {
        eprintln!("no peers found");
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
            tags.join(","),
            p.id.to_string(),
        ]);
    }
    table
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
