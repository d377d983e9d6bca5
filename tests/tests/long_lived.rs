//! Long-lived connections through a changing backend set, with real nginx backends: a backend
//! added by a reload and another drained while 50 keep-alive connections carry requests, a
//! backend stopped under load, and Maglev end to end.
//!
//! The keep-alive connections are opened by a thread inside the client namespace and send a
//! request every 200 ms; every response names the backend that sent it, so a connection moved
//! to another backend or broken shows up in its own record.
//!
//! They need root; without it they print `SKIPPED` and return, unless `LB_REQUIRE_PRIVILEGED=1`
//! makes that a failure. They need lb-user built (`cargo build -p lb-user`) and are meant to run
//! one at a time: `cargo test -p lb-tests --test long_lived -- --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use lb_tests::client::KeepAliveConnection;
use lb_tests::process::{wait_until, Poll};
use lb_tests::{
    config_toml, skip_unless_privileged, Client, LoadBalancer, NetnsName, Nginx, ServiceConfig,
    Topology, CLIENT_ADDRESS, VIP,
};

const SERVICE: &str = "web";
const SERVICE_URL: &str = "http://10.200.1.1/";
const SERVICE_PORT: u16 = 80;
/// How many keep-alive connections each test holds open.
const CONNECTIONS: usize = 50;
/// How often each keep-alive connection sends a request.
const REQUEST_INTERVAL: Duration = Duration::from_millis(200);
/// Hard bound on the keep-alive thread, whatever the test's steps do.
const LONG_LIVED_LIMIT: Duration = Duration::from_secs(40);
/// How long the test waits for the keep-alive connections to be open.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on any wait for a health or drain state change (a few probe intervals, generously).
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A topology with `backends` nginx backends, all running; lb-user is started by each test
/// with the backends it wants in its configuration.
struct Testbed {
    // Fields drop in order: processes before the namespaces they run in.
    nginx: Vec<Nginx>,
    client: Client,
    topology: Topology,
}

impl Testbed {
    fn start(backends: usize) -> anyhow::Result<Self> {
        let mut topology = Topology::demo().context("building the demo topology")?;
        while topology.backends.len() < backends {
            topology.add_backend()?;
        }
        let nginx = Nginx::start_on_backends(&topology, SERVICE_PORT)?;
        let client = Client::new(&topology.client);
        Ok(Self {
            nginx,
            client,
            topology,
        })
    }

    /// The demo service over the first `backends` backends.
    fn service(&self, backends: usize) -> ServiceConfig {
        let mut service = self.topology.demo_service();
        service.backends.truncate(backends);
        service
    }

    /// Starts lb-user with `config` and waits until `backends` backends are up.
    fn start_lb(&self, config: &str, backends: usize) -> anyhow::Result<LoadBalancer> {
        let mut lb = LoadBalancer::start(&self.topology.lb, config)?;
        lb.wait_backends_up(backends, STATE_TIMEOUT)?;
        Ok(lb)
    }

    /// `10.200.11.2:80` for `backend1`, as lb-user names backends.
    fn backend_endpoint(&self, name: &str) -> anyhow::Result<String> {
        let backend = self.topology.backend(name)?;
        Ok(format!("{}:{SERVICE_PORT}", backend.address))
    }

    fn nginx(&self, name: &str) -> anyhow::Result<&Nginx> {
        let position = self.position(name)?;
        Ok(&self.nginx[position])
    }

    fn nginx_mut(&mut self, name: &str) -> anyhow::Result<&mut Nginx> {
        let position = self.position(name)?;
        Ok(&mut self.nginx[position])
    }

    fn position(&self, name: &str) -> anyhow::Result<usize> {
        self.topology
            .backends
            .iter()
            .position(|backend| backend.name == name)
            .with_context(|| format!("the topology has no backend called {name}"))
    }
}

/// One request's outcome on a keep-alive connection.
#[derive(Debug)]
struct Exchange {
    at: Instant,
    /// The local port of the TCP connection that carried it (0: it could not connect).
    port: u16,
    /// The backend that answered (the body, trimmed), or the error.
    result: Result<String, String>,
}

/// Everything one of the long-lived connections saw: its first TCP connection and, if that
/// broke and reconnecting was allowed, its successors.
#[derive(Debug)]
struct Conversation {
    /// The local port of the first TCP connection.
    first_port: u16,
    /// The backend that answered the first request.
    first_backend: String,
    exchanges: Vec<Exchange>,
}

