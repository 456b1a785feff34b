//! What the commands print: tables for people, JSON for programs.

use anyhow::Result;
use vdsync_proto::wire::{AgentInfo, OutcomeStatus, VersionInfo};
use vdsync_proto::EntryKind;
use vdsync_track::changes::Source;
use vdsync_track::status::{Change, StatusReport};
use vdsync_track::PushReport;

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn time(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
    )
    .to_string()
}

pub fn print_log(versions: &[VersionInfo], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(versions)?);
        return Ok(());
    }
    if versions.is_empty() {
        println!("no versions yet");
        return Ok(());
    }
    println!(
        "{:>7}  {:<20}  {:>7}  {:>7}  {:>10}  MESSAGE",
        "VERSION", "TIME", "FILES", "DELETED", "SIZE"
    );
    for version in versions.iter().rev() {
        println!(
            "{:>7}  {:<20}  {:>7}  {:>7}  {:>10}  {}",
            version.version,
            time(version.time),
            version.files,
            version.deleted,
            human_bytes(version.bytes),
            version.message
        );
    }
    Ok(())
}

pub fn print_fleet(agents: &[AgentInfo], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(agents)?);
        return Ok(());
    }
    if agents.is_empty() {
        println!("no agents have registered");
        return Ok(());
    }
    println!(
        "{:<24}  {:>7}  {:<20}  LAST OUTCOME",
        "NAME", "VERSION", "LAST SEEN"
    );
    for agent in agents {
        let outcome = match &agent.last_outcome {
            None => "-".to_owned(),
            Some(outcome) => match outcome.status {
                OutcomeStatus::Applied => format!(
                    "applied {} ({} files, {} removed, {} ms{}{}{})",
                    outcome.version,
                    outcome.files,
                    outcome.removed,
                    outcome.duration_ms,
                    if outcome.recovered {
                        ", after a crash"
                    } else {
                        ""
                    },
                    if outcome.warnings.is_empty() {
                        String::new()
                    } else {
                        format!(", {} warnings", outcome.warnings.len())
                    },
                    process_summary(&outcome.processes),
                ),
                OutcomeStatus::Failed => format!(
                    "FAILED {}: {}",
                    outcome.version,
                    outcome.error.as_deref().unwrap_or("unknown error")
                ),
            },
        };
        println!(
            "{:<24}  {:>7}  {:<20}  {}",
            agent.name,
            agent
                .version
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            time(agent.last_seen),
            outcome
        );
    }
    Ok(())
}

/// `explain_full_scan`: say on stderr why the whole tree was read, when the user
/// did not ask for it.
pub fn print_push(
    report: &PushReport,
    dry_run: bool,
    json: bool,
    explain_full_scan: bool,
) -> Result<()> {
    if json {
        let value = serde_json::json!({
            "version": report.version,
            "parent": report.parent,
            "files": report.files,
            "dirs": report.dirs,
            "deleted": report.deleted,
            "blobs_sent": report.blobs_sent,
            "bytes_sent": report.bytes_sent,
            "dry_run": dry_run,
            "source": report.source,
            "by_tracker": report.by_tracker,
            "pushed_again_for": report.pushed_again_for,
        });
        println!("{value}");
        return Ok(());
    }
    for path in &report.pushed_again_for {
        eprintln!("note: {path} changed while it was uploaded; the push started again");
    }
    if let (Source::FullScan { reason }, true) = (&report.source, explain_full_scan) {
        eprintln!("note: scanned the whole tree ({reason})");
    }
    if report.changeset.is_empty() {
        match report.parent {
            Some(head) => println!("nothing to push: the tree matches version {head}"),
            None => println!("nothing to push"),
        }
        return Ok(());
    }
    if dry_run {
        println!(
            "would push {} files, {} directories, {} deletions on top of version {}:",
            report.files,
            report.dirs,
            report.deleted,
            report
                .parent
                .map_or_else(|| "none".to_owned(), |v| v.to_string())
        );
        for removed in &report.changeset.removed {
            println!("  delete  {removed}");
        }
        for item in &report.changeset.entries {
            let detail = match &item.entry.kind {
                EntryKind::File { size, .. } => format!("file, {}", human_bytes(*size)),
                EntryKind::Symlink { target } => {
                    format!("symlink -> {}", String::from_utf8_lossy(target))
                }
                EntryKind::HardLink { target } => format!("hard link to {target}"),
                other => other.name().to_owned(),
            };
            println!("  write   {} ({detail})", item.path);
        }
        return Ok(());
    }
    if let Some(version) = report.version {
        println!(
            "pushed version {version}: {} files, {} directories, {} deletions, {} sent",
            report.files,
            report.dirs,
            report.deleted,
            human_bytes(report.bytes_sent)
        );
    }
    Ok(())
}

