//! `localnet peers`: the peers as a table or JSON.

use anyhow::{Result, bail};
use localnet::FindOptions;

use super::args::PeersArgs;
use super::output::{hint_text, peer_table};

/// Lists the peers (from the daemon, or a discovery of its own); fewer than --wait-for
/// is an error that says what was seen.
pub async fn run(args: PeersArgs) -> Result<()> {
    let opts = FindOptions {
        control: args.control,
        timeout: args.timeout,
        wait_for: args.wait_for,
        node: super::node_options(&args.net)?,
    };
    let (peers, hints) = localnet::find_peers_explained(&opts).await?;
    let short = args.wait_for.filter(|&n| peers.len() < n);
    if args.json {
        println!("{}", serde_json::to_string(&peers)?);
    } else if peers.is_empty() && short.is_none() {
        eprintln!("no peers found{}", hint_text(&hints));
    } else if !peers.is_empty() {
        println!("{}", peer_table(&peers));
    }
    if let Some(n) = short {
        let why = match hints.is_empty() {
            true => " (a longer --timeout waits longer; check that the others run with the \
                     same --group, --port and key)"
                .to_string(),
            false => hint_text(&hints),
        };
        bail!(
            "found only {} of {n} peers within {}{why}",
            peers.len(),
            humantime::format_duration(args.timeout)
        );
    }
    Ok(())
}
