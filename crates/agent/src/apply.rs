//! The apply engine: makes a tree go from version N to N+1 so that a crash at any
//! instant leaves it wholly N or (after the next start) wholly N+1.
//!
//! Three phases:
//! 1. **Stage.** Every new file, symlink, hard link and special file is built
//!    complete (content, owner, mode, xattrs, mtime) in the staging directory
//!    (`stage`, kept from one version to the next) on the same file system as the
//!    tree; blobs are hash-checked as they stream in. Then one `syncfs` (for a small
//!    version: an fsync of each staged file and of the staging directory). The tree
//!    is untouched; a crash here leaves version N and what was staged is discarded on
//!    the next start.
//! 2. **Journal.** The changeset is written over the file `journal` in place, behind
//!    a header with its length and hash, and fdatasync'd: one flush, no file created.
//!    This is the commit point: from here on the version *will* be applied. A
//!    journal whose header does not match its bytes is a write torn by a crash
//!    before the commit point (the previous version's record was already complete:
//!    a version is journalled only once the previous one is recorded as applied),
//!    and counts as none.
//! 3. **Roll forward.** Removals are renames into a trash directory, entries are
//!    renames out of staging, directories are created and given their metadata,
//!    directory mtimes are set last. Each step is idempotent (a staged name that is
//!    gone was already placed; a removed path that is gone was already removed;
//!    `Changeset::validate` guarantees no removed path overlaps an entry), so after
//!    a crash the next start simply runs this phase again. Then `syncfs` (small
//!    version: fsync of every directory it touched), the
//!    applied version is recorded atomically, and the journal is emptied.
//!
//! Every write into the tree resolves its parent directory with openat2
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and acts on a single name relative to
//! that directory, so no symlink — shipped by a version or planted by anyone — can
//! redirect a write outside the root.
//!
//! The engine is shared by the agent and (later) the image builder; it knows nothing
//! of HTTP: blobs come from a [`BlobSource`].

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vdsync_proto::{Changeset, EntryKind, Hash, Metadata, RepoPath};
use vdsync_store::SegmentReader;
use vdsync_sys::process::{incarnation_of_entry, FileId, Incarnation};
use vdsync_sys::{Errno, RootDir, Special};

use crate::plan::UpdatedFile;
use crate::ApplyError;

/// Where blobs come from: the repository over HTTP for an agent, the local store for
/// the image builder.
pub trait BlobSource {
    /// Streams each blob of `hashes` once, in any order, to `sink`, and checks its
    /// hash after the sink has consumed it (or before, for content already held).
    /// Returns the bytes transferred.
    fn fetch(
        &self,
        hashes: &[Hash],
        sink: &mut dyn FnMut(Hash, &mut dyn Read) -> io::Result<()>,
    ) -> Result<u64, ApplyError>;
}

/// Whether a roll-forward is the first for its journal or a re-run after a crash.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    First,
    /// What the first run did may not be durable: a re-run syncs the whole file
    /// system rather than only what it touched itself.
    Again,
}

/// Up to this many entries and removals, a version is made durable by fsyncing
/// each file and directory it touched instead of `syncfs`: syncfs also writes out
/// every other dirty page on the file system (a build, a database), which can take
/// far longer than the version itself, and a one-file change is the common case.
const FSYNC_EACH_UP_TO: usize = 64;

fn small(changeset: &Changeset) -> bool {
    changeset.entries.len() + changeset.removed.len() <= FSYNC_EACH_UP_TO
}

/// Fetch batches close at this many content bytes or blobs.
const FETCH_BYTES: u64 = 64 << 20;
const FETCH_BLOBS: usize = 4096;

/// The durable record of a version being applied (phase 2).
#[derive(Debug, Serialize, Deserialize)]
pub struct Journal {
    pub version: u64,
    pub stage: PathBuf,
    pub changeset: Changeset,
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub bytes_fetched: u64,
}

/// What applying one version did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub version: u64,
    pub files: u64,
    pub removed: u64,
    pub bytes_fetched: u64,
    pub warnings: Vec<String>,
    pub recovered: bool,
    pub duration_ms: u64,
    /// What was done to running processes.
    pub processes: Vec<vdsync_proto::wire::ProcessOutcome>,
}

/// A version staged and not yet committed.
pub struct Prepared {
    journal: Journal,
    started: Instant,
}

impl Prepared {
    pub fn changeset(&self) -> &Changeset {
        &self.journal.changeset
    }
}

/// The engine for one tree, with its working directory (`--state`).
pub struct Applier {
    root: RootDir,
    state_dir: PathBuf,
    /// Staging and trash parent: the state directory when it shares the tree's file
    /// system (renames must not cross file systems), else a hidden directory at
    /// the top of the tree.
    work_dir: PathBuf,
    /// `STATE/lock`, held locked (flock) while this applier lives, so that no second
    /// agent applies to the same tree meanwhile. None when read-only.
    _lock: Option<File>,
}

fn io_at(
    path: impl Into<PathBuf>,
    operation: &'static str,
) -> impl FnOnce(io::Error) -> ApplyError {
    let path = path.into();
    move |source| ApplyError::Io {
        path,
        operation,
        source,
    }
}

/// Builds the error for a failed operation on `path` in the tree; the path is cloned
/// only when the operation actually failed (this sits on the per-entry hot path).
fn tree_io<'a>(
    path: &'a RepoPath,
    operation: &'static str,
) -> impl FnOnce(io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Tree {
        path: path.clone(),
        operation,
        source,
    }
}

fn parent_bytes(path: &RepoPath) -> Vec<u8> {
    path.parent()
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_default()
}

fn stage_name(index: usize) -> Vec<u8> {
    format!("e{index}").into_bytes()
}

/// `applied` holds two slots of this many bytes; each is `VERSION HASH`, padded
/// with spaces, then a newline, HASH being the first 16 hex digits of the BLAKE3
/// of the version's decimal digits. Versions alternate between the slots, so a
/// write torn by a crash leaves the other slot, one version older, intact.
const APPLIED_SLOT_LEN: usize = 64;

fn encode_applied_slot(version: u64) -> Vec<u8> {
    let digits = version.to_string();
    let hash = Hash::of(digits.as_bytes()).to_hex();
    let mut slot = format!("{digits} {}", &hash[..16]).into_bytes();
    slot.resize(APPLIED_SLOT_LEN - 1, b' ');
    slot.push(b'\n');
    slot
}

/// The version `applied` records: the higher of its valid slots, or for a file
/// of the old format (`VERSION\n`, written whole and renamed) that number.
fn decode_applied(bytes: &[u8]) -> Option<u64> {
    let slot = |bytes: &[u8]| -> Option<u64> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut words = text.split_whitespace();
        let digits = words.next()?;
        let hash = words.next()?;
        let version: u64 = digits.parse().ok()?;
        (Hash::of(digits.as_bytes()).to_hex().get(..16) == Some(hash)).then_some(version)
    };
    if bytes.len() == 2 * APPLIED_SLOT_LEN {
        let (first, second) = bytes.split_at(APPLIED_SLOT_LEN);
        return slot(first).into_iter().chain(slot(second)).max();
    }
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// The journal file's first line: `vdsync-journal LENGTH HASH`, then LENGTH bytes of
/// JSON whose BLAKE3 is HASH.
const JOURNAL_MAGIC: &str = "vdsync-journal";

