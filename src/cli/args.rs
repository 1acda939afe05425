//! The command line's shape: the subcommands, their options and the parsers of their
//! values (durations, names, tags, addresses), with the checks that make a usage error
//! (exit code 2) out of a bad value.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use localnet::nodeset::NodeSet;
use localnet::{DEFAULT_GROUP, DEFAULT_PORT};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Copy files to slaves (or back from them with --rcopy), verified by SHA-256, with
    /// their mode; needs a cluster key, as commands do (or slaves run with --insecure).
    Copy(CopyArgs),
    /// Terminate slaves: they kill their jobs, say goodbye and exit.
    Terminate(TerminateArgs),
    /// Manage cluster keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print a shell completion script: `source <(localnet completions bash)`, or save it
    /// where the shell loads completions from (see the README).
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `localnet man | man -l -` shows it; `localnet man
    /// master` the page of one subcommand.
    Man {
        /// A subcommand whose page to print (default: the page of localnet itself).
        #[arg(value_name = "SUBCOMMAND")]
        subcommand: Option<String>,
    },
}

#[derive(Args, Clone)]
pub struct NetArgs {
    /// Interface to discover on (repeatable); default: every multicast-capable interface.
    /// `lo` keeps discovery on this machine.
    #[arg(long = "interface", short = 'i', value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Multicast group (an IPv4 multicast address, 224.0.0.0/4).
    #[arg(long, value_name = "G", default_value_t = DEFAULT_GROUP, value_parser = parse_group)]
    pub group: Ipv4Addr,
    /// Multicast UDP port (1-65535).
    #[arg(long, value_name = "P", default_value_t = DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Cluster key file: only nodes with the same key see each other.
    #[arg(long, value_name = "F", env = "LOCALNET_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Discovery paths: localnet's own multicast, mDNS/DNS-SD (`_localnet._tcp`), or both.
    /// mDNS is not used on loopback.
    #[arg(long, value_name = "MODE", default_value = "both", value_parser = ["multicast", "mdns", "both"])]
    pub discovery: String,
}

#[derive(Args)]
pub struct DaemonArgs {
    /// Name shown to peers; default: the host name.
    #[arg(long, value_name = "N", value_parser = parse_name)]
    pub name: Option<String>,
    /// Serve HTTP on IP:PORT (off unless given): Prometheus metrics at /metrics,
    /// Prometheus HTTP service discovery at /sd (this node and its verified peers), a live status page
    /// at /, and /peers, /events (server-sent events) and /status for scripts. It
    /// serves anyone who can reach the address: bind to 127.0.0.1 or a private
    /// network's address.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub http: Option<std::net::SocketAddr>,
    /// The port /sd gives for every peer's target (default: the port of --http, for a
    /// LAN whose nodes all serve --http on one port).
    #[arg(long, value_name = "PORT", requires = "http", value_parser = clap::value_parser!(u16).range(1..))]
    pub sd_port: Option<u16>,

    #[command(flatten)]
    pub net: NetArgs,
    /// Tag announced to peers, as KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Control socket path; default: $LOCALNET_CONTROL, else /run/localnet/control.sock
    /// for root, else $XDG_RUNTIME_DIR/localnet.sock.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Directory where the node id persists across restarts.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often to send a heartbeat in small groups; peers declare a node failed
    /// about 3.2 heartbeats after it went silent (896 ms at the default). Longer means less traffic and slower failure
    /// detection. Large groups announce less often by themselves, to keep the group
    /// within its traffic budget.
    #[arg(long, value_name = "DUR", default_value = "280ms", value_parser = parse_heartbeat, allow_hyphen_values = true)]
    pub heartbeat: Duration,
}

/// A heartbeat between 50 ms and 60 s.
pub fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&d) {
        return Err(format!("{s} is out of range: use 50ms to 60s"));
    }
    Ok(d)
}

