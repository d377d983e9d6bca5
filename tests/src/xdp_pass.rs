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
use std::os::fd::OwnedFd;

use anyhow::Context as _;

use crate::bpf_syscall::{bpf, load_xdp_program, owned_fd, BPF_XDP};
use crate::netns::NetnsName;

/// `enum bpf_cmd`.
const BPF_LINK_CREATE: libc::c_long = 28;

/// `r0 = 2 (XDP_PASS); exit`, as `struct bpf_insn` bytes: opcode, registers, offset, immediate.
const PROGRAM: [[u8; 8]; 2] = [
    [0xb7, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00],
    [0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
];

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
            let program = load_xdp_program("xdp_pass", &PROGRAM)
                .context("loading the program (BPF_PROG_LOAD)")?;
            create_link(&program, ifindex).context("attaching it (BPF_LINK_CREATE)")
        })?;
        let link = thread
            .join()
            .map_err(|_| anyhow::anyhow!("{what}: the thread panicked"))?
            .context(what)?;
        Ok(Self { _link: link })
    }
}

fn create_link(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let mut attributes = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    // SAFETY: a BPF_LINK_CREATE prefix without pointers.
    owned_fd(unsafe { bpf(BPF_LINK_CREATE, &mut attributes) }?)
}
