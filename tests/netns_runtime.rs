//! Multi-host tests of the master/slave runtime: real processes on a namespace LAN.

mod support;

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use support::words::{assert_contains, assert_lacks, assert_success, text, words, words_then};
use support::{Lan, alive, binary, eventually, example, pids_matching, slave};

/// Writes the cluster key `k.key`, starts a slave keyed with it (and `extra`) on each of
/// `hosts`, and gives them 300 ms to announce themselves; the key's path and their PIDs.
fn keyed_slaves(lan: &Lan, hosts: Range<usize>, extra: &[&str]) -> (String, Vec<u32>) {
    let key = lan.key("k");
    let pids = hosts
        .map(|i| slave(lan, i, &[&["--key-file", key.as_str()], extra].concat()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    (key, pids)
}

/// Like [`keyed_slaves`] on hosts 1 and 2, s1 tagged `who=one` and s2 `who=two`;
/// the key's path.
fn two_tagged_slaves(lan: &Lan) -> String {
    let key = lan.key("k");
    slave(lan, 1, &["--key-file", &key, "--tag", "who=one"]);
    slave(lan, 2, &["--key-file", &key, "--tag", "who=two"]);
    std::thread::sleep(Duration::from_millis(300));
    key
}

/// Starts `localnet master` on host 0 running `sh -c script` on `slaves` keyed slaves,
/// in the background; its PID.
fn spawn_master(lan: &Lan, key: &str, slaves: usize, script: &str) -> u32 {
    let line = format!("master --interface eth0 --key-file {key} --slaves {slaves} -- sh -c");
    lan.spawn(0, "master", &binary(), &words_then(&line, &[script]))
}

/// Runs `localnet master ARGS` on host 0.
fn master(lan: &Lan, args: &[&str]) -> std::process::Output {
    let mut all = vec!["master", "--interface", "eth0"];
    all.extend_from_slice(args);
    lan.run(0, &binary(), &all)
}

/// Runs the future `task` makes to its end on a tokio runtime of its own, as host `i`.
fn block_on_host<T, F>(lan: &Lan, i: usize, task: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    lan.within(i, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(task())
    })
}

#[test]
fn simple_example_finds_four_slaves_and_terminates_them() {
    let Some(lan) = Lan::new("simple", 51, 5) else {
        return;
    };
    let simple = example("simple");
    assert!(simple.exists(), "build the examples: {}", simple.display());
    let pids: Vec<u32> = (1..5)
        .map(|i| {
            let host = lan.ip(i).to_string();
            lan.spawn(i, &format!("slave{i}"), &simple, &["slave", &host, "8080"])
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = lan.run(0, &simple, &["master", &lan.ip(0).to_string(), "8084"]);
    assert_success(&out);
    let expected: Vec<String> = (1..5)
        .map(|i| format!("nid://{}:8080", lan.ip(i)))
        .collect();
    assert_eq!(
        text(&out.stdout).trim(),
        format!("Slaves: [{}]", expected.join(", "))
    );
    for pid in pids {
        assert_eq!(
            lan.wait(pid, Duration::from_secs(3)),
            Some(0),
            "a slave did not exit 0"
        );
    }
}

#[test]
fn command_fans_out_to_five_slaves_with_every_line_and_exit_code() {
    let Some(lan) = Lan::new("fan", 52, 6) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..6, &["--tag", "pool=a"]);
    let script = "for i in 1 2 3; do echo out$i; done; echo err1 >&2; exit 0";
    let line = format!("--key-file {k} --slaves 5 --wait 5s --tag pool=a -- sh -c");
    let out = master(&lan, &words_then(&line, &[script]));
    assert_success(&out);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    for i in 1..6 {
        let mine: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("s{i}: ")))
            .collect();
        assert_eq!(
            mine,
            [
                format!("s{i}: out1"),
                format!("s{i}: out2"),
                format!("s{i}: out3")
            ],
            "{stdout}"
        );
        assert_contains(&stderr, &format!("s{i}: err1"));
    }
    // Exit codes come back, per slave, and make the master fail.
    let line = format!("--key-file {k} --slaves 5 --json -- sh -c");
    let out = master(&lan, &words_then(&line, &["echo x; exit 7"]));
    assert_eq!(out.status.code(), Some(1));
    let results: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5);
    for r in &results {
        assert_eq!(r["exit_code"], 7);
        assert_eq!(r["stdout"], serde_json::json!(["x"]));
    }
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("exit code 7").count(), 5, "{stderr}");
    assert_contains(&stderr, "localnet: exited with code 7: s[1-5] (5)");
    // A timeout kills the job and is reported.
    let line = format!("--key-file {k} --slaves 5 --timeout 300ms -- sleep 30");
    let out = master(&lan, &words(&line));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let timed_out = stderr
        .lines()
        .filter(|l| l.starts_with("localnet: failed: s") && l.ends_with(": timed out"))
        .count();
    assert_eq!(timed_out, 5, "{stderr}");
    assert_contains(&stderr, "localnet: timed out: s[1-5] (5)");
    // Too few slaves is a clear error.
    let line = format!("--key-file {k} --slaves 9 --wait 300ms -- true");
    let out = master(&lan, &words(&line));
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "found only 5 of 9 slaves");
}

