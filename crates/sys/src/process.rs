//! Reading processes from /proc, capturing what it takes to start one again, and
//! starting it again detached. (Being written: see the signatures.)

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A file as the kernel knows it: device and inode. Processes are matched with the
/// files being replaced by this, never by path string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
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
    /// The systemd unit from /proc/PID/cgroup, if the process is in one.
    pub systemd_unit: Option<String>,
}

/// Where a standard descriptor of a process pointed when it was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioTarget {
    /// `/dev/null`, or anything that cannot be reopened (a pipe, a socket, a
    /// terminal that is gone): the restarted process gets `/dev/null`.
    Null,
    /// A regular file, reopened for appending (stdout, stderr) or reading (stdin).
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

/// Every process id now in /proc (thread-group leaders only).
pub fn list_pids() -> io::Result<Vec<i32>> {
    todo!()
}

/// The identity of `pid` now (its start time read from /proc).
pub fn process_key(pid: i32) -> io::Result<ProcessKey> {
    todo!("{pid}")
}

/// The parent of `pid`.
pub fn parent_of(pid: i32) -> io::Result<i32> {
    todo!("{pid}")
}

/// Reads the files of one process. Fails with `NotFound` if it has exited.
pub fn process_files(pid: i32) -> io::Result<ProcessFiles> {
    todo!("{pid}")
}

/// Captures what it takes to start `pid` again. `cwd` overrides the working
/// directory when the launch directory is known from exec time.
pub fn capture_restore(pid: i32) -> io::Result<RestoreSpec> {
    todo!("{pid}")
}

/// Starts a process as `spec` describes, in a new session, with nothing inherited
/// from the caller but what the spec says. Returns its pid. The caller reaps it.
pub fn spawn_restored(spec: &RestoreSpec) -> io::Result<std::process::Child> {
    todo!("{spec:?}")
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to `key.pid` only if it is still the same
/// process (start time matches). Returns false if it is gone or was replaced.
pub fn signal_process(key: ProcessKey, signal: i32) -> io::Result<bool> {
    todo!("{key:?} {signal}")
}

/// Whether `key` is still running (and not a zombie).
pub fn is_alive(key: ProcessKey) -> bool {
    todo!("{key:?}")
}

/// Waits until `key` has exited or `timeout` passes; true if it exited.
pub fn wait_exit(key: ProcessKey, timeout: Duration) -> io::Result<bool> {
    todo!("{key:?} {timeout:?}")
}

/// The systemd unit a process runs in, from the text of /proc/PID/cgroup
/// (`0::/system.slice/nginx.service` → `nginx.service`); `None` outside a
/// service unit (user sessions, scopes, the root cgroup).
pub fn systemd_unit_of(cgroup_text: &str) -> Option<String> {
    todo!("{cgroup_text}")
}

/// Whether systemd is PID 1 on this machine.
pub fn systemd_is_init() -> bool {
    todo!()
}
