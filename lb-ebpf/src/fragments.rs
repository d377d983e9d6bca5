//! Fragments of datagrams for a VIP: every fragment goes where the datagram's first fragment
//! went, because only the first one carries the ports that pick a service and a backend.
//!
//! - Fragments not addressed to a VIP address pass untouched (`pass_fragment`).
//! - A first fragment (offset 0, MF set) must hold its whole transport header, else it is
//!   dropped (`drop_fragment_tiny_first`; RFC 1858 games, no real stack sends one). It is then
//!   balanced like a whole packet by the caller, which records its datagram here
//!   ([`record`]); a first fragment for no service is recorded as going to the kernel.
//! - A later fragment (offset > 0) looks its datagram up ([`later_target`]): a live entry
//!   (within `[fragments] timeout`, backend still up and the same) sends it to the same
//!   backend, with only the destination address and the IPv4 header checksum rewritten (it
//!   has no transport header; the datagram's L4 checksum was updated in the first fragment).
//!   Without a live entry it goes by the 3-tuple hash of the (VIP, protocol)'s
//!   `maglev_key = "3-tuple"` service if there is one, and is dropped and counted otherwise:
//!   tracking cannot place a fragment that arrives before its first fragment.
//!
//! IPv6 (RFC 8200, 4.5) keeps the fragment information in a fragment header instead:
//! `ipv6.rs` finds it in the extension-header walk and sorts the packet the same way, with
//! a key of 16-byte addresses, the 32-bit identification and the fragment header's next
//! header, and [`follow`] rewrites only the destination address (IPv6 has no header
//! checksum). An atomic fragment (offset 0, M clear; RFC 6946) is a whole packet and is
//! balanced without tracking. The decisions ([`later_target`], [`record`]) work on a
//! [`FragmentKey`] and a backend, generic over the family, not on either header.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    backend_state, counter, protocol, Backend, FlowKey, Fragment, FragmentKey, ServiceKey,
    VipProtocol, FRAGMENT_TO_KERNEL,
};

use crate::{
    family::{Family, V4},
    headers::{ptr_at, EthernetHeader, Ipv4Header, TcpHeader, IPV4_FRAGMENT_MASK},
    maps::{count, BACKENDS, SETTINGS, VIP_ADDRESSES},
    route::Route,
    send_to_backend, Drop, Verdict,
};

/// The fragment offset bits of the IPv4 `fragment` field (the MF flag is 0x2000).
const IPV4_OFFSET_MASK: u16 = 0x1fff;
const UDP_HEADER_LEN: usize = 8;
const TCP_MIN_HEADER_LEN: usize = 20;

/// What [`ipv4`] made of a packet.
pub enum Step {
    /// Not a fragment: balance it as usual.
    Whole,
    /// A first fragment for a VIP with its whole transport header: balance it as usual and
    /// record its datagram under this key.
    First(FragmentKey),
    /// Decided here.
    Done(Verdict),
}

/// Where a later fragment goes.
pub enum Target {
    /// To the kernel, as its datagram's first fragment did.
    Kernel,
    Backend {
        backend_id: u32,
        backend: Backend,
        service_id: u32,
    },
}

/// The entry point for an IPv4 packet whose header has been checked (`ip` bounds-checked,
/// `packet_end` = `l4_offset` + payload within the frame) and whose protocol is TCP or UDP.
/// Sends later fragments for a VIP on, and checks first ones before they are balanced.
#[inline(always)]
pub fn ipv4(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut Ipv4Header,
    l4_offset: usize,
    packet_end: usize,
) -> Result<Step, Drop> {
    // SAFETY (all raw accesses): the caller bounds-checked the IPv4 header.
    let fragment = u16::from_be_bytes(unsafe { (*ip).fragment });
    if fragment & IPV4_FRAGMENT_MASK == 0 {
        return Ok(Step::Whole);
    }
    let dst = unsafe { (*ip).dst };
    if unsafe { VIP_ADDRESSES.get(&dst) }.is_none() {
        return Ok(Step::Done(Verdict::Pass(counter::PASS_FRAGMENT)));
    }
    let id = unsafe { (*ip).id };
    let key = FragmentKey {
        src_addr: unsafe { (*ip).src },
        dst_addr: dst,
        id: [0, 0, id[0], id[1]],
        protocol: unsafe { (*ip).protocol },
        _pad: [0; 3],
    };
    if fragment & IPV4_OFFSET_MASK != 0 {
        return follow::<V4>(ctx, ethernet, ip, &key).map(Step::Done);
    }
    if !holds_transport_header(ctx, l4_offset, packet_end, key.protocol) {
        return Err(Drop(counter::DROP_FRAGMENT_TINY_FIRST));
    }
    Ok(Step::First(key))
}

/// Whether a first fragment carries its whole TCP header (options included) or UDP header.
#[inline(always)]
pub fn holds_transport_header(
    ctx: &XdpContext,
    l4_offset: usize,
    packet_end: usize,
    ip_protocol: u8,
) -> bool {
    if ip_protocol != protocol::TCP {
        return l4_offset + UDP_HEADER_LEN <= packet_end;
    }
    let Some(tcp) = ptr_at::<TcpHeader>(ctx, l4_offset) else {
        return false;
    };
    // SAFETY: ptr_at checked the fixed header; only its data offset is read. The scalar
    // checks come after ptr_at, so the verifier keeps the packet range (see headers.rs).
    let header_len = usize::from(unsafe { (*tcp).offset_flags[0] } >> 4) * 4;
    header_len >= TCP_MIN_HEADER_LEN && l4_offset + header_len <= packet_end
}

