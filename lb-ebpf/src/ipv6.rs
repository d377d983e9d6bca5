//! IPv6: the fixed header, a bounded walk over the extension headers, then the same balancing
//! as IPv4 (`crate::balance`), or ICMPv6 error translation.
//!
//! Four programs, chained by tail calls through `PROGRAMS`: [`try_parse`] (`balancer6`) checks
//! the headers and walks the chain, and leaves where the transport (or ICMPv6) header is in
//! the per-CPU [`IPV6_PARSED`] slot; [`try_balance_transport`] (`balancer6_transport`),
//! [`try_translate_icmp`] (`balancer6_icmp`) and [`try_follow_fragment`] (`balancer6_fragment`,
//! later fragments) take it from there. Each program has its own
//! 512 bytes of stack and its own verifier budget: the walk leaves many distinct states (one
//! per shape of chain), which the verifier would otherwise carry through the whole balancing
//! path, and the balancing and ICMP paths each need most of a stack.
//!
//! Extension headers stay in the packet exactly as they came; only the fixed header's
//! destination (or, for replies, source) and the transport header change. The walk knows the
//! length rule of each header it steps over: hop-by-hop options, destination options and
//! routing headers count 8-byte units after the first 8 bytes, AH counts 4-byte units after the
//! first 8, a fragment header is always 8 bytes.
//!
//! A fragment header sorts the packet as `fragments.rs` describes: an atomic fragment (offset 0,
//! M clear) is a whole packet; a first fragment (offset 0, M set) is balanced and recorded; the
//! walk stops at the fragment header of a later one (offset > 0), since what follows is the
//! middle of the datagram, and the transport program sends it where its datagram went.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::XdpContext};
use lb_common::{counter, protocol, FragmentKey6};

use crate::{
    family::{Family, V6},
    fragments,
    headers::{
        ptr_at, EthernetHeader, ExtensionHeader, Ipv6Header, ETHER_TYPE_IPV6, IPV6_HEADER_LEN,
    },
    icmp,
    maps::{PROGRAMS, PROGRAM_IPV6_FRAGMENT, PROGRAM_IPV6_ICMP, PROGRAM_IPV6_TRANSPORT},
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
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    fragment: u8,
    _pad: [u8; 2],
    /// The fragment header's identification (network order); zero if not a fragment.
    fragment_id: [u8; 4],
}

/// What a packet is, as far as fragmentation goes ([`Parsed::fragment`]). An atomic fragment
/// counts as [`NOT_FRAGMENT`].
const NOT_FRAGMENT: u8 = 0;
/// Offset 0 and M set: carries the transport header.
const FIRST_FRAGMENT: u8 = 1;
/// Offset above 0: no transport header, only the middle or the end of the datagram.
const LATER_FRAGMENT: u8 = 2;

/// The fragment offset bits and the M (more fragments) flag of the fragment header's second
/// 16-bit word; the two bits between are reserved (RFC 8200, 4.5).
const FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
const FRAGMENT_MORE: u16 = 0x0001;

/// One [`Parsed`] per CPU: a tail call keeps the CPU (XDP runs with preemption off), so the
/// program it starts reads what its caller wrote.
#[map]
static IPV6_PARSED: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

/// The fragment key of the packet the transport program works on, per CPU: kept out of that
/// program's stack, which the balancing path fills (a map value serves as a map key as well).
#[map]
static FRAGMENT_KEY6: PerCpuArray<FragmentKey6> = PerCpuArray::with_max_entries(1, 0);

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
    let mut fragment = NOT_FRAGMENT;
    let mut fragment_id = [0; 4];
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
                let offset_flags = u16::from_be_bytes([data[0], data[1]]);
                if offset_flags & (FRAGMENT_OFFSET_MASK | FRAGMENT_MORE) != 0 {
                    if fragment != NOT_FRAGMENT {
                        // A datagram fragmented twice over: no sender does that; the kernel
                        // decides.
                        return Ok(Verdict::Pass(counter::PASS_IPV6_EXTENSION));
                    }
                    if next_header != protocol::TCP && next_header != protocol::UDP {
                        // Only TCP or UDP right after the fragment header is tracked: then the
                        // key's protocol is the transport's in every fragment. Anything else
                        // (ICMPv6, AH or final destination options before the transport)
                        // goes to the kernel, all fragments alike.
                        return Ok(Verdict::Pass(if is_extension(next_header) {
                            counter::PASS_IPV6_EXTENSION
                        } else {
                            counter::PASS_NOT_TCP_UDP
                        }));
                    }
                    fragment_id = [data[2], data[3], data[4], data[5]];
                    fragment = if offset_flags & FRAGMENT_OFFSET_MASK == 0 {
                        FIRST_FRAGMENT
                    } else {
                        LATER_FRAGMENT
                    };
                }
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
        if fragment == LATER_FRAGMENT {
            // The rest is the datagram's middle, no more headers.
            break;
        }
    }
    if is_extension(next) {
        return Ok(Verdict::Pass(counter::PASS_IPV6_EXTENSION));
    }
    if offset > packet_end {
        return cut_short(dst_addr);
    }

    let program = if next == V6::ICMP_PROTOCOL && fragment == NOT_FRAGMENT {
        PROGRAM_IPV6_ICMP
    } else {
        if next != protocol::TCP && next != protocol::UDP {
            return Ok(Verdict::Pass(counter::PASS_NOT_TCP_UDP));
        }
        // Fragments for anybody but a VIP are the kernel's, as in IPv4.
        if fragment != NOT_FRAGMENT && unsafe { V6::vip_addresses().get(&dst_addr) }.is_none() {
            return Ok(Verdict::Pass(counter::PASS_FRAGMENT));
        }
        // The transport header must lie inside the IP packet, not in the frame's padding. A
        // later fragment has none; a first fragment without its whole header is dropped (see
        // fragments.rs), where the transport program checks TCP options too.
        let transport_len = if next == protocol::TCP {
            TCP_HEADER_LEN
        } else {
            UDP_HEADER_LEN
        };
        if fragment != LATER_FRAGMENT && offset + transport_len > packet_end {
            if fragment == FIRST_FRAGMENT {
                return Err(Drop(counter::DROP_FRAGMENT_TINY_FIRST));
            }
            return not_for_us_or_malformed::<V6>(dst_addr);
        }
        if fragment == LATER_FRAGMENT {
            PROGRAM_IPV6_FRAGMENT
        } else {
            PROGRAM_IPV6_TRANSPORT
        }
    };
    Ok(hand_over(
        ctx,
        program,
        &Parsed {
            l3_offset: l3_offset as u32,
            l4_offset: offset as u32,
            packet_end: packet_end as u32,
            next,
            fragment,
            _pad: [0; 2],
            fragment_id,
        },
    ))
}

