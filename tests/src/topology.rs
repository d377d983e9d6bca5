//! The testbed's topologies: a client, the load balancer and its backends, each in its own
//! namespace, wired in one of the four ways operators put backends (see [`Layout`]).
//!
//! Every layout shares the client side: the client's `eth0` at 10.200.1.2/24 talks to the VIP,
//! 10.200.1.1, the lb namespace's address on `lbpub`, its default gateway. They differ in how
//! the lb namespace reaches the backends:
//!
//! ```text
//! point to point (Topology::demo)         each backend behind its own veth
//!  client eth0 10.200.1.2 ---- lbpub 10.200.1.1 [lb]
//!                              lbb1  10.200.11.1 ----------------- eth0 10.200.11.2  backend1
//!                              lbb2  10.200.12.1 ----------------- eth0 10.200.12.2  backend2
//!
//! bridge (Topology::bridge)               Docker's default network, without Docker
//!  client eth0 10.200.1.2 ---- lbpub 10.200.1.1 [lb]
//!                              br0   10.200.20.1 -+- lbb1 ------- eth0 10.200.20.2  backend1
//!                                                 +- lbb2 ------- eth0 10.200.20.3  backend2
//!
//! routed (Topology::routed)               backends one router away
//!  client eth0 10.200.1.2 ---- lbpub 10.200.1.1 [lb]
//!                              lbr0  10.200.30.1 --- eth0 10.200.30.2 [router]
//!                                                    br0  10.200.31.1 -+- rb1 --- eth0 .31.2
//!                                                                      +- rb2 --- eth0 .31.3
//!
//! one-armed (Topology::one_armed)         everything on one switched segment
//!  client eth0 10.200.1.2 ---- to-client -+
//!  [lb] lbpub 10.200.1.1  ---- to-lb     -+- br0 [switch]
//!             10.200.40.1                 +- to-backend1 ---- eth0 10.200.40.2  backend1
//!                                         +- to-backend2 ---- eth0 10.200.40.3  backend2
//! ```
//!
//! Every backend's default route points at the load balancer (through the router, when there
//! is one), so its replies come back through it; lb-user asks for nothing else of the backends.
//!
//! Dual stack: every namespace has an IPv6 address beside each IPv4 one, all inside
//! fd00:200::/64 (the one IPv6 range the tests may use), in /112 subnets that mirror the IPv4
//! ones: the third byte of the IPv4 address becomes the seventh group, written with the same
//! digits, and the host byte the last group. So the client is fd00:200::1:2, the IPv6 VIP
//! fd00:200::1:1 ([`VIP6`]), point-to-point backend1 fd00:200::11:2 behind fd00:200::11:1,
//! bridge backends fd00:200::20:2 and ::20:3, routed ones fd00:200::31:2 and ::31:3 behind
//! the router's fd00:200::30:2, one-armed ones fd00:200::40:2 and ::40:3. Addresses are added
//! `nodad` and every namespace has `accept_dad` off, so they are usable at once; IPv6
//! forwarding is on only in the lb and router namespaces, as IPv4 forwarding is.
//!
//! Offloads (see [`Offloads`]), set only where a veth stands in for something a physical wire
//! does differently:
//!
//! - Transmit checksum offload stays on, the kernel's default, as in containers: the senders'
//!   frames reach XDP with partial checksums (the pseudo-header sum only), which the datapath
//!   completes (issue 5). [`Offloads::sender_tx_checksum`] off turns it off on the devices
//!   whose frames XDP receives, so that XDP sees complete checksums as from a wire: the
//!   client's `eth0` (point to point, bridge, routed), the router's `eth0` (routed), the
//!   switch's `to-lb` (one-armed), and the backends' `eth0` only point to point. A partial
//!   checksum survives forwarding over veths and bridges, so in the routed and one-armed
//!   layouts it is the last hop before XDP that sends it, not the backend.
//! - A veth that XDP_REDIRECT sends into needs GRO (or an XDP program) on its peer: the
//!   client's `eth0` (point to point, routed), the router's `eth0` (routed), the backends'
//!   `eth0` (point to point; [`Offloads::backend_peer`] picks which, or neither).
//! - A veth that XDP_TX sends out of needs an XDP program on its peer; GRO is not enough (see
//!   [`crate::xdp_pass`]): the switch's `to-lb` (one-armed) carries an XDP_PASS program.
//! - Bridge: nothing. XDP translates the client's packets and hands them to the kernel, which
//!   forwards them into the bridge; replies leave through the kernel and a tc egress program,
//!   both of which handle partial checksums. The backends keep every default, as a container
//!   does.
//!
//! Bridge backends get MAC addresses derived from their IPv4 address (02:42 and the four bytes,
//! Docker's scheme): a backend whose link is recreated (a container restart) keeps its MAC, so
//! the load balancer's neighbour entry stays right. With a fresh MAC, and the bridge still up
//! through its other ports, the kernel keeps sending to the old one until its neighbour entry
//! expires, 30 to 45 s.
//!
//! More backends can be wired with [`Topology::add_backend`], for tests that add a backend to a
//! running balancer.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context};

