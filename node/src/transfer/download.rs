//! Downloading one version: the protocol's scheduler driven by real peers and streams.
//!
//! Locality: peers of this node's site are shown to the scheduler with everything they hold;
//! peers of other sites and the origin only with the pieces this node brings across for its
//! site ([`Crossing`]), until the site stalls for [`SITE_PATIENCE`] or its peers answer "busy"
//! again and again (saturated). So a version crosses a site's WAN link about once, then spreads
//! inside the site.
//!
//! One task per version owns the [`Scheduler`]; it learns availability from the node (a
//! bitfield when a peer becomes interesting, batched haves after), sends each request it gets
//! back as one piece stream in a task of its own, and hears back per piece. Every piece is
//! verified by the store before it counts; a peer that sends a bad piece is banned and its
//! pieces are fetched elsewhere. In the endgame a piece may be asked of two peers; once one
//! copy arrives, a fetch left transferring only pieces already held is stopped. Progress is checkpointed about once a second, so a killed
//! download resumes without fetching a verified piece again.
//!
//! ```text
//!  node ──DownloadEvent──> download task ──Request──> fetch task ──stream──> peer
//!                              ▲                          │ verify + write (store)
//!                              └────── PieceOutcome ──────┘
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::AsyncReadExt;
use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::crossing::Crossing;
use imiswarm_protocol::limits::MAX_HAVE_BATCH;
use imiswarm_protocol::manifest::PieceIndex;
use imiswarm_protocol::scheduler::{Locality, Priority, Request, Scheduler, SchedulerConfig};
use imiswarm_protocol::wire::{
    HaveMessage, PieceFrame, PieceRequest, PieceResponseHeader, PieceStatus,
};
use libp2p::PeerId;
use tokio::sync::{mpsc, watch};

use crate::library::Library;
use crate::net::codec::{read_header, write_header};
use crate::net::{NetHandle, PIECES};
use crate::store::{CompleteVersion, PartialVersion, StoreError};
use crate::transfer::haves::HaveSender;
use crate::transfer::ratelimit::RateLimiter;
use crate::transfer::stream_pool::StreamPool;

/// How long a peer that sent a corrupt piece is refused.
pub const BAN_FOR: Duration = Duration::from_secs(600);
/// How often verified progress is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long a peer that could not serve a piece is not asked for it again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// The tail of a download: once the pieces left would arrive within this time at the current
/// receive rate, every peer's pipeline is cut to [`TAIL_PIPELINE`] pieces.
///
/// Why: the last pieces of a rollout are the ones the origin sent last, each at one holder
/// that every other receiver asks. With the full pipeline (16 pieces per peer), a request for
/// such a piece waits at the holder behind up to a second of other receivers' older requests;
/// shallow pipelines keep those queues short, so the fresh pieces spread hop by hop without
/// waiting. Only the tail: in bulk, deep pipelines and long spans keep the per-request cost
/// low (a rate-sized pipeline for the whole download made the benchmark slower, 1.31 against
/// 1.24). Benchmark, 8 interleaved runs each: median T/T_min 1.20 against 1.26.
const TAIL_WITHIN: Duration = Duration::from_millis(1500);
/// Pieces in flight per peer in the tail (see [`TAIL_WITHIN`]).
const TAIL_PIPELINE: u32 = 4;
/// How old a request must be before the endgame asks another peer for the same piece.
const ENDGAME_MIN_AGE: Duration = Duration::from_millis(500);
/// Longest wait for the next header or piece bytes on a piece stream.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often timeouts are checked and progress is published.
const TICK: Duration = Duration::from_millis(100);
/// How often verified pieces are announced to interested peers: one message per peer each
/// time, on the haves stream. At the end of a rollout the last pieces the origin sent spread
/// from one holder each to the whole site in a few hops, and every hop waits for its have:
/// every 250 ms (when each have was a control exchange of its own) left the median benchmark
/// about 1% slower than every tick.
const HAVE_EVERY: Duration = Duration::from_millis(100);
/// With nothing in flight for this long while pieces are missing, the site has stalled: every
/// piece may then come from other sites or the origin.
pub const SITE_PATIENCE: Duration = Duration::from_secs(3);
/// How long a new download waits for its site's peers to say what they hold before it asks
/// other sites or the origin for anything (it stops waiting as soon as a same-site peer holds
/// everything). A cache server mostly fetches from other sites: it waits little.
pub const SITE_SETTLE: Duration = Duration::from_millis(200);
/// A booting workstation's cache server is usually at its site and already holds the version,
/// but the workstation may still be connecting to it: it waits longer before asking the origin.
pub const WORKSTATION_SITE_SETTLE: Duration = Duration::from_secs(1);
/// This many "busy" answers from same-site peers within [`SITE_PATIENCE`] mean they are
/// saturated: every piece may then come from other sites too.
const SITE_SATURATED_BUSY: usize = 16;

