//! `localnet master`: runs a command on slaves and shows their output, prefixed by
//! the slave's name, byte for byte (--raw) or as one JSON object per slave (--json).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use localnet::nodeset::NodeSet;
use localnet::{ExecEvent, JobExit, LineSplitter, Master, MasterError, NodeId, Stream};
use tokio::io::AsyncWriteExt;

use super::Stdio;
use super::args::{Cli, MasterArgs, SelectArgs};
use super::gather::{self, GATHER_CAP, Gathered};
use super::output::{CappedOutput, describe_matches, hint_text, job_result};
use super::progress::{Interrupted, Progress, killed};
use super::stdin::{JobStdin, StdinFeeds, StdinSource, feed};

/// Finds slaves, runs the command on each and reports those that failed; any failure
/// is an error.
pub async fn run(args: MasterArgs, stdio: &Stdio) -> Result<()> {
    if args.raw && args.select.slaves.is_some_and(|n| n != 1) {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--raw runs the command on exactly one slave: leave out --slaves or give --slaves 1",
            )
            .exit();
    }
    let mode = match (args.raw, args.json, args.gather, args.by_node) {
        (true, ..) => OutputMode::Raw,
        (_, true, ..) => OutputMode::Json,
        (_, _, true, _) => OutputMode::Gather,
        (.., true) => OutputMode::ByNode,
        _ => OutputMode::Prefixed,
    };
    let gathered = Arc::new(std::sync::Mutex::new(Vec::new()));
    if let Some(dir) = &args.output_dir {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot make the output directory {}", dir.display()))?;
    }
    let stdin = match args.no_stdin {
        true => StdinSource::None,
        false => StdinSource::of_this_process(),
    };
    // The key is loaded once (a warning about its mode is said once).
    let opts = super::backend_options(&args.select.net, args.select.control.clone())?;
    let master = new_master(&opts, &args.select, stdio);
    let Chosen { slaves, missing } = choose(&args.select, &opts, args.raw, &master).await?;
    let select = &args.select;
    if args.raw && slaves.len() > 1 {
        bail!(
            "--raw runs the command on exactly one slave, but {} match: {}; select one with --nodes NAME or --tag KEY=VALUE",
            slaves.len(),
            describe_matches(&slaves)
        );
    }
    if matches!(stdin, StdinSource::Pipe)
        && let Some(n) = select.fanout.map(to_usize)
        && n < slaves.len()
    {
        bail!(
            "stdin is a pipe, and its bytes go to every job as they come: with --fanout {n} below the {} slaves, \
             later jobs would miss what earlier ones read. Redirect stdin from a file (< FILE), leave out --fanout, \
             or give no input with --no-stdin",
            slaves.len()
        );
    }
    // The sliding window of --fanout: a job starts when one of the running ends.
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    let window = Arc::new(tokio::sync::Semaphore::new(
        select.fanout.map_or(most, |n| to_usize(n).min(most)),
    ));
    let mut feeds = StdinFeeds::new(stdin, slaves.len()).context("cannot read stdin")?;
    let progress = Progress::start(stdio, slaves.len(), mode != OutputMode::Raw);
    let mut jobs = Vec::new();
    for (rank, peer) in slaves.iter().enumerate() {
        let stdin = feeds.stdin_for(rank);
        let window = window.clone();
        let gathered = gathered.clone();
        let output_dir = args.output_dir.clone();
        let master = master.clone();
        let node = NodeId::new(peer.addr);
        let name = peer.name.clone();
        let argv = substitute(&args.command, &peer.name, peer.addr.ip(), rank);
        let timeout = args.timeout;
        let slave_logs = args.slave_logs;
        let stdio = stdio.clone();
        let progress = progress.clone();
        jobs.push(tokio::spawn(async move {
            // Never closed, so acquiring fails only if it were; then run unlimited.
            let _permit = window.acquire().await.ok();
            if progress.killed() {
                // Its turn came after the second Ctrl-C: it never starts.
                return (name, node, Err(Interrupted("not started").into()));
            }
            progress.started(&name);
            let job = Job {
                master: &master,
                node,
                name: &name,
                timeout,
                mode,
                slave_logs,
                gathered: &gathered,
                output_dir: output_dir.as_deref(),
                stdin,
                kill: progress.kill_signal(),
            };
            let outcome = run_on_slave(job, argv, &stdio).await;
            progress.ended(&name, outcome.as_ref().is_ok_and(JobExit::success));
            (name, node, outcome)
        }));
    }
    let mut failures = Vec::new();
    // Failed slaves' names by how they failed, for the summary.
    let mut by_kind: BTreeMap<Failure, Vec<String>> = BTreeMap::new();
    count_missing(&missing, select.wait, &mut failures, &mut by_kind);
    for (job, peer) in jobs.into_iter().zip(&slaves) {
        let (name, node, outcome) = match job.await {
            Ok(done) => done,
            // The task running it panicked: a failure, never a silent success.
            Err(e) => {
                let error = Err(anyhow::anyhow!("the master's task for it failed: {e}"));
                (peer.name.clone(), NodeId::new(peer.addr), error)
            }
        };
        if let Some(dir) = &args.output_dir {
            let ending = match &outcome {
                Ok(exit) => match (exit.code, &exit.error, exit.timed_out) {
                    (Some(code), None, false) => code.to_string(),
                    _ => exit.describe(),
                },
                Err(e) => format!("{e:#}"),
            };
            let path = dir.join(format!("{}.exit", file_name(&name)));
            tokio::fs::write(&path, format!("{ending}\n"))
                .await
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let kind = match &outcome {
            Ok(exit) if exit.success() => continue,
            Ok(exit) => {
                failures.push(format!("{name} ({node}): {}", exit.describe()));
                Failure::of_exit(exit)
            }
            Err(e) => {
                failures.push(format!("{name} ({node}): {e:#}"));
                Failure::of_error(e)
            }
        };
        by_kind.entry(kind).or_default().push(name);
    }
    if matches!(mode, OutputMode::Gather | OutputMode::ByNode) {
        let results = std::mem::take(&mut *gathered.lock().unwrap_or_else(|e| e.into_inner()));
        let blocks = match mode {
            OutputMode::Gather => gather::gather(&results),
            _ => gather::by_node(&results),
        };
        write_blocks(blocks, stdio).await?;
    }
    // Job output first (it is written by another thread), then the verdict: a line per
    // failed slave, then (when several failed) one per way of failing, as a node set.
    progress.finish();
    stdio.out.flush().await;
    stdio
        .err
        .write(verdict(&failures, &by_kind).into_bytes())
        .await?;
    stdio.err.flush().await;
    if progress.killed() {
        return Err(super::ExitStatus {
            code: 130,
            why: "interrupted: every job still running was killed".into(),
        }
        .into());
    }
    let failed = failures.len() - usize::from(!missing.is_empty());
    let why = match (failed, missing.len()) {
        (0, 0) => return Ok(()),
        (0, m) => format!("{} not found", named_slaves(m)),
        (f, 0) => format!("{f} of {} slaves failed", slaves.len()),
        (f, m) => format!(
            "{f} of {} slaves failed, and {} not found",
            slaves.len(),
            named_slaves(m)
        ),
    };
    // pdsh's -S: the largest exit code of the remote commands (at least 1).
    let largest = by_kind
        .keys()
        .filter_map(|k| match k {
            Failure::Exited(code) => Some(*code),
            _ => None,
        })
        .max();
    match (args.max_exit, largest) {
        (true, Some(code)) => Err(super::ExitStatus { code, why }.into()),
        _ => bail!(why),
    }
}

