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
mod headers;
mod maps;
mod route;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use lb_common::{
    backend_state, counter, protocol, Backend, Flow, FlowKey, ReverseNat, Service, ServiceKey,
    TrafficStats, MAX_BACKENDS_PER_SERVICE,
};

use crate::{
    headers::{
        ptr_at, EthernetHeader, Ipv4Header, TcpHeader, UdpHeader, ETHERNET_LEN, ETHER_TYPE_IPV4,
        IPV4_FRAGMENT_MASK,
    },
    maps::{
        count, BACKENDS, BACKEND_STATS, FLOWS, REVERSE_FLOWS, RR_CURSORS, SERVICES, SERVICE_STATS,
        VIP_ADDRESSES,
    },
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
struct Transport {
    src_port: *mut [u8; 2],
    dst_port: *mut [u8; 2],
    check: *mut [u8; 2],
    is_udp: bool,
}

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    match try_balance(&ctx) {
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
    if unsafe { (*ethernet).ether_type } != ETHER_TYPE_IPV4 {
        return Ok(Verdict::Pass(counter::PASS_NOT_IPV4));
    }

    let ip: *mut Ipv4Header =
        ptr_at(ctx, ETHERNET_LEN).ok_or(Drop(counter::DROP_MALFORMED_IPV4))?;
    let version_ihl = unsafe { (*ip).version_ihl };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Err(Drop(counter::DROP_MALFORMED_IPV4));
    }
    // Options (IHL > 5) are kept; the transport header starts after them. A header claiming
    // more bytes than the packet has is as malformed as a truncated one.
    if ctx.data() + ETHERNET_LEN + header_len > ctx.data_end() {
        return Err(Drop(counter::DROP_MALFORMED_IPV4));
    }

    let ip_protocol = unsafe { (*ip).protocol };
    if ip_protocol != protocol::TCP && ip_protocol != protocol::UDP {
        return Ok(Verdict::Pass(counter::PASS_NOT_TCP_UDP));
    }
    // Only the first fragment has ports, so fragments cannot be balanced one by one yet.
    // FIXME(#5): track fragments by IP ID so every fragment follows the first one.
    if u16::from_be_bytes(unsafe { (*ip).fragment }) & IPV4_FRAGMENT_MASK != 0 {
        return Ok(Verdict::Pass(counter::PASS_FRAGMENT));
    }

    let dst_addr = unsafe { (*ip).dst };
    let Some(transport) = transport_at(ctx, ETHERNET_LEN + header_len, ip_protocol) else {
        // Without ports we cannot tell whether it is for a service: drop it only if it is
        // addressed to a VIP, and leave everybody else's packets to the kernel.
        if unsafe { VIP_ADDRESSES.get(&dst_addr) }.is_some() {
            return Err(Drop(counter::DROP_MALFORMED_L4));
        }
        return Ok(Verdict::Pass(counter::PASS_NOT_SERVICE));
    };

    let tuple = FlowKey {
        src_addr: unsafe { (*ip).src },
        dst_addr,
        src_port: unsafe { *transport.src_port },
        dst_port: unsafe { *transport.dst_port },
        protocol: ip_protocol,
        _pad: [0; 3],
    };
    let service_key = ServiceKey {
        addr: dst_addr,
        port: tuple.dst_port,
        protocol: ip_protocol,
        _pad: 0,
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    if let Some(service) = unsafe { SERVICES.get(&service_key) } {
        return forward(ctx, ethernet, ip, &transport, &tuple, service);
    }
    if let Some(nat) = unsafe { REVERSE_FLOWS.get(&tuple) } {
        let nat = *nat;
        return Ok(reply(ctx, ethernet, ip, &transport, &tuple, &nat));
    }
    Ok(Verdict::Pass(counter::PASS_NOT_SERVICE))
}

/// Finds the TCP or UDP header at `offset`, or `None` if it is truncated.
#[inline(always)]
fn transport_at(ctx: &XdpContext, offset: usize, ip_protocol: u8) -> Option<Transport> {
    if ip_protocol == protocol::TCP {
        let tcp: *mut TcpHeader = ptr_at(ctx, offset)?;
        // SAFETY: only field addresses are taken here; ptr_at checked the whole header.
        return Some(unsafe {
            Transport {
                src_port: &raw mut (*tcp).src_port,
                dst_port: &raw mut (*tcp).dst_port,
                check: &raw mut (*tcp).check,
                is_udp: false,
            }
        });
    }
    let udp: *mut UdpHeader = ptr_at(ctx, offset)?;
    Some(unsafe {
        Transport {
            src_port: &raw mut (*udp).src_port,
            dst_port: &raw mut (*udp).dst_port,
            check: &raw mut (*udp).check,
            is_udp: true,
        }
    })
}

/// A client's packet for a service: pick the flow's backend, translate the destination and
/// send it there.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut Ipv4Header,
    transport: &Transport,
    tuple: &FlowKey,
    service: &Service,
) -> Result<Verdict, Drop> {
    let (backend_id, backend) = select_backend(tuple, service)?;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;

    // SAFETY: ip and transport point into the bounds-checked packet.
    unsafe {
        rewrite(ip, transport, Side::Destination, backend.addr, backend.port);
    }
    add_traffic(service.id, backend_id, |stats| {
        stats.packets += 1;
        stats.bytes += frame_len;
    });

    let route = Route {
        src: tuple.src_addr,
        dst: backend.addr,
        protocol: tuple.protocol,
        src_port: tuple.src_port,
        dst_port: backend.port,
        total_len: u16::from_be_bytes(unsafe { (*ip).total_len }),
    };
    let counters = SendCounters {
        transmit: counter::FORWARD_TX,
        redirect: counter::FORWARD_REDIRECT,
    };
    Ok(route::send(ctx, ethernet, &route, &counters))
}

