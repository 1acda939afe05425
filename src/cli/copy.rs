//! `localnet copy`: local files to every chosen slave, or (`--rcopy`) files of every
//! slave back here, over the session transport (encrypted with the cluster key),
//! verified by SHA-256 at the receiving end, mode kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use localnet::{INPUT_CHUNK, Master, NodeId};
use tokio::io::AsyncReadExt;

use super::Stdio;
use super::args::CopyArgs;
use super::master::{
    Chosen, Failure, choose, count_missing, new_master, substitute, to_usize, verdict,
};
use super::progress::{Interrupted, Progress};

/// A local file to send, as read before the copy.
struct Source {
    path: PathBuf,
    name: String,
    mode: u32,
    size: u64,
    sha256: String,
}

/// Copies the files to (or from) every slave chosen; any failure is an error.
pub async fn run(args: CopyArgs, stdio: &Stdio) -> Result<()> {
    let Some((dest, sources)) = args.paths.split_last() else {
        bail!("give the files to copy and where to: SRC... DEST");
    };
    let dest = dest.clone();
    let plan = match args.rcopy {
        false => Plan::Put(read_sources(sources, &dest).await?),
        true => Plan::Fetch(fetch_names(sources, &dest).await?),
    };
    let select = &args.select;
    let opts = super::backend_options(&select.net, select.control.clone())?;
    let master = new_master(&opts, select, stdio);
    let Chosen { slaves, missing } = choose(select, &opts, false, &master).await?;
    let progress = Progress::start(stdio, slaves.len(), true);
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    let window = Arc::new(tokio::sync::Semaphore::new(
        select.fanout.map_or(most, |n| to_usize(n).min(most)),
    ));
    let plan = Arc::new(plan);
    let into_dir = sources.len() > 1 || dest.ends_with('/');
    let mut tasks = Vec::new();
    for (rank, peer) in slaves.iter().enumerate() {
        // `{name}`, `{addr}` and `{rank}` in DEST (or, with --rcopy, in SRC) are the slave's.
        let words = |word: &str| substitute(&[word.to_string()], &peer.name, peer.addr.ip(), rank);
        let dest = words(&dest).concat();
        let plan = match &*plan {
            Plan::Put(_) => plan.clone(),
            Plan::Fetch(files) => Arc::new(Plan::Fetch(
                files
                    .iter()
                    .map(|(remote, local)| (words(remote).concat(), local.clone()))
                    .collect(),
            )),
        };
        let (master, plan, window, progress) = (
            master.clone(),
            plan.clone(),
            window.clone(),
            progress.clone(),
        );
        let (node, name) = (NodeId::new(peer.addr), peer.name.clone());
        // What fetched files get appended: the name, with the address when two
        // slaves share the name (one would overwrite the other's).
        let suffix = match slaves.iter().filter(|p| p.name == peer.name).count() {
            1 => super::master::file_name(&peer.name),
            _ => super::master::file_name(&format!("{}@{}", peer.name, peer.addr.ip())),
        };
        tasks.push(tokio::spawn(async move {
            let _permit = window.acquire().await.ok();
            if progress.killed() {
                return Err(Interrupted("not started").into());
            }
            progress.started(&name);
            let mut kill = progress.kill_signal();
            let work = async {
                match &*plan {
                    Plan::Put(sources) => put_all(&master, node, sources, &dest, into_dir).await,
                    Plan::Fetch(files) => fetch_all(&master, node, &suffix, files).await,
                }
            };
            let copied = tokio::select! {
                biased;
                // Stopped half-way: the slave removes what it got.
                () = super::progress::killed(&mut kill) => Err(Interrupted("stopped").into()),
                copied = work => copied,
            };
            progress.ended(&name, copied.is_ok());
            copied
        }));
    }
    let mut failures = Vec::new();
    let mut by_kind = std::collections::BTreeMap::<Failure, Vec<String>>::new();
    for (task, peer) in tasks.into_iter().zip(&slaves) {
        let outcome = task
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the copy's task failed: {e}")));
        if let Err(e) = outcome {
            failures.push(format!("{} ({}): {e:#}", peer.name, peer.addr));
            by_kind
                .entry(Failure::of_copy_error(&e))
                .or_default()
                .push(peer.name.clone());
        }
    }
    progress.finish();
    let failed = failures.len();
    count_missing(&missing, select.wait, &mut failures, &mut by_kind);
    stdio
        .err
        .write(verdict(&failures, &by_kind).into_bytes())
        .await?;
    stdio.err.flush().await;
    if progress.killed() {
        return Err(super::ExitStatus {
            code: 130,
            why: "interrupted: the copies still running were stopped".into(),
        }
        .into());
    }
    match (failed, missing.len()) {
        (0, 0) => Ok(()),
        (0, m) => bail!("{m} named slave(s) not found"),
        (f, _) => bail!("the copy failed on {f} of {} slaves", slaves.len()),
    }
}

