//! IPv6 packet tests: the real XDP object (`balancer`, which tail-calls the IPv6 programs),
//! run on crafted frames by `BPF_PROG_TEST_RUN`. An IPv6 VIP with IPv6 backends is written
//! straight into the IPv6 maps, so these tests pin the datapath alone (tests/tests/ipv6.rs
//! drives IPv6 services through lb-user's configuration). Every
//! rewritten frame is compared byte for byte with one whose checksums etherparse computes from
//! scratch. Needs root; without it each test prints SKIPPED (or fails under
//! LB_REQUIRE_PRIVILEGED=1).

use etherparse::{Icmpv6Type, PacketBuilder};
use lb_common::{
    backend_flags, backend_state, counter, protocol, scheduler, Backend, Endpoint6, EndpointKey6,
    Service, ServiceKey6, SCHEDULE_SIZE,
};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{AnyEndpointKey, AnyServiceKey, Dataplane};

const OTHER6: [u8; 16] = address6(1, 0x98);

/// Ids beyond those the IPv4 services of the fixture take.
const WEB6_ID: u32 = 1000;
const DNS6_ID: u32 = 1001;
const BACKEND_A_ID: u32 = 4000;
const BACKEND_B_ID: u32 = 4001;
const DNS_BACKEND_ID: u32 = 4002;

/// The default fixture plus IPv6: addresses, permanent neighbours, forwarding, and two
/// services on [`VIP6`] (web6: TCP 80 over A and B round robin; dns6: UDP 53 to A:5353).
fn fixture6() -> Fixture {
    let mut fixture = Fixture::new();
    fixture.add_ipv6();
    let dataplane = &mut fixture.dataplane;
    let offset = SCHEDULE_SIZE - 16;
    for (id, addr, port, service_id) in [
        (BACKEND_A_ID, BACKEND6_A, 8080u16, WEB6_ID),
        (BACKEND_B_ID, BACKEND6_B, 8080, WEB6_ID),
        (DNS_BACKEND_ID, BACKEND6_A, 5353, DNS6_ID),
    ] {
        let backend = Backend {
            addr,
            port: port.to_be_bytes(),
            state: backend_state::UP,
            flags: backend_flags::IPV6,
            service_id,
            generation: 1,
        };
        dataplane.set_backend(id, &backend).expect("backend");
        let protocol = if service_id == WEB6_ID {
            protocol::TCP
        } else {
            protocol::UDP
        };
        let key = EndpointKey6 {
            addr,
            port: port.to_be_bytes(),
            protocol,
            _pad: 0,
        };
        let endpoint = Endpoint6 {
            service_addr: VIP6,
            service_port: if service_id == WEB6_ID { 80u16 } else { 53 }.to_be_bytes(),
            shared: 0,
            _pad: 0,
            service_id,
        };
        dataplane
            .set_endpoint(AnyEndpointKey::V6(key), &endpoint)
            .expect("endpoint");
    }
    dataplane
        .set_schedule(offset, &[BACKEND_A_ID, BACKEND_B_ID, DNS_BACKEND_ID])
        .expect("schedule");
    for (id, port, protocol, table_offset, table_len) in [
        (WEB6_ID, 80u16, protocol::TCP, offset, 2),
        (DNS6_ID, 53, protocol::UDP, offset + 2, 1),
    ] {
        let key = ServiceKey6 {
            addr: VIP6,
            port: port.to_be_bytes(),
            protocol,
            _pad: 0,
        };
        let service = Service {
            id,
            scheduler: scheduler::ROUND_ROBIN,
            flags: 0,
            _pad: [0; 2],
            table_offset,
            table_len,
        };
        dataplane
            .set_service(AnyServiceKey::V6(key), &service)
            .expect("service");
    }
    dataplane
        .add_vip_address(std::net::IpAddr::from(VIP6))
        .expect("VIP address");
    fixture
}

/// A TCP frame over IPv6; `syn` or an ACK with a little payload.
#[allow(clippy::too_many_arguments)]
fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    syn: bool,
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, 64)
        .tcp(src_port, dst_port, 0x1234_5678, 64240);
    let builder = if syn {
        builder.syn()
    } else {
        builder.ack(0x0102_0304)
    };
    let mut frame = Vec::new();
    let payload: &[u8] = if syn { b"" } else { b"GET / HTTP/1.1\r\n" };
    builder.write(&mut frame, payload).expect("build");
    frame
}

