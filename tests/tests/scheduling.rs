//! Packet tests of scheduling and the flow table, through `BPF_PROG_TEST_RUN` on the real
//! object: weights, drain, Maglev on flow-table misses, port reuse after FIN/RST, two services
//! sharing a backend, and forged sources. Needs root (see `lb_tests::skip_unless_privileged`).

use lb_common::{counter, flow_hash, protocol, FlowKey};
use lb_tests::{packet::*, skip_unless_privileged};
use lb_user::dataplane::{Dataplane, LoadOptions};

const TCP_FLAGS: usize = 14 + 20 + 13;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

const SCHEDULING: &str = r#"
[[service]]
name = "weighted"
vip = "10.200.1.1"
port = 80
scheduler = "weighted"
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8080
weight = 3
[[service.backend]]
address = "10.200.2.11"
port = 8080
weight = 1

[[service]]
name = "maglev"
vip = "10.200.1.1"
port = 81
scheduler = "maglev"
maglev_table_size = 1009
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8081
[[service.backend]]
address = "10.200.2.11"
port = 8081
[[service.backend]]
address = "10.200.2.10"
port = 8082

[[service]]
name = "round-robin"
vip = "10.200.1.1"
port = 82
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8083
[[service.backend]]
address = "10.200.2.11"
port = 8083

[[service]]
name = "shares-a-backend"
vip = "10.200.1.1"
port = 83
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8084

[[service]]
name = "same-endpoint"
vip = "10.200.1.1"
port = 84
[service.health_check]
kind = "none"
[[service.backend]]
address = "10.200.2.10"
port = 8084
"#;

fn fixture() -> Fixture {
    Fixture::with_config(SCHEDULING, &LoadOptions::default())
}

/// The backend address and port a forwarded frame was sent to.
fn destination(frame: &[u8]) -> ([u8; 4], u16) {
    let addr = [frame[30], frame[31], frame[32], frame[33]];
    (addr, u16::from_be_bytes([frame[36], frame[37]]))
}

fn with_flags(frame: Vec<u8>, flags: u8) -> Vec<u8> {
    let mut frame = frame;
    frame[TCP_FLAGS] = flags;
    with_fresh_checksums(frame)
}

fn tuple(src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        src_addr: CLIENT,
        dst_addr: VIP,
        src_port: src_port.to_be_bytes(),
        dst_port: dst_port.to_be_bytes(),
        protocol: protocol::TCP,
        _pad: [0; 3],
    }
}

