//! # wfp-rs-sim
//!
//! The Windows kernel, implemented in Rust, for testing [wfp-rs](wfp_rs) callout drivers on any
//! host: boot a simulated machine, load a driver into it, drive it, and check that it unloads
//! clean — on Linux, in `cargo test`.
//!
//! The simulator implements the kernel functions of [`wfp_rs::sys`] in Rust; the driver code, the
//! SDK's trampolines and the `#[repr(C)]` structures are the ones that run on Windows. Where
//! Windows (with Driver Verifier) would bugcheck, the simulator stops the process with the same
//! stop code; [`run_isolated`] runs such a scenario in a child process so a test can assert the
//! stop code ([`bugcheck_test!`] declares such a test).
//!
//! A driver's tests depend on it; the driver does not:
//!
//! ```toml
//! [dev-dependencies]
//! wfp-rs-sim = "0.1"
//! ```
//!
//! ```
//! use wfp_rs::irql::Irql;
//! use wfp_rs_sim::Machine;
//!
//! let machine = Machine::new();
//! let seen = machine.at_dispatch(|_irql| Irql::current());
//! assert_eq!(seen, Irql::DISPATCH);
//! ```
//!
//! The first [`Machine`] installs the simulated kernel as the one `wfp_rs::sys` calls (a table of
//! functions, see the repository's `docs/simulator.md`); kernel code that runs with no
//! simulator in the process panics with a message that says to add this crate. Besides the
//! machine, the crate sets the process's global allocator (so a driver's `Box` and `Vec` are
//! pool, leak-checked at unload) and a panic hook (a panic in driver code stops the machine with
//! `KMODE_EXCEPTION_NOT_HANDLED`, as the driver's panic handler stops Windows).
//!
//! The simulator runs where wfp-rs selects its simulator backend: on every host but Windows, and
//! on Windows with the feature `sim` (of this crate, which enables wfp-rs's). Compiled for
//! Windows without it, this crate is empty.

#![cfg(any(not(windows), feature = "sim"))]

// The kernel functions keep their C names and parameter names, as in `wfp_rs::sys`.
#[allow(non_snake_case)]
mod kernel;
pub mod prop;

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::fmt;
use std::process::Command;
use std::sync::Arc;

use std::sync::atomic::Ordering;

use wfp_rs::bugcheck::{BugCheckCode, verifier};
use wfp_rs::irql::{DispatchLevel, Irql, PassiveLevel};
use wfp_rs::pool::PoolTag;
use wfp_rs::status::Status;
use wfp_rs::sys::*;

use crate::kernel::bugcheck::{AT_PREFIX, IN_PREFIX, STOP_PREFIX, stop};
pub use crate::kernel::sched::{SEED_VARIABLE, ScheduleFingerprint, ScheduleStep};
pub use crate::kernel::spin::WaitSpin;
use crate::kernel::state::{
    self as state, DriverRecord, Kernel, Routine, RoutineKind, WorkItemState,
};

#[doc(hidden)]
pub mod __private {
    pub use wfp_rs::bugcheck::BugCheckCode;
}

/// The tag of the pool blocks driver code takes through the global allocator (`Box`, `Vec`,
/// `Arc`, ...) in the simulator, as [`Machine::pool_blocks`] and the unload leak report show
/// them. (On Windows they carry the tag the driver gave its
/// [`PoolAllocator`](wfp_rs::pool::PoolAllocator); the simulator's allocator is shared by every
/// driver in the process, so it cannot know that tag.)
pub const GLOBAL_ALLOCATOR_TAG: PoolTag = PoolTag::new(b"Rust");

/// Runs `f` as harness code even when called from a driver's code: what `f` allocates through
/// the global allocator comes from the host, not the driver's pool, and fault injection does not
/// touch it. For test instrumentation that driver code calls — a log the test reads afterwards,
/// a counter map — which would otherwise be charged to the driver, and reported as its leak at
/// unload if the test still holds it. Driver code proper must never need it.
///
/// ```
/// use std::sync::Mutex;
/// static LOG: Mutex<Vec<&str>> = Mutex::new(Vec::new());
/// // In a callback of a driver under test:
/// wfp_rs_sim::as_harness(|| LOG.lock().unwrap().push("classify"));
/// # assert_eq!(LOG.lock().unwrap().len(), 1);
/// ```
pub fn as_harness<R>(f: impl FnOnce() -> R) -> R {
    let _harness = state::KernelCode::enter();
    f()
}

/// The signature of a driver's `DriverEntry`, which the `#[driver_entry]` attribute generates.
pub type DriverEntryFn =
    unsafe extern "system" fn(*mut DRIVER_OBJECT, *const UNICODE_STRING) -> NTSTATUS;

/// One simulated machine: processors (the threads that enter it), a pool, an I/O manager and
/// system worker threads. Machines are independent, so tests can run in parallel.
pub struct Machine {
    kernel: Arc<Kernel>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine::new()
    }
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine").finish_non_exhaustive()
    }
}

/// A driver loaded into a [`Machine`]; pass it to [`Machine::unload_driver`].
#[derive(Debug)]
#[must_use = "a loaded driver should be unloaded so the simulator can check for leaks"]
pub struct LoadedDriver {
    object: usize,
    name: String,
}

impl LoadedDriver {
    /// The name the driver was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A [`WorkQueue`](wfp_rs::work_item::WorkQueue) handle of a driver built with
    /// `#[driver_entry]` (`None` for other drivers), to queue work on its behalf from a test.
    /// Drop it before unloading: unload waits for every handle (and stops the machine with 0xCE
    /// after [`Machine::set_unload_wait_limit`] if one is still alive).
    pub fn work_queue(&self, machine: &Machine) -> Option<wfp_rs::work_item::WorkQueue> {
        machine.run(|| wfp_rs::__sim::work_queue_of(self.driver_object()))
    }

    /// Runs `f` as the driver's own code at `PASSIVE_LEVEL`, with its [`Driver`] handle, so a test
    /// can register callouts or queue work for it. `None` if the driver was not built with
    /// `#[driver_entry]`. Whatever `f` creates (registrations, handles) must be gone before
    /// unload, as for the driver's own state.
    ///
    /// [`Driver`]: wfp_rs::driver::Driver
    pub fn run_in_driver<R>(
        &self,
        machine: &Machine,
        f: impl FnOnce(&mut PassiveLevel<'_>, &mut wfp_rs::driver::Driver<'_>) -> R,
    ) -> Option<R> {
        let path = {
            let mut state = machine.kernel.lock();
            let record = state.drivers.get_mut(&self.object)?;
            UNICODE_STRING {
                Length: (record.registry_path_utf16.len() * 2) as u16,
                MaximumLength: (record.registry_path_utf16.len() * 2) as u16,
                Buffer: record.registry_path_utf16.as_mut_ptr(),
            }
        };
        token_scope("LoadedDriver::run_in_driver", || {
            state::with_context(&machine.kernel, PASSIVE_LEVEL, self.object, || {
                // SAFETY: this thread runs at PASSIVE_LEVEL, as the driver, for the call of `f`, and
                // `token_scope` made sure no other token is live on it.
                let mut token = unsafe { wfp_rs::__sim::passive_level() };
                let result =
                    wfp_rs::__sim::with_driver_of(self.driver_object(), &path, &mut token, f);
                check_irql_restored("LoadedDriver::run_in_driver", PASSIVE_LEVEL);
                result
            })
        })
    }

    /// The driver object, as the kernel passes it to the driver.
    pub fn driver_object(&self) -> *mut DRIVER_OBJECT {
        self.object as *mut DRIVER_OBJECT
    }
}

std::thread_local! {
    /// Whether this thread is inside a harness call that handed out an IRQL token.
    static HARNESS_TOKEN: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Runs `f`, a harness call that hands out an IRQL token, after making sure no other token can
/// be live on this thread: not inside another such call, and not in driver code (which the SDK
/// called with a token). Otherwise two tokens would be usable on one thread, and raising the
/// IRQL through one (a spin lock) would leave the other claiming a level that no longer holds —
/// `at_dispatch` nested in `at_passive` would even raise it directly. Harness misuse, so a
/// panic rather than a bug check.
fn token_scope<R>(what: &str, f: impl FnOnce() -> R) -> R {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            HARNESS_TOKEN.set(false);
        }
    }
    if HARNESS_TOKEN.get() || state::current_driver() != 0 {
        panic!(
            "{what} called where an IRQL token may already be live on this thread (inside \
             Machine::at_passive, Machine::at_dispatch, LoadedDriver::run_in_driver, or driver \
             code): a second token would stay usable while the first one raises the IRQL. Use the \
             token you have; to raise the IRQL, lock a SpinLock with it"
        );
    }
    HARNESS_TOKEN.set(true);
    let _leave = Leave;
    f()
}

/// Why [`Machine::unload_driver`] did not unload a driver. (Rule violations are not errors:
/// they stop the machine, as on Windows.)
#[derive(Debug, thiserror::Error)]
pub enum UnloadError {
    /// The driver set no unload routine, so Windows refuses to stop it.
    #[error("driver {} has no unload routine and cannot be stopped", .0.name)]
    NotUnloadable(LoadedDriver),
    /// The unload routine returned with device objects still present; Windows keeps such a
    /// driver loaded ("unload pending") until they are deleted.
    #[error("driver {name} returned from unload with {devices} device object(s) not deleted")]
    DeviceObjectsRemain {
        /// The driver's name.
        name: String,
        /// How many device objects remain.
        devices: usize,
    },
}

/// A block of simulated pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolBlock {
    /// The tag it was allocated with.
    pub tag: PoolTag,
    /// Its size in bytes.
    pub size: usize,
    /// The driver it is charged to, if any.
    pub driver: Option<String>,
}

impl Machine {
    /// A machine with two system worker threads.
    pub fn new() -> Machine {
        Machine::with_worker_threads(2)
    }

    /// A machine with `workers` system worker threads (at least one).
    pub fn with_worker_threads(workers: usize) -> Machine {
        Machine::boot(workers, None)
    }

    fn boot(workers: usize, seed: Option<u64>) -> Machine {
        // The same table every time: the first machine of the process installs it, the others
        // find it there.
        wfp_rs::__sim::install_kernel(&crate::kernel::FUNCTIONS);
        Machine {
            kernel: Kernel::new(workers.max(1), seed),
        }
    }

