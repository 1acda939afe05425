//! The slave: serves masters over the node transport.
//!
//! This module owns what a slave does for the masters that connect to it: it runs
//! registered functions ([`crate::RemoteTable`]) and, when allowed, command jobs (each a
//! child process in its own process group, at most `slots` at a time); it streams their
//! output back with backpressure (a job blocks on its pipe rather than lose a line);
//! it forwards its own log lines to a master that asked for them; and it kills a
//! master's jobs when that master goes away, and all jobs when told to terminate.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::AbortHandle;

use crate::key::ClusterKey;
use crate::remote::{self, Frame, JobExit, RemoteTable, Stream};
use crate::transport::{self, DEAD_AFTER, FrameReader, FrameWriter};

/// How a slave serves.
#[derive(Clone, Debug)]
pub struct SlaveOptions {
    /// Name shown to masters.
    pub name: String,
    /// Most command jobs running at once.
    pub slots: usize,
    /// Tags, as announced.
    pub tags: BTreeMap<String, String>,
    /// Cluster key: required from masters when set.
    pub key: Option<ClusterKey>,
    /// Run commands even without a key (any host on the LAN may then run anything).
    pub insecure: bool,
    /// The functions masters may call.
    pub table: RemoteTable,
}

/// Frames queued per connection before writers wait (backpressure).
const OUTBOX: usize = 64;
/// Most bytes of output lines gathered into one frame.
const BATCH_BYTES: usize = 32 * 1024;
/// Longest line sent as one; longer ones are split into pieces of this size.
const MAX_LINE: usize = 16 * 1024;
/// Log lines waiting to go to a master before they go to the local log instead.
const LOG_QUEUE: usize = 4096;

/// What a slave knows about the jobs it runs, across connections.
#[derive(Default)]
struct Jobs {
    running: Mutex<HashMap<(u64, u64), Job>>,
}

enum Job {
    Process(i32),
    Task(AbortHandle),
}

impl Job {
    fn kill(&self) {
        match self {
            // SAFETY: killpg only sends a signal; a stale group id fails with ESRCH.
            Job::Process(pgid) => unsafe {
                libc::killpg(*pgid, libc::SIGKILL);
            },
            Job::Task(handle) => handle.abort(),
        }
    }
}

impl Jobs {
    fn insert(&self, key: (u64, u64), job: Job) {
        if let Ok(mut map) = self.running.lock() {
            map.insert(key, job);
        }
    }
    fn remove(&self, key: (u64, u64)) {
        if let Ok(mut map) = self.running.lock() {
            map.remove(&key);
        }
    }
    fn kill(&self, key: (u64, u64)) {
        if let Ok(map) = self.running.lock()
            && let Some(job) = map.get(&key)
        {
            job.kill();
        }
    }
    /// Kills the jobs of one connection, or all of them; returns how many.
    fn kill_where(&self, session: Option<u64>) -> usize {
        let Ok(map) = self.running.lock() else {
            return 0;
        };
        let mut n = 0;
        for ((s, _), job) in map.iter() {
            if session.is_none_or(|want| want == *s) {
                job.kill();
                n += 1;
            }
        }
        n
    }
}

/// Where the slave's own log lines go while a master has asked for them.
static LOG_TARGET: Mutex<Option<(u64, mpsc::Sender<String>)>> = Mutex::new(None);

/// Whether log lines are being redirected to a master right now.
pub fn logs_redirected() -> bool {
    LOG_TARGET.lock().map(|t| t.is_some()).unwrap_or(false)
}

/// Sends one formatted log line to the master that asked for logs. Returns false when
/// no master asked or its queue is full; the caller then logs the line locally.
pub fn forward_log_line(line: String) -> bool {
    let Ok(target) = LOG_TARGET.lock() else {
        return false;
    };
    match &*target {
        Some((_, tx)) => tx.try_send(line).is_ok(),
        None => false,
    }
}

fn set_log_target(session: u64, tx: Option<mpsc::Sender<String>>) {
    if let Ok(mut target) = LOG_TARGET.lock() {
        match tx {
            Some(tx) => *target = Some((session, tx)),
            None => {
                if target.as_ref().is_some_and(|(s, _)| *s == session) {
                    *target = None;
                }
            }
        }
    }
}

/// A tracing layer that sends the slave's log events to a master that redirected them
/// (pair it with a local layer filtered by `!logs_redirected()`).
pub struct RedirectLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RedirectLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !logs_redirected() {
            return;
        }
        let mut text = format!("{} ", event.metadata().level());
        event.record(&mut LineVisitor(&mut text));
        if !forward_log_line(text.clone()) {
            eprintln!("{text}");
        }
    }
}

struct LineVisitor<'a>(&'a mut String);

impl tracing::field::Visit for LineVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// Serves masters on `listener` until one of them says terminate; kills every job before
/// returning.
pub async fn serve(listener: TcpListener, opts: SlaveOptions) -> std::io::Result<()> {
    serve_until(listener, opts, std::future::pending::<()>()).await
}