fn encode_journal(json: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "{JOURNAL_MAGIC} {} {}\n",
        json.len(),
        Hash::of(json).to_hex()
    )
    .into_bytes();
    bytes.extend_from_slice(json);
    bytes
}

/// The JSON of a complete journal; None for an empty file (no journal) and for a
/// torn one. Bytes past the recorded length are an earlier, longer journal's tail.
fn decode_journal(bytes: &[u8]) -> Option<&[u8]> {
    let newline = bytes.iter().position(|byte| *byte == b'\n')?;
    let header = std::str::from_utf8(&bytes[..newline]).ok()?;
    let mut words = header.split(' ');
    if words.next() != Some(JOURNAL_MAGIC) {
        return None;
    }
    let length: usize = words.next()?.parse().ok()?;
    let hash = words.next()?;
    let json = bytes.get(newline + 1..newline + 1 + length)?;
    (Hash::of(json).to_hex() == hash).then_some(json)
}

impl Applier {
    /// An applier that only reads: it creates nothing (the state directory need not
    /// exist) and must not be used to apply.
    pub fn open_read_only(root: &Path, state_dir: &Path) -> Result<Applier, ApplyError> {
        Ok(Applier {
            root: RootDir::open(root).map_err(io_at(root, "open"))?,
            state_dir: state_dir.to_path_buf(),
            work_dir: state_dir.to_path_buf(),
            _lock: None,
        })
    }

    /// Opens `root` for applying, with `state_dir` (made if need be) for the
    /// applier's records. Fails if another applier holds `state_dir`.
    pub fn open(root: &Path, state_dir: &Path) -> Result<Applier, ApplyError> {
        std::fs::create_dir_all(state_dir).map_err(io_at(state_dir, "create"))?;
        let lock_path = state_dir.join("lock");
        let lock = vdsync_sys::lock_exclusive(&lock_path)
            .map_err(io_at(&lock_path, "lock"))?
            .ok_or_else(|| ApplyError::AlreadyRunning(state_dir.to_path_buf()))?;
        let root_dir = RootDir::open(root).map_err(io_at(root, "open"))?;
        let same_fs = vdsync_sys::device_of(root).map_err(io_at(root, "stat"))?
            == vdsync_sys::device_of(state_dir).map_err(io_at(state_dir, "stat"))?;
        let work_dir = if same_fs {
            state_dir.to_path_buf()
        } else {
            root.join(".vdsync-work")
        };
        Ok(Applier {
            root: root_dir,
            state_dir: state_dir.to_path_buf(),
            work_dir,
            _lock: Some(lock),
        })
    }

    fn journal_path(&self) -> PathBuf {
        self.state_dir.join("journal")
    }

    fn stage_dir(&self) -> PathBuf {
        self.work_dir.join("stage")
    }

