//! Wire format of discovery datagrams (protocol version 2).
//!
//! This module owns the bytes on the wire: the message types, their binary encoding,
//! the size limit, version checks and (with a cluster key) the authentication envelope.
//! It keeps no state; replay protection, which needs memory of past counters, lives in
//! the protocol core.
//!
//! # Why binary, why postcard
//!
//! Every node sends a heartbeat several times a second, so its size is most of the
//! protocol's idle traffic. Version 1 sent a ~220-byte JSON object; version 2 sends a
//! 26-byte heartbeat (50 with a key). The message bodies are encoded with
//! [postcard](https://docs.rs/postcard): its wire format is specified independently of
//! the code and stable across postcard 1.x, so a datagram's bytes are fixed by the
//! tables below, not by a library version; it works through serde (the message types
//! are plain derives), and its decoder returns errors, never panics, on any input.
//!
//! # Datagram
//!
//! At most [`MAX_DATAGRAM`] bytes. Multi-byte integers in the header are little-endian;
//! in the body, every integer is a postcard *varint* (unsigned LEB128: 7 bits per byte,
//! low bits first, high bit set on every byte but the last; a `u64` takes 1 to 10 bytes).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version: `0x02`. A datagram starting with `{` is version 1 (JSON): ignored and counted ([`DecodeError::Legacy`]); any other value is ignored and counted too ([`DecodeError::Version`]). |
//! | 1 | 1 | authentication: `0x00` open, `0x01` with a cluster key. Other values: malformed. |
//! | 2 | 8 | *keyed only*: `ctr`, u64 LE: the sender's clock in microseconds since the Unix epoch, bumped by one when two datagrams would share a value. It is both the timestamp and the per-sender counter of replay protection. |
//! | 2 (open) or 10 (keyed) | n | body: one [`Message`], postcard-encoded. Bytes after the message are ignored (room for fields a later revision appends). |
//! | end − 16 | 16 | *keyed only*: tag: HMAC-SHA256(key, `"localnet/2 datagram"` ‖ every byte before the tag), truncated to its first 16 bytes (RFC 4868 style). Verified over the exact bytes received, before the body is decoded. |
//!
//! # Body: a [`Message`]
//!
//! A postcard enum: a varint variant index (one byte, 0 to 4), then the variant's fields
//! in order. Offsets below are from the start of the body; "v" marks a varint, whose
//! size depends on its value. A UUID is its 16 bytes in order (as
//! [`uuid::Uuid::as_bytes`]).
//!
//! **Heartbeat** ([`Message::Heartbeat`], what a member multicasts every interval):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | `0x00` |
//! | 1 | 16 | `id`: the sender's member id |
//! | 17 | v | `incarnation` |
//! | … | v | `seq`: the sender's current record version ([`NodeRecord::seq`]) |
//!
//! **Announce** ([`Message::Announce`], the full record):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | `0x01` |
//! | 1 | … | `node`: a [`NodeRecord`] (below) |
//! | … | v | `reply_window_ms`: the sender answers a group probe within this many ms |
//!
//! **Probe** ([`Message::Probe`]):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | `0x02` |
//! | 1 | 16 | `from`: the sender's member id |
//! | 17 | 1 | `node` present: `0x00` (an observer: nothing follows for it) or `0x01`, then a [`NodeRecord`] |
//! | … | 1 | `direct`: `0x00` a group probe, `0x01` a direct one (other values: malformed) |
//!
//! **Goodbye** ([`Message::Goodbye`]):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | `0x03` |
//! | 1 | 16 | `id`: the leaving member's id |
//! | 17 | v | `incarnation`: the incarnation that leaves |
//!
//! **Ping** ([`Message::Ping`], multicast to check a suspect or, in a small group, to ask for a record; answered with a multicast record in a small group, a multicast heartbeat in a large one):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | `0x04` |
//! | 1 | 16 | `from`: the sender's member id |
//! | 17 | 16 | `target`: the suspect's member id |
//!
//! **NodeRecord** ([`NodeRecord`], inside Announce and Probe):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | `id` |
//! | 16 | v + n | `name`: varint length n, then n bytes of UTF-8 (invalid UTF-8: malformed) |
//! | … | v | `incarnation` |
//! | … | v | `seq` |
//! | … | 1 + 4 + v or 1 + 16 + v | `addr`: `0x00`, the IPv4 address's 4 bytes, varint port; or `0x01`, the IPv6 address's 16 bytes, varint port |
//! | … | v + n | `role`: a string, as `name` |
//! | … | v + … | `tags`: varint count, then per tag its key and its value, strings as `name` |
//! | … | v | `interval_ms` |
//! | … | v | `ttl_ms` |
//!
//! Sizes, for a daemon (incarnation = its start time in ms, 6 varint bytes): a
//! heartbeat is **26 bytes** open and **50** keyed (68 and 92 on an Ethernet wire with
//! its 42 bytes of Ethernet, IPv4 and UDP headers); a record such as an answer to a
//! probe, named `h1`, role `daemon`, no tags, is **49 bytes** open and **73** keyed.
//! The test `sizes_are_what_the_module_comment_says` holds these figures.
//!
//! Names, roles and tags must be printable (no control characters), a record's name
//! is not empty, its interval is positive, its TTL at least its interval and its port
//! not 0: anything else is refused as malformed.

