//! The balancer's TOML configuration: what it looks like, how it is read, and the checks that
//! turn it into a [`Config`] the rest of the control plane can trust.
//!
//! Parsing happens in two steps. Serde reads the text into loosely typed raw tables (every
//! table denies unknown keys, so a misspelt key is an error rather than a silently ignored
//! setting); then [`parse`] validates each field and builds the typed [`Config`]. Keeping
//! addresses, ports and durations as strings or wide integers in the raw tables lets every
//! validation error name the field path and quote the offending value, e.g.
//! `service[1] "api": vip: "10.0.0.256" is not an IP address`.
//!
//! # Format
//!
//! ```toml
//! [flows]                  # optional, and so is every key in it; fixed while running (below)
//! table_size = 262144      # flow-table entries (the reverse table has as many); 1024..=16777216;
//!                          # default 262144
//! tcp_timeout = "15m"      # idle timeout of an established TCP flow; default "15m"
//! tcp_closing_timeout = "10s"
//!                          # lifetime of a TCP flow after a FIN or RST was seen; default "10s"
//!                          # (or tcp_timeout, if shorter); at most tcp_timeout
//! udp_timeout = "30s"      # idle timeout of a UDP flow; default "30s"
//!
//! [fragments]              # optional, and so is every key in it; fixed while running (below)
//! table_size = 65536       # fragmented datagrams tracked at once; 1024..=16777216; default 65536
//! timeout = "2s"           # how long after its first fragment a datagram's later fragments
//!                          # still follow it; default "2s"; at most "60s"
//!
//! [[service]]
//! name = "web"             # required, unique, 1..=32 chars of [A-Za-z0-9_.-]
//! vip = "203.0.113.10"     # required IPv4 or IPv6 address, bare ("2001:db8::10", no brackets);
//!                          # a host address: not unspecified, multicast, broadcast, link-local
//!                          # (fe80::/10) or IPv4-mapped (::ffff:a.b.c.d: write a.b.c.d)
//! port = 80                # required, 1..=65535
//! protocol = "tcp"         # "tcp" (default) or "udp"
//! scheduler = "maglev"     # how new flows pick a backend: "round-robin" (default), "weighted"
//!                          # (smooth weighted round robin) or "maglev" (consistent hashing)
//! maglev_table_size = 65537
//!                          # maglev only (an error with another scheduler); default 65537;
//!                          # prime; at least 100 per backend; at most 1000003
//! maglev_key = "5-tuple"   # maglev only: what is hashed: "5-tuple" (default) or "3-tuple"
//!                          # (client address, vip, protocol: every flow and fragment of a
//!                          # client on one backend, whatever order fragments arrive in); at
//!                          # most one "3-tuple" service per vip and protocol
//!
//! [service.health_check]   # optional for tcp services (defaults below); REQUIRED for udp services
//! kind = "http"            # "tcp" (connect), "http" (GET), or "none" (always up);
//!                          # default "tcp", but required for udp services
//! path = "/healthz"        # http only, default "/", must start with '/', no spaces/control chars
//!                          # (printable ASCII only: percent-encode anything else)
//! expect_status = 200      # http only, default 200, 100..=599
//! port = 8080              # optional: probe this port instead of the backend's port
//! interval = "2s"          # HAProxy `inter`: time between probes; default "2s"; >= "100ms"
//! timeout = "1s"           # default "1s" (or the interval, if shorter); > 0 and <= interval
//! rise = 2                 # consecutive successes to go up; default 2; 1..=100
//! fall = 3                 # consecutive failures to go down; default 3; 1..=100
//!
//! [[service.backend]]
//! address = "10.0.0.2"     # required, of the vip's family (IPv6 vip: IPv6 backends); a host
//!                          # address as for the vip, and not the vip itself
//! port = 80                # optional, defaults to the service's port
//! weight = 1               # 0..=1000, default 1; 0 drains the backend: it keeps its flows but
//!                          # gets no new ones. round-robin treats all other weights alike
//! ```
//!
//! Durations are an integer followed by `ms`, `s` or `m` (`"500ms"`, `"2s"`, `"1m"`), greater
//! than zero: at most one hour (`"60m"`) in a health check, at most a day (`"1440m"`) in
//! `[flows]`. Limits: 1 to 1024 services, 1 to 256 backends per service, 4096 backends in all.
//! Two services may not share a name, nor the same vip, port and protocol; a service may not list
//! the same backend address and port twice (IPv6 addresses are compared as addresses, so
//! `fd00::2` and `fd00:0::2` are the same backend).
//!
//! A service is of one address family: an IPv4 vip balances over IPv4 backends, an IPv6 vip
//! over IPv6 backends. Mixing them is refused: the datapath rewrites addresses, not headers, so
//! an IPv6 client reaching an IPv4 backend would need NAT64, which it does not do. IPv4 and IPv6
//! services may share one configuration (dual stack).
//!
//! A udp service must say how its backends are checked, because the default tcp connect probe
//! cannot reach a udp port: use kind `"tcp"` with a `port` that accepts TCP (or the service's
//! own port, if the backends serve it over TCP too, as DNS servers do), `"http"`, or `"none"`.
//!
//! A Maglev table must have a prime size, as the paper's permutations visit every entry only
//! then, and at least 100 entries per backend (drained ones included, since they may come back)
//! so that each backend's share of the table stays within about 1% of its weight's share.
//!
//! # Reloading
//!
//! A running balancer can take a new configuration whose `[flows]` and `[fragments]` tables are
//! unchanged; the tables are sized when the datapath loads, so a change there needs a restart.
//! [`check_reloadable`] tells the two cases apart.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Most services in one configuration: the datapath's service map holds no more.
const MAX_SERVICES: usize = lb_common::MAX_SERVICES as usize;
/// Most backends over all services: the size of the datapath's backend array.
const MAX_BACKENDS: usize = lb_common::MAX_BACKENDS as usize;
/// Most backends in one service: the length of a service's scheduling list.
const MAX_BACKENDS_PER_SERVICE: usize = lb_common::MAX_BACKENDS_PER_SERVICE;
/// Longest service name; names appear in logs and counters, so they are kept short.
const MAX_NAME_LEN: usize = 32;
/// Largest `rise` or `fall`, as HAProxy-style checks beyond this are surely a typo.
const MAX_RISE_FALL: i64 = 100;
/// Longest interval or timeout. Larger values are typos, and bounding them keeps the checker's
/// timer arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Shortest probe interval. Probing more often finds no failure much sooner (`fall` probes are
/// needed anyway) and turns every backend's health check into load.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_HTTP_STATUS: u16 = 200;

/// Fewest flow-table entries: a smaller table would evict live flows under any real load.
const MIN_FLOW_TABLE_SIZE: i64 = 1024;
/// Most flow-table entries. The flow and reverse tables are preallocated at this size, so the
/// bound keeps a typo from asking the kernel for gigabytes of locked memory.
const MAX_FLOW_TABLE_SIZE: i64 = 16_777_216;
/// Longest flow timeout. An idle flow older than a day is gone; the bound also keeps the
/// datapath's nanosecond timestamps far from overflow.
const MAX_FLOW_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

const DEFAULT_TCP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const DEFAULT_TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(30);

/// Fewest fragment-table entries; as for the flow table, smaller is a typo.
const MIN_FRAGMENT_TABLE_SIZE: i64 = 1024;
/// Most fragment-table entries: the table is preallocated, like the flow table.
const MAX_FRAGMENT_TABLE_SIZE: i64 = 16_777_216;
/// The fragments of one datagram leave their sender back to back, so even a reordering path
/// delivers them within milliseconds: 2 s is generous. Much longer only keeps dead entries
/// (lost fragments) in the table, and widens the window in which a 16-bit IP ID reused by a
/// fast sender (RFC 4963) finds its predecessor's entry.
const DEFAULT_FRAGMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Twice Linux's reassembly timeout (30 s, `ipfrag_time`): a backend has discarded the
/// datagram's fragments long before.
const MAX_FRAGMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Maglev table entries per backend, at least: the paper's rule for keeping every backend's
/// share of the table within about 1% of even.
const MAGLEV_ENTRIES_PER_BACKEND: usize = 100;
/// Largest Maglev table, a prime. Each service's table is built in userspace and copied to the
/// datapath on every change, so it is kept to about a million entries.
const MAX_MAGLEV_TABLE_SIZE: u32 = 1_000_003;
/// The size Google's paper uses, and prime.
const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;
// A service that never set maglev_table_size must not be rejected for it.
const _: () = assert!(
    DEFAULT_MAGLEV_TABLE_SIZE as usize >= MAGLEV_ENTRIES_PER_BACKEND * MAX_BACKENDS_PER_SERVICE
);

/// Largest backend weight. Ratios beyond 1000:1 are better served by removing a backend, and
/// the bound keeps the weighted scheduler's running sums small.
const MAX_WEIGHT: i64 = 1000;
const DEFAULT_WEIGHT: u32 = 1;

/// A validated configuration: every service has a unique name and listener, at least one
/// backend, and a complete health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The services, in the order of their `[[service]]` tables.
    pub services: Vec<ServiceConfig>,
    /// The flow tables' size and timeouts; the defaults if there is no `[flows]` table.
    pub flows: FlowSettings,
    /// The fragment table's size and timeout; the defaults if there is no `[fragments]` table.
    pub fragments: FragmentSettings,
}

/// How many fragmented datagrams the datapath tracks and for how long. Fixed while the
/// datapath runs; see [`check_reloadable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentSettings {
    /// Entries in the fragment table; 1024..=16777216.
    pub table_size: u32,
    /// How long after its first fragment a datagram's later fragments follow it.
    pub timeout: Duration,
}

impl Default for FragmentSettings {
    /// The settings without a `[fragments]` table.
    fn default() -> Self {
        FragmentSettings {
            table_size: lb_common::FRAGMENT_TABLE_SIZE,
            timeout: DEFAULT_FRAGMENT_TIMEOUT,
        }
    }
}

/// How many flows the datapath tracks and how long it keeps them. Fixed while the datapath
/// runs; see [`check_reloadable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// Entries in the flow table, and in the reverse-translation table; 1024..=16777216.
    pub table_size: u32,
    /// How long an established TCP flow may stay idle before its entry expires.
    pub tcp_timeout: Duration,
    /// How long a TCP flow's entry lives after a FIN or RST was seen in either direction; never
    /// longer than `tcp_timeout`.
    pub tcp_closing_timeout: Duration,
    /// How long a UDP flow may stay idle before its entry expires.
    pub udp_timeout: Duration,
}

impl Default for FlowSettings {
    /// The settings without a `[flows]` table.
    fn default() -> Self {
        FlowSettings {
            table_size: lb_common::FLOW_TABLE_SIZE,
            tcp_timeout: DEFAULT_TCP_TIMEOUT,
            tcp_closing_timeout: DEFAULT_TCP_CLOSING_TIMEOUT,
            udp_timeout: DEFAULT_UDP_TIMEOUT,
        }
    }
}

/// One virtual service: a vip, port and protocol balanced over a list of backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name, 1 to 32 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The virtual address clients connect to; its family is every backend's family.
    pub vip: IpAddr,
    /// The virtual port clients connect to; never 0.
    pub port: u16,
    /// The transport protocol balanced.
    pub protocol: Protocol,
    /// How new flows pick a backend.
    pub scheduler: Scheduler,
    /// The backends, in the order of their `[[service.backend]]` tables; never empty.
    pub backends: Vec<BackendConfig>,
    /// How the backends are checked.
    pub health_check: HealthCheck,
}

