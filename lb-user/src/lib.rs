//! The control plane of the XDP load balancer: configuration, health checks, the datapath's
//! maps, the control socket, and the counters `lb-user stats` prints.

pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod neighbours;
pub mod netdev;
pub mod schedule_space;
pub mod scheduling;
pub mod services;
pub mod stats;
pub mod topology;
