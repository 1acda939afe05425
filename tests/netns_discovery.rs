//! Multi-host tests of discovery: real `localnet daemon` processes on a namespace LAN.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::words::{assert_success, words};
use support::{Lan, binary, eventually, peer_names, peers, status, wait_event, watch};

fn others(lan: &Lan, me: usize) -> Vec<String> {
    (0..lan.hosts())
        .filter(|&i| i != me)
        .map(|i| format!("h{i}"))
        .collect()
}

/// Whether host `i`'s daemon lists `n` peers within 5 s.
fn knows_peers(lan: &Lan, i: usize, n: usize) -> bool {
    eventually(Duration::from_secs(5), || peers(&lan.sock(i)).len() == n)
}

#[test]
fn five_hosts_converge_with_full_records() {
    let Some(lan) = Lan::new("conv", 41, 5) else {
        return;
    };
    for i in 0..5 {
        lan.daemon(i, &["--tag", &format!("rack=r{i}")]);
    }
    for i in 0..5 {
        let want = others(&lan, i);
        assert!(
            eventually(Duration::from_secs(5), || peer_names(&lan.sock(i)) == want),
            "h{i} sees {:?}",
            peer_names(&lan.sock(i))
        );
    }
    for p in peers(&lan.sock(0)) {
        let name = p["name"].as_str().unwrap();
        let idx: usize = name[1..].parse().unwrap();
        let addr = p["addr"].as_str().unwrap();
        assert!(
            addr.starts_with(&format!("{}:", lan.ip(idx))),
            "{addr} for {name}"
        );
        assert_eq!(p["role"], "daemon");
        assert_eq!(p["state"], "alive");
        assert_eq!(p["tags"], json!({"rack": format!("r{idx}")}));
        assert!(p["last_seen_ms"].as_u64().unwrap() < 2000);
        assert!(p["id"].as_str().unwrap().len() == 36);
    }
}

#[test]
fn kill_9_is_seen_as_failed_everywhere_and_sigterm_as_left() {
    let Some(lan) = Lan::new("fail", 42, 5) else {
        return;
    };
    let pids: Vec<u32> = (0..5).map(|i| lan.daemon(i, &[])).collect();
    for i in 0..5 {
        assert!(knows_peers(&lan, i, 4));
    }
    let watches: Vec<_> = (2..5).map(|i| watch(&lan.sock(i))).collect();
    let killed = Instant::now();
    lan.signal(pids[0], libc::SIGKILL);
    for (w, i) in watches.iter().zip(2..) {
        let at = wait_event(w, "failed", "h0", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("h{i} never declared h0 failed"));
        println!("h{i}: h0 failed after {:?}", at - killed);
        assert!(at - killed < Duration::from_secs(2), "{:?}", at - killed);
    }
    let stopped = Instant::now();
    lan.signal(pids[1], libc::SIGTERM);
    for (w, i) in watches.iter().zip(2..) {
        let at = wait_event(w, "left", "h1", Duration::from_secs(2))
            .unwrap_or_else(|| panic!("h{i} never saw h1 leave"));
        println!("h{i}: h1 left after {:?}", at - stopped);
        assert!(
            at - stopped < Duration::from_millis(500),
            "{:?}",
            at - stopped
        );
    }
    assert_eq!(
        lan.wait(pids[1], Duration::from_secs(5)),
        Some(0),
        "SIGTERM exits 0"
    );
    for i in 2..5 {
        let want: Vec<String> = (2..5)
            .filter(|&j| j != i)
            .map(|j| format!("h{j}"))
            .collect();
        assert_eq!(peer_names(&lan.sock(i)), want);
    }
}

