//! Packet tests of ICMP errors about balanced flows: sent to the flow's backend, or back to the
//! client, with the outer header, the ICMP checksum and the quoted packet all translated; and,
//! when the route lookup cannot send a translated error on, passed to the kernel exactly as it
//! came (only an unresolved neighbour gets the translated error, for the kernel to forward;
//! but an IPv4 error towards a client, from the VIP, is dropped: the kernel would not forward
//! it).
//! Every checksum of the expected frames is computed from scratch here. Needs root.

use std::net::Ipv4Addr;

use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type, Ipv4Header,
    PacketBuilder, TcpHeader, UdpHeader,
};
use lb_common::counter;
use lb_tests::{packet::*, skip_unless_privileged};

/// A router on the client's side of this host.
const ROUTER: [u8; 4] = [10, 200, 1, 254];

/// The Internet checksum (RFC 1071) of `bytes`, written from scratch.
fn internet_checksum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

/// Recomputes the outer IPv4, ICMP and quoted IPv4 checksums of an ICMP error frame (and the
/// quoted UDP checksum when the whole datagram is quoted).
fn with_fresh_icmp_checksums(mut frame: Vec<u8>) -> Vec<u8> {
    let (outer, _) = Ipv4Header::from_slice(&frame[14..]).expect("outer header");
    frame[24..26].copy_from_slice(&outer.calc_header_checksum().to_be_bytes());
    let icmp = 14 + outer.header_len();
    let inner = icmp + 8;
    let (quoted, _) = Ipv4Header::from_slice(&frame[inner..]).expect("quoted header");
    frame[inner + 10..inner + 12].copy_from_slice(&quoted.calc_header_checksum().to_be_bytes());
    let quoted_l4 = inner + quoted.header_len();
    let quoted_end = inner + usize::from(quoted.total_len);
    if quoted.protocol == etherparse::IpNumber::UDP && quoted_end <= frame.len() {
        let (udp, _) = UdpHeader::from_slice(&frame[quoted_l4..quoted_end]).expect("quoted udp");
        let sum = udp
            .calc_checksum_ipv4(&quoted, &frame[quoted_l4 + 8..quoted_end])
            .expect("checksum");
        frame[quoted_l4 + 6..quoted_l4 + 8].copy_from_slice(&sum.to_be_bytes());
    }
    frame[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&frame[icmp..]);
    frame[icmp + 2..icmp + 4].copy_from_slice(&sum);
    frame
}

fn icmp_error(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    kind: DestUnreachableHeader,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(kind))
        .write(&mut frame, quoted)
        .expect("build");
    frame
}

/// A router on the client's path says that this host's reply, VIP:`vip_port` -> client
/// `client_port` (TCP), was too big; it quotes the reply's IP header and first 8 TCP bytes.
fn fragmentation_needed_for_reply(vip_port: u16, client_port: u16) -> Vec<u8> {
    let mut reply = Vec::new();
    PacketBuilder::ipv4(VIP, CLIENT, 63)
        .tcp(vip_port, client_port, 7, 1000)
        .ack(1)
        .write(&mut reply, &[])
        .expect("build");
    icmp_error(
        CLIENT_MAC,
        PUB_MAC,
        ROUTER,
        VIP,
        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        &reply[..28],
    )
}

