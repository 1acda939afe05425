//! The real protocol core on a simulated LAN of 100 to 10 000 nodes, in virtual time.
//!
//! ```text
//! cargo bench --bench sim -- --nodes 100,1000,10000 [--seed 1] [--loss 0.0]
//! ```
//!
//! Each size runs in a fresh process of this bench (so its peak RSS is its own) on
//! [`localnet::discovery::sim`]: N real `Discovery` cores, a priority queue of deliveries taking
//! 1–2 ms each, multicast delivered to every other running node (each copy lost with
//! probability `--loss`, independently), one seeded RNG. No sockets: nothing here
//! touches a network. For each size it prints markdown table rows and, at the end, writes
//! `benches/results/sim-<unix time>.json` with these figures and the raw series. All
//! times below are virtual milliseconds, except the simulation's own cost.
//!
//! - **all-see-all**: every node is started at a random time within the first second;
//!   the time from the *last* start until every node lists every other (the JSON also
//!   has it from t = 0, and when the last start was).
//! - **announcement interval**: min / median / max over the nodes of the interval in
//!   force in steady state; each node advertises a TTL of 3.2 intervals.
//! - **steady traffic**: bytes per second sent in steady state, from 5 s after
//!   convergence, over 15 s or two median announcement intervals if longer (nodes that
//!   started within a second announce more or less in step, so a shorter window would
//!   catch a burst or a lull): IP and UDP headers included, a multicast counted once
//!   (as on a shared medium), unicast once. *Whole group* is the sum over all nodes, the
//!   figure the protocol's budget (64 000 B/s) is about; *per node* is that divided by
//!   the nodes; *busiest second* is the most the group sent in one second of it.
//! - **kill -9 → failed**: then node N/3 goes silent (`Sim::kill`: no goodbye); the time
//!   from the kill until each other node reported `failed` for it: min / median / max
//!   over those nodes. The max, when the last one noticed, is the headline. Next to it,
//!   the TTL the victim advertised (as its peers held it); no node should take longer.
//! - **traffic during failure detection**: the whole group's bytes per second from the
//!   kill until the last `failed`: steady traffic plus the direct probes every node
//!   sends the silent node once it is suspect.
//! - **graceful stop → left**: then node 2N/3 leaves (`Sim::stop`: goodbye, sent twice);
//!   min / median / max over the other nodes of the time until each reported `left`.
//! - **false failures**: `failed` reported for any node other than the victim (should
//!   be 0).
//! - **simulation wall time** and **peak RSS** (VmHWM of the process running that
//!   size): what the simulation itself cost on this machine, with one datagram handed
//!   to many nodes on two threads (`SimConfig::threads`; the results do not depend on
//!   it). Long phases print progress to stderr.
//!
//! The default peer table bound (`max_peers`, 4096) is raised to N for larger N, and
//! said so in the output: with the default, nodes of a larger LAN never list everyone.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::{peak_rss_mb, spread, unix_now};
use localnet::PeerEvent;
use localnet::discovery::Config;
use localnet::discovery::sim::{Sim, SimConfig};
use serde_json::{Value, json};

/// Longest a size may take to converge, virtual ms.
const CONVERGE_DEADLINE_MS: u64 = 600_000;
/// Steady state starts this long after convergence...
const SETTLE_S: u64 = 5;
/// ... and is measured for this long at least (and two announcement intervals).
const STEADY_S: u64 = 15;
/// Progress goes to stderr this often (wall seconds).
const PROGRESS_S: f64 = 30.0;
/// Longest wait for every node to report the killed node failed, virtual ms.
const FAIL_DEADLINE_MS: u64 = 900_000;
/// Longest wait for every node to report the stopped node left, virtual ms.
const LEAVE_DEADLINE_MS: u64 = 60_000;
/// The protocol's traffic budget for the whole group.
const BUDGET: u64 = 64_000;

struct Args {
    nodes: Vec<usize>,
    seed: u64,
    loss: f64,
    /// Internal: run this one size in this process and print its result as JSON.
    one: Option<usize>,
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}");
    eprintln!("usage: cargo bench --bench sim -- [--nodes 100,1000,10000] [--seed N] [--loss P]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: vec![100, 1000, 10_000],
        seed: 1,
        loss: 0.0,
        one: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--nodes" => {
                let v = value();
                args.nodes = v
                    .split(',')
                    .map(|s| match s.trim().parse::<usize>() {
                        Ok(n) if n >= 3 => n,
                        _ => usage(&format!(
                            "--nodes: {s:?} is not a number of nodes (3 or more)"
                        )),
                    })
                    .collect();
            }
            "--seed" => {
                let v = value();
                args.seed = v
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--seed: {v:?} is not a number")));
            }
            "--loss" => {
                let v = value();
                args.loss = match v.parse::<f64>() {
                    Ok(p) if (0.0..1.0).contains(&p) => p,
                    _ => usage(&format!("--loss: {v:?} is not a probability in [0, 1)")),
                };
            }
            "--one" => {
                let v = value();
                args.one = Some(
                    v.parse()
                        .unwrap_or_else(|_| usage(&format!("--one: {v:?} is not a number"))),
                );
            }
            "--bench" => {} // cargo bench passes it
            other => usage(&format!(
                "unknown argument {other}; see the top of benches/sim.rs"
            )),
        }
    }
    args
}

