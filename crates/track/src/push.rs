//! `vdsync push`: turn the development tree's changes into version N+1.
//!
//! The pusher compares the tree with the index of the last push (kept in
//! `--state`), asks the repository which blobs it lacks, uploads only those in
//! packs, uploads the changeset itself as a blob, and commits it against the version
//! the index was pushed as. The index advances only after the repository
//! acknowledged the commit, so a failed or refused push can simply be run again.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use vdsync_client::{Client, UploadItem};
use vdsync_proto::wire::CommitRequest;
use vdsync_proto::{Changeset, Entry, EntryKind, Hash, RepoPath};
use vdsync_store::SegmentReader;

use crate::changes::{collect, Source};
use crate::excludes::Excludes;
use crate::index_db::IndexDb;
use crate::scan::{hash_file, Index};
use crate::tracker::{request_clear, request_snapshot};
use crate::TrackError;

/// Upload packs close at this many content bytes or this many blobs, so a failed
/// pack costs little to resend and the repository syncs its disk per pack.
const PACK_BYTES: u64 = 64 << 20;
const PACK_BLOBS: usize = 4096;

/// How often a push whose files changed under it is started over.
const PUSH_ATTEMPTS: usize = 3;

/// Progress display hooks (the binary draws a bar when stderr is a terminal).
pub trait Progress: Send + Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

pub struct PushOptions<'a> {
    pub root: &'a Path,
    pub state_dir: &'a Path,
    pub message: String,
    pub dry_run: bool,
    /// Scan the whole tree even if a tracker's journal is available.
    pub rescan: bool,
    pub excludes: &'a Excludes,
    pub progress: Option<std::sync::Arc<dyn Progress>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// The new version, `None` for a dry run or when nothing was pending.
    pub version: Option<u64>,
    pub parent: Option<u64>,
    /// Entries that are not directories.
    pub files: u64,
    pub dirs: u64,
    pub deleted: u64,
    pub blobs_sent: u64,
    pub bytes_sent: u64,
    /// Whether the journal or a full scan found the changes.
    pub source: Source,
    #[serde(skip)]
    pub changeset: Changeset,
    /// Old entries of changed paths, to tell new from modified.
    #[serde(skip)]
    pub before: BTreeMap<RepoPath, Entry>,
}

pub fn index_path(state_dir: &Path) -> PathBuf {
    state_dir.join("index.redb")
}

/// Opens the index in `state_dir`, importing the repository's head manifest the
/// first time (every file is then hashed once, as after a `git clone`).
fn open_index(client: &Client, state_dir: &Path) -> Result<(IndexDb, Option<u64>), TrackError> {
    let head = client.head()?;
    let index = IndexDb::open(&index_path(state_dir))?;
    if index.is_empty()? {
        let imported = match head {
            Some(head) => Index::from_manifest(Some(head), client.manifest(head)?),
            None => Index::default(),
        };
        index.store(&imported)?;
    }
    let pushed = index.version()?;
    if pushed != head {
        return Err(TrackError::DivergedFromRepository { pushed, head });
    }
    Ok((index, head))
}

pub fn push(client: &Client, options: &PushOptions<'_>) -> Result<PushReport, TrackError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match push_once(client, options) {
            Err(TrackError::ChangedDuringPush(path)) if attempt < PUSH_ATTEMPTS => {
                tracing::warn!(%path, "a file changed while it was uploaded; pushing again");
            }
            other => return other,
        }
    }
}

