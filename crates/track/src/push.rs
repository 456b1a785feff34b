//! `vdsync push`: turn the development tree's changes into version N+1.
//!
//! The pusher compares the tree with the index of the last push (kept in
//! `--state`), asks the repository which blobs it lacks (unless there are only a few
//! small ones: sending them costs less than asking), uploads only those in packs,
//! and commits the changeset against the version the index was pushed as; the
//! changeset itself is a blob in the last pack, and that pack's request also carries
//! the commit. The index advances only after the repository acknowledged the
//! commit, so a failed or refused push can simply be run again.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use vdsync_client::{Client, UploadItem};
use vdsync_proto::wire::{CommitRequest, VersionInfo};
use vdsync_proto::{Changeset, Entry, EntryKind, Hash, RepoPath};
use vdsync_store::SegmentReader;

use crate::changes::{
    collect, collect_from_journal, Changes, IndexPatch, IndexUpdate, IndexView, Source,
};
use crate::excludes::Excludes;
use crate::index_db::IndexDb;
use crate::journal::Snapshot;
use crate::scan::{hash_file, Index};
use crate::tracker::{request_pushed, request_release_index, ClearRequest, SnapshotRequest};
use crate::TrackError;

/// Upload packs close at this many content bytes or this many blobs, so a failed
/// pack costs little to resend and the repository syncs its disk per pack.
const PACK_BYTES: u64 = 64 << 20;
const PACK_BLOBS: usize = 4096;

/// Up to this many content bytes, a push sends every blob of its changeset without
/// asking the repository which ones it lacks: a round trip costs more than sending
/// a few small files again.
const SEND_WITHOUT_ASKING_BYTES: u64 = 64 << 10;

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

/// What a push did. Travels whole from a tracker that made the push
/// ([`crate::tracker::push_through_tracker`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    pub changeset: Changeset,
    /// Old entries of changed paths, to tell new from modified.
    pub before: BTreeMap<RepoPath, Entry>,
    /// Whether the tracker made the push (from its journal), not `vdsync push`.
    #[serde(default)]
    pub by_tracker: bool,
    /// Files that changed while they were uploaded, each of which made the push
    /// start again (the report is the last attempt's).
    #[serde(default)]
    pub pushed_again_for: Vec<RepoPath>,
}

pub fn index_path(state_dir: &Path) -> PathBuf {
    state_dir.join("index.redb")
}

/// What a push does before it needs the excludes or the repository, begun first
/// thing so that it overlaps building those: ask the tracker for its fenced
/// snapshot and the index entries a journal-driven push of it reads (the tracker
/// keeps the index open), or, without a tracker or for `--rescan`, open the index
/// here (redb reads its allocator state and syncs its header: about a millisecond).
/// The fence is made when the tracker reads the request, after the push started, so
/// every change saved before is in the snapshot.
pub struct PushStart {
    state_dir: PathBuf,
    kind: StartKind,
}

enum StartKind {
    /// A tracker runs; its answer is on its way.
    Tracked(SnapshotRequest),
    /// The index is being opened in this process.
    Local(std::thread::JoinHandle<Result<IndexDb, TrackError>>),
}

