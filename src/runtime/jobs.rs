//! Command jobs on a slave: the table of what runs, running a command, its output pumps.
//!
//! This module owns a slave's jobs across connections: each command is a child process
//! in its own process group (killed as a group: on request, when its master goes away,
//! when its timeout passes, when the slave terminates or dies), its output streamed as
//! it comes with backpressure (a job blocks on its pipe rather than lose a line).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

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

/// What a slave knows about the jobs it runs, across connections.
#[derive(Default)]
pub(crate) struct Jobs {
    running: Mutex<HashMap<(u64, u64), Job>>,
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
/// `timeout_ms`.
pub(crate) async fn run_command(
    session: u64,
    id: u64,
    argv: &[String],
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
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feeder = input.map(|input| tokio::spawn(feed(child.stdin.take(), input, id, out.clone())));
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
