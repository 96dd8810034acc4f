//! A swarm member: hears announcements, decides what to fetch, answers peers, starts downloads.
//!
//! Owns the catalogue of announcements this node has verified, the set of active downloads,
//! what this node tells trackers and the DHT it holds, and retention (which versions a daemon
//! keeps).
//! One task runs [`Node::run`]; everything slow (asking peers, fetching a manifest, opening a
//! version on disk) runs in tasks of its own and reports back through a bounded channel, so
//! answering a peer never waits on the disk or another peer. It must not touch the swarm
//! directly (that is `net`) nor piece bytes (that is `transfer` and `store`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imiswarm_protocol::announce::{Lifecycle, SignedAnnouncement, TrustedKeys};
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::limits::MAX_CATALOGUE;
use imiswarm_protocol::manifest::Manifest;
use imiswarm_protocol::scheduler::Locality;
use imiswarm_protocol::wire::{ControlRequest, ControlResponse, HaveMessage, Holding};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use tokio::sync::{mpsc, watch};

use crate::library::Library;
use crate::net::{NetEvent, NetHandle, PeerInfo, Role};
use crate::store::{CompleteVersion, PartialVersion, VersionPaths};
use crate::transfer::download::{self, DownloadContext, DownloadEvent, DownloadProgress};

/// What this member wants.
#[derive(Debug, Clone)]
pub enum Mode {
    /// A daemon (or seed): keep the deployed versions of these images (empty: all) in `repo`.
    /// With `keep`, only the newest `keep` versions of each image stay, and retired versions
    /// go once nothing local uses them; the origin's repository (`None`) is never pruned.
    Follow {
        repo: PathBuf,
        images: Vec<String>,
        keep: Option<u32>,
    },
    /// A member that wants nothing and holds nothing: it only gossips (`retire`).
    Publish,
    /// A workstation's fetch: one version of one image (the latest deployed if `version` is
    /// None) into `into`.
    Fetch {
        image: String,
        version: Option<u64>,
        into: Destination,
    },
}

/// Where a fetch puts the version.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A new directory of its own.
    Dir(PathBuf),
    /// `<repo>/<image>/<version>/`, with its manifest and announcement, as a daemon keeps it.
    Repo(PathBuf),
}

impl Mode {
    /// The repository this member keeps versions in, if it keeps them in one.
    fn repo(&self) -> Option<&std::path::Path> {
        match self {
            Mode::Follow { repo, .. }
            | Mode::Fetch {
                into: Destination::Repo(repo),
                ..
            } => Some(repo),
            Mode::Fetch { .. } | Mode::Publish => None,
        }
    }
}

/// What the rest of the process may ask of a running node.
#[derive(Debug)]
pub enum NodeCommand {
    /// Add a trusted announcement (this node's own publication) to the catalogue.
    Remember(SignedAnnouncement),
    /// What the node is fetching and which versions it knows, for the status API.
    Status(tokio::sync::oneshot::Sender<NodeStatus>),
}

