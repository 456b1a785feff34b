//! Small blobs kept in the version log's database beside the blob files.
//!
//! A one-line change to a config file is a version of two blobs of a few hundred
//! bytes (the file and the changeset). As files, each costs an inode, a rename and,
//! before the version may be recorded, a flush of its own; in the database they are
//! written by the very transaction that records the version, so one flush makes both
//! durable. [`RepositoryBlobs`] reads from both places; [`WithInline`] lets the
//! repository check a version against the blobs it is about to record with it.

use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::Arc;

use vdsync_proto::Hash;

use crate::{BlobStore, BlobWriter, LocalBlobStore, StoreError, VersionLog};

/// The repository's blobs: files (every blob `create` writes) and the small blobs
/// recorded with versions in the database.
pub struct RepositoryBlobs {
    files: LocalBlobStore,
    log: Arc<VersionLog>,
}

impl RepositoryBlobs {
    /// Blob files under `dir` (see [`LocalBlobStore::open`]), small blobs in `log`.
    pub fn open(dir: &Path, log: Arc<VersionLog>) -> Result<RepositoryBlobs, StoreError> {
        Ok(RepositoryBlobs {
            files: LocalBlobStore::open(dir)?,
            log,
        })
    }
}

impl BlobStore for RepositoryBlobs {
    fn contains(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.files.contains(hash)? || self.log.small_blob(hash)?.is_some())
    }

    fn open_stored(&self, hash: &Hash) -> Result<Box<dyn Read + Send>, StoreError> {
        match self.files.open_stored(hash) {
            Err(StoreError::MissingBlob(_)) => match self.log.small_blob(hash)? {
                Some(stored) => Ok(Box::new(Cursor::new(stored))),
                None => Err(StoreError::MissingBlob(*hash)),
            },
            other => other,
        }
    }

    fn create(&self) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.files.create()
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.files.sync()
    }

    /// Blobs in the database are durable already (a redb commit is); the file store
    /// syncs only those it holds.
    fn sync_blobs(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        self.files.sync_blobs(hashes)
    }
}

/// `store` as it will be once `inline` (hash, stored form) is recorded: for checking
/// a proposed version before committing it with its small blobs. Writes go to
/// `store`.
pub struct WithInline<'a> {
    pub store: &'a dyn BlobStore,
    pub inline: &'a [(Hash, Vec<u8>)],
}

impl WithInline<'_> {
    fn inline_blob(&self, hash: &Hash) -> Option<&[u8]> {
        self.inline
            .iter()
            .find(|(inline_hash, _)| inline_hash == hash)
            .map(|(_, stored)| stored.as_slice())
    }
}

impl BlobStore for WithInline<'_> {
    fn contains(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.inline_blob(hash).is_some() || self.store.contains(hash)?)
    }

    fn open_stored(&self, hash: &Hash) -> Result<Box<dyn Read + Send>, StoreError> {
        match self.inline_blob(hash) {
            Some(stored) => Ok(Box::new(Cursor::new(stored.to_vec()))),
            None => self.store.open_stored(hash),
        }
    }

    fn create(&self) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.store.create()
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.store.sync()
    }

    fn sync_blobs(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        self.store.sync_blobs(hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::test_info as info;
    use crate::{ingest_pack, put_bytes, read_blob, write_pack, INLINE_BLOB_LEN};

    /// A pack of `contents`, made by storing them in a scratch store.
    fn pack_of(contents: &[&[u8]]) -> Vec<u8> {
        let scratch = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(scratch.path()).unwrap();
        let hashes: Vec<Hash> = contents
            .iter()
            .map(|content| put_bytes(&store, content).unwrap())
            .collect();
        let mut pack = Vec::new();
        write_pack(&store, &hashes, &mut pack).unwrap();
        pack
    }

    #[test]
    fn small_blobs_ride_with_the_version_and_large_ones_become_files() {
        let temp = tempfile::tempdir().unwrap();
        let log = Arc::new(VersionLog::open(&temp.path().join("versions.redb")).unwrap());
        let blobs = RepositoryBlobs::open(temp.path(), Arc::clone(&log)).unwrap();
        let small: &[u8] = b"listen 8080;\n";
        let large = vec![7u8; INLINE_BLOB_LEN as usize + 1];
        let pack = pack_of(&[small, &large, small]);

        let mut inline = Vec::new();
        let received = ingest_pack(&blobs, &mut &pack[..], 1 << 30, Some(&mut inline)).unwrap();
        let (small_hash, large_hash) = (Hash::of(small), Hash::of(&large));
        assert_eq!(received, vec![small_hash, large_hash, small_hash]);
        assert_eq!(inline.len(), 1, "the repeated small blob is kept once");
        assert_eq!(inline[0].0, small_hash);
        assert!(blobs.contains(&large_hash).unwrap());
        assert!(
            !blobs.contains(&small_hash).unwrap(),
            "an inline blob is not stored before its version is"
        );
        let pending = WithInline {
            store: &blobs,
            inline: &inline,
        };
        assert_eq!(read_blob(&pending, &small_hash).unwrap(), small);
        blobs.sync_blobs(&received).unwrap();

        log.commit(info(None, small_hash), &inline).unwrap();
        assert!(blobs.contains(&small_hash).unwrap());
        assert_eq!(read_blob(&blobs, &small_hash).unwrap(), small);
        assert_eq!(read_blob(&blobs, &large_hash).unwrap(), large);
        assert!(!temp
            .path()
            .join("blobs")
            .join(&small_hash.to_hex()[..2])
            .join(small_hash.to_hex())
            .exists());
        assert!(matches!(
            blobs.open_stored(&Hash::of(b"never stored")),
            Err(StoreError::MissingBlob(_))
        ));
    }

    #[test]
    fn an_inline_blob_whose_frame_is_padded_far_past_its_content_is_refused() {
        let content = b"tiny";
        let hash = Hash::of(content);
        // A zstd frame: magic, a header without content size, empty raw blocks
        // (3-byte headers of size 0), then one last raw block holding the content.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00];
        for _ in 0..10_000 {
            frame.extend_from_slice(&[0x00, 0x00, 0x00]);
        }
        let last = ((content.len() as u32) << 3) | 1;
        frame.extend_from_slice(&last.to_le_bytes()[..3]);
        frame.extend_from_slice(content);
        let mut pack = hash.0.to_vec();
        pack.extend_from_slice(&(content.len() as u64).to_le_bytes());
        pack.extend_from_slice(&frame);

        let temp = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(temp.path()).unwrap();
        // As a file it is accepted (its content checks out) ...
        assert_eq!(
            ingest_pack(&store, &mut &pack[..], 1 << 30, None).unwrap(),
            vec![hash]
        );
        // ... but it is not buffered in memory as an inline blob.
        let other = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(other.path()).unwrap();
        let mut inline = Vec::new();
        assert!(ingest_pack(&store, &mut &pack[..], 1 << 30, Some(&mut inline)).is_err());
        assert!(inline.is_empty());
    }
}
