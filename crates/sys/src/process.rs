//! Reading processes from /proc, capturing what it takes to start one again, and
//! starting it again detached.
//!
//! Three jobs live here, all thin over the kernel:
//!
//! - **Reading** (`list_pids`, `process_key`, `process_files`): which files a process
//!   runs, maps and holds open, as (device, inode) pairs, so the agent can tell which
//!   processes a version touches. Every read of one process goes through a single
//!   descriptor of its `/proc/PID` directory: if the pid is reused halfway, the
//!   reads fail instead of silently mixing two processes.
//! - **Capturing and restoring** (`capture_restore`, `spawn_restored`): the paper's
//!   Table 5 (executable, argv, environment, root, working directory, user and
//!   groups, umask, resource limits, standard descriptors), and a fresh start with
//!   exactly that and nothing inherited from the agent.
//! - **Signalling and waiting** (`signal_process`, `is_alive`, `wait_exit`) by
//!   [`ProcessKey`], through pidfds, so that a reused pid is never signalled.
//!
//! What it is not for: deciding which processes to stop (that is `agent`'s plan,
//! a pure function over [`ProcessFiles`]), or following process births (that is
//! `proc_events`).
//!
//! Known limits of what /proc can tell: a process that rewrote its argv
//! (`setproctitle`, nginx, postgres) shows the rewritten one; /proc/PID/environ is
//! the environment it was started with, not later `setenv` calls; signal
//! dispositions (a `nohup`'d SIGHUP ignore), capabilities, the scheduling policy and
//! namespaces are not part of the Table 5 spec and are not restored. The agent
//! prefers what it recorded at exec time when it has it.

use std::collections::{BTreeSet, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procfs::process::{Stat, Status};
use procfs::{FromRead, ProcError, ProcessCGroups};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Resource, Signal};
use serde::{Deserialize, Serialize};

/// A file as the kernel knows it: device and inode. Processes are matched with the
/// files being replaced by this, never by path string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(stat: &rustix::fs::Stat) -> FileId {
        FileId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }
}

/// Which life of an inode a descriptor or directory entry refers to, for telling a
/// file from an earlier, deleted one that had the same inode number: a hash of its
/// file handle, which on file systems that hand out handles (ext4, xfs, btrfs,
/// tmpfs) includes the inode's generation. 0 means unknown (no handles there).
pub type Incarnation = u64;

/// The [`Incarnation`] of the file `fd` refers to.
pub fn incarnation_of_fd(fd: BorrowedFd<'_>) -> Incarnation {
    crate::fanotify::handle_of_fd(fd).map_or(0, |handle| incarnation(&handle))
}

/// The [`Incarnation`] of `name` in `dir` (a final symlink is not followed).
pub fn incarnation_of_entry(dir: BorrowedFd<'_>, name: &[u8]) -> Incarnation {
    crate::fanotify::handle_of_entry(dir, name).map_or(0, |handle| incarnation(&handle))
}

fn incarnation(handle: &crate::fanotify::FileHandle) -> Incarnation {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same handle gives the same value in every run.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    handle.hash(&mut hasher);
    hasher.finish().max(1)
}

/// A process identity that a reused pid never matches: pid plus start time (clock
/// ticks after boot, /proc/PID/stat field 22).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ProcessKey {
    pub pid: i32,
    pub start_time: u64,
}

/// What /proc shows of one process's files, for classification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessFiles {
    pub key: ProcessKey,
    pub parent: i32,
    /// Short name (`comm`), for messages.
    pub name: String,
    /// The executable (`/proc/PID/exe`), if it has one (kernel threads do not).
    pub exe: Option<FileId>,
    /// Files mapped into memory (`/proc/PID/maps` device and inode columns).
    pub mapped: Vec<FileId>,
    /// Files open on descriptors (`/proc/PID/fd`).
    pub open: Vec<FileId>,
    /// The process catches SIGHUP (SigCgt), so SIGHUP does not kill it.
    pub catches_hangup: bool,
    /// The process ignores SIGHUP (SigIgn).
    pub ignores_hangup: bool,
    /// It has a controlling terminal and leads its session (a login shell) or is
    /// in the terminal's foreground process group (what someone is typing at):
    /// SIGHUP or a stop would hang up a person's session.
    pub interactive: bool,
    /// The systemd unit from /proc/PID/cgroup, if the process is in one; read
    /// only when systemd is init (the only case where it is used).
    pub systemd_unit: Option<String>,
}

/// Where a standard descriptor of a process pointed when it was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioTarget {
    /// `/dev/null`, or anything that cannot be reopened (a pipe, a socket, a
    /// terminal that is gone): the restarted process gets `/dev/null`.
    Null,
    /// A regular file, reopened for appending (stdout, stderr) or reading (stdin).
    /// The path is as the agent sees it (not inside the process's root): the agent
    /// opens it before the new process enters its root.
    File(PathBuf),
}

/// One resource limit (`RLIMIT_*` number, soft, hard; `u64::MAX` is infinity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Everything needed to start a stopped process again as it was (the paper's
/// Table 5). Byte strings are kept as bytes: argv and environment need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The executable, as a path inside `root`.
    pub exe: PathBuf,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    /// Root directory (`/proc/PID/root`) as seen from the agent.
    pub root: PathBuf,
    /// Working directory as a path inside `root`.
    pub cwd: PathBuf,
    /// Real, effective, saved.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    pub groups: Vec<u32>,
    pub umask: u32,
    pub limits: Vec<Limit>,
    pub stdio: [StdioTarget; 3],
}

/// Every resource limit Linux has, in `RLIMIT_*` order. Captured and restored all
/// together: a limit left out would silently become the agent's.
const RESOURCES: [Resource; 16] = [
    Resource::Cpu,
    Resource::Fsize,
    Resource::Data,
    Resource::Stack,
    Resource::Core,
    Resource::Rss,
    Resource::Nproc,
    Resource::Nofile,
    Resource::Memlock,
    Resource::As,
    Resource::Locks,
    Resource::Sigpending,
    Resource::Msgqueue,
    Resource::Nice,
    Resource::Rtprio,
    Resource::Rttime,
];

/// What the kernel appends to a magic link whose target was unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Every process id now in /proc (thread-group leaders only).
pub fn list_pids() -> io::Result<Vec<i32>> {
    // /proc lists thread-group leaders only; threads are reachable by number but
    // not listed. Reading names is enough: procfs's `all_processes` would open a
    // descriptor per process for nothing.
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// The identity of `pid` now (its start time read from /proc).
pub fn process_key(pid: i32) -> io::Result<ProcessKey> {
    let stat = read_stat(pid)?;
    Ok(ProcessKey {
        pid,
        start_time: stat.starttime,
    })
}

/// The parent of `pid`.
pub fn parent_of(pid: i32) -> io::Result<i32> {
    Ok(read_stat(pid)?.ppid)
}

/// Reads the files of one process. Fails with `NotFound` if it has exited.
pub fn process_files(pid: i32) -> io::Result<ProcessFiles> {
    let dir = ProcDir::open(pid)?;
    let stat: Stat = dir.parse("stat")?;
    // The agent reads every process on the machine for every version that replaces
    // a file, so this is on the apply path: kernel threads stop here, and maps and
    // status are scanned for the few columns needed instead of parsed whole
    // (a big process has thousands of mappings).
    if stat.flags & PF_KTHREAD != 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} is a kernel thread"),
        ));
    }
    let status = dir.read("status")?;
    // A zombie has no executable and no mappings: it reads as "not found" here,
    // and `confirm_alive` below tells it from a process that is gone.
    let exe = dir.file_id("exe")?;
    let mapped = mapped_files(&dir.read("maps")?);
    let open = dir.open_files()?;
    // The unit matters only when systemd runs the machine.
    let cgroup = if systemd_is_init_cached() {
        dir.read("cgroup")?
    } else {
        Vec::new()
    };
    dir.confirm_alive()?;
    let hangup_bit = 1u64 << (libc::SIGHUP - 1);
    let mask = |name: &str| status_mask(&status, name).unwrap_or(0);
    Ok(ProcessFiles {
        key: ProcessKey {
            pid,
            start_time: stat.starttime,
        },
        parent: stat.ppid,
        name: stat.comm,
        exe,
        mapped,
        open,
        catches_hangup: mask("SigCgt:") & hangup_bit != 0,
        ignores_hangup: mask("SigIgn:") & hangup_bit != 0,
        interactive: stat.tty_nr != 0 && (stat.session == pid || stat.tpgid == stat.pgrp),
        systemd_unit: systemd_unit_of(&String::from_utf8_lossy(&cgroup)),
    })
}