fn push_once(client: &Client, options: &PushOptions<'_>) -> Result<PushReport, TrackError> {
    std::fs::create_dir_all(options.state_dir).map_err(|source| TrackError::Io {
        path: options.state_dir.to_path_buf(),
        source,
    })?;
    let (index, head) = open_index(client, options.state_dir)?;
    let snapshot = if options.rescan {
        None
    } else {
        request_snapshot(options.state_dir)?
    };
    let changes = collect(
        options.root,
        options.excludes,
        &index,
        snapshot,
        options.rescan.then(|| "--rescan was given".to_owned()),
        head,
    )?;
    let changeset = changes.changeset;
    let dirs = changeset
        .entries
        .iter()
        .filter(|item| item.entry.kind == EntryKind::Dir)
        .count() as u64;
    let mut report = PushReport {
        version: None,
        parent: head,
        files: changeset.file_count(),
        dirs,
        deleted: changeset.removed.len() as u64,
        blobs_sent: 0,
        bytes_sent: 0,
        source: changes.source,
        changeset,
        before: changes.before,
    };
    if options.dry_run {
        return Ok(report);
    }
    if report.changeset.is_empty() {
        // Still worth saving: fresh stat keys make the next scan cheaper.
        changes.index_update.write(&index, head)?;
        clear_journal(options.state_dir, changes.journal_sequence);
        return Ok(report);
    }

    // Where to read each blob from: the first path that has it.
    let mut sources: HashMap<Hash, (RepoPath, EntryKind, u64)> = HashMap::new();
    for item in &report.changeset.entries {
        if let Some((hash, stored_len)) = item.entry.blob() {
            sources
                .entry(hash)
                .or_insert_with(|| (item.path.clone(), item.entry.kind.clone(), stored_len));
        }
    }
    let wanted: Vec<Hash> = sources.keys().copied().collect();
    let missing = client.missing(&wanted)?;
    let total: u64 = missing.iter().map(|hash| sources[hash].2).sum();
    if let Some(progress) = &options.progress {
        progress.start(total);
    }
    // The changeset is a blob too; it travels in the last pack, so a small push
    // costs one upload (and one sync at the repository).
    let changeset_json =
        serde_json::to_vec(&report.changeset).map_err(|err| TrackError::CorruptState {
            path: index_path(options.state_dir),
            message: err.to_string(),
        })?;
    let changeset_hash = Hash::of(&changeset_json);
    let changeset_item = UploadItem {
        hash: changeset_hash,
        len: changeset_json.len() as u64,
        open: Box::new(move || Ok(Box::new(std::io::Cursor::new(changeset_json)))),
    };
    let mut batch: Vec<Hash> = Vec::new();
    let mut batch_bytes = 0u64;
    for hash in &missing {
        let len = sources[hash].2;
        if !batch.is_empty() && (batch_bytes + len > PACK_BYTES || batch.len() >= PACK_BLOBS) {
            report.bytes_sent += upload_batch(client, options, &sources, &batch, None)?;
            batch.clear();
            batch_bytes = 0;
        }
        batch.push(*hash);
        batch_bytes += len;
    }
    report.bytes_sent += upload_batch(client, options, &sources, &batch, Some(changeset_item))?;
    report.blobs_sent = missing.len() as u64;

    let committed = client.commit(&CommitRequest {
        parent: head,
        message: options.message.clone(),
        changeset: changeset_hash,
    })?;
    if let Some(progress) = &options.progress {
        progress.finish();
    }
    changes
        .index_update
        .write(&index, Some(committed.version))?;
    clear_journal(options.state_dir, changes.journal_sequence);
    report.version = Some(committed.version);
    Ok(report)
}

/// Tells the tracker the journal up to `sequence` is pushed. Best effort: marks
/// left behind are only looked at again by the next push.
fn clear_journal(state_dir: &Path, sequence: Option<u64>) {
    if let Some(sequence) = sequence {
        if let Err(err) = request_clear(state_dir, sequence) {
            tracing::warn!(error = %vdsync_proto::display::error_chain(&err), "could not clear the tracker's journal");
        }
    }
}

fn upload_batch(
    client: &Client,
    options: &PushOptions<'_>,
    sources: &HashMap<Hash, (RepoPath, EntryKind, u64)>,
    batch: &[Hash],
    last: Option<UploadItem>,
) -> Result<u64, TrackError> {
    let mut items: Vec<UploadItem> = batch
        .iter()
        .map(|hash| {
            let (path, kind, len) = sources[hash].clone();
            let full = options
                .root
                .join(std::ffi::OsStr::from_bytes(path.as_bytes()));
            UploadItem {
                hash: *hash,
                len,
                open: Box::new(move || {
                    let file = File::open(&full)?;
                    let reader: Box<dyn Read + Send> =
                        Box::new(SegmentReader::from_entry(file, &kind));
                    Ok(reader)
                }),
            }
        })
        .collect();
    items.extend(last);
    let progress = options.progress.clone();
    let on_bytes: Box<dyn FnMut(u64) + Send> = Box::new(move |bytes| {
        if let Some(progress) = &progress {
            progress.advance(bytes);
        }
    });
    match client.upload_pack(items, on_bytes) {
        Ok(sent) => Ok(sent),
        Err(err) => {
            // A file edited after the scan no longer matches its hash and the
            // repository refuses it. Say so (and push again) rather than fail.
            for hash in batch {
                let (path, kind, _) = &sources[hash];
                let full = options
                    .root
                    .join(std::ffi::OsStr::from_bytes(path.as_bytes()));
                let now = hash_file(&full).ok();
                let still_same = matches!(
                    (&now, kind),
                    (Some(EntryKind::File { hash: new, .. }), EntryKind::File { hash: old, .. }) if new == old
                );
                if !still_same {
                    return Err(TrackError::ChangedDuringPush(path.clone()));
                }
            }
            Err(err.into())
        }
    }
}
