//! The change tracker's benchmarks (issue 4), each one command printing its figure and
//! its peer's figure from the same run, on the same file system:
//!
//! - `one-change`: 100,000 files, one of them changed; from starting `vdsync push` (the
//!   tracker running, so the push reads only the journalled path) until a long-running
//!   agent's root shows the new content and the push has exited (it writes its index
//!   after the commit; whichever comes last counts), against an incremental `rsync -a`
//!   of the same change to a copy that already holds the previous tree. Target: 100x
//!   faster. The agent runs in a PID namespace of its own (`unshare --pid`), standing in
//!   for the machine of its own it has in a fleet: otherwise the benchmark's own
//!   processes (the push, `sync`, `rsync`, started afresh each run) would be among the
//!   processes it reads from /proc for every version.
//! - `tracker-overhead`: `tar -xf` of a 50,000-file archive into a fresh ext4 file
//!   system (a loop-mounted image made for each run), with nothing watching, with
//!   `vdsync track` watching, and with three peers that show the kernel's part, all
//!   `fanotify_floor` (an example of vdsync-sys) on the tracker's kind of mark: with
//!   `--ignore-all`, every event in the kernel's ignore mask, so none is made (what
//!   the mark costs each change: the least any fanotify tracker of a whole file
//!   system costs); with `--with-contents` as well, the mark also asking for the
//!   events about contents and attributes (what one mark hearing everything costs:
//!   the tracker asks for those per directory of its tree instead, and asks for
//!   them once, with a `vdsync status`, before each timed run); and without either,
//!   every one of the tracker's events made, queued in
//!   the writer's own time, read at the tracker's pace and dropped (what a tracker
//!   hearing every event costs; `vdsync track` has the kernel ignore the entries of
//!   new directories, so it hears fewer). Target: at most 5% slower.
//! - `tracker-memory`: the tracker's peak and resident memory (VmHWM, VmRSS) once
//!   1,000,000 new names (hard links, see `create_names`) are in its journal, before
//!   and after `vdsync status` asks for the journal. Target: 64 MiB.
//!
//! What these do not measure: durability on the rsync side (vdsync syncs every version
//! before the agent reports it, rsync leaves its copy in the page cache; `bench spine`
//! shows what a `sync` adds), and cold caches (each timed run starts after `sync`, with
//! the page and inode caches as the previous steps left them; dropping them would slow
//! every other user of this shared machine). The tracker watches the whole file system,
//! so on a shared machine it also reads, and drops, the events of everyone else's work.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use vdsync_test_support::{GroupChild, Mount};

use crate::harness::{
    build_fanotify_floor, build_release, check_copy, describe_command, find_on_path,
    initialize_repository, load_average, log_tail, machine_summary, mebibytes, median_by,
    milliseconds, narrate, parse_push_report, push_command, ratio_text, run_checked,
    scratch_directory, seconds, speedup, start_repository_server, start_tracker, sync_file_systems,
    wait_for_agents_at_version, wait_until, with_trailing_slash, BackgroundProcesses, PushReport,
    SmallFileTree, Tracker, Vdsync, Xorshift64,
};

/// Per-run figures of a few hundred milliseconds on a noisy disk: five runs give a
/// median one slow run cannot move, and cost seconds.
pub const ONE_CHANGE_REPETITIONS: usize = 5;
/// Three rounds of five runs: on this machine one `tar -xf` of 50,000 files into a
/// fresh file system takes 1.2-2 s. Run-to-run noise is larger than the 5% asked for;
/// `--repetitions 7` or more gives a steadier median when there is time.
pub const TRACKER_OVERHEAD_REPETITIONS: usize = 3;
/// Memory hardly varies between runs, while one run creates and deletes a million
/// names, so one run by default.
pub const TRACKER_MEMORY_REPETITIONS: usize = 1;

/// 100,000 files of 100-400 bytes, 100 per directory: a source tree's shape.
const ONE_CHANGE_TREE: SmallFileTree = SmallFileTree {
    directories: 1_000,
    files_per_directory: 100,
    minimum_bytes: 100,
    maximum_bytes: 400,
    seed: 4,
};
/// (directory, file) of the file every repetition rewrites, in the middle of the tree.
const CHANGED_FILE: (usize, usize) = (500, 50);
/// The longest wait for an event (the agent renaming a file into the changed file's
/// directory, the push exiting) before the other processes are checked on.
const APPLY_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// A push plus apply of one file that takes longer than this has hung.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's first version holds the whole tree: 100,000 files written and synced.
const INITIAL_APPLY_TIMEOUT: Duration = Duration::from_secs(600);
const ONE_CHANGE_TARGET_SPEEDUP: f64 = 100.0;
/// The name the benchmark's agent reports under.
const AGENT_NAME: &str = "bench";

/// 50,000 files of 100 bytes to 4 KB in 500 directories, archived once.
const ARCHIVE_TREE: SmallFileTree = SmallFileTree {
    directories: 500,
    files_per_directory: 100,
    minimum_bytes: 100,
    maximum_bytes: 4_000,
    seed: 50,
};
const TRACKER_OVERHEAD_TARGET_PERCENT: f64 = 5.0;
/// `fanotify_floor` prints `ready` as soon as its mark is in place.
const FLOOR_START_TIMEOUT: Duration = Duration::from_secs(30);
/// A tracker that is asked to stop finishes its current batch first.
const TRACKER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The file system each extraction gets: the tree takes about 250 MiB there.
const UNTAR_FILE_SYSTEM_MEGABYTES: u32 = 1024;

/// 1,000 directories of 1,000 names: a million journalled paths.
const MEMORY_DIRECTORIES: usize = 1_000;
const MEMORY_NAMES_PER_DIRECTORY: usize = 1_000;
const MEMORY_TARGET_BYTES: u64 = 64 << 20;
/// The tracker writes a batch every 100 ms while events arrive; a journal untouched
/// for this long means it has read everything the kernel queued.
const JOURNAL_QUIET_PERIOD: Duration = Duration::from_secs(2);
const JOURNAL_SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// `vdsync status` over a million paths stats each of them and prints each; past
/// this it is stopped and the figures come from the settled journal alone.
const STATUS_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------
// one-change

/// Where `one-change` keeps everything, all under one scratch directory and so on one
/// file system: the tracker needs its state there, and both tools write to one device.
struct OneChangePaths {
    development_tree: PathBuf,
    development_state: PathBuf,
    repository_data: PathBuf,
    agent_root: PathBuf,
    agent_state: PathBuf,
    rsync_copy: PathBuf,
    logs: PathBuf,
}

impl OneChangePaths {
    fn under(scratch_root: &Path) -> OneChangePaths {
        OneChangePaths {
            development_tree: scratch_root.join("dev"),
            development_state: scratch_root.join("dev-state"),
            repository_data: scratch_root.join("repository"),
            agent_root: scratch_root.join("agent-root"),
            agent_state: scratch_root.join("agent-state"),
            rsync_copy: scratch_root.join("rsync-copy"),
            logs: scratch_root.join("logs"),
        }
    }
}

/// vdsync's side of one repetition of `one-change`.
struct PushUntilApplied {
    /// From starting `vdsync push` until the agent's root shows the new content.
    until_applied: Duration,
    /// From starting `vdsync push` until it exited (it may exit after the agent
    /// already has the change: it updates its index and the journal after the commit).
    push_exited: Duration,
    report: PushReport,
}

