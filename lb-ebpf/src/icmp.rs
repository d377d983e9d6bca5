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

use aya_ebpf::programs::XdpContext;
use lb_common::{backend_state, counter, protocol, FlowKey};

use crate::{
    checksum,
    headers::{ptr_at, EthernetHeader, Ipv4Header},
    maps::{count, reverse_nat, BACKENDS, FLOWS},
    route::{self, Route, SendCounters},
    Verdict,
};

const DESTINATION_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;

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
pub fn translate_error(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut Ipv4Header,
    icmp_offset: usize,
    packet_end: usize,
) -> Verdict {
    let not_ours = Verdict::Pass(counter::PASS_NOT_TCP_UDP);
    let Some(icmp) = ptr_at::<IcmpHeader>(ctx, icmp_offset) else {
        return not_ours;
    };
    // SAFETY (all raw accesses below): every pointer came from ptr_at.
    let kind = unsafe { (*icmp).kind };
    if kind != DESTINATION_UNREACHABLE && kind != TIME_EXCEEDED && kind != PARAMETER_PROBLEM {
        return not_ours;
    }
    let inner_offset = icmp_offset + ICMP_HEADER_LEN;
    let Some(inner) = ptr_at::<Ipv4Header>(ctx, inner_offset) else {
        return not_ours;
    };
    let inner_len = ((unsafe { (*inner).version_ihl } & 0x0f) as usize) * 4;
    let inner_protocol = unsafe { (*inner).protocol };
    if inner_len < 20 || (inner_protocol != protocol::TCP && inner_protocol != protocol::UDP) {
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
    if unsafe { (*ip).dst } != unsafe { (*inner).src } {
        return not_ours;
    }

    // The quoted packet reversed is the flow as this host keys it: a client's flow if the
    // quoted packet was a reply to the client, a backend's reply if it was the client's packet.
    let key = FlowKey {
        src_addr: unsafe { (*inner).dst },
        dst_addr: unsafe { (*inner).src },
        src_port: unsafe { (*quoted).dst_port },
        dst_port: unsafe { (*quoted).src_port },
        protocol: inner_protocol,
        _pad: [0; 3],
    };
    let total_len = u16::from_be_bytes(unsafe { (*ip).total_len });
    let is_udp = inner_protocol == protocol::UDP;

    // SAFETY: map values stay valid for the whole program run (RCU).
    if let Some(flow) = unsafe { FLOWS.get(&key) } {
        let Some(backend) = BACKENDS.get(flow.backend_id) else {
            return not_ours;
        };
        if backend.state != backend_state::UP || backend.generation != flow.generation {
            return not_ours;
        }
        let (addr, port) = (crate::ipv4_of(backend.addr), backend.port);
        unsafe {
            let outer_src = (*ip).src;
            replace_outer(ip, OuterSide::Destination, addr);
            replace_quoted(icmp, inner, quoted, QuotedSide::Source, addr, port, is_udp);
            count(counter::ICMP_TO_BACKEND);
            let route = Route {
                src: outer_src,
                dst: addr,
                protocol: protocol::ICMP,
                src_port: [0; 2],
                dst_port: [0; 2],
                total_len,
            };
            let counters = SendCounters {
                transmit: counter::FORWARD_TX,
                redirect: counter::FORWARD_REDIRECT,
            };
            return route::send(ctx, ethernet, &route, &counters, None);
        }
    }
    if let Some(nat) = reverse_nat(&key) {
        let (addr, port) = (nat.service_addr, nat.service_port);
        unsafe {
            let client = (*ip).dst;
            replace_outer(ip, OuterSide::Source, addr);
            replace_quoted(
                icmp,
                inner,
                quoted,
                QuotedSide::Destination,
                addr,
                port,
                is_udp,
            );
            count(counter::ICMP_TO_CLIENT);
            let route = Route {
                src: addr,
                dst: client,
                protocol: protocol::ICMP,
                src_port: [0; 2],
                dst_port: [0; 2],
                total_len,
            };
            let counters = SendCounters {
                transmit: counter::REPLY_TX,
                redirect: counter::REPLY_REDIRECT,
            };
            return route::send(ctx, ethernet, &route, &counters, None);
        }
    }
    not_ours
}

enum OuterSide {
    Source,
    Destination,
}

enum QuotedSide {
    Source,
    Destination,
}

/// Replaces the outer header's source or destination. ICMP has no pseudo-header, so only the
/// IP checksum changes.
#[inline(always)]
unsafe fn replace_outer(ip: *mut Ipv4Header, side: OuterSide, addr: [u8; 4]) {
    let field = match side {
        OuterSide::Source => &raw mut (*ip).src,
        OuterSide::Destination => &raw mut (*ip).dst,
    };
    (*ip).check = checksum::replace4((*ip).check, *field, addr);
    *field = addr;
}

/// Replaces one side of the quoted packet: its address (and the quoted IP checksum), its port,
/// and, for UDP, the quoted UDP checksum; the ICMP checksum covers all of these bytes, so each
/// change is folded into it too.
#[inline(always)]
unsafe fn replace_quoted(
    icmp: *mut IcmpHeader,
    inner: *mut Ipv4Header,
    quoted: *mut QuotedTransport,
    side: QuotedSide,
    addr: [u8; 4],
    port: [u8; 2],
    is_udp: bool,
) {
    let (addr_field, port_field) = match side {
        QuotedSide::Source => (&raw mut (*inner).src, &raw mut (*quoted).src_port),
        QuotedSide::Destination => (&raw mut (*inner).dst, &raw mut (*quoted).dst_port),
    };
    let old_addr = *addr_field;
    let old_port = *port_field;
    let mut icmp_check = (*icmp).check;

    let old_inner_check = (*inner).check;
    let new_inner_check = checksum::replace4(old_inner_check, old_addr, addr);
    icmp_check = checksum::replace4(icmp_check, old_addr, addr);
    icmp_check = checksum::replace2(icmp_check, old_inner_check, new_inner_check);
    icmp_check = checksum::replace2(icmp_check, old_port, port);
    if is_udp {
        let udp_check = [(*quoted).rest[2], (*quoted).rest[3]];
        let new_udp_check = checksum::udp_replace(udp_check, old_addr, addr, old_port, port);
        icmp_check = checksum::replace2(icmp_check, udp_check, new_udp_check);
        (*quoted).rest[2] = new_udp_check[0];
        (*quoted).rest[3] = new_udp_check[1];
    }

    (*inner).check = new_inner_check;
    *addr_field = addr;
    *port_field = port;
    (*icmp).check = icmp_check;
}
