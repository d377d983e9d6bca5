//! A real nginx (Debian's `/usr/sbin/nginx`) inside a namespace, as a backend or a stand-in.
//!
//! Each instance has its own configuration, PID file and logs in a private temporary
//! directory, runs in the foreground as a child of the test (`daemon off`), answers every
//! request with a body naming it (`backend1\n`), and logs each request as a line starting
//! with the client address. It listens on one address, or on an IPv4 and an IPv6 address at
//! once ([`Nginx::start_dual`]) for dual-stack tests.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::{Netns, NetnsName};
use crate::process::{log_tail, unique_name, wait_until, ChildProcess, Poll, TempDir};
use crate::topology::Topology;

const NGINX: &str = "/usr/sbin/nginx";
/// How long nginx gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long nginx gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One nginx master (with one worker) listening on one port of one or two addresses in a
/// namespace.
#[derive(Debug)]
pub struct Nginx {
    body_name: String,
    netns: NetnsName,
    /// Where it listens: the same port on each address.
    listen: Vec<SocketAddr>,
    /// Holds the process, so it is dropped (stopped) before the directory is removed.
    process: Option<ChildProcess>,
    /// PIDs of every master this instance started, for leak checks.
    spawned_pids: Vec<u32>,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx in `netns`, listening on `address:port` and answering `{body_name}\n`.
    /// Returns once the listening socket exists.
    pub fn start(
        netns: &Netns,
        body_name: &str,
        address: Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_on(netns, body_name, &[address.into()], port)
    }

    /// One nginx per backend of `topology`, each in its namespace on its IPv4 address and
    /// `port`, answering with the backend's name.
    pub fn start_on_backends(topology: &Topology, port: u16) -> anyhow::Result<Vec<Self>> {
        topology
            .backends
            .iter()
            .map(|backend| Self::start(&backend.netns, &backend.name, backend.address, port))
            .collect()
    }

    /// Like [`Nginx::start`], listening on `address` and `address6` (both families), port
    /// `port`; returns once both listening sockets exist.
    pub fn start_dual(
        netns: &Netns,
        body_name: &str,
        address: Ipv4Addr,
        address6: Ipv6Addr,
        port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_on(netns, body_name, &[address.into(), address6.into()], port)
    }

    fn start_on(
        netns: &Netns,
        body_name: &str,
        addresses: &[IpAddr],
        port: u16,
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new(&format!("{}-nginx-{body_name}", unique_name()))?;
        let mut nginx = Self {
            body_name: body_name.to_string(),
            netns: netns.name().clone(),
            listen: addresses
                .iter()
                .map(|&address| SocketAddr::new(address, port))
                .collect(),
            process: None,
            spawned_pids: Vec::new(),
            dir,
        };
        fs::write(nginx.config_path(), nginx.config())
            .with_context(|| format!("writing {}", nginx.config_path().display()))?;
        nginx.start_again()?;
        Ok(nginx)
    }

