//! The blocklist file: peers this node refuses to talk to, one peer id per line.
//!
//! ```text
//! # a cache server that was decommissioned with its key
//! 12D3KooWLxM8gVt5ux4KD3TsXtVJJQk1Qh1RBvJtbQqfDczKpMjc
//! ```
//!
//! Operators list peers they never want to hear from again (a server whose key leaked, a node
//! that misbehaves in a way no ban catches); the testnet's `process` backend cuts a site off the
//! rest of the swarm with it, where there is no kernel between the nodes to cut.
//!
//! The file is read at start, before the node dials anyone, and read again whenever it changes
//! (checked every [`WATCH_EVERY`]; a change is read once the file has stayed the same for one
//! check), so an edit takes effect without a restart: listed peers are disconnected and refused,
//! peers taken off the list may connect again. Replace the file by a rename for an atomic
//! change. A file that cannot be read or parsed at start is an error; at a reload it is logged
//! and the list in force stays. Each list applied is logged with a digest of the
//! file, which says which edit is in force.
//!
//! Owns parsing and watching the file. The network task applies the list; this module must not
//! touch connections itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use libp2p::PeerId;

use crate::net::BlocklistSetter;

/// How often the file is checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);
/// The largest file read: ample for thousands of peers, and a bound on a mistaken path.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The most peers one list holds.
pub const MAX_PEERS: usize = 10_000;

/// A parsed blocklist and the digest of the bytes it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    pub peers: HashSet<PeerId>,
    /// The first 16 hex digits of the file's BLAKE3 hash, as logged when it is applied.
    pub digest: String,
}

/// The digest logged for a blocklist file's bytes (the testnet waits for it in the logs).
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..16].to_owned()
}

/// Parses a blocklist: a peer id per line; blank lines and text after `#` are ignored.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Blocklist> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("over {MAX_FILE_BYTES} bytes");
    }
    let text = std::str::from_utf8(bytes).context("not UTF-8 text")?;
    let mut peers = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer =
            PeerId::from_str(line).with_context(|| format!("line {}: not a peer id", n + 1))?;
        peers.insert(peer);
        if peers.len() > MAX_PEERS {
            bail!("line {}: more than {MAX_PEERS} peers", n + 1);
        }
    }
    Ok(Blocklist {
        peers,
        digest: digest(bytes),
    })
}

/// Reads and parses the file; errors name it.
pub fn read(path: &Path) -> anyhow::Result<Blocklist> {
    let bytes = read_bounded(path)?;
    parse(&bytes).with_context(|| format!("blocklist {}", path.display()))
}

fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the blocklist {}", path.display()))?;
    let mut bytes = Vec::new();
    // One byte over the bound, so `parse` sees an oversized file as one.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the blocklist {}", path.display()))?;
    Ok(bytes)
}

/// What identifies one state of the file cheaply: an edit in place changes the length or the
/// modification time, a replacement by rename the inode.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()))
}

/// Notices changes of the file: [`Watch::check`] is called every [`WATCH_EVERY`].
#[derive(Debug)]
pub struct Watch {
    path: PathBuf,
    seen: Option<Stamp>,
    /// The file changed at the last check: it is read once it has stayed the same for one
    /// more, so a file caught in the middle of a write (an editor that truncates first) is not
    /// taken for the new list.
    settling: bool,
    /// The digest of the list in force.
    in_force: String,
    /// A bad file was reported; said once per bad state.
    warned: bool,
}

type Stamp = (u64, u64, Option<std::time::SystemTime>);

impl Watch {
    /// Starts watching `path`; made before the list in force is read from it (see
    /// [`Watch::in_force`]), so an edit in between is noticed.
    pub fn new(path: PathBuf) -> Self {
        Self {
            seen: stamp(&path),
            path,
            settling: false,
            in_force: String::new(),
            warned: false,
        }
    }

