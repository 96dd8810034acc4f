//! Leases: how a local user of a version keeps retention from removing it.
//!
//! A lease is a file `<repo>/.leases/<image>@<version>/<pid>` that a process holds while it uses
//! the version (`imiswarm export`, a lingering `fetch --repo`). A daemon checks for live leases
//! before it removes a version; a lease whose process is gone (killed, crashed) is stale and is
//! swept, so a kill -9 never pins a version forever. This module owns those files only; it does
//! not remove versions.

use std::path::{Path, PathBuf};

/// A held lease; dropping it releases the version.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

fn lease_dir(repo: &Path, image: &str, version: u64) -> PathBuf {
    repo.join(".leases").join(format!("{image}@{version}"))
}

impl Lease {
    /// Takes a lease on `image@version` in `repo` for this process.
    pub fn take(repo: &Path, image: &str, version: u64) -> std::io::Result<Self> {
        let dir = lease_dir(repo, image, version);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(std::process::id().to_string());
        std::fs::write(&path, b"")?;
        Ok(Self { path })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a live process holds a lease on `image@version`. Stale leases are removed.
pub fn in_use(repo: &Path, image: &str, version: u64) -> bool {
    let Ok(entries) = std::fs::read_dir(lease_dir(repo, image, version)) else {
        return false;
    };
    let mut used = false;
    for entry in entries.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .is_some_and(process_alive);
        if alive {
            used = true;
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    used
}

/// Whether process `pid` exists. Where there is no /proc to ask, every process counts as alive:
/// keeping a version too long is better than removing one in use.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_dropped_and_stale_ones_are_swept() {
        let repo = tempfile::tempdir().unwrap();
        assert!(!in_use(repo.path(), "lab", 3));
        let lease = Lease::take(repo.path(), "lab", 3).unwrap();
        assert!(in_use(repo.path(), "lab", 3));
        assert!(!in_use(repo.path(), "lab", 4));
        drop(lease);
        assert!(!in_use(repo.path(), "lab", 3));

        // A process that no longer exists (pid beyond the kernel's maximum).
        let dir = lease_dir(repo.path(), "lab", 3);
        std::fs::write(dir.join("4194305"), b"").unwrap();
        if Path::new("/proc").is_dir() {
            assert!(!in_use(repo.path(), "lab", 3));
            assert!(!dir.join("4194305").exists(), "stale lease swept");
        }
    }
}
