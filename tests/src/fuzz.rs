//! A seeded, reproducible fuzzer of the loaded datapath (issue 5, "Fuzzing").
//!
//! [`run`] sends packets through the real XDP object with `BPF_PROG_TEST_RUN`, in a [`Fixture`]
//! where every host of both subnets has a permanent neighbour entry: valid client packets for
//! the configured services (TCP with the flags the flow table follows, UDP with and without a
//! checksum, IP and TCP options, VLAN tags), valid backend replies and ICMP errors for the flows
//! it saw forwarded, traffic that is not the balancer's, random garbage, truncations of valid
//! frames at every length, and mutations of all of these at every field and length. Each packet
//! is held to properties that hold whatever the input:
//!
//! - the program runs (only frames shorter than an Ethernet header may be refused, by the
//!   kernel, with EINVAL) and returns DROP, PASS, TX or REDIRECT, never ABORTED;
//! - DROP and PASS leave the frame byte for byte as it came: with every neighbour resolved and
//!   no backend behind a bridge, the datapath has no reason to hand a translated packet to the
//!   kernel;
//! - TX and REDIRECT carry a well-formed IPv4 or IPv6 packet (its length within the frame and
//!   covering the headers the datapath translated; a first fragment with its whole transport
//!   header): a client's packet to a backend of the service it addressed, a later fragment
//!   (offset > 0) to the backend its datagram's first fragment went to (or, without one, to a
//!   backend of the (VIP, protocol)'s 3-tuple service, the one every packet of that client
//!   gets), with only its destination address and header checksum changed, a backend's reply translated to come from the service
//!   of a flow forwarded earlier, or an ICMP error about such a flow, addressed to the host
//!   that sent the quoted packet and translated towards the flow's backend or client; nothing
//!   but the MAC addresses (the next hop's), those addresses and ports, and checksums differ
//!   from the input, and TX means the egress interface is the ingress one;
//! - the checksums of a translated packet, recomputed from scratch with etherparse, are valid
//!   when the input's were or when its transport checksum field held the pseudo-header sum (a
//!   veth sender's partial checksum, which the datapath completes; a fifth of the valid client
//!   packets carry one), and otherwise exactly as wrong as the input's: the datapath updates
//!   checksums incrementally and does not verify them, so a corrupted packet reaches its
//!   receiver, which drops it (as the kernel's own NAT does); an IPv4 UDP checksum of 0 stays 0
//!   and no other becomes 0;
//! - a flow stays on its backend until a SYN reuses its closing entry;
//! - packets the generator knows to be valid get the verdict they must: translated, or passed.
//!
//! At the end the datapath's per-reason counters, summed per verdict as `lb-user stats` sums
//! them, must equal the verdicts seen. Everything derives from the seed, so the same seed and
//! count send the same packets in the same order, and packet N of a run is reproduced by
//! `cargo xtask fuzz --seed S --count N+1`.
//!
//! Fragmented datagrams are generated too, in order and reversed: a first fragment must be
//! forwarded, a later one forwarded after its first fragment or under the 3-tuple policy, and
//! dropped when it comes first for any other service; a first fragment without its whole
//! transport header is dropped, and the fragments of a datagram to another host, or to the
//! VIP's address on a port without a service, pass.
//!
//! IPv6 runs in the same run as IPv4, with the same properties: services on fd00:200::/64
//! twins of the IPv4 hosts, extension-header chains walked as the datapath walks them
//! ([`ipv6_walk`]), ICMPv6 errors, TCP, UDP and ICMPv6 checksums over the IPv6 pseudo-header.
//! A /80 is too big to resolve every neighbour of: a translated packet passed towards an
//! unresolved one (`pass_neigh_unresolved`) is the one translated PASS accepted. (An IPv4 reply
//! towards an unresolved neighbour would be dropped instead, `drop_neigh_unresolved`: the
//! kernel drops a passed one as a martian. Every IPv4 host here is resolved, so none is.) IPv6
//! fragments are held to the IPv4 fragments' model: the checker reads a fragment header as
//! IPv4's fragment field ([`Fragment6::as_ipv4_field`]) with its 32-bit identification, and
//! the generator cuts IPv6 datagrams too (a fragment header after the extension headers).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::{self, Write as _},
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use etherparse::checksum::Sum16BitWords;
use lb_common::{counter, protocol};
use lb_user::{
    config,
    dataplane::{Dataplane, LoadOptions},
};

use crate::packet::{
    Fixture, BACKEND_A, BACKEND_A_MAC, BACKEND_B, BACKEND_B_MAC, BACK_MAC, CLIENT, CLIENT_MAC,
    ONE_ARMED_BACKEND, ONE_ARMED_MAC, PUB_MAC, VIP, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
};

/// Packets `cargo xtask fuzz` sends unless told otherwise.
pub const DEFAULT_COUNT: u64 = 1_000_000;

/// The fuzzed services: both protocols, every scheduler, two VIPs, the same port number under
/// both protocols, backends on both interfaces (XDP_REDIRECT and XDP_TX), and backend ports no
/// two services share, so that a reply tells which service it answers for. Timeouts are a day,
/// so that no flow expires during a run and the checker can predict where each one goes; the
/// fragment timeout is the longest allowed, and fragments come right after their first one.
/// "syslog" and "syslog6" hash the 3-tuple, so their VIPs' UDP fragments are placed in any
/// order.
pub const CONFIG: &str = r#"
[flows]
tcp_timeout = "1440m"
tcp_closing_timeout = "1440m"
udp_timeout = "1440m"

[fragments]
timeout = "60s"

[[service]]
name = "web"
vip = "10.200.1.1"
port = 80
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8080
[[service.backend]]
address = "10.200.2.11"
port = 8080

[[service]]
name = "api"
vip = "10.200.1.1"
port = 443
scheduler = "maglev"
maglev_table_size = 1009
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8443
weight = 2
[[service.backend]]
address = "10.200.2.11"
port = 8443

[[service]]
name = "dns"
vip = "10.200.1.1"
port = 53
protocol = "udp"
scheduler = "weighted"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 5353
weight = 3
[[service.backend]]
address = "10.200.2.11"
port = 5353

[[service]]
name = "dns-tcp"
vip = "10.200.1.1"
port = 53
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.11"
port = 5354

[[service]]
name = "one-armed"
vip = "10.200.1.1"
port = 82
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.1.20"
port = 8082

[[service]]
name = "syslog"
vip = "10.200.1.50"
port = 514
protocol = "udp"
scheduler = "maglev"
maglev_table_size = 211
maglev_key = "3-tuple"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.1.20"
port = 5514
[[service.backend]]
address = "10.200.2.10"
port = 5514

[[service]]
name = "web6"
vip = "fd00:200::1:0:0:1"
port = 80
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:a"
port = 8080
[[service.backend]]
address = "fd00:200::2:0:0:b"
port = 8080

[[service]]
name = "api6"
vip = "fd00:200::1:0:0:1"
port = 443
scheduler = "maglev"
maglev_table_size = 1009
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:a"
port = 8443
[[service.backend]]
address = "fd00:200::2:0:0:b"
port = 8443
weight = 3

[[service]]
name = "dns6"
vip = "fd00:200::1:0:0:1"
port = 53
protocol = "udp"
scheduler = "weighted"
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:a"
port = 5353
[[service.backend]]
address = "fd00:200::2:0:0:b"
port = 5353
weight = 2

[[service]]
name = "one-armed6"
vip = "fd00:200::1:0:0:1"
port = 82
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::1:0:0:14"
port = 8082

[[service]]
name = "syslog6"
vip = "fd00:200::1:0:0:32"
port = 514
protocol = "udp"
scheduler = "maglev"
maglev_table_size = 211
maglev_key = "3-tuple"
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::1:0:0:14"
port = 5514
[[service.backend]]
address = "fd00:200::2:0:0:a"
port = 5514
"#;

/// The IPv6 side of [`CONFIG`] mirrors the IPv4 one inside fd00:200::/64: host `h` of subnet
/// `s` (10.200.s.h) is fd00:200::s:0:0:h, on the same interface, in a /80 per interface.
const IPV6_PREFIX: [u8; 9] = [0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0];

/// Host `host` of subnet `subnet` (1: `pub`, 2: `back`) in `family`.
fn host(family: Family, subnet: u8, host: u8) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([10, 200, subnet, host]),
        Family::V6 => {
            let mut octets = [0; 16];
            octets[..9].copy_from_slice(&IPV6_PREFIX);
            octets[9] = subnet;
            octets[15] = host;
            IpAddr::from(octets)
        }
    }
}

/// The subnet and host byte of an address of either family on the two subnets, in the form
/// [`host`] makes (the only IPv6 hosts with neighbour entries).
fn subnet_host(addr: IpAddr) -> Option<(u8, u8)> {
    match addr {
        IpAddr::V4(addr) => match addr.octets() {
            [10, 200, subnet @ (1 | 2), host] => Some((subnet, host)),
            _ => None,
        },
        IpAddr::V6(addr) => {
            let octets = addr.octets();
            let subnet = octets[9];
            (octets[..9] == IPV6_PREFIX && (1..=2).contains(&subnet) && octets[10..15] == [0; 5])
                .then_some((subnet, octets[15]))
        }
    }
}

/// The two address families, each with its own services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    fn ether_type(self) -> [u8; 2] {
        match self {
            Self::V4 => [0x08, 0x00],
            Self::V6 => [0x86, 0xdd],
        }
    }

    /// Where the source and destination addresses sit in this family's IP header.
    fn addr_offsets(self) -> (usize, usize) {
        match self {
            Self::V4 => (12, 16),
            Self::V6 => (8, 24),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(addr) => addr.octets().to_vec(),
        IpAddr::V6(addr) => addr.octets().to_vec(),
    }
}

/// Writes `addr` (4 or 16 bytes) at `offset`, as far as the frame reaches.
fn put_addr(frame: &mut [u8], offset: usize, addr: IpAddr) {
    for (i, byte) in octets(addr).into_iter().enumerate() {
        set(frame, offset + i, byte);
    }
}

/// The address of `family` at `offset` (which the caller checked lies in `bytes`).
fn read_addr(bytes: &[u8], offset: usize, family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from(<[u8; 4]>::try_from(&bytes[offset..offset + 4]).expect("4")),
        Family::V6 => IpAddr::from(<[u8; 16]>::try_from(&bytes[offset..offset + 16]).expect("16")),
    }
}

const ETHERNET_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
/// The largest IPv4 packet either interface carries (both MTUs are 1500): a longer one cannot
/// arrive, and one that claims to be longer is lying.
const MAX_IP_LEN: usize = 1500;
/// The largest frame generated: a full-size packet under two VLAN tags.
const MAX_FRAME_LEN: usize = ETHERNET_LEN + 2 * VLAN_TAG_LEN + MAX_IP_LEN;
const XDP_ABORTED: u32 = 0;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// ICMP types the datapath translates when they quote a balanced flow.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 error types (RFC 4443), all translated when they quote a balanced flow.
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// Flow-table entries kept free of the run's inserts: the kernel's LRU can start evicting a
/// little before it is full (per-CPU free lists).
const EVICTION_SLACK: u64 = 4096;
/// Examples kept per kind of violation.
const EXAMPLES_PER_KIND: usize = 3;
/// Kinds of violation whose first example is replayed alone in a fresh fixture.
const REPLAYED_KINDS: usize = 8;

// ---------------------------------------------------------------------------------------------
// What a run reports.

/// Verdict slots of [`Report::verdicts`]: the XDP actions 0 to 4, then anything else.
const VERDICT_NAMES: [&str; 6] = ["aborted", "drop", "pass", "tx", "redirect", "other"];

/// What a run sent, what the program did with it, and what broke a property.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Packets generated, refused ones included.
    pub count: u64,
    pub elapsed: Duration,
    /// Frames shorter than an Ethernet header, which the kernel refuses (EINVAL) before the
    /// program runs; not counted by the datapath.
    pub refused: u64,
    /// Packets by the verdict returned, indexed like `VERDICT_NAMES`: aborted, drop, pass, tx,
    /// redirect, anything else.
    pub verdicts: [u64; 6],
    /// The same, per kind of generated packet.
    pub by_source: Vec<(&'static str, [u64; 6])>,
    /// The same, for frames whose EtherType says IPv4 and IPv6 (after any VLAN tags).
    pub by_family: [[u64; 6]; 2],
    /// The datapath's own counters summed per verdict (`pass_*`, `drop_*`, `*_tx`,
    /// `*_redirect`), indexed like `verdicts`.
    pub counted: [u64; 6],
    /// The datapath's counters that are not zero, by name.
    pub counters: Vec<(&'static str, u64)>,
    /// Translated packets whose input already had a wrong checksum, carried through unchanged.
    pub carried_bad_checksums: u64,
    /// Violations by kind.
    pub violation_counts: BTreeMap<&'static str, u64>,
    /// The first few violations of each kind.
    pub violations: Vec<Violation>,
}

/// One packet that broke a property.
#[derive(Clone, Debug)]
pub struct Violation {
    /// A short name for the property broken, e.g. `pass_changed`.
    pub kind: &'static str,
    /// The packet's position in the run (0-based); the run's length for the counter check.
    pub index: u64,
    pub message: String,
    /// How the generator made the packet.
    pub case: String,
    /// The interface the packet arrived on: `pub` or `back`.
    pub interface: &'static str,
    pub frame: Vec<u8>,
    pub verdict: Option<u32>,
    pub output: Vec<u8>,
    /// Whether the frame alone, sent first into a fresh fixture, breaks the same property; None
    /// when not tried.
    pub alone: Option<bool>,
    /// What the generator knew the verdict must be, for the replay.
    expect: Expect,
}

impl Report {
    /// Whether no property was broken.
    pub fn passed(&self) -> bool {
        self.violation_counts.is_empty()
    }

    pub fn packets_per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A seed from the clock, for runs that should not all send the same packets.
pub fn seed_from_clock() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() ^ (u64::from(now.subsec_nanos()) << 20)
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Sends `count` generated packets through the datapath and checks each one; see the module
/// documentation. Needs root (a network namespace and BPF).
pub fn run(seed: u64, count: u64) -> Report {
    let world = World::new();
    let capacity = (count + 2 * EVICTION_SLACK).clamp(1024, 1 << 24);
    let options = LoadOptions {
        flow_table_size: capacity as u32,
        fragment_table_size: capacity as u32,
        ..LoadOptions::default()
    };
    let mut fixture = Fixture::with_config(CONFIG, &options);
    add_neighbours();

    let mut generator = Generator::new(seed);
    let mut model = Model::new(capacity);
    let mut tally = Tally::default();
    let started = Instant::now();
    for index in 0..count {
        let case = generator.next(&world, &model);
        let outcome = run_frame(&mut fixture, &case);
        let checked = check(&world, &mut model, &case, &outcome);
        tally.record(index, &case, &outcome, checked);
    }
    let elapsed = started.elapsed();

    let counters = fixture.dataplane.counters().expect("reading COUNTERS");
    tally.check_counters(count, &counters);
    drop(fixture);
    tally.replay_alone(&world);
    tally.into_report(seed, count, elapsed)
}

/// What `BPF_PROG_TEST_RUN` made of one frame.
enum Outcome {
    /// Shorter than an Ethernet header: the kernel refused it with EINVAL, as it must.
    Refused,
    Failed(String),
    Ran {
        verdict: u32,
        output: Vec<u8>,
    },
}

fn run_frame(fixture: &mut Fixture, case: &Case) -> Outcome {
    let ifindex = match case.ingress {
        Interface::Public => fixture.pub_ifindex,
        Interface::Backend => fixture.back_ifindex,
    };
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex (as in `Fixture::run`, which panics where this reports).
    let context: Vec<u8> = [0, case.frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|field| field.to_ne_bytes())
        .collect();
    let mut output = vec![0u8; case.frame.len() + 256];
    let program = fixture.dataplane.program().expect("the XDP program");
    let result = program.test_run(TestRunOptions {
        data_in: Some(&case.frame),
        data_out: Some(&mut output),
        ctx_in: Some(&context),
        ..TestRunOptions::default()
    });
    match result {
        Ok(result) => {
            output.truncate(result.data_size_out as usize);
            Outcome::Ran {
                verdict: result.return_value,
                output,
            }
        }
        Err(ProgramError::SyscallError(error))
            if case.frame.len() < ETHERNET_LEN
                && error.io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            Outcome::Refused
        }
        Err(error) => {
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            Outcome::Failed(format!("{error}: {}", cause.unwrap_or_default()))
        }
    }
}

/// Gives every host of both subnets, but the balancer's own addresses, a permanent neighbour
/// entry beside the fixture's four, in both families: replies go to whichever client a
/// (mutated) packet opened a flow from, and an unresolved neighbour would make the datapath
/// pass a translated packet. The fixture has no IPv6 yet: its interfaces get their IPv6
/// addresses (fd00:200::s:0:0:1/80, as 10.200.s.1/24) and the namespace IPv6 forwarding first.
fn add_neighbours() {
    let mut batch = String::new();
    for (subnet, device) in [(1, "pub"), (2, "back")] {
        let own = host(Family::V6, subnet, 1);
        writeln!(batch, "addr add {own}/80 dev {device} nodad").expect("writing to a String");
    }
    for (subnet, device) in [(1, "pub"), (2, "back")] {
        for (family, host_byte) in [Family::V4, Family::V6]
            .into_iter()
            .flat_map(|family| (0..=255).map(move |host| (family, host)))
        {
            let addr = host(family, subnet, host_byte);
            // This host's own address; and for IPv6 the subnet-router anycast address (host 0),
            // which is this host's too once it forwards.
            if host_byte == 1 || (family == Family::V6 && host_byte == 0) {
                continue;
            }
            let fixture_host = [CLIENT, ONE_ARMED_BACKEND, BACKEND_A, BACKEND_B]
                .map(IpAddr::from)
                .contains(&addr);
            if fixture_host {
                continue;
            }
            let mac = neighbour_mac(addr)
                .map(|byte| format!("{byte:02x}"))
                .join(":");
            writeln!(
                batch,
                "neigh replace {addr} lladdr {mac} dev {device} nud permanent"
            )
            .expect("writing to a String");
        }
    }
    // The children inherit this thread's network namespace: the fixture's.
    let status = Command::new("sysctl")
        .args(["-qw", "net.ipv6.conf.all.forwarding=1"])
        .status()
        .expect("running sysctl");
    assert!(status.success(), "enabling IPv6 forwarding failed");
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ip -batch");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(batch.as_bytes())
        .expect("writing the neighbour batch");
    let output = child.wait_with_output().expect("waiting for ip -batch");
    assert!(
        output.status.success(),
        "adding neighbours failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The MAC address of a host of either subnet and family: the fixture's for its four (and
/// their IPv6 twins), a made-up one for the others (see [`add_neighbours`]).
fn neighbour_mac(addr: IpAddr) -> [u8; 6] {
    match subnet_host(addr) {
        Some((1, 2)) => CLIENT_MAC,
        Some((1, 20)) => ONE_ARMED_MAC,
        Some((2, 10)) => BACKEND_A_MAC,
        Some((2, 11)) => BACKEND_B_MAC,
        Some((subnet, host)) => [0x02, 0, 0, 0xee, subnet, host],
        None => [0x02, 0, 0, 0xee, 0, 0],
    }
}

// ---------------------------------------------------------------------------------------------
// The services and interfaces, as the checker knows them.

/// One service of [`CONFIG`].
struct Service {
    name: String,
    vip: IpAddr,
    port: u16,
    protocol: u8,
    backends: Vec<(IpAddr, u16)>,
    /// Maglev over (client, VIP, protocol): `maglev_key = "3-tuple"`.
    three_tuple: bool,
}

struct World {
    services: Vec<Service>,
}

impl World {
    fn new() -> Self {
        let config = config::parse(CONFIG).expect("the fuzz configuration is valid");
        let services = config
            .services
            .iter()
            .map(|service| Service {
                name: service.name.clone(),
                vip: service.vip,
                port: service.port,
                protocol: service.protocol.number(),
                backends: service
                    .backends
                    .iter()
                    .map(|backend| (backend.addr.ip(), backend.addr.port()))
                    .collect(),
                three_tuple: matches!(
                    service.scheduler,
                    config::Scheduler::Maglev {
                        key: config::MaglevKey::ThreeTuple,
                        ..
                    }
                ),
            })
            .collect();
        Self { services }
    }

    /// The services of one family.
    fn of_family(&self, family: Family) -> Vec<&Service> {
        self.services
            .iter()
            .filter(|service| Family::of(service.vip) == family)
            .collect()
    }

    /// The service a packet to `addr`:`port` is for.
    fn service_for(&self, addr: IpAddr, port: u16, protocol: u8) -> Option<usize> {
        self.services.iter().position(|service| {
            (service.vip, service.port, service.protocol) == (addr, port, protocol)
        })
    }

    /// The service whose 3-tuple hash places the fragments for `addr` and `protocol`.
    fn three_tuple_service(&self, addr: IpAddr, protocol: u8) -> Option<usize> {
        self.services.iter().position(|service| {
            service.three_tuple && (service.vip, service.protocol) == (addr, protocol)
        })
    }

    /// Whether `addr`:`port` is a backend of some service of `protocol`.
    fn is_backend(&self, addr: IpAddr, port: u16, protocol: u8) -> bool {
        self.services
            .iter()
            .any(|service| service.protocol == protocol && service.backends.contains(&(addr, port)))
    }
}

/// The fixture's two interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interface {
    /// `pub`, 10.200.1.0/24 and fd00:200::1:0:0:0/80: clients, the VIPs, the one-armed
    /// backend.
    Public,
    /// `back`, 10.200.2.0/24 and fd00:200::2:0:0:0/80: backends A and B.
    Backend,
}

impl Interface {
    /// The interface a host of either subnet (and family) is reached through.
    fn of(addr: IpAddr) -> Option<Self> {
        let subnet = match addr {
            IpAddr::V4(addr) => match addr.octets() {
                [10, 200, subnet, _] => subnet,
                _ => return None,
            },
            // The interfaces' /80 prefixes.
            IpAddr::V6(addr) => match addr.octets() {
                octets if octets[..9] == IPV6_PREFIX => octets[9],
                _ => return None,
            },
        };
        match subnet {
            1 => Some(Self::Public),
            2 => Some(Self::Backend),
            _ => None,
        }
    }

    fn from_name(name: &str) -> Self {
        if name == "back" {
            Self::Backend
        } else {
            Self::Public
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Public => "pub",
            Self::Backend => "back",
        }
    }

    fn mac(self) -> [u8; 6] {
        match self {
            Self::Public => PUB_MAC,
            Self::Backend => BACK_MAC,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Public => Self::Backend,
            Self::Backend => Self::Public,
        }
    }
}

/// A packet's addresses, ports and protocol, the ports in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
}

impl Tuple {
    fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
        }
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.protocol {
            protocol::TCP => "tcp",
            protocol::UDP => "udp",
            _ => "ip",
        };
        write!(
            f,
            "{} > {} {name}",
            endpoint((self.src, self.src_port)),
            endpoint((self.dst, self.dst_port))
        )
    }
}

