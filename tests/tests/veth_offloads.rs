//! End-to-end tests of veths as containers leave them (issue 5, "Checksums" and "veth and real
//! topologies"), with real nginx backends behind lb-user:
//!
//! - HTTP requests and a 1 MB download through the VIP with the senders' transmit checksum
//!   offload on (the kernel's default: partial checksums reach XDP) and off, point to point
//!   (native and generic XDP) and with backends behind a bridge; no client or backend counts a
//!   checksum error (`InCsumErrors` of /proc/net/snmp in its namespace);
//! - both states of a backend's veth end that lets XDP_REDIRECT deliver: GRO on without an XDP
//!   program, and an XDP program with GRO off;
//! - neither: lb-user refuses to start, naming the interface, the backends and the fix; and
//!   when an end loses its GRO while lb-user runs, its backends are served through the
//!   kernel's forwarding (logged), and redirected again once it is back.
//!
//! They need root (without it they print SKIPPED, or fail under `LB_REQUIRE_PRIVILEGED=1`) and
//! lb-user built (`cargo build -p lb-user`); run them one at a time:
//! `cargo test -p lb-tests --test veth_offloads -- --test-threads=1`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context};
use lb_tests::process::{unique_name, TempDir};
use lb_tests::{
    config_toml, skip_unless_privileged, Client, Layout, LoadBalancer, Nginx, Offloads, PeerState,
    Topology, SERVICE_PORT,
};

const SERVICE_URL: &str = "http://10.200.1.1/";
const DOWNLOAD_NAME: &str = "download.bin";
const DOWNLOAD_URL: &str = "http://10.200.1.1/files/download.bin";
const DOWNLOAD_SIZE: usize = 1 << 20;
/// Requests per check; each backend must answer some.
const REQUESTS: u64 = 20;
/// Bound on backends coming up, and on lb-user noticing a change of a veth end (its reconcile
/// runs every 3 s).
const STATE_TIMEOUT: Duration = Duration::from_secs(12);

/// A topology with nginx on both backends, each serving the download, and lb-user running.
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    lb: LoadBalancer,
    _backends: Vec<Nginx>,
    client: Client,
    download: Vec<u8>,
    scratch: TempDir,
    topology: Topology,
}

impl Testbed {
    fn start(layout: Layout, offloads: Offloads, mode: &str) -> anyhow::Result<Self> {
        let topology = Topology::build_with(layout, offloads)
            .with_context(|| format!("building the {} topology", layout.name()))?;
        let download = download_bytes();
        let mut backends = Vec::new();
        for backend in &topology.backends {
            let nginx = Nginx::start(&backend.netns, &backend.name, backend.address, SERVICE_PORT)?;
            nginx.add_file(DOWNLOAD_NAME, &download)?;
            backends.push(nginx);
        }
        let config = config_toml(&[topology.demo_service()]);
        let mut lb = LoadBalancer::start_in_mode(&topology.lb, &config, Some(mode))?;
        lb.wait_backends_up(backends.len(), STATE_TIMEOUT)?;
        println!(
            "{} topology, sender tx checksum offload {}, backend ends {:?}, {mode} mode",
            layout.name(),
            if offloads.sender_tx_checksum {
                "on"
            } else {
                "off"
            },
            offloads.backend_peer
        );
        Ok(Self {
            lb,
            _backends: backends,
            client: Client::new(&topology.client),
            download,
            scratch: TempDir::new(&format!("{}-downloads", unique_name()))?,
            topology,
        })
    }

    /// Checksum errors counted so far by the client's and every backend's kernel (TCP + UDP).
    fn checksum_errors(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut errors = BTreeMap::new();
        let (tcp, udp) = Topology::checksum_errors(&self.topology.client)?;
        errors.insert("client".to_string(), tcp + udp);
        for backend in &self.topology.backends {
            let (tcp, udp) = Topology::checksum_errors(&backend.netns)?;
            errors.insert(backend.name.clone(), tcp + udp);
        }
        Ok(errors)
    }

