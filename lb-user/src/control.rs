//! The control socket: how `lb-user stats` (and later commands) reach a running daemon.
//!
//! A Unix stream socket, by default `/run/xdp-lb/control.sock`, in a directory only root can
//! enter and with mode 0600 itself, so only root reads counters. One request per connection:
//! a line of JSON (`{"command":"stats"}`), answered by a line of JSON
//! (`{"ok":true,"stats":{...}}` or `{"ok":false,"error":"..."}`).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::stats::Snapshot;

pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/control.sock";

/// Longest request line accepted; anything longer is not a request of ours.
const MAX_REQUEST: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Stats,
    /// Stop sending new flows to a backend; its flows continue.
    Drain {
        service: String,
        backend: String,
    },
    Undrain {
        service: String,
        backend: String,
    },
    /// Re-read the configuration file the daemon was started with.
    Reload,
    Flows {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Snapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<FlowEntry>>,
    /// What a command did, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn error(error: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(error.to_string()),
            ..Self::default()
        }
    }

    pub fn message(message: impl ToString) -> Self {
        Self {
            ok: true,
            message: Some(message.to_string()),
            ..Self::default()
        }
    }
}

/// One entry of the flow table, as `lb-user flows` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    pub client: String,
    pub service: String,
    pub protocol: String,
    pub backend: String,
    /// Seconds since the flow was scheduled.
    pub age_seconds: u64,
    /// Seconds since a client packet last refreshed the entry (to within a second).
    pub idle_seconds: u64,
    /// "open" or "closing" for TCP, "open" for UDP.
    pub state: String,
}

/// A request from a control connection, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another lb-user is already running: its control socket {0} answers (stop it first, or \
         give this one another --socket)"
    )]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it (choose another --socket)")]
    NotASocket(PathBuf),
    #[error(
        "control socket {0}: permission denied (the socket is root's only: run this command as \
         root)"
    )]
    Denied(PathBuf),
    #[error("no lb-user is running with control socket {path}: {cause}")]
    NotRunning {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {path}: unexpected answer: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("the daemon refused the request: {0}")]
    Refused(String),
}

/// Binds the control socket. A socket file left by a daemon that died is removed; one that a
/// live daemon answers on is an error, so two daemons never fight over the same datapath.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_error = |source| ControlError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error)?;
        }
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        // Never delete anything but a socket: a mistyped --socket must not eat a file.
        if !metadata.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        if StdUnixStream::connect(path).is_ok() {
            return Err(ControlError::AlreadyRunning(path.to_path_buf()));
        }
        tracing::info!("removing stale control socket {}", path.display());
        std::fs::remove_file(path).map_err(io_error)?;
    }
    let listener = UnixListener::bind(path).map_err(io_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    Ok(listener)
}

/// Answers connections until the task is aborted, handing each request to the daemon's main
/// loop through `calls`.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("control socket: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, calls).await {
                tracing::debug!("control socket: {error}");
            }
        });
    }
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = AsyncBufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    // Bytes, not a String, so that a request that is not UTF-8 gets an answer too.
    let request = std::str::from_utf8(&line)
        .map_err(|error| format!("bad request: not UTF-8 ({error})"))
        .and_then(|text| {
            serde_json::from_str::<Request>(text.trim())
                .map_err(|error| format!("bad request: {error}"))
        });
    let response = match request {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if calls.send((request, reply)).await.is_err() {
                Response::error("the daemon is shutting down")
            } else {
                answer
                    .await
                    .unwrap_or_else(|_| Response::error("the daemon dropped the request"))
            }
        }
        Err(error) => Response::error(error),
    };
    let mut body = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    write.shutdown().await
}

/// Sends one request to the daemon behind `path` and returns its answer (blocking; used by the
/// CLI). A refusal by the daemon is an error.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io_error = |source| ControlError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Denied(path.to_path_buf())
        } else {
            ControlError::NotRunning {
                path: path.to_path_buf(),
                cause: source,
            }
        }
    })?;
    // Reloads rebuild Maglev tables and write them through the bpf syscall: allow for it.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io_error)?;
    let mut body = serde_json::to_vec(request).map_err(|error| ControlError::Protocol {
        path: path.to_path_buf(),
        detail: error.to_string(),
    })?;
    body.push(b'\n');
    stream.write_all(&body).map_err(io_error)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_error)?;
    let response: Response =
        serde_json::from_str(line.trim()).map_err(|error| ControlError::Protocol {
            path: path.to_path_buf(),
            detail: format!("{error}: {line:?}"),
        })?;
    match (response.ok, &response.error) {
        (true, _) => Ok(response),
        (false, Some(error)) => Err(ControlError::Refused(error.clone())),
        (false, None) => Err(ControlError::Protocol {
            path: path.to_path_buf(),
            detail: "refusal without a reason".to_string(),
        }),
    }
}

