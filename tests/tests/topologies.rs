//! End-to-end tests of the places operators put their backends (issue 6): behind a Linux bridge
//! on the same host, one router away, and on the public interface's own segment (one-armed).
//! Point to point is covered by `netns.rs`. Each test runs real nginx backends behind lb-user,
//! in freshly named namespaces, and checks the same things:
//!
//! - HTTP through the VIP spreads evenly over both backends, with no failed request;
//! - the counters of the layout's path move, and those of the other paths do not;
//! - a 1 MB download through the VIP arrives intact (its SHA-256 compared);
//! - when one nginx stops, every request goes to the other once the health checks had
//!   fall × interval + 1 s to notice, and it takes traffic again once it is back;
//! - the SSH stand-in on the VIP, port 22, answers throughout.
//!
//! The bridge test also deletes and recreates a backend's link into the bridge, as a container
//! restart does, and checks that service resumes.
//!
//! They need root (without it they print SKIPPED, or fail under `LB_REQUIRE_PRIVILEGED=1`) and
//! lb-user built (`cargo build -p lb-user`); run them one at a time:
//! `cargo test -p lb-tests --test topologies -- --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use lb_tests::process::{run_stdout, unique_name, wait_until, Poll, TempDir};
use lb_tests::{
    config_toml, skip_unless_privileged, Client, Layout, LoadBalancer, Nginx, Stats, Topology,
    SERVICE_PORT, SSH_PORT, VIP,
};

const SERVICE_URL: &str = "http://10.200.1.1/";
const SSH_URL: &str = "http://10.200.1.1:22/";
const SSH_BODY: &str = "ssh-standin\n";
const DOWNLOAD_NAME: &str = "download.bin";
const DOWNLOAD_URL: &str = "http://10.200.1.1/files/download.bin";
const DOWNLOAD_SIZE: usize = 1 << 20;
/// Requests of the spread check; each backend must get half, give or take a fifth.
const REQUESTS: u64 = 100;
/// Requests sent while a backend is down, and after each recovery.
const CHECK_REQUESTS: usize = 20;
/// Bound on any wait for a health state change (a few probe intervals, generously: the two
/// CPUs are shared).
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on service resuming after a backend's link is recreated.
const RESUME_TIMEOUT: Duration = Duration::from_secs(20);

/// A topology with nginx on both backends (each also serving the download), the SSH stand-in
/// on the VIP, port 22, and a scratch directory for downloads.
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    backends: Vec<Nginx>,
    /// Kept running for the whole test; stopped on drop.
    _ssh_standin: Nginx,
    client: Client,
    download: Vec<u8>,
    scratch: TempDir,
    topology: Topology,
    started: Instant,
}

