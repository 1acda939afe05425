//! `localnet watch` and `localnet status`: what the daemon knows, as it changes or now.

use anyhow::Result;
use localnet::control::ControlError;

use super::args::WatchArgs;
use super::output::{event_line, status_text};

/// Prints one line per peer event from the daemon until it stops.
pub async fn watch(args: WatchArgs) -> Result<()> {
    let mut client = super::connect(args.control).await?;
    client.watch().await?;
    loop {
        let event = match client.next_event().await {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(ControlError::Closed(path)) => {
                eprintln!("localnet: the daemon on {path} stopped; no more events");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if args.json {
            println!("{}", serde_json::to_string(&event)?);
        } else {
            println!("{}", event_line(&event));
        }
    }
}

/// Prints the daemon's status and counters.
pub async fn status(args: WatchArgs) -> Result<()> {
    let mut client = super::connect(args.control).await?;
    let status = client.status().await?;
    if args.json {
        println!("{status}");
    } else {
        print!("{}", status_text(&status));
    }
    Ok(())
}