    /// Writes `bytes` over the start of the journal file and fdatasyncs it: an
    /// existing file takes one flush and no directory update.
    fn write_journal(&self, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.journal_path();
        let (file, created) = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => (file, false),
            Err(err) if err.kind() == io::ErrorKind::NotFound => (
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?,
                true,
            ),
            Err(err) => return Err(err),
        };
        file.write_all_at(bytes, 0)?;
        file.sync_data()?;
        if created {
            vdsync_sys::fsync_dir(&self.state_dir)?;
        }
        Ok(())
    }

    /// Records `version` as applied: written over the older of the two slots of
    /// `applied` in place (see [`encode_applied_slot`]), so the newer record
    /// survives a torn write and no file is created, renamed or freed per version.
    /// With `sync`, fdatasync'd here; otherwise the caller's syncfs carries it.
    fn write_applied(&self, version: u64, sync: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.applied_path();
        let in_slots =
            std::fs::metadata(&path).is_ok_and(|meta| meta.len() == 2 * APPLIED_SLOT_LEN as u64);
        if !in_slots {
            // None yet, or one in the old one-line format: the slot file is made
            // whole and renamed into place (a crash leaves the old record or the
            // new one), once.
            let mut bytes = encode_applied_slot(version);
            bytes.extend_from_slice(&encode_applied_slot(version));
            return vdsync_sys::write_atomic(&path, &bytes);
        }
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        let slot = (version % 2) as usize;
        file.write_all_at(
            &encode_applied_slot(version),
            (slot * APPLIED_SLOT_LEN) as u64,
        )?;
        if sync {
            file.sync_data()?;
        }
        Ok(())
    }

    /// The staging directory, made if need be. Made once: its own name must be
    /// durable before a journal names it.
    fn make_stage_dir(&self) -> Result<PathBuf, ApplyError> {
        let stage = self.stage_dir();
        match std::fs::create_dir(&stage) {
            Ok(()) => {
                vdsync_sys::fsync_dir(&self.work_dir).map_err(io_at(&self.work_dir, "fsync"))?
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(io_at(&stage, "create")(err)),
        }
        Ok(stage)
    }

    /// Makes the spare staging files that are missing (see [`SPARE_FILES`]) and
    /// syncs their names. Off the path of a version: the agent calls it once a
    /// version is applied and reported, so that the next one-file version creates
    /// no file and syncs no directory while it stages.
    ///
    /// A staging directory grown past [`STAGE_DIR_REPLACE_BYTES`] by a large version
    /// is replaced by a new one first: ext4 never shrinks a directory, and every
    /// version lists this one (after a first version of 100,000 files, a listing
    /// read 2 MiB of directory blocks for eight names). Nothing in it is needed
    /// then: no journal names it between versions.
    pub fn make_spares(&self) -> Result<(), ApplyError> {
        let stage = self.stage_dir();
        if std::fs::symlink_metadata(&stage)
            .is_ok_and(|meta| meta.is_dir() && meta.len() > STAGE_DIR_REPLACE_BYTES)
        {
            std::fs::remove_dir_all(&stage).map_err(io_at(&stage, "remove"))?;
        }
        let stage = self.make_stage_dir()?;
        let stage_dir = File::open(&stage).map_err(io_at(&stage, "open"))?;
        let mut made = false;
        for index in 0..SPARE_FILES {
            match vdsync_sys::create_file_at(stage_dir.as_fd(), &stage_name(index)) {
                Ok(_) => made = true,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io_at(&stage, "create a spare file in")(err)),
            }
        }
        if made {
            vdsync_sys::fsync(stage_dir.as_fd()).map_err(io_at(&stage, "fsync"))?;
        }
        Ok(())
    }

    /// Empties the journal; not synced (see [`Applier::recover`]).
    fn clear_journal(&self) -> Result<(), ApplyError> {
        let path = self.journal_path();
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => file.set_len(0).map_err(io_at(&path, "empty")),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(io_at(path, "open")(err)),
        }
    }

    fn applied_path(&self) -> PathBuf {
        self.state_dir.join("applied")
    }

    fn trash_dir(&self) -> PathBuf {
        self.work_dir.join("trash")
    }

    /// The version this tree is at: recorded by a previous apply, else the
    /// image's own marker (`var/lib/vdsync/image-version` in the tree), else none.
    pub fn current_version(&self) -> Result<Option<u64>, ApplyError> {
        let recorded = self.applied_path();
        match std::fs::read(&recorded) {
            Ok(bytes) => {
                return decode_applied(&bytes)
                    .map(Some)
                    .ok_or_else(|| ApplyError::CorruptState {
                        path: recorded,
                        message: "neither slot holds a version with a matching hash".to_owned(),
                    })
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_at(recorded, "read")(source)),
        }
        let image_marker = self.root.path().join("var/lib/vdsync/image-version");
        match std::fs::read_to_string(&image_marker) {
            Ok(text) => {
                let version = text.trim().parse().map_err(|_| ApplyError::CorruptState {
                    path: image_marker.clone(),
                    message: format!("{:?} is not a version number", text.trim()),
                })?;
                Ok(Some(version))
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_at(image_marker, "read")(source)),
        }
    }

    /// Finishes an interrupted apply, if the journal says there is one.
    pub fn recover(&self) -> Result<Option<Applied>, ApplyError> {
        let path = self.journal_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(io_at(path, "read")(source)),
        };
        let Some(json) = decode_journal(&bytes) else {
            // No commit point reached (no journal, or one torn by the crash):
            // what was staged is junk, and the version is applied afresh.
            self.discard_leftovers()?;
            return Ok(None);
        };
        let journal: Journal =
            serde_json::from_slice(json).map_err(|err| ApplyError::CorruptState {
                path: path.clone(),
                message: err.to_string(),
            })?;
        if self
            .current_version()?
            .is_some_and(|version| version >= journal.version)
        {
            // Finished before the crash; only the journal's emptying was lost.
            self.clear_journal()?;
            self.discard_leftovers()?;
            return Ok(None);
        }
        let started = Instant::now();
        let mut applied = self.roll_forward(&journal, Run::Again)?;
        applied.recovered = true;
        applied.duration_ms = started.elapsed().as_millis() as u64;
        Ok(Some(applied))
    }

    /// Empties the staging directory but for its spares, and removes the trash.
    fn discard_leftovers(&self) -> Result<(), ApplyError> {
        clear_stage(&self.stage_dir())?;
        let trash = self.trash_dir();
        match std::fs::remove_dir_all(&trash) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_at(trash, "remove")(err)),
            _ => Ok(()),
        }
    }

    /// Applies `changeset` as `version`: stage, journal, roll forward.
    pub fn apply(
        &self,
        version: u64,
        changeset: &Changeset,
        blobs: &dyn BlobSource,
    ) -> Result<Applied, ApplyError> {
        let prepared = self.prepare(version, changeset, blobs)?;
        self.commit(prepared)
    }

    /// Phase 1 alone: stages the version. The tree is untouched; the agent stops
    /// processes between this and [`Applier::commit`], so their downtime does not
    /// include fetching.
    pub fn prepare(
        &self,
        version: u64,
        changeset: &Changeset,
        blobs: &dyn BlobSource,
    ) -> Result<Prepared, ApplyError> {
        let started = Instant::now();
        changeset
            .validate()
            .map_err(|source| ApplyError::InvalidChangeset { version, source })?;
        self.discard_leftovers()?;
        let stage = self.make_stage_dir()?;
        let (bytes_fetched, warnings) = self.stage(changeset, &stage, blobs)?;
        Ok(Prepared {
            journal: Journal {
                version,
                stage,
                changeset: changeset.clone(),
                warnings,
                bytes_fetched,
            },
            started,
        })
    }

    /// Phases 2 and 3: the journal (the commit point), then roll forward.
    pub fn commit(&self, prepared: Prepared) -> Result<Applied, ApplyError> {
        let journal = prepared.journal;
        let bytes = serde_json::to_vec(&journal).map_err(|err| ApplyError::CorruptState {
            path: self.journal_path(),
            message: err.to_string(),
        })?;
        self.write_journal(&encode_journal(&bytes))
            .map_err(io_at(self.journal_path(), "write"))?;
        tracing::debug!(version = journal.version, "journalled");
        let mut applied = self.roll_forward(&journal, Run::First)?;
        applied.duration_ms = prepared.started.elapsed().as_millis() as u64;
        Ok(applied)
    }

    /// The regular file now at `path` in the tree, if there is one (symlinks are
    /// not followed).
    pub fn file_at(&self, path: &RepoPath) -> Option<FileId> {
        self.current_at(path, false).map(|(file, _)| file)
    }

    /// [`Applier::file_at`], with the file's incarnation if `incarnation` is asked
    /// for (0 otherwise, or where the file system does not tell).
    fn current_at(&self, path: &RepoPath, incarnation: bool) -> Option<(FileId, Incarnation)> {
        let parent = self.root.open_dir(&parent_bytes(path)).ok()?;
        let stat = vdsync_sys::lstat_at(parent.as_fd(), path.file_name()).ok()??;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        let file = FileId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        };
        let incarnation = if incarnation {
            incarnation_of_entry(parent.as_fd(), path.file_name())
        } else {
            0
        };
        Some((file, incarnation))
    }

    /// Every non-directory the changeset places, with the file now at its path,
    /// then every removed path that is a regular file now (a removed directory's
    /// contents are not listed).
    pub fn updated_files(&self, changeset: &Changeset) -> Vec<UpdatedFile> {
        let placed = changeset
            .entries
            .iter()
            .filter(|item| item.entry.kind != EntryKind::Dir)
            .map(|item| {
                let current = self.current_at(&item.path, true);
                UpdatedFile {
                    path: item.path.clone(),
                    current: current.map(|(file, _)| file),
                    incarnation: current.map_or(0, |(_, incarnation)| incarnation),
                    removed: false,
                }
            });
        let removed = changeset.removed.iter().filter_map(|path| {
            self.current_at(path, true)
                .map(|(current, incarnation)| UpdatedFile {
                    path: path.clone(),
                    current: Some(current),
                    incarnation,
                    removed: true,
                })
        });
        placed.chain(removed).collect()
    }

    /// Phase 1: everything new, complete, in `stage`, then one syncfs.
    fn stage(
        &self,
        changeset: &Changeset,
        stage: &Path,
        blobs: &dyn BlobSource,
    ) -> Result<(u64, Vec<String>), ApplyError> {
        let stage_dir = File::open(stage).map_err(io_at(stage, "open"))?;
        let stage_fd = stage_dir.as_fd();
        let fsync_each = small(changeset);
        // Whether a name was made in the staging directory (not just a spare
        // written): only then must the directory be synced.
        let named = Cell::new(false);
        let mut warnings = Vec::new();
        let index_of: HashMap<&RepoPath, usize> = changeset
            .entries
            .iter()
            .enumerate()
            .map(|(index, item)| (&item.path, index))
            .collect();

        // Regular files, fetched once per distinct blob.
        let mut wanting: HashMap<Hash, Vec<usize>> = HashMap::new();
        let mut order: Vec<(Hash, u64)> = Vec::new();
        for (index, item) in changeset.entries.iter().enumerate() {
            if let Some((hash, stored)) = item.entry.blob() {
                let users = wanting.entry(hash).or_default();
                if users.is_empty() {
                    order.push((hash, stored));
                }
                users.push(index);
            }
        }
        let mut bytes_fetched = 0u64;
        let mut batch: Vec<Hash> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut flush = |batch: &mut Vec<Hash>| -> Result<(), ApplyError> {
            if batch.is_empty() {
                return Ok(());
            }
            bytes_fetched += blobs.fetch(batch, &mut |hash, content| {
                let users = &wanting[&hash];
                let first = users[0];
                let first_entry = &changeset.entries[first].entry;
                let name = stage_name(first);
                let mut file = stage_file(stage_fd, &name, &named)?;
                write_content(&mut file, &first_entry.kind, content)?;
                finish_file(&file, &first_entry.meta)?;
                if fsync_each {
                    file.sync_all()?;
                }
                for &other in &users[1..] {
                    let mut source = vdsync_sys::open_file_at(stage_fd, &name)?;
                    let mut copy = stage_file(stage_fd, &stage_name(other), &named)?;
                    let mut runs = SegmentReader::from_entry(&mut source, &first_entry.kind);
                    write_content(&mut copy, &changeset.entries[other].entry.kind, &mut runs)?;
                    finish_file(&copy, &changeset.entries[other].entry.meta)?;
                    if fsync_each {
                        copy.sync_all()?;
                    }
                }
                Ok(())
            })?;
            batch.clear();
            Ok(())
        };
        for (hash, stored) in &order {
            if !batch.is_empty()
                && (batch_bytes + stored > FETCH_BYTES || batch.len() >= FETCH_BLOBS)
            {
                flush(&mut batch)?;
                batch_bytes = 0;
            }
            batch.push(*hash);
            batch_bytes += stored;
        }
        flush(&mut batch)?;

        // Everything else that is not a directory.
        for (index, item) in changeset.entries.iter().enumerate() {
            let name = stage_name(index);
            let meta = &item.entry.meta;
            let special = match &item.entry.kind {
                EntryKind::File { .. } | EntryKind::Dir => continue,
                EntryKind::Socket => {
                    warnings.push(format!(
                        "{} is a socket on the development machine; sockets are not recreated",
                        item.path
                    ));
                    continue;
                }
                EntryKind::Symlink { target } => {
                    clear_name(stage_fd, &name, &named)
                        .map_err(tree_io(&item.path, "stage symlink"))?;
                    vdsync_sys::symlink_at(target, stage_fd, &name)
                        .map_err(tree_io(&item.path, "stage symlink"))?;
                    vdsync_sys::set_owner_mode_at(stage_fd, &name, meta.uid, meta.gid, None)
                        .map_err(tree_io(&item.path, "chown"))?;
                    vdsync_sys::set_mtime_at(stage_fd, &name, meta.mtime.sec, meta.mtime.nsec)
                        .map_err(tree_io(&item.path, "set mtime"))?;
                    continue;
                }
                EntryKind::HardLink { target } => {
                    clear_name(stage_fd, &name, &named)
                        .map_err(tree_io(&item.path, "stage hard link"))?;
                    match index_of.get(target) {
                        Some(&target_index) => vdsync_sys::link_at(
                            stage_fd,
                            &stage_name(target_index),
                            stage_fd,
                            &name,
                        ),
                        None => {
                            let dir = self
                                .root
                                .open_dir(&parent_bytes(target))
                                .map_err(tree_io(target, "open parent"))?;
                            let linked = vdsync_sys::link_at(
                                dir.as_fd(),
                                target.file_name(),
                                stage_fd,
                                &name,
                            );
                            match linked {
                                // The target is on a file system mounted inside the
                                // tree: stage a copy; placing links it there again
                                // if it can (see `roll_forward`).
                                Err(err) if vdsync_sys::errno(&err) == Some(Errno::XDEV) => {
                                    copy_to_stage(dir.as_fd(), target.file_name(), stage_fd, &name)
                                }
                                other => other,
                            }
                        }
                    }
                    .map_err(tree_io(&item.path, "stage hard link"))?;
                    continue;
                }
                EntryKind::Fifo => Special::Fifo,
                EntryKind::CharDevice { rdev } => Special::CharDevice(*rdev),
                EntryKind::BlockDevice { rdev } => Special::BlockDevice(*rdev),
            };
            clear_name(stage_fd, &name, &named).map_err(tree_io(&item.path, "mknod"))?;
            vdsync_sys::mknod_at(stage_fd, &name, special, meta.mode)
                .map_err(tree_io(&item.path, "mknod"))?;
            vdsync_sys::set_owner_mode_at(stage_fd, &name, meta.uid, meta.gid, Some(meta.mode))
                .map_err(tree_io(&item.path, "chown"))?;
            vdsync_sys::set_mtime_at(stage_fd, &name, meta.mtime.sec, meta.mtime.nsec)
                .map_err(tree_io(&item.path, "set mtime"))?;
        }
        if fsync_each {
            // Each file was synced as it was finished; the directory holds the
            // names, links and special files, unless every one was a spare's.
            if named.get() {
                vdsync_sys::fsync(stage_fd).map_err(io_at(stage, "fsync"))?;
            }
        } else {
            vdsync_sys::syncfs(stage_fd).map_err(io_at(stage, "syncfs"))?;
        }
        Ok((bytes_fetched, warnings))
    }

    /// Makes `leaf` in `parent` a hard link to the tree's `target`, through
    /// `temporary` (replaced if an earlier run left it), and syncs the directory.
    fn link_in_tree(
        &self,
        target: &RepoPath,
        parent: BorrowedFd<'_>,
        leaf: &[u8],
        temporary: &[u8],
    ) -> io::Result<()> {
        let target_dir = self.root.open_dir(&parent_bytes(target))?;
        vdsync_sys::remove_at(parent, temporary)?;
        vdsync_sys::link_at(target_dir.as_fd(), target.file_name(), parent, temporary)?;
        vdsync_sys::rename_at(parent, temporary, parent, leaf)?;
        vdsync_sys::fsync(parent)
    }

    /// Phase 3, idempotent: may run any number of times for the same journal.
    fn roll_forward(&self, journal: &Journal, run: Run) -> Result<Applied, ApplyError> {
        let changeset = &journal.changeset;
        let stage_dir = File::open(&journal.stage).map_err(io_at(&journal.stage, "open"))?;
        let stage_fd = stage_dir.as_fd();
        let trash = self.trash_dir();
        // Created when something is first discarded.
        let mut trash_dir: Option<File> = None;
        // Trash names only need to be unique; a re-run after a crash finds the
        // earlier run's names taken and moves on (NOREPLACE), never overwriting them.
        let mut trash_counter = 0usize;
        let mut discard =
            |dir: BorrowedFd<'_>, name: &[u8], path: &RepoPath| -> Result<(), ApplyError> {
                let trash_file = match trash_dir.take() {
                    Some(file) => file,
                    None => {
                        std::fs::create_dir_all(&trash).map_err(io_at(&trash, "create"))?;
                        File::open(&trash).map_err(io_at(&trash, "open"))?
                    }
                };
                let trash_file: &File = trash_dir.insert(trash_file);
                let trash_fd = trash_file.as_fd();
                loop {
                    trash_counter += 1;
                    let trash_name = format!("{}-{trash_counter}", journal.version).into_bytes();
                    let moved = vdsync_sys::rename_noreplace_at(dir, name, trash_fd, &trash_name);
                    return match moved.as_ref().map_err(vdsync_sys::errno) {
                        Ok(()) => Ok(()),
                        Err(Some(Errno::EXIST)) => continue,
                        // Already removed by an earlier run.
                        Err(Some(Errno::NOENT)) => Ok(()),
                        // Another file system mounted inside the tree: delete in place.
                        Err(Some(Errno::XDEV)) => vdsync_sys::remove_at(dir, name)
                            .map(|_| ())
                            .map_err(tree_io(path, "remove")),
                        Err(_) => moved.map_err(tree_io(path, "remove")),
                    };
                }
            };

        for removed in &changeset.removed {
            let parent = match self.root.open_dir(&parent_bytes(removed)) {
                Ok(parent) => parent,
                Err(err) => match vdsync_sys::errno(&err) {
                    // The parent is gone or is no longer a directory: so is the path.
                    Some(Errno::NOENT | Errno::NOTDIR) => continue,
                    _ => return Err(tree_io(removed, "open parent")(err)),
                },
            };
            discard(parent.as_fd(), removed.file_name(), removed)?;
        }

        let mut files = 0u64;
        // Directories this run made: their parents' entries must be made durable.
        let mut created: Vec<&RepoPath> = Vec::new();
        for (index, item) in changeset.entries.iter().enumerate() {
            let path = &item.path;
            let parent = self
                .root
                .open_dir(&parent_bytes(path))
                .map_err(tree_io(path, "open parent"))?;
            let parent_fd = parent.as_fd();
            let leaf = path.file_name();
            let existing = vdsync_sys::lstat_at(parent_fd, leaf).map_err(tree_io(path, "stat"))?;
            if item.entry.kind == EntryKind::Dir {
                match &existing {
                    Some(stat) if vdsync_sys::is_dir(stat) => {}
                    Some(_) => {
                        discard(parent_fd, leaf, path)?;
                        vdsync_sys::mkdir_at(parent_fd, leaf, 0o700)
                            .map_err(tree_io(path, "mkdir"))?;
                        created.push(path);
                    }
                    None => {
                        vdsync_sys::mkdir_at(parent_fd, leaf, 0o700)
                            .map_err(tree_io(path, "mkdir"))?;
                        created.push(path);
                    }
                }
                let dir =
                    vdsync_sys::open_child_dir(parent_fd, leaf).map_err(tree_io(path, "open"))?;
                apply_dir_metadata(dir.as_fd(), &item.entry.meta)
                    .map_err(tree_io(path, "set metadata"))?;
                continue;
            }
            if item.entry.kind == EntryKind::Socket {
                continue;
            }
            files += 1;
            let name = stage_name(index);
            if vdsync_sys::lstat_at(stage_fd, &name)
                .map_err(tree_io(path, "stat staged"))?
                .is_none()
            {
                // Placed by an earlier run of this roll-forward.
                continue;
            }
            if existing.as_ref().is_some_and(vdsync_sys::is_dir) {
                // A directory becomes a non-directory; its old children were removed above.
                discard(parent_fd, leaf, path)?;
            }
            match vdsync_sys::rename_at(stage_fd, &name, parent_fd, leaf) {
                Ok(()) => {}
                // Another file system mounted inside the tree (a separate /var):
                // no rename reaches it from the staging directory.
                Err(err) if vdsync_sys::errno(&err) == Some(Errno::XDEV) => {
                    let temporary = format!(".vdsync-place-{}-{index}", journal.version);
                    if let EntryKind::HardLink { target } = &item.entry.kind {
                        // A link to a file already in its final place, on this
                        // file system: linked there. Not to one this version
                        // replaces later in the loop (it would keep the old file).
                        let settled = changeset
                            .entries
                            .iter()
                            .position(|other| &other.path == target)
                            .is_none_or(|position| position < index);
                        if settled
                            && self
                                .link_in_tree(target, parent_fd, leaf, temporary.as_bytes())
                                .is_ok()
                        {
                            vdsync_sys::remove_at(stage_fd, &name)
                                .map_err(tree_io(path, "remove staged"))?;
                            continue;
                        }
                    }
                    place_across(
                        stage_fd,
                        &name,
                        parent_fd,
                        leaf,
                        temporary.as_bytes(),
                        &item.entry,
                    )
                    .map_err(tree_io(path, "copy into place"))?;
                }
                Err(err) => return Err(tree_io(path, "rename into place")(err)),
            }
        }
        tracing::debug!(version = journal.version, "placed");

        // Directory times last: placing children changes them.
        for item in changeset.entries.iter().rev() {
            if item.entry.kind == EntryKind::Dir {
                let parent = self
                    .root
                    .open_dir(&parent_bytes(&item.path))
                    .map_err(tree_io(&item.path, "open parent"))?;
                let mtime = item.entry.meta.mtime;
                vdsync_sys::set_mtime_at(
                    parent.as_fd(),
                    item.path.file_name(),
                    mtime.sec,
                    mtime.nsec,
                )
                .map_err(tree_io(&item.path, "set mtime"))?;
            }
        }

        let fsync_each = small(changeset) && run == Run::First;
        // `applied` is written before the sync that makes the renames durable, so
        // one sync covers both. That is safe: while the journal exists a restart
        // rolls forward first, whatever `applied` says.
        let applied_path = self.applied_path();
        self.write_applied(journal.version, fsync_each)
            .map_err(io_at(&applied_path, "write"))?;
        if fsync_each {
            // Every directory whose entries or metadata this version changed: the
            // parents of removed paths, of placed non-directories and of created
            // directories, every placed directory (its metadata), and the trash if
            // something went there. Not the state directory: `applied` and the
            // journal are written in place, their names made durable once.
            let mut directories: std::collections::BTreeSet<Vec<u8>> = changeset
                .removed
                .iter()
                .chain(
                    changeset
                        .entries
                        .iter()
                        .filter(|item| item.entry.kind != EntryKind::Dir)
                        .map(|item| &item.path),
                )
                .chain(created.iter().copied())
                .map(parent_bytes)
                .collect();
            directories.extend(
                changeset
                    .entries
                    .iter()
                    .filter(|item| item.entry.kind == EntryKind::Dir)
                    .map(|item| item.path.as_bytes().to_vec()),
            );
            for directory in &directories {
                let path = self
                    .root
                    .path()
                    .join(String::from_utf8_lossy(directory).as_ref());
                let fd = match self.root.open_dir(directory) {
                    Ok(fd) => fd,
                    // Gone with a removal of its own: nothing there to make durable.
                    Err(err)
                        if matches!(
                            vdsync_sys::errno(&err),
                            Some(Errno::NOENT | Errno::NOTDIR)
                        ) =>
                    {
                        continue
                    }
                    Err(err) => return Err(io_at(path, "open")(err)),
                };
                vdsync_sys::fsync(fd.as_fd()).map_err(io_at(path, "fsync"))?;
            }
            if let Some(trash_dir) = &trash_dir {
                vdsync_sys::fsync(trash_dir.as_fd()).map_err(io_at(&trash, "fsync"))?;
            }
        } else {
            vdsync_sys::syncfs(self.root.fd()).map_err(io_at(self.root.path(), "syncfs"))?;
            // And every file system mounted inside the tree: directories made and
            // metadata set there are not on the root's.
            for mount in vdsync_sys::mounts::mounts_below(self.root.path()) {
                if let Ok(dir) = File::open(&mount) {
                    vdsync_sys::syncfs(dir.as_fd()).map_err(io_at(&mount, "syncfs"))?;
                }
            }
        }
        if self.work_dir != self.state_dir && !fsync_each {
            // The state directory is on another file system than the tree.
            let state = File::open(&self.state_dir).map_err(io_at(&self.state_dir, "open"))?;
            vdsync_sys::syncfs(state.as_fd()).map_err(io_at(&self.state_dir, "syncfs"))?;
        }
        // Emptying the journal need not be durable: a journal whose version is
        // already recorded as applied is simply discarded on the next start.
        self.clear_journal()?;
        // Cleanup is not part of the version: a crash here leaves only leftovers.
        let _ = clear_stage(&journal.stage);
        if trash_dir.is_some() || run == Run::Again {
            let _ = std::fs::remove_dir_all(&trash);
        }

        Ok(Applied {
            version: journal.version,
            files,
            removed: changeset.removed.len() as u64,
            bytes_fetched: journal.bytes_fetched,
            warnings: journal.warnings.clone(),
            recovered: false,
            duration_ms: 0,
            processes: Vec::new(),
        })
    }
}

