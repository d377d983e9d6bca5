//! The services and backends as the control plane tracks them, and how that state becomes the
//! datapath's `SERVICES`, `BACKENDS` and `SCHEDULE` entries.
//!
//! Ids are assigned in configuration order at start: service `i` has id `i`, and backends are
//! numbered across all services in order, so the same configuration always gives the same ids.
//! A reload keeps the ids of services (by name, with the same listener) and backends (by
//! address and port) that stay, and gives new ones the lowest free ids. An id given to another
//! holder is a new start: a backend id gets a new generation, so flows pinned to the old holder
//! are rescheduled instead of following the id and health reports about the old holder are
//! ignored, and the id's counters are zeroed. A reload is planned whole before anything is
//! written ([`ServiceTable::plan_reload`]) and rolled back if a map update fails partway
//! ([`ServiceTable::apply_reload`]).
//!
//! Both address families go through the same code: a service's key, VIP address and backend
//! endpoints go to its family's maps (`SERVICES` or `SERVICES6`, ...; see
//! [`crate::dataplane`]), while ids, backends and scheduling tables are shared, so an IPv6
//! service is numbered, scheduled, drained and reloaded exactly like an IPv4 one.
//!
//! Each service owns two regions of the shared `SCHEDULE` array. Its table is rebuilt into the
//! region not in use, then the service entry is switched to it in one map update: the datapath
//! never sees a half-written table. Only the entries that differ from what that region held
//! are written (each write is a syscall, and a Maglev table has up to 1000003 entries). The
//! regions of removed services are reused from the reload after the one that removed them (see
//! [`crate::schedule_space`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lb_common::{
    backend_flags, backend_state, scheduler, service_flags, Address, Backend, EndpointKey, Service,
    ServiceKey, Settings, MAX_BACKENDS, MAX_SERVICES,
};

use crate::{
    config::{Config, FlowSettings, FragmentSettings, MaglevKey, Scheduler, ServiceConfig},
    dataplane::{
        AnyEndpointKey, AnyServiceKey, AnyVipProtocol, Dataplane, DataplaneError, WideEndpoint,
    },
    schedule_space::{Block, ScheduleSpace},
    scheduling::{maglev_table, round_robin_table, smooth_weighted_table, TableBackend},
};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("no service named {0:?}")]
    NoSuchService(String),
    #[error("service {service:?} has no backend {backend}")]
    NoSuchBackend {
        service: String,
        backend: SocketAddr,
    },
    #[error(
        "service {service:?} needs {needed} entries of the scheduling table (two tables' worth), \
         and its largest free stretch has {free} of its {size}: space of services removed or \
         moved by the last reload is free from the next reload on; otherwise restart lb-user to \
         size the table for this configuration"
    )]
    ScheduleFull {
        service: String,
        needed: u32,
        free: u32,
        size: u32,
    },
    #[error(
        "the services' scheduling tables need {needed} entries (two per service: \
         maglev_table_size under maglev, the weights' period under weighted, one per backend \
         under round-robin), more than the {most} lb-user allows (256 MiB of kernel memory with \
         room for reloads): lower maglev_table_size or the weights"
    )]
    ScheduleTooLarge { needed: u64, most: u64 },
    /// Cannot happen with a valid configuration (it has at most this many services): ids of
    /// services a reload removes are free for the services it adds.
    #[error(
        "no free service id: all {MAX_SERVICES} are held by services of the new configuration"
    )]
    OutOfServiceIds,
    /// As [`Self::OutOfServiceIds`], for backends.
    #[error(
        "no free backend id: all {MAX_BACKENDS} are held by backends of the new configuration"
    )]
    OutOfBackendIds,
}

/// One backend's identity, weight and health as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub addr: SocketAddr,
    pub up: bool,
    /// The configured weight.
    pub weight: u32,
    /// Drained at run time (`lb-user drain`): takes no new flows, keeps its flows.
    pub drained: bool,
    pub generation: u32,
    /// Reached through the kernel's forwarding (behind a bridge), not XDP_REDIRECT.
    pub via_kernel: bool,
    /// Its address and port also serve another service (see `backend_flags::SHARED_ENDPOINT`).
    pub shared_endpoint: bool,
}

impl BackendState {
    /// The weight new flows see: 0 when drained.
    pub fn effective_weight(&self) -> u32 {
        if self.drained {
            0
        } else {
            self.weight
        }
    }
}

/// Where a service's two tables live in `SCHEDULE`, and what they hold.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Regions {
    offsets: [u32; 2],
    capacity: u32,
    /// Which region the datapath reads now.
    active: usize,
    /// What each region holds as written by us; `None` while unknown: fresh from the
    /// allocator (an earlier service's table may be there), or a write failed partway.
    written: [Option<Vec<u32>>; 2],
}

impl Regions {
    /// Both regions, as one block of the allocator.
    fn block(&self) -> Block {
        Block {
            offset: self.offsets[0],
            len: 2 * self.capacity,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceState {
    pub id: u32,
    pub config: ServiceConfig,
    pub backends: Vec<BackendState>,
    regions: Regions,
}

impl ServiceState {
    /// The table the datapath reads now (empty before the first one is written).
    pub fn table(&self) -> &[u32] {
        self.regions.written[self.regions.active]
            .as_deref()
            .unwrap_or_default()
    }
}

/// Every configured service with its backends' health, and the ids and table space in use.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    pub services: Vec<ServiceState>,
    pub flows: FlowSettings,
    pub fragments: FragmentSettings,
    /// Generation of every backend id ever given out (index = id).
    generations: Vec<u32>,
    /// Which parts of `SCHEDULE` the services' regions take.
    space: ScheduleSpace,
    /// Backend ids given out by the reload in progress.
    handed_out: Vec<u32>,
    /// Backend addresses reached through the kernel's forwarding (see `set_kernel_paths`).
    kernel_paths: BTreeSet<IpAddr>,
}

/// A health checker's report about one backend, for [`ServiceTable::apply_health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub backend_id: u32,
    /// The generation of the id the checker was started for.
    pub generation: u32,
    pub up: bool,
}

/// What [`ServiceTable::apply_health`] made of one report.
#[derive(Clone, Debug)]
pub enum HealthOutcome {
    /// About a backend id that is gone or now names another backend: ignored.
    Stale,
    /// The backend already was in that state: nothing written.
    Unchanged,
    /// The backend changed state and the datapath follows.
    Changed,
    /// The backend changed state, but writing it or its service's table failed (the error may
    /// be shared by every report about the same service).
    Failed(Arc<DataplaneError>),
}

/// The smallest `SCHEDULE` the daemon loads: 2^21 entries (8 MiB), room for eight Maglev
/// services of the default table size (two tables each) beyond what the configuration needs.
pub const MIN_SCHEDULE_SIZE: u32 = 1 << 21;

/// The largest `SCHEDULE` the daemon loads: 2^26 entries (256 MiB of kernel memory). A
/// configuration whose tables need more than half of it is refused before anything loads.
pub const MAX_SCHEDULE_SIZE: u32 = 1 << 26;

/// Generation written for a backend id the first time it is given out.
const FIRST_GENERATION: u32 = 1;

/// What a reload changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    pub services_changed: Vec<String>,
    /// Services that kept their name but not their VIP, port or protocol: to the datapath a
    /// new service (new id, its backends start over), listed here rather than as both added
    /// and removed.
    pub services_moved: Vec<String>,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    /// The health of every backend that stays (by id): its checker resumes from it. A backend
    /// not in here is new, even if its id was another backend's, and starts as at startup.
    pub resumed: BTreeMap<u32, bool>,
}

/// A reload worked out by [`ServiceTable::plan_reload`], not written anywhere yet.
#[derive(Debug)]
pub struct ReloadPlan {
    next: ServiceTable,
    pub summary: ReloadSummary,
    fresh: FreshIds,
}

/// Ids a reload gives to a backend or service that did not hold them: their counters start
/// from zero instead of the previous holder's.
#[derive(Debug, Default)]
struct FreshIds {
    backends: BTreeSet<u32>,
    services: BTreeSet<u32>,
}

/// Why a reload did not happen, and what state it left.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Refused before anything was written: the running state is untouched.
    #[error(transparent)]
    Refused(TableError),
    /// A map update failed partway; the running state was written back.
    #[error(
        "writing the new configuration to the datapath failed ({cause}); the running \
         configuration was written back"
    )]
    RolledBack { cause: Box<DataplaneError> },
    /// A map update failed partway, and so did writing the running state back.
    #[error(
        "writing the new configuration to the datapath failed ({cause}), and writing the \
         running configuration back failed too ({rollback}): the datapath holds parts of both; \
         restart lb-user"
    )]
    Inconsistent {
        cause: Box<DataplaneError>,
        rollback: Box<DataplaneError>,
    },
}

impl ServiceTable {
    /// The `SCHEDULE` size to load the datapath with for `config`: twice what it needs (two
    /// regions per service), twice over again so reloads can add services and backends, and
    /// never less than [`MIN_SCHEDULE_SIZE`] (8 MiB of kernel memory), so that a reload can
    /// switch a service to Maglev or add a few without a restart.
    /// A configuration whose tables alone need more than half of [`MAX_SCHEDULE_SIZE`] is an
    /// error: at the limits (1024 Maglev services of 1000003 entries) it would ask the kernel
    /// for gigabytes.
    pub fn schedule_size_for(config: &Config) -> Result<u32, TableError> {
        let needed: u64 = config
            .services
            .iter()
            .map(|s| 2 * u64::from(capacity(s)))
            .sum();
        let most = u64::from(MAX_SCHEDULE_SIZE / 2);
        if needed > most {
            return Err(TableError::ScheduleTooLarge { needed, most });
        }
        Ok((needed * 2).clamp(u64::from(MIN_SCHEDULE_SIZE), u64::from(MAX_SCHEDULE_SIZE)) as u32)
    }

