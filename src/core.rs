//! The sans-IO discovery protocol: a pure state machine.
//!
//! This module owns the protocol's rules and timing. It is fed `(now, datagram, source)`
//! and timer ticks, and hands back datagrams to send ([`Transmit`]) and peer events
//! ([`PeerEvent`]). It has no sockets, no clock and no async runtime: the caller supplies
//! time as [`Millis`], which is what lets the simulator run thousands of nodes in virtual
//! time and the tokio driver run one node for real. A datagram may also come decoded
//! already ([`Decoded`]), so that a simulator decodes each multicast once for all its
//! recipients; the core does the same with it as with the bytes.
//!
//! The protocol in short:
//! - A starting node multicasts a `probe` that carries its own record, and once more
//!   shortly after. Members answer with a unicast `announce` after a random delay that
//!   grows with the group; a member that has several probes to answer by then multicasts
//!   one announcement instead. So a newcomer learns the LAN in about one round trip.
//! - Members multicast an `announce` every interval. The interval follows the RTCP rule
//!   (RFC 3550 §6.2): group size × mean announcement size ÷ traffic budget, never below a
//!   floor; timers are reconsidered when they fire, so a growing group slows down at once.
//! - Each announcement carries the sender's interval and TTL (4.5 intervals). A peer
//!   not heard for half its TTL becomes suspect and is probed directly (unicast) every
//!   quarter interval; it is declared failed only when its TTL passes with no answer.
//! - A `goodbye` removes its sender at once; a higher incarnation replaces an entry.
//! - Every datagram passes a per-source rate limit, then decoding, then (with a key) the
//!   replay check: the sender's microsecond counter must be within the replay window of
//!   our clock and not seen before.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::hash::BuildHasher;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;

use foldhash::HashMap;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::key::ClusterKey;
use crate::peers::{Heard, Observed, PeerState, PeerTable};
pub use crate::peers::{Millis, Peer, PeerEvent};
use crate::wire::{self, Auth, DecodeError, HEADER_OVERHEAD, Message, NodeRecord};

/// Tunables of the protocol. [`Config::default`] is what the daemon uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// Shortest announcement interval (small groups).
    pub min_interval_ms: u64,
    /// Longest announcement interval (huge groups).
    pub max_interval_ms: u64,
    /// Traffic budget of the whole group's announcements, bytes per second (IP and UDP
    /// headers included).
    pub budget_bytes_per_sec: u64,
    /// When a starting node sends its second probe.
    pub second_probe_ms: u64,
    /// Most peers kept; more are ignored (and counted).
    pub max_peers: usize,
    /// Datagrams per second accepted from one source address (sustained).
    pub rate_per_source: u32,
    /// Datagrams accepted from one source address in a burst.
    pub burst_per_source: u32,
    /// With a key: how far a sender's clock may be from ours.
    pub replay_window_ms: u64,
    /// An observer finds peers but is never listed by them and never announces.
    pub observer: bool,
    /// Speak localnet's own multicast protocol. Off when only mDNS is used: the core
    /// then only keeps the table of what mDNS reports.
    pub multicast: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_interval_ms: 200,
            max_interval_ms: 120_000,
            budget_bytes_per_sec: 64_000,
            second_probe_ms: 100,
            max_peers: 4096,
            rate_per_source: 50,
            burst_per_source: 100,
            replay_window_ms: 30_000,
            observer: false,
            multicast: true,
        }
    }
}

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// Stable id.
    pub id: Uuid,
    /// Name shown to others.
    pub name: String,
    /// Grows on every restart (the daemon uses its start time in ms).
    pub incarnation: u64,
    /// Transport address; an unspecified IP lets receivers use the datagram's source IP.
    pub addr: SocketAddr,
    /// Role.
    pub role: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The multicast group, on every interface.
    Group,
    /// One peer's discovery socket.
    Unicast(SocketAddr),
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: Destination,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// A received datagram, decoded and authenticated once.
///
/// [`Discovery::handle_datagram`] decodes each datagram itself. A caller that hands one
/// datagram to many cores (the simulator's multicast) decodes it once with
/// [`Decoded::new`] and gives every core the same `Decoded` through
/// [`Discovery::handle_decoded`], which does what `handle_datagram` does with the same
/// bytes (counters, rate limit, key check, replay check) minus the decoding. The record
/// it carries is shared, not copied, by every peer table that keeps it.
///
/// ```
/// use localnet::core::{Decoded, Destination};
/// # use localnet::core::{Config, Discovery, LocalNode};
/// # let me = |id: u128| LocalNode {
/// #     id: uuid::Uuid::from_u128(id), name: format!("n{id}"), incarnation: 1,
/// #     addr: "0.0.0.0:7000".parse().unwrap(), role: "daemon".into(), tags: Default::default(),
/// # };
/// let mut a = Discovery::new(Config::default(), me(1), None, 1, 0).unwrap();
/// let mut b = Discovery::new(Config::default(), me(2), None, 2, 0).unwrap();
/// let mut c = Discovery::new(Config::default(), me(3), None, 3, 0).unwrap();
/// a.start(0);
/// let probe = a.poll_transmit().unwrap();
/// assert_eq!(probe.dest, Destination::Group);
/// let from = "10.0.0.1:7000".parse().unwrap();
/// let decoded = Decoded::new(from, &probe.payload, None).unwrap();
/// for node in [&mut b, &mut c] {
///     node.start(0);
///     node.handle_decoded(1, &decoded);
///     assert_eq!(node.peer_count(), 1);
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Decoded {
    source: SocketAddr,
    size: usize,
    /// The key it was authenticated with (none: an open datagram).
    key: Option<ClusterKey>,
    auth: Option<Auth>,
    body: Body,
}

#[derive(Clone, Debug)]
enum Body {
    Announce(Arc<Heard>),
    Probe {
        from: Uuid,
        node: Option<Arc<Heard>>,
        direct: bool,
    },
    Goodbye {
        id: Uuid,
        inc: u64,
    },
}

impl Decoded {
    /// Decodes `bytes` received from `source`, as a core with `key` would: only
    /// datagrams authenticated with that key (or, without one, open datagrams) pass.
    pub fn new(
        source: SocketAddr,
        bytes: &[u8],
        key: Option<&ClusterKey>,
    ) -> Result<Self, DecodeError> {
        let (msg, auth) = wire::decode(bytes, key)?;
        let heard = |node| Arc::new(Heard::new(node, source));
        let body = match msg {
            Message::Announce { node } => Body::Announce(heard(node)),
            Message::Probe { from, node, direct } => Body::Probe {
                from,
                node: node.map(heard),
                direct,
            },
            Message::Goodbye { id, inc } => Body::Goodbye { id, inc },
        };
        Ok(Self {
            source,
            size: bytes.len(),
            key: key.cloned(),
            auth,
            body,
        })
    }

    /// Where the datagram came from.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// Its size in bytes (payload only, as received).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The name in the record it carries, if any.
    fn claimed_name(&self) -> Option<String> {
        match &self.body {
            Body::Announce(heard)
            | Body::Probe {
                node: Some(heard), ..
            } => Some(heard.record.name.clone()),
            _ => None,
        }
    }

    /// The node id of the sender.
    pub fn sender(&self) -> Uuid {
        match &self.body {
            Body::Announce(heard) => heard.record.id,
            Body::Probe { from, .. } => *from,
            Body::Goodbye { id, .. } => *id,
        }
    }
}

/// Counters, as `localnet` status shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub received: u64,
    pub received_bytes: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub dropped_malformed: u64,
    pub dropped_oversize: u64,
    pub dropped_version: u64,
    pub dropped_auth: u64,
    pub dropped_replay: u64,
    pub dropped_rate: u64,
    pub dropped_table_full: u64,
}