/// Writes a blob's content into a new staged file: the data runs at their offsets,
/// then the full length, so holes stay holes.
fn write_content(file: &mut File, kind: &EntryKind, content: &mut dyn Read) -> io::Result<()> {
    let EntryKind::File { size, segments, .. } = kind else {
        return Ok(());
    };
    let mut writer = io::BufWriter::with_capacity(256 * 1024, &mut *file);
    match segments {
        None => {
            let copied = io::copy(&mut (&mut *content).take(*size), &mut writer)?;
            if copied != *size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob shorter than the file",
                ));
            }
        }
        Some(segments) => {
            for segment in segments {
                writer.seek(SeekFrom::Start(segment.offset))?;
                let copied = io::copy(&mut (&mut *content).take(segment.len), &mut writer)?;
                if copied != segment.len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob shorter than the file's data runs",
                    ));
                }
            }
        }
    }
    writer.flush()?;
    drop(writer);
    file.set_len(*size)?;
    Ok(())
}

/// Copies the regular file `name` in `dir` (content, owner, mode, times) to `to_name`
/// in `stage`, synced: a hard link's stand-in when its target is on another file
/// system than the staging directory.
fn copy_to_stage(
    dir: BorrowedFd<'_>,
    name: &[u8],
    stage: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    let mut source = vdsync_sys::open_file_at(dir, name)?;
    let stat = rustix::fs::fstat(&source)?;
    let mut copy = vdsync_sys::create_file_at(stage, to_name)?;
    io::copy(&mut source, &mut copy)?;
    vdsync_sys::set_owner_mode(
        copy.as_fd(),
        stat.st_uid,
        stat.st_gid,
        stat.st_mode & 0o7777,
    )?;
    vdsync_sys::set_mtime(copy.as_fd(), stat.st_mtime, stat.st_mtime_nsec as u32)?;
    copy.sync_all()
}

