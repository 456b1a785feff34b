//! `RepoError`: everything the repository can refuse or fail at, and the HTTP status
//! each one maps to.
//!
//! The mapping lives next to the enum so that adding a variant forces a decision on
//! how a client sees it. The HTTP layer turns an error into an `ErrorBody` holding
//! the whole message chain; it does not invent messages of its own.

use axum::http::StatusCode;
use vdsync_proto::{ChangesetError, Hash};
use vdsync_store::StoreError;

/// The one error type of the repository crate.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot open the repository data directory {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("version {0} does not exist")]
    UnknownVersion(u64),
    #[error("changeset blob {0} is not in the store; upload it before committing")]
    ChangesetNotStored(Hash),
    #[error("changeset blob {hash} of {len} bytes exceeds the limit of {limit} bytes")]
    ChangesetTooLarge { hash: Hash, len: u64, limit: u64 },
    #[error("blob {hash} is not a valid changeset")]
    InvalidChangesetJson {
        hash: Hash,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the commit names parent {} but changeset {hash} was computed against {}",
        vdsync_proto::display::show_version(.request_parent),
        vdsync_proto::display::show_version(.changeset_parent)
    )]
    ParentMismatch {
        hash: Hash,
        request_parent: Option<u64>,
        changeset_parent: Option<u64>,
    },
    #[error("changeset {hash} is invalid")]
    InvalidChangeset {
        hash: Hash,
        #[source]
        source: ChangesetError,
    },
    #[error("changeset {hash} does not apply to version {}", vdsync_proto::display::show_version(.parent))]
    ChangesetDoesNotApply {
        hash: Hash,
        parent: Option<u64>,
        #[source]
        source: ChangesetError,
    },
    #[error("{missing} blob(s) referenced by changeset {changeset} are not stored (the first is {first}); upload them before committing")]
    MissingBlobs {
        changeset: Hash,
        missing: u64,
        first: Hash,
    },
    #[error(
        "stale parent: the change was made against version {} but the head is version {}",
        vdsync_proto::display::show_version(.parent),
        vdsync_proto::display::show_version(.head)
    )]
    StaleParent {
        parent: Option<u64>,
        head: Option<u64>,
    },
    #[error("cannot load the changeset of version {version}")]
    StoredChangesetUnreadable {
        version: u64,
        #[source]
        source: StoreError,
    },
    #[error("the stored changeset of version {version} is corrupt")]
    StoredChangesetCorrupt {
        version: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("the stored changeset of version {version} does not apply to version {}", vdsync_proto::display::show_version(.parent))]
    StoredChainBroken {
        version: u64,
        parent: Option<u64>,
        #[source]
        source: ChangesetError,
    },
    #[error("blob {0} is not in the store")]
    BlobNotFound(Hash),
    #[error("pack refused")]
    PackRefused(#[source] StoreError),
    #[error("invalid agent name {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    InvalidAgentName(String),
    #[error("{count} hashes in one request exceed the limit of {limit}")]
    TooManyHashes { count: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("no such endpoint: {0}")]
    NoSuchEndpoint(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("repository storage failed")]
    Store(#[source] StoreError),
    #[error("cannot serialize the response")]
    SerializeResponse(#[source] serde_json::Error),
    #[error("a background task of the repository failed")]
    TaskFailed(#[source] tokio::task::JoinError),
}

impl RepoError {
    /// The HTTP status a client sees for this error: 4xx for anything the request
    /// can be blamed for, 5xx for failures of the repository itself.
    pub fn status(&self) -> StatusCode {
        match self {
            RepoError::UnknownVersion(_)
            | RepoError::BlobNotFound(_)
            | RepoError::NoSuchEndpoint(_) => StatusCode::NOT_FOUND,
            RepoError::StaleParent { .. } => StatusCode::CONFLICT,
            RepoError::ChangesetNotStored(_)
            | RepoError::ChangesetTooLarge { .. }
            | RepoError::InvalidChangesetJson { .. }
            | RepoError::ParentMismatch { .. }
            | RepoError::InvalidChangeset { .. }
            | RepoError::ChangesetDoesNotApply { .. }
            | RepoError::MissingBlobs { .. }
            | RepoError::InvalidAgentName(_)
            | RepoError::TooManyHashes { .. }
            | RepoError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            RepoError::PackRefused(source) => match source {
                // Only a store that cannot write is the repository's fault; a bad
                // hash, length, size or zstd stream is the sender's.
                StoreError::Io { .. } | StoreError::Database(_) | StoreError::Corrupt(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            },
            RepoError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RepoError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RepoError::Open { .. }
            | RepoError::StoredChangesetUnreadable { .. }
            | RepoError::StoredChangesetCorrupt { .. }
            | RepoError::StoredChainBroken { .. }
            | RepoError::Store(_)
            | RepoError::SerializeResponse(_)
            | RepoError::TaskFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for RepoError {
    /// A stale parent detected by the version log is the same conflict as one
    /// detected before validation; everything else is a storage failure.
    fn from(error: StoreError) -> RepoError {
        match error {
            StoreError::StaleParent { parent, head } => RepoError::StaleParent { parent, head },
            other => RepoError::Store(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_chain_joins_sources() {
        let error = RepoError::PackRefused(StoreError::HashMismatch {
            expected: Hash::of(b"a"),
            actual: Hash::of(b"b"),
        });
        assert_eq!(
            vdsync_proto::display::error_chain(&error),
            format!(
                "pack refused: blob content hashes to {}, not {}",
                Hash::of(b"b"),
                Hash::of(b"a")
            )
        );
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn stale_parent_from_the_log_is_a_conflict() {
        let error = RepoError::from(StoreError::StaleParent {
            parent: None,
            head: Some(3),
        });
        assert_eq!(error.status(), StatusCode::CONFLICT);
        assert_eq!(
            error.to_string(),
            "stale parent: the change was made against version none but the head is version 3"
        );
    }
}