/// The node loop's part of a status report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeStatus {
    pub downloads: Vec<DownloadStatus>,
    /// The newest known announcement of each image: (image, version, deployed?).
    pub catalogue: Vec<CatalogueEntry>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DownloadStatus {
    pub image: String,
    pub version: u64,
    #[serde(flatten)]
    pub progress: DownloadProgress,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CatalogueEntry {
    pub image: String,
    pub version: u64,
    pub state: String,
    pub manifest: String,
}

/// How a download ended, for whoever waits on it (the fetch command).
#[derive(Debug, Clone)]
pub enum Finished {
    Complete {
        image: String,
        version: u64,
        dir: PathBuf,
    },
    Failed {
        image: String,
        version: u64,
        error: String,
    },
}

struct ActiveDownload {
    events: mpsc::Sender<DownloadEvent>,
    progress: watch::Receiver<DownloadProgress>,
    image: String,
    version: u64,
    /// Peers asked what they hold (the answer may still be on its way).
    queried: HashSet<PeerId>,
    /// Peers that answered with what they hold.
    answered: HashSet<PeerId>,
    /// Verified pieces at the last change, and when it changed.
    last_progress: (u32, Instant),
}

enum Internal {
    /// A peer's catalogue (a tracker's, or a node's).
    Announcements {
        list: Vec<Vec<u8>>,
        from_tracker: bool,
    },
    ManifestFetched {
        signed: SignedAnnouncement,
        result: Result<Manifest, String>,
    },
    Opened {
        signed: SignedAnnouncement,
        result: Result<Arc<PartialVersion>, String>,
    },
    Availability {
        id: Hash,
        peer: PeerId,
        bitfield: imiswarm_protocol::Bitfield,
    },
    /// The peer holds none of the version (yet); it may be asked again later.
    NotHeld { id: Hash, peer: PeerId },
    DownloadDone {
        id: Hash,
        result: Result<Arc<CompleteVersion>, String>,
    },
    /// Retention found the version in use at the last moment: try again later.
    RemovalDeferred { id: Hash },
}

/// The state of one swarm member.
pub struct Node {
    net: NetHandle,
    library: Arc<Library>,
    trusted: TrustedKeys,
    mode: Mode,
    site: String,
    ctx: DownloadContext,
    /// image -> version -> newest verified statement about it.
    catalogue: HashMap<String, BTreeMap<u64, SignedAnnouncement>>,
    downloads: HashMap<Hash, ActiveDownload>,
    /// Manifest ids being resolved or opened (not yet a download).
    starting: HashSet<Hash>,
    peers: HashMap<PeerId, PeerInfo>,
    /// Connected trackers: told what this node holds, asked who holds what it fetches.
    trackers: HashSet<PeerId>,
    /// What this node last told the trackers, and when.
    registered: (Vec<Holding>, Option<Instant>),
    /// Versions this node announces in the DHT.
    provided: HashSet<Hash>,
    /// When holders of the active downloads were last looked up.
    last_lookup: Option<Instant>,
    /// When the trackers' catalogues were last asked for (see [`CATALOGUE_EVERY`]).
    last_catalogue: Instant,
    /// Versions being removed (retention), so a slow removal is not started twice.
    removing: HashSet<Hash>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    /// Haves from peers' haves streams (see [`crate::transfer::haves`]).
    haves_tx: mpsc::Sender<(PeerId, HaveMessage)>,
    haves_rx: mpsc::Receiver<(PeerId, HaveMessage)>,
    finished: mpsc::Sender<Finished>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("mode", &self.mode)
            .field("downloads", &self.downloads.len())
            .finish()
    }
}

impl Node {
    pub fn new(
        ctx: DownloadContext,
        trusted: TrustedKeys,
        mode: Mode,
        site: String,
        finished: mpsc::Sender<Finished>,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let (haves_tx, haves_rx) = mpsc::channel(1024);
        Self {
            net: ctx.net.clone(),
            library: ctx.library.clone(),
            trusted,
            mode,
            site,
            ctx,
            catalogue: HashMap::new(),
            downloads: HashMap::new(),
            starting: HashSet::new(),
            peers: HashMap::new(),
            trackers: HashSet::new(),
            registered: (Vec::new(), None),
            provided: HashSet::new(),
            last_lookup: None,
            last_catalogue: Instant::now(),
            removing: HashSet::new(),
            internal_tx,
            internal_rx,
            haves_tx,
            haves_rx,
            finished,
        }
    }

    /// Where the readers of incoming haves streams deliver.
    pub fn have_inbox(&self) -> mpsc::Sender<(PeerId, HaveMessage)> {
        self.haves_tx.clone()
    }

    /// A peer now also holds these pieces of version `id`: news for its download, if any.
    fn on_have(&self, peer: PeerId, id: Hash, pieces: Vec<u32>) {
        if let Some(d) = self.downloads.get(&id) {
            let _ = d.events.try_send(DownloadEvent::Have { peer, pieces });
        }
    }

    /// Records an announcement this node already trusts (its own, or one saved on disk).
    pub fn remember(&mut self, signed: SignedAnnouncement) {
        let a = &signed.announcement;
        let versions = self.catalogue.entry(a.image.clone()).or_default();
        let newer = versions
            .get(&a.version)
            .is_none_or(|old| old.announcement.timestamp_ms < a.timestamp_ms);
        if newer {
            versions.insert(a.version, signed);
        }
    }

