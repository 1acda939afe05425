//! How the commands' results look: the peer table, the status text, event lines, hints
//! at why nodes are missing, and `master --json`'s result objects.

use localnet::{JobExit, NodeId, Peer, PeerEvent};

/// The peers as a table for people, one row per peer.
pub fn peer_table(peers: &[Peer]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header([
        "NAME",
        "ADDRESS",
        "ROLE",
        "STATE",
        "LAST SEEN",
        "VIA",
        "TAGS",
        "ID",
    ]);
    for p in peers {
        // Names and tags come from the network: control characters are shown escaped.
        let tags: Vec<String> = p
            .tags
            .iter()
            .map(|(k, v)| format!("{}={}", k.escape_debug(), v.escape_debug()))
            .collect();
        table.add_row([
            p.name.escape_debug().to_string(),
            p.addr.to_string(),
            p.role.clone(),
            serde_json::to_value(p.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            format!("{}ms", p.last_seen_ms),
            match (p.verified, &p.unverified_reason) {
                (true, _) => p.paths.join("+"),
                (false, Some(why)) => format!("{} (unverified: {why})", p.paths.join("+")),
                (false, None) => format!("{} (unverified)", p.paths.join("+")),
            },
            tags.join(","),
            p.id.to_string(),
        ]);
    }
    table
}

/// Hints at why nodes are missing, as the end of a message: `; seen: A; B`, or nothing.
pub fn hint_text(hints: &[String]) -> String {
    match hints.is_empty() {
        true => String::new(),
        false => format!("; seen: {}", hints.join("; ")),
    }
}

/// One peer event as `watch` prints it: `joined  NAME ADDRESS ROLE ID`.
pub fn event_line(event: &PeerEvent) -> String {
    let p = event.peer();
    let what = match event {
        PeerEvent::Joined(_) => "joined ",
        PeerEvent::Updated(_) => "updated",
        PeerEvent::Left(_) => "left   ",
        PeerEvent::Failed(_) => "failed ",
    };
    format!(
        "{what} {} {} {} {}",
        p.name.escape_debug(),
        p.addr,
        p.role.escape_debug(),
        p.id
    )
}

/// The daemon's status as `field: value` lines, nested objects as `outer.inner`.
pub fn status_text(status: &serde_json::Value) -> String {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Array(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect();
                out.push((prefix.to_string(), items.join(", ")));
            }
            Value::String(text) => out.push((prefix.to_string(), text.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut fields = Vec::new();
    walk("", status, &mut fields);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| format!("{k:width$}  {}\n", v.escape_debug()))
        .collect()
}

/// The spinner's text: `looking for slaves: 2 of 5 found`.
pub fn slaves_found_message(found: usize, wanted: Option<usize>) -> String {
    match wanted {
        Some(n) => format!("looking for slaves: {found} of {n} found"),
        None => format!("looking for slaves: {found} found"),
    }
}

/// The slaves a selection matched, for an error that asks to narrow it:
/// `s1 (nid://10.0.0.2:7001, who=one), s2 (nid://10.0.0.3:7001, no tags)`.
pub fn describe_matches(slaves: &[Peer]) -> String {
    slaves
        .iter()
        .map(|p| {
            let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let tags = match tags.is_empty() {
                true => "no tags".to_string(),
                false => tags.join(" "),
            };
            format!("{} ({}, {tags})", p.name, NodeId::new(p.addr))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most bytes of one stream (stdout or stderr) of one slave's job that `master --json`
/// keeps for its result object; what comes after is read and dropped (the job is not
/// blocked), and the object says `"stdout_truncated": true` / `"stderr_truncated": true`.
/// Documented in `master --help` (--json) and the README.
pub const JSON_OUTPUT_CAP: usize = 16 * 1024 * 1024;

/// One stream of a job's output as `master --json` keeps it: the first
/// [`JSON_OUTPUT_CAP`] bytes, and how many there were in all.
pub struct CappedOutput {
    kept: Vec<u8>,
    total: u64,
    cap: usize,
}

impl Default for CappedOutput {
    fn default() -> Self {
        Self::with_cap(JSON_OUTPUT_CAP)
    }
}

impl CappedOutput {
    /// Keeps at most `cap` bytes.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            kept: Vec::new(),
            total: 0,
            cap,
        }
    }

    /// Keeps what fits under the cap, counts the rest.
    pub fn push(&mut self, data: &[u8]) {
        self.total = self.total.saturating_add(data.len() as u64);
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// The bytes kept.
    pub fn into_kept(self) -> Vec<u8> {
        self.kept
    }
}

/// `master --json`'s result object for one slave's job, from its exit and its captured
/// stdout and stderr; and the notes for stderr about streams that were truncated.
pub fn job_result(
    name: &str,
    node: NodeId,
    exit: &JobExit,
    captured: &[CappedOutput; 2],
) -> (serde_json::Value, String) {
    let mut object = serde_json::json!({
        "slave": name,
        "node": node,
        "exit_code": exit.code,
        "signal": exit.signal,
        "timed_out": exit.timed_out,
        "error": exit.error,
    });
    let mut notes = String::new();
    for (key, output) in [("stdout", &captured[0]), ("stderr", &captured[1])] {
        let bytes = &output.kept;
        let (lines, exact) = json_lines(bytes);
        object[key] = serde_json::json!(lines);
        if !exact {
            object[format!("{key}_base64")] =
                serde_json::json!(localnet::protocol::base64_encode(bytes));
        }
        if output.truncated() {
            object[format!("{key}_truncated")] = serde_json::json!(true);
            notes.push_str(&format!(
                "localnet: {name} ({node}): {key} truncated: kept the first {} of {} bytes \
                 (--json keeps at most {} MiB per stream)\n",
                bytes.len(),
                output.total,
                JSON_OUTPUT_CAP / (1024 * 1024)
            ));
        }
    }
    (object, notes)
}

/// A job's output as JSON lines (invalid UTF-8 replaced), and whether the lines say the
/// bytes exactly (valid UTF-8, and empty or ending with a newline).
fn json_lines(bytes: &[u8]) -> (Vec<String>, bool) {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines: Vec<String> = match bytes.is_empty() {
        true => Vec::new(),
        false => body
            .split(|&b| b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect(),
    };
    let exact = std::str::from_utf8(bytes).is_ok() && (bytes.is_empty() || bytes.ends_with(b"\n"));
    (lines, exact)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_keeps_the_cap_and_counts_the_rest() {
        let mut out = CappedOutput::default();
        out.push(b"abc");
        assert!(!out.truncated());
        out.push(&vec![b'x'; JSON_OUTPUT_CAP]);
        out.push(b"more");
        assert!(out.truncated());
        assert_eq!(out.kept.len(), JSON_OUTPUT_CAP);
        assert_eq!(&out.kept[..4], b"abcx");
        assert_eq!(out.total, JSON_OUTPUT_CAP as u64 + 7);
    }
}
