//! End-to-end tests: lb-user balancing real nginx backends for a curl client, each test in its
//! own freshly named namespaces.
//!
//! They need root; without it they print `SKIPPED` and return, unless `LB_REQUIRE_PRIVILEGED=1`
//! makes that a failure. They need lb-user built (`cargo build -p lb-user`) and are meant to run
//! one at a time: `cargo test -p lb-tests -- --test-threads=1`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use lb_tests::{
    config_toml, pid_alive, skip_unless_privileged, Client, LoadBalancer, Nginx, Stats, Topology,
    CLIENT_ADDRESS, SSH_PORT, VIP,
};

const SERVICE_URL: &str = "http://10.200.1.1/";
const SSH_URL: &str = "http://10.200.1.1:22/";
const SSH_BODY: &str = "ssh-standin\n";
/// Bound on any wait for a health state change (a few probe intervals, generously).
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A topology with nginx on both backends and the SSH stand-in on the VIP, port 22.
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    backends: Vec<Nginx>,
    ssh_standin: Nginx,
    client: Client,
    topology: Topology,
}

impl Testbed {
    fn start() -> anyhow::Result<Self> {
        let topology = Topology::demo().context("building the demo topology")?;
        let backends = Nginx::start_on_backends(&topology, 80)?;
        let ssh_standin = Nginx::start(&topology.lb, "ssh-standin", VIP, SSH_PORT)?;
        let client = Client::new(&topology.client);
        Ok(Self {
            backends,
            ssh_standin,
            client,
            topology,
        })
    }

    fn start_lb(&self) -> anyhow::Result<LoadBalancer> {
        let config = config_toml(&[self.topology.demo_service()]);
        let mut lb = LoadBalancer::start(&self.topology.lb, &config)?;
        lb.wait_backends_up(self.backends.len(), STATE_TIMEOUT)?;
        Ok(lb)
    }

    fn assert_ssh_answers(&self, when: &str) -> anyhow::Result<()> {
        let body = self
            .client
            .get(SSH_URL)
            .with_context(|| format!("ssh stand-in {when}"))?;
        ensure!(body == SSH_BODY, "ssh stand-in {when} answered {body:?}");
        Ok(())
    }
}

