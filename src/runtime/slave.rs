//! The slave: serves masters over the node transport.
//!
//! This module owns what a slave does for the masters that connect to it: it runs
//! registered functions ([`crate::RemoteTable`]) and, when allowed, command jobs (each a
//! child process in its own process group, at most `slots` at a time); it streams their
//! output back with backpressure (a job blocks on its pipe rather than lose a line);
//! it forwards its own log lines to a master that asked for them; and it kills a
//! master's jobs when that master goes away, and all jobs when told to terminate.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::key::ClusterKey;
use crate::runtime::files::{self, PutRequest};
use crate::runtime::functions::{self, RemoteTable};
use crate::runtime::jobs::{self, InputItem, Job, Jobs, SlaveMonitor};
use crate::runtime::logs::{self, LOG_QUEUE};
use crate::runtime::logs::{LIFECYCLE, LogTargets};
use crate::runtime::protocol::{FEATURES, Frame, INPUT_WINDOW, JobExit};
use crate::runtime::session::{Session, SessionError};
use crate::runtime::transport::{self, DEAD_AFTER};

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
    /// Where log lines go when a master redirects them; `None`: the targets of the
    /// [`RedirectLayer`](crate::RedirectLayer) in the tracing subscriber current when the slave starts (so a
    /// program that put one there needs nothing more), else targets of its own (which
    /// no layer feeds: a master that asks then gets no lines).
    pub logs: Option<Arc<LogTargets>>,
    /// Where the slave shows its counters and running jobs (`None`: a monitor of its
    /// own, which nobody reads).
    pub monitor: Option<Arc<SlaveMonitor>>,
}

/// Most calls and commands one connection may have in flight on a slave (running, or
/// commands waiting for a job slot). Beyond it, requests are refused with an error that
/// says so; a master that needs more waits for answers first.
pub const MAX_IN_FLIGHT_PER_SESSION: usize = 256;
/// Most calls and commands in flight on a slave over all its connections: what an open
/// cluster's LAN can make it hold at once (each is a task and a job table entry).
pub const MAX_IN_FLIGHT_PER_SLAVE: usize = 1024;

/// Most TCP connections a slave serves at once, in the handshake or in a session: each
/// costs a task, an outbox of 64 frames and buffers. A connection beyond it is
/// told "busy" and closed at once (the master's error says "too many connections"), and
/// the slave's log says so at most once a second, with a count. A connection still in
/// its handshake holds its place for at most [`transport::HANDSHAKE_TIMEOUT`].
pub const MAX_CONNECTIONS: usize = 64;
/// Shortest time between two log lines about connections refused over [`MAX_CONNECTIONS`].
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts connections refused over [`MAX_CONNECTIONS`] and says when to log them: the
/// first at once, later ones at most once per [`REFUSAL_LOG_EVERY`], summed.
#[derive(Debug, Default)]
struct RefusalLog {
    last_line: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts one refused connection at `now`; the number to log now, if a line is due.
    fn refused(&mut self, now: tokio::time::Instant) -> Option<u64> {
        self.unlogged += 1;
        self.due(now)
    }

