//! Network namespaces the testbed creates, runs commands in, and deletes.
//!
//! All testbed traffic stays inside these namespaces: the host's own interfaces, routes and
//! sysctls are never touched. Interfaces are created directly inside a namespace
//! (`ip -n A link add ... peer name ... netns B`), never in the host namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::Command;
use std::thread::{self, JoinHandle};

use anyhow::{bail, Context};

use crate::process::{pid_alive, run_stdout, CommandError};

/// The name of a namespace, cheap to clone into helpers and threads. Runs commands inside it
/// but does not own it: [`Netns`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsName(String);

impl NetnsName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `ip netns exec NAME program`: a command to run inside the namespace. `ip` switches
    /// namespace and then execs `program`, so a spawned child's PID is the program's own.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).arg(program);
        command
    }

    /// Runs `args` (program first) inside the namespace and returns its stdout.
    pub fn exec<I, S>(&self, args: I) -> Result<String, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args.next().expect("exec needs at least a program name");
        run_stdout(self.command(program).args(args))
    }

    /// `ip -n NAME args`: configures the namespace's links, addresses and routes.
    pub fn ip<I, S>(&self, args: I) -> Result<String, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_stdout(Command::new("ip").args(["-n", &self.0]).args(args))
    }

    /// Sets a sysctl inside the namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<String, CommandError> {
        self.exec(["sysctl", "-q", "-w", &format!("{key}={value}")])
    }

    /// PIDs of the processes living in the namespace.
    pub fn pids(&self) -> Result<Vec<u32>, CommandError> {
        let output = run_stdout(Command::new("ip").args(["netns", "pids", &self.0]))?;
        Ok(output
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect())
    }

    /// Runs `task` on a new thread that first enters the namespace, for tests that open
    /// sockets themselves. A socket stays in the namespace it was created in, whichever thread
    /// uses it later; the thread ends with `task`, so it never has to switch back.
    pub fn spawn_thread<T, F>(
        &self,
        thread_name: &str,
        task: F,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        let path = Path::new("/run/netns").join(&self.0);
        let namespace = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let name = self.clone();
        thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || {
                // SAFETY: setns(2) with a namespace file we hold open; it moves only the
                // calling thread, which is this new one.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("entering network namespace {name}"));
                }
                drop(namespace);
                task()
            })
            .with_context(|| format!("starting thread {thread_name}"))
    }

    /// Whether the namespace is still registered (`/run/netns/NAME`, where `ip netns` keeps it).
    pub fn exists(&self) -> bool {
        Path::new("/run/netns").join(&self.0).exists()
    }
}

impl std::fmt::Display for NetnsName {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A network namespace owned by the testbed: created on [`Netns::create`], deleted on
/// [`Netns::shutdown`] or drop.
#[derive(Debug)]
pub struct Netns {
    name: NetnsName,
    deleted: bool,
}

impl Netns {
    /// Creates a namespace called `name` (make it unique: see [`crate::unique_name`]) with its
    /// loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let name = NetnsName(name.to_string());
        if name.exists() {
            bail!("network namespace {name} already exists; refusing to reuse it");
        }
        run_stdout(Command::new("ip").args(["netns", "add", name.as_str()]))?;
        let netns = Self {
            name,
            deleted: false,
        };
        netns.ip(["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &NetnsName {
        &self.name
    }

    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.name.command(program)
    }

    pub fn exec<I, S>(&self, args: I) -> Result<String, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.name.exec(args)
    }

    pub fn ip<I, S>(&self, args: I) -> Result<String, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.name.ip(args)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<String, CommandError> {
        self.name.sysctl(key, value)
    }

    /// Deletes the namespace. Processes still inside it are an error (whoever spawned them
    /// should have stopped them); they are killed by PID so the namespace really goes away.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        delete(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if let Err(error) = delete(&self.name) {
            eprintln!("testbed: cleaning up: {error:#}");
        }
    }
}

fn delete(name: &NetnsName) -> anyhow::Result<()> {
    let leftovers = kill_leftovers(name);
    run_stdout(Command::new("ip").args(["netns", "delete", name.as_str()]))
        .with_context(|| format!("deleting network namespace {name}"))?;
    leftovers
}

/// Kills processes left in the namespace by PID (they are ours: nothing else runs in a
/// namespace this process created) and reports them.
fn kill_leftovers(name: &NetnsName) -> anyhow::Result<()> {
    let pids = name
        .pids()
        .with_context(|| format!("listing processes in {name}"))?;
    if pids.is_empty() {
        return Ok(());
    }
    for &pid in &pids {
        let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: kill(2) has no memory-safety preconditions. Its result is not checked: the
        // process may have exited meanwhile, and the error below reports the leftovers anyway.
        unsafe { libc::kill(raw_pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while pids.iter().any(|&pid| pid_alive(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(crate::process::POLL_INTERVAL);
    }
    bail!("network namespace {name} still had processes {pids:?}; killed them")
}
