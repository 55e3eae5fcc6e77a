//! Kernel events. The signal state lives in the `KEVENT` itself (`Header.SignalState`), as in
//! the kernel; waiters sleep on the machine's condition variable.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::state::{
    Kernel, Waiter, current, current_driver, current_routine, require_irql, thread_id,
};
use wfp_rs::sys::*;

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_TIMEOUT: NTSTATUS = 0x102;

fn signal_state<'a>(event: *mut KEVENT) -> &'a AtomicI32 {
    // SAFETY: callers pass an initialised KEVENT that outlives the call.
    let state = unsafe { &raw mut (*event).Header.SignalState };
    // SAFETY: SignalState is an aligned LONG that is only accessed through these atomics.
    unsafe { AtomicI32::from_ptr(state) }
}

fn is_synchronization(event: *mut KEVENT) -> bool {
    // SAFETY: as above; the type lives in the first byte of the header, written once at
    // initialisation before the event is shared.
    unsafe { (*event).Header.Lock & 0xff == SynchronizationEvent }
}

/// `KeInitializeEvent`.
///
/// # Safety
///
/// `Event` must point to writable memory for a `KEVENT` that is not in use.
pub unsafe extern "system" fn KeInitializeEvent(
    Event: *mut KEVENT,
    Type: EVENT_TYPE,
    State: BOOLEAN,
) {
    let _kernel = super::state::KernelCode::enter();
    // SAFETY: the caller provides a writable KEVENT not yet shared with other threads.
    let header = unsafe { &mut (*Event).Header };
    header.Lock = Type & 0xff;
    header.SignalState = i32::from(State != 0);
}

/// `KeSetEvent` (with `Wait` = FALSE).
///
/// # Safety
///
/// `Event` must be an initialised `KEVENT`.
pub unsafe extern "system" fn KeSetEvent(
    Event: *mut KEVENT,
    Increment: KPRIORITY,
    Wait: BOOLEAN,
) -> LONG {
    let _kernel = super::state::KernelCode::enter();
    let _ = Increment;
    require_irql(
        "KeSetEvent",
        if Wait != 0 { APC_LEVEL } else { DISPATCH_LEVEL },
    );
    let kernel = current();
    let guard = kernel.event_lock.lock().unwrap_or_else(|p| p.into_inner());
    let previous = signal_state(Event).swap(1, Ordering::SeqCst);
    kernel.event_signal.notify_all();
    drop(guard);
    kernel.yield_point("KeSetEvent");
    previous
}

/// `KeClearEvent`.
///
/// # Safety
///
/// `Event` must be an initialised `KEVENT`.
pub unsafe extern "system" fn KeClearEvent(Event: *mut KEVENT) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("KeClearEvent", DISPATCH_LEVEL);
    signal_state(Event).store(0, Ordering::SeqCst);
}

/// `KeWaitForSingleObject` on an event. A zero timeout polls and is allowed at
/// `DISPATCH_LEVEL`; any other wait requires IRQL <= `APC_LEVEL`. Relative timeouts (negative,
/// in 100 ns units) are honoured; absolute ones are treated as already expired. A wait with no
/// timeout in `DriverEntry` or an unload routine gives up after the machine's unload wait limit
/// and stops with `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (on Windows the unload
/// hangs); other waits with no timeout are listed in that stop's report while they block.
///
/// # Safety
///
/// `Object` must be an initialised `KEVENT`; `Timeout` null or valid.
pub unsafe extern "system" fn KeWaitForSingleObject(
    Object: PVOID,
    WaitReason: i32,
    WaitMode: KPROCESSOR_MODE,
    Alertable: BOOLEAN,
    Timeout: *const LARGE_INTEGER,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (WaitReason, WaitMode, Alertable);
    // SAFETY: the caller passes null or a valid timeout.
    let timeout = unsafe { Timeout.as_ref().copied() };
    let poll = timeout == Some(0);
    require_irql(
        "KeWaitForSingleObject",
        if poll { DISPATCH_LEVEL } else { APC_LEVEL },
    );
    let event = Object.cast::<KEVENT>();
    let kernel = current();
    let deadline = match timeout {
        None => None,
        Some(ticks) if ticks < 0 => Some(kernel.deadline_in(Duration::from_nanos(
            ticks.unsigned_abs().saturating_mul(100),
        ))),
        Some(_) => Some(kernel.deadline_in(Duration::ZERO)),
    };
    // A wait with no timeout in DriverEntry or an unload routine is one the I/O manager's load
    // or unload waits on: it gives up after the machine's unload wait limit (on Windows it
    // hangs). Other waits with no timeout are listed for that report while they block.
    let unload_deadline = if deadline.is_none() {
        kernel.load_or_unload_deadline()
    } else {
        None
    };
    let _waiter = (deadline.is_none()).then(|| Registered::new(&kernel, Object as usize));
    // A poll never waits; any other call may.
    let _blocked = (!poll).then(|| super::blocked::BlockedWait::enter(&kernel));
    let guard = kernel.event_lock.lock().unwrap_or_else(|p| p.into_inner());
    let acquire = |_: &mut ()| {
        let state = signal_state(event);
        if is_synchronization(event) {
            state
                .compare_exchange(1, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        } else {
            state.load(Ordering::SeqCst) != 0
        }
    };
    let (guard, timed_out) = kernel.wait_while(
        &kernel.event_lock,
        guard,
        &kernel.event_signal,
        deadline.or(unload_deadline),
        "KeWaitForSingleObject",
        |unit| !acquire(unit),
    );
    if !timed_out {
        return STATUS_SUCCESS;
    }
    if deadline.is_none() {
        drop(guard);
        give_up_at_unload(&kernel, Object as usize);
    }
    STATUS_TIMEOUT
}

/// A wait with no timeout, listed in the machine's waiters while it blocks.
struct Registered<'k> {
    kernel: &'k Kernel,
    id: u64,
}

impl<'k> Registered<'k> {
    fn new(kernel: &'k Kernel, object: usize) -> Registered<'k> {
        let id = thread_id();
        let current = std::thread::current();
        let waiter = Waiter {
            object,
            routine: current_routine(),
            thread: format!("{} [{id}]", current.name().unwrap_or("<unnamed>")),
        };
        kernel
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, waiter);
        Registered { kernel, id }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.kernel
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The stop for a wait with no timeout in `DriverEntry` or an unload routine that reached the
/// unload wait limit.
fn give_up_at_unload(kernel: &Kernel, object: usize) -> ! {
    let driver = current_driver();
    let what = wfp_rs::__sim::unload_wait_reason(driver as *mut DRIVER_OBJECT, object)
        .unwrap_or_else(|| {
            format!("the event at {object:#x} (KeWaitForSingleObject with no timeout)")
        });
    kernel.unload_wait_expired(
        driver,
        [object, 0, 0, wfp_rs::bugcheck::unload_wait::EVENT],
        &what,
    )
}
