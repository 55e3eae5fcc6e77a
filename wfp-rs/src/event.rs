//! Kernel events (`KEVENT`): one thread waits at `PASSIVE_LEVEL`, another signals.

use core::cell::UnsafeCell;
use core::fmt;
use core::time::Duration;

use crate::irql::{AtMostApc, AtMostDispatch};
use crate::pool::{PoolBox, PoolTag};
use crate::status::Status;
use crate::sys;

/// Whether a satisfied wait resets the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `NotificationEvent`: stays signalled, releasing every waiter, until cleared.
    Notification,
    /// `SynchronizationEvent`: releases one waiter and resets itself.
    Synchronization,
}

/// A kernel event in non-paged pool (the kernel links waiters into the event, so it must not
/// move; the pool allocation gives it a fixed address).
///
/// Waiting requires IRQL <= `APC_LEVEL`: code that may run at `DISPATCH_LEVEL` cannot wait.
///
/// ```
/// use wfp_rs::event::{Event, EventKind};
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// let done = Event::try_new(EventKind::Notification, false, irql)?;
/// done.set(irql);
/// done.wait(irql); // returns at once: the event is signalled
/// # Ok::<(), wfp_rs::Status>(())
/// # }).unwrap();
/// ```
///
/// ```compile_fail
/// use wfp_rs::event::Event;
/// use wfp_rs::irql::DispatchLevel;
///
/// fn classify(irql: &DispatchLevel, reply: &Event) {
///     reply.wait(irql); // error: `DispatchLevel` may be DISPATCH_LEVEL
/// }
/// ```
pub struct Event {
    raw: PoolBox<UnsafeCell<sys::KEVENT>>,
}

// SAFETY: KEVENT is designed to be signalled and waited on from any thread; all access goes
// through the kernel's event routines, which synchronise internally.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Allocates and initialises an event (`KeInitializeEvent`).
    pub fn try_new(
        kind: EventKind,
        signalled: bool,
        irql: &impl AtMostDispatch,
    ) -> Result<Event, Status> {
        let blank = UnsafeCell::new(sys::KEVENT {
            Header: sys::DISPATCHER_HEADER {
                Lock: 0,
                SignalState: 0,
                WaitListHead: sys::LIST_ENTRY {
                    Flink: core::ptr::null_mut(),
                    Blink: core::ptr::null_mut(),
                },
            },
        });
        let raw = PoolBox::try_new(blank, PoolTag::SDK, irql)?;
        let kind = match kind {
            EventKind::Notification => sys::NotificationEvent,
            EventKind::Synchronization => sys::SynchronizationEvent,
        };
        // SAFETY: the KEVENT is in pool memory that does not move and is initialised before any
        // other use; KeInitializeEvent may be called at any IRQL for a non-paged event.
        unsafe { sys::KeInitializeEvent(raw.get(), kind, u8::from(signalled)) };
        Ok(Event { raw })
    }

    /// Signals the event (`KeSetEvent`).
    pub fn set(&self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        // SAFETY: the event was initialised in `try_new`; KeSetEvent with Wait = FALSE may be
        // called at IRQL <= DISPATCH_LEVEL, which the token proves.
        unsafe { sys::KeSetEvent(self.raw.get(), 0, sys::FALSE) };
    }

    /// Resets the event to not signalled (`KeClearEvent`).
    pub fn clear(&self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        // SAFETY: the event was initialised; KeClearEvent may be called at <= DISPATCH_LEVEL.
        unsafe { sys::KeClearEvent(self.raw.get()) };
    }

    /// Waits until the event is signalled (`KeWaitForSingleObject` without a timeout).
    pub fn wait(&self, irql: &impl AtMostApc) {
        let status = self.wait_raw(irql, None);
        debug_assert_eq!(status, 0);
    }

    /// Waits at most `timeout`; returns whether the event was signalled in time.
    pub fn wait_timeout(&self, irql: &impl AtMostApc, timeout: Duration) -> bool {
        // Relative times are negative, in units of 100 ns.
        let ticks = i64::try_from(timeout.as_nanos() / 100).unwrap_or(i64::MAX);
        self.wait_raw(irql, Some(-ticks)) == 0
    }

    /// The address of the `KEVENT` (what `KeWaitForSingleObject` is passed), for the
    /// simulator's diagnostics.
    #[cfg(wfp_sim)]
    pub(crate) fn address(&self) -> usize {
        self.raw.get() as usize
    }

    fn wait_raw(&self, irql: &impl AtMostApc, timeout: Option<i64>) -> sys::NTSTATUS {
        crate::irql::verify(irql);
        let timeout = timeout
            .as_ref()
            .map_or(core::ptr::null(), |t| t as *const i64);
        // SAFETY: the event is initialised and outlives the wait (borrowed by `&self`); the
        // timeout is null or points to a local that outlives the call; any wait is allowed at
        // IRQL <= APC_LEVEL, which the token proves.
        unsafe {
            sys::KeWaitForSingleObject(
                self.raw.get().cast(),
                sys::Executive,
                sys::KernelMode,
                sys::FALSE,
                timeout,
            )
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event").finish_non_exhaustive()
    }
}
