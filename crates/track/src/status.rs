//! `vdsync status`: the changes `push` would send, listed like `git status`.
//!
//! Reads, never writes: with a tracker running it uses the fenced journal snapshot
//! (only marked paths are looked at); without one it scans the whole tree and says so.

use std::path::Path;

use serde::Serialize;
use vdsync_proto::{EntryKind, RepoPath};

use crate::changes::{collect, collect_from_journal, Changes, Source};
use crate::excludes::Excludes;
use crate::index_db::IndexDb;
use crate::push::index_path;
use crate::tracker::{request_release_index, SnapshotRequest};
use crate::TrackError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    New,
    Modified,
    Deleted,
    TypeChanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusLine {
    pub path: RepoPath,
    pub change: Change,
    /// The entry's kind now (for deletions: what it was).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub tracker_running: bool,
    /// The version the tree was last pushed as.
    pub pushed_version: Option<u64>,
    pub source: Source,
    pub changes: Vec<StatusLine>,
}

pub fn status(
    root: &Path,
    state_dir: &Path,
    excludes: &Excludes,
) -> Result<StatusReport, TrackError> {
    let (changes, pushed_version, tracker_running) = find_changes(root, state_dir, excludes)?;

    let mut lines = Vec::new();
    for removed in &changes.changeset.removed {
        let kind = changes
            .before
            .get(removed)
            .map_or("entry", |e| e.kind.name());
        lines.push(StatusLine {
            path: removed.clone(),
            change: Change::Deleted,
            kind,
        });
    }
    for item in &changes.changeset.entries {
        let now = &item.entry;
        let change = match changes.before.get(&item.path) {
            None => Change::New,
            Some(old) if old.kind.name() != now.kind.name() => Change::TypeChanged,
            Some(old) => {
                // A directory whose only change is its mtime (a name in it was added
                // or removed) is shown through that name, not by itself.
                let mut old_meta = old.meta.clone();
                old_meta.mtime = now.meta.mtime;
                if now.kind == EntryKind::Dir && old_meta == now.meta {
                    continue;
                }
                Change::Modified
            }
        };
        lines.push(StatusLine {
            path: item.path.clone(),
            change,
            kind: now.kind.name(),
        });
    }
    lines.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(StatusReport {
        tracker_running,
        pushed_version,
        source: changes.source,
        changes: lines,
    })
}

/// The changes, the version the index was pushed as, and whether a tracker runs.
/// A tracker holding the index answers the lookups of a journal-driven status;
/// otherwise the index is opened here.
fn find_changes(
    root: &Path,
    state_dir: &Path,
    excludes: &Excludes,
) -> Result<(Changes, Option<u64>, bool), TrackError> {
    let snapshot = match SnapshotRequest::send(state_dir, true)? {
        None => None,
        Some(request) => {
            let (snapshot, view) = request.answer()?;
            if let (Some(view), None) = (view, &snapshot.root) {
                if let Some(changes) =
                    collect_from_journal(root, excludes, &view, &snapshot, view.version)?
                {
                    return Ok((changes, view.version, true));
                }
            }
            request_release_index(state_dir)?;
            Some(snapshot)
        }
    };
    let tracker_running = snapshot.is_some();
    let index_file = index_path(state_dir);
    let index = if index_file.exists() {
        IndexDb::open(&index_file)?
    } else {
        // Nothing pushed from here yet: everything is new. Nothing is created on disk.
        IndexDb::in_memory()?
    };
    let pushed_version = index.version()?;
    let changes = collect(root, excludes, &index, snapshot, None, pushed_version)?;
    Ok((changes, pushed_version, tracker_running))
}
