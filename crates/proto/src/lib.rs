//! The vocabulary shared by every role: paths, hashes, entries, manifests,
//! changesets, and the repository's wire types.
//!
//! `proto` does no I/O and has no async runtime: everything here is plain data and
//! pure functions, tested without a file system or a network.

pub mod display;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod hash;
pub mod hex;
mod path;
mod tree;
pub mod wire;

pub use hash::{BadHash, Hash};
pub use path::{wire_bytes, PathError, RepoPath};
pub use tree::{
    diff, Changeset, ChangesetError, Entry, EntryKind, Manifest, Metadata, PathEntry, Segment,
    Timestamp, Xattr,
};
