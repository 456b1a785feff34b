//! A real nginx (master and two workers) running from a test tree, for tests of
//! how vdsync reloads and restarts it, plus a minimal HTTP/1.0 client to ask it
//! which configuration is live.
//!
//! The configuration uses only paths relative to nginx's prefix (`-p ROOT/`), so the
//! same text is valid in a developer's tree and in any machine root it is shipped
//! to; only the port is baked in. The live configuration shows itself in every
//! response's `X-Config-Version` header and in the body of `/config-version`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::processes::{
    kill_and_wait, pids_listening_on, pids_with_cmdline_containing, process_children, process_comm,
    process_is_running, terminate_until_none_left, ReapedChild,
};
use crate::try_wait_until;

/// Debian's nginx.
pub const NGINX_BINARY: &str = "/usr/sbin/nginx";

/// How long nginx gets to answer after being started.
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How many workers the configuration asks for.
pub const NGINX_WORKER_PROCESSES: usize = 2;

/// The configuration file's path inside a tree.
pub const NGINX_CONF_RELATIVE: &str = "etc/nginx/nginx.conf";

/// The text of `etc/nginx/nginx.conf` for a server on 127.0.0.1:`port` whose
/// responses carry `X-Config-Version: <config_version>`. `config_version` must not
/// contain `"` or a newline.
///
/// - `daemon off`: the master stays the child of whoever started it, and the
///   fixture reaps it the moment it exits. A daemonized master is an orphan, and
///   pid 1 here (the VM's init) reaps orphans only every second or two, so a killed
///   daemon would linger as a zombie that process scans still see. The
///   master/worker structure is the same either way.
/// - `user root`: test trees live under 0700 temporary directories, which workers
///   running as `nobody` could not traverse (every page would be a 403).
pub fn nginx_config(port: u16, config_version: &str) -> String {
    format!(
        r#"# Written by vdsync-test-support's Nginx fixture. Relative paths are relative
# to the prefix given with -p (the root of the tree).
user root;
daemon off;
master_process on;
worker_processes {NGINX_WORKER_PROCESSES};
pid run/nginx.pid;
lock_file run/nginx.lock;
error_log var/log/nginx/error.log notice;

events {{
    worker_connections 64;
}}

http {{
    access_log var/log/nginx/access.log;
    client_body_temp_path var/lib/nginx/body;
    proxy_temp_path var/lib/nginx/proxy;
    fastcgi_temp_path var/lib/nginx/fastcgi;
    uwsgi_temp_path var/lib/nginx/uwsgi;
    scgi_temp_path var/lib/nginx/scgi;
    types {{
        text/html html;
    }}
    default_type text/plain;

    server {{
        listen 127.0.0.1:{port};
        root var/www;
        add_header X-Config-Version "{config_version}" always;

        location = /config-version {{
            return 200 "{config_version}\n";
        }}
    }}
}}
"#
    )
}

/// A response from [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as sent, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header_name, _)| header_name.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// `GET path` over HTTP/1.0 to 127.0.0.1:`port`, reading until the server closes.
/// Connecting, reading and writing each give up after a few seconds.
pub fn http_get(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    const IO_TIMEOUT: Duration = Duration::from_secs(5);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    })
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let header_end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..header_end]).ok()?;
    let mut lines = head.split("\r\n");
    // "HTTP/1.1 200 OK"
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(HttpResponse {
        status,
        headers,
        body: raw[header_end + 4..].to_vec(),
    })
}

/// nginx serving a test tree on a loopback port; on drop, every nginx process of
/// this tree is killed, whichever master is current by then.
pub struct Nginx {
    pub root: PathBuf,
    pub port: u16,
    /// `<root>/etc/nginx/nginx.conf`, absolute, as given to `-c`.
    pub conf: PathBuf,
    /// `<root>/run/nginx.pid`.
    pub pid_file: PathBuf,
    /// The master this fixture started (restarts by vdsync replace it).
    started: ReapedChild,
}