/// Why datagrams from a source were refused: what `localnet peers` and the messages of
/// a search that found too few nodes tell about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Refusal {
    /// Authenticated with our key, but the sender's clock is `offset_ms` from ours
    /// (positive: ahead), beyond the replay window.
    ClockOff {
        /// The sender's clock minus ours, in ms.
        offset_ms: i64,
    },
    /// Authenticated, but with a counter seen before: a replay (or a duplicate).
    Replayed,
    /// Authenticated with another cluster key.
    OtherKey,
    /// The sender has a cluster key and this node has none.
    SenderKeyed,
    /// The sender has no cluster key and this node has one.
    SenderUnkeyed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ClockOff { offset_ms } => {
                let secs = (offset_ms.unsigned_abs() + 500) / 1000;
                let way = if *offset_ms > 0 { "ahead" } else { "behind" };
                write!(f, "clock off by {secs} s ({way})")
            }
            Refusal::Replayed => write!(f, "replayed datagrams"),
            Refusal::OtherKey => write!(f, "key mismatch (another cluster key)"),
            Refusal::SenderKeyed => {
                write!(f, "key mismatch (it has a cluster key, this node has none)")
            }
            Refusal::SenderUnkeyed => {
                write!(f, "key mismatch (it has no cluster key, this node has one)")
            }
        }
    }
}

/// Datagrams refused from one source, as [`Discovery::rejections`] lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Where they came from.
    pub source: SocketAddr,
    /// The node id they claim (not authenticated when the key did not match).
    pub id: Option<Uuid>,
    /// The node name they claim, when they carried a record.
    pub name: Option<String>,
    /// Why the latest one was refused.
    pub reason: Refusal,
    /// How many were refused.
    pub count: u64,
    /// Milliseconds since the latest one.
    pub last_ms_ago: u64,
}

/// Most sources whose refusals are remembered; the least recent is forgotten first.
pub const MAX_REJECTIONS: usize = 32;
/// How long a source's refusals are remembered after the last one.
const REJECTION_MEMORY_MS: Millis = 60_000;

#[derive(Clone, Debug)]
struct RejectionEntry {
    source: SocketAddr,
    id: Option<Uuid>,
    name: Option<String>,
    reason: Refusal,
    count: u64,
    last_at: Millis,
}

/// How big a core's internal collections are: all are bounded, which the fuzz tests check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Peer table entries.
    pub peers: usize,
    /// Items in the peer timer heap.
    pub timers: usize,
    /// Rate-limiter buckets.
    pub limiter: usize,
    /// Senders whose replay counters are kept.
    pub replay: usize,
    /// Nodes remembered as failed or gone.
    pub tombstones: usize,
    /// Sources whose refusals are remembered.
    pub rejections: usize,
    /// Datagrams waiting for [`Discovery::poll_transmit`].
    pub transmits: usize,
    /// Events waiting for [`Discovery::poll_event`].
    pub events: usize,
}

/// Why a local record cannot be announced.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "this node's announcement would be {0} bytes, over the {max} byte limit: use fewer or shorter tags or a shorter name",
        max = wire::MAX_DATAGRAM
    )]
    RecordTooLarge(usize),
    #[error("the node name must not be empty")]
    EmptyName,
}

const GC_EVERY_MS: Millis = 10_000;
const LOG_EVERY_MS: Millis = 10_000;
/// How far behind the newest counter of a sender a reordered datagram may be (µs).
const REORDER_US: u64 = 1_000_000;
const RECENT_COUNTERS: usize = 64;
/// How long mDNS reports of a node that multicast saw fail or leave are ignored: about
/// an mDNS cache lifetime (RFC 6762 §10: 120 s for address records).
const TOMBSTONE_MS: Millis = 150_000;

/// The discovery state machine of one node.
///
/// ```
/// use localnet::core::{Config, Discovery, LocalNode, Destination};
/// let me = LocalNode {
///     id: uuid::Uuid::from_u128(1), name: "a".into(), incarnation: 1,
///     addr: "0.0.0.0:7000".parse().unwrap(), role: "daemon".into(), tags: Default::default(),
/// };
/// let mut node = Discovery::new(Config::default(), me, None, 1, 0).unwrap();
/// node.start(0);
/// let probe = node.poll_transmit().unwrap();
/// assert_eq!(probe.dest, Destination::Group);
/// assert_eq!(node.poll_timeout(), Some(100)); // the second probe
/// ```
pub struct Discovery {
    cfg: Config,
    me: NodeRecord,
    key: Option<ClusterKey>,
    last_ctr: u64,
    table: PeerTable,
    /// One live item per peer: (deadline, id); stale items are skipped when popped.
    timers: BinaryHeap<Reverse<(Millis, Uuid)>>,
    started: bool,
    leaving: bool,
    second_probe_at: Option<Millis>,
    next_announce: Option<Millis>,
    last_announce: Option<Millis>,
    /// Probes waiting for our answer.
    pending_replies: Pending,
    reply_at: Option<Millis>,
    /// Mean size of an announcement on the wire, headers included (RTCP's avg_rtcp_size).
    avg_size: f64,
    rng: fastrand::Rng,
    limiter: Limiter,
    replay: HashMap<Uuid, ReplayState>,
    /// Nodes (id, incarnation) that failed or left, with when to forget them.
    tombstones: HashMap<Uuid, (u64, Millis)>,
    next_gc: Millis,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    stats: Stats,
    log_gate: LogGate,
    /// Why datagrams were refused, per source (at most [`MAX_REJECTIONS`]).
    rejections: Vec<RejectionEntry>,
}

/// Who waits for an answer to a probe. Only this matters: one newcomer gets a unicast
/// answer, several get one multicast announcement (so nothing else is stored, and a
/// thousand probes cost no more than two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nobody,
    One(SocketAddr),
    Several,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Millis,
}

/// The token buckets of the per-source rate limit. Every datagram looks its source up
/// here, so an IPv4 source is one `u64` and a lookup is one probe.
struct Limiter {
    v4: HashTable<(u64, Bucket)>,
    v6: HashMap<SocketAddrV6, Bucket>,
    hasher: foldhash::fast::RandomState,
    /// How many sources it holds before its full buckets are forgotten.
    sweep_at: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            v4: HashTable::new(),
            v6: HashMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            sweep_at: 64,
        }
    }
}

