//! Packet tests of IPv4 fragments: the real XDP object on crafted fragments through
//! `BPF_PROG_TEST_RUN`. Expected fragments are cut from a whole datagram translated and
//! checksummed by etherparse, and the translated fragments are reassembled here and their
//! transport checksum verified from scratch: the datapath updates the L4 checksum in the first
//! fragment only, for a payload it never sees whole.
//! Needs root; without it each test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use lb_common::{counter, flow_hash, protocol, FlowKey};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{monotonic_ns, LoadOptions};

/// Payload bytes of the test datagrams, and where they are cut: three fragments of an MTU of
/// 1500 (1480 payload bytes each), the last one short.
const LEN: usize = 3000;
const CUTS: [usize; 2] = [1480, 2960];

/// [`CONFIG`] and two UDP services: "pair" (round robin over both backends) and "sticky"
/// (Maglev over the 3-tuple, on a VIP of its own: the 3-tuple policy covers every later
/// fragment for its address and protocol, the other services' orphans included).
fn config() -> String {
    format!(
        "{CONFIG}{}",
        r#"
[[service]]
name = "pair"
vip = "10.200.1.1"
port = 6000
protocol = "udp"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
[[service.backend]]
address = "10.200.2.11"

[[service]]
name = "sticky"
vip = "10.200.1.5"
port = 7000
protocol = "udp"
scheduler = "maglev"
maglev_table_size = 211
maglev_key = "3-tuple"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
[[service.backend]]
address = "10.200.2.11"
"#
    )
}

const PAIR: usize = 4;
const STICKY: usize = 5;
const STICKY_VIP: [u8; 4] = [10, 200, 1, 5];

/// A whole UDP datagram like [`udp_datagram`], to the "sticky" service's VIP.
fn sticky_datagram(id: u16, src_port: u16) -> Vec<u8> {
    let mut whole = udp_datagram(id, src_port, 7000, LEN);
    whole[30..34].copy_from_slice(&STICKY_VIP);
    with_fresh_checksums(whole)
}

fn fixture() -> Fixture {
    Fixture::with_config(&config(), &LoadOptions::default())
}

/// Runs every frame from the client side; returns the verdicts and frames.
fn run_all(fixture: &mut Fixture, frames: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    frames
        .iter()
        .map(|frame| fixture.run(frame, fixture.pub_ifindex))
        .collect()
}

/// The fragments `whole` should leave as: the whole datagram translated to `backend`:`port`
/// (checksums from scratch), then cut like the input.
fn expected_fragments(whole: &[u8], backend: [u8; 4], port: u16) -> Vec<Vec<u8>> {
    let backend_mac = if backend == BACKEND_A {
        BACKEND_A_MAC
    } else {
        BACKEND_B_MAC
    };
    split(
        &expected_forward(whole, BACK_MAC, backend_mac, backend, port),
        &CUTS,
    )
}

/// Checks each translated fragment byte for byte, then reassembles them and checks the whole
/// datagram's checksums from scratch.
fn assert_translated(out: &[(u32, Vec<u8>)], whole: &[u8], backend: [u8; 4], port: u16) {
    let expected = expected_fragments(whole, backend, port);
    for (index, ((verdict, frame), expected)) in out.iter().zip(&expected).enumerate() {
        assert_eq!(*verdict, XDP_REDIRECT, "fragment {index}");
        assert_eq!(frame, expected, "fragment {index}, every byte");
    }
    let frames: Vec<Vec<u8>> = out.iter().map(|(_, frame)| frame.clone()).collect();
    let reassembled = reassemble(&frames);
    assert_eq!(&reassembled[30..34], &backend);
    assert_checksums_valid(&reassembled, "the reassembled datagram");
}

