//! The datapath's maps as the control plane sees them: a [`Dataplane`] trait, the real XDP
//! implementation on aya, and an in-memory one for tests that need no kernel.
//!
//! Each address family has its own service, VIP-address, endpoint and flow maps (`SERVICES`
//! and `SERVICES6`, ...); the trait takes keys that say their family ([`AnyServiceKey`],
//! [`AnyEndpointKey`], [`IpAddr`]), so callers write one code path for both and the map is
//! chosen here. Backends, schedules, ports and counters are shared by both families.

use std::{collections::HashMap as StdHashMap, net::IpAddr, path::Path};

use crate::{neighbours::WantedNeighbours, topology};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    counter, Backend, Endpoint, Endpoint6, EndpointKey, EndpointKey6, Flow, FlowKey, FlowKey6,
    Fragment, FragmentKey, FragmentKey6, Service, ServiceKey, ServiceKey6, Settings, TrafficStats,
    VipProtocol, VipProtocol6,
};

/// A service's key in its family's map: `SERVICES` for IPv4, `SERVICES6` for IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyServiceKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

/// A (VIP, protocol) in its family's map of 3-tuple services: `THREE_TUPLE_SERVICES` or
/// `THREE_TUPLE_SERVICES6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnyVipProtocol {
    V4(VipProtocol),
    V6(VipProtocol6),
}

impl AnyVipProtocol {
    /// The (VIP, protocol) of a service.
    pub fn of(service: &AnyServiceKey) -> Self {
        match service {
            AnyServiceKey::V4(key) => AnyVipProtocol::V4(vip_protocol(key)),
            AnyServiceKey::V6(key) => AnyVipProtocol::V6(vip_protocol(key)),
        }
    }
}

/// The (VIP, protocol) of a service key of either family.
fn vip_protocol<A: Copy>(service: &ServiceKey<A>) -> VipProtocol<A> {
    VipProtocol {
        addr: service.addr,
        protocol: service.protocol,
        _pad: [0; 3],
    }
}

/// A backend endpoint's key in its family's map: `ENDPOINTS` or `ENDPOINTS6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnyEndpointKey {
    V4(EndpointKey),
    V6(EndpointKey6),
}

/// An `ENDPOINTS` or `ENDPOINTS6` value in one shape for both families: the service address
/// in 16 bytes, IPv4 in the first four (as `Backend::addr` holds it). Written to the map of its
/// key's family, narrowed there for IPv4; so a value cannot be of the other family than its key.
pub type WideEndpoint = Endpoint<[u8; 16]>;

/// A flow-table entry of either family, as `lb-user flows` reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyFlowKey {
    V4(FlowKey),
    V6(FlowKey6),
}

impl AnyFlowKey {
    /// The client's address and port.
    pub fn client(&self) -> std::net::SocketAddr {
        match self {
            AnyFlowKey::V4(key) => (IpAddr::from(key.src_addr), u16::from_be_bytes(key.src_port)),
            AnyFlowKey::V6(key) => (IpAddr::from(key.src_addr), u16::from_be_bytes(key.src_port)),
        }
        .into()
    }

    /// The IP protocol number.
    pub fn protocol(&self) -> u8 {
        match self {
            AnyFlowKey::V4(key) => key.protocol,
            AnyFlowKey::V6(key) => key.protocol,
        }
    }
}

/// The IPv4 form of a wide endpoint value: its service address's first four bytes.
fn narrow_endpoint(endpoint: &WideEndpoint) -> Endpoint {
    let [a, b, c, d, ..] = endpoint.service_addr;
    Endpoint {
        service_addr: [a, b, c, d],
        service_port: endpoint.service_port,
        shared: endpoint.shared,
        _pad: endpoint._pad,
        service_id: endpoint.service_id,
    }
}

/// The XDP object built by `build.rs` from `lb-ebpf`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The name of the XDP entry point in the object.
pub const PROGRAM_NAME: &str = "balancer";
/// The IPv6 datapath: programs tail-called through the `PROGRAMS` map, each from its slot.
/// The main program calls the IPv6 parser, which calls the transport, the ICMPv6 or the
/// later-fragment program.
pub const IPV6_PROGRAMS: [(&str, u32); 4] = [
    ("balancer6", 0),
    ("balancer6_transport", 1),
    ("balancer6_icmp", 2),
    ("balancer6_fragment", 3),
];
/// The tc egress program translating replies the kernel forwards (backends behind a bridge).
pub const EGRESS_PROGRAM_NAME: &str = "reply_egress";
/// A trivial XDP_TX program in the same object: the floor benchmarks compare against.
pub const FLOOR_PROGRAM_NAME: &str = "floor";