#[test]
fn wrong_key_is_refused_and_nothing_runs() {
    let Some(lan) = Lan::new("wkey", 53, 3) else {
        return;
    };
    let good = lan.key("good");
    let bad = lan.key("bad");
    let marker = lan.dir().join("ran");
    let target = format!("{}:7001", lan.ip(1));
    let slave_pid = slave(
        &lan,
        1,
        &words(&format!("--key-file {good} --listen {target}")),
    );
    std::thread::sleep(Duration::from_millis(300));
    let marker_s = marker.to_str().unwrap().to_string();
    let (wrong, none) = block_on_host(&lan, 0, move || async move {
        let nid: localnet::NodeId = target.parse().unwrap();
        let argv = vec!["touch".to_string(), marker_s];
        let wrong_key = localnet::ClusterKey::load(std::path::Path::new(&bad)).unwrap();
        let m = localnet::Master::new("intruder", Some(wrong_key), None);
        let wrong = m
            .exec(nid, argv.clone(), None)
            .await
            .err()
            .map(|e| e.to_string());
        let m = localnet::Master::new("intruder", None, None);
        let none = m.exec(nid, argv, None).await.err().map(|e| e.to_string());
        (wrong, none)
    });
    let wrong = wrong.expect("a wrong key must be refused");
    assert_contains(&wrong, "cluster key does not match");
    let none = none.expect("no key must be refused");
    assert_contains(&none, "requires the cluster key");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!marker.exists(), "a command ran without the key");
    assert!(alive(slave_pid), "the slave must keep serving");
    // With the wrong key, discovery does not even find the slave.
    let bad_key = lan.dir().join("bad.key");
    let line = format!(
        "--key-file {} --slaves 1 --wait 500ms -- true",
        bad_key.display()
    );
    let out = master(&lan, &words(&line));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn open_cluster_refuses_commands_without_insecure() {
    let Some(lan) = Lan::new("open", 54, 3) else {
        return;
    };
    let marker = lan.dir().join("ran");
    slave(&lan, 1, &[]);
    slave(&lan, 2, &["--insecure"]);
    std::thread::sleep(Duration::from_millis(300));
    let m = marker.to_str().unwrap();
    let script = format!("echo $$ >> {m}");
    let out = master(&lan, &words_then("--slaves 2 --json -- sh -c", &[&script]));
    assert_eq!(out.status.code(), Some(1));
    let results: BTreeMap<String, serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["slave"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let refused = results["s1"]["error"].as_str().unwrap_or("");
    assert!(
        refused.contains("refused") && refused.contains("--insecure") && refused.contains("key"),
        "{refused}"
    );
    assert_eq!(results["s2"]["exit_code"], 0);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().lines().count(),
        1,
        "only the --insecure slave ran it"
    );
    assert!(
        lan.log("s2").contains("--insecure"),
        "the insecure slave warns in its log"
    );
    // Registered functions still work on an open cluster.
    let nid: localnet::NodeId = peers_addr(&lan, 1);
    let answer = block_on_host(&lan, 0, move || async move {
        let m = localnet::Master::new("m", None, None);
        let ok = m
            .call(nid, "echo", serde_json::json!({"x": 1}))
            .await
            .unwrap();
        let missing = m
            .call(nid, "nope", serde_json::json!(null))
            .await
            .unwrap_err()
            .to_string();
        (ok, missing)
    });
    assert_eq!(answer.0, serde_json::json!({"x": 1}));
    assert_contains(&answer.1, "no function named \"nope\"");
}

