//! The kernel-level benchmark: what the real, verifier-loaded datapath costs per packet, run
//! by the kernel's `BPF_PROG_TEST_RUN` on crafted frames, beside a trivial XDP_TX program (the
//! floor) measured the same way.
//!
//! Two methods, both reported:
//!
//! - **loop**: one `BPF_PROG_TEST_RUN` with `repeat = 1` per packet, from userspace, summing
//!   the kernel's own timing of each run. Every run sees a fresh input frame, so a rewriting
//!   program never sees its own output; each figure carries the kernel timer's fixed overhead
//!   and a cache cooled by the system call in between, which the floor shows.
//! - **wrapper**: `repeat = N` under the restoring wrapper of [`crate::bench_wrapper`], which
//!   puts the original frame back before each iteration and tail-calls the program: the method
//!   of the Katran reference figures.
//!
//! Every case is checked before it is timed: its verdict and its output frame, byte for byte,
//! against an expected frame built independently (see [`crate::packet`]), under both methods;
//! and while it is timed, every run's verdict and, per batch, the datapath's own counters (a
//! "flow hit" case must really hit the flow table on every packet, a "new flow" case must
//! really miss). Trials are interleaved over the cases, so that machine noise spreads over
//! all of them instead of landing on one.

use std::borrow::Cow;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_user::dataplane::LoadOptions;

use crate::bench_wrapper::{delete_key, key_present, xdp_md, Variation, Wrapper, FIRST_HOST};
use crate::packet::*;

/// Katran's figures on this machine kind (IPIP mode, the restoring wrapper, kernel 6.18, JIT
/// on), from issue 3, in nanoseconds per packet.
pub mod katran {
    pub const NEW_TCP_FLOW: f64 = 250.0;
    pub const ESTABLISHED_TCP: f64 = 100.0;
    pub const UDP_FLOW_HIT: f64 = 135.0;
    pub const NOT_A_SERVICE: f64 = 38.0;
    pub const TRIVIAL_PROGRAM: f64 = 10.0;
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct KernelOptions {
    /// Interleaved trials per case (at least 5).
    pub trials: usize,
    /// Packets per trial with the loop method, each its own `BPF_PROG_TEST_RUN`.
    pub loop_packets: u32,
    /// `repeat` per trial under the wrapper.
    pub wrapper_repeat: u32,
    /// `repeat` per trial under the wrapper for the new-5-tuple case, whose every iteration
    /// takes one more entry of the flow table: at most `wrapper_repeat`, fewer to keep the
    /// table (sized for all of them, per CPU) within memory.
    pub new_flow_repeat: u32,
    /// Flows in the table for the flow-table sweep.
    pub flow_table_fills: &'static [u32],
    /// Capacity of the table that the "full flow table" point fills to the brim.
    pub full_table: u32,
}

impl KernelOptions {
    pub fn full() -> Self {
        Self {
            trials: 7,
            loop_packets: 20_000,
            wrapper_repeat: 200_000,
            new_flow_repeat: 50_000,
            flow_table_fills: &[1, 10_000, 1_000_000],
            // The default `flows.table_size`: the full table a balancer run with the defaults
            // reaches. A smaller one stays in the CPU's caches and flatters an eviction (65,536
            // entries: ~270 ns a new flow here, against ~490 at the default).
            full_table: lb_common::FLOW_TABLE_SIZE,
        }
    }

    /// Seconds instead of minutes: exercises every case, check and sweep (with a smaller
    /// largest table), for CI. Its numbers mean little.
    pub fn quick() -> Self {
        Self {
            trials: 5,
            loop_packets: 200,
            wrapper_repeat: 1_000,
            new_flow_repeat: 1_000,
            flow_table_fills: &[1, 1_000],
            full_table: 4_096,
        }
    }

    /// The new flows one fixture's trials start, all on the benchmark's one CPU: every
    /// iteration of the new-5-tuple case under both methods (the one-5-tuple case reuses one
    /// entry), and room to spare for the few flows the cases set up.
    fn new_flows_per_fixture(&self) -> u32 {
        self.trials as u32 * (self.new_flow_repeat.min(self.wrapper_repeat) + self.loop_packets)
            + 1_000
    }
}

/// The flow-table capacities the benchmark ran with.
#[derive(Clone, Copy, Debug)]
pub struct FlowTables {
    /// Possible CPUs. The flow table keeps an LRU list per CPU (`BPF_F_NO_COMMON_LRU`) and
    /// the kernel gives each possible CPU an equal share of the capacity: a table of N entries
    /// starts evicting on the benchmark's CPU at N / `cpus`.
    pub cpus: u32,
    /// The main cases' and the backend and service sweeps': room on the benchmark's CPU for
    /// every new flow their trials start.
    pub main: u32,
    /// The flow-table sweep's, the same at every fill level: room for the largest fill and
    /// every new flow the trials then start.
    pub sweep: u32,
    /// The full-table point's ([`KernelOptions::full_table`]), which evicts on purpose.
    pub full: u32,
}

impl FlowTables {
    fn for_options(options: &KernelOptions) -> anyhow::Result<Self> {
        let cpus = aya::util::nr_cpus().map_err(|(path, error)| {
            anyhow::anyhow!("counting the possible CPUs ({path}): {error}")
        })?;
        let cpus = u32::try_from(cpus).context("the number of possible CPUs")?;
        let room = |flows: u32| {
            flows
                .checked_mul(cpus)
                .context("a flow table with that much room per CPU does not fit in a u32")
        };
        let largest_fill = options.flow_table_fills.iter().copied().max().unwrap_or(0);
        Ok(Self {
            cpus,
            main: room(options.new_flows_per_fixture())?,
            sweep: room(largest_fill + options.new_flows_per_fixture())?,
            full: options.full_table,
        })
    }
}

/// Load options for an IPv4 flow table of `capacity` entries. The benchmark's traffic is
/// IPv4 and its services share no backend endpoint, so the reverse table and the IPv6 tables
/// stay at their default size: sized alike, they would need about four times the memory
/// (gigabytes on a machine with many CPUs, see [`FlowTables`]).
fn flow_table(capacity: u32) -> LoadOptions {
    LoadOptions {
        flow_table_size: capacity,
        other_flow_tables_size: Some(lb_common::FLOW_TABLE_SIZE),
        ..LoadOptions::default()
    }
}

/// Nanoseconds per packet over the trials.
#[derive(Clone, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Every trial's figure, in the order run.
    pub trials: Vec<f64>,
}