#[derive(Args)]
pub struct PeersArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket (see `localnet daemon --help`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Return as soon as this many peers are known.
    #[arg(long, value_name = "N")]
    pub wait_for: Option<usize>,
    /// The longest time to discover when no daemon answers (and the longest wait for
    /// --wait-for); without --wait-for it returns once every member has answered.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub timeout: Duration,
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Args)]
pub struct WatchArgs {
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket (see `localnet daemon --help`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Args)]
pub struct SlaveArgs {
    /// Name shown to masters and peers; default: the host name.
    #[arg(long, value_name = "N", value_parser = parse_name)]
    pub name: Option<String>,
    /// TCP address masters connect to, IP:PORT (port 0 = any free port).
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:0", value_parser = parse_listen)]
    pub listen: (String, u16),
    /// Tag announced to masters, as KEY=VALUE (repeatable); masters select slaves by tags.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Most command jobs at once; default: number of CPUs.
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// Run commands without a cluster key: anyone on the LAN may then run anything here.
    #[arg(long)]
    pub insecure: bool,
    /// Serve HTTP on IP:PORT (off unless given): Prometheus metrics at /metrics,
    /// Prometheus HTTP service discovery at /sd (this node and its verified peers), a live status page
    /// at / (with the slave's running jobs), and /jobs, /peers, /events (server-sent events) and /status for scripts. It
    /// serves anyone who can reach the address: bind to 127.0.0.1 or a private
    /// network's address.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub http: Option<std::net::SocketAddr>,
    /// The port /sd gives for every peer's target (default: the port of --http, for a
    /// LAN whose nodes all serve --http on one port).
    #[arg(long, value_name = "PORT", requires = "http", value_parser = clap::value_parser!(u16).range(1..))]
    pub sd_port: Option<u16>,

    #[command(flatten)]
    pub net: NetArgs,
}

