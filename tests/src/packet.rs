//! Running the real XDP object on crafted frames through the kernel's `BPF_PROG_TEST_RUN`, for
//! the packet tests and the kernel-level benchmark.
//!
//! `bpf_fib_lookup` answers from the routing and neighbour tables of the network namespace the
//! calling thread is in, so a [`Fixture`] builds a namespace with fixed MAC addresses, routes
//! and permanent neighbours, and moves the thread into it until it is dropped. Expected frames
//! get their checksums from etherparse, an implementation independent of the datapath's
//! incremental updates.

use std::{
    collections::BTreeSet,
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpNumber, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader};
use lb_user::{
    config,
    dataplane::{Dataplane, LoadOptions, XdpDataplane},
    neighbours::{Neighbour, WantedNeighbours},
    services::ServiceTable,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// The tc verdict "carry on": the only one the egress program returns.
pub const TC_ACT_OK: u32 = 0;

pub const VIP: [u8; 4] = [10, 200, 1, 1];
pub const CLIENT: [u8; 4] = [10, 200, 1, 2];
pub const OTHER_HOST: [u8; 4] = [10, 200, 1, 99];
pub const ONE_ARMED_BACKEND: [u8; 4] = [10, 200, 1, 20];
pub const BACKEND_A: [u8; 4] = [10, 200, 2, 10];
pub const BACKEND_B: [u8; 4] = [10, 200, 2, 11];
/// Routed through `back`, but with no neighbour entry.
pub const BACKEND_UNRESOLVED: [u8; 4] = [10, 200, 2, 12];

pub const PUB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const ONE_ARMED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x20];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const BACKEND_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x10];
pub const BACKEND_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];

/// The services a default [`Fixture`] has: web (TCP 80 over two backends), dns (UDP 53),
/// unresolved (a backend without a neighbour entry) and one-armed (a backend on `pub`).
pub const CONFIG: &str = r#"
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
name = "dns"
vip = "10.200.1.1"
port = 53
protocol = "udp"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 5353

[[service]]
name = "unresolved"
vip = "10.200.1.1"
port = 81
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.12"

[[service]]
name = "one-armed"
vip = "10.200.1.1"
port = 82
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.1.20"
"#;

