//! The `localnet` command: parses the arguments, sets up logging and the async runtime,
//! runs the subcommand (see [`cli`]) and turns its outcome into an exit code: 0 success,
//! 2 usage error (from clap), 1 runtime error with a one-line cause.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::args::{Cli, Command, KeyCommand};

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on usage errors
    // Generated documentation needs neither logging nor a runtime.
    let docs = match &cli.command {
        Command::Completions { shell } => Some(cli::docs::completions(*shell)),
        Command::Man { subcommand } => Some(cli::docs::man(subcommand.as_deref())),
        _ => None,
    };
    if let Some(result) = docs {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("localnet: error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let quiet = !matches!(cli.command, Command::Daemon(_) | Command::Slave(_));
    let stdio = cli::Stdio::new();
    init_logging(quiet, matches!(cli.command, Command::Slave(_)), &stdio);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("localnet: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli, &stdio));
    stdio.flush_blocking(); // output and log lines still queued
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localnet: error: {}", localnet::error_text(e.as_ref()));
            match e.downcast_ref::<cli::ExitStatus>() {
                Some(status) => ExitCode::from(status.code),
                None => ExitCode::from(1),
            }
        }
    }
}

/// Logging to stderr or the journal, filtered by `$LOCALNET_LOG` (default: warnings
/// only when `quiet`); a slave's lines can be redirected to its master.
fn init_logging(quiet: bool, slave: bool, stdio: &cli::Stdio) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::filter_fn};
    let default = if quiet { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_env("LOCALNET_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd with stderr on the journal: native journal entries (syslog
    // priorities, journald's timestamps), or if journald's socket is out of reach,
    // `<N>`-prefixed lines without timestamps on the stream; else text on stderr.
    let journal = localnet::service::stderr_is_journal();
    let journald = journal.then(localnet::service::journald_layer).flatten();
    // Log lines are queued for a thread that writes them: a stuck stderr never blocks
    // the runtime (lines are dropped and counted instead).
    let stream = (journal && journald.is_none()).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(localnet::service::JournalStreamFormat::default())
            .with_writer(stdio.err.clone())
    });
    let local = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(stdio.err.clone())
    });
    // A slave's log lines go to the master that redirected them, else to the local log;
    // its connection lifecycle lines always stay in the local log too.
    let logs = std::sync::Arc::new(localnet::LogTargets::with_local_log(stdio.err.clone()));
    let not_redirected = || {
        let logs = logs.clone();
        filter_fn(move |meta| !logs.redirected() || meta.target() == localnet::LIFECYCLE)
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(journald.with_filter(not_redirected()))
        .with(stream.with_filter(not_redirected()))
        .with(local.with_filter(not_redirected()))
        .with(slave.then(|| logs.layer()))
        .init();
}

/// Runs the subcommand.
async fn run(cli: Cli, stdio: &cli::Stdio) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => cli::daemon::run(args).await,
        Command::Peers(args) => cli::peers::run(args).await,
        Command::Watch(args) => cli::watch::watch(args).await,
        Command::Status(args) => cli::watch::status(args).await,
        Command::Slave(args) => cli::slave::run(args).await,
        Command::Master(args) => cli::master::run(args, stdio).await,
        Command::Copy(args) => cli::copy::run(args, stdio).await,
        Command::Terminate(args) => cli::terminate::run(args).await,
        Command::Key(KeyCommand::Generate { out }) => cli::key::generate(&out),
        Command::Completions { .. } | Command::Man { .. } => Ok(()), // handled in main
    }
}
