//! The agent's loop: register, finish any interrupted apply, then apply every
//! version from the tree's own up to the repository's head, in order, reporting
//! each outcome. Waiting for new versions is a long-poll on the repository, not a
//! busy loop.
//!
//! Each version goes: stage (fetch everything; the tree and the processes are
//! untouched) → plan (which processes need what, from /proc and the open log) →
//! stop → commit (journal, roll forward) → start, reload, commands. Processes are
//! down only while the version is placed, never while it downloads.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use vdsync_client::Client;
use vdsync_proto::display::error_chain;
use vdsync_proto::wire::{Hello, Outcome, OutcomeStatus};
use vdsync_proto::Changeset;
use vdsync_sys::process::{FileId, Incarnation, ProcessFiles};

use crate::openlog::OpenLog;
use crate::plan::{Inputs, Plan, UpdatedFile};
use crate::processes::{ProcessOptions, Processes};
use crate::rules::{Action, Rules};
use crate::{Applied, Applier, ApplyError};

pub struct FollowOptions<'a> {
    pub root: &'a Path,
    pub state_dir: &'a Path,
    pub name: &'a str,
    /// Catch up once and return instead of following forever.
    pub once: bool,
    /// How long one long-poll waits at the repository.
    pub poll_wait: Duration,
    /// Pause after a failed version before trying it again.
    pub retry_after: Duration,
    pub rules: &'a Rules,
    pub processes: ProcessOptions,
    /// The open log, when the agent runs one (it needs CAP_SYS_ADMIN).
    pub open_log: Option<&'a OpenLog>,
    /// Held while a version is recovered, applied and reported, and its processes
    /// started again: whoever takes it knows no version is half done. The agent's
    /// signal handler takes it before exiting.
    pub busy: Option<&'a std::sync::Mutex<()>>,
}

/// Holds `busy`, if there is one, until dropped.
fn hold(busy: Option<&std::sync::Mutex<()>>) -> Option<std::sync::MutexGuard<'_, ()>> {
    busy.map(|busy| busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

#[derive(Debug, Default)]
pub struct FollowSummary {
    pub version: Option<u64>,
    pub applied: Vec<Applied>,
}

fn outcome_of(applied: &Applied) -> Outcome {
    let failed = applied
        .processes
        .iter()
        .any(|process| process.action == vdsync_proto::wire::ProcessAction::Failed);
    Outcome {
        version: applied.version,
        status: OutcomeStatus::Applied,
        files: applied.files,
        removed: applied.removed,
        bytes_fetched: applied.bytes_fetched,
        duration_ms: applied.duration_ms,
        recovered: applied.recovered,
        warnings: applied.warnings.clone(),
        error: failed.then(|| "some process actions failed; see processes".to_string()),
        processes: applied.processes.clone(),
    }
}

pub fn follow(client: &Client, options: &FollowOptions<'_>) -> Result<FollowSummary, ApplyError> {
    let recovering = hold(options.busy);
    let applier = Applier::open(options.root, options.state_dir)?;
    let processes = Processes::new(options.state_dir, options.processes, options.open_log);
    let mut summary = FollowSummary::default();
    let recovered_tree = applier.recover()?;
    // Processes stopped for a version interrupted by a crash are started again
    // whether or not the tree got that version.
    let recovered_processes = processes.recover(&|path| applier.file_at(path))?;
    if let Some(mut recovered) = recovered_tree {
        tracing::info!(
            version = recovered.version,
            "finished a version interrupted by a crash"
        );
        if let Some((_, outcomes)) = recovered_processes {
            recovered.processes = outcomes;
        }
        report(client, options.name, &outcome_of(&recovered));
        summary.applied.push(recovered);
    } else if let Some((version, outcomes)) = recovered_processes {
        tracing::info!(
            version,
            processes = outcomes.len(),
            "started again the processes an interrupted version had stopped"
        );
    }
    if let Some(log) = options.open_log {
        // One full read of /proc now, so that the first version's plan reads only
        // what changed since.
        log.processes(&HashSet::new(), &HashSet::new(), true);
    }
    drop(recovering);
    let mut current = applier.current_version()?;
    make_spares(&applier);
    client.hello(options.name, &Hello { version: current })?;
    // `--once` catches up to the head as it is now; otherwise the next version's
    // bundle is asked for and arrives the moment the version is committed (one
    // request per version, no separate wait for the head).
    let once_head = if options.once { client.head()? } else { None };
    loop {
        let version = current.map_or(0, |v| v + 1);
        let bundle = if options.once {
            if once_head.is_none_or(|head| head < version) {
                summary.version = current;
                return Ok(summary);
            }
            client
                .bundle(version, BUNDLE_BYTES)
                .map_err(ApplyError::from)
        } else {
            match client.wait_bundle(version, BUNDLE_BYTES, options.poll_wait) {
                Ok(Some(bundle)) => Ok(bundle),
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "repository unreachable; retrying");
                    std::thread::sleep(options.retry_after);
                    continue;
                }
            }
        };
        let applying = hold(options.busy);
        match bundle.and_then(|bundle| {
            apply_one(
                client, &applier, &processes, options, version, current, bundle,
            )
        }) {
            Ok(applied) => {
                tracing::info!(
                    version,
                    files = applied.files,
                    removed = applied.removed,
                    processes = applied.processes.len(),
                    ms = applied.duration_ms,
                    "applied"
                );
                report(client, options.name, &outcome_of(&applied));
                summary.applied.push(applied);
                current = Some(version);
                make_spares(&applier);
            }
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!(version, error = %message, "version failed to apply");
                report(
                    client,
                    options.name,
                    &Outcome {
                        version,
                        status: OutcomeStatus::Failed,
                        files: 0,
                        removed: 0,
                        bytes_fetched: 0,
                        duration_ms: 0,
                        recovered: false,
                        warnings: Vec::new(),
                        error: Some(message),
                        processes: Vec::new(),
                    },
                );
                if options.once {
                    return Err(err);
                }
                // A stop need not wait out the pause.
                drop(applying);
                std::thread::sleep(options.retry_after);
            }
        }
    }
}