/// Places the staged `name` at `leaf` in `parent`, on another file system than the
/// staging directory, where a rename cannot: a complete copy under `temporary`
/// beside the target (content, owner, mode, xattrs, mtime), synced, renamed over
/// the target, the directory synced; the staged entry is removed last, so a re-run
/// after a crash copies again. A hard link becomes a copy of its file's content
/// (its link target may still be staged, on the other file system).
fn place_across(
    stage: BorrowedFd<'_>,
    name: &[u8],
    parent: BorrowedFd<'_>,
    leaf: &[u8],
    temporary: &[u8],
    entry: &vdsync_proto::Entry,
) -> io::Result<()> {
    let meta = &entry.meta;
    // Left by an earlier run that crashed.
    vdsync_sys::remove_at(parent, temporary)?;
    match &entry.kind {
        EntryKind::Symlink { target } => {
            vdsync_sys::symlink_at(target, parent, temporary)?;
            vdsync_sys::set_owner_mode_at(parent, temporary, meta.uid, meta.gid, None)?;
            vdsync_sys::set_mtime_at(parent, temporary, meta.mtime.sec, meta.mtime.nsec)?;
        }
        EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
            let special = match entry.kind {
                EntryKind::CharDevice { rdev } => Special::CharDevice(rdev),
                EntryKind::BlockDevice { rdev } => Special::BlockDevice(rdev),
                _ => Special::Fifo,
            };
            vdsync_sys::mknod_at(parent, temporary, special, meta.mode)?;
            vdsync_sys::set_owner_mode_at(parent, temporary, meta.uid, meta.gid, Some(meta.mode))?;
            vdsync_sys::set_mtime_at(parent, temporary, meta.mtime.sec, meta.mtime.nsec)?;
        }
        EntryKind::File { .. } | EntryKind::HardLink { .. } => {
            let mut source = vdsync_sys::open_file_at(stage, name)?;
            let mut copy = vdsync_sys::create_file_at(parent, temporary)?;
            match &entry.kind {
                EntryKind::File { .. } => {
                    let mut runs = SegmentReader::from_entry(&mut source, &entry.kind);
                    write_content(&mut copy, &entry.kind, &mut runs)?;
                }
                _ => {
                    io::copy(&mut source, &mut copy)?;
                }
            }
            finish_file(&copy, meta)?;
            copy.sync_all()?;
        }
        EntryKind::Dir | EntryKind::Socket => return Ok(()),
    }
    vdsync_sys::rename_at(parent, temporary, parent, leaf)?;
    vdsync_sys::fsync(parent)?;
    vdsync_sys::remove_at(stage, name)?;
    Ok(())
}

