//! End-to-end tests of IPv6 services (issue 5, dual stack): real nginx backends listening on
//! both families, curl in the client namespace over IPv6 (`curl -g 'http://[fd00:200::1:1]/'`),
//! lb-user balancing an IPv6 VIP over IPv6 backends. Every address is inside fd00:200::/64 (see
//! `lb_tests::topology`). The tests check, as the IPv4 ones do:
//!
//! - requests through the IPv6 VIP spread evenly over the backends, none failing, and are
//!   counted per service and per backend, and by the layout's path counters;
//! - `lb-user flows` lists IPv6 flows as `[addr]:port`, and filters by an IPv6 backend;
//! - drain and undrain of an IPv6 backend through the control socket;
//! - failover and recovery of an IPv6 backend by its health checks;
//! - an IPv4 and an IPv6 service on one daemon, both served at once;
//! - the SSH stand-in on the VIPs, port 22, answers over both families throughout;
//! - a service mixing families, and an IPv6 service without IPv6 forwarding, are refused
//!   before anything is attached.
//!
//! They need root (without it they print SKIPPED, or fail under `LB_REQUIRE_PRIVILEGED=1`) and
//! lb-user built (`cargo build -p lb-user`); run them one at a time:
//! `cargo test -p lb-tests --test ipv6 -- --test-threads=1`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use lb_tests::{
    config_toml, skip_unless_privileged, Client, Layout, LoadBalancer, Nginx, ServiceConfig, Stats,
    Topology, CLIENT_ADDRESS6, SERVICE_PORT, SSH_PORT, VIP, VIP6,
};

const SERVICE_URL6: &str = "http://[fd00:200::1:1]/";
const SERVICE_URL: &str = "http://10.200.1.1/";
const SSH_URL6: &str = "http://[fd00:200::1:1]:22/";
const SSH_URL: &str = "http://10.200.1.1:22/";
const SSH_BODY: &str = "ssh-standin\n";
/// Requests of a spread check; each backend must get half, give or take a fifth.
const REQUESTS: u64 = 100;
/// Requests sent while a backend is drained or down, and after it is back.
const CHECK_REQUESTS: u64 = 20;
/// Bound on any wait for a health state change.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A topology whose backends' nginx and the SSH stand-in on the lb listen on both families.
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    backends: Vec<Nginx>,
    _ssh_standin: Nginx,
    client: Client,
    topology: Topology,
}

impl Testbed {
    fn start(layout: Layout) -> anyhow::Result<Self> {
        let topology = Topology::build(layout)
            .with_context(|| format!("building the {} topology", layout.name()))?;
        println!(
            "{} topology:\n  {}",
            layout.name(),
            topology.describe().join("\n  ")
        );
        let mut backends = Vec::new();
        for backend in &topology.backends {
            backends.push(Nginx::start_dual(
                &backend.netns,
                &backend.name,
                backend.address,
                backend.address6,
                SERVICE_PORT,
            )?);
        }
        let ssh_standin = Nginx::start_dual(&topology.lb, "ssh-standin", VIP, VIP6, SSH_PORT)?;
        Ok(Self {
            backends,
            _ssh_standin: ssh_standin,
            client: Client::new(&topology.client),
            topology,
        })
    }

    /// lb-user with `services`, once every backend of them is up.
    fn start_lb(&self, services: &[ServiceConfig]) -> anyhow::Result<LoadBalancer> {
        LoadBalancer::start_serving(&self.topology.lb, services, STATE_TIMEOUT)
    }

    /// The operator's SSH (stand-in) on the VIPs answers over both families.
    fn assert_ssh_answers(&self, when: &str) -> anyhow::Result<()> {
        for url in [SSH_URL6, SSH_URL] {
            let body = self
                .client
                .get(url)
                .with_context(|| format!("ssh stand-in at {url} {when}"))?;
            ensure!(body == SSH_BODY, "ssh stand-in at {url} {when}: {body:?}");
        }
        Ok(())
    }

    fn requests(&self, url: &str, count: u64, what: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.client.answers(url, count, what)
    }
}

