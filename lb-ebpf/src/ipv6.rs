//! IPv6: the fixed header, a bounded walk over the extension headers, then the same balancing
//! as IPv4 (`crate::balance`), or ICMPv6 error translation.
//!
//! Extension headers stay in the packet exactly as they came; only the fixed header's
//! destination (or, for replies, source) and the transport header change. The walk knows the
//! length rule of each header it steps over: hop-by-hop options, destination options and
//! routing headers count 8-byte units after the first 8 bytes, AH counts 4-byte units after the
//! first 8, a fragment header is always 8 bytes.

use aya_ebpf::programs::XdpContext;
use lb_common::{counter, protocol};

use crate::{
    family::{Family, V6},
    headers::{
        ptr_at, EthernetHeader, ExtensionHeader, Ipv6Header, ETHER_TYPE_IPV6, IPV6_HEADER_LEN,
    },
    icmp, not_for_us_or_malformed, skip_vlan_tags, transport_at, Drop, Verdict, TCP_HEADER_LEN,
    UDP_HEADER_LEN,
};

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
/// parsed up to the transport header, then balanced.
#[inline(always)]
pub fn try_balance(ctx: &XdpContext) -> Result<Verdict, Drop> {
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
        return crate::unpack(icmp::translate_error6(ctx, l3_offset, offset, packet_end));
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
    let transport = transport_at(ctx, offset, next);
    let Some(transport) = transport else {
        return not_for_us_or_malformed::<V6>(dst_addr);
    };
    // (Checked after ptr_at: the other order lets LLVM merge the bounds and the verifier loses
    // the packet pointer's range.)
    if offset + transport_len > packet_end {
        return not_for_us_or_malformed::<V6>(dst_addr);
    }
    crate::balance::<V6>(ctx, ethernet, ip, &transport)
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
