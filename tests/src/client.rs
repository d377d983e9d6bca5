//! The client: curl in the client namespace, and HTTP/1.1 keep-alive connections opened from a
//! thread inside it.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

use crate::netns::{Netns, NetnsName};
use crate::process::CommandError;

/// Sends HTTP requests from the client namespace, one curl (one TCP connection) each.
/// Cheap to clone into a thread that keeps traffic going.
#[derive(Debug, Clone)]
pub struct Client {
    netns: NetnsName,
}

impl Client {
    pub fn new(netns: &Netns) -> Self {
        Self {
            netns: netns.name().clone(),
        }
    }

    /// `curl -sS -g --max-time 2 URL`; returns the body. Any failure, including an HTTP error
    /// status, is an error carrying curl's message. `-g` (no URL globbing) lets IPv6 URLs
    /// through as they are (`http://[fd00:200::1:1]/`).
    pub fn get(&self, url: &str) -> Result<String, CommandError> {
        self.netns
            .exec(["curl", "-sS", "-g", "--fail", "--max-time", "2", url])
    }

    /// Sends `count` requests to `url`, one connection each; any failure is an error naming
    /// `what` and the request. Returns how many each backend answered (by the body it answers
    /// with, its name).
    pub fn answers(
        &self,
        url: &str,
        count: u64,
        what: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let mut answers = std::collections::BTreeMap::new();
        for request in 1..=count {
            let body = self
                .get(url)
                .with_context(|| format!("{what}: request {request} of {count} to {url}"))?;
            *answers.entry(body.trim().to_string()).or_default() += 1;
        }
        Ok(answers)
    }

    /// `curl -sS -g --fail --max-time 10 -o PATH URL`: saves the body to `path`, for downloads too
    /// large for a string.
    pub fn download(&self, url: &str, path: &std::path::Path) -> Result<(), CommandError> {
        let mut command = self.netns.command("curl");
        command
            .args(["-sS", "-g", "--fail", "--max-time", "10", "-o"])
            .arg(path)
            .arg(url);
        crate::process::run(&mut command).map(drop)
    }

    /// Like [`Client::get`], and also returns curl's local port, which names the connection
    /// in `lb-user flows` and in the backend's access log.
    pub fn get_with_local_port(&self, url: &str) -> anyhow::Result<(String, u16)> {
        let output = self.netns.exec([
            "curl",
            "-sS",
            "-g",
            "--fail",
            "--max-time",
            "2",
            "--write-out",
            "\n%{local_port}",
            url,
        ])?;
        let (body, port) = output
            .rsplit_once('\n')
            .with_context(|| format!("no local port after curl's output {output:?}"))?;
        let port = port
            .parse()
            .with_context(|| format!("curl's local port {port:?} is not a port"))?;
        Ok((body.to_string(), port))
    }
}

/// Bounds every connect, read and write of a [`KeepAliveConnection`]: far above a local
/// answer, so that only a real break, not a busy machine, fails a request.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response head accepted; nginx's are a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body accepted; the testbed's nginx answers with its name.
const MAX_BODY: usize = 64 * 1024;

/// What went wrong with a request on a [`KeepAliveConnection`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("status {0}")]
    Status(u16),
}

/// One HTTP/1.1 connection carrying many `GET` requests, as a browser keeps one open: every
/// answer comes from the backend the balancer chose when the connection was opened. Open it
/// from a thread inside the client namespace ([`NetnsName::spawn_thread`]); every operation is
/// bounded by a 5 s timeout.
#[derive(Debug)]
pub struct KeepAliveConnection {
    stream: TcpStream,
    request: Vec<u8>,
    local_port: u16,
}

impl KeepAliveConnection {
    /// Connects to `server`; each [`KeepAliveConnection::get`] then asks for `path`.
    pub fn connect(server: SocketAddrV4, path: &str) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(server), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local_port = stream.local_addr()?.port();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", server.ip()).into_bytes();
        Ok(Self {
            stream,
            request,
            local_port,
        })
    }

    /// The client side's port: names the connection in `lb-user flows` and access logs.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Sends one request and reads the whole response (by its Content-Length); returns the
    /// body. Anything but a 200 with a body is an error.
    pub fn get(&mut self) -> Result<String, HttpError> {
        self.stream.write_all(&self.request)?;
        let (head, mut body) = self.read_head()?;
        let length = parse_head(&head)?;
        if length > MAX_BODY {
            return Err(HttpError::Malformed(format!("Content-Length {length}")));
        }
        if body.len() > length {
            // A server answering one request with more than one response.
            return Err(HttpError::Malformed(format!(
                "{} bytes after the body",
                body.len() - length
            )));
        }
        let mut rest = vec![0; length - body.len()];
        self.read_exact(&mut rest)?;
        body.extend_from_slice(&rest);
        String::from_utf8(body).map_err(|error| HttpError::Malformed(error.to_string()))
    }

    /// Reads up to the blank line that ends the head; returns the head and whatever of the
    /// body came with it.
    fn read_head(&mut self) -> Result<(String, Vec<u8>), HttpError> {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                return Ok((head, buffer[end + 4..].to_vec()));
            }
            if buffer.len() > MAX_HEAD {
                return Err(HttpError::Malformed(format!(
                    "no end of head in {MAX_HEAD} bytes"
                )));
            }
            match self.stream.read(&mut chunk)? {
                0 => return Err(HttpError::Closed),
                read => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), HttpError> {
        self.stream
            .read_exact(buffer)
            .map_err(|error| match error.kind() {
                io::ErrorKind::UnexpectedEof => HttpError::Closed,
                _ => HttpError::Io(error),
            })
    }
}

/// Checks the status line is a 200 and returns the Content-Length.
fn parse_head(head: &str) -> Result<usize, HttpError> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {status_line:?}")))?;
    if status != 200 {
        return Err(HttpError::Status(status));
    }
    lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("no Content-Length in {head:?}")))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_length() {
        let head =
            "HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 9\r\nConnection: keep-alive";
        assert_eq!(parse_head(head).expect("valid"), 9);
        assert!(matches!(
            parse_head("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0"),
            Err(HttpError::Status(502))
        ));
        assert!(matches!(
            parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"),
            Err(HttpError::Malformed(_))
        ));
    }
}
