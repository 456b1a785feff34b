//! `cargo xtask demo`: the whole product in one minute on one machine.
//!
//! A repository, two long-running agents ("web-1" and "web-2", each with its own root
//! directory standing in for a machine's `/`) and a development tree, all under one
//! scratch directory. The demo waits for both agents to install version 0, edits the
//! development tree, pushes, and shows the change arriving on both machines. Every step
//! prints one line; every child process is killed at the end, also on failure.
//!
//! It is a showcase and a smoke test, not a test suite: correctness lives in the crates'
//! tests, which check far more than this does.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::{
    initialize_repository, narrate, parse_push_report, push_command, run_checked,
    start_repository_server, wait_for_agents_at_version, BackgroundProcesses, Vdsync,
};

/// Long enough for a loaded two-core CI machine, short enough that a hang is noticed.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The "embedded default" tree the repository starts from: the kind of files a small
/// web machine's image carries, with an executable among them so modes are visible.
const DEFAULT_TREE_FILES: &[(&str, &str, u32)] = &[
    (
        "etc/motd",
        "Welcome to a machine managed by vdsync.\n",
        0o644,
    ),
    (
        "etc/app/app.conf",
        "# application settings\nlisten = 0.0.0.0:8080\nworkers = 4\n",
        0o644,
    ),
    (
        "var/www/index.html",
        "<!doctype html>\n<title>vdsync demo</title>\n<h1>Version 0: the base image</h1>\n",
        0o644,
    ),
    (
        "usr/local/bin/tool",
        "#!/bin/sh\necho \"tool from the base image\"\n",
        0o755,
    ),
];

/// A symlink (path, target) and an empty directory complete the tree: both are things a
/// naive file copier forgets.
const DEFAULT_TREE_SYMLINK: (&str, &str) = ("etc/app/current.conf", "app.conf");
const DEFAULT_TREE_EMPTY_DIRECTORY: &str = "var/spool/uploads";

/// What the demo's "developer" changes between version 0 and version 1.
const CHANGED_FILE: &str = "var/www/index.html";
const CHANGED_FILE_CONTENT: &str =
    "<!doctype html>\n<title>vdsync demo</title>\n<h1>Version 1: pushed from the development machine</h1>\n";
const ADDED_FILE: &str = "var/www/about.html";
const ADDED_FILE_CONTENT: &str = "<p>Shipped by vdsync in seconds.</p>\n";
const DELETED_FILE: &str = "etc/motd";

/// The two simulated machines: (agent name, root directory name in the scratch directory).
const MACHINES: [(&str, &str); 2] = [("web-1", "a"), ("web-2", "b")];

