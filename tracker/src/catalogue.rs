//! The catalogue: the signed announcements a tracker keeps for nodes that join late.
//!
//! Owns, for each (image, version), the newest verified statement about it, as the exact bytes
//! the publisher signed (a node re-verifies them; the tracker is not trusted to vouch for
//! anything). Newest means the later `timestamp_ms`; at equal times a retirement wins, so a
//! publisher's "retire" is never lost to a replayed "deploy".
//!
//! Must not: decide what a node fetches or keeps (that is the node's policy), accept anything
//! that does not verify against the trusted keys, or grow without bound: at most
//! [`MAX_VERSIONS_PER_IMAGE`] versions per image and [`MAX_IMAGES`] images.

use std::collections::BTreeMap;

use imiswarm_protocol::announce::{Lifecycle, SignedAnnouncement, TrustedKeys, VerifyError};
use imiswarm_protocol::limits::MAX_CATALOGUE;
use serde::Serialize;

/// Versions kept per image; past it the lowest version goes, never the newest deployed one.
pub const MAX_VERSIONS_PER_IMAGE: usize = 64;
/// Images kept; a statement about a further image is refused.
pub const MAX_IMAGES: usize = 1024;

/// What an offer changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// A version the catalogue did not know.
    New,
    /// A newer statement about a known version (typically its retirement).
    Replaced,
    /// Nothing: the catalogue already has this or a newer statement, or the version is older
    /// than every kept one of a full image. Not worth storing or forwarding.
    Stale,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("announcement refused: {0}")]
    Refused(#[from] VerifyError),
    #[error("catalogue full: it keeps at most {MAX_IMAGES} images")]
    TooManyImages,
}

#[derive(Clone, Debug)]
struct Stored {
    bytes: Vec<u8>,
    signed: SignedAnnouncement,
}

impl Stored {
    fn deployed(&self) -> bool {
        self.signed.announcement.state == Lifecycle::Deployed
    }
}

/// One kept statement, for the status API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CatalogueEntry {
    pub image: String,
    pub version: u64,
    pub state: Lifecycle,
    /// Manifest id, hex.
    pub manifest: String,
    pub total_size: u64,
    pub timestamp_ms: u64,
}

#[derive(Debug, Default)]
pub struct Catalogue {
    images: BTreeMap<String, BTreeMap<u64, Stored>>,
}

impl Catalogue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Statements kept, over all images.
    pub fn len(&self) -> usize {
        self.images.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Verifies `bytes` (an encoded signed announcement) and keeps it if it is the newest
    /// statement about its version.
    pub fn offer(
        &mut self,
        bytes: &[u8],
        trusted: &TrustedKeys,
    ) -> Result<Offered, CatalogueError> {
        let signed = trusted.decode_and_verify(bytes)?;
        self.insert_verified(bytes.to_vec(), signed)
    }

    /// `offer` after verification; `bytes` must be the encoding of `signed`.
    pub(crate) fn insert_verified(
        &mut self,
        bytes: Vec<u8>,
        signed: SignedAnnouncement,
    ) -> Result<Offered, CatalogueError> {
        let a = &signed.announcement;
        if !self.images.contains_key(&a.image) && self.images.len() >= MAX_IMAGES {
            return Err(CatalogueError::TooManyImages);
        }
        let version = a.version;
        let versions = self.images.entry(a.image.clone()).or_default();
        let outcome = match versions.get(&version) {
            None => Offered::New,
            Some(old) if supersedes(&signed, &old.signed) => Offered::Replaced,
            Some(_) => return Ok(Offered::Stale),
        };
        versions.insert(version, Stored { bytes, signed });
        if versions.len() > MAX_VERSIONS_PER_IMAGE && evict_one(versions) == Some(version) {
            return Ok(Offered::Stale);
        }
        Ok(outcome)
    }

    /// The newest deployed version of `image` (the highest version number, as nodes read it):
    /// the answer to `LatestVersion`.
    pub fn latest_deployed(&self, image: &str) -> Option<&[u8]> {
        let versions = self.images.get(image)?;
        latest_deployed(versions).map(|s| s.bytes.as_slice())
    }

    /// The kept statement about one version: the answer to `Announcement`.
    pub fn get(&self, image: &str, version: u64) -> Option<&[u8]> {
        let stored = self.images.get(image)?.get(&version)?;
        Some(&stored.bytes)
    }

    /// What a late joiner needs, at most [`MAX_CATALOGUE`]: the newest deployed version of
    /// every image (what to fetch), then every retired version (what to drop), each part newest
    /// first. Deployed ones come first so a cut drops cleanup hints rather than deployments.
    pub fn for_late_joiners(&self) -> Vec<Vec<u8>> {
        let mut deployed: Vec<&Stored> = Vec::new();
        let mut retired: Vec<&Stored> = Vec::new();
        for versions in self.images.values() {
            deployed.extend(latest_deployed(versions));
            retired.extend(versions.values().filter(|s| !s.deployed()));
        }
        let newest_first = |s: &&Stored| std::cmp::Reverse(s.signed.announcement.timestamp_ms);
        deployed.sort_by_key(newest_first);
        retired.sort_by_key(newest_first);
        deployed
            .into_iter()
            .chain(retired)
            .take(MAX_CATALOGUE)
            .map(|s| s.bytes.clone())
            .collect()
    }

    /// Every kept statement, by image then version.
    pub fn entries(&self) -> Vec<CatalogueEntry> {
        self.images
            .values()
            .flat_map(BTreeMap::values)
            .map(|s| {
                let a = &s.signed.announcement;
                CatalogueEntry {
                    image: a.image.clone(),
                    version: a.version,
                    state: a.state,
                    manifest: a.manifest_id.to_hex(),
                    total_size: a.total_size,
                    timestamp_ms: a.timestamp_ms,
                }
            })
            .collect()
    }
}