/// A client's TCP frame as it should leave towards `backend` port 8080.
fn at_backend(mac: [u8; 6], backend: [u8; 16], src_port: u16, syn: bool) -> Vec<u8> {
    tcp6((BACK_MAC, mac), CLIENT6, backend, src_port, 8080, syn)
}

fn client_syn(src_port: u16) -> Vec<u8> {
    tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, VIP6, src_port, 80, true)
}

/// `frame` (Ethernet + IPv6 + extension headers) with `headers` inserted after the fixed
/// header: the chain's first next-header goes into the fixed header, and the payload length
/// grows. The transport checksum does not cover extension headers, so it stays right.
fn with_extensions(frame: &[u8], first: u8, headers: &[u8]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    out.extend_from_slice(headers);
    out.extend_from_slice(&frame[54..]);
    out[20] = first;
    let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + headers.len() as u16;
    out[18..20].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// An 8-byte options header (hop-by-hop or destination options) of PadN, followed by `next`.
fn options_header(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

#[test]
fn ipv6_syn_is_translated_sticks_to_its_backend_and_the_reply_is_translated_back() {
    if !skip_unless_privileged(
        "ipv6_syn_is_translated_sticks_to_its_backend_and_the_reply_is_translated_back",
    ) {
        return;
    }
    let mut fixture = fixture6();
    let syn = client_syn(40000);
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = at_backend(BACKEND_A_MAC, BACKEND6_A, 40000, true);
    assert_eq!(out, expected, "SYN towards backend A");
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 1);
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 1);
    let web = fixture.dataplane.service_stats(WEB6_ID).expect("stats");
    assert_eq!((web.packets, web.new_flows), (1, 1));

    // The same flow sticks to A; a new flow goes round robin to B.
    let data = tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, VIP6, 40000, 80, false);
    let (verdict, out) = fixture.run(&data, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = at_backend(BACKEND_A_MAC, BACKEND6_A, 40000, false);
    assert_eq!(out, expected, "data of the same flow");
    assert_eq!(fixture.counter(counter::FLOW_HIT), 1);
    let (_, out) = fixture.run(&client_syn(40001), fixture.pub_ifindex);
    let expected = at_backend(BACKEND_B_MAC, BACKEND6_B, 40001, true);
    assert_eq!(out, expected, "a new flow to backend B");

    // Backend A's reply comes from the VIP again, to the client.
    let reply = tcp6(
        (BACKEND_A_MAC, BACK_MAC),
        BACKEND6_A,
        CLIENT6,
        8080,
        40000,
        false,
    );
    let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = tcp6((PUB_MAC, CLIENT_MAC), VIP6, CLIENT6, 80, 40000, false);
    assert_eq!(out, expected, "reply from backend A");
    assert_eq!(fixture.counter(counter::REPLY_REDIRECT), 1);

    // The backend talking to a client it has no flow with is not ours.
    let unrelated = tcp6(
        (BACKEND_A_MAC, BACK_MAC),
        BACKEND6_A,
        CLIENT6,
        8080,
        41999,
        false,
    );
    let (verdict, out) = fixture.run(&unrelated, fixture.back_ifindex);
    assert_eq!((verdict, out), (XDP_PASS, unrelated));
}

#[test]
fn an_ipv6_reply_towards_an_unresolved_gateway_goes_to_the_kernel_translated() {
    if !skip_unless_privileged(
        "an_ipv6_reply_towards_an_unresolved_gateway_goes_to_the_kernel_translated",
    ) {
        return;
    }
    // A client one router away, the router without a neighbour entry: unlike IPv4, the kernel
    // forwards a passed IPv6 packet from its own address, resolving the router on the way.
    let mut fixture = fixture6();
    let remote_client = address6(9, 5);
    let gateway = std::net::Ipv6Addr::from(OTHER6).to_string();
    ip(&[
        "-6",
        "route",
        "add",
        "fd00:200::9:0:0:0/80",
        "via",
        &gateway,
        "dev",
        "pub",
    ]);
    let syn = tcp6((CLIENT_MAC, PUB_MAC), remote_client, VIP6, 40030, 80, true);
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = tcp6(
        (BACK_MAC, BACKEND_A_MAC),
        remote_client,
        BACKEND6_A,
        40030,
        8080,
        true,
    );
    assert_eq!(out, expected, "SYN from the remote client");

    let reply = tcp6(
        (BACKEND_A_MAC, BACK_MAC),
        BACKEND6_A,
        remote_client,
        8080,
        40030,
        false,
    );
    let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
    assert_eq!(verdict, XDP_PASS);
    // Translated, the Ethernet header as it came: the kernel picks the next hop's MAC.
    let expected = tcp6(
        (BACKEND_A_MAC, BACK_MAC),
        VIP6,
        remote_client,
        80,
        40030,
        false,
    );
    assert_eq!(out, expected, "reply passed translated");
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 1);
    assert_eq!(fixture.counter(counter::DROP_NEIGH_UNRESOLVED), 0);
    // The IPv6 programs record no next hop (no stack for it; the kernel resolves them).
    assert_eq!(fixture.drain_wanted_neighbours(), []);
}

