//! The reply path for backends the kernel forwards to (behind a Linux bridge): a tc egress
//! program on the public interface translates their replies to come from the service.
//!
//! XDP cannot redirect into a bridge, so client packets for such backends are translated in
//! XDP and handed to the kernel, and the replies arrive on the bridge and leave through the
//! kernel's forwarding path, never through XDP. At tc egress they are still sk_buffs: the
//! checksum helpers below also handle a partial checksum (a container's veth with transmit
//! offload), which XDP cannot.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::bpf_csum_diff,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{counter, protocol, FlowKey, FlowKey6};

use crate::{
    add_traffic,
    family::{V4, V6},
    headers::{
        EthernetHeader, Ipv4Header, Ipv6Header, ETHERNET_LEN, ETHER_TYPE_IPV4, ETHER_TYPE_IPV6,
        IPV4_FRAGMENT_MASK, IPV6_HEADER_LEN,
    },
    maps::{count, reverse_nat},
    note_reply_flags,
};

/// Offsets inside the IPv4 header.
const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
/// Offset of the source address inside the IPv6 header.
const IPV6_SRC: usize = 8;

#[classifier]
pub fn reply_egress(ctx: TcContext) -> i32 {
    // Whatever happens, the packet leaves: this program only ever translates replies of
    // balanced flows, and a packet it cannot parse is not one.
    if translate_reply(&ctx).is_ok() {
        count(counter::REPLY_EGRESS);
    }
    TC_ACT_OK as i32
}

/// Translates the packet if it is a reply of a balanced flow; `Err` means it was left alone.
#[inline(always)]
fn translate_reply(ctx: &TcContext) -> Result<(), ()> {
    let ethernet: EthernetHeader = ctx.load(0).map_err(|_| ())?;
    if ethernet.ether_type == ETHER_TYPE_IPV4 {
        translate_reply_ipv4(ctx)
    } else if ethernet.ether_type == ETHER_TYPE_IPV6 {
        translate_reply_ipv6(ctx)
    } else {
        Err(())
    }
}

#[inline(always)]
fn translate_reply_ipv4(ctx: &TcContext) -> Result<(), ()> {
    let ip: Ipv4Header = ctx.load(ETHERNET_LEN).map_err(|_| ())?;
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || header_len < 20 {
        return Err(());
    }
    if ip.protocol != protocol::TCP && ip.protocol != protocol::UDP {
        return Err(());
    }
    if u16::from_be_bytes(ip.fragment) & IPV4_FRAGMENT_MASK != 0 {
        return Err(());
    }
    let l4 = ETHERNET_LEN + header_len;
    let ports: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
    let tuple = FlowKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        protocol: ip.protocol,
        _pad: [0; 3],
    };
    let nat = reverse_nat::<V4>(&tuple).ok_or(())?;

    let is_udp = ip.protocol == protocol::UDP;
    let tcp_flags: u8 = if is_udp {
        0
    } else {
        ctx.load(l4 + 13).map_err(|_| ())?
    };
    note_reply_flags::<V4>(&tuple, &nat, tcp_flags);

    // The helpers take old and new values as the raw bytes of the field, and update the
    // transport checksum through the pseudo-header; a UDP checksum of 0 stays 0.
    let check = if is_udp { l4 + 6 } else { l4 + 16 };
    let zero_rule = if is_udp {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let old_addr = u32::from_ne_bytes(ip.src) as u64;
    let new_addr = u32::from_ne_bytes(nat.service_addr) as u64;
    let old_port = u16::from_ne_bytes(tuple.src_port) as u64;
    let new_port = u16::from_ne_bytes(nat.service_port) as u64;
    ctx.l4_csum_replace(
        check,
        old_addr,
        new_addr,
        BPF_F_PSEUDO_HDR as u64 | zero_rule | 4,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(check, old_port, new_port, zero_rule | 2)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(ETHERNET_LEN + IPV4_CHECK, old_addr, new_addr, 4)
        .map_err(|_| ())?;
    ctx.store(ETHERNET_LEN + IPV4_SRC, &nat.service_addr, 0)
        .map_err(|_| ())?;
    ctx.store(l4, &nat.service_port, 0).map_err(|_| ())?;

    let frame_len = ctx.len() as u64;
    add_traffic(nat.service_id, nat.backend_id, |stats| {
        stats.reply_packets += 1;
        stats.reply_bytes += frame_len;
    });
    Ok(())
}

/// The IPv6 twin of [`translate_reply_ipv4`]: no header checksum, and the 16-byte address
/// change reaches the transport checksum as one precomputed difference. Extension headers are
/// not walked: replies leaving through the kernel's forwarding path from our backends carry
/// none, and a packet that does is left alone.
#[inline(always)]
fn translate_reply_ipv6(ctx: &TcContext) -> Result<(), ()> {
    let ip: Ipv6Header = ctx.load(ETHERNET_LEN).map_err(|_| ())?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(());
    }
    if ip.next_header != protocol::TCP && ip.next_header != protocol::UDP {
        return Err(());
    }
    let l4 = ETHERNET_LEN + IPV6_HEADER_LEN;
    let ports: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
    let tuple = FlowKey6 {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        protocol: ip.next_header,
        _pad: [0; 3],
    };
    let nat = reverse_nat::<V6>(&tuple).ok_or(())?;

    let is_udp = ip.next_header == protocol::UDP;
    let tcp_flags: u8 = if is_udp {
        0
    } else {
        ctx.load(l4 + 13).map_err(|_| ())?
    };
    note_reply_flags::<V6>(&tuple, &nat, tcp_flags);

    // IPv6 UDP has no "no checksum": a result of zero is written as 0xffff.
    let check = if is_udp { l4 + 6 } else { l4 + 16 };
    let zero_rule = if is_udp {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let mut old_addr = ip.src;
    let mut new_addr = nat.service_addr;
    // SAFETY: both are 16-byte arrays on this program's stack, sizes a multiple of 4.
    let difference = unsafe {
        bpf_csum_diff(
            old_addr.as_mut_ptr().cast(),
            16,
            new_addr.as_mut_ptr().cast(),
            16,
            0,
        )
    };
    if difference < 0 {
        return Err(());
    }
    // Size bits zero: `to` is a precomputed difference (`from` must be 0).
    ctx.l4_csum_replace(
        check,
        0,
        difference as u32 as u64,
        BPF_F_PSEUDO_HDR as u64 | zero_rule,
    )
    .map_err(|_| ())?;
    let old_port = u16::from_ne_bytes(tuple.src_port) as u64;
    let new_port = u16::from_ne_bytes(nat.service_port) as u64;
    ctx.l4_csum_replace(check, old_port, new_port, zero_rule | 2)
        .map_err(|_| ())?;
    ctx.store(ETHERNET_LEN + IPV6_SRC, &nat.service_addr, 0)
        .map_err(|_| ())?;
    ctx.store(l4, &nat.service_port, 0).map_err(|_| ())?;

    let frame_len = ctx.len() as u64;
    add_traffic(nat.service_id, nat.backend_id, |stats| {
        stats.reply_packets += 1;
        stats.reply_bytes += frame_len;
    });
    Ok(())
}
