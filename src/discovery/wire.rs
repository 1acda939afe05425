//! Wire format of discovery datagrams.
//!
//! This module owns the bytes on the wire: the message types, their JSON encoding,
//! the size limit, version checks and (with a cluster key) the authentication envelope.
//! It keeps no state; replay protection, which needs memory of past counters, lives in
//! the protocol core.
//!
//! A datagram is one JSON object, at most [`MAX_DATAGRAM`] bytes:
//!
//! ```text
//! open cluster:  {"v":1,"m":{"type":"announce",...}}
//! with a key:    {"v":1,"m":{...},"ctr":<u64>,"mac":"<32 hex digits>"}
//! ```
//!
//! `ctr` is the sender's clock in microseconds since the Unix epoch, bumped by one when
//! two datagrams would share a value: it is both the timestamp and the per-sender
//! counter of replay protection. `mac` is HMAC-SHA256 truncated to 128 bits (as IPsec
//! does, RFC 4868) over a domain string, `ctr` and the exact bytes of `m` as sent, so
//! receivers verify it without re-serialising anything. Announcements stay small
//! because the group's traffic budget divided by their size sets how often nodes may
//! announce. Unknown fields are ignored;
//! another `v` is ignored (counted, not an error worth a log line per datagram).

use crate::discovery::MemberId;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::key::ClusterKey;

/// Protocol version carried in every datagram.
pub const VERSION: u64 = 1;
/// Largest datagram sent or accepted, in bytes.
pub const MAX_DATAGRAM: usize = 1200;
/// Bytes of IPv4 and UDP headers, counted when measuring traffic.
pub const HEADER_OVERHEAD: usize = 28;

const MAC_DOMAIN: &[u8] = b"localnet/1 datagram";
/// Bytes of the HMAC-SHA256 tag carried on the wire (truncated, RFC 4868 style).
const WIRE_TAG_LEN: usize = 16;

/// What a node says about itself in announcements and probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Stable node id.
    pub id: MemberId,
    /// Human name (host name by default).
    pub name: String,
    /// Incarnation: changes (grows) each time the node restarts.
    #[serde(rename = "inc")]
    pub incarnation: u64,
    /// Transport address. An unspecified IP (`0.0.0.0`) means "the IP this datagram came from".
    pub addr: SocketAddr,
    /// Role: `daemon`, `slave`, `master`, ...
    pub role: String,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The sender's current announcement interval, in milliseconds.
    #[serde(rename = "ivl")]
    pub interval_ms: u64,
    /// Declare the sender failed when nothing was heard from it for this long (ms).
    #[serde(rename = "ttl")]
    pub ttl_ms: u64,
}

/// A discovery message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// "I am here": sent periodically to the group, and unicast in reply to probes.
    Announce {
        /// The sender's record.
        node: NodeRecord,
    },
    /// "Who is there?": a newcomer asks the group (`direct: false`, answered after a
    /// random delay), or a node checks one suspect peer (`direct: true`, answered at once).
    /// `node` is absent when the sender only observes and wants no place in tables.
    Probe {
        /// The sender's node id.
        from: MemberId,
        #[serde(default)]
        /// The sender's record, when it wants a place in tables; absent for observers.
        node: Option<NodeRecord>,
        #[serde(default)]
        /// Whether this checks one suspect peer (answered at once) rather than asking the group.
        direct: bool,
    },
    /// "I am leaving": remove me now.
    Goodbye {
        /// The leaving node's id.
        id: MemberId,
        /// The incarnation that is leaving (a newer one is not removed).
        #[serde(rename = "inc")]
        incarnation: u64,
    },
}

impl Message {
    /// The node id of the sender.
    pub fn sender(&self) -> MemberId {
        match self {
            Message::Announce { node } => node.id,
            Message::Probe { from, .. } => *from,
            Message::Goodbye { id, .. } => *id,
        }
    }
}

/// Authentication data of a datagram made with a cluster key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Auth {
    /// Sender's clock in microseconds since the Unix epoch; strictly grows per sender.
    pub ctr: u64,
}