    /// Resumes a partial download found on disk at start.
    pub fn resume(&mut self, signed: SignedAnnouncement, partial: Arc<PartialVersion>) {
        self.remember(signed.clone());
        self.starting.insert(partial.id);
        self.start_download(signed, partial);
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<NetEvent>,
        mut commands: mpsc::Receiver<NodeCommand>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => self.on_tick(),
                Some(command) = commands.recv() => match command {
                    NodeCommand::Remember(signed) => self.remember(signed),
                    NodeCommand::Status(reply) => {
                        let _ = reply.send(self.status());
                    }
                },
                event = events.recv() => match event {
                    Some(e) => self.on_net_event(e).await,
                    None => break,
                },
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal).await,
                Some((peer, have)) = self.haves_rx.recv() => {
                    self.on_have(peer, have.manifest_id, have.pieces);
                }
            }
        }
        // Make verified progress durable before the process ends.
        for (id, _) in self.downloads.drain() {
            if let Some(crate::library::Held::Partial(p)) = self.library.get(&id) {
                let _ = p.checkpoint();
            }
        }
    }

    /// Periodic chores: the DHT, the trackers, lookups for active downloads, retention.
    fn on_tick(&mut self) {
        let summary = self.library.summary();
        let held: HashSet<Hash> = summary.iter().map(|v| v.0).collect();
        for id in held.difference(&self.provided) {
            let (net, id) = (self.net.clone(), *id);
            tokio::spawn(async move { net.provide(id, true).await });
        }
        for id in self.provided.difference(&held) {
            let (net, id) = (self.net.clone(), *id);
            tokio::spawn(async move { net.provide(id, false).await });
        }
        self.provided = held;

        let holdings: Vec<Holding> = summary
            .into_iter()
            .take(imiswarm_protocol::limits::MAX_HOLDINGS)
            .map(
                |(manifest_id, image, version, _, verified, total)| Holding {
                    manifest_id,
                    image,
                    version,
                    verified,
                    total,
                },
            )
            .collect();
        let (last, at) = &self.registered;
        let since = at.map(|t| t.elapsed());
        let changed = *last != holdings && since.is_none_or(|s| s >= REGISTER_MIN_GAP);
        if changed || since.is_none_or(|s| s >= REGISTER_EVERY) {
            for &tracker in &self.trackers {
                self.register_with(tracker, holdings.clone());
            }
            self.registered = (holdings, Some(Instant::now()));
        }

        self.requery_stalled();
        if self.last_catalogue.elapsed() >= CATALOGUE_EVERY {
            self.last_catalogue = Instant::now();
            for &tracker in &self.trackers {
                self.refresh_catalogue(tracker);
            }
        }
        if self.last_lookup.is_none_or(|t| t.elapsed() >= LOOKUP_EVERY) {
            // A lookup is a tracker request and a DHT walk that reaches most nodes of a small
            // swarm: only downloads short of holders, or stuck, need one.
            let ids: Vec<Hash> = self
                .downloads
                .iter()
                .filter(|(_, d)| {
                    d.progress.borrow().peers < ENOUGH_HOLDERS
                        || d.last_progress.1.elapsed() >= LOOKUP_EVERY
                })
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                self.last_lookup = Some(Instant::now());
            }
            for id in ids {
                self.find_holders(id);
            }
        }
        self.enforce_retention();
    }

    /// A download that made no progress for a while asks every peer again what it holds: a
    /// "have" lost on the way, or an answer from before a peer started, would otherwise leave
    /// it waiting for pieces it believes nobody has.
    fn requery_stalled(&mut self) {
        let peers: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| !self.trackers.contains(p))
            .copied()
            .collect();
        let mut stalled = Vec::new();
        for (id, d) in &mut self.downloads {
            let verified = d.progress.borrow().verified_pieces;
            if verified != d.last_progress.0 {
                d.last_progress = (verified, Instant::now());
            } else if d.last_progress.1.elapsed() >= REQUERY_AFTER {
                d.last_progress.1 = Instant::now();
                d.queried.clear();
                stalled.push(*id);
            }
        }
        for id in stalled {
            tracing::debug!(manifest = %id, "no progress: asking every peer again");
            for &peer in &peers {
                self.query_availability(id, peer);
            }
        }
    }

    fn register_with(&self, tracker: PeerId, holdings: Vec<Holding>) {
        let net = self.net.clone();
        tokio::spawn(async move {
            if let Err(e) = net
                .request(tracker, ControlRequest::Register { holdings })
                .await
            {
                tracing::debug!(%tracker, error = %e, "registration not delivered");
            }
        });
    }

    /// Asks the trackers, then the DHT, who holds version `id`, and dials those not connected.
    fn find_holders(&self, id: Hash) {
        let net = self.net.clone();
        let trackers: Vec<PeerId> = self.trackers.iter().copied().collect();
        let known: HashSet<PeerId> = self.peers.keys().copied().collect();
        tokio::spawn(async move {
            let mut dialled = 0usize;
            for tracker in trackers {
                if let Ok(ControlResponse::Holders { holders }) = net
                    .request(tracker, ControlRequest::Holders { manifest_id: id })
                    .await
                {
                    for holder in &holders {
                        if let Some((peer, addrs)) = crate::net::record_addrs(&holder.peer)
                            && peer != net.local_peer_id
                            && !known.contains(&peer)
                        {
                            dialled += 1;
                            net.dial_at(peer, addrs).await;
                        }
                    }
                }
            }
            let providers = net.providers(id).await;
            if !providers.is_empty() {
                tracing::info!(manifest = %id, providers = providers.len(), "found holders in the DHT");
            }
            for peer in providers {
                if !known.contains(&peer) {
                    dialled += 1;
                    net.dial_peer(peer).await;
                }
            }
            if dialled > 0 {
                tracing::debug!(manifest = %id, dialled, "dialled holders");
            }
        });
    }

    /// A daemon keeps the newest `keep` versions of each image and drops retired ones, except
    /// while something local uses them (a lease: an export, a lingering fetch).
    fn enforce_retention(&mut self) {
        let Mode::Follow {
            repo,
            keep: Some(keep),
            ..
        } = &self.mode
        else {
            return;
        };
        let mut by_image: BTreeMap<String, Vec<(u64, Hash)>> = BTreeMap::new();
        for (id, image, version, complete, _, _) in self.library.summary() {
            if complete {
                by_image.entry(image).or_default().push((version, id));
            }
        }
        for (image, mut versions) in by_image {
            versions.sort_by_key(|v| std::cmp::Reverse(v.0));
            for (rank, (version, id)) in versions.into_iter().enumerate() {
                let retired = self
                    .catalogue
                    .get(&image)
                    .and_then(|v| v.get(&version))
                    .is_some_and(|s| {
                        s.announcement.state == Lifecycle::Retired
                            && s.announcement.manifest_id == id
                    });
                if !retired && rank < *keep as usize {
                    continue;
                }
                if self.removing.contains(&id) || crate::lease::in_use(repo, &image, version) {
                    continue;
                }
                let why = if retired {
                    "retired"
                } else {
                    "older than the newest kept"
                };
                self.removing.insert(id);
                let (repo, image) = (repo.clone(), image.clone());
                let (library, internal) = (self.library.clone(), self.internal_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let in_use = || crate::lease::in_use(&repo, &image, version);
                    match crate::repo::remove_version(&repo, &image, version, in_use) {
                        Ok(true) => {
                            // Uploads under way finish from the files they hold open.
                            library.remove_complete(&id);
                            tracing::info!(%image, version, why, "removed version");
                        }
                        Ok(false) => {
                            tracing::info!(%image, version, "version taken into use: kept");
                            let _ = internal.blocking_send(Internal::RemovalDeferred { id });
                        }
                        Err(e) => {
                            tracing::error!(%image, version, error = %e, "cannot remove version");
                        }
                    }
                });
            }
        }
    }

    fn locality(&self, peer: &PeerId) -> Locality {
        match self.peers.get(peer) {
            Some(info) if info.role == Role::Seed => Locality::Origin,
            Some(info) if info.site == self.site => Locality::SameSite,
            _ => Locality::OtherSite,
        }
    }

    async fn on_net_event(&mut self, event: NetEvent) {
        match event {
            NetEvent::Announcement { signed, .. } => self.on_announcement(signed),
            NetEvent::Request {
                peer,
                request,
                channel,
            } => self.answer(peer, request, channel).await,
            NetEvent::PeerIdentified { peer, info, .. } => {
                let tracker = info.role == Role::Tracker;
                self.peers.insert(peer, info);
                if tracker {
                    self.trackers.insert(peer);
                    self.register_with(peer, self.registered.0.clone());
                }
                self.on_new_peer(peer);
            }
            NetEvent::PeerGone { peer } => {
                self.peers.remove(&peer);
                self.trackers.remove(&peer);
                self.ctx.haves.forget(peer);
                self.ctx.streams.forget(&peer);
                for d in self.downloads.values_mut() {
                    d.queried.remove(&peer);
                    d.answered.remove(&peer);
                    let _ = d.events.try_send(DownloadEvent::PeerGone { peer });
                }
            }
        }
    }

    /// A new peer: learn its peers and its catalogue, and ask what it holds of our downloads.
    fn on_new_peer(&mut self, peer: PeerId) {
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        let from_tracker = self.trackers.contains(&peer);
        tokio::spawn(async move {
            if let Ok(ControlResponse::Peers { peers }) =
                net.request(peer, ControlRequest::Peers).await
            {
                for record in &peers {
                    if let Some((id, addrs)) = crate::net::record_addrs(record)
                        && id != net.local_peer_id
                    {
                        net.dial_at(id, addrs).await;
                    }
                }
            }
            if let Ok(ControlResponse::Catalogue { announcements }) =
                net.request(peer, ControlRequest::Catalogue).await
            {
                let _ = internal
                    .send(Internal::Announcements {
                        list: announcements,
                        from_tracker,
                    })
                    .await;
            }
        });
        if self.trackers.contains(&peer) {
            return; // a tracker holds no pieces
        }
        let ids: Vec<Hash> = self.downloads.keys().copied().collect();
        for id in ids {
            self.query_availability(id, peer);
        }
    }

    /// Asks a tracker for its catalogue again: an announcement gossiped while this node was
    /// cut off (a site's link down during a publish) reaches nobody later, and a connection
    /// that survived the cut is not "new", so the catalogue is the only way it arrives.
    fn refresh_catalogue(&self, tracker: PeerId) {
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            if let Ok(ControlResponse::Catalogue { announcements }) =
                net.request(tracker, ControlRequest::Catalogue).await
            {
                let _ = internal
                    .send(Internal::Announcements {
                        list: announcements,
                        // Not logged: it comes every CATALOGUE_EVERY.
                        from_tracker: false,
                    })
                    .await;
            }
        });
    }

    fn query_availability(&mut self, id: Hash, peer: PeerId) {
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        if !d.queried.insert(peer) {
            return;
        }
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            match net
                .request(peer, ControlRequest::Availability { manifest_id: id })
                .await
            {
                Ok(ControlResponse::Availability {
                    manifest_id,
                    bitfield,
                }) if manifest_id == id => {
                    let _ = internal
                        .send(Internal::Availability { id, peer, bitfield })
                        .await;
                }
                // Not (yet) fetching it: when it starts, it asks us, and we ask again then.
                Ok(_) => {
                    let _ = internal.send(Internal::NotHeld { id, peer }).await;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "availability query failed");
                    let _ = internal.send(Internal::NotHeld { id, peer }).await;
                }
            }
        });
    }

    fn wants(&self, image: &str, version: u64) -> bool {
        match &self.mode {
            Mode::Follow { images, .. } => {
                (images.is_empty() || images.iter().any(|i| i == image))
                    && self
                        .library
                        .newest_complete_before(image, u64::MAX)
                        .is_none_or(|c| c.manifest.version < version)
            }
            Mode::Publish => false,
            Mode::Fetch {
                image: want,
                version: want_version,
                ..
            } => {
                want == image
                    && want_version.is_none_or(|v| v == version)
                    && self.downloads.is_empty()
                    && self.starting.is_empty()
            }
        }
    }

    fn on_announcement(&mut self, signed: SignedAnnouncement) {
        let a = signed.announcement.clone();
        self.remember(signed.clone());
        if a.state != Lifecycle::Deployed {
            self.on_retired(&signed);
            return;
        }
        // Only the newest deployed version known for the image is worth fetching.
        let newest = self
            .catalogue
            .get(&a.image)
            .and_then(|v| {
                v.values()
                    .rev()
                    .find(|s| s.announcement.state == Lifecycle::Deployed)
            })
            .map(|s| s.announcement.version);
        let fetch_latest = !matches!(
            self.mode,
            Mode::Fetch {
                version: Some(_),
                ..
            }
        );
        if fetch_latest && newest != Some(a.version) {
            return;
        }
        let id = a.manifest_id;
        if !self.wants(&a.image, a.version)
            || self.library.get(&id).is_some()
            || self.downloads.contains_key(&id)
            || !self.starting.insert(id)
        {
            return;
        }
        tracing::info!(image = %a.image, version = a.version, manifest = %id, "fetching new version");
        // A late joiner may know only a tracker: find who can send the manifest.
        self.find_holders(id);
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = fetch_manifest(&net, &signed).await;
            let _ = internal
                .send(Internal::ManifestFetched { signed, result })
                .await;
        });
    }

    /// Keeps a retirement beside the version it retires, so a restarted daemon still knows;
    /// retention removes the version on its next round.
    /// Whether `signed` is a retirement this node has already taken.
    fn knows_retirement(&self, signed: &SignedAnnouncement) -> bool {
        let a = &signed.announcement;
        a.state != Lifecycle::Deployed
            && self
                .catalogue
                .get(&a.image)
                .and_then(|v| v.get(&a.version))
                .is_some_and(|s| s.announcement == *a)
    }

    fn on_retired(&self, signed: &SignedAnnouncement) {
        let a = &signed.announcement;
        let Mode::Follow {
            repo,
            keep: Some(_),
            ..
        } = &self.mode
        else {
            return;
        };
        let current = self
            .catalogue
            .get(&a.image)
            .and_then(|v| v.get(&a.version))
            .is_some_and(|s| s.announcement.timestamp_ms == a.timestamp_ms);
        if current
            && self.library.complete(&a.manifest_id).is_some()
            && let Ok(bytes) = signed.encode()
        {
            tracing::info!(image = %a.image, version = a.version, "version retired");
            let path = repo
                .join(&a.image)
                .join(format!("{}.announcement", a.version));
            if let Err(e) = crate::repo::write_atomic(&path, &bytes) {
                tracing::warn!(error = %e, "cannot save the retirement");
            }
        }
    }

    fn paths_for(&self, image: &str, version: u64) -> VersionPaths {
        match &self.mode {
            Mode::Follow { repo, .. }
            | Mode::Fetch {
                into: Destination::Repo(repo),
                ..
            } => VersionPaths::in_repo(repo, image, version),
            Mode::Fetch {
                into: Destination::Dir(out),
                ..
            } => VersionPaths::for_output(out),
            // Never downloads (wants nothing); a scratch name keeps the match total.
            Mode::Publish => VersionPaths::for_output(std::path::Path::new(".publish")),
        }
    }

    async fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Announcements { list, from_tracker } => {
                if from_tracker {
                    tracing::info!(announcements = list.len(), "catalogue from a tracker");
                }
                for bytes in list {
                    match self.trusted.decode_and_verify(&bytes) {
                        // A retirement already taken is not taken again at every refresh.
                        Ok(signed) if self.knows_retirement(&signed) => {}
                        Ok(signed) => self.on_announcement(signed),
                        Err(e) => {
                            tracing::warn!(error = %e, "refused announcement from a catalogue")
                        }
                    }
                }
            }
            Internal::ManifestFetched { signed, result } => {
                let a = &signed.announcement;
                let manifest = match result {
                    Ok(m) => m,
                    Err(e) => {
                        self.starting.remove(&a.manifest_id);
                        tracing::warn!(image = %a.image, version = a.version, error = %e, "no manifest");
                        self.report(Finished::Failed {
                            image: a.image.clone(),
                            version: a.version,
                            error: e,
                        })
                        .await;
                        return;
                    }
                };
                let paths = self.paths_for(&a.image, a.version);
                let older = self.library.newest_complete_before(&a.image, a.version);
                let internal = self.internal_tx.clone();
                let repo = self.mode.repo().map(std::path::Path::to_path_buf);
                let stats = self.ctx.stats.clone();
                tokio::task::spawn_blocking(move || {
                    let result = open_partial(
                        paths,
                        manifest,
                        older.as_deref(),
                        &signed,
                        repo.as_deref(),
                        &stats,
                    )
                    .map_err(|e| e.to_string());
                    let _ = internal.blocking_send(Internal::Opened { signed, result });
                });
            }
            Internal::Opened { signed, result } => match result {
                Ok(partial) => self.start_download(signed, partial),
                Err(e) => {
                    let a = &signed.announcement;
                    self.starting.remove(&a.manifest_id);
                    tracing::error!(image = %a.image, version = a.version, error = %e, "cannot start download");
                    self.report(Finished::Failed {
                        image: a.image.clone(),
                        version: a.version,
                        error: e,
                    })
                    .await;
                }
            },
            Internal::Availability { id, peer, bitfield } => {
                let locality = self.locality(&peer);
                let site = self
                    .peers
                    .get(&peer)
                    .map_or_else(|| "unknown".to_owned(), |i| i.site.clone());
                if let Some(d) = self.downloads.get_mut(&id) {
                    d.answered.insert(peer);
                    let _ = d
                        .events
                        .send(DownloadEvent::Availability {
                            peer,
                            bitfield,
                            locality,
                            site,
                        })
                        .await;
                }
            }
            Internal::RemovalDeferred { id } => {
                self.removing.remove(&id);
            }
            Internal::NotHeld { id, peer } => {
                if let Some(d) = self.downloads.get_mut(&id) {
                    d.queried.remove(&peer);
                }
            }
            Internal::DownloadDone { id, result } => {
                let Some(d) = self.downloads.remove(&id) else {
                    return;
                };
                match result {
                    Ok(complete) => {
                        tracing::info!(image = %d.image, version = d.version, "version complete");
                        let dir = self.paths_for(&d.image, d.version).final_dir;
                        if let Some(repo) = self.mode.repo()
                            && let Some(signed) =
                                self.catalogue.get(&d.image).and_then(|v| v.get(&d.version))
                            && let Ok(bytes) = signed.encode()
                        {
                            let path = repo
                                .join(&d.image)
                                .join(format!("{}.announcement", d.version));
                            if let Err(e) = crate::repo::write_atomic(&path, &bytes) {
                                tracing::warn!(error = %e, "cannot save the announcement");
                            }
                        }
                        drop(complete);
                        self.report(Finished::Complete {
                            image: d.image,
                            version: d.version,
                            dir,
                        })
                        .await;
                    }
                    Err(e) => {
                        tracing::error!(image = %d.image, version = d.version, error = %e, "download failed");
                        self.library.remove_partial(&id);
                        self.report(Finished::Failed {
                            image: d.image,
                            version: d.version,
                            error: e,
                        })
                        .await;
                    }
                }
            }
        }
    }

    async fn report(&self, finished: Finished) {
        let _ = self.finished.send(finished).await;
    }

    fn start_download(&mut self, signed: SignedAnnouncement, partial: Arc<PartialVersion>) {
        let a = signed.announcement;
        self.starting.remove(&a.manifest_id);
        self.library.add_partial(partial.clone());
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (progress_tx, progress_rx) = watch::channel(DownloadProgress::default());
        let ctx = self.ctx.clone();
        let internal = self.internal_tx.clone();
        let id = partial.id;
        tokio::spawn(async move {
            let result = download::run(ctx, partial, events_rx, progress_tx)
                .await
                .map_err(|e| e.to_string());
            let _ = internal.send(Internal::DownloadDone { id, result }).await;
        });
        self.downloads.insert(
            id,
            ActiveDownload {
                events: events_tx,
                progress: progress_rx,
                image: a.image,
                version: a.version,
                queried: HashSet::new(),
                answered: HashSet::new(),
                last_progress: (0, Instant::now()),
            },
        );
        let peers: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| !self.trackers.contains(p))
            .copied()
            .collect();
        for peer in peers {
            self.query_availability(id, peer);
        }
        self.last_lookup = None; // look for holders on the next tick
    }

    fn status(&self) -> NodeStatus {
        let mut downloads: Vec<DownloadStatus> = self
            .downloads
            .values()
            .map(|d| DownloadStatus {
                image: d.image.clone(),
                version: d.version,
                progress: d.progress.borrow().clone(),
            })
            .collect();
        downloads.sort_by(|a, b| (&a.image, a.version).cmp(&(&b.image, b.version)));
        let mut catalogue: Vec<CatalogueEntry> = self
            .catalogue
            .values()
            .filter_map(|v| v.values().next_back())
            .map(|s| CatalogueEntry {
                image: s.announcement.image.clone(),
                version: s.announcement.version,
                state: format!("{:?}", s.announcement.state).to_lowercase(),
                manifest: s.announcement.manifest_id.to_hex(),
            })
            .collect();
        catalogue.sort_by(|a, b| a.image.cmp(&b.image));
        NodeStatus {
            downloads,
            catalogue,
        }
    }

    async fn answer(
        &mut self,
        peer: PeerId,
        request: ControlRequest,
        channel: ResponseChannel<ControlResponse>,
    ) {
        let response = match request {
            ControlRequest::Manifest { manifest_id } => match self.library.get(&manifest_id) {
                Some(held) => ControlResponse::Manifest {
                    bytes: held.manifest_bytes(),
                },
                None => ControlResponse::NotFound,
            },
            ControlRequest::Availability { manifest_id } => {
                // Taken before the download hears of the peer, which then sends it whatever
                // was verified since.
                let bitfield = self.library.get(&manifest_id).map(|held| held.bitfield());
                // A peer that asks is downloading it too: it wants our haves, and we may want
                // its pieces.
                if let Some(d) = self.downloads.get_mut(&manifest_id) {
                    // A query of ours still on its way may have reached the peer before it
                    // started this download, and come back "not held" after this: without an
                    // answer, ask again, or its pieces stay unknown until the download stalls
                    // (and its site's split of what to bring across is computed without it).
                    if !d.answered.contains(&peer) {
                        d.queried.remove(&peer);
                    }
                    let told = bitfield.clone().unwrap_or_default();
                    if d.events
                        .try_send(DownloadEvent::Interested { peer, told })
                        .is_err()
                    {
                        // Its next query (when it stops making progress) tries again.
                        tracing::debug!(%peer, "download too busy to note an interested peer");
                    }
                    self.query_availability(manifest_id, peer);
                }
                match bitfield {
                    Some(bitfield) => ControlResponse::Availability {
                        manifest_id,
                        bitfield,
                    },
                    None => ControlResponse::NotFound,
                }
            }
            // From a peer of an older release (newer ones use a haves stream).
            ControlRequest::Have {
                manifest_id,
                pieces,
            } => {
                self.on_have(peer, manifest_id, pieces);
                ControlResponse::Ack
            }
            ControlRequest::LatestVersion { image } => ControlResponse::LatestVersion {
                announcement: self.latest_deployed(&image).and_then(|s| s.encode().ok()),
            },
            ControlRequest::Announcement { image, version } => {
                match self.catalogue.get(&image).and_then(|v| v.get(&version)) {
                    Some(signed) => match signed.encode() {
                        Ok(announcement) => ControlResponse::Announcement { announcement },
                        Err(_) => ControlResponse::NotFound,
                    },
                    None => ControlResponse::NotFound,
                }
            }
            ControlRequest::Catalogue => ControlResponse::Catalogue {
                announcements: self.catalogue_for_peers(),
            },
            ControlRequest::Peers => ControlResponse::Peers {
                peers: self.net.peer_records().await,
            },
            // Only trackers answer these.
            ControlRequest::Register { .. } | ControlRequest::Holders { .. } => {
                ControlResponse::NotFound
            }
        };
        self.net.respond(channel, response).await;
    }

    /// What a peer needs to know: the newest deployed version of each image and every
    /// retirement (so a late joiner also drops what was withdrawn), newest first.
    fn catalogue_for_peers(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<&SignedAnnouncement> = Vec::new();
        for (image, versions) in &self.catalogue {
            out.extend(self.latest_deployed(image));
            out.extend(
                versions
                    .values()
                    .filter(|s| s.announcement.state == Lifecycle::Retired),
            );
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.announcement.timestamp_ms));
        out.into_iter()
            .take(MAX_CATALOGUE)
            .filter_map(|s| s.encode().ok())
            .collect()
    }

    fn latest_deployed(&self, image: &str) -> Option<&SignedAnnouncement> {
        self.catalogue
            .get(image)?
            .values()
            .rev()
            .find(|s| s.announcement.state == Lifecycle::Deployed)
    }
}

