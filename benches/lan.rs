//! localnet beside HashiCorp Serf, Avahi, pdsh, ClusterShell, socat and ssh on the same
//! namespace LAN, in one run.
//!
//! ```text
//! cargo bench --bench lan -- --nodes 5,20,50 --repeat 5 [--idle-secs 30]
//!     [--systems localnet,serf,avahi,pdsh,clush,socat,ssh] [--localnet-args "--heartbeat 1s"]
//!     [--rows discovery,fanout,lines,terminate,oneshot,simple,throughput,copy]
//!     [--oneshot-repeat 20] [--throughput-lines 10000000] [--copy-mb 100]
//! ```
//!
//! For each LAN size it builds one LAN of network namespaces and runs each system on the
//! same hosts, one after the other. `--rows` picks groups of rows (all by default):
//!
//! - `discovery`, per repeat: a simultaneous start (every node's process forked and held
//!   before its exec, then all let go at once; time from then until every node lists every
//!   other), on the first repeat an idle window (traffic from interface counters, RSS of
//!   one node, CPU of every node from the scheduler's account, averaged), for Serf a query answered by every node (`serf query bench`, whose
//!   handler runs `echo ok`: Serf's column of the warm fan-out row), kill -9 of one node
//!   (until all others say failed), a graceful stop of another (until all others say
//!   left: SIGTERM for localnet and Avahi, SIGINT for Serf, whose graceful leave it is).
//! - `fanout`: `true` on every host from host 0, until the last answer. localnet: a
//!   slave on every host, `localnet master -- true` without asking host 0's daemon (cold:
//!   discovery included) and through it (warm). pdsh (`pdsh -R ssh`) and ClusterShell
//!   (`clush`): against an `sshd` on every host (warm row: they know the hosts).
//! - `lines`: job output lines per second from every slave to the master (every line
//!   counted).
//! - `terminate`: `terminate --all` until every slave process has exited, through host 0's
//!   daemon (warm) and without a daemon on host 0 (cold: discovery included).
//! - `oneshot`: `localnet peers` on host 0 with no daemon there (daemons on every other
//!   host), until it exits having listed every host; `--oneshot-repeat` runs (20), at 0 %
//!   and at 5 % loss (nftables drops on every host's switch port); runs that missed a
//!   host are counted, and at 5 % loss their share is a row of its own.
//! - `simple`: `examples/simple.rs` (SimpleLocalnet's minimal example) as master on host 0
//!   with a slave on every other host, until the master exits having listed them all.
//! - `throughput`: job output of one keyed slave (host 1) to the master (host 0), in bytes
//!   per second of the job's output (`--throughput-lines` lines of 101 bytes, 10 M),
//!   beside the same bytes over the same veth through a plain TCP pipe (`socat`) and
//!   through `ssh host 'cmd'`, one after the other in each repeat.
//! - `copy`: a file of `--copy-mb` random megabytes (100) from host 0 to every host, until
//!   the copying command exits: `localnet copy` (keyed slaves, through host 0's daemon;
//!   each host's copy in a directory of its own, `{name}`), `clush --copy` (scp) and
//!   `pdcp -R ssh`, both against the sshds (every host writes the same path, as they
//!   cannot name a directory per host; the hosts share this machine's file system).
//!   localnet's copies are checked (SHA-256) after each run.
//!
//! Times of the discovery rows come from each node's own event log with a wall-clock
//! stamp (localnet's log lines; a Serf event handler writing `date +%s.%N`;
//! `avahi-browse` lines stamped by bash's `$EPOCHREALTIME`), so they do not depend on how
//! fast this harness polls; the others are until a command on host 0 exits (its `ip netns
//! exec` included). Avahi runs as Debian ships it, one `avahi-daemon` per host with its
//! own D-Bus (`dbus-daemon` on a socket in the LAN's directory) and a private `/run`,
//! publishing one static service that `avahi-browse` on every host watches; RSS and CPU
//! are the daemon's alone (D-Bus not counted). The `sshd`s listen on their host's 10.x
//! address only, with a configuration, host key and client key made in the LAN's
//! directory (`UseDNS no`, root login by key); they are stopped by PID. Rows a system
//! cannot do stay empty; a wait that ran out is shown as such, never as a number.
//!
//! Prints a markdown table per size and writes `benches/results/lan-<unix time>.json`.
//! A system that is not installed is reported with how to install it, and its column
//! stays empty. Needs root (network namespaces); everything runs inside namespaces this
//! bench makes.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cpu_ns, min_median_max, rss_kb, unix_now};
use serde::Serialize;
use serde_json::{Value, json};
use support::{Lan, Start, binary, eventually, peers, slave};

/// Every system this bench knows, in the order of the table's columns.
const SYSTEMS: [&str; 7] = ["localnet", "serf", "avahi", "pdsh", "clush", "socat", "ssh"];
/// The groups of rows `--rows` picks from (see the top of this file).
const ROW_GROUPS: [&str; 8] = [
    "discovery",
    "fanout",
    "lines",
    "terminate",
    "oneshot",
    "simple",
    "throughput",
    "copy",
];

struct Args {
    nodes: Vec<usize>,
    repeat: usize,
    idle_secs: u64,
    systems: Vec<String>,
    rows: Vec<String>,
    /// Extra arguments for every `localnet daemon`.
    localnet_args: Vec<String>,
    /// Runs of the one-shot `peers` rows, at each loss rate.
    oneshot_repeat: usize,
    /// Lines of 101 bytes each throughput run moves.
    throughput_lines: u64,
    /// Megabytes of the file the copy rows send.
    copy_mb: usize,
}

impl Args {
    fn system(&self, name: &str) -> bool {
        self.systems.iter().any(|s| s == name)
    }
    fn row(&self, group: &str) -> bool {
        self.rows.iter().any(|r| r == group)
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: vec![5, 20],
        repeat: 5,
        idle_secs: 30,
        systems: SYSTEMS.iter().map(|s| s.to_string()).collect(),
        rows: ROW_GROUPS.iter().map(|s| s.to_string()).collect(),
        localnet_args: Vec::new(),
        oneshot_repeat: 20,
        throughput_lines: 10_000_000,
        copy_mb: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => {
                args.nodes = value()
                    .split(',')
                    .map(|s| s.parse().expect("--nodes N,N"))
                    .collect()
            }
            "--repeat" => args.repeat = value().parse().expect("--repeat N"),
            "--idle-secs" => args.idle_secs = value().parse().expect("--idle-secs N"),
            "--systems" => args.systems = value().split(',').map(str::to_string).collect(),
            "--rows" => args.rows = value().split(',').map(str::to_string).collect(),
            "--localnet-args" => {
                args.localnet_args = value().split_whitespace().map(str::to_string).collect()
            }
            "--oneshot-repeat" => {
                args.oneshot_repeat = value().parse().expect("--oneshot-repeat N")
            }
            "--throughput-lines" => {
                args.throughput_lines = value().parse().expect("--throughput-lines N")
            }
            "--copy-mb" => args.copy_mb = value().parse().expect("--copy-mb N"),
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}; see the top of benches/lan.rs"),
        }
    }
    for s in &args.systems {
        assert!(
            SYSTEMS.contains(&s.as_str()),
            "unknown system {s}; known: {SYSTEMS:?}"
        );
    }
    for r in &args.rows {
        assert!(
            ROW_GROUPS.contains(&r.as_str()),
            "unknown group of rows {r}; known: {ROW_GROUPS:?}"
        );
    }
    assert!(
        args.nodes.iter().all(|&n| n >= 3),
        "--nodes: at least 3 per LAN"
    );
    assert!(args.repeat >= 1, "--repeat: at least 1");
    assert!(args.oneshot_repeat >= 1, "--oneshot-repeat: at least 1");
    assert!(args.throughput_lines >= 1, "--throughput-lines: at least 1");
    args
}