/// The transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP, IP protocol 6.
    Tcp,
    /// UDP, IP protocol 17.
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the datapath stores it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::protocol::TCP,
            Protocol::Udp => lb_common::protocol::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a service picks the backend of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    /// Each backend with a non-zero weight in turn.
    RoundRobin,
    /// Smooth weighted round robin: new flows in proportion to the backends' weights.
    Weighted,
    /// Consistent hashing (Maglev, NSDI 2016): a flow's hash indexes a lookup table in which
    /// each backend holds a share of entries proportional to its weight.
    Maglev {
        /// Entries in the lookup table: prime, at least 100 per backend, at most 1000003.
        table_size: u32,
        /// What the hash covers.
        key: MaglevKey,
    },
}

/// What a Maglev service hashes to pick a new flow's backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevKey {
    /// Addresses, ports and protocol: a client's flows spread over the backends.
    FiveTuple,
    /// Client address, vip and protocol, ports zeroed: all of a client's flows on one backend,
    /// and a fragment that arrives before its first fragment is placed without tracking.
    ThreeTuple,
}

impl fmt::Display for MaglevKey {
    /// The name as written in the configuration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MaglevKey::FiveTuple => "5-tuple",
            MaglevKey::ThreeTuple => "3-tuple",
        })
    }
}

impl fmt::Display for Scheduler {
    /// The name as written in the configuration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::RoundRobin => "round-robin",
            Scheduler::Weighted => "weighted",
            Scheduler::Maglev { .. } => "maglev",
        })
    }
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// The backend's address and port (the service's port unless the table gave one); of the
    /// service's vip's family.
    pub addr: SocketAddr,
    /// Relative share of new flows, 0..=1000; 0 drains the backend: its existing flows stay,
    /// it gets no new ones.
    pub weight: u32,
}

/// How and how often a service's backends are probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a probe does.
    pub probe: Probe,
    /// Port the probe connects to: `health_check.port` if given, else the backend's own port.
    pub port: Option<u16>,
    /// Time between the starts of two probes (HAProxy's `inter`); never zero.
    pub interval: Duration,
    /// Time one probe may take; never zero, never longer than `interval`.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
}

impl HealthCheck {
    /// The address a probe of `backend` connects to: the backend's address, on `port` if set.
    pub fn probe_target(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(backend.ip(), self.port.unwrap_or(backend.port()))
    }
}

impl Default for HealthCheck {
    /// The check a tcp service gets without a `[service.health_check]` table.
    fn default() -> Self {
        HealthCheck {
            probe: Probe::Tcp,
            port: None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

/// What one health probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Succeeds if a TCP connection is established.
    Tcp,
    /// Succeeds if `GET path` answers with status `expect_status`.
    Http {
        /// Request target; starts with `/`, printable ASCII without spaces.
        path: String,
        /// The status code that counts as healthy, 100..=599.
        expect_status: u16,
    },
    /// Never probes; the backend is always up.
    None,
}

/// Why a configuration was rejected. Each message names where the problem is and quotes the
/// offending value, so it can be shown to an operator as it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The text is not valid TOML, or has a shape that could not be placed in a table.
    /// Only what the TOML parser said: the caller names the file (and says it is invalid).
    #[error("{0}")]
    Toml(toml::de::Error),
    /// A table holds a key the format does not have (often a typo).
    #[error("unknown key {key:?} in {table} (line {line}, column {column}); {expected}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// Where the table is, e.g. `service[0].backend[1]`.
        table: String,
        /// 1-based line of the key.
        line: usize,
        /// 1-based column of the key.
        column: usize,
        /// The keys that table accepts, as TOML's parser lists them.
        expected: String,
    },
    /// A value has the wrong type (e.g. a string where a number belongs).
    #[error("{table} (line {line}, column {column}): {message}")]
    WrongType {
        /// Where the table is, e.g. `service[0].health_check`.
        table: String,
        /// 1-based line of the value.
        line: usize,
        /// 1-based column of the value.
        column: usize,
        /// TOML's parser's description.
        message: String,
    },
    /// There is no `[[service]]` table.
    #[error("no services configured: add at least one [[service]] table")]
    NoServices,
    /// More services than the datapath holds.
    #[error("{count} services configured; at most {max} are supported")]
    TooManyServices {
        /// Services in the file.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More backends in one service than its scheduling list holds.
    #[error("{service}: {count} backends configured; at most {max} per service are supported")]
    TooManyBackends {
        /// Which service, e.g. `service[0] "web"`.
        service: String,
        /// Backends in that service.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More backends over all services than the datapath holds.
    #[error("{count} backends configured over all services; at most {max} are supported")]
    TooManyBackendsInTotal {
        /// Backends in the file.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A required key is absent.
    #[error("{service}: {field} is required but missing")]
    Missing {
        /// Which service, e.g. `service[0] "web"`.
        service: String,
        /// The key's path inside the service, e.g. `backend[1].address`.
        field: String,
    },
    /// A value is present but not acceptable.
    #[error("{service}: {field}: {value} {problem}")]
    Invalid {
        /// Which service, e.g. `service[0] "web"`.
        service: String,
        /// The key's path inside the service, e.g. `health_check.interval`.
        field: String,
        /// The value as written (strings quoted).
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A value in a top-level table such as `[flows]` is not acceptable.
    #[error("{field}: {value} {problem}")]
    InvalidSetting {
        /// The key's full path, e.g. `flows.table_size`.
        field: String,
        /// The value as written (strings quoted).
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A new configuration changes a setting that a running datapath cannot change.
    #[error(
        "{field}: cannot change from {old} to {new} while running: the [flows] and [fragments] \
         settings are fixed when the datapath loads, so restart to apply them"
    )]
    NotReloadable {
        /// The setting's full path, e.g. `flows.table_size`.
        field: String,
        /// Its value in the running configuration.
        old: String,
        /// Its value in the new one.
        new: String,
    },
    /// Two services have the same name.
    #[error("service[{second}]: name: {name:?} is already used by service[{first}]")]
    DuplicateName {
        /// The name.
        name: String,
        /// Index of the first service with it.
        first: usize,
        /// Index of the second.
        second: usize,
    },
    /// Two services listen on the same vip, port and protocol.
    #[error("{second}: {protocol} {listener} (vip, port, protocol) is already used by {first}")]
    DuplicateListener {
        /// The first service, e.g. `service[0] "web"`.
        first: String,
        /// The second.
        second: String,
        /// The shared vip and port (`[addr]:port` for IPv6).
        listener: SocketAddr,
        /// The shared protocol.
        protocol: Protocol,
    },
    /// A service has no backends.
    #[error("{service}: no backends configured; add at least one [[service.backend]] table")]
    NoBackends {
        /// Which service.
        service: String,
    },
    /// A service lists the same backend twice.
    #[error("{service}: backend[{second}]: {addr} is the same backend as backend[{first}]")]
    DuplicateBackend {
        /// Which service.
        service: String,
        /// The repeated address and port.
        addr: SocketAddr,
        /// Index of the first listing.
        first: usize,
        /// Index of the repeat.
        second: usize,
    },
    /// A backend is of another address family than its service's vip.
    #[error(
        "{service}: backend[{index}].address: {address:?} is an {backend_family} address, but \
         the service's vip {vip:?} is {vip_family}: a service's backends must be of its vip's \
         family (the datapath translates addresses, not IPv4 to IPv6; give the {backend_family} \
         backends their own service with an {backend_family} vip)"
    )]
    MixedFamilies {
        /// Which service, e.g. `service[0] "web"`.
        service: String,
        /// Index of the backend.
        index: usize,
        /// The backend's address as written.
        address: String,
        /// "IPv4" or "IPv6".
        backend_family: &'static str,
        /// The vip.
        vip: String,
        /// "IPv4" or "IPv6".
        vip_family: &'static str,
    },
    /// A udp service has no `[service.health_check]` table.
    #[error(
        "{service}: a udp service needs an explicit [service.health_check]: the default tcp \
         connect probe cannot reach a udp port, so set kind = \"tcp\" with a port that accepts \
         TCP, kind = \"http\", or kind = \"none\""
    )]
    UdpWithoutHealthCheck {
        /// Which service.
        service: String,
    },
}

/// Largest configuration file read: far above any real one (4096 backends take ~300 KiB), and
/// small enough that pointing `--config` at a device or a huge file fails at once.
const MAX_FILE_SIZE: u64 = 4 << 20;

/// Reads the file at `path` and [`parse`]s it. Only regular files up to 4 MiB are read.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_error = |error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_file() {
        return Err(read_error(std::io::Error::other("not a regular file")));
    }
    if metadata.len() > MAX_FILE_SIZE {
        return Err(read_error(std::io::Error::other(format!(
            "{} bytes, more than the {MAX_FILE_SIZE} a configuration may have",
            metadata.len()
        ))));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    parse(&text)
}

/// Parses and validates a configuration in the format described in the [module docs](self).
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|error| locate_toml_error(text, error))?;
    validate(raw)
}

/// Checks that `new` can replace `old` in a running datapath without a restart: the `[flows]`
/// and `[fragments]` tables must be identical (its sizes are fixed when the program loads); returns an error naming
/// the first field that differs otherwise.
pub fn check_reloadable(old: &Config, new: &Config) -> Result<(), ConfigError> {
    // Destructured without `..`, so that a new field cannot be left out of the comparison.
    let FlowSettings {
        table_size,
        tcp_timeout,
        tcp_closing_timeout,
        udp_timeout,
    } = old.flows;
    let FragmentSettings {
        table_size: fragment_table_size,
        timeout: fragment_timeout,
    } = old.fragments;

    let not_reloadable = |field: &str, old: String, new: String| ConfigError::NotReloadable {
        field: field.to_string(),
        old,
        new,
    };
    if table_size != new.flows.table_size {
        return Err(not_reloadable(
            "flows.table_size",
            table_size.to_string(),
            new.flows.table_size.to_string(),
        ));
    }
    if fragment_table_size != new.fragments.table_size {
        return Err(not_reloadable(
            "fragments.table_size",
            fragment_table_size.to_string(),
            new.fragments.table_size.to_string(),
        ));
    }
    for (field, running, proposed) in [
        ("flows.tcp_timeout", tcp_timeout, new.flows.tcp_timeout),
        (
            "flows.tcp_closing_timeout",
            tcp_closing_timeout,
            new.flows.tcp_closing_timeout,
        ),
        ("flows.udp_timeout", udp_timeout, new.flows.udp_timeout),
        ("fragments.timeout", fragment_timeout, new.fragments.timeout),
    ] {
        if running != proposed {
            return Err(not_reloadable(
                field,
                format!("{:?}", format_duration(running)),
                format!("{:?}", format_duration(proposed)),
            ));
        }
    }
    Ok(())
}

// The raw tables mirror the file. Values that need checking are kept loose (strings, i64) so
// that the checks, not serde, report them, with the field path and the value.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: Vec<RawService>,
    flows: Option<RawFlows>,
    fragments: Option<RawFragments>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFragments {
    table_size: Option<i64>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    table_size: Option<i64>,
    tcp_timeout: Option<String>,
    tcp_closing_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
    scheduler: Option<String>,
    maglev_table_size: Option<i64>,
    maglev_key: Option<String>,
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: Option<String>,
    path: Option<String>,
    expect_status: Option<i64>,
    port: Option<i64>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
}