impl Limiter {
    fn key(addr: &std::net::SocketAddrV4) -> u64 {
        (u64::from(addr.ip().to_bits()) << 16) | u64::from(addr.port())
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn contains(&self, source: &SocketAddr) -> bool {
        match source {
            SocketAddr::V4(a) => {
                let key = Self::key(a);
                self.v4
                    .find(self.hasher.hash_one(key), |(k, _)| *k == key)
                    .is_some()
            }
            SocketAddr::V6(a) => self.v6.contains_key(a),
        }
    }

    /// The bucket of `source`, made as `new` if it has none.
    fn bucket(&mut self, source: SocketAddr, new: Bucket) -> &mut Bucket {
        match source {
            SocketAddr::V4(a) => {
                let key = Self::key(&a);
                let hasher = &self.hasher;
                let entry = self.v4.entry(
                    hasher.hash_one(key),
                    |(k, _)| *k == key,
                    |(k, _)| hasher.hash_one(*k),
                );
                &mut entry.or_insert((key, new)).into_mut().1
            }
            SocketAddr::V6(a) => self.v6.entry(a).or_insert(new),
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Bucket) -> bool) {
        self.v4.retain(|(_, b)| keep(b));
        self.v6.retain(|_, b| keep(b));
    }
}

#[derive(Clone, Debug)]
struct ReplayState {
    newest: u64,
    recent: VecDeque<u64>,
    heard: Millis,
}

/// Lets one warning through per period and counts the rest.
#[derive(Debug, Default)]
struct LogGate {
    next: Millis,
    suppressed: u64,
}

impl LogGate {
    fn allow(&mut self, now: Millis) -> Option<u64> {
        if now >= self.next {
            self.next = now + LOG_EVERY_MS;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Discovery {
    /// Builds a node. `seed` drives its random choices (timer jitter), so a simulation
    /// is reproducible; `now` is the clock at creation (with a key it must be close to
    /// unix time in ms, since counters are checked against it).
    pub fn new(
        cfg: Config,
        me: LocalNode,
        key: Option<ClusterKey>,
        seed: u64,
        now: Millis,
    ) -> Result<Self, ConfigError> {
        if me.name.is_empty() {
            return Err(ConfigError::EmptyName);
        }
        let me = NodeRecord {
            id: me.id,
            name: me.name,
            inc: me.incarnation,
            addr: me.addr,
            role: me.role,
            tags: me.tags,
            interval_ms: cfg.min_interval_ms,
            ttl_ms: ttl_for(cfg.min_interval_ms),
        };
        let mut node = Self {
            table: PeerTable::new(cfg.max_peers),
            cfg,
            me,
            key,
            last_ctr: now.saturating_mul(1000),
            timers: BinaryHeap::new(),
            started: false,
            leaving: false,
            second_probe_at: None,
            next_announce: None,
            last_announce: None,
            pending_replies: Pending::Nobody,
            reply_at: None,
            avg_size: 0.0,
            rng: fastrand::Rng::with_seed(seed),
            limiter: Limiter::default(),
            replay: HashMap::default(),
            tombstones: HashMap::default(),
            next_gc: now + GC_EVERY_MS,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            log_gate: LogGate::default(),
            rejections: Vec::new(),
        };
        // Check the largest form of our record now rather than fail later.
        let size = node.largest_announcement()?;
        node.avg_size = size as f64;
        Ok(node)
    }

    /// The size on the wire of our largest possible message, headers included.
    fn largest_announcement(&self) -> Result<usize, ConfigError> {
        let mut big = self.me.clone();
        big.interval_ms = u64::MAX;
        big.ttl_ms = u64::MAX;
        let msg = Message::Probe {
            from: self.me.id,
            node: Some(big),
            direct: false,
        };
        let auth = self.key.as_ref().map(|k| (k, Auth { ctr: u64::MAX }));
        match wire::encode(&msg, auth) {
            Ok(bytes) => Ok(bytes.len() + HEADER_OVERHEAD),
            Err(_) => {
                let body = serde_json::to_string(&msg).map(|s| s.len()).unwrap_or(0);
                Err(ConfigError::RecordTooLarge(body + 100))
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> Uuid {
        self.me.id
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.me.inc
    }

    /// The announcement interval in force.
    pub fn interval_ms(&self) -> u64 {
        self.me.interval_ms
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of known peers.
    pub fn peer_count(&self) -> usize {
        self.table.len()
    }

    /// The known peers, sorted by name then id.
    pub fn peers(&self, now: Millis) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self.table.iter().map(|e| e.snapshot(now)).collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        for peer in peers.iter_mut().filter(|p| !p.verified) {
            peer.unverified_reason = Some(self.why_unverified(peer));
        }
        peers
    }

    /// Why `peer` is not verified: what was refused from it, by its id or else its IP.
    fn why_unverified(&self, peer: &Peer) -> String {
        let by_id = self.rejections.iter().find(|r| r.id == Some(peer.id));
        let by_ip = || {
            self.rejections
                .iter()
                .find(|r| r.source.ip() == peer.addr.ip())
        };
        match by_id.or_else(by_ip) {
            Some(r) => r.reason.to_string(),
            None => "known only through mDNS; no authenticated datagram heard from it".into(),
        }
    }

    /// Sources whose datagrams were refused lately, and why; most recent first.
    pub fn rejections(&self, now: Millis) -> Vec<Rejection> {
        let mut out: Vec<Rejection> = self
            .rejections
            .iter()
            .map(|r| Rejection {
                source: r.source,
                id: r.id,
                name: r.name.clone(),
                reason: r.reason,
                count: r.count,
                last_ms_ago: now.saturating_sub(r.last_at),
            })
            .collect();
        out.sort_by_key(|r| r.last_ms_ago);
        out
    }

    /// The sizes of the internal collections (all bounded).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            peers: self.table.len(),
            timers: self.timers.len(),
            limiter: self.limiter.len(),
            replay: self.replay.len(),
            tombstones: self.tombstones.len(),
            rejections: self.rejections.len(),
            transmits: self.transmits.len(),
            events: self.events.len(),
        }
    }

    /// Starts the node: probes the group now and once more shortly after.
    pub fn start(&mut self, now: Millis) {
        if self.started {
            return;
        }
        self.started = true;
        if !self.cfg.multicast {
            return;
        }
        self.send_probe(now);
        self.second_probe_at = Some(now + self.cfg.second_probe_ms);
        if !self.cfg.observer {
            let interval = self.compute_interval();
            self.next_announce = Some(now + self.jittered(interval));
        }
    }

    /// Leaves the group: a goodbye (sent twice against loss), then silence.
    pub fn leave(&mut self, now: Millis) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.second_probe_at = None;
        self.next_announce = None;
        self.reply_at = None;
        self.pending_replies = Pending::Nobody;
        if self.started && !self.cfg.observer && self.cfg.multicast {
            let bye = Message::Goodbye {
                id: self.me.id,
                inc: self.me.inc,
            };
            self.send(now, Destination::Group, &bye);
            self.send(now, Destination::Group, &bye);
        }
    }

    /// Changes this node's tags and announces them at once.
    pub fn set_tags(
        &mut self,
        now: Millis,
        tags: BTreeMap<String, String>,
    ) -> Result<(), ConfigError> {
        let old = std::mem::replace(&mut self.me.tags, tags);
        if let Err(e) = self.largest_announcement() {
            self.me.tags = old;
            return Err(e);
        }
        if self.started && !self.leaving && !self.cfg.observer && self.cfg.multicast {
            self.announce(now, Destination::Group);
        }
        Ok(())
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next peer event, if any.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// When [`Discovery::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if !self.started || self.leaving {
            return None;
        }
        [
            self.second_probe_at,
            self.next_announce,
            self.reply_at,
            self.timers.peek().map(|Reverse((t, _))| *t),
            Some(self.next_gc),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Millis) {
        if !self.started || self.leaving {
            return;
        }
        if self.second_probe_at.is_some_and(|t| t <= now) {
            self.second_probe_at = None;
            self.send_probe(now);
        }
        if self.reply_at.is_some_and(|t| t <= now) {
            self.reply_at = None;
            self.answer_probes(now);
        }
        if let Some(due) = self.next_announce.filter(|t| *t <= now) {
            self.announce_timer(now, due);
        }
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.peer_timer(now, t, id);
        }
        if now >= self.next_gc {
            self.next_gc = now + GC_EVERY_MS;
            self.collect_garbage(now);
        }
    }

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Millis, source: SocketAddr, bytes: &[u8]) {
        if !self.admit(now, source, bytes.len()) {
            return;
        }
        match Decoded::new(source, bytes, self.key.as_ref()) {
            Ok(decoded) => self.handle_admitted(now, &decoded),
            Err(err) => {
                if err == DecodeError::Auth {
                    let why = match wire::key_mismatch(bytes, self.key.is_some()) {
                        wire::KeyMismatch::OtherKey => Refusal::OtherKey,
                        wire::KeyMismatch::SenderKeyed => Refusal::SenderKeyed,
                        wire::KeyMismatch::SenderUnkeyed => Refusal::SenderUnkeyed,
                    };
                    self.record_refusal(now, source, why, || wire::claimed_sender(bytes));
                }
                self.dropped(now, source, err)
            }
        }
    }

    /// Handles one datagram decoded already (see [`Decoded`]): the same as
    /// [`Discovery::handle_datagram`] with the bytes it was decoded from.
    pub fn handle_decoded(&mut self, now: Millis, decoded: &Decoded) {
        if !self.admit(now, decoded.source, decoded.size) {
            return;
        }
        // `handle_datagram` would have decoded with our key: a datagram that passed
        // another key's check (or none) fails ours.
        if decoded.key != self.key {
            let why = match (&decoded.key, &self.key) {
                (Some(_), None) => Refusal::SenderKeyed,
                (None, Some(_)) => Refusal::SenderUnkeyed,
                _ => Refusal::OtherKey,
            };
            self.record_refusal(now, decoded.source, why, || {
                Some((decoded.sender(), decoded.claimed_name()))
            });
            self.dropped(now, decoded.source, DecodeError::Auth);
            return;
        }
        self.handle_admitted(now, decoded);
    }

    /// Counts a received datagram and applies the per-source rate limit.
    fn admit(&mut self, now: Millis, source: SocketAddr, size: usize) -> bool {
        if self.leaving {
            return false;
        }
        self.stats.received += 1;
        self.stats.received_bytes += size as u64;
        if !self.rate_allows(now, source) {
            self.stats.dropped_rate += 1;
            self.warn(now, source, "rate limit exceeded");
            return false;
        }
        true
    }

    /// Counts (and perhaps logs) a datagram that did not decode.
    fn dropped(&mut self, now: Millis, source: SocketAddr, err: DecodeError) {
        match err {
            DecodeError::Oversize => self.stats.dropped_oversize += 1,
            DecodeError::Malformed => self.stats.dropped_malformed += 1,
            DecodeError::Version => self.stats.dropped_version += 1,
            DecodeError::Auth => self.stats.dropped_auth += 1,
        }
        if err != DecodeError::Version {
            self.warn(now, source, &err.to_string());
        }
    }

    /// Acts on an admitted datagram that decoded and authenticated with our key.
    fn handle_admitted(&mut self, now: Millis, decoded: &Decoded) {
        let source = decoded.source;
        let sender = decoded.sender();
        if sender == self.me.id {
            return; // our own multicast, looped back
        }
        if let Some(auth) = decoded.auth
            && let Err(refused) = self.replay_allows(now, sender, auth)
        {
            self.stats.dropped_replay += 1;
            if let Some(why) = refused {
                self.record_refusal(now, source, why, || Some((sender, decoded.claimed_name())));
                if let Refusal::ClockOff { .. } = why {
                    self.warn(now, source, &format!("stale datagram: sender's {why}"));
                    return;
                }
            }
            self.warn(now, source, "replayed or stale datagram");
            return;
        }
        match &decoded.body {
            Body::Announce(heard) => {
                if heard.record.id == self.me.id {
                    return;
                }
                let size = (decoded.size + HEADER_OVERHEAD) as f64;
                self.avg_size += (size - self.avg_size) / 16.0;
                self.observe(now, Arc::clone(heard));
            }
            Body::Probe { from, node, direct } => {
                if let Some(heard) = node
                    && heard.record.id == *from
                {
                    self.observe(now, Arc::clone(heard));
                }
                if self.cfg.observer || !self.started {
                    return;
                }
                if *direct {
                    self.announce(now, Destination::Unicast(source));
                } else {
                    self.queue_reply(now, source);
                }
            }
            &Body::Goodbye { id, inc } => {
                if self.table.get(&id).is_some_and(|e| e.record().inc <= inc)
                    && let Some(entry) = self.table.remove(&id)
                {
                    self.bury(now, id, entry.record().inc);
                    self.events.push_back(PeerEvent::Left(entry.snapshot(now)));
                }
            }
        }
    }

    /// mDNS resolved a node (its address already resolved by the caller).
    pub fn observe_mdns(&mut self, now: Millis, record: NodeRecord) {
        if record.id == self.me.id
            || self.leaving
            || !self.started
            || !wire::record_is_printable(&record)
        {
            return;
        }
        if self
            .tombstones
            .get(&record.id)
            .is_some_and(|(inc, until)| record.inc <= *inc && now < *until)
        {
            return;
        }
        let id = record.id;
        let trusted = self.key.is_none();
        let observed = self.table.observe_mdns(record, now, trusted);
        self.report(now, id, observed);
    }

    /// mDNS says a node is gone. It leaves the table unless multicast still hears it.
    pub fn mdns_removed(&mut self, now: Millis, id: Uuid) {
        let Some(entry) = self.table.get_mut(&id) else {
            return;
        };
        entry.via_mdns = false;
        if !entry.via_multicast
            && let Some(entry) = self.table.remove(&id)
        {
            self.events.push_back(PeerEvent::Left(entry.snapshot(now)));
        }
    }

    fn bury(&mut self, now: Millis, id: Uuid, inc: u64) {
        if self.tombstones.len() < 2 * self.cfg.max_peers {
            self.tombstones.insert(id, (inc, now + TOMBSTONE_MS));
        }
    }

    fn observe(&mut self, now: Millis, heard: Arc<Heard>) {
        let id = heard.record.id;
        let (observed, unarmed) = self.table.observe(heard, now);
        self.report(now, id, observed);
        // A new peer, or one first seen through mDNS, gets its multicast timer now.
        if unarmed && self.timers.len() >= 2 * self.table.len() + 64 {
            self.compact_timers();
        }
        if unarmed && let Some(entry) = self.table.get_mut(&id) {
            let deadline = suspect_at(entry.last_heard, entry.record().ttl_ms);
            entry.armed_at = deadline;
            arm(&mut self.timers, deadline, id);
        }
    }

    fn report(&mut self, now: Millis, id: Uuid, observed: Observed) {
        match observed {
            Observed::Joined => {
                if let Some(entry) = self.table.get(&id) {
                    self.events
                        .push_back(PeerEvent::Joined(entry.snapshot(now)));
                }
            }
            Observed::Updated => {
                if let Some(entry) = self.table.get(&id) {
                    self.events
                        .push_back(PeerEvent::Updated(entry.snapshot(now)));
                }
            }
            Observed::Refreshed | Observed::Stale => {}
            Observed::Full => {
                self.stats.dropped_table_full += 1;
                if let Some(suppressed) = self.log_gate.allow(now) {
                    tracing::warn!(
                        max_peers = self.cfg.max_peers,
                        suppressed,
                        "peer table full; ignoring new peers"
                    );
                }
            }
        }
    }

    /// A peer's timer fired: re-arm it if it was heard since, else suspect, probe or fail it.
    fn peer_timer(&mut self, now: Millis, fired: Millis, id: Uuid) {
        let Some(entry) = self.table.get_mut(&id) else {
            return;
        };
        if entry.armed_at != fired {
            return; // a stale item of an entry that was removed and added again
        }
        let ttl = entry.record().ttl_ms;
        let expires = entry.last_heard + ttl;
        if now >= expires {
            if let Some(entry) = self.table.remove(&id) {
                self.bury(now, id, entry.record().inc);
                self.events
                    .push_back(PeerEvent::Failed(entry.snapshot(now)));
            }
            return;
        }
        let suspect = suspect_at(entry.last_heard, ttl);
        if now < suspect {
            entry.state = PeerState::Alive;
            entry.armed_at = suspect;
            arm(&mut self.timers, suspect, id);
            return;
        }
        if entry.state == PeerState::Alive {
            entry.state = PeerState::Suspect;
            entry.next_probe = now;
        }
        let mut probe_to = None;
        if now >= entry.next_probe {
            entry.next_probe = now + probe_gap(entry.record().interval_ms);
            probe_to = Some(entry.source());
        }
        let next = entry.next_probe.min(expires);
        entry.armed_at = next;
        arm(&mut self.timers, next, id);
        if let Some(dest) = probe_to {
            let probe = Message::Probe {
                from: self.me.id,
                node: (!self.cfg.observer).then(|| self.me.clone()),
                direct: true,
            };
            self.send(now, Destination::Unicast(dest), &probe);
        }
    }

    /// Drops the heap items that would be skipped when popped (their entry is gone, or
    /// was re-armed since). Peers that leave or fail leave their item behind until its
    /// deadline, which a peer announcing a huge TTL puts out of reach: without this,
    /// peers joining and leaving would grow the heap forever. Run when the heap holds
    /// twice as many items as the table has entries (plus a margin), it costs amortised
    /// O(1) per new peer, and changes nothing else.
    fn compact_timers(&mut self) {
        let table = &self.table;
        self.timers
            .retain(|Reverse((t, id))| table.get(id).is_some_and(|e| e.armed_at == *t));
    }

    fn announce_timer(&mut self, now: Millis, due: Millis) {
        let interval = self.compute_interval();
        // Forward reconsideration (RFC 3550 §6.3.6): the group may have grown since the
        // timer was set; if the new interval has not yet passed, wait for it.
        // But never stay silent long enough for peers to suspect us under the TTL we
        // last announced: announce then, with the new interval and TTL.
        if let Some(last) = self.last_announce {
            let reconsidered = last + interval;
            let before_suspicion = last + self.me.ttl_ms * 2 / 5;
            if reconsidered > now && reconsidered > due && now < before_suspicion {
                self.next_announce = Some(reconsidered.min(before_suspicion));
                return;
            }
        }
        self.announce(now, Destination::Group);
    }

    /// Sends our announcement; a multicast one also resets the periodic timer.
    fn announce(&mut self, now: Millis, dest: Destination) {
        if dest == Destination::Group {
            let interval = self.compute_interval();
            self.me.interval_ms = interval;
            self.me.ttl_ms = ttl_for(interval);
            self.last_announce = Some(now);
            self.next_announce = Some(now + self.jittered(interval));
        }
        let msg = Message::Announce {
            node: self.me.clone(),
        };
        if let Some(size) = self.send(now, dest, &msg)
            && dest == Destination::Group
        {
            self.avg_size += ((size + HEADER_OVERHEAD) as f64 - self.avg_size) / 16.0;
        }
    }

    fn send_probe(&mut self, now: Millis) {
        let probe = Message::Probe {
            from: self.me.id,
            node: (!self.cfg.observer).then(|| self.me.clone()),
            direct: false,
        };
        self.send(now, Destination::Group, &probe);
    }

    fn queue_reply(&mut self, now: Millis, to: SocketAddr) {
        self.pending_replies = match self.pending_replies {
            Pending::Nobody => Pending::One(to),
            Pending::One(one) if one == to => return,
            Pending::One(_) | Pending::Several => Pending::Several,
        };
        if self.reply_at.is_none() {
            // Spread the group's answers so that, all together, they would fit in a
            // quarter second of budget... at four times the budget: fast for small
            // groups, bounded for large ones.
            let n = self.table.len() as f64 + 1.0;
            let spread = n * self.avg_size * 1000.0 / (4.0 * self.cfg.budget_bytes_per_sec as f64);
            let spread = (spread as u64).clamp(2, 1000);
            self.reply_at = Some(now + self.rng.u64(0..=spread));
        }
    }

    fn answer_probes(&mut self, now: Millis) {
        // Several newcomers at once are answered with one multicast announcement, but
        // no more often than every half interval: a group starting all at once then
        // stays near its budget instead of answering every probe to everyone.
        if self.pending_replies == Pending::Several
            && let Some(last) = self.last_announce
        {
            let earliest = last + self.compute_interval() / 2;
            if now < earliest {
                self.reply_at = Some(earliest);
                return;
            }
        }
        match std::mem::replace(&mut self.pending_replies, Pending::Nobody) {
            Pending::Nobody => {}
            Pending::One(one) => self.announce(now, Destination::Unicast(one)),
            Pending::Several => self.announce(now, Destination::Group),
        }
    }

    fn compute_interval(&self) -> u64 {
        let members = self.table.len() as f64 + 1.0;
        let interval = members * self.avg_size * 1000.0 / self.cfg.budget_bytes_per_sec as f64;
        (interval as u64).clamp(self.cfg.min_interval_ms, self.cfg.max_interval_ms)
    }

    /// An interval spread over ±10 % so that nodes do not fall into step.
    fn jittered(&mut self, interval: u64) -> u64 {
        let spread = interval / 10;
        interval - spread + self.rng.u64(0..=2 * spread)
    }

    /// Encodes and queues a datagram; returns its size.
    fn send(&mut self, now: Millis, dest: Destination, msg: &Message) -> Option<usize> {
        let auth = match &self.key {
            Some(key) => {
                self.last_ctr = (self.last_ctr + 1).max(now.saturating_mul(1000));
                Some((key, Auth { ctr: self.last_ctr }))
            }
            None => None,
        };
        match wire::encode(msg, auth) {
            Ok(payload) => {
                let size = payload.len();
                self.stats.sent += 1;
                self.stats.sent_bytes += size as u64;
                self.transmits.push_back(Transmit { dest, payload });
                Some(size)
            }
            Err(err) => {
                // Our record was checked against the size limit at start.
                tracing::error!(%err, "cannot encode own message");
                None
            }
        }
    }

    fn rate_allows(&mut self, now: Millis, source: SocketAddr) -> bool {
        let (rate, burst) = (
            self.cfg.rate_per_source as f64,
            self.cfg.burst_per_source as f64,
        );
        let take = |bucket: &mut Bucket| {
            let elapsed = now.saturating_sub(bucket.at) as f64 / 1000.0;
            bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                true
            } else {
                false
            }
        };
        let full = Bucket {
            tokens: burst,
            at: now,
        };
        let len = self.limiter.len();
        let crowded = len >= 2 * self.cfg.max_peers || len >= self.limiter.sweep_at;
        if !crowded || self.limiter.contains(&source) {
            // A source without a bucket has a full one.
            return take(self.limiter.bucket(source, full));
        }
        if self.limiter.len() >= 2 * self.cfg.max_peers {
            self.collect_garbage(now);
            if self.limiter.len() >= 2 * self.cfg.max_peers {
                return false;
            }
        }
        if self.limiter.len() >= self.limiter.sweep_at {
            // Forget full buckets rather than grow. Still more than half the threshold:
            // raise it, so that these sweeps stay amortised O(1) per datagram.
            self.sweep_limiter(now);
            if self.limiter.len() > self.limiter.sweep_at / 2 {
                self.limiter.sweep_at *= 2;
            }
        }
        take(self.limiter.bucket(source, full))
    }

