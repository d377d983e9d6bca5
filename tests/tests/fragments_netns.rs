//! End-to-end tests of IPv4 and IPv6 fragments: real UDP datagrams larger than the MTU, from a
//! client namespace through lb-user to UDP responders in the backend namespaces (point to
//! point), each answered with the backend's name and a digest of the datagram its kernel
//! reassembled. The IPv6 test does the same over the dual-stack testbed's fd00:200:: addresses
//! (fragment headers, 32-bit identifications), to the IPv6 VIP.
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
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context};
use etherparse::PacketBuilder;
use lb_tests::packet::{fragment6, split, Cut};
use lb_tests::udp_echo::answer;
use lb_tests::{
    skip_unless_privileged, Backend, LoadBalancer, Stats, Topology, UdpEcho, CLIENT_ADDRESS,
    CLIENT_ADDRESS6, VIP, VIP6,
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

/// The addresses one test uses: the client's, the VIP and each backend's, all of one family.
#[derive(Clone, Copy)]
struct Family {
    client: IpAddr,
    vip: IpAddr,
    backend: fn(&Backend) -> IpAddr,
}

const IPV4: Family = Family {
    client: IpAddr::V4(CLIENT_ADDRESS),
    vip: IpAddr::V4(VIP),
    backend: |backend| IpAddr::V4(backend.address),
};

const IPV6: Family = Family {
    client: IpAddr::V6(CLIENT_ADDRESS6),
    vip: IpAddr::V6(VIP6),
    backend: |backend| IpAddr::V6(backend.address6),
};

fn config(vip: IpAddr, backends: &[IpAddr]) -> String {
    let service = |name: &str, port: u16, scheduler: &str| {
        let mut text = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"udp\"\n\
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
    in_order_and_reordered(IPV4)
}

#[test]
fn fragmented_ipv6_datagrams_reach_one_backend_in_order_and_reordered() -> anyhow::Result<()> {
    if !skip_unless_privileged("fragmented_ipv6_datagrams_reach_one_backend_in_order_and_reordered")
    {
        return Ok(());
    }
    in_order_and_reordered(IPV6)
}

/// Sends [`SOCKETS`] × [`DATAGRAMS`] datagrams whole (fragmented by the client's kernel) to the
/// tracked service and as many reordered fragments to the 3-tuple one, over `family`, and checks
/// every answer and the counters.
fn in_order_and_reordered(family: Family) -> anyhow::Result<()> {
    let topology = Topology::demo().context("building the point-to-point topology")?;
    let mut responders = Vec::new();
    for backend in &topology.backends {
        for port in [TRACKED_PORT, THREE_TUPLE_PORT] {
            let address = (family.backend)(backend);
            let echo = UdpEcho::start(&backend.netns, &backend.name, address, port)?;
            responders.push(echo);
        }
    }
    let names: Vec<String> = topology.backends.iter().map(|b| b.name.clone()).collect();
    let addresses: Vec<IpAddr> = topology.backends.iter().map(family.backend).collect();
    let mut lb = LoadBalancer::start(&topology.lb, &config(family.vip, &addresses))?;
    lb.wait_backends_up(2 * addresses.len(), STATE_TIMEOUT)?;

    // In order, fragmented by the client's kernel.
    let backends = names.clone();
    let in_order = topology
        .client
        .name()
        .spawn_thread("fragment-client", move || send_whole(&backends, family))?
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
        .spawn_thread("fragment-client", move || send_reversed(&backends, family))?
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
fn send_whole(backends: &[String], family: Family) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut answered = BTreeMap::new();
    let service = SocketAddr::new(family.vip, TRACKED_PORT);
    for socket_index in 0..SOCKETS {
        let socket = UdpSocket::bind(SocketAddr::new(family.client, 0))?;
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
fn send_reversed(backends: &[String], family: Family) -> anyhow::Result<BTreeMap<String, usize>> {
    let raw = RawSocket::open(family.vip)?;
    let mut answered = BTreeMap::new();
    for socket_index in 0..SOCKETS {
        let socket = UdpSocket::bind(SocketAddr::new(family.client, 0))?;
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let port = socket.local_addr()?.port();
        for index in 0..DATAGRAMS {
            let sent = datagram(socket_index, index);
            let id = (socket_index * DATAGRAMS + index + 1) as u16;
            let fragments = fragments(family, (port, id), &sent)?;
            for fragment in fragments.iter().rev() {
                raw.send(&fragment[14..])?;
            }
            let mut reply = [0u8; 256];
            let (len, from) = socket
                .recv_from(&mut reply)
                .with_context(|| format!("answer to datagram {index} of socket {socket_index}"))?;
            ensure!(
                from == SocketAddr::new(family.vip, THREE_TUPLE_PORT),
                "answer from {from}, not the service"
            );
            let backend = answered_by(&reply[..len], &sent, backends)?;
            *answered.entry(backend).or_default() += 1;
        }
    }
    Ok(answered)
}

/// A UDP datagram from the client's `port` to the 3-tuple service, with identification `id`,
/// cut here into frames that each fit an MTU of 1500, in order.
fn fragments(family: Family, (port, id): (u16, u16), sent: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let builder = PacketBuilder::ethernet2([0; 6], [0; 6]);
    let builder = match (family.client, family.vip) {
        (IpAddr::V4(client), IpAddr::V4(vip)) => builder.ipv4(client.octets(), vip.octets(), 64),
        (IpAddr::V6(client), IpAddr::V6(vip)) => builder.ipv6(client.octets(), vip.octets(), 64),
        _ => anyhow::bail!("the client and the VIP are of one family"),
    };
    let mut frame = Vec::new();
    builder
        .udp(port, THREE_TUPLE_PORT)
        .write(&mut frame, sent)
        .context("building the datagram")?;
    if family.vip.is_ipv6() {
        return Ok(fragment6(&frame, &Cut::plain(u32::from(id))));
    }
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    Ok(split(&frame, &[1480, 2960]))
}

/// A raw socket that sends packets with their own IP header (`IPPROTO_RAW`, which implies
/// `IP_HDRINCL` and, on Linux, `IPV6_HDRINCL`).
struct RawSocket {
    fd: libc::c_int,
    ipv6: bool,
}

impl RawSocket {
    /// A socket for packets to `destination`'s family.
    fn open(destination: IpAddr) -> anyhow::Result<Self> {
        let domain = if destination.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        // SAFETY: socket(2) with constant arguments; the descriptor is owned by the result.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(
            fd >= 0,
            "opening a raw socket: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self {
            fd,
            ipv6: destination.is_ipv6(),
        })
    }

    /// Sends one IP packet (header included) to its destination.
    fn send(&self, packet: &[u8]) -> anyhow::Result<()> {
        let sent = if self.ipv6 {
            let destination = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: packet[24..40].try_into().expect("16 bytes"),
                },
                sin6_scope_id: 0,
            };
            self.send_to(packet, &destination)
        } else {
            let destination = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(packet[16..20].try_into().expect("4 bytes")),
                },
                sin_zero: [0; 8],
            };
            self.send_to(packet, &destination)
        };
        ensure!(
            sent == packet.len() as isize,
            "sending a fragment: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

impl RawSocket {
    /// sendto(2) of `packet` to the socket address `destination`; what it returned.
    fn send_to<A>(&self, packet: &[u8], destination: &A) -> isize {
        // SAFETY: the buffer and the address are live and their lengths are theirs.
        unsafe {
            libc::sendto(
                self.fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (destination as *const A).cast(),
                size_of::<A>() as libc::socklen_t,
            )
        }
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}