/// What the copy does on each slave.
enum Plan {
    /// Send these local files.
    Put(Vec<Source>),
    /// Fetch these remote files, each to a local path with the slave's name appended.
    Fetch(Vec<(String, PathBuf)>),
}

/// The local files to send, each read once for its digest; DEST must be absolute.
async fn read_sources(sources: &[String], dest: &str) -> Result<Vec<Source>> {
    if !dest.starts_with('/') {
        bail!(
            "{dest:?} is not an absolute path: DEST is a path on the slaves, written from the root (e.g. /tmp/)"
        );
    }
    let mut read = Vec::new();
    for source in sources {
        let path = PathBuf::from(source);
        let meta = tokio::fs::metadata(&path)
            .await
            .with_context(|| format!("cannot read {source}"))?;
        if meta.is_dir() {
            bail!(
                "{source} is a directory; copy sends files. For a directory, send a tar through stdin: \
                 tar c {source} | localnet master -- tar x -C {dest}"
            );
        }
        if !meta.is_file() {
            bail!("{source} is not a regular file");
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{source} has no file name"))?;
        let digest_of = path.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_of(&digest_of))
            .await?
            .with_context(|| format!("cannot read {source}"))?;
        use std::os::unix::fs::PermissionsExt;
        read.push(Source {
            path,
            name,
            mode: meta.permissions().mode(),
            size: meta.len(),
            sha256,
        });
    }
    Ok(read)
}

/// The SHA-256 of a file, in hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The remote files to fetch (absolute paths) and the local directory for them, made
/// if needed; two sources with one file name would overwrite each other.
async fn fetch_names(sources: &[String], dest: &str) -> Result<Vec<(String, PathBuf)>> {
    let dir = PathBuf::from(dest);
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("cannot make the directory {dest}"))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for source in sources {
        if !source.starts_with('/') {
            bail!(
                "{source:?} is not an absolute path: with --rcopy, SRC is a path on the slaves, written from the root"
            );
        }
        let Some(name) = Path::new(source).file_name() else {
            bail!("{source} has no file name");
        };
        let local = dir.join(name);
        if files.iter().any(|(_, other)| *other == local) {
            bail!(
                "two files named {} would be fetched into {dest}; fetch them one at a time into different directories",
                name.to_string_lossy()
            );
        }
        files.push((source.clone(), local));
    }
    Ok(files)
}

/// Sends every source to `node`, one after the other, each read from the start.
async fn put_all(
    master: &Master,
    node: NodeId,
    sources: &[Source],
    dest: &str,
    into_dir: bool,
) -> Result<()> {
    for source in sources {
        let mut upload = master
            .put_file_from(node, dest, &source.name, source.mode, source.size, into_dir)
            .await?;
        let mut file = tokio::fs::File::open(&source.path)
            .await
            .with_context(|| format!("cannot read {}", source.path.display()))?;
        let mut chunk = vec![0; INPUT_CHUNK];
        loop {
            let n = file
                .read(&mut chunk)
                .await
                .with_context(|| format!("reading {}", source.path.display()))?;
            if n == 0 {
                break;
            }
            upload.write(&chunk[..n]).await?;
        }
        upload.finish(&source.sha256).await?;
    }
    Ok(())
}

/// Fetches every file from `node` to its local path with `.SUFFIX` appended.
async fn fetch_all(
    master: &Master,
    node: NodeId,
    suffix: &str,
    files: &[(String, PathBuf)],
) -> Result<()> {
    for (remote, local) in files {
        let mut local = local.clone().into_os_string();
        local.push(format!(".{suffix}"));
        master.fetch_file(node, remote, Path::new(&local)).await?;
    }
    Ok(())
}
