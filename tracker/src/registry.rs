//! The registry: which peer holds which version, at which site, and how far it is.
//!
//! Owns the members the tracker knows (from identify: site, role, addresses; from `Register`:
//! holdings) and the order in which holders of a version are handed to an asker:
//!
//! ```text
//!  Holders{id} from asker at site A
//!    1. holders at site A          a piece should cross a site's WAN link about once
//!    2. holders at other sites
//!    3. origins                    the seed uploads each piece about once, so it is asked last
//!  within a group: most verified pieces first, then a per-asker shuffle
//! ```
//!
//! Must not: talk to the network, read the clock (callers pass `now`), or trust what a peer
//! claims beyond ordering: the asker checks every piece against the manifest anyway. Memory is
//! bounded by [`MAX_MEMBERS`] members of at most [`MAX_HOLDINGS`] holdings each.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::limits::{
    MAX_ADDR_LEN, MAX_ADDRS_PER_PEER, MAX_HOLDINGS, MAX_PEER_ID_LEN, MAX_SITE_LEN,
};
use imiswarm_protocol::wire::{HolderRecord, Holding, PeerRecord};
use serde::Serialize;

/// Most members the registry keeps; past it, new peers are refused until some leave or expire.
pub const MAX_MEMBERS: usize = 65_536;

/// A peer's identity: the bytes of its libp2p peer id (this crate does not depend on libp2p).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub Vec<u8>);

impl PeerKey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for PeerKey {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tail: a multihash's head is the same for every ed25519 peer id.
        let tail = &self.0[self.0.len().saturating_sub(6)..];
        write!(f, "PeerKey(…")?;
        for b in tail {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// What the tracker knows of one connected peer.
#[derive(Clone, Debug)]
pub struct Member {
    pub site: String,
    /// An origin (seed): handed out last.
    pub origin: bool,
    /// Binary multiaddrs, at most [`MAX_ADDRS_PER_PEER`].
    pub addrs: Vec<Vec<u8>>,
    /// At most one per manifest id, at most [`MAX_HOLDINGS`].
    pub holdings: Vec<Holding>,
    pub last_seen: Instant,
}

impl Member {
    fn holding(&self, manifest_id: &Hash) -> Option<&Holding> {
        self.holdings.iter().find(|h| h.manifest_id == *manifest_id)
    }
}

/// Why a peer was not admitted. The node disconnects it: it could not be handed out anyway,
/// since a holder record with such a peer id or site would not pass the wire's validation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("peer id of {0} bytes (1-{MAX_PEER_ID_LEN} expected)")]
    BadPeerId(usize),
    #[error("site label of {0} bytes (1-{MAX_SITE_LEN} expected)")]
    BadSite(usize),
    #[error("registry full: {MAX_MEMBERS} members")]
    Full,
}

/// Members and an index from version to holders, kept in step.
#[derive(Debug, Default)]
pub struct Registry {
    members: HashMap<PeerKey, Member>,
    /// So `holders` costs the holders of one version, not a scan of every member.
    by_version: HashMap<Hash, HashSet<PeerKey>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member(&self, peer: &PeerKey) -> Option<&Member> {
        self.members.get(peer)
    }

    /// A peer identified itself: creates its member, or updates site, role and addresses of a
    /// known one (identify runs again on every reconnect and push) while keeping its holdings.
    /// Addresses that could not travel in a peer record are dropped.
    pub fn connected(
        &mut self,
        peer: PeerKey,
        site: String,
        origin: bool,
        mut addrs: Vec<Vec<u8>>,
        now: Instant,
    ) -> Result<(), RegistryError> {
        if peer.0.is_empty() || peer.0.len() > MAX_PEER_ID_LEN {
            return Err(RegistryError::BadPeerId(peer.0.len()));
        }
        if site.is_empty() || site.len() > MAX_SITE_LEN {
            return Err(RegistryError::BadSite(site.len()));
        }
        addrs.retain(|a| !a.is_empty() && a.len() <= MAX_ADDR_LEN);
        addrs.truncate(MAX_ADDRS_PER_PEER);
        if let Some(m) = self.members.get_mut(&peer) {
            m.site = site;
            m.origin = origin;
            m.addrs = addrs;
            m.last_seen = now;
            return Ok(());
        }
        if self.members.len() >= MAX_MEMBERS {
            return Err(RegistryError::Full);
        }
        self.members.insert(
            peer,
            Member {
                site,
                origin,
                addrs,
                holdings: Vec::new(),
                last_seen: now,
            },
        );
        Ok(())
    }

