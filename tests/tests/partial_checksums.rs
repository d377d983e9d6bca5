//! Packet tests of partial transport checksums (issue 5, "Checksums"): frames whose TCP or UDP
//! checksum field holds only the pseudo-header sum, as a veth sender with transmit offload
//! hands them to XDP. Leaving by XDP_TX or XDP_REDIRECT (native mode), the checksum must be
//! complete and equal to one etherparse computes from scratch; leaving by XDP_PASS, or in
//! generic mode, the field must be the partial sum of the translated pseudo-header, which the
//! kernel completes. The pseudo-header sums here are computed independently with etherparse.
//! Needs root; without it each test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use std::{collections::BTreeSet, net::Ipv4Addr};

use etherparse::{checksum::Sum16BitWords, PacketBuilder};
use lb_common::{counter, MAX_COMPLETED_SEGMENT};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::LoadOptions;

/// Payload lengths around every boundary of the datapath's summing: odd and even tails, the
/// word-by-word path for short segments, the 256-byte chunks, and a 1500-byte MTU's 1460.
const PAYLOAD_LENGTHS: [usize; 16] = [
    0, 1, 2, 3, 5, 215, 216, 217, 235, 236, 237, 238, 255, 513, 1001, 1460,
];

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Payload bytes that differ from position to position, so a misplaced word shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index * 7 + 3) as u8).collect()
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), macs: ([u8; 6], [u8; 6]), data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 0x1234_5678, 64240)
        .ack(0x0102_0304)
        .write(&mut frame, data)
        .expect("build frame");
    frame
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), macs: ([u8; 6], [u8; 6]), data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut frame, data)
        .expect("build frame");
    frame
}

/// Where the transport checksum field is (no IP options in these frames).
fn check_offset(frame: &[u8]) -> usize {
    if frame[23] == TCP {
        34 + 16
    } else {
        34 + 6
    }
}

/// The folded pseudo-header sum of `frame` as it is, in wire order: what Linux leaves in the
/// field when the device is to complete the checksum.
fn pseudo_sum(frame: &[u8]) -> [u8; 2] {
    let total_len = u16::from_be_bytes([frame[16], frame[17]]);
    let segment_len = total_len - 20;
    let sum = Sum16BitWords::new()
        .add_4bytes(frame[26..30].try_into().expect("4 bytes"))
        .add_4bytes(frame[30..34].try_into().expect("4 bytes"))
        .add_2bytes([0, frame[23]])
        .add_2bytes(segment_len.to_be_bytes());
    // etherparse sums words in machine order; its complement, complemented back, is the sum.
    (!sum.ones_complement()).to_ne_bytes()
}

/// `frame` as a sender with transmit offload hands it over: the field holds the pseudo sum.
fn partial(mut frame: Vec<u8>) -> Vec<u8> {
    let at = check_offset(&frame);
    let sum = pseudo_sum(&frame);
    frame[at..at + 2].copy_from_slice(&sum);
    frame
}

/// The first frame `build` makes from `len` payload bytes, its first two varied over every
/// value, that is `wanted`.
fn search_payload(
    len: usize,
    build: impl Fn(&[u8]) -> Vec<u8>,
    wanted: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut data = payload(len);
    (0..=u16::MAX)
        .find_map(|word| {
            data[0..2].copy_from_slice(&word.to_be_bytes());
            let frame = build(&data);
            wanted(&frame).then_some(frame)
        })
        .expect("some value of the first payload word gives the wanted frame")
}

/// The backend a translated frame went to, and its MAC address.
fn chosen_backend(out: &[u8]) -> ([u8; 4], [u8; 6]) {
    let backend: [u8; 4] = out[30..34].try_into().expect("4 bytes");
    let mac = if backend == BACKEND_A {
        BACKEND_A_MAC
    } else {
        BACKEND_B_MAC
    };
    (backend, mac)
}