#[test]
fn ipv6_udp_needs_a_checksum_and_a_computed_zero_leaves_as_ffff() {
    if !skip_unless_privileged("ipv6_udp_needs_a_checksum_and_a_computed_zero_leaves_as_ffff") {
        return;
    }
    let mut fixture = fixture6();
    let query = udp6_frame(CLIENT6, VIP6, 40000, 53, b"a dns query, more or less");
    let (verdict, out) = fixture.run(&query, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let mut expected = udp6_frame(
        CLIENT6,
        BACKEND6_A,
        40000,
        5353,
        b"a dns query, more or less",
    );
    expected[..12].copy_from_slice(&[BACKEND_A_MAC, BACK_MAC].concat());
    assert_eq!(out, expected, "query towards backend A");

    let mut zero = query.clone();
    zero[54 + 6..54 + 8].copy_from_slice(&[0, 0]);
    let (verdict, out) = fixture.run(&zero, fixture.pub_ifindex);
    assert_eq!((verdict, out), (XDP_DROP, zero));
    assert_eq!(fixture.counter(counter::DROP_UDP_ZERO_CHECKSUM), 1);

    // A payload whose translated datagram sums to zero: etherparse writes 0xffff for it, and
    // so must the datapath. Search two payload bytes for one (a few hundred tries at most).
    let translated = |word: u16| {
        let mut frame = udp6_frame(CLIENT6, BACKEND6_A, 40002, 5353, &word.to_be_bytes());
        frame[..12].copy_from_slice(&[BACKEND_A_MAC, BACK_MAC].concat());
        frame
    };
    let word = (0..=u16::MAX)
        .find(|&word| translated(word)[54 + 6..54 + 8] == [0xff, 0xff])
        .expect("some payload sums to zero");
    let input = udp6_frame(CLIENT6, VIP6, 40002, 53, &word.to_be_bytes());
    let (verdict, out) = fixture.run(&input, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, translated(word), "a computed zero leaves as 0xffff");
}

#[test]
fn ipv6_extension_headers_are_walked_kept_or_passed() {
    if !skip_unless_privileged("ipv6_extension_headers_are_walked_kept_or_passed") {
        return;
    }
    let mut fixture = fixture6();
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const DESTINATION: u8 = 60;

    // Hop-by-hop, then destination options, then TCP: balanced, the chain kept as it came.
    let chain = [options_header(DESTINATION), options_header(protocol::TCP)].concat();
    let syn = with_extensions(&client_syn(40000), HOP_BY_HOP, &chain);
    let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = with_extensions(
        &at_backend(BACKEND_A_MAC, BACKEND6_A, 40000, true),
        HOP_BY_HOP,
        &chain,
    );
    assert_eq!(out, expected, "SYN behind two extension headers");

    // A routing header with segments left: the VIP is a waypoint, the kernel decides.
    let routing = [protocol::TCP, 0, 0, 1, 0, 0, 0, 0];
    let routed = with_extensions(&client_syn(40001), ROUTING, &routing);
    let (verdict, out) = fixture.run(&routed, fixture.pub_ifindex);
    assert_eq!((verdict, out), (XDP_PASS, routed));
    assert_eq!(fixture.counter(counter::PASS_IPV6_EXTENSION), 1);
    // With no segments left it is an ordinary header, stepped over.
    let done = [protocol::TCP, 0, 0, 0, 0, 0, 0, 0];
    let (verdict, _) = fixture.run(
        &with_extensions(&client_syn(40002), ROUTING, &done),
        fixture.pub_ifindex,
    );
    assert_eq!(verdict, XDP_REDIRECT);

    // Seven headers: longer than the walk goes, passed.
    let mut long = Vec::new();
    for _ in 0..6 {
        long.extend_from_slice(&options_header(DESTINATION));
    }
    long.extend_from_slice(&options_header(protocol::TCP));
    let long = with_extensions(&client_syn(40003), DESTINATION, &long);
    let (verdict, out) = fixture.run(&long, fixture.pub_ifindex);
    assert_eq!((verdict, out), (XDP_PASS, long));
    assert_eq!(fixture.counter(counter::PASS_IPV6_EXTENSION), 2);

    // A header whose length runs past the packet: dropped for the VIP, passed otherwise.
    let mut cut = options_header(protocol::TCP);
    cut[1] = 200;
    let for_vip = with_extensions(&client_syn(40004), DESTINATION, &cut);
    let (verdict, _) = fixture.run(&for_vip, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_IPV6), 1);
    let other = tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, OTHER6, 40005, 80, true);
    let for_other = with_extensions(&other, DESTINATION, &cut);
    let (verdict, out) = fixture.run(&for_other, fixture.pub_ifindex);
    assert_eq!((verdict, out), (XDP_PASS, for_other));
    assert_eq!(fixture.counter(counter::PASS_IPV6_EXTENSION), 3);
}

