//! The tracker's journal: which paths changed since the last push, kept in redb in
//! `--state` so it survives restarts of the tracker and of the machine.
//!
//! The journal records *names*, not what happened to them. Whether a name is now
//! new, modified, deleted or back to what was pushed is decided when `status` or
//! `push` looks at it (stat against the index). So events coalesce for free: a temp
//! file created, written and deleted leaves a name that resolves to nothing; a chain
//! of renames leaves names of which only the last exists. A `Subtree` mark covers
//! everything below a name (a directory moved in or out); a root mark covers the
//! whole tree (queue overflow, tracker start, any doubt) and says why.
//!
//! Every mark carries the sequence number of the batch that wrote it. A push takes a
//! snapshot at sequence S and, once committed, clears marks with sequence ≤ S; a
//! change made during the push gets a later sequence and stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use vdsync_proto::RepoPath;

use crate::db::{self, db_error, key_of, path_of};
use crate::TrackError;

const MARKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("marks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SEQUENCE_KEY: &str = "sequence";
const ROOT_KEY: &str = "root";

/// Kept small: the journal of a million paths lives on disk, not in the tracker's
/// memory.
const CACHE_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// Look at this name.
    Path,
    /// Look at this name and everything below it.
    Subtree,
}

/// Why the whole root must be rescanned, and since which batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRescan {
    pub sequence: u64,
    pub reason: String,
}

/// What a push or status works from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Marks with a sequence up to this one are included.
    pub sequence: u64,
    pub root: Option<RootRescan>,
    /// Sorted by path; no mark lies below a `Subtree` mark.
    pub marks: Vec<(RepoPath, Mark)>,
}

pub struct Journal {
    db: Database,
    path: PathBuf,
}

fn encode_mark(mark: Mark, sequence: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = match mark {
        Mark::Path => 1,
        Mark::Subtree => 2,
    };
    out[1..].copy_from_slice(&sequence.to_le_bytes());
    out
}