impl Conversation {
    fn errors(&self) -> Vec<&Exchange> {
        self.exchanges
            .iter()
            .filter(|exchange| exchange.result.is_err())
            .collect()
    }

    /// Requests answered by `backend` at or after `since`.
    fn answers_from(&self, backend: &str, since: Instant) -> usize {
        self.exchanges
            .iter()
            .filter(|exchange| exchange.at >= since && exchange.result.as_deref() == Ok(backend))
            .count()
    }

    /// Exchanges at or after `since` not answered by `backend` (errors included).
    fn not_from(&self, backend: &str, since: Instant) -> Vec<&Exchange> {
        self.exchanges
            .iter()
            .filter(|exchange| exchange.at >= since && exchange.result.as_deref() != Ok(backend))
            .collect()
    }
}

/// The keep-alive connections, driven by a thread inside the client namespace. Dropped
/// without [`LongLived::finish`] (a failed step), it still stops and joins the thread.
struct LongLived {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Conversation>>>>,
    /// `(local port, backend)` of each connection once all are open.
    established: Vec<(u16, String)>,
}

impl LongLived {
    /// Opens [`CONNECTIONS`] connections to the VIP, each answered once, and keeps them
    /// sending a request every [`REQUEST_INTERVAL`] until [`LongLived::finish`]. A connection
    /// that breaks is reopened on the next round when `reconnect` is set, and stays closed
    /// otherwise.
    fn start(client: &NetnsName, reconnect: bool) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (established_sender, established) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            client.spawn_thread("long-lived", move || {
                converse(reconnect, &stop, &established_sender)
            })?
        };
        let established = match established.recv_timeout(ESTABLISH_TIMEOUT) {
            Ok(established) => established,
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                let outcome = thread.join();
                bail!(
                    "the {CONNECTIONS} keep-alive connections were not open after \
                     {ESTABLISH_TIMEOUT:?}: {:?}",
                    outcome.map(|result| result.map(|conversations| conversations.len()))
                );
            }
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            established,
        })
    }

    /// The local ports of the connections that `backend` answered first.
    fn ports_on(&self, backend: &str) -> BTreeSet<u16> {
        self.established
            .iter()
            .filter(|(_, name)| name == backend)
            .map(|&(port, _)| port)
            .collect()
    }

    /// Stops the requests, closes every connection and returns what each saw.
    fn finish(mut self) -> anyhow::Result<Vec<Conversation>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .context("the keep-alive thread was joined")?;
        match thread.join() {
            Ok(result) => result,
            Err(_) => bail!("the keep-alive thread panicked"),
        }
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The thread ends within a round (each request bounded by its timeouts).
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("the keep-alive thread panicked");
            }
        }
    }
}

/// The keep-alive thread's work (see [`LongLived::start`]); runs inside the client namespace.
fn converse(
    reconnect: bool,
    stop: &AtomicBool,
    established: &mpsc::Sender<Vec<(u16, String)>>,
) -> anyhow::Result<Vec<Conversation>> {
    let begin = Instant::now();
    let vip = SocketAddrV4::new(VIP, SERVICE_PORT);
    let mut connections = Vec::new();
    let mut conversations = Vec::new();
    for number in 0..CONNECTIONS {
        let (connection, backend) =
            open(vip).with_context(|| format!("opening keep-alive connection {number}"))?;
        conversations.push(Conversation {
            first_port: connection.local_port(),
            first_backend: backend.clone(),
            exchanges: vec![Exchange {
                at: Instant::now(),
                port: connection.local_port(),
                result: Ok(backend),
            }],
        });
        connections.push(Some(connection));
    }
    let summary = conversations
        .iter()
        .map(|conversation| (conversation.first_port, conversation.first_backend.clone()))
        .collect();
    // The test gave up waiting if nobody receives this; the loop below then ends on `stop`.
    established.send(summary).ok();

    while !stop.load(Ordering::Relaxed) && begin.elapsed() < LONG_LIVED_LIMIT {
        let round = Instant::now();
        for (slot, conversation) in connections.iter_mut().zip(&mut conversations) {
            if begin.elapsed() >= LONG_LIVED_LIMIT {
                break;
            }
            let exchange = match slot {
                Some(connection) => {
                    let port = connection.local_port();
                    let result = connection.get().map_err(|error| error.to_string());
                    if result.is_err() {
                        *slot = None;
                    }
                    Exchange {
                        at: Instant::now(),
                        port,
                        result: result.map(|body| body.trim().to_string()),
                    }
                }
                None if reconnect => match open(vip) {
                    Ok((connection, backend)) => {
                        let port = connection.local_port();
                        *slot = Some(connection);
                        Exchange {
                            at: Instant::now(),
                            port,
                            result: Ok(backend),
                        }
                    }
                    Err(error) => Exchange {
                        at: Instant::now(),
                        port: 0,
                        result: Err(format!("reconnecting: {error:#}")),
                    },
                },
                None => continue,
            };
            conversation.exchanges.push(exchange);
        }
        thread::sleep(REQUEST_INTERVAL.saturating_sub(round.elapsed()));
    }
    // Dropping the connections closes them: FIN from the client, as a browser does.
    drop(connections);
    Ok(conversations)
}

