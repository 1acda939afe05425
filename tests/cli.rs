//! The command line as a new user meets it: usage errors exit 2 and say what to do,
//! runtime errors name their cause once, nothing is deleted or sent by mistake.
//!
//! Every command runs in a network namespace of its own (`unshare --net`, loopback
//! only), so that a command that wrongly went on to discover could not reach any
//! network; when namespaces are not available the tests skip (see `support`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::binary;
use support::words::{assert_contains, assert_lacks, words};

/// Runs `localnet args` in a new network namespace with only `lo` (up), with `env`;
/// a command still running after 20 s is killed (and fails the test's checks).
fn isolated(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("unshare");
    command
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec timeout -s KILL 20 \"$0\" \"$@\"",
        ])
        .arg(binary())
        .args(args)
        .env_remove("LOCALNET_CONTROL")
        .env_remove("LOCALNET_KEY_FILE")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run unshare")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the command line `line` (its [`words`]) isolated, with no environment added;
/// asserts that it exits 1, a runtime error; its stderr.
#[track_caller]
fn runtime_error(line: &str) -> String {
    let out = isolated(&words(line), &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("localnet-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn usage_errors_exit_2_for_every_subcommand() {
    if !support::netns_available() {
        return;
    }
    let cases: &[(&[&str], &str)] = &[
        (&["peers", "--port", "0"], "--port"),
        (&["daemon", "--port", "0", "--interface", "lo"], "--port"),
        (&["slave", "--port", "0", "--interface", "lo"], "--port"),
        (&["master", "--port", "0", "--", "true"], "--port"),
        (&["terminate", "--all", "--port", "0"], "--port"),
        (&["peers", "--group", "10.1.2.3"], "not a multicast address"),
        (&["slave", "--group", "10.1.2.3"], "not a multicast address"),
        (
            &["master", "--group", "10.1.2.3", "--", "true"],
            "not a multicast address",
        ),
        (
            &["terminate", "--all", "--group", "1.2.3.4"],
            "not a multicast address",
        ),
        (&["master", "--timeout", "0s", "--", "true"], "zero"),
        (&["master", "--timeout", "-1s", "--", "true"], "negative"),
        (&["master", "--wait", "-1s", "--", "true"], "negative"),
        (&["peers", "--timeout", "0ms"], "zero"),
        (&["daemon", "--heartbeat", "-1s"], "negative"),
        (&["slave", "--listen", "127.0.0.1"], "IP:PORT"),
        (&["slave", "--listen", "somehost:80"], "not an IP address"),
        (
            &["daemon", "--name", "a\tb", "--interface", "lo"],
            "control character",
        ),
        (&["slave", "--name", "two\nlines"], "control character"),
        (&["peers", "--timeout", "500000000000y"], "too long"),
        (&["master", "--wait", "400d", "--", "true"], "too long"),
        (
            &["daemon", "--tag", "k=v\nx", "--interface", "lo"],
            "control characters",
        ),
        (
            &["master", "--nodes", "web[3-1]", "--", "true"],
            "runs backwards",
        ),
        (
            &["master", "--exclude", "n[1-", "--", "true"],
            "without its `]`",
        ),
        (&["master", "--pick", "0", "--", "true"], "--pick"),
    ];
    for (args, says) in cases {
        let out = isolated(args, &[]);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should be a usage error:\n{err}"
        );
        assert!(err.contains(says), "{args:?}: expected {says:?} in:\n{err}");
        assert!(
            !err.contains("-- -1"),
            "{args:?}: clap's tip would start the command:\n{err}"
        );
    }
}

#[test]
fn an_os_cause_is_printed_once() {
    if !support::netns_available() {
        return;
    }
    let err = runtime_error("peers --interface lo --key-file /nonexistent/cluster.key");
    assert_contains(&err, "/nonexistent/cluster.key");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_named_control_socket_that_does_not_answer_is_an_error() {
    if !support::netns_available() {
        return;
    }
    let dir = scratch("typo");
    let typo = dir.join("typo.sock");
    let typo = path_str(&typo);
    let cases = [
        format!("peers --interface lo --control {typo}"),
        format!("master --interface lo --control {typo} -- true"),
        format!("terminate --all --interface lo --control {typo}"),
    ];
    for line in &cases {
        let args = words(line);
        let out = isolated(&args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(
            err.contains(typo),
            "{args:?} should name the socket:\n{err}"
        );
        assert!(err.contains("no daemon answers"), "{args:?}:\n{err}");
    }
    // $LOCALNET_CONTROL names a socket just as --control does.
    let out = isolated(
        &words("peers --interface lo"),
        &[("LOCALNET_CONTROL", typo)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_contains(&stderr(&out), typo);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_daemon_refuses_a_control_path_that_is_a_file_and_keeps_it() {
    if !support::netns_available() {
        return;
    }
    let dir = scratch("keep");
    let file = dir.join("f");
    std::fs::write(&file, "data\n").expect("write");
    let err = runtime_error(&format!(
        "daemon --interface lo --control {}",
        path_str(&file)
    ));
    assert_contains(&err, "is a regular file, not a control socket");
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "data\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_control_path_too_long_for_a_socket_says_its_limit() {
    if !support::netns_available() {
        return;
    }
    let long = format!("/tmp/{}.sock", "x".repeat(120));
    for args in [
        &["daemon", "--interface", "lo", "--control", &long][..],
        &["status", "--control", &long][..],
    ] {
        let out = isolated(args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(err.contains("at most 107"), "{args:?}:\n{err}");
        assert_lacks(&err, "SUN_LEN");
    }
    assert!(!Path::new(&long).exists());
}

#[test]
fn a_key_file_others_can_read_is_warned_about() {
    if !support::netns_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("mode");
    let key = dir.join("cluster.key");
    let made = Command::new(binary())
        .args(["key", "generate", "--out", path_str(&key)])
        .output()
        .expect("key generate");
    assert!(made.status.success());
    let line = format!(
        "peers --interface lo --discovery multicast --timeout 100ms --key-file {}",
        path_str(&key)
    );
    let args = words(&line);
    let private = isolated(&args, &[]);
    assert_lacks(&stderr(&private), "chmod 600");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let open = isolated(&args, &[]);
    let err = stderr(&open);
    assert_contains(&err, "mode 0644");
    assert_contains(&err, "chmod 600");
    // Said once, however many parts of a command use the key.
    let key = path_str(&key);
    let net = words("--interface lo --discovery multicast --wait 100ms");
    let terminate: Vec<&str> = ["terminate", "--all", "--key-file", key]
        .into_iter()
        .chain(net.iter().copied())
        .collect();
    let master: Vec<&str> = ["master", "--key-file", key]
        .into_iter()
        .chain(net.iter().copied())
        .chain(["--", "true"])
        .collect();
    for all in [terminate, master] {
        let err = stderr(&isolated(&all, &[]));
        assert_eq!(err.matches("chmod 600").count(), 1, "{all:?}:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn peers_that_finds_fewer_than_wait_for_says_so() {
    if !support::netns_available() {
        return;
    }
    let err =
        runtime_error("peers --interface lo --discovery multicast --wait-for 3 --timeout 200ms");
    assert_contains(&err, "found only 0 of 3 peers");
}