fn main() {
    let args = parse_args();
    if let Some(n) = args.one {
        let result = run_size(n, args.seed, args.loss);
        println!("{result}");
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| usage(&format!("own path: {e}")));
    let mut results = json!({
        "command": format!(
            "cargo bench --bench sim -- --nodes {} --seed {} --loss {}",
            args.nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            args.seed,
            args.loss
        ),
        "machine": common::machine(),
        "seed": args.seed,
        "loss": args.loss,
        "delay_ms": [1, 2],
        "start_spread_ms": 1000,
        "budget_bytes_per_s": BUDGET,
        "sizes": {},
    });
    println!("| nodes | figure | value |");
    println!("|---:|---|---|");
    for &n in &args.nodes {
        eprintln!("{n} nodes: simulating ...");
        let output = Command::new(&exe)
            .args([
                "--one",
                &n.to_string(),
                "--seed",
                &args.seed.to_string(),
                "--loss",
                &args.loss.to_string(),
            ])
            .stderr(Stdio::inherit())
            .output();
        let parsed = output.ok().and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let line = text.lines().rev().find(|l| l.starts_with('{'))?.to_string();
            serde_json::from_str::<Value>(&line).ok()
        });
        match parsed {
            Some(r) => {
                print_rows(n, &r);
                results["sizes"][n.to_string()] = r;
            }
            None => {
                println!("| {n} | simulation | did not finish (see stderr) |");
                results["sizes"][n.to_string()] = Value::Null;
            }
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("sim-{}.json", unix_now() as u64));
    match std::fs::write(
        &file,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    ) {
        Ok(()) => println!("\nraw results: {}", file.display()),
        Err(e) => eprintln!("cannot write {}: {e}", file.display()),
    }
}