fn endpoint((addr, port): (IpAddr, u16)) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

// ---------------------------------------------------------------------------------------------
// Generated packets.

/// What made a packet, for the report's breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Client,
    Reply,
    IcmpError,
    Other,
    Garbage,
    Mutated,
    Truncated,
    Fragment,
    Extensions,
}

impl Source {
    const ALL: [Source; 9] = [
        Source::Client,
        Source::Reply,
        Source::IcmpError,
        Source::Other,
        Source::Garbage,
        Source::Mutated,
        Source::Truncated,
        Source::Fragment,
        Source::Extensions,
    ];

    fn name(self) -> &'static str {
        match self {
            Source::Client => "client",
            Source::Reply => "reply",
            Source::IcmpError => "icmp error",
            Source::Other => "not ours",
            Source::Garbage => "garbage",
            Source::Mutated => "mutated",
            Source::Truncated => "truncated",
            Source::Fragment => "fragment",
            Source::Extensions => "ipv6 chains",
        }
    }
}

/// The verdict a packet must get, when the generator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Valid and the balancer's: translated and sent (the reason, for the report).
    Sent(&'static str),
    /// Not the balancer's: passed.
    Pass,
    /// Dropped (the reason, for the report).
    Drop(&'static str),
    /// Only the general properties apply.
    Any,
}

struct Case {
    source: Source,
    frame: Vec<u8>,
    ingress: Interface,
    expect: Expect,
    description: String,
}

/// splitmix64: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (bound > 0); the modulo bias is irrelevant here.
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// Mostly one of the last few items, sometimes any: flows get several packets in a row.
    fn pick_recent<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let window = if self.chance(70) { 64 } else { items.len() };
        let window = window.min(items.len());
        Some(items[items.len() - 1 - self.below(window)])
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// An IPv6 extension header: its type, and its bytes (the first, the next header, is filled
/// in when the chain is written out).
#[derive(Clone, Debug)]
struct Extension {
    kind: u8,
    bytes: Vec<u8>,
}

/// A valid IPv4 or IPv6 (by the tuple's addresses) TCP or UDP frame, before it is written out.
struct Spec {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// VLAN tags as they follow the MAC addresses: type and tag control, 4 bytes each.
    vlan: Vec<u8>,
    tuple: Tuple,
    /// IPv4 only.
    ip_options: Vec<u8>,
    /// IPv6 only: the extension headers after the fixed header.
    extensions: Vec<Extension>,
    /// The IPv4 TOS or the IPv6 traffic class.
    tos: u8,
    /// IPv6 only.
    flow_label: u32,
    ttl: u8,
    id: u16,
    dont_fragment: bool,
    seq: u32,
    ack: u32,
    tcp_flags: u8,
    tcp_options: Vec<u8>,
    window: u16,
    udp_checksum: bool,
    /// The transport checksum left partial (the pseudo-header sum only), as a veth sender
    /// with transmit offload hands it over.
    partial_checksum: bool,
    payload: Vec<u8>,
    /// Padding up to the 60-byte Ethernet minimum, as a NIC delivers short frames; random
    /// bytes when Some(true), zeros when Some(false).
    pad: Option<bool>,
}

impl Spec {
    fn frame(&self, rng: &mut Rng) -> Vec<u8> {
        let family = Family::of(self.tuple.src);
        let mut frame = ethernet_for(family, self.dst_mac, self.src_mac, &self.vlan);
        frame.extend(self.ip_packet());
        refresh_checksums(&mut frame);
        if self.partial_checksum {
            make_partial(&mut frame);
        }
        if let Some(random) = self.pad {
            while frame.len() < 60 {
                frame.push(if random { rng.byte() } else { 0 });
            }
        }
        frame
    }

    /// The IP packet, checksums left at zero (or at the UDP placeholder).
    fn ip_packet(&self) -> Vec<u8> {
        let is_tcp = self.tuple.protocol == protocol::TCP;
        let l4_len = if is_tcp {
            20 + self.tcp_options.len()
        } else {
            8
        };
        let mut packet = match Family::of(self.tuple.src) {
            Family::V4 => {
                let ip_len = 20 + self.ip_options.len();
                let total_len = ip_len + l4_len + self.payload.len();
                let mut packet = Vec::with_capacity(total_len);
                packet.push(0x40 | (ip_len / 4) as u8);
                packet.push(self.tos);
                packet.extend_from_slice(&(total_len as u16).to_be_bytes());
                packet.extend_from_slice(&self.id.to_be_bytes());
                packet.extend_from_slice(&(u16::from(self.dont_fragment) << 14).to_be_bytes());
                packet.extend_from_slice(&[self.ttl, self.tuple.protocol, 0, 0]);
                packet.extend(octets(self.tuple.src));
                packet.extend(octets(self.tuple.dst));
                packet.extend_from_slice(&self.ip_options);
                packet
            }
            Family::V6 => {
                let chain = extension_chain(&self.extensions, self.tuple.protocol);
                let payload_len = chain.len() + l4_len + self.payload.len();
                let first = self
                    .extensions
                    .first()
                    .map_or(self.tuple.protocol, |extension| extension.kind);
                let mut packet =
                    ipv6_header(self.tuple.src, self.tuple.dst, first, payload_len, self.ttl);
                packet[0] = 0x60 | self.tos >> 4;
                packet[1] = self.tos << 4 | (self.flow_label >> 16) as u8 & 0x0f;
                packet[2..4].copy_from_slice(&(self.flow_label as u16).to_be_bytes());
                packet.extend(chain);
                packet
            }
        };
        packet.extend_from_slice(&self.tuple.src_port.to_be_bytes());
        packet.extend_from_slice(&self.tuple.dst_port.to_be_bytes());
        if is_tcp {
            packet.extend_from_slice(&self.seq.to_be_bytes());
            packet.extend_from_slice(&self.ack.to_be_bytes());
            packet.push(((l4_len / 4) as u8) << 4);
            packet.push(self.tcp_flags);
            packet.extend_from_slice(&self.window.to_be_bytes());
            packet.extend_from_slice(&[0, 0, 0, 0]);
            packet.extend_from_slice(&self.tcp_options);
        } else {
            packet.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            // Any non-zero value: refresh_checksums computes it; zero means "no checksum".
            let placeholder = if self.udp_checksum { 0xffff_u16 } else { 0 };
            packet.extend_from_slice(&placeholder.to_be_bytes());
        }
        packet.extend_from_slice(&self.payload);
        packet
    }
}

/// An Ethernet header with the IPv4 EtherType after `vlan`'s tags.
fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: &[u8]) -> Vec<u8> {
    ethernet_for(Family::V4, dst, src, vlan)
}

/// An Ethernet header with `family`'s EtherType after `vlan`'s tags.
fn ethernet_for(family: Family, dst: [u8; 6], src: [u8; 6], vlan: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETHERNET_LEN + vlan.len() + MAX_IP_LEN);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(vlan);
    frame.extend_from_slice(&family.ether_type());
    frame
}

/// A 40-byte IPv6 header: traffic class and flow label zero.
fn ipv6_header(src: IpAddr, dst: IpAddr, next: u8, payload_len: usize, hops: u8) -> Vec<u8> {
    let mut header = vec![0x60, 0, 0, 0];
    header.extend_from_slice(&(payload_len as u16).to_be_bytes());
    header.extend_from_slice(&[next, hops]);
    header.extend(octets(src));
    header.extend(octets(dst));
    header
}

/// IPv6 extension header numbers, as the datapath walks them.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION_OPTIONS: u8 = 60;
const NO_NEXT_HEADER: u8 = 59;
/// The longest chain the datapath walks; a longer one passes.
const MAX_EXTENSION_HEADERS: usize = 6;
const ICMPV6: u8 = 58;

/// The extension headers written out, each one's next header the following one's type (the
/// last one's `last`).
fn extension_chain(extensions: &[Extension], last: u8) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, extension) in extensions.iter().enumerate() {
        let next = extensions.get(i + 1).map_or(last, |next| next.kind);
        let start = chain.len();
        chain.extend_from_slice(&extension.bytes);
        chain[start] = next;
    }
    chain
}

impl Extension {
    /// Hop-by-hop or destination options: `units` 8-byte units after the first, all padding
    /// (one PadN option).
    fn options(kind: u8, units: u8) -> Self {
        let len = 8 * (usize::from(units) + 1);
        let mut bytes = vec![0, units, 1, (len - 4) as u8];
        bytes.resize(len, 0);
        Self { kind, bytes }
    }

    /// A type 2 routing header (one address) with `segments_left`.
    fn routing(segments_left: u8, via: IpAddr) -> Self {
        let mut bytes = vec![0, 2, 2, segments_left, 0, 0, 0, 0];
        bytes.extend(octets(via));
        Self {
            kind: ROUTING,
            bytes,
        }
    }

    /// An authentication header with a 12-byte ICV: 24 bytes, length field 4 (4-byte units
    /// less 2).
    fn authentication(rng: &mut Rng) -> Self {
        let mut bytes = vec![0, 4, 0, 0];
        bytes.extend(rng.bytes(20));
        Self {
            kind: AUTHENTICATION,
            bytes,
        }
    }

    /// A fragment header: `offset` in 8-byte units, more fragments or not, an identification.
    fn fragment(offset: u16, more: bool, id: u32) -> Self {
        let mut bytes = vec![0, 0];
        bytes.extend_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
        bytes.extend_from_slice(&id.to_be_bytes());
        Self {
            kind: FRAGMENT,
            bytes,
        }
    }

    /// Any header the datapath steps over, valid, except a fragment header and a routing
    /// header with segments left (which make the packet pass).
    fn any_translatable(rng: &mut Rng, first: bool) -> Self {
        match rng.below(if first { 4 } else { 3 }) {
            0 => Self::options(DESTINATION_OPTIONS, rng.below(3) as u8),
            1 => Self::routing(0, host(Family::V6, 1, 1)),
            2 => Self::authentication(rng),
            _ => Self::options(HOP_BY_HOP, rng.below(3) as u8),
        }
    }
}

/// What [`Generator::fragmented`] makes of a datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fragmented {
    /// For a service: balanced, every fragment where the first went.
    Balanced,
    /// The first fragment ends inside the transport header: dropped for a VIP.
    TinyFirst,
    /// For the VIP's address, on a port without a service: the kernel's, all fragments.
    NoService,
    /// For another host: passed.
    OtherHost,
    /// IPv6, with no TCP or UDP after the fragment header: passed, however addressed.
    Untracked,
}

impl Fragmented {
    fn note(self) -> &'static str {
        match self {
            Fragmented::Balanced => "",
            Fragmented::TinyFirst => ", first fragment inside the transport header",
            Fragmented::NoService => ", on a port without a service",
            Fragmented::OtherHost => ", to another host",
            Fragmented::Untracked => ", not TCP or UDP after the fragment header",
        }
    }
}