/// The transport address slave `i` announces, found through a one-shot `peers`.
fn peers_addr(lan: &Lan, i: usize) -> localnet::NodeId {
    let line = "peers --json --interface eth0 --timeout 1s";
    let out = lan.run(0, &binary(), &words(line));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let p = list
        .iter()
        .find(|p| p["name"] == format!("s{i}"))
        .expect("slave listed");
    p["addr"].as_str().unwrap().parse().unwrap()
}

#[test]
fn master_killed_mid_job_leaves_no_job_process() {
    let Some(lan) = Lan::new("mkill", 55, 3) else {
        return;
    };
    let (k, slaves) = keyed_slaves(&lan, 1..3, &[]);
    let tag = format!("job-{}", std::process::id());
    // A background child too: the whole process group must go.
    let script = format!("sleep 301 & sleep 301; : {tag}");
    let m = spawn_master(&lan, &k, 2, &script);
    assert!(
        eventually(Duration::from_secs(5), || pids_matching(&tag).len() >= 2),
        "jobs never started"
    );
    lan.signal(m, libc::SIGKILL);
    let gone = eventually(Duration::from_secs(2), || {
        pids_matching(&tag).is_empty() && pids_matching("sleep 301").is_empty()
    });
    assert!(gone, "job processes left: {:?}", pids_matching(&tag));
    assert!(slaves.iter().all(|p| alive(*p)), "slaves keep serving");
    let out = master(&lan, &["--key-file", &k, "--slaves", "2", "--", "true"]);
    assert_success(&out);
}

#[test]
fn terminate_all_leaves_no_localnet_or_job_process() {
    let Some(lan) = Lan::new("term", 56, 4) else {
        return;
    };
    let (k, slaves) = keyed_slaves(&lan, 1..4, &[]);
    let tag = format!("long-{}", std::process::id());
    let script = format!("sleep 302; : {tag}");
    let m = spawn_master(&lan, &k, 3, &script);
    assert!(eventually(Duration::from_secs(5), || pids_matching(&tag)
        .len()
        >= 3));
    let line = format!("terminate --all --interface eth0 --key-file {k} --wait 500ms");
    let out = lan.run(0, &binary(), &words(&line));
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("terminated").count(), 3, "{stdout}");
    for pid in &slaves {
        assert_eq!(
            lan.wait(*pid, Duration::from_secs(3)),
            Some(0),
            "slave exits 0"
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || pids_matching(&tag).is_empty()
            && pids_matching("sleep 302").is_empty()),
        "jobs left behind"
    );
    // The master sees its jobs fail (the slaves went away) and exits non-zero.
    assert_eq!(lan.wait(m, Duration::from_secs(5)), Some(1));
}

#[test]
fn four_slaves_printing_200000_lines_each_deliver_every_line_in_order() {
    let Some(lan) = Lan::new("lines", 57, 5) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..5, &[]);
    let line = format!("--key-file {k} --slaves 4 -- seq 1 200000");
    let out = master(&lan, &words(&line));
    assert_success(&out);
    let stdout = text(&out.stdout);
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for line in stdout.lines() {
        let (name, n) = line.split_once(": ").expect("name: line");
        let n: u64 = n.parse().expect("a number");
        let want = next.entry(name.to_string()).or_insert(1);
        assert_eq!(n, *want, "{name}: out of order or missing");
        *want += 1;
    }
    assert_eq!(next.len(), 4);
    assert!(next.values().all(|&n| n == 200_001), "{next:?}");
}