    /// A deterministic machine (two system worker threads): one seed fixes every scheduling
    /// decision, and its clock is virtual, so the same seed gives the same run — the same
    /// [`schedule`](Self::schedule) — every time.
    ///
    /// Every context of the machine is still a host thread, but only one runs at a time: the
    /// calling thread (the *harness* task), the system worker threads, the DPC thread, and
    /// threads started with [`spawn`](Self::spawn). At a yield point (acquiring and releasing
    /// a spin lock, queueing a work item, setting an event or a timer, completing an I/O request
    /// or a pended classification, the start of a classification, a work item or DPC routine
    /// returning, a service sending an I/O control request or replying on a port)
    /// and at every wait, the running context hands over to one the seed picks. The interrupt
    /// time moves only by [`advance_clock`](Self::advance_clock), or when every context waits:
    /// then it jumps to the earliest deadline (a timed wait, a timer), and a timer's DPC runs.
    /// When every context waits with no deadline, the process ends with the seed, the command
    /// that replays it and the schedule's last steps, instead of hanging (as a bug check ends
    /// it; [`run_isolated`] observes it). A test that fails on a deterministic machine prints
    /// its seed and that command as the machine drops, and so does a bug check's report.
    ///
    /// Only the harness thread and contexts the machine knows may enter it: another thread
    /// that calls into it panics (start it with [`spawn`](Self::spawn)). The repository's
    /// `docs/simulator.md` ("Deterministic mode") says what is not scheduled yet.
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let schedule = |seed| {
    ///     let machine = Machine::deterministic(seed);
    ///     machine.run(|| ());
    ///     machine.wait_for_work_items();
    ///     machine.schedule()
    /// };
    /// assert_eq!(schedule(7), schedule(7));
    /// ```
    ///
    /// # Panics
    ///
    /// If the calling thread is a task of another deterministic machine that is still alive.
    pub fn deterministic(seed: u64) -> Machine {
        Machine::boot(2, Some(seed))
    }

    /// A [`deterministic`](Self::deterministic) machine with `workers` system worker threads
    /// (at least one): more of them, more work items that can interleave.
    ///
    /// # Panics
    ///
    /// As [`deterministic`](Self::deterministic).
    pub fn deterministic_with_worker_threads(seed: u64, workers: usize) -> Machine {
        Machine::boot(workers, Some(seed))
    }

    /// The seed of a [`deterministic`](Self::deterministic) machine (`None` for a machine of
    /// real threads).
    pub fn seed(&self) -> Option<u64> {
        self.kernel.sched.as_ref().map(|s| s.seed())
    }

    /// The schedule of a [`deterministic`](Self::deterministic) machine so far: each step a
    /// context gave up the processor at a yield point or a wait. Two runs with one seed give
    /// equal schedules. Empty for a machine of real threads.
    pub fn schedule(&self) -> Vec<ScheduleStep> {
        self.kernel
            .sched
            .as_ref()
            .map_or_else(Vec::new, |s| s.trace())
    }

    /// The fingerprint of a [`deterministic`](Self::deterministic) machine's schedule so far:
    /// its number of steps and a hash of all of them, also of steps the trace no longer keeps
    /// (see [`set_schedule_trace_limit`](Self::set_schedule_trace_limit)). `None` for a
    /// machine of real threads.
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let fingerprint = |seed| {
    ///     let machine = Machine::deterministic(seed);
    ///     machine.set_schedule_trace_limit(Some(10));
    ///     std::thread::scope(|scope| {
    ///         let machine = &machine;
    ///         let others: Vec<_> = (0..4)
    ///             .map(|n| machine.spawn(scope, &format!("caller-{n}"), move || machine.run(|| n)))
    ///             .collect();
    ///         for other in others {
    ///             other.join().unwrap();
    ///         }
    ///     });
    ///     assert!(machine.schedule().len() <= 10);
    ///     machine.schedule_fingerprint().unwrap()
    /// };
    /// assert_eq!(fingerprint(7), fingerprint(7));
    /// ```
    pub fn schedule_fingerprint(&self) -> Option<ScheduleFingerprint> {
        self.kernel.sched.as_ref().map(|s| s.fingerprint())
    }

    /// Keeps only the last `limit` steps of a [`deterministic`](Self::deterministic)
    /// machine's schedule (`None`, the default: every step), for a long run whose whole trace
    /// would not fit in memory; [`schedule_fingerprint`](Self::schedule_fingerprint) still
    /// covers every step. Nothing on a machine of real threads.
    pub fn set_schedule_trace_limit(&self, limit: Option<usize>) {
        if let Some(sched) = &self.kernel.sched {
            sched.set_trace_limit(limit);
        }
    }

    /// Starts a thread in `scope` that may use this machine, named `name`: the way a test runs
    /// another context (a user-mode service, a second caller of classify) beside its own. On a
    /// [`deterministic`](Self::deterministic) machine the thread is a task the scheduler runs;
    /// otherwise it is a plain scoped thread.
    ///
    /// Join it (or drop its handle) before the scope ends: the scope's own join does not tell
    /// a deterministic machine that the harness waits.
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::deterministic(1);
    /// let answer = std::thread::scope(|scope| {
    ///     let service = machine.spawn(scope, "service", || machine.run(|| 42));
    ///     service.join().expect("the service returns")
    /// });
    /// assert_eq!(answer, 42);
    /// ```
    ///
    /// # Panics
    ///
    /// If the host cannot start a thread.
    pub fn spawn<'scope, 'env, T: Send + 'scope>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        name: &str,
        f: impl FnOnce() -> T + Send + 'scope,
    ) -> Spawned<'scope, T> {
        let kernel: &'env Kernel = &self.kernel;
        let task = kernel.sched.as_ref().map(|s| s.add(name, false));
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, move || {
                let Some((sched, task)) = kernel.sched.as_deref().zip(task) else {
                    return f();
                };
                sched.attach(task);
                let _finish = crate::kernel::sched::FinishOnDrop(sched);
                f()
            })
            .expect("the host could not start a thread");
        let waiter = task.map(|task| (kernel, task));
        Spawned {
            handle: Some(handle),
            waiter,
        }
    }

    /// The machine's interrupt time, what [`Instant::now`](wfp_rs::time::Instant::now) returns
    /// inside it. Callable from any thread, also outside the machine.
    pub fn now(&self) -> wfp_rs::time::Instant {
        wfp_rs::time::Instant::from_ticks(self.kernel.interrupt_time())
    }

    /// Moves the machine's clock forward by `by` (rounded up to whole 100-ns ticks), at once and
    /// for every thread in the machine: the clock is real monotonic time since the machine
    /// started plus the sum of these advances. Tests use it to expire timeouts and cache
    /// entries deterministically, without sleeping. The clock only moves forward; an advance
    /// past the end of the clock's range saturates.
    pub fn advance_clock(&self, by: core::time::Duration) {
        let ticks = u64::try_from(by.as_nanos().div_ceil(100)).unwrap_or(u64::MAX);
        self.kernel.advance_clock(ticks);
    }

    /// Waits `duration` on the machine's clock, from a thread of the test (the harness, or one
    /// started with [`spawn`](Self::spawn)): a sleep of the host's on a machine of real threads;
    /// on a [`deterministic`](Self::deterministic) machine a wait in the schedule, which other
    /// contexts run during and which ends on the virtual clock. What a test's service or fault
    /// injector uses instead of [`std::thread::sleep`], which on a deterministic machine would
    /// keep the processor and let virtual time stand still.
    ///
    /// ```
    /// use std::time::Duration;
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::deterministic(5);
    /// let before = machine.now();
    /// machine.sleep(Duration::from_secs(3600)); // at once: nothing else runs
    /// assert!(machine.now().duration_since(before) >= Duration::from_secs(3600));
    /// ```
    ///
    /// # Panics
    ///
    /// On a deterministic machine, if the calling thread is not one of its contexts (start it
    /// with [`spawn`](Self::spawn)).
    pub fn sleep(&self, duration: core::time::Duration) {
        let lock = std::sync::Mutex::new(());
        let never = std::sync::Condvar::new();
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = self.kernel.deadline_in(duration);
        let _ = self
            .kernel
            .wait_while(&lock, guard, &never, Some(deadline), "sleeps", |_| true);
    }

    /// Runs `f` on this thread inside the machine at `PASSIVE_LEVEL`, as harness code (not
    /// charged to any driver). Kernel functions and the SDK's safe API work inside.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        self.run_as("Machine::run", f)
    }

    /// [`run`](Self::run), naming the harness method in the stop report.
    fn run_as<R>(&self, method: &'static str, f: impl FnOnce() -> R) -> R {
        state::with_context(&self.kernel, PASSIVE_LEVEL, 0, || {
            state::with_routine(Routine::new(RoutineKind::Harness(method), 0, 0), f)
        })
    }

    /// How long a wait the I/O manager makes at unload may last before the machine stops with
    /// `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (0xCE) instead of hanging, as a
    /// Windows unload that waits for work which never finishes does: a wait with no timeout in
    /// `DriverEntry` or the unload routine (the SDK's unload waits for work items and
    /// [`WorkQueue`](wfp_rs::work_item::WorkQueue) handles this way), work item routines that have
    /// not returned when the unload routine has, calls into a callout that
    /// `FwpsCalloutUnregisterById0` waits for, `ConnectNotify` and `DisconnectNotify` calls that
    /// `FltUnregisterFilter` waits for, dispatch and cancel routines still running on a service's
    /// threads after the unload routine returned. The report names what was waited for and the
    /// threads still blocked. The default is 30 seconds; tests of these stops set a short limit
    /// (the hang is real, so a short limit only makes the test quicker).
    ///
    /// ```
    /// use core::time::Duration;
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// // A test that expects the stop: give up after half a second instead of 30.
    /// machine.set_unload_wait_limit(Duration::from_millis(500));
    /// ```
    pub fn set_unload_wait_limit(&self, limit: core::time::Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.kernel
            .unload_wait_limit_ms
            .store(ms, Ordering::Relaxed);
    }

    /// How long a processor (a thread in the machine) may stay at `DISPATCH_LEVEL` or above
    /// without a break before the machine stops with `DPC_WATCHDOG_VIOLATION` (0x133, parameter
    /// 1 = 1, parameter 2 = the limit in 15.625 ms clock ticks), as the DPC watchdog stops
    /// Windows. Every stay counts: callbacks the engine calls at `DISPATCH_LEVEL`, code under a
    /// spin lock, [`at_dispatch`](Self::at_dispatch). A driver that spins at `DISPATCH_LEVEL`
    /// waiting for other code (a flag a work item sets, a lock another callback holds for long)
    /// passes in the simulator only because its processors are host threads; on Windows that
    /// code may never run, and the watchdog fires.
    ///
    /// The default is 10 seconds (INFERRED: Windows' own period is not documented; crash dumps
    /// of current versions show 120 s — the simulator's is shorter so a spin that never ends
    /// reports in seconds). A stay ends when the thread drops below `DISPATCH_LEVEL`. The thread
    /// stops the machine itself at its next call of a kernel routine; a spin that calls none is
    /// caught by a watchdog thread that wakes every eighth of the limit (at most every 100 ms),
    /// and its report names the thread, its routine and how long it has been at
    /// `DISPATCH_LEVEL`. Tests of this stop set a short limit; a spin that never ends trips any
    /// limit, so they pass whatever the machine's speed. A very long limit (`Duration::MAX`) in
    /// effect turns the watchdog off, for a session under a debugger.
    ///
    /// ```
    /// use core::time::Duration;
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// machine.set_dpc_watchdog_limit(Duration::from_millis(200));
    /// machine.at_dispatch(|_irql| ()); // a short stay: nothing happens
    /// ```
    pub fn set_dpc_watchdog_limit(&self, limit: core::time::Duration) {
        self.kernel.watchdog.set_limit(limit);
    }

    /// Runs `f` at `PASSIVE_LEVEL` with a token.
    ///
    /// # Panics
    ///
    /// If called where a token may already be live on this thread: inside `at_passive`,
    /// [`at_dispatch`](Self::at_dispatch), [`LoadedDriver::run_in_driver`] or driver code. A
    /// second token would stay usable while the first one raises the IRQL.
    pub fn at_passive<R>(&self, f: impl for<'t> FnOnce(&'t mut PassiveLevel<'t>) -> R) -> R {
        token_scope("Machine::at_passive", || {
            self.run_as("Machine::at_passive", || {
                // SAFETY: this thread runs at PASSIVE_LEVEL inside the machine for the call of `f`,
                // and `token_scope` made sure no other token is live on it.
                let mut token = unsafe { wfp_rs::__sim::passive_level() };
                let result = f(&mut token);
                check_irql_restored("Machine::at_passive", PASSIVE_LEVEL);
                result
            })
        })
    }

    /// Runs `f` at `DISPATCH_LEVEL`, as a DPC would run, with a token. If `f` returns with the
    /// IRQL changed, the machine stops with `IRQL_UNEXPECTED_VALUE`; if `f` runs longer than the
    /// DPC watchdog allows, with `DPC_WATCHDOG_VIOLATION`
    /// ([`set_dpc_watchdog_limit`](Self::set_dpc_watchdog_limit)).
    ///
    /// # Panics
    ///
    /// As [`at_passive`](Self::at_passive): where a token may already be live on this thread.
    pub fn at_dispatch<R>(&self, f: impl for<'t> FnOnce(&'t mut DispatchLevel<'t>) -> R) -> R {
        token_scope("Machine::at_dispatch", || {
            state::with_context(&self.kernel, DISPATCH_LEVEL, 0, || {
                let dpc = Routine::new(RoutineKind::Harness("Machine::at_dispatch"), 0, 0);
                state::with_routine(dpc, || {
                    // SAFETY: this thread runs at DISPATCH_LEVEL inside the machine for the call
                    // of `f`, and `token_scope` made sure no other token is live on it.
                    let mut token = unsafe { wfp_rs::__sim::dispatch_level() };
                    let result = f(&mut token);
                    check_irql_restored("a DPC", DISPATCH_LEVEL);
                    result
                })
            })
        })
    }

    /// Loads a driver: creates its driver object and calls `entry` at `PASSIVE_LEVEL`, as the
    /// I/O manager does. A failing `DriverEntry` is unloaded at once, with the same checks as an
    /// unload.
    pub fn load_driver(&self, name: &str, entry: DriverEntryFn) -> Result<LoadedDriver, Status> {
        let object = self.create_driver_object(name);
        let (object_ptr, registry_path) = {
            let mut state = self.kernel.lock();
            let record = state.drivers.get_mut(&object).expect("just created");
            let path = UNICODE_STRING {
                Length: (record.registry_path_utf16.len() * 2) as u16,
                MaximumLength: (record.registry_path_utf16.len() * 2) as u16,
                Buffer: record.registry_path_utf16.as_mut_ptr(),
            };
            (&mut *record.object as *mut DRIVER_OBJECT, path)
        };
        let status = state::with_context(&self.kernel, PASSIVE_LEVEL, object, || {
            state::with_routine(Routine::new(RoutineKind::DriverEntry, object, 0), || {
                // SAFETY: the driver object and registry path are valid for the call, as the
                // I/O manager guarantees to DriverEntry.
                let status = unsafe { entry(object_ptr, &registry_path) };
                check_irql_restored("DriverEntry", PASSIVE_LEVEL);
                status
            })
        });
        let driver = LoadedDriver {
            object,
            name: name.to_owned(),
        };
        match Status::from_ntstatus(status) {
            Ok(()) => Ok(driver),
            Err(error) => {
                // The I/O manager deletes the driver object of a failed DriverEntry; what the
                // driver left behind is checked as at unload.
                if let Err(e) = self.finish_unload(&driver) {
                    panic!("after a failed DriverEntry: {e}");
                }
                Err(error)
            }
        }
    }

    /// Unloads a driver: calls its unload routine at `PASSIVE_LEVEL`, waits for work item
    /// routines that are still running (the I/O manager holds the image for them), and checks
    /// what Windows with Driver Verifier checks:
    ///
    /// - every wait made at unload ends within [`set_unload_wait_limit`](Self::set_unload_wait_limit)
    ///   (`DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`, naming what was waited for,
    ///   where Windows would hang);
    /// - the IRQL was restored (`IRQL_UNEXPECTED_VALUE`);
    /// - no work item is still queued (`DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`);
    /// - no pool is still charged to the driver, work items included
    ///   (`DRIVER_VERIFIER_DETECTED_VIOLATION`, parameter 1 = 0x62).
    pub fn unload_driver(&self, driver: LoadedDriver) -> Result<(), UnloadError> {
        let unload = {
            let state = self.kernel.lock();
            state
                .drivers
                .get(&driver.object)
                .and_then(|d| d.object.DriverUnload)
        };
        let Some(unload) = unload else {
            return Err(UnloadError::NotUnloadable(driver));
        };
        state::with_context(&self.kernel, PASSIVE_LEVEL, driver.object, || {
            let routine = Routine::new(RoutineKind::DriverUnload, driver.object, 0);
            state::with_routine(routine, || {
                // SAFETY: the driver set this routine and is loaded; the I/O manager calls it at
                // PASSIVE_LEVEL with the driver object.
                unsafe { unload(driver.object as *mut DRIVER_OBJECT) };
                check_irql_restored("DriverUnload", PASSIVE_LEVEL);
            });
        });
        self.finish_unload(&driver)
    }

    /// What the I/O manager and Driver Verifier do after a driver's unload routine returned.
    fn finish_unload(&self, driver: &LoadedDriver) -> Result<(), UnloadError> {
        let routine = Routine::new(RoutineKind::AfterUnload, driver.object, 0);
        // Inside the machine, so a stop's report can name the driver; harness code, so the
        // checks' own allocations come from the host (see `pool_blocks`).
        state::with_context(&self.kernel, PASSIVE_LEVEL, 0, || {
            let _harness = state::KernelCode::enter();
            state::with_routine(routine, || self.finish_unload_checks(driver))
        })
    }

    fn finish_unload_checks(&self, driver: &LoadedDriver) -> Result<(), UnloadError> {
        // Dispatch and cancel routines running on other threads hold its device, as work item
        // routines do (below).
        crate::kernel::irp::wait_for_dispatch_calls(&self.kernel, driver.object);
        // Routines already running keep the image loaded until they return (IoQueueWorkItem
        // holds the device object), including those that freed their work item.
        let mut state = self.wait_for_running_work(driver);
        let queued = state
            .work_items
            .iter()
            .filter(|(_, w)| w.driver == driver.object && w.state == WorkItemState::Queued)
            .count();
        if queued > 0 {
            let item = state
                .queue
                .iter()
                .find(|q| {
                    state
                        .work_items
                        .get(&q.item)
                        .is_some_and(|w| w.driver == driver.object)
                })
                .map_or(0, |q| q.routine as usize);
            drop(state);
            stop(
                BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                [item, 0, 0, 0],
                &format!(
                    "driver {} unloaded with {queued} work item(s) still queued",
                    driver.name
                ),
            );
        }
        let callouts = self
            .kernel
            .wfp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .callouts_of(driver.object);
        let pends = self
            .kernel
            .wfp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pends_of(driver.object);
        if pends > 0 {
            drop(state);
            stop(
                BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                [0, 0, 0, 0],
                &format!(
                    "driver {} unloaded with {pends} pended classification(s) not completed",
                    driver.name
                ),
            );
        }
        if !callouts.is_empty() {
            drop(state);
            stop(
                BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                [0, 0, 0, 0],
                &format!(
                    "driver {} unloaded with {} callout(s) still registered ({}); the filter engine would call into unloaded code",
                    driver.name,
                    callouts.len(),
                    callouts.join(", ")
                ),
            );
        }
        crate::kernel::timer::check_unload(&self.kernel, driver.object, &driver.name);
        crate::kernel::flt::check_unload(&self.kernel, driver.object, &driver.name);
        crate::kernel::wfp::check_unload(&self.kernel, driver.object, &driver.name);
        crate::kernel::wfp::check_unload_redirect_handles(
            &self.kernel,
            driver.object,
            &driver.name,
        );
        crate::kernel::irp::check_unload(&self.kernel, driver.object, &driver.name);
        crate::kernel::inject::check_unload(&self.kernel, driver.object, &driver.name);
        let devices = state
            .devices
            .values()
            .filter(|d| d.driver == driver.object)
            .count();
        if devices > 0 {
            return Err(UnloadError::DeviceObjectsRemain {
                name: driver.name.clone(),
                devices,
            });
        }
        // Pool the driver's code took through the global allocator counts as its pool too.
        let global = self
            .kernel
            .global_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let leaked: Vec<(usize, u32, usize)> = state
            .pool
            .iter()
            .chain(global.iter())
            .filter(|(_, b)| b.driver == driver.object)
            .map(|(&addr, b)| (addr, b.tag, b.size))
            .collect();
        drop(global);
        if !leaked.is_empty() {
            let record = state.drivers.get(&driver.object).expect("driver is loaded");
            let name_ptr = &record.object.DriverName as *const UNICODE_STRING as usize;
            drop(state);
            let list: Vec<String> = leaked
                .iter()
                .map(|&(addr, tag, size)| {
                    format!(
                        "{addr:#x} tag {} ({size} bytes)",
                        PoolTag::new(&tag.to_le_bytes())
                    )
                })
                .collect();
            stop(
                BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
                [verifier::POOL_LEAKED_AT_UNLOAD, name_ptr, 0, leaked.len()],
                &format!(
                    "driver {} unloaded without freeing {} pool allocation(s): {}",
                    driver.name,
                    leaked.len(),
                    list.join(", ")
                ),
            );
        }
        let record = state
            .drivers
            .remove(&driver.object)
            .expect("driver is loaded");
        drop(state);
        crate::kernel::forget_locks_of(&self.kernel, driver.object);
        self.run(|| {
            for &(_, ptr, _) in &record.extensions {
                crate::kernel::kernel_free_block(ptr as *mut u8);
            }
        });
        Ok(())
    }

    /// Waits until no work item routine of `driver` runs, at most the unload wait limit; then
    /// stops with 0xCE naming the routines (on Windows the driver would stay loaded, its unload
    /// never finishing).
    fn wait_for_running_work(
        &self,
        driver: &LoadedDriver,
    ) -> std::sync::MutexGuard<'_, state::State> {
        let deadline = self.kernel.deadline_in(self.kernel.unload_wait_limit());
        let state = self.kernel.lock();
        let (state, timed_out) = self.kernel.wait_while(
            &self.kernel.state,
            state,
            &self.kernel.work_done,
            Some(deadline),
            "unload: waits for the driver's work item routines",
            |state| state.running_work.contains_key(&driver.object),
        );
        if timed_out {
            let running: Vec<(usize, usize)> = state
                .work_items
                .iter()
                .filter(|(_, w)| {
                    w.driver == driver.object && matches!(w.state, WorkItemState::Running(_))
                })
                .map(|(&item, _)| (item, 0))
                .collect();
            let routine = self.kernel.blocked_work_routine_of(driver.object);
            let count = state.running_work.get(&driver.object).copied().unwrap_or(0);
            drop(state);
            let item = running.first().map_or(0, |&(item, _)| item);
            self.kernel.unload_wait_expired(
                driver.object,
                [item, 0, routine, wfp_rs::bugcheck::unload_wait::WORK_ITEM_ROUTINES],
                &format!(
                    "{count} work item routine(s) of driver {} that have not returned (the I/O manager keeps the driver loaded until they do)",
                    driver.name
                ),
            );
        }
        state
    }

    fn create_driver_object(&self, name: &str) -> usize {
        let mut name_utf16: Vec<u16> = format!("\\Driver\\{name}").encode_utf16().collect();
        let registry_path_utf16: Vec<u16> =
            format!("\\REGISTRY\\MACHINE\\SYSTEM\\CurrentControlSet\\Services\\{name}")
                .encode_utf16()
                .collect();
        // SAFETY: DRIVER_OBJECT and DRIVER_EXTENSION are plain data (integers, raw pointers and
        // optional function pointers), valid when zeroed.
        let mut object: Box<DRIVER_OBJECT> = unsafe { Box::new_zeroed().assume_init() };
        // SAFETY: as above.
        let mut driver_extension: Box<DRIVER_EXTENSION> =
            unsafe { Box::new_zeroed().assume_init() };
        object.Type = 4; // IO_TYPE_DRIVER
        object.Size = core::mem::size_of::<DRIVER_OBJECT>() as i16;
        // The vectors' heap buffers do not move when the vectors move into the record.
        object.DriverName = UNICODE_STRING {
            Length: (name_utf16.len() * 2) as u16,
            MaximumLength: (name_utf16.len() * 2) as u16,
            Buffer: name_utf16.as_mut_ptr(),
        };
        let key = &*object as *const DRIVER_OBJECT as usize;
        driver_extension.DriverObject = key as *mut DRIVER_OBJECT;
        object.DriverExtension = &mut *driver_extension;
        let record = DriverRecord {
            name: name.to_owned(),
            object,
            driver_extension,
            extensions: Vec::new(),
            name_utf16,
            registry_path_utf16,
        };
        self.kernel.lock().drivers.insert(key, record);
        key
    }

    /// Waits until no work item of this machine is queued or running: every routine queued
    /// with `IoQueueWorkItem` has returned (for an SDK work item, the closure and the SDK's
    /// code after it), whether or not it freed its work item first. While
    /// [`hold_work_items`](Self::hold_work_items) is on, held items are not waited for, only
    /// those already running. Harness synchronisation, not timing: it returns as soon as that
    /// holds.
    ///
    /// # Panics
    ///
    /// When that does not hold within [`set_unload_wait_limit`](Self::set_unload_wait_limit)
    /// (a work item routine blocked for good), with the threads still blocked and what they wait
    /// on, instead of hanging the test.
    pub fn wait_for_work_items(&self) {
        if let Some(sched) = &self.kernel.sched {
            sched.require_task();
        }
        let deadline = self.kernel.deadline_in(self.kernel.unload_wait_limit());
        let state = self.kernel.lock();
        let (state, timed_out) = self.kernel.wait_while(
            &self.kernel.state,
            state,
            &self.kernel.work_done,
            Some(deadline),
            "Machine::wait_for_work_items",
            |state| {
                (!state.queue.is_empty() && !state.hold_work_items)
                    || !state.running_work.is_empty()
            },
        );
        if timed_out {
            let running: usize = state.running_work.values().sum();
            let queued = state.queue.len();
            drop(state);
            let blocked = self.kernel.blocked_threads();
            panic!(
                "wfp-rs simulator: Machine::wait_for_work_items waited {:.1} s (Machine::set_unload_wait_limit) and {running} work item routine(s) still run, {queued} queued\n{}",
                self.kernel.unload_wait_limit().as_secs_f64(),
                blocked.join("\n")
            );
        }
    }

    /// Waits until every timer that has expired by the machine's clock has had its DPC run, and
    /// no DPC is queued or running: after [`advance_clock`](Self::advance_clock) past a timer's
    /// due time, the timer's DPC routine has run once this returns.
    ///
    /// ```
    /// # let machine = wfp_rs_sim::Machine::new();
    /// machine.advance_clock(core::time::Duration::from_secs(60));
    /// machine.wait_for_dpcs();
    /// ```
    ///
    /// # Panics
    ///
    /// Stops the machine with `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` when a DPC
    /// routine does not return within [`set_unload_wait_limit`](Self::set_unload_wait_limit).
    pub fn wait_for_dpcs(&self) {
        self.run_as("Machine::wait_for_dpcs", || {
            let _harness = state::KernelCode::enter();
            crate::kernel::timer::wait_idle(&self.kernel, "Machine::wait_for_dpcs");
        });
    }

    /// Makes pool allocations fail (return null), to test low-memory paths: after `skip` more
    /// allocations succeed, the following `count` fail. Allocations the kernel makes for the
    /// driver (work items, driver object extensions) count too. `fail_allocations(0, 0)` turns
    /// injection off.
    pub fn fail_allocations(&self, skip: u64, count: u64) {
        self.fail_allocations_in(&[(skip, count)]);
    }

    /// [`fail_allocations`](Self::fail_allocations) with several windows, in order: after the
    /// first window's `skip` allocations succeed its `count` fail, then the second window's
    /// `skip` succeed and its `count` fail, and so on. An empty plan turns injection off.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// // The 3rd allocation fails, then the 6th and 7th.
    /// machine.fail_allocations_in(&[(2, 1), (2, 2)]);
    /// assert_eq!(machine.pending_allocation_failures(), 3);
    /// ```
    pub fn fail_allocations_in(&self, windows: &[(u64, u64)]) {
        let mut later: Vec<(u64, u64)> = windows.iter().rev().copied().collect();
        let (skip, count) = later.pop().unwrap_or((0, 0));
        let mut faults = self.kernel.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.skip = skip;
        faults.count = count;
        let old = core::mem::replace(&mut faults.later, later);
        // Freed once the lock is released: the allocator takes it.
        drop(faults);
        drop(old);
    }

    /// Makes the kernel's random number generator (`BCryptGenRandom`) fail with `status` until
    /// called again with `None`, to test what a driver does without random numbers. The SDK's
    /// `DriverEntry` draws a secret from it before the driver's entry function runs, so a load
    /// then fails with `status`.
    pub fn fail_random(&self, status: Option<wfp_rs::Status>) {
        self.kernel.lock().random_failure = status.map(wfp_rs::Status::raw);
    }

    /// Sets the lines a bug check on this machine adds at the end of its report (`None`: none):
    /// what a harness knows about the run that the machine does not, such as the case the
    /// [property harness](crate::prop) was running and how to replay it.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// machine.set_stop_note(Some("case: 3 connections".to_owned()));
    /// ```
    pub fn set_stop_note(&self, note: Option<String>) {
        crate::kernel::bugcheck::set_stop_note(Arc::as_ptr(&self.kernel) as usize, note);
    }

    /// User mode cancels every request it has pending on the machine's devices: `CancelIoEx` on
    /// each handle, as a service does when it stops waiting, in the order the requests were sent.
    /// Each request's cancel routine runs, if its driver set one (see [`IoRequest::cancel`]).
    /// Returns how many cancel routines ran.
    pub fn cancel_io_requests(&self) -> usize {
        crate::kernel::irp::cancel_user_requests(&self.kernel)
    }

    /// How many injected failures are still to come (0 once all have happened).
    pub fn pending_allocation_failures(&self) -> u64 {
        let faults = self.kernel.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.count + faults.later.iter().map(|(_, count)| count).sum::<u64>()
    }

    /// How many work items have been queued (`IoQueueWorkItem`) on this machine since it
    /// started, by every driver: each one is a system worker thread's time, and a work item
    /// that waits (for a reply over a port, say) blocks that thread meanwhile. Harness
    /// bookkeeping: tests compare it before and after to check that a path queues no work item.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// assert_eq!(machine.work_items_queued(), 0);
    /// ```
    pub fn work_items_queued(&self) -> u64 {
        self.kernel.lock().work_items_queued
    }

    /// While `hold` is true, system worker threads leave queued work items in the queue; set it
    /// back to false to let them run. For tests that need a work item to stay queued.
    pub fn hold_work_items(&self, hold: bool) {
        self.kernel.lock().hold_work_items = hold;
        if !hold {
            self.kernel.work_ready.notify_all();
        }
    }

    /// The most system worker threads blocked at once in a kernel wait since the machine started
    /// or the last [`reset_blocked_max`](Self::reset_blocked_max): work item routines inside
    /// `FltSendMessage` (from the send until the call returns) or in `KeWaitForSingleObject`
    /// (any timeout but zero). A design that waits for user mode from work items holds one
    /// system worker thread per question in flight; one that does not holds none.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// assert_eq!(machine.blocked_workers_max(), 0);
    /// ```
    pub fn blocked_workers_max(&self) -> usize {
        self.kernel.blocked.workers_max()
    }

    /// Like [`blocked_workers_max`](Self::blocked_workers_max), for threads inside a
    /// `classifyFn` (the seed's design waits there): not system worker threads, but threads of
    /// whoever the network stack classified on.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// assert_eq!(machine.blocked_classifying_max(), 0);
    /// ```
    pub fn blocked_classifying_max(&self) -> usize {
        self.kernel.blocked.classifying_max()
    }

    /// Starts [`blocked_workers_max`](Self::blocked_workers_max) and
    /// [`blocked_classifying_max`](Self::blocked_classifying_max) again, from the threads blocked
    /// now.
    ///
    /// ```
    /// let machine = wfp_rs_sim::Machine::new();
    /// machine.reset_blocked_max();
    /// assert_eq!(machine.blocked_workers_max(), 0);
    /// ```
    pub fn reset_blocked_max(&self) {
        self.kernel.blocked.reset();
    }

    /// The live pool blocks, those driver code took through the global allocator (`Box`, `Vec`,
    /// `Arc`: tag [`GLOBAL_ALLOCATOR_TAG`]) included.
    pub fn pool_blocks(&self) -> Vec<PoolBlock> {
        // Harness code even when driver code calls it: it allocates while holding the table of
        // driver code's global-allocator blocks, which driver code's allocations take.
        let _harness = state::KernelCode::enter();
        let state = self.kernel.lock();
        let global = self
            .kernel
            .global_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        state
            .pool
            .values()
            .chain(global.values())
            .map(|b| PoolBlock {
                tag: PoolTag::new(&b.tag.to_le_bytes()),
                size: b.size,
                driver: state.drivers.get(&b.driver).map(|d| d.name.clone()),
            })
            .collect()
    }

    /// How many spin locks deadlock detection remembers an order for: the locks that have been
    /// held together with another, and whose memory has not gone since (freed pool, a returned
    /// frame, an unloaded driver). For tests of the detection itself.
    pub fn remembered_spin_locks(&self) -> usize {
        crate::kernel::remembered_locks(&self.kernel)
    }

    /// The most recent network and forward injections (`FwpsInjectNetworkSendAsync0`,
    /// `FwpsInjectNetworkReceiveAsync0`, `FwpsInjectForwardAsync0`), oldest first, at most 256:
    /// which routine, the status the stack gave the packet (a packet that does not start with an
    /// IP header of its family is dropped with `STATUS_INVALID_PARAMETER`), and its bytes from
    /// its data start, and what the layer decided when a network-injected one was indicated to
    /// it again (see docs/packets.md).
    pub fn injected_packets(&self) -> Vec<InjectedPacket> {
        crate::kernel::inject::delivered(&self.kernel)
            .into_iter()
            .map(|d| InjectedPacket {
                routine: d.routine,
                status: wfp_rs::Status::from_raw(d.status),
                packet: d.packet,
                reindicated: d.reindicated.map(wfp_rs::classify::Action::from_raw),
            })
            .collect()
    }

    /// How many I/O requests the simulated I/O manager keeps a record of: the pending ones, and
    /// the completed ones whose [`IoRequest`] is still alive. A completed request is forgotten
    /// once its `IoRequest` is dropped (its IRP and buffer go to a bounded quarantine first, so
    /// a driver touching them after completion reads memory the test still owns), so a machine's
    /// memory does not grow with the number of requests it has served. For tests of long runs.
    pub fn tracked_io_requests(&self) -> usize {
        crate::kernel::irp::tracked_irps(&self.kernel)
    }

    /// What was written with `DbgPrintEx` so far, one entry per call (that the filter let
    /// through: [`set_debug_filter_mask`](Self::set_debug_filter_mask)), oldest first: the most
    /// recent [`debug_log_limit`](Self::debug_log_limit) messages.
    pub fn debug_output(&self) -> Vec<String> {
        self.kernel.lock().debug.lines.iter().cloned().collect()
    }

    /// How many messages the machine keeps for [`debug_output`](Self::debug_output): 100,000
    /// on a new machine. Older ones are dropped, and counted
    /// ([`debug_output_dropped`](Self::debug_output_dropped)), so a long run's memory does not
    /// grow with every message a driver prints.
    pub fn debug_log_limit(&self) -> usize {
        self.kernel.lock().debug.limit
    }

    /// Sets how many messages the machine keeps (see [`debug_log_limit`](Self::debug_log_limit));
    /// lowering it drops the oldest of those kept now. Zero keeps none (and counts every message
    /// as dropped).
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// machine.set_debug_log_limit(2);
    /// machine.run(|| {
    ///     for n in 0..5 {
    ///         wfp_rs::kd_print!("message {}\n", n);
    ///     }
    /// });
    /// assert_eq!(machine.debug_output(), ["message 3\n", "message 4\n"]);
    /// assert_eq!(machine.debug_output_dropped(), 3);
    /// ```
    pub fn set_debug_log_limit(&self, limit: usize) {
        let mut state = self.kernel.lock();
        state.debug.limit = limit;
        state.debug.trim();
    }

    /// The messages printed after the first `seen` (counting dropped ones), oldest first, and how
    /// many there have been in all (the `seen` of the next call): a consistent way to follow the
    /// log while drivers print. Messages dropped before they could be read are missing from the
    /// list (see [`debug_log_limit`](Self::debug_log_limit)), not from the count.
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// machine.run(|| wfp_rs::kd_print!("first\n"));
    /// let (lines, seen) = machine.debug_output_after(0);
    /// assert_eq!((lines, seen), (vec!["first\n".to_string()], 1));
    /// machine.run(|| wfp_rs::kd_print!("second\n"));
    /// assert_eq!(machine.debug_output_after(seen).0, ["second\n"]);
    /// ```
    pub fn debug_output_after(&self, seen: u64) -> (Vec<String>, u64) {
        let state = self.kernel.lock();
        let log = &state.debug;
        let total = log.dropped + log.lines.len() as u64;
        let skip = usize::try_from(seen.saturating_sub(log.dropped)).unwrap_or(usize::MAX);
        (log.lines.iter().skip(skip).cloned().collect(), total)
    }

    /// How many messages were dropped from [`debug_output`](Self::debug_output) to keep it
    /// within [`debug_log_limit`](Self::debug_log_limit).
    pub fn debug_output_dropped(&self) -> u64 {
        self.kernel.lock().debug.dropped
    }

    /// Sets the component filter mask of `DbgPrintEx` (and `DbgQueryDebugFilterState`), for
    /// every component: bit *n* lets messages of level *n* through (`DPFLTR_ERROR_LEVEL` = 0 ..
    /// `DPFLTR_INFO_LEVEL` = 3), as `ed nt!Kd_IHVDRIVER_Mask <mask>` does in the debugger.
    /// Error messages always go through (the `WIN2000` mask, 0x1).
    ///
    /// A new machine's mask is `u32::MAX`: every level, a test machine whose masks were set, so
    /// tests read every line a driver prints. Windows' default is 0 (only errors); set it to
    /// measure what a driver's messages cost on a machine nobody debugs (the SDK does not even
    /// format a message that is filtered out).
    ///
    /// ```
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// machine.set_debug_filter_mask(0);
    /// machine.run(|| {
    ///     wfp_rs::kd_print!("dropped\n");
    ///     wfp_rs::kd_print!(Error, "kept\n");
    /// });
    /// assert_eq!(machine.debug_output(), ["kept\n"]);
    /// ```
    pub fn set_debug_filter_mask(&self, mask: u32) {
        self.kernel.debug_filter_mask.store(mask, Ordering::Relaxed);
    }

    /// How the harness's waits spin before they park: [`Machine::connect`] holding a pended
    /// connection until the callout completes it, and [`IoRequest::wait`] (a service waiting
    /// for its request's completion). [`WaitSpin::Adaptive`] by default.
    ///
    /// Only host scheduling changes: a spinning wait busy-waits and yields (the standard
    /// library's channels do the same before they park) instead of leaving its CPU idle, so a
    /// completion within the spin reaches it without the host waking a parked thread — which on
    /// a virtual machine whose CPU went idle can cost tens of microseconds. Nothing the
    /// simulated kernel checks or decides changes, and a deterministic machine never spins.
    /// [`WaitSpin::Fixed`]`(Duration::ZERO)` parks at once, as the simulator did before the
    /// adaptive default; benchmark (b) measures both.
    ///
    /// ```
    /// use std::time::Duration;
    /// use wfp_rs_sim::{Machine, WaitSpin};
    ///
    /// let machine = Machine::new();
    /// machine.set_wait_spin(WaitSpin::Fixed(Duration::ZERO));
    /// ```
    pub fn set_wait_spin(&self, spin: WaitSpin) {
        self.kernel.wait_spin.set(spin);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(sched) = &self.kernel.sched
        {
            eprintln!(
                "wfp-rs simulator: a deterministic machine (seed {}) was dropped by a panic\n{}",
                sched.seed(),
                sched.replay()
            );
        }
        crate::kernel::bugcheck::set_stop_note(Arc::as_ptr(&self.kernel) as usize, None);
        self.kernel.shut_down();
    }
}

