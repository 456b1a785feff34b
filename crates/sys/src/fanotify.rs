//! fanotify with directory file handles and names (`FAN_REPORT_DFID_NAME`), for the
//! tracker.
//!
//! One `FAN_MARK_FILESYSTEM` mark sees every change of a name on a whole file
//! system, so start-up costs the same for ten files or ten million (inotify needs a
//! watch per directory, added by walking the tree). Changes of contents and
//! attributes are asked for per directory ([`Fanotify::watch_contents`]): on a
//! file-system mark they would cost every writer on it. Events name the changed entry as (handle of
//! its directory, name); [`Fanotify::resolve`] turns a directory handle into a path.
//! `FAN_RENAME` reports both the old and the new name in one event.
//!
//! The `nix` crate's fanotify drops the info records, so this speaks to the kernel
//! through `libc` directly; parsing the event buffer is safe code over bytes.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The events the tracker's file-system marks ask for: every change to a name
/// (created, deleted, moved), of files and directories alike. `FAN_MOVED_FROM`/
/// `FAN_MOVED_TO` look redundant beside `FAN_RENAME`, but an ignore mark on either
/// directory of a rename drops its whole `FAN_RENAME`, while the other directory's
/// half still comes (see [`Fanotify::ignore_entries`]).
///
/// Not the events about contents and attributes ([`CONTENT_EVENTS`]): on a
/// file-system mark, every write, `chmod` or close anywhere on the file system
/// makes the kernel take the file's parent and name before it can look at any
/// mask, which costs a writer several percent (the `tracker-overhead`
/// benchmark). The tracker asks for those per directory of its tree instead
/// ([`Fanotify::watch_contents`]), on a group of their own.
pub const NAME_EVENTS: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_RENAME
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR;

/// The events about contents and attributes: writes, closes after writing, and
/// changes of mode, owner, times, extended attributes or link count.
pub const CONTENT_EVENTS: u64 = libc::FAN_MODIFY | libc::FAN_ATTRIB | libc::FAN_CLOSE_WRITE;

/// What [`Fanotify::ignore_entries`] stops: the name events in a directory, but not
/// those of its subdirectories (no `FAN_ONDIR`). No `FAN_EVENT_ON_CHILD`: with it,
/// the kernel would look up the parent of every change to an entry.
const ENTRY_EVENTS_IGNORED: u64 = NAME_EVENTS & !libc::FAN_ONDIR;

/// What [`Fanotify::watch_contents`] asks for on a directory: the content events
/// of its entries (`FAN_EVENT_ON_CHILD`) and of the directory itself (`FAN_ONDIR`).
const DIRECTORY_CONTENT_EVENTS: u64 = CONTENT_EVENTS | libc::FAN_EVENT_ON_CHILD | libc::FAN_ONDIR;

pub use libc::{
    FAN_ATTRIB, FAN_CLOSE_WRITE, FAN_CREATE, FAN_DELETE, FAN_DELETE_SELF, FAN_MODIFY,
    FAN_MOVED_FROM, FAN_MOVED_TO, FAN_MOVE_SELF, FAN_ONDIR, FAN_Q_OVERFLOW, FAN_RENAME,
};

/// An opaque kernel file handle (type and bytes), usable as a cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileHandle {
    pub handle_type: i32,
    pub bytes: Vec<u8>,
}

/// Which name an info record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRole {
    /// The entry the event is about (`FAN_EVENT_INFO_TYPE_DFID_NAME`).
    Entry,
    /// The old name of a rename.
    Old,
    /// The new name of a rename.
    New,
}

/// A directory handle plus a name in that directory (`.` for the directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryName {
    pub role: NameRole,
    /// The file system the directory is on (as `statfs` reports it): handles are
    /// only unique within one.
    pub fsid: Fsid,
    pub dir: FileHandle,
    pub name: Vec<u8>,
}

/// A file system's id as `statfs` and fanotify report it (`f_fsid`).
pub type Fsid = u64;

/// The id of the file system holding `path`.
pub fn fsid_of(path: &Path) -> io::Result<Fsid> {
    Ok(fsid_of_statfs(&rustix::fs::statfs(path)?))
}

