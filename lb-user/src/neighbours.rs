//! Having the kernel resolve the next hops the datapath found without a neighbour entry.
//!
//! The kernel resolves a neighbour (ARP, neighbour discovery) when it sends to it itself. A
//! translated IPv4 reply comes from the VIP, one of this host's addresses: passed to the
//! kernel, it is dropped as a martian before anything is resolved, so a client whose next hop
//! (usually the default gateway) dropped out of the neighbour table would get no reply until
//! something else refreshed it. The datapath drops such replies itself (`drop_neigh_unresolved`)
//! and records their next hop in `NEIGHBOURS_WANTED`; [`spawn`] empties that map every
//! [`POLL_INTERVAL`] and asks the kernel to resolve each next hop, so the sender's
//! retransmission finds it resolved.
//!
//! The request is `ip neigh replace ADDR dev IFACE nud none use`: with `use` (`NTF_USE`) the
//! kernel creates the entry if it is missing and starts resolving it, as it does before
//! sending a packet. `nud none` because `ip` otherwise sends the permanent state, which a new
//! entry would keep as an exemption from the neighbour table's garbage collection. On this
//! kernel the request also resets an existing PERMANENT or externally learned entry to
//! INCOMPLETE, dropping its address: so the entry is looked at first (`ip neigh show`), and
//! only a missing, FAILED, INCOMPLETE or NONE one is asked for. Entries an operator or another
//! daemon set are never touched (a race between the look and the request remains, a few
//! milliseconds wide).
//!
//! Many unresolved next hops at once (on-link clients with forged sources, say) cost at most
//! [`ASKS_PER_ROUND`] requests per round and [`LOGS_PER_MINUTE`] log lines a minute, plus one
//! line saying how many more there were.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::NeighbourKey;
use tokio::task::JoinHandle;

use crate::dataplane::DataplaneError;

/// How often `NEIGHBOURS_WANTED` is read: the first retransmission of a dropped reply (TCP's
/// comes after a second at the earliest) should find the neighbour resolved.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Each next hop is asked for at most this often: an unreachable gateway is wanted by every
/// reply towards it, and each `ip` run costs a process.
pub const ASK_INTERVAL: Duration = Duration::from_secs(1);
/// Each next hop is logged above debug level at most this often.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Most next hops asked for per round (per [`POLL_INTERVAL`]): each costs two `ip` runs. The
/// others wait: the datapath records them again on their next dropped reply.
pub const ASKS_PER_ROUND: usize = 4;
/// Most next hops logged above debug level per [`LOG_INTERVAL`], all next hops together.
pub const LOGS_PER_MINUTE: u32 = 10;

/// `bpf_fib_lookup`'s address families, as [`NeighbourKey::family`] holds them.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The map name, for errors.
const MAP: &str = "NEIGHBOURS_WANTED";

/// A next hop to resolve: an address on an interface of this namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub ifindex: u32,
}

impl Neighbour {
    /// The next hop a map key names, or `None` for a family the datapath never writes.
    pub fn from_key(key: &NeighbourKey) -> Option<Self> {
        let addr = match key.family {
            AF_INET => {
                let [a, b, c, d, ..] = key.addr;
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
            _ => return None,
        };
        Some(Self {
            addr,
            ifindex: key.ifindex,
        })
    }
}

/// The datapath's `NEIGHBOURS_WANTED` map, taken from the loaded object.
pub struct WantedNeighbours {
    map: BpfHashMap<MapData, NeighbourKey, u64>,
}

impl WantedNeighbours {
    pub fn new(map: BpfHashMap<MapData, NeighbourKey, u64>) -> Self {
        Self { map }
    }

