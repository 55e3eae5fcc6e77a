//! The example firewall's user-mode service.
//!
//! The firewall's callout driver (`firewall-driver`) holds each new connection and asks this
//! service about it over the filter-manager port [`PORT_NAME`](firewall_protocol::PORT_NAME)
//! with a [`ConnectionRequest`](firewall_protocol::ConnectionRequest); the service decides from
//! a TOML policy ([`firewall_rules`]) and answers with a
//! [`ConnectionReply`](firewall_protocol::ConnectionReply), which the driver may cache for the
//! lifetime the reply grants.
//!
//! - [`service::Service`]: the decisions, without any I/O: the policy in force, the NT → DOS
//!   volume map, the cache lifetime it grants, and a memory of the cacheable verdicts it gave,
//!   so that after a rules reload it can name the cached verdicts the new rules no longer give
//!   (the driver is then told to forget them with the [`REVOKE`](firewall_protocol::control::REVOKE)
//!   command).
//! - [`audit`]: the audit log, one JSON object per decision and line.
//! - [`serve`]: the service loop: connect to the port (and reconnect with backoff), answer
//!   requests, watch the rules file, send revocations to the driver's control device.
//!
//! - [`demo`] (Linux and macOS hosts): the driver, the service and a scenario of connections in
//!   the simulator.
//!
//! The `firewall` binary is the command line around these ([`cli`], `firewall --help`).

pub mod audit;
pub mod cli;
#[cfg(unix)]
pub mod demo;
pub mod serve;
pub mod service;

#[cfg(test)]
mod tests;
