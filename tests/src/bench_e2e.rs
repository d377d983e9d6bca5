//! The end-to-end benchmark: real HTTP and UDP through the demo topology, with our XDP load
//! balancer and, in turn on the same namespaces, what an operator would otherwise run.
//!
//! Setups, one at a time (the others stopped, lb-user's XDP program detached):
//!
//! - **xdp-lb**: lb-user on the lb namespace's interfaces, round robin over both backends;
//! - **haproxy-tcp** and **haproxy-http**: Debian's HAProxy in the lb namespace, `mode tcp` and
//!   `mode http`, `balance roundrobin`, one thread;
//! - **nft-dnat**: nftables DNAT with `numgen inc` round robin (kernel NAT and conntrack);
//! - **direct**: the client straight to backend1 through the lb namespace's plain forwarding,
//!   nothing balancing: the upper bound of this topology.
//!
//! HTTP load is wrk in the client namespace, keep-alive and a new connection per request
//! (`Connection: close`), after a warm-up, in rounds that visit every setup in turn so that
//! noise from the machine spreads over all of them. CPU on the load balancer's side is the
//! HAProxy process's own (utime + stime from `/proc/PID/stat`) and, for every setup, the
//! machine's softirq time from `/proc/stat` over the run: XDP, nftables and kernel forwarding
//! all run in softirq, but so does the TCP receive path of the client and the backends, so the
//! softirq of `direct` (no balancer at all) is the baseline the others are read against.
//!
//! The packet-rate run floods small UDP packets from the client namespace to a UDP service on
//! the VIP (xdp-lb against nft-dnat) and counts, with an nftables counter in each backend
//! namespace, the packets that reached the backends.
//!
//! Every load is bounded in time and in count and stops by itself; every process is stopped by
//! its PID and every namespace is deleted at the end, also after an error.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::netns::NetnsName;
use crate::process::{
    command_line, pid_alive, unique_name, wait_until, ChildProcess, Poll, TempDir,
};
use crate::topology::{Topology, VIP};
use crate::LoadBalancer;

/// The UDP port of the packet-rate service, on the VIP and on the backends.
pub const UDP_PORT: u16 = 9000;
/// UDP payload of the flood: with the headers, a 60-byte frame, Ethernet's minimum.
const UDP_PAYLOAD: usize = 18;
/// Distinct source ports (flows) of the flood, so that round robin has flows to spread.
const UDP_FLOWS: usize = 16;
/// Concurrent wrk connections.
const CONNECTIONS: u32 = 32;
/// Most requests one wrk run may make, whatever its duration: the count bound of the load.
const REQUEST_LIMIT: u64 = 5_000_000;
/// The nftables table the benchmark creates in the lb and backend namespaces.
const NFT_TABLE: &str = "xdplb_bench";

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct E2eOptions {
    /// Rounds over all setups; each round makes one measured run per setup and mode.
    pub rounds: usize,
    pub run_seconds: u32,
    /// Warm-up before each setup's runs in a round; 0 for none.
    pub warmup_seconds: u32,
    pub udp_rounds: usize,
    pub udp_seconds: f64,
    /// Most UDP packets one flood may send.
    pub udp_packet_limit: u64,
}

impl E2eOptions {
    pub fn full() -> Self {
        Self {
            rounds: 3,
            run_seconds: 10,
            warmup_seconds: 2,
            udp_rounds: 3,
            udp_seconds: 5.0,
            udp_packet_limit: 50_000_000,
        }
    }

    /// Seconds: every setup, mode and check once, for CI. The numbers mean little.
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            run_seconds: 1,
            warmup_seconds: 0,
            udp_rounds: 1,
            udp_seconds: 0.5,
            udp_packet_limit: 1_000_000,
        }
    }
}

/// What balances the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    XdpLb,
    HaproxyTcp,
    HaproxyHttp,
    NftDnat,
    Direct,
}

impl Setup {
    pub const ALL: [Setup; 5] = [
        Setup::XdpLb,
        Setup::HaproxyTcp,
        Setup::HaproxyHttp,
        Setup::NftDnat,
        Setup::Direct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::XdpLb => "xdp-lb (ours)",
            Setup::HaproxyTcp => "HAProxy mode tcp",
            Setup::HaproxyHttp => "HAProxy mode http",
            Setup::NftDnat => "nftables DNAT",
            Setup::Direct => "direct to backend1",
        }
    }
}

/// How wrk opens connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    /// `Connection: close`: one TCP connection per request.
    NewConnection,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConnection => "new connection per request",
        }
    }
}

