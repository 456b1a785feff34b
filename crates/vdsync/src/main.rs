//! `vdsync`: the one binary. Parses the command line, sets up logging, calls into the
//! role crates, prints results, and maps failures to exit codes (0 success,
//! 1 failure, 2 usage error). No logic of its own lives here.

mod output;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vdsync",
    version,
    about = "Ship file changes from a development machine to a running fleet in seconds",
    long_about = "vdsync ships file changes made on a development machine to a fleet of running \
machines. `push` turns the changes into a numbered, immutable version at the repository \
(`repo serve`); every machine's `agent` follows the repository's head and applies each \
version atomically. On the development machine, `track` journals every change as it is \
made, so that `status` and `push` read only what changed.\n\nA typical session:\n  \
vdsync repo init --data /srv/vdsync --from-dir /srv/base-tree\n  \
vdsync repo serve --data /srv/vdsync --listen 0.0.0.0:7468\n  \
vdsync agent --root / --repo http://repo:7468     # on every machine\n  \
vdsync track --root /                             # on the development machine, left running\n  \
vdsync status --root /                            # what the next push sends\n  \
vdsync push --root / --repo http://repo:7468 -m 'new nginx.conf'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or serve the repository that stores versions and blobs
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Record every change under the root in a journal (foreground daemon)
    ///
    /// Leave it running on the development machine: `status` and `push` then read
    /// only the paths its journal names (and the tracker makes the push itself), so
    /// a push costs in proportion to the changes, not to the tree. The journal lives
    /// in --state and survives restarts. Changes made while no tracker ran, a
    /// kernel queue that overflowed, or any other doubt mark the part concerned (or
    /// the whole root) for a rescan, which `status` shows and the next push makes.
    /// SIGTERM or Ctrl-C stops it.
    Track(TrackArgs),
    /// Show the changes not yet pushed, like `git status`
    Status(StatusArgs),
    /// Send the development tree's changes as the next version
    ///
    /// With `vdsync track` running on the same --state, only the paths its journal
    /// names are read, and the tracker makes the push (it holds the index and the
    /// repository's connection already); this command prints its report. A full
    /// scan or a large push is made here. Without a tracker, the whole tree is
    /// compared with the last push.
    Push(PushArgs),
    /// Follow the repository and apply every new version to this machine's tree
    Agent(AgentArgs),
    /// List versions: number, time, message, size
    Log(ReadArgs),
    /// List agents: name, version, last contact, last outcome
    Fleet(ReadArgs),
}

#[derive(Subcommand)]
enum RepoCommand {
    /// Record version 0 from a directory tree
    Init(RepoInitArgs),
    /// Serve the repository's HTTP API (foreground)
    Serve(RepoServeArgs),
}

#[derive(Args)]
struct RepoInitArgs {
    /// Directory for the repository's blobs and database (created; must be empty)
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The tree that becomes version 0 (default excludes apply, as for push)
    #[arg(long, value_name = "TREE")]
    from_dir: PathBuf,
    #[command(flatten)]
    excludes: ExcludeArgs,
}

#[derive(Args)]
struct RepoServeArgs {
    /// Directory created by `repo init`
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on (port 0 picks a free port; the address is printed)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7468")]
    listen: String,
}

#[derive(Args, Clone)]
struct ExcludeArgs {
    /// Leave out paths matching this glob, relative to the root (repeatable;
    /// `*` stays within a directory, `**` crosses directories)
    #[arg(long = "exclude", value_name = "GLOB")]
    exclude: Vec<String>,
    /// Do not apply the default excludes (proc, sys, dev, run, tmp, var/tmp,
    /// var/cache, var/log, var/lib/vdsync, etc/machine-id, etc/hostname,
    /// etc/ssh/ssh_host_*, var/lib/cloud)
    #[arg(long)]
    no_default_excludes: bool,
}

