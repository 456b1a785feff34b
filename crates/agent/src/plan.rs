//! Deciding what the running processes need for one version (the paper's Table 4):
//! a pure function from the files about to be replaced, a snapshot of /proc, the
//! open log and the rules, to a plan. Nothing here reads the kernel or signals
//! anything, so every decision is unit-tested from data.
//!
//! | the file is…                         | seen through        | decision          |
//! |--------------------------------------|---------------------|-------------------|
//! | the process's executable             | /proc/PID/exe       | restart           |
//! | mapped by it                         | /proc/PID/maps      | restart           |
//! | open in it                           | /proc/PID/fd        | restart           |
//! | opened by it (or its forebears) before | the open log      | reload (verified) |
//!
//! Files are matched by (device, inode), never by path: the path is about to
//! name a new file, and a process may know the old one by another name.
//!
//! A reload is only planned for a process that catches SIGHUP: for one that
//! does not, SIGHUP is its death, and for one that ignores it, a no-op; both get a
//! restart instead, and the plan says why.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use vdsync_proto::RepoPath;
use vdsync_sys::process::{FileId, Incarnation, ProcessFiles, ProcessKey};

use crate::rules::{Action, Rules};

/// A file the version places in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatedFile {
    pub path: RepoPath,
    /// The file now at `path`, which processes may be using; none for a new path.
    pub current: Option<FileId>,
    /// Which life of that inode it is, to tell it from an earlier file a process
    /// opened that had the same inode number (0: unknown).
    pub incarnation: Incarnation,
    /// The version removes the path instead of placing something there.
    pub removed: bool,
}

/// How a process is concerned with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Use {
    Executable,
    Mapped,
    Open,
    OpenedBefore,
    /// Named by a rule's `process`.
    NamedByRule,
}

impl Use {
    fn describe(self) -> &'static str {
        match self {
            Use::Executable => "runs it",
            Use::Mapped => "maps it",
            Use::Open => "has it open",
            Use::OpenedBefore => "opened it before",
            Use::NamedByRule => "is named by the rule",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Restart,
    Reload,
    Nothing,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Restart => "restart",
            Decision::Reload => "reload",
            Decision::Nothing => "none",
        }
    }
}

/// One process's part in one file's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Concern {
    pub pid: i32,
    pub name: String,
    pub uses: Use,
    pub decision: Decision,
    pub reason: String,
}

/// What one updated file leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilePlan {
    pub path: RepoPath,
    pub action: &'static str,
    /// The rule that chose `action`, if one did.
    pub rule: Option<String>,
    pub concerns: Vec<Concern>,
}

/// A process to restart or reload, with every file that asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub key: ProcessKey,
    pub parent: i32,
    pub name: String,
    pub systemd_unit: Option<String>,
    pub paths: Vec<RepoPath>,
    pub reason: String,
}

/// A rule's command to run after the version is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandRun {
    pub argv: Vec<String>,
    pub paths: Vec<RepoPath>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub files: Vec<FilePlan>,
    /// Parents before children: stopping is done in this order.
    pub restarts: Vec<Target>,
    pub reloads: Vec<Target>,
    pub commands: Vec<CommandRun>,
    /// Things the operator should know that change no decision.
    pub notes: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.restarts.is_empty() && self.reloads.is_empty() && self.commands.is_empty()
    }
}

/// Everything the planner looks at.
pub struct Inputs<'a> {
    pub files: &'a [UpdatedFile],
    /// Every process on the machine.
    pub processes: &'a [ProcessFiles],
    /// For each file, the live processes the open log saw open it (themselves or a
    /// forebear they were forked from since their last exec).
    pub opened_before: &'a HashMap<FileId, Vec<ProcessKey>>,
    pub rules: &'a Rules,
    /// Processes never to touch: the agent and its ancestors.
    pub untouchable: &'a HashSet<i32>,
    /// Whether systemd is PID 1 (units are then restarted through it).
    pub systemd: bool,
}

