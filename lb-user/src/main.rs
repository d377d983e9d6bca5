//! `lb-user`: runs the XDP load balancer, and talks to a running one.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_user::{
    config,
    control::{self, Request, Response},
    daemon,
};

#[derive(Parser)]
#[command(
    name = "lb-user",
    version,
    about = "XDP layer-4 load balancer: runs the datapath on an interface, or queries it",
    override_usage = "lb-user --iface IFACE --config FILE [--xdp-mode native|skb] [--socket PATH]\n       \
                      lb-user stats [--json] [--socket PATH]\n       \
                      lb-user drain --service NAME --backend ADDRESS:PORT [--socket PATH]\n       \
                      lb-user undrain --service NAME --backend ADDRESS:PORT [--socket PATH]\n       \
                      lb-user reload [--socket PATH]\n       \
                      lb-user flows [--service NAME] [--backend ADDRESS:PORT] [--json] [--socket PATH]\n       \
                      lb-user check-config --config FILE",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The public interface: where packets for the services arrive (e.g. eth0).
    #[arg(long, required = true)]
    iface: Option<String>,

    /// The TOML configuration (services, backends, health checks).
    #[arg(long, required = true)]
    config: Option<PathBuf>,

    /// How to attach: native runs in the driver (fast; veth and most NICs support it), skb
    /// runs in the kernel's generic path (works on any device, slower).
    #[arg(long, value_enum, default_value_t = Mode::Native)]
    xdp_mode: Mode,

    /// The control socket to serve (`lb-user stats` connects to it).
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Print the counters of the running daemon.
    Stats {
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Stop sending new flows to a backend; its existing flows continue.
    Drain {
        /// The service's name.
        #[arg(long)]
        service: String,
        /// The backend, ADDRESS:PORT as configured; an IPv6 one as [ADDRESS]:PORT.
        #[arg(long)]
        backend: String,
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        /// The service's name.
        #[arg(long)]
        service: String,
        /// The backend, ADDRESS:PORT as configured; an IPv6 one as [ADDRESS]:PORT.
        #[arg(long)]
        backend: String,
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Re-read the daemon's configuration file (as SIGHUP does); a rejected file changes nothing.
    Reload {
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List the active flows: client, service, backend, age, idle time, TCP state.
    Flows {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<String>,
        /// Only flows on this backend (ADDRESS:PORT, or [ADDRESS]:PORT for IPv6).
        #[arg(long)]
        backend: Option<String>,
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Validate a configuration file without touching the datapath.
    CheckConfig {
        /// The TOML configuration to check.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Native,
    Skb,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for people: logs redirected to a file or journal stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_message(response: Response) {
    if let Some(message) = response.message {
        println!("{message}");
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Stats { json, socket }) => {
            let snapshot = control::request_stats(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.to_table());
            }
            Ok(())
        }
        Some(Command::Drain {
            service,
            backend,
            socket,
        }) => {
            print_message(control::request(
                &socket,
                &Request::Drain { service, backend },
            )?);
            Ok(())
        }
        Some(Command::Undrain {
            service,
            backend,
            socket,
        }) => {
            print_message(control::request(
                &socket,
                &Request::Undrain { service, backend },
            )?);
            Ok(())
        }
        Some(Command::Reload { socket }) => {
            print_message(control::request(&socket, &Request::Reload)?);
            Ok(())
        }
        Some(Command::Flows {
            service,
            backend,
            json,
            socket,
        }) => {
            let response = control::request(&socket, &Request::Flows { service, backend })?;
            let flows = response.flows.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                // Wide enough for most IPv6 clients and backends too ([addr]:port).
                println!(
                    "{:<30} {:<16} {:<5} {:<30} {:>7} {:>6} STATE",
                    "CLIENT", "SERVICE", "PROTO", "BACKEND", "AGE", "IDLE"
                );
                for flow in &flows {
                    println!(
                        "{:<30} {:<16} {:<5} {:<30} {:>6}s {:>5}s {}",
                        flow.client,
                        flow.service,
                        flow.protocol,
                        flow.backend,
                        flow.age_seconds,
                        flow.idle_seconds,
                        flow.state
                    );
                }
                println!("{} flows", flows.len());
            }
            Ok(())
        }
        Some(Command::CheckConfig { config }) => {
            let parsed = config::load(&config)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            lb_user::services::ServiceTable::schedule_size_for(&parsed)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let backends: usize = parsed.services.iter().map(|s| s.backends.len()).sum();
            let ipv6 = parsed.services.iter().filter(|s| s.vip.is_ipv6()).count();
            println!(
                "{}: {} service(s) ({} IPv4, {ipv6} IPv6), {backends} backend(s): valid",
                config.display(),
                parsed.services.len(),
                parsed.services.len() - ipv6
            );
            Ok(())
        }
        None => {
            let (Some(interface), Some(config)) = (cli.iface, cli.config) else {
                anyhow::bail!("--iface and --config are required to run the load balancer");
            };
            require_privileges()?;
            let mode = match cli.xdp_mode {
                Mode::Native => XdpMode::Driver,
                Mode::Skb => XdpMode::Skb,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(daemon::Options {
                interface,
                config,
                mode,
                socket: cli.socket,
            }))
        }
    }
}

/// Refuses to start, with the reason, without the capabilities that loading and attaching the
/// datapath need: otherwise the first map the kernel refuses ends the start with a bare EPERM.
fn require_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |capability: u32| effective & (1u64 << capability) != 0;
    if !has(CAP_NET_ADMIN) || !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        anyhow::bail!(
            "running the load balancer needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): \
             it loads an XDP program and attaches it to interfaces; the other subcommands \
             (stats, flows, check-config, ...) do not start one"
        );
    }
    Ok(())
}
