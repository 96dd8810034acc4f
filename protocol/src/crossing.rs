//! Which pieces this node brings across the WAN for its site.
//!
//! A site reaches the origin and the other sites through a slower link, and a version should
//! cross that link about once per site. The nodes of a site that download the same version
//! ("mates") split its pieces among themselves by rendezvous hashing with bounded load on groups
//! of adjacent pieces: each group has one owner in the site, the node whose hash of (node, group)
//! is highest among the nodes that own fewer than their fair share of groups so far. The owner
//! fetches the group from other sites or the origin; the other mates wait for it to appear in the
//! site and fetch it there. Every mate computes the same owners from the same set of mates without
//! talking to anyone; when a mate joins or leaves, the owners are recomputed (its groups move, and
//! a few others with them).
//!
//! The bound matters: with plain rendezvous hashing, sixteen mates sharing 128 groups owned
//! between 3 and 15 each, and the mates with the most kept the origin busy long after the rest
//! had brought their share across. With the bound, shares differ by at most one group.
//!
//! A piece some peer of the site already holds never crosses at all: it is fetched in the site.
//!
//! Mates learn each other a moment apart, so for that moment two mates may both fetch a group,
//! or (the price of the bound: plain rendezvous hashing only ever over-claims) none may: the
//! split bounds the waste, it does not forbid it. When the site stalls (a mate that owns groups
//! stops delivering them, or nobody owns one), the caller calls [`Crossing::open`] and every
//! piece may cross.
//!
//! The download applies the policy by showing its scheduler only the pieces a remote peer holds
//! that may cross ([`Crossing::mask`]); same-site peers are shown in full.
//!
//! It does no I/O and knows nothing of peers beyond their id bytes.

use std::collections::{BTreeMap, BTreeSet};

use crate::bitfield::Bitfield;
use crate::manifest::PieceIndex;

/// Pieces per ownership group: a multiple of a request's span, so spans stay whole.
pub const GROUP: u32 = 16;

/// The crossing policy of one download at one node.
#[derive(Debug, Clone)]
pub struct Crossing {
    me: u64,
    mates: BTreeSet<u64>,
    /// The groups this node owns among its current mates.
    mine: Bitfield,
    open: bool,
    /// What each same-site peer holds, and their union.
    site_peers: BTreeMap<u64, Bitfield>,
    site: Bitfield,
    /// The answer of `may_cross` changed for some piece since the last `take_changed`.
    changed: bool,
}

impl Crossing {
    /// The policy of the node whose id bytes are `me`, for a version of `pieces` pieces, with no
    /// mates yet (everything crosses).
    pub fn new(me: &[u8], pieces: u32) -> Self {
        Self {
            me: node_key(me),
            mates: BTreeSet::new(),
            mine: Bitfield::full(pieces.div_ceil(GROUP)),
            open: false,
            site_peers: BTreeMap::new(),
            site: Bitfield::new(pieces),
            changed: false,
        }
    }

    /// A same-site node downloads this version too. Returns whether the split changed.
    pub fn add_mate(&mut self, id: &[u8]) -> bool {
        let key = node_key(id);
        let added = key != self.me && self.mates.insert(key);
        if added {
            self.assign();
        }
        self.changed |= added;
        added
    }

    /// A mate left (or finished and went away). Returns whether the split changed.
    pub fn remove_mate(&mut self, id: &[u8]) -> bool {
        let removed = self.mates.remove(&node_key(id));
        if removed {
            self.assign();
        }
        self.changed |= removed;
        removed
    }

    /// What a same-site peer holds (its full availability). A bitfield of the wrong length is
    /// ignored.
    pub fn site_holds(&mut self, id: &[u8], held: &Bitfield) {
        if held.len() != self.site.len() {
            return;
        }
        self.site_peers.insert(node_key(id), held.clone());
        for piece in held.iter_ones() {
            self.changed |= self.site.set(piece);
        }
    }

