//! Fixtures for end-to-end tests: a repository server on port 0, the `vdsync` binary
//! run as a subprocess, children killed with their process group at teardown,
//! bounded waits, and an independent description of a tree to compare roots.
//!
//! The tree description deliberately does not reuse vdsync's own scanner: a bug
//! there must not be able to hide itself in the comparison.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    if let Err(message) = try_wait_until(timeout, what, || Ok::<bool, String>(condition())) {
        panic!("{message}");
    }
}

/// Polls `condition` every 20 ms until it returns true and returns how long that
/// took. An error from the condition ends the wait at once (there is no point waiting
/// for a process that has died); so does `timeout`, with a message naming `what`.
pub fn try_wait_until<E: std::fmt::Display>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<bool, E>,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        match condition() {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => {}
            Err(err) => return Err(format!("while waiting for {what}: {err}")),
        }
        if started.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process in its own process group, killed (with the group) on drop.
pub struct GroupChild {
    pub child: Child,
}

impl GroupChild {
    pub fn spawn(command: &mut Command) -> GroupChild {
        let child = command
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot spawn {command:?}: {err}"));
        GroupChild { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit (after a signal the caller
    /// sent) and returns its status; fails naming `what` if it does not.
    pub fn wait_within(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let mut status = None;
        wait_until(timeout, what, || {
            status = self.child.try_wait().expect("cannot check on the child");
            status.is_some()
        });
        status.expect("wait_until returns once the process has exited")
    }

    /// SIGKILL to the whole group, then reap.
    pub fn kill(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `vdsync` binary under test.
#[derive(Clone)]
pub struct Vdsync {
    pub binary: PathBuf,
}

impl Vdsync {
    pub fn new(binary: impl Into<PathBuf>) -> Vdsync {
        Vdsync {
            binary: binary.into(),
        }
    }

    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(&self.binary);
        // A repository URL from the caller's shell must not leak into a test.
        command
            .args(args)
            .env("VDSYNC_LOG", "info")
            .env_remove("VDSYNC_REPO");
        command
    }

    /// [`Vdsync::command`] run as PID 1 of a PID namespace of its own (`unshare --pid
    /// --fork --mount-proc`): it sees only its own processes in /proc, as on a machine
    /// of its own, or as in a container.
    pub fn command_in_own_pid_namespace<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let plain = self.command(args);
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(plain.get_program())
            .args(plain.get_args());
        for (name, value) in plain.get_envs() {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    /// Runs to completion and returns the output, whatever the exit status; see
    /// [`output_within`] for a command that outlives [`COMMAND_TIMEOUT`].
    pub fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        output_within(&mut self.command(args), COMMAND_TIMEOUT)
    }

    /// Runs to completion and panics, showing stderr, unless it exits 0.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.output(&args);
        assert!(
            output.status.success(),
            "vdsync {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// How long one command run by [`Vdsync::output`] may take: far more than any of
/// them needs, far less than CI waits before it gives up on the whole run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `command` (stdin empty, stdout and stderr captured) to completion. If it is
/// still running after `timeout`, it gets SIGKILL and the test fails naming it and
/// showing what it wrote, instead of hanging.
pub fn output_within(command: &mut Command, timeout: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    // The pidfd names this child even once its pid could be reused.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap_or_else(|err| panic!("pidfd_open for {command:?}: {err}"));
    let (finished, wait_for_finish) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let late = wait_for_finish.recv_timeout(timeout)
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if late {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        }
        late
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("cannot wait for {command:?}: {err}"));
    let _ = finished.send(());
    if watchdog.join().unwrap_or(false) {
        panic!(
            "{command:?} was still running after {timeout:?} and was killed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Spawns `vdsync track` (`command`, its stdout made a pipe here) in its own process
/// group and waits for its first line, "tracking ...": its marks are in place from
/// then on. Returns the process (its stdout still a pipe, for the line it prints as
/// it stops) and that line.
pub fn spawn_tracker(command: &mut Command) -> (GroupChild, String) {
    command.stdout(Stdio::piped());
    let mut tracker = GroupChild::spawn(command);
    let mut line = String::new();
    if let Some(stdout) = tracker.child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let _ = reader.read_line(&mut line);
        // Nothing more is written before it stops: the buffer holds no more.
        tracker.child.stdout = Some(reader.into_inner());
    }
    assert!(line.starts_with("tracking "), "the tracker said {line:?}");
    (tracker, line)
}

/// A repository (`repo init` + `repo serve` on port 0) in a temporary directory.
pub struct TestRepo {
    pub url: String,
    pub data: PathBuf,
    pub server: GroupChild,
}

impl TestRepo {
    /// Initializes a repository from `tree` under `dir/repo` and serves it.
    pub fn start(vdsync: &Vdsync, dir: &Path, tree: &Path) -> TestRepo {
        let data = dir.join("repo");
        vdsync.ok([
            OsStr::new("repo"),
            OsStr::new("init"),
            OsStr::new("--data"),
            data.as_os_str(),
            OsStr::new("--from-dir"),
            tree.as_os_str(),
        ]);
        TestRepo::serve(vdsync, &data)
    }

    /// Serves an existing data directory.
    pub fn serve(vdsync: &Vdsync, data: &Path) -> TestRepo {
        let (server, url) = spawn_repository(vdsync, data, Stdio::null())
            .unwrap_or_else(|message| panic!("{message}"));
        TestRepo {
            url,
            data: data.to_path_buf(),
            server,
        }
    }
}

/// How long `repo serve` gets to print its address.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts `vdsync repo serve` on a free loopback port (in its own process group,
/// killed with the returned guard) and returns it with its URL, read from the first
/// line it prints. `stderr` is where its log goes.
pub fn spawn_repository(
    vdsync: &Vdsync,
    data: &Path,
    stderr: Stdio,
) -> Result<(GroupChild, String), String> {
    const ANNOUNCEMENT: &str = "vdsync repository listening on ";
    let mut command = vdsync.command([
        OsStr::new("repo"),
        OsStr::new("serve"),
        OsStr::new("--data"),
        data.as_os_str(),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
    ]);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut server = GroupChild::spawn(&mut command);
    let stdout = server
        .child
        .stdout
        .take()
        .ok_or("the repository's stdout was not captured")?;
    // Read on a thread because std has no read with a timeout; the thread then keeps
    // draining stdout so the server never blocks on a full pipe.
    let (first_line_sender, first_line_receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = first_line_sender.send(reader.read_line(&mut line).map(|_| line));
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = match first_line_receiver.recv_timeout(SERVER_START_TIMEOUT) {
        Ok(Ok(line)) => line,
        Ok(Err(err)) => return Err(format!("cannot read the repository's output: {err}")),
        Err(_) => {
            return Err(format!(
                "the repository printed nothing within {SERVER_START_TIMEOUT:?}"
            ))
        }
    };
    match line.trim_end().strip_prefix(ANNOUNCEMENT) {
        Some(url) if url.starts_with("http://") => Ok((server, url.to_owned())),
        // An empty first line means the server exited before announcing itself.
        _ => Err(format!(
            "the repository did not announce its address (first line {:?})",
            line.trim_end()
        )),
    }
}

/// One path of a tree as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Length and BLAKE3 of a file's content; the target for symlinks; rdev for
    /// devices.
    pub content: Vec<u8>,
    /// For files with more than one link: the smallest path sharing the inode.
    pub link_group: Option<Vec<u8>>,
}

/// Describes every path under `root` (not `root` itself), skipping `skip` names at
/// the top level.
pub fn describe_tree(root: &Path, skip: &[&str]) -> BTreeMap<Vec<u8>, Described> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    walk(root, root, skip, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: &[&str],
    out: &mut BTreeMap<Vec<u8>, Described>,
    inodes: &mut BTreeMap<u64, Vec<u8>>,
) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display()))
        .map(|item| item.expect("dir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        if dir == root && skip.iter().any(|s| OsStr::new(s) == name) {
            continue;
        }
        let path = dir.join(&name);
        let relative = path
            .strip_prefix(root)
            .expect("below root")
            .as_os_str()
            .as_bytes()
            .to_vec();
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let file_type = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let (kind, content) = if file_type.is_dir() {
            ("dir", Vec::new())
        } else if file_type.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&path)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if file_type.is_file() {
            ("file", content_digest(&path))
        } else if file_type.is_fifo() {
            ("fifo", Vec::new())
        } else if file_type.is_char_device() {
            ("char", meta.rdev().to_le_bytes().to_vec())
        } else if file_type.is_block_device() {
            ("block", meta.rdev().to_le_bytes().to_vec())
        } else {
            ("socket", Vec::new())
        };
        let link_group = (file_type.is_file() && meta.nlink() > 1).then(|| {
            inodes
                .entry(meta.ino())
                .or_insert_with(|| relative.clone())
                .clone()
        });
        out.insert(
            relative,
            Described {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                xattrs: xattrs(&path),
                content,
                link_group,
            },
        );
        if file_type.is_dir() {
            walk(root, &path, skip, out, inodes);
        }
    }
}

/// Length and BLAKE3 of the content, read in 1 MiB pieces.
fn content_digest(path: &Path) -> Vec<u8> {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = blake3::Hasher::new();
    let length = std::io::copy(&mut file, &mut hasher).expect("read");
    let mut digest = length.to_le_bytes().to_vec();
    digest.extend_from_slice(hasher.finalize().as_bytes());
    digest
}

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 64 * 1024];
    let Ok(len) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return Vec::new();
    };
    names.truncate(len);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 * 1024];
        let got = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..])
            .expect("lgetxattr");
        value.truncate(got);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Every difference between two described trees, one per line; `None` if equal.