use crate::discovery::MemberId;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::key::ClusterKey;

/// Protocol version: the first byte of every datagram.
pub const VERSION: u8 = 2;
/// Largest datagram sent or accepted, in bytes.
pub const MAX_DATAGRAM: usize = 1200;
/// Bytes of IPv4 and UDP headers, counted when measuring traffic.
pub const HEADER_OVERHEAD: usize = 28;

const MAC_DOMAIN: &[u8] = b"localnet/2 datagram";
/// Bytes of the HMAC-SHA256 tag carried on the wire (truncated, RFC 4868 style).
const WIRE_TAG_LEN: usize = 16;
/// Byte 1 of an open datagram.
const OPEN: u8 = 0;
/// Byte 1 of a datagram authenticated with a cluster key.
const KEYED: u8 = 1;
/// Version, authentication byte and counter of a keyed datagram.
const KEYED_HEADER: usize = 2 + 8;

/// What a node says about itself in announcements and probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Stable node id.
    #[serde(with = "uuid::serde::compact")]
    pub id: MemberId,
    /// Human name (host name by default).
    pub name: String,
    /// Incarnation: changes (grows) each time the node restarts.
    pub incarnation: u64,
    /// The record's version within an incarnation: grows whenever anything else in it
    /// changes (tags, interval, TTL). Heartbeats carry it, so that a receiver holding
    /// an older record asks for the new one. 0: not known (a record from mDNS).
    pub seq: u64,
    /// Transport address. An unspecified IP (`0.0.0.0`) means "the IP this datagram came from".
    pub addr: SocketAddr,
    /// Role: `daemon`, `slave`, `master`, ...
    pub role: String,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// The sender's current announcement interval, in milliseconds.
    pub interval_ms: u64,
    /// Declare the sender failed when nothing was heard from it for this long (ms).
    pub ttl_ms: u64,
}