/// Not a load balancer test: proves the testbed itself (namespaces, veths, routes, GRO,
/// forwarding, nginx, curl) works, so that a failure elsewhere points at lb-user.
#[test]
fn testbed_reaches_backends_through_kernel_forwarding() -> anyhow::Result<()> {
    if !skip_unless_privileged("testbed_reaches_backends_through_kernel_forwarding") {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    for (nginx, backend) in testbed.backends.iter().zip(&testbed.topology.backends) {
        let body = testbed
            .client
            .get(&format!("http://{}/", backend.address))?;
        assert_eq!(body, format!("{}\n", backend.name));
        let log = nginx.access_log_lines()?;
        assert_eq!(log.len(), 1, "one request logged: {log:?}");
        assert!(
            log[0].starts_with(&format!("{CLIENT_ADDRESS} ")),
            "logged {log:?}"
        );
    }
    testbed.assert_ssh_answers("without lb-user")?;
    Ok(())
}

#[test]
fn http_through_vip_spreads_evenly() -> anyhow::Result<()> {
    if !skip_unless_privileged("http_through_vip_spreads_evenly") {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    let lb = testbed.start_lb()?;
    testbed.assert_ssh_answers("before the requests")?;

    const REQUESTS: u64 = 200;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    for request in 1..=REQUESTS {
        let body = testbed
            .client
            .get(SERVICE_URL)
            .with_context(|| format!("request {request}"))?;
        *answers.entry(body.trim().to_string()).or_default() += 1;
        if request % 20 == 0 {
            testbed.assert_ssh_answers(&format!("after request {request}"))?;
        }
    }
    testbed.assert_ssh_answers("after the requests")?;

    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["backend1", "backend2"],
        "{answers:?}"
    );
    for (backend, &count) in &answers {
        assert!(
            (90..=110).contains(&count),
            "{backend} got {count} of 200: {answers:?}"
        );
    }

    let stats = lb.stats_json()?;
    let service = stats.service("web")?;
    assert_eq!(
        service.new_flows, REQUESTS,
        "one flow per curl: {service:?}"
    );
    assert_eq!(
        service
            .backends
            .iter()
            .map(|backend| backend.new_flows)
            .sum::<u64>(),
        REQUESTS
    );
    for backend in &testbed.topology.backends {
        let backend_stats = stats.backend(&backend.address.to_string())?;
        assert_eq!(
            backend_stats.new_flows, answers[&backend.name],
            "{}'s new_flows against the responses naming it: {backend_stats:?}",
            backend.name
        );
    }
    assert!(
        service.packets > 0 && service.reply_packets > 0,
        "{service:?}"
    );
    assert!(
        stats.counter("forward_redirect")? > 0,
        "{:?}",
        stats.counters
    );
    assert!(stats.counter("reply_redirect")? > 0, "{:?}", stats.counters);
    println!("answers: {answers:?}; service: {service:?}");
    Ok(())
}

/// What one request of the background client loop saw.
#[derive(Debug)]
struct Sample {
    started: Instant,
    finished: Instant,
    ssh: bool,
    /// The body, trimmed, or the error.
    result: Result<String, String>,
}

/// Sequential requests from the client until `stop` (bounded to `limit`), every fifth one to
/// the SSH stand-in instead of the service.
fn client_loop(client: Client, stop: Arc<AtomicBool>, limit: Duration) -> Vec<Sample> {
    let begin = Instant::now();
    let mut samples = Vec::new();
    for iteration in 0u64.. {
        if stop.load(Ordering::Relaxed) || begin.elapsed() > limit {
            break;
        }
        let ssh = iteration % 5 == 4;
        let started = Instant::now();
        let result = client
            .get(if ssh { SSH_URL } else { SERVICE_URL })
            .map(|body| body.trim().to_string())
            .map_err(|error| error.to_string());
        samples.push(Sample {
            started,
            finished: Instant::now(),
            ssh,
            result,
        });
        thread::sleep(Duration::from_millis(10));
    }
    samples
}

#[test]
fn failover_and_recovery() -> anyhow::Result<()> {
    if !skip_unless_privileged("failover_and_recovery") {
        return Ok(());
    }
    let mut testbed = Testbed::start()?;
    let mut lb = testbed.start_lb()?;
    let health = testbed.topology.demo_service().health_check;
    let detection_window =
        Duration::from_millis(u64::from(health.fall) * health.interval_ms) + Duration::from_secs(1);
    let backend2 = testbed.topology.backend("backend2")?;
    let (backend2_address, backend2_lb_address) =
        (backend2.address.to_string(), backend2.lb_address);

    let stop = Arc::new(AtomicBool::new(false));
    let client_thread = {
        let (client, stop) = (testbed.client.clone(), stop.clone());
        thread::spawn(move || client_loop(client, stop, Duration::from_secs(60)))
    };
    // Whatever happens in the steps, stop the client loop before looking at its samples.
    let steps = (|| -> anyhow::Result<Timeline> {
        thread::sleep(Duration::from_secs(1));
        let backend2_stopped = Instant::now();
        testbed.backends[1].stop()?;
        lb.wait_backend_state(&backend2_address, "down", STATE_TIMEOUT)?;
        // Keep traffic going with backend2 down until well past the detection window.
        let down_until = detection_window + Duration::from_secs(2);
        thread::sleep(down_until.saturating_sub(backend2_stopped.elapsed()));
        let down_stats = lb.stats_json()?;

        let backend2_restarted = Instant::now();
        testbed.backends[1].start_again()?;
        lb.wait_backend_state(&backend2_address, "up", STATE_TIMEOUT)?;
        let backend2_up = Instant::now();
        thread::sleep(Duration::from_secs(3));
        Ok(Timeline {
            backend2_stopped,
            down_stats,
            backend2_restarted,
            backend2_up,
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let samples = client_thread
        .join()
        .expect("the client loop does not panic");
    let timeline = steps?;

    let counted_from = timeline.backend2_stopped + detection_window;
    let service = |filter: &dyn Fn(&Sample) -> bool| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|sample| !sample.ssh && filter(sample))
            .collect()
    };

    let before_stop = service(&|sample| sample.started < timeline.backend2_stopped);
    assert!(
        before_stop.len() >= 5,
        "too few requests before the stop: {}",
        summary(&before_stop)
    );
    // A request still in flight when nginx gets its SIGTERM (a fast shutdown) may be reset by
    // nginx itself; only requests that were over before the stop must all have succeeded.
    let failed_before =
        service(&|sample| sample.finished < timeline.backend2_stopped && sample.result.is_err());
    assert!(
        failed_before.is_empty(),
        "failed before the stop: {}",
        summary(&failed_before)
    );

    let down = &timeline.down_stats;
    assert_eq!(down.backend(&backend2_address)?.state, "down", "{down:?}");
    let while_down = service(&|sample| {
        sample.started >= counted_from && sample.started < timeline.backend2_restarted
    });
    assert!(
        while_down.len() >= 10,
        "too few requests while down: {}",
        summary(&while_down)
    );
    let not_backend1: Vec<&Sample> = while_down
        .iter()
        .copied()
        .filter(|sample| sample.result.as_deref() != Ok("backend1"))
        .collect();
    assert!(
        not_backend1.is_empty(),
        "while backend2 was down: {}",
        summary(&not_backend1)
    );

    let failures = service(&|sample| sample.started >= counted_from && sample.result.is_err());
    assert!(
        failures.is_empty(),
        "failed after the detection window: {}",
        summary(&failures)
    );

    let after_up = service(&|sample| sample.started >= timeline.backend2_up);
    let to_backend2 = after_up
        .iter()
        .filter(|sample| sample.result.as_deref() == Ok("backend2"))
        .count();
    assert!(
        to_backend2 > 0,
        "backend2 got no traffic after recovery: {}",
        summary(&after_up)
    );

    let access_log = testbed.backends[1].access_log_lines()?;
    let client_prefix = format!("{CLIENT_ADDRESS} ");
    let probe_prefix = format!("{backend2_lb_address} ");
    let first_client_line = access_log
        .iter()
        .position(|line| line.starts_with(&client_prefix))
        .with_context(|| format!("no client request in backend2's new log: {access_log:?}"))?;
    let probes_before = access_log[..first_client_line]
        .iter()
        .filter(|line| line.starts_with(&probe_prefix))
        .count();
    assert!(
        probes_before >= health.rise as usize,
        "backend2 got client traffic after {probes_before} probes, rise is {}: {access_log:?}",
        health.rise
    );

    let ssh: Vec<&Sample> = samples.iter().filter(|sample| sample.ssh).collect();
    assert!(
        ssh.len() >= 10,
        "the ssh stand-in was probed too rarely: {}",
        summary(&ssh)
    );
    let ssh_failures: Vec<&Sample> = ssh
        .iter()
        .copied()
        .filter(|sample| sample.result.as_deref() != Ok("ssh-standin"))
        .collect();
    assert!(
        ssh_failures.is_empty(),
        "ssh stand-in: {}",
        summary(&ssh_failures)
    );

    println!(
        "{} requests to the service, {} while backend2 was down, {to_backend2} to backend2 \
         after recovery; {} to the ssh stand-in; {probes_before} probes before backend2's \
         first client request",
        samples.len() - ssh.len(),
        while_down.len(),
        ssh.len()
    );
    lb.stop()?;
    Ok(())
}

/// When the steps of [`failover_and_recovery`] happened.
struct Timeline {
    backend2_stopped: Instant,
    /// Stats taken with backend2 down, after the detection window.
    down_stats: Stats,
    backend2_restarted: Instant,
    backend2_up: Instant,
}

/// How many samples, and the first few, for assertion messages.
fn summary(samples: &[&Sample]) -> String {
    let shown: Vec<String> = samples
        .iter()
        .take(5)
        .map(|sample| format!("{sample:?}"))
        .collect();
    format!("{} samples, first: [{}]", samples.len(), shown.join(", "))
}

#[test]
fn teardown_leaves_nothing_behind() -> anyhow::Result<()> {
    if !skip_unless_privileged("teardown_leaves_nothing_behind") {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    let topology = &testbed.topology;
    let lb = testbed.start_lb()?;
    let body = testbed.client.get(SERVICE_URL)?;
    assert!(body.starts_with("backend"), "answered {body:?}");
    for interface in topology.lb_interfaces() {
        assert!(
            topology.xdp_attached(&interface)?,
            "XDP attached to {interface} while running"
        );
    }

    let mut spawned_pids = vec![lb.spawned_pid()];
    lb.shutdown()?;
    for interface in topology.lb_interfaces() {
        assert!(
            !topology.xdp_attached(&interface)?,
            "XDP left on {interface} after SIGTERM"
        );
    }

    for nginx in testbed.backends.into_iter().chain([testbed.ssh_standin]) {
        spawned_pids.extend_from_slice(nginx.spawned_pids());
        nginx.shutdown()?;
    }
    let namespaces = topology.netns_names();
    for netns in &namespaces {
        assert_eq!(
            netns.pids()?,
            Vec::<u32>::new(),
            "processes left in {netns}"
        );
    }
    testbed.topology.shutdown()?;

    for netns in &namespaces {
        assert!(!netns.exists(), "namespace {netns} still exists");
    }
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for netns in &namespaces {
        assert!(
            !listed.split_whitespace().any(|name| name == netns.as_str()),
            "`ip netns list` still shows {netns}: {listed}"
        );
    }
    for pid in spawned_pids {
        assert!(!pid_alive(pid), "process {pid} is still alive");
    }
    Ok(())
}

#[test]
fn bad_config_exits_nonzero_before_attaching() -> anyhow::Result<()> {
    if !skip_unless_privileged("bad_config_exits_nonzero_before_attaching") {
        return Ok(());
    }
    let topology = Topology::demo()?;
    let mut service = topology.demo_service();
    service.backends[0].0 = "10.200.11.300".to_string();
    let (status, log) = LoadBalancer::run_to_exit(
        &topology.lb,
        &config_toml(&[service]),
        Duration::from_secs(10),
    )?;

    assert!(
        !status.success(),
        "lb-user accepted a bad backend address; log:\n{log}"
    );
    assert!(
        status.code().is_some(),
        "lb-user died of a signal ({status}); log:\n{log}"
    );
    assert!(
        log.contains("address"),
        "the message names the field; log:\n{log}"
    );
    assert!(
        log.contains("10.200.11.300"),
        "the message names the value; log:\n{log}"
    );
    for interface in topology.lb_interfaces() {
        assert!(
            !topology.xdp_attached(&interface)?,
            "XDP attached to {interface}; log:\n{log}"
        );
    }
    println!("lb-user exited with {status}; its log:\n{log}");
    topology.shutdown()?;
    Ok(())
}

/// Backends behind an interface with a larger MTU than the public one can send replies that
/// cannot go on to the client: lb-user names the interface and the fix at start.
#[test]
fn a_backend_side_mtu_above_the_public_one_is_warned_about() -> anyhow::Result<()> {
    if !skip_unless_privileged("a_backend_side_mtu_above_the_public_one_is_warned_about") {
        return Ok(());
    }
    let topology = Topology::demo()?;
    topology.lb.ip(["link", "set", "lbpub", "mtu", "1400"])?;
    let lb = LoadBalancer::start(&topology.lb, &config_toml(&[topology.demo_service()]))?;
    lb.wait_log("attached XDP program to lbpub", STATE_TIMEOUT)?;
    let log = lb.log();
    lb.shutdown()?;
    let backend_side: Vec<String> = topology
        .lb_interfaces()
        .into_iter()
        .filter(|interface| interface != "lbpub")
        .collect();
    ensure!(
        !backend_side.is_empty(),
        "the demo has backend-side interfaces"
    );
    for interface in backend_side {
        ensure!(
            log.contains(&format!(
                "interface {interface} has MTU 1500, more than lbpub's 1400"
            )),
            "no MTU warning about {interface}; log:\n{log}"
        );
    }
    topology.shutdown()?;
    Ok(())
}

/// A VIP that no host answers ARP for is a silent outage: lb-user says so at start, naming the
/// VIP and the fix, and says nothing about a VIP that is the host's own address.
#[test]
fn a_vip_nobody_answers_arp_for_is_warned_about() -> anyhow::Result<()> {
    if !skip_unless_privileged("a_vip_nobody_answers_arp_for_is_warned_about") {
        return Ok(());
    }
    let topology = Topology::demo()?;
    let web = topology.demo_service();
    let mut ghost = topology.demo_service();
    ghost.name = "ghost".to_string();
    // On the public subnet (10.200.1.0/24), but no address of the lb namespace.
    ghost.vip = "10.200.1.100".to_string();
    // An IPv6 VIP added just before the start is still in duplicate address detection (made
    // to last here): not routed as local yet, but the host's address all the same.
    topology.lb.sysctl("net.ipv6.conf.lbpub.accept_dad", "1")?;
    topology
        .lb
        .sysctl("net.ipv6.conf.lbpub.dad_transmits", "30")?;
    topology
        .lb
        .ip(["addr", "add", "fd00:200::1:99/128", "dev", "lbpub"])?;
    let mut tentative = topology.demo_service6();
    tentative.name = "tentative".to_string();
    tentative.vip = "fd00:200::1:99".to_string();
    let config = config_toml(&[web, ghost, tentative]);
    let lb = LoadBalancer::start(&topology.lb, &config)?;
    // The VIPs are checked before the program loads; attaching to lbpub comes after.
    lb.wait_log("attached XDP program to lbpub", STATE_TIMEOUT)?;
    let addresses = topology.lb.ip(["-6", "addr", "show", "dev", "lbpub"])?;
    ensure!(
        addresses.contains("fd00:200::1:99/128") && addresses.contains("tentative"),
        "the IPv6 VIP is still tentative: {addresses}"
    );
    // A reload that keeps the VIPs does not say it all again.
    lb.reload(&config)?;
    let log = lb.log();
    lb.shutdown()?;
    ensure!(
        log.matches("VIP 10.200.1.100 (service ghost)").count() == 1,
        "the warning once, not again on reload; log:\n{log}"
    );
    ensure!(
        !log.contains("VIP fd00:200::1:99"),
        "a warning about a tentative address of this host; log:\n{log}"
    );
    ensure!(
        log.contains("VIP 10.200.1.100 (service ghost) is on lbpub's subnet but no address")
            && log.contains("ip addr add 10.200.1.100/32 dev lbpub"),
        "no warning about the unanswered VIP; log:\n{log}"
    );
    ensure!(
        !log.contains(&format!("VIP {VIP} ")),
        "a warning about the host's own VIP; log:\n{log}"
    );
    topology.shutdown()?;
    Ok(())
}
