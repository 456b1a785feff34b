//! What changed since the last push: from the tracker's journal when one is running
//! (reading only the marked paths), else by scanning the whole tree.
//!
//! Shared by `status` (which only shows) and `push` (which sends, then records the
//! new index). The journal names paths; this module looks at each name now, compares
//! it with the index, and keeps what really differs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use vdsync_proto::{diff, Changeset, Entry, EntryKind, Manifest, RepoPath};

use crate::excludes::Excludes;
use crate::index_db::IndexDb;
use crate::journal::{Mark, Snapshot};
use crate::scan::{scan, scan_paths, Index, IndexEntry};
use crate::TrackError;

/// How the changes were found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Source {
    /// From the journal: only marked paths were read.
    Journal { paths: usize },
    /// The whole tree was scanned, and why.
    FullScan { reason: String },
}

/// The index after the changes, in the form that is cheapest to store.
pub enum IndexUpdate {
    Replace(Index),
    Patch(IndexPatch),
}

/// Entries removed (with everything below them) and written, after a journal-driven
/// collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPatch {
    pub removed: Vec<RepoPath>,
    pub upserts: Vec<IndexEntry>,
}

/// What a journal-driven collection reads from the index: the entries at a few
/// paths and below a few directories.
pub trait IndexRead {
    fn get(&self, path: &RepoPath) -> Result<Option<IndexEntry>, TrackError>;
    /// `top` (if indexed) and everything below it, in path order.
    fn subtree(&self, top: &RepoPath) -> Result<Vec<IndexEntry>, TrackError>;
}

impl IndexRead for IndexDb {
    fn get(&self, path: &RepoPath) -> Result<Option<IndexEntry>, TrackError> {
        IndexDb::get(self, path)
    }

    fn subtree(&self, top: &RepoPath) -> Result<Vec<IndexEntry>, TrackError> {
        IndexDb::subtree(self, top)
    }
}

/// The index lookups of a journal-driven collection of `snapshot`.
pub struct JournalLookups {
    /// Each marked name and the directory holding it (adding or removing a name
    /// changes the directory's mtime without an event of its own), except those
    /// below a subtree mark.
    pub paths: Vec<RepoPath>,
    /// The subtree marks.
    pub subtrees: Vec<RepoPath>,
}

impl JournalLookups {
    pub fn of(snapshot: &Snapshot) -> JournalLookups {
        let subtrees: Vec<RepoPath> = snapshot
            .marks
            .iter()
            .filter(|(_, mark)| *mark == Mark::Subtree)
            .map(|(path, _)| path.clone())
            .collect();
        let covered = |path: &RepoPath| subtrees.iter().any(|top| path.starts_with(top));
        let mut paths: BTreeSet<RepoPath> = BTreeSet::new();
        for (path, mark) in &snapshot.marks {
            if *mark == Mark::Path {
                paths.insert(path.clone());
            }
            if let Some(directory) = path.parent() {
                paths.insert(directory);
            }
        }
        paths.retain(|path| !covered(path));
        JournalLookups {
            paths: paths.into_iter().collect(),
            subtrees,
        }
    }

    /// How many lookups: a measure of the work, not of the entries found.
    pub fn len(&self) -> usize {
        self.paths.len() + self.subtrees.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The answers to a snapshot's [`JournalLookups`], read in advance: the tracker,
/// which keeps the index open, sends them with its snapshot so that a push does not
/// pay for opening (and closing) the database itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexView {
    /// The version the index was last pushed as.
    pub version: Option<u64>,
    /// Every entry found, in path order.
    pub entries: Vec<IndexEntry>,
}

impl IndexView {
    /// Reads the answers to `lookups` from `index`; `None` once more than
    /// `entry_limit` entries were found (a push that big opens the index itself).
    pub fn read(
        index: &IndexDb,
        lookups: &JournalLookups,
        entry_limit: usize,
    ) -> Result<Option<IndexView>, TrackError> {
        if lookups.paths.len() > entry_limit {
            return Ok(None);
        }
        let mut entries = Vec::new();
        for path in &lookups.paths {
            entries.extend(index.get(path)?);
        }
        for top in &lookups.subtrees {
            let room = entry_limit.saturating_sub(entries.len());
            match index.subtree_up_to(top, room)? {
                Some(subtree) => entries.extend(subtree),
                None => return Ok(None),
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some(IndexView {
            version: index.version()?,
            entries,
        }))
    }

    fn position(&self, path: &RepoPath) -> Result<usize, usize> {
        self.entries.binary_search_by(|entry| entry.path.cmp(path))
    }
}

/// Answers only the lookups it was read for; anything else reads as not indexed.
impl IndexRead for IndexView {
    fn get(&self, path: &RepoPath) -> Result<Option<IndexEntry>, TrackError> {
        Ok(self
            .position(path)
            .ok()
            .map(|found| self.entries[found].clone()))
    }

