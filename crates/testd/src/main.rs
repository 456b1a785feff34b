//! `vdsync-testd`: a small daemon that vdsync's process-handling tests start, then
//! let vdsync stop, restart or reload, and finally inspect. It writes down how it was
//! started (pid, credentials, cwd, root, environment, limits, ...) and how often it
//! re-read its configuration, so a test can tell a restart (new pid, same
//! everything else) from a reload (same pid, `reloads` went up) from nothing at all.
//!
//! It is a test fixture, never shipped and not part of vdsync itself; the tests copy
//! the built binary into a test tree and run that copy, so that replacing the copy is
//! a binary update.
//!
//! ```text
//! vdsync-testd --report FILE [--config FILE] [--hold FILE]... [--map FILE]...
//!              [--hup reread|ignore|noop|default] [--child] [--kill-child-on-exit]
//! ```
//!
//! - `--report FILE`: where the JSON report goes. It is written once all of the
//!   options below have taken effect (so a test that sees the report can signal the
//!   daemon safely), and rewritten after every configuration re-read; each write
//!   replaces the file by rename, so readers never see half a report.
//! - `--config FILE`: read at start; its content is in the report.
//! - `--hup MODE`: what SIGHUP does. `reread` (the default with `--config`, and only
//!   allowed with it) opens and reads the configuration afresh (a new `open()`, so a
//!   file replaced by rename is seen, and fanotify sees an open), increments
//!   `reloads` and rewrites the report. `ignore` sets SIGHUP to `SIG_IGN`. `noop`
//!   (the default without `--config`) catches SIGHUP and does nothing. `default`
//!   sets SIGHUP's default action explicitly (the process dies), so even a daemon
//!   started under `nohup` dies.
//! - `--hold FILE`: keeps FILE open (read-only) for the daemon's lifetime.
//! - `--map FILE`: maps FILE read-only and shared for the daemon's lifetime; the
//!   descriptor is closed after mapping, so the mapping is the only reference and a
//!   test sees a mapped file, not an open one.
//! - `--child`: starts one child that re-executes this same program image (through
//!   `/proc/self/exe`, so even a binary that was replaced on disk re-executes the old
//!   image, as a forking daemon would run its old code) with `--report FILE.child`,
//!   the same `--config`, `--hold`, `--map` and `--hup`, and no `--child`. Re-exec
//!   rather than a bare fork so that the child writes its own report. The parent
//!   records `child_pid` and reaps the child if it dies. The parent's report does
//!   not wait for the child's: signal the child only once its own report exists.
//! - `--kill-child-on-exit` (needs `--child`): on SIGTERM the parent sends SIGTERM to
//!   its child and waits for it before exiting; without it the child is left behind.
//!
//! SIGTERM makes the daemon exit 0 without touching the report. Bad arguments or a
//! failure to start exit non-zero with one line on stderr.
//!
//! Signal handlers only write the signal's number into a self-pipe; the main loop
//! waits on that pipe and does the real work, because almost nothing (allocating,
//! reading files, writing JSON) is async-signal-safe.

// This crate is a test helper that makes raw libc calls (sigaction, mmap, getresuid,
// ...) which have no safe std equivalent; the workspace denies `unsafe` so that
// vdsync's own crates keep it in `sys`, and this fixture is the deliberate exception.
// Every unsafe block says why it is sound.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Serialize;

const USAGE: &str = "usage: vdsync-testd --report FILE [--config FILE] [--hold FILE]... \
[--map FILE]... [--hup reread|ignore|noop|default] [--child] [--kill-child-on-exit]";

/// What SIGHUP does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HupMode {
    Reread,
    Ignore,
    Noop,
    Default,
}

impl HupMode {
    fn name(self) -> &'static str {
        match self {
            HupMode::Reread => "reread",
            HupMode::Ignore => "ignore",
            HupMode::Noop => "noop",
            HupMode::Default => "default",
        }
    }

    fn parse(value: &OsStr) -> Result<HupMode, String> {
        match value.as_bytes() {
            b"reread" => Ok(HupMode::Reread),
            b"ignore" => Ok(HupMode::Ignore),
            b"noop" => Ok(HupMode::Noop),
            b"default" => Ok(HupMode::Default),
            _ => Err(format!(
                "--hup must be reread, ignore, noop or default, not {:?}",
                value
            )),
        }
    }
}

