//! A small UDP responder for the fragment tests: a thread inside a backend's namespace that
//! answers every datagram with one short line naming the backend, the datagram's length and a
//! digest of its bytes. The answer stays far below the MTU (a backend's fragmented reply is not
//! translated back), and the digest lets the client check that the backend got exactly the
//! bytes it sent, after its kernel reassembled the fragments.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;

/// How often the responder looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The responder; stopped (and its thread joined) on drop.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl UdpEcho {
    /// Binds `address`:`port` inside `netns` and answers from a thread; returns once bound.
    pub fn start(netns: &Netns, name: &str, address: IpAddr, port: u16) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound, is_bound) = mpsc::channel();
        let thread_stop = stop.clone();
        let name = name.to_string();
        let thread = netns
            .name()
            .spawn_thread(&format!("udp-echo-{port}"), move || {
                let socket = UdpSocket::bind(SocketAddr::new(address, port));
                let socket = match socket {
                    Ok(socket) => {
                        bound.send(Ok(())).ok();
                        socket
                    }
                    Err(error) => {
                        let message =
                            format!("binding {}: {error}", SocketAddr::new(address, port));
                        bound.send(Err(message.clone())).ok();
                        anyhow::bail!(message);
                    }
                };
                socket.set_read_timeout(Some(POLL))?;
                serve(&socket, &name, &thread_stop)
            })?;
        match is_bound.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(message)) => anyhow::bail!(message),
            Err(error) => anyhow::bail!("the UDP responder did not start: {error}"),
        }
    }

    /// Stops the responder; returns how many datagrams it answered.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the UDP responder panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        if let Err(error) = self.stop_thread() {
            eprintln!("testbed: stopping a UDP responder: {error:#}");
        }
    }
}

fn serve(socket: &UdpSocket, name: &str, stop: &AtomicBool) -> anyhow::Result<u64> {
    let mut buffer = vec![0u8; 65536];
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(error) => return Err(error).context("receiving a datagram"),
        };
        socket
            .send_to(answer(name, &buffer[..len]).as_bytes(), from)
            .with_context(|| format!("answering {from}"))?;
        answered += 1;
    }
    Ok(answered)
}

/// The line the responder named `name` answers `datagram` with.
pub fn answer(name: &str, datagram: &[u8]) -> String {
    format!("{name} {} {:016x}", datagram.len(), digest(datagram))
}

/// FNV-1a, 64 bits: enough to tell a damaged or misassembled datagram from the one sent.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