/// Sizes chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Entries in each flow table and each reverse-translation table (both families).
    pub flow_table_size: u32,
    /// Entries in `REVERSE_FLOWS`, `FLOWS6` and `REVERSE_FLOWS6` instead, when only the IPv4
    /// flow table needs `flow_table_size`: the benchmark, which fills that one table with
    /// millions of IPv4 flows, keeps the other three at the default. `None` sizes all four
    /// alike (lb-user).
    pub other_flow_tables_size: Option<u32>,
    /// Entries in the fragment table.
    pub fragment_table_size: u32,
    /// Entries in the shared scheduling table (see `services::ServiceTable::schedule_size_for`).
    pub schedule_size: u32,
    /// The program will be attached in generic (skb) mode, where the sk_buff and its checksum
    /// state survive XDP_TX and XDP_REDIRECT: partial checksums are then left for the kernel
    /// to complete instead of being completed in XDP (see lb-ebpf's `partial.rs`).
    pub generic_xdp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: lb_common::FLOW_TABLE_SIZE,
            other_flow_tables_size: None,
            fragment_table_size: lb_common::FRAGMENT_TABLE_SIZE,
            schedule_size: lb_common::SCHEDULE_SIZE,
            generic_xdp: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP program into the kernel failed (verifier log saved to {log_path}): {cause}")]
    Load {
        log_path: String,
        cause: ProgramError,
    },
    #[error(transparent)]
    Object(#[from] aya::EbpfError),
    #[error("the BPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {map}: {cause}")]
    Map {
        map: &'static str,
        cause: aya::maps::MapError,
    },
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error("map {map}: counting the CPUs to write a per-CPU value for: {cause}")]
    Cpus {
        map: &'static str,
        cause: std::io::Error,
    },
    #[error(
        "the loaded datapath has no IPv6 maps ({map} missing): this build balances IPv4 only, \
         so it cannot take IPv6 services"
    )]
    NoIpv6 { map: &'static str },
}

/// Maps an update or removal error of map `map`.
fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |cause| DataplaneError::Map { map, cause }
}

/// Removal that treats an absent key as done. aya reports a hash map's absent key as the
/// delete syscall's ENOENT, not as `KeyNotFound`: both count.
fn removed(
    map: &'static str,
    result: Result<(), aya::maps::MapError>,
) -> Result<(), DataplaneError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(cause) => Err(DataplaneError::Map { map, cause }),
    }
}

/// One zeroed `TrafficStats` per possible CPU, to reset a per-CPU counter slot with.
fn zeroed_stats(map: &'static str) -> Result<PerCpuValues<TrafficStats>, DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, cause)| DataplaneError::Cpus { map, cause })?;
    PerCpuValues::try_from(vec![TrafficStats::default(); cpus])
        .map_err(|cause| DataplaneError::Cpus { map, cause })
}

/// What the control plane writes to and reads from the datapath.
pub trait Dataplane {
    fn set_service(&mut self, key: AnyServiceKey, service: &Service) -> Result<(), DataplaneError>;
    fn remove_service(&mut self, key: AnyServiceKey) -> Result<(), DataplaneError>;
    /// Writes `entries` into `SCHEDULE` from `offset` on.
    fn set_schedule(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataplaneError>;
    fn set_settings(&mut self, settings: &Settings) -> Result<(), DataplaneError>;
    fn set_endpoint(
        &mut self,
        key: AnyEndpointKey,
        endpoint: &WideEndpoint,
    ) -> Result<(), DataplaneError>;
    fn remove_endpoint(&mut self, key: AnyEndpointKey) -> Result<(), DataplaneError>;
    /// Replaces the bitmap of service and backend ports.
    fn set_ports(&mut self, bitmap: &lb_common::PortBitmap) -> Result<(), DataplaneError>;
    fn remove_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError>;
    fn add_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError>;
    /// Names `service` the `maglev_key = "3-tuple"` service of its (vip, protocol), where later
    /// fragments without a tracking entry go.
    fn set_three_tuple_service(&mut self, service: AnyServiceKey) -> Result<(), DataplaneError>;
    fn remove_three_tuple_service(&mut self, key: AnyVipProtocol) -> Result<(), DataplaneError>;
    /// Global counters, summed over CPUs, indexed by `lb_common::counter`.
    fn counters(&self) -> Result<Vec<u64>, DataplaneError>;
    fn service_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError>;
    fn backend_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError>;
    /// Zeroes service `id`'s counters, for a service that takes over the id.
    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Zeroes backend `id`'s counters, for a backend that takes over the id.
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
}

/// The program `$name` of type `$kind` in `$ebpf`, loaded through the verifier on first use.
/// A macro because each program type has its own inherent `load`.
macro_rules! loaded_program {
    ($ebpf:expr, $kind:ty, $name:expr) => {{
        let program: &mut $kind = $ebpf
            .program_mut($name)
            .ok_or(DataplaneError::Missing {
                kind: "program",
                name: $name,
            })?
            .try_into()
            .map_err(DataplaneError::Program)?;
        if program.fd().is_err() {
            program.load().map_err(DataplaneError::Program)?;
        }
        Ok(program)
    }};
}

/// One thing [`XdpDataplane::reconcile`] did, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceChange {
    pub message: String,
    /// Worth a warning (an interface went, was recreated, or could not be attached to), not
    /// routine.
    pub warning: bool,
}

impl InterfaceChange {
    fn warning(message: String) -> Self {
        Self {
            message,
            warning: true,
        }
    }
}