/// One measured wrk run.
#[derive(Clone, Debug)]
pub struct HttpRun {
    pub setup: Setup,
    pub mode: Mode,
    pub round: usize,
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors of every kind plus non-2xx/3xx responses.
    pub errors: u64,
    pub seconds: f64,
    /// CPU over the run, in percent of one core, by who used it: `wrk`, `nginx`, `haproxy`,
    /// `lb-user`, `softirq` (the whole machine's), `all` (the whole machine's busy time).
    pub cpu: Vec<(&'static str, f64)>,
}

impl HttpRun {
    pub fn cpu(&self, who: &str) -> f64 {
        self.cpu
            .iter()
            .find(|(name, _)| *name == who)
            .map_or(0.0, |(_, percent)| *percent)
    }

    /// Softirq CPU time per request, in microseconds.
    pub fn softirq_us_per_request(&self) -> f64 {
        self.cpu("softirq") / 100.0 * self.seconds / self.requests.max(1) as f64 * 1e6
    }

    /// The process (or softirq) that used the most CPU.
    pub fn busiest(&self) -> (&'static str, f64) {
        self.cpu
            .iter()
            .filter(|(name, _)| *name != "all")
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("nobody", 0.0))
    }
}

/// One UDP flood.
#[derive(Clone, Debug)]
pub struct UdpRun {
    pub setup: Setup,
    pub round: usize,
    pub sent: u64,
    pub delivered: u64,
    pub seconds: f64,
    pub softirq_percent: f64,
    /// Packets the interfaces of the topology counted as dropped (`ip -s link` and the veth
    /// driver's `ethtool -S` counters): where the lost ones went, as far as they are counted.
    pub interface_drops: u64,
    /// The interfaces that dropped any, as `namespace interface` and count.
    pub drop_sites: Vec<(String, u64)>,
}

impl UdpRun {
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.seconds
    }

    pub fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }
}