impl PushUntilApplied {
    /// The figure: the whole push command, start to exit, and the agent applying.
    fn until_done(&self) -> Duration {
        self.until_applied.max(self.push_exited)
    }
}

/// One repetition of `one-change`.
struct OneChangeRun {
    vdsync: PushUntilApplied,
    /// `rsync -a SRC/ DST/` with DST holding the previous state.
    rsync: Duration,
}

pub fn one_change(repetitions: usize) -> Result<()> {
    if find_on_path("rsync").is_none() {
        bail!("rsync not found: apt-get install -y rsync");
    }
    if find_on_path("unshare").is_none() {
        bail!("unshare not found: apt-get install -y util-linux");
    }
    let vdsync = build_release()?;
    // Declared before the processes so it is dropped after them: the agent and the
    // tracker must be dead before the directories they use are removed.
    let scratch = scratch_directory("bench-one-change")?;
    let mut processes = BackgroundProcesses::default();
    let load_before = load_average();
    let paths = OneChangePaths::under(scratch.path());
    narrate(format_args!(
        "working in {} ({repetitions} repetitions, `sync` before each timed run)",
        scratch.path().display()
    ));
    let (repository_url, mut head) = set_up_one_change(&vdsync, &paths, &mut processes)?;

    let (directory_index, file_index) = CHANGED_FILE;
    let changed_in_development =
        SmallFileTree::file_path(&paths.development_tree, directory_index, file_index);
    let changed_on_agent = SmallFileTree::file_path(&paths.agent_root, directory_index, file_index);
    narrate(format_args!(
        "each run: rewrite {}, `sync`, time `vdsync push` until the agent's copy reads back the new content (read again on every inotify event in its directory), `sync`, time `rsync -a dev/ rsync-copy/`",
        changed_in_development
            .strip_prefix(&paths.development_tree)
            .unwrap_or(&changed_in_development)
            .display(),
    ));
    let mut random = Xorshift64::seeded(7);
    let mut runs = Vec::new();
    for repetition in 1..=repetitions {
        let content = changed_content(repetition, &mut random);
        std::fs::write(&changed_in_development, &content)
            .with_context(|| format!("cannot write {}", changed_in_development.display()))?;
        sync_file_systems()?;
        let mut push = push_command(
            &vdsync,
            &repository_url,
            &paths.development_tree,
            &paths.development_state,
            &format!("benchmark: one change, run {repetition}"),
        );
        let vdsync_side = push_until_applied(
            &mut push,
            &changed_on_agent,
            &content,
            &paths.logs.join(format!("push-{repetition}")),
            &mut processes,
        )
        .with_context(|| format!("run {repetition}: the push or the apply failed"))?;
        if vdsync_side.report.version != Some(head + 1) {
            bail!(
                "run {repetition}: expected the push to make version {}, it made {:?}",
                head + 1,
                vdsync_side.report.version
            );
        }
        head += 1;

        sync_file_systems()?;
        let started = Instant::now();
        rsync(&paths.development_tree, &paths.rsync_copy)?;
        let run = OneChangeRun {
            vdsync: vdsync_side,
            rsync: started.elapsed(),
        };
        println!(
            "    run {repetition}/{repetitions}: push until applied and exited {}  (applied after {}, push exited after {}; {})   rsync -a {}   vdsync {}",
            milliseconds(run.vdsync.until_done()),
            milliseconds(run.vdsync.until_applied),
            milliseconds(run.vdsync.push_exited),
            run.vdsync.report.source,
            milliseconds(run.rsync),
            ratio_text(run.vdsync.until_done(), run.rsync)
        );
        runs.push(run);
    }

    narrate("checking that the agent's root and the rsync copy both match dev/");
    // The agent reports a version only once it is wholly in place: wait for that, so
    // the comparison does not race with its last steps.
    wait_for_agents_at_version(
        &vdsync,
        &repository_url,
        &[AGENT_NAME],
        head,
        APPLY_TIMEOUT,
        &mut processes,
    )?;
    check_copy(
        &paths.development_tree,
        &paths.agent_root,
        "the agent's root",
    )?;
    check_copy(&paths.development_tree, &paths.rsync_copy, "the rsync copy")?;
    println!("    both match");
    processes.stop_all();

    println!();
    print_one_change_summary(&runs)?;
    println!("{}", machine_summary(&load_before));
    drop(processes);
    drop(scratch);
    Ok(())
}

