//! Looking at and killing processes through /proc, for fixtures whose processes
//! vdsync may restart: after a restart the process a fixture started is gone, and
//! teardown has to find whichever one now does the job (by command line, by
//! parent, or by who listens on the fixture's port).
//!
//! This is an independent, deliberately simple reading of /proc for tests; it does
//! not reuse `vdsync-sys`, so a bug there cannot hide itself.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use crate::try_wait_until;

/// The few fields of /proc/PID/stat the fixtures need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStat {
    /// The one-letter state: R, S, D, Z, T, ...
    pub state: char,
    pub parent_pid: u32,
    pub process_group: u32,
    pub session: u32,
}

/// Reads /proc/PID/stat; `None` if the process does not exist (any more).
pub fn process_stat(pid: u32) -> Option<ProcessStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces and
    // parentheses, so the fields are counted from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent_pid = fields.next()?.parse().ok()?;
    let process_group = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some(ProcessStat {
        state,
        parent_pid,
        process_group,
        session,
    })
}

/// True if the process exists and is not a zombie. Zombies matter here: pid 1 (the
/// VM's init) reaps orphans only every second or two, so a killed daemon whose
/// parent has gone stays in /proc as a zombie for a while.
pub fn process_is_running(pid: u32) -> bool {
    process_stat(pid).is_some_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
}

/// Every pid in /proc, in ascending order.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The running (non-zombie) children of `pid`.
pub fn process_children(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&candidate| {
            process_stat(candidate)
                .is_some_and(|stat| stat.parent_pid == pid && !matches!(stat.state, 'Z' | 'X'))
        })
        .collect()
}

/// /proc/PID/cmdline split at NULs; `None` if the process is gone. A process that
/// rewrote its title (nginx does, Redis can) shows the title here, often as a single
/// argument with spaces in it.
pub fn process_cmdline(pid: u32) -> Option<Vec<OsString>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&byte| byte == 0)
            .filter(|argument| !argument.is_empty())
            .map(|argument| OsString::from_vec(argument.to_vec()))
            .collect(),
    )
}

/// /proc/PID/comm without its newline; `None` if the process is gone.
pub fn process_comm(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// Running processes whose command line, joined with spaces, contains `needle`.
/// Joining makes this work the same for a normal argv and for a rewritten title.
pub fn pids_with_cmdline_containing(needle: &str) -> Vec<u32> {
    let own_pid = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != own_pid && process_is_running(pid))
        .filter(|&pid| {
            process_cmdline(pid).is_some_and(|arguments| {
                let joined: Vec<String> = arguments
                    .iter()
                    .map(|argument| argument.to_string_lossy().into_owned())
                    .collect();
                joined.join(" ").contains(needle)
            })
        })
        .collect()
}

