//! Configuration reloads that change which backend or service an id names, or remove
//! services that share a VIP address:
//!
//! - on the kernel's maps (the real XDP object under `BPF_PROG_TEST_RUN`, no interfaces): a
//!   backend moved to another port takes over a removed backend's id with zeroed counters, and
//!   removing two services that share a VIP address goes through, after which the address is
//!   not balanced any more, and can be given back;
//! - end to end (lb-user, nginx, curl in namespaces): a backend moved to another port, and
//!   the backends of a renamed service, come up once their probes pass and take the traffic;
//!   removing two IPv6 services that share the IPv6 VIP is a successful reload, `lb-user stats`
//!   and `lb-user flows --service` no longer know them, and the VIP is no longer balanced
//!   until a reload brings them back; a backend whose server stopped goes down within its
//!   `interval` × `fall` even while the configuration is reloaded more often than that.
//!
//! They need root (without it they print SKIPPED, or fail under `LB_REQUIRE_PRIVILEGED=1`) and
//! lb-user built (`cargo build -p lb-user`); run them one at a time:
//! `cargo test -p lb-tests --test reload -- --test-threads=1`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use lb_common::TrafficStats;
use lb_tests::{
    config_toml, packet::*, skip_unless_privileged, Client, LoadBalancer, Nginx, ServiceConfig,
    Topology, SERVICE_PORT,
};
use lb_user::{config, dataplane::Dataplane, dataplane::LoadOptions};

/// Bound on any wait for a health state change (a few probe intervals, generously).
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests sent after each reload.
const REQUESTS: u64 = 20;
const SERVICE_URL: &str = "http://10.200.1.1/";
const SERVICE_URL6: &str = "http://[fd00:200::1:1]/";
const ALT_URL6: &str = "http://[fd00:200::1:1]:8000/";

/// The fixture's web and dns, which share the VIP 10.200.1.1 (the first two services of
/// `packet::CONFIG`).
fn shared_vip() -> &'static str {
    let end = CONFIG
        .find("[[service]]\nname = \"unresolved\"")
        .expect("CONFIG has the service unresolved");
    &CONFIG[..end]
}

/// A service on 10.200.1.5, a VIP of its own.
const OTHER: &str = r#"
[[service]]
name = "other"
vip = "10.200.1.5"
port = 80
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 9090
"#;

/// A SYN from the client to `vip`, port 80, from `src_port`.
fn syn_to(vip: [u8; 4], src_port: u16) -> Vec<u8> {
    Tcp {
        dst: vip,
        ..Tcp::from_client(80, src_port)
    }
    .frame()
}

fn reload(fixture: &mut Fixture, text: &str, what: &str) {
    let config = config::parse(text).expect("valid test configuration");
    fixture
        .table
        .reload(&config, &mut fixture.dataplane)
        .unwrap_or_else(|error| panic!("{what}: {error}"));
}

