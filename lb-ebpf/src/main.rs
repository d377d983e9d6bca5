//! The XDP datapath of the load balancer: NAT from a service (VIP, port, protocol) to a
//! backend, and back for the backend's replies.
//!
//! One program serves every interface it is attached to: packets for a service are translated
//! towards a backend, packets of a balanced flow coming back from a backend are translated to
//! come from the service, and everything else passes to the kernel byte for byte unchanged.
//!
//! Verdicts map to XDP actions in one place, [`balancer`]: not ours → XDP_PASS, translated →
//! XDP_TX or XDP_REDIRECT, malformed or unservable → XDP_DROP; each is counted by reason.
//! The TTL is left alone: the client addressed the VIP, which is this host, so the load
//! balancer is the end of the client's path, not a router on it.
#![no_std]
#![no_main]

mod checksum;
mod egress;
mod family;
mod fragments;
mod headers;
mod icmp;
mod ipv6;
mod maps;
mod partial;
mod route;

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    backend_flags, backend_state, counter, flow_hash, flow_state, protocol, scheduler,
    service_flags, three_tuple, Address, Backend, Flow, FlowKey, FragmentKey, ReverseNat, Service,
    ServiceKey, TrafficStats,
};

use crate::{
    family::{Family, V4},
    headers::{
        ptr_at, EthernetHeader, Ipv4Header, Ipv6Header, TcpHeader, UdpHeader, VlanTag,
        ETHERNET_LEN, ETHER_TYPE_IPV4, ETHER_TYPE_IPV6, ETHER_TYPE_QINQ, ETHER_TYPE_VLAN,
        IPV4_FRAGMENT_MASK, IPV6_HEADER_LEN, VLAN_TAG_LEN,
    },
    maps::{
        count, either_port_in_use, port_bitmap, reverse_nat, BACKENDS, BACKEND_STATS, NEXT_HOPS,
        PROGRAMS, PROGRAM_IPV6, RR_CURSORS, SCHEDULE, SERVICE_STATS, SETTINGS,
    },
    partial::Partial,
    route::{Route, SendCounters},
};

/// What to do with a packet; each variant carries the counter it is accounted under.
pub enum Verdict {
    Pass(u32),
    Transmit(u32),
    /// Egress interface index, counter.
    Redirect(u32, u32),
}

/// A packet dropped, with the counter naming why.
pub struct Drop(u32);

/// Where the transport header's fields are, whichever of TCP or UDP it is.
pub(crate) struct Transport {
    src_port: *mut [u8; 2],
    dst_port: *mut [u8; 2],
    check: *mut [u8; 2],
    is_udp: bool,
    /// `protocol::TCP` or `protocol::UDP`.
    protocol: u8,
    /// TCP flags (FIN, SYN, RST, ACK, ...); zero for UDP.
    tcp_flags: u8,
    /// Where the header starts in the frame, and the segment's length (header and payload).
    offset: usize,
    segment_len: usize,
}

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    // Apart from `act`, so that the host's traffic leaves by the shortest way.
    if is_plain_host_traffic(&ctx) {
        count(counter::PASS_NOT_SERVICE);
        return xdp_action::XDP_PASS;
    }
    act(try_balance(&ctx))
}

/// The IPv6 datapath, a program of its own that [`balancer`] tail-calls for every IPv6
/// packet: it gets its own 512 bytes of stack and its own verifier budget, which the IPv4 and
/// IPv6 paths together would exceed, and IPv4 pays nothing for it. `lb-user` puts it in
/// `PROGRAMS` at load.
#[xdp]
pub fn balancer6(ctx: XdpContext) -> u32 {
    act(ipv6::try_parse(&ctx))
}

/// The IPv6 TCP and UDP path, tail-called by [`balancer6`] (see `ipv6.rs` for why apart).
#[xdp]
pub fn balancer6_transport(ctx: XdpContext) -> u32 {
    act(ipv6::try_balance_transport(&ctx))
}

/// The ICMPv6 path, tail-called by [`balancer6`].
#[xdp]
pub fn balancer6_icmp(ctx: XdpContext) -> u32 {
    act(ipv6::try_translate_icmp(&ctx))
}

/// Later IPv6 fragments for a VIP, tail-called by [`balancer6`]: following its datagram and
/// routing it need a stack of their own beside the transport program's.
#[xdp]
pub fn balancer6_fragment(ctx: XdpContext) -> u32 {
    act(ipv6::try_follow_fragment(&ctx))
}

