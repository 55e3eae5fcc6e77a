//! Kernel timers (`KTIMER`) and DPCs (`KDPC`): timers expire against the machine's interrupt
//! time (so `Machine::advance_clock` expires them without waiting), and their DPCs run at
//! `DISPATCH_LEVEL` on the machine's DPC thread, which the machine tracks like work items.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::bugcheck::stop;
use super::state::{
    Deadline, Kernel, Routine, RoutineKind, State, current, current_driver, irql, require_irql,
};
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::sys::*;

/// A timer in the timer queue (set and not yet expired, or periodic).
struct SetTimer {
    /// The driver whose code set it (0: harness code).
    driver: usize,
    /// Interrupt time it expires at, in 100-ns ticks.
    due: u64,
    /// Period in 100-ns ticks (0: one-shot).
    period: u64,
    dpc: usize,
    /// The order timers were set in: timers due at the same time expire in it, not in the
    /// order of their addresses (which differ from run to run, and would make a deterministic
    /// machine's schedule depend on the host's allocator).
    seq: u64,
}

/// A DPC in the DPC queue.
struct QueuedDpc {
    dpc: usize,
    routine: unsafe extern "system" fn(*mut KDPC, PVOID, PVOID, PVOID),
    context: usize,
    driver: usize,
}

#[derive(Default)]
pub(crate) struct TimerState {
    /// By address: a pool free looks for a set timer inside the freed block with a range query,
    /// not a scan of every set timer (a driver with a deadline per outstanding question has
    /// thousands set at once).
    set: BTreeMap<usize, SetTimer>,
    queue: VecDeque<QueuedDpc>,
    /// DPC routines running now: (KDPC address, routine, driver).
    running: Vec<(usize, usize, usize)>,
    /// How many timers have been set (`SetTimer::seq`).
    sets: u64,
}

impl TimerState {
    /// Whether every timer that has expired by `now` has had its DPC run.
    fn idle(&self, now: u64) -> bool {
        self.queue.is_empty() && self.running.is_empty() && !self.set.values().any(|t| t.due <= now)
    }
}

/// The machine's timers and DPC queue. A lock of its own, taken after the state lock, never
/// held while a DPC routine runs.
#[derive(Default)]
pub(crate) struct Timers {
    state: Mutex<TimerState>,
    /// Signalled when a timer is set, the clock moves, or a DPC finishes.
    changed: Condvar,
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the DPC thread: the clock moved.
    pub(crate) fn clock_changed(&self) {
        self.changed.notify_all();
    }
}

/// Converts a `KeSetTimerEx` due time to an absolute interrupt time. Absolute times are system
/// time on Windows; the simulator's system time is its interrupt time (INFERRED: adequate for
/// tests, which use relative times).
fn absolute_due(kernel: &Kernel, due: LARGE_INTEGER) -> u64 {
    if due < 0 {
        kernel.interrupt_time().saturating_add(due.unsigned_abs())
    } else {
        due as u64
    }
}

/// `KeInitializeTimerEx`.
///
/// # Safety
///
/// `Timer` must point to writable, non-paged memory for a `KTIMER`.
pub unsafe extern "system" fn KeInitializeTimerEx(Timer: *mut KTIMER, Type: TIMER_TYPE) {
    let _kernel = super::state::KernelCode::enter();
    // wdm.h's requirements table: IRQL <= DISPATCH_LEVEL (the IrqlKeDispatchLte rule).
    require_irql("KeInitializeTimerEx", DISPATCH_LEVEL);
    let kernel = current();
    if kernel.timers.lock().set.contains_key(&(Timer as usize)) {
        stop(
            BugCheckCode::TIMER_OR_DPC_INVALID,
            [
                0,
                Timer as usize,
                Timer as usize,
                Timer as usize + size_of::<KTIMER>(),
            ],
            "KeInitializeTimerEx on a timer that is still set",
        );
    }
    let empty = LIST_ENTRY {
        Flink: core::ptr::null_mut(),
        Blink: core::ptr::null_mut(),
    };
    // SAFETY: the caller passes a writable KTIMER.
    unsafe {
        Timer.write(KTIMER {
            Header: DISPATCHER_HEADER {
                // The object type: TimerNotificationObject = 8, TimerSynchronizationObject = 9.
                Lock: 8 + Type,
                SignalState: 0,
                WaitListHead: empty,
            },
            DueTime: 0,
            TimerListEntry: empty,
            Dpc: core::ptr::null_mut(),
            Processor: 0,
            Period: 0,
        })
    };
}

