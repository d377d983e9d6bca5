//! The control socket: how `lb-user stats` (and later commands) reach a running daemon.
//!
//! A Unix stream socket, by default `/run/xdp-lb/control.sock`, in a directory only root can
//! enter and with mode 0600 itself, so only root reads counters. One request per connection:
//! a line of JSON (`{"command":"stats"}`), answered by a line of JSON
//! (`{"ok":true,"stats":{...}}` or `{"ok":false,"error":"..."}`).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
};

use crate::stats::Snapshot;

pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/control.sock";

/// Longest request line accepted; anything longer is not a request of ours.
const MAX_REQUEST: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Stats,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Snapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another lb-user is already running: its control socket {0} answers (stop it first, or \
         give this one another --socket)"
    )]
    AlreadyRunning(PathBuf),
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
    if path.exists() {
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

/// Answers requests until the listener is dropped. `snapshot` is called for every stats
/// request.
pub async fn serve<F>(listener: UnixListener, snapshot: F)
where
    F: Fn() -> Result<Snapshot, String> + Send + Sync + Clone + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("control socket: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, snapshot).await {
                tracing::debug!("control socket: {error}");
            }
        });
    }
}

async fn answer<F>(stream: UnixStream, snapshot: F) -> std::io::Result<()>
where
    F: Fn() -> Result<Snapshot, String>,
{
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = AsyncBufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Stats) => match snapshot() {
            Ok(stats) => Response {
                ok: true,
                stats: Some(stats),
                error: None,
            },
            Err(error) => Response {
                ok: false,
                stats: None,
                error: Some(error),
            },
        },
        Err(error) => Response {
            ok: false,
            stats: None,
            error: Some(format!("bad request: {error}")),
        },
    };
    let mut body = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    write.shutdown().await
}

/// Asks the daemon behind `path` for its counters (blocking; used by the CLI).
pub fn request_stats(path: &Path) -> Result<Snapshot, ControlError> {
    let io_error = |source| ControlError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|source| ControlError::NotRunning {
        path: path.to_path_buf(),
        cause: source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_error)?;
    let mut request =
        serde_json::to_vec(&Request::Stats).map_err(|error| ControlError::Protocol {
            path: path.to_path_buf(),
            detail: error.to_string(),
        })?;
    request.push(b'\n');
    stream.write_all(&request).map_err(io_error)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_error)?;
    let response: Response =
        serde_json::from_str(line.trim()).map_err(|error| ControlError::Protocol {
            path: path.to_path_buf(),
            detail: format!("{error}: {line:?}"),
        })?;
    match (response.ok, response.stats, response.error) {
        (true, Some(stats), _) => Ok(stats),
        (_, _, Some(error)) => Err(ControlError::Refused(error)),
        _ => Err(ControlError::Protocol {
            path: path.to_path_buf(),
            detail: "answer without stats or error".to_string(),
        }),
    }
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
        let server = tokio::spawn(serve(listener, || Ok(snapshot())));

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
    fn no_daemon_is_a_clear_error() {
        let error = request_stats(&socket_path("absent.sock")).expect_err("nothing listens");
        assert!(
            error.to_string().contains("no lb-user is running"),
            "{error}"
        );
    }
}