/// A discovery message. The order of the variants is the wire's variant index (see
/// the module comment): never reorder them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Still here": what a member multicasts every interval. Only what proves
    /// liveness; a receiver that lacks the record `seq` of this incarnation asks for
    /// it (a direct probe, or a ping in a small group).
    Heartbeat {
        /// The sender's id.
        #[serde(with = "uuid::serde::compact")]
        id: MemberId,
        /// The sender's incarnation.
        incarnation: u64,
        /// The sender's current record version ([`NodeRecord::seq`]).
        seq: u64,
    },
    /// "This is me": the full record. Multicast when it changes and at a slow refresh;
    /// unicast (or multicast, to several newcomers at once) in answer to probes.
    Announce {
        /// The sender's record.
        node: NodeRecord,
        /// The sender answers a group probe within this many ms of receiving it (its
        /// answers are spread over that window, which grows with the group): what lets
        /// a one-shot observer tell when its answer is complete.
        reply_window_ms: u64,
    },
    /// "Who is there?": a newcomer asks the group (`direct: false`, answered after a
    /// random delay), or a node asks one peer for its record or checks that it is
    /// alive (`direct: true`, answered at once). `node` is absent when the sender only
    /// observes and wants no place in tables.
    Probe {
        /// The sender's node id.
        #[serde(with = "uuid::serde::compact")]
        from: MemberId,
        /// The sender's record, when it wants a place in tables; absent for observers.
        node: Option<NodeRecord>,
        /// Whether this asks one peer (answered at once) rather than the group.
        direct: bool,
    },
    /// "I am leaving": remove me now.
    Goodbye {
        /// The leaving node's id.
        #[serde(with = "uuid::serde::compact")]
        id: MemberId,
        /// The incarnation that is leaving (a newer one is not removed).
        incarnation: u64,
    },
    /// "Are you there?", multicast: a node checks a suspect peer, or (in a small group)
    /// asks a member for the record it lacks, without unicast (no address resolution).
    /// The target answers with one multicast datagram, which answers every peer that
    /// asked at once: its record in a small group, a heartbeat in a large one (where
    /// records to all would cost too much). The others ignore it.
    Ping {
        /// The sender's node id.
        #[serde(with = "uuid::serde::compact")]
        from: MemberId,
        /// The node asked (the suspect, or the member whose record is wanted).
        #[serde(with = "uuid::serde::compact")]
        target: MemberId,
    },
}

impl Message {
    /// The node id of the sender.
    pub fn sender(&self) -> MemberId {
        match self {
            Message::Heartbeat { id, .. } => *id,
            Message::Announce { node, .. } => node.id,
            Message::Probe { from, .. } => *from,
            Message::Goodbye { id, .. } => *id,
            Message::Ping { from, .. } => *from,
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
    /// The datagram is not a known message in the format of [`VERSION`].
    Malformed,
    #[error("unsupported protocol version")]
    /// The datagram carries a protocol version other than [`VERSION`] (and is not
    /// version 1).
    Version,
    #[error("protocol version 1 (JSON) datagram, from an older localnet")]
    /// The datagram is of protocol version 1 (a JSON object), which this node no
    /// longer speaks.
    Legacy,
    #[error("datagram not authenticated with this cluster's key")]
    /// The datagram lacks a valid MAC for this cluster's key, or carries one when none is expected.
    Auth,
}

/// Encodes a message; with a key, authenticates it with `auth`.
///
/// Fails only when the result would exceed [`MAX_DATAGRAM`].
///
/// ```
/// use localnet::discovery::{MemberId, wire::{decode, encode, Message}};
/// let msg = Message::Goodbye { id: MemberId::nil(), incarnation: 3 };
/// let bytes = encode(&msg, None).unwrap();
/// assert_eq!(bytes.len(), 1 + 1 + 1 + 16 + 1); // version, open, index, id, incarnation
/// assert_eq!(decode(&bytes, None).unwrap().0, msg);
/// ```
pub fn encode(msg: &Message, auth: Option<(&ClusterKey, Auth)>) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(64);
    out.push(VERSION);
    match auth {
        None => out.push(OPEN),
        Some((_, Auth { ctr })) => {
            out.push(KEYED);
            out.extend_from_slice(&ctr.to_le_bytes());
        }
    }
    let mut out = postcard::to_extend(msg, out).map_err(|_| DecodeError::Malformed)?;
    if let Some((key, _)) = auth {
        let tag = key.sign(&[MAC_DOMAIN, &out]);
        out.extend_from_slice(&tag[..WIRE_TAG_LEN]);
    }
    if out.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversize);
    }
    Ok(out)
}

/// The parts of a datagram's envelope, not yet authenticated.
struct Envelope<'a> {
    /// The counter and tag of a keyed datagram.
    keyed: Option<(u64, &'a [u8])>,
    /// The bytes the tag covers (everything before it).
    signed: &'a [u8],
    body: &'a [u8],
}