    /// Whether an authenticated datagram is fresh; when not, why (`None`: no room to
    /// track its sender).
    fn replay_allows(
        &mut self,
        now: Millis,
        sender: Uuid,
        auth: Auth,
    ) -> Result<(), Option<Refusal>> {
        if auth.timestamp_ms().abs_diff(now) > self.cfg.replay_window_ms {
            let offset = i128::from(auth.timestamp_ms()) - i128::from(now);
            let offset_ms = offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            return Err(Some(Refusal::ClockOff { offset_ms }));
        }
        if !self.replay.contains_key(&sender) && self.replay.len() >= 2 * self.cfg.max_peers {
            self.collect_garbage(now);
            if self.replay.len() >= 2 * self.cfg.max_peers {
                return Err(None);
            }
        }
        let state = self.replay.entry(sender).or_insert(ReplayState {
            newest: 0,
            recent: VecDeque::new(),
            heard: now,
        });
        if auth.ctr.saturating_add(REORDER_US) <= state.newest || state.recent.contains(&auth.ctr) {
            return Err(Some(Refusal::Replayed));
        }
        state.newest = state.newest.max(auth.ctr);
        state.heard = now;
        if state.recent.len() == RECENT_COUNTERS {
            state.recent.pop_front();
        }
        state.recent.push_back(auth.ctr);
        Ok(())
    }