/// Everything before the timed runs: the tree, the repository at version 0, a
/// long-running agent holding version 0, the tracker, one untimed push (a tracker
/// that just started asks for one full scan) and one untimed rsync. Returns the
/// repository's URL and its head.
fn set_up_one_change(
    vdsync: &Vdsync,
    paths: &OneChangePaths,
    processes: &mut BackgroundProcesses,
) -> Result<(String, u64)> {
    for directory in [&paths.agent_root, &paths.rsync_copy, &paths.logs] {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    narrate("generating the development tree dev/");
    let started = Instant::now();
    let description = ONE_CHANGE_TREE.generate(&paths.development_tree, |_| {})?;
    println!("    {description} in {}", seconds(started.elapsed()));

    narrate("vdsync repo init --from-dir dev/ (version 0 holds the whole tree)");
    let started = Instant::now();
    initialize_repository(vdsync, &paths.repository_data, &paths.development_tree)?;
    println!("    done in {}", seconds(started.elapsed()));
    let repository_url = start_repository_server(
        vdsync,
        &paths.repository_data,
        &paths.logs.join("repository.log"),
        processes,
    )?;
    println!("    serving on {repository_url}");

    narrate(format_args!(
        "vdsync agent --root agent-root/ (long-running, following the head) in a PID namespace of its own, as on a machine of its own: the benchmark's own processes (push, sync, rsync) are not among those it plans for; waiting for version 0 (at most {} s)",
        INITIAL_APPLY_TIMEOUT.as_secs()
    ));
    let mut agent_command =
        vdsync.command_in_own_pid_namespace(["agent", "--name", AGENT_NAME, "--repo"]);
    agent_command
        .arg(&repository_url)
        .arg("--root")
        .arg(&paths.agent_root)
        .arg("--state")
        .arg(&paths.agent_state);
    processes.spawn(
        "the agent",
        &mut agent_command,
        &paths.logs.join("agent.log"),
    )?;
    let waited = wait_for_agents_at_version(
        vdsync,
        &repository_url,
        &[AGENT_NAME],
        0,
        INITIAL_APPLY_TIMEOUT,
        processes,
    )?;
    println!("    the agent holds version 0 after {}", seconds(waited));

    narrate("vdsync track --root dev/ --state dev-state/");
    let tracker = start_tracker(
        vdsync,
        &paths.development_tree,
        &paths.development_state,
        &paths.logs.join("tracker.log"),
        processes,
    )?;
    println!("    {}", tracker.ready_line);

    narrate("untimed first push: a tracker that just started asks for one full scan");
    let started = Instant::now();
    let first_push = parse_push_report(&run_checked(&mut push_command(
        vdsync,
        &repository_url,
        &paths.development_tree,
        &paths.development_state,
        "benchmark: first push",
    ))?)?;
    println!(
        "    {} in {}; version made: {}",
        first_push.source,
        seconds(started.elapsed()),
        first_push
            .version
            .map_or_else(|| "none (nothing to push)".to_owned(), |v| v.to_string())
    );
    let head = first_push.version.unwrap_or(0);
    if first_push.version.is_some() {
        wait_for_agents_at_version(
            vdsync,
            &repository_url,
            &[AGENT_NAME],
            head,
            INITIAL_APPLY_TIMEOUT,
            processes,
        )?;
    }

    narrate(
        "untimed first rsync -a dev/ rsync-copy/, so the copy holds the tree as the agent does",
    );
    let started = Instant::now();
    rsync(&paths.development_tree, &paths.rsync_copy)?;
    println!("    done in {}", seconds(started.elapsed()));
    Ok((repository_url, head))
}

fn print_one_change_summary(runs: &[OneChangeRun]) -> Result<()> {
    let repetitions = runs.len();
    let column = |select: fn(&OneChangeRun) -> Duration| median_by(runs, select);
    let vdsync_median = column(|run| run.vdsync.until_done())?;
    let applied_median = column(|run| run.vdsync.until_applied)?;
    let push_median = column(|run| run.vdsync.push_exited)?;
    let rsync_median = column(|run| run.rsync)?;
    let tracker_runs = runs
        .iter()
        .filter(|run| run.vdsync.report.by_tracker)
        .count();
    let journal_runs = runs
        .iter()
        .filter(|run| run.vdsync.report.from_journal)
        .count();
    println!(
        "one-change benchmark: {} files, one changed per run; medians of {repetitions} runs (the disk is noisy: medians, not means), same file system, same run",
        ONE_CHANGE_TREE.file_count()
    );
    println!(
        "  vdsync push until the agent's root shows it and the push exited {:>10}   (the root showed it after {}; `vdsync push` exited after {})",
        milliseconds(vdsync_median),
        milliseconds(applied_median),
        milliseconds(push_median)
    );
    println!(
        "  rsync -a to a copy holding the previous tree                     {:>10}",
        milliseconds(rsync_median)
    );
    println!(
        "  vdsync is {} than rsync -a; target at least {ONE_CHANGE_TARGET_SPEEDUP:.0}x faster: {}",
        ratio_text(vdsync_median, rsync_median),
        if speedup(vdsync_median, rsync_median) >= ONE_CHANGE_TARGET_SPEEDUP {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  {journal_runs} of {repetitions} pushes read the journal only (the others scanned the whole tree); the tracker made {tracker_runs} of them (`vdsync push` hands a journal-driven push to the running tracker)"
    );
    println!(
        "  resolution: the agent's file is read on each inotify event in its directory and the push's exit is seen through a pidfd, so neither waits on a polling interval"
    );
    Ok(())
}

/// 100-400 bytes that say which run wrote them, so no two runs write the same file.
fn changed_content(repetition: usize, random: &mut Xorshift64) -> Vec<u8> {
    let mut content = format!("one-change benchmark, run {repetition}\n").into_bytes();
    let random_length = 100 + (random.next_u64() % 260) as usize;
    let start = content.len();
    content.resize(start + random_length, 0);
    random.fill(&mut content[start..]);
    content
}

/// `rsync -a SOURCE/ COPY/`.
fn rsync(source: &Path, copy: &Path) -> Result<()> {
    run_checked(
        Command::new("rsync")
            .arg("-a")
            .arg(with_trailing_slash(source))
            .arg(with_trailing_slash(copy)),
    )
    .map(drop)
}

/// Starts `push` and reads `watched_file` until it holds `expected`: once before the
/// start and again on every inotify event in its directory (the agent renames the
/// staged file into it) and on the push's exit (a pidfd), so the figures are not
/// rounded up to a polling interval. The push's output goes to `output_prefix`.out/.err,
/// files made before the clock starts, so no pipe can fill up and stall it.
fn push_until_applied(
    push: &mut Command,
    watched_file: &Path,
    expected: &[u8],
    output_prefix: &Path,
    processes: &mut BackgroundProcesses,
) -> Result<PushUntilApplied> {
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::fs::inotify;

    let description = describe_command(push);
    let standard_output_path = output_prefix.with_extension("out");
    let standard_error_path = output_prefix.with_extension("err");
    let create = |path: &Path| {
        File::create(path).with_context(|| format!("cannot create {}", path.display()))
    };
    push.stdin(Stdio::null())
        .stdout(create(&standard_output_path)?)
        .stderr(create(&standard_error_path)?);
    let directory = watched_file
        .parent()
        .context("the watched file has no directory")?;
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .context("cannot create an inotify instance")?;
    inotify::add_watch(
        &watch,
        directory,
        inotify::WatchFlags::MOVED_TO
            | inotify::WatchFlags::CREATE
            | inotify::WatchFlags::CLOSE_WRITE,
    )
    .with_context(|| format!("cannot watch {}", directory.display()))?;

    let started = Instant::now();
    // A process group of its own, killed on drop: a push left behind by a failed
    // wait must not keep running.
    let mut push_process = GroupChild::spawn(push);
    let exit_watch = rustix::process::Pid::from_raw(push_process.pid() as i32)
        .context("the push has no process id")
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .context("cannot open a pidfd for the push")
        })?;
    let mut push_exited = None;
    let mut events = [0u8; 4096];
    let timeout = rustix::event::Timespec::try_from(APPLY_CHECK_INTERVAL)
        .context("the check interval does not fit a timespec")?;
    let applied = loop {
        if std::fs::read(watched_file).is_ok_and(|content| content == expected) {
            break started.elapsed();
        }
        if push_exited.is_none() {
            if let Some(status) = push_process
                .child
                .try_wait()
                .context("cannot check on the push")?
            {
                push_exited = Some(started.elapsed());
                if !status.success() {
                    bail!(
                        "`{description}` failed ({status}): {}",
                        log_tail(&standard_error_path)
                    );
                }
            }
        }
        if started.elapsed() > APPLY_TIMEOUT {
            bail!(
                "the agent's root did not show the change within {} s of starting the push (the push {}); the logs:\n{}",
                APPLY_TIMEOUT.as_secs(),
                if push_exited.is_some() { "had exited" } else { "was still running" },
                processes.all_log_tails()
            );
        }
        let mut wanted = vec![PollFd::new(&watch, PollFlags::IN)];
        if push_exited.is_none() {
            wanted.push(PollFd::new(&exit_watch, PollFlags::IN));
        }
        let woken = match poll(&mut wanted, Some(&timeout)) {
            Ok(woken) => woken,
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err).context("cannot wait for the agent or the push"),
        };
        if woken == 0 {
            // Nothing happened for a while: the agent or the repository dying
            // would make this wait until the timeout.
            processes.check_all_running()?;
        }
        // The events only wake this loop; the file is read again either way.
        while rustix::io::read(&watch, &mut events).is_ok_and(|read| read > 0) {}
    };
    let status = push_process
        .child
        .wait()
        .context("cannot wait for the push")?;
    let push_exited = push_exited.unwrap_or_else(|| started.elapsed());
    if !status.success() {
        bail!(
            "`{description}` failed ({status}) after the agent had the change: {}",
            log_tail(&standard_error_path)
        );
    }
    let output = std::fs::read_to_string(&standard_output_path)
        .with_context(|| format!("cannot read {}", standard_output_path.display()))?;
    Ok(PushUntilApplied {
        until_applied: applied,
        push_exited,
        report: parse_push_report(&output)?,
    })
}

