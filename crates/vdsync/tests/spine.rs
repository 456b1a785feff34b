//! End to end through the real binary: repository, push and agent on real files,
//! as root. Each test builds its own trees, repository and agents in a temp dir.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vdsync_test_support::{
    assert_trees_equal, describe_tree, tempdir, wait_until, GroupChild, Mount, TestRepo, Vdsync,
};

fn vdsync() -> Vdsync {
    Vdsync::new(env!("CARGO_BIN_EXE_vdsync"))
}

/// A development tree, a repository initialized from it, and helpers to push and
/// to run agents.
struct Lab {
    _temp: tempfile::TempDir,
    dir: PathBuf,
    dev: PathBuf,
    repo: TestRepo,
    vdsync: Vdsync,
}

impl Lab {
    /// A repository whose version 0 is `initial` (built by the closure).
    fn new(initial: impl FnOnce(&Path)) -> Lab {
        let temp = tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let dev = dir.join("dev");
        std::fs::create_dir(&dev).unwrap();
        initial(&dev);
        let vdsync = vdsync();
        let repo = TestRepo::start(&vdsync, &dir, &dev);
        Lab {
            _temp: temp,
            dir,
            dev,
            repo,
            vdsync,
        }
    }

    fn push_args(&self, state: &str, message: &str) -> Vec<String> {
        vec![
            "push".into(),
            "--root".into(),
            self.dev.display().to_string(),
            "--repo".into(),
            self.repo.url.clone(),
            "--state".into(),
            self.dir.join(state).display().to_string(),
            "--rescan".into(),
            "-m".into(),
            message.into(),
        ]
    }

    /// Pushes the dev tree and returns the new version.
    fn push(&self, message: &str) -> u64 {
        let mut args = self.push_args("push-state", message);
        args.push("--json".into());
        let out = self.vdsync.ok(&args);
        let value: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        value["version"].as_u64().expect("a version number")
    }

    fn agent_args(&self, name: &str) -> Vec<String> {
        vec![
            "agent".into(),
            "--once".into(),
            "--root".into(),
            self.root_of(name).display().to_string(),
            "--repo".into(),
            self.repo.url.clone(),
            "--state".into(),
            self.dir.join(format!("{name}-state")).display().to_string(),
            "--name".into(),
            name.into(),
        ]
    }

    /// [`Lab::agent_args`] for an agent that keeps following the head.
    fn follower_args(&self, name: &str) -> Vec<String> {
        let mut args = self.agent_args(name);
        args.retain(|arg| arg != "--once");
        args
    }

    fn root_of(&self, name: &str) -> PathBuf {
        let root = self.dir.join(format!("{name}-root"));
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    /// Runs `agent --once` and returns its stdout and stderr.
    fn agent_once(&self, name: &str) -> (String, String) {
        let output = self.vdsync.output(self.agent_args(name));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "agent failed:\n{stdout}\n{stderr}");
        (stdout, stderr)
    }

    fn assert_agent_matches_dev(&self, name: &str) {
        assert_trees_equal(
            &describe_tree(&self.dev, &[]),
            &describe_tree(&self.root_of(name), &[]),
        );
    }
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::write(path, content).unwrap();
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|err| panic!("setxattr {name} on {}: {err}", path.display()));
}

/// `security.capability` granting cap_net_bind_service (bit 10), in the kernel's
/// version-2 layout: magic|effective, then permitted/inheritable words.
fn net_bind_capability() -> Vec<u8> {
    let mut value = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        value.extend_from_slice(&word.to_le_bytes());
    }
    value
}

