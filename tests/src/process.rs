//! Running commands and owning child processes: the pieces every testbed type builds on.
//!
//! Every wait here is bounded, every child is stopped by its own PID (never by name), and
//! every failure names the command line and carries its stderr, so a failed test says what
//! went wrong without a rerun.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How often bounded waits poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A command that could not be started or that exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {}", describe_output(.stdout, .stderr))]
    Failed {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

fn describe_output(stdout: &str, stderr: &str) -> String {
    match (stdout.trim(), stderr.trim()) {
        ("", "") => "no output".to_string(),
        ("", stderr) => format!("stderr: {stderr}"),
        (stdout, "") => format!("stdout: {stdout}"),
        (stdout, stderr) => format!("stderr: {stderr}; stdout: {stdout}"),
    }
}

/// The command line as a shell would show it, for messages.
pub fn command_line(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `command` to completion with its output captured; a non-zero exit is an error.
pub fn run(command: &mut Command) -> Result<Output, CommandError> {
    let line = command_line(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: line.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command: line,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output)
}

/// Runs `command` to completion and returns its stdout.
pub fn run_stdout(command: &mut Command) -> Result<String, CommandError> {
    let output = run(command)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A name no other testbed object of any process on this machine uses: `lbt<pid>x<counter>`.
/// Namespaces, temporary directories and logs all carry it, so leftovers of an interrupted run
/// can be told apart and traced to the process that made them.
pub fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("lbt{}x{}", std::process::id(), counter)
}

/// What one look at an awaited condition found.
#[derive(Debug)]
pub enum Poll<T> {
    Ready(T),
    /// Not yet; the text says what was seen instead, for the timeout message.
    NotYet(String),
}

/// Polls `probe` every [`POLL_INTERVAL`] until it is [`Poll::Ready`] or `timeout` passes.
/// An `Err` from the probe ends the wait at once (the thing will never become ready).
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> anyhow::Result<Poll<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match probe().with_context(|| format!("waiting for {what}"))? {
            Poll::Ready(value) => return Ok(value),
            Poll::NotYet(seen) => seen,
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether a process with this PID exists (a zombie counts as existing).
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// A long-running child process, stopped by PID with SIGTERM (then SIGKILL) on drop.
#[derive(Debug)]
pub struct ChildProcess {
    description: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `command`; `description` names it in messages ("nginx backend1").
    pub fn spawn(description: &str, command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {description}: `{}`", command_line(command)))?;
        Ok(Self {
            description: description.to_string(),
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (and reaps it).
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking on {}", self.description))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status. A process that outlives
    /// the timeout is killed with SIGKILL and reported as an error.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_exit(timeout)? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.description))?;
        self.status = Some(status);
        bail!(
            "{} (pid {}) ignored SIGTERM for {timeout:?}; killed it",
            self.description,
            self.pid()
        )
    }

    fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own unreaped child,
        // so it cannot have been reused by another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let error = io::Error::last_os_error();
            bail!(
                "sending signal {signal} to {} (pid {pid}): {error}",
                self.description
            );
        }
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Err(error) = self.terminate(Duration::from_secs(5)) {
            eprintln!("testbed: cleaning up: {error:#}");
        }
    }
}

/// A private temporary directory, made world-readable (nginx workers run as `nobody`) and
/// removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    removed: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let template = std::env::temp_dir().join(format!("{prefix}-XXXXXX"));
        let template = CString::new(template.as_os_str().as_bytes())
            .context("temporary directory name contains NUL")?;
        let mut bytes = template.into_bytes_with_nul();
        // SAFETY: `bytes` is a writable NUL-terminated template ending in XXXXXX, which
        // mkdtemp(3) overwrites in place and does not keep.
        let result = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if result.is_null() {
            return Err(io::Error::last_os_error()).context("creating a temporary directory");
        }
        bytes.pop();
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
        // mkdtemp makes the directory 0700; nginx workers (user nobody) must traverse it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} readable", path.display()))?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory, reporting errors.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        fs::remove_dir_all(&self.path).with_context(|| format!("removing {}", self.path.display()))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "testbed: cleaning up: removing {}: {error}",
                self.path.display()
            );
        }
    }
}

/// The last `max_lines` lines of a log file, indented, for error messages.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => return format!("    (could not read {}: {error})", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    let mut tail = String::new();
    if lines.is_empty() {
        tail.push_str("    (empty)");
    }
    for line in &lines[start..] {
        tail.push_str("    ");
        tail.push_str(line);
        tail.push('\n');
    }
    tail
}