// ---------------------------------------------------------------------------------
// tracker-overhead

/// What watches the file system during one `tar -xf` of `tracker-overhead`.
#[derive(Clone, Copy)]
enum Watching {
    Nothing,
    /// `fanotify_floor --ignore-all`: the tracker's kind of file-system mark with
    /// every event ignored, so none is made.
    Dispatch,
    /// `fanotify_floor --ignore-all --with-contents`: the same, also asking for the
    /// content events, as one mark hearing everything would.
    ContentsDispatch,
    /// The `fanotify_floor` example: the tracker's fanotify events, read and dropped.
    Floor,
    Tracker,
}

/// One `tar -xf` run with the tracker watching.
struct TrackedUntar {
    untar: UntarTimes,
    /// The tracker's CPU time (user + system) from its start until its journal settled.
    tracker_cpu: Duration,
    /// From `tar` exiting until the tracker wrote its last batch.
    catch_up: Duration,
    /// What the tracker read from the kernel in the run (its last line says).
    events_read: u64,
    /// How many of its reads returned any: each woke it, at the writer's expense.
    reads: u64,
}

pub fn tracker_overhead(repetitions: usize) -> Result<()> {
    if find_on_path("tar").is_none() {
        bail!("tar not found: apt-get install -y tar");
    }
    let vdsync = build_release()?;
    let floor = build_fanotify_floor()?;
    let scratch = scratch_directory("bench-tracker-overhead")?;
    let load_before = load_average();
    let archive_source = scratch.path().join("archive-source");
    let archive = scratch.path().join("archive.tar");
    // Each run extracts into a fresh ext4 file system (journaled, as mkfs.ext4 makes
    // it) mounted here: on a file system that has seen many files deleted, as this
    // machine's is after other benchmarks, ext4 without a journal spends most of a
    // file creation skipping recently deleted inodes (`recently_deleted`), which
    // made the same extraction take from 27 s to 40 s. The tracker's root is the
    // directory the run extracts into; its state directory sits beside it.
    let extraction_parent = scratch.path().join("untar");
    let image = scratch.path().join("untar.img");
    let logs = scratch.path().join("logs");
    for directory in [&extraction_parent, &logs] {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    narrate(format_args!(
        "working in {} ({repetitions} rounds of five runs: nothing watching, a mark with every event ignored, the same with content events too, fanotify_floor, vdsync track; rotating which goes first, `sync` before each)",
        scratch.path().display()
    ));

    let other_trackers = running_trackers();
    if other_trackers > 0 {
        narrate(format_args!(
            "note: {other_trackers} other `vdsync track` process(es) already run on this machine; they read this file system's events too, in the runs without our tracker as well"
        ));
    }

    narrate("generating a tree and archiving it with tar -cf (once)");
    let started = Instant::now();
    let description = ARCHIVE_TREE.generate(&archive_source, |_| {})?;
    run_checked(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&archive_source)
            .arg("."),
    )?;
    std::fs::remove_dir_all(&archive_source)
        .with_context(|| format!("cannot remove {}", archive_source.display()))?;
    let archive_bytes = std::fs::metadata(&archive)
        .with_context(|| format!("cannot stat {}", archive.display()))?
        .len();
    println!(
        "    {description}; archive {} in {}",
        mebibytes(archive_bytes),
        seconds(started.elapsed())
    );

    let mut without_tracker = Vec::new();
    let mut with_dispatch = Vec::new();
    let mut with_contents_dispatch = Vec::new();
    let mut with_floor = Vec::new();
    let mut with_tracker = Vec::new();
    let mut run_number = 0;
    for repetition in 1..=repetitions {
        // Rotating the order cancels a drift (the disk warming up or filling its
        // cache) that would otherwise always favour the same side.
        let mut order = [
            Watching::Nothing,
            Watching::Dispatch,
            Watching::ContentsDispatch,
            Watching::Floor,
            Watching::Tracker,
        ];
        let runs = order.len();
        order.rotate_left(repetition % runs);
        for watching in order {
            run_number += 1;
            let mount = Mount::ext4_image(&image, UNTAR_FILE_SYSTEM_MEGABYTES, &extraction_parent);
            let tracker_state = extraction_parent.join("tracker-state");
            let target = extraction_parent.join(format!("run-{run_number}"));
            std::fs::create_dir(&target)
                .with_context(|| format!("cannot create {}", target.display()))?;
            let log = logs.join(format!("watcher-{run_number}.log"));
            match watching {
                Watching::Tracker => {
                    let run = untar_with_tracker(
                        &vdsync,
                        &archive,
                        &target,
                        &extraction_parent,
                        &tracker_state,
                        &log,
                    )?;
                    println!(
                        "    round {repetition}/{repetitions}: with vdsync track      tar -xf {} (tar's CPU {})  tracker: {} CPU, {} events in {} reads, caught up {} after tar",
                        seconds(run.untar.wall),
                        seconds(run.untar.cpu),
                        seconds(run.tracker_cpu),
                        run.events_read,
                        run.reads,
                        milliseconds(run.catch_up)
                    );
                    with_tracker.push(run);
                }
                Watching::Dispatch | Watching::ContentsDispatch | Watching::Floor => {
                    let (label, flags, runs): (_, &[&str], _) = match watching {
                        Watching::Dispatch => {
                            ("all events ignored", &["--ignore-all"], &mut with_dispatch)
                        }
                        Watching::ContentsDispatch => (
                            "with contents, ignored",
                            &["--ignore-all", "--with-contents"],
                            &mut with_contents_dispatch,
                        ),
                        _ => ("with fanotify_floor", &[], &mut with_floor),
                    };
                    let untar = untar_with_floor(&floor, flags, &archive, &target, &log)?;
                    println!(
                        "    round {repetition}/{repetitions}: {label:<22} tar -xf {} (tar's CPU {})",
                        seconds(untar.wall),
                        seconds(untar.cpu)
                    );
                    runs.push(untar);
                }
                Watching::Nothing => {
                    sync_file_systems()?;
                    let untar = untar(&archive, &target)?;
                    println!(
                        "    round {repetition}/{repetitions}: nothing watching       tar -xf {} (tar's CPU {})",
                        seconds(untar.wall),
                        seconds(untar.cpu)
                    );
                    without_tracker.push(untar);
                }
            }
            drop(mount);
            std::fs::remove_file(&image)
                .with_context(|| format!("cannot remove {}", image.display()))?;
        }
    }

    let column = |runs: &[UntarTimes], select: fn(&UntarTimes) -> Duration| median_by(runs, select);
    let tracked_untars: Vec<UntarTimes> = with_tracker.iter().map(|run| run.untar).collect();
    let without_wall = column(&without_tracker, |times| times.wall)?;
    let without_cpu = column(&without_tracker, |times| times.cpu)?;
    let dispatch_wall = column(&with_dispatch, |times| times.wall)?;
    let dispatch_cpu = column(&with_dispatch, |times| times.cpu)?;
    let contents_wall = column(&with_contents_dispatch, |times| times.wall)?;
    let contents_cpu = column(&with_contents_dispatch, |times| times.cpu)?;
    let floor_wall = column(&with_floor, |times| times.wall)?;
    let floor_cpu = column(&with_floor, |times| times.cpu)?;
    let with_wall = column(&tracked_untars, |times| times.wall)?;
    let with_cpu = column(&tracked_untars, |times| times.cpu)?;
    let tracker_cpu = median_by(&with_tracker, |run| run.tracker_cpu)?;
    let catch_up = median_by(&with_tracker, |run| run.catch_up)?;
    let events_read = median_by(&with_tracker, |run| run.events_read)?;
    let reads = median_by(&with_tracker, |run| run.reads)?;
    let wall_overhead = overhead_percent(without_wall, with_wall);
    let cpu_overhead = overhead_percent(without_cpu, with_cpu);
    println!();
    println!(
        "tracker-overhead benchmark: tar -xf of {} files into a fresh ext4 file system each run; medians of {repetitions} runs each (the disk is noisy: medians, not means), same run",
        ARCHIVE_TREE.file_count()
    );
    println!("                                  wall clock   tar's CPU (user+system)");
    println!(
        "  nothing watching                 {:>10}   {:>10}",
        seconds(without_wall),
        seconds(without_cpu)
    );
    println!(
        "  mark, every event ignored        {:>10}   {:>10}   {:>+6.1}% / {:>+6.1}%",
        seconds(dispatch_wall),
        seconds(dispatch_cpu),
        overhead_percent(without_wall, dispatch_wall),
        overhead_percent(without_cpu, dispatch_cpu)
    );
    println!(
        "  + contents, every event ignored  {:>10}   {:>10}   {:>+6.1}% / {:>+6.1}%",
        seconds(contents_wall),
        seconds(contents_cpu),
        overhead_percent(without_wall, contents_wall),
        overhead_percent(without_cpu, contents_cpu)
    );
    println!(
        "  fanotify_floor (every event)     {:>10}   {:>10}   {:>+6.1}% / {:>+6.1}%",
        seconds(floor_wall),
        seconds(floor_cpu),
        overhead_percent(without_wall, floor_wall),
        overhead_percent(without_cpu, floor_cpu)
    );
    println!(
        "  vdsync track                     {:>10}   {:>10}   {wall_overhead:>+6.1}% / {cpu_overhead:>+6.1}%",
        seconds(with_wall),
        seconds(with_cpu)
    );
    println!(
        "  mark, every event ignored: `fanotify_floor --ignore-all`, the tracker's file-system mark (events about names: create, delete, move) with all its events in the kernel's ignore mask, so none is made: what the kernel spends on every change once such a mark exists, which no fanotify tracker of a whole file system avoids"
    );
    println!(
        "  + contents, every event ignored: `fanotify_floor --ignore-all --with-contents`, the same mark also asking for the events about contents and attributes (writes, closes, chmod...), all ignored: what one file-system mark hearing everything costs, because the kernel then looks up the parent and name of every such change; the tracker asks for those per directory of its tree instead"
    );
    println!(
        "  fanotify_floor: the tracker's events on the same mark, every one made, queued, read at the tracker's pace and dropped (the tracker itself has the kernel ignore the entries of directories created since the last push, so it can cost less)"
    );
    println!(
        "  the tracker itself: {} CPU per run, caught up {} after tar exited; it read {events_read} events in {reads} reads (tar creates {} files and directories, one name event each were none ignored)",
        seconds(tracker_cpu),
        milliseconds(catch_up),
        ARCHIVE_TREE.file_count() + ARCHIVE_TREE.directories
    );
    println!(
        "  vdsync track against the mark with every event ignored: {:+.1}% wall clock; against fanotify_floor: {:+.1}%",
        overhead_percent(dispatch_wall, with_wall),
        overhead_percent(floor_wall, with_wall)
    );
    println!(
        "  target: at most {TRACKER_OVERHEAD_TARGET_PERCENT:.0}% slower (wall clock): {}",
        if wall_overhead <= TRACKER_OVERHEAD_TARGET_PERCENT {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("{}", machine_summary(&load_before));
    drop(scratch);
    Ok(())
}

/// How much slower `with` is than `without`, in percent (negative when faster).
fn overhead_percent(without: Duration, with: Duration) -> f64 {
    (with.as_secs_f64() / without.as_secs_f64().max(f64::EPSILON) - 1.0) * 100.0
}

/// How many `vdsync track` processes run on this machine (from /proc/*/cmdline).
fn running_trackers() -> usize {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0;
    };
    processes
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|command_line| {
            let mut words = command_line.split(|byte| *byte == 0);
            let program = words.next().unwrap_or_default();
            Path::new(std::ffi::OsStr::from_bytes(program)).file_name()
                == Some(std::ffi::OsStr::new("vdsync"))
                && words.next() == Some(b"track".as_slice())
        })
        .count()
}

