//! Log redirection: a slave's own log lines sent to the master that asked for them.
//!
//! This module owns where a slave's log events go while a master has redirected them
//! ([`RedirectLayer`], the queue towards that master and the task that batches it into
//! [`Frame::Log`]s), and the [`LIFECYCLE`] target whose lines stay in the local log too.

use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::runtime::protocol::Frame;

/// Log lines waiting to go to a master before they go to the local log instead.
pub(crate) const LOG_QUEUE: usize = 4096;

/// The tracing target of a slave's connection and session lifecycle lines (connected,
/// disconnected, connection dead, terminating). Their local log keeps them even while
/// log lines are redirected to a master: pair the local layers' filter with it.
pub const LIFECYCLE: &str = "localnet::lifecycle";

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

/// Sends log lines to `tx` for connection `session`, or (`None`) stops sending them to
/// that connection (a later redirection by another connection stays).
pub(crate) fn set_log_target(session: u64, tx: Option<mpsc::Sender<String>>) {
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
        // Lifecycle lines are logged locally as well (by the local layers).
        if !forward_log_line(text.clone()) && event.metadata().target() != LIFECYCLE {
            crate::stdio::log_line(&text);
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

/// Sends the lines queued on `rx` to the master in batches; to the local log once the
/// connection is gone.
pub(crate) async fn forward_logs(mut rx: mpsc::Receiver<String>, out: mpsc::Sender<Frame>) {
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
                crate::stdio::log_line(&l);
            }
            return;
        }
    }
}
