//! `Repository`: the blob store, the version log and the fleet registry of one data
//! directory, with the rules for accepting a new version.
//!
//! Everything here is blocking (file and database I/O); the HTTP layer calls it from
//! `spawn_blocking`. The only async piece is the head watch channel, which lets
//! long-polling clients wake the instant a commit lands instead of polling.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::info;
use vdsync_proto::wire::{AgentInfo, CommitRequest, Hello, Outcome, VersionInfo};
use vdsync_proto::{Changeset, EntryKind, Hash, Manifest};
use vdsync_store::{
    read_blob, write_pack, BlobStore, RepositoryBlobs, StoreError, VersionLog, WithInline,
};

use crate::agents::{after_hello, after_report, validate_agent_name};
use crate::RepoError;

/// The largest changeset blob `commit` will parse. A changeset is JSON held in memory
/// while it is validated; a whole base image of a few hundred thousand files is tens
/// of MiB, so this leaves ample room while keeping a hostile blob from exhausting
/// the server's memory.
pub const MAX_CHANGESET_BLOB_LEN: u64 = 1 << 30;

/// The repository of one data directory. `Send + Sync`; share it in an `Arc`.
pub struct Repository {
    blob_store: RepositoryBlobs,
    version_log: Arc<VersionLog>,
    /// Held from the head check to the log commit, so that a changeset is validated
    /// against the manifest of the version it is committed on top of.
    commit_lock: Mutex<()>,
    /// Held across read-modify-write of one agent record, so that a hello and a
    /// report arriving together cannot drop each other's fields.
    agents_lock: Mutex<()>,
    /// The manifest of the highest version computed so far (normally the head):
    /// folding every changeset from version 0 for each request would grow with the
    /// age of the repository.
    manifest_cache: Mutex<Option<CachedManifest>>,
    /// The head as of the last commit. redb holds an exclusive lock on the database
    /// file, so no other process can commit behind this channel's back.
    head_sender: watch::Sender<Option<u64>>,
    max_blob_len: u64,
}

struct CachedManifest {
    version: u64,
    manifest: Manifest,
}