impl Spread {
    pub fn of(trials: Vec<f64>) -> Self {
        let mut sorted = trials.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.is_empty() {
            f64::NAN
        } else if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Self {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            trials,
        }
    }
}

/// One case's figures under both methods.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub name: &'static str,
    /// Katran's figure for the same case, where there is one.
    pub katran_ns: Option<f64>,
    pub looped: Spread,
    pub wrapped: Spread,
}

/// One point of a scale sweep.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    /// What varies: "flows in the table", "backends", "services".
    pub sweep: &'static str,
    pub size: u32,
    pub cases: Vec<CaseResult>,
}

/// Everything the kernel-level benchmark measured.
#[derive(Clone, Debug)]
pub struct KernelReport {
    pub options: KernelOptions,
    /// The trivial XDP_TX program, under both methods.
    pub floor: CaseResult,
    /// The five cases of issue 3, on the default configuration.
    pub cases: Vec<CaseResult>,
    pub sweeps: Vec<SweepPoint>,
    pub flow_tables: FlowTables,
    pub seconds: f64,
}

/// A SYN from a new source address and port on every iteration.
pub const NEW_TCP_FLOW: &str = "TCP SYN, new flow (a new 5-tuple each time)";
/// One SYN on every iteration, its flow-table entry deleted before each: Katran's method.
pub const NEW_TCP_FLOW_ONE_TUPLE: &str = "TCP SYN, new flow (one 5-tuple, Katran's method)";
pub const ESTABLISHED_TCP: &str = "TCP, established flow";
pub const BACKEND_REPLY: &str = "backend reply";
pub const UDP_FLOW_HIT: &str = "UDP, established flow";
pub const NOT_A_SERVICE: &str = "not for a service (pass)";
pub const NOT_A_SERVICE_V6: &str = "not for a service, IPv6 (pass)";
pub const FLOOR: &str = "floor (trivial XDP_TX)";

/// Runs the whole kernel-level benchmark, printing progress to stdout.
///
/// It runs on a thread of its own: a [`Fixture`] moves its thread into a network namespace and
/// pins it to one CPU, which must not leak into the caller (whose children would inherit it).
pub fn run(options: KernelOptions) -> anyhow::Result<KernelReport> {
    let thread = std::thread::Builder::new()
        .name("bench-kernel".to_string())
        .spawn(move || measure_all(options))
        .context("starting the benchmark thread")?;
    match thread.join() {
        Ok(result) => result,
        // The fixture reports what it could not set up by panicking, with the reason.
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            bail!("the kernel benchmark panicked: {reason}")
        }
    }
}

