//! Node configuration: a TOML file, overridden by flags and environment variables.
//!
//! Owns parsing and checking every setting, and reporting a bad one in one line that names the
//! setting. It does not open sockets or create directories: the commands do that with the
//! checked values.
//!
//! ```toml
//! repo = "/var/lib/imiswarm"              # <repo>/<image>/<version>/
//! listen = ["/ip4/0.0.0.0/tcp/4500", "/ip4/0.0.0.0/udp/4500/quic-v1"]
//! bootstrap = ["/ip4/192.0.2.1/tcp/4500/p2p/12D3KooW..."]
//! site = "lab-a"
//! trusted_publishers = ["<64 hex characters>"]
//! follow = []                             # images to fetch; empty = all
//! upload_rate = "100Mbit"                 # or "12MiB", a number of bytes/s, or "unlimited"
//! download_rate = "unlimited"
//! keep_versions = 2
//! node_key = "/etc/imiswarm/node.key"     # made on first start if missing
//! publisher_key = "/etc/imiswarm/publisher.key"   # only where `seed` runs
//! mdns = false                            # find peers on the LAN by multicast
//! database = "/var/lib/imiswarm/tracker.redb"     # only where `tracker` runs
//! blocklist = "/etc/imiswarm/blocked-peers"      # peer ids to refuse, reread when it changes
//! ```

use std::path::{Path, PathBuf};

use imiswarm_protocol::PublicKey;
use libp2p::Multiaddr;
use serde::Deserialize;

/// The file's shape; every field optional so flags can fill what it lacks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub repo: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub site: Option<String>,
    pub trusted_publishers: Option<Vec<String>>,
    pub follow: Option<Vec<String>>,
    pub upload_rate: Option<String>,
    pub download_rate: Option<String>,
    pub keep_versions: Option<u32>,
    pub node_key: Option<PathBuf>,
    pub publisher_key: Option<PathBuf>,
    pub api: Option<String>,
    pub mdns: Option<bool>,
    pub database: Option<PathBuf>,
    pub blocklist: Option<PathBuf>,
}

/// Settings given on the command line (or through `IMISWARM_*` variables); they win over the
/// file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct NodeFlags {
    /// Configuration file (TOML).
    #[arg(long, env = "IMISWARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Image repository directory.
    #[arg(long, env = "IMISWARM_REPO")]
    pub repo: Option<PathBuf>,
    /// Listen address (multiaddr); repeatable.
    #[arg(long = "listen", env = "IMISWARM_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Bootstrap peer (multiaddr ending in /p2p/<peer id>); repeatable.
    #[arg(long = "bootstrap", env = "IMISWARM_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// This node's site label.
    #[arg(long, env = "IMISWARM_SITE")]
    pub site: Option<String>,
    /// Trusted publisher public key (hex); repeatable.
    #[arg(long = "trust", env = "IMISWARM_TRUST", value_delimiter = ',')]
    pub trust: Vec<String>,
    /// Image to follow; repeatable (default: all).
    #[arg(long = "follow", value_delimiter = ',')]
    pub follow: Vec<String>,
    /// Upload cap, e.g. 100Mbit, 12MiB (per second), or unlimited.
    #[arg(long, env = "IMISWARM_UPLOAD_RATE")]
    pub upload_rate: Option<String>,
    /// Download cap, e.g. 100Mbit, 12MiB (per second), or unlimited.
    #[arg(long, env = "IMISWARM_DOWNLOAD_RATE")]
    pub download_rate: Option<String>,
    /// Versions of each image to keep.
    #[arg(long)]
    pub keep_versions: Option<u32>,
    /// The node's identity key file (created if missing).
    #[arg(long, env = "IMISWARM_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// The publisher's secret key file (for `seed`).
    #[arg(long, env = "IMISWARM_PUBLISHER_KEY")]
    pub publisher_key: Option<PathBuf>,
    /// Write the node's dialable addresses, one per line, to this file once listening (for
    /// scripts and tests that start nodes on port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Address of the local control API (`/status`, `/metrics`), or `off`.
    #[arg(long, env = "IMISWARM_API")]
    pub api: Option<String>,
    /// Find peers on the local network with mDNS (off unless set).
    #[arg(long)]
    pub mdns: bool,
    /// The tracker's catalogue database (for `tracker`; default `<repo>/tracker.redb`).
    #[arg(long, env = "IMISWARM_DATABASE")]
    pub database: Option<PathBuf>,
    /// Rewrite this file with the `/status` report (JSON) twice a second.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// File of peer ids to refuse, one per line; reread whenever it changes.
    #[arg(long, env = "IMISWARM_BLOCKLIST")]
    pub blocklist: Option<PathBuf>,
    /// Testing only: flip a byte in every piece served, to exercise other nodes' bans.
    #[arg(long, hide = true)]
    pub corrupt_uploads: bool,
}

