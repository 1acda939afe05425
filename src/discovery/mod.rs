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
//!   shortly after. Members answer with an `announce` (their full record) after a random
//!   delay within their *reply window*, which grows with the group: multicast in a small
//!   group (every record fits in a quarter second of the budget: no address resolution,
//!   and whoever else missed it gets it too), unicast in a large one, where a member
//!   with more probes to answer by then than it answers one by one multicasts one
//!   announcement instead; one-shot observers get unicast answers. So a newcomer
//!   learns the LAN in about one round trip. Each answer carries its sender's reply
//!   window, so a one-shot observer knows when no more
//!   answers can come ([`Discovery::settled_at`]) instead of waiting for a timeout.
//! - Members multicast a small `heartbeat` every interval: id, incarnation and the
//!   sequence number of their record. The full record goes out when it changes, in
//!   answers to probes, and at a slow refresh (every ~20 s). A receiver that hears a
//!   heartbeat of a member it does not know, or whose record sequence it lacks, asks
//!   for the record (bounded and rate-limited), and asks again at doubling gaps from
//!   40 ms until it comes: by direct probe, and in a small group every other time by
//!   a multicast `ping`, which the member answers with its record to the group.
//! - The interval follows the RTCP rule (RFC 3550 §6.2): group size × mean datagram
//!   size ÷ traffic budget, never below a floor (280 ms); timers are reconsidered when
//!   they fire, so a growing group slows down at once.
//! - Each record carries the sender's interval and TTL (3.2 intervals: 896 ms at the
//!   floor). A peer not heard for 3/5 of its TTL becomes suspect and is checked every
//!   TTL/36 (24 ms), by a unicast probe and a multicast `ping` in turn (a ping needs
//!   no address resolution; the suspect answers all pings with one multicast
//!   heartbeat, or its record in a small group); it is declared failed only when its
//!   TTL passes with no answer. A node that wakes long after the deadline (a stalled
//!   host) looks once more first.
//! - A `goodbye` removes its sender at once; a higher incarnation replaces an entry.
//! - Every datagram passes a per-source rate limit, then decoding, then (with a key) the
//!   replay check: the sender's microsecond counter must be within the replay window of
//!   our clock and not seen before.
//!
//! Names for a node, so that a reader can tell them apart:
//! - [`MemberId`] (a UUID): *who* a discovery participant is; kept across restarts with
//!   `--state-dir`. Its **incarnation** (a number that grows on every restart) tells
//!   the lives of one member apart. Every id in this module is a `MemberId`.
//! - [`LocalNode`]: our own description, before it is sent; [`wire::NodeRecord`]: the
//!   description as it travels (a `LocalNode` plus the interval and TTL); the mDNS
//!   shell publishes the same as a `node::mdns::MdnsAdvert`.
//! - [`Peer`]: what we know about *another* member (its record plus state, last
//!   seen, paths, verified); [`PeerEvent`]: how that knowledge changes.
//! - `NodeId` (in the runtime, `nid://ip:port`) is *where* a slave's transport listens:
//!   an address, not an identity. It is what Cloud Haskell's SimpleLocalnet calls a node id.

mod admission;
pub mod peers;
// The simulated LAN: only with the `sim` cargo feature, which tests and benches turn on.
#[cfg(feature = "sim")]
pub mod sim;
mod timer;
pub mod wire;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use foldhash::HashMap;
use serde::Serialize;

/// Who a discovery participant is: a UUID, stable across restarts with `--state-dir`
/// (see the module comment for the other names of a node).
pub type MemberId = uuid::Uuid;

use self::admission::{
    Freshness, LogGate, RateLimiter, RateVerdict, Rejections, ReplayGuard, RequestGate,
};
pub use self::admission::{MAX_REJECTIONS, Refusal, Rejection};
use self::timer::{Timer, TimerTable};
use self::wire::{Auth, DecodeError, HEADER_OVERHEAD, Message, NodeRecord};
use crate::discovery::peers::{Beat, Heard, Observed, PeerState, PeerTable};
pub use crate::discovery::peers::{Millis, Peer, PeerEvent};
use crate::key::ClusterKey;

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
    /// When a starting observer sends its second probe (soon, so that a one-shot
    /// discovery settles early; later when the first answers say that the group's
    /// reply window is longer).
    pub observer_second_probe_ms: u64,
    /// How often a member multicasts its full record although nothing changed (a
    /// slow refresh, jittered by ±25 %); heartbeats go out in between.
    pub refresh_ms: u64,
    /// How long after the last possible answer to its probes a node counts its view
    /// as settled ([`Discovery::settled_at`]), plus a quarter of the reply window:
    /// room for scheduling delays on a busy host.
    pub settle_margin_ms: u64,
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
            min_interval_ms: 280,
            max_interval_ms: 120_000,
            budget_bytes_per_sec: 64_000,
            second_probe_ms: 100,
            observer_second_probe_ms: 30,
            refresh_ms: 20_000,
            settle_margin_ms: 20,
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
    pub id: MemberId,
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
/// use localnet::discovery::{Decoded, Destination};
/// # use localnet::discovery::{Config, Discovery, LocalNode, MemberId};
/// # let me = |id: u128| LocalNode {
/// #     id: localnet::MemberId::from_u128(id), name: format!("n{id}"), incarnation: 1,
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
    Heartbeat {
        id: MemberId,
        incarnation: u64,
        seq: u64,
    },
    Announce {
        heard: Arc<Heard>,
        reply_window_ms: u64,
    },
    Probe {
        from: MemberId,
        node: Option<Arc<Heard>>,
        direct: bool,
    },
    Goodbye {
        id: MemberId,
        incarnation: u64,
    },
    Ping {
        from: MemberId,
        target: MemberId,
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
            Message::Heartbeat {
                id,
                incarnation,
                seq,
            } => Body::Heartbeat {
                id,
                incarnation,
                seq,
            },
            Message::Announce {
                node,
                reply_window_ms,
            } => Body::Announce {
                heard: heard(node),
                reply_window_ms,
            },
            Message::Probe { from, node, direct } => Body::Probe {
                from,
                node: node.map(heard),
                direct,
            },
            Message::Goodbye { id, incarnation } => Body::Goodbye { id, incarnation },
            Message::Ping { from, target } => Body::Ping { from, target },
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

    /// Whether it carries its sender's full record (an announcement: an answer to a
    /// probe, a change or a refresh), not a heartbeat, probe or goodbye.
    pub fn is_record(&self) -> bool {
        matches!(self.body, Body::Announce { .. })
    }

    /// The name in the record it carries, if any.
    fn claimed_name(&self) -> Option<String> {
        match &self.body {
            Body::Announce { heard, .. }
            | Body::Probe {
                node: Some(heard), ..
            } => Some(heard.record.name.clone()),
            _ => None,
        }
    }

    /// The node id of the sender.
    pub fn sender(&self) -> MemberId {
        match &self.body {
            Body::Heartbeat { id, .. } => *id,
            Body::Announce { heard, .. } => heard.record.id,
            Body::Probe { from, .. } => *from,
            Body::Goodbye { id, .. } => *id,
            Body::Ping { from, .. } => *from,
        }
    }
}

