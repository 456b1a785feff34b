//! Carrying out a [`Plan`]: stop, (the caller places the version), start again,
//! reload with verification, run the rules' commands — with every step recorded in
//! `processes.json` in the state directory before it is taken, so that an agent
//! that dies between stopping processes and starting them finishes the job on its
//! next start.
//!
//! Stopping goes parents first, one SIGTERM per `stop_interval`; before a process's
//! turn, the agent waits for any ancestor it already signalled to exit, so that a
//! child its parent ends (nginx's workers, a supervisor's children) is gone when its
//! turn comes and is *not* started again: its parent starts it. What is still alive
//! after `stop_timeout` gets SIGKILL.
//!
//! Starting restores what /proc showed when the plan was made (uids, gids, groups,
//! root, umask, limits, stdio) and the argv, environment and directory the open log
//! saw at exec time — or, for a process older than the agent, what /proc shows at
//! stop time, and the outcome says so. The agent only ever runs a stopped process's own argv
//! and environment, or a rule's command: it never runs interpreters or anything
//! else to inspect a process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vdsync_proto::wire::{ProcessAction, ProcessOutcome};
use vdsync_proto::RepoPath;
use vdsync_sys::process::{self as proc, FileId, ProcessKey, RestoreSpec};

use crate::openlog::OpenLog;
use crate::plan::{Plan, Target};
use crate::ApplyError;