impl Repository {
    /// Opens (creating if needed) the data dir: blob files in DIR (see
    /// `LocalBlobStore::open`), database (versions, agents, small blobs) at
    /// DIR/versions.redb.
    pub fn open(data_dir: &Path) -> Result<Repository, RepoError> {
        let open_error = |source| RepoError::Open {
            path: data_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(|source| {
            open_error(StoreError::Io {
                path: data_dir.to_path_buf(),
                source,
            })
        })?;
        let version_log =
            Arc::new(VersionLog::open(&data_dir.join("versions.redb")).map_err(open_error)?);
        let blob_store =
            RepositoryBlobs::open(data_dir, Arc::clone(&version_log)).map_err(open_error)?;
        let head = version_log.head().map_err(open_error)?;
        let (head_sender, _) = watch::channel(head);
        Ok(Repository {
            blob_store,
            version_log,
            commit_lock: Mutex::new(()),
            agents_lock: Mutex::new(()),
            manifest_cache: Mutex::new(None),
            head_sender,
            max_blob_len: u64::MAX,
        })
    }

    /// Sets the largest blob a pack upload may declare; larger ones are refused
    /// before any of their bytes are stored. Unlimited by default.
    pub fn with_max_blob_len(mut self, max_blob_len: u64) -> Repository {
        self.max_blob_len = max_blob_len;
        self
    }

    pub fn max_blob_len(&self) -> u64 {
        self.max_blob_len
    }

    pub fn blobs(&self) -> &dyn BlobStore {
        &self.blob_store
    }

    pub fn head(&self) -> Result<Option<u64>, RepoError> {
        Ok(self.version_log.head()?)
    }

    /// A receiver of the head version, updated after every commit.
    pub fn subscribe_head(&self) -> watch::Receiver<Option<u64>> {
        self.head_sender.subscribe()
    }

    /// How many receivers of the head exist right now; each long-poll holds one while
    /// it waits. Lets tests and diagnostics see that a client is parked.
    pub fn head_subscribers(&self) -> usize {
        self.head_sender.receiver_count()
    }

    pub fn versions(&self) -> Result<Vec<VersionInfo>, RepoError> {
        Ok(self.version_log.list()?)
    }

    pub fn version(&self, version: u64) -> Result<VersionInfo, RepoError> {
        self.version_log
            .get(version)?
            .ok_or(RepoError::UnknownVersion(version))
    }

    /// Validates and records a version (used by HTTP POST /v1/versions and by
    /// `repo init` directly).
    pub fn commit(&self, request: &CommitRequest) -> Result<VersionInfo, RepoError> {
        self.commit_with_inline(request, &[])
    }

    /// [`Repository::commit`], recording the small blobs `inline` (hash, stored
    /// form, as `ingest_pack` keeps them) in the same database transaction as the
    /// version: they count as present for the checks, and are stored only if the
    /// version is.
    pub fn commit_with_inline(
        &self,
        request: &CommitRequest,
        inline: &[(Hash, Vec<u8>)],
    ) -> Result<VersionInfo, RepoError> {
        let blobs = WithInline {
            store: &self.blob_store,
            inline,
        };
        let changeset_hash = request.changeset;
        let changeset = load_proposed_changeset(&blobs, &changeset_hash)?;
        if changeset.parent != request.parent {
            return Err(RepoError::ParentMismatch {
                hash: changeset_hash,
                request_parent: request.parent,
                changeset_parent: changeset.parent,
            });
        }
        changeset
            .validate()
            .map_err(|source| RepoError::InvalidChangeset {
                hash: changeset_hash,
                source,
            })?;
        // Blobs are never deleted, so checking them before taking the lock is as good
        // as checking under it, and keeps a slow check from holding up other pushes.
        check_blobs_present(&blobs, &changeset, &changeset_hash)?;

        let _commit_guard = lock_ignoring_poison(&self.commit_lock);
        let head = self.version_log.head()?;
        if head != request.parent {
            return Err(RepoError::StaleParent {
                parent: request.parent,
                head,
            });
        }
        // The cached head manifest is taken, not cloned: a commit costs what its
        // changeset costs, not what the tree costs. If the changeset does not apply,
        // the cache stays empty and the next reader folds it again.
        let cached = lock_ignoring_poison(&self.manifest_cache)
            .take_if(|cached| Some(cached.version) == request.parent)
            .map(|cached| cached.manifest);
        let mut manifest = match (cached, request.parent) {
            (Some(manifest), _) => manifest,
            (None, None) => Manifest::default(),
            (None, Some(parent)) => self.manifest(parent)?,
        };
        manifest
            .apply(&changeset)
            .map_err(|source| RepoError::ChangesetDoesNotApply {
                hash: changeset_hash,
                parent: request.parent,
                source,
            })?;
        let mut info = summarize(&changeset, request, now_unix_seconds());
        // The log re-checks the parent in the same transaction as the insert; with
        // the lock held it cannot differ, but the log is the authority.
        info.version = self.version_log.commit(info.clone(), inline)?;
        *lock_ignoring_poison(&self.manifest_cache) = Some(CachedManifest {
            version: info.version,
            manifest,
        });
        self.head_sender.send_replace(Some(info.version));
        info!(
            version = info.version,
            files = info.files,
            dirs = info.dirs,
            deleted = info.deleted,
            bytes = info.bytes,
            changeset = %changeset_hash,
            "committed version {}: {:?}",
            info.version,
            info.message
        );
        Ok(info)
    }

    /// Stores small blobs kept for a commit that was refused, as an upload would
    /// have: a client retrying on a new parent need not send them again.
    pub fn store_inline(&self, inline: &[(Hash, Vec<u8>)]) -> Result<(), RepoError> {
        if !inline.is_empty() {
            self.version_log.put_small_blobs(inline)?;
        }
        Ok(())
    }

    /// Full manifest at `version` (fold changesets 0..=version; cache the latest
    /// computed one in memory).
    pub fn manifest(&self, version: u64) -> Result<Manifest, RepoError> {
        // Refuse an unknown version before folding anything.
        self.version(version)?;
        let mut cache = lock_ignoring_poison(&self.manifest_cache);
        let (mut manifest, first_to_apply) = match cache.as_ref() {
            Some(cached) if cached.version == version => return Ok(cached.manifest.clone()),
            Some(cached) if cached.version < version => {
                (cached.manifest.clone(), cached.version + 1)
            }
            _ => (Manifest::default(), 0),
        };
        for number in first_to_apply..=version {
            let changeset = self.changeset(number)?;
            manifest
                .apply(&changeset)
                .map_err(|source| RepoError::StoredChainBroken {
                    version: number,
                    parent: changeset.parent,
                    source,
                })?;
        }
        if cache.as_ref().is_none_or(|cached| cached.version < version) {
            *cache = Some(CachedManifest {
                version,
                manifest: manifest.clone(),
            });
        }
        Ok(manifest)
    }

    pub fn changeset(&self, version: u64) -> Result<Changeset, RepoError> {
        let info = self.version(version)?;
        let bytes = read_blob(&self.blob_store, &info.changeset)
            .map_err(|source| RepoError::StoredChangesetUnreadable { version, source })?;
        serde_json::from_slice(&bytes)
            .map_err(|source| RepoError::StoredChangesetCorrupt { version, source })
    }

    /// Version `version`'s changeset blob, then the distinct blobs it refers to, in
    /// changeset order, as many as fit in `max_bytes` of content, as one pack: an
    /// agent applying a small version gets all of it in one request.
    pub fn bundle(&self, version: u64, max_bytes: u64) -> Result<Vec<u8>, RepoError> {
        let info = self.version(version)?;
        let changeset = self.changeset(version)?;
        let mut hashes = vec![info.changeset];
        let mut included = BTreeSet::new();
        let mut budget = max_bytes;
        for item in &changeset.entries {
            if let Some((hash, size)) = item.entry.blob() {
                if size <= budget && included.insert(hash) {
                    budget -= size;
                    hashes.push(hash);
                }
            }
        }
        let mut pack = Vec::new();
        write_pack(&self.blob_store, &hashes, &mut pack).map_err(RepoError::Store)?;
        Ok(pack)
    }

    /// The hashes of `hashes` that are not stored, in request order, each once.
    pub fn missing_blobs(&self, hashes: &[Hash]) -> Result<Vec<Hash>, RepoError> {
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for hash in hashes {
            if seen.insert(*hash) && !self.blob_store.contains(hash)? {
                missing.push(*hash);
            }
        }
        Ok(missing)
    }

    /// Records a hello from agent `name`.
    pub fn record_hello(&self, name: &str, hello: &Hello) -> Result<AgentInfo, RepoError> {
        validate_agent_name(name)?;
        let _agents_guard = lock_ignoring_poison(&self.agents_lock);
        let previous = self.version_log.agent(name)?;
        let updated = after_hello(previous, name, hello, now_unix_seconds());
        self.version_log.put_agent(&updated)?;
        Ok(updated)
    }

    /// Records the outcome agent `name` reports for a version.
    pub fn record_report(&self, name: &str, outcome: &Outcome) -> Result<AgentInfo, RepoError> {
        validate_agent_name(name)?;
        let _agents_guard = lock_ignoring_poison(&self.agents_lock);
        let previous = self.version_log.agent(name)?;
        let updated = after_report(previous, name, outcome, now_unix_seconds());
        self.version_log.put_agent(&updated)?;
        Ok(updated)
    }

    pub fn agents(&self) -> Result<Vec<AgentInfo>, RepoError> {
        Ok(self.version_log.agents()?)
    }
}

/// Reads and parses a changeset a client proposes, refusing one too large to hold
/// in memory before reading it.
fn load_proposed_changeset(blobs: &dyn BlobStore, hash: &Hash) -> Result<Changeset, RepoError> {
    let not_stored_or_failed = |error: StoreError| match error {
        StoreError::MissingBlob(hash) => RepoError::ChangesetNotStored(hash),
        other => RepoError::Store(other),
    };
    let mut stored = blobs.open_stored(hash).map_err(not_stored_or_failed)?;
    let mut length_prefix = [0u8; 8];
    stored
        .read_exact(&mut length_prefix)
        .map_err(|source| RepoError::Store(StoreError::Stream(source)))?;
    let len = u64::from_le_bytes(length_prefix);
    if len > MAX_CHANGESET_BLOB_LEN {
        return Err(RepoError::ChangesetTooLarge {
            hash: *hash,
            len,
            limit: MAX_CHANGESET_BLOB_LEN,
        });
    }
    drop(stored);
    let bytes = read_blob(blobs, hash).map_err(not_stored_or_failed)?;
    serde_json::from_slice(&bytes).map_err(|source| RepoError::InvalidChangesetJson {
        hash: *hash,
        source,
    })
}

fn check_blobs_present(
    blobs: &dyn BlobStore,
    changeset: &Changeset,
    changeset_hash: &Hash,
) -> Result<(), RepoError> {
    let mut already_checked: BTreeSet<Hash> = BTreeSet::new();
    let mut missing = 0u64;
    let mut first_missing = None;
    // Iterating in entry order makes "the first" the first the client would see
    // in its own changeset, not the smallest hash; each hash is counted once.
    for (hash, _) in changeset
        .entries
        .iter()
        .filter_map(|item| item.entry.blob())
    {
        if !already_checked.insert(hash) {
            continue;
        }
        if !blobs.contains(&hash)? {
            missing += 1;
            first_missing.get_or_insert(hash);
        }
    }
    match first_missing {
        None => Ok(()),
        Some(first) => Err(RepoError::MissingBlobs {
            changeset: *changeset_hash,
            missing,
            first,
        }),
    }
}

/// The `VersionInfo` a changeset becomes; `version` is assigned by the log.
fn summarize(changeset: &Changeset, request: &CommitRequest, time: u64) -> VersionInfo {
    let dirs = changeset
        .entries
        .iter()
        .filter(|item| item.entry.kind == EntryKind::Dir)
        .count() as u64;
    VersionInfo {
        version: 0,
        parent: request.parent,
        time,
        message: request.message.clone(),
        files: changeset.file_count(),
        dirs,
        deleted: changeset.removed.len() as u64,
        bytes: changeset.content_bytes(),
        changeset: request.changeset,
    }
}

fn now_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| since_epoch.as_secs())
        .unwrap_or(0)
}

