//! Packet tests: the real XDP object, loaded through the verifier and run on crafted frames by
//! the kernel's `BPF_PROG_TEST_RUN`. Every rewritten frame is compared byte for byte with an
//! expected frame whose checksums etherparse computes from scratch (see `lb_tests::packet`).
//! Needs root; without it each test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use lb_common::counter;
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::{
    dataplane::Dataplane,
    neighbours::{ask_kernel, Asked, Neighbour},
};

#[test]
fn syn_to_a_service_is_translated_to_a_backend_and_redirected() {
    if !skip_unless_privileged("syn_to_a_service_is_translated_to_a_backend_and_redirected") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(80, 40000).frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);

    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_forward(&syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN towards backend A");
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 1);
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 1);
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
    if !skip_unless_privileged("a_flow_sticks_to_its_backend_and_new_flows_go_round_robin") {
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
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 2);
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

/// What a web backend's reply (TCP, no IP options) should look like translated back to come
/// from VIP:80, sent out of `pub` to `next_hop_mac`.
fn expected_reply(reply: &[u8], next_hop_mac: [u8; 6]) -> Vec<u8> {
    let mut expected = reply.to_vec();
    expected[0..6].copy_from_slice(&next_hop_mac);
    expected[6..12].copy_from_slice(&PUB_MAC);
    expected[26..30].copy_from_slice(&VIP);
    expected[34..36].copy_from_slice(&80u16.to_be_bytes());
    with_fresh_checksums(expected)
}

