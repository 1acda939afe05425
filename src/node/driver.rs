//! The node's driver: the task that runs the discovery core over real sockets.
//!
//! This module owns the loop of one node: datagrams from the socket readers (through a
//! bounded inbox) and mDNS into the core, the core's timer, the handle's commands, and
//! what the core asks for in return (datagrams to send, events to broadcast). It also
//! owns the node's clock: Unix milliseconds that never go backwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::mdns::{Mdns, MdnsEvent};
use super::netif::Sockets;
use super::{Command, DiscoveryMode, SETTLE_WAITERS, Status};
use crate::discovery::peers::PeerEvent;
use crate::discovery::wire::MAX_DATAGRAM;
use crate::discovery::{Destination, Discovery, Millis};

/// Unix time in ms that never goes backwards: the wall clock at start plus a monotonic
/// clock since then.
#[derive(Clone, Copy)]
pub(super) struct Clock {
    start: Instant,
    pub(super) start_ms: u64,
}

impl Clock {
    pub(super) fn new() -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            start: Instant::now(),
            start_ms,
        }
    }

    pub(super) fn now(&self) -> Millis {
        self.start_ms + self.start.elapsed().as_millis() as u64
    }

    pub(super) fn instant(&self, at: Millis) -> tokio::time::Instant {
        (self.start + Duration::from_millis(at.saturating_sub(self.start_ms))).into()
    }
}

pub(super) struct Driver {
    pub(super) core: Discovery,
    pub(super) sockets: Option<Arc<Sockets>>,
    pub(super) mdns: Option<Mdns>,
    pub(super) discovery: DiscoveryMode,
    pub(super) clock: Clock,
    pub(super) events: broadcast::Sender<PeerEvent>,
    pub(super) name: String,
    pub(super) keyed: bool,
    pub(super) cluster: Option<String>,
    pub(super) role: String,
    pub(super) interfaces: Vec<String>,
    /// Datagrams the readers dropped because the inbox was full: a counter, not a
    /// queue, so that it costs nothing more under the flood it counts.
    pub(super) dropped_overload: Arc<AtomicU64>,
    pub(super) send_errors: u64,
    pub(super) next_send_error_log: Millis,
    /// Callers of [`NodeHandle::settled`] (at most [`SETTLE_WAITERS`]).
    pub(super) settle_waiters: Vec<oneshot::Sender<()>>,
}

const INBOX: usize = 4096;
/// Events kept for slow subscribers before they are told they lagged (the buffer is
/// allocated up front, so it is kept modest).
pub(super) const EVENT_BUFFER: usize = 512;