/// Simulates one LAN size; returns its figures.
fn run_size(n: usize, seed: u64, loss: f64) -> Value {
    let wall = Instant::now();
    let mut protocol = Config::default();
    let default_max_peers = protocol.max_peers;
    protocol.max_peers = protocol.max_peers.max(n);
    let mut sim = Sim::new(SimConfig {
        nodes: n,
        seed,
        loss,
        protocol,
        // Keep failures and leaves only: the N² `joined` events would not fit.
        keep: |e| matches!(e, PeerEvent::Failed(_) | PeerEvent::Left(_)),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
        ..SimConfig::default()
    });
    let mut out = json!({
        "nodes": n,
        "max_peers": default_max_peers.max(n),
        "max_peers_raised": n > default_max_peers,
    });
    let mut walls = json!({});

    // 1. Simultaneous start.
    sim.start_all(0, 1000);
    let mut progress = Progress::new(n, &wall);
    let mut converged = None;
    while converged.is_none() && sim.now() < CONVERGE_DEADLINE_MS {
        let step = (sim.now() + 1000).min(CONVERGE_DEADLINE_MS);
        converged = sim.run_until_converged(step);
        if converged.is_none() {
            sim.run_until(step); // nothing due: on to the next second
        }
        progress.say(&sim, "converging");
    }
    let last_start = (0..n).filter_map(|i| sim.started_at(i)).max().unwrap_or(0);
    walls["convergence"] = json!(wall.elapsed().as_secs_f64());
    out["last_start_ms"] = json!(last_start);
    out["rss_after_convergence_mb"] = json!(peak_rss_mb());
    let Some(converged) = converged else {
        eprintln!("{n} nodes: not converged within {CONVERGE_DEADLINE_MS} virtual ms");
        out["converged"] = json!(false);
        return finish(out, walls, &sim, wall);
    };
    out["converged"] = json!(true);
    out["convergence_ms_from_0"] = json!(converged);
    out["convergence_ms_after_last_start"] = json!(converged - last_start);
    eprintln!(
        "{n} nodes: all see all {} ms after the last start ({:.1} s wall)",
        converged - last_start,
        wall.elapsed().as_secs_f64()
    );

    // 2. Steady state.
    let phase = Instant::now();
    let from_s = converged.div_ceil(1000) + SETTLE_S;
    sim.run_until(from_s * 1000);
    let mut intervals: Vec<f64> = (0..n).map(|i| sim.node(i).interval_ms() as f64).collect();
    intervals.sort_by(f64::total_cmp);
    let window_s = STEADY_S.max((2.0 * intervals[n / 2] / 1000.0).ceil() as u64);
    while sim.now() < (from_s + window_s) * 1000 {
        let next = (sim.now() + 1000).min((from_s + window_s) * 1000);
        sim.run_until(next);
        progress.say(&sim, "steady state");
    }
    let (from, to) = (from_s as usize, (from_s + window_s) as usize);
    let group = sim.group_rate(from, to);
    let busiest = sim.bytes_per_second[from..to].iter().max().copied();
    out["steady_window_s"] = json!([from_s, from_s + window_s]);
    out["steady_group_bytes_per_s"] = json!(group);
    out["steady_node_bytes_per_s"] = json!(group / n as f64);
    out["steady_busiest_second_bytes"] = json!(busiest);
    out["interval_ms"] = spread(&intervals);
    out["still_converged_after_steady_state"] = json!(sim.converged());
    walls["steady"] = json!(phase.elapsed().as_secs_f64());
    eprintln!(
        "{n} nodes: steady state {group:.0} B/s for the group ({:.1} s wall)",
        phase.elapsed().as_secs_f64()
    );

    // 3. kill -9 of one node.
    let phase = Instant::now();
    let victim = n / 3;
    let victim_id = sim.id(victim);
    let killed_at = sim.now();
    sim.kill(victim);
    let observers = sim.running();
    let failed_at = |sim: &Sim| -> Vec<(u64, u64)> {
        sim.seen
            .iter()
            .filter_map(|s| match &s.event {
                PeerEvent::Failed(p) if p.id == victim_id => Some((s.at - killed_at, p.ttl_ms)),
                _ => None,
            })
            .collect()
    };
    let mut failed = Vec::new();
    while sim.now() < killed_at + FAIL_DEADLINE_MS {
        let next = sim.now() + 1000;
        sim.run_until(next);
        failed = failed_at(&sim);
        if failed.len() >= observers {
            break;
        }
        progress.say(&sim, "waiting for failure detection");
    }
    let detect: Vec<f64> = failed.iter().map(|(t, _)| *t as f64).collect();
    let ttls: Vec<f64> = failed.iter().map(|(_, ttl)| *ttl as f64).collect();
    let last_failed = failed.iter().map(|(t, _)| *t).max().unwrap_or(0);
    let (kill_s, end_s) = (killed_at / 1000, (killed_at + last_failed).div_ceil(1000));
    out["failure"] = json!({
        "victim": victim,
        "killed_at_ms": killed_at,
        "observers": observers,
        "reported": failed.len(),
        "detect_ms": spread(&detect),
        "advertised_ttl_ms": spread(&ttls),
        "group_bytes_per_s_during": sim.group_rate(kill_s as usize, end_s.max(kill_s + 1) as usize),
    });
    walls["failure"] = json!(phase.elapsed().as_secs_f64());
    eprintln!(
        "{n} nodes: {}/{observers} reported the killed node failed, last after {last_failed} ms ({:.1} s wall)",
        failed.len(),
        phase.elapsed().as_secs_f64()
    );

    // 4. Graceful stop of another node.
    let phase = Instant::now();
    let leaver = 2 * n / 3;
    let leaver_id = sim.id(leaver);
    let stopped_at = sim.now();
    sim.stop(leaver);
    let observers = sim.running();
    let mut left = Vec::new();
    while sim.now() < stopped_at + LEAVE_DEADLINE_MS {
        let next = sim.now() + 100;
        sim.run_until(next);
        left = sim
            .seen
            .iter()
            .filter_map(|s| match &s.event {
                PeerEvent::Left(p) if p.id == leaver_id => Some((s.at - stopped_at) as f64),
                _ => None,
            })
            .collect();
        if left.len() >= observers {
            break;
        }
    }
    out["leave"] = json!({
        "leaver": leaver,
        "stopped_at_ms": stopped_at,
        "observers": observers,
        "reported": left.len(),
        "left_ms": spread(&left),
    });
    walls["leave"] = json!(phase.elapsed().as_secs_f64());
    out["false_failures"] = json!(
        sim.seen
            .iter()
            .filter(|s| matches!(&s.event, PeerEvent::Failed(p) if p.id != victim_id))
            .count()
    );
    finish(out, walls, &sim, wall)
}

/// Tells stderr how a long simulation is going, now and then.
struct Progress<'a> {
    n: usize,
    wall: &'a Instant,
    last: f64,
}

