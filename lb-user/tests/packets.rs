//! Packet tests: the real XDP object, loaded through the verifier and run on crafted frames by
//! the kernel's `BPF_PROG_TEST_RUN`. Every rewritten frame is compared byte for byte with an
//! expected frame whose checksums are computed from scratch by etherparse, an implementation
//! independent of the datapath's incremental updates.
//!
//! `bpf_fib_lookup` answers from the routing and neighbour tables of the network namespace the
//! test thread is in, so each test builds a namespace with fixed MAC addresses, routes and
//! permanent neighbours, and enters it. Needs root; see `require_privileges`.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpNumber, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader};
use lb_common::counter;
use lb_user::{
    config,
    dataplane::{Dataplane, XdpDataplane},
    services::ServiceTable,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const VIP: [u8; 4] = [10, 200, 1, 1];
const CLIENT: [u8; 4] = [10, 200, 1, 2];
const OTHER_HOST: [u8; 4] = [10, 200, 1, 99];
const ONE_ARMED_BACKEND: [u8; 4] = [10, 200, 1, 20];
const BACKEND_A: [u8; 4] = [10, 200, 2, 10];
const BACKEND_B: [u8; 4] = [10, 200, 2, 11];
/// Routed through `back`, but with no neighbour entry.
const BACKEND_UNRESOLVED: [u8; 4] = [10, 200, 2, 12];

const PUB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const ONE_ARMED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x20];
const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const BACKEND_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x10];
const BACKEND_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];

const CONFIG: &str = r#"
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

/// True when the test may run. Without root: fails if `LB_REQUIRE_PRIVILEGED=1` (the README's
/// test command sets it), otherwise says loudly that it skipped.
fn require_privileges(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root (BPF and network namespaces), and LB_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("SKIPPED: {test} needs root (BPF_PROG_TEST_RUN and network namespaces)");
    false
}