/// The parsed command line.
#[derive(Debug)]
struct Options {
    report: PathBuf,
    config: Option<PathBuf>,
    hold: Vec<PathBuf>,
    map: Vec<PathBuf>,
    hup: HupMode,
    child: bool,
    kill_child_on_exit: bool,
}

/// Parses the arguments after the program name.
fn parse_options(arguments: &[OsString]) -> Result<Options, String> {
    let mut report = None;
    let mut config = None;
    let mut hold = Vec::new();
    let mut map = Vec::new();
    let mut hup = None;
    let mut child = false;
    let mut kill_child_on_exit = false;
    let mut remaining = arguments.iter();
    while let Some(argument) = remaining.next() {
        let mut value_of = |name: &str| {
            remaining
                .next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match argument.as_bytes() {
            b"--report" => report = Some(value_of("--report")?),
            b"--config" => config = Some(value_of("--config")?),
            b"--hold" => hold.push(value_of("--hold")?),
            b"--map" => map.push(value_of("--map")?),
            b"--hup" => hup = Some(HupMode::parse(value_of("--hup")?.as_os_str())?),
            b"--child" => child = true,
            b"--kill-child-on-exit" => kill_child_on_exit = true,
            _ => return Err(format!("unknown argument {argument:?}")),
        }
    }
    let report = report.ok_or("--report is required")?;
    let hup = match hup {
        Some(HupMode::Reread) if config.is_none() => {
            return Err("--hup reread needs --config".to_owned())
        }
        Some(mode) => mode,
        None if config.is_some() => HupMode::Reread,
        None => HupMode::Noop,
    };
    if kill_child_on_exit && !child {
        return Err("--kill-child-on-exit needs --child".to_owned());
    }
    Ok(Options {
        report,
        config,
        hold,
        map,
        hup,
        child,
        kill_child_on_exit,
    })
}

/// The JSON report. Strings that are not UTF-8 (paths, environment) are converted
/// lossily: the tests only use UTF-8.
#[derive(Debug, Clone, Serialize)]
struct Report {
    pid: u32,
    ppid: u32,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: String,
    /// `readlink /proc/self/root`: `/` unless the daemon runs chrooted.
    root: String,
    /// `readlink /proc/self/exe` at start.
    exe: String,
    resuid: [u32; 3],
    resgid: [u32; 3],
    groups: Vec<u32>,
    umask: u32,
    /// `RLIM_INFINITY` shows as `u64::MAX`.
    rlimit_nofile: [u64; 2],
    sid: i32,
    hup: &'static str,
    /// The configuration's content as last read; `None` without `--config`.
    config: Option<String>,
    /// How many times SIGHUP made the daemon re-read its configuration.
    reloads: u64,
    child_pid: Option<u32>,
}

fn lossy(value: &OsStr) -> String {
    value.to_string_lossy().into_owned()
}

/// Describes the running process; `config` and `child_pid` are filled in later.
fn describe_self(hup: HupMode) -> Result<Report, String> {
    let cwd = std::env::current_dir().map_err(|err| format!("cannot get the cwd: {err}"))?;
    let root = std::fs::read_link("/proc/self/root")
        .map_err(|err| format!("cannot read /proc/self/root: {err}"))?;
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|err| format!("cannot read /proc/self/exe: {err}"))?;
    let (mut real_uid, mut effective_uid, mut saved_uid) = (0, 0, 0);
    // SAFETY: getresuid only writes the three integers it is given pointers to.
    if unsafe { libc::getresuid(&mut real_uid, &mut effective_uid, &mut saved_uid) } != 0 {
        return Err(format!("getresuid: {}", io::Error::last_os_error()));
    }
    let (mut real_gid, mut effective_gid, mut saved_gid) = (0, 0, 0);
    // SAFETY: getresgid only writes the three integers it is given pointers to.
    if unsafe { libc::getresgid(&mut real_gid, &mut effective_gid, &mut saved_gid) } != 0 {
        return Err(format!("getresgid: {}", io::Error::last_os_error()));
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given a pointer to.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    // SAFETY: getsid(0) asks about the calling process and touches no memory.
    let sid = unsafe { libc::getsid(0) };
    if sid < 0 {
        return Err(format!("getsid: {}", io::Error::last_os_error()));
    }
    Ok(Report {
        pid: std::process::id(),
        ppid: std::os::unix::process::parent_id(),
        argv: std::env::args_os()
            .map(|argument| lossy(&argument))
            .collect(),
        env: std::env::vars_os()
            .map(|(name, value)| (lossy(&name), lossy(&value)))
            .collect(),
        cwd: lossy(cwd.as_os_str()),
        root: lossy(root.as_os_str()),
        exe: lossy(exe.as_os_str()),
        resuid: [real_uid, effective_uid, saved_uid],
        resgid: [real_gid, effective_gid, saved_gid],
        groups: supplementary_groups()?,
        umask: umask()?,
        rlimit_nofile: [limit.rlim_cur, limit.rlim_max],
        sid,
        hup: hup.name(),
        config: None,
        reloads: 0,
        child_pid: None,
    })
}

fn supplementary_groups() -> Result<Vec<u32>, String> {
    // SAFETY: with a size of 0, getgroups only returns the count and writes nothing.
    let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if count < 0 {
        return Err(format!("getgroups: {}", io::Error::last_os_error()));
    }
    let mut groups: Vec<libc::gid_t> = vec![0; count as usize];
    // SAFETY: the buffer holds `count` gids, the size passed; getgroups writes at
    // most that many.
    let written = unsafe { libc::getgroups(count, groups.as_mut_ptr()) };
    if written < 0 {
        return Err(format!("getgroups: {}", io::Error::last_os_error()));
    }
    groups.truncate(written as usize);
    Ok(groups)
}

/// The umask, from /proc rather than umask(2), which can only be read by changing it.
fn umask() -> Result<u32, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|err| format!("cannot read /proc/self/status: {err}"))?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))
        .ok_or("/proc/self/status has no Umask line")?;
    u32::from_str_radix(value.trim(), 8).map_err(|err| format!("bad Umask {value:?}: {err}"))
}