/// Opens a keep-alive connection and sends its first request; returns it with the backend
/// that answered.
fn open(vip: SocketAddrV4) -> anyhow::Result<(KeepAliveConnection, String)> {
    let mut connection = KeepAliveConnection::connect(vip, "/").context("connecting")?;
    let body = connection
        .get()
        .with_context(|| format!("first request from port {}", connection.local_port()))?;
    Ok((connection, body.trim().to_string()))
}

/// Backend name → how many of `backends` name it.
fn spread<'a>(backends: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for backend in backends {
        *counts.entry(backend.clone()).or_default() += 1;
    }
    counts
}

/// The client ports of `flows`, for the flows of [`CLIENT_ADDRESS`].
fn client_ports(flows: &[lb_tests::lb::Flow]) -> anyhow::Result<BTreeSet<u16>> {
    let prefix = format!("{CLIENT_ADDRESS}:");
    flows
        .iter()
        .map(|flow| {
            flow.client
                .strip_prefix(&prefix)
                .and_then(|port| port.parse().ok())
                .with_context(|| format!("flow of an unexpected client: {flow:?}"))
        })
        .collect()
}

/// Access-log lines from [`CLIENT_ADDRESS`]: `(remote port, line)`.
fn client_lines(lines: &[String]) -> Vec<(u16, &str)> {
    let prefix = format!("{CLIENT_ADDRESS} ");
    lines
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let port = rest.split_whitespace().next()?.parse().ok()?;
            Some((port, line.as_str()))
        })
        .collect()
}

/// `count` curls through the VIP: the backend (trimmed body) and local port of each.
fn curls(client: &Client, count: usize) -> anyhow::Result<Vec<(String, u16)>> {
    (1..=count)
        .map(|request| {
            let (body, port) = client
                .get_with_local_port(SERVICE_URL)
                .with_context(|| format!("curl {request} of {count}"))?;
            Ok((body.trim().to_string(), port))
        })
        .collect()
}

/// How many, and the first few, for assertion messages.
fn first_few<T: std::fmt::Debug>(items: &[T]) -> String {
    let shown: Vec<String> = items
        .iter()
        .take(5)
        .map(|item| format!("{item:?}"))
        .collect();
    format!("{} in all, first: [{}]", items.len(), shown.join(", "))
}

/// When the steps of [`long_lived_connections_survive_add_and_drain`] happened, and what they
/// saw while the connections were open.
struct AddAndDrain {
    drained: Instant,
    /// Curls after the drain: `(backend, local port)`.
    after_drain: Vec<(String, u16)>,
    /// `lb-user flows --backend <backend1>` after the drain.
    backend1_flows: Vec<lb_tests::lb::Flow>,
}

