//! `imiswarm tracker`: the tracker library ([`imiswarm_tracker`]) hosted on a libp2p node.
//!
//! Owns the glue only: it feeds the registry what identify and `Register` say, offers every
//! announcement it hears (gossip, a connecting node's catalogue) to the catalogue and saves the
//! new ones to the database, answers `Holders`, `Catalogue`, `LatestVersion`, `Announcement` and
//! `Peers`, and serves `/status` (JSON) and `/metrics`. The tracker serves no pieces and is not
//! trusted: nodes verify every announcement it hands out, and it only orders whom they ask.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use imiswarm_protocol::announce::TrustedKeys;
use imiswarm_protocol::limits::MAX_PEER_RECORDS;
use imiswarm_protocol::wire::{ControlRequest, ControlResponse};
use imiswarm_tracker::{Catalogue, CatalogueStore, Offered, PeerKey, Registry};
use libp2p::PeerId;
use tokio::sync::mpsc;

use crate::Outcome;
use crate::api::Metrics;
use crate::config::{DEFAULT_TRACKER_API, DEFAULT_TRACKER_PORT, NodeFlags};
use crate::member::{shutdown_signal, start_net};
use crate::net::{NetEvent, NetHandle, Role};

/// A member not heard from for this long is forgotten (nodes register every 30 s).
const MEMBER_TTL: Duration = Duration::from_secs(120);
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// What the tracker knows; shared by the event loop and the status API.
#[derive(Debug)]
struct TrackerState {
    registry: Registry,
    catalogue: Catalogue,
    store: CatalogueStore,
    trusted: TrustedKeys,
}

impl TrackerState {
    /// Verifies and keeps an announcement, and saves it when it is news.
    fn offer(&mut self, bytes: &[u8]) {
        match self.catalogue.offer(bytes, &self.trusted) {
            Ok(Offered::New | Offered::Replaced) => {
                let Ok(signed) = self.trusted.decode_and_verify(bytes) else {
                    return;
                };
                let a = &signed.announcement;
                tracing::info!(image = %a.image, version = a.version, state = ?a.state, "catalogue updated");
                if let Err(e) = self.store.save(&a.image, a.version, bytes) {
                    tracing::error!(error = %e, "cannot save the catalogue");
                }
            }
            Ok(Offered::Stale) => {}
            Err(e) => tracing::warn!(error = %e, "refused announcement"),
        }
    }
}

type Shared = Arc<Mutex<TrackerState>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, TrackerState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn run(flags: &NodeFlags) -> anyhow::Result<Outcome> {
    let config = flags.resolve_as(false, DEFAULT_TRACKER_PORT, Some(DEFAULT_TRACKER_API))?;
    let database = match (&config.database, config.repo.as_os_str().is_empty()) {
        (Some(path), _) => path.clone(),
        (None, false) => config.repo.join("tracker.redb"),
        (None, true) => anyhow::bail!(
            "database: not set (use --database, `database = ...`, or a --repo to keep it in)"
        ),
    };
    if let Some(parent) = database.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let trusted = TrustedKeys::new(config.trusted.iter().copied());
    if trusted.is_empty() {
        tracing::warn!("no trusted publisher keys: the catalogue will stay empty");
    }
    let store = CatalogueStore::open(&database)?;
    let loaded = store.load(&trusted)?;
    tracing::info!(
        entries = loaded.catalogue.len(),
        skipped = loaded.skipped,
        pruned = loaded.pruned,
        database = %database.display(),
        "catalogue loaded"
    );
    let state: Shared = Arc::new(Mutex::new(TrackerState {
        registry: Registry::new(),
        catalogue: loaded.catalogue,
        store,
        trusted: trusted.clone(),
    }));

    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async {
            let (net, events) = start_net(&config, Role::Tracker, &trusted).await?;
            if let Some(addr) = config.api {
                let api = ApiState {
                    state: state.clone(),
                    net: net.clone(),
                    site: config.site.clone(),
                };
                let bound = crate::api::serve(addr, router(api)).await?;
                tracing::info!(%bound, "tracker API listening");
            }
            println!("{}", net.local_peer_id);
            serve(net, events, state).await;
            Ok(Outcome::Done)
        })
}

/// The tracker's event loop, until Ctrl-C or SIGTERM.
async fn serve(net: NetHandle, mut events: mpsc::Receiver<NetEvent>, state: Shared) {
    let (offers_tx, mut offers) = mpsc::channel::<Vec<Vec<u8>>>(64);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = expire.tick() => lock(&state).registry.expire(Instant::now(), MEMBER_TTL),
            Some(list) = offers.recv() => {
                let mut s = lock(&state);
                for bytes in list {
                    s.offer(&bytes);
                }
            }
            event = events.recv() => match event {
                None => break,
                Some(NetEvent::Announcement { bytes, .. }) => lock(&state).offer(&bytes),
                Some(NetEvent::PeerIdentified { peer, info, addrs }) => {
                    let result = lock(&state).registry.connected(
                        PeerKey(peer.to_bytes()),
                        info.site,
                        info.role == Role::Seed,
                        addrs.iter().map(|a| a.to_vec()).collect(),
                        Instant::now(),
                    );
                    if let Err(e) = result {
                        tracing::warn!(%peer, error = %e, "peer not registered");
                    }
                    // A node may know announcements made while this tracker was down.
                    if info.role != Role::Tracker {
                        ask_catalogue(net.clone(), peer, offers_tx.clone());
                    }
                }
                Some(NetEvent::PeerGone { peer }) => {
                    lock(&state).registry.disconnected(&PeerKey(peer.to_bytes()));
                }
                Some(NetEvent::Request { peer, request, channel }) => {
                    let response = match request {
                        ControlRequest::Peers => ControlResponse::Peers {
                            peers: net.peer_records().await,
                        },
                        other => answer(&mut lock(&state), peer, other),
                    };
                    net.respond(channel, response).await;
                }
            }
        }
    }
}

