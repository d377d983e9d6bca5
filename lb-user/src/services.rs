//! The services and backends as the control plane tracks them, and how that state becomes the
//! datapath's `SERVICES` and `BACKENDS` entries.
//!
//! Ids are assigned in configuration order: service `i` has id `i`, and backends are numbered
//! across all services in order, so the same configuration always gives the same ids.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{backend_state, scheduler, Backend, Service, ServiceKey, MAX_BACKENDS_PER_SERVICE};

use crate::{
    config::{Config, ServiceConfig},
    dataplane::{Dataplane, DataplaneError},
};

/// One backend's identity and health as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub addr: SocketAddrV4,
    pub up: bool,
}

#[derive(Clone, Debug)]
pub struct ServiceState {
    pub id: u32,
    pub config: ServiceConfig,
    pub backends: Vec<BackendState>,
}

/// Every configured service with its backends' health.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    pub services: Vec<ServiceState>,
}

/// Generation written for every backend id at start; see `lb_common::Backend::generation`.
const FIRST_GENERATION: u32 = 1;

impl ServiceTable {
    /// All backends start down: none gets traffic before it passed a probe.
    pub fn new(config: &Config) -> Self {
        let mut next_backend_id = 0u32;
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| ServiceState {
                id: index as u32,
                config: service.clone(),
                backends: service
                    .backends
                    .iter()
                    .map(|backend| {
                        let id = next_backend_id;
                        next_backend_id += 1;
                        BackendState {
                            id,
                            addr: backend.addr,
                            up: false,
                        }
                    })
                    .collect(),
            })
            .collect();
        Self { services }
    }

    /// Writes every backend, service and VIP address to a freshly loaded datapath.
    pub fn install(&self, dataplane: &mut impl Dataplane) -> Result<(), DataplaneError> {
        for service in &self.services {
            for backend in &service.backends {
                dataplane.set_backend(backend.id, &backend_value(service.id, backend))?;
            }
            dataplane.add_vip_address(service.config.vip.octets())?;
            dataplane.set_service(service_key(&service.config), &service_value(service))?;
        }
        Ok(())
    }

    /// Records a health transition and updates the datapath: the backend entry first (so
    /// flows pinned to a backend that went down move at once), then the service's list of
    /// backends that are up, replaced in one map update. Returns false, writing nothing, when
    /// the backend already had that state.
    pub fn set_backend_up(
        &mut self,
        service_index: usize,
        backend_index: usize,
        up: bool,
        dataplane: &mut impl Dataplane,
    ) -> Result<bool, DataplaneError> {
        let Some(service) = self.services.get_mut(service_index) else {
            return Ok(false);
        };
        let Some(backend) = service.backends.get_mut(backend_index) else {
            return Ok(false);
        };
        if backend.up == up {
            return Ok(false);
        }
        backend.up = up;
        let backend = backend.clone();
        dataplane.set_backend(backend.id, &backend_value(service.id, &backend))?;
        dataplane.set_service(service_key(&service.config), &service_value(service))?;
        Ok(true)
    }
}

pub fn service_key(config: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: config.vip.octets(),
        port: config.port.to_be_bytes(),
        protocol: config.protocol.number(),
        _pad: 0,
    }
}

/// The datapath's view of a service: the ids of its backends that are up, in id order.
pub fn service_value(service: &ServiceState) -> Service {
    let mut value = Service {
        id: service.id,
        scheduler: scheduler::ROUND_ROBIN,
        _pad: [0; 3],
        backend_count: 0,
        table_slot: 0,
        backends: [0; MAX_BACKENDS_PER_SERVICE],
    };
    // Configuration validation caps a service at MAX_BACKENDS_PER_SERVICE backends.
    for backend in service.backends.iter().filter(|backend| backend.up) {
        value.backends[value.backend_count as usize] = backend.id;
        value.backend_count += 1;
    }
    value
}

pub fn backend_value(service_id: u32, backend: &BackendState) -> Backend {
    Backend {
        addr: backend.addr.ip().octets(),
        port: backend.addr.port().to_be_bytes(),
        state: if backend.up {
            backend_state::UP
        } else {
            backend_state::DOWN
        },
        _pad: 0,
        service_id,
        generation: FIRST_GENERATION,
    }
}

