//! `vdsync track`: turns kernel change events under the root into journal marks.
//!
//! One fanotify group marks the whole file system holding the root
//! (`FAN_MARK_FILESYSTEM`, `FAN_REPORT_DFID_NAME`), so starting costs the same for any
//! tree size. Events name (directory handle, entry name); directory handles resolve
//! to paths through `open_by_handle_at`, cached because resolution fails once a
//! directory is deleted. The cache is dropped whenever a directory is renamed, since
//! every cached path below it is then stale. Events outside the root, in excluded
//! paths or in the state directory are ignored.
//!
//! Never lose a change: on queue overflow, on start (changes made while no tracker
//! ran are unknowable), or when a directory cannot be resolved for any reason but its
//! own deletion, the whole root is marked for rescan and `status` says why.
//!
//! Clients (`push`, `status`) talk to the tracker over a Unix socket in the state
//! directory. A snapshot request is fenced: the tracker writes a marker file and
//! answers only once it has read that file's event, so every change made before the
//! request is in the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vdsync_proto::RepoPath;
use vdsync_sys::fanotify::{self, Fanotify, FileHandle, NameRole};

use crate::excludes::Excludes;
use crate::journal::{Journal, Mark, Snapshot};
use crate::TrackError;

/// How long marks wait in memory before they are written as one batch.
const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// A snapshot request waits this long for its fence event before failing.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Directories whose paths are remembered at once.
const RESOLVER_CACHE_LIMIT: usize = 65_536;

pub const SOCKET_NAME: &str = "tracker.sock";
const FENCE_NAME: &str = "fence";
const LOCK_NAME: &str = "tracker.lock";
pub const JOURNAL_NAME: &str = "journal.redb";

/// A request on the tracker's socket (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Fence, flush, and answer the journal's snapshot.
    Snapshot,
    /// A push covering everything up to `sequence` has been committed.
    Clear { sequence: u64 },
}

/// The answer (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Snapshot(Snapshot),
    Cleared,
    Error(String),
}

pub struct TrackOptions<'a> {
    pub root: &'a Path,
    pub state_dir: &'a Path,
    pub excludes: &'a Excludes,
}

/// A client request handed to the event loop, with the way back.
struct Pending {
    request: Request,
    reply: mpsc::Sender<Response>,
}

