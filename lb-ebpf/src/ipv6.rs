//! IPv6: the fixed header, a bounded walk over the extension headers, then the same balancing
//! as IPv4 (`crate::balance`), or ICMPv6 error translation.
//!
//! Three programs, chained by tail calls through `PROGRAMS`: [`try_parse`] (`balancer6`) checks
//! the headers and walks the chain, and leaves where the transport (or ICMPv6) header is in
//! the per-CPU [`IPV6_PARSED`] slot; [`try_balance_transport`] (`balancer6_transport`) and
//! [`try_translate_icmp`] (`balancer6_icmp`) take it from there. Each program has its own
//! 512 bytes of stack and its own verifier budget: the walk leaves many distinct states (one
//! per shape of chain), which the verifier would otherwise carry through the whole balancing
//! path, and the balancing and ICMP paths each need most of a stack.
//!
//! Extension headers stay in the packet exactly as they came; only the fixed header's
//! destination (or, for replies, source) and the transport header change. The walk knows the
//! length rule of each header it steps over: hop-by-hop options, destination options and
//! routing headers count 8-byte units after the first 8 bytes, AH counts 4-byte units after the
//! first 8, a fragment header is always 8 bytes.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::XdpContext};
use lb_common::{counter, protocol};

use crate::{
    family::{Family, V6},
    headers::{
        ptr_at, EthernetHeader, ExtensionHeader, Ipv6Header, ETHER_TYPE_IPV6, IPV6_HEADER_LEN,
    },
    icmp,
    maps::{PROGRAMS, PROGRAM_IPV6_ICMP, PROGRAM_IPV6_TRANSPORT},
    not_for_us_or_malformed, skip_vlan_tags, transport_at, Drop, Verdict, TCP_HEADER_LEN,
    UDP_HEADER_LEN,
};

/// What [`try_parse`] found, for the program it tail-calls. Offsets from the frame's start.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Parsed {
    /// The fixed IPv6 header.
    l3_offset: u32,
    /// The transport (or ICMPv6) header, after the extension headers.
    l4_offset: u32,
    /// Where the IPv6 packet ends (its payload length; Ethernet padding may follow).
    packet_end: u32,
    /// The transport protocol.
    next: u8,
    _pad: [u8; 3],
}

/// One [`Parsed`] per CPU: a tail call keeps the CPU (XDP runs with preemption off), so the
/// program it starts reads what its caller wrote.
#[map]
static IPV6_PARSED: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

/// The furthest a transport header may start: VLAN tags, the fixed header and six extension
/// headers of at most 2048 bytes each. Bounds what the verifier sees in the next program.
const MAX_L4_OFFSET: u32 = 0x4000;

/// Extension header numbers the walk steps over.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION_OPTIONS: u8 = 60;

/// The longest chain walked. RFC 8200 recommends each header at most once (destination
/// options twice), so a real chain has at most six; a longer one passes to the kernel.
const MAX_EXTENSION_HEADERS: usize = 6;

/// An IPv6 packet (the IPv4 program checked the EtherType before the tail call), checked and
/// parsed up to the transport header, then handed to the program that balances it.
#[inline(always)]
pub fn try_parse(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let ethernet: *mut EthernetHeader =
        ptr_at(ctx, 0).ok_or(Drop(counter::DROP_MALFORMED_ETHERNET))?;
    // SAFETY: ptr_at checked the whole header.
    let (l3_offset, ether_type) = skip_vlan_tags(ctx, unsafe { (*ethernet).ether_type })?;
    if ether_type != ETHER_TYPE_IPV6 {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    }
    let ip: *mut Ipv6Header = ptr_at(ctx, l3_offset).ok_or(Drop(counter::DROP_MALFORMED_IPV6))?;
    // SAFETY (all raw reads below): each pointer came from `ptr_at`.
    if unsafe { (*ip).version_class_flow[0] } >> 4 != 6 {
        return Err(Drop(counter::DROP_MALFORMED_IPV6));
    }
    // A payload length past the frame is as malformed as a truncated header (Ethernet padding
    // after the packet is fine). Jumbograms (payload length 0 and a hop-by-hop jumbo option)
    // cannot arrive on an Ethernet link.
    let payload_len = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    let packet_end = l3_offset + IPV6_HEADER_LEN + payload_len;
    if ctx.data() + packet_end > ctx.data_end() {
        return Err(Drop(counter::DROP_MALFORMED_IPV6));
    }
    let dst_addr = unsafe { (*ip).dst };

    let mut next = unsafe { (*ip).next_header };
    let mut offset = l3_offset + IPV6_HEADER_LEN;
    let mut fragment = false;
    // A fixed bound the verifier can see; each round steps over one header.
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !is_extension(next) {
            break;
        }
        let Some(header) = ptr_at::<ExtensionHeader>(ctx, offset) else {
            return cut_short(dst_addr);
        };
        // SAFETY: ptr_at checked the header's first 8 bytes.
        let (next_header, len, data) =
            unsafe { ((*header).next_header, (*header).len, (*header).data) };
        let header_len = match next {
            FRAGMENT => {
                fragment = true;
                8
            }
            AUTHENTICATION => (len as usize + 2) * 4,
            ROUTING if data[1] != 0 => {
                // Segments left: the destination is a waypoint, not the final address, and
                // translating it would send the packet elsewhere. The kernel decides.
                return Ok(Verdict::Pass(counter::PASS_IPV6_EXTENSION));
            }
            _ => (len as usize + 1) * 8,
        };
        next = next_header;
        offset += header_len;
    }
    if is_extension(next) {
        return Ok(Verdict::Pass(counter::PASS_IPV6_EXTENSION));
    }
    if offset > packet_end {
        return cut_short(dst_addr);
    }

    if next == V6::ICMP_PROTOCOL && !fragment {
        return Ok(hand_over(
            ctx,
            PROGRAM_IPV6_ICMP,
            l3_offset,
            offset,
            packet_end,
            next,
        ));
    }
    if next != protocol::TCP && next != protocol::UDP {
        return Ok(Verdict::Pass(counter::PASS_NOT_TCP_UDP));
    }
    // FIXME(#5): route IPv6 fragments through the fragment tracking IPv4 uses.
    if fragment {
        return Ok(Verdict::Pass(counter::PASS_FRAGMENT));
    }

    // The transport header must lie inside the IP packet, not in the frame's padding.
    let transport_len = if next == protocol::TCP {
        TCP_HEADER_LEN
    } else {
        UDP_HEADER_LEN
    };
    if offset + transport_len > packet_end {
        return not_for_us_or_malformed::<V6>(dst_addr);
    }
    Ok(hand_over(
        ctx,
        PROGRAM_IPV6_TRANSPORT,
        l3_offset,
        offset,
        packet_end,
        next,
    ))
}

