//! Packet tests of IPv6 fragments (RFC 8200, 4.5): the real XDP object on crafted fragments
//! through `BPF_PROG_TEST_RUN`, with IPv6 services from the configuration (so lb-user writes
//! the IPv6 maps, the 3-tuple map included). The fragments are cut here from whole datagrams;
//! the expected ones are cut the same way from the whole datagram translated and checksummed
//! by etherparse, and the translated fragments are reassembled here and their UDP checksum
//! verified from scratch: the datapath updates it in the first fragment only, for a payload
//! it never sees whole.
//! Needs root; without it each test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use etherparse::{Ipv6Header, PacketBuilder, UdpHeader};
use lb_common::{counter, flow_hash, protocol, FlowKey};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{monotonic_ns, Dataplane, LoadOptions};

/// UDP payload bytes of the test datagrams: three fragments for an MTU of 1500 with
/// `Cut::plain`, the last one short.
const LEN: usize = 3000;

/// The sticky service's VIP: a 3-tuple policy covers every later fragment for its address and
/// protocol.
const STICKY_VIP6: [u8; 16] = address6(1, 5);
const OTHER6: [u8; 16] = address6(1, 0x98);

const PAIR: usize = 2;
const STICKY: usize = 3;

fn fixture_with(config: &str, options: &LoadOptions) -> Fixture {
    let fixture = Fixture::with_config(config, options);
    fixture.add_ipv6();
    fixture
}

fn fixture() -> Fixture {
    fixture_with(CONFIG6, &LoadOptions::default())
}

/// A whole UDP datagram over IPv6 with `len` payload bytes of a fixed pattern, from the client
/// side's `pub`; checksum from etherparse.
fn udp_datagram6(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|index| (index * 7 % 251) as u8).collect();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(src, dst, 64)
        .udp(ports.0, ports.1)
        .write(&mut frame, &payload)
        .expect("build frame");
    frame
}

/// A whole TCP segment (ACK, `len` payload bytes) from the client to [`VIP6`].
fn tcp_datagram6(src_port: u16, dst_port: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|index| (index * 13 % 253) as u8).collect();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, PUB_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .tcp(src_port, dst_port, 0x1234_5678, 64240)
        .ack(0x0102_0304)
        .write(&mut frame, &payload)
        .expect("build frame");
    frame
}

/// Where the fragment header starts in a frame `fragment6` made (after hop-by-hop options, or
/// right after the fixed header).
fn fragment_header_at(frame: &[u8]) -> usize {
    if frame[20] == 0 {
        62
    } else {
        54
    }
}

/// Puts fragments (any order) back together into one whole frame, as the receiver's kernel
/// would: the first fragment's Ethernet and fixed header, the pieces at their offsets, no
/// fragment header. Panics on a gap, an overlap, a missing last fragment, or fragments that
/// disagree about their datagram.
fn reassemble6(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut pieces: Vec<(usize, bool, &[u8])> = fragments
        .iter()
        .map(|frame| {
            let at = fragment_header_at(frame);
            let word = u16::from_be_bytes([frame[at + 2], frame[at + 3]]);
            assert_eq!(
                (&frame[22..38], &frame[at..at + 1], &frame[at + 4..at + 8]),
                (
                    &fragments[0][22..38],
                    &fragments[0][fragment_header_at(&fragments[0])..][..1],
                    &fragments[0][fragment_header_at(&fragments[0]) + 4..][..4]
                ),
                "source, next header and identification of one datagram"
            );
            let payload_end = 54 + usize::from(u16::from_be_bytes([frame[18], frame[19]]));
            (
                usize::from(word & 0xfff8),
                word & 1 == 1,
                &frame[at + 8..payload_end],
            )
        })
        .collect();
    pieces.sort_by_key(|(offset, _, _)| *offset);
    let mut data = Vec::new();
    for (offset, _, piece) in &pieces {
        assert_eq!(*offset, data.len(), "no gap, no overlap");
        data.extend_from_slice(piece);
    }
    assert!(!pieces[pieces.len() - 1].1, "the last fragment came");
    let first = fragments
        .iter()
        .find(|frame| {
            let at = fragment_header_at(frame);
            frame[at + 2] == 0 && frame[at + 3] & 0xf8 == 0
        })
        .expect("a first fragment");
    let at = fragment_header_at(first);
    let mut whole = first[..54].to_vec();
    whole[20] = first[at];
    whole[18..20].copy_from_slice(&(data.len() as u16).to_be_bytes());
    whole.extend_from_slice(&data);
    whole
}

