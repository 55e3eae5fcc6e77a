//! A driver that must fail the stack check: its work item keeps a 64 KiB buffer on the stack,
//! more than the whole 24 KiB kernel stack. It runs silently in the simulator, whose threads
//! have big user-mode stacks; `tests/driver_image.rs` checks that `cargo xtask stack` rejects
//! its image and names the function.

#![no_std]

extern crate alloc;

use core::hint::black_box;

use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Status, kd_print};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator =
    wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"Deep"));

/// The size of the buffer [`checksum`] keeps on the stack.
pub const BUFFER_LEN: usize = 64 * 1024;

/// What the driver keeps while it is loaded.
pub struct DeepStack {
    _queue: WorkQueue,
}

impl DriverState for DeepStack {
    fn unload(self, _irql: &mut PassiveLevel<'_>) {}
}

/// Fills a [`BUFFER_LEN`]-byte buffer on the stack and sums it: the mistake the check exists
/// for (a buffer that belongs in pool).
#[inline(never)]
pub fn checksum(seed: u8) -> u32 {
    let mut buffer = [0u8; BUFFER_LEN];
    for (index, byte) in buffer.iter_mut().enumerate() {
        *byte = seed.wrapping_add(index as u8);
    }
    black_box(&mut buffer)
        .iter()
        .map(|byte| u32::from(*byte))
        .sum()
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<DeepStack, Status> {
    let queue = driver.work_queue();
    queue.queue(irql, move |_passive| {
        let sum = checksum(black_box(7));
        kd_print!("deep-stack-driver: checksum {sum}\n");
    })?;
    Ok(DeepStack { _queue: queue })
}