fn measure_all(options: KernelOptions) -> anyhow::Result<KernelReport> {
    let started = Instant::now();
    println!("bench kernel: the five cases and the floor on the default configuration");
    // Room for every new flow the trials make: the new-flow case measures an insert into a
    // table with room, not an eviction (the "full flow table" sweep measures that).
    let flow_tables = FlowTables::for_options(&options)?;
    let mut fixture = Fixture::with_config(CONFIG, &flow_table(flow_tables.main));
    plant_sentinel(&mut fixture)?;
    let mut cases = main_cases(&mut fixture)?;
    let mut measured = measure_cases(&mut fixture, &mut cases, &options)?;
    ensure_nothing_evicted(&fixture)?;
    let floor = measured.remove(0);

    let mut sweeps = Vec::new();
    for &fill in options.flow_table_fills {
        println!("bench kernel: flow table holding {fill} flows");
        sweeps.push(flow_table_point(fill, flow_tables.sweep, &options)?);
    }
    println!(
        "bench kernel: a full flow table of {} flows (each new flow evicts one)",
        options.full_table
    );
    sweeps.push(full_table_point(flow_tables.full, &options)?);
    for backends in [1, 16, 256] {
        println!("bench kernel: a service with {backends} backends");
        let table = flow_tables.main;
        sweeps.push(scale_point(
            "backends", backends, 1, backends, table, &options,
        )?);
    }
    for services in [1, 1000] {
        println!("bench kernel: {services} services");
        let table = flow_tables.main;
        sweeps.push(scale_point(
            "services", services, services, 1, table, &options,
        )?);
    }
    Ok(KernelReport {
        options,
        floor,
        cases: measured,
        sweeps,
        flow_tables,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Which program a case runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Balancer,
    Floor,
}

/// Where a case's frames come from.
enum Frames {
    /// The same frame every time.
    Same(Vec<u8>),
    /// SYNs from a new source address and port each time: a new flow per packet.
    NewFlows { next: u32 },
    /// Round and round these frames (established flows spread over a large table).
    Cycle { frames: Vec<Vec<u8>>, next: usize },
}

impl Frames {
    fn next(&mut self) -> Cow<'_, [u8]> {
        match self {
            Frames::Same(frame) => Cow::Borrowed(frame),
            Frames::NewFlows { next } => {
                *next += 1;
                Cow::Owned(new_flow_syn(*next - 1))
            }
            Frames::Cycle { frames, next } => {
                *next = (*next + 1) % frames.len();
                Cow::Borrowed(&frames[*next])
            }
        }
    }

    /// The frame the wrapper restores: the first of the case's frames.
    fn template(&self) -> Vec<u8> {
        match self {
            Frames::Same(frame) => frame.clone(),
            // The wrapper rewrites the source's last byte (to FIRST_HOST and up) and port from
            // its own counter, so the template itself is never one of the timed flows.
            Frames::NewFlows { .. } => Tcp {
                src: [10, 200, 1, FIRST_HOST as u8 - 1],
                ..Tcp::from_client(80, 1)
            }
            .frame(),
            Frames::Cycle { frames, .. } => frames[0].clone(),
        }
    }
}

/// One case: its frames, where they arrive, and what must come out.
struct Case {
    name: &'static str,
    katran_ns: Option<f64>,
    target: Target,
    ifindex: u32,
    frames: Frames,
    verdict: u32,
    /// The output expected for the template frame; for new flows, any of these backends'
    /// translations (the scheduler picks one).
    expected: Vec<Vec<u8>>,
    /// Counters that must each grow by exactly one per packet.
    counters: Vec<usize>,
    /// Counters that must not move.
    unmoved: Vec<usize>,
    /// A flow-table entry deleted before every run, so that the same SYN starts a new flow
    /// each time.
    forget: Option<Forget>,
    wrapper: Option<Wrapper>,
}

/// The source port of the one 5-tuple that [`one_tuple_case`] starts again and again.
const ONE_TUPLE_PORT: u16 = 40_003;

/// Katran's method for its new-flow figure: the wrapper restores one SYN, so every iteration
/// is the same 5-tuple; here its entry is deleted before each run, so that each one really
/// starts a flow (Katran's SYN path overwrites its entry instead). `expected` gives the
/// translations the SYN may come out as.
fn one_tuple_case(
    fixture: &Fixture,
    expected: impl Fn(&[u8]) -> Vec<Vec<u8>>,
) -> anyhow::Result<Case> {
    let syn = Tcp::from_client(80, ONE_TUPLE_PORT).frame();
    Ok(Case {
        name: NEW_TCP_FLOW_ONE_TUPLE,
        katran_ns: Some(katran::NEW_TCP_FLOW),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: expected(&syn),
        frames: Frames::Same(syn),
        verdict: XDP_REDIRECT,
        counters: vec![new_flow_counter()?, counter_index(&["forward_redirect"])?],
        unmoved: vec![counter_index(&["flow_hit"])?],
        forget: Some(Forget::tcp(fixture, CLIENT, ONE_TUPLE_PORT)?),
        wrapper: None,
    })
}

/// The flow table and the key of the entry a case deletes before every run.
struct Forget {
    flows: OwnedFd,
    key: Vec<u8>,
}

impl Forget {
    /// The IPv4 flow table's entry for a TCP flow from `client:port` to the web service.
    fn tcp(fixture: &Fixture, client: [u8; 4], port: u16) -> anyhow::Result<Self> {
        let flows = fixture
            .dataplane
            .flows_fd()
            .try_clone_to_owned()
            .context("duplicating the FLOWS descriptor")?;
        Ok(Self {
            flows,
            key: web_flow_key(client, port),
        })
    }

    fn delete(&self) -> anyhow::Result<()> {
        delete_key(self.flows.as_fd(), &self.key)
    }
}

/// The IPv4 flow table's key, as bytes, for a TCP flow from `client:port` to the web service.
fn web_flow_key(client: [u8; 4], port: u16) -> Vec<u8> {
    let key = lb_common::FlowKey {
        src_addr: client,
        dst_addr: VIP,
        src_port: port.to_be_bytes(),
        dst_port: 80u16.to_be_bytes(),
        protocol: lb_common::protocol::TCP,
        _pad: [0; 3],
    };
    // SAFETY: FlowKey is repr(C) plain bytes with explicit padding.
    unsafe {
        std::slice::from_raw_parts(
            (&key as *const lb_common::FlowKey).cast::<u8>(),
            std::mem::size_of::<lb_common::FlowKey>(),
        )
    }
    .to_vec()
}

/// The source of the first flow a table that must evict nothing receives: no case sends from
/// it again, so it is the least recently used entry, the first an LRU table would evict.
const SENTINEL: ([u8; 4], u16) = ([10, 200, 1, 90], 1);

/// Starts the sentinel flow; call it before any other flow enters the fixture's table.
fn plant_sentinel(fixture: &mut Fixture) -> anyhow::Result<()> {
    establish(fixture, SENTINEL.0, SENTINEL.1)?;
    Ok(())
}

/// Fails if the fixture's flow table evicted anything since [`plant_sentinel`]: figures said
/// to be for a table with room must not include evictions.
fn ensure_nothing_evicted(fixture: &Fixture) -> anyhow::Result<()> {
    let present = key_present(
        fixture.dataplane.flows_fd(),
        &web_flow_key(SENTINEL.0, SENTINEL.1),
        std::mem::size_of::<lb_common::Flow>(),
    )?;
    ensure!(
        present,
        "the flow table evicted its oldest flow during the trials: it had no room for every \
         flow they started"
    );
    Ok(())
}

/// The SYN of the `index`th new flow of the loop method, from 10.200.1.100 upwards: the
/// client's subnet, routed through the interface the SYN arrives on, as the datapath's
/// reverse-path check on new flows requires.
fn new_flow_syn(index: u32) -> Vec<u8> {
    let (address, port) = new_flow_source(index);
    Tcp {
        src: address,
        ..Tcp::from_client(80, port)
    }
    .frame()
}

fn new_flow_source(index: u32) -> ([u8; 4], u16) {
    const PORTS: u32 = 60_000;
    let host = LOOP_FIRST_HOST + index / PORTS;
    debug_assert!(
        host < FIRST_HOST as u32,
        "the loop's sources ran into the wrapper's"
    );
    ([10, 200, 1, host as u8], 1024 + (index % PORTS) as u16)
}

/// The loop method's new-flow sources start at 10.200.1.100.
const LOOP_FIRST_HOST: u32 = 100;
/// Where the sweeps' timed new flows start: past any source a fill of the flow table used
/// (10.200.1.140 and up).
const SWEEP_NEW_FLOWS: u32 = 40 * 60_000;

/// A data packet (ACK with a payload) of the flow from `address:port` to the web service.
fn data_packet(address: [u8; 4], port: u16) -> Vec<u8> {
    Tcp {
        src: address,
        syn: false,
        payload: b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ..Tcp::from_client(80, port)
    }
    .frame()
}

/// A counter's index by the name `lb-user stats` shows; the first of `names` that exists.
fn counter_index(names: &[&str]) -> anyhow::Result<usize> {
    names
        .iter()
        .find_map(|name| {
            lb_common::counter::NAMES
                .iter()
                .position(|known| known == name)
        })
        .with_context(|| format!("the datapath has no counter named any of {names:?}"))
}

fn new_flow_counter() -> anyhow::Result<usize> {
    // Called `flow_miss` before flows had states.
    counter_index(&["flow_miss_new", "flow_miss"])
}

/// The backend MAC address the fixture's neighbour table has for `address`.
fn backend_mac(address: &[u8]) -> anyhow::Result<[u8; 6]> {
    match address {
        a if a == BACKEND_A => Ok(BACKEND_A_MAC),
        a if a == BACKEND_B => Ok(BACKEND_B_MAC),
        other => bail!("a flow went to {other:?}, which is not a fixture backend"),
    }
}

/// Runs `frame` once (repeat = 1) and returns the verdict and the output frame.
fn run_once(program: &mut Xdp, frame: &[u8], ifindex: u32) -> anyhow::Result<(u32, Vec<u8>, u128)> {
    let context = xdp_md(frame.len(), ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&context),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration.as_nanos()))
}

