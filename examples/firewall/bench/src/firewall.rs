//! The firewall driver as the benchmarks load it.

use std::time::Duration;

use firewall_driver::{AskVia, Config, Firewall, Stats};
use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;

/// Longer than any benchmark waits, so no question times out into the default.
pub const PATIENT: Duration = Duration::from_secs(120);

/// The counters of every instance loaded with [`DriverEntry`] (they add up across machines:
/// compare snapshots).
pub static STATS: Stats = Stats::new();

/// `DriverEntry`: [`Config::DEFAULT`] (fail-closed, 1024 cache entries, 2048 pends at most,
/// loopback permitted) with the [`PATIENT`] timeout and [`STATS`], asking through the port and
/// a work item ([`AskVia::PortAndWorkItem`]), which the harness's simulated service answers.
#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
    firewall_driver::start(
        irql,
        driver,
        Config {
            // The harness's service answers on the port (see the module documentation).
            ask_via: AskVia::PortAndWorkItem,
            timeout: PATIENT,
            stats: Some(&STATS),
            ..Config::DEFAULT
        },
    )
}

/// The firewall as [`DriverEntry`] loads it, but with no verdict cache
/// (`Config::cache_capacity` 0): the baseline of [`pool_per_cached_verdict`].
pub mod without_cache {
    use super::*;

    /// `DriverEntry`: [`super::DriverEntry`]'s configuration with `cache_capacity: 0`.
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                ask_via: AskVia::PortAndWorkItem,
                timeout: PATIENT,
                cache_capacity: 0,
                ..Config::DEFAULT
            },
        )
    }
}

/// Bytes of non-paged pool the firewall holds per cached verdict, measured: the pool the driver
/// holds once loaded with the default cache ([`firewall_driver::DEFAULT_CACHE_CAPACITY`]
/// verdicts), less what it holds loaded without one, divided by the capacity. (The simulator's
/// pool blocks are the sizes asked for; Windows adds a header per allocation, and the cache is
/// one allocation.)
pub fn pool_per_cached_verdict() -> f64 {
    let held = |entry: wfp_rs_sim::DriverEntryFn| {
        let machine = wfp_rs_sim::Machine::new();
        let driver = machine
            .load_driver("firewall", entry)
            .expect("the firewall loads");
        let bytes: usize = machine
            .pool_blocks()
            .iter()
            .filter(|block| block.driver.as_deref() == Some("firewall"))
            .map(|block| block.size)
            .sum();
        machine.unload_driver(driver).expect("the firewall unloads");
        assert_eq!(machine.pool_blocks(), [], "no pool left");
        bytes
    };
    let with = held(DriverEntry);
    let without = held(without_cache::DriverEntry);
    (with - without) as f64 / firewall_driver::DEFAULT_CACHE_CAPACITY as f64
}
