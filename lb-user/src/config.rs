//! The balancer's TOML configuration: what it looks like, how it is read, and the checks that
//! turn it into a [`Config`] the rest of the control plane can trust.
//!
//! Parsing happens in two steps. Serde reads the text into loosely typed raw tables (every
//! table denies unknown keys, so a misspelt key is an error rather than a silently ignored
//! setting); then [`parse`] validates each field and builds the typed [`Config`]. Keeping
//! addresses, ports and durations as strings or wide integers in the raw tables lets every
//! validation error name the field path and quote the offending value, e.g.
//! `service[1] "api": vip: "10.0.0.256" is not an IPv4 address`.
//!
//! # Format
//!
//! ```toml
//! [[service]]
//! name = "web"             # required, unique, 1..=32 chars of [A-Za-z0-9_.-]
//! vip = "203.0.113.10"     # required IPv4 address (not 0.0.0.0, not multicast/broadcast)
//! port = 80                # required, 1..=65535
//! protocol = "tcp"         # "tcp" (default) or "udp"
//!
//! [service.health_check]   # optional for tcp services (defaults below); REQUIRED for udp services
//! kind = "http"            # "tcp" (connect), "http" (GET), or "none" (always up);
//!                          # default "tcp", but required for udp services
//! path = "/healthz"        # http only, default "/", must start with '/', no spaces/control chars
//!                          # (printable ASCII only: percent-encode anything else)
//! expect_status = 200      # http only, default 200, 100..=599
//! port = 8080              # optional: probe this port instead of the backend's port
//! interval = "2s"          # HAProxy `inter`: time between probes; default "2s"
//! timeout = "1s"           # default "1s" (or the interval, if shorter); > 0 and <= interval
//! rise = 2                 # consecutive successes to go up; default 2; 1..=100
//! fall = 3                 # consecutive failures to go down; default 3; 1..=100
//!
//! [[service.backend]]
//! address = "10.0.0.2"     # required IPv4 (not 0.0.0.0, broadcast, multicast, or the vip)
//! port = 80                # optional, defaults to the service's port
//! ```
//!
//! Durations are an integer followed by `ms`, `s` or `m` (`"500ms"`, `"2s"`, `"1m"`), at most
//! one hour. Limits: 1 to 1024 services, 1 to 256 backends per service, 4096 backends in all.
//! Two services may not share a name, nor the same vip, port and protocol; a service may not list
//! the same backend address and port twice.
//!
//! A udp service must say how its backends are checked, because the default tcp connect probe
//! cannot reach a udp port: use kind `"tcp"` with a `port` that accepts TCP (or the service's
//! own port, if the backends serve it over TCP too, as DNS servers do), `"http"`, or `"none"`.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
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

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_HTTP_STATUS: u16 = 200;

/// A validated configuration: every service has a unique name and listener, at least one
/// backend, and a complete health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The services, in the order of their `[[service]]` tables.
    pub services: Vec<ServiceConfig>,
}

/// One virtual service: a vip, port and protocol balanced over a list of backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name, 1 to 32 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The virtual address clients connect to.
    pub vip: Ipv4Addr,
    /// The virtual port clients connect to; never 0.
    pub port: u16,
    /// The transport protocol balanced.
    pub protocol: Protocol,
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

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// The backend's address and port (the service's port unless the table gave one).
    pub addr: SocketAddrV4,
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
    pub fn probe_target(&self, backend: SocketAddrV4) -> SocketAddrV4 {
        SocketAddrV4::new(*backend.ip(), self.port.unwrap_or(backend.port()))
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
    #[error("invalid configuration: {0}")]
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
    #[error("{second}: {protocol} {vip}:{port} (vip, port, protocol) is already used by {first}")]
    DuplicateListener {
        /// The first service, e.g. `service[0] "web"`.
        first: String,
        /// The second.
        second: String,
        /// The shared vip.
        vip: Ipv4Addr,
        /// The shared port.
        port: u16,
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
        addr: SocketAddrV4,
        /// Index of the first listing.
        first: usize,
        /// Index of the repeat.
        second: usize,
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

/// Reads the file at `path` and [`parse`]s it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse(&text)
}

/// Parses and validates a configuration in the format described in the [module docs](self).
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|error| locate_toml_error(text, error))?;
    validate(raw)
}

