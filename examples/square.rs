//! Fans a registered function out over all slaves and sums the results.
//!
//! ```text
//! cargo run --example square -- slave 127.0.0.1 8080     # several times, other ports
//! cargo run --example square -- master 127.0.0.1 8084    # squares 1..=N on N slaves, prints the sum
//! ```

use localnet::{Backend, RemoteTable};
use serde_json::{Value, json};

fn functions() -> RemoteTable {
    RemoteTable::new().register("square", |x: Value| async move {
        let n = x
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("square wants an integer, got {x}"))?;
        Ok(json!(n * n))
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (role, host, port) = match args.as_slice() {
        [role, host, port] => (role.as_str(), host.as_str(), port.parse::<u16>()?),
        _ => anyhow::bail!("usage: square (slave|master) HOST PORT"),
    };
    let backend = Backend::initialize(host, port, functions()).await?;
    match role {
        "slave" => backend.start_slave().await?,
        "master" => {
            let sum = backend
                .start_master(|master, mut slaves| async move {
                    slaves.sort();
                    let calls = slaves.iter().enumerate().map(|(i, slave)| {
                        let master = master.clone();
                        let slave = *slave;
                        async move { master.call(slave, "square", json!(i as i64 + 1)).await }
                    });
                    let results = futures_join_all(calls).await;
                    let mut sum = 0;
                    for (slave, result) in slaves.iter().zip(results) {
                        let value = result?;
                        println!("{slave}: {value}");
                        sum += value.as_i64().unwrap_or(0);
                    }
                    master.terminate_all_slaves().await;
                    anyhow::Ok((slaves.len(), sum))
                })
                .await??;
            println!("Sum of squares 1..={}: {}", sum.0, sum.1);
        }
        other => anyhow::bail!("unknown role {other:?}: use slave or master"),
    }
    Ok(())
}

/// Runs the calls concurrently and returns their results in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    calls: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
