//! `fanotify_floor [--ignore-all] [--with-contents] DIR`: what the kernel's part of
//! fanotify costs a writer. It asks for the events `vdsync track` asks for on a
//! whole file system ([`NAME_EVENTS`], one `FAN_MARK_FILESYSTEM` mark,
//! `FAN_REPORT_DFID_NAME`), reads them at the tracker's pace when busy (after a
//! read that found events, the next waits 10 ms, as the tracker's
//! `BUSY_READ_DELAY`), and throws them away: no path resolution, no journal.
//!
//! The `tracker-overhead` benchmark runs it as a peer: the kernel queues and merges
//! each event in the context of the process that changed the file. This is the cost
//! of a tracker that hears every event; the tracker itself hears fewer (it has the
//! kernel ignore the entries of directories created since the last push), so it
//! can cost less than this.
//!
//! With `--ignore-all`, the mark ignores every one of those events too (the
//! kernel's ignore mask): nothing is queued, and what remains is what the
//! file-system mark costs each change before any event is made. No fanotify
//! tracker of a whole file system costs less than that.
//!
//! With `--with-contents`, the mark also asks for the events about contents and
//! attributes ([`CONTENT_EVENTS`]), which the tracker asks for per directory of its
//! tree instead: what one file-system mark hearing everything would cost, because
//! the kernel then looks up the parent and name of every write, `chmod` and close
//! anywhere on the file system.
//!
//! Prints `ready` once the mark is in place, then runs until killed.
//!
//! [`NAME_EVENTS`]: vdsync_sys::fanotify::NAME_EVENTS
//! [`CONTENT_EVENTS`]: vdsync_sys::fanotify::CONTENT_EVENTS

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use vdsync_sys::fanotify::Fanotify;

/// The tracker's `BUSY_READ_DELAY`.
const BUSY_READ_DELAY: Duration = Duration::from_millis(10);
const IDLE_WAIT: Duration = Duration::from_millis(500);

fn main() {
    let mut arguments: Vec<_> = std::env::args_os().skip(1).collect();
    let mut flag = |name: &str| match arguments.iter().position(|argument| argument == name) {
        Some(at) => {
            arguments.remove(at);
            true
        }
        None => false,
    };
    let ignore_all = flag("--ignore-all");
    let with_contents = flag("--with-contents");
    let [directory] = arguments.as_slice() else {
        eprintln!("usage: fanotify_floor [--ignore-all] [--with-contents] DIR");
        std::process::exit(2);
    };
    let directory = PathBuf::from(directory);
    let mut group = match Fanotify::watch_filesystem(&directory) {
        Ok(group) => group,
        Err(err) => {
            eprintln!(
                "fanotify_floor: cannot watch {}: {err}",
                directory.display()
            );
            std::process::exit(1);
        }
    };
    if with_contents {
        if let Err(err) = group.hear_contents_everywhere() {
            eprintln!(
                "fanotify_floor: cannot ask for content events on {}: {err}",
                directory.display()
            );
            std::process::exit(1);
        }
    }
    if ignore_all {
        if let Err(err) = group.ignore_file_system(&directory) {
            eprintln!(
                "fanotify_floor: cannot ignore the events on {}: {err}",
                directory.display()
            );
            std::process::exit(1);
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        match group.read(IDLE_WAIT) {
            Ok(events) if !events.is_empty() => std::thread::sleep(BUSY_READ_DELAY),
            Ok(_) => {}
            Err(err) => {
                eprintln!("fanotify_floor: cannot read events: {err}");
                std::process::exit(1);
            }
        }
    }
}