    /// All backends start down: none gets traffic before it passed a probe.
    pub fn new(config: &Config, schedule_size: u32) -> Result<Self, TableError> {
        let mut table = Self {
            services: Vec::new(),
            flows: config.flows,
            fragments: config.fragments,
            generations: Vec::new(),
            space: ScheduleSpace::new(schedule_size),
            handed_out: Vec::new(),
            kernel_paths: BTreeSet::new(),
        };
        for (index, service) in config.services.iter().enumerate() {
            let backends = service
                .backends
                .iter()
                .map(|backend| table.new_backend(backend.addr, backend.weight))
                .collect::<Result<Vec<_>, _>>()?;
            let regions = table.allocate(service)?;
            table.services.push(ServiceState {
                id: index as u32,
                config: service.clone(),
                backends,
                regions,
            });
        }
        Ok(table)
    }

    /// Says which backend addresses are reached through the kernel's forwarding rather than
    /// XDP_REDIRECT (those behind a bridge). Applies to the backends now and to those a reload
    /// adds; call it before `install` and before each `reload`.
    pub fn set_kernel_paths(&mut self, addresses: BTreeSet<IpAddr>) {
        for service in &mut self.services {
            for backend in &mut service.backends {
                backend.via_kernel = addresses.contains(&backend.addr.ip());
            }
        }
        self.kernel_paths = addresses;
    }

    /// Like [`Self::set_kernel_paths`] on a running datapath: also writes every backend whose
    /// path changed. Returns those backends ("ADDRESS:PORT of SERVICE"), for the log; on an
    /// error, the backends written before it keep their new path.
    pub fn update_kernel_paths(
        &mut self,
        addresses: BTreeSet<std::net::IpAddr>,
        dataplane: &mut impl Dataplane,
    ) -> Result<Vec<String>, DataplaneError> {
        let mut changed = Vec::new();
        for service in &mut self.services {
            for backend in &mut service.backends {
                let via_kernel = addresses.contains(&backend.addr.ip());
                if backend.via_kernel != via_kernel {
                    backend.via_kernel = via_kernel;
                    dataplane.set_backend(backend.id, &backend_value(service.id, backend))?;
                    changed.push(format!("{} of {}", backend.addr, service.config.name));
                }
            }
        }
        self.kernel_paths = addresses;
        Ok(changed)
    }

    /// Writes the settings, every backend, service and VIP address to a freshly loaded
    /// datapath.
    pub fn install(&mut self, dataplane: &mut impl Dataplane) -> Result<(), DataplaneError> {
        mark_shared_endpoints(&mut self.services);
        dataplane.set_settings(&settings(&self.flows, &self.fragments))?;
        dataplane.set_ports(&port_bitmap(&self.services))?;
        for (key, endpoint) in endpoints(&self.services) {
            dataplane.set_endpoint(key, &endpoint)?;
        }
        for index in 0..self.services.len() {
            let service = &self.services[index];
            for backend in &service.backends {
                dataplane.set_backend(backend.id, &backend_value(service.id, backend))?;
            }
            dataplane.add_vip_address(service.config.vip)?;
            self.publish(index, dataplane)?;
        }
        for service in three_tuple_services(&self.services).into_values() {
            dataplane.set_three_tuple_service(service)?;
        }
        Ok(())
    }

    /// Records a health transition of backend `backend_id` and updates the datapath: the
    /// backend entry first (so flows pinned to a backend that went down move at once), then the
    /// service's table. Returns false, writing nothing, when nothing changed.
    pub fn set_backend_up(
        &mut self,
        backend_id: u32,
        up: bool,
        dataplane: &mut impl Dataplane,
    ) -> Result<bool, DataplaneError> {
        let Some((index, position)) = self.find_backend_id(backend_id) else {
            return Ok(false);
        };
        let service = &mut self.services[index];
        let backend = &mut service.backends[position];
        if backend.up == up {
            return Ok(false);
        }
        backend.up = up;
        dataplane.set_backend(backend.id, &backend_value(service.id, backend))?;
        self.publish(index, dataplane)?;
        Ok(true)
    }

    /// Applies health checkers' reports together: each backend entry that changes is written
    /// at once (so flows pinned to a backend that went down move at once), then each affected
    /// service's table is rebuilt and written once, however many of its backends changed. A
    /// report about an earlier holder of an id (queued before a reload gave the id to another
    /// backend) changes nothing. Returns what became of each report, in order.
    pub fn apply_health(
        &mut self,
        reports: &[HealthReport],
        dataplane: &mut impl Dataplane,
    ) -> Vec<HealthOutcome> {
        let mut outcomes = Vec::with_capacity(reports.len());
        // Service index -> the reports that changed one of its backends.
        let mut affected: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (report_index, report) in reports.iter().enumerate() {
            let Some((index, position)) = self.find_backend_id(report.backend_id) else {
                outcomes.push(HealthOutcome::Stale);
                continue;
            };
            let service = &mut self.services[index];
            let backend = &mut service.backends[position];
            if backend.generation != report.generation {
                outcomes.push(HealthOutcome::Stale);
            } else if backend.up == report.up {
                outcomes.push(HealthOutcome::Unchanged);
            } else {
                backend.up = report.up;
                match dataplane.set_backend(backend.id, &backend_value(service.id, backend)) {
                    Ok(()) => outcomes.push(HealthOutcome::Changed),
                    Err(error) => outcomes.push(HealthOutcome::Failed(Arc::new(error))),
                }
                affected.entry(index).or_default().push(report_index);
            }
        }
        for (index, report_indices) in affected {
            if let Err(error) = self.publish(index, dataplane) {
                let error = Arc::new(error);
                for report_index in report_indices {
                    outcomes[report_index] = HealthOutcome::Failed(error.clone());
                }
            }
        }
        outcomes
    }

    /// Drains (no new flows, existing flows continue) or undrains a backend. Returns false
    /// when it already was in that state.
    pub fn set_drained(
        &mut self,
        service_name: &str,
        addr: SocketAddr,
        drained: bool,
        dataplane: &mut impl Dataplane,
    ) -> Result<bool, TableError> {
        let index = self.service_index(service_name)?;
        let service = &mut self.services[index];
        let backend = service
            .backends
            .iter_mut()
            .find(|backend| backend.addr == addr)
            .ok_or_else(|| TableError::NoSuchBackend {
                service: service_name.to_string(),
                backend: addr,
            })?;
        if backend.drained == drained {
            return Ok(false);
        }
        backend.drained = drained;
        self.publish(index, dataplane)?;
        Ok(true)
    }

    /// Applies a new configuration: [`Self::plan_reload`], then [`Self::apply_reload`].
    pub fn reload(
        &mut self,
        config: &Config,
        dataplane: &mut impl Dataplane,
    ) -> Result<ReloadSummary, ReloadError> {
        let plan = self
            .plan_reload(config, self.kernel_paths.clone())
            .map_err(ReloadError::Refused)?;
        self.apply_reload(plan, dataplane)
    }

    /// Works out what `config` makes of the running state, touching neither this table nor
    /// the datapath: every reason of ours to refuse (ids, table space) comes out here.
    /// Services are matched by name, backends by address; what stays keeps its id, health and
    /// drain state. `kernel_paths` replaces [`Self::set_kernel_paths`]'s addresses for the new
    /// state only, so a refused reload leaves them as they were.
    pub fn plan_reload(
        &self,
        config: &Config,
        kernel_paths: BTreeSet<IpAddr>,
    ) -> Result<ReloadPlan, TableError> {
        let mut next = self.clone();
        next.handed_out.clear();
        // What the previous reload gave back has had the time between two reloads to go out
        // of use: from now on it is free.
        next.space.end_quarantine();
        next.set_kernel_paths(kernel_paths);
        next.flows = config.flows;
        next.fragments = config.fragments;
        let mut summary = ReloadSummary::default();
        let mut services = Vec::with_capacity(config.services.len());
        let old_services = std::mem::take(&mut next.services);
        // Ids of backends that stay; every other id may be given to a new backend.
        let kept_ids: BTreeSet<u32> = config
            .services
            .iter()
            .filter_map(|service| {
                let old = old_services
                    .iter()
                    .find(|old| old.config.name == service.name)?;
                (service_key(&old.config) == service_key(service)).then_some((old, service))
            })
            .flat_map(|(old, service)| {
                old.backends
                    .iter()
                    .filter(|backend| service.backends.iter().any(|b| b.addr == backend.addr))
                    .map(|backend| backend.id)
            })
            .collect();
        // Ids of services that stay; those of removed services are free for added ones, so
        // even replacing every service at once fits.
        let kept_service_ids: BTreeSet<u32> = config
            .services
            .iter()
            .filter_map(|service| {
                old_services.iter().find(|old| {
                    old.config.name == service.name
                        && service_key(&old.config) == service_key(service)
                })
            })
            .map(|old| old.id)
            .collect();
        let mut fresh = FreshIds::default();

        for service in &config.services {
            let old = old_services
                .iter()
                .find(|old| old.config.name == service.name);
            let same_listener =
                old.is_some_and(|old| service_key(&old.config) == service_key(service));
            let mut backends = Vec::with_capacity(service.backends.len());
            for backend in &service.backends {
                let kept = old.filter(|_| same_listener).and_then(|old| {
                    old.backends
                        .iter()
                        .find(|candidate| candidate.addr == backend.addr)
                });
                match kept {
                    Some(kept) => backends.push(BackendState {
                        weight: backend.weight,
                        via_kernel: next.kernel_paths.contains(&backend.addr.ip()),
                        ..kept.clone()
                    }),
                    None => {
                        summary
                            .backends_added
                            .push(format!("{} of {}", backend.addr, service.name));
                        backends.push(next.new_backend_after(
                            backend.addr,
                            backend.weight,
                            &kept_ids,
                        )?);
                    }
                }
            }
            let (id, regions) = match old {
                Some(old) if same_listener => {
                    if old.config != *service {
                        summary.services_changed.push(service.name.clone());
                    }
                    let regions = if old.regions.capacity >= capacity(service) {
                        old.regions.clone()
                    } else {
                        next.allocate(service)?
                    };
                    (old.id, regions)
                }
                _ => {
                    if old.is_some() {
                        summary.services_moved.push(service.name.clone());
                    } else {
                        summary.services_added.push(service.name.clone());
                    }
                    let id = free_service_id(&kept_service_ids, &services)?;
                    fresh.services.insert(id);
                    (id, next.allocate(service)?)
                }
            };
            services.push(ServiceState {
                id,
                config: service.clone(),
                backends,
                regions,
            });
        }
        // Regions no service keeps: removed services', and those of services that outgrew them.
        for old in &old_services {
            let block = old.regions.block();
            if !services
                .iter()
                .any(|service| service.regions.block() == block)
            {
                next.space.release(block);
            }
        }
        for old in &old_services {
            for backend in old
                .backends
                .iter()
                .filter(|backend| !kept_ids.contains(&backend.id))
            {
                summary
                    .backends_removed
                    .push(format!("{} of {}", backend.addr, old.config.name));
            }
            let moved = summary.services_moved.contains(&old.config.name);
            if !kept_service_ids.contains(&old.id) && !moved {
                summary.services_removed.push(old.config.name.clone());
            }
        }
        next.services = services;
        mark_shared_endpoints(&mut next.services);
        summary.resumed = next
            .services
            .iter()
            .flat_map(|service| &service.backends)
            .filter(|backend| kept_ids.contains(&backend.id))
            .map(|backend| (backend.id, backend.up))
            .collect();
        fresh.backends = next.handed_out.iter().copied().collect();
        Ok(ReloadPlan {
            next,
            summary,
            fresh,
        })
    }