#[test]
fn weighted_round_robin_honours_weights() {
    if !skip_unless_privileged("weighted_round_robin_honours_weights") {
        return;
    }
    let mut fixture = fixture();
    let mut to_a = 0;
    for port in 0..400 {
        let (verdict, out) = fixture.run(
            &Tcp::from_client(80, 20000 + port).frame(),
            fixture.pub_ifindex,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        if destination(&out).0 == BACKEND_A {
            to_a += 1;
        }
    }
    // One CPU, one period of smooth weighted round robin per 4 flows: exactly 3 in 4.
    assert_eq!(to_a, 300);
}

#[test]
fn a_drained_backend_keeps_its_flows_and_gets_no_new_ones() {
    if !skip_unless_privileged("a_drained_backend_keeps_its_flows_and_gets_no_new_ones") {
        return;
    }
    let mut fixture = fixture();
    let mut on_b = Vec::new();
    for port in 0..20 {
        let (_, out) = fixture.run(
            &Tcp::from_client(82, 21000 + port).frame(),
            fixture.pub_ifindex,
        );
        if destination(&out).0 == BACKEND_B {
            on_b.push(21000 + port);
        }
    }
    assert_eq!(on_b.len(), 10);

    let b: std::net::SocketAddr = "10.200.2.11:8083".parse().expect("address");
    assert!(fixture
        .table
        .set_drained("round-robin", b, true, &mut fixture.dataplane)
        .expect("drain"));
    for &port in &on_b {
        let data = Tcp {
            syn: false,
            ..Tcp::from_client(82, port)
        }
        .frame();
        let (verdict, out) = fixture.run(&data, fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            destination(&out),
            (BACKEND_B, 8083),
            "an existing flow stays on the drained backend"
        );
    }
    for port in 0..20 {
        let (_, out) = fixture.run(
            &Tcp::from_client(82, 22000 + port).frame(),
            fixture.pub_ifindex,
        );
        assert_eq!(
            destination(&out).0,
            BACKEND_A,
            "no new flow goes to a drained backend"
        );
    }
}

#[test]
fn maglev_sends_a_mid_stream_miss_where_the_hash_says() {
    if !skip_unless_privileged("maglev_sends_a_mid_stream_miss_where_the_hash_says") {
        return;
    }
    let mut first = fixture();
    let service = first
        .table
        .services
        .iter()
        .find(|s| s.config.name == "maglev")
        .expect("svc");
    let table = service.table().to_vec();
    let backends: Vec<(u32, [u8; 4], u16)> = service
        .backends
        .iter()
        .map(|b| match b.addr {
            std::net::SocketAddr::V4(addr) => (b.id, addr.ip().octets(), addr.port()),
            other => panic!("the test configuration is IPv4, not {other}"),
        })
        .collect();
    assert_eq!(table.len(), 1009);

    let mut seen = Vec::new();
    for port in 0..300u16 {
        // An ACK, not a SYN: as if the flow began before a restart or at another balancer.
        let frame = Tcp {
            syn: false,
            ..Tcp::from_client(81, 23000 + port)
        }
        .frame();
        let (verdict, out) = first.run(&frame, first.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        let id = table[(flow_hash(&tuple(23000 + port, 81)) % 1009) as usize];
        let expected = backends
            .iter()
            .find(|b| b.0 == id)
            .expect("table holds backend ids");
        assert_eq!(
            destination(&out),
            (expected.1, expected.2),
            "flow from port {}",
            23000 + port
        );
        seen.push(destination(&out));
    }
    assert_eq!(first.counter(counter::FLOW_MISS_MID_STREAM), 300);
    assert_eq!(first.counter(counter::FLOW_MISS_NEW), 0);
    drop(first);

    // A second load balancer with the same configuration and an empty flow table agrees.
    let mut second = fixture();
    for port in 0..300u16 {
        let frame = Tcp {
            syn: false,
            ..Tcp::from_client(81, 23000 + port)
        }
        .frame();
        let (_, out) = second.run(&frame, second.pub_ifindex);
        assert_eq!(destination(&out), seen[port as usize]);
    }
}

#[test]
fn with_maglev_only_the_flows_of_a_removed_backend_move() {
    if !skip_unless_privileged("with_maglev_only_the_flows_of_a_removed_backend_move") {
        return;
    }
    let mut fixture = fixture();
    let mut before = Vec::new();
    for port in 0..10_000u16 {
        let (_, out) = fixture.run(
            &Tcp::from_client(81, 30000 + port).frame(),
            fixture.pub_ifindex,
        );
        before.push(destination(&out));
    }
    let removed = (BACKEND_A, 8082);
    let on_removed = before.iter().filter(|d| **d == removed).count();
    assert!(
        on_removed > 2000,
        "about a third of 10,000 flows: {on_removed}"
    );

    fixture.set_up(1, 2, false);
    let mut moved_survivors = 0;
    for port in 0..10_000u16 {
        let data = Tcp {
            syn: false,
            ..Tcp::from_client(81, 30000 + port)
        }
        .frame();
        let (_, out) = fixture.run(&data, fixture.pub_ifindex);
        let now = destination(&out);
        let was = before[port as usize];
        if was == removed {
            assert_ne!(now, removed);
        } else if now != was {
            moved_survivors += 1;
        }
    }
    assert_eq!(
        moved_survivors, 0,
        "no flow of a surviving backend may move"
    );
    assert_eq!(
        fixture.counter(counter::FLOW_RESCHEDULED),
        on_removed as u64
    );
}

#[test]
fn a_syn_after_rst_or_fin_starts_a_fresh_flow_at_once() {
    if !skip_unless_privileged("a_syn_after_rst_or_fin_starts_a_fresh_flow_at_once") {
        return;
    }
    let mut fixture = fixture();
    // Client RST: the entry closes; the next SYN from the same port is a new flow, scheduled
    // round robin onto the other backend, and forwarded at once.
    let (_, out) = fixture.run(&Tcp::from_client(82, 24000).frame(), fixture.pub_ifindex);
    let first = destination(&out);
    let rst = with_flags(
        Tcp {
            syn: false,
            ..Tcp::from_client(82, 24000)
        }
        .frame(),
        RST | ACK,
    );
    let (verdict, out) = fixture.run(&rst, fixture.pub_ifindex);
    assert_eq!(
        (verdict, destination(&out)),
        (XDP_REDIRECT, first),
        "the RST still reaches its backend"
    );
    assert_eq!(fixture.counter(counter::FLOW_CLOSING), 1);
    let (verdict, out) = fixture.run(&Tcp::from_client(82, 24000).frame(), fixture.pub_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_ne!(destination(&out), first, "a fresh scheduling decision");
    assert_eq!(fixture.counter(counter::FLOW_PORT_REUSE), 1);

    // Backend FIN (on the reply path) closes the client's flow too.
    let (_, out) = fixture.run(&Tcp::from_client(82, 24001).frame(), fixture.pub_ifindex);
    let (backend, backend_port) = destination(&out);
    let fin = Tcp {
        src_mac: BACKEND_A_MAC,
        dst_mac: BACK_MAC,
        src: backend,
        dst: CLIENT,
        src_port: backend_port,
        dst_port: 24001,
        syn: false,
        payload: b"",
    }
    .frame();
    let (verdict, _) = fixture.run(&with_flags(fin, FIN | ACK), fixture.back_ifindex);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fixture.counter(counter::FLOW_CLOSING), 2);
    let (_, out) = fixture.run(&Tcp::from_client(82, 24001).frame(), fixture.pub_ifindex);
    assert_eq!(fixture.counter(counter::FLOW_PORT_REUSE), 2);
    assert_ne!(destination(&out), (backend, backend_port));

    // A plain retransmitted SYN of an open flow is not port reuse: it stays.
    let (_, out) = fixture.run(&Tcp::from_client(82, 24002).frame(), fixture.pub_ifindex);
    let (_, again) = fixture.run(&Tcp::from_client(82, 24002).frame(), fixture.pub_ifindex);
    assert_eq!(destination(&out), destination(&again));
}

#[test]
fn two_services_sharing_a_backend_keep_their_replies_apart() {
    if !skip_unless_privileged("two_services_sharing_a_backend_keep_their_replies_apart") {
        return;
    }
    let mut fixture = fixture();
    // Same client port to two services; both land on 10.200.2.10, on two ports.
    let (_, out_83) = fixture.run(&Tcp::from_client(83, 25000).frame(), fixture.pub_ifindex);
    assert_eq!(destination(&out_83), (BACKEND_A, 8084));
    let (_, out_82) = fixture.run(&Tcp::from_client(82, 25000).frame(), fixture.pub_ifindex);
    assert_eq!(
        destination(&out_82),
        (BACKEND_A, 8083),
        "round robin starts with the first backend"
    );

    for (backend_port, service_port) in [(8084u16, 83u16), (8083, 82)] {
        let reply = Tcp {
            src_mac: BACKEND_A_MAC,
            dst_mac: BACK_MAC,
            src: BACKEND_A,
            dst: CLIENT,
            src_port: backend_port,
            dst_port: 25000,
            syn: false,
            payload: b"reply",
        }
        .frame();
        let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(&out[26..30], &VIP);
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), service_port);
    }
    assert_eq!(
        fixture
            .dataplane
            .service_stats(3)
            .expect("stats")
            .reply_packets,
        1
    );
    assert_eq!(
        fixture
            .dataplane
            .service_stats(2)
            .expect("stats")
            .reply_packets,
        1
    );
}

