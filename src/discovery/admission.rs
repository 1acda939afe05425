//! What a datagram must pass before the protocol acts on it, each a small pure type:
//! the per-source rate limit ([`RateLimiter`]), the replay guard of authenticated
//! datagrams ([`ReplayGuard`]), the memory of refused sources ([`Rejections`], what
//! `localnet peers` explains), the gate that keeps dropped-datagram warnings from
//! flooding the log ([`LogGate`]) and the one that bounds what heartbeats of unknown
//! members make us send ([`RequestGate`]).
//!
//! None of them knows the others: when the rate limiter or the replay guard is full it
//! says so ([`RateVerdict::Crowded`], [`Freshness::Crowded`]), and the core forgets what
//! is stale everywhere before asking again.

use crate::discovery::MemberId;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use foldhash::HashMap;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use super::Millis;
use super::wire::Auth;

/// What the rate limiter says of one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RateVerdict {
    /// Within its source's rate.
    Allowed,
    /// Over its source's rate.
    Limited,
    /// From a new source while the limiter holds its most sources: forget what is
    /// stale and ask again (a second `Crowded` is a refusal).
    Crowded,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Millis,
}

/// The token buckets of the per-source rate limit. Every datagram looks its source up
/// here, so an IPv4 source is one `u64` and a lookup is one probe.
pub(crate) struct RateLimiter {
    v4: HashTable<(u64, Bucket)>,
    v6: HashMap<SocketAddrV6, Bucket>,
    hasher: foldhash::fast::RandomState,
    /// Tokens per second.
    rate: f64,
    /// Most tokens a bucket holds.
    burst: f64,
    /// Most sources held.
    cap: usize,
    /// How many sources it holds before its full buckets are forgotten.
    sweep_at: usize,
}

impl RateLimiter {
    /// A limiter of `rate` datagrams per second and bursts of `burst` per source, for
    /// at most `cap` sources.
    pub(crate) fn new(rate: u32, burst: u32, cap: usize) -> Self {
        Self {
            v4: HashTable::new(),
            v6: HashMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            rate: f64::from(rate),
            burst: f64::from(burst),
            cap,
            sweep_at: 64,
        }
    }

    fn key(addr: &SocketAddrV4) -> u64 {
        (u64::from(addr.ip().to_bits()) << 16) | u64::from(addr.port())
    }

    /// How many sources have a bucket.
    pub(crate) fn len(&self) -> usize {
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

    /// Takes a token from `source`'s bucket, which is made full if it has none.
    fn take(&mut self, now: Millis, source: SocketAddr) -> RateVerdict {
        let full = Bucket {
            tokens: self.burst,
            at: now,
        };
        let bucket = match source {
            SocketAddr::V4(a) => {
                let key = Self::key(&a);
                let hasher = &self.hasher;
                let entry = self.v4.entry(
                    hasher.hash_one(key),
                    |(k, _)| *k == key,
                    |(k, _)| hasher.hash_one(*k),
                );
                &mut entry.or_insert((key, full)).into_mut().1
            }
            SocketAddr::V6(a) => self.v6.entry(a).or_insert(full),
        };
        let elapsed = now.saturating_sub(bucket.at) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            RateVerdict::Allowed
        } else {
            RateVerdict::Limited
        }
    }

    /// Whether a datagram from `source` at `now` is within its rate.
    pub(crate) fn allow(&mut self, now: Millis, source: SocketAddr) -> RateVerdict {
        let len = self.len();
        if (len < self.cap && len < self.sweep_at) || self.contains(&source) {
            return self.take(now, source);
        }
        if len >= self.cap {
            return RateVerdict::Crowded;
        }
        // Forget full buckets rather than grow. Still more than half the threshold:
        // raise it, so that these sweeps stay amortised O(1) per datagram.
        self.forget_full(now);
        if self.len() > self.sweep_at / 2 {
            self.sweep_at *= 2;
        }
        self.take(now, source)
    }