/// The reply a backend sends to `client_port` of the client, translated back: the frame in,
/// and the frame expected out (fresh checksums).
fn reply_pair(backend: [u8; 4], mac: [u8; 6], client_port: u16, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let reply = tcp(
        (backend, 8080),
        (CLIENT, client_port),
        (mac, BACK_MAC),
        data,
    );
    let mut expected = reply.clone();
    expected[0..6].copy_from_slice(&CLIENT_MAC);
    expected[6..12].copy_from_slice(&PUB_MAC);
    expected[26..30].copy_from_slice(&VIP);
    expected[34..36].copy_from_slice(&80u16.to_be_bytes());
    (partial(reply), with_fresh_checksums(expected))
}

#[test]
fn partial_checksums_leave_complete_by_redirect_both_ways() {
    if !skip_unless_privileged("partial_checksums_leave_complete_by_redirect_both_ways") {
        return;
    }
    let mut fixture = Fixture::new();
    let mut completed = 0;
    for (index, len) in PAYLOAD_LENGTHS.into_iter().enumerate() {
        let data = payload(len);
        let client_port = 41000 + index as u16;
        let frame = partial(tcp(
            (CLIENT, client_port),
            (VIP, 80),
            (CLIENT_MAC, PUB_MAC),
            &data,
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "TCP, {len} payload bytes");
        let (backend, mac) = chosen_backend(&out);
        let expected = expected_forward(&frame, BACK_MAC, mac, backend, 8080);
        assert_frames_equal(&out, &expected, &format!("TCP to a backend, {len} bytes"));

        let (reply, expected) = reply_pair(backend, mac, client_port, &data);
        let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "reply, {len} payload bytes");
        assert_frames_equal(
            &out,
            &expected,
            &format!("reply to the client, {len} bytes"),
        );

        let frame = partial(udp(
            (CLIENT, client_port),
            (VIP, 53),
            (CLIENT_MAC, PUB_MAC),
            &data,
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "UDP, {len} payload bytes");
        let expected = expected_forward(&frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 5353);
        assert_frames_equal(&out, &expected, &format!("UDP to a backend, {len} bytes"));
        completed += 3;
    }
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), completed);
    assert_eq!(fixture.counter(counter::PASS_CHECKSUM_NOT_COMPLETED), 0);
}

#[test]
fn partial_checksums_leave_complete_by_xdp_tx() {
    if !skip_unless_privileged("partial_checksums_leave_complete_by_xdp_tx") {
        return;
    }
    let mut fixture = Fixture::new();
    for len in [0, 3, 236, 1460] {
        let frame = partial(tcp(
            (CLIENT, 42000 + len as u16),
            (VIP, 82),
            (CLIENT_MAC, PUB_MAC),
            &payload(len),
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_TX, "{len} payload bytes");
        let expected = expected_forward(&frame, PUB_MAC, ONE_ARMED_MAC, ONE_ARMED_BACKEND, 82);
        assert_frames_equal(&out, &expected, &format!("one-armed, {len} bytes"));
    }
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 4);
}

/// A complete checksum that happens to equal the pseudo-header sum (once in 65536 packets) is
/// completed too, and completing it gives the right checksum all the same.
#[test]
fn a_complete_checksum_equal_to_the_pseudo_sum_stays_right() {
    if !skip_unless_privileged("a_complete_checksum_equal_to_the_pseudo_sum_stays_right") {
        return;
    }
    let frame = search_payload(
        101,
        |data| tcp((CLIENT, 43000), (VIP, 80), (CLIENT_MAC, PUB_MAC), data),
        |frame| frame[check_offset(frame)..check_offset(frame) + 2] == pseudo_sum(frame),
    );
    assert_eq!(
        with_fresh_checksums(frame.clone()),
        frame,
        "the input's checksum is complete and right"
    );
    let mut fixture = Fixture::new();
    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let (backend, mac) = chosen_backend(&out);
    let expected = expected_forward(&frame, BACK_MAC, mac, backend, 8080);
    assert_frames_equal(&out, &expected, "a coincidentally equal complete checksum");
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 1);
}

