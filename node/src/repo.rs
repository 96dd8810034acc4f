//! The image repository on disk, as iCBD lays it out: `<repo>/<image>/<version>/<files>`, with
//! each version's manifest beside its directory as `<repo>/<image>/<version>.manifest`.
//!
//! This module owns walking a version directory, hashing it in place into a manifest (no copy
//! of the image) and checking a directory against a manifest. It must not decide what a valid
//! manifest is (that is `imiswarm_protocol::manifest`) and never follows symlinks: a version is
//! regular files and directories only.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::manifest::{BuildError, Manifest, ManifestBuilder, ReadAt, hash_pieces_at};
use imiswarm_protocol::path::{check_image_name, check_relative_path};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("{path} is a {kind}: a version holds only regular files and directories")]
    NotRegular { path: String, kind: &'static str },
    #[error("{0} changed size while it was being hashed")]
    Changed(String),
    #[error("{0}: file name is not UTF-8")]
    NotUtf8(String),
    #[error(transparent)]
    Path(#[from] imiswarm_protocol::path::PathError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Decode(#[from] imiswarm_protocol::DecodeError),
    #[error(transparent)]
    Encode(#[from] imiswarm_protocol::EncodeError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |error| RepoError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// `<repo>/<image>/<version>/`
pub fn version_dir(repo: &Path, image: &str, version: u64) -> PathBuf {
    repo.join(image).join(version.to_string())
}

/// `<repo>/<image>/<version>.manifest`
pub fn manifest_path(repo: &Path, image: &str, version: u64) -> PathBuf {
    repo.join(image).join(format!("{version}.manifest"))
}

/// One regular file found in a version directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    /// Relative, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

/// Lists every regular file below `dir`, sorted by path. Symlinks, devices, sockets and FIFOs
/// are errors, not silently skipped: an image that needs them cannot be served faithfully.
pub fn scan(dir: &Path) -> Result<Vec<FoundFile>, RepoError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(RepoError::NotADirectory(dir.display().to_string()));
    }
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&abs).map_err(io_err(&abs))? {
            let entry = entry.map_err(io_err(&abs))?;
            let name = entry.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| RepoError::NotUtf8(entry.path().display().to_string()))?;
            let child_rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            check_relative_path(&child_rel)?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push((path, child_rel));
            } else if kind.is_file() {
                found.push(FoundFile {
                    path: child_rel,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o777,
                });
            } else {
                let kind = if kind.is_symlink() {
                    "symlink"
                } else {
                    "special file"
                };
                return Err(RepoError::NotRegular {
                    path: path.display().to_string(),
                    kind,
                });
            }
        }
    }
    found.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(found)
}

/// A file read with `pread`, so every hashing thread reads its own pieces.
#[derive(Debug)]
pub struct PositionedFile(pub File);

impl ReadAt for PositionedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
}

/// What to build a manifest of.
#[derive(Debug, Clone)]
pub struct BuildRequest<'a> {
    pub repo: &'a Path,
    pub image: &'a str,
    pub version: u64,
    pub piece_size: u32,
    pub parent: Option<u64>,
    pub boot_profile: Vec<u32>,
}

/// Hashes `<repo>/<image>/<version>/` in place. `on_start` learns the total byte count before
/// hashing begins; `progress` is fed bytes as they are hashed.
pub fn build_manifest(
    req: &BuildRequest<'_>,
    on_start: &mut dyn FnMut(u64),
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, RepoError> {
    check_image_name(req.image)?;
    let dir = version_dir(req.repo, req.image, req.version);
    let files = scan(&dir)?;
    on_start(files.iter().map(|f| f.size).sum());
    let mut builder = ManifestBuilder::new(req.image, req.version, req.piece_size)
        .map_err(BuildError::from)?
        .parent(req.parent)
        .boot_profile(req.boot_profile.clone());
    for f in &files {
        let abs = dir.join(&f.path);
        let file = PositionedFile(File::open(&abs).map_err(io_err(&abs))?);
        builder.add_file_at(&f.path, f.mode, f.size, &file, progress)?;
        // Hashing reads at offsets, so a file that grew or shrank meanwhile shows in its size.
        let now = file.0.metadata().map_err(io_err(&abs))?.len();
        if now != f.size {
            return Err(RepoError::Changed(abs.display().to_string()));
        }
    }
    Ok(builder.finish()?)
}

/// Writes the manifest beside its version directory, atomically (temp file, fsync, rename), and
/// returns its id.
pub fn write_manifest(
    repo: &Path,
    manifest: &Manifest,
) -> Result<imiswarm_protocol::Hash, RepoError> {
    let (bytes, id) = manifest.encode_with_id()?;
    let path = manifest_path(repo, &manifest.image, manifest.version);
    write_atomic(&path, &bytes)?;
    Ok(id)
}

/// Reads and validates a manifest file.
pub fn read_manifest(path: &Path) -> Result<(Manifest, imiswarm_protocol::Hash), RepoError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let manifest = Manifest::decode(&bytes)?;
    Ok((manifest, imiswarm_protocol::Hash::of(&bytes)))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    use std::io::Write;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    // Sync the directory so the rename itself survives a crash ("" is the current directory).
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

/// Removes a version from the repository, unless `in_use` says a local user took it meanwhile
/// (then it is put back and `Ok(false)` returned).
///
/// The directory first moves aside in one rename, then `in_use` is asked again: a user takes its
/// lease before it looks for the directory, so either the user's lease is seen here, or the user
/// finds the directory gone; never both missed. A crash part-way leaves a manifest without a
/// directory, which the next start skips, and a tree under `.trash`, never a half-deleted tree
/// under the version's name.
pub fn remove_version(
    repo: &Path,
    image: &str,
    version: u64,
    in_use: impl Fn() -> bool,
) -> Result<bool, RepoError> {
    let dir = version_dir(repo, image, version);
    let trash_root = repo.join(".trash");
    let trash = trash_root.join(format!("{image}@{version}.{}", std::process::id()));
    let moved = dir.exists();
    if moved {
        std::fs::create_dir_all(&trash_root).map_err(io_err(&trash_root))?;
        std::fs::rename(&dir, &trash).map_err(io_err(&dir))?;
        if in_use() {
            std::fs::rename(&trash, &dir).map_err(io_err(&dir))?;
            return Ok(false);
        }
    }
    remove_if_present(&manifest_path(repo, image, version))?;
    remove_if_present(&repo.join(image).join(format!("{version}.announcement")))?;
    if moved {
        std::fs::remove_dir_all(&trash).map_err(io_err(&trash))?;
    }
    Ok(true)
}

fn remove_if_present(path: &Path) -> Result<(), RepoError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// A difference between a directory and its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Missing {
        path: String,
    },
    Size {
        path: String,
        expected: u64,
        got: u64,
    },
    Pieces {
        path: String,
        bad: Vec<u32>,
    },
    Extra {
        path: String,
    },
}

