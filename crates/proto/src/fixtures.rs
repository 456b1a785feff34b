//! Small constructors for tests of any crate: entries, manifests and changesets
//! built from text paths and contents. Compiled for this crate's tests and, through
//! the `fixtures` feature, for other crates' dev-dependencies; never in a release.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::{Entry, EntryKind, Hash, Manifest, Metadata, PathEntry, RepoPath, Timestamp};

pub fn path(text: &str) -> RepoPath {
    RepoPath::parse_str(text).expect("a valid test path")
}

/// Mode 0644, owned by root, mtime at the epoch, no xattrs.
pub fn meta() -> Metadata {
    Metadata {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        xattrs: vec![],
    }
}

pub fn dir() -> Entry {
    Entry {
        kind: EntryKind::Dir,
        meta: meta(),
    }
}

pub fn file(content: &[u8]) -> Entry {
    Entry {
        kind: EntryKind::File {
            size: content.len() as u64,
            hash: Hash::of(content),
            segments: None,
        },
        meta: meta(),
    }
}

pub fn link(target: &str) -> Entry {
    Entry {
        kind: EntryKind::HardLink {
            target: path(target),
        },
        meta: meta(),
    }
}

pub fn dir_entry(at: &str) -> PathEntry {
    PathEntry {
        path: path(at),
        entry: dir(),
    }
}

pub fn file_entry(at: &str, content: &[u8]) -> PathEntry {
    PathEntry {
        path: path(at),
        entry: file(content),
    }
}

pub fn manifest(items: &[(&str, Entry)]) -> Manifest {
    Manifest {
        entries: items.iter().map(|(p, e)| (path(p), e.clone())).collect(),
    }
}