/// Makes the packets of a run, from the seed and from what the model has seen forwarded.
struct Generator {
    rng: Rng,
    /// Client tuples already used, so that flows get more than one packet.
    conversations: Vec<Tuple>,
    /// Cases made ahead (a truncation sweep).
    queued: VecDeque<Case>,
    /// The next IP ID per (source, destination, protocol), counted up from a random start as
    /// real stacks do. The datapath tracks fragments by (source, destination, protocol, ID),
    /// so a datagram reusing a key within the timeout is indistinguishable from the earlier one
    /// (a later fragment arriving first would follow it); a counter reuses one only after
    /// 65536 packets of the same triple, far more than a run sends within the timeout.
    ip_ids: HashMap<(IpAddr, IpAddr, u8), u16>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            conversations: Vec::new(),
            queued: VecDeque::new(),
            ip_ids: HashMap::new(),
        }
    }

    fn next(&mut self, world: &World, model: &Model) -> Case {
        if let Some(case) = self.queued.pop_front() {
            return case;
        }
        match self.rng.below(1000) {
            0 => {
                self.queue_truncations(world, model);
                self.queued
                    .pop_front()
                    .expect("a sweep has at least one frame")
            }
            1..=329 => self.client(world),
            330..=509 => self.reply(model).unwrap_or_else(|| self.client(world)),
            510..=549 => self
                .icmp_error(world, model)
                .unwrap_or_else(|| self.client(world)),
            550..=619 => self.other(world, model),
            620..=669 => self.garbage(),
            670..=689 => self.fragmented(world),
            690..=719 => self.extensions(world, model),
            _ => self.mutated(world, model),
        }
    }

    /// A valid packet from a client (any host of `pub`'s subnet but the VIPs) to a service:
    /// a new flow, or the next packet of one started earlier.
    fn client(&mut self, world: &World) -> Case {
        let (tuple, new) = match self.rng.pick_recent(&self.conversations) {
            Some(tuple) if self.rng.chance(60) => (tuple, false),
            _ => (self.new_conversation(world), true),
        };
        let flags = if tuple.protocol != protocol::TCP {
            0
        } else if new {
            TCP_SYN
        } else {
            self.client_flags()
        };
        let spec = self.spec(tuple, neighbour_mac(tuple.src), PUB_MAC, flags);
        Case {
            source: Source::Client,
            frame: spec.frame(&mut self.rng),
            ingress: Interface::Public,
            expect: Expect::Sent("a valid packet for a service must be forwarded"),
            description: format!("client {tuple} {}{}", flag_names(flags), vlan_note(&spec)),
        }
    }

    /// A client's datagram in two fragments, IPv4 or IPv6 (a fragment header after the
    /// extension headers, a 32-bit identification), queued in order or (one in five) later
    /// fragment first: that one is an orphan, dropped, unless its (VIP, protocol) hashes the
    /// 3-tuple. Some datagrams are not the balancer's, and both fragments pass: addressed to
    /// another host, to the VIP's address on a port no service has, or (IPv6) with something
    /// else than TCP or UDP after the fragment header. Some first fragments are too short for
    /// their transport header, and are dropped.
    fn fragmented(&mut self, world: &World) -> Case {
        let family = if self.rng.chance(50) {
            Family::V4
        } else {
            Family::V6
        };
        let mut tuple = self.new_conversation_in(world, family);
        let kind = match self.rng.below(20) {
            0 => Fragmented::OtherHost,
            1 => Fragmented::NoService,
            2 => Fragmented::TinyFirst,
            3 if family == Family::V6 => Fragmented::Untracked,
            _ => Fragmented::Balanced,
        };
        match kind {
            Fragmented::OtherHost => tuple.dst = host(family, 1, 99),
            // No service of the fixture listens on port 9 (discard).
            Fragmented::NoService => tuple.dst_port = 9,
            _ => {}
        }
        let flags = if tuple.protocol == protocol::TCP {
            TCP_SYN
        } else {
            0
        };
        let mut spec = self.spec(tuple, neighbour_mac(tuple.src), PUB_MAC, flags);
        spec.dont_fragment = false;
        spec.pad = None;
        // Room for the fragment header: one header in the chain and 8 bytes in the MTU.
        spec.extensions.truncate(MAX_EXTENSION_HEADERS - 1);
        if spec.payload.len() < 16 {
            let len = 16 + self.rng.below(512);
            spec.payload = self.rng.bytes(len);
        }
        let fixed = spec.ip_packet().len() - spec.payload.len();
        spec.payload.truncate(MAX_IP_LEN - 8 - fixed);
        let whole = spec.frame(&mut self.rng);
        let transport_len = fixed
            - match family {
                Family::V4 => 20 + spec.ip_options.len(),
                Family::V6 => 40 + extension_chain(&spec.extensions, 0).len(),
            };
        // The first fragment holds the whole transport header, cut on an 8-byte boundary; a
        // tiny one ends inside it.
        let first_len = if kind == Fragmented::TinyFirst {
            (transport_len - 1) / 8 * 8
        } else {
            (transport_len + 8 + self.rng.below(spec.payload.len() - 8)) / 8 * 8
        };
        // A UDP header fits the first 8 bytes: a tiny first fragment of UDP carries none, and
        // its datagram's next fragment (offset 0 again would make it a whole packet) is lost.
        let later_from = first_len.max(8);
        let [first, later] = match family {
            Family::V4 => split_in_two(&whole, first_len, later_from),
            Family::V6 => {
                let next = if kind == Fragmented::Untracked {
                    self.rng.pick(&[ICMPV6, NO_NEXT_HEADER, 132])
                } else {
                    tuple.protocol
                };
                let id = self.rng.next() as u32;
                split_in_two6(&whole, &spec.extensions, next, (first_len, later_from), id)
            }
        };
        let description = format!(
            "client {tuple} {}{}{}",
            flag_names(flags),
            vlan_note(&spec),
            kind.note()
        );
        let case = |frame: Vec<u8>, expect: Expect, what: &str| Case {
            source: Source::Fragment,
            frame,
            ingress: Interface::Public,
            expect,
            description: format!("{what} fragment of {description}"),
        };
        let sent = Expect::Sent("a fragment of a datagram for a service must be forwarded");
        let orphan = if world
            .three_tuple_service(tuple.dst, tuple.protocol)
            .is_some()
        {
            Expect::Sent("a later fragment without its first one goes by the 3-tuple policy")
        } else {
            Expect::Drop("a later fragment without its first one, and no 3-tuple policy")
        };
        let (first_expect, later_expect) = match kind {
            Fragmented::Balanced => (sent, sent),
            Fragmented::TinyFirst => (
                Expect::Drop("a first fragment without its whole transport header"),
                orphan,
            ),
            // Recorded as the kernel's: its later fragment passes too.
            Fragmented::NoService => (Expect::Pass, Expect::Pass),
            Fragmented::OtherHost | Fragmented::Untracked => (Expect::Pass, Expect::Pass),
        };
        if self.rng.chance(20) {
            let later_first = match kind {
                Fragmented::OtherHost | Fragmented::Untracked => Expect::Pass,
                _ => orphan,
            };
            self.queued.push_back(case(first, first_expect, "first"));
            return case(later, later_first, "later (before the first)");
        }
        self.queued.push_back(case(later, later_expect, "later"));
        case(first, first_expect, "first")
    }

    fn new_conversation(&mut self, world: &World) -> Tuple {
        let family = if self.rng.chance(50) {
            Family::V4
        } else {
            Family::V6
        };
        self.new_conversation_in(world, family)
    }

    /// A new client tuple for a service of `family`: IPv4 and IPv6 runs are mixed evenly.
    fn new_conversation_in(&mut self, world: &World, family: Family) -> Tuple {
        let services = world.of_family(family);
        let service = services[self.rng.below(services.len())];
        let host_byte = match 2 + self.rng.below(252) as u8 {
            50 => 51, // VIP2
            host => host,
        };
        let tuple = Tuple {
            src: host(family, 1, host_byte),
            dst: service.vip,
            src_port: 1024 + self.rng.below(64512) as u16,
            dst_port: service.port,
            protocol: service.protocol,
        };
        if self.conversations.len() >= 8192 {
            self.conversations.drain(..4096);
        }
        self.conversations.push(tuple);
        tuple
    }

    fn client_flags(&mut self) -> u8 {
        match self.rng.below(100) {
            0..=29 => TCP_ACK,
            30..=59 => TCP_PSH | TCP_ACK,
            60..=69 => TCP_FIN | TCP_ACK,
            70..=74 => TCP_RST,
            75..=79 => TCP_RST | TCP_ACK,
            80..=89 => TCP_SYN,
            90..=94 => TCP_SYN | TCP_ACK,
            _ => self.rng.byte(),
        }
    }

    /// A valid reply from a backend to the client of a flow the checker saw forwarded.
    fn reply(&mut self, model: &Model) -> Option<Case> {
        let tuple = self.rng.pick_recent(&model.replies)?;
        let ingress = Interface::of(tuple.src)?;
        let flags = if tuple.protocol != protocol::TCP {
            0
        } else {
            match self.rng.below(100) {
                0..=29 => TCP_ACK,
                30..=64 => TCP_PSH | TCP_ACK,
                65..=74 => TCP_SYN | TCP_ACK,
                75..=84 => TCP_FIN | TCP_ACK,
                85..=89 => TCP_RST,
                90..=94 => TCP_RST | TCP_ACK,
                _ => self.rng.byte(),
            }
        };
        let spec = self.spec(tuple, neighbour_mac(tuple.src), ingress.mac(), flags);
        Some(Case {
            source: Source::Reply,
            frame: spec.frame(&mut self.rng),
            ingress,
            expect: if model.complete() && has_neighbour(tuple.dst) {
                Expect::Sent("a valid reply of a flow the datapath holds must be translated")
            } else {
                Expect::Any
            },
            description: format!("reply {tuple} {}{}", flag_names(flags), vlan_note(&spec)),
        })
    }

    /// A valid ICMP error about a flow the checker saw forwarded: from the client's side about
    /// a reply (for the flow's backend), or from the backend's side about a client's packet
    /// (for the client).
    fn icmp_error(&mut self, world: &World, model: &Model) -> Option<Case> {
        let reply = self.rng.pick_recent(&model.replies)?;
        let service = &world.services[*model.reverse.get(&reply)?];
        let client_packet = Tuple {
            src: reply.dst,
            dst: reply.src,
            src_port: reply.dst_port,
            dst_port: reply.src_port,
            protocol: reply.protocol,
        };
        let (outer_src, quoted, ingress) = if self.rng.chance(50) {
            // What this host sent the client, refused by the client or a router before it.
            let quoted = Tuple {
                src: service.vip,
                src_port: service.port,
                ..reply
            };
            let router = router(Family::of(reply.dst), Interface::Public);
            let sender = self.rng.pick(&[reply.dst, router]);
            (sender, quoted, Interface::Public)
        } else {
            // What this host sent the backend, refused by it or a router before it.
            let ingress = Interface::of(reply.src)?;
            let router = router(Family::of(reply.src), ingress);
            (self.rng.pick(&[reply.src, router]), client_packet, ingress)
        };
        let flags = if quoted.protocol == protocol::TCP {
            TCP_ACK
        } else {
            0
        };
        let frame = self.icmp_frame(outer_src, quoted.src, quoted, flags, ingress);
        Some(Case {
            source: Source::IcmpError,
            frame,
            ingress,
            expect: if model.complete() && has_neighbour(quoted.src) {
                Expect::Sent("a valid ICMP error about a balanced flow must be translated")
            } else {
                Expect::Any
            },
            description: format!("ICMP error from {outer_src} about {quoted}"),
        })
    }

    /// An ICMP (or ICMPv6) error from `src` to `dst` quoting a packet of `quoted`: its IP
    /// header and the first 8 transport bytes (RFC 792), or more of it (RFC 1812, RFC 4443).
    fn icmp_frame(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        quoted: Tuple,
        flags: u8,
        ingress: Interface,
    ) -> Vec<u8> {
        let family = Family::of(src);
        let mut inner = self.spec(quoted, [0; 6], [0; 6], flags);
        inner.vlan.clear();
        // The datapath does not walk extension headers inside a quoted packet (our own packets
        // never carry any): an error quoting them is not translated.
        inner.extensions.clear();
        let mut inner_frame = ethernet_for(family, [0; 6], [0; 6], &[]);
        inner_frame.extend(inner.ip_packet());
        refresh_checksums(&mut inner_frame);
        let ip_header_len = match family {
            Family::V4 => 20 + inner.ip_options.len(),
            Family::V6 => 40,
        };
        let quoted_len = if self.rng.chance(50) {
            ip_header_len + 8
        } else {
            inner_frame.len() - ETHERNET_LEN
        };
        let (kind, code, rest) = match (family, self.rng.below(5)) {
            (Family::V4, 0) => (ICMP_UNREACHABLE, 4, [0, 0, 0x05, 0x78]), // fragmentation needed
            (Family::V4, 1) => (ICMP_UNREACHABLE, 3, [0; 4]),             // port unreachable
            (Family::V4, 2) => (ICMP_UNREACHABLE, 1, [0; 4]),             // host unreachable
            (Family::V4, 3) => (ICMP_TIME_EXCEEDED, 0, [0; 4]),
            (Family::V4, _) => (ICMP_PARAMETER_PROBLEM, 0, [20, 0, 0, 0]),
            (Family::V6, 0) => (ICMPV6_PACKET_TOO_BIG, 0, [0, 0, 0x05, 0x00]), // MTU 1280
            (Family::V6, 1) => (ICMPV6_UNREACHABLE, 4, [0; 4]),                // port unreachable
            (Family::V6, 2) => (ICMPV6_UNREACHABLE, 3, [0; 4]), // address unreachable
            (Family::V6, 3) => (ICMPV6_TIME_EXCEEDED, 0, [0; 4]),
            (Family::V6, _) => (ICMPV6_PARAMETER_PROBLEM, 0, [0, 0, 0, 6]),
        };
        let mut body = vec![kind, code, 0, 0];
        body.extend_from_slice(&rest);
        body.extend_from_slice(&inner_frame[ETHERNET_LEN..ETHERNET_LEN + quoted_len]);
        let vlan = self.vlan();
        let mut frame = ethernet_for(family, ingress.mac(), neighbour_mac(src), &vlan);
        match family {
            Family::V4 => {
                body.truncate(MAX_IP_LEN - 20);
                frame.extend(ipv4_header(src, dst, protocol::ICMP, body.len()));
            }
            Family::V6 => {
                // Sometimes behind extension headers the datapath steps over.
                let extensions = self.translatable_extensions(10);
                let chain = extension_chain(&extensions, ICMPV6);
                body.truncate(MAX_IP_LEN - 40 - chain.len());
                let first = extensions.first().map_or(ICMPV6, |header| header.kind);
                frame.extend(ipv6_header(src, dst, first, chain.len() + body.len(), 64));
                frame.extend(chain);
            }
        }
        frame.extend(body);
        refresh_checksums(&mut frame);
        frame
    }

    /// Mostly none; in `percent` of the cases one to six headers the datapath steps over.
    fn translatable_extensions(&mut self, percent: usize) -> Vec<Extension> {
        if !self.rng.chance(percent) {
            return Vec::new();
        }
        let count = 1 + self.rng.below(MAX_EXTENSION_HEADERS);
        (0..count)
            .map(|i| Extension::any_translatable(&mut self.rng, i == 0))
            .collect()
    }

    /// The rest of a valid packet around `tuple`: options, sizes and header fields at random.
    fn spec(&mut self, tuple: Tuple, src_mac: [u8; 6], dst_mac: [u8; 6], flags: u8) -> Spec {
        let vlan = self.vlan();
        let family = Family::of(tuple.src);
        let extensions = match family {
            Family::V4 => Vec::new(),
            Family::V6 => self.translatable_extensions(15),
        };
        let rng = &mut self.rng;
        let ip_options = if family == Family::V4 && rng.chance(10) {
            ip_options(rng)
        } else {
            Vec::new()
        };
        let tcp_options = if tuple.protocol == protocol::TCP && rng.chance(30) {
            tcp_options(rng)
        } else {
            Vec::new()
        };
        let transport_len = if tuple.protocol == protocol::TCP {
            20 + tcp_options.len()
        } else {
            8
        };
        let ip_len = match family {
            Family::V4 => 20 + ip_options.len(),
            Family::V6 => 40 + extension_chain(&extensions, 0).len(),
        };
        let headers = ip_len + transport_len;
        // The next IP ID of the (source, destination, protocol), as a real stack counts: see
        // `ip_ids`.
        let next_id = self
            .ip_ids
            .entry((tuple.src, tuple.dst, tuple.protocol))
            .or_insert_with(|| rng.u16());
        let id = *next_id;
        *next_id = id.wrapping_add(1);
        let payload_len = match rng.below(10) {
            0..=4 => 0,
            5..=7 => 1 + rng.below(64),
            8 => 1 + rng.below(512),
            _ => 1 + rng.below(MAX_IP_LEN - headers),
        };
        Spec {
            src_mac,
            dst_mac,
            vlan,
            tuple,
            ip_options,
            extensions,
            tos: if rng.chance(80) { 0 } else { rng.byte() },
            flow_label: if rng.chance(50) {
                0
            } else {
                rng.next() as u32 & 0xf_ffff
            },
            ttl: if rng.chance(80) { 64 } else { rng.byte() },
            id,
            dont_fragment: rng.chance(50),
            seq: rng.next() as u32,
            ack: if flags & TCP_ACK != 0 {
                rng.next() as u32
            } else {
                0
            },
            tcp_flags: flags,
            tcp_options,
            window: rng.u16(),
            // IPv6 UDP must carry one (RFC 8200); zero ones are made on purpose elsewhere.
            udp_checksum: family == Family::V6 || rng.chance(80),
            partial_checksum: rng.chance(20),
            payload: rng.bytes(payload_len),
            pad: match rng.below(10) {
                0..=4 => Some(false),
                5 => Some(true),
                _ => None,
            },
        }
    }

    /// No tag mostly; sometimes an 802.1Q tag, or an 802.1ad tag over an 802.1Q one.
    fn vlan(&mut self) -> Vec<u8> {
        let rng = &mut self.rng;
        match rng.below(20) {
            0 => vec![0x81, 0x00, rng.byte() & 0x0f, rng.byte()],
            1 => vec![
                0x88,
                0xa8,
                rng.byte() & 0x0f,
                rng.byte(),
                0x81,
                0x00,
                rng.byte() & 0x0f,
                rng.byte(),
            ],
            _ => Vec::new(),
        }
    }

    /// Traffic that is not the balancer's, of either family: it must pass untouched.
    fn other(&mut self, world: &World, model: &Model) -> Case {
        let family = if self.rng.chance(50) {
            Family::V4
        } else {
            Family::V6
        };
        let client = host(family, 1, 2 + self.rng.below(48) as u8);
        let client_port = 1024 + self.rng.below(64512) as u16;
        let mut ingress = Interface::Public;
        let vip = host(family, 1, 1);
        let (frame, description) = match self.rng.below(9) {
            0 if family == Family::V4 => (arp_request(client), "ARP request".to_string()),
            0 => self.neighbour_discovery(client),
            1 | 2 if family == Family::V4 => {
                let protocol = self.rng.pick(&[1, 0, 47, 50, 132, 255]);
                let frame = ipv4_other(&mut self.rng, client, vip, protocol);
                (frame, format!("IPv4 protocol {protocol} to the VIP"))
            }
            1 | 2 => {
                let protocol = self
                    .rng
                    .pick(&[ICMPV6, ICMPV6, NO_NEXT_HEADER, 47, 50, 132]);
                let frame = ipv6_other(&mut self.rng, client, vip, protocol);
                (frame, format!("IPv6 next header {protocol} to the VIP"))
            }
            3 | 4 => {
                // To a VIP or another host, on a port and protocol no service has there.
                let dst = self.rng.pick(&[
                    vip,
                    host(family, 1, 50),
                    host(family, 1, 99),
                    host(family, 2, 10),
                ]);
                let protocol = self.rng.pick(&[protocol::TCP, protocol::UDP]);
                let random = self.rng.u16();
                let mut port = self.rng.pick(&[22, 80, 53, 443, 8080, 514, random]);
                while world.service_for(dst, port, protocol).is_some() {
                    port = port.wrapping_add(1);
                }
                let tuple = Tuple {
                    src: client,
                    dst,
                    src_port: client_port,
                    dst_port: port,
                    protocol,
                };
                let flags = if protocol == protocol::TCP {
                    TCP_SYN
                } else {
                    0
                };
                let spec = self.spec(tuple, neighbour_mac(client), PUB_MAC, flags);
                (spec.frame(&mut self.rng), format!("not a service: {tuple}"))
            }
            5 => {
                // A backend answering a client it has no balanced flow with.
                let services = world.of_family(family);
                let service = services[self.rng.below(services.len())];
                let (addr, port) = self.rng.pick(&service.backends);
                ingress = Interface::of(addr).expect("backends are on the two subnets");
                let tuple = Tuple {
                    src: addr,
                    dst: client,
                    src_port: port,
                    dst_port: client_port,
                    protocol: service.protocol,
                };
                let flags = if service.protocol == protocol::TCP {
                    TCP_ACK
                } else {
                    0
                };
                let spec = self.spec(tuple, neighbour_mac(addr), ingress.mac(), flags);
                (spec.frame(&mut self.rng), format!("no flow: {tuple}"))
            }
            6 => {
                // An ICMP error about a packet of no balanced flow.
                let quoted = Tuple {
                    src: vip,
                    dst: client,
                    src_port: self.rng.pick(&[80, 22, 443]),
                    dst_port: client_port,
                    protocol: protocol::TCP,
                };
                let frame = self.icmp_frame(client, vip, quoted, TCP_ACK, ingress);
                (frame, format!("ICMP error about no flow: {quoted}"))
            }
            7 => {
                // The balancer's own traffic with a backend: a health check's answer.
                let (backend, port) = self.rng.pick(&[(10, 8080), (11, 5354)]);
                let addr = host(family, 2, backend);
                ingress = Interface::Backend;
                let tuple = Tuple {
                    src: addr,
                    dst: host(family, 2, 1),
                    src_port: port,
                    dst_port: client_port,
                    protocol: protocol::TCP,
                };
                let spec = self.spec(tuple, neighbour_mac(addr), BACK_MAC, TCP_SYN | TCP_ACK);
                (
                    spec.frame(&mut self.rng),
                    format!("health check answer: {tuple}"),
                )
            }
            _ => {
                // Three VLAN tags: more than the datapath steps over.
                let tuple = Tuple {
                    src: client,
                    dst: vip,
                    src_port: client_port,
                    dst_port: 80,
                    protocol: protocol::TCP,
                };
                let mut spec = self.spec(tuple, neighbour_mac(client), PUB_MAC, TCP_SYN);
                spec.vlan = [0x88, 0xa8, 0, 1, 0x81, 0x00, 0, 2, 0x81, 0x00, 0, 3].to_vec();
                (
                    spec.frame(&mut self.rng),
                    format!("three VLAN tags: {tuple}"),
                )
            }
        };
        let expect = if model.knows(&frame) {
            Expect::Any
        } else {
            Expect::Pass
        };
        Case {
            source: Source::Other,
            frame,
            ingress,
            expect,
            description,
        }
    }

    /// A neighbour solicitation for the VIP, an advertisement, a router solicitation or an
    /// MLD report (behind a hop-by-hop router alert): what an IPv6 link carries, for the kernel.
    fn neighbour_discovery(&mut self, client: IpAddr) -> (Vec<u8>, String) {
        let link_local = IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 0x99]);
        let src = self.rng.pick(&[client, link_local]);
        let vip = host(Family::V6, 1, 1);
        let solicited = IpAddr::from([0xff02, 0, 0, 0, 0, 1, 0xff00, 1]);
        let all_routers = IpAddr::from([0xff02, 0, 0, 0, 0, 0, 0, 2]);
        let mld_routers = IpAddr::from([0xff02, 0, 0, 0, 0, 0, 0, 0x16]);
        let (dst, kind, mut body, extensions, what) = match self.rng.below(4) {
            0 => (
                solicited,
                135,
                octets(vip),
                Vec::new(),
                "neighbour solicitation",
            ),
            1 => (vip, 136, octets(src), Vec::new(), "neighbour advertisement"),
            2 => (
                all_routers,
                133,
                Vec::new(),
                Vec::new(),
                "router solicitation",
            ),
            _ => {
                // A hop-by-hop header with a router alert (type 5), then PadN.
                let alert = Extension {
                    kind: HOP_BY_HOP,
                    bytes: vec![0, 0, 5, 2, 0, 0, 1, 0],
                };
                let mut record = vec![4, 0, 0, 1];
                record.extend(octets(solicited));
                (mld_routers, 143, record, vec![alert], "MLDv2 report")
            }
        };
        let mut message = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        message.append(&mut body);
        let chain = extension_chain(&extensions, ICMPV6);
        let first = extensions.first().map_or(ICMPV6, |header| header.kind);
        let mut frame = ethernet_for(Family::V6, PUB_MAC, neighbour_mac(client), &[]);
        let hops = if extensions.is_empty() { 255 } else { 1 };
        frame.extend(ipv6_header(
            src,
            dst,
            first,
            chain.len() + message.len(),
            hops,
        ));
        frame.extend(chain);
        frame.extend(message);
        refresh_checksums(&mut frame);
        (frame, format!("{what} from {src} to {dst}"))
    }

    /// Random bytes, sometimes behind an IPv4 or IPv6 EtherType and version.
    fn garbage(&mut self) -> Case {
        let len = if self.rng.chance(50) {
            self.rng.below(100)
        } else {
            self.rng.below(MAX_FRAME_LEN + 1)
        };
        let mut frame = self.rng.bytes(len);
        if frame.len() >= 15 && self.rng.chance(40) {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            if self.rng.chance(50) {
                frame[14] = 0x45;
            }
        } else if frame.len() >= 15 && self.rng.chance(40) {
            frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            if self.rng.chance(50) {
                frame[14] = 0x60;
            }
        }
        let ingress = if self.rng.chance(50) {
            Interface::Public
        } else {
            Interface::Backend
        };
        Case {
            source: Source::Garbage,
            frame,
            ingress,
            expect: Expect::Any,
            description: format!("{len} random bytes"),
        }
    }

    /// An IPv6 client packet for a service whose extension headers decide its verdict: a full
    /// chain of six (translated), one header more than the datapath walks or a routing header
    /// with segments left (passed), a fragment header (an atomic one: translated; a first
    /// fragment: translated, or passed when another extension header follows it; a later
    /// one: the same pass, else by the 3-tuple policy or dropped as an orphan), a chain cut
    /// short by the payload length (dropped for a VIP, passed for another address), or a UDP
    /// datagram without a checksum (dropped, RFC 8200).
    fn extensions(&mut self, world: &World, model: &Model) -> Case {
        let tuple = self.new_conversation_in(world, Family::V6);
        let flags = if tuple.protocol == protocol::TCP {
            TCP_SYN
        } else {
            0
        };
        let mut spec = self.spec(tuple, neighbour_mac(tuple.src), PUB_MAC, flags);
        let rng = &mut self.rng;
        let count = 1 + rng.below(MAX_EXTENSION_HEADERS);
        spec.extensions = (0..count)
            .map(|i| Extension::any_translatable(rng, i == 0))
            .collect();
        // Where a header that decides the verdict goes, within the six the datapath walks.
        let at = rng.below(count.min(MAX_EXTENSION_HEADERS - 1) + 1);
        let (what, expect) = match rng.below(6) {
            0 => {
                while spec.extensions.len() < MAX_EXTENSION_HEADERS {
                    spec.extensions
                        .push(Extension::any_translatable(rng, false));
                }
                (
                    "six extension headers".to_string(),
                    Expect::Sent("a chain of six extension headers is walked"),
                )
            }
            1 => {
                while spec.extensions.len() <= MAX_EXTENSION_HEADERS {
                    spec.extensions
                        .push(Extension::any_translatable(rng, false));
                }
                (
                    format!("{} extension headers", spec.extensions.len()),
                    Expect::Pass,
                )
            }
            2 => {
                let via = host(Family::V6, 2, 10);
                let segments_left = 1 + rng.below(3) as u8;
                spec.extensions.truncate(MAX_EXTENSION_HEADERS - 1);
                spec.extensions
                    .insert(at, Extension::routing(segments_left, via));
                let what = format!("a routing header with {segments_left} segments left");
                (what, Expect::Pass)
            }
            3 => {
                let (offset, more) = match rng.below(4) {
                    0 => (0, true),
                    1 => (1 + rng.below(100) as u16, true),
                    2 => (1 + rng.below(100) as u16, false),
                    _ => (0, false),
                };
                let id = rng.next() as u32;
                spec.extensions.truncate(MAX_EXTENSION_HEADERS - 1);
                spec.extensions
                    .insert(at, Extension::fragment(offset, more, id));
                let what = format!("a fragment header (offset {offset}, more {more})");
                let expect = if offset == 0 && !more {
                    Expect::Sent("an atomic fragment is a whole packet, balanced")
                } else if at + 1 < spec.extensions.len() {
                    // The datapath tracks a fragment only with TCP or UDP right after its
                    // fragment header.
                    Expect::Pass
                } else if offset == 0 {
                    Expect::Sent("a first fragment with its transport header, for a service")
                } else if world
                    .three_tuple_service(tuple.dst, tuple.protocol)
                    .is_some()
                {
                    Expect::Sent("a later fragment without a first one, by the 3-tuple policy")
                } else {
                    // A fresh random identification: no first fragment of its datagram came.
                    Expect::Drop("a later fragment without its first one, and no 3-tuple policy")
                };
                (what, expect)
            }
            4 => {
                spec.pad = None;
                let fixed = spec.ip_packet().len() - spec.payload.len();
                spec.payload.truncate(MAX_IP_LEN.saturating_sub(fixed));
                let mut frame = spec.frame(rng);
                let l3 = frame.len() - spec.ip_packet().len();
                let chain_len = extension_chain(&spec.extensions, 0).len();
                // Cut inside the chain: the payload length and the frame end there.
                let cut = rng.below(chain_len);
                frame.truncate(l3 + 40 + cut);
                set_u16(&mut frame, l3 + 4, cut as u16);
                let to_vip = rng.chance(70);
                if !to_vip {
                    put_addr(&mut frame, l3 + 24, host(Family::V6, 1, 99));
                }
                let expect = if to_vip {
                    Expect::Drop("an extension header cut short, to a VIP")
                } else {
                    Expect::Pass
                };
                return Case {
                    source: Source::Extensions,
                    frame,
                    ingress: Interface::Public,
                    expect,
                    description: format!(
                        "client {tuple} with {count} extension headers cut after {cut} bytes{}",
                        if to_vip { "" } else { ", to another host" }
                    ),
                };
            }
            _ => {
                spec.extensions.truncate(rng.below(3));
                let mut case = self.zero_udp_checksum(world, model);
                case.source = Source::Extensions;
                return case;
            }
        };
        // Headers added above take room from the payload: the packet stays within the MTU.
        let fixed = spec.ip_packet().len() - spec.payload.len();
        spec.payload.truncate(MAX_IP_LEN.saturating_sub(fixed));
        Case {
            source: Source::Extensions,
            frame: spec.frame(&mut self.rng),
            ingress: Interface::Public,
            expect,
            description: format!("client {tuple} {} with {what}", flag_names(flags)),
        }
    }

    /// An IPv6 UDP datagram without a checksum, to a service or from a backend of a flow: the
    /// datapath drops it (RFC 8200 makes the checksum mandatory).
    fn zero_udp_checksum(&mut self, world: &World, model: &Model) -> Case {
        let is_reply =
            |tuple: &&Tuple| tuple.protocol == protocol::UDP && Family::of(tuple.src) == Family::V6;
        let replies: Vec<Tuple> = model
            .replies
            .iter()
            .rev()
            .take(256)
            .filter(is_reply)
            .copied()
            .collect();
        let (tuple, ingress, expect, what) = match self.rng.pick_recent(&replies) {
            Some(reply) if self.rng.chance(50) => (
                reply,
                Interface::of(reply.src).expect("backends are on the two subnets"),
                if model.complete() {
                    Expect::Drop("an IPv6 UDP reply without a checksum")
                } else {
                    Expect::Any
                },
                "reply",
            ),
            _ => {
                let services = world.of_family(Family::V6);
                let udp: Vec<&&Service> = services
                    .iter()
                    .filter(|service| service.protocol == protocol::UDP)
                    .collect();
                let service = udp[self.rng.below(udp.len())];
                let tuple = Tuple {
                    src: host(Family::V6, 1, 2 + self.rng.below(40) as u8),
                    dst: service.vip,
                    src_port: 1024 + self.rng.below(64512) as u16,
                    dst_port: service.port,
                    protocol: protocol::UDP,
                };
                let expect = Expect::Drop("an IPv6 UDP datagram without a checksum, to a service");
                (tuple, Interface::Public, expect, "client")
            }
        };
        let spec = self.spec(tuple, neighbour_mac(tuple.src), ingress.mac(), 0);
        let mut frame = spec.frame(&mut self.rng);
        if let Some(packet) = Packet::parse(&frame) {
            set_u16(&mut frame, packet.check_offset(), 0);
        }
        Case {
            source: Source::Client,
            frame,
            ingress,
            expect,
            description: format!("{what} {tuple} without a UDP checksum"),
        }
    }

    /// A valid frame with one to three fields changed, its checksums mostly made right again,
    /// then sometimes cut, extended or given a wrong checksum.
    fn mutated(&mut self, world: &World, model: &Model) -> Case {
        let mut case = match self.rng.below(100) {
            0..=54 => self.client(world),
            55..=79 => self.reply(model).unwrap_or_else(|| self.client(world)),
            80..=89 => self
                .icmp_error(world, model)
                .unwrap_or_else(|| self.client(world)),
            _ => self.other(world, model),
        };
        let mut changes = Vec::new();
        for _ in 0..1 + self.rng.below(3) {
            changes.push(self.mutate_field(&mut case, world));
        }
        if self.rng.chance(80) {
            refresh_checksums(&mut case.frame);
        } else {
            changes.push("checksums left stale".to_string());
        }
        if self.rng.chance(25) {
            changes.push(self.mutate_after(&mut case.frame));
        }
        case.frame.truncate(MAX_FRAME_LEN);
        case.source = Source::Mutated;
        case.expect = Expect::Any;
        case.description = format!("{}; then {}", case.description, changes.join(", "));
        case
    }

    /// Changes one field (or inserts a header) and says what it did.
    fn mutate_field(&mut self, case: &mut Case, world: &World) -> String {
        let (ip, family) = ip_offset(&case.frame).unwrap_or((ETHERNET_LEN, Family::V4));
        let slot = self.rng.below(18);
        // The fields of the IP header (and the addresses) differ by family; the link layer,
        // the transport header and the interface do not.
        if family == Family::V6 && [2, 3, 4, 5, 6, 13, 15, 17].contains(&slot) {
            return self.mutate_ipv6(case, ip);
        }
        let rng = &mut self.rng;
        let frame = &mut case.frame;
        let l4 = match family {
            Family::V4 => {
                ip + frame
                    .get(ip)
                    .map_or(20, |byte| usize::from(byte & 0x0f) * 4)
            }
            Family::V6 => ipv6_l4(frame, ip),
        };
        match slot {
            0 => {
                let flips = 1 + rng.below(4);
                for _ in 0..flips {
                    let span = if rng.chance(70) {
                        ip + 120
                    } else {
                        frame.len()
                    };
                    let offset = rng.below(span.min(frame.len()).max(1));
                    if let Some(byte) = frame.get_mut(offset) {
                        *byte ^= 1 << rng.below(8);
                    }
                }
                format!("{flips} bits flipped")
            }
            1 => {
                let offset = rng.below(frame.len().max(1));
                let value = rng.byte();
                set(frame, offset, value);
                format!("byte {offset} = {value:#04x}")
            }
            2 => {
                let ihl = rng.below(16) as u8;
                let version = frame.get(ip).map_or(0, |byte| byte & 0xf0);
                set(frame, ip, version | ihl);
                format!("IHL {ihl}")
            }
            3 => {
                let version = rng.below(16) as u8;
                let ihl = frame.get(ip).map_or(0, |byte| byte & 0x0f);
                set(frame, ip, ihl | version << 4);
                format!("IP version {version}")
            }
            4 => {
                let actual = frame.len().saturating_sub(ip);
                let header = l4 - ip;
                let length = match rng.below(8) {
                    0 => 0,
                    1 => rng.below(65536),
                    2 => actual + 1 + rng.below(64),
                    3 => actual.saturating_sub(1 + rng.below(8)),
                    4 => header,
                    5 => header + rng.below(20),
                    6 => 0xffff,
                    _ => MAX_IP_LEN + 1 + rng.below(100),
                };
                set_u16(frame, ip + 2, length as u16);
                format!("total length {length} (actual {actual})")
            }
            5 => {
                let fragment: u16 = match rng.below(5) {
                    0 => 0x2000,                            // more fragments
                    1 => 1 + rng.below(0x1fff) as u16,      // an offset
                    2 => 0x2000 | rng.below(0x2000) as u16, // both
                    3 => 0x4000,                            // don't fragment only
                    _ => 0x8000 | rng.below(0x8000) as u16, // the reserved bit and more
                };
                set_u16(frame, ip + 6, fragment);
                format!("fragment field {fragment:#06x}")
            }
            6 => {
                let random = rng.byte();
                let value = rng.pick(&[protocol::TCP, protocol::UDP, 1, 0, 41, 132, random]);
                set(frame, ip + 9, value);
                format!("protocol {value}")
            }
            7 => {
                let ether_type = rng.pick(&[0x0806, 0x86dd, 0x8100, 0x88a8, 0x9100, 0x0800, 0]);
                set_u16(frame, ip - 2, ether_type);
                format!("EtherType before the IP header {ether_type:#06x}")
            }
            8 => {
                let mut tags = vec![0x81, 0x00, rng.byte() & 0x0f, rng.byte()];
                if rng.chance(40) {
                    tags.splice(0..0, [0x88, 0xa8, rng.byte() & 0x0f, rng.byte()]);
                }
                let at = frame.len().min(12);
                frame.splice(at..at, tags.iter().copied());
                format!("{} VLAN tag(s) more", tags.len() / VLAN_TAG_LEN)
            }
            9 => {
                let offset = rng.below(16) as u8;
                set(frame, l4 + 12, offset << 4);
                format!("TCP data offset {offset}")
            }
            10 => {
                let flags = rng.byte();
                set(frame, l4 + 13, flags);
                format!("TCP flags {}", flag_names(flags))
            }
            11 => {
                let random = rng.u16();
                let length = rng.pick(&[0, 1, 7, 8, random, 0xffff]);
                set_u16(frame, l4 + 4, length);
                format!("UDP length {length}")
            }
            12 => {
                let service = &world.services[rng.below(world.services.len())];
                let random = rng.u16();
                let port = rng.pick(&[service.port, random, 0, 80, 53]);
                let (offset, side) = if rng.chance(70) {
                    (l4 + 2, "destination")
                } else {
                    (l4, "source")
                };
                set_u16(frame, offset, port);
                format!("{side} port {port}")
            }
            13 => {
                let (random_public, random_backend) = (rng.byte(), rng.byte());
                let addr = rng.pick(&[
                    VIP,
                    [10, 200, 1, 50],
                    CLIENT,
                    BACKEND_A,
                    BACKEND_B,
                    ONE_ARMED_BACKEND,
                    [10, 200, 2, 1],
                    [10, 200, 1, 255],
                    [10, 200, 1, 0],
                    [0, 0, 0, 0],
                    [255, 255, 255, 255],
                    [127, 0, 0, 1],
                    [224, 0, 0, 1],
                    [8, 8, 8, 8],
                    [10, 200, 1, random_public],
                    [10, 200, 2, random_backend],
                ]);
                let (offset, side) = match rng.below(4) {
                    0 | 1 => (ip + 16, "destination"),
                    2 => (ip + 12, "source"),
                    // In an ICMP error, the quoted packet's source.
                    _ => (l4 + 8 + 12, "quoted source"),
                };
                put_addr(frame, offset, IpAddr::from(addr));
                format!("{side} address {}", IpAddr::from(addr))
            }
            14 => {
                case.ingress = case.ingress.other();
                format!("sent on {}", case.ingress.name())
            }
            15 => insert_ip_options(rng, frame, ip),
            16 => {
                let mac = rng.pick(&[
                    [0xff; 6],
                    [0x01, 0, 0x5e, 0, 0, 1],
                    [0x02, 0, 0, 0, 0, 0x99],
                ]);
                let offset = rng.pick(&[0, 6]);
                for (i, byte) in mac.iter().enumerate() {
                    set(frame, offset + i, *byte);
                }
                format!("MAC at {offset} = {mac:02x?}")
            }
            _ => {
                let random = rng.byte();
                let (offset, value) = rng.pick(&[(ip + 8, 0), (ip + 8, 1), (ip + 1, random)]);
                set(frame, offset, value);
                set_u16(frame, ip + 4, rng.u16());
                format!("byte {offset} = {value}, new IP id")
            }
        }
    }

    /// Changes one field of an IPv6 frame's network layer (the fixed header, the extension
    /// headers, the addresses) and says what it did; `ip` is where the fixed header starts.
    fn mutate_ipv6(&mut self, case: &mut Case, ip: usize) -> String {
        let rng = &mut self.rng;
        let frame = &mut case.frame;
        let l4 = ipv6_l4(frame, ip);
        let next_header = |rng: &mut Rng| {
            let random = rng.byte();
            rng.pick(&[
                protocol::TCP,
                protocol::UDP,
                ICMPV6,
                HOP_BY_HOP,
                ROUTING,
                FRAGMENT,
                AUTHENTICATION,
                DESTINATION_OPTIONS,
                NO_NEXT_HEADER,
                41,
                random,
            ])
        };
        match rng.below(10) {
            0 => {
                let version = rng.below(16) as u8;
                let low = frame.get(ip).map_or(0, |byte| byte & 0x0f);
                set(frame, ip, version << 4 | low);
                format!("IP version {version}")
            }
            1 => {
                let (class, flow) = (rng.byte(), rng.next() as u32 & 0xf_ffff);
                set(frame, ip, 0x60 | class >> 4);
                set(frame, ip + 1, class << 4 | (flow >> 16) as u8);
                set_u16(frame, ip + 2, flow as u16);
                format!("traffic class {class:#04x}, flow label {flow:#x}")
            }
            2 => {
                let actual = frame.len().saturating_sub(ip + 40);
                let headers = l4.saturating_sub(ip + 40);
                let length = match rng.below(8) {
                    0 => 0,
                    1 => rng.below(65536),
                    2 => actual + 1 + rng.below(64),
                    3 => actual.saturating_sub(1 + rng.below(8)),
                    4 => headers,
                    5 => headers + rng.below(20),
                    6 => rng.below(headers + 1),
                    _ => MAX_IP_LEN - 40 + 1 + rng.below(100),
                };
                set_u16(frame, ip + 4, length as u16);
                format!("payload length {length} (actual {actual})")
            }
            3 => {
                // The fixed header's next header, or the first extension header's.
                let value = next_header(rng);
                let (offset, which) = if l4 > ip + 40 && rng.chance(50) {
                    (ip + 40, "first extension header's")
                } else {
                    (ip + 6, "fixed header's")
                };
                set(frame, offset, value);
                format!("{which} next header {value}")
            }
            4 => {
                let value = rng.pick(&[0, 1, 255]);
                set(frame, ip + 7, value);
                format!("hop limit {value}")
            }
            5 => {
                let random = rng.byte();
                let addr = rng.pick(&[
                    host(Family::V6, 1, 1),
                    host(Family::V6, 1, 50),
                    host(Family::V6, 1, 2),
                    host(Family::V6, 2, 10),
                    host(Family::V6, 2, 11),
                    host(Family::V6, 1, 20),
                    host(Family::V6, 2, 1),
                    host(Family::V6, 1, 0),
                    host(Family::V6, 1, 255),
                    host(Family::V6, 1, random),
                    host(Family::V6, 2, random),
                    IpAddr::from([0u8; 16]),
                    IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16]),
                    IpAddr::from([0xff02, 0, 0, 0, 0, 0, 0, 1u16]),
                    IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1u16]),
                    IpAddr::from([0xfd00, 0x200, 0, 0, 3, 0, 0, 1u16]),
                ]);
                let (offset, side) = match rng.below(4) {
                    0 | 1 => (ip + 24, "destination"),
                    2 => (ip + 8, "source"),
                    // In an ICMPv6 error, the quoted packet's source.
                    _ => (l4 + 8 + 8, "quoted source"),
                };
                put_addr(frame, offset, addr);
                format!("{side} address {addr}")
            }
            6 => {
                // One header more at the chain's start, the payload length in step.
                let header = match rng.below(4) {
                    0 => Extension::routing(1 + rng.below(2) as u8, host(Family::V6, 2, 10)),
                    1 => Extension::fragment(rng.below(4) as u16, rng.chance(50), rng.u16().into()),
                    _ => Extension::any_translatable(rng, true),
                };
                let (Some(&next), Some(length)) = (frame.get(ip + 6), frame.get(ip + 4..ip + 6))
                else {
                    return "extension header (no IPv6 header)".to_string();
                };
                if frame.len() < ip + 40 {
                    return "extension header (a cut IPv6 header)".to_string();
                }
                let length = u16::from_be_bytes([length[0], length[1]]);
                let mut bytes = header.bytes.clone();
                bytes[0] = next;
                let added = bytes.len();
                // Within the MTU, as IPv4 options are inserted: a longer packet cannot arrive.
                if 40 + usize::from(length) + added > MAX_IP_LEN {
                    return "extension header (no room)".to_string();
                }
                frame.splice(ip + 40..ip + 40, bytes);
                frame[ip + 6] = header.kind;
                set_u16(frame, ip + 4, length.wrapping_add(added as u16));
                format!("extension header {} inserted", header.kind)
            }
            7 => {
                // An extension header's length byte, or a routing header's segments left.
                let random = rng.byte();
                let (offset, value) = if rng.chance(70) {
                    (ip + 41, rng.pick(&[0, 1, 2, 255, random]))
                } else {
                    (ip + 43, rng.pick(&[0, 1, random]))
                };
                set(frame, offset, value);
                format!("byte {} of the chain = {value}", offset - ip - 40)
            }
            8 => {
                // The packet ends inside its extension headers (or right after them).
                let headers = l4.saturating_sub(ip + 40);
                let cut = rng.below(headers + 1);
                frame.truncate(ip + 40 + cut);
                set_u16(frame, ip + 4, cut as u16);
                format!("cut after {cut} of {headers} bytes of extension headers")
            }
            _ => {
                let random = rng.byte();
                let (offset, value) = rng.pick(&[(ip + 7, 0), (ip + 7, 1), (ip + 1, random)]);
                set(frame, offset, value);
                format!("byte {offset} = {value}")
            }
        }
    }

    /// A change made after the checksums: a cut, trailing bytes, or a wrong checksum.
    fn mutate_after(&mut self, frame: &mut Vec<u8>) -> String {
        let rng = &mut self.rng;
        match rng.below(6) {
            0..=1 => {
                let len = rng.below(frame.len() + 1);
                frame.truncate(len);
                format!("cut to {len} bytes")
            }
            2 => {
                let extra = 1 + rng.below(64);
                frame.extend(rng.bytes(extra));
                format!("{extra} bytes appended")
            }
            3 if ipv4_offset(frame).is_some() => {
                let xor = 1 + rng.below(0xffff) as u16;
                let ip = ipv4_offset(frame).unwrap_or(ETHERNET_LEN);
                xor_u16(frame, ip + 10, xor);
                format!("IPv4 checksum ^ {xor:#06x}")
            }
            3 | 4 => {
                let xor = 1 + rng.below(0xffff) as u16;
                if let Some(packet) = Packet::parse(frame) {
                    xor_u16(frame, packet.check_offset(), xor);
                }
                format!("transport checksum ^ {xor:#06x}")
            }
            _ => {
                if let Some(packet) = Packet::parse(frame) {
                    if packet.protocol == protocol::UDP {
                        set_u16(frame, packet.check_offset(), 0);
                    }
                }
                "UDP checksum zeroed".to_string()
            }
        }
    }

    /// A valid frame cut at every length up to past its headers (extension headers included),
    /// in a row.
    fn queue_truncations(&mut self, world: &World, model: &Model) {
        let base = match self.rng.below(10) {
            0..=5 => self.client(world),
            6..=7 => self.reply(model).unwrap_or_else(|| self.client(world)),
            _ => self
                .icmp_error(world, model)
                .unwrap_or_else(|| self.client(world)),
        };
        let chain = ip_offset(&base.frame)
            .filter(|(_, family)| *family == Family::V6)
            .map_or(0, |(ip, _)| ipv6_l4(&base.frame, ip) - ip - 40);
        let lengths = base.frame.len().min(ETHERNET_LEN + 8 + 60 + 60 + 8 + chain);
        for len in 0..lengths {
            self.queued.push_back(Case {
                source: Source::Truncated,
                frame: base.frame[..len].to_vec(),
                ingress: base.ingress,
                expect: Expect::Any,
                description: format!("{} cut to {len} bytes", base.description),
            });
        }
    }
}