/// The systemd unit `pid` runs in, from /proc/PID/cgroup.
pub fn systemd_unit(pid: i32) -> io::Result<Option<String>> {
    let dir = ProcDir::open(pid)?;
    let cgroup = dir.read("cgroup")?;
    Ok(systemd_unit_of(&String::from_utf8_lossy(&cgroup)))
}

fn systemd_is_init_cached() -> bool {
    static SYSTEMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYSTEMD.get_or_init(systemd_is_init)
}

/// `PF_KTHREAD` in /proc/PID/stat's flags (include/linux/sched.h).
const PF_KTHREAD: u32 = 0x0020_0000;

/// The files mapped, from the text of /proc/PID/maps: lines of
/// `start-end perms offset major:minor inode [path]`, device in hex. Inode 0 is
/// anonymous memory, heap, stack, vdso. Shared anonymous memory and memfds carry
/// inodes of internal file systems; they match no file a version replaces, so
/// keeping them is harmless. Sorted, without duplicates.
fn mapped_files(maps: &[u8]) -> Vec<FileId> {
    let mut mapped: Vec<FileId> = maps
        .split(|byte| *byte == b'\n')
        .filter_map(|line| {
            let mut fields = line
                .split(|byte| *byte == b' ')
                .filter(|field| !field.is_empty());
            let device = fields.nth(3)?;
            let inode: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
            if inode == 0 {
                return None;
            }
            let device = std::str::from_utf8(device).ok()?;
            let (major, minor) = device.split_once(':')?;
            Some(FileId {
                // stat() reports the same device in the dev_t encoding.
                dev: rustix::fs::makedev(
                    u32::from_str_radix(major, 16).ok()?,
                    u32::from_str_radix(minor, 16).ok()?,
                ),
                ino: inode,
            })
        })
        .collect();
    mapped.sort();
    mapped.dedup();
    mapped
}

/// A hexadecimal signal mask line of /proc/PID/status (`SigCgt:\t0000000000004a02`).
fn status_mask(status: &[u8], name: &str) -> Option<u64> {
    let text = std::str::from_utf8(status).ok()?;
    let line = text.lines().find(|line| line.starts_with(name))?;
    u64::from_str_radix(line[name.len()..].trim(), 16).ok()
}

/// Captures what it takes to start `pid` again. The caller may replace `cwd`,
/// `argv` and `env` with what it recorded at exec time, when it has that: /proc
/// shows a rewritten argv and the environment the process started with.
///
/// Paths are expressed inside the process's root. If the executable is not inside
/// its root, the process entered that root itself after it started (a daemon that
/// chroots itself): then the spec starts it from the agent's root (`/`) with the
/// paths as the agent sees them, and the process chroots itself again.
pub fn capture_restore(pid: i32) -> io::Result<RestoreSpec> {
    let dir = ProcDir::open(pid)?;
    let status: Status = dir.parse("status")?;
    let exe = match dir.readlink("exe") {
        Ok(link) => undeleted(link, dir.file_id("exe")?),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let stat = dir.confirm_alive()?;
            if matches!(stat.state, 'Z' | 'X') {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("process {pid} has exited"),
                ));
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("process {pid} has no executable (a kernel thread)"),
            ));
        }
        Err(err) => return Err(err),
    };
    let argv = split_nul(&dir.read("cmdline")?);
    if argv.is_empty() {
        // Since Linux 5.18 even an empty argv shows as one empty string; nothing
        // at all means the argument pages are not set up yet (an execve in
        // progress: Command::spawn returns before that) or are gone. Restarting
        // with no arguments would silently be a different command.
        dir.confirm_alive()?;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("process {pid} shows no command line (exec in progress or exiting)"),
        ));
    }
    let env = split_nul(&dir.read("environ")?);
    let root = dir.readlink("root")?;
    let cwd = undeleted(dir.readlink("cwd")?, dir.file_id("cwd")?);
    let limits = limits_of(&dir)?;
    let stdio = [
        dir.stdio_target(0)?,
        dir.stdio_target(1)?,
        dir.stdio_target(2)?,
    ];
    dir.confirm_alive()?;

    let (root, exe, cwd) = match inside_root(&root, &exe) {
        // A working directory outside the root can only come from a chroot()
        // without chdir(); "/" is the nearest thing that exists inside.
        Some(exe) => {
            let cwd = inside_root(&root, &cwd).unwrap_or_else(|| PathBuf::from("/"));
            (root, exe, cwd)
        }
        None => (PathBuf::from("/"), exe, cwd),
    };
    Ok(RestoreSpec {
        exe,
        argv,
        env,
        root,
        cwd,
        uids: [status.ruid, status.euid, status.suid],
        gids: [status.rgid, status.egid, status.sgid],
        groups: status.groups.iter().map(|&group| group as u32).collect(),
        // Umask is in status since Linux 4.7; before that, the usual default.
        umask: status.umask.unwrap_or(0o022),
        limits,
        stdio,
    })
}

/// Starts a process as `spec` describes, in a new session, with nothing inherited
/// from the caller but what the spec says. Returns its pid. The caller reaps it.
///
/// The environment keeps the first of duplicate names (the one `getenv` sees) and
/// drops entries without `=`; std's `Command` sorts it by name. Standard
/// descriptors are reopened by the agent, as root, from paths that /proc showed
/// without symlinks, so the open refuses any symlink: one planted since (by the
/// process's own user) cannot hand the new process a descriptor of another file.
/// A file that is gone or refused becomes `/dev/null`.
///
/// Descriptors of the agent do not leak: everything in Rust's std, rustix and
/// procfs opens with `O_CLOEXEC`, and the child additionally marks every
/// descriptor above 2 close-on-exec (`close_range`) in case a library did not.
pub fn spawn_restored(spec: &RestoreSpec) -> io::Result<Child> {
    for (what, path) in [("exe", &spec.exe), ("root", &spec.root), ("cwd", &spec.cwd)] {
        if !path.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("restore spec {what} is not absolute: {}", path.display()),
            ));
        }
    }
    // Everything the child needs is built here: between fork and exec only
    // async-signal-safe calls are allowed, so no allocation.
    let identity = Identity::prepare(spec)?;
    check_limits_settable(&spec.limits)?;

    let mut command = Command::new(&spec.exe);
    if let Some((first, rest)) = spec.argv.split_first() {
        command.arg0(OsStr::from_bytes(first));
        command.args(rest.iter().map(|arg| OsStr::from_bytes(arg)));
    }
    command.env_clear();
    let mut seen = HashSet::new();
    for entry in &spec.env {
        let Some(equals) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..equals], &entry[equals + 1..]);
        if !name.is_empty() && seen.insert(name) {
            command.env(OsStr::from_bytes(name), OsStr::from_bytes(value));
        }
    }
    command.stdin(open_stdio(&spec.stdio[0], false)?);
    command.stdout(open_stdio(&spec.stdio[1], true)?);
    command.stderr(open_stdio(&spec.stdio[2], true)?);
    // SAFETY: the hook runs in the forked child before exec. `Identity::enter`
    // only makes async-signal-safe system calls (setsid, sigaction, close_range,
    // chroot, chdir, umask, setrlimit, setgroups, setresgid, setresuid) on data
    // prepared above, and allocates nothing; errors are returned as raw OS
    // errors, which do not allocate either.
    unsafe {
        command.pre_exec(move || identity.enter());
    }
    // After the hook std calls execvp with the program path. The path contains a
    // '/', so there is no PATH search: the kernel resolves it against the root
    // the hook entered, which is the path inside the root the spec holds.
    command.spawn()
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to `key.pid` only if it is still the same
/// process (start time matches). Returns false if it is gone or was replaced.
///
/// A zombie counts as gone. The signal goes through a pidfd opened before the
/// start time is checked, so a pid reused after the check cannot receive it.
pub fn signal_process(key: ProcessKey, signal: i32) -> io::Result<bool> {
    let pid = valid_pid(key.pid)?;
    let signal = Signal::from_named_raw(signal).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a signal to send: {signal}"),
        )
    })?;
    match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => {
            // The pidfd now pins whichever process has the pid; check it is ours.
            if !is_alive(key) {
                return Ok(false);
            }
            match rustix::process::pidfd_send_signal(&pidfd, signal) {
                Ok(()) => Ok(true),
                Err(Errno::SRCH) => Ok(false),
                Err(err) => Err(err.into()),
            }
        }
        Err(Errno::SRCH) => Ok(false),
        // Kernels before 5.3: check, then kill by number. The pid could be reused
        // between the two, which is the race pidfds exist to close.
        Err(Errno::NOSYS) => {
            if !is_alive(key) {
                return Ok(false);
            }
            match rustix::process::kill_process(pid, signal) {
                Ok(()) => Ok(true),
                Err(Errno::SRCH) => Ok(false),
                Err(err) => Err(err.into()),
            }
        }
        Err(err) => Err(err.into()),
    }
}