    /// Requests (both backends must answer), then the 1 MB download, compared byte for byte;
    /// no host may count a checksum error meanwhile. Returns who answered.
    fn check_transfers(&self, what: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let errors_before = self.checksum_errors()?;
        let mut answers = BTreeMap::new();
        for request in 1..=REQUESTS {
            let body = self
                .client
                .get(SERVICE_URL)
                .with_context(|| format!("{what}: request {request} of {REQUESTS}"))?;
            *answers.entry(body.trim().to_string()).or_default() += 1;
        }
        ensure!(
            answers.keys().eq(["backend1", "backend2"]),
            "{what}: answered by {answers:?}"
        );
        let received = self.scratch.path().join("received.bin");
        self.client
            .download(DOWNLOAD_URL, &received)
            .with_context(|| {
                let stats = self
                    .lb
                    .stats_text()
                    .unwrap_or_else(|error| format!("{error:#}"));
                format!("{what}: downloading 1 MB through the VIP; lb-user stats:\n{stats}")
            })?;
        let bytes = std::fs::read(&received).context("reading the download")?;
        ensure!(
            bytes == self.download,
            "{what}: the download arrived corrupted ({} bytes of {DOWNLOAD_SIZE})",
            bytes.len()
        );
        let errors_after = self.checksum_errors()?;
        ensure!(
            errors_after == errors_before,
            "{what}: checksum errors (InCsumErrors) went from {errors_before:?} to {errors_after:?}"
        );
        println!("{what}: {answers:?}, 1 MB intact, no checksum errors ({errors_after:?})");
        Ok(answers)
    }

    fn counter(&self, name: &str) -> anyhow::Result<u64> {
        self.lb.stats_json()?.counter(name)
    }

    /// Waits until lb-user's log contains `text`.
    fn wait_log(&self, text: &str) -> anyhow::Result<()> {
        self.lb.wait_log(text, STATE_TIMEOUT)
    }

    fn shutdown(mut self) -> anyhow::Result<()> {
        self.lb.stop()?;
        drop(self.lb);
        drop(self._backends);
        self.topology.shutdown()
    }
}

