//! Transport checksums a sender left for the device to complete (a veth with transmit checksum
//! offload on, the default in containers), and completing them when XDP sends the packet on.
//!
//! Such a sender puts only the folded pseudo-header sum in the TCP or UDP checksum field and
//! marks its sk_buff CHECKSUM_PARTIAL; the device, or `skb_checksum_help`, is to sum the segment
//! over it and store the complement. What the datapath must leave in the field depends on
//! where the packet goes next:
//!
//! - XDP_TX and XDP_REDIRECT in native mode turn the frame into an `xdp_frame`, which carries no
//!   checksum state: nothing completes it, and the receiver drops it as corrupt. The datapath
//!   completes it here ([`complete`]), over the translated segment.
//! - XDP_PASS keeps the sk_buff, still CHECKSUM_PARTIAL, and the kernel completes it when it
//!   leaves (or the receiver of a veth trusts it): the field must stay a partial sum, of the
//!   translated packet's pseudo-header. A complete checksum there would be summed over again.
//! - In generic (skb) mode the sk_buff survives XDP_TX and XDP_REDIRECT too: the kernel hands
//!   it to the egress device's transmit function as it is, CHECKSUM_PARTIAL included. So in
//!   that mode the field stays a partial sum whatever the verdict.
//!
//! XDP cannot see CHECKSUM_PARTIAL (no kfunc reports it on 6.18), so the datapath recognises
//! the field instead: it holds exactly the pseudo-header sum of the packet as it arrived. A
//! complete checksum matches that by coincidence once in 65536 packets. Completing is right for
//! such a packet as well (the sum covers the data, whatever the field held); on the XDP_PASS
//! and generic paths it gets a partial sum where a complete one belonged, and its receiver
//! drops it like a corrupted packet (TCP retransmits it). Telling the two apart exactly would
//! take the sk_buff's checksum state, which a future kfunc could give.

use aya_ebpf::{helpers::bpf_csum_diff, programs::XdpContext};
use lb_common::counter;

use crate::{headers::ptr_at, maps::count, Verdict};

/// 1 when lb-user attaches the program in generic (skb) mode, set at load time; read-only
/// afterwards, so the verifier knows its value and drops the branch not taken.
#[no_mangle]
static GENERIC_XDP: u8 = 0;

/// Bytes summed per `bpf_csum_diff` call: a multiple of 4 as the helper requires, and half
/// its most on kernels before 6.13 (512 bytes in all), since the last call passes two ranges.
const CHUNK: usize = 256;
/// Full chunks the main loop takes at most; a bound the verifier can walk.
const MAX_CHUNKS: usize = 12;
/// The longest transport segment (header and payload) XDP completes: 3327 bytes, more than
/// a 1500-byte MTU needs. A veth running a native XDP program without multi-buffer support
/// takes an MTU of at most about 3500 bytes; a longer segment is passed to the kernel
/// translated, with its partial sum, and the kernel completes it on its way out (counted as
/// `pass_checksum_not_completed`). The bound stays below what `BPF_PROG_TEST_RUN` takes (a
/// 3520-byte frame) so that the packet tests reach both sides of it.
pub const MAX_SEGMENT: usize = MAX_CHUNKS * CHUNK + CHUNK - 1;
const _: () = assert!(MAX_SEGMENT == lb_common::MAX_COMPLETED_SEGMENT);

/// A translated packet whose transport checksum field holds the partial sum of the translated
/// pseudo-header. Offsets are from the start of the frame.
#[derive(Clone, Copy)]
pub struct Partial {
    /// Where the transport header starts.
    pub segment_offset: usize,
    /// Transport header and payload: the IP packet's length less its header.
    pub segment_len: usize,
    /// The checksum field.
    pub check_offset: usize,
    /// UDP sends a computed 0 as 0xffff (0 means "no checksum").
    pub is_udp: bool,
}

impl Partial {
    /// The verdict for a packet that may leave by XDP_TX or XDP_REDIRECT, decided before the
    /// next hop is written: `Some` pass, if XDP could not complete its checksum. A packet
    /// passed after its Ethernet addresses were rewritten would be dropped by the kernel as
    /// addressed to another host.
    #[inline(always)]
    pub fn too_long(&self) -> Option<Verdict> {
        if completes_in_xdp() && self.segment_len > MAX_SEGMENT {
            // Unsupported: segments beyond the bound; the kernel completes them on its path.
            return Some(Verdict::Pass(counter::PASS_CHECKSUM_NOT_COMPLETED));
        }
        None
    }

    /// Completes the checksum if `verdict` sends the frame on from XDP; returns the verdict.
    #[inline(always)]
    pub fn settle(&self, ctx: &XdpContext, verdict: Verdict) -> Verdict {
        if !completes_in_xdp() || matches!(verdict, Verdict::Pass(_)) {
            return verdict;
        }
        if complete(ctx, self) {
            count(counter::CHECKSUM_COMPLETED);
            return verdict;
        }
        // Cannot happen: the segment lies in the frame (checked with the IP total length) and
        // within the bound (`too_long`). Should it, the frame goes to the kernel, which drops it
        // as addressed to another host, rather than to a receiver that would drop it as corrupt.
        Verdict::Pass(counter::PASS_CHECKSUM_NOT_COMPLETED)
    }
}

