//! Every open and exec of a file on chosen file systems, with the pid that did it:
//! fanotify FAN_OPEN | FAN_OPEN_EXEC in descriptor mode.
//!
//! The agent uses this to learn which processes use a file between /proc scans: a
//! process that opens a config file once at start-up and closes it leaves no trace
//! in /proc, but it must be restarted when that file changes.
//!
//! Descriptor mode, unlike the FID mode of [`crate::fanotify`]: the kernel opens the
//! file for us and passes the descriptor with the event, and one `fstat` gives the
//! (device, inode) that the rest of vdsync matches files by, with no handle to
//! resolve. The price is an open, an fstat and a close per event, and that every
//! read can create as many descriptors as events fit in the buffer, which is why the
//! buffer is sized from the descriptor limit.
//!
//! Not for: changes to files (that is [`crate::fanotify`]), or anything permission
//! related (`FAN_CLASS_NOTIF`: the opener never waits for us).

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::process::FileId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenEvent {
    pub pid: i32,
    pub file: FileId,
    /// Which life of the inode was opened (see [`crate::process::Incarnation`]).
    pub incarnation: crate::process::Incarnation,
    /// Opened for execution (FAN_OPEN_EXEC).
    pub exec: bool,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct OpenBatch {
    pub events: Vec<OpenEvent>,
    /// Opens were lost: the kernel's queue overflowed, or the kernel could not give
    /// us a descriptor for an event because we ran out of them. The caller should
    /// rescan /proc.
    pub overflowed: bool,
}

pub struct OpenEvents {
    group: OwnedFd,
    /// Room for [`OpenEvents::events_per_read`] events of 24 bytes.
    buffer: Vec<u8>,
    /// Our own pid, whose opens are left out.
    own_pid: i32,
    /// The group reports a failed open as a negative errno in the event's `fd`
    /// (`FAN_REPORT_FD_ERROR`, Linux 6.13) instead of failing the read.
    reports_fd_errors: bool,
    /// File systems marked for every open so far (by device).
    marked_devices: HashSet<u64>,
    /// File systems marked for executions only.
    exec_only_devices: HashSet<u64>,
}

/// `FAN_REPORT_FD_ERROR` from linux/fanotify.h (6.13), missing from libc. Without
/// it, a file the kernel cannot open for us fails the whole read() with that error
/// and the event is gone; with it, the event arrives with `fd = -errno`.
const FAN_REPORT_FD_ERROR: libc::c_uint = 0x0000_2000;

/// `struct fanotify_event_metadata`: event_len (u32), vers (u8), reserved (u8),
/// metadata_len (u16), mask (u64), fd (i32), pid (i32).
const METADATA_LEN: usize = 24;

/// Events per read at most. Each event in a read becomes a new descriptor in this
/// process before we see any of them, so a read must fit in the descriptor limit
/// along with everything else the process holds.
const MAX_EVENTS_PER_READ: usize = 1024;

/// Reads per call at most: enough to drain the kernel's default queue (16384
/// events) several times over, while a process opening files in a tight loop cannot
/// keep one call reading forever.
const MAX_READS_PER_CALL: usize = 64;

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl OpenEvents {
    /// One group marking the whole file system of each path (FAN_MARK_FILESYSTEM).
    ///
    /// Needs CAP_SYS_ADMIN. The queue is the kernel's default (16384 events), not
    /// `FAN_UNLIMITED_QUEUE`: a reader that falls behind gets [`OpenBatch::overflowed`]
    /// instead of kernel memory growing without bound.
    pub fn watch_filesystems(paths: &[&Path]) -> io::Result<OpenEvents> {
        let (group, reports_fd_errors) = create_group()?;
        let mut events = OpenEvents {
            group,
            buffer: vec![0u8; events_per_read() * METADATA_LEN],
            own_pid: std::process::id() as i32,
            reports_fd_errors,
            marked_devices: HashSet::new(),
            exec_only_devices: HashSet::new(),
        };
        for path in paths {
            events.also_watch(path)?;
        }
        Ok(events)
    }

    /// Marks the file system holding `path` too; false if it was already marked.
    pub fn also_watch(&mut self, path: &Path) -> io::Result<bool> {
        self.mark(path, libc::FAN_OPEN | libc::FAN_OPEN_EXEC)
    }

    /// Marks the file system holding `path` for executions only (`FAN_OPEN_EXEC`):
    /// every exec is then seen, whichever file system the program is on, while
    /// plain opens are reported only where [`OpenEvents::also_watch`] asked.
    pub fn also_watch_execs(&mut self, path: &Path) -> io::Result<bool> {
        self.mark(path, libc::FAN_OPEN_EXEC)
    }

    fn mark(&mut self, path: &Path, mask: u64) -> io::Result<bool> {
        // Two paths on one file system would add the same mark twice: harmless,
        // but a wasted call. A file system marked for every open is marked for
        // executions too.
        let device = rustix::fs::stat(path)?.st_dev;
        let opens = mask & libc::FAN_OPEN != 0;
        if self.marked_devices.contains(&device)
            || (!opens && self.exec_only_devices.contains(&device))
        {
            return Ok(false);
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: `group` is a fanotify group, `c_path` a NUL-terminated path that
        // outlives the call.
        check(unsafe {
            libc::fanotify_mark(
                self.group.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                mask,
                libc::AT_FDCWD,
                c_path.as_ptr(),
            )
        })?;
        if opens {
            self.marked_devices.insert(device);
        } else {
            self.exec_only_devices.insert(device);
        }
        Ok(true)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.group.as_fd()
    }

    /// How many events one read() may return (and so how many descriptors the
    /// kernel may create in this process at once).
    pub fn events_per_read(&self) -> usize {
        self.buffer.len() / METADATA_LEN
    }

    /// Waits up to `timeout`; opens by the calling process itself are left out.
    ///
    /// Once readable, reads until the queue is empty (or a bound is reached, the rest
    /// waiting for the next call). Opens of files the kernel could not open for us
    /// (device nodes that refuse, files gone on a network file system) are skipped:
    /// there is no file to report.
    pub fn read(&mut self, timeout: Duration) -> io::Result<OpenBatch> {
        let mut batch = OpenBatch::default();
        if !crate::wait_readable(self.group.as_fd(), timeout)? {
            return Ok(batch);
        }
        for _ in 0..MAX_READS_PER_CALL {
            match rustix::io::read(&self.group, &mut self.buffer[..]) {
                Ok(0) => break,
                Ok(len) => self.take_events(len, &mut batch)?,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => {}
                // Without FAN_REPORT_FD_ERROR, an event whose file the kernel could
                // not open fails the read (when it comes first) and is dropped; the
                // next read goes on with the following events.
                Err(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE) => {
                    batch.overflowed = true;
                }
                Err(err) if !self.reports_fd_errors && !is_fatal(err) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(batch)
    }

    /// Turns the first `len` bytes of the buffer into events, closing every
    /// descriptor they carry.
    fn take_events(&self, len: usize, batch: &mut OpenBatch) -> io::Result<()> {
        let parsed = parse_metadata(&self.buffer[..len]);
        for record in &parsed.records {
            let descriptor = if record.fd >= 0 {
                // SAFETY: the kernel created this descriptor for us with the event;
                // nothing else refers to it. Owning it closes it at the end of the
                // iteration whatever happens.
                Some(unsafe { OwnedFd::from_raw_fd(record.fd) })
            } else {
                None
            };
            if record.mask & libc::FAN_Q_OVERFLOW != 0 {
                batch.overflowed = true;
                continue;
            }
            // Pid 0: the opener is outside our pid namespace, so there is no process
            // we could name.
            if record.pid == self.own_pid || record.pid == 0 {
                continue;
            }
            let Some(descriptor) = descriptor else {
                // FAN_REPORT_FD_ERROR: the kernel could not open the file for us.
                if matches!(-record.fd, libc::EMFILE | libc::ENFILE) {
                    batch.overflowed = true;
                }
                continue;
            };
            let Ok(stat) = rustix::fs::fstat(&descriptor) else {
                continue;
            };
            // FAN_ONDIR is not asked for, so directories should not come; if one
            // does, it is not a file a process could need restarting for.
            if crate::is_dir(&stat) {
                continue;
            }
            batch.events.push(OpenEvent {
                pid: record.pid,
                file: FileId {
                    dev: stat.st_dev,
                    ino: stat.st_ino,
                },
                incarnation: crate::process::incarnation_of_fd(descriptor.as_fd()),
                exec: record.mask & libc::FAN_OPEN_EXEC != 0,
            });
        }
        // After the loop, so that every descriptor before a malformed record is
        // closed.
        match parsed.malformed {
            Some(what) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed fanotify event: {what}"),
            )),
            None => Ok(()),
        }
    }
}

/// Creates the group, with the most useful flags the kernel accepts.
///
/// `O_PATH` descriptors would be cheaper (no permission check, no driver open), but
/// fanotify_init refuses them (EINVAL, still in Linux 6.18); it is tried first in
/// case a kernel learns it. `O_NONBLOCK` keeps the kernel's open for us from waiting
/// for a FIFO's writer or a serial line's carrier; we only fstat the descriptor.
/// `O_CLOEXEC` keeps event descriptors out of children spawned meanwhile.
fn create_group() -> io::Result<(OwnedFd, bool)> {
    let base = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
    let path_only = libc::O_PATH | libc::O_CLOEXEC;
    let readable = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_LARGEFILE;
    let attempts = [
        (base | FAN_REPORT_FD_ERROR, path_only),
        (base | FAN_REPORT_FD_ERROR, readable),
        (base, path_only),
        (base, readable),
    ];
    let mut last_error = io::Error::from_raw_os_error(libc::EINVAL);
    for (flags, event_flags) in attempts {
        // SAFETY: fanotify_init takes two flag words and returns a new descriptor or -1.
        match check(unsafe { libc::fanotify_init(flags, event_flags as libc::c_uint) }) {
            Ok(raw) => {
                // SAFETY: `raw` is a new descriptor that nothing else owns.
                let group = unsafe { OwnedFd::from_raw_fd(raw) };
                return Ok((group, flags & FAN_REPORT_FD_ERROR != 0));
            }
            // EINVAL: a flag this kernel does not know; try with fewer.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => last_error = err,
            Err(err) => return Err(err),
        }
    }
    Err(last_error)
}

/// Events per read: a quarter of the soft descriptor limit, so that one read cannot
/// exhaust it, between 16 and [`MAX_EVENTS_PER_READ`].
fn events_per_read() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(limit / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_EVENTS_PER_READ)
}

/// Errors of read() that are about the group or our buffer, not about one event.
fn is_fatal(err: rustix::io::Errno) -> bool {
    matches!(
        err,
        rustix::io::Errno::BADF | rustix::io::Errno::FAULT | rustix::io::Errno::INVAL
    )
}

/// One `struct fanotify_event_metadata`, the descriptor not yet owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Metadata {
    mask: u64,
    fd: i32,
    pid: i32,
}