/// Like [`serve`], and also stops when `shutdown` completes.
pub async fn serve_until(
    listener: TcpListener,
    opts: SlaveOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let opts = Arc::new(opts);
    let mut shutdown = std::pin::pin!(shutdown);
    let jobs = Arc::new(Jobs::default());
    let slots = Arc::new(Semaphore::new(opts.slots.max(1)));
    let terminate = Arc::new(Notify::new());
    let sessions = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = terminate.notified() => break,
            _ = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let session = Session {
            id: sessions.fetch_add(1, Ordering::Relaxed),
            opts: opts.clone(),
            jobs: jobs.clone(),
            slots: slots.clone(),
            terminate: terminate.clone(),
        };
        tokio::spawn(async move {
            match transport::accept(stream, session.opts.key.as_ref()).await {
                Ok((reader, writer)) => session.run(reader, writer, peer).await,
                Err(err) => tracing::warn!(%peer, %err, "refused a connection"),
            }
        });
    }
    let killed = jobs.kill_where(None);
    tracing::info!(killed, "terminating: jobs killed");
    Ok(())
}

struct Session {
    id: u64,
    opts: Arc<SlaveOptions>,
    jobs: Arc<Jobs>,
    slots: Arc<Semaphore>,
    terminate: Arc<Notify>,
}

impl Session {
    async fn run(self, mut reader: FrameReader, writer: FrameWriter, peer: std::net::SocketAddr) {
        let (out, outbox) = mpsc::channel::<Frame>(OUTBOX);
        let writer_task = tokio::spawn(remote::write_frames(writer, outbox));
        let mut master = String::from("?");
        loop {
            let frame = match tokio::time::timeout(DEAD_AFTER, reader.read()).await {
                Ok(Ok(Some(bytes))) => match remote::decode(&bytes) {
                    Some(f) => f,
                    None => {
                        tracing::warn!(%peer, "malformed frame; closing the connection");
                        break;
                    }
                },
                Ok(Ok(None)) => break,
                Ok(Err(err)) => {
                    tracing::warn!(%peer, %err, "connection error");
                    break;
                }
                Err(_) => {
                    tracing::warn!(%peer, "master silent for {DEAD_AFTER:?}: connection dead");
                    break;
                }
            };
            match frame {
                Frame::Hello { name } => {
                    master = name;
                    tracing::info!(%peer, master = %master, "master connected");
                    let welcome = Frame::Welcome {
                        name: self.opts.name.clone(),
                        slots: self.opts.slots,
                        tags: self.opts.tags.clone(),
                    };
                    if out.send(welcome).await.is_err() {
                        break;
                    }
                }
                Frame::Call { id, name, arg } => self.call(id, name, arg, out.clone()),
                Frame::Exec {
                    id,
                    argv,
                    timeout_ms,
                } => self.exec(id, argv, timeout_ms, out.clone()).await,
                Frame::Kill { id } => self.jobs.kill((self.id, id)),
                Frame::RedirectLogs { on } => {
                    if on {
                        let (tx, rx) = mpsc::channel(LOG_QUEUE);
                        tokio::spawn(forward_logs(rx, out.clone()));
                        set_log_target(self.id, Some(tx));
                        tracing::info!(master = %master, "logs redirected to the master");
                    } else {
                        set_log_target(self.id, None);
                    }
                }
                Frame::Terminate => {
                    tracing::info!(master = %master, "terminate requested");
                    set_log_target(self.id, None);
                    self.jobs.kill_where(None);
                    let _ = out.send(Frame::Terminating).await;
                    drop(out);
                    // Other tasks may still hold the outbox; give the acknowledgement a
                    // moment to leave, then go.
                    let _ = tokio::time::timeout(Duration::from_millis(500), writer_task).await;
                    self.terminate.notify_one();
                    return;
                }
                Frame::Ping => {}
                other => tracing::debug!(?other, "unexpected frame from a master"),
            }
        }
        set_log_target(self.id, None);
        let killed = self.jobs.kill_where(Some(self.id));
        if killed > 0 {
            tracing::warn!(master = %master, killed, "master went away: its jobs were killed");
        } else {
            tracing::info!(master = %master, "master disconnected");
        }
        drop(out);
        writer_task.abort();
    }

