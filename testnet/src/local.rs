//! A real swarm inside this process: an origin and daemons, each a full imiswarm member with its
//! own libp2p swarm, repository and rate limits, talking over TCP on 127.0.0.1.
//!
//! Owns starting the members, watching them finish and collecting their counters. The members
//! are the node crate's own: nothing here imitates swarm behaviour. Link rates are enforced by
//! each member's limiter (the `process` backend's way); kernels shape links in the netns backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use imiswarm_node::config::NodeConfig;
use imiswarm_node::member::{Member, Running, sign_and_save};
use imiswarm_node::net::Role;
use imiswarm_node::node::Mode;
use imiswarm_node::store::CompleteVersion;
use imiswarm_protocol::PublisherKey;

/// One receiver of a local rollout.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub name: String,
    pub site: String,
}

/// What one member moved and when it finished.
#[derive(Debug, Clone)]
pub struct NodeResult {
    pub name: String,
    pub site: String,
    pub seconds: Option<f64>,
    pub received_bytes: u64,
    pub reused_bytes: u64,
    pub uploaded_bytes: u64,
}

/// A running local swarm: the origin and its receivers.
pub struct LocalSwarm {
    root: PathBuf,
    publisher: PublisherKey,
    rate: Option<u64>,
    origin: Option<Running>,
    origin_addr: String,
    nodes: Vec<(LocalNode, Running)>,
}

impl std::fmt::Debug for LocalSwarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSwarm")
            .field("root", &self.root)
            .finish()
    }
}

fn config(
    root: &Path,
    name: &str,
    site: &str,
    rate: Option<u64>,
    trusted: imiswarm_protocol::PublicKey,
    bootstrap: Vec<String>,
) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig {
        repo: root.join(name),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap: bootstrap
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?,
        site: site.to_owned(),
        trusted: vec![trusted],
        follow: vec![],
        upload_rate: rate,
        download_rate: rate,
        keep_versions: 2,
        node_key: Some(root.join(format!("{name}.key"))),
        publisher_key: None,
        addr_file: None,
        api: None,
        mdns: false,
        database: None,
        status_file: None,
        blocklist: None,
        corrupt_uploads: false,
    })
}

impl LocalSwarm {
    /// Starts the origin (repository `<root>/origin`) and the receivers, all idle.
    pub async fn start(
        root: &Path,
        publisher: PublisherKey,
        origin_site: &str,
        nodes: &[LocalNode],
        rate: Option<u64>,
    ) -> anyhow::Result<Self> {
        let trusted = publisher.public();
        let origin_config = config(root, "origin", origin_site, rate, trusted, vec![])?;
        let origin = Member::start(
            &origin_config,
            Role::Seed,
            Mode::Follow {
                repo: origin_config.repo.clone(),
                images: vec![],
                keep: None,
            },
        )
        .await?;
        let origin_addr = origin
            .net
            .listen_addrs()
            .await
            .first()
            .context("the origin listens nowhere")?
            .to_string();
        let mut swarm = Self {
            root: root.to_path_buf(),
            publisher,
            rate,
            origin: Some(origin.spawn(std::future::pending())),
            origin_addr,
            nodes: Vec::new(),
        };
        for node in nodes {
            let c = config(
                root,
                &node.name,
                &node.site,
                swarm.rate,
                trusted,
                vec![swarm.origin_addr.clone()],
            )?;
            let member = Member::start(
                &c,
                Role::Daemon,
                Mode::Follow {
                    repo: c.repo.clone(),
                    images: vec![],
                    keep: Some(c.keep_versions),
                },
            )
            .await?;
            swarm
                .nodes
                .push((node.clone(), member.spawn(std::future::pending())));
        }
        Ok(swarm)
    }

    /// The origin's repository, where versions are produced before they are published.
    pub fn origin_repo(&self) -> PathBuf {
        self.root.join("origin")
    }

    /// Publishes a version already hashed into a manifest at the origin, then waits until
    /// every receiver holds it (at most `timeout`), printing progress once a second.
    pub async fn publish_and_wait(
        &mut self,
        image: &str,
        version: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<NodeResult>> {
        let repo = self.origin_repo();
        let (manifest, _) = imiswarm_node::repo::read_manifest(
            &imiswarm_node::repo::manifest_path(&repo, image, version),
        )?;
        let complete = CompleteVersion::open(
            &imiswarm_node::repo::version_dir(&repo, image, version),
            manifest,
        )?;
        let (signed, bytes) = sign_and_save(&repo, &complete, &self.publisher)?;
        let before: Vec<(u64, u64, u64)> = self.nodes.iter().map(|(_, r)| counters(r)).collect();
        let origin = self.origin.as_ref().context("origin stopped")?;
        origin.publish(complete, signed, bytes).await;

        let start = Instant::now();
        let mut done: Vec<Option<f64>> = vec![None; self.nodes.len()];
        let mut last_print = Instant::now();
        while done.iter().any(Option::is_none) {
            if start.elapsed() > timeout {
                bail!("not every node finished within {timeout:?}");
            }
            for (i, (node, _)) in self.nodes.iter().enumerate() {
                if done[i].is_none()
                    && imiswarm_node::repo::version_dir(&self.root.join(&node.name), image, version)
                        .is_dir()
                {
                    done[i] = Some(start.elapsed().as_secs_f64());
                }
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let line: Vec<String> = self
                    .nodes
                    .iter()
                    .zip(&done)
                    .map(|((node, running), d)| match d {
                        Some(_) => format!("{} done", node.name),
                        None => {
                            let (have, total) = running
                                .library
                                .summary()
                                .iter()
                                .find(|s| s.1 == image && s.2 == version)
                                .map_or((0, 0), |s| (s.4, s.5));
                            format!("{} {have}/{total}", node.name)
                        }
                    })
                    .collect();
                println!(
                    "   {:5.1} s  {}",
                    start.elapsed().as_secs_f64(),
                    line.join("  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(self
            .nodes
            .iter()
            .zip(done)
            .zip(before)
            .map(|(((node, running), seconds), (rx0, reuse0, up0))| {
                let (rx, reuse, up) = counters(running);
                NodeResult {
                    name: node.name.clone(),
                    site: node.site.clone(),
                    seconds,
                    received_bytes: rx - rx0,
                    reused_bytes: reuse - reuse0,
                    uploaded_bytes: up - up0,
                }
            })
            .collect())
    }

    /// Bytes the origin has uploaded so far.
    pub fn origin_uploaded(&self) -> u64 {
        self.origin
            .as_ref()
            .map_or(0, |o| o.upload_stats.bytes.load(Ordering::Relaxed))
    }

    /// Stops every member.
    pub fn stop(mut self) {
        for (_, r) in self.nodes.drain(..) {
            r.task.abort();
        }
        if let Some(o) = self.origin.take() {
            o.task.abort();
        }
    }
}

fn counters(r: &Running) -> (u64, u64, u64) {
    (
        r.download_stats.received_bytes.load(Ordering::Relaxed),
        r.download_stats.reused_bytes.load(Ordering::Relaxed),
        r.upload_stats.bytes.load(Ordering::Relaxed),
    )
}