    /// Reads every entry and deletes it, so the datapath records the next hop again if it is
    /// still unresolved later. Keys the datapath writes while this runs stay for the next call.
    /// Entries of a family the datapath never writes are deleted and left out.
    pub fn drain(&mut self) -> Result<Vec<Neighbour>, DataplaneError> {
        let keys: Vec<NeighbourKey> = self
            .map
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|cause| DataplaneError::Map { map: MAP, cause })?;
        let mut wanted = Vec::with_capacity(keys.len());
        for key in keys {
            match self.map.remove(&key) {
                Ok(()) => {}
                // The datapath's LRU evicted it meanwhile: it was wanted all the same.
                Err(aya::maps::MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(cause) => return Err(DataplaneError::Map { map: MAP, cause }),
            }
            wanted.extend(Neighbour::from_key(&key));
        }
        Ok(wanted)
    }
}

/// What to do about a wanted next hop now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Asked for less than [`ASK_INTERVAL`] ago: nothing.
    Skip,
    /// Ask the kernel; log at debug level only.
    Ask,
    /// Ask the kernel and log it at info level (or warn if asking fails).
    AskAndLog,
}

/// When each next hop was last asked for and last logged: the rate limits, kept apart from
/// the kernel so that they can be tested with made-up times.
#[derive(Debug, Default)]
pub struct Limiter {
    asked: HashMap<Neighbour, Instant>,
    logged: HashMap<Neighbour, Instant>,
}

impl Limiter {
    /// Decides about `neighbour` at `now`, and records the decision.
    pub fn decide(&mut self, neighbour: Neighbour, now: Instant) -> Decision {
        if !Self::due(&mut self.asked, neighbour, now, ASK_INTERVAL) {
            return Decision::Skip;
        }
        if !Self::due(&mut self.logged, neighbour, now, LOG_INTERVAL) {
            return Decision::Ask;
        }
        Decision::AskAndLog
    }

    /// Whether `neighbour`'s last time in `times` is `interval` or more before `now` (or it
    /// has none); if so, `now` becomes its last time.
    fn due(
        times: &mut HashMap<Neighbour, Instant>,
        neighbour: Neighbour,
        now: Instant,
        interval: Duration,
    ) -> bool {
        if times
            .get(&neighbour)
            .is_some_and(|&last| now.duration_since(last) < interval)
        {
            return false;
        }
        times.insert(neighbour, now);
        true
    }

    /// Forgets next hops not asked for in a [`LOG_INTERVAL`]: the memory stays bounded by the
    /// next hops of the last minute.
    pub fn forget_old(&mut self, now: Instant) {
        let recent = |time: &mut Instant| now.duration_since(*time) < LOG_INTERVAL;
        self.asked.retain(|_, time| recent(time));
        self.logged.retain(|_, time| recent(time));
    }
}

/// Why a next hop could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("interface {0} no longer exists")]
    NoInterface(u32),
    #[error("running ip: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("`ip {command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// The name of interface `ifindex` in this process's network namespace.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Runs `ip ARGS`; its standard output, or an error with its standard error.