/// The master of a run: named after this host, with the cluster key, slaves' log lines
/// on stderr, and the connect timeout of `select`.
pub(super) fn new_master(
    opts: &localnet::BackendOptions,
    select: &SelectArgs,
    stdio: &Stdio,
) -> Master {
    let stderr = stdio.err.clone();
    let log_sink: localnet::LogSink =
        Arc::new(move |slave: &str, line: &str| stderr.log_line(&format!("{slave}: {line}")));
    let master = Master::new(
        &localnet::host_name(),
        opts.discovery.key.clone(),
        Some(log_sink),
    );
    master.set_connect_timeout(select.connect_timeout);
    master
}

/// The slaves a run goes to.
pub(super) struct Chosen {
    /// The slaves, in name order.
    pub slaves: Vec<localnet::Peer>,
    /// Names of `--nodes` that were not found.
    pub missing: Vec<String>,
}

/// Finds the slaves `select` asks for (connecting to each as it is found), keeps those
/// of `--nodes` less `--exclude`, checks `--slaves` and picks `--pick` of them; an
/// error says why none would do. `whole_search`: look for the whole `--wait` (or take
/// the daemon's whole list) even with a count, to know that no other slave matches.
pub(super) async fn choose(
    select: &SelectArgs,
    opts: &localnet::BackendOptions,
    whole_search: bool,
    master: &Master,
) -> Result<Chosen> {
    let tags: BTreeMap<String, String> = select.tags.iter().cloned().collect();
    // A count to wait for counts every matching slave, whatever its name: with a node
    // set, the whole search (or the daemon's list) is taken, and counted after it.
    let named = select.nodes.is_some() || select.exclude.is_some();
    let wanted = if whole_search || named {
        None
    } else {
        select.slaves
    };
    // Connections open while the search goes on: the work starts as soon as it ends.
    let localnet::Discovered { slaves, hints } =
        super::find_slaves(opts, wanted, select.wait, &tags, Some(master)).await?;
    let Selection { slaves, missing } =
        self::select(slaves, select.nodes.as_ref(), select.exclude.as_ref());
    let wait = humantime::format_duration(select.wait);
    if let Some(n) = select.slaves
        && slaves.len() < n
    {
        match hints.is_empty() {
            true => bail!(
                "found only {} of {n} slaves within {wait} (check that they run with the same --group, --port and key, \
                 and `localnet peers` lists them)",
                slaves.len(),
            ),
            false => bail!(
                "found only {} of {n} slaves within {wait}{}",
                slaves.len(),
                hint_text(&hints)
            ),
        }
    }
    if slaves.is_empty() && named {
        match (&select.nodes, missing.is_empty()) {
            (Some(_), false) => bail!(
                "no slave found within {wait} is in the node set (missing: {})",
                fold_names(&missing)
            ),
            _ => bail!("every slave found within {wait} is left out by --nodes and --exclude"),
        }
    }
    if slaves.is_empty() {
        match hints.is_empty() {
            true => bail!("no slaves found within {wait}; start some with `localnet slave`"),
            false => bail!("no slaves found within {wait}{}", hint_text(&hints)),
        }
    }
    // --slaves counts the matching slaves, before --pick chooses among them.
    let slaves = pick(slaves, select.pick.map(to_usize));
    let nodes: Vec<NodeId> = slaves.iter().map(|p| NodeId::new(p.addr)).collect();
    master.add_known(&nodes);
    Ok(Chosen { slaves, missing })
}