/// The loaded XDP program and its maps.
pub struct XdpDataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    vip_addresses: HashMap<MapData, [u8; 4], u32>,
    backends: Array<MapData, Backend>,
    schedule: Array<MapData, u32>,
    settings: Array<MapData, Settings>,
    ports: Array<MapData, lb_common::PortBitmap>,
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    /// `None` when the object has no IPv6 maps (see [`Ipv6Maps`]).
    ipv6: Option<Ipv6Maps>,
    flows: HashMap<MapData, FlowKey, Flow>,
    fragments: HashMap<MapData, FragmentKey, Fragment>,
    three_tuple_services: HashMap<MapData, VipProtocol, ServiceKey>,
    counters: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// The tail-call table holding the IPv6 program. Kept open: the kernel empties a program
    /// array when its last user-space reference goes.
    _programs: ProgramArray<MapData>,
    attached: Vec<Attachment>,
    /// Interfaces with the tc egress program, their index then, and its links.
    egress: Vec<(String, u32, aya::programs::tc::SchedClassifierLinkId)>,
    /// Interfaces the tc egress program belongs on but could not be attached to yet.
    egress_wanted: Vec<String>,
}

impl XdpDataplane {
    /// Loads the program through the verifier. Nothing is attached yet. When the verifier
    /// refuses, its log is written to `verifier_log` as well as carried in the error.
    pub fn load(verifier_log: &Path) -> Result<Self, DataplaneError> {
        Self::load_with(verifier_log, &LoadOptions::default())
    }

    /// [`Self::load`] with sizes other than the defaults.
    pub fn load_with(verifier_log: &Path, options: &LoadOptions) -> Result<Self, DataplaneError> {
        let others = options
            .other_flow_tables_size
            .unwrap_or(options.flow_table_size);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS", options.flow_table_size)
            .map_max_entries("REVERSE_FLOWS", others)
            .map_max_entries("FLOWS6", others)
            .map_max_entries("REVERSE_FLOWS6", others)
            .map_max_entries("FRAGMENTS", options.fragment_table_size)
            .map_max_entries("FRAGMENTS6", options.fragment_table_size)
            .map_max_entries("SCHEDULE", options.schedule_size)
            .override_global("GENERIC_XDP", &u8::from(options.generic_xdp), true)
            .load(PROGRAM_OBJECT)?;
        load_checked(&mut ebpf, PROGRAM_NAME, verifier_log)?;
        // The IPv6 path is programs of their own, which the main one tail-calls.
        for (name, _) in IPV6_PROGRAMS {
            load_checked(&mut ebpf, name, verifier_log)?;
        }
        let mut programs: ProgramArray<MapData> =
            take_map(&mut ebpf, "PROGRAMS", ProgramArray::try_from)?;
        for (name, index) in IPV6_PROGRAMS {
            let program: &Xdp = ebpf
                .program(name)
                .ok_or(DataplaneError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(DataplaneError::Program)?;
            let fd = program.fd().map_err(DataplaneError::Program)?;
            programs
                .set(index, fd, 0)
                .map_err(|cause| DataplaneError::Map {
                    map: "PROGRAMS",
                    cause,
                })?;
        }
        Ok(Self {
            _programs: programs,
            services: take_map(&mut ebpf, "SERVICES", HashMap::try_from)?,
            vip_addresses: take_map(&mut ebpf, "VIP_ADDRESSES", HashMap::try_from)?,
            backends: take_map(&mut ebpf, "BACKENDS", Array::try_from)?,
            schedule: take_map(&mut ebpf, "SCHEDULE", Array::try_from)?,
            settings: take_map(&mut ebpf, "SETTINGS", Array::try_from)?,
            ports: take_map(&mut ebpf, "PORTS", Array::try_from)?,
            endpoints: take_map(&mut ebpf, "ENDPOINTS", HashMap::try_from)?,
            ipv6: Ipv6Maps::take(&mut ebpf)?,
            flows: take_map(&mut ebpf, "FLOWS", HashMap::try_from)?,
            fragments: take_map(&mut ebpf, "FRAGMENTS", HashMap::try_from)?,
            three_tuple_services: take_map(&mut ebpf, "THREE_TUPLE_SERVICES", HashMap::try_from)?,
            counters: take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?,
            service_stats: take_map(&mut ebpf, "SERVICE_STATS", PerCpuArray::try_from)?,
            backend_stats: take_map(&mut ebpf, "BACKEND_STATS", PerCpuArray::try_from)?,
            ebpf,
            attached: Vec::new(),
            egress: Vec::new(),
            egress_wanted: Vec::new(),
        })
    }

    /// Attaches the program to `interface`. The link is a BPF link owned by this process: if
    /// the process dies, the kernel detaches the program and the interface works as before.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), ProgramError> {
        let ifindex = topology::interface_index(interface);
        let link = xdp_program(&mut self.ebpf)
            .map_err(|_| ProgramError::NotLoaded)?
            .attach(interface, mode)?;
        self.attached.push(Attachment {
            interface: interface.to_string(),
            ifindex,
            link,
        });
        Ok(())
    }

    /// Attaches the reply-translating tc program to `interface`'s egress. On this kernel
    /// (6.6 and later) aya attaches through TCX, a BPF link owned by this process, which the
    /// kernel removes when the process exits, like the XDP links. Does nothing if it is there.
    pub fn attach_egress(&mut self, interface: &str) -> Result<(), DataplaneError> {
        if self.egress.iter().any(|(name, _, _)| name == interface) {
            return Ok(());
        }
        let ifindex = topology::interface_index(interface);
        let link = self
            .egress_program()?
            .attach(interface, TcAttachType::Egress)
            .map_err(DataplaneError::Program)?;
        self.egress.push((interface.to_string(), ifindex, link));
        Ok(())
    }

