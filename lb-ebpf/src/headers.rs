//! Packet headers as the wire has them, and the one bounds-checked accessor for packet memory.
//!
//! Multi-byte fields are byte arrays in network order, so no header is ever read with a wrong
//! byte order and every struct has alignment 1 (packets give no alignment guarantee).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

pub const ETHERNET_LEN: usize = size_of::<EthernetHeader>();
pub const ETHER_TYPE_IPV4: [u8; 2] = [0x08, 0x00];
pub const ETHER_TYPE_IPV6: [u8; 2] = [0x86, 0xdd];
/// 802.1Q (customer) and 802.1ad (service, "QinQ") VLAN tags.
pub const ETHER_TYPE_VLAN: [u8; 2] = [0x81, 0x00];
pub const ETHER_TYPE_QINQ: [u8; 2] = [0x88, 0xa8];
pub const VLAN_TAG_LEN: usize = size_of::<VlanTag>();
/// IPv4 "more fragments" flag and fragment offset, in the second byte pair of `fragment`.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

#[repr(C)]
pub struct EthernetHeader {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// What follows the Ethernet addresses in a tagged frame: the tag, then the next EtherType.
#[repr(C)]
pub struct VlanTag {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub fragment: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub const IPV6_HEADER_LEN: usize = size_of::<Ipv6Header>();

#[repr(C)]
pub struct Ipv6Header {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first 8 bytes of every IPv6 extension header the datapath walks: the next header, a
/// length whose unit depends on the header, and 6 bytes whose meaning does too (a routing
/// header's type and segments left, a fragment header's offset and flags).
#[repr(C)]
pub struct ExtensionHeader {
    pub next_header: u8,
    pub len: u8,
    pub data: [u8; 6],
}

/// The TCP header without options: the datapath needs the ports and the checksum only.
#[repr(C)]
pub struct TcpHeader {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub offset_flags: [u8; 2],
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urgent: [u8; 2],
}

#[repr(C)]
pub struct UdpHeader {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if any byte of it lies past
/// `data_end`. Every packet access goes through here, which is what the verifier checks.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
