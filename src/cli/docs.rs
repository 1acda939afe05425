//! Documentation generated from the command line's own definition: shell completion
//! scripts (clap_complete) and manual pages (clap_mangen), so that neither can drift
//! from the options `--help` shows. Both are written to stdout, before any runtime
//! starts; a reader that goes away (`localnet man | head`) ends the command quietly.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use clap_complete::Shell;

use super::args::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: Shell) -> Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "localnet", &mut script);
    write_stdout(&script)
}

/// Prints the manual page of localnet, or of one of its subcommands (`localnet-NAME`).
pub fn man(subcommand: Option<&str>) -> Result<()> {
    let mut command = Cli::command();
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => {
            let Some(sub) = command.find_subcommand(name) else {
                let known: Vec<&str> = command
                    .get_subcommands()
                    .map(|s| s.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                bail!(
                    "no subcommand {name:?}; pages exist for: {}",
                    known.join(", ")
                );
            };
            // Named as man expects a subcommand's page: localnet-master(1).
            let full = format!("localnet-{}", sub.get_name());
            sub.clone().name(full)
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .context("rendering the manual page")?;
    write_stdout(&roff)
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}