#[test]
fn a_udp_datagram_in_three_fragments_reaches_one_backend_intact() {
    if !skip_unless_privileged("a_udp_datagram_in_three_fragments_reaches_one_backend_intact") {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram(0x4242, 40000, 53, LEN);
    let fragments = split(&whole, &CUTS);
    assert_eq!(fragments.len(), 3);
    let out = run_all(&mut fixture, &fragments);
    // dns: one backend, A:5353.
    assert_translated(&out, &whole, BACKEND_A, 5353);
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 1);
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
    assert_eq!(fixture.counter(counter::FORWARD_REDIRECT), 3);
    assert_eq!(fixture.counter(counter::PASS_FRAGMENT), 0);
    let stats = lb_user::dataplane::Dataplane::service_stats(&fixture.dataplane, 1).expect("stats");
    let bytes: usize = fragments.iter().map(Vec::len).sum();
    assert_eq!((stats.packets, stats.bytes), (3, bytes as u64));
    let entries = fixture.dataplane.fragments();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0.id, [0, 0, 0x42, 0x42]);
    assert_eq!(entries[0].0.protocol, protocol::UDP);
}

#[test]
fn a_tcp_first_fragment_is_balanced_with_its_checksum_over_the_whole_segment() {
    if !skip_unless_privileged(
        "a_tcp_first_fragment_is_balanced_with_its_checksum_over_the_whole_segment",
    ) {
        return;
    }
    let mut fixture = fixture();
    let whole = tcp_datagram(7, 40001, 80, LEN);
    let out = run_all(&mut fixture, &split(&whole, &CUTS));
    // web: round robin, the first flow goes to A:8080.
    assert_translated(&out, &whole, BACKEND_A, 8080);
    assert_eq!(fixture.counter(counter::FLOW_MISS_MID_STREAM), 1);
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
}

#[test]
fn fragments_before_their_first_are_orphans_without_the_3_tuple_policy() {
    if !skip_unless_privileged(
        "fragments_before_their_first_are_orphans_without_the_3_tuple_policy",
    ) {
        return;
    }
    let mut fixture = fixture();
    let whole = udp_datagram(9, 40002, 53, LEN);
    let mut fragments = split(&whole, &CUTS);
    fragments.reverse();
    let out = run_all(&mut fixture, &fragments);
    assert_eq!(out[0].0, XDP_DROP);
    assert_eq!(out[1].0, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 2);
    // The first fragment still goes on: its datagram is lost, not its flow.
    assert_eq!(out[2].0, XDP_REDIRECT);
    assert_eq!(&out[2].1, &expected_fragments(&whole, BACKEND_A, 5353)[0]);
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 1);
}

#[test]
fn fragments_in_any_order_reach_one_backend_with_the_3_tuple_policy() {
    if !skip_unless_privileged("fragments_in_any_order_reach_one_backend_with_the_3_tuple_policy") {
        return;
    }
    let mut fixture = fixture();
    // The backend the 3-tuple hash gives this client, computed here from the service's table.
    let key = FlowKey {
        src_addr: CLIENT,
        dst_addr: STICKY_VIP,
        src_port: [0; 2],
        dst_port: [0; 2],
        protocol: protocol::UDP,
        _pad: [0; 3],
    };
    let sticky = &fixture.table.services[STICKY];
    let slot = flow_hash(&key) as usize % sticky.table().len();
    let backend_id = sticky.table()[slot];
    let std::net::IpAddr::V4(backend) = sticky
        .backends
        .iter()
        .find(|backend| backend.id == backend_id)
        .expect("listed")
        .addr
        .ip()
    else {
        panic!("the fragment tests' services are IPv4");
    };
    let backend = backend.octets();

    for (id, src_port) in [(100, 41000), (101, 41001), (102, 41002)] {
        let whole = sticky_datagram(id, src_port);
        let mut fragments = split(&whole, &CUTS);
        fragments.reverse();
        let mut out = run_all(&mut fixture, &fragments);
        out.reverse();
        assert_translated(&out, &whole, backend, 7000);
    }
    assert_eq!(fixture.counter(counter::FRAGMENT_BY_3_TUPLE), 6);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 0);
    assert_eq!(fixture.counter(counter::FRAGMENT_TRACKED), 3);

    // In order, a datagram's later fragments follow their entry (same backend either way).
    let whole = sticky_datagram(103, 41003);
    let out = run_all(&mut fixture, &split(&whole, &CUTS));
    assert_translated(&out, &whole, backend, 7000);
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 2);
}