    /// Forgets the buckets that would be full again: a missing bucket is a full one, so
    /// this changes no decision. Run whenever the limiter reaches its threshold, it keeps
    /// the limiter at the sources heard in the last couple of seconds instead of every
    /// source heard since the last garbage collection (every node, for each node, after
    /// a simultaneous start).
    pub(crate) fn forget_full(&mut self, now: Millis) {
        let (rate, burst) = (self.rate, self.burst);
        let full = |b: &Bucket| b.tokens + now.saturating_sub(b.at) as f64 / 1000.0 * rate >= burst;
        self.v4.retain(|(_, b)| !full(b));
        self.v6.retain(|_, b| !full(b));
    }
}

/// What the replay guard says of one authenticated datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Within the replay window and not seen before.
    Fresh,
    /// The sender's clock is `offset_ms` from ours (positive: ahead), beyond the window.
    ClockOff {
        /// The sender's clock minus ours, in ms.
        offset_ms: i64,
    },
    /// A counter seen before, or too far behind the sender's newest.
    Replayed,
    /// From a new sender while the guard tracks its most senders: forget what is stale
    /// and ask again (a second `Crowded` is a refusal).
    Crowded,
}

/// How far behind the newest counter of a sender a reordered datagram may be (µs).
const REORDER_US: u64 = 1_000_000;
/// Counters remembered per sender.
const RECENT_COUNTERS: usize = 64;

#[derive(Clone, Debug)]
struct SenderCounters {
    newest: u64,
    recent: VecDeque<u64>,
    heard: Millis,
}

/// The replay check of authenticated datagrams: a sender's microsecond counter must be
/// within the replay window of our clock and not seen before.
pub(crate) struct ReplayGuard {
    senders: HashMap<MemberId, SenderCounters>,
    window_ms: u64,
    /// Most senders tracked.
    cap: usize,
}

impl ReplayGuard {
    /// A guard accepting clocks `window_ms` from ours, tracking at most `cap` senders.
    pub(crate) fn new(window_ms: u64, cap: usize) -> Self {
        Self {
            senders: HashMap::default(),
            window_ms,
            cap,
        }
    }

    /// How many senders are tracked.
    pub(crate) fn len(&self) -> usize {
        self.senders.len()
    }

    /// Checks, and if fresh records, a datagram of `sender` at `now`.
    pub(crate) fn check(&mut self, now: Millis, sender: MemberId, auth: Auth) -> Freshness {
        if auth.timestamp_ms().abs_diff(now) > self.window_ms {
            let offset = i128::from(auth.timestamp_ms()) - i128::from(now);
            let offset_ms = offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            return Freshness::ClockOff { offset_ms };
        }
        if !self.senders.contains_key(&sender) && self.senders.len() >= self.cap {
            return Freshness::Crowded;
        }
        let state = self.senders.entry(sender).or_insert(SenderCounters {
            newest: 0,
            recent: VecDeque::new(),
            heard: now,
        });
        if auth.ctr.saturating_add(REORDER_US) <= state.newest || state.recent.contains(&auth.ctr) {
            return Freshness::Replayed;
        }
        state.newest = state.newest.max(auth.ctr);
        state.heard = now;
        if state.recent.len() == RECENT_COUNTERS {
            state.recent.pop_front();
        }
        state.recent.push_back(auth.ctr);
        Freshness::Fresh
    }

    /// Forgets senders not heard within the window: their old counters are refused by
    /// the clock check anyway.
    pub(crate) fn forget_stale(&mut self, now: Millis) {
        let window = self.window_ms;
        self.senders
            .retain(|_, s| now.saturating_sub(s.heard) <= window);
    }
}

/// Record requests per second, sustained ([`RequestGate`]).
const REQUESTS_PER_SEC: f64 = 64.0;
/// Record requests in a burst ([`RequestGate`]).
const REQUEST_BURST: f64 = 64.0;