    /// Writes a planned reload to the datapath and makes it the running state. A map update
    /// that fails (the kernel refusing memory, say: nothing of ours) is rolled back: the
    /// running state is written again, and the error says whether that worked.
    pub fn apply_reload(
        &mut self,
        plan: ReloadPlan,
        dataplane: &mut impl Dataplane,
    ) -> Result<ReloadSummary, ReloadError> {
        let ReloadPlan {
            mut next,
            summary,
            fresh,
        } = plan;
        match write_changes(&self.services, &mut next, &fresh, dataplane) {
            Ok(()) => {
                *self = next;
                Ok(summary)
            }
            Err(cause) => Err(self.roll_back(&next, cause, dataplane)),
        }
    }

    /// Writes the running state back over a reload that failed halfway through `failed`.
    fn roll_back(
        &mut self,
        failed: &ServiceTable,
        cause: DataplaneError,
        dataplane: &mut impl Dataplane,
    ) -> ReloadError {
        let mut restored = self.clone();
        // What the failed attempt handed out stays spent: flows may be pinned to those ids and
        // generations, and its tables may be in those regions.
        restored.generations = failed.generations.clone();
        // The attempt's new regions may be read by packets that saw its service entries: they
        // wait in quarantine like a removed service's; the running services' regions are in
        // use again.
        restored.space = failed.space.clone();
        for service in &failed.services {
            restored.space.release(service.regions.block());
        }
        for service in &mut restored.services {
            restored.space.reclaim(service.regions.block());
            if let Some(written) = failed.services.iter().find(|written| {
                written.id == service.id && written.regions.offsets == service.regions.offsets
            }) {
                // The attempt may have switched the service to its other region, and written
                // either: publish into the one the datapath does not read, knowing what the
                // attempt left in each.
                service.regions.active = written.regions.active;
                service.regions.written = written.regions.written.clone();
            }
        }
        match write_changes(
            &failed.services,
            &mut restored,
            &FreshIds::default(),
            dataplane,
        ) {
            Ok(()) => {
                *self = restored;
                ReloadError::RolledBack {
                    cause: Box::new(cause),
                }
            }
            Err(rollback) => ReloadError::Inconsistent {
                cause: Box::new(cause),
                rollback: Box::new(rollback),
            },
        }
    }

    /// The index of the service called `name`.
    pub fn service_index(&self, name: &str) -> Result<usize, TableError> {
        self.services
            .iter()
            .position(|service| service.config.name == name)
            .ok_or_else(|| TableError::NoSuchService(name.to_string()))
    }

    /// The service index and backend position holding backend id `id`.
    pub fn find_backend_id(&self, id: u32) -> Option<(usize, usize)> {
        self.services
            .iter()
            .enumerate()
            .find_map(|(index, service)| {
                service
                    .backends
                    .iter()
                    .position(|backend| backend.id == id)
                    .map(|p| (index, p))
            })
    }

    /// Rebuilds service `index`'s table into its spare region and switches the service to it.
    fn publish(
        &mut self,
        index: usize,
        dataplane: &mut impl Dataplane,
    ) -> Result<(), DataplaneError> {
        let service = &mut self.services[index];
        let mut table = build_table(service);
        // Tables never outgrow their region: capacity() bounds every scheduler's table.
        table.truncate(service.regions.capacity as usize);
        let spare = 1 - service.regions.active;
        let offset = service.regions.offsets[spare];
        // Unknown until the write is through: a failure may leave it half written.
        let before = service.regions.written[spare].take();
        write_table(dataplane, offset, before.as_deref(), &table)?;
        let value = Service {
            id: service.id,
            scheduler: scheduler_value(service.config.scheduler),
            flags: flags_value(service.config.scheduler),
            _pad: [0; 2],
            table_offset: offset,
            table_len: table.len() as u32,
        };
        service.regions.written[spare] = Some(table);
        dataplane.set_service(service_key(&service.config), &value)?;
        service.regions.active = spare;
        Ok(())
    }

    /// Two regions for `service`'s table, from the space free now.
    fn allocate(&mut self, service: &ServiceConfig) -> Result<Regions, TableError> {
        let capacity = capacity(service).max(1);
        let needed = capacity * 2;
        let Some(block) = self.space.allocate(needed) else {
            return Err(TableError::ScheduleFull {
                service: service.name.clone(),
                needed,
                free: self.space.largest_free(),
                size: self.space.size(),
            });
        };
        Ok(Regions {
            offsets: [block.offset, block.offset + capacity],
            capacity,
            active: 1,
            written: [None, None],
        })
    }

    fn new_backend(&mut self, addr: SocketAddr, weight: u32) -> Result<BackendState, TableError> {
        let id = self.generations.len() as u32;
        if id >= MAX_BACKENDS {
            return Err(TableError::OutOfBackendIds);
        }
        self.generations.push(FIRST_GENERATION);
        Ok(BackendState {
            id,
            addr,
            up: false,
            weight,
            drained: false,
            generation: FIRST_GENERATION,
            via_kernel: self.kernel_paths.contains(&addr.ip()),
            shared_endpoint: false,
        })
    }

    /// A backend for a reload: the lowest id neither kept by a backend that stays nor handed
    /// out already by this reload.
    fn new_backend_after(
        &mut self,
        addr: SocketAddr,
        weight: u32,
        kept_ids: &BTreeSet<u32>,
    ) -> Result<BackendState, TableError> {
        let in_use: BTreeSet<u32> = kept_ids
            .iter()
            .chain(self.handed_out.iter())
            .copied()
            .collect();
        let Some(id) = (0..MAX_BACKENDS).find(|id| !in_use.contains(id)) else {
            return Err(TableError::OutOfBackendIds);
        };
        self.handed_out.push(id);
        let index = id as usize;
        if index >= self.generations.len() {
            self.generations.resize(index + 1, 0);
        }
        self.generations[index] += 1;
        let generation = self.generations[index];
        Ok(BackendState {
            id,
            addr,
            up: false,
            weight,
            drained: false,
            generation,
            via_kernel: self.kernel_paths.contains(&addr.ip()),
            shared_endpoint: false,
        })
    }
}

/// Writes the datapath over from `from` (what it holds now) to `to`. Removals go first, so no
/// map ever holds more than the larger of the two states (the configuration's limits keep each
/// within its map); every removal of something already absent counts as done, so writing again
/// after a failure, either way, converges. Returns at the first failed update.
fn write_changes(
    from: &[ServiceState],
    to: &mut ServiceTable,
    fresh: &FreshIds,
    dataplane: &mut impl Dataplane,
) -> Result<(), DataplaneError> {
    let stays = |gone: &BackendState| {
        to.services
            .iter()
            .flat_map(|service| &service.backends)
            .any(|backend| backend.id == gone.id && backend.generation == gone.generation)
    };
    for service in from {
        for backend in service.backends.iter().filter(|backend| !stays(backend)) {
            // Down first: flows pinned to it move on their next packet.
            let gone = BackendState {
                up: false,
                ..backend.clone()
            };
            dataplane.set_backend(backend.id, &backend_value(service.id, &gone))?;
        }
    }

    let new_keys: Vec<AnyServiceKey> = to
        .services
        .iter()
        .map(|service| service_key(&service.config))
        .collect();
    for service in from {
        let key = service_key(&service.config);
        if !new_keys.contains(&key) {
            dataplane.remove_service(key)?;
        }
    }
    let new_three_tuple = three_tuple_services(&to.services);
    for key in three_tuple_services(from)
        .into_keys()
        .filter(|key| !new_three_tuple.contains_key(key))
    {
        dataplane.remove_three_tuple_service(key)?;
    }
    let new_endpoints = endpoints(&to.services);
    for key in endpoints(from)
        .into_keys()
        .filter(|key| !new_endpoints.contains_key(key))
    {
        dataplane.remove_endpoint(key)?;
    }
    // Each address once, however many services shared it.
    let new_vips: BTreeSet<IpAddr> = to.services.iter().map(|s| s.config.vip).collect();
    let old_vips: BTreeSet<IpAddr> = from.iter().map(|s| s.config.vip).collect();
    for vip in old_vips.difference(&new_vips) {
        dataplane.remove_vip_address(*vip)?;
    }

    // The ports of both states before anything new is published: a packet for a new service,
    // or from a new backend port, whose port were still clear would pass untranslated as the
    // host's own traffic. The new state's ports alone once it is all written.
    dataplane.set_ports(&port_bitmap(from.iter().chain(&to.services)))?;
    for (key, endpoint) in &new_endpoints {
        dataplane.set_endpoint(*key, endpoint)?;
    }
    for index in 0..to.services.len() {
        let service = &to.services[index];
        if fresh.services.contains(&service.id) {
            dataplane.reset_service_stats(service.id)?;
        }
        for backend in &service.backends {
            if fresh.backends.contains(&backend.id) {
                dataplane.reset_backend_stats(backend.id)?;
            }
            dataplane.set_backend(backend.id, &backend_value(service.id, backend))?;
        }
        dataplane.add_vip_address(service.config.vip)?;
        to.publish(index, dataplane)?;
    }
    dataplane.set_ports(&port_bitmap(&to.services))?;
    for service in new_three_tuple.values() {
        dataplane.set_three_tuple_service(*service)?;
    }
    Ok(())
}