/// Splits a datagram into its envelope's parts (see the module comment).
fn envelope(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversize);
    }
    match bytes.first() {
        None => return Err(DecodeError::Malformed),
        Some(b'{') => return Err(DecodeError::Legacy),
        Some(&VERSION) => {}
        Some(_) => return Err(DecodeError::Version),
    }
    match bytes.get(1) {
        Some(&OPEN) => Ok(Envelope {
            keyed: None,
            signed: bytes,
            body: &bytes[2..],
        }),
        Some(&KEYED) => {
            if bytes.len() < KEYED_HEADER + WIRE_TAG_LEN {
                return Err(DecodeError::Auth);
            }
            let (signed, tag) = bytes.split_at(bytes.len() - WIRE_TAG_LEN);
            let mut ctr = [0u8; 8];
            ctr.copy_from_slice(&bytes[2..KEYED_HEADER]);
            Ok(Envelope {
                keyed: Some((u64::from_le_bytes(ctr), tag)),
                signed,
                body: &signed[KEYED_HEADER..],
            })
        }
        _ => Err(DecodeError::Malformed),
    }
}

/// Decodes a datagram. With a key, only datagrams authenticated with that key pass, and
/// their [`Auth`] is returned for replay checks; without one, authenticated datagrams of
/// other clusters are refused too (a node never joins a cluster whose key it lacks).
pub fn decode(
    bytes: &[u8],
    key: Option<&ClusterKey>,
) -> Result<(Message, Option<Auth>), DecodeError> {
    let env = envelope(bytes)?;
    let auth = match (key, env.keyed) {
        (None, None) => None,
        (None, Some(_)) | (Some(_), None) => return Err(DecodeError::Auth),
        (Some(key), Some((ctr, tag))) => {
            if !key.verify_truncated(&[MAC_DOMAIN, env.signed], tag) {
                return Err(DecodeError::Auth);
            }
            Some(Auth { ctr })
        }
    };
    let msg = body(env.body)?;
    if !msg_is_sane(&msg) {
        return Err(DecodeError::Malformed);
    }
    Ok((msg, auth))
}

/// The message of a body; bytes after it are ignored.
fn body(bytes: &[u8]) -> Result<Message, DecodeError> {
    postcard::take_from_bytes::<Message>(bytes)
        .map(|(msg, _rest)| msg)
        .map_err(|_| DecodeError::Malformed)
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
    let has_mac = bytes.get(1) != Some(&OPEN);
    match (has_mac, receiver_keyed) {
        (true, false) => KeyMismatch::SenderKeyed,
        (false, true) => KeyMismatch::SenderUnkeyed,
        _ => KeyMismatch::OtherKey,
    }
}

/// The sender id and node name a datagram claims, without checking its authentication:
/// for diagnostics only, never for trust. Version 1 (JSON) datagrams are read too, so
/// that a node running an older localnet can be named.
pub fn claimed_sender(bytes: &[u8]) -> Option<(MemberId, Option<String>)> {
    let env = match envelope(bytes) {
        Ok(env) => env,
        Err(DecodeError::Legacy) => return legacy_claimed_sender(bytes),
        Err(_) => return None,
    };
    let msg = body(env.body).ok()?;
    let name = match &msg {
        Message::Announce { node, .. }
        | Message::Probe {
            node: Some(node), ..
        } => Some(printable(&node.name)),
        _ => None,
    };
    Some((msg.sender(), name))
}

