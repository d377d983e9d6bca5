//! The map ABI shared by the XDP datapath (`lb-ebpf`) and the control plane (`lb-user`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of integers and byte arrays only, with explicit
//! padding, so that both sides agree on layout and neither reads an enum or `bool` out of a map.
//! Fields that hold network data keep network byte order as byte arrays (`[u8; 4]` addresses,
//! `[u8; 2]` ports): the datapath copies them straight from and into packets, and userspace
//! converts once, at its boundary.
//!
//! Both address families share one layout per type: the keys are generic over the address
//! (`[u8; 4]` for IPv4, the default, `[u8; 16]` for IPv6), and each family has its own maps
//! (`SERVICES` and `SERVICES6`, `FLOWS` and `FLOWS6`, ...), so an IPv4 lookup hashes a 16-byte
//! key, not a 40-byte one. Values that name a backend (`Backend`, `NextHop`) hold 16 bytes
//! for either family: an IPv4 address sits in the first four, the rest zero.
#![no_std]

/// Most services one datapath holds (the `SERVICES` hash map and per-service arrays).
pub const MAX_SERVICES: u32 = 1024;
/// Most backends over all services (the `BACKENDS` array and per-backend counters).
pub const MAX_BACKENDS: u32 = 4096;
/// Most backends in one service's scheduling list. A power of two: the datapath masks
/// indexes with `MAX_BACKENDS_PER_SERVICE - 1` so the verifier sees them bounded.
pub const MAX_BACKENDS_PER_SERVICE: usize = 256;
/// Entries in the flow table and in the reverse-translation table (LRU hash maps).
pub const FLOW_TABLE_SIZE: u32 = 262_144;
/// Default entries of the fragment table (`FRAGMENTS`); `[fragments] table_size` sets it at
/// load. An entry lives for the fragment timeout (seconds), so this holds tens of thousands of
/// fragmented datagrams per second.
pub const FRAGMENT_TABLE_SIZE: u32 = 65_536;
/// Words of the `PORTS` bitmap: one bit for each of the 65536 ports.
pub const PORT_BITMAP_WORDS: u32 = 65536 / 64;

/// The `PORTS` map's one value: bit `port % 64` of word `port / 64` is set for every service
/// port and every backend port. One value rather than a word per entry, so that the datapath
/// tests both of a packet's ports with one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBitmap {
    pub words: [u64; PORT_BITMAP_WORDS as usize],
}

impl PortBitmap {
    /// No port set.
    pub const EMPTY: Self = Self {
        words: [0; PORT_BITMAP_WORDS as usize],
    };

    /// Sets `port`'s bit.
    pub fn insert(&mut self, port: u16) {
        let (word, bit) = Self::place(port);
        self.words[word] |= bit;
    }

    /// Whether `port` (network byte order) has its bit set.
    #[inline(always)]
    pub fn contains(&self, port: [u8; 2]) -> bool {
        let (word, bit) = Self::place(u16::from_be_bytes(port));
        // `word` is below PORT_BITMAP_WORDS: `get` never misses, it only keeps the index
        // visibly bounded (for the verifier) without a panic path.
        match self.words.get(word) {
            Some(bits) => bits & bit != 0,
            None => true,
        }
    }

    /// The word holding `port`'s bit, and the bit.
    #[inline(always)]
    fn place(port: u16) -> (usize, u64) {
        (usize::from(port / 64), 1u64 << (port % 64))
    }
}
/// The longest TCP or UDP segment (header and payload) whose partial checksum the datapath
/// completes before XDP_TX or XDP_REDIRECT; a longer one goes to the kernel translated.
pub const MAX_COMPLETED_SEGMENT: usize = 3327;
/// Default entries of the shared scheduling table (`SCHEDULE`); `lb-user` sizes it at load.
pub const SCHEDULE_SIZE: u32 = 1 << 20;

/// IP protocol numbers the datapath balances.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Values of [`Backend::state`].
pub mod backend_state {
    /// Not eligible: flows pinned to it are rescheduled on their next packet.
    pub const DOWN: u8 = 0;
    /// Passed its health checks.
    pub const UP: u8 = 1;
}