#[test]
fn truncated_ipv6_is_counted_and_never_read_past_the_end() {
    if !skip_unless_privileged("truncated_ipv6_is_counted_and_never_read_past_the_end") {
        return;
    }
    let mut fixture = fixture6();
    let syn = client_syn(40000);
    // The fixed header cut anywhere: dropped.
    for len in [15, 30, 53] {
        let (verdict, _) = fixture.run(&syn[..len], fixture.pub_ifindex);
        assert_eq!(verdict, XDP_DROP, "cut at {len}");
    }
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_IPV6), 3);
    // A payload length past the frame: dropped.
    let mut long = syn.clone();
    long[18..20].copy_from_slice(&100u16.to_be_bytes());
    let (verdict, _) = fixture.run(&long, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_IPV6), 4);
    // The TCP header cut short (payload length and frame agree): for the VIP dropped, for
    // another address passed untouched.
    for (dst, verdict) in [(VIP6, XDP_DROP), (OTHER6, XDP_PASS)] {
        let mut short = tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, dst, 40001, 80, true);
        short.truncate(54 + 12);
        short[18..20].copy_from_slice(&12u16.to_be_bytes());
        let (got, out) = fixture.run(&short, fixture.pub_ifindex);
        assert_eq!(
            got,
            verdict,
            "TCP cut short to {:?}",
            std::net::Ipv6Addr::from(dst)
        );
        if got == XDP_PASS {
            assert_eq!(out, short);
        }
    }
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_L4), 1);
    // TCP inside the packet, but the payload length ends before the TCP header does (the
    // rest of the frame is padding): the same.
    let mut padded = syn.clone();
    padded[18..20].copy_from_slice(&10u16.to_be_bytes());
    let (verdict, _) = fixture.run(&padded, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_L4), 2);

    // The same faults on a port no service or backend uses: the host's own traffic is passed
    // early (`is_plain_host_traffic`), which must not let malformed packets through.
    let ssh = tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, VIP6, 40002, 22, false);
    let (verdict, out) = fixture.run(&ssh, fixture.pub_ifindex);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &ssh),
        "SSH to the VIP passes untouched"
    );
    let mut ssh_long = ssh.clone();
    ssh_long[18..20].copy_from_slice(&200u16.to_be_bytes());
    let mut ssh_version = ssh.clone();
    ssh_version[14] = 0x40 | (ssh_version[14] & 0x0f);
    let mut ssh_padded = ssh.clone();
    ssh_padded[18..20].copy_from_slice(&10u16.to_be_bytes());
    for (what, frame, reason, count) in [
        (
            "payload length past the frame",
            ssh_long,
            counter::DROP_MALFORMED_IPV6,
            5,
        ),
        (
            "version 4 in an IPv6 frame",
            ssh_version,
            counter::DROP_MALFORMED_IPV6,
            6,
        ),
        (
            "TCP only in the padding",
            ssh_padded,
            counter::DROP_MALFORMED_L4,
            3,
        ),
    ] {
        let (verdict, _) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_DROP, "SSH to the VIP, {what}");
        assert_eq!(fixture.counter(reason), count, "SSH to the VIP, {what}");
    }
}

