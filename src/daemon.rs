//! The discovery daemon's loop: what `localnet daemon` runs in the foreground.
//!
//! [`run`] binds the control socket, starts a [`Node`], serves the control socket to
//! local clients and keeps systemd informed (readiness, a status line with the number
//! of peers, watchdog pings while the discovery loop answers) until SIGINT or SIGTERM;
//! then it says goodbye to the peers and removes the control socket.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast::error::RecvError;

use crate::node::control::{ControlError, ControlSocket};
use crate::node::{Node, NodeError, NodeOptions};
use crate::service;

/// What [`run`] needs: how the node discovers and where the control socket listens.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The discovery node's options (interfaces, group, port, key, name, tags, …).
    pub node: NodeOptions,
    /// Where the control socket listens (see [`crate::node::control::default_path`]).
    pub control: PathBuf,
    /// The HTTP endpoint, if one is asked for ([`crate::http`]).
    pub http: Option<crate::http::HttpOptions>,
}

/// Why the daemon could not start (once running, it only stops on a signal).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The control socket could not be bound.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The SIGTERM handler could not be installed.
    #[error("cannot install the SIGTERM handler")]
    Signal(#[source] std::io::Error),
    /// The discovery node could not start or did not answer.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The HTTP endpoint could not listen.
    #[error(transparent)]
    Http(std::io::Error),
}

/// A future that ends at the first SIGINT or SIGTERM, and logs which it was; the
/// SIGTERM handler is installed now (SIGTERM's default action would end the process
/// before anyone says goodbye).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: leaving"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: leaving"),
        }
    })
}

/// Runs a discovery daemon until SIGINT or SIGTERM (or until the node stops), then
/// leaves: peers get a goodbye, and the control socket's file is removed.
///
/// Readiness is told to systemd once the sockets are bound and the control socket
/// listens; with a watchdog configured, it is pinged only while the discovery loop
/// answers, so that a hung loop gets restarted.
pub async fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let path = opts.control;
    let control = ControlSocket::bind(&path).await?;
    let http = match &opts.http {
        Some(http) => Some((
            crate::http::bind(http).await.map_err(DaemonError::Http)?,
            http.clone(),
        )),
        None => None,
    };
    let shutdown = shutdown_signal().map_err(DaemonError::Signal)?;
    let tags = opts.node.tags.clone();
    let node = Node::start(opts.node).await?;
    let handle = node.handle();
    let status = handle.status().await?;
    tracing::info!(
        id = %status.id,
        name = %status.name,
        interfaces = ?status.interfaces,
        group = %status.group,
        control = %path.display(),
        keyed = status.keyed,
        "localnet daemon running"
    );
    let clients = control.clients();
    let server = tokio::spawn({
        let handle = handle.clone();
        async move { control.serve(handle).await }
    });
    let http = http.map(|(listener, http)| {
        tracing::info!(listen = %http.listen, "HTTP: /metrics, /sd, /peers, /events and the status page at /");
        let sources = crate::http::Sources {
            node: handle.clone(),
            slave: None,
            logs: None,
            control: Some(clients),
            tags,
        };
        tokio::spawn(crate::http::serve(listener, sources, http))
    });
    // Sockets are bound and the control socket listens: ready.
    service::ready(&format!("{} peers known", status.peers));
    // Once the start-up burst (answers to peers starting with us) is over, only the
    // code an idle node runs stays resident. Released right at ready, the code of that
    // burst would fault back in while it runs.
    crate::memory::release_unused_code_after_start();
    let mut events = handle.subscribe();
    let watchdog = service::watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.recv() => match event {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    if let Ok(s) = handle.status().await {
                        service::status(&format!("{} peers known", s.peers));
                    }
                }
                Err(RecvError::Closed) => break,
            },
            _ = tick.tick(), if watchdog.is_some() => {
                // Ping only when the discovery loop answers: a hung loop gets restarted.
                let alive = tokio::time::timeout(Duration::from_secs(1), handle.status()).await;
                if matches!(alive, Ok(Ok(_))) {
                    service::watchdog_ping();
                }
            }
        }
    }
    service::stopping();
    node.shutdown().await;
    if let Some(http) = http {
        http.abort();
    }
    server.abort();
    let _ = server.await; // drops the control socket, which removes its file
    tracing::info!("goodbye sent; exiting");
    Ok(())
}
