//! The optional cluster key: a 256-bit secret shared by the nodes of one cluster.
//!
//! This module owns loading, generating and writing key files, and the HMAC-SHA256
//! authentication of discovery datagrams made with the key. A key file holds the key
//! as 64 hexadecimal characters (whitespace around it is ignored).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Length of a cluster key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag in bytes.
pub const TAG_LEN: usize = 32;

/// A 256-bit cluster key.
///
/// ```
/// let key = localnet::ClusterKey::generate().unwrap();
/// let again = localnet::ClusterKey::from_hex(&key.to_hex()).unwrap();
/// assert_eq!(key, again);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    /// The key file could not be read.
    Read {
        /// The key file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    /// The key file could not be written.
    Write {
        /// The key file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("key file {path} exists already; remove it first or choose another path")]
    /// A new key file would overwrite an existing file.
    Exists {
        /// The existing file's path.
        path: String,
    },
    #[error(
        "invalid key{where_}: expected 64 hexadecimal characters (a 256-bit key, as written by `localnet key generate`)"
    )]
    /// The key text is not 64 hexadecimal digits.
    Invalid {
        /// Where the key came from (` in <path>` for a key file), or empty.
        where_: String,
    },
    #[error("the system random number generator failed: {0}")]
    /// The system random number generator failed while generating a key; holds its error.
    Random(String),
}

/// A warning when the key file at `path` is readable or writable by group or others.
pub fn permissions_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} has mode {mode:04o}: group or others can read it, and whoever reads \
             it can join the cluster; run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

impl ClusterKey {
    /// Makes a new random key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// Builds a key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hexadecimal characters (surrounding whitespace is ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let invalid = || KeyError::Invalid {
            where_: String::new(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| invalid())?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| invalid())?;
        Ok(Self(bytes))
    }

    /// The key as 64 lowercase hexadecimal characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a key file. A file that group or others may read is used, with a warning
    /// (as ssh warns about private keys): whoever reads it can join the cluster.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if let Some(warning) = permissions_warning(path) {
            tracing::warn!("{warning}");
        }
        Self::from_hex(&text).map_err(|_| KeyError::Invalid {
            where_: format!(" in {}", path.display()),
        })
    }

    /// Writes the key to a new file with mode 0600. Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.display().to_string(),
                    }
                } else {
                    KeyError::Write {
                        path: path.display().to_string(),
                        source,
                    }
                }
            })?;
        writeln!(file, "{}", self.to_hex()).map_err(|source| KeyError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; a 32-byte key cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    pub fn sign(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = self.mac();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// A public tag naming the cluster (16 hex digits): the same for every holder of
    /// the key, and telling nothing about the key itself. Published in mDNS TXT records
    /// so that nodes of other clusters can be told apart before anything is verified.
    pub fn cluster_tag(&self) -> String {
        hex::encode(&self.sign(&[b"localnet/1 cluster tag"])[..8])
    }

    /// Checks an HMAC-SHA256 tag over `parts` in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        for part in parts {
            mac.update(part);
        }
        mac.verify_slice(tag).is_ok()
    }

    /// Checks a tag truncated to its leftmost bytes (at least 16), in constant time.
    pub fn verify_truncated(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        if tag.len() < 16 || tag.len() > TAG_LEN {
            return false;
        }
        let mut mac = self.mac();
        for part in parts {
            mac.update(part);
        }
        mac.verify_truncated_left(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_bad_keys() {
        let key = ClusterKey::generate().unwrap();
        assert_eq!(
            ClusterKey::from_hex(&format!("  {}\n", key.to_hex())).unwrap(),
            key
        );
        assert!(ClusterKey::from_hex("abcd").is_err());
        assert!(ClusterKey::from_hex(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn sign_and_verify() {
        let key = ClusterKey::from_bytes([7; 32]);
        let other = ClusterKey::from_bytes([8; 32]);
        let tag = key.sign(&[b"hello", b"world"]);
        assert!(key.verify(&[b"hello", b"world"], &tag));
        assert!(key.verify(&[b"helloworld"], &tag));
        assert!(!key.verify(&[b"hello", b"World"], &tag));
        assert!(!other.verify(&[b"hello", b"world"], &tag));
    }

    #[test]
    fn write_new_is_private_and_refuses_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("localnet-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let _ = std::fs::remove_file(&path);
        let key = ClusterKey::generate().unwrap();
        key.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        assert!(matches!(key.write_new(&path), Err(KeyError::Exists { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