/// A thread started with [`Machine::spawn`]; [`join`](Self::join) it (dropping it joins too).
#[must_use = "join the thread before its scope ends"]
pub struct Spawned<'scope, T> {
    handle: Option<std::thread::ScopedJoinHandle<'scope, T>>,
    /// On a deterministic machine: the scheduler, and the thread's task.
    waiter: Option<(&'scope Kernel, crate::kernel::sched::TaskId)>,
}

impl<T> fmt::Debug for Spawned<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawned").finish_non_exhaustive()
    }
}

impl<T> Spawned<'_, T> {
    /// Waits for the thread to return, and returns what it returned (`Err`: it panicked), as
    /// [`JoinHandle::join`](std::thread::JoinHandle::join). On a deterministic machine the
    /// wait is one of the schedule's: other tasks run meanwhile.
    pub fn join(mut self) -> std::thread::Result<T> {
        self.wait_finished();
        self.handle.take().expect("joined once").join()
    }

    fn wait_finished(&mut self) {
        let Some((kernel, task)) = self.waiter.take() else {
            return;
        };
        let Some(sched) = kernel.sched.as_deref() else {
            return;
        };
        let lock = std::sync::Mutex::new(());
        let idle = std::sync::Condvar::new();
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = kernel.wait_while(&lock, guard, &idle, None, "joins a spawned thread", |_| {
            !sched.is_released() && !sched.is_finished(task)
        });
    }
}

impl<T> Drop for Spawned<'_, T> {
    fn drop(&mut self) {
        self.wait_finished();
    }
}

/// Runs `run` once for each seed in `seeds` — or, when the environment variable
/// `WFP_SIM_SEED` is set, once for that seed only — so a test can explore schedules of
/// [`Machine::deterministic`] machines and replay the one that failed. When `run` panics, the
/// seed and the command that replays it are printed before the panic goes on.
///
/// ```
/// let mut runs = 0;
/// wfp_rs_sim::for_each_seed(0..4, |seed| {
///     let machine = wfp_rs_sim::Machine::deterministic(seed);
///     machine.wait_for_work_items();
///     runs += 1;
/// });
/// assert!(runs >= 1);
/// ```
///
/// # Panics
///
/// When `run` panics (the seed is printed first), or when `WFP_SIM_SEED` is not a number.
pub fn for_each_seed(seeds: core::ops::Range<u64>, mut run: impl FnMut(u64)) {
    let seeds = match std::env::var(SEED_VARIABLE) {
        Ok(seed) => {
            let seed = seed.trim().parse::<u64>().unwrap_or_else(|_| {
                panic!("{SEED_VARIABLE}={seed:?} is not a seed (a number from 0 to 2^64 - 1)")
            });
            seed..seed.saturating_add(1)
        }
        Err(_) => seeds,
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        if let Err(panic) = outcome {
            eprintln!(
                "wfp-rs simulator: the run with seed {seed} failed\n{}",
                crate::kernel::sched::replay_hint(seed)
            );
            std::panic::resume_unwind(panic);
        }
    }
}

fn check_irql_restored(callback: &str, expected: KIRQL) {
    let now = state::irql();
    if now != expected {
        stop(
            BugCheckCode::IRQL_UNEXPECTED_VALUE,
            // Parameter 1 packs (current << 16) | (expected << 8) | 2, where 2 means "a callout
            // routine returned at the wrong IRQL".
            [
                ((now as usize) << 16) | ((expected as usize) << 8) | 2,
                0,
                0,
                0,
            ],
            &format!(
                "{callback} returned at IRQL {now} ({}); it was called at {expected} ({})",
                state::level_name(now),
                state::level_name(expected)
            ),
        );
    }
}

