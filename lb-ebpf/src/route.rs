//! Sending a translated packet on: the next hop comes from the kernel's routing and neighbour
//! tables through `bpf_fib_lookup`, never from configured MAC addresses.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2,
        bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{counter, Address, NeighbourKey, NextHop};

use crate::{family::AF_INET, headers::EthernetHeader, maps::NEIGHBOURS_WANTED, Verdict};

/// How long a backend's cached next hop is used before the routing and neighbour tables are
/// asked again: a route or MAC change takes effect within this time.
const NEXT_HOP_TTL_NS: u64 = 500_000_000;

// Return codes of bpf_fib_lookup (enum in include/uapi/linux/bpf.h).
const FIB_SUCCESS: i64 = 0;
const FIB_FORWARDING_DISABLED: i64 = 5;
const FIB_NO_NEIGHBOUR: i64 = 7;
const FIB_FRAGMENTATION_NEEDED: i64 = 8;

/// The translated packet's addresses, as the route lookup needs them.
pub struct Route<A> {
    /// `Family::AF`.
    pub family: u8,
    /// Addresses of the family: 4 bytes for IPv4, so that its path copies and compares no
    /// more than it needs.
    pub src: A,
    pub dst: A,
    pub protocol: u8,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    /// The packet's length with its IP header, for the lookup's MTU check.
    pub total_len: u16,
}

/// Which counters a successful send bumps: client packets and replies are counted apart.
pub struct SendCounters {
    pub transmit: u32,
    pub redirect: u32,
}

/// Looks up the next hop for `route`, rewrites the Ethernet addresses and picks XDP_TX (same
/// interface) or XDP_REDIRECT. Anything the lookup cannot settle goes to the kernel with the
/// translation already applied: its forwarding path resolves neighbours (the packet is not
/// black-holed while ARP runs), sends ICMP for oversized packets, and applies its own policy.
/// Not so an IPv4 reply towards an unresolved neighbour: the kernel drops it as a martian,
/// and the caller drops it instead (see `Family::LOCAL_SOURCE_IS_MARTIAN`). (ICMP errors call
/// [`resolve`] before they rewrite, and [`deliver`] after.)
#[inline(always)]
pub fn send<A: Address>(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    route: &Route<A>,
    counters: &SendCounters,
    cache: Option<*mut NextHop>,
) -> Verdict {
    match resolve(ctx, route, cache) {
        Ok(hop) => deliver(ctx, ethernet, &hop, counters),
        Err(reason) => Verdict::Pass(reason),
    }
}

/// Where a packet goes next: what a successful route lookup (or a fresh cached one) found.
pub struct Hop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// Finds the next hop for `route`, from `cache` while it is fresh, else from the kernel's
/// tables (refreshing `cache`). Touches no packet byte, so a caller can decide before it
/// translates anything. `Err` is the counter of the pass the kernel gets instead:
/// `PASS_NEIGH_UNRESOLVED` (the next hop is then in `NEIGHBOURS_WANTED`),
/// `PASS_FORWARDING_DISABLED`, `PASS_FRAG_NEEDED` or `PASS_NO_ROUTE`.
#[inline(always)]
pub fn resolve<A: Address>(
    ctx: &XdpContext,
    route: &Route<A>,
    cache: Option<*mut NextHop>,
) -> Result<Hop, u32> {
    let ingress = ctx.ingress_ifindex() as u32;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let dst = route.dst.widen();
    if let Some(hop) = cache {
        // SAFETY: a per-CPU map slot; only this program run touches it.
        let hop = unsafe { &*hop };
        if hop.expires_ns > now
            && hop.ingress_ifindex == ingress
            && hop.addr == dst
            && route.total_len <= hop.ok_len
        {
            return Ok(Hop {
                ifindex: hop.ifindex,
                smac: hop.smac,
                dmac: hop.dmac,
            });
        }
    }

    let mut found = Hop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };
    // IPv4 inlines the lookup; the IPv6 program calls it, having no stack to spare for the
    // request beside its 40-byte keys. `family` is a constant after inlining: one path stays.
    let result = if route.family == AF_INET {
        look_up(ctx, route, &mut found)
    } else {
        look_up_apart(ctx, route, &mut found)
    };
    match result {
        FIB_SUCCESS => {
            if let Some(hop) = cache {
                // SAFETY: as above.
                let hop = unsafe { &mut *hop };
                let fresh = hop.expires_ns > now
                    && hop.ingress_ifindex == ingress
                    && hop.addr == dst
                    && hop.ifindex == found.ifindex
                    && hop.dmac == found.dmac;
                *hop = NextHop {
                    ifindex: found.ifindex,
                    ingress_ifindex: ingress,
                    expires_ns: if fresh {
                        hop.expires_ns
                    } else {
                        now + NEXT_HOP_TTL_NS
                    },
                    addr: dst,
                    smac: found.smac,
                    dmac: found.dmac,
                    ok_len: if fresh {
                        hop.ok_len.max(route.total_len)
                    } else {
                        route.total_len
                    },
                    _pad: [0; 2],
                };
            }
            Ok(found)
        }
        FIB_NO_NEIGHBOUR => Err(counter::PASS_NEIGH_UNRESOLVED),
        FIB_FORWARDING_DISABLED => Err(counter::PASS_FORWARDING_DISABLED),
        FIB_FRAGMENTATION_NEEDED => Err(counter::PASS_FRAG_NEEDED),
        // Blackhole, unreachable, prohibit, not forwarded, unsupported tunnel, or a helper error.
        _ => Err(counter::PASS_NO_ROUTE),
    }
}

