//! SimpleLocalnet's minimal example, in Rust.
//!
//! ```text
//! cargo run --example simple -- slave 127.0.0.1 8080     # several times, other ports
//! cargo run --example simple -- master 127.0.0.1 8084    # prints the slaves and terminates them
//! ```
//!
//! With a loopback host, discovery stays on `lo`.

use localnet::{Backend, NodeId, RemoteTable};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (role, host, port) = match args.as_slice() {
        [role, host, port] => (role.as_str(), host.as_str(), port.parse::<u16>()?),
        _ => anyhow::bail!("usage: simple (slave|master) HOST PORT"),
    };
    let backend = Backend::initialize(host, port, RemoteTable::new()).await?;
    match role {
        "slave" => backend.start_slave().await?,
        "master" => {
            backend
                .start_master(|master, mut slaves| async move {
                    slaves.sort();
                    let list: Vec<String> = slaves.iter().map(NodeId::to_string).collect();
                    println!("Slaves: [{}]", list.join(", "));
                    master.terminate_all_slaves().await
                })
                .await?;
        }
        other => anyhow::bail!("unknown role {other:?}: use slave or master"),
    }
    Ok(())
}