/// Readies the next version's staging files; a failure only costs that version
/// a few file creations, so it is logged, not raised.
fn make_spares(applier: &Applier) {
    if let Err(err) = applier.make_spares() {
        tracing::warn!(error = %error_chain(&err), "cannot ready the staging files");
    }
}

/// Content of a version's blobs fetched with its changeset, when they add up to
/// at most this: a small version then costs one request.
const BUNDLE_BYTES: u64 = 64 * 1024;

fn fetch_changeset(
    client: &Client,
    version: u64,
    current: Option<u64>,
) -> Result<Changeset, ApplyError> {
    let changeset = client.changeset(version)?;
    check_parent(&changeset, version, current)?;
    Ok(changeset)
}

fn check_parent(
    changeset: &Changeset,
    version: u64,
    current: Option<u64>,
) -> Result<(), ApplyError> {
    if changeset.parent != current {
        return Err(ApplyError::WrongParent {
            version,
            expected: changeset.parent,
            actual: current,
        });
    }
    Ok(())
}

/// Applies `version`, whose changeset and small blobs came in `bundle`.
fn apply_one(
    client: &Client,
    applier: &Applier,
    processes: &Processes<'_>,
    options: &FollowOptions<'_>,
    version: u64,
    current: Option<u64>,
    bundle: vdsync_client::Bundle,
) -> Result<Applied, ApplyError> {
    let vdsync_client::Bundle { changeset, blobs } = bundle;
    check_parent(&changeset, version, current)?;
    let source = crate::Prefetched {
        blobs,
        rest: client,
    };
    // The plan is made while the version downloads and stages: reading every
    // process in /proc takes milliseconds that would otherwise be added to every
    // version. It is taken a moment before the stop; a process started in that
    // moment is still seen through the open log.
    let (prepared, plan) = std::thread::scope(|scope| {
        let planner = scope.spawn(|| {
            let planning = std::time::Instant::now();
            let updated = applier.updated_files(&changeset);
            let plan = make_plan(&updated, options.rules, options.open_log);
            tracing::debug!(
                version,
                ms = planning.elapsed().as_secs_f64() * 1000.0,
                restarts = plan.restarts.len(),
                reloads = plan.reloads.len(),
                "planned process handling"
            );
            plan
        });
        let staging = std::time::Instant::now();
        let prepared = applier.prepare(version, &changeset, &source);
        tracing::debug!(
            version,
            ms = staging.elapsed().as_secs_f64() * 1000.0,
            "staged"
        );
        (prepared, planner.join())
    });
    let prepared = prepared?;
    let plan = plan.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let pending = processes.stop(version, &plan)?;
    let committed = applier.commit(prepared);
    tracing::debug!(version, "committed");
    // Whatever happened to the tree, what was stopped is started again.
    let outcomes = processes.finish(pending, &|path| applier.file_at(path))?;
    let mut applied = committed?;
    applied.processes = outcomes;
    applied.warnings.extend(plan.notes);
    Ok(applied)
}