/// Runs `command` (program and arguments); panics if it fails. Returns its standard output.
fn run(command: &[&str]) -> String {
    let output = Command::new(command[0])
        .args(&command[1..])
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ip` with `args` in the fixture's namespace (the test thread is inside it, and a child
/// process starts where its parent thread is); panics if it fails. Returns its output.
pub fn ip(args: &[&str]) -> String {
    run(&[["ip"].as_slice(), args].concat())
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ipv4_text(bytes: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(bytes).to_string()
}

/// A namespace with two veth pairs (`pub` towards clients, `back` towards backends), the
/// loaded datapath, and the test thread inside the namespace.
pub struct Fixture {
    pub dataplane: XdpDataplane,
    pub table: ServiceTable,
    pub pub_ifindex: u32,
    pub back_ifindex: u32,
    /// `NEIGHBOURS_WANTED`, once [`Fixture::drain_wanted_neighbours`] has taken it.
    wanted_neighbours: Option<WantedNeighbours>,
    /// Held for its Drop, and last, so the namespace goes after everything that lives in it.
    _namespace: NamespaceGuard,
}

impl Fixture {
    /// A fixture with [`CONFIG`] and every backend up.
    #[expect(
        clippy::new_without_default,
        reason = "building a fixture creates a network namespace: not a default value"
    )]
    pub fn new() -> Self {
        Self::with_config(CONFIG, &LoadOptions::default())
    }

    /// A fixture with the given services (all backends up) and load options.
    pub fn with_config(config: &str, options: &LoadOptions) -> Self {
        Self::with_kernel_paths(config, options, BTreeSet::new())
    }

    /// Like [`Fixture::with_config`], with the backends at `via_kernel` marked as reached
    /// through the kernel's forwarding (behind a bridge, as lb-user marks them): client packets
    /// for them are translated and passed, their replies left to the tc egress program.
    pub fn with_kernel_paths(
        config: &str,
        options: &LoadOptions,
        via_kernel: BTreeSet<Ipv4Addr>,
    ) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let namespace = format!(
            "lbpt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let original = File::open("/proc/thread-self/ns/net").expect("own network namespace");
        run(&["ip", "netns", "add", &namespace]);
        // From here on the guard removes the namespace, and puts the thread back, whatever
        // fails next: a panic while building must not leak it.
        let guard = NamespaceGuard {
            name: namespace,
            original,
        };
        let mut fixture = Self::build(guard, config, options);
        fixture
            .table
            .set_kernel_paths(via_kernel.into_iter().map(std::net::IpAddr::V4).collect());
        fixture.install();
        fixture
    }

    fn build(namespace: NamespaceGuard, config: &str, options: &LoadOptions) -> Self {
        let ns = namespace.name.clone();
        let ns = ns.as_str();
        let pub_peer = [0x02, 0, 0, 0, 0x01, 0xfe];
        let back_peer = [0x02, 0, 0, 0, 0x02, 0xfe];
        run(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            "pub",
            "address",
            &mac(PUB_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "pub-peer",
            "address",
            &mac(pub_peer),
        ]);
        run(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            "back",
            "address",
            &mac(BACK_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "back-peer",
            "address",
            &mac(back_peer),
        ]);
        for link in ["lo", "pub", "pub-peer", "back", "back-peer"] {
            run(&["ip", "-n", ns, "link", "set", link, "up"]);
        }
        run(&["ip", "-n", ns, "addr", "add", "10.200.1.1/24", "dev", "pub"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            "10.200.2.1/24",
            "dev",
            "back",
        ]);
        for (addr, lladdr, dev) in [
            (CLIENT, CLIENT_MAC, "pub"),
            (ONE_ARMED_BACKEND, ONE_ARMED_MAC, "pub"),
            (BACKEND_A, BACKEND_A_MAC, "back"),
            (BACKEND_B, BACKEND_B_MAC, "back"),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                &ipv4_text(addr),
                "lladdr",
                &mac(lladdr),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
        ]);

        let target = File::open(format!("/run/netns/{ns}")).expect("namespace file");
        // SAFETY: setns on this thread only; Drop switches it back.
        let entered = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            entered,
            0,
            "setns into {ns}: {}",
            std::io::Error::last_os_error()
        );
        // One CPU, so the per-CPU round-robin cursor makes scheduling predictable.
        pin_to_first_allowed_cpu();

        let ifindex = |name: &str| {
            let name = std::ffi::CString::new(name).expect("no NUL");
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "interface {name:?} missing");
            index
        };
        let verifier_log = std::env::temp_dir().join(format!("{ns}-verifier.log"));
        let dataplane =
            XdpDataplane::load_with(&verifier_log, options).expect("the datapath loads");
        let config = config::parse(config).expect("test config is valid");
        let table = ServiceTable::new(&config, options.schedule_size).expect("ids and table space");
        Self {
            pub_ifindex: ifindex("pub"),
            back_ifindex: ifindex("back"),
            wanted_neighbours: None,
            _namespace: namespace,
            dataplane,
            table,
        }
    }

    /// Writes the services and marks every backend up.
    pub fn install(&mut self) {
        self.table
            .install(&mut self.dataplane)
            .expect("install services");
        for service in 0..self.table.services.len() {
            for backend in 0..self.table.services[service].backends.len() {
                self.set_up(service, backend, true);
            }
        }
    }

    /// Marks backend `backend` (its position in the configuration) of service `service` up or
    /// down.
    pub fn set_up(&mut self, service: usize, backend: usize, up: bool) {
        let id = self.table.services[service].backends[backend].id;
        self.table
            .set_backend_up(id, up, &mut self.dataplane)
            .expect("update");
    }

    /// Runs one frame through the program as if it arrived on `ifindex`.
    pub fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data = 0 and data_end = the frame's length.
        let context: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|field| field.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .program()
            .expect("program")
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&context),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs one frame through the tc egress program, as if it were leaving an interface it is
    /// attached to. The kernel makes an sk_buff of it (no partial checksum: a test run cannot
    /// set one) and returns the frame as the program left it.
    pub fn run_egress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .egress_program()
            .expect("egress program")
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN of the egress program");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub fn counter(&self, index: u32) -> u64 {
        self.dataplane.counters().expect("counters")[index as usize]
    }

    /// Empties `NEIGHBOURS_WANTED` as lb-user does, and returns the next hops it held.
    pub fn drain_wanted_neighbours(&mut self) -> Vec<Neighbour> {
        let wanted = match &mut self.wanted_neighbours {
            Some(wanted) => wanted,
            None => self.wanted_neighbours.insert(
                self.dataplane
                    .take_wanted_neighbours()
                    .expect("the NEIGHBOURS_WANTED map"),
            ),
        };
        wanted.drain().expect("draining NEIGHBOURS_WANTED")
    }

    /// Adds IPv6 to the namespace: [`VIP6`]'s /80 on `pub`, the backend side's on `back`,
    /// permanent neighbours for the client, a router and both backends, and forwarding.
    pub fn add_ipv6(&self) {
        let text = |addr: [u8; 16]| std::net::Ipv6Addr::from(addr).to_string();
        let vip = format!("{}/80", text(VIP6));
        let back = format!("{}/80", text(address6(2, 1)));
        run(&["ip", "-6", "addr", "add", &vip, "dev", "pub", "nodad"]);
        run(&["ip", "-6", "addr", "add", &back, "dev", "back", "nodad"]);
        for (addr, lladdr, dev) in [
            (CLIENT6, CLIENT_MAC, "pub"),
            (ROUTER6, CLIENT_MAC, "pub"),
            (BACKEND6_A, BACKEND_A_MAC, "back"),
            (BACKEND6_B, BACKEND_B_MAC, "back"),
        ] {
            let (addr, lladdr) = (text(addr), mac(lladdr));
            run(&[
                "ip",
                "-6",
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &lladdr,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    }
}

/// IPv6 services for a fixture with [`Fixture::add_ipv6`], in this order: web6 (TCP 80 on
/// [`VIP6`], [`BACKEND6_A`] and [`BACKEND6_B`] port 8080 round robin), dns6 (UDP 53 to A:5353),
/// pair6 (UDP 6000, A and B round robin) and sticky6 (UDP 7000 on fd00:200::1:0:0:5, Maglev
/// over the 3-tuple).
pub const CONFIG6: &str = r#"
[[service]]
name = "web6"
vip = "fd00:200::1:0:0:1"
port = 80
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:10"
port = 8080
[[service.backend]]
address = "fd00:200::2:0:0:11"
port = 8080

[[service]]
name = "dns6"
vip = "fd00:200::1:0:0:1"
port = 53
protocol = "udp"
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:10"
port = 5353

[[service]]
name = "pair6"
vip = "fd00:200::1:0:0:1"
port = 6000
protocol = "udp"
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:10"
[[service.backend]]
address = "fd00:200::2:0:0:11"

[[service]]
name = "sticky6"
vip = "fd00:200::1:0:0:5"
port = 7000
protocol = "udp"
scheduler = "maglev"
maglev_table_size = 211
maglev_key = "3-tuple"
[service.health_check]
kind = "none"
[[service.backend]]
address = "fd00:200::2:0:0:10"
[[service.backend]]
address = "fd00:200::2:0:0:11"
"#;

/// Addresses inside fd00:200::/64 for IPv6 packet tests ([`Fixture::add_ipv6`]): the client
/// side (`pub`) is fd00:200::1:0:0:0/80, the backend side (`back`) fd00:200::2:0:0:0/80.
pub const fn address6(subnet: u8, host: u8) -> [u8; 16] {
    [0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, subnet, 0, 0, 0, 0, 0, host]
}
pub const VIP6: [u8; 16] = address6(1, 1);
pub const CLIENT6: [u8; 16] = address6(1, 2);
pub const ROUTER6: [u8; 16] = address6(1, 0x99);
pub const BACKEND6_A: [u8; 16] = address6(2, 0x10);
pub const BACKEND6_B: [u8; 16] = address6(2, 0x11);

/// The fixture's namespace: deleted, with the thread moved back to where it started, on drop.
struct NamespaceGuard {
    name: String,
    original: File,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        // SAFETY: back to the namespace this thread started in (harmless if never left).
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!("could not delete namespace {}: {status:?}", self.name);
        }
    }
}

fn pin_to_first_allowed_cpu() {
    // SAFETY: plain affinity syscalls on this thread with a zeroed, then filled, cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        let cpu = (0..libc::CPU_SETSIZE as usize).find(|&cpu| libc::CPU_ISSET(cpu, &set));
        let mut only = std::mem::zeroed();
        libc::CPU_SET(cpu.expect("some CPU allowed"), &mut only);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &only),
            0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Frames and the independent checks.

pub struct Tcp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub syn: bool,
    pub payload: &'static [u8],
}

impl Tcp {
    pub fn from_client(dst_port: u16, src_port: u16) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: PUB_MAC,
            src: CLIENT,
            dst: VIP,
            src_port,
            dst_port,
            syn: true,
            payload: b"",
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(self.src_mac, self.dst_mac)
            .ipv4(self.src, self.dst, 64)
            .tcp(self.src_port, self.dst_port, 0x1234_5678, 64240);
        let builder = if self.syn {
            builder.syn()
        } else {
            builder.ack(0x0102_0304)
        };
        let mut frame = Vec::new();
        builder
            .write(&mut frame, self.payload)
            .expect("build frame");
        frame
    }
}

/// A UDP frame over IPv6 from the client's MAC to the public interface's.
pub fn udp6_frame(
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(src, dst, 64)
        .udp(src_port, dst_port)
        .write(&mut frame, payload)
        .expect("build frame");
    frame
}

/// A TCP ACK with `payload` over IPv6, from the client's MAC to the public interface's.
pub fn tcp6_ack_frame(
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(src, dst, 64)
        .tcp(src_port, dst_port, 1, 64_240)
        .ack(1)
        .write(&mut frame, payload)
        .expect("build frame");
    frame
}

/// 802.1Q's and 802.1ad's tag EtherTypes.
pub const DOT1Q: [u8; 2] = [0x81, 0x00];
pub const DOT1AD: [u8; 2] = [0x88, 0xa8];

/// `frame` with `tags` (each: EtherType, TCI) inserted after the MAC addresses, outermost first.
pub fn vlan_tagged(frame: &[u8], tags: &[([u8; 2], u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (ether_type, tci) in tags {
        out.extend_from_slice(ether_type);
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

pub fn udp_frame(dst_port: u16, src_port: u16, zero_checksum: bool) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .udp(src_port, dst_port)
        .write(&mut frame, b"a dns query, more or less")
        .expect("build frame");
    if zero_checksum {
        frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    }
    frame
}

/// An ICMPv6 error frame from `src` to `dst` quoting `quoted` (an IPv6 packet, no Ethernet);
/// `macs` are the source and destination MAC addresses.
pub fn icmp6_error(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    kind: etherparse::Icmpv6Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, 64)
        .icmpv6(kind)
        .write(&mut frame, quoted)
        .expect("build");
    frame
}

/// Offsets of the checksum fields in an Ethernet + IPv4 + TCP/UDP frame.
fn checksum_offsets(frame: &[u8]) -> (usize, usize) {
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    let l4_check = if frame[23] == 6 { l4 + 16 } else { l4 + 6 };
    (24, l4_check)
}

/// `frame` with its IPv4 and transport checksums recomputed from scratch by etherparse.
/// An IPv4 UDP checksum of zero (none) is kept.
pub fn with_fresh_checksums(mut frame: Vec<u8>) -> Vec<u8> {
    let (ip_header, _) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
    let (ip_check, l4_check) = checksum_offsets(&frame);
    frame[ip_check..ip_check + 2].copy_from_slice(&ip_header.calc_header_checksum().to_be_bytes());
    let l4 = 14 + ip_header.header_len();
    let end = 14 + usize::from(ip_header.total_len);
    let checksum = if ip_header.protocol == IpNumber::TCP {
        let (tcp, _) = TcpHeader::from_slice(&frame[l4..end]).expect("TCP header");
        tcp.calc_checksum_ipv4(&ip_header, &frame[l4 + tcp.header_len()..end])
            .expect("sum")
    } else {
        let (udp, _) = UdpHeader::from_slice(&frame[l4..end]).expect("UDP header");
        if udp.checksum == 0 {
            0
        } else {
            udp.calc_checksum_ipv4(&ip_header, &frame[l4 + 8..end])
                .expect("sum")
        }
    };
    frame[l4_check..l4_check + 2].copy_from_slice(&checksum.to_be_bytes());
    frame
}

/// Compares two frames byte for byte, except that a transport checksum may be 0x0000 where
/// the other has 0xffff: both are the same ones'-complement value (TCP only; UDP maps 0).
pub fn assert_frames_equal(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: frame length");
    let (_, l4_check) = checksum_offsets(expected);
    let equivalent = |a: &[u8], b: &[u8]| {
        a == b || (expected[23] == 6 && [a, b].iter().all(|c| *c == [0, 0] || *c == [0xff, 0xff]))
    };
    for (offset, (a, e)) in actual.iter().zip(expected).enumerate() {
        if offset == l4_check || offset == l4_check + 1 {
            continue;
        }
        assert_eq!(
            a, e,
            "{what}: byte {offset} differs\nactual   {actual:02x?}\nexpected {expected:02x?}"
        );
    }
    assert!(
        equivalent(
            &actual[l4_check..l4_check + 2],
            &expected[l4_check..l4_check + 2]
        ),
        "{what}: transport checksum {:02x?}, expected {:02x?}",
        &actual[l4_check..l4_check + 2],
        &expected[l4_check..l4_check + 2]
    );
}

/// What a client frame should look like after translation towards `backend`.
pub fn expected_forward(
    input: &[u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    backend: [u8; 4],
    port: u16,
) -> Vec<u8> {
    let mut frame = input.to_vec();
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame[30..34].copy_from_slice(&backend);
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    frame[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
    with_fresh_checksums(frame)
}

// ---------------------------------------------------------------------------------------------
// Fragments: split, reassembled and checked independently of the datapath.

/// A whole UDP datagram from the client to the VIP with IP ID `id` and `len` payload bytes of
/// a fixed pattern; checksums from etherparse.
pub fn udp_datagram(id: u16, src_port: u16, dst_port: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|index| (index * 7 % 251) as u8).collect();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .udp(src_port, dst_port)
        .write(&mut frame, &payload)
        .expect("build frame");
    with_ip_id(frame, id)
}

/// A whole TCP segment (ACK, with `len` payload bytes) from the client to the VIP, IP ID `id`.
pub fn tcp_datagram(id: u16, src_port: u16, dst_port: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|index| (index * 13 % 253) as u8).collect();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .tcp(src_port, dst_port, 0x1234_5678, 64240)
        .ack(0x0102_0304)
        .write(&mut frame, &payload)
        .expect("build frame");
    with_ip_id(frame, id)
}

/// `frame` with IP ID `id` and a header checksum computed afresh.
fn with_ip_id(mut frame: Vec<u8>, id: u16) -> Vec<u8> {
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
    header.identification = id;
    let mut bytes = Vec::new();
    header.write(&mut bytes).expect("write header");
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

/// Splits a whole IPv4 frame into fragments, cutting its IP payload at `cuts` (multiples of 8,
/// ascending). Each fragment keeps the Ethernet header and the IP header (with MF and offset
/// set, total length and checksum computed by etherparse).
pub fn split(frame: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let (header, _) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
    let start = 14 + header.header_len();
    let payload = &frame[start..14 + usize::from(header.total_len)];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(payload.len());
    bounds
        .windows(2)
        .map(|bound| {
            let (from, to) = (bound[0], bound[1]);
            assert_eq!(from % 8, 0, "fragment offsets are multiples of 8");
            let mut piece = header.clone();
            piece.dont_fragment = false;
            piece.more_fragments = to < payload.len();
            piece.fragment_offset =
                etherparse::IpFragOffset::try_new((from / 8) as u16).expect("offset");
            piece
                .set_payload_len(to - from)
                .expect("fits an IPv4 packet");
            let mut out = frame[..14].to_vec();
            piece.write(&mut out).expect("write header");
            out.extend_from_slice(&payload[from..to]);
            out
        })
        .collect()
}

/// How to cut a datagram: identification, cuts of the fragmentable part (multiples of 8,
/// ascending; none for an atomic fragment), and whether a hop-by-hop header precedes the
/// fragment header.
pub struct Cut<'a> {
    pub id: u32,
    pub cuts: &'a [usize],
    pub hop_by_hop: bool,
}

impl<'a> Cut<'a> {
    /// Without a hop-by-hop header, at `cuts`.
    pub const fn at(id: u32, cuts: &'a [usize]) -> Self {
        Cut {
            id,
            cuts,
            hop_by_hop: false,
        }
    }

    /// Without a hop-by-hop header, at `cuts`: pieces of 1448 bytes fit an MTU of 1500 (40
    /// bytes of fixed header, 8 of fragment header).
    pub const fn plain(id: u32) -> Cut<'static> {
        Cut::at(id, &[1448, 2896])
    }
}

/// Cuts a whole IPv6 frame (Ethernet, fixed header, transport header and payload) into
/// fragments as RFC 8200 does: each keeps the Ethernet and fixed headers (payload length
/// adjusted), the unfragmentable part (a hop-by-hop header if asked), a fragment header with
/// the offset, M and identification, then its piece.
pub fn fragment6(whole: &[u8], cut: &Cut) -> Vec<Vec<u8>> {
    let transport = whole[20];
    let fragmentable = &whole[54..];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cut.cuts);
    bounds.push(fragmentable.len());
    bounds
        .windows(2)
        .map(|bound| {
            let (from, to) = (bound[0], bound[1]);
            assert_eq!(from % 8, 0, "fragment offsets are multiples of 8");
            let more = u16::from(to < fragmentable.len());
            let mut extensions = Vec::new();
            if cut.hop_by_hop {
                // Next: the fragment header; PadN over the rest.
                extensions.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
            }
            extensions.extend_from_slice(&[transport, 0]);
            extensions.extend_from_slice(&((from as u16) | more).to_be_bytes());
            extensions.extend_from_slice(&cut.id.to_be_bytes());
            let mut out = whole[..54].to_vec();
            // Hop-by-hop options (0) or the fragment header (44) after the fixed header.
            out[20] = if cut.hop_by_hop { 0 } else { 44 };
            let payload_len = (extensions.len() + to - from) as u16;
            out[18..20].copy_from_slice(&payload_len.to_be_bytes());
            out.extend_from_slice(&extensions);
            out.extend_from_slice(&fragmentable[from..to]);
            out
        })
        .collect()
}

/// Puts fragments (any order) back together into one whole frame, as the receiver's kernel
/// would: the first fragment's Ethernet and IP header, the payloads at their offsets, MF and
/// offset cleared, total length and header checksum computed afresh. Panics on a gap or on
/// fragments that disagree about the datagram they belong to.
pub fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut pieces: Vec<(Ipv4Header, &[u8])> = fragments
        .iter()
        .map(|frame| {
            let (header, rest) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
            let len = usize::from(header.total_len) - header.header_len();
            (header, &rest[..len])
        })
        .collect();
    pieces.sort_by_key(|(header, _)| header.fragment_offset.value());
    let (first, _) = &pieces[0];
    let mut payload = Vec::new();
    for (header, data) in &pieces {
        assert_eq!(
            (
                header.source,
                header.destination,
                header.identification,
                header.protocol
            ),
            (
                first.source,
                first.destination,
                first.identification,
                first.protocol
            ),
            "fragments of one datagram"
        );
        assert_eq!(
            usize::from(header.fragment_offset.value()) * 8,
            payload.len(),
            "no gap, no overlap"
        );
        payload.extend_from_slice(data);
    }
    assert!(
        !pieces[pieces.len() - 1].0.more_fragments,
        "the last fragment came"
    );
    let mut whole = first.clone();
    whole.more_fragments = false;
    whole.fragment_offset = etherparse::IpFragOffset::ZERO;
    whole.set_payload_len(payload.len()).expect("fits");
    let first_frame = fragments
        .iter()
        .find(|frame| frame[20] & 0x1f == 0 && frame[21] == 0)
        .expect("a first fragment");
    let mut out = first_frame[..14].to_vec();
    whole.write(&mut out).expect("write header");
    out.extend_from_slice(&payload);
    out
}

/// Checks a whole frame's IPv4 and transport checksums by computing them from scratch.
pub fn assert_checksums_valid(frame: &[u8], what: &str) {
    let fresh = with_fresh_checksums(frame.to_vec());
    assert_frames_equal(frame, &fresh, what);
}
