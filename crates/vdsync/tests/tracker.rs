//! The tracker end to end with real fanotify: `vdsync track` runs beside the
//! development tree, `status` and journal-driven `push` must see every change, and an
//! agent applying the pushes must end with the same tree.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vdsync_test_support::{
    assert_trees_equal, describe_tree, spawn_tracker, tempdir, wait_until, GroupChild, Mount,
    TestRepo, Vdsync,
};

fn vdsync() -> Vdsync {
    Vdsync::new(env!("CARGO_BIN_EXE_vdsync"))
}

/// How the tracker under test is started.
#[derive(Clone, Copy)]
enum Watcher {
    Fanotify,
    Inotify,
    /// `--watcher auto` without CAP_SYS_ADMIN: fanotify is refused.
    AutoWithoutSysAdmin,
}

struct Lab {
    /// Unmounted (lazily) before the temporary directory goes.
    _own_file_system: Option<Mount>,
    _temp: tempfile::TempDir,
    watcher: Watcher,
    /// The tracker's first line.
    tracker_said: String,
    dir: PathBuf,
    dev: PathBuf,
    state: PathBuf,
    repo: TestRepo,
    vdsync: Vdsync,
    tracker: Option<GroupChild>,
}

impl Lab {
    fn new(watcher: Watcher, initial: impl FnOnce(&Path)) -> Lab {
        let temp = tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        Lab::build(temp, None, dir, watcher, initial)
    }

    /// A lab on an ext4 file system of its own, so that its tracker hears no other
    /// test's changes (their directory moves make it forget its ignore marks).
    fn on_own_file_system(watcher: Watcher, initial: impl FnOnce(&Path)) -> Lab {
        let temp = tempdir().unwrap();
        let dir = temp.path().join("fs");
        let mount = Mount::ext4_image(&temp.path().join("fs.img"), 64, &dir);
        Lab::build(temp, Some(mount), dir, watcher, initial)
    }

    fn build(
        temp: tempfile::TempDir,
        own_file_system: Option<Mount>,
        dir: PathBuf,
        watcher: Watcher,
        initial: impl FnOnce(&Path),
    ) -> Lab {
        let dev = dir.join("dev");
        std::fs::create_dir(&dev).unwrap();
        initial(&dev);
        let vdsync = vdsync();
        let repo = TestRepo::start(&vdsync, &dir, &dev);
        let mut lab = Lab {
            _own_file_system: own_file_system,
            _temp: temp,
            watcher,
            tracker_said: String::new(),
            state: dir.join("state"),
            dir,
            dev,
            repo,
            vdsync,
            tracker: None,
        };
        lab.start_tracker();
        // The tracker's first journal entry is "started": one full push clears it,
        // made by `vdsync push` (the tracker leaves full scans to it).
        let first = lab.push();
        assert!(first["version"].is_null(), "{first}");
        assert_eq!(first["by_tracker"], false, "{first}");
        lab
    }

    fn start_tracker(&mut self) {
        let mut command = match self.watcher {
            Watcher::AutoWithoutSysAdmin => {
                let mut command = Command::new("setpriv");
                command
                    .args(["--inh-caps", "-sys_admin", "--bounding-set", "-sys_admin"])
                    .arg(&self.vdsync.binary);
                command
            }
            _ => Command::new(&self.vdsync.binary),
        };
        let watcher = match self.watcher {
            Watcher::Fanotify => "fanotify",
            Watcher::Inotify => "inotify",
            Watcher::AutoWithoutSysAdmin => "auto",
        };
        command
            .args(["track", "--watcher", watcher, "--root"])
            .arg(&self.dev)
            .arg("--state")
            .arg(&self.state);
        command.stderr(Stdio::null());
        let (tracker, said) = spawn_tracker(&mut command);
        self.tracker_said = said;
        self.tracker = Some(tracker);
    }

    fn stop_tracker(&mut self) {
        if let Some(mut tracker) = self.tracker.take() {
            tracker.kill();
        }
    }

    /// Stops the tracker as an operator would, with SIGTERM, and returns what it
    /// printed after its first line.
    fn stop_tracker_with_sigterm(&mut self) -> String {
        use std::io::Read;
        let mut tracker = self.tracker.take().expect("no tracker is running");
        let pid = rustix::process::Pid::from_raw(tracker.pid() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = tracker.wait_within(Duration::from_secs(30), "the tracker to stop on SIGTERM");
        assert!(status.success(), "the tracker stopped with {status:?}");
        let mut said = String::new();
        tracker
            .child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        said
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.vdsync.ok([
            "status".as_ref(),
            "--json".as_ref(),
            "--root".as_ref(),
            self.dev.as_os_str(),
            "--state".as_ref(),
            self.state.as_os_str(),
        ]);
        serde_json::from_str(&out).unwrap()
    }

    /// `(change, path)` pairs from `status --json`.
    fn status(&self) -> Vec<(String, String)> {
        let report = self.status_json();
        report["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|line| {
                (
                    line["change"].as_str().unwrap().to_owned(),
                    line["path"].as_str().unwrap_or("(not utf-8)").to_owned(),
                )
            })
            .collect()
    }