pub fn tree_differences(
    expected: &BTreeMap<Vec<u8>, Described>,
    actual: &BTreeMap<Vec<u8>, Described>,
) -> Option<String> {
    if expected == actual {
        return None;
    }
    let mut report = String::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => report.push_str(&format!("missing: {}\n", String::from_utf8_lossy(path))),
            Some(got) if got != want => report.push_str(&format!(
                "differs: {}\n  expected {want:?}\n  actual   {got:?}\n",
                String::from_utf8_lossy(path)
            )),
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        report.push_str(&format!("unexpected: {}\n", String::from_utf8_lossy(path)));
    }
    Some(report)
}

/// Asserts two trees are equal, printing the differences readably.
pub fn assert_trees_equal(
    expected: &BTreeMap<Vec<u8>, Described>,
    actual: &BTreeMap<Vec<u8>, Described>,
) {
    if let Some(report) = tree_differences(expected, actual) {
        panic!("trees differ:\n{report}");
    }
}

/// Temporary directories, re-exported so tests need not name tempfile.
pub use tempfile::{tempdir, Builder as TempBuilder, TempDir};

// Fixtures for process-handling tests: the vdsync-testd helper daemon, real nginx and
// redis-server running from test trees, and the /proc reading they share.
mod nginx;
mod processes;
mod redis;
mod testd;

