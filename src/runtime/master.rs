//! The master: finds slaves, and calls, runs, watches and terminates things on them.
//!
//! This module owns the master's side of sessions: one connection per slave (opened on
//! first use, kept alive with pings), requests matched with their answers, command
//! output streamed to the caller in order, slaves' log lines handed to a log sink, and
//! termination with a report of who acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::key::ClusterKey;
use crate::runtime::files;
use crate::runtime::protocol::{
    FEATURE_FILES, FEATURE_INPUT, Frame, INPUT_CHUNK, INPUT_WINDOW, JobExit, NodeId, Stream,
};
use crate::runtime::session::Session as Connection;
use crate::runtime::transport::{self, DEAD_AFTER, TransportError};

/// Errors of master operations.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot connect to {node}: {source}")]
    /// No session to a slave could be opened.
    Connect {
        /// The slave.
        node: NodeId,
        /// Why the connection failed.
        source: TransportError,
    },
    #[error("{node}: {error}")]
    /// The slave answered with an error.
    Remote {
        /// The slave.
        node: NodeId,
        /// The slave's error message.
        error: String,
    },
    #[error("connection to {0} lost")]
    /// The session to the slave (held) ended before the answer.
    Lost(NodeId),
    #[error("{node} did not answer the greeting")]
    /// The slave did not answer the master's `Hello` with a `Welcome`.
    NoWelcome {
        /// The slave.
        node: NodeId,
    },
    #[error(
        "{node} runs an older localnet without {what}: upgrade localnet there (`localnet --version` on both sides)"
    )]
    /// The slave does not do what was asked (it is an older version).
    Unsupported {
        /// The slave.
        node: NodeId,
        /// What it does not do.
        what: &'static str,
    },
    #[error("the job on {0} takes no more input: it has ended")]
    /// Input written to a command or file that has ended (or whose connection is gone).
    InputClosed(NodeId),
    #[error("{}: {source}", path.display())]
    /// A local file of a copy could not be read or written.
    LocalFile {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// What the master does with a slave's log line: `(slave name, line)`. It is called on
/// the runtime: it must not block (the default queues the line for stderr with
/// [`crate::stdio::OutputStream::log_line`], which drops lines rather than wait for a stuck
/// reader).
pub type LogSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One event of a running command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote, exactly as written, in order per stream (chunks do not
    /// follow line boundaries: feed them to a [`LineSplitter`] for lines).
    Output(Stream, Vec<u8>),
    /// The command ended.
    Exit(JobExit),
}

/// Cuts a stream of output chunks into lines.
///
/// ```
/// let mut lines = localnet::LineSplitter::default();
/// assert_eq!(lines.push(b"a\nb"), vec![b"a".to_vec()]);
/// assert_eq!(lines.push(b"c\n\xffd"), vec![b"bc".to_vec()]);
/// assert_eq!(lines.finish(), Some(b"\xffd".to_vec()));
/// assert_eq!(lines.finish(), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Longest line kept whole; a longer one comes out in pieces of this many bytes.
    pub const MAX_LINE: usize = 16 * 1024;

    /// The lines completed by `bytes` (after what came before), without their `\n`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        self.split(bytes, |first, second| {
            let mut line = Vec::with_capacity(first.len() + second.len());
            line.extend_from_slice(first);
            line.extend_from_slice(second);
            lines.push(line);
        });
        lines
    }

    /// Like [`LineSplitter::push`], but appends each completed line to `out` as
    /// `prefix`, the line and `\n`, with no buffer per line (a job's output is often
    /// many short lines).
    ///
    /// ```
    /// let mut lines = localnet::LineSplitter::default();
    /// let mut out = Vec::new();
    /// lines.push_prefixed(b"a\nb", b"s1: ", &mut out);
    /// lines.push_prefixed(b"c\n", b"s1: ", &mut out);
    /// assert_eq!(out, b"s1: a\ns1: bc\n");
    /// ```
    pub fn push_prefixed(&mut self, bytes: &[u8], prefix: &[u8], out: &mut Vec<u8>) {
        self.split(bytes, |first, second| {
            out.extend_from_slice(prefix);
            out.extend_from_slice(first);
            out.extend_from_slice(second);
            out.push(b'\n');
        });
    }

    /// Calls `line(kept, new)` for every completed line: what was kept from before,
    /// then the new bytes of that line.
    fn split(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8], &[u8])) {
        while !bytes.is_empty() {
            let room = Self::MAX_LINE - self.partial.len();
            let window = &bytes[..room.min(bytes.len())];
            match memchr::memchr(b'\n', window) {
                Some(end) => {
                    line(&self.partial, &window[..end]);
                    self.partial.clear();
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.partial.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.partial.len() == Self::MAX_LINE {
                        line(&self.partial, &[]);
                        self.partial.clear();
                    }
                }
            }
        }
    }

    /// The last line, when the stream did not end with a newline.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }
}