#[test]
fn reloads_reset_reused_counters_and_remove_a_shared_vip_on_the_kernel_maps() {
    if !skip_unless_privileged(
        "reloads_reset_reused_counters_and_remove_a_shared_vip_on_the_kernel_maps",
    ) {
        return;
    }
    let other_vip = [10, 200, 1, 5];
    let full = format!("{}\n{OTHER}", shared_vip());
    let mut fixture = Fixture::with_config(&full, &LoadOptions::default());
    // Round robin: two new flows to each of web's backends, ids 0 (A) and 1 (B).
    for src_port in 40000..40004 {
        let (verdict, _) = fixture.run(&syn_to(VIP, src_port), fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
    }
    let backend_stats = |fixture: &Fixture, id| fixture.dataplane.backend_stats(id).expect("stats");
    assert_eq!(backend_stats(&fixture, 0).new_flows, 2);
    assert_eq!(backend_stats(&fixture, 1).new_flows, 2);

    // B moves to port 8081: a new backend, given the removed B:8080's id.
    let moved = full.replacen("port = 8080\n\n", "port = 8081\n\n", 1);
    assert_ne!(moved, full);
    reload(&mut fixture, &moved, "moving B to port 8081");
    let web = &fixture.table.services[0];
    assert_eq!(
        (
            web.backends[1].id,
            web.backends[1].addr.port(),
            web.backends[1].up
        ),
        (1, 8081, false),
        "B:8081 took id 1, down until it passes a probe"
    );
    assert_eq!(
        backend_stats(&fixture, 1),
        TrafficStats::default(),
        "B:8081 does not inherit B:8080's counts"
    );
    assert_eq!(
        backend_stats(&fixture, 0).new_flows,
        2,
        "A stays, with its counts"
    );

    // web and dns go together, and with them their one VIP address.
    reload(
        &mut fixture,
        OTHER,
        "removing web and dns, which share a VIP",
    );
    let names: Vec<&str> = fixture
        .table
        .services
        .iter()
        .map(|service| service.config.name.as_str())
        .collect();
    assert_eq!(names, ["other"]);
    fixture.set_up(0, 0, true);
    let (verdict, _) = fixture.run(&syn_to(VIP, 40010), fixture.pub_ifindex);
    assert_eq!(
        verdict, XDP_PASS,
        "10.200.1.1 is no longer a service address"
    );
    let syn = syn_to(other_vip, 40011);
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 9090);
    assert_frames_equal(&out, &expected, "SYN to other after the removal");

    // And back: the address is balanced again.
    reload(&mut fixture, &full, "bringing web and dns back");
    fixture.set_up(0, 0, true);
    let syn = syn_to(VIP, 40012);
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN to web after it came back");
}

/// The demo topology (two backends, point to point) with nginx on both families, port 80, on
/// each backend, and on backend2 also on port 8080 (answering `backend2-8080`).
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    backends: Vec<Nginx>,
    client: Client,
    topology: Topology,
}

impl Testbed {
    fn start() -> anyhow::Result<Self> {
        let topology = Topology::demo().context("building the demo topology")?;
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
        let backend2 = topology.backend("backend2")?;
        backends.push(Nginx::start(
            &backend2.netns,
            "backend2-8080",
            backend2.address,
            8080,
        )?);
        Ok(Self {
            backends,
            client: Client::new(&topology.client),
            topology,
        })
    }

    /// lb-user with `services`, once every backend of them is up.
    fn start_lb(&self, services: &[ServiceConfig]) -> anyhow::Result<LoadBalancer> {
        LoadBalancer::start_serving(&self.topology.lb, services, STATE_TIMEOUT)
    }

    /// The nginx answering `name`.
    fn nginx(&self, name: &str) -> anyhow::Result<&Nginx> {
        let index = match name {
            "backend1" => 0,
            "backend2" => 1,
            "backend2-8080" => 2,
            _ => anyhow::bail!("no nginx called {name}"),
        };
        Ok(&self.backends[index])
    }
}

/// `REQUESTS` requests to `url` were answered by exactly `expected`, each at least a quarter
/// of the time (round robin gives half each).
fn check_answered_by(
    testbed: &Testbed,
    url: &str,
    expected: &[&str],
    when: &str,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let answers = testbed.client.answers(url, REQUESTS, when)?;
    let names: Vec<&str> = answers.keys().map(String::as_str).collect();
    ensure!(names == expected, "{when}: answered by {answers:?}");
    for (name, &count) in &answers {
        ensure!(
            count >= REQUESTS / 4,
            "{when}: {name} answered {count} of {REQUESTS}: {answers:?}"
        );
    }
    Ok(answers)
}

