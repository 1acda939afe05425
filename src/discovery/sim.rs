//! A simulated LAN for the sans-IO core: many nodes, one process, virtual time.
//!
//! This module owns the simulator used by the simulation tests and the simulation
//! benchmark (`benches/sim.rs`). Each node is a real [`Discovery`]; the "network" is a
//! priority queue of deliveries with settable loss and delay; multicast reaches every
//! other running node, each copy lost and delayed independently. Everything is driven by
//! one seeded RNG, so a run is reproducible.
//!
//! Built to run 10 000 nodes: each datagram is decoded once when sent (and a sender's
//! repeated identical datagram reuses the decoding), and every core gets the shared
//! [`Decoded`] through [`Discovery::handle_decoded`]; one queue item carries a datagram to
//! all recipients that get it after the same delay. Those recipients are independent
//! (each core only changes itself, and what they send arrives later), so a large batch
//! is handed out on [`SimConfig::threads`] threads; what each node then sends and
//! reports is applied in recipient order, so a run is the same whatever the threads.
//!
//! One-shot observers ([`Sim::add_observer`]) can join a running LAN: the records
//! they receive are logged ([`Sim::records_to_observers`]) beside their settled time
//! ([`Sim::settled_at`]), which is what the settled-discovery tests check.
//!
//! ```
//! use localnet::discovery::sim::{Sim, SimConfig};
//! let mut sim = Sim::new(SimConfig { nodes: 10, ..SimConfig::default() });
//! sim.start_all(0, 0);
//! let converged = sim.run_until_converged(5_000).expect("10 nodes converge");
//! assert!(converged < 100);
//! ```

use crate::discovery::MemberId;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;

use crate::discovery::wire::HEADER_OVERHEAD;
use crate::discovery::{
    Config, Decoded, Destination, Discovery, LocalNode, Millis, PeerEvent, Transmit,
};
use crate::key::ClusterKey;

/// Virtual time starts here: close to a real unix time in ms, so that keyed nodes'
/// counters look like real clocks.
pub const EPOCH: Millis = 1_800_000_000_000;

/// Fewest recipients of one delivery worth a second thread.
const PARALLEL_MIN: usize = 512;

/// The simulated LAN's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// How many nodes.
    pub nodes: usize,
    /// Probability that one copy of a datagram is lost.
    pub loss: f64,
    /// Smallest one-way delay, ms.
    pub min_delay_ms: u64,
    /// Largest one-way delay, ms.
    pub max_delay_ms: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Cluster key, if any.
    pub key: Option<ClusterKey>,
    /// Protocol settings of every node.
    pub protocol: Config,
    /// Whether a unicast datagram needs its sender to resolve the recipient's link
    /// address first, as ARP does on a LAN (default: no). The first unicast from one
    /// node to another sends a resolution request (lost like any copy) whose answer
    /// (lost too) lets it and any sent meanwhile go; an unanswered request is sent
    /// again after [`ARP_RETRY_MS`], [`ARP_TRIES`] times in all (Linux's defaults),
    /// after which what waited is dropped. A node that receives a request for itself
    /// learns the asker's address (as Linux does). Multicast needs no resolution. Under
    /// loss this is what makes a first unicast answer late by a second.
    pub neighbour_resolution: bool,
    /// Which events go into [`Sim::seen`] (default: all). With thousands of nodes the
    /// N² `joined` events alone would take gigabytes.
    pub keep: fn(&PeerEvent) -> bool,
    /// Threads that hand out one datagram to many nodes (1 or 2; the results do not
    /// depend on it).
    pub threads: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 10,
            loss: 0.0,
            min_delay_ms: 1,
            max_delay_ms: 2,
            seed: 1,
            key: None,
            protocol: Config::default(),
            keep: |_| true,
            threads: 1,
            neighbour_resolution: false,
        }
    }
}

/// An event seen by one node, with the (virtual) time it happened.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Virtual ms since [`EPOCH`].
    pub at: Millis,
    /// Index of the node that saw it.
    pub by: usize,
    /// The event.
    pub event: PeerEvent,
}

/// A datagram as the simulated network carries it (one per datagram, behind an `Rc`:
/// the size of its variants does not matter).
#[allow(clippy::large_enum_variant)]
enum Packet {
    /// Decoded once for every recipient; with a second thread, decoded once more for
    /// the recipients it serves, so that the threads share no reference counts.
    Decoded(Decoded, Option<Decoded>),
    /// Bytes that did not decode: each recipient gets them raw (and drops them).
    Raw(SocketAddr, Vec<u8>),
}

