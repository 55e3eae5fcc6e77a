//! The state of one simulated machine, and the per-thread state of its processors.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustc_hash::{FxHashMap, FxHashSet};

use super::bugcheck::stop;
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::sys::*;

/// A pool block.
pub(crate) struct Block {
    pub size: usize,
    pub tag: u32,
    pub flags: POOL_FLAGS,
    /// The driver object the allocation is charged to (0: the kernel or the test harness).
    pub driver: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WorkItemState {
    Idle,
    Queued,
    /// Its routine runs on the simulated thread with this id.
    Running(u64),
}

pub(crate) struct WorkItemRecord {
    pub driver: usize,
    pub device: usize,
    pub state: WorkItemState,
}

pub(crate) struct QueuedWork {
    pub item: usize,
    pub routine: unsafe extern "system" fn(*mut DEVICE_OBJECT, PVOID),
    pub device: usize,
    pub context: usize,
}

pub(crate) struct DriverRecord {
    pub name: String,
    pub object: Box<DRIVER_OBJECT>,
    // Owned here so the pointers to them in `object` stay valid; read only through those.
    #[allow(dead_code)]
    pub driver_extension: Box<DRIVER_EXTENSION>,
    /// `IoAllocateDriverObjectExtension` blocks: (client id, address, size). Freed with the
    /// driver object, not charged as leaks.
    pub extensions: Vec<(usize, usize, usize)>,
    #[allow(dead_code)]
    pub name_utf16: Vec<u16>,
    pub registry_path_utf16: Vec<u16>,
}

pub(crate) struct DeviceRecord {
    pub driver: usize,
    // Owned here; drivers and the driver object's device list reach it by pointer.
    #[allow(dead_code)]
    pub object: Box<DEVICE_OBJECT>,
    pub extension: Option<(usize, usize)>,
    pub name: Option<String>,
}

#[derive(Default)]
pub(crate) struct State {
    pub pool: FxHashMap<usize, Block>,
    pub freed: FxHashSet<usize>,
    /// While set, worker threads leave queued work items in the queue.
    pub hold_work_items: bool,
    pub drivers: FxHashMap<usize, DriverRecord>,
    pub devices: FxHashMap<usize, DeviceRecord>,
    pub work_items: FxHashMap<usize, WorkItemRecord>,
    pub queue: VecDeque<QueuedWork>,
    /// How many times `IoQueueWorkItem` queued an item since the machine started (harness
    /// bookkeeping, `Machine::work_items_queued`; nothing in Windows reads it).
    pub work_items_queued: u64,
    /// Work items taken off `queue` whose routine has not returned yet, by driver object (no
    /// entry: none). Counted by the worker threads, under this lock, from the moment they take
    /// an item off the queue until the routine returns, even if the routine freed its item
    /// first (the SDK's routines do): Windows keeps the device object referenced, and the
    /// driver loaded, for that long.
    pub running_work: FxHashMap<usize, usize>,
    /// The most recent `DbgPrintEx` messages, oldest first (`Machine::debug_output`).
    pub debug: DebugLog,
    pub shutdown: bool,
    /// While set, `BCryptGenRandom` fails with this status (`Machine::fail_random`).
    pub random_failure: Option<NTSTATUS>,
}

// SAFETY: the raw pointers in the state (driver and device objects, their links) point into
// boxes the state itself owns, and are only touched with the machine's state lock held.
unsafe impl Send for State {}

/// How many `DbgPrintEx` messages a new machine keeps (`Machine::set_debug_log_limit`).
pub(crate) const DEFAULT_DEBUG_LOG_LIMIT: usize = 100_000;

/// The machine's record of `DbgPrintEx` messages: the most recent `limit`, and how many older
/// ones were dropped to keep it there. Harness bookkeeping, like a debugger's scrollback: a
/// driver that prints per connection must not grow the test process's memory with every
/// connection (about 1.2 KB each for the firewall at a million connections).
pub(crate) struct DebugLog {
    pub lines: VecDeque<String>,
    pub limit: usize,
    pub dropped: u64,
}

impl Default for DebugLog {
    fn default() -> Self {
        DebugLog {
            lines: VecDeque::new(),
            limit: DEFAULT_DEBUG_LOG_LIMIT,
            dropped: 0,
        }
    }
}

impl DebugLog {
    pub fn push(&mut self, line: String) {
        self.lines.push_back(line);
        self.trim();
    }