/// Which slaves `master` and `copy` act on, and how they are reached.
#[derive(Args)]
pub struct SelectArgs {
    /// Wait for this many slaves (returns early once they are known; an error if fewer
    /// are found within --wait).
    #[arg(long, value_name = "N")]
    pub slaves: Option<usize>,
    /// The longest time to look for slaves (without a count to wait for, a search of
    /// its own returns once every member has answered).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub wait: Duration,
    /// Only slaves with this tag, KEY=VALUE (repeatable: all must match).
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Only the slaves named in this node set, written as clush and pdsh do:
    /// `web[1-20],db1`, `n[01-10]` (zero-padded), `r[1-2]sw[1-4]`. Named slaves that are
    /// not found are reported as missing (and make the exit status 1).
    #[arg(long, value_name = "SET", value_parser = parse_node_set)]
    pub nodes: Option<NodeSet>,
    /// Leave out the slaves named in this node set.
    #[arg(long, value_name = "SET", value_parser = parse_node_set)]
    pub exclude: Option<NodeSet>,
    /// At most N slaves at work at once: a sliding window, the next slave (in name
    /// order) starts when one ends (default: every slave at once).
    #[arg(long, short = 'f', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fanout: Option<u64>,
    /// Run on N slaves chosen at random among those that match (all of them if fewer).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pick: Option<u64>,
    /// Count a slave unreachable when its connection (TCP, handshake, greeting) is not
    /// open within this long (pdsh's -t; --timeout is the command's, pdsh's -u).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub connect_timeout: Duration,
    /// A local daemon's control socket to ask for slaves first.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Args)]
pub struct MasterArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Exit with the largest exit code of the remote commands when one failed (pdsh's
    /// -S), instead of 1.
    #[arg(long)]
    pub max_exit: bool,
    /// Kill the command on a slave after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// Print one JSON object per slave's result instead of lines: slave, node,
    /// exit_code, signal, timed_out, error, stdout and stderr (arrays of lines, invalid
    /// UTF-8 replaced), and stdout_base64 / stderr_base64 (the exact bytes) whenever the
    /// lines do not say them exactly (invalid UTF-8, or no newline at the end).
    /// At most 16 MiB of each stream per slave is kept: the rest is read and dropped,
    /// and the object then says "stdout_truncated": true (or "stderr_truncated": true).
    #[arg(long)]
    pub json: bool,
    /// Gather the output (clush -b, dshbak -c): each distinct output once, after all
    /// jobs ended, under a header with the slaves that gave it as a node set and their
    /// count (`---- web[1-3,5] (4) ----`) and how they ended when not a success; stderr
    /// likewise on stderr. Outputs that differ only by each slave's own name are one
    /// block, showing the name as {name}. At most 1 MiB of each stream per slave is kept.
    #[arg(long, short = 'b', conflicts_with_all = ["json", "raw"])]
    pub gather: bool,
    /// Print each slave's whole output after all jobs ended, one block per slave in name
    /// order under a header with its name (and how it ended when not a success), stderr
    /// likewise on stderr. At most 1 MiB of each stream per slave is kept.
    #[arg(long, short = 'L', conflicts_with_all = ["json", "raw", "gather"])]
    pub by_node: bool,
    /// Also write each slave's output to DIR/NAME.out and DIR/NAME.err as it comes, and
    /// how it ended to DIR/NAME.exit (its exit code, or why it failed), making DIR if
    /// needed. A `/` in a name becomes `_`.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Copy the job's stdout and stderr byte for byte, without `name: ` prefixes: runs
    /// on exactly one slave (it is an error when the selection matches several).
    #[arg(long, conflicts_with = "json")]
    pub raw: bool,
    /// Also show the slaves' own log lines, on stderr as `name: LEVEL line`.
    #[arg(long)]
    pub slave_logs: bool,
    /// Give the command /dev/null as its stdin. Without it, the command's stdin is this
    /// command's: a file (`< FILE`) is read by every job from its start, a pipe is
    /// broadcast to every job as it comes (the slowest job sets the pace; memory stays
    /// bounded), and a terminal or /dev/null gives no input.
    #[arg(long, short = 'n')]
    pub no_stdin: bool,
    /// The command to run on every slave. `{name}`, `{addr}` and `{rank}` in it become
    /// each slave's name, IP address and rank (0, 1, ... in name order), as pdsh's %h.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `localnet copy`: files to slaves, or back from them.
#[derive(Args)]
pub struct CopyArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Fetch SRC (paths on the slaves) from every slave into the local directory DEST,
    /// each as `DEST/<file name>.<slave name>` (clush --rcopy).
    #[arg(long)]
    pub rcopy: bool,
    /// SRC... DEST: local files and an absolute path on the slaves (a directory there,
    /// or with several SRC or a trailing `/`, one that must be; else the file's new
    /// path). With --rcopy: absolute paths on the slaves and a local directory.
    /// `{name}`, `{addr}` and `{rank}` in the slaves' paths become each slave's own.
    #[arg(required = true, num_args = 2.., value_name = "SRC... DEST")]
    pub paths: Vec<String>,
}

#[derive(Args)]
pub struct TerminateArgs {
    /// Terminate every slave found.
    #[arg(long, conflicts_with = "nodes")]
    pub all: bool,
    /// Slaves to terminate, as nid://IP:PORT, IP:PORT or name.
    #[arg(value_name = "NODE", required_unless_present = "all")]
    pub nodes: Vec<String>,
    /// The longest time to look for slaves (without a count to wait for, a search of
    /// its own returns once every member has answered).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub wait: Duration,
    /// A local daemon's control socket to ask for slaves first.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Write a new random 256-bit key to a new file (mode 0600).
    Generate {
        /// Where to write it; the file must not exist.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

/// A node set in the bracket syntax ([`NodeSet::parse`]).
pub fn parse_node_set(s: &str) -> Result<NodeSet, String> {
    NodeSet::parse(s).map_err(|e| e.to_string())
}

/// A tag `KEY=VALUE`: a key that is not empty, no control characters.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
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
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
pub fn parse_group(s: &str) -> Result<Ipv4Addr, String> {
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
pub fn parse_name(s: &str) -> Result<String, String> {
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

/// An address `IP:PORT` (`[v6]:PORT` for IPv6); nothing is looked up.
pub fn parse_socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let (host, port) = parse_listen(s)?;
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("{s:?}: {host:?} is not an IP address"))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// A TCP listen address `IP:PORT` (`[v6]:PORT` for IPv6; port 0 = any free port). The
/// host is an address, not a name: nothing is looked up.
pub fn parse_listen(s: &str) -> Result<(String, u16), String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::JSON_OUTPUT_CAP;

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
        let readme = include_str!("../../README.md");
        assert!(readme.contains(&cap), "the README states the --json cap");
    }
}