/// The one mapping from verdicts to XDP actions, with each verdict counted.
#[inline(always)]
fn act(result: Result<Verdict, Drop>) -> u32 {
    match result {
        Ok(Verdict::Pass(reason)) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        Ok(Verdict::Transmit(counter)) => {
            count(counter);
            xdp_action::XDP_TX
        }
        Ok(Verdict::Redirect(ifindex, counter)) => {
            count(counter);
            // SAFETY: a plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED for flags.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
        Err(Drop(reason)) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

fn try_balance(ctx: &XdpContext) -> Result<Verdict, Drop> {
    let ethernet: *mut EthernetHeader =
        ptr_at(ctx, 0).ok_or(Drop(counter::DROP_MALFORMED_ETHERNET))?;
    // SAFETY (all raw reads and writes below): each pointer came from `ptr_at`, which checked
    // that the whole header lies inside the packet.
    let (l3_offset, ether_type) = skip_vlan_tags(ctx, unsafe { (*ethernet).ether_type })?;
    if ether_type == ETHER_TYPE_IPV4 {
        return balance_ipv4(ctx, ethernet, l3_offset);
    }
    if ether_type == ETHER_TYPE_IPV6 {
        // SAFETY: a helper call; it only returns if the slot is empty, which it is not once
        // lb-user has loaded the datapath.
        unsafe { PROGRAMS.tail_call(ctx, PROGRAM_IPV6) };
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    }
    Ok(Verdict::Pass(counter::PASS_NOT_IP))
}

/// An IPv4 packet: checked and parsed up to the transport header, then balanced. Inlined into
/// the entry point; the IPv6 path is a call of its own (see `ipv6::balance`).
#[inline(always)]
fn balance_ipv4(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    l3_offset: usize,
) -> Result<Verdict, Drop> {
    // SAFETY (all raw reads and writes below): each pointer came from `ptr_at`, which checked
    // that the whole header lies inside the packet.
    let ip: *mut Ipv4Header = ptr_at(ctx, l3_offset).ok_or(Drop(counter::DROP_MALFORMED_IPV4))?;
    let version_ihl = unsafe { (*ip).version_ihl };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Err(Drop(counter::DROP_MALFORMED_IPV4));
    }
    // Options (IHL > 5) are kept; the transport header starts after them. A header claiming
    // more bytes than the packet has is as malformed as a truncated one, and so is a total
    // length that is shorter than the header or longer than the frame (the kernel drops both;
    // Ethernet padding after the packet is fine).
    let total_len = u16::from_be_bytes(unsafe { (*ip).total_len }) as usize;
    if ctx.data() + l3_offset + header_len > ctx.data_end()
        || total_len < header_len
        || ctx.data() + l3_offset + total_len > ctx.data_end()
    {
        return Err(Drop(counter::DROP_MALFORMED_IPV4));
    }

    let ip_protocol = unsafe { (*ip).protocol };
    if ip_protocol == protocol::ICMP
        && u16::from_be_bytes(unsafe { (*ip).fragment }) & IPV4_FRAGMENT_MASK == 0
    {
        let packet_end = l3_offset + total_len;
        return icmp::translate_error::<V4>(ctx, l3_offset, l3_offset + header_len, packet_end);
    }
    if ip_protocol != protocol::TCP && ip_protocol != protocol::UDP {
        return Ok(Verdict::Pass(counter::PASS_NOT_TCP_UDP));
    }
    let l4_offset = l3_offset + header_len;
    let segment_len = total_len - header_len;
    // The transport header must lie inside the IP packet, not in the frame's padding.
    let transport_len = if ip_protocol == protocol::TCP {
        TCP_HEADER_LEN
    } else {
        UDP_HEADER_LEN
    };
    let holds_transport = segment_len >= transport_len;

    // Only a first fragment has ports: later ones follow it (see fragments.rs).
    let first_fragment = match fragments::ipv4(ctx, ethernet, ip, l4_offset, l3_offset + total_len)?
    {
        fragments::Step::Whole => None,
        fragments::Step::First(key) => Some(key),
        fragments::Step::Done(verdict) => return Ok(verdict),
    };

    let transport = if holds_transport {
        transport_at(ctx, l4_offset, segment_len, ip_protocol)
    } else {
        None
    };
    let Some(transport) = transport else {
        // Without ports we cannot tell whether it is for a service: drop it only if it is
        // addressed to a VIP, and leave everybody else's packets to the kernel.
        return not_for_us_or_malformed::<V4>(unsafe { (*ip).dst });
    };
    balance::<V4>(ctx, ethernet, ip, &transport, first_fragment.as_ref())
}

const IPV4_HEADER_LEN: usize = core::mem::size_of::<Ipv4Header>();

/// The start of the most common IPv4 frame: untagged Ethernet, IPv4 without options, and the
/// ports of a TCP or UDP header.
#[repr(C)]
struct PlainPrefix4 {
    ethernet: EthernetHeader,
    ip: Ipv4Header,
    /// Source then destination port: the first four bytes of both TCP and UDP headers.
    ports: [[u8; 2]; 2],
}

/// The same for IPv6: untagged Ethernet, the fixed header followed by TCP or UDP itself (no
/// extension headers), and the ports.
#[repr(C)]
struct PlainPrefix6 {
    ethernet: EthernetHeader,
    ip: Ipv6Header,
    ports: [[u8; 2]; 2],
}

/// Whether the frame is a plain, whole (unfragmented, no extension headers) IPv4 or IPv6 TCP
/// or UDP packet with neither a service's nor a backend's port: the host's own traffic (the
/// operator's SSH), which the full parse would pass untouched too (its checks hold for such a
/// frame, see the two helpers). Tested before anything else so that this traffic costs as
/// little as possible, IPv6 included (no tail call); every other frame (VLAN tags, IP options,
/// fragments, extension headers, short headers, ports in use) takes the full path, which
/// passes the host's traffic among it just the same.
#[inline(always)]
fn is_plain_host_traffic(ctx: &XdpContext) -> bool {
    // Looked up first: the compiler treats the (inlined) lookup as a call, and would save
    // whatever was read before it on the stack.
    let Some(bitmap) = port_bitmap() else {
        return false;
    };
    // Every plain frame is at least as long as the IPv4 prefix: one bounds check for both.
    let Some(prefix) = ptr_at::<PlainPrefix4>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked the whole prefix.
    let prefix = unsafe { &*prefix };
    let ports = match prefix.ethernet.ether_type {
        ETHER_TYPE_IPV4 => plain_ipv4_ports(ctx, prefix),
        ETHER_TYPE_IPV6 => plain_ipv6_ports(ctx),
        _ => None,
    };
    match ports {
        Some([src_port, dst_port]) => !bitmap.contains(dst_port) && !bitmap.contains(src_port),
        None => false,
    }
}

/// The ports of a plain IPv4 TCP or UDP packet that `balance_ipv4` would find well formed:
/// version 4 with a 20-byte header, not a fragment, the packet inside the frame and its
/// transport header inside the packet. `prefix` is the frame's start, bounds-checked.
#[inline(always)]
fn plain_ipv4_ports(ctx: &XdpContext, prefix: &PlainPrefix4) -> Option<[[u8; 2]; 2]> {
    let ip = &prefix.ip;
    if ip.version_ihl != 0x45 || u16::from_be_bytes(ip.fragment) & IPV4_FRAGMENT_MASK != 0 {
        return None;
    }
    let transport_len = match ip.protocol {
        protocol::TCP => TCP_HEADER_LEN,
        protocol::UDP => UDP_HEADER_LEN,
        _ => return None,
    };
    let total_len = usize::from(u16::from_be_bytes(ip.total_len));
    if total_len < IPV4_HEADER_LEN + transport_len
        || ctx.data() + ETHERNET_LEN + total_len > ctx.data_end()
    {
        return None;
    }
    Some(prefix.ports)
}

/// The ports of a plain IPv6 TCP or UDP packet that `ipv6::try_parse` would find well formed:
/// version 6, TCP or UDP right after the fixed header, the packet inside the frame and its
/// transport header inside the packet.
#[inline(always)]
fn plain_ipv6_ports(ctx: &XdpContext) -> Option<[[u8; 2]; 2]> {
    let prefix = ptr_at::<PlainPrefix6>(ctx, 0)?;
    // SAFETY: ptr_at checked the whole prefix.
    let prefix = unsafe { &*prefix };
    let ip = &prefix.ip;
    if ip.version_class_flow[0] >> 4 != 6 {
        return None;
    }
    let transport_len = match ip.next_header {
        protocol::TCP => TCP_HEADER_LEN,
        protocol::UDP => UDP_HEADER_LEN,
        _ => return None,
    };
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if payload_len < transport_len
        || ctx.data() + ETHERNET_LEN + IPV6_HEADER_LEN + payload_len > ctx.data_end()
    {
        return None;
    }
    Some(prefix.ports)
}

/// A packet whose transport header is missing or cut short: malformed if it is addressed to a
/// VIP, anybody else's business otherwise.
#[inline(always)]
pub(crate) fn not_for_us_or_malformed<F: Family>(dst_addr: F::Addr) -> Result<Verdict, Drop> {
    // SAFETY: map values stay valid for the whole program run (RCU).
    if unsafe { F::vip_addresses().get(&dst_addr) }.is_some() {
        return Err(Drop(counter::DROP_MALFORMED_L4));
    }
    Ok(Verdict::Pass(counter::PASS_NOT_SERVICE))
}

/// Either family, from the transport header on: a client's packet for a service goes to a
/// backend, a backend's reply goes back to its client, anything else passes.
#[inline(always)]
pub(crate) fn balance<F: Family>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut F::Header,
    transport: &Transport,
    first_fragment: Option<&FragmentKey<F::Addr>>,
) -> Result<Verdict, Drop> {
    // Neither for a service nor from a backend: the host's own traffic, passed at once.
    if !either_port_in_use(unsafe { *transport.dst_port }, unsafe {
        *transport.src_port
    }) {
        return Ok(not_for_a_service::<F>(first_fragment));
    }

    let tuple = FlowKey {
        src_addr: unsafe { *F::src(ip) },
        dst_addr: unsafe { *F::dst(ip) },
        src_port: unsafe { *transport.src_port },
        dst_port: unsafe { *transport.dst_port },
        protocol: transport.protocol,
        _pad: [0; 3],
    };
    let service_key = ServiceKey {
        addr: tuple.dst_addr,
        port: tuple.dst_port,
        protocol: tuple.protocol,
        _pad: 0,
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    if let Some(service) = unsafe { F::services().get(&service_key) } {
        check_udp_checksum::<F>(transport)?;
        return forward::<F>(
            ctx,
            ethernet,
            ip,
            transport,
            &tuple,
            service,
            first_fragment,
        );
    }
    // A fragment here is addressed to a VIP, so it is no reply to a client.
    if first_fragment.is_none() {
        if let Some(nat) = reverse_nat::<F>(&tuple) {
            check_udp_checksum::<F>(transport)?;
            return reply::<F>(ctx, ethernet, ip, transport, &tuple, &nat);
        }
    }
    Ok(not_for_a_service::<F>(first_fragment))
}

/// A packet for no service passes; a first fragment's later fragments will pass too.
#[inline(always)]
fn not_for_a_service<F: Family>(first_fragment: Option<&FragmentKey<F::Addr>>) -> Verdict {
    match first_fragment {
        Some(key) => fragments::pass_first::<F>(key),
        None => Verdict::Pass(counter::PASS_NOT_SERVICE),
    }
}

/// IPv6 UDP must carry a checksum (RFC 8200, 8.1): a zero is invalid and the receiver would
/// drop the packet anyway, so it is dropped here, where it is counted.
#[inline(always)]
fn check_udp_checksum<F: Family>(transport: &Transport) -> Result<(), Drop> {
    if !F::UDP_CHECKSUM_OPTIONAL && transport.is_udp && unsafe { *transport.check } == [0, 0] {
        return Err(Drop(counter::DROP_UDP_ZERO_CHECKSUM));
    }
    Ok(())
}

/// Steps over up to two VLAN tags (802.1ad outside, 802.1Q inside), which stay in the frame
/// exactly as they came. Returns where the network header starts and its EtherType; a third
/// tag leaves a VLAN EtherType, which is not ours and passes.
#[inline(always)]
pub(crate) fn skip_vlan_tags(
    ctx: &XdpContext,
    ether_type: [u8; 2],
) -> Result<(usize, [u8; 2]), Drop> {
    let mut offset = ETHERNET_LEN;
    let mut ether_type = ether_type;
    // A fixed two rounds: the verifier sees the bound, and two tags is what 802.1ad stacks.
    for _ in 0..2 {
        if ether_type != ETHER_TYPE_VLAN && ether_type != ETHER_TYPE_QINQ {
            break;
        }
        let tag: *const VlanTag =
            ptr_at(ctx, offset).ok_or(Drop(counter::DROP_MALFORMED_ETHERNET))?;
        // SAFETY: ptr_at checked the whole tag.
        ether_type = unsafe { (*tag).ether_type };
        offset += VLAN_TAG_LEN;
    }
    Ok((offset, ether_type))
}

/// Finds the TCP or UDP header at `offset`, or `None` if it is truncated.
#[inline(always)]
pub(crate) fn transport_at(
    ctx: &XdpContext,
    offset: usize,
    segment_len: usize,
    ip_protocol: u8,
) -> Option<Transport> {
    if ip_protocol == protocol::TCP {
        let tcp: *mut TcpHeader = ptr_at(ctx, offset)?;
        // SAFETY: only field addresses are taken here; ptr_at checked the whole header.
        return Some(unsafe {
            Transport {
                src_port: &raw mut (*tcp).src_port,
                dst_port: &raw mut (*tcp).dst_port,
                check: &raw mut (*tcp).check,
                is_udp: false,
                protocol: protocol::TCP,
                tcp_flags: (*tcp).offset_flags[1],
                offset,
                segment_len,
            }
        });
    }
    let udp: *mut UdpHeader = ptr_at(ctx, offset)?;
    // A UDP checksum covers the length its header states (the receiver trims IP payload past
    // it as padding), so a partial one is completed over that. A length outside the packet
    // leaves nothing to complete: 0 marks it (see `rewrite`).
    let udp_len = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
    let segment_len = if udp_len >= UDP_HEADER_LEN && udp_len <= segment_len {
        udp_len
    } else {
        0
    };
    Some(unsafe {
        Transport {
            src_port: &raw mut (*udp).src_port,
            dst_port: &raw mut (*udp).dst_port,
            check: &raw mut (*udp).check,
            is_udp: true,
            protocol: protocol::UDP,
            tcp_flags: 0,
            offset,
            segment_len,
        }
    })
}

/// A client's packet for a service: pick the flow's backend, translate the destination and
/// send it there. A first fragment's datagram is recorded, so its later fragments follow.
#[inline(always)]
fn forward<F: Family>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut F::Header,
    transport: &Transport,
    tuple: &FlowKey<F::Addr>,
    service: &Service,
    first_fragment: Option<&FragmentKey<F::Addr>>,
) -> Result<Verdict, Drop> {
    let (backend_id, backend) = select_backend::<F>(ctx, tuple, service, transport.tcp_flags)?;
    if let Some(key) = first_fragment {
        fragments::record::<F>(key, service.id, backend_id, backend.generation);
    }

    // SAFETY: ip and transport point into the bounds-checked packet.
    // A first fragment's checksum covers the whole datagram and is never partial (the kernel
    // completes a checksum before it fragments); one that looks partial is a coincidence, and
    // completing it over this fragment alone would break it.
    let may_be_partial = first_fragment.is_none();
    let partial = unsafe {
        rewrite::<F>(
            ip,
            transport,
            Side::Destination,
            F::narrow_ref(&backend.addr),
            backend.port,
            may_be_partial,
        )
    };
    let route = Route {
        family: F::AF,
        src: tuple.src_addr,
        dst: *F::narrow_ref(&backend.addr),
        protocol: tuple.protocol,
        src_port: tuple.src_port,
        dst_port: backend.port,
        total_len: unsafe { F::packet_len(ip) },
    };
    Ok(send_to_backend(
        ctx, ethernet, &route, service.id, backend_id, &backend, partial,
    ))
}

/// Counts a client packet translated towards `backend` and sends it there: through the
/// kernel for a backend behind a bridge, else by `route::send`. `partial` is the translated
/// packet's partial checksum, if it came with one (`rewrite`); later fragments have none.
#[inline(always)]
pub(crate) fn send_to_backend<A: Address>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    route: &Route<A>,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    partial: Option<Partial>,
) -> Verdict {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    add_traffic(service_id, backend_id, |stats| {
        stats.packets += 1;
        stats.bytes += frame_len;
    });
    if backend.flags & backend_flags::VIA_KERNEL != 0 {
        // A bridge is no XDP_REDIRECT target: the kernel routes the translated packet on (and
        // completes a partial checksum, which `rewrite` left partial, on its way out).
        return Verdict::Pass(counter::PASS_KERNEL_FORWARD);
    }
    if let Some(pass) = partial.as_ref().and_then(|partial| partial.too_long()) {
        return pass;
    }
    let counters = SendCounters {
        transmit: counter::FORWARD_TX,
        redirect: counter::FORWARD_REDIRECT,
    };
    // Rewritten before the lookup, so a failed one passes it translated, unlike an ICMP error
    // (issue 5): the kernel forwards it or answers for it, where an untouched packet for a VIP
    // that is a local address would reach the host's own sockets.
    let verdict = route::send(
        ctx,
        ethernet,
        route,
        &counters,
        NEXT_HOPS.get_ptr_mut(backend_id),
    );
    settle_checksum(ctx, partial, verdict)
}

