//! The piece scheduler: which piece to ask of which peer, and when.
//!
//! Goals: keep every peer's pipeline full with the pieces that matter most (an on-demand read,
//! then the boot profile in its order, then the rest rarest first with random ties), start with
//! a few random pieces so there is soon something to trade, prefer peers of the same site, never
//! ask a peer for a piece it does not have, never ask for a piece twice except in the endgame,
//! and retry failed pieces elsewhere first.
//!
//! Non-goals: it does no I/O and reads no clock. The caller passes `now` into every call that
//! cares about time, sends the requests it gets back, and reports what happened. It does not
//! verify pieces (the caller does, then reports [`Scheduler::on_complete`] or
//! [`Scheduler::on_failure`]), and it does not decide which peers to connect to or how deep a
//! peer's pipeline should be (the node sizes it with [`Scheduler::set_pipeline`]).
//!
//! ```text
//!   want / want_all / mark_have ──┐
//!   add_peer / remove_peer ───────┤                        ┌──> Vec<Request>   (send them)
//!   peer_bitfield / peer_have ────┼──>  Scheduler  ────────┤
//!   set_pipeline ─────────────────┤    (pure state)        ├──> Vec<(peer, piece)> to cancel
//!   on_complete / on_failure ─────┤                        │    (from on_complete, endgame)
//!   next_requests(now) ───────────┘                        └──> pieces back to pending
//!                                                               (from remove_peer, for logs)
//! ```
//!
//! # How a request is chosen
//!
//! Pending pieces (wanted, not held, not in flight) sit in one ordered set keyed by
//! `(priority, available?, secondary, random tiebreak, index)`, where the secondary key is the
//! want order for boot and on-demand pieces and the availability count for normal pieces. Each
//! peer, served in locality order, walks that set from the front and takes the first piece it
//! has and is not backed off for, then stretches the request over the following pieces while
//! they are pending, of the same priority, held by the peer and within `max_span` and the
//! pipeline. Pieces nobody has are kept at the back of their priority so they cost nothing.
//!
//! Endgame: once nothing is pending but some pieces are in flight, a peer with free pipeline may
//! get a duplicate of a piece in flight elsewhere, once that request is `endgame_min_age` old;
//! the first copy to complete makes [`Scheduler::on_complete`] return the others to cancel.
//!
//! # Cost
//!
//! Keeping the set ordered costs `O(log pieces)` per change. Peers that hold everything (seeds)
//! are counted apart, so a seed joining or leaving costs nothing per piece; a bitfield change
//! large against the pending set rebuilds the set in one sort instead of re-keying each piece.
//! A fill walks the set only as far as the peer's first eligible pieces; a per-peer count of the
//! pending pieces it holds ends a walk as soon as none is left, and a walk that passes
//! [`SCAN_BUDGET`] pieces the peer lacks switches to the peer's own bitfield
//! (`O(pieces / 8 + held)`), so a peer with little to offer never costs a full walk of a large
//! set. Measured in release on 2^20 pieces and 100 peers: `want_all` 75 ms, a half-full peer
//! joining about 70 ms, a seed joining well under 1 ms, `next_requests` about 3 ms a round.
//!
//! Memory: about 35 bytes per wanted piece (its state and its place in the pending set), one
//! bit per piece and peer (the availability the caller reports), and `O(in flight + backoffs)`,
//! backoffs being capped per peer by [`MAX_BACKOFFS_PER_PEER`].

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::bitfield::Bitfield;
use crate::limits::MAX_PIECES;

pub use crate::manifest::PieceIndex;

/// How many pieces a fill may pass over (pieces the peer lacks or is backed off for) before it
/// stops walking the pending set and scans the peer's bitfield instead.
pub const SCAN_BUDGET: usize = 1024;

/// A peer with this many pieces backed off gets no new request until some backoff expires: a
/// peer that fails that much is misbehaving, and the cap keeps the backoff table bounded.
pub const MAX_BACKOFFS_PER_PEER: usize = 4096;

/// In the random-first phase, how many uniform probes to try before falling back to an exact
/// draw over the peer's bitfield.
const RANDOM_PROBES: u32 = 32;

/// How urgently a piece is wanted. `OnDemand > Boot > Normal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Everything else: fetched rarest first.
    Normal,
    /// Part of the boot profile: fetched in the order it was wanted.
    Boot,
    /// A read is waiting for it: fetched first, in the order it was wanted.
    OnDemand,
}

impl Priority {
    /// Sort rank in the pending set: lower is served first.
    fn rank(self) -> u8 {
        match self {
            Priority::OnDemand => 0,
            Priority::Boot => 1,
            Priority::Normal => 2,
        }
    }
}

const RANK_NORMAL: u8 = 2;

/// Where a peer is relative to us; peers are asked in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Locality {
    /// Same site (same LAN): asked first.
    SameSite,
    /// Another site: its pieces cross a WAN link.
    OtherSite,
    /// The seed: asked last, so it uploads each piece about once.
    Origin,
}

impl Locality {
    fn rank(self) -> u8 {
        match self {
            Locality::SameSite => 0,
            Locality::OtherSite => 1,
            Locality::Origin => 2,
        }
    }
}

/// Tuning of a [`Scheduler`].
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most pieces in flight at one peer, unless [`Scheduler::set_pipeline`] overrides it.
    pub pipeline_per_peer: u32,
    /// Most adjacent pieces coalesced into one request (0 is taken as 1).
    pub max_span: u32,
    /// While fewer than this many pieces are held, normal pieces are picked at random among
    /// those the peer has, instead of rarest first.
    pub random_first: u32,
    /// In endgame, most copies of one piece in flight at once (below 2: no duplicates).
    pub endgame_duplicates: u32,
    /// In endgame, a piece is duplicated only once its oldest request is at least this old: a
    /// request just sent is not late yet, and duplicating it would send a same-site piece over
    /// the WAN for nothing.
    pub endgame_min_age: Duration,
    /// A request older than this is treated as failed by the next [`Scheduler::next_requests`].
    pub request_timeout: Duration,
    /// A peer that failed a piece is not asked for that piece again before this much time.
    pub retry_after: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            pipeline_per_peer: 16,
            max_span: 8,
            random_first: 4,
            endgame_duplicates: 2,
            endgame_min_age: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(10),
        }
    }
}

/// Ask `peer` for pieces `first..first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<P> {
    pub peer: P,
    pub first: PieceIndex,
    pub count: u32,
}

impl<P> Request<P> {
    /// The pieces this request names.
    pub fn pieces(&self) -> std::ops::Range<PieceIndex> {
        self.first..self.first.saturating_add(self.count)
    }
}

/// What the scheduler knows of one piece. Kept small: there may be millions.
#[derive(Clone, Copy, Debug, Default)]
struct PieceState {
    /// `Some` once wanted; only ever raised.
    priority: Option<Priority>,
    /// Verified locally.
    have: bool,
    /// In the pending set (wanted, not held, not in flight).
    pending: bool,
    /// How many known peers hold it, not counting seeds (see `Scheduler::seeds`).
    partial: u32,
    /// Want order, for boot and on-demand pieces.
    seq: u32,
}

/// Order of the pending set; the first key a peer can serve is what it gets asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    rank: u8,
    /// Nobody has it: kept behind the pieces of its priority that someone has.
    unavailable: bool,
    /// Want order (boot, on-demand) or availability not counting seeds (normal): seeds hold
    /// every piece, so they do not change which piece is rarer.
    secondary: u32,
    tiebreak: u32,
    piece: PieceIndex,
}

impl Key {
    /// The last possible key of the unavailable part of `rank`: walking past it skips that part.
    fn end_of_unavailable(rank: u8) -> Self {
        Key {
            rank,
            unavailable: true,
            secondary: u32::MAX,
            tiebreak: u32::MAX,
            piece: PieceIndex::MAX,
        }
    }
}