/// What the node tells a download.
#[derive(Debug)]
pub enum DownloadEvent {
    /// A peer's full availability (answer to an availability request).
    Availability {
        peer: PeerId,
        bitfield: Bitfield,
        locality: Locality,
        /// The peer's site label, for counting the bytes that cross between sites.
        site: String,
    },
    /// A peer now also holds these pieces.
    Have {
        peer: PeerId,
        pieces: Vec<PieceIndex>,
    },
    /// The peer disconnected.
    PeerGone { peer: PeerId },
    /// The peer asked for our availability and was `told` what we held then: it wants our
    /// haves from now on.
    Interested { peer: PeerId, told: Bitfield },
}

/// Where a download stands, for status and progress bars.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DownloadProgress {
    pub verified_pieces: u32,
    pub total_pieces: u32,
    /// Peers that hold some of this version.
    pub peers: u32,
    /// Piece bytes this download received from the network.
    pub received_bytes: u64,
    /// Recent receive rate (exponentially weighted over about two seconds).
    pub rate_bytes_per_sec: u64,
    /// Who sent the most, largest first (at most eight).
    pub sources: Vec<Source>,
    /// Same-site peers downloading this version too, with whom crossing is split.
    pub site_mates: u32,
    /// Whether every piece may now come from other sites (the site stalled, or has no mates).
    pub crossing_open: bool,
}

/// Bytes received from one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub peer: String,
    pub bytes: u64,
}

