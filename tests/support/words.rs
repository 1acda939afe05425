//! Command lines that read as one line, and assertions that show what they searched.
//!
//! rustfmt lays out an argument array one string per line, so two command lines that
//! differ in one flag read as a dozen near-identical lines; [`words`] keeps a command
//! line on one line: `master(&lan, &words(&format!("--key-file {k} --slaves 5 -- true")))`.

use std::process::Output;

/// The words of `line`, split at white space.
///
/// Only for words without white space of their own: flags, numbers, names and the
/// scratch paths of a test (under the temporary directory). An argument that holds
/// spaces, such as a shell script, goes whole in [`words_then`]'s `rest`.
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// The [`words`] of `line`, then each element of `rest` as one argument, spaces and all:
/// `words_then("--slaves 1 -- sh -c", &["echo hi; exit 3"])`.
pub fn words_then<'a>(line: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut all = words(line);
    all.extend_from_slice(rest);
    all
}

/// A process's output stream as text (invalid UTF-8 replaced).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `haystack` contains `needle`; the message is the whole haystack.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(haystack.contains(needle), "{haystack}");
}

/// Asserts that `haystack` does not contain `needle`; the message is the whole haystack.
#[track_caller]
pub fn assert_lacks(haystack: &str, needle: &str) {
    assert!(!haystack.contains(needle), "{haystack}");
}

/// Asserts that a finished command succeeded; the message is its stderr.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(out.status.success(), "{}", text(&out.stderr));
}