    /// The tc egress program, loaded on first use, for `BPF_PROG_TEST_RUN` in tests.
    pub fn egress_program(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        loaded_program!(self.ebpf, SchedClassifier, EGRESS_PROGRAM_NAME)
    }

    /// Interfaces the tc egress program is attached to.
    pub fn egress_interfaces(&self) -> Vec<String> {
        self.egress
            .iter()
            .map(|(name, _, _)| name.clone())
            .collect()
    }

    /// Interfaces the program is attached to, in attach order.
    pub fn attached_interfaces(&self) -> Vec<String> {
        self.attached
            .iter()
            .map(|attachment| attachment.interface.clone())
            .collect()
    }

    /// Makes sure the program is attached to every interface in `wanted` as it exists now. An
    /// interface deleted and created again (a container's veth after a restart) has a new
    /// index and no program: its stale link is dropped and the program attached anew. An
    /// interface that does not exist at the moment is left for a later call. Returns what was
    /// done, for the log: attaching to an interface for the first time is routine (a reload
    /// routed a backend through it); everything else is a warning.
    pub fn reconcile(&mut self, wanted: &[String], mode: XdpMode) -> Vec<InterfaceChange> {
        let mut changes = Vec::new();
        for interface in wanted {
            let current = topology::interface_index(interface);
            let position = self.attached.iter().position(|a| a.interface == *interface);
            if let Some(position) = position {
                if self.attached[position].ifindex == current {
                    continue;
                }
                let stale = self.attached.remove(position);
                // The device it was attached to is gone; dropping the link just frees it.
                if let Ok(program) = xdp_program(&mut self.ebpf) {
                    if let Err(error) = program.detach(stale.link) {
                        tracing::debug!("dropping the stale link of {interface}: {error}");
                    }
                }
                if current == 0 {
                    changes.push(InterfaceChange::warning(format!("interface {interface} is gone; its traffic is not balanced until it returns")));
                    continue;
                }
            } else if current == 0 {
                continue;
            }
            let again = if position.is_some() { " again" } else { "" };
            match self.attach(interface, mode) {
                Ok(()) => changes.push(InterfaceChange {
                    message: format!(
                        "attached XDP program to {interface}{again} (ifindex {current})"
                    ),
                    warning: position.is_some(),
                }),
                Err(error) => changes.push(InterfaceChange::warning(format!(
                    "attaching XDP to {interface} failed: {error}"
                ))),
            }
        }
        changes.extend(
            self.reconcile_egress()
                .into_iter()
                .map(InterfaceChange::warning),
        );
        changes
    }

    /// Re-attaches the tc egress program where its interface was deleted and created again:
    /// the program went with the old device. An interface that is gone for now is retried on
    /// the next call.
    fn reconcile_egress(&mut self) -> Vec<String> {
        let mut changes = Vec::new();
        let mut position = 0;
        while position < self.egress.len() {
            let (name, ifindex, _) = &self.egress[position];
            let current = topology::interface_index(name);
            if current == *ifindex {
                position += 1;
                continue;
            }
            let (interface, _, link) = self.egress.remove(position);
            if let Some(program) = self.ebpf.program_mut(EGRESS_PROGRAM_NAME) {
                if let Ok(program) = <&mut SchedClassifier>::try_from(program) {
                    if let Err(error) = program.detach(link) {
                        tracing::debug!("dropping the stale tc link of {interface}: {error}");
                    }
                }
            }
            if current == 0 {
                changes.push(format!(
                    "interface {interface} is gone; replies of backends behind a bridge are not \
                     translated until it returns"
                ));
                self.egress_wanted.push(interface);
                continue;
            }
            match self.attach_egress(&interface) {
                Ok(()) => changes.push(format!("re-attached the tc egress program to {interface}")),
                Err(error) => {
                    changes.push(format!(
                        "re-attaching tc egress to {interface} failed: {error}"
                    ));
                    self.egress_wanted.push(interface);
                }
            }
            // `remove` moved the next entry to `position`; the re-attached one went to the end,
            // where its fresh index will match.
        }
        // Interfaces that were gone: attach as soon as they are back.
        for interface in std::mem::take(&mut self.egress_wanted) {
            if topology::interface_index(&interface) == 0 {
                self.egress_wanted.push(interface);
                continue;
            }
            match self.attach_egress(&interface) {
                Ok(()) => changes.push(format!(
                    "attached the tc egress program to {interface} again"
                )),
                Err(error) => {
                    changes.push(format!(
                        "attaching tc egress to {interface} failed: {error}"
                    ));
                    self.egress_wanted.push(interface);
                }
            }
        }
        changes
    }