/// How often the node loop does its chores.
const TICK: Duration = Duration::from_secs(1);
/// Trackers hear from a node at least this often, even when nothing changed.
const REGISTER_EVERY: Duration = Duration::from_secs(30);
/// Progress reaches the trackers at most this often.
const REGISTER_MIN_GAP: Duration = Duration::from_secs(2);
/// A download without progress for this long asks every peer again what it holds.
const REQUERY_AFTER: Duration = Duration::from_secs(2);
/// How often a node asks its trackers for their catalogues again (anti-entropy for
/// announcements it missed; each answer is a few signed announcements).
const CATALOGUE_EVERY: Duration = Duration::from_secs(10);
/// How often active downloads look for more holders (trackers, then the DHT).
const LOOKUP_EVERY: Duration = Duration::from_secs(5);
/// A download that hears from this many holders looks for no more (unless it is stuck): its
/// link is full long before, and newcomers reach it through gossip and "have"s anyway.
const ENOUGH_HOLDERS: u32 = 8;

/// Asks peers (the origin first) for the manifest an announcement names, until one answers
/// with bytes that hash to the signed id and describe the announced version.
async fn fetch_manifest(net: &NetHandle, signed: &SignedAnnouncement) -> Result<Manifest, String> {
    let a = &signed.announcement;
    for attempt in 0..30 {
        let mut peers = net.peers().await;
        peers.retain(|p| p.info.role != Role::Tracker);
        peers.sort_by_key(|p| p.info.role != Role::Seed);
        for peer in peers.into_iter().map(|p| p.peer) {
            let Ok(ControlResponse::Manifest { bytes }) = net
                .request(
                    peer,
                    ControlRequest::Manifest {
                        manifest_id: a.manifest_id,
                    },
                )
                .await
            else {
                continue;
            };
            match Manifest::decode_expecting(&bytes, &a.manifest_id) {
                Ok(m)
                    if m.image == a.image
                        && m.version == a.version
                        && m.total_size() == a.total_size =>
                {
                    return Ok(m);
                }
                Ok(_) => {
                    return Err(format!(
                        "the manifest with id {} does not describe {}@{}",
                        a.manifest_id, a.image, a.version
                    ));
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "peer sent a manifest that does not match its id")
                }
            }
        }
        tracing::debug!(attempt, "no peer has the manifest yet");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("no peer served the manifest {}", a.manifest_id))
}

/// Opens (or resumes) the partial version and takes unchanged pieces from an older version.
fn open_partial(
    paths: VersionPaths,
    manifest: Manifest,
    older: Option<&CompleteVersion>,
    signed: &SignedAnnouncement,
    repo: Option<&std::path::Path>,
    stats: &download::DownloadStats,
) -> Result<Arc<PartialVersion>, crate::store::StoreError> {
    if let Some(repo) = repo {
        // Saved beside the partial manifest so a restart knows what it was fetching.
        let a = &signed.announcement;
        let path = repo
            .join(".partial")
            .join(&a.image)
            .join(format!("{}.announcement", a.version));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| crate::store::StoreError::Io {
                path: parent.display().to_string(),
                error,
            })?;
        }
        let bytes = signed.encode().map_err(crate::repo::RepoError::from)?;
        crate::repo::write_atomic(&path, &bytes)?;
    }
    let partial = PartialVersion::open(paths, manifest)?;
    if let Some(older) = older {
        let reused = partial.reuse_from(older)?;
        stats
            .reused_bytes
            .fetch_add(reused, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            reused_bytes = reused,
            from_version = older.manifest.version,
            "reused local pieces"
        );
    }
    Ok(Arc::new(partial))
}
