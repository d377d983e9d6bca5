//! The host's own traffic takes a shortcut through the datapath (`is_plain_host_traffic` in
//! lb-ebpf): a plain, untagged IPv4 or IPv6 TCP or UDP frame whose ports are in neither the
//! service nor the backend port bitmap passes at once, counted `pass_not_service`. The claim
//! is that the full parse would do exactly the same with any such frame. These tests hold the
//! shortcut to it:
//!
//! - every frame of a large set of mutations of plain frames runs as it is (the shortcut may
//!   take it) and again behind an 802.1Q tag (the shortcut never takes a tagged frame, and the
//!   full parse steps over the tag and treats the rest alike): either both runs are the
//!   shortcut's outcome (XDP_PASS, the frame untouched, `pass_not_service` and no other
//!   counter moved by one) or neither is;
//! - the edges of the bitmap (ports 0, 1, 63, 64, 65535) give each port its own bit;
//! - hand-written edge cases get the verdict and the one counter the full parse gives them.
//!
//! Needs root; without it each test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use etherparse::PacketBuilder;
use lb_common::{counter, protocol};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{Dataplane, LoadOptions};

const OTHER6: [u8; 16] = address6(1, 0x98);

/// What one run did: its verdict, the frame it left, and how much each counter moved.
struct Outcome {
    verdict: u32,
    out: Vec<u8>,
    moved: Vec<(u32, u64)>,
}

impl Outcome {
    /// Whether this is what the shortcut does with `input`: passed untouched, counted
    /// `pass_not_service` once and nothing else.
    fn is_early_pass(&self, input: &[u8]) -> bool {
        self.verdict == XDP_PASS
            && self.out == input
            && self.moved == [(counter::PASS_NOT_SERVICE, 1)]
    }
}

/// Runs `frame` as if it arrived on `pub`, with the counters read before and after.
fn run(fixture: &mut Fixture, frame: &[u8]) -> Outcome {
    let before = fixture.dataplane.counters().expect("counters");
    let (verdict, out) = fixture.run(frame, fixture.pub_ifindex);
    let after = fixture.dataplane.counters().expect("counters");
    let moved = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (before, after))| before != after)
        .map(|(index, (before, after))| (index as u32, after - before))
        .collect();
    Outcome {
        verdict,
        out,
        moved,
    }
}

/// The counters' names, for failure messages.
fn names(moved: &[(u32, u64)]) -> Vec<(&'static str, u64)> {
    moved
        .iter()
        .map(|&(index, by)| (counter::NAMES[index as usize], by))
        .collect()
}

/// The default fixture with the IPv6 services of [`CONFIG6`] beside the IPv4 ones.
fn fixture_with_both_families() -> Fixture {
    let config = format!("{CONFIG}\n{CONFIG6}");
    let fixture = Fixture::with_config(&config, &LoadOptions::default());
    fixture.add_ipv6();
    fixture
}

fn udp4(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(src, dst, 64)
        .udp(ports.0, ports.1)
        .write(&mut frame, payload)
        .expect("build");
    frame
}

