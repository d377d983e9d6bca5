//! lb-user configuration files, written from plain structs.
//!
//! Every field is kept as the text that goes into the file (addresses are `String`s, not
//! `Ipv4Addr`s) so that tests can write invalid values on purpose.

use std::fmt::Write as _;

/// `[service.health_check]`.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// `"tcp"`, `"http"` or `"none"`.
    pub kind: String,
    pub path: String,
    pub expect_status: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

impl HealthCheck {
    /// HTTP `GET /` expecting 200, every 500 ms with a 450 ms timeout, rise 2, fall 2: short
    /// enough that failover tests finish in seconds. The timeout is generous because on two
    /// busy cores a probe can wait a few hundred milliseconds for a CPU, and two slow probes in
    /// a row would take a healthy backend out (resetting its connections mid-test).
    pub fn fast_http() -> Self {
        Self {
            kind: "http".to_string(),
            path: "/".to_string(),
            expect_status: 200,
            interval_ms: 500,
            timeout_ms: 450,
            rise: 2,
            fall: 2,
        }
    }
}

/// One `[[service]]` with its backends.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    /// `scheduler = ...`; `None` leaves the key out (lb-user's default, round robin).
    pub scheduler: Option<String>,
    pub health_check: HealthCheck,
    /// `(address, port)` of each `[[service.backend]]`.
    pub backends: Vec<(String, u16)>,
}

impl ServiceConfig {
    /// The service as lb-user's TOML.
    pub fn to_toml(&self) -> String {
        let health = &self.health_check;
        let mut text = format!(
            "[[service]]\n\
             name = {name:?}\n\
             vip = {vip:?}\n\
             port = {port}\n\
             protocol = {protocol:?}\n\
             {scheduler}\
             \n\
             [service.health_check]\n\
             kind = {kind:?}\n\
             path = {path:?}\n\
             expect_status = {expect_status}\n\
             interval = \"{interval}ms\"\n\
             timeout = \"{timeout}ms\"\n\
             rise = {rise}\n\
             fall = {fall}\n",
            name = self.name,
            vip = self.vip,
            port = self.port,
            protocol = self.protocol,
            scheduler = self
                .scheduler
                .as_ref()
                .map(|scheduler| format!("scheduler = {scheduler:?}\n"))
                .unwrap_or_default(),
            kind = health.kind,
            path = health.path,
            expect_status = health.expect_status,
            interval = health.interval_ms,
            timeout = health.timeout_ms,
            rise = health.rise,
            fall = health.fall,
        );
        for (address, port) in &self.backends {
            text.push_str("\n[[service.backend]]\n");
            // Writing to a String cannot fail.
            writeln!(text, "address = {address:?}").expect("writing to a String");
            writeln!(text, "port = {port}").expect("writing to a String");
        }
        text
    }
}

/// A whole configuration file made of `services`.
pub fn config_toml(services: &[ServiceConfig]) -> String {
    services
        .iter()
        .map(ServiceConfig::to_toml)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_documented_shape() {
        let service = ServiceConfig {
            name: "web".to_string(),
            vip: "10.200.1.1".to_string(),
            port: 80,
            protocol: "tcp".to_string(),
            scheduler: None,
            health_check: HealthCheck::fast_http(),
            backends: vec![("10.200.11.2".to_string(), 80)],
        };
        let expected = r#"[[service]]
name = "web"
vip = "10.200.1.1"
port = 80
protocol = "tcp"

[service.health_check]
kind = "http"
path = "/"
expect_status = 200
interval = "500ms"
timeout = "450ms"
rise = 2
fall = 2

[[service.backend]]
address = "10.200.11.2"
port = 80
"#;
        assert_eq!(service.to_toml(), expected);
    }

    #[test]
    fn writes_the_scheduler_when_set() {
        let service = ServiceConfig {
            name: "web".to_string(),
            vip: "10.200.1.1".to_string(),
            port: 80,
            protocol: "tcp".to_string(),
            scheduler: Some("maglev".to_string()),
            health_check: HealthCheck::fast_http(),
            backends: vec![("10.200.11.2".to_string(), 80)],
        };
        let text = service.to_toml();
        assert!(
            text.contains("protocol = \"tcp\"\nscheduler = \"maglev\"\n\n[service.health_check]"),
            "{text}"
        );
        let parsed = lb_user::config::parse(&text).expect("lb-user accepts it");
        assert_eq!(parsed.services[0].scheduler.to_string(), "maglev");
    }
}
