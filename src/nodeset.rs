//! Node sets in the bracket syntax of ClusterShell's `clush` and `pdsh`: `web[1-20],db1`,
//! `n[01-10]` (zero-padded), `r[1-2]sw[1-3]` (every combination), `n[1-9/2]` (a step).
//! This module owns parsing a set into names and folding names back into a set.
//!
//! Written here rather than taken from the `nodeset` crate, which implements the same
//! syntax but brings ClusterShell's group configuration with it (regex, ini and YAML
//! parsers, clap): localnet needs only the expansion and the folding.
//!
//! ```
//! use localnet::nodeset::{NodeSet, fold};
//! let set = NodeSet::parse("web[1-3,5],db[01-02]").unwrap();
//! assert_eq!(set.len(), 6);
//! assert!(set.contains("db02") && !set.contains("db2"));
//! assert_eq!(fold(["web3", "web1", "web2", "web5"]), "web[1-3,5]");
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Most names one set may expand to: a typo such as `n[1-1000000000]` is an error, not
/// a gigabyte of names.
pub const MAX_NAMES: usize = 1_000_000;
/// Most bytes the names of one set may take in all: a long name or a wide zero-padded
/// bound times a million names is an error too.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

/// A set of node names, parsed from the bracket syntax.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSet {
    names: BTreeSet<String>,
}

/// Why a node set does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node set {set:?}: {why}")]
pub struct NodeSetError {
    set: String,
    why: String,
}

impl NodeSet {
    /// Parses `text`: names separated by commas (or spaces), each with any number of
    /// `[ranges]`, where ranges are `N`, `A-B` or `A-B/STEP`, separated by commas.
    /// A bound written with leading zeros pads every number of its range to its width.
    pub fn parse(text: &str) -> Result<NodeSet, NodeSetError> {
        let fail = |why: String| NodeSetError {
            set: text.to_string(),
            why,
        };
        let mut names = BTreeSet::new();
        let mut bytes = 0usize;
        for pattern in split_top_level(text).map_err(fail)? {
            let expanded = expand(pattern).map_err(fail)?;
            bytes += expanded.iter().map(String::len).sum::<usize>();
            if names.len() + expanded.len() > MAX_NAMES || bytes > MAX_BYTES {
                return Err(fail(format!(
                    "more than {MAX_NAMES} names or {MAX_BYTES} bytes"
                )));
            }
            names.extend(expanded);
        }
        if names.is_empty() {
            return Err(fail("no names in it".into()));
        }
        Ok(NodeSet { names })
    }

    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether it holds no names (a parsed set never is).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

impl fmt::Display for NodeSet {
    /// The set folded back into the bracket syntax.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fold(self.iter()))
    }
}

/// Splits at commas and spaces outside brackets; checks that brackets pair up.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err("a `[` inside brackets".into()),
            ']' if depth == 1 => depth = 0,
            ']' => return Err("a `]` without its `[`".into()),
            ',' | ' ' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a `[` without its `]`".into());
    }
    parts.push(&text[start..]);
    Ok(parts.into_iter().filter(|p| !p.is_empty()).collect())
}

/// Every name one pattern (no top-level commas) stands for.
fn expand(pattern: &str) -> Result<Vec<String>, String> {
    let mut names = vec![String::new()];
    let mut rest = pattern;
    while !rest.is_empty() {
        let (literal, after) = match rest.find('[') {
            Some(open) => rest.split_at(open),
            None => (rest, ""),
        };
        check_literal(literal)?;
        let bytes: usize = names.iter().map(String::len).sum();
        if bytes.saturating_add(names.len().saturating_mul(literal.len())) > MAX_BYTES {
            return Err(format!("more than {MAX_BYTES} bytes of names"));
        }
        for name in &mut names {
            name.push_str(literal);
        }
        rest = after;
        if let Some(inside) = rest.strip_prefix('[') {
            let close = inside.find(']').ok_or("a `[` without its `]`")?;
            let numbers = ranges(&inside[..close])?;
            if names.len().saturating_mul(numbers.len()) > MAX_NAMES {
                return Err(format!("more than {MAX_NAMES} names"));
            }
            let (name_bytes, number_bytes) = (
                names.iter().map(String::len).sum::<usize>(),
                numbers.iter().map(String::len).sum::<usize>(),
            );
            let product = name_bytes
                .saturating_mul(numbers.len())
                .saturating_add(names.len().saturating_mul(number_bytes));
            if product > MAX_BYTES {
                return Err(format!("more than {MAX_BYTES} bytes of names"));
            }
            names = names
                .iter()
                .flat_map(|name| numbers.iter().map(move |n| format!("{name}{n}")))
                .collect();
            rest = &inside[close + 1..];
        }
    }
    Ok(names)
}

