//! The simulator's interface: what the `wfp-rs-sim` crate needs from inside the SDK.
//!
//! Not API: hidden from the docs, no stability promise, and nothing a driver calls. The
//! simulator is a crate of its own (a driver's tests depend on it, the driver does not), but
//! parts of it must see the SDK's internals: the kernel-function table it installs, the driver
//! glue's extension (to find a driver's work queue, or to say what an unload waits for), and the
//! bridge protocol that `crate::user` speaks on the other side. They are gathered here, so that
//! everything the simulator depends on is in one place.

pub use crate::sys::{KernelFunctions, NOT_INSTALLED, install_kernel};

use crate::driver::Driver;
use crate::irql::{DispatchLevel, PassiveLevel};
use crate::sys;
use crate::work_item::WorkQueue;

/// A new [`WorkQueue`] handle of the SDK driver whose object is `object` (`None` for a driver
/// without the SDK's glue), so a test can queue work on its behalf.
pub fn work_queue_of(object: *mut sys::DRIVER_OBJECT) -> Option<WorkQueue> {
    crate::driver::work_queue_of(object)
}

/// What the SDK's unload glue of driver `object` waits for when it waits on the event at
/// address `waited_on`, for the simulator's report when a wait at unload gives up.
pub fn unload_wait_reason(
    object: *mut sys::DRIVER_OBJECT,
    waited_on: usize,
) -> Option<std::string::String> {
    crate::driver::unload_wait_reason(object, waited_on)
}

/// Runs `f` with the [`Driver`] handle of a loaded SDK driver, as the driver's own code.
pub fn with_driver_of<R>(
    object: *mut sys::DRIVER_OBJECT,
    registry_path: &sys::UNICODE_STRING,
    irql: &mut PassiveLevel<'_>,
    f: impl FnOnce(&mut PassiveLevel<'_>, &mut Driver<'_>) -> R,
) -> Option<R> {
    crate::driver::with_driver_of(object, registry_path, irql, f)
}

/// A `PassiveLevel` token, for the harness's code that runs as a driver's.
///
/// # Safety
///
/// As `PassiveLevel::new_unchecked`: the thread runs at `PASSIVE_LEVEL` for the token's whole
/// lifetime, and no other token is usable on it meanwhile.
pub unsafe fn passive_level<'t>() -> PassiveLevel<'t> {
    // SAFETY: the caller's contract is this one.
    unsafe { PassiveLevel::new_unchecked() }
}

/// A `DispatchLevel` token, for the harness's code that runs as a driver's.
///
/// # Safety
///
/// As `DispatchLevel::new_unchecked`: the thread runs at `DISPATCH_LEVEL` (or lower) for the
/// token's whole lifetime, and no other token is usable on it meanwhile.
pub unsafe fn dispatch_level<'t>() -> DispatchLevel<'t> {
    // SAFETY: the caller's contract is this one.
    unsafe { DispatchLevel::new_unchecked() }
}

// The wire protocol of the user-mode bridge (server in `wfp-rs-sim`, client in `crate::user`).
#[cfg(unix)]
pub mod bridge;
