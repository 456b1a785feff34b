//! Shared plumbing for the dev tasks: building the release binary, scratch directories,
//! background processes that cannot outlive the task, running one command and checking
//! its exit status, and bounded waits. The pieces the tests need too (the binary, the
//! repository on port 0, process-group children, waits, tree comparison) come from
//! `vdsync-test-support`; this module adds only what turns them into one clear error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vdsync_test_support::{GroupChild, TempBuilder, TempDir};

/// Prints one narration line, so every task tells the person watching what it does in
/// the same shape.
pub fn narrate(step: impl std::fmt::Display) {
    println!("==> {step}");
}

pub use vdsync_test_support::Vdsync;

/// Runs `cargo build --release -p vdsync` (output visible, since a slow build should
/// not look like a hang) and returns the binary it produced.
pub fn build_release() -> Result<Vdsync> {
    // `cargo xtask` runs us through `cargo run`, which sets CARGO to the cargo that
    // is running; using it keeps the toolchain the same as the one building xtask.
    let cargo_program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    narrate("building the release binary: cargo build --release -p vdsync");
    let status = Command::new(&cargo_program)
        .args(["build", "--release", "-p", "vdsync"])
        .status()
        .with_context(|| format!("cannot run {}", Path::new(&cargo_program).display()))?;
    if !status.success() {
        bail!("`cargo build --release -p vdsync` failed ({status})");
    }
    // xtask itself is built with --release into the same target directory, so the
    // binary sits next to the running executable. This also honours CARGO_TARGET_DIR
    // and `build.target-dir` without having to parse cargo's configuration.
    let xtask_executable =
        std::env::current_exe().context("cannot find the running xtask executable")?;
    let release_directory = xtask_executable
        .parent()
        .context("the xtask executable has no parent directory")?;
    let binary_path = release_directory.join("vdsync");
    if !binary_path.is_file() {
        bail!(
            "cargo built vdsync but {} does not exist; run xtask through `cargo xtask`",
            binary_path.display()
        );
    }
    Ok(Vdsync::new(binary_path))
}

/// Runs `command` to completion and returns its standard output; a non-zero exit becomes
/// an error naming the command and carrying its standard error.
pub fn run_checked(command: &mut Command) -> Result<String> {
    let description = describe_command(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{description}`"))?;
    if !output.status.success() {
        let standard_error = String::from_utf8_lossy(&output.stderr);
        bail!(
            "`{description}` failed ({}): {}",
            output.status,
            standard_error.trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{description}` printed output that is not UTF-8"))
}

/// The command as a person would type it, with the program shortened to its file name so
/// error messages stay on one readable line.
pub fn describe_command(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let mut words = vec![program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()];
    words.extend(
        command
            .get_args()
            .map(|argument| argument.to_string_lossy().into_owned()),
    );
    words.join(" ")
}

/// Flushes dirty pages to disk, so a timed run does not pay for writing back what an
/// earlier step (data generation, a previous run) left in the page cache.
pub fn sync_file_systems() -> Result<()> {
    run_checked(&mut Command::new("sync")).map(drop)
}

/// Finds an executable named `program_name` on PATH, as `which` would.
pub fn find_on_path(program_name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let search_path = std::env::var_os("PATH")?;
    std::env::split_paths(&search_path)
        .map(|directory| directory.join(program_name))
        .find(|candidate| {
            candidate.metadata().is_ok_and(|metadata| {
                metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
            })
        })
}

/// [`vdsync_test_support::try_wait_until`] with the task's error type.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    condition: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    vdsync_test_support::try_wait_until(timeout, what, condition).map_err(anyhow::Error::msg)
}

/// The median of a non-empty list of measurements.
pub fn median(measurements: &[Duration]) -> Result<Duration> {
    let mut sorted = measurements.to_vec();
    sorted.sort();
    sorted
        .get(sorted.len() / 2)
        .copied()
        .context("no measurements to take the median of")
}

/// A fresh directory under the system temporary directory whose name says which task
/// made it; removed with everything in it when dropped, including on failure.
pub fn scratch_directory(task_name: &str) -> Result<TempDir> {
    TempBuilder::new()
        .prefix(&format!("vdsync-xtask-{task_name}-"))
        .tempdir()
        .context("cannot create a scratch directory")
}

/// Every long-running child the task started. Dropping it kills and reaps them all, so
/// no server or agent survives the task, whether it succeeds, fails or panics.
///
/// The children stay in our process group on purpose: a Ctrl-C in the terminal then
/// reaches them too, which covers the one exit path where `Drop` does not run.
#[derive(Default)]
pub struct BackgroundProcesses {
    running: Vec<BackgroundProcess>,
}

