//! The control socket: how `localnet peers`, `watch` and `status` talk to a daemon.
//!
//! This module owns the Unix socket protocol (JSON lines), its server side inside the
//! daemon and its client side. One request per line:
//!
//! ```text
//! {"cmd":"peers"}                              -> {"ok":true,"peers":[...]}
//! {"cmd":"peers","wait_for":3,"timeout_ms":500} -> answers once 3 peers are known, or at the timeout
//! {"cmd":"status"}                             -> {"ok":true,"status":{...}}
//! {"cmd":"watch"}                              -> {"ok":true}, then {"event":"joined","peer":{...}} per event
//! anything else                                -> {"ok":false,"error":"..."}
//! ```

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;

use crate::discovery::peers::{Peer, PeerEvent};
use crate::node::NodeHandle;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Longest a client waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Most clients served at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends no request for this long is closed (a `watch` stream is not idle).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that takes no answer or event for this long is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the control socket is when none is named: `$LOCALNET_CONTROL`, else
/// `/run/localnet/control.sock` for root or when it exists (the system daemon's, which
/// members of the `localnet` group may use), else `$XDG_RUNTIME_DIR/localnet.sock`
/// (else `/tmp/localnet-<uid>.sock`).
pub fn default_path() -> PathBuf {
    if let Some(path) = explicit_path(None) {
        return path;
    }
    // SAFETY: geteuid cannot fail and has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let system = PathBuf::from("/run/localnet/control.sock");
    if uid == 0 || system.exists() {
        return system;
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("localnet.sock"),
        None => PathBuf::from(format!("/tmp/localnet-{uid}.sock")),
    }
}

/// The control socket a user named: `named` (a `--control` option), else
/// `$LOCALNET_CONTROL`; `None` when neither names one. A named socket that does not
/// answer is an error, never a reason to discover without a daemon.
pub fn explicit_path(named: Option<&Path>) -> Option<PathBuf> {
    named.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("LOCALNET_CONTROL")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    })
}

/// Connects to the daemon on an explicitly named socket: one that does not answer is
/// [`ControlError::NamedNotAnswering`].
pub async fn connect_named(path: &Path) -> Result<ControlClient, ControlError> {
    ControlClient::connect(path).await.map_err(|e| match e {
        ControlError::NoDaemon(p) => ControlError::NamedNotAnswering(p),
        other => other,
    })
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon answers on {0}")]
    /// No daemon answers on the default control socket (path held).
    NoDaemon(String),
    #[error(
        "no daemon answers on {0}, the control socket that was named (--control or \
         $LOCALNET_CONTROL); start one with `localnet daemon --control {0}`, or name no socket \
         to discover without a daemon"
    )]
    /// No daemon answers on a control socket that was named explicitly (path held).
    NamedNotAnswering(String),
    #[error("another localnet daemon is already serving {0}")]
    /// Another daemon already serves this control socket (path held).
    InUse(String),
    #[error("control socket {path}: {source}")]
    /// An I/O error on the control socket.
    Io {
        /// The control socket's path.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    #[error(
        "{path} is {what}, not a control socket; it was left as it is. \
         Choose another path with --control (or $LOCALNET_CONTROL), or move that file away"
    )]
    /// The control socket's path holds a file that is not a socket; it is left alone.
    NotASocket {
        /// The path.
        path: String,
        /// What the file is (a regular file, a directory, ...).
        what: &'static str,
    },
    #[error("the daemon answered something unexpected: {0}")]
    /// The daemon's answer could not be understood (error held).
    Protocol(String),
    #[error("the daemon on {0} closed the connection (it stopped)")]
    /// The daemon closed the connection, e.g. because it stopped (path held).
    Closed(String),
    #[error(
        "control socket path {path} is {len} bytes long: Unix sockets take at most \
         {MAX_SOCKET_PATH}; choose a shorter --control path"
    )]
    /// The control socket's path is too long for a Unix socket address.
    PathTooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    #[error("the daemon refused: {0}")]
    /// The daemon answered the request with an error (its message held).
    Refused(String),
}

/// A bound control socket; its file is removed when this is dropped, if it is still the
/// socket this daemon bound (never a file someone else put there since).
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file as bound.
    identity: Option<(u64, u64)>,
    clients: std::sync::Arc<ControlClients>,
}

