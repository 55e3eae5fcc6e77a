//! The pieces the example firewall's benchmarks share (`cargo bench -p firewall-bench`; what
//! they measure and the figures are in `docs/benchmarks.md`):
//!
//! - [`firewall`]: the firewall driver (`firewall_driver::start`) with a patient timeout and
//!   counters the benchmarks read, asking through the question channel (its default) or from
//!   work items over the port.
//! - [`raw_lookup`]: the baseline of benchmark (a), a C-style callout (`unsafe extern "system"`
//!   classifyFn registered with `FwpsCalloutRegister3`) that reads the classification's fields
//!   by raw pointer and does the firewall's cache-hit work with the firewall's own verdict cache
//!   ([`firewall_driver::cache`]).
//! - [`blocking`]: the seed's design for benchmark (c), a C-style callout whose classifyFn sends
//!   the question to the service and waits for the reply — at `PASSIVE_LEVEL` only, where that
//!   is allowed, instead of stopping the machine as the seed did at `DISPATCH_LEVEL`.
//! - [`Service`]: the user-mode service, played by harness threads on the filter-manager port
//!   or the question channel ([`Transport`]).
//! - [`service_end`]: the service's end of either design for a service that runs as a context
//!   of a deterministic machine (the soak's, and the firewall's property test's).
//! - [`bare`]: a bare cross-thread channel round trip, the floor benchmark (b) compares with.
//! - [`Latencies`]: percentiles, which criterion does not report.
//! - [`callgrind`]: benchmark (a)'s instructions per cache hit, counted by running the bench
//!   binary under `valgrind --tool=callgrind`.
//! - [`summary`]: the figures of a whole `cargo bench -p firewall-bench` run, printed together
//!   at its end.
//!
//! Everything here is harness code for the simulator (`wfp_rs_sim`), not driver code.

#![cfg(any(not(windows), feature = "sim"))]

pub mod bare;
pub mod blocking;
pub mod callgrind;
pub mod firewall;
pub mod hit;
pub mod load;
mod raw_callout;
pub mod raw_lookup;
mod raw_objects;
mod service;
pub mod service_end;
pub mod soak;
mod stats;
pub mod summary;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use service::{Service, Transport};
pub use stats::Latencies;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs_sim::Connection;

/// The image of the process every benchmark connection comes from.
pub const APP: &str = r"\device\harddiskvolume3\apps\browser.exe";

/// The process id of the benchmark connections.
pub const PID: u64 = 4242;

/// An outbound TCP connection of [`PID`] from local port `local_port` to `192.0.2.7:443`.
pub fn connection(local_port: u16) -> Connection {
    Connection {
        pid: PID,
        app: APP.into(),
        protocol: IpProtocol::Tcp,
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), local_port),
        remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 443),
        direction: SimDirection::Outbound,
    }
}
