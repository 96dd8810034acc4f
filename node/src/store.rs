//! The piece store: complete versions to serve, partial versions being downloaded.
//!
//! Owns the on-disk life of a version's bytes. A download writes into a partial directory,
//! sparse (all-zero pieces stay holes), and a version appears under its final name only by an
//! atomic rename once every piece is verified and synced. Which pieces are verified survives a
//! crash: [`PartialVersion::checkpoint`] syncs the data files first and only then replaces the
//! progress file, so after `kill -9` the progress file never claims a piece whose bytes were
//! not on disk, and a restart never fetches a verified piece twice.
//!
//! ```text
//!  <repo>/.partial/<image>/<version>/...       files being written (sparse)
//!  <repo>/.partial/<image>/<version>.manifest  the manifest they follow
//!  <repo>/.partial/<image>/<version>.progress  verified pieces, replaced atomically
//!          │ every piece verified + fsync
//!          ▼ rename
//!  <repo>/<image>/<version>/...  and  <repo>/<image>/<version>.manifest
//! ```
//!
//! Every piece is checked against the manifest here, at the only door into the store, so no
//! caller can store an unverified byte. Not here: which pieces to fetch (the scheduler) and the
//! network.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::manifest::{Layout, Manifest, PieceHash, PieceIndex};
use serde::{Deserialize, Serialize};

use crate::repo::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("disk full while writing {path}: the download stops; the partial version is kept")]
    DiskFull { path: String },
    #[error("piece {0} does not match its hash")]
    BadPiece(PieceIndex),
    #[error("piece {0} is not in this version")]
    NoSuchPiece(PieceIndex),
    #[error("piece {0} is not held yet")]
    NotHeld(PieceIndex),
    #[error("{0} already exists: refusing to replace a complete version")]
    AlreadyComplete(String),
    #[error("version is not complete: {0} pieces missing")]
    Incomplete(u32),
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| {
        if error.raw_os_error() == Some(28) {
            // ENOSPC
            StoreError::DiskFull {
                path: path.display().to_string(),
            }
        } else {
            StoreError::Io {
                path: path.display().to_string(),
                error,
            }
        }
    }
}

/// Where one version's files, manifest and progress live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPaths {
    pub final_dir: PathBuf,
    pub final_manifest: PathBuf,
    pub partial_dir: PathBuf,
    pub partial_manifest: PathBuf,
    pub progress: PathBuf,
}

impl VersionPaths {
    /// The repository layout of a daemon or seed.
    pub fn in_repo(repo: &Path, image: &str, version: u64) -> Self {
        let partial = repo.join(".partial").join(image);
        Self {
            final_dir: crate::repo::version_dir(repo, image, version),
            final_manifest: crate::repo::manifest_path(repo, image, version),
            partial_dir: partial.join(version.to_string()),
            partial_manifest: partial.join(format!("{version}.manifest")),
            progress: partial.join(format!("{version}.progress")),
        }
    }

    /// A `fetch --out DIR`: the files end up in `DIR`; the bookkeeping sits beside it.
    pub fn for_output(out: &Path) -> Self {
        let sibling = |suffix: &str| {
            let mut name = out.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            out.with_file_name(name)
        };
        Self {
            final_dir: out.to_path_buf(),
            final_manifest: sibling(".manifest"),
            partial_dir: sibling(".partial"),
            partial_manifest: sibling(".partial.manifest"),
            progress: sibling(".partial.progress"),
        }
    }
}

/// What the progress file holds: the verified pieces of one manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Progress {
    manifest_id: Hash,
    verified: Bitfield,
}

impl WireFormat for Progress {
    const KIND: &'static str = "progress file";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = 64 + imiswarm_protocol::limits::MAX_PIECES as usize / 8;
}

fn open_files(dir: &Path, manifest: &Manifest, write: bool) -> Result<Vec<File>, StoreError> {
    manifest
        .files
        .iter()
        .map(|f| {
            let path = dir.join(&f.path);
            if write {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io(&path))?;
                // Sparse: length without blocks; zero pieces stay holes.
                if file.metadata().map_err(io(&path))?.len() != f.size {
                    file.set_len(f.size).map_err(io(&path))?;
                }
                Ok(file)
            } else {
                File::open(&path).map_err(io(&path))
            }
        })
        .collect()
}