/// A backend's reply to a balanced flow: make it come from the service again and send it to
/// the client.
#[inline(always)]
fn reply<F: Family>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut F::Header,
    transport: &Transport,
    tuple: &FlowKey<F::Addr>,
    nat: &ReverseNat<F::Addr>,
) -> Result<Verdict, Drop> {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    note_reply_flags::<F>(tuple, nat, transport.tcp_flags);
    // SAFETY: ip and transport point into the bounds-checked packet.
    let partial = unsafe {
        rewrite::<F>(
            ip,
            transport,
            Side::Source,
            &nat.service_addr,
            nat.service_port,
            true,
        )
    };
    add_traffic(nat.service_id, nat.backend_id, |stats| {
        stats.reply_packets += 1;
        stats.reply_bytes += frame_len;
    });

    let route = Route {
        family: F::AF,
        src: nat.service_addr,
        dst: tuple.dst_addr,
        protocol: tuple.protocol,
        src_port: nat.service_port,
        dst_port: tuple.dst_port,
        total_len: unsafe { F::packet_len(ip) },
    };
    let counters = SendCounters {
        transmit: counter::REPLY_TX,
        redirect: counter::REPLY_REDIRECT,
    };
    if let Some(pass) = partial.and_then(|partial| partial.too_long()) {
        return Ok(pass);
    }
    // Passed translated if the lookup fails: untouched, the kernel would forward it from the
    // backend's address, which the client rejects.
    let verdict = route::send(ctx, ethernet, &route, &counters, None);
    if F::LOCAL_SOURCE_IS_MARTIAN
        && matches!(verdict, Verdict::Pass(counter::PASS_NEIGH_UNRESOLVED))
    {
        // Not to the kernel, which would drop it as a martian and leave the neighbour
        // unresolved: dropped here while lb-user has it resolved; the backend retransmits.
        return Err(Drop(counter::DROP_NEIGH_UNRESOLVED));
    }
    Ok(settle_checksum(ctx, partial, verdict))
}