use crate::config::{HealthCheck, ServiceConfig};
use crate::netns::{Netns, NetnsName};
use crate::process::unique_name;
use crate::xdp_pass::XdpPass;

/// The load balancer's public interface, in the lb namespace.
pub const PUBLIC_INTERFACE: &str = "lbpub";
/// The service address: the lb namespace's address on [`PUBLIC_INTERFACE`].
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The client's address on its `eth0`.
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// The IPv6 service address: the lb namespace's IPv6 address on [`PUBLIC_INTERFACE`].
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0x1, 0x1);
/// The client's IPv6 address on its `eth0`.
pub const CLIENT_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0x1, 0x2);
/// Prefix length of every IPv6 subnet of the testbed (carved out of fd00:200::/64).
const PREFIX6: u8 = 112;
/// The port the demo service and the backends' nginx listen on.
pub const SERVICE_PORT: u16 = 80;
/// The port of the stand-in for the operator's SSH, on the VIP, not a service.
pub const SSH_PORT: u16 = 22;

/// The bridge in the lb namespace (bridge layout), the router (routed) or the switch (one-armed).
const BRIDGE: &str = "br0";
/// The bridge's own MAC address, set explicitly as Docker does for docker0: a bridge left to
/// itself takes its lowest port's address, and changes it when that port goes.
const BRIDGE_MAC: &str = "02:42:0a:c8:14:01";
/// The bridge layout's backend network, br0's address on it, and the prefix length.
const BRIDGE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 20, 1);
/// The routed layout: the lb namespace's link to the router, and the router's end of it.
const ROUTER_LINK: &str = "lbr0";
const LB_ROUTER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 30, 1);
const ROUTER_LB_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 30, 2);
/// The routed layout's backend network behind the router, and the router's address on it.
const ROUTED_NETWORK: &str = "10.200.31.0/24";
const ROUTER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 31, 1);
/// The one-armed layout: the lb's second address on `lbpub`, the backends' gateway.
const ONE_ARMED_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 40, 1);
/// The switch's port towards the load balancer (one-armed).
const SWITCH_LB_PORT: &str = "to-lb";

/// How the testbed sets the veths that hand frames to XDP and take frames from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Transmit checksum offload on the senders whose frames XDP receives: on (the kernel's
    /// default) they send partial checksums, off complete ones.
    pub sender_tx_checksum: bool,
    /// What lets the point-to-point backends' `eth0` receive redirected frames.
    pub backend_peer: PeerState,
}

impl Default for Offloads {
    /// Senders as the kernel leaves them, backends' ends with GRO.
    fn default() -> Self {
        Self {
            sender_tx_checksum: true,
            backend_peer: PeerState::Gro,
        }
    }
}

/// The state of a veth end that XDP_REDIRECT sends into from the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// GRO on, no XDP program.
    Gro,
    /// An XDP_PASS program ([`crate::xdp_pass`]), GRO off.
    XdpProgram,
    /// Neither: the kernel reports no ndo-xmit for the other end, and redirects into it are
    /// lost.
    Neither,
}

/// How the load balancer reaches its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each backend behind its own veth from the lb namespace: XDP_REDIRECT into its link.
    PointToPoint,
    /// Backends on a Linux bridge in the lb namespace (Docker's default network): XDP
    /// translates and the kernel forwards; a tc egress program translates the replies.
    Bridge,
    /// Backends one router away: XDP_REDIRECT into the link towards the router.
    Routed,
    /// Client, load balancer and backends on one switched segment: XDP_TX back out of
    /// `lbpub`.
    OneArmed,
}

impl Layout {
    /// The datapath counters this layout's traffic moves (at least once per request), and
    /// those of the other layouts' paths, which it must leave at zero.
    pub fn path_counters(self) -> (&'static [&'static str], &'static [&'static str]) {
        const ALL: [&str; 6] = [
            "pass_kernel_forward",
            "reply_egress",
            "forward_redirect",
            "reply_redirect",
            "forward_tx",
            "reply_tx",
        ];
        match self {
            Self::Bridge => (&ALL[0..2], &ALL[2..6]),
            Self::PointToPoint | Self::Routed => (&ALL[2..4], &[ALL[0], ALL[1], ALL[4], ALL[5]]),
            Self::OneArmed => (&ALL[4..6], &ALL[0..4]),
        }
    }

    /// The name tests and the demo print: `point-to-point`, `bridge`, `routed`, `one-armed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PointToPoint => "point-to-point",
            Self::Bridge => "bridge",
            Self::Routed => "routed",
            Self::OneArmed => "one-armed",
        }
    }
}

