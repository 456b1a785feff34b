//! The process-handling fixtures themselves: vdsync-testd reports and reloads as
//! documented, and the nginx and redis fixtures come up, answer, and leave nothing
//! running behind them.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use vdsync_test_support::{
    free_loopback_port, nginx_config, pids_listening_on, process_children, process_is_running,
    read_testd_report, tempdir, testd_binary, wait_for_report, wait_until, GroupChild, Nginx,
    Redis, NGINX_CONF_RELATIVE, NGINX_WORKER_PROCESSES,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32).expect("a valid pid");
    kill_process(pid, signal).expect("kill");
}

/// Copies the built helper into `root`, as the process-handling tests do.
fn install_testd(root: &Path) -> PathBuf {
    let binary = root.join("usr/bin/vdsync-testd");
    std::fs::create_dir_all(binary.parent().expect("a parent")).expect("mkdir");
    vdsync_test_support::copy_executable(&testd_binary(), &binary);
    binary
}

/// Waits for a testd started with `spawn` to exit and returns its status.
fn wait_for_exit(testd: &mut GroupChild) -> std::process::ExitStatus {
    testd.wait_within(TIMEOUT, "vdsync-testd to exit")
}

#[test]
fn testd_reports_how_it_was_started_and_its_child() {
    let dir = tempdir().expect("tempdir");
    let binary = install_testd(dir.path());
    let config = dir.path().join("testd.conf");
    std::fs::write(&config, "version 1\n").expect("write config");
    let held = dir.path().join("held");
    std::fs::write(&held, "held").expect("write held");
    let mapped = dir.path().join("mapped");
    std::fs::write(&mapped, "mapped").expect("write mapped");
    let report_path = dir.path().join("report.json");
    let mut testd = GroupChild::spawn(
        Command::new(&binary)
            .arg("--report")
            .arg(&report_path)
            .arg("--config")
            .arg(&config)
            .arg("--hold")
            .arg(&held)
            .arg("--map")
            .arg(&mapped)
            .args(["--child", "--kill-child-on-exit"])
            .current_dir(dir.path())
            .env("TESTD_MARKER", "present"),
    );

    let report = wait_for_report(&report_path, TIMEOUT, "the report", |_| true);
    assert_eq!(report.pid, testd.pid());
    assert_eq!(report.ppid, std::process::id());
    assert_eq!(report.argv[0], binary.to_string_lossy());
    assert_eq!(
        report.env.get("TESTD_MARKER").map(String::as_str),
        Some("present")
    );
    assert_eq!(report.cwd, dir.path());
    assert_eq!(report.root, Path::new("/"));
    assert_eq!(report.exe, binary);
    assert_eq!(report.resuid, [0, 0, 0]);
    assert_eq!(report.hup, "reread");
    assert_eq!(report.config.as_deref(), Some("version 1\n"));
    assert_eq!(report.reloads, 0);
    let descriptors: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", report.pid))
        .expect("fd dir")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .collect();
    assert!(descriptors.contains(&held), "{descriptors:?}");
    assert!(!descriptors.contains(&mapped), "{descriptors:?}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", report.pid)).expect("maps");
    assert!(maps.contains(&*mapped.to_string_lossy()), "{maps}");

    let child_pid = report.child_pid.expect("a child");
    let child_report_path = dir.path().join("report.json.child");
    let child_report = wait_for_report(&child_report_path, TIMEOUT, "the child's report", |_| true);
    assert_eq!(child_report.pid, child_pid);
    assert_eq!(child_report.ppid, report.pid);
    assert_eq!(child_report.argv[0], report.argv[0]);
    assert_eq!(child_report.child_pid, None);
    assert_eq!(child_report.config, report.config);

    // --kill-child-on-exit: the parent takes its child down before exiting 0.
    signal(report.pid, Signal::TERM);
    assert_eq!(wait_for_exit(&mut testd).code(), Some(0));
    assert!(!process_is_running(child_pid));
}

#[test]
fn testd_rereads_a_config_replaced_by_rename_on_sighup() {
    let dir = tempdir().expect("tempdir");
    let binary = install_testd(dir.path());
    let config = dir.path().join("testd.conf");
    std::fs::write(&config, "version 1\n").expect("write config");
    let report_path = dir.path().join("report.json");
    let mut testd = GroupChild::spawn(
        Command::new(&binary)
            .arg("--report")
            .arg(&report_path)
            .arg("--config")
            .arg(&config),
    );
    let started = wait_for_report(&report_path, TIMEOUT, "the report", |_| true);

    let replacement = dir.path().join("testd.conf.new");
    std::fs::write(&replacement, "version 2\n").expect("write replacement");
    std::fs::rename(&replacement, &config).expect("rename");
    signal(started.pid, Signal::HUP);
    let reloaded = wait_for_report(&report_path, TIMEOUT, "a reload", |report| {
        report.reloads == 1
    });
    assert_eq!(reloaded.pid, started.pid);
    assert_eq!(reloaded.config.as_deref(), Some("version 2\n"));

    signal(started.pid, Signal::TERM);
    assert_eq!(wait_for_exit(&mut testd).code(), Some(0));
    // SIGTERM rewrites nothing.
    assert_eq!(read_testd_report(&report_path), Some(reloaded));
}

