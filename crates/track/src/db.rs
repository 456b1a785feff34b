//! What the index and the journal share about keeping paths in redb.
//!
//! Keys are path bytes with `/` replaced by NUL (which no name can contain): byte
//! order then equals `RepoPath` order (parents directly before their children), and
//! a subtree is one contiguous key range.

use std::path::Path;

use redb::Database;
use vdsync_proto::RepoPath;

use crate::TrackError;

pub(crate) fn key_of(path: &RepoPath) -> Vec<u8> {
    path.as_bytes()
        .iter()
        .map(|&b| if b == b'/' { 0 } else { b })
        .collect()
}

pub(crate) fn path_of(key: &[u8]) -> Option<RepoPath> {
    let bytes: Vec<u8> = key.iter().map(|&b| if b == 0 { b'/' } else { b }).collect();
    RepoPath::parse(&bytes).ok()
}

/// The key range of everything strictly below `top`.
pub(crate) fn below(top: &RepoPath) -> (Vec<u8>, Vec<u8>) {
    let mut start = key_of(top);
    let mut end = start.clone();
    start.push(0);
    end.push(1);
    (start, end)
}

/// Opens (creating) a database whose page cache is `cache_bytes`: the data lives
/// on disk, not in the process.
pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<Database, TrackError> {
    Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|err| db_error(path, err))
}

pub(crate) fn db_error(path: &Path, err: impl Into<redb::Error>) -> TrackError {
    TrackError::CorruptState {
        path: path.to_path_buf(),
        message: err.into().to_string(),
    }
}