impl Packet {
    /// Hands the datagram to one node's core.
    fn deliver(&self, core: &mut Discovery, now: Millis, second_thread: bool) {
        match self {
            Packet::Decoded(first, second) => {
                let decoded = second.as_ref().filter(|_| second_thread).unwrap_or(first);
                core.handle_decoded(now, decoded);
            }
            Packet::Raw(from, bytes) => core.handle_datagram(now, *from, bytes),
        }
    }
}

/// What nodes did in one step, applied to the network afterwards in node order.
#[derive(Default)]
struct Effects {
    delivered: u64,
    seen: Vec<Seen>,
    transmits: Vec<(usize, Transmit)>,
    /// Timer items to queue.
    timers: Vec<(Millis, usize)>,
    /// Peer counts (before, after) of running nodes whose count changed.
    counts: Vec<(usize, usize)>,
    /// Records delivered to observers: (virtual ms, observer).
    records: Vec<(Millis, usize)>,
}

/// One datagram arriving at one or more nodes at the same time.
struct Delivery {
    at: Millis,
    seq: u64,
    /// Recipients, in the order the copies were sent.
    to: Vec<u32>,
    packet: Rc<Packet>,
}

impl PartialEq for Delivery {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Delivery {}
impl PartialOrd for Delivery {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delivery {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    NotStarted,
    Running,
    Stopped,
}

struct SimNode {
    core: Discovery,
    addr: SocketAddr,
    run: Run,
    /// An observer ([`Sim::add_observer`]): not a member, so not counted by
    /// [`Sim::running`] nor [`Sim::converged`].
    observer: bool,
    /// The deadline of this node's live item in the timer heap.
    armed: Option<Millis>,
}

/// The simulated LAN.
pub struct Sim {
    cfg: SimConfig,
    now: Millis,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    ids: Vec<MemberId>,
    seq: u64,
    deliveries: BinaryHeap<Reverse<Delivery>>,
    timers: BinaryHeap<Reverse<(Millis, usize)>>,
    rng: fastrand::Rng,
    /// Each node's last datagram, to reuse its decoding when the next is the same.
    last_sent: Vec<Option<(Vec<u8>, Rc<Packet>)>>,
    /// Recipients of the multicast being sent, by delay.
    by_delay: Vec<Vec<u32>>,
    started_at: Vec<Option<Millis>>,
    /// How many running nodes know each number of peers.
    with_peers: Vec<usize>,
    /// Every event any node reported (that [`SimConfig::keep`] keeps).
    pub seen: Vec<Seen>,
    /// Bytes sent by all nodes (multicast counted once, as on a shared medium), with
    /// IP/UDP headers, per second of virtual time.
    pub bytes_per_second: Vec<u64>,
    /// Datagram copies delivered.
    pub delivered: u64,
    /// Every record (announcement) delivered to an observer ([`Sim::add_observer`]):
    /// (virtual ms, observer index). What settles a one-shot discovery.
    pub records_to_observers: Vec<(Millis, usize)>,
    running: usize,
    unstarted: usize,
    /// With [`SimConfig::neighbour_resolution`]: what each node knows of another's
    /// link address, by (node, other).
    neighbours: HashMap<(usize, usize), Neighbour>,
}

/// What one simulated node knows of another's link address.
#[derive(Clone, Copy, Debug)]
enum Neighbour {
    /// Known from this time on (resolved by itself).
    Known(Millis),
    /// Learned from the other's resolution request, arriving at this time: until then
    /// a datagram to it starts a resolution of its own.
    Learned(Millis),
    /// Being resolved in vain until this time: what is sent to it is dropped.
    Failing(Millis),
}

/// Wait before an unanswered address resolution request is sent again (Linux's
/// `retrans_time_ms`).
pub const ARP_RETRY_MS: Millis = 1000;
/// Address resolution requests sent before giving up (Linux's `mcast_solicit`).
pub const ARP_TRIES: u32 = 3;

impl Sim {
    /// Builds `cfg.nodes` nodes, none started.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut by_addr = HashMap::new();
        let mut ids = Vec::new();
        for i in 0..cfg.nodes {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000));
            let id = MemberId::from_u64_pair(rng.u64(..), rng.u64(..));
            let me = LocalNode {
                id,
                name: format!("node{i}"),
                incarnation: 1,
                addr: SocketAddr::new(addr.ip(), 7000),
                role: "daemon".into(),
                tags: Default::default(),
            };
            let core = Discovery::new(
                cfg.protocol.clone(),
                me,
                cfg.key.clone(),
                rng.u64(..),
                EPOCH,
            )
            .expect("simulated node records are small");
            nodes.push(SimNode {
                core,
                addr,
                run: Run::NotStarted,
                observer: false,
                armed: None,
            });
            by_addr.insert(addr, i);
            ids.push(id);
        }
        Self {
            unstarted: cfg.nodes,
            last_sent: (0..cfg.nodes).map(|_| None).collect(),
            by_delay: Vec::new(),
            started_at: vec![None; cfg.nodes],
            with_peers: vec![0; cfg.nodes + 1],
            cfg,
            now: 0,
            nodes,
            by_addr,
            ids,
            seq: 0,
            deliveries: BinaryHeap::new(),
            timers: BinaryHeap::new(),
            rng,
            seen: Vec::new(),
            bytes_per_second: Vec::new(),
            delivered: 0,
            records_to_observers: Vec::new(),
            running: 0,
            neighbours: HashMap::new(),
        }
    }

    /// Virtual ms since [`EPOCH`].
    pub fn now(&self) -> Millis {
        self.now
    }

    /// The id of node `i`.
    pub fn id(&self, i: usize) -> MemberId {
        self.ids[i]
    }

    /// The core of node `i`, to inspect.
    pub fn node(&self, i: usize) -> &Discovery {
        &self.nodes[i].core
    }

    /// Number of running nodes.
    pub fn running(&self) -> usize {
        self.running
    }

    /// When node `i` started (virtual ms), if it did.
    ///
    /// ```
    /// # use localnet::discovery::sim::{Sim, SimConfig};
    /// let mut sim = Sim::new(SimConfig { nodes: 3, ..SimConfig::default() });
    /// sim.start_all(0, 500);
    /// sim.run_until(1_000);
    /// assert!((0..3).all(|i| sim.started_at(i).is_some_and(|t| t <= 500)));
    /// ```
    pub fn started_at(&self, i: usize) -> Option<Millis> {
        self.started_at[i]
    }

    /// Adds a one-shot observer (the protocol settings with `observer: true`), not
    /// started; returns its index. Start it with [`Sim::start`]; it is not counted as a
    /// running node, and [`Sim::start_all`] leaves it alone.
    ///
    /// ```
    /// # use localnet::discovery::sim::{Sim, SimConfig};
    /// let mut sim = Sim::new(SimConfig { nodes: 5, ..SimConfig::default() });
    /// sim.start_all(0, 0);
    /// sim.run_until_converged(1_000).unwrap();
    /// let obs = sim.add_observer();
    /// sim.start(obs);
    /// let settled = sim.settled_at(obs).unwrap();
    /// sim.run_until(settled);
    /// assert_eq!(sim.node(obs).peer_count(), 5);
    /// assert!(sim.converged(), "the members do not list it");
    /// ```
    pub fn add_observer(&mut self) -> usize {
        let i = self.nodes.len();
        let addr = SocketAddr::from(([10, 254, (i >> 8) as u8, i as u8], 40000));
        let id = MemberId::from_u64_pair(self.rng.u64(..), self.rng.u64(..));
        let me = LocalNode {
            id,
            name: format!("observer{i}"),
            incarnation: 1,
            addr: SocketAddr::new(addr.ip(), 7000),
            role: "observer".into(),
            tags: Default::default(),
        };
        let cfg = Config {
            observer: true,
            ..self.cfg.protocol.clone()
        };
        let core = Discovery::new(cfg, me, self.cfg.key.clone(), self.rng.u64(..), EPOCH)
            .expect("simulated node records are small");
        self.nodes.push(SimNode {
            core,
            addr,
            run: Run::NotStarted,
            observer: true,
            armed: None,
        });
        self.by_addr.insert(addr, i);
        self.ids.push(id);
        self.last_sent.push(None);
        self.started_at.push(None);
        i
    }

    /// When node `i`'s view is settled ([`Discovery::settled_at`]), in virtual ms.
    pub fn settled_at(&self, i: usize) -> Option<Millis> {
        self.nodes[i]
            .core
            .settled_at()
            .map(|t| t.saturating_sub(EPOCH))
    }

    /// Starts every node at a random time in `[at, at + spread_ms]`.
    pub fn start_all(&mut self, at: Millis, spread_ms: u64) {
        for i in (0..self.nodes.len()).filter(|&i| !self.nodes[i].observer) {
            let t = at + self.rng.u64(0..=spread_ms);
            self.timers.push(Reverse((t, usize::MAX - i)));
        }
    }

    /// Starts node `i` now.
    pub fn start(&mut self, i: usize) {
        if self.nodes[i].run != Run::NotStarted {
            return;
        }
        self.nodes[i].run = Run::Running;
        if !self.nodes[i].observer {
            self.running += 1;
            self.unstarted -= 1;
            self.with_peers[self.nodes[i].core.peer_count()] += 1;
        }
        self.started_at[i] = Some(self.now);
        let now = EPOCH + self.now;
        let before = self.nodes[i].core.peer_count();
        self.nodes[i].core.start(now);
        self.after_step(i, before);
    }

    /// Kills node `i` (like kill -9: no goodbye).
    pub fn kill(&mut self, i: usize) {
        if self.nodes[i].run == Run::Running {
            self.nodes[i].run = Run::Stopped;
            if !self.nodes[i].observer {
                self.running -= 1;
                self.with_peers[self.nodes[i].core.peer_count()] -= 1;
            }
        }
    }

    /// Stops node `i` gracefully (goodbye).
    pub fn stop(&mut self, i: usize) {
        if self.nodes[i].run == Run::Running {
            let now = EPOCH + self.now;
            self.nodes[i].core.leave(now);
            let before = self.nodes[i].core.peer_count();
            self.after_step(i, before);
            self.nodes[i].run = Run::Stopped;
            if !self.nodes[i].observer {
                self.running -= 1;
                self.with_peers[self.nodes[i].core.peer_count()] -= 1;
            }
        }
    }

    /// Whether every node has been started and every running node knows as many peers
    /// as there are other running nodes.
    pub fn converged(&self) -> bool {
        self.running > 0 && self.with_peers[self.running - 1] == self.running && self.unstarted == 0
    }

    /// Runs until every running node knows every other; returns the virtual time then,
    /// or `None` if that did not happen by `deadline`. It checks after each timer and
    /// each delivery (all the copies of one datagram due at the same millisecond).
    pub fn run_until_converged(&mut self, deadline: Millis) -> Option<Millis> {
        loop {
            if self.converged() {
                return Some(self.now);
            }
            if !self.step(deadline) {
                return None;
            }
        }
    }

    /// Runs until virtual time `t`.
    pub fn run_until(&mut self, t: Millis) {
        while self.step(t) {}
        self.now = self.now.max(t);
    }

    /// Mean bytes per second sent by the whole group over `[from, to)` seconds.
    pub fn group_rate(&self, from_s: usize, to_s: usize) -> f64 {
        let to_s = to_s.min(self.bytes_per_second.len());
        if to_s <= from_s {
            return 0.0;
        }
        let total: u64 = self.bytes_per_second[from_s..to_s].iter().sum();
        total as f64 / (to_s - from_s) as f64
    }

    /// Processes the next delivery (to all its recipients) or timer at or before
    /// `limit`; false when none is left.
    fn step(&mut self, limit: Millis) -> bool {
        let next_delivery = self.deliveries.peek().map(|Reverse(d)| d.at);
        let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let next = match (next_delivery, next_timer) {
            (None, None) => return false,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => a.min(b),
        };
        if next > limit {
            return false;
        }
        self.now = next;
        if next_delivery == Some(next) {
            let Some(Reverse(d)) = self.deliveries.pop() else {
                return false;
            };
            self.deliver(&d);
        } else {
            let Some(Reverse((_, i))) = self.timers.pop() else {
                return false;
            };
            if i >= self.nodes.len() {
                self.start(usize::MAX - i); // a scheduled start
                return true;
            }
            let node = &mut self.nodes[i];
            if node.run != Run::Running || node.armed != Some(next) {
                return true;
            }
            node.armed = None;
            let before = node.core.peer_count();
            node.core.handle_timeout(EPOCH + next);
            self.after_step(i, before);
        }
        true
    }

    /// Hands a delivery to its recipients that still run, on one or two threads, then
    /// applies what they did in recipient order.
    fn deliver(&mut self, d: &Delivery) {
        let (now, keep) = (self.now, self.cfg.keep);
        let packet: &Packet = &d.packet; // Rc is not Send; its contents are Sync
        let two = matches!(packet, Packet::Decoded(_, Some(_)));
        if self.cfg.threads > 1 && two && d.to.len() >= PARALLEL_MIN {
            let half = d.to.len() / 2;
            let split = d.to[half] as usize;
            let (left, right) = self.nodes.split_at_mut(split);
            let (a, b) = std::thread::scope(|s| {
                let to = &d.to[half..];
                let helper = s.spawn(move || serve(right, split, to, packet, true, now, keep));
                let a = serve(left, 0, &d.to[..half], packet, false, now, keep);
                let b = helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (a, b)
            });
            self.apply(a);
            self.apply(b);
        } else {
            let out = serve(&mut self.nodes, 0, &d.to, packet, false, now, keep);
            self.apply(out);
        }
    }

    /// Collects what node `i` wants to send and report, and re-arms its timer.
    fn after_step(&mut self, i: usize, peers_before: usize) {
        let mut out = Effects::default();
        collect(
            &mut self.nodes[i],
            i,
            self.now,
            peers_before,
            self.cfg.keep,
            &mut out,
        );
        self.apply(out);
    }

    /// Applies what nodes did: records events, sends datagrams, queues timers.
    fn apply(&mut self, out: Effects) {
        self.delivered += out.delivered;
        self.seen.extend(out.seen);
        self.records_to_observers.extend(out.records);
        for (i, tx) in out.transmits {
            let second = (self.now / 1000) as usize;
            if self.bytes_per_second.len() <= second {
                self.bytes_per_second.resize(second + 1, 0);
            }
            self.bytes_per_second[second] += (tx.payload.len() + HEADER_OVERHEAD) as u64;
            let packet = self.packet(i, tx.payload);
            match tx.dest {
                Destination::Group => self.multicast(i, packet),
                Destination::Unicast(addr) => {
                    if let Some(&to) = self.by_addr.get(&addr)
                        && let Some(at) = self.link_address_at(i, to)
                    {
                        self.schedule(to, packet, at);
                    }
                }
            }
        }
        for item in out.timers {
            self.timers.push(Reverse(item));
        }
        for (before, after) in out.counts {
            self.with_peers[before] -= 1;
            self.with_peers[after] += 1;
        }
    }

    /// The datagram node `i` sends, decoded once for all its recipients; the same bytes
    /// as its previous datagram reuse that decoding.
    fn packet(&mut self, i: usize, payload: Vec<u8>) -> Rc<Packet> {
        if let Some((bytes, packet)) = &self.last_sent[i]
            && *bytes == payload
        {
            return Rc::clone(packet);
        }
        let from = self.nodes[i].addr;
        let key = self.cfg.key.as_ref();
        let packet = Rc::new(match Decoded::new(from, &payload, key) {
            Ok(decoded) => {
                let second = (self.cfg.threads > 1)
                    .then(|| Decoded::new(from, &payload, key).ok())
                    .flatten();
                Packet::Decoded(decoded, second)
            }
            Err(_) => Packet::Raw(from, payload.clone()),
        });
        self.last_sent[i] = Some((payload, Rc::clone(&packet)));
        packet
    }

    /// Sends a copy to every other running node; copies that share a delay share a
    /// queue item. Loss and delay are drawn per copy, in recipient order.
    fn multicast(&mut self, i: usize, packet: Rc<Packet>) {
        let (min, max) = (self.cfg.min_delay_ms, self.cfg.max_delay_ms);
        let span = (max.saturating_sub(min) + 1) as usize;
        if self.by_delay.len() < span {
            self.by_delay.resize_with(span, Vec::new);
        }
        for to in 0..self.nodes.len() {
            if to == i || self.nodes[to].run != Run::Running {
                continue;
            }
            if self.cfg.loss > 0.0 && self.rng.f64() < self.cfg.loss {
                continue;
            }
            let delay = self.rng.u64(min..=max);
            self.by_delay[(delay - min) as usize].push(to as u32);
        }
        for k in 0..span {
            if self.by_delay[k].is_empty() {
                continue;
            }
            let to = std::mem::take(&mut self.by_delay[k]);
            self.seq += 1;
            self.deliveries.push(Reverse(Delivery {
                at: self.now + min + k as u64,
                seq: self.seq,
                to,
                packet: Rc::clone(&packet),
            }));
        }
    }

    /// When node `from` may send a unicast datagram to `to` (now, or once the
    /// address resolution it starts or waits for is through), or `None` if the
    /// datagram is dropped (that resolution fails). See
    /// [`SimConfig::neighbour_resolution`].
    fn link_address_at(&mut self, from: usize, to: usize) -> Option<Millis> {
        if !self.cfg.neighbour_resolution {
            return Some(self.now);
        }
        let learned = match self.neighbours.get(&(from, to)) {
            Some(Neighbour::Known(at)) => return Some((*at).max(self.now)),
            Some(Neighbour::Learned(at)) if *at <= self.now => return Some(self.now),
            Some(Neighbour::Failing(until)) if self.now < *until => return None,
            Some(Neighbour::Learned(at)) => Some(*at),
            _ => None,
        };
        // A new resolution: all its tries are drawn now.
        let (min, max) = (self.cfg.min_delay_ms, self.cfg.max_delay_ms);
        let loss = self.cfg.loss;
        let lost = |rng: &mut fastrand::Rng| loss > 0.0 && rng.f64() < loss;
        let mut at = self.now;
        let mut known = None;
        for _ in 0..ARP_TRIES {
            if !lost(&mut self.rng) {
                let asked = at + self.rng.u64(min..=max);
                let reverse = self
                    .neighbours
                    .entry((to, from))
                    .or_insert(Neighbour::Learned(asked));
                if !matches!(reverse, Neighbour::Known(t) | Neighbour::Learned(t) if *t <= asked) {
                    *reverse = Neighbour::Learned(asked);
                }
                if !lost(&mut self.rng) {
                    known = Some(asked + self.rng.u64(min..=max));
                    break;
                }
            }
            at += ARP_RETRY_MS;
        }
        // Learning it from the other's own request may come first.
        let known = match (known, learned) {
            (Some(k), Some(l)) => Some(k.min(l)),
            (k, l) => k.or(l),
        };
        let entry = match known {
            Some(t) => Neighbour::Known(t),
            None => Neighbour::Failing(at),
        };
        self.neighbours.insert((from, to), entry);
        known
    }

    fn schedule(&mut self, to: usize, packet: Rc<Packet>, at: Millis) {
        if self.cfg.loss > 0.0 && self.rng.f64() < self.cfg.loss {
            return;
        }
        let delay = self.rng.u64(self.cfg.min_delay_ms..=self.cfg.max_delay_ms);
        self.seq += 1;
        self.deliveries.push(Reverse(Delivery {
            at: at + delay,
            seq: self.seq,
            to: vec![to as u32],
            packet,
        }));
    }
}

