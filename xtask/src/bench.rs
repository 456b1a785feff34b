//! `cargo xtask bench spine`: the push → repository → apply spine against `rsync -a`,
//! its natural peer, measured in the same run on the same file system (SPEC §6:
//! "printing the figure and its peer's figure from the same run").
//!
//! Two workloads: 10,000 small files (many round trips, metadata-bound) and one 1 GiB
//! file (streaming-bound). For each, three repetitions, each with a fresh repository, a
//! fresh agent and a fresh rsync destination; the medians are printed. Both sides are
//! checked against the source after every run, since a fast wrong copy is no result.
//!
//! What is timed, with `Instant` around the subprocesses:
//! - vdsync: `push --rescan` of the whole source (a fresh push state, so every file is
//!   read and hashed) into a repository initialized from an empty tree, then
//!   `agent --once` on a root already at version 0, so it applies exactly version 1.
//! - rsync: `rsync -a SRC/ DST/` into an empty destination, and separately the `sync`
//!   that follows it.
//!
//! vdsync makes every version durable (the repository syncs before acknowledging,
//! the agent syncs before and after placing files), rsync leaves its copy in the page
//! cache. So the table shows both `rsync -a` alone and `rsync -a; sync`, the cost of
//! an rsync copy that survives a power cut.
//!
//! This module also dispatches `cargo xtask bench NAME`; the change tracker's three
//! benchmarks live in `bench_tracker.rs`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{
    check_copy, find_on_path, initialize_repository, load_average, machine_summary, median_by,
    narrate, parse_push_report, parse_repetitions, push_command, ratio_text, run_checked, seconds,
    start_repository_server, sync_file_systems, with_trailing_slash, BackgroundProcesses,
    SmallFileTree, Vdsync, Xorshift64,
};

/// Three runs give a median that one slow outlier (a page-cache eviction, a build next
/// door) cannot move, while keeping the whole benchmark under five minutes on two cores.
/// `--repetitions N` buys steadier medians on a busy machine.
const DEFAULT_REPETITIONS: usize = 3;

/// 10,000 files of 1-4 KiB, 100 per directory, each with its own pseudo-random content.
const SMALL_FILES: SmallFileTree = SmallFileTree {
    directories: 100,
    files_per_directory: 100,
    minimum_bytes: 1024,
    maximum_bytes: 4096,
    seed: 2024,
};

const LARGE_FILE_BYTES: u64 = 1 << 30;
const GENERATION_BUFFER_BYTES: usize = 1 << 20;

/// One workload: how its source tree is made, and what the table calls it.
struct Workload {
    table_name: &'static str,
    generate_source: fn(&Path) -> Result<String>,
}

/// One repetition's timings.
#[derive(Clone, Copy)]
struct Measurement {
    push: Duration,
    apply: Duration,
    rsync: Duration,
    /// `rsync -a` plus the `sync` that makes its copy durable.
    rsync_then_sync: Duration,
}

impl Measurement {
    fn push_and_apply(&self) -> Duration {
        self.push + self.apply
    }
}

/// The medians of one workload's repetitions, each median taken on its own column.
struct WorkloadResult {
    table_name: &'static str,
    push: Duration,
    apply: Duration,
    push_and_apply: Duration,
    rsync: Duration,
    rsync_then_sync: Duration,
}

const AVAILABLE: &str =
    "spine, one-change, tracker-overhead, tracker-memory, nginx-reload, redis-update";

pub fn run(arguments: &[String]) -> Result<()> {
    let Some((name, options)) = arguments.split_first() else {
        bail!("missing benchmark name; available: {AVAILABLE}");
    };
    let usage = format!("cargo xtask bench {name} [--repetitions N]");
    match name.as_str() {
        "spine" => spine(parse_repetitions(options, DEFAULT_REPETITIONS, &usage)?),
        "one-change" => crate::bench_tracker::one_change(parse_repetitions(
            options,
            crate::bench_tracker::ONE_CHANGE_REPETITIONS,
            &usage,
        )?),
        "tracker-overhead" => crate::bench_tracker::tracker_overhead(parse_repetitions(
            options,
            crate::bench_tracker::TRACKER_OVERHEAD_REPETITIONS,
            &usage,
        )?),
        "tracker-memory" => crate::bench_tracker::tracker_memory(parse_repetitions(
            options,
            crate::bench_tracker::TRACKER_MEMORY_REPETITIONS,
            &usage,
        )?),
        "nginx-reload" => crate::bench_processes::nginx_reload(parse_repetitions(
            options,
            crate::bench_processes::NGINX_PUSHES,
            &usage,
        )?),
        "redis-update" => crate::bench_processes::redis_update(parse_repetitions(
            options,
            crate::bench_processes::REDIS_REPETITIONS,
            &usage,
        )?),
        _ => bail!("unknown benchmark {name:?}; available: {AVAILABLE}"),
    }
}