/// `KeInitializeDpc`.
///
/// # Safety
///
/// `Dpc` must point to writable, non-paged memory for a `KDPC`.
pub unsafe extern "system" fn KeInitializeDpc(
    Dpc: *mut KDPC,
    DeferredRoutine: PKDEFERRED_ROUTINE,
    DeferredContext: PVOID,
) {
    let _kernel = super::state::KernelCode::enter();
    // SAFETY: the caller passes a writable KDPC.
    unsafe {
        Dpc.write(KDPC {
            TargetInfoAsUlong: 0x13, // Type = DpcObject
            DpcListEntry: core::ptr::null_mut(),
            ProcessorHistory: 0,
            DeferredRoutine,
            DeferredContext,
            SystemArgument1: core::ptr::null_mut(),
            SystemArgument2: core::ptr::null_mut(),
            DpcData: core::ptr::null_mut(),
        })
    };
}

/// `KeSetTimerEx`: returns whether the timer was already in the timer queue (it is reset).
///
/// # Safety
///
/// `Timer` initialised with `KeInitializeTimerEx`; `Dpc` null or initialised with
/// `KeInitializeDpc`; both stay valid until the timer is cancelled or expired and the DPC ran.
pub unsafe extern "system" fn KeSetTimerEx(
    Timer: *mut KTIMER,
    DueTime: LARGE_INTEGER,
    Period: LONG,
    Dpc: *mut KDPC,
) -> BOOLEAN {
    let _kernel = super::state::KernelCode::enter();
    require_irql("KeSetTimerEx", DISPATCH_LEVEL);
    let kernel = current();
    // wdm.h documents the period as milliseconds, at most MAXLONG; a negative one is not
    // documented. INFERRED: treated as no period (a one-shot timer); the SDK never passes one.
    let Period = Period.max(0);
    let due = absolute_due(&kernel, DueTime);
    // SAFETY: the caller passes an initialised KTIMER, which the kernel owns while it is set.
    let timer = unsafe { &mut *Timer };
    timer.DueTime = due;
    timer.Period = Period as u32;
    timer.Dpc = Dpc;
    timer.Header.SignalState = 0;
    let was_set = {
        let mut timers = kernel.timers.lock();
        timers.sets += 1;
        let seq = timers.sets;
        timers
            .set
            .insert(
                Timer as usize,
                SetTimer {
                    driver: current_driver(),
                    due,
                    period: u64::from(Period as u32) * 10_000,
                    dpc: Dpc as usize,
                    seq,
                },
            )
            .is_some()
    };
    // The DPC thread checks the timers at least every 5 ms (its clock tick); it is woken only
    // for a timer due already. Windows, too, finds expired timers at its clock interrupt, and
    // setting a timer wakes no thread; waking the DPC thread for every timer set would make
    // every set a thread switch here.
    if due <= kernel.interrupt_time() {
        kernel.timers.changed.notify_all();
    }
    kernel.yield_point("KeSetTimerEx");
    u8::from(was_set)
}