    fn subtree(&self, top: &RepoPath) -> Result<Vec<IndexEntry>, TrackError> {
        // Parents sort directly before their children, so a subtree is contiguous.
        let start = self.position(top).unwrap_or_else(|insert_at| insert_at);
        Ok(self.entries[start..]
            .iter()
            .take_while(|entry| entry.path.starts_with(top))
            .cloned()
            .collect())
    }
}

pub struct Changes {
    pub changeset: Changeset,
    /// The entries the changed paths had in the index (to tell new from modified).
    pub before: BTreeMap<RepoPath, Entry>,
    pub source: Source,
    /// The journal sequence this covers, to clear after a successful push.
    pub journal_sequence: Option<u64>,
    pub index_update: IndexUpdate,
}

/// Finds the changes of the tree at `root` against `index`, as a changeset on top
/// of `parent`. With a `snapshot` whose root needs no rescan, only the marked paths
/// (and their directories, whose mtimes they change) are read.
pub fn collect(
    root: &Path,
    excludes: &Excludes,
    index: &IndexDb,
    snapshot: Option<Snapshot>,
    full_scan_reason: Option<String>,
    parent: Option<u64>,
) -> Result<Changes, TrackError> {
    let journal_sequence = snapshot.as_ref().map(|s| s.sequence);
    let reason = match (&snapshot, full_scan_reason) {
        (_, Some(reason)) => Some(reason),
        (None, None) => Some("no tracker is running for this state directory".to_owned()),
        (Some(snapshot), None) => snapshot.root.as_ref().map(|root| root.reason.clone()),
    };
    if let (Some(snapshot), None) = (&snapshot, &reason) {
        if let Some(changes) = collect_from_journal(root, excludes, index, snapshot, parent)? {
            return Ok(changes);
        }
    }
    let reason = reason.unwrap_or_else(|| HARD_LINKS_NEED_A_FULL_SCAN.to_owned());
    let previous = index.load()?;
    let current = scan(root, excludes, &previous)?;
    let changeset = diff(&previous.manifest(), &current.manifest(), parent);
    let before = changed_before(&previous.manifest(), &changeset);
    Ok(Changes {
        changeset,
        before,
        source: Source::FullScan { reason },
        journal_sequence,
        index_update: IndexUpdate::Replace(current),
    })
}

const HARD_LINKS_NEED_A_FULL_SCAN: &str =
    "a changed file has other hard links, which only a full scan can follow";

/// The changes `snapshot` names, reading only its marked paths and their
/// directories. `None` when the journal is not enough (hard links seen): the
/// caller scans the whole tree. The snapshot must not ask for a rescan of the root.
pub fn collect_from_journal(
    root: &Path,
    excludes: &Excludes,
    index: &dyn IndexRead,
    snapshot: &Snapshot,
    parent: Option<u64>,
) -> Result<Option<Changes>, TrackError> {
    let JournalLookups { paths, subtrees } = JournalLookups::of(snapshot);
    let mut old: Vec<IndexEntry> = Vec::new();
    for path in &paths {
        old.extend(index.get(path)?);
    }
    for top in &subtrees {
        old.extend(index.subtree(top)?);
    }
    let scanned = scan_paths(root, excludes, &old, &paths, &subtrees)?;
    let old_has_links = old
        .iter()
        .any(|item| matches!(item.entry.kind, EntryKind::HardLink { .. }));
    if scanned.saw_hard_links || old_has_links {
        return Ok(None);
    }

    let before = Manifest {
        entries: old
            .iter()
            .map(|item| (item.path.clone(), item.entry.clone()))
            .collect(),
    };
    let after = Manifest {
        entries: scanned
            .entries
            .iter()
            .map(|item| (item.path.clone(), item.entry.clone()))
            .collect(),
    };
    let changeset = diff(&before, &after, parent);
    let removed: Vec<RepoPath> = before
        .entries
        .keys()
        .filter(|path| !after.entries.contains_key(*path))
        .cloned()
        .collect();
    let marked = paths.len() + subtrees.len();
    Ok(Some(Changes {
        before: changed_before(&before, &changeset),
        changeset,
        source: Source::Journal { paths: marked },
        journal_sequence: Some(snapshot.sequence),
        index_update: IndexUpdate::Patch(IndexPatch {
            removed,
            upserts: scanned.entries,
        }),
    }))
}

/// The old entries of the paths the changeset touches.
fn changed_before(old: &Manifest, changeset: &Changeset) -> BTreeMap<RepoPath, Entry> {
    let mut before = BTreeMap::new();
    for item in &changeset.entries {
        if let Some(entry) = old.entries.get(&item.path) {
            before.insert(item.path.clone(), entry.clone());
        }
    }
    for removed in &changeset.removed {
        if let Some(entry) = old.entries.get(removed) {
            before.insert(removed.clone(), entry.clone());
        }
    }
    before
}

impl IndexUpdate {
    /// Writes the update as the index of `version`.
    pub fn write(self, index: &IndexDb, version: Option<u64>) -> Result<(), TrackError> {
        match self {
            IndexUpdate::Replace(mut whole) => {
                whole.version = version;
                index.store(&whole)
            }
            IndexUpdate::Patch(patch) => index.update(version, &patch.removed, &patch.upserts),
        }
    }
}

// Tests fail by panicking; `unwrap` is the clearest way to say "this must work".
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::journal::Snapshot;
    use vdsync_proto::fixtures::path;