impl Auth {
    /// The sender's clock in milliseconds.
    pub fn timestamp_ms(&self) -> u64 {
        self.ctr / 1000
    }
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    /// The datagram is over [`MAX_DATAGRAM`] bytes.
    Oversize,
    #[error("malformed datagram")]
    /// The datagram is not valid JSON or not a known message.
    Malformed,
    #[error("unsupported protocol version")]
    /// The datagram carries a protocol version other than [`VERSION`].
    Version,
    #[error("datagram not authenticated with this cluster's key")]
    /// The datagram lacks a valid MAC for this cluster's key, or carries one when none is expected.
    Auth,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    v: u64,
    #[serde(borrow)]
    m: &'a RawValue,
    #[serde(default)]
    ctr: Option<u64>,
    #[serde(default, borrow)]
    mac: Option<&'a str>,
}

/// Encodes a message; with a key, authenticates it with `auth`.
///
/// Fails only when the result would exceed [`MAX_DATAGRAM`].
///
/// ```
/// use localnet::discovery::wire::{decode, encode, Message};
/// let msg = Message::Goodbye { id: localnet::MemberId::nil(), incarnation: 3 };
/// let bytes = encode(&msg, None).unwrap();
/// assert_eq!(decode(&bytes, None).unwrap().0, msg);
/// ```
pub fn encode(msg: &Message, auth: Option<(&ClusterKey, Auth)>) -> Result<Vec<u8>, DecodeError> {
    let body = serde_json::to_string(msg).map_err(|_| DecodeError::Malformed)?;
    let out = match auth {
        None => format!("{{\"v\":{VERSION},\"m\":{body}}}"),
        Some((key, Auth { ctr })) => {
            let tag = key.sign(&[MAC_DOMAIN, &ctr.to_be_bytes(), body.as_bytes()]);
            format!(
                "{{\"v\":{VERSION},\"m\":{body},\"ctr\":{ctr},\"mac\":\"{}\"}}",
                hex::encode(&tag[..WIRE_TAG_LEN])
            )
        }
    };
    if out.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversize);
    }
    Ok(out.into_bytes())
}

/// Decodes a datagram. With a key, only datagrams authenticated with that key pass, and
/// their [`Auth`] is returned for replay checks; without one, authenticated datagrams of
/// other clusters are refused too (a node never joins a cluster whose key it lacks).
pub fn decode(
    bytes: &[u8],
    key: Option<&ClusterKey>,
) -> Result<(Message, Option<Auth>), DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversize);
    }
    let env: Envelope<'_> = serde_json::from_slice(bytes).map_err(|_| DecodeError::Malformed)?;
    if env.v != VERSION {
        return Err(DecodeError::Version);
    }
    let auth = match (key, env.mac) {
        (None, None) => None,
        (None, Some(_)) | (Some(_), None) => return Err(DecodeError::Auth),
        (Some(key), Some(mac_hex)) => {
            let Some(ctr) = env.ctr else {
                return Err(DecodeError::Auth);
            };
            let mut tag = [0u8; WIRE_TAG_LEN];
            hex::decode_to_slice(mac_hex, &mut tag).map_err(|_| DecodeError::Auth)?;
            let signed = [MAC_DOMAIN, &ctr.to_be_bytes(), env.m.get().as_bytes()];
            if !key.verify_truncated(&signed, &tag) {
                return Err(DecodeError::Auth);
            }
            Some(Auth { ctr })
        }
    };
    let msg: Message = serde_json::from_str(env.m.get()).map_err(|_| DecodeError::Malformed)?;
    if !msg_is_sane(&msg) {
        return Err(DecodeError::Malformed);
    }
    Ok((msg, auth))
}

/// What kind of key mismatch made [`decode`] fail with [`DecodeError::Auth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMismatch {
    /// Authenticated, but not with the receiver's key (or not readably).
    OtherKey,
    /// Authenticated, and the receiver has no key.
    SenderKeyed,
    /// Not authenticated, and the receiver has a key.
    SenderUnkeyed,
}

/// Tells which key mismatch a datagram refused with [`DecodeError::Auth`] shows, for a
/// receiver that has a key (`receiver_keyed`) or not.
pub fn key_mismatch(bytes: &[u8], receiver_keyed: bool) -> KeyMismatch {
    let has_mac = serde_json::from_slice::<Envelope<'_>>(bytes)
        .map(|env| env.mac.is_some())
        .unwrap_or(true);
    match (has_mac, receiver_keyed) {
        (true, false) => KeyMismatch::SenderKeyed,
        (false, true) => KeyMismatch::SenderUnkeyed,
        _ => KeyMismatch::OtherKey,
    }
}

