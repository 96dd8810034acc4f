//! Starting a swarm member: identity, network, what the repository already holds, the uploader
//! and the node task. The `daemon`, `seed` and `fetch` commands differ only in their [`Mode`]
//! and what they do around [`Member::run`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use imiswarm_protocol::announce::{SignedAnnouncement, TrustedKeys};
use imiswarm_protocol::codec::WireFormat;
use tokio::sync::{Semaphore, mpsc};

use crate::config::NodeConfig;
use crate::library::Library;
use crate::net::{self, NetConfig, NetEvent, NetHandle, Role};
use crate::node::{Finished, Mode, Node, NodeCommand};
use crate::store::{CompleteVersion, PartialVersion, VersionPaths};
use crate::transfer::download::{DownloadContext, DownloadStats};
use crate::transfer::haves::{self, HaveSender};
use crate::transfer::ratelimit::RateLimiter;
use crate::transfer::upload::{UploadStats, Uploader};

/// Concurrent piece uploads per node; more requests are answered "busy".
pub const UPLOAD_SLOTS: usize = 32;

/// A started member, not yet running its node loop.
pub struct Member {
    pub net: NetHandle,
    pub node: Node,
    pub library: Arc<Library>,
    pub upload_stats: Arc<UploadStats>,
    pub download_stats: Arc<DownloadStats>,
    pub finished: mpsc::Receiver<Finished>,
    /// Where the control API listens, if it does.
    pub api: Option<std::net::SocketAddr>,
    events: mpsc::Receiver<NetEvent>,
    commands: mpsc::Sender<NodeCommand>,
    commands_rx: mpsc::Receiver<NodeCommand>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("net", &self.net).finish()
    }
}

/// The node identity: from the configured key file (created on first start), or a fresh one.
fn node_keypair(config: &NodeConfig) -> anyhow::Result<libp2p::identity::Keypair> {
    let key = match &config.node_key {
        Some(path) if path.exists() => crate::keys::read(path)?,
        Some(path) => {
            let key = crate::keys::generate()?;
            crate::keys::write(path, &key, false)?;
            key
        }
        None => crate::keys::generate()?,
    };
    Ok(net::keypair_from_seed(key.seed()))
}

/// Starts the network layer as `config` says and writes the listen addresses to the address
/// file, if one is set (for scripts and tests that start nodes on port 0).
pub async fn start_net(
    config: &NodeConfig,
    role: Role,
    trusted: &TrustedKeys,
) -> anyhow::Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    // Read before the network starts, so a listed peer is never dialled or accepted.
    let blocklist = match &config.blocklist {
        Some(path) => {
            // Read before the file is watched, so an edit in between is still noticed.
            let watch = crate::blocklist::Watch::new(path.clone());
            let list = crate::blocklist::read(path)?;
            Some((watch, list))
        }
        None => None,
    };
    let (net, events) = net::start(NetConfig {
        keypair: node_keypair(config)?,
        listen: config.listen.clone(),
        bootstrap: config.bootstrap.clone(),
        site: config.site.clone(),
        role,
        trusted: trusted.clone(),
        mdns: config.mdns,
        blocked: blocklist
            .as_ref()
            .map(|(_, list)| list.peers.clone())
            .unwrap_or_default(),
        liveness: net::Liveness::default(),
    })
    .await?;
    if let Some((watch, list)) = blocklist {
        // In force from the network's first moment (NetConfig::blocked).
        crate::blocklist::log_applied(list.peers.len(), &list.digest);
        crate::blocklist::spawn_watch(watch, list, net.blocklist_setter());
    }
    if let Some(path) = &config.addr_file {
        let text: String = net
            .listen_addrs()
            .await
            .iter()
            .map(|a| format!("{a}\n"))
            .collect();
        crate::repo::write_atomic(path, text.as_bytes())?;
    }
    Ok((net, events))
}

