//! Kernel timers: run a closure at `DISPATCH_LEVEL` when a timer expires, once or periodically.
//!
//! A [`Timer`] owns a `KTIMER` and a `KDPC` in non-paged pool and the closure its DPC runs.
//! When the timer expires, the kernel queues the DPC, and the closure runs on some processor at
//! `DISPATCH_LEVEL` with a `&mut DispatchLevel` of its own: it may complete a pended
//! classification, signal an [`Event`](crate::event::Event), queue a work item, take a spin
//! lock, but not wait or call `PASSIVE_LEVEL` routines (those take a `PassiveLevel` token, which
//! the closure does not have).
//!
//! ```
//! use core::time::Duration;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use wfp_rs::timer::Timer;
//!
//! let machine = wfp_rs_sim::Machine::new();
//! let fired = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&fired);
//! let timer = machine.at_passive(|irql| {
//!     let timer = Timer::try_new(move |_dispatch| {
//!         counter.fetch_add(1, Ordering::SeqCst);
//!     }, irql)?;
//!     timer.set(irql, Duration::from_secs(30), None);
//!     Ok::<_, wfp_rs::Status>(timer)
//! }).unwrap();
//! machine.advance_clock(Duration::from_secs(30));
//! machine.wait_for_dpcs();
//! assert_eq!(fired.load(Ordering::SeqCst), 1);
//! machine.at_passive(|irql| timer.shut_down(irql));
//! ```
//!
//! # Teardown
//!
//! The closure may be running on another processor at any moment until the timer is cancelled
//! *and* the DPC it queued has run, so the memory may be freed only after `KeCancelTimer` and
//! `KeFlushQueuedDpcs`, and `KeFlushQueuedDpcs` requires `PASSIVE_LEVEL`.
//! [`Timer::shut_down`] does both and takes a `&PassiveLevel`, so it cannot be called from a
//! place that cannot wait. Dropping a `Timer` does the same when the thread is at
//! `PASSIVE_LEVEL` (checked with `KeGetCurrentIrql`, as a `Drop` has no token); dropped above
//! it (in a DPC or under a spin lock), it cancels the timer and leaks the allocation rather than
//! free memory a DPC may still use — the leak then shows at unload (Driver Verifier's pool
//! check; in the simulator, `DRIVER_VERIFIER_DETECTED_VIOLATION` 0x62). A timer still set, or a
//! DPC still queued or running, when the driver unloads stops the machine with
//! `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (0xCE), as the DPC would call into
//! the unloaded image on Windows.

use core::cell::UnsafeCell;
use core::fmt;
use core::time::Duration;

use crate::irql::{AtMostDispatch, DispatchLevel, PassiveLevel};
use crate::pool::{PoolBox, PoolTag};
use crate::status::Status;
use crate::sys;