#[derive(Args)]
struct PushArgs {
    /// The development tree (`/` on a development machine)
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Repository URL, e.g. http://repo:7468
    #[arg(long, value_name = "URL", env = "VDSYNC_REPO")]
    repo: String,
    /// Development-side state: the index of the last push, and the tracker's
    /// journal and socket when `vdsync track` runs with the same directory
    #[arg(long, value_name = "DIR", default_value = DEV_STATE)]
    state: PathBuf,
    /// Message recorded with the version
    #[arg(short, long, default_value = "")]
    message: String,
    /// Print what would be sent; send and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Compare the whole tree with the last push instead of reading only what the
    /// tracker's journal names (size, mtime, ctime and inode decide which files are
    /// read again). Without a running tracker every push does this.
    #[arg(long)]
    rescan: bool,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    excludes: ExcludeArgs,
}

/// The state directory shared by `track`, `status` and `push`.
const DEV_STATE: &str = "/var/lib/vdsync/track";

#[derive(Args)]
struct TrackArgs {
    /// The development tree (`/` on a development machine)
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Journal, socket and fence files (on another file system than the root, that
    /// one is watched too)
    #[arg(long, value_name = "DIR", default_value = DEV_STATE)]
    state: PathBuf,
    /// How to watch: fanotify (a mark on each whole file system, the root's and
    /// those mounted below it; needs CAP_SYS_ADMIN and a file system with file
    /// handles), inotify (a watch on every directory; works unprivileged), or auto
    /// (fanotify, else inotify)
    #[arg(long, value_enum, default_value = "auto")]
    watcher: WatcherArg,
    #[command(flatten)]
    excludes: ExcludeArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WatcherArg {
    Auto,
    Fanotify,
    Inotify,
}

#[derive(Args)]
struct StatusArgs {
    /// The development tree
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// The state directory used by `track` and `push`
    #[arg(long, value_name = "DIR", default_value = DEV_STATE)]
    state: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    excludes: ExcludeArgs,
}

#[derive(Args)]
#[command(after_help = "\
Processes: before placing a version the agent stops (SIGTERM, parents first; SIGKILL after \
--stop-timeout) every process that runs, maps or holds open a file being replaced, and starts \
it again afterwards exactly as it was (argv, environment, cwd, ids, groups, root, umask, \
limits, stdio), detached. A process that only opened a file before (seen by the agent's open \
log since it started) gets SIGHUP and must re-open it within --reload-window, else it is \
restarted. Interactive processes, init and the agent itself are never touched. \
`--once --plan` shows the decisions without acting; --rules overrides them per glob.

Stopping: SIGTERM or SIGINT stops a following agent between versions (the version in progress \
is placed and reported and its processes started again first), with status 0; a second signal \
stops it at once, and its next start finishes the interrupted version. One agent per --state \
directory: a second one is refused.")]
struct AgentArgs {
    /// The tree this machine runs from (`/` in production)
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Repository URL, e.g. http://repo:7468
    #[arg(long, value_name = "URL", env = "VDSYNC_REPO")]
    repo: String,
    /// Agent state: applied version, journal, staging (staging goes to
    /// ROOT/.vdsync-work instead when this is on another file system than the root)
    #[arg(long, value_name = "DIR", default_value = "/var/lib/vdsync/agent")]
    state: PathBuf,
    /// Name this machine reports under (default: the host name)
    #[arg(long)]
    name: Option<String>,
    /// Catch up to the head, report, and exit (non-zero if a version failed)
    #[arg(long)]
    once: bool,
    /// Seconds to wait before retrying a failed version or an unreachable repository
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    retry_after: u64,
    /// Rules (TOML) overriding what an updated file means for the processes using it:
    /// per glob, action none | auto | reload | restart | exec; first match wins
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// With --once: print, for the pending versions, each file, each process concerned,
    /// the action and why; fetch nothing, change nothing
    #[arg(long, requires = "once")]
    plan: bool,
    /// With --plan: print JSON
    #[arg(long, requires = "plan")]
    json: bool,
    /// Milliseconds between two SIGTERMs when stopping processes (parents first)
    #[arg(long, value_name = "MS", default_value_t = 100)]
    stop_interval: u64,
    /// Seconds a stopped process gets to exit before SIGKILL
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    stop_timeout: u64,
    /// Seconds a reloaded (SIGHUP) process gets to re-open an updated file before it
    /// is stopped and started instead
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    reload_window: f64,
}

#[derive(Args)]
struct ReadArgs {
    /// Repository URL, e.g. http://repo:7468
    #[arg(long, value_name = "URL", env = "VDSYNC_REPO")]
    repo: String,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = matches!(
        cli.command,
        Command::Agent(_) | Command::Repo(RepoCommand::Serve(_))
    );
    init_logging(verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vdsync: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Repo(RepoCommand::Init(args)) => repo_init(args),
        Command::Repo(RepoCommand::Serve(args)) => repo_serve(args),
        Command::Track(args) => track(args),
        Command::Status(args) => status(args),
        Command::Push(args) => push(args),
        Command::Agent(args) => agent(args),
        Command::Log(args) => {
            let client = vdsync_client::Client::new(&args.repo)?;
            let versions = client.versions()?;
            output::print_log(&versions, args.json)
        }
        Command::Fleet(args) => {
            let client = vdsync_client::Client::new(&args.repo)?;
            let agents = client.agents()?;
            output::print_fleet(&agents, args.json)
        }
    }
}

fn excludes_for(
    args: &ExcludeArgs,
    root: &Path,
    state: Option<&Path>,
) -> Result<vdsync_track::Excludes> {
    let (patterns, prefixes) = exclude_spec(args, root, state)?;
    Ok(vdsync_track::Excludes::new(&patterns, prefixes)?)
}

/// The exclude patterns (defaults included) and the paths excluded by location,
/// before they are compiled.
fn exclude_spec(
    args: &ExcludeArgs,
    root: &Path,
    state: Option<&Path>,
) -> Result<(Vec<String>, Vec<vdsync_proto::RepoPath>)> {
    let mut patterns = if args.no_default_excludes {
        Vec::new()
    } else {
        vdsync_track::Excludes::defaults()
    };
    patterns.extend(args.exclude.iter().cloned());
    // The pusher's own state is never shipped, wherever it lives.
    let mut prefixes = Vec::new();
    if let Some(state) = state {
        let root = std::fs::canonicalize(root)
            .with_context(|| format!("cannot open {}", root.display()))?;
        if let Ok(state) = std::fs::canonicalize(state) {
            if let Ok(inside) = state.strip_prefix(&root) {
                use std::os::unix::ffi::OsStrExt;
                if let Ok(path) = vdsync_proto::RepoPath::parse(inside.as_os_str().as_bytes()) {
                    prefixes.push(path);
                }
            }
        }
    }
    Ok((patterns, prefixes))
}

fn repo_init(args: RepoInitArgs) -> Result<()> {
    if !args.from_dir.is_dir() {
        bail!("--from-dir {} is not a directory", args.from_dir.display());
    }
    if args.data.join("versions.redb").exists() {
        bail!("{} already holds a repository", args.data.display());
    }
    if args.data.exists() && std::fs::read_dir(&args.data)?.next().is_some() {
        bail!("--data {} exists and is not empty", args.data.display());
    }
    let excludes = excludes_for(&args.excludes, &args.from_dir, Some(&args.data))?;
    let index = vdsync_track::scan(&args.from_dir, &excludes, &vdsync_track::Index::default())?;
    let created_data_dir = !args.data.exists();
    let result = (|| -> Result<vdsync_proto::wire::VersionInfo> {
        let repository = vdsync_repo::Repository::open(&args.data)?;
        let changeset = vdsync_proto::diff(&Default::default(), &index.manifest(), None);
        store_contents(repository.blobs(), &args.from_dir, &changeset)?;
        let json = serde_json::to_vec(&changeset)?;
        let changeset_hash = vdsync_store::put_bytes(repository.blobs(), &json)?;
        repository.blobs().sync()?;
        Ok(repository.commit(&vdsync_proto::wire::CommitRequest {
            parent: None,
            message: format!("initial tree from {}", args.from_dir.display()),
            changeset: changeset_hash,
        })?)
    })();
    match result {
        Ok(info) => {
            println!(
                "initialized repository in {}: version 0 with {} files, {} directories, {}",
                args.data.display(),
                info.files,
                info.dirs,
                output::human_bytes(info.bytes)
            );
            Ok(())
        }
        Err(err) => {
            // Bad input changes nothing on disk: take back the half-made repository.
            if created_data_dir {
                let _ = std::fs::remove_dir_all(&args.data);
            } else if let Ok(listing) = std::fs::read_dir(&args.data) {
                for item in listing.flatten() {
                    let _ = std::fs::remove_dir_all(item.path())
                        .or_else(|_| std::fs::remove_file(item.path()));
                }
            }
            Err(err)
        }
    }
}

fn store_contents(
    blobs: &dyn vdsync_store::BlobStore,
    root: &Path,
    changeset: &vdsync_proto::Changeset,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for item in &changeset.entries {
        let Some((hash, stored_len)) = item.entry.blob() else {
            continue;
        };
        if blobs.contains(&hash)? {
            continue;
        }
        let full = root.join(std::ffi::OsStr::from_bytes(item.path.as_bytes()));
        let file = std::fs::File::open(&full)
            .with_context(|| format!("cannot read {}", full.display()))?;
        let mut reader = vdsync_store::SegmentReader::from_entry(file, &item.entry.kind);
        let stored = vdsync_store::put_reader(blobs, &mut reader, stored_len)
            .with_context(|| format!("cannot store {}", full.display()))?;
        if stored != hash {
            bail!(
                "{} changed while it was read; run repo init again",
                full.display()
            );
        }
    }
    Ok(())
}

fn repo_serve(args: RepoServeArgs) -> Result<()> {
    if !args.data.join("versions.redb").exists() {
        bail!(
            "{} holds no repository; create one with `vdsync repo init --data {} --from-dir TREE`",
            args.data.display(),
            args.data.display()
        );
    }
    let repository = Arc::new(vdsync_repo::Repository::open(&args.data)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let address = listener.local_addr()?;
        println!("vdsync repository listening on http://{address}");
        use std::io::Write;
        std::io::stdout().flush()?;
        vdsync_repo::serve(repository, listener).await?;
        Ok(())
    })
}

struct Bar(indicatif::ProgressBar);

impl vdsync_track::Progress for Bar {
    fn start(&self, total_bytes: u64) {
        self.0.set_length(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn push(args: PushArgs) -> Result<()> {
    use std::io::IsTerminal;
    if !args.root.is_dir() {
        bail!("--root {} is not a directory", args.root.display());
    }
    tracing::debug!("push: started");
    let (patterns, excluded_paths) = exclude_spec(&args.excludes, &args.root, Some(&args.state))?;
    if !args.rescan && !args.dry_run {
        // A running tracker pushes from its journal itself: it has the index, the
        // repository's connection and the excludes ready.
        let request = vdsync_track::tracker::PushRequest {
            root: std::fs::canonicalize(&args.root)
                .with_context(|| format!("cannot open {}", args.root.display()))?,
            repo: args.repo.clone(),
            message: args.message.clone(),
            excludes: patterns.clone(),
            excluded_paths: excluded_paths.clone(),
        };
        if let Some(report) = vdsync_track::tracker::push_through_tracker(&args.state, request)? {
            tracing::debug!("push: the tracker pushed");
            return output::print_push(&report, false, args.json, true);
        }
    }
    // The HTTP client is built on a thread of its own, and the tracker makes its
    // fence and snapshot in its own process: both are begun first, so that they
    // overlap compiling the excludes and each other.
    let client = vdsync_client::Client::new(&args.repo)?;
    let start = vdsync_track::PushStart::begin(&args.state, args.rescan)?;
    let excludes = vdsync_track::Excludes::new(&patterns, excluded_paths)?;
    let progress: Option<Arc<dyn vdsync_track::Progress>> = if std::io::stderr().is_terminal()
        && !args.json
        && !args.dry_run
    {
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} sent {wide_bar} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(Arc::new(Bar(bar)))
    } else {
        None
    };
    let report = vdsync_track::push_started(
        &client,
        &vdsync_track::PushOptions {
            root: &args.root,
            state_dir: &args.state,
            message: args.message.clone(),
            dry_run: args.dry_run,
            rescan: args.rescan,
            excludes: &excludes,
            progress,
        },
        start,
    )?;
    let printed = output::print_push(&report, args.dry_run, args.json, !args.rescan);
    // Dropping the client shuts its HTTP runtime down and joins its thread, which
    // takes milliseconds after the work is done; the process is about to exit,
    // which ends both anyway.
    std::mem::forget(client);
    printed
}

fn track(args: TrackArgs) -> Result<()> {
    if !args.root.is_dir() {
        bail!("--root {} is not a directory", args.root.display());
    }
    let excludes = excludes_for(&args.excludes, &args.root, Some(&args.state))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let root = args.root.clone();
    let state = args.state.clone();
    let totals = vdsync_track::tracker::run(
        &vdsync_track::tracker::TrackOptions {
            root: &args.root,
            state_dir: &args.state,
            excludes: &excludes,
            watcher: match args.watcher {
                WatcherArg::Auto => vdsync_track::tracker::WatcherChoice::Auto,
                WatcherArg::Fanotify => vdsync_track::tracker::WatcherChoice::Fanotify,
                WatcherArg::Inotify => vdsync_track::tracker::WatcherChoice::Inotify,
            },
        },
        stop,
        &mut |watcher| {
            println!(
                "tracking {} ({watcher}); journal in {}",
                root.display(),
                state.display()
            );
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
    )?;
    // Whoever started the tracker may have stopped reading its output long ago.
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout(),
        "stopped after reading {} event(s) in {} read(s)",
        totals.events,
        totals.reads
    );
    Ok(())
}

/// Sets `stop` on SIGINT or SIGTERM, so a daemon finishes its current batch.
fn stop_on_signals(stop: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    on_stop_signals(
        move || stop.store(true, std::sync::atomic::Ordering::Relaxed),
        || {},
    )
}

/// Held by a following agent while it recovers, applies or reports a version (see
/// `FollowOptions::busy`).
static AGENT_BUSY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// On SIGINT or SIGTERM, waits for the version in progress (if any) to be applied,
/// reported and its processes started again, then exits 0. A second signal exits
/// at once (status 1): the next start finishes an interrupted version.
fn stop_agent_between_versions() -> Result<()> {
    on_stop_signals(
        || {
            tracing::info!("stopping once the version in progress, if any, is done");
            std::thread::spawn(|| {
                let _idle = AGENT_BUSY
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                tracing::info!("stopped between versions");
                std::process::exit(0);
            });
        },
        || {
            eprintln!("vdsync: stopping now, inside a version; the next start finishes it");
            std::process::exit(1);
        },
    )
}

/// Runs `first` on the first SIGINT or SIGTERM and `again` on every later one, on a
/// thread of its own, after logging which process sent the signal. Either signal no
/// longer ends the process by itself.
fn on_stop_signals(
    first: impl FnOnce() + Send + 'static,
    again: impl Fn() + Send + 'static,
) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::iterator::exfiltrator::WithOrigin;
    use signal_hook::iterator::SignalsInfo;
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM])
        .context("cannot install the SIGINT and SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = Some(first);
            for origin in signals.forever() {
                let name = if origin.signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                tracing::info!(signal = name, from = %sender(&origin), "signal received");
                match first.take() {
                    Some(first) => first(),
                    None => again(),
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Who sent a signal, as an operator would look it up: "pid 812 (bash), uid 0", or
/// "the kernel" (a terminal's Ctrl-C comes from the kernel on behalf of the tty).
fn sender(origin: &signal_hook::low_level::siginfo::Origin) -> String {
    use signal_hook::low_level::siginfo::Cause;
    match origin.process {
        // The kernel gives pid 0 for a sender in an ancestor PID namespace.
        Some(process) if process.pid == 0 => {
            format!("a process outside this PID namespace, uid {}", process.uid)
        }
        Some(process) => {
            let command = std::fs::read_to_string(format!("/proc/{}/comm", process.pid))
                .map(|comm| comm.trim_end().to_owned())
                .unwrap_or_else(|_| "gone already".to_owned());
            format!("pid {} ({command}), uid {}", process.pid, process.uid)
        }
        None if origin.cause == Cause::Kernel => "the kernel".to_owned(),
        None => "an unknown sender".to_owned(),
    }
}

fn status(args: StatusArgs) -> Result<()> {
    if !args.root.is_dir() {
        bail!("--root {} is not a directory", args.root.display());
    }
    let excludes = excludes_for(&args.excludes, &args.root, Some(&args.state))?;
    let report = vdsync_track::status::status(&args.root, &args.state, &excludes)?;
    output::print_status(&report, args.json)
}

fn agent(args: AgentArgs) -> Result<()> {
    if !args.root.is_dir() {
        bail!("--root {} is not a directory", args.root.display());
    }
    let name = match args.name {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name; pass --name")?
            .trim()
            .to_owned(),
    };
    let rules = match &args.rules {
        Some(path) => vdsync_agent::rules::Rules::load(path)?,
        None => vdsync_agent::rules::Rules::built_in(),
    };
    if !(args.reload_window.is_finite() && args.reload_window >= 0.0) {
        bail!(
            "--reload-window must be a number of seconds, not {}",
            args.reload_window
        );
    }
    let client = vdsync_client::Client::new(&args.repo)?;
    if args.plan {
        let plans = vdsync_agent::plan_pending(&client, &args.root, &args.state, &rules)?;
        return output::print_plans(&plans, args.json);
    }
    // The open log needs CAP_SYS_ADMIN (fanotify) and CAP_NET_ADMIN (cn_proc);
    // without it the agent still applies versions and restarts what /proc shows.
    let open_log = match vdsync_agent::openlog::OpenLog::start(&args.root) {
        Ok((log, unwatched)) => {
            for (mount, error) in unwatched {
                tracing::warn!(mount = %mount.display(), %error, "opens on this mount are not logged");
            }
            Some(log)
        }
        Err(err) => {
            tracing::warn!(
                error = %err,
                "no open log: processes that only opened a file before will not be reloaded"
            );
            None
        }
    };
    // A signal stops the agent between versions, never inside one: processes it
    // stopped for a version are started again first. (Dying mid-version would be
    // safe for the tree, which the next start rolls forward, but those processes
    // would stay stopped until then; and as PID 1 of a container the agent gets no
    // default action for SIGTERM at all.)
    if !args.once {
        stop_agent_between_versions()?;
    }
    let summary = vdsync_agent::follow(
        &client,
        &vdsync_agent::FollowOptions {
            root: &args.root,
            state_dir: &args.state,
            name: &name,
            once: args.once,
            poll_wait: Duration::from_secs(30),
            retry_after: Duration::from_secs(args.retry_after),
            rules: &rules,
            processes: vdsync_agent::processes::ProcessOptions {
                stop_interval: Duration::from_millis(args.stop_interval),
                stop_timeout: Duration::from_secs(args.stop_timeout),
                reload_window: Duration::from_secs_f64(args.reload_window),
                ..Default::default()
            },
            open_log: open_log.as_ref(),
            busy: Some(&AGENT_BUSY),
        },
    )?;
    for applied in &summary.applied {
        output::print_process_outcomes(applied.version, &applied.processes);
    }
    if args.once {
        match summary.version {
            Some(version) if summary.applied.is_empty() => {
                println!("up to date at version {version}")
            }
            Some(version) => println!(
                "applied {} version(s); now at version {version}",
                summary.applied.len()
            ),
            None => println!("the repository holds no version yet"),
        }
    }
    Ok(())
}