    /// Detaches from every interface, last attached first. Returns the interfaces that could
    /// not be detached (the kernel still drops the link when the process exits).
    pub fn detach_all(&mut self) -> Vec<(String, ProgramError)> {
        let mut failures = Vec::new();
        while let Some((interface, _, link)) = self.egress.pop() {
            let result = self
                .ebpf
                .program_mut(EGRESS_PROGRAM_NAME)
                .ok_or(ProgramError::NotLoaded)
                .and_then(<&mut SchedClassifier>::try_from)
                .and_then(|program| program.detach(link));
            match result {
                Ok(()) => tracing::info!("detached tc egress program from {interface}"),
                Err(error) => failures.push((interface, error)),
            }
        }
        while let Some(Attachment {
            interface, link, ..
        }) = self.attached.pop()
        {
            let result = xdp_program(&mut self.ebpf)
                .map_err(|_| ProgramError::NotLoaded)
                .and_then(|program| program.detach(link));
            match result {
                Ok(()) => tracing::info!("detached XDP program from {interface}"),
                Err(error) => failures.push((interface, error)),
            }
        }
        failures
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf)
    }

    /// The trivial XDP_TX program, loaded on first use, for benchmarks' floor.
    pub fn floor_program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        loaded_program!(self.ebpf, Xdp, FLOOR_PROGRAM_NAME)
    }

    /// Every entry of the IPv4 flow table, expired ones included. Entries that vanish while
    /// the table is walked (LRU eviction) are skipped.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>, DataplaneError> {
        Ok(self.flows.iter().filter_map(Result::ok).collect())
    }

    /// The IPv4 flow table's descriptor, for tools that work on it with raw `bpf(2)` calls
    /// (the benchmark's wrapper deletes an entry before each timed run).
    pub fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        self.flows.map().fd().as_fd()
    }

    /// Every entry of both flow tables (`FLOWS`, then `FLOWS6`), as [`Self::flows`] reads them.
    pub fn all_flows(&self) -> Result<Vec<(AnyFlowKey, Flow)>, DataplaneError> {
        let v4 = self.flows.iter().filter_map(Result::ok);
        let v6 = self
            .ipv6
            .iter()
            .flat_map(|maps| maps.flows.iter().filter_map(Result::ok));
        Ok(v4
            .map(|(key, flow)| (AnyFlowKey::V4(key), flow))
            .chain(v6.map(|(key, flow)| (AnyFlowKey::V6(key), flow)))
            .collect())
    }

    /// Removes the entries of both fragment tables (`FRAGMENTS`, `FRAGMENTS6`) older than
    /// `timeout_ns` at `now_ns` (the datapath's coarse CLOCK_MONOTONIC): a later fragment could
    /// no longer use them, and the tables are plain hashes that do not evict, so without this
    /// they fill up. Returns how many went.
    pub fn sweep_fragments(
        &mut self,
        now_ns: u64,
        timeout_ns: u64,
    ) -> Result<usize, DataplaneError> {
        let mut swept = sweep("FRAGMENTS", &mut self.fragments, now_ns, timeout_ns)?;
        if let Some(maps) = &mut self.ipv6 {
            swept += sweep("FRAGMENTS6", &mut maps.fragments, now_ns, timeout_ns)?;
        }
        Ok(swept)
    }

    /// Every entry of the IPv4 fragment table, for tests.
    pub fn fragments(&self) -> Vec<(FragmentKey, Fragment)> {
        self.fragments.iter().filter_map(Result::ok).collect()
    }

    /// Every entry of the IPv6 fragment table (none without the IPv6 maps), for tests.
    pub fn fragments6(&self) -> Vec<(FragmentKey6, Fragment)> {
        self.ipv6
            .iter()
            .flat_map(|maps| maps.fragments.iter().filter_map(Result::ok))
            .collect()
    }

    /// Whether the loaded datapath has the IPv6 maps, and so can take IPv6 services.
    pub fn supports_ipv6(&self) -> bool {
        self.ipv6.is_some()
    }

    /// The IPv6 maps, or the error that names `map` as missing.
    fn ipv6_maps(&mut self, map: &'static str) -> Result<&mut Ipv6Maps, DataplaneError> {
        self.ipv6.as_mut().ok_or(DataplaneError::NoIpv6 { map })
    }

    /// The datapath's requests for neighbour resolution, for [`crate::neighbours::spawn`]; an
    /// error the second time (the map is handed over, not shared).
    pub fn take_wanted_neighbours(&mut self) -> Result<WantedNeighbours, DataplaneError> {
        take_map(&mut self.ebpf, "NEIGHBOURS_WANTED", HashMap::try_from).map(WantedNeighbours::new)
    }

    /// Any map by name that `load` did not take over (the reverse table, cursors), for tests.
    pub fn map_mut(&mut self, name: &str) -> Option<&mut aya::maps::Map> {
        self.ebpf.map_mut(name)
    }
}

impl Drop for XdpDataplane {
    fn drop(&mut self) {
        for (interface, error) in self.detach_all() {
            tracing::warn!("detaching XDP program from {interface}: {error}");
        }
    }
}