/// Whether `new` is a later statement than `old` about the same version.
fn supersedes(new: &SignedAnnouncement, old: &SignedAnnouncement) -> bool {
    let (new, old) = (&new.announcement, &old.announcement);
    new.timestamp_ms > old.timestamp_ms
        || (new.timestamp_ms == old.timestamp_ms
            && new.state == Lifecycle::Retired
            && old.state == Lifecycle::Deployed)
}

fn latest_deployed(versions: &BTreeMap<u64, Stored>) -> Option<&Stored> {
    versions.values().rev().find(|s| s.deployed())
}

/// Drops the lowest version other than the newest deployed one (what nodes would fetch) and
/// returns it.
fn evict_one(versions: &mut BTreeMap<u64, Stored>) -> Option<u64> {
    let keep = latest_deployed(versions).map(|s| s.signed.announcement.version);
    let victim = versions.keys().copied().find(|v| Some(*v) != keep)?;
    versions.remove(&victim);
    Some(victim)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use imiswarm_protocol::announce::{Announcement, PublisherKey};
    use imiswarm_protocol::codec::WireFormat;
    use imiswarm_protocol::hash::Hash;

    pub(crate) fn publisher() -> PublisherKey {
        PublisherKey::from_seed([1; 32])
    }

    pub(crate) fn trusted() -> TrustedKeys {
        TrustedKeys::new([publisher().public()])
    }

    /// Encoded statement about `image` `version`, signed by `key`.
    pub(crate) fn signed_by(
        key: &PublisherKey,
        image: &str,
        version: u64,
        state: Lifecycle,
        timestamp_ms: u64,
    ) -> Vec<u8> {
        key.sign(Announcement {
            image: image.into(),
            version,
            manifest_id: Hash::of(format!("{image} {version}").as_bytes()),
            total_size: 1 << 30,
            state,
            timestamp_ms,
        })
        .unwrap()
        .encode()
        .unwrap()
    }

    pub(crate) fn ann(image: &str, version: u64, state: Lifecycle, timestamp_ms: u64) -> Vec<u8> {
        signed_by(&publisher(), image, version, state, timestamp_ms)
    }

    use Lifecycle::{Deployed, Retired};

    #[test]
    fn newest_statement_wins() {
        let mut c = Catalogue::new();
        let t = &trusted();
        let deploy = ann("win11", 7, Deployed, 1000);
        let retire = ann("win11", 7, Retired, 2000);
        assert_eq!(c.offer(&deploy, t).unwrap(), Offered::New);
        assert_eq!(c.offer(&deploy, t).unwrap(), Offered::Stale, "a repeat");
        assert_eq!(c.latest_deployed("win11"), Some(&deploy[..]));

        assert_eq!(c.offer(&retire, t).unwrap(), Offered::Replaced);
        assert_eq!(c.get("win11", 7), Some(&retire[..]));
        assert_eq!(c.latest_deployed("win11"), None);

        // A replayed older deploy does not undo the retirement.
        assert_eq!(c.offer(&deploy, t).unwrap(), Offered::Stale);
        assert_eq!(c.get("win11", 7), Some(&retire[..]));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn at_equal_times_retirement_wins() {
        let mut c = Catalogue::new();
        let t = &trusted();
        let retire = ann("win11", 7, Retired, 1000);
        c.offer(&retire, t).unwrap();
        assert_eq!(
            c.offer(&ann("win11", 7, Deployed, 1000), t).unwrap(),
            Offered::Stale
        );
        let mut c = Catalogue::new();
        c.offer(&ann("win11", 7, Deployed, 1000), t).unwrap();
        assert_eq!(c.offer(&retire, t).unwrap(), Offered::Replaced);
    }

    #[test]
    fn latest_deployed_is_the_highest_deployed_version() {
        let mut c = Catalogue::new();
        let t = &trusted();
        let v7 = ann("win11", 7, Deployed, 1000);
        c.offer(&v7, t).unwrap();
        c.offer(&ann("win11", 8, Deployed, 2000), t).unwrap();
        // A rollback: 8 retired, 7 is current again.
        c.offer(&ann("win11", 8, Retired, 3000), t).unwrap();
        assert_eq!(c.latest_deployed("win11"), Some(&v7[..]));
        assert_eq!(c.latest_deployed("ubuntu"), None);
        assert_eq!(c.get("win11", 9), None);
    }

    #[test]
    fn untrusted_forged_and_garbage_are_refused() {
        let mut c = Catalogue::new();
        let t = &trusted();
        let stranger = PublisherKey::from_seed([2; 32]);
        let err = c
            .offer(&signed_by(&stranger, "win11", 7, Deployed, 1), t)
            .unwrap_err();
        assert!(matches!(
            err,
            CatalogueError::Refused(VerifyError::Untrusted(_))
        ));

        let mut forged = SignedAnnouncement::decode(&ann("win11", 7, Deployed, 1)).unwrap();
        forged.announcement.version = 8;
        let err = c.offer(&forged.encode().unwrap(), t).unwrap_err();
        assert!(matches!(
            err,
            CatalogueError::Refused(VerifyError::BadSignature)
        ));

        assert!(c.offer(b"\x01garbage", t).is_err());
        assert!(c.offer(&[], t).is_err());
        assert!(c.is_empty());
    }

    #[test]
    fn late_joiners_get_latest_deployed_and_every_retired() {
        let mut c = Catalogue::new();
        let t = &trusted();
        for (image, version, state, time) in [
            ("win11", 5, Retired, 500),
            ("win11", 6, Deployed, 600),
            ("win11", 7, Deployed, 700),
            ("ubuntu", 1, Deployed, 900),
            ("ubuntu", 2, Retired, 1000),
        ] {
            c.offer(&ann(image, version, state, time), t).unwrap();
        }
        let decoded: Vec<(String, u64)> = c
            .for_late_joiners()
            .iter()
            .map(|b| {
                let a = t.decode_and_verify(b).unwrap().announcement;
                (a.image, a.version)
            })
            .collect();
        let expect = [("ubuntu", 1), ("win11", 7), ("ubuntu", 2), ("win11", 5)];
        assert_eq!(decoded, expect.map(|(i, v)| (i.to_owned(), v)));

        let entries = c.entries();
        assert_eq!(entries.len(), 5);
        assert_eq!(
            (
                entries[0].image.as_str(),
                entries[0].version,
                entries[0].state
            ),
            ("ubuntu", 1, Deployed)
        );
        assert_eq!(entries[0].manifest, Hash::of(b"ubuntu 1").to_hex());
    }

    #[test]
    fn late_joiner_list_is_capped_deployed_first() {
        let mut c = Catalogue::new();
        let t = &trusted();
        let images = MAX_CATALOGUE / MAX_VERSIONS_PER_IMAGE + 2;
        for i in 0..images as u64 {
            for v in 0..MAX_VERSIONS_PER_IMAGE as u64 {
                let state = if v == 0 { Deployed } else { Retired };
                c.offer(&ann(&format!("img{i}"), v, state, i * 100 + v), t)
                    .unwrap();
            }
        }
        let list = c.for_late_joiners();
        assert_eq!(list.len(), MAX_CATALOGUE);
        let states: Vec<Lifecycle> = list
            .iter()
            .map(|b| t.decode_and_verify(b).unwrap().announcement.state)
            .collect();
        assert!(states[..images].iter().all(|s| *s == Deployed));
        assert!(states[images..].iter().all(|s| *s == Retired));
    }

    #[test]
    fn versions_per_image_are_bounded_keeping_the_latest_deployed() {
        let mut c = Catalogue::new();
        let t = &trusted();
        c.offer(&ann("win11", 0, Deployed, 1), t).unwrap();
        for v in 1..=MAX_VERSIONS_PER_IMAGE as u64 {
            c.offer(&ann("win11", v, Retired, 10 + v), t).unwrap();
        }
        assert_eq!(c.len(), MAX_VERSIONS_PER_IMAGE);
        assert!(
            c.get("win11", 0).is_some(),
            "the only deployed version stays"
        );
        assert!(c.get("win11", 1).is_none(), "the lowest other one went");

        // Older than everything kept in a full image: not kept.
        assert_eq!(
            c.offer(&ann("win11", 1, Retired, 10_000), t).unwrap(),
            Offered::Stale
        );
        assert!(c.get("win11", 1).is_none());
    }

    #[test]
    fn images_are_bounded() {
        let mut c = Catalogue::new();
        let t = &trusted();
        for i in 0..MAX_IMAGES {
            c.offer(&ann(&format!("img{i}"), 1, Deployed, 1), t)
                .unwrap();
        }
        assert!(matches!(
            c.offer(&ann("one-more", 1, Deployed, 1), t),
            Err(CatalogueError::TooManyImages)
        ));
        // A known image still takes news.
        assert_eq!(
            c.offer(&ann("img0", 2, Deployed, 2), t).unwrap(),
            Offered::New
        );
    }
}