#[test]
fn a_backend_reply_is_translated_back_to_the_service() {
    if !skip_unless_privileged("a_backend_reply_is_translated_back_to_the_service") {
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
    let expected = expected_reply(&reply, CLIENT_MAC);
    assert_frames_equal(&out, &expected, "reply from backend A");
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
    if !skip_unless_privileged("traffic_that_is_not_for_a_service_passes_byte_for_byte") {
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
        ("ARP request for the VIP", arp, counter::PASS_NOT_IP),
        (
            "IPv6 TCP to port 80 of an address without services",
            ipv6,
            counter::PASS_NOT_SERVICE,
        ),
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
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 0);
}

#[test]
fn truncated_headers_are_counted_and_never_read_past_the_end() {
    if !skip_unless_privileged("truncated_headers_are_counted_and_never_read_past_the_end") {
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
                         // Cut to `len` bytes, with a total length that says so (a consistent, short packet).
    let cut = |frame: &[u8], len: usize| {
        let mut frame = frame[..len].to_vec();
        frame[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        let (ip, _) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
        frame[24..26].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
        frame
    };
    let mut long_total = syn.clone();
    long_total[16..18].copy_from_slice(&41u16.to_be_bytes()); // one byte more than there is
    let mut short_total = syn.clone();
    short_total[16..18].copy_from_slice(&19u16.to_be_bytes()); // shorter than its header
    let mut l4_in_padding = syn.clone();
    l4_in_padding[16..18].copy_from_slice(&20u16.to_be_bytes()); // TCP only in the padding

    // The same faults on ports no service or backend uses: the host's own traffic is passed
    // early (`is_plain_host_traffic`), which must not let malformed packets through.
    let ssh = Tcp::from_client(22, 40007).frame();
    let mut ssh_long_total = ssh.clone();
    ssh_long_total[16..18].copy_from_slice(&41u16.to_be_bytes());
    let mut ssh_short_total = ssh.clone();
    ssh_short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
    let mut ssh_in_padding = ssh.clone();
    ssh_in_padding[16..18].copy_from_slice(&20u16.to_be_bytes());
    let mut ssh_long_ihl = ssh.clone();
    ssh_long_ihl[14] = 0x4f;

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
            "total length past the frame",
            long_total,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "total length inside the header",
            short_total,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "a frame cut inside TCP, its total length unchanged",
            syn[..14 + 20 + 10].to_vec(),
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "TCP header cut, to the VIP",
            cut(&syn, 14 + 20 + 10),
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "TCP header only in the Ethernet padding, to the VIP",
            l4_in_padding,
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "UDP header cut, to the VIP",
            cut(&udp, 14 + 20 + 4),
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "TCP header cut, to another host",
            cut(&to_other_host, 14 + 20 + 10),
            XDP_PASS,
            counter::PASS_NOT_SERVICE,
        ),
        (
            "SSH to the VIP, total length past the frame",
            ssh_long_total,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "SSH to the VIP, total length inside the header",
            ssh_short_total,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "SSH to the VIP, IHL past the end",
            ssh_long_ihl,
            XDP_DROP,
            counter::DROP_MALFORMED_IPV4,
        ),
        (
            "SSH to the VIP, TCP header only in the Ethernet padding",
            ssh_in_padding,
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
        ),
        (
            "UDP header cut, to a VIP port without a service",
            cut(&udp_frame(54, 40008, false), 14 + 20 + 4),
            XDP_DROP,
            counter::DROP_MALFORMED_L4,
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
        fixture.counter(counter::FLOW_MISS_NEW),
        0,
        "no truncated packet was scheduled"
    );
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    if !skip_unless_privileged("udp_is_translated_and_a_zero_checksum_stays_zero") {
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
    if !skip_unless_privileged("ip_options_are_kept_and_the_packet_is_balanced") {
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
    if !skip_unless_privileged("a_flow_whose_backend_went_down_is_rescheduled") {
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
    if !skip_unless_privileged("a_service_without_backends_up_drops_and_counts") {
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
    if !skip_unless_privileged("an_unresolved_next_hop_goes_to_the_kernel_translated") {
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
    assert_eq!(fixture.counter(counter::DROP_NEIGH_UNRESOLVED), 0);
    // The kernel resolves it as it forwards; the datapath asks lb-user to all the same.
    let wanted = Neighbour {
        addr: IpAddr::V4(BACKEND_UNRESOLVED.into()),
        ifindex: fixture.back_ifindex,
    };
    assert_eq!(fixture.drain_wanted_neighbours(), [wanted]);
}

/// A client one router away on the public side; the router, [`GATEWAY`], has no neighbour
/// entry until a test gives it one.
const REMOTE_CLIENT: [u8; 4] = [10, 200, 9, 5];
const GATEWAY: [u8; 4] = [10, 200, 1, 254];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

/// Backend A's reply on the flow from [`REMOTE_CLIENT`] port `client_port` to web.
fn reply_to_remote_client(client_port: u16) -> Vec<u8> {
    Tcp {
        src_mac: BACKEND_A_MAC,
        dst_mac: BACK_MAC,
        src: BACKEND_A,
        dst: REMOTE_CLIENT,
        src_port: 8080,
        dst_port: client_port,
        syn: false,
        payload: b"HTTP/1.1 200 OK\r\n\r\nbackend A",
    }
    .frame()
}

#[test]
fn an_ipv4_reply_towards_an_unresolved_gateway_is_dropped_and_the_gateway_wanted() {
    if !skip_unless_privileged(
        "an_ipv4_reply_towards_an_unresolved_gateway_is_dropped_and_the_gateway_wanted",
    ) {
        return;
    }
    let mut fixture = Fixture::new();
    let gateway = Ipv4Addr::from(GATEWAY).to_string();
    ip(&[
        "route",
        "add",
        "10.200.9.0/24",
        "via",
        &gateway,
        "dev",
        "pub",
    ]);
    let syn = Tcp {
        src: REMOTE_CLIENT,
        ..Tcp::from_client(80, 40020)
    }
    .frame();
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT, "the client's SYN reaches backend A");
    let expected = expected_forward(&syn, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080);
    assert_frames_equal(&out, &expected, "SYN from the remote client");
    assert_eq!(
        fixture.drain_wanted_neighbours(),
        [],
        "a resolved next hop is not wanted"
    );

    // The reply's next hop is the gateway, which has no neighbour entry. Passed, the kernel
    // would drop it as a martian (its source, the VIP, is local) and never resolve the
    // gateway; so it is dropped here, and the gateway recorded for lb-user, once however
    // many replies want it.
    let reply = reply_to_remote_client(40020);
    for sent in 1..=3 {
        let (verdict, _) = fixture.run(&reply, fixture.back_ifindex);
        assert_eq!(
            verdict, XDP_DROP,
            "reply {sent} towards the unresolved gateway"
        );
    }
    assert_eq!(fixture.counter(counter::DROP_NEIGH_UNRESOLVED), 3);
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 0);
    let gateway_wanted = Neighbour {
        addr: IpAddr::V4(GATEWAY.into()),
        ifindex: fixture.pub_ifindex,
    };
    assert_eq!(fixture.drain_wanted_neighbours(), [gateway_wanted]);
    assert_eq!(fixture.drain_wanted_neighbours(), [], "drained");
    // Still unresolved, a later reply records it again.
    let (verdict, _) = fixture.run(&reply, fixture.back_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.drain_wanted_neighbours(), [gateway_wanted]);

    // What lb-user does with it: the kernel creates the entry and starts ARP (nobody
    // answers here, so it stays incomplete, then fails).
    assert_eq!(
        ask_kernel(gateway_wanted).expect("ip neigh"),
        Asked::Resolving("pub".to_string())
    );
    let entry = ip(&["neigh", "show", &gateway, "dev", "pub"]);
    assert!(
        entry.contains("INCOMPLETE") || entry.contains("FAILED"),
        "the kernel is resolving the gateway: {entry:?}"
    );

    // An entry an operator pinned is never touched (asking would reset it to INCOMPLETE).
    let pinned = "02:00:00:00:99:01";
    ip(&[
        "neigh",
        "replace",
        &gateway,
        "lladdr",
        pinned,
        "dev",
        "pub",
        "nud",
        "permanent",
    ]);
    assert_eq!(
        ask_kernel(gateway_wanted).expect("ip neigh"),
        Asked::LeftAlone("pub".to_string())
    );
    let entry = ip(&["neigh", "show", &gateway, "dev", "pub"]);
    assert!(
        entry.contains("PERMANENT") && entry.contains(pinned),
        "the pinned entry is kept: {entry:?}"
    );
    ip(&["neigh", "del", &gateway, "dev", "pub"]);

    // Once the gateway is resolved, the reply goes out translated.
    let lladdr = GATEWAY_MAC.map(|byte| format!("{byte:02x}")).join(":");
    ip(&[
        "neigh",
        "replace",
        &gateway,
        "lladdr",
        &lladdr,
        "dev",
        "pub",
        "nud",
        "reachable",
    ]);
    let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = expected_reply(&reply, GATEWAY_MAC);
    assert_frames_equal(&out, &expected, "reply through the gateway");
    assert_eq!(fixture.counter(counter::DROP_NEIGH_UNRESOLVED), 4);
    assert_eq!(fixture.drain_wanted_neighbours(), []);
}

#[test]
fn a_backend_on_the_client_interface_is_reached_with_xdp_tx() {
    if !skip_unless_privileged("a_backend_on_the_client_interface_is_reached_with_xdp_tx") {
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

#[test]
fn a_cached_next_hop_never_skips_the_mtu_check() {
    if !skip_unless_privileged("a_cached_next_hop_never_skips_the_mtu_check") {
        return;
    }
    let mut fixture = Fixture::new();
    // The first packet caches backend A's next hop for small packets.
    let (verdict, _) = fixture.run(&Tcp::from_client(80, 40100).frame(), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    // A segment larger than `back`'s MTU (1500) must still reach the kernel's MTU handling.
    static BIG: [u8; 1560] = [0x5a; 1560];
    let big = Tcp {
        syn: false,
        payload: &BIG,
        ..Tcp::from_client(80, 40100)
    }
    .frame();
    let (verdict, _) = fixture.run(&big, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(fixture.counter(counter::PASS_FRAG_NEEDED), 1);
    // And a small one afterwards still takes the cached path.
    let small = Tcp {
        syn: false,
        ..Tcp::from_client(80, 40100)
    }
    .frame();
    let (verdict, out) = fixture.run(&small, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_frames_equal(
        &out,
        &expected_forward(&small, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 8080),
        "after the oversized one",
    );
}
