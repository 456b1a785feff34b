//! Recursive inotify: the tracker's fallback when fanotify cannot be used (no
//! CAP_SYS_ADMIN, or a file system without usable file handles).
//!
//! fanotify with one `FAN_MARK_FILESYSTEM` mark is the tracker's first choice (see
//! [`crate::fanotify`]). inotify has no such mark: it watches single directories, so
//! this module walks the tree, adds a watch per directory, keeps a map from watch
//! descriptor to directory path, and extends the watch set as directories appear or
//! move. Every event is turned into a [`PathChange`] with an absolute path.
//!
//! Limits, by design of inotify rather than of this code:
//! - One watch per directory, counted against `fs.inotify.max_user_watches` (per
//!   user, shared with every other inotify user such as editors and IDEs). Running
//!   out fails with an error naming the sysctl; the caller must then rescan and stop
//!   trusting this tracker.
//! - Start-up cost grows with the tree (a walk and a syscall per directory), as does
//!   kernel memory (roughly a kilobyte per watch).
//! - Paths are reconstructed from the watch map, so an event queued before a
//!   directory rename but read after it is reported under the new path. Renamed
//!   directories are reported with `subtree: true` at both ends, which covers this.
//! - A directory reachable under two paths (a bind mount inside the tree) is watched
//!   once, and changes are reported under the first path found.
//! - On queue overflow (`IN_Q_OVERFLOW`) events are lost; [`RecursiveInotify::take_overflow`]
//!   tells the caller to rescan the whole root.
//!
//! Everything here goes through rustix's safe inotify API; there is no `unsafe`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Bound;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::AsFd;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

/// One change, resolved to an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathChange {
    pub path: PathBuf,
    pub is_dir: bool,
    /// Everything below `path` must be treated as changed: a directory that appeared
    /// (created or moved in) whose contents were not individually reported, or a
    /// directory moved away.
    pub subtree: bool,
}

/// The events asked for on every watched directory: every change to names,
/// contents and metadata, plus the directory's own deletion or move. The watch
/// never follows a symlink, only accepts a directory, and stops reporting on
/// children once they are unlinked (`IN_EXCL_UNLINK`), so a deleted file still held
/// open does not produce noise.
fn directory_watch_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::EXCL_UNLINK
        | WatchFlags::ONLYDIR
}

/// Room for many events per read; the kernel needs at least one event with a
/// maximal name (16 + 256 bytes).
const READ_BUFFER_LEN: usize = 64 * 1024;

/// One event copied out of the read buffer.
#[derive(Debug, Clone)]
struct RawEvent {
    wd: i32,
    mask: ReadFlags,
    cookie: u32,
    name: Option<Vec<u8>>,
}

impl RawEvent {
    fn is_directory_move_from(&self) -> bool {
        self.mask.contains(ReadFlags::MOVED_FROM | ReadFlags::ISDIR)
    }

    fn is_directory_move_to(&self) -> bool {
        self.mask.contains(ReadFlags::MOVED_TO | ReadFlags::ISDIR)
    }
}

/// A directory tree watched with one inotify watch per directory.
pub struct RecursiveInotify {
    fd: OwnedFd,
    root: PathBuf,
    exclude: Box<dyn Fn(&Path) -> bool + Send>,
    /// Watch descriptor → directory path. Always the exact inverse of
    /// `watches_by_dir`.
    dirs_by_watch: HashMap<i32, PathBuf>,
    /// Directory path → watch descriptor, ordered so that everything below a
    /// directory is one contiguous range (paths order by components).
    watches_by_dir: BTreeMap<PathBuf, i32>,
    overflowed: bool,
    buffer: Vec<MaybeUninit<u8>>,
}

/// Errors that mean the directory vanished or was replaced between seeing it and
/// watching or listing it: not a failure, its parent's events cover it.
fn vanished(errno: Errno) -> bool {
    crate::vanished(&io::Error::from(errno))
}

fn watch_error(path: &Path, errno: Errno) -> io::Error {
    let kind = io::Error::from(errno).kind();
    if errno == Errno::NOSPC {
        io::Error::new(
            kind,
            format!(
                "inotify watch limit reached at {}; raise fs.inotify.max_user_watches",
                path.display()
            ),
        )
    } else {
        io::Error::new(
            kind,
            format!(
                "cannot watch {}: {}",
                path.display(),
                io::Error::from(errno)
            ),
        )
    }
}