    fn push_command(&self) -> Command {
        let mut command = self.vdsync.command([
            "push".as_ref(),
            "--json".as_ref(),
            "--root".as_ref(),
            self.dev.as_os_str(),
            "--state".as_ref(),
            self.state.as_os_str(),
            "--repo".as_ref(),
            self.repo.url.as_ref(),
        ]);
        command.stdin(Stdio::null());
        command
    }

    fn push_ok(&self) -> String {
        let output = self.push_command().output().unwrap();
        assert!(
            output.status.success(),
            "push failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Pushes, checks that the push read the journal (no full scan) and that the
    /// tracker made it, and returns the parsed JSON report.
    fn push_from_journal(&self) -> serde_json::Value {
        let pushed = self.push();
        assert_eq!(pushed["source"]["mode"], "journal", "{pushed}");
        assert_eq!(pushed["by_tracker"], true, "{pushed}");
        pushed
    }

    /// Pushes and returns the parsed JSON report.
    fn push(&self) -> serde_json::Value {
        let out = self.push_ok();
        serde_json::from_str(out.trim()).unwrap_or_else(|_| serde_json::json!({"text": out}))
    }

    /// Brings the lab's agent (`agent --once` on `agent-root/`) up to the head;
    /// returns its root.
    fn agent_catch_up(&self) -> PathBuf {
        let root = self.dir.join("agent-root");
        std::fs::create_dir_all(&root).unwrap();
        self.vdsync.ok([
            "agent".as_ref(),
            "--once".as_ref(),
            "--root".as_ref(),
            root.as_os_str(),
            "--state".as_ref(),
            self.dir.join("agent-state").as_os_str(),
            "--repo".as_ref(),
            self.repo.url.as_ref(),
            "--name".as_ref(),
            "agent".as_ref(),
        ]);
        root
    }

    /// Whether the tracker's fanotify group has the kernel ignore events in
    /// `directory`, as the kernel lists the group's marks in /proc
    /// (`fanotify ino:HEX sdev:… ignored_mask:HEX …`).
    fn tracker_ignores(&self, directory: &Path) -> bool {
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(directory).unwrap());
        let wanted = format!("fanotify ino:{inode:x} ");
        let pid = self.tracker.as_ref().unwrap().child.id();
        std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .unwrap()
            .filter_map(|fd| std::fs::read_to_string(fd.unwrap().path()).ok())
            .any(|info| {
                info.lines()
                    .any(|line| line.starts_with(&wanted) && !line.contains(" ignored_mask:0 "))
            })
    }

    fn agent_matches_dev(&self) {
        let root = self.agent_catch_up();
        assert_trees_equal(&describe_tree(&self.dev, &[]), &describe_tree(&root, &[]));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_tracker();
    }
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(change, path)| ((*change).to_owned(), (*path).to_owned()))
        .collect()
}

