//! The swarm commands: `daemon`, `seed` and `fetch`. Each checks its settings, starts a
//! [`Member`] and decides when to stop; the member does the work.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::Outcome;
use crate::cli::{ExportArgs, FetchArgs, RetireArgs, SeedArgs};
use crate::config::NodeFlags;
use crate::member::{Member, Running, shutdown_signal, sign_and_save};
use crate::net::Role;
use crate::node::{Destination, Finished, Mode};
use crate::progress::ByteProgress;
use crate::store::CompleteVersion;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs what a member moved, for operators and for tests that read the log.
fn report_totals(running: &Running, site: &str) {
    let by_site = running.download_stats.by_site();
    let cross_site: u64 = by_site
        .iter()
        .filter(|(s, _)| s.as_str() != site)
        .map(|(_, n)| n)
        .sum();
    tracing::info!(
        uploaded_bytes = running.upload_stats.bytes.load(Ordering::Relaxed),
        uploaded_pieces = running.upload_stats.pieces.load(Ordering::Relaxed),
        served_requests = running.upload_stats.spans.load(Ordering::Relaxed),
        received_bytes = running
            .download_stats
            .received_bytes
            .load(Ordering::Relaxed),
        reused_bytes = running.download_stats.reused_bytes.load(Ordering::Relaxed),
        bad_pieces = running.download_stats.bad_pieces.load(Ordering::Relaxed),
        cross_site_bytes = cross_site,
        "totals"
    );
}

pub fn daemon(flags: &NodeFlags) -> anyhow::Result<Outcome> {
    let config = flags.resolve()?;
    runtime()?.block_on(async {
        let member = Member::start(
            &config,
            Role::Daemon,
            Mode::Follow {
                repo: config.repo.clone(),
                images: config.follow.clone(),
                keep: Some(config.keep_versions),
            },
        )
        .await?;
        println!("{}", member.net.local_peer_id);
        let mut running = member.spawn(shutdown_signal());
        loop {
            tokio::select! {
                finished = running.finished.recv() => match finished {
                    Some(Finished::Complete { image, version, .. }) => {
                        tracing::info!(%image, version, "complete");
                        report_totals(&running, &config.site);
                    }
                    Some(Finished::Failed { image, version, error }) => {
                        tracing::error!(%image, version, %error, "failed");
                    }
                    None => break,
                },
                _ = &mut running.task => break,
            }
        }
        report_totals(&running, &config.site);
        Ok(Outcome::Done)
    })
}

pub fn seed(args: &SeedArgs) -> anyhow::Result<Outcome> {
    let config = args.node.resolve()?;
    let key_path = config
        .publisher_key
        .clone()
        .context("publisher_key: not set (use --publisher-key or `publisher_key = ...`)")?;
    let publisher = crate::keys::read(&key_path)?;
    let repo = config.repo.clone();
    let manifest_path = crate::repo::manifest_path(&repo, &args.image, args.version);

    // Hash in place unless a valid manifest of this version is already there.
    let manifest = match crate::repo::read_manifest(&manifest_path) {
        Ok((m, _)) if !args.rehash => m,
        _ => {
            let progress = ByteProgress::new("hashing");
            let m = crate::repo::build_manifest(
                &crate::repo::BuildRequest {
                    repo: &repo,
                    image: &args.image,
                    version: args.version,
                    piece_size: args.piece_size,
                    parent: args.parent,
                    boot_profile: Vec::new(),
                },
                &mut |total| progress.start(total),
                &mut |n| progress.advance(n),
            )?;
            progress.finish();
            crate::repo::write_manifest(&repo, &m)?;
            m
        }
    };
    let dir = crate::repo::version_dir(&repo, &args.image, args.version);
    let version = CompleteVersion::open(&dir, manifest)?;
    let (signed, bytes) = sign_and_save(&repo, &version, &publisher)?;
    println!("{}  {}@{}", version.id, args.image, args.version);

    runtime()?.block_on(async {
        let member = Member::start(
            &config,
            Role::Seed,
            Mode::Follow {
                repo: repo.clone(),
                images: vec![],
                keep: None,
            },
        )
        .await?;
        let mut running = member.spawn(shutdown_signal());
        running.publish(version, signed, bytes).await;
        let _ = (&mut running.task).await;
        report_totals(&running, &config.site);
        Ok(Outcome::Done)
    })
}