impl RecursiveInotify {
    /// Watches `root` and every directory below it (walk the tree, add a watch per
    /// directory). `exclude(path)` says which directories not to descend into and
    /// not to watch (absolute paths); it is never asked about `root` itself.
    /// Symlinks are never followed.
    pub fn watch(
        root: &Path,
        exclude: Box<dyn Fn(&Path) -> bool + Send>,
    ) -> io::Result<RecursiveInotify> {
        let root = std::path::absolute(root)?;
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        let mut tracker = RecursiveInotify {
            fd,
            root,
            exclude,
            dirs_by_watch: HashMap::new(),
            watches_by_dir: BTreeMap::new(),
            overflowed: false,
            buffer: vec![MaybeUninit::uninit(); READ_BUFFER_LEN],
        };
        // The root must be watchable; below it, directories that vanish during the
        // walk are simply skipped.
        let root_watch = inotify::add_watch(&tracker.fd, &tracker.root, directory_watch_flags())
            .map_err(|errno| watch_error(&tracker.root, errno))?;
        tracker.insert_watch(tracker.root.clone(), root_watch);
        let root = tracker.root.clone();
        tracker.watch_tree(&root)?;
        Ok(tracker)
    }

    /// Waits up to `timeout` (poll) and returns the changes from one read; empty on
    /// timeout. An error means the watch set may be incomplete (for example the
    /// watch limit was reached): the caller must rescan the root.
    pub fn read(&mut self, timeout: Duration) -> io::Result<Vec<PathChange>> {
        if !crate::wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        self.read_available(&mut events)?;
        // The two halves of a rename are queued one after the other, but a read can
        // end between them (full buffer, or a read racing the second insertion).
        // One more non-blocking read keeps most directory renames paired; an
        // unpaired half is still handled correctly, just at the cost of a walk.
        if has_unpaired_directory_move(&events) {
            self.read_available(&mut events)?;
        }
        self.process(events)
    }

    /// Watches `top` and every directory below it too (a file system mounted
    /// there after the start hides what was watched).
    pub fn watch_subtree(&mut self, top: &Path) -> io::Result<()> {
        self.watch_tree(top)
    }