/// Both backends answered `answers`, each within a fifth of half of `total`.
fn check_even(answers: &BTreeMap<String, u64>, total: u64) -> anyhow::Result<()> {
    let names: Vec<&str> = answers.keys().map(String::as_str).collect();
    ensure!(names == ["backend1", "backend2"], "answered by {answers:?}");
    let (even, slack) = (total / 2, total / 10);
    for (backend, &count) in answers {
        ensure!(
            (even - slack..=even + slack).contains(&count),
            "{backend} got {count} of {total}: {answers:?}"
        );
    }
    Ok(())
}

/// The service `name` counted `total` new flows, and each backend (by its address in the
/// service, `address`) as many as the answers naming it.
fn check_stats(
    stats: &Stats,
    name: &str,
    answers: &BTreeMap<String, u64>,
    address: impl Fn(&lb_tests::Backend) -> String,
    topology: &Topology,
) -> anyhow::Result<()> {
    let total: u64 = answers.values().sum();
    let service = stats.service(name)?;
    ensure!(
        service.new_flows == total && service.packets >= total && service.reply_packets >= total,
        "{name}: one flow per request ({total}), packets both ways: {service:?}"
    );
    for backend in &topology.backends {
        let backend_stats = stats.backend(&address(backend))?;
        ensure!(
            backend_stats.new_flows == answers[&backend.name],
            "{}'s new_flows against the answers naming it ({answers:?}): {backend_stats:?}",
            backend.name
        );
    }
    Ok(())
}

/// The counters of `layout`'s path moved at least `requests` times, those of the others not.
fn check_path_counters(layout: Layout, stats: &Stats, requests: u64) -> anyhow::Result<()> {
    let (moving, idle) = layout.path_counters();
    for name in moving {
        let value = stats.counter(name)?;
        ensure!(
            value >= requests,
            "{name} is {value} after {requests} requests"
        );
    }
    for name in idle {
        let value = stats.counter(name)?;
        ensure!(value == 0, "{name} is {value}: {:?}", stats.counters);
    }
    ensure!(
        stats.counter("drop_malformed_ipv6")? == 0,
        "well-formed traffic dropped as malformed: {:?}",
        stats.counters
    );
    Ok(())
}

/// Stops backend2's nginx: once its checks notice, every request over IPv6 goes to
/// backend1; started again, it takes traffic again.
fn check_failover(testbed: &mut Testbed, lb: &mut LoadBalancer) -> anyhow::Result<()> {
    let backend2 = testbed.topology.backend("backend2")?.address6.to_string();
    let stopped = Instant::now();
    testbed.backends[1].stop()?;
    lb.wait_backend_state(&backend2, "down", STATE_TIMEOUT)?;
    let detected = stopped.elapsed();
    let answers = testbed.requests(SERVICE_URL6, CHECK_REQUESTS, "backend2 down")?;
    ensure!(
        answers.keys().eq(["backend1"]),
        "with backend2 down: {answers:?}"
    );
    testbed.assert_ssh_answers("with backend2 down")?;

    testbed.backends[1].start_again()?;
    lb.wait_backend_state(&backend2, "up", STATE_TIMEOUT)?;
    let answers = testbed.requests(SERVICE_URL6, CHECK_REQUESTS, "backend2 back")?;
    ensure!(
        answers.contains_key("backend2"),
        "backend2 got no traffic once back: {answers:?}"
    );
    println!(
        "failover: backend2 down after {:.1} s, backend1 alone meanwhile; both after: {answers:?}",
        detected.as_secs_f64()
    );
    Ok(())
}

/// The checks every layout shares over IPv6: spread, stats, path counters, SSH, failover.
fn check_layout(layout: Layout) -> anyhow::Result<()> {
    let mut testbed = Testbed::start(layout)?;
    let service = testbed.topology.demo_service6();
    let mut lb = testbed.start_lb(std::slice::from_ref(&service))?;
    testbed.assert_ssh_answers("before the requests")?;

    let answers = testbed.requests(SERVICE_URL6, REQUESTS, "spread")?;
    check_even(&answers, REQUESTS)?;
    let stats = lb.stats_json()?;
    check_stats(
        &stats,
        "web6",
        &answers,
        |backend| backend.address6.to_string(),
        &testbed.topology,
    )?;
    check_path_counters(layout, &stats, REQUESTS)?;
    println!("{}: spread over IPv6 {answers:?}", layout.name());

    check_failover(&mut testbed, &mut lb)?;
    testbed.assert_ssh_answers("after the failover")?;
    lb.stop()?;
    Ok(())
}

