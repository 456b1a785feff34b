//! `cargo xtask`: vdsync's development tasks, run through the alias in
//! `.cargo/config.toml` so the README's commands stay short.
//!
//! - `cargo xtask demo`: a repository, two agents and one push, narrated step by step.
//! - `cargo xtask bench spine`: push + apply against `rsync -a`, same run, same disk.
//! - `cargo xtask bench one-change | tracker-overhead | tracker-memory`: the change
//!   tracker's benchmarks (one change pushed and applied against an incremental
//!   `rsync -a`; `tar -xf` without a tracker, with the tracker, and with a bare fanotify
//!   reader that shows the kernel's part; the tracker's memory with a
//!   million journalled paths).
//! - `cargo xtask bench nginx-reload | redis-update`: process-aware apply under real
//!   daemons (a config push under load; a binary update).
//!
//! This crate drives the release binary as a subprocess and depends on nothing of the
//! product's; it is not shipped.

mod bench;
mod bench_processes;
mod bench_tracker;
mod demo;
mod harness;

use std::process::ExitCode;

use anyhow::{bail, Result};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo          build vdsync, start a repository and two agents, push a change, show it arrive
  bench spine [--repetitions N]
                measure push + apply against rsync -a (10,000 small files, one 1 GiB file)
  bench one-change [--repetitions N]
                one file changed in 100,000: tracked push until an agent has it, against
                an incremental rsync -a of the same change (target: 100x faster)
  bench tracker-overhead [--repetitions N]
                tar -xf of 50,000 files with nothing watching, with vdsync track, and with
                fanotify_floor, the kernel's part of any tracker (target: 5%)
  bench tracker-memory [--repetitions N]
                the tracker's peak and resident memory with 1,000,000 journalled paths
                (target: 64 MiB)
  bench nginx-reload [--repetitions N]
                nginx under wrk load while its configuration is pushed N times (target: 0
                failed requests), beside stop/replace/start by hand
  bench redis-update [--repetitions N]
                a new redis-server build pushed: acknowledgement until PING answers again,
                beside the paper's 5.878 s";

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            // Asking for help succeeds; giving no task at all is a usage error.
            return if arguments.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        _ => {}
    }
    match run(&arguments) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(arguments: &[String]) -> Result<()> {
    match arguments {
        [task] if task == "demo" => demo::run(),
        [task, rest @ ..] if task == "bench" => bench::run(rest),
        [task, ..] if task == "demo" => bail!("`demo` takes no arguments\n{USAGE}"),
        [task, ..] => bail!("unknown task {task:?}\n{USAGE}"),
        [] => bail!("no task given\n{USAGE}"),
    }
}