/// Plain frames near the shortcut's conditions: the host's traffic (SSH, a UDP port no service
/// has, to the VIP and to another host, with and without payload), a backend's port without a
/// flow, and service ports under the other protocol; both families.
fn plain_frames() -> Vec<Vec<u8>> {
    let ssh = Tcp {
        syn: false,
        payload: b"SSH-2.0-x",
        ..Tcp::from_client(22, 40_000)
    };
    vec![
        ssh.frame(),
        Tcp {
            dst: OTHER_HOST,
            ..Tcp::from_client(22, 40_001)
        }
        .frame(),
        Tcp {
            src: BACKEND_A,
            dst: CLIENT,
            src_port: 8080,
            dst_port: 40_002,
            ..ssh
        }
        .frame(),
        Tcp::from_client(53, 40_003).frame(),
        udp4(CLIENT, VIP, (40_004, 5000), b"hello"),
        udp4(CLIENT, VIP, (40_005, 5000), b""),
        udp4(CLIENT, VIP, (40_006, 80), b"not tcp"),
        udp4(CLIENT, OTHER_HOST, (40_007, 123), b"ntp"),
        tcp6_ack_frame(CLIENT6, VIP6, 40_008, 22, b"SSH-2.0-x"),
        tcp6_ack_frame(CLIENT6, OTHER6, 40_009, 22, b""),
        tcp6_ack_frame(BACKEND6_A, CLIENT6, 8080, 40_010, b"reply"),
        udp6_frame(CLIENT6, VIP6, 40_011, 5000, b"hello"),
        udp6_frame(CLIENT6, VIP6, 40_012, 5000, b""),
        udp6_frame(CLIENT6, VIP6, 40_013, 80, b"not tcp"),
    ]
}

/// Every mutation of `frame` the comparison runs: each byte from the EtherType to the ports
/// flipped bit by bit and set to 0 and 0xff, every truncation, Ethernet padding, the IP and
/// UDP length fields set around their true values, and the ports set to the bitmap's edges.
fn mutations(frame: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = vec![frame.to_vec()];
    let ipv6 = frame[12..14] == [0x86, 0xdd];
    let l4 = if ipv6 { 14 + 40 } else { 14 + 20 };
    for offset in 12..frame.len().min(l4 + 8) {
        let byte = frame[offset];
        let values = (0..8).map(|bit| byte ^ (1 << bit)).chain([0, 0xff]);
        for value in values {
            let mut mutated = frame.to_vec();
            mutated[offset] = value;
            frames.push(mutated);
        }
    }
    for len in 14..frame.len() {
        frames.push(frame[..len].to_vec());
    }
    for padding in [1, 2, 3, 4, 5, 8, 16, 24] {
        let mut padded = frame.to_vec();
        padded.resize(frame.len() + padding, 0);
        frames.push(padded);
    }
    let (length_field, length_of) = if ipv6 {
        (18, frame.len() - 14 - 40)
    } else {
        (16, frame.len() - 14)
    };
    for value in 0..=length_of + 4 {
        let mut mutated = frame.to_vec();
        mutated[length_field..length_field + 2].copy_from_slice(&(value as u16).to_be_bytes());
        frames.push(mutated);
    }
    let is_udp = frame[if ipv6 { 20 } else { 23 }] == protocol::UDP;
    if is_udp {
        for value in 0..=frame.len() - l4 + 4 {
            let mut mutated = frame.to_vec();
            mutated[l4 + 4..l4 + 6].copy_from_slice(&(value as u16).to_be_bytes());
            frames.push(mutated);
        }
    }
    for port in [0u16, 1, 63, 64, 65, 80, 8080, 65_535] {
        for side in [l4, l4 + 2] {
            let mut mutated = frame.to_vec();
            mutated[side..side + 2].copy_from_slice(&port.to_be_bytes());
            frames.push(mutated);
        }
    }
    frames
}

#[test]
fn the_early_pass_is_what_the_full_parse_does_for_every_mutated_frame() {
    if !skip_unless_privileged("the_early_pass_is_what_the_full_parse_does_for_every_mutated_frame")
    {
        return;
    }
    let mut fixture = fixture_with_both_families();
    let (mut early, mut other) = (0, 0);
    for base in plain_frames() {
        for frame in mutations(&base) {
            let plain = run(&mut fixture, &frame);
            let vlan = vlan_tagged(&frame, &[(DOT1Q, 5)]);
            let full = run(&mut fixture, &vlan);
            assert_eq!(
                plain.is_early_pass(&frame),
                full.is_early_pass(&vlan),
                "frame {frame:02x?}: untagged verdict {} moved {:?}; tagged verdict {} moved {:?}",
                plain.verdict,
                names(&plain.moved),
                full.verdict,
                names(&full.moved),
            );
            if plain.is_early_pass(&frame) {
                early += 1;
            } else {
                other += 1;
            }
        }
    }
    // Neither outcome may be missing, or the comparison proved nothing.
    assert!(
        early > 500 && other > 500,
        "{early} early passes, {other} others"
    );
}