/// A bug check seen by [`run_isolated`], parsed from the report's first lines:
///
/// ```text
/// *** STOP: 0x000000C4 (0x0000000000001001, 0x…, 0x…, 0x…)
/// DRIVER_VERIFIER_DETECTED_VIOLATION
/// wfp-rs simulator: <explanation>
/// in: <the driver routine the thread ran>; thread <name> [<id>], IRQL <n>
/// at: <file>:<line>:<column> (<function>)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BugCheckReport {
    /// The stop code.
    pub code: BugCheckCode,
    /// The four parameters.
    pub params: [usize; 4],
    /// The simulator's one-line explanation (after `wfp-rs simulator: `).
    pub explanation: String,
    /// The driver routine the stopping thread ran, with the thread and its IRQL (after `in: `),
    /// for example `classifyFn of callout 3 of driver firewall; thread sim-worker-0 [7], IRQL 2`.
    /// When the DPC watchdog's own thread stops the machine, the routine and thread are those of
    /// the thread that stayed at `DISPATCH_LEVEL` too long.
    pub routine: String,
    /// The source location (`file:line:column (function)`) of the innermost frame of driver
    /// code on the stopping thread (after `at: `), or a note that there was none (or, when the
    /// DPC watchdog's own thread stops the machine, that the spinning thread's stack is not
    /// available).
    pub location: String,
}

/// How an isolated scenario ended.
#[derive(Debug)]
pub struct Isolated {
    /// The bug check the child process stopped with, if any.
    pub bugcheck: Option<BugCheckReport>,
    /// Whether the scenario ran to its end without a bug check.
    pub completed: bool,
    /// Everything the child wrote to stderr.
    pub stderr: String,
}

const ISOLATED_ENV: &str = "WFP_SIM_ISOLATED_TEST";
const COMPLETED_MARKER: &str = "wfp-rs simulator: isolated scenario completed without a bug check";

impl Isolated {
    /// Asserts that the scenario stopped with `code`, and returns the report.
    #[track_caller]
    pub fn expect_bugcheck(&self, code: BugCheckCode) -> &BugCheckReport {
        match &self.bugcheck {
            Some(report) if report.code == code => report,
            Some(report) => panic!(
                "expected bug check {code}, the machine stopped with {}\n--- child stderr ---\n{}",
                report.code, self.stderr
            ),
            None => panic!(
                "expected bug check {code}, but there was none (completed: {})\n--- child stderr ---\n{}",
                self.completed, self.stderr
            ),
        }
    }

    /// Asserts that the scenario ran to its end without a bug check.
    #[track_caller]
    pub fn expect_completed(&self) {
        assert!(
            self.completed && self.bugcheck.is_none(),
            "expected the scenario to complete without a bug check\n--- child stderr ---\n{}",
            self.stderr
        );
    }
}

/// Runs `scenario` in a child process, so that a bug check (which ends the process, as it stops
/// a Windows machine) can be observed and asserted on.
///
/// `test_name` is the libtest name of the calling test (`module::test`, without the crate name);
/// the child re-runs exactly that test with an environment variable set, and in the child this
/// function runs `scenario` and exits. Prefer the [`bugcheck_test!`](crate::bugcheck_test) macro,
/// which fills in the name.
pub fn run_isolated(test_name: &str, scenario: impl FnOnce()) -> Isolated {
    run_isolated_with(test_name, &[], scenario)
}

/// [`run_isolated`], with `env` set in the child's environment too.
pub(crate) fn run_isolated_with(
    test_name: &str,
    env: &[(&str, &str)],
    scenario: impl FnOnce(),
) -> Isolated {
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(test_name) {
        scenario();
        eprintln!("{COMPLETED_MARKER}");
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let output = Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED_ENV, test_name)
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .output()
        .expect("could not start the test binary as a child process");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("running 1 test")
            || stderr.contains(COMPLETED_MARKER)
            || stderr.contains(STOP_PREFIX),
        "the isolated child did not run test `{test_name}`; is the name right?\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    Isolated {
        bugcheck: parse_stop(&stderr),
        completed: stderr.contains(COMPLETED_MARKER),
        stderr,
    }
}

fn parse_stop(stderr: &str) -> Option<BugCheckReport> {
    let mut lines = stderr.lines().skip_while(|l| !l.starts_with(STOP_PREFIX));
    let line = lines.next()?.strip_prefix(STOP_PREFIX)?;
    let _name = lines.next();
    let mut rest = |prefix: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(prefix))
            .unwrap_or_default()
            .to_owned()
    };
    let explanation = rest("wfp-rs simulator: ");
    let routine = rest(IN_PREFIX);
    let location = rest(AT_PREFIX);
    let hex = |s: &str| {
        usize::from_str_radix(
            s.trim().trim_start_matches("0x").trim_start_matches("0X"),
            16,
        )
        .ok()
    };
    let (code, rest) = line.split_once(' ')?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    let mut params = [0usize; 4];
    for (slot, text) in params.iter_mut().zip(inner.split(',')) {
        *slot = hex(text)?;
    }
    Some(BugCheckReport {
        code: BugCheckCode(u32::try_from(hex(code)?).ok()?),
        params,
        explanation,
        routine,
        location,
    })
}

#[doc(hidden)]
pub fn __test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, rest)) => format!("{rest}::{function}"),
        None => function.to_owned(),
    }
}

/// Declares a test whose scenario must stop the simulated machine with a given bug check.
///
/// ```
/// wfp_rs_sim::bugcheck_test! {
///     /// Waiting at DISPATCH_LEVEL is a bug.
///     fn waiting_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
///         // scenario
///     }
/// }
/// ```
///
/// The scenario runs in a child process (see [`run_isolated`]); the test passes only if the child
/// stopped with that code. An optional `(p1)` after the code also checks parameter 1.
#[macro_export]
macro_rules! bugcheck_test {
    ($(#[$meta:meta])* fn $name:ident() expects $code:ident $(($p1:expr))? $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let outcome = $crate::run_isolated(
                &$crate::__test_name(module_path!(), stringify!($name)),
                || $body,
            );
            let _report = outcome.expect_bugcheck($crate::__private::BugCheckCode::$code);
            $(assert_eq!(_report.params[0], $p1, "bug check parameter 1\n{}", outcome.stderr);)?
        }
    };
}

// --- the filter engine ----------------------------------------------------------------------------

use crate::kernel::wfp::{self as engine, SimValue};
use wfp_rs::layer::value::{ConditionFlags, HasRepr, IpProtocol as Protocol, repr};
use wfp_rs::layer::{Field, Layer};

/// A field value in the simulator's own form (opaque).
#[derive(Clone, Debug)]
pub struct SimFieldValue(SimValue);

/// A value the harness can put in a field of representation `R` at layer `L`.
pub trait FieldInput<R, L: Layer> {
    /// Converts to the simulator's owned value.
    fn into_sim(self) -> SimFieldValue;
}

macro_rules! int_input {
    ($($ty:ty => $repr:ident, $variant:ident;)*) => {$(
        impl<L: Layer> FieldInput<repr::$repr, L> for $ty {
            fn into_sim(self) -> SimFieldValue {
                SimFieldValue(SimValue::$variant(self))
            }
        }
    )*};
}

int_input! {
    u8 => U8, U8;
    u16 => U16, U16;
    u32 => U32, U32;
    u64 => U64, U64;
}

impl<L: Layer<Address = core::net::Ipv4Addr>> FieldInput<repr::Address, L> for core::net::Ipv4Addr {
    fn into_sim(self) -> SimFieldValue {
        // IPv4 fields are UINT32 in host byte order.
        SimFieldValue(SimValue::U32(u32::from(self)))
    }
}

impl<L: Layer<Address = core::net::Ipv6Addr>> FieldInput<repr::Address, L> for core::net::Ipv6Addr {
    fn into_sim(self) -> SimFieldValue {
        SimFieldValue(SimValue::Bytes16(self.octets()))
    }
}

impl<L: Layer> FieldInput<repr::IpProtocol, L> for Protocol {
    fn into_sim(self) -> SimFieldValue {
        SimFieldValue(SimValue::U8(self.into()))
    }
}

impl<L: Layer> FieldInput<repr::ConditionFlags, L> for ConditionFlags {
    fn into_sim(self) -> SimFieldValue {
        SimFieldValue(SimValue::U32(self.bits()))
    }
}

impl<L: Layer> FieldInput<repr::AppId, L> for &str {
    fn into_sim(self) -> SimFieldValue {
        SimFieldValue(SimValue::Blob(app_id_bytes(self).into()))
    }
}

impl<L: Layer> FieldInput<repr::ByteBlob, L> for &[u8] {
    fn into_sim(self) -> SimFieldValue {
        SimFieldValue(SimValue::Blob(self.into()))
    }
}

/// The bytes WFP uses for an application id: the NT path, lower case, UTF-16LE, NUL-terminated.
pub fn app_id_bytes(path: &str) -> Vec<u8> {
    let lower = path.to_lowercase();
    // UTF-16 never takes more code units than UTF-8 takes bytes, so one allocation holds it
    // (byte-by-byte collecting grew the vector many times: most of a connection's harness cost).
    let mut bytes = Vec::with_capacity(2 * lower.len() + 2);
    for unit in lower.encode_utf16().chain([0]) {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    bytes
}

/// A network or forward injection the simulated stack delivered ([`Machine::injected_packets`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedPacket {
    /// The inject routine, by name.
    pub routine: &'static str,
    /// What the stack made of the packet: success (0), or `INVALID_PARAMETER` for one that does
    /// not start with an IP header of its family.
    pub status: wfp_rs::Status,
    /// The packet's bytes from its data start.
    pub packet: Vec<u8>,
    /// What the IP packet layer of its direction decided when the network-injected packet was
    /// indicated to it again (as on Windows: a callout recognises its own injection with
    /// `FwpsQueryPacketInjectionState0`); `None` for forward injection, which is not classified
    /// again, and for a packet the stack dropped.
    pub reindicated: Option<wfp_rs::classify::Action>,
}

/// A classification to run at layer `L`: the values of its fields and its metadata. Fields not
/// set are `FWP_EMPTY`.
pub struct ClassifyRequest<L: Layer> {
    values: Vec<SimValue>,
    metadata: wfp_rs::sys::FWPS_INCOMING_METADATA_VALUES0,
    process_path: Option<Box<(Vec<u8>, wfp_rs::sys::FWP_BYTE_BLOB)>>,
    pendable: bool,
    reauthorization: bool,
    packet: Option<crate::kernel::packet::Endpoints>,
    _layer: core::marker::PhantomData<L>,
}

impl<L: Layer> Default for ClassifyRequest<L> {
    fn default() -> Self {
        ClassifyRequest::new()
    }
}

impl<L: Layer> fmt::Debug for ClassifyRequest<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyRequest")
            .field("layer", &L::NAME)
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

impl<L: Layer> ClassifyRequest<L> {
    /// A classification with every field empty and no metadata.
    pub fn new() -> Self {
        ClassifyRequest {
            values: vec![SimValue::Empty; L::FIELD_COUNT as usize],
            // SAFETY: the metadata structure is plain data (integers and raw pointers), valid
            // when zeroed: no metadata bits are set.
            metadata: unsafe { core::mem::zeroed() },
            process_path: None,
            pendable: false,
            reauthorization: false,
            packet: None,
            _layer: core::marker::PhantomData,
        }
    }

    /// Gives the classification a packet in `layerData`, as the stack does at the packet
    /// layers: a real `NET_BUFFER_LIST` holding the IP header and a TCP SYN or UDP header (no
    /// payload) travelling from `source` to `destination`, its data start where Microsoft's
    /// "Data offset positions" table puts it for `L` (at the IP header at OUTBOUND_IPPACKET and
    /// IPFORWARD, past it at INBOUND_IPPACKET, past both headers at INBOUND_TRANSPORT), and the
    /// header sizes in the metadata. At a layer without packet data it is ignored. The fields
    /// are not derived from it: set them with [`with`](Self::with).
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use wfp_rs::layer::OutboundIpPacketV4;
    /// use wfp_rs::layer::value::IpProtocol;
    /// use wfp_rs_sim::ClassifyRequest;
    ///
    /// let source: SocketAddr = "10.0.0.2:50000".parse().unwrap();
    /// let destination: SocketAddr = "192.0.2.7:443".parse().unwrap();
    /// let request =
    ///     ClassifyRequest::<OutboundIpPacketV4>::new().with_packet(IpProtocol::Tcp, source, destination);
    /// # let _ = request;
    /// ```
    pub fn with_packet(
        mut self,
        protocol: wfp_rs::layer::value::IpProtocol,
        source: std::net::SocketAddr,
        destination: std::net::SocketAddr,
    ) -> Self {
        self.packet = Some(crate::kernel::packet::Endpoints {
            protocol,
            source,
            destination,
        });
        self
    }

    /// Sets field `K`.
    pub fn with<K>(mut self, value: impl FieldInput<K::Repr, L>) -> Self
    where
        K: Field<L> + HasRepr,
    {
        self.values[K::INDEX as usize] = value.into_sim().0;
        self
    }

    /// Sets the process metadata (`FWPS_METADATA_FIELD_PROCESS_ID`, `..._PROCESS_PATH`).
    pub fn process(mut self, pid: u64, path: &str) -> Self {
        let mut storage = Box::new((
            app_id_bytes(path),
            wfp_rs::sys::FWP_BYTE_BLOB {
                size: 0,
                data: core::ptr::null_mut(),
            },
        ));
        storage.1 = wfp_rs::sys::FWP_BYTE_BLOB {
            size: storage.0.len() as u32,
            data: storage.0.as_mut_ptr(),
        };
        self.metadata.processId = pid;
        self.metadata.processPath = &mut storage.1;
        self.metadata.currentMetadataValues |= wfp_rs::sys::FWPS_METADATA_FIELD_PROCESS_ID
            | wfp_rs::sys::FWPS_METADATA_FIELD_PROCESS_PATH;
        self.process_path = Some(storage);
        self
    }

    /// Gives the classification a completion handle (`FWPS_METADATA_FIELD_COMPLETION_HANDLE`),
    /// so a callout may pend it, as at ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT.
    pub fn pendable(mut self) -> Self {
        self.pendable = true;
        self
    }

    /// Marks the classification as a reauthorization, as the engine presents one: pending is
    /// refused (`STATUS_FWP_CANNOT_PEND`), and where the layer has a `FLAGS` field,
    /// `FWP_CONDITION_FLAG_IS_REAUTHORIZE` is set in it (beside any flags set with
    /// [`with`](Self::with)), so `Classify::is_reauthorization` says so.
    pub fn reauthorization(mut self) -> Self {
        self.reauthorization = true;
        self
    }

    /// The values as the engine hands them to callouts: a reauthorization's `FLAGS` field
    /// carries `FWP_CONDITION_FLAG_IS_REAUTHORIZE`.
    fn presented_values(&self) -> Vec<SimValue> {
        let mut values = self.values.clone();
        if self.reauthorization
            && let Some(flags) = L::FIELDS.iter().find(|f| f.name == "Flags")
            && let Some(slot) = values.get_mut(flags.index as usize)
        {
            let bits = match *slot {
                SimValue::U32(bits) => bits,
                _ => 0,
            };
            *slot = SimValue::U32(bits | wfp_rs::sys::FWP_CONDITION_FLAG_IS_REAUTHORIZE);
        }
        values
    }

    /// Sets the flow handle metadata (`FWPS_METADATA_FIELD_FLOW_HANDLE`).
    pub fn flow_handle(mut self, handle: u64) -> Self {
        self.metadata.flowHandle = handle;
        self.metadata.currentMetadataValues |= wfp_rs::sys::FWPS_METADATA_FIELD_FLOW_HANDLE;
        self
    }
}

/// The filter engine's final decision for one classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Permit or block.
    pub action: wfp_rs::classify::Action,
    /// Whether the decision was hard (no write right left).
    pub hard: bool,
    /// Whether a callout vetoed a hard permit.
    pub vetoed: bool,
    /// Whether the deciding callout absorbed the data (`FWPS_CLASSIFY_OUT_FLAG_ABSORB`).
    pub absorbed: bool,
    /// The filter that decided, if any.
    pub filter_id: Option<u64>,
    /// Set if a callout pended the classification (`FwpsPendOperation0` or
    /// `FwpsPendClassify0`).
    pub pending: Option<Pending>,
}

impl Decision {
    /// The stack's drop of a packet whose flow a reauthorization tore down: no filter, no
    /// callout.
    fn dropped() -> Decision {
        Decision {
            action: wfp_rs::classify::Action::Block,
            hard: true,
            vetoed: false,
            absorbed: false,
            filter_id: None,
            pending: None,
        }
    }
}

/// An ALE flow [`Machine::connect`] established, as the stack remembers it for
/// [`Machine::packet`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct EstablishedFlow {
    /// The layer that authorized it: ALE_AUTH_CONNECT or ALE_AUTH_RECV_ACCEPT.
    authorized_at: u16,
    /// That layer's policy changes when the flow was last authorized.
    policy_changes: u64,
    /// Torn down by a reauthorization that did not permit it.
    cut: bool,
}

fn lock_flows(
    kernel: &Kernel,
) -> std::sync::MutexGuard<'_, rustc_hash::FxHashMap<u64, EstablishedFlow>> {
    kernel
        .established_flows
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forgets the history versions of a layer's stack requests when the connection leaves the
/// layer (see `Bfe::request_versions`).
struct RequestHistory<'m> {
    machine: &'m Machine,
    requests: [Option<usize>; 2],
}

impl Drop for RequestHistory<'_> {
    fn drop(&mut self) {
        for request in self.requests.into_iter().flatten() {
            self.machine.run(|| engine::forget_request(request));
        }
    }
}

/// An interval being measured ([`Machine::stopwatch`]).
enum Stopwatch<'m> {
    Host(std::time::Instant),
    /// The scheduler's virtual interrupt time at the start, in 100-ns ticks.
    Virtual(&'m crate::kernel::sched::Scheduler, u64),
}

impl Stopwatch<'_> {
    fn elapsed(&self) -> std::time::Duration {
        match self {
            Stopwatch::Host(start) => start.elapsed(),
            Stopwatch::Virtual(sched, start) => std::time::Duration::from_nanos(
                sched.now().saturating_sub(*start).saturating_mul(100),
            ),
        }
    }
}