/// Owner, mode, xattrs, then times: chown clears setuid bits and file
/// capabilities, so it goes first; the mtime goes last because the others change it.
fn finish_file(file: &File, meta: &Metadata) -> io::Result<()> {
    let fd = file.as_fd();
    vdsync_sys::set_owner_mode(fd, meta.uid, meta.gid, meta.mode)?;
    for xattr in &meta.xattrs {
        vdsync_sys::set_xattr(fd, &xattr.name, &xattr.value)?;
    }
    vdsync_sys::set_mtime(fd, meta.mtime.sec, meta.mtime.nsec)
}

/// The first this many staging names (`e0`, `e1`, …) are kept ready as empty files
/// between versions ([`Applier::make_spares`]): staging a small version then writes
/// into files whose names are already durable, so it creates no file (slow on a
/// file system that has seen many deletions) and needs no fsync of the staging
/// directory, only of each file.
const SPARE_FILES: usize = 8;

/// A staging directory larger than this (on ext4, one that once held some
/// thousands of names) is replaced between versions; see [`Applier::make_spares`].
const STAGE_DIR_REPLACE_BYTES: u64 = 64 * 1024;

/// Opens staging name `name` in `stage` for writing: the spare there if it is
/// still pristine, else a new file (replacing whatever was there). `named` is set
/// when a name was created.
fn stage_file(stage: BorrowedFd<'_>, name: &[u8], named: &Cell<bool>) -> io::Result<File> {
    if let Some(spare) = vdsync_sys::open_pristine_file_at(stage, name)? {
        return Ok(spare);
    }
    clear_name(stage, name, named)?;
    vdsync_sys::create_file_at(stage, name)
}