/// UDP: a completed checksum of 0 is sent as 0xffff (0 means "none"); a checksum of 0 stays 0
/// and is not taken for a partial one.
#[test]
fn udp_zero_rules_hold_for_partial_checksums() {
    if !skip_unless_privileged("udp_zero_rules_hold_for_partial_checksums") {
        return;
    }
    // A translated checksum that computes to 0: etherparse sends it as 0xffff.
    let frame = search_payload(
        33,
        |data| udp((CLIENT, 44000), (VIP, 53), (CLIENT_MAC, PUB_MAC), data),
        |frame| {
            expected_forward(frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 5353)[40..42] == [0xff; 2]
        },
    );
    let mut fixture = Fixture::new();
    let frame = partial(frame);
    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out[40..42], [0xff, 0xff], "a computed 0 goes out as 0xffff");
    let expected = expected_forward(&frame, BACK_MAC, BACKEND_A_MAC, BACKEND_A, 5353);
    assert_frames_equal(&out, &expected, "UDP whose checksum completes to 0");

    let none = udp_frame(53, 44001, true);
    let (verdict, out) = fixture.run(&none, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out[40..42], [0, 0], "no checksum stays no checksum");
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 1);
}

/// Asserts that `out` is `input` translated (addresses and ports as `expected` has them, a
/// fresh IPv4 checksum) with a transport checksum field that is the partial sum of the
/// translated pseudo-header, and the Ethernet addresses of `expected`.
fn assert_partial_for_translated(out: &[u8], expected: &[u8], what: &str) {
    let at = check_offset(out);
    let mut expected = expected.to_vec();
    let sum = pseudo_sum(&expected);
    expected[at..at + 2].copy_from_slice(&sum);
    assert_eq!(out, expected.as_slice(), "{what}: byte for byte");
}

/// Backends the kernel forwards to (behind a bridge), and a next hop without a neighbour
/// entry: the packet goes to the kernel as an sk_buff that is still CHECKSUM_PARTIAL, so the
/// field must stay partial, for the translated addresses.
#[test]
fn packets_passed_to_the_kernel_keep_a_partial_sum_of_the_translated_header() {
    if !skip_unless_privileged(
        "packets_passed_to_the_kernel_keep_a_partial_sum_of_the_translated_header",
    ) {
        return;
    }
    let via_kernel = BTreeSet::from([Ipv4Addr::from(BACKEND_A), Ipv4Addr::from(BACKEND_B)]);
    let mut fixture = Fixture::with_kernel_paths(CONFIG, &LoadOptions::default(), via_kernel);
    for len in [0, 1, 237, 1460] {
        let frame = partial(tcp(
            (CLIENT, 45000 + len as u16),
            (VIP, 80),
            (CLIENT_MAC, PUB_MAC),
            &payload(len),
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_PASS, "{len} payload bytes");
        let (backend, _) = chosen_backend(&out);
        let expected = expected_forward(&frame, CLIENT_MAC, PUB_MAC, backend, 8080);
        assert_partial_for_translated(&out, &expected, &format!("via the kernel, {len} bytes"));

        let frame = partial(udp(
            (CLIENT, 45000 + len as u16),
            (VIP, 53),
            (CLIENT_MAC, PUB_MAC),
            &payload(len),
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_PASS, "UDP, {len} payload bytes");
        let expected = expected_forward(&frame, CLIENT_MAC, PUB_MAC, BACKEND_A, 5353);
        assert_partial_for_translated(&out, &expected, &format!("UDP via the kernel, {len}"));
    }
    assert_eq!(fixture.counter(counter::PASS_KERNEL_FORWARD), 8);
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 0);

    let mut fixture = Fixture::new();
    let frame = partial(tcp(
        (CLIENT, 45100),
        (VIP, 81),
        (CLIENT_MAC, PUB_MAC),
        &payload(99),
    ));
    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_PASS);
    let expected = expected_forward(&frame, CLIENT_MAC, PUB_MAC, BACKEND_UNRESOLVED, 81);
    assert_partial_for_translated(&out, &expected, "next hop unresolved");
    assert_eq!(fixture.counter(counter::PASS_NEIGH_UNRESOLVED), 1);
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 0);
}

