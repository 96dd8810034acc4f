//! The demo and the simulation command: what `imiswarm-testnet demo` shows a newcomer.
//!
//! The demo builds a sample image in the origin's repository, hashes it in place into a
//! manifest, signs an announcement with a fresh publisher key, shows that a forged or untrusted
//! announcement and a corrupted copy are refused, then runs a real swarm on loopback (an origin
//! and two sites of cache servers, each a full imiswarm member with capped links), publishes
//! version 1 and then version 2 with 5% of its pieces changed, and reports times against the
//! fluid bound and a central server, the origin's upload, and bytes moved against bytes changed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use imiswarm_node::repo::{self, BuildRequest};
use imiswarm_protocol::announce::{Announcement, Lifecycle, PublisherKey, TrustedKeys};
use imiswarm_protocol::limits::DEFAULT_PIECE_SIZE;

use crate::sim::{SimConfig, SimNode, SimReport, simulate};

/// Options of `imiswarm-testnet simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Receivers per site.
    #[arg(long, default_value_t = 16)]
    pub receivers: usize,
    /// Number of sites (the origin sits at the first).
    #[arg(long, default_value_t = 1)]
    pub sites: u32,
    /// Image size in MiB.
    #[arg(long, default_value_t = 128)]
    pub mib: u64,
    /// Upload and download rate of every node, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    pub mbit: f64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run_simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    if args.receivers == 0 || args.sites == 0 || args.mib == 0 || args.mbit <= 0.0 {
        bail!("receivers, sites, mib and mbit must be positive");
    }
    let piece_bytes = u64::from(DEFAULT_PIECE_SIZE);
    let pieces =
        u32::try_from((args.mib << 20).div_ceil(piece_bytes)).context("image too large")?;
    let config = rollout_config(
        pieces,
        piece_bytes,
        args.receivers,
        args.sites,
        args.mbit,
        args.seed,
    );
    let report = simulate(&config);
    print_report(&config, &report, &mut std::io::stdout().lock())?;
    Ok(())
}

fn rollout_config(
    pieces: u32,
    piece_bytes: u64,
    per_site: usize,
    sites: u32,
    mbit: f64,
    seed: u64,
) -> SimConfig {
    let rate = mbit * 1e6 / 8.0;
    SimConfig {
        pieces,
        piece_bytes,
        origin_upload: rate,
        origin_site: 0,
        receivers: (0..sites)
            .flat_map(|site| {
                std::iter::repeat_n(
                    SimNode {
                        upload: rate,
                        download: rate,
                        site,
                    },
                    per_site,
                )
            })
            .collect(),
        step: Duration::from_millis(5),
        max_time: Duration::from_secs(3600),
        seed,
    }
}

/// A central server with the same upload link sends every receiver its own copy.
fn http_baseline_seconds(config: &SimConfig, image_bytes: u64) -> f64 {
    let n = config.receivers.len() as f64;
    let d_min = config
        .receivers
        .iter()
        .map(|r| r.download)
        .fold(f64::INFINITY, f64::min);
    (n * image_bytes as f64 / config.origin_upload).max(image_bytes as f64 / d_min)
}

fn print_report(config: &SimConfig, report: &SimReport, out: &mut dyn Write) -> anyhow::Result<()> {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    writeln!(out, "\n node  site  done at (virtual s)")?;
    for (i, (node, done)) in config
        .receivers
        .iter()
        .zip(&report.completion_secs)
        .enumerate()
    {
        let done = done.map_or("not finished".to_owned(), |s| format!("{s:8.2}"));
        writeln!(out, " r{:<4} {:>4}  {done}", i + 1, node.site)?;
    }
    let http = http_baseline_seconds(config, report.image_bytes);
    writeln!(out)?;
    writeln!(out, " receivers              {}", config.receivers.len())?;
    writeln!(
        out,
        " image                  {:.1} MiB in {} pieces",
        mib(report.image_bytes),
        config.pieces
    )?;
    writeln!(out, " distribution time T    {:.2} s", report.seconds)?;
    writeln!(
        out,
        " fluid bound T_min      {:.2} s   T/T_min = {:.3}",
        report.bound_seconds,
        report.ratio_to_bound()
    )?;
    writeln!(
        out,
        " central HTTP server    {:.2} s   swarm is {:.1}x faster",
        http,
        http / report.seconds
    )?;
    writeln!(
        out,
        " origin upload          {:.1} MiB = {:.2} x image",
        mib(report.origin_upload_bytes),
        report.origin_upload_bytes as f64 / report.image_bytes as f64
    )?;
    writeln!(
        out,
        " cross-site bytes       {:.1} MiB",
        mib(report.cross_site_bytes)
    )?;
    writeln!(
        out,
        " endgame waste          {:.1} MiB",
        mib(report.wasted_bytes)
    )?;
    Ok(())
}

