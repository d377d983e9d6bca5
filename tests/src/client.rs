//! The client: curl in the client namespace.

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

    /// `curl -sS --max-time 2 URL`; returns the body. Any failure, including an HTTP error
    /// status, is an error carrying curl's message.
    pub fn get(&self, url: &str) -> Result<String, CommandError> {
        self.netns
            .exec(["curl", "-sS", "--fail", "--max-time", "2", url])
    }
}
