//! The catalogue on disk, so a restarted tracker still answers late joiners.
//!
//! Owns one redb file with one table: (image, version) -> the encoded signed announcement,
//! exactly as the publisher signed it. Each save is one committed, durable transaction. Loading
//! verifies every row again against the trust list in force *now*: the file is not trusted
//! more than the network, and a key removed from the list takes its statements with it.
//!
//! ```text
//!  offer -> New/Replaced ──save──> redb ──load(trusted)──> Catalogue  (+ skipped, pruned)
//! ```
//!
//! Must not: decide which statement is newest (the [`Catalogue`] does, on load as online), or
//! delete a row that fails verification: the trust list may be restored, and the row is small.
//! Rows the catalogue's bounds drop are deleted on load, so the file stays bounded across
//! restarts.

use std::path::{Path, PathBuf};

use imiswarm_protocol::announce::TrustedKeys;
use redb::{Database, ReadableTable, TableDefinition};

use crate::catalogue::Catalogue;

/// (image, version) -> encoded signed announcement. redb orders a tuple key field by field, so
/// one image's versions are adjacent and in numeric order: `load` offers them oldest first.
const ANNOUNCEMENTS: TableDefinition<'static, (&str, u64), &[u8]> =
    TableDefinition::new("announcements");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the catalogue database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("cannot save the announcement of {image} version {version}: {source}")]
    Save {
        image: String,
        version: u64,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("cannot read the catalogue database: {0}")]
    Load(#[source] Box<redb::Error>),
    #[error("cannot delete dropped announcements from the catalogue database: {0}")]
    Prune(#[source] Box<redb::Error>),
}

/// Any redb error, boxed: redb's is 160 bytes, too large to carry in every `Result`.
#[derive(Debug)]
struct DbError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> Self {
        Self(Box::new(e.into()))
    }
}

/// What [`CatalogueStore::load`] found.
#[derive(Debug)]
pub struct Loaded {
    pub catalogue: Catalogue,
    /// Rows left on disk but not loaded: they no longer verify (untrusted key, unreadable,
    /// stored under another image or version than they name) or exceed the image bound.
    pub skipped: usize,
    /// Rows deleted because the catalogue's per-image bound dropped them.
    pub pruned: usize,
}

#[derive(Debug)]
pub struct CatalogueStore {
    db: Database,
}