/// Sends a later fragment (offset > 0) addressed to a VIP where its datagram goes: the
/// destination address is rewritten, and IPv4's header checksum with it, nothing else (there
/// is no transport header to touch). `ip` must be the bounds-checked header of the fragment
/// that `key` was made from.
#[inline(always)]
pub fn follow<F: Family>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    ip: *mut F::Header,
    key: &FragmentKey<F::Addr>,
) -> Result<Verdict, Drop> {
    let Target::Backend {
        backend_id,
        backend,
        service_id,
    } = later_target::<F>(key)?
    else {
        return Ok(Verdict::Pass(counter::PASS_FRAGMENT));
    };
    // SAFETY: the caller bounds-checked the IP header.
    unsafe {
        let addr = F::narrow_ref(&backend.addr);
        F::update_header_check(ip, key.dst_addr, *addr);
        *F::dst(ip) = *addr;
    }
    // Ports 0: a later fragment has none; they only matter to port-based policy routing.
    let route = Route {
        family: F::AF,
        src: key.src_addr,
        dst: *F::narrow_ref(&backend.addr),
        protocol: key.protocol,
        src_port: [0; 2],
        dst_port: [0; 2],
        total_len: unsafe { F::packet_len(ip) },
    };
    // No transport header, so no checksum to complete.
    Ok(send_to_backend(
        ctx, ethernet, &route, service_id, backend_id, &backend, None,
    ))
}

/// Where a later fragment of the datagram `key` goes: its entry's backend if the entry is
/// live, else the (VIP, protocol)'s 3-tuple service; dropped and counted by why otherwise.
#[inline(always)]
pub fn later_target<F: Family>(key: &FragmentKey<F::Addr>) -> Result<Target, Drop> {
    // Coarse (jiffies) time, as for flows: timeouts are seconds long.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: map values stay valid for the whole program run (RCU).
    let miss = match unsafe { F::fragments().get(key) } {
        None => counter::DROP_FRAGMENT_ORPHAN,
        Some(entry) if now.wrapping_sub(entry.created_ns) > timeout() => {
            counter::DROP_FRAGMENT_TIMED_OUT
        }
        Some(entry) if entry.backend_id == FRAGMENT_TO_KERNEL => return Ok(Target::Kernel),
        Some(entry) => match BACKENDS.get(entry.backend_id) {
            Some(backend)
                if backend.state == backend_state::UP && backend.generation == entry.generation =>
            {
                count(counter::FRAGMENT_FOLLOWED);
                return Ok(Target::Backend {
                    backend_id: entry.backend_id,
                    backend: *backend,
                    service_id: entry.service_id,
                });
            }
            _ => counter::DROP_FRAGMENT_BACKEND_GONE,
        },
    };
    match by_three_tuple::<F>(key)? {
        Some(target) => {
            count(counter::FRAGMENT_BY_3_TUPLE);
            Ok(target)
        }
        None => Err(Drop(miss)),
    }
}

/// The backend the (VIP, protocol)'s `maglev_key = "3-tuple"` service gives the client, if
/// there is such a service: the slot every flow of this client hashes to as well.
#[inline(always)]
fn by_three_tuple<F: Family>(key: &FragmentKey<F::Addr>) -> Result<Option<Target>, Drop> {
    let vip = VipProtocol {
        addr: key.dst_addr,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    let Some(service_key) = (unsafe { F::three_tuple_services().get(&vip) }) else {
        return Ok(None);
    };
    let service_key: ServiceKey<F::Addr> = *service_key;
    let Some(service) = (unsafe { F::services().get(&service_key) }) else {
        return Ok(None);
    };
    // The service hashes the ports away (service_flags::HASH_3_TUPLE): none are needed.
    let tuple = FlowKey {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        src_port: [0; 2],
        dst_port: [0; 2],
        protocol: key.protocol,
        _pad: [0; 3],
    };
    let backend_id = crate::schedule(service, &tuple)?;
    let backend = *BACKENDS
        .get(backend_id)
        .ok_or(Drop(counter::DROP_INTERNAL))?;
    Ok(Some(Target::Backend {
        backend_id,
        backend,
        service_id: service.id,
    }))
}

/// Records where the datagram of a first fragment went, so its later fragments follow:
/// `backend_id` [`FRAGMENT_TO_KERNEL`] for the kernel. A full table is counted; the first
/// fragment itself is sent on regardless.
#[inline(always)]
pub fn record<F: Family>(
    key: &FragmentKey<F::Addr>,
    service_id: u32,
    backend_id: u32,
    generation: u32,
) {
    let entry = Fragment {
        backend_id,
        service_id,
        generation,
        _pad: 0,
        created_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    if F::fragments().insert(key, &entry, 0).is_ok() {
        count(counter::FRAGMENT_TRACKED);
    } else {
        count(counter::FRAGMENT_TABLE_FULL);
    }
}

/// A first fragment addressed to a VIP address but to no service (the host's own traffic):
/// it and its later fragments go to the kernel.
#[inline(always)]
pub fn pass_first<F: Family>(key: &FragmentKey<F::Addr>) -> Verdict {
    record::<F>(key, 0, FRAGMENT_TO_KERNEL, 0);
    Verdict::Pass(counter::PASS_FRAGMENT)
}

#[inline(always)]
fn timeout() -> u64 {
    // Until lb-user has written the settings, nothing expires.
    SETTINGS
        .get(0)
        .map_or(u64::MAX, |settings| settings.fragment_timeout_ns)
}