/// Completes a partial transport checksum if the packet leaves XDP with it (see `partial`).
#[inline(always)]
fn settle_checksum(ctx: &XdpContext, partial: Option<Partial>, verdict: Verdict) -> Verdict {
    match partial {
        Some(partial) => partial.settle(ctx, verdict),
        None => verdict,
    }
}

pub(crate) const TCP_HEADER_LEN: usize = core::mem::size_of::<TcpHeader>();
pub(crate) const UDP_HEADER_LEN: usize = core::mem::size_of::<UdpHeader>();

/// TCP flag bits in the 14th byte of the TCP header.
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A flow's `last_seen_ns` is rewritten at most this often: a write per packet would bounce the
/// entry's cache line between CPUs for nothing, and timeouts are seconds long.
const REFRESH_NS: u64 = 1_000_000_000;

/// Why a packet needs a new backend choice.
#[derive(Clone, Copy)]
enum Miss {
    /// No entry: a SYN or UDP (`new`), or mid-stream TCP.
    Absent,
    /// The entry's backend is down, or its id now names another backend.
    BackendGone,
    /// The entry was idle past its timeout.
    Expired,
    /// A SYN on a closing entry: the client reuses the source port.
    PortReuse,
}

/// The flow's backend if its entry is still good for this packet, else a newly scheduled one
/// (recorded in the flow table and the reverse table). Also follows TCP: FIN and RST move an
/// entry to the closing timeout.
#[inline(always)]
fn select_backend<F: Family>(
    ctx: &XdpContext,
    tuple: &FlowKey<F::Addr>,
    service: &Service,
    tcp_flags: u8,
) -> Result<(u32, Backend), Drop> {
    // Coarse (jiffies) time: timeouts are seconds long, and the precise clock costs ~25 ns.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_tcp = tuple.protocol == protocol::TCP;
    let syn = is_tcp && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closing = is_tcp && tcp_flags & (TCP_FIN | TCP_RST) != 0;

    // A SYN almost always starts a flow: insert it at once, and look for an entry only when
    // the insert finds one (a retransmitted SYN, a reused port). One hash operation per new
    // flow instead of a lookup that misses and then an insert.
    if syn {
        let start = NewFlow {
            miss_counter: counter::FLOW_MISS_NEW,
            rescheduled: false,
            closing,
            now,
            only_if_absent: true,
        };
        let started = new_flow::<F>(ctx, tuple, service, &start);
        if started != NEW_FLOW_EXISTS {
            return started_flow(started);
        }
    }

    let mut miss = Miss::Absent;
    if let Some(flow) = F::flows().get_ptr_mut(tuple) {
        // SAFETY: map values stay valid for the whole program run (RCU); concurrent writers
        // only ever store whole fields of the same entry.
        let flow = unsafe { &mut *flow };
        miss = match usable_backend(flow, service, now, is_tcp) {
            Ok(backend) if !(syn && flow.state == flow_state::CLOSING) => {
                count(counter::FLOW_HIT);
                if closing && flow.state != flow_state::CLOSING {
                    flow.state = flow_state::CLOSING;
                    count(counter::FLOW_CLOSING);
                }
                if now.wrapping_sub(flow.last_seen_ns) > REFRESH_NS {
                    flow.last_seen_ns = now;
                }
                return Ok((flow.backend_id, backend));
            }
            Ok(_) => Miss::PortReuse,
            Err(miss) => miss,
        };
    }

    let start = NewFlow {
        miss_counter: match miss {
            Miss::Absent if is_tcp && !syn => counter::FLOW_MISS_MID_STREAM,
            Miss::Absent => counter::FLOW_MISS_NEW,
            Miss::BackendGone => counter::FLOW_RESCHEDULED,
            Miss::Expired => counter::FLOW_EXPIRED,
            Miss::PortReuse => counter::FLOW_PORT_REUSE,
        },
        rescheduled: matches!(miss, Miss::BackendGone),
        closing,
        now,
        only_if_absent: false,
    };
    started_flow(new_flow::<F>(ctx, tuple, service, &start))
}