fn check_literal(literal: &str) -> Result<(), String> {
    match literal.chars().find(|c| c.is_control() || *c == ']') {
        Some(c) => Err(format!("{c:?} is not allowed in a name")),
        None => Ok(()),
    }
}

/// The numbers of a bracket's ranges, as text (zero-padded where the bound is).
fn ranges(list: &str) -> Result<Vec<String>, String> {
    let mut numbers = Vec::new();
    // At most, in all ranges of the bracket (each number its width or 20 digits).
    let mut bytes = 0usize;
    for range in list.split(',') {
        let (span, step) = match range.split_once('/') {
            Some((span, step)) => (span, Some(step)),
            None => (range, None),
        };
        let (low, high) = span.split_once('-').unwrap_or((span, span));
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("{range:?} is not a range (N, A-B or A-B/STEP)"))
        };
        let (a, b) = (number(low)?, number(high)?);
        if a > b {
            return Err(format!("{range:?} runs backwards"));
        }
        let step = match step {
            Some(s) => number(s).and_then(|s| match s {
                0 => Err(format!("{range:?} has a step of 0")),
                s => Ok(s),
            })?,
            None => 1,
        };
        if (b - a) / step >= (MAX_NAMES - numbers.len()) as u64 {
            return Err(format!("more than {MAX_NAMES} names"));
        }
        let width = if low.len() > 1 && low.starts_with('0') {
            low.len()
        } else {
            0
        };
        let count = ((b - a) / step + 1) as usize;
        bytes = bytes.saturating_add(count.saturating_mul(width.max(20)));
        if bytes > MAX_BYTES {
            return Err(format!("more than {MAX_BYTES} bytes of names"));
        }
        numbers.extend(
            (a..=b)
                .step_by(step as usize)
                .map(|n| format!("{n:0width$}")),
        );
    }
    Ok(numbers)
}

/// Folds names into the bracket syntax: names that differ only in their last number
/// share a bracket (`web[1-3,5]`); zero-padded numbers keep their width (`n[01-10]`);
/// names without a number stay as they are. Sets come out in name order.
pub fn fold<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    // (text before the last number, its padded width or 0, text after) → numbers.
    let mut groups: BTreeMap<(&str, usize, &str), BTreeSet<u64>> = BTreeMap::new();
    let mut plain = BTreeSet::new();
    for name in names {
        let Some((before, digits, after)) = last_number(name) else {
            plain.insert(name);
            continue;
        };
        let Ok(n) = digits.parse::<u64>() else {
            plain.insert(name);
            continue;
        };
        let width = if digits.len() > 1 && digits.starts_with('0') {
            digits.len()
        } else {
            0
        };
        groups.entry((before, width, after)).or_default().insert(n);
    }
    // An unpadded number as wide as a padded group of the same name joins it (n10
    // with n01-n09 is n[01-10]).
    let padded: Vec<(&str, usize, &str)> = groups.keys().filter(|k| k.1 > 0).copied().collect();
    for (before, width, after) in padded {
        if let Some(unpadded) = groups.get_mut(&(before, 0, after)) {
            let wide: Vec<u64> = unpadded
                .iter()
                .copied()
                .filter(|n| n.to_string().len() == width)
                .collect();
            for n in &wide {
                unpadded.remove(n);
            }
            if unpadded.is_empty() {
                groups.remove(&(before, 0, after));
            }
            groups
                .entry((before, width, after))
                .or_default()
                .extend(wide);
        }
    }
    let mut parts: Vec<(String, String)> = plain
        .into_iter()
        .map(|name| (name.to_string(), name.to_string()))
        .collect();
    for ((before, width, after), numbers) in groups {
        let text = match numbers.len() {
            1 => {
                let n = numbers.first().copied().unwrap_or_default();
                format!("{before}{n:0width$}{after}")
            }
            _ => format!("{before}[{}]{after}", fold_numbers(&numbers, width)),
        };
        parts.push((format!("{before}\u{0}{after}"), text));
    }
    parts.sort();
    parts
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(",")
}

