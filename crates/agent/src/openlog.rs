//! The open log: which live process opened which file, since the agent started —
//! the paper's per-process open list, without its kernel patch.
//!
//! One thread reads two kernel streams: fanotify `FAN_OPEN | FAN_OPEN_EXEC` with the
//! opener's pid (every open on the watched file systems), and the process-events
//! connector (fork, exec, exit of every process). A caller that needs everything
//! queued so far (`catch_up`, before a plan) reads the streams itself, in its own
//! thread, rather than waiting for the log's thread to be scheduled. Processes are
//! keyed by pid *and* start time, so a reused pid never inherits another process's
//! history.
//!
//! Like the paper's list, a process's history is inherited across `fork` (a daemon
//! that reads its configuration and then forks into the background keeps it) and
//! starts afresh at `exec`. What a process opened itself is dropped at the
//! `FAN_OPEN_EXEC` of its new program, in the same fanotify stream as its opens,
//! not at the connector's exec event: the two streams are not ordered with each
//! other, and an open made right after an exec must not be wiped by an exec event
//! read late. Inheritance from its parent ends at whichever exec event comes first.
//! Executions are watched on every mounted file system, opens only on the root's.
//!
//! Inode numbers are reused as soon as a file is deleted, so each open also
//! records the inode's incarnation (its file handle, which holds the generation):
//! a process that opened a deleted temporary file is not taken for a user of the
//! file that later got the same inode number.
//!
//! The launch working directory, argv and environment of every process started
//! while the agent runs are read at its exec event, for restarting it later as it
//! was launched, whatever it did to its /proc entries since.
//!
//! Also here: waiting, after a SIGHUP, for a process (or a descendant) to open an
//! updated file — the verification of a reload.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use vdsync_sys::open_events::{OpenBatch, OpenEvents};
use vdsync_sys::proc_events::{ProcEvent, ProcEvents};
use vdsync_sys::process::{FileId, Incarnation, ProcessFiles, ProcessKey};

/// How many (process, file) pairs the log holds at most; past it, new opens are
/// dropped and the log says it is incomplete.
const MAX_PAIRS: usize = 4_000_000;

/// What a process looked like right at its exec, before it could change it: many
/// daemons rewrite their command line (nginx: "nginx: master process ...") or
/// clear their environment, and change directory, soon after starting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub cwd: PathBuf,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

