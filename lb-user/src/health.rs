//! Health checking of backends: single probes (TCP connect, HTTP GET), the rise/fall
//! hysteresis that turns probe results into up/down states, and one background task per
//! backend that reports state changes.
//!
//! Probes go straight to the backend's address, not through the vip, so they test the backend
//! itself whatever the datapath currently does with its traffic. IPv4 and IPv6 backends are
//! probed alike: the target is a socket address of either family.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::{HealthCheck, Probe};

/// Most bytes read while looking for the HTTP status line. The line is short; a server that
/// sends this much without a line break is not speaking HTTP, and the bound keeps a hostile
/// or broken backend from making the probe buffer without limit.
const MAX_STATUS_LINE: usize = 4096;

/// Rise/fall state machine with HAProxy's meaning of rise and fall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    up: bool,
    /// No result recorded yet: the next one decides the state at once.
    fresh: bool,
    /// Consecutive results that argue for leaving the current state: successes while down,
    /// failures while up.
    streak: u32,
}

impl Hysteresis {
    /// Starts down. The very first probe result decides the initial state at once (one
    /// success = up, one failure = stays down, reported as a transition only if up), so a
    /// freshly started balancer serves as soon as a backend answers once. After that, an up
    /// backend goes down after `fall` consecutive failures and a down backend goes up after
    /// `rise` consecutive successes. A `rise` or `fall` of 0 acts as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            up: false,
            fresh: true,
            streak: 0,
        }
    }

    /// Records one probe result; returns Some(new_state_is_up) only on a state change.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if self.fresh {
            self.fresh = false;
            self.up = success;
            return success.then_some(true);
        }

        if success == self.up {
            // A result that agrees with the state breaks any streak against it.
            self.streak = 0;
            return None;
        }

        self.streak = self.streak.saturating_add(1);
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = !self.up;
        self.streak = 0;
        Some(self.up)
    }

    /// Continues from a known state (after a configuration reload): no first-probe shortcut,
    /// `rise` or `fall` apply from the first probe on.
    pub fn resume(rise: u32, fall: u32, up: bool) -> Self {
        Hysteresis {
            up,
            fresh: false,
            ..Hysteresis::new(rise, fall)
        }
    }

    /// Whether the backend is currently up.
    pub fn is_up(&self) -> bool {
        self.up
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The whole probe took longer than its timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection could not be established.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The connection failed while sending the request or reading the answer.
    #[error("i/o error: {0}")]
    Io(io::Error),
    /// The HTTP answer had another status than the one configured.
    #[error("HTTP status {got}, expected {expected}")]
    BadStatus {
        /// The configured status.
        expected: u16,
        /// The status received.
        got: u16,
    },
    /// The answer was not an HTTP status line.
    #[error("bad HTTP response: {0}")]
    BadResponse(String),
}

