//! The HTTP endpoint of a daemon or slave (`--http ADDR`, off unless asked).
//!
//! This module owns the HTTP side of a node: the listener and its connections (at most
//! [`MAX_CONNECTIONS`], each with a deadline for its request headers), and the routes:
//! `/metrics` (Prometheus text format, built in [`metrics`] from the node's counters at
//! each scrape), `/sd` (Prometheus HTTP service discovery: every alive peer as a
//! target), `/peers` (the peer table as JSON), `/events` (peer events as server-sent
//! events), `/jobs` (a slave's running commands) and `/` (a live status page, one
//! self-contained HTML file). It only reads the node: nothing here changes what the
//! node does.

pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;

use crate::node::NodeHandle;
use crate::runtime::jobs::SlaveMonitor;
use crate::runtime::logs::LogTargets;

/// Most HTTP connections served at once (event streams included); one more is closed
/// at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an event stream with nothing to say sends a comment (so that proxies and
/// browsers keep it open).
pub const EVENT_KEEPALIVE: Duration = Duration::from_secs(15);

/// The status page: one file, no script or style from anywhere else.
const PAGE: &str = include_str!("page.html");

/// What the endpoint serves.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Where it listens (`IP:PORT`).
    pub listen: SocketAddr,
    /// The port `/sd` gives for each peer's target; `None`: the port this endpoint
    /// listens on (every node of the LAN serving `--http` on the same port).
    pub sd_port: Option<u16>,
    /// Once no request has come for [`RELEASE_WHEN_IDLE`], give back the code pages
    /// that serving faulted in ([`crate::memory::release_unused_code`]): between two
    /// scrapes the node is as small as without the endpoint. For a daemon or slave,
    /// which did the same after start-up.
    pub release_when_idle: bool,
}

/// How long the endpoint waits after its last request before it gives back the code
/// pages that serving it faulted in (with [`HttpOptions::release_when_idle`]).
pub const RELEASE_WHEN_IDLE: Duration = Duration::from_secs(3);

/// What the endpoint reads: the node, and for a slave its monitor and log targets.
#[derive(Clone)]
pub struct Sources {
    /// The discovery node.
    pub node: NodeHandle,
    /// A slave's jobs and counters.
    pub slave: Option<Arc<SlaveMonitor>>,
    /// A slave's log targets (lines forwarded to masters).
    pub logs: Option<Arc<LogTargets>>,
    /// A daemon's control socket clients.
    pub control: Option<Arc<crate::node::control::ControlClients>>,
    /// The node's own tags (for its own target in `/sd`).
    pub tags: std::collections::BTreeMap<String, String>,
}

/// Binds the endpoint's listener (so that a bad address is an error at start).
pub async fn bind(opts: &HttpOptions) -> std::io::Result<TcpListener> {
    TcpListener::bind(opts.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for HTTP on {}: {e}", opts.listen),
        )
    })
}

/// Serves HTTP on `listener` for ever.
///
/// ```no_run
/// # async fn demo(node: localnet::NodeHandle) -> std::io::Result<()> {
/// use localnet::http::{HttpOptions, Sources, bind, serve};
/// let listen = "127.0.0.1:9464".parse().unwrap();
/// let opts = HttpOptions { listen, sd_port: None, release_when_idle: false };
/// let listener = bind(&opts).await?;
/// let sources = Sources { node, slave: None, logs: None, control: None, tags: Default::default() };
/// serve(listener, sources, opts).await;
/// # Ok(()) }
/// ```
pub async fn serve(listener: TcpListener, sources: Sources, opts: HttpOptions) {
    let sd_port = opts
        .sd_port
        .or_else(|| listener.local_addr().ok().map(|a| a.port()))
        .unwrap_or(opts.listen.port());
    let listen = listener.local_addr().unwrap_or(opts.listen);
    let state = Arc::new(State {
        sources,
        sd_port,
        listen,
        events: metrics::EventCounts::default(),
        started: tokio::time::Instant::now(),
        last_request_ms: AtomicU64::new(0),
        request_seen: tokio::sync::Notify::new(),
    });
    tokio::spawn(count_events(state.clone()));
    if opts.release_when_idle {
        tokio::spawn(release_when_idle(state.clone()));
    }
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP: too many connections, one closed");
            continue; // dropping the stream closes it
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move {
                    state.seen_request();
                    Ok::<_, Infallible>(route(&state, request).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                tracing::debug!(%peer, %err, "HTTP connection ended");
            }
        });
    }
}

/// What the handlers share.
struct State {
    sources: Sources,
    sd_port: u16,
    /// Where this endpoint listens.
    listen: SocketAddr,
    events: metrics::EventCounts,
    started: tokio::time::Instant,
    /// When the last request came, in ms since `started`.
    last_request_ms: AtomicU64,
    /// Wakes the task that gives code pages back once requests stop.
    request_seen: tokio::sync::Notify,
}

impl State {
    fn seen_request(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_request_ms.store(now, Ordering::Relaxed);
        self.request_seen.notify_one();
    }

    fn idle_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_request_ms.load(Ordering::Relaxed)))
    }
}

/// After each burst of requests, once none has come for [`RELEASE_WHEN_IDLE`], gives
/// back the code pages serving faulted in (an event stream that stays open keeps the
/// page's polling, so a watched node keeps them).
async fn release_when_idle(state: Arc<State>) {
    loop {
        state.request_seen.notified().await;
        loop {
            let idle = state.idle_for();
            if idle >= RELEASE_WHEN_IDLE {
                break;
            }
            tokio::time::sleep(RELEASE_WHEN_IDLE - idle).await;
        }
        crate::memory::release_unused_code();
    }
}