/// Whether `key` is still running (and not a zombie).
pub fn is_alive(key: ProcessKey) -> bool {
    match read_stat(key.pid) {
        Ok(stat) => stat.starttime == key.start_time && !matches!(stat.state, 'Z' | 'X'),
        Err(_) => false,
    }
}

/// Waits until `key` has exited or `timeout` passes; true if it exited.
///
/// Works for any process, not only children: a pidfd becomes readable when its
/// process exits (a zombie counts as exited). Without pidfds, /proc is polled.
pub fn wait_exit(key: ProcessKey, timeout: Duration) -> io::Result<bool> {
    let pid = valid_pid(key.pid)?;
    let deadline = Instant::now() + timeout;
    let pidfd = match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(Errno::SRCH) => return Ok(true),
        Err(_) => return Ok(wait_exit_polling(key, deadline)),
    };
    // The pidfd refers to whatever has the pid now; if that is not `key`, `key`
    // has already exited.
    if !is_alive(key) {
        return Ok(true);
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timespec = rustix::event::Timespec {
            tv_sec: remaining.as_secs() as _,
            tv_nsec: remaining.subsec_nanos() as _,
        };
        let mut poll = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut poll, Some(&timespec)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            // A signal to the agent; poll again for what is left.
            Err(Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// The systemd unit a process runs in, from the text of /proc/PID/cgroup
/// (`0::/system.slice/nginx.service` → `nginx.service`); `None` outside a
/// service unit (user sessions, scopes, the root cgroup).
///
/// The unified (v2) line is used when it places the process anywhere but the
/// root; otherwise the v1 `name=systemd` line, which is where systemd tracks
/// processes on legacy systems (and where a v2 hierarchy mounted by someone else
/// shows every process at `/`). That is systemd's own choice on hybrid systems.
///
/// Nothing below `user.slice` is a unit to restart: the first unit there is the
/// user's manager (`user@1000.service`) or a login session scope, and restarting
/// the manager would end the user's whole session. A process of a user service
/// (`user@1000.service/app.slice/foo.service`) belongs to that manager; vdsync
/// treats it as a plain process.
pub fn systemd_unit_of(cgroup_text: &str) -> Option<String> {
    let groups = ProcessCGroups::from_read(cgroup_text.as_bytes()).ok()?;
    let unified = groups
        .0
        .iter()
        .find(|group| group.hierarchy == 0 && group.controllers.is_empty())
        .map(|group| group.pathname.as_str());
    let legacy = groups
        .0
        .iter()
        .find(|group| group.controllers.iter().any(|c| c == "name=systemd"))
        .map(|group| group.pathname.as_str());
    let path = match (unified, legacy) {
        (Some(unified), _) if unified != "/" => unified,
        (_, Some(legacy)) => legacy,
        (Some(unified), None) => unified,
        (None, None) => return None,
    };
    unit_of_cgroup_path(path)
}

/// Whether systemd is PID 1 on this machine.
pub fn systemd_is_init() -> bool {
    // /run/systemd/system is sd_booted()'s documented test; the comm of PID 1
    // covers a /run that is not (yet) populated.
    Path::new("/run/systemd/system").is_dir()
        || std::fs::read_to_string("/proc/1/comm").is_ok_and(|comm| comm.trim_end() == "systemd")
}

/// The service a cgroup path belongs to: the first component that is not a slice,
/// if it is a service.
fn unit_of_cgroup_path(path: &str) -> Option<String> {
    for component in path.split('/').filter(|c| !c.is_empty()) {
        // systemd escapes a unit name that could clash with a cgroup file name by
        // prefixing '_' (cg_escape); undo that.
        let name = component.strip_prefix('_').unwrap_or(component);
        if name == "user.slice" {
            return None;
        }
        if name.ends_with(".slice") {
            continue;
        }
        let is_service = name
            .strip_suffix(".service")
            .is_some_and(|prefix| !prefix.is_empty() && prefix.bytes().all(unit_name_byte));
        return is_service.then(|| name.to_string());
    }
    None
}

/// Bytes systemd allows in a unit name (before the suffix).
fn unit_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b':' | b'-' | b'_' | b'.' | b'\\' | b'@')
}

fn valid_pid(pid: i32) -> io::Result<Pid> {
    // Zero and negative numbers address process groups in kill(2): never here.
    match (pid > 0).then(|| Pid::from_raw(pid)).flatten() {
        Some(valid) => Ok(valid),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a process id: {pid}"),
        )),
    }
}

fn wait_exit_polling(key: ProcessKey, deadline: Instant) -> bool {
    loop {
        if !is_alive(key) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

fn read_stat(pid: i32) -> io::Result<Stat> {
    ProcDir::open(pid)?.parse("stat")
}

/// One process's /proc directory, held open so that every read is of the same
/// process: once it exits, reads through this descriptor fail, even if its pid is
/// given to a new process.
struct ProcDir {
    pid: i32,
    fd: OwnedFd,
}

impl ProcDir {
    fn open(pid: i32) -> io::Result<ProcDir> {
        let path = format!("/proc/{pid}");
        let fd = rustix::fs::open(
            path.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| proc_error(pid, "", err.into()))?;
        Ok(ProcDir { pid, fd })
    }

    fn error(&self, name: &str, err: io::Error) -> io::Error {
        proc_error(self.pid, name, err)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .and_then(|fd| File::from(fd).read_to_end(&mut bytes))
        .map_err(|err| self.error(name, err))?;
        Ok(bytes)
    }

    /// Reads `name` whole, then parses it with procfs: a short read of a file that
    /// changes while being read cannot be half-parsed this way.
    fn parse<T: FromRead>(&self, name: &str) -> io::Result<T> {
        let bytes = self.read(name)?;
        T::from_read(&bytes[..]).map_err(|err| self.error(name, from_proc_error(err)))
    }

    fn readlink(&self, name: &str) -> io::Result<PathBuf> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map_err(|err| self.error(name, err.into()))?;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(
            target.into_bytes(),
        )))
    }

    /// The file a magic link (`exe`, `cwd`, `fd/N`) points to, following it: this
    /// reaches the file itself even if it was deleted or replaced. `None` if the
    /// link is absent (a kernel thread's `exe`, a closed descriptor).
    fn file_stat(&self, name: &str) -> io::Result<Option<rustix::fs::Stat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::empty()) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::NOENT) => Ok(None),
            Err(err) => Err(self.error(name, err.into())),
        }
    }

    fn file_id(&self, name: &str) -> io::Result<Option<FileId>> {
        Ok(self.file_stat(name)?.as_ref().map(FileId::of))
    }

    /// The files on every open descriptor, deduplicated. Descriptors closed while
    /// listing are skipped.
    fn open_files(&self) -> io::Result<Vec<FileId>> {
        let fd_dir = rustix::fs::openat(
            &self.fd,
            "fd",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| self.error("fd", err.into()))?;
        let mut files = BTreeSet::new();
        let entries =
            rustix::fs::Dir::read_from(&fd_dir).map_err(|e| self.error("fd", e.into()))?;
        for entry in entries {
            let entry = entry.map_err(|err| self.error("fd", err.into()))?;
            let name = entry.file_name();
            if name.to_bytes().starts_with(b".") {
                continue;
            }
            match rustix::fs::statat(&fd_dir, name, AtFlags::empty()) {
                Ok(stat) => {
                    files.insert(FileId::of(&stat));
                }
                Err(Errno::NOENT) => continue,
                Err(err) => {
                    let name = format!("fd/{}", name.to_string_lossy());
                    return Err(self.error(&name, err.into()));
                }
            }
        }
        Ok(files.into_iter().collect())
    }

    /// Where descriptor `fd` (0, 1 or 2) points, if it can be reopened by path.
    fn stdio_target(&self, fd: u32) -> io::Result<StdioTarget> {
        let name = format!("fd/{fd}");
        let link = match self.readlink(&name) {
            Ok(link) => link,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(StdioTarget::Null),
            Err(err) => return Err(err),
        };
        let Some(stat) = self.file_stat(&name)? else {
            return Ok(StdioTarget::Null);
        };
        // Only a regular file that is still linked is reopened. Pipes
        // ("pipe:[N]"), sockets, anonymous inodes, terminals and /dev/null itself
        // (also a chroot's own) cannot be or need not be: they become /dev/null.
        let reopenable = FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
            && stat.st_nlink > 0
            && link.is_absolute()
            && !link.as_os_str().as_bytes().ends_with(DELETED_SUFFIX);
        Ok(if reopenable {
            StdioTarget::File(link)
        } else {
            StdioTarget::Null
        })
    }

    /// Fails with `NotFound` if the process behind this directory is gone.
    fn confirm_alive(&self) -> io::Result<Stat> {
        self.parse("stat")
    }
}

