//! The counters `lb-user stats` shows: a snapshot taken by the daemon, sent over the control
//! socket as JSON, and printed as a table for people or as JSON for scripts.

use lb_common::{counter, TrafficStats};
use serde::{Deserialize, Serialize};

use crate::{dataplane::Dataplane, services::ServiceTable};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub rescheduled: u64,
}

impl From<TrafficStats> for Traffic {
    fn from(stats: TrafficStats) -> Self {
        Self {
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
            rescheduled: stats.rescheduled,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSnapshot {
    pub address: String,
    pub port: u16,
    /// "up" or "down", as the health checker last decided.
    pub state: String,
    /// The configured weight.
    pub weight: u32,
    /// Drained at run time: no new flows, existing flows continue.
    pub drained: bool,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    /// "round-robin", "weighted" or "maglev".
    pub scheduler: String,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub backends: Vec<BackendSnapshot>,
}

/// Everything `lb-user stats` prints. Counters are totals since the program was loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceSnapshot>,
    /// Packets by XDP verdict: `pass`, `drop`, `tx`, `redirect`; the sums of the counters
    /// named after each.
    pub verdicts: serde_json::Map<String, serde_json::Value>,
    /// Global counters by name (see `lb_common::counter`), in their fixed order.
    pub counters: serde_json::Map<String, serde_json::Value>,
}

impl Snapshot {
    pub fn take(
        table: &ServiceTable,
        dataplane: &impl Dataplane,
        interfaces: Vec<String>,
    ) -> Result<Self, crate::dataplane::DataplaneError> {
        let mut services = Vec::with_capacity(table.services.len());
        for service in &table.services {
            let mut backends = Vec::with_capacity(service.backends.len());
            for backend in &service.backends {
                backends.push(BackendSnapshot {
                    address: backend.addr.ip().to_string(),
                    port: backend.addr.port(),
                    state: if backend.up { "up" } else { "down" }.to_string(),
                    weight: backend.weight,
                    drained: backend.drained,
                    traffic: dataplane.backend_stats(backend.id)?.into(),
                });
            }
            services.push(ServiceSnapshot {
                name: service.config.name.clone(),
                vip: service.config.vip.to_string(),
                port: service.config.port,
                protocol: service.config.protocol.to_string(),
                scheduler: service.config.scheduler.to_string(),
                traffic: dataplane.service_stats(service.id)?.into(),
                backends,
            });
        }
        let values = dataplane.counters()?;
        let verdicts = verdict_totals(&values);
        let counters = counter::NAMES
            .iter()
            .zip(values)
            .map(|(name, value)| (name.to_string(), serde_json::Value::from(value)))
            .collect();
        Ok(Self {
            interfaces,
            services,
            verdicts,
            counters,
        })
    }

    /// A table for people: services with their backends, then the global counters.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("interfaces: {}\n\n", self.interfaces.join(", ")));
        out.push_str(&format!(
            "{:<48} {:<10} {:>10} {:>12} {:>9} {:>10} {:>12} {:>11}\n",
            "SERVICE / BACKEND",
            "STATE",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "REPLIES",
            "REPLY BYTES",
            "RESCHEDULED"
        ));
        for service in &self.services {
            let up = service
                .backends
                .iter()
                .filter(|backend| backend.state == "up")
                .count();
            let title = format!(
                "{} {}/{} {}",
                service.name,
                host_port(&service.vip, service.port),
                service.protocol,
                service.scheduler
            );
            write_row(
                &mut out,
                &title,
                &format!("{up}/{} up", service.backends.len()),
                &service.traffic,
            );
            for backend in &service.backends {
                let title = format!(
                    "  {} w{}",
                    host_port(&backend.address, backend.port),
                    backend.weight
                );
                let state = if backend.drained {
                    format!("{} drained", backend.state)
                } else {
                    backend.state.clone()
                };
                write_row(&mut out, &title, &state, &backend.traffic);
            }
        }
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        out.push_str(&format!("\nverdicts: {}\n", verdicts.join(", ")));
        out.push_str("\nCOUNTER                      PACKETS\n");
        for (name, value) in &self.counters {
            out.push_str(&format!("{name:<28} {value:>8}\n"));
        }
        out
    }
}

/// `address:port`, with the address in brackets when it is IPv6 (`[fd00::1]:80`), as URLs and
/// the rest of lb-user write them.
fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Sums the per-reason counters into one total per XDP verdict. Every packet ends in exactly one
/// `pass_*`, `drop_*`, `*_tx` or `*_redirect` counter, so these add up to all packets seen.
fn verdict_totals(values: &[u64]) -> serde_json::Map<String, serde_json::Value> {
    let mut totals = [("pass", 0u64), ("drop", 0), ("tx", 0), ("redirect", 0)];
    for (name, value) in counter::NAMES.iter().zip(values) {
        let verdict = if name.starts_with("pass_") {
            0
        } else if name.starts_with("drop_") {
            1
        } else if name.ends_with("_tx") {
            2
        } else if name.ends_with("_redirect") {
            3
        } else {
            continue;
        };
        totals[verdict].1 += value;
    }
    totals
        .iter()
        .map(|(name, total)| (name.to_string(), serde_json::Value::from(*total)))
        .collect()
}

fn write_row(out: &mut String, title: &str, state: &str, traffic: &Traffic) {
    out.push_str(&format!(
        "{:<48} {:<10} {:>10} {:>12} {:>9} {:>10} {:>12} {:>11}\n",
        title,
        state,
        traffic.packets,
        traffic.bytes,
        traffic.new_flows,
        traffic.reply_packets,
        traffic.reply_bytes,
        traffic.rescheduled
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_with_their_port_ipv6_in_brackets() {
        assert_eq!(host_port("10.200.1.1", 80), "10.200.1.1:80");
        assert_eq!(host_port("fd00:200::1:1", 80), "[fd00:200::1:1]:80");
    }

    #[test]
    fn verdict_totals_sum_each_verdicts_reasons_and_skip_events() {
        let mut values = vec![0u64; counter::COUNT as usize];
        values[counter::PASS_NOT_IP as usize] = 3;
        values[counter::PASS_NOT_SERVICE as usize] = 4;
        values[counter::DROP_NO_BACKEND as usize] = 5;
        values[counter::FORWARD_TX as usize] = 6;
        values[counter::REPLY_TX as usize] = 1;
        values[counter::FORWARD_REDIRECT as usize] = 7;
        values[counter::REPLY_REDIRECT as usize] = 2;
        values[counter::FLOW_MISS_NEW as usize] = 100;
        let totals = verdict_totals(&values);
        let totals: Vec<(String, u64)> = totals
            .iter()
            .map(|(name, value)| (name.clone(), value.as_u64().expect("a number")))
            .collect();
        let expected = [("pass", 7), ("drop", 5), ("tx", 7), ("redirect", 9)];
        let expected: Vec<(String, u64)> = expected
            .iter()
            .map(|(name, value)| (name.to_string(), *value))
            .collect();
        assert_eq!(totals, expected);
    }
}