/// A child process killed (and reaped) when the test ends, panics included.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn master_whose_stdout_nobody_reads_for_6_s_loses_no_line_and_kills_no_job() {
    use std::io::Read;
    let Some(lan) = Lan::new("slow", 81, 2) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..2, &[]);
    // 300 000 lines of 70 bytes: 21 MB, far more than every buffer on the way holds,
    // so the job has to wait for the reader.
    let script = "awk 'BEGIN { for (i = 1; i <= 300000; i++) printf \"%06d %063d\\n\", i, 0 }'";
    let err = std::fs::File::create(lan.dir().join("master.log")).unwrap();
    let line = format!("master --interface eth0 --key-file {k} --slaves 1 -- sh -c");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &lan.ns(0)])
        .arg(binary())
        .args(words_then(&line, &[script]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(err)
        .spawn()
        .expect("spawn the master");
    let mut child = KillOnDrop(child);
    std::thread::sleep(Duration::from_secs(6));
    let mut stdout = Vec::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    let status = child.0.wait().unwrap();
    let stderr = lan.log("master");
    assert!(status.success(), "{status}: {stderr}");
    let mut next = 1;
    for line in text(&stdout).lines() {
        let rest = line.strip_prefix("s1: ").expect("name: line");
        let n: u32 = rest[..6].parse().expect("a number");
        assert_eq!(n, next, "line {next} missing or out of order");
        next += 1;
    }
    assert_eq!(next, 300_001, "lines lost");
}

#[test]
fn slave_log_keeps_why_its_master_vanished_while_logs_were_redirected() {
    let Some(lan) = Lan::new("mstop", 82, 2) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..2, &[]);
    for run in 1..=3 {
        let tag = format!("vanish-{run}-{}", std::process::id());
        let line = format!("master --interface eth0 --key-file {k} --slaves 1 --slave-logs");
        let script = format!("sleep 303; : {tag}");
        let args = words_then(&line, &["--", "sh", "-c", &script]);
        let m = lan.spawn(0, &format!("master{run}"), &binary(), &args);
        // The master's command line and the job's shell both hold the tag.
        assert!(
            eventually(Duration::from_secs(5), || pids_matching(&tag).len() >= 2),
            "the job never started"
        );
        // A frozen master holds its connection open and sends nothing: the slave must
        // find it dead, and say so in its own log, not to the master it redirects to.
        let before = lan.log("s1").matches("connection dead").count();
        lan.signal(m, libc::SIGSTOP);
        let said = eventually(Duration::from_secs(5), || {
            lan.log("s1").matches("connection dead").count() > before
        });
        lan.signal(m, libc::SIGKILL);
        assert!(
            said,
            "run {run}: the slave's log lacks the reason:\n{}",
            lan.log("s1")
        );
        assert_eq!(lan.wait(m, Duration::from_secs(2)), Some(-1), "killed");
        assert!(
            eventually(Duration::from_secs(2), || pids_matching(&tag).is_empty()),
            "the job outlived its master"
        );
    }
}

#[test]
fn raw_output_is_byte_exact_and_json_keeps_invalid_utf8() {
    let Some(lan) = Lan::new("raw", 83, 3) else {
        return;
    };
    let k = two_tagged_slaves(&lan);
    let run = |extra: &[&str], script: &str| {
        let mut args = vec!["--key-file", &k, "--wait", "3s"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        master(&lan, &args)
    };
    // Byte for byte: an invalid UTF-8 byte, and no newline at the end.
    let out = run(&["--raw", "--tag", "who=one"], r"printf 'a\377b'");
    assert_success(&out);
    assert_eq!(out.stdout, b"a\xffb");
    let out = run(
        &["--raw", "--tag", "who=one"],
        r"printf 'no newline'; printf 'e\377' >&2",
    );
    assert_success(&out);
    assert_eq!(out.stdout, b"no newline");
    assert_eq!(out.stderr, b"e\xff");
    // Prefixed lines keep the bytes and add only the separator they need.
    let out = run(&["--tag", "who=one"], r"printf 'x\377\nno newline'");
    assert_success(&out);
    assert_eq!(out.stdout, b"s1: x\xff\ns1: no newline\n");
    // --raw is for one slave.
    let out = run(&["--raw", "--slaves", "2"], "true");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // JSON: the lines as text, and the exact bytes when the text cannot say them.
    let out = run(
        &["--json", "--slaves", "2"],
        r"printf 'a\377b\n'; echo ok >&2",
    );
    assert_success(&out);
    let results: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_eq!(r["stdout"], serde_json::json!(["a\u{fffd}b"]));
        let exact = r["stdout_base64"].as_str().expect("stdout_base64");
        assert_eq!(
            localnet::protocol::base64_decode(exact).unwrap(),
            b"a\xffb\n"
        );
        assert_eq!(r["stderr"], serde_json::json!(["ok"]));
        assert!(r.get("stderr_base64").is_none(), "{r}");
    }
}