struct BackgroundProcess {
    name: String,
    child: GroupChild,
    log_path: PathBuf,
}

impl BackgroundProcesses {
    /// Starts `command` with its standard output and error going to `log_path`, and
    /// keeps it until `stop_all` or drop.
    pub fn spawn(&mut self, name: &str, command: &mut Command, log_path: &Path) -> Result<()> {
        let log_file = File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_file_for_stdout = log_file
            .try_clone()
            .with_context(|| format!("cannot reopen {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file_for_stdout)
            .stderr(log_file);
        self.running.push(BackgroundProcess {
            name: name.to_owned(),
            child: GroupChild::spawn(command),
            log_path: log_path.to_owned(),
        });
        Ok(())
    }

    /// Fails, quoting the end of its log, if any child has already exited: a server or
    /// agent that died will never make a wait condition true.
    pub fn check_all_running(&mut self) -> Result<()> {
        for process in &mut self.running {
            let exit = process
                .child
                .child
                .try_wait()
                .with_context(|| format!("cannot check on {}", process.name))?;
            if let Some(status) = exit {
                bail!(
                    "{} exited unexpectedly ({status}); the end of its log:\n{}",
                    process.name,
                    log_tail(&process.log_path)
                );
            }
        }
        Ok(())
    }

    /// The end of every child's log, for error messages after a timeout.
    pub fn all_log_tails(&self) -> String {
        self.running
            .iter()
            .map(|process| {
                format!(
                    "--- {} ({})\n{}",
                    process.name,
                    process.log_path.display(),
                    log_tail(&process.log_path)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills and reaps every child with its process group, newest first (agents
    /// before the server they talk to). SIGKILL is safe: agents apply versions
    /// atomically, and the repository lives in a scratch directory deleted next.
    pub fn stop_all(&mut self) {
        while let Some(mut process) = self.running.pop() {
            process.child.kill();
        }
    }
}

impl Drop for BackgroundProcesses {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The last few lines of a log file, or a note saying why there are none.
pub fn log_tail(log_path: &Path) -> String {
    const TAIL_BYTES: u64 = 2048;
    let read_tail = || -> std::io::Result<String> {
        let mut file = File::open(log_path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        Ok(String::from_utf8_lossy(&tail).into_owned())
    };
    match read_tail() {
        Ok(tail) if tail.trim().is_empty() => "(log is empty)".to_owned(),
        Ok(tail) => tail.trim_end().to_owned(),
        Err(error) => format!("(cannot read {}: {error})", log_path.display()),
    }
}

/// Starts `vdsync repo serve` on a free port and returns its URL. The server is
/// registered in `processes`, so it dies with them.
pub fn start_repository_server(
    vdsync: &Vdsync,
    data_directory: &Path,
    log_path: &Path,
    processes: &mut BackgroundProcesses,
) -> Result<String> {
    let log_file =
        File::create(log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let (server, url) =
        vdsync_test_support::spawn_repository(vdsync, data_directory, log_file.into())
            .map_err(|message| anyhow::anyhow!("{message}; its log:\n{}", log_tail(log_path)))?;
    processes.running.push(BackgroundProcess {
        name: "the repository server".to_owned(),
        child: server,
        log_path: log_path.to_owned(),
    });
    Ok(url)
}

/// Human-friendly seconds with two decimals, as the tables print them.
pub fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_picks_the_middle_of_unsorted_measurements() {
        let measurements = [3, 1, 2].map(Duration::from_secs);
        assert_eq!(median(&measurements).unwrap(), Duration::from_secs(2));
        assert!(median(&[]).is_err());
    }

    #[test]
    fn wait_until_reports_what_it_waited_for() {
        let error = wait_until(Duration::from_millis(150), "the moon", || Ok(false)).unwrap_err();
        assert!(
            error.to_string().contains("waiting for the moon"),
            "{error}"
        );
        let mut polls = 0;
        wait_until(Duration::from_secs(5), "three polls", || {
            polls += 1;
            Ok(polls == 3)
        })
        .unwrap();
    }

    #[test]
    fn background_processes_are_killed_on_drop() {
        let scratch = scratch_directory("unit-test-processes").unwrap();
        let mut processes = BackgroundProcesses::default();
        processes
            .spawn(
                "sleeper",
                Command::new("sleep").arg("60"),
                &scratch.path().join("sleep.log"),
            )
            .unwrap();
        let process_id = processes.running[0].child.pid();
        processes.check_all_running().unwrap();
        drop(processes);
        assert!(!Path::new(&format!("/proc/{process_id}")).exists());
    }
}