fn spine(repetitions: usize) -> Result<()> {
    // Checked first, so a missing peer costs nothing: without it there is no comparison.
    if find_on_path("rsync").is_none() {
        bail!("rsync not found: apt-get install -y rsync");
    }
    let vdsync = crate::harness::build_release()?;
    // Everything (source, repository, agent root, rsync destination) lives under one
    // directory, hence on one file system, so both tools write to the same device.
    let scratch = crate::harness::scratch_directory("bench-spine")?;
    narrate(format_args!(
        "working in {} ({repetitions} repetitions per workload, `sync` before each timed run)",
        scratch.path().display()
    ));

    let workloads = [
        Workload {
            table_name: "10,000 small files",
            generate_source: |source| SMALL_FILES.generate(source, |_| {}),
        },
        Workload {
            table_name: "1 GiB file",
            generate_source: generate_large_file,
        },
    ];
    let load_before = load_average();
    let mut results = Vec::new();
    for workload in &workloads {
        results.push(measure_workload(
            &vdsync,
            scratch.path(),
            workload,
            repetitions,
        )?);
    }

    println!();
    print!("{}", format_tables(&results, repetitions));
    println!("{}", machine_summary(&load_before));
    drop(scratch);
    Ok(())
}

fn measure_workload(
    vdsync: &Vdsync,
    scratch_root: &Path,
    workload: &Workload,
    repetitions: usize,
) -> Result<WorkloadResult> {
    let source = scratch_root.join("source");
    narrate(format_args!(
        "{}: generating the source tree",
        workload.table_name
    ));
    let generation_started = Instant::now();
    let description = (workload.generate_source)(&source)?;
    println!(
        "    {description} in {}",
        seconds(generation_started.elapsed())
    );

    let mut measurements = Vec::new();
    for repetition in 1..=repetitions {
        let measurement = measure_once(vdsync, scratch_root, &source)
            .with_context(|| format!("{}: repetition {repetition} failed", workload.table_name))?;
        println!(
            "    run {repetition}/{repetitions}: push {}  apply {}  push+apply {}  rsync -a {}  rsync -a; sync {}",
            seconds(measurement.push),
            seconds(measurement.apply),
            seconds(measurement.push_and_apply()),
            seconds(measurement.rsync),
            seconds(measurement.rsync_then_sync)
        );
        measurements.push(measurement);
    }
    std::fs::remove_dir_all(&source)
        .with_context(|| format!("cannot remove {}", source.display()))?;

    let column = |select: fn(&Measurement) -> Duration| median_by(&measurements, select);
    Ok(WorkloadResult {
        table_name: workload.table_name,
        push: column(|measurement| measurement.push)?,
        apply: column(|measurement| measurement.apply)?,
        push_and_apply: column(Measurement::push_and_apply)?,
        rsync: column(|measurement| measurement.rsync)?,
        rsync_then_sync: column(|measurement| measurement.rsync_then_sync)?,
    })
}