#[derive(Clone, Debug)]
pub struct E2eReport {
    pub options: E2eOptions,
    pub http: Vec<HttpRun>,
    pub udp: Vec<UdpRun>,
    /// Versions of the tools, for the report.
    pub versions: Vec<(&'static str, String)>,
    pub seconds: f64,
}

/// Runs the whole end-to-end benchmark, printing progress. Builds the topology, and removes
/// everything it made before returning, also after an error.
pub fn run(options: E2eOptions) -> anyhow::Result<E2eReport> {
    let started = Instant::now();
    let versions = check_tools()?;
    let topology = Topology::demo().context("building the demo topology")?;
    let mut bench = Bench {
        options,
        backends: Vec::new(),
        running: None,
        topology,
    };
    let result = bench.run_all();
    let teardown = bench.teardown();
    let (http, udp) = match (result, teardown) {
        (Ok(runs), Ok(())) => runs,
        (Ok(_), Err(error)) => return Err(error),
        (Err(error), Ok(())) => return Err(error),
        (Err(error), Err(teardown)) => {
            return Err(error.context(format!("then teardown failed: {teardown:#}")))
        }
    };
    Ok(E2eReport {
        options,
        http,
        udp,
        versions,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The tools the benchmark drives, with their versions; an error names the missing one.
fn check_tools() -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut versions = Vec::new();
    for (name, program, args) in [
        ("wrk", "wrk", &["-v"][..]),
        ("HAProxy", "haproxy", &["-v"][..]),
        ("nftables", "nft", &["--version"][..]),
        ("nginx", "/usr/sbin/nginx", &["-v"][..]),
    ] {
        let output = Command::new(program).args(args).output().with_context(|| {
            format!("running `{program}`: is it installed? (scripts/install-deps.sh installs it)")
        })?;
        // wrk -v exits 1 after printing its version; nginx prints to stderr.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let first = text.lines().next().unwrap_or("").trim().to_string();
        ensure!(!first.is_empty(), "`{program}` printed no version");
        versions.push((name, first));
    }
    Ok(versions)
}

/// What one setup left running, stopped by [`Bench::stop_setup`].
enum Running {
    Xdp(LoadBalancer),
    Haproxy {
        process: ChildProcess,
        _dir: TempDir,
    },
    Nft,
    Nothing,
}

struct Bench {
    options: E2eOptions,
    backends: Vec<BenchNginx>,
    running: Option<Running>,
    topology: Topology,
}

impl Bench {
    fn run_all(&mut self) -> anyhow::Result<(Vec<HttpRun>, Vec<UdpRun>)> {
        self.prepare()?;
        let mut http = Vec::new();
        for round in 1..=self.options.rounds {
            for setup in Setup::ALL {
                println!(
                    "bench e2e: round {round}/{}: {}",
                    self.options.rounds,
                    setup.name()
                );
                self.start_setup(setup, false)?;
                let runs = self.http_runs(setup, round);
                self.stop_setup()?;
                http.extend(runs?);
            }
        }
        let mut udp = Vec::new();
        for round in 1..=self.options.udp_rounds {
            for setup in [Setup::XdpLb, Setup::NftDnat] {
                println!(
                    "bench e2e: UDP packet rate, round {round}/{}: {}",
                    self.options.udp_rounds,
                    setup.name()
                );
                self.start_setup(setup, true)?;
                let run = self.udp_run(setup, round);
                self.stop_setup()?;
                udp.push(run?);
            }
        }
        Ok((http, udp))
    }

    /// nginx on both backends, a UDP sink counter in each backend namespace, and room for
    /// many short connections in the client namespace.
    fn prepare(&mut self) -> anyhow::Result<()> {
        for backend in &self.topology.backends {
            self.backends.push(BenchNginx::start(
                backend.netns.name(),
                &backend.name,
                backend.address,
            )?);
            let sink = format!(
                "table inet {NFT_TABLE} {{\n\
                 \tchain sink {{\n\
                 \t\ttype filter hook prerouting priority raw; policy accept;\n\
                 \t\tudp dport {UDP_PORT} counter drop\n\
                 \t}}\n\
                 }}\n"
            );
            nft_apply(backend.netns.name(), &sink)
                .with_context(|| format!("adding the UDP sink counter on {}", backend.name))?;
        }
        let client = &self.topology.client;
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(())
    }

    fn url(&self, setup: Setup) -> String {
        match setup {
            Setup::Direct => format!("http://{}/", self.topology.backends[0].address),
            _ => format!("http://{VIP}/"),
        }
    }

    fn start_setup(&mut self, setup: Setup, udp: bool) -> anyhow::Result<()> {
        ensure!(self.running.is_none(), "a setup is already running");
        let running = match setup {
            Setup::XdpLb => {
                let config = lb_config(&self.topology, udp);
                let mut lb = LoadBalancer::start(&self.topology.lb, &config)?;
                let backends = if udp { 4 } else { 2 };
                lb.wait_backends_up(backends, Duration::from_secs(10))?;
                Running::Xdp(lb)
            }
            Setup::HaproxyTcp | Setup::HaproxyHttp => {
                let (process, dir) = start_haproxy(&self.topology, setup == Setup::HaproxyHttp)?;
                Running::Haproxy { process, _dir: dir }
            }
            Setup::NftDnat => {
                nft_apply(self.topology.lb.name(), &nft_dnat(&self.topology))
                    .context("adding the DNAT rules in the lb namespace")?;
                Running::Nft
            }
            Setup::Direct => Running::Nothing,
        };
        self.running = Some(running);
        if !udp {
            self.check_http(setup)?;
        }
        Ok(())
    }

    /// One request through the setup must reach a backend, before any load.
    fn check_http(&self, setup: Setup) -> anyhow::Result<()> {
        let client = crate::Client::new(&self.topology.client);
        let body = client
            .get(&self.url(setup))
            .with_context(|| format!("a request through {}", setup.name()))?;
        ensure!(
            body.trim().starts_with("backend"),
            "{} answered {body:?}, not a backend's name",
            setup.name()
        );
        Ok(())
    }

    fn stop_setup(&mut self) -> anyhow::Result<()> {
        match self.running.take() {
            Some(Running::Xdp(lb)) => lb.shutdown(),
            Some(Running::Haproxy { mut process, .. }) => {
                process.terminate(Duration::from_secs(5))?;
                Ok(())
            }
            Some(Running::Nft) => nft_apply(
                self.topology.lb.name(),
                &format!("delete table ip {NFT_TABLE}\n"),
            ),
            Some(Running::Nothing) | None => Ok(()),
        }
    }

    fn http_runs(&mut self, setup: Setup, round: usize) -> anyhow::Result<Vec<HttpRun>> {
        let url = self.url(setup);
        if self.options.warmup_seconds > 0 {
            self.wrk(&url, Mode::KeepAlive, self.options.warmup_seconds)
                .context("warm-up")?;
        }
        let mut runs = Vec::new();
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            let sampler = CpuSampler::start(self)?;
            let started = Instant::now();
            let (output, wrk_cpu) = self.wrk(&url, mode, self.options.run_seconds)?;
            let seconds = started.elapsed().as_secs_f64();
            let mut cpu = sampler.finish(seconds)?;
            cpu.push(("wrk", wrk_cpu / seconds * 100.0));
            let parsed = WrkOutput::parse(&output)
                .with_context(|| format!("reading wrk's output:\n{output}"))?;
            ensure!(
                parsed.requests > 0,
                "wrk completed no request through {} ({})",
                setup.name(),
                mode.name()
            );
            let run = HttpRun {
                setup,
                mode,
                round,
                requests: parsed.requests,
                requests_per_second: parsed.requests_per_second,
                p50_ms: parsed.p50_ms,
                p99_ms: parsed.p99_ms,
                errors: parsed.errors,
                seconds,
                cpu,
            };
            println!(
                "bench e2e:   {:<27} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}  \
                 busiest: {} {:.0}%",
                mode.name(),
                run.requests_per_second,
                run.p50_ms,
                run.p99_ms,
                run.errors,
                run.busiest().0,
                run.busiest().1
            );
            runs.push(run);
        }
        Ok(runs)
    }

    /// Runs wrk in the client namespace, bounded by its duration, by [`REQUEST_LIMIT`] (a Lua
    /// script stops it) and by a watchdog; returns its output and its CPU seconds.
    fn wrk(&self, url: &str, mode: Mode, seconds: u32) -> anyhow::Result<(String, f64)> {
        let dir = TempDir::new(&format!("{}-wrk", unique_name()))?;
        let script = dir.path().join("bounded.lua");
        let close = if mode == Mode::NewConnection {
            "wrk.headers[\"Connection\"] = \"close\"\n"
        } else {
            ""
        };
        fs::write(
            &script,
            format!(
                "-- Stops each thread after {REQUEST_LIMIT} responses: a bound on the count.\n\
                 {close}local responses = 0\n\
                 function response(status, headers, body)\n  \
                   responses = responses + 1\n  \
                   if responses >= {REQUEST_LIMIT} then wrk.thread:stop() end\n\
                 end\n"
            ),
        )
        .context("writing wrk's script")?;
        let mut command = self.topology.client.command("wrk");
        command
            .args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{seconds}s")])
            .args(["--latency", "--timeout", "2s", "-s"])
            .arg(&script)
            .arg(url);
        let timeout = Duration::from_secs(u64::from(seconds) + 15);
        let (output, cpu) = run_with_usage(&mut command, &dir.path().join("wrk.out"), timeout)?;
        dir.remove()?;
        Ok((output, cpu))
    }

    fn udp_run(&mut self, setup: Setup, round: usize) -> anyhow::Result<UdpRun> {
        let before = self.delivered_udp()?;
        let drops_before = self.interface_drops()?;
        let softirq_before = ProcStat::read()?;
        let flood = udp_flood(
            self.topology.client.name(),
            self.options.udp_seconds,
            self.options.udp_packet_limit,
        )?;
        // Packets still in a queue arrive within moments.
        std::thread::sleep(Duration::from_millis(200));
        let softirq_after = ProcStat::read()?;
        let delivered = self.delivered_udp()? - before;
        let drop_sites: Vec<(String, u64)> = self
            .interface_drops()?
            .into_iter()
            .map(|(site, after)| {
                let before = drops_before.get(&site).copied().unwrap_or(0);
                (site, after.saturating_sub(before))
            })
            .filter(|(_, dropped)| *dropped > 0)
            .collect();
        let interface_drops = drop_sites.iter().map(|(_, dropped)| dropped).sum();
        ensure!(
            delivered > 0,
            "no UDP packet reached a backend through {}",
            setup.name()
        );
        let ticks = softirq_after.softirq - softirq_before.softirq;
        let run = UdpRun {
            setup,
            round,
            sent: flood.sent,
            delivered,
            seconds: flood.seconds,
            softirq_percent: ticks as f64 / clock_ticks() / flood.seconds * 100.0,
            interface_drops,
            drop_sites,
        };
        println!(
            "bench e2e:   sent {:.0} pps, delivered {:.0} pps, lost {} of {} (interfaces \
             dropped {}: {:?})",
            run.sent_pps(),
            run.delivered_pps(),
            run.lost(),
            run.sent,
            run.interface_drops,
            run.drop_sites
        );
        Ok(run)
    }

    /// Dropped packets of every interface in every namespace of the topology so far: rx and tx
    /// `dropped` of `ip -s link`, and the veth driver's own drop and error counters of
    /// `ethtool -S` (an XDP_REDIRECT into a veth whose peer's ring is full is counted there).
    fn interface_drops(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let topology = &self.topology;
        let namespaces = [("client", &topology.client), ("lb", &topology.lb)]
            .into_iter()
            .chain(
                topology
                    .backends
                    .iter()
                    .map(|backend| (backend.name.as_str(), &backend.netns)),
            );
        let mut sites = std::collections::BTreeMap::new();
        for (role, netns) in namespaces {
            let listing = netns.ip(["-s", "-j", "link", "show"])?;
            let links = parse_interface_drops(&listing)
                .with_context(|| format!("reading `ip -s -j link` in {}", netns.name()))?;
            for (name, dropped) in links.into_iter().filter(|(name, _)| name != "lo") {
                let driver = parse_ethtool_drops(&netns.exec(["ethtool", "-S", &name])?);
                sites.insert(format!("{role} {name}"), dropped + driver);
            }
        }
        Ok(sites)
    }

    /// UDP packets counted by the sink in all backend namespaces so far.
    fn delivered_udp(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for backend in &self.topology.backends {
            let listing = backend
                .netns
                .exec(["nft", "list", "table", "inet", NFT_TABLE])?;
            total += parse_nft_counter(&listing)
                .with_context(|| format!("no counter in the sink of {}", backend.name))?;
        }
        Ok(total)
    }

    /// Stops whatever runs and deletes the namespaces, reporting every error.
    fn teardown(mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if let Err(error) = self.stop_setup() {
            errors.push(format!("stopping the setup: {error:#}"));
        }
        for nginx in self.backends.drain(..) {
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

/// lb-user's configuration: the demo's web service, and for the packet-rate run a UDP service
/// on [`UDP_PORT`] over both backends (always up: nothing answers UDP there to probe).
fn lb_config(topology: &Topology, udp: bool) -> String {
    let mut config = crate::config_toml(&[topology.demo_service()]);
    if udp {
        config.push_str(&format!(
            "\n[[service]]\nname = \"flood\"\nvip = \"{VIP}\"\nport = {UDP_PORT}\n\
             protocol = \"udp\"\n\n[service.health_check]\nkind = \"none\"\n"
        ));
        for backend in &topology.backends {
            config.push_str(&format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                backend.address
            ));
        }
    }
    config
}

/// DNAT of the web and UDP services to both backends in turn (`numgen inc`); conntrack
/// translates the replies back.
fn nft_dnat(topology: &Topology) -> String {
    let targets = topology
        .backends
        .iter()
        .enumerate()
        .map(|(index, backend)| format!("{index} : {}", backend.address))
        .collect::<Vec<_>>()
        .join(", ");
    let count = topology.backends.len();
    format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {VIP} tcp dport 80 dnat to numgen inc mod {count} map {{ {targets} }}\n\
         \t\tip daddr {VIP} udp dport {UDP_PORT} dnat to numgen inc mod {count} map {{ {targets} }}\n\
         \t}}\n\
         }}\n"
    )
}

