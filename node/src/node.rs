//! A swarm member: hears announcements, decides what to fetch, answers peers, starts downloads.
//!
//! Owns the catalogue of announcements this node has verified and the set of active downloads.
//! One task runs [`Node::run`]; everything slow (asking peers, fetching a manifest, opening a
//! version on disk) runs in tasks of its own and reports back through a bounded channel, so
//! answering a peer never waits on the disk or another peer. It must not touch the swarm
//! directly (that is `net`) nor piece bytes (that is `transfer` and `store`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use imiswarm_protocol::announce::{Lifecycle, SignedAnnouncement, TrustedKeys};
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::limits::MAX_CATALOGUE;
use imiswarm_protocol::manifest::Manifest;
use imiswarm_protocol::scheduler::Locality;
use imiswarm_protocol::wire::{ControlRequest, ControlResponse};
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
    Follow { repo: PathBuf, images: Vec<String> },
    /// A workstation's fetch: one version of one image (the latest deployed if `version` is
    /// None) into `out`.
    Fetch {
        image: String,
        version: Option<u64>,
        out: PathBuf,
    },
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
    queried: HashSet<PeerId>,
}

enum Internal {
    Announcements(Vec<Vec<u8>>),
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
    NotHeld {
        id: Hash,
        peer: PeerId,
    },
    DownloadDone {
        id: Hash,
        result: Result<Arc<CompleteVersion>, String>,
    },
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
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
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
            internal_tx,
            internal_rx,
            finished,
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
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
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
            }
        }
        // Make verified progress durable before the process ends.
        for (id, _) in self.downloads.drain() {
            if let Some(crate::library::Held::Partial(p)) = self.library.get(&id) {
                let _ = p.checkpoint();
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
            NetEvent::PeerIdentified { peer, info } => {
                self.peers.insert(peer, info);
                self.on_new_peer(peer);
            }
            NetEvent::PeerGone { peer } => {
                self.peers.remove(&peer);
                for d in self.downloads.values_mut() {
                    d.queried.remove(&peer);
                    let _ = d.events.try_send(DownloadEvent::PeerGone { peer });
                }
            }
        }
    }

    /// A new peer: learn its peers and its catalogue, and ask what it holds of our downloads.
    fn on_new_peer(&mut self, peer: PeerId) {
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            if let Ok(ControlResponse::Peers { peers }) =
                net.request(peer, ControlRequest::Peers).await
            {
                for record in &peers {
                    if let Some((id, addrs)) = crate::net::record_addrs(record)
                        && id != net.local_peer_id
                    {
                        for addr in addrs {
                            net.dial(addr.with(libp2p::multiaddr::Protocol::P2p(id)))
                                .await;
                        }
                    }
                }
            }
            if let Ok(ControlResponse::Catalogue { announcements }) =
                net.request(peer, ControlRequest::Catalogue).await
            {
                let _ = internal.send(Internal::Announcements(announcements)).await;
            }
        });
        let ids: Vec<Hash> = self.downloads.keys().copied().collect();
        for id in ids {
            self.query_availability(id, peer);
        }
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
        let net = self.net.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = fetch_manifest(&net, &signed).await;
            let _ = internal
                .send(Internal::ManifestFetched { signed, result })
                .await;
        });
    }

    fn paths_for(&self, image: &str, version: u64) -> VersionPaths {
        match &self.mode {
            Mode::Follow { repo, .. } => VersionPaths::in_repo(repo, image, version),
            Mode::Fetch { out, .. } => VersionPaths::for_output(out),
        }
    }

    async fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Announcements(list) => {
                for bytes in list {
                    match self.trusted.decode_and_verify(&bytes) {
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
                let repo = match &self.mode {
                    Mode::Follow { repo, .. } => Some(repo.clone()),
                    Mode::Fetch { .. } => None,
                };
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
                if let Some(d) = self.downloads.get(&id) {
                    let _ = d
                        .events
                        .send(DownloadEvent::Availability {
                            peer,
                            bitfield,
                            locality,
                        })
                        .await;
                }
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
                        if let Mode::Follow { repo, .. } = &self.mode
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
            },
        );
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.query_availability(id, peer);
        }
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
                // A peer that asks is downloading it too: it wants our haves, and we may want
                // its pieces.
                if let Some(d) = self.downloads.get(&manifest_id) {
                    let _ = d.events.try_send(DownloadEvent::Interested { peer });
                    self.query_availability(manifest_id, peer);
                }
                match self.library.get(&manifest_id) {
                    Some(held) => ControlResponse::Availability {
                        manifest_id,
                        bitfield: held.bitfield(),
                    },
                    None => ControlResponse::NotFound,
                }
            }
            ControlRequest::Have {
                manifest_id,
                pieces,
            } => {
                if let Some(d) = self.downloads.get(&manifest_id) {
                    let _ = d.events.try_send(DownloadEvent::Have { peer, pieces });
                }
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
                announcements: self
                    .catalogue
                    .values()
                    .filter_map(|versions| versions.values().next_back())
                    .take(MAX_CATALOGUE)
                    .filter_map(|s| s.encode().ok())
                    .collect(),
            },
            ControlRequest::Peers => ControlResponse::Peers {
                peers: self.net.peer_records().await,
            },
        };
        self.net.respond(channel, response).await;
    }

    fn latest_deployed(&self, image: &str) -> Option<&SignedAnnouncement> {
        self.catalogue
            .get(image)?
            .values()
            .rev()
            .find(|s| s.announcement.state == Lifecycle::Deployed)
    }
}

/// Asks peers (the origin first) for the manifest an announcement names, until one answers
/// with bytes that hash to the signed id and describe the announced version.
async fn fetch_manifest(net: &NetHandle, signed: &SignedAnnouncement) -> Result<Manifest, String> {
    let a = &signed.announcement;
    for attempt in 0..30 {
        let mut peers = net.peers().await;
        peers.sort_by_key(|(_, info)| info.role != Role::Seed);
        for (peer, _) in peers {
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