/// The records of one read, and what was wrong with the first record that could not
/// be parsed, if any (nothing after it can be found).
#[derive(Debug, Default, PartialEq, Eq)]
struct ParsedBuffer {
    records: Vec<Metadata>,
    malformed: Option<&'static str>,
}

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

/// Splits a read's bytes into event records (safe code over bytes; the descriptors
/// are only numbers here).
fn parse_metadata(buffer: &[u8]) -> ParsedBuffer {
    let mut parsed = ParsedBuffer::default();
    let mut offset = 0;
    while offset < buffer.len() {
        let record = &buffer[offset..];
        let (Some(event_len), Some(version), Some(metadata_len)) =
            (u32_at(record, 0), record.get(4).copied(), u16_at(record, 6))
        else {
            parsed.malformed = Some("truncated header");
            break;
        };
        let event_len = event_len as usize;
        if version != libc::FANOTIFY_METADATA_VERSION {
            parsed.malformed = Some("unknown metadata version");
            break;
        }
        if event_len < METADATA_LEN
            || event_len > record.len()
            || usize::from(metadata_len) < METADATA_LEN
            || usize::from(metadata_len) > event_len
        {
            parsed.malformed = Some("lengths out of bounds");
            break;
        }
        let (Some(mask), Some(fd), Some(pid)) =
            (u64_at(record, 8), i32_at(record, 16), i32_at(record, 20))
        else {
            parsed.malformed = Some("truncated header");
            break;
        };
        parsed.records.push(Metadata { mask, fd, pid });
        offset += event_len;
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Command};
    use std::time::Instant;

    fn record(mask: u64, fd: i32, pid: i32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(METADATA_LEN as u32).to_ne_bytes());
        out.push(libc::FANOTIFY_METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&fd.to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out
    }

    #[test]
    fn parses_records_and_stops_at_garbage() {
        let open = record(libc::FAN_OPEN, 7, 42);
        let exec = record(libc::FAN_OPEN | libc::FAN_OPEN_EXEC, 8, 43);
        let overflow = record(libc::FAN_Q_OVERFLOW, -1, 0);
        assert_eq!(
            parse_metadata(&[open.clone(), exec, overflow].concat()),
            ParsedBuffer {
                records: vec![
                    Metadata {
                        mask: libc::FAN_OPEN,
                        fd: 7,
                        pid: 42
                    },
                    Metadata {
                        mask: libc::FAN_OPEN | libc::FAN_OPEN_EXEC,
                        fd: 8,
                        pid: 43
                    },
                    Metadata {
                        mask: libc::FAN_Q_OVERFLOW,
                        fd: -1,
                        pid: 0
                    },
                ],
                malformed: None,
            }
        );
        // The good record before a bad one is kept, so its descriptor gets closed.
        let mut zero_length = record(libc::FAN_OPEN, 9, 44);
        zero_length[0..4].copy_from_slice(&0u32.to_ne_bytes());
        let parsed = parse_metadata(&[open.clone(), zero_length].concat());
        assert_eq!(parsed.records.len(), 1);
        assert_eq!(parsed.malformed, Some("lengths out of bounds"));
        let mut old_version = open.clone();
        old_version[4] = 2;
        assert_eq!(
            parse_metadata(&old_version).malformed,
            Some("unknown metadata version")
        );
        assert_eq!(
            parse_metadata(&open[..10]).malformed,
            Some("lengths out of bounds")
        );
    }

    /// Reads until an event matches or 10 s pass, then fails naming `what`.
    fn wait_for(
        group: &mut OpenEvents,
        what: &str,
        matches: impl Fn(&OpenEvent) -> bool,
    ) -> (OpenEvent, Vec<OpenEvent>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            if let Some(event) = seen.iter().find(|event| matches(event)) {
                return (*event, seen);
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 10 s ({} other events seen)",
                seen.len()
            );
            let batch = group.read(Duration::from_millis(100)).expect("read");
            assert!(
                !batch.overflowed,
                "the queue overflowed while waiting for {what}"
            );
            seen.extend(batch.events);
        }
    }

    fn file_id(path: &Path) -> FileId {
        let metadata = std::fs::metadata(path).expect("stat");
        FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }

    fn finish(mut child: Child) {
        let status = child.wait().expect("wait");
        assert!(status.success(), "child failed: {status}");
    }

    /// The real kernel: `cat FILE` is seen opening the file, and a program copied
    /// into the directory is seen being executed.
    #[test]
    fn the_kernel_reports_opens_and_execs_of_other_processes() {
        let temp = tempfile::tempdir().expect("tempdir");
        let file = temp.path().join("config");
        std::fs::write(&file, "x").expect("write");
        let program = temp.path().join("program");
        // cp in a child, not std::fs::copy here: a write descriptor open in this
        // multi-threaded test process could be inherited by a child another test
        // spawns meanwhile, and exec of the copy would fail with ETXTBSY.
        let status = Command::new("/bin/cp")
            .arg("/bin/true")
            .arg(&program)
            .status()
            .expect("cp");
        assert!(status.success());
        let mut group =
            OpenEvents::watch_filesystems(&[temp.path(), temp.path()]).expect("watch (needs root)");

        let cat = Command::new("/bin/cat")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn cat");
        let cat_pid = cat.id() as i32;
        finish(cat);
        let file = file_id(&file);
        let (open, _) = wait_for(&mut group, "open by cat", |event| {
            event.pid == cat_pid && event.file == file
        });
        assert!(!open.exec);

        let run = Command::new(&program).spawn().expect("run the copy");
        let run_pid = run.id() as i32;
        finish(run);
        let program = file_id(&program);
        wait_for(&mut group, "exec of the copied program", |event| {
            event.pid == run_pid && event.file == program && event.exec
        });
    }

    /// Our own opens are left out: an open of ours followed by a fence open by a
    /// child; once the fence arrives, ours would have too (the queue is in order).
    #[test]
    fn our_own_opens_are_left_out() {
        let temp = tempfile::tempdir().expect("tempdir");
        let ours = temp.path().join("ours");
        let fence = temp.path().join("fence");
        std::fs::write(&ours, "x").expect("write");
        std::fs::write(&fence, "x").expect("write");
        let mut group = OpenEvents::watch_filesystems(&[temp.path()]).expect("watch (needs root)");

        drop(std::fs::File::open(&ours).expect("open"));
        let cat = Command::new("/bin/cat")
            .arg(&fence)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn cat");
        let cat_pid = cat.id() as i32;
        finish(cat);
        let fence = file_id(&fence);
        let ours = file_id(&ours);
        let (_, seen) = wait_for(&mut group, "the fence open", |event| {
            event.pid == cat_pid && event.file == fence
        });
        let own_pid = std::process::id() as i32;
        assert!(
            !seen
                .iter()
                .any(|event| event.file == ours || event.pid == own_pid),
            "our own open was reported"
        );
    }
}
