//! Entries, manifests and changesets: what a version is made of.
//!
//! A [`Manifest`] is a whole tree at one version. A [`Changeset`] turns version N
//! into N+1. [`diff`] computes the changeset between two manifests and
//! [`Manifest::apply`] replays one; both are pure, so the rules that the agent's
//! crash recovery relies on (no removed path overlaps an entry, entries sorted
//! parents first) are decided and tested here, without a file system.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::path::{wire_bytes, RepoPath};
use crate::Hash;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One extended attribute, such as `security.capability`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: String,
    #[serde(with = "wire_bytes")]
    pub value: Vec<u8>,
}

/// What every entry carries besides its kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

/// A run of data in a sparse file; everything between runs is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// The kinds of entry a tree holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file. The blob named by `hash` is the file's data runs
    /// concatenated; `segments` is present only when the file has holes.
    File {
        size: u64,
        hash: Hash,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        segments: Option<Vec<Segment>>,
    },
    Dir,
    Symlink {
        #[serde(with = "wire_bytes")]
        target: Vec<u8>,
    },
    /// Another name for the regular file at `target` (same inode). The metadata of
    /// a hard link entry is the target's.
    HardLink {
        target: RepoPath,
    },
    Fifo,
    CharDevice {
        rdev: u64,
    },
    BlockDevice {
        rdev: u64,
    },
    /// Recorded so that it is reported; a socket has no content to recreate.
    Socket,
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::File { .. } => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::HardLink { .. } => "hardlink",
            EntryKind::Fifo => "fifo",
            EntryKind::CharDevice { .. } => "char-device",
            EntryKind::BlockDevice { .. } => "block-device",
            EntryKind::Socket => "socket",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub kind: EntryKind,
    #[serde(flatten)]
    pub meta: Metadata,
}

impl Entry {
    /// The blob this entry needs, if any.
    pub fn blob(&self) -> Option<(Hash, u64)> {
        match &self.kind {
            EntryKind::File {
                hash,
                size,
                segments,
            } => {
                let stored = match segments {
                    Some(segments) => segments.iter().map(|s| s.len).sum(),
                    None => *size,
                };
                Some((*hash, stored))
            }
            _ => None,
        }
    }
}

/// One path and what it becomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathEntry {
    pub path: RepoPath,
    #[serde(flatten)]
    pub entry: Entry,
}

/// A whole tree at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<RepoPath, Entry>,
}

/// Version N → N+1.
///
/// Invariants (checked by [`Changeset::validate`], relied on by the agent's
/// roll-forward): `entries` are sorted and unique, so parents come before children;
/// `removed` holds only topmost paths, and no removed path equals or contains an
/// entry's path. Removing is therefore idempotent: replaying a half-applied changeset
/// never removes something this changeset created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changeset {
    /// The version this changeset applies to; `None` for version 0.
    pub parent: Option<u64>,
    #[serde(default)]
    pub removed: Vec<RepoPath>,
    #[serde(default)]
    pub entries: Vec<PathEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangesetError {
    #[error("entries are not sorted or not unique at {0}")]
    Unsorted(RepoPath),
    #[error("removed paths are not sorted, unique and topmost at {0}")]
    RemovedNotMinimal(RepoPath),
    #[error("{removed} is removed but {entry} is an entry at or below it")]
    RemovedOverlapsEntry { removed: RepoPath, entry: RepoPath },
    #[error(
        "hard link {link} points at {target}, which is not a regular file entry sorted before it"
    )]
    BadHardLink { link: RepoPath, target: RepoPath },
    #[error("{0} is an entry but its parent is not a directory in the tree")]
    NoParent(RepoPath),
}

