//! Settled discovery on a namespace LAN: a one-shot search (no daemon to ask) returns
//! once every member has answered its probes, not at its timeout.

mod support;

use std::time::{Duration, Instant};

use support::words::words;
use support::{Lan, binary};

/// Eight daemons; from a ninth host without a daemon, `localnet peers --timeout 5s`
/// lists all eight and returns long before its timeout (it waited the whole timeout
/// before settled discovery); the last attempt with mDNS too, the default.
#[test]
fn a_one_shot_peers_returns_every_daemon_well_before_its_timeout() {
    let Some(lan) = Lan::new("settle", 121, 9) else {
        return;
    };
    for i in 0..8 {
        lan.daemon(i, &[]);
    }
    // Let the daemons find each other first: the one-shot search is what is measured.
    std::thread::sleep(Duration::from_millis(500));
    for attempt in 0..3 {
        let started = Instant::now();
        let mode = if attempt == 2 { "both" } else { "multicast" };
        let line = format!("peers --json --interface eth0 --discovery {mode} --timeout 5s");
        let out = lan.run(8, &binary(), &words(&line));
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<&str> = list.iter().map(|p| p["name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(
            names,
            ["h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7"],
            "attempt {attempt}"
        );
        eprintln!("FIGURE one_shot_peers_8_ms={}", took.as_millis());
        assert!(
            took < Duration::from_secs(2),
            "attempt {attempt}: returned only after {took:?} (timeout 5 s)"
        );
    }
}

/// `localnet terminate --all` without a daemon finds the slaves by a settled search
/// and returns well before its --wait.
#[test]
fn terminate_all_without_a_daemon_returns_once_settled() {
    let Some(lan) = Lan::new("settlt", 122, 4) else {
        return;
    };
    let key = lan.key("settle");
    let net_line = format!("--interface eth0 --discovery multicast --key-file {key}");
    let net = words(&net_line);
    let mut pids = Vec::new();
    for i in 0..3 {
        let name = format!("s{i}");
        let mut args = vec!["slave", "--name", &name];
        args.extend_from_slice(&net);
        pids.push(lan.spawn(i, &name, &binary(), &args));
    }
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    let line = format!(
        "terminate --all --interface eth0 --discovery multicast --key-file {key} --wait 5s"
    );
    let out = lan.run(3, &binary(), &words(&line));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("terminated ").count(), 3, "{stdout}");
    eprintln!("FIGURE one_shot_terminate_all_3_ms={}", took.as_millis());
    assert!(
        took < Duration::from_secs(2),
        "returned only after {took:?}"
    );
    for pid in pids {
        assert!(
            lan.wait(pid, Duration::from_secs(5)).is_some(),
            "slave {pid} still runs"
        );
    }
}