    /// A peer said what it holds: replaces its holdings. Returns false for a peer that never
    /// identified (its site and addresses are unknown, so it could not be handed out).
    pub fn register(&mut self, peer: &PeerKey, mut holdings: Vec<Holding>, now: Instant) -> bool {
        let Some(member) = self.members.get_mut(peer) else {
            return false;
        };
        holdings.truncate(MAX_HOLDINGS);
        // One holding per version: a duplicate would list the peer twice and count it twice.
        let mut seen = HashSet::new();
        holdings.retain(|h| h.verified <= h.total && seen.insert(h.manifest_id));
        for old in &member.holdings {
            unindex(&mut self.by_version, &old.manifest_id, peer);
        }
        for new in &holdings {
            self.by_version
                .entry(new.manifest_id)
                .or_default()
                .insert(peer.clone());
        }
        member.holdings = holdings;
        member.last_seen = now;
        true
    }

    pub fn disconnected(&mut self, peer: &PeerKey) {
        if let Some(member) = self.members.remove(peer) {
            for h in &member.holdings {
                unindex(&mut self.by_version, &h.manifest_id, peer);
            }
        }
    }

    /// Drops members not seen for `ttl`: a peer whose disconnect the tracker missed.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        let stale: Vec<PeerKey> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) > ttl)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &stale {
            self.disconnected(peer);
        }
    }

    /// Holders of a version other than `asker`, best first (see the module docs), at most
    /// `limit`. A peer with no verified piece yet is left out: it has nothing to give.
    ///
    /// When the cut leaves out every origin and no kept holder is complete, the last place goes
    /// to an origin, so an asker always learns of a full copy.
    pub fn holders(&self, manifest_id: &Hash, asker: &PeerKey, limit: usize) -> Vec<HolderRecord> {
        let Some(peers) = self.by_version.get(manifest_id) else {
            return Vec::new();
        };
        // An unknown asker has no site: every non-origin holder is "another site".
        let asker_site = self.members.get(asker).map(|m| m.site.as_str());
        let mut ranked: Vec<Ranked<'_>> = peers
            .iter()
            .filter(|p| *p != asker)
            .filter_map(|p| {
                let member = self.members.get(p)?;
                let holding = member.holding(manifest_id)?;
                (holding.verified > 0).then(|| Ranked::new(asker, p, member, holding, asker_site))
            })
            .collect();
        if ranked.len() > limit {
            if limit == 0 {
                return Vec::new();
            }
            // Only the kept ones need a full sort: a popular version may have thousands.
            ranked.select_nth_unstable_by(limit - 1, |a, b| a.key.cmp(&b.key));
            let rest = ranked.split_off(limit);
            let keeps_full_copy = ranked.iter().any(|r| r.member.origin || r.complete());
            let best_origin = rest
                .into_iter()
                .filter(|r| r.member.origin)
                .min_by(|a, b| a.key.cmp(&b.key));
            if let (false, Some(origin)) = (keeps_full_copy, best_origin) {
                let worst = ranked
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.key.cmp(&b.1.key))
                    .map(|(i, _)| i);
                if let Some(i) = worst {
                    ranked[i] = origin;
                }
            }
        }
        ranked.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        ranked
            .into_iter()
            .map(|r| HolderRecord {
                peer: PeerRecord {
                    peer_id: r.peer.0.clone(),
                    addrs: r.member.addrs.clone(),
                },
                site: r.member.site.clone(),
                origin: r.member.origin,
                verified: r.holding.verified,
                total: r.holding.total,
            })
            .collect()
    }

    /// Counts for the status API and metrics, in a stable order.
    pub fn summary(&self) -> RegistrySummary {
        let mut sites: BTreeMap<&str, SiteMembers> = BTreeMap::new();
        // Keyed by what holders claim, not by manifest id alone: a peer that lies about the
        // image shows up as its own row instead of renaming an honest one.
        let mut versions: BTreeMap<(&str, u64, Hash), BTreeMap<&str, SiteProgress>> =
            BTreeMap::new();
        for m in self.members.values() {
            let site = sites.entry(&m.site).or_insert_with(|| SiteMembers {
                site: m.site.clone(),
                members: 0,
                origins: 0,
            });
            site.members += 1;
            site.origins += usize::from(m.origin);
            for h in &m.holdings {
                let p = versions
                    .entry((&h.image, h.version, h.manifest_id))
                    .or_default()
                    .entry(&m.site)
                    .or_insert_with(|| SiteProgress {
                        site: m.site.clone(),
                        holders: 0,
                        complete: 0,
                        verified: 0,
                        total: 0,
                    });
                p.holders += 1;
                p.complete += usize::from(h.total > 0 && h.verified == h.total);
                p.verified += u64::from(h.verified);
                p.total += u64::from(h.total);
            }
        }
        RegistrySummary {
            members: self.members.len(),
            sites: sites.into_values().collect(),
            versions: versions
                .into_iter()
                .map(|((image, version, id), sites)| VersionSummary {
                    image: image.to_owned(),
                    version,
                    manifest: id.to_hex(),
                    sites: sites.into_values().collect(),
                })
                .collect(),
        }
    }
}

