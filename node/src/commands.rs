//! One function per subcommand. Each returns an [`Outcome`] for the exit code, or an error that
//! `main` prints as one line; user-facing results go to stdout, diagnostics to stderr.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use imiswarm_protocol::announce::{Announcement, Lifecycle, SignedAnnouncement, TrustedKeys};
use imiswarm_protocol::codec::WireFormat;

use crate::Outcome;
use crate::cli::{AnnounceCommand, Command, KeygenArgs, ManifestCommand, VersionRef};
use crate::progress::ByteProgress;
use crate::repo;

pub fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Keygen(args) => keygen(args),
        Command::Manifest(cmd) => manifest(cmd),
        Command::Announce(cmd) => announce(cmd),
        Command::Daemon { node } => crate::swarm_commands::daemon(&node),
        Command::Seed(args) => crate::swarm_commands::seed(&args),
        Command::Fetch(args) => crate::swarm_commands::fetch(&args),
        Command::Status { api, json } => crate::swarm_commands::status(api, json),
        Command::Tracker { node } => crate::tracker_service::run(&node),
        Command::Retire(args) => crate::swarm_commands::retire(&args),
        Command::Export(args) => crate::swarm_commands::export(&args),
    }
}

fn keygen(args: KeygenArgs) -> anyhow::Result<Outcome> {
    let key = crate::keys::generate()?;
    crate::keys::write(&args.out, &key, args.force)?;
    println!("{}", key.public());
    Ok(Outcome::Done)
}

fn manifest(cmd: ManifestCommand) -> anyhow::Result<Outcome> {
    match cmd {
        ManifestCommand::Build {
            version,
            piece_size,
            parent,
        } => {
            let progress = ByteProgress::new("hashing");
            let manifest = repo::build_manifest(
                &repo::BuildRequest {
                    repo: &version.repo,
                    image: &version.image,
                    version: version.version,
                    piece_size,
                    parent,
                    boot_profile: Vec::new(),
                },
                &mut |total| progress.start(total),
                &mut |n| progress.advance(n),
            )?;
            progress.finish();
            let id = repo::write_manifest(&version.repo, &manifest)?;
            let zero = manifest.zero_pieces();
            println!(
                "{id}  {}@{}  {} files, {} bytes, {} pieces ({zero} all-zero)",
                manifest.image,
                manifest.version,
                manifest.files.len(),
                manifest.total_size(),
                manifest.piece_count()
            );
            Ok(Outcome::Done)
        }
        ManifestCommand::Show { file, json } => {
            let (m, id) = repo::read_manifest(&file)?;
            let mut out = std::io::stdout().lock();
            if json {
                let value = serde_json::json!({
                    "id": id.to_hex(),
                    "image": m.image,
                    "version": m.version,
                    "parent": m.parent,
                    "piece_size": m.piece_size,
                    "total_size": m.total_size(),
                    "pieces": m.piece_count(),
                    "files": m.files.iter().map(|f| serde_json::json!({
                        "path": f.path,
                        "size": f.size,
                        "mode": format!("{:o}", f.mode),
                        "pieces": f.pieces.len(),
                        "zero_pieces": f.pieces.iter().filter(|p| p.is_zero()).count(),
                    })).collect::<Vec<_>>(),
                    "boot_profile_len": m.boot_profile.len(),
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                writeln!(out, "manifest {id}")?;
                writeln!(
                    out,
                    "{}@{} (parent {}), piece size {}, {} bytes in {} pieces",
                    m.image,
                    m.version,
                    m.parent.map_or("none".into(), |p| p.to_string()),
                    m.piece_size,
                    m.total_size(),
                    m.piece_count()
                )?;
                for f in &m.files {
                    let zero = f.pieces.iter().filter(|p| p.is_zero()).count();
                    writeln!(
                        out,
                        "  {:o} {:>14} {} ({} pieces, {zero} zero)",
                        f.mode,
                        f.size,
                        f.path,
                        f.pieces.len()
                    )?;
                }
            }
            Ok(Outcome::Done)
        }
        ManifestCommand::Verify { version } => verify_version(&version),
    }
}

fn verify_version(version: &VersionRef) -> anyhow::Result<Outcome> {
    let path = repo::manifest_path(&version.repo, &version.image, version.version);
    let (manifest, _) = repo::read_manifest(&path)?;
    let dir = repo::version_dir(&version.repo, &version.image, version.version);
    let progress = ByteProgress::new("verifying");
    progress.start(manifest.total_size());
    let mismatches = repo::verify_dir(&dir, &manifest, &mut |n| progress.advance(n))?;
    progress.finish();
    if mismatches.is_empty() {
        println!("ok  {}@{}", version.image, version.version);
        return Ok(Outcome::Done);
    }
    for m in &mismatches {
        println!("mismatch  {m:?}");
    }
    Ok(Outcome::Failed)
}

fn announce(cmd: AnnounceCommand) -> anyhow::Result<Outcome> {
    match cmd {
        AnnounceCommand::Sign {
            version,
            key,
            retire,
        } => {
            let key = crate::keys::read(&key)?;
            let path = repo::manifest_path(&version.repo, &version.image, version.version);
            let (manifest, id) = repo::read_manifest(&path)
                .with_context(|| "sign needs the manifest: run `imiswarm manifest build` first")?;
            let timestamp_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("system clock before 1970")?
                .as_millis() as u64;
            let signed = key.sign(Announcement {
                image: manifest.image.clone(),
                version: manifest.version,
                manifest_id: id,
                total_size: manifest.total_size(),
                state: if retire {
                    Lifecycle::Retired
                } else {
                    Lifecycle::Deployed
                },
                timestamp_ms,
            })?;
            let out = version
                .repo
                .join(&version.image)
                .join(format!("{}.announcement", version.version));
            repo::write_atomic(&out, &signed.encode()?)?;
            println!("{}", out.display());
            Ok(Outcome::Done)
        }
        AnnounceCommand::Verify { file, trusted } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let signed = SignedAnnouncement::decode(&bytes)?;
            match TrustedKeys::new(trusted).verify(&signed) {
                Ok(a) => {
                    println!(
                        "trusted  {}@{} {:?} manifest {} ({} bytes) by {}",
                        a.image, a.version, a.state, a.manifest_id, a.total_size, signed.publisher
                    );
                    Ok(Outcome::Done)
                }
                Err(e) => {
                    eprintln!("imiswarm: not trusted: {e}");
                    Ok(Outcome::NotFound)
                }
            }
        }
    }
}