/// Counters, as `localnet` status shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Datagrams received (counted before the rate limit).
    pub received: u64,
    /// Bytes of the datagrams received, without IP and UDP headers.
    pub received_bytes: u64,
    /// Datagrams queued for sending.
    pub sent: u64,
    /// Bytes of the datagrams queued for sending, without IP and UDP headers.
    pub sent_bytes: u64,
    /// Datagrams dropped because they did not decode (not a message of this version).
    pub dropped_malformed: u64,
    /// Datagrams dropped because they were over [`wire::MAX_DATAGRAM`] bytes.
    pub dropped_oversize: u64,
    /// Datagrams dropped because they carried another protocol version (not 1).
    pub dropped_version: u64,
    /// Datagrams dropped because they were of protocol version 1 (JSON): from a node
    /// running an older localnet.
    pub dropped_legacy: u64,
    /// Requests (direct probes or, in a small group, pings) sent to ask a member heard
    /// only by its heartbeat for its record, retries included.
    pub record_requests: u64,
    /// Probe rounds for a suspect left out because another observer's ping for it
    /// was heard (its answer reaches every observer).
    pub probes_spared: u64,
    /// Datagrams dropped because they were not authenticated with this cluster's key.
    pub dropped_auth: u64,
    /// Authenticated datagrams dropped as replayed, too far off our clock, or from a sender with no room to track.
    pub dropped_replay: u64,
    /// Datagrams dropped because their source exceeded the per-source rate limit.
    pub dropped_rate: u64,
    /// Announcements of new peers ignored because the peer table was full.
    pub dropped_table_full: u64,
    /// Datagrams queued for sending, by kind: records (announcements and answers).
    pub sent_announcements: u64,
    /// Heartbeats queued for sending.
    pub sent_heartbeats: u64,
    /// Probes (group probes and direct ones) queued for sending.
    pub sent_probes: u64,
    /// Pings (of a suspect, or for a record in a small group) queued for sending.
    pub sent_pings: u64,
    /// Goodbyes queued for sending.
    pub sent_goodbyes: u64,
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
    /// Members whose record was asked for lately.
    pub record_requests: usize,
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
    /// The node's announcement would be this many bytes, over [`wire::MAX_DATAGRAM`].
    RecordTooLarge(usize),
    #[error("the node name must not be empty")]
    /// The node's name is empty.
    EmptyName,
}

const GC_EVERY_MS: Millis = 10_000;
/// How long mDNS reports of a node that multicast saw fail or leave are ignored: about
/// an mDNS cache lifetime (RFC 6762 §10: 120 s for address records).
const TOMBSTONE_MS: Millis = 150_000;

/// The discovery state machine of one node.
///
/// ```
/// use localnet::discovery::{Config, Discovery, LocalNode, Destination, MemberId};
/// let me = LocalNode {
///     id: localnet::MemberId::from_u128(1), name: "a".into(), incarnation: 1,
///     addr: "0.0.0.0:7000".parse().unwrap(), role: "daemon".into(), tags: Default::default(),
/// };
/// let mut node = Discovery::new(Config::default(), me, None, 1, 0).unwrap();
/// node.start(0);
/// let probe = node.poll_transmit().unwrap();
/// assert_eq!(probe.dest, Destination::Group);
/// assert_eq!(node.poll_timeout(), Some(100)); // the second probe
/// ```
///
/// An observer tells when its view is complete: no answer to its probes can come
/// after [`Discovery::settled_at`].
///
/// ```
/// use localnet::discovery::{Config, Discovery, LocalNode, MemberId};
/// let me = LocalNode {
///     id: MemberId::from_u128(1), name: "obs".into(), incarnation: 1,
///     addr: "0.0.0.0:7000".parse().unwrap(), role: "observer".into(), tags: Default::default(),
/// };
/// let cfg = Config { observer: true, ..Config::default() };
/// let mut obs = Discovery::new(cfg, me, None, 1, 0).unwrap();
/// obs.start(0);
/// // No answer yet: the longest reply window any group may have, after the second probe.
/// assert!(obs.settled_at().unwrap() > 1000);
/// ```
pub struct Discovery {
    cfg: Config,
    me: NodeRecord,
    key: Option<ClusterKey>,
    last_ctr: u64,
    table: PeerTable,
    /// One live item per peer: (deadline, id); stale items are skipped when popped.
    peer_timers: BinaryHeap<Reverse<(Millis, MemberId)>>,
    /// The node-wide timers (second probe, reply, announcement, garbage collection).
    timers: TimerTable,
    started: bool,
    leaving: bool,
    /// When we last multicast (a heartbeat or our record).
    last_announce: Option<Millis>,
    /// When we last multicast our record (answers to several newcomers are no more
    /// frequent than [`Discovery::answer_gap`]).
    last_record_multicast: Option<Millis>,
    /// When our record is multicast again although nothing changed.
    next_refresh: Millis,
    /// Probes waiting for our answer.
    pending_replies: Pending,
    /// Mean size of a multicast datagram on the wire, headers included (RTCP's
    /// avg_rtcp_size): heartbeats, mostly.
    avg_size: f64,
    /// Size of our record's announcement on the wire, headers included.
    record_size: f64,
    /// When we sent our first and our latest group probe.
    first_probe_at: Option<Millis>,
    last_probe_at: Option<Millis>,
    /// Probes sent so far, and the members known when the last one went out.
    probes_sent: u32,
    known_at_last_probe: usize,
    /// The longest reply window announced by anyone who answered.
    reply_window_heard: Option<u64>,
    /// Which members we asked for their record lately (bounded, rate-limited).
    record_requests: RequestGate,
    rng: fastrand::Rng,
    limiter: RateLimiter,
    replay: ReplayGuard,
    /// Nodes (id, incarnation) that failed or left, with when to forget them.
    tombstones: HashMap<MemberId, (u64, Millis)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    stats: Stats,
    log_gate: LogGate,
    /// Why datagrams were refused, per source (at most [`MAX_REJECTIONS`]).
    rejections: Rejections,
}