/// Adds the /proc path to an error and gives "no such process" the kind callers
/// match on. Permission errors keep their kind: as root they mean a security
/// module said no, which the caller reports.
fn proc_error(pid: i32, name: &str, err: io::Error) -> io::Error {
    let kind = match Errno::from_io_error(&err) {
        Some(Errno::SRCH) => io::ErrorKind::NotFound,
        _ => err.kind(),
    };
    let path = if name.is_empty() {
        format!("/proc/{pid}")
    } else {
        format!("/proc/{pid}/{name}")
    };
    io::Error::new(kind, format!("{path}: {err}"))
}

fn from_proc_error(err: ProcError) -> io::Error {
    match err {
        ProcError::Io(err, _) => err,
        ProcError::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, "no such process"),
        ProcError::PermissionDenied(_) => io::ErrorKind::PermissionDenied.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// Every resource limit, from /proc/PID/limits (read through the held directory,
/// so it is this process's, and exact: the kernel prints the raw numbers).
///
/// Not prlimit(2): reading another user's limits with it needs CAP_SYS_RESOURCE,
/// which root does not always have (containers, this project's test VMs), and it
/// addresses the process by a number that could be reused. (rustix's `prlimit`
/// also always sets a new limit.)
fn limits_of(dir: &ProcDir) -> io::Result<Vec<Limit>> {
    let limits: procfs::process::Limits = dir.parse("limits")?;
    let rows = [
        (Resource::Cpu, limits.max_cpu_time),
        (Resource::Fsize, limits.max_file_size),
        (Resource::Data, limits.max_data_size),
        (Resource::Stack, limits.max_stack_size),
        (Resource::Core, limits.max_core_file_size),
        (Resource::Rss, limits.max_resident_set),
        (Resource::Nproc, limits.max_processes),
        (Resource::Nofile, limits.max_open_files),
        (Resource::Memlock, limits.max_locked_memory),
        (Resource::As, limits.max_address_space),
        (Resource::Locks, limits.max_file_locks),
        (Resource::Sigpending, limits.max_pending_signals),
        (Resource::Msgqueue, limits.max_msgqueue_size),
        (Resource::Nice, limits.max_nice_priority),
        (Resource::Rtprio, limits.max_realtime_priority),
        (Resource::Rttime, limits.max_realtime_timeout),
    ];
    let value = |value: procfs::process::LimitValue| match value {
        procfs::process::LimitValue::Unlimited => u64::MAX,
        procfs::process::LimitValue::Value(value) => value,
    };
    Ok(rows
        .into_iter()
        .map(|(resource, limit)| Limit {
            resource: resource as u32,
            soft: value(limit.soft_limit),
            hard: value(limit.hard_limit),
        })
        .collect())
}

/// `CAP_SYS_RESOURCE`, from linux/capability.h.
const CAP_SYS_RESOURCE: u32 = 24;

/// The child sets limits with the agent's privileges, and raising a hard limit
/// needs CAP_SYS_RESOURCE. Without it, a limit above the agent's own would fail
/// in the child, where only an errno comes back; fail here with a message that
/// names the limit instead.
fn check_limits_settable(limits: &[Limit]) -> io::Result<()> {
    let status = std::fs::read("/proc/self/status")?;
    let status = Status::from_read(&status[..]).map_err(from_proc_error)?;
    if status.capeff & (1 << CAP_SYS_RESOURCE) != 0 {
        return Ok(());
    }
    for limit in limits {
        let Some(resource) = RESOURCES.into_iter().find(|r| *r as u32 == limit.resource) else {
            continue;
        };
        let own_hard = rustix::process::getrlimit(resource)
            .maximum
            .unwrap_or(u64::MAX);
        if limit.hard > own_hard {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "cannot restore hard limit {} of {resource:?}: above the agent's own ({own_hard}) and the agent lacks CAP_SYS_RESOURCE",
                    limit.hard
                ),
            ));
        }
    }
    Ok(())
}

/// NUL-terminated strings (/proc/PID/cmdline, environ) as byte strings. Empty
/// strings in the middle are real (an empty argument); only the terminator of the
/// last one is dropped.
fn split_nul(bytes: &[u8]) -> Vec<Vec<u8>> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(<[u8]>::to_vec).collect()
}

/// The path of a magic link without the " (deleted)" the kernel appends when the
/// file was unlinked (as when a version replaced the executable: the restart must
/// run the new file at the same path). A file really named "x (deleted)" keeps its
/// name: that path still leads to the same file.
fn undeleted(link: PathBuf, file: Option<FileId>) -> PathBuf {
    let bytes = link.as_os_str().as_bytes();
    let Some(stripped) = bytes.strip_suffix(DELETED_SUFFIX) else {
        return link;
    };
    let still_there = rustix::fs::stat(&link).ok().map(|stat| FileId::of(&stat));
    if file.is_some() && still_there == file {
        return link;
    }
    PathBuf::from(OsStr::from_bytes(stripped))
}

/// `path` (as the agent sees it) as a path inside `root`, if it is inside.
fn inside_root(root: &Path, path: &Path) -> Option<PathBuf> {
    if root == Path::new("/") {
        return Some(path.to_path_buf());
    }
    // Component-wise: /srv/app is not inside /srv/a.
    let rest = path.strip_prefix(root).ok()?;
    Some(Path::new("/").join(rest))
}

/// Opens a captured standard descriptor target. The path came from /proc, which
/// shows paths without symlinks, so any symlink on it now was planted since:
/// refuse it rather than let the agent (root) open another file for the process.
fn open_stdio(target: &StdioTarget, write: bool) -> io::Result<Stdio> {
    let StdioTarget::File(path) = target else {
        return Ok(Stdio::null());
    };
    let access = if write {
        OFlags::WRONLY | OFlags::APPEND
    } else {
        OFlags::RDONLY
    };
    let opened = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        access | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    );
    let fd = match opened {
        Ok(fd) => fd,
        // Gone (rotated away, cleaned up) or a symlink now: /dev/null, as for a
        // pipe. A restart that fails over a log file would be worse.
        Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::XDEV) => return Ok(Stdio::null()),
        Err(err) => {
            return Err(io::Error::new(
                io::Error::from(err).kind(),
                format!("opening {}: {err}", path.display()),
            ))
        }
    };
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(Stdio::null());
    }
    Ok(Stdio::from(File::from(fd)))
}

/// What the child sets up between fork and exec, prepared in the parent.
struct Identity {
    /// `None` when the root is `/`: nothing to enter.
    root: Option<CString>,
    cwd: CString,
    umask: libc::mode_t,
    limits: Vec<(u32, libc::rlimit)>,
    groups: Vec<libc::gid_t>,
    uids: [libc::uid_t; 3],
    gids: [libc::gid_t; 3],
    default_action: libc::sigaction,
}

