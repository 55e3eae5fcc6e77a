//! Pool allocation with tags, IRQL checks and leak accounting.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::alloc::Layout;

use super::bugcheck::stop;
use super::state::{Block, current, current_driver, irql, level_name};
use wfp_rs::bugcheck::{BugCheckCode, verifier};
use wfp_rs::pool::POOL_ALIGNMENT;
use wfp_rs::sys::*;

/// The byte `POOL_FLAG_UNINITIALIZED` memory is filled with, so reads of uninitialised pool show
/// up in tests instead of reading zeroes by luck.
pub(crate) const UNINITIALIZED_FILL: u8 = 0xCD;

pub(crate) fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, POOL_ALIGNMENT).expect("pool block size overflows a Layout")
}

/// Driver Verifier's IRQL rule for allocating `size` bytes of pool with `flags`: paged pool at
/// most `APC_LEVEL`, non-paged at most `DISPATCH_LEVEL`; `what` names the allocator in the
/// report. Shared by `ExAllocatePool2` and the global allocator (`global_alloc.rs`).
pub(crate) fn require_allocation_irql(now: KIRQL, flags: POOL_FLAGS, size: usize, what: &str) {
    let paged = flags & POOL_FLAG_PAGED != 0;
    let subcode = if paged && now > APC_LEVEL {
        verifier::PAGED_ALLOCATION_ABOVE_APC
    } else if now > DISPATCH_LEVEL {
        verifier::NONPAGED_ALLOCATION_ABOVE_DISPATCH
    } else {
        return;
    };
    stop(
        BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
        [subcode, now as usize, flags as usize, size],
        &format!(
            "{what}: {size} bytes allocated at IRQL {now} ({})",
            level_name(now)
        ),
    );
}

/// The same rule for freeing a block allocated with `flags`.
pub(crate) fn free_irql_allowed(now: KIRQL, flags: POOL_FLAGS) -> bool {
    let paged = flags & POOL_FLAG_PAGED != 0;
    !((paged && now > APC_LEVEL) || now > DISPATCH_LEVEL)
}

/// The stop for freeing the block at `address` (allocated with `flags`) where
/// [`free_irql_allowed`] says no.
pub(crate) fn stop_free_above_irql(now: KIRQL, flags: POOL_FLAGS, address: usize, what: &str) -> ! {
    let subcode = if flags & POOL_FLAG_PAGED != 0 {
        verifier::PAGED_FREE_ABOVE_APC
    } else {
        verifier::NONPAGED_FREE_ABOVE_DISPATCH
    };
    stop(
        BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
        [subcode, now as usize, flags as usize, address],
        &format!("{what}: freed at IRQL {now} ({})", level_name(now)),
    );
}

/// `ExAllocatePool2`. Memory is zeroed unless `POOL_FLAG_UNINITIALIZED` is given; failures can be
/// injected with `Machine::fail_allocations`.
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn ExAllocatePool2(
    Flags: POOL_FLAGS,
    NumberOfBytes: SIZE_T,
    Tag: ULONG,
) -> PVOID {
    let _kernel = super::state::KernelCode::enter();
    let now = irql();
    require_allocation_irql(now, Flags, NumberOfBytes, "pool");
    if NumberOfBytes == 0 {
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::ZERO_BYTE_ALLOCATION,
                now as usize,
                Flags as usize,
                0,
            ],
            "a zero-byte pool allocation was requested",
        );
    }
    let kernel = current();
    let mut state = kernel.lock();
    if kernel.injected_failure() {
        return core::ptr::null_mut();
    }
    let layout = layout(NumberOfBytes);
    let ptr = if Flags & POOL_FLAG_UNINITIALIZED != 0 {
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if !ptr.is_null() {
            // SAFETY: `ptr` is a fresh block of `NumberOfBytes` bytes.
            unsafe { ptr.write_bytes(UNINITIALIZED_FILL, NumberOfBytes) };
        }
        ptr
    } else {
        // SAFETY: the layout has a non-zero size (checked above).
        unsafe { std::alloc::alloc_zeroed(layout) }
    };
    if ptr.is_null() {
        return core::ptr::null_mut();
    }
    state.freed.remove(&(ptr as usize));
    state.pool.insert(
        ptr as usize,
        Block {
            size: NumberOfBytes,
            tag: Tag,
            flags: Flags,
            driver: current_driver(),
        },
    );
    ptr.cast()
}