/// Where each table sits in the text. Read only after a serde error, to say which table the
/// error is in; it accepts any keys, so it parses whenever the tables themselves have the
/// right shape.
#[derive(Debug, Default, Deserialize)]
struct TableSpans {
    #[serde(default)]
    service: Vec<toml::Spanned<ServiceSpans>>,
    flows: Option<toml::Spanned<toml::Value>>,
    fragments: Option<toml::Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
struct ServiceSpans {
    health_check: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    backend: Vec<toml::Spanned<toml::Value>>,
}

/// Turns serde's error into one that names the table (`service[0].backend[1]`) as well as
/// the line and column. Falls back to TOML's own message when the error has no position or
/// the tables cannot be located (a syntax error, or `service` that is not an array of tables).
fn locate_toml_error(text: &str, error: toml::de::Error) -> ConfigError {
    let Some(offset) = error.span().map(|span| span.start) else {
        return ConfigError::Toml(error);
    };
    // Without spans (`service` is not an array of tables) only a table header can be placed.
    let table = match toml::from_str::<TableSpans>(text) {
        Ok(spans) => table_at(text, &spans, offset),
        Err(_) => match header_table(text, &TableSpans::default(), offset) {
            Some(table) => table,
            None => return ConfigError::Toml(error),
        },
    };
    let (line, column) = line_and_column(text, offset);
    let message = error.message();
    if let Some((key, expected)) = parse_unknown_field(message) {
        ConfigError::UnknownKey {
            key,
            table,
            line,
            column,
            expected,
        }
    } else {
        // The span points at the value: name the key written before it on its line.
        let key = key_before(text, offset);
        let mut message = plain_types(message);
        if key.is_some_and(|key| key == "interval" || key.ends_with("timeout")) {
            message = message.replace("expected a string", "expected a duration such as \"2s\"");
        }
        ConfigError::WrongType {
            table: match key {
                Some(key) => format!("{table}.{key}"),
                None => table,
            },
            line,
            column,
            message,
        }
    }
}

/// The key of a `key = value` line whose value starts at `offset`.
fn key_before(text: &str, offset: usize) -> Option<&str> {
    let before = text.get(..offset)?;
    let line = &before[before.rfind('\n').map_or(0, |newline| newline + 1)..];
    let key = line.trim_end().strip_suffix('=')?.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    plain.then_some(key)
}

/// serde's Rust type names in TOML's terms: "expected i64" means "expected an integer".
fn plain_types(message: &str) -> String {
    let mut plain = message.to_string();
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected u16", "expected an integer from 0 to 65535"),
        ("expected u8", "expected an integer from 0 to 255"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        plain = plain.replace(rust, toml);
    }
    plain
}

/// Names the innermost table whose text contains `offset`. A `[[service]]` table's span covers
/// only its own keys, not the `[service.backend]` tables written after it, so the nested tables
/// are tried first. An unknown table is reported at its header, outside every span, so headers
/// are read separately.
fn table_at(text: &str, spans: &TableSpans, offset: usize) -> String {
    for (index, service) in spans.service.iter().enumerate() {
        let inner = service.get_ref();
        for (backend, span) in inner.backend.iter().enumerate() {
            if span.span().contains(&offset) {
                return format!("service[{index}].backend[{backend}]");
            }
        }
        if let Some(check) = &inner.health_check {
            if check.span().contains(&offset) {
                return format!("service[{index}].health_check");
            }
        }
    }
    for (index, service) in spans.service.iter().enumerate() {
        if service.span().contains(&offset) {
            return format!("service[{index}]");
        }
    }
    for (name, table) in [("flows", &spans.flows), ("fragments", &spans.fragments)] {
        if table
            .as_ref()
            .is_some_and(|table| table.span().contains(&offset))
        {
            return name.to_string();
        }
    }
    header_table(text, spans, offset).unwrap_or_else(|| "the top level".to_string())
}

/// For an offset inside a table header such as `[service.healthcheck]`, names the table the
/// header's last key would be added to. A `[service.…]` header belongs to the latest
/// `[[service]]` written before it. Quoted or unusual headers give `None`.
fn header_table(text: &str, spans: &TableSpans, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let header = before[line_start..].trim_start().strip_prefix('[')?;
    let header = header.strip_prefix('[').unwrap_or(header);
    let keys: Vec<&str> = header.split('.').map(str::trim).collect();

    let service = spans
        .service
        .iter()
        .rposition(|service| service.span().start <= offset);
    match (keys.as_slice(), service) {
        ([""], _) => Some("the top level".to_string()),
        (["service", ""], Some(index)) => Some(format!("service[{index}]")),
        (["service", "health_check", ""], Some(index)) => {
            Some(format!("service[{index}].health_check"))
        }
        (["flows", ""], _) => Some("flows".to_string()),
        (["fragments", ""], _) => Some("fragments".to_string()),
        _ => None,
    }
}

/// 1-based line and column (in characters) of a byte offset, as TOML's parser counts them.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Splits serde's "unknown field `wieght`, expected one of `address`, `port`, `weight`" into the
/// key and the "expected ..." part. Serde's wording is stable, and an error that does not match
/// keeps its full message as [`ConfigError::WrongType`] instead.
fn parse_unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, expected) = rest.split_once('`')?;
    let expected = expected.trim_start_matches(", ");
    Some((key.to_string(), expected.to_string()))
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    check_counts(&raw)?;

    let flows = match &raw.flows {
        Some(raw_flows) => validate_flows(raw_flows)?,
        None => FlowSettings::default(),
    };
    let fragments = match &raw.fragments {
        Some(raw_fragments) => validate_fragments(raw_fragments)?,
        None => FragmentSettings::default(),
    };

    let services = raw
        .service
        .into_iter()
        .enumerate()
        .map(|(index, service)| validate_service(index, service))
        .collect::<Result<Vec<_>, _>>()?;

    check_unique_services(&services)?;
    Ok(Config {
        services,
        flows,
        fragments,
    })
}

/// Rejects configurations larger than the datapath's maps before looking at any values.
fn check_counts(raw: &RawConfig) -> Result<(), ConfigError> {
    if raw.service.is_empty() {
        return Err(ConfigError::NoServices);
    }
    if raw.service.len() > MAX_SERVICES {
        return Err(ConfigError::TooManyServices {
            count: raw.service.len(),
            max: MAX_SERVICES,
        });
    }
    let total: usize = raw
        .service
        .iter()
        .map(|service| service.backend.len())
        .sum();
    if total > MAX_BACKENDS {
        return Err(ConfigError::TooManyBackendsInTotal {
            count: total,
            max: MAX_BACKENDS,
        });
    }
    Ok(())
}

/// Names a service in messages: `service[1] "api"`, or `service[1]` while its name is unknown
/// or invalid.
fn service_label(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) if valid_name(name) => format!("service[{index}] \"{name}\""),
        _ => format!("service[{index}]"),
    }
}

/// Builds the errors of one service, which all start with the same label.
struct Checker {
    service: String,
}

impl Checker {
    fn invalid(&self, field: &str, value: String, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            service: self.service.clone(),
            field: field.to_string(),
            value,
            problem: problem.into(),
        }
    }

    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing {
            service: self.service.clone(),
            field: field.to_string(),
        }
    }

    fn required<'a, T>(&self, field: &str, value: &'a Option<T>) -> Result<&'a T, ConfigError> {
        value.as_ref().ok_or_else(|| self.missing(field))
    }

    fn port(&self, field: &str, value: i64) -> Result<u16, ConfigError> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(self.invalid(field, value.to_string(), "is not a valid port (1..=65535)")),
        }
    }

    fn bounded<T: TryFrom<i64>>(
        &self,
        field: &str,
        value: i64,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        in_range(value, min, max).map_err(|problem| self.invalid(field, value.to_string(), problem))
    }

    /// A health-check duration, at most [`MAX_DURATION`].
    fn duration(&self, field: &str, text: &str) -> Result<Duration, ConfigError> {
        bounded_duration(text, MAX_DURATION)
            .map_err(|problem| self.invalid(field, format!("{text:?}"), problem))
    }
}

/// Builds the errors of a top-level settings table such as `[flows]`: each names the key's full
/// path.
struct SettingsChecker {
    table: &'static str,
}

impl SettingsChecker {
    fn invalid(&self, key: &str, value: String, problem: impl Into<String>) -> ConfigError {
        ConfigError::InvalidSetting {
            field: format!("{}.{key}", self.table),
            value,
            problem: problem.into(),
        }
    }

    fn bounded<T: TryFrom<i64>>(
        &self,
        key: &str,
        value: i64,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        in_range(value, min, max).map_err(|problem| self.invalid(key, value.to_string(), problem))
    }

    fn duration(&self, key: &str, text: &str, max: Duration) -> Result<Duration, ConfigError> {
        bounded_duration(text, max)
            .map_err(|problem| self.invalid(key, format!("{text:?}"), problem))
    }
}

/// Checks an integer against an inclusive range and narrows it; the error is the problem as
/// the messages put it.
fn in_range<T: TryFrom<i64>>(value: i64, min: i64, max: i64) -> Result<T, String> {
    let out_of_range = || format!("must be between {min} and {max}");
    if !(min..=max).contains(&value) {
        return Err(out_of_range());
    }
    T::try_from(value).map_err(|_| out_of_range())
}

const NOT_A_DURATION: &str =
    "is not a duration (an integer followed by ms, s or m, e.g. \"500ms\", \"2s\", \"1m\")";

/// Parses a duration that must be greater than zero and at most `max`; the error is the problem
/// as the messages put it.
fn bounded_duration(text: &str, max: Duration) -> Result<Duration, String> {
    let Some(duration) = parse_duration(text) else {
        return Err(NOT_A_DURATION.to_string());
    };
    if duration.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    if duration > max {
        return Err(format!("must be at most {}", format_duration(max)));
    }
    Ok(duration)
}

fn validate_flows(raw: &RawFlows) -> Result<FlowSettings, ConfigError> {
    let check = SettingsChecker { table: "flows" };

    let table_size = match raw.table_size {
        Some(size) => {
            check.bounded("table_size", size, MIN_FLOW_TABLE_SIZE, MAX_FLOW_TABLE_SIZE)?
        }
        None => lb_common::FLOW_TABLE_SIZE,
    };

    let timeout = |key: &str, text: &Option<String>, default: Duration| match text {
        Some(text) => check.duration(key, text, MAX_FLOW_TIMEOUT),
        None => Ok(default),
    };
    let tcp_timeout = timeout("tcp_timeout", &raw.tcp_timeout, DEFAULT_TCP_TIMEOUT)?;
    let udp_timeout = timeout("udp_timeout", &raw.udp_timeout, DEFAULT_UDP_TIMEOUT)?;
    let tcp_closing_timeout = match &raw.tcp_closing_timeout {
        Some(text) => {
            let closing = check.duration("tcp_closing_timeout", text, MAX_FLOW_TIMEOUT)?;
            if closing > tcp_timeout {
                return Err(check.invalid(
                    "tcp_closing_timeout",
                    format!("{text:?}"),
                    format!(
                        "must not be longer than flows.tcp_timeout ({})",
                        format_duration(tcp_timeout)
                    ),
                ));
            }
            closing
        }
        // A short tcp_timeout alone should not be an error about a value the operator never wrote.
        None => DEFAULT_TCP_CLOSING_TIMEOUT.min(tcp_timeout),
    };

    Ok(FlowSettings {
        table_size,
        tcp_timeout,
        tcp_closing_timeout,
        udp_timeout,
    })
}

fn validate_fragments(raw: &RawFragments) -> Result<FragmentSettings, ConfigError> {
    let check = SettingsChecker { table: "fragments" };
    let table_size = match raw.table_size {
        Some(size) => check.bounded(
            "table_size",
            size,
            MIN_FRAGMENT_TABLE_SIZE,
            MAX_FRAGMENT_TABLE_SIZE,
        )?,
        None => lb_common::FRAGMENT_TABLE_SIZE,
    };
    let timeout = match &raw.timeout {
        Some(text) => check.duration("timeout", text, MAX_FRAGMENT_TIMEOUT)?,
        None => DEFAULT_FRAGMENT_TIMEOUT,
    };
    Ok(FragmentSettings {
        table_size,
        timeout,
    })
}

