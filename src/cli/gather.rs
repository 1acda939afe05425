//! `localnet master --gather`: every distinct output once, under the node set that gave
//! it (as `clush -b` and `dshbak -c` print), and outputs that differ only by each
//! slave's own name folded into one block that shows the name as `{name}`.
//!
//! This module owns grouping the slaves' outputs and writing the blocks.

use std::collections::BTreeMap;

use localnet::nodeset::fold;

/// Most bytes of each stream kept per slave for gathering (the rest is counted, and
/// the block says it was cut).
pub const GATHER_CAP: usize = 1024 * 1024;

/// What one slave's job gave: its output and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gathered {
    /// The slave's name.
    pub name: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// How it ended, in words; `None` for success.
    pub ending: Option<String>,
    /// Whether some of its output was not kept ([`GATHER_CAP`]).
    pub truncated: bool,
}

/// One block of gathered output: the slaves that gave it and what they gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The slaves, in name order.
    pub names: Vec<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub ending: Option<String>,
    pub truncated: bool,
}

impl Block {
    /// `---- web[1-3,5] (4) ----`, with how they ended when not a success.
    pub fn header(&self) -> String {
        let set = fold(self.names.iter().map(String::as_str));
        let mut header = format!("---- {set} ({})", self.names.len());
        if let Some(ending) = &self.ending {
            header += &format!(" · {ending}");
        }
        if self.truncated {
            header += " · output cut";
        }
        header + " ----\n"
    }
}

/// The marker that stands for each slave's own name in a folded block.
pub const NAME_MARK: &[u8] = b"{name}";

/// Groups the outputs: identical ones into one block; then blocks whose outputs are
/// the same once each slave's name is replaced by [`NAME_MARK`] into one block that
/// shows that form. Blocks come in the order of their first slave's name.
pub fn gather(results: &[Gathered]) -> Vec<Block> {
    type Key = (Vec<u8>, Vec<u8>, Option<String>);
    // By the outputs with the slave's name marked: (the exact outputs, their names).
    let mut by_template: BTreeMap<Key, Vec<(Key, &Gathered)>> = BTreeMap::new();
    for result in results {
        let exact = (
            result.stdout.clone(),
            result.stderr.clone(),
            result.ending.clone(),
        );
        let template = (
            mark_name(&result.stdout, &result.name),
            mark_name(&result.stderr, &result.name),
            result.ending.clone(),
        );
        by_template
            .entry(template)
            .or_default()
            .push((exact, result));
    }
    let mut blocks = Vec::new();
    for (template, members) in by_template {
        let first = &members[0].0;
        let all_same = members.iter().all(|(exact, _)| exact == first);
        let mut names: Vec<String> = members.iter().map(|(_, r)| r.name.clone()).collect();
        names.sort();
        let truncated = members.iter().any(|(_, r)| r.truncated);
        let (stdout, stderr, ending) = match all_same {
            // One exact output (perhaps naming its one slave): shown as it is.
            true => first.clone(),
            false => template,
        };
        blocks.push(Block {
            names,
            stdout,
            stderr,
            ending,
            truncated,
        });
    }
    blocks.sort_by(|a, b| a.names.cmp(&b.names));
    blocks
}

/// One block per slave, in name order (`master --by-node`).
pub fn by_node(results: &[Gathered]) -> Vec<Block> {
    let mut blocks: Vec<Block> = results
        .iter()
        .map(|r| Block {
            names: vec![r.name.clone()],
            stdout: r.stdout.clone(),
            stderr: r.stderr.clone(),
            ending: r.ending.clone(),
            truncated: r.truncated,
        })
        .collect();
    blocks.sort_by(|a, b| a.names.cmp(&b.names));
    blocks
}

/// `bytes` with every whole-word occurrence of `name` replaced by [`NAME_MARK`]: not
/// inside a longer word (`n1` is not marked in `n10` nor in `xn1`).
fn mark_name(bytes: &[u8], name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    if name.is_empty() {
        return bytes.to_vec();
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let here = bytes[i..].starts_with(name);
        let before_ok = i == 0 || !word(bytes[i - 1]);
        let after_ok = bytes.get(i + name.len()).is_none_or(|b| !word(*b));
        if here && before_ok && after_ok {
            out.extend_from_slice(NAME_MARK);
            i += name.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, stdout: &str, ending: Option<&str>) -> Gathered {
        Gathered {
            name: name.into(),
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            ending: ending.map(str::to_string),
            truncated: false,
        }
    }

    #[test]
    fn identical_outputs_make_one_block_under_their_node_set() {
        let blocks = gather(&[
            result("web2", "ok\n", None),
            result("web1", "ok\n", None),
            result("web5", "ok\n", None),
            result("web3", "ok\n", None),
            result("db1", "no\n", Some("exit code 2")),
        ]);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].header(), "---- db1 (1) · exit code 2 ----\n");
        assert_eq!(blocks[1].header(), "---- web[1-3,5] (4) ----\n");
        assert_eq!(blocks[1].stdout, b"ok\n");
    }

    #[test]
    fn outputs_that_differ_only_by_the_name_fold_into_one_block() {
        let results: Vec<Gathered> = (1..=50)
            .map(|i| result(&format!("n{i}"), &format!("n{i}\nup 3 days\n"), None))
            .collect();
        let blocks = gather(&results);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].header(), "---- n[1-50] (50) ----\n");
        assert_eq!(blocks[0].stdout, b"{name}\nup 3 days\n");
        // The name is marked only as a whole word, and a single slave's output is
        // shown as it is.
        let blocks = gather(&[result("n1", "n1 n10 xn1 n1.\n", None)]);
        assert_eq!(blocks[0].stdout, b"n1 n10 xn1 n1.\n");
        let blocks = gather(&[
            result("n1", "n1 n10 xn1\n", None),
            result("n2", "n2 n10 xn1\n", None),
        ]);
        assert_eq!(blocks[0].stdout, b"{name} n10 xn1\n");
    }

    #[test]
    fn by_node_gives_every_slave_its_own_block_in_name_order() {
        let blocks = by_node(&[
            result("b", "x\n", None),
            result("a", "x\n", Some("timed out")),
        ]);
        let headers: Vec<String> = blocks.iter().map(Block::header).collect();
        assert_eq!(
            headers,
            ["---- a (1) · timed out ----\n", "---- b (1) ----\n"]
        );
    }

    #[test]
    fn the_ending_is_compared_and_cut_output_is_flagged() {
        let mut cut = result("a2", "x\n", None);
        cut.truncated = true;
        let blocks = gather(&[
            result("a1", "x\n", None),
            cut,
            result("a3", "x\n", Some("timed out")),
        ]);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].header(), "---- a[1-2] (2) · output cut ----\n");
        assert_eq!(blocks[1].header(), "---- a3 (1) · timed out ----\n");
    }
}
