//! ICMP errors about balanced flows, translated like the flows themselves.
//!
//! An error quotes the IP header and the first transport bytes of the packet it is about.
//! Two directions matter:
//! - an error addressed to the VIP about a reply this host sent (a router on the client's path
//!   says "fragmentation needed", or the client's host says "port unreachable") goes to the
//!   backend that serves the flow, with the outer destination and the quoted packet's source
//!   rewritten to the backend, so the backend's stack learns the path MTU;
//! - an error a backend (or a hop behind it) sends towards a client about the client's packet
//!   gets the VIP as outer source and as the quoted destination, so the client's socket
//!   accepts it.
//!
//! Everything else ICMP (echo to this host, errors about other traffic) passes untouched.
//!
//! ICMPv6 works the same way, written once for both families: its checksum also covers a
//! pseudo-header with the outer addresses, and the quoted IPv6 header has no checksum of its
//! own.

use aya_ebpf::programs::XdpContext;
use lb_common::{backend_state, counter, protocol, Address, FlowKey};

use crate::{
    checksum,
    family::Family,
    headers::{ptr_at, EthernetHeader},
    maps::{count, reverse_nat, BACKENDS},
    route::{self, Hop, Route, SendCounters},
    Drop, Verdict,
};

#[repr(C)]
struct IcmpHeader {
    kind: u8,
    code: u8,
    check: [u8; 2],
    rest: [u8; 4],
}

/// The first 8 bytes of the quoted transport header: all an error must carry (RFC 792).
#[repr(C)]
struct QuotedTransport {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    /// Sequence number (TCP) or length and checksum (UDP).
    rest: [u8; 4],
}

const ICMP_HEADER_LEN: usize = core::mem::size_of::<IcmpHeader>();
const QUOTED_LEN: usize = core::mem::size_of::<QuotedTransport>();

/// Translates an ICMP error about a balanced flow; passes anything else unchanged.
/// `packet_end` is where the outer IP packet ends (its total length; padding may follow).
#[inline(always)]
pub fn translate_error<F: Family>(
    ctx: &XdpContext,
    l3_offset: usize,
    icmp_offset: usize,
    packet_end: usize,
) -> Result<Verdict, Drop> {
    let not_ours = Ok(Verdict::Pass(counter::PASS_NOT_TCP_UDP));
    // Found again from their offsets rather than passed: a BPF call takes five arguments.
    let Some(ethernet) = ptr_at::<EthernetHeader>(ctx, 0) else {
        return not_ours;
    };
    let Some(ip) = ptr_at::<F::Header>(ctx, l3_offset) else {
        return not_ours;
    };
    let Some(icmp) = ptr_at::<IcmpHeader>(ctx, icmp_offset) else {
        return not_ours;
    };
    // SAFETY (all raw accesses below): every pointer came from ptr_at.
    let kind = unsafe { (*icmp).kind };
    if !F::is_icmp_error(kind) {
        return not_ours;
    }
    let inner_offset = icmp_offset + ICMP_HEADER_LEN;
    let Some(inner) = ptr_at::<F::Header>(ctx, inner_offset) else {
        return not_ours;
    };
    let Some((inner_len, inner_protocol)) = (unsafe { F::quoted_header(inner) }) else {
        return not_ours;
    };
    if inner_protocol != protocol::TCP && inner_protocol != protocol::UDP {
        return not_ours;
    }
    let Some(quoted) = ptr_at::<QuotedTransport>(ctx, inner_offset + inner_len) else {
        return not_ours;
    };
    // Everything translated must lie inside the outer packet, not in the frame's padding.
    // (Checked after ptr_at: the other order lets LLVM merge the two bounds and the verifier
    // then loses track of the packet pointer's range.)
    if inner_offset + inner_len + QUOTED_LEN > packet_end {
        return not_ours;
    }

    // An error goes to whoever sent the packet it quotes; anything else is forged or not
    // about a flow of ours, and is left alone.
    if unsafe { *F::dst(ip) } != unsafe { *F::src(inner) } {
        return not_ours;
    }

    // The quoted packet reversed is the flow as this host keys it: a client's flow if the
    // quoted packet was a reply to the client, a backend's reply if it was the client's packet.
    let key = FlowKey {
        src_addr: unsafe { *F::dst(inner) },
        dst_addr: unsafe { *F::src(inner) },
        src_port: unsafe { (*quoted).dst_port },
        dst_port: unsafe { (*quoted).src_port },
        protocol: inner_protocol,
        _pad: [0; 3],
    };
    let total_len = unsafe { F::packet_len(ip) };
    let is_udp = inner_protocol == protocol::UDP;

    // Each direction resolves its route before it rewrites anything: an error the lookup
    // cannot send on passes to the kernel as it came (issue 5), except towards an unresolved
    // neighbour, which the kernel resolves before it forwards the translated error. An IPv4
    // error towards a client is the exception to the exception: translated, it comes from the
    // VIP, which the kernel drops as a martian; it is dropped untouched instead, while lb-user
    // has the neighbour resolved (`route::want_neighbour`).
    // SAFETY: map values stay valid for the whole program run (RCU).
    if let Some(flow) = unsafe { F::flows().get(&key) } {
        let Some(backend) = BACKENDS.get(flow.backend_id) else {
            return not_ours;
        };
        if backend.state != backend_state::UP || backend.generation != flow.generation {
            return not_ours;
        }
        let route = icmp_route::<F>(
            unsafe { *F::src(ip) },
            *F::narrow_ref(&backend.addr),
            total_len,
        );
        let hop = match next_hop(ctx, &route) {
            Ok(hop) => hop,
            Err(untouched) => return Ok(untouched),
        };
        let (addr, port) = (F::narrow(backend.addr), backend.port);
        unsafe {
            replace_outer::<F>(ip, icmp, OuterSide::Destination, addr);
            replace_quoted::<F>(icmp, inner, quoted, QuotedSide::Source, addr, port, is_udp);
        }
        count(counter::ICMP_TO_BACKEND);
        let counters = SendCounters {
            transmit: counter::FORWARD_TX,
            redirect: counter::FORWARD_REDIRECT,
        };
        return Ok(send_on(ctx, ethernet, hop, &counters));
    }
    if let Some(nat) = reverse_nat::<F>(&key) {
        let (addr, port) = (nat.service_addr, nat.service_port);
        let route = icmp_route::<F>(addr, unsafe { *F::dst(ip) }, total_len);
        let hop = match next_hop(ctx, &route) {
            Ok(None) if F::LOCAL_SOURCE_IS_MARTIAN => {
                return Err(Drop(counter::DROP_NEIGH_UNRESOLVED))
            }
            Ok(hop) => hop,
            Err(untouched) => return Ok(untouched),
        };
        unsafe {
            replace_outer::<F>(ip, icmp, OuterSide::Source, addr);
            replace_quoted::<F>(
                icmp,
                inner,
                quoted,
                QuotedSide::Destination,
                addr,
                port,
                is_udp,
            );
        }
        count(counter::ICMP_TO_CLIENT);
        let counters = SendCounters {
            transmit: counter::REPLY_TX,
            redirect: counter::REPLY_REDIRECT,
        };
        return Ok(send_on(ctx, ethernet, hop, &counters));
    }
    not_ours
}