pub use nginx::{
    http_get, nginx_config, HttpResponse, Nginx, NGINX_BINARY, NGINX_CONF_RELATIVE,
    NGINX_WORKER_PROCESSES,
};
pub use processes::{
    all_pids, free_loopback_port, kill_and_wait, pids_listening_on, pids_with_cmdline_containing,
    process_children, process_cmdline, process_comm, process_is_running, process_stat,
    signal_and_wait, terminate_until_none_left, ProcessStat,
};
pub use redis::{
    redis_config, redis_ping, Redis, REDIS_BINARY_RELATIVE, REDIS_CONF_RELATIVE,
    REDIS_SERVER_BINARY,
};
pub use testd::{read_testd_report, testd_binary, wait_for_report, TestdReport};

/// Copies an executable that is about to be run. Done by `/bin/cp` in its own
/// process: a copy written by this (multi-threaded) test process leaves a writable
/// descriptor that a concurrent fork in another test can inherit for a moment, and
/// exec of the copy then fails with ETXTBSY ("Text file busy").
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("/bin/cp")
        .arg("--")
        .arg(from)
        .arg(to)
        .status()
        .unwrap_or_else(|err| panic!("cannot run /bin/cp: {err}"));
    assert!(
        status.success(),
        "cp {} {} failed",
        from.display(),
        to.display()
    );
}

/// A file system mounted for a test, lazily unmounted when dropped (a process
/// that still holds a descriptor on it does not make the unmount fail).
pub struct Mount {
    pub path: PathBuf,
}

impl Mount {
    /// A fresh ext4 file system of `megabytes` in the image file `image`, mounted
    /// through a loop device at `at` (created if missing). One inode per 4 KiB, for
    /// trees of small files; inode tables and journal written by mkfs, so that no
    /// background initialisation competes with what is measured on it.
    pub fn ext4_image(image: &Path, megabytes: u32, at: &Path) -> Mount {
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-i", "4096"])
                .args([
                    "-E",
                    "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
                ])
                .arg(image)
                .arg(format!("{megabytes}M")),
        );
        std::fs::create_dir_all(at).unwrap_or_else(|err| panic!("mkdir {}: {err}", at.display()));
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(at),
        );
        Mount {
            path: at.to_path_buf(),
        }
    }

    /// A tmpfs mounted at `at` (created if missing).
    pub fn tmpfs(at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap_or_else(|err| panic!("mkdir {}: {err}", at.display()));
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64m", "vdsync-test"])
                .arg(at),
        );
        Mount {
            path: at.to_path_buf(),
        }
    }
}

impl Mount {
    /// Unmounts now, as an operator would (`umount`, not lazily): fails the test if
    /// something keeps the file system busy.
    pub fn unmount(self) {
        run_ok(Command::new("umount").arg(&self.path));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn run_ok(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