/// Reads piece `index` of `manifest` from `files` into `out[at..]`, and sizes `out` to end
/// with it; the bytes before `at` are kept. A piece is sent right after its frame header, so
/// the uploader reads it into the buffer behind the header: one write, no copy. Only bytes
/// beyond `out`'s old length are zeroed first, so a buffer reused for pieces of one size costs
/// no zeroing after its first piece.
fn read_into(
    files: &[File],
    manifest: &Manifest,
    layout: &Layout,
    index: PieceIndex,
    out: &mut Vec<u8>,
    at: usize,
) -> Result<(), StoreError> {
    let loc = layout.locate(index).ok_or(StoreError::NoSuchPiece(index))?;
    out.resize(at + loc.len as usize, 0);
    let read = files[loc.file].read_exact_at(&mut out[at..], loc.offset);
    if let Err(e) = read {
        out.truncate(at);
        return Err(io(Path::new(&manifest.files[loc.file].path))(e));
    }
    Ok(())
}

/// A version held whole, served read-only.
#[derive(Debug)]
pub struct CompleteVersion {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub id: Hash,
    layout: Layout,
    files: Vec<File>,
}

impl CompleteVersion {
    /// Opens `<dir>` as a complete version of `manifest` (the files are trusted: they were
    /// either verified on download or hashed by the seed).
    pub fn open(dir: &Path, manifest: Manifest) -> Result<Self, StoreError> {
        let (manifest_bytes, id) = manifest
            .encode_with_id()
            .map_err(crate::repo::RepoError::from)?;
        let files = open_files(dir, &manifest, false)?;
        Ok(Self {
            layout: manifest.layout(),
            manifest,
            manifest_bytes,
            id,
            files,
        })
    }