/// How long one `tar -xf` took.
#[derive(Clone, Copy)]
struct UntarTimes {
    wall: Duration,
    /// tar's own CPU time, user plus system. fanotify's cost in the kernel (queueing
    /// an event per change) lands here, in the system time of the process changing
    /// files; the tracker's reading of events does not.
    cpu: Duration,
}

/// `tar -xf ARCHIVE -C TARGET`, timed: wall clock, and CPU time from the counters of
/// reaped children in /proc/self/stat (tar is the only child reaped in between).
fn untar(archive: &Path, target: &Path) -> Result<UntarTimes> {
    let children_before = CpuTimes::read("self")?.reaped_children;
    let started = Instant::now();
    run_checked(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(target),
    )?;
    let wall = started.elapsed();
    let cpu = CpuTimes::read("self")?
        .reaped_children
        .saturating_sub(children_before);
    Ok(UntarTimes { wall, cpu })
}

/// Starts `fanotify_floor` (with `flags`) on the file system holding `target`, times
/// `tar -xf` while it runs, and stops it.
fn untar_with_floor(
    floor: &Path,
    flags: &[&str],
    archive: &Path,
    target: &Path,
    log_path: &Path,
) -> Result<UntarTimes> {
    let mut processes = BackgroundProcesses::default();
    let mut command = Command::new(floor);
    command.args(flags);
    processes.spawn("fanotify_floor", command.arg(target), log_path)?;
    let result = wait_until(FLOOR_START_TIMEOUT, "fanotify_floor to start", || {
        processes.check_all_running()?;
        Ok(std::fs::read_to_string(log_path).is_ok_and(|log| log.starts_with("ready")))
    });
    result.map_err(|error| error.context(format!("its log:\n{}", log_tail(log_path))))?;
    sync_file_systems()?;
    let untar = untar(archive, target)?;
    // Still running: it did not fail while tar ran.
    processes.check_all_running()?;
    processes.stop_all();
    Ok(untar)
}