fn validate_service(index: usize, raw: RawService) -> Result<ServiceConfig, ConfigError> {
    let check = Checker {
        service: service_label(index, raw.name.as_deref()),
    };

    let name = check.required("name", &raw.name)?;
    if !valid_name(name) {
        return Err(check.invalid(
            "name",
            format!("{name:?}"),
            format!("must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-'"),
        ));
    }

    let vip_text = check.required("vip", &raw.vip)?;
    let vip = parse_ip(&check, "vip", vip_text)?;
    if let Some(problem) = unusable_address(vip) {
        return Err(check.invalid("vip", format!("{vip_text:?}"), problem));
    }

    let port = check.port("port", *check.required("port", &raw.port)?)?;

    let protocol = match raw.protocol.as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(check.invalid(
                "protocol",
                format!("{other:?}"),
                "is not a protocol (\"tcp\" or \"udp\")",
            ))
        }
    };

    let health_check = match (raw.health_check, protocol) {
        (Some(raw_check), _) => validate_health_check(&check, raw_check, protocol)?,
        (None, Protocol::Tcp) => HealthCheck::default(),
        (None, Protocol::Udp) => {
            return Err(ConfigError::UdpWithoutHealthCheck {
                service: check.service,
            })
        }
    };

    let backends = validate_backends(&check, &raw.backend, vip, port)?;

    let scheduler = validate_scheduler(
        &check,
        raw.scheduler.as_deref(),
        raw.maglev_table_size,
        raw.maglev_key.as_deref(),
        backends.len(),
    )?;
    Ok(ServiceConfig {
        name: name.clone(),
        vip,
        port,
        protocol,
        scheduler,
        backends,
        health_check,
    })
}

fn validate_scheduler(
    check: &Checker,
    name: Option<&str>,
    maglev_table_size: Option<i64>,
    maglev_key: Option<&str>,
    backend_count: usize,
) -> Result<Scheduler, ConfigError> {
    let scheduler = match name {
        None | Some("round-robin") => Scheduler::RoundRobin,
        Some("weighted") => Scheduler::Weighted,
        Some("maglev") => {
            let table_size = match maglev_table_size {
                Some(size) => validate_maglev_table_size(check, size, backend_count)?,
                None => DEFAULT_MAGLEV_TABLE_SIZE,
            };
            let key = match maglev_key {
                None | Some("5-tuple") => MaglevKey::FiveTuple,
                Some("3-tuple") => MaglevKey::ThreeTuple,
                Some(other) => {
                    return Err(check.invalid(
                        "maglev_key",
                        format!("{other:?}"),
                        "is not a Maglev key (\"5-tuple\" or \"3-tuple\")",
                    ))
                }
            };
            return Ok(Scheduler::Maglev { table_size, key });
        }
        Some(other) => {
            return Err(check.invalid(
                "scheduler",
                format!("{other:?}"),
                "is not a scheduler (\"round-robin\", \"weighted\" or \"maglev\")",
            ))
        }
    };
    // A setting that has no effect is more likely a mistake than a choice.
    let only_maglev = format!("is only valid with scheduler \"maglev\", not \"{scheduler}\"");
    if let Some(size) = maglev_table_size {
        return Err(check.invalid("maglev_table_size", size.to_string(), only_maglev));
    }
    if let Some(key) = maglev_key {
        return Err(check.invalid("maglev_key", format!("{key:?}"), only_maglev));
    }
    Ok(scheduler)
}

/// Bounds first, so that the primality test only sees sizes it can answer quickly.
fn validate_maglev_table_size(
    check: &Checker,
    size: i64,
    backend_count: usize,
) -> Result<u32, ConfigError> {
    let field = "maglev_table_size";
    if size > i64::from(MAX_MAGLEV_TABLE_SIZE) {
        return Err(check.invalid(
            field,
            size.to_string(),
            format!("must be at most {MAX_MAGLEV_TABLE_SIZE}"),
        ));
    }
    // Drained backends count too: undraining one must not need a larger table.
    let least = MAGLEV_ENTRIES_PER_BACKEND * backend_count;
    let backends = if backend_count == 1 {
        "backend"
    } else {
        "backends"
    };
    let too_small = || {
        check.invalid(
            field,
            size.to_string(),
            format!("is too small for {backend_count} {backends} (at least {least})"),
        )
    };
    let size = match u32::try_from(size) {
        Ok(size) if size as usize >= least => size,
        _ => return Err(too_small()),
    };
    if !is_prime(size) {
        return Err(check.invalid(field, size.to_string(), "is not prime"));
    }
    Ok(size)
}

/// Trial division: at most about 500 divisions for the largest Maglev table.
fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut divisor = 3;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 2;
    }
    true
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

/// An IPv4 or IPv6 address, bare. A bracketed IPv6 address (`[fd00::1]`, as in a URL) gets
/// its own message: the brackets only separate an address from a port, which has its own key.
fn parse_ip(check: &Checker, field: &str, text: &str) -> Result<IpAddr, ConfigError> {
    if let Some(inner) = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        if inner.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(check.invalid(
                field,
                format!("{text:?}"),
                format!("has brackets: write the IPv6 address bare ({inner:?})"),
            ));
        }
    }
    IpAddr::from_str(text).map_err(|_| {
        check.invalid(
            field,
            format!("{text:?}"),
            "is not an IP address (IPv4 like \"10.0.0.2\" or IPv6 like \"fd00::2\")",
        )
    })
}

/// "IPv4" or "IPv6", for messages.
pub fn family_name(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// Why an address can be neither a vip nor a backend: it does not name one host, or (IPv6)
/// not one the datapath can route to without an interface to scope it.
fn unusable_address(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(addr) if addr.is_broadcast() => Some("is the broadcast address, not a host"),
        IpAddr::V6(addr) if addr.to_ipv4_mapped().is_some() => Some(
            "is an IPv4-mapped IPv6 address: write the IPv4 address itself (a.b.c.d), which \
             makes it an IPv4 service or backend",
        ),
        // A link-local address names a host only together with an interface; the datapath's
        // route lookups and the configuration have none.
        IpAddr::V6(addr) if addr.is_unicast_link_local() => Some(
            "is a link-local address (fe80::/10), which needs an interface to be unambiguous: use \
             a global or unique-local (fc00::/7) address",
        ),
        addr if addr.is_unspecified() => Some("is the unspecified address, not a host"),
        // The datapath forwards packets out of an interface: a loopback address would name this
        // host, whose loopback traffic never passes through XDP.
        addr if addr.is_loopback() => {
            Some("is a loopback address, which no packet leaves this host for")
        }
        addr if addr.is_multicast() => Some("is a multicast address, not a host"),
        _ => None,
    }
}

fn validate_health_check(
    check: &Checker,
    raw: RawHealthCheck,
    protocol: Protocol,
) -> Result<HealthCheck, ConfigError> {
    let probe = validate_probe(check, &raw, protocol)?;

    let port = raw
        .port
        .map(|port| check.port("health_check.port", port))
        .transpose()?;

    let interval = match &raw.interval {
        Some(text) => {
            let interval = check.duration("health_check.interval", text)?;
            if interval < MIN_INTERVAL {
                return Err(check.invalid(
                    "health_check.interval",
                    format!("{text:?}"),
                    format!(
                        "is shorter than {}: probes that often add load without finding a \
                         failure sooner",
                        format_duration(MIN_INTERVAL)
                    ),
                ));
            }
            interval
        }
        None => DEFAULT_INTERVAL,
    };
    let timeout = match &raw.timeout {
        Some(text) => {
            let timeout = check.duration("health_check.timeout", text)?;
            if timeout > interval {
                return Err(check.invalid(
                    "health_check.timeout",
                    format!("{text:?}"),
                    format!("must not be longer than health_check.interval ({interval:?})"),
                ));
            }
            timeout
        }
        // A short interval without a timeout should not be an error about a value the operator
        // never wrote.
        None => DEFAULT_TIMEOUT.min(interval),
    };

    let rise = match raw.rise {
        Some(rise) => check.bounded("health_check.rise", rise, 1, MAX_RISE_FALL)?,
        None => DEFAULT_RISE,
    };
    let fall = match raw.fall {
        Some(fall) => check.bounded("health_check.fall", fall, 1, MAX_RISE_FALL)?,
        None => DEFAULT_FALL,
    };

    Ok(HealthCheck {
        probe,
        port,
        interval,
        timeout,
        rise,
        fall,
    })
}

fn validate_probe(
    check: &Checker,
    raw: &RawHealthCheck,
    protocol: Protocol,
) -> Result<Probe, ConfigError> {
    let kind = match (raw.kind.as_deref(), protocol) {
        (Some(kind), _) => kind,
        (None, Protocol::Tcp) => "tcp",
        // The table is required for udp so that the probe is a deliberate choice; defaulting
        // its kind to a tcp connect would undo that.
        (None, Protocol::Udp) => {
            return Err(check.invalid(
                "health_check.kind",
                "(absent)".to_string(),
                "must be given for a udp service (\"tcp\" with a port that accepts TCP, \
                 \"http\", or \"none\")",
            ))
        }
    };

    match kind {
        "http" => {
            let path = match &raw.path {
                Some(path) => validate_http_path(check, path)?,
                None => DEFAULT_HTTP_PATH.to_string(),
            };
            let expect_status = match raw.expect_status {
                Some(status) => check.bounded("health_check.expect_status", status, 100, 599)?,
                None => DEFAULT_HTTP_STATUS,
            };
            Ok(Probe::Http {
                path,
                expect_status,
            })
        }
        "tcp" | "none" => {
            if let Some(path) = &raw.path {
                return Err(check.invalid(
                    "health_check.path",
                    format!("{path:?}"),
                    format!("is not valid for kind \"{kind}\" (only for kind \"http\")"),
                ));
            }
            if let Some(status) = raw.expect_status {
                return Err(check.invalid(
                    "health_check.expect_status",
                    status.to_string(),
                    format!("is not valid for kind \"{kind}\" (only for kind \"http\")"),
                ));
            }
            Ok(if kind == "tcp" {
                Probe::Tcp
            } else {
                Probe::None
            })
        }
        other => Err(check.invalid(
            "health_check.kind",
            format!("{other:?}"),
            "is not a probe kind (\"tcp\", \"http\" or \"none\")",
        )),
    }
}

/// The path goes into the request line verbatim, so anything that could break the line (a
/// space, CR/LF, other control characters) is refused; non-ASCII must be percent-encoded, as
/// HTTP requires.
fn validate_http_path(check: &Checker, path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(check.invalid(
            "health_check.path",
            format!("{path:?}"),
            "must start with '/'",
        ));
    }
    if !path.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(check.invalid(
            "health_check.path",
            format!("{path:?}"),
            "must be printable ASCII without spaces or control characters (percent-encode \
             anything else)",
        ));
    }
    Ok(path.to_string())
}

fn validate_backends(
    check: &Checker,
    raw: &[RawBackend],
    vip: IpAddr,
    service_port: u16,
) -> Result<Vec<BackendConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::NoBackends {
            service: check.service.clone(),
        });
    }
    if raw.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(ConfigError::TooManyBackends {
            service: check.service.clone(),
            count: raw.len(),
            max: MAX_BACKENDS_PER_SERVICE,
        });
    }

    let mut seen: HashMap<SocketAddr, usize> = HashMap::with_capacity(raw.len());
    let mut backends = Vec::with_capacity(raw.len());
    for (index, raw_backend) in raw.iter().enumerate() {
        let backend = validate_backend(check, index, raw_backend, vip, service_port)?;
        if let Some(&first) = seen.get(&backend.addr) {
            return Err(ConfigError::DuplicateBackend {
                service: check.service.clone(),
                addr: backend.addr,
                first,
                second: index,
            });
        }
        seen.insert(backend.addr, index);
        backends.push(backend);
    }
    Ok(backends)
}