#[test]
fn a_tiny_first_fragment_is_dropped_and_counted() {
    if !skip_unless_privileged("a_tiny_first_fragment_is_dropped_and_counted") {
        return;
    }
    let mut fixture = fixture();
    // 8 bytes of TCP header in the first fragment: ports, no flags, no checksum.
    let whole = tcp_datagram(11, 40003, 80, 64);
    let fragments = split(&whole, &[8]);
    let (verdict, _) = fixture.run(&fragments[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 1);
    // Its rest has no entry: an orphan.
    let (verdict, _) = fixture.run(&fragments[1], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 1);

    // A fixed TCP header whose options run into the next fragment is tiny too.
    let mut with_options = tcp_datagram(12, 40004, 80, 64);
    with_options[14 + 20 + 12] = 0x80; // data offset 8: 32 header bytes
    let fragments = split(&with_options, &[24]);
    let (verdict, _) = fixture.run(&fragments[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 2);
    // A UDP first fragment of 8 bytes holds its whole header and is balanced.
    let udp = split(&udp_datagram(13, 40005, 53, 64), &[8]);
    let (verdict, _) = fixture.run(&udp[0], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TINY_FIRST), 2);
}

#[test]
fn an_entry_past_its_timeout_is_not_followed() {
    if !skip_unless_privileged("an_entry_past_its_timeout_is_not_followed") {
        return;
    }
    let config = config() + "\n[fragments]\ntimeout = \"20ms\"\n";
    let mut fixture = Fixture::with_config(&config, &LoadOptions::default());
    let fragments = split(&udp_datagram(21, 40006, 53, LEN), &CUTS);
    let out = run_all(&mut fixture, &fragments[..2]);
    assert_eq!((out[0].0, out[1].0), (XDP_REDIRECT, XDP_REDIRECT));
    // The datapath's clock is coarse (a jiffy, at most 10 ms): wait well past the timeout.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (verdict, _) = fixture.run(&fragments[2], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_TIMED_OUT), 1);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 0);

    // lb-user's sweep removes it; the same fragment is then an orphan.
    let swept = fixture
        .dataplane
        .sweep_fragments(monotonic_ns(), 20_000_000)
        .expect("sweep");
    assert_eq!(swept, 1);
    let (verdict, _) = fixture.run(&fragments[2], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_ORPHAN), 1);
}

#[test]
fn a_backend_gone_since_the_first_fragment_is_not_followed() {
    if !skip_unless_privileged("a_backend_gone_since_the_first_fragment_is_not_followed") {
        return;
    }
    let mut fixture = fixture();
    let fragments = split(&udp_datagram(22, 40007, 6000, LEN), &CUTS);
    let (verdict, out) = fixture.run(&fragments[0], fixture.pub_ifindex);
    assert_eq!((verdict, &out[30..34]), (XDP_REDIRECT, &BACKEND_A[..]));
    fixture.set_up(PAIR, 0, false);
    let (verdict, _) = fixture.run(&fragments[1], fixture.pub_ifindex);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(fixture.counter(counter::DROP_FRAGMENT_BACKEND_GONE), 1);
}