/// Bits of [`Backend::flags`].
pub mod backend_flags {
    /// Reached through a device XDP cannot redirect into (a Linux bridge): client packets are
    /// translated in XDP and handed to the kernel to forward; the replies come back through the
    /// kernel too and are translated by the tc egress program on the public interface.
    pub const VIA_KERNEL: u8 = 1;
    /// Its address and port serve more than one service: replies cannot be told apart by the
    /// backend endpoint alone, so each of its flows keeps a reverse-translation entry.
    pub const SHARED_ENDPOINT: u8 = 2;
    /// An IPv6 backend: all 16 bytes of [`Backend::addr`] are its address.
    pub const IPV6: u8 = 4;
}

/// An IPv4 or IPv6 address as the wire carries it. Implemented for `[u8; 4]` and `[u8; 16]`
/// only; the types below are generic over it so each family keys its own maps.
pub trait Address: Copy + Eq + 'static {
    /// The address in the 16 bytes of [`Backend::addr`] and [`NextHop::addr`]: IPv4 in the
    /// first four, the rest zero.
    fn widen(self) -> [u8; 16];
    /// Mixes the address into a [`flow_hash`] state, 32 bits at a time.
    fn mix_into(self, hash: u32) -> u32;
    /// The sum of the address's 16-bit words (network order), unfolded: what the address
    /// adds to an Internet checksum.
    fn word_sum(self) -> u32;
}

impl Address for [u8; 4] {
    #[inline(always)]
    fn widen(self) -> [u8; 16] {
        [
            self[0], self[1], self[2], self[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]
    }

    #[inline(always)]
    fn mix_into(self, hash: u32) -> u32 {
        mix_word(hash, u32::from_be_bytes(self))
    }

    #[inline(always)]
    fn word_sum(self) -> u32 {
        u16::from_be_bytes([self[0], self[1]]) as u32
            + u16::from_be_bytes([self[2], self[3]]) as u32
    }
}

impl Address for [u8; 16] {
    #[inline(always)]
    fn widen(self) -> [u8; 16] {
        self
    }

    #[inline(always)]
    fn mix_into(self, hash: u32) -> u32 {
        let [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3] = self;
        let hash = mix_word(hash, u32::from_be_bytes([a0, a1, a2, a3]));
        let hash = mix_word(hash, u32::from_be_bytes([b0, b1, b2, b3]));
        let hash = mix_word(hash, u32::from_be_bytes([c0, c1, c2, c3]));
        mix_word(hash, u32::from_be_bytes([d0, d1, d2, d3]))
    }

    #[inline(always)]
    fn word_sum(self) -> u32 {
        // Written out: an array of words here would be built on the BPF stack.
        let word = |high: u8, low: u8| ((high as u32) << 8) | low as u32;
        let [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3] = self;
        word(a0, a1)
            + word(a2, a3)
            + word(b0, b1)
            + word(b2, b3)
            + word(c0, c1)
            + word(c2, c3)
            + word(d0, d1)
            + word(d2, d3)
    }
}

/// Values of [`Service::scheduler`]: how a new flow picks its backend from the service's
/// table in `SCHEDULE`.
pub mod scheduler {
    /// A per-CPU cursor walks the table, which lists each eligible backend once.
    pub const ROUND_ROBIN: u8 = 0;
    /// A per-CPU cursor walks the table, one period of smooth weighted round robin.
    pub const WEIGHTED: u8 = 1;
    /// The flow's hash ([`crate::flow_hash`]) indexes a Maglev table of prime size.
    pub const MAGLEV: u8 = 2;
}

/// Bits of [`Service::flags`].
pub mod service_flags {
    /// Maglev hashes (client address, VIP, protocol) with the ports zeroed instead of the
    /// 5-tuple: every flow and every fragment of a client lands on the same backend, so a later
    /// fragment that arrives before its first one can be placed without tracking
    /// (`maglev_key = "3-tuple"`).
    pub const HASH_3_TUPLE: u8 = 1;
}

/// Values of [`Flow::state`].
pub mod flow_state {
    /// Packets flow; the idle timeout of its protocol applies.
    pub const OPEN: u8 = 0;
    /// A FIN or RST was seen in either direction: the short closing timeout applies, and a new
    /// SYN on the same 5-tuple starts a fresh flow.
    pub const CLOSING: u8 = 1;
}

/// Identifies a service: the packet's destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey<A = [u8; 4]> {
    pub addr: A,
    pub port: [u8; 2],
    pub protocol: u8,
    /// Zero; keeps the key free of uninitialised bytes, which hash lookups would compare.
    pub _pad: u8,
}