/// First wait before a record request that brought no record is sent again; the wait
/// doubles with each request, up to [`TIMED_MAX_GAP_MS`], then [`RETRY_MAX_GAP_MS`]
/// ([`RequestGate`]).
const RETRY_FIRST_MS: Millis = 40;
/// The longest wait between two timed requests.
const TIMED_MAX_GAP_MS: Millis = 160;
/// The longest wait between two requests once the timed ones are spent.
const RETRY_MAX_GAP_MS: Millis = 2_000;
/// Requests up to which the next is sent on a timer, without waiting for a heartbeat
/// (under loss the next one may be far off): the first (on a heartbeat) and seven
/// retries within a second. At 20 % loss each way all eight go unanswered once in
/// 3500 pairs.
const TIMED_TRIES: u32 = 8;

/// Whether to ask a member heard only by its heartbeat for its record, and when to ask
/// again. A member whose record does not come is asked again after
/// [`RETRY_FIRST_MS`], then after twice that and so on: up to [`TIMED_TRIES`] requests
/// in all on a timer, at most [`TIMED_MAX_GAP_MS`] apart, later ones when a heartbeat
/// is heard, at most every [`RETRY_MAX_GAP_MS`]. Once its record came, a member is
/// asked again at most every `again_ms` (a heartbeat of a newer record). At most
/// [`REQUEST_BURST`] requests go out in a burst and [`REQUESTS_PER_SEC`] sustained,
/// retries included, and at most `cap` members are remembered.
#[derive(Debug)]
pub(crate) struct RequestGate {
    asked: HashMap<MemberId, Asked>,
    cap: usize,
    again_ms: Millis,
    tokens: f64,
    at: Millis,
}

/// One member asked for its record.
#[derive(Clone, Copy, Debug)]
struct Asked {
    /// When it was asked last.
    last: Millis,
    /// Where its heartbeat came from.
    source: SocketAddr,
    /// Requests sent since its record last came.
    tries: u32,
    /// Whether its record came after the last request.
    answered: bool,
}

impl Asked {
    /// The earliest time it may be asked again.
    fn next_ask(&self, again_ms: Millis) -> Millis {
        match self.answered {
            true => self.last + again_ms,
            false => {
                let cap = match self.tries < TIMED_TRIES {
                    true => TIMED_MAX_GAP_MS,
                    false => RETRY_MAX_GAP_MS,
                };
                self.last + (RETRY_FIRST_MS << self.tries.saturating_sub(1).min(16)).min(cap)
            }
        }
    }

    /// When it is asked again without a heartbeat, if it is.
    fn retry_at(&self) -> Option<Millis> {
        (!self.answered && self.tries < TIMED_TRIES).then(|| self.next_ask(0))
    }
}

impl RequestGate {
    /// A gate remembering at most `cap` members, asking each at most every `again_ms`
    /// once its record came.
    pub(crate) fn new(cap: usize, again_ms: Millis) -> Self {
        Self {
            asked: HashMap::default(),
            cap,
            again_ms,
            tokens: REQUEST_BURST,
            at: 0,
        }
    }

    /// How many members are remembered.
    pub(crate) fn len(&self) -> usize {
        self.asked.len()
    }