/// One backend: its namespace, its address, and how the load balancer reaches it.
#[derive(Debug)]
pub struct Backend {
    /// What the backend's nginx answers with, and what the tests call it: `backend1`.
    pub name: String,
    pub netns: Netns,
    /// The backend's address on its `eth0`.
    pub address: Ipv4Addr,
    /// The backend's IPv6 address on its `eth0`.
    pub address6: Ipv6Addr,
    /// The lb namespace's interface the backend is routed through: `lbb1` (point to point),
    /// `br0` (bridge), `lbr0` (routed), `lbpub` (one-armed).
    pub lb_interface: String,
    /// The lb namespace's address on that interface: the source of its health probes.
    pub lb_address: Ipv4Addr,
    /// The lb namespace's IPv6 address on that interface.
    pub lb_address6: Ipv6Addr,
    /// The other end of the backend's `eth0`: `lbb1` in the lb namespace (point to point,
    /// bridge), `rb1` in the router (routed), `to-backend1` in the switch (one-armed).
    pub peer: String,
    /// The namespace [`Backend::peer`] is in.
    pub peer_netns: NetnsName,
    number: u8,
    /// The XDP_PASS program on its `eth0` ([`PeerState::XdpProgram`], point to point).
    program: Option<XdpPass>,
}

/// The namespaces and links of one topology; deleting it deletes them all.
#[derive(Debug)]
pub struct Topology {
    pub layout: Layout,
    pub client: Netns,
    pub lb: Netns,
    /// The router between the lb namespace and the backends (routed layout only).
    pub router: Option<Netns>,
    /// The switch every namespace hangs off (one-armed layout only).
    pub switch: Option<Netns>,
    pub backends: Vec<Backend>,
    /// The XDP_PASS program on the switch's port towards `lbpub` (one-armed layout only).
    switch_port_program: Option<XdpPass>,
    /// The unique prefix of every namespace name, for backends added later.
    prefix: String,
    offloads: Offloads,
}

impl Topology {
    /// The point-to-point topology with two backends (the demo's before it moved to the
    /// bridge; kept under this name for the tests that use it).
    pub fn demo() -> anyhow::Result<Self> {
        Self::build(Layout::PointToPoint)
    }

    /// Two backends behind a bridge in the lb namespace.
    pub fn bridge() -> anyhow::Result<Self> {
        Self::build(Layout::Bridge)
    }

    /// Two backends behind a router namespace.
    pub fn routed() -> anyhow::Result<Self> {
        Self::build(Layout::Routed)
    }

    /// Client, lb and two backends on one switched segment.
    pub fn one_armed() -> anyhow::Result<Self> {
        Self::build(Layout::OneArmed)
    }

    /// Builds `layout` with two backends in freshly named namespaces (`lbt<pid>x<n>c`, `...l`,
    /// `...r`, `...s`, `...b1`), with the default [`Offloads`]. On error, whatever was already
    /// built is deleted.
    pub fn build(layout: Layout) -> anyhow::Result<Self> {
        Self::build_with(layout, Offloads::default())
    }

    /// [`Topology::build`] with the given offloads.
    pub fn build_with(layout: Layout, offloads: Offloads) -> anyhow::Result<Self> {
        let prefix = unique_name();
        let client = create_netns(&format!("{prefix}c"))?;
        let lb = create_netns(&format!("{prefix}l"))?;
        let router = match layout {
            Layout::Routed => Some(create_netns(&format!("{prefix}r"))?),
            _ => None,
        };
        let switch = match layout {
            Layout::OneArmed => Some(create_netns(&format!("{prefix}s"))?),
            _ => None,
        };
        let mut topology = Self {
            layout,
            client,
            lb,
            router,
            switch,
            backends: Vec::new(),
            switch_port_program: None,
            prefix,
            offloads,
        };
        topology
            .connect_client()
            .context("connecting the client namespace")?;
        topology
            .build_backend_side()
            .with_context(|| format!("building the {} backend side", layout.name()))?;
        for _ in 1..=2 {
            topology.add_backend()?;
        }
        topology
            .enable_forwarding()
            .context("enabling forwarding")?;
        Ok(topology)
    }

    /// The client's `eth0` and the lb's `lbpub`: a veth between them, or, one-armed, both
    /// plugged into the switch.
    fn connect_client(&mut self) -> anyhow::Result<()> {
        if self.layout == Layout::OneArmed {
            let switch = self.switch()?.name().clone();
            switch.ip(["link", "add", BRIDGE, "type", "bridge"])?;
            switch.ip(["link", "set", BRIDGE, "up"])?;
            plug_into_switch(&switch, self.client.name(), "eth0", "to-client")?;
            self.configure_client()?;
        }
        self.link_public()
    }