fn every_kind_of_change_is_seen_and_pushed_from_the_journal(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::create_dir_all(dev.join("etc/app")).unwrap();
        std::fs::write(dev.join("etc/app/app.conf"), "v1").unwrap();
        std::fs::write(dev.join("etc/motd"), "hello").unwrap();
        std::fs::write(dev.join("etc/old-name"), "renamed later").unwrap();
        std::fs::create_dir_all(dev.join("var/www")).unwrap();
        std::fs::write(dev.join("var/www/index.html"), "<h1>").unwrap();
        std::fs::write(dev.join("doomed"), "x").unwrap();
        std::fs::create_dir_all(dev.join("doomed-dir/inner")).unwrap();
        std::fs::write(dev.join("doomed-dir/inner/f"), "x").unwrap();
    });
    let dev = &lab.dev;
    std::fs::write(dev.join("etc/app/app.conf"), "v2").unwrap(); // modify
    std::fs::write(dev.join("etc/new"), "new").unwrap(); // create
    std::fs::set_permissions(
        dev.join("etc/motd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap(); // attrib
    std::fs::remove_file(dev.join("doomed")).unwrap(); // delete
    std::fs::remove_dir_all(dev.join("doomed-dir")).unwrap(); // rmdir of a tree
    std::fs::rename(dev.join("etc/old-name"), dev.join("var/www/new-name")).unwrap(); // across dirs
    std::os::unix::fs::symlink("app/app.conf", dev.join("etc/link")).unwrap();
    std::fs::create_dir(dev.join("empty")).unwrap();

    // A directory moved in from outside the root, with contents nobody reported.
    let outside = lab.dir.join("outside");
    std::fs::create_dir_all(outside.join("deep/deeper")).unwrap();
    std::fs::write(outside.join("deep/deeper/file"), "from outside").unwrap();
    std::fs::rename(&outside, dev.join("moved-in")).unwrap();
    // And one moved out.
    std::fs::rename(dev.join("var/www"), lab.dir.join("www-moved-out")).unwrap();

    let report = lab.status_json();
    assert_eq!(report["source"]["mode"], "journal", "{report}");
    let status = lab.status();
    assert_eq!(
        status,
        pairs(&[
            ("deleted", "doomed"),
            ("deleted", "doomed-dir"),
            ("new", "empty"),
            ("modified", "etc/app/app.conf"),
            ("new", "etc/link"),
            ("modified", "etc/motd"),
            ("new", "etc/new"),
            ("deleted", "etc/old-name"),
            ("new", "moved-in"),
            ("new", "moved-in/deep"),
            ("new", "moved-in/deep/deeper"),
            ("new", "moved-in/deep/deeper/file"),
            ("deleted", "var/www"),
        ]),
    );
    let pushed = lab.push_from_journal();
    assert_eq!(pushed["version"], 1);
    lab.agent_matches_dev();
    assert_eq!(lab.status(), pairs(&[]));
}

fn temp_files_and_editor_saves_coalesce(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::write(dev.join("config.toml"), "a = 1").unwrap();
    });
    // A temp file created, written and deleted leaves nothing.
    let temp_file = lab.dev.join(".scratch.tmp");
    std::fs::write(&temp_file, "scratch").unwrap();
    std::fs::write(&temp_file, "scratch 2").unwrap();
    std::fs::remove_file(&temp_file).unwrap();
    // An editor save: write a temp file, rename it over the original.
    std::fs::write(lab.dev.join(".config.toml.swp"), "a = 2").unwrap();
    std::fs::rename(
        lab.dev.join(".config.toml.swp"),
        lab.dev.join("config.toml"),
    )
    .unwrap();
    // A rename chain: only the last name exists.
    std::fs::write(lab.dev.join("one"), "chain").unwrap();
    std::fs::rename(lab.dev.join("one"), lab.dev.join("two")).unwrap();
    std::fs::rename(lab.dev.join("two"), lab.dev.join("three")).unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[("modified", "config.toml"), ("new", "three")])
    );
    lab.push();
    lab.agent_matches_dev();
}

fn a_change_saved_just_before_push_is_never_left_out(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::write(dev.join("page.html"), "v0").unwrap();
    });
    for round in 1..=5 {
        std::fs::write(lab.dev.join("page.html"), format!("v{round}")).unwrap();
        std::fs::write(lab.dev.join(format!("added-{round}")), "x").unwrap();
        // No wait of any kind: the push's fence must cover these writes.
        let pushed = lab.push_from_journal();
        assert_eq!(pushed["version"], round, "{pushed}");
        assert_eq!(pushed["files"], 2, "round {round}: {pushed}");
    }
    lab.agent_matches_dev();
}

fn a_write_storm_loses_nothing(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::create_dir(dev.join("storm")).unwrap()
    });
    for file in 0..2000 {
        std::fs::write(lab.dev.join(format!("storm/f{file}")), file.to_string()).unwrap();
    }
    for file in (0..2000).step_by(3) {
        std::fs::write(lab.dev.join(format!("storm/f{file}")), "rewritten").unwrap();
    }
    for file in (0..2000).step_by(7) {
        std::fs::remove_file(lab.dev.join(format!("storm/f{file}"))).unwrap();
    }
    lab.push_from_journal();
    lab.agent_matches_dev();
}

/// The tracker keeps the pusher's index open and answers journal pushes from it; a
/// push or status that reads all of it has it closed first, and the next journal
/// push has the tracker open it again. No push may lose its index update on the way.
fn the_index_passes_between_the_tracker_and_full_scans(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| std::fs::write(dev.join("a"), "v0").unwrap());
    std::fs::write(lab.dev.join("a"), "v1").unwrap();
    let pushed = lab.push_from_journal();
    assert_eq!(pushed["version"], 1, "{pushed}");

    std::fs::write(lab.dev.join("b"), "new").unwrap();
    let mut rescan = lab.push_command();
    rescan.arg("--rescan");
    let output = rescan.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let pushed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(pushed["source"]["mode"], "full_scan", "{pushed}");
    assert_eq!(pushed["version"], 2, "{pushed}");

    std::fs::write(lab.dev.join("a"), "v3").unwrap();
    let report = lab.status_json();
    assert_eq!(report["pushed_version"], 2, "{report}");
    assert_eq!(lab.status(), pairs(&[("modified", "a")]));
    let pushed = lab.push_from_journal();
    assert_eq!(pushed["version"], 3, "{pushed}");
    assert_eq!(pushed["files"], 1, "{pushed}");
    assert_eq!(lab.status(), pairs(&[]));
    assert_eq!(lab.status_json()["pushed_version"], 3);
    lab.agent_matches_dev();
}