/// One service and where its scheduling table lives.
///
/// The table is a slice of the shared `SCHEDULE` array: `table_len` backend ids from
/// `table_offset` on. A new table is written beside the one in use, then this value is
/// replaced: the map is created without preallocation, so an update swaps in a new element and
/// a packet in flight keeps the old one until it is done (RCU), never a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service arrays (`RR_CURSORS`, `SERVICE_STATS`).
    pub id: u32,
    /// One of [`scheduler`].
    pub scheduler: u8,
    /// Bits of [`service_flags`].
    pub flags: u8,
    /// Zero; room for more without changing the layout.
    pub _pad: [u8; 2],
    /// First entry of the service's table in `SCHEDULE`.
    pub table_offset: u32,
    /// Entries in the table; 0 means no backend can take a new flow.
    pub table_len: u32,
}

/// One backend of one service. A backend serving two services has two ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 in the first four bytes (the rest zero), or IPv6 with [`backend_flags::IPV6`].
    pub addr: [u8; 16],
    pub port: [u8; 2],
    /// One of [`backend_state`].
    pub state: u8,
    /// Bits of [`backend_flags`].
    pub flags: u8,
    pub service_id: u32,
    /// Bumped whenever this id is given to another backend, so flows pinned to the previous
    /// holder are rescheduled instead of following the id.
    pub generation: u32,
}

/// A packet's 5-tuple as it arrives at the load balancer. Keys the flow table (client to
/// service) and the reverse-translation table (backend to client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey<A = [u8; 4]> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub protocol: u8,
    /// Zero; see [`ServiceKey::_pad`].
    pub _pad: [u8; 3],
}

/// Where a flow of a service goes, and how long it lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    pub service_id: u32,
    /// The backend's [`Backend::generation`] when the flow was scheduled.
    pub generation: u32,
    /// One of [`flow_state`].
    pub state: u8,
    /// Zero; alignment of the next field.
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when a client packet last refreshed the entry.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns()` when the flow was scheduled.
    pub created_ns: u64,
}

/// Flow and fragment lifetimes, written once by `lb-user` into the one-entry `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Idle timeout of an open TCP flow.
    pub tcp_timeout_ns: u64,
    /// Lifetime of a TCP flow after a FIN or RST.
    pub tcp_closing_timeout_ns: u64,
    /// Idle timeout of a UDP flow.
    pub udp_timeout_ns: u64,
    /// How long after its first fragment a datagram's later fragments still follow it.
    pub fragment_timeout_ns: u64,
}

/// Identifies one fragmented datagram as RFC 791 and RFC 8200 do: addresses, protocol and
/// identification. Keys `FRAGMENTS` (IPv4) and `FRAGMENTS6` (`[u8; 16]`): IPv6 puts its 32-bit
/// identification and the fragment header's next header here, IPv4 zero-extends its 16-bit
/// ID, big-endian (`[0, 0, hi, lo]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey<A = [u8; 4]> {
    pub src_addr: A,
    pub dst_addr: A,
    /// The identification field, network order, zero-extended to 32 bits.
    pub id: [u8; 4],
    pub protocol: u8,
    /// Zero; see [`ServiceKey::_pad`].
    pub _pad: [u8; 3],
}

/// Where the later fragments of a datagram go: the backend its first fragment was balanced
/// to, or the kernel ([`FRAGMENT_TO_KERNEL`]) when the first fragment was not for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub backend_id: u32,
    pub service_id: u32,
    /// The backend's [`Backend::generation`] when the first fragment was balanced.
    pub generation: u32,
    /// Zero; alignment of the next field.
    pub _pad: u32,
    /// Coarse `bpf_ktime` (CLOCK_MONOTONIC) when the first fragment arrived.
    pub created_ns: u64,
}

/// [`Fragment::backend_id`] of a datagram whose first fragment went to the kernel (addressed
/// to a VIP address, but to no service): its later fragments go there too.
pub const FRAGMENT_TO_KERNEL: u32 = u32::MAX;

/// A VIP address and protocol: keys the map of services whose Maglev table hashes the
/// 3-tuple (see [`service_flags::HASH_3_TUPLE`]), where later fragments without a tracking
/// entry are placed. Generic over the address like [`FragmentKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipProtocol<A = [u8; 4]> {
    pub addr: A,
    pub protocol: u8,
    /// Zero; see [`ServiceKey::_pad`].
    pub _pad: [u8; 3],
}

