//! `localnet master`'s own stdin as its jobs' stdin: where it comes from, and how each
//! job gets all of it.
//!
//! A regular file (`< FILE`) is read by every job on its own, from the start, with
//! `pread` (no shared offset): jobs started late by `--fanout` get all of it too. A pipe
//! (or another stream) can be read once only: a thread reads it and every job gets
//! each chunk as it comes, so the slowest job sets the pace and memory stays bounded
//! (one chunk per job in channels, [`localnet::INPUT_WINDOW`] chunks per job on the wire).
//! A terminal or /dev/null gives no input, as with pdsh and clush.

use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::Arc;

use localnet::{INPUT_CHUNK, JobInput};
use tokio::sync::mpsc;

/// Where the jobs' stdin comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdinSource {
    /// None: jobs get /dev/null.
    None,
    /// A regular file: each job reads it itself.
    File,
    /// A pipe, socket or device: read once, broadcast.
    Pipe,
}

impl StdinSource {
    /// What this process's stdin is: none for a terminal, /dev/null or a closed stdin.
    pub fn of_this_process() -> Self {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            return StdinSource::None;
        }
        let Ok(meta) = std::fs::metadata("/proc/self/fd/0") else {
            return StdinSource::None;
        };
        let null = std::fs::metadata("/dev/null").ok();
        let file_type = meta.file_type();
        if file_type.is_file() {
            StdinSource::File
        } else if file_type.is_char_device()
            && null.is_some_and(|n| {
                use std::os::unix::fs::MetadataExt;
                n.rdev() == meta.rdev()
            })
        {
            StdinSource::None
        } else {
            StdinSource::Pipe
        }
    }
}

/// A job's share of the stdin.
pub enum JobStdin {
    /// A regular file, read from the start.
    File(Arc<std::fs::File>),
    /// The chunks of a broadcast.
    Broadcast(mpsc::Receiver<Arc<Vec<u8>>>),
}

/// Hands every job its stdin: `stdin_for(i)` once per job.
pub struct StdinFeeds {
    file: Option<Arc<std::fs::File>>,
    broadcast: Vec<Option<mpsc::Receiver<Arc<Vec<u8>>>>>,
}

impl StdinFeeds {
    /// The feeds of `jobs` jobs from `source` (nothing when it is none). A pipe starts
    /// being read now, by a thread of its own (a read that blocks never holds up the
    /// runtime or the end of the run).
    pub fn new(source: StdinSource, jobs: usize) -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let mut feeds = StdinFeeds {
            file: None,
            broadcast: Vec::new(),
        };
        match source {
            StdinSource::None => {}
            StdinSource::File => {
                let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
                feeds.file = Some(Arc::new(std::fs::File::from(fd)));
            }
            StdinSource::Pipe => {
                let (chunks, mut read) = mpsc::channel::<Arc<Vec<u8>>>(2);
                std::thread::Builder::new()
                    .name("localnet-stdin".into())
                    .spawn(move || read_stream(chunks))?;
                let mut senders = Vec::with_capacity(jobs);
                for _ in 0..jobs {
                    let (tx, rx) = mpsc::channel(1);
                    senders.push(tx);
                    feeds.broadcast.push(Some(rx));
                }
                tokio::spawn(async move {
                    while let Some(chunk) = read.recv().await {
                        // A job that ended (or never started) has dropped its receiver;
                        // once none is left, stdin is read no further.
                        senders.retain(|tx| !tx.is_closed());
                        if senders.is_empty() {
                            return;
                        }
                        for tx in &senders {
                            let _ = tx.send(chunk.clone()).await;
                        }
                    }
                });
            }
        }
        Ok(feeds)
    }

    /// Job `index`'s stdin, or none.
    pub fn stdin_for(&mut self, index: usize) -> Option<JobStdin> {
        if let Some(file) = &self.file {
            return Some(JobStdin::File(file.clone()));
        }
        self.broadcast
            .get_mut(index)
            .and_then(Option::take)
            .map(JobStdin::Broadcast)
    }
}

/// Reads this process's stdin to its end, in chunks, until nobody listens.
fn read_stream(chunks: mpsc::Sender<Arc<Vec<u8>>>) {
    use std::io::Read;
    let mut stdin = std::io::stdin().lock();
    loop {
        let mut buf = vec![0; INPUT_CHUNK];
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if chunks.blocking_send(Arc::new(buf)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("reading stdin failed: {e}; the jobs' stdin ends here");
                return;
            }
        }
    }
}

/// Writes a job's stdin to it, then ends it. Stops early (quietly) when the job ends.
pub async fn feed(input: JobInput, stdin: JobStdin) {
    match stdin {
        JobStdin::File(file) => {
            let mut offset = 0u64;
            loop {
                let file = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; INPUT_CHUNK];
                    let n = file.read_at(&mut buf, offset)?;
                    buf.truncate(n);
                    Ok::<_, std::io::Error>(buf)
                })
                .await;
                let chunk = match read {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(e)) => {
                        tracing::warn!("reading stdin failed: {e}; the job's stdin ends here");
                        break;
                    }
                    Err(_) => break,
                };
                if chunk.is_empty() {
                    break;
                }
                offset += chunk.len() as u64;
                if input.write(&chunk).await.is_err() {
                    return;
                }
            }
        }
        JobStdin::Broadcast(mut chunks) => {
            while let Some(chunk) = chunks.recv().await {
                if input.write(&chunk).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = input.finish().await;
}
