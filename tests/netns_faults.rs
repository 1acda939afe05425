//! Faults on a namespace LAN with real daemons: packet loss, a partition, churn and
//! skewed clocks. Loss and partitions are nftables rules in the LAN's switch namespace
//! (`Lan::set_loss`, `Lan::partition`); clocks are skewed with libfaketime.
//!
//! Every test prints its measured figures as `FIGURE name=value` lines:
//! `cargo test --release --test netns_faults -- --nocapture | grep FIGURE`.
//! `FAULTS_SOAK_SECS` sets how long the loss tests watch for false failures (default
//! 30 s each, so that the file stays within a minute per test); the 30 % loss figure is
//! an ignored test: `cargo test --release --test netns_faults -- --ignored --nocapture`.

mod support;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::words::{assert_success, words, words_then};
use support::{
    Lan, binary, eventually, faketime, peer_names, peers, status, tool_available, watch,
};

type Events = mpsc::Receiver<(Instant, Value)>;

/// The tests of this file run one at a time: each brings up to ten daemons and holds
/// them to timing bounds, and on 2 cores several at once would starve each other (the
/// false failures seen then are the machine's, not the protocol's).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn names(range: impl Iterator<Item = usize>) -> BTreeSet<String> {
    range.map(|i| format!("h{i}")).collect()
}

fn others(lan: &Lan, me: usize) -> Vec<String> {
    names((0..lan.hosts()).filter(|&i| i != me))
        .into_iter()
        .collect()
}

/// A LAN whose switch can drop frames (nftables present), or `None` to skip.
fn faulty_lan(tag: &str, subnet: u8, hosts: usize) -> Option<Lan> {
    if !tool_available("nft", "nftables") {
        return None;
    }
    Lan::new(tag, subnet, hosts)
}