/// `1,2,3,5` as `1-3,5`, each number padded to `width`.
fn fold_numbers(numbers: &BTreeSet<u64>, width: usize) -> String {
    let mut out = Vec::new();
    let mut iter = numbers.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while let Some(next) = end.checked_add(1)
            && iter.peek() == Some(&next)
        {
            end = next;
            iter.next();
        }
        out.push(match end == start {
            true => format!("{start:0width$}"),
            false => format!("{start:0width$}-{end:0width$}"),
        });
    }
    out.join(",")
}

/// A name's last run of ASCII digits, with what comes before and after it.
fn last_number(name: &str) -> Option<(&str, &str, &str)> {
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    Some((&name[..start], &name[start..end], &name[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &str) -> Vec<String> {
        NodeSet::parse(set)
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn ranges_lists_padding_steps_and_products_expand() {
        assert_eq!(names("web[1-3],db1"), ["db1", "web1", "web2", "web3"]);
        assert_eq!(names("n[01-03]"), ["n01", "n02", "n03"]);
        assert_eq!(names("n[8-10]"), ["n10", "n8", "n9"]);
        assert_eq!(names("n[1-7/3]"), ["n1", "n4", "n7"]);
        assert_eq!(names("r[1-2]sw[1,3]"), ["r1sw1", "r1sw3", "r2sw1", "r2sw3"]);
        assert_eq!(names("a b,,c"), ["a", "b", "c"]);
        assert_eq!(names("x[1,1-2]"), ["x1", "x2"]);
    }

    #[test]
    fn malformed_sets_are_errors_that_say_why() {
        for (set, why) in [
            ("web[1-3", "without its `]`"),
            ("web1-3]", "without its `[`"),
            ("web[3-1]", "runs backwards"),
            ("web[a-b]", "is not a range"),
            ("web[]", "is not a range"),
            ("web[1-4/0]", "step of 0"),
            ("n[[1]]", "inside brackets"),
            ("n[1-9999999999]", "more than"),
            ("n[1-1000]m[1-1000000]", "more than"),
            ("n[0-600000,0-600000]", "more than"),
            (&format!("{}[1-100000]", "x".repeat(1000)), "bytes of names"),
            (
                &format!("n[{}1-100000]", "0".repeat(1000)),
                "bytes of names",
            ),
            (",", "no names"),
        ] {
            let err = NodeSet::parse(set).expect_err(set).to_string();
            assert!(err.contains(why), "{set}: {err}");
        }
    }

    #[test]
    fn folding_gives_back_the_bracket_form() {
        assert_eq!(fold(["web3", "web1", "web2", "web5"]), "web[1-3,5]");
        assert_eq!(fold(["n01", "n02", "n10", "n03"]), "n[01-03,10]");
        assert_eq!(fold(["db1", "web1", "gateway"]), "db1,gateway,web1");
        assert_eq!(fold(["r1sw1", "r1sw2", "r2sw1"]), "r1sw[1-2],r2sw1");
        assert_eq!(fold(["a1b", "a2b", "a1c"]), "a[1-2]b,a1c");
        assert_eq!(fold(Vec::<&str>::new()), "");
        let top = u64::MAX.to_string();
        assert_eq!(fold([format!("n{top}").as_str()]), format!("n{top}"));
        let set = NodeSet::parse("h[1-50]").unwrap_or_default();
        assert_eq!(set.to_string(), "h[1-50]");
    }

    #[test]
    fn folding_and_parsing_are_inverse() {
        for set in ["web[1-3,5]", "n[01-03,10]", "a,b,c[7-9]", "x[0-1]y"] {
            let parsed = NodeSet::parse(set).unwrap_or_default();
            assert_eq!(NodeSet::parse(&parsed.to_string()).ok(), Some(parsed));
        }
    }
}