fn unindex(by_version: &mut HashMap<Hash, HashSet<PeerKey>>, id: &Hash, peer: &PeerKey) {
    if let Some(peers) = by_version.get_mut(id) {
        peers.remove(peer);
        if peers.is_empty() {
            by_version.remove(id);
        }
    }
}

/// A candidate holder and its place in the answer.
struct Ranked<'a> {
    /// (group, most verified first, per-asker spread, peer id for a total order)
    key: (u8, Reverse<u32>, u64, &'a PeerKey),
    peer: &'a PeerKey,
    member: &'a Member,
    holding: &'a Holding,
}

impl<'a> Ranked<'a> {
    fn new(
        asker: &PeerKey,
        peer: &'a PeerKey,
        member: &'a Member,
        holding: &'a Holding,
        asker_site: Option<&str>,
    ) -> Self {
        let group = if member.origin {
            2
        } else if asker_site == Some(member.site.as_str()) {
            0
        } else {
            1
        };
        Self {
            key: (group, Reverse(holding.verified), spread(asker, peer), peer),
            peer,
            member,
            holding,
        }
    }

    fn complete(&self) -> bool {
        self.holding.verified == self.holding.total
    }
}

/// Breaks ties differently for each asker, so equal holders share the load instead of the
/// lowest peer id being everyone's first choice; stable for one asker, so answers are
/// reproducible. BLAKE3 over both ids, the asker's length-prefixed so no two pairs collide.
fn spread(asker: &PeerKey, peer: &PeerKey) -> u64 {
    let mut input = Vec::with_capacity(8 + asker.0.len() + peer.0.len());
    input.extend_from_slice(&(asker.0.len() as u64).to_le_bytes());
    input.extend_from_slice(&asker.0);
    input.extend_from_slice(&peer.0);
    let digest = Hash::of(&input);
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest.0[..8]);
    u64::from_le_bytes(head)
}