/// Where the transport header of the IPv6 packet at `ip` starts, by the datapath's walk; right
/// after the fixed header if the walk does not get there.
fn ipv6_l4(frame: &[u8], ip: usize) -> usize {
    if frame.len() < ip + 40 {
        return ip + 40;
    }
    let packet_end = ip + 40 + usize::from(u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]));
    match ipv6_walk(frame, ip, packet_end.max(frame.len())) {
        Walk::Transport { l4, .. } => l4,
        _ => ip + 40,
    }
}

/// A whole IPv4 frame as two fragments, the first carrying `first_len` bytes of its payload,
/// the second the rest from `later_from` on (both multiples of 8; `later_from` above
/// `first_len` leaves a fragment out); header checksums recomputed, the transport checksum left
/// as it was (it covers the whole datagram).
fn split_in_two(frame: &[u8], first_len: usize, later_from: usize) -> [Vec<u8>; 2] {
    let l3 = ipv4_offset(frame).expect("an IPv4 frame");
    let header_len = usize::from(frame[l3] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    let payload = &frame[l3 + header_len..l3 + total_len];
    let piece = |from: usize, to: usize| {
        let mut out = frame[..l3 + header_len].to_vec();
        set_u16(&mut out, l3 + 2, (header_len + to - from) as u16);
        let more = if to < payload.len() { 0x2000 } else { 0 };
        set_u16(&mut out, l3 + 6, more | (from / 8) as u16);
        let sum = ip_sum(&out, l3, header_len, true);
        set_u16(&mut out, l3 + 10, sum);
        out.extend_from_slice(&payload[from..to]);
        out
    };
    [piece(0, first_len), piece(later_from, payload.len())]
}

/// A whole IPv6 frame (no fragment header yet; `extensions` is its chain) as two fragments
/// (RFC 8200, 4.5): each keeps the fixed header and the chain, then a fragment header with
/// `next` (the transport's protocol, or something else), the offset, M and `id`; the first
/// carries `cut.0` bytes of the rest (the transport header on), the second the rest from
/// `cut.1` on, as in [`split_in_two`]. Payload lengths are set; the transport checksum is left
/// as it was (it covers the whole datagram).
fn split_in_two6(
    frame: &[u8],
    extensions: &[Extension],
    next: u8,
    cut: (usize, usize),
    id: u32,
) -> [Vec<u8>; 2] {
    let (l3, _) = ip_offset(frame).expect("an IPv6 frame");
    let chain: Vec<usize> = extensions.iter().map(|header| header.bytes.len()).collect();
    let l4 = l3 + 40 + chain.iter().sum::<usize>();
    // The next-header field that names the fragment header: the last extension's, or the
    // fixed header's.
    let names_fragment = match chain.split_last() {
        Some((_, before)) => l3 + 40 + before.iter().sum::<usize>(),
        None => l3 + 6,
    };
    let rest = &frame[l4..];
    let piece = |from: usize, to: usize| {
        let mut out = frame[..l4].to_vec();
        out[names_fragment] = FRAGMENT;
        let more = u16::from(to < rest.len());
        let fragment = Extension::fragment((from / 8) as u16, more != 0, id);
        out.extend_from_slice(&extension_chain(&[fragment], next));
        out.extend_from_slice(&rest[from..to]);
        let payload_len = out.len() - l3 - 40;
        set_u16(&mut out, l3 + 4, payload_len as u16);
        out
    };
    [piece(0, cut.0), piece(cut.1, rest.len())]
}

/// IPv4 options of one to ten words: no-operations behind a router alert, or random bytes.
fn ip_options(rng: &mut Rng) -> Vec<u8> {
    let words = 1 + rng.below(10);
    if rng.chance(20) {
        return rng.bytes(words * 4);
    }
    let mut options = vec![0x94, 0x04, 0x00, 0x00];
    options.resize(words * 4, 1);
    options
}

/// TCP options as a SYN or a segment carries them, sometimes with random bytes.
fn tcp_options(rng: &mut Rng) -> Vec<u8> {
    let mut options = Vec::new();
    if rng.chance(60) {
        options.extend_from_slice(&[2, 4, 0x05, 0xb4]);
    }
    if rng.chance(50) {
        options.extend_from_slice(&[1, 3, 3, rng.below(15) as u8]);
    }
    if rng.chance(50) {
        options.extend_from_slice(&[4, 2]);
    }
    if rng.chance(50) {
        options.extend_from_slice(&[8, 10]);
        options.extend(rng.bytes(8));
    }
    if rng.chance(10) {
        let len = 1 + rng.below(8);
        options.extend(rng.bytes(len));
    }
    while options.len() % 4 != 0 {
        options.push(0);
    }
    options
}

/// Grows the IPv4 header at `ip` by whole words of options, keeping the total length in step.
fn insert_ip_options(rng: &mut Rng, frame: &mut Vec<u8>, ip: usize) -> String {
    let (Some(&version_ihl), Some(total_len)) = (frame.get(ip), frame.get(ip + 2..ip + 4)) else {
        return "IP options (no IP header)".to_string();
    };
    let total_len = usize::from(u16::from_be_bytes([total_len[0], total_len[1]]));
    let ihl = usize::from(version_ihl & 0x0f);
    if ihl >= 15 || ip + ihl * 4 > frame.len() || total_len + 4 > MAX_IP_LEN {
        return "IP options (no room)".to_string();
    }
    let words = (1 + rng.below(15 - ihl)).min((MAX_IP_LEN - total_len) / 4);
    let options = if rng.chance(50) {
        vec![1; words * 4]
    } else {
        rng.bytes(words * 4)
    };
    let at = ip + ihl * 4;
    frame.splice(at..at, options);
    frame[ip] = (version_ihl & 0xf0) | (ihl + words) as u8;
    set_u16(frame, ip + 2, (total_len + words * 4) as u16);
    format!("{words} words of IP options inserted")
}

/// A 20-byte IPv4 header for `payload_len` bytes of `protocol`; checksum left at zero.
fn ipv4_header(src: IpAddr, dst: IpAddr, protocol: u8, payload_len: usize) -> Vec<u8> {
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0, 64, protocol, 0, 0]);
    header.extend(octets(src));
    header.extend(octets(dst));
    header
}