/// Leaves what the parse found in [`IPV6_PARSED`] and tail-calls `program`, which does not
/// return; the verdict is only reached if the program is missing (never once `lb-user` has
/// loaded the datapath).
#[inline(always)]
fn hand_over(
    ctx: &XdpContext,
    program: u32,
    l3_offset: usize,
    l4_offset: usize,
    packet_end: usize,
    next: u8,
) -> Verdict {
    let Some(parsed) = IPV6_PARSED.get_ptr_mut(0) else {
        return Verdict::Pass(counter::PASS_NOT_IP);
    };
    // SAFETY: a per-CPU slot; only this program run and the one it tail-calls touch it.
    unsafe {
        *parsed = Parsed {
            l3_offset: l3_offset as u32,
            l4_offset: l4_offset as u32,
            packet_end: packet_end as u32,
            next,
            _pad: [0; 3],
        };
        // SAFETY: a helper call; it only returns if the slot is empty.
        let _ = PROGRAMS.tail_call(ctx, program);
    }
    Verdict::Pass(counter::PASS_NOT_IP)
}

/// What [`try_parse`] left, with bounds the verifier can see (it knows nothing of a map
/// value's contents): anything out of range would be our own bug, and passes.
#[inline(always)]
fn parsed() -> Option<Parsed> {
    let parsed = *IPV6_PARSED.get(0)?;
    if parsed.l3_offset > MAX_L3_OFFSET
        || parsed.l4_offset > MAX_L4_OFFSET
        || parsed.packet_end > MAX_L4_OFFSET + 0x10000
    {
        return None;
    }
    Some(parsed)
}

/// The furthest the fixed header starts: after two VLAN tags.
const MAX_L3_OFFSET: u32 = 22;

/// A TCP or UDP packet that [`try_parse`] checked: balanced like IPv4 (`crate::balance`).
#[inline(always)]
pub fn try_balance_transport(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let Some(parsed) = parsed() else {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    };
    let ethernet: *mut EthernetHeader =
        ptr_at(ctx, 0).ok_or(Drop(counter::DROP_MALFORMED_ETHERNET))?;
    let ip: *mut Ipv6Header =
        ptr_at(ctx, parsed.l3_offset as usize).ok_or(Drop(counter::DROP_MALFORMED_IPV6))?;
    // try_parse checked that the transport header lies inside the packet.
    let segment_len = parsed.packet_end.saturating_sub(parsed.l4_offset) as usize;
    let Some(transport) = transport_at(ctx, parsed.l4_offset as usize, segment_len, parsed.next)
    else {
        return Err(Drop(counter::DROP_MALFORMED_L4));
    };
    crate::balance::<V6>(ctx, ethernet, ip, &transport, None)
}

/// An ICMPv6 message that [`try_parse`] checked: errors about balanced flows are translated.
#[inline(always)]
pub fn try_translate_icmp(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let Some(parsed) = parsed() else {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    };
    Ok(icmp::translate_error::<V6>(
        ctx,
        parsed.l3_offset as usize,
        parsed.l4_offset as usize,
        parsed.packet_end as usize,
    ))
}

#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        HOP_BY_HOP | ROUTING | FRAGMENT | AUTHENTICATION | DESTINATION_OPTIONS
    )
}

/// An extension header that runs past the packet: malformed for a VIP, and left to the kernel
/// for anybody else.
#[inline(always)]
fn cut_short(dst_addr: [u8; 16]) -> Result<Verdict, Drop> {
    // SAFETY: map values stay valid for the whole program run (RCU).
    if unsafe { V6::vip_addresses().get(&dst_addr) }.is_some() {
        return Err(Drop(counter::DROP_MALFORMED_IPV6));
    }
    Ok(Verdict::Pass(counter::PASS_IPV6_EXTENSION))
}