    /// A same-site peer now also holds `piece`.
    pub fn site_has(&mut self, id: &[u8], piece: PieceIndex) {
        if let Some(held) = self.site_peers.get_mut(&node_key(id)) {
            held.set(piece);
            self.changed |= self.site.set(piece);
        }
    }

    /// A same-site peer is gone: what only it held may cross again.
    pub fn site_peer_gone(&mut self, id: &[u8]) {
        if self.site_peers.remove(&node_key(id)).is_some() {
            let mut union = Bitfield::new(self.site.len());
            for held in self.site_peers.values() {
                for piece in held.iter_ones() {
                    union.set(piece);
                }
            }
            self.site = union;
            self.changed = true;
        }
    }

    /// Whether what may cross changed since the last call (the caller re-masks remote peers).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn mates(&self) -> usize {
        self.mates.len()
    }

    /// From now on every piece may cross. Returns whether that is news.
    pub fn open(&mut self) -> bool {
        let news = !std::mem::replace(&mut self.open, true);
        self.changed |= news;
        news
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Whether this node may fetch `piece` from another site or the origin.
    pub fn may_cross(&self, piece: PieceIndex) -> bool {
        if self.open {
            return true;
        }
        if self.site.get(piece) {
            return false;
        }
        if self.mates.is_empty() {
            return true;
        }
        self.owns(piece / GROUP)
    }

    /// Whether a same-site peer is known to hold `piece`.
    pub fn in_site(&self, piece: PieceIndex) -> bool {
        self.site.get(piece)
    }

    /// A remote peer's availability as the scheduler should see it: only pieces that may cross.
    pub fn mask(&self, held: &Bitfield) -> Bitfield {
        if self.open {
            return held.clone();
        }
        let mut out = Bitfield::new(held.len());
        let groups = held.len().div_ceil(GROUP);
        for group in 0..groups {
            let mine = self.mates.is_empty() || self.owns(group);
            if !mine {
                continue;
            }
            let end = ((group + 1) * GROUP).min(held.len());
            for piece in group * GROUP..end {
                if held.get(piece) && !self.site.get(piece) {
                    out.set(piece);
                }
            }
        }
        out
    }

    /// Whether this node is the one of its site that brings `group` across.
    fn owns(&self, group: u32) -> bool {
        self.mine.get(group)
    }

    /// Recomputes which groups this node owns, as every mate does with the same set of
    /// members: in group order, each group goes to the member with the highest score among
    /// those still under the bound. The bound is the fair share rounded down, and rounded up
    /// for the first members to reach it while the remainder lasts, so every group finds an
    /// owner and shares differ by at most one group.
    fn assign(&mut self) {
        let groups = self.mine.len();
        let members: Vec<u64> = std::iter::once(self.me)
            .chain(self.mates.iter().copied())
            .collect();
        let n = members.len() as u32;
        let (floor, mut extra) = (groups / n, groups % n);
        let mut load = vec![0u32; members.len()];
        let mut mine = Bitfield::new(groups);
        for group in 0..groups {
            let owner = (0..members.len())
                .filter(|&m| load[m] < floor || (load[m] == floor && extra > 0))
                .max_by_key(|&m| (score(members[m], group), members[m]))
                .expect("the bounds add up to the number of groups");
            if load[owner] == floor {
                extra -= 1;
            }
            load[owner] += 1;
            if members[owner] == self.me {
                mine.set(group);
            }
        }
        self.mine = mine;
    }
}