#[test]
fn a_new_flow_from_a_forged_source_is_dropped() {
    if !skip_unless_privileged("a_new_flow_from_a_forged_source_is_dropped") {
        return;
    }
    let mut fixture = Fixture::new();
    // This host's backend-side address, and the VIP itself, arriving from the public side.
    for forged in [[10, 200, 2, 1], VIP, BACKEND_A] {
        let syn = Tcp {
            src: forged,
            ..Tcp::from_client(80, 45000)
        }
        .frame();
        let (verdict, out) = fixture.run(&syn, fixture.pub_ifindex);
        assert_eq!((verdict, out), (XDP_DROP, syn), "source {forged:?}");
    }
    assert_eq!(fixture.counter(counter::DROP_SPOOFED_SOURCE), 3);
    assert_eq!(
        fixture.counter(counter::FLOW_MISS_NEW),
        0,
        "no entry was created"
    );
}

#[test]
fn one_backend_endpoint_serving_two_services_keeps_replies_apart() {
    if !skip_unless_privileged("one_backend_endpoint_serving_two_services_keeps_replies_apart") {
        return;
    }
    let mut fixture = fixture();
    // 10.200.2.10:8084 serves VIP:83 and VIP:84: replies cannot be told apart by the endpoint,
    // so each flow keeps a reverse entry (as long as the client ports differ, as they must for
    // the backend to tell the connections apart itself).
    for (client_port, service_port) in [(26000u16, 83u16), (26001, 84)] {
        let (_, out) = fixture.run(
            &Tcp::from_client(service_port, client_port).frame(),
            fixture.pub_ifindex,
        );
        assert_eq!(destination(&out), (BACKEND_A, 8084));
    }
    for (client_port, service_port) in [(26001u16, 84u16), (26000, 83)] {
        let reply = Tcp {
            src_mac: BACKEND_A_MAC,
            dst_mac: BACK_MAC,
            src: BACKEND_A,
            dst: CLIENT,
            src_port: 8084,
            dst_port: client_port,
            syn: false,
            payload: b"reply",
        }
        .frame();
        let (verdict, out) = fixture.run(&reply, fixture.back_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            u16::from_be_bytes([out[34], out[35]]),
            service_port,
            "client port {client_port}"
        );
    }
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_costs_no_turn() {
    if !skip_unless_privileged("a_retransmitted_syn_keeps_its_backend_and_costs_no_turn") {
        return;
    }
    let mut fixture = fixture();
    // A SYN is inserted before anything is looked up; one that finds its flow's entry is a
    // retransmission: same backend, and the round robin must not have moved for it.
    let (_, out) = fixture.run(&Tcp::from_client(82, 25000).frame(), fixture.pub_ifindex);
    let first = destination(&out);
    for _ in 0..3 {
        let (verdict, out) = fixture.run(&Tcp::from_client(82, 25000).frame(), fixture.pub_ifindex);
        assert_eq!(
            (verdict, destination(&out)),
            (XDP_REDIRECT, first),
            "a retransmitted SYN"
        );
    }
    let (_, out) = fixture.run(&Tcp::from_client(82, 25001).frame(), fixture.pub_ifindex);
    assert_ne!(
        destination(&out),
        first,
        "the next new flow takes the next backend"
    );
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 2);
    assert_eq!(fixture.counter(counter::FLOW_HIT), 3);
}
