//! What differs between IPv4 and IPv6 once the headers are parsed: the address type, the maps
//! keyed by it, where the addresses sit in the header, and whether the header has a checksum.
//!
//! The balancing logic (flow table, scheduling, NAT, replies, ICMP errors) is written once,
//! generic over [`Family`], and compiled twice: each family gets its own code with direct map
//! references, so neither pays for the other at run time.

use aya_ebpf::{
    helpers::bpf_csum_diff,
    maps::{HashMap, LruHashMap},
};
use lb_common::{
    Address, Endpoint, EndpointKey, Flow, FlowKey, Fragment, FragmentKey, ReverseNat, Service,
    ServiceKey, VipProtocol,
};

use crate::{
    checksum,
    headers::{Ipv4Header, Ipv6Header, IPV6_HEADER_LEN},
    maps::{
        ENDPOINTS, ENDPOINTS6, FLOWS, FLOWS6, FRAGMENTS, FRAGMENTS6, REVERSE_FLOWS, REVERSE_FLOWS6,
        SERVICES, SERVICES6, THREE_TUPLE_SERVICES, THREE_TUPLE_SERVICES6, VIP_ADDRESSES,
        VIP_ADDRESSES6,
    },
};

/// `bpf_fib_lookup` address families.
pub(crate) const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub trait Family {
    type Addr: Address;
    type Header;

    /// The address family for `bpf_fib_lookup`.
    const AF: u8;
    /// Whether a UDP checksum of zero means "none" (IPv4) rather than "invalid" (IPv6).
    const UDP_CHECKSUM_OPTIONAL: bool;
    /// Whether the ICMP checksum covers a pseudo-header with the addresses (ICMPv6).
    const ICMP_PSEUDO_HEADER: bool;
    /// The protocol number of this family's ICMP, as the route lookup is given it.
    const ICMP_PROTOCOL: u8;
    /// Whether the kernel drops a packet that arrives from outside with one of its own
    /// addresses as the source (IPv4's martian check; IPv6 has none). A translated reply
    /// comes from the VIP, so XDP cannot leave it to the kernel to forward.
    const LOCAL_SOURCE_IS_MARTIAN: bool;

    /// Whether an ICMP message of this type is an error that quotes a packet of a flow:
    /// destination unreachable (fragmentation needed included), packet too big, time exceeded,
    /// parameter problem.
    fn is_icmp_error(kind: u8) -> bool;

    fn services() -> &'static HashMap<ServiceKey<Self::Addr>, Service>;
    fn vip_addresses() -> &'static HashMap<Self::Addr, u32>;
    fn flows() -> &'static LruHashMap<FlowKey<Self::Addr>, Flow>;
    fn endpoints() -> &'static HashMap<EndpointKey<Self::Addr>, Endpoint<Self::Addr>>;
    fn reverse_flows() -> &'static LruHashMap<FlowKey<Self::Addr>, ReverseNat<Self::Addr>>;
    fn fragments() -> &'static HashMap<FragmentKey<Self::Addr>, Fragment>;
    fn three_tuple_services() -> &'static HashMap<VipProtocol<Self::Addr>, ServiceKey<Self::Addr>>;

    /// A backend's address (`Backend::addr`, 16 bytes) in this family.
    fn narrow(addr: [u8; 16]) -> Self::Addr;
    /// [`Family::narrow`] in place, without a copy.
    fn narrow_ref(addr: &[u8; 16]) -> &Self::Addr;

    /// A checksum that covers the address at `field` (through the pseudo-header) after the
    /// address changes to `new`.
    /// # Safety
    /// `field` must point into a bounds-checked header.
    unsafe fn replace_addr_check(
        check: [u8; 2],
        field: *const Self::Addr,
        new: &Self::Addr,
    ) -> [u8; 2];

    /// # Safety
    /// `ip` must point to a whole, bounds-checked header.
    unsafe fn src(ip: *mut Self::Header) -> *mut Self::Addr;
    /// # Safety
    /// As [`Family::src`].
    unsafe fn dst(ip: *mut Self::Header) -> *mut Self::Addr;
    /// The packet's length as the route lookup's MTU check counts it (header included).
    /// # Safety
    /// As [`Family::src`].
    unsafe fn packet_len(ip: *mut Self::Header) -> u16;
    /// Folds an address change into the header's own checksum, returning the checksum before
    /// and after (IPv4), or `None` for a header without one (IPv6).
    /// # Safety
    /// As [`Family::src`].
    unsafe fn update_header_check(
        ip: *mut Self::Header,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Option<([u8; 2], [u8; 2])>;
    /// The header's length (IPv4 options included) and the protocol after it, for a quoted
    /// header inside an ICMP error; `None` if it is not a plain header of this family.
    /// # Safety
    /// As [`Family::src`].
    unsafe fn quoted_header(ip: *mut Self::Header) -> Option<(usize, u8)>;
    /// The folded pseudo-header sum of a transport segment of `length` bytes in this packet, as
    /// a sender with transmit offload leaves it in the checksum field (`checksum::pseudo_header`).
    /// # Safety
    /// As [`Family::src`].
    unsafe fn pseudo_header(ip: *mut Self::Header, protocol: u8, length: u32) -> [u8; 2];
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    type Header = Ipv4Header;

    const AF: u8 = AF_INET;
    const UDP_CHECKSUM_OPTIONAL: bool = true;
    const ICMP_PSEUDO_HEADER: bool = false;
    const ICMP_PROTOCOL: u8 = 1;
    const LOCAL_SOURCE_IS_MARTIAN: bool = true;

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        // Destination unreachable, time exceeded, parameter problem (RFC 792).
        kind == 3 || kind == 11 || kind == 12
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<[u8; 4]>, Service> {
        &SERVICES
    }
    #[inline(always)]
    fn vip_addresses() -> &'static HashMap<[u8; 4], u32> {
        &VIP_ADDRESSES
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<[u8; 4]>, Flow> {
        &FLOWS
    }
    #[inline(always)]
    fn endpoints() -> &'static HashMap<EndpointKey<[u8; 4]>, Endpoint<[u8; 4]>> {
        &ENDPOINTS
    }
    #[inline(always)]
    fn reverse_flows() -> &'static LruHashMap<FlowKey<[u8; 4]>, ReverseNat<[u8; 4]>> {
        &REVERSE_FLOWS
    }
    #[inline(always)]
    fn fragments() -> &'static HashMap<FragmentKey<[u8; 4]>, Fragment> {
        &FRAGMENTS
    }
    #[inline(always)]
    fn three_tuple_services() -> &'static HashMap<VipProtocol<[u8; 4]>, ServiceKey<[u8; 4]>> {
        &THREE_TUPLE_SERVICES
    }

    #[inline(always)]
    fn narrow(addr: [u8; 16]) -> [u8; 4] {
        [addr[0], addr[1], addr[2], addr[3]]
    }
    #[inline(always)]
    fn narrow_ref(addr: &[u8; 16]) -> &[u8; 4] {
        // SAFETY: the first four of 16 bytes; both arrays have alignment 1.
        unsafe { &*addr.as_ptr().cast::<[u8; 4]>() }
    }
    #[inline(always)]
    unsafe fn replace_addr_check(check: [u8; 2], field: *const [u8; 4], new: &[u8; 4]) -> [u8; 2] {
        checksum::replace_addr(check, *field, *new)
    }

    #[inline(always)]
    unsafe fn src(ip: *mut Ipv4Header) -> *mut [u8; 4] {
        &raw mut (*ip).src
    }
    #[inline(always)]
    unsafe fn dst(ip: *mut Ipv4Header) -> *mut [u8; 4] {
        &raw mut (*ip).dst
    }
    #[inline(always)]
    unsafe fn packet_len(ip: *mut Ipv4Header) -> u16 {
        u16::from_be_bytes((*ip).total_len)
    }
    #[inline(always)]
    unsafe fn update_header_check(
        ip: *mut Ipv4Header,
        old: [u8; 4],
        new: [u8; 4],
    ) -> Option<([u8; 2], [u8; 2])> {
        let before = (*ip).check;
        let after = checksum::replace4(before, old, new);
        (*ip).check = after;
        Some((before, after))
    }
    #[inline(always)]
    unsafe fn quoted_header(ip: *mut Ipv4Header) -> Option<(usize, u8)> {
        let header_len = (((*ip).version_ihl & 0x0f) as usize) * 4;
        if (*ip).version_ihl >> 4 != 4 || header_len < 20 {
            return None;
        }
        Some((header_len, (*ip).protocol))
    }
    #[inline(always)]
    unsafe fn pseudo_header(ip: *mut Ipv4Header, protocol: u8, length: u32) -> [u8; 2] {
        checksum::pseudo_header(&(*ip).src, &(*ip).dst, protocol, length)
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type Header = Ipv6Header;

    const AF: u8 = AF_INET6;
    const UDP_CHECKSUM_OPTIONAL: bool = false;
    const ICMP_PSEUDO_HEADER: bool = true;
    const ICMP_PROTOCOL: u8 = 58;
    const LOCAL_SOURCE_IS_MARTIAN: bool = false;

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        // Destination unreachable, packet too big, time exceeded, parameter problem (RFC 4443).
        (1..=4).contains(&kind)
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<[u8; 16]>, Service> {
        &SERVICES6
    }
    #[inline(always)]
    fn vip_addresses() -> &'static HashMap<[u8; 16], u32> {
        &VIP_ADDRESSES6
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<[u8; 16]>, Flow> {
        &FLOWS6
    }
    #[inline(always)]
    fn endpoints() -> &'static HashMap<EndpointKey<[u8; 16]>, Endpoint<[u8; 16]>> {
        &ENDPOINTS6
    }
    #[inline(always)]
    fn reverse_flows() -> &'static LruHashMap<FlowKey<[u8; 16]>, ReverseNat<[u8; 16]>> {
        &REVERSE_FLOWS6
    }
    #[inline(always)]
    fn fragments() -> &'static HashMap<FragmentKey<[u8; 16]>, Fragment> {
        &FRAGMENTS6
    }
    #[inline(always)]
    fn three_tuple_services() -> &'static HashMap<VipProtocol<[u8; 16]>, ServiceKey<[u8; 16]>> {
        &THREE_TUPLE_SERVICES6
    }

    #[inline(always)]
    fn narrow(addr: [u8; 16]) -> [u8; 16] {
        addr
    }
    #[inline(always)]
    fn narrow_ref(addr: &[u8; 16]) -> &[u8; 16] {
        addr
    }
    #[inline(always)]
    unsafe fn replace_addr_check(
        check: [u8; 2],
        field: *const [u8; 16],
        new: &[u8; 16],
    ) -> [u8; 2] {
        checksum::replace16(check, field, new)
    }

    #[inline(always)]
    unsafe fn src(ip: *mut Ipv6Header) -> *mut [u8; 16] {
        &raw mut (*ip).src
    }
    #[inline(always)]
    unsafe fn dst(ip: *mut Ipv6Header) -> *mut [u8; 16] {
        &raw mut (*ip).dst
    }
    #[inline(always)]
    unsafe fn packet_len(ip: *mut Ipv6Header) -> u16 {
        u16::from_be_bytes((*ip).payload_len).saturating_add(IPV6_HEADER_LEN as u16)
    }
    #[inline(always)]
    unsafe fn update_header_check(
        _ip: *mut Ipv6Header,
        _old: [u8; 16],
        _new: [u8; 16],
    ) -> Option<([u8; 2], [u8; 2])> {
        None
    }
    #[inline(always)]
    unsafe fn quoted_header(ip: *mut Ipv6Header) -> Option<(usize, u8)> {
        // Extension headers inside a quoted packet are not walked: an error about a packet
        // that carried them is not translated (our own replies never carry any).
        if (*ip).version_class_flow[0] >> 4 != 6 {
            return None;
        }
        Some((IPV6_HEADER_LEN, (*ip).next_header))
    }
    #[inline(always)]
    unsafe fn pseudo_header(ip: *mut Ipv6Header, protocol: u8, length: u32) -> [u8; 2] {
        // Both addresses lie side by side in the header: one helper call sums their 32 bytes
        // (summing 16 words from bytes here would spill them all to the stack). The helper
        // sums in memory order, so the other words are added in memory order too.
        // SAFETY: the caller bounds-checked the whole header; 32 is a multiple of 4, the only
        // way the helper fails.
        let addresses = bpf_csum_diff(core::ptr::null_mut(), 0, (&raw mut (*ip).src).cast(), 32, 0)
            as u32 as u64;
        let in_memory_order = |word: u16| u16::from_ne_bytes(word.to_be_bytes()) as u64;
        let sum = addresses
            + in_memory_order((length >> 16) as u16)
            + in_memory_order(length as u16)
            + in_memory_order(protocol as u16);
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        (sum as u16).to_ne_bytes()
    }
}