#[test]
fn icmpv6_errors_about_balanced_flows_are_translated_both_ways() {
    if !skip_unless_privileged("icmpv6_errors_about_balanced_flows_are_translated_both_ways") {
        return;
    }
    let mut fixture = fixture6();
    let (verdict, _) = fixture.run(&client_syn(40000), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);

    // A router on the client's path says a reply (VIP:80 -> client) was too big: it goes to
    // backend A, with the outer destination and the quoted source translated. Quoted: the
    // IPv6 header and the first 8 bytes of TCP, all the datapath touches.
    let reply = tcp6((PUB_MAC, CLIENT_MAC), VIP6, CLIENT6, 80, 40000, false);
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
    let input = icmp6_error(
        (CLIENT_MAC, PUB_MAC),
        ROUTER6,
        VIP6,
        too_big,
        &reply[14..62],
    );
    let (verdict, out) = fixture.run(&input, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let as_sent = tcp6(
        (BACK_MAC, BACKEND_A_MAC),
        BACKEND6_A,
        CLIENT6,
        8080,
        40000,
        false,
    );
    let expected = icmp6_error(
        (BACK_MAC, BACKEND_A_MAC),
        ROUTER6,
        BACKEND6_A,
        too_big,
        &as_sent[14..62],
    );
    assert_eq!(out, expected, "packet too big towards backend A");
    assert_eq!(fixture.counter(counter::ICMP_TO_BACKEND), 1);

    // Backend A's side says the client's packet (client -> A:8080, after translation) could
    // not be delivered: the client hears it from the VIP about VIP:80. UDP, quoted whole, so
    // its checksum is checked too.
    let query = udp6_frame(CLIENT6, VIP6, 40001, 53, b"query");
    let (verdict, _) = fixture.run(&query, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let unreachable =
        Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port);
    let translated = udp6_frame(CLIENT6, BACKEND6_A, 40001, 5353, b"query");
    let input = icmp6_error(
        (BACKEND_A_MAC, BACK_MAC),
        BACKEND6_A,
        CLIENT6,
        unreachable,
        &translated[14..],
    );
    let (verdict, out) = fixture.run(&input, fixture.back_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = icmp6_error(
        (PUB_MAC, CLIENT_MAC),
        VIP6,
        CLIENT6,
        unreachable,
        &query[14..],
    );
    assert_eq!(out, expected, "port unreachable towards the client");
    assert_eq!(fixture.counter(counter::ICMP_TO_CLIENT), 1);
}

#[test]
fn neighbour_discovery_echo_and_other_ipv6_pass_byte_for_byte() {
    if !skip_unless_privileged("neighbour_discovery_echo_and_other_ipv6_pass_byte_for_byte") {
        return;
    }
    let mut fixture = fixture6();
    let mut solicitation = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
        .ipv6(
            CLIENT6,
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1],
            255,
        )
        .icmpv6_raw(135, 0, [0; 4])
        .write(&mut solicitation, &VIP6)
        .expect("build");
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut echo, b"ping")
        .expect("build");
    let cases = [
        (
            "neighbour solicitation",
            solicitation,
            counter::PASS_NOT_TCP_UDP,
        ),
        ("echo request to the VIP", echo, counter::PASS_NOT_TCP_UDP),
        (
            "TCP to another address",
            tcp6((CLIENT_MAC, PUB_MAC), CLIENT6, OTHER6, 40000, 80, true),
            counter::PASS_NOT_SERVICE,
        ),
        (
            "UDP to the VIP, no service on the port",
            udp6_frame(CLIENT6, VIP6, 40000, 54, b"x"),
            counter::PASS_NOT_SERVICE,
        ),
    ];
    for (what, frame, reason) in cases {
        let before = fixture.counter(reason);
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!((verdict, &out), (XDP_PASS, &frame), "{what}");
        assert_eq!(fixture.counter(reason), before + 1, "{what}: counted");
    }
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 0);
}
