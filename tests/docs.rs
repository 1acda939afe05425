//! Generated documentation as a user installs it: the completion script loads in bash
//! and completes subcommands and options, the manual pages render with `man`. These
//! commands open no socket, so they run without a namespace of their own.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::binary;
use support::words::assert_contains;

fn localnet(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run localnet")
}

/// Runs `script` in bash with `$LOCALNET` set to the binary under test.
fn bash(script: &str) -> String {
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", script])
        .env("LOCALNET", binary())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `man -l -` of `roff`, as plain text 100 columns wide.
fn render(roff: &[u8]) -> String {
    let mut man = Command::new("man")
        .args(["-l", "-"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run man (Debian's man-db)");
    man.stdin
        .take()
        .expect("man's stdin")
        .write_all(roff)
        .expect("write the page to man");
    let out = man.wait_with_output().expect("wait for man");
    assert!(
        out.status.success(),
        "man failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Bold and underline come as overstrikes (`x\bx`, `_\bx`): keep the last of each.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        match c {
            '\u{8}' => {
                text.pop();
            }
            c => text.push(c),
        }
    }
    text
}

#[test]
fn the_bash_completion_loads_and_completes_subcommands_and_options() {
    let registered = bash(r#"source <("$LOCALNET" completions bash) && complete -p localnet"#);
    assert_contains(&registered, "-F _localnet localnet");
    let complete = |words: &str| {
        bash(&format!(
            r#"source <("$LOCALNET" completions bash)
            COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
            COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
            _localnet localnet "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
            printf '%s\n' "${{COMPREPLY[@]}}""#
        ))
    };
    let subcommands = complete("localnet ma");
    let subcommands: Vec<&str> = subcommands.lines().collect();
    assert_eq!(subcommands, ["master", "man"], "completing `localnet ma`");
    let options = complete("localnet master --sl");
    assert_contains(&options, "--slaves");
    assert_contains(&options, "--slave-logs");
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    for (shell, marker) in [
        ("zsh", "#compdef localnet"),
        ("fish", "complete -c localnet"),
    ] {
        let out = localnet(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert_contains(&script, marker);
        assert_contains(&script, "terminate");
    }
}

#[test]
fn the_manual_pages_render_with_man() {
    let out = localnet(&["man"]);
    assert!(out.status.success());
    let page = render(&out.stdout);
    assert_contains(
        &page,
        "localnet - Zero-configuration discovery of machines on a LAN",
    );
    assert_contains(&page, "SUBCOMMANDS");
    assert_contains(&page, "localnet-master(1)");

    let out = localnet(&["man", "master"]);
    assert!(out.status.success());
    let page = render(&out.stdout);
    assert_contains(&page, "localnet-master - Find slaves");
    assert_contains(&page, "--slaves");
}

#[test]
fn a_page_for_no_subcommand_is_an_error_that_lists_the_pages() {
    let out = localnet(&["man", "mastr"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_contains(&err, "no subcommand \"mastr\"");
    assert_contains(&err, "master");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    // A pipe whose reader is already gone: the first write fails (EPIPE).
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    for args in [&["man"][..], &["completions", "bash"]] {
        let out = Command::new(binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("the pipe's writer"))
            .stderr(Stdio::piped())
            .output()
            .expect("run localnet");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
