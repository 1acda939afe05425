//! `localnet daemon`: the daemon's options from the arguments; the loop itself is
//! [`localnet::daemon::run`].

use anyhow::Result;
use localnet::control;
use localnet::daemon::DaemonOptions;

use super::args::DaemonArgs;

/// Runs the discovery daemon in the foreground until SIGINT or SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let mut node = super::node_options_with_default_key(&args.net)?;
    node.name = args.name;
    node.tags = args.tags.into_iter().collect();
    node.state_dir = args.state_dir;
    node.protocol.min_interval_ms = args.heartbeat.as_millis() as u64;
    let control = args.control.unwrap_or_else(control::default_path);
    let http = args.http.map(|listen| localnet::http::HttpOptions {
        listen,
        sd_port: args.sd_port,
        release_when_idle: true,
    });
    localnet::daemon::run(DaemonOptions {
        node,
        control,
        http,
    })
    .await?;
    Ok(())
}