/// Builds the plan.
pub fn plan(inputs: &Inputs<'_>) -> Plan {
    let by_pid: HashMap<i32, &ProcessFiles> =
        inputs.processes.iter().map(|p| (p.key.pid, p)).collect();
    let mut users: HashMap<FileId, Vec<(&ProcessFiles, Use)>> = HashMap::new();
    let wanted: HashSet<FileId> = inputs
        .files
        .iter()
        .filter_map(|file| file.current)
        .collect();
    for process in inputs.processes {
        let mut seen = HashSet::new();
        let mut note = |file: FileId, how: Use| {
            if wanted.contains(&file) && seen.insert(file) {
                users.entry(file).or_default().push((process, how));
            }
        };
        if let Some(exe) = process.exe {
            note(exe, Use::Executable);
        }
        for &file in &process.mapped {
            note(file, Use::Mapped);
        }
        for &file in &process.open {
            note(file, Use::Open);
        }
    }

    let mut restarts: BTreeMap<i32, Target> = BTreeMap::new();
    let mut reloads: BTreeMap<i32, Target> = BTreeMap::new();
    let mut commands: Vec<CommandRun> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut files = Vec::with_capacity(inputs.files.len());

    for file in inputs.files {
        let rule = inputs.rules.matching(&file.path);
        let action = rule.map_or(Action::Auto, |rule| rule.action);
        let mut concerned: Vec<(&ProcessFiles, Use)> = file
            .current
            .and_then(|current| users.get(&current).cloned())
            .unwrap_or_default();
        for key in file
            .current
            .and_then(|current| inputs.opened_before.get(&current))
            .into_iter()
            .flatten()
        {
            if let Some(process) = by_pid.get(&key.pid).filter(|p| p.key == *key) {
                if !concerned.iter().any(|(p, _)| p.key == *key) {
                    concerned.push((process, Use::OpenedBefore));
                }
            }
        }
        if let Some(name) = rule.and_then(|rule| rule.process.as_deref()) {
            for process in inputs.processes.iter().filter(|p| p.name == name) {
                if !concerned.iter().any(|(p, _)| p.key == process.key) {
                    concerned.push((process, Use::NamedByRule));
                }
            }
        }
        concerned.sort_by_key(|(process, _)| process.key.pid);

        let mut concerns = Vec::with_capacity(concerned.len());
        for (process, uses) in concerned {
            let (decision, reason) = if inputs.untouchable.contains(&process.key.pid) {
                (
                    Decision::Nothing,
                    "the agent does not stop itself or its ancestors".to_string(),
                )
            } else if process.key.pid == 1 {
                (Decision::Nothing, "init is never stopped".to_string())
            } else if process.interactive && action != Action::None {
                (
                    Decision::Nothing,
                    "interactive (a terminal's session leader or foreground): a stop or SIGHUP would hang up someone's session".to_string(),
                )
            } else if file.removed
                && matches!(uses, Use::Executable | Use::Mapped | Use::Open)
                && action != Action::None
            {
                // Nothing to start it on; it keeps its copy until it exits.
                notes.push(format!(
                    "{} (pid {}) {} {}, which the version removes; it is left running",
                    process.name,
                    process.key.pid,
                    uses.describe(),
                    file.path
                ));
                (
                    Decision::Nothing,
                    "the file is removed: there is nothing to start it on".to_string(),
                )
            } else {
                decide(action, uses, process)
            };
            let target_set = match decision {
                Decision::Restart => Some(&mut restarts),
                Decision::Reload => Some(&mut reloads),
                Decision::Nothing => None,
            };
            if let Some(targets) = target_set {
                let target = targets.entry(process.key.pid).or_insert_with(|| Target {
                    key: process.key,
                    parent: process.parent,
                    name: process.name.clone(),
                    systemd_unit: process.systemd_unit.clone().filter(|_| inputs.systemd),
                    paths: Vec::new(),
                    reason: format!("{} {}", uses.describe(), file.path),
                });
                target.paths.push(file.path.clone());
            }
            if (inputs.untouchable.contains(&process.key.pid) || process.interactive)
                && matches!(action, Action::Auto | Action::Reload | Action::Restart)
                && uses != Use::OpenedBefore
            {
                notes.push(format!(
                    "{} (pid {}) {} {} and is left running",
                    process.name,
                    process.key.pid,
                    uses.describe(),
                    file.path
                ));
            }
            concerns.push(Concern {
                pid: process.key.pid,
                name: process.name.clone(),
                uses,
                decision,
                reason,
            });
        }
        if action == Action::Exec {
            if let Some(rule) = rule {
                match commands.iter_mut().find(|run| run.argv == rule.command) {
                    Some(run) => run.paths.push(file.path.clone()),
                    None => commands.push(CommandRun {
                        argv: rule.command.clone(),
                        paths: vec![file.path.clone()],
                    }),
                }
            }
        }
        files.push(FilePlan {
            path: file.path.clone(),
            action: action.name(),
            rule: rule.map(|rule| rule.origin.clone()),
            concerns,
        });
    }

    // A restart wins over a reload of the same process (and covers its files).
    reloads.retain(|pid, reload| match restarts.get_mut(pid) {
        Some(restart) => {
            restart.paths.append(&mut reload.paths);
            false
        }
        None => true,
    });
    // One SIGHUP to the eldest: a reload of a process whose ancestor is also
    // reloaded or restarted is that ancestor's business (nginx's master re-reads
    // its configuration and replaces its workers itself).
    let planned: HashSet<i32> = restarts.keys().chain(reloads.keys()).copied().collect();
    let descendants: Vec<i32> = reloads
        .keys()
        .copied()
        .filter(|&pid| ancestors(pid, &by_pid).any(|ancestor| planned.contains(&ancestor)))
        .collect();
    for pid in descendants {
        reloads.remove(&pid);
    }

    let mut restarts: Vec<Target> = restarts.into_values().collect();
    restarts.sort_by_key(|target| (ancestors(target.key.pid, &by_pid).count(), target.key.pid));
    Plan {
        files,
        restarts,
        reloads: reloads.into_values().collect(),
        commands,
        notes,
    }
}