impl PushStart {
    /// `rescan`: the push scans the whole tree and needs no snapshot.
    pub fn begin(state_dir: &Path, rescan: bool) -> Result<PushStart, TrackError> {
        std::fs::create_dir_all(state_dir).map_err(|source| TrackError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let kind = match rescan {
            false => match SnapshotRequest::send(state_dir, true)? {
                Some(request) => StartKind::Tracked(request),
                None => StartKind::Local(open_in_background(state_dir)),
            },
            true => {
                request_release_index(state_dir)?;
                StartKind::Local(open_in_background(state_dir))
            }
        };
        Ok(PushStart {
            state_dir: state_dir.to_path_buf(),
            kind,
        })
    }
}

fn open_in_background(state_dir: &Path) -> std::thread::JoinHandle<Result<IndexDb, TrackError>> {
    let path = index_path(state_dir);
    std::thread::spawn(move || IndexDb::open(&path))
}

/// Opens the index in this process, after asking a tracker that holds it to let go.
fn open_here(state_dir: &Path) -> Result<IndexDb, TrackError> {
    request_release_index(state_dir)?;
    IndexDb::open(&index_path(state_dir))
}

/// Runs `attempt` until it succeeds or [`INDEX_BUSY_PATIENCE`] has passed: for a
/// push already committed, whose index must be written while another process (a
/// `status` reading the whole index) may hold it for a moment. Nothing announces
/// its release, so it is tried again every 50 ms.
fn patiently<T>(mut attempt: impl FnMut() -> Result<T, TrackError>) -> Result<T, TrackError> {
    let deadline = std::time::Instant::now() + INDEX_BUSY_PATIENCE;
    loop {
        match attempt() {
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// How long a committed push waits for another process to let go of the index.
const INDEX_BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

fn joined(
    opening: std::thread::JoinHandle<Result<IndexDb, TrackError>>,
) -> Result<IndexDb, TrackError> {
    opening.join().unwrap_or_else(|panic| {
        // Opening the index does not panic; if it did, say so as the panic would.
        std::panic::resume_unwind(panic)
    })
}

/// Where the index a push read from lives, which decides how it is written after
/// the commit.
enum IndexHandle<'a> {
    /// Opened in this process.
    Local(IndexDb),
    /// Held by the tracker, which answered the lookups and writes the update.
    Tracker,
    /// This process is the tracker.
    InTracker(&'a dyn TrackerSide),
}

/// What a push made inside the tracker asks of it.
pub(crate) trait TrackerSide {
    /// A fenced snapshot of the journal and the index entries a journal-driven push
    /// of it reads (`None` when the push must read the index itself).
    fn snapshot(&self) -> Result<(Snapshot, Option<IndexView>), TrackError>;
    /// Records a committed push: `patch` to the index as of `version`, then the
    /// journal cleared up to `sequence`.
    fn record(
        &self,
        sequence: u64,
        version: Option<u64>,
        patch: &IndexPatch,
    ) -> Result<(), TrackError>;
}

/// A push made by the tracker itself, from its journal and its index. `None` when
/// the journal cannot drive it (a full scan is due, the index has no push yet, or
/// the changes are many): the pusher then makes it.
pub(crate) fn push_in_tracker(
    client: &Client,
    options: &PushOptions<'_>,
    tracker: &dyn TrackerSide,
) -> Result<Option<PushReport>, TrackError> {
    let (report, again) = again_if_changed(|| {
        let (snapshot, view) = tracker.snapshot()?;
        let Some((changes, parent)) = journal_changes(options, &snapshot, view)? else {
            return Ok(None);
        };
        let index = IndexHandle::InTracker(tracker);
        send(client, options, index, changes, parent).map(Some)
    })?;
    Ok(report.map(|report| PushReport {
        pushed_again_for: again,
        ..report
    }))
}

/// Imports the repository's head manifest into an index that has none yet (every
/// file is then hashed once, as after a `git clone`). Returns the version the index
/// was pushed as.
fn prepare_index(client: &Client, index: &IndexDb) -> Result<Option<u64>, TrackError> {
    if index.is_empty()? {
        let head = client.head()?;
        let imported = match head {
            Some(head) => Index::from_manifest(Some(head), client.manifest(head)?),
            None => Index::default(),
        };
        index.store(&imported)?;
    }
    index.version()
}

/// Fails unless the repository's head is still the version the index was pushed as.
/// A push that sends something needs no such check up front: its commit names that
/// version as the parent and the repository refuses it if the head moved on.
fn check_head(client: &Client, pushed: Option<u64>) -> Result<(), TrackError> {
    let head = client.head()?;
    if head != pushed {
        return Err(TrackError::DivergedFromRepository { pushed, head });
    }
    Ok(())
}

pub fn push(client: &Client, options: &PushOptions<'_>) -> Result<PushReport, TrackError> {
    let start = PushStart::begin(options.state_dir, options.rescan)?;
    push_started(client, options, start)
}

/// [`push`], with the snapshot and the index already asked for.
pub fn push_started(
    client: &Client,
    options: &PushOptions<'_>,
    start: PushStart,
) -> Result<PushReport, TrackError> {
    let mut start = Some(start);
    let (report, again) = again_if_changed(|| {
        let start = match start.take() {
            Some(start) => start,
            None => PushStart::begin(options.state_dir, options.rescan)?,
        };
        push_once(client, options, start)
    })?;
    Ok(PushReport {
        pushed_again_for: again,
        ..report
    })
}

/// Runs `push` again (up to [`PUSH_ATTEMPTS`] in all) while a file changed under it;
/// returns its result with the files that made it start again, for the report.
fn again_if_changed<T>(
    mut push: impl FnMut() -> Result<T, TrackError>,
) -> Result<(T, Vec<RepoPath>), TrackError> {
    let mut again = Vec::new();
    loop {
        match push() {
            Err(TrackError::ChangedDuringPush(path)) if again.len() + 1 < PUSH_ATTEMPTS => {
                tracing::info!(%path, "a file changed while it was uploaded; pushing again");
                again.push(path);
            }
            other => return other.map(|done| (done, again)),
        }
    }
}

/// The changes a journal-driven push sends and the version they go on top of, or
/// `None` when the journal cannot drive the push (a full scan is due, the index
/// has no push yet or was not sent, or the changes are many).
fn journal_changes(
    options: &PushOptions<'_>,
    snapshot: &Snapshot,
    view: Option<IndexView>,
) -> Result<Option<(Changes, Option<u64>)>, TrackError> {
    let (Some(view), None) = (view, &snapshot.root) else {
        return Ok(None);
    };
    let parent = view.version;
    let changes = collect_from_journal(options.root, options.excludes, &view, snapshot, parent)?;
    Ok(changes.map(|changes| (changes, parent)))
}

fn push_once(
    client: &Client,
    options: &PushOptions<'_>,
    start: PushStart,
) -> Result<PushReport, TrackError> {
    let (index, snapshot) = match start.kind {
        StartKind::Tracked(request) => {
            let (snapshot, view) = request.answer()?;
            tracing::debug!(marks = snapshot.marks.len(), "push: the tracker answered");
            if let Some((changes, parent)) = journal_changes(options, &snapshot, view)? {
                tracing::debug!("push: changes read from the journal's paths");
                return send(client, options, IndexHandle::Tracker, changes, parent);
            }
            // A full scan, the first push from this state, or a large one: this
            // process reads the index itself.
            (open_here(&start.state_dir)?, Some(snapshot))
        }
        StartKind::Local(opening) => (joined(opening)?, None),
    };
    let head = prepare_index(client, &index)?;
    let changes = collect(
        options.root,
        options.excludes,
        &index,
        snapshot,
        options.rescan.then(|| "--rescan was given".to_owned()),
        head,
    )?;
    send(client, options, IndexHandle::Local(index), changes, head)
}

/// Sends `changes` as the version after `head` and records the result in the index.
fn send(
    client: &Client,
    options: &PushOptions<'_>,
    index: IndexHandle<'_>,
    changes: Changes,
    head: Option<u64>,
) -> Result<PushReport, TrackError> {
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
        by_tracker: matches!(index, IndexHandle::InTracker(_)),
        pushed_again_for: Vec::new(),
    };
    if options.dry_run || report.changeset.is_empty() {
        check_head(client, head)?;
    }
    if options.dry_run {
        return Ok(report);
    }
    if report.changeset.is_empty() {
        // Still worth saving: fresh stat keys make the next scan cheaper.
        record(
            options.state_dir,
            index,
            changes.index_update,
            changes.journal_sequence,
            head,
        )?;
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
    let wanted_bytes: u64 = sources.values().map(|(_, _, len)| len).sum();
    // Asking which blobs the repository lacks costs a round trip; for a small push,
    // sending them all costs less than that.
    let missing = if wanted_bytes <= SEND_WITHOUT_ASKING_BYTES {
        wanted
    } else {
        client.missing(&wanted)?
    };
    let total: u64 = missing.iter().map(|hash| sources[hash].2).sum();
    if let Some(progress) = &options.progress {
        progress.start(total);
    }
    // The changeset is a blob too; it travels in the last pack, which also carries
    // the commit, so a small push costs one request.
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
            report.bytes_sent += upload_batch(client, options, &sources, &batch)?;
            batch.clear();
            batch_bytes = 0;
        }
        batch.push(*hash);
        batch_bytes += len;
    }
    // The last pack carries the changeset and the commit: one round trip.
    let commit = CommitRequest {
        parent: head,
        message: options.message.clone(),
        changeset: changeset_hash,
    };
    let (committed, sent) =
        match upload_last_batch(client, options, &sources, &batch, changeset_item, &commit) {
            Ok(committed) => committed,
            // The head moved since this tree was last pushed: say so in the index's
            // terms (the repository only knows that the parent is stale).
            Err(TrackError::Repository(err)) if err.is_conflict() => {
                check_head(client, head)?;
                return Err(err.into());
            }
            Err(err) => return Err(err),
        };
    tracing::debug!(
        version = committed.version,
        "push: the repository committed"
    );
    report.bytes_sent += sent;
    report.blobs_sent = missing.len() as u64;
    if let Some(progress) = &options.progress {
        progress.finish();
    }
    record(
        options.state_dir,
        index,
        changes.index_update,
        changes.journal_sequence,
        Some(committed.version),
    )?;
    tracing::debug!("push: the index and the journal recorded it");
    report.version = Some(committed.version);
    Ok(report)
}

/// Writes the index as of `version` and clears the tracker's journal up to
/// `sequence` (what the push covered), once the repository has acknowledged it.
fn record(
    state_dir: &Path,
    index: IndexHandle<'_>,
    update: IndexUpdate,
    sequence: Option<u64>,
    version: Option<u64>,
) -> Result<(), TrackError> {
    let index = match index {
        IndexHandle::Local(index) => index,
        IndexHandle::InTracker(tracker) => {
            let (IndexUpdate::Patch(patch), Some(sequence)) = (&update, sequence) else {
                // A journal-driven collection always patches the index and names
                // the journal's sequence.
                return Err(TrackError::Tracker(
                    "a push made by the tracker has no index patch".to_owned(),
                ));
            };
            // A `status` or full-scan push may have the index open for a moment (it
            // asked the tracker to let go of it after this push read its view).
            return patiently(|| tracker.record(sequence, version, patch));
        }
        IndexHandle::Tracker => {
            // The tracker writes the index and then clears the journal: one round
            // trip, and no database opened or closed here.
            if let (IndexUpdate::Patch(patch), Some(sequence)) = (&update, sequence) {
                match request_pushed(state_dir, sequence, version, patch.clone()) {
                    Ok(()) => return Ok(()),
                    Err(err) => tracing::warn!(
                        error = %vdsync_proto::display::error_chain(&err),
                        "the tracker did not record the push; writing the index here"
                    ),
                }
            }
            patiently(|| open_here(state_dir))?
        }
    };
    // The tracker clears its marks while the index is written and closed: two
    // databases syncing at once rather than one after the other. The order does not
    // matter: should the index write fail after the marks are gone, the index still
    // names the parent, so the next push is refused as diverged from the repository
    // whatever the journal holds.
    let clearing = sequence
        .map(|sequence| ClearRequest::clear(state_dir, sequence))
        .transpose()
        .unwrap_or_else(|err| {
            warn_not_cleared(&err);
            None
        })
        .flatten();
    update.write(&index, version)?;
    drop(index);
    if let Some(Err(err)) = clearing.map(ClearRequest::answer) {
        warn_not_cleared(&err);
    }
    Ok(())
}

fn warn_not_cleared(err: &TrackError) {
    tracing::warn!(error = %vdsync_proto::display::error_chain(err), "could not clear the tracker's journal");
}

/// Where the blob `hash` of the changeset is read from, as an upload item.
fn upload_item(
    options: &PushOptions<'_>,
    sources: &HashMap<Hash, (RepoPath, EntryKind, u64)>,
    hash: &Hash,
) -> UploadItem {
    let (path, kind, len) = sources[hash].clone();
    let full = options
        .root
        .join(std::ffi::OsStr::from_bytes(path.as_bytes()));
    UploadItem {
        hash: *hash,
        len,
        open: Box::new(move || {
            let file = File::open(&full)?;
            let reader: Box<dyn Read + Send> = Box::new(SegmentReader::from_entry(file, &kind));
            Ok(reader)
        }),
    }
}

fn progress_callback(options: &PushOptions<'_>) -> Box<dyn FnMut(u64) + Send> {
    let progress = options.progress.clone();
    Box::new(move |bytes| {
        if let Some(progress) = &progress {
            progress.advance(bytes);
        }
    })
}

fn upload_batch(
    client: &Client,
    options: &PushOptions<'_>,
    sources: &HashMap<Hash, (RepoPath, EntryKind, u64)>,
    batch: &[Hash],
) -> Result<u64, TrackError> {
    let items = batch
        .iter()
        .map(|hash| upload_item(options, sources, hash))
        .collect();
    client
        .upload_pack(items, progress_callback(options))
        .map_err(|err| explain_refused_upload(options, sources, batch, err))
}

/// Uploads the last batch with the changeset, and commits in the same request.
fn upload_last_batch(
    client: &Client,
    options: &PushOptions<'_>,
    sources: &HashMap<Hash, (RepoPath, EntryKind, u64)>,
    batch: &[Hash],
    changeset_item: UploadItem,
    commit: &CommitRequest,
) -> Result<(VersionInfo, u64), TrackError> {
    let mut items: Vec<UploadItem> = batch
        .iter()
        .map(|hash| upload_item(options, sources, hash))
        .collect();
    items.push(changeset_item);
    client
        .upload_and_commit(items, progress_callback(options), commit)
        .map_err(|err| explain_refused_upload(options, sources, batch, err))
}

/// A file edited after the scan no longer matches its hash and the repository
/// refuses it. Says so (and the push starts over) rather than fail.
fn explain_refused_upload(
    options: &PushOptions<'_>,
    sources: &HashMap<Hash, (RepoPath, EntryKind, u64)>,
    batch: &[Hash],
    err: vdsync_client::ClientError,
) -> TrackError {
    if err.is_conflict() {
        return err.into();
    }
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
            return TrackError::ChangedDuringPush(path.clone());
        }
    }
    err.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::path;

    /// Fails with "changed while uploaded" for each of `changed` in turn, then works.
    fn attempts(changed: &[&str]) -> Result<(u32, Vec<RepoPath>), TrackError> {
        let mut calls = 0u32;
        let mut left = changed.iter();
        again_if_changed(|| {
            calls += 1;
            match left.next() {
                Some(name) => Err(TrackError::ChangedDuringPush(path(name))),
                None => Ok(calls),
            }
        })
    }

    #[test]
    fn a_push_starts_again_for_each_file_that_changed_and_says_which() {
        let (calls, again) = attempts(&["a.txt", "b/c.txt"]).unwrap();
        assert_eq!(calls, 3);
        assert_eq!(again, [path("a.txt"), path("b/c.txt")]);
        assert_eq!(attempts(&[]).unwrap(), (1, Vec::new()));
        let refused = attempts(&["a.txt", "b.txt", "c.txt"]).unwrap_err();
        assert!(
            matches!(&refused, TrackError::ChangedDuringPush(last) if *last == path("c.txt")),
            "{refused}"
        );
    }
}