impl Member {
    pub async fn start(config: &NodeConfig, role: Role, mode: Mode) -> anyhow::Result<Self> {
        let trusted = TrustedKeys::new(config.trusted.iter().copied());
        if trusted.is_empty() {
            tracing::warn!("no trusted publisher keys: every announcement will be refused");
        }
        let (net, events) = start_net(config, role, &trusted).await?;

        let library = Arc::new(Library::default());
        let upload_stats = Arc::new(UploadStats::default());
        let download_stats = Arc::new(DownloadStats::default());
        let uploader = Uploader {
            library: library.clone(),
            limiter: Arc::new(RateLimiter::new(config.upload_rate)),
            stats: upload_stats.clone(),
            slots: Arc::new(Semaphore::new(UPLOAD_SLOTS)),
            corrupt: config.corrupt_uploads,
        };
        let control = net.streams();
        tokio::spawn(async move {
            if let Err(e) = uploader.run(control).await {
                tracing::error!(error = %e, "uploader stopped");
            }
        });
        let ctx = DownloadContext {
            net: net.clone(),
            haves: HaveSender::new(net.clone()),
            library: library.clone(),
            limiter: Arc::new(RateLimiter::new(config.download_rate)),
            stats: download_stats.clone(),
            site_settle: match role {
                Role::Fetch => crate::transfer::download::WORKSTATION_SITE_SETTLE,
                _ => crate::transfer::download::SITE_SETTLE,
            },
            streams: Default::default(),
        };
        let (finished_tx, finished) = mpsc::channel(16);
        let mut node = Node::new(
            ctx,
            trusted.clone(),
            mode.clone(),
            config.site.clone(),
            finished_tx,
        );
        let (control, inbox) = (net.streams(), node.have_inbox());
        tokio::spawn(async move {
            if let Err(e) = haves::accept(control, inbox).await {
                tracing::error!(error = %e, "haves stopped");
            }
        });
        if let Mode::Follow { repo, .. } = &mode {
            load_repo(repo, &library, &mut node, &trusted)?;
        }
        let (commands, commands_rx) = mpsc::channel(16);
        let api_state = crate::api::ApiState {
            net: net.clone(),
            library: library.clone(),
            upload: upload_stats.clone(),
            download: download_stats.clone(),
            commands: commands.clone(),
            site: config.site.clone(),
            role,
        };
        if let Some(path) = &config.status_file {
            crate::api::spawn_status_file(api_state.clone(), path.clone());
        }
        let api = match config.api {
            Some(addr) => Some(crate::api::start(addr, api_state).await?),
            None => None,
        };
        Ok(Self {
            net,
            node,
            library,
            upload_stats,
            download_stats,
            finished,
            api,
            events,
            commands,
            commands_rx,
        })
    }

    /// Runs the node loop until `shutdown` resolves. Returns the counters for a final report.
    pub fn spawn(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Running {
        let Member {
            net,
            node,
            library,
            upload_stats,
            download_stats,
            finished,
            events,
            commands,
            commands_rx,
            ..
        } = self;
        let task = tokio::spawn(node.run(events, commands_rx, shutdown));
        Running {
            net,
            commands,
            library,
            upload_stats,
            download_stats,
            finished,
            task,
        }
    }
}

/// Gossips an announcement, retrying (for up to ten minutes) until some peer has heard it;
/// nodes that connect later read it from the catalogue. The task ends with whether it was sent.
pub fn spawn_gossip(net: NetHandle, bytes: Vec<u8>) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        for attempt in 0..650 {
            match net.publish(bytes.clone()).await {
                Ok(()) => {
                    tracing::info!("announcement gossiped");
                    return true;
                }
                // Content-addressed ids: this exact announcement is already out.
                Err(e) if e.to_string().contains("Duplicate") => return true,
                Err(e) => tracing::debug!(error = %e, "gossip not delivered yet"),
            }
            // A seed that has just started has no gossip peers for a moment: ask again soon
            // at first (every publish waits on this), then once a second.
            let pause = if attempt < 50 { 100 } else { 1000 };
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        false
    })
}

/// A member whose node loop runs in its own task.
#[derive(Debug)]
pub struct Running {
    pub net: NetHandle,
    pub commands: mpsc::Sender<NodeCommand>,
    pub library: Arc<Library>,
    pub upload_stats: Arc<UploadStats>,
    pub download_stats: Arc<DownloadStats>,
    pub finished: mpsc::Receiver<Finished>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Publishes `version` from this running member (the origin): served with super-seeding,
    /// in its catalogue, gossiped.
    pub async fn publish(
        &self,
        version: CompleteVersion,
        signed: SignedAnnouncement,
        bytes: Vec<u8>,
    ) {
        let id = version.id;
        tracing::info!(
            image = %version.manifest.image,
            version = version.manifest.version,
            manifest = %id,
            "published"
        );
        self.library.add_complete(Arc::new(version));
        self.library.set_origin(id);
        let _ = self.commands.send(NodeCommand::Remember(signed)).await;
        spawn_gossip(self.net.clone(), bytes);
    }
}