pub fn fetch(args: &FetchArgs) -> anyhow::Result<Outcome> {
    let config = args.node.resolve_as(false, 0, None)?;
    let into = match (&args.out, config.repo.as_os_str().is_empty()) {
        (Some(out), _) => {
            if out.exists() {
                bail!("{} already exists: fetch creates it", out.display());
            }
            // Absolute, so the bookkeeping beside it has a real parent directory.
            Destination::Dir(std::path::absolute(out).context("resolving --out")?)
        }
        (None, false) => Destination::Repo(config.repo.clone()),
        (None, true) => bail!("out: not set (use --out DIR, or --repo to fetch into a repository)"),
    };
    if config.bootstrap.is_empty() {
        bail!("bootstrap: no peer to join (use --bootstrap)");
    }
    let (image, version) = args.target.clone();
    runtime()?.block_on(async {
        let member = Member::start(
            &config,
            Role::Fetch,
            Mode::Fetch {
                image: image.clone(),
                version,
                into: into.clone(),
            },
        )
        .await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut running = member.spawn(async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = shutdown_signal() => {}
            }
        });
        let deadline = tokio::time::sleep(Duration::from_secs(args.timeout));
        tokio::pin!(deadline);
        // A bar for the person at the console (hidden when stderr is not a terminal).
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} pieces ({percent}%) eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("fetching {image}"));
        let library = running.library.clone();
        let ticker = bar.clone();
        let show = tokio::spawn(async move {
            loop {
                if let Some(s) = library.summary().into_iter().find(|s| !s.3) {
                    ticker.set_length(u64::from(s.5));
                    ticker.set_position(u64::from(s.4));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // Fetched into a repository, the version is in use while this command runs.
        let mut lease = None;
        let outcome = tokio::select! {
            finished = running.finished.recv() => match finished {
                Some(Finished::Complete { dir, version, .. }) => {
                    println!("{}  {image}@{version}", dir.display());
                    if let Destination::Repo(repo) = &into {
                        lease = Some(crate::lease::Lease::take(repo, &image, version)?);
                    }
                    Outcome::Done
                }
                Some(Finished::Failed { error, .. }) => {
                    eprintln!("imiswarm: fetch failed: {error}");
                    Outcome::Failed
                }
                None => Outcome::Failed,
            },
            _ = &mut deadline => {
                let started = !running.library.summary().is_empty();
                eprintln!(
                    "imiswarm: {} after {} s",
                    if started { "fetch did not finish" } else { "no trusted announcement of the image was found" },
                    args.timeout
                );
                if started { Outcome::Failed } else { Outcome::NotFound }
            }
        };
        show.abort();
        bar.finish_and_clear();
        if outcome == Outcome::Done && args.linger > 0 {
            tracing::info!(seconds = args.linger, "lingering to serve pieces");
            // A stop (Ctrl-C, SIGTERM) ends the lingering early, with the totals logged.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(args.linger)) => {}
                _ = shutdown_signal() => {}
            }
        }
        report_totals(&running, &config.site);
        let _ = stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut running.task).await;
        drop(lease);
        Ok(outcome)
    })
}

/// Signs a retirement of a version in the repository, saves it beside the version (so the
/// image server's own seed knows after a restart) and gossips it through the swarm.
pub fn retire(args: &RetireArgs) -> anyhow::Result<Outcome> {
    let mut config = args.node.resolve_as(true, 0, None)?;
    // A short-lived member: any free port, and no control API to collide with a running seed's.
    config.api = None;
    let key_path = config
        .publisher_key
        .clone()
        .context("publisher_key: not set (use --publisher-key or `publisher_key = ...`)")?;
    let publisher = crate::keys::read(&key_path)?;
    let (image, version) = args.target.clone();
    let (manifest, id) =
        crate::repo::read_manifest(&crate::repo::manifest_path(&config.repo, &image, version))
            .with_context(|| {
                format!("retire needs the manifest of {image}@{version} in the repository")
            })?;
    let signed = publisher.sign(imiswarm_protocol::Announcement {
        image: image.clone(),
        version,
        manifest_id: id,
        total_size: manifest.total_size(),
        state: imiswarm_protocol::Lifecycle::Retired,
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("system clock before 1970")?
            .as_millis() as u64,
    })?;
    let bytes = imiswarm_protocol::codec::WireFormat::encode(&signed)?;
    crate::repo::write_atomic(
        &config
            .repo
            .join(&image)
            .join(format!("{version}.announcement")),
        &bytes,
    )?;
    if config.bootstrap.is_empty() {
        println!("{image}@{version} retired (saved; no --bootstrap peer to gossip it to)");
        return Ok(Outcome::Done);
    }
    runtime()?.block_on(async {
        let member = Member::start(&config, Role::Fetch, Mode::Publish).await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = member.spawn(async move {
            let _ = stop_rx.await;
        });
        let _ = running
            .commands
            .send(crate::node::NodeCommand::Remember(signed))
            .await;
        let gossip = crate::member::spawn_gossip(running.net.clone(), bytes);
        let sent = tokio::time::timeout(Duration::from_secs(60), gossip)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if sent {
            // Peers that connect meanwhile read it from this member's catalogue.
            tokio::time::sleep(Duration::from_secs(args.linger)).await;
            println!("{image}@{version} retired");
        } else {
            eprintln!("imiswarm: no peer heard the retirement within 60 s (it is saved)");
        }
        let _ = stop_tx.send(());
        Ok(if sent { Outcome::Done } else { Outcome::Failed })
    })
}