/// Removes whatever is at staging name `name` (a spare) before something else
/// is made there, and records that a name will be created.
fn clear_name(stage: BorrowedFd<'_>, name: &[u8], named: &Cell<bool>) -> io::Result<()> {
    vdsync_sys::remove_at(stage, name)?;
    named.set(true);
    Ok(())
}

/// Removes everything in the staging directory `directory` (which may not exist)
/// but the spares, keeping the directory. A spare here is an empty regular file
/// under a spare's name; whether it is still pristine is checked where it is used
/// ([`stage_file`]).
fn clear_stage(directory: &Path) -> Result<(), ApplyError> {
    let listing = match std::fs::read_dir(directory) {
        Ok(listing) => listing,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_at(directory, "list")(err)),
    };
    let spares: Vec<Vec<u8>> = (0..SPARE_FILES).map(stage_name).collect();
    for item in listing {
        let item = item.map_err(io_at(directory, "list"))?;
        let name = item.file_name();
        if spares
            .iter()
            .any(|spare| spare.as_slice() == name.as_bytes())
            && item
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.len() == 0)
        {
            continue;
        }
        let path = item.path();
        let is_dir = item.file_type().is_ok_and(|kind| kind.is_dir());
        let removed = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(io_at(path, "remove")(err))
            }
            _ => {}
        }
    }
    Ok(())
}

