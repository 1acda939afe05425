//! Writing to stdout and stderr without ever blocking the async runtime.
//!
//! This module owns [`OutputStream`]: a handle to one of the process's standard output
//! streams for code that runs on the runtime. Each stream is written by a thread of its
//! own, fed through a queue bounded in bytes ([`QUEUE_BYTES`]). A reader that is slow (a
//! pipe nobody drains, a paused terminal) then stalls only that thread:
//! - [`OutputStream::write`] (job output) waits for room in the queue, so backpressure
//!   slows the producer without stopping anything else on the runtime (keepalives,
//!   other slaves);
//! - [`OutputStream::try_write`] and [`OutputStream::log_line`] (log lines) never wait:
//!   when the queue is full the line is dropped and counted, and the next line that fits
//!   says how many were lost.
//!
//! There is no global queue: whoever writes owns a handle (the `localnet` command makes
//! one per stream in `main` and hands clones around). The thread ends once the last
//! clone is dropped and the queue is written out. Call [`OutputStream::flush`] (async)
//! or [`OutputStream::flush_blocking`] (outside the runtime) before exiting, so that
//! nothing queued is lost.
//!
//! ```
//! # async fn demo() -> std::io::Result<()> {
//! let out = localnet::stdio::OutputStream::new(localnet::stdio::Target::Stdout);
//! out.write(b"hello\n".to_vec()).await?;
//! out.flush().await;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};

/// Most bytes queued per stream before writers wait (or log lines are dropped).
pub const QUEUE_BYTES: usize = 1 << 20;

/// One of the process's output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes queued or being written.
    bytes: usize,
    /// The thread is writing a chunk it took from the queue.
    writing: bool,
    /// Log lines dropped since the last one that fit.
    dropped: u64,
    /// Writing failed (the stream is closed): later writes fail at once.
    failed: Option<std::io::ErrorKind>,
    /// Every handle is gone: the thread ends once the queue is empty.
    closed: bool,
    /// The status line changed: the thread redraws it.
    redraw: bool,
}

struct Queue {
    state: Mutex<State>,
    /// Wakes the writer thread.
    work: Condvar,
    /// Wakes blocking flushes.
    idle: Condvar,
    /// Wakes async writers waiting for room, and async flushes.
    room: tokio::sync::Notify,
}

impl State {
    /// Everything queued (a status line's redraw too) is written, or can never be.
    fn written_out(&self) -> bool {
        !self.writing && (self.failed.is_some() || (self.chunks.is_empty() && !self.redraw))
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle to one of the process's output streams (see the module comment). Clones
/// share one queue and one writer thread.
#[derive(Clone)]
pub struct OutputStream {
    handle: Arc<Handle>,
}

/// The last clone's drop tells the writer thread to finish.
struct Handle {
    queue: Arc<Queue>,
    target: Target,
    terminal: Arc<Terminal>,
}

/// A status line kept at the bottom of a terminal (see [`OutputStream::pair`]): the
/// writer threads of stdout and stderr take its lock to write, so that each chunk of
/// output goes above the line (it is cleared first and drawn again after).
#[derive(Default)]
struct Terminal {
    /// The line, empty for none (locked only to read or change it, never while writing).
    status: Mutex<String>,
    /// Held while a writer thread writes to the terminal.
    drawing: Mutex<()>,
    /// Stderr is a terminal (the line is drawn there).
    stderr_is_tty: bool,
    /// Stdout is the terminal too (its chunks must go above the line).
    stdout_is_tty: bool,
}

impl Terminal {
    fn lock(&self) -> std::sync::MutexGuard<'_, String> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status line now.
    fn line(&self) -> String {
        self.lock().clone()
    }
}

/// Clears the line the cursor is on (the status line) and returns to its start.
const CLEAR_LINE: &[u8] = b"\r\x1b[K";

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.work.notify_one();
    }
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OutputStream")
            .field(&self.handle.target)
            .finish()
    }
}