fn arp_request(sender: IpAddr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&neighbour_mac(sender));
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&neighbour_mac(sender));
    frame.extend(octets(sender));
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&VIP);
    frame.resize(60, 0);
    frame
}

/// An IPv4 packet of another protocol (an ICMP echo request when 1), checksums right.
fn ipv4_other(rng: &mut Rng, src: IpAddr, dst: IpAddr, protocol: u8) -> Vec<u8> {
    let mut body = if protocol == protocol::ICMP {
        vec![8, 0, 0, 0, 0, 1, 0, 1]
    } else {
        Vec::new()
    };
    let len = rng.below(64);
    body.extend(rng.bytes(len));
    let mut frame = ethernet(PUB_MAC, neighbour_mac(src), &[]);
    frame.extend(ipv4_header(src, dst, protocol, body.len()));
    frame.extend(body);
    refresh_checksums(&mut frame);
    frame
}

/// An IPv6 packet of another next header (an ICMPv6 echo request when 58), checksums right.
fn ipv6_other(rng: &mut Rng, src: IpAddr, dst: IpAddr, next: u8) -> Vec<u8> {
    let mut body = match next {
        ICMPV6 => vec![128, 0, 0, 0, 0, 1, 0, 1],
        NO_NEXT_HEADER => Vec::new(),
        _ => rng.bytes(8),
    };
    if next != NO_NEXT_HEADER {
        let len = rng.below(64);
        body.extend(rng.bytes(len));
    }
    let mut frame = ethernet_for(Family::V6, PUB_MAC, neighbour_mac(src), &[]);
    frame.extend(ipv6_header(src, dst, next, body.len(), 64));
    frame.extend(body);
    refresh_checksums(&mut frame);
    frame
}

/// A router on the side of `interface` that sends ICMP errors.
fn router(family: Family, interface: Interface) -> IpAddr {
    match interface {
        Interface::Public => host(family, 1, 254),
        Interface::Backend => host(family, 2, 254),
    }
}

fn set(frame: &mut [u8], offset: usize, value: u8) {
    if let Some(byte) = frame.get_mut(offset) {
        *byte = value;
    }
}

fn set_u16(frame: &mut [u8], offset: usize, value: u16) {
    if let Some(field) = frame.get_mut(offset..offset + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

fn xor_u16(frame: &mut [u8], offset: usize, xor: u16) {
    if let Some(field) = frame.get(offset..offset + 2) {
        let value = u16::from_be_bytes([field[0], field[1]]) ^ xor;
        set_u16(frame, offset, value);
    }
}

fn flag_names(flags: u8) -> String {
    let names = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    let set: Vec<&str> = (0..8)
        .filter(|bit| flags & (1 << bit) != 0)
        .map(|bit| names[bit])
        .collect();
    set.join("|")
}

fn vlan_note(spec: &Spec) -> &'static str {
    match spec.vlan.len() / VLAN_TAG_LEN {
        0 => "",
        1 => " (802.1Q tag)",
        _ => " (802.1ad and 802.1Q tags)",
    }
}

// ---------------------------------------------------------------------------------------------
// Reading frames, and checksums recomputed with etherparse.

/// Where the IP header starts, and its family: after the Ethernet header and up to two VLAN
/// tags (802.1Q or 802.1ad, in either position, as the datapath steps over them), if the
/// EtherType then says IPv4 or IPv6.
fn ip_offset(frame: &[u8]) -> Option<(usize, Family)> {
    let mut offset = ETHERNET_LEN;
    for _ in 0..3 {
        match frame.get(offset - 2..offset)? {
            [0x08, 0x00] => return Some((offset, Family::V4)),
            [0x86, 0xdd] => return Some((offset, Family::V6)),
            [0x81, 0x00] | [0x88, 0xa8] => offset += VLAN_TAG_LEN,
            _ => return None,
        }
    }
    None
}

/// Where the IPv4 header starts (see [`ip_offset`]).
fn ipv4_offset(frame: &[u8]) -> Option<usize> {
    ip_offset(frame).and_then(|(offset, family)| (family == Family::V4).then_some(offset))
}

/// Where the datapath's walk over an IPv6 packet's extension headers ends.
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    /// At the transport (or ICMPv6, or any other) header `next`, at `l4`; `fragment` if a
    /// fragment header other than an atomic one was stepped over.
    Transport {
        l4: usize,
        next: u8,
        fragment: Option<Fragment6>,
    },
    /// More extension headers than the datapath walks: passed.
    TooLong,
    /// A routing header with segments left: passed.
    SegmentsLeft,
    /// A fragment header the datapath does not track: a second one in the chain, or one not
    /// followed by TCP or UDP. Passed, whatever comes after.
    UntrackedFragment,
    /// A header past the frame, or the chain past the packet's end: dropped for a VIP,
    /// passed otherwise.
    CutShort,
}

/// A fragment header (RFC 8200, 4.5) with an offset or the M flag set: a real fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fragment6 {
    /// In 8-byte units.
    offset: u16,
    more: bool,
    id: u32,
}

impl Fragment6 {
    /// The same facts as IPv4's flags and fragment offset field (MF 0x2000, offset in the low
    /// 13 bits), so that one model serves both families.
    fn as_ipv4_field(self) -> u16 {
        u16::from(self.more) << 13 | self.offset
    }
}

fn is_extension(next: u8) -> bool {
    matches!(
        next,
        HOP_BY_HOP | ROUTING | FRAGMENT | AUTHENTICATION | DESTINATION_OPTIONS
    )
}

/// The datapath's walk (lb-ebpf/src/ipv6.rs) over the extension headers of the IPv6 packet at
/// `l3`, which ends at `packet_end`: at most six headers, each by its own length rule, each
/// read only if its first 8 bytes are in the frame. An atomic fragment header (offset 0, M
/// clear) is stepped over like any other; a real one must be the only one and be followed by
/// TCP or UDP, and after a later fragment's (offset > 0) the walk stops: the rest is the
/// middle of the datagram.
fn ipv6_walk(frame: &[u8], l3: usize, packet_end: usize) -> Walk {
    let mut next = frame[l3 + 6];
    let mut offset = l3 + 40;
    let mut fragment = None;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !is_extension(next) {
            break;
        }
        let Some(header) = frame.get(offset..offset + 8) else {
            return Walk::CutShort;
        };
        let header_len = match next {
            FRAGMENT => {
                let word = u16::from_be_bytes([header[2], header[3]]);
                // The two reserved bits between the offset and M are not looked at.
                if word & 0xfff9 != 0 {
                    if fragment.is_some() || ![protocol::TCP, protocol::UDP].contains(&header[0]) {
                        return Walk::UntrackedFragment;
                    }
                    fragment = Some(Fragment6 {
                        offset: word >> 3,
                        more: word & 1 != 0,
                        id: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
                    });
                }
                8
            }
            AUTHENTICATION => (usize::from(header[1]) + 2) * 4,
            ROUTING if header[3] != 0 => return Walk::SegmentsLeft,
            _ => (usize::from(header[1]) + 1) * 8,
        };
        next = header[0];
        offset += header_len;
        if fragment.is_some_and(|fragment| fragment.offset != 0) {
            break;
        }
    }
    if is_extension(next) {
        return Walk::TooLong;
    }
    if offset > packet_end {
        return Walk::CutShort;
    }
    Walk::Transport {
        l4: offset,
        next,
        fragment,
    }
}

/// An IP frame as far as the datapath reads one to translate it: the EtherType after at most
/// two tags; IPv4 with a header of at least 20 bytes inside the frame, or IPv6 with its fixed
/// header inside the frame and extension headers the datapath walks through; then the fixed
/// part of a TCP or UDP header, or an ICMP (ICMPv6) error quoting the IP header and 8 bytes of
/// a TCP or UDP packet, inside the frame. Says nothing about the lengths a receiver would
/// check.
struct Packet {
    family: Family,
    /// Where the IP header starts.
    l3: usize,
    /// From the IP header to the transport header: IPv4 options, IPv6 extension headers.
    header_len: usize,
    /// The IPv4 total length, or the IPv6 payload length plus the fixed header.
    total_len: usize,
    /// IPv4 flags and fragment offset; for IPv6 the same facts from a fragment header (see
    /// [`Fragment6::as_ipv4_field`]), 0 without one or with an atomic one.
    fragment: u16,
    /// The IPv4 identification, or the IPv6 fragment header's; 0 for IPv6 without one.
    fragment_id: u32,
    /// The TCP header's length by its data offset; 0 for anything else.
    tcp_header_len: usize,
    /// The transport protocol (the last next header for IPv6).
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
    layer4: Layer4,
}

enum Layer4 {
    /// TCP or UDP.
    Ports {
        src_port: u16,
        dst_port: u16,
        tcp_flags: u8,
    },
    /// A later fragment (offset > 0) of a TCP or UDP datagram: no transport header.
    LaterFragment,
    /// An ICMP error: where the quoted IP header starts, its length, and the quoted packet's
    /// addresses and ports.
    IcmpError {
        quoted: usize,
        quoted_len: usize,
        tuple: Tuple,
    },
}

impl Packet {
    fn parse(frame: &[u8]) -> Option<Self> {
        let (l3, family) = ip_offset(frame)?;
        let ip = frame.get(l3..)?;
        let word = |bytes: &[u8], at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let (header_len, total_len, fragment, fragment_id, protocol, icmp) = match family {
            Family::V4 => {
                if ip.len() < 20 {
                    return None;
                }
                let header_len = usize::from(ip[0] & 0x0f) * 4;
                if ip[0] >> 4 != 4 || header_len < 20 || header_len > ip.len() {
                    return None;
                }
                let fragment = word(ip, 6);
                let icmp = ip[9] == protocol::ICMP && fragment & 0x3fff == 0;
                let id = u32::from(word(ip, 4));
                (
                    header_len,
                    usize::from(word(ip, 2)),
                    fragment,
                    id,
                    ip[9],
                    icmp,
                )
            }
            Family::V6 => {
                if ip.len() < 40 || ip[0] >> 4 != 6 {
                    return None;
                }
                let total_len = 40 + usize::from(word(ip, 4));
                let Walk::Transport { l4, next, fragment } = ipv6_walk(frame, l3, l3 + total_len)
                else {
                    return None;
                };
                let id = fragment.map_or(0, |fragment| fragment.id);
                let field = fragment.map_or(0, Fragment6::as_ipv4_field);
                (l4 - l3, total_len, field, id, next, next == ICMPV6)
            }
        };
        let (src_at, dst_at) = family.addr_offsets();
        let l4 = ip.get(header_len..)?;
        let layer4 = match protocol {
            protocol::TCP | protocol::UDP if fragment & 0x1fff != 0 => Layer4::LaterFragment,
            protocol::TCP | protocol::UDP => {
                let fixed = if protocol == protocol::TCP { 20 } else { 8 };
                if l4.len() < fixed {
                    return None;
                }
                Layer4::Ports {
                    src_port: word(l4, 0),
                    dst_port: word(l4, 2),
                    tcp_flags: if protocol == protocol::TCP { l4[13] } else { 0 },
                }
            }
            _ if icmp => {
                let kind = *l4.first()?;
                let inner = l4.get(8..)?;
                let (is_error, version, min_len) = match family {
                    Family::V4 => (
                        [ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM]
                            .contains(&kind),
                        4,
                        20,
                    ),
                    Family::V6 => ((1..=4).contains(&kind), 6, 40),
                };
                if !is_error || inner.len() < min_len || inner[0] >> 4 != version {
                    return None;
                }
                let (quoted_len, inner_protocol) = match family {
                    Family::V4 => (usize::from(inner[0] & 0x0f) * 4, inner[9]),
                    // Extension headers in a quoted IPv6 packet are not walked.
                    Family::V6 => (40, inner[6]),
                };
                if quoted_len < 20
                    || ![protocol::TCP, protocol::UDP].contains(&inner_protocol)
                    || inner.len() < quoted_len + 8
                {
                    return None;
                }
                Layer4::IcmpError {
                    quoted: l3 + header_len + 8,
                    quoted_len,
                    tuple: Tuple {
                        src: read_addr(inner, src_at, family),
                        dst: read_addr(inner, dst_at, family),
                        src_port: word(inner, quoted_len),
                        dst_port: word(inner, quoted_len + 2),
                        protocol: inner_protocol,
                    },
                }
            }
            _ => return None,
        };
        Some(Self {
            family,
            l3,
            header_len,
            total_len,
            fragment,
            fragment_id,
            tcp_header_len: match layer4 {
                Layer4::Ports { .. } if protocol == protocol::TCP => usize::from(l4[12] >> 4) * 4,
                _ => 0,
            },
            protocol,
            src: read_addr(ip, src_at, family),
            dst: read_addr(ip, dst_at, family),
            layer4,
        })
    }