    /// Remembers that a datagram from `source` was refused for `why`. `claimed` gives
    /// the id and name it claims; it is asked only for a source not known yet.
    fn record_refusal(
        &mut self,
        now: Millis,
        source: SocketAddr,
        why: Refusal,
        claimed: impl FnOnce() -> Option<(Uuid, Option<String>)>,
    ) {
        if let Some(entry) = self.rejections.iter_mut().find(|r| r.source == source) {
            entry.reason = why;
            entry.count += 1;
            entry.last_at = now;
            if entry.name.is_none()
                && let Some((id, name)) = claimed()
            {
                entry.id = Some(id);
                entry.name = name;
            }
            return;
        }
        if self.rejections.len() >= MAX_REJECTIONS
            && let Some(oldest) = self
                .rejections
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.last_at)
                .map(|(i, _)| i)
        {
            self.rejections.swap_remove(oldest);
        }
        let (id, name) = claimed().map_or((None, None), |(id, name)| (Some(id), name));
        self.rejections.push(RejectionEntry {
            source,
            id,
            name,
            reason: why,
            count: 1,
            last_at: now,
        });
    }

    /// Forgets the buckets that would be full again: a missing bucket is a full one, so
    /// this changes no decision. Run whenever the limiter reaches its threshold, it keeps
    /// the limiter at the sources heard in the last couple of seconds instead of every
    /// source heard since the last garbage collection (every node, for each node, after
    /// a simultaneous start).
    fn sweep_limiter(&mut self, now: Millis) {
        let (rate, burst) = (
            self.cfg.rate_per_source as f64,
            self.cfg.burst_per_source as f64,
        );
        self.limiter
            .retain(|b| b.tokens + now.saturating_sub(b.at) as f64 / 1000.0 * rate < burst);
    }