fn hard_links_fall_back_to_a_full_scan(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::write(dev.join("a"), "shared").unwrap()
    });
    std::fs::hard_link(lab.dev.join("a"), lab.dev.join("b")).unwrap();
    let pushed = lab.push();
    assert_eq!(pushed["source"]["mode"], "full_scan", "{pushed}");
    lab.agent_matches_dev();
}

fn queue_overflow_marks_the_whole_root_for_rescan(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::create_dir(dev.join("flood")).unwrap()
    });
    // Stop the tracker from reading, then make more events than the kernel queues
    // (16384 by default).
    let pid = lab.tracker.as_ref().unwrap().pid();
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    for file in 0..20_000 {
        std::fs::write(lab.dev.join(format!("flood/f{file}")), "x").unwrap();
    }
    signal("-CONT");
    let report = lab.status_json();
    assert_eq!(report["source"]["mode"], "full_scan", "{report}");
    assert!(
        report["source"]["reason"]
            .as_str()
            .unwrap()
            .contains("overflowed"),
        "{report}"
    );
    assert_eq!(report["changes"].as_array().unwrap().len(), 20_000);
    let pushed = lab.push();
    assert_eq!(pushed["files"], 20_000, "{pushed}");
    lab.agent_matches_dev();
    // The rescan covered it: the next status is back on the journal.
    let report = lab.status_json();
    assert_eq!(report["source"]["mode"], "journal", "{report}");
}

fn changes_while_the_tracker_was_down_are_found_after_its_restart(watcher: Watcher) {
    let mut lab = Lab::new(watcher, |dev| {
        std::fs::write(dev.join("before"), "0").unwrap()
    });
    std::fs::write(lab.dev.join("before"), "1").unwrap();
    // Its last line says what it read: at least the fence file of the push that
    // `Lab::new` made (the write just made may still be queued when it stops; the
    // next tracker rescans anyway).
    let said = lab.stop_tracker_with_sigterm();
    let events: u64 = said
        .strip_prefix("stopped after reading ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("the tracker's last words: {said:?}"));
    assert!(events >= 1, "the tracker read {events} event(s): {said:?}");
    std::fs::write(lab.dev.join("while-down"), "unseen by any tracker").unwrap();
    std::fs::remove_file(lab.dev.join("before")).unwrap();
    // Without a tracker, push and status scan everything rather than trust the journal.
    let report = lab.status_json();
    assert_eq!(report["tracker_running"], false);
    assert_eq!(
        lab.status(),
        pairs(&[("deleted", "before"), ("new", "while-down")])
    );
    lab.start_tracker();
    std::fs::write(lab.dev.join("after-restart"), "2").unwrap();
    let report = lab.status_json();
    assert_eq!(report["source"]["mode"], "full_scan", "{report}");
    assert!(report["source"]["reason"]
        .as_str()
        .unwrap()
        .contains("tracker started"));
    lab.push();
    lab.agent_matches_dev();
    assert_eq!(lab.status_json()["source"]["mode"], "journal");
}

/// Runs each scenario once per watcher.
fn file_systems_mounted_below_the_root_are_tracked(watcher: Watcher) {
    let mut mounts = Vec::new();
    let lab = Lab::new(watcher, |dev| {
        let dir = dev.parent().unwrap();
        mounts.push(Mount::ext4_image(
            &dir.join("data.img"),
            16,
            &dev.join("data"),
        ));
        std::fs::write(dev.join("data/kept"), "v0").unwrap();
        // The state directory (where the fence files are) on a file system of its own.
        mounts.push(Mount::tmpfs(&dir.join("state")));
    });
    // Unmounted before the lab removes its directory.
    let _mounts = mounts;
    if matches!(watcher, Watcher::Fanotify) {
        assert!(
            lab.tracker_said
                .contains("3 whole file systems (mounts below the root included)"),
            "{}",
            lab.tracker_said
        );
    }
    std::fs::write(lab.dev.join("data/kept"), "v1").unwrap();
    std::fs::create_dir(lab.dev.join("data/sub")).unwrap();
    std::fs::write(lab.dev.join("data/sub/new"), "fresh").unwrap();
    std::fs::write(lab.dev.join("top"), "on the root's file system").unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[
            ("modified", "data/kept"),
            ("new", "data/sub"),
            ("new", "data/sub/new"),
            ("new", "top"),
        ])
    );
    lab.push_from_journal();
    lab.agent_matches_dev();
}