impl Driver {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut mdns_events: Option<mpsc::Receiver<MdnsEvent>>,
    ) {
        let (inbox_tx, mut inbox) = mpsc::channel::<(SocketAddr, Vec<u8>)>(INBOX);
        let mut readers = Vec::new();
        let socket_count = self
            .sockets
            .as_ref()
            .map(|s| s.unicast.len() + 1)
            .unwrap_or(0);
        for index in 0..socket_count {
            let Some(sockets) = self.sockets.clone() else {
                break;
            };
            let tx = inbox_tx.clone();
            let overload = Arc::clone(&self.dropped_overload);
            readers.push(tokio::spawn(async move {
                let socket: &UdpSocket = match index {
                    0 => &sockets.group,
                    i => &sockets.unicast[i - 1].1,
                };
                read_loop(socket, tx, &overload).await;
            }));
        }
        drop(inbox_tx);
        // One timer for the driver's whole life, moved only when the core's next
        // deadline changes (not made again for every datagram).
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed: Option<tokio::time::Instant> = None;
        loop {
            self.flush().await;
            let settled = self.release_settled();
            let wake = [self.core.poll_timeout(), settled]
                .into_iter()
                .flatten()
                .min()
                .map(|t| self.clock.instant(t));
            if wake != armed {
                timer.as_mut().reset(wake.unwrap_or_else(far));
                armed = wake;
            }
            tokio::select! {
                Some((source, bytes)) = inbox.recv() => {
                    // Every datagram that is already in, in one wakeup, before the
                    // events and datagrams they cause are flushed once.
                    let now = self.clock.now();
                    self.core.handle_datagram(now, source, &bytes);
                    for _ in 0..INBOX {
                        let Ok((source, bytes)) = inbox.try_recv() else {
                            break;
                        };
                        self.core.handle_datagram(now, source, &bytes);
                    }
                }
                Some(event) = next_mdns(&mut mdns_events) => match event {
                    MdnsEvent::Resolved(record) => self.core.observe_mdns(self.clock.now(), record),
                    MdnsEvent::Removed(id) => self.core.mdns_removed(self.clock.now(), id),
                },
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.core.handle_timeout(self.clock.now());
                }
                command = commands.recv() => match command {
                    Some(Command::Peers(reply)) => {
                        let _ = reply.send(self.core.peers(self.clock.now()));
                    }
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::Settled(reply)) => {
                        self.settle_waiters.retain(|w| !w.is_closed());
                        match self.settle_waiters.len() < SETTLE_WAITERS {
                            true => self.settle_waiters.push(reply),
                            false => {
                                let _ = reply.send(());
                            }
                        }
                    }
                    Some(Command::Leave(reply)) => {
                        self.leave().await;
                        let _ = reply.send(());
                        break;
                    }
                    None => {
                        self.leave().await;
                        break;
                    }
                },
            }
        }
        for reader in readers {
            reader.abort();
        }
    }

    /// Answers the callers waiting for the view to settle once it is; else returns
    /// when it will be, for the loop to wake then (`None`: nobody waits, or it never
    /// settles).
    fn release_settled(&mut self) -> Option<Millis> {
        if self.settle_waiters.is_empty() {
            return None;
        }
        let at = self.core.settled_at()?;
        if self.clock.now() < at {
            return Some(at);
        }
        for waiter in self.settle_waiters.drain(..) {
            let _ = waiter.send(());
        }
        None
    }

    async fn leave(&mut self) {
        self.core.leave(self.clock.now());
        self.flush().await;
        if let Some(mdns) = self.mdns.take() {
            mdns.shutdown().await;
        }
    }

    fn status(&self) -> Status {
        let now = self.clock.now();
        let peers = self.core.peers(now);
        Status {
            id: self.core.id(),
            name: self.name.clone(),
            role: self.role.clone(),
            incarnation: self.core.incarnation(),
            peers: peers.len(),
            interval_ms: self.core.interval_ms(),
            unicast: self
                .sockets
                .as_ref()
                .map(|s| s.unicast_addrs())
                .unwrap_or_default(),
            group: self
                .sockets
                .as_ref()
                .map(|s| s.group_addr.to_string())
                .unwrap_or_default(),
            interfaces: self.interfaces.clone(),
            keyed: self.keyed,
            cluster: self.cluster.clone(),
            discovery: self.discovery,
            mdns: self.mdns.is_some(),
            uptime_ms: now.saturating_sub(self.clock.start_ms),
            stats: self.core.stats().clone(),
            dropped_overload: self.dropped_overload.load(Ordering::Relaxed),
            rejections: self.core.rejections(now),
        }
    }

    async fn flush(&mut self) {
        while let Some(event) = self.core.poll_event() {
            tracing::info!(event = event.kind(), peer = %event.peer().name, id = %event.peer().id, addr = %event.peer().addr);
            let _ = self.events.send(event);
        }
        while let Some(tx) = self.core.poll_transmit() {
            let Some(sockets) = &self.sockets else {
                continue;
            };
            let result = match tx.dest {
                Destination::Group => {
                    let mut result = Ok(0);
                    for (_, socket) in &sockets.unicast {
                        if let Err(e) = socket.send_to(&tx.payload, sockets.group_addr).await {
                            result = Err(e);
                        }
                    }
                    result
                }
                Destination::Unicast(dest) => match sockets.route(dest) {
                    Some(socket) => socket.send_to(&tx.payload, dest).await,
                    None => Ok(0),
                },
            };
            if let Err(err) = result {
                self.send_errors += 1;
                let now = self.clock.now();
                if now >= self.next_send_error_log {
                    self.next_send_error_log = now + 10_000;
                    tracing::warn!(%err, errors = self.send_errors, "sending a discovery datagram failed");
                }
            }
        }
    }
}

async fn next_mdns(events: &mut Option<mpsc::Receiver<MdnsEvent>>) -> Option<MdnsEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn read_loop(
    socket: &UdpSocket,
    inbox: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    overload: &AtomicU64,
) {
    // One byte more than the limit, so that oversize datagrams are seen as such.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, source)) => {
                if let Err(mpsc::error::TrySendError::Full(_)) =
                    inbox.try_send((source, buf[..n].to_vec()))
                {
                    overload.fetch_add(1, Ordering::Relaxed);
                } else if inbox.is_closed() {
                    return;
                }
            }
            Err(err) => {
                // ICMP errors surface here on some systems; they are not fatal.
                tracing::debug!(%err, "receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