/// Plans the process handling of `updated`. Reads /proc only when some file
/// replaces one that exists or a rule names processes or commands.
pub fn make_plan(updated: &[UpdatedFile], rules: &Rules, open_log: Option<&OpenLog>) -> Plan {
    let ruled = updated.iter().any(|file| {
        rules.matching(&file.path).is_some_and(|rule| {
            rule.action == Action::Exec || (rule.process.is_some() && rule.action != Action::None)
        })
    });
    if !ruled && updated.iter().all(|file| file.current.is_none()) {
        return Plan {
            files: Vec::new(),
            ..Plan::default()
        };
    }
    let wanted: HashMap<FileId, Incarnation> = updated
        .iter()
        .filter_map(|file| Some((file.current?, file.incarnation)))
        .collect();
    let (snapshot, opened_before) = match open_log {
        None => (snapshot_processes(), HashMap::new()),
        Some(log) => {
            // Processes that opened the files are read afresh (their signal
            // handling decides reload or restart), and so is everything when a
            // rule names processes; then the openers are asked again, since the
            // read caught up with the kernel's queue.
            let openers: HashSet<i32> = log
                .opened_before(&wanted)
                .values()
                .flatten()
                .map(|key| key.pid)
                .collect();
            let files: HashSet<FileId> = wanted.keys().copied().collect();
            let snapshot = log.processes(&files, &openers, ruled);
            (snapshot, log.opened_before(&wanted))
        }
    };
    let mut plan = crate::plan::plan(&Inputs {
        files: updated,
        processes: &snapshot,
        opened_before: &opened_before,
        rules,
        untouchable: &untouchable(),
        systemd: vdsync_sys::process::systemd_is_init(),
    });
    match open_log {
        None => plan.notes.push(
            "no open log: files that processes only opened before are not considered".to_string(),
        ),
        Some(log) => {
            if let Some(why) = log.incomplete() {
                plan.notes
                    .push(format!("the open log may be missing opens: {why}"));
            }
        }
    }
    plan
}

/// Every process /proc shows now; ones that exit while being read are left out.
fn snapshot_processes() -> Vec<ProcessFiles> {
    let pids = vdsync_sys::process::list_pids().unwrap_or_default();
    pids.into_iter()
        .filter_map(|pid| vdsync_sys::process::process_files(pid).ok())
        .collect()
}

/// The agent and its ancestors: never stopped by the agent.
fn untouchable() -> HashSet<i32> {
    let mut pids = HashSet::new();
    let mut current = std::process::id() as i32;
    while current > 1 && pids.insert(current) {
        match vdsync_sys::process::parent_of(current) {
            Ok(parent) => current = parent,
            Err(_) => break,
        }
    }
    pids
}

/// The plans for every version from the tree's own to the head, computed against
/// the tree as it is now, touching nothing (`agent --once --plan`).
pub fn plan_pending(
    client: &Client,
    root: &Path,
    state_dir: &Path,
    rules: &Rules,
) -> Result<Vec<(u64, Plan)>, ApplyError> {
    let applier = Applier::open_read_only(root, state_dir)?;
    let mut current = applier.current_version()?;
    let head = client.head()?;
    let mut plans = Vec::new();
    while head.is_some() && current < head {
        let version = current.map_or(0, |v| v + 1);
        let changeset = fetch_changeset(client, version, current)?;
        let updated = applier.updated_files(&changeset);
        plans.push((version, make_plan(&updated, rules, None)));
        current = Some(version);
    }
    Ok(plans)
}

/// Reports are best effort: a repository that cannot take one now does not undo
/// the version, and the next hello tells it where this machine is.
fn report(client: &Client, name: &str, outcome: &Outcome) {
    if let Err(err) = client.report(name, outcome) {
        tracing::warn!(error = %error_chain(&err), "could not report the outcome");
    }
}