/// One repetition from scratch: a repository initialized from an empty tree, an agent
/// brought to version 0 (untimed), then the timed push and apply, then the timed rsync.
fn measure_once(vdsync: &Vdsync, scratch_root: &Path, source: &Path) -> Result<Measurement> {
    let run_directory = scratch_root.join("run");
    let empty_tree = run_directory.join("empty-tree");
    let repository_data = run_directory.join("repository");
    let push_state = run_directory.join("push-state");
    let agent_root = run_directory.join("agent-root");
    let agent_state = run_directory.join("agent-state");
    let rsync_destination = run_directory.join("rsync-destination");
    for directory in [&empty_tree, &agent_root, &rsync_destination] {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }

    initialize_repository(vdsync, &repository_data, &empty_tree)?;
    let mut processes = BackgroundProcesses::default();
    let repository_url = start_repository_server(
        vdsync,
        &repository_data,
        &run_directory.join("repository.log"),
        &mut processes,
    )?;
    let agent_command = || {
        let mut command = vdsync.command([
            "agent",
            "--once",
            "--name",
            "bench",
            "--repo",
            &repository_url,
        ]);
        command
            .arg("--root")
            .arg(&agent_root)
            .arg("--state")
            .arg(&agent_state);
        command
    };
    // Version 0 is the empty tree: this leaves the agent where a running machine would
    // be, with state and a known version, so the timed apply is exactly one version.
    run_checked(&mut agent_command())?;

    sync_file_systems()?;
    let push_started = Instant::now();
    let push_output = run_checked(
        push_command(vdsync, &repository_url, source, &push_state, "benchmark").arg("--rescan"),
    )?;
    let push = push_started.elapsed();
    let apply_started = Instant::now();
    run_checked(&mut agent_command())?;
    let apply = apply_started.elapsed();
    if parse_push_report(&push_output)?.version != Some(1) {
        bail!(
            "expected the push to make version 1, it printed {}",
            push_output.trim()
        );
    }
    // The repository is idle from here on, but stop it anyway so nothing of vdsync's
    // runs while rsync is timed.
    processes.stop_all();
    check_copy(source, &agent_root, "the agent's root")?;

    sync_file_systems()?;
    let rsync_started = Instant::now();
    // The trailing slashes copy the contents of SRC into DST rather than SRC itself.
    run_checked(
        Command::new("rsync")
            .arg("-a")
            .arg(with_trailing_slash(source))
            .arg(with_trailing_slash(&rsync_destination)),
    )?;
    let rsync = rsync_started.elapsed();
    sync_file_systems()?;
    let rsync_then_sync = rsync_started.elapsed();
    check_copy(source, &rsync_destination, "the rsync destination")?;

    // Removed now, not at the end: three 1 GiB copies per run would otherwise pile up.
    std::fs::remove_dir_all(&run_directory)
        .with_context(|| format!("cannot remove {}", run_directory.display()))?;
    Ok(Measurement {
        push,
        apply,
        rsync,
        rsync_then_sync,
    })
}

/// One 1 GiB file of pseudo-random bytes, written in 1 MiB pieces.
fn generate_large_file(source: &Path) -> Result<String> {
    std::fs::create_dir_all(source)
        .with_context(|| format!("cannot create {}", source.display()))?;
    let path = source.join("large.bin");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = BufWriter::with_capacity(GENERATION_BUFFER_BYTES, file);
    let mut random = Xorshift64::seeded(1);
    let mut buffer = vec![0; GENERATION_BUFFER_BYTES];
    let mut written = 0;
    while written < LARGE_FILE_BYTES {
        random.fill(&mut buffer);
        writer
            .write_all(&buffer)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += GENERATION_BUFFER_BYTES as u64;
    }
    writer
        .into_inner()
        .map_err(|error| error.into_error())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(format!("1 file of {} MiB", LARGE_FILE_BYTES >> 20))
}

fn format_tables(results: &[WorkloadResult], repetitions: usize) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail, so the results of writeln! are ignored.
    let _ = writeln!(
        text,
        "spine benchmark: medians of {repetitions} runs, same file system, same run"
    );
    let _ = writeln!(
        text,
        "{:<20}{:>19}{:>11}{:>17}   ratio to rsync -a / to rsync -a; sync",
        "workload", "vdsync push+apply", "rsync -a", "rsync -a; sync"
    );
    for result in results {
        let _ = writeln!(
            text,
            "{:<20}{:>19}{:>11}{:>17}   {} / {}",
            result.table_name,
            seconds(result.push_and_apply),
            seconds(result.rsync),
            seconds(result.rsync_then_sync),
            ratio_text(result.push_and_apply, result.rsync),
            ratio_text(result.push_and_apply, result.rsync_then_sync)
        );
    }
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "{:<20}{:>19}{:>11}",
        "split (medians)", "push", "apply"
    );
    for result in results {
        let _ = writeln!(
            text,
            "{:<20}{:>19}{:>11}",
            result.table_name,
            seconds(result.push),
            seconds(result.apply)
        );
    }
    text
}
