//! `localnet terminate`: slaves kill their jobs, say goodbye and exit.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use localnet::{Master, NodeId};

use super::args::TerminateArgs;
use super::output::hint_text;

/// Terminates the slaves named (by node id or name), or all found with --all; a slave
/// that does not acknowledge is an error.
pub async fn run(args: TerminateArgs) -> Result<()> {
    let opts = super::backend_options(&args.net, args.control)?;
    let master = Master::new(&localnet::host_name(), opts.discovery.key.clone(), None);
    let mut targets: Vec<(String, NodeId)> = Vec::new();
    let mut names = Vec::new();
    for n in &args.nodes {
        match n.parse::<NodeId>() {
            Ok(nid) => targets.push((nid.to_string(), nid)),
            Err(_) => names.push(n.clone()),
        }
    }
    if args.all || !names.is_empty() {
        let localnet::Discovered {
            slaves: found,
            hints,
        } = super::find_slaves(
            &opts,
            None,
            args.wait,
            &BTreeMap::new(),
            args.all.then_some(&master),
        )
        .await?;
        // Found none, or not the one named: what was seen may say why.
        let hints = hint_text(&hints);
        for name in &names {
            if !found.iter().any(|p| &p.name == name) {
                bail!(
                    "no slave named {name:?} found within {}{hints}",
                    humantime::format_duration(args.wait)
                );
            }
        }
        if found.is_empty() {
            bail!(
                "no slaves found within {}{hints}",
                humantime::format_duration(args.wait)
            );
        }
        for p in found {
            if args.all || names.contains(&p.name) {
                targets.push((p.name.clone(), NodeId::new(p.addr)));
            }
        }
    }
    if targets.is_empty() {
        bail!(
            "no slaves found within {}",
            humantime::format_duration(args.wait)
        );
    }
    let nodes: Vec<NodeId> = targets.iter().map(|(_, n)| *n).collect();
    let report = master.terminate_slaves(&nodes).await;
    let name_of = |node: &NodeId| {
        targets
            .iter()
            .find(|(_, n)| n == node)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| node.to_string())
    };
    for node in &report.acknowledged {
        println!("terminated {} ({node})", name_of(node));
    }
    for (node, why) in &report.failed {
        eprintln!("localnet: {} ({node}): {why}", name_of(node));
    }
    if !report.failed.is_empty() {
        bail!(
            "{} of {} slaves did not acknowledge",
            report.failed.len(),
            nodes.len()
        );
    }
    Ok(())
}