/// How many clients a control socket serves, for metrics.
#[derive(Debug, Default)]
pub struct ControlClients {
    /// Clients connected now.
    pub connected: std::sync::atomic::AtomicU64,
    /// Clients served since the socket was bound.
    pub served: std::sync::atomic::AtomicU64,
    /// Clients turned away (over [`MAX_CLIENTS`]).
    pub refused: std::sync::atomic::AtomicU64,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.identity.is_some() && file_identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` less its final NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A socket path that fits in a Unix socket address, else an error that says so.
fn check_length(path: &Path) -> Result<(), ControlError> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong {
            path: path.display().to_string(),
            len,
        });
    }
    Ok(())
}

/// Device and inode of `path` when it is a socket (not following a symlink).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type()
        .is_socket()
        .then(|| (meta.dev(), meta.ino()))
}

/// What sits at a path, in words, for an error message.
fn describe_file_type(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "something that is not a socket"
    }
}

impl ControlSocket {
    /// Binds `path` (mode 0660), creating its directory. A stale socket is replaced; a
    /// live one (another daemon answers) is an error, and so is anything at `path` that
    /// is not a socket (it is never removed).
    pub async fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.display().to_string(),
            source,
        };
        check_length(path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if file_identity(path).is_none() {
                return Err(ControlError::NotASocket {
                    path: path.display().to_string(),
                    what: describe_file_type(&meta),
                });
            }
            // Only a socket that refuses connections is stale: one we may not connect
            // to, or whose backlog is full, may still be another daemon's.
            match UnixStream::connect(path).await {
                Ok(_) => return Err(ControlError::InUse(path.display().to_string())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(source) => return Err(io_err(source)),
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            identity: file_identity(path),
            clients: Default::default(),
        })
    }

    /// Its client counts (shared: they move as it serves).
    pub fn clients(&self) -> std::sync::Arc<ControlClients> {
        self.clients.clone()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until the task is dropped: at most [`MAX_CLIENTS`] at once, each
    /// closed after [`IDLE_TIMEOUT`] without a request.
    pub async fn serve(&self, node: NodeHandle) {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        self.clients.refused.fetch_add(1, Relaxed);
                        tokio::spawn(refuse_busy(stream));
                        continue;
                    };
                    let node = node.clone();
                    let clients = self.clients.clone();
                    clients.served.fetch_add(1, Relaxed);
                    clients.connected.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        if let Err(err) = serve_client(stream, node).await {
                            tracing::debug!(%err, "control client");
                        }
                        clients.connected.fetch_sub(1, Relaxed);
                        drop(permit);
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Tells a client beyond [`MAX_CLIENTS`] why it is closed.
async fn refuse_busy(mut stream: UnixStream) {
    let answer = json!({
        "ok": false,
        "error": format!("the daemon serves {MAX_CLIENTS} control clients at once; try again when one has closed"),
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), write_line(&mut stream, &answer)).await;
}

/// One request of the control protocol.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The peers; with `wait_for`, once that many are known or after `timeout_ms`.
    Peers {
        #[serde(default)]
        /// Answer once this many peers are known (else at the timeout).
        wait_for: Option<usize>,
        #[serde(default)]
        /// The longest wait, in milliseconds.
        timeout_ms: Option<u64>,
    },
    /// Status and counters.
    Status,
    /// A stream of events.
    Watch,
}

/// Parses one request line (without its limit check, which the reader applies); the
/// error is the message sent back to the client.
///
/// ```
/// use localnet::control::{parse_request, Request};
/// assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
/// assert!(parse_request(b"hello").unwrap_err().starts_with("bad request"));
/// ```
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice::<Request>(line)
        .map_err(|e| format!("bad request: {e}; expected {{\"cmd\":\"peers|status|watch\"}}"))
}

async fn serve_client(stream: UnixStream, node: NodeHandle) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let Ok(n) = tokio::time::timeout(IDLE_TIMEOUT, read).await else {
            return Ok(()); // idle: closed
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_REQUEST {
            write_line(
                &mut write,
                &json!({"ok": false, "error": "request too long"}),
            )
            .await?;
            return Ok(());
        }
        let request = match parse_request(&line) {
            Ok(r) => r,
            Err(error) => {
                write_line(&mut write, &json!({"ok": false, "error": error})).await?;
                continue;
            }
        };
        let answer = match request {
            Request::Peers {
                wait_for,
                timeout_ms,
            } => {
                let peers = match wait_for {
                    Some(n) => {
                        let timeout =
                            Duration::from_millis(timeout_ms.unwrap_or(1000).min(3_600_000));
                        node.wait_for(n, timeout).await
                    }
                    None => node.peers().await,
                };
                match peers {
                    Ok(peers) => json!({"ok": true, "peers": peers}),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                }
            }
            Request::Status => match node.status().await {
                Ok(status) => json!({"ok": true, "status": status}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            Request::Watch => {
                let mut events = node.subscribe();
                write_line(&mut write, &json!({"ok": true})).await?;
                loop {
                    match events.recv().await {
                        Ok(event) => write_line(&mut write, &serde_json::to_value(&event)?).await?,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            write_line(&mut write, &json!({"event": "lagged", "missed": n})).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                }
            }
        };
        write_line(&mut write, &answer).await?;
    }
}

async fn write_line<W: AsyncWriteExt + Unpin>(w: &mut W, value: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value)?;
    bytes.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&bytes)).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client reads nothing",
        )),
    }
}

