//! Thin, safe wrappers over the kernel interfaces vdsync needs: path resolution that
//! cannot leave a root (openat2), extended attributes, sparse-file extents, and
//! durability (fsync, syncfs).
//!
//! This crate decides nothing; it gives the other crates one obvious way to make
//! each system call correctly. It is the only place allowed to hold `unsafe`: the
//! calls rustix does not cover (fanotify with file handles, `open_by_handle_at`)
//! live here, each block with its `// SAFETY:` argument.

#![allow(unsafe_code)]

pub mod fanotify;
pub mod inotify;
pub mod mounts;
pub mod open_events;
pub mod proc_events;
pub mod process;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, SeekFrom, XattrFlags};

/// A directory opened as the anchor for every write beneath it.
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Resolution flags for everything an agent writes: stay beneath the root and
/// follow no symlink at all, so a symlink planted in the tree (by a version or by
/// anyone else) can never redirect a write outside it.
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

impl RootDir {
    pub fn open(path: &Path) -> io::Result<RootDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory at `relative` (bytes, `/`-separated, may be empty for the
    /// root itself) without following any symlink and without leaving the root.
    pub fn open_dir(&self, relative: &[u8]) -> io::Result<OwnedFd> {
        let relative: &OsStr = if relative.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(relative)
        };
        Ok(rustix::fs::openat2(
            &self.fd,
            relative,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )?)
    }
}

/// Calls `visit` on `top` and on every directory below it, depth first, each before
/// it is listed, never through a symlink; `visit` says whether to go below it. A
/// directory that vanishes or is replaced meanwhile (`ENOENT`, `ENOTDIR`, `ELOOP`)
/// is skipped: whoever walks for a watch hears of its replacement. Any other error
/// listing one is returned, naming it.
pub fn walk_directories(
    top: &Path,
    mut visit: impl FnMut(&Path) -> io::Result<bool>,
) -> io::Result<()> {
    let list_error = |path: &Path, err: &io::Error| {
        io::Error::new(err.kind(), format!("cannot list {}: {err}", path.display()))
    };
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if !visit(&dir)? {
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if vanished(&err) => continue,
            Err(err) => return Err(list_error(&dir, &err)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if vanished(&err) => break,
                Err(err) => return Err(list_error(&dir, &err)),
            };
            // `file_type` does not follow symlinks.
            match entry.file_type() {
                Ok(file_type) if file_type.is_dir() => pending.push(entry.path()),
                Ok(_) => {}
                Err(err) if vanished(&err) => {}
                Err(err) => return Err(list_error(&entry.path(), &err)),
            }
        }
    }
    Ok(())
}

/// Whether `err` means the path vanished or was replaced by something else since
/// it was seen (`ENOENT`, `ENOTDIR`, `ELOOP`).
pub fn vanished(err: &io::Error) -> bool {
    matches!(errno(err), Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP))
}

/// What is at `name` in `dir`, without following a symlink; `None` if nothing is.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// True if the stat describes a directory.
pub fn is_dir(stat: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Directory
}

/// Removes `name` in `dir`, recursively if it is a directory, never following a
/// symlink. Returns false if nothing was there.
pub fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    let Some(stat) = lstat_at(dir, name)? else {
        return Ok(false);
    };
    if is_dir(&stat) {
        // std's remove_dir_all descends with openat(O_NOFOLLOW) and unlinkat, so it
        // is safe against symlinks swapped in below; the /proc path only names our
        // already-resolved directory fd.
        let path = proc_fd_path(dir, name);
        std::fs::remove_dir_all(path)?;
    } else {
        rustix::fs::unlinkat(dir, OsStr::from_bytes(name), AtFlags::empty())?;
    }
    Ok(true)
}

/// `/proc/self/fd/N/name`: a path std APIs can use for an entry of an open directory.
pub fn proc_fd_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(OsStr::from_bytes(name));
    path
}

/// Moves `name` in `from` to `to_name` in `to`, replacing a non-directory there.
pub fn rename_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    Ok(rustix::fs::renameat(
        from,
        OsStr::from_bytes(name),
        to,
        OsStr::from_bytes(to_name),
    )?)
}