    /// Drops the oldest messages past the limit.
    pub fn trim(&mut self) {
        while self.lines.len() > self.limit {
            self.lines.pop_front();
            self.dropped += 1;
        }
    }
}

/// Pool allocations that fail: `skip` more succeed, then `count` fail; then the windows of
/// `later`, last first, each counted from the end of the one before.
#[derive(Default)]
pub(crate) struct Faults {
    pub skip: u64,
    pub count: u64,
    pub later: Vec<(u64, u64)>,
}

/// The first flow handle a machine gives a connection (INFERRED: any nonzero value; this one is
/// easy to tell apart in a log).
const FIRST_FLOW_HANDLE: u64 = 0x0F10_0000;

/// One simulated machine.
pub(crate) struct Kernel {
    pub state: Mutex<State>,
    /// Registry keys and values drivers read their configuration from (`registry.rs`).
    pub registry: super::registry::Registry,
    /// Fault injection for pool allocations. A lock of its own, never held while allocating, so
    /// the global allocator can consult it whatever locks its caller holds.
    pub faults: Mutex<Faults>,
    /// Blocks the global allocator took from pool for driver code (`Box`, `Vec`, `Arc`), by
    /// address. A leaf lock, like `faults`: see `global_alloc.rs`.
    pub global_pool: Mutex<FxHashMap<usize, Block>>,
    /// Signalled when work is queued or the machine shuts down.
    pub work_ready: Condvar,
    /// Signalled when a work item finishes.
    pub work_done: Condvar,
    /// Guards event waits; see `event.rs`.
    pub event_lock: Mutex<()>,
    pub event_signal: Condvar,
    pub echo_debug: bool,
    /// The component filter mask `DbgPrintEx` and `DbgQueryDebugFilterState` apply, to every
    /// component (`Machine::set_debug_filter_mask`).
    pub debug_filter_mask: AtomicU32,
    /// How the harness's waits spin before they park (`Machine::set_wait_spin`).
    pub wait_spin: super::spin::Spinner,
    /// The ALE flows `Machine::connect` established and `Machine::end_flow` has not ended.
    pub established_flows: Mutex<FxHashMap<u64, crate::EstablishedFlow>>,
    /// The flow handle `Machine::connect` gives the next connection. Per machine, so that a
    /// deterministic run's handles are the same in every run of its seed, whatever other
    /// machines the process has made.
    pub next_flow: AtomicU64,
    pub workers: Mutex<Vec<JoinHandle<()>>>,
    pub stopped: AtomicBool,
    /// The filter engine. A lock of its own: classification calls into drivers, which call the
    /// pool and the I/O manager.
    pub wfp: Mutex<super::wfp::Bfe>,
    /// Signalled when a call into a callout finishes (unregistration waits on it).
    pub wfp_idle: Condvar,
    /// Signalled when a filter engine transaction ends (writers of other sessions wait on it).
    pub wfp_txn: Condvar,
    /// The filter manager: filters, communication ports and their messages.
    pub flt: super::flt::FilterManager,
    /// Signalled when a pended classification is completed: the one for the pend's stripe
    /// (`wfp::pend_completed`), so that a completion wakes the connection waiting for that pend
    /// (and the few sharing its stripe), not every connection waiting for any pend.
    pub wfp_pend: [Condvar; 1 << super::wfp::PEND_STRIPE_BITS],
    /// `Machine::connect` waiting for a pended classification's completion, as a spinning wait
    /// sees it.
    pub wfp_pend_wait: super::spin::WaitSite,
    /// I/O requests, file objects, symbolic links and device security (`irp.rs`).
    pub irp: super::irp::IoManager,
    /// The interrupt-time clock: host monotonic time since the machine started, plus
    /// `clock_offset` (100-ns ticks) that the harness adds with `Machine::advance_clock`.
    pub clock_start: std::time::Instant,
    pub clock_offset: AtomicU64,
    /// The order in which spin locks have been taken (Driver Verifier's deadlock detection).
    pub lock_order: super::deadlock::LockOrder,
    /// How long a wait made at unload on the driver's behalf may last before the machine stops
    /// (`Machine::set_unload_wait_limit`), in milliseconds.
    pub unload_wait_limit_ms: AtomicU64,
    /// Threads blocked in `KeWaitForSingleObject` with no timeout, by simulated thread id: what
    /// a wait at unload that gave up reports as blocking it.
    pub waiters: Mutex<FxHashMap<u64, Waiter>>,
    /// The DPC watchdog: how long each thread has been at `DISPATCH_LEVEL` or above, and the
    /// limit (`watchdog.rs`).
    pub watchdog: super::watchdog::Watchdog,
    /// Kernel timers and the DPC queue (`timer.rs`).
    pub timers: super::timer::Timers,
    /// How many system worker and classifying threads are blocked in waits (`blocked.rs`).
    pub blocked: super::blocked::BlockedThreads,
    /// Injection handles and cloned net buffer lists (`inject.rs`).
    pub inject: super::inject::Injections,
    /// The scheduler of a deterministic machine (`sched.rs`); `None` in real-threads mode,
    /// where every context is a host thread the host schedules.
    pub sched: Option<Box<super::sched::Scheduler>>,
}

/// When a wait gives up: a host instant in real-threads mode, an interrupt time (100-ns ticks)
/// on a deterministic machine's virtual clock.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    Host(std::time::Instant),
    Virtual(u64),
}

/// A thread blocked in a wait.
pub(crate) struct Waiter {
    /// The object it waits on.
    pub object: usize,
    pub routine: Option<Routine>,
    pub thread: String,
}

/// The default of [`Kernel::unload_wait_limit_ms`]: 30 s, far beyond any unload that makes
/// progress, short enough that a hung test reports instead of hanging.
pub(crate) const DEFAULT_UNLOAD_WAIT_LIMIT_MS: u64 = 30_000;

/// The default of [`Kernel::debug_filter_mask`]: every level. Windows' default is 0 (with the
/// `WIN2000` mask's 0x1, only `DPFLTR_ERROR_LEVEL` messages go out); a simulated machine is a
/// test machine whose masks were set, so tests read every line a driver prints.
pub(crate) const DEFAULT_DEBUG_FILTER_MASK: u32 = u32::MAX;