// The raw tables mirror the file. Values that need checking are kept loose (strings, i64) so
// that the checks, not serde, report them, with the field path and the value.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
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
}

/// Where each table sits in the text. Read only after a serde error, to say which table the
/// error is in; it accepts any keys, so it parses whenever the tables themselves have the
/// right shape.
#[derive(Debug, Default, Deserialize)]
struct TableSpans {
    #[serde(default)]
    service: Vec<toml::Spanned<ServiceSpans>>,
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
        ConfigError::WrongType {
            table,
            line,
            column,
            message: message.to_string(),
        }
    }
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

/// Splits serde's "unknown field `weight`, expected `address` or `port`" into the key and the
/// "expected ..." part. Serde's wording is stable, and an error that does not match keeps its
/// full message as [`ConfigError::WrongType`] instead.
fn parse_unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, expected) = rest.split_once('`')?;
    let expected = expected.trim_start_matches(", ");
    Some((key.to_string(), expected.to_string()))
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    check_counts(&raw)?;

    let services = raw
        .service
        .into_iter()
        .enumerate()
        .map(|(index, service)| validate_service(index, service))
        .collect::<Result<Vec<_>, _>>()?;

    check_unique_services(&services)?;
    Ok(Config { services })
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

    /// Checks an integer against an inclusive range and narrows it.
    fn bounded<T: TryFrom<i64>>(
        &self,
        field: &str,
        value: i64,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        let out_of_range =
            || self.invalid(field, value.to_string(), format!("is not in {min}..={max}"));
        if !(min..=max).contains(&value) {
            return Err(out_of_range());
        }
        T::try_from(value).map_err(|_| out_of_range())
    }

    fn duration(&self, field: &str, text: &str) -> Result<Duration, ConfigError> {
        let value = format!("{text:?}");
        let Some(duration) = parse_duration(text) else {
            return Err(self.invalid(
                field,
                value,
                "is not a duration (an integer followed by ms, s or m, e.g. \"500ms\", \"2s\", \
                 \"1m\")",
            ));
        };
        if duration.is_zero() {
            return Err(self.invalid(field, value, "must be greater than zero"));
        }
        if duration > MAX_DURATION {
            return Err(self.invalid(field, value, "must be at most 60m"));
        }
        Ok(duration)
    }
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
    let vip = parse_ipv4(&check, "vip", vip_text)?;
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

    Ok(ServiceConfig {
        name: name.clone(),
        vip,
        port,
        protocol,
        backends,
        health_check,
    })
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

fn parse_ipv4(check: &Checker, field: &str, text: &str) -> Result<Ipv4Addr, ConfigError> {
    Ipv4Addr::from_str(text)
        .map_err(|_| check.invalid(field, format!("{text:?}"), "is not an IPv4 address"))
}

/// Why an address can be neither a vip nor a backend: it does not name one host.
fn unusable_address(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("is the unspecified address, not a host")
    } else if addr.is_broadcast() {
        Some("is the broadcast address, not a host")
    } else if addr.is_multicast() {
        Some("is a multicast address, not a host")
    } else {
        None
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
        Some(text) => check.duration("health_check.interval", text)?,
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
    vip: Ipv4Addr,
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

    let mut seen: HashMap<SocketAddrV4, usize> = HashMap::with_capacity(raw.len());
    let mut backends = Vec::with_capacity(raw.len());
    for (index, backend) in raw.iter().enumerate() {
        let addr = validate_backend(check, index, backend, vip, service_port)?;
        if let Some(&first) = seen.get(&addr) {
            return Err(ConfigError::DuplicateBackend {
                service: check.service.clone(),
                addr,
                first,
                second: index,
            });
        }
        seen.insert(addr, index);
        backends.push(BackendConfig { addr });
    }
    Ok(backends)
}