fn program(fixture: &mut Fixture, target: Target) -> anyhow::Result<&mut Xdp> {
    Ok(match target {
        Target::Balancer => fixture.dataplane.program()?,
        Target::Floor => fixture.dataplane.floor_program()?,
    })
}

/// Sets up a flow from `address:port` with a SYN and returns the backend address and port it
/// was sent to.
fn establish(fixture: &mut Fixture, address: [u8; 4], port: u16) -> anyhow::Result<([u8; 4], u16)> {
    let syn = Tcp {
        src: address,
        ..Tcp::from_client(80, port)
    }
    .frame();
    let ifindex = fixture.pub_ifindex;
    let (verdict, out, _) = run_once(fixture.dataplane.program()?, &syn, ifindex)?;
    ensure!(
        verdict == XDP_REDIRECT,
        "the SYN that sets up a flow got verdict {verdict}, not XDP_REDIRECT"
    );
    let backend: [u8; 4] = out[30..34].try_into().expect("4 bytes");
    Ok((backend, u16::from_be_bytes([out[36], out[37]])))
}

/// The five cases of issue 3 and the floor, on the fixture's default configuration (web: TCP
/// 80 over two backends; dns: UDP 53).
fn main_cases(fixture: &mut Fixture) -> anyhow::Result<Vec<Case>> {
    let forward_redirect = counter_index(&["forward_redirect"])?;
    let flow_hit = counter_index(&["flow_hit"])?;
    let new_flows = new_flow_counter()?;

    // The operator's SSH to the host's own address, which is also the VIP: the pass case.
    let ssh = Tcp {
        syn: false,
        payload: b"SSH-2.0-OpenSSH_9.2",
        ..Tcp::from_client(22, 50_000)
    }
    .frame();
    // The floor runs on the pass case's frame, so that the wrapper copies as many bytes for
    // both and their ratio compares the programs alone.
    let floor_frame = ssh.clone();
    let floor = Case {
        name: FLOOR,
        katran_ns: Some(katran::TRIVIAL_PROGRAM),
        target: Target::Floor,
        ifindex: fixture.pub_ifindex,
        expected: vec![floor_frame.clone()],
        frames: Frames::Same(floor_frame),
        verdict: XDP_TX,
        counters: Vec::new(),
        unmoved: Vec::new(),
        forget: None,
        wrapper: None,
    };

    let new_flow_template = Frames::NewFlows { next: 0 }.template();
    // Not comparable with Katran's figure, which repeated one 5-tuple: see the report.
    let new_flow = Case {
        name: NEW_TCP_FLOW,
        katran_ns: None,
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: [(BACKEND_A, BACKEND_A_MAC), (BACKEND_B, BACKEND_B_MAC)]
            .iter()
            .map(|&(backend, mac)| {
                expected_forward(&new_flow_template, BACK_MAC, mac, backend, 8080)
            })
            .collect(),
        frames: Frames::NewFlows { next: 0 },
        verdict: XDP_REDIRECT,
        counters: vec![new_flows, forward_redirect],
        unmoved: vec![flow_hit],
        forget: None,
        wrapper: None,
    };

    let one_tuple = one_tuple_case(fixture, |syn| {
        [(BACKEND_A, BACKEND_A_MAC), (BACKEND_B, BACKEND_B_MAC)]
            .iter()
            .map(|&(backend, mac)| expected_forward(syn, BACK_MAC, mac, backend, 8080))
            .collect()
    })?;

    let (backend, backend_port) = establish(fixture, CLIENT, 40_001)?;
    let data = data_packet(CLIENT, 40_001);
    let established = Case {
        name: ESTABLISHED_TCP,
        katran_ns: Some(katran::ESTABLISHED_TCP),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![expected_forward(
            &data,
            BACK_MAC,
            backend_mac(&backend)?,
            backend,
            backend_port,
        )],
        frames: Frames::Same(data),
        verdict: XDP_REDIRECT,
        counters: vec![flow_hit, forward_redirect],
        unmoved: vec![new_flows],
        forget: None,
        wrapper: None,
    };

    let (backend, backend_port) = establish(fixture, CLIENT, 40_002)?;
    let reply = Tcp {
        src_mac: backend_mac(&backend)?,
        dst_mac: BACK_MAC,
        src: backend,
        dst: CLIENT,
        src_port: backend_port,
        dst_port: 40_002,
        syn: false,
        payload: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nbackend A",
    }
    .frame();
    let mut expected_reply = reply.clone();
    expected_reply[0..6].copy_from_slice(&CLIENT_MAC);
    expected_reply[6..12].copy_from_slice(&PUB_MAC);
    expected_reply[26..30].copy_from_slice(&VIP);
    expected_reply[34..36].copy_from_slice(&80u16.to_be_bytes());
    let reply_case = Case {
        name: BACKEND_REPLY,
        katran_ns: None,
        target: Target::Balancer,
        ifindex: fixture.back_ifindex,
        expected: vec![with_fresh_checksums(expected_reply)],
        frames: Frames::Same(reply),
        verdict: XDP_REDIRECT,
        counters: vec![counter_index(&["reply_redirect"])?],
        unmoved: vec![new_flows],
        forget: None,
        wrapper: None,
    };

    let udp = udp_frame(53, 41_000, false);
    let (verdict, _, _) = run_once(fixture.dataplane.program()?, &udp, fixture.pub_ifindex)?;
    ensure!(
        verdict == XDP_REDIRECT,
        "the first UDP packet got verdict {verdict}"
    );
    let udp_case = Case {
        name: UDP_FLOW_HIT,
        katran_ns: Some(katran::UDP_FLOW_HIT),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![expected_forward(
            &udp,
            BACK_MAC,
            BACKEND_A_MAC,
            BACKEND_A,
            5353,
        )],
        frames: Frames::Same(udp),
        verdict: XDP_REDIRECT,
        counters: vec![flow_hit, forward_redirect],
        unmoved: vec![new_flows],
        forget: None,
        wrapper: None,
    };

    let pass = Case {
        name: NOT_A_SERVICE,
        katran_ns: Some(katran::NOT_A_SERVICE),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![ssh.clone()],
        frames: Frames::Same(ssh),
        verdict: XDP_PASS,
        counters: vec![counter_index(&["pass_not_service"])?],
        unmoved: vec![forward_redirect],
        forget: None,
        wrapper: None,
    };

    // The same over IPv6, from the client's IPv6 address to the VIP's.
    let ssh6 = tcp6_ack_frame(CLIENT6, VIP6, 50_000, 22, b"SSH-2.0-OpenSSH_9.2");
    let pass6 = Case {
        name: NOT_A_SERVICE_V6,
        katran_ns: None,
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![ssh6.clone()],
        frames: Frames::Same(ssh6),
        verdict: XDP_PASS,
        counters: vec![counter_index(&["pass_not_service"])?],
        unmoved: vec![forward_redirect],
        forget: None,
        wrapper: None,
    };

    Ok(vec![
        floor,
        new_flow,
        one_tuple,
        established,
        reply_case,
        udp_case,
        pass,
        pass6,
    ])
}

