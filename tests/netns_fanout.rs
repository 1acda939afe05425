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

/// `localnet master --key-file KEY --wait 5s --slaves N EXTRA...` on host 0, as a
/// command to finish (stdin, stdout and stderr are the caller's to set).
fn master_command(lan: &Lan, key: &str, slaves: usize, extra: &[&str]) -> std::process::Command {
    let mut command = lan.command(0, &binary());
    let n = slaves.to_string();
    command.args([
        "master",
        "--interface",
        "eth0",
        "--key-file",
        key,
        "--wait",
        "5s",
    ]);
    command.args(["--slaves", &n]).args(extra);
    command
}

/// `n` bytes that do not repeat in any short period (so a lost or doubled chunk shows).
fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The resident set of process `pid`, in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Every slave printed `digest  -` (sha256sum of its stdin) and nothing else.
fn assert_every_digest(stdout: &str, names: &[&str], digest: &str) {
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    let expected: Vec<String> = names.iter().map(|n| format!("{n}: {digest}  -")).collect();
    assert_eq!(lines, expected, "{stdout}");
}

#[test]
fn stdin_from_a_pipe_reaches_every_job_whole_with_bounded_memory() {
    use std::io::Write;
    use std::process::Stdio;
    let Some(lan) = Lan::new("stdin", 133, 6) else {
        return;
    };
    let names = ["p1", "p2", "p3", "p4", "p5"];
    let key = named_slaves(&lan, &names);
    let data = pseudo_random(50 << 20);
    let digest = sha256_hex(&data);
    let mut child = master_command(&lan, &key, 5, &["--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("master");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).expect("write stdin");
    });
    // The master's resident set while 250 MB go through it (50 MB to each of 5).
    let sampler = std::thread::spawn(move || {
        let mut most = 0;
        while let Some(kb) = rss_kb(pid) {
            most = most.max(kb);
            std::thread::sleep(Duration::from_millis(20));
        }
        most
    });
    let out = child.wait_with_output().expect("master output");
    writer.join().expect("writer");
    let most_kb = sampler.join().expect("sampler");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_every_digest(&text(&out.stdout), &names, &digest);
    assert!(
        most_kb < 40 * 1024,
        "the master held {most_kb} kB at most while broadcasting 50 MB: memory is not bounded"
    );
}

