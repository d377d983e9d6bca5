//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Only changed 16-bit words are folded in, so the cost does not depend on the packet length,
//! and the payload is never read.

use aya_ebpf::helpers::bpf_csum_diff;
use lb_common::Address;

/// Folds a 32-bit ones'-complement sum to 16 bits. Two rounds suffice for any 32-bit sum (the
/// first leaves at most 0x1fffe); the verifier prefers this to a loop.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn word(bytes: [u8; 2]) -> u32 {
    u16::from_be_bytes(bytes) as u32
}

/// The checksum after a 4-byte field (an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let sum = (!u16::from_be_bytes(check)) as u32
        + (!(word([old[0], old[1]]) as u16)) as u32
        + (!(word([old[2], old[3]]) as u16)) as u32
        + word([new[0], new[1]])
        + word([new[2], new[3]]);
    (!fold(sum)).to_be_bytes()
}

/// The checksum after an address of either family changed from `old` to `new` (in the header
/// it belongs to, or in a pseudo-header the checksum covers).
#[inline(always)]
pub fn replace_addr<A: Address>(check: [u8; 2], old: A, new: A) -> [u8; 2] {
    let sum = (!u16::from_be_bytes(check)) as u32
        + (!fold(old.word_sum())) as u32
        + fold(new.word_sum()) as u32;
    (!fold(sum)).to_be_bytes()
}

/// The checksum after a 2-byte field (a port) changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let sum = (!u16::from_be_bytes(check)) as u32 + (!(word(old) as u16)) as u32 + word(new);
    (!fold(sum)).to_be_bytes()
}

/// A UDP checksum after an address and a port changed. Zero means "no checksum" in IPv4 UDP
/// and stays zero; a computed zero is sent as 0xffff, its ones'-complement equal (RFC 768).
#[inline(always)]
pub fn udp_replace<A: Address>(
    check: [u8; 2],
    old_addr: A,
    new_addr: A,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> [u8; 2] {
    // IPv6 never gets here with a zero: the datapath drops such packets first.
    if check == [0, 0] {
        return check;
    }
    let updated = replace2(replace_addr(check, old_addr, new_addr), old_port, new_port);
    if updated == [0, 0] {
        [0xff, 0xff]
    } else {
        updated
    }
}

/// The folded ones'-complement sum of a TCP or UDP pseudo-header (RFC 793, RFC 768, RFC 8200
/// section 8.1), not complemented: what a sender with transmit checksum offload leaves in the
/// checksum field for the device to complete (Linux writes `~csum_tcpudp_magic(...)`). Takes
/// the addresses of either family: IPv4 (`N` = 4) or IPv6 (`N` = 16); `length` is the
/// transport segment's length, header included.
#[inline(always)]
pub fn pseudo_header<const N: usize>(
    src: &[u8; N],
    dst: &[u8; N],
    protocol: u8,
    length: u32,
) -> [u8; 2] {
    // The 32-bit IPv6 length and the 16-bit IPv4 one sum alike: the high half is 0 for IPv4.
    let mut sum = protocol as u32 + (length >> 16) + (length & 0xffff);
    // N is a constant: the loop is unrolled, 4 or 16 words at most.
    let mut index = 0;
    while index + 1 < N {
        sum += word([src[index], src[index + 1]]) + word([dst[index], dst[index + 1]]);
        index += 2;
    }
    fold(sum).to_be_bytes()
}

/// Whether a transport checksum field holds `pseudo_header`: the packet comes from a sender
/// whose checksum the device was to complete (a veth with transmit offload), or, once in 65536
/// packets of complete checksums, by coincidence (see `partial.rs` for why both are fine).
#[inline(always)]
pub fn is_partial(check: [u8; 2], pseudo_header: [u8; 2]) -> bool {
    check == pseudo_header
}

/// The checksum after the 16-byte address at `field` (in the packet) changes to `new`, summed
/// by the `bpf_csum_diff` helper: assembling eight words from bytes would spill them all to
/// the BPF stack, which the IPv6 program cannot spare. The helper sums in memory order, so the
/// checksum is read and written in memory order too.
///
/// # Safety
/// `field` must point to 16 bounds-checked bytes of the packet.
#[inline(always)]
pub unsafe fn replace16(check: [u8; 2], field: *const [u8; 16], new: &[u8; 16]) -> [u8; 2] {
    // Sizes are multiples of 4, the only way the helper fails.
    let difference = bpf_csum_diff(
        field.cast_mut().cast(),
        16,
        (new as *const [u8; 16]).cast_mut().cast(),
        16,
        0,
    ) as u32;
    let sum = (!u16::from_ne_bytes(check)) as u64 + difference as u64;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