/// Starts a tracker with a fresh state directory, times `tar -xf` while it runs, waits
/// for it to catch up (to report its CPU time), and stops it.
fn untar_with_tracker(
    vdsync: &Vdsync,
    archive: &Path,
    target: &Path,
    tracker_root: &Path,
    tracker_state: &Path,
    log_path: &Path,
) -> Result<TrackedUntar> {
    let mut processes = BackgroundProcesses::default();
    let tracker = start_tracker(
        vdsync,
        tracker_root,
        tracker_state,
        log_path,
        &mut processes,
    )?;
    // A tracker places its per-directory marks for content events with its first
    // snapshot (its first push's): one is asked for, as after that push.
    run_checked(&mut vdsync.command([
        "status".as_ref(),
        "--root".as_ref(),
        tracker_root.as_os_str(),
        "--state".as_ref(),
        tracker_state.as_os_str(),
    ]))?;
    let tracker_process = tracker.process_id.to_string();
    let cpu_at_start = CpuTimes::read(&tracker_process)?.own;
    sync_file_systems()?;
    let untar = untar(archive, target)?;
    let tar_exited = SystemTime::now();
    let last_batch = wait_for_journal_to_settle(&tracker, &mut processes)?;
    let tracker_cpu = CpuTimes::read(&tracker_process)?
        .own
        .saturating_sub(cpu_at_start);
    let (events_read, reads) = stop_tracker_and_read_totals(tracker.process_id, log_path)?;
    processes.stop_all();
    std::fs::remove_dir_all(tracker_state)
        .with_context(|| format!("cannot remove {}", tracker_state.display()))?;
    Ok(TrackedUntar {
        untar,
        tracker_cpu,
        catch_up: last_batch.duration_since(tar_exited).unwrap_or_default(),
        events_read,
        reads,
    })
}

