//! What both benchmarks record about the machine they ran on.

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