fn read_launch(pid: i32) -> Option<Launch> {
    let split = |bytes: Vec<u8>| -> Vec<Vec<u8>> {
        bytes
            .split(|byte| *byte == 0)
            .filter(|part| !part.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    Some(Launch {
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?,
        argv: split(std::fs::read(format!("/proc/{pid}/cmdline")).ok()?),
        env: split(std::fs::read(format!("/proc/{pid}/environ")).ok()?),
    })
}

#[derive(Default)]
struct Record {
    /// The process this one was forked from, since its last exec.
    forked_from: Option<ProcessKey>,
    /// Each file opened, with the incarnation of its inode last opened.
    opened: HashMap<FileId, Incarnation>,
    launch: Option<Launch>,
    /// An exec of this process was read, from either stream. The two streams are
    /// not ordered with each other, so its fork may be read after its exec; a fork
    /// read then must not link it to its parent, or everything the parent opens
    /// from then on would count as this process's (should the connector lose the
    /// exec event that would end the link again).
    executed: bool,
    alive: bool,
    /// Live or remembered records whose `forked_from` is this one.
    children: usize,
}

struct Waiter {
    files: HashSet<FileId>,
    ancestor: ProcessKey,
    found: mpsc::Sender<ProcessKey>,
}

#[derive(Default)]
struct State {
    records: HashMap<ProcessKey, Record>,
    live: HashMap<i32, ProcessKey>,
    openers: HashMap<FileId, HashSet<ProcessKey>>,
    pairs: usize,
    waiters: Vec<Waiter>,
    /// Why the log may have missed opens, if it may have.
    incomplete: Option<String>,
    /// Counts the reads of the two streams.
    sequence: u64,
    /// For each live pid that forked or exec'd: the sequence when it last did (for
    /// [`OpenLog::processes`]).
    touched: HashMap<i32, u64>,
    /// For each live pid that opened something (not an exec): the sequence when it
    /// last did.
    opened: HashMap<i32, u64>,
}

/// /proc as last read, kept between plans (see [`OpenLog::processes`]).
#[derive(Default)]
struct ProcessCache {
    /// The log's sequence when the reads began; `None` until the first full read.
    sequence: Option<u64>,
    processes: HashMap<i32, ProcessFiles>,
    /// Pids that are not user processes (kernel threads) or could not be read.
    skipped: HashSet<i32>,
}

/// The running open log. Dropping it stops its thread.
pub struct OpenLog {
    state: Arc<Mutex<State>>,
    /// The two streams, read by the log's thread, or by [`OpenLog::catch_up`] in the
    /// caller's thread (which then waits for no other thread to be scheduled).
    streams: Arc<Mutex<Streams>>,
    /// Wakes the log's thread from its wait (to stop).
    wake: Arc<OwnedFd>,
    cache: Mutex<ProcessCache>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    since: SystemTime,
}

impl OpenLog {
    /// Starts watching the file system of `root`, every file system mounted below
    /// it that can be watched, and the process events. Returns the log and the
    /// mount points below the root that could not be watched (pseudo file systems
    /// such as /proc are not tried).
    pub fn start(root: &Path) -> std::io::Result<(OpenLog, Vec<(PathBuf, String)>)> {
        let mut opens = OpenEvents::watch_filesystems(&[root])?;
        let unwatched = watch_mounts(&mut opens, root);
        let processes = ProcEvents::subscribe()?;
        let state = Arc::new(Mutex::new(State::default()));
        let wake = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Streams {
            opens,
            processes,
            root: root.to_path_buf(),
            mount_table: vdsync_sys::mounts::MountTable::open().ok(),
        }));
        let thread = {
            let streams = Arc::clone(&streams);
            let state = Arc::clone(&state);
            let wake = Arc::clone(&wake);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("open-log".into())
                .spawn(move || run(&streams, &state, &wake, &stop))?
        };
        let log = OpenLog {
            state,
            streams,
            wake,
            cache: Mutex::new(ProcessCache::default()),
            stop,
            thread: Some(thread),
            since: SystemTime::now(),
        };
        Ok((log, unwatched))
    }

    /// When the log started: processes started earlier are known only by /proc.
    pub fn since(&self) -> SystemTime {
        self.since
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock_state(&self.state)
    }

    /// Why the log may be missing opens, if it may.
    pub fn incomplete(&self) -> Option<String> {
        self.lock().incomplete.clone()
    }

    /// For each of `files` (with the incarnation of its inode now), the live
    /// processes that opened it — themselves, or a process they were forked from
    /// since their last exec. An open of an earlier file that had the same inode
    /// number does not count.
    pub fn opened_before(
        &self,
        files: &HashMap<FileId, Incarnation>,
    ) -> HashMap<FileId, Vec<ProcessKey>> {
        let state = self.lock();
        let mut result: HashMap<FileId, Vec<ProcessKey>> = HashMap::new();
        for (file, incarnation) in files {
            let Some(openers) = state.openers.get(file) else {
                continue;
            };
            let opened_this = |member: &ProcessKey| {
                openers.contains(member)
                    && state.records.get(member).is_some_and(|record| {
                        record.opened.get(file).is_some_and(|opened| {
                            *opened == *incarnation || *opened == 0 || *incarnation == 0
                        })
                    })
            };
            let mut keys: Vec<ProcessKey> = state
                .live
                .values()
                .filter(|key| chain(&state, **key).any(|member| opened_this(&member)))
                .copied()
                .collect();
            if !keys.is_empty() {
                keys.sort();
                result.insert(*file, keys);
            }
        }
        result
    }

    /// Returns once every event the kernel queued before the call has been read.
    /// The reading is done here, so that a busy machine need not schedule the log's
    /// thread first.
    pub fn catch_up(&self) {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Two rounds, as the log's thread would: a round reads a bounded number of
        // open events.
        for _ in 0..2 {
            read_round(&mut streams, &self.state);
        }
    }

    /// Every user process as /proc shows it now, reading as little of /proc as the
    /// log allows. A process is read again if it forked or exec'd since the last
    /// call, if it opened one of `wanted` since then (or ever, as far as the log
    /// knows), if it used one of `wanted` then, or if it is in `fresh`; the others
    /// (and kernel threads) are taken from the last call: one that only opened other
    /// files cannot have come to hold one of `wanted`. All are read when the log may
    /// be missing events, or when `everything`.
    ///
    /// What this can miss that a full read would see: a descriptor for one of
    /// `wanted` received from another process (SCM_RIGHTS) by a process that
    /// opened nothing since. The process that opened it is seen.
    pub fn processes(
        &self,
        wanted: &HashSet<FileId>,
        fresh: &HashSet<i32>,
        everything: bool,
    ) -> Vec<ProcessFiles> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Listed first: a process forked after the list is not in it, and one
        // forked before has its fork read by the catch-up.
        let started = std::time::Instant::now();
        let pids = vdsync_sys::process::list_pids().unwrap_or_default();
        let listed = started.elapsed();
        self.catch_up();
        let after_catch_up = started.elapsed();
        let (sequence, changed, incomplete) = {
            let state = self.lock();
            let since = cache.sequence.unwrap_or(0);
            let mut changed: HashSet<i32> = state
                .touched
                .iter()
                .filter(|(_, touched)| **touched >= since)
                .map(|(pid, _)| *pid)
                .collect();
            let opened_wanted = |pid: i32| {
                state.live.get(&pid).is_some_and(|key| {
                    wanted.iter().any(|file| {
                        state
                            .openers
                            .get(file)
                            .is_some_and(|openers| openers.contains(key))
                    })
                })
            };
            changed.extend(
                state
                    .opened
                    .iter()
                    .filter(|(pid, opened)| **opened >= since && opened_wanted(**pid))
                    .map(|(pid, _)| *pid),
            );
            (state.sequence, changed, state.incomplete.is_some())
        };
        let reuse = !incomplete && !everything && cache.sequence.is_some();
        let mut processes = HashMap::with_capacity(pids.len());
        let mut skipped = HashSet::new();
        let mut read = 0usize;
        for pid in pids {
            if reuse && !changed.contains(&pid) && !fresh.contains(&pid) {
                if cache.skipped.contains(&pid) {
                    skipped.insert(pid);
                    continue;
                }
                if let Some(known) = cache.processes.remove(&pid) {
                    if !uses_any(&known, wanted) {
                        processes.insert(pid, known);
                        continue;
                    }
                }
            }
            read += 1;
            match vdsync_sys::process::process_files(pid) {
                Ok(files) => {
                    processes.insert(pid, files);
                }
                Err(_) => {
                    skipped.insert(pid);
                }
            }
        }
        // The parent links of a concerned process's ancestors decide the order of
        // restarts and which family member gets a SIGHUP: a process's parent
        // changes without an event of its own when its parent dies, so these are
        // read again.
        let concerned: Vec<i32> = processes
            .values()
            .filter(|process| uses_any(process, wanted) || fresh.contains(&process.key.pid))
            .map(|process| process.parent)
            .collect();
        for mut current in concerned {
            let mut steps = 0;
            while current > 1 && steps < 64 {
                steps += 1;
                let Some(ancestor) = processes.get_mut(&current) else {
                    break;
                };
                if let Ok(parent) = vdsync_sys::process::parent_of(current) {
                    ancestor.parent = parent;
                }
                current = ancestor.parent;
            }
        }
        tracing::debug!(
            read,
            reused = processes.len() + skipped.len() - read,
            list_ms = listed.as_secs_f64() * 1e3,
            catch_up_ms = after_catch_up.as_secs_f64() * 1e3,
            read_ms = started.elapsed().as_secs_f64() * 1e3,
            "read processes"
        );
        let result: Vec<ProcessFiles> = processes.values().cloned().collect();
        *cache = ProcessCache {
            sequence: Some(sequence),
            processes,
            skipped,
        };
        result
    }

    /// How `key` was launched (directory, argv, environment), if it was launched
    /// while the log ran.
    pub fn launch(&self, key: ProcessKey) -> Option<Launch> {
        self.lock()
            .records
            .get(&key)
            .and_then(|record| record.launch.clone())
    }

    /// Registers a wait for `ancestor` or any process descended from it opening one
    /// of `files`. Register before signalling, then call [`Verification::wait`].
    pub fn expect_open(&self, ancestor: ProcessKey, files: HashSet<FileId>) -> Verification {
        let (found, receiver) = mpsc::channel();
        self.lock().waiters.push(Waiter {
            files,
            ancestor,
            found,
        });
        Verification { receiver }
    }
}