/// Checks every case under both methods, then times them in interleaved trials.
fn measure_cases(
    fixture: &mut Fixture,
    cases: &mut [Case],
    options: &KernelOptions,
) -> anyhow::Result<Vec<CaseResult>> {
    for case in cases.iter_mut() {
        verify(fixture, case).with_context(|| format!("checking case \"{}\"", case.name))?;
    }
    let mut looped = vec![Vec::new(); cases.len()];
    let mut wrapped = vec![Vec::new(); cases.len()];
    for trial in 0..options.trials {
        // Rotate the order too, so that no case always runs right after the same one.
        for offset in 0..cases.len() {
            let index = (trial + offset) % cases.len();
            let case = &mut cases[index];
            let name = case.name;
            let what = |method| format!("timing case \"{name}\" ({method}), trial {}", trial + 1);
            looped[index].push(
                time_loop(fixture, case, options.loop_packets).with_context(|| what("loop"))?,
            );
            let repeat = if matches!(case.frames, Frames::NewFlows { .. }) {
                options.new_flow_repeat.min(options.wrapper_repeat)
            } else {
                options.wrapper_repeat
            };
            wrapped[index]
                .push(time_wrapper(fixture, case, repeat).with_context(|| what("wrapper"))?);
        }
    }
    Ok(cases
        .iter()
        .zip(looped.into_iter().zip(wrapped))
        .map(|(case, (looped, wrapped))| CaseResult {
            name: case.name,
            katran_ns: case.katran_ns,
            looped: Spread::of(looped),
            wrapped: Spread::of(wrapped),
        })
        .collect())
}