#[test]
fn backends_new_to_a_reload_come_up_and_take_traffic() -> anyhow::Result<()> {
    if !skip_unless_privileged("backends_new_to_a_reload_come_up_and_take_traffic") {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    let service = testbed.topology.demo_service();
    let mut lb = testbed.start_lb(std::slice::from_ref(&service))?;
    check_answered_by(
        &testbed,
        SERVICE_URL,
        &["backend1", "backend2"],
        "before the reloads",
    )?;

    // backend2 moves from port 80 to 8080: the new backend takes the removed one's id.
    let backend2 = testbed.topology.backend("backend2")?.address.to_string();
    let mut moved = service.clone();
    moved.backends[1] = (backend2.clone(), 8080);
    let message = lb.reload(&config_toml(&[moved.clone()]))?;
    println!("reload: {message}");
    let stats = lb.wait_backend_state(&backend2, "up", STATE_TIMEOUT)?;
    let port = stats.backend(&backend2)?.port;
    ensure!(
        port == 8080,
        "backend2 in stats after the move: port {port}"
    );
    let answers = check_answered_by(
        &testbed,
        SERVICE_URL,
        &["backend1", "backend2-8080"],
        "after moving backend2 to port 8080",
    )?;
    let logged = testbed.nginx("backend2-8080")?.access_log_lines()?.len() as u64;
    // Its probes are in the log too: at least the requests it answered.
    ensure!(
        logged >= answers["backend2-8080"],
        "backend2:8080 logged {logged} requests, answered {answers:?}"
    );

    // A renamed service is a new service: both its backends are new (with the old ids).
    let renamed = ServiceConfig {
        name: "www".to_string(),
        ..moved
    };
    let message = lb.reload(&config_toml(&[renamed]))?;
    println!("reload: {message}");
    let stats = lb.wait_backends_up(2, STATE_TIMEOUT)?;
    ensure!(
        stats.services.len() == 1 && stats.service("www").is_ok(),
        "after the rename: {:?}",
        stats.services
    );
    check_answered_by(
        &testbed,
        SERVICE_URL,
        &["backend1", "backend2-8080"],
        "after renaming the service",
    )?;
    lb.shutdown()
}

#[test]
fn removing_two_services_that_share_a_vip_is_a_successful_reload() -> anyhow::Result<()> {
    if !skip_unless_privileged("removing_two_services_that_share_a_vip_is_a_successful_reload") {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    let web = testbed.topology.demo_service();
    let web6 = testbed.topology.demo_service6();
    // alt6 shares web6's VIP, on port 8000, over backend1's IPv6 address.
    let alt6 = ServiceConfig {
        name: "alt6".to_string(),
        port: 8000,
        backends: web6.backends[..1].to_vec(),
        ..web6.clone()
    };
    let all = [web.clone(), web6.clone(), alt6.clone()];
    let mut lb = testbed.start_lb(&all)?;
    check_answered_by(&testbed, ALT_URL6, &["backend1"], "alt6 before the reload")?;

    let message = lb.reload(&config_toml(std::slice::from_ref(&web)))?;
    println!("reload: {message}");
    ensure!(
        message.contains(r#"removed ["web6", "alt6"]"#),
        "the reload's message: {message}"
    );
    let stats = lb.stats_json()?;
    let names: Vec<&str> = stats.services.iter().map(|s| s.name.as_str()).collect();
    ensure!(names == ["web"], "services after the reload: {names:?}");
    let flows = lb.flows(Some("web6"), None);
    ensure!(
        flows
            .as_ref()
            .is_err_and(|error| format!("{error:#}").contains(r#"no service named "web6""#)),
        "`lb-user flows --service web6` after web6 was removed: {flows:?}"
    );
    for url in [SERVICE_URL6, ALT_URL6] {
        let answer = testbed.client.get(url);
        ensure!(
            answer.is_err(),
            "{url} is no longer a service (and nothing in the lb namespace listens there), but \
             answered {answer:?}"
        );
    }
    check_answered_by(
        &testbed,
        SERVICE_URL,
        &["backend1", "backend2"],
        "web after the removal",
    )?;

    // And back again: the VIP address is balanced again.
    let message = lb.reload(&config_toml(&all))?;
    println!("reload: {message}");
    lb.wait_backends_up(5, STATE_TIMEOUT)?;
    check_answered_by(
        &testbed,
        SERVICE_URL6,
        &["backend1", "backend2"],
        "web6 back",
    )?;
    check_answered_by(&testbed, ALT_URL6, &["backend1"], "alt6 back")?;
    lb.shutdown()
}

#[test]
fn a_dead_backend_goes_down_while_reloads_come_faster_than_its_probes() -> anyhow::Result<()> {
    if !skip_unless_privileged("a_dead_backend_goes_down_while_reloads_come_faster_than_its_probes")
    {
        return Ok(());
    }
    let mut testbed = Testbed::start()?;
    let service = testbed.topology.demo_service();
    let check = service.health_check.clone();
    // Reloads closer together than one probe interval: a checker restarted by each would never
    // see `fall` failures in a row.
    let reload_every = Duration::from_millis(check.interval_ms / 2);
    let lb = testbed.start_lb(std::slice::from_ref(&service))?;
    let config = config_toml(std::slice::from_ref(&service));
    let backend2 = testbed.topology.backend("backend2")?.address.to_string();

    testbed.backends[1].stop()?;
    let stopped = Instant::now();
    // `fall` probes an interval apart, the last taking up to its timeout, and slack for two
    // busy CPUs.
    let allowed =
        Duration::from_millis(check.interval_ms * u64::from(check.fall) + check.timeout_ms)
            + Duration::from_secs(2);
    let mut reloads = 0;
    loop {
        lb.reload(&config)?;
        reloads += 1;
        if lb.stats_json()?.backend(&backend2)?.state == "down" {
            break;
        }
        ensure!(
            stopped.elapsed() < allowed,
            "backend2 still up {:?} after its server stopped (interval {} ms, fall {}), through \
             {reloads} reloads:\n{}",
            stopped.elapsed(),
            check.interval_ms,
            check.fall,
            lb.log()
        );
        std::thread::sleep(reload_every);
    }
    println!(
        "backend2 down {:?} after its server stopped, through {reloads} reloads",
        stopped.elapsed()
    );
    ensure!(
        reloads >= 3,
        "only {reloads} reloads before backend2 went down"
    );
    check_answered_by(
        &testbed,
        SERVICE_URL,
        &["backend1"],
        "after backend2 went down",
    )?;
    lb.shutdown()
}

#[test]
fn reloads_warn_about_backends_they_share_and_name_services_they_move() -> anyhow::Result<()> {
    if !skip_unless_privileged("reloads_warn_about_backends_they_share_and_name_services_they_move")
    {
        return Ok(());
    }
    let testbed = Testbed::start()?;
    let web = testbed.topology.demo_service();
    let lb = testbed.start_lb(std::slice::from_ref(&web))?;
    let backend1 = testbed.topology.backend("backend1")?.address.to_string();
    let warning = format!("backend {backend1}:80 serves services web, alt");
    ensure!(
        !lb.log().contains(&warning),
        "before the reload:\n{}",
        lb.log()
    );

    // alt on port 8000 over the same backends: their endpoints now serve two services.
    let alt = ServiceConfig {
        name: "alt".to_string(),
        port: 8000,
        ..web.clone()
    };
    lb.reload(&config_toml(&[web.clone(), alt]))?;
    ensure!(
        lb.log().contains(&warning),
        "after the reload:\n{}",
        lb.log()
    );

    // web moves to port 8001: neither added nor removed, but moved.
    let moved = ServiceConfig {
        port: 8001,
        ..web.clone()
    };
    let message = lb.reload(&config_toml(&[moved]))?;
    ensure!(
        message.contains(r#"services added [], removed ["alt"], changed []"#)
            && message.contains(r#"start over) ["web"]"#),
        "the reload's message: {message}"
    );
    lb.shutdown()
}