impl Nginx {
    /// Writes the files nginx needs under `root`: the configuration (see
    /// [`nginx_config`]), `var/www/index.html` (unless it exists) and the log, run
    /// and temporary directories.
    pub fn write_tree(root: &Path, port: u16, config_version: &str) {
        for dir in [
            "etc/nginx",
            "var/www",
            "var/log/nginx",
            "var/lib/nginx",
            "run",
        ] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        }
        let conf = root.join(NGINX_CONF_RELATIVE);
        std::fs::write(&conf, nginx_config(port, config_version))
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", conf.display()));
        let index = root.join("var/www/index.html");
        if !index.exists() {
            std::fs::write(&index, "hello from vdsync-test-support\n")
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", index.display()));
        }
    }

    /// Writes the tree (configuration version "1") and starts Debian's nginx on it.
    pub fn start(root: &Path, port: u16) -> Nginx {
        Nginx::write_tree(root, port, "1");
        Nginx::launch(Path::new(NGINX_BINARY), root, port)
    }

    /// The command that runs `binary` on the tree at `root`:
    /// `BINARY -c ROOT/etc/nginx/nginx.conf -p ROOT/`, from `/`, stdin closed.
    pub fn command(binary: &Path, root: &Path) -> Command {
        let mut prefix = root.as_os_str().to_owned();
        prefix.push("/");
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(root.join(NGINX_CONF_RELATIVE))
            .arg("-p")
            .arg(prefix)
            .current_dir("/")
            .stdin(Stdio::null());
        command
    }

    /// Starts `binary` on an already written tree and waits until it answers on
    /// `port` with all its workers. Its stdout and stderr (where nginx reports
    /// errors from before its error log is open) go to `var/log/nginx/stderr.log`.
    /// Panics with nginx's logs if it does not come up.
    pub fn launch(binary: &Path, root: &Path, port: u16) -> Nginx {
        let root = std::path::absolute(root)
            .unwrap_or_else(|err| panic!("cannot make {} absolute: {err}", root.display()));
        let stderr_log = root.join("var/log/nginx/stderr.log");
        let output = File::create(&stderr_log)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", stderr_log.display()));
        let output_copy = output
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot duplicate a descriptor: {err}"));
        let mut command = Nginx::command(binary, &root);
        command.stdout(output).stderr(output_copy);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let nginx = Nginx {
            conf: root.join(NGINX_CONF_RELATIVE),
            pid_file: root.join("run/nginx.pid"),
            started: ReapedChild::new(child),
            root,
            port,
        };
        let answered = try_wait_until(NGINX_START_TIMEOUT, "nginx to answer", || {
            if nginx.started.has_exited() {
                return Err("nginx exited");
            }
            Ok(http_get(port, "/").is_ok() && nginx.worker_pids().len() >= NGINX_WORKER_PROCESSES)
        });
        if let Err(message) = answered {
            panic!("{message}\n{}", nginx.logs());
        }
        nginx
    }

    /// The error log and what nginx printed, for failure messages.
    pub fn logs(&self) -> String {
        let read = |relative: &str| {
            std::fs::read_to_string(self.root.join(relative))
                .unwrap_or_else(|err| format!("({err})"))
        };
        format!(
            "nginx stderr:\n{}\nnginx error.log:\n{}",
            read("var/log/nginx/stderr.log"),
            read("var/log/nginx/error.log")
        )
    }

    /// Every running process whose command line mentions this tree's configuration:
    /// normally one master, two while nginx upgrades its binary on SIGUSR2. The
    /// master's title ("nginx: master process BINARY -c CONF -p ROOT/") keeps the
    /// configuration path; workers' titles ("nginx: worker process") do not, so they
    /// are found as the master's children instead.
    pub fn master_pids(&self) -> Vec<u32> {
        pids_with_cmdline_containing(&self.conf.to_string_lossy())
    }

    /// The current master: the pid file's, if that process still runs this tree's
    /// configuration, else the first process found that does.
    pub fn master_pid(&self) -> Option<u32> {
        let from_pid_file = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|content| content.trim().parse().ok());
        let masters = self.master_pids();
        match from_pid_file {
            Some(pid) if masters.contains(&pid) => Some(pid),
            _ => masters.into_iter().next(),
        }
    }

    /// The current master's running children (its workers).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.master_pid().map(process_children).unwrap_or_default()
    }

    /// `GET path` from this nginx.
    pub fn get(&self, path: &str) -> std::io::Result<HttpResponse> {
        http_get(self.port, path)
    }

    /// The `X-Config-Version` header of `/config-version`, i.e. which configuration
    /// is live; `None` if nginx does not answer.
    pub fn config_version(&self) -> Option<String> {
        let response = self.get("/config-version").ok()?;
        response.header("X-Config-Version").map(str::to_owned)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Masters of this tree, plus any nginx still holding the port: after a
        // botched restart a worker can outlive its master and keep listening.
        let found =
            terminate_until_none_left("nginx", Duration::from_secs(10), || {
                let mut pids = self.master_pids();
                pids.extend(pids_listening_on(self.port).into_iter().filter(|&pid| {
                    process_comm(pid).is_some_and(|comm| comm.starts_with("nginx"))
                }));
                pids
            });
        if let Err(message) = found {
            eprintln!(
                "warning: cannot stop nginx of {}: {message}",
                self.root.display()
            );
        }
        if process_is_running(self.started.pid) {
            let _ = kill_and_wait(&[self.started.pid], Duration::from_secs(10));
        }
        self.started.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_with_headers_and_body() {
        let response = parse_http_response(
            b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nX-Config-Version: 3\r\n\r\nbody\r\n",
        )
        .expect("a valid response");
        assert_eq!(response.status, 404);
        assert_eq!(response.header("x-config-version"), Some("3"));
        assert_eq!(response.body, b"body\r\n");
    }

    #[test]
    fn rejects_a_truncated_response() {
        assert_eq!(parse_http_response(b"HTTP/1.1 200 OK\r\nServer: ng"), None);
    }
}