/// A classification a callout pended; see [`Machine::is_pending`] and
/// [`Machine::wait_for_completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending(usize);

impl Machine {
    /// How many pended classifications wait for their driver to complete them, on this machine
    /// (pends by completion handle and by classify handle).
    pub fn pending_classifications(&self) -> usize {
        self.run(engine::pends_outstanding)
    }

    /// Whether the pended classification is still waiting for `FwpsCompleteOperation0` or
    /// `FwpsCompleteClassify0`.
    pub fn is_pending(&self, pending: Pending) -> bool {
        self.run(|| engine::is_pending(pending.0))
    }

    /// Waits until the driver completes the pended classification (as the network stack holds a
    /// connection until then). Returns the callout's final decision if it completed with one
    /// (`FwpsCompleteClassify0` with a classify-out); `None` means the stack reauthorizes.
    pub fn wait_for_completion(&self, pending: Pending) -> Option<wfp_rs::classify::Action> {
        self.run(|| engine::wait_for_completion(pending.0))
            .map(wfp_rs::classify::Action::from_raw)
    }

    fn decision(verdict: engine::Verdict) -> Decision {
        Decision {
            action: wfp_rs::classify::Action::from_raw(verdict.action),
            hard: verdict.hard,
            vetoed: verdict.vetoed,
            absorbed: verdict.absorbed,
            filter_id: verdict.filter_id,
            pending: verdict.pended.map(Pending),
        }
    }
}

impl Machine {
    /// Runs one classification at layer `L` on this thread at `irql`, as the network stack would:
    /// the matching filters are evaluated by sublayer and weight, callouts are called through
    /// their registered `classifyFn`, and WFP's arbitration decides.
    pub fn classify<L: Layer>(
        &self,
        irql: wfp_rs::irql::Irql,
        request: &ClassifyRequest<L>,
    ) -> Decision {
        let layer = wfp_rs::layer::layer_by_id(L::ID).expect("every Layer type is in the table");
        let values = || request.presented_values();
        let start = request_packet_start(layer, &request.metadata);
        let build_packet = move || {
            let endpoints = request.packet.expect("built only with endpoints");
            crate::kernel::packet::SimPacket::build(
                &endpoints,
                start.unwrap_or(crate::kernel::packet::Start::TransportHeader),
            )
        };
        let packet: Option<&dyn Fn() -> crate::kernel::packet::SimPacket> =
            (request.packet.is_some() && start.is_some()).then_some(&build_packet);
        let mut incoming = engine::Incoming {
            layer,
            values: engine::Values::new(&values),
            metadata: request.metadata,
            process_path: None,
            layer_data: core::ptr::null_mut(),
            packet,
            classify_context: core::ptr::null(),
            flow_context: 0,
            pendable: request.pendable,
            reauthorization: request.reauthorization,
        };
        let verdict =
            state::with_context(&self.kernel, irql.0, 0, || engine::classify(&mut incoming));
        Machine::decision(verdict)
    }
}

/// A classification prepared once and handed straight to one registered callout's
/// `classifyFn`, as often as a benchmark likes: no filter matching, no arbitration, no pend
/// bookkeeping — only the call the filter engine makes, with the same structures
/// ([`Machine::classify`] builds them anew for every classification).
///
/// For measuring a callout's own cost, where the simulated engine's work would swamp it; tests
/// of behaviour use [`Machine::classify`] or [`Machine::connect`]. The classification carries no
/// completion handle and no classify context, so a callout cannot pend it, and no flow context.
///
/// While it exists it counts as a call into the callout in progress: drop it before the
/// callout is unregistered (unregistration waits for calls in progress, as on Windows).
///
/// ```
/// # use wfp_rs_sim::{ClassifyRequest, Machine};
/// # use wfp_rs::callout::CalloutKey;
/// # use wfp_rs::layer::AleAuthConnectV4;
/// # fn demo(machine: &Machine, callout: CalloutKey<AleAuthConnectV4>) {
/// let request = ClassifyRequest::new(); // at the key's layer
/// let mut direct = machine.direct_classify(callout, &request).expect("a filter calls it");
/// let action = machine.at_dispatch(|irql| direct.call(irql));
/// # let _ = action;
/// # }
/// ```
pub struct DirectClassify<L: Layer> {
    direct: engine::Direct,
    // What the prepared metadata's process path points to (the request's own copy may go).
    _process_path: Option<Box<(Vec<u8>, wfp_rs::sys::FWP_BYTE_BLOB)>>,
    _layer: core::marker::PhantomData<L>,
}

impl<L: Layer> fmt::Debug for DirectClassify<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectClassify")
            .field("layer", &L::NAME)
            .finish_non_exhaustive()
    }
}

impl<L: Layer> DirectClassify<L> {
    /// Calls the callout's `classifyFn` once with the prepared classification, on this thread
    /// at its IRQL (the token's), with a fresh classify-out (`FWP_ACTION_CONTINUE`, the write
    /// right). Returns the action the callout left. Call it inside the machine it was prepared
    /// in ([`Machine::at_dispatch`], [`Machine::at_passive`]); elsewhere it panics.
    pub fn call(&mut self, irql: &impl wfp_rs::irql::AtMostDispatch) -> wfp_rs::classify::Action {
        let _ = irql;
        assert!(
            self.direct.in_its_machine(),
            "DirectClassify::call outside the machine it was prepared in"
        );
        let (action, _rights, _absorbed) = self.direct.call();
        wfp_rs::classify::Action::from_raw(action)
    }
}

impl Machine {
    /// Prepares `request` for [`DirectClassify::call`]: the callout `callout` (registered, with
    /// a classifyFn) gets the structures a classification at layer `L` would give it, with the
    /// first committed filter at `L` that calls it. The request is at the key's layer. Fails if
    /// no such filter exists or the callout is not registered.
    pub fn direct_classify<L: Layer>(
        &self,
        callout: wfp_rs::callout::CalloutKey<L>,
        request: &ClassifyRequest<L>,
    ) -> Result<DirectClassify<L>, &'static str> {
        let layer = wfp_rs::layer::layer_by_id(L::ID).expect("every Layer type is in the table");
        let mut metadata = request.metadata;
        let process_path = request.process_path.as_ref().map(|path| {
            let mut copy = Box::new((path.0.clone(), path.1));
            copy.1.data = copy.0.as_mut_ptr();
            metadata.processPath = &mut copy.1;
            copy
        });
        let direct = self.run(|| {
            engine::Direct::prepare(
                layer,
                &request.presented_values(),
                metadata,
                callout.guid().0,
            )
        })?;
        Ok(DirectClassify {
            direct,
            _process_path: process_path,
            _layer: core::marker::PhantomData,
        })
    }
}

// --- connections ----------------------------------------------------------------------------------

/// A connection attempt by a process, for [`Machine::connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The process id.
    pub pid: u64,
    /// The process image as an NT path (`\device\harddiskvolume3\...\app.exe`).
    pub app: String,
    /// TCP, UDP, ...
    pub protocol: Protocol,
    /// The local endpoint.
    pub local: std::net::SocketAddr,
    /// The remote endpoint.
    pub remote: std::net::SocketAddr,
    /// Whether this process connects out, or accepts a connection in.
    pub direction: wfp_rs::metadata::Direction,
}

/// At which IRQL [`Machine::connect`] runs the ALE authorization layers. (Transport layers and
/// ALE_FLOW_ESTABLISHED always run at `DISPATCH_LEVEL`, as in the network stack.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AleIrql {
    /// `PASSIVE_LEVEL`: a TCP `connect` from the caller's thread.
    Passive,
    /// `DISPATCH_LEVEL`: what a callout must always be prepared for.
    Dispatch,
}

/// What [`Machine::connect`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOutcome {
    /// The final decision: permit only if every layer permitted.
    pub decision: Decision,
    /// Each layer classified, in order, with its decision; classification stops at the first
    /// block.
    pub layers: Vec<(&'static str, Decision)>,
    /// The flow handle the connection got, if it was established.
    pub flow_handle: Option<u64>,
    /// Whether a callout pended an authorization (the connection waited for its completion;
    /// at ALE_AUTH_CONNECT `layers` then lists the layer twice: the pended classification and
    /// the reauthorization).
    pub pended: bool,
    /// For a pended connection, the pended round trip: from the start of the classification
    /// that pended to the layer's final decision (the callout asked, the pend completed and,
    /// unless the completion carried the decision, the reauthorization answered). Measured on
    /// the host's clock, or on a [deterministic](Machine::deterministic) machine on its virtual
    /// clock (so that the outcome is a function of the seed); the layers before and after are
    /// not in it.
    pub pend_round_trip: Option<std::time::Duration>,
    /// Where an outbound connection went: its remote endpoint after ALE_CONNECT_REDIRECT (a
    /// callout's applied connect request), which the later layers saw. The connection's own
    /// remote endpoint when nothing redirected it, and for an inbound connection.
    pub remote: std::net::SocketAddr,
    /// Where an outbound connection's socket was bound: its local endpoint after
    /// ALE_BIND_REDIRECT (a callout's applied bind request), which the later layers saw. The
    /// connection's own local endpoint when nothing redirected the bind, and for an inbound
    /// connection.
    pub local: std::net::SocketAddr,
    /// The connection's redirect records after ALE_CONNECT_REDIRECT: one per accepted
    /// redirection that named a redirect handle (`localRedirectHandle`). A proxy that accepts
    /// this connection sets them on its own outbound connection
    /// ([`Machine::connect_with_redirect_records`]). Empty for an inbound connection.
    pub redirect_records: RedirectRecords,
}

/// A connection's WFP redirect records: opaque data that relates a proxy's outbound connection
/// to the connection it proxies (Winsock's `SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS` on the
/// accepted socket, `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS` on the proxy's socket). In the
/// simulator: the redirect handles that redirected the connection, oldest first, which
/// `FwpsQueryConnectionRedirectState0` answers from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedirectRecords(Vec<engine::RedirectRecord>);

impl RedirectRecords {
    /// Whether no redirect handle redirected the connection.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many redirections the records hold.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// What [`Machine::stream`] did: the filter engine's decision, and what the callouts left in
/// the `FWPS_STREAM_CALLOUT_IO_PACKET0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOutcome {
    /// The filter engine's decision for the indication.
    pub decision: Decision,
    /// `streamAction`: an `FWPS_STREAM_ACTION_*` value; `FWPS_STREAM_ACTION_NONE` unless a
    /// callout set another.
    pub stream_action: wfp_rs::sys::FWPS_STREAM_ACTION_TYPE,
    /// `countBytesRequired` (meaningful with `FWPS_STREAM_ACTION_NEED_MORE_DATA`).
    pub count_bytes_required: u32,
    /// `countBytesEnforced`: how many bytes of the indication the decision applies to.
    pub count_bytes_enforced: usize,
}

/// The null SID (S-1-0-0): the package id of a process outside an AppContainer.
const NULL_SID: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Where a connection's value for a layer field comes from: found once per layer from the
/// field's name ([`FieldSource::for_layer`]), so classifying a connection does not compare every
/// field's name with every name the harness knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldSource {
    Empty,
    AppId,
    UserId,
    PackageId,
    LocalAddress,
    RemoteAddress,
    LocalPort,
    RemotePort,
    Protocol,
    Flags,
    ReauthorizeReason,
    Direction,
    U8(u8),
    U32(u32),
    U64(u64),
}

impl FieldSource {
    /// The source of field `name` (a [`wfp_rs::layer::FieldInfo`] name).
    fn of(name: &str) -> FieldSource {
        match name {
            "AleAppId" | "AleOriginalAppId" => FieldSource::AppId,
            "AleUserId" => FieldSource::UserId,
            "AlePackageId" => FieldSource::PackageId,
            "IpLocalAddress" => FieldSource::LocalAddress,
            "IpRemoteAddress" => FieldSource::RemoteAddress,
            "IpLocalPort" => FieldSource::LocalPort,
            "IpRemotePort" => FieldSource::RemotePort,
            "IpProtocol" => FieldSource::Protocol,
            "Flags" => FieldSource::Flags,
            "ReauthorizeReason" => FieldSource::ReauthorizeReason,
            "Direction" => FieldSource::Direction,
            // NlatUnicast; the destination address type is unicast too.
            "IpLocalAddressType" | "IpDestinationAddressType" => FieldSource::U8(1),
            "IpLocalInterface" | "IpArrivalInterface" | "IpNexthopInterface" => {
                FieldSource::U64(0x0006_0000_0100_0000)
            }
            "InterfaceIndex" | "ArrivalInterfaceIndex" | "NexthopInterfaceIndex" => {
                FieldSource::U32(2)
            }
            "SubInterfaceIndex" | "NexthopSubInterfaceIndex" => FieldSource::U32(0),
            // IF_TYPE_ETHERNET_CSMACD; no tunnel.
            "InterfaceType" | "ArrivalInterfaceType" | "NexthopInterfaceType" => {
                FieldSource::U32(6)
            }
            "TunnelType" | "ArrivalTunnelType" | "NexthopTunnelType" => FieldSource::U32(0),
            "CompartmentId" => FieldSource::U32(1),
            // NET_FW_PROFILE2_PRIVATE.
            "CurrentProfileId" | "OriginalProfileId" | "LocalInterfaceProfileId" => {
                FieldSource::U32(2)
            }
            _ => FieldSource::Empty,
        }
    }

    /// The sources of `layer`'s fields, by index (`FWPS_FIELD_<LAYER>_MAX` of them). Fields
    /// without a condition key, and the fields of a layer this crate does not know, are empty.
    fn for_layer(layer: &wfp_rs::layer::LayerInfo) -> &'static [FieldSource] {
        // Indexed by runtime layer id (all below 82).
        static TABLE: std::sync::OnceLock<Vec<Box<[FieldSource]>>> = std::sync::OnceLock::new();
        let table = TABLE.get_or_init(|| {
            let ids = wfp_rs::layer::ALL_LAYERS.iter().map(|l| usize::from(l.id));
            let mut table = vec![Box::default(); ids.max().map_or(0, |max| max + 1)];
            for layer in wfp_rs::layer::ALL_LAYERS {
                let mut sources = vec![FieldSource::Empty; layer.field_count as usize];
                for field in layer.fields {
                    if let Some(slot) = sources.get_mut(field.index as usize) {
                        *slot = FieldSource::of(field.name);
                    }
                }
                table[usize::from(layer.id)] = sources.into_boxed_slice();
            }
            table
        });
        table
            .get(usize::from(layer.id))
            .map_or(&[], |sources| sources)
    }
}

/// What a connection presents at every layer, computed once per connection (lower-casing and
/// encoding the app id for each field of each layer was most of the harness's cost).
struct Presented<'a> {
    connection: &'a Connection,
    /// [`app_id_bytes`] of the path, shared by the `AleAppId` and `AleOriginalAppId` values
    /// (the engine copies values into fresh storage for each classification).
    app_id: Arc<[u8]>,
}

/// An opaque token-access blob: the simulator models no security.
static NO_TOKEN: std::sync::LazyLock<Arc<[u8]>> =
    std::sync::LazyLock::new(|| Arc::from(&[0u8; 16][..]));
/// [`NULL_SID`], shared.
static NULL_PACKAGE: std::sync::LazyLock<Arc<[u8]>> =
    std::sync::LazyLock::new(|| Arc::from(&NULL_SID[..]));

impl<'a> Presented<'a> {
    fn new(connection: &'a Connection) -> Self {
        Presented {
            connection,
            app_id: app_id_bytes(&connection.app).into(),
        }
    }

    /// The values of `layer`'s fields for this connection, by index.
    /// `reauthorize`: the `REAUTHORIZE_REASON` bits of a reauthorization, `None` for a first
    /// authorization.
    fn values(&self, layer: &wfp_rs::layer::LayerInfo, reauthorize: Option<u32>) -> Vec<SimValue> {
        let sources = FieldSource::for_layer(layer);
        (0..layer.field_count as usize)
            .map(|index| {
                let source = sources.get(index).copied();
                self.value(
                    source.unwrap_or(FieldSource::Empty),
                    layer.ip_version,
                    reauthorize,
                )
            })
            .collect()
    }

    /// The value from `source` for this connection at a layer of `version`.
    #[inline]
    fn value(
        &self,
        source: FieldSource,
        version: Option<wfp_rs::layer::IpVersion>,
        reauthorize: Option<u32>,
    ) -> SimValue {
        let connection = self.connection;
        let address = |addr: std::net::IpAddr| match (addr, version) {
            (std::net::IpAddr::V4(v4), Some(wfp_rs::layer::IpVersion::V4)) => {
                SimValue::U32(u32::from(v4))
            }
            (std::net::IpAddr::V6(v6), Some(wfp_rs::layer::IpVersion::V6)) => {
                SimValue::Bytes16(v6.octets())
            }
            _ => SimValue::Empty,
        };
        match source {
            FieldSource::Empty => SimValue::Empty,
            FieldSource::AppId => SimValue::Blob(Arc::clone(&self.app_id)),
            FieldSource::UserId => SimValue::TokenAccess(Arc::clone(&NO_TOKEN)),
            FieldSource::PackageId => SimValue::Sid(Arc::clone(&NULL_PACKAGE)),
            FieldSource::LocalAddress => address(connection.local.ip()),
            FieldSource::RemoteAddress => address(connection.remote.ip()),
            FieldSource::LocalPort => SimValue::U16(connection.local.port()),
            FieldSource::RemotePort => SimValue::U16(connection.remote.port()),
            FieldSource::Protocol => SimValue::U8(connection.protocol.into()),
            FieldSource::Flags => {
                let mut flags = 0;
                if connection.remote.ip().is_loopback() {
                    flags |= wfp_rs::sys::FWP_CONDITION_FLAG_IS_LOOPBACK;
                }
                if reauthorize.is_some() {
                    flags |= wfp_rs::sys::FWP_CONDITION_FLAG_IS_REAUTHORIZE;
                }
                SimValue::U32(flags)
            }
            // A completed pend, or a policy change (`Machine::packet`).
            FieldSource::ReauthorizeReason => SimValue::U32(reauthorize.unwrap_or(0)),
            FieldSource::Direction => SimValue::U32(match connection.direction {
                wfp_rs::metadata::Direction::Outbound => wfp_rs::sys::FWP_DIRECTION_OUTBOUND,
                wfp_rs::metadata::Direction::Inbound => wfp_rs::sys::FWP_DIRECTION_INBOUND,
            } as u32),
            FieldSource::U8(value) => SimValue::U8(value),
            FieldSource::U32(value) => SimValue::U32(value),
            FieldSource::U64(value) => SimValue::U64(value),
        }
    }
}