    pub fn read_piece(&self, index: PieceIndex) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.read_piece_at(index, &mut out, 0)?;
        Ok(out)
    }

    /// Reads piece `index` into `out[at..]` (see [`read_into`]).
    pub fn read_piece_at(
        &self,
        index: PieceIndex,
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), StoreError> {
        read_into(&self.files, &self.manifest, &self.layout, index, out, at)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// A version being downloaded. Shared between the download's tasks (`&self` everywhere).
#[derive(Debug)]
pub struct PartialVersion {
    pub paths: VersionPaths,
    pub manifest: Manifest,
    pub id: Hash,
    /// Canonical manifest bytes, kept to answer peers without re-encoding.
    manifest_bytes: Vec<u8>,
    layout: Layout,
    files: Vec<File>,
    state: Mutex<PartialState>,
    /// Held for a whole checkpoint: the download runs them in the background, and the node
    /// makes one more on shutdown; two at once would race on the progress file.
    checkpointing: Mutex<()>,
}

#[derive(Debug)]
struct PartialState {
    /// Verified in memory (written, maybe not yet synced).
    verified: Bitfield,
    /// Written since the last checkpoint.
    unsynced: u32,
}

impl PartialVersion {
    /// Opens the partial download of `manifest`, resuming from its progress file if that file
    /// belongs to the same manifest, or starts one. Refuses if the final directory exists.
    pub fn open(paths: VersionPaths, manifest: Manifest) -> Result<Self, StoreError> {
        if paths.final_dir.exists() {
            return Err(StoreError::AlreadyComplete(
                paths.final_dir.display().to_string(),
            ));
        }
        let (bytes, id) = manifest
            .encode_with_id()
            .map_err(crate::repo::RepoError::from)?;
        std::fs::create_dir_all(&paths.partial_dir).map_err(io(&paths.partial_dir))?;
        let same_manifest = std::fs::read(&paths.partial_manifest)
            .map(|old| Hash::of(&old) == id)
            .unwrap_or(false);
        if !same_manifest {
            // A different (or no) manifest: whatever progress exists is for other bytes.
            let _ = std::fs::remove_file(&paths.progress);
            write_atomic(&paths.partial_manifest, &bytes)?;
        }
        let files = open_files(&paths.partial_dir, &manifest, true)?;
        let layout = manifest.layout();
        let mut verified = std::fs::read(&paths.progress)
            .ok()
            .and_then(|b| Progress::decode(&b).ok())
            .filter(|p| p.manifest_id == id && p.verified.len() == layout.piece_count())
            .map(|p| p.verified)
            .unwrap_or_else(|| Bitfield::new(layout.piece_count()));
        // All-zero pieces are holes already: nothing to fetch.
        let mut index = 0;
        for f in &manifest.files {
            for p in &f.pieces {
                if p.is_zero() {
                    verified.set(index);
                }
                index += 1;
            }
        }
        Ok(Self {
            paths,
            manifest,
            id,
            manifest_bytes: bytes,
            layout,
            files,
            state: Mutex::new(PartialState {
                verified,
                unsynced: 0,
            }),
            checkpointing: Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PartialState> {
        // A panic while holding this lock cannot leave the bitfield half-updated (single
        // calls), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The canonical bytes of this version's manifest.
    pub fn manifest_bytes(&self) -> Vec<u8> {
        self.manifest_bytes.clone()
    }

    /// The pieces verified so far (including all-zero pieces).
    pub fn verified(&self) -> Bitfield {
        self.state().verified.clone()
    }

    pub fn is_verified(&self, index: PieceIndex) -> bool {
        self.state().verified.get(index)
    }

    pub fn missing(&self) -> u32 {
        let s = self.state();
        s.verified.len() - s.verified.count_ones()
    }

    fn expected(&self, index: PieceIndex) -> Result<PieceHash, StoreError> {
        self.manifest
            .piece_hash(&self.layout, index)
            .ok_or(StoreError::NoSuchPiece(index))
    }

    /// Verifies `bytes` against the manifest and writes them. Returns `Ok(false)` if the piece
    /// was already verified (nothing written).
    pub fn write_piece(&self, index: PieceIndex, bytes: &[u8]) -> Result<bool, StoreError> {
        let loc = self
            .layout
            .locate(index)
            .ok_or(StoreError::NoSuchPiece(index))?;
        if bytes.len() != loc.len as usize || !self.expected(index)?.matches(bytes) {
            return Err(StoreError::BadPiece(index));
        }
        if self.is_verified(index) {
            return Ok(false);
        }
        let path = self
            .paths
            .partial_dir
            .join(&self.manifest.files[loc.file].path);
        self.files[loc.file]
            .write_all_at(bytes, loc.offset)
            .map_err(io(&path))?;
        let mut s = self.state();
        let new = s.verified.set(index);
        if new {
            s.unsynced += 1;
        }
        Ok(new)
    }

    /// Reads verified piece `index` into `out[at..]` (for serving it to others while
    /// downloading; see [`read_into`]).
    pub fn read_piece_at(
        &self,
        index: PieceIndex,
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), StoreError> {
        if !self.is_verified(index) {
            return Err(StoreError::NotHeld(index));
        }
        read_into(&self.files, &self.manifest, &self.layout, index, out, at)
    }

    /// Makes the verified set durable: sync data, then atomically replace the progress file.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let verified = {
            let s = self.state();
            if s.unsynced == 0 && self.paths.progress.exists() {
                return Ok(());
            }
            s.verified.clone()
        };
        for (file, entry) in self.files.iter().zip(&self.manifest.files) {
            file.sync_data()
                .map_err(io(&self.paths.partial_dir.join(&entry.path)))?;
        }
        let bytes = Progress {
            manifest_id: self.id,
            verified: verified.clone(),
        }
        .encode()
        .map_err(crate::repo::RepoError::from)?;
        write_atomic(&self.paths.progress, &bytes)?;
        let mut s = self.state();
        // Pieces written while we synced stay counted for the next checkpoint.
        s.unsynced = s
            .verified
            .count_ones()
            .saturating_sub(verified.count_ones());
        Ok(())
    }

    /// Takes every piece this version shares with `older` from local disk. Returns how many
    /// bytes were reused. Each piece still passes the hash check in [`Self::write_piece`].
    pub fn reuse_from(&self, older: &CompleteVersion) -> Result<u64, StoreError> {
        let mut by_hash: HashMap<Hash, PieceIndex> = HashMap::new();
        let mut index = 0;
        for f in &older.manifest.files {
            for p in &f.pieces {
                if let PieceHash::Data(h) = p {
                    by_hash.entry(*h).or_insert(index);
                }
                index += 1;
            }
        }
        let mut reused = 0u64;
        let mut index = 0;
        for f in &self.manifest.files {
            for p in &f.pieces {
                if let PieceHash::Data(h) = p
                    && let Some(&old) = by_hash.get(h)
                    && !self.is_verified(index)
                {
                    let bytes = older.read_piece(old)?;
                    // A piece that changed on disk under the old version is simply fetched.
                    if let Ok(true) = self.write_piece(index, &bytes) {
                        reused += bytes.len() as u64;
                    }
                }
                index += 1;
            }
        }
        self.checkpoint()?;
        Ok(reused)
    }

    /// Syncs everything and renames the partial directory to its final name. Fails, leaving
    /// the partial version as it is, unless every piece is verified. Call once.
    pub fn finish(&self) -> Result<CompleteVersion, StoreError> {
        let missing = self.missing();
        if missing > 0 {
            return Err(StoreError::Incomplete(missing));
        }
        self.checkpoint()?;
        for (file, entry) in self.files.iter().zip(&self.manifest.files) {
            file.sync_all()
                .map_err(io(&self.paths.partial_dir.join(&entry.path)))?;
        }
        let p = &self.paths;
        if let Some(parent) = p.final_dir.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let bytes = std::fs::read(&p.partial_manifest).map_err(io(&p.partial_manifest))?;
        write_atomic(&p.final_manifest, &bytes)?;
        // rename(2) refuses to replace a non-empty directory, so a complete version that
        // appeared meanwhile is never overwritten.
        std::fs::rename(&p.partial_dir, &p.final_dir).map_err(io(&p.final_dir))?;
        if let Some(parent) = p.final_dir.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))?;
        }
        let _ = std::fs::remove_file(&p.progress);
        let _ = std::fs::remove_file(&p.partial_manifest);
        // Open file handles keep working across the rename, so uploads in progress finish.
        CompleteVersion::open(&p.final_dir, self.manifest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imiswarm_protocol::manifest::ManifestBuilder;

    const PS: u32 = 64 * 1024;

    fn image() -> (Vec<u8>, Vec<u8>, Manifest) {
        let mut disk = vec![0u8; PS as usize * 4 + 10];
        disk[..PS as usize].fill(1);
        disk[PS as usize * 3..].fill(2);
        let conf = b"site=a\n".to_vec();
        let mut b = ManifestBuilder::new("lab", 1, PS).unwrap();
        b.add_file("disk.img", 0o644, disk.len() as u64, &disk[..], &mut |_| {})
            .unwrap();
        b.add_file("etc/conf", 0o644, conf.len() as u64, &conf[..], &mut |_| {})
            .unwrap();
        (disk, conf, b.finish().unwrap())
    }

    fn piece(disk: &[u8], i: usize) -> &[u8] {
        &disk[i * PS as usize..((i + 1) * PS as usize).min(disk.len())]
    }

    #[test]
    fn download_resume_and_finish() {
        let tmp = tempfile::tempdir().unwrap();
        let (disk, conf, m) = image();
        let paths = VersionPaths::in_repo(tmp.path(), "lab", 1);
        // Pieces: 0 data, 1-2 zero, 3 data, 4 data (10 bytes), 5 conf.
        let partial = PartialVersion::open(paths.clone(), m.clone()).unwrap();
        assert_eq!(partial.missing(), 4, "zero pieces need nothing");
        assert!(matches!(
            partial.write_piece(0, &[9; 10]),
            Err(StoreError::BadPiece(0))
        ));
        assert!(partial.write_piece(0, piece(&disk, 0)).unwrap());
        assert!(
            !partial.write_piece(0, piece(&disk, 0)).unwrap(),
            "already held"
        );
        assert!(partial.write_piece(5, &conf).unwrap());
        partial.checkpoint().unwrap();
        assert!(partial.write_piece(3, piece(&disk, 3)).unwrap()); // not checkpointed
        drop(partial);

        // "Crash" and resume: the checkpointed pieces are kept.
        let partial = PartialVersion::open(paths.clone(), m.clone()).unwrap();
        assert!(partial.is_verified(0) && partial.is_verified(5));
        assert!(!partial.is_verified(3), "not checkpointed, so not trusted");
        assert!(matches!(
            PartialVersion::open(paths.clone(), m.clone())
                .unwrap()
                .finish(),
            Err(StoreError::Incomplete(2))
        ));
        partial.write_piece(3, piece(&disk, 3)).unwrap();
        partial.write_piece(4, piece(&disk, 4)).unwrap();
        let complete = partial.finish().unwrap();
        assert_eq!(
            std::fs::read(paths.final_dir.join("disk.img")).unwrap(),
            disk
        );
        assert_eq!(
            std::fs::read(paths.final_dir.join("etc/conf")).unwrap(),
            conf
        );
        assert!(!paths.partial_dir.exists() && !paths.progress.exists());
        assert_eq!(complete.read_piece(4).unwrap(), piece(&disk, 4));
        let (back, _) = crate::repo::read_manifest(&paths.final_manifest).unwrap();
        assert_eq!(back, m);
        assert!(matches!(
            PartialVersion::open(paths, m),
            Err(StoreError::AlreadyComplete(_))
        ));
    }

    #[test]
    fn progress_of_another_manifest_is_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let (disk, _, m) = image();
        let paths = VersionPaths::in_repo(tmp.path(), "lab", 1);
        let partial = PartialVersion::open(paths.clone(), m.clone()).unwrap();
        partial.write_piece(0, piece(&disk, 0)).unwrap();
        partial.checkpoint().unwrap();
        drop(partial);
        let mut other = m.clone();
        other.files[0].pieces[0] = PieceHash::Data(Hash::of(b"other"));
        let partial = PartialVersion::open(paths, other).unwrap();
        assert!(!partial.is_verified(0));
    }

    #[test]
    fn reuse_takes_unchanged_pieces_from_the_older_version() {
        let tmp = tempfile::tempdir().unwrap();
        let (disk, conf, m1) = image();
        let v1 = crate::repo::version_dir(tmp.path(), "lab", 1);
        std::fs::create_dir_all(v1.join("etc")).unwrap();
        std::fs::write(v1.join("disk.img"), &disk).unwrap();
        std::fs::write(v1.join("etc/conf"), &conf).unwrap();
        let old = CompleteVersion::open(&v1, m1).unwrap();

        let mut disk2 = disk.clone();
        disk2[PS as usize * 3] = 7; // piece 3 changes
        let mut b = ManifestBuilder::new("lab", 2, PS).unwrap().parent(Some(1));
        b.add_file(
            "disk.img",
            0o644,
            disk2.len() as u64,
            &disk2[..],
            &mut |_| {},
        )
        .unwrap();
        b.add_file("etc/conf", 0o644, conf.len() as u64, &conf[..], &mut |_| {})
            .unwrap();
        let m2 = b.finish().unwrap();
        let partial =
            PartialVersion::open(VersionPaths::in_repo(tmp.path(), "lab", 2), m2).unwrap();
        let reused = partial.reuse_from(&old).unwrap();
        assert_eq!(reused, u64::from(PS) + 10 + conf.len() as u64);
        assert_eq!(partial.missing(), 1);
        assert!(!partial.is_verified(3));
    }

    #[test]
    fn output_paths_sit_beside_the_directory() {
        let p = VersionPaths::for_output(Path::new("/tmp/x/img"));
        assert_eq!(p.final_dir, Path::new("/tmp/x/img"));
        assert_eq!(p.partial_dir, Path::new("/tmp/x/img.partial"));
        assert_eq!(p.progress, Path::new("/tmp/x/img.partial.progress"));
    }
}