/// The backend of a flow [`new_flow`] started, or the drop it decided.
#[inline(always)]
fn started_flow(started: u64) -> Result<(u32, Backend), Drop> {
    if started & NEW_FLOW_DROPPED != 0 {
        return Err(Drop(started as u32));
    }
    let backend_id = started as u32;
    let backend = *BACKENDS
        .get(backend_id)
        .ok_or(Drop(counter::DROP_INTERNAL))?;
    Ok((backend_id, backend))
}

/// Set in [`new_flow`]'s answer when the packet is dropped; the low 32 bits are the counter.
const NEW_FLOW_DROPPED: u64 = 1 << 63;
/// [`new_flow`]'s answer when `only_if_absent` found an entry: nothing was counted or written.
const NEW_FLOW_EXISTS: u64 = 1 << 62;

/// `-EEXIST`, as a map insert with `BPF_NOEXIST` returns it when the key is there.
const EEXIST: i32 = 17;

/// How a flow starts: why it needed a backend, and its first packet's state.
pub(crate) struct NewFlow {
    miss_counter: u32,
    rescheduled: bool,
    closing: bool,
    now: u64,
    /// Insert only if the 5-tuple has no entry, else answer [`NEW_FLOW_EXISTS`].
    only_if_absent: bool,
}

/// Schedules a new flow (or moves one): checks its source, picks a backend, records the flow.
/// Returns the backend's id, [`NEW_FLOW_DROPPED`] with the drop counter, or
/// [`NEW_FLOW_EXISTS`].
#[inline(always)]
pub(crate) fn new_flow<F: Family>(
    ctx: &XdpContext,
    tuple: &FlowKey<F::Addr>,
    service: &Service,
    start: &NewFlow,
) -> u64 {
    let dropped = |counter: u32| NEW_FLOW_DROPPED | counter as u64;
    // Only new entries are checked: a flow that passed once keeps its entry.
    if !route::arrives_on_its_route(ctx, F::AF, tuple.src_addr, tuple.dst_addr) {
        return dropped(counter::DROP_SPOOFED_SOURCE);
    }
    let backend_id = match schedule(service, tuple) {
        Ok(backend_id) => backend_id,
        Err(Drop(counter)) => return dropped(counter),
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return dropped(counter::DROP_INTERNAL);
    };
    let flow = Flow {
        backend_id,
        service_id: service.id,
        generation: backend.generation,
        state: if start.closing {
            flow_state::CLOSING
        } else {
            flow_state::OPEN
        },
        _pad: [0; 3],
        last_seen_ns: start.now,
        created_ns: start.now,
    };
    // A failed insert costs stickiness for this flow, not this packet: forward it anyway.
    // Only a backend endpoint shared by services needs a reverse entry (see `reverse_nat`).
    let flags = if start.only_if_absent {
        BPF_NOEXIST as u64
    } else {
        0
    };
    let inserted = F::flows().insert(tuple, &flow, flags);
    if inserted == Err(-EEXIST) && start.only_if_absent {
        unschedule(service);
        return NEW_FLOW_EXISTS;
    }
    count(start.miss_counter);
    add_traffic(service.id, backend_id, |stats| {
        stats.new_flows += 1;
        if start.rescheduled {
            stats.rescheduled += 1;
        }
    });
    let shared = backend.flags & backend_flags::SHARED_ENDPOINT != 0;
    if inserted.is_err() || (shared && !insert_reverse::<F>(tuple, backend, service.id, backend_id))
    {
        count(counter::FLOW_INSERT_FAILED);
    }
    backend_id as u64
}

