//! A 2 GiB file goes through push, repository and agent with bounded memory.
//!
//! In its own test binary: peak RSS of the push and agent processes is read by
//! GNU time (`/usr/bin/time -f %M`), and of the repository from its VmHWM, so other
//! tests' processes cannot blur the figure.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use vdsync_test_support::{tempdir, TestRepo, Vdsync};

/// Peak resident memory allowed for each process while moving 2 GiB.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;

/// Runs `vdsync args` under GNU time and returns its peak RSS in KiB.
fn run_measured(vdsync: &Vdsync, args: &[&str]) -> u64 {
    let report = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(report.path())
        .arg(&vdsync.binary)
        .args(args)
        .output()
        .expect("run /usr/bin/time (Debian package `time`)");
    assert!(
        output.status.success(),
        "vdsync {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(report.path())
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .parse()
        .unwrap()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes `size` bytes of cheap, poorly compressible data.
fn write_big_file(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buffer = vec![0u8; 1 << 20];
    for _ in 0..size / buffer.len() as u64 {
        for chunk in buffer.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&buffer).unwrap();
    }
    file.flush().unwrap();
}

fn same_content(a: &Path, b: &Path) -> bool {
    let status = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap();
    status.success()
}

#[test]
fn a_two_gib_file_streams_with_bounded_memory() {
    let temp = tempdir().unwrap();
    let dev = temp.path().join("dev");
    std::fs::create_dir(&dev).unwrap();
    let vdsync = Vdsync::new(env!("CARGO_BIN_EXE_vdsync"));
    let repo = TestRepo::start(&vdsync, temp.path(), &dev);
    let big = dev.join("disk.img");
    write_big_file(&big, 2 << 30);

    let push_state = temp.path().join("push-state");
    let agent_root = temp.path().join("agent");
    let agent_state = temp.path().join("agent-state");
    std::fs::create_dir(&agent_root).unwrap();
    let push_peak = run_measured(
        &vdsync,
        &[
            "push",
            "--rescan",
            "--root",
            dev.to_str().unwrap(),
            "--repo",
            &repo.url,
            "--state",
            push_state.to_str().unwrap(),
        ],
    );
    let agent_peak = run_measured(
        &vdsync,
        &[
            "agent",
            "--once",
            "--root",
            agent_root.to_str().unwrap(),
            "--repo",
            &repo.url,
            "--state",
            agent_state.to_str().unwrap(),
            "--name",
            "big",
        ],
    );
    let repo_peak = vm_hwm_kib(repo.server.pid());
    assert!(same_content(&big, &agent_root.join("disk.img")));
    eprintln!("peak RSS moving 2 GiB: push {push_peak} KiB, agent {agent_peak} KiB, repository {repo_peak} KiB");
    for (role, peak) in [
        ("push", push_peak),
        ("agent", agent_peak),
        ("repository", repo_peak),
    ] {
        assert!(
            peak < PEAK_RSS_LIMIT_KIB,
            "{role} peaked at {peak} KiB moving 2 GiB (limit {PEAK_RSS_LIMIT_KIB} KiB)"
        );
    }
}
