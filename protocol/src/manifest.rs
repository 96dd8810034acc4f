//! Manifests: what one version of an image is made of.
//!
//! Owns the manifest type, its canonical encoding and id, its validation (including path safety),
//! the layout that maps a global piece index to (file, offset, length), and the parallel hashing
//! that builds a manifest from readers. It reads only from `std::io::Read` values handed to it;
//! opening files, walking directories and writing the manifest beside the image is the node's job.
//!
//! ```text
//!  files (sorted by path)      pieces (global index, each file starts a new piece)
//!  boot/initrd   100 KiB   ->  0 [hash] 1 [hash, short]
//!  disk.img      192 KiB   ->  2 [hash] 3 [zero] 4 [hash]
//!  site.conf       1 KiB   ->  5 [hash, short]
//! ```
//!
//! All-zero pieces are recorded as [`PieceHash::Zero`]: they never travel and are written as holes.

use std::io::Read;
use std::sync::mpsc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, EncodeError, WireFormat};
use crate::hash::Hash;
use crate::limits::{MAX_FILES, MAX_MANIFEST_SIZE, MAX_PIECE_SIZE, MAX_PIECES, MIN_PIECE_SIZE};
use crate::path::{check_image_name, check_path_set};

/// Global index of a piece within a version.
pub type PieceIndex = u32;

/// The hash of one piece, or the mark that it is all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceHash {
    /// Every byte is zero: never transferred, written as a hole.
    Zero,
    /// BLAKE3 of the piece's bytes (the last piece of a file may be short).
    Data(Hash),
}

impl PieceHash {
    /// Classifies and hashes one piece.
    pub fn of(bytes: &[u8]) -> Self {
        if is_all_zero(bytes) {
            Self::Zero
        } else {
            Self::Data(Hash::of(bytes))
        }
    }

    /// Whether `bytes` are this piece.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        match self {
            Self::Zero => is_all_zero(bytes),
            Self::Data(h) => Hash::of(bytes) == *h,
        }
    }

    pub fn is_zero(&self) -> bool {
        matches!(self, Self::Zero)
    }
}

/// Whether every byte is zero, 16 bytes at a time (this runs on every piece at seed time).
pub fn is_all_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    let wide = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    wide && chunks.remainder().iter().all(|&b| b == 0)
}