    fn collect_garbage(&mut self, now: Millis) {
        // A bucket that would be full again carries no information.
        self.sweep_limiter(now);
        // Counters older than the replay window are refused by the clock check anyway.
        let window = self.cfg.replay_window_ms;
        self.replay
            .retain(|_, s| now.saturating_sub(s.heard) <= window);
        self.tombstones.retain(|_, (_, until)| now < *until);
        self.rejections
            .retain(|r| now.saturating_sub(r.last_at) <= REJECTION_MEMORY_MS);
    }

    fn warn(&mut self, now: Millis, source: SocketAddr, why: &str) {
        if let Some(suppressed) = self.log_gate.allow(now) {
            // An observer is a short-lived client (`peers`, `master`, `terminate`): what
            // others send wrong is the daemons' business, and its spinner stays clean.
            if self.cfg.observer {
                tracing::debug!(%source, suppressed, "dropped datagram: {why}");
            } else {
                tracing::warn!(%source, suppressed, "dropped datagram: {why}");
            }
        }
    }
}

/// Queues a peer's timer. The heap holds one item per peer, so it grows by a quarter
/// rather than doubling: with thousands of peers (and a simulator running thousands of
/// nodes) the slack of doubling is most of its memory.
fn arm(timers: &mut BinaryHeap<Reverse<(Millis, Uuid)>>, at: Millis, id: Uuid) {
    if timers.len() == timers.capacity() {
        timers.reserve_exact((timers.capacity() / 4).max(16));
    }
    timers.push(Reverse((at, id)));
}

/// A sender's TTL for its interval: 4.5 intervals.
fn ttl_for(interval: u64) -> u64 {
    interval * 9 / 2
}

/// When a peer silent since `last_heard` becomes suspect: after half its TTL.
///
/// Rounded up to a [`SUSPECT_GRID_MS`] grid, so that one timer wake-up checks many
/// peers: an idle daemon wakes for received datagrams, not for each peer's timer.
fn suspect_at(last_heard: Millis, ttl: u64) -> Millis {
    (last_heard + ttl / 2).div_ceil(SUSPECT_GRID_MS) * SUSPECT_GRID_MS
}

/// Granularity of suspicion checks (expiry itself stays exact).
const SUSPECT_GRID_MS: Millis = 50;

