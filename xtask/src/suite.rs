//! `cargo xtask test`: every test suite, in the order that fails fastest, as CI runs them.

use std::time::Instant;

use std::process::Command;

use crate::{build_lb_user, cargo, install_deps, require_root, run_streaming};

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let result = run_suites();
    let elapsed = started.elapsed();
    match &result {
        Ok(()) => println!(
            "xtask test: all suites passed in {:.1} s",
            elapsed.as_secs_f64()
        ),
        Err(_) => println!(
            "xtask test: stopped at the first failure after {:.1} s",
            elapsed.as_secs_f64()
        ),
    }
    result
}

fn run_suites() -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    install_deps()?;
    build_lb_user()?;
    // Unit and packet (BPF_PROG_TEST_RUN) tests first: fast, and they pin down most bugs.
    run_streaming(cargo_privileged().args(["test", "--workspace", "--exclude", "lb-tests"]))?;
    // The namespace tests share the machine's two CPUs: one at a time keeps timings honest.
    run_streaming(cargo_privileged().args(["test", "-p", "lb-tests", "--", "--test-threads=1"]))?;
    // Last, so the suites above keep their timings: the benchmarks' smoke run, so that their
    // code cannot rot. It fails on broken benchmark code (a wrong verdict or frame, a missing
    // tool, a crash), never on a number.
    crate::bench::smoke()?;
    Ok(())
}

/// Cargo with privileged tests made mandatory: they fail instead of skipping, so a green run
/// means they ran.
fn cargo_privileged() -> Command {
    let mut command = cargo();
    command.env("LB_REQUIRE_PRIVILEGED", "1");
    command
}