/// Writes `table` into `SCHEDULE` from `offset` on, where `before` was (if known): only the
/// runs of entries that differ, each in one call.
fn write_table(
    dataplane: &mut impl Dataplane,
    offset: u32,
    before: Option<&[u32]>,
    table: &[u32],
) -> Result<(), DataplaneError> {
    let Some(before) = before else {
        return dataplane.set_schedule(offset, table);
    };
    let differs = |slot: usize| before.get(slot) != Some(&table[slot]);
    let mut slot = 0;
    while slot < table.len() {
        if !differs(slot) {
            slot += 1;
            continue;
        }
        let start = slot;
        while slot < table.len() && differs(slot) {
            slot += 1;
        }
        dataplane.set_schedule(offset + start as u32, &table[start..slot])?;
    }
    Ok(())
}

/// An endpoint key of `addr`'s family.
fn endpoint_key(service: &ServiceConfig, addr: SocketAddr) -> AnyEndpointKey {
    let (port, protocol) = (addr.port().to_be_bytes(), service.protocol.number());
    match addr.ip() {
        IpAddr::V4(ip) => AnyEndpointKey::V4(EndpointKey {
            addr: ip.octets(),
            port,
            protocol,
            _pad: 0,
        }),
        IpAddr::V6(ip) => AnyEndpointKey::V6(EndpointKey {
            addr: ip.octets(),
            port,
            protocol,
            _pad: 0,
        }),
    }
}