/// The IPv6 twins of the per-family maps that userspace writes or reads. A datapath may be
/// built without them (main keeps them out until the IPv6 datapath lands, so that unused IPv6
/// flow tables preallocate no kernel memory): lb-user then runs IPv4 services only and refuses
/// IPv6 ones by name (see `daemon.rs`).
struct Ipv6Maps {
    services: HashMap<MapData, ServiceKey6, Service>,
    vip_addresses: HashMap<MapData, [u8; 16], u32>,
    endpoints: HashMap<MapData, EndpointKey6, Endpoint6>,
    flows: HashMap<MapData, FlowKey6, Flow>,
    fragments: HashMap<MapData, FragmentKey6, Fragment>,
    three_tuple_services: HashMap<MapData, VipProtocol6, ServiceKey6>,
}

impl Ipv6Maps {
    /// Takes the IPv6 maps out of `ebpf`, or `None` if it has none (`SERVICES6` absent); an
    /// object with some but not all of them is an error.
    fn take(ebpf: &mut Ebpf) -> Result<Option<Self>, DataplaneError> {
        if ebpf.map("SERVICES6").is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            services: take_map(ebpf, "SERVICES6", HashMap::try_from)?,
            vip_addresses: take_map(ebpf, "VIP_ADDRESSES6", HashMap::try_from)?,
            endpoints: take_map(ebpf, "ENDPOINTS6", HashMap::try_from)?,
            flows: take_map(ebpf, "FLOWS6", HashMap::try_from)?,
            fragments: take_map(ebpf, "FRAGMENTS6", HashMap::try_from)?,
            three_tuple_services: take_map(ebpf, "THREE_TUPLE_SERVICES6", HashMap::try_from)?,
        }))
    }
}

/// Removes the entries of the fragment table `map` created more than `timeout_ns` before
/// `now_ns`; returns how many.
fn sweep<K: aya::Pod>(
    name: &'static str,
    map: &mut HashMap<MapData, K, Fragment>,
    now_ns: u64,
    timeout_ns: u64,
) -> Result<usize, DataplaneError> {
    let expired: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| now_ns.saturating_sub(entry.created_ns) > timeout_ns)
        .map(|(key, _)| key)
        .collect();
    for key in &expired {
        // Replaced or removed meanwhile: a new first fragment's entry stays anyway.
        removed(name, map.remove(key))?;
    }
    Ok(expired.len())
}

/// The program on one interface, as it was when attached.
struct Attachment {
    interface: String,
    /// The interface's index at attach time; a different index now means it was recreated.
    ifindex: u32,
    link: aya::programs::xdp::XdpLinkId,
}

/// Loads one XDP program of the object through the verifier; when it refuses, its log is
/// written to `verifier_log` (the IPv6 program's beside it, with `.ipv6` appended).
fn load_checked(
    ebpf: &mut Ebpf,
    name: &'static str,
    verifier_log: &Path,
) -> Result<(), DataplaneError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(DataplaneError::Program)?;
    let Err(error) = program.load() else {
        return Ok(());
    };
    let log_file = if name == PROGRAM_NAME {
        verifier_log.to_path_buf()
    } else {
        let mut path = verifier_log.as_os_str().to_owned();
        path.push(".");
        path.push(name);
        path.into()
    };
    let log_path = log_file.display().to_string();
    if let ProgramError::LoadError {
        verifier_log: log, ..
    } = &error
    {
        if let Err(write_error) = std::fs::write(&log_file, log.to_string()) {
            tracing::warn!("could not save the verifier log to {log_path}: {write_error}");
        }
    }
    Err(DataplaneError::Load {
        log_path,
        cause: error,
    })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name: PROGRAM_NAME,
        })?
        .try_into()
        .map_err(DataplaneError::Program)
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    convert(map).map_err(|source| DataplaneError::Map {
        map: name,
        cause: source,
    })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads (and the coarse variant
/// the datapath's timestamps come from, a jiffy behind at most).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given and cannot fail for
    // CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn sum_stats(values: PerCpuValues<TrafficStats>) -> TrafficStats {
    values
        .iter()
        .fold(TrafficStats::default(), |total, cpu| TrafficStats {
            packets: total.packets + cpu.packets,
            bytes: total.bytes + cpu.bytes,
            new_flows: total.new_flows + cpu.new_flows,
            reply_packets: total.reply_packets + cpu.reply_packets,
            reply_bytes: total.reply_bytes + cpu.reply_bytes,
            rescheduled: total.rescheduled + cpu.rescheduled,
        })
}

impl Dataplane for XdpDataplane {
    fn set_endpoint(
        &mut self,
        key: AnyEndpointKey,
        endpoint: &WideEndpoint,
    ) -> Result<(), DataplaneError> {
        match key {
            AnyEndpointKey::V4(key) => self
                .endpoints
                .insert(key, narrow_endpoint(endpoint), 0)
                .map_err(map_error("ENDPOINTS")),
            AnyEndpointKey::V6(key) => self
                .ipv6_maps("ENDPOINTS6")?
                .endpoints
                .insert(key, endpoint, 0)
                .map_err(map_error("ENDPOINTS6")),
        }
    }

    fn remove_endpoint(&mut self, key: AnyEndpointKey) -> Result<(), DataplaneError> {
        match key {
            AnyEndpointKey::V4(key) => removed("ENDPOINTS", self.endpoints.remove(&key)),
            AnyEndpointKey::V6(key) => {
                let maps = self.ipv6_maps("ENDPOINTS6")?;
                removed("ENDPOINTS6", maps.endpoints.remove(&key))
            }
        }
    }