#[test]
fn ipv6_point_to_point_backends_balance_fail_over_and_drain() -> anyhow::Result<()> {
    if !skip_unless_privileged("ipv6_point_to_point_backends_balance_fail_over_and_drain") {
        return Ok(());
    }
    check_layout(Layout::PointToPoint)?;

    // Flows and drain on a fresh daemon, so its flow table holds these requests only.
    let testbed = Testbed::start(Layout::PointToPoint)?;
    let lb = testbed.start_lb(&[testbed.topology.demo_service6()])?;
    let (body, port) = testbed.client.get_with_local_port(SERVICE_URL6)?;
    let client = format!("[{CLIENT_ADDRESS6}]:{port}");
    let flows = lb.flows(Some("web6"), None)?;
    let flow = flows
        .iter()
        .find(|flow| flow.client == client)
        .with_context(|| format!("no flow of {client} in {flows:?}"))?;
    let serving = testbed.topology.backend(body.trim())?;
    let backend = format!("[{}]:{SERVICE_PORT}", serving.address6);
    ensure!(
        flow.backend == backend && flow.protocol == "tcp",
        "{client} was answered by {} ({backend}), but its flow is {flow:?}",
        serving.name
    );
    let filtered = lb.flows(None, Some(&backend))?;
    ensure!(
        filtered.iter().all(|flow| flow.backend == backend)
            && filtered.iter().any(|flow| flow.client == client),
        "`flows --backend {backend}` listed {filtered:?}"
    );
    println!("flows: {flow:?}");

    let backend2 = format!(
        "[{}]:{SERVICE_PORT}",
        testbed.topology.backend("backend2")?.address6
    );
    let message = lb.drain("web6", &backend2)?;
    ensure!(message.contains("drained"), "drain said {message:?}");
    let answers = testbed.requests(SERVICE_URL6, CHECK_REQUESTS, "backend2 drained")?;
    ensure!(
        answers.keys().eq(["backend1"]),
        "with backend2 drained: {answers:?}"
    );
    lb.undrain("web6", &backend2)?;
    let answers = testbed.requests(SERVICE_URL6, CHECK_REQUESTS, "backend2 undrained")?;
    ensure!(
        answers.contains_key("backend2"),
        "backend2 got nothing once undrained: {answers:?}"
    );
    println!("drain: backend1 alone while {backend2} was drained; after: {answers:?}");
    Ok(())
}

#[test]
fn ipv6_bridge_backends_are_reached_through_the_kernel() -> anyhow::Result<()> {
    if !skip_unless_privileged("ipv6_bridge_backends_are_reached_through_the_kernel") {
        return Ok(());
    }
    check_layout(Layout::Bridge)
}

#[test]
fn ipv6_routed_backends_are_reached_through_the_router() -> anyhow::Result<()> {
    if !skip_unless_privileged("ipv6_routed_backends_are_reached_through_the_router") {
        return Ok(());
    }
    check_layout(Layout::Routed)
}

#[test]
fn ipv6_one_armed_backends_are_reached_back_out_of_the_public_interface() -> anyhow::Result<()> {
    if !skip_unless_privileged(
        "ipv6_one_armed_backends_are_reached_back_out_of_the_public_interface",
    ) {
        return Ok(());
    }
    check_layout(Layout::OneArmed)
}