/// 1 MB of bytes that do not repeat within a packet (a linear congruential generator).
fn download_bytes() -> Vec<u8> {
    let mut state: u32 = 0x2545_f491;
    (0..DOWNLOAD_SIZE)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

fn offloads(sender_tx_checksum: bool, backend_peer: PeerState) -> Offloads {
    Offloads {
        sender_tx_checksum,
        backend_peer,
    }
}

#[test]
fn point_to_point_transfers_are_right_with_sender_offloads_on_and_off() -> anyhow::Result<()> {
    if !skip_unless_privileged("point_to_point_transfers_are_right_with_sender_offloads_on_and_off")
    {
        return Ok(());
    }
    for (tx, mode) in [(true, "native"), (false, "native"), (true, "skb")] {
        let testbed = Testbed::start(Layout::PointToPoint, offloads(tx, PeerState::Gro), mode)?;
        if mode == "skb" {
            // Segmentation offload off on the senders: in generic mode a TSO burst reaches XDP
            // as one frame over the MTU, is passed to the kernel translated
            // (`pass_frag_needed`), and is lost there without a counter. Seen on 6.18 with the
            // datapath before partial checksums were handled too: a limit of its own, not of
            // the checksums tested here. FIXME(#5): find where the kernel drops it.
            for netns in std::iter::once(&testbed.topology.client).chain(
                testbed
                    .topology
                    .backends
                    .iter()
                    .map(|backend| &backend.netns),
            ) {
                netns.exec(["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
            }
        }
        let what = format!("point to point, tx offload {tx}, {mode}");
        testbed.check_transfers(&what)?;
        let completed = testbed.counter("checksum_completed")?;
        ensure!(
            testbed.counter("forward_redirect")? > 0 && testbed.counter("reply_redirect")? > 0,
            "{what}: not redirected both ways"
        );
        match (tx, mode) {
            // Every client and backend packet arrived partial and left by XDP_REDIRECT.
            (true, "native") => ensure!(
                completed >= 2 * REQUESTS,
                "{what}: checksum_completed is {completed}"
            ),
            // Generic mode leaves partial checksums to the kernel, which keeps the sk_buff.
            (true, _) => ensure!(completed == 0, "{what}: checksum_completed is {completed}"),
            _ => {}
        }
        println!("{what}: checksum_completed {completed}");
        testbed.shutdown()?;
    }
    Ok(())
}

#[test]
fn bridge_transfers_are_right_with_sender_offloads_on_and_off() -> anyhow::Result<()> {
    if !skip_unless_privileged("bridge_transfers_are_right_with_sender_offloads_on_and_off") {
        return Ok(());
    }
    for tx in [true, false] {
        let testbed = Testbed::start(Layout::Bridge, offloads(tx, PeerState::Gro), "native")?;
        let what = format!("bridge, tx offload {tx}");
        testbed.check_transfers(&what)?;
        ensure!(
            testbed.counter("pass_kernel_forward")? > 0 && testbed.counter("reply_egress")? > 0,
            "{what}: not through the kernel and tc egress"
        );
        // The kernel completes the client's partial checksums on its way into the bridge.
        let completed = testbed.counter("checksum_completed")?;
        ensure!(completed == 0, "{what}: checksum_completed is {completed}");
        testbed.shutdown()?;
    }
    Ok(())
}

#[test]
fn backend_ends_with_an_xdp_program_and_no_gro_get_redirects() -> anyhow::Result<()> {
    if !skip_unless_privileged("backend_ends_with_an_xdp_program_and_no_gro_get_redirects") {
        return Ok(());
    }
    let setup = offloads(true, PeerState::XdpProgram);
    let testbed = Testbed::start(Layout::PointToPoint, setup, "native")?;
    testbed.check_transfers("backend ends with an XDP program")?;
    let redirected = testbed.counter("forward_redirect")?;
    ensure!(
        redirected >= REQUESTS,
        "forward_redirect is {redirected} after {REQUESTS} requests"
    );
    ensure!(testbed.counter("pass_kernel_forward")? == 0);
    testbed.shutdown()
}

#[test]
fn lb_user_refuses_a_redirect_target_that_cannot_take_redirects() -> anyhow::Result<()> {
    if !skip_unless_privileged("lb_user_refuses_a_redirect_target_that_cannot_take_redirects") {
        return Ok(());
    }
    let topology = Topology::build_with(Layout::PointToPoint, offloads(true, PeerState::Neither))?;
    let config = config_toml(&[topology.demo_service()]);
    let (status, log) = run_native_to_exit(&topology, &config)?;
    ensure!(!status.success(), "lb-user started; log:\n{log}");
    let backend1 = topology.backend("backend1")?.address;
    for needed in [
        "lbb1",
        &backend1.to_string(),
        "cannot take XDP redirects",
        "gro on",
    ] {
        ensure!(
            log.contains(needed),
            "the refusal lacks {needed:?}; log:\n{log}"
        );
    }
    for interface in topology.lb_interfaces() {
        ensure!(
            !topology.xdp_attached(&interface)?,
            "XDP left on {interface}; log:\n{log}"
        );
    }
    println!("lb-user refused with {status}");
    topology.shutdown()
}

/// `LoadBalancer::run_to_exit` in native mode (generic redirects need nothing of the peer).
fn run_native_to_exit(
    topology: &Topology,
    config: &str,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let previous = std::env::var_os("LB_XDP_MODE");
    ensure!(
        previous.is_none() || previous.as_deref() == Some("native".as_ref()),
        "LB_XDP_MODE={previous:?}: this test needs native mode"
    );
    LoadBalancer::run_to_exit(&topology.lb, config, Duration::from_secs(15))
}

#[test]
fn a_redirect_target_that_turns_unready_is_served_through_the_kernel() -> anyhow::Result<()> {
    if !skip_unless_privileged("a_redirect_target_that_turns_unready_is_served_through_the_kernel")
    {
        return Ok(());
    }
    let testbed = Testbed::start(
        Layout::PointToPoint,
        offloads(true, PeerState::Gro),
        "native",
    )?;
    testbed.check_transfers("before")?;
    let backend1 = testbed.topology.backend("backend1")?.address.to_string();

    // The container's end loses GRO: redirects into lbb1 would be lost.
    testbed.topology.set_backend_gro("backend1", false)?;
    testbed.wait_log("interface lbb1 cannot take XDP redirects now")?;
    let log = testbed.lb.log();
    ensure!(
        log.contains(&backend1) && log.contains("reached through the kernel's forwarding"),
        "the warning names neither the backend nor the kernel path; log:\n{log}"
    );
    let kernel_before = testbed.counter("pass_kernel_forward")?;
    let answers = testbed.check_transfers("lbb1 unready")?;
    let through_kernel = testbed.counter("pass_kernel_forward")? - kernel_before;
    ensure!(
        through_kernel >= answers["backend1"],
        "{through_kernel} packets through the kernel for {} requests to backend1",
        answers["backend1"]
    );

    // GRO back on: redirected again.
    testbed.topology.set_backend_gro("backend1", true)?;
    testbed.wait_log("interface lbb1 takes XDP redirects again")?;
    let (kernel_before, redirect_before) = (
        testbed.counter("pass_kernel_forward")?,
        testbed.counter("forward_redirect")?,
    );
    testbed.check_transfers("lbb1 ready again")?;
    let through_kernel = testbed.counter("pass_kernel_forward")? - kernel_before;
    let redirected = testbed.counter("forward_redirect")? - redirect_before;
    ensure!(
        through_kernel == 0 && redirected >= REQUESTS,
        "after lbb1 was ready again: {through_kernel} through the kernel, {redirected} redirected"
    );
    testbed.shutdown()
}