/// `KeCancelTimer`: returns whether the timer was in the timer queue. A DPC the timer already
/// queued stays queued (`KeFlushQueuedDpcs` waits for it).
///
/// # Safety
///
/// `Timer` initialised with `KeInitializeTimerEx`.
pub unsafe extern "system" fn KeCancelTimer(Timer: *mut KTIMER) -> BOOLEAN {
    let _kernel = super::state::KernelCode::enter();
    require_irql("KeCancelTimer", DISPATCH_LEVEL);
    let kernel = current();
    let removed = kernel.timers.lock().set.remove(&(Timer as usize));
    // Only a timer that was due already can be what `wait_idle` waits for; the DPC thread has
    // nothing to do for a cancel.
    if removed
        .as_ref()
        .is_some_and(|timer| timer.due <= kernel.interrupt_time())
    {
        kernel.timers.changed.notify_all();
    }
    u8::from(removed.is_some())
}

/// `KeFlushQueuedDpcs`: returns once every DPC queued when it was called has run. Timers that
/// have expired by the clock count as queued (on Windows the clock interrupt queues their DPC at
/// once; here the DPC thread does, a moment later).
///
/// # Safety
///
/// None beyond the IRQL (PASSIVE_LEVEL), which is checked.
pub unsafe extern "system" fn KeFlushQueuedDpcs() {
    let _kernel = super::state::KernelCode::enter();
    require_irql("KeFlushQueuedDpcs", PASSIVE_LEVEL);
    let kernel = current();
    wait_idle(&kernel, "KeFlushQueuedDpcs");
}

/// Waits until no expired timer or queued DPC is left and no DPC routine runs; past the unload
/// wait limit, stops the machine (a DPC that never returns hangs Windows too).
pub(crate) fn wait_idle(kernel: &Kernel, who: &str) {
    if kernel.sched.is_some() {
        let deadline = kernel.deadline_in(kernel.unload_wait_limit());
        let state = kernel.timers.lock();
        let (state, timed_out) = kernel.wait_while(
            &kernel.timers.state,
            state,
            &kernel.timers.changed,
            Some(deadline),
            "waits for DPCs",
            |state| !state.idle(kernel.interrupt_time()),
        );
        if timed_out {
            let routine = state.running.first().map_or(0, |r| r.1);
            drop(state);
            dpcs_did_not_finish(kernel, who, routine);
        }
        return;
    }
    let deadline = std::time::Instant::now() + kernel.unload_wait_limit();
    let mut state = kernel.timers.lock();
    while !state.idle(kernel.interrupt_time()) {
        let now = std::time::Instant::now();
        if now >= deadline {
            let routine = state.running.first().map_or(0, |r| r.1);
            drop(state);
            dpcs_did_not_finish(kernel, who, routine);
        }
        state = kernel
            .timers
            .changed
            .wait_timeout(
                state,
                (deadline - now).min(std::time::Duration::from_millis(10)),
            )
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn dpcs_did_not_finish(kernel: &Kernel, who: &str, routine: usize) -> ! {
    stop(
        BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
        [routine, 0, routine, 0],
        &format!(
            "{who} waited {:.1} s for DPC routines that did not finish (Machine::set_unload_wait_limit)",
            kernel.unload_wait_limit().as_secs_f64()
        ),
    )
}

/// The unload rule: a timer still set, or a DPC queued or running, for `driver` would call into
/// an unloaded image: `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (0xCE).
/// Parameters as for the other 0xCE stops: 1 and 3 the routine that would run (INFERRED: on
/// Windows 0xCE is raised later, when the timer fires into the unloaded image, with the
/// referenced address).
pub(crate) fn check_unload(kernel: &Kernel, driver: usize, name: &str) {
    let state = kernel.timers.lock();
    let timers = state.set.values().filter(|t| t.driver == driver).count();
    let queued = state.queue.iter().filter(|d| d.driver == driver).count();
    let running = state.running.iter().filter(|r| r.2 == driver).count();
    if timers + queued + running == 0 {
        return;
    }
    let routine = state
        .set
        .values()
        .find(|t| t.driver == driver)
        // SAFETY: a set timer's DPC was initialised by KeInitializeDpc and is valid while set.
        .map(|t| dpc_routine(t.dpc))
        .or_else(|| {
            state
                .queue
                .iter()
                .find(|d| d.driver == driver)
                .map(|d| d.routine as usize)
        })
        .or_else(|| state.running.iter().find(|r| r.2 == driver).map(|r| r.1))
        .unwrap_or(0);
    drop(state);
    stop(
        BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
        [routine, 0, routine, 0],
        &format!(
            "driver {name} unloaded with {timers} timer(s) still set, {queued} DPC(s) queued and {running} DPC routine(s) running (cancel the timers and call KeFlushQueuedDpcs before unload)"
        ),
    );
}

/// The routine of an initialised KDPC (0 for none).
fn dpc_routine(dpc: usize) -> usize {
    if dpc == 0 {
        return 0;
    }
    // SAFETY: callers pass the address of a KDPC the driver initialised and keeps valid while
    // its timer is set or it is queued.
    unsafe {
        (*(dpc as *const KDPC))
            .DeferredRoutine
            .map_or(0, |r| r as usize)
    }
}

/// Driver Verifier's check when pool is freed: a set timer, or a queued DPC, inside the block
/// stops the machine with `TIMER_OR_DPC_INVALID` (0xC7), parameter 1 = 0 for a timer, 1 for a
/// DPC, parameter 2 its address, 3 and 4 the range freed. Takes the state lock the free holds
/// (the timers' lock is taken after it) and gives it back, so the free looks and removes the
/// block under one lock.
pub(crate) fn check_free<'k>(
    kernel: &'k Kernel,
    held: MutexGuard<'k, State>,
    start: usize,
    size: usize,
) -> MutexGuard<'k, State> {
    let end = start + size;
    let state = kernel.timers.lock();
    let inside = |address: usize| (start..end).contains(&address);
    let found = if let Some((&timer, _)) = state.set.range(start..end).next() {
        Some((
            0,
            timer,
            "a pool block was freed while a timer in it was still set",
        ))
    } else {
        state.queue.iter().find(|d| inside(d.dpc)).map(|d| {
            (
                1,
                d.dpc,
                "a pool block was freed while a DPC in it was still queued",
            )
        })
    };
    drop(state);
    if let Some((kind, address, why)) = found {
        drop(held);
        stop(
            BugCheckCode::TIMER_OR_DPC_INVALID,
            [kind, address, start, end],
            why,
        );
    }
    held
}

