//! localnet beside HashiCorp Serf and Avahi on the same namespace LAN, in one run.
//!
//! ```text
//! cargo bench --bench lan -- --nodes 5,20,50 --repeat 5 [--idle-secs 30]
//!                            [--systems localnet,serf,avahi] [--localnet-args "--heartbeat 1s"]
//! ```
//!
//! For each LAN size it builds one LAN of network namespaces and runs each system on the
//! same hosts, one after the other. Per repeat: a simultaneous start (time until every
//! node lists every other), on the first repeat an idle window (traffic from interface
//! counters, RSS and CPU of one node), for Serf a query answered by every node (`serf
//! query bench`, whose handler runs `echo ok`), kill -9 of one node (until all others
//! say failed), a graceful stop of another (until all others say left: SIGTERM for
//! localnet and Avahi, SIGINT for Serf, whose graceful leave it is). Then, for localnet alone, the master/slave runtime: a slave on every host,
//! `localnet master -- true` from host 0 without and with a warm daemon there, job
//! output lines per second from every slave to the master (every line counted), and
//! `terminate --all` until every slave process has exited.
//!
//! Times come from each node's own event log with a wall-clock stamp (localnet's log
//! lines; a Serf event handler writing `date +%s.%N`; `avahi-browse` lines stamped by
//! bash's `$EPOCHREALTIME`), so they do not depend on how fast this harness polls.
//! Avahi runs as Debian ships it, one `avahi-daemon` per host with its own D-Bus
//! (`dbus-daemon` on a socket in the LAN's directory) and a private `/run`, publishing
//! one static service that `avahi-browse` on every host watches; RSS and CPU are the
//! daemon's alone (D-Bus not counted). Rows a system cannot do stay empty; a wait that
//! ran out is shown as such, never as a number.
//!
//! Prints a markdown table per size and writes `benches/results/lan-<unix time>.json`.
//! A system that is not installed is reported with how to install it, and its column
//! stays empty. Needs root (network namespaces); everything runs inside namespaces this
//! bench makes.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};
use support::{Lan, binary, eventually, peers};

const SYSTEMS: [&str; 3] = ["localnet", "serf", "avahi"];