/// The verdict and output of the case's template frame, once with repeat = 1 and once under
/// the wrapper; sets up the case's wrapper.
fn verify(fixture: &mut Fixture, case: &mut Case) -> anyhow::Result<()> {
    let template = case.frames.template();
    if let Some(forget) = &case.forget {
        forget.delete()?;
    }
    let (verdict, out, _) = run_once(program(fixture, case.target)?, &template, case.ifindex)?;
    ensure!(
        verdict == case.verdict,
        "verdict {verdict}, expected {}",
        case.verdict
    );
    let matches = |out: &[u8]| {
        case.expected
            .iter()
            .any(|expected| frames_equal(out, expected))
    };
    ensure!(
        matches(&out),
        "output frame {out:02x?} is none of the expected {:02x?}",
        case.expected
    );

    let new_flows = matches!(case.frames, Frames::NewFlows { .. });
    let target = program(fixture, case.target)?;
    let variation = match &case.forget {
        Some(forget) => Variation::ForgetFlow {
            flows: forget.flows.as_fd(),
            key: forget.key.clone(),
        },
        None if new_flows => Variation::NewSource,
        None => Variation::None,
    };
    let wrapper = Wrapper::new(target.fd()?.as_fd(), &template, variation)?;
    let (verdict, out, _) = wrapper.run(case.ifindex, 1)?;
    ensure!(
        verdict == case.verdict,
        "under the wrapper: verdict {verdict}, expected {}",
        case.verdict
    );
    // A new flow's source differs from the template's (the wrapper's counter); the rest of
    // the frame must be the translation, so compare it with the source put back.
    let out = if new_flows {
        restore_source(&out, &template)
    } else {
        out
    };
    ensure!(
        matches(&out),
        "under the wrapper: output frame {out:02x?} is none of the expected {:02x?}",
        case.expected
    );
    case.wrapper = Some(wrapper);
    Ok(())
}

/// `out` with the template's source address and port, and checksums recomputed: what the
/// output would be had the wrapper not varied the source.
fn restore_source(out: &[u8], template: &[u8]) -> Vec<u8> {
    let mut frame = out.to_vec();
    frame[26..30].copy_from_slice(&template[26..30]);
    frame[34..36].copy_from_slice(&template[34..36]);
    with_fresh_checksums(frame)
}

/// Whether two Ethernet + IPv4 + TCP/UDP frames are equal byte for byte, except that a TCP
/// checksum may be 0x0000 where the other has 0xffff (the same ones'-complement value): the
/// non-panicking twin of [`assert_frames_equal`].
fn frames_equal(actual: &[u8], expected: &[u8]) -> bool {
    if actual == expected {
        return true;
    }
    if actual.len() != expected.len() || expected.len() < 14 + 20 || expected[23] != 6 {
        return false;
    }
    let check = 14 + usize::from(expected[14] & 0x0f) * 4 + 16;
    let zero = |bytes: &[u8]| bytes == [0, 0] || bytes == [0xff, 0xff];
    actual.len() > check + 1
        && actual[..check] == expected[..check]
        && actual[check + 2..] == expected[check + 2..]
        && zero(&actual[check..check + 2])
        && zero(&expected[check..check + 2])
}

fn counters(fixture: &Fixture) -> anyhow::Result<Vec<u64>> {
    use lb_user::dataplane::Dataplane;
    Ok(fixture.dataplane.counters()?)
}

/// Checks the datapath's counters over a batch of `packets`.
fn check_counters(case: &Case, before: &[u64], after: &[u64], packets: u64) -> anyhow::Result<()> {
    for &index in &case.counters {
        let grew = after[index] - before[index];
        ensure!(
            grew == packets,
            "counter {} grew by {grew} over {packets} packets, not once per packet",
            lb_common::counter::NAMES[index]
        );
    }
    for &index in &case.unmoved {
        let grew = after[index] - before[index];
        ensure!(
            grew == 0,
            "counter {} grew by {grew} over {packets} packets; this case must not move it",
            lb_common::counter::NAMES[index]
        );
    }
    Ok(())
}