/// Checks every file of `dir` against `manifest`, piece by piece. Empty result: identical.
pub fn verify_dir(
    dir: &Path,
    manifest: &Manifest,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<Mismatch>, RepoError> {
    let found = scan(dir)?;
    let mut mismatches = Vec::new();
    for f in &found {
        if !manifest.files.iter().any(|m| m.path == f.path) {
            mismatches.push(Mismatch::Extra {
                path: f.path.clone(),
            });
        }
    }
    for entry in &manifest.files {
        let Some(on_disk) = found.iter().find(|f| f.path == entry.path) else {
            mismatches.push(Mismatch::Missing {
                path: entry.path.clone(),
            });
            continue;
        };
        if on_disk.size != entry.size {
            mismatches.push(Mismatch::Size {
                path: entry.path.clone(),
                expected: entry.size,
                got: on_disk.size,
            });
            continue;
        }
        let abs = dir.join(&entry.path);
        let file = PositionedFile(File::open(&abs).map_err(io_err(&abs))?);
        let hashes = hash_pieces_at(
            &file,
            &entry.path,
            entry.size,
            manifest.piece_size,
            progress,
        )?;
        let bad: Vec<u32> = hashes
            .iter()
            .zip(&entry.pieces)
            .enumerate()
            .filter(|(_, (got, want))| got != want)
            .map(|(i, _)| i as u32)
            .collect();
        if !bad.is_empty() {
            mismatches.push(Mismatch::Pieces {
                path: entry.path.clone(),
                bad,
            });
        }
    }
    Ok(mismatches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imiswarm_protocol::limits::DEFAULT_PIECE_SIZE;

    fn make_version(repo: &Path) {
        let dir = version_dir(repo, "lab", 1);
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        std::fs::write(dir.join("boot/kernel"), vec![3u8; 70_000]).unwrap();
        std::fs::write(dir.join("disk.img"), vec![0u8; 200_000]).unwrap();
        std::fs::write(dir.join("site.conf"), b"site=A\n").unwrap();
    }

    fn request(repo: &Path) -> BuildRequest<'_> {
        BuildRequest {
            repo,
            image: "lab",
            version: 1,
            piece_size: DEFAULT_PIECE_SIZE,
            parent: None,
            boot_profile: vec![],
        }
    }

    #[test]
    fn build_write_read_verify() {
        let tmp = tempfile::tempdir().unwrap();
        make_version(tmp.path());
        let mut total = 0;
        let mut hashed = 0;
        let m = build_manifest(&request(tmp.path()), &mut |t| total = t, &mut |n| {
            hashed += n
        })
        .unwrap();
        assert_eq!((total, hashed), (270_007, 270_007));
        assert_eq!(m.files.len(), 3);
        assert!(m.files[1].pieces.iter().all(|p| p.is_zero()));
        let id = write_manifest(tmp.path(), &m).unwrap();
        let (back, back_id) = read_manifest(&manifest_path(tmp.path(), "lab", 1)).unwrap();
        assert_eq!((back, back_id), (m.clone(), id));

        let dir = version_dir(tmp.path(), "lab", 1);
        assert!(verify_dir(&dir, &m, &mut |_| {}).unwrap().is_empty());
        let mut kernel = std::fs::read(dir.join("boot/kernel")).unwrap();
        kernel[69_999] ^= 0xff;
        std::fs::write(dir.join("boot/kernel"), kernel).unwrap();
        std::fs::remove_file(dir.join("site.conf")).unwrap();
        let found = verify_dir(&dir, &m, &mut |_| {}).unwrap();
        assert_eq!(
            found,
            vec![
                Mismatch::Pieces {
                    path: "boot/kernel".into(),
                    bad: vec![1]
                },
                Mismatch::Missing {
                    path: "site.conf".into()
                }
            ]
        );
    }

    #[test]
    fn symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        make_version(tmp.path());
        let dir = version_dir(tmp.path(), "lab", 1);
        std::os::unix::fs::symlink("/etc/passwd", dir.join("escape")).unwrap();
        let err = build_manifest(&request(tmp.path()), &mut |_| {}, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                RepoError::NotRegular {
                    kind: "symlink",
                    ..
                }
            ),
            "{err}"
        );
    }
}