/// The slaves of `--nodes` not found within `wait`, as one failure line and a kind.
pub(super) fn count_missing(
    missing: &[String],
    wait: Duration,
    failures: &mut Vec<String>,
    by_kind: &mut BTreeMap<Failure, Vec<String>>,
) {
    if !missing.is_empty() {
        failures.push(format!(
            "{} ({}): not found within {} (missing)",
            fold_names(missing),
            missing.len(),
            humantime::format_duration(wait)
        ));
        by_kind.insert(Failure::Missing, missing.to_vec());
    }
}

/// What a run says at its end: a line per failure, then (when several failed) one per
/// way of failing, as a node set with its count.
pub(super) fn verdict(failures: &[String], by_kind: &BTreeMap<Failure, Vec<String>>) -> String {
    let mut verdict: String = failures
        .iter()
        .map(|f| format!("localnet: failed: {f}\n"))
        .collect();
    if failures.len() > 1 {
        for (kind, names) in by_kind {
            let set = fold_names(names);
            verdict += &format!("localnet: {kind}: {set} ({})\n", names.len());
        }
    }
    verdict
}

/// Writes `--gather`'s or `--by-node`'s blocks: each header and its stdout on stdout,
/// the same header and its stderr on stderr (when there is any).
async fn write_blocks(blocks: Vec<gather::Block>, stdio: &Stdio) -> Result<()> {
    for block in blocks {
        let header = block.header().into_bytes();
        let with_newline = |mut bytes: Vec<u8>| {
            if bytes.last().is_some_and(|b| *b != b'\n') {
                bytes.push(b'\n');
            }
            bytes
        };
        let mut out = header.clone();
        out.extend(with_newline(block.stdout));
        stdio.out.write(out).await.context("writing output")?;
        if !block.stderr.is_empty() {
            let mut err = header;
            err.extend(with_newline(block.stderr));
            stdio.err.write(err).await.context("writing output")?;
        }
    }
    Ok(())
}