/// One outstanding request of a piece.
#[derive(Clone, Copy, Debug)]
struct InFlight<P> {
    peer: P,
    at: Instant,
}

#[derive(Debug)]
struct PeerState {
    locality: Locality,
    /// What the peer holds, exactly `piece_count` long.
    has: Bitfield,
    /// Holds every piece and is counted in `Scheduler::seeds`, not per piece.
    seed: bool,
    pipeline: Option<u32>,
    in_flight: BTreeSet<PieceIndex>,
    /// Pieces this peer failed, and until when (`None`: the deadline overflowed `Instant`).
    backoff: HashMap<PieceIndex, Option<Instant>>,
    /// How many pending pieces this peer holds (backed off or not): lets a fill stop early.
    pending_has: u32,
}

/// Where a fill is in its walk of the pending set.
#[derive(Debug, Default)]
struct Walk {
    /// Every key up to here was passed (the peer cannot take it).
    after: Option<Key>,
    passed: usize,
    /// Pending pieces the peer has but was passed for backoff.
    backed_off: u32,
    /// Once the walk is over budget: the peer's best candidates, ascending.
    fallback: Option<VecDeque<Key>>,
    /// Random-first phase, once probing missed: every normal piece the peer could serve.
    random_pool: Option<Vec<PieceIndex>>,
}

/// The sans-IO piece scheduler of one version download. See the module docs.
pub struct Scheduler<P> {
    config: SchedulerConfig,
    piece_count: u32,
    tiebreak_seed: u64,
    rng: SmallRng,
    pieces: Vec<PieceState>,
    pending: BTreeSet<Key>,
    in_flight: BTreeMap<PieceIndex, Vec<InFlight<P>>>,
    /// Every copy in flight by request time, for timeouts.
    by_age: BTreeSet<(Instant, PieceIndex, P)>,
    /// Every expiring backoff by deadline, for pruning.
    backoff_expiry: BTreeSet<(Instant, P, PieceIndex)>,
    peers: BTreeMap<P, PeerState>,
    /// Peers that sent a full bitfield. Counting them apart makes a seed joining or leaving
    /// cost nothing per piece (as libtorrent's piece picker does).
    seeds: u32,
    have_count: u32,
    remaining: u32,
    next_seq: u32,
}