    fn take_token(&mut self, now: Millis) -> bool {
        let elapsed = now.saturating_sub(self.at) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * REQUESTS_PER_SEC).min(REQUEST_BURST);
        self.at = self.at.max(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Whether `id` (heard from `source`) may be asked for its record now: if so, counts
    /// the request and says which it is (1 for the first since its record last came).
    pub(crate) fn allow(&mut self, now: Millis, id: MemberId, source: SocketAddr) -> Option<u32> {
        let again = self.again_ms;
        if self.asked.get(&id).is_some_and(|a| now < a.next_ask(again)) {
            return None;
        }
        if self.asked.len() >= self.cap && !self.asked.contains_key(&id) {
            // Forget the members that may be asked again anyway, unless a retry is due.
            self.asked
                .retain(|_, a| now < a.next_ask(again) || a.retry_at().is_some());
            if self.asked.len() >= self.cap {
                return None;
            }
        }
        if !self.take_token(now) {
            return None;
        }
        // Counting starts again once a record came.
        let tries = match self.asked.get(&id) {
            Some(a) if !a.answered => a.tries + 1,
            _ => 1,
        };
        let asked = Asked {
            last: now,
            source,
            tries,
            answered: false,
        };
        self.asked.insert(id, asked);
        Some(tries)
    }

    /// The record of `id` came: no more retries for it.
    pub(crate) fn answered(&mut self, id: MemberId) {
        if let Some(asked) = self.asked.get_mut(&id) {
            asked.answered = true;
        }
    }

    /// When the next timed retry is due, if any.
    pub(crate) fn next_retry(&self) -> Option<Millis> {
        self.asked.values().filter_map(Asked::retry_at).min()
    }

    /// The timed retries due at `now` (member, where to ask it, which request it is),
    /// counted as sent, in member order (so that a simulation is the same on every
    /// run); those over the rate are put off until a token is back.
    pub(crate) fn retries_due(&mut self, now: Millis) -> Vec<(MemberId, SocketAddr, u32)> {
        let mut due: Vec<MemberId> = self
            .asked
            .iter()
            .filter(|(_, a)| a.retry_at().is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        let mut send = Vec::with_capacity(due.len());
        for id in due {
            let allowed = self.take_token(now);
            let Some(asked) = self.asked.get_mut(&id) else {
                continue;
            };
            if allowed {
                asked.last = now;
                asked.tries += 1;
                send.push((id, asked.source, asked.tries));
            } else {
                // Due again when the bucket has refilled one token.
                let refill = (1000.0 / REQUESTS_PER_SEC).ceil() as Millis;
                let gap = asked.next_ask(0) - asked.last;
                asked.last = (now + refill).saturating_sub(gap);
            }
        }
        send
    }
}

/// How often a [`LogGate`] lets a warning through.
const LOG_EVERY_MS: Millis = 10_000;

/// Lets one warning through per period and counts the rest.
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    next: Millis,
    suppressed: u64,
}

impl LogGate {
    /// `Some(suppressed)` when a warning may be logged now, with how many were held
    /// back since the last one; `None` (and one more held back) otherwise.
    pub(crate) fn allow(&mut self, now: Millis) -> Option<u64> {
        if now >= self.next {
            self.next = now + LOG_EVERY_MS;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
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
    /// The sender speaks protocol version 1 (JSON datagrams): it runs an older localnet.
    OldVersion,
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
            Refusal::OldVersion => write!(
                f,
                "protocol version 1 (an older localnet): run the same localnet version everywhere"
            ),
        }
    }
}

/// Datagrams refused from one source, as [`Discovery::rejections`](super::Discovery::rejections)
/// lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Where they came from.
    pub source: SocketAddr,
    /// The node id they claim (not authenticated when the key did not match).
    pub id: Option<MemberId>,
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
    id: Option<MemberId>,
    name: Option<String>,
    reason: Refusal,
    count: u64,
    last_at: Millis,
}

/// Why datagrams were refused, per source: at most [`MAX_REJECTIONS`] sources, each
/// for [`REJECTION_MEMORY_MS`] after its latest refusal.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    entries: Vec<RejectionEntry>,
}

impl Rejections {
    /// How many sources are remembered.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Remembers that a datagram from `source` was refused for `why`. `claimed` gives
    /// the id and name it claims; it is asked only for a source not known yet (or
    /// known without a name).
    pub(crate) fn record(
        &mut self,
        now: Millis,
        source: SocketAddr,
        why: Refusal,
        claimed: impl FnOnce() -> Option<(MemberId, Option<String>)>,
    ) {
        if let Some(entry) = self.entries.iter_mut().find(|r| r.source == source) {
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
        if self.entries.len() >= MAX_REJECTIONS
            && let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.last_at)
                .map(|(i, _)| i)
        {
            self.entries.swap_remove(oldest);
        }
        let (id, name) = claimed().map_or((None, None), |(id, name)| (Some(id), name));
        self.entries.push(RejectionEntry {
            source,
            id,
            name,
            reason: why,
            count: 1,
            last_at: now,
        });
    }