/// Records how to translate the replies of a new flow on a shared backend endpoint; false if
/// the reverse table refused the entry.
#[inline(always)]
fn insert_reverse<F: Family>(
    tuple: &FlowKey<F::Addr>,
    backend: &Backend,
    service_id: u32,
    backend_id: u32,
) -> bool {
    let reverse_key = FlowKey {
        src_addr: F::narrow(backend.addr),
        dst_addr: tuple.src_addr,
        src_port: backend.port,
        dst_port: tuple.src_port,
        protocol: tuple.protocol,
        _pad: [0; 3],
    };
    let nat = ReverseNat {
        service_addr: tuple.dst_addr,
        service_port: tuple.dst_port,
        _pad: [0; 2],
        service_id,
        backend_id,
    };
    F::reverse_flows().insert(&reverse_key, &nat, 0).is_ok()
}

/// The entry's backend, if the entry belongs to this service, has not timed out, and its
/// backend is still up and still the same backend.
#[inline(always)]
fn usable_backend(flow: &Flow, service: &Service, now: u64, is_tcp: bool) -> Result<Backend, Miss> {
    if flow.service_id != service.id {
        return Err(Miss::BackendGone);
    }
    if now.wrapping_sub(flow.last_seen_ns) > flow_timeout(flow, is_tcp) {
        return Err(Miss::Expired);
    }
    match BACKENDS.get(flow.backend_id) {
        Some(backend)
            if backend.state == backend_state::UP && backend.generation == flow.generation =>
        {
            Ok(*backend)
        }
        _ => Err(Miss::BackendGone),
    }
}

