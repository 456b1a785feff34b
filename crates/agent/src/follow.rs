//! The agent's loop: register, finish any interrupted apply, then apply every
//! version from the tree's own up to the repository's head, in order, reporting
//! each outcome. Waiting for new versions is a long-poll on the repository, not a
//! busy loop.

use std::path::Path;
use std::time::Duration;

use vdsync_client::Client;
use vdsync_proto::display::error_chain;
use vdsync_proto::wire::{Hello, Outcome, OutcomeStatus};

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
}

#[derive(Debug, Default)]
pub struct FollowSummary {
    pub version: Option<u64>,
    pub applied: Vec<Applied>,
}

fn outcome_of(applied: &Applied) -> Outcome {
    Outcome {
        version: applied.version,
        status: OutcomeStatus::Applied,
        files: applied.files,
        removed: applied.removed,
        bytes_fetched: applied.bytes_fetched,
        duration_ms: applied.duration_ms,
        recovered: applied.recovered,
        warnings: applied.warnings.clone(),
        error: None,
    }
}
pub fn follow(client: &Client, options: &FollowOptions<'_>) -> Result<FollowSummary, ApplyError> {
    let applier = Applier::open(options.root, options.state_dir)?;
    let mut summary = FollowSummary::default();
    if let Some(recovered) = applier.recover()? {
        tracing::info!(
            version = recovered.version,
            "finished a version interrupted by a crash"
        );
        report(client, options.name, &outcome_of(&recovered));
        summary.applied.push(recovered);
    }
    let mut current = applier.current_version()?;
    client.hello(options.name, &Hello { version: current })?;
    loop {
        let head = if options.once {
            client.head()?
        } else {
            match client.wait_head(current, options.poll_wait) {
                Ok(head) => head,
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "repository unreachable; retrying");
                    std::thread::sleep(options.retry_after);
                    continue;
                }
            }
        };
        while head.is_some() && current < head {
            let version = current.map_or(0, |v| v + 1);
            match apply_one(client, &applier, version, current) {
                Ok(applied) => {
                    tracing::info!(
                        version,
                        files = applied.files,
                        removed = applied.removed,
                        ms = applied.duration_ms,
                        "applied"
                    );
                    report(client, options.name, &outcome_of(&applied));
                    summary.applied.push(applied);
                    current = Some(version);
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
                        },
                    );
                    if options.once {
                        return Err(err);
                    }
                    std::thread::sleep(options.retry_after);
                    break;
                }
            }
        }
        summary.version = current;
        if options.once {
            return Ok(summary);
        }
    }
}

fn apply_one(
    client: &Client,
    applier: &Applier,
    version: u64,
    current: Option<u64>,
) -> Result<Applied, ApplyError> {
    let changeset = client.changeset(version)?;
    if changeset.parent != current {
        return Err(ApplyError::WrongParent {
            version,
            expected: changeset.parent,
            actual: current,
        });
    }
    applier.apply(version, &changeset, client)
}

/// Reports are best effort: a repository that cannot take one now does not undo
/// the version, and the next hello tells it where this machine is.
fn report(client: &Client, name: &str, outcome: &Outcome) {
    if let Err(err) = client.report(name, outcome) {
        tracing::warn!(error = %error_chain(&err), "could not report the outcome");
    }
}
