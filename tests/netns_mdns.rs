//! Multi-host tests of the mDNS/DNS-SD path, checked with an mDNS client no one here
//! wrote (python-zeroconf, driven by `tests/mdns_browse.py`).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::words::{assert_success, words};
use support::{Lan, binary, eventually, peers, status};

fn browser_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mdns_browse.py")
}

/// Whether python-zeroconf is importable; a skip (or, under CI, a failure) if not.
fn zeroconf_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import zeroconf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("LOCALNET_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("python-zeroconf is missing: pip install zeroconf");
        }
        eprintln!("skipping: python-zeroconf is missing (pip install zeroconf)");
    }
    ok
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What the browser printed so far.
fn seen(lan: &Lan, log: &str) -> Vec<Value> {
    lan.out(log)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn resolved<'a>(events: &'a [Value], instance: &str) -> Option<&'a Value> {
    let full = format!("{instance}._localnet._tcp.local.");
    events
        .iter()
        .find(|e| e["event"] == "resolved" && e["name"] == full)
}

#[test]
fn an_independent_client_lists_every_node_and_sees_it_leave() {
    let Some(lan) = Lan::new("mdns", 61, 4) else {
        return;
    };
    if !zeroconf_available() {
        return;
    }
    let script = browser_script();
    let client_ip = lan.ip(3).to_string();
    lan.spawn(
        3,
        "browser",
        Path::new("python3"),
        &[script.to_str().unwrap(), &client_ip, "20"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let started = now();
    let pids: Vec<u32> = (0..3)
        .map(|i| lan.daemon(i, &["--tag", &format!("rack=r{i}")]))
        .collect();
    assert!(
        eventually(Duration::from_secs(8), || (0..3).all(|i| resolved(
            &seen(&lan, "browser"),
            &format!("h{i}")
        )
        .is_some())),
        "the client saw: {:?}",
        seen(&lan, "browser")
    );
    let events = seen(&lan, "browser");
    for i in 0..3 {
        let st = status(&lan.sock(i));
        let e = resolved(&events, &format!("h{i}")).unwrap();
        println!(
            "h{i} resolved by the client {:.0} ms after the daemons started",
            (e["t"].as_f64().unwrap() - started) * 1000.0
        );
        assert!(
            e["addresses"]
                .as_array()
                .unwrap()
                .contains(&Value::from(lan.ip(i).to_string())),
            "{e}"
        );
        let port = st["unicast"][0]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse::<u64>()
            .unwrap();
        assert_eq!(e["port"], port, "{e}");
        assert_eq!(e["txt"]["id"], st["id"]);
        assert_eq!(e["txt"]["inc"], st["incarnation"].to_string());
        assert_eq!(e["txt"]["role"], "daemon");
        assert_eq!(e["txt"]["v"], "1");
        assert_eq!(e["txt"]["rack"], format!("r{i}"));
    }
    // One peer is one row, whichever path it came by.
    assert!(
        eventually(Duration::from_secs(5), || {
            let p = peers(&lan.sock(0));
            p.len() == 2
                && p.iter()
                    .all(|p| p["paths"] == serde_json::json!(["multicast", "mdns"]))
        }),
        "{:?}",
        peers(&lan.sock(0))
    );
    // SIGTERM: the instance disappears from the client's view within 1 s.
    let stopped = now();
    lan.signal(pids[1], libc::SIGTERM);
    let full = "h1._localnet._tcp.local.";
    assert!(
        eventually(Duration::from_secs(3), || seen(&lan, "browser")
            .iter()
            .any(|e| e["event"] == "removed" && e["name"] == full)),
        "the client never saw h1 leave"
    );
    let removed = seen(&lan, "browser")
        .into_iter()
        .find(|e| e["event"] == "removed" && e["name"] == full)
        .unwrap();
    let after = removed["t"].as_f64().unwrap() - stopped;
    println!(
        "h1 removed from the client's view {:.0} ms after SIGTERM",
        after * 1000.0
    );
    assert!(after < 1.0, "{after} s");
    assert_eq!(lan.wait(pids[1], Duration::from_secs(3)), Some(0));
}

#[test]
fn nodes_find_each_other_through_mdns_alone() {
    let Some(lan) = Lan::new("mdnsonly", 62, 3) else {
        return;
    };
    for i in 0..3 {
        lan.daemon(i, &["--discovery", "mdns"]);
    }
    for i in 0..3 {
        assert!(
            eventually(Duration::from_secs(8), || {
                let p = peers(&lan.sock(i));
                p.len() == 2 && p.iter().all(|p| p["paths"] == serde_json::json!(["mdns"]))
            }),
            "h{i}: {:?}",
            peers(&lan.sock(i))
        );
        assert_eq!(
            status(&lan.sock(i))["stats"]["sent"],
            0,
            "no localnet multicast in mdns mode"
        );
    }
}

#[test]
fn with_a_key_an_mdns_only_peer_is_unverified_and_never_used_as_a_slave() {
    let Some(lan) = Lan::new("mdnskey", 63, 3) else {
        return;
    };
    let key = lan.key("k");
    let k = key.as_str();
    lan.daemon(0, &["--key-file", k]);
    // A slave that speaks only mDNS: its TXT record is not authenticated.
    let line = format!("slave --name s1 --interface eth0 --key-file {k} --discovery mdns");
    lan.spawn(1, "s1", &binary(), &words(&line));
    assert!(
        eventually(Duration::from_secs(8), || peers(&lan.sock(0))
            .iter()
            .any(|p| p["name"] == "s1")),
        "{:?}",
        peers(&lan.sock(0))
    );
    let s1 = peers(&lan.sock(0))
        .into_iter()
        .find(|p| p["name"] == "s1")
        .unwrap();
    assert_eq!(s1["verified"], false);
    assert_eq!(s1["paths"], serde_json::json!(["mdns"]));
    let master = |host: usize, wait: &str| {
        let line =
            format!("master --interface eth0 --key-file {k} --slaves 1 --wait {wait} -- true");
        lan.run(host, &binary(), &words(&line))
    };
    let out = master(2, "1s");
    assert_eq!(out.status.code(), Some(1), "an unverified slave was used");
    assert!(String::from_utf8_lossy(&out.stderr).contains("found only 0 of 1"));
    // A slave that also speaks the authenticated protocol is verified and used.
    let line = format!("slave --name s2 --interface eth0 --key-file {k}");
    lan.spawn(2, "s2", &binary(), &words(&line));
    assert!(eventually(Duration::from_secs(5), || peers(&lan.sock(0))
        .iter()
        .any(|p| p["name"] == "s2" && p["verified"] == true)));
    assert_success(&master(0, "2s"));
}
