//! localnet beside HashiCorp Serf on the same namespace LAN, in one run.
//!
//! ```text
//! cargo bench --bench lan -- --nodes 5,20 --repeat 5 [--idle-secs 30] [--systems localnet,serf]
//! ```
//!
//! For each LAN size it builds one LAN of network namespaces and runs each system on the
//! same hosts, one after the other: a simultaneous start (time until every node lists
//! every other), kill -9 of one node (until all others say failed), a graceful stop of
//! another (until all others say left: SIGTERM for localnet, SIGINT for Serf, whose
//! graceful leave it is), then an idle window (traffic from interface counters, RSS and
//! CPU of one node). Times come from each node's own event log with a wall-clock stamp
//! (localnet's log lines; a Serf event handler writing `date +%s.%N`), so they do not
//! depend on how fast this harness polls. Prints a markdown table and writes
//! `benches/results/lan-<unix time>.json`. A system that is not installed is reported
//! with how to install it, and its column stays empty.
//!
//! Needs root (network namespaces). Everything runs inside namespaces this bench makes.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{Lan, binary};

struct Args {
    nodes: Vec<usize>,
    repeat: usize,
    idle_secs: u64,
    systems: Vec<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: vec![5, 20],
        repeat: 5,
        idle_secs: 30,
        systems: vec!["localnet".into(), "serf".into()],
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
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}; see the top of benches/lan.rs"),
        }
    }
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

/// One event a node logged: (unix seconds, event, peer name).
type Event = (f64, String, String);

/// What a system under test must do.
trait System {
    fn name(&self) -> &'static str;
    /// Starts every node at once; returns their PIDs.
    fn start_all(&self, lan: &Lan) -> Vec<u32>;
    /// The events node `i` logged so far.
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event>;
    /// Event names for a failure and a leave.
    fn failed(&self) -> &'static str;
    fn left(&self) -> &'static str;
    fn joined(&self) -> &'static str;
    /// The signal of a graceful stop.
    fn stop_signal(&self) -> i32;
}

struct Localnet;

impl System for Localnet {
    fn name(&self) -> &'static str {
        "localnet"
    }
    fn start_all(&self, lan: &Lan) -> Vec<u32> {
        (0..lan.hosts())
            .map(|i| {
                let name = format!("h{i}");
                let sock = lan.sock(i);
                let args = [
                    "daemon",
                    "--name",
                    &name,
                    "--interface",
                    "eth0",
                    "--discovery",
                    "multicast",
                    "--control",
                    sock.to_str().unwrap(),
                ];
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
    fn failed(&self) -> &'static str {
        "failed"
    }
    fn left(&self) -> &'static str {
        "left"
    }
    fn joined(&self) -> &'static str {
        "joined"
    }
    fn stop_signal(&self) -> i32 {
        libc::SIGTERM
    }
}

struct Serf {
    handler: PathBuf,
}

