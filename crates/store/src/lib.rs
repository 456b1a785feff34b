//! The repository's storage: content-addressed blobs (BLAKE3-named, zstd-compressed)
//! behind the [`BlobStore`] interface, and the version log and fleet registry in an
//! embedded database.
//!
//! `store` knows nothing of HTTP or of trees: it keeps bytes and records, and checks
//! every blob's hash on the way in.

mod blobs;
mod inline;
mod segments;
mod versions;

use std::path::PathBuf;

pub use blobs::{
    decode_frame, ingest_pack, put_bytes, put_reader, read_blob, read_frame, read_pack_header,
    write_pack, BlobStore, BlobWriter, HashingReader, LocalBlobStore, INLINE_BLOB_LEN, ZSTD_LEVEL,
};
pub use inline::{RepositoryBlobs, WithInline};
pub use segments::SegmentReader;
use vdsync_proto::Hash;
pub use versions::VersionLog;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("error reading or writing a blob stream")]
    Stream(#[source] std::io::Error),
    #[error("blob {0} is not in the store")]
    MissingBlob(Hash),
    #[error("blob content hashes to {actual}, not {expected}")]
    HashMismatch { expected: Hash, actual: Hash },
    #[error("blob {} declared {declared} bytes but holds {actual}", hash.map(|h| h.to_hex()).unwrap_or_default())]
    LengthMismatch {
        hash: Option<Hash>,
        declared: u64,
        actual: u64,
    },
    #[error("blob {hash} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { hash: Hash, len: u64, limit: u64 },
    #[error("stale parent: the change was made against version {} but the head is version {}", vdsync_proto::display::show_version(.parent), vdsync_proto::display::show_version(.head))]
    StaleParent {
        parent: Option<u64>,
        head: Option<u64>,
    },
    #[error("database error")]
    Database(#[source] Box<redb::Error>),
    #[error("corrupt record in the database: {0}")]
    Corrupt(String),
}