#[test]
fn long_lived_connections_survive_add_and_drain() -> anyhow::Result<()> {
    if !skip_unless_privileged("long_lived_connections_survive_add_and_drain") {
        return Ok(());
    }
    let started = Instant::now();
    // backend3 is wired (and its nginx runs) from the start, but lb-user learns of it only
    // from the reload.
    let testbed = Testbed::start(3)?;
    let mut lb = testbed.start_lb(&config_toml(&[testbed.service(2)]), 2)?;
    let backend1 = testbed.backend_endpoint("backend1")?;
    let backend1_address = testbed.topology.backend("backend1")?.address.to_string();
    let backend1_lb_address = testbed.topology.backend("backend1")?.lb_address;
    let backend3_address = testbed.topology.backend("backend3")?.address.to_string();

    let long_lived = LongLived::start(testbed.topology.client.name(), false)?;
    let initial = spread(long_lived.established.iter().map(|(_, backend)| backend));
    let on_backend1 = long_lived.ports_on("backend1");
    // Round robin over two backends: about half each, whatever the CPUs did.
    ensure!(
        on_backend1.len() >= 5 && long_lived.ports_on("backend2").len() >= 5,
        "the keep-alive connections were not spread over both backends: {initial:?}"
    );

    // Whatever happens in the steps, stop the connections before looking at their records.
    let steps = (|| -> anyhow::Result<AddAndDrain> {
        thread::sleep(Duration::from_secs(1));
        let message = lb.reload(&config_toml(&[testbed.service(3)]))?;
        println!("reload: {message}");
        let stats = lb.wait_backend_state(&backend3_address, "up", STATE_TIMEOUT)?;
        ensure!(
            stats.interfaces.iter().any(|name| name == "lbb3"),
            "XDP is not on lbb3 after the reload: {:?}",
            stats.interfaces
        );
        thread::sleep(Duration::from_secs(1));

        let message = lb.drain(SERVICE, &backend1)?;
        let drained = Instant::now();
        println!("drain: {message}");
        let stats = lb.stats_json()?;
        let drained_stats = stats.backend(&backend1_address)?;
        ensure!(
            drained_stats.drained && drained_stats.state == "up",
            "backend1 after `lb-user drain`: {drained_stats:?}"
        );

        let after_drain = curls(&testbed.client, 30)?;
        let backend1_flows = lb.flows(Some(SERVICE), Some(&backend1))?;
        thread::sleep(Duration::from_secs(1));
        Ok(AddAndDrain {
            drained,
            after_drain,
            backend1_flows,
        })
    })();
    let conversations = long_lived.finish();
    let steps = steps?;
    let conversations = conversations?;

    // Every connection kept working, on the backend it started on, through the reload and the
    // drain and after both.
    for conversation in &conversations {
        let backend = &conversation.first_backend;
        let broken = conversation.not_from(backend, conversation.exchanges[0].at);
        ensure!(
            broken.is_empty(),
            "connection from port {} started on {backend}, then: {}",
            conversation.first_port,
            first_few(&broken)
        );
        let after_drain = conversation.answers_from(backend, steps.drained);
        ensure!(
            after_drain >= 3,
            "connection from port {} ({backend}) made only {after_drain} requests after the \
             drain: {}",
            conversation.first_port,
            first_few(&conversation.exchanges)
        );
    }
    let requests: usize = conversations
        .iter()
        .map(|conversation| conversation.exchanges.len())
        .sum();

    // New connections avoid the drained backend, and the added one takes its share.
    let after_drain = spread(steps.after_drain.iter().map(|(backend, _)| backend));
    ensure!(
        !after_drain.contains_key("backend1"),
        "new connections reached drained backend1: {after_drain:?}"
    );
    ensure!(
        after_drain.get("backend3").copied().unwrap_or(0) >= 5,
        "the added backend3 got too few of 30 new connections: {after_drain:?}"
    );

    // The drained backend's flows are still tracked: exactly its long-lived connections.
    let listed = client_ports(&steps.backend1_flows)?;
    ensure!(
        listed == on_backend1,
        "`lb-user flows --backend {backend1}` after the drain lists client ports {listed:?}; \
         backend1's long-lived connections have {on_backend1:?}"
    );
    ensure!(
        steps.backend1_flows.iter().all(|flow| flow.state == "open"),
        "backend1's flows while open: {:?}",
        steps.backend1_flows
    );

    // Closed by the client, backend1's connections complete: their flows saw the FIN (and are
    // closing) or have already gone.
    let closing = wait_until(STATE_TIMEOUT, "backend1's flows to close", || {
        let flows = lb.flows(Some(SERVICE), Some(&backend1))?;
        if flows.iter().all(|flow| flow.state == "closing") {
            return Ok(Poll::Ready(flows));
        }
        Ok(Poll::NotYet(format!("{flows:?}")))
    })?;

    // After the close, backend1 sees health probes only: no client connection, old or new.
    let log_at_close = testbed.nginx("backend1")?.access_log_lines()?.len();
    let late = curls(&testbed.client, 10)?;
    ensure!(
        late.iter().all(|(backend, _)| backend != "backend1"),
        "new connections reached drained backend1 after the close: {late:?}"
    );
    thread::sleep(Duration::from_secs(1));
    let access_log = testbed.nginx("backend1")?.access_log_lines()?;
    let since_close = &access_log[log_at_close.min(access_log.len())..];
    let probe_prefix = format!("{backend1_lb_address} ");
    ensure!(
        !since_close.is_empty()
            && since_close
                .iter()
                .all(|line| line.starts_with(&probe_prefix)),
        "backend1's access log after the close should hold only probes from \
         {backend1_lb_address}: {since_close:?}"
    );
    let strangers: Vec<(u16, &str)> = client_lines(&access_log)
        .into_iter()
        .filter(|(port, _)| !on_backend1.contains(port))
        .collect();
    ensure!(
        strangers.is_empty(),
        "backend1 served client connections other than its long-lived ones: {}",
        first_few(&strangers)
    );

    println!(
        "{CONNECTIONS} connections {initial:?}, {requests} requests, none failed; after the \
         drain: {after_drain:?}; {} backend1 flows listed, {} closing after the close; \
         {} probe lines since; test took {:?}",
        listed.len(),
        closing.len(),
        since_close.len(),
        started.elapsed()
    );
    lb.stop()?;
    Ok(())
}