fn ask_catalogue(net: NetHandle, peer: PeerId, offers: mpsc::Sender<Vec<Vec<u8>>>) {
    tokio::spawn(async move {
        if let Ok(ControlResponse::Catalogue { announcements }) =
            net.request(peer, ControlRequest::Catalogue).await
        {
            let _ = offers.send(announcements).await;
        }
    });
}

fn answer(state: &mut TrackerState, peer: PeerId, request: ControlRequest) -> ControlResponse {
    let asker = PeerKey(peer.to_bytes());
    match request {
        ControlRequest::Register { holdings } => {
            if state.registry.register(&asker, holdings, Instant::now()) {
                ControlResponse::Ack
            } else {
                // Not identified yet: it registers again on its next round.
                ControlResponse::NotFound
            }
        }
        ControlRequest::Holders { manifest_id } => ControlResponse::Holders {
            holders: state
                .registry
                .holders(&manifest_id, &asker, MAX_PEER_RECORDS),
        },
        ControlRequest::Catalogue => ControlResponse::Catalogue {
            announcements: state.catalogue.for_late_joiners(),
        },
        ControlRequest::LatestVersion { image } => ControlResponse::LatestVersion {
            announcement: state.catalogue.latest_deployed(&image).map(<[u8]>::to_vec),
        },
        ControlRequest::Announcement { image, version } => {
            match state.catalogue.get(&image, version) {
                Some(bytes) => ControlResponse::Announcement {
                    announcement: bytes.to_vec(),
                },
                None => ControlResponse::NotFound,
            }
        }
        ControlRequest::Have { .. } => ControlResponse::Ack,
        // No pieces, no manifests here; peer exchange is answered by the caller.
        ControlRequest::Manifest { .. }
        | ControlRequest::Availability { .. }
        | ControlRequest::Peers => ControlResponse::NotFound,
    }
}

#[derive(Debug, Clone)]
struct ApiState {
    state: Shared,
    net: NetHandle,
    site: String,
}

fn router(api: ApiState) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(api)
}

#[derive(Debug, serde::Serialize)]
struct TrackerReport {
    peer_id: String,
    role: Role,
    site: String,
    listen: Vec<String>,
    registry: imiswarm_tracker::RegistrySummary,
    catalogue: Vec<imiswarm_tracker::CatalogueEntry>,
}

async fn report(api: &ApiState) -> TrackerReport {
    let listen = api
        .net
        .listen_addrs()
        .await
        .iter()
        .map(|a| a.to_string())
        .collect();
    let s = lock(&api.state);
    TrackerReport {
        peer_id: api.net.local_peer_id.to_string(),
        role: Role::Tracker,
        site: api.site.clone(),
        listen,
        registry: s.registry.summary(),
        catalogue: s.catalogue.entries(),
    }
}

async fn status(State(api): State<ApiState>) -> Json<TrackerReport> {
    Json(report(&api).await)
}

async fn metrics(State(api): State<ApiState>) -> impl IntoResponse {
    let r = report(&api).await;
    let mut m = Metrics::default();
    m.family(
        "tracker_members",
        "gauge",
        "Nodes registered with the tracker.",
        &[(String::new(), r.registry.members as u64)],
    );
    let by_site: Vec<(String, u64)> = r
        .registry
        .sites
        .iter()
        .map(|s| (format!("{{site=\"{}\"}}", s.site), s.members as u64))
        .collect();
    m.family(
        "tracker_site_members",
        "gauge",
        "Nodes registered with the tracker, by site.",
        &by_site,
    );
    let mut holders = Vec::new();
    let mut complete = Vec::new();
    let mut verified = Vec::new();
    for v in &r.registry.versions {
        for s in &v.sites {
            let labels = format!(
                "{{image=\"{}\",version=\"{}\",site=\"{}\"}}",
                v.image, v.version, s.site
            );
            holders.push((labels.clone(), s.holders as u64));
            complete.push((labels.clone(), s.complete as u64));
            verified.push((labels, s.verified));
        }
    }
    m.family(
        "tracker_holders",
        "gauge",
        "Nodes holding or fetching a version, by site.",
        &holders,
    );
    m.family(
        "tracker_complete_holders",
        "gauge",
        "Nodes holding a complete version, by site.",
        &complete,
    );
    m.family(
        "tracker_verified_pieces",
        "gauge",
        "Verified pieces of a version summed over a site's holders.",
        &verified,
    );
    m.family(
        "tracker_catalogue_entries",
        "gauge",
        "Signed announcements in the catalogue.",
        &[(String::new(), r.catalogue.len() as u64)],
    );
    m.into_response()
}