/// A backend endpoint: its address, port and protocol. Keys `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey<A = [u8; 4]> {
    pub addr: A,
    pub port: [u8; 2],
    pub protocol: u8,
    /// Zero; see [`ServiceKey::_pad`].
    pub _pad: u8,
}

/// The service a backend endpoint answers for. A reply from an endpoint that serves one
/// service is translated by finding the client's flow in the flow table (the reply's
/// destination is the client, the service is this), so a new flow needs no reverse entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint<A = [u8; 4]> {
    pub service_addr: A,
    pub service_port: [u8; 2],
    /// 1 when the endpoint serves several services: look in `REVERSE_FLOWS` instead.
    pub shared: u8,
    /// Zero; alignment of the next field.
    pub _pad: u8,
    pub service_id: u32,
}

/// How to translate a backend's reply back to the service it answers for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseNat<A = [u8; 4]> {
    pub service_addr: A,
    pub service_port: [u8; 2],
    /// Zero; alignment of the next field.
    pub _pad: [u8; 2],
    pub service_id: u32,
    pub backend_id: u32,
}

/// A backend's next hop as `bpf_fib_lookup` last gave it, cached per CPU for a short time so
/// that an established flow's packet needs no route lookup. Written only by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The egress interface.
    pub ifindex: u32,
    /// The interface the lookup was made for: a packet from another one looks up afresh.
    pub ingress_ifindex: u32,
    /// Coarse `bpf_ktime` after which the entry is stale.
    pub expires_ns: u64,
    /// The destination looked up (IPv4 in the first four bytes): a backend id given to
    /// another address misses.
    pub addr: [u8; 16],
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The largest packet length (IPv4 total length, IPv6 header plus payload) the lookup
    /// accepted (its MTU check): a longer packet looks up afresh, so the kernel still gets
    /// oversized packets.
    pub ok_len: u16,
    /// Zero; keeps the size a multiple of 8.
    pub _pad: [u8; 2],
}

/// A next hop a route lookup found without a usable neighbour entry (none, incomplete or
/// failed): keys `NEIGHBOURS_WANTED`, which `lb-user` empties and asks the kernel to resolve
/// each entry of. The value is the coarse `bpf_ktime` (CLOCK_MONOTONIC) when it was wanted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighbourKey {
    /// The next hop: the route's gateway, or the destination itself when it is on-link. IPv4
    /// in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    /// The interface the next hop is reached through.
    pub ifindex: u32,
    /// The next hop's family, as `bpf_fib_lookup` has it: 2 (IPv4) or 10 (IPv6; also for an
    /// IPv4 route through an IPv6 gateway).
    pub family: u8,
    /// Zero; see [`ServiceKey::_pad`].
    pub _pad: [u8; 3],
}

/// Entries of `NEIGHBOURS_WANTED`: next hops waiting for resolution between two of lb-user's
/// reads (every 100 ms). An LRU: past this many, the least recently wanted goes.
pub const NEIGHBOURS_WANTED_SIZE: u32 = 256;

/// Per-CPU traffic counters of one service or one backend. Bytes are whole frames as XDP sees
/// them (Ethernet header included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets from clients forwarded towards a backend.
    pub packets: u64,
    pub bytes: u64,
    /// Flows scheduled (first packet of a flow, or a flow moved off a backend that went down).
    pub new_flows: u64,
    /// Replies from a backend translated back to the client.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows that had to leave their backend because it went down or was replaced.
    pub rescheduled: u64,
}