enum Pending {
    Call(oneshot::Sender<Result<Value, String>>),
    Exec(mpsc::Sender<ExecEvent>),
    /// A file being fetched: its bytes, then the `Result`.
    Fetch(mpsc::Sender<Fetched>),
}

/// What comes of a file being fetched from a slave.
enum Fetched {
    Data(Vec<u8>),
    Done(Result<Value, String>),
}

/// A slave's session, or none yet; locked while it is being opened.
type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// What a slot holds.
#[derive(Default)]
struct SlotState {
    session: Option<Arc<Session>>,
    /// Why the last connection opened ahead ([`Master::prepare`]) failed: the next
    /// request gets this error instead of trying again at once.
    failed: Option<MasterError>,
}

struct Session {
    node: NodeId,
    name: String,
    tags: BTreeMap<String, String>,
    /// What the slave said it does beyond the first protocol (`Welcome`).
    features: Vec<String>,
    out: mpsc::Sender<Frame>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    /// The input credit of each command or file that takes input: permits are `Input`
    /// frames the master may still send before the slave says it took one. Closed when
    /// the job ends or the connection is lost.
    credits: Mutex<HashMap<u64, Arc<Semaphore>>>,
    terminating: Mutex<Option<oneshot::Sender<()>>>,
    next_id: AtomicU64,
    /// Its reader ended (the slave closed, went silent or sent a bad frame): the next
    /// request opens a new connection instead of queueing on one nobody reads.
    lost: std::sync::atomic::AtomicBool,
}

impl Session {
    /// An error unless the slave named `feature` in its greeting.
    fn require(&self, feature: &str, what: &'static str) -> Result<(), MasterError> {
        match self.features.iter().any(|f| f == feature) {
            true => Ok(()),
            false => Err(MasterError::Unsupported {
                node: self.node,
                what,
            }),
        }
    }

    /// Request `id` has ended: writers of its input stop waiting for room.
    fn end_input(&self, id: u64) {
        if let Some(credit) = self.credits.lock().ok().and_then(|mut c| c.remove(&id)) {
            credit.close();
        }
    }

    /// Neither end has closed it: requests can go on it.
    fn usable(&self) -> bool {
        !self.out.is_closed() && !self.lost.load(Ordering::Acquire)
    }
}

/// Connections to slaves, and what runs on them.
///
/// ```no_run
/// # async fn demo(master: localnet::Master, slaves: Vec<localnet::NodeId>) -> Result<(), localnet::MasterError> {
/// master.redirect_logs_here(&slaves).await?;
/// for s in &slaves {
///     let answer = master.call(*s, "square", serde_json::json!(7)).await?;
///     println!("{s}: {answer}");
/// }
/// let report = master.terminate_all_slaves().await;
/// println!("acknowledged: {:?}", report.acknowledged);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Master {
    inner: Arc<MasterInner>,
}

struct MasterInner {
    name: String,
    key: Option<ClusterKey>,
    /// One slot per slave; a slot's lock is held while its connection is opened, so
    /// connections to different slaves open in parallel and one slave gets one.
    sessions: Mutex<HashMap<NodeId, Slot>>,
    known: Mutex<Vec<NodeId>>,
    log_sink: LogSink,
    /// How long opening a connection (TCP, handshake, greeting) may take, in ms.
    connect_timeout_ms: AtomicU64,
}

/// Who acknowledged a terminate, and who did not in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TerminateReport {
    /// Slaves that said they are terminating.
    pub acknowledged: Vec<NodeId>,
    /// Slaves that did not answer in time, or could not be reached (with why).
    pub failed: Vec<(NodeId, String)>,
}

/// How long a slave has to acknowledge a terminate.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(2);

impl Master {
    /// A master named `name`, using `key` for connections; slaves' log lines go to
    /// `log_sink` (default: stderr as `name: line`, never blocking the runtime).
    pub fn new(name: &str, key: Option<ClusterKey>, log_sink: Option<LogSink>) -> Self {
        let log_sink = log_sink.unwrap_or_else(|| {
            let stderr = crate::stdio::OutputStream::new(crate::stdio::Target::Stderr);
            Arc::new(move |slave: &str, line: &str| stderr.log_line(&format!("{slave}: {line}")))
        });
        Self {
            inner: Arc::new(MasterInner {
                name: name.to_string(),
                key,
                sessions: Mutex::new(HashMap::new()),
                known: Mutex::new(Vec::new()),
                log_sink,
                connect_timeout_ms: AtomicU64::new(transport::HANDSHAKE_TIMEOUT.as_millis() as u64),
            }),
        }
    }