/// The DPC thread: expires timers against the interrupt time, queues their DPCs, and runs queued
/// DPC routines at `DISPATCH_LEVEL`, checking that each returns at `DISPATCH_LEVEL`.
pub(crate) fn dpc_thread(kernel: Arc<Kernel>) {
    if kernel.sched.is_some() {
        return dpc_thread_scheduled(&kernel);
    }
    loop {
        if kernel.stopped.load(Ordering::SeqCst) {
            return;
        }
        let next = {
            let mut state = kernel.timers.lock();
            expire(&kernel, &mut state);
            match state.queue.pop_front() {
                Some(dpc) => {
                    state
                        .running
                        .push((dpc.dpc, dpc.routine as usize, dpc.driver));
                    Some(dpc)
                }
                None => {
                    // Real time moves the clock too; poll, and wake at once when told.
                    let _ = kernel
                        .timers
                        .changed
                        .wait_timeout(state, std::time::Duration::from_millis(5))
                        .unwrap_or_else(|p| p.into_inner());
                    None
                }
            }
        };
        let Some(dpc) = next else { continue };
        run_dpc(&kernel, dpc);
    }
}

/// The DPC thread of a deterministic machine: it waits, through the scheduler, until a DPC is
/// queued or the earliest timer is due on the virtual clock (when every task waits, the clock
/// jumps to that due time: timers fire when the machine is otherwise idle).
fn dpc_thread_scheduled(kernel: &Arc<Kernel>) {
    loop {
        let state = kernel.timers.lock();
        let earliest = |state: &TimerState| state.set.values().map(|t| t.due).min();
        let due = earliest(&state);
        let (mut state, _) = kernel.wait_while(
            &kernel.timers.state,
            state,
            &kernel.timers.changed,
            due.map(Deadline::Virtual),
            "DPC thread: waits for a timer or a DPC",
            // A timer set earlier than `due` ends the wait, to wait again with its due time.
            |state| {
                !kernel.stopped.load(Ordering::SeqCst)
                    && state.queue.is_empty()
                    && earliest(state) == due
                    && due.is_none_or(|due| due > kernel.interrupt_time())
            },
        );
        if kernel.stopped.load(Ordering::SeqCst) {
            return;
        }
        expire(kernel, &mut state);
        let Some(dpc) = state.queue.pop_front() else {
            continue;
        };
        state
            .running
            .push((dpc.dpc, dpc.routine as usize, dpc.driver));
        drop(state);
        run_dpc(kernel, dpc);
        kernel.yield_point("DPC thread: a DPC routine returned");
    }
}

