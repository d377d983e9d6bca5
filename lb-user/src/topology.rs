//! What the host's network must provide: the interfaces backends are reached through (the
//! program is attached there too, to translate their replies) and the forwarding settings
//! NAT mode depends on.
//!
//! Routes are asked from the kernel with `ip -json route get`, the same answer the datapath's
//! `bpf_fib_lookup` will get, without pulling a netlink library into the daemon.

use std::{net::IpAddr, path::Path, process::Command};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("interface {0} does not exist (see `ip link`)")]
    NoSuchInterface(String),
    #[error("asking the kernel for the route to backend {backend}: {detail}")]
    Route { backend: IpAddr, detail: String },
    #[error(
        "backend {backend} is an address of this host (route via {device}): NAT mode forwards \
         to other hosts; run the server on another host or namespace"
    )]
    LocalBackend { backend: IpAddr, device: String },
    #[error(
        "{setting} is {value}: NAT mode forwards packets between interfaces, so IPv4 forwarding \
         must be on. Enable it with `sysctl -w net.ipv4.conf.all.forwarding=1` (and \
         `sysctl -w {setting}=1`), or persist it in /etc/sysctl.d/"
    )]
    ForwardingDisabled { setting: String, value: String },
    #[error(
        "{setting} is {value}: IPv6 services need IPv6 forwarding (the datapath's IPv6 route \
         lookup answers \"forwarding disabled\" without it, and the kernel forwards nothing). \
         Enable it with `sysctl -w net.ipv6.conf.all.forwarding=1` (which sets every \
         interface's too), or persist it in /etc/sysctl.d/. Note: with forwarding on, the \
         kernel ignores router advertisements on an interface unless its accept_ra is 2, so \
         if this host takes its own IPv6 address or default route from them, also set \
         `sysctl -w net.ipv6.conf.<interface>.accept_ra=2` there first"
    )]
    Ipv6ForwardingDisabled { setting: String, value: String },
    #[error(
        "{device} is not an Ethernet device (ARPHRD type {kind}): the load balancer rewrites \
         and forwards Ethernet frames"
    )]
    NotEthernet { device: String, kind: String },
    #[error("reading {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
}