/// Leaves what the parse found in [`IPV6_PARSED`] and tail-calls `program`, which does not
/// return; the verdict is only reached if the program is missing (never once `lb-user` has
/// loaded the datapath).
#[inline(always)]
fn hand_over(ctx: &XdpContext, program: u32, found: &Parsed) -> Verdict {
    let Some(parsed) = IPV6_PARSED.get_ptr_mut(0) else {
        return Verdict::Pass(counter::PASS_NOT_IP);
    };
    // SAFETY: a per-CPU slot; only this program run and the one it tail-calls touch it.
    unsafe {
        *parsed = *found;
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

/// What [`try_parse`] left ([`parsed`]), with the Ethernet and fixed IPv6 headers
/// bounds-checked again for this program.
#[inline(always)]
fn parsed_headers(
    ctx: &XdpContext,
) -> Result<Option<(Parsed, *mut EthernetHeader, *mut Ipv6Header)>, Drop> {
    let Some(parsed) = parsed() else {
        return Ok(None);
    };
    let ethernet = ptr_at(ctx, 0).ok_or(Drop(counter::DROP_MALFORMED_ETHERNET))?;
    let ip = ptr_at(ctx, parsed.l3_offset as usize).ok_or(Drop(counter::DROP_MALFORMED_IPV6))?;
    Ok(Some((parsed, ethernet, ip)))
}

/// The furthest the fixed header starts: after two VLAN tags.
const MAX_L3_OFFSET: u32 = 22;

/// A TCP or UDP packet that [`try_parse`] checked: balanced like IPv4 (`crate::balance`).
#[inline(always)]
pub fn try_balance_transport(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let Some((parsed, ethernet, ip)) = parsed_headers(ctx)? else {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    };
    let l4_offset = parsed.l4_offset as usize;
    let packet_end = parsed.packet_end as usize;
    let first_fragment = if parsed.fragment == FIRST_FRAGMENT {
        if !fragments::holds_transport_header(ctx, l4_offset, packet_end, parsed.next) {
            return Err(Drop(counter::DROP_FRAGMENT_TINY_FIRST));
        }
        Some(fragment_key(ip, &parsed)?)
    } else {
        None
    };
    // try_parse checked that the transport header lies inside the packet.
    let segment_len = packet_end.saturating_sub(l4_offset);
    let Some(transport) = transport_at(ctx, l4_offset, segment_len, parsed.next) else {
        return Err(Drop(counter::DROP_MALFORMED_L4));
    };
    crate::balance::<V6>(ctx, ethernet, ip, &transport, first_fragment)
}

/// A later fragment (offset > 0) for a VIP that [`try_parse`] found: sent where its datagram
/// goes (see `fragments.rs`).
#[inline(always)]
pub fn try_follow_fragment(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let Some((parsed, ethernet, ip)) = parsed_headers(ctx)? else {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    };
    fragments::follow::<V6>(ctx, ethernet, ip, fragment_key(ip, &parsed)?)
}

/// The fragment's datagram key, written into this CPU's [`FRAGMENT_KEY6`] slot.
#[inline(always)]
fn fragment_key(ip: *mut Ipv6Header, parsed: &Parsed) -> Result<&'static FragmentKey6, Drop> {
    let key = FRAGMENT_KEY6
        .get_ptr_mut(0)
        .ok_or(Drop(counter::DROP_INTERNAL))?;
    // SAFETY: the caller bounds-checked the whole fixed header; the slot is this CPU's, which
    // only this program run touches until it ends. Field by field, so nothing is built on the
    // stack.
    unsafe {
        (*key).src_addr = (*ip).src;
        (*key).dst_addr = (*ip).dst;
        (*key).id = parsed.fragment_id;
        (*key).protocol = parsed.next;
        (*key)._pad = [0; 3];
        Ok(&*key)
    }
}

/// An ICMPv6 message that [`try_parse`] checked: errors about balanced flows are translated.
#[inline(always)]
pub fn try_translate_icmp(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let Some(parsed) = parsed() else {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    };
    icmp::translate_error::<V6>(
        ctx,
        parsed.l3_offset as usize,
        parsed.l4_offset as usize,
        parsed.packet_end as usize,
    )
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
