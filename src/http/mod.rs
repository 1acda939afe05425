//! The HTTP endpoint of a daemon or slave (`--http ADDR`, off unless asked).
//!
//! This module owns the HTTP side of a node: the listener and its connections (at most
//! [`MAX_CONNECTIONS`], each with a deadline for its request headers; requests parsed
//! by `httparse`, answers written here: five GET routes need no HTTP framework, and
//! an idle node keeps less code resident without one), and the routes:
//! `/metrics` (Prometheus text format, built in [`metrics`] from the node's counters at
//! each scrape), `/sd` (Prometheus HTTP service discovery: the node and every
//! verified peer as a target), `/peers` (the peer table as JSON), `/events` (peer events as server-sent
//! events), `/jobs` (a slave's running commands) and `/` (a live status page, one
//! self-contained HTML file). It only reads the node: nothing here changes what the
//! node does.

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;

use crate::node::NodeHandle;
use crate::runtime::jobs::SlaveMonitor;
use crate::runtime::logs::LogTargets;

/// Most HTTP connections served at once (event streams included); one more is closed
/// at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send a request's head (request line and headers), from its
/// first byte or from the end of the previous answer.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may wait for it to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
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
            if let Err(err) = serve_connection(stream, &state).await {
                tracing::debug!(%peer, %err, "HTTP connection ended");
            }
        });
    }
}

/// Most bytes of a request's head (request line and headers).
const MAX_HEAD: usize = 8192;

/// Serves the requests of one connection (kept open between requests, as Prometheus
/// and browsers do) until the client closes it, sends something that is not a GET of
/// ours, or is silent for [`HEADER_TIMEOUT`] before a request.
async fn serve_connection(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        // The head of the next request, whole within the deadline (however it trickles).
        let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
        let (head_len, method, path, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let header = |name: &str| {
                        request
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                    };
                    // A body (none of our routes takes one) is not read: answer, close.
                    let body = header("content-length").is_some_and(|v| v.trim() != "0")
                        || header("transfer-encoding").is_some();
                    let close = body
                        || header("connection").is_some_and(|v| v.contains("close"))
                        || request.version == Some(0);
                    let method = request.method.unwrap_or("").to_string();
                    let path = request.path.unwrap_or("/").to_string();
                    break (len, method, path, close);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    let answer = Answer::text(431, "the request's head is too long\n");
                    return write_answer(&mut stream, &answer, true, true).await;
                }
                Err(e) => {
                    let answer = Answer::text(400, format!("not an HTTP request: {e}\n"));
                    return write_answer(&mut stream, &answer, true, true).await;
                }
            }
            let mut chunk = [0u8; 2048];
            let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(read) => read?,
                Err(_) => return Ok(()), // silent: closed
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head_len);
        state.seen_request();
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            let mut answer = Answer::text(405, "only GET is served here\n");
            answer.allow = true;
            return write_answer(&mut stream, &answer, false, true).await;
        }
        // The path without a query.
        let path = path.split(['?', '#']).next().unwrap_or("/");
        if path == "/events" {
            return event_stream(&mut stream, &state.sources.node, head_only).await;
        }
        let answer = route(state, path).await;
        write_answer(&mut stream, &answer, head_only, close).await?;
        if close {
            return Ok(());
        }
    }
}

/// A response with a body.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Say which methods are served (a 405).
    allow: bool,
}

impl Answer {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            allow: false,
        }
    }

    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }
}

/// The reason phrase of the statuses we send.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn write_answer(
    stream: &mut TcpStream,
    answer: &Answer,
    head_only: bool,
    close: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    )
    .into_bytes();
    if answer.allow {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&answer.body);
    }
    write_within(stream, &out).await?;
    if close {
        let _ = stream.shutdown().await;
    }
    Ok(())
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
    let mut released_at_ms = 0;
    loop {
        state.request_seen.notified().await;
        if state.last_request_ms.load(Ordering::Relaxed) <= released_at_ms {
            continue; // a wake-up left from the burst that was just released
        }
        loop {
            let idle = state.idle_for();
            if idle >= RELEASE_WHEN_IDLE {
                break;
            }
            tokio::time::sleep(RELEASE_WHEN_IDLE - idle).await;
        }
        crate::memory::release_unused_code();
        released_at_ms = state.started.elapsed().as_millis() as u64;
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

fn json(value: &impl Serialize) -> Answer {
    match serde_json::to_vec(value) {
        Ok(bytes) => Answer::new(200, "application/json", bytes),
        Err(e) => Answer::text(500, format!("cannot encode: {e}\n")),
    }
}

fn unavailable(why: impl std::fmt::Display) -> Answer {
    Answer::text(503, format!("the node does not answer: {why}\n"))
}

async fn route(state: &State, path: &str) -> Answer {
    let node = &state.sources.node;
    match path {
        "/" => Answer::new(200, "text/html; charset=utf-8", PAGE),
        "/metrics" => match metrics::render(state, node).await {
            Ok(text) => Answer::new(
                200,
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
        _ => Answer::text(
            404,
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
        targets: vec![SocketAddr::new(ip, state.listen.port()).to_string()],
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
        // Two tags that read the same once sanitised (`a-b`, `a.b`): the first stays.
        labels
            .entry(format!("localnet_tag_{key}"))
            .or_insert_with(|| value.clone());
    }
    labels
}

/// Every verified peer in the table (alive or suspect) as a target at `port` of its
/// address, with its name, role, id and tags as labels (`/sd` adds the node itself).
/// A failed peer leaves the table, and so the targets, at the next refresh: alert on
/// `localnet_peer_events_total{event="failed"}` too, not only on `up`.
///
/// ```
/// let groups = localnet::http::service_discovery(&[], 9464);
/// assert!(groups.is_empty());
/// ```
pub fn service_discovery(peers: &[crate::Peer], port: u16) -> Vec<TargetGroup> {
    peers
        .iter()
        // A suspect is still a target (its scrapes tell whether it is down); a peer
        // known only by unverified means (mDNS in a keyed cluster) is not.
        .filter(|p| p.verified)
        .map(|p| TargetGroup {
            targets: vec![SocketAddr::new(p.addr.ip(), port).to_string()],
            labels: labels(&p.name, &p.role, &p.id.to_string(), &p.tags),
        })
        .collect()
}

/// Peer events as server-sent events (`event: joined`, `data: {"event":..,"peer":..}`),
/// with a comment every [`EVENT_KEEPALIVE`]; `event: resync` when events were missed
/// (the client then reads `/peers` again). The stream ends when the client goes; a
/// client that reads nothing fills its socket's buffer and then misses events (the
/// node's queue drops them for it), never holding the node up.
async fn event_stream(
    stream: &mut TcpStream,
    node: &NodeHandle,
    head_only: bool,
) -> std::io::Result<()> {
    let mut events = node.subscribe();
    // No length: the body ends when the connection does.
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
                Connection: close\r\n\r\n";
    write_within(stream, head.as_bytes()).await?;
    if head_only {
        return Ok(());
    }
    write_within(stream, b": localnet events\n\n").await?;
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
                Err(RecvError::Closed) => return Ok(()),
            },
            () = tokio::time::sleep(EVENT_KEEPALIVE) => ": keepalive\n\n".to_string(),
        };
        write_within(stream, chunk.as_bytes()).await?;
    }
}

/// Writes `bytes` within [`WRITE_TIMEOUT`]: a client that does not read loses its
/// connection (and its place among [`MAX_CONNECTIONS`]) instead of holding it.
async fn write_within(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client read nothing for 10 s",
        )),
    }
}