/// Indexes into the global per-CPU `COUNTERS` array, and their names.
///
/// `PASS_*` and `DROP_*` count each packet's final verdict by reason; the others count events
/// along the way and can overlap with a verdict.
pub mod counter {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// IPv4 or IPv6 but neither TCP nor UDP (ICMP, ...): passed.
    pub const PASS_NOT_TCP_UDP: u32 = 1;
    /// TCP or UDP, but not for a service and not a reply of a balanced flow: passed.
    pub const PASS_NOT_SERVICE: u32 = 2;
    /// An IPv4 fragment not addressed to a VIP, or of a datagram whose first fragment went
    /// to the kernel (addressed to a VIP address but no service): passed.
    pub const PASS_FRAGMENT: u32 = 3;
    /// Translated, but the next hop's MAC is unknown: passed so the kernel resolves it.
    pub const PASS_NEIGH_UNRESOLVED: u32 = 4;
    /// Translated, but forwarding is disabled on the ingress interface: passed.
    pub const PASS_FORWARDING_DISABLED: u32 = 5;
    /// Translated, but larger than the egress MTU: passed so the kernel can answer with ICMP.
    pub const PASS_FRAG_NEEDED: u32 = 6;
    /// Translated, but the route lookup found no usable route: passed to the kernel.
    pub const PASS_NO_ROUTE: u32 = 7;
    /// Shorter than an Ethernet header: dropped.
    pub const DROP_MALFORMED_ETHERNET: u32 = 8;
    /// IPv4 header truncated, wrong version or IHL below 5: dropped.
    pub const DROP_MALFORMED_IPV4: u32 = 9;
    /// TCP or UDP header truncated on a packet for a VIP address: dropped.
    pub const DROP_MALFORMED_L4: u32 = 10;
    /// For a service that has no backend up: dropped.
    pub const DROP_NO_BACKEND: u32 = 11;
    /// A service's state was inconsistent (a listed backend id out of range): dropped.
    pub const DROP_INTERNAL: u32 = 12;
    /// Client packets forwarded to a backend with XDP_TX (same interface).
    pub const FORWARD_TX: u32 = 13;
    /// Client packets forwarded to a backend with XDP_REDIRECT.
    pub const FORWARD_REDIRECT: u32 = 14;
    /// Replies sent back to a client with XDP_TX.
    pub const REPLY_TX: u32 = 15;
    /// Replies sent back to a client with XDP_REDIRECT.
    pub const REPLY_REDIRECT: u32 = 16;
    /// Client packets whose flow was in the flow table.
    pub const FLOW_HIT: u32 = 17;
    /// New flows that started as they should: a TCP SYN, or any UDP packet.
    pub const FLOW_MISS_NEW: u32 = 18;
    /// TCP packets other than a SYN that found no flow (the table was lost, evicted, or the
    /// flow started at another load balancer): scheduled like a new flow.
    pub const FLOW_MISS_MID_STREAM: u32 = 19;
    /// Flows moved because their backend went down or was replaced.
    pub const FLOW_RESCHEDULED: u32 = 20;
    /// Flow or reverse-translation entries that could not be stored (packet still forwarded).
    pub const FLOW_INSERT_FAILED: u32 = 21;
    /// Entries found idle past their timeout, replaced by a fresh flow.
    pub const FLOW_EXPIRED: u32 = 22;
    /// Flows that saw a FIN or RST (either direction) and now live on the closing timeout.
    pub const FLOW_CLOSING: u32 = 23;
    /// SYNs that found a closing entry for their 5-tuple (source port reuse): a fresh flow.
    pub const FLOW_PORT_REUSE: u32 = 24;

    /// A new flow whose source address is not routed back through the interface it came in
    /// on (strict reverse-path check): forged, dropped.
    pub const DROP_SPOOFED_SOURCE: u32 = 25;

    /// Client packets translated and handed to the kernel to forward (backends behind a bridge).
    pub const PASS_KERNEL_FORWARD: u32 = 26;
    /// Replies translated by the tc egress program (backends whose traffic the kernel forwards).
    pub const REPLY_EGRESS: u32 = 27;

    /// ICMP errors about a balanced flow's replies, sent on to the flow's backend.
    pub const ICMP_TO_BACKEND: u32 = 28;
    /// ICMP errors from a backend's side about a client's packet, sent on to the client.
    pub const ICMP_TO_CLIENT: u32 = 29;