/// Runs until `stop` is set. `ready` is called once the fanotify mark is in place
/// (events from then on are recorded).
pub fn run(
    options: &TrackOptions<'_>,
    stop: Arc<AtomicBool>,
    ready: &mut dyn FnMut(),
) -> Result<(), TrackError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrackError::Io { path, source }
    };
    std::fs::create_dir_all(options.state_dir).map_err(io_error(options.state_dir))?;
    let root = std::fs::canonicalize(options.root).map_err(io_error(options.root))?;
    let state_dir =
        std::fs::canonicalize(options.state_dir).map_err(io_error(options.state_dir))?;
    let lock_path = state_dir.join(LOCK_NAME);
    let lock = std::fs::File::create(&lock_path).map_err(io_error(&lock_path))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(TrackError::AlreadyTracking(state_dir));
    }

    let journal = Journal::open(&state_dir.join(JOURNAL_NAME))?;
    let mut group = Fanotify::watch_filesystem(&root).map_err(|source| TrackError::Watch {
        path: root.clone(),
        source,
    })?;
    // From here on every change is seen; what happened before is not known.
    journal.record(
        &BTreeMap::new(),
        Some("the tracker started: changes made while it was not running are unknown"),
    )?;
    let fence_path = state_dir.join(FENCE_NAME);
    std::fs::write(&fence_path, b"").map_err(io_error(&fence_path))?;
    let state_handle = Fanotify::handle_of(&state_dir).map_err(io_error(&state_dir))?;

    let socket_path = state_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).map_err(io_error(&socket_path))?;
    let (requests, incoming) = mpsc::channel::<Pending>();
    std::thread::spawn(move || serve_clients(listener, requests));
    ready();

    let mut resolver = Resolver::new(&root, &state_dir, options.excludes);
    let mut batch: BTreeMap<RepoPath, Mark> = BTreeMap::new();
    let mut root_reason: Option<String> = None;
    let mut last_flush = Instant::now();
    // Snapshot requests waiting for their fence: (fence number, deadline, reply).
    let mut fences: Vec<(u64, Instant, mpsc::Sender<Response>)> = Vec::new();
    // The write above is fence write 1; its close event will be counted too.
    let mut fence_writes = 1u64;
    let mut fence_seen = 0u64;

    while !stop.load(Ordering::Relaxed) {
        let events = group
            .read(Duration::from_millis(20))
            .map_err(|source| TrackError::Watch {
                path: root.clone(),
                source,
            })?;
        for event in &events {
            if event.is_overflow() {
                root_reason = Some("the kernel's event queue overflowed".to_owned());
                continue;
            }
            if is_fence_close(event, &state_handle) {
                fence_seen += 1;
                continue;
            }
            if let Err(reason) = resolver.marks_for(&group, event, &mut batch) {
                root_reason = Some(reason);
            }
        }

        // Requests from clients.
        while let Ok(pending) = incoming.try_recv() {
            match pending.request {
                Request::Snapshot => match std::fs::write(&fence_path, b"") {
                    Ok(()) => {
                        fence_writes += 1;
                        fences.push((fence_writes, Instant::now() + FENCE_TIMEOUT, pending.reply));
                    }
                    Err(err) => {
                        let _ = pending
                            .reply
                            .send(Response::Error(format!("cannot write the fence: {err}")));
                    }
                },
                Request::Clear { sequence } => {
                    let answer = match journal.clear_upto(sequence) {
                        Ok(()) => Response::Cleared,
                        Err(err) => Response::Error(vdsync_proto::display::error_chain(&err)),
                    };
                    let _ = pending.reply.send(answer);
                }
            }
        }

        let fence_due = fences.iter().any(|(number, _, _)| *number <= fence_seen);
        if fence_due
            || (last_flush.elapsed() >= BATCH_INTERVAL
                && (!batch.is_empty() || root_reason.is_some()))
        {
            if !batch.is_empty() || root_reason.is_some() {
                journal.record(&batch, root_reason.as_deref())?;
                batch.clear();
                root_reason = None;
            }
            last_flush = Instant::now();
        }
        if fence_due {
            let snapshot = journal.snapshot();
            fences.retain(|(number, _, reply)| {
                if *number > fence_seen {
                    return true;
                }
                let answer = match &snapshot {
                    Ok(snapshot) => Response::Snapshot(snapshot.clone()),
                    Err(err) => Response::Error(vdsync_proto::display::error_chain(err)),
                };
                let _ = reply.send(answer);
                false
            });
        }
        let now = Instant::now();
        fences.retain(|(_, deadline, reply)| {
            if now < *deadline {
                return true;
            }
            let _ = reply.send(Response::Error(
                "the tracker did not see its fence event in time; is the state directory on the tracked file system?".to_owned(),
            ));
            false
        });
    }
    if !batch.is_empty() || root_reason.is_some() {
        journal.record(&batch, root_reason.as_deref())?;
    }
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// True if `event` is the close of a write to our fence file. Each fence write
/// produces exactly one such event, in order, so counting them tells which writes
/// the tracker has read up to.
fn is_fence_close(event: &fanotify::Event, state_handle: &FileHandle) -> bool {
    event.mask & fanotify::FAN_CLOSE_WRITE != 0
        && event
            .names
            .iter()
            .any(|name| name.dir == *state_handle && name.name == FENCE_NAME.as_bytes())
}

/// Maps fanotify events to marks: resolves directory handles (with a cache), keeps
/// what lies under the root and is not excluded.
struct Resolver<'a> {
    root: &'a Path,
    state_dir: &'a Path,
    excludes: &'a Excludes,
    cache: HashMap<FileHandle, PathBuf>,
}

impl<'a> Resolver<'a> {
    fn new(root: &'a Path, state_dir: &'a Path, excludes: &'a Excludes) -> Self {
        Resolver {
            root,
            state_dir,
            excludes,
            cache: HashMap::new(),
        }
    }

