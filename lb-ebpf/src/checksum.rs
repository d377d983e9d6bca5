//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Only changed 16-bit words are folded in, so the cost does not depend on the packet length,
//! and the payload is never read.

use lb_common::Address;

/// Folds a 32-bit ones'-complement sum to 16 bits. Two rounds suffice for the at most a few
/// dozen 16-bit terms summed here; the verifier prefers this to a loop.
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