fn a_file_system_mounted_or_unmounted_while_tracking_is_seen(watcher: Watcher) {
    let lab = Lab::new(watcher, |dev| {
        std::fs::create_dir(dev.join("late")).unwrap();
        std::fs::write(dev.join("late/under"), "hidden by the mount").unwrap();
    });
    // Mounted while the tracker runs: the tree under late/ changes without an event.
    let late = Mount::ext4_image(&lab.dir.join("late.img"), 16, &lab.dev.join("late"));
    std::fs::remove_dir(late.path.join("lost+found")).unwrap();
    std::fs::write(late.path.join("before-any-write-was-watched"), "1").unwrap();
    let report = lab.status_json();
    assert_eq!(report["source"]["mode"], "journal", "{report}");
    assert_eq!(
        lab.status(),
        pairs(&[
            ("new", "late/before-any-write-was-watched"),
            ("deleted", "late/under"),
        ])
    );
    // And events inside it are seen from now on.
    std::fs::create_dir(late.path.join("sub")).unwrap();
    std::fs::write(late.path.join("sub/file"), "2").unwrap();
    lab.push_from_journal();
    lab.agent_matches_dev();
    std::fs::write(late.path.join("sub/file"), "3").unwrap();
    assert_eq!(lab.status(), pairs(&[("modified", "late/sub/file")]));
    lab.push();

    // Unmounted (the tracker must not keep it busy): what was under it shows again.
    late.unmount();
    wait_until(Duration::from_secs(10), "late/ to be unmounted", || {
        lab.dev.join("late/under").exists()
    });
    assert_eq!(
        lab.status(),
        pairs(&[
            ("deleted", "late/before-any-write-was-watched"),
            ("deleted", "late/sub"),
            ("new", "late/under"),
        ])
    );
    lab.push();
    lab.agent_matches_dev();
}

/// The fanotify tracker stops the events of a new directory's entries in the kernel
/// until the next push (ignore marks, `FAN_MARK_IGNORE`), and has the push look at
/// the whole directory instead. Nothing may be lost by that: not files written into
/// it, not a file moved in or out (the kernel then reports only the other
/// directory's half of the rename), and not what changes in it after the push.
fn a_new_directory_is_pushed_whole_and_watched_again_after_the_push(watcher: Watcher) {
    // On a file system of its own: another test's directory move would make the
    // tracker forget the mark on new/ before this one saw it.
    let lab = Lab::on_own_file_system(watcher, |dev| {
        std::fs::write(dev.join("kept"), "kept").unwrap();
        std::fs::create_dir(dev.join("old")).unwrap();
    });
    let dev = &lab.dev;
    let new = dev.join("new");
    std::fs::create_dir(&new).unwrap();
    if matches!(watcher, Watcher::Fanotify) {
        wait_until(
            Duration::from_secs(10),
            "the tracker's ignore mark on new/",
            || lab.tracker_ignores(&new),
        );
    }
    for file in 0..50 {
        std::fs::write(new.join(format!("f{file}")), file.to_string()).unwrap();
    }
    std::fs::create_dir(new.join("sub")).unwrap();
    std::fs::write(new.join("sub/deeper"), "deeper").unwrap();
    std::fs::rename(dev.join("kept"), new.join("kept")).unwrap();
    std::fs::write(new.join("leaving"), "leaving").unwrap();
    std::fs::rename(new.join("leaving"), dev.join("old/arrived")).unwrap();
    lab.push_from_journal();
    lab.agent_matches_dev();

    // The push's snapshot lifted the ignores: changes in new/ are reported again.
    if matches!(watcher, Watcher::Fanotify) {
        assert!(!lab.tracker_ignores(&new));
    }
    std::fs::write(new.join("f0"), "changed").unwrap();
    std::fs::remove_file(new.join("f1")).unwrap();
    std::fs::write(new.join("late"), "late").unwrap();
    std::fs::write(new.join("sub/deeper"), "changed too").unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[
            ("modified", "new/f0"),
            ("deleted", "new/f1"),
            ("new", "new/late"),
            ("modified", "new/sub/deeper"),
        ])
    );
    let pushed = lab.push();
    assert_eq!(pushed["files"], 3, "{pushed}");
    lab.agent_matches_dev();
}