impl<P: std::fmt::Debug> std::fmt::Debug for Scheduler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A summary: the per-piece state of a large version would drown any log line.
        f.debug_struct("Scheduler")
            .field("piece_count", &self.piece_count)
            .field("have", &self.have_count)
            .field("remaining", &self.remaining)
            .field("pending", &self.pending.len())
            .field("in_flight", &self.in_flight.len())
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("seeds", &self.seeds)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Copy + Eq + std::hash::Hash + Ord + std::fmt::Debug> Scheduler<P> {
    /// A scheduler for a version of `piece_count` pieces, wanting nothing yet. `seed` drives
    /// every random choice, so a run is reproducible. A `piece_count` above
    /// [`MAX_PIECES`] is clamped to it (no valid manifest has more).
    pub fn new(piece_count: u32, config: SchedulerConfig, seed: u64) -> Self {
        let piece_count = piece_count.min(u32::try_from(MAX_PIECES).unwrap_or(u32::MAX));
        Self {
            config,
            piece_count,
            tiebreak_seed: mix64(seed ^ 0x7469_6562_7265_616b),
            rng: SmallRng::seed_from_u64(seed),
            pieces: vec![PieceState::default(); piece_count as usize],
            pending: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            by_age: BTreeSet::new(),
            backoff_expiry: BTreeSet::new(),
            peers: BTreeMap::new(),
            seeds: 0,
            have_count: 0,
            remaining: 0,
            next_seq: 0,
        }
    }

    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Wants `piece` at `priority`, or raises its priority; never lowers it. Boot and on-demand
    /// pieces are requested in the order they were wanted (raising a piece counts as wanting it
    /// anew). Out-of-range pieces are ignored.
    pub fn want(&mut self, piece: PieceIndex, priority: Priority) {
        self.want_one(piece, priority, false);
    }

    /// Wants every piece not already held, at `priority` (raising, never lowering), in index
    /// order. Updates the pending set in one go: `O(pieces log pieces)` with a small constant.
    pub fn want_all(&mut self, priority: Priority) {
        for piece in 0..self.piece_count {
            if !self.pieces[piece as usize].have {
                self.want_one(piece, priority, true);
            }
        }
        self.rebuild_pending();
        for state in self.peers.values_mut() {
            state.pending_has = if state.seed {
                self.pending.len() as u32
            } else {
                set_bits(state.has.as_bytes())
                    .filter(|&p| self.pieces[p as usize].pending)
                    .count() as u32
            };
        }
    }

    /// `want` for one piece. With `deferred`, only the piece's own state changes: the caller
    /// rebuilds the pending set and every peer's `pending_has` afterwards.
    fn want_one(&mut self, piece: PieceIndex, priority: Priority, deferred: bool) {
        let Some(state) = self.pieces.get(piece as usize).copied() else {
            return;
        };
        if state.priority.is_some_and(|old| old >= priority) {
            return;
        }
        let old_key = self.key(piece);
        let seq = if priority == Priority::Normal {
            0
        } else {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.saturating_add(1);
            seq
        };
        let p = &mut self.pieces[piece as usize];
        p.priority = Some(priority);
        p.seq = seq;
        if state.pending {
            if !deferred {
                self.pending.remove(&old_key);
                self.pending.insert(self.key(piece));
            }
        } else if state.priority.is_none() && !state.have {
            self.remaining += 1;
            if !self.in_flight.contains_key(&piece) {
                if deferred {
                    self.pieces[piece as usize].pending = true;
                } else {
                    self.insert_pending(piece);
                }
            }
        }
    }

    /// `piece` is verified locally already (resumed, or copied from a previous version): it is
    /// never requested. Requests already in flight for it stay counted until they complete,
    /// fail or time out.
    pub fn mark_have(&mut self, piece: PieceIndex) {
        let Some(state) = self.pieces.get(piece as usize).copied() else {
            return;
        };
        if state.have {
            return;
        }
        if state.pending {
            self.remove_pending(piece);
        }
        self.pieces[piece as usize].have = true;
        self.have_count += 1;
        if state.priority.is_some() {
            self.remaining -= 1;
        }
    }

    /// Adds a peer holding nothing yet. For a known peer, only updates its locality.
    pub fn add_peer(&mut self, peer: P, locality: Locality) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.locality = locality;
            return;
        }
        self.peers.insert(
            peer,
            PeerState {
                locality,
                has: Bitfield::new(self.piece_count),
                seed: false,
                pipeline: None,
                in_flight: BTreeSet::new(),
                backoff: HashMap::new(),
                pending_has: 0,
            },
        );
    }

    /// Forgets a peer and its backoffs, and subtracts its availability. Returns its in-flight
    /// pieces (ascending, for logging); each goes back to pending unless a duplicate is still in
    /// flight elsewhere. Unknown peers: nothing happens, nothing is returned.
    pub fn remove_peer(&mut self, peer: P) -> Vec<PieceIndex> {
        let Some(state) = self.peers.remove(&peer) else {
            return Vec::new();
        };
        let lost: Vec<PieceIndex> = state.in_flight.iter().copied().collect();
        for &piece in &lost {
            self.remove_copy(peer, piece);
            self.repend_if_orphaned(piece);
        }
        let rebuild = if state.seed {
            self.set_seeds(self.seeds - 1)
        } else {
            self.change_partial(state.has.as_bytes(), &[])
        };
        if rebuild {
            self.rebuild_pending();
        }
        for (piece, until) in state.backoff {
            if let Some(until) = until {
                self.backoff_expiry.remove(&(until, peer, piece));
            }
        }
        lost
    }

    /// Replaces what `peer` holds. Bits past the piece count are ignored, missing bits mean
    /// "not held". Unknown peers are ignored (call [`Self::add_peer`] first).
    pub fn peer_bitfield(&mut self, peer: P, bitfield: &Bitfield) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let new = if bitfield.len() == self.piece_count {
            bitfield.clone()
        } else {
            let mut new = Bitfield::new(self.piece_count);
            for piece in bitfield.iter_ones().take_while(|&p| p < self.piece_count) {
                new.set(piece);
            }
            new
        };
        let was_seed = state.seed;
        let is_seed = self.piece_count > 0 && new.is_full();
        let old = std::mem::replace(&mut state.has, Bitfield::new(0));
        // A seed's pieces are counted in `seeds`, not per piece.
        let was: &[u8] = if was_seed { &[] } else { old.as_bytes() };
        let is: &[u8] = if is_seed { &[] } else { new.as_bytes() };
        let mut rebuild = self.change_partial(was, is);
        if was_seed != is_seed {
            let seeds = if is_seed {
                self.seeds + 1
            } else {
                self.seeds - 1
            };
            rebuild |= self.set_seeds(seeds);
        }
        if rebuild {
            self.rebuild_pending();
        }
        let pending_has = if is_seed {
            self.pending.len() as u32
        } else {
            set_bits(new.as_bytes())
                .filter(|&p| self.pieces[p as usize].pending)
                .count() as u32
        };
        if let Some(state) = self.peers.get_mut(&peer) {
            state.has = new;
            state.seed = is_seed;
            state.pending_has = pending_has;
        }
    }

    /// `peer` now holds `piece` too. Unknown peers and out-of-range pieces are ignored.
    pub fn peer_have(&mut self, peer: P, piece: PieceIndex) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if !state.has.set(piece) {
            return;
        }
        if self.pieces[piece as usize].pending {
            state.pending_has += 1;
        }
        self.change_availability(piece, true);
    }

    /// Overrides `pipeline_per_peer` for one peer. Unknown peers are ignored.
    pub fn set_pipeline(&mut self, peer: P, limit: u32) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.pipeline = Some(limit);
        }
    }

    /// `piece` arrived from `peer` and was verified. Returns the other copies still in flight
    /// (endgame duplicates) for the caller to cancel; they are no longer counted. A piece nobody
    /// was asked for, or already held, is accepted as held all the same; out-of-range pieces are
    /// ignored. `_now` is taken for symmetry with the other events.
    pub fn on_complete(
        &mut self,
        peer: P,
        piece: PieceIndex,
        _now: Instant,
    ) -> Vec<(P, PieceIndex)> {
        let Some(state) = self.pieces.get(piece as usize).copied() else {
            return Vec::new();
        };
        self.remove_copy(peer, piece);
        let others: Vec<P> = self
            .in_flight
            .get(&piece)
            .map(|copies| copies.iter().map(|c| c.peer).collect())
            .unwrap_or_default();
        for &other in &others {
            self.remove_copy(other, piece);
        }
        if !state.have {
            if state.pending {
                self.remove_pending(piece);
            }
            self.pieces[piece as usize].have = true;
            self.have_count += 1;
            if state.priority.is_some() {
                self.remaining -= 1;
            }
        }
        others.into_iter().map(|other| (other, piece)).collect()
    }

    /// The request of `piece` at `peer` failed (bad piece, refused, timed out): the piece is
    /// pending again unless another copy is in flight, and `peer` is not asked for it again
    /// before `now + retry_after`. Ignored unless `piece` was in flight at `peer`.
    pub fn on_failure(&mut self, peer: P, piece: PieceIndex, now: Instant) {
        if !self.remove_copy(peer, piece) {
            return;
        }
        if self.pieces[piece as usize].have {
            return;
        }
        // Copies only exist at known peers, but stay graceful if that ever changes.
        if let Some(state) = self.peers.get_mut(&peer) {
            let until = now.checked_add(self.config.retry_after);
            if let Some(Some(old)) = state.backoff.insert(piece, until) {
                self.backoff_expiry.remove(&(old, peer, piece));
            }
            if let Some(until) = until {
                self.backoff_expiry.insert((until, peer, piece));
            }
        }
        self.repend_if_orphaned(piece);
    }

    /// Expires requests older than `request_timeout` (as failures), then fills every peer's
    /// free pipeline: same-site peers first, then other sites, then the origin; among equals,
    /// the peer with fewest in flight first, then at random.
    pub fn next_requests(&mut self, now: Instant) -> Vec<Request<P>> {
        self.expire(now);
        let mut order: Vec<(u8, usize, u32, P)> = self
            .peers
            .iter()
            .map(|(&peer, state)| {
                (
                    state.locality.rank(),
                    state.in_flight.len(),
                    self.rng.random::<u32>(),
                    peer,
                )
            })
            .collect();
        order.sort_unstable();
        let mut out = Vec::new();
        for (_, _, _, peer) in order {
            self.fill_peer(peer, now, &mut out);
        }
        out
    }

    /// Every wanted piece is held.
    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// No wanted piece is left to request, but some are in flight: idle peers may get
    /// duplicates.
    pub fn in_endgame(&self) -> bool {
        self.pending.is_empty() && !self.in_flight.is_empty()
    }

    /// Wanted pieces not held yet (in flight or not).
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Wanted pieces neither held nor in flight.
    pub fn pending_count(&self) -> u32 {
        self.pending.len() as u32
    }

    /// Pieces held (completed or marked), wanted or not.
    pub fn have_count(&self) -> u32 {
        self.have_count
    }

    pub fn has_piece(&self, piece: PieceIndex) -> bool {
        self.pieces.get(piece as usize).is_some_and(|p| p.have)
    }

    /// The priority `piece` is wanted at, if it is.
    pub fn priority(&self, piece: PieceIndex) -> Option<Priority> {
        self.pieces.get(piece as usize).and_then(|p| p.priority)
    }

    pub fn in_flight_count(&self, peer: P) -> u32 {
        self.peers
            .get(&peer)
            .map_or(0, |state| state.in_flight.len() as u32)
    }

    /// Whether some request of `piece` is outstanding.
    pub fn is_in_flight(&self, piece: PieceIndex) -> bool {
        self.in_flight.contains_key(&piece)
    }

    /// The peers `piece` is in flight at, in request order.
    pub fn in_flight_at(&self, piece: PieceIndex) -> Vec<P> {
        self.in_flight
            .get(&piece)
            .map(|copies| copies.iter().map(|c| c.peer).collect())
            .unwrap_or_default()
    }

    /// How many known peers hold `piece`.
    pub fn availability(&self, piece: PieceIndex) -> u32 {
        self.pieces
            .get(piece as usize)
            .map_or(0, |p| p.partial.saturating_add(self.seeds))
    }

    // ---- internals ----

    fn key(&self, piece: PieceIndex) -> Key {
        let state = &self.pieces[piece as usize];
        let priority = state.priority.unwrap_or(Priority::Normal);
        let unavailable = state.partial == 0 && self.seeds == 0;
        let secondary = match priority {
            Priority::Normal => state.partial,
            Priority::Boot | Priority::OnDemand => state.seq,
        };
        Key {
            rank: priority.rank(),
            unavailable,
            secondary,
            tiebreak: mix64(self.tiebreak_seed ^ u64::from(piece)) as u32,
            piece,
        }
    }

    fn insert_pending(&mut self, piece: PieceIndex) {
        self.pieces[piece as usize].pending = true;
        self.pending.insert(self.key(piece));
        for state in self.peers.values_mut() {
            if state.has.get(piece) {
                state.pending_has += 1;
            }
        }
    }

    fn remove_pending(&mut self, piece: PieceIndex) {
        self.pending.remove(&self.key(piece));
        self.pieces[piece as usize].pending = false;
        for state in self.peers.values_mut() {
            if state.has.get(piece) {
                state.pending_has -= 1;
            }
        }
    }

    /// Back to pending if it is wanted, not held and no copy is in flight any more.
    fn repend_if_orphaned(&mut self, piece: PieceIndex) {
        let state = self.pieces[piece as usize];
        if state.priority.is_some()
            && !state.have
            && !state.pending
            && !self.in_flight.contains_key(&piece)
        {
            self.insert_pending(piece);
        }
    }

    /// One non-seed peer more (or fewer) holds `piece`; re-keys it if pending.
    fn change_availability(&mut self, piece: PieceIndex, more: bool) {
        let pending = self.pieces[piece as usize].pending;
        if pending {
            self.pending.remove(&self.key(piece));
        }
        self.bump_partial(piece, more);
        if pending {
            self.pending.insert(self.key(piece));
        }
    }

    fn bump_partial(&mut self, piece: PieceIndex, more: bool) {
        let partial = &mut self.pieces[piece as usize].partial;
        *partial = if more {
            partial.saturating_add(1)
        } else {
            partial.saturating_sub(1)
        };
    }

    /// A non-seed peer's pieces changed from `was` to `is` (canonical bitfield bytes; empty
    /// for nothing). Small changes re-key piece by piece; a change large against the pending set
    /// only updates the counts and returns true: the caller then rebuilds the set in one go,
    /// which is much cheaper than a million re-keyings when a big peer joins.
    fn change_partial(&mut self, was: &[u8], is: &[u8]) -> bool {
        let byte = |bytes: &[u8], i: usize| bytes.get(i).copied().unwrap_or(0);
        let len = was.len().max(is.len());
        let changes: usize = (0..len)
            .map(|i| (byte(was, i) ^ byte(is, i)).count_ones() as usize)
            .sum();
        let bulk = changes > 64 + self.pending.len() / 4;
        for i in 0..len {
            let now_held = byte(is, i);
            let mut changed = byte(was, i) ^ now_held;
            while changed != 0 {
                let bit = changed.trailing_zeros();
                changed &= changed - 1;
                let piece = (i * 8) as PieceIndex + bit;
                let more = now_held & (1 << bit) != 0;
                if bulk {
                    self.bump_partial(piece, more);
                } else {
                    self.change_availability(piece, more);
                }
            }
        }
        bulk
    }

    /// Sets the seed count; true if the pending set must be rebuilt (whether anybody holds a
    /// piece nobody else has just changed for every piece).
    fn set_seeds(&mut self, seeds: u32) -> bool {
        let crossed = (self.seeds == 0) != (seeds == 0);
        self.seeds = seeds;
        crossed
    }

    /// Recomputes every pending key: `O(pieces + pending log pending)`.
    fn rebuild_pending(&mut self) {
        let mut keys: Vec<Key> = (0..self.piece_count)
            .filter(|&p| self.pieces[p as usize].pending)
            .map(|p| self.key(p))
            .collect();
        keys.sort_unstable();
        self.pending = keys.into_iter().collect();
    }

    fn add_copy(&mut self, peer: P, piece: PieceIndex, now: Instant) {
        self.in_flight
            .entry(piece)
            .or_default()
            .push(InFlight { peer, at: now });
        self.by_age.insert((now, piece, peer));
        if let Some(state) = self.peers.get_mut(&peer) {
            state.in_flight.insert(piece);
        }
    }

    /// Forgets the request of `piece` at `peer`; false if there was none.
    fn remove_copy(&mut self, peer: P, piece: PieceIndex) -> bool {
        let Some(copies) = self.in_flight.get_mut(&piece) else {
            return false;
        };
        let Some(pos) = copies.iter().position(|c| c.peer == peer) else {
            return false;
        };
        let copy = copies.remove(pos);
        if copies.is_empty() {
            self.in_flight.remove(&piece);
        }
        self.by_age.remove(&(copy.at, piece, peer));
        if let Some(state) = self.peers.get_mut(&peer) {
            state.in_flight.remove(&piece);
        }
        true
    }

    /// Fails timed-out requests and forgets expired backoffs.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, piece, peer)) = self.by_age.first() {
            match at.checked_add(self.config.request_timeout) {
                Some(deadline) if deadline <= now => self.on_failure(peer, piece, now),
                // Later requests expire later (or overflow too).
                _ => break,
            }
        }
        while let Some(&(until, peer, piece)) = self.backoff_expiry.first() {
            if until > now {
                break;
            }
            self.backoff_expiry.pop_first();
            if let Some(state) = self.peers.get_mut(&peer)
                && state.backoff.get(&piece) == Some(&Some(until))
            {
                state.backoff.remove(&piece);
            }
        }
    }

    fn fill_peer(&mut self, peer: P, now: Instant, out: &mut Vec<Request<P>>) {
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        if state.backoff.len() >= MAX_BACKOFFS_PER_PEER {
            return;
        }
        let limit = state.pipeline.unwrap_or(self.config.pipeline_per_peer);
        let mut room = limit.saturating_sub(state.in_flight.len() as u32);
        let max_span = self.config.max_span.max(1);
        // A peer still busy with requests gets more only once a whole span fits (or half its
        // pipeline, if that is less: the other half keeps it busy meanwhile). Refilled piece
        // by piece as each arrives, every request would hold one piece.
        let refill_at = max_span.min(limit / 2).max(1);
        if !state.in_flight.is_empty() && room < refill_at && !self.pending.is_empty() {
            return;
        }
        let mut walk = Walk::default();
        while room > 0 {
            let Some(state) = self.peers.get(&peer) else {
                return;
            };
            let Some(key) = self.peek_candidate(state, &mut walk, room) else {
                break;
            };
            let first = if key.rank == RANK_NORMAL && self.have_count < self.config.random_first {
                // The walk found a normal piece, so no higher one is left for this peer.
                self.random_normal(peer, &mut walk).unwrap_or(key.piece)
            } else {
                key.piece
            };
            let (first, count) = self.take_span(peer, first, room.min(max_span), now);
            out.push(Request { peer, first, count });
            room -= count;
        }
        if room > 0 && self.pending.is_empty() {
            self.fill_endgame(peer, room, now, out);
        }
    }

    /// The best pending piece `state` can serve, without taking it. Advances the walk past
    /// pieces it cannot serve.
    fn peek_candidate(&self, state: &PeerState, walk: &mut Walk, room: u32) -> Option<Key> {
        if let Some(list) = &mut walk.fallback {
            // Entries taken since (by a span or a random pick) are no longer pending.
            while let Some(key) = list.front() {
                if self.pieces[key.piece as usize].pending {
                    return Some(*key);
                }
                list.pop_front();
            }
            return None;
        }
        'restart: loop {
            let lower = walk.after.map_or(Bound::Unbounded, Bound::Excluded);
            for &key in self.pending.range((lower, Bound::Unbounded)) {
                // Every pending piece this peer holds beyond the walk is eligible unless backed
                // off; when all that remain were passed for backoff, nothing is left.
                if state.pending_has <= walk.backed_off {
                    return None;
                }
                if walk.passed >= SCAN_BUDGET {
                    let list = self.best_from_bitfield(state, walk.after, room);
                    walk.fallback = Some(list);
                    return self.peek_candidate(state, walk, room);
                }
                if key.unavailable {
                    walk.after = Some(Key::end_of_unavailable(key.rank));
                    walk.passed += 1;
                    continue 'restart;
                }
                if !state.has.get(key.piece) {
                    walk.after = Some(key);
                    walk.passed += 1;
                    continue;
                }
                if state.backoff.contains_key(&key.piece) {
                    walk.after = Some(key);
                    walk.passed += 1;
                    walk.backed_off += 1;
                    continue;
                }
                return Some(key);
            }
            return None;
        }
    }

    /// The `room` best keys after `after` that the peer can serve, ascending, found from its
    /// own bitfield.
    fn best_from_bitfield(
        &self,
        state: &PeerState,
        after: Option<Key>,
        room: u32,
    ) -> VecDeque<Key> {
        let room = room as usize;
        let mut heap = BinaryHeap::with_capacity(room + 1);
        for piece in set_bits(state.has.as_bytes()) {
            if !self.pieces[piece as usize].pending || state.backoff.contains_key(&piece) {
                continue;
            }
            let key = self.key(piece);
            if after.is_some_and(|after| key <= after) {
                continue;
            }
            if heap.len() < room {
                heap.push(key);
            } else if heap.peek().is_some_and(|worst| key < *worst) {
                heap.pop();
                heap.push(key);
            }
        }
        heap.into_sorted_vec().into()
    }

    /// Random-first phase: a normal pending piece the peer can serve, uniformly at random.
    fn random_normal(&mut self, peer: P, walk: &mut Walk) -> Option<PieceIndex> {
        let Self {
            rng,
            peers,
            pieces,
            piece_count,
            ..
        } = self;
        let state = peers.get(&peer)?;
        if *piece_count == 0 {
            return None;
        }
        let eligible = |piece: PieceIndex| {
            let p = &pieces[piece as usize];
            p.pending
                && p.priority == Some(Priority::Normal)
                && state.has.get(piece)
                && !state.backoff.contains_key(&piece)
        };
        if walk.random_pool.is_none() {
            for _ in 0..RANDOM_PROBES {
                let piece = rng.random_range(0..*piece_count);
                if eligible(piece) {
                    return Some(piece);
                }
            }
            // Few eligible pieces: list them once for this fill and draw among them, so a deep
            // pipeline costs one pass over the bitfield, not one per pick.
            walk.random_pool = Some(
                set_bits(state.has.as_bytes())
                    .filter(|&p| eligible(p))
                    .collect(),
            );
        }
        let pool = walk.random_pool.as_mut()?;
        // Entries taken since (by a span) are dropped as they come up; the draw stays uniform.
        while !pool.is_empty() {
            let piece = pool.swap_remove(rng.random_range(0..pool.len()));
            if eligible(piece) {
                return Some(piece);
            }
        }
        None
    }

    /// Takes `piece` and the pending pieces next to it that `peer` holds at the same priority,
    /// within `piece`'s aligned group of `max_span` pieces and at most `limit` of them: the
    /// span `(first, count)` of one request.
    ///
    /// Why groups: rarest-first picks pieces scattered over the version, and a span that only
    /// grows forward from its pick then holds one piece almost always; every request is a
    /// stream with its own setup, which at 64 KiB pieces cost more than the bytes. Taking the
    /// whole group around the pick keeps what peers hold group-shaped, so later spans are whole
    /// groups too (BitTorrent's blocks of a piece, one level up).
    fn take_span(
        &mut self,
        peer: P,
        piece: PieceIndex,
        limit: u32,
        now: Instant,
    ) -> (PieceIndex, u32) {
        let priority = self.pieces[piece as usize].priority;
        let group = self.config.max_span.max(1);
        let group_start = piece - piece % group;
        let group_end = group_start.saturating_add(group).min(self.piece_count);
        let joins = |this: &Self, index: PieceIndex| {
            let p = &this.pieces[index as usize];
            p.pending
                && p.priority == priority
                && this
                    .peers
                    .get(&peer)
                    .is_some_and(|s| s.has.get(index) && !s.backoff.contains_key(&index))
        };
        let limit = limit.max(1);
        let mut first = piece;
        while first > group_start && piece - first + 1 < limit && joins(self, first - 1) {
            first -= 1;
        }
        let mut end = piece + 1;
        while end < group_end && end - first < limit && joins(self, end) {
            end += 1;
        }
        for index in first..end {
            self.remove_pending(index);
            self.add_copy(peer, index, now);
        }
        (first, end - first)
    }

    /// Endgame: duplicates of in-flight pieces for a peer with free pipeline, most urgent
    /// first, then fewest copies, then oldest request.
    fn fill_endgame(&mut self, peer: P, room: u32, now: Instant, out: &mut Vec<Request<P>>) {
        let max_copies = self.config.endgame_duplicates as usize;
        if max_copies < 2 {
            return;
        }
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        let mut candidates: Vec<(u8, usize, Instant, PieceIndex)> = Vec::new();
        for (&piece, copies) in &self.in_flight {
            let p = &self.pieces[piece as usize];
            let Some(priority) = p.priority else {
                continue;
            };
            if p.have
                || copies.len() >= max_copies
                || copies.iter().any(|c| c.peer == peer)
                || !state.has.get(piece)
                || state.backoff.contains_key(&piece)
            {
                continue;
            }
            let Some(oldest) = copies.iter().map(|c| c.at).min() else {
                continue;
            };
            if now.saturating_duration_since(oldest) < self.config.endgame_min_age {
                continue;
            }
            candidates.push((priority.rank(), copies.len(), oldest, piece));
        }
        candidates.sort_unstable();
        for &(_, _, _, piece) in candidates.iter().take(room as usize) {
            self.add_copy(peer, piece, now);
            out.push(Request {
                peer,
                first: piece,
                count: 1,
            });
        }
    }

    /// Recomputes every derived count and index from scratch and panics on a mismatch.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut remaining = 0;
        let mut have = 0;
        for (i, p) in self.pieces.iter().enumerate() {
            let i = i as u32;
            let partial = self.peers.values().filter(|s| !s.seed && s.has.get(i));
            assert_eq!(p.partial, partial.count() as u32, "availability of {i}");
            let should_pend = p.priority.is_some() && !p.have && !self.in_flight.contains_key(&i);
            assert_eq!(p.pending, should_pend, "pending flag of {i}");
            assert_eq!(self.pending.contains(&self.key(i)), p.pending, "key of {i}");
            remaining += u32::from(p.priority.is_some() && !p.have);
            have += u32::from(p.have);
        }
        assert_eq!(
            self.pending.len(),
            self.pieces.iter().filter(|p| p.pending).count()
        );
        assert_eq!(self.remaining, remaining);
        assert_eq!(self.have_count, have);
        let mut ages = BTreeSet::new();
        for (&piece, copies) in &self.in_flight {
            assert!(!copies.is_empty());
            for c in copies {
                assert!(self.peers[&c.peer].in_flight.contains(&piece));
                ages.insert((c.at, piece, c.peer));
            }
        }
        assert_eq!(ages, self.by_age);
        let mut expiry = BTreeSet::new();
        assert_eq!(
            self.seeds,
            self.peers.values().filter(|s| s.seed).count() as u32
        );
        for (&peer, s) in &self.peers {
            assert!(!s.seed || s.has.is_full());
            let pending_has = s
                .has
                .iter_ones()
                .filter(|&i| self.pieces[i as usize].pending);
            assert_eq!(
                s.pending_has,
                pending_has.count() as u32,
                "pending_has of {peer:?}"
            );
            assert_eq!(s.has.len(), self.piece_count);
            for &piece in &s.in_flight {
                assert!(self.in_flight[&piece].iter().any(|c| c.peer == peer));
            }
            for (&piece, &until) in &s.backoff {
                if let Some(until) = until {
                    expiry.insert((until, peer, piece));
                }
            }
        }
        assert_eq!(expiry, self.backoff_expiry);
    }
}