    /// Creates `lbpub` and configures it: one end of a veth whose other end is the client's
    /// `eth0` (configured too), or, one-armed, a port of the switch.
    fn link_public(&mut self) -> anyhow::Result<()> {
        let vip = format!("{VIP}/24");
        if self.layout == Layout::OneArmed {
            let switch = self.switch()?.name().clone();
            plug_into_switch(&switch, self.lb.name(), PUBLIC_INTERFACE, SWITCH_LB_PORT)?;
            let gateway = format!("{ONE_ARMED_GATEWAY}/24");
            self.lb
                .ip(["address", "add", &vip, "dev", PUBLIC_INTERFACE])?;
            self.lb
                .ip(["address", "add", &gateway, "dev", PUBLIC_INTERFACE])?;
            add_address6(self.lb.name(), VIP6, PUBLIC_INTERFACE)?;
            add_address6(self.lb.name(), ipv6_like(40, 1), PUBLIC_INTERFACE)?;
            self.lb.ip(["link", "set", PUBLIC_INTERFACE, "up"])?;
            // XDP on lbpub sees whatever to-lb transmits, and XDP_TX sends back into it.
            ethtool(&switch, SWITCH_LB_PORT, &self.sender_settings(&[]))?;
            self.switch_port_program = Some(XdpPass::attach(&switch, SWITCH_LB_PORT)?);
            return Ok(());
        }
        let lb = self.lb.name().as_str();
        self.client
            .ip(veth_pair("eth0", None, PUBLIC_INTERFACE, lb))?;
        self.lb
            .ip(["address", "add", &vip, "dev", PUBLIC_INTERFACE])?;
        add_address6(self.lb.name(), VIP6, PUBLIC_INTERFACE)?;
        self.lb.ip(["link", "set", PUBLIC_INTERFACE, "up"])?;
        self.configure_client()?;
        // Replies are redirected into lbpub unless they leave through the kernel (bridge).
        let gro: &[&str] = match self.layout {
            Layout::Bridge => &[],
            _ => &["gro", "on"],
        };
        ethtool(self.client.name(), "eth0", &self.sender_settings(gro))
    }

