//! `cargo xtask bench nginx-reload | redis-update`: process-aware apply under real
//! daemons (issue 5), each beside its peer from the same run.
//!
//! - **nginx-reload**: nginx (master + 2 workers) serves a page under `wrk` load while
//!   its configuration is pushed several times; the agent reloads it (SIGHUP, then
//!   checks the master re-read the file). Figure: failed requests (non-2xx and
//!   socket errors), target 0. Peer: the same load while the configuration is
//!   changed the old way — stop nginx, replace the file, start it again. The load
//!   uses one connection per request (see `start_wrk`).
//! - **redis-update**: a copy of redis-server runs from the agent's tree; a new
//!   build of the binary is pushed; the figure is the time from the repository
//!   acknowledging the version to redis answering PING from its new process (the
//!   agent picks the version up by long-poll, fetches, stops, places, starts).
//!   Printed beside the paper's 5.878 s for "transfer + stop MySQL, move files,
//!   start MySQL, restart Apache" by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vdsync_test_support::{free_loopback_port, redis_ping, Nginx, Redis};

use crate::harness::{
    build_release, find_on_path, initialize_repository, load_average, machine_summary, median,
    milliseconds, narrate, push_command, run_checked, scratch_directory, start_repository_server,
    wait_for_agents_at_version, BackgroundProcesses, Vdsync,
};

pub const NGINX_PUSHES: usize = 5;
pub const REDIS_REPETITIONS: usize = 5;

/// The paper's "ship only the changed files" route (scp + apply by hand), mean of 10.
const PAPER_SECONDS: f64 = 5.878;

/// A repository initialized from `dev`, one following agent on `machine`.
struct Fleet {
    vdsync: Vdsync,
    url: String,
    dev: PathBuf,
    machine: PathBuf,
    push_state: PathBuf,
    head: u64,
}

fn start_fleet(
    vdsync: Vdsync,
    scratch: &Path,
    processes: &mut BackgroundProcesses,
) -> Result<Fleet> {
    let dev = scratch.join("dev");
    let machine = scratch.join("machine");
    std::fs::create_dir_all(&machine)?;
    initialize_repository(&vdsync, &scratch.join("repository"), &dev)?;
    let url = start_repository_server(
        &vdsync,
        &scratch.join("repository"),
        &scratch.join("repository.log"),
        processes,
    )?;
    let mut agent = vdsync.command(["agent", "--name", "machine", "--repo", &url]);
    agent
        .arg("--root")
        .arg(&machine)
        .arg("--state")
        .arg(scratch.join("agent-state"));
    processes.spawn("the agent", &mut agent, &scratch.join("agent.log"))?;
    wait_for_agents_at_version(
        &vdsync,
        &url,
        &["machine"],
        0,
        Duration::from_secs(60),
        processes,
    )?;
    Ok(Fleet {
        vdsync,
        url,
        dev,
        machine,
        push_state: scratch.join("push-state"),
        head: 0,
    })
}

impl Fleet {
    /// Pushes the dev tree; returns when the repository has acknowledged it.
    fn push(&mut self, message: &str) -> Result<u64> {
        let mut command = push_command(
            &self.vdsync,
            &self.url,
            &self.dev,
            &self.push_state,
            message,
        );
        command.arg("--rescan");
        run_checked(&mut command)?;
        self.head += 1;
        Ok(self.head)
    }

    fn wait_applied(&self, processes: &mut BackgroundProcesses) -> Result<()> {
        wait_for_agents_at_version(
            &self.vdsync,
            &self.url,
            &["machine"],
            self.head,
            Duration::from_secs(60),
            processes,
        )
        .map(|_| ())
    }

    /// The process actions of the agent's last outcome, as `action pid` strings.
    fn last_actions(&self) -> Result<Vec<String>> {
        let output = run_checked(
            &mut self
                .vdsync
                .command(["fleet", "--json", "--repo", &self.url]),
        )?;
        let fleet: serde_json::Value = serde_json::from_str(&output)?;
        let actions = fleet[0]["last_outcome"]["processes"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|p| format!("{} {}", p["action"].as_str().unwrap_or("?"), p["pid"]))
                    .collect()
            })
            .unwrap_or_default();
        Ok(actions)
    }
}