    /// Where the source and destination addresses are in the frame.
    fn src_offset(&self) -> usize {
        self.l3 + self.family.addr_offsets().0
    }

    fn dst_offset(&self) -> usize {
        self.l3 + self.family.addr_offsets().1
    }

    fn l4(&self) -> usize {
        self.l3 + self.header_len
    }

    /// The packet's own addresses and ports (TCP and UDP).
    fn tuple(&self) -> Option<Tuple> {
        match self.layer4 {
            Layer4::Ports {
                src_port, dst_port, ..
            } => Some(Tuple {
                src: self.src,
                dst: self.dst,
                src_port,
                dst_port,
                protocol: self.protocol,
            }),
            Layer4::IcmpError { .. } | Layer4::LaterFragment => None,
        }
    }

    /// The datagram a fragment belongs to: source, destination, protocol (IPv6: the fragment
    /// header's next header, which the walk requires to be the transport's), and ID.
    fn datagram(&self) -> (Tuple, u32) {
        let id = self.fragment_id;
        let tuple = Tuple {
            src: self.src,
            dst: self.dst,
            src_port: 0,
            dst_port: 0,
            protocol: self.protocol,
        };
        (tuple, id)
    }

    /// A first fragment: more fragments follow, offset 0.
    fn is_first_fragment(&self) -> bool {
        self.fragment & 0x3fff == 0x2000
    }

    /// Where the transport (or ICMP) checksum is.
    fn check_offset(&self) -> usize {
        self.l4()
            + match self.protocol {
                protocol::TCP => 16,
                protocol::UDP => 6,
                _ => 2,
            }
    }

    /// Bytes the translated headers need after the IPv4 header.
    fn translated_len(&self) -> usize {
        match self.layer4 {
            Layer4::Ports { .. } if self.protocol == protocol::TCP => 20,
            Layer4::Ports { .. } => 8,
            Layer4::LaterFragment => 0,
            Layer4::IcmpError { quoted_len, .. } => 8 + quoted_len + 8,
        }
    }

    /// Why the kernel's IPv4 input would refuse this packet, or would not see all of the
    /// headers the datapath translated, if it would.
    fn malformation(&self, frame_len: usize) -> Option<String> {
        let available = frame_len - self.l3;
        let family = self.family.name();
        if self.total_len > available {
            return Some(format!(
                "{family} packet length {} exceeds the {available} bytes after the link header",
                self.total_len
            ));
        }
        if self.total_len < self.header_len {
            return Some(format!(
                "{family} packet length {} is shorter than its {}-byte header",
                self.total_len, self.header_len
            ));
        }
        if self.total_len < self.header_len + self.translated_len() {
            return Some(format!(
                "{family} packet length {} ends inside the {} bytes after the {}-byte IP \
                 header that the datapath translated",
                self.total_len,
                self.translated_len(),
                self.header_len
            ));
        }
        if self.is_first_fragment() && self.protocol == protocol::TCP {
            return self.tiny_first_fragment();
        }
        None
    }

    /// Why a first TCP fragment is too short for the datapath (RFC 1858), if it is: its TCP
    /// header, options included, must be whole.
    fn tiny_first_fragment(&self) -> Option<String> {
        let tcp_len = self.tcp_header_len;
        if tcp_len < 20 || self.total_len < self.header_len + tcp_len {
            return Some(format!(
                "a first fragment of {} bytes without its whole {tcp_len}-byte TCP header",
                self.total_len
            ));
        }
        None
    }

    /// The bytes the transport checksum covers, from the transport header to the end of the IP
    /// packet (or of the frame, if the packet claims more), or to the end of the UDP datagram
    /// when its length field is plausible; and the length for the pseudo-header. None when the
    /// checksum field itself is outside.
    fn l4_extent(&self, frame: &[u8]) -> Option<(usize, usize, u16)> {
        let start = self.l4();
        let ip_end = (self.l3 + self.total_len).min(frame.len());
        if ip_end < self.check_offset() + 2 {
            return None;
        }
        if self.protocol == protocol::UDP {
            let udp_len = usize::from(u16::from_be_bytes([frame[start + 4], frame[start + 5]]));
            if udp_len >= 8 && start + udp_len <= ip_end {
                return Some((start, start + udp_len, udp_len as u16));
            }
        }
        Some((start, ip_end, (ip_end - start) as u16))
    }
}

/// The ones'-complement of the sum over an IPv4 header at `l3`, with its checksum field as it
/// is or as zero: 0 (or 0xffff) when the stored checksum is right; the right checksum when
/// zeroed.
fn ip_sum(frame: &[u8], l3: usize, header_len: usize, zero_field: bool) -> u16 {
    let header = &frame[l3..l3 + header_len];
    let field = if zero_field {
        [0, 0]
    } else {
        [header[10], header[11]]
    };
    let sum = Sum16BitWords::new()
        .add_slice(&header[..10])
        .add_2bytes(field)
        .add_slice(&header[12..])
        .ones_complement();
    wire_order(sum)
}

/// As [`ip_sum`], for the transport checksum (TCP, UDP: with the pseudo-header, its addresses
/// read from the frame) or the ICMP checksum (over the whole message).
fn l4_sum(frame: &[u8], packet: &Packet, zero_field: bool) -> Option<u16> {
    let (start, end, len) = packet.l4_extent(frame)?;
    let check = packet.check_offset();
    let field = if zero_field {
        [0, 0]
    } else {
        [frame[check], frame[check + 1]]
    };
    // ICMP has no pseudo-header; ICMPv6 has, like TCP and UDP. The IPv6 pseudo-header's
    // 32-bit length and next header sum as IPv4's 16-bit ones do.
    let pseudo_header = if packet.protocol == protocol::ICMP && packet.family == Family::V4 {
        Sum16BitWords::new()
    } else {
        Sum16BitWords::new()
            .add_slice(addresses(frame, packet))
            .add_2bytes([0, packet.protocol])
            .add_2bytes(len.to_be_bytes())
    };
    let sum = pseudo_header
        .add_slice(&frame[start..check])
        .add_2bytes(field)
        .add_slice(&frame[check + 2..end]);
    Some(wire_order(sum.ones_complement()))
}

/// Replaces a TCP or UDP checksum (not a UDP "none") with the pseudo-header sum.
fn make_partial(frame: &mut [u8]) {
    let Some(packet) = Packet::parse(frame) else {
        return;
    };
    let check = packet.check_offset();
    let is_ports = matches!(packet.layer4, Layer4::Ports { .. });
    if !is_ports || (packet.protocol == protocol::UDP && frame[check..check + 2] == [0, 0]) {
        return;
    }
    if let Some(sum) = pseudo_header_sum(frame, &packet) {
        set_u16(frame, check, sum);
    }
}

/// The folded pseudo-header sum (not complemented) of a TCP or UDP packet, its length from
/// the IP header, as the field of a partial checksum holds it; in network order.
fn pseudo_header_sum(frame: &[u8], packet: &Packet) -> Option<u16> {
    let l3 = packet.l3;
    let mut len = packet.total_len.saturating_sub(packet.header_len) as u16;
    if packet.protocol == protocol::UDP {
        // UDP: the length the header states, if it lies inside the packet (else the datapath
        // has no segment to complete and never takes the checksum for a partial one).
        let l4 = l3 + packet.header_len;
        let udp_len = u16::from_be_bytes(frame.get(l4 + 4..l4 + 6)?.try_into().ok()?);
        if udp_len < 8 || udp_len > len {
            return None;
        }
        len = udp_len;
    }
    let sum = Sum16BitWords::new()
        .add_slice(addresses(frame, packet))
        .add_2bytes([0, packet.protocol])
        .add_2bytes(len.to_be_bytes());
    Some(wire_order(!sum.ones_complement()))
}

/// The source and destination addresses, side by side in either family's header.
fn addresses<'a>(frame: &'a [u8], packet: &Packet) -> &'a [u8] {
    let (src, dst) = packet.family.addr_offsets();
    let len = dst - src;
    &frame[packet.l3 + src..packet.l3 + dst + len]
}

/// etherparse sums 16-bit words in the machine's byte order; this is the checksum as the
/// header field reads in network order.
fn wire_order(sum: u16) -> u16 {
    u16::from_be_bytes(sum.to_ne_bytes())
}

/// How far a checksum is off, 0 when it is right (0 and 0xffff are the same number in ones'
/// complement).
fn residual(sum: u16) -> u16 {
    if sum == 0xffff {
        0
    } else {
        sum
    }
}

/// Recomputes the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6 checksum, as far as
/// the frame lets them be located; an IPv4 UDP checksum of 0 (none) stays 0, a computed 0 is
/// sent as 0xffff. For an ICMP error, the quoted IPv4 header's checksum is left as it is.
fn refresh_checksums(frame: &mut [u8]) {
    let Some((l3, family)) = ip_offset(frame) else {
        return;
    };
    let (header_len, total_len, icmp) = match family {
        Family::V4 => {
            let header_len = frame.get(l3).map_or(0, |byte| usize::from(byte & 0x0f) * 4);
            if frame[l3] >> 4 != 4 || header_len < 20 || l3 + header_len > frame.len() {
                return;
            }
            let sum = ip_sum(frame, l3, header_len, true);
            set_u16(frame, l3 + 10, sum);
            let total_len = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
            (header_len, total_len, frame[l3 + 9] == protocol::ICMP)
        }
        Family::V6 => {
            if frame.len() < l3 + 40 || frame[l3] >> 4 != 6 {
                return;
            }
            let total_len = 40 + usize::from(u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]));
            match ipv6_walk(frame, l3, l3 + total_len) {
                Walk::Transport { l4, next, .. } => (l4 - l3, total_len, next == ICMPV6),
                _ => return,
            }
        }
    };
    let packet = match Packet::parse(frame) {
        Some(packet) => packet,
        // Other ICMP messages: only their checksum field's place matters here.
        None if icmp => Packet {
            family,
            l3,
            header_len,
            total_len,
            fragment: 0,
            fragment_id: 0,
            tcp_header_len: 0,
            protocol: if family == Family::V4 {
                protocol::ICMP
            } else {
                ICMPV6
            },
            src: IpAddr::from([0; 4]),
            dst: IpAddr::from([0; 4]),
            layer4: Layer4::Ports {
                src_port: 0,
                dst_port: 0,
                tcp_flags: 0,
            },
        },
        None => return,
    };
    if matches!(packet.layer4, Layer4::LaterFragment) {
        return;
    }
    let check = packet.check_offset();
    let is_udp = packet.protocol == protocol::UDP;
    let optional = is_udp && family == Family::V4;
    if optional && frame.get(check..check + 2) == Some(&[0, 0]) {
        return;
    }
    if let Some(sum) = l4_sum(frame, &packet, true) {
        set_u16(frame, check, if is_udp && sum == 0 { 0xffff } else { sum });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            write!(out, "{byte:02x}").expect("writing to a String");
            out
        })
}

// ---------------------------------------------------------------------------------------------
// What the checker remembers: the flows it saw forwarded.

/// A flow as the datapath must hold it.
#[derive(Clone, Copy)]
struct Flow {
    backend: (IpAddr, u16),
    /// A FIN or RST was seen: the next SYN may go elsewhere.
    closing: bool,
}

/// The flow table and the reverse-translation table, rebuilt from the translations seen. Every
/// entry the datapath makes comes with a translated packet, so this is the datapath's state as
/// long as nothing was evicted.
struct Model {
    /// Client tuple (to the VIP) to its flow.
    flows: HashMap<Tuple, Flow>,
    /// Reply tuple (backend to client) to the index of the service.
    reverse: HashMap<Tuple, usize>,
    /// Reply tuples in the order they appeared, for the generator.
    replies: Vec<Tuple>,
    /// Datagrams (addresses and protocol, ports zero; IP ID) whose first fragment was
    /// forwarded, to that backend's address.
    fragments: HashMap<(Tuple, u32), IpAddr>,
    /// (client, VIP, protocol) of a 3-tuple service to the backend all its packets go to.
    clients: HashMap<Tuple, IpAddr>,
    /// Entries the datapath has inserted.
    inserts: u64,
    capacity: u64,
}

impl Model {
    fn new(capacity: u64) -> Self {
        Self {
            flows: HashMap::new(),
            reverse: HashMap::new(),
            replies: Vec::new(),
            fragments: HashMap::new(),
            clients: HashMap::new(),
            inserts: 0,
            capacity,
        }
    }

    /// Whether the datapath's tables can still hold every entry this run made: until then,
    /// a flow's absence or move is a bug, not an eviction.
    fn complete(&self) -> bool {
        self.inserts + EVICTION_SLACK < self.capacity
    }

    /// Whether the frame belongs to a flow: a reply, or an ICMP error about one.
    fn knows(&self, frame: &[u8]) -> bool {
        match Packet::parse(frame) {
            Some(Packet {
                layer4: Layer4::IcmpError { tuple, .. },
                ..
            }) => {
                let key = tuple.reversed();
                self.flows.contains_key(&key) || self.reverse.contains_key(&key)
            }
            Some(packet) => packet
                .tuple()
                .is_some_and(|tuple| self.reverse.contains_key(&tuple)),
            None => false,
        }
    }

    /// A client packet of `tuple` was translated to `backend`, as the datapath's flow table
    /// follows TCP: same backend unless a SYN (without ACK) finds a closing entry. Returns
    /// whether that made a new flow, and a finding if the flow moved.
    fn forwarded(
        &mut self,
        tuple: Tuple,
        service: usize,
        backend: (IpAddr, u16),
        flags: u8,
    ) -> (bool, Option<Finding>) {
        let is_tcp = tuple.protocol == protocol::TCP;
        let syn = is_tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let closing = is_tcp && flags & (TCP_FIN | TCP_RST) != 0;
        let kept = self
            .flows
            .get(&tuple)
            .copied()
            .filter(|flow| !(syn && flow.closing));
        let finding = match kept {
            Some(flow) if flow.backend != backend && self.complete() => Some(Finding::new(
                "flow_moved",
                format!(
                    "flow {tuple} moved from {} to {} without a new SYN after a FIN or RST",
                    endpoint(flow.backend),
                    endpoint(backend)
                ),
            )),
            _ => None,
        };
        match self.flows.get_mut(&tuple) {
            Some(flow) if kept.is_some_and(|kept| kept.backend == backend) => {
                flow.closing |= closing;
                return (false, finding);
            }
            _ => {
                // Replies are translated through the client's flow, so once the flow moves to
                // another backend, the old backend's replies are no longer ours.
                if let Some(old) = self.flows.get(&tuple).filter(|old| old.backend != backend) {
                    let stale = Tuple {
                        src: old.backend.0,
                        dst: tuple.src,
                        src_port: old.backend.1,
                        dst_port: tuple.src_port,
                        protocol: tuple.protocol,
                    };
                    self.reverse.remove(&stale);
                    self.replies.retain(|reply| *reply != stale);
                }
                self.flows.insert(tuple, Flow { backend, closing });
                let reply = Tuple {
                    src: backend.0,
                    dst: tuple.src,
                    src_port: backend.1,
                    dst_port: tuple.src_port,
                    protocol: tuple.protocol,
                };
                if self.reverse.insert(reply, service).is_none() {
                    self.replies.push(reply);
                }
                self.inserts += 1;
            }
        }
        (true, finding)
    }

    /// A packet of a 3-tuple service's client went to `backend`: every one must go to the same.
    fn placed_by_3_tuple(&mut self, tuple: Tuple, backend: IpAddr) -> Option<Finding> {
        let client = Tuple {
            src_port: 0,
            dst_port: 0,
            ..tuple
        };
        let first = *self.clients.entry(client).or_insert(backend);
        (first != backend).then(|| {
            let message = format!(
                "{tuple} sent to {backend}, while the 3-tuple policy put this client on {first}"
            );
            Finding::new("three_tuple_split", message)
        })
    }

