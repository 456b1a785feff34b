//! A real redis-server running from a copy of its binary inside a test tree, for
//! tests of how vdsync restarts a server whose binary was replaced.
//!
//! Unlike nginx, Redis has no prefix option, so its configuration holds absolute
//! paths into the tree: [`redis_config`] takes the root it will run from.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::processes::{
    kill_and_wait, pids_listening_on, pids_with_cmdline_containing, process_comm,
    process_is_running, terminate_until_none_left, ReapedChild,
};
use crate::try_wait_until;

/// Debian's redis-server: a symlink to `redis-check-rdb`, one multi-call binary.
pub const REDIS_SERVER_BINARY: &str = "/usr/bin/redis-server";

/// The configuration file's path inside a tree.
pub const REDIS_CONF_RELATIVE: &str = "etc/redis/redis.conf";

/// Where [`Redis::install_binary`] puts the copy, inside a tree.
pub const REDIS_BINARY_RELATIVE: &str = "usr/bin/redis-server";

/// How long Redis gets to answer PING after being started.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Quotes a value for redis.conf, which splits unquoted values at spaces.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.to_string_lossy())
}

/// The text of `etc/redis/redis.conf` for a server on 127.0.0.1:`port` that keeps
/// its pid file, log and (never written) data under `root`.
///
/// `set-proc-title no`: by default Redis overwrites its argv with
/// "BINARY 127.0.0.1:PORT", after which /proc/PID/cmdline no longer names the
/// configuration file, and neither vdsync nor this fixture could tell which
/// configuration the process runs or restart it with the same arguments.
pub fn redis_config(root: &Path, port: u16) -> String {
    format!(
        "# Written by vdsync-test-support's Redis fixture.
port {port}
bind 127.0.0.1
protected-mode no
daemonize no
supervised no
set-proc-title no
pidfile {pid_file}
logfile {log_file}
dir {data_dir}
save \"\"
appendonly no
",
        pid_file = quoted(&root.join("run/redis/redis-server.pid")),
        log_file = quoted(&root.join("var/log/redis/redis-server.log")),
        data_dir = quoted(&root.join("var/lib/redis")),
    )
}

/// Sends PING to 127.0.0.1:`port` and returns true on `+PONG`; false on anything
/// else, including no answer within a second.
pub fn redis_ping(port: u16) -> bool {
    const IO_TIMEOUT: Duration = Duration::from_secs(1);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, IO_TIMEOUT) else {
        return false;
    };
    if stream.set_read_timeout(Some(IO_TIMEOUT)).is_err() || stream.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// redis-server serving 127.0.0.1:`port` from a test tree; on drop, whatever Redis
/// process then serves this tree's configuration or port is killed.
pub struct Redis {
    pub root: PathBuf,
    pub port: u16,
    /// `<root>/etc/redis/redis.conf`, absolute, the server's only argument.
    pub conf: PathBuf,
    /// `<root>/run/redis/redis-server.pid`.
    pub pid_file: PathBuf,
    /// The server this fixture started (restarts by vdsync replace it).
    started: ReapedChild,
}