    /// Adds the marks for `event` to `batch`. An error is the reason the whole root
    /// must be rescanned instead.
    fn marks_for(
        &mut self,
        group: &Fanotify,
        event: &fanotify::Event,
        batch: &mut BTreeMap<RepoPath, Mark>,
    ) -> Result<(), String> {
        let directory_moved = event.is_dir()
            && event.mask
                & (fanotify::FAN_RENAME
                    | fanotify::FAN_MOVED_FROM
                    | fanotify::FAN_MOVED_TO
                    | fanotify::FAN_MOVE_SELF)
                != 0;
        for name in &event.names {
            let directory = match self.cache.get(&name.dir) {
                Some(path) => path.clone(),
                None => match group.resolve(&name.dir) {
                    Ok(path) => {
                        if self.cache.len() >= RESOLVER_CACHE_LIMIT {
                            // Resolving again is correct, only slower: start over
                            // rather than let the cache grow with the file system.
                            self.cache.clear();
                        }
                        self.cache.insert(name.dir.clone(), path.clone());
                        path
                    }
                    // The directory was deleted before we read the event. Nothing is
                    // lost by skipping the name: the deletion of the topmost deleted
                    // directory is reported in a parent that still exists, and that
                    // event marks its whole subtree (see the rule below).
                    Err(err) if vdsync_sys::errno(&err) == Some(vdsync_sys::Errno::STALE) => continue,
                    Err(err) => {
                        return Err(format!("a changed directory could not be resolved ({err})"))
                    }
                },
            };
            let full = if name.name == b"." {
                directory
            } else {
                directory.join(std::ffi::OsStr::from_bytes(&name.name))
            };
            let Some(path) = self.relative(&full) else {
                continue;
            };
            // A directory that moves carries its contents (nothing below has an
            // event of its own); a deleted one takes its indexed contents with it.
            let renamed = directory_moved || matches!(name.role, NameRole::Old | NameRole::New);
            let deleted = event.mask & fanotify::FAN_DELETE != 0;
            let mark = if event.is_dir() && (renamed || deleted) {
                Mark::Subtree
            } else {
                Mark::Path
            };
            let slot = batch.entry(path).or_insert(mark);
            *slot = (*slot).max(mark);
        }
        if directory_moved {
            // Every cached path below the moved directory is now wrong.
            self.cache.clear();
        }
        Ok(())
    }

    /// The path relative to the root, if it is under the root, not the state
    /// directory and not excluded.
    fn relative(&self, full: &Path) -> Option<RepoPath> {
        if full.starts_with(self.state_dir) {
            return None;
        }
        let inside = full.strip_prefix(self.root).ok()?;
        let path = RepoPath::parse(inside.as_os_str().as_bytes()).ok()?;
        // An excluded ancestor excludes the path.
        let mut prefix: Option<RepoPath> = None;
        for component in path.components() {
            let next = match &prefix {
                Some(prefix) => prefix.join(component).ok()?,
                None => RepoPath::parse(component).ok()?,
            };
            if self.excludes.is_excluded(&next) {
                return None;
            }
            prefix = Some(next);
        }
        Some(path)
    }
}

/// Accepts clients; each connection sends one request line and gets one answer line.
fn serve_clients(listener: UnixListener, requests: mpsc::Sender<Pending>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let requests = requests.clone();
        std::thread::spawn(move || {
            let _ = answer_client(stream, &requests);
        });
    }
}

fn answer_client(stream: UnixStream, requests: &mpsc::Sender<Pending>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (reply, answer) = mpsc::channel();
            if requests.send(Pending { request, reply }).is_err() {
                Response::Error("the tracker is shutting down".to_owned())
            } else {
                answer
                    .recv()
                    .unwrap_or_else(|_| Response::Error("the tracker is shutting down".to_owned()))
            }
        }
        Err(err) => Response::Error(format!("bad request: {err}")),
    };
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &response)?;
    stream.write_all(b"\n")?;
    stream.flush()
}

/// Asks the tracker of `state_dir` for a fenced snapshot; `None` if no tracker runs.
pub fn request_snapshot(state_dir: &Path) -> Result<Option<Snapshot>, TrackError> {
    match ask(state_dir, &Request::Snapshot)? {
        None => Ok(None),
        Some(Response::Snapshot(snapshot)) => Ok(Some(snapshot)),
        Some(Response::Error(message)) => Err(TrackError::Tracker(message)),
        Some(Response::Cleared) => Err(TrackError::Tracker("unexpected answer".to_owned())),
    }
}

/// Tells the tracker that a push covered everything up to `sequence`.
pub fn request_clear(state_dir: &Path, sequence: u64) -> Result<(), TrackError> {
    match ask(state_dir, &Request::Clear { sequence })? {
        None | Some(Response::Cleared) => Ok(()),
        Some(Response::Error(message)) => Err(TrackError::Tracker(message)),
        Some(Response::Snapshot(_)) => Err(TrackError::Tracker("unexpected answer".to_owned())),
    }
}

fn ask(state_dir: &Path, request: &Request) -> Result<Option<Response>, TrackError> {
    let socket_path = state_dir.join(SOCKET_NAME);
    let stream = match UnixStream::connect(&socket_path) {
        Ok(stream) => stream,
        // No socket, or a socket nobody listens on: no tracker is running.
        Err(_) => return Ok(None),
    };
    let io_error = |source| TrackError::Io {
        path: socket_path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(FENCE_TIMEOUT + Duration::from_secs(5)))
        .map_err(io_error)?;
    let mut writer = stream.try_clone().map_err(io_error)?;
    serde_json::to_writer(&mut writer, request).map_err(|err| io_error(err.into()))?;
    writer.write_all(b"\n").map_err(io_error)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_error)?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|err| TrackError::Tracker(format!("unreadable answer: {err}")))
}