    /// The inotify descriptor, readable when events are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// True once the kernel queue overflowed (`IN_Q_OVERFLOW`) since the last call;
    /// resets it. Events were lost: the caller rescans the whole root.
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Also watches the single directory `dir` (not what is below it, and whatever
    /// `exclude` says), in the same queue as the tree, so its events are ordered
    /// with the tree's: the tracker's fence files live there.
    pub fn watch_also(&mut self, dir: &Path) -> io::Result<()> {
        let dir = std::path::absolute(dir)?;
        let wd = inotify::add_watch(&self.fd, &dir, directory_watch_flags())
            .map_err(|errno| watch_error(&dir, errno))?;
        self.insert_watch(dir, wd);
        Ok(())
    }

    /// Number of directories watched.
    pub fn watched(&self) -> usize {
        self.dirs_by_watch.len()
    }

    /// Appends whatever one non-blocking read returns.
    fn read_available(&mut self, events: &mut Vec<RawEvent>) -> io::Result<()> {
        let mut reader = inotify::Reader::new(&self.fd, &mut self.buffer[..]);
        loop {
            match reader.next() {
                Ok(event) => events.push(RawEvent {
                    wd: event.wd(),
                    mask: event.events(),
                    cookie: event.cookie(),
                    name: event.file_name().map(|name| name.to_bytes().to_vec()),
                }),
                Err(Errno::AGAIN | Errno::INTR) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
            if reader.is_buffer_empty() {
                return Ok(());
            }
        }
    }

    /// Turns one batch of events into changes, updating the watch set on the way.
    fn process(&mut self, events: Vec<RawEvent>) -> io::Result<Vec<PathChange>> {
        let mut changes = Vec::new();
        // Directories moved away whose arrival (same cookie) has not been seen yet.
        let mut departures: Vec<(u32, PathBuf)> = Vec::new();
        for event in events {
            if event.mask.contains(ReadFlags::QUEUE_OVERFLOW) {
                self.overflowed = true;
                continue;
            }
            // An unknown descriptor belongs to a watch already removed: a directory
            // moved away (reported as a subtree then) or deleted (nothing left).
            let Some(dir) = self.dirs_by_watch.get(&event.wd).cloned() else {
                continue;
            };
            let Some(name) = &event.name else {
                self.directory_event(event.wd, event.mask, dir, &mut changes);
                continue;
            };
            let path = dir.join(OsStr::from_bytes(name));
            if !event.mask.contains(ReadFlags::ISDIR) {
                changes.push(PathChange {
                    path,
                    is_dir: false,
                    subtree: false,
                });
            } else if event.is_directory_move_from() {
                departures.push((event.cookie, path));
            } else if event.is_directory_move_to() {
                match departures
                    .iter()
                    .position(|(cookie, _)| *cookie == event.cookie)
                {
                    Some(index) => {
                        let (_, old_path) = departures.remove(index);
                        self.directory_moved(old_path, path, &mut changes)?;
                    }
                    None => self.directory_appeared(path, &mut changes)?,
                }
            } else if event.mask.contains(ReadFlags::CREATE) {
                self.directory_appeared(path, &mut changes)?;
            } else {
                // Deleted (its own watch reports DELETE_SELF and IGNORED) or
                // attributes changed: the entry itself.
                changes.push(PathChange {
                    path,
                    is_dir: true,
                    subtree: false,
                });
            }
        }
        for (_, old_path) in departures {
            self.directory_moved_out(old_path, &mut changes)?;
        }
        Ok(changes)
    }

    /// An event about a watched directory itself (no name).
    fn directory_event(
        &mut self,
        wd: i32,
        mask: ReadFlags,
        dir: PathBuf,
        changes: &mut Vec<PathChange>,
    ) {
        let is_root = dir == self.root;
        if mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::IGNORED) {
            self.forget_watch(wd);
        }
        // Other directories' deletions and moves are reported by their parent's
        // watch; nothing watches the root's parent.
        let root_gone = is_root && mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF);
        if root_gone || mask.contains(ReadFlags::UNMOUNT) {
            changes.push(PathChange {
                path: dir,
                is_dir: true,
                subtree: true,
            });
        } else if mask.contains(ReadFlags::ATTRIB) {
            changes.push(PathChange {
                path: dir,
                is_dir: true,
                subtree: false,
            });
        }
    }

    /// A directory appeared at `path`: created, or moved in from outside the tree.
    fn directory_appeared(
        &mut self,
        path: PathBuf,
        changes: &mut Vec<PathChange>,
    ) -> io::Result<()> {
        if (self.exclude)(&path) {
            changes.push(PathChange {
                path,
                is_dir: true,
                subtree: false,
            });
            return Ok(());
        }
        // The create-then-watch race: anything can be created inside the new
        // directory between its creation and our watch on it, and those creations
        // produce no event. So the watch goes in first and only then is the
        // directory walked (watch_tree adds each directory's watch before listing
        // it). Whatever was created before the watch existed is covered by the
        // subtree mark reported here; whatever is created after is reported by the
        // new watch's own events.
        self.watch_tree(&path)?;
        changes.push(PathChange {
            path,
            is_dir: true,
            subtree: true,
        });
        Ok(())
    }

    /// A directory moved from `old_path` to `new_path`, both inside the tree.
    fn directory_moved(
        &mut self,
        old_path: PathBuf,
        new_path: PathBuf,
        changes: &mut Vec<PathChange>,
    ) -> io::Result<()> {
        let new_excluded = (self.exclude)(&new_path);
        if new_excluded {
            self.unwatch_tree(&old_path)?;
        } else {
            self.rename_watches(&old_path, &new_path)?;
            // Walk the new location too: a subdirectory created just before the
            // move may have been looked for under the old path (its create event
            // read after the rename happened) and not found, so it is not watched
            // yet. Directories already watched are recognised and cost one syscall.
            self.watch_tree(&new_path)?;
        }
        changes.push(PathChange {
            path: old_path,
            is_dir: true,
            subtree: true,
        });
        changes.push(PathChange {
            path: new_path,
            is_dir: true,
            subtree: !new_excluded,
        });
        Ok(())
    }

    /// A directory moved from `old_path` to somewhere outside the tree.
    fn directory_moved_out(
        &mut self,
        old_path: PathBuf,
        changes: &mut Vec<PathChange>,
    ) -> io::Result<()> {
        self.unwatch_tree(&old_path)?;
        changes.push(PathChange {
            path: old_path,
            is_dir: true,
            subtree: true,
        });
        Ok(())
    }