impl Identity {
    fn prepare(spec: &RestoreSpec) -> io::Result<Identity> {
        let c_path = |path: &Path| {
            CString::new(path.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("path contains NUL: {}", path.display()),
                )
            })
        };
        let root = if spec.root == Path::new("/") {
            None
        } else {
            Some(c_path(&spec.root)?)
        };
        // SAFETY: sigaction is plain data; all zeroes is a valid value (handler
        // SIG_DFL = 0, empty mask, no flags).
        let default_action: libc::sigaction = unsafe { std::mem::zeroed() };
        Ok(Identity {
            root,
            cwd: c_path(&spec.cwd)?,
            umask: spec.umask as libc::mode_t,
            limits: spec
                .limits
                .iter()
                .map(|limit| {
                    let value = libc::rlimit {
                        rlim_cur: limit.soft,
                        rlim_max: limit.hard,
                    };
                    (limit.resource, value)
                })
                .collect(),
            groups: spec.groups.clone(),
            uids: spec.uids,
            gids: spec.gids,
            default_action,
        })
    }

    /// Runs in the child between fork and exec: async-signal-safe calls only, no
    /// allocation. The order matters: a new session first; the root before the
    /// directory (which is a path inside it); limits and groups while still root;
    /// the user last, since it gives up the right to do the rest.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: setsid takes no arguments; the forked child is not a group
        // leader, so it succeeds.
        check(unsafe { libc::setsid() })?;
        // An ignored signal stays ignored across exec, so the agent's ignores would
        // leak into the process (std resets only SIGPIPE and the mask). Errors are
        // expected for SIGKILL, SIGSTOP and the C library's internal signals.
        for signal in 1..=64 {
            // SAFETY: `default_action` is a valid sigaction (SIG_DFL); a null old
            // action is allowed.
            unsafe { libc::sigaction(signal, &self.default_action, std::ptr::null_mut()) };
        }
        // Belt and braces: every agent descriptor should already be close-on-exec.
        // Marking (not closing) keeps std's own exec-error pipe working. Fails
        // harmlessly (ENOSYS) before Linux 5.11.
        // SAFETY: close_range with plain integer arguments has no memory effects.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if let Some(root) = &self.root {
            // SAFETY: `root` is a NUL-terminated string that outlives the call.
            check(unsafe { libc::chroot(root.as_ptr()) })?;
        }
        // SAFETY: `cwd` is a NUL-terminated string that outlives the call.
        check(unsafe { libc::chdir(self.cwd.as_ptr()) })?;
        // SAFETY: umask cannot fail and touches no memory.
        unsafe { libc::umask(self.umask) };
        for (resource, value) in &self.limits {
            // SAFETY: `value` is a valid rlimit that outlives the call.
            check(unsafe { libc::setrlimit(*resource as _, value) })?;
        }
        // SAFETY: the pointer and length describe `groups`, which outlives the call.
        check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) })?;
        let [real, effective, saved] = self.gids;
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setresgid(real, effective, saved) })?;
        let [real, effective, saved] = self.uids;
        // SAFETY: plain integer arguments.
        check(unsafe { libc::setresuid(real, effective, saved) })?;
        Ok(())
    }
}