    /// First fragments of a datagram for a VIP recorded in the fragment table (balanced to
    /// a backend, or passed to the kernel when for no service).
    pub const FRAGMENT_TRACKED: u32 = 30;
    /// First fragments balanced, but the fragment table was full: their later fragments will
    /// be orphans (or follow the 3-tuple policy).
    pub const FRAGMENT_TABLE_FULL: u32 = 31;
    /// Later fragments sent to the backend of their datagram's first fragment.
    pub const FRAGMENT_FOLLOWED: u32 = 32;
    /// Later fragments without a live entry, sent by the 3-tuple hash of the (VIP, protocol)'s
    /// `maglev_key = "3-tuple"` service.
    pub const FRAGMENT_BY_3_TUPLE: u32 = 33;
    /// Later fragments for a VIP whose datagram has no entry (the first fragment has not come,
    /// never came, or its entry was swept) and no 3-tuple service: dropped.
    pub const DROP_FRAGMENT_ORPHAN: u32 = 34;
    /// Later fragments whose datagram's entry is older than `[fragments] timeout`: dropped.
    pub const DROP_FRAGMENT_TIMED_OUT: u32 = 35;
    /// Later fragments whose datagram's backend went down or was replaced: dropped.
    pub const DROP_FRAGMENT_BACKEND_GONE: u32 = 36;
    /// First fragments for a VIP too short to hold their whole transport header (RFC 1858
    /// tiny fragments; no real stack sends them): dropped.
    pub const DROP_FRAGMENT_TINY_FIRST: u32 = 37;

    /// Transport checksums a sender left partial (a veth with transmit offload) that XDP
    /// completed before XDP_TX or XDP_REDIRECT, which would otherwise lose them.
    pub const CHECKSUM_COMPLETED: u32 = 38;
    /// Translated packets with a partial checksum too long for XDP to complete: passed to the
    /// kernel, which completes it on its forwarding path.
    pub const PASS_CHECKSUM_NOT_COMPLETED: u32 = 39;

    /// IPv6 header truncated, or its payload length past the frame, or (for a VIP) an extension
    /// header cut short: dropped.
    pub const DROP_MALFORMED_IPV6: u32 = 40;
    /// IPv6 packets whose extension headers the datapath does not translate through (a chain
    /// longer than it walks, a routing header with segments left, a header cut short on a
    /// packet not for a VIP): passed untouched.
    pub const PASS_IPV6_EXTENSION: u32 = 41;
    /// IPv6 UDP with a zero checksum for a service: dropped (IPv6 requires a UDP checksum;
    /// the kernel drops them too).
    pub const DROP_UDP_ZERO_CHECKSUM: u32 = 42;
    /// IPv4 replies (and ICMP errors towards a client) whose next hop has no usable neighbour
    /// entry: dropped, and the next hop put in `NEIGHBOURS_WANTED` for lb-user to resolve.
    /// Passed, the kernel would drop them anyway (their source, the VIP, is its own address:
    /// a martian) without resolving the neighbour, so every later reply would be lost too.
    pub const DROP_NEIGH_UNRESOLVED: u32 = 43;

    /// Number of counters; the length of the `COUNTERS` array.
    pub const COUNT: u32 = 44;

    /// Names as `lb-user stats` prints them, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_not_tcp_udp",
        "pass_not_service",
        "pass_fragment",
        "pass_neigh_unresolved",
        "pass_forwarding_disabled",
        "pass_frag_needed",
        "pass_no_route",
        "drop_malformed_ethernet",
        "drop_malformed_ipv4",
        "drop_malformed_l4",
        "drop_no_backend",
        "drop_internal",
        "forward_tx",
        "forward_redirect",
        "reply_tx",
        "reply_redirect",
        "flow_hit",
        "flow_miss_new",
        "flow_miss_mid_stream",
        "flow_rescheduled",
        "flow_insert_failed",
        "flow_expired",
        "flow_closing",
        "flow_port_reuse",
        "drop_spoofed_source",
        "pass_kernel_forward",
        "reply_egress",
        "icmp_to_backend",
        "icmp_to_client",
        "fragment_tracked",
        "fragment_table_full",
        "fragment_followed",
        "fragment_by_3_tuple",
        "drop_fragment_orphan",
        "drop_fragment_timed_out",
        "drop_fragment_backend_gone",
        "drop_fragment_tiny_first",
        "checksum_completed",
        "pass_checksum_not_completed",
        "drop_malformed_ipv6",
        "pass_ipv6_extension",
        "drop_udp_zero_checksum",
        "drop_neigh_unresolved",
    ];
}

