//! `localnet slave`: a slave in the foreground, with the built-in functions.

use std::time::Duration;

use anyhow::{Context, Result};
use localnet::{Backend, RemoteTable};

use super::args::SlaveArgs;

/// Runs a slave until a master terminates it or a signal arrives.
pub async fn run(args: SlaveArgs) -> Result<()> {
    let (host, port) = args.listen;
    let mut opts = super::backend_options(&args.net, None)?;
    opts.name = args.name;
    opts.discovery.tags = args.tags.into_iter().collect();
    opts.slots = args.slots;
    opts.insecure = args.insecure;
    let http = match args.http {
        Some(listen) => {
            let http = localnet::http::HttpOptions {
                listen,
                sd_port: args.sd_port,
                release_when_idle: true,
            };
            Some((localnet::http::bind(&http).await?, http))
        }
        None => None,
    };
    let tags = opts.discovery.tags.clone();
    let backend = Backend::initialize_with(&host, port, builtin_functions(), opts).await?;
    let node = backend.node_id();
    let signalled =
        localnet::daemon::shutdown_signal().context("cannot install the SIGTERM handler")?;
    tracing::info!(%node, "slave listening");
    // Once set-up and the start-up burst are over, only the code an idle slave runs
    // stays resident.
    localnet::memory::release_unused_code_after_start();
    // On a signal the slave kills its jobs and says goodbye before it exits, so that
    // peers see it leave rather than fail.
    backend
        .start_slave_with(signalled, |node, monitor| async move {
            let Some((listener, http)) = http else { return };
            tracing::info!(listen = %http.listen, "HTTP: /metrics, /sd, /peers, /events, /jobs and the status page at /");
            let sources = localnet::http::Sources {
                node,
                slave: Some(monitor),
                logs: localnet::LogTargets::of_current_subscriber(),
                control: None,
                tags,
            };
            localnet::http::serve(listener, sources, http).await
        })
        .await?;
    Ok(())
}

/// Functions every `localnet slave` offers.
fn builtin_functions() -> RemoteTable {
    RemoteTable::new()
        .register("echo", |v| async move { Ok(v) })
        .register("hostname", |_| async move {
            Ok(serde_json::json!(localnet::host_name()))
        })
        .register("sleep", |v| async move {
            let ms = v.as_u64().context("sleep takes a number of milliseconds")?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(serde_json::Value::Null)
        })
}