impl Serf {
    fn new(dir: &Path) -> Serf {
        let handler = dir.join("serf-handler.sh");
        // Serf runs the handler per event with the members on stdin.
        std::fs::write(&handler, "#!/bin/sh\nt=$(date +%s.%N)\nwhile read -r name rest; do echo \"$t $SERF_EVENT $name\"; done >> \"$BENCH_LOG\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
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
                    "-log-level=warn",
                ];
                lan.spawn(i, &format!("serf-h{i}"), Path::new("serf"), &args)
            })
            .collect()
    }
    fn events(&self, lan: &Lan, i: usize) -> Vec<Event> {
        std::fs::read_to_string(Serf::log(lan, i))
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
    fn failed(&self) -> &'static str {
        "member-failed"
    }
    fn left(&self) -> &'static str {
        "member-leave"
    }
    fn joined(&self) -> &'static str {
        "member-join"
    }
    fn stop_signal(&self) -> i32 {
        libc::SIGINT
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
    let out = std::process::Command::new("ip")
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

/// Runs one system on the LAN `repeat` times; returns row name → samples.
fn measure(
    sys: &dyn System,
    lan: &Lan,
    repeat: usize,
    idle_secs: u64,
) -> BTreeMap<&'static str, Vec<f64>> {
    let mut rows: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let n = lan.hosts();
    for r in 0..repeat {
        let started = unix_now();
        let pids = sys.start_all(lan);
        let all: Vec<usize> = (0..n).collect();
        match all_saw(
            sys,
            lan,
            &all,
            sys.joined(),
            None,
            started,
            Duration::from_secs(30),
        ) {
            Some(ms) => rows
                .entry("all-see-all after a simultaneous start (ms)")
                .or_default()
                .push(ms),
            None => eprintln!("{}: not everyone saw everyone within 30 s", sys.name()),
        }
        std::thread::sleep(Duration::from_secs(2));
        if r == 0 {
            let window = Duration::from_secs(idle_secs);
            let tx0: Vec<u64> = (0..n).map(|i| tx_bytes(lan, i)).collect();
            let cpu0 = cpu_ticks(pids[2]);
            let t0 = Instant::now();
            std::thread::sleep(window);
            let secs = t0.elapsed().as_secs_f64();
            let tx: Vec<f64> = (0..n)
                .map(|i| (tx_bytes(lan, i) - tx0[i]) as f64 / secs)
                .collect();
            let hz = 100.0; // USER_HZ on Linux
            rows.entry("idle traffic per node (B/s)")
                .or_default()
                .push(tx.iter().sum::<f64>() / n as f64);
            rows.entry("idle traffic, whole group (B/s)")
                .or_default()
                .push(tx.iter().sum());
            rows.entry("idle CPU per node (%)")
                .or_default()
                .push((cpu_ticks(pids[2]) - cpu0) as f64 / hz / secs * 100.0);
            rows.entry("idle RSS per node (MB)")
                .or_default()
                .push(rss_kb(pids[2]) as f64 / 1024.0);
        }
        let others: Vec<usize> = (2..n).collect();
        let killed = unix_now();
        lan.signal(pids[0], libc::SIGKILL);
        match all_saw(
            sys,
            lan,
            &others,
            sys.failed(),
            Some("h0"),
            killed,
            Duration::from_secs(60),
        ) {
            Some(ms) => rows
                .entry("kill -9 → failed at every other node (ms)")
                .or_default()
                .push(ms),
            None => eprintln!("{}: a node never declared h0 failed", sys.name()),
        }
        let stopped = unix_now();
        lan.signal(pids[1], sys.stop_signal());
        match all_saw(
            sys,
            lan,
            &others,
            sys.left(),
            Some("h1"),
            stopped,
            Duration::from_secs(30),
        ) {
            Some(ms) => rows
                .entry("graceful stop → left at every other node (ms)")
                .or_default()
                .push(ms),
            None => eprintln!("{}: a node never saw h1 leave", sys.name()),
        }
        for pid in &pids {
            lan.signal(*pid, libc::SIGKILL);
        }
        for pid in &pids {
            lan.wait(*pid, Duration::from_secs(5));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    rows
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn main() {
    let args = parse_args();
    if !support::netns_available() {
        return;
    }
    let serf_installed = std::process::Command::new("serf")
        .arg("version")
        .output()
        .is_ok();
    let mut results = json!({"machine": machine(), "repeat": args.repeat, "sizes": {}});
    for &n in &args.nodes {
        let lan = Lan::new(&format!("b{n}"), 200 + (n % 50) as u8, n).expect("namespace LAN");
        let mut by_system: BTreeMap<&str, BTreeMap<&'static str, Vec<f64>>> = BTreeMap::new();
        for system in &args.systems {
            let sys: Box<dyn System> = match system.as_str() {
                "localnet" => Box::new(Localnet),
                "serf" if !serf_installed => {
                    eprintln!(
                        "serf is not installed (apt-get install serf): its column stays empty"
                    );
                    continue;
                }
                "serf" => Box::new(Serf::new(lan.dir())),
                other => panic!("unknown system {other}"),
            };
            eprintln!("{n} nodes: {} ...", sys.name());
            let rows = measure(sys.as_ref(), &lan, args.repeat, args.idle_secs);
            by_system.insert(sys.name(), rows);
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

fn print_table(n: usize, by: &BTreeMap<&str, BTreeMap<&'static str, Vec<f64>>>) {
    println!("\n### {n} nodes (min / median / max)\n");
    println!("| row | localnet | serf | localnet/serf (medians) |");
    println!("|---|---|---|---|");
    let mut names: Vec<&str> = by.values().flat_map(|r| r.keys().cloned()).collect();
    names.sort();
    names.dedup();
    for row in names {
        let cell = |sys: &str| {
            by.get(sys)
                .and_then(|r| r.get(row))
                .filter(|v| !v.is_empty())
                .map(|v| {
                    let (a, b, c) = stats(v);
                    (format!("{a:.1} / **{b:.1}** / {c:.1}"), b)
                })
        };
        let (l, s) = (cell("localnet"), cell("serf"));
        let ratio = match (&l, &s) {
            (Some((_, a)), Some((_, b))) if *b > 0.0 => format!("{:.2}", a / b),
            _ => String::new(),
        };
        let show = |c: &Option<(String, f64)>| c.as_ref().map(|c| c.0.clone()).unwrap_or_default();
        println!("| {row} | {} | {} | {ratio} |", show(&l), show(&s));
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({"cpus": cpus, "memory": mem, "kernel": kernel.trim()})
}