    /// Adds a watch to `top` and every directory below it, each watch before the
    /// directory is listed. Excluded directories, symlinks and directories that
    /// vanish meanwhile are skipped.
    fn watch_tree(&mut self, top: &Path) -> io::Result<()> {
        crate::walk_directories(top, |dir| {
            if dir != self.root && (self.exclude)(dir) {
                return Ok(false);
            }
            let wd = match inotify::add_watch(&self.fd, dir, directory_watch_flags()) {
                Ok(wd) => wd,
                Err(errno) if vanished(errno) => return Ok(false),
                Err(errno) => return Err(watch_error(dir, errno)),
            };
            match self.dirs_by_watch.get(&wd) {
                // The same directory under another path: a bind mount inside the
                // tree, or a rename whose events are still queued (handled when
                // they are read). Descending could loop forever on a bind mount.
                Some(known) if known != dir => Ok(false),
                Some(_) => Ok(true),
                None => {
                    self.insert_watch(dir.to_path_buf(), wd);
                    Ok(true)
                }
            }
        })
    }

    /// Removes the watches on `top` and everything below it. The kernel may have
    /// dropped some already (`EINVAL`), which is fine.
    fn unwatch_tree(&mut self, top: &Path) -> io::Result<()> {
        let mut first_error = None;
        for (path, wd) in self.watches_below(top) {
            self.forget_watch(wd);
            match inotify::remove_watch(&self.fd, wd) {
                Ok(()) | Err(Errno::INVAL) => {}
                Err(errno) => {
                    first_error.get_or_insert_with(|| {
                        io::Error::new(
                            io::Error::from(errno).kind(),
                            format!(
                                "cannot unwatch {}: {}",
                                path.display(),
                                io::Error::from(errno)
                            ),
                        )
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Rewrites the path of every watch at or below `old_path` to lie below
    /// `new_path` instead, dropping watches that the new paths make excluded.
    fn rename_watches(&mut self, old_path: &Path, new_path: &Path) -> io::Result<()> {
        let moved = self.watches_below(old_path);
        for (path, _) in &moved {
            self.watches_by_dir.remove(path);
        }
        let mut now_excluded = Vec::new();
        for (path, wd) in moved {
            let Ok(rest) = path.strip_prefix(old_path) else {
                continue;
            };
            let renamed = if rest.as_os_str().is_empty() {
                new_path.to_path_buf()
            } else {
                new_path.join(rest)
            };
            if renamed != new_path && (self.exclude)(&renamed) {
                now_excluded.push(renamed.clone());
            }
            self.insert_watch(renamed, wd);
        }
        for path in now_excluded {
            self.unwatch_tree(&path)?;
        }
        Ok(())
    }

    /// Every watch at or below `top`: one contiguous range of the ordered map.
    fn watches_below(&self, top: &Path) -> Vec<(PathBuf, i32)> {
        self.watches_by_dir
            .range::<Path, _>((Bound::Included(top), Bound::Unbounded))
            .take_while(|(path, _)| path.starts_with(top))
            .map(|(path, wd)| (path.clone(), *wd))
            .collect()
    }

    /// Records `wd` as watching `path`, keeping both maps exact inverses: a path
    /// now held by another descriptor (a directory renamed over an empty one)
    /// drops that descriptor, whose deletion the kernel reports later.
    fn insert_watch(&mut self, path: PathBuf, wd: i32) {
        if let Some(previous_path) = self.dirs_by_watch.insert(wd, path.clone()) {
            if previous_path != path && self.watches_by_dir.get(&previous_path) == Some(&wd) {
                self.watches_by_dir.remove(&previous_path);
            }
        }
        if let Some(previous_wd) = self.watches_by_dir.insert(path, wd) {
            if previous_wd != wd {
                self.dirs_by_watch.remove(&previous_wd);
            }
        }
    }

    fn forget_watch(&mut self, wd: i32) {
        if let Some(path) = self.dirs_by_watch.remove(&wd) {
            if self.watches_by_dir.get(&path) == Some(&wd) {
                self.watches_by_dir.remove(&path);
            }
        }
    }
}

/// True if a directory's `IN_MOVED_FROM` has no `IN_MOVED_TO` with its cookie.
fn has_unpaired_directory_move(events: &[RawEvent]) -> bool {
    events.iter().any(|from| {
        from.is_directory_move_from()
            && !events
                .iter()
                .any(|to| to.is_directory_move_to() && to.cookie == from.cookie)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn watch_all(root: &Path) -> RecursiveInotify {
        RecursiveInotify::watch(root, Box::new(|_| false)).unwrap()
    }

    /// Reads until a change satisfies `wanted`, returning everything seen up to and
    /// including it; panics after 10 s with what was seen.
    fn wait_for(
        tracker: &mut RecursiveInotify,
        what: &str,
        wanted: impl Fn(&PathChange) -> bool,
    ) -> Vec<PathChange> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            if seen.iter().any(&wanted) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "no change for {what} within 10 s; saw {seen:#?}"
            );
            seen.extend(tracker.read(Duration::from_millis(200)).unwrap());
        }
    }

    fn file_change(path: &Path) -> impl Fn(&PathChange) -> bool + '_ {
        move |change| change.path == path && !change.is_dir && !change.subtree
    }

    fn subtree_change(path: &Path) -> impl Fn(&PathChange) -> bool + '_ {
        move |change| change.path == path && change.is_dir && change.subtree
    }

    #[test]
    fn file_creation_modification_and_deletion_are_reported_with_absolute_paths() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        std::fs::create_dir_all(root.join("sub/inner")).unwrap();
        std::fs::write(root.join("sub/inner/existing"), "old").unwrap();
        std::fs::write(root.join("doomed"), "x").unwrap();
        let mut tracker = watch_all(root);
        assert_eq!(tracker.watched(), 3);

        let created = root.join("sub/created");
        let modified = root.join("sub/inner/existing");
        let deleted = root.join("doomed");
        std::fs::write(&created, "new").unwrap();
        std::fs::write(&modified, "changed").unwrap();
        std::fs::remove_file(&deleted).unwrap();

        let mut seen = wait_for(&mut tracker, "the created file", file_change(&created));
        for path in [&modified, &deleted] {
            if !seen.iter().any(file_change(path)) {
                seen.extend(wait_for(&mut tracker, "a changed file", file_change(path)));
            }
        }
        assert!(seen.iter().all(|change| change.path.is_absolute()));
        assert!(!tracker.take_overflow());
    }

    #[test]
    fn a_new_directory_tree_is_covered_and_then_watched() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        let mut tracker = watch_all(root);

        // Created faster than the tracker can add watches: the file in the deepest
        // directory must be covered by its own event or by a subtree mark.
        let deepest = root.join("a/b/c");
        std::fs::create_dir_all(&deepest).unwrap();
        let early = deepest.join("x");
        std::fs::write(&early, "early").unwrap();
        let seen = wait_for(&mut tracker, "coverage of a/b/c/x", |change| {
            change.path == early || (change.subtree && early.starts_with(&change.path))
        });
        assert!(
            seen.iter()
                .any(|change| change.path == root.join("a") && change.subtree),
            "the new top directory is a subtree mark: {seen:#?}"
        );
        assert_eq!(tracker.watched(), 4, "root, a, a/b and a/b/c are watched");

        // The watch on a/b/c exists: a later file is reported with its own path.
        let later = deepest.join("y");
        std::fs::write(&later, "later").unwrap();
        wait_for(&mut tracker, "a/b/c/y", file_change(&later));
    }

    #[test]
    fn a_directory_renamed_inside_the_tree_reports_new_paths() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        std::fs::create_dir_all(root.join("old/deep")).unwrap();
        let mut tracker = watch_all(root);

        std::fs::rename(root.join("old"), root.join("new")).unwrap();
        let mut seen = wait_for(
            &mut tracker,
            "the new name",
            subtree_change(&root.join("new")),
        );
        if !seen.iter().any(subtree_change(&root.join("old"))) {
            seen.extend(wait_for(
                &mut tracker,
                "the old name",
                subtree_change(&root.join("old")),
            ));
        }
        assert_eq!(tracker.watched(), 3);

        let file = root.join("new/deep/file");
        std::fs::write(&file, "x").unwrap();
        let seen = wait_for(&mut tracker, "new/deep/file", file_change(&file));
        assert!(
            !seen
                .iter()
                .any(|change| change.path.starts_with(root.join("old"))),
            "nothing reported under the old name after the rename: {seen:#?}"
        );
    }

