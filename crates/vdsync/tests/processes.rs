//! Process-aware apply, end to end with real processes: the test daemon
//! (`vdsync-testd`, built by the suite), real nginx and real redis-server, a real
//! repository and a following agent with its open log (fanotify + cn_proc), as root.
//!
//! Every process a test starts runs from the agent's tree, started after the agent
//! so that its open log sees it. Each test pushes a change and then checks pids (new
//! for restarts, the same for reloads) and, for restarts, that argv, environment,
//! cwd, uids, gids, groups, umask, limits and root match the original.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vdsync_test_support::{
    all_pids, free_loopback_port, pids_with_cmdline_containing, read_testd_report, tempdir,
    terminate_until_none_left, testd_binary, wait_for_report, wait_until, GroupChild, Nginx, Redis,
    TestRepo, TestdReport, Vdsync,
};

const WAIT: Duration = Duration::from_secs(30);

/// Where the test daemon lives in every tree.
const TESTD: &str = "opt/app/bin/testd";

fn vdsync() -> Vdsync {
    Vdsync::new(env!("CARGO_BIN_EXE_vdsync"))
}

/// A development tree, a repository, one machine's tree with a following agent, and
/// teardown of every process started from the machine's tree.
struct Lab {
    _temp: tempfile::TempDir,
    dir: PathBuf,
    dev: PathBuf,
    machine: PathBuf,
    repo: TestRepo,
    vdsync: Vdsync,
    agent: Option<GroupChild>,
    pushes: u64,
}

impl Lab {
    /// Version 0 is the test daemon plus what `initial` adds to the dev tree.
    fn new(initial: impl FnOnce(&Path)) -> Lab {
        let temp = tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let dev = dir.join("dev");
        std::fs::create_dir_all(dev.join("opt/app/bin")).unwrap();
        std::fs::create_dir_all(dev.join("etc/app")).unwrap();
        std::fs::create_dir_all(dev.join("srv/work")).unwrap();
        std::fs::copy(testd_binary(), dev.join(TESTD)).unwrap();
        std::fs::set_permissions(dev.join(TESTD), std::fs::Permissions::from_mode(0o755)).unwrap();
        initial(&dev);
        let vdsync = vdsync();
        let repo = TestRepo::start(&vdsync, &dir, &dev);
        let machine = dir.join("machine");
        std::fs::create_dir(&machine).unwrap();
        Lab {
            _temp: temp,
            dir,
            dev,
            machine,
            repo,
            vdsync,
            agent: None,
            pushes: 0,
        }
    }

    fn agent_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--root",
            self.machine.to_str().unwrap(),
            "--repo",
            &self.repo.url,
            "--state",
            self.dir.join("agent-state").to_str().unwrap(),
            "--name",
            "machine",
            "--retry-after",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts the following agent and waits until the machine is at version 0.
    fn start_agent(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut command = self.vdsync.command(self.agent_args(extra));
        command.stdout(Stdio::null()).stderr(log);
        self.agent = Some(GroupChild::spawn(&mut command));
        self.wait_outcome(0);
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Pushes the dev tree; returns the version.
    fn push(&mut self) -> u64 {
        let out = self.vdsync.ok([
            "push",
            "--root",
            self.dev.to_str().unwrap(),
            "--repo",
            &self.repo.url,
            "--state",
            self.dir.join("push-state").to_str().unwrap(),
            "--rescan",
            "--json",
            "-m",
            "change",
        ]);
        self.pushes += 1;
        let value: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        value["version"].as_u64().unwrap()
    }

    /// Waits until the agent has reported `version` and returns the outcome (JSON).
    fn wait_outcome(&self, version: u64) -> serde_json::Value {
        let mut outcome = serde_json::Value::Null;
        let result = vdsync_test_support::try_wait_until(
            WAIT,
            &format!("the agent's outcome for version {version}"),
            || {
                let out = self
                    .vdsync
                    .ok(["fleet", "--repo", &self.repo.url, "--json"]);
                let agents: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
                let found = agents
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|agent| agent["name"] == "machine")
                    .map(|agent| agent["last_outcome"].clone())
                    .filter(|last| last["version"] == version);
                Ok::<bool, String>(match found {
                    Some(found) => {
                        outcome = found;
                        true
                    }
                    None => false,
                })
            },
        );
        if let Err(message) = result {
            panic!("{message}\nagent log:\n{}", self.agent_log());
        }
        assert_eq!(
            outcome["status"],
            "applied",
            "{outcome:#}\n{}",
            self.agent_log()
        );
        outcome
    }