/// The sender id and node name a datagram claims, without checking its authentication:
/// for diagnostics only, never for trust.
pub fn claimed_sender(bytes: &[u8]) -> Option<(MemberId, Option<String>)> {
    if bytes.len() > MAX_DATAGRAM {
        return None;
    }
    let env: Envelope<'_> = serde_json::from_slice(bytes).ok()?;
    let msg: Message = serde_json::from_str(env.m.get()).ok()?;
    let name = match &msg {
        Message::Announce { node }
        | Message::Probe {
            node: Some(node), ..
        } => Some(printable(&node.name)),
        _ => None,
    };
    Some((msg.sender(), name))
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), for showing a name that
/// came from an unauthenticated datagram.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_string()
    }
}

/// Whether a record's name, role and tags are printable text (no control characters):
/// they end up in tables, logs and terminals. Records from mDNS are held to it too.
pub fn record_is_printable(n: &NodeRecord) -> bool {
    let text_ok = |t: &str| !t.chars().any(char::is_control);
    text_ok(&n.name) && text_ok(&n.role) && n.tags.iter().all(|(k, v)| text_ok(k) && text_ok(v))
}

/// Field limits beyond what the size cap already implies.
fn msg_is_sane(msg: &Message) -> bool {
    let record_ok = |n: &NodeRecord| {
        !n.name.is_empty()
            && n.interval_ms > 0
            && n.ttl_ms >= n.interval_ms
            && n.addr.port() != 0
            && record_is_printable(n)
    };
    match msg {
        Message::Announce { node } => record_ok(node),
        Message::Probe { node, .. } => node.as_ref().is_none_or(record_ok),
        Message::Goodbye { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            id: MemberId::from_u128(0x1234),
            name: "alpha".into(),
            incarnation: 17,
            addr: "0.0.0.0:4000".parse().unwrap(),
            role: "daemon".into(),
            tags: [("rack".to_string(), "r1".to_string())].into(),
            interval_ms: 200,
            ttl_ms: 900,
        }
    }

    #[test]
    fn round_trip_every_message_open_and_keyed() {
        let key = ClusterKey::from_bytes([1; 32]);
        let msgs = [
            Message::Announce { node: record() },
            Message::Probe {
                from: MemberId::from_u128(9),
                node: Some(record()),
                direct: false,
            },
            Message::Probe {
                from: MemberId::from_u128(9),
                node: None,
                direct: true,
            },
            Message::Goodbye {
                id: MemberId::from_u128(5),
                incarnation: 2,
            },
        ];
        for msg in msgs {
            let open = encode(&msg, None).unwrap();
            assert_eq!(decode(&open, None).unwrap(), (msg.clone(), None));
            let auth = Auth { ctr: 42 };
            let keyed = encode(&msg, Some((&key, auth))).unwrap();
            assert_eq!(
                decode(&keyed, Some(&key)).unwrap(),
                (msg.clone(), Some(auth))
            );
        }
    }

    #[test]
    fn keys_must_match() {
        let key = ClusterKey::from_bytes([1; 32]);
        let other = ClusterKey::from_bytes([2; 32]);
        let msg = Message::Announce { node: record() };
        let keyed = encode(&msg, Some((&key, Auth { ctr: 1 }))).unwrap();
        let open = encode(&msg, None).unwrap();
        assert_eq!(decode(&keyed, Some(&other)), Err(DecodeError::Auth));
        assert_eq!(decode(&keyed, None), Err(DecodeError::Auth));
        assert_eq!(decode(&open, Some(&key)), Err(DecodeError::Auth));
        assert_eq!(key_mismatch(&keyed, true), KeyMismatch::OtherKey);
        assert_eq!(key_mismatch(&keyed, false), KeyMismatch::SenderKeyed);
        assert_eq!(key_mismatch(&open, true), KeyMismatch::SenderUnkeyed);
        assert_eq!(
            claimed_sender(&keyed),
            Some((record().id, Some("alpha".to_string())))
        );
    }

    #[test]
    fn tampering_breaks_the_mac() {
        let key = ClusterKey::from_bytes([1; 32]);
        let msg = Message::Announce { node: record() };
        let keyed =
            String::from_utf8(encode(&msg, Some((&key, Auth { ctr: 1 }))).unwrap()).unwrap();
        for (from, to) in [
            ("alpha", "alphb"),
            ("\"ctr\":1", "\"ctr\":2"),
            ("\"inc\":17", "\"inc\":18"),
        ] {
            let bad = keyed.replacen(from, to, 1);
            assert_ne!(bad, keyed);
            assert_eq!(
                decode(bad.as_bytes(), Some(&key)),
                Err(DecodeError::Auth),
                "{from}"
            );
        }
    }

    #[test]
    fn oversize_is_refused_both_ways() {
        let mut node = record();
        node.tags.insert("big".into(), "x".repeat(MAX_DATAGRAM));
        assert_eq!(
            encode(&Message::Announce { node }, None),
            Err(DecodeError::Oversize)
        );
        let mut big = encode(&Message::Announce { node: record() }, None).unwrap();
        big.resize(MAX_DATAGRAM + 1, b' ');
        assert_eq!(decode(&big, None), Err(DecodeError::Oversize));
    }

    #[test]
    fn garbage_is_malformed_and_never_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"hello",
            b"\x00\x01\x02",
            b"{}",
            b"[1,2,3]",
            b"{\"v\":1}",
            b"{\"v\":1,\"m\":{}}",
            b"{\"v\":1,\"m\":{\"type\":\"nonsense\"}}",
            b"{\"v\":1,\"m\":{\"type\":\"announce\",\"node\":{\"id\":\"not-a-uuid\"}}}",
            b"{\"v\":1,\"m\":{\"type\":\"goodbye\",\"id\":\"00000000-0000-0000-0000-000000000001\",\"inc\":-1}}",
            b"{\"v\":\"1\",\"m\":1}",
        ];
        for case in cases {
            assert_eq!(
                decode(case, None),
                Err(DecodeError::Malformed),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        // Pseudo-random bytes, and random cuts of a valid datagram.
        let good = encode(&Message::Announce { node: record() }, None).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..300);
            let junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            assert!(decode(&junk, None).is_err());
            let cut = rng.usize(0..good.len());
            assert!(decode(&good[..cut], None).is_err());
        }
    }

    #[test]
    fn other_versions_are_ignored_and_unknown_fields_accepted() {
        let v2 = br#"{"v":2,"m":{"type":"goodbye","id":"00000000-0000-0000-0000-000000000001","inc":1}}"#;
        assert_eq!(decode(v2, None), Err(DecodeError::Version));
        let extra = br#"{"v":1,"future":true,"m":{"type":"goodbye","id":"00000000-0000-0000-0000-000000000001","inc":1,"why":"bye"}}"#;
        assert!(matches!(
            decode(extra, None),
            Ok((Message::Goodbye { incarnation: 1, .. }, None))
        ));
    }

    #[test]
    fn nonsense_records_are_refused() {
        let mut node = record();
        node.ttl_ms = 10; // shorter than the interval
        let bytes = encode(&Message::Announce { node }, None).unwrap();
        assert_eq!(decode(&bytes, None), Err(DecodeError::Malformed));
    }

    #[test]
    fn control_characters_in_names_roles_and_tags_are_refused() {
        let mut fakes = Vec::new();
        let mut named = record();
        named.name = "h1\nlocalnet: error: fake".into();
        fakes.push(named);
        let mut role = record();
        role.role = "slave\u{1b}[2J".into();
        fakes.push(role);
        let mut tag = record();
        tag.tags.insert("k".into(), "v\tx".into());
        fakes.push(tag);
        for node in fakes {
            let probe = Message::Probe {
                from: MemberId::from_u128(9),
                node: Some(node.clone()),
                direct: false,
            };
            for msg in [Message::Announce { node }, probe] {
                let bytes = encode(&msg, None).unwrap();
                assert_eq!(decode(&bytes, None), Err(DecodeError::Malformed));
            }
        }
        let mut bad = record();
        bad.name = "a\u{7}b".into();
        let bytes = encode(&Message::Announce { node: bad }, None).unwrap();
        assert_eq!(
            claimed_sender(&bytes).unwrap().1.as_deref(),
            Some("a\\u{7}b")
        );
    }
}