    /// The number of refusals to log at `now`, if any wait and a line is due.
    fn due(&mut self, now: tokio::time::Instant) -> Option<u64> {
        let ready = self
            .last_line
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_EVERY);
        if self.unlogged == 0 || !ready {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// When the refusals waiting to be logged may be, if any wait.
    fn next_line_at(&self) -> Option<tokio::time::Instant> {
        match (self.unlogged, self.last_line) {
            (0, _) => None,
            (_, last) => last.map(|l| l + REFUSAL_LOG_EVERY),
        }
    }
}

fn log_refusals(count: u64) {
    tracing::warn!(
        target: LIFECYCLE,
        "refused {count} connection(s): too many connections (a slave serves at most {MAX_CONNECTIONS} at once)"
    );
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
    let logs = opts
        .logs
        .clone()
        .or_else(LogTargets::of_current_subscriber)
        .unwrap_or_default();
    let opts = Arc::new(opts);
    let mut shutdown = std::pin::pin!(shutdown);
    let monitor = opts.monitor.clone().unwrap_or_default();
    let jobs = Arc::new(Jobs::new(monitor));
    let slots = Arc::new(Semaphore::new(opts.slots.max(1)));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_SLAVE));
    let terminate = Arc::new(Notify::new());
    let sessions = AtomicU64::new(1);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refusals = RefusalLog::default();
    loop {
        let next_refusal_line = refusals.next_line_at();
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = terminate.notified() => break,
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(next_refusal_line.unwrap_or_else(tokio::time::Instant::now)),
                if next_refusal_line.is_some() =>
            {
                if let Some(count) = refusals.due(tokio::time::Instant::now()) {
                    log_refusals(count);
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            transport::refuse_busy(stream);
            if let Some(count) = refusals.refused(tokio::time::Instant::now()) {
                log_refusals(count);
            }
            continue;
        };
        let session = Served {
            id: sessions.fetch_add(1, Ordering::Relaxed),
            opts: opts.clone(),
            jobs: jobs.clone(),
            slots: slots.clone(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_SESSION)),
            slave_in_flight: in_flight.clone(),
            terminate: terminate.clone(),
            logs: logs.clone(),
        };
        tokio::spawn(async move {
            // The connection's place among MAX_CONNECTIONS, until it closes.
            let _connection = connection;
            match transport::accept(stream, session.opts.key.as_ref()).await {
                Ok((reader, writer)) => {
                    let monitor = session.jobs.monitor.clone();
                    monitor.connection(true);
                    session.run(Session::start(reader, writer), peer).await;
                    monitor.connection(false);
                }
                Err(err) => tracing::warn!(target: LIFECYCLE, %peer, %err, "refused a connection"),
            }
        });
    }
    let killed = jobs.kill_where(None);
    tracing::info!(target: LIFECYCLE, killed, "terminating: jobs killed");
    Ok(())
}

/// Why an open cluster's slave (no key, no `--insecure`) runs no commands and copies no
/// files, and what to do.
const OPEN_CLUSTER_REFUSAL: &str = "this slave runs an open cluster (no key) and runs only registered functions. \
     Give the slaves and the master the same key (`localnet key generate --out FILE`, then \
     --key-file FILE on both), or start the slave with --insecure to let anyone on the LAN run commands and copy files";

/// A channel for the input of command or file `id`, registered in `inputs` (whose
/// entries for ended jobs are dropped first, so that the map stays as small as what
/// is in flight).
fn input_channel(
    inputs: &mut HashMap<u64, mpsc::Sender<InputItem>>,
    id: u64,
) -> jobs::InputReceiver {
    inputs.retain(|_, tx| !tx.is_closed());
    let (tx, rx) = mpsc::channel(INPUT_WINDOW + 1);
    inputs.insert(id, tx);
    rx
}

/// A command a master asked for, as `exec` takes it.
struct Command {
    id: u64,
    argv: Vec<String>,
    timeout_ms: Option<u64>,
    input: Option<jobs::InputReceiver>,
    /// The master's name.
    master: String,
}

/// What one connection's task knows: its id, and the slave's shared state.
struct Served {
    id: u64,
    opts: Arc<SlaveOptions>,
    jobs: Arc<Jobs>,
    slots: Arc<Semaphore>,
    /// Places for this connection's calls and commands in flight.
    in_flight: Arc<Semaphore>,
    /// Places for the calls and commands of all connections.
    slave_in_flight: Arc<Semaphore>,
    terminate: Arc<Notify>,
    /// Where this slave's log lines go when a master asks for them.
    logs: Arc<LogTargets>,
}

/// What one call or command in flight holds until it is answered.
type Admission = (OwnedSemaphorePermit, OwnedSemaphorePermit);