pub fn run() -> Result<()> {
    let vdsync = crate::harness::build_release()?;

    // Declared before the processes so it is dropped after them: agents must be dead
    // before the directories they write into are removed.
    let scratch = crate::harness::scratch_directory("demo")?;
    let mut processes = BackgroundProcesses::default();
    narrate(format_args!("working in {}", scratch.path().display()));

    let development_tree = scratch.path().join("dev");
    let push_state = scratch.path().join("dev-state");
    let repository_data = scratch.path().join("repo");
    let logs = scratch.path().join("logs");
    std::fs::create_dir(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    narrate(format_args!(
        "writing the embedded default tree to dev/: {} files, a symlink, an empty directory",
        DEFAULT_TREE_FILES.len()
    ));
    write_default_tree(&development_tree)?;

    narrate("vdsync repo init --data repo --from-dir dev");
    let init_output = initialize_repository(&vdsync, &repository_data, &development_tree)?;
    print_indented(&init_output);

    narrate("vdsync repo serve --data repo --listen 127.0.0.1:0 (in the background)");
    let repository_url = start_repository_server(
        &vdsync,
        &repository_data,
        &logs.join("repository.log"),
        &mut processes,
    )?;
    println!("    listening on {repository_url}");

    let mut machine_roots = Vec::new();
    for (agent_name, root_name) in MACHINES {
        let machine_root = scratch.path().join(root_name);
        std::fs::create_dir(&machine_root)
            .with_context(|| format!("cannot create {}", machine_root.display()))?;
        narrate(format_args!(
            "vdsync agent --root {root_name}/ --name {agent_name} (in the background, following the head)"
        ));
        let mut agent_command =
            vdsync.command(["agent", "--name", agent_name, "--repo", &repository_url]);
        agent_command
            .arg("--root")
            .arg(&machine_root)
            .arg("--state")
            .arg(scratch.path().join(format!("{root_name}-state")));
        processes.spawn(
            agent_name,
            &mut agent_command,
            &logs.join(format!("{agent_name}.log")),
        )?;
        machine_roots.push((agent_name, machine_root));
    }

    narrate(format_args!(
        "waiting for web-1 and web-2 to apply version 0 (at most {} s)",
        APPLY_TIMEOUT.as_secs()
    ));
    let waited = wait_for_fleet_version(&vdsync, &repository_url, 0, &mut processes)?;
    check_machines_match(&development_tree, &machine_roots)?;
    println!(
        "    both machines hold version 0 after {:.1} s, identical to dev/",
        waited.as_secs_f64()
    );

    narrate(format_args!(
        "editing dev/: rewrite {CHANGED_FILE}, add {ADDED_FILE}, delete {DELETED_FILE}"
    ));
    edit_development_tree(&development_tree)?;

    narrate("vdsync push --rescan -m \"demo change\"");
    let push_output = run_checked(
        push_command(
            &vdsync,
            &repository_url,
            &development_tree,
            &push_state,
            "demo change",
        )
        .arg("--rescan"),
    )?;
    let pushed_version = parse_push_report(&push_output)?
        .version
        .with_context(|| format!("`vdsync push` made no version: {}", push_output.trim()))?;
    println!("    {}", push_output.trim());

    narrate(format_args!(
        "waiting for web-1 and web-2 to apply version {pushed_version} (at most {} s)",
        APPLY_TIMEOUT.as_secs()
    ));
    let waited = wait_for_fleet_version(&vdsync, &repository_url, pushed_version, &mut processes)?;
    check_machines_match(&development_tree, &machine_roots)?;
    println!(
        "    both machines hold version {pushed_version} {:.1} s after the push, identical to dev/",
        waited.as_secs_f64()
    );

    narrate("vdsync log");
    print_indented(&run_checked(&mut vdsync.command([
        "log",
        "--repo",
        &repository_url,
    ]))?);
    narrate("vdsync fleet");
    print_indented(&run_checked(&mut vdsync.command([
        "fleet",
        "--repo",
        &repository_url,
    ]))?);

    for (agent_name, machine_root) in &machine_roots {
        let changed_path = machine_root.join(CHANGED_FILE);
        narrate(format_args!("{CHANGED_FILE} on {agent_name}:"));
        let content = std::fs::read_to_string(&changed_path)
            .with_context(|| format!("cannot read {}", changed_path.display()))?;
        print_indented(&content);
        if machine_root.join(DELETED_FILE).symlink_metadata().is_ok() {
            bail!("{DELETED_FILE} still exists on {agent_name}");
        }
    }

    narrate("stopping the agents and the repository, removing the scratch directory");
    processes.stop_all();
    drop(scratch);
    println!("demo finished: one push reached both machines");
    Ok(())
}

fn write_default_tree(development_tree: &Path) -> Result<()> {
    for (relative_path, content, mode) in DEFAULT_TREE_FILES {
        write_file(&development_tree.join(relative_path), content, *mode)?;
    }
    let (link_path, link_target) = DEFAULT_TREE_SYMLINK;
    let link_path = development_tree.join(link_path);
    std::os::unix::fs::symlink(link_target, &link_path)
        .with_context(|| format!("cannot create symlink {}", link_path.display()))?;
    let empty_directory = development_tree.join(DEFAULT_TREE_EMPTY_DIRECTORY);
    std::fs::create_dir_all(&empty_directory)
        .with_context(|| format!("cannot create {}", empty_directory.display()))?;
    Ok(())
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))?;
    // Set explicitly: the umask of whoever runs the demo must not decide the modes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn edit_development_tree(development_tree: &Path) -> Result<()> {
    write_file(
        &development_tree.join(CHANGED_FILE),
        CHANGED_FILE_CONTENT,
        0o644,
    )?;
    write_file(
        &development_tree.join(ADDED_FILE),
        ADDED_FILE_CONTENT,
        0o644,
    )?;
    let deleted_path = development_tree.join(DELETED_FILE);
    std::fs::remove_file(&deleted_path)
        .with_context(|| format!("cannot delete {}", deleted_path.display()))
}

/// Waits until both demo agents report `version` to the repository.
fn wait_for_fleet_version(
    vdsync: &Vdsync,
    repository_url: &str,
    version: u64,
    processes: &mut BackgroundProcesses,
) -> Result<Duration> {
    let agent_names = MACHINES.map(|(agent_name, _)| agent_name);
    wait_for_agents_at_version(
        vdsync,
        repository_url,
        &agent_names,
        version,
        APPLY_TIMEOUT,
        processes,
    )
}

fn check_machines_match(development_tree: &Path, machine_roots: &[(&str, PathBuf)]) -> Result<()> {
    for (agent_name, machine_root) in machine_roots {
        let expected = vdsync_test_support::describe_tree(development_tree, &[]);
        let applied = vdsync_test_support::describe_tree(machine_root, &[]);
        if let Some(differences) = vdsync_test_support::tree_differences(&expected, &applied) {
            bail!("{agent_name} reports the version applied, but its tree differs from dev/:\n{differences}");
        }
    }
    Ok(())
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}