    /// Records the list in force: a change back to it is nothing to apply.
    pub fn in_force(&mut self, list: &Blocklist) {
        self.in_force = list.digest.clone();
    }

    /// A new list to apply, if the file has changed into one and settled. A file that cannot
    /// be read or parsed is logged (once) and the list in force stays.
    pub fn check(&mut self) -> Option<Blocklist> {
        let now = stamp(&self.path);
        if now != self.seen {
            self.seen = now;
            self.settling = true;
            return None;
        }
        if !std::mem::take(&mut self.settling) {
            return None;
        }
        match read(&self.path) {
            Ok(list) if list.digest == self.in_force => {
                self.warned = false;
                None
            }
            Ok(list) => {
                self.in_force = list.digest.clone();
                self.warned = false;
                Some(list)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "blocklist not reloaded; the previous list stays in force"
                    );
                }
                None
            }
        }
    }
}

/// Logs that `list` is in force, with its digest (the testnet waits for this line).
pub fn log_applied(peers: usize, digest: &str) {
    tracing::info!(peers, digest, "blocklist applied");
}

/// Checks the file every [`WATCH_EVERY`] and hands each new list to the network task, until
/// the network stops. `initial` is the list the network started with (see
/// [`crate::member::start_net`]).
pub fn spawn_watch(mut watch: Watch, initial: Blocklist, net: BlocklistSetter) {
    watch.in_force(&initial);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if let Some(list) = watch.check() {
                let count = list.peers.len();
                if !net.set(list.peers).await {
                    return; // the network task has stopped
                }
                log_applied(count, &list.digest);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn peers_comments_and_blank_lines() {
        let (a, b) = (peer(), peer());
        let text = format!("# decommissioned\n\n{a}\n  {b}   # leaked key\n{a}\n");
        let list = parse(text.as_bytes()).unwrap();
        assert_eq!(list.peers, HashSet::from([a, b]));
        assert_eq!(list.digest, digest(text.as_bytes()));
        assert!(parse(b"").unwrap().peers.is_empty());
    }

    #[test]
    fn a_change_is_applied_once_settled_and_a_bad_one_keeps_the_list_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocked-peers");
        let write = |text: &str| {
            let tmp = dir.path().join("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        let a = peer();
        write(&format!("{a}\n"));
        let mut watch = Watch::new(path.clone());
        watch.in_force(&read(&path).unwrap());
        assert_eq!(watch.check(), None, "unchanged");

        let b = peer();
        write(&format!("{a}\n{b}\n"));
        assert_eq!(watch.check(), None, "changed: settling");
        let second = watch.check().expect("settled: applied");
        assert_eq!(second.peers, HashSet::from([a, b]));
        assert_eq!(watch.check(), None, "applied once");

        write("not a peer\n");
        assert_eq!(watch.check(), None);
        assert_eq!(watch.check(), None, "a bad file is not applied");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(watch.check(), None);
        assert_eq!(watch.check(), None, "nor a missing one");

        // Back to the list in force: nothing new to apply. Then an empty list lifts every block.
        write(&format!("{a}\n{b}\n"));
        assert_eq!((watch.check(), watch.check()), (None, None));
        write("# nobody\n");
        watch.check();
        assert_eq!(watch.check().map(|l| l.peers.len()), Some(0));
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = format!("{}\nnot-a-peer\n", peer());
        let e = format!("{:#}", parse(text.as_bytes()).unwrap_err());
        assert!(e.contains("line 2"), "{e}");
        assert!(parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn oversized_files_and_lists_are_refused() {
        let big = vec![b'#'; MAX_FILE_BYTES as usize + 1];
        assert!(parse(&big).is_err());
        let many: String = (0..=MAX_PEERS).map(|_| format!("{}\n", peer())).collect();
        let e = format!("{:#}", parse(many.as_bytes()).unwrap_err());
        assert!(e.contains("more than"), "{e}");
    }
}