impl Machine {
    /// Process `connection.pid` opens (or accepts) a connection: runs the layers the network
    /// stack runs, in order, and stops at the first block.
    ///
    /// Outbound: ALE_BIND_REDIRECT and ALE_RESOURCE_ASSIGNMENT (the implicit bind of the
    /// connecting socket), ALE_CONNECT_REDIRECT, ALE_AUTH_CONNECT, OUTBOUND_TRANSPORT (the first
    /// packet), ALE_FLOW_ESTABLISHED. Inbound:
    /// INBOUND_TRANSPORT, ALE_AUTH_RECV_ACCEPT, ALE_FLOW_ESTABLISHED. The IP version follows the
    /// addresses; the ALE authorization layers run at `ale_irql`, the others at
    /// `DISPATCH_LEVEL`.
    ///
    /// At ALE_CONNECT_REDIRECT `layerData` is a real `FWPS_CONNECT_REQUEST0` with the
    /// connection's endpoints; if a callout applies a new remote endpoint
    /// (`FwpsApplyModifiedLayerData0`), the later layers classify the connection to it, and
    /// [`ConnectOutcome::remote`] reports it. The metadata there carries the connection's
    /// redirect records (`FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE`), empty for an
    /// application's connection: see [`connect_with_redirect_records`](Self::connect_with_redirect_records).
    /// A pended classification there (`FwpsPendClassify0`) keeps its connect request writable
    /// until the pend is completed, and the later layers see what was applied by then.
    ///
    /// At ALE_BIND_REDIRECT `layerData` is a real `FWPS_BIND_REQUEST0` with the connection's
    /// local endpoint; if a callout applies a new one, ALE_RESOURCE_ASSIGNMENT and the later
    /// layers classify the connection from it, and [`ConnectOutcome::local`] reports it.
    /// INFERRED: the documentation says ALE_BIND_REDIRECT is where a bind's local address and
    /// port are changed, and that ALE_RESOURCE_ASSIGNMENT sees explicit and implicit binds; that
    /// the implicit bind of a connect crosses ALE_BIND_REDIRECT too, and before
    /// ALE_RESOURCE_ASSIGNMENT, is inferred. Explicit `bind()`/`listen()` without a connection
    /// are not modelled: each connection is its own socket, so a bind redirect affects that
    /// connection only.
    pub fn connect(&self, connection: &Connection, ale_irql: AleIrql) -> ConnectOutcome {
        self.connect_with_redirect_records(connection, ale_irql, &RedirectRecords::default())
    }

    /// [`connect`](Self::connect) for a proxy's outbound connection whose socket carries
    /// `records` (the [`ConnectOutcome::redirect_records`] of the connection it proxies, set
    /// with Winsock's `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS`, as Microsoft's "Using Bind or
    /// Connect Redirection" tells a proxy to): at ALE_CONNECT_REDIRECT,
    /// `FwpsQueryConnectionRedirectState0` then answers `FWPS_CONNECTION_REDIRECTED_BY_SELF` to
    /// the callout whose redirect handle made the newest record, so it lets the proxy's
    /// connection through instead of redirecting it back to the proxy.
    pub fn connect_with_redirect_records(
        &self,
        connection: &Connection,
        ale_irql: AleIrql,
        records: &RedirectRecords,
    ) -> ConnectOutcome {
        let outbound = connection.direction == wfp_rs::metadata::Direction::Outbound;
        let handle = outbound.then(|| {
            let initial = records.0.clone();
            self.run(|| engine::open_redirect_records(initial))
        });
        let mut outcome = self.connect_through_layers(connection, ale_irql, handle.unwrap_or(0));
        if let Some(handle) = handle {
            outcome.redirect_records =
                RedirectRecords(self.run(|| engine::close_redirect_records(handle)));
        }
        outcome
    }

    /// The layers of [`connect`](Self::connect); `records` is the redirect records handle for
    /// ALE_CONNECT_REDIRECT's metadata (0 for none).
    fn connect_through_layers(
        &self,
        connection: &Connection,
        ale_irql: AleIrql,
        records: usize,
    ) -> ConnectOutcome {
        use wfp_rs::layer::*;
        let v4 = connection.remote.is_ipv4();
        let ale = match ale_irql {
            AleIrql::Passive => Irql::PASSIVE,
            AleIrql::Dispatch => Irql::DISPATCH,
        };
        let flow = self
            .kernel
            .next_flow
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let mut presented = Presented::new(connection);
        // The connection as a callout rebound it at ALE_BIND_REDIRECT, if one did.
        let rebound = std::cell::OnceCell::new();
        // The connection as a callout redirected it at ALE_CONNECT_REDIRECT, if one did.
        let redirected = std::cell::OnceCell::new();
        // Read before the authorization, so a policy change during it reauthorizes the flow.
        let authorized_at = match (connection.direction, v4) {
            (wfp_rs::metadata::Direction::Outbound, true) => AleAuthConnectV4::ID,
            (wfp_rs::metadata::Direction::Outbound, false) => AleAuthConnectV6::ID,
            (wfp_rs::metadata::Direction::Inbound, true) => AleAuthRecvAcceptV4::ID,
            (wfp_rs::metadata::Direction::Inbound, false) => AleAuthRecvAcceptV6::ID,
        };
        let policy_changes = self.run(|| engine::policy_changes(authorized_at));
        let plan: &[(u16, Irql, bool)] = match (connection.direction, v4) {
            (wfp_rs::metadata::Direction::Outbound, true) => &[
                (AleBindRedirectV4::ID, ale, false),
                (AleResourceAssignmentV4::ID, ale, false),
                (AleConnectRedirectV4::ID, ale, false),
                (AleAuthConnectV4::ID, ale, false),
                (OutboundTransportV4::ID, Irql::DISPATCH, true),
                (AleFlowEstablishedV4::ID, Irql::DISPATCH, true),
            ],
            (wfp_rs::metadata::Direction::Outbound, false) => &[
                (AleBindRedirectV6::ID, ale, false),
                (AleResourceAssignmentV6::ID, ale, false),
                (AleConnectRedirectV6::ID, ale, false),
                (AleAuthConnectV6::ID, ale, false),
                (OutboundTransportV6::ID, Irql::DISPATCH, true),
                (AleFlowEstablishedV6::ID, Irql::DISPATCH, true),
            ],
            (wfp_rs::metadata::Direction::Inbound, true) => &[
                (InboundTransportV4::ID, Irql::DISPATCH, false),
                (AleAuthRecvAcceptV4::ID, ale, false),
                (AleFlowEstablishedV4::ID, Irql::DISPATCH, true),
            ],
            (wfp_rs::metadata::Direction::Inbound, false) => &[
                (InboundTransportV6::ID, Irql::DISPATCH, false),
                (AleAuthRecvAcceptV6::ID, ale, false),
                (AleFlowEstablishedV6::ID, Irql::DISPATCH, true),
            ],
        };
        // An inbound attempt's absorbed packet may come back as a reinjected clone: the
        // injection routine queues it for this thread from now until the attempt ends.
        let _awaiting = (connection.direction == wfp_rs::metadata::Direction::Inbound)
            .then(|| AwaitingReinjection::new(&self.kernel, flow));
        // Each layer, and a pended one's reauthorization.
        let mut layers = Vec::with_capacity(plan.len() + 1);
        let mut pended = false;
        let mut pend_round_trip = None;
        for &(id, irql, has_flow) in plan {
            let layer = wfp_rs::layer::layer_by_id(id).expect("known layer");
            let classified = self.stopwatch();
            // ALE_CONNECT_REDIRECT's layerData: the stack's connect request, which callouts
            // may rewrite (FwpsApplyModifiedLayerData0).
            let mut request = (id == AleConnectRedirectV4::ID || id == AleConnectRedirectV6::ID)
                .then(|| Box::new(connect_request(presented.connection)));
            // ALE_BIND_REDIRECT's layerData: the stack's bind request, likewise.
            let mut bind = (id == AleBindRedirectV4::ID || id == AleBindRedirectV6::ID)
                .then(|| Box::new(bind_request(presented.connection)));
            // The history versions of this layer's request, dropped after it (declared after
            // the requests, so dropped before them).
            let _history = RequestHistory {
                machine: self,
                requests: [
                    request.as_deref().map(|r| core::ptr::from_ref(r) as usize),
                    bind.as_deref().map(|b| core::ptr::from_ref(b) as usize),
                ],
            };
            // The redirect records go with the connect request only (ALE_CONNECT_REDIRECT).
            let mut layer_data = || match (request.as_mut(), bind.as_mut()) {
                (Some(request), _) => Some(Carried::Request {
                    request: &mut **request as *mut _ as usize,
                    records,
                }),
                (_, Some(bind)) => Some(Carried::Request {
                    request: &mut **bind as *mut _ as usize,
                    records: 0,
                }),
                (None, None) => None,
            };
            let carried = match layer_data() {
                Some(carried) => carried,
                // The packet carries the attempt (`flow`) even where the layer has no flow
                // handle, so a clone of it finds this attempt when it is reinjected.
                None => Carried::Built { origin: flow },
            };
            let mut decision = self.classify_packet_of(
                layer,
                &presented,
                irql,
                has_flow.then_some(flow),
                None,
                carried,
            );
            if let Some(pending) = decision.pending {
                // The stack holds the connection until the callout completes the pend.
                pended = true;
                layers.push((layer.name, decision));
                let final_action = self.wait_for_completion(pending);
                if layer.name.starts_with("ALE_AUTH_RECV_ACCEPT") {
                    // No reauthorization at RECV_ACCEPT: the absorbed packet is gone unless the
                    // callout cloned it and reinjects the clone, which then crosses the inbound
                    // layers again; the connection completes when that packet is delivered.
                    let delivered = self.deliver_reinjected(connection, &presented, flow, ale);
                    let pend_round_trip = Some(classified.elapsed());
                    let Some(reinjected) = delivered else {
                        return ConnectOutcome {
                            decision,
                            layers,
                            flow_handle: None,
                            pended,
                            pend_round_trip,
                            remote: connection.remote,
                            local: connection.local,
                            redirect_records: RedirectRecords::default(),
                        };
                    };
                    let established = reinjected
                        .iter()
                        .all(|(_, d)| d.action == wfp_rs::classify::Action::Permit);
                    layers.extend(reinjected);
                    let decision = layers.last().map(|(_, d)| *d).expect("at least one layer");
                    return ConnectOutcome {
                        decision,
                        layers,
                        flow_handle: established.then_some(flow),
                        pended,
                        pend_round_trip,
                        remote: connection.remote,
                        local: connection.local,
                        redirect_records: RedirectRecords::default(),
                    };
                }
                decision = match final_action {
                    // FwpsCompleteClassify0 with a classify-out: that is the layer's decision.
                    Some(action) => Decision {
                        action,
                        hard: false,
                        vetoed: false,
                        absorbed: false,
                        pending: None,
                        ..decision
                    },
                    // FwpsCompleteOperation0 (or FwpsCompleteClassify0 without a classify-out):
                    // the stack classifies the connection again (at ALE_CONNECT_REDIRECT with
                    // the connect request as the first classification left it).
                    None => self.classify_packet_of(
                        layer,
                        &presented,
                        irql,
                        None,
                        Some(wfp_rs::sys::FWP_CONDITION_REAUTHORIZE_REASON_CLASSIFY_COMPLETION),
                        match layer_data() {
                            Some(carried) => carried,
                            None => Carried::Built { origin: 0 },
                        },
                    ),
                };
                pend_round_trip = Some(classified.elapsed());
            }
            if let Some(bind) = bind
                && let Some(local) =
                    wfp_rs::redirect::socket_address_from_storage(&bind.localAddressAndPort)
                && local != presented.connection.local
                && local.is_ipv4() == presented.connection.local.is_ipv4()
            {
                // Rebound: the later layers see the new local endpoint.
                let mut moved = presented.connection.clone();
                moved.local = local;
                presented = Presented::new(rebound.get_or_init(|| moved));
            }
            if let Some(request) = request
                && let Some(remote) =
                    wfp_rs::redirect::socket_address_from_storage(&request.remoteAddressAndPort)
                && remote != presented.connection.remote
                && remote.is_ipv4() == presented.connection.remote.is_ipv4()
            {
                // Redirected: the later layers see the new remote endpoint.
                let mut moved = presented.connection.clone();
                moved.remote = remote;
                presented = Presented::new(redirected.get_or_init(|| moved));
            }
            layers.push((layer.name, decision));
            if decision.action != wfp_rs::classify::Action::Permit {
                return ConnectOutcome {
                    decision,
                    layers,
                    flow_handle: None,
                    pended,
                    pend_round_trip,
                    remote: presented.connection.remote,
                    local: presented.connection.local,
                    redirect_records: RedirectRecords::default(),
                };
            }
        }
        let decision = layers.last().map(|(_, d)| *d).expect("at least one layer");
        lock_flows(&self.kernel).insert(
            flow,
            EstablishedFlow {
                authorized_at,
                policy_changes,
                cut: false,
            },
        );
        ConnectOutcome {
            decision,
            layers,
            flow_handle: Some(flow),
            pended,
            pend_round_trip,
            remote: presented.connection.remote,
            local: presented.connection.local,
            redirect_records: RedirectRecords::default(),
        }
    }