    fn remove_service(&mut self, key: AnyServiceKey) -> Result<(), DataplaneError> {
        match key {
            AnyServiceKey::V4(key) => removed("SERVICES", self.services.remove(&key)),
            AnyServiceKey::V6(key) => {
                let maps = self.ipv6_maps("SERVICES6")?;
                removed("SERVICES6", maps.services.remove(&key))
            }
        }
    }

    fn set_schedule(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataplaneError> {
        for (position, id) in entries.iter().enumerate() {
            self.schedule
                .set(offset + position as u32, id, 0)
                .map_err(|cause| DataplaneError::Map {
                    map: "SCHEDULE",
                    cause,
                })?;
        }
        Ok(())
    }

    fn set_ports(&mut self, bitmap: &lb_common::PortBitmap) -> Result<(), DataplaneError> {
        self.ports
            .set(0, bitmap, 0)
            .map_err(|cause| DataplaneError::Map {
                map: "PORTS",
                cause,
            })
    }

    fn set_settings(&mut self, settings: &Settings) -> Result<(), DataplaneError> {
        self.settings
            .set(0, settings, 0)
            .map_err(|cause| DataplaneError::Map {
                map: "SETTINGS",
                cause,
            })
    }

    fn remove_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(addr) => removed("VIP_ADDRESSES", self.vip_addresses.remove(&addr.octets())),
            IpAddr::V6(addr) => {
                let maps = self.ipv6_maps("VIP_ADDRESSES6")?;
                removed("VIP_ADDRESSES6", maps.vip_addresses.remove(&addr.octets()))
            }
        }
    }

    fn set_service(&mut self, key: AnyServiceKey, service: &Service) -> Result<(), DataplaneError> {
        match key {
            AnyServiceKey::V4(key) => self
                .services
                .insert(key, service, 0)
                .map_err(map_error("SERVICES")),
            AnyServiceKey::V6(key) => self
                .ipv6_maps("SERVICES6")?
                .services
                .insert(key, service, 0)
                .map_err(map_error("SERVICES6")),
        }
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(|source| DataplaneError::Map {
                map: "BACKENDS",
                cause: source,
            })
    }

    fn add_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(addr) => self
                .vip_addresses
                .insert(addr.octets(), 1, 0)
                .map_err(map_error("VIP_ADDRESSES")),
            IpAddr::V6(addr) => self
                .ipv6_maps("VIP_ADDRESSES6")?
                .vip_addresses
                .insert(addr.octets(), 1, 0)
                .map_err(map_error("VIP_ADDRESSES6")),
        }
    }

    fn set_three_tuple_service(&mut self, service: AnyServiceKey) -> Result<(), DataplaneError> {
        match service {
            AnyServiceKey::V4(service) => self
                .three_tuple_services
                .insert(vip_protocol(&service), service, 0)
                .map_err(map_error("THREE_TUPLE_SERVICES")),
            AnyServiceKey::V6(service) => self
                .ipv6_maps("THREE_TUPLE_SERVICES6")?
                .three_tuple_services
                .insert(vip_protocol(&service), service, 0)
                .map_err(map_error("THREE_TUPLE_SERVICES6")),
        }
    }

    fn remove_three_tuple_service(&mut self, key: AnyVipProtocol) -> Result<(), DataplaneError> {
        match key {
            AnyVipProtocol::V4(key) => removed(
                "THREE_TUPLE_SERVICES",
                self.three_tuple_services.remove(&key),
            ),
            AnyVipProtocol::V6(key) => {
                let maps = self.ipv6_maps("THREE_TUPLE_SERVICES6")?;
                removed(
                    "THREE_TUPLE_SERVICES6",
                    maps.three_tuple_services.remove(&key),
                )
            }
        }
    }

    fn counters(&self) -> Result<Vec<u64>, DataplaneError> {
        (0..counter::COUNT)
            .map(|index| {
                self.counters
                    .get(&index, 0)
                    .map(|values| values.iter().sum())
                    .map_err(|source| DataplaneError::Map {
                        map: "COUNTERS",
                        cause: source,
                    })
            })
            .collect()
    }

    fn service_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError> {
        self.service_stats
            .get(&id, 0)
            .map(sum_stats)
            .map_err(|source| DataplaneError::Map {
                map: "SERVICE_STATS",
                cause: source,
            })
    }

    fn backend_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError> {
        self.backend_stats
            .get(&id, 0)
            .map(sum_stats)
            .map_err(|source| DataplaneError::Map {
                map: "BACKEND_STATS",
                cause: source,
            })
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zeroes = zeroed_stats("SERVICE_STATS")?;
        self.service_stats
            .set(id, zeroes, 0)
            .map_err(map_error("SERVICE_STATS"))
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zeroes = zeroed_stats("BACKEND_STATS")?;
        self.backend_stats
            .set(id, zeroes, 0)
            .map_err(map_error("BACKEND_STATS"))
    }
}