    /// Why datagrams of the node `id` at `addr` were refused: by its id, else its IP.
    pub(crate) fn reason_for(&self, id: MemberId, addr: SocketAddr) -> Option<Refusal> {
        let by_id = self.entries.iter().find(|r| r.id == Some(id));
        let by_ip = || self.entries.iter().find(|r| r.source.ip() == addr.ip());
        by_id.or_else(by_ip).map(|r| r.reason)
    }

    /// The sources remembered, most recent first.
    pub(crate) fn list(&self, now: Millis) -> Vec<Rejection> {
        let mut out: Vec<Rejection> = self
            .entries
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

    /// Forgets the sources not refused for [`REJECTION_MEMORY_MS`].
    pub(crate) fn forget_stale(&mut self, now: Millis) {
        self.entries
            .retain(|r| now.saturating_sub(r.last_at) <= REJECTION_MEMORY_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from_bits(0x0a00_0000 + i), 9000))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut limiter = RateLimiter::new(10, 5, 100);
        let allowed = (0..8)
            .filter(|_| limiter.allow(0, v4(1)) == RateVerdict::Allowed)
            .count();
        assert_eq!(allowed, 5);
        // 10 per second: one token every 100 ms.
        assert_eq!(limiter.allow(50, v4(1)), RateVerdict::Limited);
        assert_eq!(limiter.allow(150, v4(1)), RateVerdict::Allowed);
        assert_eq!(limiter.allow(150, v4(1)), RateVerdict::Limited);
        // Another source has a bucket of its own, IPv6 too.
        assert_eq!(limiter.allow(150, v4(2)), RateVerdict::Allowed);
        let v6: SocketAddr = "[fe80::1]:9000".parse().unwrap();
        assert_eq!(limiter.allow(150, v6), RateVerdict::Allowed);
        assert_eq!(limiter.len(), 3);
    }

    #[test]
    fn the_limiter_forgets_full_buckets_and_says_when_it_is_crowded() {
        let mut limiter = RateLimiter::new(10, 5, 200);
        for i in 0..64 {
            assert_eq!(limiter.allow(0, v4(i)), RateVerdict::Allowed);
        }
        assert_eq!(limiter.len(), 64);
        // At the sweep threshold, a new source sweeps the buckets that are full again
        // (all of them after a second), so the limiter does not grow.
        assert_eq!(limiter.allow(1000, v4(64)), RateVerdict::Allowed);
        assert_eq!(limiter.len(), 1);
        // A known source never sweeps and never is crowded.
        let mut small = RateLimiter::new(10, 5, 2);
        assert_eq!(small.allow(0, v4(1)), RateVerdict::Allowed);
        assert_eq!(small.allow(0, v4(2)), RateVerdict::Allowed);
        assert_eq!(small.allow(0, v4(3)), RateVerdict::Crowded);
        assert_eq!(small.allow(0, v4(1)), RateVerdict::Allowed);
        // Forgetting full buckets makes room.
        small.forget_full(1000);
        assert_eq!(small.len(), 0);
        assert_eq!(small.allow(1000, v4(3)), RateVerdict::Allowed);
    }

    fn auth_at(ms: Millis, extra_us: u64) -> Auth {
        Auth {
            ctr: ms * 1000 + extra_us,
        }
    }