    /// A reply was translated: its FIN or RST closes the client's flow too.
    fn replied(&mut self, reply: Tuple, service: &Service, flags: u8) {
        if reply.protocol != protocol::TCP || flags & (TCP_FIN | TCP_RST) == 0 {
            return;
        }
        let forward = Tuple {
            src: reply.dst,
            dst: service.vip,
            src_port: reply.dst_port,
            dst_port: service.port,
            protocol: reply.protocol,
        };
        if let Some(flow) = self.flows.get_mut(&forward) {
            flow.closing = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The properties, checked per packet.

/// One broken property of one packet.
struct Finding {
    kind: &'static str,
    message: String,
}

impl Finding {
    fn new(kind: &'static str, message: String) -> Self {
        Self { kind, message }
    }
}

#[derive(Default)]
struct Checked {
    findings: Vec<Finding>,
    /// A translated packet whose input checksum was already wrong, and stayed as wrong.
    carried_bad_checksum: bool,
}

fn verdict_name(verdict: u32) -> &'static str {
    VERDICT_NAMES[verdict_slot(verdict)]
}

fn verdict_slot(verdict: u32) -> usize {
    (verdict as usize).min(5)
}

fn check(world: &World, model: &mut Model, case: &Case, outcome: &Outcome) -> Checked {
    let mut checked = Checked::default();
    let (verdict, output) = match outcome {
        Outcome::Refused => return checked,
        Outcome::Failed(error) => {
            let message = format!("BPF_PROG_TEST_RUN failed: {error}");
            checked.findings.push(Finding::new("run_failed", message));
            return checked;
        }
        Outcome::Ran { verdict, output } => (*verdict, output),
    };
    if verdict == XDP_ABORTED || verdict > XDP_REDIRECT {
        let message = format!("returned {verdict} ({})", verdict_name(verdict));
        checked.findings.push(Finding::new("bad_verdict", message));
    }
    if output.len() != case.frame.len() {
        let message = format!("{} bytes in, {} out", case.frame.len(), output.len());
        checked
            .findings
            .push(Finding::new("length_changed", message));
        return checked;
    }

    let changed = *output != case.frame;
    let next_hop = if changed || verdict == XDP_TX || verdict == XDP_REDIRECT {
        check_translation(world, model, case, verdict, output, &mut checked)
    } else {
        if let Some(packet) = Packet::parse(&case.frame).filter(Packet::is_first_fragment) {
            // A first fragment not forwarded may have replaced its datagram's entry, or not.
            model.fragments.remove(&packet.datagram());
        }
        None
    };
    // The one translated packet the datapath may pass: one whose next hop has no neighbour
    // entry (only IPv6 clients outside the hosts `add_neighbours` resolves: a /80 is too big;
    // IPv4 would be dropped there, but every IPv4 host is resolved).
    let unresolved = verdict == XDP_PASS && next_hop.is_some_and(|hop| !has_neighbour(hop));
    if changed && !unresolved && (verdict == XDP_PASS || verdict == XDP_DROP) {
        let first = output.iter().zip(&case.frame).position(|(a, b)| a != b);
        let kind = if verdict == XDP_PASS {
            "pass_changed"
        } else {
            "drop_changed"
        };
        let message = format!(
            "{} with a changed frame (first difference at byte {})",
            verdict_name(verdict),
            first.unwrap_or(0)
        );
        checked.findings.push(Finding::new(kind, message));
    }

    let sent = verdict == XDP_TX || verdict == XDP_REDIRECT;
    let (expected, wanted) = match case.expect {
        Expect::Sent(why) => (sent, why),
        Expect::Pass => (
            verdict == XDP_PASS,
            "a packet that is not the balancer's must pass",
        ),
        Expect::Drop(why) => (verdict == XDP_DROP, why),
        Expect::Any => (true, ""),
    };
    if !expected {
        let message = format!("{wanted}, got {}", verdict_name(verdict));
        checked
            .findings
            .push(Finding::new("unexpected_verdict", message));
    }
    checked
}

/// What a translated packet must be: the input with the translated addresses and ports (the
/// MAC addresses and checksums are filled in later), and where it must go.
struct Translation {
    frame: Vec<u8>,
    next_hop: IpAddr,
    egress: Interface,
}

/// The properties of a translated packet, and the model's update; returns the next hop it
/// must go to, if it is a translation at all.
fn check_translation(
    world: &World,
    model: &mut Model,
    case: &Case,
    verdict: u32,
    output: &[u8],
    checked: &mut Checked,
) -> Option<IpAddr> {
    let findings = &mut checked.findings;
    let (Some(input), Some(translated)) = (Packet::parse(&case.frame), Packet::parse(output))
    else {
        let message = "translated a frame that is not one the datapath translates".to_string();
        findings.push(Finding::new("translated_unparsable", message));
        return None;
    };
    let well_formed = match input.malformation(case.frame.len()) {
        Some(why) => {
            let message = format!("translated a malformed packet: {why}");
            findings.push(Finding::new("malformed_translated", message));
            false
        }
        None => true,
    };

    let translation = match (&input.layer4, input.tuple()) {
        (Layer4::Ports { tcp_flags, .. }, Some(tuple)) => {
            match world.service_for(tuple.dst, tuple.dst_port, tuple.protocol) {
                Some(service) => {
                    let backend = translated.tuple().map(|t| (t.dst, t.dst_port));
                    let backend = backend.expect("a TCP or UDP packet stays one");
                    let ingress = case.ingress;
                    let forwarded = Forwarded {
                        service,
                        backend,
                        ingress,
                    };
                    forward(world, model, &case.frame, &input, forwarded, findings)
                }
                None => reply(world, model, &case.frame, &input, *tcp_flags, findings),
            }
        }
        (Layer4::LaterFragment, _) => {
            let backend = translated.dst;
            later_fragment(world, model, &case.frame, &input, backend, findings)
        }
        _ => icmp_error(world, model, &case.frame, &input, findings),
    };
    let Translation {
        frame: mut expected,
        next_hop,
        egress,
    } = translation?;

    let sent = verdict == XDP_TX || verdict == XDP_REDIRECT;
    if sent {
        expected[0..6].copy_from_slice(&neighbour_mac(next_hop));
        expected[6..12].copy_from_slice(&egress.mac());
    }
    // The checksums are checked on their own, below.
    for field in checksum_fields(&input) {
        expected[field..field + 2].copy_from_slice(&output[field..field + 2]);
    }
    if let Some(offset) = expected.iter().zip(output).position(|(a, b)| a != b) {
        let message = format!(
            "byte {offset} is {:#04x}, {:#04x} expected",
            output[offset], expected[offset]
        );
        findings.push(Finding::new("wrong_bytes", message));
    }
    if sent {
        let wanted = if egress == case.ingress {
            XDP_TX
        } else {
            XDP_REDIRECT
        };
        if verdict != wanted {
            let message = format!(
                "{} from {} to {}: {} expected",
                verdict_name(verdict),
                case.ingress.name(),
                egress.name(),
                verdict_name(wanted)
            );
            findings.push(Finding::new("wrong_verdict", message));
        }
    }
    if well_formed {
        checked.carried_bad_checksum =
            check_checksums(&case.frame, &input, output, verdict, findings);
    }
    Some(next_hop)
}

/// A client's packet translated for a service.
struct Forwarded {
    /// The service's index.
    service: usize,
    /// Where the packet was sent.
    backend: (IpAddr, u16),
    /// Where it arrived.
    ingress: Interface,
}

/// A client's packet for a service, sent to a backend: which must be one of the service's,
/// the flow's if it has one, and for a new flow, from a source routed back through the
/// interface it arrived on.
fn forward(
    world: &World,
    model: &mut Model,
    frame: &[u8],
    input: &Packet,
    forwarded: Forwarded,
    findings: &mut Vec<Finding>,
) -> Option<Translation> {
    let Forwarded {
        service: index,
        backend,
        ingress,
    } = forwarded;
    let service = &world.services[index];
    let tuple = input.tuple().expect("a TCP or UDP packet");
    if !service.backends.contains(&backend) {
        let message = format!(
            "{tuple} sent to {}, not a backend of service {}",
            endpoint(backend),
            service.name
        );
        findings.push(Finding::new("wrong_destination", message));
        return None;
    }
    let flags = match input.layer4 {
        Layer4::Ports { tcp_flags, .. } => tcp_flags,
        Layer4::IcmpError { .. } | Layer4::LaterFragment => 0,
    };
    let (new_flow, finding) = model.forwarded(tuple, index, backend, flags);
    findings.extend(finding);
    if service.three_tuple {
        findings.extend(model.placed_by_3_tuple(tuple, backend.0));
    }
    if input.is_first_fragment() {
        model.fragments.insert(input.datagram(), backend.0);
    }
    if new_flow && !routed_back(tuple.src, ingress) {
        let message = format!(
            "a new flow {tuple} arriving on {} was forwarded: its source is not routed back \
             through {0}",
            ingress.name()
        );
        findings.push(Finding::new("spoofed_source_forwarded", message));
    }
    let mut expected = frame.to_vec();
    put_addr(&mut expected, input.dst_offset(), backend.0);
    set_u16(&mut expected, input.l4() + 2, backend.1);
    Some(Translation {
        frame: expected,
        next_hop: backend.0,
        egress: Interface::of(backend.0).expect("backends are on the two subnets"),
    })
}

/// A later fragment, sent to `backend`: its datagram's first fragment's backend if the model
/// saw that one forwarded, else a backend of the 3-tuple service of its (VIP, protocol), the
/// one this client's packets get. Only the destination address (and the header checksum)
/// changes.
fn later_fragment(
    world: &World,
    model: &mut Model,
    frame: &[u8],
    input: &Packet,
    backend: IpAddr,
    findings: &mut Vec<Finding>,
) -> Option<Translation> {
    let datagram = input.datagram();
    let (tuple, id) = datagram;
    let serves = |service: &Service| {
        (service.vip, service.protocol) == (tuple.dst, tuple.protocol)
            && service.backends.iter().any(|(addr, _)| *addr == backend)
    };
    if let Some(&first) = model.fragments.get(&datagram) {
        if first != backend {
            let message = format!(
                "a later fragment of {tuple} id {id} sent to {backend}, its first fragment to \
                 {first}"
            );
            findings.push(Finding::new("fragment_moved", message));
        }
    } else if let Some(index) = world.three_tuple_service(tuple.dst, tuple.protocol) {
        if !serves(&world.services[index]) {
            let message = format!(
                "a later fragment of {tuple} id {id} sent to {backend}, not a backend of \
                 3-tuple service {}",
                world.services[index].name
            );
            findings.push(Finding::new("wrong_destination", message));
        }
        findings.extend(model.placed_by_3_tuple(tuple, backend));
    } else if !world.services.iter().any(serves) {
        // The model forgets a datagram when a first fragment of the same key was not
        // forwarded; the datapath may still hold the earlier entry, so only the address is
        // checked then.
        let message = format!(
            "a later fragment of {tuple} id {id} sent to {backend}, not a backend of a service \
             there"
        );
        findings.push(Finding::new("wrong_destination", message));
    }
    let mut expected = frame.to_vec();
    put_addr(&mut expected, input.dst_offset(), backend);
    let egress = Interface::of(backend)?;
    Some(Translation {
        frame: expected,
        next_hop: backend,
        egress,
    })
}

/// A packet from a backend, not for a service: the reply of a flow, translated to come from
/// the flow's service.
fn reply(
    world: &World,
    model: &mut Model,
    frame: &[u8],
    input: &Packet,
    tcp_flags: u8,
    findings: &mut Vec<Finding>,
) -> Option<Translation> {
    let tuple = input.tuple().expect("a TCP or UDP packet");
    if !world.is_backend(tuple.src, tuple.src_port, tuple.protocol) {
        let message = format!("translated {tuple}: neither for a service nor a reply");
        findings.push(Finding::new("translated_stranger", message));
        return None;
    }
    let Some(&index) = model.reverse.get(&tuple) else {
        let message = format!("translated {tuple}, a reply of no flow forwarded before");
        findings.push(Finding::new("reply_without_flow", message));
        return None;
    };
    let service = &world.services[index];
    let Some(egress) = Interface::of(tuple.dst) else {
        let message = format!("translated {tuple}, whose client has no route");
        findings.push(Finding::new("wrong_destination", message));
        return None;
    };
    model.replied(tuple, service, tcp_flags);
    let mut expected = frame.to_vec();
    put_addr(&mut expected, input.src_offset(), service.vip);
    set_u16(&mut expected, input.l4(), service.port);
    Some(Translation {
        frame: expected,
        next_hop: tuple.dst,
        egress,
    })
}

/// An ICMP error quoting a packet of a flow: about a reply, it goes to the flow's backend
/// (outer destination and quoted source become the backend's); about a client's packet, to the
/// client (outer source and quoted destination become the service's). Either way it must have
/// been addressed to the quoted packet's sender.
fn icmp_error(
    world: &World,
    model: &Model,
    frame: &[u8],
    input: &Packet,
    findings: &mut Vec<Finding>,
) -> Option<Translation> {
    let Layer4::IcmpError {
        quoted,
        quoted_len,
        tuple,
    } = input.layer4
    else {
        unreachable!("called for ICMP errors only");
    };
    if input.dst != tuple.src {
        let message = format!(
            "translated an ICMP error sent to {} about a packet {tuple}: not its sender",
            input.dst
        );
        findings.push(Finding::new("icmp_misaddressed", message));
    }
    let key = tuple.reversed();
    let ports = quoted + quoted_len;
    let (src_at, dst_at) = input.family.addr_offsets();
    let mut expected = frame.to_vec();
    if let Some(flow) = model.flows.get(&key) {
        let (addr, port) = flow.backend;
        put_addr(&mut expected, input.dst_offset(), addr);
        put_addr(&mut expected, quoted + src_at, addr);
        set_u16(&mut expected, ports, port);
        let egress = Interface::of(addr).expect("backends are on the two subnets");
        return Some(Translation {
            frame: expected,
            next_hop: addr,
            egress,
        });
    }
    if let Some(&index) = model.reverse.get(&key) {
        let service = &world.services[index];
        put_addr(&mut expected, input.src_offset(), service.vip);
        put_addr(&mut expected, quoted + dst_at, service.vip);
        set_u16(&mut expected, ports + 2, service.port);
        let Some(egress) = Interface::of(input.dst) else {
            let message = format!("translated an ICMP error about {tuple} to a host with no route");
            findings.push(Finding::new("wrong_destination", message));
            return None;
        };
        return Some(Translation {
            frame: expected,
            next_hop: input.dst,
            egress,
        });
    }
    let message = format!("translated an ICMP error about {tuple}, of no flow forwarded before");
    findings.push(Finding::new("translated_stranger", message));
    None
}

/// Whether `addr` has a permanent neighbour entry (see [`add_neighbours`]).
fn has_neighbour(addr: IpAddr) -> bool {
    match (Family::of(addr), subnet_host(addr)) {
        (Family::V4, Some((_, host))) => host != 1,
        (Family::V6, Some((_, host))) => host > 1,
        (_, None) => false,
    }
}

/// Whether the kernel routes packets to `addr` out of `ingress` as to a neighbour: a host of
/// that interface's subnet, but for this host's own addresses: its address and the broadcast
/// address in IPv4; its address and the subnet-router anycast address (host part zero) in
/// IPv6.
fn routed_back(addr: IpAddr, ingress: Interface) -> bool {
    let own = match addr {
        IpAddr::V4(addr) => matches!(addr.octets(), [10, 200, _, 1 | 255]),
        IpAddr::V6(addr) => {
            let octets = addr.octets();
            octets[10..15] == [0; 5] && matches!(octets[15], 0 | 1)
        }
    };
    !own && Interface::of(addr) == Some(ingress)
}

/// Offsets of the checksum fields a translation may change.
fn checksum_fields(packet: &Packet) -> Vec<usize> {
    let is_v4 = packet.family == Family::V4;
    let mut fields = Vec::new();
    if is_v4 {
        fields.push(packet.l3 + 10);
    }
    if matches!(packet.layer4, Layer4::LaterFragment) {
        return fields;
    }
    fields.push(packet.check_offset());
    if let Layer4::IcmpError {
        quoted,
        quoted_len,
        tuple,
    } = packet.layer4
    {
        if is_v4 {
            fields.push(quoted + 10);
        }
        if tuple.protocol == protocol::UDP {
            fields.push(quoted + quoted_len + 6);
        }
    }
    fields
}

/// The translated packet's checksums, recomputed: right if the input's were, as wrong as the
/// input's otherwise. Returns whether the input had a wrong checksum.
fn check_checksums(
    input: &[u8],
    packet: &Packet,
    output: &[u8],
    verdict: u32,
    findings: &mut Vec<Finding>,
) -> bool {
    let stored = |frame: &[u8], at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let (l3, header_len) = (packet.l3, packet.header_len);
    let is_v4 = packet.family == Family::V4;
    let mut sums = Vec::new();
    // IPv6 has no header checksum.
    if is_v4 {
        sums.push(Sums {
            what: "IPv4 header",
            before: Some(ip_sum(input, l3, header_len, false)),
            after: Some(ip_sum(output, l3, header_len, false)),
            stored: stored(output, l3 + 10),
            right: Some(ip_sum(output, l3, header_len, true)),
        });
    }

    // A later fragment has no transport header: its bytes there are payload.
    let has_transport_header = !matches!(packet.layer4, Layer4::LaterFragment);
    let check = packet.check_offset();
    let (check_in, check_out) = if has_transport_header {
        (stored(input, check), stored(output, check))
    } else {
        (0, 0)
    };
    let udp_checksums = match packet.layer4 {
        Layer4::Ports { .. } if packet.protocol == protocol::UDP => Some((check_in, check_out)),
        Layer4::IcmpError {
            quoted,
            quoted_len,
            tuple,
        } => {
            if is_v4 {
                sums.push(Sums {
                    what: "quoted IPv4 header",
                    before: Some(ip_sum(input, quoted, quoted_len, false)),
                    after: Some(ip_sum(output, quoted, quoted_len, false)),
                    stored: stored(output, quoted + 10),
                    right: Some(ip_sum(output, quoted, quoted_len, true)),
                });
            }
            let at = quoted + quoted_len + 6;
            let is_udp = tuple.protocol == protocol::UDP;
            if is_udp && stored(input, at) != 0 {
                sums.push(Sums {
                    what: "quoted UDP",
                    before: quoted_udp_sum(input, packet.family, quoted, false),
                    after: quoted_udp_sum(output, packet.family, quoted, false),
                    stored: stored(output, at),
                    right: quoted_udp_sum(output, packet.family, quoted, true),
                });
            }
            is_udp.then(|| (stored(input, at), stored(output, at)))
        }
        Layer4::Ports { .. } | Layer4::LaterFragment => None,
    };
    if let Some((before, after)) = udp_checksums {
        if (before == 0) != (after == 0) {
            let message = format!(
                "UDP checksum {before:#06x} became {after:#06x}: 0 means none, and must stay 0"
            );
            findings.push(Finding::new("udp_checksum", message));
        }
    }
    let is_udp = packet.protocol == protocol::UDP;
    if !is_v4 && is_udp && matches!(packet.layer4, Layer4::Ports { .. }) && check_in == 0 {
        let message = "translated an IPv6 UDP datagram without a checksum (invalid, RFC 8200): \
                       it must be dropped"
            .to_string();
        findings.push(Finding::new("udp_checksum", message));
    }
    if has_transport_header && !(is_udp && check_in == 0) {
        // A field holding the pseudo-header sum is a sender's partial checksum (veth transmit
        // offload): the datapath completes it, so the output must be right whatever the input.
        // Not a first fragment: its checksum covers the whole datagram, and the datapath never
        // takes it for a partial one.
        let partial = matches!(packet.layer4, Layer4::Ports { .. })
            && packet.fragment & 0x3fff == 0
            && pseudo_header_sum(input, packet) == Some(check_in);
        // Passed (to an unresolved neighbour), a partial checksum stays partial: the kernel
        // completes it on the way out. It must be the translated pseudo-header's sum.
        if partial && verdict == XDP_PASS {
            let wanted = pseudo_header_sum(output, packet);
            if wanted != Some(check_out) {
                let message = format!(
                    "a partial checksum passed as {check_out:#06x}, not the translated \
                     pseudo-header sum {:#06x}",
                    wanted.unwrap_or(0)
                );
                findings.push(Finding::new("checksum", message));
            }
            return false;
        }
        sums.push(Sums {
            what: match (packet.protocol, packet.family) {
                (protocol::TCP, _) => "TCP",
                (protocol::UDP, _) => "UDP",
                (_, Family::V4) => "ICMP",
                (_, Family::V6) => "ICMPv6",
            },
            before: if partial {
                Some(0)
            } else {
                l4_sum(input, packet, false)
            },
            after: l4_sum(output, packet, false),
            stored: check_out,
            right: l4_sum(output, packet, true),
        });
    }

    let mut bad_input = false;
    for sums in sums {
        let (Some(before), Some(after)) = (sums.before.map(residual), sums.after.map(residual))
        else {
            continue;
        };
        bad_input |= before != 0;
        if before != after {
            let message = format!(
                "{} checksum {:#06x}, {:#06x} expected{}",
                sums.what,
                sums.stored,
                sums.right.unwrap_or(0),
                if before == 0 {
                    ""
                } else {
                    " (the input's was wrong and must stay exactly as wrong)"
                }
            );
            findings.push(Finding::new("checksum", message));
        }
    }
    bad_input
}

/// As [`l4_sum`], for a UDP datagram quoted by an ICMP error at `quoted`, when the error quotes
/// all of it (routers quote as much as fits, RFC 1812): its checksum can be checked then. The
/// quoted TCP checksum is not: the datapath leaves it alone, as issue 5 asks nothing of it.
fn quoted_udp_sum(frame: &[u8], family: Family, quoted: usize, zero_field: bool) -> Option<u16> {
    let len_at = quoted + if family == Family::V4 { 2 } else { 4 };
    let length = usize::from(u16::from_be_bytes([frame[len_at], frame[len_at + 1]]));
    let total_len = if family == Family::V4 {
        length
    } else {
        40 + length
    };
    let datagram = frame.get(quoted..quoted + total_len)?;
    // Parsed as a frame of its own, behind a blank Ethernet header.
    let mut alone = ethernet_for(family, [0; 6], [0; 6], &[]);
    alone.extend_from_slice(datagram);
    let packet = Packet::parse(&alone)?;
    l4_sum(&alone, &packet, zero_field)
}

/// One checksum of a translated packet: the sums over its input and output (see [`ip_sum`]),
/// the value it carries out, and the value that would be right.
struct Sums {
    what: &'static str,
    before: Option<u16>,
    after: Option<u16>,
    stored: u16,
    right: Option<u16>,
}

// ---------------------------------------------------------------------------------------------
// Tallying, the counter check, and the report.

#[derive(Default)]
struct Tally {
    refused: u64,
    verdicts: [u64; 6],
    by_source: [[u64; 6]; Source::ALL.len()],
    by_family: [[u64; 6]; 2],
    counted: [u64; 6],
    counters: Vec<(&'static str, u64)>,
    carried_bad_checksums: u64,
    violation_counts: BTreeMap<&'static str, u64>,
    violations: Vec<Violation>,
}

impl Tally {
    fn record(&mut self, index: u64, case: &Case, outcome: &Outcome, checked: Checked) {
        let (verdict, output) = match outcome {
            Outcome::Refused => {
                self.refused += 1;
                (None, &[][..])
            }
            Outcome::Failed(_) => (None, &[][..]),
            Outcome::Ran { verdict, output } => {
                let slot = verdict_slot(*verdict);
                self.verdicts[slot] += 1;
                let source = Source::ALL.iter().position(|s| *s == case.source);
                self.by_source[source.expect("every source is listed")][slot] += 1;
                match ip_offset(&case.frame) {
                    Some((_, Family::V4)) => self.by_family[0][slot] += 1,
                    Some((_, Family::V6)) => self.by_family[1][slot] += 1,
                    None => {}
                }
                (Some(*verdict), output.as_slice())
            }
        };
        self.carried_bad_checksums += u64::from(checked.carried_bad_checksum);
        for finding in checked.findings {
            let seen = self.violation_counts.entry(finding.kind).or_insert(0);
            *seen += 1;
            if *seen as usize <= EXAMPLES_PER_KIND {
                self.violations.push(Violation {
                    kind: finding.kind,
                    index,
                    message: finding.message,
                    case: case.description.clone(),
                    interface: case.ingress.name(),
                    frame: case.frame.clone(),
                    verdict,
                    output: output.to_vec(),
                    alone: None,
                    expect: case.expect,
                });
            }
        }
    }

    /// Sums the datapath's counters per verdict, as `lb-user stats` does, and compares them
    /// with the verdicts seen.
    fn check_counters(&mut self, count: u64, values: &[u64]) {
        self.counters = (counter::NAMES.iter().copied().zip(values.iter().copied()))
            .filter(|(_, value)| *value != 0)
            .collect();
        for (name, value) in counter::NAMES.iter().zip(values) {
            let slot = if name.starts_with("pass_") {
                XDP_PASS
            } else if name.starts_with("drop_") {
                XDP_DROP
            } else if name.ends_with("_tx") {
                XDP_TX
            } else if name.ends_with("_redirect") {
                XDP_REDIRECT
            } else {
                continue;
            };
            self.counted[slot as usize] += value;
        }
        let run = self.verdicts.iter().sum::<u64>();
        if self.counted == self.verdicts && run == count - self.refused {
            return;
        }
        let message = format!(
            "the counters add up to {}, the run saw {} ({run} packets run, {} refused)",
            verdict_list(&self.counted),
            verdict_list(&self.verdicts),
            self.refused
        );
        *self.violation_counts.entry("counters").or_insert(0) += 1;
        self.violations.push(Violation {
            kind: "counters",
            index: count,
            message,
            case: String::new(),
            interface: "",
            frame: Vec::new(),
            verdict: None,
            output: Vec::new(),
            alone: None,
            expect: Expect::Any,
        });
    }

    /// Sends the first example of each kind alone into a fresh fixture, to tell a frame that
    /// breaks a property by itself from one that needs the packets before it.
    fn replay_alone(&mut self, world: &World) {
        let mut replayed = Vec::new();
        for violation in &mut self.violations {
            if violation.frame.is_empty()
                || replayed.contains(&violation.kind)
                || replayed.len() >= REPLAYED_KINDS
            {
                continue;
            }
            replayed.push(violation.kind);
            let case = Case {
                source: Source::Mutated,
                frame: violation.frame.clone(),
                ingress: Interface::from_name(violation.interface),
                expect: violation.expect,
                description: violation.case.clone(),
            };
            let mut fixture = Fixture::with_config(CONFIG, &LoadOptions::default());
            add_neighbours();
            let outcome = run_frame(&mut fixture, &case);
            let mut model = Model::new(u64::from(lb_common::FLOW_TABLE_SIZE));
            let checked = check(world, &mut model, &case, &outcome);
            violation.alone = Some(checked.findings.iter().any(|f| f.kind == violation.kind));
        }
    }

    fn into_report(self, seed: u64, count: u64, elapsed: Duration) -> Report {
        Report {
            seed,
            count,
            elapsed,
            refused: self.refused,
            verdicts: self.verdicts,
            by_source: Source::ALL
                .iter()
                .zip(self.by_source)
                .map(|(source, verdicts)| (source.name(), verdicts))
                .collect(),
            by_family: self.by_family,
            counted: self.counted,
            counters: self.counters,
            carried_bad_checksums: self.carried_bad_checksums,
            violation_counts: self.violation_counts,
            violations: self.violations,
        }
    }
}

fn verdict_list(verdicts: &[u64; 6]) -> String {
    [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT]
        .iter()
        .map(|&verdict| format!("{} {}", verdict_name(verdict), verdicts[verdict as usize]))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuzz: seed {}, {} packets in {:.1} s ({:.0} packets/s)",
            self.seed,
            self.count,
            self.elapsed.as_secs_f64(),
            self.packets_per_second()
        )?;
        let run = self.verdicts.iter().sum::<u64>().max(1);
        let shares: Vec<String> = (0..6)
            .filter(|&slot| self.verdicts[slot] != 0 || (1..=4).contains(&slot))
            .map(|slot| {
                let share = 100.0 * self.verdicts[slot] as f64 / run as f64;
                format!(
                    "{} {} ({share:.1}%)",
                    VERDICT_NAMES[slot], self.verdicts[slot]
                )
            })
            .collect();
        writeln!(f, "verdicts: {}", shares.join(", "))?;
        writeln!(
            f,
            "refused by the kernel (shorter than 14 bytes): {}",
            self.refused
        )?;
        writeln!(
            f,
            "datapath counters per verdict: {}",
            verdict_list(&self.counted)
        )?;
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        writeln!(f, "datapath counters: {}", counters.join(", "))?;
        writeln!(
            f,
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "source", "packets", "drop", "pass", "tx", "redirect"
        )?;
        let families = [
            ("IPv4 frames", self.by_family[0]),
            ("IPv6 frames", self.by_family[1]),
        ];
        for (name, verdicts) in self.by_source.iter().chain(&families) {
            writeln!(
                f,
                "{name:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
                verdicts.iter().sum::<u64>(),
                verdicts[1],
                verdicts[2],
                verdicts[3],
                verdicts[4]
            )?;
        }
        writeln!(
            f,
            "translated with an input checksum already wrong, carried unchanged: {}",
            self.carried_bad_checksums
        )?;
        if self.passed() {
            return writeln!(f, "violations: none");
        }
        let total: u64 = self.violation_counts.values().sum();
        writeln!(f, "violations: {total}")?;
        for (kind, count) in &self.violation_counts {
            writeln!(f, "  {kind}: {count}")?;
        }
        for violation in &self.violations {
            write!(f, "{violation}")?;
        }
        writeln!(
            f,
            "replay packet N of this run: cargo xtask fuzz --seed {} --count N+1",
            self.seed
        )
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "- {} at packet {}: {}",
            self.kind, self.index, self.message
        )?;
        if self.frame.is_empty() {
            return Ok(());
        }
        writeln!(f, "  packet: {} (on {})", self.case, self.interface)?;
        writeln!(
            f,
            "  frame  ({} bytes): {}",
            self.frame.len(),
            hex(&self.frame)
        )?;
        if let Some(verdict) = self.verdict {
            writeln!(
                f,
                "  {} ({} bytes): {}",
                verdict_name(verdict),
                self.output.len(),
                hex(&self.output)
            )?;
        }
        match self.alone {
            Some(true) => writeln!(f, "  alone in a fresh fixture: the same violation"),
            Some(false) => writeln!(
                f,
                "  alone in a fresh fixture: fine (needs the packets before it)"
            ),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use etherparse::{Ipv4Header, Ipv6Header, TcpHeader, UdpHeader};

    use super::*;

    #[test]
    fn a_seed_makes_the_same_packets() {
        let world = World::new();
        let model = Model::new(1 << 20);
        let frames = |seed| {
            let mut generator = Generator::new(seed);
            (0..3000)
                .map(|_| generator.next(&world, &model).frame)
                .collect::<Vec<_>>()
        };
        assert_eq!(frames(7), frames(7));
        assert_ne!(frames(7), frames(8));
    }

    #[test]
    fn generated_valid_packets_have_the_checksums_etherparse_computes() {
        let world = World::new();
        let mut generator = Generator::new(1);
        let mut partial = 0;
        let mut ipv6 = 0;
        for _ in 0..1000 {
            let case = generator.client(&world);
            let frame = &case.frame;
            let what = &case.description;
            let packet = Packet::parse(frame).expect("parses");
            assert!(packet.malformation(frame.len()).is_none(), "{what}");
            let check = packet.check_offset();
            let stored = u16::from_be_bytes([frame[check], frame[check + 1]]);
            if pseudo_header_sum(frame, &packet) == Some(stored) {
                partial += 1; // a veth sender's partial checksum, as generated on purpose
                continue;
            }
            if !(packet.protocol == protocol::UDP && stored == 0) {
                assert_eq!(residual(l4_sum(frame, &packet, false).expect("extent")), 0);
            }
            let Some(l3) = ipv4_offset(frame) else {
                ipv6 += 1;
                check_ipv6_with_etherparse(frame, &packet, what);
                continue;
            };
            let (ip, _) = Ipv4Header::from_slice(&frame[l3..]).expect("IPv4");
            assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}");
            let l4 = l3 + ip.header_len();
            let end = l3 + usize::from(ip.total_len);
            if ip.protocol == etherparse::IpNumber::TCP {
                let (tcp, _) = TcpHeader::from_slice(&frame[l4..end]).expect("TCP");
                let payload = &frame[l4 + tcp.header_len()..end];
                let sum = tcp.calc_checksum_ipv4(&ip, payload).expect("sum");
                assert_eq!(tcp.checksum, sum, "{what}");
            } else {
                let (udp, _) = UdpHeader::from_slice(&frame[l4..end]).expect("UDP");
                if udp.checksum == 0 {
                    continue;
                }
                let sum = udp
                    .calc_checksum_ipv4(&ip, &frame[l4 + 8..end])
                    .expect("sum");
                assert_eq!(udp.checksum, sum, "{what}");
            }
        }
        assert!(
            partial > 100,
            "{partial} of 1000 packets with a partial checksum"
        );
        assert!(ipv6 > 300, "{ipv6} of 1000 packets IPv6");
    }

    /// The transport checksum of an IPv6 client packet, by etherparse, over the payload after
    /// the extension headers (etherparse's pseudo-header takes the fixed header's addresses).
    fn check_ipv6_with_etherparse(frame: &[u8], packet: &Packet, what: &str) {
        let (ip, _) = Ipv6Header::from_slice(&frame[packet.l3..]).expect("IPv6");
        let (l4, end) = (packet.l4(), packet.l3 + packet.total_len);
        if packet.protocol == protocol::TCP {
            let (tcp, _) = TcpHeader::from_slice(&frame[l4..end]).expect("TCP");
            let payload = &frame[l4 + tcp.header_len()..end];
            let sum = tcp.calc_checksum_ipv6(&ip, payload).expect("sum");
            assert_eq!(tcp.checksum, sum, "{what}");
        } else {
            let (udp, _) = UdpHeader::from_slice(&frame[l4..end]).expect("UDP");
            assert_ne!(
                udp.checksum, 0,
                "IPv6 UDP always carries a checksum: {what}"
            );
            let sum = udp
                .calc_checksum_ipv6(&ip, &frame[l4 + 8..end])
                .expect("sum");
            assert_eq!(udp.checksum, sum, "{what}");
        }
    }

    #[test]
    fn icmp_errors_quote_a_flow_and_carry_right_checksums() {
        let world = World::new();
        let mut model = Model::new(1 << 20);
        for family in [Family::V4, Family::V6] {
            let tuple = Tuple {
                src: host(family, 1, 2),
                dst: host(family, 1, 1),
                src_port: 40000,
                dst_port: 80,
                protocol: protocol::TCP,
            };
            let web = world
                .service_for(tuple.dst, 80, protocol::TCP)
                .expect("web");
            let dns = world
                .service_for(tuple.dst, 53, protocol::UDP)
                .expect("dns");
            let backend_a = (host(family, 2, 10), 8080);
            let (new_flow, _) = model.forwarded(tuple, web, backend_a, TCP_SYN);
            assert!(new_flow);
            let dns_tuple = Tuple {
                dst_port: 53,
                protocol: protocol::UDP,
                ..tuple
            };
            let backend_b = (host(family, 2, 11), 5353);
            let (new_flow, _) = model.forwarded(dns_tuple, dns, backend_b, 0);
            assert!(new_flow);
        }
        let mut generator = Generator::new(2);
        let mut whole_udp_quotes = 0;
        let mut ipv6 = 0;
        for _ in 0..800 {
            let case = generator
                .icmp_error(&world, &model)
                .expect("a flow to quote");
            let packet = Packet::parse(&case.frame).expect("an ICMP error");
            let Layer4::IcmpError { tuple: quoted, .. } = packet.layer4 else {
                panic!("not an ICMP error: {}", case.description);
            };
            assert!(model.knows(&case.frame), "{}", case.description);
            assert_eq!(
                packet.dst, quoted.src,
                "addressed to the quoted packet's sender"
            );
            assert!(packet.malformation(case.frame.len()).is_none());
            if packet.family == Family::V4 {
                assert_eq!(residual(ip_sum(&case.frame, packet.l3, 20, false)), 0);
            } else {
                ipv6 += 1;
            }
            let icmp = l4_sum(&case.frame, &packet, false).expect("extent");
            assert_eq!(residual(icmp), 0, "{}", case.description);
            let Layer4::IcmpError {
                quoted: at,
                quoted_len,
                ..
            } = packet.layer4
            else {
                unreachable!("matched above");
            };
            if let Some(sum) = quoted_udp_sum(&case.frame, packet.family, at, false) {
                let stored = &case.frame[at + quoted_len + 6..at + quoted_len + 8];
                if quoted.protocol == protocol::UDP && stored != [0, 0] {
                    assert_eq!(residual(sum), 0, "{}", case.description);
                    whole_udp_quotes += 1;
                }
            }
        }
        assert!(
            whole_udp_quotes > 20,
            "only {whole_udp_quotes} whole UDP datagrams quoted"
        );
        assert!(ipv6 > 200, "only {ipv6} ICMPv6 errors");
    }

    #[test]
    fn the_checker_tells_a_right_translation_from_wrong_ones() {
        the_checker_tells_right_from_wrong(Family::V4);
        the_checker_tells_right_from_wrong(Family::V6);
    }

    fn the_checker_tells_right_from_wrong(family: Family) {
        let world = World::new();
        let mut generator = Generator::new(9);
        let tuple = Tuple {
            src: host(family, 1, 2),
            dst: host(family, 1, 1),
            src_port: 40000,
            dst_port: 80,
            protocol: protocol::TCP,
        };
        let spec = generator.spec(tuple, CLIENT_MAC, PUB_MAC, TCP_SYN);
        let case = Case {
            source: Source::Client,
            frame: spec.frame(&mut generator.rng),
            ingress: Interface::Public,
            expect: Expect::Sent("forwarded"),
            description: String::new(),
        };
        let packet = Packet::parse(&case.frame).expect("parses");
        // The translation towards backend A, its checksums computed from scratch.
        let mut right = case.frame.clone();
        right[0..6].copy_from_slice(&BACKEND_A_MAC);
        right[6..12].copy_from_slice(&BACK_MAC);
        put_addr(&mut right, packet.dst_offset(), host(family, 2, 10));
        set_u16(&mut right, packet.l4() + 2, 8080);
        refresh_checksums(&mut right);
        let kinds = |output: &[u8], verdict: u32| -> Vec<&'static str> {
            let outcome = Outcome::Ran {
                verdict,
                output: output.to_vec(),
            };
            let mut model = Model::new(1 << 20);
            let checked = check(&world, &mut model, &case, &outcome);
            checked
                .findings
                .iter()
                .map(|finding| finding.kind)
                .collect()
        };
        let tampered = |offset: usize| {
            let mut output = right.clone();
            output[offset] ^= 0x40;
            output
        };

        assert_eq!(kinds(&right, XDP_REDIRECT), Vec::<&str>::new());
        assert_eq!(kinds(&right, XDP_TX), ["wrong_verdict"]);
        assert_eq!(
            kinds(&case.frame, XDP_ABORTED),
            ["bad_verdict", "unexpected_verdict"]
        );
        assert_eq!(
            kinds(&right, XDP_PASS),
            // Passed with the MAC addresses of a transmitted frame, too.
            ["wrong_bytes", "pass_changed", "unexpected_verdict"]
        );
        assert_eq!(kinds(&case.frame, XDP_DROP), ["unexpected_verdict"]);
        assert_eq!(
            kinds(&tampered(packet.check_offset()), XDP_REDIRECT),
            ["checksum"]
        );
        if family == Family::V4 {
            assert_eq!(kinds(&tampered(packet.l3 + 10), XDP_REDIRECT), ["checksum"]);
            assert_eq!(
                kinds(&tampered(packet.l3 + 8), XDP_REDIRECT),
                // The TTL changed, and the header checksum did not follow.
                ["wrong_bytes", "checksum"]
            );
        } else {
            // The hop limit is in no checksum; the source address is in the pseudo-header.
            assert_eq!(
                kinds(&tampered(packet.l3 + 7), XDP_REDIRECT),
                ["wrong_bytes"]
            );
            assert_eq!(
                kinds(&tampered(packet.l3 + 9), XDP_REDIRECT),
                ["wrong_bytes", "checksum"]
            );
        }
        assert_eq!(kinds(&tampered(2), XDP_REDIRECT), ["wrong_bytes"]);
        assert_eq!(
            kinds(&tampered(packet.l4() + 3), XDP_REDIRECT),
            ["wrong_destination"]
        );
    }