/// Like [`rename_at`] but fails with `EEXIST` instead of replacing anything.
pub fn rename_noreplace_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        from,
        OsStr::from_bytes(name),
        to,
        OsStr::from_bytes(to_name),
        rustix::fs::RenameFlags::NOREPLACE,
    )?)
}

/// The errno behind an I/O error, for matching on specific failures.
pub fn errno(err: &io::Error) -> Option<rustix::io::Errno> {
    rustix::io::Errno::from_io_error(err)
}

pub use rustix::io::Errno;

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(
        dir,
        OsStr::from_bytes(name),
        Mode::from_raw_mode(mode),
    )?)
}

/// Opens the directory `name` in `dir`, refusing a symlink.
pub fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

/// Creates a new regular file `name` in `dir` (which must not exist).
pub fn create_file_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Opens `name` in `dir` for writing if it is what [`create_file_at`] makes: a
/// regular file, empty, with one link and no extended attributes. `None` if it is
/// absent or anything else. Never follows a symlink, never opens a FIFO.
pub fn open_pristine_file_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<File>> {
    let pristine = |stat: &rustix::fs::Stat| {
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
            && stat.st_size == 0
            && stat.st_nlink == 1
    };
    match lstat_at(dir, name)? {
        Some(stat) if pristine(&stat) => {}
        _ => return Ok(None),
    }
    let fd = match rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::NXIO) => {
            return Ok(None)
        }
        Err(err) => return Err(err.into()),
    };
    // Looked at again through the descriptor: the name may have changed since.
    if !pristine(&rustix::fs::fstat(&fd)?) {
        return Ok(None);
    }
    let mut none: [u8; 0] = [];
    match rustix::fs::flistxattr(&fd, &mut none[..]) {
        Ok(0) | Err(rustix::io::Errno::NOTSUP) => {}
        Ok(_) => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    Ok(Some(File::from(fd)))
}

/// Opens the regular file `name` in `dir` for reading, never following a symlink
/// at `name`.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(
        OsStr::from_bytes(target),
        dir,
        OsStr::from_bytes(name),
    )?)
}

/// A hard link `to_name` in `to` for the file `name` in `from` (never following a
/// symlink at `name`).
pub fn link_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    Ok(rustix::fs::linkat(
        from,
        OsStr::from_bytes(name),
        to,
        OsStr::from_bytes(to_name),
        AtFlags::empty(),
    )?)
}

/// The kinds of special file `mknod_at` makes.
#[derive(Debug, Clone, Copy)]
pub enum Special {
    Fifo,
    CharDevice(u64),
    BlockDevice(u64),
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], special: Special, mode: u32) -> io::Result<()> {
    use rustix::fs::FileType;
    let (file_type, dev) = match special {
        Special::Fifo => (FileType::Fifo, 0),
        Special::CharDevice(rdev) => (FileType::CharacterDevice, rdev),
        Special::BlockDevice(rdev) => (FileType::BlockDevice, rdev),
    };
    Ok(rustix::fs::mknodat(
        dir,
        OsStr::from_bytes(name),
        file_type,
        Mode::from_raw_mode(mode),
        dev,
    )?)
}

/// Sets owner, then (for non-symlinks) mode, of `name` in `dir` without following
/// a symlink. Owner first: chown clears setuid/setgid bits.
pub fn set_owner_mode_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    uid: u32,
    gid: u32,
    mode: Option<u32>,
) -> io::Result<()> {
    let name = OsStr::from_bytes(name);
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if let Some(mode) = mode {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
    }
    Ok(())
}

/// Owner, then mode, on an open file.
pub fn set_owner_mode(fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

fn timestamps(sec: i64, nsec: u32) -> rustix::fs::Timestamps {
    let time = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec) as _,
    };
    rustix::fs::Timestamps {
        last_access: time,
        last_modification: time,
    }
}

