//! The local control API: `GET /status` (JSON, what `imiswarm status` prints) and
//! `GET /metrics` (Prometheus text format). Bound to loopback by default; it only reads.
//!
//! Owns the HTTP surface and the report's shape. The figures come from the node loop (through a
//! [`NodeCommand::Status`] with a oneshot reply), the network handle, the library and the
//! transfer counters; the API never changes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::library::Library;
use crate::net::{NetHandle, Role};
use crate::node::{NodeCommand, NodeStatus};
use crate::transfer::download::DownloadStats;
use crate::transfer::upload::UploadStats;

/// What the API reads from.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub net: NetHandle,
    pub library: Arc<Library>,
    pub upload: Arc<UploadStats>,
    pub download: Arc<DownloadStats>,
    pub commands: mpsc::Sender<NodeCommand>,
    pub site: String,
    pub role: Role,
}

#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub peer: String,
    pub site: String,
    pub role: Role,
    /// Established connections with the peer (two after a simultaneous dial).
    pub connections: u32,
}

#[derive(Debug, Serialize)]
pub struct VersionReport {
    pub image: String,
    pub version: u64,
    pub manifest: String,
    pub complete: bool,
    pub verified_pieces: u32,
    pub total_pieces: u32,
    /// At the origin: pieces its first pass has not sent yet (0: each has left once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_pass_left: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub uploaded_bytes: u64,
    pub uploaded_pieces: u64,
    /// Piece requests (spans) served: pieces per request says how well requests coalesce.
    pub served_requests: u64,
    pub received_bytes: u64,
    pub reused_bytes: u64,
    pub bad_pieces: u64,
    pub busy_answers: u64,
    /// Piece bytes received, by the sender's site.
    pub received_by_site: std::collections::BTreeMap<String, u64>,
    /// Piece bytes received from sites other than this node's.
    pub cross_site_bytes: u64,
}

/// The whole `/status` answer.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub peer_id: String,
    pub site: String,
    pub role: Role,
    pub listen: Vec<String>,
    pub peers: Vec<PeerReport>,
    pub versions: Vec<VersionReport>,
    #[serde(flatten)]
    pub node: NodeStatus,
    pub totals: Totals,
}