/// A backend's reply to a balanced flow: make it come from the service again and send it to
/// the client.
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut Ipv4Header,
    transport: &Transport,
    tuple: &FlowKey,
    nat: &ReverseNat,
) -> Verdict {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    // SAFETY: ip and transport point into the bounds-checked packet.
    unsafe {
        rewrite(
            ip,
            transport,
            Side::Source,
            nat.service_addr,
            nat.service_port,
        );
    }
    add_traffic(nat.service_id, nat.backend_id, |stats| {
        stats.reply_packets += 1;
        stats.reply_bytes += frame_len;
    });

    let route = Route {
        src: nat.service_addr,
        dst: tuple.dst_addr,
        protocol: tuple.protocol,
        src_port: nat.service_port,
        dst_port: tuple.dst_port,
        total_len: u16::from_be_bytes(unsafe { (*ip).total_len }),
    };
    let counters = SendCounters {
        transmit: counter::REPLY_TX,
        redirect: counter::REPLY_REDIRECT,
    };
    route::send(ctx, ethernet, &route, &counters)
}

/// The flow's backend if it still has a valid one, else a newly scheduled one (recorded in
/// the flow table and the reverse table).
#[inline(always)]
fn select_backend(tuple: &FlowKey, service: &Service) -> Result<(u32, Backend), Drop> {
    let mut rescheduled = false;
    // SAFETY: map values stay valid for the whole program run (RCU).
    if let Some(flow) = unsafe { FLOWS.get(tuple) } {
        if flow.service_id == service.id {
            if let Some(backend) = BACKENDS.get(flow.backend_id) {
                if backend.state == backend_state::UP && backend.generation == flow.generation {
                    count(counter::FLOW_HIT);
                    return Ok((flow.backend_id, *backend));
                }
            }
        }
        // Its backend went down or its id now names another backend: move the flow.
        rescheduled = true;
    }

    let backend_id = schedule(service)?;
    let backend = *BACKENDS
        .get(backend_id)
        .ok_or(Drop(counter::DROP_INTERNAL))?;
    count(if rescheduled {
        counter::FLOW_RESCHEDULED
    } else {
        counter::FLOW_MISS
    });
    add_traffic(service.id, backend_id, |stats| {
        stats.new_flows += 1;
        if rescheduled {
            stats.rescheduled += 1;
        }
    });

    let flow = Flow {
        backend_id,
        service_id: service.id,
        generation: backend.generation,
        _pad: 0,
    };
    let reverse_key = FlowKey {
        src_addr: backend.addr,
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
        service_id: service.id,
        backend_id,
    };
    // A failed insert costs stickiness for this flow, not this packet: forward it anyway.
    if FLOWS.insert(tuple, &flow, 0).is_err()
        || REVERSE_FLOWS.insert(&reverse_key, &nat, 0).is_err()
    {
        count(counter::FLOW_INSERT_FAILED);
    }
    Ok((backend_id, backend))
}

/// Round robin over the service's backends that are up.
#[inline(always)]
fn schedule(service: &Service) -> Result<u32, Drop> {
    let backend_count = service.backend_count;
    if backend_count == 0 {
        return Err(Drop(counter::DROP_NO_BACKEND));
    }
    let cursor = RR_CURSORS
        .get_ptr_mut(service.id)
        .ok_or(Drop(counter::DROP_INTERNAL))?;
    // SAFETY: a per-CPU slot; nothing else writes it while this program runs on this CPU.
    let position = unsafe { *cursor } % backend_count;
    unsafe { *cursor = position + 1 };
    // The mask changes nothing for a valid list (count <= its length) and proves the index
    // bounded to the verifier.
    Ok(service.backends[position as usize & (MAX_BACKENDS_PER_SERVICE - 1)])
}

enum Side {
    Source,
    Destination,
}

/// Replaces one side's address and port, updating the IP and transport checksums
/// incrementally.
///
/// # Safety
/// `ip` and the transport pointers must point into the packet, bounds-checked.
#[inline(always)]
unsafe fn rewrite(
    ip: *mut Ipv4Header,
    transport: &Transport,
    side: Side,
    addr: [u8; 4],
    port: [u8; 2],
) {
    let (addr_field, port_field) = match side {
        Side::Source => (&raw mut (*ip).src, transport.src_port),
        Side::Destination => (&raw mut (*ip).dst, transport.dst_port),
    };
    let old_addr = *addr_field;
    let old_port = *port_field;
    (*ip).check = checksum::replace4((*ip).check, old_addr, addr);
    // The transport checksum covers the addresses through the pseudo-header.
    *transport.check = if transport.is_udp {
        checksum::udp_replace(*transport.check, old_addr, addr, old_port, port)
    } else {
        checksum::replace2(
            checksum::replace4(*transport.check, old_addr, addr),
            old_port,
            port,
        )
    };
    *addr_field = addr;
    *port_field = port;
}

/// Applies `update` to this CPU's counters of the service and of the backend.
#[inline(always)]
fn add_traffic(service_id: u32, backend_id: u32, update: impl Fn(&mut TrafficStats)) {
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