impl Redis {
    /// Copies Debian's redis-server into `<root>/usr/bin/redis-server` and returns
    /// the copy's path. The real file is copied (the installed name is a symlink),
    /// and the copy must keep the name `redis-server`: the binary is multi-call and
    /// picks its role from `argv[0]`, so a copy named `redis-check-rdb` would check
    /// RDB files instead of serving.
    pub fn install_binary(root: &Path) -> PathBuf {
        let source = std::fs::canonicalize(REDIS_SERVER_BINARY)
            .unwrap_or_else(|err| panic!("cannot resolve {REDIS_SERVER_BINARY}: {err}"));
        let target = root.join(REDIS_BINARY_RELATIVE);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        }
        crate::copy_executable(&source, &target);
        target
    }

    /// Writes the configuration (see [`redis_config`]) and the directories it names;
    /// returns the configuration's path.
    pub fn write_config(root: &Path, port: u16) -> PathBuf {
        let root = std::path::absolute(root)
            .unwrap_or_else(|err| panic!("cannot make {} absolute: {err}", root.display()));
        for dir in ["etc/redis", "run/redis", "var/log/redis", "var/lib/redis"] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        }
        let conf = root.join(REDIS_CONF_RELATIVE);
        std::fs::write(&conf, redis_config(&root, port))
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", conf.display()));
        conf
    }

    /// Writes the configuration and starts `binary` (normally the copy from
    /// [`Redis::install_binary`]) on it.
    pub fn start(binary: &Path, root: &Path, port: u16) -> Redis {
        Redis::write_config(root, port);
        Redis::launch(binary, root, port)
    }

    /// The command that runs `binary` on the tree at `root`:
    /// `BINARY ROOT/etc/redis/redis.conf`, from `/`, stdin closed.
    pub fn command(binary: &Path, root: &Path) -> Command {
        let mut command = Command::new(binary);
        command
            .arg(root.join(REDIS_CONF_RELATIVE))
            .current_dir("/")
            .stdin(Stdio::null());
        command
    }

    /// Starts `binary` on an already written configuration and waits until it
    /// answers PING. Its stdout and stderr (errors from before its log file is open)
    /// go to `var/log/redis/stderr.log`. Panics with its logs if it does not come up.
    pub fn launch(binary: &Path, root: &Path, port: u16) -> Redis {
        let root = std::path::absolute(root)
            .unwrap_or_else(|err| panic!("cannot make {} absolute: {err}", root.display()));
        let stderr_log = root.join("var/log/redis/stderr.log");
        let output = File::create(&stderr_log)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", stderr_log.display()));
        let output_copy = output
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot duplicate a descriptor: {err}"));
        let mut command = Redis::command(binary, &root);
        command.stdout(output).stderr(output_copy);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let redis = Redis {
            conf: root.join(REDIS_CONF_RELATIVE),
            pid_file: root.join("run/redis/redis-server.pid"),
            started: ReapedChild::new(child),
            root,
            port,
        };
        let answered = try_wait_until(REDIS_START_TIMEOUT, "redis to answer PING", || {
            if redis.started.has_exited() {
                return Err("redis-server exited");
            }
            Ok(redis.ping())
        });
        if let Err(message) = answered {
            panic!("{message}\n{}", redis.logs());
        }
        redis
    }

    /// What Redis printed and logged, for failure messages.
    pub fn logs(&self) -> String {
        let read = |relative: &str| {
            std::fs::read_to_string(self.root.join(relative))
                .unwrap_or_else(|err| format!("({err})"))
        };
        format!(
            "redis stderr:\n{}\nredis log:\n{}",
            read("var/log/redis/stderr.log"),
            read("var/log/redis/redis-server.log")
        )
    }

    /// True if Redis answers PING now.
    pub fn ping(&self) -> bool {
        redis_ping(self.port)
    }

    /// Waits until Redis answers PING; panics with its logs after `timeout`.
    pub fn wait_ping(&self, timeout: Duration) {
        if let Err(message) = try_wait_until(timeout, "redis to answer PING", || {
            Ok::<bool, String>(self.ping())
        }) {
            panic!("{message}\n{}", self.logs());
        }
    }

    /// Running processes started with this tree's configuration (normally one).
    pub fn server_pids(&self) -> Vec<u32> {
        pids_with_cmdline_containing(&self.conf.to_string_lossy())
    }

    /// The pid of the server now listening on the port, if any.
    pub fn listening_pid(&self) -> Option<u32> {
        pids_listening_on(self.port).into_iter().next()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let found =
            terminate_until_none_left("redis", Duration::from_secs(10), || {
                let mut pids = self.server_pids();
                pids.extend(pids_listening_on(self.port).into_iter().filter(|&pid| {
                    process_comm(pid).is_some_and(|comm| comm.starts_with("redis"))
                }));
                pids
            });
        if let Err(message) = found {
            eprintln!(
                "warning: cannot stop redis of {}: {message}",
                self.root.display()
            );
        }
        if process_is_running(self.started.pid) {
            let _ = kill_and_wait(&[self.started.pid], Duration::from_secs(10));
        }
        self.started.join();
    }
}