    #[test]
    fn the_replay_guard_refuses_repeats_old_counters_and_far_clocks() {
        let mut guard = ReplayGuard::new(30_000, 10);
        let a = MemberId::from_u128(1);
        let t = 1_000_000;
        assert_eq!(guard.check(t, a, auth_at(t, 5)), Freshness::Fresh);
        assert_eq!(guard.check(t, a, auth_at(t, 5)), Freshness::Replayed);
        // Reordering within a second is fine; further back is a replay.
        assert_eq!(guard.check(t, a, auth_at(t, 1)), Freshness::Fresh);
        assert_eq!(
            guard.check(t + 2000, a, auth_at(t + 2000, 0)),
            Freshness::Fresh
        );
        assert_eq!(guard.check(t + 2000, a, auth_at(t, 2)), Freshness::Replayed);
        // Another sender's counters are its own.
        assert_eq!(
            guard.check(t, MemberId::from_u128(2), auth_at(t, 5)),
            Freshness::Fresh
        );
        assert_eq!(
            guard.check(t, a, auth_at(t + 31_000, 0)),
            Freshness::ClockOff { offset_ms: 31_000 }
        );
        assert_eq!(
            guard.check(t, a, auth_at(t - 40_000, 0)),
            Freshness::ClockOff { offset_ms: -40_000 }
        );
    }

    #[test]
    fn the_replay_guard_is_bounded_and_forgets_silent_senders() {
        let mut guard = ReplayGuard::new(30_000, 2);
        let t = 1_000_000;
        for id in 1..=2 {
            assert_eq!(
                guard.check(t, MemberId::from_u128(id), auth_at(t, 0)),
                Freshness::Fresh
            );
        }
        let third = MemberId::from_u128(3);
        assert_eq!(guard.check(t, third, auth_at(t, 0)), Freshness::Crowded);
        guard.forget_stale(t + 30_000);
        assert_eq!(guard.len(), 2);
        guard.forget_stale(t + 30_001);
        assert_eq!(guard.len(), 0);
        let later = t + 30_001;
        assert_eq!(
            guard.check(later, third, auth_at(later, 0)),
            Freshness::Fresh
        );
    }