    #[test]
    fn a_total_length_past_the_frame_is_a_malformation() {
        let world = World::new();
        let mut generator = Generator::new(3);
        let mut frame = generator.client(&world).frame;
        let packet = Packet::parse(&frame).expect("parses");
        let claimed = frame.len() - packet.l3 + 1;
        match packet.family {
            Family::V4 => set_u16(&mut frame, packet.l3 + 2, claimed as u16),
            Family::V6 => set_u16(&mut frame, packet.l3 + 4, (claimed - 40) as u16),
        }
        let packet = Packet::parse(&frame).expect("still parses");
        let why = packet.malformation(frame.len()).expect("malformed");
        assert!(why.contains("exceeds"), "{why}");
    }

    #[test]
    fn an_incremental_change_keeps_the_residual() {
        // What the checker relies on for inputs with wrong checksums: changing a field and
        // updating the checksum by RFC 1624 leaves the ones'-complement sum as it was.
        let header = ipv4_header(CLIENT.into(), VIP.into(), protocol::TCP, 20);
        let mut frame = ethernet(PUB_MAC, CLIENT_MAC, &[]);
        frame.extend(header);
        refresh_checksums(&mut frame);
        xor_u16(&mut frame, ETHERNET_LEN + 10, 0x1234);
        let before = residual(ip_sum(&frame, ETHERNET_LEN, 20, false));
        let old = u16::from_be_bytes([frame[30], frame[31]]);
        let new = 0x0a0a_u16;
        let check = u16::from_be_bytes([frame[24], frame[25]]);
        let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        set_u16(&mut frame, 24, !(sum as u16));
        set_u16(&mut frame, 30, new);
        assert_eq!(residual(ip_sum(&frame, ETHERNET_LEN, 20, false)), before);
        assert_ne!(before, 0);
    }
}
