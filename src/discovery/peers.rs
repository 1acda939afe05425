//! The peer table: who is known, in what state, and the events its changes make.
//!
//! This module owns [`Peer`] (the public view of one known node), [`PeerEvent`], and the
//! bounded table the protocol core keeps. It applies the rules of identity: one entry
//! per node id, a higher incarnation replaces the entry (a restart), a lower one is
//! stale and ignored. Timing (suspicion, expiry) is the core's business.
//!
//! Entries are small, since a simulation keeps N² of them: what a peer announced is an
//! [`Arc`] of the decoded record (with its source), shared with every other table that
//! keeps the same datagram, and the table is keyed through that record's id rather than
//! a copy of it. An entry is 40 bytes plus the hash table's slack.

use crate::discovery::MemberId;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

use serde::{Deserialize, Serialize};

use crate::discovery::wire::NodeRecord;

/// Milliseconds on the protocol's clock (unix time in a real node, virtual in simulations).
pub type Millis = u64;

/// How a known peer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Heard from recently.
    Alive,
    /// Announcements are overdue; direct probes are checking it.
    Suspect,
}

/// A known peer, as listed by `localnet peers`.
///
/// ```
/// # use localnet::{Peer, PeerState};
/// let json = r#"{"id":"00000000-0000-0000-0000-000000000001","name":"h1","addr":"10.0.0.1:4000",
///   "role":"daemon","state":"alive","tags":{},"last_seen_ms":12,"incarnation":1,
///   "source":"10.0.0.1:4001","interval_ms":200,"ttl_ms":900}"#;
/// let peer: Peer = serde_json::from_str(json).unwrap();
/// assert_eq!(peer.state, PeerState::Alive);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Stable node id.
    pub id: MemberId,
    /// Node name.
    pub name: String,
    /// Transport address (`ip:port`).
    pub addr: SocketAddr,
    /// Role (`daemon`, `slave`, ...).
    pub role: String,
    /// Alive or suspect.
    pub state: PeerState,
    /// Tags the peer announced.
    pub tags: BTreeMap<String, String>,
    /// Milliseconds since the peer was last heard from.
    pub last_seen_ms: u64,
    /// The peer's incarnation (changes when it restarts).
    pub incarnation: u64,
    /// Where its discovery datagrams come from.
    pub source: SocketAddr,
    /// Its announcement interval.
    pub interval_ms: u64,
    /// How long it may stay silent before it is declared failed.
    pub ttl_ms: u64,
    /// How it is known: `multicast` (localnet's own announcements), `mdns` (DNS-SD), or both.
    #[serde(default)]
    pub paths: Vec<String>,
    /// False for a peer known only through mDNS in a cluster with a key: nothing it said
    /// was authenticated yet, and it is not used (as a slave, say) until it is.
    #[serde(default = "yes")]
    pub verified: bool,
    /// For an unverified peer, why: what was refused from it (`clock off by 41 s
    /// (ahead)`, `key mismatch (...)`), or that nothing authenticated was heard yet.
    #[serde(default)]
    pub unverified_reason: Option<String>,
}

fn yes() -> bool {
    true
}

/// A change in the peer table.
///
/// Serialised as `{"event":"joined","peer":{...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "peer", rename_all = "lowercase")]
pub enum PeerEvent {
    /// A new peer.
    Joined(Peer),
    /// A peer changed what it announces, or restarted (new incarnation).
    Updated(Peer),
    /// A peer said goodbye.
    Left(Peer),
    /// A peer went silent past its TTL and did not answer direct probes.
    Failed(Peer),
}

impl PeerEvent {
    /// The peer the event is about.
    pub fn peer(&self) -> &Peer {
        match self {
            PeerEvent::Joined(p)
            | PeerEvent::Updated(p)
            | PeerEvent::Left(p)
            | PeerEvent::Failed(p) => p,
        }
    }

    /// `joined`, `updated`, `left` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerEvent::Joined(_) => "joined",
            PeerEvent::Updated(_) => "updated",
            PeerEvent::Left(_) => "left",
            PeerEvent::Failed(_) => "failed",
        }
    }
}

/// A record as heard: what a peer announced, with its address resolved against the
/// datagram's source, and that source. Immutable once made, so tables share it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Heard {
    pub record: NodeRecord,
    pub source: SocketAddr,
}

impl Heard {
    /// A record received from `source`; an unspecified IP in its address means the
    /// source's IP.
    pub fn new(mut record: NodeRecord, source: SocketAddr) -> Self {
        if record.addr.ip().is_unspecified() {
            record.addr = SocketAddr::new(source.ip(), record.addr.port());
        }
        Self { record, source }
    }
}