/// Timings of process handling (`agent --stop-interval`, ...).
#[derive(Debug, Clone, Copy)]
pub struct ProcessOptions {
    /// Pause between two SIGTERMs.
    pub stop_interval: Duration,
    /// How long a process gets to exit after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long a reloaded process gets to re-open an updated file.
    pub reload_window: Duration,
    /// How long a rule's command may run.
    pub command_timeout: Duration,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            stop_interval: Duration::from_millis(100),
            stop_timeout: Duration::from_secs(10),
            reload_window: Duration::from_secs(5),
            command_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RestartState {
    /// Not signalled yet.
    Planned,
    /// Signalled; to be started once the version is in place.
    Stopped,
    /// Gone before its turn: its parent ended it and owns it.
    EndedByParent,
    Started {
        pid: i32,
    },
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingRestart {
    pub key: ProcessKey,
    pub name: String,
    pub reason: String,
    /// Restarted through systemd instead, when systemd is init.
    pub systemd_unit: Option<String>,
    /// How to start it again (none for a systemd unit).
    pub spec: Option<RestoreSpec>,
    /// Where the restore data came from, when that is worth saying.
    pub restore_note: Option<String>,
    /// Set when this restart replaces a reload that was not verified.
    #[serde(default)]
    pub after_reload: bool,
    /// Its outcome has been recorded in `Pending::outcomes`.
    #[serde(default)]
    pub reported: bool,
    #[serde(flatten)]
    pub state: RestartState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingReload {
    pub key: ProcessKey,
    pub name: String,
    pub reason: String,
    pub systemd_unit: Option<String>,
    pub paths: Vec<RepoPath>,
    pub done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingCommand {
    pub argv: Vec<String>,
    pub paths: Vec<RepoPath>,
    pub done: bool,
}

/// The durable record of one version's process handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub version: u64,
    pub restarts: Vec<PendingRestart>,
    pub reloads: Vec<PendingReload>,
    pub commands: Vec<PendingCommand>,
    #[serde(default)]
    pub outcomes: Vec<ProcessOutcome>,
}

/// Process handling for one agent.
pub struct Processes<'a> {
    state_dir: PathBuf,
    options: ProcessOptions,
    open_log: Option<&'a OpenLog>,
}

fn pending_path(state_dir: &Path) -> PathBuf {
    state_dir.join("processes.json")
}

fn state_error(path: &Path, message: impl std::fmt::Display) -> ApplyError {
    ApplyError::CorruptState {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl<'a> Processes<'a> {
    pub fn new(
        state_dir: &Path,
        options: ProcessOptions,
        open_log: Option<&'a OpenLog>,
    ) -> Processes<'a> {
        Processes {
            state_dir: state_dir.to_path_buf(),
            options,
            open_log,
        }
    }

    fn save(&self, pending: &Pending) -> Result<(), ApplyError> {
        let path = pending_path(&self.state_dir);
        let bytes = serde_json::to_vec_pretty(pending).map_err(|err| state_error(&path, err))?;
        vdsync_sys::write_atomic(&path, &bytes).map_err(|source| ApplyError::Io {
            path,
            operation: "write",
            source,
        })
    }

    fn clear(&self) -> Result<(), ApplyError> {
        let path = pending_path(&self.state_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ApplyError::Io {
                path,
                operation: "remove",
                source,
            }),
        }
    }

    /// Captures what the restarts need, records the plan durably, and stops the
    /// processes to restart. Call before the version is placed.
    pub fn stop(&self, version: u64, plan: &Plan) -> Result<Pending, ApplyError> {
        let mut pending = Pending {
            version,
            restarts: plan
                .restarts
                .iter()
                .map(|target| self.capture(target))
                .collect(),
            reloads: plan
                .reloads
                .iter()
                .map(|target| PendingReload {
                    key: target.key,
                    name: target.name.clone(),
                    reason: target.reason.clone(),
                    systemd_unit: target.systemd_unit.clone(),
                    paths: target.paths.clone(),
                    done: false,
                })
                .collect(),
            commands: plan
                .commands
                .iter()
                .map(|run| PendingCommand {
                    argv: run.argv.clone(),
                    paths: run.paths.clone(),
                    done: false,
                })
                .collect(),
            outcomes: Vec::new(),
        };
        if pending.restarts.is_empty() && pending.reloads.is_empty() && pending.commands.is_empty()
        {
            return Ok(pending);
        }
        self.save(&pending)?;
        self.stop_restarts(&mut pending, 0)?;
        Ok(pending)
    }

    fn capture(&self, target: &Target) -> PendingRestart {
        let mut restart = PendingRestart {
            key: target.key,
            name: target.name.clone(),
            reason: target.reason.clone(),
            systemd_unit: target.systemd_unit.clone(),
            spec: None,
            restore_note: None,
            after_reload: false,
            reported: false,
            state: RestartState::Planned,
        };
        if restart.systemd_unit.is_some() {
            return restart;
        }
        match proc::capture_restore(target.key.pid) {
            Ok(mut spec) => {
                match self.open_log.and_then(|log| log.launch(target.key)) {
                    Some(launch) => {
                        if let Some(inside) = inside_root(&spec.root, &launch.cwd) {
                            spec.cwd = inside;
                        }
                        if !launch.argv.is_empty() {
                            spec.argv = launch.argv;
                        }
                        spec.env = launch.env;
                    }
                    None => {
                        restart.restore_note = Some(
                            "started before the agent: restored with the command line, environment and working directory /proc showed when it was stopped".to_string(),
                        );
                    }
                }
                restart.spec = Some(spec);
            }
            Err(err) => {
                restart.state = RestartState::Failed {
                    message: format!("cannot read what it takes to start it again: {err}"),
                };
            }
        }
        restart
    }

    /// Signals every `Planned` restart from `first` on, parents first.
    fn stop_restarts(&self, pending: &mut Pending, first: usize) -> Result<(), ApplyError> {
        let mut signalled: Vec<ProcessKey> = Vec::new();
        let mut first_signal: Option<Instant> = None;
        for index in first..pending.restarts.len() {
            if pending.restarts[index].state != RestartState::Planned {
                continue;
            }
            let key = pending.restarts[index].key;
            // Give an ancestor we signalled the chance to end this one itself.
            let waiting_for: Vec<ProcessKey> = signalled
                .iter()
                .copied()
                .filter(|ancestor| is_ancestor(ancestor.pid, key.pid))
                .collect();
            for ancestor in waiting_for {
                let _ = proc::wait_exit(ancestor, self.options.stop_timeout);
            }
            let restart = &mut pending.restarts[index];
            if let Some(unit) = restart.systemd_unit.clone() {
                restart.state = match systemctl("stop", &unit) {
                    Ok(()) => RestartState::Stopped,
                    Err(message) => RestartState::Failed { message },
                };
                self.save(pending)?;
                continue;
            }
            if !proc::is_alive(key) {
                restart.state = if first_signal.is_some() {
                    RestartState::EndedByParent
                } else {
                    RestartState::Failed {
                        message: "it exited before the agent stopped it".to_string(),
                    }
                };
                self.save(pending)?;
                continue;
            }
            if !signalled.is_empty() {
                std::thread::sleep(self.options.stop_interval);
            }
            // Recorded first: a crash right after the signal must start it again.
            restart.state = RestartState::Stopped;
            self.save(pending)?;
            match proc::signal_process(key, libc::SIGTERM) {
                Ok(true) => {
                    first_signal.get_or_insert_with(Instant::now);
                    signalled.push(key);
                }
                Ok(false) => {
                    pending.restarts[index].state = RestartState::EndedByParent;
                    self.save(pending)?;
                }
                Err(err) => {
                    pending.restarts[index].state = RestartState::Failed {
                        message: format!("cannot signal it: {err}"),
                    };
                    self.save(pending)?;
                }
            }
        }
        let deadline = first_signal.map(|at| at + self.options.stop_timeout);
        for key in signalled {
            let left = deadline
                .map(|deadline| deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            if !proc::wait_exit(key, left).unwrap_or(false) {
                tracing::warn!(
                    pid = key.pid,
                    "still running after SIGTERM; sending SIGKILL"
                );
                let _ = proc::signal_process(key, libc::SIGKILL);
                let _ = proc::wait_exit(key, Duration::from_secs(5));
            }
        }
        Ok(())
    }

    /// Starts what was stopped, reloads, runs commands; then forgets the record.
    /// Call after the version is in place. `new_file` gives the file now at a path.
    pub fn finish(
        &self,
        mut pending: Pending,
        new_file: &dyn Fn(&RepoPath) -> Option<FileId>,
    ) -> Result<Vec<ProcessOutcome>, ApplyError> {
        if pending.restarts.is_empty() && pending.reloads.is_empty() && pending.commands.is_empty()
        {
            return Ok(pending.outcomes);
        }
        self.start_restarts(&mut pending)?;
        for index in 0..pending.reloads.len() {
            if pending.reloads[index].done {
                continue;
            }
            self.reload(&mut pending, index, new_file)?;
        }
        for index in 0..pending.commands.len() {
            if pending.commands[index].done {
                continue;
            }
            let outcome = self.run_command(&pending.commands[index]);
            pending.commands[index].done = true;
            pending.outcomes.push(outcome);
            self.save(&pending)?;
        }
        self.clear()?;
        Ok(pending.outcomes)
    }

    fn start_restarts(&self, pending: &mut Pending) -> Result<(), ApplyError> {
        for index in 0..pending.restarts.len() {
            let restart = &pending.restarts[index];
            if restart.reported || restart.state == RestartState::Planned {
                continue;
            }
            let mut outcome = ProcessOutcome {
                action: if restart.after_reload {
                    ProcessAction::RestartedAfterReload
                } else {
                    ProcessAction::Restarted
                },
                pid: restart.key.pid,
                name: restart.name.clone(),
                new_pid: None,
                reason: restart.reason.clone(),
                detail: restart.restore_note.clone(),
            };
            let state = match &restart.state {
                RestartState::Stopped => self.start_one(restart),
                other => other.clone(),
            };
            match &state {
                RestartState::Started { pid } => {
                    outcome.new_pid = Some(*pid).filter(|pid| *pid > 0);
                    if let Some(unit) = &restart.systemd_unit {
                        outcome.detail = Some(format!("through systemd unit {unit}"));
                    }
                }
                RestartState::EndedByParent => outcome.action = ProcessAction::EndedByParent,
                RestartState::Failed { message } => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some(message.clone());
                }
                RestartState::Planned | RestartState::Stopped => {}
            }
            let restart = &mut pending.restarts[index];
            restart.state = state;
            restart.reported = true;
            pending.outcomes.push(outcome);
            self.save(pending)?;
        }
        Ok(())
    }

    fn start_one(&self, restart: &PendingRestart) -> RestartState {
        match (&restart.systemd_unit, &restart.spec) {
            (Some(unit), _) => match systemctl("start", unit) {
                Ok(()) => RestartState::Started { pid: 0 },
                Err(message) => RestartState::Failed { message },
            },
            (None, Some(spec)) => match proc::spawn_restored(spec) {
                Ok(mut child) => {
                    let pid = child.id() as i32;
                    // The agent reaps it if it exits while the agent runs; after
                    // that, init does.
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                    RestartState::Started { pid }
                }
                Err(err) => RestartState::Failed {
                    message: format!("cannot start it again: {err}"),
                },
            },
            (None, None) => RestartState::Failed {
                message: "nothing recorded to start it again with".to_string(),
            },
        }
    }

    fn reload(
        &self,
        pending: &mut Pending,
        index: usize,
        new_file: &dyn Fn(&RepoPath) -> Option<FileId>,
    ) -> Result<(), ApplyError> {
        let reload = pending.reloads[index].clone();
        let mut outcome = ProcessOutcome {
            action: ProcessAction::Reloaded,
            pid: reload.key.pid,
            name: reload.name.clone(),
            new_pid: None,
            reason: reload.reason.clone(),
            detail: None,
        };
        if let Some(unit) = &reload.systemd_unit {
            match systemctl("reload", unit) {
                Ok(()) => outcome.detail = Some(format!("through systemd unit {unit}")),
                Err(message) => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some(message);
                }
            }
        } else {
            let files: HashSet<FileId> = reload.paths.iter().filter_map(new_file).collect();
            // A reload for removed files only has nothing new to watch for.
            let verification = self
                .open_log
                .filter(|_| !files.is_empty())
                .map(|log| log.expect_open(reload.key, files.clone()));
            match proc::signal_process(reload.key, libc::SIGHUP) {
                Ok(true) => match verification {
                    Some(verification) => match verification.wait(self.options.reload_window) {
                        Some(opener) => {
                            outcome.detail = Some(if opener == reload.key {
                                "it re-opened the updated file after SIGHUP".to_string()
                            } else {
                                format!(
                                    "its descendant {} re-opened the updated file after SIGHUP",
                                    opener.pid
                                )
                            });
                        }
                        None => {
                            // Not verified: stop and start it instead.
                            let window = self.options.reload_window;
                            let target = Target {
                                key: reload.key,
                                parent: proc::parent_of(reload.key.pid).unwrap_or(0),
                                name: reload.name.clone(),
                                systemd_unit: None,
                                paths: reload.paths.clone(),
                                reason: reload.reason.clone(),
                            };
                            let mut restart = self.capture(&target);
                            restart.after_reload = true;
                            let note =
                                format!("no updated file re-opened within {window:?} of SIGHUP");
                            restart.restore_note = Some(match restart.restore_note.take() {
                                Some(more) => format!("{note}; {more}"),
                                None => note,
                            });
                            pending.reloads[index].done = true;
                            pending.restarts.push(restart);
                            let first = pending.restarts.len() - 1;
                            self.save(pending)?;
                            self.stop_restarts(pending, first)?;
                            return self.start_restarts(pending);
                        }
                    },
                    None if files.is_empty() => {
                        outcome.detail = Some(
                            "sent SIGHUP; not verified (the files it read were removed)"
                                .to_string(),
                        );
                    }
                    None => {
                        outcome.detail =
                            Some("sent SIGHUP; not verified (no open log)".to_string());
                    }
                },
                Ok(false) => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some("it had exited before SIGHUP".to_string());
                }
                Err(err) => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some(format!("cannot signal it: {err}"));
                }
            }
        }
        pending.reloads[index].done = true;
        pending.outcomes.push(outcome);
        self.save(pending)
    }

    fn run_command(&self, command: &PendingCommand) -> ProcessOutcome {
        let mut outcome = ProcessOutcome {
            action: ProcessAction::Command,
            pid: 0,
            name: command.argv.join(" "),
            new_pid: None,
            reason: format!(
                "a rule runs it for {}",
                command
                    .paths
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            detail: None,
        };
        let Some((program, arguments)) = command.argv.split_first() else {
            outcome.action = ProcessAction::Failed;
            outcome.detail = Some("empty command".to_string());
            return outcome;
        };
        // A fixed, minimal environment: nothing of the agent's own leaks in.
        let spawned = Command::new(program)
            .args(arguments)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                outcome.action = ProcessAction::Failed;
                outcome.detail = Some(format!("cannot run it: {err}"));
                return outcome;
            }
        };
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    outcome.detail = Some("exited 0".to_string());
                    return outcome;
                }
                Ok(Some(status)) => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some(format!("command failed: {status}"));
                    return outcome;
                }
                Ok(None) if started.elapsed() > self.options.command_timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    outcome.action = ProcessAction::Failed;
                    outcome.detail =
                        Some(format!("killed after {:?}", self.options.command_timeout));
                    return outcome;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(err) => {
                    outcome.action = ProcessAction::Failed;
                    outcome.detail = Some(format!("cannot wait for it: {err}"));
                    return outcome;
                }
            }
        }
    }

    /// Finishes the process handling of a version interrupted by a crash: starts
    /// what was stopped and not started, does the reloads and commands not done.
    pub fn recover(
        &self,
        new_file: &dyn Fn(&RepoPath) -> Option<FileId>,
    ) -> Result<Option<(u64, Vec<ProcessOutcome>)>, ApplyError> {
        let path = pending_path(&self.state_dir);
        let mut pending: Pending = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| state_error(&path, err))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ApplyError::Io {
                    path,
                    operation: "read",
                    source,
                })
            }
        };
        for restart in &mut pending.restarts {
            match restart.state {
                // Never signalled: it runs (or ended on its own); leave it.
                RestartState::Planned => restart.reported = true,
                // Signalled, perhaps not yet gone: finish stopping it first.
                RestartState::Stopped if proc::is_alive(restart.key) => {
                    let _ = proc::signal_process(restart.key, libc::SIGTERM);
                    if !proc::wait_exit(restart.key, self.options.stop_timeout).unwrap_or(false) {
                        let _ = proc::signal_process(restart.key, libc::SIGKILL);
                        let _ = proc::wait_exit(restart.key, Duration::from_secs(5));
                    }
                }
                _ => {}
            }
        }
        let version = pending.version;
        let outcomes = self.finish(pending, new_file)?;
        Ok(Some((version, outcomes)))
    }
}

/// `path` as seen inside `root` (both as the agent sees them).
fn inside_root(root: &Path, path: &Path) -> Option<PathBuf> {
    if root == Path::new("/") {
        return Some(path.to_path_buf());
    }
    path.strip_prefix(root)
        .ok()
        .map(|rest| Path::new("/").join(rest))
}

/// Whether `ancestor` is an ancestor of `pid` now.
fn is_ancestor(ancestor: i32, pid: i32) -> bool {
    let mut current = pid;
    for _ in 0..64 {
        match proc::parent_of(current) {
            Ok(parent) if parent == ancestor => return true,
            Ok(parent) if parent > 1 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// Runs `systemctl VERB UNIT` (a fixed argv: the unit name comes from the kernel's
/// cgroup path, not from any file or user).
fn systemctl(verb: &str, unit: &str) -> Result<(), String> {
    let status = Command::new("/usr/bin/systemctl")
        .args([verb, "--", unit])
        .env_clear()
        .stdin(Stdio::null())
        .status()
        .map_err(|err| format!("cannot run systemctl {verb} {unit}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("systemctl {verb} {unit}: {status}"))
    }
}
