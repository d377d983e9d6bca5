//! The restoring wrapper for the kernel-level benchmark: a tiny XDP program, assembled here
//! from raw BPF instructions, that copies the original frame back into the packet buffer on
//! every iteration of `BPF_PROG_TEST_RUN` and then tail-calls the program under test.
//!
//! With `repeat` > 1 the kernel runs the program again and again on one buffer, so from the
//! second iteration on a rewriting program would see its own output (a translated SYN is no
//! longer addressed to the VIP and takes the pass path). The wrapper puts the input back first,
//! so every iteration measures the intended case, and the kernel's own timer averages over
//! `repeat` runs without a system call or a cold cache in between: the method behind the
//! Katran reference figures. The wrapper's copy and the tail call are part of every figure,
//! the floor's included, so ratios to the floor cancel most of them.
//!
//! Nothing in `lb-ebpf` changes for this: the wrapper, its frame template (an array map) and
//! its one-slot program array are created here with plain `bpf(2)` calls, and the program
//! under test is put into the array by its file descriptor. A new-flow case can be made new on
//! every iteration in one of two ways (see [`Variation`]): the wrapper either bumps a counter
//! kept in the template and writes it into the source port and the last byte of the source
//! address, so that each iteration is a different 5-tuple from the same /24 (which must stay
//! routed through the ingress interface: the datapath checks a new flow's source against the
//! routing table; the checksums are then not those of the new frame, but the datapath updates
//! checksums incrementally and never checks them, so the work per packet is the same), or it
//! keeps the one 5-tuple and deletes its flow-table entry before each run.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context};

use crate::bpf_syscall::{bpf, load_xdp_program, owned_fd};

/// The largest frame the template holds.
pub const MAX_FRAME: usize = 256;
/// Where in the template's map value the new-flow counter lives, after the frame.
const COUNTER_OFFSET: i16 = MAX_FRAME as i16;
/// Where in the template's map value the flow key to forget lives, after the counter.
const KEY_OFFSET: usize = MAX_FRAME + 8;
/// The largest flow key (an IPv6 5-tuple).
const MAX_KEY: usize = 40;
/// The template's map value: frame, counter, key.
const TEMPLATE_LEN: usize = KEY_OFFSET + MAX_KEY;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_FUNC_MAP_DELETE_ELEM: i32 = 3;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const XDP_ABORTED: i32 = 0;

/// Where the wrapper writes the new-flow counter in an Ethernet + IPv4 (no options) frame: its
/// low 16 bits into the TCP or UDP source port, the rest, plus [`FIRST_HOST`], into the last
/// byte of the source address.
const SOURCE_ADDRESS_LAST: i16 = 14 + 15;
const SOURCE_PORT: i16 = 14 + 20;
/// The new-flow sources' lowest last address byte: 10.200.1.160 and up, apart from the
/// sources the loop method uses. Room for 6 million flows before the byte runs out.
pub const FIRST_HOST: i32 = 160;

/// One BPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Instruction {
    code: u8,
    /// Destination register in the low nibble, source register in the high one.
    registers: u8,
    offset: i16,
    immediate: i32,
}

const fn instruction(code: u8, dst: u8, src: u8, offset: i16, immediate: i32) -> Instruction {
    Instruction {
        code,
        registers: dst | (src << 4),
        offset,
        immediate,
    }
}

// Opcodes used below (include/uapi/linux/bpf.h and bpf_common.h).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const RSH64_IMM: u8 = 0x77;
const JGT_REG: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LOAD_IMM64: u8 = 0x18;
/// `ld_imm64` source markers: the immediate is a map fd, or a map fd plus a value offset.
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_MAP_VALUE: u8 = 2;

/// Load (`LDX | MEM | size`) and store (`STX | MEM | size`) opcodes by access width in bytes.
fn load_op(width: usize) -> u8 {
    match width {
        8 => 0x79,
        4 => 0x61,
        2 => 0x69,
        _ => 0x71,
    }
}