/// Seconds since the epoch of an RFC 3339 UTC stamp like `2026-11-24T05:11:16.431111Z`.
fn parse_stamp(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// The samples of one row for one system, how often its wait ran out, and how often
/// it ended with an incomplete answer.
#[derive(Default, Serialize)]
struct Row {
    samples: Vec<f64>,
    /// Repeats in which the awaited event did not happen within `limit_s`.
    timeouts: usize,
    /// Repeats that ended in time but without every host (one-shot discovery rows).
    misses: usize,
    limit_s: u64,
}

/// Row name → samples, for one system on one LAN.
type Rows = BTreeMap<&'static str, Row>;

/// How one repeat of a row ended.
enum Outcome {
    /// A figure.
    Value(f64),
    /// The wait ran out.
    TimedOut,
    /// It ended, but without every host.
    Missed,
}

fn record(rows: &mut Rows, row: &'static str, value: Option<f64>, limit: Duration) {
    record_outcome(
        rows,
        row,
        value.map_or(Outcome::TimedOut, Outcome::Value),
        limit,
    );
}

fn record_outcome(rows: &mut Rows, row: &'static str, outcome: Outcome, limit: Duration) {
    let r = rows.entry(row).or_default();
    r.limit_s = limit.as_secs();
    match outcome {
        Outcome::Value(v) => r.samples.push(v),
        Outcome::TimedOut => r.timeouts += 1,
        Outcome::Missed => r.misses += 1,
    }
}

const ALL_SEE_ALL: &str = "all-see-all after a simultaneous start (ms)";
const FAILED: &str = "kill -9 → failed at every other node (ms)";
const LEFT: &str = "graceful stop → left at every other node (ms)";
const FAN_OUT_WARM: &str = "fan-out: `true` on every node, until the last answer, warm (ms)";
const FAN_OUT_COLD: &str = "fan-out: `true` on every node, cold, discovery included (ms)";
const TRAFFIC_NODE: &str = "idle traffic per node (B/s)";
const TRAFFIC_GROUP: &str = "idle traffic, whole group (B/s)";
const CPU: &str = "idle CPU per node (%)";
const RSS: &str = "idle RSS per node (MB)";
const LINES: &str = "job output, all slaves → master (lines/s, none lost)";
const THROUGHPUT: &str = "job output, one keyed slave → master, 101-byte lines (bytes/s)";
const TERMINATE_WARM: &str =
    "`terminate --all` through host 0's daemon, until every slave has exited, warm (ms)";
const TERMINATE_COLD: &str =
    "`terminate --all`, no daemon on host 0, until every slave has exited, cold (ms)";
const ONESHOT: &str = "one-shot `peers`, no daemon on host 0, until it exits with every host (ms)";
const ONESHOT_LOSS: &str = "one-shot `peers` at 5 % loss, until it exits with every host (ms)";
const ONESHOT_LOSS_MISSES: &str = "one-shot `peers` at 5 % loss: runs that missed a host (%)";
const SIMPLE: &str = "`examples/simple.rs`: master finds every slave and terminates them (ms)";
const COPY: &str =
    "copy a file of `--copy-mb` MB (100) to every node, until the command exits (ms)";

/// The rows in the order of the table.
const ROW_NAMES: [&str; 18] = [
    ALL_SEE_ALL,
    FAILED,
    LEFT,
    FAN_OUT_WARM,
    FAN_OUT_COLD,
    ONESHOT,
    ONESHOT_LOSS,
    ONESHOT_LOSS_MISSES,
    SIMPLE,
    TERMINATE_WARM,
    TERMINATE_COLD,
    TRAFFIC_NODE,
    TRAFFIC_GROUP,
    RSS,
    CPU,
    LINES,
    THROUGHPUT,
    COPY,
];

/// One event a node logged: (unix seconds, event, peer name).
type Event = (f64, String, String);

/// What a system under test must do.
trait System {
    fn name(&self) -> &'static str;
    /// Starts every node at once ([`Lan::spawn_together`]); returns their PIDs and
    /// the moment they were let go (Unix seconds), from which joins are timed.
    fn start_all(&self, lan: &Lan) -> (Vec<u32>, f64);
    /// Ends every node of a repeat (and anything started with them).
    fn stop_all(&self, lan: &Lan, pids: &[u32]) {
        for pid in pids {
            lan.signal(*pid, libc::SIGKILL);
        }
        for pid in pids {
            lan.wait(*pid, Duration::from_secs(5));
        }
    }
    /// The events node `i` logged so far.
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event>;
    /// Event names for a join, a failure and a leave.
    fn joined(&self) -> &'static str;
    fn failed(&self) -> &'static str;
    fn left(&self) -> &'static str;
    /// The signal of a graceful stop.
    fn stop_signal(&self) -> i32;
    /// How long to wait for every node to report a kill -9.
    fn failure_wait(&self) -> Duration {
        Duration::from_secs(60)
    }
    /// A trivial job on every node from host 0, until the last answer (ms); `None` when
    /// the system has no such thing.
    fn fan_out(&self, _lan: &Lan) -> Option<Option<f64>> {
        None
    }
}

#[derive(Default)]
struct Localnet {
    /// Extra daemon arguments (`--localnet-args`).
    extra: Vec<String>,
}

impl System for Localnet {
    fn name(&self) -> &'static str {
        "localnet"
    }
    fn start_all(&self, lan: &Lan) -> (Vec<u32>, f64) {
        let starts: Vec<Start> = (0..lan.hosts())
            .map(|i| {
                let mut args = lan.daemon_args(i);
                args.extend(["--discovery", "multicast"].map(str::to_string));
                args.extend(self.extra.iter().cloned());
                Start {
                    host: i,
                    log: format!("localnet-h{i}"),
                    program: binary(),
                    args,
                    env: Vec::new(),
                }
            })
            .collect();
        lan.spawn_together(&starts)
    }
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event> {
        lan.log(&format!("localnet-h{i}"))
            .lines()
            .filter_map(|l| {
                let stamp = parse_stamp(l.split_whitespace().next()?)?;
                let event = l.split("event=\"").nth(1)?.split('"').next()?.to_string();
                let peer = l
                    .split(" peer=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string();
                Some((stamp, event, peer))
            })
            .collect()
    }
    fn joined(&self) -> &'static str {
        "joined"
    }
    fn failed(&self) -> &'static str {
        "failed"
    }
    fn left(&self) -> &'static str {
        "left"
    }
    fn stop_signal(&self) -> i32 {
        libc::SIGTERM
    }
}