    /// `settings` for a veth whose frames XDP receives, with transmit checksum offload off if
    /// the offloads say so.
    fn sender_settings<'a>(&self, settings: &[&'a str]) -> Vec<&'a str> {
        let mut settings = settings.to_vec();
        if !self.offloads.sender_tx_checksum {
            settings.extend(["tx", "off"]);
        }
        settings
    }

    fn configure_client(&self) -> anyhow::Result<()> {
        let client_address = format!("{CLIENT_ADDRESS}/24");
        self.client
            .ip(["address", "add", &client_address, "dev", "eth0"])?;
        add_address6(self.client.name(), CLIENT_ADDRESS6, "eth0")?;
        self.client.ip(["link", "set", "eth0", "up"])?;
        self.client
            .ip(["route", "add", "default", "via", &VIP.to_string()])?;
        self.client
            .ip(["-6", "route", "add", "default", "via", &VIP6.to_string()])?;
        Ok(())
    }

    /// Deletes `lbpub` and creates it again under the same name, as recreating the load
    /// balancer's container link (or reloading a NIC driver) does.
    pub fn restart_public_link(&mut self) -> anyhow::Result<()> {
        // Its interface goes with lbpub (one-armed).
        self.switch_port_program = None;
        self.lb
            .ip(["link", "delete", PUBLIC_INTERFACE])
            .context("deleting lbpub")?;
        self.link_public().context("recreating lbpub")
    }

    /// What the backends hang off, before any backend: br0 in the lb namespace (bridge), or
    /// the router with its link to the lb namespace and its own bridge (routed).
    fn build_backend_side(&self) -> anyhow::Result<()> {
        match self.layout {
            Layout::PointToPoint | Layout::OneArmed => Ok(()),
            Layout::Bridge => {
                self.lb.ip([
                    "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
                ])?;
                let gateway = format!("{BRIDGE_GATEWAY}/24");
                self.lb.ip(["address", "add", &gateway, "dev", BRIDGE])?;
                add_address6(self.lb.name(), ipv6_like(20, 1), BRIDGE)?;
                self.lb.ip(["link", "set", BRIDGE, "up"])?;
                Ok(())
            }
            Layout::Routed => {
                let router = self.router()?;
                let lb = self.lb.name().as_str();
                router.ip(veth_pair("eth0", None, ROUTER_LINK, lb))?;
                let lb_side = format!("{LB_ROUTER_SIDE}/24");
                self.lb
                    .ip(["address", "add", &lb_side, "dev", ROUTER_LINK])?;
                add_address6(self.lb.name(), ipv6_like(30, 1), ROUTER_LINK)?;
                self.lb.ip(["link", "set", ROUTER_LINK, "up"])?;
                let router_side = format!("{ROUTER_LB_SIDE}/24");
                router.ip(["address", "add", &router_side, "dev", "eth0"])?;
                add_address6(router.name(), ipv6_like(30, 2), "eth0")?;
                router.ip(["link", "set", "eth0", "up"])?;
                // Forwards are redirected into lbr0; XDP on lbr0 sees what eth0 transmits.
                ethtool(router.name(), "eth0", &self.sender_settings(&["gro", "on"]))?;
                router.ip(["link", "add", BRIDGE, "type", "bridge"])?;
                let gateway = format!("{ROUTER_GATEWAY}/24");
                router.ip(["address", "add", &gateway, "dev", BRIDGE])?;
                add_address6(router.name(), ipv6_like(31, 1), BRIDGE)?;
                router.ip(["link", "set", BRIDGE, "up"])?;
                // Replies to clients go back through the load balancer.
                router.ip([
                    "route",
                    "add",
                    "default",
                    "via",
                    &LB_ROUTER_SIDE.to_string(),
                ])?;
                self.lb.ip([
                    "route",
                    "add",
                    ROUTED_NETWORK,
                    "via",
                    &ROUTER_LB_SIDE.to_string(),
                ])?;
                router.ip([
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &ipv6_like(30, 1).to_string(),
                ])?;
                let routed6 = format!("{}/{PREFIX6}", ipv6_like(31, 0));
                self.lb.ip([
                    "-6",
                    "route",
                    "add",
                    &routed6,
                    "via",
                    &ipv6_like(30, 2).to_string(),
                ])?;
                Ok(())
            }
        }
    }

    /// Wires one more backend, `backend<n>` in namespace `...b<n>`, with the next address of
    /// the layout's backend network (point to point: a network of its own, 10.200.(10+n).0/24).
    /// Adding it to a running lb-user's configuration is up to the caller (rewrite the file,
    /// then reload).
    pub fn add_backend(&mut self) -> anyhow::Result<&Backend> {
        // Point to point uses 10.200.(10 + n).0/24, the others 10.200.x.(1 + n): 245 keeps
        // both within a byte.
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
        let netns = create_netns(&format!("{}b{number}", self.prefix))?;
        let plan = self.plan(number)?;
        let program = self.link_backend(&netns, &plan)?;
        Ok(Backend {
            name: format!("backend{number}"),
            netns,
            address: plan.address,
            address6: plan.address6(),
            lb_address6: plan.lb_address6(),
            lb_interface: plan.lb_interface,
            lb_address: plan.lb_address,
            peer: plan.peer,
            peer_netns: plan.peer_netns,
            number,
            program,
        })
    }

    /// Where backend `number` goes in this layout.
    fn plan(&self, number: u8) -> anyhow::Result<BackendPlan> {
        let plan = match self.layout {
            Layout::PointToPoint => BackendPlan {
                address: Ipv4Addr::new(10, 200, 10 + number, 2),
                gateway: Ipv4Addr::new(10, 200, 10 + number, 1),
                lb_interface: format!("lbb{number}"),
                lb_address: Ipv4Addr::new(10, 200, 10 + number, 1),
                peer: format!("lbb{number}"),
                peer_netns: self.lb.name().clone(),
            },
            Layout::Bridge => BackendPlan {
                address: Ipv4Addr::new(10, 200, 20, 1 + number),
                gateway: BRIDGE_GATEWAY,
                lb_interface: BRIDGE.to_string(),
                lb_address: BRIDGE_GATEWAY,
                peer: format!("lbb{number}"),
                peer_netns: self.lb.name().clone(),
            },
            Layout::Routed => BackendPlan {
                address: Ipv4Addr::new(10, 200, 31, 1 + number),
                gateway: ROUTER_GATEWAY,
                lb_interface: ROUTER_LINK.to_string(),
                lb_address: LB_ROUTER_SIDE,
                peer: format!("rb{number}"),
                peer_netns: self.router()?.name().clone(),
            },
            Layout::OneArmed => BackendPlan {
                address: Ipv4Addr::new(10, 200, 40, 1 + number),
                gateway: ONE_ARMED_GATEWAY,
                lb_interface: PUBLIC_INTERFACE.to_string(),
                lb_address: ONE_ARMED_GATEWAY,
                peer: format!("to-backend{number}"),
                peer_netns: self.switch()?.name().clone(),
            },
        };
        Ok(plan)
    }

    /// Creates the backend's `eth0` and its peer, and configures both ends; returns the XDP
    /// program put on `eth0`, if the offloads ask for one.
    fn link_backend(&self, netns: &Netns, plan: &BackendPlan) -> anyhow::Result<Option<XdpPass>> {
        let mac = (self.layout == Layout::Bridge).then(|| docker_mac(plan.address));
        netns.ip(veth_pair(
            "eth0",
            mac.as_deref(),
            &plan.peer,
            plan.peer_netns.as_str(),
        ))?;
        let peer_netns = &plan.peer_netns;
        match self.layout {
            Layout::PointToPoint => {
                let lb_side = format!("{}/24", plan.lb_address);
                peer_netns.ip(["address", "add", &lb_side, "dev", &plan.peer])?;
            }
            Layout::Bridge | Layout::Routed | Layout::OneArmed => {
                peer_netns.ip(["link", "set", &plan.peer, "master", BRIDGE])?;
            }
        }
        peer_netns.ip(["link", "set", &plan.peer, "up"])?;
        if self.layout == Layout::PointToPoint {
            add_address6(peer_netns, plan.lb_address6(), &plan.peer)?;
        }
        let address = format!("{}/24", plan.address);
        netns.ip(["address", "add", &address, "dev", "eth0"])?;
        add_address6(netns.name(), plan.address6(), "eth0")?;
        netns.ip(["link", "set", "eth0", "up"])?;
        netns.ip(["route", "add", "default", "via", &plan.gateway.to_string()])?;
        netns.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &plan.gateway6().to_string(),
        ])?;
        if self.layout != Layout::PointToPoint {
            return Ok(None);
        }
        // XDP redirects into lbbN, and sees what eth0 transmits.
        let gro = match self.offloads.backend_peer {
            PeerState::Gro => "on",
            PeerState::XdpProgram | PeerState::Neither => "off",
        };
        ethtool(netns.name(), "eth0", &self.sender_settings(&["gro", gro]))?;
        match self.offloads.backend_peer {
            PeerState::XdpProgram => Ok(Some(XdpPass::attach(netns.name(), "eth0")?)),
            PeerState::Gro | PeerState::Neither => Ok(None),
        }
    }

    /// Turns GRO on or off on a point-to-point backend's `eth0`, at run time: off (and without
    /// an XDP program) its peer in the lb namespace can no longer take XDP redirects.
    pub fn set_backend_gro(&self, name: &str, on: bool) -> anyhow::Result<()> {
        let backend = self.backend(name)?;
        let state = if on { "on" } else { "off" };
        ethtool(backend.netns.name(), "eth0", &["gro", state])
    }

    /// The kernel's count of TCP and UDP datagrams dropped for a bad checksum in `netns`
    /// (`InCsumErrors` of /proc/net/snmp): (TCP, UDP).
    pub fn checksum_errors(netns: &Netns) -> anyhow::Result<(u64, u64)> {
        let snmp = netns.exec(["cat", "/proc/net/snmp"])?;
        Ok((
            snmp_value(&snmp, "Tcp:", "InCsumErrors")?,
            snmp_value(&snmp, "Udp:", "InCsumErrors")?,
        ))
    }

    /// Deletes the backend's link and creates it again, as a container restart does with its
    /// veth: the peer goes away with `eth0` and comes back under the same name (and, on the
    /// bridge, the same MAC address, as Docker's are).
    pub fn restart_backend_link(&mut self, name: &str) -> anyhow::Result<()> {
        let backend = self.backend(name)?;
        backend
            .peer_netns
            .ip(["link", "delete", &backend.peer])
            .with_context(|| format!("deleting {}'s link", backend.name))?;
        let plan = self.plan(backend.number)?;
        let program = self
            .link_backend(&backend.netns, &plan)
            .with_context(|| format!("recreating {}'s link", backend.name))?;
        if let Some(backend) = self
            .backends
            .iter_mut()
            .find(|backend| backend.name == name)
        {
            backend.program = program;
        }
        Ok(())
    }

    fn enable_forwarding(&self) -> anyhow::Result<()> {
        for netns in std::iter::once(&self.lb).chain(&self.router) {
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            netns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
            // Sets every interface's too, and the default for interfaces created later.
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(())
    }

    fn router(&self) -> anyhow::Result<&Netns> {
        self.router
            .as_ref()
            .context("this topology has no router namespace")
    }

    fn switch(&self) -> anyhow::Result<&Netns> {
        self.switch
            .as_ref()
            .context("this topology has no switch namespace")
    }

    /// The lb namespace's interfaces lb-user attaches XDP to: the public one, then those
    /// backends are routed through unless they are bridges (which get no XDP program).
    pub fn lb_interfaces(&self) -> Vec<String> {
        let mut interfaces = vec![PUBLIC_INTERFACE.to_string()];
        if self.layout == Layout::Bridge {
            return interfaces;
        }
        for backend in &self.backends {
            if !interfaces.contains(&backend.lb_interface) {
                interfaces.push(backend.lb_interface.clone());
            }
        }
        interfaces
    }

    /// The names of every namespace of the topology.
    pub fn netns_names(&self) -> Vec<NetnsName> {
        let middle = self.router.iter().chain(&self.switch);
        let backends = self.backends.iter().map(|backend| &backend.netns);
        [&self.client, &self.lb]
            .into_iter()
            .chain(middle)
            .chain(backends)
            .map(|netns| netns.name().clone())
            .collect()
    }

    pub fn backend(&self, name: &str) -> anyhow::Result<&Backend> {
        self.backends
            .iter()
            .find(|backend| backend.name == name)
            .with_context(|| format!("the topology has no backend called {name}"))
    }

    /// The demo's service: HTTP on the VIP, port 80, balanced over every backend, with health
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

    /// The demo's service over IPv6: `web6`, HTTP on [`VIP6`], port 80, balanced over every
    /// backend's IPv6 address, with the same health checks as [`Topology::demo_service`].
    pub fn demo_service6(&self) -> ServiceConfig {
        ServiceConfig {
            name: "web6".to_string(),
            vip: VIP6.to_string(),
            backends: self
                .backends
                .iter()
                .map(|backend| (backend.address6.to_string(), SERVICE_PORT))
                .collect(),
            ..self.demo_service()
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

    /// One line per namespace: its role, its name and its addresses, for the demo.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{:<9} {:<14} eth0 {CLIENT_ADDRESS}/24, default via {VIP}",
            "client",
            self.client.name().as_str()
        )];
        let lb = match self.layout {
            Layout::PointToPoint => {
                let links: Vec<String> = self
                    .backends
                    .iter()
                    .map(|backend| format!("{} {}/24", backend.lb_interface, backend.lb_address))
                    .collect();
                format!("lbpub {VIP}/24 (the VIP), {}", links.join(", "))
            }
            Layout::Bridge => {
                let ports: Vec<&str> = self.backends.iter().map(|b| b.peer.as_str()).collect();
                format!(
                    "lbpub {VIP}/24 (the VIP), {BRIDGE} {BRIDGE_GATEWAY}/24 (a bridge; ports {})",
                    ports.join(", ")
                )
            }
            Layout::Routed => format!(
                "lbpub {VIP}/24 (the VIP), {ROUTER_LINK} {LB_ROUTER_SIDE}/24, \
                 route {ROUTED_NETWORK} via {ROUTER_LB_SIDE}"
            ),
            Layout::OneArmed => {
                format!("lbpub {VIP}/24 (the VIP) and {ONE_ARMED_GATEWAY}/24, on the switch")
            }
        };
        lines.push(format!("{:<9} {:<14} {lb}", "lb", self.lb.name().as_str()));
        if let Some(router) = &self.router {
            lines.push(format!(
                "{:<9} {:<14} eth0 {ROUTER_LB_SIDE}/24, {BRIDGE} {ROUTER_GATEWAY}/24, \
                 default via {LB_ROUTER_SIDE}",
                "router",
                router.name().as_str()
            ));
        }
        if let Some(switch) = &self.switch {
            lines.push(format!(
                "{:<9} {:<14} {BRIDGE} with ports to-client, {SWITCH_LB_PORT}, to-backend<n>",
                "switch",
                switch.name().as_str()
            ));
        }
        for backend in &self.backends {
            let (name, netns) = (&backend.name, backend.netns.name().as_str());
            let gateway = match self.plan(backend.number) {
                Ok(plan) => plan.gateway.to_string(),
                Err(error) => format!("({error})"),
            };
            lines.push(format!(
                "{name:<9} {netns:<14} eth0 {}/24, default via {gateway}",
                backend.address
            ));
        }
        lines
    }

    /// Deletes every namespace (and with them the links and programs), reporting all errors.
    pub fn shutdown(self) -> anyhow::Result<()> {
        drop(self.switch_port_program);
        let mut errors = Vec::new();
        let namespaces = [self.client, self.lb]
            .into_iter()
            .chain(self.router)
            .chain(self.switch)
            .chain(self.backends.into_iter().map(|backend| backend.netns));
        for netns in namespaces {
            if let Err(error) = netns.shutdown() {
                errors.push(format!("{error:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down the topology: {}", errors.join("; "))
        }
    }
}

/// Where one backend goes: its addresses, and the far end of its `eth0`.
struct BackendPlan {
    address: Ipv4Addr,
    gateway: Ipv4Addr,
    lb_interface: String,
    lb_address: Ipv4Addr,
    peer: String,
    peer_netns: NetnsName,
}

impl BackendPlan {
    // The IPv6 twins of the IPv4 addresses (see [`ipv6_of`]).

    fn address6(&self) -> Ipv6Addr {
        ipv6_of(self.address)
    }

    fn gateway6(&self) -> Ipv6Addr {
        ipv6_of(self.gateway)
    }

    fn lb_address6(&self) -> Ipv6Addr {
        ipv6_of(self.lb_address)
    }
}

/// The IPv6 address that mirrors a testbed IPv4 address 10.200.X.Y: fd00:200::X:Y, X and Y
/// written with the same decimal digits (10.200.11.2 becomes fd00:200::11:2), so the two read
/// alike in logs. Inside fd00:200::/64 by construction.
pub fn ipv6_of(address: Ipv4Addr) -> Ipv6Addr {
    let [_, _, network, host] = address.octets();
    ipv6_like(network, host)
}

/// fd00:200::`network`:`host`, each written with its decimal digits.
fn ipv6_like(network: u8, host: u8) -> Ipv6Addr {
    // Three decimal digits read as hexadecimal stay below 0x256: always a valid group.
    let group = |value: u8| u16::from_str_radix(&value.to_string(), 16).unwrap_or_default();
    Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, group(network), group(host))
}