/// A closure that can be a timer's routine: `Fn(&mut DispatchLevel) + Send + Sync + 'static`.
/// Implemented for every such closure.
///
/// It runs later, at `DISPATCH_LEVEL`, on whichever processor the kernel picks, possibly while
/// the thread that set the timer still uses the timer, so it is shared (`Sync`), owns what it
/// uses, and receives its own IRQL token:
///
/// ```compile_fail,E0277
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::timer::Timer;
///
/// fn setup(irql: &PassiveLevel) {
///     let _ = Timer::try_new(move |_dispatch| {
///         let _captured = irql; // the caller's token, on another processor
///     }, irql);
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "this closure cannot be a timer routine: it runs later, in a DPC at DISPATCH_LEVEL",
    label = "must be `Fn(&mut DispatchLevel) + Send + Sync + 'static`, so it cannot capture the caller's IRQL token or anything else tied to this thread",
    note = "use the `&mut DispatchLevel` the closure receives; to do PASSIVE_LEVEL work, queue a work item from it (`WorkQueue::queue`)",
    note = "share state with the code that set the timer through an `Arc` (of atomics, or a `SpinLock`)"
)]
pub trait TimerRoutine: Fn(&mut DispatchLevel<'_>) + Send + Sync + 'static {}

#[diagnostic::do_not_recommend]
impl<F: Fn(&mut DispatchLevel<'_>) + Send + Sync + 'static> TimerRoutine for F {}

/// The pool block: the kernel objects and the closure their DPC runs. It never moves: the
/// kernel links the timer into its queues and the DPC's context points at the block.
struct Shared<F> {
    timer: UnsafeCell<sys::KTIMER>,
    dpc: UnsafeCell<sys::KDPC>,
    routine: F,
}

/// A kernel timer (`KTIMER` + `KDPC`) whose DPC runs a closure at `DISPATCH_LEVEL`. See the
/// [module docs](self) for the teardown rules.
pub struct Timer<F: TimerRoutine> {
    /// `None` once shut down.
    shared: Option<PoolBox<Shared<F>>>,
}

// SAFETY: the kernel objects are used only through the kernel's timer routines, which may be
// called from any thread and synchronise internally; the closure is `Send + Sync`.
unsafe impl<F: TimerRoutine> Send for Timer<F> {}
// SAFETY: as above: `set` and `cancel` take `&self` and only call the kernel's routines; the
// DPC shares the closure, which is `Sync`.
unsafe impl<F: TimerRoutine> Sync for Timer<F> {}

impl<F: TimerRoutine> Timer<F> {
    /// Allocates and initialises a timer that runs `routine` each time it expires
    /// (`KeInitializeTimerEx` with `NotificationTimer`, `KeInitializeDpc`). It is not set yet.
    ///
    /// ```
    /// use wfp_rs::timer::Timer;
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let timer = Timer::try_new(|_dispatch| { /* at DISPATCH_LEVEL */ }, irql)?;
    /// timer.shut_down(irql);
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`Status::INSUFFICIENT_RESOURCES`] when non-paged pool is exhausted.
    pub fn try_new(routine: F, irql: &impl AtMostDispatch) -> Result<Timer<F>, Status> {
        let blank = Shared {
            timer: UnsafeCell::new(sys::KTIMER {
                Header: sys::DISPATCHER_HEADER {
                    Lock: 0,
                    SignalState: 0,
                    WaitListHead: sys::LIST_ENTRY {
                        Flink: core::ptr::null_mut(),
                        Blink: core::ptr::null_mut(),
                    },
                },
                DueTime: 0,
                TimerListEntry: sys::LIST_ENTRY {
                    Flink: core::ptr::null_mut(),
                    Blink: core::ptr::null_mut(),
                },
                Dpc: core::ptr::null_mut(),
                Processor: 0,
                Period: 0,
            }),
            dpc: UnsafeCell::new(sys::KDPC {
                TargetInfoAsUlong: 0,
                DpcListEntry: core::ptr::null_mut(),
                ProcessorHistory: 0,
                DeferredRoutine: None,
                DeferredContext: core::ptr::null_mut(),
                SystemArgument1: core::ptr::null_mut(),
                SystemArgument2: core::ptr::null_mut(),
                DpcData: core::ptr::null_mut(),
            }),
            routine,
        };
        let shared = PoolBox::try_new(blank, PoolTag::SDK, irql)?;
        let context: *const Shared<F> = &*shared;
        // SAFETY: the timer is in pool memory that does not move, initialised before any other
        // use; KeInitializeTimerEx may be called at IRQL <= DISPATCH_LEVEL, which the token
        // proves.
        unsafe { sys::KeInitializeTimerEx(shared.timer.get(), sys::NotificationTimer) };
        // SAFETY: as for the timer; the DPC's context is the block itself, which lives until the
        // DPC can no longer run (see `release`), and `run_routine::<F>` reads it as `Shared<F>`.
        unsafe {
            sys::KeInitializeDpc(
                shared.dpc.get(),
                Some(run_routine::<F>),
                context.cast_mut().cast(),
            )
        };
        Ok(Timer {
            shared: Some(shared),
        })
    }

    /// Sets the timer to expire `due` from now and, with a `period`, every `period` after that
    /// (`KeSetTimerEx` with a relative due time). Setting a timer that is already set resets it;
    /// returns whether it was set (in the kernel's timer queue) before.
    ///
    /// `due` is rounded up to the kernel's 100-ns units (at least one); `period` to whole
    /// milliseconds (at least one), saturating at `i32::MAX` ms (about 24.8 days).
    ///
    /// ```
    /// use core::time::Duration;
    /// use wfp_rs::timer::Timer;
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let timer = Timer::try_new(|_dispatch| {}, irql)?;
    /// assert!(!timer.set(irql, Duration::from_millis(500), Some(Duration::from_secs(1))));
    /// assert!(timer.set(irql, Duration::from_secs(5), None)); // it was set: reset
    /// timer.shut_down(irql);
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    pub fn set(&self, irql: &impl AtMostDispatch, due: Duration, period: Option<Duration>) -> bool {
        crate::irql::verify(irql);
        let shared = self.shared();
        let ticks = i64::try_from(due.as_nanos().div_ceil(100))
            .unwrap_or(i64::MAX)
            .max(1);
        let period = period.map_or(0, |p| {
            i32::try_from(p.as_nanos().div_ceil(1_000_000))
                .unwrap_or(i32::MAX)
                .max(1)
        });
        // SAFETY: the timer and DPC were initialised in `try_new` and stay valid until
        // `release` has cancelled the timer and flushed the DPC; KeSetTimerEx may be called at
        // IRQL <= DISPATCH_LEVEL, which the token proves.
        unsafe { sys::KeSetTimerEx(shared.timer.get(), -ticks, period, shared.dpc.get()) != 0 }
    }

    /// Cancels the timer (`KeCancelTimer`); returns whether it was set. A DPC the timer already
    /// queued still runs: wait for it with [`shut_down`](Self::shut_down) before relying on the
    /// closure having stopped.
    ///
    /// ```
    /// use core::time::Duration;
    /// use wfp_rs::timer::Timer;
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let timer = Timer::try_new(|_dispatch| {}, irql)?;
    /// assert!(!timer.cancel(irql));
    /// timer.set(irql, Duration::from_secs(1), None);
    /// assert!(timer.cancel(irql));
    /// timer.shut_down(irql);
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    pub fn cancel(&self, irql: &impl AtMostDispatch) -> bool {
        crate::irql::verify(irql);
        // SAFETY: the timer was initialised; KeCancelTimer may be called at <= DISPATCH_LEVEL.
        unsafe { sys::KeCancelTimer(self.shared().timer.get()) != 0 }
    }

    /// Cancels the timer, waits until its DPC has run if one is queued or running
    /// (`KeFlushQueuedDpcs`), then frees it. After this the closure never runs again.
    ///
    /// ```
    /// use wfp_rs::timer::Timer;
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let timer = Timer::try_new(|_dispatch| {}, irql)?;
    /// timer.shut_down(irql);
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    pub fn shut_down(mut self, irql: &PassiveLevel<'_>) {
        let _ = irql;
        if let Some(shared) = self.shared.take() {
            // SAFETY: the token proves PASSIVE_LEVEL.
            unsafe { release(shared) };
        }
    }

    fn shared(&self) -> &Shared<F> {
        match &self.shared {
            Some(shared) => shared,
            // `shared` is `None` only inside `shut_down` and `drop`, which own the timer.
            None => unreachable_shut_down(),
        }
    }
}

#[cold]
fn unreachable_shut_down() -> ! {
    unreachable!("a Timer is used only while it is not shut down")
}

/// Cancels, flushes and frees.
///
/// # Safety
///
/// The current IRQL is `PASSIVE_LEVEL`.
unsafe fn release<F: TimerRoutine>(shared: PoolBox<Shared<F>>) {
    // SAFETY: the timer was initialised; after the cancel it queues no more DPCs.
    unsafe { sys::KeCancelTimer(shared.timer.get()) };
    // SAFETY: PASSIVE_LEVEL per this function's contract. It returns once a DPC queued before
    // (by the timer, before the cancel) has run, so nothing refers to the block when it is freed.
    unsafe { sys::KeFlushQueuedDpcs() };
    drop(shared);
}

impl<F: TimerRoutine> Drop for Timer<F> {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if sys::KeGetCurrentIrql() == sys::PASSIVE_LEVEL {
            // SAFETY: checked just above.
            unsafe { release(shared) };
        } else {
            // SAFETY: the timer was initialised; KeCancelTimer may be called at <=
            // DISPATCH_LEVEL (a Drop cannot run above it in safe code).
            unsafe { sys::KeCancelTimer(shared.timer.get()) };
            // The DPC may be queued or running (this may be it): the block must outlive it, and
            // nothing here can wait for that. Leaked, and reported as a leak at unload.
            let _ = PoolBox::into_raw(shared);
            crate::kd_print!(
                Error,
                "wfp-rs: a Timer was dropped above PASSIVE_LEVEL; its memory is leaked (use Timer::shut_down at PASSIVE_LEVEL)\n"
            );
        }
    }
}

impl<F: TimerRoutine> fmt::Debug for Timer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer").finish_non_exhaustive()
    }
}

unsafe extern "system" fn run_routine<F: TimerRoutine>(
    _dpc: *mut sys::KDPC,
    context: sys::PVOID,
    _argument1: sys::PVOID,
    _argument2: sys::PVOID,
) {
    // SAFETY: the context is the timer's pool block (`try_new`), which is freed only after the
    // timer is cancelled and its DPC flushed, so it is alive while the DPC runs; the closure is
    // only ever shared.
    let shared = unsafe { &*context.cast_const().cast::<Shared<F>>() };
    // SAFETY: the kernel runs DPC routines at DISPATCH_LEVEL; the token lives for this call
    // only, and no other token is live in a DPC.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    (shared.routine)(&mut irql);
}