/// A libc return value as a result (errno read without allocating).
fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_file_that_gets_a_deleted_files_inode_has_another_incarnation() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dir_fd = std::fs::File::open(dir.path()).unwrap();
        let first = dir.path().join("first");
        std::fs::write(&first, b"one").unwrap();
        let inode = std::fs::metadata(&first).unwrap().ino();
        let before = super::incarnation_of_entry(dir_fd.as_fd(), b"first");
        let opened = std::fs::File::open(&first).unwrap();
        assert_ne!(before, 0, "this file system gives no file handles");
        assert_eq!(super::incarnation_of_fd(opened.as_fd()), before);
        drop(opened);
        std::fs::remove_file(&first).unwrap();
        // ext4 hands a freed inode to the next file created in the same group.
        let reused = (0..1000).find_map(|attempt| {
            let name = format!("next-{attempt}");
            std::fs::write(dir.path().join(&name), b"two").unwrap();
            (std::fs::metadata(dir.path().join(&name)).unwrap().ino() == inode).then_some(name)
        });
        let name = reused.expect("no new file got the deleted file's inode in 1000 tries");
        let after = super::incarnation_of_entry(dir_fd.as_fd(), name.as_bytes());
        assert_ne!(after, 0);
        assert_ne!(
            after, before,
            "same inode number, other file: incarnations must differ"
        );
    }

    #[test]
    fn maps_and_status_text_are_read_for_the_needed_columns() {
        let maps =
            b"55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1835045                    /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fe:01 1835045                    /usr/bin/cat
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2c400000-7f1e2c6e9000 r--p 00000000 103:1f 2753 /usr/lib/locale/locale-archive (deleted)
7ffd1b5f1000-7ffd1b612000 rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(
            mapped_files(maps),
            [
                FileId {
                    dev: rustix::fs::makedev(0xfe, 0x01),
                    ino: 1835045
                },
                FileId {
                    dev: rustix::fs::makedev(0x103, 0x1f),
                    ino: 2753
                },
            ]
        );
        let status = b"Name:\tcat\nSigIgn:\t0000000000000001\nSigCgt:\t0000000000004a02\n";
        assert_eq!(status_mask(status, "SigIgn:"), Some(1));
        assert_eq!(status_mask(status, "SigCgt:"), Some(0x4a02));
        assert_eq!(status_mask(status, "SigBlk:"), None);
    }
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::mpsc;

    /// The interpreter itself, not a PATH shim: its (dev, ino) is asserted.
    const PYTHON: &str = "/usr/bin/python3";
    /// Upper bound for anything a test waits for.
    const WAIT: Duration = Duration::from_secs(20);

    /// Kills and reaps a child when the test ends, passing or failing.
    struct ChildGuard(Child);

    impl ChildGuard {
        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Kills a process that is not our child (reparented away) when the test ends.
    struct KeyGuard(ProcessKey);

    impl Drop for KeyGuard {
        fn drop(&mut self) {
            let _ = signal_process(self.0, libc::SIGKILL);
        }
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_line_within(child: &mut Child, what: &str) -> String {
        let stdout = child.stdout.take().expect("child stdout is piped");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        receiver
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no line from {what} within {WAIT:?}"))
    }

    fn file_id(path: &Path) -> FileId {
        let stat =
            rustix::fs::stat(path).unwrap_or_else(|err| panic!("stat {}: {err}", path.display()));
        FileId::of(&stat)
    }

    fn canonical(path: impl AsRef<Path>) -> PathBuf {
        std::fs::canonicalize(path.as_ref())
            .unwrap_or_else(|err| panic!("canonicalize {}: {err}", path.as_ref().display()))
    }

    /// Waits until `pid` has finished execve. Command::spawn returns once the
    /// child is past exec's point of no return, which is before the kernel has
    /// set up its argument pages: /proc can briefly show the parent's executable
    /// or an empty command line.
    fn wait_for_exec(pid: i32) {
        wait_until("exec to finish", || {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        });
    }

    fn sleeper() -> ChildGuard {
        let child = ChildGuard(
            Command::new("/usr/bin/sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn /usr/bin/sleep"),
        );
        wait_for_exec(child.pid());
        child
    }

    /// Python holding `open_path` on a descriptor and `map_path` only as a mapping,
    /// with SIGHUP set to `hangup` ("default", "catch" or "ignore"); returns once it
    /// printed "ready".
    fn python_holding(open_path: &Path, map_path: &Path, hangup: &str) -> ChildGuard {
        const SCRIPT: &str = r#"
import ctypes, os, signal, sys
held = open(sys.argv[1], 'rb')
# Python's mmap module keeps a dup of the descriptor; map with libc instead, so
# the file is held only as a mapping.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[2], os.O_RDONLY)
address = libc.mmap(None, 4096, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
if address in (None, ctypes.c_void_p(-1).value):
    sys.exit('mmap failed: errno %d' % ctypes.get_errno())
os.close(fd)
handlers = {'default': signal.SIG_DFL, 'catch': lambda *a: None, 'ignore': signal.SIG_IGN}
signal.signal(signal.SIGHUP, handlers[sys.argv[3]])
print('ready', flush=True)
while True:
    signal.pause()
"#;
        let mut child = ChildGuard(
            Command::new(PYTHON)
                .arg("-c")
                .arg(SCRIPT)
                .arg(open_path)
                .arg(map_path)
                .arg(hangup)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn python3"),
        );
        let line = read_line_within(&mut child.0, "python3 holding files");
        assert_eq!(line.trim(), "ready", "python3 did not get ready");
        child
    }

    #[test]
    fn process_files_sees_executable_mappings_and_descriptors() {
        let temp = tempfile::tempdir().expect("temp dir");
        let open_path = temp.path().join("held-open");
        let map_path = temp.path().join("mapped-only");
        std::fs::write(&open_path, b"open").expect("write");
        std::fs::write(&map_path, [7u8; 8192]).expect("write");
        let child = python_holding(&open_path, &map_path, "default");
        let pid = child.pid();

        let files = process_files(pid).expect("process_files");
        assert_eq!(files.key, process_key(pid).expect("process_key"));
        assert_eq!(files.parent, std::process::id() as i32);
        assert_eq!(files.name, "python3");
        // stat() follows /usr/bin/python3 -> python3.11, as the exe link does.
        let python = file_id(Path::new(PYTHON));
        assert_eq!(files.exe, Some(python));
        // The maps device column converted to dev_t must match stat().st_dev.
        let mapped = file_id(&map_path);
        assert!(
            files.mapped.contains(&mapped),
            "{mapped:?} not in {files:?}"
        );
        assert!(
            files.mapped.contains(&python),
            "the executable is mapped too"
        );
        assert!(
            !files.open.contains(&mapped),
            "mapped file's descriptor was closed"
        );
        let held = file_id(&open_path);
        assert!(files.open.contains(&held), "{held:?} not in {files:?}");
        for list in [&files.mapped, &files.open] {
            assert!(
                list.windows(2).all(|w| w[0] < w[1]),
                "sorted, no duplicates"
            );
        }
        assert!(!files.catches_hangup && !files.ignores_hangup);

        // Its stdout is a pipe: a restart gets /dev/null there.
        let spec = capture_restore(pid).expect("capture_restore");
        assert_eq!(spec.stdio[1], StdioTarget::Null);
    }

    #[test]
    fn hangup_handling_comes_from_signal_masks() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("file");
        std::fs::write(&path, b"x").expect("write");
        let catching = python_holding(&path, &path, "catch");
        let ignoring = python_holding(&path, &path, "ignore");
        let catching = process_files(catching.pid()).expect("process_files");
        assert!(catching.catches_hangup && !catching.ignores_hangup);
        let ignoring = process_files(ignoring.pid()).expect("process_files");
        assert!(ignoring.ignores_hangup && !ignoring.catches_hangup);
    }

    #[test]
    fn listing_and_parents() {
        let child = sleeper();
        let pids = list_pids().expect("list_pids");
        assert!(pids.contains(&1));
        assert!(pids.contains(&(std::process::id() as i32)));
        assert!(pids.contains(&child.pid()));
        assert_eq!(
            parent_of(child.pid()).expect("parent_of"),
            std::process::id() as i32
        );
    }

    #[test]
    fn exited_process_reads_as_not_found() {
        let mut child = Command::new("/usr/bin/true").spawn().expect("spawn true");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        let kinds = [
            process_files(pid).map(drop),
            capture_restore(pid).map(drop),
            process_key(pid).map(drop),
        ];
        for result in kinds {
            assert_eq!(
                result.expect_err("process is gone").kind(),
                io::ErrorKind::NotFound
            );
        }

        // A process that exits while it is being read: the directory descriptor
        // opened first reports it, even if the pid were reused.
        let mut child = sleeper();
        let dir = ProcDir::open(child.pid()).expect("open /proc/PID");
        child.0.kill().expect("kill");
        child.0.wait().expect("wait");
        let err = dir.confirm_alive().expect_err("process is gone");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn replaced_executable_is_identified_and_restarted_by_path() {
        let temp = tempfile::tempdir().expect("temp dir");
        let copy = canonical(temp.path()).join("sleep-copy");
        std::fs::copy("/usr/bin/sleep", &copy).expect("copy sleep");
        let original = file_id(&copy);
        // Another test's fork can briefly hold the copy's write descriptor
        // (ETXTBSY): retry, bounded.
        let deadline = Instant::now() + WAIT;
        let child = loop {
            match Command::new(&copy).arg("1000").spawn() {
                Ok(child) => break ChildGuard(child),
                Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) => {
                    assert!(Instant::now() < deadline, "{}: {err}", copy.display());
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(err) => panic!("spawn {}: {err}", copy.display()),
            }
        };
        wait_for_exec(child.pid());
        std::fs::remove_file(&copy).expect("remove");
        let files = process_files(child.pid()).expect("process_files");
        assert_eq!(files.exe, Some(original));
        let spec = capture_restore(child.pid()).expect("capture_restore");
        assert_eq!(spec.exe, copy, "\" (deleted)\" is not part of the path");
        assert_eq!(
            spec.argv,
            vec![copy.as_os_str().as_bytes().to_vec(), b"1000".to_vec()]
        );
    }

    /// Reports what a restart must reproduce, one `key<TAB>json` line each, into
    /// argv[1] (atomically), prints "started" and waits for a signal.
    const REPORT_SCRIPT: &str = r#"
import json, os, resource, signal, sys

def link(path):
    try:
        return os.readlink(path)
    except OSError:
        return None

umask = os.umask(0)
os.umask(umask)
names = ('RLIMIT_NOFILE', 'RLIMIT_CORE', 'RLIMIT_STACK', 'RLIMIT_NPROC', 'RLIMIT_AS',
         'RLIMIT_MEMLOCK', 'RLIMIT_SIGPENDING')
report = {
    'pid': os.getpid(),
    'sid': os.getsid(0),
    'cwd': os.getcwd(),
    'resuid': os.getresuid(),
    'resgid': os.getresgid(),
    'groups': sorted(os.getgroups()),
    'env': dict(os.environ),
    'argv': sys.argv,
    'orig_argv': sys.orig_argv,
    'umask': umask,
    'limits': {name: resource.getrlimit(getattr(resource, name)) for name in names},
    'root': link('/proc/self/root'),
    'exe': link('/proc/self/exe'),
    'stdin': link('/proc/self/fd/0'),
    'stdout': link('/proc/self/fd/1'),
    'stderr': link('/proc/self/fd/2'),
}
path = sys.argv[1]
with open(path + '.tmp', 'w') as out:
    for key, value in sorted(report.items()):
        out.write(key + '\t' + json.dumps(value, sort_keys=True) + '\n')
os.rename(path + '.tmp', path)
print('started', flush=True)
while True:
    signal.pause()
"#;

    type Report = BTreeMap<String, String>;

    fn wait_for_report(path: &Path, stderr_log: &Path) -> Report {
        let deadline = Instant::now() + WAIT;
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "no report at {} within {WAIT:?}; stderr: {}",
                path.display(),
                std::fs::read_to_string(stderr_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(path).expect("read report");
        text.lines()
            .map(|line| {
                let (key, value) = line.split_once('\t').expect("key<TAB>value");
                (key.to_string(), value.to_string())
            })
            .collect()
    }

    fn without_pid_and_session(report: &Report) -> Report {
        let mut report = report.clone();
        report.remove("pid");
        report.remove("sid");
        report
    }

    fn session_of(pid: i32) -> i32 {
        read_stat(pid).expect("stat").session
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn capture_and_restore_round_trip() {
        let temp = tempfile::tempdir().expect("temp dir");
        let base = canonical(temp.path());
        set_mode(&base, 0o755);
        let work = base.join("work");
        std::fs::create_dir(&work).expect("mkdir");
        set_mode(&work, 0o777);
        let script = base.join("report.py");
        std::fs::write(&script, REPORT_SCRIPT).expect("write script");
        let report = work.join("report");
        let (input, out, err) = (
            base.join("in.txt"),
            base.join("out.log"),
            base.join("err.log"),
        );
        std::fs::write(&input, b"input\n").expect("write");
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open log")
        };

        let env: Vec<(&[u8], &[u8])> = vec![
            (b"PATH", b"/usr/bin:/bin"),
            (b"LANG", b"C.UTF-8"),
            (b"VDSYNC_MARK", b"round trip"),
            (b"WITH_EQUALS", b"a=b=c"),
            (b"EMPTY", b""),
            (b"NOT_UTF8", b"\xff\xfe"),
        ];
        let mut original = Command::new(PYTHON);
        original
            .arg(&script)
            .arg(&report)
            .args(["two words", "", "--flag=x"])
            .env_clear()
            .envs(
                env.iter()
                    .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
            )
            .current_dir(&work)
            .stdin(File::open(&input).expect("open input"))
            .stdout(append(&out))
            .stderr(append(&err));
        // SAFETY: only async-signal-safe libc calls on data that lives in the
        // closure; independent of the code under test on purpose.
        unsafe {
            original.pre_exec(|| {
                let groups: [libc::gid_t; 2] = [100, 65534];
                let nofile = libc::rlimit {
                    rlim_cur: 512,
                    rlim_max: 1024,
                };
                check(libc::setrlimit(libc::RLIMIT_NOFILE, &nofile))?;
                libc::umask(0o027);
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setresgid(65534, 100, 65534))?;
                check(libc::setresuid(65534, 12345, 65534))?;
                Ok(())
            });
        }
        let original = ChildGuard(original.spawn().expect("spawn original"));
        let first = wait_for_report(&report, &err);
        assert_eq!(first["pid"], original.pid().to_string());
        // execve copies the effective ids to the saved ones.
        assert_eq!(first["resuid"], "[65534, 12345, 12345]", "fixture");
        assert_eq!(first["resgid"], "[65534, 100, 100]", "fixture");
        assert_eq!(first["umask"], "23", "fixture: 0o027");

        let spec = capture_restore(original.pid()).expect("capture_restore");
        assert_eq!(spec.exe, canonical(PYTHON));
        assert_eq!(spec.root, Path::new("/"));
        assert_eq!(spec.cwd, work);
        assert_eq!(spec.uids, [65534, 12345, 12345]);
        assert_eq!(spec.gids, [65534, 100, 100]);
        assert_eq!(spec.groups, vec![100, 65534]);
        assert_eq!(spec.umask, 0o027);
        let nofile = Resource::Nofile as u32;
        assert!(spec.limits.contains(&Limit {
            resource: nofile,
            soft: 512,
            hard: 1024
        }));
        assert_eq!(spec.limits.len(), RESOURCES.len());
        let argv: Vec<&[u8]> = spec.argv.iter().map(Vec::as_slice).collect();
        assert_eq!(
            argv,
            [
                PYTHON.as_bytes(),
                script.as_os_str().as_bytes(),
                report.as_os_str().as_bytes(),
                b"two words",
                b"",
                b"--flag=x"
            ]
        );
        let mut captured_env = spec.env.clone();
        captured_env.sort();
        let mut expected_env: Vec<Vec<u8>> =
            env.iter().map(|(k, v)| [*k, b"=", *v].concat()).collect();
        expected_env.sort();
        assert_eq!(captured_env, expected_env);
        assert_eq!(
            spec.stdio,
            [
                StdioTarget::File(input.clone()),
                StdioTarget::File(out.clone()),
                StdioTarget::File(err.clone())
            ]
        );

        let original_key = process_key(original.pid()).expect("process_key");
        drop(original);
        assert!(!is_alive(original_key));
        std::fs::remove_file(&report).expect("remove report");

        // A descriptor the agent forgot to mark close-on-exec must not reach the
        // restarted process.
        let leaked = File::open(&input).expect("open");
        rustix::io::fcntl_setfd(&leaked, rustix::io::FdFlags::empty()).expect("clear CLOEXEC");
        let restored = ChildGuard(spawn_restored(&spec).expect("spawn_restored"));
        drop(leaked);
        let second = wait_for_report(&report, &err);

        assert_eq!(second["pid"], restored.pid().to_string());
        assert_ne!(restored.pid().to_string(), first["pid"]);
        assert_eq!(
            without_pid_and_session(&second),
            without_pid_and_session(&first)
        );
        assert_eq!(second["sid"], restored.pid().to_string(), "a new session");
        assert_eq!(session_of(restored.pid()), restored.pid());
        let files = process_files(restored.pid()).expect("process_files");
        let stdin_file = file_id(&input);
        let fd_count = std::fs::read_dir(format!("/proc/{}/fd", restored.pid()))
            .expect("fd dir")
            .count();
        assert!(
            files.open.contains(&stdin_file) && fd_count == 3,
            "only stdin, stdout, stderr are open: {fd_count} descriptors"
        );
        // stdout was reopened for appending: both runs' lines are there.
        wait_until("the restarted process's line in out.log", || {
            std::fs::read_to_string(&out).unwrap_or_default() == "started\nstarted\n"
        });
    }

    /// A root for chroot: /usr bind-mounted read-only, the usr-merge symlinks and
    /// a work directory. Unmounts on drop; if it cannot, the directory is left
    /// behind rather than removed through a live mount of /usr.
    struct ChrootFixture {
        dir: Option<tempfile::TempDir>,
        root: PathBuf,
        mounted: Vec<PathBuf>,
    }

    impl ChrootFixture {
        fn new() -> ChrootFixture {
            let dir = tempfile::tempdir().expect("temp dir");
            let root = canonical(dir.path());
            let mut fixture = ChrootFixture {
                dir: Some(dir),
                root: root.clone(),
                mounted: Vec::new(),
            };
            set_mode(&root, 0o755);
            let usr = root.join("usr");
            std::fs::create_dir(&usr).expect("mkdir usr");
            let source = CString::new("/usr").expect("c string");
            let target = CString::new(usr.as_os_str().as_bytes()).expect("c string");
            // SAFETY: NUL-terminated strings that outlive the call; null fs type
            // and data are allowed for bind mounts.
            let bound = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            check(bound).expect("bind mount /usr");
            fixture.mounted.push(usr.clone());
            // SAFETY: as above; a bind remount changes only this mount's flags.
            let read_only = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                )
            };
            check(read_only).expect("remount read-only");
            let flags = rustix::fs::statvfs(&usr).expect("statvfs").f_flag;
            assert!(flags.contains(rustix::fs::StatVfsMountFlags::RDONLY));
            for (name, target) in [
                ("bin", "usr/bin"),
                ("sbin", "usr/sbin"),
                ("lib", "usr/lib"),
                ("lib64", "usr/lib64"),
            ] {
                std::os::unix::fs::symlink(target, root.join(name)).expect("symlink");
            }
            std::fs::create_dir(root.join("work")).expect("mkdir work");
            fixture
        }
    }

    impl Drop for ChrootFixture {
        fn drop(&mut self) {
            let mut all_unmounted = true;
            for mount in self.mounted.iter().rev() {
                let Ok(path) = CString::new(mount.as_os_str().as_bytes()) else {
                    all_unmounted = false;
                    continue;
                };
                // SAFETY: a NUL-terminated path that outlives the calls.
                let unmounted = unsafe {
                    libc::umount2(path.as_ptr(), 0) == 0
                        || libc::umount2(path.as_ptr(), libc::MNT_DETACH) == 0
                };
                all_unmounted &= unmounted;
            }
            if let Some(dir) = self.dir.take() {
                if !all_unmounted {
                    eprintln!(
                        "left {} behind: /usr still mounted there",
                        self.root.display()
                    );
                    std::mem::forget(dir);
                }
            }
        }
    }

    #[test]
    fn chroot_round_trip() {
        // Declared first, dropped last: the processes are gone before unmounting.
        let fixture = ChrootFixture::new();
        let root = fixture.root.clone();
        std::fs::write(root.join("work/report.py"), REPORT_SCRIPT).expect("write script");
        let report = root.join("work/report");
        let logs = tempfile::tempdir().expect("temp dir");
        let err = logs.path().join("err.log");
        let c_root = CString::new(root.as_os_str().as_bytes()).expect("c string");
        let mut original = Command::new(PYTHON);
        original
            .args(["/work/report.py", "/work/report"])
            .env_clear()
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err).expect("create err.log"));
        // SAFETY: chroot and chdir on NUL-terminated strings owned by the closure;
        // both are async-signal-safe.
        unsafe {
            original.pre_exec(move || {
                check(libc::chroot(c_root.as_ptr()))?;
                check(libc::chdir(c"/work".as_ptr()))?;
                Ok(())
            });
        }
        let original = ChildGuard(original.spawn().expect("spawn chrooted python"));
        let first = wait_for_report(&report, &err);
        assert_eq!(first["cwd"], "\"/work\"");

        let spec = capture_restore(original.pid()).expect("capture_restore");
        assert_eq!(spec.root, root);
        assert_eq!(spec.cwd, Path::new("/work"));
        // The path inside the root (python3 -> python3.11 resolved in there).
        assert_eq!(spec.exe, canonical(PYTHON));
        assert_eq!(spec.argv[0], PYTHON.as_bytes());
        assert_eq!(
            spec.stdio,
            [
                StdioTarget::Null,
                StdioTarget::Null,
                StdioTarget::File(err.clone())
            ]
        );
        drop(original);
        std::fs::remove_file(&report).expect("remove report");

        let restored = ChildGuard(spawn_restored(&spec).expect("spawn_restored"));
        let second = wait_for_report(&report, &err);
        assert_eq!(
            without_pid_and_session(&second),
            without_pid_and_session(&first)
        );
        let proc_link = |name: &str| {
            std::fs::read_link(format!("/proc/{}/{name}", restored.pid())).expect("readlink")
        };
        assert_eq!(proc_link("root"), root);
        assert_eq!(proc_link("cwd"), root.join("work"));
        assert_eq!(session_of(restored.pid()), restored.pid());
    }

    #[test]
    fn signals_only_the_same_process_and_waits_for_exit() {
        let mut child = sleeper();
        let key = process_key(child.pid()).expect("process_key");
        let stale = ProcessKey {
            start_time: key.start_time + 1,
            ..key
        };
        assert!(!signal_process(stale, libc::SIGKILL).expect("signal stale"));
        assert!(
            is_alive(key) && !is_alive(stale),
            "stale key must not be signalled"
        );
        assert!(!wait_exit(key, Duration::from_millis(100)).expect("wait_exit"));
        assert!(!wait_exit_polling(
            key,
            Instant::now() + Duration::from_millis(50)
        ));

        assert!(signal_process(key, libc::SIGTERM).expect("signal"));
        assert!(
            wait_exit(key, WAIT).expect("wait_exit"),
            "not exited within {WAIT:?}"
        );
        // Exited but not reaped: a zombie is not alive and not signalled.
        assert!(!is_alive(key));
        assert!(!signal_process(key, libc::SIGTERM).expect("signal zombie"));
        let status = child.0.wait().expect("reap");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!signal_process(key, libc::SIGKILL).expect("signal gone"));
        assert!(wait_exit(key, Duration::ZERO).expect("wait_exit gone"));
        assert!(wait_exit_polling(key, Instant::now()));

        for pid in [0, -1] {
            let key = ProcessKey { pid, start_time: 0 };
            let err = signal_process(key, libc::SIGKILL).expect_err("process groups");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn waits_for_a_process_that_is_not_a_child() {
        let mut shell = Command::new("/bin/sh")
            .args(["-c", "/usr/bin/sleep 1000 >/dev/null 2>&1 & echo $!"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let line = read_line_within(&mut shell, "sh starting sleep");
        shell.wait().expect("reap sh");
        let pid: i32 = line.trim().parse().expect("pid from sh");
        let key = process_key(pid).expect("process_key");
        let _guard = KeyGuard(key);
        assert_ne!(parent_of(pid).expect("parent"), std::process::id() as i32);
        assert!(!wait_exit(key, Duration::from_millis(100)).expect("wait_exit"));
        assert!(signal_process(key, libc::SIGKILL).expect("signal"));
        assert!(
            wait_exit(key, WAIT).expect("wait_exit"),
            "not exited within {WAIT:?}"
        );
    }

    fn check_unit(cgroup_text: &str, expected: Option<&str>) {
        assert_eq!(
            systemd_unit_of(cgroup_text).as_deref(),
            expected,
            "{cgroup_text:?}"
        );
    }

    #[test]
    fn systemd_unit_from_cgroup_text() {
        let cases: &[(&str, Option<&str>)] = &[
            ("0::/system.slice/nginx.service\n", Some("nginx.service")),
            ("0::/system.slice/foo.service/sub\n", Some("foo.service")),
            (
                "0::/system.slice/system-getty.slice/getty@tty1.service\n",
                Some("getty@tty1.service"),
            ),
            (
                "0::/system.slice/_cgroup.weird.service\n",
                Some("cgroup.weird.service"),
            ),
            ("0::/user.slice/user-0.slice/session-3.scope\n", None),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
                None,
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n",
                None,
            ),
            ("0::/system.slice/docker-0123abcd.scope\n", None),
            ("0::/init.scope\n", None),
            ("0::/\n", None),
            ("0::/system.slice\n", None),
            ("0::/process_api/40d0f9fb98fbcecf\n", None),
            (
                "0::/machine.slice/systemd-nspawn@web.service/payload/system.slice/x.service\n",
                Some("systemd-nspawn@web.service"),
            ),
            // cgroup v1: the name=systemd hierarchy.
            (
                "4:memory:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n",
                Some("x.service"),
            ),
            // Hybrid: both agree.
            (
                "12:name=systemd:/system.slice/cron.service\n0::/system.slice/cron.service\n",
                Some("cron.service"),
            ),
            // v1 systemd with a cgroup2 mounted by someone else: v2 shows "/".
            (
                "1:name=systemd:/system.slice/ssh.service\n0::/\n",
                Some("ssh.service"),
            ),
            // The unified hierarchy wins when it places the process anywhere.
            (
                "1:name=systemd:/\n0::/system.slice/redis.service\n",
                Some("redis.service"),
            ),
            ("", None),
            ("not a cgroup line\n", None),
            ("0::/system.slice/.service\n", None),
        ];
        for &(text, expected) in cases {
            check_unit(text, expected);
        }
    }

    /// A cgroup directory (and its parent) made for one test, with the process put
    /// into it: kills the process, then removes the directories.
    struct CgroupGuard {
        child: Option<ChildGuard>,
        created: Vec<PathBuf>,
    }

    impl Drop for CgroupGuard {
        fn drop(&mut self) {
            drop(self.child.take());
            for dir in self.created.iter().rev() {
                // The last task leaves a cgroup shortly after it is reaped;
                // bounded retry. A shared parent may still be in use elsewhere.
                let deadline = Instant::now() + Duration::from_secs(2);
                while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Mount points from /proc/self/mountinfo whose file system type is `fstype`
    /// and whose super options contain `option` (if given).
    fn mounts_of(fstype: &str, option: Option<&str>) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        text.lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut right = right.split(' ');
                let (kind, _source, options) = (right.next()?, right.next()?, right.next()?);
                let wanted = kind == fstype
                    && option.is_none_or(|option| options.split(',').any(|o| o == option));
                if !wanted {
                    return None;
                }
                Some(PathBuf::from(left.split(' ').nth(4)?))
            })
            .collect()
    }

    /// Puts a new `sleep` into `<mount>/vdsync-test.slice/<service>` and returns
    /// what process_files reads as its unit.
    fn unit_after_moving_into(mount: &Path, service: &str) -> (Option<String>, String) {
        let slice = mount.join("vdsync-test.slice");
        let leaf = slice.join(service);
        let mut guard = CgroupGuard {
            child: None,
            created: Vec::new(),
        };
        for dir in [&slice, &leaf] {
            match std::fs::create_dir(dir) {
                Ok(()) => guard.created.push(dir.clone()),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => panic!("cannot create {}: {err} (is it writable?)", dir.display()),
            }
        }
        let child = sleeper();
        let pid = child.pid();
        guard.child = Some(child);
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let unit = systemd_unit(pid).expect("systemd_unit");
        (unit, text)
    }

    #[test]
    fn systemd_unit_of_a_real_cgroup() {
        let mounts = mounts_of("cgroup2", None);
        let mount = mounts.first().unwrap_or_else(|| {
            panic!("cgroup2 is not mounted (see /proc/self/mountinfo); this test needs it")
        });
        let service = format!("vdsync-test-{}.service", std::process::id());
        let (unit, text) = unit_after_moving_into(mount, &service);
        assert_eq!(unit.as_deref(), Some(service.as_str()), "{text}");

        // On a host whose systemd tracks processes in the v1 name=systemd
        // hierarchy (this test runs at the v2 root then), that hierarchy is read.
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let at_v2_root = own.lines().any(|line| line == "0::/");
        if let (true, Some(legacy)) = (
            at_v2_root,
            mounts_of("cgroup", Some("name=systemd")).first(),
        ) {
            let service = format!("vdsync-test-{}-v1.service", std::process::id());
            let (unit, text) = unit_after_moving_into(legacy, &service);
            assert_eq!(unit.as_deref(), Some(service.as_str()), "{text}");
        }
    }

    #[test]
    fn systemd_is_init_agrees_with_pid_1() {
        let comm = std::fs::read_to_string("/proc/1/comm").expect("comm of pid 1");
        if comm.trim_end() == "systemd" {
            assert!(systemd_is_init());
        } else {
            assert_eq!(systemd_is_init(), Path::new("/run/systemd/system").is_dir());
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(split_nul(b""), Vec::<Vec<u8>>::new());
        assert_eq!(
            split_nul(b"a\0\0b\0"),
            vec![b"a".to_vec(), vec![], b"b".to_vec()]
        );
        assert_eq!(split_nul(b"unterminated"), vec![b"unterminated".to_vec()]);
        let inside = |root: &str, path: &str| inside_root(Path::new(root), Path::new(path));
        assert_eq!(inside("/", "/usr/bin/x"), Some(PathBuf::from("/usr/bin/x")));
        assert_eq!(
            inside("/srv/a", "/srv/a/bin/x"),
            Some(PathBuf::from("/bin/x"))
        );
        assert_eq!(inside("/srv/a", "/srv/a"), Some(PathBuf::from("/")));
        assert_eq!(inside("/srv/a", "/srv/ab/bin/x"), None);
        assert_eq!(
            undeleted(PathBuf::from("/nonexistent/x (deleted)"), None),
            Path::new("/nonexistent/x")
        );
        assert_eq!(
            undeleted(PathBuf::from("/usr/bin/x"), None),
            Path::new("/usr/bin/x")
        );
    }
}