/// Reads an events file of lines `<unix seconds> <event> <name>`.
fn stamped_events(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

struct Serf {
    handler: PathBuf,
}

impl Serf {
    fn new(dir: &Path) -> Serf {
        let handler = dir.join("serf-handler.sh");
        // Serf runs the handler per event with the members on stdin.
        write_executable(
            &handler,
            "#!/bin/sh\nt=$(date +%s.%N)\nwhile read -r name rest; do echo \"$t $SERF_EVENT $name\"; done >> \"$BENCH_LOG\"\n",
        );
        Serf { handler }
    }
    fn log(lan: &Lan, i: usize) -> PathBuf {
        lan.dir().join(format!("serf-h{i}.events"))
    }
}

impl System for Serf {
    fn name(&self) -> &'static str {
        "serf"
    }
    fn start_all(&self, lan: &Lan) -> (Vec<u32>, f64) {
        let starts: Vec<Start> = (0..lan.hosts())
            .map(|i| {
                let log = Serf::log(lan, i);
                let _ = std::fs::remove_file(&log);
                let handler = format!(
                    "-event-handler=member-join,member-leave,member-failed={}",
                    self.handler.display()
                );
                let args = [
                    "agent",
                    &format!("-node=h{i}"),
                    &format!("-bind={}:7946", lan.ip(i)),
                    "-iface=eth0",
                    "-discover=bench",
                    &handler,
                    // The fan-out job: a query whose handler answers `ok` (Serf sends
                    // no response for a handler that prints nothing, such as `true`).
                    "-event-handler=query:bench=echo ok",
                    "-log-level=warn",
                ];
                Start {
                    host: i,
                    log: format!("serf-h{i}"),
                    program: PathBuf::from("serf"),
                    args: args.map(str::to_string).to_vec(),
                    // The handler finds its log through the agent's environment.
                    env: vec![("BENCH_LOG".into(), log.display().to_string())],
                }
            })
            .collect();
        lan.spawn_together(&starts)
    }
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event> {
        stamped_events(&Serf::log(lan, i))
    }
    fn joined(&self) -> &'static str {
        "member-join"
    }
    fn failed(&self) -> &'static str {
        "member-failed"
    }
    fn left(&self) -> &'static str {
        "member-leave"
    }
    fn stop_signal(&self) -> i32 {
        libc::SIGINT
    }
    /// `serf query bench` from host 0 (its agent's RPC on the namespace's loopback),
    /// timed until the response of the last node is printed.
    fn fan_out(&self, lan: &Lan) -> Option<Option<f64>> {
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lan.ns(0), "serf", "query", "-timeout=5s"])
            .args(["bench", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut answers = 0;
        let mut last = None;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.trim_start().starts_with("Response from") {
                    answers += 1;
                    if answers == lan.hosts() {
                        last = Some(started.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Some(last)
    }
}

/// Debian's Avahi: per host a `dbus-daemon` (started once per LAN) and, per repeat, an
/// `avahi-daemon` in a mount namespace of its own (its pid file and socket live in
/// `/run`) publishing `_bench._udp` as `h<i>`, and an `avahi-browse` watching that type.
struct Avahi {
    buses: Vec<u32>,
    browsers: Mutex<Vec<u32>>,
}

impl Avahi {
    fn dir(lan: &Lan, i: usize) -> PathBuf {
        lan.dir().join(format!("avahi-h{i}"))
    }
    fn bus(lan: &Lan, i: usize) -> String {
        format!(
            "DBUS_SYSTEM_BUS_ADDRESS=unix:path={}",
            Avahi::dir(lan, i).join("bus").display()
        )
    }

    /// Writes the configuration of every host and starts its D-Bus.
    fn new(lan: &Lan) -> Avahi {
        let mut buses = Vec::new();
        for i in 0..lan.hosts() {
            let dir = Avahi::dir(lan, i);
            std::fs::create_dir_all(dir.join("services")).expect("avahi dir");
            let bus = dir.join("bus");
            std::fs::write(
                dir.join("dbus.conf"),
                format!(
                    r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                    bus.display()
                ),
            )
            .expect("dbus.conf");
            // Debian's defaults, except: a host name per host (they share one UTS
            // namespace), IPv4 on eth0 only, no wide-area lookups.
            std::fs::write(
                dir.join("avahi-daemon.conf"),
                format!(
                    "[server]\nhost-name=h{i}\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=eth0\n\
                     enable-dbus=yes\n[wide-area]\nenable-wide-area=no\n[publish]\n\
                     publish-hinfo=no\npublish-workstation=no\n[reflector]\nenable-reflector=no\n"
                ),
            )
            .expect("avahi-daemon.conf");
            std::fs::write(
                dir.join("services/bench.service"),
                format!(
                    "<?xml version=\"1.0\" standalone='no'?>\n\
                     <!DOCTYPE service-group SYSTEM \"avahi-service.dtd\">\n\
                     <service-group><name>h{i}</name><service><type>_bench._udp</type>\
                     <port>7000</port></service></service-group>\n"
                ),
            )
            .expect("bench.service");
            let conf = format!("--config-file={}", dir.join("dbus.conf").display());
            buses.push(lan.spawn(
                i,
                &format!("dbus-h{i}"),
                Path::new("dbus-daemon"),
                &[&conf, "--nofork", "--nopidfile"],
            ));
            let up = eventually(Duration::from_secs(10), || bus.exists());
            assert!(up, "dbus-daemon h{i}: {}", lan.log(&format!("dbus-h{i}")));
        }
        Avahi {
            buses,
            browsers: Mutex::new(Vec::new()),
        }
    }

    fn close(&self, lan: &Lan) {
        self.stop_all(lan, &self.buses);
    }
}

impl System for Avahi {
    fn name(&self) -> &'static str {
        "avahi"
    }
    fn start_all(&self, lan: &Lan) -> (Vec<u32>, f64) {
        let starts: Vec<Start> = (0..lan.hosts())
            .map(|i| {
                let dir = Avahi::dir(lan, i);
                let script = format!(
                    "mount -t tmpfs tmpfs /run && mkdir /run/avahi-daemon && \
                     mount --bind {services} /etc/avahi/services && \
                     exec avahi-daemon --no-chroot --no-drop-root --no-rlimits -f {conf}",
                    services = dir.join("services").display(),
                    conf = dir.join("avahi-daemon.conf").display()
                );
                let args = [
                    &Avahi::bus(lan, i),
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    &script,
                ];
                Start {
                    host: i,
                    log: format!("avahi-h{i}"),
                    program: PathBuf::from("env"),
                    args: args.map(str::to_string).to_vec(),
                    env: Vec::new(),
                }
            })
            .collect();
        let daemons = lan.spawn_together(&starts);
        let mut browsers = self.browsers.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..lan.hosts() {
            // avahi-browse gives up when its daemon is not on the bus yet.
            let log = format!("avahi-h{i}");
            let up = eventually(Duration::from_secs(10), || {
                lan.log(&log).contains("Server startup complete")
            });
            assert!(up, "avahi-daemon h{i} did not start: {}", lan.log(&log));
            // `+` and `-` lines of avahi-browse, stamped as they arrive.
            let events = lan.dir().join(format!("avahi-h{i}.events"));
            let script = format!(
                "exec stdbuf -oL avahi-browse --parsable --no-db-lookup _bench._udp > >(\
                 while IFS=';' read -r op _ _ name _; do echo \"$EPOCHREALTIME $op $name\"; done \
                 > {})",
                events.display()
            );
            let args = [&Avahi::bus(lan, i), "bash", "-c", &script];
            browsers.push(lan.spawn(i, &format!("avahi-browse-h{i}"), Path::new("env"), &args));
        }
        daemons
    }
    fn stop_all(&self, lan: &Lan, pids: &[u32]) {
        let browsers: Vec<u32> =
            std::mem::take(&mut *self.browsers.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in browsers.iter().chain(pids) {
            lan.signal(*pid, libc::SIGKILL);
        }
        for pid in browsers.iter().chain(pids) {
            lan.wait(*pid, Duration::from_secs(5));
        }
    }
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event> {
        stamped_events(&lan.dir().join(format!("avahi-h{i}.events")))
    }
    fn joined(&self) -> &'static str {
        "+"
    }
    fn failed(&self) -> &'static str {
        "-"
    }
    fn left(&self) -> &'static str {
        "-"
    }
    fn stop_signal(&self) -> i32 {
        libc::SIGTERM
    }
    /// mDNS has no failure detection: a record stays cached until its TTL runs out
    /// (75 minutes for Avahi's service pointers), so a short wait shows that.
    fn failure_wait(&self) -> Duration {
        Duration::from_secs(15)
    }
}