/// How a slave's run failed, as the summary groups them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Failure {
    /// The command exited with this code (not 0).
    Exited(u8),
    /// The command was killed by this signal.
    Signalled(i32),
    /// The command ran past `--timeout` and was killed.
    TimedOut,
    /// The slave refused: an open cluster's slave without `--insecure`, or the key.
    Refused,
    /// No connection, or it was lost before the command ended.
    Unreachable,
    /// The slave could not start the command (not found, ...).
    NotRun,
    /// Named in `--nodes` and not found.
    Missing,
    /// The copy failed on the slave (it could not write or read the file).
    CopyFailed,
    /// Something failed here (a local file could not be read or written).
    Local,
    /// Ctrl-C stopped it, or kept it from starting.
    Interrupted,
}

impl Failure {
    fn of_exit(exit: &JobExit) -> Failure {
        if exit.refused {
            Failure::Refused
        } else if exit.lost {
            Failure::Unreachable
        } else if exit.error.is_some() {
            Failure::NotRun
        } else if exit.timed_out {
            Failure::TimedOut
        } else if let Some(signal) = exit.signal {
            Failure::Signalled(signal)
        } else {
            // Exit codes are 0-255 on Unix; anything else would be a slave's bug.
            Failure::Exited(exit.code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1))
        }
    }

    pub(super) fn of_error(error: &anyhow::Error) -> Failure {
        use localnet::transport::TransportError as T;
        if error.downcast_ref::<Interrupted>().is_some() {
            return Failure::Interrupted;
        }
        match error.downcast_ref::<MasterError>() {
            Some(MasterError::Connect {
                source: T::KeyRequired | T::NoKeyExpected | T::Handshake,
                ..
            }) => Failure::Refused,
            Some(MasterError::Remote { error, .. }) if error.starts_with("refused:") => {
                Failure::Refused
            }
            Some(MasterError::Remote { .. }) => Failure::NotRun,
            Some(MasterError::LocalFile { .. }) => Failure::Local,
            Some(
                MasterError::Connect { .. } | MasterError::Lost(_) | MasterError::NoWelcome { .. },
            ) => Failure::Unreachable,
            Some(_) => Failure::NotRun,
            // Not the library's error: our own context, a local file.
            None => Failure::Local,
        }
    }

    /// How a copy failed: as [`Failure::of_error`], with the slave's errors as
    /// [`Failure::CopyFailed`].
    pub(super) fn of_copy_error(error: &anyhow::Error) -> Failure {
        match Failure::of_error(error) {
            Failure::NotRun => Failure::CopyFailed,
            other => other,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Exited(code) => write!(f, "exited with code {code}"),
            Failure::Signalled(signal) => write!(f, "killed by signal {signal}"),
            Failure::TimedOut => f.write_str("timed out"),
            Failure::Refused => f.write_str("refused"),
            Failure::Unreachable => f.write_str("unreachable"),
            Failure::NotRun => f.write_str("could not run"),
            Failure::Missing => f.write_str("missing"),
            Failure::CopyFailed => f.write_str("copy failed on the slave"),
            Failure::Local => f.write_str("failed here"),
            Failure::Interrupted => f.write_str("interrupted"),
        }
    }
}

/// The slaves a run goes to, and the named ones that were not found.
struct Selection {
    slaves: Vec<localnet::Peer>,
    /// Names of `--nodes` that no slave found has (and `--exclude` did not remove).
    missing: Vec<String>,
}

/// A slave's name as a file name: no `/`, not `.` or `..`.
pub(super) fn file_name(name: &str) -> String {
    match name.replace(['/', '\0'], "_") {
        dots if dots == "." || dots == ".." => format!("_{dots}"),
        safe => safe,
    }
}

/// "1 named slave was" / "3 named slaves were".
fn named_slaves(n: usize) -> String {
    match n {
        1 => "1 named slave was".into(),
        n => format!("{n} named slaves were"),
    }
}

/// A count from the command line (a `u64`) as a `usize`, saturating.
pub(super) fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

pub(super) fn fold_names(names: &[String]) -> String {
    localnet::nodeset::fold(names.iter().map(String::as_str))
}