/// An IPv4 and an IPv6 service on one daemon, the same backends serving both: requests to
/// the two VIPs, interleaved, are both balanced and counted each under its own service.
#[test]
fn dual_stack_services_are_served_at_once() -> anyhow::Result<()> {
    if !skip_unless_privileged("dual_stack_services_are_served_at_once") {
        return Ok(());
    }
    let testbed = Testbed::start(Layout::PointToPoint)?;
    let services = [
        testbed.topology.demo_service(),
        testbed.topology.demo_service6(),
    ];
    let lb = testbed.start_lb(&services)?;
    let mut answers: [BTreeMap<String, u64>; 2] = Default::default();
    let started = Instant::now();
    for round in 1..=REQUESTS / 2 {
        for (answers, url) in answers.iter_mut().zip([SERVICE_URL, SERVICE_URL6]) {
            let body = testbed
                .client
                .get(url)
                .with_context(|| format!("round {round} to {url}"))?;
            *answers.entry(body.trim().to_string()).or_default() += 1;
        }
    }
    let stats = lb.stats_json()?;
    for (service, answers) in ["web", "web6"].iter().zip(&answers) {
        check_even(answers, REQUESTS / 2).with_context(|| format!("service {service}"))?;
    }
    check_stats(
        &stats,
        "web",
        &answers[0],
        |backend| backend.address.to_string(),
        &testbed.topology,
    )?;
    check_stats(
        &stats,
        "web6",
        &answers[1],
        |backend| backend.address6.to_string(),
        &testbed.topology,
    )?;
    check_path_counters(Layout::PointToPoint, &stats, REQUESTS)?;
    testbed.assert_ssh_answers("after the dual-stack requests")?;
    println!(
        "dual stack: IPv4 {:?}, IPv6 {:?} in {:.1} s",
        answers[0],
        answers[1],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs lb-user with `config` to its exit; it must refuse with a message holding every one of
/// `needles`, leaving no XDP program anywhere.
fn assert_refused(topology: &Topology, config: &str, needles: &[&str]) -> anyhow::Result<()> {
    let (status, log) = LoadBalancer::run_to_exit(&topology.lb, config, Duration::from_secs(10))?;
    ensure!(!status.success(), "lb-user accepted it; log:\n{log}");
    ensure!(
        status.code().is_some(),
        "lb-user died of a signal ({status}); log:\n{log}"
    );
    for needle in needles {
        ensure!(
            log.contains(needle),
            "no {needle:?} in the message; log:\n{log}"
        );
    }
    for interface in topology.lb_interfaces() {
        ensure!(
            !topology.xdp_attached(&interface)?,
            "XDP attached to {interface}; log:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn a_service_mixing_families_is_refused_before_anything_is_attached() -> anyhow::Result<()> {
    if !skip_unless_privileged("a_service_mixing_families_is_refused_before_anything_is_attached") {
        return Ok(());
    }
    let topology = Topology::demo()?;
    let mut service = topology.demo_service6();
    let ipv4_backend = topology.backend("backend2")?.address.to_string();
    service.backends[1].0 = ipv4_backend.clone();
    assert_refused(
        &topology,
        &config_toml(&[service]),
        &[
            "\"web6\"",
            "backend[1].address",
            &format!("\"{ipv4_backend}\" is an IPv4 address"),
            &format!("vip \"{VIP6}\" is IPv6"),
        ],
    )?;
    topology.shutdown()
}

/// bpf_fib_lookup answers "forwarding disabled" for IPv6 unless the ingress interface
/// forwards IPv6: lb-user must refuse, naming the sysctl and the fix, not start and pass every
/// IPv6 packet to the kernel.
#[test]
fn an_ipv6_service_without_ipv6_forwarding_is_refused() -> anyhow::Result<()> {
    if !skip_unless_privileged("an_ipv6_service_without_ipv6_forwarding_is_refused") {
        return Ok(());
    }
    let topology = Topology::demo()?;
    topology
        .lb
        .sysctl("net.ipv6.conf.all.forwarding", "0")
        .context("turning IPv6 forwarding off in the lb namespace")?;
    assert_refused(
        &topology,
        &config_toml(&[topology.demo_service6()]),
        &[
            "net.ipv6.conf.all.forwarding is 0",
            "sysctl -w net.ipv6.conf.all.forwarding=1",
            "accept_ra",
        ],
    )?;
    // IPv4 services alone do not need IPv6 forwarding: lb-user starts.
    let mut lb = LoadBalancer::start(&topology.lb, &config_toml(&[topology.demo_service()]))?;
    lb.stop()?;
    topology.shutdown()
}