/// Checks a whole UDP-over-IPv6 frame's checksum by computing it from scratch.
fn assert_udp_checksum_valid(frame: &[u8]) {
    let (ip, rest) = Ipv6Header::from_slice(&frame[14..]).expect("IPv6 header");
    let (udp, payload) = UdpHeader::from_slice(rest).expect("UDP header");
    let fresh = udp.calc_checksum_ipv6(&ip, payload).expect("sum");
    assert_eq!(
        udp.checksum, fresh,
        "the reassembled datagram's UDP checksum"
    );
}

/// `whole` as it should leave towards `backend`:`port` (MACs of the backend side, destination
/// address and port, UDP or TCP checksum from scratch).
fn translated(whole: &[u8], backend: [u8; 16], port: u16) -> Vec<u8> {
    let mac = if backend == BACKEND6_A {
        BACKEND_A_MAC
    } else {
        BACKEND_B_MAC
    };
    let mut frame = whole.to_vec();
    frame[0..6].copy_from_slice(&mac);
    frame[6..12].copy_from_slice(&BACK_MAC);
    frame[38..54].copy_from_slice(&backend);
    frame[56..58].copy_from_slice(&port.to_be_bytes());
    let (ip, rest) = Ipv6Header::from_slice(&frame[14..]).expect("IPv6 header");
    let check = if ip.next_header == etherparse::IpNumber::TCP {
        let (tcp, payload) = etherparse::TcpHeader::from_slice(rest).expect("TCP header");
        (54 + 16, tcp.calc_checksum_ipv6(&ip, payload).expect("sum"))
    } else {
        let (udp, payload) = UdpHeader::from_slice(rest).expect("UDP header");
        (54 + 6, udp.calc_checksum_ipv6(&ip, payload).expect("sum"))
    };
    frame[check.0..check.0 + 2].copy_from_slice(&check.1.to_be_bytes());
    frame
}

fn run_all(fixture: &mut Fixture, frames: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    frames
        .iter()
        .map(|frame| fixture.run(frame, fixture.pub_ifindex))
        .collect()
}

/// Checks each translated fragment byte for byte against `whole` translated and cut alike,
/// then reassembles them and checks the UDP checksum from scratch.
fn assert_translated(out: &[(u32, Vec<u8>)], whole: &[u8], cut: &Cut, to: ([u8; 16], u16)) {
    let expected = fragment6(&translated(whole, to.0, to.1), cut);
    assert_eq!(out.len(), expected.len());
    for (index, ((verdict, frame), expected)) in out.iter().zip(&expected).enumerate() {
        assert_eq!(*verdict, XDP_REDIRECT, "fragment {index}");
        assert_eq!(frame, expected, "fragment {index}, every byte");
    }
    let frames: Vec<Vec<u8>> = out.iter().map(|(_, frame)| frame.clone()).collect();
    let reassembled = reassemble6(&frames);
    assert_eq!(&reassembled[38..54], &to.0);
    assert_udp_checksum_valid(&reassembled);
}

#[test]
fn an_ipv6_udp_datagram_in_three_fragments_reaches_one_backend_intact() {
    if !skip_unless_privileged("an_ipv6_udp_datagram_in_three_fragments_reaches_one_backend_intact")
    {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram6(CLIENT6, VIP6, (40000, 53), LEN);
    let cut = Cut::plain(0x4242_4242);
    let fragments = fragment6(&whole, &cut);
    assert_eq!(fragments.len(), 3);
    let out = run_all(&mut fixture, &fragments);
    assert_translated(&out, &whole, &cut, (BACKEND6_A, 5353));
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 1);
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 3);
    assert_eq!(fixture.counter(counter::PASS_FRAGMENT), 0);
    let dns6 = fixture.table.services[1].id;
    let stats = fixture.dataplane.service_stats(dns6).expect("stats");
    let bytes: usize = fragments.iter().map(Vec::len).sum();
    assert_eq!((stats.packets, stats.bytes), (3, bytes as u64));
    let entries = fixture.dataplane.fragments6();
    assert_eq!(entries.len(), 1);
    let key = entries[0].0;
    assert_eq!(
        (key.src_addr, key.dst_addr, key.id, key.protocol),
        (CLIENT6, VIP6, [0x42; 4], protocol::UDP)
    );
    assert!(fixture.dataplane.fragments().is_empty(), "not in IPv4's");
}