/// Keeps the slaves named in `nodes` (all when `None`), less those in `exclude`, in
/// name order.
fn select(
    found: Vec<localnet::Peer>,
    nodes: Option<&NodeSet>,
    exclude: Option<&NodeSet>,
) -> Selection {
    let excluded = |name: &str| exclude.is_some_and(|set| set.contains(name));
    let names: std::collections::HashSet<&str> = found.iter().map(|p| p.name.as_str()).collect();
    let missing = nodes
        .iter()
        .flat_map(|set| set.iter())
        .filter(|name| !excluded(name) && !names.contains(name))
        .map(str::to_string)
        .collect();
    let mut slaves: Vec<localnet::Peer> = found
        .into_iter()
        .filter(|p| nodes.is_none_or(|set| set.contains(&p.name)) && !excluded(&p.name))
        .collect();
    slaves.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
    Selection { slaves, missing }
}

/// `n` of `slaves` chosen at random (all of them when fewer), still in name order.
fn pick(mut slaves: Vec<localnet::Peer>, n: Option<usize>) -> Vec<localnet::Peer> {
    if let Some(n) = n
        && n < slaves.len()
    {
        let mut chosen: Vec<usize> = (0..slaves.len()).collect();
        fastrand::shuffle(&mut chosen);
        chosen.truncate(n);
        chosen.sort_unstable();
        let mut index = 0;
        slaves.retain(|_| {
            index += 1;
            chosen.binary_search(&(index - 1)).is_ok()
        });
    }
    slaves
}

