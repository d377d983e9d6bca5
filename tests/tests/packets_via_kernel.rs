//! Packet tests of the path for backends behind a Linux bridge, which XDP cannot redirect into:
//! XDP translates the client's packets and passes them to the kernel to forward, and the tc
//! egress program on the public interface translates the backends' replies on their way out.
//! Both programs run on crafted frames through `BPF_PROG_TEST_RUN`; every expected frame gets
//! its checksums from etherparse (see `lb_tests::packet`). Needs root; without it each test
//! prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use etherparse::PacketBuilder;
use lb_common::counter;
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{Dataplane, LoadOptions};

/// The default fixture with both web backends (A also serves dns) behind a bridge.
fn fixture() -> Fixture {
    let via_kernel = BTreeSet::from([Ipv4Addr::from(BACKEND_A), Ipv4Addr::from(BACKEND_B)]);
    Fixture::with_kernel_paths(CONFIG, &LoadOptions::default(), via_kernel)
}

/// `frame` with its destination translated to `backend:port` and checksums recomputed, the
/// Ethernet header as it came: the kernel, not XDP, picks the next hop.
fn translated_for_the_kernel(frame: &[u8], backend: [u8; 4], port: u16) -> Vec<u8> {
    let mut src_mac = [0u8; 6];
    let mut dst_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    dst_mac.copy_from_slice(&frame[0..6]);
    expected_forward(frame, src_mac, dst_mac, backend, port)
}

/// A backend's reply as it leaves the public interface after the kernel forwarded it:
/// addressed from the backend to the client, Ethernet header from this host to the client.
fn reply_from(backend: [u8; 4], src_port: u16, dst_port: u16, payload: &'static [u8]) -> Tcp {
    Tcp {
        src_mac: PUB_MAC,
        dst_mac: CLIENT_MAC,
        src: backend,
        dst: CLIENT,
        src_port,
        dst_port,
        syn: false,
        payload,
    }
}

/// `reply` as the egress program must leave it: from the service's address and port.
fn from_the_service(reply: &[u8], service_port: u16) -> Vec<u8> {
    let mut expected = reply.to_vec();
    expected[26..30].copy_from_slice(&VIP);
    let l4 = 14 + usize::from(expected[14] & 0x0f) * 4;
    expected[l4..l4 + 2].copy_from_slice(&service_port.to_be_bytes());
    with_fresh_checksums(expected)
}

fn udp_reply(src_port: u16, dst_port: u16, zero_checksum: bool) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(PUB_MAC, CLIENT_MAC)
        .ipv4(BACKEND_A, CLIENT, 63)
        .udp(src_port, dst_port)
        .write(&mut frame, b"a dns answer, more or less")
        .expect("build frame");
    if zero_checksum {
        frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    }
    frame
}

#[test]
fn client_packets_for_backends_behind_a_bridge_are_translated_and_passed() {
    if !skip_unless_privileged(
        "client_packets_for_backends_behind_a_bridge_are_translated_and_passed",
    ) {
        return;
    }
    let mut fixture = fixture();
    let data = Tcp {
        syn: false,
        payload: b"GET / HTTP/1.1\r\n\r\n",
        ..Tcp::from_client(80, 42000)
    };
    // Description, frame, backend and port it must be translated to. Round robin: the first
    // flow goes to A, the second to B; the first flow's data stays on A.
    let cases: Vec<(&str, Vec<u8>, [u8; 4], u16)> = vec![
        (
            "SYN of flow 1",
            Tcp::from_client(80, 42000).frame(),
            BACKEND_A,
            8080,
        ),
        (
            "SYN of flow 2",
            Tcp::from_client(80, 42001).frame(),
            BACKEND_B,
            8080,
        ),
        ("data of flow 1", data.frame(), BACKEND_A, 8080),
        (
            "UDP with a checksum",
            udp_frame(53, 42002, false),
            BACKEND_A,
            5353,
        ),
        (
            "UDP without a checksum",
            udp_frame(53, 42003, true),
            BACKEND_A,
            5353,
        ),
    ];
    for (what, frame, backend, port) in &cases {
        let (verdict, out) = fixture.run(frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_PASS, "{what}: the kernel forwards it");
        let expected = translated_for_the_kernel(frame, *backend, *port);
        assert_frames_equal(&out, &expected, what);
        assert_eq!(
            &out[0..14],
            &frame[0..14],
            "{what}: Ethernet header untouched"
        );
    }
    let udp_check = |frame: &[u8]| frame[14 + 20 + 6..14 + 20 + 8].to_vec();
    let (_, out) = fixture.run(&udp_frame(53, 42004, true), fixture.pub_ifindex);
    assert_eq!(udp_check(&out), [0, 0], "no UDP checksum stays none");

    let passed = cases.len() as u64 + 1;
    assert_eq!(fixture.counter(counter::PASS_KERNEL_FORWARD), passed);
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 0);
    assert_eq!(fixture.counter(counter::FORWARD_TX), 0);
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), passed - 1);
    assert_eq!(fixture.counter(counter::FLOW_HIT), 1);
    let web = fixture.dataplane.service_stats(0).expect("stats");
    assert_eq!((web.packets, web.new_flows), (3, 2));
}

