//! Reading a development tree into a manifest, hashing only what changed.
//!
//! Like git's index, the [`Index`] remembers for every regular file the stat fields
//! that change whenever its content can have changed (size, mtime, ctime, inode).
//! A file whose fields all match keeps its recorded hash; every other file is read
//! and hashed. Metadata (mode, owner, xattrs) is read afresh for every entry: it is
//! one `lstat` and one `llistxattr`, and a chmod does not touch mtime.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vdsync_proto::{
    Entry, EntryKind, Hash, Manifest, Metadata, RepoPath, Segment, Timestamp, Xattr,
};

use vdsync_store::SegmentReader;

use crate::excludes::Excludes;
use crate::TrackError;

/// The stat fields that, unchanged, let a file keep its recorded hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatKey {
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
    pub ino: u64,
    pub dev: u64,
}

impl StatKey {
    fn of(meta: &std::fs::Metadata) -> StatKey {
        StatKey {
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// One indexed path: its entry, and for regular files the stat key it was hashed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub path: RepoPath,
    #[serde(flatten)]
    pub entry: Entry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<StatKey>,
}

/// The pusher's memory of the last pushed tree (kept in `--state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    /// The version this tree was pushed as; `None` before the first push.
    pub version: Option<u64>,
    pub entries: Vec<IndexEntry>,
}

impl Index {
    pub fn manifest(&self) -> Manifest {
        Manifest {
            entries: self
                .entries
                .iter()
                .map(|item| (item.path.clone(), item.entry.clone()))
                .collect(),
        }
    }

    /// An index for a manifest fetched from the repository: no stat keys, so every
    /// file is hashed once on the next scan.
    pub fn from_manifest(version: Option<u64>, manifest: Manifest) -> Index {
        Index {
            version,
            entries: manifest
                .entries
                .into_iter()
                .map(|(path, entry)| IndexEntry {
                    path,
                    entry,
                    stat: None,
                })
                .collect(),
        }
    }
}

/// How many times a file that changes while it is hashed is read again before the
/// scan gives up on it.
const HASH_ATTEMPTS: usize = 5;

/// Reads the tree under `root` (excluding `excludes`), reusing hashes from
/// `previous` where the stat key matches.
pub fn scan(root: &Path, excludes: &Excludes, previous: &Index) -> Result<Index, TrackError> {
    let mut scanner = Scanner::new(root, excludes, &previous.entries);
    scanner.walk(None)?;
    let mut entries = scanner.entries;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    link_hard_links(&mut entries, &scanner.inodes);
    Ok(Index {
        version: previous.version,
        entries,
    })
}

/// What [`scan_paths`] found.
pub struct PartialScan {
    /// The index entries now at the scanned paths, sorted.
    pub entries: Vec<IndexEntry>,
    /// A scanned regular file has other hard links. Their names had no event of
    /// their own, so only a full scan can tell the links apart correctly.
    pub saw_hard_links: bool,
}

/// Reads only `paths` (each alone) and `subtrees` (each with everything below it),
/// reusing hashes from `previous` where the stat key matches.
pub fn scan_paths(
    root: &Path,
    excludes: &Excludes,
    previous: &[IndexEntry],
    paths: &[RepoPath],
    subtrees: &[RepoPath],
) -> Result<PartialScan, TrackError> {
    let mut scanner = Scanner::new(root, excludes, previous);
    for path in paths {
        if excludes.is_excluded(path) {
            continue;
        }
        if let Some(entry) = scanner.entry_at(path)? {
            scanner.entries.push(entry);
        }
    }
    for top in subtrees {
        scanner.visit(top.clone())?;
    }
    let mut entries = scanner.entries;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.dedup_by(|a, b| a.path == b.path);
    Ok(PartialScan {
        entries,
        saw_hard_links: !scanner.inodes.is_empty(),
    })
}

struct Scanner<'a> {
    root: &'a Path,
    excludes: &'a Excludes,
    known: HashMap<&'a RepoPath, &'a IndexEntry>,
    entries: Vec<IndexEntry>,
    /// (dev, ino) → paths, for regular files with more than one link.
    inodes: HashMap<(u64, u64), Vec<RepoPath>>,
}

impl<'a> Scanner<'a> {
    fn new(root: &'a Path, excludes: &'a Excludes, previous: &'a [IndexEntry]) -> Self {
        Scanner {
            root,
            excludes,
            known: previous.iter().map(|item| (&item.path, item)).collect(),
            entries: Vec::new(),
            inodes: HashMap::new(),
        }
    }

