//! Shared plumbing for the dev tasks: building the release binary, scratch directories
//! that remove themselves, background processes that cannot outlive the task, the
//! repository server on port 0, running one command and checking its exit status, and
//! bounded waits.
//!
//! This is not a test framework and it knows nothing about vdsync's internals: it drives
//! the real binary as an operator would and reports failures as one clear error.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// How often bounded waits look at their condition again. Short enough that a demo feels
/// immediate, long enough that polling `vdsync fleet` does not load two cores.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long the repository server gets to print its address before we give up on it.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Prints one narration line, so every task tells the person watching what it does in
/// the same shape.
pub fn narrate(step: impl std::fmt::Display) {
    println!("==> {step}");
}

/// The `vdsync` release binary that the tasks drive.
pub struct Vdsync {
    binary_path: PathBuf,
}

impl Vdsync {
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
        Ok(Vdsync { binary_path })
    }

    /// A command running the binary with `arguments`; callers add paths with `.arg()`.
    pub fn command<I, S>(&self, arguments: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(&self.binary_path);
        command.args(arguments);
        // Logging settings from the caller's shell would change what the tasks print.
        command.env_remove("VDSYNC_LOG").env_remove("VDSYNC_REPO");
        command
    }
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

/// Polls `condition` every 100 ms until it returns true, failing with a message that
/// names `what` once `timeout` has passed. An error from the condition ends the wait at
/// once: there is no point waiting for agents that have died.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if condition().with_context(|| format!("while waiting for {what}"))? {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
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

/// A directory under the system temporary directory, removed with everything in it when
/// dropped, including when the task fails half-way.
pub struct ScratchDirectory {
    path: PathBuf,
}

impl ScratchDirectory {
    /// Creates a fresh, empty directory whose name says which task made it.
    pub fn create(task_name: &str) -> Result<ScratchDirectory> {
        let nanoseconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since_epoch| since_epoch.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "vdsync-xtask-{task_name}-{}-{nanoseconds}",
            std::process::id()
        ));
        // create_dir, not create_dir_all: failing on an existing directory guarantees we
        // never delete something that was not ours at the end.
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create scratch directory {}", path.display()))?;
        Ok(ScratchDirectory { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {error}", self.path.display());
        }
    }
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
    child: Child,
    log_path: PathBuf,
}

impl BackgroundProcesses {
    /// Starts `command` with its standard output and error going to `log_path`, and
    /// keeps it until `stop_all` or drop.
    pub fn spawn(
        &mut self,
        name: &str,
        command: &mut Command,
        log_path: &Path,
    ) -> Result<&mut Child> {
        let log_file = File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_file_for_stdout = log_file
            .try_clone()
            .with_context(|| format!("cannot reopen {}", log_path.display()))?;
        let description = describe_command(command);
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file_for_stdout)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {name}: `{description}`"))?;
        self.running.push(BackgroundProcess {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
        });
        self.running
            .last_mut()
            .map(|process| &mut process.child)
            .context("the process just started is missing from the list")
    }

    /// Fails, quoting the end of its log, if any child has already exited: a server or
    /// agent that died will never make a wait condition true.
    pub fn check_all_running(&mut self) -> Result<()> {
        for process in &mut self.running {
            let exit = process
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

    /// Kills and reaps every child, newest first (agents before the server they talk to).
    pub fn stop_all(&mut self) {
        while let Some(mut process) = self.running.pop() {
            // SIGKILL is safe here: agents apply versions atomically, and the repository
            // lives in a scratch directory that is deleted next.
            if let Err(error) = process.child.kill() {
                // InvalidInput means it has already exited, which is what we want.
                if error.kind() != std::io::ErrorKind::InvalidInput {
                    eprintln!("warning: cannot kill {}: {error}", process.name);
                }
            }
            if let Err(error) = process.child.wait() {
                eprintln!("warning: cannot reap {}: {error}", process.name);
            }
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

/// Starts `vdsync repo serve` on a free port and returns its URL, read from the first
/// line it prints. The server is registered in `processes`, so it dies with them.
pub fn start_repository_server(
    vdsync: &Vdsync,
    data_directory: &Path,
    log_path: &Path,
    processes: &mut BackgroundProcesses,
) -> Result<String> {
    const ANNOUNCEMENT: &str = "vdsync repository listening on ";
    let log_file =
        File::create(log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut command = vdsync.command(["repo", "serve", "--listen", "127.0.0.1:0", "--data"]);
    command
        .arg(data_directory)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let description = describe_command(&command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start the repository: `{description}`"))?;
    let standard_output = child.stdout.take();
    processes.running.push(BackgroundProcess {
        name: "the repository server".to_owned(),
        child,
        log_path: log_path.to_owned(),
    });
    let standard_output =
        standard_output.context("the repository server's stdout was not captured")?;

    // Read on a thread because std offers no read with a timeout; the thread keeps
    // draining afterwards so the server can never block on a full pipe.
    let (first_line_sender, first_line_receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(standard_output);
        let mut first_line = String::new();
        let read_result = reader.read_line(&mut first_line).map(|_| first_line);
        let _ = first_line_sender.send(read_result);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let first_line = match first_line_receiver.recv_timeout(SERVER_START_TIMEOUT) {
        Ok(Ok(line)) => line,
        Ok(Err(error)) => bail!("cannot read the repository server's output: {error}"),
        Err(_) => bail!(
            "the repository server printed nothing within {} s; its log:\n{}",
            SERVER_START_TIMEOUT.as_secs(),
            log_tail(log_path)
        ),
    };
    match first_line.trim_end().strip_prefix(ANNOUNCEMENT) {
        Some(url) if url.starts_with("http://") => Ok(url.to_owned()),
        // An empty first line means the server exited before announcing itself.
        _ => bail!(
            "the repository server did not announce its address (first line {:?}); its log:\n{}",
            first_line.trim_end(),
            log_tail(log_path)
        ),
    }
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
    fn scratch_directory_is_removed_on_drop() {
        let scratch = ScratchDirectory::create("unit-test").unwrap();
        let path = scratch.path().to_owned();
        std::fs::write(path.join("file"), b"x").unwrap();
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn background_processes_are_killed_on_drop() {
        let scratch = ScratchDirectory::create("unit-test-processes").unwrap();
        let mut processes = BackgroundProcesses::default();
        let child = processes
            .spawn(
                "sleeper",
                Command::new("sleep").arg("60"),
                &scratch.path().join("sleep.log"),
            )
            .unwrap();
        let process_id = child.id();
        processes.check_all_running().unwrap();
        drop(processes);
        assert!(!Path::new(&format!("/proc/{process_id}")).exists());
    }
}
