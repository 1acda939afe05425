//! What `--http` costs an idle daemon: resident memory and CPU of daemons without it,
//! and with it while every daemon's `/metrics` is scraped every `--scrape-every`
//! seconds (15, a common Prometheus setting; its default is 60), in one run on one
//! namespace LAN.
//!
//! ```text
//! cargo bench --bench http -- [--nodes 5] [--secs 45] [--repeat 3] [--scrape-every 15]
//! ```
//!
//! Each repeat starts `--nodes` daemons, lets them settle for 3 s, and over `--secs`
//! measures every daemon's CPU (the scheduler's account, `/proc/PID/task/*/schedstat`)
//! and its RSS (VmRSS) every second, averaged over the window and at its highest; then
//! the same daemons with `--http IP:9464` and a scraper on host 0 that fetches every
//! daemon's `/metrics` at once every `--scrape-every` s, the first at the window's
//! start (and checks that each answer is a metrics text). Prints min / median / max
//! over the daemons of every repeat, and the difference of the medians; writes
//! `benches/results/http-<unix time>.json`. Needs root (network namespaces).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{cpu_ns, min_median_max, rss_kb, unix_now};
use serde_json::json;
use support::Lan;

const PORT: u16 = 9464;

struct Args {
    nodes: usize,
    secs: u64,
    repeat: usize,
    scrape_every: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: 5,
        secs: 45,
        repeat: 3,
        scrape_every: 15,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => args.nodes = value().parse().expect("--nodes N"),
            "--secs" => args.secs = value().parse().expect("--secs N"),
            "--repeat" => args.repeat = value().parse().expect("--repeat N"),
            "--scrape-every" => args.scrape_every = value().parse().expect("--scrape-every SECS"),
            "--bench" => {}
            other => panic!("unknown argument {other}; see the top of benches/http.rs"),
        }
    }
    assert!(args.nodes >= 2, "--nodes: at least 2");
    args
}

/// One `GET /metrics`; whether a metrics text came back.
fn scrape(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("localnet_peers")
}

/// What one window measured, per daemon.
struct Window {
    /// RSS averaged over the window (MB).
    rss: Vec<f64>,
    /// The highest RSS seen (MB).
    peak: Vec<f64>,
    /// CPU over the window (% of one core).
    cpu: Vec<f64>,
    /// Scrapes answered.
    scrapes: u64,
}

/// RSS and CPU of each daemon over `secs`, with or without HTTP.
fn measure(lan: &Lan, args: &Args, http: bool) -> Window {
    let pids: Vec<u32> = (0..args.nodes)
        .map(|i| {
            let addr = SocketAddr::new(lan.ip(i).into(), PORT).to_string();
            match http {
                true => lan.daemon(i, &["--http", &addr]),
                false => lan.daemon(i, &[]),
            }
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = http.then(|| {
        let targets: Vec<SocketAddr> = (0..args.nodes)
            .map(|i| SocketAddr::new(lan.ip(i).into(), PORT))
            .collect();
        let (stop, scrapes) = (stop.clone(), scrapes.clone());
        let every = Duration::from_secs(args.scrape_every.max(1));
        let ns = format!("/var/run/netns/{}", lan.ns(0));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).expect("netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                for addr in &targets {
                    if scrape(*addr) {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += every;
                while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
    });
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ns(p)).collect();
    let started = Instant::now();
    let mut sums = vec![0.0; pids.len()];
    let mut peak: Vec<f64> = vec![0.0; pids.len()];
    let mut samples = 0.0;
    for second in 1..=args.secs {
        let at = started + Duration::from_secs(second);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        for (i, &pid) in pids.iter().enumerate() {
            let mb = rss_kb(pid) as f64 / 1024.0;
            sums[i] += mb;
            peak[i] = peak[i].max(mb);
        }
        samples += 1.0;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(&p, &b)| (cpu_ns(p) - b) as f64 / 1e9 / elapsed * 100.0)
        .collect();
    let rss: Vec<f64> = sums.iter().map(|s| s / samples).collect();
    stop.store(true, Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let _ = scraper.join();
    }
    for &pid in &pids {
        lan.signal(pid, libc::SIGTERM);
    }
    for &pid in &pids {
        lan.wait(pid, Duration::from_secs(5));
    }
    Window {
        rss,
        peak,
        cpu,
        scrapes: scrapes.load(Ordering::Relaxed),
    }
}

fn main() {
    let args = parse_args();
    if !support::netns_available() {
        return;
    }
    let lan = Lan::new("bhttp", 250, args.nodes).expect("namespace LAN");
    let (mut rss_off, mut cpu_off, mut rss_on, mut cpu_on) = (vec![], vec![], vec![], vec![]);
    let (mut peak_off, mut peak_on) = (vec![], vec![]);
    let mut scrapes = 0;
    for r in 0..args.repeat {
        eprintln!("repeat {}: without --http ...", r + 1);
        let w = measure(&lan, &args, false);
        rss_off.extend(w.rss);
        peak_off.extend(w.peak);
        cpu_off.extend(w.cpu);
        eprintln!(
            "repeat {}: with --http, scraped every {} s ...",
            r + 1,
            args.scrape_every
        );
        let w = measure(&lan, &args, true);
        rss_on.extend(w.rss);
        peak_on.extend(w.peak);
        cpu_on.extend(w.cpu);
        scrapes += w.scrapes;
    }
    let per_window = args.secs.div_ceil(args.scrape_every.max(1));
    let expected = (args.repeat * args.nodes) as u64 * per_window;
    let show = |v: &[f64], digits: usize| match min_median_max(v) {
        Some((lo, mid, hi)) => format!("{lo:.digits$} / **{mid:.digits$}** / {hi:.digits$}"),
        None => String::new(),
    };
    let median = |v: &[f64]| min_median_max(v).map_or(0.0, |m| m.1);
    println!(
        "\n### {} daemons, {} s windows, {} repeats (min / **median** / max over daemons)\n",
        args.nodes, args.secs, args.repeat
    );
    println!(
        "| row | without --http | with --http, /metrics scraped every {} s | difference of medians |",
        args.scrape_every
    );
    println!("|---|---|---|---|");
    println!(
        "| idle RSS per daemon, averaged over the window (MB) | {} | {} | {:+.2} |",
        show(&rss_off, 2),
        show(&rss_on, 2),
        median(&rss_on) - median(&rss_off)
    );
    println!(
        "| idle RSS per daemon, highest in the window (MB) | {} | {} | {:+.2} |",
        show(&peak_off, 2),
        show(&peak_on, 2),
        median(&peak_on) - median(&peak_off)
    );
    println!(
        "| idle CPU per daemon (% of a core) | {} | {} | {:+.3} |",
        show(&cpu_off, 3),
        show(&cpu_on, 3),
        median(&cpu_on) - median(&cpu_off)
    );
    println!("\nscrapes answered: {scrapes} (about {expected} asked)");
    let results = json!({
        "command": std::env::args().skip(1).filter(|a| a != "--bench").collect::<Vec<_>>(),
        "machine": common::machine(),
        "nodes": args.nodes,
        "secs": args.secs,
        "repeat": args.repeat,
        "scrape_every_s": args.scrape_every,
        "rss_mb": { "without_http": rss_off, "with_http": rss_on },
        "peak_rss_mb": { "without_http": peak_off, "with_http": peak_on },
        "cpu_percent": { "without_http": cpu_off, "with_http": cpu_on },
        "scrapes": scrapes,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("http-{}.json", unix_now() as u64));
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    )
    .expect("write results");
    println!("raw results: {}", file.display());
}