#[inline(always)]
fn flow_timeout(flow: &Flow, is_tcp: bool) -> u64 {
    // Until lb-user has written the settings, nothing expires.
    let Some(settings) = SETTINGS.get(0) else {
        return u64::MAX;
    };
    if !is_tcp {
        settings.udp_timeout_ns
    } else if flow.state == flow_state::CLOSING {
        settings.tcp_closing_timeout_ns
    } else {
        settings.tcp_timeout_ns
    }
}

/// A backend's replies with FIN or RST close the client's flow too.
#[inline(always)]
pub(crate) fn note_reply_flags<F: Family>(
    tuple: &FlowKey<F::Addr>,
    nat: &ReverseNat<F::Addr>,
    tcp_flags: u8,
) {
    if tuple.protocol != protocol::TCP || tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let forward_key = FlowKey {
        src_addr: tuple.dst_addr,
        dst_addr: nat.service_addr,
        src_port: tuple.dst_port,
        dst_port: nat.service_port,
        protocol: tuple.protocol,
        _pad: [0; 3],
    };
    if let Some(flow) = F::flows().get_ptr_mut(&forward_key) {
        // SAFETY: as in select_backend.
        let flow = unsafe { &mut *flow };
        if flow.state != flow_state::CLOSING {
            flow.state = flow_state::CLOSING;
            count(counter::FLOW_CLOSING);
        }
    }
}