/// What the registry holds, for the status API (JSON) and Prometheus metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistrySummary {
    pub members: usize,
    /// By site name.
    pub sites: Vec<SiteMembers>,
    /// By image, then version.
    pub versions: Vec<VersionSummary>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteMembers {
    pub site: String,
    pub members: usize,
    pub origins: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionSummary {
    pub image: String,
    pub version: u64,
    /// Manifest id, hex.
    pub manifest: String,
    /// By site name; only sites with at least one holder.
    pub sites: Vec<SiteProgress>,
}

/// Progress of one version at one site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteProgress {
    pub site: String,
    pub holders: usize,
    pub complete: usize,
    /// Verified pieces, summed over the site's holders.
    pub verified: u64,
    /// Pieces, summed over the site's holders (so `verified / total` is the site's progress).
    pub total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use imiswarm_protocol::codec::WireFormat;
    use imiswarm_protocol::limits::MAX_PEER_RECORDS;
    use imiswarm_protocol::wire::ControlResponse;

    fn key(n: u8) -> PeerKey {
        PeerKey(vec![n; 38])
    }

    fn holding(id: Hash, verified: u32) -> Holding {
        Holding {
            manifest_id: id,
            image: "win11".into(),
            version: 1,
            verified,
            total: 100,
        }
    }

    /// Connects and registers peer `n` at `site` holding `verified` pieces of `id`.
    fn join(r: &mut Registry, n: u8, site: &str, origin: bool, id: Hash, verified: u32) {
        let now = Instant::now();
        r.connected(key(n), site.into(), origin, vec![vec![n; 8]], now)
            .unwrap();
        assert!(r.register(&key(n), vec![holding(id, verified)], now));
    }

    fn order(r: &Registry, id: Hash, asker: u8, limit: usize) -> Vec<u8> {
        r.holders(&id, &key(asker), limit)
            .iter()
            .map(|h| h.peer.peer_id[0])
            .collect()
    }

    #[test]
    fn same_site_first_origin_last_most_verified_first() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        join(&mut r, 1, "a", false, id, 1); // asker
        join(&mut r, 2, "b", false, id, 90);
        join(&mut r, 3, "a", false, id, 10);
        join(&mut r, 4, "a", false, id, 50);
        join(&mut r, 5, "a", true, id, 100);
        join(&mut r, 6, "b", false, id, 20);
        assert_eq!(order(&r, id, 1, 64), [4, 3, 2, 6, 5]);

        let first = &r.holders(&id, &key(1), 64)[0];
        assert_eq!(first.site, "a");
        assert_eq!(
            (first.verified, first.total, first.origin),
            (50, 100, false)
        );
        assert_eq!(first.peer.addrs, [vec![4; 8]]);

        // What the node sends passes the wire's validation.
        let holders = r.holders(&id, &key(1), MAX_PEER_RECORDS);
        assert!(ControlResponse::Holders { holders }.encode().is_ok());
    }

    #[test]
    fn unknown_asker_has_no_site() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        join(&mut r, 2, "b", false, id, 10);
        join(&mut r, 3, "a", false, id, 50);
        join(&mut r, 5, "a", true, id, 100);
        assert_eq!(order(&r, id, 9, 64), [3, 2, 5]);
        assert!(r.holders(&Hash::of(b"other"), &key(9), 64).is_empty());
    }

    #[test]
    fn peers_without_a_verified_piece_are_left_out() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        join(&mut r, 2, "a", false, id, 0);
        join(&mut r, 3, "a", false, id, 1);
        assert_eq!(order(&r, id, 9, 64), [3]);
    }

    #[test]
    fn limit_keeps_the_best_and_an_origin_when_nobody_kept_is_complete() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        for n in 10..20 {
            join(&mut r, n, "a", false, id, u32::from(n));
        }
        join(&mut r, 5, "b", true, id, 100);
        assert_eq!(order(&r, id, 1, 3), [19, 18, 5]);
        assert!(order(&r, id, 1, 0).is_empty());

        // A complete copy among the best: no place is reserved for the origin.
        join(&mut r, 30, "a", false, id, 100);
        assert_eq!(order(&r, id, 1, 3), [30, 19, 18]);
    }

    #[test]
    fn ties_are_spread_across_askers_but_stable_for_one() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        for n in 10..30 {
            join(&mut r, n, "a", false, id, 7);
        }
        let firsts: HashSet<u8> = (100..120).map(|asker| order(&r, id, asker, 1)[0]).collect();
        assert!(firsts.len() > 3, "askers got {firsts:?}");
        assert_eq!(order(&r, id, 100, 64), order(&r, id, 100, 64));
        // The cut agrees with the full order.
        assert_eq!(order(&r, id, 100, 5), order(&r, id, 100, 64)[..5]);
    }

    #[test]
    fn the_asker_is_not_its_own_holder() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        join(&mut r, 1, "a", false, id, 50);
        join(&mut r, 2, "a", false, id, 10);
        assert_eq!(order(&r, id, 1, 64), [2]);
    }

    #[test]
    fn register_needs_identify_first() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        assert!(!r.register(&key(1), vec![holding(id, 1)], Instant::now()));
        assert!(r.is_empty());
        assert!(r.holders(&id, &key(2), 64).is_empty());
    }

    #[test]
    fn register_replaces_holdings_and_reconnect_keeps_them() {
        let (v1, v2) = (Hash::of(b"v1"), Hash::of(b"v2"));
        let mut r = Registry::new();
        join(&mut r, 1, "a", false, v1, 5);
        assert!(r.register(
            &key(1),
            vec![holding(v2, 5), holding(v2, 9)],
            Instant::now()
        ));
        assert!(r.holders(&v1, &key(9), 64).is_empty());
        assert_eq!(r.holders(&v2, &key(9), 64).len(), 1, "duplicate dropped");

        r.connected(key(1), "b".into(), false, vec![], Instant::now())
            .unwrap();
        let h = &r.holders(&v2, &key(9), 64)[0];
        assert_eq!((h.site.as_str(), h.verified), ("b", 5));
    }

    #[test]
    fn connected_checks_what_would_not_pass_the_wire() {
        let mut r = Registry::new();
        let now = Instant::now();
        let long_addr = vec![0; MAX_ADDR_LEN + 1];
        let mut addrs = vec![vec![], long_addr];
        addrs.extend((0..20).map(|n| vec![n; 4]));
        r.connected(key(1), "a".into(), false, addrs, now).unwrap();
        let addrs = &r.member(&key(1)).unwrap().addrs;
        assert_eq!(addrs.len(), MAX_ADDRS_PER_PEER);
        assert_eq!(addrs[0], [0; 4]);

        for (peer, site) in [
            (PeerKey(vec![]), "a".to_owned()),
            (PeerKey(vec![1; MAX_PEER_ID_LEN + 1]), "a".to_owned()),
            (key(2), String::new()),
            (key(2), "x".repeat(MAX_SITE_LEN + 1)),
        ] {
            assert!(r.connected(peer, site, false, vec![], now).is_err());
        }
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn registry_is_bounded() {
        let mut r = Registry::new();
        let now = Instant::now();
        for n in 0..MAX_MEMBERS as u32 {
            let peer = PeerKey(n.to_le_bytes().to_vec());
            r.connected(peer, "a".into(), false, vec![], now).unwrap();
        }
        let extra = PeerKey(vec![0xff; 5]);
        assert!(matches!(
            r.connected(extra, "a".into(), false, vec![], now),
            Err(RegistryError::Full)
        ));
        // A known member may still update itself.
        r.connected(
            PeerKey(0u32.to_le_bytes().to_vec()),
            "b".into(),
            false,
            vec![],
            now,
        )
        .unwrap();

        let id = Hash::of(b"v1");
        let many: Vec<Holding> = (0..MAX_HOLDINGS as u64 + 10)
            .map(|v| Holding {
                manifest_id: Hash::of(&v.to_le_bytes()),
                ..holding(id, 1)
            })
            .collect();
        let peer = PeerKey(1u32.to_le_bytes().to_vec());
        assert!(r.register(&peer, many, now));
        assert_eq!(r.member(&peer).unwrap().holdings.len(), MAX_HOLDINGS);
    }

    #[test]
    fn disconnect_and_expire_forget_members() {
        let id = Hash::of(b"v1");
        let mut r = Registry::new();
        let t0 = Instant::now();
        r.connected(key(1), "a".into(), false, vec![], t0).unwrap();
        r.connected(key(2), "a".into(), false, vec![], t0).unwrap();
        r.register(&key(2), vec![holding(id, 3)], t0);
        let t1 = t0 + Duration::from_secs(50);
        r.register(&key(1), vec![holding(id, 3)], t1);

        r.expire(t0 + Duration::from_secs(60), Duration::from_secs(30));
        assert!(r.member(&key(2)).is_none());
        assert_eq!(order(&r, id, 9, 64), [1]);

        r.disconnected(&key(1));
        assert!(r.is_empty());
        assert!(r.by_version.is_empty(), "index emptied with the members");
    }

    #[test]
    fn summary_counts_per_version_and_site() {
        let (v1, v2) = (Hash::of(b"v1"), Hash::of(b"v2"));
        let mut r = Registry::new();
        join(&mut r, 1, "a", false, v1, 100);
        join(&mut r, 2, "a", false, v1, 30);
        join(&mut r, 3, "b", true, v1, 100);
        let now = Instant::now();
        r.connected(key(4), "b".into(), false, vec![], now).unwrap();
        r.register(
            &key(4),
            vec![Holding {
                version: 2,
                ..holding(v2, 0)
            }],
            now,
        );

        let s = r.summary();
        assert_eq!(s.members, 4);
        assert_eq!(
            s.sites,
            [
                SiteMembers {
                    site: "a".into(),
                    members: 2,
                    origins: 0
                },
                SiteMembers {
                    site: "b".into(),
                    members: 2,
                    origins: 1
                },
            ]
        );
        assert_eq!(s.versions.len(), 2);
        let v = &s.versions[0];
        assert_eq!((v.image.as_str(), v.version), ("win11", 1));
        assert_eq!(v.manifest, v1.to_hex());
        assert_eq!(
            v.sites,
            [
                SiteProgress {
                    site: "a".into(),
                    holders: 2,
                    complete: 1,
                    verified: 130,
                    total: 200
                },
                SiteProgress {
                    site: "b".into(),
                    holders: 1,
                    complete: 1,
                    verified: 100,
                    total: 100
                },
            ]
        );
        assert_eq!(s.versions[1].sites[0].holders, 1);
        assert_eq!(s.versions[1].sites[0].complete, 0);
    }
}