/// The fanotify tracker's mark covers the whole file system, so it hears everyone's
/// changes; a directory nothing is pushed from (outside the root, or excluded) falls
/// silent after its first event, across pushes. What moves from such a directory
/// into the tree must still be seen, the directory itself moved in too, and the
/// state directory (where the fences are made) never falls silent: every push
/// below needs its fence.
#[test]
fn directories_nothing_is_pushed_from_fall_silent_and_what_leaves_them_is_seen() {
    let lab = Lab::on_own_file_system(Watcher::Fanotify, |dev| {
        std::fs::create_dir(dev.join("tmp")).unwrap(); // excluded by default
    });
    let outside = lab.dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("first"), "wakes the tracker").unwrap();
    std::fs::write(lab.dev.join("tmp/first"), "wakes the tracker").unwrap();
    for directory in [&outside, &lab.dev.join("tmp")] {
        wait_until(
            Duration::from_secs(10),
            &format!("the tracker's ignore mark on {}", directory.display()),
            || lab.tracker_ignores(directory),
        );
    }
    assert!(!lab.tracker_ignores(&lab.state), "the state directory");
    assert!(!lab.tracker_ignores(&lab.dev), "the root");

    std::fs::write(outside.join("arrives"), "from outside").unwrap();
    std::fs::rename(outside.join("arrives"), lab.dev.join("arrived")).unwrap();
    std::fs::create_dir(outside.join("sub")).unwrap();
    std::fs::write(outside.join("sub/inner"), "inner").unwrap();
    std::fs::rename(outside.join("sub"), lab.dev.join("sub")).unwrap();
    std::fs::write(lab.dev.join("tmp/scratch"), "was excluded").unwrap();
    std::fs::rename(lab.dev.join("tmp/scratch"), lab.dev.join("kept")).unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[
            ("new", "arrived"),
            ("new", "kept"),
            ("new", "sub"),
            ("new", "sub/inner"),
        ])
    );
    lab.push_from_journal();

    // sub/ moved, so every ignore was forgotten. outside/ falls silent again at its
    // next event, and stays so across a push that saw no directory move and no
    // new directory.
    std::fs::write(outside.join("again"), "wakes the tracker").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the tracker's ignore mark on outside/ again",
        || lab.tracker_ignores(&outside),
    );
    std::fs::write(lab.dev.join("arrived"), "changed").unwrap();
    let pushed = lab.push_from_journal();
    assert_eq!(pushed["files"], 1, "{pushed}");
    assert!(lab.tracker_ignores(&outside), "kept across the snapshot");

    // The ignored directory itself moves into the tree: the move is reported (it
    // is about a directory), every ignore is forgotten, and what changed in it
    // before and after is pushed.
    std::fs::write(outside.join("before-the-move"), "silent").unwrap();
    std::fs::rename(&outside, lab.dev.join("moved-in")).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the tracker to forget its ignore marks after a directory moved",
        || !lab.tracker_ignores(&lab.dev.join("moved-in")),
    );
    std::fs::write(lab.dev.join("moved-in/after-the-move"), "heard").unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[
            ("new", "moved-in"),
            ("new", "moved-in/after-the-move"),
            ("new", "moved-in/again"),
            ("new", "moved-in/before-the-move"),
            ("new", "moved-in/first"),
        ])
    );
    lab.push_from_journal();
    // Excluded, so never shipped: out of the comparison.
    std::fs::remove_dir_all(lab.dev.join("tmp")).unwrap();
    lab.agent_matches_dev();
}

macro_rules! for_each_watcher {
    ($($scenario:ident),* $(,)?) => {
        mod fanotify {
            $(#[test] fn $scenario() { super::$scenario(super::Watcher::Fanotify) })*
        }
        mod inotify {
            $(#[test] fn $scenario() { super::$scenario(super::Watcher::Inotify) })*
        }
    };
}

for_each_watcher!(
    every_kind_of_change_is_seen_and_pushed_from_the_journal,
    temp_files_and_editor_saves_coalesce,
    a_change_saved_just_before_push_is_never_left_out,
    a_write_storm_loses_nothing,
    hard_links_fall_back_to_a_full_scan,
    the_index_passes_between_the_tracker_and_full_scans,
    queue_overflow_marks_the_whole_root_for_rescan,
    changes_while_the_tracker_was_down_are_found_after_its_restart,
    file_systems_mounted_below_the_root_are_tracked,
    a_file_system_mounted_or_unmounted_while_tracking_is_seen,
    a_new_directory_is_pushed_whole_and_watched_again_after_the_push,
);

#[test]
fn where_fanotify_is_refused_the_tracker_falls_back_to_inotify_and_loses_nothing() {
    let lab = Lab::new(Watcher::AutoWithoutSysAdmin, |dev| {
        std::fs::create_dir(dev.join("site")).unwrap();
        std::fs::write(dev.join("site/index.html"), "v0").unwrap();
    });
    assert!(
        lab.tracker_said.contains("inotify") && lab.tracker_said.contains("fanotify was refused"),
        "{}",
        lab.tracker_said
    );
    std::fs::write(lab.dev.join("site/index.html"), "v1").unwrap();
    std::fs::create_dir_all(lab.dev.join("site/new/deeper")).unwrap();
    std::fs::write(lab.dev.join("site/new/deeper/page.html"), "fresh").unwrap();
    lab.push_from_journal();
    lab.agent_matches_dev();
}

/// Directories (by inode) that the fanotify groups of process `pid` have a mark
/// for content events on (`FAN_MODIFY` in its mask), from the kernel's own list in
/// /proc/PID/fdinfo.
fn content_marked_directories(pid: u32) -> std::collections::HashSet<u64> {
    const FAN_MODIFY: u64 = 0x2;
    let mut marked = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let is_fanotify = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:[fanotify]");
        if !is_fanotify {
            continue;
        }
        let fd = entry.file_name().into_string().unwrap();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        for line in info
            .lines()
            .filter(|line| line.starts_with("fanotify ino:"))
        {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            };
            if field("mask:") & FAN_MODIFY != 0 {
                marked.insert(field("ino:"));
            }
        }
    }
    marked
}