/// Who waits for an answer to a probe: up to [`DIRECT_ANSWERS`] observers, and in a
/// large group one member starting, get a unicast answer each, within the reply window;
/// the others get one multicast announcement (so nothing else is stored, and a
/// thousand probes cost no more than five). Observers go first in the unicast list:
/// they settle by the reply window, members do not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pending {
    /// Sources answered by unicast, and whether each is an observer.
    direct: Vec<(SocketAddr, bool)>,
    /// More asked: a multicast answer is due.
    several: bool,
}

/// Most group probes of a one-shot observer: two, and more while each finds members
/// the earlier ones had not (lost answers).
pub const MAX_OBSERVER_PROBES: u32 = 5;
/// What an observer allows for an answer's trip on top of its sender's reply window.
const ANSWER_TRIP_MS: u64 = 5;
/// Most probes answered one by one (by unicast) per reply.
const DIRECT_ANSWERS: usize = 4;
/// The floor of [`Discovery::answer_gap`]: a small group answers newcomers starting
/// together at most every this many milliseconds.
const MIN_ANSWER_GAP_MS: u64 = 10;
/// The longest reply window of any member (the spread of answers in a huge group).
pub const MAX_REPLY_WINDOW_MS: u64 = 1000;
/// How long, once its record came, before a member is asked again for a record (a
/// heartbeat of a newer one); an unanswered request is sent again sooner (see
/// [`RequestGate`]).
const ASK_AGAIN_MS: Millis = 500;

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
            incarnation: me.incarnation,
            addr: me.addr,
            role: me.role,
            tags: me.tags,
            seq: 1,
            interval_ms: cfg.min_interval_ms,
            ttl_ms: ttl_for(cfg.min_interval_ms),
        };
        // Sources and senders are tracked up to twice the peers kept.
        let limiter =
            RateLimiter::new(cfg.rate_per_source, cfg.burst_per_source, 2 * cfg.max_peers);
        let replay = ReplayGuard::new(cfg.replay_window_ms, 2 * cfg.max_peers);
        let mut timers = TimerTable::default();
        timers.set(Timer::Gc, now + GC_EVERY_MS);
        let mut node = Self {
            table: PeerTable::new(cfg.max_peers),
            cfg,
            me,
            key,
            last_ctr: now.saturating_mul(1000),
            peer_timers: BinaryHeap::new(),
            timers,
            started: false,
            leaving: false,
            last_announce: None,
            last_record_multicast: None,
            next_refresh: now,
            pending_replies: Pending::default(),
            avg_size: 0.0,
            record_size: 0.0,
            first_probe_at: None,
            last_probe_at: None,
            probes_sent: 0,
            known_at_last_probe: 0,
            reply_window_heard: None,
            record_requests: RequestGate::new(MAX_RECORD_REQUESTS, ASK_AGAIN_MS),
            rng: fastrand::Rng::with_seed(seed),
            limiter,
            replay,
            tombstones: HashMap::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            log_gate: LogGate::default(),
            rejections: Rejections::default(),
        };
        // Check the largest form of our record now rather than fail later.
        node.largest_announcement()?;
        node.record_size = node.record_wire_size() as f64;
        // What the group multicasts is mostly heartbeats.
        node.avg_size = node.heartbeat_wire_size() as f64;
        Ok(node)
    }

    /// The size on the wire of our heartbeat, headers included.
    fn heartbeat_wire_size(&self) -> usize {
        let auth = self.key.as_ref().map(|k| (k, Auth { ctr: u64::MAX }));
        wire::encode(&self.heartbeat_message(), auth).map_or(0, |b| b.len()) + HEADER_OVERHEAD
    }

    /// The size on the wire of our record's announcement, headers included.
    fn record_wire_size(&self) -> usize {
        let auth = self.key.as_ref().map(|k| (k, Auth { ctr: u64::MAX }));
        let msg = Message::Announce {
            node: self.me.clone(),
            reply_window_ms: MAX_REPLY_WINDOW_MS,
        };
        wire::encode(&msg, auth).map_or(0, |b| b.len()) + HEADER_OVERHEAD
    }

    fn heartbeat_message(&self) -> Message {
        Message::Heartbeat {
            id: self.me.id,
            incarnation: self.me.incarnation,
            seq: self.me.seq,
        }
    }

    /// The size on the wire of our largest possible message, headers included.
    fn largest_announcement(&self) -> Result<usize, ConfigError> {
        let mut big = self.me.clone();
        big.seq = u64::MAX;
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
                let body = postcard::to_allocvec(&msg).map(|b| b.len()).unwrap_or(0);
                Err(ConfigError::RecordTooLarge(body + 26))
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> MemberId {
        self.me.id
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.me.incarnation
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
        match self.rejections.reason_for(peer.id, peer.addr) {
            Some(reason) => reason.to_string(),
            None => "known only through mDNS; no authenticated datagram heard from it".into(),
        }
    }

    /// Sources whose datagrams were refused lately, and why; most recent first.
    pub fn rejections(&self, now: Millis) -> Vec<Rejection> {
        self.rejections.list(now)
    }

    /// The sizes of the internal collections (all bounded).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            peers: self.table.len(),
            timers: self.peer_timers.len(),
            limiter: self.limiter.len(),
            replay: self.replay.len(),
            tombstones: self.tombstones.len(),
            rejections: self.rejections.len(),
            record_requests: self.record_requests.len(),
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
        let second = match self.cfg.observer {
            true => self.cfg.observer_second_probe_ms,
            false => self.cfg.second_probe_ms,
        };
        self.timers.set(Timer::SecondProbe, now + second);
        if !self.cfg.observer {
            let interval = self.compute_interval();
            let at = now + self.jittered(interval);
            self.timers.set(Timer::Announce, at);
            // Our probe carried the record: the first refresh is a refresh period away.
            self.next_refresh = now + self.refresh_gap();
        }
    }

    /// When no more answers to our probes can come, plus a margin: the time after
    /// which a one-shot observer knows every member that answered (see
    /// [`Config::settle_margin_ms`]). It is the last probe's time (sent or due) plus
    /// the longest reply window announced by an answer, so it moves later when an
    /// answer says the group is bigger; with no answer at all it assumes the longest
    /// window any group has ([`MAX_REPLY_WINDOW_MS`]). `None` before [`Discovery::start`]
    /// and when multicast is off (mDNS alone has no such bound).
    pub fn settled_at(&self) -> Option<Millis> {
        if !self.started || !self.cfg.multicast {
            return None;
        }
        // A pending second probe counts as sent; a pending look at the last probe's
        // answers (which may probe again, and then moves this on) is not settled yet.
        let last_probe = self.timers.get(Timer::SecondProbe).or(self.last_probe_at)?;
        let window = self
            .reply_window_heard
            .unwrap_or(MAX_REPLY_WINDOW_MS)
            .min(MAX_REPLY_WINDOW_MS);
        let settled = last_probe + window + self.cfg.settle_margin_ms + window / 4;
        Some(settled.max(self.timers.get(Timer::ProbeAgain).unwrap_or(0)))
    }

    /// Leaves the group: a goodbye (sent twice against loss), then silence.
    pub fn leave(&mut self, now: Millis) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.timers.stop(Timer::SecondProbe);
        self.timers.stop(Timer::ProbeAgain);
        self.timers.stop(Timer::Announce);
        self.timers.stop(Timer::Reply);
        self.pending_replies = Pending::default();
        if self.started && !self.cfg.observer && self.cfg.multicast {
            let bye = Message::Goodbye {
                id: self.me.id,
                incarnation: self.me.incarnation,
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
        self.record_size = self.record_wire_size() as f64;
        if self.started && !self.leaving && !self.cfg.observer && self.cfg.multicast {
            self.me.seq += 1;
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
        let next_peer = self.peer_timers.peek().map(|Reverse((t, _))| *t);
        [self.timers.next_timeout(), next_peer]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Millis) {
        if !self.started || self.leaving {
            return;
        }
        if self.timers.is_expired(Timer::SecondProbe, now) {
            self.timers.stop(Timer::SecondProbe);
            self.send_probe(now);
            if self.cfg.observer {
                self.timers
                    .set(Timer::ProbeAgain, now + self.answers_within());
            }
        }
        if self.timers.is_expired(Timer::ProbeAgain, now) {
            self.timers.stop(Timer::ProbeAgain);
            self.probe_again(now);
        }
        if self.timers.is_expired(Timer::Reply, now) {
            self.timers.stop(Timer::Reply);
            self.answer_probes(now);
        }
        if self.timers.is_expired(Timer::RecordRetry, now) {
            self.retry_record_requests(now);
        }
        if let Some(due) = self.timers.get(Timer::Announce).filter(|t| *t <= now) {
            self.announce_timer(now, due);
        }
        while let Some(Reverse((t, id))) = self.peer_timers.peek().copied() {
            if t > now {
                break;
            }
            self.peer_timers.pop();
            self.peer_timer(now, t, id);
        }
        if self.timers.is_expired(Timer::Gc, now) {
            self.timers.set(Timer::Gc, now + GC_EVERY_MS);
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
                let why = match err {
                    DecodeError::Auth => {
                        Some(match wire::key_mismatch(bytes, self.key.is_some()) {
                            wire::KeyMismatch::OtherKey => Refusal::OtherKey,
                            wire::KeyMismatch::SenderKeyed => Refusal::SenderKeyed,
                            wire::KeyMismatch::SenderUnkeyed => Refusal::SenderUnkeyed,
                        })
                    }
                    DecodeError::Legacy => Some(Refusal::OldVersion),
                    _ => None,
                };
                if let Some(why) = why {
                    self.rejections
                        .record(now, source, why, || wire::claimed_sender(bytes));
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
            self.rejections.record(now, decoded.source, why, || {
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
        let mut verdict = self.limiter.allow(now, source);
        if verdict == RateVerdict::Crowded {
            self.collect_garbage(now);
            verdict = self.limiter.allow(now, source);
        }
        if verdict != RateVerdict::Allowed {
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
            DecodeError::Legacy => self.stats.dropped_legacy += 1,
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
        if let Some(auth) = decoded.auth {
            let mut freshness = self.replay.check(now, sender, auth);
            if freshness == Freshness::Crowded {
                self.collect_garbage(now);
                freshness = self.replay.check(now, sender, auth);
            }
            let why = match freshness {
                Freshness::Fresh => None,
                Freshness::ClockOff { offset_ms } => Some(Some(Refusal::ClockOff { offset_ms })),
                Freshness::Replayed => Some(Some(Refusal::Replayed)),
                // No room to track its sender.
                Freshness::Crowded => Some(None),
            };
            if let Some(refused) = why {
                self.stats.dropped_replay += 1;
                if let Some(why) = refused {
                    self.rejections
                        .record(now, source, why, || Some((sender, decoded.claimed_name())));
                    if let Refusal::ClockOff { .. } = why {
                        self.warn(now, source, &format!("stale datagram: sender's {why}"));
                        return;
                    }
                }
                self.warn(now, source, "replayed or stale datagram");
                return;
            }
        }
        match &decoded.body {
            &Body::Heartbeat {
                id,
                incarnation,
                seq,
            } => {
                let size = (decoded.size + HEADER_OVERHEAD) as f64;
                self.avg_size += (size - self.avg_size) / 16.0;
                self.heartbeat_heard(now, source, id, incarnation, seq);
            }
            Body::Announce {
                heard,
                reply_window_ms,
            } => {
                let size = (decoded.size + HEADER_OVERHEAD) as f64;
                self.avg_size += (size - self.avg_size) / 16.0;
                self.window_heard(*reply_window_ms);
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
                    self.queue_reply(now, source, node.is_none());
                }
            }
            &Body::Ping { target, .. } => self.pinged(now, target),
            &Body::Goodbye { id, incarnation } => {
                if self
                    .table
                    .get(&id)
                    .is_some_and(|e| e.record().incarnation <= incarnation)
                    && let Some(entry) = self.table.remove(&id)
                {
                    self.bury(now, id, entry.record().incarnation);
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
            .is_some_and(|(incarnation, until)| record.incarnation <= *incarnation && now < *until)
        {
            return;
        }
        let id = record.id;
        let trusted = self.key.is_none();
        let observed = self.table.observe_mdns(record, now, trusted);
        self.report(now, id, observed);
    }

    /// mDNS says a node is gone. It leaves the table unless multicast still hears it.
    pub fn mdns_removed(&mut self, now: Millis, id: MemberId) {
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

    /// A heartbeat: refreshes a known peer; asks for the record of a member we do not
    /// know (or know only through mDNS, or in an older version or incarnation).
    fn heartbeat_heard(
        &mut self,
        now: Millis,
        source: SocketAddr,
        id: MemberId,
        incarnation: u64,
        seq: u64,
    ) {
        if self.table.heartbeat(id, incarnation, seq, now) == Beat::NeedRecord {
            self.request_record(now, id, source);
        }
    }

    /// Asks `id` (at `source`) for its record (see [`Discovery::send_record_request`]),
    /// unless a request for it is pending or was answered lately, or too many were sent:
    /// bounded and rate-limited, so that a flood of heartbeats of unknown members makes
    /// no flood of requests. [`RequestGate`] sends it again until the record comes.
    fn request_record(&mut self, now: Millis, id: MemberId, source: SocketAddr) {
        if !self.started || !self.cfg.multicast {
            return;
        }
        let Some(tries) = self.record_requests.allow(now, id, source) else {
            return;
        };
        self.send_record_request(now, id, source, tries);
        self.arm_record_retry();
    }

    /// Sets [`Timer::RecordRetry`] to the next record request due again, if any.
    fn arm_record_retry(&mut self) {
        match self.record_requests.next_retry() {
            Some(at) => self.timers.set(Timer::RecordRetry, at),
            None => self.timers.stop(Timer::RecordRetry),
        }
    }

    /// Asks again the members whose record did not come after a record request (the
    /// request or its answer was lost).
    fn retry_record_requests(&mut self, now: Millis) {
        for (id, source, tries) in self.record_requests.retries_due(now) {
            self.send_record_request(now, id, source, tries);
        }
        self.arm_record_retry();
    }

    /// An answer announced its sender's reply window: our view settles after it. An
    /// observer's second probe goes out only after the first one's answers (a member
    /// that has not answered yet when the second probe comes answers both at once).
    fn window_heard(&mut self, window: u64) {
        let window = window.min(MAX_REPLY_WINDOW_MS);
        if self.reply_window_heard.is_some_and(|w| w >= window) {
            return;
        }
        self.reply_window_heard = Some(window);
        if self.cfg.observer {
            self.not_before_answers(Timer::SecondProbe, self.first_probe_at);
        }
        self.not_before_answers(Timer::ProbeAgain, self.last_probe_at);
    }

    /// Puts `timer`, if set, off until the answers to the probe sent at `probe_at` are
    /// in ([`Discovery::answers_within`] with the longest window heard so far).
    fn not_before_answers(&mut self, timer: Timer, probe_at: Option<Millis>) {
        if let (Some(at), Some(probe_at)) = (self.timers.get(timer), probe_at) {
            let after_answers = probe_at + self.answers_within();
            if after_answers > at {
                self.timers.set(timer, after_answers);
            }
        }
    }

    fn bury(&mut self, now: Millis, id: MemberId, incarnation: u64) {
        // Gone: its record is not asked for again.
        self.record_requests.answered(id);
        if self.tombstones.len() < 2 * self.cfg.max_peers {
            self.tombstones
                .insert(id, (incarnation, now + TOMBSTONE_MS));
        }
    }

    fn observe(&mut self, now: Millis, heard: Arc<Heard>) {
        let id = heard.record.id;
        let (observed, unarmed) = self.table.observe(heard, now);
        // A record came, whether or not there was room for it: no more requests (an
        // older one than we hold does not end them).
        if observed != Observed::Stale {
            self.record_requests.answered(id);
        }
        self.report(now, id, observed);
        // A new peer, or one first seen through mDNS, gets its multicast timer now.
        if unarmed && self.peer_timers.len() >= 2 * self.table.len() + 64 {
            self.compact_timers();
        }
        if unarmed && let Some(entry) = self.table.get_mut(&id) {
            let deadline = suspect_at(entry.last_heard, entry.record().ttl_ms);
            entry.armed_at = deadline;
            arm(&mut self.peer_timers, deadline, id);
        }
    }

    fn report(&mut self, now: Millis, id: MemberId, observed: Observed) {
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
    fn peer_timer(&mut self, now: Millis, fired: Millis, id: MemberId) {
        let Some(entry) = self.table.get_mut(&id) else {
            return;
        };
        if entry.armed_at != fired {
            return; // a stale item of an entry that was removed and added again
        }
        let ttl = entry.record().ttl_ms;
        let expires = entry.last_heard + ttl;
        // Woken long after the deadline, this node was stalled (a busy host): what the
        // peer sent meanwhile is still queued, unread. Probe once more and look again
        // shortly, rather than fail it on stale knowledge (once per silence).
        if now >= expires && now >= fired + LATE_MS && !entry.graced {
            entry.graced = true;
            entry.state = PeerState::Suspect;
            entry.next_probe = now + probe_gap(ttl);
            entry.armed_at = now + LATE_MS;
            arm(&mut self.peer_timers, now + LATE_MS, id);
            let dest = entry.source();
            self.send_direct_probe(now, dest);
            return;
        }
        if now >= expires {
            if let Some(entry) = self.table.remove(&id) {
                self.bury(now, id, entry.record().incarnation);
                self.events
                    .push_back(PeerEvent::Failed(entry.snapshot(now)));
            }
            return;
        }
        let suspect = suspect_at(entry.last_heard, ttl);
        if now < suspect {
            entry.state = PeerState::Alive;
            entry.armed_at = suspect;
            arm(&mut self.peer_timers, suspect, id);
            return;
        }
        if entry.state == PeerState::Alive {
            // The first round within one gap, at random: observers that suspect a peer
            // at the same grid tick do not all probe it in the same millisecond, and
            // the first ping heard spares the others theirs.
            entry.state = PeerState::Suspect;
            entry.round_heard = false;
            entry.next_probe = now + self.rng.u64(0..=probe_gap(ttl) / 2);
        }
        // Rounds alternate: a unicast probe (answered with the record), then a
        // multicast ping (answered by multicast). A ping needs no address
        // resolution: a unicast probe to a host whose ARP entry went stale may wait a
        // second for it, under loss longer than the TTL leaves.
        let mut probe_to = None;
        if now >= entry.next_probe {
            entry.next_probe = now + probe_gap(ttl);
            if std::mem::take(&mut entry.round_heard) {
                self.stats.probes_spared += 1;
            } else {
                let unicast = entry.pinged_last || self.cfg.observer;
                entry.pinged_last = !unicast;
                probe_to = Some((entry.source(), unicast));
            }
        }
        let next = entry.next_probe.min(expires);
        entry.armed_at = next;
        arm(&mut self.peer_timers, next, id);
        match probe_to {
            Some((dest, true)) => self.send_direct_probe(now, dest),
            Some((_, false)) => {
                let ping = Message::Ping {
                    from: self.me.id,
                    target: id,
                };
                self.send(now, Destination::Group, &ping);
            }
            None => {}
        }
    }

    /// A ping for us: a peer suspects us, or (in a small group) lacks our record. One
    /// multicast datagram answers every peer that pinged us at once, so it goes out at
    /// most every [`PING_ANSWER_GAP_MS`]: our record in a small group, a heartbeat in a
    /// large one.
    fn pinged(&mut self, now: Millis, target: MemberId) {
        if target != self.me.id {
            // Another observer pinged a peer we may suspect too: its answer, multicast,
            // reaches us as well, so our own next round is not needed (as
            // mDNS suppresses duplicate questions). A group of N then sends about one
            // ping per round for a suspect, not N.
            if let Some(entry) = self.table.get_mut(&target)
                && entry.state == PeerState::Suspect
            {
                entry.round_heard = true;
            }
            return;
        }
        if self.cfg.observer || !self.started || !self.cfg.multicast {
            return;
        }
        // In a small group the answer is our record: it proves us alive just as well,
        // and a ping is also how a member asks for a record it lacks (see
        // `request_record`). Such a ping comes right after the heartbeat that made it,
        // so only a recent record, not a recent heartbeat, makes it redundant.
        let small = self.small_group();
        let last = match small {
            true => self.last_record_multicast,
            false => self.last_announce,
        };
        if last.is_some_and(|last| now < last + PING_ANSWER_GAP_MS) {
            return;
        }
        if small {
            self.announce(now, Destination::Group);
            return;
        }
        let msg = self.heartbeat_message();
        let interval = self.compute_interval();
        self.multicast_sent(now, interval);
        self.send(now, Destination::Group, &msg);
    }

    /// Whether every member's record fits in a quarter second of the budget: the group
    /// is small enough to answer newcomers and record requests by multicast, which
    /// needs no address resolution (a first unicast datagram to a host waits for ARP,
    /// retried every second when lost) and reaches everyone who missed the record.
    fn small_group(&self) -> bool {
        let records = (self.table.len() as f64 + 1.0) * self.record_size.max(self.avg_size);
        records * 4.0 <= self.cfg.budget_bytes_per_sec as f64
    }

    /// Sends request number `tries` for the record of `id` (heard from `source`): a
    /// direct probe, answered with a unicast record; in a small group every other
    /// request is a multicast ping instead, the first one included, which `id` answers
    /// with its record to the group (no address resolution either way). The direct
    /// probes still get the record from a member that counts the group as large (its
    /// table or its record bigger than ours), which answers pings with a heartbeat.
    fn send_record_request(&mut self, now: Millis, id: MemberId, source: SocketAddr, tries: u32) {
        self.stats.record_requests += 1;
        if tries % 2 == 1 && self.small_group() {
            let ping = Message::Ping {
                from: self.me.id,
                target: id,
            };
            self.send(now, Destination::Group, &ping);
        } else {
            self.send_direct_probe(now, source);
        }
    }

    /// A direct probe: asks one peer for its record, which also proves it alive.
    fn send_direct_probe(&mut self, now: Millis, dest: SocketAddr) {
        let probe = Message::Probe {
            from: self.me.id,
            node: (!self.cfg.observer).then(|| self.me.clone()),
            direct: true,
        };
        self.send(now, Destination::Unicast(dest), &probe);
    }

    /// Drops the heap items that would be skipped when popped (their entry is gone, or
    /// was re-armed since). Peers that leave or fail leave their item behind until its
    /// deadline, which a peer announcing a huge TTL puts out of reach: without this,
    /// peers joining and leaving would grow the heap forever. Run when the heap holds
    /// twice as many items as the table has entries (plus a margin), it costs amortised
    /// O(1) per new peer, and changes nothing else.
    fn compact_timers(&mut self) {
        let table = &self.table;
        self.peer_timers
            .retain(|Reverse((t, id))| table.get(id).is_some_and(|e| e.armed_at == *t));
    }

    fn announce_timer(&mut self, now: Millis, due: Millis) {
        let interval = self.compute_interval();
        // Forward reconsideration (RFC 3550 §6.3.6): the group may have grown since the
        // timer was set; if the new interval has not yet passed, wait for it.
        // But never stay silent longer than the interval peers hold for us: beat then
        // (with a new record when the interval must grow).
        if let Some(last) = self.last_announce {
            let reconsidered = last + interval;
            let advertised = last + self.me.interval_ms;
            if reconsidered > now && reconsidered > due && now < advertised {
                self.timers
                    .set(Timer::Announce, reconsidered.min(advertised));
                return;
            }
        }
        self.beat(now, interval);
    }

    /// The periodic multicast: a heartbeat, or our record when its timing must change
    /// (peers hold our interval and TTL) or its slow refresh is due.
    fn beat(&mut self, now: Millis, interval: u64) {
        if self.retimed(interval).is_some() || now >= self.next_refresh {
            self.announce(now, Destination::Group);
        } else {
            let msg = self.heartbeat_message();
            self.multicast_sent(now, interval);
            if let Some(size) = self.send(now, Destination::Group, &msg) {
                self.avg_size += ((size + HEADER_OVERHEAD) as f64 - self.avg_size) / 16.0;
            }
        }
    }

    /// The interval to advertise when the one in force (`interval`) no longer fits
    /// the advertised one, else `None`. Beats may come faster than advertised but
    /// never slower; advertising with an eighth of headroom above the floor keeps a
    /// slowly growing group from changing its records at every beat (and costs an
    /// eighth more failure detection time), and a group that shrank to less than half
    /// re-advertises (a shorter TTL: faster failure detection).
    fn retimed(&self, interval: u64) -> Option<u64> {
        let advertised = self.me.interval_ms;
        if interval <= advertised && interval >= advertised / 2 {
            return None;
        }
        let headroom = match interval > self.cfg.min_interval_ms {
            true => interval / 8,
            false => 0,
        };
        let new = (interval + headroom).clamp(self.cfg.min_interval_ms, self.cfg.max_interval_ms);
        (new != advertised).then_some(new)
    }

    /// A multicast went out (heartbeat or record): the periodic timer restarts.
    fn multicast_sent(&mut self, now: Millis, interval: u64) {
        self.last_announce = Some(now);
        let at = now + self.jittered(interval);
        self.timers.set(Timer::Announce, at);
    }

    /// Sends our record (with our reply window); a multicast one also resets the
    /// periodic timer and the slow refresh.
    fn announce(&mut self, now: Millis, dest: Destination) {
        if dest == Destination::Group {
            let interval = self.compute_interval();
            if let Some(advertised) = self.retimed(interval) {
                self.me.interval_ms = advertised;
                self.me.ttl_ms = ttl_for(advertised);
                self.me.seq += 1;
            }
            self.multicast_sent(now, interval);
            self.last_record_multicast = Some(now);
            self.next_refresh = now + self.refresh_gap();
        }
        let msg = Message::Announce {
            node: self.me.clone(),
            reply_window_ms: self.reply_window(),
        };
        if let Some(size) = self.send(now, dest, &msg)
            && dest == Destination::Group
        {
            self.avg_size += ((size + HEADER_OVERHEAD) as f64 - self.avg_size) / 16.0;
        }
    }

    /// The time to the next slow refresh of our record: [`Config::refresh_ms`] ± 25 %.
    fn refresh_gap(&mut self) -> u64 {
        let base = self.cfg.refresh_ms;
        base - base / 4 + self.rng.u64(0..=base / 2)
    }

    /// How long after a probe its answers are in: the longest reply window heard, and
    /// [`ANSWER_TRIP_MS`] for the trip (no answer yet: the second probe's usual delay).
    fn answers_within(&self) -> u64 {
        match self.reply_window_heard {
            Some(window) => window.min(MAX_REPLY_WINDOW_MS) + ANSWER_TRIP_MS,
            None => self.cfg.observer_second_probe_ms,
        }
    }

    /// An observer's last probe found members that its earlier probes had not: answers
    /// were lost, and others may be missing still. It probes once more (at most
    /// [`MAX_OBSERVER_PROBES`] in all), which moves [`Discovery::settled_at`] on. A
    /// probe that found nobody new ends it: on a LAN without loss the second probe
    /// finds no one, and nothing is added to the search.
    fn probe_again(&mut self, now: Millis) {
        if self.leaving
            || self.probes_sent >= MAX_OBSERVER_PROBES
            || self.table.len() <= self.known_at_last_probe
        {
            return;
        }
        self.send_probe(now);
        self.timers
            .set(Timer::ProbeAgain, now + self.answers_within());
    }

    fn send_probe(&mut self, now: Millis) {
        self.probes_sent += 1;
        self.known_at_last_probe = self.table.len();
        let probe = Message::Probe {
            from: self.me.id,
            node: (!self.cfg.observer).then(|| self.me.clone()),
            direct: false,
        };
        self.first_probe_at.get_or_insert(now);
        self.last_probe_at = Some(now);
        self.send(now, Destination::Group, &probe);
    }

    /// How long after a group probe we may answer it: the group's answers are spread
    /// so that, all together, they would fit in a quarter second at four times the
    /// budget (fast for small groups, bounded for large ones). Announced in every
    /// answer, so that observers know when no more can come.
    fn reply_window(&self) -> u64 {
        let n = self.table.len() as f64 + 1.0;
        let size = self.avg_size.max(self.record_size);
        let spread = n * size * 1000.0 / (4.0 * self.cfg.budget_bytes_per_sec as f64);
        (spread as u64).clamp(2, MAX_REPLY_WINDOW_MS)
    }

    /// A group probe from `to` (an observer's, if `observer`) waits for our answer.
    fn queue_reply(&mut self, now: Millis, to: SocketAddr, observer: bool) {
        let small = self.small_group();
        let pending = &mut self.pending_replies;
        let mut direct = true;
        if pending.direct.iter().any(|(a, _)| *a == to) {
            return;
        } else if !observer && (small || pending.several || pending.direct.iter().any(|(_, o)| !*o))
        {
            // A member starting in a small group, or a second one starting at once in
            // a large one: one multicast answer serves them all (members do not settle
            // by the window; a mass start answered one by one by every member would be
            // N² datagrams, and a first unicast waits for address resolution). Observers
            // keep their unicast.
            pending.direct.retain(|(_, o)| *o);
            pending.several = true;
            direct = false;
        } else if pending.direct.len() < DIRECT_ANSWERS {
            pending.direct.push((to, observer));
        } else if let Some(slot) = pending.direct.iter_mut().find(|(_, o)| observer && !*o) {
            // A member gives its place to the observer: it gets the multicast answer.
            *slot = (to, true);
            pending.several = true;
        } else {
            pending.several = true;
            direct = false;
        }
        let window = self.reply_window();
        let at = now + self.rng.u64(0..=window);
        // A multicast answer put off for the budget must not make a unicast one late.
        if self
            .timers
            .get(Timer::Reply)
            .is_none_or(|t| direct && t > now + window)
        {
            self.timers.set(Timer::Reply, at);
        }
    }

    fn answer_probes(&mut self, now: Millis) {
        for (to, _) in std::mem::take(&mut self.pending_replies.direct) {
            self.announce(now, Destination::Unicast(to));
        }
        if !self.pending_replies.several {
            return;
        }
        // More newcomers at once are answered with one multicast announcement, but no
        // more often than every answer gap: a group starting all at once then stays
        // near twice its budget instead of answering every probe to everyone.
        if let Some(last) = self.last_record_multicast {
            let earliest = last + self.answer_gap();
            if now < earliest {
                self.timers.set(Timer::Reply, earliest);
                return;
            }
        }
        self.pending_replies.several = false;
        self.announce(now, Destination::Group);
    }

    /// The shortest time between two multicast answers of ours: half the group's
    /// [`budget_interval_ms`](Self::budget_interval_ms) (so half the interval of a group
    /// above the floor, where bursts stay near twice the budget), and at least
    /// [`MIN_ANSWER_GAP_MS`]. A small group at the floor answers a mass start within
    /// milliseconds, not a quarter of the floor.
    fn answer_gap(&self) -> u64 {
        ((self.budget_interval_ms() / 2.0) as u64).max(MIN_ANSWER_GAP_MS)
    }

    /// The interval at which every member's multicast together fills the budget, before
    /// the floor and ceiling of [`Discovery::compute_interval`].
    fn budget_interval_ms(&self) -> f64 {
        let members = self.table.len() as f64 + 1.0;
        members * self.avg_size * 1000.0 / self.cfg.budget_bytes_per_sec as f64
    }

    fn compute_interval(&self) -> u64 {
        (self.budget_interval_ms() as u64).clamp(self.cfg.min_interval_ms, self.cfg.max_interval_ms)
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
                let kind = match msg {
                    Message::Announce { .. } => &mut self.stats.sent_announcements,
                    Message::Heartbeat { .. } => &mut self.stats.sent_heartbeats,
                    Message::Probe { .. } => &mut self.stats.sent_probes,
                    Message::Ping { .. } => &mut self.stats.sent_pings,
                    Message::Goodbye { .. } => &mut self.stats.sent_goodbyes,
                };
                *kind += 1;
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

    fn collect_garbage(&mut self, now: Millis) {
        // A bucket that would be full again carries no information.
        self.limiter.forget_full(now);
        self.replay.forget_stale(now);
        self.tombstones.retain(|_, (_, until)| now < *until);
        self.rejections.forget_stale(now);
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
fn arm(timers: &mut BinaryHeap<Reverse<(Millis, MemberId)>>, at: Millis, id: MemberId) {
    if timers.len() == timers.capacity() {
        timers.reserve_exact((timers.capacity() / 4).max(16));
    }
    timers.push(Reverse((at, id)));
}

/// Most members whose record request is remembered (see [`RequestGate`]).
const MAX_RECORD_REQUESTS: usize = 256;

/// A sender's TTL for its interval: 3.2 intervals (896 ms at the 280 ms floor, so
/// that a killed node is failed everywhere within a second).
fn ttl_for(interval: u64) -> u64 {
    interval * 16 / 5
}

/// When a peer silent since `last_heard` becomes suspect: after 3/5 of its TTL (537
/// ms at the floor: one heartbeat missed and the next not in yet).
///
/// Rounded up to a [`SUSPECT_GRID_MS`] grid, so that one timer wake-up checks many
/// peers: an idle daemon wakes for received datagrams, not for each peer's timer.
fn suspect_at(last_heard: Millis, ttl: u64) -> Millis {
    (last_heard + ttl / 5 * 3).div_ceil(SUSPECT_GRID_MS) * SUSPECT_GRID_MS
}

/// Least time between two multicast answers to pings (after a heartbeat in a large
/// group, after a record in a small one).
const PING_ANSWER_GAP_MS: Millis = 10;

/// How late a peer's timer must fire for this node to count itself stalled, and how
/// long it then gives the peer (see `peer_timer`).
const LATE_MS: Millis = 50;

/// Granularity of suspicion checks (expiry itself stays exact).
const SUSPECT_GRID_MS: Millis = 50;

/// Time between direct probes of a suspect: TTL/36 (24 ms at the floor), so that a
/// dozen probes, each answered, cover the rest of its TTL against loss.
fn probe_gap(ttl: u64) -> u64 {
    (ttl / 36).max(10)
}

#[cfg(test)]
mod tests;
