//! End-to-end test of IPv4 fragments: real UDP datagrams larger than the MTU, from a client
//! namespace through lb-user to UDP responders in the backend namespaces (point to point), each
//! answered with the backend's name and a digest of the datagram its kernel reassembled.
//!
//! In order, the client's own kernel fragments the datagrams (3000 to 4000 bytes over an MTU
//! of 1500): every later fragment follows its first one (fragment tracking). Reordered, against
//! a `maglev_key = "3-tuple"` service: this kernel has no `sch_netem` (`tc qdisc add ... netem`
//! answers "Specified qdisc kind is unknown"), so the client cuts each datagram into fragments
//! itself and sends them last first through a raw socket in its namespace; every fragment
//! arriving before its first one is placed by the 3-tuple hash, on the backend its first
//! fragment then gets too. The counters are read with `lb-user stats --json`.
//!
//! Needs root (without it: SKIPPED, or a failure under `LB_REQUIRE_PRIVILEGED=1`) and lb-user
//! built; run one test at a time: `cargo test -p lb-tests --test fragments_netns`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context};
use etherparse::PacketBuilder;
use lb_tests::packet::split;
use lb_tests::udp_echo::answer;
use lb_tests::{
    skip_unless_privileged, LoadBalancer, Stats, Topology, UdpEcho, CLIENT_ADDRESS, VIP,
};

/// The tracked service (round robin) and the 3-tuple one; each backend answers on both.
const TRACKED_PORT: u16 = 5300;
const THREE_TUPLE_PORT: u16 = 5301;
/// Datagrams per client socket, and client sockets (source ports) per run.
const DATAGRAMS: usize = 10;
const SOCKETS: usize = 3;
/// How long the client waits for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

fn config(backends: &[Ipv4Addr]) -> String {
    let service = |name: &str, port: u16, scheduler: &str| {
        let mut text = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"udp\"\n\
             {scheduler}[service.health_check]\nkind = \"none\"\n"
        );
        for backend in backends {
            text.push_str(&format!("[[service.backend]]\naddress = \"{backend}\"\n"));
        }
        text
    };
    service("tracked", TRACKED_PORT, "")
        + &service(
            "three-tuple",
            THREE_TUPLE_PORT,
            "scheduler = \"maglev\"\nmaglev_table_size = 211\nmaglev_key = \"3-tuple\"\n",
        )
}

/// The datagram number `index` of socket `socket`: 3000 to 4000 bytes, its own content.
fn datagram(socket: usize, index: usize) -> Vec<u8> {
    let len = 3000 + (socket * DATAGRAMS + index) * 1000 / (SOCKETS * DATAGRAMS);
    (0..len)
        .map(|byte| (byte * 31 + socket * 7 + index * 3) as u8)
        .collect()
}

/// Which backend answered, checking the answer against what was sent.
fn answered_by(reply: &[u8], sent: &[u8], backends: &[String]) -> anyhow::Result<String> {
    let reply = String::from_utf8_lossy(reply).to_string();
    let name = reply.split(' ').next().unwrap_or_default().to_string();
    ensure!(backends.contains(&name), "answer {reply:?} from no backend");
    ensure!(
        reply == answer(&name, sent),
        "answer {reply:?}: the backend got other bytes than the {} sent",
        sent.len()
    );
    Ok(name)
}