/// A pending reload verification.
pub struct Verification {
    receiver: mpsc::Receiver<ProcessKey>,
}

impl Verification {
    /// The process that opened one of the files, if one did within `window`.
    pub fn wait(self, window: Duration) -> Option<ProcessKey> {
        self.receiver.recv_timeout(window).ok()
    }
}

impl Drop for OpenLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `process` runs, maps or holds open any of `files`.
fn uses_any(process: &ProcessFiles, files: &HashSet<FileId>) -> bool {
    process.exe.is_some_and(|exe| files.contains(&exe))
        || process.mapped.iter().any(|file| files.contains(file))
        || process.open.iter().any(|file| files.contains(file))
}

/// `key`, then the processes it was forked from, nearest first.
fn chain(state: &State, key: ProcessKey) -> impl Iterator<Item = ProcessKey> + '_ {
    let mut next = Some(key);
    let mut steps = 0usize;
    std::iter::from_fn(move || {
        let current = next?;
        steps += 1;
        next = state
            .records
            .get(&current)
            .and_then(|record| record.forked_from)
            .filter(|_| steps < 4096);
        Some(current)
    })
}

/// What the log reads.
struct Streams {
    opens: OpenEvents,
    processes: ProcEvents,
    root: PathBuf,
    /// File systems mounted later are watched too.
    mount_table: Option<vdsync_sys::mounts::MountTable>,
}