struct Args {
    nodes: Vec<usize>,
    repeat: usize,
    idle_secs: u64,
    systems: Vec<String>,
    /// Extra arguments for every `localnet daemon`.
    localnet_args: Vec<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: vec![5, 20],
        repeat: 5,
        idle_secs: 30,
        systems: SYSTEMS.iter().map(|s| s.to_string()).collect(),
        localnet_args: Vec::new(),
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
            "--localnet-args" => {
                args.localnet_args = value().split_whitespace().map(str::to_string).collect()
            }
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
    assert!(
        args.nodes.iter().all(|&n| n >= 3),
        "--nodes: at least 3 per LAN"
    );
    assert!(args.repeat >= 1, "--repeat: at least 1");
    args
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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

/// The samples of one row for one system, and how often its wait ran out.
#[derive(Default, Serialize)]
struct Row {
    samples: Vec<f64>,
    /// Repeats in which the awaited event did not happen within `limit_s`.
    timeouts: usize,
    limit_s: u64,
}

/// Row name → samples, for one system on one LAN.
type Rows = BTreeMap<&'static str, Row>;

fn record(rows: &mut Rows, row: &'static str, value: Option<f64>, limit: Duration) {
    let r = rows.entry(row).or_default();
    r.limit_s = limit.as_secs();
    match value {
        Some(v) => r.samples.push(v),
        None => r.timeouts += 1,
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
const TERMINATE: &str = "`terminate --all` until every slave has exited (ms)";

/// One event a node logged: (unix seconds, event, peer name).
type Event = (f64, String, String);

/// What a system under test must do.
trait System {
    fn name(&self) -> &'static str;
    /// Starts every node at once; returns their PIDs.
    fn start_all(&self, lan: &Lan) -> Vec<u32>;
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
    fn start_all(&self, lan: &Lan) -> Vec<u32> {
        (0..lan.hosts())
            .map(|i| {
                let name = format!("h{i}");
                let sock = lan.sock(i);
                let mut args = vec![
                    "daemon",
                    "--name",
                    &name,
                    "--interface",
                    "eth0",
                    "--discovery",
                    "multicast",
                    "--control",
                    sock.to_str().unwrap_or_default(),
                ];
                args.extend(self.extra.iter().map(String::as_str));
                lan.spawn(i, &format!("localnet-h{i}"), &binary(), &args)
            })
            .collect()
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
    fn start_all(&self, lan: &Lan) -> Vec<u32> {
        (0..lan.hosts())
            .map(|i| {
                let log = Serf::log(lan, i);
                let _ = std::fs::remove_file(&log);
                let node = format!("-node=h{i}");
                let bind = format!("-bind={}:7946", lan.ip(i));
                let handler = format!(
                    "-event-handler=member-join,member-leave,member-failed={}",
                    self.handler.display()
                );
                // The handler finds its log through the environment `ip netns exec` passes on.
                // SAFETY: set before spawning, on this single bench thread.
                unsafe { std::env::set_var("BENCH_LOG", &log) };
                let args = [
                    "agent",
                    &node,
                    &bind,
                    "-iface=eth0",
                    "-discover=bench",
                    &handler,
                    // The fan-out job: a query whose handler answers `ok` (Serf sends
                    // no response for a handler that prints nothing, such as `true`).
                    "-event-handler=query:bench=echo ok",
                    "-log-level=warn",
                ];
                lan.spawn(i, &format!("serf-h{i}"), Path::new("serf"), &args)
            })
            .collect()
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
    fn start_all(&self, lan: &Lan) -> Vec<u32> {
        let daemons = (0..lan.hosts())
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
                lan.spawn(i, &format!("avahi-h{i}"), Path::new("env"), &args)
            })
            .collect();
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

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<String> = s
                .rsplit(')')
                .next()?
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs one system's discovery rows on the LAN `repeat` times.
fn measure(sys: &dyn System, lan: &Lan, repeat: usize, idle_secs: u64, rows: &mut Rows) {
    let n = lan.hosts();
    let converge_wait = Duration::from_secs(30);
    for r in 0..repeat {
        let started = unix_now();
        let pids = sys.start_all(lan);
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
            let cpu0 = cpu_ticks(pids[2]);
            let t0 = Instant::now();
            std::thread::sleep(window);
            let secs = t0.elapsed().as_secs_f64();
            let tx: Vec<f64> = (0..n)
                .map(|i| tx_bytes(lan, i).saturating_sub(tx0[i]) as f64 / secs)
                .collect();
            let hz = 100.0; // USER_HZ on Linux
            let cpu = cpu_ticks(pids[2]).saturating_sub(cpu0) as f64 / hz / secs * 100.0;
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

/// localnet's master/slave rows: a slave on every host, a master on host 0.
fn measure_runtime(lan: &Lan, repeat: usize, rows: &mut Rows) {
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
    for _ in 0..repeat {
        let slaves: Vec<u32> = (0..n)
            .map(|i| {
                let name = format!("h{i}");
                let mut args = vec!["slave", "--name", &name];
                args.extend_from_slice(&net);
                lan.spawn(i, &format!("slave-h{i}"), &binary(), &args)
            })
            .collect();
        let daemon = lan.daemon(0, &net[2..]);
        let all_known = eventually(wait, || {
            peers(Path::new(sock))
                .iter()
                .filter(|p| p["role"] == "slave")
                .count()
                == n
        });
        assert!(all_known, "the daemon on h0 did not find {n} slaves");
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
        let (cold, _) = master(&[], &["true"]);
        record(rows, FAN_OUT_COLD, cold, wait);
        let (warm, _) = master(&["--control", sock], &["true"]);
        record(rows, FAN_OUT_WARM, warm, wait);
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
        let t0 = Instant::now();
        let mut args = vec!["terminate", "--all", "--control", sock];
        args.extend_from_slice(&net);
        let out = lan.run(0, &binary(), &args);
        let gone = slaves
            .iter()
            .all(|&pid| lan.wait(pid, Duration::from_secs(10)).is_some());
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !(out.status.success() && gone) {
            eprintln!(
                "terminate --all: {}; every slave gone: {gone}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        record(
            rows,
            TERMINATE,
            (out.status.success() && gone).then_some(ms),
            wait,
        );
        Localnet::default().stop_all(lan, &slaves);
        Localnet::default().stop_all(lan, &[daemon]);
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn main() {
    let args = parse_args();
    if !support::netns_available() {
        return;
    }
    let mut results = json!({
        "machine": machine(),
        "localnet_args": args.localnet_args,
        "repeat": args.repeat,
        "idle_secs": args.idle_secs,
        "sizes": {}
    });
    for &n in &args.nodes {
        let lan = Lan::new(&format!("b{n}"), 200 + (n % 50) as u8, n).expect("namespace LAN");
        let mut by_system: BTreeMap<&str, Rows> = BTreeMap::new();
        for system in &args.systems {
            let mut rows = Rows::new();
            match system.as_str() {
                "localnet" => {
                    eprintln!("{n} nodes: localnet ...");
                    let localnet = Localnet {
                        extra: args.localnet_args.clone(),
                    };
                    measure(&localnet, &lan, args.repeat, args.idle_secs, &mut rows);
                    eprintln!("{n} nodes: localnet master/slave ...");
                    measure_runtime(&lan, args.repeat, &mut rows);
                }
                "serf" if !installed("serf", "version") => {
                    eprintln!(
                        "serf is not installed (apt-get install serf): its column stays empty"
                    );
                    continue;
                }
                "serf" => {
                    eprintln!("{n} nodes: serf ...");
                    let serf = Serf::new(lan.dir());
                    measure(&serf, &lan, args.repeat, args.idle_secs, &mut rows);
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
                    continue;
                }
                "avahi" => {
                    eprintln!("{n} nodes: avahi ...");
                    let avahi = Avahi::new(&lan);
                    measure(&avahi, &lan, args.repeat, args.idle_secs, &mut rows);
                    avahi.close(&lan);
                }
                _ => unreachable!("checked in parse_args"),
            }
            by_system.insert(
                SYSTEMS.iter().find(|s| *s == system).copied().unwrap_or(""),
                rows,
            );
        }
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

/// One table cell: min / **median** / max, with timeouts said in words.
fn cell(row: Option<&Row>) -> (String, Option<f64>) {
    let Some(row) = row else {
        return (String::new(), None);
    };
    let late = |k: usize| {
        format!(
            "not within {} s in {k} of {}",
            row.limit_s,
            k + row.samples.len()
        )
    };
    if row.samples.is_empty() {
        return (late(row.timeouts), None);
    }
    let (a, b, c) = stats(&row.samples);
    let digits = if b >= 100.0 { 0 } else { 1 };
    let mut text = format!("{a:.digits$} / **{b:.digits$}** / {c:.digits$}");
    if row.timeouts > 0 {
        text += &format!(" ({})", late(row.timeouts));
    }
    (text, Some(b))
}

fn print_table(n: usize, by: &BTreeMap<&str, Rows>) {
    println!("\n### {n} nodes (min / **median** / max)\n");
    println!("| row | localnet | serf | avahi | localnet/serf | localnet/avahi |");
    println!("|---|---|---|---|---|---|");
    let names = [
        ALL_SEE_ALL,
        FAILED,
        LEFT,
        FAN_OUT_WARM,
        FAN_OUT_COLD,
        TRAFFIC_NODE,
        TRAFFIC_GROUP,
        RSS,
        CPU,
        LINES,
        TERMINATE,
    ];
    for row in names {
        let cells: Vec<(String, Option<f64>)> = SYSTEMS
            .iter()
            .map(|s| cell(by.get(s).and_then(|r| r.get(row))))
            .collect();
        if cells.iter().all(|c| c.0.is_empty()) {
            continue;
        }
        let ratio = |peer: usize| match (cells[0].1, cells[peer].1) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => String::new(),
        };
        println!(
            "| {row} | {} | {} | {} | {} | {} |",
            cells[0].0,
            cells[1].0,
            cells[2].0,
            ratio(1),
            ratio(2)
        );
    }
}

/// The machine, with the versions of the peer systems.
fn machine() -> Value {
    let mut machine = common::machine();
    let version = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    machine["serf"] = json!(version("serf", "version"));
    machine["avahi"] = json!(version("avahi-daemon", "--version"));
    machine
}
