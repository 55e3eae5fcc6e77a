//! The smallest useful wfp-rs driver.
//!
//! `DriverEntry` queues a few work items that count into a spin-locked counter; unload reports
//! the count. It shows the shape every wfp-rs driver has: an entry function that receives a
//! `&mut PassiveLevel`, a state value the SDK keeps until unload, and work that moves from
//! `DISPATCH_LEVEL` to `PASSIVE_LEVEL` through a work queue.
//!
//! Build and check the kernel image: `cargo wfp build --release -p minimal-driver` (`cargo install
//! cargo-wfp`).

#![no_std]

use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::pool::{PoolArc, PoolTag};
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Status, kd_print};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator = wfp_rs::pool::PoolAllocator::new(TAG);

/// The tag of the driver's pool.
const TAG: PoolTag = PoolTag::new(b"Mini");

/// How many work items `DriverEntry` queues.
pub const GREETINGS: u64 = 4;

/// What the driver keeps while it is loaded.
pub struct Minimal {
    hits: PoolArc<SpinLock<u64>>,
    _queue: WorkQueue,
}

impl DriverState for Minimal {
    fn unload(self, irql: &mut PassiveLevel<'_>) {
        let hits = self.hits.lock(irql, |hits, _| *hits);
        kd_print!("minimal-driver: unloading after {hits} work item(s)\n");
    }
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Minimal, Status> {
    kd_print!("minimal-driver: loaded from {}\n", driver.registry_path());
    // Fallible: `Arc::new` cannot report that the pool is exhausted, and in a driver its
    // failure is a bug check.
    let hits = PoolArc::try_new(SpinLock::new(0u64), TAG, irql)?;
    let queue = driver.work_queue();
    for n in 0..GREETINGS {
        let hits = PoolArc::clone(&hits);
        queue.queue(irql, move |passive| {
            hits.lock(passive, |count, _| *count += 1);
            kd_print!("minimal-driver: work item {n} ran at PASSIVE_LEVEL\n");
        })?;
    }
    Ok(Minimal {
        hits,
        _queue: queue,
    })
}