/// Asks the daemon behind `path` for its counters (blocking; used by the CLI).
pub fn request_stats(path: &Path) -> Result<Snapshot, ControlError> {
    request(path, &Request::Stats)?
        .stats
        .ok_or_else(|| ControlError::Protocol {
            path: path.to_path_buf(),
            detail: "answer without stats".to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Snapshot;

    fn snapshot() -> Snapshot {
        Snapshot {
            interfaces: vec!["lbpub".to_string()],
            services: Vec::new(),
            verdicts: serde_json::Map::new(),
            counters: [("flow_miss".to_string(), serde_json::Value::from(7u64))]
                .into_iter()
                .collect(),
        }
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lb-control-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn stats_round_trip_and_a_second_daemon_is_refused() {
        let path = socket_path("round-trip.sock");
        let listener = bind(&path).expect("bind");
        let (calls, mut requests) = mpsc::channel::<Call>(4);
        let server = tokio::spawn(serve(listener, calls));
        let daemon = tokio::spawn(async move {
            while let Some((request, reply)) = requests.recv().await {
                let response = match request {
                    Request::Stats => Response {
                        ok: true,
                        stats: Some(snapshot()),
                        ..Response::default()
                    },
                    other => Response::error(format!("not in this test: {other:?}")),
                };
                reply
                    .send(response)
                    .expect("the client waits for its answer");
            }
        });

        let client_path = path.clone();
        let answer = tokio::task::spawn_blocking(move || request_stats(&client_path))
            .await
            .expect("join");
        assert_eq!(answer.expect("stats"), snapshot());

        let second = bind(&path);
        assert!(
            matches!(second, Err(ControlError::AlreadyRunning(_))),
            "{second:?}"
        );

        let refused_path = path.clone();
        let refused = tokio::task::spawn_blocking(move || request(&refused_path, &Request::Reload))
            .await
            .expect("join");
        assert!(
            matches!(&refused, Err(ControlError::Refused(reason)) if reason.contains("not in this test")),
            "{refused:?}"
        );

        server.abort();
        daemon.abort();
        std::fs::remove_file(&path).expect("remove socket");
    }

    #[tokio::test]
    async fn a_request_that_is_not_utf8_is_answered_with_an_error() {
        let path = socket_path("not-utf8.sock");
        let listener = bind(&path).expect("bind");
        let (calls, _requests) = mpsc::channel::<Call>(4);
        let server = tokio::spawn(serve(listener, calls));
        let mut stream = UnixStream::connect(&path).await.expect("connect");
        stream
            .write_all(b"{\"command\":\"st\xffats\"}\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("an answer in time")
            .expect("read");
        let response: Response = serde_json::from_str(answer.trim()).expect("a JSON answer");
        assert!(!response.ok);
        let error = response.error.expect("a reason");
        assert!(error.starts_with("bad request: not UTF-8"), "{error}");
        server.abort();
        std::fs::remove_file(&path).expect("remove socket");
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced() {
        let path = socket_path("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "a dead listener leaves its file behind");
        let listener = bind(&path).expect("a stale socket must not block a new daemon");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "root only");
        drop(listener);
        std::fs::remove_file(&path).expect("remove socket");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_removed() {
        let path = socket_path("precious.conf");
        std::fs::write(&path, "precious").expect("write");
        let error = bind(&path).expect_err("not a socket");
        assert!(matches!(error, ControlError::NotASocket(_)), "{error}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("still there"),
            "precious"
        );
        std::fs::remove_file(&path).expect("remove");
    }

    #[test]
    fn no_daemon_is_a_clear_error() {
        let error = request_stats(&socket_path("absent.sock")).expect_err("nothing listens");
        assert!(
            error.to_string().contains("no lb-user is running"),
            "{error}"
        );
    }
}
