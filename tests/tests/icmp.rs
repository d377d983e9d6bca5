//! Packet tests of ICMP errors about balanced flows: sent to the flow's backend, or back to the
//! client, with the outer header, the ICMP checksum and the quoted packet all translated. Every
//! checksum of the expected frames is computed from scratch here. Needs root.

use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader,
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
    let mut unrelated = Vec::new();
    PacketBuilder::ipv4(VIP, CLIENT, 63)
        .tcp(22, 50000, 7, 1000)
        .ack(1)
        .write(&mut unrelated, &[])
        .expect("build");
    let error = icmp_error(
        CLIENT_MAC,
        PUB_MAC,
        ROUTER,
        VIP,
        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        &unrelated[..28],
    );
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
