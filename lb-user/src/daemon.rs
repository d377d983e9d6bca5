//! `lb-user --iface IFACE --config FILE`: validate, load, attach, keep backends current from
//! health probes, answer the control socket (stats, drain, reload, flows), and detach cleanly on
//! SIGINT or SIGTERM. SIGHUP reloads the configuration, as `lb-user reload` does.
//!
//! One task owns all state: health events, control requests and signals arrive on channels and
//! are handled one at a time, so no lock is held and no change interleaves with another.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use lb_common::{flow_state, protocol};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    config::{self, Config},
    control::{self, Call, FlowEntry, Request, Response},
    dataplane::{monotonic_ns, LoadOptions, XdpDataplane},
    health::{self, HealthEvent},
    neighbours, netdev,
    services::{HealthOutcome, HealthReport, ReloadError, ServiceTable},
    stats::Snapshot,
    topology,
};

/// How often attachments are checked against the interfaces that exist now.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3);

/// Most backends whose routes are looked up again at every reconcile.
const MAX_ROUTE_CHECKS: usize = 64;

pub struct Options {
    /// The public interface, where clients' packets for the services arrive.
    pub interface: String,
    pub config: PathBuf,
    pub mode: XdpMode,
    pub socket: PathBuf,
}

/// A running health checker and what it was started for: a reload keeps it when none of
/// this changes, so its rise/fall streak survives.
struct Checker {
    task: JoinHandle<()>,
    service_id: u32,
    generation: u32,
    target: SocketAddr,
    check: config::HealthCheck,
}

/// Everything the running daemon owns.
struct Daemon {
    public_interface: String,
    mode: XdpMode,
    config_path: PathBuf,
    config: Config,
    table: ServiceTable,
    dataplane: XdpDataplane,
    /// Health checker per backend id.
    checkers: HashMap<u32, Checker>,
    events: mpsc::Sender<HealthEvent>,
    /// Redirect targets that could not take redirects at the last check (warned about once);
    /// the backends routed through them are reached through the kernel meanwhile.
    unready_targets: BTreeSet<String>,
    /// Backends behind a bridge: always reached through the kernel.
    bridge_paths: BTreeSet<IpAddr>,
    /// The backend addresses routed through each interface, and their names for messages, as
    /// the routing table said last.
    addresses_via: HashMap<String, BTreeSet<IpAddr>>,
    backends_via: HashMap<String, Vec<String>>,
}