/// An address in the datapath's 16-byte form: IPv4 in the first four bytes, the rest zero.
pub fn wide_address(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(ip) => ip.octets().widen(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// Every backend endpoint and the service it answers for (`shared` when several). The two
/// families' endpoints never meet: their keys differ in kind, as their maps do.
pub fn endpoints(services: &[ServiceState]) -> BTreeMap<AnyEndpointKey, WideEndpoint> {
    let mut endpoints: BTreeMap<AnyEndpointKey, WideEndpoint> = BTreeMap::new();
    for service in services {
        for backend in &service.backends {
            let key = endpoint_key(&service.config, backend.addr);
            let value = WideEndpoint {
                service_addr: wide_address(service.config.vip),
                service_port: service.config.port.to_be_bytes(),
                shared: 0,
                _pad: 0,
                service_id: service.id,
            };
            endpoints
                .entry(key)
                .and_modify(|known| {
                    if known.service_id != service.id {
                        known.shared = 1;
                    }
                })
                .or_insert(value);
        }
    }
    endpoints
}

/// Marks the backends whose endpoint serves several services: they need reverse entries.
fn mark_shared_endpoints(services: &mut [ServiceState]) {
    let endpoints = endpoints(services);
    for service in services.iter_mut() {
        let config = service.config.clone();
        for backend in &mut service.backends {
            backend.shared_endpoint = endpoints
                .get(&endpoint_key(&config, backend.addr))
                .is_some_and(|endpoint| endpoint.shared != 0);
        }
    }
}

/// Every service port and every backend port, as the datapath's `PORTS` bitmap.
pub fn port_bitmap<'a>(
    services: impl IntoIterator<Item = &'a ServiceState>,
) -> lb_common::PortBitmap {
    let mut bitmap = lb_common::PortBitmap::EMPTY;
    for service in services {
        bitmap.insert(service.config.port);
        for backend in &service.backends {
            bitmap.insert(backend.addr.port());
        }
    }
    bitmap
}

/// The lowest id neither kept by a service that stays nor given to one planned already.
fn free_service_id(kept: &BTreeSet<u32>, planned: &[ServiceState]) -> Result<u32, TableError> {
    (0..MAX_SERVICES)
        .find(|id| !kept.contains(id) && !planned.iter().any(|service| service.id == *id))
        .ok_or(TableError::OutOfServiceIds)
}

/// Entries a service's table can need: every backend once, one period of its weights, or the
/// Maglev table size.
fn capacity(service: &ServiceConfig) -> u32 {
    match service.scheduler {
        Scheduler::RoundRobin => service.backends.len() as u32,
        Scheduler::Weighted => service.backends.iter().map(|backend| backend.weight).sum(),
        Scheduler::Maglev { table_size, .. } => table_size,
    }
}

/// The table new flows of `service` are scheduled from: its backends that are up and not
/// drained.
fn build_table(service: &ServiceState) -> Vec<u32> {
    let eligible: Vec<TableBackend> = service
        .backends
        .iter()
        .filter(|backend| backend.up)
        .map(|backend| TableBackend {
            id: backend.id,
            key: backend.addr.to_string(),
            weight: backend.effective_weight(),
        })
        .collect();
    match service.config.scheduler {
        Scheduler::RoundRobin => round_robin_table(&eligible),
        Scheduler::Weighted => smooth_weighted_table(&eligible),
        Scheduler::Maglev { table_size, .. } => maglev_table(&eligible, table_size),
    }
}

fn scheduler_value(scheduler: Scheduler) -> u8 {
    match scheduler {
        Scheduler::RoundRobin => scheduler::ROUND_ROBIN,
        Scheduler::Weighted => scheduler::WEIGHTED,
        Scheduler::Maglev { .. } => scheduler::MAGLEV,
    }
}

fn flags_value(scheduler: Scheduler) -> u8 {
    match scheduler {
        Scheduler::Maglev {
            key: MaglevKey::ThreeTuple,
            ..
        } => service_flags::HASH_3_TUPLE,
        _ => 0,
    }
}

/// The (vip, protocol) of every `maglev_key = "3-tuple"` service, and its key: the datapath's
/// `THREE_TUPLE_SERVICES` and `THREE_TUPLE_SERVICES6`. The configuration allows one per (vip,
/// protocol).
pub fn three_tuple_services(services: &[ServiceState]) -> BTreeMap<AnyVipProtocol, AnyServiceKey> {
    services
        .iter()
        .filter(|service| flags_value(service.config.scheduler) & service_flags::HASH_3_TUPLE != 0)
        .map(|service| {
            let key = service_key(&service.config);
            (AnyVipProtocol::of(&key), key)
        })
        .collect()
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub fn settings(flows: &FlowSettings, fragments: &FragmentSettings) -> Settings {
    Settings {
        tcp_timeout_ns: nanos(flows.tcp_timeout),
        tcp_closing_timeout_ns: nanos(flows.tcp_closing_timeout),
        udp_timeout_ns: nanos(flows.udp_timeout),
        fragment_timeout_ns: nanos(fragments.timeout),
    }
}

/// The service's key in its family's map.
pub fn service_key(config: &ServiceConfig) -> AnyServiceKey {
    let (port, protocol) = (config.port.to_be_bytes(), config.protocol.number());
    match config.vip {
        IpAddr::V4(vip) => AnyServiceKey::V4(ServiceKey {
            addr: vip.octets(),
            port,
            protocol,
            _pad: 0,
        }),
        IpAddr::V6(vip) => AnyServiceKey::V6(ServiceKey {
            addr: vip.octets(),
            port,
            protocol,
            _pad: 0,
        }),
    }
}

pub fn backend_value(service_id: u32, backend: &BackendState) -> Backend {
    Backend {
        addr: wide_address(backend.addr.ip()),
        port: backend.addr.port().to_be_bytes(),
        state: if backend.up {
            backend_state::UP
        } else {
            backend_state::DOWN
        },
        flags: if backend.via_kernel {
            backend_flags::VIA_KERNEL
        } else {
            0
        } | if backend.shared_endpoint {
            backend_flags::SHARED_ENDPOINT
        } else {
            0
        } | if backend.addr.is_ipv6() {
            backend_flags::IPV6
        } else {
            0
        },
        service_id,
        generation: backend.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, dataplane::MemoryDataplane};
    use lb_common::{TrafficStats, VipProtocol};

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
        scheduler = "maglev"
        maglev_table_size = 1009
        [service.health_check]
        kind = "none"
        [[service.backend]]
        address = "10.200.11.2"
        [[service.backend]]
        address = "10.200.12.2"
        weight = 3
    "#;

    /// A service on a VIP of its own: as a whole configuration, it removes web and dns (which
    /// share 10.200.1.1) and adds api.
    const ELSEWHERE: &str = r#"
        [[service]]
        name = "api"
        vip = "10.200.1.5"
        port = 443
        [[service.backend]]
        address = "10.200.14.2"
    "#;

    fn installed(text: &str) -> (ServiceTable, MemoryDataplane) {
        let config = config::parse(text).expect("test config is valid");
        let mut table = ServiceTable::new(
            &config,
            ServiceTable::schedule_size_for(&config).expect("fits"),
        )
        .expect("fits");
        let mut dataplane = MemoryDataplane::default();
        table
            .install(&mut dataplane)
            .expect("memory dataplane never fails");
        (table, dataplane)
    }

    fn all_up(table: &mut ServiceTable, dataplane: &mut MemoryDataplane) {
        let ids: Vec<u32> = table
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        for id in ids {
            table.set_backend_up(id, true, dataplane).expect("ok");
        }
    }

    fn key(table: &ServiceTable, name: &str) -> AnyServiceKey {
        let service = table
            .services
            .iter()
            .find(|s| s.config.name == name)
            .expect("service");
        service_key(&service.config)
    }

    #[test]
    fn a_configuration_whose_tables_would_take_gigabytes_is_refused() {
        let maglev_services = |count: u16| {
            (0..count)
                .map(|index| {
                    format!(
                        "[[service]]\nname = \"m{index}\"\nvip = \"10.200.1.1\"\nport = {}\n\
                         scheduler = \"maglev\"\nmaglev_table_size = 1000003\n\
                         [service.health_check]\nkind = \"none\"\n\
                         [[service.backend]]\naddress = \"10.200.11.2\"\n",
                        1000 + index
                    )
                })
                .collect::<String>()
        };
        // 16 services need 32000096 entries, within the 33554432 allowed; 17 are too many.
        let fits = config::parse(&maglev_services(16)).expect("valid");
        assert_eq!(
            ServiceTable::schedule_size_for(&fits).expect("fits"),
            2 * 32_000_096
        );
        let too_many = config::parse(&maglev_services(17)).expect("valid");
        let error = ServiceTable::schedule_size_for(&too_many).expect_err("too large");
        assert!(
            error.to_string().contains("need 34000102 entries")
                && error.to_string().contains("lower maglev_table_size"),
            "{error}"
        );
    }

    #[test]
    fn ids_follow_configuration_order_across_services() {
        let (table, _) = installed(CONFIG);
        let ids: Vec<(u32, Vec<u32>)> = table
            .services
            .iter()
            .map(|service| (service.id, service.backends.iter().map(|b| b.id).collect()))
            .collect();
        assert_eq!(ids, vec![(0, vec![0, 1]), (1, vec![2, 3])]);
    }

    #[test]
    fn install_writes_settings_backends_down_and_empty_tables() {
        let (table, dataplane) = installed(CONFIG);
        assert_eq!(dataplane.backends.len(), 4);
        assert!(dataplane
            .backends
            .values()
            .all(|b| b.state == backend_state::DOWN));
        let backend = dataplane.backends[&1];
        assert_eq!(backend.addr[..4], [10, 200, 12, 2]);
        assert_eq!(backend.port, 8080u16.to_be_bytes());
        assert_eq!(
            (backend.service_id, backend.generation),
            (0, FIRST_GENERATION)
        );
        assert_eq!(dataplane.services[&key(&table, "web")].table_len, 0);
        let dns = dataplane.services[&key(&table, "dns")];
        assert_eq!(dns.scheduler, scheduler::MAGLEV);
        assert_eq!(
            dataplane.vip_addresses,
            ["10.200.1.1".parse::<IpAddr>().expect("ip")]
        );
        let settings = dataplane.settings.expect("settings written");
        let ports = dataplane.ports.expect("ports written");
        let bit = |port: u16| ports.contains(port.to_be_bytes());
        assert!(
            bit(80) && bit(8080) && bit(53),
            "service and backend ports are in the bitmap"
        );
        assert!(!bit(22) && !bit(443));
        assert_eq!(settings.tcp_timeout_ns, 15 * 60 * 1_000_000_000);
    }

    #[test]
    fn health_changes_rewrite_the_table_with_up_backends_only() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let web = key(&table, "web");
        assert!(table.set_backend_up(1, true, &mut dataplane).expect("ok"));
        assert_eq!(dataplane.table(&web), vec![1]);
        assert_eq!(dataplane.backends[&1].state, backend_state::UP);
        assert!(table.set_backend_up(0, true, &mut dataplane).expect("ok"));
        assert_eq!(dataplane.table(&web), vec![0, 1]);
        assert!(table.set_backend_up(0, false, &mut dataplane).expect("ok"));
        assert_eq!(dataplane.table(&web), vec![1]);
        assert_eq!(dataplane.backends[&0].state, backend_state::DOWN);
    }

    #[test]
    fn a_new_table_goes_to_the_spare_region_then_the_service_switches() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let web = key(&table, "web");
        let first = dataplane.services[&web].table_offset;
        table.set_backend_up(0, true, &mut dataplane).expect("ok");
        let second = dataplane.services[&web].table_offset;
        table.set_backend_up(1, true, &mut dataplane).expect("ok");
        let third = dataplane.services[&web].table_offset;
        assert_ne!(first, second, "never rewrite the table in use");
        assert_eq!(first, third, "two regions, used in turn");
    }

    #[test]
    fn maglev_tables_follow_weights_and_drain() {
        let (mut table, mut dataplane) = installed(CONFIG);
        all_up(&mut table, &mut dataplane);
        let dns = key(&table, "dns");
        let entries = dataplane.table(&dns);
        assert_eq!(entries.len(), 1009);
        let heavy = entries.iter().filter(|&&id| id == 3).count();
        assert!(
            (740..=775).contains(&heavy),
            "weight 3 of 4 should get ~757 entries: {heavy}"
        );

        let addr: SocketAddr = "10.200.12.2:53".parse().expect("address");
        assert!(table
            .set_drained("dns", addr, true, &mut dataplane)
            .expect("ok"));
        assert!(
            dataplane.table(&dns).iter().all(|&id| id == 2),
            "drained: no new flows"
        );
        assert_eq!(
            dataplane.backends[&3].state,
            backend_state::UP,
            "its flows continue"
        );
        assert!(!table
            .set_drained("dns", addr, true, &mut dataplane)
            .expect("ok"));
        assert!(table
            .set_drained("dns", addr, false, &mut dataplane)
            .expect("ok"));
        assert_eq!(
            dataplane.table(&dns),
            entries,
            "undrain restores the same table"
        );

        let error = table.set_drained(
            "dns",
            "10.9.9.9:53".parse().expect("a"),
            true,
            &mut dataplane,
        );
        assert!(
            matches!(error, Err(TableError::NoSuchBackend { .. })),
            "{error:?}"
        );
        let error = table.set_drained("nope", addr, true, &mut dataplane);
        assert!(
            matches!(error, Err(TableError::NoSuchService(_))),
            "{error:?}"
        );
    }

    #[test]
    fn kernel_paths_change_only_the_backends_that_move() {
        let (mut table, mut dataplane) = installed(CONFIG);
        all_up(&mut table, &mut dataplane);
        let first = table.services[0].backends[0].clone();
        let moved = BTreeSet::from([first.addr.ip()]);
        let changed = table
            .update_kernel_paths(moved.clone(), &mut dataplane)
            .expect("update");
        let dns_backend = table.services[1].backends[0].addr;
        assert_eq!(
            changed,
            [
                format!("{} of web", first.addr),
                format!("{dns_backend} of dns")
            ],
            "every service's backend at that address moves"
        );
        let written = dataplane.backends[&first.id];
        assert_eq!(
            written.flags & backend_flags::VIA_KERNEL,
            backend_flags::VIA_KERNEL
        );
        assert_eq!(written.state, backend_state::UP, "health is kept");
        let again = table
            .update_kernel_paths(moved, &mut dataplane)
            .expect("update");
        assert!(again.is_empty(), "nothing moves twice: {again:?}");
        let back = table
            .update_kernel_paths(BTreeSet::new(), &mut dataplane)
            .expect("update");
        assert_eq!(back.len(), 2);
        assert_eq!(
            dataplane.backends[&first.id].flags & backend_flags::VIA_KERNEL,
            0
        );
    }

    #[test]
    fn repeating_a_state_writes_nothing() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let writes = dataplane.writes;
        assert!(!table.set_backend_up(0, false, &mut dataplane).expect("ok"));
        assert!(!table.set_backend_up(99, true, &mut dataplane).expect("ok"));
        assert_eq!(dataplane.writes, writes);
    }

    #[test]
    fn reload_keeps_what_stays_and_adds_and_removes_the_rest() {
        let (mut table, mut dataplane) = installed(CONFIG);
        all_up(&mut table, &mut dataplane);
        let reloaded = r#"
            [[service]]
            name = "web"
            vip = "10.200.1.1"
            port = 80
            [[service.backend]]
            address = "10.200.12.2"
            port = 8080
            [[service.backend]]
            address = "10.200.13.2"
        "#
        .to_string()
            + ELSEWHERE;
        let config = config::parse(&reloaded).expect("valid");
        let summary = table.reload(&config, &mut dataplane).expect("fits");
        assert_eq!(summary.services_added, vec!["api"]);
        assert_eq!(summary.services_removed, vec!["dns"]);
        assert_eq!(summary.backends_added.len(), 2);
        assert_eq!(summary.backends_removed.len(), 3);

        let web = &table.services[0];
        assert_eq!(web.id, 0);
        let kept = &web.backends[0];
        assert_eq!(
            (kept.id, kept.up),
            (1, true),
            "10.200.12.2:8080 keeps its id and health"
        );
        let added = &web.backends[1];
        assert!(!added.up, "new backends start down");
        assert_eq!(
            added.generation,
            FIRST_GENERATION + 1,
            "a reused id gets a new generation"
        );
        assert_eq!(dataplane.backends[&added.id].generation, added.generation);
        assert_eq!(dataplane.table(&key(&table, "web")), vec![1]);
        assert!(!dataplane.services.contains_key(&service_key(
            &config::parse(CONFIG).expect("valid").services[1]
        )));
        assert!(dataplane
            .vip_addresses
            .contains(&"10.200.1.5".parse().expect("ip")));
        // The removed backend 10.200.11.2:80 of web gave its id 0 to 10.200.13.2:80: down, and
        // of a new generation, so flows pinned to the old backend move.
        assert_eq!(added.id, 0);
        assert_eq!(dataplane.backends[&0].state, backend_state::DOWN);
        assert_eq!(dataplane.backends[&0].addr[..4], [10, 200, 13, 2]);
    }

    /// A dual-stack configuration: an IPv4 service, and two IPv6 services sharing the backend
    /// endpoint [fd00:200::11:2]:80 (the IPv4 one shares port 80 but not the family).
    const DUAL_STACK: &str = r#"
        [[service]]
        name = "web"
        vip = "10.200.1.1"
        port = 80
        [[service.backend]]
        address = "10.200.11.2"

        [[service]]
        name = "web6"
        vip = "fd00:200::1:1"
        port = 80
        [[service.backend]]
        address = "fd00:200::11:2"
        [[service.backend]]
        address = "fd00:200::12:2"
        port = 8080

        [[service]]
        name = "alt6"
        vip = "fd00:200::1:1"
        port = 8000
        [[service.backend]]
        address = "fd00:200::11:2"
        port = 80
    "#;

    fn v6(text: &str) -> [u8; 16] {
        text.parse::<std::net::Ipv6Addr>()
            .expect("test address")
            .octets()
    }

    #[test]
    fn ipv6_services_go_to_the_ipv6_maps() {
        let (mut table, mut dataplane) = installed(DUAL_STACK);
        let web6 = key(&table, "web6");
        assert_eq!(
            web6,
            AnyServiceKey::V6(ServiceKey {
                addr: v6("fd00:200::1:1"),
                port: 80u16.to_be_bytes(),
                protocol: lb_common::protocol::TCP,
                _pad: 0,
            })
        );
        assert!(matches!(key(&table, "web"), AnyServiceKey::V4(_)));
        assert_eq!(dataplane.services.len(), 3);
        assert_eq!(
            dataplane.vip_addresses,
            [
                "10.200.1.1".parse::<IpAddr>().expect("ip"),
                IpAddr::from(v6("fd00:200::1:1"))
            ],
            "one entry per address, each in its family's map"
        );

        let backend = dataplane.backends[&2];
        assert_eq!(backend.addr, v6("fd00:200::12:2"));
        assert_eq!(backend.port, 8080u16.to_be_bytes());
        assert_eq!(backend.flags & backend_flags::IPV6, backend_flags::IPV6);
        assert_eq!(dataplane.backends[&0].flags & backend_flags::IPV6, 0);

        all_up(&mut table, &mut dataplane);
        assert_eq!(dataplane.table(&web6), vec![1, 2]);
        let ports = dataplane.ports.expect("ports written");
        let bit = |port: u16| ports.contains(port.to_be_bytes());
        assert!(
            bit(80) && bit(8080) && bit(8000),
            "IPv6 ports share the bitmap"
        );
    }

    #[test]
    fn endpoints_are_shared_per_family() {
        let (table, dataplane) = installed(DUAL_STACK);
        // Every service here is tcp, so any service's config gives the key's protocol.
        let endpoint = |addr: &str| {
            let addr = addr.parse().expect("test address");
            dataplane.endpoints[&endpoint_key(&table.services[0].config, addr)]
        };
        let shared = endpoint("[fd00:200::11:2]:80");
        assert_eq!(
            shared.shared, 1,
            "two IPv6 services use [fd00:200::11:2]:80"
        );
        let single = endpoint("[fd00:200::12:2]:8080");
        assert_eq!(
            (single.shared, single.service_addr, single.service_id),
            (0, v6("fd00:200::1:1"), 1)
        );
        let ipv4 = endpoint("10.200.11.2:80");
        assert_eq!(
            ipv4.shared, 0,
            "port 80 of an IPv4 backend is another endpoint"
        );
        assert_eq!(ipv4.service_addr[..4], [10, 200, 1, 1]);
        assert_eq!(ipv4.service_addr[4..], [0; 12]);
        let flags: Vec<bool> = table.services[1]
            .backends
            .iter()
            .map(|backend| backend.shared_endpoint)
            .collect();
        assert_eq!(flags, [true, false]);
        assert_ne!(
            dataplane.backends[&1].flags & backend_flags::SHARED_ENDPOINT,
            0
        );
    }

    #[test]
    fn ipv6_backends_drain_and_undrain() {
        let (mut table, mut dataplane) = installed(DUAL_STACK);
        all_up(&mut table, &mut dataplane);
        let web6 = key(&table, "web6");
        let addr: SocketAddr = "[fd00:200::12:2]:8080".parse().expect("address");
        assert!(table
            .set_drained("web6", addr, true, &mut dataplane)
            .expect("ok"));
        assert_eq!(dataplane.table(&web6), vec![1]);
        assert!(table
            .set_drained("web6", addr, false, &mut dataplane)
            .expect("ok"));
        assert_eq!(dataplane.table(&web6), vec![1, 2]);
        let other_spelling: SocketAddr = "[fd00:200:0:0::12:2]:8080".parse().expect("address");
        assert!(table
            .set_drained("web6", other_spelling, true, &mut dataplane)
            .expect("the same backend, written otherwise"));
        let error = table.set_drained(
            "web6",
            "[fd00:200::12:2]:80".parse().expect("address"),
            true,
            &mut dataplane,
        );
        assert!(
            matches!(error, Err(TableError::NoSuchBackend { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn reload_matches_ipv6_backends_by_address_and_removes_what_goes() {
        let (mut table, mut dataplane) = installed(DUAL_STACK);
        all_up(&mut table, &mut dataplane);
        let reloaded = r#"
            [[service]]
            name = "web6"
            vip = "fd00:200::1:1"
            port = 80
            [[service.backend]]
            address = "fd00:200:0::12:2"
            port = 8080
            [[service.backend]]
            address = "fd00:200::13:2"

            [[service]]
            name = "web"
            vip = "10.200.1.1"
            port = 80
            [[service.backend]]
            address = "10.200.11.2"
        "#;
        let old_alt6 = key(&table, "alt6");
        let summary = table
            .reload(&config::parse(reloaded).expect("valid"), &mut dataplane)
            .expect("fits");
        assert_eq!(summary.services_removed, vec!["alt6"]);
        assert_eq!(summary.backends_added, vec!["[fd00:200::13:2]:80 of web6"]);
        assert_eq!(
            summary.backends_removed,
            vec!["[fd00:200::11:2]:80 of web6", "[fd00:200::11:2]:80 of alt6"]
        );
        let web6 = &table.services[0];
        assert_eq!((web6.backends[0].id, web6.backends[0].up), (2, true));
        assert!(!dataplane.services.contains_key(&old_alt6));
        assert_eq!(dataplane.table(&key(&table, "web6")), vec![2]);
        let gone = endpoint_key(
            &table.services[0].config,
            "[fd00:200::11:2]:80".parse().expect("address"),
        );
        assert!(!dataplane.endpoints.contains_key(&gone));
        assert_eq!(
            dataplane.vip_addresses.len(),
            2,
            "the IPv6 vip stays: web6 still uses it"
        );

        let ipv4_only = r#"
            [[service]]
            name = "web"
            vip = "10.200.1.1"
            port = 80
            [[service.backend]]
            address = "10.200.11.2"
        "#;
        table
            .reload(&config::parse(ipv4_only).expect("valid"), &mut dataplane)
            .expect("fits");
        assert_eq!(
            dataplane.vip_addresses,
            ["10.200.1.1".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(dataplane.services.len(), 1);
        assert!(dataplane
            .endpoints
            .keys()
            .all(|key| matches!(key, AnyEndpointKey::V4(_))));
    }

    #[test]
    fn three_tuple_services_are_flagged_and_mapped_and_follow_reloads() {
        let three_tuple = CONFIG.replace(
            "maglev_table_size = 1009",
            "maglev_table_size = 1009\nmaglev_key = \"3-tuple\"",
        );
        let (table, dataplane) = installed(&three_tuple);
        let dns = key(&table, "dns");
        assert_eq!(dataplane.services[&dns].flags, service_flags::HASH_3_TUPLE);
        let vip_udp = VipProtocol {
            addr: [10, 200, 1, 1],
            protocol: lb_common::protocol::UDP,
            _pad: [0; 3],
        };
        let vip_udp = AnyVipProtocol::V4(vip_udp);
        assert_eq!(
            dataplane.three_tuple_services,
            [(vip_udp, dns)].into_iter().collect()
        );
        assert_eq!(
            dataplane.settings.expect("written").fragment_timeout_ns,
            2_000_000_000
        );

        // Back to the 5-tuple: the flag and the map entry go.
        let (mut table, mut dataplane) = (table, dataplane);
        let config = config::parse(CONFIG).expect("valid");
        table.reload(&config, &mut dataplane).expect("fits");
        assert_eq!(dataplane.services[&dns].flags, 0);
        assert!(dataplane.three_tuple_services.is_empty());

        // And again to the 3-tuple.
        let config = config::parse(&three_tuple).expect("valid");
        table.reload(&config, &mut dataplane).expect("fits");
        assert_eq!(dataplane.three_tuple_services.get(&vip_udp), Some(&dns));
    }

    #[test]
    fn a_reload_that_does_not_fit_changes_nothing() {
        let config = config::parse(CONFIG).expect("valid");
        let mut table = ServiceTable::new(&config, 2 * (2 + 1009)).expect("just fits");
        let mut dataplane = MemoryDataplane::default();
        table.install(&mut dataplane).expect("ok");
        let bigger = CONFIG.replace("maglev_table_size = 1009", "maglev_table_size = 1013");
        let before = (dataplane.writes, table.services[1].table().to_vec());
        let error = table.reload(&config::parse(&bigger).expect("valid"), &mut dataplane);
        assert!(
            matches!(
                error,
                Err(ReloadError::Refused(TableError::ScheduleFull { .. }))
            ),
            "{error:?}"
        );
        assert_eq!(
            (dataplane.writes, table.services[1].table().to_vec()),
            before
        );
        assert_eq!(
            table.services[1].config.scheduler,
            Scheduler::Maglev {
                table_size: 1009,
                key: MaglevKey::FiveTuple,
            }
        );
    }

    /// The health each backend id resumes from after reloading CONFIG with `from` replaced
    /// by `to` (every backend up before).
    fn resumed_after(from: &str, to: &str) -> (ServiceTable, MemoryDataplane, BTreeMap<u32, bool>) {
        let (mut table, mut dataplane) = installed(CONFIG);
        all_up(&mut table, &mut dataplane);
        assert!(CONFIG.contains(from), "{from}");
        let config = config::parse(&CONFIG.replacen(from, to, 1)).expect("valid");
        let summary = table.reload(&config, &mut dataplane).expect("fits");
        (table, dataplane, summary.resumed)
    }

    #[test]
    fn only_backends_that_stay_resume_their_health() {
        // web's 10.200.12.2 moves from port 8080 to 8081: a new backend, which takes the
        // removed one's id 1 (the lowest free) and must start as at startup, not up.
        let (table, _, resumed) = resumed_after("port = 8080", "port = 8081");
        let moved = &table.services[0].backends[1];
        assert_eq!((moved.id, moved.up), (1, false));
        assert_eq!(
            resumed,
            BTreeMap::from([(0, true), (2, true), (3, true)]),
            "id 1 now names another backend"
        );

        // A renamed service and a service moved to another port are new services: all their
        // backends are new, whatever ids they get.
        for (from, to) in [
            ("name = \"web\"", "name = \"www\""),
            ("port = 80\n", "port = 81\n"),
        ] {
            let (table, _, resumed) = resumed_after(from, to);
            let web = &table.services[0];
            assert!(
                web.backends.iter().all(|backend| !backend.up),
                "{to}: {web:?}"
            );
            assert_eq!(
                resumed,
                BTreeMap::from([(2, true), (3, true)]),
                "{to}: only dns's backends stay"
            );
        }
    }

    #[test]
    fn a_health_report_about_an_ids_previous_backend_changes_nothing() {
        let (mut table, mut dataplane, _) = resumed_after("port = 8080", "port = 8081");
        let moved = table.services[0].backends[1].clone();
        let web = key(&table, "web");
        assert_eq!(dataplane.table(&web), vec![0]);
        // "Up" from the checker of the removed 10.200.12.2:8080, queued before the reload.
        let report = |generation| HealthReport {
            backend_id: moved.id,
            generation,
            up: true,
        };
        let outcomes = table.apply_health(&[report(moved.generation - 1)], &mut dataplane);
        assert!(
            matches!(outcomes[..], [HealthOutcome::Stale]),
            "{outcomes:?}"
        );
        assert!(!table.services[0].backends[1].up);
        assert_eq!(dataplane.table(&web), vec![0]);
        assert_eq!(dataplane.backends[&moved.id].state, backend_state::DOWN);
        // The new backend's own checker.
        let outcomes = table.apply_health(&[report(moved.generation)], &mut dataplane);
        assert!(
            matches!(outcomes[..], [HealthOutcome::Changed]),
            "{outcomes:?}"
        );
        assert_eq!(dataplane.table(&web), vec![0, 1]);
    }

    #[test]
    fn an_id_given_to_another_backend_or_service_starts_with_zero_counters() {
        let (mut table, mut dataplane) = installed(CONFIG);
        all_up(&mut table, &mut dataplane);
        let counted = TrafficStats {
            packets: 5,
            bytes: 500,
            new_flows: 2,
            reply_packets: 4,
            reply_bytes: 400,
            rescheduled: 1,
        };
        for id in 0..4 {
            dataplane.backend_stats.insert(id, counted);
        }
        dataplane.service_stats.insert(1, counted);

        // Port change: id 1 goes to 10.200.12.2:8081. dns goes, freeing service id 1.
        let web_only = CONFIG.replacen("port = 8080", "port = 8081", 1);
        let web_only = &web_only[..web_only
            .find("[[service]]\n        name = \"dns\"")
            .expect("dns")];
        let config = config::parse(web_only).expect("valid");
        table.reload(&config, &mut dataplane).expect("fits");
        assert_eq!(table.services[0].backends[1].id, 1);
        let stats = |dataplane: &MemoryDataplane, id| dataplane.backend_stats(id).expect("ok");
        assert_eq!(stats(&dataplane, 1), TrafficStats::default());
        assert_eq!(
            stats(&dataplane, 0),
            counted,
            "a backend that stays keeps its counts"
        );
        // The removed service's counters stay until the id is handed out again.
        assert_eq!(dataplane.service_stats(1).expect("ok"), counted);

        let api = web_only.to_string() + ELSEWHERE;
        table
            .reload(&config::parse(&api).expect("valid"), &mut dataplane)
            .expect("fits");
        let api = &table.services[1];
        assert_eq!(api.id, 1, "the removed dns's id");
        assert_eq!(
            dataplane.service_stats(1).expect("ok"),
            TrafficStats::default()
        );
        assert_eq!(
            dataplane.service_stats(0).expect("ok"),
            TrafficStats::default()
        );
        assert_eq!(
            stats(&dataplane, api.backends[0].id),
            TrafficStats::default()
        );
        assert_eq!(stats(&dataplane, 0), counted);
    }

    #[test]
    fn a_vip_address_shared_by_removed_services_is_removed_once() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let summary = table
            .reload(&config::parse(ELSEWHERE).expect("valid"), &mut dataplane)
            .expect("fits");
        assert_eq!(summary.services_removed, ["web", "dns"]);
        assert_eq!(
            dataplane.vip_removals,
            ["10.200.1.1".parse::<IpAddr>().expect("ip")],
            "one removal for both services"
        );
        assert_eq!(
            dataplane.vip_addresses,
            ["10.200.1.5".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(dataplane.services.len(), 1);
    }

    /// What the datapath does with packets, as text to compare: every service's key, id,
    /// scheduler and the table it reads (not where the table lives), the backends that are
    /// up (without generations), endpoints, VIP addresses, ports and 3-tuple services.
    fn behaviour(dataplane: &MemoryDataplane) -> Vec<String> {
        let mut lines: Vec<String> = dataplane
            .services
            .iter()
            .map(|(key, service)| {
                format!(
                    "service {key:?} id {} scheduler {} flags {} table {:?}",
                    service.id,
                    service.scheduler,
                    service.flags,
                    dataplane.table(key)
                )
            })
            .collect();
        lines.extend(
            dataplane
                .backends
                .iter()
                .filter(|(_, backend)| backend.state == backend_state::UP)
                .map(|(id, backend)| {
                    format!(
                        "backend {id} {:?}:{:?} flags {} service {}",
                        backend.addr, backend.port, backend.flags, backend.service_id
                    )
                }),
        );
        lines.extend(
            dataplane
                .endpoints
                .iter()
                .map(|e| format!("endpoint {e:?}")),
        );
        lines.extend(
            dataplane
                .vip_addresses
                .iter()
                .map(|vip| format!("vip {vip}")),
        );
        lines.extend(
            dataplane
                .three_tuple_services
                .iter()
                .map(|entry| format!("3-tuple {entry:?}")),
        );
        lines.push(format!("ports {:?}", dataplane.ports));
        lines.sort();
        lines
    }

    #[test]
    fn a_reload_failing_at_any_write_is_rolled_back() {
        let three_tuple = CONFIG.replace(
            "maglev_table_size = 1009",
            "maglev_table_size = 1009\nmaglev_key = \"3-tuple\"",
        );
        let (mut running, mut running_dataplane) = installed(&three_tuple);
        all_up(&mut running, &mut running_dataplane);
        // Every kind of change: a backend moved (its id reused), a service and its 3-tuple
        // entry removed, a VIP address removed and one added, a service added.
        let target = CONFIG.replacen("port = 8080", "port = 8081", 1).replacen(
            "vip = \"10.200.1.1\"\n        port = 80\n",
            "vip = \"10.200.1.7\"\n        port = 80\n",
            1,
        );
        let target = target[..target
            .find("[[service]]\n        name = \"dns\"")
            .expect("dns")]
            .to_string()
            + ELSEWHERE;
        let config = config::parse(&target).expect("valid");
        let mut reloaded = (running.clone(), running_dataplane.clone());
        reloaded.0.reload(&config, &mut reloaded.1).expect("fits");
        let writes = reloaded.1.writes - running_dataplane.writes;
        assert!(writes > 10, "{writes} writes");

        for failing in 1..=writes {
            let (mut table, mut dataplane) = (running.clone(), running_dataplane.clone());
            dataplane.fail_at = Some(dataplane.writes + failing);
            let error = table.reload(&config, &mut dataplane);
            assert!(
                matches!(error, Err(ReloadError::RolledBack { .. })),
                "write {failing}: {error:?}"
            );
            assert_eq!(
                behaviour(&dataplane),
                behaviour(&running_dataplane),
                "write {failing} failed"
            );
            for (id, backend) in &running_dataplane.backends {
                assert_eq!(dataplane.backends[id], *backend, "write {failing}");
            }
            let names = |table: &ServiceTable| -> Vec<(u32, String, Vec<BackendState>)> {
                table
                    .services
                    .iter()
                    .map(|s| (s.id, s.config.name.clone(), s.backends.clone()))
                    .collect()
            };
            assert_eq!(names(&table), names(&running), "write {failing}");

            // And the same reload again goes through to the same datapath.
            table.reload(&config, &mut dataplane).expect("fits");
            assert_eq!(
                behaviour(&dataplane),
                behaviour(&reloaded.1),
                "again after write {failing}"
            );
        }

        let (mut table, mut dataplane) = (running.clone(), running_dataplane.clone());
        dataplane.fail_at = Some(dataplane.writes + writes / 2);
        dataplane.keep_failing = true;
        let error = table.reload(&config, &mut dataplane);
        assert!(
            matches!(error, Err(ReloadError::Inconsistent { .. })),
            "{error:?}"
        );
    }

    /// `count` round-robin services named `{prefix}{i}`, each on its own port with one backend.
    fn many_services(prefix: &str, count: u32) -> String {
        (0..count)
            .map(|i| {
                format!(
                    "[[service]]\nname = \"{prefix}{i}\"\nvip = \"10.200.1.1\"\nport = {}\n\
                     [[service.backend]]\naddress = \"10.200.11.2\"\n",
                    1000 + i
                )
            })
            .collect()
    }

    #[test]
    fn ids_of_services_a_reload_removes_serve_the_services_it_adds() {
        let full = MAX_SERVICES;
        let (mut table, mut dataplane) = installed(&many_services("old", full));
        let counted = TrafficStats {
            packets: 7,
            ..TrafficStats::default()
        };
        for id in 0..full {
            dataplane.service_stats.insert(id, counted);
        }

        // Every service renamed at once: each takes a removed one's id, with zeroed counters.
        let renamed = config::parse(&many_services("new", full)).expect("valid");
        let summary = table.reload(&renamed, &mut dataplane).expect("fits");
        assert_eq!(summary.services_added.len(), full as usize);
        assert_eq!(summary.services_removed.len(), full as usize);
        let ids: BTreeSet<u32> = table.services.iter().map(|service| service.id).collect();
        assert_eq!(ids, (0..full).collect());
        for id in [0, full / 2, full - 1] {
            assert_eq!(
                dataplane.service_stats(id).expect("ok"),
                TrafficStats::default(),
                "id {id}"
            );
        }
        assert_eq!(dataplane.services.len(), full as usize);

        // From every id in use to one new service.
        let summary = table
            .reload(&config::parse(ELSEWHERE).expect("valid"), &mut dataplane)
            .expect("fits");
        assert_eq!(summary.services_added, ["api"]);
        assert_eq!(table.services[0].id, 0);
        assert_eq!(dataplane.services.len(), 1);
    }

    #[test]
    fn health_reports_applied_together_write_each_service_table_once() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let before = dataplane.schedule_writes;
        let up = |backend_id| HealthReport {
            backend_id,
            generation: FIRST_GENERATION,
            up: true,
        };
        // All four up (web: 0 and 1, dns: 2 and 3), plus a repeat and a stale report.
        let reports = [
            up(0),
            up(2),
            up(1),
            up(3),
            up(0),
            HealthReport {
                generation: FIRST_GENERATION + 1,
                ..up(1)
            },
        ];
        let outcomes = table.apply_health(&reports, &mut dataplane);
        let kinds: Vec<&str> = outcomes
            .iter()
            .map(|outcome| match outcome {
                HealthOutcome::Changed => "changed",
                HealthOutcome::Unchanged => "unchanged",
                HealthOutcome::Stale => "stale",
                HealthOutcome::Failed(_) => "failed",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "changed",
                "changed",
                "changed",
                "changed",
                "unchanged",
                "stale"
            ]
        );
        assert_eq!(
            dataplane.schedule_writes - before,
            2,
            "one table write per service, not per report"
        );
        assert_eq!(dataplane.table(&key(&table, "web")), vec![0, 1]);
        let dns = dataplane.table(&key(&table, "dns"));
        assert!(dns.contains(&2) && dns.contains(&3) && dns.len() == 1009);
        assert!(dataplane
            .backends
            .values()
            .all(|backend| backend.state == backend_state::UP));

        // A failed table write (after the two backend entries) is reported for every report
        // about that service.
        dataplane.fail_at = Some(dataplane.writes + 3);
        let down = |backend_id| HealthReport {
            up: false,
            ..up(backend_id)
        };
        let outcomes = table.apply_health(&[down(0), down(1)], &mut dataplane);
        assert!(
            matches!(
                outcomes[..],
                [HealthOutcome::Failed(_), HealthOutcome::Failed(_)]
            ),
            "{outcomes:?}"
        );
    }

    /// One Maglev service `name` on 10.200.1.1:80 with the default table (65537 entries) over
    /// `backends` backends 10.200.1N.2.
    fn maglev_service(name: &str, backends: u32) -> String {
        let mut text = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"10.200.1.1\"\nport = 80\n\
             scheduler = \"maglev\"\n[service.health_check]\nkind = \"none\"\n"
        );
        for backend in 0..backends {
            text += &format!(
                "[[service.backend]]\naddress = \"10.200.{}.2\"\n",
                11 + backend
            );
        }
        text
    }

    #[test]
    fn regions_of_removed_services_are_reused_from_the_next_reload_on() {
        let config = config::parse(&maglev_service("web", 2)).expect("valid");
        // Room for the regions of two such services: the running one and its successor.
        let mut table = ServiceTable::new(&config, 2 * 2 * 65537).expect("fits");
        let mut dataplane = MemoryDataplane::default();
        table.install(&mut dataplane).expect("memory");
        all_up(&mut table, &mut dataplane);
        let mut blocks = vec![table.services[0].regions.block()];
        for name in ["web2", "web", "web2", "web", "web3"] {
            let config = config::parse(&maglev_service(name, 2)).expect("valid");
            table
                .reload(&config, &mut dataplane)
                .unwrap_or_else(|error| panic!("renaming to {name}: {error}"));
            let block = table.services[0].regions.block();
            assert_ne!(
                Some(&block),
                blocks.last(),
                "{name}: not the regions this reload took from the service it removed"
            );
            blocks.push(block);
            all_up(&mut table, &mut dataplane);
            let entries = dataplane.table(&key(&table, name));
            assert_eq!(entries.len(), 65537, "{name}");
            assert_eq!(entries, table.services[0].table(), "{name}");
            assert!(entries.contains(&0) && entries.contains(&1), "{name}");
        }
        let distinct: BTreeSet<Block> = blocks.iter().copied().collect();
        assert_eq!(distinct.len(), 2, "{blocks:?}");
    }

    #[test]
    fn a_table_write_touches_only_the_entries_that_changed() {
        let config = maglev_service("web", 4)
            .replace("port = 80\n", "port = 80\nmaglev_table_size = 1009\n");
        let (mut table, mut dataplane) = installed(&config);
        all_up(&mut table, &mut dataplane);
        let web = key(&table, "web");
        let mut written = 0;
        for (id, up) in [(3, false), (0, false), (3, true), (0, true), (2, false)] {
            // What the region about to be written holds, as the datapath has it.
            let regions = &table.services[0].regions;
            let offset = regions.offsets[1 - regions.active];
            let held: Vec<Option<u32>> = (0..1009)
                .map(|slot| dataplane.schedule.get(&(offset + slot)).copied())
                .collect();
            let before = dataplane.schedule_entries;
            table
                .set_backend_up(id, up, &mut dataplane)
                .expect("memory");
            let now = dataplane.table(&web);
            // What writing the whole table would have left.
            assert_eq!(now, build_table(&table.services[0]), "backend {id} up {up}");
            let changed = now
                .iter()
                .zip(&held)
                .filter(|(entry, held)| Some(**entry) != **held)
                .count();
            let step = dataplane.schedule_entries - before;
            assert_eq!(step, changed, "backend {id} up {up}");
            written += step;
        }
        assert!(
            written < 5 * 1009 / 2,
            "{written} entries written in 5 changes"
        );
    }

    #[test]
    fn a_service_that_keeps_its_name_but_not_its_listener_is_reported_as_moved() {
        let (mut table, mut dataplane) = installed(CONFIG);
        let moved = CONFIG.replacen("port = 80\n", "port = 81\n", 1);
        let summary = table
            .reload(&config::parse(&moved).expect("valid"), &mut dataplane)
            .expect("fits");
        assert_eq!(summary.services_moved, ["web"]);
        assert!(summary.services_added.is_empty(), "{summary:?}");
        assert!(summary.services_removed.is_empty(), "{summary:?}");
        assert_eq!(summary.backends_added.len(), 2, "web's backends start over");
    }

    /// Fails unless every service the datapath has, and every backend it can send a flow to,
    /// has its port in the bitmap: a packet for one without would pass to the kernel
    /// untranslated, as the host's own traffic does.
    fn assert_ports_cover(dataplane: &MemoryDataplane, what: &str) {
        let ports = dataplane.ports.expect("ports written");
        for key in dataplane.services.keys() {
            let port = match key {
                AnyServiceKey::V4(key) => key.port,
                AnyServiceKey::V6(key) => key.port,
            };
            assert!(
                ports.contains(port),
                "{what}: service {key:?} without its port"
            );
        }
        for (id, backend) in &dataplane.backends {
            if backend.state == backend_state::UP {
                assert!(
                    ports.contains(backend.port),
                    "{what}: backend {id} up without its port"
                );
            }
        }
    }

    #[test]
    fn at_every_write_of_a_reload_the_port_bitmap_covers_what_the_datapath_serves() {
        let (mut running, mut running_dataplane) = installed(CONFIG);
        all_up(&mut running, &mut running_dataplane);
        // A service on a new port with a backend on a new port, and a kept service whose
        // backend moves to a new port.
        let target = CONFIG.replacen("port = 8080", "port = 8081", 1)
            + r#"
            [[service]]
            name = "mail"
            vip = "10.200.1.1"
            port = 25
            [service.health_check]
            kind = "none"
            [[service.backend]]
            address = "10.200.11.2"
            port = 2525
        "#;
        let config = config::parse(&target).expect("valid");
        let mut reloaded = (running.clone(), running_dataplane.clone());
        reloaded.0.reload(&config, &mut reloaded.1).expect("fits");
        let writes = reloaded.1.writes - running_dataplane.writes;
        assert!(writes > 5, "{writes} writes");

        // The datapath as it is after each write of the reload: every later write fails, the
        // roll-back's included.
        for done in 0..=writes {
            let (mut table, mut dataplane) = (running.clone(), running_dataplane.clone());
            dataplane.fail_at = Some(dataplane.writes + done + 1);
            dataplane.keep_failing = true;
            let outcome = table.reload(&config, &mut dataplane);
            assert_eq!(
                outcome.is_ok(),
                done == writes,
                "after {done} writes: {outcome:?}"
            );
            assert_ports_cover(&dataplane, &format!("after {done} of {writes} writes"));
        }
        let ports = reloaded.1.ports.expect("ports written");
        assert!(
            !ports.contains(8080u16.to_be_bytes()),
            "a port nothing uses is cleared"
        );
    }
}