pub fn print_status(report: &StatusReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    match (&report.source, report.tracker_running) {
        (Source::Journal { paths }, _) => {
            println!("tracker running; {paths} journalled path(s) looked at")
        }
        (Source::FullScan { reason }, true) => {
            println!("tracker running, but the whole tree was scanned: {reason}")
        }
        (Source::FullScan { .. }, false) => {
            println!("no tracker running for this state directory: the whole tree was scanned")
        }
    }
    let base = report.pushed_version.map_or_else(
        || "nothing pushed yet".to_owned(),
        |v| format!("last pushed as version {v}"),
    );
    if report.changes.is_empty() {
        println!("nothing to push ({base})");
        return Ok(());
    }
    println!("changes not pushed yet ({base}):");
    for line in &report.changes {
        let label = match line.change {
            Change::New => "new:",
            Change::Modified => "modified:",
            Change::Deleted => "deleted:",
            Change::TypeChanged => "type changed:",
        };
        let suffix = if line.kind == "file" {
            String::new()
        } else {
            format!(" ({})", line.kind)
        };
        println!("  {label:<14}{}{suffix}", line.path);
    }
    Ok(())
}

/// What `agent --once --plan` prints.
pub fn print_plans(plans: &[(u64, vdsync_agent::plan::Plan)], json: bool) -> Result<()> {
    if json {
        let listed: Vec<serde_json::Value> = plans
            .iter()
            .map(|(version, plan)| serde_json::json!({ "version": version, "plan": plan }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    if plans.is_empty() {
        println!("up to date: nothing to plan");
        return Ok(());
    }
    for (version, plan) in plans {
        println!("version {version}:");
        for file in &plan.files {
            if file.concerns.is_empty() && file.action == "auto" {
                continue;
            }
            let rule = file
                .rule
                .as_deref()
                .map(|rule| format!(" ({rule})"))
                .unwrap_or_default();
            println!("  {}: {}{rule}", file.path, file.action);
            for concern in &file.concerns {
                println!(
                    "    {} (pid {}): {} - {}",
                    concern.name,
                    concern.pid,
                    concern.decision.name(),
                    concern.reason
                );
            }
        }
        let list = |targets: &[vdsync_agent::plan::Target]| {
            targets
                .iter()
                .map(|t| format!("{} (pid {})", t.name, t.key.pid))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if plan.is_empty() {
            println!("  no process needs anything");
        }
        if !plan.restarts.is_empty() {
            println!("  restart, in this order: {}", list(&plan.restarts));
        }
        if !plan.reloads.is_empty() {
            println!("  reload: {}", list(&plan.reloads));
        }
        for command in &plan.commands {
            println!("  run: {}", command.argv.join(" "));
        }
        for note in &plan.notes {
            println!("  note: {note}");
        }
    }
    Ok(())
}

/// One line per process acted on, after `agent --once`.
pub fn print_process_outcomes(version: u64, outcomes: &[vdsync_proto::wire::ProcessOutcome]) {
    for outcome in outcomes {
        let new_pid = outcome
            .new_pid
            .map(|pid| format!(" -> pid {pid}"))
            .unwrap_or_default();
        let detail = outcome
            .detail
            .as_deref()
            .map(|detail| format!(" ({detail})"))
            .unwrap_or_default();
        println!(
            "version {version}: {} (pid {}) {}{new_pid}: {}{detail}",
            outcome.name,
            outcome.pid,
            outcome.action.name(),
            outcome.reason
        );
    }
}

/// `, 1 restarted, 2 reloaded, 1 failed` for the fleet table.
fn process_summary(processes: &[vdsync_proto::wire::ProcessOutcome]) -> String {
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for process in processes {
        let name = process.action.name();
        match counts.iter_mut().find(|(seen, _)| *seen == name) {
            Some((_, count)) => *count += 1,
            None => counts.push((name, 1)),
        }
    }
    counts
        .iter()
        .map(|(name, count)| format!(", {count} {name}"))
        .collect()
}