#[test]
fn two_keys_make_two_clusters_that_never_see_each_other() {
    let Some(lan) = Lan::new("keys", 43, 6) else {
        return;
    };
    let keys = [lan.key("a"), lan.key("b")];
    for i in 0..6 {
        let key = &keys[i / 3];
        lan.daemon(i, &["--key-file", key]);
    }
    let watches: Vec<_> = (0..6).map(|i| watch(&lan.sock(i))).collect();
    for i in 0..6 {
        let group: Vec<String> = (0..6)
            .filter(|&j| j / 3 == i / 3 && j != i)
            .map(|j| format!("h{j}"))
            .collect();
        assert!(
            eventually(Duration::from_secs(5), || peer_names(&lan.sock(i)) == group),
            "h{i} sees {:?}",
            peer_names(&lan.sock(i))
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for (i, w) in watches.iter().enumerate() {
        assert_eq!(peers(&lan.sock(i)).len(), 2);
        for (_, event) in w.try_iter() {
            let name = event["peer"]["name"].as_str().unwrap_or("");
            let j: usize = name[1..].parse().unwrap();
            assert_eq!(j / 3, i / 3, "h{i} heard of h{j} from the other cluster");
        }
        assert!(
            status(&lan.sock(i))["stats"]["dropped_auth"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
}

#[test]
fn ten_thousand_garbage_datagrams_leave_the_daemon_alive_and_its_table_unchanged() {
    let Some(lan) = Lan::new("junk", 44, 3) else {
        return;
    };
    let pid = lan.daemon(0, &[]);
    lan.daemon(1, &[]);
    assert!(knows_peers(&lan, 0, 1));
    let before: Vec<_> = peers(&lan.sock(0))
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    let unicast = status(&lan.sock(0))["unicast"][0]
        .as_str()
        .unwrap()
        .to_string();
    let (uhost, uport) = unicast.rsplit_once(':').unwrap();
    // From host 2: 10 000 datagrams of every kind of wrong, to the group and unicast.
    let script = format!(
        r#"
import random, socket, json
random.seed(1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
good = json.dumps({{"v":1,"m":{{"type":"announce","node":{{"id":"00000000-0000-0000-0000-000000000001","name":"x","inc":1,"addr":"0.0.0.0:1","role":"r","ivl":200,"ttl":900}}}}}}, separators=(",", ":"))
kinds = [
  lambda: bytes(random.getrandbits(8) for _ in range(random.randint(0, 300))),
  lambda: b"{{" * random.randint(1, 600),
  lambda: good[: random.randint(0, len(good) - 1)].encode(),
  lambda: good.replace('"v":1', '"v":2').encode(),
  lambda: (good + " " * 1300).encode(),
  lambda: good.replace('"ttl":900', '"ttl":-5').encode(),
  lambda: json.dumps({{"v":1,"m":{{"type":"goodbye","id":"not-a-uuid","inc":1}}}}).encode(),
  lambda: b"\x02\x00" + bytes(random.getrandbits(8) for _ in range(random.randint(0, 60))),
  lambda: b"\x02\x01" + bytes(random.getrandbits(8) for _ in range(random.randint(0, 60))),
]
for n in range(10000):
    data = kinds[n % len(kinds)]()
    dest = ("239.255.76.78", 7766) if n % 2 else ("{uhost}", {uport})
    try:
        s.sendto(data, dest)
    except OSError:
        pass
"#
    );
    let out = lan.run(2, std::path::Path::new("python3"), &["-c", &script]);
    assert_success(&out);
    std::thread::sleep(Duration::from_millis(500));
    assert!(support::alive(pid), "daemon died");
    let after: Vec<_> = peers(&lan.sock(0))
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    assert_eq!(before, after, "table changed");
    let stats = &status(&lan.sock(0))["stats"];
    let dropped: u64 = [
        "dropped_malformed",
        "dropped_oversize",
        "dropped_version",
        "dropped_legacy",
        "dropped_rate",
    ]
    .iter()
    .map(|k| stats[k].as_u64().unwrap())
    .sum();
    println!("dropped: {stats}");
    // Every garbage datagram that reached the daemon is counted as dropped; a few may
    // not reach it at all on a loaded machine (a full socket buffer), and the rest of
    // what it received are h1's few announcements.
    let received = stats["received"].as_u64().unwrap();
    assert!(received >= 5_000, "only {received} datagrams arrived");
    assert!(
        received - dropped <= 100,
        "{received} received but only {dropped} counted as dropped"
    );
    // Still fully working: a new daemon is seen.
    lan.daemon(2, &[]);
    assert!(knows_peers(&lan, 0, 2));
}

#[test]
fn peers_without_a_daemon_discovers_on_its_own() {
    let Some(lan) = Lan::new("solo", 45, 4) else {
        return;
    };
    for i in 0..3 {
        lan.daemon(i, &[]);
    }
    let started = Instant::now();
    // No --control: a named socket must answer; with none named and no daemon on the
    // default socket, `peers` discovers on its own.
    let line = "peers --json --interface eth0 --timeout 3s --wait-for 3";
    let out = lan.run(3, &binary(), &words(line));
    let took = started.elapsed();
    assert_success(&out);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = list.iter().map(|p| p["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["h0", "h1", "h2"]);
    assert!(
        took < Duration::from_secs(2),
        "returned only after {took:?}"
    );
    // The one-shot observer never appears in the daemons' tables.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(peers(&lan.sock(0)).len(), 2);
}

#[test]
fn state_dir_keeps_the_id_and_a_restart_replaces_the_entry() {
    let Some(lan) = Lan::new("state", 46, 2) else {
        return;
    };
    lan.daemon(0, &[]);
    let state = lan.dir().join("state1");
    let first = lan.daemon(1, &["--state-dir", state.to_str().unwrap()]);
    assert!(knows_peers(&lan, 0, 1));
    let before = peers(&lan.sock(0))[0].clone();
    lan.signal(first, libc::SIGKILL);
    assert!(lan.wait(first, Duration::from_secs(2)).is_some());
    lan.daemon(1, &["--state-dir", state.to_str().unwrap()]);
    assert!(eventually(Duration::from_secs(5), || {
        let p = peers(&lan.sock(0));
        p.len() == 1 && p[0]["incarnation"] != before["incarnation"]
    }));
    let after = peers(&lan.sock(0))[0].clone();
    assert_eq!(after["id"], before["id"]);
    assert!(after["incarnation"].as_u64() > before["incarnation"].as_u64());
}

#[test]
fn a_longer_heartbeat_is_announced_and_sets_the_failure_time() {
    let Some(lan) = Lan::new("beat", 47, 2) else {
        return;
    };
    lan.daemon(0, &[]);
    let slow = lan.daemon(1, &["--heartbeat", "1s"]);
    assert!(knows_peers(&lan, 0, 1));
    let p = &peers(&lan.sock(0))[0];
    assert_eq!(p["interval_ms"], 1000, "{p}");
    assert_eq!(p["ttl_ms"], 3200, "{p}"); // 3.2 heartbeats (4.5 in version 1)
    // kill -9: h0 calls it failed after about 3.2 heartbeats, not after the default 0.9 s.
    let events = watch(&lan.sock(0));
    let killed = Instant::now();
    lan.signal(slow, libc::SIGKILL);
    let failed =
        wait_event(&events, "failed", "h1", Duration::from_secs(10)).expect("h1 declared failed");
    let after = failed - killed;
    assert!(
        after > Duration::from_secs(2) && after < Duration::from_secs(6),
        "failed after {after:?}"
    );
    // Out-of-range heartbeats are refused with a clear message.
    let out = lan.run(0, &binary(), &["daemon", "--heartbeat", "5ms"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use 50ms to 60s"));
}