#[test]
fn master_shows_slave_log_lines_only_with_slave_logs() {
    let Some(lan) = Lan::new("slogs", 84, 2) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..2, &[]);
    let base = ["--key-file", k.as_str(), "--slaves", "1"];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", "echo hi; echo oops >&2"]);
        master(&lan, &args)
    };
    let out = run(&[]);
    assert_success(&out);
    assert_eq!(text(&out.stdout), "s1: hi\n");
    assert_eq!(text(&out.stderr), "s1: oops\n", "job output only");
    let out = run(&["--slave-logs"]);
    assert_success(&out);
    assert_eq!(text(&out.stdout), "s1: hi\n");
    let stderr = text(&out.stderr);
    assert_contains(&stderr, "s1: oops\n");
    assert_contains(&stderr, "s1: INFO logs redirected to the master");
    let out = run(&["--slave-logs", "--json"]);
    assert_success(&out);
    for line in text(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("stdout is JSON only");
        assert!(v.is_object(), "{line}");
    }
    assert_contains(&text(&out.stderr), "s1: INFO");
}

#[test]
fn client_commands_do_not_warn_about_datagrams_they_drop() {
    let Some(lan) = Lan::new("cwarn", 85, 2) else {
        return;
    };
    let ours = lan.key("ours");
    let theirs = lan.key("theirs");
    // A daemon of another cluster announces next to us: every datagram of it is dropped.
    lan.daemon(1, &["--key-file", &theirs]);
    let stderr_of = |args: &[&str]| text(&lan.run(0, &binary(), args).stderr);
    let peers = stderr_of(&words(&format!(
        "peers --interface eth0 --key-file {ours} --timeout 1s"
    )));
    assert_lacks(&peers, "dropped datagram");
    // What was dropped is explained instead, even with no --wait-for.
    assert_contains(&peers, "no peers found; seen: ");
    assert_contains(&peers, "--key-file");
    let master = stderr_of(&words(&format!(
        "master --interface eth0 --key-file {ours} --wait 1s -- true"
    )));
    assert_contains(&master, "no slaves found");
    assert_lacks(&master, "dropped datagram");
    // The daemon, which is not a client, still says what it drops.
    assert!(
        eventually(Duration::from_secs(2), || lan
            .log("h1")
            .contains("dropped datagram")),
        "{}",
        lan.log("h1")
    );
}

