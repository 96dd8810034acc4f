//! The versions this node holds, by manifest id: complete ones, partial ones (being
//! downloaded, served piece by piece as they are verified), and for the origin, its
//! super-seeding state. Shared by the uploader, the downloads and the control answers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::manifest::PieceIndex;
use imiswarm_protocol::superseed::{Admission, DEFAULT_HOLD, SuperSeed};

use crate::store::{CompleteVersion, PartialVersion, StoreError};

/// A version this node can serve pieces of.
#[derive(Debug, Clone)]
pub enum Held {
    Complete(Arc<CompleteVersion>),
    Partial(Arc<PartialVersion>),
}

impl Held {
    pub fn has(&self, piece: PieceIndex) -> bool {
        match self {
            Self::Complete(c) => piece < c.layout().piece_count(),
            Self::Partial(p) => p.is_verified(piece),
        }
    }

    /// Reads `piece` into `out[at..]`, sizing `out` to end with it; bytes before `at` are kept.
    pub fn read_piece_at(
        &self,
        piece: PieceIndex,
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), StoreError> {
        match self {
            Self::Complete(c) => c.read_piece_at(piece, out, at),
            Self::Partial(p) => p.read_piece_at(piece, out, at),
        }
    }

    /// The length of `piece` in bytes, if the version has such a piece.
    pub fn piece_len(&self, piece: PieceIndex) -> Option<u32> {
        let layout = match self {
            Self::Complete(c) => c.layout(),
            Self::Partial(p) => p.layout(),
        };
        layout.locate(piece).map(|l| l.len)
    }

    pub fn bitfield(&self) -> Bitfield {
        match self {
            Self::Complete(c) => Bitfield::full(c.layout().piece_count()),
            Self::Partial(p) => p.verified(),
        }
    }

    pub fn manifest_bytes(&self) -> Vec<u8> {
        match self {
            Self::Complete(c) => c.manifest_bytes.clone(),
            Self::Partial(p) => p.manifest_bytes(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    complete: HashMap<Hash, Arc<CompleteVersion>>,
    partial: HashMap<Hash, Arc<PartialVersion>>,
    origin: HashMap<Hash, SuperSeed>,
}

/// Every version held, behind one lock held only for map operations.
#[derive(Debug, Default)]
pub struct Library {
    inner: RwLock<Inner>,
}

impl Library {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &Hash) -> Option<Held> {
        let inner = self.read();
        if let Some(c) = inner.complete.get(id) {
            return Some(Held::Complete(c.clone()));
        }
        inner.partial.get(id).map(|p| Held::Partial(p.clone()))
    }

    pub fn complete(&self, id: &Hash) -> Option<Arc<CompleteVersion>> {
        self.read().complete.get(id).cloned()
    }

    pub fn add_complete(&self, version: Arc<CompleteVersion>) {
        let mut inner = self.write();
        inner.partial.remove(&version.id);
        inner.complete.insert(version.id, version);
    }

    pub fn add_partial(&self, version: Arc<PartialVersion>) {
        self.write().partial.insert(version.id, version);
    }

    /// Stops serving a complete version (retention); uploads under way finish from their
    /// open files.
    pub fn remove_complete(&self, id: &Hash) {
        let mut inner = self.write();
        inner.complete.remove(id);
        inner.origin.remove(id);
    }

    pub fn remove_partial(&self, id: &Hash) {
        self.write().partial.remove(id);
    }

    /// The newest complete version of `image` older than `version`, to reuse pieces from.
    pub fn newest_complete_before(
        &self,
        image: &str,
        version: u64,
    ) -> Option<Arc<CompleteVersion>> {
        self.read()
            .complete
            .values()
            .filter(|c| c.manifest.image == image && c.manifest.version < version)
            .max_by_key(|c| c.manifest.version)
            .cloned()
    }

    /// Whether `image@version` is held complete.
    pub fn has_version(&self, image: &str, version: u64) -> bool {
        self.read()
            .complete
            .values()
            .any(|c| c.manifest.image == image && c.manifest.version == version)
    }

    /// Marks `id` as published by this node: its pieces leave about once (super-seeding).
    pub fn set_origin(&self, id: Hash) {
        let mut inner = self.write();
        if let Some(c) = inner.complete.get(&id).cloned() {
            let policy = SuperSeed::new(&c.manifest.travelling(), DEFAULT_HOLD);
            inner.origin.insert(id, policy);
        }
    }

    /// For an origin version, whether to serve `piece` at `now`; other versions always serve.
    pub fn admit(&self, id: &Hash, piece: PieceIndex, now: Instant) -> Admission {
        match self.write().origin.get_mut(id) {
            Some(policy) => policy.admit(piece, now),
            None => Admission::Serve,
        }
    }

    /// For an origin version, how many pieces its first pass has yet to send.
    pub fn first_pass_left(&self, id: &Hash) -> Option<u32> {
        self.read().origin.get(id).map(SuperSeed::first_pass_left)
    }

    /// The origin upload of `piece` admitted at `admitted_at` broke off.
    pub fn aborted(&self, id: &Hash, piece: PieceIndex, admitted_at: Instant) {
        if let Some(policy) = self.write().origin.get_mut(id) {
            policy.on_aborted(piece, admitted_at);
        }
    }

    /// Summary for status: (id, image, version, complete?, verified pieces, total pieces).
    pub fn summary(&self) -> Vec<(Hash, String, u64, bool, u32, u32)> {
        let inner = self.read();
        let mut out: Vec<_> = inner
            .complete
            .values()
            .map(|c| {
                let n = c.layout().piece_count();
                (
                    c.id,
                    c.manifest.image.clone(),
                    c.manifest.version,
                    true,
                    n,
                    n,
                )
            })
            .chain(inner.partial.values().map(|p| {
                let n = p.layout().piece_count();
                (
                    p.id,
                    p.manifest.image.clone(),
                    p.manifest.version,
                    false,
                    n - p.missing(),
                    n,
                )
            }))
            .collect();
        out.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        out
    }
}