/// The route request for a translated error of `total_len` bytes from `src` to `dst`.
#[inline(always)]
fn icmp_route<F: Family>(src: F::Addr, dst: F::Addr, total_len: u16) -> Route<F::Addr> {
    Route {
        family: F::AF,
        src,
        dst,
        protocol: F::ICMP_PROTOCOL,
        src_port: [0; 2],
        dst_port: [0; 2],
        total_len,
    }
}

/// The next hop of an error about to be translated: `Ok(None)` for an unresolved neighbour
/// (the kernel resolves it and forwards the translated error), `Err` with the pass to return
/// untouched for anything else the lookup cannot settle.
#[inline(always)]
fn next_hop<A: Address>(ctx: &XdpContext, route: &Route<A>) -> Result<Option<Hop>, Verdict> {
    match route::resolve(ctx, route, None) {
        Ok(hop) => Ok(Some(hop)),
        Err(counter::PASS_NEIGH_UNRESOLVED) => Ok(None),
        Err(reason) => Err(Verdict::Pass(reason)),
    }
}

/// Sends a translated error to `hop`, or to the kernel when its neighbour is unresolved.
#[inline(always)]
fn send_on(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    hop: Option<Hop>,
    counters: &SendCounters,
) -> Verdict {
    match hop {
        Some(hop) => route::deliver(ctx, ethernet, &hop, counters),
        None => Verdict::Pass(counter::PASS_NEIGH_UNRESOLVED),
    }
}

enum OuterSide {
    Source,
    Destination,
}

enum QuotedSide {
    Source,
    Destination,
}

/// Replaces the outer header's source or destination: the IPv4 header checksum covers it,
/// and so does the ICMPv6 checksum through its pseudo-header (ICMP for IPv4 has none).
#[inline(always)]
unsafe fn replace_outer<F: Family>(
    ip: *mut F::Header,
    icmp: *mut IcmpHeader,
    side: OuterSide,
    addr: F::Addr,
) {
    let field = match side {
        OuterSide::Source => F::src(ip),
        OuterSide::Destination => F::dst(ip),
    };
    let old = *field;
    F::update_header_check(ip, old, addr);
    if F::ICMP_PSEUDO_HEADER {
        (*icmp).check = checksum::replace_addr((*icmp).check, old, addr);
    }
    *field = addr;
}

/// Replaces one side of the quoted packet: its address (and the quoted IP checksum), its port,
/// and, for UDP, the quoted UDP checksum; the ICMP checksum covers all of these bytes, so each
/// change is folded into it too.
#[inline(always)]
unsafe fn replace_quoted<F: Family>(
    icmp: *mut IcmpHeader,
    inner: *mut F::Header,
    quoted: *mut QuotedTransport,
    side: QuotedSide,
    addr: F::Addr,
    port: [u8; 2],
    is_udp: bool,
) {
    let (addr_field, port_field) = match side {
        QuotedSide::Source => (F::src(inner), &raw mut (*quoted).src_port),
        QuotedSide::Destination => (F::dst(inner), &raw mut (*quoted).dst_port),
    };
    let old_addr = *addr_field;
    let old_port = *port_field;
    let mut icmp_check = (*icmp).check;

    // The quoted IPv4 header's checksum changes with its address; both changes are ICMP payload.
    if let Some((old_inner_check, new_inner_check)) = F::update_header_check(inner, old_addr, addr)
    {
        icmp_check = checksum::replace2(icmp_check, old_inner_check, new_inner_check);
    }
    icmp_check = checksum::replace_addr(icmp_check, old_addr, addr);
    icmp_check = checksum::replace2(icmp_check, old_port, port);
    if is_udp {
        let udp_check = [(*quoted).rest[2], (*quoted).rest[3]];
        let new_udp_check = checksum::udp_replace(udp_check, old_addr, addr, old_port, port);
        icmp_check = checksum::replace2(icmp_check, udp_check, new_udp_check);
        (*quoted).rest[2] = new_udp_check[0];
        (*quoted).rest[3] = new_udp_check[1];
    }

    *addr_field = addr;
    *port_field = port;
    (*icmp).check = icmp_check;
}