/// Hands `packet` at `now` to the nodes `to` (indices into the whole LAN; `nodes`
/// starts at index `first`) that still run, and gathers what they did.
fn serve(
    nodes: &mut [SimNode],
    first: usize,
    to: &[u32],
    packet: &Packet,
    second_thread: bool,
    now: Millis,
    keep: fn(&PeerEvent) -> bool,
) -> Effects {
    let mut out = Effects::default();
    for &i in to {
        let i = i as usize;
        let node = &mut nodes[i - first];
        if node.run != Run::Running {
            continue;
        }
        out.delivered += 1;
        if node.observer && matches!(packet, Packet::Decoded(d, _) if d.is_record()) {
            out.records.push((now, i));
        }
        let before = node.core.peer_count();
        packet.deliver(&mut node.core, EPOCH + now, second_thread);
        collect(node, i, now, before, keep, &mut out);
    }
    out
}

/// Gathers what node `i` did in a step at `now`: its events (those `keep` keeps), its
/// datagrams, its next timer if earlier than the armed one, and its peer count change.
fn collect(
    node: &mut SimNode,
    i: usize,
    now: Millis,
    peers_before: usize,
    keep: fn(&PeerEvent) -> bool,
    out: &mut Effects,
) {
    while let Some(event) = node.core.poll_event() {
        if keep(&event) {
            out.seen.push(Seen {
                at: now,
                by: i,
                event,
            });
        }
    }
    while let Some(tx) = node.core.poll_transmit() {
        out.transmits.push((i, tx));
    }
    if node.run == Run::Running
        && let Some(t) = node.core.poll_timeout()
    {
        let t = t.saturating_sub(EPOCH).max(now);
        if node.armed.is_none_or(|armed| t < armed) {
            node.armed = Some(t);
            out.timers.push((t, i));
        }
    }
    let after = node.core.peer_count();
    if after != peers_before && node.run == Run::Running && !node.observer {
        out.counts.push((peers_before, after));
    }
}
