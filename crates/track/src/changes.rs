//! What changed since the last push: from the tracker's journal when one is running
//! (reading only the marked paths), else by scanning the whole tree.
//!
//! Shared by `status` (which only shows) and `push` (which sends, then records the
//! new index). The journal names paths; this module looks at each name now, compares
//! it with the index, and keeps what really differs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use vdsync_proto::{diff, Changeset, Entry, EntryKind, Manifest, RepoPath};

use crate::excludes::Excludes;
use crate::index_db::IndexDb;
use crate::journal::{Mark, Snapshot};
use crate::scan::{scan, scan_paths, Index, IndexEntry};
use crate::TrackError;

/// How the changes were found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    Patch {
        removed: Vec<RepoPath>,
        upserts: Vec<IndexEntry>,
    },
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
        if let Some(changes) = from_journal(root, excludes, index, snapshot, parent)? {
            return Ok(changes);
        }
    }
    let reason = reason.unwrap_or_else(|| {
        "a changed file has other hard links, which only a full scan can follow".to_owned()
    });
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

/// `None` when the journal is not enough (hard links seen).
fn from_journal(
    root: &Path,
    excludes: &Excludes,
    index: &IndexDb,
    snapshot: &Snapshot,
    parent: Option<u64>,
) -> Result<Option<Changes>, TrackError> {
    let subtrees: Vec<RepoPath> = snapshot
        .marks
        .iter()
        .filter(|(_, mark)| *mark == Mark::Subtree)
        .map(|(path, _)| path.clone())
        .collect();
    let covered = |path: &RepoPath| subtrees.iter().any(|top| path.starts_with(top));
    // Each marked name, and the directory holding it: adding or removing a name
    // changes the directory's mtime without an event of its own.
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

    let mut old: Vec<IndexEntry> = Vec::new();
    for path in &paths {
        old.extend(index.get(path)?);
    }
    for top in &subtrees {
        old.extend(index.subtree(top)?);
    }
    let paths: Vec<RepoPath> = paths.into_iter().collect();
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
        index_update: IndexUpdate::Patch {
            removed,
            upserts: scanned.entries,
        },
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
            IndexUpdate::Patch { removed, upserts } => index.update(version, &removed, &upserts),
        }
    }
}