    #[test]
    fn a_directory_moved_out_of_the_tree_is_a_subtree_and_unwatched() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        let outside = temp.path().join("outside");
        std::fs::create_dir_all(root.join("leaving/inner")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let mut tracker = watch_all(&root);
        assert_eq!(tracker.watched(), 3);

        std::fs::rename(root.join("leaving"), outside.join("leaving")).unwrap();
        wait_for(
            &mut tracker,
            "the directory moved out",
            subtree_change(&root.join("leaving")),
        );
        assert_eq!(tracker.watched(), 1, "only the root is still watched");

        std::fs::write(outside.join("leaving/inner/f"), "x").unwrap();
        let marker = root.join("marker");
        std::fs::write(&marker, "x").unwrap();
        let seen = wait_for(&mut tracker, "the marker", file_change(&marker));
        assert!(
            !seen
                .iter()
                .any(|change| change.path.starts_with(root.join("leaving"))
                    || change.path.starts_with(&outside)),
            "nothing reported from the moved-out directory: {seen:#?}"
        );
    }

    #[test]
    fn a_directory_moved_in_from_outside_is_watched() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        let outside = temp.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir_all(outside.join("arriving/inner")).unwrap();
        let mut tracker = watch_all(&root);

        std::fs::rename(outside.join("arriving"), root.join("arriving")).unwrap();
        wait_for(
            &mut tracker,
            "the directory moved in",
            subtree_change(&root.join("arriving")),
        );
        assert_eq!(tracker.watched(), 3);
        let file = root.join("arriving/inner/f");
        std::fs::write(&file, "x").unwrap();
        wait_for(
            &mut tracker,
            "a file in the moved-in tree",
            file_change(&file),
        );
    }

    #[test]
    fn excluded_directories_and_symlinks_are_not_watched() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        let elsewhere = temp.path().join("elsewhere");
        std::fs::create_dir_all(root.join("skip/deeper")).unwrap();
        std::fs::create_dir_all(root.join("keep")).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
        let exclude = Box::new(|path: &Path| path.file_name() == Some(OsStr::new("skip")));
        let mut tracker = RecursiveInotify::watch(&root, exclude).unwrap();
        assert_eq!(tracker.watched(), 2, "root and keep only");

        std::fs::write(root.join("skip/deeper/f"), "x").unwrap();
        std::fs::write(elsewhere.join("f"), "x").unwrap();
        // An excluded directory created later is reported as an entry but not
        // watched.
        std::fs::create_dir(root.join("keep/skip")).unwrap();
        std::fs::write(root.join("keep/skip/f"), "x").unwrap();
        let marker = root.join("keep/marker");
        std::fs::write(&marker, "x").unwrap();
        let seen = wait_for(&mut tracker, "keep/marker", file_change(&marker));
        assert!(
            seen.iter()
                .any(|change| change.path == root.join("keep/skip")
                    && change.is_dir
                    && !change.subtree),
            "the excluded directory's creation is reported as an entry: {seen:#?}"
        );
        assert!(
            !seen
                .iter()
                .any(|change| change.path.starts_with(root.join("skip"))
                    || change.path.starts_with(root.join("keep/skip/f"))
                    || change.path.starts_with(root.join("link/f"))
                    || change.path.starts_with(&elsewhere)),
            "nothing from excluded directories or through the symlink: {seen:#?}"
        );
        assert_eq!(tracker.watched(), 2);
    }

    #[test]
    fn a_full_kernel_queue_sets_the_overflow_flag() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut tracker = watch_all(root);
        // Alternating between two files: the kernel merges only an event identical
        // to the one queued last.
        let files = [
            std::fs::File::create(root.join("a")).unwrap(),
            std::fs::File::create(root.join("b")).unwrap(),
        ];
        for round in 0..limit + 100 {
            use std::io::Write;
            (&files[round % 2]).write_all(b"x").unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tracker.take_overflow() {
            assert!(
                Instant::now() < deadline,
                "no overflow reported within 10 s"
            );
            tracker.read(Duration::from_millis(200)).unwrap();
        }
        assert!(!tracker.take_overflow(), "take_overflow resets the flag");
    }
}