/// A namespace whose interfaces skip IPv6 duplicate address detection: addresses (link-local
/// ones too) are usable as soon as they are added, not a second or two later.
fn create_netns(name: &str) -> anyhow::Result<Netns> {
    let netns = Netns::create(name)?;
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        netns.sysctl(key, "0")?;
    }
    Ok(netns)
}

/// Adds `address`/112 to `interface` in `netns`, without duplicate address detection.
fn add_address6(netns: &NetnsName, address: Ipv6Addr, interface: &str) -> anyhow::Result<()> {
    let address = format!("{address}/{PREFIX6}");
    netns.ip(["-6", "address", "add", &address, "dev", interface, "nodad"])?;
    Ok(())
}

/// Arguments for `ip -n A` creating `name` (with `mac`, if given) in A and its peer `peer`
/// directly in namespace `peer_netns`: neither end ever exists in the host namespace.
fn veth_pair(name: &str, mac: Option<&str>, peer: &str, peer_netns: &str) -> Vec<String> {
    let mut args = vec!["link", "add", name];
    if let Some(mac) = mac {
        args.extend(["address", mac]);
    }
    args.extend(["type", "veth", "peer", "name", peer, "netns", peer_netns]);
    args.into_iter().map(str::to_string).collect()
}

/// Creates `interface` in `netns` with its peer `port` in the switch, enslaved to its bridge.
fn plug_into_switch(
    switch: &NetnsName,
    netns: &NetnsName,
    interface: &str,
    port: &str,
) -> anyhow::Result<()> {
    netns.ip(veth_pair(interface, None, port, switch.as_str()))?;
    switch.ip(["link", "set", port, "master", BRIDGE])?;
    switch.ip(["link", "set", port, "up"])?;
    Ok(())
}

