//! End to end: the load balancer's neighbour entry for a client's next hop goes missing (it
//! expired, or failed), with real traffic through lb-user.
//!
//! A translated IPv4 reply comes from the VIP, a local address, so the kernel drops it as a
//! martian if XDP passes it, and never resolves the neighbour: every reply would be lost until
//! something else refreshed the entry. The datapath drops such a reply itself and records the
//! next hop, lb-user has the kernel resolve it, and the next retransmission gets through.
//!
//! Needs root (without it: SKIPPED, or a failure under `LB_REQUIRE_PRIVILEGED=1`) and lb-user
//! built: `cargo test -p lb-tests --test neighbours -- --test-threads=1`.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use lb_tests::{
    skip_unless_privileged, LoadBalancer, Nginx, Topology, CLIENT_ADDRESS, PUBLIC_INTERFACE,
    SERVICE_PORT, VIP,
};

const SERVICE_URL: &str = "http://10.200.1.1/";
/// Bound on any wait for a health state change.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one request: the backend's first SYN-ACK is dropped, its retransmission (a second
/// later) must get through. Generous: the two CPUs are shared.
const REQUEST_TIMEOUT_SECONDS: &str = "6";
/// Times the entry is deleted and a request sent.
const ROUNDS: u64 = 3;
/// Between rounds: lb-user asks for each next hop at most once a second.
const ROUND_GAP: Duration = Duration::from_millis(1200);

/// The lb namespace's neighbour entry for the client on `lbpub`, as `ip neigh show` prints it
/// (empty when there is none).
fn client_entry(topology: &Topology) -> anyhow::Result<String> {
    let client = CLIENT_ADDRESS.to_string();
    let entry = topology
        .lb
        .ip(["neigh", "show", &client, "dev", PUBLIC_INTERFACE])?;
    Ok(entry.trim().to_string())
}

#[test]
fn replies_reach_a_client_whose_neighbour_entry_is_gone() -> anyhow::Result<()> {
    if !skip_unless_privileged("replies_reach_a_client_whose_neighbour_entry_is_gone") {
        return Ok(());
    }
    let topology = Topology::demo().context("building the demo topology")?;
    let backends = Nginx::start_on_backends(&topology, SERVICE_PORT)?;
    let lb = LoadBalancer::start_serving(&topology.lb, &[topology.demo_service()], STATE_TIMEOUT)?;
    let curl = || {
        topology.client.exec([
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            REQUEST_TIMEOUT_SECONDS,
            SERVICE_URL,
        ])
    };
    curl().context("a request before anything is deleted")?;

    // The client never asks the load balancer again (as a router with a long ARP timeout
    // does): nothing but the load balancer itself can bring its entry for the client back.
    let lb_mac = topology
        .lb
        .exec(["cat", &format!("/sys/class/net/{PUBLIC_INTERFACE}/address")])?;
    topology.client.ip([
        "neigh",
        "replace",
        &VIP.to_string(),
        "lladdr",
        lb_mac.trim(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;

    for round in 1..=ROUNDS {
        let client = CLIENT_ADDRESS.to_string();
        topology
            .lb
            .ip(["neigh", "del", &client, "dev", PUBLIC_INTERFACE])?;
        let entry = client_entry(&topology)?;
        ensure!(
            entry.is_empty() || entry.contains("FAILED"),
            "round {round}: the entry is still usable after its deletion: {entry:?}"
        );
        let started = Instant::now();
        let body = curl().map_err(|error| {
            anyhow::anyhow!(
                "round {round}: request through the VIP without the client's neighbour entry: \
                 {error}\n{}",
                lb.log()
            )
        })?;
        ensure!(
            body.starts_with("backend"),
            "round {round}: answered {body:?}"
        );
        println!(
            "round {round}: answered by {} in {:?}",
            body.trim(),
            started.elapsed()
        );
        let entry = client_entry(&topology)?;
        ensure!(
            entry.contains("lladdr") && !entry.contains("FAILED"),
            "round {round}: the client's entry is not back: {entry:?}"
        );
        thread::sleep(ROUND_GAP);
    }

    let stats = lb.stats_json()?;
    let dropped = stats.counter("drop_neigh_unresolved")?;
    ensure!(
        dropped >= ROUNDS,
        "drop_neigh_unresolved is {dropped}, expected one per round at least"
    );
    ensure!(
        stats.counter("pass_neigh_unresolved")? == 0,
        "no reply may go to the kernel towards the unresolved client"
    );
    // Asked for in every round, logged at info level once (the log says so once a minute).
    let log = lb.log();
    let logged = log
        .matches(&format!(
            "next hop {CLIENT_ADDRESS} on {PUBLIC_INTERFACE} has no usable neighbour entry"
        ))
        .count();
    ensure!(logged == 1, "logged {logged} times:\n{log}");
    lb.shutdown()?;
    drop(backends);
    topology.shutdown()
}