fn store_op(width: usize) -> u8 {
    match width {
        8 => 0x7b,
        4 => 0x63,
        2 => 0x6b,
        _ => 0x73,
    }
}

/// How the wrapper makes each iteration a new flow, if it does.
pub enum Variation<'a> {
    /// It does not: every iteration is the same packet (a flow-table hit, a pass, ...).
    None,
    /// A new source address and port each iteration: a new 5-tuple, whose flow-table entry
    /// lands in memory no iteration touched before.
    NewSource,
    /// The same 5-tuple each iteration, its entry deleted from `flows` (keyed by `key`) first:
    /// a new flow every time, on memory the previous iteration left warm. The deletion runs
    /// inside the timed iteration, so it is counted against the program under test.
    ForgetFlow { flows: BorrowedFd<'a>, key: Vec<u8> },
}

/// The wrapper around one program under test, for frames of one length.
pub struct Wrapper {
    program: OwnedFd,
    template: OwnedFd,
    /// Kept open: the wrapper's tail call goes through it.
    _targets: OwnedFd,
    frame: Vec<u8>,
    /// The flow key the wrapper deletes each iteration (empty if none).
    key: Vec<u8>,
}

impl Wrapper {
    /// Loads a wrapper that restores `frame` (at most [`MAX_FRAME`] bytes), varies it as
    /// `variation` says, and tail-calls `target`.
    pub fn new(
        target: BorrowedFd<'_>,
        frame: &[u8],
        variation: Variation<'_>,
    ) -> anyhow::Result<Self> {
        if frame.len() > MAX_FRAME || frame.len() < usize::from(SOURCE_PORT.unsigned_abs()) + 2 {
            bail!(
                "frame of {} bytes: the wrapper takes {} to {MAX_FRAME}",
                frame.len(),
                SOURCE_PORT + 2
            );
        }
        let key = match &variation {
            Variation::ForgetFlow { key, .. } => {
                if key.is_empty() || key.len() > MAX_KEY {
                    bail!(
                        "a flow key of {} bytes: the wrapper takes 1 to {MAX_KEY}",
                        key.len()
                    );
                }
                key.clone()
            }
            Variation::None | Variation::NewSource => Vec::new(),
        };
        let template = create_map(BPF_MAP_TYPE_ARRAY, TEMPLATE_LEN as u32)
            .context("creating the wrapper's frame template (array map)")?;
        let targets = create_map(BPF_MAP_TYPE_PROG_ARRAY, 4)
            .context("creating the wrapper's program array")?;
        write_template(template.as_fd(), frame, &key)?;
        let instructions = assemble(
            frame.len(),
            template.as_raw_fd(),
            targets.as_raw_fd(),
            &variation,
        );
        let program = load_xdp_program("bench_restore", &instructions)
            .context("loading the restoring wrapper")?;
        update_map(targets.as_fd(), &target.as_raw_fd().to_ne_bytes())
            .context("putting the program under test into the wrapper's program array")?;
        Ok(Self {
            program,
            template,
            _targets: targets,
            frame: frame.to_vec(),
            key,
        })
    }

    /// Runs the wrapper `repeat` times on the frame as if it arrived on `ifindex`; returns the
    /// verdict of the last run, the frame it left, and the kernel's mean time per run.
    pub fn run(&self, ifindex: u32, repeat: u32) -> anyhow::Result<(u32, Vec<u8>, f64)> {
        // The input only has to be the right length: the wrapper overwrites it.
        let input = vec![0u8; self.frame.len()];
        let mut output = vec![0u8; self.frame.len() + 256];
        let context = xdp_md(self.frame.len(), ifindex);
        let mut attr = TestRunAttr {
            prog_fd: self.program.as_raw_fd() as u32,
            data_size_in: self.frame.len() as u32,
            data_size_out: output.len() as u32,
            data_in: input.as_ptr() as u64,
            data_out: output.as_mut_ptr() as u64,
            repeat,
            ctx_size_in: context.len() as u32,
            ctx_in: context.as_ptr() as u64,
            ..TestRunAttr::default()
        };
        // SAFETY: attr is a valid `union bpf_attr` prefix for BPF_PROG_TEST_RUN; every pointer
        // in it refers to a live buffer of the stated size for the duration of the call.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }
            .context("BPF_PROG_TEST_RUN on the restoring wrapper")?;
        output.truncate(attr.data_size_out as usize);
        Ok((attr.retval, output, f64::from(attr.duration)))
    }

