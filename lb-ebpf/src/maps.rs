//! The datapath's maps. Their layouts live in `lb-common`; `lb-user` finds them by these names.

use crate::family::Family;

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    counter, Backend, Endpoint, Endpoint6, EndpointKey, EndpointKey6, Flow, FlowKey, FlowKey6,
    Fragment, FragmentKey, FragmentKey6, NeighbourKey, NextHop, PortBitmap, ReverseNat,
    ReverseNat6, Service, ServiceKey, ServiceKey6, Settings, TrafficStats, VipProtocol,
    VipProtocol6, FLOW_TABLE_SIZE, FRAGMENT_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES,
    NEIGHBOURS_WANTED_SIZE, SCHEDULE_SIZE,
};

/// Services by (VIP, port, protocol). Not preallocated, so that replacing a value is an RCU
/// swap: a packet in flight keeps reading the old backend list, never a half-written one.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Addresses that carry at least one service, to tell a malformed packet for a VIP (dropped)
/// from one for anybody else (passed untouched). The value is unused.
#[map]
pub static VIP_ADDRESSES: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every service's scheduling table, side by side (see `lb_common::Service`). Sized by
/// `lb-user` at load.
#[map]
pub static SCHEDULE: Array<u32> = Array::with_max_entries(SCHEDULE_SIZE, 0);

/// Flow lifetimes: entry 0 only.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client-to-service 5-tuple to the backend serving that flow. Both flow tables keep an LRU
/// list per CPU (`BPF_F_NO_COMMON_LRU`): a new flow's insert takes no global lock, which is
/// most of a new flow's cost with a common list.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// Fragmented datagrams (addresses, IP ID, protocol) to where their later fragments go. A
/// plain preallocated hash, not an LRU: when it is full an insert fails, which is counted
/// (`fragment_table_full`), where an LRU would silently evict a live datagram. A new first
/// fragment with the same key replaces its entry (that needs no free element), and `lb-user`
/// sweeps timed-out entries periodically. Sized by `lb-user` at load.
#[map]
pub static FRAGMENTS: HashMap<FragmentKey, Fragment> =
    HashMap::with_max_entries(FRAGMENT_TABLE_SIZE, 0);

/// (VIP, protocol) to the key of its `maglev_key = "3-tuple"` service, if it has one: where a
/// later fragment without a tracking entry is placed. Written by `lb-user` with the services.
#[map]
pub static THREE_TUPLE_SERVICES: HashMap<VipProtocol, ServiceKey> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Backend endpoints to the service they answer for (see `lb_common::Endpoint`).
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Backend-to-client 5-tuple to the service the reply must appear to come from: only for
/// backends whose endpoint serves several services (`backend_flags::SHARED_ENDPOINT`).
#[map]
pub static REVERSE_FLOWS: LruHashMap<FlowKey, ReverseNat> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

// The IPv6 twins of the maps above, same roles and flags, keyed by 16-byte addresses. Services,
// backends, schedules, cursors, counters and settings are shared by both families: a service
// id or a backend id means the same thing in either.

#[map]
pub static SERVICES6: HashMap<ServiceKey6, Service> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub static VIP_ADDRESSES6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static FLOWS6: LruHashMap<FlowKey6, Flow> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

#[map]
pub static ENDPOINTS6: HashMap<EndpointKey6, Endpoint6> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map]
pub static REVERSE_FLOWS6: LruHashMap<FlowKey6, ReverseNat6> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

#[map]
pub static FRAGMENTS6: HashMap<FragmentKey6, Fragment> =
    HashMap::with_max_entries(FRAGMENT_TABLE_SIZE, 0);

#[map]
pub static THREE_TUPLE_SERVICES6: HashMap<VipProtocol6, ServiceKey6> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Round-robin position per service, per CPU: no atomics and no cache-line bouncing; over many
/// flows each CPU's rotation is even, so the sum is too.
#[map]
pub static RR_CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Each backend's next hop, per CPU (no torn reads of the MAC addresses, no shared writes).
#[map]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Next hops a route lookup found without a usable neighbour entry, for `lb-user` to have the
/// kernel resolve (see `route::want_neighbour`); it deletes each entry it reads.
#[map]
pub static NEIGHBOURS_WANTED: LruHashMap<NeighbourKey, u64> =
    LruHashMap::with_max_entries(NEIGHBOURS_WANTED_SIZE, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// One bit per port number (see [`PortBitmap`]): set for every service port and every backend
/// port. A TCP or UDP packet whose destination and source ports are both clear is neither for
/// a service nor a backend's reply, and passes without a hash lookup: the cost of the
/// operator's SSH and everything else on the host.
#[map]
pub static PORTS: Array<PortBitmap> = Array::with_max_entries(1, 0);

/// Programs the datapath tail-calls: `balancer` the IPv6 parser at [`PROGRAM_IPV6`], which
/// goes on to the IPv6 transport, ICMPv6 or later-fragment program. Filled by `lb-user` at
/// load.
#[map]
pub static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(4, 0);
pub const PROGRAM_IPV6: u32 = 0;
pub const PROGRAM_IPV6_TRANSPORT: u32 = 1;
pub const PROGRAM_IPV6_ICMP: u32 = 2;
pub const PROGRAM_IPV6_FRAGMENT: u32 = 3;

/// Global verdict and event counters, indexed by `lb_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other program touches it while this one runs.
        unsafe { *value += 1 };
    }
}

/// The bitmap of service and backend ports; `None` cannot happen (the array has its one entry
/// from load on), and callers then look further, to be safe.
#[inline(always)]
pub fn port_bitmap() -> Option<&'static PortBitmap> {
    PORTS.get(0)
}

/// Whether either port (network order) is a service's or a backend's port.
#[inline(always)]
pub fn either_port_in_use(first: [u8; 2], second: [u8; 2]) -> bool {
    match port_bitmap() {
        Some(bitmap) => bitmap.contains(first) || bitmap.contains(second),
        None => true,
    }
}

/// The translation for a packet from a backend to a client, if it is a reply of a balanced
/// flow: through the flow table when the backend endpoint serves one service, through the
/// reverse table when it serves several. `None` for anything else (the backend's own traffic,
/// lb-user's health probes, a flow that was moved to another backend).
#[inline(always)]
pub fn reverse_nat<F: Family>(tuple: &FlowKey<F::Addr>) -> Option<ReverseNat<F::Addr>> {
    let endpoint_key = EndpointKey {
        addr: tuple.src_addr,
        port: tuple.src_port,
        protocol: tuple.protocol,
        _pad: 0,
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    let endpoint = unsafe { F::endpoints().get(&endpoint_key) }?;
    if endpoint.shared != 0 {
        return unsafe { F::reverse_flows().get(tuple) }.copied();
    }
    let forward_key = FlowKey {
        src_addr: tuple.dst_addr,
        dst_addr: endpoint.service_addr,
        src_port: tuple.dst_port,
        dst_port: endpoint.service_port,
        protocol: tuple.protocol,
        _pad: [0; 3],
    };
    let flow = unsafe { F::flows().get(&forward_key) }?;
    let backend = BACKENDS.get(flow.backend_id)?;
    // The client's flow must be on this very backend: replies from one it was moved away
    // from are not translated.
    if F::narrow(backend.addr) != tuple.src_addr || backend.port != tuple.src_port {
        return None;
    }
    Some(ReverseNat {
        service_addr: endpoint.service_addr,
        service_port: endpoint.service_port,
        _pad: [0; 2],
        service_id: flow.service_id,
        backend_id: flow.backend_id,
    })
}