/// Services whose ports sit on the bitmap's word edges (63, 64, 65535) with backends on ports
/// 1 and 65535.
const EDGE_CONFIG: &str = r#"
[[service]]
name = "s63"
vip = "10.200.1.1"
port = 63
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 1

[[service]]
name = "s64"
vip = "10.200.1.1"
port = 64
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.11"
port = 65535

[[service]]
name = "s65535"
vip = "10.200.1.1"
port = 65535
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8080
"#;

#[test]
fn each_port_at_the_edges_of_the_bitmap_has_its_own_bit() {
    if !skip_unless_privileged("each_port_at_the_edges_of_the_bitmap_has_its_own_bit") {
        return;
    }
    let mut fixture = Fixture::with_config(EDGE_CONFIG, &LoadOptions::default());
    for port in [0u16, 1, 2, 62, 65, 127, 128, 8079, 8081, 65_534] {
        let syn = Tcp::from_client(port, 40_000).frame();
        let outcome = run(&mut fixture, &syn);
        assert!(
            outcome.is_early_pass(&syn),
            "SYN to port {port}: verdict {}, moved {:?}",
            outcome.verdict,
            names(&outcome.moved)
        );
    }
    let services = [
        (63u16, BACKEND_A, BACKEND_A_MAC, 1u16),
        (64, BACKEND_B, BACKEND_B_MAC, 65_535),
        (65_535, BACKEND_A, BACKEND_A_MAC, 8080),
    ];
    for (port, backend, backend_mac, backend_port) in services {
        let syn = Tcp::from_client(port, 40_001).frame();
        let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "SYN to service port {port}");
        let expected = expected_forward(&syn, BACK_MAC, backend_mac, backend, backend_port);
        assert_frames_equal(&out, &expected, &format!("SYN to service port {port}"));

        // The backend's reply, from its port (1 and 65535 are on the edges too).
        let reply = Tcp {
            src_mac: backend_mac,
            dst_mac: BACK_MAC,
            src: backend,
            dst: CLIENT,
            src_port: backend_port,
            dst_port: 40_001,
            syn: false,
            payload: b"ok",
        }
        .frame();
        let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "reply from backend port {backend_port}"
        );
        assert_eq!(&out[26..30], &VIP, "reply from backend port {backend_port}");
        assert_eq!(
            &out[34..36],
            &port.to_be_bytes(),
            "reply from {backend_port}"
        );
        assert_checksums_valid(&out, &format!("reply from backend port {backend_port}"));
    }
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 3);
    assert_eq!(fixture.counter(counter::REPLY_REDIRECT), 3);
}