/// Applies an nftables script inside `netns` (only there: `ip netns exec`).
fn nft_apply(netns: &NetnsName, script: &str) -> anyhow::Result<()> {
    let dir = TempDir::new(&format!("{}-nft", unique_name()))?;
    let path = dir.path().join("rules.nft");
    fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    netns.exec([
        Path::new("nft").as_os_str(),
        "-f".as_ref(),
        path.as_os_str(),
    ])?;
    dir.remove()
}

/// Each interface's name and the sum of its rx and tx `dropped`, from `ip -s -j link show`.
fn parse_interface_drops(listing: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let links: Vec<serde_json::Value> = serde_json::from_str(listing)?;
    Ok(links
        .iter()
        .filter_map(|link| {
            let name = link["ifname"].as_str()?.to_string();
            let dropped = ["rx", "tx"]
                .iter()
                .filter_map(|way| link["stats64"][way]["dropped"].as_u64())
                .sum();
            Some((name, dropped))
        })
        .collect())
}

/// The sum of the `...drops` and `...errors` counters of an `ethtool -S` output.
fn parse_ethtool_drops(statistics: &str) -> u64 {
    statistics
        .lines()
        .filter_map(|line| line.trim().split_once(':'))
        .filter(|(name, _)| name.ends_with("drops") || name.ends_with("errors"))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

/// The packet count of the first `counter` in an `nft list` output.
fn parse_nft_counter(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(word) = words.next() {
        if word == "counter" && words.next() == Some("packets") {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Starts HAProxy in the lb namespace in the foreground, balancing port 80 of the VIP over the
/// backends, and waits until it listens.
fn start_haproxy(topology: &Topology, http: bool) -> anyhow::Result<(ChildProcess, TempDir)> {
    let dir = TempDir::new(&format!("{}-haproxy", unique_name()))?;
    let servers: String = topology
        .backends
        .iter()
        .map(|backend| format!("    server {} {}:80\n", backend.name, backend.address))
        .collect();
    let mode = if http { "http" } else { "tcp" };
    let config = format!(
        "# Written by the xdp-lb benchmark; the seed's setup: round robin over the backends.\n\
         global\n    nbthread 1\n    maxconn 4096\n\n\
         defaults\n    mode {mode}\n    timeout connect 2s\n    timeout client 30s\n    \
         timeout server 30s\n\n\
         frontend web\n    bind {VIP}:80\n    default_backend nginx\n\n\
         backend nginx\n    balance roundrobin\n{servers}"
    );
    let path = dir.path().join("haproxy.cfg");
    fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let log = fs::File::create(dir.path().join("haproxy.log")).context("creating its log")?;
    let mut command = topology.lb.command("haproxy");
    command
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log handle")?)
        .stderr(log);
    let mut process = ChildProcess::spawn(&format!("haproxy mode {mode}"), &mut command)?;
    let lb = topology.lb.name().clone();
    let filter = format!("src {VIP}:80");
    wait_until(Duration::from_secs(5), "haproxy to listen", || {
        if let Some(status) = process.try_status()? {
            bail!(
                "haproxy exited with {status}: {}",
                fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default()
            );
        }
        let sockets = lb.exec(["ss", "-H", "-l", "-t", "-n", &filter])?;
        if sockets.trim().is_empty() {
            return Ok(Poll::NotYet("no listening socket".to_string()));
        }
        Ok(Poll::Ready(()))
    })?;
    Ok((process, dir))
}

/// nginx for the benchmark: like the testbed's [`crate::Nginx`] (answers its name), but with
/// no access log and room for many connections, so that the backends cost what a tuned server
/// costs and the same in every setup.
struct BenchNginx {
    process: ChildProcess,
    dir: TempDir,
}

impl BenchNginx {
    fn start(netns: &NetnsName, name: &str, address: Ipv4Addr) -> anyhow::Result<Self> {
        let dir = TempDir::new(&format!("{}-nginx-{name}", unique_name()))?;
        let root = dir.path().display();
        let config = format!(
            "# Written by the xdp-lb benchmark; everything it writes stays in {root}.\n\
             daemon off;\nmaster_process on;\nworker_processes 1;\nuser nobody nogroup;\n\
             pid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n\
             events {{\n    worker_connections 8192;\n}}\n\
             http {{\n    access_log off;\n    keepalive_requests 1000000;\n\
             \x20   client_body_temp_path {root}/client_body;\n    proxy_temp_path {root}/proxy;\n\
             \x20   fastcgi_temp_path {root}/fastcgi;\n    uwsgi_temp_path {root}/uwsgi;\n\
             \x20   scgi_temp_path {root}/scgi;\n\
             \x20   server {{\n        listen {address}:80 backlog=4096;\n\
             \x20       location / {{\n            default_type text/plain;\n\
             \x20           return 200 \"{name}\\n\";\n        }}\n    }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let mut command = netns.command("/usr/sbin/nginx");
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut process = ChildProcess::spawn(&format!("nginx {name}"), &mut command)?;
        let filter = format!("src {address}:80");
        wait_until(
            Duration::from_secs(5),
            &format!("nginx {name} to listen"),
            || {
                if let Some(status) = process.try_status()? {
                    bail!("nginx exited with {status}");
                }
                let sockets = netns.exec(["ss", "-H", "-l", "-t", "-n", &filter])?;
                if sockets.trim().is_empty() {
                    return Ok(Poll::NotYet("no listening socket".to_string()));
                }
                Ok(Poll::Ready(()))
            },
        )?;
        Ok(Self { process, dir })
    }

    fn shutdown(mut self) -> anyhow::Result<()> {
        let status = self.process.terminate(Duration::from_secs(5))?;
        ensure!(status.success(), "nginx exited with {status} after SIGTERM");
        self.dir.remove()
    }
}

/// Runs `command` with its output in `output_path`, waits at most `timeout` (then kills it by
/// PID), and returns its output and the CPU seconds it used (from wait4's rusage).
fn run_with_usage(
    command: &mut Command,
    output_path: &Path,
    timeout: Duration,
) -> anyhow::Result<(String, f64)> {
    let line = command_line(command);
    let output = fs::File::create(output_path).context("creating the output file")?;
    let child = command
        .stdin(Stdio::null())
        .stdout(
            output
                .try_clone()
                .context("duplicating the output handle")?,
        )
        .stderr(output)
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // The child is reaped by wait4 below, for its rusage; std's handle is not waited on.
    drop(child);
    let deadline = Instant::now() + timeout;
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child by PID, with valid out-pointers.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            break (status, usage);
        }
        if reaped < 0 {
            return Err(std::io::Error::last_os_error()).context(format!("waiting for `{line}`"));
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; blocks until the killed child is reaped.
            unsafe { libc::wait4(pid, &mut status, 0, std::ptr::null_mut()) };
            bail!("`{line}` ran past {timeout:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fs::read_to_string(output_path).context("reading the output")?;
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "`{line}` failed (wait status {status}):\n{text}"
    );
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    Ok((text, seconds(usage.ru_utime) + seconds(usage.ru_stime)))
}

/// What wrk printed, the parts the report uses.
#[derive(Debug, PartialEq)]
struct WrkOutput {
    requests: u64,
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl WrkOutput {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut requests = None;
        let mut requests_per_second = None;
        let mut p50_ms = None;
        let mut p99_ms = None;
        let mut errors = 0;
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [count, "requests", "in", ..] => requests = count.parse().ok(),
                ["Requests/sec:", rate] => requests_per_second = rate.parse().ok(),
                ["50%", latency] => p50_ms = Some(parse_duration_ms(latency)?),
                ["99%", latency] => p99_ms = Some(parse_duration_ms(latency)?),
                ["Socket", "errors:", rest @ ..] => {
                    errors += rest
                        .iter()
                        .map(|word| word.trim_end_matches(','))
                        .filter_map(|word| word.parse::<u64>().ok())
                        .sum::<u64>();
                }
                ["Non-2xx", "or", "3xx", "responses:", count] => {
                    errors += count.parse::<u64>().unwrap_or(0);
                }
                _ => {}
            }
        }
        Ok(Self {
            requests: requests.context("no \"N requests in\" line")?,
            requests_per_second: requests_per_second.context("no Requests/sec line")?,
            p50_ms: p50_ms.context("no 50% latency line (--latency)")?,
            p99_ms: p99_ms.context("no 99% latency line (--latency)")?,
            errors,
        })
    }
}

/// `812.00us`, `1.23ms`, `2.00s` in milliseconds.
fn parse_duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("not a number: {text:?}"))?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        other => bail!("unknown unit {other:?} in {text:?}"),
    };
    Ok(number * factor)
}

