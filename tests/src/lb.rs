//! lb-user, run in the lb namespace the way an operator runs it, and its `stats --json`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::{config_toml, ServiceConfig};
use crate::netns::{Netns, NetnsName};
use crate::process::{
    command_line, log_tail, run_stdout, unique_name, wait_until, ChildProcess, Poll, TempDir,
};
use crate::topology::PUBLIC_INTERFACE;

/// How long lb-user gets to load, attach and open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long lb-user gets to detach and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The lb-user binary: `$LB_USER_BIN` if set, else `target/<profile>/lb-user` next to the
/// running executable (a test binary in `target/<profile>/deps/`, or xtask in
/// `target/<profile>/`).
pub fn lb_user_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LB_USER_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("LB_USER_BIN is {}, which is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent directory")?;
    }
    let path = dir.join("lb-user");
    if !path.is_file() {
        bail!(
            "{} not found: build it first: cargo build -p lb-user",
            path.display()
        );
    }
    Ok(path)
}

/// lb-user running in the lb namespace on [`PUBLIC_INTERFACE`], with its config, control
/// socket and log (stdout and stderr, `RUST_LOG=info`) in a private directory. Stopped with
/// SIGTERM on drop; its log is printed if the thread is panicking (a failing test).
///
/// `LB_XDP_MODE=skb` (or `native`) in the environment is passed on as `--xdp-mode`, to run the
/// same tests against the generic XDP path.
#[derive(Debug)]
pub struct LoadBalancer {
    netns: NetnsName,
    binary: PathBuf,
    process: Option<ChildProcess>,
    spawned_pid: u32,
    /// The private directory; `dir_path` stays valid for messages after it is removed.
    dir: Option<TempDir>,
    dir_path: PathBuf,
}

impl LoadBalancer {
    /// Writes `config`, starts lb-user and waits (bounded) until its control socket answers.
    pub fn start(netns: &Netns, config: &str) -> anyhow::Result<Self> {
        Self::start_in_mode(netns, config, None)
    }

    /// Starts lb-user with `services` (see [`LoadBalancer::start`]) and waits up to `timeout`
    /// until every backend of them is up.
    pub fn start_serving(
        netns: &Netns,
        services: &[ServiceConfig],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut lb = Self::start(netns, &config_toml(services))?;
        let backends = services.iter().map(|service| service.backends.len()).sum();
        lb.wait_backends_up(backends, timeout)?;
        Ok(lb)
    }

    /// [`LoadBalancer::start`] with `--xdp-mode MODE` (`native`, `skb`), whatever
    /// `LB_XDP_MODE` says; `None` leaves it to `LB_XDP_MODE`.
    pub fn start_in_mode(netns: &Netns, config: &str, mode: Option<&str>) -> anyhow::Result<Self> {
        let binary = lb_user_binary()?;
        let dir = TempDir::new(&format!("{}-lb", unique_name()))?;
        let mut command = launch_command(netns.name(), &binary, dir.path(), config, mode)?;
        let process = ChildProcess::spawn("lb-user", &mut command)?;
        let mut lb = Self {
            netns: netns.name().clone(),
            binary,
            spawned_pid: process.pid(),
            process: Some(process),
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
        };
        lb.wait_ready()?;
        Ok(lb)
    }

    /// Runs lb-user with `config` and waits up to `timeout` for it to exit on its own, as it
    /// must for a bad config. Returns its exit status and its log (stdout and stderr).
    pub fn run_to_exit(
        netns: &Netns,
        config: &str,
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, String)> {
        let binary = lb_user_binary()?;
        let dir = TempDir::new(&format!("{}-lb", unique_name()))?;
        let mut command = launch_command(netns.name(), &binary, dir.path(), config, None)?;
        let mut process = ChildProcess::spawn("lb-user", &mut command)?;
        let status = process.wait_exit(timeout)?;
        let log =
            fs::read_to_string(dir.path().join("lb-user.log")).context("reading lb-user's log")?;
        match status {
            Some(status) => Ok((status, log)),
            None => bail!("lb-user was still running after {timeout:?}; its log:\n{log}"),
        }
    }

    /// `lb-user stats --json`, parsed.
    pub fn stats_json(&self) -> anyhow::Result<Stats> {
        let text = self.stats_command(true)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `lb-user stats --json`: {text}"))
    }

    /// `lb-user stats`: the human-readable table.
    pub fn stats_text(&self) -> anyhow::Result<String> {
        self.stats_command(false)
    }

    /// Replaces the configuration file lb-user was started with by `config` and runs
    /// `lb-user reload`, as an operator adding or removing a backend does. Returns lb-user's
    /// message; a refused reload is an error (with the log).
    pub fn reload(&self, config: &str) -> anyhow::Result<String> {
        let path = self.config_path();
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        self.control(["reload"])
    }

    /// `lb-user drain --service SERVICE --backend BACKEND` (`ADDRESS:PORT`); returns its message.
    pub fn drain(&self, service: &str, backend: &str) -> anyhow::Result<String> {
        self.control(["drain", "--service", service, "--backend", backend])
    }

