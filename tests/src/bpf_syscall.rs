//! The few raw `bpf(2)` calls the testbed makes without aya: loading the tiny XDP programs it
//! assembles itself (the benchmark's restoring wrapper, the XDP_PASS stub for veth peers).

use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::bail;

/// `enum bpf_cmd`.
const BPF_PROG_LOAD: libc::c_long = 5;
/// `enum bpf_prog_type`.
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s BPF_XDP, which aya also loads XDP programs with: a tail call
/// requires caller and callee to agree on it, and BPF links attach with it.
pub const BPF_XDP: u32 = 37;

/// The prefix of `union bpf_attr` that BPF_PROG_LOAD reads, up to `expected_attach_type`; the
/// kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf(2)` with `attr` as the attribute union; returns the (non-negative) result.
///
/// # Safety
/// `attr` must be a valid prefix of `union bpf_attr` for `command`, and every pointer in it
/// must be valid for what the kernel reads or writes there during the call.
pub unsafe fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<i64> {
    let result = libc::syscall(
        libc::SYS_bpf,
        command,
        attr as *mut T,
        std::mem::size_of::<T>() as libc::c_uint,
    );
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

/// Takes ownership of the descriptor a successful `bpf(2)` call returned.
pub fn owned_fd(result: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(result).map_err(|_| io::Error::other("bpf(2) returned no fd"))?;
    // SAFETY: a descriptor the kernel just returned to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads an XDP program of `instructions` (each a `struct bpf_insn`, 8 bytes) named `name`
/// (at most 15 bytes). A refusal carries the verifier's log.
pub fn load_xdp_program<I: Copy>(name: &str, instructions: &[I]) -> anyhow::Result<OwnedFd> {
    assert_eq!(std::mem::size_of::<I>(), 8, "a BPF instruction is 8 bytes");
    assert!(name.len() < 16, "program names have at most 15 bytes");
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_XDP,
        ..ProgLoadAttr::default()
    };
    // SAFETY: the instructions, license and log buffer outlive the call, with the sizes given.
    match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => Ok(owned_fd(fd)?),
        Err(error) => {
            let end = log.iter().position(|&byte| byte == 0).unwrap_or(log.len());
            bail!(
                "the verifier refused it ({error}): {}",
                String::from_utf8_lossy(&log[..end]).trim()
            )
        }
    }
}