#[test]
fn stdin_from_a_file_reaches_every_job_even_in_a_window_and_a_pipe_needs_all_at_once() {
    use std::process::Stdio;
    let Some(lan) = Lan::new("stdinf", 134, 6) else {
        return;
    };
    let names = ["f1", "f2", "f3", "f4", "f5"];
    let key = named_slaves(&lan, &names);
    let data = pseudo_random(3 << 20);
    let path = lan.dir().join("input");
    std::fs::write(&path, &data).expect("input file");
    // A file is read by each job from its start: jobs started late by --fanout get it all.
    let out = master_command(&lan, &key, 5, &["--fanout", "2", "--", "sha256sum"])
        .stdin(std::fs::File::open(&path).expect("open input"))
        .output()
        .expect("master");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_every_digest(&text(&out.stdout), &names, &sha256_hex(&data));
    // A pipe is read once: a window would starve the later jobs, so it is refused.
    let out = master_command(&lan, &key, 5, &["--fanout", "2", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .output()
        .expect("master");
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "stdin is a pipe");
    assert_contains(&text(&out.stderr), "--no-stdin");
    // --no-stdin: every job reads end-of-file at once.
    let out = master_command(&lan, &key, 5, &["--no-stdin", "--", "wc", "-c"])
        .stdin(std::fs::File::open(&path).expect("open input"))
        .output()
        .expect("master");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    let zero: Vec<String> = names.iter().map(|n| format!("{n}: 0")).collect();
    assert_eq!(lines, zero);
}

#[test]
fn name_address_and_rank_are_substituted_in_each_slaves_command() {
    let Some(lan) = Lan::new("subst", 135, 4) else {
        return;
    };
    let key = named_slaves(&lan, &["r2", "r1", "r3"]);
    let out = master_command(
        &lan,
        &key,
        3,
        &["--", "echo", "{name}@{addr}#{rank}", "{other}"],
    )
    .output()
    .expect("master");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    // Host i+1 runs names[i]; ranks follow name order.
    let expected: Vec<String> = [("r1", 2, 0), ("r2", 1, 1), ("r3", 3, 2)]
        .iter()
        .map(|(name, host, rank)| format!("{name}: {name}@{}#{rank} {{other}}", lan.ip(*host)))
        .collect();
    assert_eq!(lines, expected);
}

#[test]
fn copy_sends_files_with_their_mode_and_rcopy_fetches_each_slaves_own() {
    use std::os::unix::fs::PermissionsExt;
    let Some(lan) = Lan::new("copy", 136, 6) else {
        return;
    };
    let names = ["c1", "c2", "c3", "c4", "c5"];
    let key = named_slaves(&lan, &names);
    // The slaves share this machine's file system: each gets a directory of its own
    // through {name} in DEST.
    let root = lan.dir().join("slaves");
    for name in names {
        std::fs::create_dir_all(root.join(name)).expect("slave dir");
    }
    let data = pseudo_random(8 << 20);
    let source = lan.dir().join("tool.bin");
    std::fs::write(&source, &data).expect("source");
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let dest = format!("{}/{{name}}/", root.display());
    let copy = |args: &[&str]| {
        let mut command = lan.command(0, &binary());
        command.args([
            "copy",
            "--interface",
            "eth0",
            "--key-file",
            &key,
            "--wait",
            "5s",
        ]);
        command.args(["--slaves", "5"]).args(args);
        command.output().expect("copy")
    };
    let out = copy(&[source.to_str().unwrap(), &dest]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for name in names {
        let placed = root.join(name).join("tool.bin");
        let got = std::fs::read(&placed).expect("copied file");
        assert_eq!(sha256_hex(&got), sha256_hex(&data), "{name}");
        let mode = std::fs::metadata(&placed).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750, "{name}");
    }
    // Each slave's own file back, as NAME appended, with its mode.
    for name in names {
        let own = root.join(name).join("own.log");
        std::fs::write(&own, format!("the log of {name}\n").repeat(10_000)).expect("own");
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    }
    let back = lan.dir().join("back");
    let remote = format!("{}/{{name}}/own.log", root.display());
    let out = copy(&["--rcopy", &remote, back.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for name in names {
        let fetched = back.join(format!("own.log.{name}"));
        let got = std::fs::read(&fetched).expect("fetched file");
        let own = std::fs::read(root.join(name).join("own.log")).expect("own");
        assert_eq!(sha256_hex(&got), sha256_hex(&own), "{name}");
        let mode = std::fs::metadata(&fetched).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "{name}");
    }
    // What cannot be copied says why: a directory, a relative destination, a file
    // that is not there on one slave.
    let out = copy(&[root.to_str().unwrap(), &dest]);
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "is a directory; copy sends files");
    let out = copy(&[source.to_str().unwrap(), "relative/"]);
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "not an absolute path");
    std::fs::remove_file(root.join("c3").join("own.log")).expect("remove");
    let out = copy(&["--rcopy", &remote, back.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&text(&out.stderr), "localnet: failed: c3 (");
    assert_contains(&text(&out.stderr), "own.log: No such file or directory");
}

#[test]
fn ctrl_c_says_who_runs_and_a_second_within_a_second_kills_every_job() {
    let Some(lan) = Lan::new("ctrlc", 137, 4) else {
        return;
    };
    let names = ["k1", "k2", "k3"];
    let key = named_slaves(&lan, &names);
    let bin = binary();
    let args = [
        "master",
        "--interface",
        "eth0",
        "--key-file",
        &key,
        "--wait",
        "5s",
        "--slaves",
        "3",
        "--",
        "sleep",
        "3017",
    ];
    let pid = lan.spawn(0, "master", &bin, &args);
    // The jobs, not the master (whose command line holds the same words).
    let jobs = || {
        support::pids_matching("sleep 3017")
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"sleep\0"))
            })
            .count()
    };
    assert!(
        support::eventually(Duration::from_secs(10), || jobs() == 3),
        "the jobs started"
    );
    // One Ctrl-C: who is still running; nothing is killed.
    lan.signal(pid, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(support::alive(pid), "one Ctrl-C does not end the master");
    assert_eq!(jobs(), 3);
    assert_contains(
        &lan.log("master"),
        "still running on k[1-3] (3); Ctrl-C again within 1 s kills them",
    );
    // Two within a second: every job is killed, the master ends with 130.
    lan.signal(pid, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    lan.signal(pid, libc::SIGINT);
    assert_eq!(
        lan.wait(pid, Duration::from_secs(10)),
        Some(130),
        "{}",
        lan.log("master")
    );
    assert!(
        support::eventually(Duration::from_secs(3), || jobs() == 0),
        "no job is left behind"
    );
    assert_contains(&lan.log("master"), "killing the jobs on k[1-3]");
    assert_contains(&lan.log("master"), "killed by signal 9: k[1-3] (3)");
}

#[test]
fn on_a_terminal_a_progress_line_stays_below_the_output() {
    let Some(lan) = Lan::new("prog", 138, 4) else {
        return;
    };
    if !support::tool_available("script", "bsdutils") {
        return;
    }
    let names = ["t1", "t2", "t3"];
    let key = named_slaves(&lan, &names);
    // Under `script`, the master's stdout and stderr are a terminal.
    let command = format!(
        "{} master --interface eth0 --key-file {key} --wait 5s --slaves 3 -- \
         sh -c 'sleep 0.3; echo hi; sleep 0.3; echo bye >&2; sleep 0.3'",
        binary().display()
    );
    let out = lan
        .command(0, std::path::Path::new("script"))
        .args(["-qefc", &command, "/dev/null"])
        .output()
        .expect("script");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let tty = text(&out.stdout);
    assert_contains(&tty, "0/3 done · 3 running");
    const CLEAR: &str = "\r\x1b[K";
    // Every line of output starts on a cleared line (or after another line of the
    // same chunk), never after the progress text.
    for name in names {
        for line in [format!("{name}: hi"), format!("{name}: bye")] {
            let at = tty
                .find(&line)
                .unwrap_or_else(|| panic!("no {line:?} in {tty:?}"));
            let before = &tty[..at];
            assert!(
                before.ends_with(CLEAR) || before.ends_with('\n'),
                "{line:?} follows {:?}",
                &before[before.len().saturating_sub(30)..]
            );
        }
    }
    // The line is gone at the end: after its last drawing the line is cleared (output
    // written after that may follow, on lines of its own).
    let last = tty.rfind(" running").expect("the progress line was drawn");
    assert!(
        tty[last..].contains(CLEAR),
        "{:?}",
        &tty[tty.len().saturating_sub(60)..]
    );
}

#[test]
fn gather_folds_the_host_names_of_twenty_slaves_into_one_block() {
    let Some(lan) = Lan::new("ghost", 139, 21) else {
        return;
    };
    if !support::tool_available("unshare", "util-linux") {
        return;
    }
    let key = lan.key("k");
    let bin = binary();
    // Each slave on a host name of its own (a UTS namespace), named after it by default.
    for i in 1..=20 {
        let script = format!(
            "hostname web{i} && exec {} slave --interface eth0 --key-file {key}",
            bin.display()
        );
        let log = format!("web{i}");
        lan.spawn(
            i,
            &log,
            std::path::Path::new("unshare"),
            &["--uts", "sh", "-c", &script],
        );
    }
    let out = master_command(&lan, &key, 20, &["--gather", "--", "hostname"])
        .output()
        .expect("master");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let gathered = text(&out.stdout);
    eprintln!("FIGURE localnet master --gather -- hostname, 20 slaves:\n{gathered}");
    assert_eq!(gathered, "---- web[1-20] (20) ----\n{name}\n");
}