/// Inodes of the TCP sockets (IPv4 and IPv6, any address) listening on `port`.
fn listening_socket_inodes(port: u16) -> BTreeSet<u64> {
    const LISTEN_STATE: &str = "0A";
    let port_suffix = format!(":{port:04X}");
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(content) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in content.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[1].ends_with(&port_suffix) && fields[3] == LISTEN_STATE {
                if let Ok(inode) = fields[9].parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

/// Running processes holding a socket that listens on TCP `port` (a forking server's
/// master and workers all do).
pub fn pids_listening_on(port: u16) -> Vec<u32> {
    let inodes = listening_socket_inodes(port);
    if inodes.is_empty() {
        return Vec::new();
    }
    let links: BTreeSet<String> = inodes
        .iter()
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    all_pids()
        .into_iter()
        .filter(|&pid| process_is_running(pid))
        .filter(|&pid| {
            let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                return false;
            };
            descriptors.filter_map(Result::ok).any(|descriptor| {
                std::fs::read_link(descriptor.path())
                    .is_ok_and(|target| links.contains(target.to_string_lossy().as_ref()))
            })
        })
        .collect()
}

/// Sends `signal` to every process in `pids` that is still running, then waits (up
/// to `timeout`) until none is. Errors name the processes waited for.
pub fn signal_and_wait(
    pids: &[u32],
    signal: rustix::process::Signal,
    timeout: Duration,
) -> Result<(), String> {
    for &pid in pids {
        if !process_is_running(pid) {
            continue;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            // Failure means it died meanwhile, which is what we want.
            let _ = rustix::process::kill_process(pid, signal);
        }
    }
    try_wait_until(timeout, &format!("processes {pids:?} to exit"), || {
        Ok::<bool, String>(pids.iter().all(|&pid| !process_is_running(pid)))
    })
    .map(|_| ())
}

/// Sends SIGKILL to every process in `pids` that is still running and waits (up to
/// `timeout`) until none is.
pub fn kill_and_wait(pids: &[u32], timeout: Duration) -> Result<(), String> {
    signal_and_wait(pids, rustix::process::Signal::KILL, timeout)
}

/// Stops what `find` returns, and their children, until `find` returns nothing.
///
/// First SIGTERM to what `find` returns, so that a server shuts down its own
/// workers and reaps them: SIGKILLing a master together with its workers leaves the
/// workers orphaned, and pid 1 here takes a second or two to reap orphans, so they
/// would linger as zombies into the next test. Whatever is left after `timeout` (and anything new: a server being
/// stopped may be mid-restart, or a master mid-fork) gets SIGKILL with its children,
/// for a bounded number of rounds.
pub fn terminate_until_none_left(
    what: &str,
    timeout: Duration,
    mut find: impl FnMut() -> Vec<u32>,
) -> Result<(), String> {
    const KILL_ROUNDS: usize = 10;
    let found = find();
    let mut with_children: BTreeSet<u32> = found.iter().copied().collect();
    for &pid in &found {
        with_children.extend(process_children(pid));
    }
    // Only the topmost: a master stops its own workers, and a worker killed under a
    // live master could be replaced by a new one.
    let topmost = found
        .iter()
        .filter(|&&pid| process_stat(pid).is_none_or(|stat| !found.contains(&stat.parent_pid)));
    for &pid in topmost {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let with_children: Vec<u32> = with_children.into_iter().collect();
    // A timeout here is not an error: the SIGKILL rounds below take over.
    let _ = try_wait_until(timeout, what, || {
        Ok::<bool, String>(with_children.iter().all(|&pid| !process_is_running(pid)))
    });
    for _ in 0..KILL_ROUNDS {
        let mut victims: BTreeSet<u32> = find().into_iter().collect();
        for pid in victims.clone() {
            victims.extend(process_children(pid));
        }
        victims.extend(with_children.iter().filter(|&&pid| process_is_running(pid)));
        if victims.is_empty() {
            return Ok(());
        }
        let victims: Vec<u32> = victims.into_iter().collect();
        kill_and_wait(&victims, timeout)?;
    }
    Err(format!(
        "{what} kept coming back after {KILL_ROUNDS} rounds of SIGKILL"
    ))
}

/// A loopback TCP port that was free a moment ago (bound to port 0, then released).
/// Another process may take it before the caller binds it; tests accept that.
pub fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0: {err}"));
    listener
        .local_addr()
        .unwrap_or_else(|err| panic!("cannot read the bound address: {err}"))
        .port()
}

/// A started server process, reaped by a thread as soon as it exits: if vdsync
/// restarts the server, the original must not linger as our zombie, where process
/// scans (ours and vdsync's) would still see it.
pub(crate) struct ReapedChild {
    pub(crate) pid: u32,
    reaper: Option<std::thread::JoinHandle<Option<std::process::ExitStatus>>>,
}

impl ReapedChild {
    pub(crate) fn new(mut child: std::process::Child) -> ReapedChild {
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait().ok());
        ReapedChild {
            pid,
            reaper: Some(reaper),
        }
    }

    /// True once the process exited (and was reaped).
    pub(crate) fn has_exited(&self) -> bool {
        self.reaper
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Waits for the reaper; call only once the process was killed or exited.
    pub(crate) fn join(&mut self) -> Option<std::process::ExitStatus> {
        self.reaper.take()?.join().ok().flatten()
    }
}