pub async fn run(options: Options) -> Result<()> {
    // Everything that can be checked is checked before the datapath is touched.
    let config = config::load(&options.config)
        .with_context(|| format!("invalid configuration {}", options.config.display()))?;
    let paths = paths_for(&options.interface, &config)?;
    warn_about_unreachable_vips(&options.interface, &config, None);
    warn_about_larger_backend_mtus(&options.interface, &paths);
    check_forwarding(paths.xdp_interfaces.iter().chain(&paths.bridges), &config)?;
    if options.mode == XdpMode::Driver {
        let unready = unready_redirect_targets(&paths.xdp_interfaces);
        if !unready.is_empty() {
            anyhow::bail!("{}", redirect_advice(&unready, &paths.backends_via));
        }
    }
    let interfaces = paths.xdp_interfaces.clone();
    let schedule_size = ServiceTable::schedule_size_for(&config)
        .with_context(|| format!("invalid configuration {}", options.config.display()))?;
    let mut table = ServiceTable::new(&config, schedule_size)?;
    table.set_kernel_paths(paths.kernel_paths.clone());
    let listener = control::bind(&options.socket)?;
    let _socket_guard = RemoveOnDrop(options.socket.clone());

    let verifier_log = options.socket.with_file_name("verifier.log");
    let load_options = LoadOptions {
        flow_table_size: config.flows.table_size,
        other_flow_tables_size: None,
        fragment_table_size: config.fragments.table_size,
        schedule_size,
        generic_xdp: options.mode == XdpMode::Skb,
    };
    let mut dataplane =
        XdpDataplane::load_with(&verifier_log, &load_options).context("loading the XDP program")?;
    // The flow table's LRU lists are per possible CPU, each with an equal share of the entries.
    let flows_per_cpu = match aya::util::nr_cpus() {
        Ok(cpus) if cpus > 0 => format!(
            ", {} per CPU over {cpus} possible CPUs",
            config.flows.table_size / cpus as u32
        ),
        _ => String::new(),
    };
    tracing::info!(
        "XDP program loaded (flow table {} entries{flows_per_cpu}, fragment table {} entries, \
         scheduling table {schedule_size} entries)",
        config.flows.table_size,
        config.fragments.table_size
    );
    check_ipv6_support(&dataplane, &config)?;
    table
        .install(&mut dataplane)
        .context("writing services and backends to the datapath")?;
    for service in &table.services {
        log_service(service);
    }
    warn_shared_backends(&table, &BTreeMap::new());

    // Backend-facing interfaces first, the public one last: by the time clients' packets are
    // translated, their replies are translated too. A failure drops `dataplane`, which
    // detaches whatever was attached already.
    for interface in interfaces.iter().rev() {
        if let Err(error) = dataplane.attach(interface, options.mode) {
            let hint = attach_hint(&error, interface, options.mode);
            let serving = match paths.backends_via.get(interface) {
                Some(backends) => {
                    format!(" (backends {} are routed through it)", backends.join(", "))
                }
                None => " (the public interface)".to_string(),
            };
            return Err(anyhow::Error::new(error).context(format!(
                "attaching XDP to {interface}{serving} in {} mode{hint}",
                mode_name(options.mode)
            )));
        }
        tracing::info!(
            "attached XDP program to {interface} in {} mode",
            mode_name(options.mode)
        );
    }
    if !paths.kernel_paths.is_empty() {
        attach_egress(&mut dataplane, &options.interface, &paths)?;
    }

    // Next hops the datapath found unresolved are resolved by a task of their own: it runs
    // `ip`, which must not hold up health events or the control socket.
    let neighbour_task = neighbours::spawn(
        dataplane
            .take_wanted_neighbours()
            .context("taking the datapath's NEIGHBOURS_WANTED map")?,
    );

    let (events, mut health_events) = mpsc::channel::<HealthEvent>(256);
    let (calls, mut control_calls) = mpsc::channel::<Call>(16);
    let control_task = tokio::spawn(control::serve(listener, calls));
    let mut daemon = Daemon {
        public_interface: options.interface.clone(),
        mode: options.mode,
        config_path: options.config.clone(),
        config,
        table,
        dataplane,
        checkers: HashMap::new(),
        events,
        unready_targets: BTreeSet::new(),
        bridge_paths: paths.kernel_paths.clone(),
        addresses_via: paths.addresses_via.clone(),
        backends_via: paths.backends_via.clone(),
    };
    daemon.sync_checkers(&BTreeMap::new());

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut reconcile = tokio::time::interval(RECONCILE_INTERVAL);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reconcile.tick() => {
                daemon.reconcile_interfaces();
                daemon.sweep_fragments();
            }
            Some(event) = health_events.recv() => {
                let events = take_queued(event, &mut health_events);
                daemon.apply_health_events(&events);
            }
            Some((request, reply)) = control_calls.recv() => {
                let response = daemon.handle(request);
                if reply.send(response).is_err() {
                    tracing::debug!("control client left before its answer");
                }
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received, reloading {}", daemon.config_path.display());
                if let Err(error) = daemon.reload() {
                    tracing::error!("{error:#}");
                }
            }
            _ = terminate.recv() => {
                tracing::info!("SIGTERM received, shutting down");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received, shutting down");
                break;
            }
        }
    }

    control_task.abort();
    neighbour_task.abort();
    for checker in daemon.checkers.values() {
        checker.task.abort();
    }
    let failures = daemon.dataplane.detach_all();
    if let Some((interface, error)) = failures.first() {
        // The links die with this process anyway; say so rather than fail silently.
        anyhow::bail!("detaching XDP from {interface}: {error} (it goes when this process exits)");
    }
    Ok(())
}

impl Daemon {
    /// Frees the fragment-table entries past their timeout (the datapath never deletes them).
    fn sweep_fragments(&mut self) {
        let timeout = self.config.fragments.timeout.as_nanos();
        let timeout = u64::try_from(timeout).unwrap_or(u64::MAX);
        match self.dataplane.sweep_fragments(monotonic_ns(), timeout) {
            Ok(0) => {}
            Ok(swept) => tracing::debug!("swept {swept} timed-out fragment-table entries"),
            Err(error) => tracing::warn!("sweeping the fragment table: {error}"),
        }
    }