/// Runs one DPC routine, taken off the queue, at `DISPATCH_LEVEL`.
fn run_dpc(kernel: &Arc<Kernel>, dpc: QueuedDpc) {
    {
        super::state::with_context(kernel, DISPATCH_LEVEL, dpc.driver, || {
            let routine = Routine::new(RoutineKind::Dpc, dpc.driver, dpc.routine as usize);
            super::state::with_routine(routine, || {
                // SAFETY: the driver initialised this DPC with this routine and context
                // (KeInitializeDpc) and keeps them valid until the routine has run.
                unsafe {
                    (dpc.routine)(
                        dpc.dpc as *mut KDPC,
                        dpc.context as PVOID,
                        core::ptr::null_mut(),
                        core::ptr::null_mut(),
                    )
                };
                let now = irql();
                if now != DISPATCH_LEVEL {
                    stop(
                        BugCheckCode::IRQL_UNEXPECTED_VALUE,
                        [now as usize, 0, dpc.routine as usize, 0],
                        &format!("a DPC routine returned at IRQL {now}, not DISPATCH_LEVEL"),
                    );
                }
            });
        });
        let mut state = kernel.timers.lock();
        if let Some(at) = state.running.iter().position(|r| r.0 == dpc.dpc) {
            state.running.swap_remove(at);
        }
        drop(state);
        kernel.timers.changed.notify_all();
    }
}

/// Moves expired timers' DPCs to the queue; periodic timers are set again for their next period.
fn expire(kernel: &Kernel, state: &mut TimerState) {
    let now = kernel.interrupt_time();
    let mut expired: Vec<(u64, u64, usize)> = state
        .set
        .iter()
        .filter(|(_, t)| t.due <= now)
        .map(|(&a, t)| (t.due, t.seq, a))
        .collect();
    // In due order, and in the order they were set among equals: a DPC queue in a stable order.
    expired.sort_unstable();
    for (_, _, address) in expired {
        let (driver, dpc) = {
            let timer = state.set.get_mut(&address).expect("listed above");
            if timer.period > 0 {
                // One expiry per advance, however many periods it spans (as a timer that missed
                // ticks fires once).
                timer.due = now.saturating_add(timer.period);
                (timer.driver, timer.dpc)
            } else {
                let timer = state.set.remove(&address).expect("listed above");
                (timer.driver, timer.dpc)
            }
        };
        // SAFETY: a set timer's KTIMER stays valid while it is set (freeing it is the 0xC7 stop).
        unsafe { (*(address as *mut KTIMER)).Header.SignalState = 1 };
        if dpc == 0 || state.queue.iter().any(|q| q.dpc == dpc) {
            // A DPC already queued is not queued twice.
            continue;
        }
        // SAFETY: the DPC was initialised by KeInitializeDpc and stays valid while its timer is
        // set or it is queued.
        let (routine, context) = unsafe {
            let object = &*(dpc as *const KDPC);
            (object.DeferredRoutine, object.DeferredContext as usize)
        };
        if let Some(routine) = routine {
            state.queue.push_back(QueuedDpc {
                dpc,
                routine,
                context,
                driver,
            });
        }
    }
}
