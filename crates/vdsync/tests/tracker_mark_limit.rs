//! The tracker when the kernel refuses its per-directory marks for content events
//! (`max_user_marks` reached): the file-system marks ask for those events instead,
//! and no change is lost.
//!
//! A test binary of its own: `max_user_marks` is one number for all of root's
//! fanotify groups, so lowering it would break other tests running beside it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vdsync_test_support::{spawn_tracker, tempdir, wait_until, TestRepo, Vdsync};

const MAX_USER_MARKS: &str = "/proc/sys/fs/fanotify/max_user_marks";

/// Sets `max_user_marks` and puts the old value back when dropped.
struct MarkLimit {
    before: String,
}

impl MarkLimit {
    fn set(limit: usize) -> MarkLimit {
        let before = std::fs::read_to_string(MAX_USER_MARKS).unwrap();
        std::fs::write(MAX_USER_MARKS, limit.to_string()).unwrap();
        MarkLimit { before }
    }
}

impl Drop for MarkLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(MAX_USER_MARKS, self.before.trim());
    }
}

/// The fanotify marks of every group on this machine, as /proc lists them.
fn marks_in_use() -> usize {
    let mut marks = 0;
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        for descriptor in descriptors.flatten() {
            if let Ok(info) = std::fs::read_to_string(descriptor.path()) {
                marks += info.lines().filter(|l| l.starts_with("fanotify ")).count();
            }
        }
    }
    marks
}

fn push(vdsync: &Vdsync, dev: &Path, state: &Path, url: &str) -> serde_json::Value {
    let out = vdsync.ok([
        "push".as_ref(),
        "--json".as_ref(),
        "--root".as_ref(),
        dev.as_os_str(),
        "--state".as_ref(),
        state.as_os_str(),
        "--repo".as_ref(),
        url.as_ref(),
    ]);
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn when_the_kernel_refuses_directory_marks_content_changes_are_still_heard() {
    const DIRECTORIES: usize = 40;
    let vdsync = Vdsync::new(env!("CARGO_BIN_EXE_vdsync"));
    let temp = tempdir().unwrap();
    let dev = temp.path().join("dev");
    for directory in 0..DIRECTORIES {
        let path = dev.join(format!("d{directory}"));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("file"), "v0").unwrap();
    }
    let repo = TestRepo::start(&vdsync, temp.path(), &dev);
    let state = temp.path().join("state");
    let log_path = temp.path().join("tracker.log");
    let mut command = Command::new(&vdsync.binary);
    command
        .args(["track", "--watcher", "fanotify", "--root"])
        .arg(&dev)
        .arg("--state")
        .arg(&state)
        .stderr(std::fs::File::create(&log_path).unwrap());
    let _tracker = spawn_tracker(&mut command);

    // Room for a few of the 41 directory marks the first snapshot places.
    let _limit = MarkLimit::set(marks_in_use() + 5);
    let first = push(&vdsync, &dev, &state, &repo.url);
    assert_eq!(first["source"]["mode"], "full_scan", "{first}");
    wait_until(
        Duration::from_secs(10),
        "the tracker to say it hears content events on the file-system mark",
        || {
            std::fs::read_to_string(&log_path)
                .is_ok_and(|log| log.contains("the file-system marks ask for them instead"))
        },
    );

    // Most directories have no mark of their own: their changes come from the
    // file-system mark now.
    for directory in 0..DIRECTORIES {
        let file = dev.join(format!("d{directory}/file"));
        let mut opened = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        std::io::Write::write_all(&mut opened, b" and more").unwrap();
    }
    let pushed = push(&vdsync, &dev, &state, &repo.url);
    assert_eq!(pushed["source"]["mode"], "journal", "{pushed}");
    assert_eq!(pushed["files"], DIRECTORIES, "{pushed}");
}