impl Testbed {
    fn start(layout: Layout) -> anyhow::Result<Self> {
        let started = Instant::now();
        let topology = Topology::build(layout)
            .with_context(|| format!("building the {} topology", layout.name()))?;
        let download = pseudo_random_bytes(DOWNLOAD_SIZE);
        let mut backends = Vec::new();
        for backend in &topology.backends {
            let nginx = Nginx::start(&backend.netns, &backend.name, backend.address, SERVICE_PORT)?;
            nginx.add_file(DOWNLOAD_NAME, &download)?;
            backends.push(nginx);
        }
        let ssh_standin = Nginx::start(&topology.lb, "ssh-standin", VIP, SSH_PORT)?;
        Ok(Self {
            backends,
            _ssh_standin: ssh_standin,
            client: Client::new(&topology.client),
            download,
            scratch: TempDir::new(&format!("{}-downloads", unique_name()))?,
            topology,
            started,
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

    /// Sends `count` requests, one connection each; any failure is an error. Returns how many
    /// each backend answered.
    fn requests(&self, count: u64, what: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.client.answers(SERVICE_URL, count, what)
    }

    /// HTTP through the VIP: every request answered, each backend within a fifth of half.
    fn check_spread(&self, lb: &LoadBalancer) -> anyhow::Result<Stats> {
        let answers = self.requests(REQUESTS, "spread")?;
        let names: Vec<&str> = answers.keys().map(String::as_str).collect();
        ensure!(names == ["backend1", "backend2"], "answered by {answers:?}");
        let even = REQUESTS / 2;
        let slack = even / 5;
        for (backend, &count) in &answers {
            ensure!(
                (even - slack..=even + slack).contains(&count),
                "{backend} got {count} of {REQUESTS}: {answers:?}"
            );
        }
        let stats = lb.stats_json()?;
        let service = stats.service("web")?;
        ensure!(
            service.new_flows == REQUESTS,
            "one flow per request: {service:?}"
        );
        for backend in &self.topology.backends {
            let backend_stats = stats.backend(&backend.address.to_string())?;
            ensure!(
                backend_stats.new_flows == answers[&backend.name],
                "{}'s new_flows against the answers naming it ({answers:?}): {backend_stats:?}",
                backend.name
            );
        }
        println!("spread: {answers:?}");
        Ok(stats)
    }

    /// Downloads the 1 MB file through the VIP and compares SHA-256 sums.
    fn check_download(&self) -> anyhow::Result<Duration> {
        let served = self.scratch.path().join("served.bin");
        std::fs::write(&served, &self.download).context("writing the served copy")?;
        let received = self.scratch.path().join("received.bin");
        let started = Instant::now();
        self.client
            .download(DOWNLOAD_URL, &received)
            .context("downloading 1 MB through the VIP")?;
        let elapsed = started.elapsed();
        let (expected, actual) = (sha256(&served)?, sha256(&received)?);
        let length = std::fs::metadata(&received)?.len();
        ensure!(
            actual == expected,
            "the download arrived corrupted: {length} bytes with SHA-256 {actual}, \
             expected {DOWNLOAD_SIZE} bytes with {expected}"
        );
        println!(
            "download: {length} bytes in {:.3} s, SHA-256 {actual}",
            elapsed.as_secs_f64()
        );
        Ok(elapsed)
    }

    /// Stops backend2's nginx; after fall × interval + 1 s every request goes to backend1.
    /// Then starts it again and checks it takes traffic.
    fn check_failover(&mut self, lb: &mut LoadBalancer) -> anyhow::Result<()> {
        let health = self.topology.demo_service().health_check;
        let detection_window = Duration::from_millis(u64::from(health.fall) * health.interval_ms)
            + Duration::from_secs(1);
        let backend2 = self.topology.backend("backend2")?.address.to_string();

        let stopped = Instant::now();
        self.backends[1].stop()?;
        thread::sleep(detection_window);
        let stats = lb.stats_json()?;
        ensure!(
            stats.backend(&backend2)?.state == "down",
            "backend2 still up {:.1} s after its nginx stopped: {}",
            stopped.elapsed().as_secs_f64(),
            stats.backend_states()
        );
        let answers = self.requests(CHECK_REQUESTS as u64, "backend2 down")?;
        ensure!(
            answers.keys().eq(["backend1"]),
            "with backend2 down: {answers:?}"
        );
        self.assert_ssh_answers("with backend2 down")?;

        self.backends[1].start_again()?;
        lb.wait_backend_state(&backend2, "up", STATE_TIMEOUT)?;
        let answers = self.requests(CHECK_REQUESTS as u64, "backend2 back")?;
        ensure!(
            answers.contains_key("backend2"),
            "backend2 got no traffic once back: {answers:?}"
        );
        println!("failover: backend1 alone while backend2 was down; both after: {answers:?}");
        Ok(())
    }
}

fn check_counters(layout: Layout, stats: &Stats) -> anyhow::Result<()> {
    let (moving, idle) = layout.path_counters();
    for name in moving {
        let value = stats.counter(name)?;
        ensure!(
            value >= REQUESTS,
            "{name} is {value} after {REQUESTS} requests: {:?}",
            stats.counters
        );
    }
    for name in idle {
        let value = stats.counter(name)?;
        ensure!(value == 0, "{name} is {value}: {:?}", stats.counters);
    }
    let moved: Vec<String> = moving
        .iter()
        .map(|name| format!("{name} {}", stats.counters[*name]))
        .collect();
    println!("counters: {}", moved.join(", "));
    Ok(())
}

/// What `lb-user stats` lists as attached: XDP on the public interface and on every
/// backend-facing interface that is not a bridge, and tc egress on the public interface when
/// backends sit behind a bridge.
fn check_attachments(testbed: &Testbed, stats: &Stats) -> anyhow::Result<()> {
    let topology = &testbed.topology;
    let mut expected: BTreeSet<String> = topology.lb_interfaces().into_iter().collect();
    if topology.layout == Layout::Bridge {
        expected.insert("lbpub (tc egress)".to_string());
    }
    let listed: BTreeSet<String> = stats.interfaces.iter().cloned().collect();
    ensure!(
        listed == expected,
        "lb-user lists {listed:?}, expected {expected:?}"
    );
    for interface in topology.lb_interfaces() {
        ensure!(topology.xdp_attached(&interface)?, "no XDP on {interface}");
    }
    if topology.layout == Layout::Bridge {
        // Neither the bridge nor its ports: the kernel forwards into the bridge.
        let ports = topology
            .backends
            .iter()
            .map(|backend| backend.peer.as_str());
        for interface in std::iter::once("br0").chain(ports) {
            ensure!(
                !topology.xdp_attached(interface)?,
                "XDP on {interface}, which lb-user has no reason to attach to"
            );
        }
    }
    Ok(())
}

/// The checks every layout shares; returns lb-user for layout-specific steps.
fn check_layout(testbed: &mut Testbed) -> anyhow::Result<LoadBalancer> {
    let layout = testbed.topology.layout;
    println!(
        "{} topology:\n  {}",
        layout.name(),
        testbed.topology.describe().join("\n  ")
    );
    let mut lb = testbed.start_lb()?;
    let ready = testbed.started.elapsed();
    testbed.assert_ssh_answers("before the requests")?;

    let stats = testbed.check_spread(&lb)?;
    check_counters(layout, &stats)?;
    check_attachments(testbed, &stats)?;
    testbed.assert_ssh_answers("after the requests")?;

    let download = testbed.check_download()?;
    testbed.check_failover(&mut lb)?;
    testbed.assert_ssh_answers("after the failover")?;
    println!(
        "{}: ready after {:.1} s, download {:.3} s, all checks after {:.1} s",
        layout.name(),
        ready.as_secs_f64(),
        download.as_secs_f64(),
        testbed.started.elapsed().as_secs_f64()
    );
    Ok(lb)
}

#[test]
fn bridge_backends_are_reached_through_the_kernel() -> anyhow::Result<()> {
    if !skip_unless_privileged("bridge_backends_are_reached_through_the_kernel") {
        return Ok(());
    }
    let mut testbed = Testbed::start(Layout::Bridge)?;
    let mut lb = check_layout(&mut testbed)?;
    ensure!(
        lb.log().contains("tc egress program on lbpub"),
        "lb-user did not say how it reaches the bridge's backends"
    );

    // A container restart: its veth goes, and comes back under the same name and MAC.
    let backend1 = testbed.topology.backend("backend1")?;
    let (address, port) = (backend1.address.to_string(), backend1.peer.clone());
    let index_before = ifindex(&testbed.topology.lb, &port)?;
    let restarted = Instant::now();
    testbed.topology.restart_backend_link("backend1")?;
    let index_after = ifindex(&testbed.topology.lb, &port)?;
    ensure!(
        index_after != index_before,
        "{port} was not recreated (ifindex {index_before} before and after)"
    );
    let failures = wait_for_backend1(&testbed.client)?;
    let resumed = restarted.elapsed();
    lb.wait_backend_state(&address, "up", STATE_TIMEOUT)?;
    let answers = testbed.requests(CHECK_REQUESTS as u64, "after backend1's link came back")?;
    ensure!(
        answers.keys().eq(["backend1", "backend2"]),
        "after backend1's link came back: {answers:?}"
    );
    testbed.assert_ssh_answers("after backend1's link came back")?;
    println!(
        "link restart: backend1 answered again after {:.2} s ({failures} failed requests \
         meanwhile); then {answers:?}",
        resumed.as_secs_f64()
    );
    lb.stop()?;
    Ok(())
}

#[test]
fn routed_backends_are_reached_through_the_router() -> anyhow::Result<()> {
    if !skip_unless_privileged("routed_backends_are_reached_through_the_router") {
        return Ok(());
    }
    let mut testbed = Testbed::start(Layout::Routed)?;
    let mut lb = check_layout(&mut testbed)?;
    lb.stop()?;
    Ok(())
}

#[test]
fn one_armed_backends_are_reached_back_out_of_the_public_interface() -> anyhow::Result<()> {
    if !skip_unless_privileged("one_armed_backends_are_reached_back_out_of_the_public_interface") {
        return Ok(());
    }
    let mut testbed = Testbed::start(Layout::OneArmed)?;
    let mut lb = check_layout(&mut testbed)?;
    lb.stop()?;
    Ok(())
}

/// When the public interface is deleted and created again, the tc egress program dies with
/// the old device: lb-user's reconciler must attach it again (as it does XDP), or every reply
/// from a bridge backend leaves untranslated and no request gets an answer.
#[test]
fn bridge_replies_survive_a_recreated_public_interface() -> anyhow::Result<()> {
    if !skip_unless_privileged("bridge_replies_survive_a_recreated_public_interface") {
        return Ok(());
    }
    let mut testbed = Testbed::start(Layout::Bridge)?;
    let mut lb = testbed.start_lb()?;
    testbed.requests(CHECK_REQUESTS as u64, "before lbpub is recreated")?;
    testbed.topology.restart_public_link()?;
    let topology = &testbed.topology;
    wait_until(STATE_TIMEOUT, "XDP on the new lbpub", || {
        if topology.xdp_attached("lbpub")? {
            return Ok(Poll::Ready(()));
        }
        Ok(Poll::NotYet("no XDP on lbpub".to_string()))
    })?;
    let answers = testbed.requests(CHECK_REQUESTS as u64, "after lbpub was recreated")?;
    println!("after lbpub was recreated: {answers:?}");
    lb.stop()?;
    Ok(())
}

/// Sends requests until backend1 answers one (bounded); returns how many failed meanwhile
/// (those scheduled to backend1 before lb-user or the kernel noticed its link was gone).
fn wait_for_backend1(client: &Client) -> anyhow::Result<usize> {
    let mut failures = 0;
    wait_until(
        RESUME_TIMEOUT,
        "backend1 to answer again",
        || match client.get(SERVICE_URL) {
            Ok(body) if body.trim() == "backend1" => Ok(Poll::Ready(failures)),
            Ok(body) => Ok(Poll::NotYet(format!("answered by {}", body.trim()))),
            Err(error) => {
                failures += 1;
                Ok(Poll::NotYet(error.to_string()))
            }
        },
    )
}

/// The interface index of `interface` in `netns` (`N: name@...`).
fn ifindex(netns: &lb_tests::Netns, interface: &str) -> anyhow::Result<u32> {
    let line = netns.ip(["-o", "link", "show", "dev", interface])?;
    line.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .with_context(|| format!("no interface index in {line:?}"))
}

/// `sha256sum FILE`'s digest.
fn sha256(path: &Path) -> anyhow::Result<String> {
    let output = run_stdout(Command::new("sha256sum").arg(path))?;
    output
        .split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no digest in sha256sum's output {output:?}"))
}

/// `length` bytes that neither repeat nor compress (xorshift64), the same on every run.
fn pseudo_random_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}