/// Marks every file system mounted below `root` for opens and every other one for
/// executions (a process running a program from another file system must not keep
/// inheriting what its parent opened); file systems marked already are skipped.
/// Returns the mounts below the root that could not be watched, with why.
fn watch_mounts(opens: &mut OpenEvents, root: &Path) -> Vec<(PathBuf, String)> {
    let mut unwatched = Vec::new();
    for mount in vdsync_sys::mounts::mounts_below(root) {
        if let Err(err) = opens.also_watch(&mount) {
            unwatched.push((mount, err.to_string()));
        }
    }
    for mount in vdsync_sys::mounts::mount_points() {
        if let Err(err) = opens.also_watch_execs(&mount) {
            tracing::debug!(mount = %mount.display(), error = %err, "open log: executions there are not seen");
        }
    }
    unwatched
}

fn run(streams: &Mutex<Streams>, state: &Mutex<State>, wake: &OwnedFd, stop: &AtomicBool) {
    let lock_streams = || {
        streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    // Copies of the streams' descriptors to wait on without holding the lock
    // (`catch_up` reads meanwhile): the same open files, so the same queues.
    let waited = {
        let streams = lock_streams();
        (
            streams.opens.fd().try_clone_to_owned(),
            streams.processes.fd().try_clone_to_owned(),
        )
    };
    let (opens_fd, processes_fd) = match waited {
        (Ok(opens), Ok(processes)) => (opens, processes),
        (Err(err), _) | (_, Err(err)) => {
            tracing::warn!(error = %err, "open log: cannot wait for events; opens are not seen");
            lock_state(state).incomplete = Some(format!("the open log could not start ({err})"));
            return;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        // Both streams are waited for together, so that neither waits for the
        // other (an exec must be known as soon as possible). Not under the lock:
        // `catch_up` reads meanwhile.
        if let Err(err) = vdsync_sys::wait_any_readable(
            &[opens_fd.as_fd(), processes_fd.as_fd(), wake.as_fd()],
            Duration::from_millis(100),
        ) {
            tracing::warn!(error = %err, "open log: poll failed");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(wake, &mut counter);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if !read_round(&mut lock_streams(), state) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A panic in the reader thread must not take the agent down with it; the data is
/// still a consistent map.
fn lock_state(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads what both streams hold now into `state`; false if reading opens failed.
fn read_round(streams: &mut Streams, state: &Mutex<State>) -> bool {
    let lock = || lock_state(state);
    lock().sequence += 1;
    if streams
        .mount_table
        .as_mut()
        .is_some_and(vdsync_sys::mounts::MountTable::changed)
    {
        for (mount, err) in watch_mounts(&mut streams.opens, &streams.root) {
            tracing::warn!(mount = %mount.display(), error = %err, "open log: a new mount below the root cannot be watched");
            lock().incomplete = Some(format!(
                "opens on the file system mounted at {} are not seen ({err})",
                mount.display()
            ));
        }
    }
    // Process events first: a fork read now links a child whose opens come
    // next; the exec boundary comes from the open stream itself.
    match streams.processes.read(Duration::ZERO) {
        Ok(events) => {
            let mut state = lock();
            for event in events {
                on_process_event(&mut state, event);
            }
        }
        Err(err) => {
            lock().incomplete = Some(format!("process events were lost ({err})"));
        }
    }
    match streams.opens.read(Duration::ZERO) {
        Ok(batch) => {
            on_opens(&mut lock(), batch);
            true
        }
        Err(err) => {
            tracing::warn!(error = %err, "open log: reading fanotify failed");
            lock().incomplete = Some(format!("reading opens failed ({err})"));
            false
        }
    }
}

fn key_of(state: &mut State, pid: i32) -> Option<ProcessKey> {
    if let Some(key) = state.live.get(&pid) {
        return Some(*key);
    }
    let key = vdsync_sys::process::process_key(pid).ok()?;
    state.live.insert(pid, key);
    let record = state.records.entry(key).or_default();
    record.alive = true;
    Some(key)
}

fn on_process_event(state: &mut State, event: ProcEvent) {
    match event {
        ProcEvent::Fork { parent, child } => {
            let Some(parent_key) = key_of(state, parent) else {
                return;
            };
            let Some(child_key) = key_of(state, child) else {
                return;
            };
            state.touched.insert(child, state.sequence);
            let record = state.records.entry(child_key).or_default();
            if record.forked_from.is_none() && !record.executed {
                record.forked_from = Some(parent_key);
                if let Some(parent_record) = state.records.get_mut(&parent_key) {
                    parent_record.children += 1;
                }
            }
        }
        ProcEvent::Exec { pid } => {
            state.touched.insert(pid, state.sequence);
            let Some(key) = key_of(state, pid) else {
                return;
            };
            let launch = read_launch(pid);
            if let Some(record) = state.records.get_mut(&key) {
                record.launch = launch;
                record.executed = true;
            }
            // A new program inherits nothing from the process it was forked from,
            // from now on. (What it opened itself is dropped at its FAN_OPEN_EXEC,
            // which may be read earlier or later than this.)
            unlink_parent(state, key);
        }
        ProcEvent::Exit { pid } => {
            state.touched.remove(&pid);
            state.opened.remove(&pid);
            if let Some(key) = state.live.remove(&pid) {
                if let Some(record) = state.records.get_mut(&key) {
                    record.alive = false;
                }
                forget_if_unreferenced(state, key);
            }
        }
    }
}

/// Drops a dead record nobody inherits from, then its forebears likewise.
fn forget_if_unreferenced(state: &mut State, key: ProcessKey) {
    let mut current = Some(key);
    while let Some(key) = current.take() {
        let Some(record) = state.records.get(&key) else {
            return;
        };
        if record.alive || record.children > 0 {
            return;
        }
        let Some(record) = state.records.remove(&key) else {
            return;
        };
        for file in record.opened.keys() {
            if let Some(openers) = state.openers.get_mut(file) {
                openers.remove(&key);
                if openers.is_empty() {
                    state.openers.remove(file);
                }
            }
        }
        state.pairs -= record.opened.len();
        if let Some(parent) = record.forked_from {
            if let Some(parent_record) = state.records.get_mut(&parent) {
                parent_record.children = parent_record.children.saturating_sub(1);
                current = Some(parent);
            }
        }
    }
}

fn on_opens(state: &mut State, batch: OpenBatch) {
    if batch.overflowed {
        state.incomplete = Some(format!(
            "the kernel's open-event queue overflowed at {}",
            humantime::format_rfc3339_seconds(SystemTime::now())
        ));
    }
    for event in batch.events {
        if event.exec {
            state.touched.insert(event.pid, state.sequence);
        } else {
            state.opened.insert(event.pid, state.sequence);
        }
        let Some(key) = key_of(state, event.pid) else {
            continue;
        };
        if event.exec {
            // A new program: what the old one opened is no longer its business.
            start_afresh(state, key);
        }
        if !state.waiters.is_empty() {
            notify_waiters(state, key, event.file);
        }
        if state.pairs >= MAX_PAIRS {
            state.incomplete = Some("the open log is full".to_string());
            continue;
        }
        let record = state.records.entry(key).or_default();
        if record
            .opened
            .insert(event.file, event.incarnation)
            .is_none()
        {
            state.pairs += 1;
            state.openers.entry(event.file).or_default().insert(key);
        }
    }
}

fn start_afresh(state: &mut State, key: ProcessKey) {
    let Some(record) = state.records.get_mut(&key) else {
        return;
    };
    record.executed = true;
    let opened = std::mem::take(&mut record.opened);
    state.pairs -= opened.len();
    for file in opened.into_keys() {
        if let Some(openers) = state.openers.get_mut(&file) {
            openers.remove(&key);
            if openers.is_empty() {
                state.openers.remove(&file);
            }
        }
    }
    unlink_parent(state, key);
}

/// Ends `key`'s inheritance from the process it was forked from.
fn unlink_parent(state: &mut State, key: ProcessKey) {
    let Some(record) = state.records.get_mut(&key) else {
        return;
    };
    if let Some(parent) = record.forked_from.take() {
        if let Some(parent_record) = state.records.get_mut(&parent) {
            parent_record.children = parent_record.children.saturating_sub(1);
        }
        forget_if_unreferenced(state, parent);
    }
}

fn notify_waiters(state: &mut State, opener: ProcessKey, file: FileId) {
    let mut fired = Vec::new();
    for (index, waiter) in state.waiters.iter().enumerate() {
        if !waiter.files.contains(&file) {
            continue;
        }
        let descends = chain(state, opener).any(|member| member == waiter.ancestor)
            || descends_by_proc(opener.pid, waiter.ancestor.pid);
        if descends {
            let _ = waiter.found.send(opener);
            fired.push(index);
        }
    }
    for index in fired.into_iter().rev() {
        state.waiters.swap_remove(index);
    }
}

/// Whether `pid` descends from `ancestor` by the parent links /proc shows now (a
/// worker forked by a reloaded master may not have its fork event read yet).
fn descends_by_proc(pid: i32, ancestor: i32) -> bool {
    let mut current = pid;
    for _ in 0..64 {
        if current == ancestor {
            return true;
        }
        match vdsync_sys::process::parent_of(current) {
            Ok(parent) if parent > 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &std::fs::File, name: &str) -> (FileId, Incarnation) {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let stat = std::fs::symlink_metadata(format!("/proc/self/fd/{}/{name}", {
            use std::os::fd::AsRawFd;
            dir.as_raw_fd()
        }))
        .unwrap();
        let file = FileId {
            dev: stat.dev(),
            ino: stat.ino(),
        };
        let incarnation = vdsync_sys::process::incarnation_of_entry(dir.as_fd(), name.as_bytes());
        (file, incarnation)
    }

    fn openers(log: &OpenLog, (file, incarnation): (FileId, Incarnation)) -> Vec<i32> {
        log.opened_before(&HashMap::from([(file, incarnation)]))
            .remove(&file)
            .unwrap_or_default()
            .into_iter()
            .map(|key| key.pid)
            .collect()
    }

    /// A python3 script run with `argument`, its stdout read line by line, its
    /// stdin held open (closing it ends the scripts below); killed when dropped.
    struct Python {
        child: std::process::Child,
        stdout: std::io::BufReader<std::process::ChildStdout>,
    }

    impl Python {
        fn run(script: &str, argument: &Path) -> Python {
            use std::process::{Command, Stdio};
            let mut child = Command::new("/usr/bin/python3")
                .args(["-c", script])
                .arg(argument)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
            Python { child, stdout }
        }

        fn pid(&self) -> i32 {
            self.child.id() as i32
        }

        fn line(&mut self) -> String {
            use std::io::BufRead;
            let mut line = String::new();
            self.stdout.read_line(&mut line).unwrap();
            line
        }

        fn say(&mut self, line: &str) {
            use std::io::Write;
            let stdin = self.child.stdin.as_mut().unwrap();
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.flush().unwrap();
        }
    }

    impl Drop for Python {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Reads the file named by its argument, says "read", then waits.
    const READ_AND_WAIT: &str =
        "import sys; open(sys.argv[1]).read(); print('read', flush=True); sys.stdin.read()";

    #[test]
    fn catch_up_reads_the_queued_events_itself() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = std::fs::File::open(dir.path()).unwrap();
        let (mut log, _) = OpenLog::start(dir.path()).unwrap();
        // The log's own reader stops: whatever is read from now on, catch_up reads.
        log.stop.store(true, Ordering::Relaxed);
        let _ = rustix::io::write(&*log.wake, &1u64.to_ne_bytes());
        log.thread.take().unwrap().join().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, b"setting").unwrap();
        let mut reader = Python::run(READ_AND_WAIT, &config);
        assert_eq!(reader.line(), "read\n");
        assert!(
            !openers(&log, entry(&dir_file, "config")).contains(&reader.pid()),
            "the open was read with the log's reader stopped"
        );
        log.catch_up();
        assert!(
            openers(&log, entry(&dir_file, "config")).contains(&reader.pid()),
            "catch_up returned without reading the open made before it"
        );
    }

    #[test]
    fn a_child_inherits_what_its_parent_opened_until_it_runs_another_program() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = std::fs::File::open(dir.path()).unwrap();
        let (log, _) = OpenLog::start(dir.path()).unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, b"setting").unwrap();
        // Reads the file, forks a child that stays this program, and one that
        // runs another; prints both pids, then waits.
        let script = "import os, sys, subprocess\n\
open(sys.argv[1]).read()\n\
pid = os.fork()\n\
if pid == 0:\n    sys.stdin.read(); os._exit(0)\n\
other = subprocess.Popen(['/usr/bin/sleep', '30'])\n\
print(pid, other.pid, flush=True)\n\
sys.stdin.read(); other.kill(); os.kill(pid, 9)\n";
        let mut parent = Python::run(script, &config);
        let pids: Vec<i32> = parent
            .line()
            .split_whitespace()
            .map(|word| word.parse().unwrap())
            .collect();
        let (forked, execed) = (pids[0], pids[1]);
        // The fork, the exec and the open all happened before the line was printed.
        log.catch_up();
        let openers = openers(&log, entry(&dir_file, "config"));
        assert!(
            openers.contains(&parent.pid()) && openers.contains(&forked),
            "the log did not name python and its forked child as openers: {openers:?}"
        );
        assert!(
            !openers.contains(&execed),
            "the child running sleep inherited its parent's open: {openers:?}"
        );
    }

    /// The two streams in each order they can be read in, with the connector's exec
    /// event lost (as it is when its socket overflows): a child that ran another
    /// program must not inherit what its parent opens afterwards. Regression: a
    /// fork read after the `FAN_OPEN_EXEC` linked the child for good.
    #[test]
    fn a_fork_read_after_the_exec_does_not_link_the_child_to_its_parent() {
        use vdsync_sys::open_events::OpenEvent;
        let parent = std::process::id() as i32;
        let child = Python::run("import sys; sys.stdin.read()", Path::new("-"));
        let (program, config) = (FileId { dev: 1, ino: 1 }, FileId { dev: 1, ino: 2 });
        let open = |pid: i32, file: FileId, exec: bool| OpenBatch {
            events: vec![OpenEvent {
                pid,
                file,
                incarnation: 0,
                exec,
            }],
            overflowed: false,
        };
        let fork = ProcEvent::Fork {
            parent,
            child: child.pid(),
        };
        let inherits = |state: &mut State| {
            on_opens(state, open(parent, config, false));
            let child_key = key_of(state, child.pid()).unwrap();
            let parent_key = key_of(state, parent).unwrap();
            chain(state, child_key).any(|member| member == parent_key)
        };

        let mut exec_first = State::default();
        on_opens(&mut exec_first, open(child.pid(), program, true));
        on_process_event(&mut exec_first, fork);
        assert!(
            !inherits(&mut exec_first),
            "a fork read after the FAN_OPEN_EXEC linked the child to its parent"
        );

        let mut fork_first = State::default();
        on_process_event(&mut fork_first, fork);
        on_opens(&mut fork_first, open(child.pid(), program, true));
        assert!(
            !inherits(&mut fork_first),
            "the FAN_OPEN_EXEC did not end the child's inheritance"
        );

        // The control: a child that did not run another program inherits.
        let mut forked_only = State::default();
        on_process_event(&mut forked_only, fork);
        assert!(inherits(&mut forked_only), "a forked child did not inherit");
    }

    #[test]
    fn opens_on_a_file_system_mounted_after_the_start_are_seen() {
        use std::process::Command;
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = OpenLog::start(dir.path()).unwrap();
        let late = dir.path().join("late");
        std::fs::create_dir(&late).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "vdsync-test"])
            .arg(&late)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount -t tmpfs failed");
        let _unmount = Unmount(late.clone());
        std::fs::write(late.join("config"), b"setting").unwrap();
        let file = entry(&std::fs::File::open(&late).unwrap(), "config");
        // The log looks at the mount table on its next round.
        log.catch_up();
        let mut reader = Python::run(READ_AND_WAIT, &late.join("config"));
        assert_eq!(reader.line(), "read\n");
        log.catch_up();
        assert!(
            openers(&log, file).contains(&reader.pid()),
            "the open on the file system mounted after the start was not seen"
        );
    }

    #[test]
    fn a_process_read_before_is_read_again_once_it_opens_something() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = std::fs::File::open(dir.path()).unwrap();
        let (log, _) = OpenLog::start(dir.path()).unwrap();
        let data = dir.path().join("data");
        std::fs::write(&data, b"one").unwrap();
        let (file, _) = entry(&dir_file, "data");
        let wanted = HashSet::from([file]);
        // Waits for a line on stdin, then opens the file and keeps it open.
        let mut holder = Python::run(
            "import sys; print('up', flush=True); sys.stdin.readline(); \
             f = open(sys.argv[1]); print('holding', flush=True); sys.stdin.readline()",
            &data,
        );
        assert_eq!(holder.line(), "up\n");
        let pid = holder.pid();
        let holds = |processes: &[ProcessFiles]| {
            processes
                .iter()
                .find(|process| process.key.pid == pid)
                .map(|process| process.open.contains(&file))
        };
        let first = log.processes(&wanted, &HashSet::new(), true);
        assert_eq!(
            holds(&first),
            Some(false),
            "python is running, not holding the file yet"
        );

        holder.say("go\n");
        assert_eq!(holder.line(), "holding\n");
        // Not everything is read again; python is, since it opened something.
        let second = log.processes(&wanted, &HashSet::new(), false);
        assert_eq!(holds(&second), Some(true), "python's open was not noticed");
    }

    /// A process that since the last read only opened files nobody asks about is
    /// taken from that read: it cannot have come to hold a wanted file. Seen here
    /// through a change no event reports (python starts ignoring SIGHUP), which
    /// only a new read shows.
    #[test]
    fn a_process_that_only_opened_other_files_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = std::fs::File::open(dir.path()).unwrap();
        let (log, _) = OpenLog::start(dir.path()).unwrap();
        let data = dir.path().join("data");
        let other = dir.path().join("other");
        std::fs::write(&data, b"wanted").unwrap();
        std::fs::write(&other, b"unrelated").unwrap();
        let (file, _) = entry(&dir_file, "data");
        let wanted = HashSet::from([file]);
        let mut process = Python::run(
            // SIGHUP's default first: a test run under nohup would pass on its
            // SIG_IGN, and python would ignore it from the start.
            "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); \
             print('up', flush=True); sys.stdin.readline(); \
             signal.signal(signal.SIGHUP, signal.SIG_IGN); \
             open(os.path.join(os.path.dirname(sys.argv[1]), 'other')).read(); \
             print('done', flush=True); sys.stdin.readline()",
            &data,
        );
        assert_eq!(process.line(), "up\n");
        let pid = process.pid();
        let ignores = |processes: &[ProcessFiles]| {
            processes
                .iter()
                .find(|process| process.key.pid == pid)
                .map(|process| process.ignores_hangup)
        };
        assert_eq!(
            ignores(&log.processes(&wanted, &HashSet::new(), true)),
            Some(false)
        );
        process.say("go\n");
        assert_eq!(process.line(), "done\n");
        assert_eq!(
            ignores(&log.processes(&wanted, &HashSet::new(), false)),
            Some(false),
            "python opened only an unrelated file, yet it was read again"
        );
        assert_eq!(
            ignores(&log.processes(&wanted, &HashSet::new(), true)),
            Some(true),
            "a full read does not show python ignoring SIGHUP"
        );
    }

    /// Regression: in the one-change benchmark the agent SIGTERMed the benchmark's
    /// tracker and push, which had opened deleted files whose inode numbers ext4
    /// then gave to files the agent replaced.
    #[test]
    fn an_open_of_an_earlier_file_with_the_same_inode_number_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = std::fs::File::open(dir.path()).unwrap();
        let (log, _) = OpenLog::start(dir.path()).unwrap();
        let first = dir.path().join("first");
        std::fs::write(&first, b"one").unwrap();
        let mut reader = Python::run(READ_AND_WAIT, &first);
        assert_eq!(reader.line(), "read\n");
        log.catch_up();
        let first_entry = entry(&dir_file, "first");
        assert!(
            openers(&log, first_entry).contains(&reader.pid()),
            "the open log did not see python open the file"
        );

        std::fs::remove_file(&first).unwrap();
        let reused = (0..1000)
            .map(|attempt| format!("next-{attempt}"))
            .find(|name| {
                std::fs::write(dir.path().join(name), b"two").unwrap();
                entry(&dir_file, name).0 == first_entry.0
            })
            .expect("no new file got the deleted file's inode in 1000 tries");
        let second_entry = entry(&dir_file, &reused);
        assert_ne!(second_entry.1, first_entry.1);
        assert!(
            !openers(&log, second_entry).contains(&reader.pid()),
            "python opened the deleted file, not the one that now has its inode number"
        );
    }
}