/// Whether XDP_TX and XDP_REDIRECT lose the sk_buff's checksum state (native mode).
#[inline(always)]
fn completes_in_xdp() -> bool {
    // SAFETY: a plain read of a load-time constant.
    unsafe { core::ptr::read_volatile(&GENERIC_XDP) == 0 }
}

/// Sums the segment over its partial field, as the kernel's `skb_checksum_help` does, and
/// stores the complement; false if the segment is out of reach (then nothing was written).
#[inline(never)]
fn complete(ctx: &XdpContext, partial: &Partial) -> bool {
    let Some(sum) = segment_sum(ctx, partial.segment_offset, partial.segment_len) else {
        return false;
    };
    let Some(check) = ptr_at::<[u8; 2]>(ctx, partial.check_offset) else {
        return false;
    };
    // The sum is over 16-bit words in memory order (as `bpf_csum_diff` sums): fold it in that
    // order and store it the same way. Ones'-complement sums do not depend on byte order.
    let mut folded = (sum & 0xffff_ffff) + (sum >> 32);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let mut value = !(folded as u16);
    if value == 0 && partial.is_udp {
        value = 0xffff;
    }
    // SAFETY: ptr_at checked the field.
    unsafe { *check = value.to_ne_bytes() };
    true
}

/// The ones'-complement sum (unfolded) of `len` bytes from `offset`, in memory order; `None`
/// past [`MAX_SEGMENT`] or past the frame.
///
/// Verifier-shaped: every path through it is one exit of one bounded loop, so the verifier
/// walks a few dozen paths. A segment that ends past the first [`CHUNK`] bytes of the frame
/// is summed in whole chunks, then the rest, fewer than [`CHUNK`] bytes, through the chunk
/// that ends where it ends: its sum less the sum of its leading bytes that were summed already
/// (one `bpf_csum_diff` call with a variable "from" size). A segment that ends before goes
/// word by word. The last 0 to 3 bytes are read at a fixed place from the end. Steps of
/// halving sizes ("if at least N bytes are left") would give the verifier 2^steps paths.
#[inline(always)]
fn segment_sum(ctx: &XdpContext, offset: usize, len: usize) -> Option<u64> {
    let words_end = offset + (len & !3);
    let mut sum: u64 = 0;
    if words_end >= CHUNK {
        let mut offset = offset;
        let mut left = len & !3;
        for _ in 0..MAX_CHUNKS {
            let Some(chunk) = ptr_at::<[u8; CHUNK]>(ctx, offset) else {
                break; // fewer than CHUNK bytes left in the frame: the window takes the rest
            };
            // After ptr_at: a length test before it lets LLVM merge the two bounds, and the
            // verifier loses the packet range.
            if left < CHUNK {
                break;
            }
            sum += csum(core::ptr::null_mut(), 0, chunk as *mut u32, CHUNK);
            offset += CHUNK;
            left -= CHUNK;
        }
        if left >= CHUNK {
            return None;
        }
        let window = ptr_at::<[u8; CHUNK]>(ctx, behind(words_end, CHUNK)?)? as *mut u32;
        // The window's last `left` bytes: all of it, less the part summed already.
        sum += csum(window, CHUNK - left, window, CHUNK);
    } else {
        let mut offset = offset;
        for _ in 0..CHUNK / 4 {
            let Some(word) = ptr_at::<[u8; 4]>(ctx, offset) else {
                break;
            };
            if offset >= words_end {
                break;
            }
            // SAFETY: ptr_at checked the four bytes.
            let word = unsafe { *word };
            sum += u16::from_ne_bytes([word[0], word[1]]) as u64;
            sum += u16::from_ne_bytes([word[2], word[3]]) as u64;
            offset += 4;
        }
    }
    // The last 0 to 3 bytes end the four before the segment's end; a segment is never shorter
    // than a UDP header. They start at an even offset into the segment: an odd last byte is
    // the high half of a word padded with zero (RFC 1071).
    let last = ptr_at::<[u8; 4]>(ctx, behind(offset + len, 4)?)?;
    // SAFETY: ptr_at checked the four bytes.
    let last = unsafe { *last };
    sum += match len & 3 {
        0 => 0,
        1 => u16::from_ne_bytes([last[3], 0]) as u64,
        2 => u16::from_ne_bytes([last[2], last[3]]) as u64,
        _ => {
            u16::from_ne_bytes([last[1], last[2]]) as u64 + u16::from_ne_bytes([last[3], 0]) as u64
        }
    };
    Some(sum)
}

/// `end - size`, through memory: else LLVM folds `end - size + size` into a bound check at
/// `end` and reads at a negative offset from it, which the verifier refuses.
#[inline(always)]
fn behind(end: usize, size: usize) -> Option<usize> {
    let start = end.checked_sub(size)?;
    // SAFETY: a read of a local.
    Some(unsafe { core::ptr::read_volatile(&start) })
}

/// `bpf_csum_diff`: the sum of `to_size` bytes at `to` less that of `from_size` bytes at
/// `from`, which the caller checked lie in the packet. Its result is at most 32 bits wide.
#[inline(always)]
fn csum(from: *mut u32, from_size: usize, to: *mut u32, to_size: usize) -> u64 {
    // SAFETY: both ranges lie inside the packet; the sizes are multiples of 4, and together at
    // most 512 bytes (the limit of kernels before 6.13).
    let result = unsafe { bpf_csum_diff(from, from_size as u32, to, to_size as u32, 0) };
    result as u32 as u64
}