impl ApiState {
    pub async fn report(&self) -> StatusReport {
        let (tx, rx) = oneshot::channel();
        let node = match self.commands.send(NodeCommand::Status(tx)).await {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => NodeStatus::default(),
        };
        let mut peers: Vec<PeerReport> = self
            .net
            .peers()
            .await
            .into_iter()
            .map(|p| PeerReport {
                peer: p.peer.to_string(),
                site: p.info.site,
                role: p.info.role,
                connections: p.connections,
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let by_site = self.download.by_site();
        StatusReport {
            peer_id: self.net.local_peer_id.to_string(),
            site: self.site.clone(),
            role: self.role,
            listen: self
                .net
                .listen_addrs()
                .await
                .iter()
                .map(|a| a.to_string())
                .collect(),
            peers,
            versions: self
                .library
                .summary()
                .into_iter()
                .map(
                    |(id, image, version, complete, verified, total)| VersionReport {
                        image,
                        version,
                        manifest: id.to_hex(),
                        complete,
                        verified_pieces: verified,
                        total_pieces: total,
                        first_pass_left: self.library.first_pass_left(&id),
                    },
                )
                .collect(),
            node,
            totals: Totals {
                uploaded_bytes: self.upload.bytes.load(Ordering::Relaxed),
                uploaded_pieces: self.upload.pieces.load(Ordering::Relaxed),
                served_requests: self.upload.spans.load(Ordering::Relaxed),
                received_bytes: self.download.received_bytes.load(Ordering::Relaxed),
                reused_bytes: self.download.reused_bytes.load(Ordering::Relaxed),
                bad_pieces: self.download.bad_pieces.load(Ordering::Relaxed),
                busy_answers: self.upload.busy.load(Ordering::Relaxed),
                cross_site_bytes: by_site
                    .iter()
                    .filter(|(site, _)| **site != self.site)
                    .map(|(_, n)| n)
                    .sum(),
                received_by_site: by_site,
            },
        }
    }
}

async fn status(State(state): State<ApiState>) -> Json<StatusReport> {
    Json(state.report().await)
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let r = state.report().await;
    let mut text = Metrics::default();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        text.family(name, kind, help, samples)
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "uploaded_bytes_total",
        "counter",
        "Piece bytes sent to peers.",
        &one(r.totals.uploaded_bytes),
    );
    metric(
        "uploaded_pieces_total",
        "counter",
        "Pieces sent to peers.",
        &one(r.totals.uploaded_pieces),
    );
    metric(
        "served_requests_total",
        "counter",
        "Piece requests (spans of adjacent pieces) served, in part or whole.",
        &one(r.totals.served_requests),
    );
    metric(
        "received_bytes_total",
        "counter",
        "Piece bytes received from peers.",
        &one(r.totals.received_bytes),
    );
    metric(
        "reused_bytes_total",
        "counter",
        "Piece bytes taken from an older local version.",
        &one(r.totals.reused_bytes),
    );
    metric(
        "bad_pieces_total",
        "counter",
        "Pieces that failed their hash check.",
        &one(r.totals.bad_pieces),
    );
    metric(
        "busy_answers_total",
        "counter",
        "Piece requests answered busy, missing or unknown.",
        &one(r.totals.busy_answers),
    );
    let by_site: Vec<(String, u64)> = r
        .totals
        .received_by_site
        .iter()
        .map(|(site, n)| (format!("{{from_site=\"{site}\"}}"), *n))
        .collect();
    metric(
        "received_bytes_by_site_total",
        "counter",
        "Piece bytes received, by the sending peer's site.",
        &by_site,
    );
    metric(
        "cross_site_bytes_total",
        "counter",
        "Piece bytes received from peers of other sites (the origin included).",
        &one(r.totals.cross_site_bytes),
    );
    metric(
        "peers",
        "gauge",
        "Connected imiswarm peers.",
        &one(r.peers.len() as u64),
    );
    metric(
        "peer_connections",
        "gauge",
        "Established connections with connected imiswarm peers.",
        &one(r.peers.iter().map(|p| u64::from(p.connections)).sum()),
    );
    let label = |image: &str, version: u64| format!("{{image=\"{image}\",version=\"{version}\"}}");
    let versions = |f: fn(&VersionReport) -> u64| -> Vec<(String, u64)> {
        r.versions
            .iter()
            .map(|v| (label(&v.image, v.version), f(v)))
            .collect()
    };
    metric(
        "version_verified_pieces",
        "gauge",
        "Verified pieces of a version held or being fetched.",
        &versions(|v| u64::from(v.verified_pieces)),
    );
    metric(
        "version_pieces",
        "gauge",
        "Pieces of a version.",
        &versions(|v| u64::from(v.total_pieces)),
    );
    let rates: Vec<(String, u64)> = r
        .node
        .downloads
        .iter()
        .map(|d| (label(&d.image, d.version), d.progress.rate_bytes_per_sec))
        .collect();
    metric(
        "download_rate_bytes",
        "gauge",
        "Recent receive rate of a download, bytes per second.",
        &rates,
    );
    text.into_response()
}

/// Prometheus text exposition, one metric family at a time.
#[derive(Debug, Default)]
pub struct Metrics {
    out: String,
}

impl Metrics {
    /// Adds `imiswarm_<name>` with its samples: (`{label="value",...}` or empty, value).
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
        self.out.push_str(&format!(
            "# HELP imiswarm_{name} {help}\n# TYPE imiswarm_{name} {kind}\n"
        ));
        for (labels, value) in samples {
            self.out
                .push_str(&format!("imiswarm_{name}{labels} {value}\n"));
        }
    }

    pub fn into_response(self) -> impl IntoResponse {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            self.out,
        )
    }
}

/// How often the status file is rewritten.
const STATUS_FILE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Writes the `/status` report to `path` twice a second (for monitors that read files, and for
/// the testnet, whose nodes may sit in namespaces or containers it cannot reach by TCP). Each
/// write replaces the file in one rename, so a reader never sees half a report.
pub fn spawn_status_file(state: ApiState, path: std::path::PathBuf) {
    tokio::spawn(async move {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        loop {
            let report = state.report().await;
            if let Ok(json) = serde_json::to_vec(&report) {
                let written = tokio::fs::write(&tmp, json).await;
                if let Err(e) = written.and(tokio::fs::rename(&tmp, &path).await) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
                }
            }
            tokio::time::sleep(STATUS_FILE_EVERY).await;
        }
    });
}

/// Binds `addr` (an error names the setting) and serves the API in a task of its own.
pub async fn start(addr: SocketAddr, state: ApiState) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state);
    serve(addr, app).await
}

/// Binds `addr` and serves `app` in a task of its own; returns the bound address.
pub async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("api: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    tracing::info!(%bound, "control API listening");
    Ok(bound)
}

/// `GET http://addr/path` for `imiswarm status`: the API is on loopback and answers one small
/// document, so a plain HTTP/1.0 exchange is all the client needs.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| {
            anyhow::anyhow!("no imiswarm node answers on {addr} ({e}): is the daemon running?")
        })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(16 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {addr}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}