fn run_ip(args: &[&str]) -> Result<Vec<u8>, ResolveError> {
    let output = Command::new("ip").args(args).output()?;
    if !output.status.success() {
        return Err(ResolveError::Failed {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

/// Whether `ip -json neigh show` output describes an entry to leave alone: one an operator or
/// another daemon set (PERMANENT, NOARP, externally learned), or one that is usable already.
fn leave_alone(show_json: &[u8]) -> bool {
    let Ok(entries) = serde_json::from_slice::<Vec<serde_json::Value>>(show_json) else {
        // Unreadable: do not risk touching it.
        return true;
    };
    entries.iter().any(|entry| {
        let words = |field: &str| -> Vec<String> {
            entry[field]
                .as_array()
                .map(|values| {
                    values
                        .iter()
                        .filter_map(|value| value.as_str().map(str::to_ascii_uppercase))
                        .collect()
                })
                .unwrap_or_default()
        };
        let kept = ["PERMANENT", "NOARP", "REACHABLE", "STALE", "DELAY", "PROBE"];
        words("state")
            .iter()
            .any(|state| kept.contains(&state.as_str()))
            || words("flags").iter().any(|flag| flag == "EXTERN_LEARN")
    })
}

/// What asking about a next hop came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// The kernel was asked to resolve it, on this interface.
    Resolving(String),
    /// Its entry is set by somebody or usable already: left alone.
    LeftAlone(String),
}

/// Asks the kernel to resolve `neighbour` (see the module's comment), unless its entry is one
/// to leave alone.
pub fn ask_kernel(neighbour: Neighbour) -> Result<Asked, ResolveError> {
    let interface =
        interface_name(neighbour.ifindex).ok_or(ResolveError::NoInterface(neighbour.ifindex))?;
    let addr = neighbour.addr.to_string();
    let shown = run_ip(&["-json", "neigh", "show", &addr, "dev", &interface])?;
    if leave_alone(&shown) {
        return Ok(Asked::LeftAlone(interface));
    }
    run_ip(&[
        "neigh", "replace", &addr, "dev", &interface, "nud", "none", "use",
    ])?;
    Ok(Asked::Resolving(interface))
}

/// The cap on log lines across all next hops: [`LOGS_PER_MINUTE`] a minute, then one line
/// saying how many were left out.
#[derive(Debug, Default)]
struct LogBudget {
    window_start: Option<Instant>,
    used: u32,
    left_out: u32,
}

impl LogBudget {
    /// Whether one more line may be logged at `now`; a new window first reports what the last
    /// one left out.
    fn take(&mut self, now: Instant) -> bool {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= LOG_INTERVAL)
        {
            if self.left_out > 0 {
                tracing::info!(
                    "{} more next hops without a usable neighbour entry were asked for in the \
                     last minute (not logged one by one; see the debug log)",
                    self.left_out
                );
            }
            *self = LogBudget {
                window_start: Some(now),
                used: 0,
                left_out: 0,
            };
        }
        if self.used < LOGS_PER_MINUTE {
            self.used += 1;
            true
        } else {
            self.left_out += 1;
            false
        }
    }
}

/// Everything one round needs, moved into a blocking thread and back.
struct State {
    wanted: WantedNeighbours,
    limiter: Limiter,
    logs: LogBudget,
    /// Whether the last read of the map failed (warned about once, not every round).
    read_failing: bool,
}

/// Empties the map once and asks for each next hop that is due.
fn serve(state: &mut State) {
    let wanted = match state.wanted.drain() {
        Ok(wanted) => {
            if state.read_failing {
                tracing::info!("reading {MAP} works again");
                state.read_failing = false;
            }
            wanted
        }
        Err(error) => {
            if !state.read_failing {
                tracing::warn!("reading {MAP}: {error}; unresolved next hops wait meanwhile");
                state.read_failing = true;
            }
            return;
        }
    };
    let now = Instant::now();
    let mut asked = 0;
    for neighbour in wanted {
        if asked == ASKS_PER_ROUND {
            break;
        }
        let mut decision = state.limiter.decide(neighbour, now);
        if decision == Decision::Skip {
            continue;
        }
        asked += 1;
        if decision == Decision::AskAndLog && !state.logs.take(now) {
            decision = Decision::Ask;
        }
        let Neighbour { addr, ifindex } = neighbour;
        match ask_kernel(neighbour) {
            Ok(Asked::Resolving(interface)) if decision == Decision::AskAndLog => tracing::info!(
                "next hop {addr} on {interface} has no usable neighbour entry: asked the kernel to \
                 resolve it (IPv4 replies towards it are dropped until it answers)"
            ),
            Ok(Asked::Resolving(interface)) => {
                tracing::debug!("asked the kernel to resolve {addr} on {interface}")
            }
            Ok(Asked::LeftAlone(interface)) => tracing::debug!(
                "next hop {addr} on {interface} has an entry set by somebody or usable by now: \
                 left alone"
            ),
            Err(error) if decision == Decision::AskAndLog => {
                tracing::warn!("resolving next hop {addr} (interface {ifindex}): {error}")
            }
            Err(error) => {
                tracing::debug!("resolving next hop {addr} (interface {ifindex}): {error}")
            }
        }
    }
    state.limiter.forget_old(now);
}

/// Starts the task that serves `wanted` every [`POLL_INTERVAL`] until it is aborted. Each
/// round runs on tokio's blocking pool (it runs `ip`), never on the daemon's control loop.
pub fn spawn(wanted: WantedNeighbours) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut state = State {
            wanted,
            limiter: Limiter::default(),
            logs: LogBudget::default(),
            read_failing: false,
        };
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let round = tokio::task::spawn_blocking(move || {
                serve(&mut state);
                state
            });
            state = match round.await {
                Ok(state) => state,
                Err(error) => {
                    tracing::error!("resolving wanted next hops stopped: {error}");
                    return;
                }
            };
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neighbour(last: u8) -> Neighbour {
        Neighbour {
            addr: IpAddr::V4(Ipv4Addr::new(10, 200, 1, last)),
            ifindex: 2,
        }
    }

    #[test]
    fn keys_name_their_next_hop_in_either_family() {
        let mut key = NeighbourKey {
            addr: [0; 16],
            ifindex: 7,
            family: AF_INET,
            _pad: [0; 3],
        };
        key.addr[..4].copy_from_slice(&[10, 200, 61, 2]);
        assert_eq!(
            Neighbour::from_key(&key),
            Some(Neighbour {
                addr: "10.200.61.2".parse().expect("address"),
                ifindex: 7
            })
        );
        let v6: Ipv6Addr = "fe80::1".parse().expect("address");
        key.addr = v6.octets();
        key.family = AF_INET6;
        assert_eq!(
            Neighbour::from_key(&key).map(|n| n.addr),
            Some(IpAddr::V6(v6))
        );
        key.family = 0;
        assert_eq!(Neighbour::from_key(&key), None);
    }

    #[test]
    fn a_next_hop_is_asked_for_once_a_second_and_logged_once_a_minute() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        assert_eq!(limiter.decide(neighbour(1), at(0)), Decision::AskAndLog);
        assert_eq!(limiter.decide(neighbour(1), at(100)), Decision::Skip);
        assert_eq!(limiter.decide(neighbour(1), at(999)), Decision::Skip);
        // Another next hop has limits of its own.
        assert_eq!(limiter.decide(neighbour(2), at(999)), Decision::AskAndLog);
        assert_eq!(limiter.decide(neighbour(1), at(1000)), Decision::Ask);
        assert_eq!(limiter.decide(neighbour(1), at(59_000)), Decision::Ask);
        assert_eq!(
            limiter.decide(neighbour(1), at(60_000)),
            Decision::AskAndLog
        );
        assert_eq!(limiter.decide(neighbour(1), at(60_500)), Decision::Skip);
    }

    #[test]
    fn entries_somebody_set_or_usable_ones_are_left_alone() {
        for (json, alone) in [
            (r#"[]"#, false),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","state":["FAILED"]}]"#,
                false,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","state":["INCOMPLETE"]}]"#,
                false,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","lladdr":"02:00:00:00:00:01","state":["PERMANENT"]}]"#,
                true,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","state":["NOARP"]}]"#,
                true,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","lladdr":"02:00:00:00:00:01","state":["REACHABLE"]}]"#,
                true,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","lladdr":"02:00:00:00:00:01","state":["STALE"]}]"#,
                true,
            ),
            (
                r#"[{"dst":"10.200.61.2","dev":"eth0","flags":["extern_learn"],"state":["FAILED"]}]"#,
                true,
            ),
            ("not json", true),
        ] {
            assert_eq!(leave_alone(json.as_bytes()), alone, "{json}");
        }
    }

    #[test]
    fn log_lines_are_capped_across_next_hops_and_the_rest_counted() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        let granted = (0..25).filter(|_| budget.take(start)).count();
        assert_eq!(granted, LOGS_PER_MINUTE as usize);
        assert_eq!(budget.left_out, 25 - LOGS_PER_MINUTE);
        // A new minute reports and clears what was left out, and grants lines again.
        assert!(budget.take(start + LOG_INTERVAL));
        assert_eq!((budget.used, budget.left_out), (1, 0));
    }

    #[test]
    fn next_hops_quiet_for_a_minute_are_forgotten() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        limiter.decide(neighbour(1), start);
        limiter.decide(neighbour(2), start + Duration::from_secs(30));
        limiter.forget_old(start + Duration::from_secs(61));
        assert_eq!(limiter.asked.len(), 1);
        assert_eq!(limiter.logged.len(), 1);
        // Forgotten, it is logged again when it comes back.
        assert_eq!(
            limiter.decide(neighbour(1), start + Duration::from_secs(62)),
            Decision::AskAndLog
        );
    }
}