/// One trial with the loop method: mean kernel time per run, in nanoseconds.
fn time_loop(fixture: &mut Fixture, case: &mut Case, packets: u32) -> anyhow::Result<f64> {
    let before = counters(fixture)?;
    let program = program(fixture, case.target)?;
    let mut total_ns = 0u128;
    for _ in 0..packets {
        if let Some(forget) = &case.forget {
            forget.delete()?;
        }
        let frame = case.frames.next();
        let (verdict, _, duration) = run_once(program, &frame, case.ifindex)?;
        ensure!(
            verdict == case.verdict,
            "verdict {verdict}, expected {}",
            case.verdict
        );
        total_ns += duration;
    }
    check_counters(case, &before, &counters(fixture)?, u64::from(packets))?;
    Ok(total_ns as f64 / f64::from(packets))
}

/// One trial under the wrapper: the kernel's mean time per iteration, in nanoseconds.
fn time_wrapper(fixture: &mut Fixture, case: &mut Case, repeat: u32) -> anyhow::Result<f64> {
    let before = counters(fixture)?;
    let wrapper = case.wrapper.as_ref().context("the case was not verified")?;
    let (verdict, _, nanoseconds) = wrapper.run(case.ifindex, repeat)?;
    ensure!(
        verdict == case.verdict,
        "verdict {verdict} of the last iteration, expected {}",
        case.verdict
    );
    check_counters(case, &before, &counters(fixture)?, u64::from(repeat))?;
    Ok(nanoseconds)
}

/// The web service on the VIP's port 80 with `backends` backends, and `services - 1` more
/// services on ports 1000 and up; every backend is backend A, the web service's on ports 8080
/// and up, each other service's on a port of its own from 20000 up. No two services share a
/// backend endpoint: a shared one makes every new flow write a reverse entry too (see
/// `insert_reverse` in lb-ebpf), which would measure that, not the number of services.
fn scale_config(services: u32, backends: u32) -> String {
    let mut config = String::new();
    for service in 0..services {
        let port = if service == 0 { 80 } else { 999 + service };
        config.push_str(&format!(
            "[[service]]\nname = \"s{service}\"\nvip = \"10.200.1.1\"\nport = {port}\n\
             [service.health_check]\nkind = \"none\"\n"
        ));
        let ports = if service == 0 {
            8080..8080 + backends
        } else {
            20000 + service..20001 + service
        };
        for backend_port in ports {
            config.push_str(&format!(
                "[[service.backend]]\naddress = \"10.200.2.10\"\nport = {backend_port}\n"
            ));
        }
    }
    config
}

/// New flow, established flow and pass on a configuration of `services` services, the
/// measured one with `backends` backends, and a flow table of `capacity` entries (room for
/// every new flow the trials make, as in the main cases).
fn scale_point(
    sweep: &'static str,
    size: u32,
    services: u32,
    backends: u32,
    capacity: u32,
    options: &KernelOptions,
) -> anyhow::Result<SweepPoint> {
    let load = flow_table(capacity);
    let mut fixture = Fixture::with_config(&scale_config(services, backends), &load);
    plant_sentinel(&mut fixture)?;
    let mut cases = scale_cases(&mut fixture, None)?;
    let cases = measure_cases(&mut fixture, &mut cases, options)?;
    ensure_nothing_evicted(&fixture)?;
    Ok(SweepPoint { sweep, size, cases })
}

/// A flow table of `capacity` entries holding `fill` flows: new flow, and established flows
/// spread over the whole table (the loop visits up to 4096 of them in turn; the wrapper
/// repeats one).
fn flow_table_point(
    fill: u32,
    capacity: u32,
    options: &KernelOptions,
) -> anyhow::Result<SweepPoint> {
    let load = flow_table(capacity);
    let mut fixture = Fixture::with_config(&scale_config(1, 1), &load);
    plant_sentinel(&mut fixture)?;
    fill_flow_table(&mut fixture, fill)?;
    let visited = fill.min(4096);
    let step = (fill / visited).max(1);
    let spread = (0..visited)
        .map(|n| {
            let (address, port) = new_flow_source(n * step);
            data_packet(address, port)
        })
        .collect();
    let mut cases = scale_cases(&mut fixture, Some(spread))?;
    // The pass path never looks at the flow table.
    cases.retain(|case| case.name != NOT_A_SERVICE);
    let cases = measure_cases(&mut fixture, &mut cases, options)?;
    ensure_nothing_evicted(&fixture)?;
    Ok(SweepPoint {
        sweep: "flows in the table",
        size: fill,
        cases,
    })
}

/// A flow table filled to its capacity: every new flow evicts the least recently used entry,
/// the steady state of a busy balancer. Only new flows are timed here (an established flow's
/// entry could be the one evicted).
fn full_table_point(capacity: u32, options: &KernelOptions) -> anyhow::Result<SweepPoint> {
    let load = flow_table(capacity);
    let mut fixture = Fixture::with_config(&scale_config(1, 1), &load);
    fill_flow_table(&mut fixture, capacity)?;
    let mut cases = scale_cases(&mut fixture, None)?;
    cases.retain(|case| case.name == NEW_TCP_FLOW);
    Ok(SweepPoint {
        sweep: "full flow table (evicting)",
        size: capacity,
        cases: measure_cases(&mut fixture, &mut cases, options)?,
    })
}