#[test]
fn fragmentation_needed_for_a_reply_reaches_the_flows_backend() {
    if !skip_unless_privileged("fragmentation_needed_for_a_reply_reaches_the_flows_backend") {
        return;
    }
    let mut fixture = Fixture::new();
    let (_, _) = fixture.run(&Tcp::from_client(80, 48000).frame(), fixture.pub_ifindex);

    // What this host sent the client: VIP:80 -> client:48000. A router quotes its IP header
    // and the first 8 bytes of TCP.
    let mut reply = Vec::new();
    PacketBuilder::ipv4(VIP, CLIENT, 63)
        .tcp(80, 48000, 7, 1000)
        .ack(1)
        .write(&mut reply, &[0u8; 1400])
        .expect("build");
    let quoted = &reply[..20 + 8];
    let error = icmp_error(
        CLIENT_MAC,
        PUB_MAC,
        ROUTER,
        VIP,
        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        quoted,
    );

    let (verdict, out) = fixture.run(&error, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let mut expected = error.clone();
    expected[0..6].copy_from_slice(&BACKEND_A_MAC);
    expected[6..12].copy_from_slice(&BACK_MAC);
    expected[30..34].copy_from_slice(&BACKEND_A); // outer destination
    let inner = 14 + 20 + 8;
    expected[inner + 12..inner + 16].copy_from_slice(&BACKEND_A); // quoted source
    expected[inner + 20..inner + 22].copy_from_slice(&8080u16.to_be_bytes()); // quoted port
    assert_eq!(out, with_fresh_icmp_checksums(expected));
    assert_eq!(fixture.counter(counter::ICMP_TO_BACKEND), 1);
    // The quoted TCP header is only 8 bytes: nothing of it past the ports was touched.
    let (tcp, _) = TcpHeader::from_slice(&reply[20..]).expect("tcp");
    assert_eq!(
        out[inner + 24..inner + 28],
        tcp.sequence_number.to_be_bytes()
    );
}

#[test]
fn port_unreachable_from_a_backend_reaches_the_client_as_from_the_vip() {
    if !skip_unless_privileged("port_unreachable_from_a_backend_reaches_the_client_as_from_the_vip")
    {
        return;
    }
    let mut fixture = Fixture::new();
    let query = udp_frame(53, 48001, false);
    let (_, forwarded) = fixture.run(&query, fixture.pub_ifindex);
    // The backend quotes the whole datagram it received (client -> backend A:5353).
    let quoted = forwarded[14..].to_vec();
    let error = icmp_error(
        BACKEND_A_MAC,
        BACK_MAC,
        BACKEND_A,
        CLIENT,
        DestUnreachableHeader::Port,
        &quoted,
    );

    let (verdict, out) = fixture.run(&error, fixture.back_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let mut expected = error.clone();
    expected[0..6].copy_from_slice(&CLIENT_MAC);
    expected[6..12].copy_from_slice(&PUB_MAC);
    expected[26..30].copy_from_slice(&VIP); // outer source
    let inner = 14 + 20 + 8;
    expected[inner + 16..inner + 20].copy_from_slice(&VIP); // quoted destination
    expected[inner + 22..inner + 24].copy_from_slice(&53u16.to_be_bytes()); // quoted port
    let expected = with_fresh_icmp_checksums(expected);
    assert_eq!(out, expected);
    // The quoted datagram is now exactly what the client sent.
    assert_eq!(&out[inner..], &query[14..]);
    assert_eq!(fixture.counter(counter::ICMP_TO_CLIENT), 1);
}

#[test]
fn icmp_that_is_not_about_a_balanced_flow_passes_unchanged() {
    if !skip_unless_privileged("icmp_that_is_not_about_a_balanced_flow_passes_unchanged") {
        return;
    }
    let mut fixture = Fixture::new();
    let error = fragmentation_needed_for_reply(22, 50000);
    let (verdict, out) = fixture.run(&error, fixture.pub_ifindex);
    assert_eq!((verdict, &out), (XDP_PASS, &error));
    // Cut inside the quoted header, with a total length that says so: not enough to translate.
    let mut truncated = error[..14 + 20 + 8 + 10].to_vec();
    truncated[16..18].copy_from_slice(&((20 + 8 + 10) as u16).to_be_bytes());
    let (outer, _) = Ipv4Header::from_slice(&truncated[14..]).expect("outer header");
    truncated[24..26].copy_from_slice(&outer.calc_header_checksum().to_be_bytes());
    let (verdict, out) = fixture.run(&truncated, fixture.pub_ifindex);
    assert_eq!((verdict, &out), (XDP_PASS, &truncated));
    assert_eq!(fixture.counter(counter::PASS_NOT_TCP_UDP), 2);
}

/// An error about a balanced flow that the route lookup cannot send on: `frame` must come out
/// of the datapath as it went in, passed and counted under `reason`, and translated neither
/// way.
fn assert_passed_untouched(fixture: &mut Fixture, frame: &[u8], ifindex: u32, reason: u32) {
    let before = fixture.counter(reason);
    let (verdict, out) = fixture.run(frame, ifindex);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame, "a passed error leaves byte for byte unchanged");
    assert_eq!(fixture.counter(reason), before + 1);
    assert_eq!(fixture.counter(counter::ICMP_TO_BACKEND), 0);
    assert_eq!(fixture.counter(counter::ICMP_TO_CLIENT), 0);
}

#[test]
fn an_error_without_a_route_on_passes_unchanged() {
    if !skip_unless_privileged("an_error_without_a_route_on_passes_unchanged") {
        return;
    }
    let mut fixture = Fixture::new();
    let (verdict, _) = fixture.run(&Tcp::from_client(80, 48000).frame(), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let query = udp_frame(53, 48001, false);
    let (verdict, forwarded) = fixture.run(&query, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);

    // Both flows exist; now neither the backend nor the client can be routed to.
    ip(&[
        "route",
        "add",
        "unreachable",
        &Ipv4Addr::from(BACKEND_A).to_string(),
    ]);
    ip(&[
        "route",
        "add",
        "prohibit",
        &Ipv4Addr::from(CLIENT).to_string(),
    ]);

    // Towards the backend: "fragmentation needed" about the reply VIP:80 -> client:48000.
    let to_backend = fragmentation_needed_for_reply(80, 48000);
    let pub_ifindex = fixture.pub_ifindex;
    assert_passed_untouched(
        &mut fixture,
        &to_backend,
        pub_ifindex,
        counter::PASS_NO_ROUTE,
    );

    // Towards the client: backend A's "port unreachable" about the translated query.
    let to_client = icmp_error(
        BACKEND_A_MAC,
        BACK_MAC,
        BACKEND_A,
        CLIENT,
        DestUnreachableHeader::Port,
        &forwarded[14..],
    );
    let back_ifindex = fixture.back_ifindex;
    assert_passed_untouched(
        &mut fixture,
        &to_client,
        back_ifindex,
        counter::PASS_NO_ROUTE,
    );
}

#[test]
fn an_error_towards_an_unresolved_neighbour_is_translated_for_the_kernel() {
    if !skip_unless_privileged(
        "an_error_towards_an_unresolved_neighbour_is_translated_for_the_kernel",
    ) {
        return;
    }
    let mut fixture = Fixture::new();
    // The "unresolved" service's backend is routed through `back` but has no neighbour entry.
    let (verdict, _) = fixture.run(&Tcp::from_client(81, 48002).frame(), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 1);

    let error = fragmentation_needed_for_reply(81, 48002);
    let (verdict, out) = fixture.run(&error, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);
    // Translated, with the Ethernet header as it came: the kernel picks the next hop.
    let mut expected = error.clone();
    expected[30..34].copy_from_slice(&BACKEND_UNRESOLVED); // outer destination
    let inner = 14 + 20 + 8;
    expected[inner + 12..inner + 16].copy_from_slice(&BACKEND_UNRESOLVED); // quoted source
    expected[inner + 20..inner + 22].copy_from_slice(&81u16.to_be_bytes()); // backend port
    assert_eq!(out, with_fresh_icmp_checksums(expected));
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 2);
    assert_eq!(fixture.counter(counter::ICMP_TO_BACKEND), 1);
}

#[test]
fn an_ipv4_error_towards_a_client_without_a_neighbour_is_dropped_untouched() {
    if !skip_unless_privileged(
        "an_ipv4_error_towards_a_client_without_a_neighbour_is_dropped_untouched",
    ) {
        return;
    }
    let mut fixture = Fixture::new();
    let query = udp_frame(53, 48003, false);
    let (verdict, forwarded) = fixture.run(&query, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    // The client's neighbour entry goes, as an expired one does.
    let client = Ipv4Addr::from(CLIENT).to_string();
    ip(&["neigh", "del", &client, "dev", "pub"]);

    // Backend A's "port unreachable" would come from the VIP, a martian for the kernel.
    let error = icmp_error(
        BACKEND_A_MAC,
        BACK_MAC,
        BACKEND_A,
        CLIENT,
        DestUnreachableHeader::Port,
        &forwarded[14..],
    );
    let (verdict, out) = fixture.run(&error, fixture.back_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(out, error, "dropped before anything was translated");
    assert_eq!(fixture.counter(counter::DROP_NEIGH_UNRESOLVED), 1);
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 0);
    assert_eq!(fixture.counter(counter::ICMP_TO_CLIENT), 0);
    let wanted = lb_user::neighbours::Neighbour {
        addr: std::net::IpAddr::V4(CLIENT.into()),
        ifindex: fixture.pub_ifindex,
    };
    assert_eq!(fixture.drain_wanted_neighbours(), [wanted]);
}

#[test]
fn an_icmpv6_error_without_a_route_on_passes_unchanged() {
    if !skip_unless_privileged("an_icmpv6_error_without_a_route_on_passes_unchanged") {
        return;
    }
    // web6's first flow goes to backend A; dns6 has only A.
    let mut fixture = Fixture::with_config(CONFIG6, &Default::default());
    fixture.add_ipv6();
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut syn, &[])
        .expect("build");
    let (verdict, _) = fixture.run(&syn, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let mut query = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .udp(40001, 53)
        .write(&mut query, b"query")
        .expect("build");
    let (verdict, forwarded) = fixture.run(&query, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);

    // Towards the backend: "packet too big" about the reply VIP:80 -> client:40000, from the
    // loopback address, which the kernel's route lookup refuses to forward from (the case the
    // fuzzer found).
    let mut reply = Vec::new();
    PacketBuilder::ipv6(VIP6, CLIENT6, 64)
        .tcp(80, 40000, 7, 64240)
        .ack(1)
        .write(&mut reply, &[])
        .expect("build");
    let loopback = std::net::Ipv6Addr::LOCALHOST.octets();
    let to_backend = icmp6_error(
        (CLIENT_MAC, PUB_MAC),
        loopback,
        VIP6,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        &reply[..48],
    );
    let pub_ifindex = fixture.pub_ifindex;
    assert_passed_untouched(
        &mut fixture,
        &to_backend,
        pub_ifindex,
        counter::PASS_NO_ROUTE,
    );

    // Towards the client, once the client cannot be routed to: backend A's "port unreachable"
    // about the translated query.
    let client = std::net::Ipv6Addr::from(CLIENT6).to_string();
    ip(&["-6", "route", "add", "unreachable", &client]);
    let to_client = icmp6_error(
        (BACKEND_A_MAC, BACK_MAC),
        BACKEND6_A,
        CLIENT6,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        &forwarded[14..],
    );
    let back_ifindex = fixture.back_ifindex;
    assert_passed_untouched(
        &mut fixture,
        &to_client,
        back_ifindex,
        counter::PASS_NO_ROUTE,
    );
}