/// A directory moved out of the root loses its content mark at its first event
/// there, and so does each directory below it: the tracker no longer hears, nor
/// keeps in memory, what nothing is pushed from. Moved back in, it is marked again.
#[test]
fn a_directory_moved_out_of_the_root_is_no_longer_heard() {
    use std::os::unix::fs::MetadataExt;
    let lab = Lab::new(Watcher::Fanotify, |dev| {
        std::fs::create_dir_all(dev.join("leaving/below")).unwrap();
        std::fs::write(dev.join("leaving/below/file"), "v0").unwrap();
    });
    let tracker = lab.tracker.as_ref().unwrap().pid();
    let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
    let (root, leaving, below) = (
        inode(&lab.dev),
        inode(&lab.dev.join("leaving")),
        inode(&lab.dev.join("leaving/below")),
    );
    // The first push's snapshot marked the whole tree.
    let marked = content_marked_directories(tracker);
    assert!(
        [root, leaving, below]
            .iter()
            .all(|ino| marked.contains(ino)),
        "not every directory has a content mark: {marked:?}"
    );

    let outside = lab.dir.join("outside");
    std::fs::rename(lab.dev.join("leaving"), &outside).unwrap();
    std::fs::write(outside.join("new-file"), "heard once").unwrap();
    std::fs::write(outside.join("below/file"), "v1").unwrap();
    std::fs::write(lab.dev.join("staying"), "in the tree").unwrap();
    // The snapshot's fence has the tracker read every event made before it.
    assert_eq!(
        lab.status(),
        pairs(&[("deleted", "leaving"), ("new", "staying")])
    );
    let marked = content_marked_directories(tracker);
    assert!(marked.contains(&root), "the root lost its mark: {marked:?}");
    assert!(
        !marked.contains(&leaving) && !marked.contains(&below),
        "a directory moved out kept its content mark: {marked:?}"
    );
    lab.push_from_journal();

    // Moved back in, it is heard again from the next snapshot on.
    std::fs::rename(&outside, lab.dev.join("returned")).unwrap();
    assert_eq!(
        lab.status(),
        pairs(&[
            ("new", "returned"),
            ("new", "returned/below"),
            ("new", "returned/below/file"),
            ("new", "returned/new-file"),
        ])
    );
    let marked = content_marked_directories(tracker);
    assert!(
        marked.contains(&leaving) && marked.contains(&below),
        "a directory moved back in has no content mark: {marked:?}"
    );
    lab.push_from_journal();
    std::fs::write(lab.dev.join("returned/below/file"), "v2").unwrap();
    assert_eq!(lab.status(), pairs(&[("modified", "returned/below/file")]));
    lab.push_from_journal();
    lab.agent_matches_dev();
}

/// A file rewritten over and over while it is pushed: every push that succeeds sent
/// a state the file was in at one instant, and every push that fails says the file
/// kept changing. Each rewrite fills the file with one byte value, one chunk at a
/// time: the last chunk first, then the others from the start. So the file is only
/// ever all one value, or the new value in its last chunk and in a run of chunks
/// from the start with the old value between; a read that straddled writes can
/// show what it never held (the new value in a middle chunk with the old one before
/// it). Once the writer stops, a push sends the last state. The upload is small
/// enough to leave as one buffered body.
#[test]
fn only_the_trackers_user_may_connect_and_silent_clients_hold_up_no_push() {
    use std::os::unix::net::UnixStream;

    let lab = Lab::new(Watcher::Fanotify, |dev| {
        std::fs::write(dev.join("index.html"), "v0").unwrap();
    });
    // Whoever connects can have the tracker push what it can read: its user only.
    let socket = std::fs::metadata(lab.state.join("tracker.sock")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&socket.permissions()) & 0o777,
        0o600
    );
    // More silent connections than the tracker keeps threads waiting for clients.
    let silent: Vec<UnixStream> = (0..6)
        .map(|_| UnixStream::connect(lab.state.join("tracker.sock")).unwrap())
        .collect();
    std::fs::write(lab.dev.join("index.html"), "v1").unwrap();
    let pushed = lab.push_from_journal();
    assert_eq!(pushed["files"], 1, "{pushed}");
    // Had the push waited for threads held by the silent clients, they would have
    // been dropped first, after the tracker's 10 s request timeout.
    for mut connection in silent {
        connection.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut connection, &mut byte);
        assert!(
            matches!(&read, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock),
            "a silent client's connection was closed (read gave {read:?}) before the push was answered"
        );
    }

    // Mode 0600 is set just after the socket is made; a client of another user
    // that connected in between is refused by its credentials. Loosened here to let
    // one in.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    for traversed in [&lab.dir, &lab.state] {
        std::fs::set_permissions(traversed, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let socket = lab.state.join("tracker.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = vdsync_test_support::output_within(
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", STRANGER_CLIENT])
            .arg(&socket)
            .uid(65534)
            .gid(65534),
        Duration::from_secs(30),
    );
    let answer = String::from_utf8_lossy(&stranger.stdout);
    assert!(
        answer.contains("only uid 0 (the tracker's user) may use this tracker, not uid 65534"),
        "another user's request got {answer:?} (stderr: {})",
        String::from_utf8_lossy(&stranger.stderr)
    );
    lab.agent_matches_dev();
}

