//! The DPC watchdog: a processor that stays at `DISPATCH_LEVEL` or above too long stops the
//! machine with `DPC_WATCHDOG_VIOLATION` (0x133).
//!
//! On Windows the watchdog runs from the clock interrupt of each processor: it counts how long
//! the processor has run at `DISPATCH_LEVEL` or above, and bug checks when a single DPC exceeds
//! its allotment (parameter 1 = 0) or when the processor has spent too long at `DISPATCH_LEVEL`
//! or above without a break (parameter 1 = 1, "cumulatively"). A driver that spins at
//! `DISPATCH_LEVEL` — under a spin lock in `classifyFn`, waiting for a flag a work item sets —
//! never gets a break: the work item cannot run on that processor, and on a machine with few
//! processors, nowhere.
//!
//! The simulator's processors are host threads, so the spin ends as soon as another host thread
//! sets the flag; that passes in the simulator and hangs Windows until the watchdog fires. Each
//! thread keeps since when it has been at `DISPATCH_LEVEL` or above in a machine without a break
//! ([`track`], called wherever a thread's IRQL or machine changes), in a record of its own that
//! the machine's monitor can read (so the bookkeeping of the many IRQL changes takes no lock
//! another thread takes), and the machine stops with 0x133 when a stay passes its limit
//! (`Machine::set_dpc_watchdog_limit`):
//!
//! - the thread itself, at its next call of a kernel routine ([`check_current`], from
//!   `KernelCode::enter`: one clock read per call in a stay, compared with the stay's deadline),
//!   with its own stack in the report;
//! - otherwise a monitor thread per machine, started with the machine's first stay at
//!   `DISPATCH_LEVEL`, which wakes every eighth of the limit (at most every 100 ms) and reports
//!   the longest stay past the limit in which the thread called no kernel routine between two
//!   of its looks (a thread that still calls them stops itself, with a better report); its
//!   report names the thread, the driver routine it runs and how long it has been at
//!   `DISPATCH_LEVEL` (its stack is not available to another thread).
//!
//! Parameters (Microsoft's bug check 0x133 reference): 1 = 1 (the cumulative watchdog; INFERRED
//! as what a spin in a callout trips: a callout runs in a DPC only on some paths, and the
//! cumulative count covers every code at `DISPATCH_LEVEL`); 2 = the watchdog period in clock
//! ticks; 3 and 4 are reserved (0). INFERRED: a tick is the default clock interval, 15.625 ms
//! (64 per second), as crash dumps' values suggest (0x1E00 = 120 s on Windows 10 and 11); the
//! simulator's default limit is [`DEFAULT_LIMIT`], shorter than that, so that a test that spins
//! for ever reports sooner — a stay that long at `DISPATCH_LEVEL` is a bug whatever the limit.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::cell::{Cell, OnceCell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::state::{Kernel, KernelCode, Routine, THREAD, ThreadState};
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::sys::*;

/// The default limit: 10 s. INFERRED: Windows' cumulative watchdog period is 120 s on current
/// versions (0x1E00 ticks in crash dumps; not documented); the simulator's is shorter so a test
/// that spins for ever reports in seconds, and still far beyond any stay at `DISPATCH_LEVEL` a
/// correct driver makes (Microsoft: a DPC should not run longer than 100 µs).
pub(crate) const DEFAULT_LIMIT: Duration = Duration::from_secs(10);

/// INFERRED: the unit of parameter 2, the default clock interval (15.625 ms).
const TICK: Duration = Duration::from_micros(15_625);

/// Parameter 1 of the stop: the system spent too long at `DISPATCH_LEVEL` or above.
const CUMULATIVE: usize = 1;

/// A thread's stay at `DISPATCH_LEVEL` or above, as the monitor sees it.
#[derive(Clone, Copy)]
struct Stay {
    /// The address of the machine the stay is counted in: only compared (the thread keeps the
    /// machine alive for as long as the stay lasts, so no other machine has that address).
    machine: usize,
    since: Instant,
    irql: KIRQL,
    routine: Option<Routine>,
    /// The thread waits for its turn on a deterministic machine (see [`park`]): the monitor
    /// leaves the stay alone until it runs again.
    paused: bool,
}