    /// Resets the new-flow counter, so that a run starts again from the template's tuple.
    pub fn reset_counter(&self) -> anyhow::Result<()> {
        write_template(self.template.as_fd(), &self.frame, &self.key)
    }
}

/// Writes `frame` and the flow key to forget into the template, with the new-flow counter at
/// zero.
fn write_template(template: BorrowedFd<'_>, frame: &[u8], key: &[u8]) -> anyhow::Result<()> {
    let mut value = vec![0u8; TEMPLATE_LEN];
    value[..frame.len()].copy_from_slice(frame);
    value[KEY_OFFSET..KEY_OFFSET + key.len()].copy_from_slice(key);
    update_map(template, &value).context("writing the frame template")
}

/// The wrapper's instructions: optionally delete the flow to forget, bounds check, copy the
/// template over the packet (8 bytes at a time, then 4, 2, 1), optionally stamp the new-flow
/// counter, tail-call slot 0.
fn assemble(
    frame_len: usize,
    template_fd: i32,
    targets_fd: i32,
    variation: &Variation<'_>,
) -> Vec<Instruction> {
    let mut code = vec![instruction(MOV64_REG, 6, 1, 0, 0)]; // r6 = ctx
    if let Variation::ForgetFlow { flows, .. } = variation {
        code.extend([
            instruction(LOAD_IMM64, 1, PSEUDO_MAP_FD, 0, flows.as_raw_fd()), // r1 = flow table
            instruction(0, 0, 0, 0, 0),
            instruction(LOAD_IMM64, 2, PSEUDO_MAP_VALUE, 0, template_fd), // r2 = &template.key
            instruction(0, 0, 0, 0, KEY_OFFSET as i32),
            // Its result does not matter: absent or deleted, the key is gone.
            instruction(CALL, 0, 0, 0, BPF_FUNC_MAP_DELETE_ELEM),
        ]);
    }
    let bounds_check = code.len() + 4;
    code.extend([
        instruction(load_op(4), 2, 6, 0, 0), // r2 = ctx->data
        instruction(load_op(4), 3, 6, 4, 0), // r3 = ctx->data_end
        instruction(MOV64_REG, 4, 2, 0, 0),  // r4 = data
        instruction(ADD64_IMM, 4, 0, 0, frame_len as i32), // r4 += frame_len
        instruction(JGT_REG, 4, 3, i16::MAX, 0), // if r4 > data_end: abort (patched)
        instruction(LOAD_IMM64, 5, PSEUDO_MAP_VALUE, 0, template_fd), // r5 = &template[0]
        instruction(0, 0, 0, 0, 0),          // ld_imm64's second half: offset 0
    ]);
    let mut offset = 0;
    while offset < frame_len {
        let width = [8, 4, 2, 1]
            .into_iter()
            .find(|width| offset + width <= frame_len)
            .unwrap_or(1);
        code.push(instruction(load_op(width), 0, 5, offset as i16, 0));
        code.push(instruction(store_op(width), 2, 0, offset as i16, 0));
        offset += width;
    }
    if let Variation::NewSource = variation {
        code.extend([
            instruction(load_op(4), 0, 5, COUNTER_OFFSET, 0), // r0 = counter
            instruction(ADD64_IMM, 0, 0, 0, 1),               // r0 += 1
            instruction(store_op(4), 5, 0, COUNTER_OFFSET, 0), // counter = r0
            instruction(store_op(2), 2, 0, SOURCE_PORT, 0),   // source port = low 16 bits
            instruction(RSH64_IMM, 0, 0, 0, 16),
            instruction(ADD64_IMM, 0, 0, 0, FIRST_HOST),
            instruction(store_op(1), 2, 0, SOURCE_ADDRESS_LAST, 0), // last address byte
        ]);
    }
    code.extend([
        instruction(MOV64_REG, 1, 6, 0, 0), // r1 = ctx
        instruction(LOAD_IMM64, 2, PSEUDO_MAP_FD, 0, targets_fd), // r2 = program array
        instruction(0, 0, 0, 0, 0),
        instruction(MOV64_IMM, 3, 0, 0, 0), // r3 = slot 0
        instruction(CALL, 0, 0, 0, BPF_FUNC_TAIL_CALL), // does not return on success
    ]);
    let abort = code.len();
    code.extend([
        instruction(MOV64_IMM, 0, 0, 0, XDP_ABORTED),
        instruction(EXIT, 0, 0, 0, 0),
    ]);
    code[bounds_check].offset = (abort - bounds_check - 1) as i16;
    code
}

