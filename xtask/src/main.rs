//! Developer tasks, run as `cargo xtask <task>` from anywhere in the workspace:
//!
//! - `demo`: builds lb-user and shows it balancing, failing over and recovering between two
//!   nginx backends, all inside network namespaces, then removes everything it made.
//! - `test`: runs every test suite the way CI does (the namespace tests must not skip), then a
//!   smoke run of the benchmarks.
//! - `bench`: the kernel-level and end-to-end benchmarks, and `docs/benchmarks.md`.
//! - `fuzz`: the long run of the datapath fuzzer ([`lb_tests::fuzz`]).
//!
//! All need root: they install packages, load XDP programs and create namespaces.
//!
//! The `cargo xtask` alias builds this crate without its `tasks` feature: a bootstrap that needs
//! no workspace crate, so it builds on a fresh machine where the BPF toolchain that lb-user's
//! build script needs is not installed yet. It installs that toolchain, then runs the task in
//! the full build (`cargo run -p xtask`), which links the testbed and lb-user.

#[cfg(feature = "tasks")]
mod bench;
#[cfg(feature = "tasks")]
mod demo;
#[cfg(feature = "tasks")]
mod suite;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  demo   build lb-user and run the load balancer demo in network namespaces (root)
  test   install dependencies, build, and run all tests with privileged tests required (root)
  fuzz [--seed N] [--count N]
         random and mutated packets through the datapath, every output checked (root);
         default: a seed from the clock, 1000000 packets
  bench [--quick] [--output DIR]
         both benchmarks below, then DIR/benchmarks.md and its chart (DIR: docs/) (root)
  bench kernel [--quick]
         cost per packet of the datapath under BPF_PROG_TEST_RUN, against a floor (root)
  bench e2e [--quick]
         HTTP and UDP through namespaces, beside HAProxy and nftables (root)
         --quick: seconds instead of minutes, for CI's smoke run; its numbers mean little";

/// The bootstrap: usage without root; otherwise root, the toolchain, then the full build.
#[cfg(not(feature = "tasks"))]
fn main() -> ExitCode {
    use std::os::unix::process::CommandExt;

    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("demo" | "test" | "fuzz" | "bench") => {}
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    if let Err(error) =
        require_root(&format!("cargo xtask {}", args[0])).and_then(|()| install_deps())
    {
        eprintln!("xtask: error: {error:#}");
        return ExitCode::FAILURE;
    }
    // exec, not spawn: the task gets the terminal's signals (the demo's Ctrl-C) directly.
    let error = cargo()
        .env(DEPS_INSTALLED, "1")
        .args(["run", "--quiet", "--package", "xtask", "--"])
        .args(&args)
        .exec();
    eprintln!("xtask: error: running the task in the full xtask build: {error}");
    ExitCode::FAILURE
}

#[cfg(feature = "tasks")]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["demo"] => demo::run(),
        ["test"] => suite::run(),
        ["fuzz", rest @ ..] => fuzz(rest),
        ["bench", rest @ ..] => bench::run(rest),
        ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask's own directory's parent.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command run from the workspace root, with the cargo that runs xtask.
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root());
    command
}

/// Runs `command` with its output going straight to the terminal; a non-zero exit is an error.
fn run_streaming(command: &mut Command) -> anyhow::Result<()> {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    println!("xtask: $ {line}");
    let status = command
        .status()
        .with_context(|| format!("running `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{task} must run as root: it installs packages, loads XDP programs and creates \
             network namespaces (try `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

/// Set by the bootstrap for the task it runs: the dependencies are already installed.
const DEPS_INSTALLED: &str = "LB_XTASK_DEPS_INSTALLED";

/// `scripts/install-deps.sh`: idempotent, quick when everything is already there, and skipped
/// in a task that the bootstrap started right after running it.
fn install_deps() -> anyhow::Result<()> {
    if std::env::var_os(DEPS_INSTALLED).is_some_and(|value| value == "1") {
        return Ok(());
    }
    let script = workspace_root().join("scripts/install-deps.sh");
    run_streaming(Command::new(&script).current_dir(workspace_root()))
}

#[cfg(feature = "tasks")]
fn build_lb_user() -> anyhow::Result<()> {
    run_streaming(cargo().args(["build", "-p", "lb-user"]))
}

/// `cargo xtask fuzz [--seed N] [--count N]`: prints the run's report; fails on a violation.
#[cfg(feature = "tasks")]
fn fuzz(args: &[&str]) -> anyhow::Result<()> {
    let mut seed = None;
    let mut count = lb_tests::fuzz::DEFAULT_COUNT;
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        let number = || {
            value
                .parse::<u64>()
                .with_context(|| format!("fuzz: {flag} wants a decimal number, not {value:?}"))
        };
        match *flag {
            "--seed" => seed = Some(number()?),
            "--count" => count = number()?,
            _ => break,
        }
        rest = tail;
    }
    if let [unexpected, ..] = rest {
        bail!("fuzz: unexpected argument {unexpected:?} (see `cargo xtask help`)");
    }
    require_root("cargo xtask fuzz")?;
    let seed = seed.unwrap_or_else(lb_tests::fuzz::seed_from_clock);
    println!("xtask: fuzzing the datapath: seed {seed}, {count} packets");
    let report = lb_tests::fuzz::run(seed, count);
    println!("{report}");
    if !report.passed() {
        bail!("the fuzzer found violations (seed {seed}, {count} packets): see above");
    }
    Ok(())
}