/// Asks the kernel's routing and neighbour tables for `route`'s next hop; returns the helper's
/// result code, and on success fills `found`. An IPv4 next hop without a usable neighbour
/// entry is recorded for lb-user to resolve.
#[inline(always)]
fn look_up<A: Address>(ctx: &XdpContext, route: &Route<A>, found: &mut Hop) -> i64 {
    // The helper takes ports and addresses in network order: keep the wire bytes as they are.
    let mut params = fib_params(
        route.family,
        ctx.ingress_ifindex() as u32,
        &route.src,
        &route.dst,
    );
    params.l4_protocol = route.protocol;
    params.sport = u16::from_ne_bytes(route.src_port);
    params.dport = u16::from_ne_bytes(route.dst_port);
    params.__bindgen_anon_1.tot_len = route.total_len;

    // SAFETY: params is a live, correctly sized bpf_fib_lookup on this program's stack.
    let result =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibLookup>() as i32, 0) };
    if result == FIB_SUCCESS {
        found.ifindex = params.ifindex;
        found.smac = params.smac;
        found.dmac = params.dmac;
    } else if result == FIB_NO_NEIGHBOUR && size_of::<A>() == 4 {
        // IPv4 only (the address type, unlike `route.family`, is known in `look_up_apart`): the
        // kernel forwards a passed IPv6 packet from a VIP and resolves its neighbour on the
        // way, and the IPv6 programs have no stack for the key (with it, the transport program
        // and `look_up_apart` would take 504 of the verifier's 512 bytes).
        want_neighbour(&params);
    }
    result
}