    /// Starts measuring an interval: on the host's clock, or on a deterministic machine on its
    /// virtual clock, which host time never enters.
    fn stopwatch(&self) -> Stopwatch<'_> {
        match &self.kernel.sched {
            Some(sched) => Stopwatch::Virtual(sched, sched.now()),
            None => Stopwatch::Host(std::time::Instant::now()),
        }
    }

    /// A packet of an established connection crosses the transport layer: OUTBOUND_TRANSPORT
    /// when `direction` is outbound, INBOUND_TRANSPORT otherwise, at `DISPATCH_LEVEL`, with the
    /// connection's values and its flow handle.
    ///
    /// If the flow was established by [`connect`](Self::connect) and a filter has been added
    /// to or deleted from the layer that authorized it (ALE_AUTH_CONNECT for an outbound
    /// connection, ALE_AUTH_RECV_ACCEPT for an inbound one) since, the packet is first
    /// reauthorized at that layer, as Microsoft's "ALE Reauthorization" describes: whatever the
    /// packet's direction, with `FWP_CONDITION_FLAG_IS_REAUTHORIZE` and the reason
    /// `FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE` (a callout cannot pend it). A
    /// reauthorization that does not permit tears the flow down: its flow contexts go to their
    /// `flowDeleteFn`, this packet and every later one of the flow are dropped (the returned
    /// decision blocks; [`is_flow_cut`](Self::is_flow_cut)). A flow handle `connect` did not
    /// return is classified as given, never reauthorized.
    pub fn packet(
        &self,
        connection: &Connection,
        flow_handle: u64,
        direction: wfp_rs::metadata::Direction,
    ) -> Decision {
        use wfp_rs::layer::*;
        let mut packet = connection.clone();
        packet.direction = direction;
        let presented = Presented::new(&packet);
        if let Some(dropped) = self.reauthorize_if_policy_changed(&presented, flow_handle) {
            return dropped;
        }
        let id = match (direction, connection.remote.is_ipv4()) {
            (wfp_rs::metadata::Direction::Outbound, true) => OutboundTransportV4::ID,
            (wfp_rs::metadata::Direction::Outbound, false) => OutboundTransportV6::ID,
            (wfp_rs::metadata::Direction::Inbound, true) => InboundTransportV4::ID,
            (wfp_rs::metadata::Direction::Inbound, false) => InboundTransportV6::ID,
        };
        let layer = layer_by_id(id).expect("known layer");
        self.classify_connection(layer, &presented, Irql::DISPATCH, Some(flow_handle), None)
    }

    /// A TCP connection's stream data crosses the stream layer: STREAM_V4 or STREAM_V6 (the
    /// connection's IP version), once, at `DISPATCH_LEVEL`, with the connection's addresses and
    /// ports, `direction` (the data's: outbound data is sent, inbound data received) and the
    /// flow handle `flow_handle`. `layerData` is a real `FWPS_STREAM_CALLOUT_IO_PACKET0` whose
    /// stream data holds `data` in one `NET_BUFFER_LIST`, its bytes split in two MDLs at the
    /// middle (so a callout's reads cross MDLs); [`stream_pieces`](Self::stream_pieces) chooses
    /// the split. The flags say the direction: `FWPS_STREAM_FLAG_SEND` or
    /// `FWPS_STREAM_FLAG_RECEIVE`.
    ///
    /// As with [`packet`](Self::packet), a flow [`connect`](Self::connect) established is first
    /// reauthorized if a policy change reached its authorization layer since, and the data of a
    /// flow that was cut is dropped unclassified. Modifying the stream (a callout's
    /// `streamAction`, `FwpsStreamInjectAsync0`) is not modelled: the outcome reports what the
    /// callouts left in the io packet, and nothing acts on it.
    ///
    /// # Panics
    ///
    /// If `connection.protocol` is not TCP: the stream layers see only TCP.
    pub fn stream(
        &self,
        connection: &Connection,
        flow_handle: u64,
        direction: wfp_rs::metadata::Direction,
        data: &[u8],
    ) -> StreamOutcome {
        let (first, second) = data.split_at(data.len() / 2);
        self.stream_pieces(connection, flow_handle, direction, &[first, second])
    }

    /// [`stream`](Self::stream) with the stream data's bytes in one MDL per non-empty piece of
    /// `pieces`, in order.
    ///
    /// # Panics
    ///
    /// If `connection.protocol` is not TCP: the stream layers see only TCP.
    pub fn stream_pieces(
        &self,
        connection: &Connection,
        flow_handle: u64,
        direction: wfp_rs::metadata::Direction,
        pieces: &[&[u8]],
    ) -> StreamOutcome {
        use wfp_rs::layer::*;
        use wfp_rs::sys::*;
        assert_eq!(
            connection.protocol,
            Protocol::Tcp,
            "expected a TCP connection: the stream layers see only TCP"
        );
        let mut data = connection.clone();
        data.direction = direction;
        let presented = Presented::new(&data);
        let untouched = |decision| StreamOutcome {
            decision,
            stream_action: FWPS_STREAM_ACTION_NONE,
            count_bytes_required: 0,
            count_bytes_enforced: 0,
        };
        if let Some(dropped) = self.reauthorize_if_policy_changed(&presented, flow_handle) {
            return untouched(dropped);
        }
        let layer = layer_by_id(if connection.remote.is_ipv4() {
            StreamV4::ID
        } else {
            StreamV6::ID
        })
        .expect("known layer");
        let flags = match direction {
            wfp_rs::metadata::Direction::Outbound => FWPS_STREAM_FLAG_SEND,
            wfp_rs::metadata::Direction::Inbound => FWPS_STREAM_FLAG_RECEIVE,
        };
        let mut indication = crate::kernel::stream::SimStream::build(pieces, flags);
        let values = || presented.values(layer, None);
        // SAFETY: the metadata structure is plain data, valid when zeroed (no bits set).
        let mut metadata: FWPS_INCOMING_METADATA_VALUES0 = unsafe { core::mem::zeroed() };
        // INFERRED: the TCP stack indicates stream data outside the sending process's context,
        // so no process id or path is reported; the flow handle and compartment are.
        metadata.currentMetadataValues =
            FWPS_METADATA_FIELD_COMPARTMENT_ID | FWPS_METADATA_FIELD_FLOW_HANDLE;
        metadata.compartmentId = 1;
        metadata.flowHandle = flow_handle;
        let mut incoming = engine::Incoming {
            layer,
            values: engine::Values::new(&values),
            metadata,
            process_path: None,
            layer_data: indication.layer_data(),
            packet: None,
            classify_context: core::ptr::null(),
            flow_context: 0,
            pendable: false,
            reauthorization: false,
        };
        let verdict = state::with_context(&self.kernel, Irql::DISPATCH.0, 0, || {
            engine::classify(&mut incoming)
        });
        let (stream_action, count_bytes_required, count_bytes_enforced) = indication.answer();
        StreamOutcome {
            decision: Machine::decision(verdict),
            stream_action,
            count_bytes_required,
            count_bytes_enforced,
        }
    }

    /// Another provider changes the policy at the layers that authorize flows (ALE_AUTH_CONNECT
    /// and ALE_AUTH_RECV_ACCEPT, V4 and V6): as when a user-mode firewall or a group policy adds
    /// or deletes a filter there. The filter itself is not modelled, only what Microsoft's "ALE
    /// Reauthorization" says follows: every flow established before is reauthorized at its next
    /// [`packet`](Self::packet) or [`stream`](Self::stream) indication, with the reason
    /// `FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE`. What the property harness's
    /// reauthorization workloads use ([`prop::Data::AfterPolicyChange`]).
    pub fn another_provider_changes_policy(&self) {
        self.run(engine::another_provider_changed_policy);
    }

    /// Whether the flow `flow_handle` was torn down by a reauthorization that did not permit it
    /// (see [`packet`](Self::packet)); `false` for a flow that is live, ended, or unknown.
    pub fn is_flow_cut(&self, flow_handle: u64) -> bool {
        lock_flows(&self.kernel)
            .get(&flow_handle)
            .is_some_and(|flow| flow.cut)
    }

    /// The reauthorization a policy change owes the flow, if any: `Some` with the decision that
    /// drops the packet when the flow is (or now gets) torn down, `None` when the packet goes
    /// on.
    fn reauthorize_if_policy_changed(
        &self,
        presented: &Presented<'_>,
        flow_handle: u64,
    ) -> Option<Decision> {
        let flow = lock_flows(&self.kernel).get(&flow_handle).copied()?;
        if flow.cut {
            return Some(Decision::dropped());
        }
        let changes = self.run(|| engine::policy_changes(flow.authorized_at));
        if changes == flow.policy_changes {
            return None;
        }
        let layer = wfp_rs::layer::layer_by_id(flow.authorized_at).expect("known layer");
        let decision = self.classify_connection(
            layer,
            presented,
            Irql::DISPATCH,
            Some(flow_handle),
            Some(wfp_rs::sys::FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE),
        );
        let permitted = decision.action == wfp_rs::classify::Action::Permit;
        if let Some(record) = lock_flows(&self.kernel).get_mut(&flow_handle) {
            record.policy_changes = changes;
            record.cut = !permitted;
        }
        if permitted {
            return None;
        }
        state::with_context(&self.kernel, DISPATCH_LEVEL, 0, || {
            engine::end_flow(flow_handle)
        });
        Some(decision)
    }

    /// The flow `flow_handle` ends (its connection is torn down): every callout context attached
    /// to it is removed and goes to its callout's `flowDeleteFn`, at `DISPATCH_LEVEL` on this
    /// thread — or, while another thread is classifying the flow, on that thread when its
    /// classification returns. Returns how many contexts were removed. The machine forgets the
    /// flow (see [`packet`](Self::packet)).
    pub fn end_flow(&self, flow_handle: u64) -> usize {
        lock_flows(&self.kernel).remove(&flow_handle);
        state::with_context(&self.kernel, DISPATCH_LEVEL, 0, || {
            engine::end_flow(flow_handle)
        })
    }

    /// The connection's endpoint closes: ALE_ENDPOINT_CLOSURE at `PASSIVE_LEVEL`. If a callout
    /// pends the closure (`FwpsPendClassify0`), this waits for its completion, as the stack
    /// holds the endpoint until then; the returned decision keeps `pending` set.
    pub fn close(&self, connection: &Connection) -> Decision {
        use wfp_rs::layer::*;
        let id = if connection.remote.is_ipv4() {
            AleEndpointClosureV4::ID
        } else {
            AleEndpointClosureV6::ID
        };
        let layer = layer_by_id(id).expect("known layer");
        let decision = self.classify_connection(
            layer,
            &Presented::new(connection),
            Irql::PASSIVE,
            None,
            None,
        );
        if let Some(pending) = decision.pending
            && let Some(action) = self.wait_for_completion(pending)
        {
            return Decision { action, ..decision };
        }
        decision
    }

    /// Classifies a connection at one layer, with its field values and metadata.
    fn classify_connection(
        &self,
        layer: &'static wfp_rs::layer::LayerInfo,
        presented: &Presented<'_>,
        irql: Irql,
        flow: Option<u64>,
        reauthorization: Option<u32>,
    ) -> Decision {
        self.classify_packet_of(
            layer,
            presented,
            irql,
            flow,
            reauthorization,
            Carried::Built {
                origin: flow.unwrap_or(0),
            },
        )
    }

    /// [`classify_connection`](Self::classify_connection), with the packet `carried` says.
    fn classify_packet_of(
        &self,
        layer: &'static wfp_rs::layer::LayerInfo,
        presented: &Presented<'_>,
        irql: Irql,
        flow: Option<u64>,
        reauthorization: Option<u32>,
        carried: Carried,
    ) -> Decision {
        use wfp_rs::sys::*;
        let connection = presented.connection;
        let values = || presented.values(layer, reauthorization);
        // SAFETY: the metadata structure is plain data, valid when zeroed (no bits set).
        let mut metadata: FWPS_INCOMING_METADATA_VALUES0 = unsafe { core::mem::zeroed() };
        metadata.currentMetadataValues = FWPS_METADATA_FIELD_PROCESS_ID
            | FWPS_METADATA_FIELD_PROCESS_PATH
            | FWPS_METADATA_FIELD_COMPARTMENT_ID
            | FWPS_METADATA_FIELD_PACKET_DIRECTION;
        metadata.processId = connection.pid;
        metadata.compartmentId = 1;
        metadata.packetDirection = match connection.direction {
            wfp_rs::metadata::Direction::Outbound => FWP_DIRECTION_OUTBOUND,
            wfp_rs::metadata::Direction::Inbound => FWP_DIRECTION_INBOUND,
        };
        if let Some(flow) = flow {
            metadata.currentMetadataValues |= FWPS_METADATA_FIELD_FLOW_HANDLE;
            metadata.flowHandle = flow;
        }
        if layer.name.starts_with("OUTBOUND_TRANSPORT")
            || layer.name.starts_with("INBOUND_TRANSPORT")
        {
            // The socket's endpoint, which send injection names (an opaque value here, one per
            // connection attempt).
            metadata.currentMetadataValues |= FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE;
            metadata.transportEndpointHandle = 0xE9D0_0000_0000 | flow.unwrap_or(0);
        }
        let packet_start = connection_packet_start(layer, connection);
        let endpoints = match connection.direction {
            wfp_rs::metadata::Direction::Outbound => (connection.local, connection.remote),
            wfp_rs::metadata::Direction::Inbound => (connection.remote, connection.local),
        };
        let origin = match carried {
            Carried::Built { origin } => origin,
            Carried::Injected(_) | Carried::Request { .. } => 0,
        };
        let build_packet = move || {
            let (source, destination) = endpoints;
            let endpoints = crate::kernel::packet::Endpoints {
                protocol: connection.protocol,
                source,
                destination,
            };
            let mut packet = crate::kernel::packet::SimPacket::build(
                &endpoints,
                packet_start.unwrap_or(crate::kernel::packet::Start::TransportHeader),
            );
            packet.set_origin(origin);
            packet
        };
        if let Carried::Request { records, .. } = carried
            && records != 0
        {
            metadata.currentMetadataValues |= FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE;
            metadata.redirectRecords = records as HANDLE;
        }
        let mut injected_layer_data = core::ptr::null_mut();
        if let (Carried::Injected(nbl), Some(start)) = (carried, packet_start) {
            // The reinjected clone is the packet; each layer finds its data start where the
            // layer puts it (the clone's bytes start at the IP header).
            let (ip, transport) = header_sizes(connection);
            let offset = match start {
                crate::kernel::packet::Start::Payload => ip + transport,
                crate::kernel::packet::Start::TransportHeader
                | crate::kernel::packet::Start::PastIpHeader => ip,
                crate::kernel::packet::Start::IpHeader => 0,
            };
            injected_layer_data = crate::kernel::inject::position(&self.kernel, nbl, offset);
            metadata.ipHeaderSize = ip;
            metadata.transportHeaderSize = transport;
            metadata.currentMetadataValues |=
                FWPS_METADATA_FIELD_IP_HEADER_SIZE | FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE;
        }
        let mut incoming = engine::Incoming {
            layer,
            values: engine::Values::new(&values),
            metadata,
            // The engine copies it for the callouts (the stack's copy for this classification).
            process_path: Some(&presented.app_id),
            layer_data: match carried {
                Carried::Request { request, .. } => request as PVOID,
                Carried::Built { .. } | Carried::Injected(_) => injected_layer_data,
            },
            packet: match carried {
                Carried::Built { .. } => packet_start.map(|_| &build_packet as &dyn Fn() -> _),
                Carried::Injected(_) | Carried::Request { .. } => None,
            },
            classify_context: core::ptr::null(),
            flow_context: 0,
            // The layers where the stack hands callouts a completion handle.
            pendable: matches!(
                layer.name,
                "ALE_AUTH_CONNECT_V4"
                    | "ALE_AUTH_CONNECT_V6"
                    | "ALE_AUTH_RECV_ACCEPT_V4"
                    | "ALE_AUTH_RECV_ACCEPT_V6"
            ),
            reauthorization: reauthorization.is_some(),
        };
        let verdict =
            state::with_context(&self.kernel, irql.0, 0, || engine::classify(&mut incoming));
        Machine::decision(verdict)
    }
}

/// The stack's `FWPS_CONNECT_REQUEST0` for an outbound connection at ALE_CONNECT_REDIRECT: its
/// endpoints, no history, nothing to redirect locally.
fn connect_request(connection: &Connection) -> wfp_rs::sys::FWPS_CONNECT_REQUEST0 {
    wfp_rs::sys::FWPS_CONNECT_REQUEST0 {
        localAddressAndPort: wfp_rs::redirect::storage_from_socket_address(connection.local),
        remoteAddressAndPort: wfp_rs::redirect::storage_from_socket_address(connection.remote),
        portReservationToken: 0,
        localRedirectTargetPID: 0,
        previousVersion: core::ptr::null_mut(),
        modifierFilterId: 0,
        localRedirectHandle: core::ptr::null_mut(),
        localRedirectContext: core::ptr::null_mut(),
        localRedirectContextSize: 0,
    }
}

/// The stack's `FWPS_BIND_REQUEST0` for the implicit bind of an outbound connection at
/// ALE_BIND_REDIRECT: its local endpoint, no port reservation, no history.
fn bind_request(connection: &Connection) -> wfp_rs::sys::FWPS_BIND_REQUEST0 {
    wfp_rs::sys::FWPS_BIND_REQUEST0 {
        localAddressAndPort: wfp_rs::redirect::storage_from_socket_address(connection.local),
        portReservationToken: 0,
        previousVersion: core::ptr::null_mut(),
        modifierFilterId: 0,
    }
}

/// The packet a connection's classification carries.
#[derive(Clone, Copy)]
enum Carried {
    /// No packet: `layerData` is the connect request (ALE_CONNECT_REDIRECT) or the bind request
    /// (ALE_BIND_REDIRECT) at `request`, and the metadata carries the redirect records handle
    /// `records` (if not 0; ALE_CONNECT_REDIRECT only).
    Request { request: usize, records: usize },
    /// One the stack builds for the classification (where the layer has packets), marked as a
    /// packet of connection attempt `origin`.
    Built { origin: u64 },
    /// The reinjected clone at this address.
    Injected(usize),
}

/// The IP and transport header sizes of a connection's first packet (as `SimPacket` builds it).
fn header_sizes(connection: &Connection) -> (u32, u32) {
    let ip = if connection.remote.is_ipv4() { 20 } else { 40 };
    let transport = match connection.protocol {
        Protocol::Tcp => 20,
        Protocol::Udp => 8,
        _ => 0,
    };
    (ip, transport)
}

/// How long an inbound attempt whose pend at ALE_AUTH_RECV_ACCEPT completed waits for a clone of
/// its absorbed packet that is alive but neither injected nor freed. INFERRED: the peer would
/// retransmit its SYN after about three seconds and the stack treat that as a new attempt; the
/// simulator lets the attempt fail instead.
const REINJECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// While alive, receive injections of clones of connection attempt `origin`'s packet are queued
/// for the connecting thread.
struct AwaitingReinjection<'k> {
    kernel: &'k Arc<Kernel>,
    origin: u64,
}

impl<'k> AwaitingReinjection<'k> {
    fn new(kernel: &'k Arc<Kernel>, origin: u64) -> Self {
        crate::kernel::inject::await_origin(kernel, origin);
        AwaitingReinjection { kernel, origin }
    }
}

impl Drop for AwaitingReinjection<'_> {
    fn drop(&mut self) {
        crate::kernel::inject::forget_origin(self.kernel, self.origin);
    }
}

impl Machine {
    /// After a pend at ALE_AUTH_RECV_ACCEPT completed: waits for what the callout does with the
    /// absorbed packet. A reinjected clone is delivered (INBOUND_TRANSPORT, ALE_AUTH_RECV_ACCEPT,
    /// ALE_FLOW_ESTABLISHED again, on this thread, then the injector's completion routine);
    /// returns those layers' decisions. `None` if no clone was reinjected (the attempt fails).
    fn deliver_reinjected(
        &self,
        connection: &Connection,
        presented: &Presented<'_>,
        flow: u64,
        ale: Irql,
    ) -> Option<Vec<(&'static str, Decision)>> {
        use crate::kernel::inject::{self, Fate};
        use wfp_rs::layer::*;
        let deadline = self.kernel.deadline_in(REINJECTION_WAIT);
        let Fate::Injected(nbl) = inject::wait_for_fate(&self.kernel, flow, deadline) else {
            return None;
        };
        let plan: [u16; 3] = if connection.remote.is_ipv4() {
            [
                InboundTransportV4::ID,
                AleAuthRecvAcceptV4::ID,
                AleFlowEstablishedV4::ID,
            ]
        } else {
            [
                InboundTransportV6::ID,
                AleAuthRecvAcceptV6::ID,
                AleFlowEstablishedV6::ID,
            ]
        };
        let mut layers = Vec::with_capacity(plan.len());
        for (index, id) in plan.into_iter().enumerate() {
            let layer = layer_by_id(id).expect("known layer");
            let (irql, has_flow) = match index {
                0 => (Irql::DISPATCH, false),
                1 => (ale, false),
                _ => (Irql::DISPATCH, true),
            };
            let mut decision = self.classify_packet_of(
                layer,
                presented,
                irql,
                has_flow.then_some(flow),
                None,
                Carried::Injected(nbl),
            );
            if let Some(pending) = decision.pending {
                // Pended again: the reinjected packet is absorbed in its turn; this attempt
                // ends with it (a callout that reinjects must recognise its own packets).
                let _ = self.wait_for_completion(pending);
                decision.action = wfp_rs::classify::Action::Block;
            }
            layers.push((layer.name, decision));
            if decision.action != wfp_rs::classify::Action::Permit {
                break;
            }
        }
        // Back at the IP header, where the injector put it, for the completion routine.
        inject::position(&self.kernel, nbl, 0);
        self.run(|| inject::complete_flight(nbl, 0));
        Some(layers)
    }
}

/// Where the packet a connection's classification at `layer` carries starts, per the layer's
/// [`LayerData`](wfp_rs::layer::LayerData); `None` where the layer passes no packet — not a
/// packet layer, or ALE_AUTH_CONNECT for TCP ("not applicable" in Microsoft's table) — or none
/// is modelled (the ICMP error, forward, IP packet and frame layers: no connection crosses them
/// here).
fn connection_packet_start(
    layer: &wfp_rs::layer::LayerInfo,
    connection: &Connection,
) -> Option<crate::kernel::packet::Start> {
    use crate::kernel::packet::Start;
    use wfp_rs::layer::{DataStart, LayerData};
    use wfp_rs::metadata::Direction;
    match layer.data {
        LayerData::Packet(DataStart::Payload) => Some(Start::Payload),
        LayerData::Packet(DataStart::TransportHeader) => Some(Start::TransportHeader),
        LayerData::Packet(DataStart::TransportHeaderUnlessTcp) => {
            (connection.protocol != Protocol::Tcp).then_some(Start::TransportHeader)
        }
        LayerData::Packet(DataStart::ByDirection) => Some(match connection.direction {
            Direction::Inbound => Start::Payload,
            Direction::Outbound => Start::TransportHeader,
        }),
        _ => None,
    }
}