impl Served {
    async fn run(self, mut connection: Session, peer: std::net::SocketAddr) {
        let out = connection.sender();
        let mut master = String::from("?");
        // This connection's redirection of the slave's log lines, while it lasts.
        let mut redirected: Option<u64> = None;
        // Where the input of this connection's commands and files goes, by id.
        let mut inputs: HashMap<u64, mpsc::Sender<InputItem>> = HashMap::new();
        // Why the connection ended, logged once redirection is off (below); `None` for a
        // clean close.
        let ended: Option<String> = loop {
            let frame = match connection.recv(DEAD_AFTER).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(err @ SessionError::Silent(_)) => break Some(format!("master {err}")),
                Err(err) => break Some(err.to_string()),
            };
            match frame {
                Frame::Hello { name } => {
                    master = name;
                    tracing::info!(target: LIFECYCLE, %peer, master = %master, "master connected");
                    let welcome = Frame::Welcome {
                        name: self.opts.name.clone(),
                        slots: self.opts.slots,
                        tags: self.opts.tags.clone(),
                        features: FEATURES.map(str::to_string).to_vec(),
                    };
                    if out.send(welcome).await.is_err() {
                        break Some("the connection's writer stopped".into());
                    }
                }
                // Refusals are sent from here, in order: when the outbox is full (the
                // master reads slowly) this waits, which slows a flooding master down.
                Frame::Call { id, name, arg } => self.call(id, name, arg, &out).await,
                Frame::Exec {
                    id,
                    argv,
                    timeout_ms,
                    stdin,
                } => {
                    let input = stdin.then(|| input_channel(&mut inputs, id));
                    let command = Command {
                        id,
                        argv,
                        timeout_ms,
                        input,
                        master: master.clone(),
                    };
                    self.exec(command, &out).await
                }
                Frame::Input { id, data } => self.take_input(&mut inputs, id, data),
                Frame::InputEnd { id, sha256 } => {
                    // Room is kept for the end (the window is one less than the
                    // channel): no room means the master broke the window.
                    if let Some(tx) = inputs.remove(&id)
                        && let Err(mpsc::error::TrySendError::Full(_)) =
                            tx.try_send(InputItem::End { sha256 })
                    {
                        self.jobs.kill((self.id, id));
                    }
                }
                Frame::PutFile {
                    id,
                    path,
                    name,
                    mode,
                    size,
                    into_dir,
                } => {
                    let input = input_channel(&mut inputs, id);
                    let request = PutRequest {
                        id,
                        path,
                        name,
                        mode,
                        size,
                        into_dir,
                    };
                    let task = files::put(request, input, out.clone());
                    self.file(id, Box::pin(task), &out).await
                }
                Frame::GetFile { id, path } => {
                    let task = files::get(id, path, out.clone());
                    self.file(id, Box::pin(task), &out).await
                }
                Frame::Kill { id } => self.jobs.kill((self.id, id)),
                Frame::RedirectLogs { on } => {
                    if on {
                        let (tx, rx) = mpsc::channel(LOG_QUEUE);
                        tokio::spawn(logs::forward_logs(rx, out.clone(), self.logs.clone()));
                        redirected = Some(self.logs.redirect_to(tx));
                        tracing::info!(target: LIFECYCLE, master = %master, "logs redirected to the master");
                    } else {
                        self.stop_redirecting(&mut redirected);
                    }
                }
                Frame::Terminate => {
                    self.stop_redirecting(&mut redirected);
                    tracing::info!(target: LIFECYCLE, master = %master, "terminate requested");
                    self.jobs.kill_where(None);
                    let _ = out.send(Frame::Terminating).await;
                    drop(out);
                    // Other tasks may still hold the outbox; give the acknowledgement a
                    // moment to leave, then go.
                    connection.close(Duration::from_millis(500)).await;
                    self.terminate.notify_one();
                    return;
                }
                Frame::Ping => {}
                other => tracing::debug!(?other, "unexpected frame from a master"),
            }
        };
        // Stop redirecting first: what happened to the connection belongs in this
        // slave's own log, not in a queue towards the master that is gone.
        self.stop_redirecting(&mut redirected);
        if let Some(why) = ended {
            tracing::warn!(target: LIFECYCLE, %peer, master = %master, "{why}");
        }
        let killed = self.jobs.kill_where(Some(self.id));
        if killed > 0 {
            tracing::warn!(target: LIFECYCLE, master = %master, killed, "master went away: its jobs were killed");
        } else {
            tracing::info!(target: LIFECYCLE, master = %master, "master disconnected");
        }
        drop(out);
        connection.abort();
    }

    /// Hands a chunk of input to its command or file. A master that sends more than
    /// [`INPUT_WINDOW`] chunks ahead breaks the protocol: that job or copy is cut off.
    fn take_input(
        &self,
        inputs: &mut HashMap<u64, mpsc::Sender<InputItem>>,
        id: u64,
        data: Vec<u8>,
    ) {
        let Some(tx) = inputs.get(&id) else {
            return; // its job has ended, or never took input
        };
        match tx.try_send(InputItem::Data(data)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inputs.remove(&id);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inputs.remove(&id);
                self.jobs.kill((self.id, id));
                tracing::warn!(
                    job = id,
                    "the master sent more than {INPUT_WINDOW} chunks of input ahead: the job was cut off"
                );
            }
        }
    }

    /// Puts or gets a file for the master (a key, or --insecure, is needed as for
    /// commands), answering with a `Result`.
    async fn file(
        &self,
        id: u64,
        task: std::pin::Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>,
        out: &mpsc::Sender<Frame>,
    ) {
        if self.opts.key.is_none() && !self.opts.insecure {
            let refusal = Frame::Result {
                id,
                ok: None,
                err: Some(format!("refused: {OPEN_CLUSTER_REFUSAL}")),
            };
            let _ = out.send(refusal).await;
            return;
        }
        let admission = match self.admit() {
            Ok(a) => a,
            Err(why) => {
                let _ = out
                    .send(Frame::Result {
                        id,
                        ok: None,
                        err: Some(why),
                    })
                    .await;
                return;
            }
        };
        self.answer(id, "the copy".into(), task, out, admission);
    }

    /// Runs `task` (call `id`, named `what` in errors) as a task of its own that `Kill`
    /// can abort, and answers with its `Result` (a panic or a kill said as such); the
    /// admission is held until then.
    fn answer(
        &self,
        id: u64,
        what: String,
        task: impl Future<Output = Result<Value, String>> + Send + 'static,
        out: &mpsc::Sender<Frame>,
        admission: Admission,
    ) {
        let out = out.clone();
        let task = tokio::spawn(task);
        self.jobs
            .insert((self.id, id), Job::Task(task.abort_handle()));
        let jobs = self.jobs.clone();
        let session = self.id;
        tokio::spawn(async move {
            let (ok, err) = match task.await {
                Ok(Ok(value)) => (Some(value), None),
                Ok(Err(e)) => (None, Some(e)),
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into());
                    (None, Some(format!("{what} panicked: {msg}")))
                }
                Err(_) => (None, Some(format!("{what} was killed"))),
            };
            jobs.remove((session, id));
            let _ = out.send(Frame::Result { id, ok, err }).await;
            drop(admission);
        });
    }

    /// Ends this connection's redirection of log lines, if it has one.
    fn stop_redirecting(&self, redirected: &mut Option<u64>) {
        if let Some(token) = redirected.take() {
            self.logs.stop(token);
        }
    }

    /// Takes a place for one more call or command in flight, or says why there is none.
    fn admit(&self) -> Result<Admission, String> {
        let mine = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            format!(
                "refused: this connection already has {MAX_IN_FLIGHT_PER_SESSION} calls and commands \
                 in flight on this slave (the most per connection); wait for some to finish before \
                 starting more"
            )
        })?;
        let all = self.slave_in_flight.clone().try_acquire_owned().map_err(|_| {
            format!(
                "refused: this slave already has {MAX_IN_FLIGHT_PER_SLAVE} calls and commands in \
                 flight from all its masters (the most it takes); wait for some to finish, or \
                 spread the work over more slaves"
            )
        })?;
        Ok((mine, all))
    }

    async fn call(&self, id: u64, name: String, arg: Value, out: &mpsc::Sender<Frame>) {
        let refuse = |err: String| Frame::Result {
            id,
            ok: None,
            err: Some(err),
        };
        let admission = match self.admit() {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(call = id, "{why}");
                let _ = out.send(refuse(why)).await;
                return;
            }
        };
        let Some(future) = self.opts.table.start(&name, arg) else {
            let err = format!(
                "no function named {name:?} on this slave (registered: {})",
                self.opts.table.names().join(", ")
            );
            let _ = out.send(refuse(err)).await;
            return;
        };
        let future = async move { future.await.map_err(|e| functions::error_text(e.as_ref())) };
        self.answer(id, name, future, out, admission);
    }

    async fn exec(&self, command: Command, out: &mpsc::Sender<Frame>) {
        let Command {
            id,
            argv,
            timeout_ms,
            input,
            master,
        } = command;
        let refuse = |error: String| Frame::Exit {
            id,
            exit: JobExit::failed(error),
        };
        if self.opts.key.is_none() && !self.opts.insecure {
            let refusal = Frame::Exit {
                id,
                exit: JobExit::refusal(format!("refused: {OPEN_CLUSTER_REFUSAL}")),
            };
            let _ = out.send(refusal).await;
            return;
        }
        if argv.is_empty() {
            let _ = out.send(refuse("empty command".into())).await;
            return;
        }
        // The place is taken before anything is spawned: at most the cap waits.
        let admission = match self.admit() {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(job = id, "{why}");
                let _ = out.send(refuse(why)).await;
                return;
            }
        };
        let slots = self.slots.clone();
        let jobs = self.jobs.clone();
        let session = self.id;
        let out = out.clone();
        tokio::spawn(async move {
            let _admission = admission;
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            if out.is_closed() {
                return; // the master went away while the job waited for a slot
            }
            let key = (session, id);
            jobs.monitor.started();
            let exit = jobs::run_command(key, &argv, &master, timeout_ms, input, &jobs, &out).await;
            jobs.monitor.ended(key, &exit);
            let _ = out.send(Frame::Exit { id, exit }).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::master::{ExecEvent, Master, MasterError};
    use crate::runtime::protocol::NodeId;
    use serde_json::json;

    /// The error a refused request gets, within a deadline (an admitted one would wait).
    async fn refusal(task: crate::runtime::master::RemoteTask) -> String {
        tokio::time::timeout(Duration::from_secs(5), task.join())
            .await
            .expect("a request beyond the cap must be refused at once")
            .expect_err("a request beyond the cap must fail")
            .to_string()
    }

    async fn exec_refusal(master: &Master, node: NodeId) -> String {
        let mut job = master.exec(node, vec!["true".into()], None).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), job.next()).await;
        match event {
            Ok(Some(ExecEvent::Exit(exit))) => exit.error.unwrap_or_default(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A slave on loopback that runs commands (insecure), and a master for it.
    async fn command_slave() -> (Master, NodeId, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = NodeId::new(listener.local_addr().unwrap());
        let opts = SlaveOptions {
            name: "files".into(),
            slots: 4,
            tags: BTreeMap::new(),
            key: None,
            insecure: true,
            table: RemoteTable::new(),
            logs: None,
            monitor: None,
        };
        let server = tokio::spawn(serve(listener, opts));
        (Master::new("m", None, None), node, server)
    }

    async fn output_and_exit(job: &mut crate::runtime::master::CommandJob) -> (Vec<u8>, JobExit) {
        let mut stdout = Vec::new();
        loop {
            match job.next().await {
                Some(ExecEvent::Output(crate::Stream::Stdout, data)) => stdout.extend(data),
                Some(ExecEvent::Output(..)) => {}
                Some(ExecEvent::Exit(exit)) => return (stdout, exit),
                None => panic!("no exit"),
            }
        }
    }

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("localnet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_command_gets_every_byte_of_its_input_and_one_that_stops_reading_holds_nothing_up() {
        use sha2::Digest;
        let (master, node, server) = command_slave().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut job, input) = master
            .exec_with_input(node, vec!["sha256sum".into()], None)
            .await
            .unwrap();
        let writer = async {
            input.write(&data).await.unwrap();
            input.finish().await.unwrap();
        };
        let ((stdout, exit), ()) = tokio::join!(output_and_exit(&mut job), writer);
        assert!(exit.success(), "{exit:?}");
        let expected = hex::encode(sha2::Sha256::digest(&data));
        assert!(
            String::from_utf8_lossy(&stdout).starts_with(&expected),
            "{stdout:?}"
        );
        // `head -c 5` reads 5 bytes and ends: the rest is taken and dropped (or refused
        // once the job ended), never waited for.
        let (mut job, input) = master
            .exec_with_input(node, vec!["head".into(), "-c".into(), "5".into()], None)
            .await
            .unwrap();
        let writer = async {
            match input.write(&data).await {
                Ok(()) => input.finish().await.unwrap(),
                Err(e) => assert!(matches!(e, MasterError::InputClosed(_)), "{e}"),
            }
        };
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(output_and_exit(&mut job), writer).0
        });
        let (stdout, exit) = done
            .await
            .expect("a job that stops reading holds nothing up");
        assert!(exit.success(), "{exit:?}");
        assert_eq!(stdout, &data[..5]);
        server.abort();
    }

    #[tokio::test]
    async fn files_are_put_and_fetched_verified_with_their_mode_and_a_damaged_one_is_not_put_in_place()
     {
        use std::os::unix::fs::PermissionsExt;
        let (master, node, server) = command_slave().await;
        let dir = scratch_dir("files");
        let local = dir.join("tool.sh");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&local, &data).unwrap();
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o751)).unwrap();
        let remote_dir = dir.join("remote");
        std::fs::create_dir(&remote_dir).unwrap();
        let remote = format!("{}/", remote_dir.display());
        let put = master.put_file(node, &local, &remote).await.unwrap();
        let placed = remote_dir.join("tool.sh");
        assert_eq!(put.path, placed.to_string_lossy());
        assert_eq!(put.bytes, data.len() as u64);
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        let mode = std::fs::metadata(&placed).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o751);
        // Fetched back: same bytes, mode and digest.
        let back = dir.join("back.files");
        let got = master
            .fetch_file(node, &placed.to_string_lossy(), &back)
            .await
            .unwrap();
        assert_eq!(
            (got.bytes, &got.sha256, got.mode),
            (put.bytes, &put.sha256, 0o751)
        );
        assert_eq!(std::fs::read(&back).unwrap(), data);
        // A wrong digest: refused, the old file stays, no temporary file is left.
        let mut upload = master
            .put_file_from(node, &placed.to_string_lossy(), "tool.sh", 0o644, 3, false)
            .await
            .unwrap();
        upload.write(b"new").await.unwrap();
        let err = upload
            .finish(&"0".repeat(64))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("arrived damaged"), "{err}");
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        let names: Vec<_> = std::fs::read_dir(&remote_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tool.sh"], "no temporary file is left");
        // Relative paths, directories and missing files are refused with a reason.
        let err = master
            .put_file(node, &local, "relative/x")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        let err = master
            .fetch_file(node, &remote_dir.to_string_lossy(), &dir.join("d"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = master
            .fetch_file(node, "/nonexistent/file", &dir.join("n"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot read /nonexistent/file"),
            "{err}"
        );
        assert!(!dir.join("n").exists() && !dir.join("d").exists());
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refused_connections_are_logged_at_most_once_a_second_with_a_count() {
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut log = RefusalLog::default();
        assert_eq!(log.next_line_at(), None);
        assert_eq!(log.refused(at(0)), Some(1), "the first one at once");
        assert_eq!(log.refused(at(10)), None);
        assert_eq!(log.refused(at(500)), None);
        assert_eq!(log.next_line_at(), Some(at(1000)));
        assert_eq!(log.due(at(999)), None);
        assert_eq!(log.due(at(1000)), Some(2), "the others summed");
        assert_eq!(log.next_line_at(), None);
        assert_eq!(log.due(at(5000)), None, "nothing to say");
        assert_eq!(log.refused(at(5000)), Some(1));
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_told_busy_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = SlaveOptions {
            name: "full".into(),
            slots: 1,
            tags: BTreeMap::new(),
            key: None,
            insecure: false,
            table: RemoteTable::new().register("echo", |v| async move { Ok(v) }),
            logs: None,
            monitor: None,
        };
        let server = tokio::spawn(serve(listener, opts));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let refused = tokio::time::timeout(Duration::from_secs(2), transport::connect(addr, None))
            .await
            .expect("refused at once, not after the handshake timeout");
        assert!(
            matches!(refused, Err(transport::TransportError::Busy)),
            "{:?}",
            refused.err()
        );
        drop(held);
        let master = Master::new("m", None, None);
        let node = NodeId::new(addr);
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                // The slave sees the held connections close, and frees their places.
                match master.call(node, "echo", json!(1)).await {
                    Ok(v) => break v,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .expect("served again once the held connections closed");
        assert_eq!(answer, json!(1));
        server.abort();
    }

    #[tokio::test]
    async fn requests_beyond_the_caps_are_refused_and_the_slave_stays_healthy() {
        let (open, gate) = tokio::sync::watch::channel(false);
        let table = RemoteTable::new()
            .register("block", move |_| {
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(Value::Null)
                }
            })
            .register("echo", |v| async move { Ok(v) });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = NodeId::new(listener.local_addr().unwrap());
        let opts = SlaveOptions {
            name: "capped".into(),
            slots: 2,
            tags: BTreeMap::new(),
            key: None,
            insecure: true,
            table,
            logs: None,
            monitor: None,
        };
        let server = tokio::spawn(serve(listener, opts));
        // Four connections fill the slave's places, 256 each; one more on each is
        // refused with the per-connection limit (which also proves, the session being
        // in order, that the ones before it were admitted).
        let masters: Vec<Master> = (0..4)
            .map(|i| Master::new(&format!("m{i}"), None, None))
            .collect();
        let mut blocked = Vec::new();
        for master in &masters {
            for _ in 0..MAX_IN_FLIGHT_PER_SESSION {
                blocked.push(master.spawn(node, "block", Value::Null).await.unwrap());
            }
            let extra = master.spawn(node, "block", Value::Null).await.unwrap();
            let why = refusal(extra).await;
            assert!(
                why.contains("256 calls and commands in flight") && why.contains("wait"),
                "{why}"
            );
            let why = exec_refusal(master, node).await;
            assert!(why.contains("256 calls and commands in flight"), "{why}");
        }
        // A fifth connection finds the slave full: the per-slave limit.
        let fifth = Master::new("m4", None, None);
        let why = refusal(fifth.spawn(node, "block", Value::Null).await.unwrap()).await;
        assert!(
            why.contains("1024 calls and commands in flight from all its masters"),
            "{why}"
        );
        let why = exec_refusal(&fifth, node).await;
        assert!(why.contains("1024"), "{why}");
        // Once they finish, every admitted call answers and new work is taken.
        open.send(true).unwrap();
        for task in blocked {
            assert_eq!(task.join().await.unwrap(), Value::Null);
        }
        assert_eq!(fifth.call(node, "echo", json!(5)).await.unwrap(), json!(5));
        let mut job = fifth.exec(node, vec!["true".into()], None).await.unwrap();
        let mut exit = None;
        while let Some(event) = job.next().await {
            if let ExecEvent::Exit(e) = event {
                exit = Some(e);
            }
        }
        assert!(exit.is_some_and(|e| e.success()));
        server.abort();
    }
}