/// A connection to a daemon's control socket.
pub struct ControlClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    path: PathBuf,
}

impl ControlClient {
    /// Connects; [`ControlError::NoDaemon`] when nothing listens there.
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        check_length(path)?;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ControlError::NoDaemon(path.display().to_string()));
            }
            Ok(Err(source)) => {
                return Err(ControlError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
            Err(_) => return Err(ControlError::NoDaemon(path.display().to_string())),
        };
        let (read, writer) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(read),
            writer,
            path: path.to_path_buf(),
        })
    }

    fn io_err(&self, source: io::Error) -> ControlError {
        ControlError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Sends one request and reads one answer line.
    /// A connection the daemon closed (it closes idle clients after [`IDLE_TIMEOUT`]) is
    /// opened again once; a daemon that stopped is then [`ControlError::NoDaemon`].
    pub async fn request(&mut self, request: &Value) -> Result<Value, ControlError> {
        match self.request_once(request).await {
            Err(ControlError::Closed(_)) | Err(ControlError::Io { .. }) => {
                *self = Self::connect(&self.path).await?;
                self.request_once(request).await
            }
            answer => answer,
        }
    }

    async fn request_once(&mut self, request: &Value) -> Result<Value, ControlError> {
        write_line(&mut self.writer, request)
            .await
            .map_err(|e| self.io_err(e))?;
        self.next_line().await
    }

    /// Reads the next line (an answer or a streamed event).
    pub async fn next_line(&mut self) -> Result<Value, ControlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| self.io_err(e))?;
        if n == 0 {
            return Err(ControlError::Closed(self.path.display().to_string()));
        }
        let value: Value =
            serde_json::from_str(&line).map_err(|e| ControlError::Protocol(e.to_string()))?;
        if value.get("ok") == Some(&Value::Bool(false)) {
            let error = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(ControlError::Refused(error.to_string()));
        }
        Ok(value)
    }

    /// The daemon's peers; with `wait_for`, once that many are known or at `timeout`.
    pub async fn peers(
        &mut self,
        wait_for: Option<usize>,
        timeout: Duration,
    ) -> Result<Vec<Peer>, ControlError> {
        let request = match wait_for {
            Some(n) => {
                json!({"cmd": "peers", "wait_for": n, "timeout_ms": timeout.as_millis() as u64})
            }
            None => json!({"cmd": "peers"}),
        };
        let answer = self.request(&request).await?;
        serde_json::from_value(answer.get("peers").cloned().unwrap_or(Value::Null))
            .map_err(|e| ControlError::Protocol(e.to_string()))
    }

    /// The daemon's status object.
    pub async fn status(&mut self) -> Result<Value, ControlError> {
        let answer = self.request(&json!({"cmd": "status"})).await?;
        answer
            .get("status")
            .cloned()
            .ok_or_else(|| ControlError::Protocol("no status in answer".into()))
    }

    /// Starts watching; then call [`ControlClient::next_event`] repeatedly.
    pub async fn watch(&mut self) -> Result<(), ControlError> {
        self.request(&json!({"cmd": "watch"})).await.map(|_| ())
    }

    /// The next event of a watch (`None` for a "lagged" notice, with the count logged).
    pub async fn next_event(&mut self) -> Result<Option<PeerEvent>, ControlError> {
        let value = self.next_line().await?;
        if value.get("event").and_then(Value::as_str) == Some("lagged") {
            tracing::warn!(missed = %value["missed"], "watch fell behind; events were missed");
            return Ok(None);
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ControlError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("localnet-ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_file_at_the_control_path_is_refused_and_kept() {
        let dir = scratch("file");
        let path = dir.join("cluster.key");
        std::fs::write(&path, "precious\n").unwrap();
        match ControlSocket::bind(&path).await {
            Err(ControlError::NotASocket { what, .. }) => assert_eq!(what, "a regular file"),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("bound over a regular file"),
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious\n");
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            ControlSocket::bind(&sub).await,
            Err(ControlError::NotASocket {
                what: "a directory",
                ..
            })
        ));
        assert!(sub.is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_removed_on_drop() {
        let dir = scratch("stale");
        let path = dir.join("c.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves a stale file
        let socket = ControlSocket::bind(&path)
            .await
            .expect("stale socket replaced");
        assert!(path.exists());
        drop(socket);
        assert!(!path.exists(), "the daemon's own socket is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn drop_leaves_a_file_that_replaced_the_socket() {
        let dir = scratch("replaced");
        let path = dir.join("c.sock");
        let socket = ControlSocket::bind(&path).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's\n").unwrap();
        drop(socket);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
