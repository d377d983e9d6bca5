//! The load balancer's testbed: network namespaces wired like a small production setup, real
//! nginx backends, a curl client and lb-user itself, each cleaned up on drop.
//!
//! Used by the integration tests in `tests/` and by `cargo xtask demo`. Everything here needs
//! root (namespaces, XDP); see [`skip_unless_privileged`].

use std::io::Write as _;

pub mod bench_e2e;
pub mod bench_kernel;
pub mod bench_wrapper;
mod bpf_syscall;
pub mod client;
pub mod config;
pub mod fuzz;
pub mod lb;
pub mod netns;
pub mod nginx;
pub mod packet;
pub mod process;
pub mod topology;
pub mod udp_echo;
pub mod xdp_pass;

pub use client::Client;
pub use config::{config_toml, HealthCheck, ServiceConfig};
pub use lb::{lb_user_binary, BackendStats, LoadBalancer, ServiceStats, Stats};
pub use netns::{Netns, NetnsName};
pub use nginx::Nginx;
pub use process::{pid_alive, unique_name, CommandError};
pub use topology::{
    ipv6_of, Backend, Layout, Offloads, PeerState, Topology, CLIENT_ADDRESS, CLIENT_ADDRESS6,
    PUBLIC_INTERFACE, SERVICE_PORT, SSH_PORT, VIP, VIP6,
};
pub use udp_echo::UdpEcho;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when `test` can run here (as root). Otherwise prints a loud SKIPPED line and
/// returns false, or panics when `LB_REQUIRE_PRIVILEGED=1` says skipping is not acceptable
/// (CI and `cargo xtask test`), so a missing privilege can never pass as a green run.
pub fn skip_unless_privileged(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root (network namespaces, XDP) and LB_REQUIRE_PRIVILEGED=1 is set");
    }
    // Written to the stderr handle itself, not with eprintln!, which the test harness
    // captures and hides for passing tests: a skip must be seen.
    let line = format!("SKIPPED: {test} needs root (network namespaces, XDP); run it as root\n");
    if let Err(error) = std::io::stderr().write_all(line.as_bytes()) {
        panic!("{test}: could not report the skip on stderr: {error}");
    }
    false
}