impl<'a> Progress<'a> {
    fn new(n: usize, wall: &'a Instant) -> Self {
        Self { n, wall, last: 0.0 }
    }

    fn say(&mut self, sim: &Sim, doing: &str) {
        let t = self.wall.elapsed().as_secs_f64();
        if t - self.last >= PROGRESS_S {
            self.last = t;
            eprintln!(
                "{} nodes: {doing}, virtual {:.1} s, {} copies delivered, {:.0} s wall, peak RSS {:.0} MB",
                self.n,
                sim.now() as f64 / 1000.0,
                sim.delivered,
                t,
                peak_rss_mb()
            );
        }
    }
}

/// Adds what every size reports, finished or not.
fn finish(mut out: Value, mut walls: Value, sim: &Sim, wall: Instant) -> Value {
    walls["total"] = json!(wall.elapsed().as_secs_f64());
    out["wall_s"] = walls;
    out["peak_rss_mb"] = json!(peak_rss_mb());
    out["virtual_ms"] = json!(sim.now());
    out["copies_delivered"] = json!(sim.delivered);
    out["group_bytes_per_second"] = json!(sim.bytes_per_second);
    out
}

fn print_rows(n: usize, r: &Value) {
    let num = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.0}"));
    let mmm = |v: &Value| {
        if v.is_null() {
            return "–".to_string();
        }
        format!(
            "{} / **{}** / {}",
            num(&v["min"]),
            num(&v["median"]),
            num(&v["max"])
        )
    };
    let row = |figure: &str, value: String| println!("| {n} | {figure} | {value} |");
    if r["max_peers_raised"] == json!(true) {
        row(
            "max_peers (raised from the default 4096)",
            num(&r["max_peers"]),
        );
    }
    if r["converged"] != json!(true) {
        row(
            "all-see-all",
            format!("not within {} s", CONVERGE_DEADLINE_MS / 1000),
        );
    } else {
        row(
            "all-see-all after the last start (ms)",
            format!(
                "{} (last start at {} ms)",
                num(&r["convergence_ms_after_last_start"]),
                num(&r["last_start_ms"])
            ),
        );
        row(
            "announcement interval, min / median / max (ms)",
            mmm(&r["interval_ms"]),
        );
        row(
            "steady traffic per node (B/s)",
            num(&r["steady_node_bytes_per_s"]),
        );
        let group = r["steady_group_bytes_per_s"].as_f64().unwrap_or(0.0);
        let window = &r["steady_window_s"];
        row(
            &format!(
                "steady traffic, whole group, over {} s (B/s)",
                window[1].as_u64().unwrap_or(0) - window[0].as_u64().unwrap_or(0)
            ),
            format!(
                "{group:.0}{}",
                if group > BUDGET as f64 {
                    format!(" (**over the {BUDGET} budget**)")
                } else {
                    String::new()
                }
            ),
        );
        row(
            "steady traffic, whole group, busiest second (B)",
            num(&r["steady_busiest_second_bytes"]),
        );
        let f = &r["failure"];
        let reported = format!("{}/{}", f["reported"], f["observers"]);
        let max_detect = f["detect_ms"]["max"].as_f64().unwrap_or(f64::INFINITY);
        let ttl = f["advertised_ttl_ms"]["max"].as_f64().unwrap_or(0.0);
        row(
            "kill -9 → failed at every other node, min / median / max (ms)",
            format!(
                "{}{}{}",
                mmm(&f["detect_ms"]),
                if f["reported"] == f["observers"] {
                    String::new()
                } else {
                    format!(" (only {reported} reported)")
                },
                if max_detect > ttl {
                    " (**later than the TTL**)"
                } else {
                    ""
                }
            ),
        );
        row(
            "TTL the killed node advertised (ms)",
            num(&f["advertised_ttl_ms"]["max"]),
        );
        row(
            "traffic during failure detection, whole group (B/s)",
            num(&f["group_bytes_per_s_during"]),
        );
        let l = &r["leave"];
        row(
            "graceful stop → left at every other node, min / median / max (ms)",
            format!(
                "{}{}",
                mmm(&l["left_ms"]),
                if l["reported"] == l["observers"] {
                    String::new()
                } else {
                    format!(" (only {}/{} reported)", l["reported"], l["observers"])
                }
            ),
        );
        row("false failures", num(&r["false_failures"]));
    }
    row(
        "simulated (virtual s) / wall time (s)",
        format!(
            "{:.0} / {:.1}",
            r["virtual_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            r["wall_s"]["total"].as_f64().unwrap_or(0.0)
        ),
    );
    row("simulation peak RSS (MB)", num(&r["peak_rss_mb"]));
}