#[test]
fn stopping_a_backend_moves_only_its_connections() -> anyhow::Result<()> {
    if !skip_unless_privileged("stopping_a_backend_moves_only_its_connections") {
        return Ok(());
    }
    let started = Instant::now();
    let mut testbed = Testbed::start(2)?;
    let mut lb = testbed.start_lb(&config_toml(&[testbed.service(2)]), 2)?;
    let backend2_address = testbed.topology.backend("backend2")?.address.to_string();

    let long_lived = LongLived::start(testbed.topology.client.name(), true)?;
    let initial = spread(long_lived.established.iter().map(|(_, backend)| backend));
    ensure!(
        long_lived.ports_on("backend1").len() >= 5 && long_lived.ports_on("backend2").len() >= 5,
        "the keep-alive connections were not spread over both backends: {initial:?}"
    );

    let steps = (|| -> anyhow::Result<(Instant, Instant)> {
        thread::sleep(Duration::from_secs(1));
        testbed.nginx_mut("backend2")?.stop()?;
        // From here on nothing can answer as backend2.
        let stopped = Instant::now();
        lb.wait_backend_state(&backend2_address, "down", STATE_TIMEOUT)?;
        let down = Instant::now();
        // Reconnects are tried every round: a few seconds is many rounds.
        thread::sleep(Duration::from_secs(3));
        Ok((stopped, down))
    })();
    let conversations = long_lived.finish();
    let (stopped, down) = steps?;
    let conversations = conversations?;

    let mut moved = 0;
    for conversation in &conversations {
        let port = conversation.first_port;
        match conversation.first_backend.as_str() {
            "backend1" => {
                let other = conversation.not_from("backend1", conversation.exchanges[0].at);
                ensure!(
                    other.is_empty(),
                    "connection from port {port} on backend1 was disturbed: {}",
                    first_few(&other)
                );
                ensure!(
                    conversation.answers_from("backend1", down) >= 3,
                    "connection from port {port} on backend1 stopped answering: {}",
                    first_few(&conversation.exchanges)
                );
            }
            "backend2" => {
                ensure!(
                    !conversation.errors().is_empty(),
                    "connection from port {port} on backend2 never broke, though its nginx \
                     stopped: {}",
                    first_few(&conversation.exchanges)
                );
                let wrong = conversation.not_from("backend1", stopped);
                let answered_by_backend2: Vec<&&Exchange> = wrong
                    .iter()
                    .filter(|exchange| exchange.result.as_deref() == Ok("backend2"))
                    .collect();
                ensure!(
                    answered_by_backend2.is_empty(),
                    "answers from backend2 after its nginx stopped: {}",
                    first_few(&answered_by_backend2)
                );
                // Until lb-user marks backend2 down, a reconnect may still be sent there and be
                // refused; once it has, every reconnect must reach backend1. The margin covers a
                // refusal that completed just after the state change was read.
                let late_errors: Vec<&Exchange> = conversation
                    .errors()
                    .into_iter()
                    .filter(|exchange| exchange.at > down + Duration::from_millis(500))
                    .collect();
                ensure!(
                    late_errors.is_empty(),
                    "connection from port {port} failed after backend2 was down: {}",
                    first_few(&late_errors)
                );
                let last = conversation.exchanges.last().context("no exchanges")?;
                ensure!(
                    last.result.as_deref() == Ok("backend1") && last.port != port,
                    "connection from port {port} did not end up reconnected to backend1: last \
                     {last:?}, errors {}",
                    first_few(&conversation.errors())
                );
                ensure!(
                    conversation.answers_from("backend1", down) >= 3,
                    "connection from port {port} did not settle on backend1: {}",
                    first_few(&conversation.exchanges)
                );
                moved += 1;
            }
            other => bail!("connection from port {port} started on {other:?}"),
        }
    }
    // The errors by their innermost cause ("Connection refused (os error 111)"), for the log.
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for exchange in conversations.iter().flat_map(Conversation::errors) {
        if let Err(error) = &exchange.result {
            let cause = error.rsplit(": ").next().unwrap_or(error);
            *errors.entry(cause.to_string()).or_default() += 1;
        }
    }
    let stats = lb.stats_json()?;
    println!(
        "{CONNECTIONS} connections {initial:?}; {moved} moved to backend1 after backend2 \
         stopped (errors on them: {errors:?}; down detected after {:?}); backend2 \
         rescheduled {}; test took {:?}",
        down - stopped,
        stats.backend(&backend2_address)?.rescheduled,
        started.elapsed()
    );
    lb.stop()?;
    Ok(())
}