    /// `lb-user undrain --service SERVICE --backend BACKEND`; returns its message.
    pub fn undrain(&self, service: &str, backend: &str) -> anyhow::Result<String> {
        self.control(["undrain", "--service", service, "--backend", backend])
    }

    /// `lb-user flows --json`, optionally filtered by service name and backend
    /// (`ADDRESS:PORT`), parsed.
    pub fn flows(&self, service: Option<&str>, backend: Option<&str>) -> anyhow::Result<Vec<Flow>> {
        let mut args = vec!["flows", "--json"];
        if let Some(service) = service {
            args.extend(["--service", service]);
        }
        if let Some(backend) = backend {
            args.extend(["--backend", backend]);
        }
        let text = self.control(args)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `lb-user flows --json`: {text}"))
    }

    /// Waits until at least `count` backends (over all services) are up.
    pub fn wait_backends_up(&mut self, count: usize, timeout: Duration) -> anyhow::Result<Stats> {
        let result = wait_until(timeout, &format!("{count} backends up"), || {
            self.check_running()?;
            let stats = self.stats_json()?;
            if stats.backends_up() >= count {
                return Ok(Poll::Ready(stats));
            }
            Ok(Poll::NotYet(stats.backend_states()))
        });
        result.map_err(|error| self.with_log(error))
    }

    /// Waits until lb-user's log contains `text`.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let result = wait_until(timeout, &format!("lb-user to log {text:?}"), || {
            if self.log().contains(text) {
                return Ok(Poll::Ready(()));
            }
            Ok(Poll::NotYet("not in the log yet".to_string()))
        });
        result.map_err(|error| self.with_log(error))
    }

    /// Waits until the backend at `address` is in `state` (`"up"` or `"down"`).
    pub fn wait_backend_state(
        &mut self,
        address: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<Stats> {
        let result = wait_until(timeout, &format!("backend {address} {state}"), || {
            self.check_running()?;
            let stats = self.stats_json()?;
            if stats.backend(address)?.state == state {
                return Ok(Poll::Ready(stats));
            }
            Ok(Poll::NotYet(stats.backend_states()))
        });
        result.map_err(|error| self.with_log(error))
    }

    /// Sends SIGTERM by PID and requires exit status 0 within 5 s.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut process) = self.process.take() else {
            return Ok(());
        };
        let status = process
            .terminate(STOP_TIMEOUT)
            .map_err(|error| self.with_log(error))?;
        if status.code() != Some(0) {
            bail!(
                "lb-user exited with {status} after SIGTERM, not 0\n{}",
                self.log_excerpt()
            );
        }
        Ok(())
    }

    /// Stops lb-user (see [`LoadBalancer::stop`]) and removes its directory.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.dir.take().map(TempDir::remove).transpose()?;
        Ok(())
    }

    /// lb-user's PID (also after it stopped), for leak checks.
    pub fn spawned_pid(&self) -> u32 {
        self.spawned_pid
    }

    /// Everything lb-user logged so far.
    pub fn log(&self) -> String {
        let path = self.log_path();
        fs::read_to_string(&path)
            .unwrap_or_else(|error| format!("(reading {}: {error})", path.display()))
    }

    /// `error`, followed by the tail of lb-user's log.
    fn with_log(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!("{error:#}\n{}", self.log_excerpt())
    }

    fn log_excerpt(&self) -> String {
        format!(
            "lb-user log ({}):\n{}",
            self.log_path().display(),
            log_tail(&self.log_path(), 60)
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir_path.join("lb-user.log")
    }

    fn socket_path(&self) -> PathBuf {
        self.dir_path.join("ctl.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir_path.join("lb.toml")
    }

    /// Runs `lb-user ARGS --socket SOCKET` in the lb namespace and returns its stdout; a
    /// failure carries lb-user's log.
    fn control<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.netns.command(&self.binary);
        command.args(args).arg("--socket").arg(self.socket_path());
        run_stdout(&mut command).map_err(|error| self.with_log(error.into()))
    }

    /// An error (with the log) if lb-user has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        let status = match &mut self.process {
            Some(process) => process.try_status()?,
            None => bail!("lb-user was stopped"),
        };
        if let Some(status) = status {
            bail!("lb-user exited with {status}");
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let socket = self.socket_path();
        let result = wait_until(START_TIMEOUT, "lb-user's control socket", || {
            self.check_running()?;
            if !socket.exists() {
                return Ok(Poll::NotYet(format!("no {}", socket.display())));
            }
            match self.stats_json() {
                Ok(_) => Ok(Poll::Ready(())),
                Err(error) => Ok(Poll::NotYet(format!("{error:#}"))),
            }
        });
        result.map_err(|error| self.with_log(error.context("starting lb-user")))
    }

    fn stats_command(&self, json: bool) -> anyhow::Result<String> {
        let mut command = self.netns.command(&self.binary);
        command.arg("stats");
        if json {
            command.arg("--json");
        }
        command.arg("--socket").arg(self.socket_path());
        Ok(run_stdout(&mut command)?)
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {}", self.log_excerpt());
        }
        if let Err(error) = self.stop() {
            eprintln!("testbed: cleaning up: {error:#}");
        }
    }
}