fn validate_backend(
    check: &Checker,
    index: usize,
    raw: &RawBackend,
    vip: IpAddr,
    service_port: u16,
) -> Result<BackendConfig, ConfigError> {
    let address_field = format!("backend[{index}].address");
    let text = check.required(&address_field, &raw.address)?;
    let address = parse_ip(check, &address_field, text)?;
    if let Some(problem) = unusable_address(address) {
        return Err(check.invalid(&address_field, format!("{text:?}"), problem));
    }
    if address.is_ipv4() != vip.is_ipv4() {
        return Err(ConfigError::MixedFamilies {
            service: check.service.clone(),
            index,
            address: text.clone(),
            backend_family: family_name(address),
            vip: vip.to_string(),
            vip_family: family_name(vip),
        });
    }
    if address == vip {
        return Err(check.invalid(
            &address_field,
            format!("{text:?}"),
            "is the service's own vip; a backend must be another host",
        ));
    }

    let port = match raw.port {
        Some(port) => check.port(&format!("backend[{index}].port"), port)?,
        None => service_port,
    };

    let weight = match raw.weight {
        Some(weight) => {
            check.bounded(&format!("backend[{index}].weight"), weight, 0, MAX_WEIGHT)?
        }
        None => DEFAULT_WEIGHT,
    };

    Ok(BackendConfig {
        addr: SocketAddr::new(address, port),
        weight,
    })
}

/// Parses "500ms", "2s" or "1m". Only ASCII digits are accepted before the unit, so signs,
/// spaces and fractions are refused rather than guessed at.
fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return None;
    }
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        _ => None,
    }
}