/// A dataplane that only remembers what it was told, for control-plane tests without a kernel.
#[derive(Clone, Debug, Default)]
pub struct MemoryDataplane {
    pub services: StdHashMap<AnyServiceKey, Service>,
    pub schedule: StdHashMap<u32, u32>,
    pub settings: Option<Settings>,
    /// The port bitmap, once written.
    pub ports: Option<lb_common::PortBitmap>,
    pub endpoints: StdHashMap<AnyEndpointKey, WideEndpoint>,
    pub backends: StdHashMap<u32, Backend>,
    /// Both families' VIP addresses (`VIP_ADDRESSES` and `VIP_ADDRESSES6`), in insertion order.
    pub vip_addresses: Vec<IpAddr>,
    pub three_tuple_services: StdHashMap<AnyVipProtocol, AnyServiceKey>,
    /// Per-service and per-backend counters (absent: zero), as the datapath would count them.
    pub service_stats: StdHashMap<u32, TrafficStats>,
    pub backend_stats: StdHashMap<u32, TrafficStats>,
    /// Every VIP address removal asked for, present or not, in order.
    pub vip_removals: Vec<IpAddr>,
    /// How many writes happened, to check that unchanged state is not rewritten.
    pub writes: usize,
    /// How many `set_schedule` calls there were, and how many entries they wrote in all: what
    /// a kernel map would have cost in syscalls.
    pub schedule_writes: usize,
    pub schedule_entries: usize,
    /// Fail the write that would be number `fail_at` (counting from 1, as `writes` does),
    /// once: a kernel refusing one update midway. Cleared by the failure unless
    /// `keep_failing`, which fails every write from then on.
    pub fail_at: Option<usize>,
    pub keep_failing: bool,
}

impl MemoryDataplane {
    /// Counts a write, or fails it as [`Self::fail_at`] says (nothing is written then).
    fn write(&mut self) -> Result<(), DataplaneError> {
        if self.fail_at.is_some_and(|at| self.writes + 1 >= at) {
            if !self.keep_failing {
                self.fail_at = None;
            }
            return Err(DataplaneError::Map {
                map: "MEMORY",
                cause: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
                }),
            });
        }
        self.writes += 1;
        Ok(())
    }

    /// The table the datapath would read for the service under `key`.
    pub fn table(&self, key: &AnyServiceKey) -> Vec<u32> {
        let service = &self.services[key];
        (0..service.table_len)
            .map(|slot| self.schedule[&(service.table_offset + slot)])
            .collect()
    }
}

impl Dataplane for MemoryDataplane {
    fn set_endpoint(
        &mut self,
        key: AnyEndpointKey,
        endpoint: &WideEndpoint,
    ) -> Result<(), DataplaneError> {
        self.write()?;
        self.endpoints.insert(key, *endpoint);
        Ok(())
    }

    fn remove_endpoint(&mut self, key: AnyEndpointKey) -> Result<(), DataplaneError> {
        self.write()?;
        self.endpoints.remove(&key);
        Ok(())
    }

    fn remove_service(&mut self, key: AnyServiceKey) -> Result<(), DataplaneError> {
        self.write()?;
        self.services.remove(&key);
        Ok(())
    }

    fn set_schedule(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataplaneError> {
        self.write()?;
        self.schedule_writes += 1;
        self.schedule_entries += entries.len();
        for (position, id) in entries.iter().enumerate() {
            self.schedule.insert(offset + position as u32, *id);
        }
        Ok(())
    }

    fn set_ports(&mut self, bitmap: &lb_common::PortBitmap) -> Result<(), DataplaneError> {
        self.write()?;
        self.ports = Some(*bitmap);
        Ok(())
    }

    fn set_settings(&mut self, settings: &Settings) -> Result<(), DataplaneError> {
        self.write()?;
        self.settings = Some(*settings);
        Ok(())
    }

    fn remove_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.write()?;
        self.vip_removals.push(addr);
        self.vip_addresses.retain(|known| *known != addr);
        Ok(())
    }

    fn set_service(&mut self, key: AnyServiceKey, service: &Service) -> Result<(), DataplaneError> {
        self.write()?;
        self.services.insert(key, *service);
        Ok(())
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.write()?;
        self.backends.insert(id, *backend);
        Ok(())
    }

    fn add_vip_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.write()?;
        if !self.vip_addresses.contains(&addr) {
            self.vip_addresses.push(addr);
        }
        Ok(())
    }

    fn set_three_tuple_service(&mut self, service: AnyServiceKey) -> Result<(), DataplaneError> {
        self.write()?;
        self.three_tuple_services
            .insert(AnyVipProtocol::of(&service), service);
        Ok(())
    }

    fn remove_three_tuple_service(&mut self, key: AnyVipProtocol) -> Result<(), DataplaneError> {
        self.write()?;
        self.three_tuple_services.remove(&key);
        Ok(())
    }

    fn counters(&self) -> Result<Vec<u64>, DataplaneError> {
        Ok(vec![0; counter::COUNT as usize])
    }

    fn service_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError> {
        Ok(self.service_stats.get(&id).copied().unwrap_or_default())
    }

    fn backend_stats(&self, id: u32) -> Result<TrafficStats, DataplaneError> {
        Ok(self.backend_stats.get(&id).copied().unwrap_or_default())
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.service_stats.remove(&id);
        Ok(())
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.backend_stats.remove(&id);
        Ok(())
    }
}
