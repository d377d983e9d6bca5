//! `cargo xtask demo`: the load balancer end to end, narrated.
//!
//! Builds the bridge topology (a client, the load balancer and two backends, each in a
//! namespace; the backends on a bridge in the lb namespace, as Docker's containers are on
//! docker0), starts nginx on the backends and lb-user in the lb namespace, then sends requests
//! to the VIP while taking backend2 down and bringing it back. Everything it made is removed at
//! the end, also after an error or Ctrl-C (checked between steps).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use lb_tests::{config_toml, Client, LoadBalancer, Nginx, Topology, VIP};

use crate::{build_lb_user, install_deps, require_root};

/// Requests sent in each phase.
const REQUESTS_PER_PHASE: usize = 10;
/// Bound on waiting for a backend to change health state.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub fn run() -> anyhow::Result<()> {
    install_sigint_handler()?;
    require_root("cargo xtask demo")?;
    narrate("installing dependencies (scripts/install-deps.sh)");
    install_deps()?;
    check_interrupted()?;
    narrate("building lb-user");
    build_lb_user()?;
    check_interrupted()?;

    narrate(
        "building the topology: client, lb and two backends, each in its own namespace; the \
         backends sit on a bridge in the lb namespace, like containers on Docker's docker0",
    );
    let topology = Topology::bridge()?;
    for line in topology.describe() {
        println!("  {line}");
    }
    let mut demo = Demo {
        lb: None,
        backends: Vec::new(),
        client: Client::new(&topology.client),
        topology,
    };
    // The error is reported by main, after the teardown below.
    let result = match demo.play() {
        // A step cut short by the signal (curl killed, lb-user gone) says why.
        Err(error) if interrupted() && !error.is::<Interrupted>() => {
            Err(error.context(Interrupted))
        }
        result => result,
    };
    narrate("tearing down: stopping lb-user and nginx, deleting the namespaces");
    let teardown = demo.teardown();
    match (result, teardown) {
        (Ok(()), Ok(())) => {
            narrate("done: everything the demo created is gone");
            Ok(())
        }
        (Ok(()), Err(error)) => Err(error),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(teardown)) => {
            Err(error.context(format!("then teardown failed: {teardown:#}")))
        }
    }
}

/// Everything the demo started; torn down in field order, processes before namespaces.
struct Demo {
    lb: Option<LoadBalancer>,
    backends: Vec<Nginx>,
    client: Client,
    topology: Topology,
}

impl Demo {
    fn play(&mut self) -> anyhow::Result<()> {
        for backend in &self.topology.backends {
            narrate(&format!(
                "starting nginx on {} ({}:80)",
                backend.name, backend.address
            ));
            self.backends.push(Nginx::start(
                &backend.netns,
                &backend.name,
                backend.address,
                80,
            )?);
        }
        check_interrupted()?;

        let config = config_toml(&[self.topology.demo_service()]);
        narrate("starting lb-user on lbpub with this config:");
        println!("{config}");
        let lb = self
            .lb
            .insert(LoadBalancer::start(&self.topology.lb, &config)?);
        narrate("waiting for both backends to pass their health checks");
        lb.wait_backends_up(2, STATE_TIMEOUT)?;
        narrate("lb-user worked out from the routing table how to reach the backends:");
        for line in lb.log().lines().filter(|line| is_attachment(line)) {
            println!(
                "  {}",
                line.split_once(": ").map_or(line, |(_, message)| message)
            );
        }
        check_interrupted()?;

        narrate(&format!(
            "sending {REQUESTS_PER_PHASE} requests to http://{VIP}/ from the client \
             (each a new TCP connection, scheduled round robin; the rotation is kept per CPU, \
             so two in a row can land on the same backend when they run on different CPUs)"
        ));
        let answers = self.send_requests()?;
        ensure!(
            answers.iter().any(|answer| answer == "backend2"),
            "backend2 never answered"
        );

        narrate("stopping nginx on backend2");
        self.backends[1].stop()?;
        let stopped = Instant::now();
        let backend2 = self.topology.backend("backend2")?.address.to_string();
        self.lb()?
            .wait_backend_state(&backend2, "down", STATE_TIMEOUT)?;
        narrate(&format!(
            "lb-user marked backend2 down after {:.1} s; every request now goes to backend1",
            stopped.elapsed().as_secs_f64()
        ));
        let answers = self.send_requests()?;
        ensure!(
            answers.iter().all(|answer| answer == "backend1"),
            "not all went to backend1"
        );

        narrate("starting nginx on backend2 again");
        self.backends[1].start_again()?;
        let started = Instant::now();
        self.lb()?
            .wait_backend_state(&backend2, "up", STATE_TIMEOUT)?;
        narrate(&format!(
            "backend2 is up again after {:.1} s of passing health checks",
            started.elapsed().as_secs_f64()
        ));
        let answers = self.send_requests()?;
        ensure!(
            answers.iter().any(|answer| answer == "backend2"),
            "backend2 got no traffic back"
        );

        narrate("lb-user stats:");
        println!("{}", self.lb()?.stats_text()?);

        narrate("stopping lb-user (SIGTERM): it detaches its XDP and tc programs and exits 0");
        if let Some(mut lb) = self.lb.take() {
            lb.stop()?;
        }
        Ok(())
    }

    /// Sends [`REQUESTS_PER_PHASE`] requests, printing which backend answered each. Any
    /// failed request fails the demo.
    fn send_requests(&self) -> anyhow::Result<Vec<String>> {
        let url = format!("http://{VIP}/");
        let mut answers = Vec::new();
        for number in 1..=REQUESTS_PER_PHASE {
            check_interrupted()?;
            let body = self
                .client
                .get(&url)
                .with_context(|| format!("request {number}"))?;
            let backend = body.trim().to_string();
            println!("  request {number:2} -> {backend}");
            answers.push(backend);
            thread::sleep(Duration::from_millis(100));
        }
        Ok(answers)
    }

    fn lb(&mut self) -> anyhow::Result<&mut LoadBalancer> {
        self.lb.as_mut().context("lb-user is not running")
    }

    /// Stops everything and deletes the namespaces, going on past errors and reporting them all.
    fn teardown(self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if let Some(lb) = self.lb {
            if let Err(error) = lb.shutdown() {
                errors.push(format!("stopping lb-user: {error:#}"));
            }
        }
        for nginx in self.backends {
            if let Err(error) = nginx.shutdown() {
                errors.push(format!("stopping nginx: {error:#}"));
            }
        }
        if let Err(error) = self.topology.shutdown() {
            errors.push(format!("{error:#}"));
        }
        if !errors.is_empty() {
            bail!("teardown: {}", errors.join("; "));
        }
        Ok(())
    }
}

/// The lines of lb-user's log that say what it attached where, and why.
fn is_attachment(line: &str) -> bool {
    line.contains("attached XDP program") || line.contains("tc egress program")
}

fn narrate(step: &str) {
    println!("\n==> {step}");
}

/// Ctrl-C sets a flag instead of killing xtask, so that the teardown still runs. (lb-user and
/// nginx share the terminal's process group and get the SIGINT too; lb-user detaches and
/// exits 0 on it, nginx shuts down, and the teardown copes with both having exited.)
fn install_sigint_handler() -> anyhow::Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let previous = unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error()).context("installing the SIGINT handler");
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// The demo stopped because of Ctrl-C.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("interrupted by Ctrl-C")
    }
}

impl std::error::Error for Interrupted {}