/// Where a [`ClassifyRequest`]'s packet starts at `layer` (`None`: the layer carries no packet).
/// The inbound IP packet layers' "transport header" start has the IP header behind it; at a
/// layer whose start depends on the direction, the metadata's direction decides (outbound if
/// none is set).
fn request_packet_start(
    layer: &wfp_rs::layer::LayerInfo,
    metadata: &wfp_rs::sys::FWPS_INCOMING_METADATA_VALUES0,
) -> Option<crate::kernel::packet::Start> {
    use crate::kernel::packet::Start;
    use wfp_rs::layer::{DataStart, LayerData};
    let inbound =
        metadata.currentMetadataValues & wfp_rs::sys::FWPS_METADATA_FIELD_PACKET_DIRECTION != 0
            && metadata.packetDirection == wfp_rs::sys::FWP_DIRECTION_INBOUND;
    match layer.data {
        LayerData::Packet(DataStart::IpHeader) => Some(Start::IpHeader),
        LayerData::Packet(DataStart::Payload) => Some(Start::Payload),
        LayerData::Packet(DataStart::TransportHeader)
            if layer.name.starts_with("INBOUND_IPPACKET") =>
        {
            Some(Start::PastIpHeader)
        }
        LayerData::Packet(DataStart::TransportHeader | DataStart::TransportHeaderUnlessTcp) => {
            Some(Start::TransportHeader)
        }
        LayerData::Packet(DataStart::ByDirection) => Some(if inbound {
            Start::Payload
        } else {
            Start::TransportHeader
        }),
        _ => None,
    }
}

// --- filter-manager ports: the user-mode side -----------------------------------------------------

/// A user-mode process's end of a filter-manager communication port: what a service does with
/// `FilterConnectCommunicationPort`, `FilterGetMessage`, `FilterReplyMessage` and `CloseHandle`.
/// Get one with [`Machine::port_client`].
///
/// One `PortClient` is one connection (one handle). The methods take `&self` where the Win32
/// calls can run concurrently on one handle, so a test can share a client between threads: one
/// waiting in [`get_message`](Self::get_message), another replying. Dropping a connected client
/// closes its handle.
///
/// ```
/// use wfp_rs_sim::Machine;
/// use wfp_rs::Status;
///
/// let machine = Machine::new();
/// let mut client = machine.port_client("\\NoSuchPort");
/// assert_eq!(client.connect(&[]), Err(Status::OBJECT_NAME_NOT_FOUND));
/// ```
pub struct PortClient {
    kernel: Arc<Kernel>,
    name: String,
    process: Arc<Process>,
    client: Option<usize>,
}

/// A message a driver sent with `FltSendMessage`, as [`PortClient::get_message`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMessage {
    /// `FILTER_MESSAGE_HEADER::MessageId`: pass it to [`PortClient::reply`].
    pub id: u64,
    /// `FILTER_MESSAGE_HEADER::ReplyLength`: the size of the reply the driver waits for,
    /// including the 16-byte `FILTER_REPLY_HEADER`; 0 if it waits for none.
    pub reply_length: u32,
    /// The message, as the driver sent it.
    pub data: Vec<u8>,
}

impl Machine {
    /// A user-mode client for the communication port named `name` (for example
    /// `"\\WfpRsFirewall"`), not connected yet. It runs in a process with SYSTEM's token, as a
    /// service running as LocalSystem would (`Process::from(Caller::System)`); see
    /// [`PortClient::as_process`] and [`PortClient::as_standard_user`].
    pub fn port_client(&self, name: &str) -> PortClient {
        PortClient {
            kernel: Arc::clone(&self.kernel),
            name: name.to_owned(),
            process: Arc::new(Process::from(Caller::System)),
            client: None,
        }
    }

    /// Waits until a client of port `name` has a [`PortClient::get_message`] pending, so that a
    /// message the driver sends now is delivered at once. Harness synchronisation: it waits for
    /// the state, never for a time.
    pub fn wait_for_port_listener(&self, name: &str) {
        crate::kernel::flt::wait_for_listener(&self.kernel, name);
    }
}

impl PortClient {
    /// Makes the process a standard user: a port whose security descriptor admits only
    /// administrators and SYSTEM refuses it (`STATUS_ACCESS_DENIED`).
    pub fn as_standard_user(self) -> PortClient {
        self.as_process(Process::from(Caller::User))
    }

    /// Makes the client run in `process`: the port's security descriptor checks its token, and
    /// the driver's connect callback runs in it (what `PsGetCurrentProcess` returns there).
    pub fn as_process(mut self, process: Process) -> PortClient {
        self.process = Arc::new(process);
        self
    }

    /// Connects (`FilterConnectCommunicationPort`), passing `context` to the driver's connect
    /// callback. The callback runs on this thread, as on Windows. Fails with
    /// `STATUS_OBJECT_NAME_NOT_FOUND` (no such port), `STATUS_ACCESS_DENIED` (the port's security
    /// descriptor refuses this process), `STATUS_CONNECTION_COUNT_LIMIT` (the port has its maximum
    /// number of connections), whatever the driver's callback returned, or
    /// `STATUS_INVALID_PARAMETER` if this client is connected already.
    pub fn connect(&mut self, context: &[u8]) -> Result<(), Status> {
        if self.client.is_some() {
            return Err(Status::INVALID_PARAMETER);
        }
        let client =
            crate::kernel::flt::user_connect(&self.kernel, &self.name, context, &self.process)
                .map_err(Status::from_raw)?;
        self.client = Some(client);
        Ok(())
    }

    /// Whether the connection is open at both ends (the driver may close its end, and
    /// unregistering its filter closes every connection).
    pub fn is_connected(&self) -> bool {
        self.client
            .is_some_and(|client| crate::kernel::flt::user_is_connected(&self.kernel, client))
    }

    /// Waits for the next message (`FilterGetMessage`), at most `timeout` (`None`: until a
    /// message comes or the connection breaks). `None` on timeout, when the connection is gone,
    /// or when this client never connected.
    pub fn get_message(&self, timeout: Option<core::time::Duration>) -> Option<PortMessage> {
        let client = self.client?;
        crate::kernel::flt::user_get_message(&self.kernel, client, timeout).map(|m| PortMessage {
            id: m.id,
            reply_length: m.reply_length,
            data: m.data,
        })
    }

    /// Replies to message `message_id` (`FilterReplyMessage`); `reply` is what follows the
    /// `FILTER_REPLY_HEADER`, and is what the driver receives. Fails with
    /// `STATUS_FLT_NO_WAITER_FOR_REPLY` when the driver no longer waits for that reply (it timed
    /// out, it was answered already, it was never delivered to this client or wanted none), and
    /// with `STATUS_PORT_DISCONNECTED` when the connection is gone.
    pub fn reply(&self, message_id: u64, reply: &[u8]) -> Result<(), Status> {
        let Some(client) = self.client else {
            return Err(Status::PORT_DISCONNECTED);
        };
        crate::kernel::flt::user_reply(&self.kernel, client, message_id, reply)
            .map_err(Status::from_raw)
    }

    /// Closes the connection (`CloseHandle`): the driver's disconnect callback runs on this
    /// thread, and messages waiting for a reply fail with `STATUS_PORT_DISCONNECTED`.
    pub fn disconnect(&mut self) {
        if let Some(client) = self.client.take() {
            crate::kernel::flt::user_disconnect(&self.kernel, client);
        }
    }
}

impl Drop for PortClient {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl fmt::Debug for PortClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortClient")
            .field("port", &self.name)
            .field("process", &self.process)
            .field("connected", &self.is_connected())
            .finish()
    }
}

// --- the user-mode bridge ---------------------------------------------------------------------------

#[cfg(unix)]
pub(crate) mod bridge;

#[cfg(unix)]
pub use bridge::UserModeBridge;

#[cfg(unix)]
impl Machine {
    /// Serves this machine's communication ports and devices to user-mode processes on a Unix
    /// domain socket at `socket_path` (which must not exist), so that a service built on
    /// `wfp_rs::user` (feature `user`) can run in another process: start it with
    /// `WFP_RS_SIM_SOCKET` set to `socket_path`. Each client connection runs as SYSTEM would;
    /// when a client process dies, its port connections are disconnected and its device handles
    /// closed (cancelling their requests), as Windows does for an exiting process. The bridge
    /// runs until the returned [`UserModeBridge`] is dropped.
    ///
    /// ```no_run
    /// use wfp_rs_sim::Machine;
    ///
    /// let machine = Machine::new();
    /// let bridge = machine.serve_user_mode("/tmp/wfp-sim.sock".as_ref()).unwrap();
    /// // std::process::Command::new("my-service").env("WFP_RS_SIM_SOCKET", bridge.socket_path())
    /// # drop(bridge);
    /// ```
    pub fn serve_user_mode(
        &self,
        socket_path: &std::path::Path,
    ) -> std::io::Result<UserModeBridge> {
        UserModeBridge::start(Arc::clone(&self.kernel), socket_path)
    }
}

// --- devices and I/O requests ----------------------------------------------------------------------

pub use crate::kernel::irp::{Caller, DeviceHandle, IoCompletion, IoRequest};
pub use crate::kernel::process::Process;

impl Machine {
    /// A user-mode process opens a device (`CreateFile` with `GENERIC_READ | GENERIC_WRITE`):
    /// `path` is `\\.\name` or `\??\name` (through the symbolic link), or the device's own name
    /// (`\Device\name`). `process` is a [`Process`], or just a [`Caller`] (a process with that
    /// token). The device's DACL decides (a device without one lets everyone in, as the default
    /// device security descriptor does); then the driver's `IRP_MJ_CREATE` runs, in that process,
    /// as do the dispatch routines of every later request on the handle.
    pub fn open_device(
        &self,
        path: &str,
        process: impl Into<Process>,
    ) -> Result<DeviceHandle, Status> {
        crate::kernel::irp::open(&self.kernel, path, process.into())
    }

    /// Creates the registry key `key` (an absolute name, `\REGISTRY\MACHINE\...`) if needed
    /// and sets its value `name` to the string `value` (`REG_SZ`, with its terminating NUL), for
    /// drivers that read their configuration (`ZwOpenKey`, `ZwQueryValueKey`). Names are
    /// case-insensitive.
    pub fn set_registry_string(&self, key: &str, name: &str, value: &str) {
        let data: Vec<u8> = value
            .encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect();
        self.set_registry_value(key, name, REG_SZ, &data);
    }

    /// Like [`set_registry_string`](Self::set_registry_string), with any value type and data.
    pub fn set_registry_value(&self, key: &str, name: &str, kind: u32, data: &[u8]) {
        crate::kernel::registry::set_value(&self.kernel, key, name, kind, data);
    }

    /// Sets the string value `name` of the `Parameters` key of the driver `driver_name` will
    /// load as (`\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services\<driver_name>\Parameters`),
    /// what its installer would write: the driver reads it with
    /// [`Driver::parameter`](wfp_rs::driver::Driver::parameter).
    pub fn set_driver_parameter(&self, driver_name: &str, name: &str, value: &str) {
        let key = format!(
            "\\REGISTRY\\MACHINE\\SYSTEM\\CurrentControlSet\\Services\\{driver_name}\\Parameters"
        );
        self.set_registry_string(&key, name, value);
    }

    /// The symbolic links that exist, as (link, target) pairs, sorted: drivers must delete
    /// theirs before unload, or the next load finds the name taken.
    pub fn symbolic_links(&self) -> Vec<(String, String)> {
        crate::kernel::irp::symbolic_links(&self.kernel)
    }

    /// How many I/O requests sent to drivers are not completed yet.
    pub fn pending_io_requests(&self) -> usize {
        crate::kernel::irp::pending_irps(&self.kernel, 0)
    }
}

// --- restart --------------------------------------------------------------------------------------

/// Why [`Machine::restart`] refused to restart the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartError {
    /// These drivers are loaded. A simulated restart replaces the filter engine's state, not a
    /// driver's: unload them first ([`Machine::unload_driver`], which checks them for leaks),
    /// and load them again after the restart, as the boot would.
    DriversLoaded(Vec<String>),
}

impl fmt::Display for RestartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartError::DriversLoaded(names) => write!(
                f,
                "drivers are loaded ({}): unload them before Machine::restart",
                names.join(", ")
            ),
        }
    }
}

impl std::error::Error for RestartError {}

/// How long an object of the filter engine lives ([`Machine::engine_objects`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lifetime {
    /// Added in a dynamic session: deleted when the session closes.
    Dynamic,
    /// Added in a non-dynamic session without a persistence flag: stays until deleted or
    /// until the machine restarts.
    Static,
    /// Added with its `FWPM_*_FLAG_PERSISTENT`: stays across [restarts](Machine::restart)
    /// until deleted, enforced while BFE runs.
    Persistent,
    /// A filter added with `FWPM_FILTER_FLAG_BOOTTIME`: stays across restarts until deleted,
    /// enforced only while the machine boots (from [`Machine::restart`] to
    /// [`Machine::start_bfe`]).
    BootTime,
}

/// What an object of the filter engine is ([`Machine::engine_objects`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineObjectKind {
    /// `FWPM_PROVIDER0`.
    Provider,
    /// `FWPM_SUBLAYER0`.
    Sublayer,
    /// `FWPM_CALLOUT0` (the management object, not the registration).
    Callout,
    /// `FWPM_FILTER0`.
    Filter,
}

/// One provider, sublayer, callout or filter in the filter engine ([`Machine::engine_objects`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineObject {
    /// Which kind of object.
    pub kind: EngineObjectKind,
    /// Its key.
    pub key: wfp_rs::Guid,
    /// How long it lives.
    pub lifetime: Lifetime,
}

impl Machine {
    /// Restarts the machine, as far as the filter engine is concerned: every session ends (a
    /// transaction still open with it is lost), every dynamic and static object goes, and so
    /// does every connection (no flow survives a reboot). Persistent providers, sublayers,
    /// callouts and filters stay, and so do boot-time filters. The machine then **boots**:
    /// only the boot-time filters are enforced (`FWPM_FILTER_FLAG_BOOTTIME`: "enforced at
    /// boot-time, even before BFE starts"), and no session can be opened (`FwpmEngineOpen0`
    /// fails with `RPC_NT_SERVER_UNAVAILABLE`, INFERRED), until [`start_bfe`](Self::start_bfe).
    /// Callouts may be registered meanwhile, as Microsoft documents ("at any time, even if the
    /// filter engine is currently not running").
    ///
    /// Drivers must be unloaded first ([`RestartError::DriversLoaded`]): a driver's code and
    /// memory are not the engine's to reset, and an unload is where the simulator checks them.
    /// On Windows a shutdown does not unload drivers; what matters here is what the engine
    /// keeps, which is the same either way.
    ///
    /// ```
    /// use wfp_rs::engine::{Engine, SessionOptions};
    /// use wfp_rs::filter::{Filter, FilterAction, FilterFlags};
    /// use wfp_rs::layer::AleAuthConnectV4;
    /// use wfp_rs::guid;
    /// use wfp_rs_sim::{Lifetime, Machine};
    ///
    /// let machine = Machine::new();
    /// machine.at_passive(|irql| {
    ///     let engine = Engine::open(irql, SessionOptions::new())?;
    ///     let block = |key, flags| {
    ///         Filter::<AleAuthConnectV4>::new(key).name("block").action(FilterAction::Block).flags(flags)
    ///     };
    ///     engine.add_filter(irql, &block(guid!("9d3a3c1e-9b55-4c5e-9b1a-6d1f0c2b7a01"), FilterFlags::PERSISTENT))?;
    ///     engine.add_filter(irql, &block(guid!("9d3a3c1e-9b55-4c5e-9b1a-6d1f0c2b7a02"), FilterFlags::BOOT_TIME))?;
    ///     engine.add_filter(irql, &block(guid!("9d3a3c1e-9b55-4c5e-9b1a-6d1f0c2b7a03"), FilterFlags::empty()))?;
    ///     engine.close(irql)
    /// })?;
    /// machine.restart()?;
    /// assert!(!machine.is_bfe_running());
    /// let mut kept: Vec<Lifetime> = machine.engine_objects().iter().map(|o| o.lifetime).collect();
    /// kept.sort_by_key(|l| *l as u8);
    /// assert_eq!(kept, [Lifetime::Persistent, Lifetime::BootTime]);
    /// machine.start_bfe();
    /// assert!(machine.is_bfe_running());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restart(&self) -> Result<(), RestartError> {
        let loaded: Vec<String> = self
            .kernel
            .lock()
            .drivers
            .values()
            .map(|d| d.name.clone())
            .collect();
        if !loaded.is_empty() {
            return Err(RestartError::DriversLoaded(loaded));
        }
        crate::kernel::wfp::restart(&self.kernel);
        lock_flows(&self.kernel).clear();
        Ok(())
    }

    /// BFE starts, after a [`restart`](Self::restart): the persistent objects are enforced
    /// again (a persistent filter whose callout no driver has registered yet blocks, as
    /// `FwpsCalloutUnregisterById0` documents for filters whose callout is not registered;
    /// INFERRED for a callout not registered since the boot), the boot-time filters no longer
    /// (they stay stored for the next boot), and sessions can be opened again.
    ///
    /// # Panics
    ///
    /// If BFE runs already: a machine starts with it running, and only a restart stops it.
    pub fn start_bfe(&self) {
        assert!(
            crate::kernel::wfp::start_bfe(&self.kernel),
            "Machine::start_bfe: BFE runs already (only Machine::restart stops it)"
        );
    }

    /// Whether BFE runs: `false` from a [`restart`](Self::restart) to
    /// [`start_bfe`](Self::start_bfe), `true` otherwise.
    pub fn is_bfe_running(&self) -> bool {
        crate::kernel::wfp::bfe_running(&self.kernel)
    }

    /// Every provider, sublayer, callout (management object) and filter in the filter engine,
    /// with its lifetime: what an installer left behind, what survives a restart.
    pub fn engine_objects(&self) -> Vec<EngineObject> {
        crate::kernel::wfp::objects(&self.kernel)
    }
}

/// The README's code, compiled as doctests so the crates.io page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
