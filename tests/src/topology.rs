//! The demo topology: a client, the load balancer and two backends, each in its own namespace.
//!
//! ```text
//!  client ns            lb ns                                   backend ns
//!  eth0 10.200.1.2 ---- lbpub 10.200.1.1 (the VIP)
//!                       lbb1  10.200.11.1 ------------------- eth0 10.200.11.2  (backend1)
//!                       lbb2  10.200.12.1 ------------------- eth0 10.200.12.2  (backend2)
//!                      [lbb3  10.200.13.1 ------------------- eth0 10.200.13.2  (backend3)]
//! ```
//!
//! A third backend (and more) can be wired with [`Topology::add_backend`], for tests that add a
//! backend to a running balancer.
//!
//! The client and the backends route everything through the lb namespace, which forwards
//! between its interfaces; so without XDP the backends are still reachable through kernel
//! forwarding, and with XDP the load balancer's replies come back the same way.

use std::net::Ipv4Addr;

use anyhow::Context;

use crate::config::{HealthCheck, ServiceConfig};
use crate::netns::{Netns, NetnsName};
use crate::process::unique_name;

/// The load balancer's public interface, in the lb namespace.
pub const PUBLIC_INTERFACE: &str = "lbpub";
/// The service address: the lb namespace's address on [`PUBLIC_INTERFACE`].
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The client's address on its `eth0`.
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// The port the demo service and the backends' nginx listen on.
pub const SERVICE_PORT: u16 = 80;
/// The port of the stand-in for the operator's SSH, on the VIP, not a service.
pub const SSH_PORT: u16 = 22;

/// One backend: its namespace, its address, and the lb namespace's side of the link to it.
#[derive(Debug)]
pub struct Backend {
    /// What the backend's nginx answers with, and what the tests call it: `backend1`.
    pub name: String,
    pub netns: Netns,
    /// The backend's address on its `eth0`.
    pub address: Ipv4Addr,
    /// The lb namespace's interface towards this backend: `lbb1`.
    pub lb_interface: String,
    /// The lb namespace's address on that interface, the source of its health probes and the
    /// backend's default gateway.
    pub lb_address: Ipv4Addr,
}

/// The namespaces and links of the demo; deleting it deletes them all.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    /// The unique prefix of every namespace name, for backends added later.
    prefix: String,
}

impl Topology {
    /// Builds the demo topology in freshly named namespaces (`lbt<pid>x<n>c`, `...l`, `...b1`).
    /// On error, whatever was already built is deleted.
    pub fn demo() -> anyhow::Result<Self> {
        let prefix = unique_name();
        let client = Netns::create(&format!("{prefix}c"))?;
        let lb = Netns::create(&format!("{prefix}l"))?;
        let mut topology = Self {
            client,
            lb,
            backends: Vec::new(),
            prefix,
        };
        topology
            .connect_client()
            .context("connecting the client namespace")?;
        for _ in 1..=2 {
            topology.add_backend()?;
        }
        topology
            .enable_forwarding()
            .context("enabling forwarding in the lb namespace")?;
        Ok(topology)
    }

    fn connect_client(&self) -> anyhow::Result<()> {
        let lb = self.lb.name().as_str();
        self.client.ip(veth_pair(PUBLIC_INTERFACE, lb))?;
        self.lb.ip([
            "address",
            "add",
            &format!("{VIP}/24"),
            "dev",
            PUBLIC_INTERFACE,
        ])?;
        self.lb.ip(["link", "set", PUBLIC_INTERFACE, "up"])?;
        self.client.ip([
            "address",
            "add",
            &format!("{CLIENT_ADDRESS}/24"),
            "dev",
            "eth0",
        ])?;
        self.client.ip(["link", "set", "eth0", "up"])?;
        self.client
            .ip(["route", "add", "default", "via", &VIP.to_string()])?;
        set_offloads(&self.client)?;
        Ok(())
    }

    /// Wires one more backend: `backend3` in namespace `...b3`, behind `lbb3`, at 10.200.13.2
    /// with the lb namespace at 10.200.13.1, and so on. Adding it to a running lb-user's
    /// configuration is up to the caller (rewrite the file, then reload).
    pub fn add_backend(&mut self) -> anyhow::Result<&Backend> {
        // Backend n lives in 10.200.(10 + n).0/24; 245 keeps the third octet within a byte.
        let number = u8::try_from(self.backends.len() + 1)
            .ok()
            .filter(|&number| number <= 245)
            .context("the topology has no address range left for another backend")?;
        let backend = self
            .connect_backend(number)
            .with_context(|| format!("connecting backend{number}"))?;
        self.backends.push(backend);
        Ok(&self.backends[self.backends.len() - 1])
    }