/// Writes a duration as the configuration would: `"15m"`, `"10s"`, `"500ms"`.
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{duration:?}")
    } else if millis.is_multiple_of(60_000) && millis != 0 {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Rejects services that would collide in the datapath's service map, or in logs by name.
fn check_unique_services(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(services.len());
    let mut listeners: HashMap<(IpAddr, u16, Protocol), usize> =
        HashMap::with_capacity(services.len());
    let mut three_tuple: HashMap<(IpAddr, Protocol), usize> = HashMap::new();

    for (index, service) in services.iter().enumerate() {
        if let Some(&first) = names.get(service.name.as_str()) {
            return Err(ConfigError::DuplicateName {
                name: service.name.clone(),
                first,
                second: index,
            });
        }
        names.insert(&service.name, index);

        let listener = (service.vip, service.port, service.protocol);
        if let Some(&first) = listeners.get(&listener) {
            return Err(ConfigError::DuplicateListener {
                first: service_label(first, Some(&services[first].name)),
                second: service_label(index, Some(&service.name)),
                listener: SocketAddr::new(service.vip, service.port),
                protocol: service.protocol,
            });
        }
        listeners.insert(listener, index);

        // Later fragments without an entry are placed by the (vip, protocol)'s 3-tuple service:
        // two would disagree.
        if let Scheduler::Maglev {
            key: MaglevKey::ThreeTuple,
            ..
        } = service.scheduler
        {
            let vip_protocol = (service.vip, service.protocol);
            if let Some(&first) = three_tuple.get(&vip_protocol) {
                return Err(ConfigError::Invalid {
                    service: service_label(index, Some(&service.name)),
                    field: "maglev_key".to_string(),
                    value: "\"3-tuple\"".to_string(),
                    problem: format!(
                        "is already used for {} {} by {}: at most one 3-tuple service per vip \
                         and protocol",
                        service.protocol,
                        service.vip,
                        service_label(first, Some(&services[first].name))
                    ),
                });
            }
            three_tuple.insert(vip_protocol, index);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[flows]
table_size = 1048576
tcp_timeout = "1440m"
tcp_closing_timeout = "5s"
udp_timeout = "2m"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
scheduler = "maglev"
maglev_table_size = 1009

[service.health_check]
kind = "http"
path = "/healthz"
expect_status = 204
port = 8080
interval = "500ms"
timeout = "200ms"
rise = 1
fall = 5

[[service.backend]]
address = "10.0.0.2"
port = 8000
weight = 3

[[service.backend]]
address = "10.0.0.3"
weight = 0

[[service]]
name = "dns"
vip = "203.0.113.10"
port = 53
protocol = "udp"
scheduler = "weighted"

[service.health_check]
kind = "tcp"

[[service.backend]]
address = "10.0.1.2"

[[service]]
name = "ssh.bastion-1"
vip = "203.0.113.11"
port = 22

[[service.backend]]
address = "10.0.2.2"
"#;

    /// A minimal valid service followed by `extra` lines inside the service table.
    fn service_with(extra: &str) -> String {
        format!(
            "[[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\n{extra}\n\
             [[service.backend]]\naddress = \"10.0.0.2\"\n"
        )
    }

    /// A minimal valid tcp service with `check` as its health check table body.
    fn with_health_check(check: &str) -> String {
        service_with(&format!("[service.health_check]\n{check}\n"))
    }

    /// Parses `text`, expecting an error, and asserts its message contains every needle.
    fn assert_rejected(text: &str, needles: &[&str]) {
        let message = match parse(text) {
            Ok(config) => panic!("accepted invalid config:\n{text}\nparsed as {config:?}"),
            Err(error) => error.to_string(),
        };
        for needle in needles {
            assert!(
                message.contains(needle),
                "error message {message:?} does not contain {needle:?}; config:\n{text}"
            );
        }
    }

    fn backend(addr: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            addr: addr.parse().expect("test address"),
            weight,
        }
    }

    #[test]
    fn example_parses_with_defaults_applied() {
        let config = parse(EXAMPLE).expect("example is valid");
        let expected = Config {
            services: vec![
                ServiceConfig {
                    name: "web".to_string(),
                    vip: IpAddr::from([203, 0, 113, 10]),
                    port: 80,
                    protocol: Protocol::Tcp,
                    scheduler: Scheduler::Maglev {
                        table_size: 1009,
                        key: MaglevKey::FiveTuple,
                    },
                    backends: vec![backend("10.0.0.2:8000", 3), backend("10.0.0.3:80", 0)],
                    health_check: HealthCheck {
                        probe: Probe::Http {
                            path: "/healthz".to_string(),
                            expect_status: 204,
                        },
                        port: Some(8080),
                        interval: Duration::from_millis(500),
                        timeout: Duration::from_millis(200),
                        rise: 1,
                        fall: 5,
                    },
                },
                ServiceConfig {
                    name: "dns".to_string(),
                    vip: IpAddr::from([203, 0, 113, 10]),
                    port: 53,
                    protocol: Protocol::Udp,
                    scheduler: Scheduler::Weighted,
                    backends: vec![backend("10.0.1.2:53", 1)],
                    health_check: HealthCheck {
                        probe: Probe::Tcp,
                        port: None,
                        interval: Duration::from_secs(2),
                        timeout: Duration::from_secs(1),
                        rise: 2,
                        fall: 3,
                    },
                },
                ServiceConfig {
                    name: "ssh.bastion-1".to_string(),
                    vip: IpAddr::from([203, 0, 113, 11]),
                    port: 22,
                    protocol: Protocol::Tcp,
                    scheduler: Scheduler::RoundRobin,
                    backends: vec![backend("10.0.2.2:22", 1)],
                    health_check: HealthCheck::default(),
                },
            ],
            flows: FlowSettings {
                table_size: 1_048_576,
                tcp_timeout: Duration::from_secs(24 * 3600),
                tcp_closing_timeout: Duration::from_secs(5),
                udp_timeout: Duration::from_secs(120),
            },
            fragments: FragmentSettings::default(),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn http_check_defaults_path_and_status() {
        let config = parse(&with_health_check("kind = \"http\"")).expect("valid");
        assert_eq!(
            config.services[0].health_check.probe,
            Probe::Http {
                path: "/".to_string(),
                expect_status: 200
            }
        );
    }

    #[test]
    fn none_check_parses() {
        let config = parse(&with_health_check("kind = \"none\"")).expect("valid");
        assert_eq!(config.services[0].health_check.probe, Probe::None);
    }

    #[test]
    fn timeout_defaults_to_interval_when_interval_is_shorter() {
        let config = parse(&with_health_check("interval = \"300ms\"")).expect("valid");
        let check = &config.services[0].health_check;
        assert_eq!(check.interval, Duration::from_millis(300));
        assert_eq!(check.timeout, Duration::from_millis(300));
    }

    #[test]
    fn durations_accept_each_unit() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        for bad in [
            "",
            "s",
            "2",
            "2 s",
            "+2s",
            "-2s",
            "1.5s",
            "2h",
            "2S",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn protocol_numbers_and_names() {
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(Protocol::Udp.number(), 17);
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }

    #[test]
    fn probe_target_uses_check_port_when_set() {
        let backend: SocketAddr = "10.0.0.2:80".parse().expect("test address");
        let mut check = HealthCheck::default();
        assert_eq!(check.probe_target(backend), backend);
        check.port = Some(8080);
        assert_eq!(check.probe_target(backend).to_string(), "10.0.0.2:8080");
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let path = std::env::temp_dir().join(format!("lb-user-config-{}.toml", std::process::id()));
        std::fs::write(&path, EXAMPLE).expect("write temp file");
        let loaded = load(&path);
        std::fs::remove_file(&path).expect("remove temp file");
        assert_eq!(loaded.expect("valid").services.len(), 3);

        let error = load(&path).expect_err("file is gone");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn rejects_empty_config() {
        assert_rejected("", &["no services"]);
    }

    #[test]
    fn rejects_too_many_services() {
        let mut text = String::new();
        for index in 0..=MAX_SERVICES {
            text.push_str(&format!(
                "[[service]]\nname = \"s{index}\"\nvip = \"203.0.113.10\"\nport = {}\n\
                 [[service.backend]]\naddress = \"10.0.0.2\"\n",
                index + 1
            ));
        }
        assert_rejected(&text, &["1025 services", "at most 1024"]);
    }

    #[test]
    fn rejects_too_many_backends_in_one_service() {
        let backends: String = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|index| {
                format!(
                    "[[service.backend]]\naddress = \"10.0.0.2\"\nport = {}\n",
                    index + 1
                )
            })
            .collect();
        assert_rejected(
            &service_with(&backends),
            &["service[0] \"web\"", "258 backends", "at most 256"],
        );
    }

    #[test]
    fn rejects_too_many_backends_in_total() {
        let mut text = String::new();
        for service in 0..17 {
            text.push_str(&format!(
                "[[service]]\nname = \"s{service}\"\nvip = \"203.0.113.10\"\nport = {}\n",
                service + 1
            ));
            for backend in 0..250 {
                text.push_str(&format!(
                    "[[service.backend]]\naddress = \"10.0.0.2\"\nport = {}\n",
                    backend + 1
                ));
            }
        }
        assert_rejected(&text, &["4250 backends", "at most 4096"]);
    }

    #[test]
    fn rejects_duplicate_service_names() {
        let text = format!(
            "{}{}",
            service_with(""),
            service_with("").replace("port = 80", "port = 81")
        );
        assert_rejected(&text, &["service[1]", "name: \"web\"", "service[0]"]);
    }

    #[test]
    fn rejects_duplicate_listeners() {
        let text = format!(
            "{}{}",
            service_with(""),
            service_with("").replace("\"web\"", "\"api\"")
        );
        assert_rejected(
            &text,
            &[
                "service[1] \"api\"",
                "service[0] \"web\"",
                "tcp 203.0.113.10:80",
            ],
        );
    }

    #[test]
    fn same_vip_and_port_with_other_protocol_is_allowed() {
        let udp = service_with("protocol = \"udp\"\n[service.health_check]\nkind = \"none\"\n")
            .replace("\"web\"", "\"web-udp\"");
        let config = parse(&format!("{}{udp}", service_with(""))).expect("valid");
        assert_eq!(config.services.len(), 2);
    }

    #[test]
    fn rejects_service_without_backends() {
        assert_rejected(
            "[[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\n",
            &["service[0] \"web\"", "no backends"],
        );
    }

    #[test]
    fn rejects_duplicate_backends() {
        // The second backend spells the service's default port out; it is still the same one.
        let text = service_with("") + "[[service.backend]]\naddress = \"10.0.0.2\"\nport = 80\n";
        assert_rejected(
            &text,
            &[
                "service[0] \"web\"",
                "backend[1]",
                "10.0.0.2:80",
                "backend[0]",
            ],
        );
    }

    #[test]
    fn same_backend_address_on_another_port_is_allowed() {
        let text = service_with("") + "[[service.backend]]\naddress = \"10.0.0.2\"\nport = 81\n";
        assert_eq!(parse(&text).expect("valid").services[0].backends.len(), 2);
    }

    #[test]
    fn rejects_backend_equal_to_vip() {
        let text = service_with("") + "[[service.backend]]\naddress = \"203.0.113.10\"\n";
        assert_rejected(&text, &["backend[1].address", "\"203.0.113.10\"", "vip"]);
    }

    #[test]
    fn rejects_unusable_backend_addresses() {
        for (address, problem) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("10.0.0.256", "not an IP address"),
            ("example.com", "not an IP address"),
        ] {
            let text =
                service_with("") + &format!("[[service.backend]]\naddress = \"{address}\"\n");
            assert_rejected(
                &text,
                &["backend[1].address", &format!("\"{address}\""), problem],
            );
        }
    }

    #[test]
    fn rejects_backend_without_address() {
        let text = service_with("") + "[[service.backend]]\nport = 81\n";
        assert_rejected(&text, &["backend[1].address", "missing"]);
    }

    #[test]
    fn rejects_bad_backend_ports() {
        for port in ["0", "65536", "-1"] {
            let text = service_with("")
                + &format!("[[service.backend]]\naddress = \"10.0.0.3\"\nport = {port}\n");
            assert_rejected(&text, &["backend[1].port", &format!(": {port} ")]);
        }
    }

    #[test]
    fn rejects_bad_vips() {
        for (vip, problem) in [
            ("10.0.0.256", "is not an IP address"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("239.1.2.3", "multicast"),
            ("127.0.0.1", "loopback"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
            ("[fd00::1]", "write the IPv6 address bare"),
            ("fd00::1::2", "is not an IP address"),
        ] {
            let text = service_with("").replace("203.0.113.10", vip);
            assert_rejected(
                &text,
                &["service[0] \"web\": vip", &format!("\"{vip}\""), problem],
            );
        }
    }

    /// One IPv6 service: `vip` and its backends' `address = ...` lines.
    fn ipv6_service(backends: &[&str]) -> String {
        let mut text =
            "[[service]]\nname = \"web6\"\nvip = \"fd00:200::1:1\"\nport = 80\n".to_string();
        for backend in backends {
            text.push_str(&format!("[[service.backend]]\n{backend}\n"));
        }
        text
    }

    #[test]
    fn ipv6_services_parse() {
        let text = ipv6_service(&[
            "address = \"fd00:200::11:2\"",
            "address = \"fd00:200::12:2\"\nport = 8080",
        ]);
        let config = parse(&text).expect("IPv6 service is valid");
        let service = &config.services[0];
        assert_eq!(
            service.vip,
            "fd00:200::1:1".parse::<IpAddr>().expect("address")
        );
        let backends: Vec<String> = service
            .backends
            .iter()
            .map(|backend| backend.addr.to_string())
            .collect();
        assert_eq!(backends, ["[fd00:200::11:2]:80", "[fd00:200::12:2]:8080"]);
        assert_eq!(
            service.health_check.probe_target(service.backends[1].addr),
            "[fd00:200::12:2]:8080".parse().expect("address")
        );
    }

    #[test]
    fn dual_stack_services_share_a_configuration_and_a_port() {
        let text = service_with("") + &ipv6_service(&["address = \"fd00:200::11:2\""]);
        let config = parse(&text).expect("an IPv4 and an IPv6 service");
        let families: Vec<bool> = config.services.iter().map(|s| s.vip.is_ipv6()).collect();
        assert_eq!(families, [false, true]);
        assert_eq!(config.services[0].port, config.services[1].port);
    }

    #[test]
    fn rejects_mixed_families_in_one_service_naming_both() {
        let text = ipv6_service(&["address = \"fd00:200::11:2\"", "address = \"10.200.12.2\""]);
        assert_rejected(
            &text,
            &[
                "service[0] \"web6\"",
                "backend[1].address",
                "\"10.200.12.2\" is an IPv4 address",
                "vip \"fd00:200::1:1\" is IPv6",
            ],
        );
        let text = service_with("") + "[[service.backend]]\naddress = \"fd00:200::12:2\"\n";
        assert_rejected(
            &text,
            &[
                "service[0] \"web\"",
                "backend[1].address",
                "\"fd00:200::12:2\" is an IPv6 address",
                "vip \"203.0.113.10\" is IPv4",
            ],
        );
    }

    #[test]
    fn rejects_unusable_ipv6_backend_addresses() {
        for (address, problem) in [
            ("::", "unspecified"),
            ("ff02::2", "multicast"),
            ("::1", "loopback"),
            ("fe80::2", "link-local"),
            ("::ffff:10.0.0.2", "IPv4-mapped"),
            ("[fd00:200::11:2]", "bare"),
            ("fd00:200::1:1", "the service's own vip"),
            ("fd00:200:0:0:0:0:1:1", "the service's own vip"),
        ] {
            let text = ipv6_service(&[&format!("address = \"{address}\"")]);
            assert_rejected(
                &text,
                &["backend[0].address", &format!("\"{address}\""), problem],
            );
        }
    }

    #[test]
    fn ipv6_services_take_a_three_tuple_maglev_key_once_per_vip_and_protocol() {
        let three_tuple = |name: &str, port: u16| {
            ipv6_service(&["address = \"fd00:200::11:2\""])
                .replace("\"web6\"", &format!("\"{name}\""))
                .replace(
                    "port = 80\n",
                    &format!("port = {port}\nscheduler = \"maglev\"\nmaglev_key = \"3-tuple\"\n"),
                )
        };
        let config = parse(&three_tuple("web6", 80)).expect("IPv6 fragments are tracked too");
        assert!(matches!(
            config.services[0].scheduler,
            Scheduler::Maglev {
                key: MaglevKey::ThreeTuple,
                ..
            }
        ));
        assert_rejected(
            &(three_tuple("a", 80) + &three_tuple("b", 8080)),
            &[
                "service[1] \"b\": maglev_key: \"3-tuple\" is already used for tcp \
                 fd00:200::1:1 by service[0] \"a\"",
            ],
        );
        // The IPv4 VIP's 3-tuple service is another (vip, protocol).
        let dual = three_tuple("a", 80)
            + &service_with("scheduler = \"maglev\"\nmaglev_key = \"3-tuple\"");
        parse(&dual).expect("one per family's vip");
    }

    #[test]
    fn ipv6_duplicates_are_found_however_they_are_written() {
        let text = ipv6_service(&[
            "address = \"fd00:200::11:2\"",
            "address = \"FD00:200:0::11:2\"\nport = 80",
        ]);
        assert_rejected(
            &text,
            &["backend[1]: [fd00:200::11:2]:80 is the same backend as backend[0]"],
        );
        let second = ipv6_service(&["address = \"fd00:200::11:2\""])
            .replace("web6", "other")
            .replace("fd00:200::1:1", "fd00:200:0:0::1:1");
        let text = ipv6_service(&["address = \"fd00:200::11:2\""]) + &second;
        assert_rejected(
            &text,
            &[
                "service[1] \"other\": tcp [fd00:200::1:1]:80",
                "service[0] \"web6\"",
            ],
        );
    }

    #[test]
    fn rejects_bad_service_ports() {
        for port in ["0", "65536", "-80"] {
            let text = service_with("").replace("port = 80", &format!("port = {port}"));
            assert_rejected(&text, &["service[0] \"web\": port", &format!(": {port} ")]);
        }
    }

    #[test]
    fn rejects_missing_required_service_keys() {
        for key in ["name", "vip", "port"] {
            let text: String = service_with("")
                .lines()
                .filter(|line| !line.starts_with(&format!("{key} =")))
                .map(|line| format!("{line}\n"))
                .collect();
            assert_rejected(&text, &["service[0]", &format!("{key} is required")]);
        }
    }

    #[test]
    fn rejects_bad_names() {
        for name in ["", "has space", "a/b", "x".repeat(33).as_str(), "caf\u{e9}"] {
            let text = service_with("").replace("\"web\"", &format!("\"{name}\""));
            assert_rejected(&text, &["service[0]: name", &format!("{name:?}")]);
        }
        let longest = "x".repeat(32);
        let text = service_with("").replace("\"web\"", &format!("\"{longest}\""));
        assert_eq!(parse(&text).expect("valid").services[0].name, longest);
    }

    #[test]
    fn rejects_unknown_protocol() {
        assert_rejected(
            &service_with("protocol = \"sctp\""),
            &["service[0] \"web\": protocol", "\"sctp\""],
        );
        assert_rejected(
            &service_with("protocol = \"TCP\""),
            &["protocol", "\"TCP\""],
        );
    }

    #[test]
    fn rejects_udp_without_health_check() {
        assert_rejected(
            &service_with("protocol = \"udp\""),
            &[
                "service[0] \"web\"",
                "udp service needs an explicit [service.health_check]",
                "\"none\"",
            ],
        );
    }

    #[test]
    fn rejects_udp_health_check_without_kind() {
        let text = service_with("protocol = \"udp\"\n[service.health_check]\nport = 8080\n");
        assert_rejected(&text, &["health_check.kind", "udp"]);
    }

    #[test]
    fn rejects_http_fields_for_other_kinds() {
        for kind in ["tcp", "none"] {
            assert_rejected(
                &with_health_check(&format!("kind = \"{kind}\"\npath = \"/x\"")),
                &["health_check.path", "\"/x\"", &format!("kind \"{kind}\"")],
            );
            assert_rejected(
                &with_health_check(&format!("kind = \"{kind}\"\nexpect_status = 200")),
                &[
                    "health_check.expect_status",
                    "200",
                    &format!("kind \"{kind}\""),
                ],
            );
        }
        // Without a kind the check is tcp, so http fields are refused too.
        assert_rejected(
            &with_health_check("path = \"/x\""),
            &["health_check.path", "kind \"tcp\""],
        );
    }

    #[test]
    fn rejects_unknown_kind() {
        assert_rejected(
            &with_health_check("kind = \"icmp\""),
            &["health_check.kind", "\"icmp\""],
        );
    }

    #[test]
    fn rejects_bad_http_paths() {
        for (path, toml_path) in [
            ("healthz", "healthz"),
            ("/a b", "/a b"),
            ("/a\r\nX: y", "/a\\r\\nX: y"),
            ("/caf\u{e9}", "/caf\u{e9}"),
        ] {
            let text = with_health_check(&format!("kind = \"http\"\npath = \"{toml_path}\""));
            assert_rejected(&text, &["health_check.path", &format!("{path:?}")]);
        }
    }

    #[test]
    fn rejects_bad_expect_status() {
        for status in ["99", "600", "-1"] {
            let text = with_health_check(&format!("kind = \"http\"\nexpect_status = {status}"));
            assert_rejected(
                &text,
                &["health_check.expect_status", &format!(": {status} ")],
            );
        }
    }

    #[test]
    fn rejects_bad_check_port() {
        assert_rejected(
            &with_health_check("port = 0"),
            &["health_check.port", ": 0 "],
        );
        assert_rejected(
            &with_health_check("port = 70000"),
            &["health_check.port", "70000"],
        );
    }

    #[test]
    fn rejects_bad_durations() {
        for (field, value, problem) in [
            ("interval", "0s", "must be greater than zero"),
            ("interval", "0ms", "must be greater than zero"),
            ("timeout", "0s", "must be greater than zero"),
            ("interval", "2", "is not a duration"),
            ("interval", "2h", "is not a duration"),
            ("timeout", "1.5s", "is not a duration"),
            ("interval", "61m", "at most"),
            ("interval", "1ms", "is shorter than 100ms"),
            ("interval", "99ms", "is shorter than 100ms"),
        ] {
            let text = with_health_check(&format!("{field} = \"{value}\""));
            assert_rejected(
                &text,
                &[
                    &format!("service[0] \"web\": health_check.{field}"),
                    &format!("\"{value}\""),
                    problem,
                ],
            );
        }
    }

    #[test]
    fn the_shortest_interval_is_accepted() {
        let config = parse(&with_health_check("interval = \"100ms\"")).expect("valid");
        let check = &config.services[0].health_check;
        assert_eq!(check.interval, Duration::from_millis(100));
    }

    #[test]
    fn an_integer_too_large_for_toml_is_reported_once_with_its_place() {
        for field in [
            "port = 99999999999999999999999",
            "weight = 99999999999999999999999",
        ] {
            let text = service_with("") + field + "\n";
            let message = parse(&text).expect_err("out of range").to_string();
            assert!(
                message.starts_with("TOML parse error at line "),
                "no prefix of ours: the caller names the file: {message}"
            );
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn rejects_timeout_longer_than_interval() {
        let text = with_health_check("interval = \"1s\"\ntimeout = \"1500ms\"");
        assert_rejected(&text, &["health_check.timeout", "\"1500ms\"", "interval"]);
        let equal = with_health_check("interval = \"1s\"\ntimeout = \"1000ms\"");
        assert!(parse(&equal).is_ok());
    }

    #[test]
    fn rejects_bad_rise_and_fall() {
        for field in ["rise", "fall"] {
            for value in ["0", "101", "-3"] {
                let text = with_health_check(&format!("{field} = {value}"));
                assert_rejected(
                    &text,
                    &[&format!("health_check.{field}"), &format!(": {value} ")],
                );
            }
        }
    }

    #[test]
    fn rejects_unknown_keys_at_every_level() {
        assert_rejected(
            &format!("wieght = 1\n{}", service_with("")),
            &[
                "unknown key \"wieght\" in the top level",
                "line 1, column 1",
            ],
        );
        assert_rejected(
            &service_with("wieght = 1"),
            &["unknown key \"wieght\" in service[0]", "line 5"],
        );
        assert_rejected(
            &with_health_check("kind = \"tcp\"\nwieght = 1"),
            &[
                "unknown key \"wieght\" in service[0].health_check",
                "line 7",
            ],
        );
        let text = service_with("") + "[[service.backend]]\naddress = \"10.0.0.3\"\nwieght = 1\n";
        assert_rejected(
            &text,
            &[
                "unknown key \"wieght\" in service[0].backend[1]",
                "line 10, column 1",
            ],
        );
        let inline = service_with("").replace(
            "[[service.backend]]\naddress = \"10.0.0.2\"\n",
            "backend = [{ address = \"10.0.0.2\", wieght = 1 }]\n",
        );
        assert_rejected(
            &inline,
            &["unknown key \"wieght\" in service[0].backend[0]"],
        );
    }

    #[test]
    fn unknown_key_in_second_service_names_that_service() {
        let text = format!(
            "{}{}",
            service_with(""),
            service_with("typo = 1").replace("\"web\"", "\"api\"")
        );
        assert_rejected(&text, &["unknown key \"typo\" in service[1]"]);
    }

    #[test]
    fn misspelt_tables_are_unknown_keys() {
        assert_rejected(
            &service_with("[service.healthcheck]\nkind = \"tcp\""),
            &["unknown key \"healthcheck\"", "service[0]"],
        );
        assert_rejected(
            &service_with("").replace("[[service]]", "[[services]]"),
            &["unknown key \"services\"", "top level"],
        );
    }

    #[test]
    fn wrong_types_name_the_table_and_position() {
        assert_rejected(
            &service_with("").replace("port = 80", "port = \"80\""),
            &[
                "service[0].port (line 4",
                "invalid type",
                "expected an integer",
            ],
        );
        let text = service_with("") + "[[service.backend]]\naddress = 10\n";
        assert_rejected(&text, &["service[0].backend[1]", "line 9", "invalid type"]);
    }

    #[test]
    fn syntax_errors_keep_tomls_position() {
        assert_rejected("[[service]\nname = \"web\"\n", &["line 1"]);
    }

    /// A minimal valid service after a `[flows]` table with `body`.
    fn with_flows(body: &str) -> String {
        format!("[flows]\n{body}\n{}", service_with(""))
    }

    /// A minimal maglev service with `backends` backends and `size` as its table size, if any.
    fn maglev_service(size: Option<i64>, backends: usize) -> String {
        let mut text = service_with(&match size {
            Some(size) => format!("scheduler = \"maglev\"\nmaglev_table_size = {size}"),
            None => "scheduler = \"maglev\"".to_string(),
        });
        for port in 1..backends {
            text.push_str(&format!(
                "[[service.backend]]\naddress = \"10.0.0.3\"\nport = {port}\n"
            ));
        }
        text
    }

    fn flows_of(text: &str) -> FlowSettings {
        parse(text).expect("valid").flows
    }

    #[test]
    fn flows_default_without_a_flows_table() {
        let defaults = FlowSettings {
            table_size: 262_144,
            tcp_timeout: Duration::from_secs(15 * 60),
            tcp_closing_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(30),
        };
        assert_eq!(FlowSettings::default(), defaults);
        assert_eq!(flows_of(&service_with("")), defaults);
        assert_eq!(flows_of(&with_flows("")), defaults);
    }

    #[test]
    fn flows_accept_values_at_their_bounds() {
        let low = with_flows(
            "table_size = 1024\ntcp_timeout = \"1ms\"\ntcp_closing_timeout = \"1ms\"\n\
             udp_timeout = \"1ms\"",
        );
        let millisecond = Duration::from_millis(1);
        assert_eq!(
            flows_of(&low),
            FlowSettings {
                table_size: 1024,
                tcp_timeout: millisecond,
                tcp_closing_timeout: millisecond,
                udp_timeout: millisecond,
            }
        );

        let high = with_flows(
            "table_size = 16777216\ntcp_timeout = \"1440m\"\ntcp_closing_timeout = \"1440m\"\n\
             udp_timeout = \"86400s\"",
        );
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(
            flows_of(&high),
            FlowSettings {
                table_size: 16_777_216,
                tcp_timeout: day,
                tcp_closing_timeout: day,
                udp_timeout: day,
            }
        );
    }

    #[test]
    fn closing_timeout_defaults_to_tcp_timeout_when_shorter() {
        let flows = flows_of(&with_flows("tcp_timeout = \"5s\""));
        assert_eq!(flows.tcp_timeout, Duration::from_secs(5));
        assert_eq!(flows.tcp_closing_timeout, Duration::from_secs(5));
    }

    #[test]
    fn flows_table_may_follow_the_services() {
        let text = service_with("") + "[flows]\nudp_timeout = \"1m\"\n";
        assert_eq!(flows_of(&text).udp_timeout, Duration::from_secs(60));
        assert_eq!(parse(&text).expect("valid").services[0].backends.len(), 1);
    }

    #[test]
    fn rejects_bad_flow_table_sizes() {
        assert_rejected(
            &with_flows("table_size = 100"),
            &["flows.table_size: 100 must be between 1024 and 16777216"],
        );
        for size in ["0", "-1", "1023", "16777217", "4294967296"] {
            assert_rejected(
                &with_flows(&format!("table_size = {size}")),
                &[&format!(
                    "flows.table_size: {size} must be between 1024 and 16777216"
                )],
            );
        }
    }

    #[test]
    fn rejects_bad_flow_timeouts() {
        for field in ["tcp_timeout", "tcp_closing_timeout", "udp_timeout"] {
            for (value, problem) in [
                ("0s", "must be greater than zero"),
                ("0ms", "must be greater than zero"),
                ("1441m", "must be at most 1440m"),
                ("86401s", "must be at most 1440m"),
                ("24h", "is not a duration"),
                ("1.5s", "is not a duration"),
                ("30", "is not a duration"),
            ] {
                assert_rejected(
                    &with_flows(&format!("{field} = \"{value}\"")),
                    &[&format!("flows.{field}: \"{value}\" {problem}")],
                );
            }
        }
    }

    #[test]
    fn rejects_closing_timeout_longer_than_tcp_timeout() {
        assert_rejected(
            &with_flows("tcp_timeout = \"1m\"\ntcp_closing_timeout = \"61s\""),
            &["flows.tcp_closing_timeout: \"61s\" must not be longer than flows.tcp_timeout (1m)"],
        );
        assert_rejected(
            &with_flows("tcp_closing_timeout = \"16m\""),
            &[
                "flows.tcp_closing_timeout: \"16m\"",
                "flows.tcp_timeout (15m)",
            ],
        );
        let equal = with_flows("tcp_timeout = \"1m\"\ntcp_closing_timeout = \"60s\"");
        assert_eq!(
            flows_of(&equal).tcp_closing_timeout,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn rejects_unknown_keys_in_flows() {
        assert_rejected(
            &with_flows("table_size = 4096\ntable_sise = 4096"),
            &[
                "unknown key \"table_sise\" in flows",
                "line 3, column 1",
                "table_size",
            ],
        );
        let after_services = service_with("") + "[flows]\ntimeout = \"1m\"\n";
        assert_rejected(
            &after_services,
            &["unknown key \"timeout\" in flows", "line 9, column 1"],
        );
        assert_rejected(
            &format!("flows = {{ typo = 1 }}\n{}", service_with("")),
            &["unknown key \"typo\" in flows"],
        );
        assert_rejected(
            &format!("[flows.limits]\nmax = 1\n{}", service_with("")),
            &["unknown key \"limits\" in flows", "line 1"],
        );
    }

    #[test]
    fn wrong_types_in_flows_name_the_table() {
        assert_rejected(
            &with_flows("table_size = \"big\""),
            &["flows.table_size (line 2", "invalid type"],
        );
        assert_rejected(
            &with_flows("tcp_timeout = 900"),
            &[
                "flows.tcp_timeout (line 2",
                "expected a duration such as \"2s\"",
            ],
        );
    }

    #[test]
    fn scheduler_and_weight_defaults() {
        let config = parse(&service_with("")).expect("valid");
        assert_eq!(config.services[0].scheduler, Scheduler::RoundRobin);
        assert_eq!(config.services[0].backends[0].weight, 1);
    }

    #[test]
    fn schedulers_parse() {
        for (text, expected) in [
            ("scheduler = \"round-robin\"", Scheduler::RoundRobin),
            ("scheduler = \"weighted\"", Scheduler::Weighted),
            (
                "scheduler = \"maglev\"",
                Scheduler::Maglev {
                    table_size: 65_537,
                    key: MaglevKey::FiveTuple,
                },
            ),
            (
                "scheduler = \"maglev\"\nmaglev_table_size = 251",
                Scheduler::Maglev {
                    table_size: 251,
                    key: MaglevKey::FiveTuple,
                },
            ),
        ] {
            let config = parse(&service_with(text)).expect("valid");
            assert_eq!(config.services[0].scheduler, expected, "{text}");
        }
    }

    #[test]
    fn scheduler_names_match_the_configuration() {
        assert_eq!(Scheduler::RoundRobin.to_string(), "round-robin");
        assert_eq!(Scheduler::Weighted.to_string(), "weighted");
        assert_eq!(
            Scheduler::Maglev {
                table_size: 65_537,
                key: MaglevKey::FiveTuple,
            }
            .to_string(),
            "maglev"
        );
    }

    #[test]
    fn rejects_unknown_scheduler() {
        for name in ["wrr", "Maglev", "roundrobin", ""] {
            assert_rejected(
                &service_with(&format!("scheduler = \"{name}\"")),
                &[&format!(
                    "service[0] \"web\": scheduler: \"{name}\" is not a scheduler"
                )],
            );
        }
    }

    #[test]
    fn rejects_maglev_table_size_with_another_scheduler() {
        for (scheduler, name) in [
            ("", "round-robin"),
            ("scheduler = \"round-robin\"\n", "round-robin"),
            ("scheduler = \"weighted\"\n", "weighted"),
        ] {
            assert_rejected(
                &service_with(&format!("{scheduler}maglev_table_size = 65537")),
                &[&format!(
                    "service[0] \"web\": maglev_table_size: 65537 is only valid with scheduler \
                     \"maglev\", not \"{name}\""
                )],
            );
        }
    }

    #[test]
    fn maglev_table_size_bounds() {
        let size_of = |text: &str| parse(text).expect("valid").services[0].scheduler;
        // 307 is the first prime from 300 entries for 3 backends.
        assert_eq!(
            size_of(&maglev_service(Some(307), 3)),
            Scheduler::Maglev {
                table_size: 307,
                key: MaglevKey::FiveTuple,
            }
        );
        assert_eq!(
            size_of(&maglev_service(Some(1_000_003), 3)),
            Scheduler::Maglev {
                table_size: 1_000_003,
                key: MaglevKey::FiveTuple,
            }
        );
        // The default fits the most backends a service may have.
        assert_eq!(
            size_of(&maglev_service(None, MAX_BACKENDS_PER_SERVICE)),
            Scheduler::Maglev {
                table_size: 65_537,
                key: MaglevKey::FiveTuple,
            }
        );
    }

    #[test]
    fn rejects_maglev_table_size_that_is_not_prime() {
        assert_rejected(
            &maglev_service(Some(65_536), 1),
            &["service[0] \"web\": maglev_table_size: 65536 is not prime"],
        );
        for size in ["1000001", "994009", "301"] {
            assert_rejected(
                &maglev_service(Some(size.parse().expect("number")), 3),
                &[&format!("maglev_table_size: {size} is not prime")],
            );
        }
    }

    #[test]
    fn rejects_maglev_table_too_small_for_its_backends() {
        assert_rejected(
            &maglev_service(Some(101), 3),
            &[
                "service[0] \"web\": maglev_table_size: 101 is too small for 3 backends \
               (at least 300)",
            ],
        );
        for size in ["97", "0", "-7"] {
            assert_rejected(
                &maglev_service(Some(size.parse().expect("number")), 1),
                &[&format!(
                    "maglev_table_size: {size} is too small for 1 backend (at least 100)"
                )],
            );
        }
        // Drained backends count: they may be undrained without a larger table.
        let drained = maglev_service(Some(101), 1)
            + "[[service.backend]]\naddress = \"10.0.0.9\"\nweight = 0\n";
        assert_rejected(
            &drained,
            &["101 is too small for 2 backends (at least 200)"],
        );
    }

    #[test]
    fn rejects_maglev_table_too_large() {
        for size in ["1000033", "5000000000"] {
            assert_rejected(
                &maglev_service(Some(size.parse().expect("number")), 1),
                &[&format!(
                    "service[0] \"web\": maglev_table_size: {size} must be at most 1000003"
                )],
            );
        }
    }

    #[test]
    fn is_prime_agrees_with_a_sieve() {
        const LIMIT: usize = 100_000;
        let mut composite = vec![false; LIMIT];
        for n in 2..LIMIT {
            if !composite[n] {
                for multiple in (n * n..LIMIT).step_by(n) {
                    composite[multiple] = true;
                }
            }
        }
        for (n, &is_composite) in composite.iter().enumerate() {
            let expected = n >= 2 && !is_composite;
            assert_eq!(is_prime(n as u32), expected, "{n}");
        }
        // Near the largest table, and at the top of u32 where a square could overflow.
        for (n, expected) in [
            (65_537, true),
            (999_983, true),
            (1_000_003, true),
            (1_000_001, false),
            (994_009, false),
            (4_294_967_291, true),
            (u32::MAX, false),
        ] {
            assert_eq!(is_prime(n), expected, "{n}");
        }
    }

    #[test]
    fn backend_weights_parse_at_their_bounds() {
        let text = service_with("")
            + "[[service.backend]]\naddress = \"10.0.0.3\"\nweight = 0\n\
               [[service.backend]]\naddress = \"10.0.0.4\"\nweight = 1000\n";
        let config = parse(&text).expect("valid");
        let weights: Vec<u32> = config.services[0]
            .backends
            .iter()
            .map(|backend| backend.weight)
            .collect();
        assert_eq!(weights, [1, 0, 1000]);
    }

    #[test]
    fn rejects_bad_backend_weights() {
        for weight in ["1001", "-1", "4294967296"] {
            let text = service_with("")
                + &format!("[[service.backend]]\naddress = \"10.0.0.3\"\nweight = {weight}\n");
            assert_rejected(
                &text,
                &[&format!(
                    "service[0] \"web\": backend[1].weight: {weight} must be between 0 and 1000"
                )],
            );
        }
    }

    /// A minimal valid service after a `[fragments]` table with `body`.
    fn with_fragments(body: &str) -> String {
        format!("[fragments]\n{body}\n{}", service_with(""))
    }

    #[test]
    fn fragments_default_and_accept_values_at_their_bounds() {
        let defaults = FragmentSettings {
            table_size: 65_536,
            timeout: Duration::from_secs(2),
        };
        assert_eq!(FragmentSettings::default(), defaults);
        assert_eq!(parse(&service_with("")).expect("valid").fragments, defaults);
        assert_eq!(
            parse(&with_fragments("")).expect("valid").fragments,
            defaults
        );
        for (body, expected) in [
            (
                "table_size = 1024\ntimeout = \"1ms\"",
                (1024, Duration::from_millis(1)),
            ),
            (
                "table_size = 16777216\ntimeout = \"60s\"",
                (16_777_216, Duration::from_secs(60)),
            ),
        ] {
            let fragments = parse(&with_fragments(body)).expect("valid").fragments;
            assert_eq!(
                (fragments.table_size, fragments.timeout),
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn rejects_bad_fragment_settings() {
        for size in ["0", "1023", "16777217"] {
            assert_rejected(
                &with_fragments(&format!("table_size = {size}")),
                &[&format!(
                    "fragments.table_size: {size} must be between 1024 and 16777216"
                )],
            );
        }
        for (value, problem) in [
            ("0s", "must be greater than zero"),
            ("61s", "must be at most 1m"),
            ("2", "is not a duration"),
        ] {
            assert_rejected(
                &with_fragments(&format!("timeout = \"{value}\"")),
                &[&format!("fragments.timeout: \"{value}\" {problem}")],
            );
        }
        assert_rejected(
            &with_fragments("timeot = \"1s\""),
            &["unknown key \"timeot\" in fragments", "line 2, column 1"],
        );
    }

    #[test]
    fn maglev_key_parses_and_is_only_for_maglev() {
        for (text, key) in [
            ("scheduler = \"maglev\"", MaglevKey::FiveTuple),
            (
                "scheduler = \"maglev\"\nmaglev_key = \"5-tuple\"",
                MaglevKey::FiveTuple,
            ),
            (
                "scheduler = \"maglev\"\nmaglev_key = \"3-tuple\"",
                MaglevKey::ThreeTuple,
            ),
        ] {
            let config = parse(&service_with(text)).expect("valid");
            assert_eq!(
                config.services[0].scheduler,
                Scheduler::Maglev {
                    table_size: 65_537,
                    key
                },
                "{text}"
            );
        }
        assert_eq!(MaglevKey::ThreeTuple.to_string(), "3-tuple");
        assert_rejected(
            &service_with("scheduler = \"maglev\"\nmaglev_key = \"4-tuple\""),
            &["service[0] \"web\": maglev_key: \"4-tuple\" is not a Maglev key"],
        );
        assert_rejected(
            &service_with("scheduler = \"weighted\"\nmaglev_key = \"3-tuple\""),
            &[
                "service[0] \"web\": maglev_key: \"3-tuple\" is only valid with scheduler \
                 \"maglev\", not \"weighted\"",
            ],
        );
        assert_rejected(
            &service_with("maglev_key = \"3-tuple\""),
            &["maglev_key: \"3-tuple\"", "not \"round-robin\""],
        );
    }

    #[test]
    fn rejects_a_second_3_tuple_service_for_a_vip_and_protocol() {
        let three_tuple = |name: &str, port: u16, protocol: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"203.0.113.10\"\nport = {port}\n\
                 protocol = \"{protocol}\"\nscheduler = \"maglev\"\nmaglev_key = \"3-tuple\"\n\
                 [service.health_check]\nkind = \"none\"\n\
                 [[service.backend]]\naddress = \"10.0.0.2\"\n"
            )
        };
        let text = three_tuple("a", 53, "udp") + &three_tuple("b", 5353, "udp");
        assert_rejected(
            &text,
            &[
                "service[1] \"b\": maglev_key: \"3-tuple\" is already used for udp \
                 203.0.113.10 by service[0] \"a\"",
            ],
        );
        // Another protocol, or a 5-tuple service on the same address, is fine.
        let text = three_tuple("a", 53, "udp") + &three_tuple("b", 53, "tcp");
        parse(&text).expect("one per protocol");
        let text = three_tuple("a", 53, "udp")
            + &three_tuple("b", 5353, "udp").replace("maglev_key = \"3-tuple\"\n", "");
        parse(&text).expect("the second hashes the 5-tuple");
    }

    #[test]
    fn check_reloadable_refuses_a_change_of_fragments() {
        let old = parse(&service_with("")).expect("valid");
        for (body, needles) in [
            (
                "table_size = 2048",
                ["fragments.table_size", "from 65536 to 2048", "restart"],
            ),
            (
                "timeout = \"3s\"",
                ["fragments.timeout", "from \"2s\" to \"3s\"", "restart"],
            ),
        ] {
            let new = parse(&with_fragments(body)).expect("valid");
            let error = check_reloadable(&old, &new).expect_err(body).to_string();
            for needle in needles {
                assert!(error.contains(needle), "{error} lacks {needle}");
            }
        }
    }

    #[test]
    fn check_reloadable_accepts_a_change_of_services() {
        let flows = "table_size = 4096\nudp_timeout = \"1m\"";
        let old = parse(&with_flows(flows)).expect("valid");
        let new_text = with_flows(flows).replace("port = 80", "port = 8080")
            + "[[service.backend]]\naddress = \"10.0.0.3\"\nweight = 0\n"
            + &service_with("scheduler = \"maglev\"").replace("\"web\"", "\"api\"");
        let new = parse(&new_text).expect("valid");
        assert_ne!(old.services, new.services);
        check_reloadable(&old, &new).expect("only services changed");
        check_reloadable(&old, &old).expect("nothing changed");
    }

    #[test]
    fn check_reloadable_refuses_a_change_of_flows() {
        let old = parse(&service_with("")).expect("valid");
        for (flows, needles) in [
            (
                "table_size = 524288",
                ["flows.table_size", "from 262144 to 524288", "restart"],
            ),
            (
                "tcp_timeout = \"20m\"",
                ["flows.tcp_timeout", "from \"15m\" to \"20m\"", "restart"],
            ),
            (
                "tcp_closing_timeout = \"500ms\"",
                [
                    "flows.tcp_closing_timeout",
                    "from \"10s\" to \"500ms\"",
                    "restart",
                ],
            ),
            (
                "udp_timeout = \"31s\"",
                ["flows.udp_timeout", "from \"30s\" to \"31s\"", "restart"],
            ),
            // The first field that differs is named.
            (
                "udp_timeout = \"1m\"\ntable_size = 2048",
                ["flows.table_size", "to 2048", "restart"],
            ),
        ] {
            let new = parse(&with_flows(flows)).expect("valid");
            let message = check_reloadable(&old, &new)
                .expect_err("flows changed")
                .to_string();
            for needle in needles {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn format_duration_writes_config_syntax() {
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        for text in ["1ms", "999ms", "1s", "59s", "1m", "1440m"] {
            let duration = parse_duration(text).expect("valid duration");
            assert_eq!(parse_duration(&format_duration(duration)), Some(duration));
        }
    }
}
