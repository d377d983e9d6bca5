//! A do-nothing XDP program (it returns XDP_PASS) attached to one interface of a namespace, for
//! veth ends that must receive frames the load balancer sends with XDP_TX.
//!
//! XDP_TX out of a veth puts the frame in the peer's XDP ring, and the kernel (checked on 6.18)
//! wakes the peer to drain that ring only if the peer has an XDP program of its own. GRO on the
//! peer is enough for XDP_REDIRECT (whose flush wakes the peer either way) but not for XDP_TX:
//! the frames stay queued and never arrive. A physical NIC has no such peer; this stands in
//! for the "XDP program on the peer" that a veth in a one-armed setup needs.
//!
//! The program is two instructions loaded with bpf(2) directly, so the testbed needs neither a
//! compiler nor an object file. It is attached through a BPF link: closing the link's file
//! descriptor (dropping [`XdpPass`]) detaches it, and deleting the namespace removes it too.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::Context as _;

use crate::netns::NetnsName;

/// bpf(2) commands (`enum bpf_cmd`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_prog_type`.
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`.
const BPF_XDP: u32 = 37;

/// `r0 = 2 (XDP_PASS); exit`, as `struct bpf_insn` bytes: opcode, registers, offset, immediate.
const PROGRAM: [[u8; 8]; 2] = [
    [0xb7, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00],
    [0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
];
const LICENSE: &[u8] = b"GPL\0";

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgramLoad {
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

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    /// XDP_FLAGS_*; 0 lets the kernel pick driver mode where the device has it (veth does).
    flags: u32,
}

/// An XDP_PASS program attached to an interface; detached when dropped.
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
}

impl XdpPass {
    /// Attaches the program to `interface` in `netns`.
    pub fn attach(netns: &NetnsName, interface: &str) -> anyhow::Result<Self> {
        let name = CString::new(interface).context("interface name contains NUL")?;
        let what = format!("attaching an XDP_PASS program to {interface} in {netns}");
        let thread = netns.spawn_thread("xdp-pass", move || {
            // SAFETY: if_nametoindex reads a NUL-terminated string and has no other effect.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error()).context("looking up the interface");
            }
            let program = load_program().context("loading the program (BPF_PROG_LOAD)")?;
            create_link(&program, ifindex).context("attaching it (BPF_LINK_CREATE)")
        })?;
        let link = thread
            .join()
            .map_err(|_| anyhow::anyhow!("{what}: the thread panicked"))?
            .context(what)?;
        Ok(Self { _link: link })
    }
}

fn load_program() -> io::Result<OwnedFd> {
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"xdp_pass");
    let attributes = ProgramLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..ProgramLoad::default()
    };
    bpf(BPF_PROG_LOAD, &attributes)
}

fn create_link(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let attributes = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &attributes)
}

/// bpf(2) with `attributes` as its `union bpf_attr`; returns the new file descriptor.
fn bpf<T>(command: libc::c_long, attributes: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attributes` is a live #[repr(C)] prefix of union bpf_attr of the size passed;
    // every pointer inside it refers to a 'static constant.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attributes as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(result).map_err(|_| io::Error::other("bpf(2) returned no fd"))?;
    // SAFETY: a successful BPF_PROG_LOAD or BPF_LINK_CREATE returns a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