    /// Starts a stopped instance again, with an empty access log: [`Nginx::access_log_lines`]
    /// covers the current run only.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running()? {
            bail!("{} is already running", self.description());
        }
        fs::write(self.access_log_path(), "")
            .with_context(|| format!("truncating {}", self.access_log_path().display()))?;
        let stderr = fs::File::create(self.dir.path().join("stderr.log"))
            .context("creating nginx's stderr log")?;
        let mut command = self.netns.command(NGINX);
        command
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.config_path())
            .arg("-e")
            .arg(self.error_log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let process = ChildProcess::spawn(&self.description(), &mut command)?;
        self.spawned_pids.push(process.pid());
        self.process = Some(process);
        self.wait_listening()
    }

    /// Stops nginx with SIGTERM to its master, by PID, and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut process) = self.process.take() else {
            return Ok(());
        };
        let status = process.terminate(STOP_TIMEOUT)?;
        // nginx exits 0 on SIGTERM; anything else, or a signal, deserves a look at its logs.
        if !status.success() {
            bail!(
                "{} exited with {status}:\n{}",
                self.description(),
                self.logs()
            );
        }
        Ok(())
    }

    /// Stops and starts again (with a fresh access log).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Stops nginx and removes its directory, reporting errors.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()?;
        let Self { dir, .. } = self;
        dir.remove()
    }

    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        match &mut self.process {
            Some(process) => Ok(process.try_status()?.is_none()),
            None => Ok(false),
        }
    }

    /// The master's PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    pub fn spawned_pids(&self) -> &[u32] {
        &self.spawned_pids
    }

    /// The access log of the current run, one request a line, each starting with the client
    /// address (`10.200.1.2 51234 "GET / HTTP/1.1" 200`).
    pub fn access_log_lines(&self) -> anyhow::Result<Vec<String>> {
        let text = fs::read_to_string(self.access_log_path())
            .with_context(|| format!("reading {}", self.access_log_path().display()))?;
        Ok(text.lines().map(str::to_string).collect())
    }

    /// Serves `contents` at `/files/NAME`, for downloads larger than a name.
    pub fn add_file(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            bail!("{name:?} is not a plain file name");
        }
        let files = self.dir.path().join("files");
        fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
        let path = files.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
    }

    /// The tail of nginx's error log and stderr, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "  error.log:\n{}  stderr:\n{}",
            log_tail(&self.error_log_path(), 20),
            log_tail(&self.dir.path().join("stderr.log"), 20)
        )
    }

    fn description(&self) -> String {
        let listen: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        format!(
            "nginx {} on {} in {}",
            self.body_name,
            listen.join(" and "),
            self.netns
        )
    }

    /// Waits until the listening socket exists. Checked with `ss` rather than a request, which
    /// would add a line from the namespace's own address to the access log the tests read.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        // `ss` writes and reads IPv6 endpoints as [addr]:port, as SocketAddr does.
        let filters: Vec<String> = self
            .listen
            .iter()
            .map(|addr| format!("src {addr}"))
            .collect();
        let what = format!("{} to listen", self.description());
        let netns = self.netns.clone();
        let result = wait_until(START_TIMEOUT, &what, || {
            if let Some(process) = self.process.as_mut() {
                if let Some(status) = process.try_status()? {
                    bail!("nginx exited with {status}");
                }
            }
            for filter in &filters {
                let sockets = netns.exec(["ss", "-H", "-l", "-t", "-n", filter])?;
                if sockets.trim().is_empty() {
                    return Ok(Poll::NotYet(format!("no listening socket ({filter})")));
                }
            }
            Ok(Poll::Ready(()))
        });
        result.with_context(|| format!("starting {}:\n{}", self.description(), self.logs()))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    fn error_log_path(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    fn config(&self) -> String {
        let dir = self.dir.path().display();
        let listen: String = self
            .listen
            .iter()
            .map(|addr| format!("        listen {addr};\n"))
            .collect();
        format!(
            r#"# Written by lb-tests for one instance; everything it writes stays in {dir}.
daemon off;
master_process on;
worker_processes 1;
# Debian has no group "nobody", nginx's compiled-in default.
user nobody nogroup;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;

events {{
    worker_connections 256;
}}

http {{
    log_format lbtests '$remote_addr $remote_port "$request" $status';
    access_log {dir}/access.log lbtests;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # Far above what a test's keep-alive connections use (a request every few hundred ms for
    # under a minute), so nginx never closes one itself and every break is the balancer's.
    keepalive_timeout 300s;
    keepalive_requests 100000;

    server {{
{listen}        location / {{
            default_type text/plain;
            return 200 "{body}\n";
        }}
        # Files written with Nginx::add_file, for downloads larger than a name.
        location /files/ {{
            alias {dir}/files/;
            default_type application/octet-stream;
        }}
    }}
}}
"#,
            body = self.body_name,
        )
    }
}