/// Loads what a repository holds: complete versions (served at once) and partial downloads
/// (resumed). An entry that cannot be read is reported and skipped, never deleted.
fn load_repo(
    repo: &Path,
    library: &Library,
    node: &mut Node,
    trusted: &TrustedKeys,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo)
        .with_context(|| format!("creating the repository {}", repo.display()))?;
    for (image, version, manifest_path) in manifests_in(repo)? {
        let dir = crate::repo::version_dir(repo, &image, version);
        if !dir.is_dir() {
            continue;
        }
        match crate::repo::read_manifest(&manifest_path)
            .map_err(anyhow::Error::from)
            .and_then(|(m, _)| CompleteVersion::open(&dir, m).map_err(anyhow::Error::from))
        {
            Ok(v) => {
                tracing::info!(%image, version, "serving local version");
                library.add_complete(Arc::new(v));
                if let Some(signed) = read_announcement(
                    &repo.join(&image).join(format!("{version}.announcement")),
                    trusted,
                ) {
                    node.remember(signed);
                }
            }
            Err(e) => tracing::warn!(%image, version, error = %e, "skipping unreadable version"),
        }
    }
    let partial_root = repo.join(".partial");
    if partial_root.is_dir() {
        for (image, version, manifest_path) in manifests_in(&partial_root)? {
            let Some(signed) = read_announcement(
                &partial_root
                    .join(&image)
                    .join(format!("{version}.announcement")),
                trusted,
            ) else {
                continue;
            };
            let resumed = crate::repo::read_manifest(&manifest_path)
                .map_err(anyhow::Error::from)
                .and_then(|(m, id)| {
                    anyhow::ensure!(
                        id == signed.announcement.manifest_id,
                        "manifest does not match its announcement"
                    );
                    Ok(PartialVersion::open(
                        VersionPaths::in_repo(repo, &image, version),
                        m,
                    )?)
                });
            match resumed {
                Ok(partial) => {
                    tracing::info!(%image, version, missing = partial.missing(), "resuming download");
                    node.resume(signed, Arc::new(partial));
                }
                Err(e) => tracing::warn!(%image, version, error = %e, "cannot resume download"),
            }
        }
    }
    Ok(())
}

/// `(image, version, path)` of every `<root>/<image>/<version>.manifest`.
fn manifests_in(root: &Path) -> anyhow::Result<Vec<(String, u64, PathBuf)>> {
    let mut out = Vec::new();
    for image in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let image = image?;
        let Some(name) = image.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if imiswarm_protocol::path::check_image_name(&name).is_err() || !image.file_type()?.is_dir()
        {
            continue;
        }
        for entry in std::fs::read_dir(image.path())? {
            let entry = entry?;
            let file = entry.file_name();
            let Some(version) = file
                .to_str()
                .and_then(|f| f.strip_suffix(".manifest"))
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            out.push((name.clone(), version, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn read_announcement(path: &Path, trusted: &TrustedKeys) -> Option<SignedAnnouncement> {
    let bytes = std::fs::read(path).ok()?;
    match trusted.decode_and_verify(&bytes) {
        Ok(signed) => Some(signed),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring saved announcement");
            None
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (systemd's stop).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Signs a "deployed" announcement of a complete version, saves it beside the version as
/// `<repo>/<image>/<version>.announcement`, and returns it with its bytes.
pub fn sign_and_save(
    repo: &Path,
    version: &CompleteVersion,
    publisher: &imiswarm_protocol::PublisherKey,
) -> anyhow::Result<(SignedAnnouncement, Vec<u8>)> {
    let m = &version.manifest;
    let signed = publisher.sign(imiswarm_protocol::Announcement {
        image: m.image.clone(),
        version: m.version,
        manifest_id: version.id,
        total_size: m.total_size(),
        state: imiswarm_protocol::Lifecycle::Deployed,
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("system clock before 1970")?
            .as_millis() as u64,
    })?;
    let bytes = signed.encode()?;
    crate::repo::write_atomic(
        &repo
            .join(&m.image)
            .join(format!("{}.announcement", m.version)),
        &bytes,
    )?;
    Ok((signed, bytes))
}
