//! The control plane of the XDP load balancer: configuration, health checks, the datapath's
//! maps, the control socket, and the counters `lb-user stats` prints.

pub mod config;
pub mod health;