/// Counts the node's peer events for `/metrics`.
async fn count_events(state: Arc<State>) {
    let mut events = state.sources.node.subscribe();
    loop {
        match events.recv().await {
            Ok(event) => state.events.count(&event),
            Err(RecvError::Lagged(n)) => state.events.lagged(n),
            Err(RecvError::Closed) => return,
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}

fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => respond(StatusCode::OK, "application/json", bytes),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot encode: {e}\n"),
        ),
    }
}

fn unavailable(why: impl std::fmt::Display) -> Response<Body> {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain; charset=utf-8",
        format!("the node does not answer: {why}\n"),
    )
}

async fn route(state: &State, request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served here\n",
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let node = &state.sources.node;
    match request.uri().path() {
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" => match metrics::render(state, node).await {
            Ok(text) => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => unavailable(e),
        },
        "/sd" => match (node.status().await, node.peers().await) {
            (Ok(status), Ok(peers)) => {
                let mut groups = vec![own_target(state, &status)];
                groups.extend(service_discovery(&peers, state.sd_port));
                json(&groups)
            }
            (Err(e), _) | (_, Err(e)) => unavailable(e),
        },
        "/peers" => match node.peers().await {
            Ok(peers) => json(&peers),
            Err(e) => unavailable(e),
        },
        "/status" => match node.status().await {
            Ok(status) => json(&status),
            Err(e) => unavailable(e),
        },
        "/jobs" => match &state.sources.slave {
            Some(monitor) => json(&monitor.running()),
            None => json(&Vec::<()>::new()),
        },
        "/events" => event_stream(node),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not here: try /, /metrics, /sd, /peers, /events, /status or /jobs\n",
        ),
    }
}

/// One target group of Prometheus's HTTP service discovery (`http_sd_configs`).
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `IP:PORT` of the target.
    pub targets: Vec<String>,
    /// Its labels: `localnet_name`, `localnet_role`, `localnet_id`, and each tag as
    /// `localnet_tag_<key>` (the key's characters outside `[a-zA-Z0-9_]` as `_`).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The node's own target: the address this endpoint listens on (when it names one;
/// else the node's first unicast address that is not loopback).
fn own_target(state: &State, status: &crate::Status) -> TargetGroup {
    let ip = match state.listen.ip() {
        ip if !ip.is_unspecified() => ip,
        _ => status
            .unicast
            .iter()
            .map(|a| a.ip())
            .find(|ip| !ip.is_loopback())
            .unwrap_or(state.listen.ip()),
    };
    TargetGroup {
        targets: vec![SocketAddr::new(ip, state.sd_port).to_string()],
        labels: labels(
            &status.name,
            &status.role,
            &status.id.to_string(),
            &state.sources.tags,
        ),
    }
}

/// The labels of a target.
fn labels(
    name: &str,
    role: &str,
    id: &str,
    tags: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("localnet_name".to_string(), name.to_string());
    labels.insert("localnet_role".to_string(), role.to_string());
    labels.insert("localnet_id".to_string(), id.to_string());
    for (key, value) in tags {
        let key: String = key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        labels.insert(format!("localnet_tag_{key}"), value.clone());
    }
    labels
}

/// Every alive peer as a target at `port` of its address, with its name, role, id and
/// tags as labels (`/sd` adds the node itself).
///
/// ```
/// let groups = localnet::http::service_discovery(&[], 9464);
/// assert!(groups.is_empty());
/// ```
pub fn service_discovery(peers: &[crate::Peer], port: u16) -> Vec<TargetGroup> {
    peers
        .iter()
        .filter(|p| p.state == crate::PeerState::Alive)
        .map(|p| TargetGroup {
            targets: vec![SocketAddr::new(p.addr.ip(), port).to_string()],
            labels: labels(&p.name, &p.role, &p.id.to_string(), &p.tags),
        })
        .collect()
}

/// Peer events as server-sent events (`event: joined`, `data: {"event":..,"peer":..}`),
/// with a comment every [`EVENT_KEEPALIVE`]; `event: resync` when events were missed
/// (the client then reads `/peers` again).
fn event_stream(node: &NodeHandle) -> Response<Body> {
    let (mut sender, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(16);
    let mut events = node.subscribe();
    tokio::spawn(async move {
        if sender
            .send_data(Bytes::from_static(b": localnet events\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let chunk = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        let kind = match &event {
                            crate::PeerEvent::Joined(_) => "joined",
                            crate::PeerEvent::Updated(_) => "updated",
                            crate::PeerEvent::Left(_) => "left",
                            crate::PeerEvent::Failed(_) => "failed",
                        };
                        let data = serde_json::to_string(&event).unwrap_or_default();
                        format!("event: {kind}\ndata: {data}\n\n")
                    }
                    Err(RecvError::Lagged(_)) => "event: resync\ndata: {}\n\n".to_string(),
                    Err(RecvError::Closed) => return,
                },
                () = tokio::time::sleep(EVENT_KEEPALIVE) => ": keepalive\n\n".to_string(),
            };
            // A client that reads nothing holds 16 chunks, then this waits (the node's
            // broadcast queue drops events for it instead, and it is told to resync).
            if sender.send_data(Bytes::from(chunk)).await.is_err() {
                return; // the client went away
            }
        }
    });
    let mut response = Response::new(body.boxed());
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}