/// Holds a lease on a version while COMMAND runs (or until Ctrl-C / SIGTERM), so a daemon's
/// retention leaves it alone.
pub fn export(args: &ExportArgs) -> anyhow::Result<Outcome> {
    let (image, version) = args.target.clone();
    // The lease first, then the look: see `repo::remove_version` for why this order is safe.
    let lease = crate::lease::Lease::take(&args.repo, &image, version)
        .with_context(|| format!("taking a lease in {}", args.repo.display()))?;
    let dir = crate::repo::version_dir(&args.repo, &image, version);
    if !dir.is_dir() || !crate::repo::manifest_path(&args.repo, &image, version).is_file() {
        drop(lease);
        eprintln!(
            "imiswarm: {image}@{version} is not complete in {}",
            args.repo.display()
        );
        return Ok(Outcome::NotFound);
    }
    let outcome = match args.command.split_first() {
        None => {
            println!("{}", dir.display());
            runtime()?.block_on(shutdown_signal());
            Outcome::Done
        }
        Some((program, rest)) => {
            let status = std::process::Command::new(program)
                .args(rest)
                .env("IMISWARM_VERSION_DIR", &dir)
                .status()
                .with_context(|| format!("running {program}"))?;
            if status.success() {
                Outcome::Done
            } else {
                Outcome::Failed
            }
        }
    };
    drop(lease);
    Ok(outcome)
}

/// Prints the local node's status report (`--json`: as the API returns it).
pub fn status(api: std::net::SocketAddr, json: bool) -> anyhow::Result<Outcome> {
    let body = crate::api::http_get(api, "/status")?;
    if json {
        println!("{body}");
        return Ok(Outcome::Done);
    }
    let r: serde_json::Value =
        serde_json::from_str(&body).context("the status report is not JSON")?;
    let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);
    println!(
        "node {}  site {}  role {}  peers {}",
        r["peer_id"].as_str().unwrap_or("?"),
        r["site"].as_str().unwrap_or("?"),
        r["role"].as_str().unwrap_or("?"),
        r["peers"].as_array().map_or(0, Vec::len)
    );
    for v in r["versions"].as_array().into_iter().flatten() {
        println!(
            "  {}@{}  {}  {}/{} pieces",
            v["image"].as_str().unwrap_or("?"),
            v["version"],
            if v["complete"].as_bool() == Some(true) {
                "complete"
            } else {
                "partial"
            },
            v["verified_pieces"],
            v["total_pieces"]
        );
    }
    for d in r["downloads"].as_array().into_iter().flatten() {
        let sources: Vec<String> = d["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let peer = s["peer"].as_str().unwrap_or("?");
                format!(
                    "{}… {:.1} MiB",
                    &peer[peer.len().saturating_sub(8)..],
                    mib(&s["bytes"])
                )
            })
            .collect();
        println!(
            "  fetching {}@{}: {}/{} pieces, {:.1} MiB/s from {} peers: {}",
            d["image"].as_str().unwrap_or("?"),
            d["version"],
            d["verified_pieces"],
            d["total_pieces"],
            mib(&d["rate_bytes_per_sec"]),
            d["peers"],
            sources.join(", ")
        );
    }
    let t = &r["totals"];
    println!(
        "  totals: uploaded {:.1} MiB, received {:.1} MiB, reused {:.1} MiB, bad pieces {}",
        mib(&t["uploaded_bytes"]),
        mib(&t["received_bytes"]),
        mib(&t["reused_bytes"]),
        t["bad_pieces"]
    );
    Ok(Outcome::Done)
}