/// Sets access and modification time of `name` in `dir` (not following a symlink).
pub fn set_mtime_at(dir: BorrowedFd<'_>, name: &[u8], sec: i64, nsec: u32) -> io::Result<()> {
    Ok(rustix::fs::utimensat(
        dir,
        OsStr::from_bytes(name),
        &timestamps(sec, nsec),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

pub fn set_mtime(fd: BorrowedFd<'_>, sec: i64, nsec: u32) -> io::Result<()> {
    Ok(rustix::fs::futimens(fd, &timestamps(sec, nsec))?)
}

/// Every extended attribute of the file at `path`, not following a symlink, sorted
/// by name. File systems without xattr support give an empty list.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(size) => size,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    };
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut names = vec![0u8; size + 256];
    let len = rustix::fs::llistxattr(path, &mut names[..])?;
    names.truncate(len);
    let mut attributes = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name_os = OsStr::from_bytes(name);
        let value_len = match rustix::fs::lgetxattr_query(path, name_os) {
            Ok(len) => len,
            // Removed between list and get.
            Err(rustix::io::Errno::NODATA) => continue,
            Err(err) => return Err(err.into()),
        };
        let mut value = vec![0u8; value_len];
        let got = rustix::fs::lgetxattr(path, name_os, &mut value[..])?;
        value.truncate(got);
        attributes.push((name.to_vec(), value));
    }
    attributes.sort();
    Ok(attributes)
}

pub fn set_xattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty())?)
}

/// The data runs of a file of `size` bytes, or `None` if it has no holes.
/// Uses SEEK_DATA / SEEK_HOLE; a file system without them reports one run.
pub fn data_segments(file: &File, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let mut segments = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let data = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
            Ok(data) => data,
            // No data after `offset`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?.min(size);
        segments.push((data, hole - data));
        offset = hole;
    }
    rustix::fs::seek(file, SeekFrom::Start(0))?;
    if segments.len() == 1 && segments[0] == (0, size) {
        return Ok(None);
    }
    Ok(Some(segments))
}

/// Waits up to `timeout` for `fd` to become readable; false on timeout or signal.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    wait_any_readable(&[fd], timeout)
}

/// Waits up to `timeout` for any of `fds` to become readable; false on timeout or
/// on a signal.
pub fn wait_any_readable(fds: &[BorrowedFd<'_>], timeout: std::time::Duration) -> io::Result<bool> {
    let mut poll: Vec<rustix::event::PollFd<'_>> = fds
        .iter()
        .map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN))
        .collect();
    let timespec = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    match rustix::event::poll(&mut poll, Some(&timespec)) {
        Ok(ready) => Ok(ready > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

/// Flushes the whole file system holding `fd`: one call instead of an fsync per file
/// when many files were written.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

/// Opens a directory by path and fsyncs it, so that renames inside it are durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    dir.sync_all()
}

/// Opens (making it if need be) `path` and takes an exclusive `flock` on it, for
/// as long as the returned file stays open: one process per state directory.
/// `None` if another open file holds the lock.
pub fn lock_exclusive(path: &Path) -> io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// The device a path lives on.
pub fn device_of(path: &Path) -> io::Result<u64> {
    Ok(rustix::fs::stat(path)?.st_dev)
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync
/// of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_dir_refuses_escape_and_symlinks() {
        let temp = tempfile::tempdir().unwrap();
        std::fs::create_dir(temp.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", temp.path().join("link")).unwrap();
        std::os::unix::fs::symlink("real", temp.path().join("inner-link")).unwrap();
        let root = RootDir::open(temp.path()).unwrap();
        assert!(root.open_dir(b"real").is_ok());
        assert!(root.open_dir(b"").is_ok());
        assert!(root.open_dir(b"link").is_err());
        assert!(root.open_dir(b"inner-link").is_err());
        assert!(root.open_dir(b"link/ssh").is_err());
        assert!(root.open_dir(b"inner-link/").is_err());
        assert!(root.open_dir(b"../").is_err());
    }

    #[test]
    fn sparse_segments() {
        use std::io::{Seek, Write};
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("sparse");
        let mut file = File::create(&path).unwrap();
        file.seek(io::SeekFrom::Start(1 << 20)).unwrap();
        file.write_all(&[7u8; 4096]).unwrap();
        file.set_len(4 << 20).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        let segments = data_segments(&file, 4 << 20).unwrap().unwrap();
        assert_eq!(segments, vec![(1 << 20, 4096)]);
        let dense = temp.path().join("dense");
        std::fs::write(&dense, [1u8; 10000]).unwrap();
        let file = File::open(&dense).unwrap();
        assert_eq!(data_segments(&file, 10000).unwrap(), None);
    }
}