/// `struct xdp_md` for `BPF_PROG_TEST_RUN`: data = 0, data_end = the frame's length, and the
/// ingress interface.
pub fn xdp_md(frame_len: usize, ifindex: u32) -> Vec<u8> {
    [0, frame_len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|field| field.to_ne_bytes())
        .collect()
}

/// The prefix of `union bpf_attr` that BPF_MAP_CREATE reads.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// The prefix of `union bpf_attr` for element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The prefix of `union bpf_attr` for BPF_PROG_TEST_RUN, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// A one-entry map with 4-byte keys.
fn create_map(map_type: u32, value_size: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: a BPF_MAP_CREATE attr without pointers.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
    Ok(owned_fd(fd)?)
}

/// Writes `value` at key 0.
fn update_map(map: BorrowedFd<'_>, value: &[u8]) -> anyhow::Result<()> {
    let key = 0u32;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (&key as *const u32) as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: key and value point to live buffers of the map's key and value sizes.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }?;
    Ok(())
}

/// Deletes `key` from `map`; a key that is not there is no error.
pub fn delete_key(map: BorrowedFd<'_>, key: &[u8]) -> anyhow::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: key points to a live buffer; the caller passes the map's key size.
    match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
        Ok(_) => Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(error) => Err(error).context("deleting a flow-table entry"),
    }
}

/// Whether `map` holds `key`, whose value has `value_len` bytes. A lookup from userspace does
/// not mark an LRU entry as used, so asking does not keep the entry from being evicted.
pub fn key_present(map: BorrowedFd<'_>, key: &[u8], value_len: usize) -> anyhow::Result<bool> {
    let mut value = vec![0u8; value_len];
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: key and value point to live buffers; the caller passes the map's key size and
    // its value size.
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(error) => Err(error).context("looking up a flow-table entry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_check_jumps_to_the_abort_tail() {
        // SAFETY: the descriptor is only copied into instructions, never used.
        let flows = unsafe { BorrowedFd::borrow_raw(5) };
        let forget = Variation::ForgetFlow {
            flows,
            key: vec![0; 16],
        };
        for (variation, bounds_check) in [
            (Variation::None, 5),
            (Variation::NewSource, 5),
            (forget, 10),
        ] {
            let code = assemble(54, 3, 4, &variation);
            let abort = code.len() - 2;
            assert_eq!(code[bounds_check].code, JGT_REG);
            assert_eq!(bounds_check + 1 + code[bounds_check].offset as usize, abort);
            assert_eq!(code[abort].code, MOV64_IMM);
            assert_eq!(code[abort + 1].code, EXIT);
        }
    }

    #[test]
    fn the_copy_covers_the_frame_exactly() {
        let code = assemble(67, 3, 4, &Variation::None);
        let stored: usize = code
            .iter()
            .filter(|insn| [0x7b, 0x63, 0x6b, 0x73].contains(&insn.code))
            .map(|insn| match insn.code {
                0x7b => 8,
                0x63 => 4,
                0x6b => 2,
                _ => 1,
            })
            .sum();
        assert_eq!(stored, 67);
    }
}
