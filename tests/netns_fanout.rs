//! `localnet master` as a fan-out tool beside clush and pdsh, on a namespace LAN with
//! real slaves: choosing nodes by node set, excluding, picking at random, and the
//! sliding window of `--fanout`, the failure summary and `--max-exit`, `--gather`.

mod support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use support::words::{assert_contains, text};
use support::{Lan, binary};

/// Starts a keyed slave named `names[i]` on host `i + 1` (with `WHO` set to its name,
/// see [`slave_who`]), and gives them 300 ms to announce themselves; the key's path.
fn named_slaves(lan: &Lan, names: &[&str]) -> String {
    let key = lan.key("k");
    for (i, name) in names.iter().enumerate() {
        slave_who(lan, i + 1, name, &["--key-file", &key]);
    }
    std::thread::sleep(Duration::from_millis(300));
    key
}

/// `localnet master --key-file KEY SELECTION... -- sh -c 'echo ran'` on host 0.
fn master(lan: &Lan, key: &str, selection: &[&str]) -> Output {
    let mut args = vec!["master", "--interface", "eth0", "--key-file", key];
    args.extend_from_slice(&["--wait", "5s"]);
    args.extend_from_slice(selection);
    args.extend_from_slice(&["--", "sh", "-c", "echo ran"]);
    lan.run(0, &binary(), &args)
}