#[test]
fn fragmented_datagrams_reach_one_backend_in_order_and_reordered() -> anyhow::Result<()> {
    if !skip_unless_privileged("fragmented_datagrams_reach_one_backend_in_order_and_reordered") {
        return Ok(());
    }
    let topology = Topology::demo().context("building the point-to-point topology")?;
    let mut responders = Vec::new();
    for backend in &topology.backends {
        for port in [TRACKED_PORT, THREE_TUPLE_PORT] {
            let echo = UdpEcho::start(&backend.netns, &backend.name, backend.address, port)?;
            responders.push(echo);
        }
    }
    let names: Vec<String> = topology.backends.iter().map(|b| b.name.clone()).collect();
    let addresses: Vec<Ipv4Addr> = topology.backends.iter().map(|b| b.address).collect();
    let mut lb = LoadBalancer::start(&topology.lb, &config(&addresses))?;
    lb.wait_backends_up(2 * addresses.len(), STATE_TIMEOUT)?;

    // In order, fragmented by the client's kernel.
    let backends = names.clone();
    let in_order = topology
        .client
        .name()
        .spawn_thread("fragment-client", move || send_whole(&backends))?
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let datagrams = (SOCKETS * DATAGRAMS) as u64;
    let stats = lb.stats_json()?;
    let counter = |stats: &Stats, name: &str| stats.counter(name);
    ensure!(
        counter(&stats, "fragment_tracked")? >= datagrams,
        "every first fragment tracked: {:?}",
        stats.counters
    );
    // 3000 to 4000 bytes over 1480-byte fragments: two or three later fragments each.
    ensure!(
        counter(&stats, "fragment_followed")? >= 2 * datagrams,
        "every later fragment followed: {:?}",
        stats.counters
    );
    for name in [
        "drop_fragment_orphan",
        "drop_fragment_timed_out",
        "drop_fragment_tiny_first",
        "fragment_table_full",
    ] {
        ensure!(counter(&stats, name)? == 0, "{name}: {:?}", stats.counters);
    }
    ensure!(
        in_order.len() == names.len(),
        "round robin over the sockets' flows reaches both backends: {in_order:?}"
    );

    // Reordered, against the 3-tuple service.
    let backends = names.clone();
    let reordered = topology
        .client
        .name()
        .spawn_thread("fragment-client", move || send_reversed(&backends))?
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    ensure!(
        reordered.len() == 1,
        "every datagram of the client, whatever its source port, on one backend: {reordered:?}"
    );
    let after = lb.stats_json()?;
    let by_hash = counter(&after, "fragment_by_3_tuple")? - counter(&stats, "fragment_by_3_tuple")?;
    ensure!(
        by_hash >= 2 * datagrams,
        "the later fragments, sent first, placed by the 3-tuple hash: {by_hash}, {:?}",
        after.counters
    );
    ensure!(
        counter(&after, "drop_fragment_orphan")? == 0,
        "{:?}",
        after.counters
    );
    eprintln!(
        "fragments: answered in order {in_order:?}, reordered {reordered:?}; counters {:?}",
        after.counters
    );

    lb.stop()?;
    for responder in responders {
        responder.stop()?;
    }
    topology.shutdown()
}

/// Sends every datagram whole (the kernel fragments it) from [`SOCKETS`] sockets to the
/// tracked service and checks each answer. Returns the datagrams answered per backend.
fn send_whole(backends: &[String]) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut answered = BTreeMap::new();
    let service = SocketAddrV4::new(VIP, TRACKED_PORT);
    for socket_index in 0..SOCKETS {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_ADDRESS, 0))?;
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        socket.connect(service)?;
        for index in 0..DATAGRAMS {
            let sent = datagram(socket_index, index);
            socket.send(&sent)?;
            let mut reply = [0u8; 256];
            let len = socket
                .recv(&mut reply)
                .with_context(|| format!("answer to datagram {index} of socket {socket_index}"))?;
            let backend = answered_by(&reply[..len], &sent, backends)?;
            *answered.entry(backend).or_default() += 1;
        }
    }
    Ok(answered)
}

/// Sends every datagram to the 3-tuple service as fragments cut here, last first, through a
/// raw socket, with the source port of a bound UDP socket that receives the answer. Returns
/// the datagrams answered per backend.
fn send_reversed(backends: &[String]) -> anyhow::Result<BTreeMap<String, usize>> {
    let raw = RawSocket::open()?;
    let mut answered = BTreeMap::new();
    for socket_index in 0..SOCKETS {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_ADDRESS, 0))?;
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let port = socket.local_addr()?.port();
        for index in 0..DATAGRAMS {
            let sent = datagram(socket_index, index);
            let id = (socket_index * DATAGRAMS + index + 1) as u16;
            let mut frame = Vec::new();
            PacketBuilder::ethernet2([0; 6], [0; 6])
                .ipv4(CLIENT_ADDRESS.octets(), VIP.octets(), 64)
                .udp(port, THREE_TUPLE_PORT)
                .write(&mut frame, &sent)
                .context("building the datagram")?;
            frame[18..20].copy_from_slice(&id.to_be_bytes());
            for fragment in split(&frame, &[1480, 2960]).iter().rev() {
                raw.send(&fragment[14..])?;
            }
            let mut reply = [0u8; 256];
            let (len, from) = socket
                .recv_from(&mut reply)
                .with_context(|| format!("answer to datagram {index} of socket {socket_index}"))?;
            ensure!(
                from == SocketAddrV4::new(VIP, THREE_TUPLE_PORT).into(),
                "answer from {from}, not the service"
            );
            let backend = answered_by(&reply[..len], &sent, backends)?;
            *answered.entry(backend).or_default() += 1;
        }
    }
    Ok(answered)
}

/// A raw IPv4 socket that sends packets with their own IP header (`IPPROTO_RAW`).
struct RawSocket(libc::c_int);

impl RawSocket {
    fn open() -> anyhow::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned by the result.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(
            fd >= 0,
            "opening a raw socket: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self(fd))
    }

    /// Sends one IPv4 packet (header included) to its destination.
    fn send(&self, packet: &[u8]) -> anyhow::Result<()> {
        let destination = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(packet[16..20].try_into().expect("4 bytes")),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and the address are live and their lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.0,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const destination).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        ensure!(
            sent == packet.len() as isize,
            "sending a fragment: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}
