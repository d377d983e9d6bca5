//! `cargo xtask bench`: the benchmarks of issue 3.
//!
//! - `bench kernel [--quick]`: cost per packet of the real datapath under `BPF_PROG_TEST_RUN`
//!   ([`lb_tests::bench_kernel`]).
//! - `bench e2e [--quick]`: HTTP and UDP through the demo topology, side by side with HAProxy
//!   and nftables ([`lb_tests::bench_e2e`]).
//! - `bench [--quick] [--output DIR]`: both, then `benchmarks.md` and its charts into DIR
//!   (`docs/` by default). CI's smoke run is `bench --quick --output <a temporary directory>`:
//!   it fails when the benchmark code does (a wrong verdict or frame, a missing tool, a crash),
//!   never because of a number.

mod chart;
mod report;

use std::path::PathBuf;

use anyhow::{bail, Context};
use lb_tests::bench_e2e::{self, E2eOptions};
use lb_tests::bench_kernel::{self, KernelOptions};

use crate::{build_lb_user, install_deps, require_root, workspace_root};

/// The chart's file name, beside `benchmarks.md`.
const CHART_FILE: &str = "benchmarks.png";

/// What `cargo xtask bench ...` asked for.
#[derive(Debug, PartialEq)]
struct Request {
    kernel: bool,
    e2e: bool,
    quick: bool,
    /// Where the report goes; only when both benchmarks run.
    output: Option<PathBuf>,
}

fn parse(args: &[&str]) -> anyhow::Result<Request> {
    let (kernel, e2e, mut rest) = match args {
        ["kernel", rest @ ..] => (true, false, rest),
        ["e2e", rest @ ..] => (false, true, rest),
        rest => (true, true, rest),
    };
    let mut request = Request {
        kernel,
        e2e,
        quick: false,
        output: (kernel && e2e).then(|| workspace_root().join("docs")),
    };
    while let [first, tail @ ..] = rest {
        match (*first, tail) {
            ("--quick", _) => request.quick = true,
            ("--output", [dir, ..]) if kernel && e2e => {
                request.output = Some(PathBuf::from(dir));
                rest = &tail[1..];
                continue;
            }
            (other, _) => bail!("bench: unexpected argument {other:?} (see `cargo xtask help`)"),
        }
        rest = tail;
    }
    Ok(request)
}

pub fn run(args: &[&str]) -> anyhow::Result<()> {
    let request = parse(args)?;
    require_root("cargo xtask bench")?;
    install_deps()?;
    build_lb_user()?;
    let machine = report::Machine::describe();
    let kernel = if request.kernel {
        let options = if request.quick {
            KernelOptions::quick()
        } else {
            KernelOptions::full()
        };
        let report = bench_kernel::run(options).context("the kernel-level benchmark")?;
        println!("{}", report::kernel_markdown(&report));
        Some(report)
    } else {
        None
    };
    let e2e = if request.e2e {
        let options = if request.quick {
            E2eOptions::quick()
        } else {
            E2eOptions::full()
        };
        let report = bench_e2e::run(options).context("the end-to-end benchmark")?;
        println!("{}", report::e2e_markdown(&report));
        Some(report)
    } else {
        None
    };
    if let (Some(dir), Some(kernel), Some(e2e)) = (&request.output, &kernel, &e2e) {
        write_report(dir, &machine, kernel, e2e, request.quick)?;
    }
    Ok(())
}

/// CI's smoke run, the last step of `cargo xtask test`: `bench --quick`, with the report and
/// the chart written into a temporary directory (checked, then removed) instead of `docs/`.
pub fn smoke() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let dir = lb_tests::process::TempDir::new(&format!("{}-bench", lb_tests::unique_name()))?;
    let output = dir.path().to_string_lossy().into_owned();
    println!("xtask: benchmark smoke run: cargo xtask bench --quick --output {output}");
    run(&["--quick", "--output", &output]).context("the benchmark smoke run")?;
    for file in ["benchmarks.md", CHART_FILE] {
        let path = dir.path().join(file);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("the smoke run wrote no {}", path.display()))?
            .len();
        anyhow::ensure!(size > 0, "the smoke run wrote an empty {}", path.display());
    }
    dir.remove()?;
    println!(
        "xtask: benchmark smoke run passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `benchmarks.md` and the chart it shows into `dir`.
fn write_report(
    dir: &std::path::Path,
    machine: &report::Machine,
    kernel: &bench_kernel::KernelReport,
    e2e: &bench_e2e::E2eReport,
    quick: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let chart = dir.join(CHART_FILE);
    chart::draw(&chart, Some(kernel), Some(e2e))?;
    let markdown = dir.join("benchmarks.md");
    let text = report::document(machine, kernel, e2e, CHART_FILE, quick);
    std::fs::write(&markdown, text).with_context(|| format!("writing {}", markdown.display()))?;
    println!(
        "bench: wrote {} and {}",
        markdown.display(),
        chart.display()
    );
    Ok(())
}
