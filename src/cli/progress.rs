//! What `master` and `copy` show and do while slaves work: on a terminal, a progress
//! line at the bottom of stderr (`12/20 done · 1 failed · 3 running`) that output and
//! log lines go above; on Ctrl-C, who is still running; on a second Ctrl-C within 1 s,
//! the end of every job (as pdsh does).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use localnet::stdio::OutputStream;
use tokio::sync::watch;

use super::Stdio;

/// How soon a second Ctrl-C must follow the first to kill every job.
pub const SECOND_CTRL_C_WITHIN: Duration = Duration::from_secs(1);

/// The progress of a run over slaves (clones share it).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    err: OutputStream,
    /// Draw the progress line.
    show: bool,
    total: usize,
    state: Mutex<State>,
    /// Becomes true on the second Ctrl-C: every job is to be killed.
    kill: watch::Sender<bool>,
    ctrl_c: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ctrl_c.abort();
        if self.show {
            self.err.set_status(""); // an error return too leaves no progress line
        }
    }
}

/// A slave's work that Ctrl-C stopped, or kept from starting.
#[derive(Debug, thiserror::Error)]
#[error("{0}: interrupted by Ctrl-C")]
pub struct Interrupted(pub &'static str);

#[derive(Default)]
struct State {
    done: usize,
    failed: usize,
    running: BTreeSet<String>,
}

impl Progress {
    /// Starts showing the progress of `total` slaves' work (when `show`, and stderr is
    /// a terminal), and listening for Ctrl-C.
    pub fn start(stdio: &Stdio, total: usize, show: bool) -> Self {
        let (kill, _) = watch::channel(false);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let ctrl_c = tokio::spawn(async move {
                let mut last: Option<tokio::time::Instant> = None;
                while tokio::signal::ctrl_c().await.is_ok() {
                    let Some(inner) = weak.upgrade() else { return };
                    let now = tokio::time::Instant::now();
                    if *inner.kill.borrow() {
                        // Killing did not end the run (output nobody reads, say): go now;
                        // the slaves kill what is left when the connections close.
                        eprintln!("\nlocalnet: interrupted");
                        std::process::exit(130);
                    }
                    if last.is_some_and(|at| now.duration_since(at) <= SECOND_CTRL_C_WITHIN) {
                        inner.say(&format!(
                            "localnet: killing the jobs on {} (Ctrl-C again: exit at once)",
                            inner.running_text()
                        ));
                        inner.kill.send_replace(true);
                        last = None;
                    } else {
                        inner.say(&format!(
                            "localnet: still running on {}; Ctrl-C again within 1 s kills them",
                            inner.running_text()
                        ));
                        last = Some(now);
                    }
                }
            });
            Inner {
                err: stdio.err.clone(),
                show: show && stdio.err.shows_status(),
                total,
                state: Mutex::new(State::default()),
                kill,
                ctrl_c,
            }
        });
        let progress = Self { inner };
        progress.draw();
        progress
    }

    /// `name`'s work has started.
    pub fn started(&self, name: &str) {
        self.inner.lock().running.insert(name.to_string());
        self.draw();
    }

    /// `name`'s work has ended, well or not.
    pub fn ended(&self, name: &str, ok: bool) {
        {
            let mut state = self.inner.lock();
            state.running.remove(name);
            state.done += 1;
            state.failed += usize::from(!ok);
        }
        self.draw();
    }

    /// Becomes true when every job is to be killed (the second Ctrl-C).
    pub fn kill_signal(&self) -> watch::Receiver<bool> {
        self.inner.kill.subscribe()
    }

    /// Whether the second Ctrl-C came.
    pub fn killed(&self) -> bool {
        *self.inner.kill.borrow()
    }

    /// Removes the progress line (before the verdict is written).
    pub fn finish(&self) {
        if self.inner.show {
            self.inner.err.set_status("");
        }
    }

    fn draw(&self) {
        if !self.inner.show {
            return;
        }
        let line = {
            let state = self.inner.lock();
            let mut line = format!("{}/{} done", state.done, self.inner.total);
            if state.failed > 0 {
                line += &format!(" · {} failed", state.failed);
            }
            line += &format!(" · {} running", state.running.len());
            line
        };
        self.inner.err.set_status(&line);
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slaves still at work as a node set with a count, and how many wait.
    fn running_text(&self) -> String {
        let state = self.lock();
        let running = localnet::nodeset::fold(state.running.iter().map(String::as_str));
        let waiting = self.total - state.done - state.running.len();
        match (state.running.len(), waiting) {
            (0, 0) => "no slave".into(),
            (0, w) => format!("no slave ({w} waiting for their turn)"),
            (n, 0) => format!("{running} ({n})"),
            (n, w) => format!("{running} ({n}; {w} waiting for their turn)"),
        }
    }

    /// A line on stderr, never waiting.
    fn say(&self, line: &str) {
        self.err.log_line(line);
    }
}

/// Completes once `kill` says every job is to be killed.
pub async fn killed(kill: &mut watch::Receiver<bool>) {
    let _ = kill.wait_for(|k| *k).await;
}