/// One entry of the table.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// What the peer announced and where from (shared with other tables).
    heard: Arc<Heard>,
    pub last_heard: Millis,
    pub state: PeerState,
    /// When the next direct probe is due while suspect.
    pub next_probe: Millis,
    /// The deadline of this entry's one live item in the core's timer heap (0: none).
    pub armed_at: Millis,
    /// Heard through localnet's own multicast protocol.
    pub via_multicast: bool,
    /// Seen through mDNS/DNS-SD.
    pub via_mdns: bool,
    /// Its record was authenticated (always, in an open cluster).
    pub verified: bool,
    /// Its expiry was put off once since it was last heard, because this node woke up
    /// too late to judge (see the core's `peer_timer`).
    pub graced: bool,
    /// Its last suspicion round was a multicast ping (the next is a unicast probe).
    pub pinged_last: bool,
    /// While suspect: another observer's ping for it was heard since our last round
    /// (the answer reaches us too; our next round is spared).
    pub round_heard: bool,
}

impl Entry {
    /// What the peer announced, with its address resolved against the source.
    pub fn record(&self) -> &NodeRecord {
        &self.heard.record
    }

    /// Where its datagrams come from.
    pub fn source(&self) -> SocketAddr {
        self.heard.source
    }

    pub fn snapshot(&self, now: Millis) -> Peer {
        let r = self.record();
        Peer {
            id: r.id,
            name: r.name.clone(),
            addr: r.addr,
            role: r.role.clone(),
            state: self.state,
            tags: r.tags.clone(),
            last_seen_ms: now.saturating_sub(self.last_heard),
            incarnation: r.incarnation,
            source: self.heard.source,
            interval_ms: r.interval_ms,
            ttl_ms: r.ttl_ms,
            paths: [("multicast", self.via_multicast), ("mdns", self.via_mdns)]
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(p, _)| p.to_string())
                .collect(),
            verified: self.verified,
            unverified_reason: None,
        }
    }
}

/// Whether `new` differs from `old` in what a listing shows (timing changes do not count).
fn changes_what_users_see(old: &NodeRecord, new: &NodeRecord) -> bool {
    if std::ptr::eq(old, new) {
        return false; // one shared record: nothing to compare
    }
    new.incarnation != old.incarnation
        || new.name != old.name
        || new.addr != old.addr
        || new.role != old.role
        || new.tags != old.tags
}

/// What observing a record did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Observed {
    /// A new entry.
    Joined,
    /// The entry changed in a way users see (or the peer restarted).
    Updated,
    /// Only liveness (and perhaps timing) was refreshed.
    Refreshed,
    /// An older incarnation: ignored.
    Stale,
    /// The table is full: ignored.
    Full,
}

/// What a heartbeat did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// A known peer is alive, and its record is the latest.
    Refreshed,
    /// Its record is needed: the sender is not known (or only through mDNS), restarted
    /// (a higher incarnation), or has a newer record than the one held (a known peer
    /// is refreshed too then).
    NeedRecord,
    /// An older incarnation: ignored.
    Stale,
}

/// The bounded peer table: one [`Entry`] per node id.
#[derive(Debug)]
pub(crate) struct PeerTable {
    entries: HashTable<Entry>,
    hasher: foldhash::fast::RandomState,
    capacity: usize,
}

