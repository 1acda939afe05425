//! Writing to stdout and stderr without ever blocking the async runtime.
//!
//! This module owns the process's standard output streams for code that runs on the
//! runtime: each stream is written by a thread of its own, fed through a queue bounded
//! in bytes ([`QUEUE_BYTES`]). A reader that is slow (a pipe nobody drains, a paused
//! terminal) then stalls only that thread:
//! - [`write()`] (job output) waits for room in the queue, so backpressure slows the
//!   producer without stopping anything else on the runtime (keepalives, other slaves);
//! - [`try_write`] and [`log_line`] (log lines) never wait: when the queue is full the
//!   line is dropped and counted, and the next line that fits says how many were lost.
//!
//! Call [`flush`] (async) or [`flush_blocking`] (outside the runtime) before exiting,
//! so that nothing queued is lost.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

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

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn queue(target: Target) -> &'static Arc<Queue> {
    static STDOUT: OnceLock<Arc<Queue>> = OnceLock::new();
    static STDERR: OnceLock<Arc<Queue>> = OnceLock::new();
    let cell = match target {
        Target::Stdout => &STDOUT,
        Target::Stderr => &STDERR,
    };
    cell.get_or_init(|| {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            room: tokio::sync::Notify::new(),
        });
        let for_thread = queue.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("localnet-{target:?}").to_lowercase())
            .spawn(move || writer_thread(&for_thread, target));
        if let Err(e) = spawned {
            queue.lock().failed = Some(e.kind());
        }
        queue
    })
}

fn writer_thread(queue: &Queue, target: Target) {
    loop {
        let chunk = {
            let mut state = queue.lock();
            loop {
                if let Some(chunk) = state.chunks.pop_front() {
                    state.writing = true;
                    break chunk;
                }
                state = queue.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        let written = match target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&chunk).and_then(|()| out.flush())
            }
            Target::Stderr => std::io::stderr().lock().write_all(&chunk),
        };
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

/// Queues `bytes` for `target`, waiting while the queue is full (a chunk larger than
/// the queue goes alone). Fails when an earlier write to the stream failed.
pub async fn write(target: Target, bytes: Vec<u8>) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let queue = queue(target);
    loop {
        let room = queue.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        {
            let mut state = queue.lock();
            if let Some(kind) = state.failed {
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

/// Queues `bytes` for `target` if they fit; never waits. Returns false (and counts a
/// dropped line) when the queue is full or the stream failed.
pub fn try_write(target: Target, bytes: Vec<u8>) -> bool {
    let queue = queue(target);
    let mut state = queue.lock();
    if state.failed.is_some() {
        return false;
    }
    let note = match state.dropped {
        0 => Vec::new(),
        n => {
            format!("localnet: {n} log lines dropped: {target:?} is not being read\n").into_bytes()
        }
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

/// Queues one log line (a newline is added) for stderr; never waits.
pub fn log_line(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    try_write(Target::Stderr, bytes);
}

/// Waits until everything queued for `target` has been written (or failed).
pub async fn flush(target: Target) {
    let queue = queue(target);
    loop {
        let room = queue.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        {
            let state = queue.lock();
            if state.chunks.is_empty() && !state.writing {
                return;
            }
        }
        room.await;
    }
}

/// Like [`flush`] for both streams, for code outside the runtime (such as `main` after
/// the runtime returned). Must not be called on the runtime's threads.
pub fn flush_blocking() {
    for target in [Target::Stdout, Target::Stderr] {
        let queue = queue(target);
        let mut state = queue.lock();
        while !state.chunks.is_empty() || state.writing {
            state = queue.idle.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A `tracing_subscriber` writer for stderr that never blocks: each formatted event is
/// queued with [`try_write`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NonBlockingStderr;

impl Write for NonBlockingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        try_write(Target::Stderr, buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlockingStderr {
    type Writer = NonBlockingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_queued_and_flushed() {
        write(Target::Stdout, b"stdio test line\n".to_vec())
            .await
            .unwrap();
        write(Target::Stdout, Vec::new()).await.unwrap();
        flush(Target::Stdout).await;
        let state = queue(Target::Stdout).lock();
        assert!(state.chunks.is_empty() && !state.writing);
    }
}