/// One regular file of a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path, `/`-separated, checked by [`crate::path::check_relative_path`].
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o777` at most: no setuid, setgid or sticky bits from the network).
    pub mode: u32,
    /// One entry per piece: `ceil(size / piece_size)` of them.
    pub pieces: Vec<PieceHash>,
}

/// The manifest of one version of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub image: String,
    pub version: u64,
    /// The version this one was made from, if any: pieces equal to the parent's are taken from
    /// local disk instead of the network.
    pub parent: Option<u64>,
    pub piece_size: u32,
    /// Files sorted by path (bytewise), no duplicates.
    pub files: Vec<FileEntry>,
    /// The order in which a boot reads pieces (global indices, no duplicates); may be empty.
    pub boot_profile: Vec<PieceIndex>,
}

impl WireFormat for Manifest {
    const KIND: &'static str = "manifest";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_MANIFEST_SIZE;

    fn validate(&self) -> Result<(), String> {
        self.check().map_err(|e| e.to_string())
    }
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Path(#[from] crate::path::PathError),
    #[error("piece size {0} is not a power of two between 64 KiB and 16 MiB")]
    BadPieceSize(u32),
    #[error("{0} files exceed the limit of {MAX_FILES}")]
    TooManyFiles(usize),
    #[error("files are not sorted by path: {0:?} comes after {1:?}")]
    Unsorted(String, String),
    #[error("file {path:?} of {size} bytes needs {expected} pieces, has {got}")]
    PieceCount {
        path: String,
        size: u64,
        expected: u64,
        got: usize,
    },
    #[error("file {path:?} has mode {mode:o}: only permission bits 0o777 are allowed")]
    BadMode { path: String, mode: u32 },
    #[error("{0} pieces exceed the limit of {MAX_PIECES}")]
    TooManyPieces(u64),
    #[error("boot profile names piece {0}, which does not exist")]
    BootPieceOutOfRange(PieceIndex),
    #[error("boot profile names piece {0} twice")]
    BootPieceDuplicate(PieceIndex),
    #[error("parent version {parent} is not older than version {version}")]
    BadParent { parent: u64, version: u64 },
}

/// Whether `size` is an allowed piece size.
pub fn is_valid_piece_size(size: u32) -> bool {
    size.is_power_of_two() && (MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&size)
}

impl Manifest {
    /// Full semantic validation; decoding runs it on every manifest from the network.
    pub fn check(&self) -> Result<(), ManifestError> {
        check_image_name(&self.image)?;
        if !is_valid_piece_size(self.piece_size) {
            return Err(ManifestError::BadPieceSize(self.piece_size));
        }
        if let Some(parent) = self.parent
            && parent >= self.version
        {
            return Err(ManifestError::BadParent {
                parent,
                version: self.version,
            });
        }
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        for pair in self.files.windows(2) {
            if pair[0].path.as_bytes() >= pair[1].path.as_bytes() {
                return Err(ManifestError::Unsorted(
                    pair[1].path.clone(),
                    pair[0].path.clone(),
                ));
            }
        }
        check_path_set(self.files.iter().map(|f| f.path.as_str()))?;
        let mut total_pieces: u64 = 0;
        for f in &self.files {
            if f.mode & !0o777 != 0 {
                return Err(ManifestError::BadMode {
                    path: f.path.clone(),
                    mode: f.mode,
                });
            }
            let expected = f.size.div_ceil(u64::from(self.piece_size));
            if expected != f.pieces.len() as u64 {
                return Err(ManifestError::PieceCount {
                    path: f.path.clone(),
                    size: f.size,
                    expected,
                    got: f.pieces.len(),
                });
            }
            total_pieces += expected;
            if total_pieces > MAX_PIECES {
                return Err(ManifestError::TooManyPieces(total_pieces));
            }
        }
        let mut seen = crate::bitfield::Bitfield::new(total_pieces as u32);
        for &p in &self.boot_profile {
            if u64::from(p) >= total_pieces {
                return Err(ManifestError::BootPieceOutOfRange(p));
            }
            if !seen.set(p) {
                return Err(ManifestError::BootPieceDuplicate(p));
            }
        }
        Ok(())
    }

    /// Canonical bytes and the id (BLAKE3 of those bytes).
    pub fn encode_with_id(&self) -> Result<(Vec<u8>, Hash), EncodeError> {
        let bytes = self.encode()?;
        let id = Hash::of(&bytes);
        Ok((bytes, id))
    }

    /// Decodes a manifest received from a peer, after checking that its bytes hash to the id
    /// a trusted announcement names (so untrusted bytes are never parsed).
    pub fn decode_expecting(bytes: &[u8], id: &Hash) -> Result<Self, DecodeError> {
        if Hash::of(bytes) != *id {
            return Err(DecodeError::Invalid {
                kind: Self::KIND,
                reason: format!("bytes do not hash to the announced id {id}"),
            });
        }
        Self::decode(bytes)
    }

    /// Sum of all file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Number of pieces over all files.
    pub fn piece_count(&self) -> u32 {
        self.files.iter().map(|f| f.pieces.len() as u32).sum()
    }

    /// The pieces that travel: every piece that is not all zeros.
    pub fn travelling(&self) -> crate::bitfield::Bitfield {
        let mut bits = crate::bitfield::Bitfield::new(self.piece_count());
        let pieces = self.files.iter().flat_map(|f| &f.pieces);
        for (index, piece) in pieces.enumerate() {
            if !piece.is_zero() {
                bits.set(index as PieceIndex);
            }
        }
        bits
    }

    /// Number of all-zero pieces (they never travel).
    pub fn zero_pieces(&self) -> u32 {
        self.piece_count() - self.travelling().count_ones()
    }

    /// Precomputes the index -> location map.
    pub fn layout(&self) -> Layout {
        let mut first_piece = Vec::with_capacity(self.files.len());
        let mut next = 0u32;
        for f in &self.files {
            first_piece.push(next);
            next += f.pieces.len() as u32;
        }
        Layout {
            piece_size: self.piece_size,
            first_piece,
            sizes: self.files.iter().map(|f| f.size).collect(),
            piece_count: next,
        }
    }

    /// Hash record of piece `index`, if it exists.
    pub fn piece_hash(&self, layout: &Layout, index: PieceIndex) -> Option<PieceHash> {
        let loc = layout.locate(index)?;
        let file = &self.files[loc.file];
        file.pieces
            .get((index - layout.first_piece[loc.file]) as usize)
            .copied()
    }
}

/// Where a piece lives inside a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceLocation {
    /// Index into [`Manifest::files`].
    pub file: usize,
    /// Byte offset inside that file.
    pub offset: u64,
    /// Length in bytes (the piece size, or less for a file's last piece).
    pub len: u32,
}

/// Maps global piece indices to file locations in O(log files).
#[derive(Clone, Debug)]
pub struct Layout {
    piece_size: u32,
    first_piece: Vec<PieceIndex>,
    sizes: Vec<u64>,
    piece_count: u32,
}

impl Layout {
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// Global index of the first piece of file `file`.
    pub fn first_piece_of(&self, file: usize) -> Option<PieceIndex> {
        self.first_piece.get(file).copied()
    }

    pub fn locate(&self, index: PieceIndex) -> Option<PieceLocation> {
        if index >= self.piece_count {
            return None;
        }
        // The last file whose first piece is <= index; empty files share their first index with
        // the next file, so take the last match (the one that actually owns pieces).
        let file = self.first_piece.partition_point(|&first| first <= index) - 1;
        let offset = u64::from(index - self.first_piece[file]) * u64::from(self.piece_size);
        let len = (self.sizes[file] - offset).min(u64::from(self.piece_size)) as u32;
        Some(PieceLocation { file, offset, len })
    }
}

/// Why building a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reading {path:?}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} ended after {got} of {expected} bytes (changed while hashing?)")]
    Short {
        path: String,
        got: u64,
        expected: u64,
    },
    #[error("{path:?} is longer than the {expected} bytes expected (changed while hashing?)")]
    Long { path: String, expected: u64 },
    #[error(transparent)]
    Invalid(#[from] ManifestError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Builds a manifest file by file, hashing pieces on every core.
#[derive(Debug)]
pub struct ManifestBuilder {
    manifest: Manifest,
}

impl ManifestBuilder {
    pub fn new(image: &str, version: u64, piece_size: u32) -> Result<Self, ManifestError> {
        check_image_name(image)?;
        if !is_valid_piece_size(piece_size) {
            return Err(ManifestError::BadPieceSize(piece_size));
        }
        Ok(Self {
            manifest: Manifest {
                image: image.to_owned(),
                version,
                parent: None,
                piece_size,
                files: Vec::new(),
                boot_profile: Vec::new(),
            },
        })
    }

    pub fn parent(mut self, parent: Option<u64>) -> Self {
        self.manifest.parent = parent;
        self
    }

    pub fn boot_profile(mut self, profile: Vec<PieceIndex>) -> Self {
        self.manifest.boot_profile = profile;
        self
    }

    /// Hashes `size` bytes from `reader` as the file `path`. `progress` is called with the
    /// number of bytes hashed since its last call.
    pub fn add_file<R: Read + Send>(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        reader: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BuildError> {
        crate::path::check_relative_path(path).map_err(ManifestError::from)?;
        let pieces = hash_pieces(reader, path, size, self.manifest.piece_size, progress)?;
        self.push_file(path, mode, size, pieces);
        Ok(())
    }

    /// Like [`Self::add_file`], from a source that supports positioned reads: every core reads
    /// and hashes its own pieces, so the copy out of the page cache is spread over the cores
    /// and each piece is hashed while it is still in cache. This is what `seed` uses on files.
    pub fn add_file_at<R: ReadAt + ?Sized>(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        source: &R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BuildError> {
        crate::path::check_relative_path(path).map_err(ManifestError::from)?;
        let pieces = hash_pieces_at(source, path, size, self.manifest.piece_size, progress)?;
        self.push_file(path, mode, size, pieces);
        Ok(())
    }

    fn push_file(&mut self, path: &str, mode: u32, size: u64, pieces: Vec<PieceHash>) {
        self.manifest.files.push(FileEntry {
            path: path.to_owned(),
            size,
            mode: mode & 0o777,
            pieces,
        });
    }

    /// Sorts the files into canonical order and validates the whole manifest.
    pub fn finish(mut self) -> Result<Manifest, BuildError> {
        self.manifest
            .files
            .sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        self.manifest.check()?;
        // Also proves it encodes within the size limit.
        self.manifest.encode()?;
        Ok(self.manifest)
    }
}

/// A source of bytes that can be read at any offset from several threads at once (a file via
/// `pread`, or memory). The caller supplies it: this crate never opens files.
pub trait ReadAt: Sync {
    /// Fills `buf` with the bytes at `offset`, or fails (`UnexpectedEof` if the source is
    /// shorter).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Pieces hashed per parallel round of [`hash_pieces_at`]; progress is reported between rounds.
const PIECES_PER_ROUND: u64 = 1024;

/// Hashes `size` bytes of `source` as pieces, reading and hashing on every core.
pub fn hash_pieces_at<R: ReadAt + ?Sized>(
    source: &R,
    path: &str,
    size: u64,
    piece_size: u32,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<PieceHash>, BuildError> {
    let piece_size = u64::from(piece_size);
    let count = size.div_ceil(piece_size);
    if count > MAX_PIECES {
        return Err(ManifestError::TooManyPieces(count).into());
    }
    let mut pieces = Vec::with_capacity(count as usize);
    let mut next = 0u64;
    while next < count {
        let end = (next + PIECES_PER_ROUND).min(count);
        let round: Result<Vec<PieceHash>, std::io::Error> = (next..end)
            .into_par_iter()
            .map_init(
                || vec![0u8; piece_size as usize],
                |buf, index| {
                    let offset = index * piece_size;
                    let len = (size - offset).min(piece_size) as usize;
                    source.read_exact_at(&mut buf[..len], offset)?;
                    Ok(PieceHash::of(&buf[..len]))
                },
            )
            .collect();
        pieces.extend(round.map_err(|source| BuildError::Read {
            path: path.to_owned(),
            source,
        })?);
        let bytes = (end * piece_size).min(size) - next * piece_size;
        progress(bytes);
        next = end;
    }
    Ok(pieces)
}

/// How many bytes the reading thread hands to the hashing pool at a time: large enough that
/// rayon has work for every core, small enough to keep memory flat (two batches in flight).
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Reads exactly `size` bytes and returns the piece hashes. One thread reads while the rayon
/// pool hashes the previous batch, so reading overlaps hashing.
pub fn hash_pieces<R: Read + Send>(
    mut reader: R,
    path: &str,
    size: u64,
    piece_size: u32,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<PieceHash>, BuildError> {
    let piece_size = piece_size as usize;
    let batch_len = BATCH_BYTES.max(piece_size) / piece_size * piece_size;
    let expected_pieces = size.div_ceil(piece_size as u64);
    if expected_pieces > MAX_PIECES {
        return Err(ManifestError::TooManyPieces(expected_pieces).into());
    }
    let mut pieces = Vec::with_capacity(expected_pieces as usize);

    std::thread::scope(|scope| {
        // Two buffers circulate: the reader fills one while the pool hashes the other.
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<Vec<u8>, BuildError>>(2);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(2);
        for _ in 0..2 {
            let _ = empty_tx.send(Vec::with_capacity(batch_len));
        }
        scope.spawn(move || {
            let read_error = |source| BuildError::Read {
                path: path.to_owned(),
                source,
            };
            let mut read = 0u64;
            while read < size {
                let Ok(mut buf) = empty_rx.recv() else { return };
                let want = (size - read).min(batch_len as u64) as usize;
                buf.resize(want, 0);
                let result = match read_full(&mut reader, &mut buf) {
                    Ok(got) if got == want => Ok(buf),
                    Ok(got) => Err(BuildError::Short {
                        path: path.to_owned(),
                        got: read + got as u64,
                        expected: size,
                    }),
                    Err(e) => Err(read_error(e)),
                };
                let failed = result.is_err();
                if full_tx.send(result).is_err() || failed {
                    return;
                }
                read += want as u64;
            }
            // The reader must now be at its end: a longer file changed under us.
            let trailer = match read_full(&mut reader, &mut [0u8; 1]) {
                Ok(0) => return,
                Ok(_) => BuildError::Long {
                    path: path.to_owned(),
                    expected: size,
                },
                Err(e) => read_error(e),
            };
            let _ = full_tx.send(Err(trailer));
        });

        let mut done: u64 = 0;
        while done < size {
            let buf = full_rx.recv().map_err(|_| BuildError::Short {
                path: path.to_owned(),
                got: done,
                expected: size,
            })??;
            pieces.par_extend(buf.par_chunks(piece_size).map(PieceHash::of));
            done += buf.len() as u64;
            progress(buf.len() as u64);
            // The reader may have finished already; then the buffer is simply dropped.
            let _ = empty_tx.send(buf);
        }
        // A trailing error (the file grew, or reading past the end failed) comes last.
        match full_rx.recv() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    })?;
    Ok(pieces)
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u32 = MIN_PIECE_SIZE;

    fn sample() -> Manifest {
        let mut data = vec![7u8; PS as usize * 2 + 100];
        data[PS as usize..PS as usize * 2].fill(0);
        let mut b = ManifestBuilder::new("lab-image", 3, PS)
            .unwrap()
            .parent(Some(2));
        b.add_file("disk.img", 0o644, data.len() as u64, &data[..], &mut |_| {})
            .unwrap();
        b.add_file("boot/vmlinuz", 0o755, 10, &[1u8; 10][..], &mut |_| {})
            .unwrap();
        b.add_file("empty", 0o600, 0, &[][..], &mut |_| {}).unwrap();
        b.boot_profile(vec![0, 1]).finish().unwrap()
    }

    #[test]
    fn builds_sorted_with_zero_pieces() {
        let m = sample();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["boot/vmlinuz", "disk.img", "empty"]);
        assert_eq!(m.piece_count(), 4);
        let disk = &m.files[1];
        assert!(!disk.pieces[0].is_zero());
        assert!(disk.pieces[1].is_zero());
        assert!(disk.pieces[2].matches(&[7u8; 100]));
        assert_eq!(m.total_size(), u64::from(PS) * 2 + 110);
        assert_eq!(m.zero_pieces(), 1);
        assert_eq!(m.travelling().iter_zeros().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn layout_locates_pieces() {
        let m = sample();
        let l = m.layout();
        assert_eq!(
            l.locate(0),
            Some(PieceLocation {
                file: 0,
                offset: 0,
                len: 10
            })
        );
        assert_eq!(
            l.locate(3),
            Some(PieceLocation {
                file: 1,
                offset: u64::from(PS) * 2,
                len: 100
            })
        );
        assert_eq!(l.locate(4), None);
        assert_eq!(m.piece_hash(&l, 2), Some(PieceHash::Zero));
    }

    #[test]
    fn encode_decode_and_id() {
        let m = sample();
        let (bytes, id) = m.encode_with_id().unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(Manifest::decode_expecting(&bytes, &id).unwrap(), m);
        assert!(Manifest::decode_expecting(&bytes, &Hash::of(b"other")).is_err());
    }

    #[test]
    fn rejects_wrong_sizes_and_short_or_long_readers() {
        let mut b = ManifestBuilder::new("img", 1, PS).unwrap();
        let err = b
            .add_file("f", 0o644, 10, &[1u8; 5][..], &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, BuildError::Short { got: 5, .. }), "{err}");
        let err = b
            .add_file("f", 0o644, 10, &[1u8; 11][..], &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, BuildError::Long { .. }), "{err}");
        assert!(ManifestBuilder::new("img", 1, 1000).is_err());
        assert!(ManifestBuilder::new("../img", 1, PS).is_err());
    }

    #[test]
    fn multi_batch_file_hashes_like_single_pieces() {
        let len = BATCH_BYTES * 2 + 3 * PS as usize + 17;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut seen = 0;
        let pieces = hash_pieces(&data[..], "big", len as u64, PS, &mut |n| seen += n).unwrap();
        assert_eq!(seen, len as u64);
        let expected: Vec<_> = data.chunks(PS as usize).map(PieceHash::of).collect();
        assert_eq!(pieces, expected);
    }

    #[test]
    fn positioned_hashing_matches_streaming() {
        let len = PIECES_PER_ROUND as usize * PS as usize + 3 * PS as usize + 17;
        let mut data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        data[PS as usize..2 * PS as usize].fill(0);
        let mut seen = 0;
        let at = hash_pieces_at(&data[..], "f", len as u64, PS, &mut |n| seen += n).unwrap();
        assert_eq!(seen, len as u64);
        let streamed = hash_pieces(&data[..], "f", len as u64, PS, &mut |_| {}).unwrap();
        assert_eq!(at, streamed);
        assert!(at[1].is_zero());
        let err = hash_pieces_at(&data[..10], "f", 20, PS, &mut |_| {}).unwrap_err();
        assert!(matches!(err, BuildError::Read { .. }), "{err}");
    }

    #[test]
    fn validation_catches_every_inconsistency() {
        let good = sample();
        let mut m = good.clone();
        m.files.swap(0, 1);
        assert!(matches!(m.check(), Err(ManifestError::Unsorted(..))));
        let mut m = good.clone();
        m.files[1].pieces.pop();
        assert!(matches!(m.check(), Err(ManifestError::PieceCount { .. })));
        let mut m = good.clone();
        m.files[0].mode = 0o4755;
        assert!(matches!(m.check(), Err(ManifestError::BadMode { .. })));
        let mut m = good.clone();
        m.boot_profile = vec![9];
        assert!(matches!(
            m.check(),
            Err(ManifestError::BootPieceOutOfRange(9))
        ));
        let mut m = good.clone();
        m.boot_profile = vec![1, 1];
        assert!(matches!(
            m.check(),
            Err(ManifestError::BootPieceDuplicate(1))
        ));
        let mut m = good.clone();
        m.files[0].path = "../../etc/shadow".into();
        assert!(matches!(m.check(), Err(ManifestError::Path(_))));
        let mut m = good;
        m.parent = Some(3);
        assert!(matches!(m.check(), Err(ManifestError::BadParent { .. })));
    }

    #[test]
    fn decode_rejects_escaping_path_even_if_well_formed() {
        let mut m = sample();
        m.files[0].path = "/etc/passwd".into();
        let bytes = m.encode_unchecked().unwrap();
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