/// A task that is aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The command for one slave: `{name}`, `{addr}` and `{rank}` in its words replaced by
/// the slave's name, IP address and rank.
pub(super) fn substitute(
    command: &[String],
    name: &str,
    addr: std::net::IpAddr,
    rank: usize,
) -> Vec<String> {
    let (addr, rank) = (addr.to_string(), rank.to_string());
    command
        .iter()
        .map(|word| {
            // One pass: a name that contains `{rank}` stays as it is.
            let mut out = String::with_capacity(word.len());
            let mut rest = word.as_str();
            while let Some(at) = rest.find('{') {
                out.push_str(&rest[..at]);
                rest = &rest[at..];
                let token = [("{name}", name), ("{addr}", &addr), ("{rank}", &rank)]
                    .into_iter()
                    .find(|(token, _)| rest.starts_with(token));
                match token {
                    Some((token, value)) => {
                        out.push_str(value);
                        rest = &rest[token.len()..];
                    }
                    None => {
                        out.push('{');
                        rest = &rest[1..];
                    }
                }
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// One slave's job, as `run_on_slave` runs it.
struct Job<'a> {
    master: &'a Master,
    node: NodeId,
    name: &'a str,
    timeout: Option<Duration>,
    mode: OutputMode,
    slave_logs: bool,
    /// Where `--gather` collects each slave's result.
    gathered: &'a std::sync::Mutex<Vec<Gathered>>,
    /// `--output-dir`.
    output_dir: Option<&'a std::path::Path>,
    /// Its stdin, if it gets one.
    stdin: Option<JobStdin>,
    /// Becomes true when the job is to be killed (a second Ctrl-C).
    kill: tokio::sync::watch::Receiver<bool>,
}

/// How `localnet master` shows a job's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutputMode {
    /// Every line as `name: line` (stderr lines on stderr).
    Prefixed,
    /// The job's bytes, exactly (one slave).
    Raw,
    /// One JSON object per slave at the end.
    Json,
    /// Every distinct output once, under its node set, at the end.
    Gather,
    /// Every slave's whole output, in name order, at the end.
    ByNode,
}

/// Runs the command on one slave, writing its output as it comes (or, in JSON mode, one
/// object at the end). Output is written by the stdio threads: a slow reader of our
/// stdout slows the job down (backpressure) but never stops the connection's keepalives.
async fn run_on_slave(job: Job<'_>, argv: Vec<String>, stdio: &Stdio) -> Result<JobExit> {
    let Job {
        master,
        node,
        name,
        timeout,
        mode,
        slave_logs,
        gathered,
        output_dir,
        stdin,
        mut kill,
    } = job;
    if slave_logs {
        master.redirect_logs_here(&[node]).await?;
    }
    // --output-dir: NAME.out and NAME.err, written as the output comes.
    let mut files = match output_dir {
        None => None,
        Some(dir) => {
            let open = |ext: &str| {
                let path = dir.join(format!("{}.{ext}", file_name(name)));
                async move {
                    tokio::fs::File::create(&path)
                        .await
                        .map(|f| (path.clone(), f))
                        .with_context(|| format!("cannot write {}", path.display()))
                }
            };
            Some([open("out").await?, open("err").await?])
        }
    };
    let (mut job, mut feeding) = match stdin {
        None => (master.exec(node, argv, timeout).await?, None),
        Some(stdin) => match master.exec_with_input(node, argv.clone(), timeout).await {
            Ok((job, input)) => (job, Some(AbortOnDrop(tokio::spawn(feed(input, stdin))))),
            Err(MasterError::Unsupported { .. }) => {
                stdio.err.log_line(&format!(
                    "localnet: {name} runs an older localnet that takes no stdin: its job reads /dev/null"
                ));
                (master.exec(node, argv, timeout).await?, None)
            }
            Err(e) => return Err(e.into()),
        },
    };
    let target = |stream| match stream {
        Stream::Stdout => &stdio.out,
        Stream::Stderr => &stdio.err,
    };
    let index = |stream| match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    };
    let prefix = format!("{name}: ").into_bytes();
    let prefixed = |line: Vec<u8>| {
        let mut text = Vec::with_capacity(prefix.len() + line.len() + 1);
        text.extend_from_slice(&prefix);
        text.extend_from_slice(&line);
        text.push(b'\n');
        text
    };
    let mut captured = match mode {
        OutputMode::Gather | OutputMode::ByNode => {
            [GATHER_CAP, GATHER_CAP].map(CappedOutput::with_cap)
        }
        _ => [CappedOutput::default(), CappedOutput::default()],
    };
    let mut splitters = [LineSplitter::default(), LineSplitter::default()];
    let mut killing = false;
    let exit = loop {
        let event = tokio::select! {
            event = job.next() => event,
            () = killed(&mut kill), if !killing => {
                killing = true;
                job.kill().await;
                continue;
            }
        };
        match event {
            Some(ExecEvent::Output(stream, data)) => {
                if let Some(files) = &mut files {
                    let (path, file) = &mut files[index(stream)];
                    file.write_all(&data)
                        .await
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                match mode {
                    OutputMode::Json | OutputMode::Gather | OutputMode::ByNode => {
                        captured[index(stream)].push(&data)
                    }
                    OutputMode::Raw => {
                        target(stream).write(data).await.context("writing output")?
                    }
                    OutputMode::Prefixed => {
                        let mut text = Vec::with_capacity(data.len() + data.len() / 8);
                        splitters[index(stream)].push_prefixed(&data, &prefix, &mut text);
                        target(stream).write(text).await.context("writing output")?;
                    }
                }
                // Timers and keepalives first (see localnet::protocol::write_frames).
                tokio::task::yield_now().await;
            }
            Some(ExecEvent::Exit(exit)) => {
                drop(feeding.take()); // the job takes no more input
                for (path, file) in files.iter_mut().flatten() {
                    file.flush()
                        .await
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                break exit;
            }
            None => return Err(MasterError::Lost(node).into()),
        }
    };
    match mode {
        OutputMode::Prefixed => {
            // A last line without a newline gets one: the prefix format needs it.
            for stream in [Stream::Stdout, Stream::Stderr] {
                if let Some(last) = splitters[index(stream)].finish() {
                    target(stream)
                        .write(prefixed(last))
                        .await
                        .context("writing output")?;
                }
            }
        }
        OutputMode::Json => {
            let (object, notes) = job_result(name, node, &exit, &captured);
            let mut line = serde_json::to_vec(&object)?;
            line.push(b'\n');
            stdio.out.write(line).await.context("writing output")?;
            if !notes.is_empty() {
                stdio
                    .err
                    .write(notes.into_bytes())
                    .await
                    .context("writing output")?;
            }
        }
        OutputMode::Gather | OutputMode::ByNode => {
            let truncated = captured.iter().any(CappedOutput::truncated);
            let [stdout, stderr] = captured.map(CappedOutput::into_kept);
            let result = Gathered {
                name: name.to_string(),
                stdout,
                stderr,
                ending: (!exit.success()).then(|| exit.describe()),
                truncated,
            };
            gathered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(result);
        }
        OutputMode::Raw => {}
    }
    Ok(exit)
}
