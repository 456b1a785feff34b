//! `fanotify_floor DIR`: the least any fanotify tracker can cost a writer. It asks the
//! kernel for exactly the events `vdsync track` asks for ([`TRACKED_EVENTS`], one
//! `FAN_MARK_FILESYSTEM` mark, `FAN_REPORT_DFID_NAME`), reads them at the tracker's
//! pace (after a read that found events, the next waits 10 ms, as the tracker's
//! `BUSY_READ_DELAY`), and throws them away: no path resolution, no journal.
//!
//! The `tracker-overhead` benchmark runs it as a peer: the kernel queues and merges
//! each event in the context of the process that changed the file, so this is the
//! part of the tracker's overhead that no user-space work can remove.
//!
//! Prints `ready` once the mark is in place, then runs until killed.
//!
//! [`TRACKED_EVENTS`]: vdsync_sys::fanotify::TRACKED_EVENTS

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use vdsync_sys::fanotify::Fanotify;

/// The tracker's `BUSY_READ_DELAY`.
const BUSY_READ_DELAY: Duration = Duration::from_millis(10);
const IDLE_WAIT: Duration = Duration::from_millis(500);

fn main() {
    let Some(directory) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fanotify_floor DIR");
        std::process::exit(2);
    };
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