/// Writes the report to a temporary file beside `path` and renames it into place.
fn write_report(path: &Path, report: &Report) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(report)
        .map_err(|err| format!("cannot serialize the report: {err}"))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, json)
        .map_err(|err| format!("cannot write {}: {err}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|err| {
        format!(
            "cannot rename {} to {}: {err}",
            temporary.display(),
            path.display()
        )
    })
}

/// A fresh `open()` and read each time, never a cached descriptor: a configuration
/// replaced by rename must be seen, and fanotify must see the open.
fn read_config(path: &Path) -> Result<String, String> {
    let bytes =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Maps `path` read-only and shared, for good, and closes its descriptor.
fn map_for_lifetime(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|err| format!("cannot open {}: {err}", path.display()))?;
    let length = file
        .metadata()
        .map_err(|err| format!("cannot stat {}: {err}", path.display()))?
        .len();
    if length == 0 {
        return Err(format!("cannot map {}: it is empty", path.display()));
    }
    let length =
        usize::try_from(length).map_err(|_| format!("cannot map {}: too large", path.display()))?;
    // SAFETY: a new read-only mapping at an address the kernel chooses; it overlaps no
    // Rust object, nothing reads through it, and it is never unmapped, so nothing can
    // dangle. The descriptor is valid for the duration of the call.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(format!(
            "cannot map {}: {}",
            path.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The write end of the self-pipe, for the signal handler; -1 until installed.
static SIGNAL_PIPE_WRITE_END: AtomicI32 = AtomicI32::new(-1);

/// The signal handler: writes the signal's number (all handled ones fit in a byte)
/// into the self-pipe. Only `write` is called, which is async-signal-safe; errno is
/// restored so the interrupted code does not see it change.
extern "C" fn forward_signal_to_pipe(signal: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno, valid for reads and writes.
    let saved_errno = unsafe { *libc::__errno_location() };
    let byte = signal as u8;
    let write_end = SIGNAL_PIPE_WRITE_END.load(Ordering::Relaxed);
    // SAFETY: the buffer is one valid byte on the stack. The pipe is non-blocking, so
    // a full pipe drops the byte instead of deadlocking the handler; the main loop
    // still wakes up for the bytes already in it.
    unsafe { libc::write(write_end, (&byte as *const u8).cast(), 1) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Creates the non-blocking, close-on-exec self-pipe: (read end, write end).
fn create_signal_pipe() -> Result<(File, OwnedFd), String> {
    let mut descriptors: [libc::c_int; 2] = [-1, -1];
    // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
    if unsafe { libc::pipe2(descriptors.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(format!("pipe2: {}", io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    let (read_end, write_end) = unsafe {
        (
            OwnedFd::from_raw_fd(descriptors[0]),
            OwnedFd::from_raw_fd(descriptors[1]),
        )
    };
    Ok((File::from(read_end), write_end))
}

/// What a signal's disposition becomes.
enum Disposition {
    ForwardToPipe,
    Ignore,
    Default,
}

fn set_disposition(signal: libc::c_int, disposition: Disposition) -> Result<(), String> {
    let handler = match disposition {
        Disposition::ForwardToPipe => {
            forward_signal_to_pipe as extern "C" fn(libc::c_int) as libc::sighandler_t
        }
        Disposition::Ignore => libc::SIG_IGN,
        Disposition::Default => libc::SIG_DFL,
    };
    // SAFETY: sigaction is a plain C struct for which all zeroes is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    // SA_RESTART so that a signal does not turn the std file I/O of a reread into
    // EINTR errors.
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sigemptyset initialises the mask inside our own struct; sigaction reads
    // that struct and, with a null old-action pointer, writes nothing. The handler
    // only calls async-signal-safe functions.
    let result = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    if result != 0 {
        return Err(format!(
            "sigaction({signal}): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Blocks until at least one signal arrived and returns those that did, in order.
fn wait_for_signals(read_end: &File) -> Result<Vec<libc::c_int>, String> {
    let mut poll_descriptor = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, and the count says one.
        let ready = unsafe { libc::poll(&mut poll_descriptor, 1, -1) };
        if ready >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(format!("poll: {err}"));
        }
    }
    let mut signals = Vec::new();
    let mut buffer = [0u8; 64];
    loop {
        match (&*read_end).read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => signals.extend(buffer[..count].iter().map(|&byte| byte as libc::c_int)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(format!("cannot read the signal pipe: {err}")),
        }
    }
    Ok(signals)
}

/// Re-executes this program image as the child described in the module docs.
fn spawn_child(options: &Options) -> Result<Child, String> {
    let mut child_report = options.report.as_os_str().to_owned();
    child_report.push(".child");
    let mut command = Command::new("/proc/self/exe");
    if let Some(program_name) = std::env::args_os().next() {
        // The same argv[0], so the child's /proc/PID/cmdline names the same program.
        command.arg0(program_name);
    }
    command.arg("--report").arg(child_report);
    if let Some(config) = &options.config {
        command.arg("--config").arg(config);
    }
    for path in &options.hold {
        command.arg("--hold").arg(path);
    }
    for path in &options.map {
        command.arg("--map").arg(path);
    }
    command.arg("--hup").arg(options.hup.name());
    command
        .spawn()
        .map_err(|err| format!("cannot start the child: {err}"))
}

/// Sends SIGTERM to `child` (unless it already exited) and waits for it.
fn terminate_child(child: &mut Child) -> Result<(), String> {
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(());
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill touches no memory. The child has not been reaped (try_wait just
    // said so), so its pid cannot have been reused.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!(
            "cannot signal child {pid}: {}",
            io::Error::last_os_error()
        ));
    }
    child
        .wait()
        .map(|_| ())
        .map_err(|err| format!("cannot wait for child {pid}: {err}"))
}

/// Sets everything up, writes the report, then serves signals until SIGTERM.
fn run(options: Options) -> Result<(), String> {
    let (signal_read_end, signal_write_end) = create_signal_pipe()?;
    SIGNAL_PIPE_WRITE_END.store(signal_write_end.as_raw_fd(), Ordering::Relaxed);
    set_disposition(libc::SIGTERM, Disposition::ForwardToPipe)?;
    set_disposition(libc::SIGCHLD, Disposition::ForwardToPipe)?;
    set_disposition(
        libc::SIGHUP,
        match options.hup {
            HupMode::Reread | HupMode::Noop => Disposition::ForwardToPipe,
            HupMode::Ignore => Disposition::Ignore,
            HupMode::Default => Disposition::Default,
        },
    )?;

    let mut report = describe_self(options.hup)?;
    if let Some(config) = &options.config {
        report.config = Some(read_config(config)?);
    }
    // Kept in scope until the process exits, which keeps the descriptors open.
    let _held_files = options
        .hold
        .iter()
        .map(|path| {
            File::open(path).map_err(|err| format!("cannot open {}: {err}", path.display()))
        })
        .collect::<Result<Vec<File>, String>>()?;
    for path in &options.map {
        map_for_lifetime(path)?;
    }
    let mut child = if options.child {
        let child = spawn_child(&options)?;
        report.child_pid = Some(child.id());
        Some(child)
    } else {
        None
    };
    write_report(&options.report, &report)?;

    loop {
        for signal in wait_for_signals(&signal_read_end)? {
            match signal {
                libc::SIGTERM => {
                    if let (true, Some(child)) = (options.kill_child_on_exit, child.as_mut()) {
                        terminate_child(child)?;
                    }
                    return Ok(());
                }
                libc::SIGHUP if options.hup == HupMode::Reread => {
                    let Some(config) = &options.config else {
                        continue;
                    };
                    // A failed re-read is survived, as a real daemon would keep its
                    // old configuration; the report then stays as it was.
                    match read_config(config) {
                        Ok(content) => {
                            report.config = Some(content);
                            report.reloads += 1;
                            if let Err(message) = write_report(&options.report, &report) {
                                eprintln!("vdsync-testd: {message}");
                            }
                        }
                        Err(message) => eprintln!("vdsync-testd: {message}"),
                    }
                }
                libc::SIGCHLD => {
                    // Reap a child that died so it does not linger as a zombie that
                    // a process scan would still find.
                    if let Some(running) = child.as_mut() {
                        if let Ok(Some(_)) = running.try_wait() {
                            child = None;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn main() -> ExitCode {
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    let options = match parse_options(&arguments) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("vdsync-testd: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vdsync-testd: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Result<Options, String> {
        let arguments: Vec<OsString> = arguments.iter().map(OsString::from).collect();
        parse_options(&arguments)
    }

    #[test]
    fn hup_defaults_to_reread_only_with_a_config() {
        assert_eq!(
            parse(&["--report", "r", "--config", "c"]).map(|o| o.hup),
            Ok(HupMode::Reread)
        );
        assert_eq!(parse(&["--report", "r"]).map(|o| o.hup), Ok(HupMode::Noop));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for arguments in [
            &[][..],
            &["--config", "c"][..],
            &["--report"][..],
            &["--report", "r", "--hup", "reread"][..],
            &["--report", "r", "--hup", "sometimes"][..],
            &["--report", "r", "--kill-child-on-exit"][..],
            &["--report", "r", "--verbose"][..],
        ] {
            assert!(parse(arguments).is_err(), "{arguments:?} was accepted");
        }
    }

    #[test]
    fn repeated_hold_and_map_are_kept() {
        let options = parse(&[
            "--report", "r", "--hold", "a", "--hold", "b", "--map", "m", "--child",
        ])
        .expect("valid arguments");
        assert_eq!(options.hold, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(options.map, [PathBuf::from("m")]);
        assert!(options.child);
    }
}