#[test]
fn a_bridge_backend_shares_a_service_with_a_redirected_one() {
    if !skip_unless_privileged("a_bridge_backend_shares_a_service_with_a_redirected_one") {
        return;
    }
    // Only B behind a bridge: A's flows are still redirected, B's passed.
    let via_kernel = BTreeSet::from([Ipv4Addr::from(BACKEND_B)]);
    let mut fixture = Fixture::with_kernel_paths(CONFIG, &LoadOptions::default(), via_kernel);
    let to_a = Tcp::from_client(80, 42100).frame();
    let (verdict, out) = fixture.run(&to_a, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&to_a, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN to A, redirected");

    let to_b = Tcp::from_client(80, 42101).frame();
    let (verdict, out) = fixture.run(&to_b, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);
    let expected = translated_for_the_kernel(&to_b, BACKEND_B, 8080);
    assert_frames_equal(&out, &expected, "SYN to B, passed");
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 1);
    assert_eq!(fixture.counter(counter::PASS_KERNEL_FORWARD), 1);
}

#[test]
fn the_egress_program_translates_replies_of_kernel_forwarded_flows() {
    if !skip_unless_privileged("the_egress_program_translates_replies_of_kernel_forwarded_flows") {
        return;
    }
    let mut fixture = fixture();
    // The client's packets create the flows (and their reverse entries).
    for frame in [
        Tcp::from_client(80, 42200).frame(),
        udp_frame(53, 42201, false),
        udp_frame(53, 42202, true),
    ] {
        let (verdict, _) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_PASS);
    }

    let syn_ack = Tcp {
        syn: true,
        ..reply_from(BACKEND_A, 8080, 42200, b"")
    }
    .frame();
    let data = reply_from(BACKEND_A, 8080, 42200, b"HTTP/1.1 200 OK\r\n\r\nbackend A").frame();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("SYN-ACK", syn_ack, 80),
        ("response", data.clone(), 80),
        (
            "UDP answer with a checksum",
            udp_reply(5353, 42201, false),
            53,
        ),
        ("UDP answer without one", udp_reply(5353, 42202, true), 53),
    ];
    for (what, frame, service_port) in &cases {
        let (verdict, out) = fixture.run_egress(frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_frames_equal(&out, &from_the_service(frame, *service_port), what);
    }
    let (_, out) = fixture.run_egress(&udp_reply(5353, 42202, true));
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "no UDP checksum stays none"
    );

    let translated = cases.len() as u64 + 1;
    assert_eq!(fixture.counter(counter::REPLY_EGRESS), translated);
    assert_eq!(fixture.counter(counter::REPLY_REDIRECT), 0);
    let backend_a = fixture.dataplane.backend_stats(0).expect("stats");
    let dns_a = fixture.dataplane.backend_stats(2).expect("stats");
    assert_eq!(
        backend_a.reply_packets + dns_a.reply_packets,
        translated,
        "web {backend_a:?}, dns {dns_a:?}"
    );
    let web = fixture.dataplane.service_stats(0).expect("stats");
    let reply_bytes: u64 = cases[..2].iter().map(|case| case.1.len() as u64).sum();
    assert_eq!((web.reply_packets, web.reply_bytes), (2, reply_bytes));

    // A FIN from the backend closes the client's flow too, as on the XDP reply path.
    let fin = {
        let mut frame = reply_from(BACKEND_A, 8080, 42200, b"").frame();
        frame[14 + 20 + 13] |= 0x01;
        with_fresh_checksums(frame)
    };
    let closing = fixture.counter(counter::FLOW_CLOSING);
    let (verdict, out) = fixture.run_egress(&fin);
    assert_eq!(verdict, TC_ACT_OK);
    assert_frames_equal(&out, &from_the_service(&fin, 80), "FIN from the backend");
    assert_eq!(fixture.counter(counter::FLOW_CLOSING), closing + 1);
}

#[test]
fn the_egress_program_leaves_everything_else_alone() {
    if !skip_unless_privileged("the_egress_program_leaves_everything_else_alone") {
        return;
    }
    let mut fixture = fixture();
    let (verdict, _) = fixture.run(&Tcp::from_client(80, 42300).frame(), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);

    let mut arp = Vec::new();
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&PUB_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    arp.extend_from_slice(&PUB_MAC);
    arp.extend_from_slice(&VIP);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(PUB_MAC, CLIENT_MAC)
        .ipv6(
            [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .tcp(8080, 42300, 1, 1000)
        .write(&mut ipv6, b"")
        .expect("build");
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(PUB_MAC, CLIENT_MAC)
        .ipv4(BACKEND_A, CLIENT, 63)
        .icmpv4_echo_request(7, 1)
        .write(&mut icmp, b"ping")
        .expect("build");
    let reply = reply_from(BACKEND_A, 8080, 42300, b"").frame();
    let mut fragment = reply.clone();
    fragment[20] |= 0x20; // more fragments
    let fragment = with_fresh_checksums(fragment);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "SSH from this host's address to the client",
            reply_from(VIP, 22, 51000, b"SSH-2.0-OpenSSH").frame(),
        ),
        (
            "the backend to a client port without a flow",
            reply_from(BACKEND_A, 8080, 42999, b"").frame(),
        ),
        (
            "another backend port to the flow's client port",
            reply_from(BACKEND_A, 9090, 42300, b"").frame(),
        ),
        ("the flow's reply, fragmented", fragment),
        (
            "the flow's reply, TCP header cut",
            reply[..14 + 20 + 2].to_vec(),
        ),
        ("ARP reply", arp),
        ("IPv6", ipv6),
        ("ICMP from the backend", icmp),
    ];
    for (what, frame) in cases {
        let (verdict, out) = fixture.run_egress(&frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(out, frame, "{what}: must leave unchanged");
    }
    assert_eq!(fixture.counter(counter::REPLY_EGRESS), 0);
}