/// Records the next hop of a lookup that answered `FIB_NO_NEIGHBOUR` in `NEIGHBOURS_WANTED`,
/// for lb-user to have the kernel resolve. The kernel resolves a neighbour only when it sends
/// to it itself, and an IPv4 reply from a VIP that XDP passes it never gets that far (a
/// martian); without this, such replies would be lost until something else refreshed ARP.
#[inline(always)]
fn want_neighbour(params: &FibLookup) {
    // On this answer the helper has filled in the egress interface and, in the destination
    // field, the next hop (the gateway, or the destination on-link): IPv4 in its first four
    // bytes, the rest still zero from `fib_params`. An IPv4 route through an IPv6 gateway
    // comes back with the family set to IPv6.
    let key = NeighbourKey {
        // SAFETY: the union is 16 bytes; any bytes are a valid [u8; 16].
        addr: unsafe {
            (&raw const params.__bindgen_anon_4)
                .cast::<[u8; 16]>()
                .read_unaligned()
        },
        ifindex: params.ifindex,
        family: params.family,
        _pad: [0; 3],
    };
    // Written once, not per packet: a burst towards the next hop costs one lookup each.
    // SAFETY: the value is only compared with None, never read.
    if unsafe { NEIGHBOURS_WANTED.get(&key) }.is_some() {
        return;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A failed insert (out of memory) loses this request, not the next packet's: ignored.
    let _ = NEIGHBOURS_WANTED.insert(&key, &now, 0);
}

/// [`look_up`] as a function of its own (a BPF-to-BPF call), for the IPv6 program's stack.
#[inline(never)]
fn look_up_apart<A: Address>(ctx: &XdpContext, route: &Route<A>, found: &mut Hop) -> i64 {
    look_up(ctx, route, found)
}

/// Writes the next hop's Ethernet addresses and picks XDP_TX (out of the interface the packet
/// came in on) or XDP_REDIRECT.
#[inline(always)]
pub fn deliver(
    ctx: &XdpContext,
    ethernet: *mut EthernetHeader,
    hop: &Hop,
    counters: &SendCounters,
) -> Verdict {
    // SAFETY: the caller bounds-checked the Ethernet header before translating.
    unsafe {
        (*ethernet).dst = hop.dmac;
        (*ethernet).src = hop.smac;
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        Verdict::Transmit(counters.transmit)
    } else {
        Verdict::Redirect(hop.ifindex, counters.redirect)
    }
}

/// Whether the kernel would route replies to `client` back out of the interface the packet
/// came in on: strict reverse-path filtering, which XDP runs before. A new flow from a source
/// that fails it is forged (an address of this host, or of a backend network, sent from the
/// public side) and must not create a reverse-translation entry: such an entry would capture
/// the replies to this host's own connections to the backend, health probes included.
#[inline(always)]
pub fn arrives_on_its_route<A: Address>(ctx: &XdpContext, family: u8, client: A, local: A) -> bool {
    // As in `send`: inlined for IPv4, a call for IPv6.
    if family == AF_INET {
        reverse_path_ok(ctx, family, &client, &local)
    } else {
        reverse_path_apart(ctx, family, &client, &local)
    }
}

#[inline(never)]
fn reverse_path_apart<A: Address>(ctx: &XdpContext, family: u8, client: &A, local: &A) -> bool {
    reverse_path_ok(ctx, family, client, local)
}

#[inline(always)]
fn reverse_path_ok<A: Address>(ctx: &XdpContext, family: u8, client: &A, local: &A) -> bool {
    let ingress = ctx.ingress_ifindex() as u32;
    let mut params = fib_params(family, ingress, local, client);
    // SAFETY: params is a live, correctly sized bpf_fib_lookup on this program's stack.
    let result =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibLookup>() as i32, 0) };
    (result == FIB_SUCCESS || result == FIB_NO_NEIGHBOUR) && params.ifindex == ingress
}

/// A route request with every field written out: `core::mem::zeroed()` here becomes a call to
/// an out-of-line memset subprogram, which costs more than the stores.
#[inline(always)]
fn fib_params<A: Address>(family: u8, ifindex: u32, src: &A, dst: &A) -> FibLookup {
    let mut params = FibLookup {
        family,
        l4_protocol: 0,
        sport: 0,
        dport: 0,
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 { tot_len: 0 },
        ifindex,
        __bindgen_anon_2: bpf_fib_lookup__bindgen_ty_2 { flowinfo: 0 },
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 { ipv6_src: [0; 4] },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 { ipv6_dst: [0; 4] },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };
    // Byte copies: IPv4 is the first word of each union, the rest stays zero. (Assembling
    // 32-bit words from the bytes instead spills every byte to the stack.)
    // SAFETY: both unions are 16 bytes, `A` is 4 or 16 bytes; an unaligned write of a byte
    // array is always fine.
    unsafe {
        (&raw mut params.__bindgen_anon_3)
            .cast::<A>()
            .write_unaligned(*src);
        (&raw mut params.__bindgen_anon_4)
            .cast::<A>()
            .write_unaligned(*dst);
    }
    params
}
