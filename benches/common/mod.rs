//! What both benchmarks share: what they record about the machine they ran on, summary
//! statistics, the wall clock, and memory figures from `/proc`.
// Each bench uses only some of these.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// CPUs, CPU model, memory, kernel and localnet's version, as JSON.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": cpus,
        "cpu": model,
        "memory": mem,
        "kernel": kernel.trim(),
        "localnet": env!("CARGO_PKG_VERSION"),
    })
}

/// Smallest, median (the upper one of an even count) and largest of some samples;
/// `None` when there are none.
pub fn min_median_max(samples: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((*sorted.first()?, sorted[sorted.len() / 2], *sorted.last()?))
}

/// min / median / max (and how many) of some samples, as JSON; null when there are none.
pub fn spread(samples: &[f64]) -> Value {
    match min_median_max(samples) {
        Some((min, median, max)) => {
            json!({"min": min, "median": median, "max": max, "n": samples.len()})
        }
        None => Value::Null,
    }
}

/// Seconds since the Unix epoch, by the wall clock (0 if the clock is before it).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A `kB` field (`VmRSS`, `VmHWM`, ...) of `/proc/<process>/status`, where `process` is
/// a PID or `self`.
fn status_kb(process: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()?
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The resident set of process `pid` now (VmRSS), kB; 0 when it cannot be read.
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(&pid.to_string(), "VmRSS").unwrap_or(0)
}

/// This process's peak resident set (VmHWM), MB; 0 when it cannot be read.
pub fn peak_rss_mb() -> f64 {
    status_kb("self", "VmHWM").map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// CPU time process `pid` has run so far, in nanoseconds: the sum over its threads of
/// the scheduler's own account (`/proc/PID/task/*/schedstat`), which is exact where
/// `/proc/PID/stat` counts whole 10 ms ticks (an idle daemon uses a few per second).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}
