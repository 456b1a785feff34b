//! The pusher's index on disk: one redb table from path to [`IndexEntry`], plus the
//! version the tree was last pushed as.
//!
//! A journal-driven push reads and writes only the paths that changed, so the index
//! must answer "what was at this path" and "everything below this directory" without
//! loading the tree; keys are laid out (see `db`) so a subtree is one key range.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use vdsync_proto::RepoPath;

use crate::db::{self, below, db_error, key_of};
use crate::scan::{Index, IndexEntry};
use crate::TrackError;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";

/// redb's page cache: enough for a push's working set, small enough that the
/// pusher's memory does not grow with the tree.
const CACHE_BYTES: usize = 16 << 20;

pub struct IndexDb {
    db: Database,
    path: PathBuf,
}

impl IndexDb {
    pub fn open(path: &Path) -> Result<IndexDb, TrackError> {
        let db = db::open(path, CACHE_BYTES)?;
        let index = IndexDb {
            db,
            path: path.to_path_buf(),
        };
        index.create_tables()?;
        Ok(index)
    }

    /// Creates the tables in a new database. An existing one is only read: a write
    /// transaction costs syncs, and `push` opens the index every time.
    fn create_tables(&self) -> Result<(), TrackError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        if read.open_table(ENTRIES).is_ok() && read.open_table(META).is_ok() {
            return Ok(());
        }
        drop(read);
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        txn.open_table(ENTRIES).map_err(|e| self.error(e))?;
        txn.open_table(META).map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))
    }

    /// An empty index that lives only in memory (for `status` before any push).
    pub fn in_memory() -> Result<IndexDb, TrackError> {
        let path = PathBuf::from("(in memory)");
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|err| db_error(&path, err))?;
        let index = IndexDb { db, path };
        index.create_tables()?;
        Ok(index)
    }

    fn error(&self, err: impl Into<redb::Error>) -> TrackError {
        db_error(&self.path, err)
    }

    fn decode(&self, bytes: &[u8]) -> Result<IndexEntry, TrackError> {
        serde_json::from_slice(bytes).map_err(|err| TrackError::CorruptState {
            path: self.path.clone(),
            message: err.to_string(),
        })
    }

    /// True until the first push (or import) wrote a version.
    pub fn is_empty(&self) -> Result<bool, TrackError> {
        Ok(self.version_record()?.is_none())
    }

    fn version_record(&self) -> Result<Option<Option<u64>>, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.error(e))?;
        let stored = meta.get(VERSION_KEY).map_err(|e| self.error(e))?;
        // u64::MAX stands for "pushed, but before any version existed".
        Ok(stored.map(|value| Some(value.value()).filter(|v| *v != u64::MAX)))
    }

    /// The version the tree was last pushed as (`None` if never).
    pub fn version(&self) -> Result<Option<u64>, TrackError> {
        Ok(self.version_record()?.flatten())
    }

    pub fn get(&self, path: &RepoPath) -> Result<Option<IndexEntry>, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.error(e))?;
        let found = table
            .get(key_of(path).as_slice())
            .map_err(|e| self.error(e))?;
        found.map(|value| self.decode(value.value())).transpose()
    }

    /// `top` (if indexed) and everything below it, in path order.
    pub fn subtree(&self, top: &RepoPath) -> Result<Vec<IndexEntry>, TrackError> {
        self.subtree_up_to(top, usize::MAX)
            .map(|entries| entries.unwrap_or_default())
    }

    /// [`IndexDb::subtree`], or `None` as soon as it holds more than `limit` entries.
    pub fn subtree_up_to(
        &self,
        top: &RepoPath,
        limit: usize,
    ) -> Result<Option<Vec<IndexEntry>>, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.error(e))?;
        let (start, end) = below(top);
        let mut entries = Vec::new();
        if let Some(value) = table
            .get(key_of(top).as_slice())
            .map_err(|e| self.error(e))?
        {
            entries.push(self.decode(value.value())?);
        }
        for item in table
            .range(start.as_slice()..end.as_slice())
            .map_err(|e| self.error(e))?
        {
            if entries.len() >= limit {
                return Ok(None);
            }
            let (_, value) = item.map_err(|e| self.error(e))?;
            entries.push(self.decode(value.value())?);
        }
        Ok(Some(entries))
    }

    /// The whole index, for a full rescan.
    pub fn load(&self) -> Result<Index, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.error(e))?;
        let mut entries = Vec::new();
        for item in table.iter().map_err(|e| self.error(e))? {
            let (_, value) = item.map_err(|e| self.error(e))?;
            entries.push(self.decode(value.value())?);
        }
        Ok(Index {
            version: self.version()?,
            entries,
        })
    }

    /// Replaces the whole index (after a full scan).
    pub fn store(&self, index: &Index) -> Result<(), TrackError> {
        self.write(true, index.version, &[], &index.entries)
    }

    /// Removes every entry at or below `removed`, writes `upserts`, and records
    /// `version`, in one transaction.
    pub fn update(
        &self,
        version: Option<u64>,
        removed: &[RepoPath],
        upserts: &[IndexEntry],
    ) -> Result<(), TrackError> {
        self.write(false, version, removed, upserts)
    }

    fn write(
        &self,
        replace_all: bool,
        version: Option<u64>,
        removed: &[RepoPath],
        upserts: &[IndexEntry],
    ) -> Result<(), TrackError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            if replace_all {
                txn.delete_table(ENTRIES).map_err(|e| self.error(e))?;
            }
            let mut table = txn.open_table(ENTRIES).map_err(|e| self.error(e))?;
            for top in removed {
                table
                    .remove(key_of(top).as_slice())
                    .map_err(|e| self.error(e))?;
                let (start, end) = below(top);
                table
                    .retain_in(start.as_slice()..end.as_slice(), |_, _| false)
                    .map_err(|e| self.error(e))?;
            }
            for entry in upserts {
                let value = serde_json::to_vec(entry).map_err(|err| TrackError::CorruptState {
                    path: self.path.clone(),
                    message: err.to_string(),
                })?;
                table
                    .insert(key_of(&entry.path).as_slice(), value.as_slice())
                    .map_err(|e| self.error(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            // u64::MAX stands for "pushed, but before any version existed".
            meta.insert(VERSION_KEY, version.unwrap_or(u64::MAX))
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::{dir, file, path};

    fn item(at: &str, entry: vdsync_proto::Entry) -> IndexEntry {
        IndexEntry {
            path: path(at),
            entry,
            stat: None,
        }
    }

    #[test]
    fn subtrees_are_contiguous_and_updates_are_atomic() {
        let temp = tempfile::tempdir().unwrap();
        let db = IndexDb::open(&temp.path().join("index.redb")).unwrap();
        assert!(db.is_empty().unwrap());
        let index = Index {
            version: None,
            entries: vec![
                item("a", dir()),
                item("a/b", file(b"1")),
                item("a/c", dir()),
                item("a/c/d", file(b"2")),
                item("a b", file(b"3")),
                item("a-b", dir()),
            ],
        };
        db.store(&index).unwrap();
        assert!(!db.is_empty().unwrap());
        assert_eq!(db.version().unwrap(), None);
        let shown = |entries: Vec<IndexEntry>| -> Vec<String> {
            entries.iter().map(|e| e.path.to_string()).collect()
        };
        assert_eq!(
            shown(db.subtree(&path("a")).unwrap()),
            ["a", "a/b", "a/c", "a/c/d"]
        );
        assert_eq!(shown(db.subtree(&path("a/c")).unwrap()), ["a/c", "a/c/d"]);
        assert_eq!(
            shown(db.load().unwrap().entries),
            ["a", "a/b", "a/c", "a/c/d", "a b", "a-b"]
        );

        db.update(Some(3), &[path("a/c")], &[item("a/e", file(b"4"))])
            .unwrap();
        assert_eq!(db.version().unwrap(), Some(3));
        assert_eq!(shown(db.subtree(&path("a")).unwrap()), ["a", "a/b", "a/e"]);
        assert!(db.get(&path("a/c/d")).unwrap().is_none());
        assert_eq!(db.get(&path("a b")).unwrap().unwrap().entry, file(b"3"));
    }
}