    fn connect_backend(&self, number: u8) -> anyhow::Result<Backend> {
        let netns = Netns::create(&format!("{}b{number}", self.prefix))?;
        let lb_interface = format!("lbb{number}");
        let address = Ipv4Addr::new(10, 200, 10 + number, 2);
        let lb_address = Ipv4Addr::new(10, 200, 10 + number, 1);
        let lb = self.lb.name().as_str();
        netns.ip(veth_pair(&lb_interface, lb))?;
        self.lb.ip([
            "address",
            "add",
            &format!("{lb_address}/24"),
            "dev",
            &lb_interface,
        ])?;
        self.lb.ip(["link", "set", &lb_interface, "up"])?;
        netns.ip(["address", "add", &format!("{address}/24"), "dev", "eth0"])?;
        netns.ip(["link", "set", "eth0", "up"])?;
        netns.ip(["route", "add", "default", "via", &lb_address.to_string()])?;
        set_offloads(&netns)?;
        Ok(Backend {
            name: format!("backend{number}"),
            netns,
            address,
            lb_interface,
            lb_address,
        })
    }

    fn enable_forwarding(&self) -> anyhow::Result<()> {
        self.lb.sysctl("net.ipv4.ip_forward", "1")?;
        self.lb.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        Ok(())
    }

    /// The lb namespace's interfaces lb-user attaches to: the public one, then one per backend.
    pub fn lb_interfaces(&self) -> Vec<String> {
        let backends = self
            .backends
            .iter()
            .map(|backend| backend.lb_interface.clone());
        std::iter::once(PUBLIC_INTERFACE.to_string())
            .chain(backends)
            .collect()
    }

    /// The names of every namespace of the topology.
    pub fn netns_names(&self) -> Vec<NetnsName> {
        let backends = self
            .backends
            .iter()
            .map(|backend| backend.netns.name().clone());
        [self.client.name().clone(), self.lb.name().clone()]
            .into_iter()
            .chain(backends)
            .collect()
    }

    pub fn backend(&self, name: &str) -> anyhow::Result<&Backend> {
        self.backends
            .iter()
            .find(|backend| backend.name == name)
            .with_context(|| format!("the topology has no backend called {name}"))
    }

    /// The demo's service: HTTP on the VIP, port 80, balanced over both backends, with health
    /// checks fast enough for tests (every 500 ms, rise 2, fall 2).
    pub fn demo_service(&self) -> ServiceConfig {
        ServiceConfig {
            name: "web".to_string(),
            vip: VIP.to_string(),
            port: SERVICE_PORT,
            protocol: "tcp".to_string(),
            scheduler: None,
            health_check: HealthCheck::fast_http(),
            backends: self
                .backends
                .iter()
                .map(|backend| (backend.address.to_string(), SERVICE_PORT))
                .collect(),
        }
    }

    /// Whether an XDP program is attached to `interface` in the lb namespace.
    pub fn xdp_attached(&self, interface: &str) -> anyhow::Result<bool> {
        let details = self.lb.ip(["-d", "link", "show", "dev", interface])?;
        Ok(details.contains("prog/xdp")
            || details
                .split_whitespace()
                .any(|word| word.starts_with("xdp")))
    }

    /// Deletes every namespace (and with them the veth pairs), reporting all errors.
    pub fn shutdown(self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        let namespaces = [self.client, self.lb]
            .into_iter()
            .chain(self.backends.into_iter().map(|backend| backend.netns));
        for netns in namespaces {
            if let Err(error) = netns.shutdown() {
                errors.push(format!("{error:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("tearing down the topology: {}", errors.join("; "))
        }
    }
}

/// Arguments for `ip -n A` creating `eth0` in A with its peer `peer` directly in namespace
/// `peer_netns`: neither end ever exists in the host namespace.
fn veth_pair<'a>(peer: &'a str, peer_netns: &'a str) -> [&'a str; 10] {
    [
        "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", peer_netns,
    ]
}

/// Frames that XDP redirects or transmits into a veth are delivered only if the receiving peer
/// has an XDP program or GRO on; otherwise they vanish while the sender counts them as sent.
///
/// Transmit checksum offload goes off too, so that hosts send complete checksums as a packet
/// from a physical wire has. With it on, a veth hands XDP a partial checksum (the pseudo-header
/// sum only) that nothing completes after XDP_REDIRECT.
/// FIXME(#5): handle partial checksums in the datapath and run these tests with offload on.
fn set_offloads(netns: &Netns) -> anyhow::Result<()> {
    netns
        .exec(["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])
        .with_context(|| {
            format!(
                "enabling GRO, disabling tx offload on eth0 in {}",
                netns.name()
            )
        })?;
    Ok(())
}
