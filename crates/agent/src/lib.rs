//! The public-machine side: follow the repository's head and apply each version to
//! the tree atomically.
//!
//! Only this crate writes into a machine's root, and only this crate signals,
//! stops and starts a machine's processes: [`plan`] decides (pure), [`processes`]
//! acts, [`openlog`] remembers who opened what.

pub mod apply;
mod follow;
pub mod openlog;
pub mod plan;
pub mod processes;
pub mod rules;

use std::path::PathBuf;

pub use apply::{Applied, Applier, BlobSource, Journal, Prepared};
pub use follow::{follow, make_plan, plan_pending, FollowOptions, FollowSummary};
use vdsync_proto::{ChangesetError, RepoPath};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot {operation} {path}")]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {operation} {path} in the tree")]
    Tree {
        path: RepoPath,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stage a file of the version")]
    Stage(#[source] std::io::Error),
    #[error("state file {path} is unreadable: {message}")]
    CorruptState { path: PathBuf, message: String },
    #[error("another agent already uses the state directory {0}; two agents applying versions to one tree would undo each other's work (stop the other one first)")]
    AlreadyRunning(PathBuf),
    #[error("version {version} is not a valid changeset")]
    InvalidChangeset {
        version: u64,
        #[source]
        source: ChangesetError,
    },
    #[error("version {version} applies to version {}, but this tree is at version {}", vdsync_proto::display::show_version(.expected), vdsync_proto::display::show_version(.actual))]
    WrongParent {
        version: u64,
        expected: Option<u64>,
        actual: Option<u64>,
    },
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
    #[error(transparent)]
    Repository(#[from] vdsync_client::ClientError),
}
/// Blobs already in memory (a bundle's), then the rest from the repository.
pub struct Prefetched<'a> {
    pub blobs: std::collections::HashMap<vdsync_proto::Hash, Vec<u8>>,
    pub rest: &'a vdsync_client::Client,
}

impl BlobSource for Prefetched<'_> {
    fn fetch(
        &self,
        hashes: &[vdsync_proto::Hash],
        sink: &mut dyn FnMut(vdsync_proto::Hash, &mut dyn std::io::Read) -> std::io::Result<()>,
    ) -> Result<u64, ApplyError> {
        let mut bytes = 0u64;
        let mut missing = Vec::new();
        for hash in hashes {
            match self.blobs.get(hash) {
                Some(content) => {
                    sink(*hash, &mut content.as_slice()).map_err(ApplyError::Stage)?;
                    bytes += content.len() as u64;
                }
                None => missing.push(*hash),
            }
        }
        if !missing.is_empty() {
            bytes += BlobSource::fetch(self.rest, &missing, sink)?;
        }
        Ok(bytes)
    }
}

impl BlobSource for vdsync_client::Client {
    fn fetch(
        &self,
        hashes: &[vdsync_proto::Hash],
        sink: &mut dyn FnMut(vdsync_proto::Hash, &mut dyn std::io::Read) -> std::io::Result<()>,
    ) -> Result<u64, ApplyError> {
        Ok(vdsync_client::Client::fetch(
            self,
            hashes,
            &mut |header, content| sink(header.hash, content),
        )?)
    }
}