/// One probe against `target` (already the probe port). Tcp: connect within timeout, then close.
/// Http: connect, send `GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nUser-Agent: lb-user-health\r\n
/// Connection: close\r\n\r\n`, read the status line (bounded read, at most 4 KiB), compare the
/// code. Whole probe bounded by `timeout`. Probe::None always succeeds.
pub async fn probe(probe: &Probe, target: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let attempt = async {
        match probe {
            Probe::Tcp => connect(target).await.map(drop),
            Probe::Http {
                path,
                expect_status,
            } => http_get(target, path, *expect_status).await,
            Probe::None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(target)
        .await
        .map_err(ProbeError::Connect)
}

async fn http_get(target: SocketAddr, path: &str, expect_status: u16) -> Result<(), ProbeError> {
    let mut stream = connect(target).await?;

    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lb-user-health\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;

    let line = read_status_line(&mut stream).await?;
    let got = parse_status_code(&line)?;
    if got == expect_status {
        Ok(())
    } else {
        Err(ProbeError::BadStatus {
            expected: expect_status,
            got,
        })
    }
}

/// Reads until the first line break, at most [`MAX_STATUS_LINE`] bytes, and returns the line
/// without it. The rest of the response is not wanted, so the connection is simply dropped.
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ProbeError> {
    let mut buffer = vec![0; MAX_STATUS_LINE];
    let mut filled = 0;
    loop {
        if let Some(end) = buffer[..filled].iter().position(|&byte| byte == b'\n') {
            let line = &buffer[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            return Ok(line.to_vec());
        }
        if filled == buffer.len() {
            return Err(ProbeError::BadResponse(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes"
            )));
        }
        let read = stream
            .read(&mut buffer[filled..])
            .await
            .map_err(ProbeError::Io)?;
        if read == 0 {
            return Err(ProbeError::BadResponse(if filled == 0 {
                "connection closed without an answer".to_string()
            } else {
                "connection closed inside the status line".to_string()
            }));
        }
        filled += read;
    }
}

/// Takes the code out of `HTTP/1.1 200 OK`: an `HTTP/` version, a space, three digits, then a
/// space or the end of the line (the reason phrase may be empty).
fn parse_status_code(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || {
        let shown: String = String::from_utf8_lossy(line).chars().take(80).collect();
        ProbeError::BadResponse(format!("not an HTTP status line: {shown:?}"))
    };
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

/// A backend's state change, as the checker task reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    /// The service's id (see `services::ServiceTable`).
    pub service: usize,
    /// The backend's id: stable across reloads, unlike its position in the configuration.
    pub backend: usize,
    /// The generation of the id the checker was started for: an event still queued when a
    /// reload gave the id to another backend is about the old one, and must not count.
    pub generation: u32,
    /// The new state.
    pub up: bool,
    /// e.g. "after 3 failed probes (last: connection refused)" or "after 2 successful probes"
    pub reason: String,
    /// The result of a fresh backend's first probe that leaves it down: no change of state,
    /// but an operator wants to see why a new backend gets no traffic.
    pub first_probe: bool,
}

/// Spawns one tokio task that probes forever every `check.interval` (first probe immediately;
/// tokio interval with MissedTickBehavior::Delay), feeds results to a Hysteresis, and sends a
/// HealthEvent on every state change only. Ends when the receiver is dropped. `resume_from`
/// is the backend's known state when a reload restarts its checker (see
/// [`Hysteresis::resume`]); `None` for a new backend.
pub fn spawn_checker(
    service: usize,
    (backend, generation): (usize, u32),
    target: SocketAddr,
    check: HealthCheck,
    events: mpsc::Sender<HealthEvent>,
    resume_from: Option<bool>,
) -> JoinHandle<()> {
    tokio::spawn(run_checker(
        service,
        (backend, generation),
        target,
        check,
        events,
        resume_from,
    ))
}

async fn run_checker(
    service: usize,
    (backend, generation): (usize, u32),
    target: SocketAddr,
    check: HealthCheck,
    events: mpsc::Sender<HealthEvent>,
    resume_from: Option<bool>,
) {
    // tokio's interval panics on a zero period; config rejects one, but a hand-built check
    // should not take the task down.
    let mut ticker = tokio::time::interval(check.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut hysteresis = match resume_from {
        Some(up) => Hysteresis::resume(check.rise, check.fall, up),
        None => Hysteresis::new(check.rise, check.fall),
    };
    let mut streak = Streak::default();

    loop {
        // Waiting on `closed` too ends the task promptly once nobody listens, even while the
        // state is steady and nothing would be sent.
        tokio::select! {
            _ = ticker.tick() => {}
            () = events.closed() => return,
        }
        let result = tokio::select! {
            result = probe(&check.probe, target, check.timeout) => result,
            () = events.closed() => return,
        };
        tracing::debug!(service, backend, %target, ?result, "health probe");

        streak.record(&result);
        let first_probe = hysteresis.fresh;
        let up = match hysteresis.record(result.is_ok()) {
            Some(up) => up,
            None if first_probe => false,
            None => continue,
        };
        let event = HealthEvent {
            service,
            backend,
            generation,
            up,
            reason: streak.describe(),
            first_probe: first_probe && !up,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// The run of identical results behind a state change, for [`HealthEvent::reason`].
#[derive(Default)]
struct Streak {
    success: bool,
    count: u32,
    last_error: Option<String>,
}

impl Streak {
    fn record(&mut self, result: &Result<(), ProbeError>) {
        let success = result.is_ok();
        if self.count == 0 || success != self.success {
            self.success = success;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.last_error = result.as_ref().err().map(ToString::to_string);
    }

    fn describe(&self) -> String {
        let probes = if self.count == 1 { "probe" } else { "probes" };
        match &self.last_error {
            None => format!("after {} successful {probes}", self.count),
            Some(error) => format!("after {} failed {probes} (last: {error})", self.count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    use tokio::net::TcpListener;

    /// How long a test waits for something that should happen well before.
    const PATIENCE: Duration = Duration::from_secs(5);

    async fn listen() -> (TcpListener, SocketAddr) {
        listen_on(Ipv4Addr::LOCALHOST.into()).await
    }

    /// A listener on loopback address `ip` (127.0.0.1 or ::1), on a free port.
    async fn listen_on(ip: IpAddr) -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind loopback listener");
        let addr = listener.local_addr().expect("listener address");
        (listener, addr)
    }

    /// A loopback port with nothing listening: bound by a listener that is then dropped.
    async fn closed_port() -> SocketAddr {
        let (listener, addr) = listen().await;
        drop(listener);
        addr
    }

    /// Serves every connection with `response` after reading the request head, and passes
    /// each request head to the returned receiver.
    async fn http_server(response: String) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        http_server_on(Ipv4Addr::LOCALHOST.into(), response).await
    }

    /// [`http_server`] on loopback address `ip`.
    async fn http_server_on(
        ip: IpAddr,
        response: String,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let (listener, addr) = listen_on(ip).await;
        let (requests, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let requests = requests.clone();
                let response = response.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0; 1024];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => head.extend_from_slice(&buffer[..read]),
                        }
                    }
                    // Tests that only look at the probe result drop the receiver, and a probe
                    // that gave up may have closed the connection; neither is this server's
                    // failure to report.
                    let _ = requests.send(String::from_utf8_lossy(&head).into_owned());
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (addr, received)
    }

    fn http(path: &str, expect_status: u16) -> Probe {
        Probe::Http {
            path: path.to_string(),
            expect_status,
        }
    }

    fn check(probe: Probe, interval_ms: u64, rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(interval_ms),
            rise,
            fall,
        }
    }

    #[test]
    fn resumed_state_needs_rise_or_fall_from_the_first_probe() {
        let mut up = Hysteresis::resume(2, 3, true);
        assert_eq!(up.record(false), None);
        assert_eq!(up.record(false), None);
        assert_eq!(up.record(false), Some(false));
        let mut down = Hysteresis::resume(2, 3, false);
        assert_eq!(down.record(true), None);
        assert_eq!(down.record(true), Some(true));
    }

    #[test]
    fn first_success_goes_up_at_once() {
        let mut state = Hysteresis::new(3, 3);
        assert!(!state.is_up());
        assert_eq!(state.record(true), Some(true));
        assert!(state.is_up());
    }

    #[test]
    fn first_failure_stays_down_without_event() {
        let mut state = Hysteresis::new(3, 3);
        assert_eq!(state.record(false), None);
        assert!(!state.is_up());
    }

    #[test]
    fn goes_down_after_exactly_fall_failures() {
        let mut state = Hysteresis::new(2, 3);
        state.record(true);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), None);
        assert!(state.is_up());
        assert_eq!(state.record(false), Some(false));
        assert!(!state.is_up());
        assert_eq!(state.record(false), None, "already down: no second event");
    }

    #[test]
    fn success_between_failures_resets_fall() {
        let mut state = Hysteresis::new(2, 3);
        state.record(true);
        state.record(false);
        state.record(false);
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), None);
        assert!(state.is_up());
        assert_eq!(state.record(false), Some(false));
    }

    #[test]
    fn goes_up_after_exactly_rise_successes() {
        let mut state = Hysteresis::new(3, 1);
        state.record(false);
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(true), None);
        assert!(!state.is_up());
        assert_eq!(state.record(true), Some(true));
        assert!(state.is_up());
        assert_eq!(state.record(true), None, "already up: no second event");
    }

    #[test]
    fn failure_between_successes_resets_rise() {
        let mut state = Hysteresis::new(2, 1);
        state.record(true);
        assert_eq!(state.record(false), Some(false));
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(true), None);
        assert!(!state.is_up());
        assert_eq!(state.record(true), Some(true));
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut state = Hysteresis::new(1, 1);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(true), Some(true));
        assert_eq!(state.record(false), Some(false));
        assert_eq!(state.record(true), Some(true));
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_code(b"HTTP/1.1 200 OK").ok(), Some(200));
        assert_eq!(parse_status_code(b"HTTP/1.0 503").ok(), Some(503));
        for bad in [
            &b"SSH-2.0-OpenSSH"[..],
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000",
            b"",
            b"\xff",
        ] {
            assert!(
                matches!(parse_status_code(bad), Err(ProbeError::BadResponse(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn none_probe_always_succeeds() {
        let target = closed_port().await;
        probe(&Probe::None, target, Duration::from_millis(100))
            .await
            .expect("none never fails");
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_against_listener() {
        let (_listener, target) = listen().await;
        probe(&Probe::Tcp, target, PATIENCE)
            .await
            .expect("listener accepts connections");
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_refused_connection() {
        let target = closed_port().await;
        let error = probe(&Probe::Tcp, target, PATIENCE)
            .await
            .expect_err("nothing listens");
        match error {
            ProbeError::Connect(io) => assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected a refused connect, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn http_probe_accepts_expected_status_and_sends_documented_request() {
        let (target, mut requests) =
            http_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into()).await;
        probe(&http("/healthz?full=1", 200), target, PATIENCE)
            .await
            .expect("server answers 200");
        let request = requests.recv().await.expect("server saw the request");
        assert_eq!(
            request,
            format!(
                "GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: \
                 lb-user-health\r\nConnection: close\r\n\r\n",
                target.port()
            )
        );
    }

    #[tokio::test]
    async fn probes_reach_ipv6_backends_with_a_bracketed_host() {
        let (target, mut requests) = http_server_on(
            Ipv6Addr::LOCALHOST.into(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into(),
        )
        .await;
        probe(&http("/", 200), target, PATIENCE)
            .await
            .expect("server on ::1 answers 200");
        let request = requests.recv().await.expect("server saw the request");
        assert!(
            request.contains(&format!("\r\nHost: [::1]:{}\r\n", target.port())),
            "{request:?}"
        );
        probe(&Probe::Tcp, target, PATIENCE)
            .await
            .expect("tcp connect to ::1");
        let (listener, closed) = listen_on(Ipv6Addr::LOCALHOST.into()).await;
        drop(listener);
        let error = probe(&Probe::Tcp, closed, PATIENCE).await;
        assert!(matches!(error, Err(ProbeError::Connect(_))), "{error:?}");
    }

    #[tokio::test]
    async fn http_probe_rejects_other_status() {
        let (target, _requests) =
            http_server("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".into())
                .await;
        let error = probe(&http("/", 200), target, PATIENCE)
            .await
            .expect_err("503 is not 200");
        assert!(
            matches!(
                error,
                ProbeError::BadStatus {
                    expected: 200,
                    got: 503
                }
            ),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn http_probe_rejects_non_http_answer() {
        let (target, _requests) = http_server("SSH-2.0-OpenSSH_9.6\r\n".into()).await;
        let error = probe(&http("/", 200), target, PATIENCE)
            .await
            .expect_err("not HTTP");
        assert!(matches!(error, ProbeError::BadResponse(_)), "{error:?}");
    }

    #[tokio::test]
    async fn http_probe_bounds_the_status_line() {
        let endless_line = "HTTP/1.1 200 ".to_string() + &"x".repeat(2 * MAX_STATUS_LINE);
        let (target, _requests) = http_server(endless_line).await;
        let error = probe(&http("/", 200), target, PATIENCE)
            .await
            .expect_err("status line too long");
        assert!(matches!(error, ProbeError::BadResponse(_)), "{error:?}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_silent_server() {
        let (listener, target) = listen().await;
        // Accepts and holds connections without ever answering.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let error = probe(&http("/", 200), target, timeout)
            .await
            .expect_err("server never answers");
        let elapsed = started.elapsed();
        server.abort();
        assert!(
            matches!(error, ProbeError::Timeout(t) if t == timeout),
            "{error:?}"
        );
        assert!(elapsed >= timeout, "gave up early, after {elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "took {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn checker_reports_one_up_then_one_down_when_listener_closes() {
        let (listener, target) = listen().await;
        // Accepts and closes connections, so the listen queue never fills.
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let (sender, mut events) = mpsc::channel(8);
        let checker = spawn_checker(1, (2, 7), target, check(Probe::Tcp, 50, 2, 2), sender, None);

        let up = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("up event in time")
            .expect("checker still running");
        assert_eq!(
            up,
            HealthEvent {
                service: 1,
                backend: 2,
                generation: 7,
                up: true,
                reason: "after 1 successful probe".to_string(),
                first_probe: false,
            }
        );
        // Several more successful probes must not repeat the event.
        let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(quiet.is_err(), "unexpected event {quiet:?}");

        // Aborting the server task drops the listener, so connects are refused from now on.
        server.abort();
        let stopped = server.await;
        assert!(
            stopped.is_err_and(|error| error.is_cancelled()),
            "server task ended by itself"
        );
        let down = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("down event in time")
            .expect("checker still running");
        assert_eq!((down.service, down.backend, down.up), (1, 2, false));
        assert!(
            down.reason
                .starts_with("after 2 failed probes (last: connect failed"),
            "{}",
            down.reason
        );
        let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(quiet.is_err(), "unexpected event {quiet:?}");

        drop(events);
        tokio::time::timeout(PATIENCE, checker)
            .await
            .expect("checker ends once the receiver is dropped")
            .expect("checker did not panic");
    }

    #[tokio::test]
    async fn a_backend_that_never_answers_is_reported_once_after_its_first_probe() {
        let target = closed_port().await;
        let (sender, mut events) = mpsc::channel(8);
        let checker = spawn_checker(3, (4, 1), target, check(Probe::Tcp, 50, 1, 1), sender, None);
        // Starts down and stays down: no transition, but its first failure is said once.
        let first = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("an event for the first probe in time")
            .expect("checker still running");
        assert_eq!((first.service, first.backend), (3, 4));
        assert!(!first.up && first.first_probe, "{first:?}");
        assert!(
            first.reason.starts_with("after 1 failed probe (last: "),
            "{}",
            first.reason
        );
        let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(quiet.is_err(), "unexpected event {quiet:?}");
        drop(events);
        tokio::time::timeout(PATIENCE, checker)
            .await
            .expect("checker ends once the receiver is dropped")
            .expect("checker did not panic");
    }
}