/// Sends `count` SYNs of new flows (the loop method's first sources) and checks that each
/// made a new flow.
fn fill_flow_table(fixture: &mut Fixture, count: u32) -> anyhow::Result<()> {
    let new_flows = new_flow_counter()?;
    let before = counters(fixture)?;
    let started = Instant::now();
    let ifindex = fixture.pub_ifindex;
    let program = fixture.dataplane.program()?;
    for index in 0..count {
        let (verdict, _, _) = run_once(program, &new_flow_syn(index), ifindex)?;
        ensure!(verdict == XDP_REDIRECT, "filling: verdict {verdict}");
    }
    let added = counters(fixture)?[new_flows] - before[new_flows];
    ensure!(
        added == u64::from(count),
        "filling the flow table with {count} SYNs made {added} new flows"
    );
    println!(
        "bench kernel:   filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The sweep cases on a configuration whose measured service (port 80) goes to backend A
/// only: new flow (new 5-tuples, and one 5-tuple as Katran measured), established flow (one,
/// or `spread` over many), pass.
fn scale_cases(fixture: &mut Fixture, spread: Option<Vec<Vec<u8>>>) -> anyhow::Result<Vec<Case>> {
    let forward_redirect = counter_index(&["forward_redirect"])?;
    let flow_hit = counter_index(&["flow_hit"])?;
    let new_flows = new_flow_counter()?;
    let template = Frames::NewFlows { next: 0 }.template();
    let expected_new = (8080..8080 + 256)
        .map(|port| expected_forward(&template, BACK_MAC, BACKEND_A_MAC, BACKEND_A, port))
        .collect();
    // New flows past any source the fill used.
    let new_flow = Case {
        name: NEW_TCP_FLOW,
        katran_ns: None,
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: expected_new,
        frames: Frames::NewFlows {
            next: SWEEP_NEW_FLOWS,
        },
        verdict: XDP_REDIRECT,
        counters: vec![new_flows, forward_redirect],
        unmoved: vec![flow_hit],
        forget: None,
        wrapper: None,
    };
    let frames = match spread {
        Some(frames) => frames,
        None => {
            establish(fixture, CLIENT, 40_001)?;
            vec![data_packet(CLIENT, 40_001)]
        }
    };
    let (verdict, first, _) = run_once(
        fixture.dataplane.program()?,
        &frames[0],
        fixture.pub_ifindex,
    )?;
    ensure!(
        verdict == XDP_REDIRECT,
        "an established flow's packet got verdict {verdict}"
    );
    let port = u16::from_be_bytes([first[36], first[37]]);
    let established = Case {
        name: ESTABLISHED_TCP,
        katran_ns: Some(katran::ESTABLISHED_TCP),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![expected_forward(
            &frames[0],
            BACK_MAC,
            BACKEND_A_MAC,
            BACKEND_A,
            port,
        )],
        frames: Frames::Cycle { frames, next: 0 },
        verdict: XDP_REDIRECT,
        counters: vec![flow_hit, forward_redirect],
        unmoved: vec![new_flows],
        forget: None,
        wrapper: None,
    };
    let one_tuple = one_tuple_case(fixture, |syn| {
        (8080..8080 + 256)
            .map(|port| expected_forward(syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, port))
            .collect()
    })?;
    let ssh = Tcp::from_client(22, 50_000).frame();
    let pass = Case {
        name: NOT_A_SERVICE,
        katran_ns: Some(katran::NOT_A_SERVICE),
        target: Target::Balancer,
        ifindex: fixture.pub_ifindex,
        expected: vec![ssh.clone()],
        frames: Frames::Same(ssh),
        verdict: XDP_PASS,
        counters: vec![counter_index(&["pass_not_service"])?],
        unmoved: vec![forward_redirect],
        forget: None,
        wrapper: None,
    };
    Ok(vec![new_flow, one_tuple, established, pass])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_and_the_ends() {
        let spread = Spread::of(vec![5.0, 1.0, 3.0, 9.0, 2.0]);
        assert_eq!((spread.median, spread.min, spread.max), (3.0, 1.0, 9.0));
        assert_eq!(Spread::of(vec![1.0, 2.0, 3.0, 4.0]).median, 2.5);
    }

    #[test]
    fn new_flow_sources_never_repeat_and_stay_in_the_test_range() {
        let mut seen = std::collections::HashSet::new();
        for index in (0..SWEEP_NEW_FLOWS + 1_000_000).step_by(997) {
            let (address, port) = new_flow_source(index);
            assert_eq!(&address[..3], &[10, 200, 1]);
            assert!((100..FIRST_HOST as u8).contains(&address[3]));
            assert!(seen.insert((address, port)));
        }
    }

    #[test]
    fn the_scale_config_is_valid_and_shares_no_backend_endpoint() {
        for (services, backends) in [(1, 1), (1, 256), (1000, 1), (1000, 256)] {
            let text = scale_config(services, backends);
            lb_user::config::parse(&text).expect("valid");
            // Service ports are below 2000, backend ports 8080 and up.
            let backend_ports: Vec<u32> = text
                .lines()
                .filter_map(|line| line.strip_prefix("port = ")?.parse().ok())
                .filter(|&port| port >= 8080)
                .collect();
            let distinct: std::collections::HashSet<_> = backend_ports.iter().collect();
            assert_eq!(distinct.len(), backend_ports.len(), "{services} services");
            assert_eq!(backend_ports.len() as u32, backends + services - 1);
        }
    }
}
