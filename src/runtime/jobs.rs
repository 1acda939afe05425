//! Command jobs on a slave: the table of what runs, running a command, its output pumps.
//!
//! This module owns a slave's jobs across connections: each command is a child process
//! in its own process group (killed as a group: on request, when its master goes away,
//! when its timeout passes, when the slave terminates or dies), its output streamed as
//! it comes with backpressure (a job blocks on its pipe rather than lose a line).

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::runtime::protocol::{Frame, JobExit, Stream};

/// Most bytes of job output read from a pipe into one frame.
const BATCH_BYTES: usize =
    crate::runtime::transport::MAX_PAYLOAD - crate::runtime::protocol::OUTPUT_HEADER;

/// What a master sends for a job's stdin or a file, as the session hands it on.
#[derive(Debug)]
pub(crate) enum InputItem {
    /// The next bytes.
    Data(Vec<u8>),
    /// The end, with the file's digest when it is one.
    End { sha256: Option<String> },
}

/// Where a job or a file task takes its input from: at most
/// [`INPUT_WINDOW`](crate::runtime::protocol::INPUT_WINDOW) chunks and the end wait in it.
pub(crate) type InputReceiver = mpsc::Receiver<InputItem>;

/// What a slave shows of itself while it serves (`--http`: its metrics and status page):
/// counters of its jobs and connections, and the commands running now. Hand one to the
/// slave ([`SlaveOptions::monitor`](crate::SlaveOptions::monitor)) to read it.
///
/// ```
/// let monitor = localnet::SlaveMonitor::default();
/// assert_eq!(monitor.counts().jobs_started, 0);
/// assert!(monitor.running().is_empty());
/// ```
#[derive(Debug, Default)]
pub struct SlaveMonitor {
    jobs_started: AtomicU64,
    jobs_succeeded: AtomicU64,
    jobs_failed: AtomicU64,
    jobs_timed_out: AtomicU64,
    output_bytes: AtomicU64,
    output_lines: AtomicU64,
    connections: AtomicU64,
    running: Mutex<BTreeMap<(u64, u64), RunningJob>>,
}

/// A command running on a slave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunningJob {
    /// The command line, its words joined by spaces.
    pub command: String,
    /// The name of the master that started it.
    pub master: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
}

/// A slave's counters at one moment ([`SlaveMonitor::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlaveCounts {
    /// Commands started.
    pub jobs_started: u64,
    /// Commands that exited with code 0.
    pub jobs_succeeded: u64,
    /// Commands that ended otherwise (a code, a signal, could not run), timeouts aside.
    pub jobs_failed: u64,
    /// Commands killed because their timeout passed.
    pub jobs_timed_out: u64,
    /// Bytes of command output sent to masters.
    pub output_bytes: u64,
    /// Newlines in that output.
    pub output_lines: u64,
    /// Master connections open now.
    pub connections: u64,
}