/// Connects to the socket named by its argument, waits for the tracker's answer
/// (it refuses a stranger before reading the request), asks for a snapshot all the
/// same (the tracker may have closed by then) and prints the answer line.
const STRANGER_CLIENT: &str = "\
import select, socket, sys
client = socket.socket(socket.AF_UNIX)
client.connect(sys.argv[1])
if not select.select([client], [], [], 20)[0]:
    sys.exit('no answer before the request within 20 s')
try:
    client.sendall(b'{\"op\": \"snapshot\"}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass
print(client.makefile().readline(), end='')
";

#[test]
fn a_file_rewritten_while_it_is_pushed_is_sent_as_it_was_at_one_instant() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::Arc;

    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 12;
    let lab = Lab::new(Watcher::Fanotify, |dev| {
        std::fs::write(dev.join("data.bin"), vec![0u8; CHUNK * CHUNKS]).unwrap();
    });
    let next = |value: u8| value % 250 + 1;
    let stop = Arc::new(AtomicBool::new(false));
    let last_value = Arc::new(AtomicU8::new(0));
    let writer = {
        let (stop, last_value) = (stop.clone(), last_value.clone());
        let path = lab.dev.join("data.bin");
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut value = 0u8;
            let mut rewrites = 0u32;
            while !stop.load(Ordering::Relaxed) {
                value = next(value);
                let order = std::iter::once(CHUNKS - 1).chain(0..CHUNKS - 1);
                for chunk in order {
                    file.write_all_at(&[value; CHUNK], (chunk * CHUNK) as u64)
                        .unwrap();
                    // Spread over some milliseconds, so a push can read mid-rewrite.
                    std::thread::sleep(Duration::from_micros(300));
                }
                last_value.store(value, Ordering::Relaxed);
                // Now and then a pause long enough for a push on a loaded machine
                // (the hash read, a round trip to the repository and the upload's
                // read) to fall within it, so that some push can go through.
                rewrites += 1;
                let pause = if rewrites.is_multiple_of(6) { 200 } else { 15 };
                std::thread::sleep(Duration::from_millis(pause));
            }
        })
    };
    // Stops the writer however the test ends, so it does not slow the others.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_writer = StopOnDrop(stop.clone());
    // Whether `content` is a state the writer ever left the file in.
    let held_at_one_instant = |content: &[u8]| -> bool {
        let chunks: Vec<&[u8]> = content.chunks(CHUNK).collect();
        if chunks.len() != CHUNKS || chunks.iter().any(|c| c.iter().any(|b| *b != c[0])) {
            return false;
        }
        let values: Vec<u8> = chunks.iter().map(|c| c[0]).collect();
        let new = values[CHUNKS - 1];
        if values.iter().all(|value| *value == new) {
            return true;
        }
        let from_start = values[..CHUNKS - 1]
            .iter()
            .take_while(|v| **v == new)
            .count();
        let old = values[from_start];
        next(old) == new && values[from_start..CHUNKS - 1].iter().all(|v| *v == old)
    };

    let (mut succeeded, mut refused) = (0, 0);
    for attempt in 0..12 {
        let output = lab.push_command().output().unwrap();
        if output.status.success() {
            succeeded += 1;
            let root = lab.agent_catch_up();
            let sent = std::fs::read(root.join("data.bin")).unwrap();
            assert!(
                held_at_one_instant(&sent),
                "attempt {attempt}: the pushed file was never in this state (chunk values {:?}); the push said {}",
                sent.chunks(CHUNK).map(|c| c[0]).collect::<Vec<_>>(),
                String::from_utf8_lossy(&output.stdout),
            );
        } else {
            refused += 1;
            let said = String::from_utf8_lossy(&output.stderr);
            assert!(
                said.contains("kept changing") || said.contains("changed while it was uploaded"),
                "attempt {attempt}: the push failed for another reason: {said}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        succeeded > 0,
        "no push went through while the file was rewritten ({refused} said it kept changing)"
    );

    lab.push();
    let root = lab.agent_catch_up();
    let last = last_value.load(Ordering::Relaxed);
    assert_eq!(
        std::fs::read(root.join("data.bin")).unwrap(),
        vec![last; CHUNK * CHUNKS],
        "the push after the writer stopped did not send its last rewrite"
    );
}