impl Changeset {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.entries.is_empty()
    }

    /// Checks the invariants that do not need the tree the changeset applies to.
    pub fn validate(&self) -> Result<(), ChangesetError> {
        for pair in self.entries.windows(2) {
            if pair[0].path >= pair[1].path {
                return Err(ChangesetError::Unsorted(pair[1].path.clone()));
            }
        }
        for pair in self.removed.windows(2) {
            if pair[0] >= pair[1] || pair[1].starts_with(&pair[0]) {
                return Err(ChangesetError::RemovedNotMinimal(pair[1].clone()));
            }
        }
        let entry_paths: BTreeSet<&RepoPath> = self.entries.iter().map(|e| &e.path).collect();
        for removed in &self.removed {
            if let Some(entry) = entry_paths.range::<&RepoPath, _>(removed..).next() {
                if entry.starts_with(removed) {
                    return Err(ChangesetError::RemovedOverlapsEntry {
                        removed: removed.clone(),
                        entry: (*entry).clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Number of entries that are not directories (what an operator calls "files").
    pub fn file_count(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.entry.kind != EntryKind::Dir)
            .count() as u64
    }

    /// Sum of the sizes of the blobs the entries refer to.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter_map(|e| e.entry.blob())
            .map(|(_, size)| size)
            .sum()
    }
}

impl Manifest {
    /// Applies `changeset` and checks that the result is a consistent tree: every
    /// entry's parent is a directory, every hard link points at a regular file.
    pub fn apply(&mut self, changeset: &Changeset) -> Result<(), ChangesetError> {
        changeset.validate()?;
        for removed in &changeset.removed {
            self.remove_subtree(removed);
        }
        for item in &changeset.entries {
            if self
                .entries
                .get(&item.path)
                .is_some_and(|old| old.kind == EntryKind::Dir)
                && item.entry.kind != EntryKind::Dir
            {
                self.remove_subtree(&item.path);
            }
            if let Some(parent) = item.path.parent() {
                if self.entries.get(&parent).map(|e| &e.kind) != Some(&EntryKind::Dir) {
                    return Err(ChangesetError::NoParent(item.path.clone()));
                }
            }
            if let EntryKind::HardLink { target } = &item.entry.kind {
                let target_is_file = matches!(
                    self.entries.get(target).map(|e| &e.kind),
                    Some(EntryKind::File { .. })
                );
                if !target_is_file || *target >= item.path {
                    return Err(ChangesetError::BadHardLink {
                        link: item.path.clone(),
                        target: target.clone(),
                    });
                }
            }
            self.entries.insert(item.path.clone(), item.entry.clone());
        }
        Ok(())
    }

    fn remove_subtree(&mut self, top: &RepoPath) {
        let doomed: Vec<RepoPath> = self
            .entries
            .range(top..)
            .take_while(|(path, _)| path.starts_with(top))
            .map(|(path, _)| path.clone())
            .collect();
        for path in doomed {
            self.entries.remove(&path);
        }
    }
}

/// The changeset that turns `old` into `new`.
///
/// A path whose kind changes is simply an entry (the agent replaces whatever is
/// there); its old children are listed as removed. Hard links whose target is
/// rewritten are re-sent, because the agent writes the target as a new inode, and so
/// is the directory holding each changed or removed name, for its mtime.
pub fn diff(old: &Manifest, new: &Manifest, parent: Option<u64>) -> Changeset {
    let mut removed: Vec<RepoPath> = Vec::new();
    for path in old.entries.keys() {
        if new.entries.contains_key(path) {
            continue;
        }
        if removed.last().is_some_and(|top| path.starts_with(top)) {
            continue;
        }
        removed.push(path.clone());
    }

    let mut changed: BTreeSet<&RepoPath> = new
        .entries
        .iter()
        .filter(|(path, entry)| old.entries.get(*path) != Some(*entry))
        .map(|(path, _)| path)
        .collect();
    let relinked: Vec<&RepoPath> = new
        .entries
        .iter()
        .filter(|(_, entry)| {
            matches!(&entry.kind, EntryKind::HardLink { target } if changed.contains(target))
        })
        .map(|(path, _)| path)
        .collect();
    changed.extend(relinked);
    // Placing or removing a name changes its directory's mtime on the machine, so the
    // directory is re-sent (unchanged) for the agent to set its mtime back.
    let touched_parents: Vec<&RepoPath> = changed
        .iter()
        .copied()
        .chain(removed.iter())
        .filter_map(|path| path.parent())
        .filter_map(|parent| new.entries.get_key_value(&parent).map(|(key, _)| key))
        .collect();
    changed.extend(touched_parents);

    let entries = changed
        .into_iter()
        .map(|path| PathEntry {
            path: path.clone(),
            entry: new.entries[path].clone(),
        })
        .collect();
    Changeset {
        parent,
        removed,
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{dir, link, manifest, path};

    fn file(content: &str) -> Entry {
        crate::fixtures::file(content.as_bytes())
    }

    /// Diffs, checks the summary, and checks that applying the diff to `old` gives `new`.
    fn check(old: &Manifest, new: &Manifest, removed: &[&str], entries: &[&str]) {
        let changeset = diff(old, new, Some(7));
        changeset.validate().unwrap();
        let shown_removed: Vec<String> = changeset.removed.iter().map(|p| p.to_string()).collect();
        let shown_entries: Vec<String> = changeset
            .entries
            .iter()
            .map(|e| e.path.to_string())
            .collect();
        assert_eq!(shown_removed, removed, "removed");
        assert_eq!(shown_entries, entries, "entries");
        let mut replayed = old.clone();
        replayed.apply(&changeset).unwrap();
        assert_eq!(&replayed, new);
    }

    #[test]
    fn diff_cases() {
        let base = manifest(&[
            ("d", dir()),
            ("d/a", file("a")),
            ("d/sub", dir()),
            ("d/sub/x", file("x")),
            ("e", file("e")),
        ]);
        // Nothing changed.
        check(&base, &base, &[], &[]);
        // A non-empty directory deleted: only its top is listed.
        check(&base, &manifest(&[("e", file("e"))]), &["d"], &[]);
        // A directory replaced by a file, and back.
        let replaced = manifest(&[("d", file("now a file")), ("e", file("e"))]);
        check(&base, &replaced, &["d/a", "d/sub"], &["d"]);
        check(&replaced, &base, &[], &["d", "d/a", "d/sub", "d/sub/x"]);
        // Content change.
        let edited = manifest(&[
            ("d", dir()),
            ("d/a", file("a2")),
            ("d/sub", dir()),
            ("d/sub/x", file("x")),
            ("e", file("e")),
        ]);
        check(&base, &edited, &[], &["d", "d/a"]);
    }

    #[test]
    fn hard_links_follow_a_rewritten_target() {
        let old = manifest(&[("a", file("1")), ("b", link("a")), ("c", file("c"))]);
        let new = manifest(&[("a", file("2")), ("b", link("a")), ("c", file("c"))]);
        check(&old, &new, &[], &["a", "b"]);
        // A nested change re-sends its directory, not the directory's parent.
        let old = manifest(&[("d", dir()), ("d/e", dir()), ("d/e/f", file("1"))]);
        let new = manifest(&[("d", dir()), ("d/e", dir()), ("d/e/f", file("2"))]);
        check(&old, &new, &[], &["d/e", "d/e/f"]);
    }

    #[test]
    fn validate_refuses_overlap_and_disorder() {
        let overlap = Changeset {
            parent: Some(1),
            removed: vec![path("d")],
            entries: vec![PathEntry {
                path: path("d/x"),
                entry: file("x"),
            }],
        };
        assert_eq!(
            overlap.validate().unwrap_err().to_string(),
            "d is removed but d/x is an entry at or below it"
        );
        let unsorted = Changeset {
            parent: Some(1),
            removed: vec![],
            entries: vec![
                PathEntry {
                    path: path("b"),
                    entry: file("b"),
                },
                PathEntry {
                    path: path("a"),
                    entry: file("a"),
                },
            ],
        };
        assert!(unsorted.validate().is_err());
        let nested_removed = Changeset {
            parent: Some(1),
            removed: vec![path("d"), path("d/x")],
            entries: vec![],
        };
        assert!(nested_removed.validate().is_err());
    }

    #[test]
    fn apply_refuses_orphans_and_dangling_links() {
        let mut tree = manifest(&[("d", dir())]);
        let orphan = Changeset {
            parent: Some(1),
            removed: vec![],
            entries: vec![PathEntry {
                path: path("nodir/x"),
                entry: file("x"),
            }],
        };
        assert_eq!(
            tree.apply(&orphan).unwrap_err(),
            ChangesetError::NoParent(path("nodir/x"))
        );
        let dangling = Changeset {
            parent: Some(1),
            removed: vec![],
            entries: vec![PathEntry {
                path: path("d/l"),
                entry: link("d/missing"),
            }],
        };
        assert!(matches!(
            tree.apply(&dangling).unwrap_err(),
            ChangesetError::BadHardLink { .. }
        ));
    }
}