#[test]
fn raw_with_several_matching_slaves_is_an_error_naming_them() {
    let Some(lan) = Lan::new("rawmany", 86, 3) else {
        return;
    };
    let k = two_tagged_slaves(&lan);
    let marker = lan.dir().join("ran");
    let script = format!(r"echo x >> {}; printf 'exact\377'", marker.display());
    let run = |extra: &[&str]| {
        let mut args = vec!["--key-file", &k, "--wait", "2s"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        master(&lan, &args)
    };
    // Both match: the first to answer must not be picked.
    let out = run(&["--raw"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, "but 2 match");
    assert!(
        stderr.contains("s1 (") && stderr.contains("s2 ("),
        "{stderr}"
    );
    assert!(
        stderr.contains("who=one") && stderr.contains("who=two"),
        "{stderr}"
    );
    assert_contains(&stderr, "--tag");
    assert!(out.stdout.is_empty());
    assert!(
        !marker.exists(),
        "nothing runs when the selection is ambiguous"
    );
    // --slaves 1 does not make it stop at the first either.
    let out = run(&["--raw", "--slaves", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("but 2 match"));
    // A tag that selects one: its bytes, exactly.
    let out = run(&["--raw", "--tag", "who=two"]);
    assert_success(&out);
    assert_eq!(out.stdout, b"exact\xff");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\n");
}

/// What `master --json` keeps of one stream (src/main.rs JSON_OUTPUT_CAP).
const JSON_OUTPUT_CAP: usize = 16 * 1024 * 1024;

#[test]
fn json_output_over_the_cap_is_truncated_and_says_so() {
    let Some(lan) = Lan::new("jsoncap", 87, 2) else {
        return;
    };
    let (k, _) = keyed_slaves(&lan, 1..2, &[]);
    // 8-byte lines, 4 MiB more than the cap; a little stderr; exit 3.
    let total = JSON_OUTPUT_CAP + 4 * 1024 * 1024;
    let script = format!("yes aaaaaaa | head -c {total}; echo small >&2; exit 3");
    let line = format!("--key-file {k} --slaves 1 --json -- sh -c");
    let out = master(&lan, &words_then(&line, &[&script]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let results: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["exit_code"], 3, "the job's exit code, unchanged");
    assert_eq!(r["stdout_truncated"], true);
    let lines = r["stdout"].as_array().expect("stdout lines");
    assert_eq!(lines.len() * 8, JSON_OUTPUT_CAP, "kept bytes == the cap");
    assert!(lines.iter().all(|l| l == "aaaaaaa"));
    assert!(r.get("stdout_base64").is_none(), "the kept lines are exact");
    assert_eq!(r["stderr"], serde_json::json!(["small"]));
    assert!(r.get("stderr_truncated").is_none(), "{}", r["stderr"]);
    assert!(
        stderr.contains("s1") && stderr.contains("stdout truncated"),
        "{stderr}"
    );
    assert_contains(&stderr, "exit code 3");
}

#[test]
fn connections_over_the_slave_cap_are_closed_at_once_and_the_slave_serves_after() {
    let Some(lan) = Lan::new("conncap", 88, 2) else {
        return;
    };
    // localnet::MAX_SLAVE_CONNECTIONS, and some more.
    let cap = localnet::MAX_SLAVE_CONNECTIONS;
    let extra = 8;
    let k = lan.key("k");
    let target: std::net::SocketAddr = format!("{}:7001", lan.ip(1)).parse().unwrap();
    let listen = target.to_string();
    slave(&lan, 1, &["--key-file", &k, "--listen", &listen]);
    assert!(
        eventually(Duration::from_secs(3), || lan
            .log("s1")
            .contains("slave listening")),
        "{}",
        lan.log("s1")
    );
    let opened = std::time::Instant::now();
    let (held, refused) = lan.within(0, move || {
        use std::io::Read;
        let mut conns: Vec<(std::net::TcpStream, Vec<u8>, bool)> = (0..cap + extra)
            .map(|_| {
                let c = std::net::TcpStream::connect(target).expect("connect");
                c.set_nonblocking(true).unwrap();
                (c, Vec::new(), false)
            })
            .collect();
        // The extra ones are told busy and closed within a second (the others wait in
        // their handshake, which would last 5 s).
        eventually(Duration::from_secs(1), || {
            for (c, got, closed) in conns.iter_mut().filter(|c| !c.2) {
                let mut buf = [0u8; 16];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => *closed = true,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => *closed = true,
                    }
                    break;
                }
            }
            conns.iter().filter(|c| c.2).count() >= extra
        });
        let refused: Vec<Vec<u8>> = conns.iter().filter(|c| c.2).map(|c| c.1.clone()).collect();
        let held: Vec<std::net::TcpStream> =
            conns.into_iter().filter(|c| !c.2).map(|c| c.0).collect();
        (held, refused)
    });
    assert_eq!(refused.len(), extra, "connections over the cap closed");
    assert_eq!(held.len(), cap, "connections within the cap stay open");
    assert!(refused.iter().all(|got| got == &[3u8]), "{refused:?}");
    // While they are held, a master is told why it cannot connect.
    let out = master(&lan, &["--key-file", &k, "--slaves", "1", "--", "true"]);
    let stderr = text(&out.stderr);
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "too slow: the held connections' handshakes may have timed out"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(
        &stderr,
        "the slave refused the connection: too many connections",
    );
    // The slave's log says so, at most once a second, with a count.
    let refusals = || -> Vec<u64> {
        lan.log("s1")
            .lines()
            .filter_map(|l| {
                let rest = l.split("refused ").nth(1)?;
                let (n, tail) = rest.split_once(' ')?;
                tail.starts_with("connection(s): too many connections")
                    .then(|| n.parse().ok())?
            })
            .collect()
    };
    let all_logged = eventually(Duration::from_secs(3), || {
        refusals().iter().sum::<u64>() == extra as u64 + 1
    });
    assert!(all_logged, "{}", lan.log("s1"));
    assert!(refusals().len() <= 3, "rate-limited: {}", lan.log("s1"));
    // Once they are closed, masters are served again.
    drop(held);
    let ok = eventually(Duration::from_secs(3), || {
        master(
            &lan,
            &["--key-file", &k, "--slaves", "1", "--", "echo", "hi"],
        )
        .stdout
        .ends_with(b"s1: hi\n")
    });
    assert!(ok, "{}", lan.log("s1"));
}