/// What wrk said about one run.
struct Load {
    requests: u64,
    failed: u64,
    summary: String,
}

fn start_wrk(port: u16, duration: Duration, output: &Path) -> Result<std::process::Child> {
    let file = std::fs::File::create(output)?;
    Command::new("wrk")
        // One request per connection: with keep-alive, a reloading nginx closes idle
        // connections between requests, which wrk counts as read errors although
        // every HTTP client retries them; that is not a failed request.
        .args(["-t", "2", "-c", "32", "-H", "Connection: close", "-d"])
        .arg(format!("{}s", duration.as_secs()))
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot run wrk")
}

fn finish_wrk(mut child: std::process::Child, output: &Path) -> Result<Load> {
    let status = child.wait()?;
    let text = std::fs::read_to_string(output)?;
    if !status.success() {
        bail!("wrk failed ({status}):\n{text}");
    }
    let number_after = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(',').parse().ok())
            .unwrap_or(0)
    };
    let requests = text
        .lines()
        .find(|line| line.contains("requests in"))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("wrk printed no request count")?;
    let non_2xx = number_after("Non-2xx or 3xx responses:");
    let socket_errors: u64 = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok(Load {
        requests,
        failed: non_2xx + socket_errors,
        summary: format!(
            "{non_2xx} non-2xx; socket errors: {}",
            text.lines()
                .find_map(|line| line.trim().strip_prefix("Socket errors:"))
                .unwrap_or(" none")
                .trim()
        ),
    })
}