/// Shared counters.
#[derive(Debug, Default)]
pub struct DownloadStats {
    /// Piece bytes received from the network (including duplicates and bad pieces).
    pub received_bytes: AtomicU64,
    /// Piece bytes taken from an older local version instead of the network.
    pub reused_bytes: AtomicU64,
    pub bad_pieces: AtomicU64,
    /// Piece bytes received, by the sending peer's site.
    pub by_site: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl DownloadStats {
    fn add_from_site(&self, site: &str, bytes: u64) {
        let mut by_site = self.by_site.lock().unwrap_or_else(|e| e.into_inner());
        match by_site.get_mut(site) {
            Some(n) => *n += bytes,
            None => {
                by_site.insert(site.to_owned(), bytes);
            }
        }
    }

    /// Bytes received by sending site.
    pub fn by_site(&self) -> BTreeMap<String, u64> {
        self.by_site
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Everything a download needs from the node.
#[derive(Debug, Clone)]
pub struct DownloadContext {
    pub net: NetHandle,
    /// Where verified pieces are announced to interested peers.
    pub haves: HaveSender,
    pub library: Arc<Library>,
    pub limiter: Arc<RateLimiter>,
    pub stats: Arc<DownloadStats>,
    /// How long a new download waits to hear from its site (see [`SITE_SETTLE`]).
    pub site_settle: Duration,
    /// Piece streams kept for the next request.
    pub streams: StreamPool,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the node is shutting down")]
    Stopped,
}

/// Why a piece did not arrive from a peer.
#[derive(Debug)]
enum Failure {
    /// Every upload slot of the peer is taken: try elsewhere.
    Busy,
    /// The peer said missing or unknown, or the stream broke: try elsewhere.
    Soft(String),
    /// The peer sent bytes that do not match the hash, or violated the protocol: ban it.
    Bad(String),
    /// Our own disk failed: stop the download.
    Fatal(StoreError),
}

#[derive(Debug)]
struct PieceOutcome {
    /// The fetch task that reports it.
    fetch: u64,
    peer: PeerId,
    piece: PieceIndex,
    result: Result<usize, Failure>,
}

/// A running fetch task: what it has not reported yet, and how to stop it.
#[derive(Debug)]
struct Fetch {
    peer: PeerId,
    unreported: BTreeSet<PieceIndex>,
    abort: tokio::task::AbortHandle,
}

/// The running fetches of a download, by id. Dropping it stops them all, so a download that
/// ends early (stopped, or its disk failed) leaves nothing writing into its files.
#[derive(Debug, Default)]
struct Fetches(HashMap<u64, Fetch>);

impl Drop for Fetches {
    fn drop(&mut self) {
        for fetch in self.0.values() {
            fetch.abort.abort();
        }
    }
}

impl std::ops::Deref for Fetches {
    type Target = HashMap<u64, Fetch>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Fetches {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `piece` arrived, and its other copies at `peer` were dropped by the scheduler: a fetch from
/// `peer` that now only transfers pieces already held is stopped, so its bytes go to pieces
/// still missing (in the endgame, most of a receiver's duplicates would otherwise arrive in
/// full). Returns how many pieces the stopped fetches will no longer report.
fn stop_duplicates(
    fetches: &mut HashMap<u64, Fetch>,
    scheduler: &Scheduler<PeerId>,
    peer: PeerId,
    piece: PieceIndex,
) -> u32 {
    let mut dropped = 0;
    fetches.retain(|_, fetch| {
        let useless = fetch.peer == peer
            && fetch.unreported.contains(&piece)
            && fetch.unreported.iter().all(|&p| scheduler.has_piece(p));
        if useless {
            fetch.abort.abort();
            dropped += fetch.unreported.len() as u32;
        }
        !useless
    });
    dropped
}

/// Everything learned of what each peer holds, from its availability answers and its haves
/// together. The two travel on different streams: a have can arrive before the answer it
/// follows (the answer's peer is then unknown to the scheduler, which would drop it), and a
/// later answer can be older than haves already here. A peer never drops a piece, so what is
/// learned is merged, never replaced. Lost, such a have left a piece nobody seemed to hold
/// until the download stalled and asked every peer again.
#[derive(Debug)]
struct Learned {
    pieces: u32,
    by_peer: HashMap<PeerId, Bitfield>,
}

impl Learned {
    fn new(pieces: u32) -> Self {
        Self {
            pieces,
            by_peer: HashMap::new(),
        }
    }

    /// Merges an availability answer; returns all the peer is known to hold.
    fn answer(&mut self, peer: PeerId, held: &Bitfield) -> Bitfield {
        let known = self
            .by_peer
            .entry(peer)
            .or_insert_with(|| Bitfield::new(self.pieces));
        known.union_with(held);
        known.clone()
    }

    /// Records a have (out-of-range pieces are ignored).
    fn have(&mut self, peer: PeerId, pieces: &[PieceIndex]) {
        let known = self
            .by_peer
            .entry(peer)
            .or_insert_with(|| Bitfield::new(self.pieces));
        for &piece in pieces {
            known.set(piece);
        }
    }

    /// The peer is gone (or banned): it starts afresh if it comes back.
    fn forget(&mut self, peer: &PeerId) {
        self.by_peer.remove(peer);
    }
}

/// What a peer that was `told` our holdings has not heard of: pieces verified since, that are
/// not `pending` (those reach it with the next flush of haves). Pieces verified after the
/// answer was taken, and announced before the download heard of the peer, would otherwise
/// never reach it.
fn untold(verified: &Bitfield, told: &Bitfield, pending: &BTreeSet<PieceIndex>) -> Vec<PieceIndex> {
    verified
        .iter_ones()
        .filter(|&p| !told.get(p) && !pending.contains(&p))
        .collect()
}

/// Whether the pieces left would arrive within [`TAIL_WITHIN`] at the current receive rate.
fn near_the_end(remaining: u32, piece_size: u32, bytes_per_sec: f64) -> bool {
    bytes_per_sec > 0.0
        && f64::from(remaining) * f64::from(piece_size) <= bytes_per_sec * TAIL_WITHIN.as_secs_f64()
}

/// An exponentially weighted receive rate, updated every tick.
#[derive(Debug, Default)]
struct RateMeter {
    pending: u64,
    per_sec: f64,
}

impl RateMeter {
    fn add(&mut self, bytes: u64) {
        self.pending += bytes;
    }

    fn tick(&mut self, every: Duration) {
        let sample = self.pending as f64 / every.as_secs_f64();
        // Weight 1/20 per 100 ms tick: about two seconds of memory.
        self.per_sec += (sample - self.per_sec) / 20.0;
        self.pending = 0;
    }
}

/// Runs a download to completion. `partial` must already be in the library, so its verified
/// pieces are served while the rest arrives.
pub async fn run(
    ctx: DownloadContext,
    partial: Arc<PartialVersion>,
    mut events: mpsc::Receiver<DownloadEvent>,
    progress: watch::Sender<DownloadProgress>,
) -> Result<Arc<CompleteVersion>, DownloadError> {
    let total = partial.layout().piece_count();
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let config = SchedulerConfig {
        // A soft failure here is mostly the origin's "busy" while it super-seeds: the piece
        // appears at a peer within moments, and the origin serves it again after its first pass.
        retry_after: RETRY_AFTER,
        // Remote peers only show what may cross (see the module docs), so a duplicate in the
        // endgame no longer risks a WAN crossing for a piece the site has: duplicate sooner.
        endgame_min_age: ENDGAME_MIN_AGE,
        ..SchedulerConfig::default()
    };
    let mut scheduler: Scheduler<PeerId> = Scheduler::new(total, config, u64::from_le_bytes(seed));
    for &piece in &partial.manifest.boot_profile {
        scheduler.want(piece, Priority::Boot);
    }
    for piece in 0..total {
        if partial.is_verified(piece) {
            scheduler.mark_have(piece);
        } else {
            scheduler.want(piece, Priority::Normal);
        }
    }

    let (outcomes_tx, mut outcomes) = mpsc::channel::<PieceOutcome>(1024);
    let mut interested: HashSet<PeerId> = HashSet::new();
    let mut banned: HashSet<PeerId> = HashSet::new();
    let mut peers: HashSet<PeerId> = HashSet::new();
    let mut haves: BTreeSet<PieceIndex> = BTreeSet::new();
    let mut tick = tokio::time::interval(TICK);
    let mut last_checkpoint = tokio::time::Instant::now();
    // A checkpoint syncs the files, which takes a while under write load: it runs beside the
    // download, never in its way, and the next one starts only once it is done.
    let mut checkpointing: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
    let mut last_haves = tokio::time::Instant::now();
    let mut by_peer: HashMap<PeerId, u64> = HashMap::new();
    let mut rate = RateMeter::default();
    let mut sites: HashMap<PeerId, String> = HashMap::new();
    let mut crossing = Crossing::new(&ctx.net.local_peer_id.to_bytes(), total);
    // What peers of other sites (and the origin) really hold; the scheduler sees it masked.
    let mut remote: HashMap<PeerId, Bitfield> = HashMap::new();
    let mut learned = Learned::new(total);
    // Pieces requested and not yet reported back.
    let mut outstanding: u32 = 0;
    let mut fetches = Fetches::default();
    let mut next_fetch: u64 = 0;
    let mut idle_since: Option<tokio::time::Instant> = None;
    // When same-site peers answered "busy" lately.
    let mut site_busy: std::collections::VecDeque<tokio::time::Instant> = Default::default();
    let publish = |scheduler: &Scheduler<PeerId>,
                   peers: usize,
                   by_peer: &HashMap<PeerId, u64>,
                   rate: &RateMeter,
                   crossing: &Crossing| {
        let mut top: Vec<(&PeerId, &u64)> = by_peer.iter().collect();
        top.sort_by_key(|(_, b)| std::cmp::Reverse(**b));
        // Only the shown peers are spelled out: a peer id's text is a base-58 division.
        let sources: Vec<Source> = top
            .into_iter()
            .take(8)
            .map(|(p, b)| Source {
                peer: p.to_string(),
                bytes: *b,
            })
            .collect();
        progress.send_replace(DownloadProgress {
            verified_pieces: total - scheduler.remaining().min(total),
            total_pieces: total,
            peers: peers as u32,
            received_bytes: by_peer.values().sum(),
            rate_bytes_per_sec: rate.per_sec as u64,
            sources,
            site_mates: crossing.mates() as u32,
            crossing_open: crossing.is_open() || crossing.mates() == 0,
        });
    };
    // The split of crossing changed: show every remote peer anew.
    // Until the site has answered (or `site_settle` passed), remote peers show nothing: a first
    // round of requests sent across before the site's holdings are known would cross for
    // nothing.
    let started = tokio::time::Instant::now();
    let mut settled = false;
    let remask = |scheduler: &mut Scheduler<PeerId>,
                  remote: &HashMap<PeerId, Bitfield>,
                  crossing: &Crossing,
                  settled: bool| {
        for (peer, held) in remote {
            let shown = if settled {
                crossing.mask(held)
            } else {
                Bitfield::new(held.len())
            };
            scheduler.peer_bitfield(*peer, &shown);
        }
    };

    // Set once the end is near: every peer's pipeline is then TAIL_PIPELINE deep.
    let mut shallow = false;
    while !scheduler.is_done() {
        tokio::select! {
            event = events.recv() => match event {
                None => return Err(DownloadError::Stopped),
                Some(DownloadEvent::Availability { peer, bitfield, locality, site }) => {
                    if !banned.contains(&peer) && bitfield.len() == total {
                        let bitfield = learned.answer(peer, &bitfield);
                        scheduler.add_peer(peer, locality);
                        if shallow {
                            scheduler.set_pipeline(peer, TAIL_PIPELINE);
                        }
                        sites.insert(peer, site);
                        peers.insert(peer);
                        if locality == Locality::SameSite {
                            scheduler.peer_bitfield(peer, &bitfield);
                            crossing.site_holds(&peer.to_bytes(), &bitfield);
                            if !bitfield.is_full() {
                                crossing.add_mate(&peer.to_bytes());
                            } else {
                                // The site holds everything: nothing need wait for it.
                                settled = true;
                            }
                            if settled && crossing.take_changed() {
                                remask(&mut scheduler, &remote, &crossing, settled);
                            }
                        } else {
                            remote.insert(peer, bitfield);
                            if settled {
                                let held = &remote[&peer];
                                scheduler.peer_bitfield(peer, &crossing.mask(held));
                            }
                        }
                    }
                }
                Some(DownloadEvent::Have { peer, pieces }) => {
                    if !banned.contains(&peer) {
                        learned.have(peer, &pieces);
                    }
                    let held = remote.get_mut(&peer);
                    let masked = held.is_some();
                    if let Some(held) = held {
                        for &piece in &pieces {
                            held.set(piece);
                        }
                    } else {
                        let id = peer.to_bytes();
                        for &piece in &pieces {
                            crossing.site_has(&id, piece);
                        }
                    }
                    for piece in pieces {
                        if !masked || (settled && crossing.may_cross(piece)) {
                            scheduler.peer_have(peer, piece);
                        }
                    }
                }
                Some(DownloadEvent::PeerGone { peer }) => {
                    scheduler.remove_peer(peer);
                    peers.remove(&peer);
                    interested.remove(&peer);
                    remote.remove(&peer);
                    learned.forget(&peer);
                    crossing.remove_mate(&peer.to_bytes());
                    crossing.site_peer_gone(&peer.to_bytes());
                }
                Some(DownloadEvent::Interested { peer, told }) => {
                    interested.insert(peer);
                    let news = untold(&partial.verified(), &told, &haves);
                    for chunk in news.chunks(MAX_HAVE_BATCH) {
                        ctx.haves.send(
                            peer,
                            HaveMessage {
                                manifest_id: partial.id,
                                pieces: chunk.to_vec(),
                            },
                        );
                    }
                }
            },
            Some(outcome) = outcomes.recv() => {
                let now = tokio::time::Instant::now().into_std();
                // A stopped fetch's pieces were taken off `outstanding` when it was stopped: what
                // it sent before it noticed counts only once.
                if let Some(fetch) = fetches.get_mut(&outcome.fetch)
                    && fetch.unreported.remove(&outcome.piece)
                {
                    outstanding = outstanding.saturating_sub(1);
                    if fetch.unreported.is_empty() {
                        fetches.remove(&outcome.fetch);
                    }
                }
                match outcome.result {
                    Ok(len) => {
                        *by_peer.entry(outcome.peer).or_default() += len as u64;
                        if let Some(site) = sites.get(&outcome.peer) {
                            ctx.stats.add_from_site(site, len as u64);
                        }
                        rate.add(len as u64);
                        let others = scheduler.on_complete(outcome.peer, outcome.piece, now);
                        for (other, piece) in others {
                            let dropped = stop_duplicates(&mut fetches, &scheduler, other, piece);
                            outstanding = outstanding.saturating_sub(dropped);
                        }
                        haves.insert(outcome.piece);
                    }
                    Err(Failure::Soft(reason)) => {
                        tracing::trace!(peer = %outcome.peer, piece = outcome.piece, %reason, "piece not received");
                        scheduler.on_failure(outcome.peer, outcome.piece, now);
                    }
                    Err(Failure::Busy) => {
                        scheduler.on_failure(outcome.peer, outcome.piece, now);
                        // The origin's "busy" is super-seeding; a same-site peer's is a full
                        // upload: enough of those and the site cannot keep up alone.
                        if !remote.contains_key(&outcome.peer) && peers.contains(&outcome.peer) {
                            let t = tokio::time::Instant::now();
                            site_busy.push_back(t);
                            while site_busy.front().is_some_and(|f| t - *f > SITE_PATIENCE) {
                                site_busy.pop_front();
                            }
                            if site_busy.len() >= SITE_SATURATED_BUSY && crossing.open() {
                                tracing::info!(
                                    "same-site peers are saturated: fetching from other sites too"
                                );
                            }
                        }
                    }
                    Err(Failure::Bad(reason)) => {
                        ctx.stats.bad_pieces.fetch_add(1, Ordering::Relaxed);
                        if banned.insert(outcome.peer) {
                            tracing::warn!(peer = %outcome.peer, piece = outcome.piece, %reason, "bad piece: banning peer");
                            ctx.net.ban(outcome.peer, BAN_FOR).await;
                        }
                        scheduler.on_failure(outcome.peer, outcome.piece, now);
                        scheduler.remove_peer(outcome.peer);
                        peers.remove(&outcome.peer);
                        remote.remove(&outcome.peer);
                        learned.forget(&outcome.peer);
                        crossing.remove_mate(&outcome.peer.to_bytes());
                        crossing.site_peer_gone(&outcome.peer.to_bytes());
                    }
                    Err(Failure::Fatal(e)) => {
                        // Keep what is verified so a restart resumes.
                        let _ = partial.checkpoint();
                        return Err(e.into());
                    }
                }
            }
            _ = tick.tick() => {
                if last_haves.elapsed() >= HAVE_EVERY {
                    flush_haves(&ctx.haves, partial.id, &mut haves, &interested);
                    last_haves = tokio::time::Instant::now();
                }
                if checkpointing.as_ref().is_some_and(|c| c.is_finished())
                    && let Some(done) = checkpointing.take()
                {
                    done.await.map_err(|_| DownloadError::Stopped)??;
                }
                if checkpointing.is_none() && last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    let p = partial.clone();
                    checkpointing = Some(tokio::task::spawn_blocking(move || p.checkpoint()));
                    last_checkpoint = tokio::time::Instant::now();
                }
                rate.tick(TICK);
                if idle_since.is_some_and(|t| t.elapsed() >= SITE_PATIENCE) && !crossing.is_open()
                {
                    // Why, for whoever reads the log: what is missing, how much of it this node
                    // was to bring across, and how much a same-site peer holds (neither: nobody
                    // of the site owned it).
                    let missing: Vec<PieceIndex> = partial.verified().iter_zeros().collect();
                    let mine = missing.iter().filter(|&&p| crossing.may_cross(p)).count();
                    let in_site = missing.iter().filter(|&&p| crossing.in_site(p)).count();
                    crossing.open();
                    tracing::info!(
                        mates = crossing.mates(),
                        missing = missing.len(),
                        mine,
                        in_site,
                        "the site stalled: fetching any piece from other sites"
                    );
                }
                let settling = !settled && started.elapsed() >= ctx.site_settle;
                settled |= settling;
                if settled && (crossing.take_changed() || settling) {
                    remask(&mut scheduler, &remote, &crossing, settled);
                }
                publish(&scheduler, peers.len(), &by_peer, &rate, &crossing);
            }
        }
        if !shallow
            && near_the_end(
                scheduler.remaining(),
                partial.manifest.piece_size,
                rate.per_sec,
            )
        {
            shallow = true;
            for &peer in &peers {
                scheduler.set_pipeline(peer, TAIL_PIPELINE);
            }
        }
        let now = tokio::time::Instant::now().into_std();
        let requests = scheduler.next_requests(now);
        outstanding += requests.iter().map(|r| r.count).sum::<u32>();
        if outstanding == 0 {
            idle_since.get_or_insert_with(tokio::time::Instant::now);
        } else {
            idle_since = None;
        }
        for request in requests {
            let id = next_fetch;
            next_fetch += 1;
            let (peer, unreported) = (request.peer, request.pieces().collect());
            let task = tokio::spawn(fetch_span(
                ctx.clone(),
                partial.clone(),
                request,
                id,
                outcomes_tx.clone(),
            ));
            let abort = task.abort_handle();
            fetches.insert(
                id,
                Fetch {
                    peer,
                    unreported,
                    abort,
                },
            );
        }
    }

    // Whatever is still in flight duplicates what arrived: stop it before the files are
    // finished, so the peers' upload goes to those still missing pieces.
    drop(fetches);
    flush_haves(&ctx.haves, partial.id, &mut haves, &interested);
    publish(&scheduler, peers.len(), &by_peer, &rate, &crossing);
    if let Some(running) = checkpointing.take() {
        running.await.map_err(|_| DownloadError::Stopped)??;
    }
    let p = partial.clone();
    let complete = tokio::task::spawn_blocking(move || p.finish())
        .await
        .map_err(|_| DownloadError::Stopped)??;
    let complete = Arc::new(complete);
    ctx.library.add_complete(complete.clone());
    Ok(complete)
}

/// Sends the pieces verified since the last flush to every interested peer, in batches.
fn flush_haves(
    sender: &HaveSender,
    id: imiswarm_protocol::Hash,
    haves: &mut BTreeSet<PieceIndex>,
    interested: &HashSet<PeerId>,
) {
    if haves.is_empty() {
        return;
    }
    let pieces: Vec<PieceIndex> = std::mem::take(haves).into_iter().collect();
    for chunk in pieces.chunks(MAX_HAVE_BATCH) {
        for &peer in interested {
            sender.send(
                peer,
                HaveMessage {
                    manifest_id: id,
                    pieces: chunk.to_vec(),
                },
            );
        }
    }
}

/// A peer that stops sending mid-span (a stuck connection) fails the span instead of holding
/// its pieces forever.
async fn timeout<T>(read: impl std::future::Future<Output = T>) -> Result<T, Failure> {
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| Failure::Soft("the peer stopped sending".into()))
}

/// Fetches one span over one piece stream and reports every piece's fate.
async fn fetch_span(
    ctx: DownloadContext,
    partial: Arc<PartialVersion>,
    request: Request<PeerId>,
    fetch: u64,
    outcomes: mpsc::Sender<PieceOutcome>,
) {
    let peer = request.peer;
    let mut reported: HashSet<PieceIndex> = HashSet::new();
    let result = fetch_span_inner(&ctx, &partial, &request, fetch, &outcomes, &mut reported).await;
    // Everything of the span not yet reported (a shorter answer, or a broken stream) shares
    // the span's fate; a bad or fatal outcome is reported once, on the first unreported piece,
    // the rest fail softly.
    let mut failure = result.err();
    for piece in request.pieces() {
        if reported.contains(&piece) {
            continue;
        }
        let result = match failure.take() {
            Some(f) => Err(f),
            None => Err(Failure::Soft("span ended early".into())),
        };
        let _ = outcomes
            .send(PieceOutcome {
                fetch,
                peer,
                piece,
                result,
            })
            .await;
    }
}

async fn fetch_span_inner(
    ctx: &DownloadContext,
    partial: &Arc<PartialVersion>,
    request: &Request<PeerId>,
    fetch: u64,
    outcomes: &mpsc::Sender<PieceOutcome>,
    reported: &mut HashSet<PieceIndex>,
) -> Result<(), Failure> {
    let soft = |e: std::io::Error| Failure::Soft(e.to_string());
    let req = PieceRequest {
        manifest_id: partial.id,
        first: request.first,
        count: request.count,
    };
    let (mut stream, header) = ask(ctx, request.peer, &req).await?;
    if header.status != PieceStatus::Ok {
        // The exchange is complete: the stream can carry the next request.
        ctx.streams.put(request.peer, stream);
        return Err(match header.status {
            PieceStatus::Busy => Failure::Busy,
            other => Failure::Soft(format!("peer answered {other:?}")),
        });
    }
    if header.first != request.first || header.count == 0 || header.count > request.count {
        return Err(Failure::Bad(
            "response header does not match the request".into(),
        ));
    }
    // One buffer for the span: it goes to the blocking pool with each piece and comes back, so
    // a piece costs no allocation and no zeroing after the first.
    let mut buffer: Vec<u8> = Vec::new();
    for expected in header.first..header.first + header.count {
        let frame: PieceFrame = timeout(read_header(&mut stream)).await?.map_err(soft)?;
        let len = partial
            .layout()
            .locate(expected)
            .map(|l| l.len)
            .ok_or_else(|| Failure::Bad("piece outside the version".into()))?;
        if frame.index != expected || frame.len != len {
            return Err(Failure::Bad(format!(
                "frame for piece {} of {} bytes, expected piece {expected} of {len}",
                frame.index, frame.len
            )));
        }
        buffer.resize(frame.len as usize, 0);
        timeout(stream.read_exact(&mut buffer))
            .await?
            .map_err(soft)?;
        ctx.limiter.take(buffer.len()).await;
        ctx.stats
            .received_bytes
            .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        let (p, bytes) = (partial.clone(), std::mem::take(&mut buffer));
        let (bytes, written) = tokio::task::spawn_blocking(move || {
            let written = p.write_piece(expected, &bytes);
            (bytes, written)
        })
        .await
        .map_err(|e| Failure::Soft(e.to_string()))?;
        buffer = bytes;
        let result = match written {
            Ok(_) => Ok(len as usize),
            Err(StoreError::BadPiece(_)) => Err(Failure::Bad(format!(
                "piece {expected} failed its hash check"
            ))),
            Err(e) => Err(Failure::Fatal(e)),
        };
        let stop = result.is_err();
        reported.insert(expected);
        let _ = outcomes
            .send(PieceOutcome {
                fetch,
                peer: request.peer,
                piece: expected,
                result,
            })
            .await;
        if stop {
            // The rest of the span fails softly; the reported failure decides the peer's fate.
            return Err(Failure::Soft("stopped after a failed piece".into()));
        }
    }
    ctx.streams.put(request.peer, stream);
    Ok(())
}

/// Sends `req` to `peer` and reads the answer's header: on a kept stream if there is one (and
/// once more on a new stream if the peer had closed it), else on a new stream.
async fn ask(
    ctx: &DownloadContext,
    peer: PeerId,
    req: &PieceRequest,
) -> Result<(libp2p::Stream, PieceResponseHeader), Failure> {
    if let Some(mut stream) = ctx.streams.take(&peer) {
        match exchange(&mut stream, req).await {
            Ok(header) => return Ok((stream, header)),
            Err(Failure::Soft(e)) => {
                tracing::trace!(%peer, error = %e, "a kept piece stream was closed: opening one");
            }
            Err(other) => return Err(other),
        }
    }
    let mut stream = tokio::time::timeout(
        Duration::from_secs(20),
        ctx.net.streams().open_stream(peer, PIECES),
    )
    .await
    .map_err(|_| Failure::Soft("opening the stream timed out".into()))?
    .map_err(|e| Failure::Soft(e.to_string()))?;
    let header = exchange(&mut stream, req).await?;
    Ok((stream, header))
}

/// Writes a request and reads its answer's header.
async fn exchange(
    stream: &mut libp2p::Stream,
    req: &PieceRequest,
) -> Result<PieceResponseHeader, Failure> {
    write_header(stream, req)
        .await
        .map_err(|e| Failure::Soft(e.to_string()))?;
    timeout(read_header(stream)).await?.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Failure::Bad(e.to_string())
        } else {
            Failure::Soft(e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_starts_when_the_pieces_left_fit_in_its_time_at_the_current_rate() {
        let piece = 64 << 10;
        // 12.5 MB/s: 1.5 s of it is 286 pieces of 64 KiB.
        assert!(near_the_end(286, piece, 12.5e6));
        assert!(!near_the_end(287, piece, 12.5e6));
        assert!(near_the_end(0, piece, 12.5e6));
        // Before anything has arrived there is no rate to go by.
        assert!(!near_the_end(1, piece, 0.0));
    }

    fn pending_fetch(peer: PeerId, pieces: &[PieceIndex]) -> (Fetch, tokio::task::JoinHandle<()>) {
        let task = tokio::spawn(std::future::pending::<()>());
        let fetch = Fetch {
            peer,
            unreported: pieces.iter().copied().collect(),
            abort: task.abort_handle(),
        };
        (fetch, task)
    }

    #[test]
    fn haves_before_an_answer_and_answers_older_than_haves_lose_nothing() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut learned = Learned::new(8);
        // `a`'s have arrives before its availability answer, which was taken earlier.
        learned.have(a, &[5, 99]);
        let mut answer = Bitfield::new(8);
        answer.set(1);
        let known = learned.answer(a, &answer);
        assert_eq!(known.iter_ones().collect::<Vec<_>>(), [1, 5]);
        // A later, older answer (a query sent again) does not take piece 5 back.
        assert_eq!(
            learned.answer(a, &answer).iter_ones().collect::<Vec<_>>(),
            [1, 5]
        );
        // Another peer's pieces stay its own; an answer of another length changes nothing.
        assert_eq!(learned.answer(b, &Bitfield::full(3)).count_ones(), 0);
        learned.forget(&a);
        assert_eq!(
            learned.answer(a, &Bitfield::new(8)).count_ones(),
            0,
            "forgotten"
        );
    }

    #[test]
    fn a_newly_interested_peer_hears_what_was_verified_since_its_answer() {
        let mut verified = Bitfield::new(8);
        for p in [0, 2, 3, 6] {
            verified.set(p);
        }
        let mut told = Bitfield::new(8);
        told.set(0);
        // 3 is still pending: the next flush of haves carries it to every interested peer.
        let pending = BTreeSet::from([3]);
        assert_eq!(untold(&verified, &told, &pending), [2, 6]);
        assert!(untold(&verified, &verified, &BTreeSet::new()).is_empty());
    }

    #[tokio::test]
    async fn a_fetch_left_with_only_held_pieces_is_stopped() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut scheduler: Scheduler<PeerId> = Scheduler::new(8, SchedulerConfig::default(), 1);
        scheduler.want_all(Priority::Normal);
        scheduler.mark_have(5);
        // At `b`: a span whose pieces 4 and 5 are left (5 is held), a duplicate of 5 alone,
        // and a span with a piece still missing. At `a`: a duplicate of 5 (another peer).
        let (span, span_task) = pending_fetch(b, &[4, 5]);
        let (dup, dup_task) = pending_fetch(b, &[5]);
        let (missing, missing_task) = pending_fetch(b, &[5, 6]);
        let (other, other_task) = pending_fetch(a, &[5]);
        let mut fetches: HashMap<u64, Fetch> =
            HashMap::from([(1, span), (2, dup), (3, missing), (4, other)]);

        assert_eq!(stop_duplicates(&mut fetches, &scheduler, b, 5), 1);
        let mut left: Vec<u64> = fetches.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [1, 3, 4], "only the fetch of held pieces at b stops");
        assert!(dup_task.await.unwrap_err().is_cancelled());

        scheduler.mark_have(4);
        assert_eq!(stop_duplicates(&mut fetches, &scheduler, b, 4), 2);
        assert!(span_task.await.unwrap_err().is_cancelled());
        assert!(!missing_task.is_finished() && !other_task.is_finished());
    }
}