    fn call(&self, id: u64, name: String, arg: Value, out: mpsc::Sender<Frame>) {
        let Some(future) = self.opts.table.start(&name, arg) else {
            let err = format!(
                "no function named {name:?} on this slave (registered: {})",
                self.opts.table.names().join(", ")
            );
            tokio::spawn(async move {
                let _ = out
                    .send(Frame::Result {
                        id,
                        ok: None,
                        err: Some(err),
                    })
                    .await;
            });
            return;
        };
        let task = tokio::spawn(future);
        self.jobs
            .insert((self.id, id), Job::Task(task.abort_handle()));
        let jobs = self.jobs.clone();
        let session = self.id;
        tokio::spawn(async move {
            let frame = match task.await {
                Ok(Ok(value)) => Frame::Result {
                    id,
                    ok: Some(value),
                    err: None,
                },
                Ok(Err(e)) => Frame::Result {
                    id,
                    ok: None,
                    err: Some(remote::error_text(e.as_ref())),
                },
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into());
                    Frame::Result {
                        id,
                        ok: None,
                        err: Some(format!("{name} panicked: {msg}")),
                    }
                }
                Err(_) => Frame::Result {
                    id,
                    ok: None,
                    err: Some(format!("{name} was killed")),
                },
            };
            jobs.remove((session, id));
            let _ = out.send(frame).await;
        });
    }

    async fn exec(
        &self,
        id: u64,
        argv: Vec<String>,
        timeout_ms: Option<u64>,
        out: mpsc::Sender<Frame>,
    ) {
        let refuse = |error: String| Frame::Exit {
            id,
            exit: JobExit {
                code: None,
                signal: None,
                timed_out: false,
                error: Some(error),
            },
        };
        if self.opts.key.is_none() && !self.opts.insecure {
            let why = "refused: this slave runs an open cluster (no key) and runs only registered functions. \
                       Give the slaves and the master the same key (`localnet key generate --out FILE`, then \
                       --key-file FILE on both), or start the slave with --insecure to let anyone on the LAN run commands";
            let _ = out.send(refuse(why.into())).await;
            return;
        }
        if argv.is_empty() {
            let _ = out.send(refuse("empty command".into())).await;
            return;
        }
        let slots = self.slots.clone();
        let jobs = self.jobs.clone();
        let session = self.id;
        tokio::spawn(async move {
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            if out.is_closed() {
                return; // the master went away while the job waited for a slot
            }
            let exit = run_command(session, id, &argv, timeout_ms, &jobs, &out).await;
            let _ = out.send(Frame::Exit { id, exit }).await;
        });
    }
}

async fn run_command(
    session: u64,
    id: u64,
    argv: &[String],
    timeout_ms: Option<u64>,
    jobs: &Jobs,
    out: &mpsc::Sender<Frame>,
) -> JobExit {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for var in crate::service::SERVICE_ENV {
        command.env_remove(var);
    }
    // SAFETY: prctl is async-signal-safe; it makes the job die if the slave dies.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return JobExit {
                code: None,
                signal: None,
                timed_out: false,
                error: Some(format!("cannot run {}: {e}", argv[0])),
            };
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    jobs.insert((session, id), Job::Process(pgid));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pumps = async {
        tokio::join!(
            pump(stdout, Stream::Stdout, id, out.clone()),
            pump(stderr, Stream::Stderr, id, out.clone())
        )
    };
    let waited = async {
        let status = child.wait().await;
        // The leader is gone: end whatever it left in its group, so that nothing is
        // orphaned and the pipes reach end-of-file.
        // SAFETY: killpg only sends a signal.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        status
    };
    let run = async { tokio::join!(waited, pumps).0 };
    let (status, timed_out) = match timeout_ms {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), run).await {
            Ok(status) => (status, false),
            Err(_) => {
                // SAFETY: killpg only sends a signal.
                unsafe {
                    libc::killpg(pgid, libc::SIGKILL);
                }
                (child.wait().await, true)
            }
        },
        None => (run.await, false),
    };
    jobs.remove((session, id));
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => JobExit {
            code: s.code(),
            signal: s.signal(),
            timed_out,
            error: None,
        },
        Err(e) => JobExit {
            code: None,
            signal: None,
            timed_out,
            error: Some(format!("waiting for the job failed: {e}")),
        },
    }
}

/// Reads a job's pipe line by line and sends the lines in batches. When the connection
/// is gone, lines go to the slave's own log instead.
async fn pump(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: Stream,
    id: u64,
    out: mpsc::Sender<Frame>,
) {
    let Some(pipe) = pipe else { return };
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut batch: Vec<String> = Vec::new();
    let mut bytes = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(%err, job = id, "reading job output failed");
                0
            }
        };
        if n > 0 {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            bytes += line.len() + 8;
            batch.push(String::from_utf8_lossy(&line).into_owned());
        }
        let end = n == 0;
        if !batch.is_empty() && (end || bytes >= BATCH_BYTES || reader.buffer().is_empty()) {
            let lines = std::mem::take(&mut batch);
            bytes = 0;
            if let Err(mpsc::error::SendError(Frame::Output { lines, .. })) =
                out.send(Frame::Output { id, stream, lines }).await
            {
                for l in lines {
                    tracing::info!(job = id, ?stream, "{l}");
                }
            }
        }
        if end {
            return;
        }
    }
}

async fn forward_logs(mut rx: mpsc::Receiver<String>, out: mpsc::Sender<Frame>) {
    while let Some(first) = rx.recv().await {
        let mut lines = vec![first];
        while lines.len() < 256 {
            match rx.try_recv() {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        if let Err(mpsc::error::SendError(Frame::Log { lines })) =
            out.send(Frame::Log { lines }).await
        {
            for l in lines {
                eprintln!("{l}");
            }
            return;
        }
    }
}
