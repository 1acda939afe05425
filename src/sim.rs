//! A simulated LAN for the sans-IO core: many nodes, one process, virtual time.
//!
//! This module owns the simulator used by the simulation tests and the benchmark's
//! simulation mode. Each node is a real [`Discovery`]; the "network" is a priority queue
//! of deliveries with settable loss and delay; multicast reaches every other running
//! node, each copy lost independently. Everything is driven by one seeded RNG, so a run
//! is reproducible.
//!
//! ```
//! use localnet::sim::{Sim, SimConfig};
//! let mut sim = Sim::new(SimConfig { nodes: 10, ..SimConfig::default() });
//! sim.start_all(0, 0);
//! let converged = sim.run_until_converged(5_000).expect("10 nodes converge");
//! assert!(converged < 100);
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;

use uuid::Uuid;

use crate::core::{Config, Destination, Discovery, LocalNode, Millis, PeerEvent};
use crate::key::ClusterKey;
use crate::wire::HEADER_OVERHEAD;

/// Virtual time starts here: close to a real unix time in ms, so that keyed nodes'
/// counters look like real clocks.
pub const EPOCH: Millis = 1_800_000_000_000;

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

struct Delivery {
    at: Millis,
    seq: u64,
    to: usize,
    from: SocketAddr,
    payload: Rc<Vec<u8>>,
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
    /// The deadline of this node's live item in the timer heap.
    armed: Option<Millis>,
}

/// The simulated LAN.
pub struct Sim {
    cfg: SimConfig,
    now: Millis,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    ids: Vec<Uuid>,
    seq: u64,
    deliveries: BinaryHeap<Reverse<Delivery>>,
    timers: BinaryHeap<Reverse<(Millis, usize)>>,
    rng: fastrand::Rng,
    /// Every event any node reported.
    pub seen: Vec<Seen>,
    /// Bytes sent by all nodes (multicast counted once, as on a shared medium), with
    /// IP/UDP headers, per second of virtual time.
    pub bytes_per_second: Vec<u64>,
    /// Datagram copies delivered.
    pub delivered: u64,
    running: usize,
    unstarted: usize,
    converged_nodes: usize,
}

impl Sim {
    /// Builds `cfg.nodes` nodes, none started.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut by_addr = HashMap::new();
        let mut ids = Vec::new();
        for i in 0..cfg.nodes {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000));
            let id = Uuid::from_u64_pair(rng.u64(..), rng.u64(..));
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
                armed: None,
            });
            by_addr.insert(addr, i);
            ids.push(id);
        }
        Self {
            unstarted: cfg.nodes,
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
            running: 0,
            converged_nodes: 0,
        }
    }

    /// Virtual ms since [`EPOCH`].
    pub fn now(&self) -> Millis {
        self.now
    }

    /// The id of node `i`.
    pub fn id(&self, i: usize) -> Uuid {
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

    /// Starts every node at a random time in `[at, at + spread_ms]`.
    pub fn start_all(&mut self, at: Millis, spread_ms: u64) {
        for i in 0..self.nodes.len() {
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
        self.running += 1;
        self.unstarted -= 1;
        let now = EPOCH + self.now;
        self.nodes[i].core.start(now);
        self.after_step(i, 0);
        self.recount();
    }

    /// Kills node `i` (like kill -9: no goodbye).
    pub fn kill(&mut self, i: usize) {
        if self.nodes[i].run == Run::Running {
            self.nodes[i].run = Run::Stopped;
            self.running -= 1;
            self.recount();
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
            self.running -= 1;
            self.recount();
        }
    }

    /// Whether every node has been started and every running node knows as many peers
    /// as there are other running nodes.
    pub fn converged(&self) -> bool {
        self.running > 0 && self.converged_nodes == self.running && self.unstarted == 0
    }

    /// Runs until every running node knows every other; returns the virtual time then,
    /// or `None` if that did not happen by `deadline`.
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

    /// Processes the next delivery or timer at or before `limit`; false when none is left.
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
            if self.nodes[d.to].run == Run::Running {
                self.delivered += 1;
                let before = self.nodes[d.to].core.peer_count();
                self.nodes[d.to]
                    .core
                    .handle_datagram(EPOCH + next, d.from, &d.payload);
                self.after_step(d.to, before);
            }
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

    /// Collects what node `i` wants to send and report, and re-arms its timer.
    fn after_step(&mut self, i: usize, peers_before: usize) {
        while let Some(event) = self.nodes[i].core.poll_event() {
            self.seen.push(Seen {
                at: self.now,
                by: i,
                event,
            });
        }
        while let Some(tx) = self.nodes[i].core.poll_transmit() {
            let second = (self.now / 1000) as usize;
            if self.bytes_per_second.len() <= second {
                self.bytes_per_second.resize(second + 1, 0);
            }
            self.bytes_per_second[second] += (tx.payload.len() + HEADER_OVERHEAD) as u64;
            let payload = Rc::new(tx.payload);
            let from = self.nodes[i].addr;
            match tx.dest {
                Destination::Group => {
                    for to in 0..self.nodes.len() {
                        if to != i && self.nodes[to].run == Run::Running {
                            self.schedule(to, from, payload.clone());
                        }
                    }
                }
                Destination::Unicast(addr) => {
                    if let Some(&to) = self.by_addr.get(&addr) {
                        self.schedule(to, from, payload);
                    }
                }
            }
        }
        let node = &mut self.nodes[i];
        if node.run == Run::Running
            && let Some(t) = node.core.poll_timeout()
        {
            let t = t.saturating_sub(EPOCH).max(self.now);
            if node.armed.is_none_or(|armed| t < armed) {
                node.armed = Some(t);
                self.timers.push(Reverse((t, i)));
            }
        }
        let after = self.nodes[i].core.peer_count();
        if after != peers_before {
            let target = self.running.saturating_sub(1);
            let was = self.nodes[i].run == Run::Running && peers_before == target;
            let is = self.nodes[i].run == Run::Running && after == target;
            match (was, is) {
                (false, true) => self.converged_nodes += 1,
                (true, false) => self.converged_nodes -= 1,
                _ => {}
            }
        }
    }

    fn schedule(&mut self, to: usize, from: SocketAddr, payload: Rc<Vec<u8>>) {
        if self.cfg.loss > 0.0 && self.rng.f64() < self.cfg.loss {
            return;
        }
        let delay = self.rng.u64(self.cfg.min_delay_ms..=self.cfg.max_delay_ms);
        self.seq += 1;
        self.deliveries.push(Reverse(Delivery {
            at: self.now + delay,
            seq: self.seq,
            to,
            from,
            payload,
        }));
    }

    /// Recomputes how many nodes are converged (after the target changed).
    fn recount(&mut self) {
        let target = self.running.saturating_sub(1);
        self.converged_nodes = self
            .nodes
            .iter()
            .filter(|n| n.run == Run::Running && n.core.peer_count() == target)
            .count();
    }
}