fn fsid_of_statfs(stat: &rustix::fs::StatFs) -> Fsid {
    // SAFETY: fsid_t is two ints (`__val`, private in libc), 8 bytes with no padding.
    let words: [i32; 2] = unsafe { std::mem::transmute(stat.f_fsid) };
    fsid_from_words(words)
}

/// The kernel's 8 fsid bytes, read the way an event carries them.
fn fsid_from_words(words: [i32; 2]) -> Fsid {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&words[0].to_ne_bytes());
    bytes[4..].copy_from_slice(&words[1].to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// One event as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub mask: u64,
    pub pid: i32,
    pub names: Vec<DirEntryName>,
}

impl Event {
    pub fn is_overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }

    pub fn is_dir(&self) -> bool {
        self.mask & libc::FAN_ONDIR != 0
    }
}

/// A fanotify group reporting directory handles and names.
pub struct Fanotify {
    fd: OwnedFd,
    /// Where each watched file system is mounted, by file system id: opened for
    /// each `open_by_handle_at` rather than held open, which would keep the file
    /// system from being unmounted.
    mounts: HashMap<Fsid, PathBuf>,
    /// What the file-system marks ask for: [`NAME_EVENTS`], and [`CONTENT_EVENTS`]
    /// too after [`Fanotify::hear_contents_everywhere`].
    file_system_events: u64,
    buffer: Vec<u8>,
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// `bytes` (a path or a name) for a system call.
fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path or name contains NUL"))
}

impl Fanotify {
    /// Creates the group and marks the whole file system holding `path`.
    /// Fails with `EPERM` without CAP_SYS_ADMIN and with `EXDEV`/`ENODEV`/`EOPNOTSUPP`
    /// on file systems without usable file handles: the caller falls back to inotify.
    pub fn watch_filesystem(path: &Path) -> io::Result<Fanotify> {
        let mut group = Fanotify::new()?;
        group.also_watch(path)?;
        Ok(group)
    }