/// A rate limit in bytes per second; `None` is unlimited.
pub type Rate = Option<u64>;

/// Checked settings of a swarm member.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub repo: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub site: String,
    pub trusted: Vec<PublicKey>,
    pub follow: Vec<String>,
    pub upload_rate: Rate,
    pub download_rate: Rate,
    pub keep_versions: u32,
    pub node_key: Option<PathBuf>,
    pub publisher_key: Option<PathBuf>,
    pub addr_file: Option<PathBuf>,
    /// Where the control API listens (`None`: off).
    pub api: Option<std::net::SocketAddr>,
    pub mdns: bool,
    pub database: Option<PathBuf>,
    pub status_file: Option<PathBuf>,
    /// Peers to refuse (see [`crate::blocklist`]).
    pub blocklist: Option<PathBuf>,
    pub corrupt_uploads: bool,
}

/// Where `daemon` and `seed` serve their control API unless told otherwise.
pub const DEFAULT_API: &str = "127.0.0.1:4501";
/// Where `tracker` serves its status API unless told otherwise.
pub const DEFAULT_TRACKER_API: &str = "127.0.0.1:4502";
/// Where `tracker` listens for peers unless told otherwise.
pub const DEFAULT_TRACKER_PORT: u16 = 4400;

/// A setting that is missing or wrong, named.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
}

fn bad(setting: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        setting: setting.to_owned(),
        problem: problem.to_string(),
    }
}

impl NodeFlags {
    /// Reads the file (if any), applies the flags over it and checks everything.
    pub fn resolve(&self) -> Result<NodeConfig, ConfigError> {
        self.resolve_as(true, 4500, Some(DEFAULT_API))
    }

    /// Like [`Self::resolve`]; `repo_required` false lets a workstation's `fetch` run without
    /// a repository, `default_port` is where to listen when nothing says (0: any free), and
    /// `default_api` where the control API listens when nothing says (`None`: off).
    pub fn resolve_as(
        &self,
        repo_required: bool,
        default_port: u16,
        default_api: Option<&str>,
    ) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => ConfigFile::default(),
        };
        let pick = |flag: &Vec<String>, file: &Option<Vec<String>>| {
            if flag.is_empty() {
                file.clone().unwrap_or_default()
            } else {
                flag.clone()
            }
        };
        let repo = match self.repo.clone().or(file.repo) {
            Some(repo) => repo,
            None if !repo_required => PathBuf::new(),
            None => {
                return Err(bad(
                    "repo",
                    "not set (use --repo or `repo = ...` in the config file)",
                ));
            }
        };
        let mut listen = parse_addrs("listen", &pick(&self.listen, &file.listen))?;
        if listen.is_empty() {
            listen = parse_addrs(
                "listen",
                &[
                    format!("/ip4/0.0.0.0/tcp/{default_port}"),
                    format!("/ip4/0.0.0.0/udp/{default_port}/quic-v1"),
                ],
            )?;
        }
        let bootstrap = parse_addrs("bootstrap", &pick(&self.bootstrap, &file.bootstrap))?;
        let trusted = pick(&self.trust, &file.trusted_publishers)
            .iter()
            .map(|k| {
                PublicKey::from_hex(k).map_err(|_| {
                    bad(
                        "trusted_publishers",
                        format!("{k:?} is not 64 hex characters"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let follow = pick(&self.follow, &file.follow);
        for image in &follow {
            imiswarm_protocol::path::check_image_name(image).map_err(|e| bad("follow", e))?;
        }
        let site = self
            .site
            .clone()
            .or(file.site)
            .unwrap_or_else(|| "default".into());
        if site.is_empty()
            || site.len() > 64
            || site.contains(|c: char| c.is_whitespace() || c == ';')
        {
            return Err(bad("site", "must be 1-64 characters without spaces or ';'"));
        }
        let keep_versions = self.keep_versions.or(file.keep_versions).unwrap_or(2);
        if keep_versions == 0 {
            return Err(bad("keep_versions", "must be at least 1"));
        }
        Ok(NodeConfig {
            repo,
            listen,
            bootstrap,
            site,
            trusted,
            follow,
            upload_rate: parse_rate(
                "upload_rate",
                self.upload_rate.as_ref().or(file.upload_rate.as_ref()),
            )?,
            download_rate: parse_rate(
                "download_rate",
                self.download_rate.as_ref().or(file.download_rate.as_ref()),
            )?,
            keep_versions,
            node_key: self.node_key.clone().or(file.node_key),
            publisher_key: self.publisher_key.clone().or(file.publisher_key),
            addr_file: self.addr_file.clone(),
            api: parse_api(self.api.as_ref().or(file.api.as_ref()), default_api)?,
            mdns: self.mdns || file.mdns.unwrap_or(false),
            database: self.database.clone().or(file.database),
            status_file: self.status_file.clone(),
            blocklist: self.blocklist.clone().or(file.blocklist),
            corrupt_uploads: self.corrupt_uploads,
        })
    }
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        // toml's Display draws a multi-line excerpt; one line with the position is enough.
        let at = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
            .map(|line| format!(" (line {line})"))
            .unwrap_or_default();
        bad("config", format!("{}: {}{at}", path.display(), e.message()))
    })
}

/// `off`, or a socket address; unset means the command's default ([`DEFAULT_API`] for a
/// repository-keeping node, [`DEFAULT_TRACKER_API`] for a tracker, off for a workstation's
/// fetch).
fn parse_api(
    text: Option<&String>,
    default: Option<&str>,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(text) = text.map(|t| t.trim()).or(default) else {
        return Ok(None);
    };
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        bad(
            "api",
            format!("{text:?} is not an address like 127.0.0.1:4501, or off"),
        )
    })
}