/// The slaves whose `ran` line is in the output.
fn ran_on(out: &Output) -> BTreeSet<String> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": ran"))
        .map(str::to_string)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn node_sets_choose_exclude_and_pick_slaves_and_name_the_missing() {
    let Some(lan) = Lan::new("nset", 126, 6) else {
        return;
    };
    let key = named_slaves(&lan, &["web1", "web2", "web3", "web10", "db1"]);

    let out = master(&lan, &key, &["--nodes", "web[1-3,10]", "--exclude", "web2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ran_on(&out), set(&["web1", "web3", "web10"]));

    // Named slaves that are not there are reported, folded, and fail the run; the
    // others still run.
    let out = master(&lan, &key, &["--nodes", "web[1-2,7-8],db1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(ran_on(&out), set(&["web1", "web2", "db1"]));
    let stderr = text(&out.stderr);
    assert_contains(&stderr, "web[7-8] (2): not found within 5s (missing)");
    assert_contains(&stderr, "2 named slaves were not found");

    // --slaves counts the named slaves, not the first ones heard; --raw takes a set of one.
    let out = master(&lan, &key, &["--slaves", "2", "--nodes", "web[1-2]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ran_on(&out), set(&["web1", "web2"]));
    let out = master(&lan, &key, &["--raw", "--nodes", "web3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\n");

    // None of the set there at all.
    let out = master(&lan, &key, &["--nodes", "app[1-2]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(ran_on(&out).is_empty());
    assert_contains(&text(&out.stderr), "(missing: app[1-2])");

    // --pick N: N distinct slaves among those that match, not always the same ones.
    let mut picks = BTreeSet::new();
    for _ in 0..8 {
        let out = master(&lan, &key, &["--pick", "2", "--exclude", "db1"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let ran = ran_on(&out);
        assert_eq!(ran.len(), 2, "{ran:?}");
        assert!(!ran.contains("db1"), "{ran:?}");
        picks.insert(ran.into_iter().collect::<Vec<_>>());
    }
    assert!(picks.len() > 1, "--pick chose {picks:?} every time");
    // --slaves counts the matching slaves before --pick chooses among them.
    let out = master(&lan, &key, &["--slaves", "5", "--pick", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ran_on(&out).len(), 1);

    // A malformed set is a usage error that says what is wrong.
    let out = master(&lan, &key, &["--nodes", "web[1-3"]);
    assert_eq!(out.status.code(), Some(2));
    assert_contains(&text(&out.stderr), "without its `]`");
}

/// The most jobs alive at once, from the `+ ns` / `- ns` lines the jobs wrote.
fn most_at_once(log: &str) -> usize {
    let mut events: Vec<(u128, i32)> = log
        .lines()
        .filter_map(|l| {
            let (sign, at) = l.split_once(' ')?;
            Some((at.trim().parse().ok()?, if sign == "+" { 1 } else { -1 }))
        })
        .collect();
    // An end and a start at the same nanosecond: the end first.
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn fanout_is_a_sliding_window_of_running_jobs() {
    let Some(lan) = Lan::new("fout", 127, 6) else {
        return;
    };
    let key = named_slaves(&lan, &["n1", "n2", "n3", "n4", "n5"]);
    let log = lan.dir().join("jobs.log");
    let job = format!(
        "echo \"+ $(date +%s%N)\" >> {log}; sleep 0.5; echo \"- $(date +%s%N)\" >> {log}",
        log = log.display()
    );
    let run = |extra: &[&str]| {
        let _ = std::fs::remove_file(&log);
        let mut args = vec!["master", "--interface", "eth0", "--key-file", &key];
        args.extend_from_slice(&["--slaves", "5", "--wait", "5s"]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", &job]);
        let started = std::time::Instant::now();
        let out = lan.run(0, &binary(), &args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            log.lines().count(),
            10,
            "every job started and ended:\n{log}"
        );
        (most_at_once(&log), started.elapsed())
    };
    let (most, took) = run(&["--fanout", "2"]);
    assert_eq!(most, 2, "--fanout 2 ran {most} jobs at once");
    // Three rounds of 0.5 s: 2, 2, then 1.
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let (most, _) = run(&[]);
    assert_eq!(most, 5, "without --fanout every job runs at once");
}

/// Starts a slave named `name` on host `i` with `WHO=name` in its environment (its jobs
/// inherit it) and `extra` arguments.
fn slave_who(lan: &Lan, i: usize, name: &str, extra: &[&str]) {
    let bin = binary();
    let who = format!("WHO={name}");
    let mut args = vec![who.as_str(), bin.to_str().unwrap_or_default(), "slave"];
    args.extend_from_slice(&["--name", name, "--interface", "eth0"]);
    args.extend_from_slice(extra);
    lan.spawn(i, name, std::path::Path::new("env"), &args);
}

#[test]
fn the_failure_summary_tells_each_way_of_failing_apart() {
    let Some(lan) = Lan::new("fkind", 128, 8) else {
        return;
    };
    let key = named_slaves(&lan, &["n1", "n2", "n3", "n4", "n5"]);
    // An open cluster's slaves without --insecure refuse commands.
    slave_who(&lan, 6, "o1", &[]);
    slave_who(&lan, 7, "o2", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let job = "case $WHO in n1) exit 3;; n2) exit 5;; n3) kill -9 $$;; n4) sleep 30;; \
               n5) kill -9 $PPID;; esac";
    let run = |extra: &[&str]| {
        let mut args = vec!["master", "--interface", "eth0", "--wait", "5s"];
        args.extend_from_slice(&["--timeout", "1s"]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", job]);
        lan.run(0, &binary(), &args)
    };

    // pdsh's -S: the largest remote exit code.
    let out = run(&["--key-file", &key, "--nodes", "n[1-4]", "--max-exit"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // A command the slaves cannot start.
    let mut args = vec!["master", "--interface", "eth0", "--key-file", &key];
    args.extend_from_slice(&[
        "--nodes",
        "n[1-2]",
        "--wait",
        "5s",
        "--",
        "/no/such/command",
    ]);
    let out = lan.run(0, &binary(), &args);
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "localnet: could not run: n[1-2] (2)");

    // n5's job kills its slave: the connection is lost, the slave unreachable.
    let out = run(&["--key-file", &key, "--nodes", "n[1-6]"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for line in [
        "localnet: exited with code 3: n1 (1)",
        "localnet: exited with code 5: n2 (1)",
        "localnet: killed by signal 9: n3 (1)",
        "localnet: timed out: n4 (1)",
        "localnet: unreachable: n5 (1)",
        "localnet: missing: n6 (1)",
        "5 of 5 slaves failed, and 1 named slave was not found",
    ] {
        assert_contains(&stderr, line);
    }

    let out = run(&["--nodes", "o[1-2]"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_contains(&stderr, "localnet: refused: o[1-2] (2)");
    assert_contains(&stderr, "--insecure");
}

#[test]
fn gather_prints_each_output_once_and_folds_outputs_that_differ_by_name() {
    let Some(lan) = Lan::new("gath", 129, 6) else {
        return;
    };
    let key = named_slaves(&lan, &["w1", "w2", "w3", "w4", "w5"]);
    let run = |mode: &str, job: &str| {
        let mut args = vec!["master", "--interface", "eth0", "--key-file", &key];
        args.extend_from_slice(&["--slaves", "5", "--wait", "5s", mode]);
        args.extend_from_slice(&["--", "sh", "-c", job]);
        lan.run(0, &binary(), &args)
    };
    // Like `hostname` on every node: one block.
    let gather = |job: &str| run("--gather", job);
    let out = gather("echo $WHO; echo same");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "---- w[1-5] (5) ----\n{name}\nsame\n");

    // Distinct outputs and endings apart, each once, stderr under the same header.
    let out = gather("case $WHO in w4) echo odd; echo oops >&2; exit 3;; *) echo even;; esac");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "---- w[1-3,5] (4) ----\neven\n---- w4 (1) · exit code 3 ----\nodd\n"
    );
    assert_contains(&text(&out.stderr), "---- w4 (1) · exit code 3 ----\noops\n");

    // --by-node: every slave's block, in name order.
    let out = run("--by-node", "echo $WHO; [ $WHO != w4 ] || exit 3");
    assert_eq!(out.status.code(), Some(1));
    let expected: String = (1..=5)
        .map(|i| match i {
            4 => "---- w4 (1) · exit code 3 ----\nw4\n".to_string(),
            i => format!("---- w{i} (1) ----\nw{i}\n"),
        })
        .collect();
    assert_eq!(text(&out.stdout), expected);

    // --output-dir: NAME.out, NAME.err and NAME.exit per slave (the directory is made).
    let dir = lan.dir().join("outputs/run1");
    let out = run(
        &format!("--output-dir={}", dir.display()),
        "echo out-$WHO; echo err-$WHO >&2; [ $WHO != w2 ] || exit 4",
    );
    assert_eq!(out.status.code(), Some(1));
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    for i in 1..=5 {
        assert_eq!(read(&format!("w{i}.out")), format!("out-w{i}\n"));
        assert_eq!(read(&format!("w{i}.err")), format!("err-w{i}\n"));
        let code = if i == 2 { "4\n" } else { "0\n" };
        assert_eq!(read(&format!("w{i}.exit")), code, "w{i}");
    }
}

#[test]
fn connect_timeout_bounds_a_slave_that_takes_no_connection() {
    let Some(lan) = Lan::new("ctime", 130, 4) else {
        return;
    };
    let key = named_slaves(&lan, &["c1", "c2", "c3"]);
    // c3 still announces itself, but its host drops every new TCP connection.
    let rules = "add table inet cut\n\
                 add chain inet cut input { type filter hook input priority 0; }\n\
                 add rule inet cut input tcp flags syn drop\n";
    let rules_file = lan.dir().join("cut.nft");
    std::fs::write(&rules_file, rules).expect("write the rules");
    let nft = lan.run(
        3,
        std::path::Path::new("nft"),
        &["-f", &rules_file.to_string_lossy()],
    );
    assert!(nft.status.success(), "nft: {}", text(&nft.stderr));
    let started = std::time::Instant::now();
    let out = master(&lan, &key, &["--slaves", "3", "--connect-timeout", "300ms"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(ran_on(&out), set(&["c1", "c2"]));
    let stderr = text(&out.stderr);
    assert_contains(&stderr, "c3 (nid://");
    assert_contains(&stderr, "handshake timed out");
    assert!(
        took < Duration::from_secs(3),
        "{took:?}: the default is 5 s"
    );
}