/// One thread's record for the DPC watchdog. The thread writes it; a machine's monitor reads
/// it. Per thread rather than one table per machine, so that the bookkeeping of a change of
/// IRQL (many per connection) takes no lock another thread takes and hashes nothing.
struct Slot {
    /// The simulated thread id.
    id: u64,
    thread: std::thread::Thread,
    /// How many kernel routines the thread has called in its current stay: a thread that still
    /// calls them stops the machine itself, with its own stack, so the monitor leaves it alone.
    /// Written by the thread only (reset under `stay`'s lock when a stay starts).
    calls: AtomicU64,
    /// The current stay (None: the thread is below `DISPATCH_LEVEL` or outside every machine).
    /// Uncontended but for the monitor's looks, a few times per limit.
    stay: Mutex<Option<Stay>>,
}

impl Slot {
    fn stay(&self) -> MutexGuard<'_, Option<Stay>> {
        self.stay.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a thread keeps for the DPC watchdog (part of its `ThreadState`).
#[derive(Default)]
pub(crate) struct ThreadWatch {
    /// The machine in which the thread's current stay at `DISPATCH_LEVEL` or above is counted
    /// (None: not at `DISPATCH_LEVEL`).
    machine: RefCell<Option<Arc<Kernel>>>,
    /// When the current stay started, without taking the slot's lock.
    since: Cell<Option<Instant>>,
    /// When the current stay passes the limit (None: never, the limit is too far), and the limit
    /// (in nanoseconds) it was computed with: [`check_current`] compares the clock with it
    /// directly, and recomputes it if `Machine::set_dpc_watchdog_limit` changed the limit.
    deadline: Cell<(Option<Instant>, u64)>,
    /// The IRQL the slot has for the current stay.
    irql: Cell<KIRQL>,
    /// Since when the thread has waited for its turn on a deterministic machine in its current
    /// stay (see [`park`]).
    parked_at: Cell<Option<Instant>>,
    /// Created with the thread's first stay.
    slot: OnceCell<Arc<Slot>>,
    /// The machine whose watchdog last got this thread's slot (a `Weak` so that its address
    /// cannot be reused by another machine while it is compared).
    registered: RefCell<Weak<Kernel>>,
}

impl ThreadWatch {
    /// Whether the thread is in a stay at `DISPATCH_LEVEL` or above.
    fn in_stay(&self) -> bool {
        self.since.get().is_some()
    }
}

/// One machine's watchdog.
pub(crate) struct Watchdog {
    /// The limit, in nanoseconds (saturated).
    limit_ns: AtomicU64,
    /// Whether the monitor thread runs.
    started: AtomicBool,
    /// The slots of the threads that have been at `DISPATCH_LEVEL` in this machine (a thread
    /// that has ended leaves a dead `Weak`, dropped at the next registration). A leaf lock, taken
    /// when a thread first stays in this machine and by the monitor.
    slots: Mutex<Vec<Weak<Slot>>>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            limit_ns: AtomicU64::new(nanos(DEFAULT_LIMIT)),
            started: AtomicBool::new(false),
            slots: Mutex::new(Vec::new()),
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Watchdog {
    /// `Machine::set_dpc_watchdog_limit`.
    pub(crate) fn set_limit(&self, limit: Duration) {
        self.limit_ns.store(nanos(limit), Ordering::Relaxed);
    }

    fn limit(&self) -> Duration {
        Duration::from_nanos(self.limit_ns.load(Ordering::Relaxed))
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Weak<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Parameter 2: the limit in clock ticks (rounded up, at least 1).
fn ticks(limit: Duration) -> usize {
    let ticks = limit.as_nanos().div_ceil(TICK.as_nanos()).max(1);
    usize::try_from(ticks).unwrap_or(usize::MAX)
}

/// Brings the watchdog's view of this thread up to date after its IRQL or its machine changed:
/// a stay starts when it enters `DISPATCH_LEVEL` or above in a machine, and ends when it drops
/// below or leaves the machine. A change between levels at or above `DISPATCH_LEVEL` in the
/// same machine continues the stay.
pub(crate) fn track(t: &ThreadState) {
    let irql = t.irql.get();
    let Ok(kernel) = t.kernel.try_borrow() else {
        return;
    };
    let wanted = kernel.as_ref().filter(|_| irql >= DISPATCH_LEVEL);
    let watch = &t.watch;
    let mut current = watch.machine.borrow_mut();
    match (&*current, wanted) {
        (None, None) => {}
        (Some(current), Some(wanted)) if Arc::ptr_eq(current, wanted) => {
            // Still at DISPATCH_LEVEL or above in the same machine; only the level may differ.
            if watch.irql.replace(irql) != irql {
                level_changed(watch, irql);
            }
        }
        (_, wanted) => change_stay(t, &mut current, wanted, irql),
    }
}

#[inline(never)]
fn level_changed(watch: &ThreadWatch, irql: KIRQL) {
    if let Some(slot) = watch.slot.get()
        && let Some(stay) = slot.stay().as_mut()
    {
        stay.irql = irql;
    }
}

/// Ends the thread's stay, if any, and starts one in `wanted`, if given. Out of line, so that
/// [`track`]'s common cases (no stay, or the same one) stay small.
#[inline(never)]
fn change_stay(
    t: &ThreadState,
    current: &mut Option<Arc<Kernel>>,
    wanted: Option<&Arc<Kernel>>,
    irql: KIRQL,
) {
    let watch = &t.watch;
    // The bookkeeping allocates from the host, never from a driver's pool.
    let _host = KernelCode::for_allocator();
    if current.take().is_some() {
        watch.since.set(None);
        watch.parked_at.set(None);
        if let Some(slot) = watch.slot.get() {
            *slot.stay() = None;
        }
    }
    if let Some(kernel) = wanted {
        let slot = watch.slot.get_or_init(|| {
            Arc::new(Slot {
                id: t.id,
                thread: std::thread::current(),
                calls: AtomicU64::new(0),
                stay: Mutex::new(None),
            })
        });
        register(watch, slot, kernel);
        let since = Instant::now();
        {
            let mut stay = slot.stay();
            slot.calls.store(0, Ordering::Relaxed);
            *stay = Some(Stay {
                machine: Arc::as_ptr(kernel) as usize,
                since,
                irql,
                routine: t.routine.get(),
                paused: false,
            });
        }
        watch.since.set(Some(since));
        let limit_ns = kernel.watchdog.limit_ns.load(Ordering::Relaxed);
        watch.deadline.set((deadline(since, limit_ns), limit_ns));
        watch.irql.set(irql);
        *current = Some(Arc::clone(kernel));
        start_monitor(kernel);
    }
}

/// Makes `kernel`'s monitor see this thread's slot, once per machine the thread stays in.
fn register(watch: &ThreadWatch, slot: &Arc<Slot>, kernel: &Arc<Kernel>) {
    let mut registered = watch.registered.borrow_mut();
    if core::ptr::eq(registered.as_ptr(), Arc::as_ptr(kernel)) {
        return;
    }
    let mut slots = kernel.watchdog.slots();
    slots.retain(|s| s.strong_count() > 0);
    if !slots
        .iter()
        .any(|s| core::ptr::eq(s.as_ptr(), Arc::as_ptr(slot)))
    {
        slots.push(Arc::downgrade(slot));
    }
    *registered = Arc::downgrade(kernel);
}

/// This thread's routine changed: the stay it is in, if any, is now in that routine.
pub(crate) fn routine_changed(t: &ThreadState) {
    if !t.watch.in_stay() {
        return;
    }
    if let Some(slot) = t.watch.slot.get()
        && let Some(stay) = slot.stay().as_mut()
    {
        stay.routine = t.routine.get();
    }
}

/// A deterministic machine's scheduler parks this thread until its next turn ([`resume`] when
/// it has it back). On such a machine every context is a processor of its own,
/// but only one runs at a time while the others wait for their turn: a stay at
/// `DISPATCH_LEVEL` counts only the time its thread runs, so the stay's start moves forward by
/// the time it waited, and the monitor does not look at it meanwhile. Without this a context
/// parked at `DISPATCH_LEVEL` (between a spin lock's acquire and release, both yield points)
/// would count the other contexts' time as its own and stop the machine wrongly on a slow or
/// loaded host. A stay that runs too long is still stopped: its running time adds up across
/// its turns.
pub(crate) fn park() {
    let _ = THREAD.try_with(|t| {
        let watch = &t.watch;
        let (Some(_), Some(slot)) = (watch.since.get(), watch.slot.get()) else {
            return;
        };
        watch.parked_at.set(Some(Instant::now()));
        if let Some(stay) = slot.stay().as_mut() {
            stay.paused = true;
        }
    });
}

/// The thread has its turn again after [`park`]: its stay's start moves forward by the time it
/// waited.
pub(crate) fn resume() {
    let _ = THREAD.try_with(|t| {
        let watch = &t.watch;
        let (Some(since), Some(slot), Some(parked_at)) =
            (watch.since.get(), watch.slot.get(), watch.parked_at.take())
        else {
            return;
        };
        let now = Instant::now();
        let since = since
            .checked_add(now.saturating_duration_since(parked_at))
            .unwrap_or(now);
        if let Some(stay) = slot.stay().as_mut() {
            stay.since = since;
            stay.paused = false;
        }
        watch.since.set(Some(since));
        let (_, limit_ns) = watch.deadline.get();
        watch.deadline.set((deadline(since, limit_ns), limit_ns));
    });
}

/// When a stay that started at `since` passes a limit of `limit_ns` nanoseconds (None: later
/// than the clock can say).
fn deadline(since: Instant, limit_ns: u64) -> Option<Instant> {
    since.checked_add(Duration::from_nanos(limit_ns))
}

/// The check at the top of every simulated kernel routine: a thread whose stay at
/// `DISPATCH_LEVEL` has passed the limit stops the machine itself, with its own stack.
pub(crate) fn check_current() {
    // `try_with`: a kernel routine may be called from a thread-local destructor.
    let overdue = THREAD.try_with(|t| {
        let watch = &t.watch;
        let since = watch.since.get()?;
        let slot = watch.slot.get()?;
        // Only this thread writes its count: no read-modify-write needed.
        slot.calls.store(
            slot.calls.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        let limit_ns = watch
            .machine
            .try_borrow()
            .ok()?
            .as_ref()?
            .watchdog
            .limit_ns
            .load(Ordering::Relaxed);
        let (mut deadline_now, computed_with) = watch.deadline.get();
        if computed_with != limit_ns {
            deadline_now = deadline(since, limit_ns);
            watch.deadline.set((deadline_now, limit_ns));
        }
        // One clock read, compared with a precomputed instant: `now > since + limit` is
        // `now - since > limit`, exactly.
        let now = Instant::now();
        deadline_now
            .is_some_and(|deadline| now > deadline)
            .then(|| (now.duration_since(since), Duration::from_nanos(limit_ns)))
    });
    if let Ok(Some((elapsed, limit))) = overdue {
        stop_overdue(elapsed, limit);
    }
}

/// [`check_current`]'s stop, out of line: the check runs at every kernel call, the stop once.
#[cold]
#[inline(never)]
fn stop_overdue(elapsed: Duration, limit: Duration) -> ! {
    let routine = super::state::current_routine().map_or_else(
        || "kernel or harness code".to_owned(),
        super::bugcheck::describe_routine,
    );
    super::bugcheck::stop(
        BugCheckCode::DPC_WATCHDOG_VIOLATION,
        [CUMULATIVE, ticks(limit), 0, 0],
        &explanation("this processor", &routine, elapsed, limit),
    )
}

fn explanation(who: &str, routine: &str, elapsed: Duration, limit: Duration) -> String {
    format!(
        "{who} has run at DISPATCH_LEVEL or above for {:.3} s without a break, in {routine}: more than the DPC watchdog's limit of {:.3} s (Machine::set_dpc_watchdog_limit); on Windows the code a spin at DISPATCH_LEVEL waits for may never get a processor, and the watchdog stops the machine",
        elapsed.as_secs_f64(),
        limit.as_secs_f64()
    )
}

/// Starts the machine's monitor thread, once.
fn start_monitor(kernel: &Arc<Kernel>) {
    // A load first: every stay calls this, and only the first needs the read-modify-write.
    if kernel.watchdog.started.load(Ordering::Relaxed)
        || kernel.watchdog.started.swap(true, Ordering::SeqCst)
    {
        return;
    }
    let machine = Arc::downgrade(kernel);
    std::thread::Builder::new()
        .name("sim-dpc-watchdog".to_owned())
        .spawn(move || monitor(&machine))
        .expect("the host could not start the simulator's DPC watchdog thread");
}

/// The monitor: wakes a few times per limit until the machine is gone or shut down, and stops
/// the machine for the longest stay past the limit in which the thread called no kernel routine
/// since the monitor's previous look (one that does stops the machine itself at its next call).
fn monitor(machine: &Weak<Kernel>) {
    let mut seen = FxHashMap::default();
    loop {
        let period = {
            let Some(kernel) = machine.upgrade() else {
                return;
            };
            if kernel.stopped.load(Ordering::SeqCst) {
                return;
            }
            let limit = kernel.watchdog.limit();
            if let Some(overdue) = overdue(&kernel, limit, &mut seen) {
                report(&kernel, overdue, limit);
            }
            (limit / 8).clamp(Duration::from_millis(1), Duration::from_millis(100))
        };
        std::thread::sleep(period);
    }
}

/// What the monitor reports: the longest stay past the limit, and the other stays.
struct Overdue {
    id: u64,
    elapsed: Duration,
    irql: KIRQL,
    routine: Option<Routine>,
    thread: std::thread::Thread,
    others: Vec<(u64, Duration, Option<Routine>, std::thread::Thread)>,
}

/// A stay the monitor looked at.
struct Seen {
    id: u64,
    stay: Stay,
    calls: u64,
    thread: std::thread::Thread,
}

/// The stays in `kernel` now, by thread id.
fn stays(kernel: &Kernel) -> Vec<Seen> {
    let slots: Vec<Arc<Slot>> = kernel
        .watchdog
        .slots()
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut stays: Vec<Seen> = slots
        .iter()
        .filter_map(|slot| {
            // Under the slot's lock: a stay and its count, never one stay's start with another's
            // count.
            let stay = (*slot.stay())?;
            let calls = slot.calls.load(Ordering::Relaxed);
            (stay.machine == core::ptr::from_ref(kernel) as usize && !stay.paused).then(|| Seen {
                id: slot.id,
                stay,
                calls,
                thread: slot.thread.clone(),
            })
        })
        .collect();
    stays.sort_by_key(|seen| seen.id);
    stays
}

/// The longest stay past the limit that has made no progress through the kernel since the last
/// look (`seen`: each stay's start and call count then, updated here).
fn overdue(
    kernel: &Kernel,
    limit: Duration,
    seen: &mut FxHashMap<u64, (Instant, u64)>,
) -> Option<Overdue> {
    let stays = stays(kernel);
    let previous = core::mem::replace(
        seen,
        stays
            .iter()
            .map(|s| (s.id, (s.stay.since, s.calls)))
            .collect(),
    );
    let longest = stays
        .iter()
        .filter(|s| {
            s.stay.since.elapsed() > limit && previous.get(&s.id) == Some(&(s.stay.since, s.calls))
        })
        .min_by_key(|s| s.stay.since)?;
    let elapsed = longest.stay.since.elapsed();
    let others: Vec<_> = stays
        .iter()
        .filter(|other| other.id != longest.id)
        .map(|other| {
            (
                other.id,
                other.stay.since.elapsed(),
                other.stay.routine,
                other.thread.clone(),
            )
        })
        .collect();
    Some(Overdue {
        id: longest.id,
        elapsed,
        irql: longest.stay.irql,
        routine: longest.stay.routine,
        thread: longest.thread.clone(),
        others,
    })
}

fn describe(routine: Option<Routine>) -> String {
    routine.map_or_else(
        || "kernel or harness code".to_owned(),
        super::bugcheck::describe_routine,
    )
}

fn thread_name(thread: &std::thread::Thread, id: u64) -> String {
    format!("{} [{id}]", thread.name().unwrap_or("<unnamed>"))
}

/// Stops the machine from the monitor thread, on behalf of the thread that overstayed.
fn report(kernel: &Arc<Kernel>, overdue: Overdue, limit: Duration) -> ! {
    // Enter the machine (at PASSIVE_LEVEL, so no stay of its own) so the report can name the
    // machine's drivers and callouts.
    THREAD.with(|t| *t.kernel.borrow_mut() = Some(Arc::clone(kernel)));
    let thread = thread_name(&overdue.thread, overdue.id);
    let routine = describe(overdue.routine);
    let details: Vec<String> = overdue
        .others
        .iter()
        .map(|(id, elapsed, routine, thread)| {
            format!(
                "also at DISPATCH_LEVEL: thread {} for {:.3} s, in {}",
                thread_name(thread, *id),
                elapsed.as_secs_f64(),
                describe(*routine)
            )
        })
        .collect();
    super::bugcheck::stop_on_behalf(
        BugCheckCode::DPC_WATCHDOG_VIOLATION,
        [CUMULATIVE, ticks(limit), 0, 0],
        &explanation(
            &format!("thread {thread}"),
            &routine,
            overdue.elapsed,
            limit,
        ),
        &details.join("\n"),
        &format!("{routine}; thread {thread}, IRQL {}", overdue.irql),
        &format!(
            "(not available: the DPC watchdog's thread stopped the machine; thread {thread} made no kernel call since its stay passed the limit)"
        ),
    )
}