pub fn nginx_reload(pushes: usize) -> Result<()> {
    if find_on_path("wrk").is_none() || !Path::new("/usr/sbin/nginx").exists() {
        bail!("needs wrk and nginx: apt-get install -y wrk nginx-light");
    }
    let vdsync = build_release()?;
    let scratch = scratch_directory("bench-nginx-reload")?;
    let mut processes = BackgroundProcesses::default();
    let load_before = load_average();
    let port = free_loopback_port();
    Nginx::write_tree(&scratch.path().join("dev"), port, "0");
    let mut fleet = start_fleet(vdsync, scratch.path(), &mut processes)?;
    for dir in ["var/log/nginx", "run"] {
        std::fs::create_dir_all(fleet.machine.join(dir))?;
    }
    let nginx = Nginx::launch(Path::new("/usr/sbin/nginx"), &fleet.machine, port);
    let master = nginx.master_pid().context("nginx has no master")?;
    let pause = Duration::from_secs(1);
    let duration = pause * (pushes as u32 + 2);
    narrate(format_args!(
        "wrk -t2 -c32 -H 'Connection: close' for {}s against nginx (master {master}); {pushes} configuration pushes, {}s apart",
        duration.as_secs(),
        pause.as_secs()
    ));
    let wrk_output = scratch.path().join("wrk-vdsync.txt");
    let wrk = start_wrk(port, duration, &wrk_output)?;
    std::thread::sleep(pause);
    let mut apply_times = Vec::new();
    for push in 1..=pushes {
        Nginx::write_tree(&fleet.dev, port, &push.to_string());
        let started = Instant::now();
        fleet.push(&format!("nginx configuration {push}"))?;
        fleet.wait_applied(&mut processes)?;
        apply_times.push(started.elapsed());
        let actions = fleet.last_actions()?;
        if actions != [format!("reloaded {master}")] {
            bail!("push {push}: expected a verified reload of {master}, the agent did {actions:?}");
        }
        // The master has re-read the file; its new workers take over a moment later.
        crate::harness::wait_until(
            Duration::from_secs(10),
            "nginx to serve the new configuration",
            || Ok(nginx.config_version().as_deref() == Some(push.to_string().as_str())),
        )
        .with_context(|| format!("push {push}"))?;
        std::thread::sleep(pause.saturating_sub(started.elapsed()));
    }
    let with_vdsync = finish_wrk(wrk, &wrk_output)?;
    if nginx.master_pid() != Some(master) {
        bail!("the nginx master changed: it was restarted, not reloaded");
    }
    drop(nginx);

    narrate("peer: the same load while nginx is stopped, its configuration replaced and started again, by hand");
    let manual_port = free_loopback_port();
    let manual_root = scratch.path().join("manual");
    Nginx::write_tree(&manual_root, manual_port, "0");
    let mut manual = Nginx::launch(Path::new("/usr/sbin/nginx"), &manual_root, manual_port);
    let wrk_output = scratch.path().join("wrk-manual.txt");
    let wrk = start_wrk(manual_port, duration, &wrk_output)?;
    std::thread::sleep(pause);
    for push in 1..=pushes {
        let started = Instant::now();
        drop(manual);
        Nginx::write_tree(&manual_root, manual_port, &push.to_string());
        manual = Nginx::launch(Path::new("/usr/sbin/nginx"), &manual_root, manual_port);
        std::thread::sleep(pause.saturating_sub(started.elapsed()));
    }
    let by_hand = finish_wrk(wrk, &wrk_output)?;
    drop(manual);

    println!();
    println!(
        "nginx under load, {pushes} configuration changes ({})",
        machine_summary(&load_before)
    );
    println!(
        "  vdsync push + verified reload: {:>8} requests, {:>5} failed ({}); push to applied, median {}",
        with_vdsync.requests,
        with_vdsync.failed,
        with_vdsync.summary,
        milliseconds(median(&apply_times)?)
    );
    println!(
        "  stop, replace, start by hand:  {:>8} requests, {:>5} failed ({})",
        by_hand.requests, by_hand.failed, by_hand.summary
    );
    println!(
        "  target: 0 failed requests with vdsync: {}",
        if with_vdsync.failed == 0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

pub fn redis_update(repetitions: usize) -> Result<()> {
    if !Path::new("/usr/bin/redis-server").exists() {
        bail!("needs redis-server: apt-get install -y redis-server");
    }
    let vdsync = build_release()?;
    let scratch = scratch_directory("bench-redis-update")?;
    let mut processes = BackgroundProcesses::default();
    let load_before = load_average();
    let port = free_loopback_port();
    Redis::install_binary(&scratch.path().join("dev"));
    let mut fleet = start_fleet(vdsync, scratch.path(), &mut processes)?;
    Redis::write_config(&fleet.machine, port);
    let binary = fleet.machine.join("usr/bin/redis-server");
    let redis = Redis::launch(&binary, &fleet.machine, port);
    narrate(format_args!(
        "{repetitions} new builds of redis-server pushed; each timed from the repository's acknowledgement to PING answered by the new process"
    ));
    let mut times = Vec::new();
    for repetition in 1..=repetitions {
        let old = redis.listening_pid().context("redis is not listening")?;
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(fleet.dev.join("usr/bin/redis-server"))?;
            file.write_all(format!("\0build {repetition}").as_bytes())?;
        }
        fleet.push(&format!("redis-server build {repetition}"))?;
        let acknowledged = Instant::now();
        let deadline = acknowledged + Duration::from_secs(60);
        loop {
            let new = redis.listening_pid().filter(|pid| *pid != old);
            if new.is_some() && redis_ping(port) {
                break;
            }
            if Instant::now() > deadline {
                bail!("redis did not come back within 60 s:\n{}", redis.logs());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let elapsed = acknowledged.elapsed();
        fleet.wait_applied(&mut processes)?;
        let actions = fleet.last_actions()?;
        if actions != [format!("restarted {old}")] {
            bail!("build {repetition}: expected a restart of {old}, the agent did {actions:?}");
        }
        println!(
            "    run {repetition}/{repetitions}: {}",
            milliseconds(elapsed)
        );
        times.push(elapsed);
    }
    let figure = median(&times)?;
    println!();
    println!(
        "redis-server binary update ({})",
        machine_summary(&load_before)
    );
    println!(
        "  vdsync: version acknowledged -> redis answering PING again: median {} ({repetitions} runs)",
        milliseconds(figure)
    );
    println!(
        "  paper (EC2, scp + stop/replace/start by hand): {PAPER_SECONDS:.3} s  -> vdsync {:.0}x faster",
        PAPER_SECONDS / figure.as_secs_f64()
    );
    Ok(())
}
