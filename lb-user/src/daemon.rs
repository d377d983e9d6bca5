//! `lb-user --iface IFACE --config FILE`: validate, load, attach, keep backends current from
//! health probes, serve the control socket, and detach cleanly on SIGINT or SIGTERM.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    config::{self, Config},
    control,
    dataplane::XdpDataplane,
    health::{self, HealthEvent},
    services::ServiceTable,
    stats::Snapshot,
    topology,
};

pub struct Options {
    /// The public interface, where clients' packets for the services arrive.
    pub interface: String,
    pub config: PathBuf,
    pub mode: XdpMode,
    pub socket: PathBuf,
}

/// The datapath and the state it was built from, shared by the health loop and the control
/// socket.
struct Shared {
    table: ServiceTable,
    dataplane: XdpDataplane,
}

pub async fn run(options: Options) -> Result<()> {
    // Everything that can be checked is checked before the datapath is touched.
    let config = config::load(&options.config)
        .with_context(|| format!("invalid configuration {}", options.config.display()))?;
    let interfaces = interfaces_for(&options.interface, &config)?;
    for interface in &interfaces {
        topology::check_forwarding(interface)?;
    }
    let listener = control::bind(&options.socket)?;
    let _socket_guard = RemoveOnDrop(options.socket.clone());

    let verifier_log = options.socket.with_file_name("verifier.log");
    let mut dataplane = XdpDataplane::load(&verifier_log).context("loading the XDP program")?;
    tracing::info!("XDP program loaded");
    let table = ServiceTable::new(&config);
    table
        .install(&mut dataplane)
        .context("writing services and backends to the datapath")?;
    for service in &table.services {
        let config = &service.config;
        let backends: Vec<String> = service
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        tracing::info!(
            "service {} {}:{}/{} with backends {} (all down until their first probe passes)",
            config.name,
            config.vip,
            config.port,
            config.protocol,
            backends.join(", ")
        );
    }

    // Backend-facing interfaces first, the public one last: by the time clients' packets are
    // translated, their replies are translated too. A failure drops `dataplane`, which
    // detaches whatever was attached already.
    for interface in interfaces.iter().rev() {
        dataplane.attach(interface, options.mode).with_context(|| {
            format!(
                "attaching XDP to {interface} in {} mode{}",
                mode_name(options.mode),
                if options.mode == XdpMode::Driver {
                    " (if the driver has no native XDP support, try --xdp-mode skb)"
                } else {
                    ""
                }
            )
        })?;
        tracing::info!(
            "attached XDP program to {interface} in {} mode",
            mode_name(options.mode)
        );
    }

    let shared = Arc::new(Mutex::new(Shared { table, dataplane }));
    let (events, mut health_events) = mpsc::channel::<HealthEvent>(256);
    let checkers = spawn_checkers(&config, &events);
    drop(events);

    let control_task = tokio::spawn(control::serve(listener, {
        let shared = Arc::clone(&shared);
        move || {
            let shared = shared
                .lock()
                .map_err(|_| "daemon state poisoned".to_string())?;
            let interfaces = shared.dataplane.attached_interfaces();
            Snapshot::take(&shared.table, &shared.dataplane, interfaces)
                .map_err(|error| error.to_string())
        }
    }));

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let outcome = loop {
        tokio::select! {
            event = health_events.recv() => match event {
                Some(event) => apply_health_event(&shared, event),
                None => break Err(anyhow::anyhow!("every health checker stopped")),
            },
            _ = terminate.recv() => {
                tracing::info!("SIGTERM received, shutting down");
                break Ok(());
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received, shutting down");
                break Ok(());
            }
        }
    };

    control_task.abort();
    for checker in checkers {
        checker.abort();
    }
    let mut shared = shared
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state poisoned"))?;
    let failures = shared.dataplane.detach_all();
    if let Some((interface, error)) = failures.first() {
        // The links die with this process anyway; say so rather than fail silently.
        anyhow::bail!("detaching XDP from {interface}: {error} (it goes when this process exits)");
    }
    outcome
}

/// The public interface plus every interface a backend is routed through, deduplicated.
fn interfaces_for(public: &str, config: &Config) -> Result<Vec<String>> {
    topology::check_interface(public)?;
    let mut interfaces = vec![public.to_string()];
    for service in &config.services {
        for backend in &service.backends {
            let device = topology::route_device(*backend.addr.ip())?;
            if !interfaces.contains(&device) {
                interfaces.push(device);
            }
        }
    }
    Ok(interfaces)
}

fn spawn_checkers(
    config: &Config,
    events: &mpsc::Sender<HealthEvent>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut checkers = Vec::new();
    for (service_index, service) in config.services.iter().enumerate() {
        for (backend_index, backend) in service.backends.iter().enumerate() {
            let port = service.health_check.port.unwrap_or(backend.addr.port());
            let target = SocketAddrV4::new(*backend.addr.ip(), port);
            checkers.push(health::spawn_checker(
                service_index,
                backend_index,
                target,
                service.health_check.clone(),
                events.clone(),
            ));
        }
    }
    checkers
}

fn apply_health_event(shared: &Mutex<Shared>, event: HealthEvent) {
    let Ok(mut guard) = shared.lock() else {
        tracing::error!("daemon state poisoned; ignoring health event {event:?}");
        return;
    };
    let Shared { table, dataplane } = &mut *guard;
    let Some(service) = table.services.get(event.service) else {
        return;
    };
    let Some(backend) = service.backends.get(event.backend) else {
        return;
    };
    let (name, addr) = (service.config.name.clone(), backend.addr);
    let state = if event.up { "up" } else { "down" };
    match table.set_backend_up(event.service, event.backend, event.up, dataplane) {
        Ok(true) => tracing::info!(
            "backend {addr} of service {name} is {state} {}",
            event.reason
        ),
        Ok(false) => {}
        Err(error) => {
            tracing::error!("backend {addr} of service {name} is {state}, but updating the datapath failed: {error}")
        }
    }
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
