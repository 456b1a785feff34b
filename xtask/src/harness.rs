//! Shared plumbing for the dev tasks: building the release binary, scratch directories,
//! background processes that cannot outlive the task, running one command and checking
//! its exit status, bounded waits, the vdsync steps several tasks share (a repository,
//! a tracker, a push, agents reaching a version), generated trees, and the small
//! formatting and statistics helpers of the benchmarks. The pieces the tests need too
//! (the binary, the repository on port 0, process-group children, waits, tree
//! comparison) come from `vdsync-test-support`; this module adds only what turns them
//! into one clear error.

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
    let binary_path = cargo_build_release(&["-p", "vdsync"], "vdsync")?;
    Ok(Vdsync::new(binary_path))
}

/// Builds the `fanotify_floor` example of vdsync-sys (a bare fanotify reader, the
/// peer of `tracker-overhead`) and returns its path.
pub fn build_fanotify_floor() -> Result<PathBuf> {
    cargo_build_release(
        &["-p", "vdsync-sys", "--example", "fanotify_floor"],
        "examples/fanotify_floor",
    )
}

/// `cargo build --release ARGS`, and the path of what it built, `built` below the
/// release directory.
fn cargo_build_release(args: &[&str], built: &str) -> Result<PathBuf> {
    // `cargo xtask` runs us through `cargo run`, which sets CARGO to the cargo that
    // is running; using it keeps the toolchain the same as the one building xtask.
    let cargo_program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let command_line = format!("cargo build --release {}", args.join(" "));
    narrate(format_args!("building: {command_line}"));
    let status = Command::new(&cargo_program)
        .args(["build", "--release"])
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", Path::new(&cargo_program).display()))?;
    if !status.success() {
        bail!("`{command_line}` failed ({status})");
    }
    // xtask itself is built with --release into the same target directory, so the
    // binary sits next to the running executable. This also honours CARGO_TARGET_DIR
    // and `build.target-dir` without having to parse cargo's configuration.
    let xtask_executable =
        std::env::current_exe().context("cannot find the running xtask executable")?;
    let release_directory = xtask_executable
        .parent()
        .context("the xtask executable has no parent directory")?;
    let binary_path = release_directory.join(built);
    if !binary_path.is_file() {
        bail!(
            "cargo built {built} but {} does not exist; run xtask through `cargo xtask`",
            binary_path.display()
        );
    }
    Ok(binary_path)
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

/// The median of a non-empty list of measurements (durations, byte counts).
pub fn median<T: Ord + Copy>(measurements: &[T]) -> Result<T> {
    let mut sorted = measurements.to_vec();
    sorted.sort();
    sorted
        .get(sorted.len() / 2)
        .copied()
        .context("no measurements to take the median of")
}

/// The median of one figure (`select`) of each of a non-empty list of runs.
pub fn median_by<R, T: Ord + Copy>(runs: &[R], select: impl Fn(&R) -> T) -> Result<T> {
    median(&runs.iter().map(select).collect::<Vec<_>>())
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
    /// keeps it until `stop_all` or drop. Returns its process id (to read its /proc
    /// entries; it stays valid until the process is reaped by `stop_all` or drop).
    pub fn spawn(&mut self, name: &str, command: &mut Command, log_path: &Path) -> Result<u32> {
        let log_file = File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_file_for_stdout = log_file
            .try_clone()
            .with_context(|| format!("cannot reopen {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file_for_stdout)
            .stderr(log_file);
        let child = GroupChild::spawn(command);
        let process_id = child.pid();
        self.running.push(BackgroundProcess {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
        });
        Ok(process_id)
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

/// Milliseconds with one decimal, for figures well under a second.
pub fn milliseconds(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Mebibytes with one decimal.
pub fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Reads a benchmark's options: nothing (then `default`) or `--repetitions N`.
pub fn parse_repetitions(options: &[String], default: usize, usage: &str) -> Result<usize> {
    match options {
        [] => Ok(default),
        [option, count] if option == "--repetitions" => count
            .parse::<usize>()
            .ok()
            .filter(|repetitions| *repetitions > 0)
            .with_context(|| format!("--repetitions takes a positive number, not {count:?}")),
        _ => bail!("usage: {usage}"),
    }
}

/// How many times faster vdsync was than its peer (below 1 when it was slower).
pub fn speedup(vdsync: Duration, peer: Duration) -> f64 {
    peer.as_secs_f64() / vdsync.as_secs_f64().max(f64::EPSILON)
}

/// "2.7x slower" or "2.0x faster": vdsync's time against its peer's, in words.
pub fn ratio_text(vdsync: Duration, peer: Duration) -> String {
    let vdsync_seconds = vdsync.as_secs_f64();
    let peer_seconds = peer.as_secs_f64();
    if vdsync_seconds >= peer_seconds {
        format!(
            "{:.1}x slower",
            vdsync_seconds / peer_seconds.max(f64::EPSILON)
        )
    } else {
        format!("{:.1}x faster", speedup(vdsync, peer))
    }
}

/// The 1-minute load average from /proc/loadavg, or "unknown". Other work on the
/// machine moves benchmark figures more than anything measured, so benchmarks print it
/// for whoever compares two runs.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The machine line every benchmark ends with.
pub fn machine_summary(load_before: &str) -> String {
    format!(
        "machine: {} CPUs, load average (1 min) {load_before} before, {} after",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    )
}

/// `DIR/`: rsync copies the contents of a source given with a trailing slash, not the
/// directory itself.
pub fn with_trailing_slash(directory: &Path) -> PathBuf {
    let mut text = directory.as_os_str().to_owned();
    text.push("/");
    PathBuf::from(text)
}

/// Fails, listing the differences, unless `copy` holds exactly what `source` holds;
/// a fast wrong copy is no result.
pub fn check_copy(source: &Path, copy: &Path, what: &str) -> Result<()> {
    let expected = vdsync_test_support::describe_tree(source, &[]);
    let copied = vdsync_test_support::describe_tree(copy, &[]);
    match vdsync_test_support::tree_differences(&expected, &copied) {
        None => Ok(()),
        Some(differences) => bail!("{what} does not match the source:\n{differences}"),
    }
}

/// xorshift64: a few instructions per 8 bytes, so generating a gibibyte takes well
/// under a second, and its output is incompressible, so neither side can win by
/// compressing or deduplicating what a real payload would not let it.
pub struct Xorshift64 {
    state: u64,
}

impl Xorshift64 {
    pub fn seeded(seed: u64) -> Xorshift64 {
        // Multiplying by an odd constant spreads small seeds (0, 1, 2...) over the state
        // and, with the `| 1`, keeps it non-zero (xorshift's one fixed point).
        Xorshift64 {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let random_bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&random_bytes[..chunk.len()]);
        }
    }
}

/// A generated tree of small files: `directories` directories `dir-NNN`, each holding
/// `files_per_directory` files `file-NNNN.dat` of `minimum_bytes..=maximum_bytes`
/// pseudo-random bytes (empty files when both are 0). The same seed gives the same tree.
pub struct SmallFileTree {
    pub directories: usize,
    pub files_per_directory: usize,
    pub minimum_bytes: usize,
    pub maximum_bytes: usize,
    pub seed: u64,
}

impl SmallFileTree {
    pub fn file_count(&self) -> usize {
        self.directories * self.files_per_directory
    }

    /// Where file `file_index` of directory `directory_index` lives under `root`.
    pub fn file_path(root: &Path, directory_index: usize, file_index: usize) -> PathBuf {
        root.join(format!("dir-{directory_index:03}"))
            .join(format!("file-{file_index:04}.dat"))
    }

    /// Writes the tree under `root` (created if missing) and returns a one-line
    /// description. `progress` gets the number of files written so far after every
    /// directory, for tasks that narrate a long generation.
    pub fn generate(&self, root: &Path, mut progress: impl FnMut(usize)) -> Result<String> {
        let mut random = Xorshift64::seeded(self.seed);
        let mut buffer = vec![0; self.maximum_bytes];
        let size_range = (self.maximum_bytes - self.minimum_bytes + 1) as u64;
        let mut total_bytes = 0u64;
        for directory_index in 0..self.directories {
            let directory = root.join(format!("dir-{directory_index:03}"));
            std::fs::create_dir_all(&directory)
                .with_context(|| format!("cannot create {}", directory.display()))?;
            for file_index in 0..self.files_per_directory {
                let size = self.minimum_bytes + (random.next_u64() % size_range) as usize;
                random.fill(&mut buffer[..size]);
                let path = directory.join(format!("file-{file_index:04}.dat"));
                std::fs::write(&path, &buffer[..size])
                    .with_context(|| format!("cannot write {}", path.display()))?;
                total_bytes += size as u64;
            }
            progress((directory_index + 1) * self.files_per_directory);
        }
        Ok(format!(
            "{} files in {} directories, {}",
            self.file_count(),
            self.directories,
            mebibytes(total_bytes)
        ))
    }
}

/// `vdsync repo init --data DATA --from-dir TREE`; returns what it printed.
pub fn initialize_repository(vdsync: &Vdsync, data: &Path, tree: &Path) -> Result<String> {
    run_checked(
        vdsync
            .command(["repo", "init", "--data"])
            .arg(data)
            .arg("--from-dir")
            .arg(tree),
    )
}

/// `vdsync push --json -m MESSAGE --repo URL --root ROOT --state STATE`, ready to run;
/// callers add `--rescan` when they want the whole tree compared.
pub fn push_command(
    vdsync: &Vdsync,
    repository_url: &str,
    root: &Path,
    state: &Path,
    message: &str,
) -> Command {
    let mut command = vdsync.command(["push", "--json", "-m", message, "--repo", repository_url]);
    command.arg("--root").arg(root).arg("--state").arg(state);
    command
}

/// The parts of `vdsync push --json`'s report the tasks look at.
pub struct PushReport {
    /// The version made, `None` when nothing was pending.
    pub version: Option<u64>,
    /// Whether the tracker's journal found the changes (rather than a full scan).
    pub from_journal: bool,
    /// How the changes were found, in words: "journal, 1 path(s)" or "full scan: WHY".
    pub source: String,
    /// Whether the tracker made the push (`vdsync push` handed it over).
    pub by_tracker: bool,
}

pub fn parse_push_report(output: &str) -> Result<PushReport> {
    let report = serde_json::from_str::<serde_json::Value>(output)
        .with_context(|| format!("cannot read `vdsync push --json` output {output:?}"))?;
    let source = report.get("source");
    let field = |name: &str| source.and_then(|source| source.get(name));
    let (from_journal, source) = match field("mode").and_then(serde_json::Value::as_str) {
        Some("journal") => (
            true,
            format!(
                "journal, {} path(s)",
                field("paths").map_or_else(|| "?".to_owned(), ToString::to_string)
            ),
        ),
        Some("full_scan") => (
            false,
            format!(
                "full scan: {}",
                field("reason")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("no reason given")
            ),
        ),
        _ => bail!("`vdsync push --json` printed no known source: {output:?}"),
    };
    Ok(PushReport {
        version: report.get("version").and_then(serde_json::Value::as_u64),
        from_journal,
        source,
        by_tracker: report.get("by_tracker") == Some(&serde_json::Value::Bool(true)),
    })
}

/// How long `vdsync track` gets to place its fanotify mark and say so.
const TRACKER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The journal's file name in the tracker's state directory. It mirrors
/// `vdsync_track::tracker::JOURNAL_NAME`: xtask depends on nothing of the product's,
/// and benchmarks watch this file to see when the tracker has caught up.
pub const TRACKER_JOURNAL_FILE: &str = "journal.redb";

/// A running `vdsync track`, registered in a [`BackgroundProcesses`].
pub struct Tracker {
    pub process_id: u32,
    /// Its first line: "tracking DIR (WATCHER); journal in STATE".
    pub ready_line: String,
    pub journal_path: PathBuf,
}

/// Starts `vdsync track --root ROOT --state STATE` in `processes` and waits until it
/// prints its first line, which it does once its mark is in place: every change from
/// then on is recorded.
pub fn start_tracker(
    vdsync: &Vdsync,
    root: &Path,
    state: &Path,
    log_path: &Path,
    processes: &mut BackgroundProcesses,
) -> Result<Tracker> {
    let mut command = vdsync.command(["track"]);
    command.arg("--root").arg(root).arg("--state").arg(state);
    let process_id = processes.spawn("the tracker", &mut command, log_path)?;
    let mut ready_line = None;
    let result = wait_until(TRACKER_START_TIMEOUT, "the tracker to start", || {
        processes.check_all_running()?;
        // Standard output and error share the log; the ready line is the only one
        // starting this way.
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        ready_line = log
            .lines()
            .find(|line| line.starts_with("tracking "))
            .map(str::to_owned);
        Ok(ready_line.is_some())
    });
    result.map_err(|error| error.context(format!("its log:\n{}", log_tail(log_path))))?;
    Ok(Tracker {
        process_id,
        ready_line: ready_line.unwrap_or_default(),
        journal_path: state.join(TRACKER_JOURNAL_FILE),
    })
}

/// Waits until `vdsync fleet --json` reports every agent in `agent_names` at `version`.
/// The fleet view, not the trees, decides: an agent reports only after the whole
/// version is in place. An agent that reports this version failed ends the wait.
pub fn wait_for_agents_at_version(
    vdsync: &Vdsync,
    repository_url: &str,
    agent_names: &[&str],
    version: u64,
    timeout: Duration,
    processes: &mut BackgroundProcesses,
) -> Result<Duration> {
    let what = format!("{} to report version {version}", agent_names.join(" and "));
    let result = wait_until(timeout, &what, || {
        processes.check_all_running()?;
        agents_are_at_version(vdsync, repository_url, agent_names, version)
    });
    // On a timeout the agents' own words are the quickest way to the cause.
    result
        .map_err(|error| error.context(format!("the logs so far:\n{}", processes.all_log_tails())))
}

fn agents_are_at_version(
    vdsync: &Vdsync,
    repository_url: &str,
    agent_names: &[&str],
    version: u64,
) -> Result<bool> {
    let output = run_checked(&mut vdsync.command(["fleet", "--json", "--repo", repository_url]))?;
    let fleet = serde_json::from_str::<serde_json::Value>(&output)
        .context("cannot read `vdsync fleet --json` output")?;
    let agents = fleet
        .as_array()
        .context("`vdsync fleet --json` did not print a list")?;
    for agent_name in agent_names {
        let Some(agent) = agents.iter().find(|agent| {
            agent.get("name").and_then(serde_json::Value::as_str) == Some(agent_name)
        }) else {
            // Not registered yet: the agent is still starting.
            return Ok(false);
        };
        let last_outcome = agent.get("last_outcome");
        let failed_version = last_outcome
            .filter(|outcome| {
                outcome.get("status").and_then(serde_json::Value::as_str) == Some("failed")
            })
            .and_then(|outcome| outcome.get("version"))
            .and_then(serde_json::Value::as_u64);
        if failed_version == Some(version) {
            // The agent would retry, but a task that fails once has already failed.
            let error = last_outcome
                .and_then(|outcome| outcome.get("error"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("no error message");
            bail!("{agent_name} failed to apply version {version}: {error}");
        }
        if agent.get("version").and_then(serde_json::Value::as_u64) != Some(version) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_picks_the_middle_of_unsorted_measurements() {
        let measurements = [3, 1, 2].map(Duration::from_secs);
        assert_eq!(median(&measurements).unwrap(), Duration::from_secs(2));
        assert!(median::<Duration>(&[]).is_err());
        assert_eq!(median(&[5_u64, 9, 7, 1]).unwrap(), 7);
        assert_eq!(
            median_by(&[(1, 'a'), (3, 'b'), (2, 'c')], |run| run.0).unwrap(),
            2
        );
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
    fn ratio_says_which_side_won() {
        assert_eq!(
            ratio_text(Duration::from_millis(2310), Duration::from_millis(850)),
            "2.7x slower"
        );
        assert_eq!(
            ratio_text(Duration::from_millis(500), Duration::from_millis(1000)),
            "2.0x faster"
        );
    }

    #[test]
    fn generated_data_does_not_repeat() {
        let mut random = Xorshift64::seeded(0);
        let mut buffer = [0; 64];
        random.fill(&mut buffer);
        assert!(buffer.chunks(8).any(|chunk| chunk != &buffer[..8]));
        assert_ne!(
            Xorshift64::seeded(0).next_u64(),
            Xorshift64::seeded(1).next_u64()
        );
    }

    #[test]
    fn repetitions_default_or_come_from_the_option() {
        let options = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_repetitions(&[], 3, "bench x").unwrap(), 3);
        assert_eq!(
            parse_repetitions(&options(&["--repetitions", "7"]), 3, "bench x").unwrap(),
            7
        );
        assert!(parse_repetitions(&options(&["--repetitions", "0"]), 3, "bench x").is_err());
        let error = parse_repetitions(&options(&["--fast"]), 3, "bench x").unwrap_err();
        assert_eq!(error.to_string(), "usage: bench x");
    }

    #[test]
    fn push_reports_say_where_the_changes_came_from() {
        let journal =
            parse_push_report(r#"{"version":4,"source":{"mode":"journal","paths":1}}"#).unwrap();
        assert_eq!(journal.version, Some(4));
        assert!(journal.from_journal);
        assert_eq!(journal.source, "journal, 1 path(s)");
        let scan = parse_push_report(
            r#"{"version":null,"source":{"mode":"full_scan","reason":"the tracker started"}}"#,
        )
        .unwrap();
        assert_eq!(scan.version, None);
        assert!(!scan.from_journal);
        assert_eq!(scan.source, "full scan: the tracker started");
        assert!(parse_push_report("not json").is_err());
    }

    #[test]
    fn small_file_trees_have_the_promised_shape() {
        let scratch = scratch_directory("unit-test-tree").unwrap();
        let tree = SmallFileTree {
            directories: 3,
            files_per_directory: 4,
            minimum_bytes: 10,
            maximum_bytes: 20,
            seed: 1,
        };
        let mut reported = Vec::new();
        let description = tree
            .generate(scratch.path(), |files| reported.push(files))
            .unwrap();
        assert_eq!(reported, [4, 8, 12]);
        assert!(
            description.starts_with("12 files in 3 directories"),
            "{description}"
        );
        let last = std::fs::read(SmallFileTree::file_path(scratch.path(), 2, 3)).unwrap();
        assert!((10..=20).contains(&last.len()));
    }

    #[test]
    fn background_processes_are_killed_on_drop() {
        let scratch = scratch_directory("unit-test-processes").unwrap();
        let mut processes = BackgroundProcesses::default();
        let process_id = processes
            .spawn(
                "sleeper",
                Command::new("sleep").arg("60"),
                &scratch.path().join("sleep.log"),
            )
            .unwrap();
        processes.check_all_running().unwrap();
        drop(processes);
        assert!(!Path::new(&format!("/proc/{process_id}")).exists());
    }
}