#[test]
fn a_fragment_header_after_hop_by_hop_options_is_followed_and_kept() {
    if !skip_unless_privileged("a_fragment_header_after_hop_by_hop_options_is_followed_and_kept") {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram6(CLIENT6, VIP6, (40001, 53), LEN);
    let cut = Cut {
        id: 7,
        cuts: &[1440, 2880],
        hop_by_hop: true,
    };
    let out = run_all(&mut fixture, &fragment6(&whole, &cut));
    assert_translated(&out, &whole, &cut, (BACKEND6_A, 5353));
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
}

#[test]
fn ipv6_fragments_before_their_first_are_orphans_without_the_3_tuple_policy() {
    if !skip_unless_privileged(
        "ipv6_fragments_before_their_first_are_orphans_without_the_3_tuple_policy",
    ) {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram6(CLIENT6, VIP6, (40002, 53), LEN);
    let cut = Cut::plain(9);
    let mut fragments = fragment6(&whole, &cut);
    fragments.reverse();
    let out = run_all(&mut fixture, &fragments);
    assert_eq!((out[0].0, out[1].0), (XDP_DROP, XDP_DROP));
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 2);
    // The first fragment still goes on: its datagram is lost, not its flow.
    assert_eq!(out[2].0, XDP_REDIRECT);
    let expected = fragment6(&translated(&whole, BACKEND6_A, 5353), &cut);
    assert_eq!(&out[2].1, &expected[0]);
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 1);
}

#[test]
fn ipv6_fragments_in_any_order_reach_one_backend_with_the_3_tuple_policy() {
    if !skip_unless_privileged(
        "ipv6_fragments_in_any_order_reach_one_backend_with_the_3_tuple_policy",
    ) {
        return;
    }
    let mut fixture = fixture();
    // The backend the 3-tuple hash gives this client, computed here from the service's table.
    let key = FlowKey {
        src_addr: CLIENT6,
        dst_addr: STICKY_VIP6,
        src_port: [0; 2],
        dst_port: [0; 2],
        protocol: protocol::UDP,
        _pad: [0; 3],
    };
    let sticky = &fixture.table.services[STICKY];
    let backend_id = sticky.table()[flow_hash(&key) as usize % sticky.table().len()];
    let std::net::IpAddr::V6(backend) = sticky
        .backends
        .iter()
        .find(|backend| backend.id == backend_id)
        .expect("listed")
        .addr
        .ip()
    else {
        panic!("sticky6's backends are IPv6");
    };
    let backend = backend.octets();

    for (id, src_port) in [(100, 41000), (101, 41001), (102, 41002)] {
        let whole = udp_datagram6(CLIENT6, STICKY_VIP6, (src_port, 7000), LEN);
        let cut = Cut::plain(id);
        let mut fragments = fragment6(&whole, &cut);
        fragments.reverse();
        let mut out = run_all(&mut fixture, &fragments);
        out.reverse();
        assert_translated(&out, &whole, &cut, (backend, 7000));
    }
    assert_eq!(fixture.counter(counter::FRAGMENT_BY_3_TUPLE), 6);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 0);
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 3);

    // In order, a datagram's later fragments follow their entry (same backend either way).
    let whole = udp_datagram6(CLIENT6, STICKY_VIP6, (41003, 7000), LEN);
    let cut = Cut::plain(103);
    let out = run_all(&mut fixture, &fragment6(&whole, &cut));
    assert_translated(&out, &whole, &cut, (backend, 7000));
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
}