/// The interface's index now, or 0 if there is no such interface.
pub fn interface_index(interface: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(interface) else {
        return 0;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string and returns 0 when there is none.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// Fails unless `interface` exists in this network namespace.
pub fn check_interface(interface: &str) -> Result<(), TopologyError> {
    // A name, not a path: the kernel allows at most 15 bytes and no '/'.
    let plausible = !interface.is_empty()
        && interface.len() <= 15
        && !interface.contains(['/', ' ', '\0'])
        && interface != "."
        && interface != "..";
    if plausible && Path::new("/sys/class/net").join(interface).exists() {
        Ok(())
    } else {
        Err(TopologyError::NoSuchInterface(interface.to_string()))
    }
}

/// Why `ip route get` gave no route.
enum RouteGetError {
    /// `ip` could not be run.
    Spawn(std::io::Error),
    /// The kernel refused: its own words (blackhole, unreachable and prohibit routes answer
    /// this way).
    Refused(String),
    /// The answer was not JSON.
    Unreadable(serde_json::Error),
    /// An empty answer.
    NoRoute,
}

/// The first route `ip -json route get ADDR` gives for `addr` (either family).
fn route_get(addr: IpAddr) -> Result<serde_json::Value, RouteGetError> {
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    let output = Command::new("ip")
        .args(["-json", family, "route", "get"])
        .arg(addr.to_string())
        .output()
        .map_err(RouteGetError::Spawn)?;
    if !output.status.success() {
        return Err(RouteGetError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).map_err(RouteGetError::Unreadable)?;
    routes.into_iter().next().ok_or(RouteGetError::NoRoute)
}

/// The device the kernel routes `backend` (either family) through.
pub fn route_device(backend: IpAddr) -> Result<String, TopologyError> {
    let route_error = |detail: String| TopologyError::Route { backend, detail };
    let route = route_get(backend).map_err(|error| {
        route_error(match error {
            RouteGetError::Spawn(error) => format!("running `ip`: {error}"),
            // The kernel's words for a blackhole, unreachable or prohibit route are terse
            // ("Invalid argument", "Permission denied"): say what they mean here.
            RouteGetError::Refused(stderr) => format!(
                "{stderr} (no usable route: check `ip route get {backend}`; blackhole, \
                 unreachable and prohibit routes answer like this)"
            ),
            RouteGetError::Unreadable(error) => format!("unreadable answer from `ip`: {error}"),
            RouteGetError::NoRoute => "no route".to_string(),
        })
    })?;
    let device = route["dev"]
        .as_str()
        .ok_or_else(|| route_error(format!("route without a device: {route}")))?
        .to_string();
    if route["type"].as_str() == Some("local") || device == "lo" {
        return Err(TopologyError::LocalBackend { backend, device });
    }
    Ok(device)
}

/// How the kernel would reach a VIP: what tells whether clients can reach it at all.
#[derive(Debug, PartialEq, Eq)]
pub enum VipRoute {
    /// An address of this host: the kernel answers ARP and neighbour solicitations for it.
    Local,
    /// On a connected subnet of `device` but not this host's: nobody answers ARP for it there.
    OnLink { device: String },
    /// Reached through a gateway: fine if the network routes it to this host (a routed
    /// additional address), unreachable otherwise.
    Routed { device: String },
    /// The broadcast address of a subnet of `device`: clients' packets to it are broadcast
    /// frames, and no client can talk TCP to it.
    Broadcast { device: String },
    /// No route at all, or an answer `ip` could not give.
    Unknown { detail: String },
}

/// Whether `addr` is configured on an interface of this namespace (`ip addr show to`), even
/// while the kernel does not route to it as local yet (an IPv6 address still in duplicate
/// address detection).
fn is_assigned(addr: IpAddr) -> bool {
    let prefix = if addr.is_ipv6() { 128 } else { 32 };
    Command::new("ip")
        .args(["-json", "addr", "show", "to"])
        .arg(format!("{addr}/{prefix}"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).ok())
        .is_some_and(|interfaces| {
            interfaces.iter().any(|interface| {
                interface["addr_info"]
                    .as_array()
                    .is_some_and(|addresses| !addresses.is_empty())
            })
        })
}

/// Asks the kernel how it routes `vip` (`ip route get`).
pub fn vip_route(vip: IpAddr) -> VipRoute {
    if is_assigned(vip) {
        return VipRoute::Local;
    }
    let route = match route_get(vip) {
        Ok(route) => route,
        Err(RouteGetError::Spawn(error)) => {
            return VipRoute::Unknown {
                detail: format!("running `ip`: {error}"),
            }
        }
        Err(RouteGetError::Refused(stderr)) => return VipRoute::Unknown { detail: stderr },
        Err(RouteGetError::Unreadable(_) | RouteGetError::NoRoute) => {
            return VipRoute::Unknown {
                detail: "no route".to_string(),
            }
        }
    };
    let device = route["dev"].as_str().unwrap_or_default().to_string();
    if route["type"].as_str() == Some("broadcast") {
        VipRoute::Broadcast { device }
    } else if route["type"].as_str() == Some("local") || device == "lo" {
        VipRoute::Local
    } else if route.get("gateway").is_some() {
        VipRoute::Routed { device }
    } else {
        VipRoute::OnLink { device }
    }
}

/// `interface`'s MTU, from sysfs; `None` if it cannot be read.
pub fn mtu(interface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Fails unless `device` carries Ethernet frames (ARPHRD_ETHER): XDP here rewrites and sends
/// Ethernet frames, which a layer-3 device (tun, a tunnel) or loopback does not have.
pub fn check_ethernet(device: &str) -> Result<(), TopologyError> {
    let path = format!("/sys/class/net/{device}/type");
    let kind = std::fs::read_to_string(&path).map_err(|cause| TopologyError::Read {
        path: path.clone(),
        cause,
    })?;
    let kind = kind.trim();
    if kind == "1" {
        Ok(())
    } else {
        Err(TopologyError::NotEthernet {
            device: device.to_string(),
            kind: kind.to_string(),
        })
    }
}

/// Whether `device` is a Linux bridge: XDP cannot redirect into one, so backends behind it are
/// reached through the kernel's forwarding.
pub fn is_bridge(device: &str) -> bool {
    Path::new("/sys/class/net")
        .join(device)
        .join("bridge")
        .exists()
}

/// Fails unless IPv4 forwarding is on for `interface`: `bpf_fib_lookup` refuses to route
/// packets that arrive on an interface without it, and so does the kernel's own path.
pub fn check_forwarding(interface: &str) -> Result<(), TopologyError> {
    let value = read_sysctl(&format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"))?;
    if value == "1" {
        Ok(())
    } else {
        Err(TopologyError::ForwardingDisabled {
            setting: format!("net.ipv4.conf.{interface}.forwarding"),
            value,
        })
    }
}

/// Fails unless IPv6 forwarding is on globally and for `interface`. The kernel's IPv6 fib
/// lookup for BPF (`bpf_ipv6_fib_lookup` in net/core/filter.c) answers
/// `BPF_FIB_LKUP_RET_FWD_DISABLED` unless the ingress device's `forwarding` is set, and the
/// kernel's own forwarding path (`ip6_forward`) reads `all.forwarding`; setting `all` sets
/// every interface's, which is the fix given.
pub fn check_ipv6_forwarding(interface: &str) -> Result<(), TopologyError> {
    for scope in ["all", interface] {
        let value = read_sysctl(&format!("/proc/sys/net/ipv6/conf/{scope}/forwarding"))?;
        if value != "1" {
            return Err(TopologyError::Ipv6ForwardingDisabled {
                setting: format!("net.ipv6.conf.{scope}.forwarding"),
                value,
            });
        }
    }
    Ok(())
}

/// A sysctl's value, trimmed.
fn read_sysctl(path: &str) -> Result<String, TopologyError> {
    std::fs::read_to_string(path)
        .map(|value| value.trim().to_string())
        .map_err(|cause| TopologyError::Read {
            path: path.to_string(),
            cause,
        })
}