fn node_key(id: &[u8]) -> u64 {
    let hash = blake3::hash(id);
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

/// Rendezvous score of `node` for `group`: a well-mixed function of both.
fn score(node: u64, group: u32) -> u64 {
    let mut z = node ^ u64::from(group).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: u8) -> Vec<Crossing> {
        let ids: Vec<Vec<u8>> = (0..n).map(|i| vec![i; 38]).collect();
        ids.iter()
            .map(|me| {
                let mut c = Crossing::new(me, 4096);
                for other in &ids {
                    c.add_mate(other);
                }
                c
            })
            .collect()
    }

    #[test]
    fn every_piece_has_exactly_one_owner_in_the_site() {
        let nodes = site(4);
        let mut owned = [0u32; 4];
        for piece in 0..4096 {
            let owners: Vec<usize> = (0..4).filter(|&i| nodes[i].may_cross(piece)).collect();
            assert_eq!(owners.len(), 1, "piece {piece}: {owners:?}");
            owned[owners[0]] += 1;
        }
        // The bound: shares differ by at most one group.
        let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
        assert!(max - min <= GROUP, "{owned:?}");
    }

    #[test]
    fn shares_stay_within_one_group_for_any_site_size() {
        for n in [2u8, 3, 5, 16, 17] {
            // 128 groups, as a 128 MiB version of 64 KiB pieces.
            let ids: Vec<Vec<u8>> = (0..n).map(|i| vec![i, 7, 7]).collect();
            let owned: Vec<u32> = ids
                .iter()
                .map(|me| {
                    let mut c = Crossing::new(me, 128 * GROUP);
                    for other in &ids {
                        c.add_mate(other);
                    }
                    c.mine.count_ones()
                })
                .collect();
            assert_eq!(owned.iter().sum::<u32>(), 128, "n={n}: {owned:?}");
            let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {owned:?}");
        }
    }

    #[test]
    fn groups_stay_whole() {
        let nodes = site(3);
        for group in 0..64 {
            let first = nodes[0].may_cross(group * GROUP);
            for piece in group * GROUP..(group + 1) * GROUP {
                assert_eq!(nodes[0].may_cross(piece), first);
            }
        }
    }

    #[test]
    fn alone_or_open_everything_crosses() {
        let alone = Crossing::new(b"me", 100);
        assert!((0..100).all(|p| alone.may_cross(p)));
        let mut nodes = site(2);
        assert!(!(0..1000).all(|p| nodes[0].may_cross(p)));
        assert!(nodes[0].open());
        assert!(!nodes[0].open(), "opening twice is not news");
        assert!((0..1000).all(|p| nodes[0].may_cross(p)));
    }

    #[test]
    fn a_leaving_mate_hands_its_groups_over() {
        let mut nodes = site(3);
        let leaving = vec![2u8; 38];
        assert!(nodes[0].remove_mate(&leaving));
        assert!(nodes[1].remove_mate(&leaving));
        for piece in 0..2048 {
            assert!(nodes[0].may_cross(piece) != nodes[1].may_cross(piece));
        }
        assert!(!nodes[0].add_mate(&[0u8; 38]), "itself is never a mate");
    }

    #[test]
    fn what_the_site_holds_never_crosses() {
        let mut c = Crossing::new(b"me", 64);
        let mut cache = Bitfield::new(64);
        for p in 0..32 {
            cache.set(p);
        }
        c.site_holds(b"cache", &cache);
        assert!(c.take_changed());
        assert!(!c.may_cross(5) && c.may_cross(40));
        assert_eq!(c.mask(&Bitfield::full(64)).count_ones(), 32);
        c.site_has(b"cache", 40);
        assert!(!c.may_cross(40));
        c.site_has(b"stranger", 50);
        assert!(c.may_cross(50), "only known same-site peers count");
        c.site_peer_gone(b"cache");
        assert!(c.may_cross(5) && c.may_cross(40));
        assert!(c.open());
        c.site_holds(b"cache", &cache);
        assert!(c.may_cross(5), "open: everything crosses");
    }

    #[test]
    fn mask_keeps_only_pieces_that_may_cross() {
        let mut nodes = site(2);
        for n in &mut nodes {
            n.site = Bitfield::new(100);
        }
        let held = Bitfield::full(100);
        let masked = nodes[0].mask(&held);
        for piece in 0..100 {
            assert_eq!(masked.get(piece), nodes[0].may_cross(piece));
        }
        let other = nodes[1].mask(&held);
        assert_eq!(masked.count_ones() + other.count_ones(), 100);
    }
}