fn parse_addrs(setting: &str, addrs: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| bad(setting, format!("{a:?}: {e}")))
        })
        .collect()
}

/// `unlimited`, a byte count per second, or a number with a unit: `kbit`, `Mbit`, `Gbit`
/// (decimal bits), `KiB`, `MiB`, `GiB` (binary bytes).
pub fn parse_rate(setting: &str, text: Option<&String>) -> Result<Rate, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        bad(
            setting,
            format!("{t:?} is not a rate (e.g. 100Mbit, 12MiB, unlimited)"),
        )
    })?;
    let per_sec = value
        * match unit
            .trim()
            .trim_end_matches("/s")
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "b" => 1.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            other => return Err(bad(setting, format!("unknown unit {other:?}"))),
        };
    if !(per_sec >= 1.0 && per_sec.is_finite()) {
        return Err(bad(
            setting,
            format!("{t:?} must be at least 1 byte per second"),
        ));
    }
    Ok(Some(per_sec as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "repo = \"/srv/repo\"\nsite = \"lab-a\"\nupload_rate = \"100Mbit\"\nkeep_versions = 3\n\
             blocklist = \"/etc/imiswarm/blocked-peers\"\n",
        )
        .unwrap();
        let flags = NodeFlags {
            config: Some(path.clone()),
            site: Some("lab-b".into()),
            ..Default::default()
        };
        let c = flags.resolve().unwrap();
        assert_eq!(c.repo, PathBuf::from("/srv/repo"));
        assert_eq!(c.site, "lab-b", "flag wins");
        assert_eq!(c.upload_rate, Some(12_500_000));
        assert_eq!(c.download_rate, None);
        assert_eq!(c.keep_versions, 3);
        assert_eq!(c.listen.len(), 2, "default listen addresses");
        assert_eq!(
            c.blocklist,
            Some(PathBuf::from("/etc/imiswarm/blocked-peers"))
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "repo = \"/r\"\nuplod_rate = \"1\"\n").unwrap();
        let flags = NodeFlags {
            config: Some(path),
            ..Default::default()
        };
        let err = flags.resolve().unwrap_err().to_string();
        assert!(err.contains("uplod_rate"), "{err}");

        let err = NodeFlags::default().resolve().unwrap_err().to_string();
        assert!(err.starts_with("repo:"), "{err}");
        let flags = NodeFlags {
            repo: Some("/r".into()),
            trust: vec!["zz".into()],
            ..Default::default()
        };
        assert!(
            flags
                .resolve()
                .unwrap_err()
                .to_string()
                .starts_with("trusted_publishers:")
        );
        let flags = NodeFlags {
            repo: Some("/r".into()),
            listen: vec!["not an addr".into()],
            ..Default::default()
        };
        assert!(
            flags
                .resolve()
                .unwrap_err()
                .to_string()
                .starts_with("listen:")
        );
    }

    #[test]
    fn rates() {
        let r = |s: &str| parse_rate("r", Some(&s.to_owned()));
        assert_eq!(r("unlimited").unwrap(), None);
        assert_eq!(r("1000").unwrap(), Some(1000));
        assert_eq!(r("8kbit").unwrap(), Some(1000));
        assert_eq!(r("1MiB/s").unwrap(), Some(1 << 20));
        assert!(r("0").is_err());
        assert!(r("fast").is_err());
        assert!(r("3 parsecs").is_err());
    }
}