/// Writes the sample image: a disk with random data and long runs of zeros (as VM disks have),
/// a boot file, and a configuration file smaller than a piece.
pub fn write_sample_image(dir: &Path, disk_mib: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("boot"))?;
    let mut disk = vec![0u8; disk_mib << 20];
    let mut stream = blake3::Hasher::new()
        .update(b"imiswarm demo")
        .finalize_xof();
    // Random data in the first half and in one island further on; zeros elsewhere.
    let half = disk.len() / 2;
    stream.fill(&mut disk[..half]);
    let island = half + disk.len() / 4;
    let island_len = (1 << 20).min(disk.len() / 8);
    stream.fill(&mut disk[island..island + island_len]);
    std::fs::write(dir.join("disk.img"), &disk)?;
    let mut initrd = vec![0u8; 3 << 20];
    stream.fill(&mut initrd);
    std::fs::write(dir.join("boot/initrd.img"), &initrd)?;
    std::fs::write(
        dir.join("site.conf"),
        b"site = \"lab-a\"\ncache = \"cache-a\"\n",
    )?;
    Ok(())
}

pub fn run_demo(workdir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp;
    let kept = workdir.is_some();
    let root = match workdir {
        // Checked here, not only by the runner at step 5, so a reused directory fails first.
        Some(dir) if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) => {
            bail!("{} is not empty: remove it or name another", dir.display())
        }
        Some(dir) => dir,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // The image repository of steps 1-4; the swarm of step 5 makes its own, under `swarm/`.
    let repo_dir = root.join("repository");
    let (image, version) = ("demo", 1);
    println!("imiswarm demo in {}", root.display());

    println!("\n1. an administrator produces {image}@{version} in the image repository");
    write_sample_image(&repo::version_dir(&repo_dir, image, version), 24)?;

    println!("2. the seed hashes it in place into a manifest");
    let progress = imiswarm_node::progress::ByteProgress::new("hashing");
    let manifest = repo::build_manifest(
        &BuildRequest {
            repo: &repo_dir,
            image,
            version,
            piece_size: DEFAULT_PIECE_SIZE,
            parent: None,
            boot_profile: Vec::new(),
        },
        &mut |total| progress.start(total),
        &mut |n| progress.advance(n),
    )?;
    progress.finish();
    let id = repo::write_manifest(&repo_dir, &manifest)?;
    let zero = manifest.zero_pieces();
    println!(
        "   manifest {id}: {} files, {} pieces, {zero} all-zero (never sent)",
        manifest.files.len(),
        manifest.piece_count()
    );

    println!("3. the publisher signs the announcement; nodes check it against their trusted keys");
    let publisher = PublisherKey::from_seed(*blake3::hash(b"demo publisher").as_bytes());
    let trusted = TrustedKeys::new([publisher.public()]);
    let announcement = Announcement {
        image: image.into(),
        version,
        manifest_id: id,
        total_size: manifest.total_size(),
        state: Lifecycle::Deployed,
        timestamp_ms: 0,
    };
    let signed = publisher.sign(announcement.clone())?;
    trusted
        .verify(&signed)
        .context("the genuine announcement must verify")?;
    println!("   genuine announcement: accepted");
    let mut forged = signed.clone();
    forged.announcement.manifest_id = imiswarm_protocol::Hash::of(b"another manifest");
    match trusted.verify(&forged) {
        Ok(_) => bail!("a forged announcement was accepted"),
        Err(e) => println!("   forged announcement:  refused ({e})"),
    }
    let stranger = PublisherKey::from_seed(*blake3::hash(b"stranger").as_bytes());
    match trusted.verify(&stranger.sign(announcement)?) {
        Ok(_) => bail!("an untrusted key was accepted"),
        Err(e) => println!("   untrusted publisher:  refused ({e})"),
    }

    println!("4. a receiver checks every piece; a corrupted copy is caught");
    let dir = repo::version_dir(&repo_dir, image, version);
    let copy = root.join("copy");
    copy_tree(&dir, &copy)?;
    let mut conf = std::fs::read(copy.join("boot/initrd.img"))?;
    conf[12345] ^= 0x40;
    std::fs::write(copy.join("boot/initrd.img"), conf)?;
    let intact = repo::verify_dir(&dir, &manifest, &mut |_| {})?;
    let damaged = repo::verify_dir(&copy, &manifest, &mut |_| {})?;
    if !intact.is_empty() || damaged.is_empty() {
        bail!("verification gave the wrong answer: {intact:?} / {damaged:?}");
    }
    println!("   original: ok; corrupted copy: {damaged:?}");

    println!(
        "5. a real swarm on this machine: a tracker, an origin and two sites of cache servers"
    );
    println!(
        "   and workstations, each an imiswarm process on 127.0.0.1 with {DEMO_MBIT} Mbit/s links;"
    );
    println!("   version 1, then version 2 with 5% of its pieces changed");
    let scenario = crate::scenario::Scenario::parse(DEMO_SCENARIO)?;
    let opts = crate::runner::RunOptions {
        backend: crate::backend::BackendKind::Process,
        workdir: root.join("swarm"),
        binary: std::env::current_exe().context("locating this program")?,
        size: None,
        http_baseline: true,
        progress: true,
    };
    let reports = crate::runner::run(&scenario, &opts)?;
    for report in &reports {
        println!("\n{}", report.table());
    }
    if let Some(last) = reports.last() {
        let svg = root.join("completion.svg");
        std::fs::write(&svg, last.svg())?;
        std::fs::write(
            root.join("report.json"),
            serde_json::to_string_pretty(&reports)?,
        )?;
        if kept {
            println!(
                "report: {} and {}",
                root.join("report.json").display(),
                svg.display()
            );
        } else {
            // The temporary directory goes when the demo ends.
            println!("to keep the report, its plot and every node's log: demo --workdir DIR");
        }
    }
    if reports.iter().any(|r| !r.all_correct) {
        bail!("some node ended with wrong files");
    }
    Ok(())
}

