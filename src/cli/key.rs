//! `localnet key`: cluster key files.

use std::path::Path;

use anyhow::Result;
use localnet::ClusterKey;

/// Writes a new random key to `out`, which must not exist.
pub fn generate(out: &Path) -> Result<()> {
    let key = ClusterKey::generate()?;
    key.write_new(out)?;
    eprintln!("wrote a new cluster key to {}", out.display());
    Ok(())
}