    /// Re-attaches to interfaces that were recreated, and attaches to new ones backends are
    /// routed through.
    fn reconcile_interfaces(&mut self) {
        let backends: usize = self.config.services.iter().map(|s| s.backends.len()).sum();
        // Each route lookup runs `ip`; past a few dozen backends, only watch what is attached.
        let routes = if backends <= MAX_ROUTE_CHECKS {
            paths_for(&self.public_interface, &self.config).map(|paths| {
                self.addresses_via = paths.addresses_via;
                self.backends_via = paths.backends_via;
                paths.xdp_interfaces
            })
        } else {
            Ok(self.dataplane.attached_interfaces())
        };
        let wanted = match routes {
            Ok(wanted) => wanted,
            // e.g. a backend's interface is down for a moment: keep what is there.
            Err(error) => {
                tracing::debug!("not reconciling interfaces now: {error:#}");
                self.dataplane.attached_interfaces()
            }
        };
        for change in self.dataplane.reconcile(&wanted, self.mode) {
            if change.warning {
                tracing::warn!("{}", change.message);
            } else {
                tracing::info!("{}", change.message);
            }
        }
        if self.mode == XdpMode::Driver {
            let unready: BTreeSet<String> = unready_redirect_targets(&wanted).into_iter().collect();
            self.follow_redirect_readiness(unready);
        }
    }