    #[test]
    fn record_requests_are_spaced_per_member_rate_limited_and_bounded() {
        let mut gate = RequestGate::new(100, 500);
        let a = MemberId::from_u128(1);
        let src = SocketAddr::from(([10, 0, 0, 1], 4242));
        assert!(gate.allow(1000, a, src).is_some());
        gate.answered(a);
        assert!(gate.allow(1100, a, src).is_none(), "answered lately");
        assert!(gate.allow(1500, a, src).is_some());
        gate.answered(a);
        // A burst of new members: the bucket ends it, then refills at its rate.
        let allowed = (2..200u128)
            .filter(|&i| gate.allow(1500, MemberId::from_u128(i), src).is_some())
            .count();
        assert_eq!(allowed, REQUEST_BURST as usize - 1);
        assert!(gate.allow(1500, MemberId::from_u128(1000), src).is_none());
        // 100 ms refill 6.4 requests: six of the 63 retries due, the rest wait.
        assert_eq!(gate.retries_due(1600).len(), 6, "retries take tokens too");
        assert_eq!(
            gate.next_retry(),
            Some(1616),
            "the rest once a token is back"
        );
        assert!(gate.allow(1600, MemberId::from_u128(1000), src).is_none());
        assert!(
            gate.allow(1620, MemberId::from_u128(1000), src).is_some(),
            "refilled"
        );
        // Never more than `cap` remembered.
        let mut small = RequestGate::new(4, 500);
        for i in 0..4 {
            assert!(small.allow(0, MemberId::from_u128(i), src).is_some());
            small.answered(MemberId::from_u128(i));
        }
        assert!(small.allow(0, MemberId::from_u128(9), src).is_none());
        assert_eq!(small.len(), 4);
        assert!(
            small.allow(600, MemberId::from_u128(9), src).is_some(),
            "the stale are forgotten"
        );
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn a_request_without_its_record_is_sent_again_at_doubling_gaps() {
        let mut gate = RequestGate::new(100, 500);
        let (a, b) = (MemberId::from_u128(1), MemberId::from_u128(2));
        let (src_a, src_b) = (
            SocketAddr::from(([10, 0, 0, 1], 4242)),
            SocketAddr::from(([10, 0, 0, 2], 4242)),
        );
        assert!(gate.allow(0, a, src_a).is_some());
        assert!(gate.allow(10, b, src_b).is_some());
        assert!(
            gate.allow(20, a, src_a).is_none(),
            "a heartbeat does not hurry a retry"
        );
        assert_eq!(gate.next_retry(), Some(RETRY_FIRST_MS));
        assert!(gate.retries_due(RETRY_FIRST_MS - 1).is_empty());
        assert_eq!(gate.retries_due(RETRY_FIRST_MS), vec![(a, src_a, 2)]);
        gate.answered(b);
        let mut sent = vec![0, RETRY_FIRST_MS];
        while let Some(at) = gate.next_retry() {
            let tries = sent.len() as u32 + 1;
            assert_eq!(gate.retries_due(at), vec![(a, src_a, tries)], "b answered");
            sent.push(at);
        }
        assert_eq!(
            sent,
            vec![0, 40, 120, 280, 440, 600, 760, 920],
            "{TIMED_TRIES} timed tries"
        );
        // Then heartbeats ask, at the longest gap.
        assert!(gate.allow(920 + RETRY_MAX_GAP_MS - 1, a, src_a).is_none());
        let mut t = 920;
        for _ in 0..3 {
            t += RETRY_MAX_GAP_MS;
            assert!(gate.allow(t, a, src_a).is_some());
        }
        assert_eq!(gate.next_retry(), None, "heartbeats ask, not the timer");
        // Its record came: the next heartbeat of a newer one asks after `again_ms`.
        gate.answered(a);
        assert!(gate.allow(t + 499, a, src_a).is_none());
        assert!(gate.allow(t + 500, a, src_a).is_some());
        assert_eq!(
            gate.next_retry(),
            Some(t + 500 + RETRY_FIRST_MS),
            "from the start"
        );
    }

    #[test]
    fn the_log_gate_lets_one_through_per_period_and_counts_the_rest() {
        let mut gate = LogGate::default();
        assert_eq!(gate.allow(5), Some(0));
        assert_eq!(gate.allow(6), None);
        assert_eq!(gate.allow(10_004), None);
        assert_eq!(gate.allow(10_005), Some(2));
        assert_eq!(gate.allow(20_005), Some(0));
    }

    #[test]
    fn rejections_keep_the_latest_reason_per_source_and_are_bounded() {
        let mut memory = Rejections::default();
        let id = MemberId::from_u128(9);
        memory.record(0, v4(1), Refusal::OtherKey, || None);
        // A name learnt later is kept; the reason is the latest one.
        memory.record(10, v4(1), Refusal::Replayed, || {
            Some((id, Some("n9".into())))
        });
        let list = memory.list(20);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason, Refusal::Replayed);
        assert_eq!((list[0].count, list[0].last_ms_ago), (2, 10));
        assert_eq!(list[0].name.as_deref(), Some("n9"));
        assert_eq!(memory.reason_for(id, v4(7)), Some(Refusal::Replayed));
        assert_eq!(
            memory.reason_for(MemberId::from_u128(8), SocketAddr::from(([10, 0, 0, 1], 1))),
            Some(Refusal::Replayed),
            "found by IP"
        );
        assert_eq!(memory.reason_for(MemberId::from_u128(8), v4(2)), None);
        for i in 2..=(MAX_REJECTIONS as u32 + 1) {
            memory.record(100 + u64::from(i), v4(i), Refusal::OtherKey, || None);
        }
        assert_eq!(memory.len(), MAX_REJECTIONS);
        assert!(
            memory.list(1000).iter().all(|r| r.source != v4(1)),
            "oldest forgotten"
        );
        memory.forget_stale(100 + MAX_REJECTIONS as u64 + 1 + REJECTION_MEMORY_MS);
        assert_eq!(memory.len(), 1);
    }
}