/// The demo's swarm: small enough to finish in about a minute on two cores.
const DEMO_SCENARIO: &str = r#"
name = "demo"
description = "Two sites of cache servers and workstations; version 1, then version 2."

[image]
size = "24MiB"
files = 3
zero_share = 0.25
changed_share = 0.05

[defaults]
upload = "200Mbit"
download = "200Mbit"

[[nodes]]
name = "tracker"
role = "tracker"
site = "centre"

[[nodes]]
name = "origin"
role = "origin"
site = "centre"

[[nodes]]
name = "cache-a"
role = "cache"
site = "lab-a"
count = 2

[[nodes]]
name = "ws-a"
role = "workstation"
site = "lab-a"
count = 2

[[nodes]]
name = "cache-b"
role = "cache"
site = "lab-b"
count = 2

[[nodes]]
name = "ws-b"
role = "workstation"
site = "lab-b"
count = 2

[[events]]
action = "publish"
version = 1

[[events]]
action = "wait"

[[events]]
action = "mark"

[[events]]
action = "publish"
version = 2

[[events]]
action = "wait"
"#;

/// Each demo link's rate, both ways.
const DEMO_MBIT: u64 = 200;

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for f in repo::scan(from)? {
        let target = to.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&f.path), &target)?;
    }
    Ok(())
}