fn apply_dir_metadata(dir: BorrowedFd<'_>, meta: &Metadata) -> io::Result<()> {
    vdsync_sys::set_owner_mode(dir, meta.uid, meta.gid, meta.mode)?;
    for xattr in &meta.xattrs {
        vdsync_sys::set_xattr(dir, &xattr.name, &xattr.value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::path;

    /// A scratch directory holding an empty tree `root` and state directory
    /// `state`; both go when the first value is dropped.
    fn tree_and_state() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        let state = temp.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        (temp, root, state)
    }

    /// A journal (the commit point) for version 1 that removes `removed`.
    fn write_journal_removing(state: &Path, removed: &str) {
        let journal = Journal {
            version: 1,
            stage: state.join("stage"),
            changeset: Changeset {
                parent: Some(0),
                removed: vec![path(removed)],
                entries: vec![],
            },
            warnings: vec![],
            bytes_fetched: 0,
        };
        std::fs::write(
            state.join("journal"),
            encode_journal(&serde_json::to_vec(&journal).unwrap()),
        )
        .unwrap();
    }

    /// Whether the state directory holds a journal (an empty file is none).
    fn journal_pending(state: &Path) -> bool {
        std::fs::metadata(state.join("journal")).is_ok_and(|meta| meta.len() > 0)
    }

    /// Regression: a roll-forward re-run after a crash numbered its trash names from 1
    /// again, collided with the first run's trash (here a non-empty directory), and
    /// failed to remove the path.
    #[test]
    fn rerun_roll_forward_does_not_collide_with_earlier_trash() {
        let (_temp, root, state) = tree_and_state();
        std::fs::create_dir_all(root.join("keep")).unwrap();
        std::fs::write(root.join("doomed"), "old").unwrap();
        std::fs::create_dir_all(state.join("trash/1-1/from-first-run")).unwrap();
        std::fs::create_dir_all(state.join("stage")).unwrap();
        write_journal_removing(&state, "doomed");

        let applier = Applier::open(&root, &state).unwrap();
        let recovered = applier.recover().unwrap().expect("a journal to finish");
        assert_eq!(recovered.version, 1);
        assert!(recovered.recovered);
        assert!(!root.join("doomed").exists());
        assert!(root.join("keep").is_dir());
        assert_eq!(applier.current_version().unwrap(), Some(1));
        assert!(!journal_pending(&state));
    }

    /// The journal's removal is not synced: a journal for a version already
    /// recorded as applied (its staging already cleaned up) is discarded, not
    /// rolled forward again.
    #[test]
    fn a_leftover_journal_of_an_applied_version_is_discarded() {
        let (_temp, root, state) = tree_and_state();
        std::fs::write(state.join("applied"), "1\n").unwrap();
        write_journal_removing(&state, "gone");
        let applier = Applier::open(&root, &state).unwrap();
        assert!(applier.recover().unwrap().is_none());
        assert!(!journal_pending(&state));
        assert_eq!(applier.current_version().unwrap(), Some(1));
    }

    /// A journal write torn by a crash (its header does not match its bytes) is no
    /// commit point: nothing is rolled forward and what was staged is discarded.
    #[test]
    fn a_torn_journal_counts_as_none() {
        let (_temp, root, state) = tree_and_state();
        std::fs::create_dir_all(state.join("stage")).unwrap();
        std::fs::write(state.join("stage/e0"), "staged").unwrap();
        std::fs::write(root.join("kept"), "old").unwrap();
        write_journal_removing(&state, "kept");
        let mut bytes = std::fs::read(state.join("journal")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(state.join("journal"), &bytes).unwrap();

        let applier = Applier::open(&root, &state).unwrap();
        assert!(applier.recover().unwrap().is_none());
        assert_eq!(std::fs::read_to_string(root.join("kept")).unwrap(), "old");
        assert!(!state.join("stage/e0").exists(), "staged leftovers kept");
        assert_eq!(applier.current_version().unwrap(), None);
    }

    /// Blob contents by hash, for applying in tests.
    struct Contents(HashMap<Hash, Vec<u8>>);

    impl Contents {
        fn of(contents: &[&[u8]]) -> Contents {
            Contents(
                contents
                    .iter()
                    .map(|content| (Hash::of(content), content.to_vec()))
                    .collect(),
            )
        }
    }

    impl BlobSource for Contents {
        fn fetch(
            &self,
            hashes: &[Hash],
            sink: &mut dyn FnMut(Hash, &mut dyn Read) -> io::Result<()>,
        ) -> Result<u64, ApplyError> {
            for hash in hashes {
                sink(*hash, &mut &self.0[hash][..]).map_err(io_at("test blobs", "read"))?;
            }
            Ok(0)
        }
    }

    /// A version on `parent` holding directory `d` and file `d/f` with `content`.
    fn d_f_version(parent: Option<u64>, content: &[u8]) -> Changeset {
        use vdsync_proto::fixtures::{dir_entry, file_entry};
        Changeset {
            parent,
            removed: vec![],
            entries: vec![dir_entry("d"), file_entry("d/f", content)],
        }
    }

    /// A one-file version is staged in the spare file made for its index, so it
    /// creates no name while staging; a spare that is no longer empty is not used.
    #[test]
    fn a_small_version_is_staged_in_a_spare_file() {
        use std::os::unix::fs::MetadataExt;
        let (_temp, root, state) = tree_and_state();
        let applier = Applier::open(&root, &state).unwrap();
        applier.make_spares().unwrap();
        let stage = state.join("stage");
        let spare = std::fs::metadata(stage.join("e1")).unwrap().ino();

        let first = d_f_version(None, b"first");
        applier
            .apply(0, &first, &Contents::of(&[b"first"]))
            .unwrap();
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"first");
        assert_eq!(
            std::fs::metadata(root.join("d/f")).unwrap().ino(),
            spare,
            "the file was staged in a new file, not in the spare"
        );
        assert!(!stage.join("e1").exists(), "the used spare is still there");
        assert!(stage.join("e0").exists(), "an unused spare was removed");

        applier.make_spares().unwrap();
        std::fs::write(stage.join("e1"), "left behind").unwrap();
        let second = d_f_version(Some(0), b"second");
        applier
            .apply(1, &second, &Contents::of(&[b"second"]))
            .unwrap();
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"second");
        assert_eq!(applier.current_version().unwrap(), Some(1));
    }

    /// A staging directory grown large (by a many-file version; here by long names
    /// linked to one file, so no inodes are taken from the tests running beside
    /// this one) is replaced by a new one between versions, so the next version does
    /// not list its old blocks; a small one is kept.
    #[test]
    fn a_staging_directory_grown_large_is_replaced_between_versions() {
        let (temp, root, state) = tree_and_state();
        let applier = Applier::open(&root, &state).unwrap();
        applier.make_spares().unwrap();
        let stage = state.join("stage");
        // A mark on the directory itself tells a kept one from a new one (a new
        // one may well get the old one's inode number).
        let mark = |path: &Path| {
            rustix::fs::setxattr(
                path,
                "user.vdsync-test",
                b"kept",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        };
        let marked = |path: &Path| {
            let mut value = [0u8; 16];
            rustix::fs::getxattr(path, "user.vdsync-test", &mut value).is_ok()
        };
        mark(&stage);

        let one = d_f_version(None, b"one");
        applier.apply(0, &one, &Contents::of(&[b"one"])).unwrap();
        applier.make_spares().unwrap();
        assert!(marked(&stage), "a small staging directory was replaced");

        // What a version of some thousands of files leaves: a directory whose
        // blocks stay allocated once its names are gone.
        let linked = temp.path().join("linked");
        std::fs::write(&linked, b"").unwrap();
        for index in 0..400 {
            let name = format!("{index:0>250}");
            std::fs::hard_link(&linked, stage.join(&name)).unwrap();
        }
        for index in 0..400 {
            std::fs::remove_file(stage.join(format!("{index:0>250}"))).unwrap();
        }
        let grown = std::fs::metadata(&stage).unwrap().len();
        assert!(
            grown > STAGE_DIR_REPLACE_BYTES,
            "400 long names left the staging directory at {grown} bytes: the test needs a file system that keeps a directory's size (ext4), not this one"
        );
        applier.make_spares().unwrap();
        assert!(!marked(&stage), "the grown staging directory was kept");
        assert!(std::fs::metadata(&stage).unwrap().len() <= STAGE_DIR_REPLACE_BYTES);
        for index in 0..SPARE_FILES {
            let spare = stage.join(String::from_utf8(stage_name(index)).unwrap());
            assert_eq!(
                std::fs::metadata(&spare).unwrap().len(),
                0,
                "{} is missing or not empty",
                spare.display()
            );
        }

        let two = d_f_version(Some(0), b"two");
        applier.apply(1, &two, &Contents::of(&[b"two"])).unwrap();
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"two");
        assert_eq!(applier.current_version().unwrap(), Some(1));
    }

    /// One tree, one applier: a second one on the same state directory is refused
    /// while the first lives (two agents would undo each other's versions and stop
    /// each other's processes), and accepted once it is gone.
    #[test]
    fn a_second_applier_on_the_same_state_directory_is_refused() {
        let (_temp, root, state) = tree_and_state();
        let first = Applier::open(&root, &state).unwrap();
        assert!(matches!(
            Applier::open(&root, &state),
            Err(ApplyError::AlreadyRunning(_))
        ));
        // Reading the tree's version needs no lock.
        Applier::open_read_only(&root, &state).unwrap();
        drop(first);
        Applier::open(&root, &state).unwrap();
    }

    /// Versions alternate between the two slots of `applied`; a slot torn by a
    /// crash leaves the other, one version older; the old one-line format reads.
    #[test]
    fn applied_survives_a_torn_slot_and_reads_the_old_format() {
        let (_temp, root, state) = tree_and_state();
        let applier = Applier::open(&root, &state).unwrap();
        assert_eq!(applier.current_version().unwrap(), None);

        std::fs::write(state.join("applied"), "7\n").unwrap();
        assert_eq!(applier.current_version().unwrap(), Some(7));
        for version in 8..=11 {
            applier.write_applied(version, true).unwrap();
            assert_eq!(applier.current_version().unwrap(), Some(version));
        }
        let bytes = std::fs::read(state.join("applied")).unwrap();
        assert_eq!(bytes.len(), 2 * APPLIED_SLOT_LEN, "not rewritten in place");

        // 12 goes to slot 0 (over 10) and is torn inside its hash: 11 in slot 1
        // stands.
        let mut torn = bytes.clone();
        let slot = encode_applied_slot(12);
        torn[..8].copy_from_slice(&slot[..8]);
        std::fs::write(state.join("applied"), &torn).unwrap();
        assert_eq!(applier.current_version().unwrap(), Some(11));

        // Both slots unreadable: said so, not taken for "no version".
        std::fs::write(state.join("applied"), vec![b'x'; 2 * APPLIED_SLOT_LEN]).unwrap();
        assert!(matches!(
            applier.current_version(),
            Err(ApplyError::CorruptState { .. })
        ));
    }

    #[test]
    fn journal_round_trips_and_ignores_an_older_tail() {
        let mut bytes = encode_journal(b"{\"short\":1}");
        assert_eq!(decode_journal(&bytes), Some(&b"{\"short\":1}"[..]));
        bytes.extend_from_slice(b"tail of a longer journal written before");
        assert_eq!(decode_journal(&bytes), Some(&b"{\"short\":1}"[..]));
        assert_eq!(decode_journal(b""), None);
        assert_eq!(decode_journal(&bytes[..bytes.len() / 2]), None);
        assert_eq!(decode_journal(b"{\"version\":1}"), None);
    }
}
