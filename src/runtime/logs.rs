//! Log redirection: a slave's own log lines sent to the master that asked for them.
//!
//! This module owns where a slave's log events go while a master has redirected them
//! ([`RedirectLayer`], the queue towards that master and the task that batches it into
//! [`Frame::Log`]s), and the [`LIFECYCLE`] target whose lines stay in the local log too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;

use crate::runtime::protocol::Frame;
use crate::stdio::{OutputStream, Target};

/// Log lines waiting to go to a master before they go to the local log instead.
pub(crate) const LOG_QUEUE: usize = 4096;

/// The tracing target of a slave's connection and session lifecycle lines (connected,
/// disconnected, connection dead, terminating). Their local log keeps them even while
/// log lines are redirected to a master: pair the local layers' filter with it.
pub const LIFECYCLE: &str = "localnet::lifecycle";

/// Where a slave's own log lines go while a master has asked for them: the handle the
/// slave and its [`RedirectLayer`] share (through an `Arc`), one per slave or per group
/// of slaves that share a log.
///
/// ```
/// use std::sync::Arc;
/// use tracing_subscriber::layer::SubscriberExt;
/// let logs = Arc::new(localnet::LogTargets::default());
/// let subscriber = tracing_subscriber::registry().with(logs.layer());
/// assert!(!logs.redirected());
/// # drop(subscriber);
/// ```
#[derive(Debug, Default)]
pub struct LogTargets {
    /// The queue towards the master that asked last, with the token it was given.
    current: Mutex<Option<(u64, mpsc::Sender<String>)>>,
    next_token: AtomicU64,
    /// Lines handed to a master's queue.
    forwarded: AtomicU64,
    /// Where lines that could not be forwarded go (made on first use unless given).
    local: OnceLock<OutputStream>,
}

impl LogTargets {
    /// Targets whose lines that cannot be forwarded (no room towards the master, or the
    /// connection gone) are written to `local` (by default a stderr stream of their own).
    pub fn with_local_log(local: OutputStream) -> Self {
        let targets = Self::default();
        let _ = targets.local.set(local);
        targets
    }

    /// Writes one line to the local log, never waiting.
    pub(crate) fn log_locally(&self, line: &str) {
        self.local
            .get_or_init(|| OutputStream::new(Target::Stderr))
            .log_line(line);
    }

    /// Whether log lines are being redirected to a master right now (local layers skip
    /// them then, except [`LIFECYCLE`] lines).
    pub fn redirected(&self) -> bool {
        self.current.lock().map(|t| t.is_some()).unwrap_or(false)
    }

    /// Sends one formatted log line to the master that asked for logs. Returns false when
    /// no master asked or its queue is full; the caller then logs the line locally.
    pub fn forward(&self, line: String) -> bool {
        let Ok(target) = self.current.lock() else {
            return false;
        };
        let sent = match &*target {
            Some((_, tx)) => tx.try_send(line).is_ok(),
            None => false,
        };
        if sent {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// How many log lines were handed to masters so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// A tracing layer that sends log events to the master that redirected them.
    pub fn layer(self: &Arc<Self>) -> RedirectLayer {
        RedirectLayer {
            targets: self.clone(),
        }
    }

    /// Sends log lines to `tx` from now on (instead of any earlier master); the token
    /// to give [`LogTargets::stop`].
    pub(crate) fn redirect_to(&self, tx: mpsc::Sender<String>) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut target) = self.current.lock() {
            *target = Some((token, tx));
        }
        token
    }

    /// Stops sending log lines where `token`'s redirection sent them (a later
    /// redirection, by another master, stays).
    pub(crate) fn stop(&self, token: u64) {
        if let Ok(mut target) = self.current.lock()
            && target.as_ref().is_some_and(|(t, _)| *t == token)
        {
            *target = None;
        }
    }

    /// The targets of the [`RedirectLayer`] in the current tracing subscriber, if it has one.
    pub fn of_current_subscriber() -> Option<Arc<LogTargets>> {
        tracing::dispatcher::get_default(|dispatch| {
            dispatch
                .downcast_ref::<RedirectLayer>()
                .map(|layer| layer.targets.clone())
        })
    }
}

/// A tracing layer that sends a slave's log events to the master that redirected them
/// (pair it with local layers filtered by `!targets.redirected()`). Made by
/// [`LogTargets::layer`]; a slave started without targets of its own uses those of the
/// layer in the current subscriber.
pub struct RedirectLayer {
    targets: Arc<LogTargets>,
}

impl RedirectLayer {
    /// Where this layer sends log lines.
    pub fn targets(&self) -> &Arc<LogTargets> {
        &self.targets
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RedirectLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !self.targets.redirected() {
            return;
        }
        let mut text = format!("{} ", event.metadata().level());
        event.record(&mut LineVisitor(&mut text));
        // Lifecycle lines are logged locally as well (by the local layers).
        if !self.targets.forward(text.clone()) && event.metadata().target() != LIFECYCLE {
            self.targets.log_locally(&text);
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
pub(crate) async fn forward_logs(
    mut rx: mpsc::Receiver<String>,
    out: mpsc::Sender<Frame>,
    targets: Arc<LogTargets>,
) {
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
                targets.log_locally(&l);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::functions::RemoteTable;
    use crate::runtime::master::{LogSink, Master};
    use crate::runtime::protocol::NodeId;
    use crate::runtime::slave::{SlaveOptions, serve};
    use serde_json::{Value, json};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    async fn start_slave(name: &str, logs: Option<Arc<LogTargets>>) -> NodeId {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = NodeId::new(listener.local_addr().unwrap());
        let table = RemoteTable::new().register("say", |v: Value| async move {
            tracing::info!("said {v}");
            Ok(Value::Null)
        });
        let opts = SlaveOptions {
            name: name.into(),
            slots: 1,
            tags: Default::default(),
            key: None,
            insecure: false,
            table,
            logs,
            monitor: None,
        };
        tokio::spawn(serve(listener, opts));
        node
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(waited.await.is_ok(), "{what}");
    }

    #[tokio::test]
    async fn each_slave_redirects_through_its_own_targets_and_finds_the_subscribers_layer() {
        let found = Arc::new(LogTargets::default());
        let given = Arc::new(LogTargets::default());
        let _default =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(found.layer()));
        assert!(LogTargets::of_current_subscriber().is_some_and(|t| Arc::ptr_eq(&t, &found)));
        // Two slaves in one program: one uses the layer it finds, one is given targets.
        let first = start_slave("first", None).await;
        let second = start_slave("second", Some(given.clone())).await;
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink_lines = lines.clone();
        let sink: LogSink = Arc::new(move |slave: &str, line: &str| {
            sink_lines.lock().unwrap().push(format!("{slave}: {line}"));
        });
        let master = Master::new("m", None, Some(sink));
        master.redirect_logs_here(&[first]).await.unwrap();
        eventually("the first slave redirects", || found.redirected()).await;
        assert!(!given.redirected(), "the second slave was not asked");
        master.call(first, "say", json!(1)).await.unwrap();
        eventually("the line reaches the master", || {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("first: INFO said 1"))
        })
        .await;
        master.redirect_logs_here(&[second]).await.unwrap();
        eventually("the second slave redirects", || given.redirected()).await;
        master.terminate_slaves(&[first, second]).await;
        eventually("terminating ends both redirections", || {
            !found.redirected() && !given.redirected()
        })
        .await;
    }
}