/// The address a backend is written as in logs and stats.
pub fn vip_display(addr: Ipv4Addr, port: u16) -> String {
    SocketAddrV4::new(addr, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, dataplane::MemoryDataplane};

    const CONFIG: &str = r#"
        [[service]]
        name = "web"
        vip = "10.200.1.1"
        port = 80
        [[service.backend]]
        address = "10.200.11.2"
        [[service.backend]]
        address = "10.200.12.2"
        port = 8080

        [[service]]
        name = "dns"
        vip = "10.200.1.1"
        port = 53
        protocol = "udp"
        [service.health_check]
        kind = "none"
        [[service.backend]]
        address = "10.200.11.2"
    "#;

    fn table() -> ServiceTable {
        ServiceTable::new(&config::parse(CONFIG).expect("test config is valid"))
    }

    #[test]
    fn ids_follow_configuration_order_across_services() {
        let table = table();
        let ids: Vec<(u32, Vec<u32>)> = table
            .services
            .iter()
            .map(|service| (service.id, service.backends.iter().map(|b| b.id).collect()))
            .collect();
        assert_eq!(ids, vec![(0, vec![0, 1]), (1, vec![2])]);
    }

    #[test]
    fn install_writes_every_backend_down_and_empty_services() {
        let table = table();
        let mut dataplane = MemoryDataplane::default();
        table
            .install(&mut dataplane)
            .expect("memory dataplane never fails");

        assert_eq!(dataplane.backends.len(), 3);
        assert!(dataplane
            .backends
            .values()
            .all(|b| b.state == backend_state::DOWN));
        let backend = dataplane.backends[&1];
        assert_eq!(backend.addr, [10, 200, 12, 2]);
        assert_eq!(backend.port, 8080u16.to_be_bytes());
        assert_eq!(backend.service_id, 0);

        let web = dataplane.services[&service_key(&table.services[0].config)];
        assert_eq!((web.id, web.backend_count), (0, 0));
        let dns_key = service_key(&table.services[1].config);
        assert_eq!(dns_key.protocol, 17);
        assert_eq!(dns_key.port, 53u16.to_be_bytes());
        assert_eq!(dataplane.vip_addresses, vec![[10, 200, 1, 1]]);
    }

    #[test]
    fn health_changes_rewrite_backend_then_service_with_up_backends_only() {
        let mut table = table();
        let mut dataplane = MemoryDataplane::default();
        table
            .install(&mut dataplane)
            .expect("memory dataplane never fails");
        let key = service_key(&table.services[0].config);

        assert!(table
            .set_backend_up(0, 1, true, &mut dataplane)
            .expect("ok"));
        let web = dataplane.services[&key];
        assert_eq!(web.backend_count, 1);
        assert_eq!(web.backends[0], 1);
        assert_eq!(dataplane.backends[&1].state, backend_state::UP);

        assert!(table
            .set_backend_up(0, 0, true, &mut dataplane)
            .expect("ok"));
        let web = dataplane.services[&key];
        assert_eq!(&web.backends[..web.backend_count as usize], &[0, 1]);

        assert!(table
            .set_backend_up(0, 0, false, &mut dataplane)
            .expect("ok"));
        let web = dataplane.services[&key];
        assert_eq!(&web.backends[..web.backend_count as usize], &[1]);
        assert_eq!(dataplane.backends[&0].state, backend_state::DOWN);
    }

    #[test]
    fn repeating_a_state_writes_nothing() {
        let mut table = table();
        let mut dataplane = MemoryDataplane::default();
        table
            .install(&mut dataplane)
            .expect("memory dataplane never fails");
        let writes = dataplane.writes;
        assert!(!table
            .set_backend_up(0, 0, false, &mut dataplane)
            .expect("ok"));
        assert!(!table
            .set_backend_up(9, 0, true, &mut dataplane)
            .expect("ok"));
        assert_eq!(dataplane.writes, writes);
    }
}
