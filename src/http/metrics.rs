//! `/metrics`: the node's counters in the Prometheus text format (OpenMetrics), through
//! the `prometheus-client` crate. Nothing is counted here twice: each scrape reads the
//! discovery core's counters, the peer table, the control socket's and the slave's
//! counters, and builds the text from them (the peer events, which only the event
//! stream tells, are counted by the endpoint since it started).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::node::{NodeError, NodeHandle};
use crate::{PeerEvent, PeerState};

/// Peer events seen by the endpoint, by kind.
#[derive(Debug, Default)]
pub(super) struct EventCounts {
    joined: AtomicU64,
    updated: AtomicU64,
    left: AtomicU64,
    failed: AtomicU64,
    /// Events missed (the endpoint's queue overflowed).
    lagged: AtomicU64,
}

impl EventCounts {
    pub(super) fn count(&self, event: &PeerEvent) {
        let counter = match event {
            PeerEvent::Joined(_) => &self.joined,
            PeerEvent::Updated(_) => &self.updated,
            PeerEvent::Left(_) => &self.left,
            PeerEvent::Failed(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn lagged(&self, n: u64) {
        self.lagged.fetch_add(n, Ordering::Relaxed);
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn counters(label: &'static str, values: &[(&str, u64)]) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (name, value) in values {
        family
            .get_or_create(&vec![(label, name.to_string())])
            .inc_by(*value);
    }
    family
}

/// The metrics text of one scrape.
pub(super) async fn render(state: &super::State, node: &NodeHandle) -> Result<String, NodeError> {
    let status = node.status().await?;
    let peers = node.peers().await?;
    let s = &status.stats;
    let mut r = Registry::with_prefix("localnet");
    r.register(
        "build",
        "The localnet version and this node's role",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("role", status.role.clone()),
        ]),
    );
    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(status.uptime_ms as f64 / 1000.0);
    r.register_with_unit(
        "uptime",
        "Time since the node started",
        Unit::Seconds,
        uptime,
    );
    let by_state = Family::<Labels, Gauge>::default();
    for (state, name) in [(PeerState::Alive, "alive"), (PeerState::Suspect, "suspect")] {
        let n = peers.iter().filter(|p| p.state == state).count();
        by_state
            .get_or_create(&vec![("state", name.to_string())])
            .set(n as i64);
    }
    r.register("peers", "Peers in the table, by state", by_state);
    r.register(
        "datagrams_received",
        "Discovery datagrams received (before the rate limit)",
        counter(s.received),
    );
    r.register(
        "datagrams_sent",
        "Discovery datagrams queued for sending",
        counter(s.sent),
    );
    r.register_with_unit(
        "received",
        "Bytes of discovery datagrams received (UDP payload)",
        Unit::Bytes,
        counter(s.received_bytes),
    );
    r.register_with_unit(
        "sent",
        "Bytes of discovery datagrams queued for sending (UDP payload)",
        Unit::Bytes,
        counter(s.sent_bytes),
    );
    r.register(
        "datagrams_dropped",
        "Discovery datagrams dropped, by reason",
        counters(
            "reason",
            &[
                ("malformed", s.dropped_malformed),
                ("oversize", s.dropped_oversize),
                ("version", s.dropped_version),
                ("legacy", s.dropped_legacy),
                ("auth", s.dropped_auth),
                ("replay", s.dropped_replay),
                ("rate", s.dropped_rate),
                ("table_full", s.dropped_table_full),
                ("overload", status.dropped_overload),
            ],
        ),
    );
    r.register(
        "messages_sent",
        "Discovery messages queued for sending, by kind (probes ask members to answer; pings probe a suspect)",
        counters(
            "kind",
            &[
                ("announce", s.sent_announcements),
                ("heartbeat", s.sent_heartbeats),
                ("probe", s.sent_probes),
                ("ping", s.sent_pings),
                ("goodbye", s.sent_goodbyes),
            ],
        ),
    );
    r.register(
        "record_requests",
        "Requests for the record of a member heard only by its heartbeat",
        counter(s.record_requests),
    );
    r.register(
        "suspicion_probes_spared",
        "Probe rounds for a suspect left out because another observer's was heard",
        counter(s.probes_spared),
    );
    let events = &state.events;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    r.register(
        "peer_events",
        "Peer events since the HTTP endpoint started, by kind",
        counters(
            "event",
            &[
                ("joined", get(&events.joined)),
                ("updated", get(&events.updated)),
                ("left", get(&events.left)),
                ("failed", get(&events.failed)),
            ],
        ),
    );
    r.register(
        "peer_events_missed",
        "Peer events the HTTP endpoint missed (its queue overflowed)",
        counter(get(&events.lagged)),
    );
    if let Some(control) = &state.sources.control {
        r.register(
            "control_clients",
            "Control socket clients connected now",
            gauge(get(&control.connected)),
        );
        r.register(
            "control_clients_served",
            "Control socket clients served",
            counter(get(&control.served)),
        );
        r.register(
            "control_clients_refused",
            "Control socket clients turned away (too many at once)",
            counter(get(&control.refused)),
        );
    }
    if let Some(monitor) = &state.sources.slave {
        let c = monitor.counts();
        r.register("jobs_started", "Commands started", counter(c.jobs_started));
        r.register(
            "jobs_finished",
            "Commands ended, by outcome",
            counters(
                "outcome",
                &[
                    ("succeeded", c.jobs_succeeded),
                    ("failed", c.jobs_failed),
                    ("timed_out", c.jobs_timed_out),
                ],
            ),
        );
        r.register(
            "jobs_running",
            "Commands running now",
            gauge(monitor.running().len() as u64),
        );
        r.register_with_unit(
            "job_output",
            "Bytes of command output (to its master, or to the slave's log once the master has gone)",
            Unit::Bytes,
            counter(c.output_bytes),
        );
        r.register(
            "job_output_lines",
            "Lines (newlines) of command output",
            counter(c.output_lines),
        );
        r.register(
            "master_connections",
            "Master connections open now",
            gauge(c.connections),
        );
        if let Some(logs) = &state.sources.logs {
            r.register(
                "log_lines_forwarded",
                "The slave's log lines sent to masters that asked for them",
                counter(logs.forwarded()),
            );
        }
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &r);
    Ok(text)
}