    fn walk(&mut self, dir: Option<&RepoPath>) -> Result<(), TrackError> {
        let dir_path = absolute(self.root, dir);
        let listing = match std::fs::read_dir(&dir_path) {
            Ok(listing) => listing,
            // Removed or replaced since its parent was listed: not part of this scan.
            Err(err)
                if dir.is_some()
                    && matches!(
                        err.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
            {
                return Ok(())
            }
            Err(source) => {
                return Err(TrackError::Io {
                    path: dir_path,
                    source,
                })
            }
        };
        let mut names: Vec<Vec<u8>> = Vec::new();
        for item in listing {
            let item = item.map_err(|source| TrackError::Io {
                path: dir_path.clone(),
                source,
            })?;
            names.push(item.file_name().as_bytes().to_vec());
        }
        names.sort();
        for name in names {
            let path = match dir {
                Some(dir) => dir.join(&name),
                None => RepoPath::parse(&name),
            }
            .map_err(|err| TrackError::BadName {
                path: dir_path.join(OsStr::from_bytes(&name)),
                message: err.to_string(),
            })?;
            self.visit(path)?;
        }
        Ok(())
    }

    /// Records `path` (unless excluded or gone) and, for a directory, what is below.
    fn visit(&mut self, path: RepoPath) -> Result<(), TrackError> {
        if self.excludes.is_excluded(&path) {
            return Ok(());
        }
        let Some(entry) = self.entry_at(&path)? else {
            return Ok(());
        };
        let is_dir = entry.entry.kind == EntryKind::Dir;
        self.entries.push(entry);
        if is_dir {
            self.walk(Some(&path))?;
        }
        Ok(())
    }

    /// What is at `path` now, `None` if nothing is.
    fn entry_at(&mut self, path: &RepoPath) -> Result<Option<IndexEntry>, TrackError> {
        let full = absolute(self.root, Some(path));
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(source) => return Err(TrackError::Io { path: full, source }),
        };
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            EntryKind::Dir
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&full).map_err(|source| TrackError::Io {
                path: full.clone(),
                source,
            })?;
            EntryKind::Symlink {
                target: target.into_os_string().into_vec_bytes(),
            }
        } else if file_type.is_file() {
            self.file_kind(path, &full, &meta)?
        } else if file_type.is_fifo() {
            EntryKind::Fifo
        } else if file_type.is_char_device() {
            EntryKind::CharDevice { rdev: meta.rdev() }
        } else if file_type.is_block_device() {
            EntryKind::BlockDevice { rdev: meta.rdev() }
        } else {
            EntryKind::Socket
        };
        let stat = matches!(kind, EntryKind::File { .. }).then(|| StatKey::of(&meta));
        if stat.is_some() && meta.nlink() > 1 {
            self.inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(path.clone());
        }
        Ok(Some(IndexEntry {
            path: path.clone(),
            entry: Entry {
                kind,
                meta: metadata_of(&full, &meta)?,
            },
            stat,
        }))
    }

    fn file_kind(
        &self,
        path: &RepoPath,
        full: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<EntryKind, TrackError> {
        let key = StatKey::of(meta);
        if let Some(known) = self.known.get(path) {
            if known.stat == Some(key) {
                if let EntryKind::File { .. } = known.entry.kind {
                    return Ok(known.entry.kind.clone());
                }
            }
        }
        hash_file(full)
    }
}

fn absolute(root: &Path, path: Option<&RepoPath>) -> PathBuf {
    match path {
        Some(path) => root.join(OsStr::from_bytes(path.as_bytes())),
        None => root.to_path_buf(),
    }
}

trait IntoVecBytes {
    fn into_vec_bytes(self) -> Vec<u8>;
}

impl IntoVecBytes for std::ffi::OsString {
    fn into_vec_bytes(self) -> Vec<u8> {
        use std::os::unix::ffi::OsStringExt;
        self.into_vec()
    }
}

fn metadata_of(full: &Path, meta: &std::fs::Metadata) -> Result<Metadata, TrackError> {
    let mut xattrs = Vec::new();
    for (name, value) in vdsync_sys::list_xattrs(full).map_err(|source| TrackError::Io {
        path: full.to_path_buf(),
        source,
    })? {
        let name = String::from_utf8(name).map_err(|_| TrackError::BadName {
            path: full.to_path_buf(),
            message: "an extended attribute name is not UTF-8".into(),
        })?;
        xattrs.push(Xattr { name, value });
    }
    Ok(Metadata {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: Timestamp {
            sec: meta.mtime(),
            nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        },
        xattrs,
    })
}

/// Hashes a file's data runs. The file is read again if its size, mtime or ctime
/// moved while it was read, so a hash always describes one consistent state.
pub fn hash_file(full: &Path) -> Result<EntryKind, TrackError> {
    let io_error = |source| TrackError::Io {
        path: full.to_path_buf(),
        source,
    };
    for _ in 0..HASH_ATTEMPTS {
        let mut file = File::open(full).map_err(io_error)?;
        let before = StatKey::of(&file.metadata().map_err(io_error)?);
        let segments = vdsync_sys::data_segments(&file, before.size).map_err(io_error)?;
        let mut hasher = blake3::Hasher::new();
        let mut reader = SegmentReader::new(&mut file, segments.as_deref(), before.size);
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buffer).map_err(io_error)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let after = StatKey::of(&file.metadata().map_err(io_error)?);
        if after == before {
            return Ok(EntryKind::File {
                size: before.size,
                hash: Hash::from(hasher.finalize()),
                segments: segments.map(|runs| {
                    runs.into_iter()
                        .map(|(offset, len)| Segment { offset, len })
                        .collect()
                }),
            });
        }
    }
    Err(TrackError::KeptChanging(full.to_path_buf()))
}

/// Turns every member but the first (in path order) of each hard-link group into a
/// `HardLink` to the first.
fn link_hard_links(entries: &mut [IndexEntry], inodes: &HashMap<(u64, u64), Vec<RepoPath>>) {
    let mut link_targets: BTreeMap<RepoPath, RepoPath> = BTreeMap::new();
    for paths in inodes.values().filter(|paths| paths.len() > 1) {
        let mut sorted = paths.clone();
        sorted.sort();
        for link in &sorted[1..] {
            link_targets.insert(link.clone(), sorted[0].clone());
        }
    }
    for item in entries.iter_mut() {
        if let Some(target) = link_targets.remove(&item.path) {
            item.entry.kind = EntryKind::HardLink { target };
            item.stat = None;
        }
    }
}