/// The MAC address Docker derives from a container's IPv4 address: 02:42 and the four bytes.
fn docker_mac(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The value of `field` in the `table` ("Tcp:", "Udp:") of /proc/net/snmp's text: a header
/// line of names, then a line of values.
fn snmp_value(snmp: &str, table: &str, field: &str) -> anyhow::Result<u64> {
    let mut lines = snmp.lines().filter(|line| line.starts_with(table));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {table} table in /proc/net/snmp: {snmp}");
    };
    let position = names
        .split_whitespace()
        .position(|name| name == field)
        .with_context(|| format!("no {field} in {names:?}"))?;
    values
        .split_whitespace()
        .nth(position)
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no number for {field} in {values:?}"))
}

/// `ethtool -K interface settings...` inside `netns`. Call it once both ends of the veth are
/// up: GRO turned on while a veth is down enables its receive queue when it comes up, but does
/// not always mark its peer as able to take redirected frames (seen on 6.18, depending on the
/// order the two ends came up), and every XDP_REDIRECT into the peer then fails.
fn ethtool(netns: &NetnsName, interface: &str, settings: &[&str]) -> anyhow::Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let mut args = vec!["ethtool", "-K", interface];
    args.extend_from_slice(settings);
    netns
        .exec(&args)
        .with_context(|| format!("ethtool -K {interface} {} in {netns}", settings.join(" ")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_values_are_found_by_name() {
        let snmp =
            "Tcp: RtoAlgorithm InCsumErrors\nTcp: 1 7\nUdp: InDatagrams InCsumErrors\nUdp: 5 2\n";
        assert_eq!(snmp_value(snmp, "Tcp:", "InCsumErrors").expect("tcp"), 7);
        assert_eq!(snmp_value(snmp, "Udp:", "InCsumErrors").expect("udp"), 2);
        assert!(snmp_value(snmp, "Tcp:", "Missing").is_err());
    }

    #[test]
    fn ipv6_addresses_mirror_the_ipv4_ones_inside_the_allowed_range() {
        assert_eq!(
            ipv6_of(Ipv4Addr::new(10, 200, 11, 2)).to_string(),
            "fd00:200::11:2"
        );
        assert_eq!(ipv6_of(VIP), VIP6);
        assert_eq!(ipv6_of(CLIENT_ADDRESS), CLIENT_ADDRESS6);
        for (network, host) in [(255, 255), (1, 0), (40, 247)] {
            let address = ipv6_like(network, host);
            assert_eq!(address.segments()[..4], [0xfd00, 0x200, 0, 0], "{address}");
        }
    }

    #[test]
    fn docker_macs_follow_the_address() {
        assert_eq!(
            docker_mac(Ipv4Addr::new(10, 200, 20, 2)),
            "02:42:0a:c8:14:02"
        );
    }

    #[test]
    fn veth_pairs_are_created_straight_into_the_peer_namespace() {
        assert_eq!(
            veth_pair("eth0", Some("02:42:0a:c8:14:02"), "lbb1", "lbt1x0l").join(" "),
            "link add eth0 address 02:42:0a:c8:14:02 type veth peer name lbb1 netns lbt1x0l"
        );
    }
}