fn decode_mark(bytes: &[u8]) -> Option<(Mark, u64)> {
    let mark = match bytes.first()? {
        1 => Mark::Path,
        2 => Mark::Subtree,
        _ => return None,
    };
    let sequence = u64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?);
    Some((mark, sequence))
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal, TrackError> {
        let db = db::open(path, CACHE_BYTES)?;
        let journal = Journal {
            db,
            path: path.to_path_buf(),
        };
        let txn = journal.db.begin_write().map_err(|e| journal.error(e))?;
        txn.open_table(MARKS).map_err(|e| journal.error(e))?;
        txn.open_table(META).map_err(|e| journal.error(e))?;
        txn.commit().map_err(|e| journal.error(e))?;
        Ok(journal)
    }

    fn error(&self, err: impl Into<redb::Error>) -> TrackError {
        db_error(&self.path, err)
    }

    /// Starts a tracker's run: records a whole-root rescan (what changed while no
    /// tracker ran is unknown), durably, with the first sequence number of a new
    /// epoch. Sequence numbers are (epoch << 32) + counter, so those of this run are
    /// above any the previous run handed out, including ones recorded without a
    /// sync and lost with it: a clear asked for by a push of the previous run can
    /// never remove a mark of this one.
    pub fn record_start(&self, reason: &str) -> Result<u64, TrackError> {
        self.write(&BTreeMap::new(), Some(reason), true, |previous| {
            ((previous >> 32) + 1) << 32
        })
    }

    /// Records one batch of marks (and, if given, a whole-root rescan) as one
    /// transaction, synced if `durable`. Returns the batch's sequence number. A
    /// batch lost in a crash is harmless: the next tracker starts with a whole-root
    /// rescan and a new epoch (see [`Journal::record_start`]).
    pub fn record(
        &self,
        marks: &BTreeMap<RepoPath, Mark>,
        root_reason: Option<&str>,
        durable: bool,
    ) -> Result<u64, TrackError> {
        self.write(marks, root_reason, durable, |previous| previous + 1)
    }

    fn write(
        &self,
        marks: &BTreeMap<RepoPath, Mark>,
        root_reason: Option<&str>,
        durable: bool,
        next_sequence: impl FnOnce(u64) -> u64,
    ) -> Result<u64, TrackError> {
        let mut txn = self.db.begin_write().map_err(|e| self.error(e))?;
        if !durable {
            txn.set_durability(redb::Durability::None);
        }
        let sequence;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            let previous = meta
                .get(SEQUENCE_KEY)
                .map_err(|e| self.error(e))?
                .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0);
            sequence = next_sequence(previous);
            meta.insert(SEQUENCE_KEY, sequence.to_le_bytes().as_slice())
                .map_err(|e| self.error(e))?;
            if let Some(reason) = root_reason {
                let record = serde_json::to_vec(&RootRescan {
                    sequence,
                    reason: reason.to_owned(),
                })
                .unwrap_or_default();
                meta.insert(ROOT_KEY, record.as_slice())
                    .map_err(|e| self.error(e))?;
            }
            let mut table = txn.open_table(MARKS).map_err(|e| self.error(e))?;
            for (path, mark) in marks {
                let key = key_of(path);
                // A subtree mark is never weakened by a later plain one.
                let kept = table
                    .get(key.as_slice())
                    .map_err(|e| self.error(e))?
                    .and_then(|v| decode_mark(v.value()))
                    .map_or(*mark, |(old, _)| old.max(*mark));
                table
                    .insert(key.as_slice(), encode_mark(kept, sequence).as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))?;
        Ok(sequence)
    }

    /// Everything recorded so far, with marks below subtree marks left out. Past
    /// `mark_limit` marks the snapshot asks for a full scan instead of listing them:
    /// reading that many paths one by one costs about what a scan costs, and neither
    /// the tracker nor the pusher should hold millions of paths in memory.
    pub fn snapshot(&self, mark_limit: u64) -> Result<Snapshot, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.error(e))?;
        let sequence = meta
            .get(SEQUENCE_KEY)
            .map_err(|e| self.error(e))?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0);
        let root = meta
            .get(ROOT_KEY)
            .map_err(|e| self.error(e))?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        let table = txn.open_table(MARKS).map_err(|e| self.error(e))?;
        let count = table.len().map_err(|e| self.error(e))?;
        if count > mark_limit {
            return Ok(Snapshot {
                sequence,
                root: Some(RootRescan {
                    sequence,
                    reason: format!(
                        "{count} paths changed, more than the {mark_limit} a journal-driven push reads one by one"
                    ),
                }),
                marks: Vec::new(),
            });
        }
        let mut marks: Vec<(RepoPath, Mark)> = Vec::new();
        let mut covering: Option<RepoPath> = None;
        for item in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = item.map_err(|e| self.error(e))?;
            let (Some(path), Some((mark, _))) = (path_of(key.value()), decode_mark(value.value()))
            else {
                continue;
            };
            if covering.as_ref().is_some_and(|top| path.starts_with(top)) {
                continue;
            }
            if mark == Mark::Subtree {
                covering = Some(path.clone());
            }
            marks.push((path, mark));
        }
        Ok(Snapshot {
            sequence,
            root,
            marks,
        })
    }

    /// Forgets what a push up to `sequence` has covered.
    ///
    /// Not synced: it becomes durable with the next batch recorded. A clear lost in a
    /// crash leaves marks that the next push looks at again and finds unchanged,
    /// while a sync here would add to every push. (Sequence numbers never run
    /// backwards across a crash: see [`Journal::record_start`].)
    pub fn clear_upto(&self, sequence: u64) -> Result<(), TrackError> {
        let mut txn = self.db.begin_write().map_err(|e| self.error(e))?;
        txn.set_durability(redb::Durability::None);
        {
            let mut table = txn.open_table(MARKS).map_err(|e| self.error(e))?;
            table
                .retain(|_, value| decode_mark(value).is_some_and(|(_, seq)| seq > sequence))
                .map_err(|e| self.error(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            let root: Option<RootRescan> = meta
                .get(ROOT_KEY)
                .map_err(|e| self.error(e))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            if root.is_some_and(|root| root.sequence <= sequence) {
                meta.remove(ROOT_KEY).map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// Number of marks stored (for status and benchmarks).
    pub fn mark_count(&self) -> Result<u64, TrackError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(MARKS).map_err(|e| self.error(e))?;
        table.len().map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::path;

    fn marks(items: &[(&str, Mark)]) -> BTreeMap<RepoPath, Mark> {
        items.iter().map(|(p, m)| (path(p), *m)).collect()
    }

    #[test]
    fn marks_coalesce_and_clear_by_sequence() {
        let temp = tempfile::tempdir().unwrap();
        let journal = Journal::open(&temp.path().join("journal.redb")).unwrap();
        let first = journal
            .record(
                &marks(&[("a", Mark::Subtree), ("a/x", Mark::Path), ("b", Mark::Path)]),
                Some("tracker started"),
                true,
            )
            .unwrap();
        // A later plain mark does not weaken the subtree mark.
        let second = journal
            .record(&marks(&[("a", Mark::Path), ("c", Mark::Path)]), None, true)
            .unwrap();
        assert!(second > first);
        let snapshot = journal.snapshot(100).unwrap();
        assert_eq!(snapshot.sequence, second);
        assert_eq!(snapshot.root.as_ref().unwrap().reason, "tracker started");
        let shown: Vec<(String, Mark)> = snapshot
            .marks
            .iter()
            .map(|(p, m)| (p.to_string(), *m))
            .collect();
        assert_eq!(
            shown,
            [
                ("a".to_owned(), Mark::Subtree),
                ("b".to_owned(), Mark::Path),
                ("c".to_owned(), Mark::Path)
            ]
        );

        // A push of the first batch clears it and the root mark; a change made
        // during the push (a later batch) stays.
        journal.clear_upto(first).unwrap();
        let after = journal.snapshot(100).unwrap();
        assert!(after.root.is_none());
        let shown: Vec<String> = after.marks.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(shown, ["a", "c"]);

        // Past the limit, a snapshot asks for a full scan instead of listing paths.
        let crowded = journal.snapshot(1).unwrap();
        assert!(crowded.marks.is_empty());
        assert!(crowded.root.unwrap().reason.starts_with("2 paths changed"));

        drop(journal);
        let reopened = Journal::open(&temp.path().join("journal.redb")).unwrap();
        assert_eq!(reopened.mark_count().unwrap(), 2);
    }

    #[test]
    fn a_new_run_numbers_above_everything_the_last_one_handed_out() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("journal.redb");
        let journal = Journal::open(&path).unwrap();
        let started = journal.record_start("started").unwrap();
        let durable = journal
            .record(&marks(&[("a", Mark::Path)]), None, true)
            .unwrap();
        let handed_out = journal
            .record(&marks(&[("b", Mark::Path)]), None, false)
            .unwrap();
        assert!(started < durable && durable < handed_out);
        // The run ends in a crash: the file as it is now, before the sync a clean
        // close makes, is what the next run finds (its last batch is lost).
        let crashed = temp.path().join("crashed.redb");
        std::fs::copy(&path, &crashed).unwrap();
        drop(journal);
        let next_run = Journal::open(&crashed).unwrap();
        let restarted = next_run.record_start("started again").unwrap();
        assert!(
            restarted > handed_out,
            "{restarted} must be above {handed_out}, or a clear the last run's push asks for could remove this run's marks"
        );
        // Such a clear leaves this run's root mark in place.
        next_run.clear_upto(handed_out).unwrap();
        assert_eq!(
            next_run.snapshot(100).unwrap().root.unwrap().reason,
            "started again"
        );
    }
}