/// The sender a version 1 datagram (`{"v":1,"m":{...}}`) claims: the id of its record,
/// probe or goodbye, and the name of its record.
fn legacy_claimed_sender(bytes: &[u8]) -> Option<(MemberId, Option<String>)> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let m = value.get("m")?;
    let node = m.get("node");
    let id = node
        .and_then(|n| n.get("id"))
        .or_else(|| m.get("from"))
        .or_else(|| m.get("id"))?
        .as_str()?;
    let id = MemberId::parse_str(id).ok()?;
    let name = node
        .and_then(|n| n.get("name"))
        .and_then(|n| n.as_str())
        .map(printable);
    Some((id, name))
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
        Message::Heartbeat { .. } => true,
        Message::Announce { node, .. } => record_ok(node),
        Message::Probe { node, .. } => node.as_ref().is_none_or(record_ok),
        Message::Goodbye { .. } => true,
        Message::Ping { .. } => true,
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
            seq: 3,
            addr: "0.0.0.0:4000".parse().unwrap(),
            role: "daemon".into(),
            tags: [("rack".to_string(), "r1".to_string())].into(),
            interval_ms: 200,
            ttl_ms: 900,
        }
    }

    fn announce(node: NodeRecord) -> Message {
        Message::Announce {
            node,
            reply_window_ms: 2,
        }
    }

    #[test]
    fn round_trip_every_message_open_and_keyed() {
        let key = ClusterKey::from_bytes([1; 32]);
        let msgs = [
            Message::Heartbeat {
                id: MemberId::from_u128(7),
                incarnation: 1_800_000_000_000,
                seq: 300,
            },
            announce(record()),
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
            Message::Ping {
                from: MemberId::from_u128(5),
                target: MemberId::from_u128(6),
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

    /// The bytes of the module comment's tables, pinned: a change here is a change of
    /// the wire format (and of [`VERSION`]).
    #[test]
    fn the_bytes_are_those_of_the_tables() {
        let id = MemberId::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let heartbeat = Message::Heartbeat {
            id,
            incarnation: 300,
            seq: 1,
        };
        let mut expected = vec![0x02, 0x00, 0x00];
        expected.extend(1..=16u8);
        expected.extend([0xac, 0x02, 0x01]); // 300 as a varint, then seq 1
        assert_eq!(encode(&heartbeat, None).unwrap(), expected);
        let node = NodeRecord {
            id,
            name: "h1".into(),
            incarnation: 5,
            seq: 2,
            addr: "10.0.0.1:7766".parse().unwrap(),
            role: "r".into(),
            tags: [("k".to_string(), "v".to_string())].into(),
            interval_ms: 250,
            ttl_ms: 900,
        };
        let bytes = encode(
            &Message::Announce {
                node,
                reply_window_ms: 3,
            },
            None,
        )
        .unwrap();
        let mut expected = vec![0x02, 0x00, 0x01];
        expected.extend(1..=16u8);
        expected.extend([2, b'h', b'1', 5, 2]); // name, incarnation, seq
        expected.extend([0x00, 10, 0, 0, 1, 0xd6, 0x3c]); // V4, IP, port 7766
        expected.extend([1, b'r', 1, 1, b'k', 1, b'v']); // role, one tag
        expected.extend([0xfa, 0x01, 0x84, 0x07, 3]); // 250, 900, window 3
        assert_eq!(bytes, expected);
        // Keyed: the counter little-endian after the header, the tag over all before it.
        let key = ClusterKey::from_bytes([1; 32]);
        let keyed = encode(&heartbeat, Some((&key, Auth { ctr: 0x0102 }))).unwrap();
        assert_eq!(&keyed[..10], &[0x02, 0x01, 0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        let (signed, tag) = keyed.split_at(keyed.len() - 16);
        assert_eq!(tag, &key.sign(&[b"localnet/2 datagram", signed])[..16]);
        assert_eq!(&signed[10..], &encode(&heartbeat, None).unwrap()[2..]);
    }

    #[test]
    fn sizes_are_what_the_module_comment_says() {
        let key = ClusterKey::from_bytes([1; 32]);
        let incarnation = 1_800_000_000_000; // a start time in ms: 6 varint bytes
        let heartbeat = Message::Heartbeat {
            id: MemberId::from_u128(u128::MAX),
            incarnation,
            seq: 1,
        };
        let node = NodeRecord {
            id: MemberId::from_u128(u128::MAX),
            name: "h1".into(),
            incarnation,
            seq: 1,
            addr: "0.0.0.0:7766".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
            interval_ms: 250,
            ttl_ms: 900,
        };
        let record = Message::Announce {
            node,
            reply_window_ms: 2,
        };
        let auth = Some((&key, Auth { ctr: u64::MAX }));
        let sizes = [
            encode(&heartbeat, None).unwrap().len(),
            encode(&heartbeat, auth).unwrap().len(),
            encode(&record, None).unwrap().len(),
            encode(&record, auth).unwrap().len(),
        ];
        assert_eq!(sizes, [26, 50, 49, 73]);
    }

    #[test]
    fn keys_must_match() {
        let key = ClusterKey::from_bytes([1; 32]);
        let other = ClusterKey::from_bytes([2; 32]);
        let msg = announce(record());
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
        let msg = announce(record());
        let keyed = encode(&msg, Some((&key, Auth { ctr: 1 }))).unwrap();
        // Every single changed byte (name, counter, incarnation, tag, ...) is refused.
        for i in 2..keyed.len() {
            let mut bad = keyed.clone();
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad, Some(&key)), Err(DecodeError::Auth), "byte {i}");
        }
        let mut cut = keyed.clone();
        cut.pop();
        assert_eq!(decode(&cut, Some(&key)), Err(DecodeError::Auth));
    }

    #[test]
    fn oversize_is_refused_both_ways() {
        let mut node = record();
        node.tags.insert("big".into(), "x".repeat(MAX_DATAGRAM));
        assert_eq!(encode(&announce(node), None), Err(DecodeError::Oversize));
        let mut big = encode(&announce(record()), None).unwrap();
        big.resize(MAX_DATAGRAM + 1, b' ');
        assert_eq!(decode(&big, None), Err(DecodeError::Oversize));
    }

    #[test]
    fn garbage_is_malformed_and_never_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x02",
            b"\x02\x00",
            b"\x02\x07\x00",
            b"\x02\x00\x09",
            // A heartbeat cut short, a bool that is not 0 or 1, an overlong varint.
            b"\x02\x00\x00\x01\x02",
            b"\x02\x00\x02\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x00\x02",
            b"\x02\x00\x03\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        ];
        for case in cases {
            assert_eq!(decode(case, None), Err(DecodeError::Malformed), "{case:?}");
        }
        // Pseudo-random bytes, and random cuts of a valid datagram.
        let good = encode(&announce(record()), None).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..300);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = decode(&junk, None);
            if junk.len() > 2 {
                junk[0] = VERSION;
                junk[1] = OPEN;
                let _ = decode(&junk, None);
            }
            let cut = rng.usize(0..good.len());
            assert!(decode(&good[..cut], None).is_err());
        }
    }

    #[test]
    fn version_1_and_other_versions_are_told_apart_and_ignored() {
        let v1 = br#"{"v":1,"m":{"type":"announce","node":{"id":"00000000-0000-0000-0000-000000000001","name":"old","inc":1,"addr":"0.0.0.0:1","role":"r","ivl":200,"ttl":900}}}"#;
        assert_eq!(decode(v1, None), Err(DecodeError::Legacy));
        assert_eq!(
            claimed_sender(v1),
            Some((MemberId::from_u128(1), Some("old".to_string())))
        );
        let bye = br#"{"v":1,"m":{"type":"goodbye","id":"00000000-0000-0000-0000-000000000002","inc":1}}"#;
        assert_eq!(claimed_sender(bye), Some((MemberId::from_u128(2), None)));
        let mut v3 = encode(&announce(record()), None).unwrap();
        v3[0] = 3;
        assert_eq!(decode(&v3, None), Err(DecodeError::Version));
        // Bytes after the message are ignored (a later revision may append fields).
        let mut longer = encode(&announce(record()), None).unwrap();
        longer.extend_from_slice(b"future");
        assert_eq!(decode(&longer, None).unwrap().0, announce(record()));
    }

    #[test]
    fn nonsense_records_are_refused() {
        let mut node = record();
        node.ttl_ms = 10; // shorter than the interval
        let bytes = encode(&announce(node), None).unwrap();
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
            for msg in [announce(node), probe] {
                let bytes = encode(&msg, None).unwrap();
                assert_eq!(decode(&bytes, None), Err(DecodeError::Malformed));
            }
        }
        let mut bad = record();
        bad.name = "a\u{7}b".into();
        let bytes = encode(&announce(bad), None).unwrap();
        assert_eq!(
            claimed_sender(&bytes).unwrap().1.as_deref(),
            Some("a\\u{7}b")
        );
    }
}