#[test]
fn a_tiny_ipv6_first_fragment_is_dropped_and_counted() {
    if !skip_unless_privileged("a_tiny_ipv6_first_fragment_is_dropped_and_counted") {
        return;
    }
    let mut fixture = fixture();
    // 8 bytes of TCP header in the first fragment: ports, no flags, no checksum.
    let whole = tcp_datagram6(40003, 80, 64);
    let fragments = fragment6(&whole, &Cut::at(11, &[8]));
    let (verdict, _) = fixture.run(&fragments[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 1);
    // Its rest has no entry: an orphan.
    let (verdict, _) = fixture.run(&fragments[1], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 1);

    // A fixed TCP header whose options run into the next fragment is tiny too.
    let mut with_options = tcp_datagram6(40004, 80, 64);
    with_options[54 + 12] = 0x80; // data offset 8: 32 header bytes
    let cut = Cut::at(12, &[24]);
    let (verdict, _) = fixture.run(&fragment6(&with_options, &cut)[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 2);
    // A UDP first fragment without a byte of its header.
    let udp = udp_datagram6(CLIENT6, VIP6, (40005, 53), 64);
    let cut = Cut::at(13, &[0]);
    let (verdict, _) = fixture.run(&fragment6(&udp, &cut)[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 3);
    // One of 8 bytes holds its whole header and is balanced.
    let cut = Cut::at(14, &[8]);
    let (verdict, _) = fixture.run(&fragment6(&udp, &cut)[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 3);
}

#[test]
fn an_atomic_fragment_is_balanced_whole_without_tracking() {
    if !skip_unless_privileged("an_atomic_fragment_is_balanced_whole_without_tracking") {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram6(CLIENT6, VIP6, (40006, 53), 200);
    for hop_by_hop in [false, true] {
        let cut = Cut {
            id: 15,
            cuts: &[],
            hop_by_hop,
        };
        let atomic = fragment6(&whole, &cut);
        assert_eq!(atomic.len(), 1);
        let at = fragment_header_at(&atomic[0]);
        assert_eq!(&atomic[0][at + 2..at + 4], &[0, 0], "offset 0, M clear");
        let (verdict, out) = fixture.run(&atomic[0], fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "hop-by-hop {hop_by_hop}");
        let expected = fragment6(&translated(&whole, BACKEND6_A, 5353), &cut);
        assert_eq!(out, expected[0], "every byte, the fragment header kept");
        assert_udp_checksum_valid(&reassemble6(&[out]));
    }
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 0);
    assert!(fixture.dataplane.fragments6().is_empty());
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 2);
}

#[test]
fn an_ipv6_entry_past_its_timeout_is_not_followed_and_is_swept() {
    if !skip_unless_privileged("an_ipv6_entry_past_its_timeout_is_not_followed_and_is_swept") {
        return;
    }
    let config = format!("{CONFIG6}\n[fragments]\ntimeout = \"20ms\"\n");
    let mut fixture = fixture_with(&config, &LoadOptions::default());
    let whole = udp_datagram6(CLIENT6, VIP6, (40007, 53), LEN);
    let fragments = fragment6(&whole, &Cut::plain(21));
    let out = run_all(&mut fixture, &fragments[..2]);
    assert_eq!((out[0].0, out[1].0), (XDP_REDIRECT, XDP_REDIRECT));
    // The datapath's clock is coarse (a jiffy, at most 10 ms): wait well past the timeout.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (verdict, _) = fixture.run(&fragments[2], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TIMED_OUT), 1);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 0);

    // lb-user's sweep removes it from FRAGMENTS6; the same fragment is then an orphan.
    let swept = fixture
        .dataplane
        .sweep_fragments(monotonic_ns(), 20_000_000)
        .expect("sweep");
    assert_eq!(swept, 1);
    assert!(fixture.dataplane.fragments6().is_empty());
    let (verdict, _) = fixture.run(&fragments[2], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 1);
}

#[test]
fn an_ipv6_backend_gone_since_the_first_fragment_is_not_followed() {
    if !skip_unless_privileged("an_ipv6_backend_gone_since_the_first_fragment_is_not_followed") {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram6(CLIENT6, VIP6, (40008, 6000), LEN);
    let fragments = fragment6(&whole, &Cut::plain(22));
    let (verdict, out) = fixture.run(&fragments[0], fixture.pub_ifindex);
    assert_eq!((verdict, &out[38..54]), (XDP_REDIRECT, &BACKEND6_A[..]));
    fixture.set_up(PAIR, 0, false);
    let (verdict, _) = fixture.run(&fragments[1], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_BACKEND_GONE), 1);
}

#[test]
fn a_full_ipv6_fragment_table_is_counted() {
    if !skip_unless_privileged("a_full_ipv6_fragment_table_is_counted") {
        return;
    }
    let options = LoadOptions {
        fragment_table_size: 2,
        ..LoadOptions::default()
    };
    let mut fixture = fixture_with(CONFIG6, &options);
    let datagrams: Vec<Vec<Vec<u8>>> = (0..3)
        .map(|index| {
            let whole = udp_datagram6(CLIENT6, VIP6, (40010 + index as u16, 53), LEN);
            fragment6(&whole, &Cut::plain(30 + index))
        })
        .collect();
    for fragments in &datagrams {
        let (verdict, _) = fixture.run(&fragments[0], fixture.pub_ifindex);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "first fragments go on, tracked or not"
        );
    }
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 2);
    assert_eq!(fixture.counter(counter::FRAGMENT_TABLE_FULL), 1);
    let (verdict, _) = fixture.run(&datagrams[2][1], fixture.pub_ifindex);
    assert_eq!(
        verdict, XDP_DROP,
        "the untracked datagram's rest is an orphan"
    );
    let (verdict, _) = fixture.run(&datagrams[0][1], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT, "the tracked ones are followed");
    // A first fragment sent again replaces its own entry, even in a full table.
    let (verdict, _) = fixture.run(&datagrams[1][0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fixture.counter(counter::FRAGMENT_TABLE_FULL), 1);
}

#[test]
fn ipv6_fragments_not_for_a_service_pass_byte_for_byte() {
    if !skip_unless_privileged("ipv6_fragments_not_for_a_service_pass_byte_for_byte") {
        return;
    }
    let mut fixture = fixture();
    let cut = Cut::plain(40);
    let to_other_host = fragment6(&udp_datagram6(CLIENT6, OTHER6, (40020, 53), LEN), &cut);
    let from_backend = {
        let mut whole = udp_datagram6(BACKEND6_A, CLIENT6, (5353, 40021), LEN);
        whole[0..12].copy_from_slice(&[BACK_MAC, BACKEND_A_MAC].concat());
        fragment6(&whole, &cut)
    };
    // To the VIP's address on a port without a service: the host's own; later ones follow.
    let to_the_host = fragment6(&udp_datagram6(CLIENT6, VIP6, (40022, 54), LEN), &cut);
    for (what, fragments, ifindex) in [
        ("to another host", &to_other_host, fixture.pub_ifindex),
        ("a backend's reply", &from_backend, fixture.back_ifindex),
        (
            "to the VIP's address, no service",
            &to_the_host,
            fixture.pub_ifindex,
        ),
    ] {
        let before = fixture.counter(counter::PASS_FRAGMENT);
        for (index, fragment) in fragments.iter().enumerate() {
            let (verdict, out) = fixture.run(fragment, ifindex);
            assert_eq!(verdict, XDP_PASS, "{what}: fragment {index}");
            assert_eq!(&out, fragment, "{what}: fragment {index} unchanged");
        }
        assert_eq!(
            fixture.counter(counter::PASS_FRAGMENT),
            before + 3,
            "{what}"
        );
    }
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 1, "to the host");
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 0);

    // Fragments of anything but TCP or UDP (here ICMPv6) are the kernel's, for a VIP too.
    let mut icmp = fragment6(&udp_datagram6(CLIENT6, VIP6, (40023, 53), LEN), &cut);
    for fragment in &mut icmp {
        let at = fragment_header_at(fragment);
        fragment[at] = 58;
        let (verdict, out) = fixture.run(fragment, fixture.pub_ifindex);
        assert_eq!((verdict, &out), (XDP_PASS, &*fragment), "ICMPv6 fragment");
    }
    assert_eq!(fixture.counter(counter::PASS_NOT_TCP_UDP), 3);
}