    /// Moves the backends routed through interfaces that cannot take XDP redirects now to the
    /// kernel's forwarding (XDP translates and passes; their replies still come back through
    /// XDP), and back once they can: XDP_REDIRECT into such an interface would lose every
    /// frame without a trace. Logs each change once. The public interface cannot be helped
    /// this way (replies are redirected into it): it only gets the warning.
    fn follow_redirect_readiness(&mut self, unready: BTreeSet<String>) {
        let kernel_paths: BTreeSet<IpAddr> = unready
            .iter()
            .filter_map(|interface| self.addresses_via.get(interface))
            .flatten()
            .chain(&self.bridge_paths)
            .copied()
            .collect();
        if let Err(error) = self
            .table
            .update_kernel_paths(kernel_paths, &mut self.dataplane)
        {
            tracing::error!("switching backends between XDP_REDIRECT and the kernel: {error}");
        }
        for interface in unready.difference(&self.unready_targets) {
            match self.backends_via.get(interface) {
                Some(backends) => tracing::warn!(
                    "interface {interface} cannot take XDP redirects now (the kernel reports no \
                     ndo-xmit among its XDP features): backends {} are reached through the \
                     kernel's forwarding until it can. To redirect again, give its veth peer \
                     GRO (`ethtool -K PEER gro on` where the peer is, after the link is up; in a \
                     container the peer is usually its eth0) or an XDP program",
                    backends.join(", ")
                ),
                None => tracing::warn!(
                    "{}",
                    redirect_advice(std::slice::from_ref(interface), &self.backends_via)
                ),
            }
        }
        for interface in self.unready_targets.difference(&unready) {
            match self.backends_via.get(interface) {
                Some(backends) => tracing::info!(
                    "interface {interface} takes XDP redirects again: backends {} are \
                     redirected again",
                    backends.join(", ")
                ),
                None => tracing::info!("interface {interface} takes XDP redirects again"),
            }
        }
        self.unready_targets = unready;
    }

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Stats => match self.snapshot() {
                Ok(stats) => Response {
                    ok: true,
                    stats: Some(stats),
                    ..Response::default()
                },
                Err(error) => Response::error(format!("{error:#}")),
            },
            Request::Drain { service, backend } => self.drain(&service, &backend, true),
            Request::Undrain { service, backend } => self.drain(&service, &backend, false),
            Request::Reload => match self.reload() {
                Ok(message) => Response::message(message),
                Err(error) => {
                    tracing::error!("{error:#}");
                    Response::error(format!("{error:#}"))
                }
            },
            Request::Flows { service, backend } => match self.flows(service, backend) {
                Ok(flows) => Response {
                    ok: true,
                    flows: Some(flows),
                    ..Response::default()
                },
                Err(error) => Response::error(format!("{error:#}")),
            },
        }
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let mut interfaces = self.dataplane.attached_interfaces();
        interfaces.extend(
            self.dataplane
                .egress_interfaces()
                .into_iter()
                .map(|name| format!("{name} (tc egress)")),
        );
        Ok(Snapshot::take(&self.table, &self.dataplane, interfaces)?)
    }

    fn drain(&mut self, service: &str, backend: &str, drained: bool) -> Response {
        let Ok(addr) = parse_backend(backend) else {
            return Response::error(format!(
                "backend {backend:?} is not ADDRESS:PORT (IPv6: [ADDRESS]:PORT)"
            ));
        };
        let verb = if drained { "drained" } else { "undrained" };
        match self
            .table
            .set_drained(service, addr, drained, &mut self.dataplane)
        {
            Ok(true) => {
                tracing::info!("backend {addr} of service {service} {verb}");
                Response::message(format!("backend {addr} of service {service} {verb}"))
            }
            Ok(false) => Response::message(format!(
                "backend {addr} of service {service} was already {verb}"
            )),
            Err(error) => Response::error(error),
        }
    }

    /// Re-reads the configuration and applies it. Everything that can refuse it is checked
    /// before anything is touched; the error says which of the three outcomes happened:
    /// refused (nothing changed), failed and rolled back, or failed halfway.
    fn reload(&mut self) -> Result<String> {
        const REFUSED: &str = "reload refused, running configuration kept";
        let config = config::load(&self.config_path)
            .with_context(|| format!("invalid configuration {}", self.config_path.display()))
            .context(REFUSED)?;
        let paths = self.check_reload(&config).context(REFUSED)?;
        // Backends behind unready interfaces stay on the kernel path; the reconcile below
        // re-checks them.
        let mut kernel_paths = paths.kernel_paths.clone();
        for interface in &self.unready_targets {
            kernel_paths.extend(paths.addresses_via.get(interface).into_iter().flatten());
        }
        let plan = self
            .table
            .plan_reload(&config, kernel_paths)
            .context(REFUSED)?;
        if !paths.kernel_paths.is_empty() {
            // Translates only replies of flows to backends behind a bridge: harmless if the
            // reload fails below, needed before any such backend takes traffic.
            attach_egress(&mut self.dataplane, &self.public_interface, &paths).context(REFUSED)?;
        }
        let shared_before = shared_backends(&self.table);
        let summary = match self.table.apply_reload(plan, &mut self.dataplane) {
            Ok(summary) => summary,
            Err(error @ ReloadError::Refused(_)) => return Err(error).context(REFUSED),
            Err(error @ ReloadError::RolledBack { .. }) => {
                return Err(error).context("reload failed, running configuration restored")
            }
            Err(error @ ReloadError::Inconsistent { .. }) => {
                return Err(error).context("reload failed halfway")
            }
        };
        let previous = std::mem::replace(&mut self.config, config);
        warn_about_unreachable_vips(&self.public_interface, &self.config, Some(&previous));
        self.bridge_paths = paths.kernel_paths;
        self.addresses_via = paths.addresses_via;
        self.backends_via = paths.backends_via;
        // New backends may be routed through interfaces not attached yet.
        self.reconcile_interfaces();
        self.sync_checkers(&summary.resumed);
        for service in &self.table.services {
            log_service(service);
        }
        warn_shared_backends(&self.table, &shared_before);
        let moved = if summary.services_moved.is_empty() {
            String::new()
        } else {
            format!(
                ", moved to another VIP, port or protocol (new to the datapath: their backends \
                 start over) {:?}",
                summary.services_moved
            )
        };
        let message = format!(
            "reloaded {}: services added {:?}, removed {:?}, changed {:?}{moved}; backends added \
             {:?}, removed {:?}",
            self.config_path.display(),
            summary.services_added,
            summary.services_removed,
            summary.services_changed,
            summary.backends_added,
            summary.backends_removed
        );
        tracing::info!("{message}");
        Ok(message)
    }

    /// What a reload to `config` is checked against before anything is touched: the fields
    /// that need a restart, the backends' routes, forwarding, the datapath's IPv6 support.
    fn check_reload(&self, config: &Config) -> Result<Paths> {
        config::check_reloadable(&self.config, config)?;
        let paths = paths_for(&self.public_interface, config)?;
        // Every interface: a reload may bring the first service of a family.
        check_forwarding(paths.xdp_interfaces.iter().chain(&paths.bridges), config)?;
        check_ipv6_support(&self.dataplane, config)?;
        Ok(paths)
    }

    /// One checker per backend. A backend that stays (by id and generation, in `resumed`)
    /// with the same probe target and health-check settings keeps its running checker, and
    /// with it the streak of results towards its next change: restarting it at every reload
    /// would let reloads more frequent than `interval` × `fall` keep a dead backend up. A
    /// backend that stays but whose check changed resumes from its up/down state; every other
    /// starts fresh, as at startup.
    fn sync_checkers(&mut self, resumed: &BTreeMap<u32, bool>) {
        let mut previous = std::mem::take(&mut self.checkers);
        for service in &self.table.services {
            let check = &service.config.health_check;
            for backend in &service.backends {
                let target = check.probe_target(backend.addr);
                if let Some(running) = previous.remove(&backend.id) {
                    let unchanged = running.service_id == service.id
                        && running.generation == backend.generation
                        && running.target == target
                        && running.check == *check
                        && resumed.contains_key(&backend.id);
                    if unchanged && !running.task.is_finished() {
                        self.checkers.insert(backend.id, running);
                        continue;
                    }
                    running.task.abort();
                }
                let task = health::spawn_checker(
                    service.id as usize,
                    (backend.id as usize, backend.generation),
                    target,
                    check.clone(),
                    self.events.clone(),
                    resumed.get(&backend.id).copied(),
                );
                let checker = Checker {
                    task,
                    service_id: service.id,
                    generation: backend.generation,
                    target,
                    check: check.clone(),
                };
                self.checkers.insert(backend.id, checker);
            }
        }
        for checker in previous.into_values() {
            checker.task.abort();
        }
    }

    /// Applies a batch of health events (see [`take_queued`]): every service whose backends
    /// changed gets its table written once for the whole batch.
    fn apply_health_events(&mut self, events: &[HealthEvent]) {
        let reports: Vec<HealthReport> = events
            .iter()
            .map(|event| HealthReport {
                backend_id: event.backend as u32,
                generation: event.generation,
                up: event.up,
            })
            .collect();
        let outcomes = self.table.apply_health(&reports, &mut self.dataplane);
        for (event, outcome) in events.iter().zip(outcomes) {
            let Some((index, position)) = self.table.find_backend_id(event.backend as u32) else {
                continue; // a checker of a backend removed by a reload
            };
            let service = &self.table.services[index];
            let (name, addr) = (&service.config.name, service.backends[position].addr);
            let state = if event.up { "up" } else { "down" };
            match outcome {
                HealthOutcome::Changed => {
                    tracing::info!(
                        "backend {addr} of service {name} is {state} {}",
                        event.reason
                    )
                }
                HealthOutcome::Unchanged if event.first_probe => tracing::warn!(
                    "backend {addr} of service {name} is down {}: it gets traffic once its \
                     probes pass",
                    event.reason
                ),
                // Stale: queued by the checker of the id's previous holder.
                HealthOutcome::Unchanged | HealthOutcome::Stale => {}
                HealthOutcome::Failed(error) => tracing::error!(
                    "backend {addr} of service {name} is {state}, but updating the datapath \
                     failed: {error}"
                ),
            }
        }
    }

    fn flows(&self, service: Option<String>, backend: Option<String>) -> Result<Vec<FlowEntry>> {
        // A misspelt name is an error, not an empty listing.
        if let Some(name) = &service {
            self.table.service_index(name)?;
        }
        let backend_filter = backend
            .map(|text| {
                parse_backend(&text).with_context(|| {
                    format!("backend {text:?} is not ADDRESS:PORT (IPv6: [ADDRESS]:PORT)")
                })
            })
            .transpose()?;
        let now = monotonic_ns();
        let mut entries = Vec::new();
        for (key, flow) in self.dataplane.all_flows()? {
            let Some((index, position)) = self.table.find_backend_id(flow.backend_id) else {
                continue;
            };
            let state = &self.table.services[index];
            let backend = &state.backends[position];
            if state.id != flow.service_id || backend.generation != flow.generation {
                continue; // left behind by a reload; the datapath reschedules it
            }
            if service
                .as_ref()
                .is_some_and(|name| *name != state.config.name)
                || backend_filter.is_some_and(|addr| addr != backend.addr)
            {
                continue;
            }
            let idle_ns = now.saturating_sub(flow.last_seen_ns);
            let flows = &self.config.flows;
            let is_tcp = key.protocol() == protocol::TCP;
            let closing = flow.state == flow_state::CLOSING;
            let timeout = if !is_tcp {
                flows.udp_timeout
            } else if closing {
                flows.tcp_closing_timeout
            } else {
                flows.tcp_timeout
            };
            if u128::from(idle_ns) > timeout.as_nanos() {
                continue; // expired: the next packet starts a fresh flow
            }
            entries.push(FlowEntry {
                client: key.client().to_string(),
                service: state.config.name.clone(),
                protocol: state.config.protocol.to_string(),
                backend: backend.addr.to_string(),
                age_seconds: now.saturating_sub(flow.created_ns) / 1_000_000_000,
                idle_seconds: idle_ns / 1_000_000_000,
                state: if closing { "closing" } else { "open" }.to_string(),
            });
        }
        entries.sort_by(|a, b| {
            (&a.service, &a.backend, &a.client).cmp(&(&b.service, &b.backend, &b.client))
        });
        Ok(entries)
    }
}