/// The hash that places a flow in a Maglev table: the same function in the datapath and in
/// userspace (tests, `lb-user flows`), so every load balancer with the same configuration
/// sends a flow to the same backend. Murmur3-style mixing of the 5-tuple's four words; no
/// loops, no tables, nothing machine-dependent.
#[inline(always)]
pub fn flow_hash<A: Address>(key: &FlowKey<A>) -> u32 {
    let ports =
        ((u16::from_be_bytes(key.src_port) as u32) << 16) | u16::from_be_bytes(key.dst_port) as u32;
    let mut hash = 0x4c42_5f31; // "LB_1": a fixed seed, part of the ABI
    hash = key.src_addr.mix_into(hash);
    hash = key.dst_addr.mix_into(hash);
    hash = mix_word(hash, ports);
    hash = mix_word(hash, key.protocol as u32);
    finalize(hash ^ 16)
}

/// The IPv6 flavours of the generic map types, keying the `*6` maps.
pub type ServiceKey6 = ServiceKey<[u8; 16]>;
pub type FlowKey6 = FlowKey<[u8; 16]>;
pub type EndpointKey6 = EndpointKey<[u8; 16]>;
pub type Endpoint6 = Endpoint<[u8; 16]>;
pub type ReverseNat6 = ReverseNat<[u8; 16]>;
pub type FragmentKey6 = FragmentKey<[u8; 16]>;
pub type VipProtocol6 = VipProtocol<[u8; 16]>;

/// The key a `maglev_key = "3-tuple"` service hashes ([`service_flags::HASH_3_TUPLE`]): the
/// 5-tuple with both ports zeroed, so [`flow_hash`] depends on (client, VIP, protocol) only.
#[inline(always)]
pub fn three_tuple<A: Copy>(key: &FlowKey<A>) -> FlowKey<A> {
    FlowKey {
        src_port: [0; 2],
        dst_port: [0; 2],
        ..*key
    }
}