#[test]
fn testd_sighup_modes_ignore_noop_and_default() {
    let dir = tempdir().expect("tempdir");
    let binary = install_testd(dir.path());
    for (mode, survives) in [("ignore", true), ("noop", true), ("default", false)] {
        let report_path = dir.path().join(format!("report-{mode}.json"));
        let mut testd = GroupChild::spawn(
            Command::new(&binary)
                .arg("--report")
                .arg(&report_path)
                .args(["--hup", mode]),
        );
        let report = wait_for_report(&report_path, TIMEOUT, "the report", |_| true);
        assert_eq!(report.hup, mode);
        signal(report.pid, Signal::HUP);
        if survives {
            // Signals are handled in order, so an exit status of 0 from the SIGTERM
            // sent after SIGHUP shows that SIGHUP did not kill it.
            signal(report.pid, Signal::TERM);
            let status = wait_for_exit(&mut testd);
            assert_eq!(status.code(), Some(0), "--hup {mode}: {status}");
            assert_eq!(read_testd_report(&report_path), Some(report));
        } else {
            let status = wait_for_exit(&mut testd);
            assert_eq!(
                status.signal(),
                Some(Signal::HUP.as_raw()),
                "--hup {mode}: {status}"
            );
        }
    }
}

#[test]
fn testd_rejects_bad_arguments_with_one_line() {
    let output = Command::new(testd_binary())
        .args(["--hup", "reread"])
        .output()
        .expect("run vdsync-testd");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("vdsync-testd: --report is required\n"),
        "{stderr}"
    );
}

#[test]
fn nginx_serves_the_tree_with_workers_and_reloads_on_sighup() {
    let dir = tempdir().expect("tempdir");
    let port = free_loopback_port();
    let nginx = Nginx::start(dir.path(), port);

    let response = nginx.get("/").expect("GET /");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("X-Config-Version"), Some("1"));
    assert_eq!(response.body, b"hello from vdsync-test-support\n");
    let master = nginx.master_pid().expect("a master");
    let workers = nginx.worker_pids();
    assert_eq!(workers.len(), NGINX_WORKER_PROCESSES, "{workers:?}");
    assert_eq!(process_children(master), workers);

    // Reloading the configuration keeps the master and replaces the workers.
    std::fs::write(
        dir.path().join(NGINX_CONF_RELATIVE),
        nginx_config(port, "2"),
    )
    .expect("rewrite nginx.conf");
    signal(master, Signal::HUP);
    wait_until(TIMEOUT, "nginx to serve configuration 2", || {
        nginx.config_version().as_deref() == Some("2")
    });
    assert_eq!(nginx.master_pid(), Some(master));

    drop(nginx);
    assert!(!process_is_running(master));
    for worker in workers {
        assert!(!process_is_running(worker), "worker {worker} survived");
    }
    assert_eq!(pids_listening_on(port), Vec::<u32>::new());
}

#[test]
fn nginx_teardown_finds_a_master_started_by_someone_else() {
    let dir = tempdir().expect("tempdir");
    let port = free_loopback_port();
    let nginx = Nginx::start(dir.path(), port);
    let first_master = nginx.master_pid().expect("a master");

    // A restart as vdsync might do it: the old master goes, a new one is started
    // with the same command line by another process.
    vdsync_test_support::terminate_until_none_left("nginx", TIMEOUT, || {
        nginx.master_pid().into_iter().collect()
    })
    .expect("kill nginx");
    let mut restarted = Nginx::command(Path::new(vdsync_test_support::NGINX_BINARY), dir.path())
        .spawn()
        .expect("restart nginx");
    wait_until(TIMEOUT, "the restarted nginx to answer", || {
        nginx.master_pid().is_some_and(|pid| pid != first_master)
            && nginx.get("/").is_ok_and(|response| response.status == 200)
    });
    let second_master = nginx.master_pid().expect("a master");
    assert_eq!(second_master, restarted.id());

    drop(nginx);
    restarted.wait().expect("reap the restarted master");
    assert_eq!(pids_listening_on(port), Vec::<u32>::new());
}

#[test]
fn redis_runs_from_a_copy_and_answers_ping() {
    let dir = tempdir().expect("tempdir");
    let port = free_loopback_port();
    let binary = Redis::install_binary(dir.path());
    assert!(binary.ends_with("usr/bin/redis-server"));
    let redis = Redis::start(&binary, dir.path(), port);
    assert!(redis.ping());
    let servers = redis.server_pids();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(redis.listening_pid(), Some(servers[0]));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", servers[0])).expect("exe"),
        binary
    );

    drop(redis);
    assert!(!process_is_running(servers[0]));
    assert!(!vdsync_test_support::redis_ping(port));
}

#[test]
fn a_command_that_overruns_its_time_is_killed_and_named() {
    let started = std::time::Instant::now();
    let overrun = std::panic::catch_unwind(|| {
        vdsync_test_support::output_within(
            Command::new("sh").args(["-c", "echo started; exec sleep 600"]),
            Duration::from_millis(300),
        )
    })
    .expect_err("a 600 s sleep finished within 300 ms");
    let message = overrun
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        message.contains("was still running after 300ms"),
        "{message}"
    );
    assert!(message.contains("stdout: started"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the sleep was not killed"
    );

    let quick = vdsync_test_support::output_within(
        Command::new("sh").args(["-c", "echo done; exit 3"]),
        Duration::from_secs(60),
    );
    assert_eq!(quick.status.code(), Some(3));
    assert_eq!(quick.stdout, b"done\n");
}
