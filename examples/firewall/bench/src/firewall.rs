//! The firewall driver as the benchmarks load it.

use std::time::Duration;

use firewall_driver::{Config, Firewall, Stats};
use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;

/// Longer than any benchmark waits, so no question times out into the default.
pub const PATIENT: Duration = Duration::from_secs(120);

/// The counters of every instance loaded with [`DriverEntry`] (they add up across machines:
/// compare snapshots).
pub static STATS: Stats = Stats::new();

/// `DriverEntry`: [`Config::DEFAULT`] (fail-closed, 1024 cache entries, 2048 pends at most,
/// loopback permitted) with the [`PATIENT`] timeout and [`STATS`].
#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
    firewall_driver::start(
        irql,
        driver,
        Config {
            timeout: PATIENT,
            stats: Some(&STATS),
            ..Config::DEFAULT
        },
    )
}