#[test]
fn maglev_service_end_to_end() -> anyhow::Result<()> {
    if !skip_unless_privileged("maglev_service_end_to_end") {
        return Ok(());
    }
    let started = Instant::now();
    let testbed = Testbed::start(2)?;
    let mut service = testbed.service(2);
    service.scheduler = Some("maglev".to_string());
    // Closed flows stay listed for a minute, longer than this test, so every curl's is there.
    let config = format!(
        "[flows]\ntcp_closing_timeout = \"60s\"\n\n{}",
        config_toml(&[service])
    );
    let lb = testbed.start_lb(&config, 2)?;
    let stats = lb.stats_json()?;
    ensure!(
        stats.service(SERVICE)?.scheduler == "maglev",
        "{:?}",
        stats.service(SERVICE)?
    );

    const REQUESTS: usize = 100;
    let answers = curls(&testbed.client, REQUESTS)?;
    let counts = spread(answers.iter().map(|(backend, _)| backend));
    ensure!(
        counts
            .keys()
            .map(String::as_str)
            .eq(["backend1", "backend2"]),
        "answers: {counts:?}"
    );
    for (backend, &count) in &counts {
        ensure!(
            (30..=70).contains(&count),
            "{backend} got {count} of {REQUESTS}: {counts:?}"
        );
    }

    // Each curl's flow is listed, on the backend that answered it.
    let flows = lb.flows(Some(SERVICE), None)?;
    let by_client: BTreeMap<&str, &str> = flows
        .iter()
        .map(|flow| (flow.client.as_str(), flow.backend.as_str()))
        .collect();
    let mut mismatches = Vec::new();
    for (backend, port) in &answers {
        let client = format!("{CLIENT_ADDRESS}:{port}");
        let expected = testbed.backend_endpoint(backend)?;
        match by_client.get(client.as_str()) {
            Some(&listed) if listed == expected => {}
            listed => mismatches.push(format!(
                "{client} answered by {expected}, listed {listed:?}"
            )),
        }
    }
    ensure!(
        mismatches.is_empty(),
        "flows against answers: {}; {} flows listed",
        first_few(&mismatches),
        flows.len()
    );
    println!(
        "maglev: {counts:?}, {} flows listed, every curl's on its backend; test took {:?}",
        flows.len(),
        started.elapsed()
    );
    Ok(())
}