impl SlaveMonitor {
    /// The counters now.
    pub fn counts(&self) -> SlaveCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SlaveCounts {
            jobs_started: get(&self.jobs_started),
            jobs_succeeded: get(&self.jobs_succeeded),
            jobs_failed: get(&self.jobs_failed),
            jobs_timed_out: get(&self.jobs_timed_out),
            output_bytes: get(&self.output_bytes),
            output_lines: get(&self.output_lines),
            connections: get(&self.connections),
        }
    }

    /// The commands running now, oldest first.
    pub fn running(&self) -> Vec<RunningJob> {
        let mut jobs: Vec<RunningJob> = self
            .running
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        jobs.sort_by_key(|j| j.started_unix_ms);
        jobs
    }

    /// A master connection opened (`true`) or closed.
    pub(crate) fn connection(&self, open: bool) {
        match open {
            true => self.connections.fetch_add(1, Ordering::Relaxed),
            false => self.connections.fetch_sub(1, Ordering::Relaxed),
        };
    }

    fn output(&self, data: &[u8]) {
        self.output_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let lines = memchr::memchr_iter(b'\n', data).count() as u64;
        self.output_lines.fetch_add(lines, Ordering::Relaxed);
    }

    /// A command starts.
    pub(crate) fn started(&self) {
        self.jobs_started.fetch_add(1, Ordering::Relaxed);
    }

    /// Command `key` ended so.
    pub(crate) fn ended(&self, key: (u64, u64), exit: &JobExit) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&key);
        }
        let counter = if exit.timed_out {
            &self.jobs_timed_out
        } else if exit.success() {
            &self.jobs_succeeded
        } else {
            &self.jobs_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a slave knows about the jobs it runs, across connections.
pub(crate) struct Jobs {
    running: Mutex<HashMap<(u64, u64), Job>>,
    pub(crate) monitor: Arc<SlaveMonitor>,
}

pub(crate) enum Job {
    /// A child process, by its process group.
    Process(i32),
    /// A registered function's task.
    Task(AbortHandle),
}

impl Job {
    pub(crate) fn kill(&self) {
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
    /// The jobs of a slave that shows itself in `monitor`.
    pub(crate) fn new(monitor: Arc<SlaveMonitor>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            monitor,
        }
    }

    pub(crate) fn insert(&self, key: (u64, u64), job: Job) {
        if let Ok(mut map) = self.running.lock() {
            map.insert(key, job);
        }
    }
    pub(crate) fn remove(&self, key: (u64, u64)) {
        if let Ok(mut map) = self.running.lock() {
            map.remove(&key);
        }
    }
    pub(crate) fn kill(&self, key: (u64, u64)) {
        if let Ok(map) = self.running.lock()
            && let Some(job) = map.get(&key)
        {
            job.kill();
        }
    }
    /// Kills the jobs of one connection, or all of them; returns how many.
    pub(crate) fn kill_where(&self, session: Option<u64>) -> usize {
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

/// Runs `argv` as job `id` of connection `session`, in a process group of its own,
/// streaming its output to `out` and `input` (if any) to its stdin; kills it after
/// `timeout_ms`. The slave counts it in its monitor (`started`, `ended`) around this
/// call.
pub(crate) async fn run_command(
    (session, id): (u64, u64),
    argv: &[String],
    master: &str,
    timeout_ms: Option<u64>,
    input: Option<InputReceiver>,
    jobs: &Jobs,
    out: &mpsc::Sender<Frame>,
) -> JobExit {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(match input {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
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
            return JobExit::failed(format!("cannot run {}: {e}", argv[0]));
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    jobs.insert((session, id), Job::Process(pgid));
    if let Ok(mut running) = jobs.monitor.running.lock() {
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let job = RunningJob {
            command: argv.join(" "),
            master: master.to_string(),
            started_unix_ms,
        };
        running.insert((session, id), job);
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feeder = input.map(|input| tokio::spawn(feed(child.stdin.take(), input, id, out.clone())));
    let pumps = async {
        tokio::join!(
            pump(stdout, Stream::Stdout, id, out.clone(), &jobs.monitor),
            pump(stderr, Stream::Stderr, id, out.clone(), &jobs.monitor)
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
    if let Some(feeder) = feeder {
        feeder.abort(); // the job is over: no more input is taken for it
    }
    jobs.remove((session, id));
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => JobExit {
            code: s.code(),
            signal: s.signal(),
            timed_out,
            error: None,
            refused: false,
            lost: false,
        },
        Err(e) => JobExit {
            timed_out,
            ..JobExit::failed(format!("waiting for the job failed: {e}"))
        },
    }
}

/// Writes a job's input to its stdin as it comes, saying `InputTaken` for each chunk
/// (the master then sends one more); closes the pipe at the end of the input. A job
/// that closed its stdin early gets no more, but its chunks are still taken (and
/// dropped), so that a master sending the same input to many jobs is not held up.
async fn feed(
    mut pipe: Option<tokio::process::ChildStdin>,
    mut input: InputReceiver,
    id: u64,
    out: mpsc::Sender<Frame>,
) {
    while let Some(InputItem::Data(data)) = input.recv().await {
        if let Some(stdin) = &mut pipe
            && stdin.write_all(&data).await.is_err()
        {
            pipe = None;
        }
        if out.send(Frame::InputTaken { id }).await.is_err() {
            return;
        }
    }
}

/// Reads a job's pipe and sends what it wrote, as it comes, in chunks of at most
/// [`BATCH_BYTES`], bytes untouched. When the connection is gone, the output goes to
/// the slave's own log instead.
async fn pump(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: Stream,
    id: u64,
    out: mpsc::Sender<Frame>,
    monitor: &SlaveMonitor,
) {
    let Some(mut pipe) = pipe else { return };
    // Read into uninitialised capacity (no zeroing), starting small: most jobs write
    // little or nothing, and a job that fills its buffer gets a bigger one next time.
    let mut capacity = 4096;
    loop {
        let mut data = Vec::with_capacity(capacity);
        let n = match pipe.read_buf(&mut data).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(%err, job = id, "reading job output failed");
                return;
            }
        };
        monitor.output(&data);
        if n == capacity {
            capacity = (capacity * 2).min(BATCH_BYTES);
        } else if n < capacity / 4 {
            data.shrink_to_fit(); // what waits in the queue holds what it needs
        }
        if let Err(mpsc::error::SendError(Frame::Output { data, .. })) =
            out.send(Frame::Output { id, stream, data }).await
        {
            tracing::info!(job = id, ?stream, "{}", String::from_utf8_lossy(&data));
        }
        tokio::task::yield_now().await; // timers and keepalives first (see write_frames)
    }
}