impl PeerTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            capacity,
        }
    }

    fn hash(&self, id: &MemberId) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The entry of `id`, or where it would go.
    fn slot(&mut self, id: &MemberId) -> Slot<'_, Entry> {
        let hasher = &self.hasher;
        self.entries.entry(
            hasher.hash_one(id),
            |e| e.record().id == *id,
            |e| hasher.hash_one(e.record().id),
        )
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, id: &MemberId) -> Option<&Entry> {
        self.entries.find(self.hash(id), |e| e.record().id == *id)
    }

    pub fn get_mut(&mut self, id: &MemberId) -> Option<&mut Entry> {
        self.entries
            .find_mut(self.hasher.hash_one(id), |e| e.record().id == *id)
    }

    pub fn remove(&mut self, id: &MemberId) -> Option<Entry> {
        match self.slot(id) {
            Slot::Occupied(slot) => Some(slot.remove().0),
            Slot::Vacant(_) => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Records that `heard` (a record and its source) was heard at `now`. Also says
    /// whether the entry is now a multicast one without a timer (new, or known only
    /// through mDNS until now), so that the caller need not look it up again.
    pub fn observe(&mut self, heard: Arc<Heard>, now: Millis) -> (Observed, bool) {
        let len = self.entries.len();
        let capacity = self.capacity;
        match self.slot(&heard.record.id) {
            Slot::Occupied(mut slot) => {
                let entry = slot.get_mut();
                let unarmed = |e: &Entry| e.via_multicast && e.armed_at == 0;
                if heard.record.incarnation < entry.record().incarnation {
                    return (Observed::Stale, unarmed(entry));
                }
                // An older version of the record held (reordered): liveness only.
                if heard.record.incarnation == entry.record().incarnation
                    && heard.record.seq < entry.record().seq
                    && entry.via_multicast
                {
                    entry.last_heard = now;
                    entry.state = PeerState::Alive;
                    entry.graced = false;
                    return (Observed::Refreshed, unarmed(entry));
                }
                let visible_change = changes_what_users_see(entry.record(), &heard.record);
                entry.heard = heard;
                entry.last_heard = now;
                entry.state = PeerState::Alive;
                entry.graced = false;
                let newly_verified = !entry.verified;
                entry.via_multicast = true;
                entry.verified = true;
                let observed = if visible_change || newly_verified {
                    Observed::Updated
                } else {
                    Observed::Refreshed
                };
                (observed, unarmed(entry))
            }
            Slot::Vacant(_) if len >= capacity => (Observed::Full, false),
            Slot::Vacant(slot) => {
                slot.insert(Entry {
                    heard,
                    last_heard: now,
                    state: PeerState::Alive,
                    next_probe: now,
                    armed_at: 0,
                    via_multicast: true,
                    via_mdns: false,
                    verified: true,
                    graced: false,
                    pinged_last: false,
                    round_heard: false,
                });
                (Observed::Joined, true)
            }
        }
    }

    /// Records a heartbeat of `id` (its incarnation and record version) heard at `now`.
    pub fn heartbeat(&mut self, id: MemberId, incarnation: u64, seq: u64, now: Millis) -> Beat {
        let Some(entry) = self.get_mut(&id) else {
            return Beat::NeedRecord;
        };
        let held = entry.record().incarnation;
        if incarnation < held {
            return Beat::Stale;
        }
        if incarnation > held || !entry.via_multicast {
            return Beat::NeedRecord;
        }
        entry.last_heard = now;
        entry.state = PeerState::Alive;
        entry.graced = false;
        match seq > entry.record().seq {
            true => Beat::NeedRecord,
            false => Beat::Refreshed,
        }
    }

    /// Records that mDNS resolved `record` (address already resolved). `trusted` says
    /// whether mDNS data may change an entry (open clusters); with a key it can only add
    /// an unverified entry or mark a known one as also seen through mDNS.
    pub fn observe_mdns(&mut self, mut record: NodeRecord, now: Millis, trusted: bool) -> Observed {
        let len = self.entries.len();
        let capacity = self.capacity;
        match self.slot(&record.id) {
            Slot::Occupied(mut slot) => {
                let entry = slot.get_mut();
                entry.via_mdns = true;
                let may_change = trusted || !entry.verified;
                if !may_change || record.incarnation < entry.record().incarnation {
                    return Observed::Refreshed;
                }
                let visible_change = changes_what_users_see(entry.record(), &record);
                if !visible_change {
                    return Observed::Refreshed;
                }
                // Keep multicast timing when the peer also speaks multicast.
                if entry.via_multicast {
                    record.seq = entry.record().seq;
                    record.interval_ms = entry.record().interval_ms;
                    record.ttl_ms = entry.record().ttl_ms;
                }
                let source = entry.source();
                entry.heard = Arc::new(Heard { record, source });
                Observed::Updated
            }
            Slot::Vacant(_) if len >= capacity => Observed::Full,
            Slot::Vacant(slot) => {
                slot.insert(Entry {
                    heard: Arc::new(Heard {
                        source: record.addr,
                        record,
                    }),
                    last_heard: now,
                    state: PeerState::Alive,
                    next_probe: now,
                    armed_at: 0,
                    via_multicast: false,
                    via_mdns: true,
                    verified: trusted,
                    graced: false,
                    pinged_last: false,
                    round_heard: false,
                });
                Observed::Joined
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u128, incarnation: u64) -> NodeRecord {
        NodeRecord {
            id: MemberId::from_u128(id),
            name: format!("n{id}"),
            incarnation,
            seq: 1,
            addr: "0.0.0.0:5000".parse().unwrap(),
            role: "daemon".into(),
            tags: BTreeMap::new(),
            interval_ms: 200,
            ttl_ms: 900,
        }
    }

    fn heard(record: NodeRecord, source: SocketAddr) -> Arc<Heard> {
        Arc::new(Heard::new(record, source))
    }

    fn src(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn join_refresh_update_and_unspecified_address() {
        let mut t = PeerTable::new(10);
        assert_eq!(
            t.observe(heard(rec(1, 1), src(9000)), 5).0,
            Observed::Joined
        );
        let e = t.get(&MemberId::from_u128(1)).unwrap();
        assert_eq!(e.record().addr, "10.0.0.1:5000".parse().unwrap());
        assert_eq!(e.snapshot(25).last_seen_ms, 20);
        assert_eq!(
            t.observe(heard(rec(1, 1), src(9000)), 10).0,
            Observed::Refreshed
        );
        let mut tagged = rec(1, 1);
        tagged.tags.insert("k".into(), "v".into());
        assert_eq!(t.observe(heard(tagged, src(9000)), 11).0, Observed::Updated);
        let mut slower = rec(1, 1);
        slower.tags.insert("k".into(), "v".into());
        slower.interval_ms = 400;
        slower.ttl_ms = 1800;
        assert_eq!(
            t.observe(heard(slower, src(9000)), 12).0,
            Observed::Refreshed
        );
        assert_eq!(
            t.get(&MemberId::from_u128(1)).unwrap().record().ttl_ms,
            1800
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn restart_replaces_and_stale_incarnation_is_ignored() {
        let mut t = PeerTable::new(10);
        t.observe(heard(rec(1, 5), src(9000)), 0);
        assert_eq!(t.observe(heard(rec(1, 4), src(9000)), 1).0, Observed::Stale);
        assert_eq!(
            t.get(&MemberId::from_u128(1)).unwrap().record().incarnation,
            5
        );
        assert_eq!(
            t.observe(heard(rec(1, 6), src(9100)), 2).0,
            Observed::Updated
        );
        let e = t.get(&MemberId::from_u128(1)).unwrap();
        assert_eq!((e.record().incarnation, e.source()), (6, src(9100)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let mut t = PeerTable::new(3);
        for i in 0..3 {
            assert_eq!(
                t.observe(heard(rec(i, 1), src(9000)), 0).0,
                Observed::Joined
            );
        }
        assert_eq!(t.observe(heard(rec(99, 1), src(9000)), 0).0, Observed::Full);
        assert_eq!(t.len(), 3);
        // Known peers are still refreshed when full.
        assert_eq!(
            t.observe(heard(rec(1, 1), src(9000)), 1).0,
            Observed::Refreshed
        );
        t.remove(&MemberId::from_u128(0));
        assert_eq!(
            t.observe(heard(rec(99, 1), src(9000)), 2).0,
            Observed::Joined
        );
    }

    #[test]
    fn event_json_shape() {
        let mut t = PeerTable::new(3);
        t.observe(heard(rec(1, 1), src(9000)), 0);
        let ev = PeerEvent::Joined(t.get(&MemberId::from_u128(1)).unwrap().snapshot(3));
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "joined");
        assert_eq!(v["peer"]["name"], "n1");
        assert_eq!(v["peer"]["state"], "alive");
        assert_eq!(v["peer"]["last_seen_ms"], 3);
        let back: PeerEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn mdns_paths_and_verification() {
        let mut t = PeerTable::new(10);
        let mut r = rec(1, 1);
        r.addr = "10.0.0.9:5000".parse().unwrap();
        // Keyed cluster: an mDNS-only peer is unverified ...
        assert_eq!(t.observe_mdns(r.clone(), 0, false), Observed::Joined);
        let p = t.get(&MemberId::from_u128(1)).unwrap().snapshot(0);
        assert_eq!(
            (p.paths.clone(), p.verified),
            (vec!["mdns".to_string()], false)
        );
        // ... until its own authenticated announcement arrives.
        assert_eq!(
            t.observe(heard(rec(1, 1), src(9000)), 1).0,
            Observed::Updated
        );
        let p = t.get(&MemberId::from_u128(1)).unwrap().snapshot(1);
        assert_eq!(p.paths, vec!["multicast".to_string(), "mdns".to_string()]);
        assert!(p.verified);
        // Unauthenticated mDNS data cannot change a verified entry.
        let mut forged = r.clone();
        forged.incarnation = 9;
        forged.name = "evil".into();
        assert_eq!(
            t.observe_mdns(forged.clone(), 2, false),
            Observed::Refreshed
        );
        assert_eq!(t.get(&MemberId::from_u128(1)).unwrap().record().name, "n1");
        // In an open cluster it may.
        assert_eq!(t.observe_mdns(forged, 3, true), Observed::Updated);
        assert_eq!(
            t.get(&MemberId::from_u128(1)).unwrap().record().incarnation,
            9
        );
        assert_eq!(t.len(), 1);
    }
}