/// Time between direct probes of a suspect.
fn probe_gap(interval: u64) -> u64 {
    (interval / 4).max(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u128, key: Option<ClusterKey>, observer: bool) -> Discovery {
        node_at(id, key, observer, 1_000_000)
    }

    /// A node made at `now` (its seed is its id).
    fn node_at(id: u128, key: Option<ClusterKey>, observer: bool, now: Millis) -> Discovery {
        let me = LocalNode {
            id: Uuid::from_u128(id),
            name: format!("n{id}"),
            incarnation: 1,
            addr: "0.0.0.0:7000".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
        };
        let cfg = Config {
            observer,
            ..Config::default()
        };
        Discovery::new(cfg, me, key, id as u64, now).unwrap()
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 9000))
    }

    fn drain(n: &mut Discovery) -> Vec<Transmit> {
        std::iter::from_fn(|| n.poll_transmit()).collect()
    }

    fn events(n: &mut Discovery) -> Vec<PeerEvent> {
        std::iter::from_fn(|| n.poll_event()).collect()
    }

    #[test]
    fn probe_teaches_both_sides() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        let mut b = node(2, None, false);
        a.start(t);
        drain(&mut a);
        b.start(t + 5);
        let probe = drain(&mut b).remove(0);
        a.handle_datagram(t + 6, addr(2), &probe.payload);
        assert!(matches!(events(&mut a)[..], [PeerEvent::Joined(ref p)] if p.name == "n2"));
        // The reply is jittered; run a's timers until it goes out.
        let at = a.poll_timeout().unwrap();
        assert!(
            at <= t + 6 + 2,
            "reply delay for a tiny group is small: {at}"
        );
        a.handle_timeout(at);
        let reply = drain(&mut a).remove(0);
        assert_eq!(reply.dest, Destination::Unicast(addr(2)));
        b.handle_datagram(at + 1, addr(1), &reply.payload);
        let ev = events(&mut b);
        assert!(
            matches!(&ev[..], [PeerEvent::Joined(p)] if p.name == "n1" && p.addr == "10.0.0.1:7000".parse().unwrap())
        );
    }

    #[test]
    fn goodbye_removes_and_silence_fails() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        let mut b = node(2, None, false);
        let mut c = node(3, None, false);
        a.start(t);
        b.start(t);
        c.start(t);
        drain(&mut a);
        let pb = drain(&mut b).remove(0);
        let pc = drain(&mut c).remove(0);
        a.handle_datagram(t, addr(2), &pb.payload);
        a.handle_datagram(t, addr(3), &pc.payload);
        assert_eq!(a.peer_count(), 2);
        events(&mut a);
        b.leave(t + 10);
        let bye = drain(&mut b);
        assert_eq!(bye.len(), 2);
        a.handle_datagram(t + 10, addr(2), &bye[0].payload);
        a.handle_datagram(t + 10, addr(2), &bye[1].payload);
        assert!(matches!(&events(&mut a)[..], [PeerEvent::Left(p)] if p.name == "n2"));
        // c is never heard again: suspect, probed directly, then failed at its TTL.
        let ttl = ttl_for(200);
        let mut now = t;
        let mut direct_probes = 0;
        while a.peer_count() > 0 {
            now = a.poll_timeout().unwrap();
            a.handle_timeout(now);
            direct_probes += drain(&mut a)
                .iter()
                .filter(|x| x.dest == Destination::Unicast(addr(3)))
                .count();
            assert!(now <= t + ttl, "failed late: {}", now - t);
        }
        assert_eq!(now, t + ttl);
        assert!(direct_probes >= 5, "{direct_probes}");
        assert!(matches!(&events(&mut a)[..], [PeerEvent::Failed(p)] if p.name == "n3"));
    }

    #[test]
    fn answered_direct_probe_keeps_a_suspect_alive() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        let mut b = node(2, None, false);
        a.start(t);
        b.start(t);
        drain(&mut a);
        let pb = drain(&mut b).remove(0);
        a.handle_datagram(t, addr(2), &pb.payload);
        // b's announcements are lost; only its answers to direct probes get through.
        let mut now = t;
        while now < t + 10_000 {
            now = a.poll_timeout().unwrap().min(b.poll_timeout().unwrap());
            a.handle_timeout(now);
            b.handle_timeout(now);
            drain(&mut b);
            for x in drain(&mut a) {
                if x.dest == Destination::Unicast(addr(2)) {
                    b.handle_datagram(now, addr(1), &x.payload);
                    for answer in drain(&mut b) {
                        a.handle_datagram(now, addr(2), &answer.payload);
                    }
                }
            }
        }
        assert_eq!(a.peer_count(), 1);
        assert!(
            !events(&mut a)
                .iter()
                .any(|e| matches!(e, PeerEvent::Failed(_)))
        );
    }

    #[test]
    fn restart_with_new_incarnation_is_an_update() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        a.start(t);
        let mut b = node(2, None, false);
        b.start(t);
        a.handle_datagram(t, addr(2), &drain(&mut b)[0].payload);
        let mut me = LocalNode {
            id: Uuid::from_u128(2),
            name: "n2".into(),
            incarnation: 2,
            addr: "0.0.0.0:7001".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
        };
        let mut b2 = Discovery::new(Config::default(), me.clone(), None, 9, t).unwrap();
        b2.start(t + 50);
        a.handle_datagram(t + 50, addr(2), &drain(&mut b2)[0].payload);
        let ev = events(&mut a);
        assert!(
            matches!(&ev[..], [PeerEvent::Joined(_), PeerEvent::Updated(p)] if p.incarnation == 2)
        );
        assert_eq!(a.peer_count(), 1);
        me.incarnation = 1; // the old incarnation speaks again: ignored
        let mut old = Discovery::new(Config::default(), me, None, 9, t).unwrap();
        old.start(t + 60);
        a.handle_datagram(t + 60, addr(2), &drain(&mut old)[0].payload);
        assert_eq!(a.peers(t + 60)[0].incarnation, 2);
    }

    #[test]
    fn observer_is_never_listed_and_never_announces() {
        let t = 1_000_000;
        let mut member = node(1, None, false);
        member.start(t);
        drain(&mut member);
        let mut obs = node(2, None, true);
        obs.start(t);
        let probe = drain(&mut obs).remove(0);
        member.handle_datagram(t, addr(2), &probe.payload);
        assert_eq!(member.peer_count(), 0);
        let at = member.poll_timeout().unwrap();
        member.handle_timeout(at);
        let reply = drain(&mut member).remove(0);
        assert_eq!(reply.dest, Destination::Unicast(addr(2)));
        obs.handle_datagram(at, addr(1), &reply.payload);
        assert_eq!(obs.peer_count(), 1);
        // Observers send no announcements, whatever the time.
        for _ in 0..50 {
            let next = obs.poll_timeout().unwrap();
            obs.handle_timeout(next);
        }
        assert!(
            drain(&mut obs)
                .iter()
                .all(|x| !String::from_utf8_lossy(&x.payload).contains("announce"))
        );
        obs.leave(t + 100_000);
        assert!(drain(&mut obs).is_empty(), "observers say no goodbye");
    }

    #[test]
    fn replays_and_stale_counters_are_refused() {
        let t = 1_000_000_000;
        let key = ClusterKey::from_bytes([3; 32]);
        let me = |id: u128| LocalNode {
            id: Uuid::from_u128(id),
            name: format!("n{id}"),
            incarnation: 1,
            addr: "0.0.0.0:7000".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
        };
        let mut a = Discovery::new(Config::default(), me(1), Some(key.clone()), 1, t).unwrap();
        let mut b = Discovery::new(Config::default(), me(2), Some(key.clone()), 2, t).unwrap();
        a.start(t);
        b.start(t);
        let probe = drain(&mut b).remove(0);
        a.handle_datagram(t, addr(2), &probe.payload);
        assert_eq!(a.peer_count(), 1);
        a.handle_datagram(t + 1, addr(2), &probe.payload);
        assert_eq!(a.stats().dropped_replay, 1);
        // b says goodbye; replaying its old probe must not bring it back.
        b.leave(t + 5);
        for bye in drain(&mut b) {
            a.handle_datagram(t + 5, addr(2), &bye.payload);
        }
        assert_eq!(a.peer_count(), 0);
        a.handle_datagram(t + 6, addr(2), &probe.payload);
        assert_eq!(a.peer_count(), 0);
        // A sender whose clock is far off is refused.
        let mut far = Discovery::new(Config::default(), me(3), Some(key), 3, t + 60_000).unwrap();
        far.start(t + 60_000);
        a.handle_datagram(t + 7, addr(3), &drain(&mut far)[0].payload);
        assert_eq!(a.peer_count(), 0);
        assert_eq!(a.stats().dropped_replay, 3);
    }

    #[test]
    fn refusals_are_recorded_per_source_and_explain_unverified_peers() {
        let t = 1_000_000_000;
        let key = ClusterKey::from_bytes([3; 32]);
        let mut a = node_at(1, Some(key.clone()), false, t);
        a.start(t);
        // A keyed node whose clock is 41 s ahead.
        let mut ahead = node_at(2, Some(key.clone()), false, t + 41_000);
        ahead.start(t + 41_000);
        for x in drain(&mut ahead) {
            a.handle_datagram(t + 1, addr(2), &x.payload);
        }
        // One without a key, one with another key, and one behind by 35 s.
        let mut open = node_at(3, None, false, t);
        open.start(t);
        a.handle_datagram(t + 2, addr(3), &drain(&mut open)[0].payload);
        let mut other = node_at(4, Some(ClusterKey::from_bytes([9; 32])), false, t);
        other.start(t);
        a.handle_datagram(t + 3, addr(4), &drain(&mut other)[0].payload);
        let mut behind = node_at(5, Some(key), false, t - 35_000);
        behind.start(t - 35_000);
        a.handle_datagram(t + 4, addr(5), &drain(&mut behind)[0].payload);
        assert_eq!(a.peer_count(), 0);
        let seen = a.rejections(t + 10);
        let of = |i: u8| seen.iter().find(|r| r.source == addr(i)).unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(
            matches!(of(2).reason, Refusal::ClockOff { offset_ms } if (40_990..=41_010).contains(&offset_ms))
        );
        assert_eq!(of(2).count, 1);
        assert_eq!(of(2).name.as_deref(), Some("n2"));
        assert_eq!(of(2).id, Some(Uuid::from_u128(2)));
        assert_eq!(of(2).reason.to_string(), "clock off by 41 s (ahead)");
        assert_eq!(of(3).reason, Refusal::SenderUnkeyed);
        assert_eq!(
            of(3).name.as_deref(),
            Some("n3"),
            "claimed, for diagnostics"
        );
        assert_eq!(of(4).reason, Refusal::OtherKey);
        assert_eq!(of(5).reason.to_string(), "clock off by 35 s (behind)");
        assert_eq!(seen[0].source, addr(5), "most recent first");
        // The fast node is seen through mDNS: unverified, and the listing says why.
        let record = |id: u128, ip: u8| NodeRecord {
            id: Uuid::from_u128(id),
            name: format!("n{id}"),
            inc: 1,
            addr: SocketAddr::from(([10, 0, 0, ip], 7000)),
            role: "daemon".into(),
            tags: BTreeMap::new(),
            interval_ms: 60_000,
            ttl_ms: 120_000,
        };
        a.observe_mdns(t + 20, record(2, 2));
        a.observe_mdns(t + 20, record(6, 6));
        let peers = a.peers(t + 20);
        assert_eq!(peers.len(), 2);
        assert!(!peers[0].verified);
        assert_eq!(
            peers[0].unverified_reason.as_deref(),
            Some("clock off by 41 s (ahead)")
        );
        assert!(
            peers[1]
                .unverified_reason
                .as_deref()
                .unwrap()
                .contains("no authenticated datagram")
        );
        // A keyless node records the keyed sender's refusal as such.
        let mut bare = node_at(7, None, false, t);
        bare.start(t);
        let mut keyed = node_at(8, Some(ClusterKey::from_bytes([3; 32])), false, t);
        keyed.start(t);
        bare.handle_datagram(t, addr(8), &drain(&mut keyed)[0].payload);
        assert_eq!(bare.rejections(t)[0].reason, Refusal::SenderKeyed);
        // Forgotten a minute after the last one.
        a.handle_timeout(t + 200_000);
        assert!(a.rejections(t + 200_000).is_empty());
    }

    #[test]
    fn refusals_are_bounded() {
        let t = 1_000_000_000;
        let mut a = node_at(1, Some(ClusterKey::from_bytes([3; 32])), false, t);
        a.start(t);
        let mut open = node_at(3, None, false, t);
        open.start(t);
        let probe = drain(&mut open).remove(0);
        for i in 0..10_000u32 {
            let src = SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 9000));
            a.handle_datagram(t + u64::from(i), src, &probe.payload);
        }
        assert_eq!(a.footprint().rejections, MAX_REJECTIONS);
        assert_eq!(a.stats().dropped_auth, 10_000);
        // The newest are kept.
        let newest = SocketAddr::from(([10, 9, (9_999u32 >> 8) as u8, 9_999u32 as u8], 9000));
        assert_eq!(a.rejections(t + 10_000)[0].source, newest);
    }

    #[test]
    fn mdns_entries_merge_with_multicast_and_tombstones_hold() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        a.start(t);
        drain(&mut a);
        let mut b = node(2, None, false);
        b.start(t);
        let probe = drain(&mut b).remove(0);
        let mdns_record = |inc| NodeRecord {
            id: Uuid::from_u128(2),
            name: "n2".into(),
            inc,
            addr: "10.0.0.2:7000".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
            interval_ms: 60_000,
            ttl_ms: 120_000,
        };
        // Seen first through mDNS: one entry; then multicast: still one, both paths.
        a.observe_mdns(t, mdns_record(1));
        a.handle_datagram(t + 1, addr(2), &probe.payload);
        assert_eq!(a.peer_count(), 1);
        assert_eq!(a.peers(t + 1)[0].paths, vec!["multicast", "mdns"]);
        let ev = events(&mut a);
        assert!(matches!(&ev[..], [PeerEvent::Joined(_)]), "{ev:?}");
        // mDNS removal keeps a peer multicast still hears.
        a.mdns_removed(t + 2, Uuid::from_u128(2));
        assert_eq!(a.peer_count(), 1);
        // Multicast declares it failed; the mDNS cache cannot bring it back.
        let mut now = t;
        while a.peer_count() > 0 {
            now = a.poll_timeout().unwrap();
            a.handle_timeout(now);
        }
        a.observe_mdns(now + 1, mdns_record(1));
        assert_eq!(a.peer_count(), 0);
        // A restarted incarnation is welcome at once.
        a.observe_mdns(now + 2, mdns_record(2));
        assert_eq!(a.peer_count(), 1);
        assert_eq!(a.peers(now + 2)[0].paths, vec!["mdns"]);
        // An mDNS-only entry is not expired by multicast timers; removal ends it.
        for _ in 0..20 {
            let next = a.poll_timeout().unwrap();
            a.handle_timeout(next);
        }
        assert_eq!(a.peer_count(), 1);
        a.mdns_removed(now + 3, Uuid::from_u128(2));
        assert_eq!(a.peer_count(), 0);
    }

    #[test]
    fn rate_limit_per_source() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        a.start(t);
        for _ in 0..1000 {
            a.handle_datagram(t, addr(9), b"junk");
        }
        let s = a.stats().clone();
        assert_eq!(s.dropped_malformed, 100);
        assert_eq!(s.dropped_rate, 900);
        // Other sources are unaffected, and the bucket refills.
        a.handle_datagram(t, addr(8), b"junk");
        a.handle_datagram(t + 1000, addr(9), b"junk");
        assert_eq!(a.stats().dropped_malformed, 102);
    }

    /// Runs two identical groups in lockstep, one fed raw bytes (each core decodes its
    /// copy), the other one shared [`Decoded`] per datagram; every output must agree.
    #[test]
    fn decoding_once_for_many_cores_changes_nothing() {
        let t0 = 1_000_000_000;
        for key in [None, Some(ClusterKey::from_bytes([4; 32]))] {
            let make = || -> Vec<Discovery> {
                (1..=6)
                    .map(|i| node_at(i, key.clone(), false, t0))
                    .collect()
            };
            let (mut raw, mut shared) = (make(), make());
            let src = |i: usize| SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000));
            for t in (t0..t0 + 4_000).step_by(5) {
                if t == t0 + 2_000 {
                    raw[5].leave(t);
                    shared[5].leave(t);
                }
                for i in 0..6 {
                    if i == 4 && t > t0 + 1_000 {
                        continue; // node 4 goes silent: suspected, probed, failed
                    }
                    if t == t0 + 10 * i as u64 {
                        raw[i].start(t);
                        shared[i].start(t);
                    }
                    if raw[i].poll_timeout().is_some_and(|d| d <= t) {
                        raw[i].handle_timeout(t);
                        shared[i].handle_timeout(t);
                    }
                    let (a, b) = (drain(&mut raw[i]), drain(&mut shared[i]));
                    assert_eq!(a, b, "transmits of node {i} at {t}");
                    for x in a {
                        let decoded = Decoded::new(src(i), &x.payload, key.as_ref()).unwrap();
                        for j in (0..6).filter(|&j| j != i && !(j == 4 && t > t0 + 1_000)) {
                            if x.dest == Destination::Group
                                || x.dest == Destination::Unicast(src(j))
                            {
                                raw[j].handle_datagram(t, src(i), &x.payload);
                                shared[j].handle_decoded(t, &decoded);
                            }
                        }
                    }
                }
                for i in 0..6 {
                    assert_eq!(events(&mut raw[i]), events(&mut shared[i]), "events at {t}");
                }
            }
            for i in 0..6 {
                assert_eq!(raw[i].stats(), shared[i].stats());
                assert_eq!(raw[i].peers(t0 + 4_000), shared[i].peers(t0 + 4_000));
            }
            assert_eq!(raw[0].peer_count(), 3, "5 left, 4 failed");
            assert!(raw[0].stats().received > 50, "{:?}", raw[0].stats());
        }
        // A datagram decoded with another key (or none) is refused as `handle_datagram`
        // refuses its bytes.
        let key = ClusterKey::from_bytes([5; 32]);
        let me = LocalNode {
            id: Uuid::from_u128(9),
            name: "n9".into(),
            incarnation: 1,
            addr: "0.0.0.0:7000".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
        };
        let mut sender = Discovery::new(Config::default(), me, None, 9, t0).unwrap();
        sender.start(t0);
        let probe = drain(&mut sender).remove(0);
        let mut a = node(1, Some(key.clone()), false);
        let mut b = node(1, Some(key), false);
        a.handle_datagram(t0, addr(9), &probe.payload);
        b.handle_decoded(t0, &Decoded::new(addr(9), &probe.payload, None).unwrap());
        assert_eq!(a.stats(), b.stats());
        assert_eq!(a.stats().dropped_auth, 1);
        assert_eq!(b.peer_count(), 0);
    }

    #[test]
    fn interval_follows_group_size_and_budget() {
        let t = 1_000_000;
        let mut a = node(1, None, false);
        a.start(t);
        assert_eq!(a.compute_interval(), 200);
        for i in 0..2000u128 {
            let mut b = node(10_000 + i, None, false);
            b.start(t);
            let probe = drain(&mut b).remove(0);
            let src = SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 9000));
            a.handle_datagram(t, src, &probe.payload);
        }
        assert_eq!(a.peer_count(), 2001 - 1);
        let interval = a.compute_interval();
        let expected = 2001.0 * a.avg_size * 1000.0 / 64_000.0;
        assert!(
            (interval as f64 - expected).abs() < 2.0,
            "{interval} vs {expected}"
        );
        assert!(interval > 5_000);
    }
}
