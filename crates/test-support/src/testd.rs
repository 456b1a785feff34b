//! The `vdsync-testd` helper daemon for process-handling tests: building it from
//! inside a running test, and reading the report it writes (see
//! `crates/testd/src/main.rs` for its command line and behaviour).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

use crate::wait_until;

/// Builds `vdsync-testd` (once per test process) and returns the path of the binary.
///
/// The build is a nested `cargo build` into the running test's own target directory
/// and profile, derived from the test binary's path (`<target>/<profile
/// dir>/deps/<test>`), so it reuses the dependencies already built there. Cargo does
/// not hold its build lock while tests run, so this does not deadlock under
/// `cargo test`. Builds with `--target <triple>` (a `<target>/<triple>/<profile>`
/// layout) are not supported. Panics, with cargo's output, if the build fails.
pub fn testd_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_testd) {
        Ok(path) => path.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn build_testd() -> Result<PathBuf, String> {
    let test_binary =
        std::env::current_exe().map_err(|err| format!("cannot find the test binary: {err}"))?;
    let deps_dir = test_binary
        .parent()
        .filter(|dir| dir.file_name().is_some_and(|name| name == "deps"))
        .ok_or_else(|| {
            format!(
                "the test binary {} is not in a cargo deps directory",
                test_binary.display()
            )
        })?;
    let profile_dir = deps_dir.parent().ok_or("deps has no parent")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("the profile dir has no parent")?;
    let profile_dir_name = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or("the profile dir has no name")?;
    // `cargo test` uses the `test` profile, which writes to `debug` like `dev`;
    // `cargo test --release` uses `bench`, which writes to `release` like `release`.
    // Any other directory is named after its custom profile.
    let profile = match profile_dir_name {
        "debug" => "dev",
        other => other,
    };
    // CARGO is set at run time by `cargo test`; the compile-time value covers a test
    // binary run by hand.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testd/Cargo.toml");
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--bin")
        .arg("vdsync-testd")
        .arg("--profile")
        .arg(profile)
        .arg("--target-dir")
        .arg(target_dir);
    let output = command
        .output()
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let binary = profile_dir.join("vdsync-testd");
    if !binary.is_file() {
        return Err(format!(
            "{command:?} succeeded but {} does not exist",
            binary.display()
        ));
    }
    Ok(binary)
}

/// What `vdsync-testd` reports about itself (its JSON report, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TestdReport {
    pub pid: u32,
    pub ppid: u32,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// `readlink /proc/self/root`.
    pub root: PathBuf,
    /// `readlink /proc/self/exe` at start.
    pub exe: PathBuf,
    /// Real, effective and saved user ids.
    pub resuid: [u32; 3],
    /// Real, effective and saved group ids.
    pub resgid: [u32; 3],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub umask: u32,
    /// Soft and hard RLIMIT_NOFILE; `u64::MAX` is unlimited.
    pub rlimit_nofile: [u64; 2],
    pub sid: i32,
    /// The SIGHUP mode in effect: reread, ignore, noop or default.
    pub hup: String,
    /// The configuration's content as last read.
    pub config: Option<String>,
    /// How many times SIGHUP made it re-read its configuration.
    pub reloads: u64,
    /// With `--child`; the child reports to `<report>.child`, possibly later than
    /// the parent reports.
    pub child_pid: Option<u32>,
}

/// Reads a report; `None` if there is none (yet). The daemon replaces its report by
/// rename, so a report that exists is complete: one that does not parse is a bug
/// and panics.
pub fn read_testd_report(path: &Path) -> Option<TestdReport> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => panic!("cannot read {}: {err}", path.display()),
    };
    match serde_json::from_slice(&bytes) {
        Ok(report) => Some(report),
        Err(err) => panic!(
            "{} is not a vdsync-testd report: {err}:\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        ),
    }
}

/// Waits until the report at `path` exists and satisfies `condition`, and returns
/// it; panics naming `what` after `timeout`.
pub fn wait_for_report(
    path: &Path,
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut(&TestdReport) -> bool,
) -> TestdReport {
    let mut satisfying = None;
    wait_until(timeout, what, || {
        satisfying = read_testd_report(path).filter(|report| condition(report));
        satisfying.is_some()
    });
    // wait_until returned, so the last read satisfied the condition.
    satisfying.unwrap_or_else(|| panic!("the report for {what} vanished"))
}