/// The `WIN2000` filter mask: levels every component's messages go out at, whatever its own
/// mask. Windows' default, 0x1 (`DPFLTR_ERROR_LEVEL`), fixed in the simulator.
const WIN2000_FILTER_MASK: u32 = 0x1;

/// Whether a message of `level` passes a component filter mask of `mask`: a level up to 31 is
/// a bit number, a larger one the bits themselves (Microsoft's "Reading and Filtering
/// Debugging Messages"); a message goes out if one of its bits is in the component's mask or
/// in the `WIN2000` mask.
fn debug_level_passes(mask: u32, level: ULONG) -> bool {
    let bits = if level <= 31 { 1 << level } else { level };
    bits & (mask | WIN2000_FILTER_MASK) != 0
}

/// The driver code a thread is running, for the stop report ("in classifyFn of callout 3 of
/// driver firewall").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Routine {
    /// What is running: `DriverEntry`, `DriverUnload`, `classifyFn`, `a work item routine`, ...
    pub kind: RoutineKind,
    /// The driver object whose code it is (0: none).
    pub driver: usize,
    /// Which one: the callout id, the work item routine's address, the IRP major function.
    pub object: usize,
}

/// The kinds of [`Routine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoutineKind {
    DriverEntry,
    DriverUnload,
    /// The I/O manager's checks after a driver's unload routine returned (or its DriverEntry
    /// failed): waiting for its work item routines, looking for what it left behind.
    AfterUnload,
    WorkItem,
    /// A DPC routine (a timer's, or one queued with `KeInsertQueueDpc`), at `DISPATCH_LEVEL`.
    Dpc,
    /// A callout callback: `classifyFn`, `notifyFn`, `flowDeleteFn`.
    Callout(&'static str),
    Dispatch,
    Cancel,
    /// A filter-manager port callback: `ConnectNotify`, `DisconnectNotify`, ...
    Port(&'static str),
    /// Test harness code entered through a `Machine` method (the method's name).
    Harness(&'static str),
}

impl Routine {
    pub(crate) const fn new(kind: RoutineKind, driver: usize, object: usize) -> Routine {
        Routine {
            kind,
            driver,
            object,
        }
    }

    /// Whether a wait in this routine is one the I/O manager's load or unload of a driver waits
    /// on: bounded by the machine's unload wait limit.
    pub(crate) fn is_load_or_unload(self) -> bool {
        matches!(
            self.kind,
            RoutineKind::DriverEntry | RoutineKind::DriverUnload
        )
    }
}

static NEXT_THREAD_ID: AtomicU64 = AtomicU64::new(1);

/// What a simulated processor knows about the thread running on it.
pub(crate) struct ThreadState {
    pub kernel: RefCell<Option<Arc<Kernel>>>,
    pub irql: Cell<KIRQL>,
    /// The work item whose routine this thread is running (0: none).
    pub work_item: Cell<usize>,
    pub id: u64,
    /// The driver routine this thread runs, innermost (for the stop report).
    pub routine: Cell<Option<Routine>>,
    /// The spin locks this processor holds, in the order it took them.
    pub held_locks: RefCell<Vec<usize>>,
    /// Spin locks in the lock-order graph that live on this thread's stack; forgotten when the
    /// frame that holds them returns (see `with_context`).
    pub stack_locks: RefCell<Vec<usize>>,
    /// The address of a local in the outermost `with_context` frame on this thread (0: none):
    /// locks between the current stack pointer and it live on this thread's stack.
    pub stack_anchor: Cell<usize>,
    /// This thread's stay at `DISPATCH_LEVEL` or above, for the DPC watchdog; see
    /// `watchdog::track`.
    pub watch: super::watchdog::ThreadWatch,
}

thread_local! {
    pub(crate) static THREAD: ThreadState = ThreadState {
        kernel: RefCell::new(None),
        irql: Cell::new(PASSIVE_LEVEL),
        work_item: Cell::new(0),
        id: NEXT_THREAD_ID.fetch_add(1, Ordering::Relaxed),
        routine: Cell::new(None),
        held_locks: RefCell::new(Vec::new()),
        stack_locks: RefCell::new(Vec::new()),
        stack_anchor: Cell::new(0),
        watch: super::watchdog::ThreadWatch::default(),
    };
}

impl Kernel {
    /// A machine with `workers` system worker threads; with a seed, a deterministic one
    /// (`sched.rs`) whose first task is the calling thread.
    pub(crate) fn new(workers: usize, seed: Option<u64>) -> Arc<Kernel> {
        super::bugcheck::install_driver_panic_hook();
        let kernel = Arc::new(Kernel {
            state: Mutex::new(State::default()),
            faults: Mutex::new(Faults::default()),
            global_pool: Mutex::new(FxHashMap::default()),
            work_ready: Condvar::new(),
            work_done: Condvar::new(),
            event_lock: Mutex::new(()),
            event_signal: Condvar::new(),
            echo_debug: std::env::var_os("WFP_SIM_ECHO").is_some(),
            debug_filter_mask: AtomicU32::new(DEFAULT_DEBUG_FILTER_MASK),
            wait_spin: super::spin::Spinner::default(),
            established_flows: Mutex::new(FxHashMap::default()),
            next_flow: AtomicU64::new(FIRST_FLOW_HANDLE),
            workers: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            wfp: Mutex::new(super::wfp::Bfe::default()),
            wfp_idle: Condvar::new(),
            wfp_txn: Condvar::new(),
            flt: super::flt::FilterManager::default(),
            wfp_pend: std::array::from_fn(|_| Condvar::new()),
            wfp_pend_wait: super::spin::WaitSite::default(),
            irp: super::irp::IoManager::default(),
            clock_start: std::time::Instant::now(),
            clock_offset: AtomicU64::new(0),
            lock_order: super::deadlock::LockOrder::default(),
            unload_wait_limit_ms: AtomicU64::new(DEFAULT_UNLOAD_WAIT_LIMIT_MS),
            waiters: Mutex::new(FxHashMap::default()),
            watchdog: super::watchdog::Watchdog::default(),
            timers: super::timer::Timers::default(),
            blocked: super::blocked::BlockedThreads::default(),
            registry: super::registry::Registry::default(),
            inject: super::inject::Injections::default(),
            sched: seed.map(super::sched::Scheduler::new),
        });
        let mut handles = Vec::with_capacity(workers);
        for index in 0..workers {
            let handle = kernel
                .spawn_context(
                    format!("sim-worker-{index}"),
                    super::io::worker_thread,
                    false,
                )
                .expect("the host could not start a simulator worker thread");
            handles.push(handle);
        }
        handles.push(
            kernel
                .spawn_context("sim-dpc".to_owned(), super::timer::dpc_thread, true)
                .expect("the host could not start the simulator's DPC thread"),
        );
        *kernel.workers.lock().unwrap() = handles;
        kernel
    }

    /// Starts a host thread for one of the machine's own contexts (a system worker thread, the
    /// DPC thread); on a deterministic machine it is a task of the scheduler.
    fn spawn_context(
        self: &Arc<Kernel>,
        name: String,
        body: fn(Arc<Kernel>),
        timer_thread: bool,
    ) -> std::io::Result<JoinHandle<()>> {
        let task = self.sched.as_ref().map(|s| s.add(&name, timer_thread));
        let kernel = Arc::clone(self);
        std::thread::Builder::new().name(name).spawn(move || {
            let Some(task) = task else {
                return body(kernel);
            };
            let sched = Arc::clone(&kernel);
            let sched = sched
                .sched
                .as_deref()
                .expect("a task of a deterministic machine");
            sched.attach(task);
            let _finish = super::sched::FinishOnDrop(sched);
            body(kernel);
        })
    }

    /// A deadline `wait` from now, on the machine's clock for waits (see [`Deadline`]).
    pub(crate) fn deadline_in(&self, wait: std::time::Duration) -> Deadline {
        match &self.sched {
            None => {
                let now = std::time::Instant::now();
                // A wait too long for the host's clock is one no test outlives.
                let far = core::time::Duration::from_secs(1 << 32);
                Deadline::Host(now.checked_add(wait).unwrap_or(now + far))
            }
            Some(sched) => {
                let ticks = u64::try_from(wait.as_nanos() / 100).unwrap_or(u64::MAX);
                Deadline::Virtual(sched.now().saturating_add(ticks))
            }
        }
    }

    /// Whether `deadline` has passed.
    pub(crate) fn has_passed(&self, deadline: Deadline) -> bool {
        match deadline {
            Deadline::Host(at) => std::time::Instant::now() >= at,
            Deadline::Virtual(at) => self.interrupt_time() >= at,
        }
    }

    /// A yield point of a deterministic machine: the scheduler may run another context here
    /// (`label` says what the caller did). Nothing in real-threads mode. The caller must hold
    /// none of the simulator's locks.
    #[inline]
    pub(crate) fn yield_point(&self, label: &'static str) {
        if let Some(sched) = &self.sched {
            sched.point(label);
        }
    }

    /// The one way the simulator's contexts wait: until `waiting` (called with `mutex` held)
    /// returns false, or `deadline` passes; returns the guard and whether the deadline passed.
    /// In real-threads mode it waits on `condvar` (whoever changes what `waiting` reads
    /// notifies it); on a deterministic machine it hands the scheduler the baton instead
    /// (`label` names the wait in the schedule), and the deadline is on the virtual clock.
    pub(crate) fn wait_while<'a, T>(
        &self,
        mutex: &'a Mutex<T>,
        mut guard: MutexGuard<'a, T>,
        condvar: &Condvar,
        deadline: Option<Deadline>,
        label: &'static str,
        mut waiting: impl FnMut(&mut T) -> bool,
    ) -> (MutexGuard<'a, T>, bool) {
        if let Some(sched) = &self.sched {
            return self.wait_scheduled(sched, mutex, guard, condvar, deadline, label, waiting);
        }
        loop {
            if !waiting(&mut guard) {
                return (guard, false);
            }
            guard = match deadline {
                None => condvar.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = match deadline {
                        Deadline::Host(at) => {
                            at.saturating_duration_since(std::time::Instant::now())
                        }
                        Deadline::Virtual(_) => {
                            unreachable!("virtual deadlines are a deterministic machine's")
                        }
                    };
                    if left.is_zero() {
                        return (guard, true);
                    }
                    condvar
                        .wait_timeout(guard, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// One wait of a loop that checks its own condition (and may change state between
    /// waits): returns when woken, maybe spuriously, or at `deadline`; the caller checks the
    /// time. Prefer [`wait_while`](Self::wait_while), which tells a deterministic machine
    /// exactly when the wait ended; here the scheduler infers it (`sched.rs`, `block`).
    pub(crate) fn wait_once<'a, T>(
        &self,
        mutex: &'a Mutex<T>,
        guard: MutexGuard<'a, T>,
        condvar: &Condvar,
        deadline: Option<Deadline>,
        label: &'static str,
    ) -> MutexGuard<'a, T> {
        match (&self.sched, deadline) {
            (None, None) => condvar.wait(guard).unwrap_or_else(|p| p.into_inner()),
            (None, Some(deadline)) => {
                let left = match deadline {
                    Deadline::Host(at) => at.saturating_duration_since(std::time::Instant::now()),
                    Deadline::Virtual(_) => {
                        unreachable!("virtual deadlines are a deterministic machine's")
                    }
                };
                condvar
                    .wait_timeout(guard, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            (Some(sched), _) if sched.is_released() => {
                condvar
                    .wait_timeout(guard, std::time::Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            (Some(sched), deadline) => {
                let wake_at = deadline.map(|d| match d {
                    Deadline::Virtual(at) => at,
                    Deadline::Host(_) => sched.now(),
                });
                drop(guard);
                sched.block(label, wake_at);
                mutex.lock().unwrap_or_else(|p| p.into_inner())
            }
        }
    }

    /// [`wait_while`](Self::wait_while) on a deterministic machine. Once the machine shuts
    /// down (the scheduler released its tasks), it polls `condvar` instead: the notifications
    /// made while the tasks waited on the scheduler went to nobody.
    #[allow(clippy::too_many_arguments)]
    fn wait_scheduled<'a, T>(
        &self,
        sched: &super::sched::Scheduler,
        mutex: &'a Mutex<T>,
        mut guard: MutexGuard<'a, T>,
        condvar: &Condvar,
        deadline: Option<Deadline>,
        label: &'static str,
        mut waiting: impl FnMut(&mut T) -> bool,
    ) -> (MutexGuard<'a, T>, bool) {
        loop {
            if !waiting(&mut guard) {
                sched.progressed();
                return (guard, false);
            }
            if deadline.is_some_and(|d| self.has_passed(d)) {
                sched.progressed();
                return (guard, true);
            }
            if sched.is_released() {
                guard = condvar
                    .wait_timeout(guard, std::time::Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let wake_at = deadline.map(|d| match d {
                Deadline::Virtual(at) => at,
                // Made before the machine was deterministic: none are.
                Deadline::Host(_) => sched.now(),
            });
            drop(guard);
            sched.block(label, wake_at);
            guard = mutex.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether the next pool allocation is one the harness asked to fail.
    pub(crate) fn injected_failure(&self) -> bool {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        while faults.count == 0 {
            // Popping never allocates: the allocator may be the caller.
            let Some((skip, count)) = faults.later.pop() else {
                return false;
            };
            faults.skip = skip;
            faults.count = count;
        }
        if faults.skip > 0 {
            faults.skip -= 1;
            return false;
        }
        faults.count -= 1;
        true
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a harness thread panicked while holding it; the state is still
        // consistent for the bookkeeping done here.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The interrupt time, in 100-ns ticks: real time since the machine started (so it moves
    /// on while the machine sleeps, as interrupt time does) plus the harness's offset.
    pub(crate) fn interrupt_time(&self) -> u64 {
        if let Some(sched) = &self.sched {
            return sched.now();
        }
        // Offset first: of two reads ordered by happens-before, the later sees an offset and an
        // elapsed time at least as large, so the sum never goes back.
        let offset = self.clock_offset.load(Ordering::SeqCst);
        let elapsed = self.clock_start.elapsed().as_nanos() / 100;
        u64::try_from(elapsed)
            .unwrap_or(u64::MAX)
            .saturating_add(offset)
    }

    /// Moves the clock forward by `ticks` (100 ns each), saturating.
    pub(crate) fn advance_clock(&self, ticks: u64) {
        if let Some(sched) = &self.sched {
            sched.advance(ticks);
            self.timers.clock_changed();
            return;
        }
        let _ = self
            .clock_offset
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |offset| {
                Some(offset.saturating_add(ticks))
            });
        self.timers.clock_changed();
    }

    /// How long a wait at load or unload may last (`Machine::set_unload_wait_limit`).
    pub(crate) fn unload_wait_limit(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.unload_wait_limit_ms.load(Ordering::Relaxed))
    }

    /// The deadline of a wait with no timeout that starts now on this thread: bounded by the
    /// unload wait limit while the thread runs `DriverEntry` or an unload routine, `None`
    /// (forever) otherwise.
    pub(crate) fn load_or_unload_deadline(&self) -> Option<Deadline> {
        current_routine()
            .filter(|r| r.is_load_or_unload())
            .map(|_| self.deadline_in(self.unload_wait_limit()))
    }

    /// One line per thread (other than this one) blocked in a wait with no timeout: which, in
    /// what routine, on what object.
    pub(crate) fn blocked_threads(&self) -> Vec<String> {
        let me = thread_id();
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let mut blocked: Vec<(u64, &Waiter)> = waiters
            .iter()
            .filter(|&(&id, _)| id != me)
            .map(|(&id, w)| (id, w))
            .collect();
        blocked.sort_by_key(|&(id, _)| id);
        blocked
            .into_iter()
            .map(|(_, waiter)| {
                let routine = waiter.routine.map_or_else(
                    || "harness code".to_owned(),
                    super::bugcheck::describe_routine,
                );
                format!(
                    "blocked: thread {} in {routine}, waiting (no timeout) on {:#x}",
                    waiter.thread, waiter.object
                )
            })
            .collect()
    }

    /// The routine of a work item of `driver` that is blocked in a wait with no timeout (0:
    /// none known).
    pub(crate) fn blocked_work_routine_of(&self, driver: usize) -> usize {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|w| w.routine)
            .find(|r| r.kind == RoutineKind::WorkItem && r.driver == driver)
            .map_or(0, |r| r.object)
    }

    /// Stops the machine because a wait made at load or unload gave up: `what` says what was
    /// waited for. Lists the threads blocked in a wait and the work item routines of the driver
    /// that have not returned. The caller must not hold the state lock.
    pub(crate) fn unload_wait_expired(&self, driver: usize, params: [usize; 4], what: &str) -> ! {
        let limit = self.unload_wait_limit();
        let routine = current_routine().map_or_else(
            || "the I/O manager's unload".to_owned(),
            super::bugcheck::describe_routine,
        );
        let running = self.lock().running_work.get(&driver).copied().unwrap_or(0);
        let mut details = Vec::new();
        if running > 0 {
            details.push(format!(
                "{running} work item routine(s) of this driver have not returned"
            ));
        }
        details.extend(self.blocked_threads());
        super::bugcheck::stop_with_details(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            params,
            &format!(
                "{routine} waited {:.1} s for {what}, and gave up (on Windows: unload hangs; Machine::set_unload_wait_limit sets the limit)",
                limit.as_secs_f64()
            ),
            &details.join("\n"),
        )
    }

    /// Stops the worker threads (the harness's `Machine` drop).
    pub(crate) fn shut_down(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.lock().shutdown = true;
        self.work_ready.notify_all();
        // From here on every task of a deterministic machine runs free (and is not traced):
        // the workers must see the shutdown and return, whoever the seed would have picked.
        if let Some(sched) = &self.sched {
            sched.release();
        }
        let handles = std::mem::take(&mut *self.workers.lock().unwrap());
        // A worker blocked in a work item routine never sees the shutdown: wait for the workers
        // at most the unload wait limit, then leave the blocked ones behind and say so (unless
        // the test is failing already).
        let deadline = std::time::Instant::now() + self.unload_wait_limit();
        let mut state = self.lock();
        while handles.iter().any(|h| !h.is_finished()) && std::time::Instant::now() < deadline {
            // Worker threads notify `work_done` after each item; the timeout bounds the wait for
            // a worker that is already returning (it notifies nothing).
            state = self
                .work_done
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(state);
        let mut stuck = 0;
        for handle in handles {
            if handle.thread().id() == std::thread::current().id() {
                continue;
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 && !std::thread::panicking() {
            let mut report = self.blocked_threads();
            report.insert(
                0,
                format!(
                    "wfp-rs simulator: the machine was dropped while {stuck} system worker thread(s) still ran a work item routine after {:.1} s (Machine::set_unload_wait_limit); unload the driver, or end its work, before dropping the machine",
                    self.unload_wait_limit().as_secs_f64()
                ),
            );
            panic!("{}", report.join("\n"));
        }
    }
}

/// The machine this thread runs in. Kernel functions called outside a machine are a harness
/// mistake, not a driver bug, so they panic with instructions rather than bugcheck.
pub(crate) fn current() -> Arc<Kernel> {
    THREAD
        .with(|t| t.kernel.borrow().clone())
        .unwrap_or_else(|| {
            panic!(
                "wfp-rs simulator: a kernel function was called on a thread that is not running in \
             a simulated machine; wrap the code in `Machine::run` (or load it as a driver)"
            )
        })
}

pub(crate) fn irql() -> KIRQL {
    THREAD.with(|t| t.irql.get())
}

pub(crate) fn set_irql(irql: KIRQL) {
    THREAD.with(|t| {
        t.irql.set(irql);
        super::watchdog::track(t);
    });
}

pub(crate) fn thread_id() -> u64 {
    THREAD.with(|t| t.id)
}

/// What code this thread runs, for charging pool to drivers and for the global allocator
/// (`global_alloc.rs`), which reads it on every allocation. Kept apart from [`THREAD`] because
/// it must be readable from inside the allocator at any time, thread teardown included: a
/// `const` initialiser and a `Copy` value without `Drop` make the thread-local a plain TLS slot,
/// with no lazy initialisation that could allocate and no destructor after which it is gone.
#[derive(Clone, Copy)]
pub(crate) struct Running {
    /// The driver object whose code runs, or on whose behalf the kernel runs (0: the kernel or
    /// the test harness on their own).
    pub driver: usize,
    /// The machine this thread is in (null: none); valid while [`with_context`] holds it.
    pub kernel: *const Kernel,
    /// Set while a simulated kernel routine (or the simulator's own code) runs, also when a
    /// driver called it: its allocations are the kernel's, not the driver's.
    pub in_kernel: bool,
}

thread_local! {
    pub(crate) static RUNNING: Cell<Running> = const {
        Cell::new(Running { driver: 0, kernel: core::ptr::null(), in_kernel: false })
    };
}

pub(crate) fn running() -> Running {
    RUNNING.with(Cell::get)
}

/// The driver object this thread runs code of, or runs kernel code for (0: none).
pub(crate) fn current_driver() -> usize {
    running().driver
}

/// Marks this thread as running kernel code until dropped: the simulator's allocations in it
/// come from the host, never from the calling driver's pool (nor from its injected failures).
/// Every simulated kernel routine takes one first; a call back into the driver
/// ([`with_context`], `wfp::in_driver`) lifts it for the driver's code.
#[must_use]
pub(crate) struct KernelCode {
    was_in_kernel: bool,
}

impl KernelCode {
    /// Kernel code starts: a routine the driver called (so the driver handled any allocation
    /// failure before), or the simulator's own code. A thread that has been at `DISPATCH_LEVEL`
    /// longer than the DPC watchdog allows stops here (`watchdog.rs`).
    pub(crate) fn enter() -> KernelCode {
        super::global_alloc::forget_failure();
        let code = KernelCode::for_allocator();
        super::watchdog::check_current();
        code
    }

    /// The global allocator's own bookkeeping, which says nothing about what the driver handled.
    pub(crate) fn for_allocator() -> KernelCode {
        let was_in_kernel = RUNNING.with(|r| {
            let mut now = r.get();
            let was = now.in_kernel;
            now.in_kernel = true;
            r.set(now);
            was
        });
        KernelCode { was_in_kernel }
    }
}

impl Drop for KernelCode {
    fn drop(&mut self) {
        RUNNING.with(|r| {
            let mut now = r.get();
            now.in_kernel = self.was_in_kernel;
            r.set(now);
        });
    }
}

/// Runs driver code (`f`) of `driver` on this thread, then restores what ran before: the
/// driver's allocations in `f` are its pool, even when a kernel routine calls it.
pub(crate) fn as_driver<R>(driver: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Running);
    impl Drop for Restore {
        fn drop(&mut self) {
            super::global_alloc::forget_failure();
            RUNNING.with(|r| r.set(self.0));
        }
    }
    let _restore = RUNNING.with(|r| {
        let previous = r.get();
        r.set(Running {
            driver,
            in_kernel: false,
            ..previous
        });
        Restore(previous)
    });
    f()
}

/// A thread already inside a machine enters a new context only as the kernel does: never from
/// the driver's own code (a test harness function — `Machine::run`, `classify`, `load_driver` —
/// called from a callback through a `Machine` the driver kept would run the rest at
/// `PASSIVE_LEVEL` as harness code, with the driver's spin lock still held), and never at a
/// lower IRQL than the thread's (nothing on Windows lowers the IRQL under running code). Both
/// are harness misuse, so they panic, as nested token scopes do.
fn refuse_reentry_from_driver_code(irql: KIRQL) {
    let (inside, now) = THREAD.with(|t| (t.kernel.borrow().is_some(), t.irql.get()));
    if !inside {
        return;
    }
    let current = running();
    if current.driver != 0 && !current.in_kernel {
        panic!(
            "a wfp_rs_sim::Machine function was called from driver code: the test harness \
             (Machine::run, at_passive, at_dispatch, classify, load_driver, ...) drives a \
             machine from outside it; a driver cannot use it to leave its IRQL or its routine"
        );
    }
    if irql < now {
        panic!(
            "a wfp_rs_sim::Machine function would run code at IRQL {irql} on a thread at IRQL \
             {now}: nothing lowers the IRQL under running code; call it outside at_dispatch"
        );
    }
}

/// Runs `f` with this thread entered into `kernel` at `irql`, charged to `driver`, and restores
/// the thread's previous state afterwards. With a driver, `f` runs as that driver's code: what
/// it allocates through the global allocator is the driver's pool (`global_alloc.rs`). Spin
/// locks on the stack of the frames `f` ran in are gone when it returns, so the lock-order graph
/// forgets them (their addresses will be reused).
pub(crate) fn with_context<R>(
    kernel: &Arc<Kernel>,
    irql: KIRQL,
    driver: usize,
    f: impl FnOnce() -> R,
) -> R {
    refuse_reentry_from_driver_code(irql);
    if let Some(sched) = &kernel.sched {
        sched.require_task();
    }
    struct Restore {
        kernel: Option<Arc<Kernel>>,
        irql: KIRQL,
        running: Running,
        /// The address of a local of this frame: the callee's stack lies below it.
        frame: usize,
        outermost: bool,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // The allocator's view first: it must not point at a machine this thread may be
            // about to release.
            super::global_alloc::forget_failure();
            RUNNING.with(|r| r.set(self.running));
            THREAD.with(|t| {
                let has_stack_locks = !t.stack_locks.borrow().is_empty();
                if has_stack_locks && let Some(kernel) = t.kernel.borrow().as_ref() {
                    super::deadlock::forget_stack_below(kernel, t, self.frame);
                }
                *t.kernel.borrow_mut() = self.kernel.take();
                t.irql.set(self.irql);
                super::watchdog::track(t);
                if self.outermost {
                    t.stack_anchor.set(0);
                }
            });
        }
    }
    let marker = 0u8;
    let frame = core::ptr::addr_of!(marker) as usize;
    let _restore = THREAD.with(|t| {
        let outermost = t.stack_anchor.get() == 0;
        if outermost {
            t.stack_anchor.set(frame);
        }
        let previous = Restore {
            kernel: t.kernel.replace(Some(Arc::clone(kernel))),
            irql: t.irql.get(),
            running: running(),
            frame,
            outermost,
        };
        t.irql.set(irql);
        super::watchdog::track(t);
        previous
    });
    // Driver code when a driver is given; harness code (which allocates from the host) when not.
    RUNNING.with(|r| {
        r.set(Running {
            driver,
            kernel: Arc::as_ptr(kernel),
            in_kernel: false,
        });
    });
    f()
}

/// Runs `f` as `routine` (what the stop report says the thread was running), and restores the
/// previous routine afterwards.
pub(crate) fn with_routine<R>(routine: Routine, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Routine>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| {
                t.routine.set(self.0);
                super::watchdog::routine_changed(t);
            });
        }
    }
    let _restore = Restore(THREAD.with(|t| {
        let previous = t.routine.replace(Some(routine));
        super::watchdog::routine_changed(t);
        previous
    }));
    f()
}

/// The routine this thread runs, innermost.
pub(crate) fn current_routine() -> Option<Routine> {
    THREAD.with(|t| t.routine.get())
}

/// The verifier's IRQL check at the top of every simulated routine: calling `routine` above
/// `max` stops the machine with `IRQL_NOT_LESS_OR_EQUAL`, parameters as the debugger shows them
/// (address, IRQL, operation, instruction): here 0, the current IRQL, 8 (execute: the routine
/// is pageable code, or requires a wait), 0. The maximum is in the explanation.
pub(crate) fn require_irql(routine: &str, max: KIRQL) {
    require_irql_at(routine, irql(), max);
}

/// [`require_irql`] for a caller that has read the IRQL (`now`) already.
pub(crate) fn require_irql_at(routine: &str, now: KIRQL, max: KIRQL) {
    if now > max {
        stop(
            BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
            [0, now as usize, 8, 0],
            &format!(
                "{routine} was called at IRQL {now} ({}); its maximum is {max} ({})",
                level_name(now),
                level_name(max)
            ),
        );
    }
}

pub(crate) fn level_name(irql: KIRQL) -> &'static str {
    wfp_rs::irql::Irql(irql).name().unwrap_or("device level")
}

/// `DbgPrintEx`. The simulator formats exactly what the safe layer passes: the format `%.*s`
/// followed by a length and a pointer to the text. Any other format is recorded verbatim. A
/// message the machine's filter mask does not let through is dropped, as Windows drops it.
///
/// # Safety
///
/// `Format` must be a NUL-terminated string; for `%.*s`, `Text` must point to `Length` bytes.
pub unsafe extern "system" fn DbgPrintEx(
    ComponentId: ULONG,
    Level: ULONG,
    Format: PCSTR,
    Length: i32,
    Text: *const u8,
) -> ULONG {
    let _kernel = KernelCode::enter();
    // One mask for every component: drivers print under `DPFLTR_IHVDRIVER_ID`.
    let _ = ComponentId;
    let kernel = current();
    if !debug_level_passes(kernel.debug_filter_mask.load(Ordering::Relaxed), Level) {
        return 0;
    }
    // SAFETY: the caller passes a NUL-terminated format string.
    let format = unsafe { core::ffi::CStr::from_ptr(Format.cast()) };
    let text = if format.to_bytes() == b"%.*s" {
        let len = usize::try_from(Length).unwrap_or(0);
        // SAFETY: for `%.*s` the caller passes `Length` readable bytes at `Text`.
        let bytes = unsafe { core::slice::from_raw_parts(Text, len) };
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        format.to_string_lossy().into_owned()
    };
    if kernel.echo_debug {
        eprint!("{text}");
    }
    kernel.lock().debug.push(text);
    0
}

/// `DbgQueryDebugFilterState`: `TRUE` if `DbgPrintEx` sends messages of `Level` now (the
/// machine's filter mask, `Machine::set_debug_filter_mask`, for every component), else
/// `FALSE`. At any IRQL (INFERRED: `DbgPrintEx`, callable at any IRQL, applies the same masks).
pub extern "system" fn DbgQueryDebugFilterState(ComponentId: ULONG, Level: ULONG) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    let _ = ComponentId;
    let mask = current().debug_filter_mask.load(Ordering::Relaxed);
    NTSTATUS::from(if debug_level_passes(mask, Level) {
        TRUE
    } else {
        FALSE
    })
}

/// `KeQueryInterruptTimePrecise`: the machine's interrupt time in 100-ns units, at any IRQL. The
/// performance-counter value written to `QpcTimeStamp` is the same count (a 10 MHz counter, the
/// frequency current Windows versions report).
///
/// # Safety
///
/// `QpcTimeStamp` must be valid for a write of a `ULONG64`. A null pointer stops the machine
/// with `KMODE_EXCEPTION_NOT_HANDLED` (the kernel would fault writing to it).
pub unsafe extern "system" fn KeQueryInterruptTimePrecise(QpcTimeStamp: *mut ULONG64) -> ULONG64 {
    let _kernel = KernelCode::enter();
    let now = current().interrupt_time();
    if QpcTimeStamp.is_null() {
        stop(
            BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
            [0xC000_0005, 0, 1, 0],
            "KeQueryInterruptTimePrecise: QpcTimeStamp is null; the kernel writes the counter value through it (an access violation in kernel mode)",
        );
    }
    // SAFETY: the caller passes a pointer valid for a ULONG64 write, and it is not null.
    unsafe { QpcTimeStamp.write(now) };
    now
}