/// Picks a backend for a new flow from the service's table: a per-CPU cursor for the round
/// robin schedulers, the flow's hash for Maglev (without the ports for a 3-tuple service).
#[inline(always)]
fn schedule<A: Address>(service: &Service, tuple: &FlowKey<A>) -> Result<u32, Drop> {
    let table_len = service.table_len;
    if table_len == 0 {
        return Err(Drop(counter::DROP_NO_BACKEND));
    }
    let slot = if service.scheduler == scheduler::MAGLEV {
        let hash = if service.flags & service_flags::HASH_3_TUPLE != 0 {
            flow_hash(&three_tuple(tuple))
        } else {
            flow_hash(tuple)
        };
        hash % table_len
    } else {
        let cursor = RR_CURSORS
            .get_ptr_mut(service.id)
            .ok_or(Drop(counter::DROP_INTERNAL))?;
        // SAFETY: a per-CPU slot; nothing else writes it while this program runs on this CPU.
        let position = unsafe { *cursor } % table_len;
        unsafe { *cursor = position + 1 };
        position
    };
    // The array lookup bounds-checks the index; userspace keeps offset + len inside the map.
    SCHEDULE
        .get(service.table_offset.wrapping_add(slot))
        .copied()
        .ok_or(Drop(counter::DROP_INTERNAL))
}

/// Takes back the last round-robin step of `service` on this CPU: a SYN whose insert found an
/// entry did not start a flow, and must not cost the next flow its turn.
#[inline(always)]
fn unschedule(service: &Service) {
    if service.scheduler == scheduler::MAGLEV {
        return;
    }
    if let Some(cursor) = RR_CURSORS.get_ptr_mut(service.id) {
        // SAFETY: as in `schedule`.
        unsafe { *cursor = (*cursor).wrapping_sub(1) };
    }
}

enum Side {
    Source,
    Destination,
}

/// Replaces one side's address and port, updating the IP and transport checksums
/// incrementally. A transport checksum that is a sender's partial sum (see `partial`) becomes
/// the partial sum of the new pseudo-header instead, and is returned for completion.
///
/// # Safety
/// `ip` and the transport pointers must point into the packet, bounds-checked.
#[inline(always)]
unsafe fn rewrite<F: Family>(
    ip: *mut F::Header,
    transport: &Transport,
    side: Side,
    addr: &F::Addr,
    port: [u8; 2],
    may_be_partial: bool,
) -> Option<Partial> {
    let ip_protocol = if transport.is_udp {
        protocol::UDP
    } else {
        protocol::TCP
    };
    let segment_len = transport.segment_len as u32;
    let arrived = F::pseudo_header(ip, ip_protocol, segment_len);
    let partial = may_be_partial
        && transport.segment_len != 0
        && checksum::is_partial(*transport.check, arrived);

    let (addr_field, port_field) = match side {
        Side::Source => (F::src(ip), transport.src_port),
        Side::Destination => (F::dst(ip), transport.dst_port),
    };
    let old_port = *port_field;
    F::update_header_check(ip, *addr_field, *addr);
    // The transport checksum covers the addresses through the pseudo-header. Zero means "no
    // checksum" in IPv4 UDP and stays zero (IPv6 never gets here with one: it is dropped
    // first); a computed zero is sent as 0xffff, its ones'-complement equal (RFC 768).
    let check = *transport.check;
    if !(transport.is_udp && check == [0, 0]) {
        let updated = checksum::replace2(
            F::replace_addr_check(check, addr_field, addr),
            old_port,
            port,
        );
        *transport.check = if transport.is_udp && updated == [0, 0] {
            [0xff, 0xff]
        } else {
            updated
        };
    }
    *addr_field = *addr;
    *port_field = port;
    if !partial {
        return None;
    }
    // The port is not in the pseudo-header: only the addresses move a partial sum.
    *transport.check = F::pseudo_header(ip, ip_protocol, segment_len);
    Some(Partial {
        segment_offset: transport.offset,
        segment_len: transport.segment_len,
        check_offset: transport.offset + if transport.is_udp { 6 } else { 16 },
        is_udp: transport.is_udp,
    })
}

/// Applies `update` to this CPU's counters of the service and of the backend.
#[inline(always)]
pub(crate) fn add_traffic(service_id: u32, backend_id: u32, update: impl Fn(&mut TrafficStats)) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU slot, only this program run touches it.
        update(unsafe { &mut *stats });
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        update(unsafe { &mut *stats });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called at run time.
    loop {}
}

/// The benchmarks' floor: the cheapest program that transmits a frame. Measured beside
/// [`balancer`] under the same method, so its cost per packet can be read as a ratio. Never
/// attached by `lb-user`.
#[xdp]
pub fn floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}