#[inline(always)]
fn mix_word(hash: u32, word: u32) -> u32 {
    let word = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (hash ^ word)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finalize(hash: u32) -> u32 {
    let hash = (hash ^ (hash >> 16)).wrapping_mul(0x85eb_ca6b);
    let hash = (hash ^ (hash >> 13)).wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

#[cfg(feature = "user")]
mod pod {
    //! Lets aya copy these types in and out of maps. Sound because every type is
    //! `#[repr(C)]`, has only integer fields and has no implicit padding (see the asserts).
    use super::*;

    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ReverseNat {}
    unsafe impl aya::Pod for ReverseNat6 {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointKey6 {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Endpoint6 {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for Fragment {}
    unsafe impl aya::Pod for VipProtocol {}
    unsafe impl aya::Pod for FragmentKey6 {}
    unsafe impl aya::Pod for VipProtocol6 {}
    unsafe impl aya::Pod for NeighbourKey {}
    unsafe impl aya::Pod for PortBitmap {}
}

// Sizes are part of the ABI: a change here must be made on purpose, on both sides at once.
// Each equals the sum of its fields, so no type has implicit padding.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Service>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 28);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<PortBitmap>() == 8192);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);
const _: () = assert!(core::mem::size_of::<EndpointKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Endpoint6>() == 24);
const _: () = assert!(core::mem::size_of::<ReverseNat6>() == 28);
const _: () = assert!(core::mem::size_of::<Flow>() == 32);
const _: () = assert!(core::mem::size_of::<Settings>() == 32);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentKey<[u8; 16]>>() == 40);
const _: () = assert!(core::mem::size_of::<Fragment>() == 24);
const _: () = assert!(core::mem::size_of::<VipProtocol>() == 8);
const _: () = assert!(core::mem::size_of::<VipProtocol6>() == 20);
const _: () = assert!(core::mem::size_of::<ReverseNat>() == 16);
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 48);
const _: () = assert!(core::mem::size_of::<NextHop>() == 48);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 12);
const _: () = assert!(core::mem::size_of::<NeighbourKey>() == 24);
const _: () = assert!(MAX_BACKENDS_PER_SERVICE.is_power_of_two());

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_HASH_40000: u32 = 3_652_550_883;
    use core::mem::offset_of;

    #[test]
    fn field_offsets_match_the_datapath_layout() {
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, protocol), 6);
        assert_eq!(offset_of!(Service, scheduler), 4);
        assert_eq!(offset_of!(Service, table_offset), 8);
        assert_eq!(offset_of!(Service, table_len), 12);
        assert_eq!(offset_of!(Backend, port), 16);
        assert_eq!(offset_of!(Backend, state), 18);
        assert_eq!(offset_of!(Backend, flags), 19);
        assert_eq!(offset_of!(Backend, service_id), 20);
        assert_eq!(offset_of!(Backend, generation), 24);
        assert_eq!(offset_of!(FlowKey6, dst_addr), 16);
        assert_eq!(offset_of!(FlowKey6, src_port), 32);
        assert_eq!(offset_of!(FlowKey6, protocol), 36);
        assert_eq!(offset_of!(ServiceKey6, port), 16);
        assert_eq!(offset_of!(Endpoint6, shared), 18);
        assert_eq!(offset_of!(Endpoint6, service_id), 20);
        assert_eq!(offset_of!(ReverseNat6, service_id), 20);
        assert_eq!(offset_of!(FlowKey, dst_addr), 4);
        assert_eq!(offset_of!(FlowKey, src_port), 8);
        assert_eq!(offset_of!(FlowKey, dst_port), 10);
        assert_eq!(offset_of!(FlowKey, protocol), 12);
        assert_eq!(offset_of!(Flow, service_id), 4);
        assert_eq!(offset_of!(Flow, generation), 8);
        assert_eq!(offset_of!(Flow, state), 12);
        assert_eq!(offset_of!(Flow, last_seen_ns), 16);
        assert_eq!(offset_of!(Flow, created_ns), 24);
        assert_eq!(offset_of!(Settings, udp_timeout_ns), 16);
        assert_eq!(offset_of!(Settings, fragment_timeout_ns), 24);
        assert_eq!(offset_of!(Service, flags), 5);
        assert_eq!(offset_of!(FragmentKey, dst_addr), 4);
        assert_eq!(offset_of!(FragmentKey, id), 8);
        assert_eq!(offset_of!(FragmentKey, protocol), 12);
        assert_eq!(offset_of!(FragmentKey<[u8; 16]>, id), 32);
        assert_eq!(offset_of!(Fragment, generation), 8);
        assert_eq!(offset_of!(Fragment, created_ns), 16);
        assert_eq!(offset_of!(VipProtocol, protocol), 4);
        assert_eq!(offset_of!(VipProtocol6, protocol), 16);
        assert_eq!(offset_of!(ReverseNat, service_port), 4);
        assert_eq!(offset_of!(ReverseNat, service_id), 8);
        assert_eq!(offset_of!(ReverseNat, backend_id), 12);
        assert_eq!(offset_of!(TrafficStats, new_flows), 16);
        assert_eq!(offset_of!(NextHop, expires_ns), 8);
        assert_eq!(offset_of!(EndpointKey, protocol), 6);
        assert_eq!(offset_of!(Endpoint, shared), 6);
        assert_eq!(offset_of!(Endpoint, service_id), 8);
        assert_eq!(offset_of!(NextHop, addr), 16);
        assert_eq!(offset_of!(NextHop, smac), 32);
        assert_eq!(offset_of!(NextHop, dmac), 38);
        assert_eq!(offset_of!(NextHop, ok_len), 44);
        assert_eq!(offset_of!(TrafficStats, rescheduled), 40);
        assert_eq!(offset_of!(NeighbourKey, ifindex), 16);
        assert_eq!(offset_of!(NeighbourKey, family), 20);
    }

    #[test]
    fn flow_hash_is_fixed_and_spreads() {
        let key = |port: u16| FlowKey {
            src_addr: [10, 200, 1, 2],
            dst_addr: [10, 200, 1, 1],
            src_port: port.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            protocol: protocol::TCP,
            _pad: [0; 3],
        };
        // A golden value: changing the hash moves flows between load balancers mid-upgrade,
        // so it must only change on purpose.
        assert_eq!(flow_hash(&key(40000)), flow_hash(&key(40000)));
        assert_eq!(flow_hash(&key(40000)), GOLDEN_HASH_40000);
        let mut buckets = [0u32; 8];
        for port in 0..8000u16 {
            buckets[(flow_hash(&key(30000 + port)) % 8) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&count| (900..=1100).contains(&count)),
            "{buckets:?}"
        );
    }

    #[test]
    fn every_counter_has_a_distinct_name() {
        for (index, name) in counter::NAMES.iter().enumerate() {
            assert!(!name.is_empty());
            for other in &counter::NAMES[index + 1..] {
                assert_ne!(name, other);
            }
        }
    }
}
