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
//! sets the flag; that passes in the simulator and hangs Windows until the watchdog fires. The
//! simulator keeps, per machine, since when each thread has been at `DISPATCH_LEVEL` or above
//! without a break ([`track`], called wherever a thread's IRQL or machine changes), and stops
//! with 0x133 when a stay passes the machine's limit (`Machine::set_dpc_watchdog_limit`):
//!
//! - the thread itself, at its next call of a kernel routine ([`check_current`], from
//!   `KernelCode::enter`), with its own stack in the report;
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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

/// A thread's stay at `DISPATCH_LEVEL` or above.
struct Stay {
    since: Instant,
    /// How many kernel routines the thread has called in this stay: a thread that still calls
    /// them stops the machine itself, with its own stack, so the monitor leaves it alone.
    calls: u64,
    irql: KIRQL,
    routine: Option<Routine>,
    thread: std::thread::Thread,
}

/// One machine's watchdog.
pub(crate) struct Watchdog {
    /// The limit, in nanoseconds (saturated).
    limit_ns: AtomicU64,
    /// Whether the monitor thread runs.
    started: AtomicBool,
    /// The threads at `DISPATCH_LEVEL` or above in this machine, by simulated thread id. A leaf
    /// lock: nothing else is taken while it is held.
    stays: Mutex<HashMap<u64, Stay>>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            limit_ns: AtomicU64::new(nanos(DEFAULT_LIMIT)),
            started: AtomicBool::new(false),
            stays: Mutex::new(HashMap::new()),
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

    fn stays(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stay>> {
        self.stays.lock().unwrap_or_else(|p| p.into_inner())
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
    let mut stay = t.dispatch.borrow_mut();
    match (&*stay, wanted) {
        (None, None) => return,
        (Some(current), Some(wanted)) if Arc::ptr_eq(current, wanted) => {
            // Still at DISPATCH_LEVEL or above in the same machine; only the level may differ.
            let _host = KernelCode::for_allocator();
            if let Some(entry) = current.watchdog.stays().get_mut(&t.id) {
                entry.irql = irql;
            }
            return;
        }
        _ => {}
    }
    // The bookkeeping allocates from the host, never from a driver's pool.
    let _host = KernelCode::for_allocator();
    if let Some(previous) = stay.take() {
        previous.watchdog.stays().remove(&t.id);
    }
    if let Some(kernel) = wanted {
        kernel.watchdog.stays().insert(
            t.id,
            Stay {
                since: Instant::now(),
                calls: 0,
                irql,
                routine: t.routine.get(),
                thread: std::thread::current(),
            },
        );
        *stay = Some(Arc::clone(kernel));
        start_monitor(kernel);
    }
}

/// This thread's routine changed: the stay it is in, if any, is now in that routine.
pub(crate) fn routine_changed(t: &ThreadState) {
    let Ok(stay) = t.dispatch.try_borrow() else {
        return;
    };
    if let Some(kernel) = stay.as_ref() {
        let _host = KernelCode::for_allocator();
        if let Some(entry) = kernel.watchdog.stays().get_mut(&t.id) {
            entry.routine = t.routine.get();
        }
    }
}

/// The check at the top of every simulated kernel routine: a thread whose stay at
/// `DISPATCH_LEVEL` has passed the limit stops the machine itself, with its own stack.
pub(crate) fn check_current() {
    // `try_with`: a kernel routine may be called from a thread-local destructor.
    let overdue = THREAD.try_with(|t| {
        let stay = t.dispatch.try_borrow().ok()?;
        let kernel = stay.as_ref()?;
        let limit = kernel.watchdog.limit();
        let mut stays = kernel.watchdog.stays();
        let stay = stays.get_mut(&t.id)?;
        stay.calls = stay.calls.wrapping_add(1);
        let elapsed = stay.since.elapsed();
        (elapsed > limit).then_some((elapsed, limit))
    });
    if let Ok(Some((elapsed, limit))) = overdue {
        let routine = super::state::current_routine().map_or_else(
            || "kernel or harness code".to_owned(),
            super::bugcheck::describe_routine,
        );
        super::bugcheck::stop(
            BugCheckCode::DPC_WATCHDOG_VIOLATION,
            [CUMULATIVE, ticks(limit), 0, 0],
            &explanation("this processor", &routine, elapsed, limit),
        );
    }
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
    if kernel.watchdog.started.swap(true, Ordering::SeqCst) {
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
    let mut seen = HashMap::new();
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

/// The longest stay past the limit that has made no progress through the kernel since the last
/// look (`seen`: each stay's start and call count then, updated here).
fn overdue(
    kernel: &Kernel,
    limit: Duration,
    seen: &mut HashMap<u64, (Instant, u64)>,
) -> Option<Overdue> {
    let stays = kernel.watchdog.stays();
    let previous = core::mem::replace(
        seen,
        stays
            .iter()
            .map(|(&id, stay)| (id, (stay.since, stay.calls)))
            .collect(),
    );
    let (&id, longest) = stays
        .iter()
        .filter(|&(id, stay)| {
            stay.since.elapsed() > limit && previous.get(id) == Some(&(stay.since, stay.calls))
        })
        .min_by_key(|(_, stay)| stay.since)?;
    let elapsed = longest.since.elapsed();
    let mut others: Vec<_> = stays
        .iter()
        .filter(|&(&other, _)| other != id)
        .map(|(&other, stay)| {
            (
                other,
                stay.since.elapsed(),
                stay.routine,
                stay.thread.clone(),
            )
        })
        .collect();
    others.sort_by_key(|&(other, ..)| other);
    Some(Overdue {
        id,
        elapsed,
        irql: longest.irql,
        routine: longest.routine,
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