impl CatalogueStore {
    /// Opens the database at `path`, creating the file (not its directory) if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let open = || -> Result<Database, DbError> {
            let db = Database::create(path)?;
            // Create the table now, so reading a fresh file finds it empty rather than missing.
            let txn = db.begin_write()?;
            txn.open_table(ANNOUNCEMENTS)?;
            txn.commit()?;
            Ok(db)
        };
        let db = open().map_err(|DbError(source)| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { db })
    }

    /// Stores `bytes` as the statement about `image` `version`, replacing any earlier one; durable
    /// when it returns. Call it only for what [`Catalogue::offer`] took (`New` or `Replaced`):
    /// it does not compare timestamps.
    pub fn save(&self, image: &str, version: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let save = || -> Result<(), DbError> {
            let txn = self.db.begin_write()?;
            txn.open_table(ANNOUNCEMENTS)?
                .insert((image, version), bytes)?;
            txn.commit()?;
            Ok(())
        };
        save().map_err(|DbError(source)| StoreError::Save {
            image: image.to_owned(),
            version,
            source,
        })
    }

    /// Rebuilds the catalogue from disk, verifying every row against `trusted`.
    pub fn load(&self, trusted: &TrustedKeys) -> Result<Loaded, StoreError> {
        let rows = self.rows().map_err(|DbError(e)| StoreError::Load(e))?;
        let mut catalogue = Catalogue::new();
        let mut kept_keys = Vec::new();
        let mut skipped = 0;
        for (image, version, bytes) in rows {
            let Ok(signed) = trusted.decode_and_verify(&bytes) else {
                skipped += 1;
                continue;
            };
            let a = &signed.announcement;
            if a.image != image || a.version != version {
                skipped += 1;
                continue;
            }
            match catalogue.insert_verified(bytes, signed) {
                Ok(_) => kept_keys.push((image, version)),
                Err(_) => skipped += 1,
            }
        }
        // Verified rows the catalogue let go of as later ones came in.
        let dropped: Vec<(String, u64)> = kept_keys
            .into_iter()
            .filter(|(image, version)| catalogue.get(image, *version).is_none())
            .collect();
        if !dropped.is_empty() {
            self.delete(&dropped)
                .map_err(|DbError(e)| StoreError::Prune(e))?;
        }
        Ok(Loaded {
            catalogue,
            skipped,
            pruned: dropped.len(),
        })
    }

    fn rows(&self) -> Result<Vec<(String, u64, Vec<u8>)>, DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ANNOUNCEMENTS)?;
        let mut rows = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let (image, version) = key.value();
            rows.push((image.to_owned(), version, value.value().to_vec()));
        }
        Ok(rows)
    }

    fn delete(&self, keys: &[(String, u64)]) -> Result<(), DbError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ANNOUNCEMENTS)?;
            for (image, version) in keys {
                table.remove((image.as_str(), *version))?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::tests::{ann, publisher, signed_by, trusted};
    use crate::catalogue::{MAX_VERSIONS_PER_IMAGE, Offered};
    use imiswarm_protocol::announce::{Lifecycle, PublisherKey};

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalogue.redb");
        let t = &trusted();
        let deploy = ann("win11", 7, Lifecycle::Deployed, 1000);
        let retire = ann("win11", 6, Lifecycle::Retired, 900);
        {
            let store = CatalogueStore::open(&path).unwrap();
            assert!(store.load(t).unwrap().catalogue.is_empty());
            store.save("win11", 7, &deploy).unwrap();
            store.save("win11", 6, &retire).unwrap();
        }
        let store = CatalogueStore::open(&path).unwrap();
        let loaded = store.load(t).unwrap();
        assert_eq!((loaded.skipped, loaded.pruned), (0, 0));
        let c = loaded.catalogue;
        assert_eq!(c.latest_deployed("win11"), Some(&deploy[..]));
        assert_eq!(c.get("win11", 6), Some(&retire[..]));
        assert_eq!(c.len(), 2);

        // A later statement overwrites the row.
        let retire7 = ann("win11", 7, Lifecycle::Retired, 2000);
        store.save("win11", 7, &retire7).unwrap();
        let c = store.load(t).unwrap().catalogue;
        assert_eq!(c.get("win11", 7), Some(&retire7[..]));
        assert_eq!(c.latest_deployed("win11"), None);
    }

    #[test]
    fn rows_that_no_longer_verify_are_skipped_but_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalogue.redb");
        let other = PublisherKey::from_seed([3; 32]);
        let both = TrustedKeys::new([publisher().public(), other.public()]);
        let store = CatalogueStore::open(&path).unwrap();
        store
            .save("win11", 7, &ann("win11", 7, Lifecycle::Deployed, 1))
            .unwrap();
        store
            .save(
                "ubuntu",
                1,
                &signed_by(&other, "ubuntu", 1, Lifecycle::Deployed, 1),
            )
            .unwrap();
        // Stored under a key it does not name, and garbage.
        store
            .save("win11", 8, &ann("win11", 9, Lifecycle::Deployed, 1))
            .unwrap();
        store.save("junk", 1, b"\x01junk").unwrap();
        assert_eq!(store.load(&both).unwrap().skipped, 2);

        // `other` leaves the trust list.
        let loaded = store.load(&trusted()).unwrap();
        assert_eq!(loaded.skipped, 3);
        assert_eq!(loaded.catalogue.len(), 1);
        assert!(loaded.catalogue.get("ubuntu", 1).is_none());

        // ...and comes back: its row was not deleted.
        let loaded = store.load(&both).unwrap();
        assert!(loaded.catalogue.get("ubuntu", 1).is_some());
    }

    #[test]
    fn rows_beyond_the_catalogue_bound_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = CatalogueStore::open(dir.path().join("c.redb")).unwrap();
        let t = &trusted();
        let extra = 3;
        for v in 0..(MAX_VERSIONS_PER_IMAGE + extra) as u64 {
            store
                .save("win11", v, &ann("win11", v, Lifecycle::Deployed, v))
                .unwrap();
        }
        let loaded = store.load(t).unwrap();
        assert_eq!(loaded.pruned, extra);
        assert_eq!(loaded.catalogue.len(), MAX_VERSIONS_PER_IMAGE);
        assert!(loaded.catalogue.get("win11", 0).is_none());

        let mut again = store.load(t).unwrap();
        assert_eq!((again.pruned, again.skipped), (0, 0));
        assert_eq!(again.catalogue.len(), MAX_VERSIONS_PER_IMAGE);
        let newer = ann("win11", 99, Lifecycle::Deployed, 99);
        assert_eq!(again.catalogue.offer(&newer, t).unwrap(), Offered::New);
    }

    #[test]
    fn open_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("c.redb");
        let err = CatalogueStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }
}