/// Every kind of entry SPEC §3 names, with the metadata that is easy to lose.
fn build_every_kind(dev: &Path) {
    std::fs::create_dir_all(dev.join("etc/app")).unwrap();
    std::fs::create_dir_all(dev.join("empty/nested-empty")).unwrap();
    write(&dev.join("etc/app/app.conf"), "listen 80\n");
    write(&dev.join("name with spaces"), "spaces");
    write(&dev.join("new\nline"), "newline");
    write(
        &dev.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        "not utf-8",
    );

    let setuid = dev.join("usr-bin-tool");
    write(&setuid, "#!/bin/sh\necho tool\n");
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let setgid_dir = dev.join("shared");
    std::fs::create_dir(&setgid_dir).unwrap();
    std::fs::set_permissions(&setgid_dir, std::fs::Permissions::from_mode(0o2775)).unwrap();

    let owned = dev.join("owned-by-1234");
    write(&owned, "owned");
    std::os::unix::fs::lchown(&owned, Some(1234), Some(5678)).unwrap();

    let capable = dev.join("capable-binary");
    write(&capable, "pretend ELF");
    std::fs::set_permissions(&capable, std::fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(&capable, "security.capability", &net_bind_capability());
    set_xattr(&capable, "user.comment", b"binary \x00\xff value");

    let sparse = dev.join("sparse.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::File::create(&sparse).unwrap();
        file.seek(SeekFrom::Start(8 << 20)).unwrap();
        file.write_all(&[0xab; 65536]).unwrap();
        file.set_len(32 << 20).unwrap();
    }

    write(&dev.join("linked-a"), "shared inode");
    std::fs::hard_link(dev.join("linked-a"), dev.join("etc/linked-b")).unwrap();

    std::os::unix::fs::symlink("app/app.conf", dev.join("etc/relative-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/outside", dev.join("dangling-absolute")).unwrap();
    let link = dev.join("etc/relative-link");
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &link,
        &rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_000_000,
                tv_nsec: 5,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_000_000,
                tv_nsec: 5,
            },
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();

    let status = Command::new("mkfifo")
        .arg(dev.join("a-fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("mknod")
        .arg(dev.join("null-device"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success());
    // Old mtimes on directories too: the agent must set them after filling them.
    let status = Command::new("touch")
        .args(["-h", "-d", "2001-02-03 04:05:06.789"])
        .arg(dev.join("etc/app"))
        .arg(dev.join("empty"))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn every_entry_kind_keeps_its_metadata_through_init_and_push() {
    // Version 0 from `repo init`, applied by one agent ...
    let lab = Lab::new(build_every_kind);
    lab.agent_once("from-init");
    lab.assert_agent_matches_dev("from-init");
    let applied = lab.root_of("from-init");
    let sparse = std::fs::metadata(applied.join("sparse.img")).unwrap();
    assert_eq!(sparse.len(), 32 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file arrived with {} blocks allocated",
        sparse.blocks()
    );

    // ... and the same tree arriving as a push on top of an empty version 0.
    let lab = Lab::new(|_| {});
    lab.agent_once("pushed");
    build_every_kind(&lab.dev);
    assert_eq!(lab.push("every kind"), 1);
    lab.agent_once("pushed");
    lab.assert_agent_matches_dev("pushed");
}

#[test]
fn a_socket_is_reported_not_dropped_silently() {
    let lab = Lab::new(|dev| {
        write(&dev.join("regular"), "x");
    });
    let _listener = std::os::unix::net::UnixListener::bind(lab.dev.join("control.sock")).unwrap();
    lab.agent_once("web");
    lab.push("with a socket");
    lab.agent_once("web");
    assert!(lab.root_of("web").join("regular").exists());
    assert!(!lab.root_of("web").join("control.sock").exists());
    let fleet = lab.vdsync.ok(["fleet", "--repo", &lab.repo.url, "--json"]);
    let agents: serde_json::Value = serde_json::from_str(&fleet).unwrap();
    let warnings = agents[0]["last_outcome"]["warnings"].to_string();
    assert!(warnings.contains("control.sock is a socket"), "{warnings}");
}

#[test]
fn deletions_and_kind_changes_round_trip() {
    let lab = Lab::new(|dev| {
        std::fs::create_dir_all(dev.join("doomed/deep/deeper")).unwrap();
        write(&dev.join("doomed/deep/deeper/file"), "x");
        write(&dev.join("doomed/top"), "y");
        std::fs::create_dir_all(dev.join("becomes-file/sub")).unwrap();
        write(&dev.join("becomes-file/sub/inner"), "inner");
        write(&dev.join("becomes-dir"), "was a file");
        write(&dev.join("becomes-symlink"), "was a file");
    });
    lab.agent_once("web");
    lab.assert_agent_matches_dev("web");

    std::fs::remove_dir_all(lab.dev.join("doomed")).unwrap();
    std::fs::remove_dir_all(lab.dev.join("becomes-file")).unwrap();
    write(&lab.dev.join("becomes-file"), "now a file");
    std::fs::remove_file(lab.dev.join("becomes-dir")).unwrap();
    std::fs::create_dir_all(lab.dev.join("becomes-dir/child")).unwrap();
    write(&lab.dev.join("becomes-dir/child/leaf"), "leaf");
    std::fs::remove_file(lab.dev.join("becomes-symlink")).unwrap();
    std::os::unix::fs::symlink("becomes-file", lab.dev.join("becomes-symlink")).unwrap();
    assert_eq!(lab.push("kinds change"), 1);
    lab.agent_once("web");
    lab.assert_agent_matches_dev("web");

    // And back again.
    std::fs::remove_file(lab.dev.join("becomes-file")).unwrap();
    std::fs::create_dir_all(lab.dev.join("becomes-file/sub")).unwrap();
    write(&lab.dev.join("becomes-file/sub/inner"), "inner again");
    std::fs::remove_dir_all(lab.dev.join("becomes-dir")).unwrap();
    write(&lab.dev.join("becomes-dir"), "a file again");
    assert_eq!(lab.push("and back"), 2);
    lab.agent_once("web");
    lab.assert_agent_matches_dev("web");
}

/// Regression: placing an entry on a file system mounted inside the tree failed
/// with EXDEV after the commit point, and every restart failed the same way.
#[test]
fn a_file_system_mounted_inside_the_machines_tree_gets_its_entries() {
    let lab = Lab::new(|dev| {
        std::fs::create_dir_all(dev.join("var/lib/app")).unwrap();
        write(&dev.join("var/lib/app/data"), "v0");
        write(&dev.join("var/lib/app/kept"), "kept");
        write(&dev.join("var/doomed"), "removed later");
        write(&dev.join("top.conf"), "on the root's file system");
    });
    // On the machine, var/ is a file system of its own (a separate partition):
    // no rename reaches it from the agent's staging directory.
    let root = lab.root_of("web");
    let var = Mount::ext4_image(&lab.dir.join("var.img"), 16, &root.join("var"));
    std::fs::remove_dir(var.path.join("lost+found")).unwrap();
    lab.agent_once("web");
    lab.assert_agent_matches_dev("web");

    write(&lab.dev.join("var/lib/app/data"), "v1");
    std::fs::create_dir_all(lab.dev.join("var/new/deeper")).unwrap();
    write(&lab.dev.join("var/new/deeper/file"), "new");
    std::os::unix::fs::symlink("lib/app/data", lab.dev.join("var/link")).unwrap();
    std::fs::hard_link(
        lab.dev.join("var/lib/app/kept"),
        lab.dev.join("var/lib/app/kept-too"),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        lab.dev.join("var/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::fs::remove_file(lab.dev.join("var/doomed")).unwrap();
    write(&lab.dev.join("top.conf"), "changed too");
    assert_eq!(lab.push("into var"), 1);
    lab.agent_once("web");
    // Hard links too: kept-too is linked to kept on var's file system.
    lab.assert_agent_matches_dev("web");
    let placed = std::fs::metadata(root.join("var/lib/app/data")).unwrap();
    assert_eq!(
        placed.dev(),
        std::fs::metadata(&var.path).unwrap().dev(),
        "the file is on var's file system"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&var.path)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.as_bytes().starts_with(b".vdsync"))
        .collect();
    assert!(leftovers.is_empty(), "temporary names left: {leftovers:?}");
}

#[test]
fn nothing_to_push_says_so_and_exits_zero() {
    let lab = Lab::new(|dev| write(&dev.join("a"), "a"));
    let out = lab.vdsync.ok(lab.push_args("push-state", "noop"));
    assert_eq!(out.trim(), "nothing to push: the tree matches version 0");
    write(&lab.dev.join("b"), "b");
    let mut dry = lab.push_args("push-state", "dry");
    dry.push("--dry-run".into());
    let out = lab.vdsync.ok(&dry);
    assert!(out.contains("write   b (file, 1 B)"), "{out}");
    let log = lab.vdsync.ok(["log", "--repo", &lab.repo.url, "--json"]);
    let versions: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(
        versions.as_array().unwrap().len(),
        1,
        "a dry run committed something"
    );
}

#[test]
fn two_pushes_racing_on_the_same_parent_one_wins_one_is_refused() {
    let lab = Lab::new(|dev| write(&dev.join("base"), "base"));
    // Two development machines, both at version 0.
    let second_dev = lab.dir.join("dev2");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&lab.dev)
        .arg(&second_dev)
        .status()
        .unwrap();
    assert!(copied.success());
    let first = lab.push_args("state-1", "first");
    let mut second = lab.push_args("state-2", "second");
    second[2] = second_dev.display().to_string();
    // Neither has anything to push yet; this records version 0 in both states.
    assert!(lab.vdsync.ok(&first).contains("nothing to push"));
    assert!(lab.vdsync.ok(&second).contains("nothing to push"));

    write(&lab.dev.join("from-first"), "1");
    write(&second_dev.join("from-second"), "2");
    let racers: Vec<_> = [first, second]
        .into_iter()
        .map(|args| {
            let vdsync = lab.vdsync.clone();
            std::thread::spawn(move || vdsync.output(&args))
        })
        .collect();
    let outputs: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let winners = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "exactly one push may win: {outputs:?}");
    let loser = outputs.iter().find(|o| !o.status.success()).unwrap();
    assert_eq!(loser.status.code(), Some(1));
    let message = String::from_utf8_lossy(&loser.stderr);
    assert!(
        message.contains("stale parent") || message.contains("another push landed"),
        "{message}"
    );
    assert_eq!(
        message.trim().lines().count(),
        1,
        "one error line: {message}"
    );
    let log = lab.vdsync.ok(["log", "--repo", &lab.repo.url, "--json"]);
    let versions: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 2);
}

#[test]
fn an_agent_offline_for_five_versions_catches_up_in_order() {
    let lab = Lab::new(|dev| write(&dev.join("counter"), "0"));
    lab.agent_once("laggard");
    for n in 1..=5 {
        write(&lab.dev.join("counter"), n.to_string());
        write(&lab.dev.join(format!("added-in-{n}")), n.to_string());
        if n == 3 {
            std::fs::remove_file(lab.dev.join("added-in-1")).unwrap();
        }
        assert_eq!(lab.push(&format!("version {n}")), n);
    }
    let (stdout, stderr) = lab.agent_once("laggard");
    assert!(
        stdout.contains("applied 5 version(s); now at version 5"),
        "{stdout}"
    );
    let order: Vec<u64> = stderr
        .lines()
        .filter(|line| line.contains(" applied "))
        .filter_map(|line| {
            let after = line.split("version=").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert_eq!(order, [1, 2, 3, 4, 5], "{stderr}");
    lab.assert_agent_matches_dev("laggard");
    let fleet = lab.vdsync.ok(["fleet", "--repo", &lab.repo.url]);
    assert!(fleet.contains("laggard"), "{fleet}");
    assert!(fleet.contains("applied 5"), "{fleet}");
}

#[test]
fn a_long_running_agent_applies_a_push_without_polling_delay() {
    let lab = Lab::new(|dev| write(&dev.join("page.html"), "v0"));
    let root = lab.root_of("follower");
    let mut command = lab.vdsync.command(lab.follower_args("follower"));
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _agent = GroupChild::spawn(&mut command);
    wait_until(Duration::from_secs(30), "version 0 on the follower", || {
        std::fs::read_to_string(root.join("page.html")).is_ok_and(|c| c == "v0")
    });
    write(&lab.dev.join("page.html"), "v1");
    lab.push("v1");
    // The long-poll wakes the agent; this bound is generous, not a performance target.
    wait_until(Duration::from_secs(20), "version 1 on the follower", || {
        std::fs::read_to_string(root.join("page.html")).is_ok_and(|c| c == "v1")
    });
}

/// SIGTERM stops a following agent between versions with status 0, also when it
/// is PID 1 of a PID namespace of its own (as in a container), where SIGTERM has no
/// default action; a second agent on the same state directory is refused meanwhile.
#[test]
fn a_following_agent_stops_on_sigterm_even_as_pid_one() {
    let lab = Lab::new(|dev| write(&dev.join("page.html"), "v0"));
    for as_pid_one in [false, true] {
        // A machine of its own for each run: with the first run's root and name, the
        // second would find its hello already there and could start the duplicate
        // before the agent it duplicates.
        let name = if as_pid_one {
            "follower-pid-one"
        } else {
            "follower-plain"
        };
        let root = lab.root_of(name);
        let args = lab.follower_args(name);
        let mut command = if as_pid_one {
            lab.vdsync.command_in_own_pid_namespace(&args)
        } else {
            lab.vdsync.command(&args)
        };
        let log = lab.dir.join(format!("{name}.log"));
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut agent = GroupChild::spawn(&mut command);
        wait_until(Duration::from_secs(30), "the follower to say hello", || {
            std::fs::read_to_string(root.join("page.html")).is_ok_and(|c| c == "v0")
                && lab
                    .vdsync
                    .ok(["fleet", "--json", "--repo", &lab.repo.url])
                    .contains(&format!("\"{name}\""))
        });
        let second = lab.vdsync.output(&args);
        assert!(
            !second.status.success(),
            "a second agent ran beside the first, which said:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            String::from_utf8_lossy(&second.stderr).contains("another agent already uses"),
            "{}",
            String::from_utf8_lossy(&second.stderr)
        );

        // The agent's own pid: the child unshare forked, or the process itself.
        let pid = if as_pid_one {
            let children = format!("/proc/{0}/task/{0}/children", agent.pid());
            let listed = std::fs::read_to_string(&children).unwrap();
            listed
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<i32>()
                .unwrap()
        } else {
            agent.pid() as i32
        };
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let status = agent.wait_within(Duration::from_secs(30), "the agent to exit after SIGTERM");
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.success(),
            "as pid 1: {as_pid_one}: {:?}; it said {said}",
            status
        );
        assert!(said.contains("stopped between versions"), "{said}");
        // Who stopped it is in its log: this test, or (from the agent's own PID
        // namespace) a process outside it.
        let sender = if as_pid_one {
            "from=a process outside this PID namespace, uid 0".to_owned()
        } else {
            format!("from=pid {} (", std::process::id())
        };
        assert!(
            said.contains(&format!("signal received signal=\"SIGTERM\" {sender}")),
            "{said}"
        );
    }
}

#[test]
fn a_symlink_planted_on_the_machine_cannot_redirect_a_write_outside_the_root() {
    let lab = Lab::new(|dev| {
        std::fs::create_dir_all(dev.join("conf/sub")).unwrap();
        write(&dev.join("conf/sub/a"), "a");
    });
    lab.agent_once("victim");
    // Someone on the machine replaces conf with a symlink to a directory outside the
    // root that has the same shape, so a resolver that followed it would succeed.
    let outside = lab.dir.join("outside");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    let root = lab.root_of("victim");
    std::fs::remove_dir_all(root.join("conf")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("conf")).unwrap();

    write(&lab.dev.join("conf/sub/a"), "changed");
    lab.push("write below conf");
    let output = lab.vdsync.output(lab.agent_args("victim"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("conf/sub"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(outside.join("sub")).unwrap().count(),
        0,
        "wrote outside the root"
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let temp = tempdir().unwrap();
    let vdsync = vdsync();
    let data = temp.path().join("data");
    let output = vdsync.output([
        OsStr::new("repo"),
        OsStr::new("init"),
        OsStr::new("--data"),
        data.as_os_str(),
        OsStr::new("--from-dir"),
        temp.path().join("missing").as_os_str(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a directory"), "{stderr}");
    assert!(!data.exists(), "a failed init left {}", data.display());

    let output = vdsync.output(["log", "--repo", "not a url"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid repository url"));

    let output = vdsync.output(["push", "--bogus-flag"]);
    assert_eq!(output.status.code(), Some(2), "usage errors exit 2");
}

/// Counts regular files under a tree, for picking a kill moment.
/// Whether the agent's journal holds a version (after one, it is emptied, not removed).
fn journal_pending(journal: &Path) -> bool {
    std::fs::metadata(journal).is_ok_and(|meta| meta.len() > 0)
}

fn count_files(root: &Path) -> usize {
    describe_tree(root, &[])
        .values()
        .filter(|d| d.kind == "file")
        .count()
}

#[test]
fn kill_nine_in_the_middle_of_applying_then_restart_gives_the_whole_version() {
    let lab = Lab::new(|dev| {
        for dir in 0..20 {
            std::fs::create_dir_all(dev.join(format!("d{dir}"))).unwrap();
            for file in 0..50 {
                write(
                    &dev.join(format!("d{dir}/f{file}")),
                    format!("old {dir} {file}"),
                );
            }
        }
    });
    lab.agent_once("crashy");
    let version_0 = describe_tree(&lab.dev, &[]);

    // A large version: every file rewritten, a big file added, a directory removed.
    for dir in 0..20 {
        for file in 0..50 {
            write(
                &lab.dev.join(format!("d{dir}/f{file}")),
                format!("new {dir} {file} {}", "x".repeat(file * 10)),
            );
        }
    }
    std::fs::remove_dir_all(lab.dev.join("d7")).unwrap();
    let big: Vec<u8> = (0..(64u32 << 20) / 4)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    write(&lab.dev.join("big.bin"), &big);
    lab.push("large");
    let version_1 = describe_tree(&lab.dev, &[]);

    let state = lab.dir.join("crashy-state");
    let root = lab.root_of("crashy");
    // Kill at two instants: while staging (no journal yet), and once the journal
    // (the commit point) exists, i.e. during roll-forward.
    for kill_point in ["staging", "journal"] {
        let mut command = lab.vdsync.command(lab.agent_args("crashy"));
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut agent = GroupChild::spawn(&mut command);
        let journal = state.join("journal");
        let stage = state.join("stage");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let reached = match kill_point {
                "staging" => {
                    stage.exists()
                        && std::fs::read_dir(&stage)
                            .map(|d| d.count() > 100)
                            .unwrap_or(false)
                }
                _ => journal_pending(&journal),
            };
            if reached {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited ({status}) before the {kill_point} kill point");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached {kill_point}"
            );
            std::thread::yield_now();
        }
        agent.kill();
        let now = describe_tree(&root, &[]);
        if !journal_pending(&journal) {
            // Without a journal the tree must be exactly one version.
            assert!(
                now == version_0 || now == version_1,
                "torn tree after a kill while {kill_point}"
            );
        }
        if kill_point == "staging" {
            assert!(!journal_pending(&journal));
            assert_trees_equal(&version_0, &now);
        }
    }
    let (stdout, _) = lab.agent_once("crashy");
    assert!(stdout.contains("now at version 1"), "{stdout}");
    assert_trees_equal(&version_1, &describe_tree(&root, &[]));
    assert!(!journal_pending(&state.join("journal")));
    // Only the empty spare files the agent keeps ready for the next version.
    for item in std::fs::read_dir(state.join("stage")).unwrap() {
        let item = item.unwrap();
        let meta = item.metadata().unwrap();
        assert!(
            meta.is_file() && meta.len() == 0,
            "staging left behind: {:?}",
            item.file_name()
        );
    }
    assert_eq!(count_files(&root), 19 * 50 + 1);
}
