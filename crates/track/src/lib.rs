//! The development side: reading the tree, remembering what was pushed, and turning
//! the difference into a version.
//!
//! `track` never writes into the development tree; it reads it and keeps its own
//! state in `--state`.

pub mod changes;
mod db;
pub mod excludes;
pub mod index_db;
pub mod journal;
pub mod push;
pub mod scan;
pub mod status;
pub mod tracker;

use std::path::PathBuf;

pub use excludes::{Excludes, DEFAULT_EXCLUDES};
pub use push::{push, push_started, Progress, PushOptions, PushReport, PushStart};
pub use scan::{scan, Index};
use vdsync_proto::RepoPath;

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadName { path: PathBuf, message: String },
    #[error("invalid exclude pattern {pattern:?}: {message}")]
    BadExclude { pattern: String, message: String },
    #[error("state file {path} is unreadable: {message}")]
    CorruptState { path: PathBuf, message: String },
    #[error("{0} kept changing while it was read; try again when it is quiet")]
    KeptChanging(PathBuf),
    #[error("{0} changed while it was uploaded")]
    ChangedDuringPush(RepoPath),
    #[error("this tree was last pushed as version {} but the repository head is {}; another push landed in between (remove index.redb from the state directory to start again from the head, re-hashing every file)", vdsync_proto::display::show_version(.pushed), vdsync_proto::display::show_version(.head))]
    DivergedFromRepository {
        pushed: Option<u64>,
        head: Option<u64>,
    },
    #[error("another tracker already uses the state directory {0}")]
    AlreadyTracking(PathBuf),
    #[error("cannot watch {path} for changes")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tracker answered: {0}")]
    Tracker(String),
    /// A push the tracker made failed; the message is its error, as a push made
    /// here would have said it.
    #[error("{0}")]
    PushedByTracker(String),
    #[error(transparent)]
    Repository(#[from] vdsync_client::ClientError),
}