    /// A group with no mark yet, for [`Fanotify::watch_contents`]. Its events'
    /// directory handles resolve through the group that marks their file system.
    pub fn new() -> io::Result<Fanotify> {
        let flags = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: fanotify_init takes two flag words and returns a new descriptor or -1.
        let raw = check(unsafe { libc::fanotify_init(flags, libc::O_RDONLY as libc::c_uint) })?;
        // SAFETY: `raw` is a descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Fanotify {
            fd,
            mounts: HashMap::new(),
            file_system_events: NAME_EVENTS,
            buffer: vec![0u8; 256 * 1024],
        })
    }

    /// Asks for the content events ([`CONTENT_EVENTS`]) of the entries of the
    /// directory open as `directory`, and of the directory itself, until it is
    /// deleted. The mark keeps the directory's inode in memory (an evicted inode
    /// would take the mark with it, and its changes would go unheard): about a
    /// kilobyte of kernel memory per directory, as an inotify watch. Marking a
    /// directory again changes nothing. `ENOTDIR` for anything but a directory.
    pub fn watch_contents(&self, directory: BorrowedFd<'_>) -> io::Result<()> {
        self.mark(
            libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR,
            DIRECTORY_CONTENT_EVENTS,
            directory.as_raw_fd(),
            None,
        )
    }

    /// Removes the mark [`Fanotify::watch_contents`] placed on the directory open as
    /// `directory` (`O_PATH` too, as [`Fanotify::open_handle`] gives): its content
    /// events end. `ENOENT` if it had none.
    pub fn unwatch_contents(&self, directory: BorrowedFd<'_>) -> io::Result<()> {
        // "." rather than no name: without one the kernel takes the descriptor as
        // the object, and refuses an `O_PATH` one.
        self.mark(
            libc::FAN_MARK_REMOVE | libc::FAN_MARK_ONLYDIR,
            DIRECTORY_CONTENT_EVENTS,
            directory.as_raw_fd(),
            Some(c"."),
        )
    }

    /// Marks the whole file system holding the directory `path` too (a mount below
    /// the root); false if it was marked already. Fails like
    /// [`Fanotify::watch_filesystem`].
    pub fn also_watch(&mut self, path: &Path) -> io::Result<bool> {
        let fsid = fsid_of(path)?;
        if self.mounts.contains_key(&fsid) {
            return Ok(false);
        }
        self.mark_file_system(path, 0, self.file_system_events)?;
        self.mounts.insert(fsid, path.to_path_buf());
        Ok(true)
    }

    /// Adds `events` to the mark on the whole file system holding `path` (to its
    /// ignore mask with `FAN_MARK_IGNORE_SURV` in `flags`).
    fn mark_file_system(&self, path: &Path, flags: libc::c_uint, events: u64) -> io::Result<()> {
        self.mark(
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM | flags,
            events,
            libc::AT_FDCWD,
            Some(&c_string(path.as_os_str().as_bytes())?),
        )
    }

    /// Has the file-system marks ask for the content events too, now and on every
    /// file system marked later: for when they cannot be asked for per directory
    /// (the kernel's `max_user_marks` reached). Every change then costs a writer
    /// more, but none goes unheard.
    pub fn hear_contents_everywhere(&mut self) -> io::Result<()> {
        self.file_system_events = NAME_EVENTS | CONTENT_EVENTS;
        for path in self.mounts.values() {
            self.mark_file_system(path, 0, self.file_system_events)?;
        }
        Ok(())
    }

    /// Stops, in the kernel, the events about the entries of the directory `name` in
    /// the directory behind `handle` on the file system `fsid` (an event's entry)
    /// that are not directories themselves (their creation, deletion, renames),
    /// until [`Fanotify::forget_ignores`]. For a caller that
    /// looks at the whole directory anyway, e.g. a new one: a writer filling it
    /// (`tar -x`, `git clone`) no longer pays for an event per file.
    ///
    /// Still reported: events about the directory itself and its subdirectories, and
    /// an entry moved out to a directory not ignored, as `FAN_MOVED_TO` there (its
    /// `FAN_RENAME` and `FAN_MOVED_FROM` are dropped with the rest).
    ///
    /// The directory is found through the handle and then the one name, not through
    /// a path: whatever was renamed or replaced by a symlink above it meanwhile, the
    /// mark lands on the directory now at that name there. A symlink at `name` is
    /// not followed, and anything but a directory fails (`ENOTDIR`). The mark does
    /// not pin the directory in memory (`FAN_MARK_EVICTABLE`): when the kernel
    /// evicts its inode, the events simply come again. Needs Linux 6.0
    /// (`FAN_MARK_IGNORE`); older kernels fail with `EINVAL`.
    pub fn ignore_entries(&self, fsid: Fsid, handle: &FileHandle, name: &[u8]) -> io::Result<()> {
        let parent = self.open_handle(fsid, handle)?;
        self.mark(
            libc::FAN_MARK_ADD
                | libc::FAN_MARK_IGNORE_SURV
                | libc::FAN_MARK_EVICTABLE
                | libc::FAN_MARK_DONT_FOLLOW
                | libc::FAN_MARK_ONLYDIR,
            ENTRY_EVENTS_IGNORED,
            parent.as_raw_fd(),
            Some(&c_string(name)?),
        )
    }

    /// Ignores every event the marks ask for on the whole file system holding
    /// `path`, which must be marked already: nothing is queued any more. Only for
    /// measuring what the file-system mark costs each change before any event is
    /// made (the `fanotify_floor --ignore-all` example; with `--with-contents`,
    /// after [`Fanotify::hear_contents_everywhere`]).
    pub fn ignore_file_system(&self, path: &Path) -> io::Result<()> {
        self.mark_file_system(path, libc::FAN_MARK_IGNORE_SURV, self.file_system_events)
    }

    /// Removes every mark set by [`Fanotify::ignore_entries`]: all their events come
    /// again from now on. (The file system marks stay.)
    pub fn forget_ignores(&self) -> io::Result<()> {
        // Without FAN_MARK_MOUNT or FAN_MARK_FILESYSTEM: the inode marks.
        self.mark(libc::FAN_MARK_FLUSH, 0, libc::AT_FDCWD, None)
    }

    /// `fanotify_mark` on this group: the object is `name` relative to the
    /// directory `dir` (or `AT_FDCWD`); no name only with `FAN_MARK_FLUSH`.
    fn mark(
        &self,
        flags: libc::c_uint,
        mask: u64,
        dir: libc::c_int,
        name: Option<&CStr>,
    ) -> io::Result<()> {
        let name = name.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: `fd` is a fanotify group, `dir` a descriptor (or AT_FDCWD) and
        // `name` null or a NUL-terminated string, all outliving the call.
        check(unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), flags, mask, dir, name) })?;
        Ok(())
    }

    /// How many file systems are marked.
    pub fn file_systems(&self) -> usize {
        self.mounts.len()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Waits up to `timeout` for events and returns what one read gives (possibly
    /// nothing, on timeout).
    pub fn read(&mut self, timeout: Duration) -> io::Result<Vec<Event>> {
        if !crate::wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let n = match rustix::io::read(&self.fd, &mut self.buffer[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => return Ok(Vec::new()),
            Err(err) => return Err(err.into()),
        };
        parse_events(&self.buffer[..n])
    }

    /// The current path of the directory behind `handle` on the file system
    /// `fsid`. Fails (ESTALE) once the directory is gone, which is why callers cache
    /// what they resolved.
    pub fn resolve(&self, fsid: Fsid, handle: &FileHandle) -> io::Result<PathBuf> {
        let fd = self.open_handle(fsid, handle)?;
        let link = rustix::fs::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()), Vec::new())?;
        Ok(PathBuf::from(OsStr::from_bytes(link.as_bytes())))
    }

    /// A descriptor of the directory behind `handle` on the file system `fsid`, one
    /// of this group's; fails like [`Fanotify::resolve`].
    pub fn open_handle(&self, fsid: Fsid, handle: &FileHandle) -> io::Result<OwnedFd> {
        let mount_path = self.mounts.get(&fsid).ok_or_else(|| {
            io::Error::other(format!(
                "an event names file system {fsid:#x}, which is not watched"
            ))
        })?;
        let mount = rustix::fs::open(
            mount_path,
            // Not O_PATH: open_by_handle_at refuses those (EBADF).
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        if fsid_of_statfs(&rustix::fs::fstatfs(&mount)?) != fsid {
            // Unmounted since: what was on it is gone from the tree, like a deleted
            // directory.
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        let header = std::mem::size_of::<libc::file_handle>();
        // u32-aligned storage for `struct file_handle` followed by its bytes.
        let mut storage = vec![0u32; (header + handle.bytes.len()).div_ceil(4)];
        let base = storage.as_mut_ptr().cast::<u8>();
        let handle_bytes = u32::try_from(handle.bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "handle too long"))?;
        // SAFETY: `storage` holds at least `header + bytes.len()` bytes, is aligned for
        // `file_handle` (u32 fields), and we write within those bounds.
        let raw = unsafe {
            let file_handle = base.cast::<libc::file_handle>();
            (*file_handle).handle_bytes = handle_bytes;
            (*file_handle).handle_type = handle.handle_type;
            std::ptr::copy_nonoverlapping(
                handle.bytes.as_ptr(),
                base.add(header),
                handle.bytes.len(),
            );
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                file_handle,
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        let raw = check(raw)?;
        // SAFETY: open_by_handle_at returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// The handle of the directory at `path` (to recognise events in it without
    /// resolving them, e.g. a fence file).
    pub fn handle_of(path: &Path) -> io::Result<FileHandle> {
        handle_at(libc::AT_FDCWD, &c_string(path.as_os_str().as_bytes())?, 0)
    }
}

/// The handle of the file `fd` refers to (any kind of descriptor, `O_PATH` too).
pub fn handle_of_fd(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    handle_at(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

/// The handle of `name` in the directory `dir`, not following a final symlink.
pub fn handle_of_entry(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<FileHandle> {
    handle_at(dir.as_raw_fd(), &c_string(name)?, 0)
}

fn handle_at(dir: libc::c_int, path: &CStr, flags: libc::c_int) -> io::Result<FileHandle> {
    const MAX_HANDLE_SZ: usize = 128;
    let header = std::mem::size_of::<libc::file_handle>();
    let mut storage = vec![0u32; (header + MAX_HANDLE_SZ).div_ceil(4)];
    let base = storage.as_mut_ptr().cast::<u8>();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `storage` is aligned and large enough for a handle of MAX_HANDLE_SZ
    // bytes, announced in handle_bytes; the kernel writes within it. `path` is a
    // NUL-terminated string that outlives the call.
    let (handle_type, len) = unsafe {
        let file_handle = base.cast::<libc::file_handle>();
        (*file_handle).handle_bytes = MAX_HANDLE_SZ as u32;
        check(libc::name_to_handle_at(
            dir,
            path.as_ptr(),
            file_handle,
            &mut mount_id,
            flags,
        ))?;
        (
            (*file_handle).handle_type,
            (*file_handle).handle_bytes as usize,
        )
    };
    let all = &bytemuck_u8(&storage)[header..header + len];
    Ok(FileHandle {
        handle_type,
        bytes: all.to_vec(),
    })
}

fn bytemuck_u8(words: &[u32]) -> &[u8] {
    // SAFETY: any u32 slice is a valid u8 slice of four times the length.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 4) }
}

const METADATA_LEN: usize = 24;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed fanotify event: {what}"),
    )
}

/// Parses a buffer of `struct fanotify_event_metadata` records, each followed by its
/// info records (`fanotify_event_info_fid`: header, fsid, `file_handle`, and for the
/// name types a NUL-terminated name).
pub fn parse_events(buffer: &[u8]) -> io::Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset + METADATA_LEN <= buffer.len() {
        let event_len = u32_at(buffer, offset).ok_or_else(|| malformed("length"))? as usize;
        let metadata_len =
            u16_at(buffer, offset + 6).ok_or_else(|| malformed("metadata length"))? as usize;
        if event_len < METADATA_LEN || offset + event_len > buffer.len() || metadata_len > event_len
        {
            return Err(malformed("lengths out of bounds"));
        }
        let mask = u64_at(buffer, offset + 8).ok_or_else(|| malformed("mask"))?;
        let fd = i32_at(buffer, offset + 16).ok_or_else(|| malformed("fd"))?;
        let pid = i32_at(buffer, offset + 20).ok_or_else(|| malformed("pid"))?;
        if fd >= 0 {
            // Not expected with FID reporting, but never leak a descriptor.
            // SAFETY: the kernel handed us this descriptor with the event.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let event = &buffer[offset..offset + event_len];
        let mut names = Vec::new();
        let mut info = metadata_len;
        while info + 4 <= event.len() {
            let info_type = event[info];
            let info_len =
                u16_at(event, info + 2).ok_or_else(|| malformed("info length"))? as usize;
            if info_len < 4 || info + info_len > event.len() {
                return Err(malformed("info record out of bounds"));
            }
            let record = &event[info..info + info_len];
            let role = match info_type {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME => Some(NameRole::Entry),
                libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => Some(NameRole::Old),
                libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => Some(NameRole::New),
                _ => None,
            };
            if let Some(role) = role {
                // header (4) + fsid (8), then struct file_handle.
                let handle_bytes =
                    u32_at(record, 12).ok_or_else(|| malformed("handle size"))? as usize;
                let handle_type = i32_at(record, 16).ok_or_else(|| malformed("handle type"))?;
                let handle_end = 20 + handle_bytes;
                let handle = record
                    .get(20..handle_end)
                    .ok_or_else(|| malformed("handle"))?;
                let name_area = record.get(handle_end..).ok_or_else(|| malformed("name"))?;
                let name_len = name_area
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_area.len());
                names.push(DirEntryName {
                    role,
                    fsid: u64_at(record, 4).ok_or_else(|| malformed("fsid"))?,
                    dir: FileHandle {
                        handle_type,
                        bytes: handle.to_vec(),
                    },
                    name: name_area[..name_len].to_vec(),
                });
            }
            info += info_len;
        }
        events.push(Event { mask, pid, names });
        offset += event_len;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one event the way the kernel lays it out.
    fn event(mask: u64, records: &[(u8, &[u8], &[u8])]) -> Vec<u8> {
        let mut infos = Vec::new();
        for (info_type, handle, name) in records {
            let mut record = vec![*info_type, 0, 0, 0];
            record.extend_from_slice(&[0u8; 8]); // fsid
            record.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
            record.extend_from_slice(&1i32.to_ne_bytes());
            record.extend_from_slice(handle);
            record.extend_from_slice(name);
            record.push(0);
            while record.len() % 4 != 0 {
                record.push(0);
            }
            let len = record.len() as u16;
            record[2..4].copy_from_slice(&len.to_ne_bytes());
            infos.extend(record);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((METADATA_LEN + infos.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&[3, 0]);
        out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&42i32.to_ne_bytes());
        out.extend(infos);
        out
    }

    #[test]
    fn parses_names_and_renames() {
        let mut buffer = event(
            FAN_CREATE,
            &[(
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                b"dirA1234",
                b"new file",
            )],
        );
        buffer.extend(event(
            FAN_RENAME | FAN_ONDIR,
            &[
                (libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, b"dirA1234", b"old"),
                (
                    libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
                    b"dirB5678",
                    b"n\xffew",
                ),
            ],
        ));
        let events = parse_events(&buffer).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].pid, 42);
        assert_eq!(events[0].names[0].name, b"new file");
        assert_eq!(events[0].names[0].dir.bytes, b"dirA1234");
        assert!(events[1].is_dir());
        assert_eq!(events[1].names[0].role, NameRole::Old);
        assert_eq!(events[1].names[1].role, NameRole::New);
        assert_eq!(events[1].names[1].name, b"n\xffew");
    }

    #[test]
    fn refuses_truncated_buffers() {
        let mut buffer = event(
            FAN_CREATE,
            &[(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, b"dirA1234", b"x")],
        );
        buffer[0] = 200; // event_len beyond the buffer
        assert!(parse_events(&buffer).is_err());
    }

    /// The real kernel: a file created, written, renamed and deleted in a watched
    /// directory, each seen with the right directory and name.
    #[test]
    fn the_kernel_reports_names_and_directory_handles() {
        let temp = tempfile::tempdir().unwrap();
        let mut group = Fanotify::watch_filesystem(temp.path()).unwrap();
        let dir = temp.path().join("sub");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), "x").unwrap();
        std::fs::rename(dir.join("a"), temp.path().join("b")).unwrap();
        std::fs::remove_file(temp.path().join("b")).unwrap();
        let sub_handle = Fanotify::handle_of(&dir).unwrap();

        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen
            .iter()
            .any(|e: &Event| e.mask & FAN_DELETE != 0 && e.names.iter().any(|n| n.name == b"b"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "events never arrived: {seen:?}"
            );
            seen.extend(group.read(Duration::from_millis(200)).unwrap());
        }
        // Events from elsewhere on the file system arrive too; look for ours.
        let create = seen
            .iter()
            .find(|e| {
                e.mask & FAN_CREATE != 0
                    && e.names
                        .iter()
                        .any(|n| n.name == b"a" && n.dir == sub_handle)
            })
            .expect("a create of sub/a");
        assert!(!create.is_dir());
        let rename = seen
            .iter()
            .find(|e| {
                e.mask & FAN_RENAME != 0
                    && e.names
                        .iter()
                        .any(|n| n.role == NameRole::Old && n.name == b"a")
            })
            .expect("a rename from sub/a");
        let new = rename
            .names
            .iter()
            .find(|n| n.role == NameRole::New)
            .unwrap();
        assert_eq!(new.name, b"b");
        let fsid = fsid_of(temp.path()).unwrap();
        assert_eq!(new.fsid, fsid, "the event's fsid is the one statfs reports");
        assert_eq!(
            group.resolve(new.fsid, &new.dir).unwrap(),
            temp.path().canonicalize().unwrap()
        );
        assert_eq!(
            group.resolve(fsid, &sub_handle).unwrap(),
            dir.canonicalize().unwrap()
        );
    }

    /// Reads events until one names `end` in `dir`.
    fn events_until(group: &mut Fanotify, dir: &FileHandle, end: &[u8]) -> Vec<Event> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen
            .iter()
            .any(|e: &Event| e.names.iter().any(|n| n.name == end && &n.dir == dir))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the event for {} never arrived: {seen:?}",
                String::from_utf8_lossy(end)
            );
            seen.extend(group.read(Duration::from_millis(200)).unwrap());
        }
        seen
    }

    fn names_in(events: &[Event], dir: &FileHandle, name: &[u8]) -> u64 {
        events
            .iter()
            .filter(|e| e.names.iter().any(|n| n.name == name && &n.dir == dir))
            .fold(0, |mask, e| mask | e.mask)
    }

    #[test]
    fn ignored_entries_are_silent_until_the_ignores_are_forgotten() {
        let temp = tempfile::tempdir().unwrap();
        let top = temp.path().canonicalize().unwrap();
        let mut group = Fanotify::watch_filesystem(&top).unwrap();
        let fsid = fsid_of(&top).unwrap();
        let new = top.join("new");
        std::fs::create_dir(&new).unwrap();
        let (top_handle, new_handle) = (
            Fanotify::handle_of(&top).unwrap(),
            Fanotify::handle_of(&new).unwrap(),
        );
        group.ignore_entries(fsid, &top_handle, b"new").unwrap();

        std::fs::write(new.join("a"), "x").unwrap();
        std::fs::write(new.join("moved"), "x").unwrap();
        std::fs::rename(new.join("moved"), top.join("out")).unwrap();
        std::fs::create_dir(new.join("sub")).unwrap();
        std::fs::write(new.join("sub").join("b"), "x").unwrap();
        let sub_handle = Fanotify::handle_of(&new.join("sub")).unwrap();
        std::fs::write(top.join("end1"), "x").unwrap();
        let events = events_until(&mut group, &top_handle, b"end1");
        assert_eq!(names_in(&events, &new_handle, b"a"), 0, "{events:?}");
        assert_eq!(names_in(&events, &new_handle, b"moved"), 0, "{events:?}");
        assert_eq!(
            names_in(&events, &top_handle, b"out"),
            FAN_MOVED_TO,
            "moved out: only the destination's half comes: {events:?}"
        );
        assert_ne!(
            names_in(&events, &new_handle, b"sub") & FAN_ONDIR,
            0,
            "a subdirectory's creation still comes: {events:?}"
        );
        assert_ne!(names_in(&events, &sub_handle, b"b"), 0, "{events:?}");

        group.forget_ignores().unwrap();
        std::fs::write(new.join("c"), "x").unwrap();
        std::fs::write(top.join("end2"), "x").unwrap();
        let events = events_until(&mut group, &top_handle, b"end2");
        assert_ne!(
            names_in(&events, &new_handle, b"c") & FAN_CREATE,
            0,
            "{events:?}"
        );

        // Found through the handle, not the path: `p` renamed and a new `p` made,
        // the mark lands on the directory that was `p/inner`.
        std::fs::create_dir_all(top.join("p/inner")).unwrap();
        let p_handle = Fanotify::handle_of(&top.join("p")).unwrap();
        std::fs::rename(top.join("p"), top.join("q")).unwrap();
        std::fs::create_dir_all(top.join("p/inner")).unwrap();
        group.ignore_entries(fsid, &p_handle, b"inner").unwrap();
        std::fs::write(top.join("q/inner/x"), "x").unwrap();
        std::fs::write(top.join("p/inner/y"), "y").unwrap();
        std::fs::write(top.join("end3"), "x").unwrap();
        let events = events_until(&mut group, &top_handle, b"end3");
        let moved = Fanotify::handle_of(&top.join("q/inner")).unwrap();
        let other = Fanotify::handle_of(&top.join("p/inner")).unwrap();
        assert_eq!(names_in(&events, &moved, b"x"), 0, "{events:?}");
        assert_ne!(names_in(&events, &other, b"y"), 0, "{events:?}");

        std::fs::write(top.join("file"), "x").unwrap();
        let refused = group
            .ignore_entries(fsid, &top_handle, b"file")
            .unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOTDIR), "{refused}");
        std::os::unix::fs::symlink(&new, top.join("link")).unwrap();
        let refused = group
            .ignore_entries(fsid, &top_handle, b"link")
            .unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOTDIR), "{refused}");
    }
}
