//! Asks the kernel which XDP features a device offers right now, through the `netdev` generic
//! netlink family (`NETDEV_CMD_DEV_GET`, kernel 6.3 and later).
//!
//! The feature that matters is `ndo-xmit`: whether frames can be sent *into* the device with
//! XDP_REDIRECT. A veth reports it only while its peer can receive them (the peer has GRO on, or
//! an XDP program of its own); otherwise the kernel drops redirected frames without a trace.
//! The peer may live in a namespace lb-user cannot see, but this flag is visible from here.
//!
//! A hand-written request and a bounded parse: two messages, a handful of attributes, no
//! netlink library.

use std::{io, mem::size_of};

/// `enum netdev_xdp_act` bits (include/uapi/linux/netdev.h).
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HEADER_LEN: usize = 16;
const GENL_HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel has no netdev netlink family (older than 6.3?)")]
    NoFamily,
    #[error("malformed netlink answer")]
    Malformed,
}

/// The XDP features device `ifindex` offers now (`XDP_ACT_*` bits).
pub fn xdp_features(ifindex: u32) -> Result<u64, NetdevError> {
    let socket = Socket::open()?;
    let family = {
        let mut name = b"netdev".to_vec();
        name.push(0);
        let answer = socket.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            CTRL_ATTR_FAMILY_NAME,
            &name,
        )?;
        let id = attribute(&answer, CTRL_ATTR_FAMILY_ID).ok_or(NetdevError::NoFamily)?;
        u16::from_ne_bytes(
            id.get(..2)
                .ok_or(NetdevError::Malformed)?
                .try_into()
                .map_err(|_| NetdevError::Malformed)?,
        )
    };
    let answer = socket.request(
        family,
        NETDEV_CMD_DEV_GET,
        NETDEV_A_DEV_IFINDEX,
        &ifindex.to_ne_bytes(),
    )?;
    let features = attribute(&answer, NETDEV_A_DEV_XDP_FEATURES).ok_or(NetdevError::Malformed)?;
    let bytes: [u8; 8] = features
        .get(..8)
        .ok_or(NetdevError::Malformed)?
        .try_into()
        .map_err(|_| NetdevError::Malformed)?;
    Ok(u64::from_ne_bytes(bytes))
}

/// The payload of attribute `kind` in a generic netlink answer (after both headers).
fn attribute(answer: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = answer.get(NLMSG_HEADER_LEN + GENL_HEADER_LEN..)?;
    // At most 64 attributes: far more than either answer has.
    for _ in 0..64 {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let attr_kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if attr_kind == kind {
            return Some(&rest[4..len]);
        }
        let padded = (len + 3) & !3;
        rest = rest.get(padded.min(rest.len())..)?;
    }
    None
}

struct Socket(libc::c_int);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = Self(fd);
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a correctly sized timeval.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Sends one request with one attribute and returns the answer, or the kernel's error.
    fn request(
        &self,
        family: u16,
        command: u8,
        kind: u16,
        payload: &[u8],
    ) -> Result<Vec<u8>, NetdevError> {
        let attr_len = 4 + payload.len();
        let total = NLMSG_HEADER_LEN + GENL_HEADER_LEN + ((attr_len + 3) & !3);
        let mut message = Vec::with_capacity(total);
        message.extend_from_slice(&(total as u32).to_ne_bytes());
        message.extend_from_slice(&family.to_ne_bytes());
        message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        message.extend_from_slice(&[command, 1, 0, 0]);
        message.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(payload);
        message.resize(total, 0);

        // SAFETY: the kernel's netlink address, zeroed then filled; send/recv on owned buffers.
        let sent = unsafe {
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.0,
                message.as_ptr().cast(),
                message.len(),
                0,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut answer = vec![0u8; 8192];
        // SAFETY: recv into a buffer of the given length.
        let received = unsafe { libc::recv(self.0, answer.as_mut_ptr().cast(), answer.len(), 0) };
        if received < 0 {
            return Err(io::Error::last_os_error().into());
        }
        answer.truncate(received as usize);
        if answer.len() < NLMSG_HEADER_LEN + 4 {
            return Err(NetdevError::Malformed);
        }
        if u16::from_ne_bytes([answer[4], answer[5]]) == NLMSG_ERROR {
            let code = i32::from_ne_bytes(
                answer[16..20]
                    .try_into()
                    .map_err(|_| NetdevError::Malformed)?,
            );
            return Err(if family == GENL_ID_CTRL {
                NetdevError::NoFamily
            } else {
                io::Error::from_raw_os_error(-code).into()
            });
        }
        Ok(answer)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this value owns, once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_reports_its_features_or_the_kernel_says_why_not() {
        // Loopback exists in every namespace; on a 6.3+ kernel the answer parses, and it has no
        // ndo-xmit (nothing can be redirected into lo).
        match xdp_features(1) {
            Ok(features) => assert_eq!(features & XDP_ACT_NDO_XMIT, 0, "{features:#x}"),
            Err(NetdevError::NoFamily) => eprintln!("SKIPPED: no netdev netlink family here"),
            Err(error) => panic!("asking for lo's XDP features: {error}"),
        }
    }
}