/// The machine-wide CPU times of `/proc/stat`'s first line, in clock ticks.
#[derive(Clone, Copy, Debug)]
struct ProcStat {
    softirq: u64,
    busy: u64,
}

impl ProcStat {
    fn read() -> anyhow::Result<Self> {
        let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = text.lines().next().context("/proc/stat is empty")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        ensure!(fields.len() >= 7, "unexpected /proc/stat line {line:?}");
        // user nice system idle iowait irq softirq steal ...
        let idle = fields[3] + fields[4];
        Ok(Self {
            softirq: fields[6],
            busy: fields.iter().take(8).sum::<u64>() - idle,
        })
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in clock ticks; 0 once it is gone.
fn process_ticks(pid: u32) -> u64 {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime
    // are the 14th and 15th fields of the line, so the 12th and 13th after it.
    let Some(rest) = text.rfind(')').map(|end| &text[end + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize| -> u64 {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// CPU use over a run, by who used it.
struct CpuSampler {
    machine: ProcStat,
    processes: Vec<(&'static str, u32, u64)>,
}

impl CpuSampler {
    fn start(bench: &Bench) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        for backend in &bench.topology.backends {
            for pid in backend.netns.name().pids()? {
                processes.push(("nginx", pid, process_ticks(pid)));
            }
        }
        match &bench.running {
            Some(Running::Haproxy { process, .. }) => {
                processes.push(("haproxy", process.pid(), process_ticks(process.pid())));
            }
            Some(Running::Xdp(lb)) => {
                let pid = lb.spawned_pid();
                processes.push(("lb-user", pid, process_ticks(pid)));
            }
            _ => {}
        }
        Ok(Self {
            machine: ProcStat::read()?,
            processes,
        })
    }

    /// Percent of one core over `seconds`, per name.
    fn finish(self, seconds: f64) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let machine = ProcStat::read()?;
        let percent = |ticks: u64| ticks as f64 / clock_ticks() / seconds * 100.0;
        let mut cpu: Vec<(&'static str, f64)> = Vec::new();
        for (name, pid, before) in self.processes {
            if !pid_alive(pid) {
                continue;
            }
            let used = percent(process_ticks(pid).saturating_sub(before));
            match cpu.iter_mut().find(|(known, _)| *known == name) {
                Some((_, total)) => *total += used,
                None => cpu.push((name, used)),
            }
        }
        cpu.push(("softirq", percent(machine.softirq - self.machine.softirq)));
        cpu.push(("all", percent(machine.busy - self.machine.busy)));
        Ok(cpu)
    }
}

/// What a flood sent.
struct Flood {
    sent: u64,
    seconds: f64,
}

/// Sends [`UDP_PAYLOAD`]-byte datagrams from the client namespace to the VIP's
/// [`UDP_PORT`] over [`UDP_FLOWS`] source ports, from one thread per core, as fast as they can,
/// for `seconds` or `limit` packets in all, whichever comes first.
fn udp_flood(client: &NetnsName, seconds: f64, limit: u64) -> anyhow::Result<Flood> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut handles = Vec::new();
    for number in 0..threads {
        let namespace = fs::File::open(format!("/run/netns/{client}"))
            .with_context(|| format!("opening namespace {client}"))?;
        let flows = UDP_FLOWS / threads;
        let share = limit / threads as u64;
        let handle = std::thread::Builder::new()
            .name(format!("udp-flood-{number}"))
            .spawn(move || -> anyhow::Result<Flood> {
                // SAFETY: moves this thread only, which ends with the flood, into the namespace.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the client netns");
                }
                flood_from_here(seconds, share, flows.max(1))
            })
            .context("starting a flood thread")?;
        handles.push(handle);
    }
    let mut total = Flood {
        sent: 0,
        seconds: 0.0,
    };
    for handle in handles {
        let flood = match handle.join() {
            Ok(result) => result?,
            Err(_) => bail!("a UDP flood thread panicked"),
        };
        total.sent += flood.sent;
        total.seconds = total.seconds.max(flood.seconds);
    }
    Ok(total)
}

fn flood_from_here(seconds: f64, limit: u64, flows: usize) -> anyhow::Result<Flood> {
    const BATCH: usize = 64;
    let target = SocketAddrV4::new(VIP, UDP_PORT);
    let sockets = (0..flows)
        .map(|_| {
            let socket = UdpSocket::bind((crate::topology::CLIENT_ADDRESS, 0))?;
            socket.connect(target)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("opening the flood's sockets")?;
    let payload = [0x5au8; UDP_PAYLOAD];
    let mut iovecs = [libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    }; BATCH];
    // SAFETY: mmsghdr is plain data; every header then points at its own iovec.
    let mut messages: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (message, iovec) in messages.iter_mut().zip(iovecs.iter_mut()) {
        message.msg_hdr.msg_iov = iovec;
        message.msg_hdr.msg_iovlen = 1;
    }
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    let mut turn = 0;
    while sent < limit && started.elapsed() < deadline {
        let socket = &sockets[turn % sockets.len()];
        turn += 1;
        let batch = BATCH.min((limit - sent) as usize) as libc::c_uint;
        // SAFETY: the headers point at live iovecs over a live payload; the socket is open.
        let result = unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), batch, 0) };
        if result < 0 {
            let error = std::io::Error::last_os_error();
            // A full queue on the way (veth, qdisc) is part of what is measured, not a fault.
            if matches!(error.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                continue;
            }
            return Err(error).context("sendmmsg");
        }
        sent += result as u64;
    }
    Ok(Flood {
        sent,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "Running 10s test @ http://10.200.1.1/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21ms  300.00us   9.87ms   80.00%
    Req/Sec    26.50k     1.20k   28.00k    70.00%
  Latency Distribution
     50%    1.15ms
     75%    1.30ms
     90%    1.50ms
     99%    2.10ms
  263781 requests in 10.00s, 41.25MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 1
Requests/sec:  26378.10
Transfer/sec:      4.12MB
";

    #[test]
    fn reads_wrk_output() {
        let parsed = WrkOutput::parse(WRK_OUTPUT).expect("parses");
        assert_eq!(
            parsed,
            WrkOutput {
                requests: 263_781,
                requests_per_second: 26_378.1,
                p50_ms: 1.15,
                p99_ms: 2.1,
                errors: 6,
            }
        );
        assert_eq!(parse_duration_ms("812.00us").expect("us"), 0.812);
        assert_eq!(parse_duration_ms("2.00s").expect("s"), 2000.0);
    }

    #[test]
    fn adds_up_interface_drops() {
        let listing = r#"[{"ifname":"lo","stats64":{"rx":{"packets":4,"dropped":0},
            "tx":{"packets":4,"dropped":0}}},{"ifname":"lbb1","stats64":{"rx":{"dropped":2},
            "tx":{"dropped":40}}}]"#;
        assert_eq!(
            parse_interface_drops(listing).expect("parses"),
            vec![("lo".to_string(), 0), ("lbb1".to_string(), 42)]
        );
        let ethtool =
            "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_xdp_packets: 9\n     \
                       rx_queue_0_drops: 1\n     rx_queue_0_xdp_drops: 2\n     \
                       tx_queue_0_xdp_xmit_errors: 4\n";
        assert_eq!(parse_ethtool_drops(ethtool), 7);
    }

    #[test]
    fn reads_an_nft_counter() {
        let listing = "table inet xdplb_bench {\n\tchain sink {\n\t\ttype filter hook \
                       prerouting priority raw; policy accept;\n\t\tudp dport 9000 counter \
                       packets 1234 bytes 74040 drop\n\t}\n}\n";
        assert_eq!(parse_nft_counter(listing), Some(1234));
    }
}