#[test]
fn a_full_fragment_table_is_counted() {
    if !skip_unless_privileged("a_full_fragment_table_is_counted") {
        return;
    }
    let options = LoadOptions {
        fragment_table_size: 2,
        ..LoadOptions::default()
    };
    let mut fixture = Fixture::with_config(&config(), &options);
    let datagrams: Vec<Vec<Vec<u8>>> = (0..3)
        .map(|index| split(&udp_datagram(30 + index, 40010 + index, 53, LEN), &CUTS))
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
fn fragments_not_for_a_service_pass_byte_for_byte() {
    if !skip_unless_privileged("fragments_not_for_a_service_pass_byte_for_byte") {
        return;
    }
    let mut fixture = fixture();
    let to_other_host = {
        let mut whole = udp_datagram(40, 40020, 53, LEN);
        whole[30..34].copy_from_slice(&OTHER_HOST);
        split(&with_fresh_checksums(whole), &CUTS)
    };
    let from_backend = {
        let mut whole = udp_datagram(41, 5353, 40021, LEN);
        whole[26..30].copy_from_slice(&BACKEND_A);
        whole[30..34].copy_from_slice(&CLIENT);
        split(&with_fresh_checksums(whole), &CUTS)
    };
    // To the VIP's address on a port without a service: the host's own; later ones follow.
    let to_the_host = split(&udp_datagram(42, 40022, 54, LEN), &CUTS);
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
}

#[test]
fn interleaved_datagrams_of_one_client_go_to_their_own_backends() {
    if !skip_unless_privileged("interleaved_datagrams_of_one_client_go_to_their_own_backends") {
        return;
    }
    let mut fixture = fixture();
    // Two flows of "pair" (round robin): the first to A, the second to B.
    let first = udp_datagram(50, 40030, 6000, LEN);
    let second = udp_datagram(51, 40031, 6000, LEN);
    let (a, b) = (split(&first, &CUTS), split(&second, &CUTS));
    let order = [(&a, 0), (&b, 0), (&b, 1), (&a, 1), (&a, 2), (&b, 2)];
    let mut out_a = Vec::new();
    let mut out_b = Vec::new();
    for (fragments, index) in order {
        let result = fixture.run(&fragments[index], fixture.pub_ifindex);
        if std::ptr::eq(fragments, &a) {
            out_a.push(result);
        } else {
            out_b.push(result);
        }
    }
    assert_translated(&out_a, &first, BACKEND_A, 6000);
    assert_translated(&out_b, &second, BACKEND_B, 6000);
    assert_eq!(fixture.counter(counter::FRAGMENT_FOLLOWED), 4);
}

/// The folded sum of an IPv4 pseudo-header, as a sender with transmit offload leaves it in the
/// checksum field (and as the datapath recognises a partial checksum).
fn pseudo_header_sum(src: &[u8], dst: &[u8], protocol: u8, length: u16) -> u16 {
    let word = |bytes: &[u8]| u32::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    let sum = word(&src[0..2])
        + word(&src[2..4])
        + word(&dst[0..2])
        + word(&dst[2..4])
        + u32::from(protocol)
        + u32::from(length);
    fold(sum)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn a_first_fragment_whose_checksum_looks_partial_is_not_completed() {
    if !skip_unless_privileged("a_first_fragment_whose_checksum_looks_partial_is_not_completed") {
        return;
    }
    // A first fragment's checksum covers the whole datagram; one that happens to equal the
    // pseudo-header sum of the fragment alone must not be "completed" over the fragment.
    let mut whole = udp_datagram(0x0707, 40002, 53, LEN);
    let target = pseudo_header_sum(&whole[26..30], &whole[30..34], 17, (CUTS[0]) as u16);
    // Choose the first payload word so that the datagram's (full, valid) checksum is `target`:
    // the word moves the sum by itself, in ones'-complement arithmetic.
    let checksum = u16::from_be_bytes([whole[40], whole[41]]);
    let word = u16::from_be_bytes([whole[42], whole[43]]);
    let adjusted = fold(u32::from(!target) + u32::from(checksum) + u32::from(word));
    whole[42..44].copy_from_slice(&adjusted.to_be_bytes());
    let whole = with_fresh_checksums(whole);
    assert_eq!(
        u16::from_be_bytes([whole[40], whole[41]]),
        target,
        "the test datagram's checksum equals its first fragment's pseudo-header sum"
    );
    let mut fixture = fixture();
    let out = run_all(&mut fixture, &split(&whole, &CUTS));
    assert_translated(&out, &whole, BACKEND_A, 5353);
    assert_eq!(fixture.counter(counter::CHECKSUM_COMPLETED), 0);
}