fn decide(action: Action, uses: Use, process: &ProcessFiles) -> (Decision, String) {
    let reload_or_restart = |why: &str| {
        if process.ignores_hangup {
            (
                Decision::Restart,
                format!("{why}; it ignores SIGHUP, so it is restarted"),
            )
        } else if !process.catches_hangup {
            (
                Decision::Restart,
                format!("{why}; SIGHUP would end it, so it is restarted"),
            )
        } else {
            (Decision::Reload, why.to_string())
        }
    };
    match action {
        Action::None => (Decision::Nothing, "a rule says none".to_string()),
        Action::Exec => (
            Decision::Nothing,
            "a rule runs a command instead".to_string(),
        ),
        Action::Restart => (
            Decision::Restart,
            format!("it {}; a rule says restart", uses.describe()),
        ),
        Action::Reload => reload_or_restart(&format!("it {}; a rule says reload", uses.describe())),
        Action::Auto => match uses {
            Use::Executable | Use::Mapped | Use::Open => {
                (Decision::Restart, format!("it {}", uses.describe()))
            }
            Use::OpenedBefore | Use::NamedByRule => {
                reload_or_restart(&format!("it {}", uses.describe()))
            }
        },
    }
}

/// The ancestors of `pid` that the snapshot knows, nearest first.
fn ancestors<'a>(
    pid: i32,
    by_pid: &'a HashMap<i32, &'a ProcessFiles>,
) -> impl Iterator<Item = i32> + 'a {
    let mut current = pid;
    let mut steps = 0usize;
    std::iter::from_fn(move || {
        let parent = by_pid.get(&current)?.parent;
        // A snapshot taken while processes come and go can hold a cycle of reused
        // pids; no real tree is this deep.
        steps += 1;
        if parent <= 0 || parent == current || steps > 4096 {
            return None;
        }
        current = parent;
        Some(parent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::path;

    fn file(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    fn process(pid: i32, parent: i32, name: &str) -> ProcessFiles {
        ProcessFiles {
            key: ProcessKey {
                pid,
                start_time: 1000 + pid as u64,
            },
            parent,
            name: name.to_string(),
            exe: Some(file(9000 + pid as u64)),
            catches_hangup: true,
            ..ProcessFiles::default()
        }
    }

    struct Case {
        files: Vec<UpdatedFile>,
        processes: Vec<ProcessFiles>,
        opened_before: HashMap<FileId, Vec<ProcessKey>>,
        rules: Rules,
        untouchable: HashSet<i32>,
    }

    impl Case {
        fn new(files: &[(&str, u64)], processes: Vec<ProcessFiles>) -> Case {
            Case {
                files: files
                    .iter()
                    .map(|(p, ino)| UpdatedFile {
                        path: path(p),
                        current: Some(file(*ino)),
                        incarnation: 0,
                        removed: false,
                    })
                    .collect(),
                processes,
                opened_before: HashMap::new(),
                rules: Rules::built_in(),
                untouchable: HashSet::new(),
            }
        }

        fn opened(mut self, ino: u64, pids: &[i32]) -> Case {
            let keys = pids
                .iter()
                .map(|&pid| {
                    self.processes
                        .iter()
                        .find(|p| p.key.pid == pid)
                        .unwrap()
                        .key
                })
                .collect();
            self.opened_before.insert(file(ino), keys);
            self
        }

        fn plan(&self) -> Plan {
            plan(&Inputs {
                files: &self.files,
                processes: &self.processes,
                opened_before: &self.opened_before,
                rules: &self.rules,
                untouchable: &self.untouchable,
                systemd: false,
            })
        }
    }

    fn pids(targets: &[Target]) -> Vec<i32> {
        targets.iter().map(|target| target.key.pid).collect()
    }

    #[test]
    fn table_four_executable_mapped_open_restart_opened_before_reloads() {
        let mut server = process(10, 1, "server");
        server.exe = Some(file(1));
        let mut mapper = process(20, 1, "mapper");
        mapper.mapped = vec![file(2), file(77)];
        let mut holder = process(30, 1, "holder");
        holder.open = vec![file(3)];
        let reader = process(40, 1, "reader");
        let bystander = process(50, 1, "bystander");
        let case = Case::new(
            &[
                ("usr/bin/server", 1),
                ("usr/lib/lib.so", 2),
                ("var/data", 3),
                ("etc/reader.conf", 4),
            ],
            vec![server, mapper, holder, reader, bystander],
        )
        .opened(4, &[40]);
        let plan = case.plan();
        assert_eq!(pids(&plan.restarts), [10, 20, 30]);
        assert_eq!(pids(&plan.reloads), [40]);
        let uses: Vec<(String, Use, Decision)> = plan
            .files
            .iter()
            .flat_map(|f| {
                f.concerns
                    .iter()
                    .map(move |c| (f.path.to_string(), c.uses, c.decision))
            })
            .collect();
        assert_eq!(
            uses,
            [
                (
                    "usr/bin/server".to_string(),
                    Use::Executable,
                    Decision::Restart
                ),
                ("usr/lib/lib.so".to_string(), Use::Mapped, Decision::Restart),
                ("var/data".to_string(), Use::Open, Decision::Restart),
                (
                    "etc/reader.conf".to_string(),
                    Use::OpenedBefore,
                    Decision::Reload
                ),
            ]
        );
        assert_eq!(plan.reloads[0].reason, "opened it before etc/reader.conf");
    }

    #[test]
    fn sighup_that_would_kill_or_be_ignored_becomes_a_restart() {
        let mut dies = process(10, 1, "dies");
        dies.catches_hangup = false;
        let mut deaf = process(20, 1, "deaf");
        deaf.ignores_hangup = true;
        deaf.catches_hangup = false;
        let plan = Case::new(&[("etc/a.conf", 5)], vec![dies, deaf])
            .opened(5, &[10, 20])
            .plan();
        assert_eq!(pids(&plan.restarts), [10, 20]);
        assert!(plan.reloads.is_empty());
        let reasons: Vec<&str> = plan.files[0]
            .concerns
            .iter()
            .map(|c| c.reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            [
                "it opened it before; SIGHUP would end it, so it is restarted",
                "it opened it before; it ignores SIGHUP, so it is restarted",
            ]
        );
    }

    #[test]
    fn parents_stop_before_children_whatever_the_pids() {
        // 300 ← 200 ← 100 (a child may have a lower pid after pid wrap-around).
        let mut top = process(300, 1, "top");
        let mut middle = process(200, 300, "middle");
        let mut bottom = process(100, 200, "bottom");
        for p in [&mut top, &mut middle, &mut bottom] {
            p.exe = Some(file(1));
        }
        let plan = Case::new(&[("usr/bin/app", 1)], vec![bottom, middle, top]).plan();
        assert_eq!(pids(&plan.restarts), [300, 200, 100]);
    }

    #[test]
    fn only_the_eldest_of_a_reloaded_family_gets_sighup() {
        // nginx: the master opened the configuration; workers forked from it carry
        // that history too.
        let master = process(10, 1, "nginx");
        let worker_a = process(11, 10, "nginx");
        let worker_b = process(12, 10, "nginx");
        let plan = Case::new(
            &[("etc/nginx/nginx.conf", 7)],
            vec![master, worker_a, worker_b],
        )
        .opened(7, &[10, 11, 12])
        .plan();
        assert_eq!(pids(&plan.reloads), [10]);
        assert!(plan.restarts.is_empty());
    }

    #[test]
    fn restart_wins_over_reload_of_the_same_process() {
        let mut app = process(10, 1, "app");
        app.exe = Some(file(1));
        let plan = Case::new(&[("usr/bin/app", 1), ("etc/app.conf", 2)], vec![app])
            .opened(2, &[10])
            .plan();
        assert_eq!(pids(&plan.restarts), [10]);
        assert!(plan.reloads.is_empty());
        assert_eq!(
            plan.restarts[0].paths,
            [path("usr/bin/app"), path("etc/app.conf")]
        );
    }

    #[test]
    fn a_reused_pid_never_matches_the_open_log() {
        let app = process(10, 1, "app");
        let mut case = Case::new(&[("etc/app.conf", 2)], vec![app]);
        case.opened_before.insert(
            file(2),
            vec![ProcessKey {
                pid: 10,
                start_time: 1,
            }],
        );
        let plan = case.plan();
        assert!(plan.is_empty(), "{plan:?}");
        assert!(plan.files[0].concerns.is_empty());
    }

    #[test]
    fn web_content_needs_nothing_by_default() {
        let mut server = process(10, 1, "nginx");
        server.open = vec![file(3)];
        let plan = Case::new(&[("var/www/index.html", 3)], vec![server]).plan();
        assert!(plan.is_empty());
        let concern = &plan.files[0].concerns[0];
        assert_eq!(concern.decision, Decision::Nothing);
        assert_eq!(concern.reason, "a rule says none");
        assert_eq!(plan.files[0].rule.as_deref(), Some("built-in"));
    }

    #[test]
    fn rules_reload_restart_exec_and_named_processes() {
        let nginx_master = process(10, 1, "nginx");
        let nginx_worker = process(11, 10, "nginx");
        let mut holder = process(20, 1, "holder");
        holder.open = vec![file(2)];
        let mut case = Case::new(
            &[
                ("etc/nginx/nginx.conf", 1),
                ("srv/data.db", 2),
                ("etc/myapp/a.conf", 3),
                ("etc/myapp/b.conf", 4),
            ],
            vec![nginx_master, nginx_worker, holder],
        );
        case.rules = Rules::parse(
            r#"
            [[rule]]
            glob = "/etc/nginx/**"
            action = "reload"
            process = "nginx"
            [[rule]]
            glob = "/srv/*.db"
            action = "none"
            [[rule]]
            glob = "/etc/myapp/*.conf"
            action = "exec"
            command = ["/usr/bin/touch", "/tmp/x"]
            "#,
            std::path::Path::new("r.toml"),
        )
        .unwrap();
        let plan = case.plan();
        // Named by the rule although the open log never saw them; one SIGHUP.
        assert_eq!(pids(&plan.reloads), [10]);
        assert!(plan.restarts.is_empty(), "the held file is ruled none");
        assert_eq!(
            plan.commands,
            [CommandRun {
                argv: vec!["/usr/bin/touch".into(), "/tmp/x".into()],
                paths: vec![path("etc/myapp/a.conf"), path("etc/myapp/b.conf")],
            }]
        );
    }

    #[test]
    fn a_removed_file_reloads_its_readers_and_restarts_nobody() {
        let reader = process(10, 1, "server");
        let mut runner = process(11, 1, "tool");
        runner.exe = Some(file(1));
        let mut case = Case::new(
            &[("usr/bin/tool", 1), ("etc/conf.d/old.conf", 2)],
            vec![reader, runner],
        )
        .opened(2, &[10]);
        for file in &mut case.files {
            file.removed = true;
        }
        let plan = case.plan();
        assert!(plan.restarts.is_empty(), "{plan:?}");
        assert_eq!(pids(&plan.reloads), [10]);
        assert_eq!(
            plan.notes,
            ["tool (pid 11) runs it usr/bin/tool, which the version removes; it is left running"]
        );
    }

    #[test]
    fn interactive_processes_are_left_alone() {
        let mut shell = process(10, 1, "bash");
        shell.interactive = true;
        shell.exe = Some(file(1));
        let mut editor = process(11, 10, "vim");
        editor.interactive = true;
        let daemon = process(12, 1, "daemon");
        let plan = Case::new(
            &[("usr/bin/bash", 1), ("etc/app.conf", 2)],
            vec![shell, editor, daemon],
        )
        .opened(2, &[11, 12])
        .plan();
        assert!(plan.restarts.is_empty(), "{plan:?}");
        assert_eq!(pids(&plan.reloads), [12]);
        let decisions: Vec<(i32, Decision)> = plan
            .files
            .iter()
            .flat_map(|f| f.concerns.iter().map(|c| (c.pid, c.decision)))
            .collect();
        assert_eq!(
            decisions,
            [
                (10, Decision::Nothing),
                (11, Decision::Nothing),
                (12, Decision::Reload)
            ]
        );
        assert_eq!(
            plan.notes,
            ["bash (pid 10) runs it usr/bin/bash and is left running"]
        );
    }

    #[test]
    fn the_agent_and_init_are_never_stopped() {
        let mut init = process(1, 0, "init");
        init.exe = Some(file(1));
        let mut shell = process(5, 1, "sh");
        shell.exe = Some(file(1));
        let mut agent = process(6, 5, "vdsync");
        agent.exe = Some(file(1));
        let mut other = process(7, 1, "other");
        other.exe = Some(file(1));
        let mut case = Case::new(&[("usr/bin/busybox", 1)], vec![init, shell, agent, other]);
        case.untouchable = [5, 6].into_iter().collect();
        let plan = case.plan();
        assert_eq!(pids(&plan.restarts), [7]);
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        assert!(plan.notes[0].contains("sh (pid 5) runs it usr/bin/busybox"));
    }
}
