//! The version log, the fleet registry and small blobs, in one redb database.
//!
//! redb commits are durable when `commit()` returns (fsync'd, copy-on-write), so a
//! version is acknowledged only after it will survive a crash. The head check and
//! the insert happen in one write transaction: two pushes on the same parent cannot
//! both win. A version's small blobs (see [`crate::INLINE_BLOB_LEN`]) can go into
//! the same transaction: one flush makes the version and its content durable, with
//! no blob file to create and sync first.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use vdsync_proto::wire::{AgentInfo, VersionInfo};
use vdsync_proto::Hash;

use crate::StoreError;

const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("versions");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// Blob hash → the blob's stored form (length prefix, zstd frame).
const SMALL_BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("small_blobs");

pub struct VersionLog {
    db: Database,
}

fn db_error(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(Box::new(err.into()))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt(err.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs of numbers and strings cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

impl VersionLog {
    pub fn open(path: &Path) -> Result<VersionLog, StoreError> {
        let db = Database::create(path).map_err(db_error)?;
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(VERSIONS).map_err(db_error)?;
        txn.open_table(AGENTS).map_err(db_error)?;
        txn.open_table(SMALL_BLOBS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(VersionLog { db })
    }

    pub fn head(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(VERSIONS).map_err(db_error)?;
        let last = table.last().map_err(db_error)?;
        Ok(last.map(|(key, _)| key.value()))
    }

    pub fn get(&self, version: u64) -> Result<Option<VersionInfo>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(VERSIONS).map_err(db_error)?;
        let found = table.get(version).map_err(db_error)?;
        found.map(|value| decode(value.value())).transpose()
    }

    pub fn list(&self) -> Result<Vec<VersionInfo>, StoreError> {
        self.read_all(VERSIONS)
    }

    /// The stored form of small blob `hash`, if the database holds it.
    pub fn small_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(SMALL_BLOBS).map_err(db_error)?;
        let found = table.get(hash.0.as_slice()).map_err(db_error)?;
        Ok(found.map(|value| value.value().to_vec()))
    }

    /// Stores the small blobs `blobs` (hash, stored form) durably, without a version.
    pub fn put_small_blobs(&self, blobs: &[(Hash, Vec<u8>)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        insert_small_blobs(&txn, blobs)?;
        txn.commit().map_err(db_error)?;
        Ok(())
    }

    /// Records the next version if `info.parent` is still the head, with the small
    /// blobs `blobs` (hash, stored form) in the same transaction. `info.version` is
    /// assigned here. Returns the new version number.
    pub fn commit(
        &self,
        mut info: VersionInfo,
        blobs: &[(Hash, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        insert_small_blobs(&txn, blobs)?;
        let number = {
            let mut table = txn.open_table(VERSIONS).map_err(db_error)?;
            let head = table.last().map_err(db_error)?.map(|(key, _)| key.value());
            if head != info.parent {
                return Err(StoreError::StaleParent {
                    parent: info.parent,
                    head,
                });
            }
            let number = head.map_or(0, |head| head + 1);
            info.version = number;
            table
                .insert(number, encode(&info).as_slice())
                .map_err(db_error)?;
            number
        };
        txn.commit().map_err(db_error)?;
        Ok(number)
    }

    pub fn put_agent(&self, agent: &AgentInfo) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(AGENTS).map_err(db_error)?;
            table
                .insert(agent.name.as_str(), encode(agent).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(())
    }

    pub fn agent(&self, name: &str) -> Result<Option<AgentInfo>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(AGENTS).map_err(db_error)?;
        let found = table.get(name).map_err(db_error)?;
        found.map(|value| decode(value.value())).transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
        self.read_all(AGENTS)
    }

    /// Every record of `table`, in key order.
    fn read_all<K: redb::Key + 'static, T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<K, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(table).map_err(db_error)?;
        let mut records = Vec::new();
        for item in table.iter().map_err(db_error)? {
            let (_, value) = item.map_err(db_error)?;
            records.push(decode(value.value())?);
        }
        Ok(records)
    }
}

/// Adds `blobs` (hash, stored form) to the small-blob table within `txn`.
fn insert_small_blobs(
    txn: &redb::WriteTransaction,
    blobs: &[(Hash, Vec<u8>)],
) -> Result<(), StoreError> {
    if blobs.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(SMALL_BLOBS).map_err(db_error)?;
    for (hash, stored) in blobs {
        table
            .insert(hash.0.as_slice(), stored.as_slice())
            .map_err(db_error)?;
    }
    Ok(())
}

/// A version record for tests: `parent`, changeset `changeset`, the rest fixed.
#[cfg(test)]
pub(crate) fn test_info(parent: Option<u64>, changeset: Hash) -> VersionInfo {
    VersionInfo {
        version: 0,
        parent,
        time: 1,
        message: "m".into(),
        files: 1,
        dirs: 0,
        deleted: 0,
        bytes: 1,
        changeset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(parent: Option<u64>) -> VersionInfo {
        test_info(parent, Hash::of(b"c"))
    }

    #[test]
    fn versions_chain_and_stale_parents_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let log = VersionLog::open(&temp.path().join("db")).unwrap();
        assert_eq!(log.head().unwrap(), None);
        assert_eq!(log.commit(info(None), &[]).unwrap(), 0);
        let small = (Hash::of(b"blob"), b"stored form".to_vec());
        assert_eq!(
            log.commit(info(Some(0)), std::slice::from_ref(&small))
                .unwrap(),
            1
        );
        let refused = (Hash::of(b"refused"), b"x".to_vec());
        let err = log
            .commit(info(Some(0)), std::slice::from_ref(&refused))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "stale parent: the change was made against version 0 but the head is version 1"
        );
        assert!(log.commit(info(None), &[]).is_err());
        assert_eq!(
            log.small_blob(&refused.0).unwrap(),
            None,
            "a refused commit stored its blobs"
        );
        drop(log);
        let reopened = VersionLog::open(&temp.path().join("db")).unwrap();
        assert_eq!(reopened.head().unwrap(), Some(1));
        assert_eq!(reopened.list().unwrap().len(), 2);
        assert_eq!(reopened.get(1).unwrap().unwrap().parent, Some(0));
        assert_eq!(reopened.small_blob(&small.0).unwrap(), Some(small.1));
    }
}