fn soak() -> Duration {
    let secs = std::env::var("FAULTS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Starts a daemon on every host, all at once under `percent` % loss; returns how long
/// after the last start every host saw every other, and the watches of all.
fn start_under_loss(lan: &Lan, percent: u8) -> (Duration, Vec<Events>) {
    for i in 0..lan.hosts() {
        lan.set_loss(i, percent);
    }
    let mut last_start = Instant::now();
    for i in 0..lan.hosts() {
        last_start = Instant::now();
        lan.daemon(i, &[]);
    }
    let all_see_all = || (0..lan.hosts()).all(|i| peer_names(&lan.sock(i)) == others(lan, i));
    assert!(
        eventually(Duration::from_secs(5), all_see_all),
        "no convergence at {percent} % loss within 5 s"
    );
    let converged = last_start.elapsed();
    let watches = (0..lan.hosts()).map(|i| watch(&lan.sock(i))).collect();
    (converged, watches)
}

/// Counts the `failed` (and `left`) events of every watch.
fn count_events(watches: &[Events], kind: &str) -> (usize, Vec<String>) {
    let mut seen = Vec::new();
    for (i, w) in watches.iter().enumerate() {
        for (_, event) in w.try_iter() {
            if event["event"] == kind {
                seen.push(format!("h{i} saw {} {kind}", event["peer"]["name"]));
            }
        }
    }
    (seen.len(), seen)
}

fn loss_soak(tag: &str, subnet: u8, percent: u8, assert_none: bool) {
    let Some(lan) = faulty_lan(tag, subnet, 10) else {
        return;
    };
    let (converged, watches) = start_under_loss(&lan, percent);
    eprintln!("FIGURE loss{percent}_converge_ms={}", converged.as_millis());
    let soak = soak();
    std::thread::sleep(soak);
    let (failed, which) = count_events(&watches, "failed");
    let lost = lan.lost_frames();
    eprintln!("FIGURE loss{percent}_frames_dropped_by_nft={lost}");
    assert!(lost > 100, "the loss rules dropped only {lost} frames");
    let per_minute = failed as f64 * 60.0 / soak.as_secs_f64();
    eprintln!(
        "FIGURE loss{percent}_false_failed={failed} over {} s (10 hosts, 90 pairs): {per_minute:.2}/min",
        soak.as_secs()
    );
    // Whatever was falsely failed comes back: tables are whole at the end.
    assert!(
        eventually(Duration::from_secs(2), || (0..10).all(|i| peer_names(
            &lan.sock(i)
        ) == others(
            &lan, i
        ))),
        "tables not whole after the soak"
    );
    if assert_none {
        assert_eq!(failed, 0, "false failures at {percent} % loss: {which:?}");
        assert!(
            converged < Duration::from_millis(1000),
            "converged only after {converged:?} at {percent} % loss"
        );
    }
}

#[test]
fn ten_hosts_at_10_percent_loss_never_see_a_false_failure() {
    let _serial = one_at_a_time();
    loss_soak("l10", 91, 10, true);
}

#[test]
fn ten_hosts_at_20_percent_loss_never_see_a_false_failure() {
    let _serial = one_at_a_time();
    loss_soak("l20", 92, 20, true);
}

/// The closing note's figure: false failures per minute at 30 % loss (60 s by default).
#[test]
#[ignore = "a measurement, not a check: run by hand with FAULTS_SOAK_SECS=60"]
fn ten_hosts_at_30_percent_loss_false_failure_rate() {
    let _serial = one_at_a_time();
    loss_soak("l30", 96, 30, false);
}

/// Waits until every watch in `watches` (of hosts `of`) has seen `kind` for every host
/// of `about`; the latest arrival.
fn wait_all(
    watches: &[Events],
    of: &[usize],
    kind: &str,
    about: &[usize],
    timeout: Duration,
) -> Instant {
    let deadline = Instant::now() + timeout;
    let mut latest = Instant::now();
    for &i in of {
        let mut missing = names(about.iter().copied());
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match watches[i].recv_timeout(left) {
                Ok((at, v)) if v["event"] == kind => {
                    let name = v["peer"]["name"].as_str().unwrap_or("").to_string();
                    if missing.remove(&name) {
                        latest = latest.max(at);
                    } else {
                        assert!(
                            kind != "failed",
                            "h{i} declared {name} failed, on its own side"
                        );
                    }
                }
                Ok(_) => {}
                Err(_) => panic!("h{i} never saw {kind} for {missing:?}"),
            }
        }
    }
    latest
}

#[test]
fn a_four_four_partition_is_detected_and_heals() {
    let _serial = one_at_a_time();
    let Some(lan) = faulty_lan("part", 93, 8) else {
        return;
    };
    for i in 0..8 {
        lan.daemon(i, &[]);
    }
    assert!(eventually(Duration::from_secs(5), || (0..8)
        .all(|i| peer_names(&lan.sock(i)) == others(&lan, i))));
    let watches: Vec<Events> = (0..8).map(|i| watch(&lan.sock(i))).collect();
    let (a, b): (Vec<usize>, Vec<usize>) = ((0..4).collect(), (4..8).collect());
    let cut = Instant::now();
    lan.partition(&a, &b);
    // The rules are in force somewhere between `cut` and now (nft's own run time).
    eprintln!("FIGURE partition_nft_ms={}", cut.elapsed().as_millis());
    let seen_a = wait_all(&watches, &a, "failed", &b, Duration::from_secs(5));
    let seen_b = wait_all(&watches, &b, "failed", &a, Duration::from_secs(5));
    let detect = seen_a.max(seen_b) - cut;
    eprintln!("FIGURE partition_detect_ms={}", detect.as_millis());
    for i in 0..8 {
        let side = if i < 4 { 0..4 } else { 4..8 };
        let want: Vec<String> = names(side.filter(|&j| j != i)).into_iter().collect();
        assert_eq!(peer_names(&lan.sock(i)), want, "h{i} during the partition");
    }
    let healed = Instant::now();
    lan.heal();
    let back_a = wait_all(&watches, &a, "joined", &b, Duration::from_secs(5));
    let back_b = wait_all(&watches, &b, "joined", &a, Duration::from_secs(5));
    let heal = back_a.max(back_b) - healed;
    eprintln!("FIGURE partition_heal_ms={}", heal.as_millis());
    for i in 0..8 {
        assert_eq!(
            peer_names(&lan.sock(i)),
            others(&lan, i),
            "h{i} after healing"
        );
    }
    // The protocol's deadlines (TTL 900 ms; announcements every 200 ms), with slack for
    // a loaded 2-core machine.
    assert!(
        detect < Duration::from_millis(1300),
        "detected after {detect:?}"
    );
    assert!(heal < Duration::from_millis(800), "healed after {heal:?}");
}

/// The peers `sock`'s daemon lists named `name`: (id, incarnation) each.
fn entries_named(sock: &std::path::Path, name: &str) -> Vec<(String, u64)> {
    peers(sock)
        .iter()
        .filter(|p| p["name"] == name)
        .map(|p| {
            (
                p["id"].as_str().unwrap_or("").to_string(),
                p["incarnation"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn churn_every_two_seconds_leaves_correct_tables() {
    let _serial = one_at_a_time();
    let Some(lan) = Lan::new("churn", 94, 5) else {
        return;
    };
    // h0 keeps its id across restarts (--state-dir); h1 gets a new one every time.
    let state = lan.dir().join("state0");
    let state_arg = state.to_str().unwrap().to_string();
    let start = |i: usize| match i {
        0 => lan.daemon(0, &["--state-dir", &state_arg]),
        _ => lan.daemon(i, &[]),
    };
    let mut pids: Vec<u32> = (0..5).map(start).collect();
    assert!(eventually(Duration::from_secs(5), || (0..5)
        .all(|i| peer_names(&lan.sock(i)) == others(&lan, i))));
    let began = Instant::now();
    let mut restarts = 0;
    let mut last_restart = Instant::now();
    // 15 rounds over 30 s; kill -9 on odd rounds, so the last (the 15th) is a kill -9.
    for round in 1..=15 {
        let due = began + Duration::from_secs(2 * round);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let signal = if round % 2 == 1 {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        for (i, &pid) in pids.iter().enumerate().take(2) {
            lan.signal(pid, signal);
            assert!(
                lan.wait(pid, Duration::from_secs(5)).is_some(),
                "h{i} did not exit on signal {signal}"
            );
        }
        for (i, pid) in pids.iter_mut().enumerate().take(2) {
            *pid = start(i);
        }
        last_restart = Instant::now();
        restarts += 2;
    }
    let current = |i: usize| {
        let s = status(&lan.sock(i));
        (
            s["id"].as_str().unwrap_or("").to_string(),
            s["incarnation"].as_u64().unwrap_or(0),
        )
    };
    let (h0, h1) = (current(0), current(1));
    let correct = || {
        (0..5).all(|i| {
            peer_names(&lan.sock(i)) == others(&lan, i)
                && (i == 0 || entries_named(&lan.sock(i), "h0") == vec![h0.clone()])
                && (i == 1 || entries_named(&lan.sock(i), "h1") == vec![h1.clone()])
        })
    };
    let ok = eventually(Duration::from_secs(3), correct);
    let took = last_restart.elapsed();
    eprintln!(
        "FIGURE churn_restarts={restarts} churn_correct_after_last_restart_ms={}",
        took.as_millis()
    );
    assert!(ok, "tables never became correct after the churn");
    // One entry per node, the newest incarnation: no duplicates, nothing stale.
    for i in 0..5 {
        let ids: Vec<String> = peers(&lan.sock(i))
            .iter()
            .map(|p| p["id"].as_str().unwrap_or("").to_string())
            .collect();
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "h{i} lists a node twice");
    }
    assert!(
        took < Duration::from_millis(1300),
        "correct only {took:?} after the last restart"
    );
}

/// What `localnet peers` prints on `host` for the daemon there (stdout, stderr).
fn peers_cli(lan: &Lan, host: usize, args: &[&str]) -> (String, String) {
    let sock = lan.sock(host);
    let mut all = vec!["peers", "--control", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = lan.run(host, &binary(), &all);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn clock_off_40(text: &str) -> bool {
    ["39", "40", "41"]
        .iter()
        .any(|s| text.contains(&format!("clock off by {s} s (ahead)")))
}

#[test]
fn a_clock_20_s_off_joins_and_40_s_off_is_refused_with_the_reason_shown() {
    let _serial = one_at_a_time();
    let (Some(plus20), Some(plus40)) = (faketime("+20s"), faketime("+40s")) else {
        return;
    };
    let Some(lan) = Lan::new("clock", 95, 4) else {
        return;
    };
    let key = lan.key("cluster");
    let keyed = ["--key-file", key.as_str()];
    lan.daemon(0, &keyed);
    lan.daemon_wrapped(1, &plus20, &keyed);
    lan.daemon_wrapped(2, &plus40, &keyed);
    // A slave whose clock is 40 s ahead too.
    let mut slave: Vec<&str> = plus40.iter().map(String::as_str).collect();
    let bin = binary();
    slave.push(bin.to_str().unwrap());
    let line = format!("slave --name s3 --interface eth0 --key-file {key}");
    slave.extend(words(&line));
    lan.spawn(3, "s3", std::path::Path::new(slave[0]), &slave[1..]);
    // +20 s: within the 30 s window, verified both ways.
    let verified = |sock: &std::path::Path, name: &str| {
        peers(sock)
            .iter()
            .any(|p| p["name"] == name && p["verified"] == true)
    };
    assert!(
        eventually(Duration::from_secs(5), || verified(&lan.sock(0), "h1")
            && verified(&lan.sock(1), "h0")),
        "h0 and h1 (+20 s) did not verify each other"
    );
    // +40 s: refused; mDNS still lists it, unverified, and says why.
    let reason_of = |name: &str| {
        peers(&lan.sock(0))
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| (p["verified"].clone(), p["unverified_reason"].clone()))
    };
    let shown = eventually(Duration::from_secs(10), || {
        reason_of("h2").is_some_and(|(_, why)| clock_off_40(why.as_str().unwrap_or("")))
    });
    assert!(shown, "h2 (+40 s) as h0 lists it: {:?}", reason_of("h2"));
    assert_eq!(reason_of("h2").unwrap().0, false);
    let rejections = status(&lan.sock(0))["rejections"].clone();
    let h2 = rejections
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "h2"))
        .unwrap_or_else(|| panic!("no rejection of h2 in {rejections}"));
    assert_eq!(h2["reason"]["kind"], "clock_off", "{h2}");
    let offset = h2["reason"]["offset_ms"].as_i64().unwrap();
    eprintln!("FIGURE clock_refused_offset_ms={offset}");
    assert!((39_000..41_500).contains(&offset), "{offset}");
    assert!(!verified(&lan.sock(0), "h2"));
    // The table shows the reason; --wait-for that finds fewer says it.
    let (table, _) = peers_cli(&lan, 0, &[]);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("h2") && clock_off_40(l)),
        "{table}"
    );
    let (_, short) = peers_cli(&lan, 0, &["--wait-for", "9", "--timeout", "300ms"]);
    assert!(
        short.contains("found only") && short.contains("of 9 peers") && clock_off_40(&short),
        "{short}"
    );
    // A master looking for the +40 s slave is told why it found none.
    let line = format!("master --slaves 1 --wait 3s --interface eth0 --key-file {key} -- true");
    let out = lan.run(0, &binary(), &words(&line));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("master said: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("found only 0 of 1 slaves"), "{err}");
    assert!(err.contains("s3") && clock_off_40(&err), "{err}");
    assert!(err.contains("NTP"), "{err}");
    // So is `terminate --all`.
    let line = format!("terminate --all --wait 3s --interface eth0 --key-file {key}");
    let out = lan.run(0, &binary(), &words(&line));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no slaves found within 3s; seen: ")
            && err.contains("s3")
            && clock_off_40(&err),
        "{err}"
    );
}

#[test]
fn a_master_host_cut_off_mid_job_loses_its_slaves_and_they_kill_the_jobs() {
    let _serial = one_at_a_time();
    let Some(lan) = faulty_lan("mcut", 97, 4) else {
        return;
    };
    let key = lan.key("k");
    let slaves: Vec<u32> = (1..4)
        .map(|i| {
            let name = format!("s{i}");
            let line = format!("slave --name {name} --interface eth0 --key-file {key}");
            lan.spawn(i, &name, &binary(), &words(&line))
        })
        .collect();
    let tag = format!("cutjob-{}", std::process::id());
    let script = format!("sleep 301; : {tag}");
    let master_line =
        format!("master --interface eth0 --key-file {key} --slaves 3 --wait 5s -- sh -c");
    let master = lan.spawn(
        0,
        "master",
        &binary(),
        &words_then(&master_line, &[&script]),
    );
    // The master's command line holds the tag, and so does each slave's job shell.
    assert!(
        eventually(Duration::from_secs(10), || {
            support::pids_matching(&tag).len() >= 4
        }),
        "the jobs never started:\n{}",
        lan.log("master")
    );
    // Host 0 (the master) loses every frame, both ways, for 5 s.
    let cut = Instant::now();
    lan.partition(&[0], &[1, 2, 3]);
    let code = lan.wait(master, Duration::from_secs(5));
    let master_done = cut.elapsed();
    let jobs_gone = eventually(Duration::from_secs(5), || {
        support::pids_matching(&tag)
            .into_iter()
            .all(|pid| pid == master)
    });
    let jobs_done = cut.elapsed();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(cut.elapsed()));
    lan.heal();
    eprintln!(
        "FIGURE master_cut_exit_ms={} master_cut_jobs_killed_ms={}",
        master_done.as_millis(),
        jobs_done.as_millis()
    );
    assert_eq!(code, Some(1), "the master exits 1:\n{}", lan.log("master"));
    let said = lan.log("master");
    for name in ["s1", "s2", "s3"] {
        assert!(
            said.contains(&format!("failed: {name} ")),
            "{name} not named:\n{said}"
        );
    }
    assert!(jobs_gone, "jobs still running after the master was cut off");
    assert!(
        jobs_done < Duration::from_millis(3500),
        "jobs killed only after {jobs_done:?}"
    );
    for (i, pid) in slaves.iter().enumerate() {
        let name = format!("s{}", i + 1);
        assert!(support::alive(*pid), "{name} exited");
        let log = lan.log(&name);
        assert!(
            log.contains("connection dead") && log.contains("killed"),
            "{name}'s log does not say why:\n{log}"
        );
    }
    // Healed, the slaves serve the next master.
    let out = lan.run(0, &binary(), &words_then(&master_line, &["echo again"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_success(&out);
    assert_eq!(stdout.matches(": again").count(), 3, "{stdout}");
}