/// The data behind these mutexes stays consistent even if a holder panicked (it is
/// replaced whole, never left half-written), so a poisoned lock is still usable.
fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// Tests fail by panicking; `unwrap` is the clearest way to say "this must work".
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::{dir_entry, file_entry, path};
    use vdsync_store::put_bytes;

    /// Stores `changeset` as a blob and returns the request that commits it.
    fn request_for(repo: &Repository, changeset: &Changeset, message: &str) -> CommitRequest {
        let json = serde_json::to_vec(changeset).unwrap();
        CommitRequest {
            parent: changeset.parent,
            message: message.to_owned(),
            changeset: put_bytes(repo.blobs(), &json).unwrap(),
        }
    }

    fn base_changeset() -> Changeset {
        Changeset {
            parent: None,
            removed: vec![],
            entries: vec![
                dir_entry("etc"),
                file_entry("etc/app.conf", b"port = 80\n"),
                dir_entry("var"),
                file_entry("var/data", b"data"),
            ],
        }
    }

    fn second_changeset() -> Changeset {
        Changeset {
            parent: Some(0),
            removed: vec![path("var")],
            entries: vec![file_entry("etc/app.conf", b"port = 8080\n")],
        }
    }

    fn open_with_contents(dir: &Path, contents: &[&[u8]]) -> Repository {
        let repo = Repository::open(dir).unwrap();
        for content in contents {
            put_bytes(repo.blobs(), content).unwrap();
        }
        repo
    }

    /// (hash, decoded content) of each record of `pack`.
    fn unpack(pack: &[u8]) -> Vec<(Hash, Vec<u8>)> {
        let mut input = std::io::BufReader::new(pack);
        let mut records = Vec::new();
        while let Some(header) = vdsync_store::read_pack_header(&mut input).unwrap() {
            let mut content = Vec::new();
            vdsync_store::read_frame(&mut input, header.hash, header.len, &mut |reader| {
                reader.read_to_end(&mut content).map(|_| ())
            })
            .unwrap();
            records.push((header.hash, content));
        }
        records
    }

    #[test]
    fn a_bundle_is_the_changeset_then_the_blobs_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        let small: &[u8] = b"small";
        let large = vec![7u8; 1000];
        let repo = open_with_contents(dir.path(), &[small, &large]);
        let changeset = Changeset {
            parent: None,
            removed: vec![],
            entries: vec![
                file_entry("a-large", &large),
                file_entry("b-small", small),
                file_entry("c-small-again", small),
            ],
        };
        let request = request_for(&repo, &changeset, "bundle");
        repo.commit(&request).unwrap();

        let records = unpack(&repo.bundle(0, 100).unwrap());
        assert_eq!(
            records.len(),
            2,
            "the changeset, then the one blob that fits once"
        );
        assert_eq!(records[0].0, request.changeset);
        let parsed: Changeset = serde_json::from_slice(&records[0].1).unwrap();
        assert_eq!(parsed, changeset);
        assert_eq!(records[1], (Hash::of(small), small.to_vec()));

        let everything = unpack(&repo.bundle(0, 1 << 20).unwrap());
        let hashes: Vec<Hash> = everything.iter().map(|(hash, _)| *hash).collect();
        assert_eq!(
            hashes,
            [request.changeset, Hash::of(&large), Hash::of(small)]
        );
        assert_eq!(
            unpack(&repo.bundle(0, 0).unwrap()).len(),
            1,
            "only the changeset"
        );
        assert!(matches!(
            repo.bundle(1, 100),
            Err(RepoError::UnknownVersion(1))
        ));
    }

    #[test]
    fn commits_chain_and_manifests_fold() {
        let temp = tempfile::tempdir().unwrap();
        let repo = open_with_contents(temp.path(), &[b"port = 80\n", b"data", b"port = 8080\n"]);
        assert_eq!(repo.head().unwrap(), None);

        let first = repo
            .commit(&request_for(&repo, &base_changeset(), "base"))
            .unwrap();
        assert_eq!(
            (
                first.version,
                first.parent,
                first.files,
                first.dirs,
                first.deleted,
                first.bytes
            ),
            (0, None, 2, 2, 0, 14)
        );
        let second = repo
            .commit(&request_for(&repo, &second_changeset(), "edit"))
            .unwrap();
        assert_eq!(
            (
                second.version,
                second.parent,
                second.files,
                second.dirs,
                second.deleted
            ),
            (1, Some(0), 1, 0, 1)
        );
        assert_eq!(second.message, "edit");
        assert_eq!(repo.head().unwrap(), Some(1));
        assert_eq!(*repo.subscribe_head().borrow(), Some(1));
        assert_eq!(repo.changeset(1).unwrap(), second_changeset());

        let shown = |manifest: &Manifest| -> Vec<String> {
            manifest
                .entries
                .keys()
                .map(|path| path.to_string())
                .collect()
        };
        let head_manifest = repo.manifest(1).unwrap();
        assert_eq!(shown(&head_manifest), ["etc", "etc/app.conf"]);
        assert_eq!(
            shown(&repo.manifest(0).unwrap()),
            ["etc", "etc/app.conf", "var", "var/data"]
        );
        // Asking for an older version must not replace the cached head.
        assert_eq!(repo.manifest(1).unwrap(), head_manifest);
        assert!(matches!(
            repo.manifest(2),
            Err(RepoError::UnknownVersion(2))
        ));
        assert!(matches!(
            repo.changeset(7),
            Err(RepoError::UnknownVersion(7))
        ));

        // A fresh process folds the same manifest from the log.
        drop(repo);
        let reopened = Repository::open(temp.path()).unwrap();
        assert_eq!(reopened.head().unwrap(), Some(1));
        assert_eq!(reopened.manifest(1).unwrap(), head_manifest);
        assert_eq!(reopened.versions().unwrap(), vec![first, second]);
    }

    #[test]
    fn stale_parent_is_refused_and_changes_nothing() {
        let temp = tempfile::tempdir().unwrap();
        let repo = open_with_contents(temp.path(), &[b"port = 80\n", b"data", b"port = 8080\n"]);
        repo.commit(&request_for(&repo, &base_changeset(), "base"))
            .unwrap();
        let request = request_for(&repo, &second_changeset(), "edit");
        repo.commit(&request).unwrap();
        let error = repo.commit(&request).unwrap_err();
        assert!(
            matches!(
                error,
                RepoError::StaleParent {
                    parent: Some(0),
                    head: Some(1)
                }
            ),
            "{error}"
        );
        assert_eq!(repo.head().unwrap(), Some(1));
    }

    #[test]
    fn commit_refuses_bad_changesets() {
        let temp = tempfile::tempdir().unwrap();
        let repo = open_with_contents(temp.path(), &[b"data"]);

        // Blobs not uploaded: counted once each, the first in entry order named.
        let mut missing_content = base_changeset();
        missing_content
            .entries
            .push(file_entry("var/more", b"port = 80\n"));
        let error = repo
            .commit(&request_for(&repo, &missing_content, "m"))
            .unwrap_err();
        match &error {
            RepoError::MissingBlobs { missing, first, .. } => {
                assert_eq!(*missing, 1);
                assert_eq!(*first, Hash::of(b"port = 80\n"));
            }
            other => panic!("expected missing blobs, got {other}"),
        }
        assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);

        // The request and the changeset disagree on the parent.
        let mut request = request_for(&repo, &base_changeset(), "m");
        request.parent = Some(0);
        assert!(matches!(
            repo.commit(&request),
            Err(RepoError::ParentMismatch { .. })
        ));

        // Not JSON of a changeset.
        let not_json = CommitRequest {
            parent: None,
            message: "m".into(),
            changeset: put_bytes(repo.blobs(), b"{\"entries\": 5}").unwrap(),
        };
        assert!(matches!(
            repo.commit(&not_json),
            Err(RepoError::InvalidChangesetJson { .. })
        ));

        // Not uploaded at all.
        let absent = CommitRequest {
            parent: None,
            message: "m".into(),
            changeset: Hash::of(b"never stored"),
        };
        assert!(matches!(
            repo.commit(&absent),
            Err(RepoError::ChangesetNotStored(_))
        ));

        // Unsorted entries.
        let unsorted = Changeset {
            parent: None,
            removed: vec![],
            entries: vec![dir_entry("b"), dir_entry("a")],
        };
        assert!(matches!(
            repo.commit(&request_for(&repo, &unsorted, "m")),
            Err(RepoError::InvalidChangeset { .. })
        ));

        // A file whose parent directory does not exist.
        let orphan = Changeset {
            parent: None,
            removed: vec![],
            entries: vec![file_entry("nodir/data", b"data")],
        };
        assert!(matches!(
            repo.commit(&request_for(&repo, &orphan, "m")),
            Err(RepoError::ChangesetDoesNotApply { .. })
        ));

        assert_eq!(repo.head().unwrap(), None);
        assert!(repo.versions().unwrap().is_empty());
    }

    #[test]
    fn missing_blobs_lists_each_absent_hash_once() {
        let temp = tempfile::tempdir().unwrap();
        let repo = open_with_contents(temp.path(), &[b"present"]);
        let absent = Hash::of(b"absent");
        let asked = [absent, Hash::of(b"present"), absent];
        assert_eq!(repo.missing_blobs(&asked).unwrap(), vec![absent]);
    }

    #[test]
    fn agents_are_recorded() {
        let temp = tempfile::tempdir().unwrap();
        let repo = Repository::open(temp.path()).unwrap();
        repo.record_hello("web-1", &Hello { version: Some(2) })
            .unwrap();
        assert!(matches!(
            repo.record_hello("bad name", &Hello { version: None }),
            Err(RepoError::InvalidAgentName(_))
        ));
        let agents = repo.agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].name, "web-1");
        assert_eq!(agents[0].version, Some(2));
    }
}