/// Most health events applied together: bounds the time one batch keeps the loop busy.
const MAX_HEALTH_BATCH: usize = 1024;

/// `first` and every event queued behind it (up to [`MAX_HEALTH_BATCH`]): rebuilding a large
/// Maglev table once for many backends' changes instead of once per change keeps the control
/// socket answering when many backends change together (all of them come up at start).
fn take_queued(first: HealthEvent, queue: &mut mpsc::Receiver<HealthEvent>) -> Vec<HealthEvent> {
    let mut events = vec![first];
    while events.len() < MAX_HEALTH_BATCH {
        match queue.try_recv() {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    events
}

/// The backend endpoints that serve more than one service (as the table marked them when it
/// was installed or reloaded), with those services' names.
fn shared_backends(table: &ServiceTable) -> BTreeMap<SocketAddr, Vec<String>> {
    let mut users: BTreeMap<SocketAddr, Vec<String>> = BTreeMap::new();
    for service in &table.services {
        for backend in service
            .backends
            .iter()
            .filter(|backend| backend.shared_endpoint)
        {
            users
                .entry(backend.addr)
                .or_default()
                .push(service.config.name.clone());
        }
    }
    users
}

/// Warns about backend endpoints that serve more than one service, except those that served
/// the same services in `known` (before a reload: warned about already): NAT keeps the
/// client's address, so if one client uses the same source port towards both services, the
/// backend sees one connection and the replies cannot be told apart.
fn warn_shared_backends(table: &ServiceTable, known: &BTreeMap<SocketAddr, Vec<String>>) {
    for (addr, services) in shared_backends(table) {
        if known.get(&addr) == Some(&services) {
            continue;
        }
        tracing::warn!(
            "backend {addr} serves services {}: a client using one source port for both would \
             look like one connection to it; give each service its own backend port",
            services.join(", ")
        );
    }
}

fn log_service(service: &crate::services::ServiceState) {
    let config = &service.config;
    let backends: Vec<String> = service
        .backends
        .iter()
        .map(|backend| format!("{} (weight {})", backend.addr, backend.weight))
        .collect();
    tracing::info!(
        "service {} {}/{} ({}) with backends {}",
        config.name,
        SocketAddr::new(config.vip, config.port),
        config.protocol,
        config.scheduler,
        backends.join(", ")
    );
}

/// How each backend is reached, from the routing table.
struct Paths {
    /// The public interface, then every other interface backends are routed through: XDP
    /// goes on each, and redirects into them.
    xdp_interfaces: Vec<String>,
    /// Bridges backends sit behind: XDP cannot redirect into them.
    bridges: Vec<String>,
    /// Backends behind a bridge: the kernel forwards to them, tc egress translates replies.
    kernel_paths: BTreeSet<IpAddr>,
    /// The backends routed through each device, for messages about that device.
    backends_via: HashMap<String, Vec<String>>,
    /// The backend addresses routed through each device that is not a bridge.
    addresses_via: HashMap<String, BTreeSet<IpAddr>>,
}

/// Says which backend-facing interfaces have a larger MTU than the public one: a backend's
/// reply that does not fit the public interface cannot leave through XDP, and the kernel drops
/// the translated IPv4 reply as a martian (its source is the VIP) instead of answering with
/// "fragmentation needed". TCP's MSS usually keeps replies small enough; UDP's are not.
fn warn_about_larger_backend_mtus(public: &str, paths: &Paths) {
    let Some(public_mtu) = topology::mtu(public) else {
        return;
    };
    for interface in paths.xdp_interfaces.iter().chain(&paths.bridges) {
        if interface == public {
            continue;
        }
        if let Some(backend_mtu) =
            topology::mtu(interface).filter(|&backend_mtu| backend_mtu > public_mtu)
        {
            tracing::warn!(
                "interface {interface} has MTU {backend_mtu}, more than {public}'s {public_mtu}: \
                 a backend's reply larger than {public_mtu} bytes cannot be sent on to its \
                 client (counted as pass_frag_needed and lost). Give the backends' side an MTU \
                 of at most {public_mtu}"
            );
        }
    }
}

/// Says which VIPs clients may be unable to reach: a VIP on the public subnet that is no
/// address of this host gets no ARP or neighbour answer, and the balancer never sees a packet
/// for it. Only a warning: a VIP routed to this host by the network needs no local address.
/// After a reload (`previous` the configuration it replaced) only VIPs new to it are checked:
/// the others were warned about before.
fn warn_about_unreachable_vips(public: &str, config: &Config, previous: Option<&Config>) {
    let known: BTreeSet<IpAddr> = previous
        .map(|previous| {
            previous
                .services
                .iter()
                .map(|service| service.vip)
                .collect()
        })
        .unwrap_or_default();
    let vips: BTreeSet<IpAddr> = config
        .services
        .iter()
        .map(|service| service.vip)
        .filter(|vip| !known.contains(vip))
        .collect();
    for vip in vips {
        let services: Vec<&str> = config
            .services
            .iter()
            .filter(|service| service.vip == vip)
            .map(|service| service.name.as_str())
            .collect();
        let services = services.join(", ");
        let prefix = if vip.is_ipv6() { 128 } else { 32 };
        match topology::vip_route(vip) {
            topology::VipRoute::Local => {}
            topology::VipRoute::Broadcast { device } => tracing::warn!(
                "VIP {vip} (service {services}) is the broadcast address of a subnet of \
                 {device}: clients' packets to it go to every host there as broadcasts, and \
                 connections to it do not work. Choose a VIP that is no subnet's broadcast or \
                 network address"
            ),
            topology::VipRoute::OnLink { device } => tracing::warn!(
                "VIP {vip} (service {services}) is on {device}'s subnet but no address of this \
                 host: nobody answers ARP or neighbour solicitations for it, so clients cannot \
                 reach it. Add it to the public interface: `ip addr add {vip}/{prefix} dev \
                 {public}`"
            ),
            topology::VipRoute::Routed { device } => tracing::warn!(
                "VIP {vip} (service {services}) is no address of this host and is routed out \
                 through {device}: clients reach it only if the network routes it to {public} \
                 (a routed additional address). Otherwise add it: `ip addr add {vip}/{prefix} dev \
                 {public}`"
            ),
            topology::VipRoute::Unknown { detail } => tracing::warn!(
                "VIP {vip} (service {services}) is no address of this host and has no route \
                 ({detail}): add it to the public interface: `ip addr add {vip}/{prefix} dev \
                 {public}`"
            ),
        }
    }
}

fn paths_for(public: &str, config: &Config) -> Result<Paths> {
    topology::check_interface(public)?;
    topology::check_ethernet(public).context("the public interface")?;
    let mut paths = Paths {
        xdp_interfaces: vec![public.to_string()],
        bridges: Vec::new(),
        kernel_paths: BTreeSet::new(),
        backends_via: HashMap::new(),
        addresses_via: HashMap::new(),
    };
    for service in &config.services {
        for backend in &service.backends {
            let device = topology::route_device(backend.addr.ip())?;
            topology::check_ethernet(&device).with_context(|| {
                format!(
                    "backend {} of service {} is routed through {device}; route it through an \
                     Ethernet interface (or a bridge) instead",
                    backend.addr, service.name
                )
            })?;
            paths
                .backends_via
                .entry(device.clone())
                .or_default()
                .push(format!("{} of {}", backend.addr, service.name));
            if topology::is_bridge(&device) {
                paths.kernel_paths.insert(backend.addr.ip());
                if !paths.bridges.contains(&device) {
                    paths.bridges.push(device);
                }
            } else {
                paths
                    .addresses_via
                    .entry(device.clone())
                    .or_default()
                    .insert(backend.addr.ip());
                if !paths.xdp_interfaces.contains(&device) {
                    paths.xdp_interfaces.push(device);
                }
            }
        }
    }
    Ok(paths)
}

/// A backend as the control socket names it: `ADDRESS:PORT`, `[ADDRESS]:PORT` for IPv6.
fn parse_backend(text: &str) -> Result<SocketAddr, std::net::AddrParseError> {
    text.parse()
}

/// Refuses IPv6 services, by name, when the loaded datapath was built without IPv6 maps.
/// Checked before anything is written or attached.
fn check_ipv6_support(dataplane: &XdpDataplane, config: &Config) -> Result<()> {
    let ipv6: Vec<&str> = config
        .services
        .iter()
        .filter(|service| service.vip.is_ipv6())
        .map(|service| service.name.as_str())
        .collect();
    if !ipv6.is_empty() && !dataplane.supports_ipv6() {
        anyhow::bail!(
            "services {} are IPv6, but this build's datapath has no IPv6 maps (SERVICES6, \
             FLOWS6, ...): it balances IPv4 only. Remove the IPv6 services, or run a build with \
             the IPv6 datapath",
            ipv6.join(", ")
        );
    }
    Ok(())
}

/// Checks the forwarding settings of every interface the datapath forwards through, for each
/// address family the configuration has services of.
fn check_forwarding<'a>(
    interfaces: impl Iterator<Item = &'a String>,
    config: &Config,
) -> Result<()> {
    let has_ipv4 = config.services.iter().any(|service| service.vip.is_ipv4());
    let has_ipv6 = config.services.iter().any(|service| service.vip.is_ipv6());
    for interface in interfaces {
        if has_ipv4 {
            topology::check_forwarding(interface)?;
        }
        if has_ipv6 {
            topology::check_ipv6_forwarding(interface)?;
        }
    }
    Ok(())
}

/// The interfaces XDP_REDIRECT will send into that cannot take redirects now: every
/// backend-facing interface, and the public one when replies are redirected into it (some
/// backend is elsewhere). A kernel without the netdev netlink family is not checked.
fn unready_redirect_targets(xdp_interfaces: &[String]) -> Vec<String> {
    // Only the public interface: one-armed, XDP_TX only, no redirect target.
    if xdp_interfaces.len() < 2 {
        return Vec::new();
    }
    let mut unready = Vec::new();
    for interface in xdp_interfaces {
        let index = topology::interface_index(interface);
        if index == 0 {
            continue; // gone for the moment; the reconciler deals with it
        }
        match netdev::xdp_features(index) {
            Ok(features) if features & netdev::XDP_ACT_NDO_XMIT == 0 => {
                unready.push(interface.clone());
            }
            Ok(_) => {}
            Err(error) => tracing::debug!("not checking {interface}'s XDP features: {error}"),
        }
    }
    unready
}

fn redirect_advice(interfaces: &[String], backends_via: &HashMap<String, Vec<String>>) -> String {
    let each: Vec<String> = interfaces
        .iter()
        .map(|interface| match backends_via.get(interface) {
            Some(backends) => format!(
                "{interface} (backends {} are routed through it)",
                backends.join(", ")
            ),
            None => interface.clone(),
        })
        .collect();
    let subject = match each.as_slice() {
        [one] => format!("interface {one}"),
        _ => format!("interfaces {}", each.join("; ")),
    };
    format!(
        "{subject} cannot take XDP redirects now (the kernel reports no ndo-xmit among the XDP \
         features): frames redirected into them would be dropped without a trace. For a veth, \
         its peer (inside the container or namespace) needs GRO on or an XDP program: \
         `ethtool -K PEER gro on` where the peer is (in a container usually its eth0), after \
         the link is up (if it was set while the link was down, turn it off and on again). Or \
         run with --xdp-mode skb."
    )
}

/// Puts the reply-translating tc program on the public interface, for backends behind a
/// bridge, and says so.
fn attach_egress(dataplane: &mut XdpDataplane, public: &str, paths: &Paths) -> Result<()> {
    if dataplane
        .egress_interfaces()
        .iter()
        .any(|name| name == public)
    {
        return Ok(());
    }
    dataplane
        .attach_egress(public)
        .with_context(|| format!("attaching the tc egress program to {public}"))?;
    let backends: Vec<String> = paths.kernel_paths.iter().map(ToString::to_string).collect();
    tracing::info!(
        "backends {} sit behind bridge {}: the kernel forwards their packets after XDP \
         translates them, and a tc egress program on {public} translates their replies",
        backends.join(", "),
        paths.bridges.join(", ")
    );
    Ok(())
}

/// What to do about a failed attach, from the kernel's error number.
fn attach_hint(error: &aya::programs::ProgramError, interface: &str, mode: XdpMode) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return match io.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EEXIST) => format!(
                    " (another XDP program is already attached: stop the other lb-user, or \
                     remove it with `ip link set dev {interface} xdp off` if nothing needs it)"
                ),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if mode == XdpMode::Driver => {
                    " (the driver may lack native XDP support: try --xdp-mode skb)".to_string()
                }
                _ => String::new(),
            };
        }
        source = current.source();
    }
    String::new()
}

fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "skb",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Removes the control socket when the daemon stops, whichever way `run` returns.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.0) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing control socket {}: {error}", self.0.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(backend: usize) -> HealthEvent {
        HealthEvent {
            service: 0,
            backend,
            generation: 1,
            up: true,
            reason: "after 1 successful probe".to_string(),
            first_probe: false,
        }
    }

    #[test]
    fn health_events_queued_behind_one_are_taken_together() {
        let (sender, mut queue) = mpsc::channel(MAX_HEALTH_BATCH + 10);
        for backend in 1..MAX_HEALTH_BATCH + 4 {
            sender.try_send(event(backend)).expect("room");
        }
        let batch = take_queued(event(0), &mut queue);
        let backends: Vec<usize> = batch.iter().map(|event| event.backend).collect();
        assert_eq!(backends, (0..MAX_HEALTH_BATCH).collect::<Vec<_>>());
        let rest = take_queued(event(0), &mut queue);
        assert_eq!(rest.len(), 1 + 4, "the first and the 4 left");
        assert_eq!(take_queued(event(7), &mut queue), [event(7)]);
    }
}
