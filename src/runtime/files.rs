//! Files a master puts on a slave or gets from it (`localnet copy`), on the slave's side.
//!
//! This module owns writing a file that arrives in `Input` frames (into a temporary
//! file beside the target, renamed over it only once its size and SHA-256 match, so a
//! failed or cut-off copy leaves the old file, or none, and no temporary file) and
//! sending a file as `Output` frames with its mode and digest. Both answer with the
//! JSON value of a `Result` frame, or an error text that says what to do.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::runtime::jobs::{InputItem, InputReceiver};
use crate::runtime::protocol::{Frame, OUTPUT_HEADER, Stream};
use crate::runtime::transport::MAX_PAYLOAD;

/// A file a master wants written, as its `PutFile` frame says.
pub(crate) struct PutRequest {
    pub id: u64,
    pub path: String,
    pub name: String,
    pub mode: u32,
    pub size: u64,
    pub into_dir: bool,
}

/// A temporary file, removed when dropped unless it was renamed into place ([`keep`]:
/// a task aborted half-way removes it too). Both ends of a copy write through one.
///
/// [`keep`]: TempFile::keep
pub(crate) struct TempFile(Option<PathBuf>);

impl TempFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self(Some(path))
    }

    /// It was renamed into place: nothing to remove.
    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

/// The name of a temporary file beside `name` (so a leftover one says whose it was),
/// short enough for any file name: the name's part is cut to 64 bytes.
pub(crate) fn temp_name(name: &str) -> String {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.localnet-{:016x}", &name[..end], fastrand::u64(..))
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `path` as an absolute path on this slave, or why it is not one.
fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "{path:?} is not an absolute path: name files on slaves from the root (/tmp/x, not x)"
        ));
    }
    Ok(p)
}

/// Hex of a SHA-256 digest.
pub(crate) fn hex_digest(hasher: Sha256) -> String {
    hex::encode(hasher.finalize())
}

/// Writes the file of `request` from `input`, telling the master (`InputTaken`) as each
/// chunk is written; the value says where it went, how many bytes and their SHA-256.
pub(crate) async fn put(
    request: PutRequest,
    mut input: InputReceiver,
    out: mpsc::Sender<Frame>,
) -> Result<Value, String> {
    let PutRequest {
        id,
        path,
        name,
        mode,
        size,
        into_dir,
    } = request;
    let dest = absolute(&path)?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(format!("{name:?} is not a file name"));
    }
    let target = match tokio::fs::metadata(dest).await {
        Ok(meta) if meta.is_dir() => dest.join(&name),
        Ok(_) if into_dir => return Err(format!("{path} is not a directory on this slave")),
        Err(e) if into_dir => {
            return Err(format!(
                "no directory {path} on this slave ({e}); make it first"
            ));
        }
        _ => dest.to_path_buf(),
    };
    let dir = target.parent().unwrap_or(Path::new("/"));
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.clone());
    let temp_path = dir.join(temp_name(&file_name));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .await
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
    let temp = TempFile::new(temp_path.clone());
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let expected = loop {
        match input.recv().await {
            Some(InputItem::Data(data)) => {
                written += data.len() as u64;
                if written > size {
                    return Err(format!(
                        "more than the {size} bytes announced came for {}",
                        target.display()
                    ));
                }
                hasher.update(&data);
                file.write_all(&data)
                    .await
                    .map_err(|e| format!("writing {}: {e}", target.display()))?;
                if out.send(Frame::InputTaken { id }).await.is_err() {
                    return Err("the master went away".into());
                }
            }
            Some(InputItem::End { sha256 }) => break sha256,
            None => return Err("the copy was cut off before its end".into()),
        }
    };
    file.flush()
        .await
        .map_err(|e| format!("writing {}: {e}", target.display()))?;
    drop(file);
    let digest = hex_digest(hasher);
    if written != size {
        return Err(format!(
            "{} bytes came for {} where {size} were announced (the file changed while it was sent?)",
            written,
            target.display()
        ));
    }
    let Some(expected) = expected else {
        return Err("the copy ended without its SHA-256: nothing was put in place".into());
    };
    if !expected.eq_ignore_ascii_case(&digest) {
        return Err(format!(
            "{} arrived damaged or changed while it was sent: sha256 {digest}, expected {expected}",
            target.display()
        ));
    }
    let permissions = std::fs::Permissions::from_mode(mode & 0o7777);
    tokio::fs::set_permissions(&temp_path, permissions)
        .await
        .map_err(|e| format!("setting the mode of {}: {e}", target.display()))?;
    tokio::fs::rename(&temp_path, &target)
        .await
        .map_err(|e| format!("cannot put {} in place: {e}", target.display()))?;
    temp.keep();
    Ok(json!({
        "path": target.to_string_lossy(),
        "bytes": written,
        "sha256": digest,
    }))
}

/// Sends the file at `path` as `Output` frames of request `id`; the value gives its
/// mode, size and SHA-256.
pub(crate) async fn get(id: u64, path: String, out: mpsc::Sender<Frame>) -> Result<Value, String> {
    let source = absolute(&path)?;
    // Without blocking: opening a FIFO would wait for a writer, for ever.
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(source)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{path} is not a regular file (copy sends files; for a directory, use tar through `localnet master`)"
        ));
    }
    let mut hasher = Sha256::new();
    let mut sent: u64 = 0;
    loop {
        let mut data = Vec::with_capacity(MAX_PAYLOAD - OUTPUT_HEADER);
        let n = (&mut file)
            .take((MAX_PAYLOAD - OUTPUT_HEADER) as u64)
            .read_to_end(&mut data)
            .await
            .map_err(|e| format!("reading {path}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&data);
        sent += n as u64;
        let frame = Frame::Output {
            id,
            stream: Stream::Stdout,
            data,
        };
        if out.send(frame).await.is_err() {
            return Err("the master went away".into());
        }
        tokio::task::yield_now().await; // timers and keepalives first
    }
    Ok(json!({
        "mode": meta.permissions().mode() & 0o7777,
        "bytes": sent,
        "sha256": hex_digest(hasher),
    }))
}