fn validate_backend(
    check: &Checker,
    index: usize,
    raw: &RawBackend,
    vip: Ipv4Addr,
    service_port: u16,
) -> Result<SocketAddrV4, ConfigError> {
    let address_field = format!("backend[{index}].address");
    let text = check.required(&address_field, &raw.address)?;
    let address = parse_ipv4(check, &address_field, text)?;
    if let Some(problem) = unusable_address(address) {
        return Err(check.invalid(&address_field, format!("{text:?}"), problem));
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
    Ok(SocketAddrV4::new(address, port))
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

/// Rejects services that would collide in the datapath's service map, or in logs by name.
fn check_unique_services(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let mut names: HashMap<&str, usize> = HashMap::with_capacity(services.len());
    let mut listeners: HashMap<(Ipv4Addr, u16, Protocol), usize> =
        HashMap::with_capacity(services.len());

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
                vip: service.vip,
                port: service.port,
                protocol: service.protocol,
            });
        }
        listeners.insert(listener, index);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"

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

[[service.backend]]
address = "10.0.0.3"

[[service]]
name = "dns"
vip = "203.0.113.10"
port = 53
protocol = "udp"

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

    fn backend(addr: &str) -> BackendConfig {
        BackendConfig {
            addr: addr.parse().expect("test address"),
        }
    }

    #[test]
    fn example_parses_with_defaults_applied() {
        let config = parse(EXAMPLE).expect("example is valid");
        let expected = Config {
            services: vec![
                ServiceConfig {
                    name: "web".to_string(),
                    vip: Ipv4Addr::new(203, 0, 113, 10),
                    port: 80,
                    protocol: Protocol::Tcp,
                    backends: vec![backend("10.0.0.2:8000"), backend("10.0.0.3:80")],
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
                    vip: Ipv4Addr::new(203, 0, 113, 10),
                    port: 53,
                    protocol: Protocol::Udp,
                    backends: vec![backend("10.0.1.2:53")],
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
                    vip: Ipv4Addr::new(203, 0, 113, 11),
                    port: 22,
                    protocol: Protocol::Tcp,
                    backends: vec![backend("10.0.2.2:22")],
                    health_check: HealthCheck::default(),
                },
            ],
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
        let backend: SocketAddrV4 = "10.0.0.2:80".parse().expect("test address");
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
            ("10.0.0.256", "not an IPv4 address"),
            ("example.com", "not an IPv4 address"),
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
            ("10.0.0.256", "is not an IPv4 address"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("239.1.2.3", "multicast"),
            ("::1", "is not an IPv4 address"),
        ] {
            let text = service_with("").replace("203.0.113.10", vip);
            assert_rejected(
                &text,
                &["service[0] \"web\": vip", &format!("\"{vip}\""), problem],
            );
        }
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
            &format!("weight = 1\n{}", service_with("")),
            &[
                "unknown key \"weight\" in the top level",
                "line 1, column 1",
            ],
        );
        assert_rejected(
            &service_with("weight = 1"),
            &["unknown key \"weight\" in service[0]", "line 5"],
        );
        assert_rejected(
            &with_health_check("kind = \"tcp\"\nweight = 1"),
            &[
                "unknown key \"weight\" in service[0].health_check",
                "line 7",
            ],
        );
        let text = service_with("") + "[[service.backend]]\naddress = \"10.0.0.3\"\nweight = 1\n";
        assert_rejected(
            &text,
            &[
                "unknown key \"weight\" in service[0].backend[1]",
                "line 10, column 1",
            ],
        );
        let inline = service_with("").replace(
            "[[service.backend]]\naddress = \"10.0.0.2\"\n",
            "backend = [{ address = \"10.0.0.2\", weight = 1 }]\n",
        );
        assert_rejected(
            &inline,
            &["unknown key \"weight\" in service[0].backend[0]"],
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
            &["service[0]", "line 4", "invalid type"],
        );
        let text = service_with("") + "[[service.backend]]\naddress = 10\n";
        assert_rejected(&text, &["service[0].backend[1]", "line 9", "invalid type"]);
    }

    #[test]
    fn syntax_errors_keep_tomls_position() {
        assert_rejected("[[service]\nname = \"web\"\n", &["line 1"]);
    }
}