/// In generic (skb) mode the sk_buff, CHECKSUM_PARTIAL included, survives XDP_REDIRECT: the
/// kernel completes the checksum, so XDP must leave a partial sum there too.
#[test]
fn generic_mode_leaves_partial_sums_for_the_kernel() {
    if !skip_unless_privileged("generic_mode_leaves_partial_sums_for_the_kernel") {
        return;
    }
    let options = LoadOptions {
        generic_xdp: true,
        ..LoadOptions::default()
    };
    let mut fixture = Fixture::with_config(CONFIG, &options);
    for len in [0, 3, 1460] {
        let frame = partial(tcp(
            (CLIENT, 46000 + len as u16),
            (VIP, 80),
            (CLIENT_MAC, PUB_MAC),
            &payload(len),
        ));
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "{len} payload bytes");
        let (backend, mac) = chosen_backend(&out);
        let expected = expected_forward(&frame, BACK_MAC, mac, backend, 8080);
        assert_partial_for_translated(&out, &expected, &format!("generic mode, {len} bytes"));
    }
    // A complete checksum is still updated incrementally.
    let frame = tcp((CLIENT, 46999), (VIP, 80), (CLIENT_MAC, PUB_MAC), b"whole");
    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let (backend, mac) = chosen_backend(&out);
    let expected = expected_forward(&frame, BACK_MAC, mac, backend, 8080);
    assert_frames_equal(&out, &expected, "generic mode, complete checksum");
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 0);
}

/// The longest segment XDP completes, and one byte more: that one goes to the kernel
/// translated, its Ethernet header as it came, its checksum partial for the kernel to complete.
#[test]
fn the_longest_segment_is_completed_and_a_longer_one_goes_to_the_kernel() {
    if !skip_unless_privileged(
        "the_longest_segment_is_completed_and_a_longer_one_goes_to_the_kernel",
    ) {
        return;
    }
    // A 1500-byte MTU is far inside the bound; the bound fits one frame of a test run.
    const { assert!(MAX_COMPLETED_SEGMENT >= 1480 && 14 + 20 + MAX_COMPLETED_SEGMENT < 3520) };
    let mut fixture = Fixture::new();
    // The route lookup checks the MTU: make room on the backend side (the thread is in the
    // fixture's namespace, and so is what it starts).
    let status = std::process::Command::new("ip")
        .args(["link", "set", "dev", "back", "mtu", "3400"])
        .status()
        .expect("running ip");
    assert!(status.success(), "raising back's MTU: {status}");
    let longest = MAX_COMPLETED_SEGMENT - 20;
    let frame = partial(tcp(
        (CLIENT, 47000),
        (VIP, 80),
        (CLIENT_MAC, PUB_MAC),
        &payload(longest),
    ));
    let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    let (backend, mac) = chosen_backend(&out);
    let expected = expected_forward(&frame, BACK_MAC, mac, backend, 8080);
    assert_frames_equal(&out, &expected, "the longest completed segment");
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 1);

    for (port, protocol) in [(47001, TCP), (47002, UDP)] {
        let header = if protocol == TCP { 20 } else { 8 };
        let data = payload(MAX_COMPLETED_SEGMENT + 1 - header);
        let (frame, backend_port) = if protocol == TCP {
            let frame = tcp((CLIENT, port), (VIP, 80), (CLIENT_MAC, PUB_MAC), &data);
            (frame, 8080)
        } else {
            let frame = udp((CLIENT, port), (VIP, 53), (CLIENT_MAC, PUB_MAC), &data);
            (frame, 5353)
        };
        let frame = partial(frame);
        let (verdict, out) = fixture.run(&frame, fixture.pub_ifindex);
        assert_eq!(
            verdict, XDP_PASS,
            "one byte past the bound, protocol {protocol}"
        );
        let (backend, _) = chosen_backend(&out);
        let expected = expected_forward(&frame, CLIENT_MAC, PUB_MAC, backend, backend_port);
        assert_partial_for_translated(&out, &expected, &format!("past the bound, {protocol}"));
    }
    assert_eq!(fixture.counter(counter::PASS_CHECKSUM_NOT_COMPLETED), 2);
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 1);
}
