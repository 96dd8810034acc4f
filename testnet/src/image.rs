//! Sample images for scenarios: deterministic files with a set share of all-zero pieces, and
//! versions that change a set share of the previous version's pieces.
//!
//! Each 64 KiB piece's content is a function of (file, piece, the version it last changed in),
//! so any version can be written without the ones before it, and two versions differ in exactly
//! the pieces that changed between them. Zero pieces stay zero in every version (a VM disk's
//! unused blocks). This module writes files; it knows nothing of swarms.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::scenario::ImageSpec;

/// The piece size the generator reasons in (the swarm's default piece size).
pub const PIECE: u64 = 64 * 1024;

/// A sample image: its files and the shares that shape it.
#[derive(Debug, Clone)]
pub struct SampleImage {
    files: Vec<(String, u64)>,
    zero_share: f64,
    changed_share: f64,
}

fn unit(parts: &[u64]) -> f64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&p.to_le_bytes());
    }
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    (u64::from_le_bytes(x) >> 11) as f64 / (1u64 << 53) as f64
}

impl SampleImage {
    /// `total` bytes over `spec.files` files: a disk image with most of the bytes, then a boot
    /// file and configuration files.
    pub fn new(spec: &ImageSpec, total: u64) -> Self {
        let n = u64::from(spec.files.max(1));
        let rest = if n == 1 { 0 } else { total / 5 };
        let mut files = vec![("disk.img".to_owned(), total - rest)];
        for i in 1..n {
            let size = rest / (n - 1) + if i == n - 1 { rest % (n - 1) } else { 0 };
            let name = if i == 1 {
                "boot/initrd".to_owned()
            } else {
                format!("conf/part-{i}.cfg")
            };
            files.push((name, size));
        }
        Self {
            files,
            zero_share: spec.zero_share,
            changed_share: spec.changed_share,
        }
    }

    pub fn files(&self) -> &[(String, u64)] {
        &self.files
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }

    fn is_zero(&self, file: usize, piece: u64) -> bool {
        unit(&[1, file as u64, piece]) < self.zero_share
    }

    fn changed_in(&self, file: usize, piece: u64, version: u64) -> bool {
        version >= 2 && unit(&[2, file as u64, piece, version]) < self.changed_share
    }

    /// The version a piece's content dates from, as of `version`.
    fn generation(&self, file: usize, piece: u64, version: u64) -> u64 {
        (2..=version)
            .rev()
            .find(|&v| self.changed_in(file, piece, v))
            .unwrap_or(1)
    }

    fn pieces(&self, file: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        let size = self.files[file].1;
        (0..size.div_ceil(PIECE)).map(move |p| (p, PIECE.min(size - p * PIECE)))
    }

    /// Bytes of the pieces that are not all zero: what a swarm moves for a first version.
    pub fn travelling_bytes(&self) -> u64 {
        (0..self.files.len())
            .flat_map(|f| self.pieces(f).map(move |(p, len)| (f, p, len)))
            .filter(|&(f, p, _)| !self.is_zero(f, p))
            .map(|(_, _, len)| len)
            .sum()
    }

    /// Bytes of the non-zero pieces that differ between `version - 1` and `version`.
    pub fn changed_bytes(&self, version: u64) -> u64 {
        (0..self.files.len())
            .flat_map(|f| self.pieces(f).map(move |(p, len)| (f, p, len)))
            .filter(|&(f, p, _)| !self.is_zero(f, p) && self.changed_in(f, p, version))
            .map(|(_, _, len)| len)
            .sum()
    }

    /// Writes `version` into `dir` (created).
    pub fn write(&self, dir: &Path, version: u64) -> anyhow::Result<()> {
        let mut buf = vec![0u8; PIECE as usize];
        for (i, (name, _)) in self.files.iter().enumerate() {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            for (p, len) in self.pieces(i) {
                let piece = &mut buf[..len as usize];
                if self.is_zero(i, p) {
                    piece.fill(0);
                } else {
                    let generation = self.generation(i, p, version);
                    let mut h = blake3::Hasher::new();
                    h.update(b"imiswarm testnet image");
                    for x in [i as u64, p, generation] {
                        h.update(&x.to_le_bytes());
                    }
                    h.finalize_xof().fill(piece);
                }
                out.write_all(piece)?;
            }
            out.flush()?;
        }
        Ok(())
    }

    /// Whether `dir` holds exactly `version`'s files.
    pub fn check(&self, dir: &Path, version: u64) -> anyhow::Result<()> {
        let expected = tempfile::tempdir()?;
        self.write(expected.path(), version)?;
        for (name, _) in &self.files {
            let want = std::fs::read(expected.path().join(name))?;
            let got = std::fs::read(dir.join(name))
                .with_context(|| format!("{}: {name} missing", dir.display()))?;
            anyhow::ensure!(got == want, "{}: {name} differs", dir.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(zero: f64, changed: f64) -> ImageSpec {
        ImageSpec {
            size: "1MiB".into(),
            files: 3,
            zero_share: zero,
            changed_share: changed,
        }
    }

    #[test]
    fn versions_differ_in_the_changed_pieces_only() {
        let img = SampleImage::new(&spec(0.25, 0.1), 4 << 20);
        assert_eq!(img.total_bytes(), 4 << 20);
        let dir = tempfile::tempdir().unwrap();
        img.write(&dir.path().join("1"), 1).unwrap();
        img.write(&dir.path().join("2"), 2).unwrap();
        img.check(&dir.path().join("2"), 2).unwrap();
        assert!(img.check(&dir.path().join("2"), 1).is_err());
        let mut differing = 0u64;
        let mut zero = 0u64;
        for (name, _) in img.files() {
            let a = std::fs::read(dir.path().join("1").join(name)).unwrap();
            let b = std::fs::read(dir.path().join("2").join(name)).unwrap();
            for (x, y) in a.chunks(PIECE as usize).zip(b.chunks(PIECE as usize)) {
                if x != y {
                    differing += x.len() as u64;
                }
                if x.iter().all(|&v| v == 0) {
                    zero += x.len() as u64;
                }
            }
        }
        assert_eq!(differing, img.changed_bytes(2));
        assert_eq!(img.total_bytes() - zero, img.travelling_bytes());
        let share = differing as f64 / img.travelling_bytes() as f64;
        assert!((0.03..0.2).contains(&share), "{share}");
    }
}
