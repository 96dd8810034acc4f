//! Key files: a 32-byte ed25519 secret seed stored as one line of hex, readable by its owner only.
//!
//! The same format serves publisher keys (which sign announcements) and, later, node identities.
//! This module owns reading and writing those files; what a key is trusted for is configuration.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use imiswarm_protocol::PublisherKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("key file {path} is not 64 hex characters (one ed25519 seed)")]
    Format { path: String },
    #[error("writing key file {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("gathering randomness: {0}")]
    Random(String),
}

/// A fresh key from the operating system's randomness.
pub fn generate() -> Result<PublisherKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(PublisherKey::from_seed(seed))
}

pub fn read(path: &Path) -> Result<PublisherKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|error| KeyError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| KeyError::Format {
        path: path.display().to_string(),
    })?;
    Ok(PublisherKey::from_seed(seed))
}

/// Writes a new key file with mode 0600; refuses to replace an existing file unless `force`
/// (losing a publisher key means re-keying every node).
pub fn write(path: &Path, key: &PublisherKey, force: bool) -> Result<(), KeyError> {
    let err = |error| KeyError::Write {
        path: path.display().to_string(),
        error,
    };
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(err)?;
    writeln!(file, "{}", hex::encode(key.seed())).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_round_trip_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        let key = generate().unwrap();
        write(&path, &key, false).unwrap();
        assert_eq!(read(&path).unwrap().public(), key.public());
        assert!(write(&path, &key, false).is_err(), "must not overwrite");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "not hex").unwrap();
        assert!(matches!(read(&path), Err(KeyError::Format { .. })));
    }
}