/// Stops the tracker with SIGTERM and returns what its last line says it read:
/// (events, reads that returned any).
fn stop_tracker_and_read_totals(process_id: u32, log_path: &Path) -> Result<(u64, u64)> {
    const PREFIX: &str = "stopped after reading ";
    let pid = rustix::process::Pid::from_raw(process_id as i32)
        .with_context(|| format!("{process_id} is not a process id"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .with_context(|| format!("cannot stop the tracker (pid {process_id})"))?;
    let mut last_line = None;
    wait_until(TRACKER_STOP_TIMEOUT, "the tracker to stop", || {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        last_line = log
            .lines()
            .find_map(|line| line.strip_prefix(PREFIX))
            .map(str::to_owned);
        Ok(last_line.is_some())
    })?;
    // "N event(s) in M read(s)"
    let line = last_line.unwrap_or_default();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    match numbers[..] {
        [events, reads] => Ok((events, reads)),
        _ => bail!("the tracker's last line is not \"{PREFIX}N event(s) in M read(s)\": {line:?}"),
    }
}

/// Waits until the tracker's journal file has kept its size and modification time
/// for [`JOURNAL_QUIET_PERIOD`]: the tracker writes a batch every 100 ms while marks
/// arrive, so by then it has read everything the kernel had queued. Returns when the
/// last batch was written (the file's modification time).
fn wait_for_journal_to_settle(
    tracker: &Tracker,
    processes: &mut BackgroundProcesses,
) -> Result<SystemTime> {
    let journal_state = || -> Result<(u64, SystemTime)> {
        let metadata = std::fs::metadata(&tracker.journal_path)
            .with_context(|| format!("cannot stat {}", tracker.journal_path.display()))?;
        Ok((metadata.len(), metadata.modified()?))
    };
    let started = Instant::now();
    let mut last_seen = journal_state()?;
    let mut unchanged_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        processes.check_all_running()?;
        let now_seen = journal_state()?;
        if now_seen != last_seen {
            last_seen = now_seen;
            unchanged_since = Instant::now();
        } else if unchanged_since.elapsed() >= JOURNAL_QUIET_PERIOD {
            return Ok(last_seen.1);
        }
        if started.elapsed() > JOURNAL_SETTLE_TIMEOUT {
            bail!(
                "the tracker's journal {} was still changing after {} s; the tracker's log:\n{}",
                tracker.journal_path.display(),
                JOURNAL_SETTLE_TIMEOUT.as_secs(),
                processes.all_log_tails()
            );
        }
    }
}

/// CPU time (user plus system) from /proc/PID/stat, in clock ticks converted.
#[derive(Clone, Copy)]
struct CpuTimes {
    /// The process's own, over all its threads (fields 14 and 15).
    own: Duration,
    /// Its children's that it has waited for (fields 16 and 17).
    reaped_children: Duration,
}

impl CpuTimes {
    /// `process` is a process id or "self".
    fn read(process: &str) -> Result<CpuTimes> {
        let path = format!("/proc/{process}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        CpuTimes::parse(&text).with_context(|| format!("cannot read the CPU times in {path}"))
    }

    fn parse(stat: &str) -> Option<CpuTimes> {
        // USER_HZ is 100 on every Linux architecture; it is part of the kernel's ABI,
        // unlike the kernel's internal HZ.
        const TICKS_PER_SECOND: u64 = 100;
        // The command name (field 2) may hold spaces and parentheses; the fields after
        // the last ')' are plain numbers, starting with field 3.
        let (_, after_name) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |field_number: usize| fields.get(field_number - 3)?.parse::<u64>().ok();
        let duration = |ticks: u64| Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND);
        Some(CpuTimes {
            own: duration(ticks(14)? + ticks(15)?),
            reaped_children: duration(ticks(16)? + ticks(17)?),
        })
    }
}

// ---------------------------------------------------------------------------------
// tracker-memory

/// What /proc/PID/status says about a process's memory, in bytes.
#[derive(Clone, Copy)]
struct ProcessMemory {
    /// VmHWM: the peak resident set size so far.
    peak_resident: u64,
    /// VmRSS: the resident set size now.
    resident: u64,
    /// RssAnon: heap and other anonymous memory (the part that grows with data).
    anonymous: u64,
    /// RssFile: mapped files, mostly the binary's own pages.
    file_backed: u64,
}

impl ProcessMemory {
    fn read(process_id: u32) -> Result<ProcessMemory> {
        let path = format!("/proc/{process_id}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        ProcessMemory::parse(&text)
            .with_context(|| format!("cannot read the memory lines of {path}"))
    }

    fn parse(status: &str) -> Option<ProcessMemory> {
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|line| line.starts_with(name))?;
            let kibibytes = line[name.len()..]
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()?;
            Some(kibibytes * 1024)
        };
        Some(ProcessMemory {
            peak_resident: field("VmHWM:")?,
            resident: field("VmRSS:")?,
            anonymous: field("RssAnon:")?,
            file_backed: field("RssFile:")?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "VmHWM {}, VmRSS {} (anonymous {}, file-backed {})",
            mebibytes(self.peak_resident),
            mebibytes(self.resident),
            mebibytes(self.anonymous),
            mebibytes(self.file_backed)
        )
    }
}

/// One repetition of `tracker-memory`.
struct MemoryRun {
    after_start: ProcessMemory,
    after_journalling: ProcessMemory,
    /// `None` when `status` did not finish in time.
    status: Option<StatusOutcome>,
}

/// What `vdsync status` said, and the tracker's memory after answering it.
struct StatusOutcome {
    /// "journal, N path(s)" or "full scan: WHY".
    source: String,
    memory: ProcessMemory,
}

impl MemoryRun {
    /// The highest peak seen, the figure the target is about.
    fn peak(&self) -> u64 {
        self.status
            .as_ref()
            .map_or(self.after_journalling.peak_resident, |outcome| {
                outcome.memory.peak_resident
            })
    }
}

pub fn tracker_memory(repetitions: usize) -> Result<()> {
    let vdsync = build_release()?;
    let scratch = scratch_directory("bench-tracker-memory")?;
    let mut processes = BackgroundProcesses::default();
    let load_before = load_average();
    let empty_tree = scratch.path().join("empty");
    let repository_data = scratch.path().join("repository");
    let logs = scratch.path().join("logs");
    for directory in [&empty_tree, &logs] {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    narrate(format_args!(
        "working in {} ({repetitions} repetition(s))",
        scratch.path().display()
    ));
    // `push` needs a repository: it is what clears the "tracker started" mark, so the
    // million paths are then the journal's own marks, not one whole-tree rescan.
    narrate("a repository whose version 0 is an empty tree");
    initialize_repository(&vdsync, &repository_data, &empty_tree)?;
    let repository_url = start_repository_server(
        &vdsync,
        &repository_data,
        &logs.join("repository.log"),
        &mut processes,
    )?;

    let mut runs = Vec::new();
    for repetition in 1..=repetitions {
        let run = measure_memory_once(&vdsync, &repository_url, scratch.path(), &logs, repetition)
            .with_context(|| format!("repetition {repetition} failed"))?;
        runs.push(run);
    }
    processes.stop_all();

    let column = |select: fn(&MemoryRun) -> u64| median_by(&runs, select);
    let peak_median = column(MemoryRun::peak)?;
    let journalling_peak_median = column(|run| run.after_journalling.peak_resident)?;
    let journalling_resident_median = column(|run| run.after_journalling.resident)?;
    let start_resident_median = column(|run| run.after_start.resident)?;
    println!();
    println!(
        "tracker-memory benchmark: vdsync track with {} journalled paths; medians of {repetitions} run(s)",
        MEMORY_DIRECTORIES * MEMORY_NAMES_PER_DIRECTORY
    );
    println!(
        "  VmRSS right after start                         {:>10}",
        mebibytes(start_resident_median)
    );
    println!(
        "  once the journal holds every path: VmRSS        {:>10}   VmHWM {}",
        mebibytes(journalling_resident_median),
        mebibytes(journalling_peak_median)
    );
    let status_runs: Vec<&StatusOutcome> =
        runs.iter().filter_map(|run| run.status.as_ref()).collect();
    if let Some(last) = status_runs.last() {
        let status_column = |select: fn(&ProcessMemory) -> u64| {
            median_by(&status_runs, |outcome| select(&outcome.memory))
        };
        println!(
            "  after vdsync status read the journal: VmRSS     {:>10}   VmHWM {}",
            mebibytes(status_column(|memory| memory.resident)?),
            mebibytes(status_column(|memory| memory.peak_resident)?)
        );
        println!("  what status saw: {}", last.source);
    } else {
        println!("  after vdsync status: not measured (status did not finish in time)");
    }
    println!(
        "  peak {} against the target of {}: {}",
        mebibytes(peak_median),
        mebibytes(MEMORY_TARGET_BYTES),
        if peak_median <= MEMORY_TARGET_BYTES {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("{}", machine_summary(&load_before));
    drop(processes);
    drop(scratch);
    Ok(())
}

fn measure_memory_once(
    vdsync: &Vdsync,
    repository_url: &str,
    scratch_root: &Path,
    logs: &Path,
    repetition: usize,
) -> Result<MemoryRun> {
    let tree = scratch_root.join(format!("tree-{repetition}"));
    let state = scratch_root.join(format!("tracker-state-{repetition}"));
    std::fs::create_dir_all(&tree).with_context(|| format!("cannot create {}", tree.display()))?;
    // The directories exist before the tracker starts: it has the kernel ignore the
    // entries of directories created while it runs (their names would be one
    // `Subtree` mark each), and the journal is to hold the million names.
    for directory in memory_directories(&tree) {
        std::fs::create_dir(&directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    // The tracker only, so it can be stopped before the deletion below.
    let mut processes = BackgroundProcesses::default();

    narrate(format_args!(
        "run {repetition}: vdsync track --root tree-{repetition}/, then one push to clear the start-up rescan"
    ));
    let tracker = start_tracker(
        vdsync,
        &tree,
        &state,
        &logs.join(format!("tracker-{repetition}.log")),
        &mut processes,
    )?;
    println!("    {}", tracker.ready_line);
    let first_push = parse_push_report(&run_checked(&mut push_command(
        vdsync,
        repository_url,
        &tree,
        &state,
        "benchmark: clear the start-up rescan",
    ))?)?;
    println!("    push: {}", first_push.source);
    let after_start = ProcessMemory::read(tracker.process_id)?;
    println!("    tracker: {}", after_start.describe());

    narrate(format_args!(
        "creating {} names in the {MEMORY_DIRECTORIES} directories under the tracked tree (per directory: one empty file and hard links to it)",
        MEMORY_DIRECTORIES * MEMORY_NAMES_PER_DIRECTORY
    ));
    let started = Instant::now();
    let creation_started_at = SystemTime::now();
    create_names(&tree, |names| {
        println!("    {names} names after {}", seconds(started.elapsed()));
    })?;
    let creation = started.elapsed();

    narrate(format_args!(
        "waiting until the journal has not changed for {} s (the tracker has read every event)",
        JOURNAL_QUIET_PERIOD.as_secs()
    ));
    let last_batch = wait_for_journal_to_settle(&tracker, &mut processes)?;
    let caught_up = last_batch
        .duration_since(creation_started_at)
        .unwrap_or_default();
    let journal_bytes = std::fs::metadata(&tracker.journal_path)
        .with_context(|| format!("cannot stat {}", tracker.journal_path.display()))?
        .len();
    let after_journalling = ProcessMemory::read(tracker.process_id)?;
    println!(
        "    created in {}, last journal batch {} after the first file; journal file {}",
        seconds(creation),
        seconds(caught_up),
        mebibytes(journal_bytes)
    );
    println!("    tracker: {}", after_journalling.describe());

    narrate(format_args!(
        "vdsync status --json (fences and reads the journal; its output is discarded but for the source; at most {} s)",
        STATUS_TIMEOUT.as_secs()
    ));
    let status_outcome = run_status(
        vdsync,
        &tree,
        &state,
        &logs.join(format!("status-{repetition}.err")),
    )?;
    let status = match status_outcome {
        Some((duration, source)) => {
            let memory = ProcessMemory::read(tracker.process_id)?;
            println!("    done in {}; source: {source}", seconds(duration));
            println!("    tracker: {}", memory.describe());
            Some(StatusOutcome { source, memory })
        }
        None => {
            println!(
                "    status did not finish within {} s and was stopped; the figures come from the settled journal alone",
                STATUS_TIMEOUT.as_secs()
            );
            None
        }
    };

    narrate("stopping the tracker and deleting the million names");
    processes.stop_all();
    let started = Instant::now();
    std::fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    println!("    deleted in {}", seconds(started.elapsed()));
    std::fs::remove_dir_all(&state)
        .with_context(|| format!("cannot remove {}", state.display()))?;

    Ok(MemoryRun {
        after_start,
        after_journalling,
        status,
    })
}

/// The [`MEMORY_DIRECTORIES`] directories `dir-NNN` under `tree`.
fn memory_directories(tree: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    (0..MEMORY_DIRECTORIES).map(|index| tree.join(format!("dir-{index:03}")))
}

/// Fills each of the (existing) [`memory_directories`] with
/// [`MEMORY_NAMES_PER_DIRECTORY`] names `name-NNNN`: an empty file and hard links to
/// it. Calls `progress` with the count so far at every fifth of the way.
///
/// Why links and not new files: creating an inode on this machine's ext4 costs
/// 0.1-1 ms and swings (measured at 725-946 µs per empty file at one time, against
/// 20 µs per hard link), so a million `touch`es could take a quarter of an hour. The
/// tracker records names, not inodes, and a new link raises the same fanotify event
/// as a new file (FAN_CREATE: directory handle and name), so it journals the same
/// million paths either way. One file per directory keeps each inode far below
/// ext4's limit of 65,000 links.
fn create_names(tree: &Path, mut progress: impl FnMut(usize)) -> Result<()> {
    let total = MEMORY_DIRECTORIES * MEMORY_NAMES_PER_DIRECTORY;
    let report_every = total / 5;
    let mut created = 0usize;
    for directory in memory_directories(tree) {
        let first_name = directory.join("name-0000");
        for name_index in 0..MEMORY_NAMES_PER_DIRECTORY {
            let name = directory.join(format!("name-{name_index:04}"));
            let created_name = if name_index == 0 {
                File::create(&name).map(drop)
            } else {
                std::fs::hard_link(&first_name, &name)
            };
            created_name.with_context(|| format!("cannot create {}", name.display()))?;
            created += 1;
            if created.is_multiple_of(report_every) {
                progress(created);
            }
        }
    }
    Ok(())
}

/// Runs `vdsync status --json` and returns how long it took and its "source" (how
/// many journalled paths it looked at), or `None` if it did not finish within
/// [`STATUS_TIMEOUT`]. Its output for a million paths runs to a hundred megabytes, so
/// only the part before the list of changes is kept; the rest is read and dropped.
fn run_status(
    vdsync: &Vdsync,
    root: &Path,
    state: &Path,
    standard_error_path: &Path,
) -> Result<Option<(Duration, String)>> {
    let mut command = vdsync.command(["status", "--json"]);
    command
        .arg("--root")
        .arg(root)
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            File::create(standard_error_path)
                .with_context(|| format!("cannot create {}", standard_error_path.display()))?,
        );
    let description = describe_command(&command);
    let started = Instant::now();
    let mut status_process = GroupChild::spawn(&mut command);
    let standard_output = status_process
        .child
        .stdout
        .take()
        .context("the output of `vdsync status` was not captured")?;
    let reader = std::thread::spawn(move || read_status_head(standard_output));
    loop {
        if let Some(exit) = status_process
            .child
            .try_wait()
            .context("cannot check on `vdsync status`")?
        {
            let duration = started.elapsed();
            if !exit.success() {
                bail!(
                    "`{description}` failed ({exit}): {}",
                    log_tail(standard_error_path)
                );
            }
            let head = reader
                .join()
                .map_err(|_| anyhow::anyhow!("the thread reading `vdsync status` panicked"))??;
            return Ok(Some((duration, describe_status_source(&head))));
        }
        if started.elapsed() > STATUS_TIMEOUT {
            // Dropping the process kills its group; the reader then sees end of file.
            drop(status_process);
            let _ = reader.join();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `vdsync status --json` output, keeping the text before `"changes"` (the
/// report's last field) and dropping the rest.
fn read_status_head(output: impl Read) -> Result<String> {
    let mut reader = BufReader::new(output);
    let mut head = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .context("cannot read the output of `vdsync status`")?
            == 0
        {
            return Ok(head);
        }
        if line.trim_start().starts_with("\"changes\"") {
            break;
        }
        head.push_str(&line);
    }
    std::io::copy(&mut reader, &mut std::io::sink())
        .context("cannot read the output of `vdsync status`")?;
    Ok(head)
}

/// "journal, N path(s)" or "full scan: WHY" from the head of `status --json`.
fn describe_status_source(head: &str) -> String {
    // The head ends just before the "changes" field; closing it makes it whole JSON.
    let whole = format!("{}\"changes\": []}}", head.trim_end());
    let source = serde_json::from_str::<serde_json::Value>(&whole)
        .ok()
        .and_then(|report| report.get("source").cloned());
    let field = |name: &str| source.as_ref().and_then(|source| source.get(name)).cloned();
    match field("mode").as_ref().and_then(serde_json::Value::as_str) {
        Some("journal") => format!(
            "journal, {} path(s)",
            field("paths").map_or_else(|| "?".to_owned(), |paths| paths.to_string())
        ),
        Some("full_scan") => format!(
            "full scan: {}",
            field("reason")
                .as_ref()
                .and_then(serde_json::Value::as_str)
                .unwrap_or("no reason given")
        ),
        _ => format!(
            "unrecognised ({:?})",
            head.chars().take(200).collect::<String>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_lines_are_read_from_proc_status() {
        let status = "Name:\tvdsync\nVmHWM:\t   70000 kB\nVmRSS:\t   30000 kB\nRssAnon:\t   25000 kB\nRssFile:\t    5000 kB\n";
        let memory = ProcessMemory::parse(status).unwrap();
        assert_eq!(memory.peak_resident, 70_000 * 1024);
        assert_eq!(memory.resident, 30_000 * 1024);
        assert_eq!(memory.anonymous, 25_000 * 1024);
        assert_eq!(memory.file_backed, 5_000 * 1024);
        assert!(ProcessMemory::parse("Name:\tvdsync\n").is_none());
        let own = ProcessMemory::read(std::process::id()).unwrap();
        assert!(own.peak_resident >= own.resident && own.resident > 0);
    }

    #[test]
    fn cpu_times_are_read_after_the_command_name() {
        // Fields 14-17 are 250, 50, 30 and 20 ticks; the name holds a space and a ')'.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 1 0 5 0 0";
        let times = CpuTimes::parse(stat).unwrap();
        assert_eq!(times.own, Duration::from_secs(3));
        assert_eq!(times.reaped_children, Duration::from_millis(500));
        assert!(CpuTimes::parse("42 (short) S 1").is_none());
        assert!(CpuTimes::read("self").is_ok());
    }

    #[test]
    fn status_head_keeps_the_source_and_drops_the_changes() {
        let output = "{\n  \"tracker_running\": true,\n  \"pushed_version\": 0,\n  \"source\": {\n    \"mode\": \"journal\",\n    \"paths\": 1001000\n  },\n  \"changes\": [\n    {\n      \"path\": \"dir-000\"\n    }\n  ]\n}\n";
        let head = read_status_head(output.as_bytes()).unwrap();
        assert!(!head.contains("dir-000"));
        assert_eq!(describe_status_source(&head), "journal, 1001000 path(s)");
        let scan = "{\n  \"source\": {\n    \"mode\": \"full_scan\",\n    \"reason\": \"the kernel's event queue overflowed\"\n  },\n  \"changes\": []\n}\n";
        assert_eq!(
            describe_status_source(&read_status_head(scan.as_bytes()).unwrap()),
            "full scan: the kernel's event queue overflowed"
        );
    }

    #[test]
    fn changed_content_differs_between_runs() {
        let mut random = Xorshift64::seeded(7);
        let first = changed_content(1, &mut random);
        let second = changed_content(2, &mut random);
        assert_ne!(first, second);
        assert!((100..=400).contains(&first.len()), "{}", first.len());
    }
}