/// `ExFreePoolWithTag`.
///
/// # Safety
///
/// `P` must be a live block from `ExAllocatePool2`; the simulator stops the machine otherwise,
/// before touching the memory.
pub unsafe extern "system" fn ExFreePoolWithTag(P: PVOID, Tag: ULONG) {
    free(P, Some(Tag));
}

/// `ExFreePool`: frees a block whatever its tag (the blocks kernel routines such as
/// `SeQueryInformationToken` allocate for their answers are freed this way).
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn ExFreePool(P: PVOID) {
    free(P, None);
}

/// Frees a pool block, checking its tag if `expected` is given.
fn free(P: PVOID, expected: Option<ULONG>) {
    let _kernel = super::state::KernelCode::enter();
    let now = irql();
    let kernel = current();
    let state = kernel.lock();
    let Some(block) = state.pool.get(&(P as usize)) else {
        let double = state.freed.contains(&(P as usize));
        drop(state);
        let (subcode, why) = if double {
            (
                verifier::DOUBLE_FREE,
                "pool that was already freed was freed again",
            )
        } else {
            (
                verifier::FREE_OF_UNALLOCATED_ADDRESS,
                "freed an address no allocation returned",
            )
        };
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [subcode, P as usize, 0, 0],
            why,
        );
    };
    if !free_irql_allowed(now, block.flags) {
        let flags = block.flags;
        drop(state);
        stop_free_above_irql(now, flags, P as usize, "pool");
    }
    if let Some(Tag) = expected
        && block.tag != Tag
    {
        let allocated_with = block.tag;
        drop(state);
        stop(
            BugCheckCode::BAD_POOL_CALLER,
            [0x0A, P as usize, allocated_with as usize, Tag as usize],
            &format!(
                "ExFreePoolWithTag with tag {:?}, but the block was allocated with {:?}",
                wfp_rs::pool::PoolTag::new(&Tag.to_le_bytes()),
                wfp_rs::pool::PoolTag::new(&allocated_with.to_le_bytes())
            ),
        );
    }
    let size = block.size;
    // Driver Verifier looks for timers and DPCs in the freed range before the block is gone;
    // under the state lock (the timers' lock is taken after it), so that no other free of the
    // same block slips in between the look and the removal and escapes the double-free stop.
    let mut state = super::timer::check_free(&kernel, state, P as usize, size);
    state.pool.remove(&(P as usize));
    state.freed.insert(P as usize);
    drop(state);
    // Spin locks in the block are gone; a lock later allocated at the same address is another.
    super::deadlock::forget_range(&kernel, P as usize, size);
    // SAFETY: the block was allocated above with this layout and is freed exactly once (it was
    // just removed from the live table).
    unsafe { std::alloc::dealloc(P.cast(), layout(size)) };
}

/// Allocates a block charged to `driver` on behalf of the kernel (driver object extensions,
/// work items). Returns null when an injected failure applies.
pub(crate) fn kernel_allocate(size: usize, tag: u32, driver: usize) -> *mut u8 {
    kernel_allocate_with(size, tag, driver, POOL_FLAG_NON_PAGED)
}

/// [`kernel_allocate`] from the pool `flags` names (`POOL_FLAG_PAGED` for answers the kernel
/// documents as paged, which may then only be freed at IRQL <= APC_LEVEL).
pub(crate) fn kernel_allocate_with(
    size: usize,
    tag: u32,
    driver: usize,
    flags: POOL_FLAGS,
) -> *mut u8 {
    let kernel = current();
    let mut state = kernel.lock();
    if kernel.injected_failure() {
        return core::ptr::null_mut();
    }
    // SAFETY: sizes passed here are non-zero constants or checked by the caller.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout(size.max(1))) };
    if !ptr.is_null() {
        state.freed.remove(&(ptr as usize));
        state.pool.insert(
            ptr as usize,
            Block {
                size: size.max(1),
                tag,
                flags,
                driver,
            },
        );
    }
    ptr
}

/// Frees a block from [`kernel_allocate`].
pub(crate) fn kernel_free(ptr: *mut u8) {
    let kernel = current();
    let size = {
        let mut state = kernel.lock();
        let block = state
            .pool
            .remove(&(ptr as usize))
            .expect("kernel block freed twice");
        state.freed.insert(ptr as usize);
        block.size
    };
    super::deadlock::forget_range(&kernel, ptr as usize, size);
    // SAFETY: allocated by `kernel_allocate` with this size, freed once (removed above).
    unsafe { std::alloc::dealloc(ptr, layout(size)) };
}