/// Indices of the set bits of a canonical bitfield's bytes, ascending. Walks bytes rather than
/// bits, so sparse or empty stretches cost little.
fn set_bits(bytes: &[u8]) -> impl Iterator<Item = PieceIndex> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|&(_, &byte)| byte != 0)
        .flat_map(|(i, &byte)| {
            let base = (i * 8) as PieceIndex;
            let mut rest = byte;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    base + bit
                })
            })
        })
}

/// SplitMix64's finaliser: a per-piece tiebreak that depends only on the seed.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            random_first: 0,
            ..SchedulerConfig::default()
        }
    }

    fn full(n: u32) -> Bitfield {
        Bitfield::full(n)
    }

    fn bits(n: u32, held: impl IntoIterator<Item = u32>) -> Bitfield {
        let mut b = Bitfield::new(n);
        for i in held {
            b.set(i);
        }
        b
    }

    fn add(s: &mut Scheduler<u32>, peer: u32, locality: Locality, has: &Bitfield) {
        s.add_peer(peer, locality);
        s.peer_bitfield(peer, has);
    }

    /// Every piece named by `reqs`, in order.
    fn pieces(reqs: &[Request<u32>]) -> Vec<u32> {
        reqs.iter().flat_map(|r| r.pieces()).collect()
    }

    #[test]
    fn rarest_first_picks_the_pieces_only_one_peer_has() {
        let n = 10;
        let rare = [3, 7];
        let common = bits(n, (0..n).filter(|i| !rare.contains(i)));
        let mut s = Scheduler::new(
            n,
            SchedulerConfig {
                max_span: 1,
                ..config()
            },
            1,
        );
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        add(&mut s, B, Locality::SameSite, &common);
        add(&mut s, C, Locality::SameSite, &common);
        s.set_pipeline(A, 2);
        s.set_pipeline(B, 0);
        s.set_pipeline(C, 0);
        assert_eq!(s.availability(3), 1);
        assert_eq!(s.availability(4), 3);
        let reqs = s.next_requests(Instant::now());
        let mut got = pieces(&reqs);
        got.sort_unstable();
        assert_eq!(got, rare, "A must be asked for the pieces only it has");
        assert!(reqs.iter().all(|r| r.peer == A));
        s.check_invariants();
    }

    #[test]
    fn random_first_ignores_rarity_until_enough_pieces_are_held() {
        let n = 1000;
        let rare: BTreeSet<u32> = (0..10).collect();
        let common = bits(n, (0..n).filter(|i| !rare.contains(i)));
        let run = |random_first: u32, seed: u64| {
            let cfg = SchedulerConfig {
                random_first,
                max_span: 1,
                ..config()
            };
            let mut s = Scheduler::new(n, cfg, seed);
            s.want_all(Priority::Normal);
            add(&mut s, A, Locality::SameSite, &full(n));
            add(&mut s, B, Locality::SameSite, &common);
            s.set_pipeline(A, 1);
            s.set_pipeline(B, 0);
            s
        };
        let now = Instant::now();
        let mut random_picks = BTreeSet::new();
        for seed in 0..20 {
            let mut s = run(4, seed);
            let first = s.next_requests(now)[0].first;
            random_picks.insert(first);
            // After 4 completions the phase ends: the next pick is rarest again.
            let mut piece = first;
            for _ in 0..4 {
                s.on_complete(A, piece, now);
                let reqs = s.next_requests(now);
                assert_eq!(reqs.len(), 1);
                piece = reqs[0].first;
            }
            assert!(
                rare.contains(&piece),
                "seed {seed}: {piece} after the random phase"
            );
            // Without a random phase, the first pick is rarest.
            let mut s = run(0, seed);
            assert!(rare.contains(&s.next_requests(now)[0].first));
        }
        let outside = random_picks.iter().filter(|p| !rare.contains(p)).count();
        assert!(
            outside >= 15,
            "random picks should mostly miss the 1% rare set: {random_picks:?}"
        );
        assert!(
            random_picks.len() >= 15,
            "random picks should differ by seed: {random_picks:?}"
        );
    }

    #[test]
    fn on_demand_then_boot_in_want_order_then_normal() {
        let n = 20;
        let mut s = Scheduler::new(
            n,
            SchedulerConfig {
                max_span: 1,
                ..config()
            },
            3,
        );
        s.want_all(Priority::Normal);
        for piece in [15, 3, 9] {
            s.want(piece, Priority::Boot);
        }
        s.want(12, Priority::OnDemand);
        s.want(12, Priority::Normal); // never lowers
        s.want(3, Priority::Boot); // same priority: keeps its place
        assert_eq!(s.priority(12), Some(Priority::OnDemand));
        add(&mut s, A, Locality::SameSite, &full(n));
        s.set_pipeline(A, 5);
        let reqs = s.next_requests(Instant::now());
        let got = pieces(&reqs);
        assert_eq!(&got[..4], &[12, 15, 3, 9]);
        assert_eq!(s.priority(got[4]), Some(Priority::Normal));
        s.check_invariants();
    }

    #[test]
    fn higher_priority_piece_the_peer_lacks_does_not_block_it() {
        let n = 8;
        let mut s = Scheduler::new(n, config(), 3);
        s.want_all(Priority::Normal);
        s.want(0, Priority::OnDemand);
        add(&mut s, A, Locality::SameSite, &bits(n, 1..n));
        let reqs = s.next_requests(Instant::now());
        assert!(!pieces(&reqs).contains(&0));
        assert_eq!(pieces(&reqs).len(), 7);
    }

    #[test]
    fn spans_coalesce_adjacent_pieces_and_stop_at_gaps_and_priority_changes() {
        let n = 32;
        let config = || SchedulerConfig {
            max_span: 4,
            pipeline_per_peer: 32,
            ..config()
        };
        let mut s = Scheduler::new(n, config(), 4);
        for piece in 0..12 {
            s.want(piece, Priority::Normal);
        }
        s.want(8, Priority::Boot);
        add(
            &mut s,
            A,
            Locality::SameSite,
            &bits(n, (0..n).filter(|&i| i != 5)),
        );
        let reqs = s.next_requests(Instant::now());
        // Boot piece 8 first, alone (9 is normal).
        assert_eq!(
            reqs[0],
            Request {
                peer: A,
                first: 8,
                count: 1
            }
        );
        let mut got = pieces(&reqs);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
        for r in &reqs {
            assert!(r.count >= 1 && r.count <= 4);
            assert!(
                !r.pieces().contains(&5),
                "no span crosses a piece A lacks: {r:?}"
            );
            assert!(
                r.first >= 8 || r.first + r.count <= 9,
                "no span mixes priorities: {r:?}"
            );
        }
        assert!(
            reqs.len() < got.len(),
            "some pieces were coalesced: {reqs:?}"
        );

        // In want order (a boot profile read front to back) the spans are as long as allowed.
        let mut s = Scheduler::new(n, config(), 4);
        for piece in 0..12 {
            s.want(piece, Priority::Boot);
        }
        s.want_all(Priority::Normal);
        add(
            &mut s,
            A,
            Locality::SameSite,
            &bits(n, (0..n).filter(|&i| i != 5)),
        );
        s.set_pipeline(A, 10);
        let span = |first, count| Request {
            peer: A,
            first,
            count,
        };
        assert_eq!(
            s.next_requests(Instant::now()),
            vec![span(0, 4), span(4, 1), span(6, 2), span(8, 3)],
            "spans stop at their aligned group's end, at a gap, and at the pipeline's end"
        );
    }

    #[test]
    fn a_pick_inside_a_group_takes_the_group_around_it() {
        let n = 32;
        let config = SchedulerConfig {
            max_span: 8,
            pipeline_per_peer: 8,
            random_first: 0,
            ..config()
        };
        let mut s = Scheduler::new(n, config, 4);
        s.want_all(Priority::Normal);
        // Piece 13 is the rarest (only A has it), so A, asked first (same site), is asked for
        // it first; the rest of its group (8..16) is as common as anything else and joins it,
        // before and after the pick.
        add(&mut s, A, Locality::SameSite, &bits(n, 0..n));
        add(
            &mut s,
            B,
            Locality::OtherSite,
            &bits(n, (0..n).filter(|&i| i != 13)),
        );
        let reqs = s.next_requests(Instant::now());
        let at_a: Vec<_> = reqs.iter().filter(|r| r.peer == A).collect();
        assert_eq!(
            at_a.first().map(|r| (r.first, r.count)),
            Some((8, 8)),
            "{reqs:?}"
        );
        for r in &reqs {
            assert_eq!(
                r.first / 8,
                (r.first + r.count - 1) / 8,
                "no span crosses a group boundary: {r:?}"
            );
        }
    }

    #[test]
    fn pipeline_limit_and_per_peer_override() {
        let n = 100;
        let mut s = Scheduler::new(
            n,
            SchedulerConfig {
                pipeline_per_peer: 3,
                ..config()
            },
            5,
        );
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        let now = Instant::now();
        let reqs = s.next_requests(now);
        assert_eq!(pieces(&reqs).len(), 3);
        assert_eq!(s.in_flight_count(A), 3);
        assert!(s.next_requests(now).is_empty(), "pipeline full");
        s.on_complete(A, reqs[0].first, now);
        assert_eq!(pieces(&s.next_requests(now)).len(), 1);
        s.set_pipeline(A, 10);
        assert_eq!(pieces(&s.next_requests(now)).len(), 7);
        assert_eq!(s.in_flight_count(A), 10);
        s.set_pipeline(A, 2); // lowering never cancels, it only stops new requests
        assert!(s.next_requests(now).is_empty());
        assert_eq!(s.in_flight_count(A), 10);
    }

    #[test]
    fn endgame_duplicates_and_cancels() {
        let n = 4;
        let cfg = SchedulerConfig {
            max_span: 1,
            endgame_min_age: Duration::from_secs(1),
            ..config()
        };
        let mut s = Scheduler::new(n, cfg, 6);
        s.want_all(Priority::Normal);
        for peer in [A, B, C] {
            add(&mut s, peer, Locality::SameSite, &full(n));
        }
        s.set_pipeline(A, 4);
        s.set_pipeline(B, 0);
        s.set_pipeline(C, 0);
        let t0 = Instant::now();
        assert_eq!(pieces(&s.next_requests(t0)).len(), 4);
        assert!(s.in_endgame());
        s.set_pipeline(B, 4);
        s.set_pipeline(C, 4);
        assert!(
            s.next_requests(t0).is_empty(),
            "requests just sent are not late yet"
        );
        let t1 = t0 + Duration::from_secs(1);
        let dups = s.next_requests(t1);
        assert_eq!(dups.len(), 4, "{dups:?}");
        assert!(dups.iter().all(|r| r.count == 1));
        let dup_peer = dups[0].peer;
        assert!(
            dups.iter().all(|r| r.peer == dup_peer),
            "two copies at most: {dups:?}"
        );
        assert!(s.next_requests(t1 + Duration::from_secs(5)).is_empty());
        for piece in 0..n {
            assert_eq!(s.in_flight_at(piece), vec![A, dup_peer]);
        }
        assert_eq!(s.on_complete(A, 0, t1), vec![(dup_peer, 0)]);
        assert_eq!(s.on_complete(dup_peer, 1, t1), vec![(A, 1)]);
        assert!(s.on_complete(A, 1, t1).is_empty(), "duplicate completion");
        assert_eq!(s.in_flight_count(A), 2);
        assert_eq!(s.in_flight_count(dup_peer), 2);
        assert_eq!(s.remaining(), 2);
        s.check_invariants();
    }

    #[test]
    fn endgame_prefers_fewest_copies_then_oldest() {
        let n = 3;
        let cfg = SchedulerConfig {
            max_span: 1,
            endgame_duplicates: 3,
            endgame_min_age: Duration::ZERO,
            ..config()
        };
        let mut s = Scheduler::new(n, cfg, 7);
        s.want_all(Priority::Normal);
        for peer in [A, B, C] {
            add(&mut s, peer, Locality::SameSite, &full(n));
            s.set_pipeline(peer, 0);
        }
        let t0 = Instant::now();
        s.set_pipeline(A, 1);
        let first = s.next_requests(t0)[0].first;
        s.set_pipeline(A, 3);
        let later = s.next_requests(t0 + Duration::from_secs(1));
        assert_eq!(pieces(&later).len(), 2);
        s.set_pipeline(B, 1);
        let dup = s.next_requests(t0 + Duration::from_secs(2));
        assert_eq!(
            dup,
            vec![Request {
                peer: B,
                first,
                count: 1
            }],
            "oldest first"
        );
        s.set_pipeline(C, 1);
        let dup = s.next_requests(t0 + Duration::from_secs(2));
        assert_eq!(dup.len(), 1);
        assert_ne!(dup[0].first, first, "fewest copies first");
    }

    #[test]
    fn timeouts_fail_requests_and_another_peer_takes_over() {
        let n = 1;
        let cfg = SchedulerConfig {
            endgame_duplicates: 1,
            ..config()
        };
        let timeout = cfg.request_timeout;
        let mut s = Scheduler::new(n, cfg, 8);
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        add(&mut s, B, Locality::Origin, &full(n));
        let t0 = Instant::now();
        assert_eq!(
            s.next_requests(t0),
            vec![Request {
                peer: A,
                first: 0,
                count: 1
            }]
        );
        let almost = t0 + timeout - Duration::from_millis(1);
        assert!(s.next_requests(almost).is_empty());
        assert_eq!(s.in_flight_count(A), 1);
        let reqs = s.next_requests(t0 + timeout);
        assert_eq!(
            reqs,
            vec![Request {
                peer: B,
                first: 0,
                count: 1
            }]
        );
        assert_eq!(s.in_flight_count(A), 0);
        assert!(s.is_in_flight(0));
        // A late answer from A is still welcome; B's copy is then cancelled.
        assert_eq!(s.on_complete(A, 0, t0 + timeout), vec![(B, 0)]);
        assert!(s.is_done());
        s.check_invariants();
    }

    #[test]
    fn failed_peer_is_not_asked_again_before_retry_after() {
        let n = 2;
        let cfg = SchedulerConfig {
            max_span: 1,
            ..config()
        };
        let retry = cfg.retry_after;
        let mut s = Scheduler::new(n, cfg, 9);
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        let t0 = Instant::now();
        assert_eq!(pieces(&s.next_requests(t0)).len(), 2);
        s.on_failure(A, 1, t0);
        s.on_complete(A, 0, t0);
        assert!(!s.is_in_flight(1));
        assert!(
            s.next_requests(t0 + retry - Duration::from_millis(1))
                .is_empty()
        );
        // Another peer may have it at once.
        add(&mut s, B, Locality::Origin, &full(n));
        let reqs = s.next_requests(t0 + Duration::from_secs(1));
        assert_eq!(
            reqs,
            vec![Request {
                peer: B,
                first: 1,
                count: 1
            }]
        );
        s.on_failure(B, 1, t0 + Duration::from_secs(1));
        let reqs = s.next_requests(t0 + retry);
        assert_eq!(
            reqs,
            vec![Request {
                peer: A,
                first: 1,
                count: 1
            }]
        );
        s.check_invariants();
    }

    #[test]
    fn remove_peer_returns_its_pieces_to_pending() {
        let n = 10;
        let mut s = Scheduler::new(
            n,
            SchedulerConfig {
                pipeline_per_peer: 4,
                ..config()
            },
            10,
        );
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        let t0 = Instant::now();
        let mut asked = pieces(&s.next_requests(t0));
        asked.sort_unstable();
        assert_eq!(s.availability(0), 1);
        assert_eq!(s.remove_peer(A), asked);
        assert!(s.remove_peer(A).is_empty(), "second removal is a no-op");
        assert_eq!(s.availability(0), 0);
        assert!(asked.iter().all(|&p| !s.is_in_flight(p)));
        assert_eq!(s.pending_count(), n);
        add(&mut s, B, Locality::SameSite, &full(n));
        s.set_pipeline(B, n);
        assert_eq!(pieces(&s.next_requests(t0)).len(), n as usize);
        s.check_invariants();
    }

    #[test]
    fn marked_pieces_are_never_requested() {
        let n = 10;
        let mut s = Scheduler::new(n, config(), 11);
        s.mark_have(2);
        s.want_all(Priority::Normal);
        s.mark_have(7);
        s.mark_have(7);
        s.want(7, Priority::OnDemand);
        assert_eq!(s.remaining(), 8);
        add(&mut s, A, Locality::SameSite, &full(n));
        let got = pieces(&s.next_requests(Instant::now()));
        assert_eq!(got.len(), 8);
        assert!(!got.contains(&2) && !got.contains(&7));
        s.check_invariants();
    }

    #[test]
    fn same_site_first_then_fewest_in_flight() {
        let n = 64;
        let mut s = Scheduler::new(n, config(), 12);
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::Origin, &full(n));
        add(&mut s, B, Locality::OtherSite, &full(n));
        add(&mut s, C, Locality::SameSite, &full(n));
        s.set_pipeline(C, n);
        let reqs = s.next_requests(Instant::now());
        assert!(reqs.iter().all(|r| r.peer == C));
        assert_eq!(pieces(&reqs).len(), n as usize);
    }

    #[test]
    fn nothing_panics_on_garbage() {
        let t = Instant::now();
        let mut s = Scheduler::new(4, config(), 13);
        s.want(99, Priority::Boot);
        s.mark_have(u32::MAX);
        s.peer_have(A, 0);
        s.peer_bitfield(A, &full(4));
        s.set_pipeline(A, 3);
        s.on_failure(A, 0, t);
        assert!(s.on_complete(A, 99, t).is_empty());
        assert!(s.remove_peer(A).is_empty());
        assert_eq!(s.in_flight_count(A), 0);
        assert_eq!(s.availability(1000), 0);
        assert!(!s.is_in_flight(1000));
        s.want_all(Priority::Normal);
        s.add_peer(A, Locality::SameSite);
        s.peer_have(A, 4); // out of range
        s.peer_bitfield(A, &full(100)); // too long: extra ignored
        assert_eq!(s.availability(3), 1);
        s.peer_bitfield(A, &full(2)); // too short: missing not held
        assert_eq!(s.availability(3), 0);
        assert_eq!(s.availability(1), 1);
        s.add_peer(A, Locality::Origin); // re-adding keeps its state
        assert_eq!(s.availability(1), 1);
        let mut asked = pieces(&s.next_requests(t));
        asked.sort_unstable();
        assert_eq!(asked, vec![0, 1]);
        s.on_failure(B, 0, t); // not asked
        s.on_failure(A, 2, t); // not in flight at A
        assert!(s.is_in_flight(0));
        // A piece nobody was asked for still counts once verified.
        assert!(s.on_complete(B, 3, t).is_empty());
        assert!(s.has_piece(3));
        assert_eq!(s.on_complete(A, 0, t), vec![]);
        assert!(s.on_complete(A, 0, t).is_empty());
        // Extreme durations and a clock going backwards.
        let mut s2 = Scheduler::new(
            3,
            SchedulerConfig {
                request_timeout: Duration::MAX,
                retry_after: Duration::MAX,
                endgame_min_age: Duration::MAX,
                max_span: 0,
                pipeline_per_peer: u32::MAX,
                endgame_duplicates: u32::MAX,
                random_first: u32::MAX,
            },
            14,
        );
        s2.want_all(Priority::Boot);
        s2.add_peer(A, Locality::SameSite);
        s2.peer_bitfield(A, &full(3));
        let reqs = s2.next_requests(t + Duration::from_secs(100));
        assert!(reqs.iter().all(|r| r.count == 1));
        s2.on_failure(A, 0, t);
        assert!(s2.next_requests(t).iter().all(|r| r.first != 0));
        s2.check_invariants();
        // Empty and oversized versions.
        let mut empty: Scheduler<u32> = Scheduler::new(0, config(), 0);
        empty.want_all(Priority::OnDemand);
        empty.add_peer(A, Locality::SameSite);
        assert!(empty.next_requests(t).is_empty());
        assert!(empty.is_done() && !empty.in_endgame());
        let big: Scheduler<u32> = Scheduler::new(u32::MAX, config(), 0);
        assert_eq!(u64::from(big.piece_count()), MAX_PIECES);
        s.check_invariants();
    }

    #[test]
    fn a_peer_failing_everything_is_paused_and_its_backoffs_stay_bounded() {
        let n = MAX_BACKOFFS_PER_PEER as u32 + 100;
        let mut s = Scheduler::new(
            n,
            SchedulerConfig {
                pipeline_per_peer: 1000,
                ..config()
            },
            15,
        );
        s.want_all(Priority::Normal);
        add(&mut s, A, Locality::SameSite, &full(n));
        let t = Instant::now();
        for _ in 0..10 {
            for r in s.next_requests(t) {
                for piece in r.pieces() {
                    s.on_failure(A, piece, t);
                }
            }
        }
        let backoffs = s.peers[&A].backoff.len();
        assert!(backoffs >= MAX_BACKOFFS_PER_PEER);
        assert!(backoffs < MAX_BACKOFFS_PER_PEER + 1000);
        assert!(s.next_requests(t).is_empty(), "paused");
        // Once the backoffs expire it is asked again, and the table empties.
        let later = t + s.config.retry_after;
        assert!(!s.next_requests(later).is_empty());
        assert!(s.peers[&A].backoff.is_empty());
        s.check_invariants();
    }

    /// Random operations, including nonsense, keep every internal index consistent.
    #[test]
    fn random_operations_keep_internal_state_consistent() {
        use rand::RngExt;
        for seed in 0..40u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let n = rng.random_range(1..200u32);
            let cfg = SchedulerConfig {
                pipeline_per_peer: rng.random_range(0..20),
                max_span: rng.random_range(0..6),
                random_first: rng.random_range(0..6),
                endgame_duplicates: rng.random_range(0..4),
                endgame_min_age: Duration::from_millis(rng.random_range(0..3000)),
                request_timeout: Duration::from_secs(rng.random_range(1..40)),
                retry_after: Duration::from_secs(rng.random_range(0..20)),
            };
            let mut s: Scheduler<u8> = Scheduler::new(n, cfg, seed);
            let mut now = Instant::now();
            let prio = |r: u32| match r % 3 {
                0 => Priority::Normal,
                1 => Priority::Boot,
                _ => Priority::OnDemand,
            };
            for _ in 0..400 {
                let peer = rng.random_range(0..6u8);
                let piece = rng.random_range(0..n + 5);
                match rng.random_range(0..14u32) {
                    0 => s.want(piece, prio(rng.random())),
                    1 => s.want_all(prio(rng.random())),
                    2 => s.mark_have(piece),
                    3 => s.add_peer(peer, Locality::SameSite),
                    4 => {
                        s.remove_peer(peer);
                    }
                    5 => {
                        let len = rng.random_range(0..n + 10);
                        if rng.random_bool(0.3) {
                            // A seed (when len >= n): counted apart from the rest.
                            s.peer_bitfield(peer, &full(len));
                        } else {
                            let density = rng.random_range(0..=100u32);
                            let held = (0..len).filter(|_| rng.random_range(0..100) < density);
                            s.peer_bitfield(peer, &bits(len, held));
                        }
                    }
                    6 => s.peer_have(peer, piece),
                    7 => s.set_pipeline(peer, rng.random_range(0..30)),
                    8 => {
                        s.on_complete(peer, piece, now);
                    }
                    9 => s.on_failure(peer, piece, now),
                    10 => now += Duration::from_millis(rng.random_range(0..5000)),
                    _ => {
                        // Answer some of what was asked, as a node would.
                        for r in s.next_requests(now) {
                            for p in r.pieces() {
                                match rng.random_range(0..4u32) {
                                    0 => {
                                        s.on_complete(r.peer, p, now);
                                    }
                                    1 => s.on_failure(r.peer, p, now),
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                s.check_invariants();
            }
        }
    }
}