fn run(command: &[&str]) {
    let output = Command::new(command[0])
        .args(&command[1..])
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip(bytes: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(bytes).to_string()
}

/// A namespace with two veth pairs (`pub` towards clients, `back` towards backends), the
/// loaded datapath, and the test thread inside the namespace.
struct Fixture {
    namespace: String,
    original: File,
    dataplane: XdpDataplane,
    table: ServiceTable,
    pub_ifindex: u32,
    back_ifindex: u32,
}

impl Fixture {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let namespace = format!(
            "lbpt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &namespace]);
        let original = File::open("/proc/thread-self/ns/net").expect("own network namespace");
        // From here on, Drop removes the namespace whatever fails next.
        let mut fixture = Self::build(namespace, original);
        fixture.install();
        fixture
    }

    fn build(namespace: String, original: File) -> Self {
        let ns = namespace.as_str();
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
                &ip(addr),
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
        let dataplane = XdpDataplane::load(&verifier_log).expect("the datapath loads");
        let table = ServiceTable::new(&config::parse(CONFIG).expect("test config is valid"));
        Self {
            pub_ifindex: ifindex("pub"),
            back_ifindex: ifindex("back"),
            namespace,
            original,
            dataplane,
            table,
        }
    }

    /// Writes the services and marks every backend up.
    fn install(&mut self) {
        self.table
            .install(&mut self.dataplane)
            .expect("install services");
        for service in 0..self.table.services.len() {
            for backend in 0..self.table.services[service].backends.len() {
                self.set_up(service, backend, true);
            }
        }
    }

    fn set_up(&mut self, service: usize, backend: usize, up: bool) {
        self.table
            .set_backend_up(service, backend, up, &mut self.dataplane)
            .expect("update");
    }

    /// Runs one frame through the program as if it arrived on `ifindex`.
    fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
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

    fn counter(&self, index: u32) -> u64 {
        self.dataplane.counters().expect("counters")[index as usize]
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: back to the namespace this thread started in.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let status = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!("could not delete namespace {}: {status:?}", self.namespace);
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

struct Tcp {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    src_port: u16,
    dst_port: u16,
    syn: bool,
    payload: &'static [u8],
}

impl Tcp {
    fn from_client(dst_port: u16, src_port: u16) -> Self {
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

    fn frame(&self) -> Vec<u8> {
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

fn udp_frame(dst_port: u16, src_port: u16, zero_checksum: bool) -> Vec<u8> {
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

/// Offsets of the checksum fields in an Ethernet + IPv4 + TCP/UDP frame.
fn checksum_offsets(frame: &[u8]) -> (usize, usize) {
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    let l4_check = if frame[23] == 6 { l4 + 16 } else { l4 + 6 };
    (24, l4_check)
}

/// `frame` with its IPv4 and transport checksums recomputed from scratch by etherparse.
/// An IPv4 UDP checksum of zero (none) is kept.
fn with_fresh_checksums(mut frame: Vec<u8>) -> Vec<u8> {
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
fn assert_frames_equal(actual: &[u8], expected: &[u8], what: &str) {
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
fn expected_forward(
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
// The tests.

#[test]
fn syn_to_a_service_is_translated_to_a_backend_and_redirected() {
    if !require_privileges("syn_to_a_service_is_translated_to_a_backend_and_redirected") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(80, 40000).frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);

    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN towards backend A");
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 1);
    assert_eq!(fixture.counter(counter::FLOW_MISS), 1);
    let web = fixture.dataplane.service_stats(0).expect("stats");
    assert_eq!(
        (web.packets, web.new_flows, web.bytes),
        (1, 1, syn.len() as u64)
    );
    assert_eq!(
        fixture.dataplane.backend_stats(0).expect("stats").new_flows,
        1
    );
}

#[test]
fn a_flow_sticks_to_its_backend_and_new_flows_go_round_robin() {
    if !require_privileges("a_flow_sticks_to_its_backend_and_new_flows_go_round_robin") {
        return;
    }
    let mut fixture = Fixture::new();
    let first = Tcp::from_client(80, 40001).frame();
    let (_, out) = fixture.run(&first, fixture.pub_ifindex);
    assert_eq!(&out[30..34], &BACKEND_A);

    // The second flow goes to the other backend...
    let second = Tcp::from_client(80, 40002).frame();
    let (_, out) = fixture.run(&second, fixture.pub_ifindex);
    assert_eq!(&out[30..34], &BACKEND_B);
    assert_eq!(&out[0..6], &BACKEND_B_MAC);

    // ...and every later packet of the first flow, data included, stays on backend A even
    // though the round-robin cursor has moved on.
    for _ in 0..3 {
        let data = Tcp {
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..Tcp::from_client(80, 40001)
        };
        let frame = data.frame();
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        let expected = expected_forward(&frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
        assert_frames_equal(&out, &expected, "data packet of flow 1");
    }
    assert_eq!(fixture.counter(counter::FLOW_MISS), 2);
    assert_eq!(fixture.counter(counter::FLOW_HIT), 3);
    assert_eq!(
        fixture.dataplane.backend_stats(0).expect("stats").packets,
        4
    );
    assert_eq!(
        fixture.dataplane.backend_stats(1).expect("stats").packets,
        1
    );
}

#[test]
fn a_backend_reply_is_translated_back_to_the_service() {
    if !require_privileges("a_backend_reply_is_translated_back_to_the_service") {
        return;
    }
    let mut fixture = Fixture::new();
    let (_, _) = fixture.run(&Tcp::from_client(80, 40003).frame(), fixture.pub_ifindex);

    let reply = Tcp {
        src_mac: BACKEND_A_MAC,
        dst_mac: BACK_MAC,
        src: BACKEND_A,
        dst: CLIENT,
        src_port: 8080,
        dst_port: 40003,
        syn: false,
        payload: b"HTTP/1.1 200 OK\r\n\r\nbackend A",
    }
    .frame();
    let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);

    assert_eq!(verdict, XDP_REDIRECT);
    let mut expected = reply.clone();
    expected[0..6].copy_from_slice(&CLIENT_MAC);
    expected[6..12].copy_from_slice(&PUB_MAC);
    expected[26..30].copy_from_slice(&VIP);
    expected[34..36].copy_from_slice(&80u16.to_be_bytes());
    assert_frames_equal(
        &out,
        &with_fresh_checksums(expected),
        "reply from backend A",
    );
    assert_eq!(fixture.counter(counter::REPLY_REDIRECT), 1);
    let stats = fixture.dataplane.backend_stats(0).expect("stats");
    assert_eq!(
        (stats.reply_packets, stats.reply_bytes),
        (1, reply.len() as u64)
    );

    // The same backend answering a client it has no balanced flow with is not ours.
    let unrelated = Tcp {
        dst_port: 40999,
        ..Tcp {
            src_mac: BACKEND_A_MAC,
            dst_mac: BACK_MAC,
            src: BACKEND_A,
            dst: CLIENT,
            src_port: 8080,
            dst_port: 0,
            syn: false,
            payload: b"",
        }
    }
    .frame();
    let (verdict, out) = fixture.run(&unrelated, fixture.back_ifindex);
    assert_eq!((verdict, out.as_slice()), (XDP_PASS, unrelated.as_slice()));
}

#[test]
fn traffic_that_is_not_for_a_service_passes_byte_for_byte() {
    if !require_privileges("traffic_that_is_not_for_a_service_passes_byte_for_byte") {
        return;
    }
    let mut fixture = Fixture::new();
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP);

    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(
            [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .tcp(40000, 80, 1, 1000)
        .syn()
        .write(&mut ipv6, b"")
        .expect("build");

    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut icmp, b"ping")
        .expect("build");

    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "SSH to the VIP's address",
            Tcp::from_client(22, 50000).frame(),
            counter::PASS_NOT_SERVICE,
        ),
        (
            "TCP to another host",
            Tcp {
                dst: OTHER_HOST,
                ..Tcp::from_client(80, 50001)
            }
            .frame(),
            counter::PASS_NOT_SERVICE,
        ),
        (
            "UDP to a port without a service",
            udp_frame(54, 50002, false),
            counter::PASS_NOT_SERVICE,
        ),
        ("ARP request for the VIP", arp, counter::PASS_NOT_IPV4),
        ("IPv6 TCP to port 80", ipv6, counter::PASS_NOT_IPV4),
        ("ICMP echo to the VIP", icmp, counter::PASS_NOT_TCP_UDP),
    ];
    for (what, frame, reason) in cases {
        let before = fixture.counter(reason);
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: must pass unchanged");
        assert_eq!(
            fixture.counter(reason),
            before + 1,
            "{what}: counted under {reason}"
        );
    }
    assert_eq!(fixture.counter(counter::FLOW_MISS), 0);
}

#[test]
fn truncated_headers_are_counted_and_never_read_past_the_end() {
    if !require_privileges("truncated_headers_are_counted_and_never_read_past_the_end") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(80, 40004).frame();
    let udp = udp_frame(53, 40005, false);
    let to_other_host = Tcp {
        dst: OTHER_HOST,
        ..Tcp::from_client(80, 40006)
    }
    .frame();
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let mut long_ihl = syn.clone();
    long_ihl[14] = 0x4f; // claims 60 header bytes; the frame has 40 after Ethernet

    // A frame shorter than an Ethernet header cannot be tested: BPF_PROG_TEST_RUN refuses
    // inputs under 14 bytes (EINVAL). The program checks for it anyway, as the verifier demands.
    let cases: Vec<(&str, Vec<u8>, u32, u32)> = vec![
        (
            "Ethernet only",
            syn[..14].to_vec(),
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "IPv4 header cut",
            syn[..14 + 12].to_vec(),
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "IHL below 5",
            bad_ihl,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "IHL past the end",
            long_ihl,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "TCP header cut, to the VIP",
            syn[..14 + 20 + 10].to_vec(),
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "UDP header cut, to the VIP",
            udp[..14 + 20 + 4].to_vec(),
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "TCP header cut, to another host",
            to_other_host[..14 + 20 + 10].to_vec(),
            XDP_PASS,
            counter::PASS_NOT_SERVICE,
        ),
    ];
    for (what, frame, expected_verdict, reason) in cases {
        let before = fixture.counter(reason);
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, expected_verdict, "{what}");
        assert_eq!(out, frame, "{what}: must not be modified");
        assert_eq!(
            fixture.counter(reason),
            before + 1,
            "{what}: counted under {reason}"
        );
    }
    assert_eq!(
        fixture.counter(counter::FLOW_MISS),
        0,
        "no truncated packet was scheduled"
    );
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    if !require_privileges("udp_is_translated_and_a_zero_checksum_stays_zero") {
        return;
    }
    let mut fixture = Fixture::new();
    for (zero_checksum, src_port) in [(false, 41000), (true, 41001)] {
        let frame = udp_frame(53, src_port, zero_checksum);
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        let expected = expected_forward(&frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 5353);
        assert_frames_equal(&out, &expected, "UDP to the dns service");
        let check = &out[14 + 20 + 6..14 + 20 + 8];
        if zero_checksum {
            assert_eq!(
                check,
                [0, 0],
                "a UDP checksum of 0 means none and must stay 0"
            );
        } else {
            assert_ne!(check, [0, 0]);
        }
    }
    assert_eq!(
        fixture.dataplane.service_stats(1).expect("stats").new_flows,
        2
    );
}

#[test]
fn ip_options_are_kept_and_the_packet_is_balanced() {
    if !require_privileges("ip_options_are_kept_and_the_packet_is_balanced") {
        return;
    }
    let mut fixture = Fixture::new();
    let mut header = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT, VIP).expect("header");
    header.options = [1u8, 1, 1, 0][..]
        .try_into()
        .expect("4 bytes of options (NOP NOP NOP EOL)");
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
        .tcp(40007, 80, 1, 1000)
        .syn()
        .write(&mut frame, b"")
        .expect("build");
    assert_eq!(frame[14], 0x46);

    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN with IP options");
}

#[test]
fn a_flow_whose_backend_went_down_is_rescheduled() {
    if !require_privileges("a_flow_whose_backend_went_down_is_rescheduled") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(80, 40008).frame();
    let (_, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(&out[30..34], &BACKEND_A);

    fixture.set_up(0, 0, false);
    let data = Tcp {
        syn: false,
        ..Tcp::from_client(80, 40008)
    }
    .frame();
    let (verdict, out) = fixture.run(&data, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_frames_equal(
        &out,
        &expected_forward(&data, BACK_MAC, BACKEND_B_MAC, BACKEND_B, 8080),
        "flow moved to backend B",
    );
    assert_eq!(fixture.counter(counter::FLOW_RESCHEDULED), 1);
    assert_eq!(
        fixture
            .dataplane
            .backend_stats(1)
            .expect("stats")
            .rescheduled,
        1
    );

    // Backend A coming back does not pull the flow back.
    fixture.set_up(0, 0, true);
    let (_, out) = fixture.run(&data, fixture.pub_ifindex);
    assert_eq!(&out[30..34], &BACKEND_B);
}

#[test]
fn a_service_without_backends_up_drops_and_counts() {
    if !require_privileges("a_service_without_backends_up_drops_and_counts") {
        return;
    }
    let mut fixture = Fixture::new();
    fixture.set_up(0, 0, false);
    fixture.set_up(0, 1, false);
    let syn = Tcp::from_client(80, 40009).frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!((verdict, out), (XDP_DROP, syn));
    assert_eq!(fixture.counter(counter::DROP_NO_BACKEND), 1);
}

#[test]
fn an_unresolved_next_hop_goes_to_the_kernel_translated() {
    if !require_privileges("an_unresolved_next_hop_goes_to_the_kernel_translated") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(81, 40010).frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(
        verdict, XDP_PASS,
        "the kernel must get the chance to resolve the neighbour"
    );
    // Translated, Ethernet header untouched: the kernel forwards it and runs ARP meanwhile.
    let mut expected = expected_forward(&syn, PUB_MAC, CLIENT_MAC, BACKEND_UNRESOLVED, 81);
    expected[0..12].copy_from_slice(&syn[0..12]);
    assert_frames_equal(&out, &expected, "SYN to an unresolved backend");
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 1);
}

#[test]
fn a_backend_on_the_client_interface_is_reached_with_xdp_tx() {
    if !require_privileges("a_backend_on_the_client_interface_is_reached_with_xdp_tx") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(82, 40011).frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_TX);
    let expected = expected_forward(&syn, PUB_MAC, ONE_ARMED_MAC, ONE_ARMED_BACKEND, 82);
    assert_frames_equal(&out, &expected, "SYN to a one-armed backend");
    assert_eq!(fixture.counter(counter::FORWARD_TX), 1);
}