    /// How long opening a connection to a slave may take (TCP, handshake and
    /// greeting together) before the slave counts as unreachable; default
    /// [`transport::HANDSHAKE_TIMEOUT`]. For connections opened after the call.
    ///
    /// ```
    /// let master = localnet::Master::new("m", None, None);
    /// master.set_connect_timeout(std::time::Duration::from_millis(500));
    /// ```
    pub fn set_connect_timeout(&self, timeout: std::time::Duration) {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.inner.connect_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Remembers slaves found by discovery (what `terminate_all_slaves` ends).
    pub fn add_known(&self, slaves: &[NodeId]) {
        if let Ok(mut known) = self.inner.known.lock() {
            for s in slaves {
                if !known.contains(s) {
                    known.push(*s);
                }
            }
        }
    }

    /// The slaves known to this master.
    pub fn known_slaves(&self) -> Vec<NodeId> {
        self.inner
            .known
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    /// The name a connected slave gave, or its node id.
    pub async fn slave_name(&self, node: NodeId) -> String {
        match self.open_session(node).await {
            Some(s) => s.name.clone(),
            None => node.to_string(),
        }
    }

    /// The tags a connected slave announced in its greeting.
    pub async fn slave_tags(&self, node: NodeId) -> Option<BTreeMap<String, String>> {
        self.open_session(node).await.map(|s| s.tags.clone())
    }

    /// Connects to `node` (once; later calls reuse the connection).
    pub async fn connect(&self, node: NodeId) -> Result<(), MasterError> {
        self.session(node).await.map(|_| ())
    }

    /// The slot of `node`, made on first use.
    fn slot(&self, node: NodeId) -> Slot {
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sessions.entry(node).or_default().clone()
    }

    /// The session with `node` if one is open (waiting for a connection in progress).
    async fn open_session(&self, node: NodeId) -> Option<Arc<Session>> {
        let slot = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .cloned()?;
        slot.lock().await.session.clone()
    }

    /// Opens the connection to `node` now, ahead of its first use, and keeps the
    /// outcome: the next request uses the connection, or gets the error (then later
    /// ones try again). `localnet master` calls it for each slave as soon as discovery
    /// finds it, so that the connections are ready when the search ends.
    pub async fn prepare(&self, node: NodeId) {
        let slot = self.slot(node);
        let mut slot = slot.lock().await;
        if slot.session.as_ref().is_some_and(|s| s.usable()) {
            return;
        }
        match self.open(node).await {
            Ok(session) => slot.session = Some(session),
            Err(err) => slot.failed = Some(err),
        }
    }

    async fn session(&self, node: NodeId) -> Result<Arc<Session>, MasterError> {
        let slot = self.slot(node);
        let mut slot = slot.lock().await;
        if let Some(s) = slot.session.as_ref()
            && s.usable()
        {
            return Ok(s.clone());
        }
        if let Some(err) = slot.failed.take() {
            return Err(err);
        }
        let session = self.open(node).await?;
        slot.session = Some(session.clone());
        Ok(session)
    }

    /// Connects to `node` and exchanges the greeting (its slot is held by the caller).
    async fn open(&self, node: NodeId) -> Result<Arc<Session>, MasterError> {
        let timeout = Duration::from_millis(self.inner.connect_timeout_ms.load(Ordering::Relaxed));
        let opened = tokio::time::Instant::now();
        let (reader, writer) =
            transport::connect_within(node.addr(), self.inner.key.as_ref(), timeout)
                .await
                .map_err(|source| MasterError::Connect { node, source })?;
        let mut connection = Connection::start(reader, writer);
        let _ = connection
            .send(Frame::Hello {
                name: self.inner.name.clone(),
            })
            .await;
        let (name, tags, features) = loop {
            // The greeting counts in the connect timeout too.
            let left = timeout.saturating_sub(opened.elapsed());
            match connection.recv(DEAD_AFTER.min(left)).await {
                Ok(Some(Frame::Welcome {
                    name,
                    tags,
                    features,
                    ..
                })) => break (name, tags, features),
                Ok(Some(Frame::Ping)) => continue,
                Ok(_) => return Err(MasterError::NoWelcome { node }),
                Err(err) => {
                    tracing::debug!(%node, %err, "no greeting from the slave");
                    return Err(MasterError::NoWelcome { node });
                }
            }
        };
        let session = Arc::new(Session {
            node,
            name,
            tags,
            features,
            out: connection.sender(),
            pending: Arc::new(Mutex::new(HashMap::new())),
            credits: Mutex::new(HashMap::new()),
            terminating: Mutex::new(None),
            next_id: AtomicU64::new(1),
            lost: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(read_loop(
            connection,
            session.clone(),
            self.inner.log_sink.clone(),
        ));
        Ok(session)
    }

    /// Asks slaves to send their log lines here (to the log sink), tagged with their names.
    pub async fn redirect_logs_here(&self, slaves: &[NodeId]) -> Result<(), MasterError> {
        for node in slaves {
            let s = self.session(*node).await?;
            s.out
                .send(Frame::RedirectLogs { on: true })
                .await
                .map_err(|_| MasterError::Lost(*node))?;
        }
        Ok(())
    }

    /// Calls the registered function `name` on `node` and waits for its result.
    pub async fn call(&self, node: NodeId, name: &str, arg: Value) -> Result<Value, MasterError> {
        self.spawn(node, name, arg).await?.join().await
    }

    /// Starts the registered function `name` on `node`; await or kill it with the handle.
    pub async fn spawn(
        &self,
        node: NodeId,
        name: &str,
        arg: Value,
    ) -> Result<RemoteTask, MasterError> {
        let s = self.session(node).await?;
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = s.pending.lock() {
            p.insert(id, Pending::Call(tx));
        }
        s.out
            .send(Frame::Call {
                id,
                name: name.to_string(),
                arg,
            })
            .await
            .map_err(|_| MasterError::Lost(node))?;
        Ok(RemoteTask { session: s, id, rx })
    }

    /// Runs a command on `node` with `/dev/null` as its stdin; read its output and exit
    /// from the returned handle.
    pub async fn exec(
        &self,
        node: NodeId,
        argv: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<CommandJob, MasterError> {
        Ok(self.start_command(node, argv, timeout, false).await?.0)
    }

    /// Runs a command on `node` whose stdin is what is written to the returned
    /// [`JobInput`] (ended by [`JobInput::finish`]); read its output and exit from the
    /// [`CommandJob`]. Writing waits while the slave has [`INPUT_WINDOW`] chunks not
    /// yet taken by the command: a command that reads slowly slows the writer down,
    /// and memory stays bounded on both sides. Read the output while writing (as
    /// below): a command that writes as it reads (`cat`) stops taking input while
    /// its output is not read, and so does every command of that slave.
    ///
    /// ```no_run
    /// # async fn demo(master: localnet::Master, slave: localnet::NodeId) -> Result<(), localnet::MasterError> {
    /// let (mut job, input) = master.exec_with_input(slave, vec!["wc".into(), "-l".into()], None).await?;
    /// let write = async {
    ///     input.write(b"one\ntwo\n").await?;
    ///     input.finish().await
    /// };
    /// let read = async {
    ///     while let Some(event) = job.next().await {
    ///         println!("{event:?}"); // Output(Stdout, b"2\n"), then Exit(..)
    ///     }
    /// };
    /// let (written, ()) = tokio::join!(write, read);
    /// written?;
    /// # Ok(()) }
    /// ```
    pub async fn exec_with_input(
        &self,
        node: NodeId,
        argv: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<(CommandJob, JobInput), MasterError> {
        let (job, input) = self.start_command(node, argv, timeout, true).await?;
        let input = input.ok_or(MasterError::Lost(node))?;
        Ok((job, input))
    }

    async fn start_command(
        &self,
        node: NodeId,
        argv: Vec<String>,
        timeout: Option<Duration>,
        stdin: bool,
    ) -> Result<(CommandJob, Option<JobInput>), MasterError> {
        let s = self.session(node).await?;
        if stdin {
            s.require(FEATURE_INPUT, "a command's stdin")?;
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        if let Ok(mut p) = s.pending.lock() {
            p.insert(id, Pending::Exec(tx));
        }
        let input = stdin.then(|| JobInput::register(&s, id));
        s.out
            .send(Frame::Exec {
                id,
                argv,
                timeout_ms: timeout.map(|t| t.as_millis() as u64),
                stdin,
            })
            .await
            .map_err(|_| MasterError::Lost(node))?;
        let job = CommandJob {
            node,
            name: s.name.clone(),
            id,
            session: s,
            events: rx,
        };
        Ok((job, input))
    }

    /// Starts writing a file on `node`: `size` bytes, written to the returned
    /// [`FileUpload`], with permission bits `mode`. `remote` is an absolute path on the
    /// slave: an existing directory there gets a file `name` inside it (with
    /// `into_dir`, it must be a directory), anything else is the file's own path.
    /// The slave renames the file into place only once its size and SHA-256 match.
    pub async fn put_file_from(
        &self,
        node: NodeId,
        remote: &str,
        name: &str,
        mode: u32,
        size: u64,
        into_dir: bool,
    ) -> Result<FileUpload, MasterError> {
        let s = self.session(node).await?;
        s.require(FEATURE_FILES, "copies")?;
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = s.pending.lock() {
            p.insert(id, Pending::Call(tx));
        }
        let input = JobInput::register(&s, id);
        s.out
            .send(Frame::PutFile {
                id,
                path: remote.to_string(),
                name: name.to_string(),
                mode,
                size,
                into_dir,
            })
            .await
            .map_err(|_| MasterError::Lost(node))?;
        let answer = Some(RemoteTask { session: s, id, rx });
        Ok(FileUpload {
            input,
            answer,
            mode,
        })
    }

    /// Copies the local file `local` to `remote` on `node` (see
    /// [`Master::put_file_from`]), keeping its mode; returns where it went, its size
    /// and SHA-256, as the slave verified them.
    ///
    /// ```no_run
    /// # async fn demo(master: localnet::Master, slave: localnet::NodeId) -> Result<(), localnet::MasterError> {
    /// let copied = master.put_file(slave, "/etc/hosts".as_ref(), "/tmp/").await?;
    /// println!("{} bytes to {}, sha256 {}", copied.bytes, copied.path, copied.sha256);
    /// # Ok(()) }
    /// ```
    pub async fn put_file(
        &self,
        node: NodeId,
        local: &std::path::Path,
        remote: &str,
    ) -> Result<CopiedFile, MasterError> {
        use sha2::Digest;
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncReadExt;
        let local_error = |source| MasterError::LocalFile {
            path: local.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(local_error)?;
        let meta = file.metadata().await.map_err(local_error)?;
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut upload = self
            .put_file_from(
                node,
                remote,
                &name,
                meta.permissions().mode(),
                meta.len(),
                false,
            )
            .await?;
        let mut hasher = sha2::Sha256::new();
        let mut chunk = vec![0; INPUT_CHUNK];
        loop {
            let n = file.read(&mut chunk).await.map_err(local_error)?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            upload.write(&chunk[..n]).await?;
        }
        upload.finish(&hex::encode(hasher.finalize())).await
    }

    /// Starts fetching the file at `remote` (an absolute path) from `node`: read its
    /// bytes and then its mode and digest from the returned [`FileDownload`].
    pub async fn get_file(&self, node: NodeId, remote: &str) -> Result<FileDownload, MasterError> {
        let s = self.session(node).await?;
        s.require(FEATURE_FILES, "copies")?;
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        if let Ok(mut p) = s.pending.lock() {
            p.insert(id, Pending::Fetch(tx));
        }
        s.out
            .send(Frame::GetFile {
                id,
                path: remote.to_string(),
            })
            .await
            .map_err(|_| MasterError::Lost(node))?;
        Ok(FileDownload {
            session: s,
            id,
            done: false,
            events: rx,
        })
    }

    /// Copies the file at `remote` on `node` to the local path `local`, with its mode:
    /// written beside it under a temporary name and renamed into place once its
    /// SHA-256 matches the slave's.
    ///
    /// ```no_run
    /// # async fn demo(master: localnet::Master, slave: localnet::NodeId) -> Result<(), localnet::MasterError> {
    /// let got = master.fetch_file(slave, "/var/log/syslog", "syslog.s1".as_ref()).await?;
    /// println!("{} bytes, sha256 {}", got.bytes, got.sha256);
    /// # Ok(()) }
    /// ```
    pub async fn fetch_file(
        &self,
        node: NodeId,
        remote: &str,
        local: &std::path::Path,
    ) -> Result<CopiedFile, MasterError> {
        use sha2::Digest;
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncWriteExt;
        let local_error = |source| MasterError::LocalFile {
            path: local.to_path_buf(),
            source,
        };
        // The local file first: a fetch that cannot be written is never started.
        let file_name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = local.with_file_name(files::temp_name(&file_name));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .await
            .map_err(local_error)?;
        let guard = files::TempFile::new(temp.clone());
        let mut download = self.get_file(node, remote).await?;
        let mut hasher = sha2::Sha256::new();
        let copied = loop {
            match download.next().await? {
                DownloadEvent::Data(data) => {
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(local_error)?;
                }
                DownloadEvent::Done(copied) => break copied,
            }
        };
        file.flush().await.map_err(local_error)?;
        drop(file);
        let digest = hex::encode(hasher.finalize());
        if digest != copied.sha256 {
            return Err(MasterError::Remote {
                node,
                error: format!(
                    "{remote} arrived damaged or changed while it was sent: sha256 {digest}, the slave's {}",
                    copied.sha256
                ),
            });
        }
        // No set-user-id, set-group-id or sticky bit from a slave (whoever runs one).
        let mode = copied.mode & 0o777;
        tokio::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(local_error)?;
        tokio::fs::rename(&temp, local).await.map_err(local_error)?;
        guard.keep();
        Ok(CopiedFile {
            path: local.to_string_lossy().into_owned(),
            mode,
            ..copied
        })
    }

    /// Tells `node` to kill its jobs and exit; true when it acknowledged in time.
    pub async fn terminate_slave(&self, node: NodeId) -> Result<bool, MasterError> {
        let s = self.session(node).await?;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut t) = s.terminating.lock() {
            *t = Some(tx);
        }
        s.out
            .send(Frame::Terminate)
            .await
            .map_err(|_| MasterError::Lost(node))?;
        Ok(matches!(
            tokio::time::timeout(TERMINATE_TIMEOUT, rx).await,
            Ok(Ok(()))
        ))
    }

    /// Terminates every known slave, all at once.
    pub async fn terminate_all_slaves(&self) -> TerminateReport {
        self.terminate_slaves(&self.known_slaves()).await
    }

    /// Terminates `slaves`, all at once.
    pub async fn terminate_slaves(&self, slaves: &[NodeId]) -> TerminateReport {
        let mut tasks = Vec::new();
        for node in slaves {
            let master = self.clone();
            let node = *node;
            tasks.push(tokio::spawn(async move {
                (node, master.terminate_slave(node).await)
            }));
        }
        let mut report = TerminateReport::default();
        for task in tasks {
            match task.await {
                Ok((node, Ok(true))) => report.acknowledged.push(node),
                Ok((node, Ok(false))) => report.failed.push((
                    node,
                    format!("no acknowledgement within {TERMINATE_TIMEOUT:?}"),
                )),
                Ok((node, Err(e))) => report.failed.push((node, e.to_string())),
                Err(_) => {}
            }
        }
        report.acknowledged.sort();
        report.failed.sort_by_key(|(n, _)| *n);
        report
    }
}

/// A file copied to or from a slave, as verified at the receiving end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiedFile {
    /// Where it was written (on the slave for a put, locally for a fetch).
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
    /// Its permission bits.
    pub mode: u32,
}

impl CopiedFile {
    /// The slave's answer to a put or get, as a `CopiedFile`.
    fn from_answer(node: NodeId, value: &Value, mode: u32) -> Result<Self, MasterError> {
        let bad = || MasterError::Remote {
            node,
            error: format!("unexpected answer to a copy: {value}"),
        };
        Ok(Self {
            path: value["path"].as_str().unwrap_or_default().to_string(),
            bytes: value["bytes"].as_u64().ok_or_else(bad)?,
            sha256: value["sha256"].as_str().ok_or_else(bad)?.to_string(),
            mode: value["mode"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(mode),
        })
    }
}

/// The input of a command started with [`Master::exec_with_input`], or the bytes of a
/// file being put ([`FileUpload`]).
///
/// Dropping it before [`JobInput::finish`] ends the input too (the command reads
/// end-of-file), as closing a pipe would.
pub struct JobInput {
    session: Arc<Session>,
    id: u64,
    credit: Arc<Semaphore>,
    /// `InputEnd` was sent, or must not be (a copy that was dropped is killed instead).
    ended: bool,
}

impl Drop for JobInput {
    fn drop(&mut self) {
        if let Ok(mut credits) = self.session.credits.lock() {
            credits.remove(&self.id);
        }
        if !self.ended {
            let end = Frame::InputEnd {
                id: self.id,
                sha256: None,
            };
            // Never waits: with the outbox full, the job ends with its connection.
            let _ = self.session.out.try_send(end);
        }
    }
}

impl JobInput {
    /// Input for request `id` of `session`, with a full window of credit.
    fn register(session: &Arc<Session>, id: u64) -> Self {
        let credit = Arc::new(Semaphore::new(INPUT_WINDOW));
        if let Ok(mut credits) = session.credits.lock() {
            credits.insert(id, credit.clone());
        }
        Self {
            session: session.clone(),
            id,
            credit,
            ended: false,
        }
    }

    /// Sends `data`, in chunks of at most [`INPUT_CHUNK`] bytes, each once the slave
    /// has room for it. An error when the job has ended or the connection is lost.
    pub async fn write(&self, data: &[u8]) -> Result<(), MasterError> {
        let node = self.session.node;
        for chunk in data.chunks(INPUT_CHUNK) {
            self.credit
                .acquire()
                .await
                .map_err(|_| MasterError::InputClosed(node))?
                .forget();
            let frame = Frame::Input {
                id: self.id,
                data: chunk.to_vec(),
            };
            self.session
                .out
                .send(frame)
                .await
                .map_err(|_| MasterError::Lost(node))?;
        }
        Ok(())
    }

    /// Ends the input: the command reads end-of-file once it has read the rest.
    pub async fn finish(mut self) -> Result<(), MasterError> {
        self.end(None).await
    }

    async fn end(&mut self, sha256: Option<String>) -> Result<(), MasterError> {
        self.ended = true;
        self.session
            .out
            .send(Frame::InputEnd {
                id: self.id,
                sha256,
            })
            .await
            .map_err(|_| MasterError::Lost(self.session.node))
    }
}

/// A file being written on a slave ([`Master::put_file_from`]). Dropped before
/// [`FileUpload::finish`], the copy is stopped: the slave removes what it wrote.
pub struct FileUpload {
    input: JobInput,
    /// The slave's answer; taken when the slave ended the copy early.
    answer: Option<RemoteTask>,
    /// The permission bits asked for.
    mode: u32,
}

impl Drop for FileUpload {
    fn drop(&mut self) {
        if !self.input.ended {
            self.input.ended = true; // no end: the copy is killed
            let kill = Frame::Kill { id: self.input.id };
            let _ = self.input.session.out.try_send(kill);
        }
    }
}

impl FileUpload {
    /// Sends the next bytes of the file (see [`JobInput::write`]). When the slave has
    /// ended the copy (it cannot write there, say), its reason is the error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), MasterError> {
        match self.input.write(data).await {
            Err(MasterError::InputClosed(node)) => match self.answer.take() {
                Some(answer) => Err(answer
                    .join()
                    .await
                    .err()
                    .unwrap_or(MasterError::InputClosed(node))),
                None => Err(MasterError::InputClosed(node)),
            },
            other => other,
        }
    }

    /// Ends the file, whose bytes have the SHA-256 `sha256` (hex), and waits for the
    /// slave to verify it and put it in place.
    pub async fn finish(mut self, sha256: &str) -> Result<CopiedFile, MasterError> {
        let node = self.input.session.node;
        let answer = self.answer.take().ok_or(MasterError::InputClosed(node))?;
        self.input.end(Some(sha256.to_string())).await?;
        let value = answer.join().await?;
        CopiedFile::from_answer(node, &value, self.mode & 0o7777)
    }
}

/// What a [`FileDownload`] gives next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadEvent {
    /// The next bytes of the file.
    Data(Vec<u8>),
    /// The end: the file's size, digest and mode as the slave read them (its `path`
    /// is empty).
    Done(CopiedFile),
}

/// A file being fetched from a slave ([`Master::get_file`]). Dropped before its end,
/// the slave stops sending it.
pub struct FileDownload {
    session: Arc<Session>,
    id: u64,
    /// The end (or an error) came.
    done: bool,
    events: mpsc::Receiver<Fetched>,
}

impl Drop for FileDownload {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.session.out.try_send(Frame::Kill { id: self.id });
        }
    }
}

impl FileDownload {
    /// The next bytes, or the end; an error if the slave could not send the file or
    /// the connection was lost.
    pub async fn next(&mut self) -> Result<DownloadEvent, MasterError> {
        let node = self.session.node;
        let event = self.events.recv().await;
        self.done = !matches!(event, Some(Fetched::Data(_)));
        match event {
            Some(Fetched::Data(data)) => Ok(DownloadEvent::Data(data)),
            Some(Fetched::Done(Ok(value))) => Ok(DownloadEvent::Done(CopiedFile::from_answer(
                node, &value, 0,
            )?)),
            Some(Fetched::Done(Err(error))) => Err(MasterError::Remote { node, error }),
            None => Err(MasterError::Lost(node)),
        }
    }
}

/// A registered function running on a slave.
pub struct RemoteTask {
    session: Arc<Session>,
    id: u64,
    rx: oneshot::Receiver<Result<Value, String>>,
}

impl RemoteTask {
    /// Waits for the result.
    pub async fn join(self) -> Result<Value, MasterError> {
        let node = self.session.node;
        match self.rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(MasterError::Remote { node, error }),
            Err(_) => Err(MasterError::Lost(node)),
        }
    }

    /// Kills it on the slave (the result then reports it was killed).
    pub async fn kill(&self) {
        let _ = self.session.out.send(Frame::Kill { id: self.id }).await;
    }
}

/// A command running on a slave.
pub struct CommandJob {
    /// The slave.
    pub node: NodeId,
    /// The slave's name.
    pub name: String,
    id: u64,
    session: Arc<Session>,
    events: mpsc::Receiver<ExecEvent>,
}

impl CommandJob {
    /// The next output chunk or the exit; `None` after the exit (or if the connection
    /// was lost, which is reported as an exit with an error first).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Kills the command's process group on the slave.
    pub async fn kill(&self) {
        let _ = self.session.out.send(Frame::Kill { id: self.id }).await;
    }
}

async fn read_loop(mut connection: Connection, session: Arc<Session>, log_sink: LogSink) {
    loop {
        let frame = match connection.recv(DEAD_AFTER).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(err) => {
                tracing::debug!(node = %session.node, name = %session.name, "slave {err}");
                break;
            }
        };
        match frame {
            Frame::Result { id, ok, err } => {
                session.end_input(id);
                let pending = session.pending.lock().ok().and_then(|mut p| p.remove(&id));
                let result = match (ok, err) {
                    (_, Some(e)) => Err(e),
                    (Some(v), None) => Ok(v),
                    (None, None) => Ok(Value::Null),
                };
                match pending {
                    Some(Pending::Call(tx)) => {
                        let _ = tx.send(result);
                    }
                    Some(Pending::Fetch(tx)) => {
                        let _ = tx.send(Fetched::Done(result)).await;
                    }
                    _ => {}
                }
            }
            Frame::InputTaken { id } => {
                if let Some(credit) = session
                    .credits
                    .lock()
                    .ok()
                    .and_then(|c| c.get(&id).cloned())
                {
                    credit.add_permits(1);
                }
            }
            Frame::Output { id, stream, data } => {
                enum To {
                    Exec(mpsc::Sender<ExecEvent>),
                    Fetch(mpsc::Sender<Fetched>),
                }
                let to = session.pending.lock().ok().and_then(|p| match p.get(&id) {
                    Some(Pending::Exec(tx)) => Some(To::Exec(tx.clone())),
                    Some(Pending::Fetch(tx)) => Some(To::Fetch(tx.clone())),
                    _ => None,
                });
                // Waits when the consumer is slow: backpressure reaches the slave's pipe.
                match to {
                    Some(To::Exec(tx)) => {
                        let _ = tx.send(ExecEvent::Output(stream, data)).await;
                    }
                    Some(To::Fetch(tx)) => {
                        let _ = tx.send(Fetched::Data(data)).await;
                    }
                    None => continue,
                }
                // Timers and keepalives first (see the session's writer).
                tokio::task::yield_now().await;
            }
            Frame::Exit { id, exit } => {
                session.end_input(id);
                let pending = session.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(Pending::Exec(tx)) = pending {
                    let _ = tx.send(ExecEvent::Exit(exit)).await;
                }
            }
            Frame::Log { lines } => {
                for line in lines {
                    log_sink(&session.name, &line);
                }
            }
            Frame::Terminating => {
                if let Some(tx) = session.terminating.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(());
                }
            }
            _ => {}
        }
    }
    // The connection is gone: no new request goes on it, its writer stops, and
    // whatever still waits on it fails.
    session.lost.store(true, Ordering::Release);
    connection.abort();
    if let Ok(mut credits) = session.credits.lock() {
        for (_, credit) in credits.drain() {
            credit.close();
        }
    }
    let pending: Vec<Pending> = session
        .pending
        .lock()
        .map(|mut p| p.drain().map(|(_, v)| v).collect())
        .unwrap_or_default();
    for p in pending {
        match p {
            Pending::Call(tx) => {
                let _ = tx.send(Err("connection to the slave lost".into()));
            }
            Pending::Exec(tx) => {
                let exit = JobExit::connection_lost();
                let _ = tx.send(ExecEvent::Exit(exit)).await;
            }
            Pending::Fetch(tx) => {
                let lost = Err("connection to the slave lost".into());
                let _ = tx.send(Fetched::Done(lost)).await;
            }
        }
    }
    // A slave that closed right after saying it terminates did acknowledge.
    drop(session.terminating.lock().ok().and_then(|mut t| t.take()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slave of our own on loopback: its first connection greets, then sends a frame
    /// that does not decode (the master's reader ends, its writer would go on); the
    /// second greets and answers one call.
    #[tokio::test]
    async fn a_connection_whose_reader_ended_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = NodeId::new(listener.local_addr().unwrap());
        let slave = tokio::spawn(async move {
            // An older slave: it names no features.
            let welcome = || Frame::Welcome {
                name: "fake".into(),
                slots: 1,
                tags: BTreeMap::new(),
                features: Vec::new(),
            };
            let (stream, _) = listener.accept().await.unwrap();
            let (reader, mut writer) = transport::accept(stream, None).await.unwrap();
            let bytes = crate::runtime::protocol::encode(&welcome());
            writer.write(&bytes).await.unwrap();
            writer.write(b"{\"t\":\"nonsense\"}").await.unwrap();
            writer.flush().await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let (reader2, writer2) = transport::accept(stream, None).await.unwrap();
            let mut second = Connection::start(reader2, writer2);
            second.send(welcome()).await.unwrap();
            loop {
                match second.recv(Duration::from_secs(5)).await {
                    Ok(Some(Frame::Call { id, arg, .. })) => {
                        let answer = Frame::Result {
                            id,
                            ok: Some(arg),
                            err: None,
                        };
                        second.send(answer).await.unwrap();
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            drop(reader);
        });
        let master = Master::new("m", None, None);
        master.connect(node).await.unwrap();
        // The bad frame ends the first session's reader.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            master.call(node, "echo", serde_json::json!(7)),
        )
        .await
        .expect("a call on a half-dead connection would never be answered");
        assert_eq!(answer.unwrap(), serde_json::json!(7));
        // Nothing it would not understand is sent to it: stdin and copies need features.
        let stdin = master.exec_with_input(node, vec!["cat".into()], None).await;
        assert!(
            matches!(stdin, Err(MasterError::Unsupported { .. })),
            "{:?}",
            stdin.err()
        );
        let err = master.get_file(node, "/etc/hostname").await.err();
        assert!(err.is_some_and(|e| e.to_string().contains("older localnet without copies")));
        drop(master);
        slave.abort();
    }

    #[test]
    fn line_splitter_keeps_every_byte_whatever_the_chunks() {
        let long = vec![b'x'; LineSplitter::MAX_LINE + 10];
        let mut input = b"one\n\xfftwo\n\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast");
        for chunk in [1, 2, 7, 4096, input.len()] {
            let mut splitter = LineSplitter::default();
            let mut lines = Vec::new();
            for piece in input.chunks(chunk) {
                lines.extend(splitter.push(piece));
            }
            let last = splitter.finish();
            assert_eq!(last.as_deref(), Some(&b"last"[..]), "chunk {chunk}");
            assert_eq!(&lines[..3], [&b"one"[..], b"\xfftwo", b""], "chunk {chunk}");
            // The long line comes in a full piece and the rest.
            assert_eq!(lines[3].len(), LineSplitter::MAX_LINE);
            assert_eq!(lines[4].len(), 10);
            assert_eq!(lines.len(), 5);
        }
    }
}