/// The time every node had logged `kind` about `about` (or about every other node when
/// `about` is None), measured from `since`; None if some node never did within `wait`.
fn all_saw(
    sys: &dyn System,
    lan: &Lan,
    nodes: &[usize],
    kind: &str,
    about: Option<&str>,
    since: f64,
    wait: Duration,
) -> Option<f64> {
    let deadline = Instant::now() + wait;
    loop {
        let mut latest = Some(since);
        for &i in nodes {
            let events = sys.events(lan, i);
            let me = format!("h{i}");
            let t = match about {
                Some(who) => events
                    .iter()
                    .filter(|(t, e, p)| *t >= since && e == kind && p == who)
                    .map(|e| e.0)
                    .reduce(f64::min),
                None => {
                    let mut firsts: BTreeMap<&str, f64> = BTreeMap::new();
                    for (t, e, p) in &events {
                        if e == kind && *p != me && *t >= since {
                            firsts.entry(p).or_insert(*t);
                        }
                    }
                    (firsts.len() >= lan.hosts() - 1)
                        .then(|| firsts.values().cloned().fold(0.0, f64::max))
                }
            };
            latest = match (latest, t) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            if latest.is_none() {
                break;
            }
        }
        if let Some(t) = latest {
            return Some((t - since) * 1000.0);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tx_bytes(lan: &Lan, i: usize) -> u64 {
    let out = Command::new("ip")
        .args(["-s", "-j", "-n", &lan.ns(i), "link", "show", "eth0"])
        .output();
    out.ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v[0]["stats64"]["tx"]["bytes"].as_u64())
        .unwrap_or(0)
}

/// Runs one system's discovery rows on the LAN `repeat` times.
fn measure(sys: &dyn System, lan: &Lan, repeat: usize, idle_secs: u64, rows: &mut Rows) {
    let n = lan.hosts();
    let converge_wait = Duration::from_secs(30);
    for r in 0..repeat {
        let (pids, started) = sys.start_all(lan);
        let all: Vec<usize> = (0..n).collect();
        let seen = all_saw(sys, lan, &all, sys.joined(), None, started, converge_wait);
        if seen.is_none() {
            eprintln!("{}: not every node saw every other within 30 s", sys.name());
        }
        record(rows, ALL_SEE_ALL, seen, converge_wait);
        std::thread::sleep(Duration::from_secs(2));
        if r == 0 {
            let window = Duration::from_secs(idle_secs);
            let tx0: Vec<u64> = (0..n).map(|i| tx_bytes(lan, i)).collect();
            let cpu0: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
            let t0 = Instant::now();
            std::thread::sleep(window);
            let secs = t0.elapsed().as_secs_f64();
            let tx: Vec<f64> = (0..n)
                .map(|i| tx_bytes(lan, i).saturating_sub(tx0[i]) as f64 / secs)
                .collect();
            // Every node's share of a core, averaged over the nodes.
            let cpu_s: f64 = pids
                .iter()
                .zip(&cpu0)
                .map(|(p, c0)| cpu_ns(*p).saturating_sub(*c0) as f64 / 1e9)
                .sum();
            let cpu = cpu_s / n as f64 / secs * 100.0;
            let mean = tx.iter().sum::<f64>() / n as f64;
            record(rows, TRAFFIC_NODE, Some(mean), window);
            record(rows, TRAFFIC_GROUP, Some(tx.iter().sum()), window);
            record(rows, CPU, Some(cpu), window);
            record(rows, RSS, Some(rss_kb(pids[2]) as f64 / 1024.0), window);
        }
        if let Some(ms) = sys.fan_out(lan) {
            record(rows, FAN_OUT_WARM, ms, Duration::from_secs(5));
        }
        let others: Vec<usize> = (2..n).collect();
        let killed = unix_now();
        lan.signal(pids[0], libc::SIGKILL);
        let wait = sys.failure_wait();
        let failed = all_saw(sys, lan, &others, sys.failed(), Some("h0"), killed, wait);
        record(rows, FAILED, failed, wait);
        let stopped = unix_now();
        lan.signal(pids[1], sys.stop_signal());
        let wait = Duration::from_secs(30);
        let left = all_saw(sys, lan, &others, sys.left(), Some("h1"), stopped, wait);
        record(rows, LEFT, left, wait);
        sys.stop_all(lan, &pids);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether `program` is on PATH (or in /usr/sbin, where sshd lives); its path.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// How a command on a namespace host ended: [`run_timed`].
struct Finished {
    /// From spawning it until it exited with its stdout at its end.
    ms: f64,
    success: bool,
    /// Bytes it wrote to stdout (read and counted, not kept).
    stdout_bytes: u64,
    stderr: String,
}

/// Reads `from` to its end on a thread, counting bytes; the count and when it ended.
fn count_bytes(mut from: impl Read + Send + 'static) -> mpsc::Receiver<(u64, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 18];
        let mut total = 0u64;
        while let Ok(k) = from.read(&mut buf) {
            if k == 0 {
                break;
            }
            total += k as u64;
        }
        let _ = tx.send((total, Instant::now()));
    });
    rx
}

/// Runs `program args` in host `i`'s namespace with `env` added, its stdout counted;
/// `None` (after killing it) when it did not finish within `limit`.
fn run_timed(
    lan: &Lan,
    i: usize,
    env: &[(&str, String)],
    program: &Path,
    args: &[&str],
    limit: Duration,
) -> Option<Finished> {
    let err_path = lan.dir().join(format!("timed-h{i}.err"));
    let err = std::fs::File::create(&err_path).ok()?;
    let started = Instant::now();
    let mut child = lan
        .command(i, program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .ok()?;
    let counted = count_bytes(child.stdout.take()?);
    let Ok((stdout_bytes, _)) = counted.recv_timeout(limit) else {
        // Our own child, by its PID (`ip netns exec` execs the program).
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("{}: not done within {limit:?}", program.display());
        return None;
    };
    let status = child.wait().ok()?;
    Some(Finished {
        ms: started.elapsed().as_secs_f64() * 1000.0,
        success: status.success(),
        stdout_bytes,
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

/// The one figure of a run of a command that had to succeed: `Value(ms)`, or `Missed`
/// (after saying why) when it failed, `TimedOut` when it did not end.
fn finished_ms(what: &str, finished: Option<Finished>) -> Outcome {
    match finished {
        Some(f) if f.success => Outcome::Value(f.ms),
        Some(f) => {
            eprintln!("{what} failed: {}", f.stderr.trim());
            Outcome::Missed
        }
        None => Outcome::TimedOut,
    }
}

/// localnet's master/slave rows (`fanout`, `lines`, `terminate`): a keyed slave on every
/// host, a daemon and the master on host 0.
fn measure_runtime(lan: &Lan, args: &Args, rows: &mut Rows) {
    let n = lan.hosts();
    let key = lan.key("bench");
    let net = [
        "--interface",
        "eth0",
        "--discovery",
        "multicast",
        "--key-file",
        &key,
    ];
    let sock = lan.sock(0);
    let sock = sock.to_str().unwrap_or_default();
    let slaves_arg = n.to_string();
    // About five million lines in all, split over the slaves.
    let per_slave = 5_000_000 / n;
    let job = format!("yes 'a log line from a job' | head -n {per_slave}");
    let wait = Duration::from_secs(30);
    let start_slaves = || -> Vec<u32> { (0..n).map(|i| slave(lan, i, &net[2..])).collect() };
    let all_known = || {
        eventually(wait, || {
            peers(Path::new(sock))
                .iter()
                .filter(|p| p["role"] == "slave")
                .count()
                == n
        })
    };
    let all_gone = |slaves: &[u32]| {
        slaves
            .iter()
            .all(|&pid| lan.wait(pid, Duration::from_secs(10)).is_some())
    };
    for _ in 0..args.repeat {
        let slaves = start_slaves();
        let daemon = lan.daemon(0, &net[2..]);
        assert!(all_known(), "the daemon on h0 did not find {n} slaves");
        let master = |extra: &[&str], job: &[&str]| {
            let mut args = vec!["master", "--slaves", &slaves_arg, "--wait", "10s"];
            args.extend_from_slice(&net);
            args.extend_from_slice(extra);
            args.push("--");
            args.extend_from_slice(job);
            let t0 = Instant::now();
            let out = lan.run(0, &binary(), &args);
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if !out.status.success() {
                eprintln!(
                    "localnet master failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            (out.status.success().then_some(ms), out.stdout)
        };
        if args.row("fanout") {
            let (cold, _) = master(&[], &["true"]);
            record(rows, FAN_OUT_COLD, cold, wait);
            let (warm, _) = master(&["--control", sock], &["true"]);
            record(rows, FAN_OUT_WARM, warm, wait);
        }
        if args.row("copy") {
            let file = copy_source(lan, args.copy_mb);
            let root = lan.dir().join("copy-localnet");
            for i in 0..n {
                let dir = root.join(format!("s{i}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("copy destination");
            }
            let dest = format!("{}/{{name}}/", root.display());
            let mut copy = vec!["copy", "--slaves", &slaves_arg, "--wait", "10s"];
            copy.extend_from_slice(&net);
            copy.extend_from_slice(&[
                "--control",
                sock,
                file.0.to_str().unwrap_or_default(),
                &dest,
            ]);
            let limit = Duration::from_secs(300);
            let finished = run_timed(lan, 0, &[], &binary(), &copy, limit);
            let outcome = finished_ms("localnet copy", finished);
            let intact = (0..n).all(|i| {
                let copied = root.join(format!("s{i}")).join("copy.bin");
                sha256_file(&copied).is_some_and(|d| d == file.1)
            });
            match outcome {
                Outcome::Value(_) if !intact => {
                    eprintln!("localnet copy: a copy differs from the source");
                    record_outcome(rows, COPY, Outcome::Missed, limit);
                }
                outcome => record_outcome(rows, COPY, outcome, limit),
            }
            let _ = std::fs::remove_dir_all(&root);
        }
        if args.row("lines") {
            let (ms, out) = master(&["--control", sock], &["sh", "-c", &job]);
            let lines = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
            let expected = per_slave * n;
            if lines != expected {
                eprintln!("job output: {lines} lines arrived, {expected} were written");
            }
            let rate = ms
                .filter(|_| lines == expected)
                .map(|ms| lines as f64 / ms * 1000.0);
            record(rows, LINES, rate, wait);
        }
        if args.row("terminate") {
            let terminate = |extra: &[&str], slaves: &[u32]| {
                let t0 = Instant::now();
                let mut args = vec!["terminate", "--all"];
                args.extend_from_slice(extra);
                args.extend_from_slice(&net);
                let out = lan.run(0, &binary(), &args);
                let gone = all_gone(slaves);
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                if !(out.status.success() && gone) {
                    eprintln!(
                        "terminate --all: {}; every slave gone: {gone}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                (out.status.success() && gone).then_some(ms)
            };
            let warm = terminate(&["--control", sock], &slaves);
            record(rows, TERMINATE_WARM, warm, wait);
            // Cold: fresh slaves, and no daemon on host 0 once the slaves are up.
            Localnet::default().stop_all(lan, &slaves);
            let slaves = start_slaves();
            assert!(all_known(), "the daemon on h0 did not find {n} new slaves");
            lan.signal(daemon, libc::SIGTERM);
            lan.wait(daemon, Duration::from_secs(5));
            let cold = terminate(&[], &slaves);
            record(rows, TERMINATE_COLD, cold, wait);
            Localnet::default().stop_all(lan, &slaves);
        }
        Localnet::default().stop_all(lan, &slaves);
        Localnet::default().stop_all(lan, &[daemon]);
    }
}

/// The one-shot `peers` rows: a daemon on every host but host 0, and `localnet peers` on
/// host 0 without one, at 0 % and 5 % loss.
fn measure_oneshot(lan: &Lan, args: &Args, rows: &mut Rows) {
    let n = lan.hosts();
    let mut extra = vec!["--discovery", "multicast"];
    extra.extend(args.localnet_args.iter().map(String::as_str));
    let daemons: Vec<u32> = (1..n).map(|i| lan.daemon(i, &extra)).collect();
    let expected: Vec<String> = (1..n).map(|i| format!("h{i}")).collect();
    let settled = eventually(Duration::from_secs(30), || {
        let known = support::peer_names(&lan.sock(1));
        expected[1..].iter().all(|name| known.contains(name))
    });
    assert!(
        settled,
        "the daemons of h1..h{} did not find each other",
        n - 1
    );
    let timeout = Duration::from_secs(1);
    let once = || {
        let t0 = Instant::now();
        let line = "peers --json --interface eth0 --discovery multicast --timeout 1s";
        let args: Vec<&str> = line.split_whitespace().collect();
        let out = lan.run(0, &binary(), &args);
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|name| !listed.iter().any(|p| p["name"] == name.as_str()))
            .collect();
        if out.status.success() && missing.is_empty() {
            Outcome::Value(ms)
        } else {
            eprintln!(
                "one-shot peers: {} missing after {ms:.0} ms {}",
                missing.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Outcome::Missed
        }
    };
    for _ in 0..args.oneshot_repeat {
        record_outcome(rows, ONESHOT, once(), timeout);
    }
    if find_program("nft").is_some() {
        for i in 0..n {
            lan.set_loss(i, 5);
        }
        let mut missed = 0;
        for _ in 0..args.oneshot_repeat {
            let outcome = once();
            if matches!(outcome, Outcome::Missed) {
                missed += 1;
            }
            record_outcome(rows, ONESHOT_LOSS, outcome, timeout);
        }
        let rate = missed as f64 / args.oneshot_repeat as f64 * 100.0;
        record(rows, ONESHOT_LOSS_MISSES, Some(rate), timeout);
        for i in 0..n {
            lan.set_loss(i, 0);
        }
    } else {
        eprintln!("nft is not installed (apt-get install nftables): the 5 % loss rows stay empty");
    }
    Localnet::default().stop_all(lan, &daemons);
}

/// Builds `examples/simple.rs` with cargo, in the profile of the localnet binary under
/// test (so it lands beside it, where [`support::example`] looks); its path, or why not.
fn build_simple_example() -> Result<PathBuf, String> {
    let release = binary()
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|dir| dir == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--example", "simple", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    if release {
        // The profile `cargo bench` built the lib in (its output is `release`).
        build.args(["--profile", "bench"]);
    }
    // Without what cargo set for this run (build scripts that watch CARGO_MANIFEST_DIR
    // would otherwise rebuild here, and again at the next `cargo bench`).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let per_run = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"]
            .iter()
            .any(|p| name.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if per_run {
            build.env_remove(name.as_ref());
        }
    }
    let status = build.status().map_err(|e| format!("cargo: {e}"))?;
    let path = support::example("simple");
    match (status.success(), path.is_file()) {
        (true, true) => Ok(path),
        (false, _) => Err(format!("cargo build --example simple: {status}")),
        (true, false) => Err(format!(
            "cargo built the example, not at {}",
            path.display()
        )),
    }
}

/// The simple example's row: its slave on every host but host 0, its master on host 0.
fn measure_simple(lan: &Lan, args: &Args, simple: &Path, rows: &mut Rows) {
    let n = lan.hosts();
    let wait = Duration::from_secs(10);
    let slaves_arg = (n - 1).to_string();
    for _ in 0..args.repeat {
        let slaves: Vec<u32> = (1..n)
            .map(|i| {
                let ip = lan.ip(i).to_string();
                lan.spawn(i, &format!("simple-h{i}"), simple, &["slave", &ip, "8080"])
            })
            .collect();
        // Up when a one-shot discovery from host 0 lists them all (not timed).
        let up = lan.run(
            0,
            &binary(),
            &[
                "peers",
                "--json",
                "--interface",
                "eth0",
                "--wait-for",
                &slaves_arg,
                "--timeout",
                "10s",
            ],
        );
        let listed: Vec<Value> = serde_json::from_slice(&up.stdout).unwrap_or_default();
        if listed.iter().filter(|p| p["role"] == "slave").count() < n - 1 {
            eprintln!("simple: not every slave is up: {listed:?}");
        }
        let ip0 = lan.ip(0).to_string();
        let t0 = Instant::now();
        let out = lan.run(0, simple, &["master", &ip0, "8084"]);
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        // One line, `Slaves: [nid://..., ...]`.
        let text = String::from_utf8_lossy(&out.stdout);
        let listed = text.matches("nid://").count();
        let outcome = if out.status.success() && listed == n - 1 {
            Outcome::Value(ms)
        } else {
            eprintln!(
                "simple master: listed {listed} of {} slaves: {} {}",
                n - 1,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Outcome::Missed
        };
        let gone = slaves.iter().all(|&pid| lan.wait(pid, wait).is_some());
        if !gone {
            eprintln!("simple: a slave did not exit after the master terminated them");
        }
        record_outcome(
            rows,
            SIMPLE,
            if gone { outcome } else { Outcome::Missed },
            wait,
        );
        Localnet::default().stop_all(lan, &slaves);
    }
}

/// An `sshd` (Debian's openssh-server) on some hosts of a LAN, run from a configuration,
/// host key and client key made in the LAN's directory: it listens on its host's 10.x
/// address only, lets root in by that key alone, and looks nothing up (`UseDNS no`).
struct SshFleet {
    dir: PathBuf,
    sshds: Vec<u32>,
}

impl SshFleet {
    /// What is not installed, as an install hint; `None` when everything is.
    fn missing() -> Option<&'static str> {
        let need = [
            ("sshd", "openssh-server"),
            ("ssh", "openssh-client"),
            ("ssh-keygen", "openssh-client"),
        ];
        need.iter()
            .find(|(program, _)| find_program(program).is_none())
            .map(|(_, package)| *package)
    }

    fn keygen(path: &Path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path.with_extension("pub"));
        let out = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "localnet-bench",
                "-f",
            ])
            .arg(path)
            .output()
            .expect("run ssh-keygen");
        assert!(
            out.status.success(),
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts an sshd on each of `hosts` and waits until each has written its PID file
    /// (after it listens).
    fn start(lan: &Lan, hosts: &[usize]) -> SshFleet {
        let dir = lan.dir().join("ssh");
        std::fs::create_dir_all(&dir).expect("ssh dir");
        Self::keygen(&dir.join("host_key"));
        Self::keygen(&dir.join("client_key"));
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        std::fs::write(
            dir.join("ssh_config"),
            "Host *\n  User root\n  IdentitiesOnly yes\n  BatchMode yes\n  \
             PasswordAuthentication no\n  KbdInteractiveAuthentication no\n  \
             GSSAPIAuthentication no\n  GlobalKnownHostsFile /dev/null\n  CheckHostIP no\n  \
             AddressFamily inet\n  ConnectTimeout 10\n  LogLevel ERROR\n",
        )
        .expect("ssh_config");
        // sshd's privilege separation directory, which the package makes when its
        // service starts (and that service is not running).
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let sshd = find_program("sshd").expect("sshd installed");
        let mut fleet = SshFleet {
            dir,
            sshds: Vec::new(),
        };
        for &i in hosts {
            let conf = fleet.dir.join(format!("sshd-h{i}.conf"));
            let pid_file = fleet.dir.join(format!("sshd-h{i}.pid"));
            let _ = std::fs::remove_file(&pid_file);
            std::fs::write(
                &conf,
                format!(
                    "ListenAddress {ip}:22\nHostKey {dir}/host_key\nPidFile {pid}\n\
                     AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
                     PubkeyAuthentication yes\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nGSSAPIAuthentication no\nUsePAM no\n\
                     UseDNS no\nStrictModes no\nPrintMotd no\nPrintLastLog no\n\
                     MaxStartups 200\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
                    ip = lan.ip(i),
                    dir = fleet.dir.display(),
                    pid = pid_file.display(),
                ),
            )
            .expect("sshd config");
            let conf = conf.to_str().unwrap_or_default().to_string();
            let log = format!("sshd-h{i}");
            fleet
                .sshds
                .push(lan.spawn(i, &log, &sshd, &["-D", "-e", "-f", &conf]));
            let up = eventually(Duration::from_secs(10), || pid_file.exists());
            assert!(up, "sshd on h{i} did not start: {}", lan.log(&log));
        }
        fleet
    }

    /// The ssh client's options for these servers.
    fn options(&self) -> Vec<String> {
        [
            "-F",
            self.dir.join("ssh_config").to_str().unwrap_or_default(),
            "-i",
            self.dir.join("client_key").to_str().unwrap_or_default(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// Stops every sshd this fleet started, by PID.
    fn stop(&self, lan: &Lan) {
        for &pid in &self.sshds {
            lan.signal(pid, libc::SIGTERM);
        }
        for &pid in &self.sshds {
            if lan.wait(pid, Duration::from_secs(5)).is_none() {
                lan.signal(pid, libc::SIGKILL);
                lan.wait(pid, Duration::from_secs(5));
            }
        }
    }
}

/// Fan-out of `true` to every host from host 0 by `pdsh -R ssh` or `clush`, until it
/// exits, `repeat` times; both get a fan-out (concurrent connections) of every host.
fn measure_ssh_fan_out(lan: &Lan, fleet: &SshFleet, tool: &str, repeat: usize, rows: &mut Rows) {
    let n = lan.hosts().to_string();
    let hosts: Vec<String> = (0..lan.hosts()).map(|i| lan.ip(i).to_string()).collect();
    let hosts = hosts.join(",");
    let options = fleet.options().join(" ");
    let limit = Duration::from_secs(60);
    for _ in 0..repeat {
        let finished = match tool {
            "pdsh" => run_timed(
                lan,
                0,
                &[("PDSH_SSH_ARGS_APPEND", options.clone())],
                Path::new("pdsh"),
                &["-R", "ssh", "-S", "-f", &n, "-w", &hosts, "true"],
                limit,
            ),
            _ => run_timed(
                lan,
                0,
                &[],
                Path::new("clush"),
                &[
                    "-S",
                    "--nostdin",
                    "-f",
                    &n,
                    "-o",
                    &options,
                    "-w",
                    &hosts,
                    "true",
                ],
                limit,
            ),
        };
        record_outcome(rows, FAN_OUT_WARM, finished_ms(tool, finished), limit);
    }
}

/// The file the copy rows send (`copy.bin` in the LAN's directory, `mb` random
/// megabytes, made once per LAN) and its SHA-256.
fn copy_source(lan: &Lan, mb: usize) -> (PathBuf, String) {
    let path = lan.dir().join("copy.bin");
    if !path.exists() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let bytes: Vec<u8> = (0..mb << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        std::fs::write(&path, bytes).expect("copy source");
    }
    let digest = sha256_file(&path).expect("read copy source");
    (path, digest)
}

fn sha256_file(path: &Path) -> Option<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// The copy row of `clush --copy` or `pdcp -R ssh`: the file to the same directory on
/// every host (see the top of this file), `repeat` times, every host at once.
fn measure_ssh_copy(lan: &Lan, fleet: &SshFleet, tool: &str, args: &Args, rows: &mut Rows) {
    let n = lan.hosts().to_string();
    let hosts: Vec<String> = (0..lan.hosts()).map(|i| lan.ip(i).to_string()).collect();
    let hosts = hosts.join(",");
    let options = fleet.options().join(" ");
    let (file, digest) = copy_source(lan, args.copy_mb);
    let file = file.to_str().unwrap_or_default().to_string();
    let dest = lan.dir().join(format!("copy-{tool}"));
    let limit = Duration::from_secs(300);
    for _ in 0..args.repeat {
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest).expect("copy destination");
        let dest = dest.to_str().unwrap_or_default();
        let finished = match tool {
            "pdsh" => run_timed(
                lan,
                0,
                &[("PDSH_SSH_ARGS_APPEND", options.clone())],
                Path::new("pdcp"),
                &["-R", "ssh", "-f", &n, "-w", &hosts, &file, dest],
                limit,
            ),
            _ => run_timed(
                lan,
                0,
                &[],
                Path::new("clush"),
                &[
                    "-S", "-f", &n, "-o", &options, "-w", &hosts, "--copy", &file, "--dest", dest,
                ],
                limit,
            ),
        };
        let stderr = finished
            .as_ref()
            .map(|f| f.stderr.clone())
            .unwrap_or_default();
        let outcome = finished_ms(tool, finished);
        // The copy is there, whole (every host wrote the same path).
        let copied = Path::new(dest).join("copy.bin");
        match outcome {
            Outcome::Value(_) if sha256_file(&copied).as_ref() != Some(&digest) => {
                eprintln!(
                    "{tool}: {} is not the source: {}",
                    copied.display(),
                    stderr.trim()
                );
                record_outcome(rows, COPY, Outcome::Missed, limit);
            }
            outcome => record_outcome(rows, COPY, outcome, limit),
        }
    }
    let _ = std::fs::remove_dir_all(&dest);
}

/// The throughput row: `lines` lines of 101 bytes from host 1 to host 0 through a keyed
/// localnet slave and master (through host 0's daemon), a plain TCP pipe (`socat`) and
/// `ssh host 'cmd'`, each once per repeat, over the same veths.
fn measure_throughput(
    lan: &Lan,
    args: &Args,
    fleet: Option<&SshFleet>,
    by_system: &mut BTreeMap<&'static str, Rows>,
) {
    let lines = args.throughput_lines;
    let bytes = lines * 101;
    let job = format!("yes {} | head -n {lines}", "x".repeat(100));
    let limit = Duration::from_secs(600);
    let rate = |what: &str, finished: Option<Finished>, expected: u64| match finished {
        Some(f) if f.success && f.stdout_bytes == expected => {
            Outcome::Value(bytes as f64 / f.ms * 1000.0)
        }
        Some(f) => {
            eprintln!(
                "{what}: {} of {expected} bytes arrived, {}: {}",
                f.stdout_bytes,
                if f.success { "exit 0" } else { "failed" },
                f.stderr.trim()
            );
            Outcome::Missed
        }
        None => Outcome::TimedOut,
    };
    let localnet = args.system("localnet").then(|| {
        let key = lan.key("throughput");
        let net = ["--discovery", "multicast", "--key-file", &key];
        let slave = slave(lan, 1, &net);
        let daemon = lan.daemon(0, &net);
        let sock = lan.sock(0);
        let known = eventually(Duration::from_secs(30), || {
            peers(&sock).iter().any(|p| p["role"] == "slave")
        });
        assert!(known, "the daemon on h0 did not find the slave on h1");
        (key, slave, daemon)
    });
    let socat = args
        .system("socat")
        .then(|| find_program("socat"))
        .flatten();
    if args.system("socat") && socat.is_none() {
        eprintln!("socat is not installed (apt-get install socat): its column stays empty");
    }
    let port = 7900;
    let mut put = |system: &'static str, outcome| {
        record_outcome(
            by_system.entry(system).or_default(),
            THROUGHPUT,
            outcome,
            limit,
        )
    };
    for _ in 0..args.repeat {
        if let Some((key, _, _)) = &localnet {
            let sock = lan.sock(0);
            let sock = sock.to_str().unwrap_or_default();
            let master = [
                "master",
                "--slaves",
                "1",
                "--wait",
                "10s",
                "--interface",
                "eth0",
                "--discovery",
                "multicast",
                "--key-file",
                key,
                "--control",
                sock,
                "--",
                "sh",
                "-c",
                &job,
            ];
            let finished = run_timed(lan, 0, &[], &binary(), &master, limit);
            // Every line arrives as `s1: line`.
            let expected = lines * (101 + "s1: ".len() as u64);
            let outcome = rate("localnet", finished, expected);
            put("localnet", outcome);
        }
        if let Some(socat) = &socat {
            let listen = format!("TCP-LISTEN:{port},bind={},reuseaddr", lan.ip(0));
            let send = format!("TCP:{}:{port}", lan.ip(0));
            let system = format!("SYSTEM:{job}");
            let outcome = socat_pipe(lan, socat, &listen, &[&system, &send], port, limit);
            let outcome = rate("socat", outcome, bytes);
            put("socat", outcome);
        }
        if let Some(fleet) = fleet {
            let mut ssh: Vec<String> = fleet.options();
            ssh.push(format!("root@{}", lan.ip(1)));
            ssh.push(job.clone());
            let ssh: Vec<&str> = ssh.iter().map(String::as_str).collect();
            let finished = run_timed(lan, 0, &[], Path::new("ssh"), &ssh, limit);
            let outcome = rate("ssh", finished, bytes);
            put("ssh", outcome);
        }
    }
    if let Some((_, slave, daemon)) = localnet {
        Localnet::default().stop_all(lan, &[slave, daemon]);
    }
}

/// A plain TCP pipe over the veth: `socat -u LISTEN -` on host 0 (its stdout counted)
/// and `socat -u SEND...` on host 1; from starting the sender until the listener's end.
fn socat_pipe(
    lan: &Lan,
    socat: &Path,
    listen: &str,
    send: &[&str],
    port: u16,
    limit: Duration,
) -> Option<Finished> {
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &lan.ns(0)])
        .arg(socat)
        .args(["-u", listen, "STDOUT"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let counted = count_bytes(listener.stdout.take()?);
    // Listening once the socket is in its namespace's table (its address as the kernel
    // prints it: the four bytes as one little-endian number, state 0A).
    let entry = format!("{:08X}:{port:04X}", u32::from_le_bytes(lan.ip(0).octets()));
    let tcp = format!("/proc/{}/net/tcp", listener.id());
    let listening = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&tcp).is_ok_and(|t| {
            t.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.get(1) == Some(&entry.as_str()) && fields.get(3) == Some(&"0A")
            })
        })
    });
    let started = Instant::now();
    let sender = listening.then(|| {
        Command::new("ip")
            .args(["netns", "exec", &lan.ns(1)])
            .arg(socat)
            .arg("-u")
            .args(send)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    });
    let done = counted.recv_timeout(limit);
    // Our own child, by its PID; gone already when the pipe ended.
    let _ = listener.kill();
    let _ = listener.wait();
    let sender = sender?.ok()?;
    let (stdout_bytes, ended) = done.ok()?;
    Some(Finished {
        ms: ended.duration_since(started).as_secs_f64() * 1000.0,
        success: sender.status.success(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&sender.stderr).into_owned(),
    })
}

fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs the discovery rows of Serf or Avahi when they are installed (else says how to
/// install them); `None` when not run.
fn measure_peer(system: &str, lan: &Lan, args: &Args) -> Option<Rows> {
    let n = lan.hosts();
    let mut rows = Rows::new();
    match system {
        "serf" if !installed("serf", "version") => {
            eprintln!("serf is not installed (apt-get install serf): its column stays empty");
            return None;
        }
        "serf" => {
            eprintln!("{n} nodes: serf ...");
            let serf = Serf::new(lan.dir());
            measure(&serf, lan, args.repeat, args.idle_secs, &mut rows);
        }
        "avahi"
            if !(installed("avahi-daemon", "--version")
                && installed("avahi-browse", "--version")
                && installed("dbus-daemon", "--version")) =>
        {
            eprintln!(
                "Avahi is not installed (apt-get install avahi-daemon avahi-utils \
                 dbus): its column stays empty"
            );
            return None;
        }
        "avahi" => {
            eprintln!("{n} nodes: avahi ...");
            let avahi = Avahi::new(lan);
            measure(&avahi, lan, args.repeat, args.idle_secs, &mut rows);
            avahi.close(lan);
        }
        _ => return None,
    }
    Some(rows)
}

/// Every row of one LAN size, by system.
fn measure_size(
    lan: &Lan,
    args: &Args,
    simple: &Result<PathBuf, String>,
) -> BTreeMap<&'static str, Rows> {
    let n = lan.hosts();
    let mut by_system: BTreeMap<&'static str, Rows> = BTreeMap::new();
    let localnet = args.system("localnet");
    if localnet {
        let rows = by_system.entry("localnet").or_default();
        if args.row("discovery") {
            eprintln!("{n} nodes: localnet ...");
            let system = Localnet {
                extra: args.localnet_args.clone(),
            };
            measure(&system, lan, args.repeat, args.idle_secs, rows);
        }
        if ["fanout", "lines", "terminate", "copy"]
            .iter()
            .any(|r| args.row(r))
        {
            eprintln!("{n} nodes: localnet master/slave ...");
            measure_runtime(lan, args, rows);
        }
        if args.row("oneshot") {
            eprintln!("{n} nodes: localnet one-shot peers ...");
            measure_oneshot(lan, args, rows);
        }
        if args.row("simple") {
            match simple {
                Ok(path) => {
                    eprintln!("{n} nodes: examples/simple.rs ...");
                    measure_simple(lan, args, path, rows);
                }
                Err(why) => eprintln!("examples/simple.rs: {why}: its row stays empty"),
            }
        }
    }
    if args.row("discovery") {
        for system in ["serf", "avahi"] {
            if args.system(system)
                && let Some(rows) = measure_peer(system, lan, args)
            {
                by_system.insert(system, rows);
            }
        }
    }
    // sshd on every host for pdsh and clush, on host 1 for the ssh pipe.
    let fan_out_tools: Vec<&'static str> = ["pdsh", "clush"]
        .into_iter()
        .filter(|t| (args.row("fanout") || args.row("copy")) && args.system(t))
        .filter(|t| {
            let found = find_program(t).is_some();
            if !found {
                let package = if *t == "clush" {
                    "clustershell"
                } else {
                    "pdsh"
                };
                eprintln!(
                    "{t} is not installed (apt-get install {package} openssh-server): \
                     its column stays empty"
                );
            }
            found
        })
        .collect();
    let ssh_pipe = args.row("throughput") && args.system("ssh");
    let fleet = if fan_out_tools.is_empty() && !ssh_pipe {
        None
    } else if let Some(package) = SshFleet::missing() {
        eprintln!(
            "{package} is not installed (apt-get install {package}): the pdsh, clush and \
             ssh columns stay empty"
        );
        None
    } else {
        let hosts: Vec<usize> = if fan_out_tools.is_empty() {
            vec![1]
        } else {
            (0..n).collect()
        };
        Some(SshFleet::start(lan, &hosts))
    };
    if let Some(fleet) = &fleet {
        for tool in fan_out_tools {
            eprintln!("{n} nodes: {tool} ...");
            let rows = by_system.entry(tool).or_default();
            if args.row("fanout") {
                measure_ssh_fan_out(lan, fleet, tool, args.repeat, rows);
            }
            if args.row("copy") {
                eprintln!("{n} nodes: {tool} copy ...");
                measure_ssh_copy(lan, fleet, tool, args, rows);
            }
        }
    }
    if args.row("throughput") {
        eprintln!("{n} nodes: job output throughput ...");
        let ssh = fleet.as_ref().filter(|_| ssh_pipe);
        measure_throughput(lan, args, ssh, &mut by_system);
    }
    if let Some(fleet) = &fleet {
        fleet.stop(lan);
    }
    by_system.retain(|_, rows| !rows.is_empty());
    by_system
}

fn main() {
    let args = parse_args();
    if !support::netns_available() {
        return;
    }
    if Path::new("/run/localnet/control.sock").exists() {
        eprintln!(
            "note: /run/localnet/control.sock exists; the rows without a daemon on host 0 \
             name none, and a system daemon answering there would change them"
        );
    }
    let simple = if args.system("localnet") && args.row("simple") {
        build_simple_example()
    } else {
        Err("not asked for".to_string())
    };
    let mut results = json!({
        "command": std::env::args().skip(1).filter(|a| a != "--bench").collect::<Vec<_>>(),
        "machine": machine(),
        "localnet_args": args.localnet_args,
        "repeat": args.repeat,
        "idle_secs": args.idle_secs,
        "oneshot_repeat": args.oneshot_repeat,
        "throughput_lines": args.throughput_lines,
        "copy_mb": args.copy_mb,
        "sizes": {}
    });
    for &n in &args.nodes {
        let lan = Lan::new(&format!("b{n}"), 200 + (n % 50) as u8, n).expect("namespace LAN");
        let by_system = measure_size(&lan, &args, &simple);
        print_table(n, &by_system);
        results["sizes"][n.to_string()] = serde_json::to_value(&by_system).unwrap_or_default();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("lan-{}.json", unix_now() as u64));
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    )
    .expect("write results");
    println!("\nraw results: {}", file.display());
}

/// One table cell: min / **median** / max, with timeouts and incomplete answers said in
/// words.
fn cell(row: Option<&Row>) -> (String, Option<f64>) {
    let Some(row) = row else {
        return (String::new(), None);
    };
    let runs = row.samples.len() + row.timeouts + row.misses;
    let mut notes = Vec::new();
    if row.timeouts > 0 {
        notes.push(format!(
            "not within {} s in {} of {runs}",
            row.limit_s, row.timeouts
        ));
    }
    if row.misses > 0 {
        notes.push(format!("incomplete in {} of {runs}", row.misses));
    }
    let Some((a, b, c)) = min_median_max(&row.samples) else {
        return (notes.join("; "), None);
    };
    let digits = match b {
        b if b >= 100.0 => 0,
        b if b >= 1.0 => 1,
        _ => 2,
    };
    let mut text = format!("{a:.digits$} / **{b:.digits$}** / {c:.digits$}");
    if !notes.is_empty() {
        text += &format!(" ({})", notes.join("; "));
    }
    (text, Some(b))
}

fn print_table(n: usize, by: &BTreeMap<&str, Rows>) {
    let systems: Vec<&str> = SYSTEMS
        .iter()
        .copied()
        .filter(|s| by.contains_key(s))
        .collect();
    let median = |system: &str, row: &str| cell(by.get(system).and_then(|r| r.get(row))).1;
    // A ratio column for each peer that shares a row with localnet.
    let peers: Vec<&str> = systems
        .iter()
        .copied()
        .filter(|&s| s != "localnet")
        .filter(|&s| {
            ROW_NAMES
                .iter()
                .any(|row| median("localnet", row).is_some() && median(s, row).is_some())
        })
        .collect();
    println!("\n### {n} nodes (min / **median** / max)\n");
    let mut header = vec!["row".to_string()];
    header.extend(systems.iter().map(|s| s.to_string()));
    header.extend(peers.iter().map(|p| format!("localnet/{p}")));
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for row in ROW_NAMES {
        let cells: Vec<(String, Option<f64>)> = systems
            .iter()
            .map(|s| cell(by.get(s).and_then(|r| r.get(row))))
            .collect();
        if cells.iter().all(|c| c.0.is_empty()) {
            continue;
        }
        let mut line = vec![row.to_string()];
        line.extend(cells.into_iter().map(|c| c.0));
        for peer in &peers {
            line.push(match (median("localnet", row), median(peer, row)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => String::new(),
            });
        }
        println!("| {} |", line.join(" | "));
    }
}

/// The machine, with the versions of the peer systems.
fn machine() -> Value {
    let mut machine = common::machine();
    // The first line of a program's version output (stdout or stderr) containing `word`.
    let version = |program: &str, arg: &str, word: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text += &String::from_utf8_lossy(&o.stderr);
                text.lines()
                    .find(|l| l.contains(word))
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_default()
    };
    machine["serf"] = json!(version("serf", "version", ""));
    machine["avahi"] = json!(version("avahi-daemon", "--version", ""));
    machine["pdsh"] = json!(version("pdsh", "-V", "pdsh"));
    machine["clush"] = json!(version("clush", "--version", ""));
    machine["socat"] = json!(version("socat", "-V", "version"));
    machine["ssh"] = json!(version("ssh", "-V", "OpenSSH"));
    machine
}