/// `ip netns exec NETNS lb-user --iface lbpub --config DIR/lb.toml --socket DIR/ctl.sock`, with
/// the config written and the output going to DIR/lb-user.log.
fn launch_command(
    netns: &NetnsName,
    binary: &Path,
    dir: &Path,
    config: &str,
    mode: Option<&str>,
) -> anyhow::Result<Command> {
    let config_path = dir.join("lb.toml");
    fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let log_path = dir.join("lb-user.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log_for_stdout = log.try_clone().context("duplicating the log file handle")?;
    let mut command = netns.command(binary);
    command
        .args(["--iface", PUBLIC_INTERFACE, "--config"])
        .arg(&config_path)
        .arg("--socket")
        .arg(dir.join("ctl.sock"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_for_stdout)
        .stderr(log);
    if let Some(mode) = mode {
        command.arg("--xdp-mode").arg(mode);
    } else if let Some(mode) = std::env::var_os("LB_XDP_MODE") {
        command.arg("--xdp-mode").arg(mode);
    }
    eprintln!("testbed: {}", command_line(&command));
    Ok(command)
}

/// `lb-user stats --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Stats {
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStats>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    /// `"round-robin"`, `"weighted"` or `"maglev"`.
    pub scheduler: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub rescheduled: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub port: u16,
    /// `"up"` or `"down"`.
    pub state: String,
    /// The configured weight (0 drains the backend from the configuration).
    pub weight: u32,
    /// Drained at run time (`lb-user drain`).
    pub drained: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub rescheduled: u64,
}

/// One entry of `lb-user flows --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Flow {
    /// `ADDRESS:PORT` of the client.
    pub client: String,
    /// The service's name.
    pub service: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// `ADDRESS:PORT` of the backend.
    pub backend: String,
    pub idle_seconds: u64,
    /// `"open"` or `"closing"` (TCP, after a FIN or RST was seen).
    pub state: String,
}

impl Stats {
    pub fn service(&self, name: &str) -> anyhow::Result<&ServiceStats> {
        self.services
            .iter()
            .find(|service| service.name == name)
            .with_context(|| format!("no service {name} in stats: {self:?}"))
    }

    /// The backend at `address`, in whichever service has it.
    pub fn backend(&self, address: &str) -> anyhow::Result<&BackendStats> {
        self.services
            .iter()
            .flat_map(|service| &service.backends)
            .find(|backend| backend.address == address)
            .with_context(|| format!("no backend {address} in stats: {self:?}"))
    }

    /// A global counter; missing is an error, so a renamed counter fails loudly.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        self.counters
            .get(name)
            .copied()
            .with_context(|| format!("no counter {name} in stats; counters: {:?}", self.counters))
    }

    pub fn backends_up(&self) -> usize {
        self.services
            .iter()
            .flat_map(|service| &service.backends)
            .filter(|backend| backend.state == "up")
            .count()
    }

    /// `10.200.11.2:80 up, 10.200.12.2:80 down`, for messages.
    pub fn backend_states(&self) -> String {
        let states: Vec<String> = self
            .services
            .iter()
            .flat_map(|service| &service.backends)
            .map(|backend| format!("{}:{} {}", backend.address, backend.port, backend.state))
            .collect();
        states.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_stats() {
        let text = r#"{"interfaces":["lbpub","lbb1","lbb2"],
 "services":[{"name":"web","vip":"10.200.1.1","port":80,"protocol":"tcp",
   "scheduler":"round-robin",
   "packets":0,"bytes":0,"new_flows":0,"reply_packets":0,"reply_bytes":0,"rescheduled":0,
   "backends":[{"address":"10.200.11.2","port":80,"state":"up","weight":1,"drained":false,
     "packets":0,"bytes":0,
     "new_flows":0,"reply_packets":0,"reply_bytes":0,"rescheduled":0}]}],
 "counters":{"pass_not_service":0,"forward_redirect":3}}"#;
        let stats: Stats = serde_json::from_str(text).expect("the documented shape parses");
        assert_eq!(stats.backends_up(), 1);
        assert_eq!(stats.counter("forward_redirect").expect("present"), 3);
        assert!(stats.counter("no_such_counter").is_err());
        assert_eq!(stats.backend_states(), "10.200.11.2:80 up");
        assert!(!stats.backend("10.200.11.2").expect("present").drained);
    }

    #[test]
    fn parses_the_flows_listing() {
        let text = r#"[{"client":"10.200.1.2:40000","service":"web","protocol":"tcp",
 "backend":"10.200.11.2:80","idle_seconds":3,"state":"open"}]"#;
        let flows: Vec<Flow> = serde_json::from_str(text).expect("the listing parses");
        assert_eq!(flows[0].backend, "10.200.11.2:80");
        assert_eq!(flows[0].state, "open");
    }
}