#[test]
fn edge_cases_next_to_the_early_pass_get_the_full_parse_verdict() {
    if !skip_unless_privileged("edge_cases_next_to_the_early_pass_get_the_full_parse_verdict") {
        return;
    }
    let mut fixture = fixture_with_both_families();
    let udp_empty = udp4(CLIENT, VIP, (40_000, 5000), b"");
    let mut udp_long_field = udp4(CLIENT, VIP, (40_000, 5000), b"abcd");
    udp_long_field[38..40].copy_from_slice(&200u16.to_be_bytes());
    let mut udp_short_field = udp_long_field.clone();
    udp_short_field[38..40].copy_from_slice(&3u16.to_be_bytes());
    let mut padded = udp_empty.clone();
    padded.resize(60, 0);
    let ssh = Tcp::from_client(22, 40_001).frame();
    let with_flag = |flags: u16| {
        let mut frame = ssh.clone();
        frame[20..22].copy_from_slice(&flags.to_be_bytes());
        with_fresh_checksums(frame)
    };
    // 38 bytes: Ethernet, IPv4 and the ports of a TCP header that the packet does not hold.
    let mut short_tcp = ssh[..38].to_vec();
    short_tcp[16..18].copy_from_slice(&24u16.to_be_bytes());
    let mut short_tcp_other = short_tcp.clone();
    short_tcp_other[30..34].copy_from_slice(&OTHER_HOST);
    // 58 bytes: the same for IPv6.
    let ssh6 = tcp6_ack_frame(CLIENT6, VIP6, 40_002, 22, b"");
    let mut short_tcp6 = ssh6[..58].to_vec();
    short_tcp6[18..20].copy_from_slice(&4u16.to_be_bytes());
    let udp6_empty = udp6_frame(CLIENT6, VIP6, 40_003, 5000, b"");
    let mut udp6_no_payload_len = udp6_empty.clone();
    udp6_no_payload_len[18..20].copy_from_slice(&0u16.to_be_bytes());
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .expect("build");

    let early = counter::PASS_NOT_SERVICE;
    let cases: Vec<(&str, Vec<u8>, u32, Vec<u32>)> = vec![
        (
            "UDP, total length exactly 20 + 8",
            udp_empty.clone(),
            XDP_PASS,
            vec![early],
        ),
        (
            "UDP length field past the packet",
            udp_long_field,
            XDP_PASS,
            vec![early],
        ),
        (
            "UDP length field under 8",
            udp_short_field,
            XDP_PASS,
            vec![early],
        ),
        (
            "Ethernet padding after the packet",
            padded,
            XDP_PASS,
            vec![early],
        ),
        ("IPv4 DF set", with_flag(0x4000), XDP_PASS, vec![early]),
        (
            "IPv4 reserved flag set",
            with_flag(0x8000),
            XDP_PASS,
            vec![early],
        ),
        (
            "IPv4 MF set, to the VIP on a host port",
            with_flag(0x2000),
            XDP_PASS,
            vec![counter::PASS_FRAGMENT, counter::FRAGMENT_TRACKED],
        ),
        (
            "a later IPv4 fragment of that datagram",
            with_flag(0x0001),
            XDP_PASS,
            vec![counter::PASS_FRAGMENT],
        ),
        (
            "38 bytes, TCP ports without the header, to the VIP",
            short_tcp,
            XDP_DROP,
            vec![counter::DROP_MALFORMED_L4],
        ),
        (
            "38 bytes, TCP ports without the header, to another host",
            short_tcp_other,
            XDP_PASS,
            vec![early],
        ),
        (
            "58 bytes, IPv6 TCP ports without the header, to the VIP",
            short_tcp6,
            XDP_DROP,
            vec![counter::DROP_MALFORMED_L4],
        ),
        (
            "IPv6 payload length exactly 8, UDP",
            udp6_empty,
            XDP_PASS,
            vec![early],
        ),
        (
            "IPv6 payload length 0, UDP, to the VIP",
            udp6_no_payload_len,
            XDP_DROP,
            vec![counter::DROP_MALFORMED_L4],
        ),
        (
            "ICMP echo to the VIP",
            ping,
            XDP_PASS,
            vec![counter::PASS_NOT_TCP_UDP],
        ),
    ];
    for (what, frame, verdict, counters) in cases {
        let outcome = run(&mut fixture, &frame);
        assert_eq!(outcome.verdict, verdict, "{what}");
        if verdict == XDP_PASS {
            assert_eq!(outcome.out, frame, "{what}: passed untouched");
        }
        let expected: Vec<(u32, u64)> = counters.iter().map(|&index| (index, 1)).collect();
        let mut moved = outcome.moved;
        moved.sort();
        let mut expected_sorted = expected;
        expected_sorted.sort();
        assert_eq!(
            names(&moved),
            names(&expected_sorted),
            "{what}: the counters that moved"
        );
    }
}
