//! The command line. Each subcommand's options are a struct; parsing checks what can be checked
//! without touching the disk (sizes, names) so a typo fails before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::NodeFlags;
use imiswarm_protocol::limits::DEFAULT_PIECE_SIZE;
use imiswarm_protocol::manifest::is_valid_piece_size;
use imiswarm_protocol::path::check_image_name;

#[derive(Debug, Parser)]
#[command(
    name = "imiswarm",
    version,
    about = "Moves VM images (iMIs) through a peer-to-peer swarm"
)]
pub struct Cli {
    /// Log format for machines: text or json.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "IMISWARM_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a new ed25519 key (publisher or node) and print its public key.
    Keygen(KeygenArgs),
    /// Build, show or verify a version's manifest.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Sign or verify an announcement of a version.
    #[command(subcommand)]
    Announce(AnnounceCommand),
    /// Run a swarm member on a cache server: follow announcements, fetch, serve.
    Daemon {
        #[command(flatten)]
        node: NodeFlags,
    },
    /// Publish a version from the image server: hash it in place, sign, gossip, serve.
    Seed(SeedArgs),
    /// Fetch one version into a directory (a workstation at boot), then exit.
    Fetch(FetchArgs),
    /// Run a tracker: who holds which version at which site, and the catalogue of signed
    /// announcements for late joiners (kept in a database across restarts).
    Tracker {
        #[command(flatten)]
        node: NodeFlags,
    },
    /// Withdraw a version: sign its retirement and gossip it. Daemons drop it once nothing
    /// local uses it.
    Retire(RetireArgs),
    /// Use a version of the repository (an NBD or NFS export, a VM): hold it against retention
    /// while COMMAND runs, or until interrupted when there is no command.
    Export(ExportArgs),
    /// Ask the local daemon what it holds, what it is fetching, at what rate, from whom.
    Status {
        /// The node's control API address.
        #[arg(long, env = "IMISWARM_API", default_value = crate::config::DEFAULT_API)]
        api: std::net::SocketAddr,
        /// Print the JSON report instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    #[arg(value_parser = parse_image)]
    pub image: String,
    pub version: u64,
    /// Piece size for a new manifest: a power of two from 64KiB to 16MiB.
    #[arg(long, default_value_t = DEFAULT_PIECE_SIZE, value_parser = parse_piece_size)]
    pub piece_size: u32,
    /// The version this one was made from.
    #[arg(long)]
    pub parent: Option<u64>,
    /// Hash again even if a manifest exists.
    #[arg(long)]
    pub rehash: bool,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// IMAGE (the latest deployed version) or IMAGE@VERSION.
    #[arg(value_parser = parse_target)]
    pub target: (String, Option<u64>),
    /// Directory to create with the version's files (or give --repo to fetch into a
    /// repository, where it is held against retention while this command runs).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep serving the fetched pieces to others for this many seconds.
    #[arg(long, default_value_t = 0)]
    pub linger: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Debug, Args)]
pub struct RetireArgs {
    /// IMAGE@VERSION to retire.
    #[arg(value_parser = parse_exact_target)]
    pub target: (String, u64),
    /// How long to stay in the swarm so the retirement reaches every peer.
    #[arg(long, default_value_t = 5)]
    pub linger: u64,
    #[command(flatten)]
    pub node: NodeFlags,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// IMAGE@VERSION to hold.
    #[arg(value_parser = parse_exact_target)]
    pub target: (String, u64),
    /// The repository holding it.
    #[arg(long, env = "IMISWARM_REPO")]
    pub repo: PathBuf,
    /// The command that uses the version, run with IMISWARM_VERSION_DIR set to its directory.
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn parse_exact_target(s: &str) -> Result<(String, u64), String> {
    match parse_target(s)? {
        (image, Some(version)) => Ok((image, version)),
        (_, None) => Err("expected IMAGE@VERSION".into()),
    }
}

fn parse_target(s: &str) -> Result<(String, Option<u64>), String> {
    let (image, version) = match s.split_once('@') {
        Some((i, v)) => (
            i,
            Some(
                v.parse::<u64>()
                    .map_err(|_| format!("{v:?} is not a version number"))?,
            ),
        ),
        None => (s, None),
    };
    check_image_name(image).map_err(|e| e.to_string())?;
    Ok((image.to_owned(), version))
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing key file.
    #[arg(long)]
    pub force: bool,
}

/// Names one version in a repository.
#[derive(Debug, Args)]
pub struct VersionRef {
    /// The image repository (`<repo>/<image>/<version>/`).
    #[arg(long, env = "IMISWARM_REPO")]
    pub repo: PathBuf,
    #[arg(value_parser = parse_image)]
    pub image: String,
    pub version: u64,
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Hash `<repo>/<image>/<version>/` in place and write `<repo>/<image>/<version>.manifest`.
    Build {
        #[command(flatten)]
        version: VersionRef,
        /// Piece size: a power of two from 64KiB to 16MiB.
        #[arg(long, default_value_t = DEFAULT_PIECE_SIZE, value_parser = parse_piece_size)]
        piece_size: u32,
        /// The version this one was made from.
        #[arg(long)]
        parent: Option<u64>,
    },
    /// Print a manifest file.
    Show {
        file: PathBuf,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Check a version directory against its manifest, piece by piece.
    Verify {
        #[command(flatten)]
        version: VersionRef,
    },
}

#[derive(Debug, Subcommand)]
pub enum AnnounceCommand {
    /// Sign an announcement of a version whose manifest exists; writes
    /// `<repo>/<image>/<version>.announcement`.
    Sign {
        #[command(flatten)]
        version: VersionRef,
        /// The publisher's secret key file.
        #[arg(long, env = "IMISWARM_PUBLISHER_KEY")]
        key: PathBuf,
        /// Announce the version as retired instead of deployed.
        #[arg(long)]
        retire: bool,
    },
    /// Verify a signed announcement file against trusted publisher keys.
    Verify {
        file: PathBuf,
        /// A trusted publisher public key (hex); repeatable.
        #[arg(long = "trust", required = true, value_parser = parse_public_key)]
        trusted: Vec<imiswarm_protocol::PublicKey>,
    },
}

fn parse_image(s: &str) -> Result<String, String> {
    check_image_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn parse_public_key(s: &str) -> Result<imiswarm_protocol::PublicKey, String> {
    imiswarm_protocol::PublicKey::from_hex(s)
        .map_err(|_| "expected 64 hex characters (an ed25519 public key)".to_owned())
}

/// Accepts `65536`, `64KiB`, `1MiB` (binary units only: piece sizes are powers of two).
pub fn parse_piece_size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        other => return Err(format!("unknown unit {other:?} (use KiB or MiB)")),
    };
    let size = n
        .checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !is_valid_piece_size(size) {
        return Err(format!("{s} is not a power of two from 64KiB to 16MiB"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_sizes() {
        assert_eq!(parse_piece_size("64KiB"), Ok(65536));
        assert_eq!(parse_piece_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_piece_size("131072"), Ok(131072));
        assert!(parse_piece_size("100KiB").is_err());
        assert!(parse_piece_size("32MiB").is_err());
        assert!(parse_piece_size("4GB").is_err());
        assert!(parse_piece_size("99999999999999MiB").is_err());
    }

    #[test]
    fn fetch_targets() {
        assert_eq!(parse_target("lab"), Ok(("lab".into(), None)));
        assert_eq!(parse_target("lab@7"), Ok(("lab".into(), Some(7))));
        assert!(parse_target("lab@x").is_err());
        assert!(parse_target("../lab").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