fn writer_thread(queue: &Queue, target: Target, terminal: &Terminal) {
    let on_terminal = terminal.stderr_is_tty
        && match target {
            Target::Stdout => terminal.stdout_is_tty,
            Target::Stderr => true,
        };
    loop {
        let chunk = {
            let mut state = queue.lock();
            loop {
                if let Some(chunk) = state.chunks.pop_front() {
                    state.writing = true;
                    break Some(chunk);
                }
                if std::mem::take(&mut state.redraw) {
                    state.writing = true;
                    break None;
                }
                if state.closed {
                    return;
                }
                state = queue.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        let write = |bytes: &[u8]| match target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Target::Stderr => std::io::stderr().lock().write_all(bytes),
        };
        let written = match (&chunk, on_terminal) {
            (Some(chunk), false) => write(chunk),
            (chunk, true) => {
                // Above the status line: clear it, write, draw it again.
                let _drawing = terminal.drawing.lock().unwrap_or_else(|e| e.into_inner());
                let status = terminal.line();
                let mut err = std::io::stderr().lock();
                let drawn = !status.is_empty() || chunk.is_none();
                let mut result = Ok(());
                if drawn {
                    result = err.write_all(CLEAR_LINE);
                }
                if let Some(chunk) = chunk {
                    result = result.and_then(|()| write(chunk));
                }
                if drawn && !status.is_empty() {
                    result = result.and_then(|()| err.write_all(status.as_bytes()));
                }
                result
            }
            (None, false) => Ok(()),
        };
        let chunk = chunk.unwrap_or_default();
        let mut state = queue.lock();
        state.writing = false;
        state.bytes = state.bytes.saturating_sub(chunk.len());
        if let Err(e) = written {
            // Nobody will read this stream again: drop what waits and fail later writes.
            state.failed = Some(e.kind());
            state.chunks.clear();
            state.bytes = 0;
        }
        drop(state);
        queue.room.notify_waiters();
        queue.idle.notify_all();
    }
}

impl OutputStream {
    /// A handle to `target`, with a writer thread of its own. If the thread cannot be
    /// started, writes fail (and log lines are dropped) instead of blocking.
    pub fn new(target: Target) -> Self {
        Self::with_terminal(target, Arc::new(Terminal::default()))
    }

    /// Handles to stdout and stderr that share a status line
    /// ([`OutputStream::set_status`]), drawn when stderr is a terminal.
    pub fn pair() -> (Self, Self) {
        use std::io::IsTerminal;
        let terminal = Arc::new(Terminal {
            status: Mutex::new(String::new()),
            drawing: Mutex::new(()),
            stderr_is_tty: std::io::stderr().is_terminal(),
            stdout_is_tty: std::io::stdout().is_terminal(),
        });
        (
            Self::with_terminal(Target::Stdout, terminal.clone()),
            Self::with_terminal(Target::Stderr, terminal),
        )
    }

    /// Whether a status line set here would be shown (stderr is a terminal).
    pub fn shows_status(&self) -> bool {
        self.handle.terminal.stderr_is_tty
    }

    /// Shows `line` (one line, no newline) at the bottom of the terminal, below the
    /// output, until it is changed; an empty `line` removes it. Never waits: the
    /// stderr writer thread draws it. Nothing is shown unless the stream was made by
    /// [`OutputStream::pair`] and stderr is a terminal.
    pub fn set_status(&self, line: &str) {
        let terminal = &self.handle.terminal;
        if !terminal.stderr_is_tty {
            return;
        }
        {
            let mut status = terminal.lock();
            if *status == line {
                return;
            }
            status.clear();
            status.push_str(line);
        }
        // The stderr stream's thread draws; from the stdout handle, the next chunk does.
        if self.handle.target == Target::Stderr {
            self.queue().lock().redraw = true;
            self.queue().work.notify_one();
        }
    }

    fn with_terminal(target: Target, terminal: Arc<Terminal>) -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            room: tokio::sync::Notify::new(),
        });
        let for_thread = (queue.clone(), terminal.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("localnet-{target:?}").to_lowercase())
            .spawn(move || writer_thread(&for_thread.0, target, &for_thread.1));
        if let Err(e) = spawned {
            queue.lock().failed = Some(e.kind());
        }
        Self {
            handle: Arc::new(Handle {
                queue,
                target,
                terminal,
            }),
        }
    }

    fn queue(&self) -> &Queue {
        &self.handle.queue
    }

    /// Queues `bytes`, waiting while the queue is full (a chunk larger than the queue
    /// goes alone). Fails when an earlier write to the stream failed.
    pub async fn write(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let queue = self.queue();
        loop {
            let room = queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = queue.lock();
                if let Some(kind) = state.failed {
                    let target = self.handle.target;
                    return Err(std::io::Error::new(
                        kind,
                        format!("writing to {target:?} failed"),
                    ));
                }
                if state.bytes == 0 || state.bytes + bytes.len() <= QUEUE_BYTES {
                    state.bytes += bytes.len();
                    state.chunks.push_back(bytes);
                    drop(state);
                    queue.work.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Queues `bytes` if they fit; never waits. Returns false (and counts a dropped
    /// line) when the queue is full or the stream failed.
    pub fn try_write(&self, bytes: Vec<u8>) -> bool {
        let queue = self.queue();
        let mut state = queue.lock();
        if state.failed.is_some() {
            return false;
        }
        let note = match state.dropped {
            0 => Vec::new(),
            n => format!(
                "localnet: {n} log lines dropped: {:?} is not being read\n",
                self.handle.target
            )
            .into_bytes(),
        };
        let len = note.len() + bytes.len();
        if state.bytes + len > QUEUE_BYTES {
            state.dropped += 1;
            return false;
        }
        state.dropped = 0;
        state.bytes += len;
        if !note.is_empty() {
            state.chunks.push_back(note);
        }
        state.chunks.push_back(bytes);
        drop(state);
        queue.work.notify_one();
        true
    }

    /// Queues one log line (a newline is added); never waits.
    pub fn log_line(&self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.try_write(bytes);
    }

    /// Waits until everything queued has been written (or failed).
    pub async fn flush(&self) {
        let queue = self.queue();
        loop {
            let room = queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                if queue.lock().written_out() {
                    return;
                }
            }
            room.await;
        }
    }

    /// Like [`OutputStream::flush`], for code outside the runtime (such as `main` after
    /// the runtime returned). Must not be called on the runtime's threads.
    pub fn flush_blocking(&self) {
        let queue = self.queue();
        let mut state = queue.lock();
        while !state.written_out() {
            state = queue.idle.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A `tracing_subscriber` writer that never blocks: each formatted event is queued with
/// [`OutputStream::try_write`] (dropped and counted when the queue is full).
impl Write for &OutputStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for OutputStream {
    type Writer = &'a OutputStream;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_queued_and_flushed() {
        let out = OutputStream::new(Target::Stdout);
        out.write(b"stdio test line\n".to_vec()).await.unwrap();
        out.write(Vec::new()).await.unwrap();
        out.flush().await;
        let state = out.queue().lock();
        assert!(state.chunks.is_empty() && !state.writing);
    }

    #[test]
    fn the_writer_thread_ends_when_the_last_handle_is_dropped() {
        let out = OutputStream::new(Target::Stderr);
        let queue = out.handle.queue.clone();
        let copy = out.clone();
        drop(out);
        assert!(!queue.lock().closed, "a clone is still alive");
        copy.log_line("stdio test: last line before the end");
        drop(copy);
        // The thread holds the other reference to the queue until it returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&queue) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            Arc::strong_count(&queue),
            1,
            "the writer thread did not end"
        );
        assert!(
            queue.lock().chunks.is_empty(),
            "queued lines were written first"
        );
    }
}