    /// A push answered from the tracker's view of the index finds exactly what one
    /// reading the index itself finds, and the view holds only what it needs.
    #[test]
    fn a_view_of_the_index_answers_a_journal_push_like_the_index() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("tree");
        for directory in ["a", "a/deep", "b", "c"] {
            std::fs::create_dir_all(root.join(directory)).unwrap();
        }
        for file in ["a/one", "a/two", "a/deep/three", "b/four", "c/five"] {
            std::fs::write(root.join(file), file).unwrap();
        }
        let excludes = Excludes::new(&[], vec![]).unwrap();
        let index = IndexDb::open(&temp.path().join("index.redb")).unwrap();
        let mut scanned = scan(&root, &excludes, &Index::default()).unwrap();
        scanned.version = Some(3);
        index.store(&scanned).unwrap();

        std::fs::write(root.join("a/one"), "changed").unwrap();
        std::fs::remove_file(root.join("a/deep/three")).unwrap();
        std::fs::write(root.join("b/new"), "new").unwrap();
        let snapshot = Snapshot {
            sequence: 7,
            root: None,
            marks: vec![
                (path("a/deep"), Mark::Subtree),
                (path("a/one"), Mark::Path),
                (path("b/new"), Mark::Path),
            ],
        };
        let view = IndexView::read(&index, &JournalLookups::of(&snapshot), 100)
            .unwrap()
            .unwrap();
        assert_eq!(view.version, Some(3));
        let viewed: Vec<String> = view.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(viewed, ["a", "a/deep", "a/deep/three", "a/one", "b"]);

        let from_index = collect_from_journal(&root, &excludes, &index, &snapshot, Some(3))
            .unwrap()
            .unwrap();
        let from_view = collect_from_journal(&root, &excludes, &view, &snapshot, Some(3))
            .unwrap()
            .unwrap();
        assert_eq!(from_view.changeset, from_index.changeset);
        assert_eq!(from_view.before, from_index.before);
        assert_eq!(from_view.journal_sequence, Some(7));
        let changed: Vec<String> = from_view
            .changeset
            .entries
            .iter()
            .map(|item| item.path.to_string())
            .collect();
        assert_eq!(changed, ["a", "a/deep", "a/one", "b", "b/new"]);
        assert_eq!(from_view.changeset.removed, [path("a/deep/three")]);

        // Past its limit the view is not made: the push reads the index itself.
        assert!(IndexView::read(&index, &JournalLookups::of(&snapshot), 1)
            .unwrap()
            .is_none());
    }
}