    fn report_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("reports/{name}.json"))
    }

    /// Starts the machine's test daemon with `args`, its own environment, cwd
    /// `srv/work`, umask 027, a lowered RLIMIT_NOFILE and stdout/stderr to a log
    /// file, and returns its first report. `wrap` may put it under other credentials.
    fn start_testd(&self, name: &str, args: &[&str]) -> TestdReport {
        std::fs::create_dir_all(self.dir.join("reports")).unwrap();
        let report = self.report_path(name);
        let script = format!(
            "umask 027; ulimit -n 777; exec {} --report {} {}",
            self.machine.join(TESTD).display(),
            report.display(),
            args.join(" ")
        );
        let log = std::fs::File::create(self.dir.join(format!("reports/{name}.log"))).unwrap();
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("VDSYNC_TEST_NAME", name)
            .env("WEIRD_VALUE", "a b\tc=d")
            .current_dir(self.machine.join("srv/work"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        spawn_reaped(&mut command);
        wait_for_report(&report, WAIT, &format!("{name} to start"), |_| true)
    }

    fn outcome_processes(outcome: &serde_json::Value) -> Vec<(String, i64, Option<i64>)> {
        outcome["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["action"].as_str().unwrap().to_string(),
                    p["pid"].as_i64().unwrap(),
                    p["new_pid"].as_i64(),
                )
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The agent first, so that it does not restart anything being torn down.
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let needle = self.dir.to_string_lossy().into_owned();
        let _ = terminate_until_none_left("the test's processes", Duration::from_secs(5), || {
            pids_with_cmdline_containing(&needle)
        });
    }
}

/// Spawns `command` and reaps it in the background, so that a process the agent
/// stops does not linger as this test's zombie.
fn spawn_reaped(command: &mut Command) -> u32 {
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot spawn {command:?}: {err}"));
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    pid
}

/// Everything a restart must restore, compared field by field.
fn assert_restored(before: &TestdReport, after: &TestdReport) {
    assert_ne!(before.pid, after.pid, "a restart means a new process");
    assert_eq!(before.argv, after.argv, "argv");
    assert_eq!(before.env, after.env, "environment");
    assert_eq!(before.cwd, after.cwd, "working directory");
    assert_eq!(before.root, after.root, "root directory");
    assert_eq!(before.resuid, after.resuid, "uids");
    assert_eq!(before.resgid, after.resgid, "gids");
    assert_eq!(before.groups, after.groups, "supplementary groups");
    assert_eq!(before.umask, after.umask, "umask");
    assert_eq!(before.rlimit_nofile, after.rlimit_nofile, "RLIMIT_NOFILE");
    assert_eq!(after.sid, after.pid as i32, "detached in its own session");
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Appends bytes to an executable: a new file with the same behaviour.
fn touch_binary(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(b"\0vdsync-test-new-build").unwrap();
}

#[test]
fn a_config_read_before_is_reloaded_and_verified_with_the_same_pid() {
    let mut lab = Lab::new(|dev| write(&dev.join("etc/app/app.conf"), "one\n"));
    lab.start_agent(&[]);
    let conf = lab.machine.join("etc/app/app.conf");
    let before = lab.start_testd("rereads", &["--config", conf.to_str().unwrap()]);
    assert_eq!(before.config.as_deref(), Some("one\n"));

    write(&lab.dev.join("etc/app/app.conf"), "two\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    assert_eq!(
        Lab::outcome_processes(&outcome),
        [("reloaded".to_string(), before.pid as i64, None)],
        "{outcome:#}"
    );
    let after = wait_for_report(&lab.report_path("rereads"), WAIT, "the reload", |r| {
        r.reloads == 1
    });
    assert_eq!(after.pid, before.pid, "a reload keeps the process");
    assert_eq!(after.config.as_deref(), Some("two\n"));
    let detail = outcome["processes"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("re-opened the updated file"), "{detail}");
}

#[test]
fn a_process_ignoring_sighup_is_restarted_as_it_was() {
    let mut lab = Lab::new(|dev| write(&dev.join("etc/app/app.conf"), "one\n"));
    lab.start_agent(&[]);
    let conf = lab.machine.join("etc/app/app.conf");
    let before = lab.start_testd(
        "deaf",
        &["--config", conf.to_str().unwrap(), "--hup", "ignore"],
    );

    write(&lab.dev.join("etc/app/app.conf"), "two\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let processes = Lab::outcome_processes(&outcome);
    assert_eq!(processes.len(), 1, "{outcome:#}");
    assert_eq!(processes[0].0, "restarted");
    let reason = outcome["processes"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("etc/app/app.conf"), "{reason}");
    let after = wait_for_report(&lab.report_path("deaf"), WAIT, "the restart", |r| {
        r.pid != before.pid
    });
    assert_eq!(processes[0].2, Some(after.pid as i64));
    assert_restored(&before, &after);
    assert_eq!(
        after.config.as_deref(),
        Some("two\n"),
        "started on the new file"
    );
}

#[test]
fn a_reload_that_is_not_verified_becomes_a_restart() {
    let mut lab = Lab::new(|dev| write(&dev.join("etc/app/app.conf"), "one\n"));
    lab.start_agent(&["--reload-window", "1"]);
    let conf = lab.machine.join("etc/app/app.conf");
    let before = lab.start_testd(
        "noop",
        &["--config", conf.to_str().unwrap(), "--hup", "noop"],
    );

    write(&lab.dev.join("etc/app/app.conf"), "two\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let processes = Lab::outcome_processes(&outcome);
    assert_eq!(processes.len(), 1, "{outcome:#}");
    assert_eq!(processes[0].0, "restarted_after_reload", "{outcome:#}");
    let detail = outcome["processes"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("no updated file re-opened"), "{detail}");
    let after = wait_for_report(&lab.report_path("noop"), WAIT, "the restart", |r| {
        r.pid != before.pid
    });
    assert_restored(&before, &after);
}

#[test]
fn held_mapped_and_executed_files_restart_their_processes() {
    let mut lab = Lab::new(|dev| {
        write(&dev.join("srv/data/held.db"), "held 1\n");
        write(&dev.join("srv/data/mapped.bin"), "mapped 1\n");
        write(&dev.join("srv/data/untouched"), "same\n");
    });
    lab.start_agent(&[]);
    let data = lab.machine.join("srv/data");
    let holder = lab.start_testd(
        "holder",
        &["--hold", data.join("held.db").to_str().unwrap()],
    );
    let mapper = lab.start_testd(
        "mapper",
        &["--map", data.join("mapped.bin").to_str().unwrap()],
    );
    let bystander = lab.start_testd(
        "bystander",
        &["--hold", data.join("untouched").to_str().unwrap()],
    );

    write(&lab.dev.join("srv/data/held.db"), "held 2\n");
    write(&lab.dev.join("srv/data/mapped.bin"), "mapped 2\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let mut actions: Vec<(String, i64)> = Lab::outcome_processes(&outcome)
        .into_iter()
        .map(|(action, pid, _)| (action, pid))
        .collect();
    actions.sort_by_key(|(_, pid)| *pid);
    let mut expected = vec![
        ("restarted".to_string(), holder.pid as i64),
        ("restarted".to_string(), mapper.pid as i64),
    ];
    expected.sort_by_key(|(_, pid)| *pid);
    assert_eq!(actions, expected, "{outcome:#}");
    for (name, before) in [("holder", &holder), ("mapper", &mapper)] {
        let after = wait_for_report(&lab.report_path(name), WAIT, name, |r| r.pid != before.pid);
        assert_restored(before, &after);
    }
    assert_eq!(
        read_testd_report(&lab.report_path("bystander"))
            .unwrap()
            .pid,
        bystander.pid,
        "a process using no updated file is left alone"
    );
    assert!(vdsync_test_support::process_is_running(bystander.pid));

    // A new build of the executable itself.
    touch_binary(&lab.dev.join(TESTD));
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let restarted = Lab::outcome_processes(&outcome);
    assert_eq!(restarted.len(), 3, "every process runs it: {outcome:#}");
    assert!(restarted.iter().all(|(action, _, _)| action == "restarted"));
    let after = wait_for_report(&lab.report_path("bystander"), WAIT, "bystander", |r| {
        r.pid != bystander.pid
    });
    assert_restored(&bystander, &after);
    let exe_now = std::fs::metadata(lab.machine.join(TESTD)).unwrap();
    let running = std::fs::metadata(format!("/proc/{}/exe", after.pid)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (running.dev(), running.ino()),
        (exe_now.dev(), exe_now.ino()),
        "the restarted process runs the new executable"
    );
}

#[test]
fn a_child_its_parent_ends_is_not_started_twice() {
    let mut lab = Lab::new(|_| {});
    lab.start_agent(&[]);
    let parent = lab.start_testd("family", &["--child", "--kill-child-on-exit"]);
    let child_report = lab.report_path("family").with_extension("json.child");
    let child = wait_for_report(&child_report, WAIT, "the child to start", |_| true);
    assert_eq!(parent.child_pid, Some(child.pid));

    touch_binary(&lab.dev.join(TESTD));
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    // Sorted by action, not by pid: the child's pid is lower if pids wrapped.
    let mut actions: Vec<(String, u32)> = Lab::outcome_processes(&outcome)
        .into_iter()
        .map(|(action, pid, _)| (action, pid as u32))
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [
            ("ended_by_parent".to_owned(), child.pid),
            ("restarted".to_owned(), parent.pid)
        ],
        "{outcome:#}"
    );
    let new_parent = wait_for_report(&lab.report_path("family"), WAIT, "the new parent", |r| {
        r.pid != parent.pid
    });
    let new_child = wait_for_report(&child_report, WAIT, "the new child", |r| r.pid != child.pid);
    assert_eq!(new_parent.child_pid, Some(new_child.pid));
    assert_eq!(
        new_child.ppid, new_parent.pid,
        "the child is its parent's again"
    );
    // Exactly one family: the agent did not start the child a second time.
    let running: Vec<u32> =
        pids_with_cmdline_containing(&lab.machine.join(TESTD).to_string_lossy())
            .into_iter()
            .filter(|pid| vdsync_test_support::process_is_running(*pid))
            .collect();
    assert_eq!(running.len(), 2, "one parent and one child: {running:?}");
}

/// A root to chroot into, inside the machine's tree: the jail's own files come with
/// the versions; `/usr` is the host's, bind-mounted read-only, plus /proc.
struct Jail {
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Jail {
    fn mount(jail: &Path) -> Jail {
        let mut mounts = Vec::new();
        let run = |args: &[&str]| {
            let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(status.success(), "{args:?}");
        };
        let usr = jail.join("usr");
        run(&["mount", "--bind", "/usr", usr.to_str().unwrap()]);
        mounts.push(usr.clone());
        run(&["mount", "-o", "remount,bind,ro", usr.to_str().unwrap()]);
        let proc_dir = jail.join("proc");
        run(&["mount", "-t", "proc", "proc", proc_dir.to_str().unwrap()]);
        mounts.push(proc_dir);
        Jail {
            root: jail.to_path_buf(),
            mounts,
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Processes running in the jail: their command lines do not name the
        // lab's directory, so the lab's own clean-up does not find them.
        let _ = terminate_until_none_left("the jailed processes", Duration::from_secs(5), || {
            all_pids()
                .into_iter()
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/root"))
                        .is_ok_and(|root| root == self.root)
                })
                .collect()
        });
        for mount in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

#[test]
fn an_unprivileged_chrooted_process_is_restarted_with_its_identity() {
    let mut lab = Lab::new(|dev| {
        let jail = dev.join("srv/jail");
        for dir in ["usr", "proc", "work", "opt", "reports"] {
            std::fs::create_dir_all(jail.join(dir)).unwrap();
        }
        std::fs::set_permissions(jail.join("reports"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(target, jail.join(link)).unwrap();
        }
        std::fs::copy(testd_binary(), jail.join("opt/testd")).unwrap();
        write(&jail.join("work/app.conf"), "jailed 1\n");
    });
    lab.start_agent(&[]);
    let jail = lab.machine.join("srv/jail");
    let _mounts = Jail::mount(&jail);

    let inside = "umask 027; ulimit -n 777; cd /work && exec /opt/testd --report /reports/jailed.json --hold /work/app.conf";
    let log = std::fs::File::create(lab.dir.join("jailed.log")).unwrap();
    let mut command = Command::new("/usr/sbin/chroot");
    command
        .args([
            "--userspec=65534:65534",
            "--groups=100,4,65534",
            jail.to_str().unwrap(),
            "/bin/sh",
            "-c",
            inside,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("JAILED", "yes")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0);
    spawn_reaped(&mut command);
    let report = jail.join("reports/jailed.json");
    let before = wait_for_report(&report, WAIT, "the jailed daemon", |_| true);
    assert_eq!(before.resuid, [65534; 3]);
    assert_eq!(before.groups, [4, 100, 65534]);
    assert_eq!(before.cwd, Path::new("/work"));
    assert_eq!(
        before.root,
        Path::new("/"),
        "inside the jail, its root is /"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", before.pid)).unwrap(),
        jail,
        "seen from outside, its root is the jail"
    );

    write(&lab.dev.join("srv/jail/work/app.conf"), "jailed 2\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    assert_eq!(
        Lab::outcome_processes(&outcome)
            .iter()
            .map(|(action, pid, _)| (action.as_str(), *pid))
            .collect::<Vec<_>>(),
        [("restarted", before.pid as i64)],
        "{outcome:#}"
    );
    let after = wait_for_report(&report, WAIT, "the jailed restart", |r| r.pid != before.pid);
    assert_restored(&before, &after);
    assert_eq!(after.env.get("JAILED").map(String::as_str), Some("yes"));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", after.pid)).unwrap(),
        jail,
        "restarted in the same jail"
    );
}

#[test]
fn plan_prints_the_decisions_and_touches_nothing() {
    let mut lab = Lab::new(|dev| {
        write(&dev.join("srv/data/held.db"), "held 1\n");
        write(&dev.join("var/www/index.html"), "<p>1</p>\n");
    });
    lab.start_agent(&[]);
    let holder = lab.start_testd(
        "holder",
        &[
            "--hold",
            lab.machine.join("srv/data/held.db").to_str().unwrap(),
            "--hold",
            lab.machine.join("var/www/index.html").to_str().unwrap(),
        ],
    );
    // The agent stops following; the plan is made against version 0's tree.
    lab.agent.take().unwrap().kill();
    write(&lab.dev.join("srv/data/held.db"), "held 2\n");
    write(&lab.dev.join("var/www/index.html"), "<p>2</p>\n");
    let version = lab.push();
    let state = lab.dir.join("agent-state");
    let before_state: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let mut args = lab.agent_args(&["--once", "--plan"]);
    let out = lab.vdsync.ok(&args);
    assert!(out.contains(&format!("version {version}:")), "{out}");
    assert!(
        out.contains(&format!(
            "srv/data/held.db: auto\n    testd (pid {}): restart - it has it open",
            holder.pid
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "var/www/index.html: none (built-in)\n    testd (pid {}): none - a rule says none",
            holder.pid
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "restart, in this order: testd (pid {})",
            holder.pid
        )),
        "{out}"
    );

    args.push("--json".into());
    let json: serde_json::Value = serde_json::from_str(&lab.vdsync.ok(&args)).unwrap();
    assert_eq!(json[0]["version"], version);
    assert_eq!(json[0]["plan"]["restarts"][0]["key"]["pid"], holder.pid);

    // Nothing changed: the tree, the process, the agent's state.
    assert_eq!(
        std::fs::read_to_string(lab.machine.join("srv/data/held.db")).unwrap(),
        "held 1\n"
    );
    assert!(vdsync_test_support::process_is_running(holder.pid));
    let after_state: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before_state, after_state);
}

/// The agent is killed exactly between stopping processes and starting them: one
/// process stopped, the next one's SIGTERM a long interval away. Its next start
/// starts the stopped one again and then applies the version as usual.
#[test]
fn an_agent_killed_between_stop_and_start_finishes_the_job_on_restart() {
    let mut lab = Lab::new(|dev| {
        write(&dev.join("srv/data/a.db"), "a 1\n");
        write(&dev.join("srv/data/b.db"), "b 1\n");
    });
    lab.start_agent(&["--stop-interval", "600000"]);
    let data = lab.machine.join("srv/data");
    let first = lab.start_testd("first", &["--hold", data.join("a.db").to_str().unwrap()]);
    let second = lab.start_testd("second", &["--hold", data.join("b.db").to_str().unwrap()]);

    write(&lab.dev.join("srv/data/a.db"), "a 2\n");
    write(&lab.dev.join("srv/data/b.db"), "b 2\n");
    let version = lab.push();
    // Restarts go by pid among unrelated processes: the lower one is stopped at
    // once (the first started, unless pids wrapped in between), then the agent
    // waits ten minutes before the other.
    let running = |report: &TestdReport| vdsync_test_support::process_is_running(report.pid);
    wait_until(WAIT, "one of the two processes to be stopped", || {
        !running(&first) || !running(&second)
    });
    let pending = lab.dir.join("agent-state/processes.json");
    assert!(pending.exists(), "the plan is recorded before acting");
    lab.agent.take().unwrap().kill();
    assert!(
        running(&first) != running(&second),
        "both processes were stopped: the agent did not wait its stop interval"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("a.db")).unwrap(),
        "a 1\n",
        "the version was not placed yet"
    );

    lab.start_agent_at(version);
    let restarted_first = wait_for_report(&lab.report_path("first"), WAIT, "first", |r| {
        r.pid != first.pid
    });
    assert_restored(&first, &restarted_first);
    let restarted_second = wait_for_report(&lab.report_path("second"), WAIT, "second", |r| {
        r.pid != second.pid
    });
    assert_restored(&second, &restarted_second);
    assert_eq!(std::fs::read_to_string(data.join("a.db")).unwrap(), "a 2\n");
    assert_eq!(std::fs::read_to_string(data.join("b.db")).unwrap(), "b 2\n");
    assert!(!pending.exists(), "the record is gone once everything runs");
    // One process per report: nothing was started twice.
    for name in ["first", "second"] {
        let running = pids_with_cmdline_containing(&lab.report_path(name).to_string_lossy())
            .into_iter()
            .filter(|pid| vdsync_test_support::process_is_running(*pid))
            .count();
        assert_eq!(running, 1, "{name}");
    }
}

impl Lab {
    /// Starts the agent again (default timings) and waits for `version`'s outcome.
    fn start_agent_at(&mut self, version: u64) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut command = self.vdsync.command(self.agent_args(&[]));
        command.stdout(Stdio::null()).stderr(log);
        self.agent = Some(GroupChild::spawn(&mut command));
        self.wait_outcome(version);
    }
}

#[test]
fn nginx_config_push_ends_in_a_verified_reload_with_the_same_master() {
    let port = free_loopback_port();
    let mut lab = Lab::new(|dev| Nginx::write_tree(dev, port, "1"));
    lab.start_agent(&[]);
    // Logs and run/ are machine-local (default excludes): made on the machine.
    for dir in ["var/log/nginx", "run"] {
        std::fs::create_dir_all(lab.machine.join(dir)).unwrap();
    }
    let nginx = Nginx::launch(Path::new("/usr/sbin/nginx"), &lab.machine, port);
    let master = nginx.master_pid().unwrap();
    assert_eq!(nginx.config_version().as_deref(), Some("1"));

    Nginx::write_tree(&lab.dev, port, "2");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    assert_eq!(
        Lab::outcome_processes(&outcome)
            .iter()
            .map(|(action, pid, _)| (action.as_str(), *pid))
            .collect::<Vec<_>>(),
        [("reloaded", master as i64)],
        "{outcome:#}\n{}",
        lab.agent_log()
    );
    wait_until(WAIT, "nginx to serve the new configuration", || {
        nginx.config_version().as_deref() == Some("2")
    });
    assert_eq!(
        nginx.master_pid(),
        Some(master),
        "a reload keeps the master"
    );
}

#[test]
fn redis_binary_push_is_stopped_replaced_started_and_answers() {
    let port = free_loopback_port();
    let mut lab = Lab::new(|dev| {
        Redis::install_binary(dev);
    });
    lab.start_agent(&[]);
    Redis::write_config(&lab.machine, port);
    let binary = lab.machine.join("usr/bin/redis-server");
    let redis = Redis::launch(&binary, &lab.machine, port);
    let before = redis.listening_pid().unwrap();
    let cmdline_before = vdsync_test_support::process_cmdline(before).unwrap();

    touch_binary(&lab.dev.join("usr/bin/redis-server"));
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let processes = Lab::outcome_processes(&outcome);
    assert_eq!(
        processes
            .iter()
            .map(|(action, pid, _)| (action.as_str(), *pid))
            .collect::<Vec<_>>(),
        [("restarted", before as i64)],
        "{outcome:#}"
    );
    redis.wait_ping(WAIT);
    let after = redis.listening_pid().unwrap();
    assert_ne!(after, before);
    assert_eq!(processes[0].2, Some(after as i64));
    assert_eq!(
        vdsync_test_support::process_cmdline(after).unwrap(),
        cmdline_before
    );
}

#[test]
fn removing_a_file_a_daemon_read_sends_it_sighup() {
    let mut lab = Lab::new(|dev| write(&dev.join("etc/app/extra.conf"), "extra\n"));
    lab.start_agent(&[]);
    let conf = lab.machine.join("etc/app/extra.conf");
    let before = lab.start_testd("reader", &["--config", conf.to_str().unwrap()]);

    std::fs::remove_file(lab.dev.join("etc/app/extra.conf")).unwrap();
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    assert_eq!(
        Lab::outcome_processes(&outcome),
        [("reloaded".to_string(), before.pid as i64, None)],
        "{outcome:#}"
    );
    let detail = outcome["processes"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("not verified (the files it read were removed)"),
        "{detail}"
    );
    assert!(vdsync_test_support::process_is_running(before.pid));
    assert!(!conf.exists());
}

/// A process that ignores SIGTERM is killed after `--stop-timeout` and started
/// again with its own command line.
#[test]
fn a_process_ignoring_sigterm_is_killed_after_the_timeout() {
    let mut lab = Lab::new(|dev| write(&dev.join("srv/data/held.db"), "one\n"));
    lab.start_agent(&["--stop-timeout", "1"]);
    let held = lab.machine.join("srv/data/held.db");
    let marker = lab.dir.join("stubborn.pid");
    let script = format!(
        "import os, signal, time\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         held = open({held:?})\n\
         with open({marker:?} + '.tmp', 'w') as f: f.write(str(os.getpid()))\n\
         os.rename({marker:?} + '.tmp', {marker:?})\n\
         while True: time.sleep(60)\n",
        held = held.to_str().unwrap(),
        marker = marker.to_str().unwrap(),
    );
    let mut command = Command::new("/usr/bin/python3");
    command
        .args(["-c", &script])
        .current_dir(lab.machine.join("srv/work"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    spawn_reaped(&mut command);
    let read_pid = || -> Option<u32> { std::fs::read_to_string(&marker).ok()?.parse().ok() };
    wait_until(WAIT, "the stubborn process to start", || {
        read_pid().is_some()
    });
    let before = read_pid().unwrap();

    write(&lab.dev.join("srv/data/held.db"), "two\n");
    let version = lab.push();
    let outcome = lab.wait_outcome(version);
    let processes = Lab::outcome_processes(&outcome);
    assert_eq!(processes.len(), 1, "{outcome:#}");
    assert_eq!(processes[0].0, "restarted");
    assert_eq!(processes[0].1, before as i64);
    assert!(
        !vdsync_test_support::process_is_running(before),
        "SIGKILLed"
    );
    wait_until(WAIT, "the restarted process to write its pid", || {
        read_pid().is_some_and(|pid| pid != before)
    });
    let after = read_pid().unwrap();
    assert_eq!(processes[0].2, Some(after as i64));
    assert_eq!(
        vdsync_test_support::process_cmdline(after).unwrap(),
        vec![
            std::ffi::OsString::from("/usr/bin/python3"),
            "-c".into(),
            script.into()
        ]
    );
}
