//! The state of one simulated machine, and the per-thread state of its processors.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::bugcheck::stop;
use crate::bugcheck::BugCheckCode;
use crate::sys::types::*;

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
    pub pool: HashMap<usize, Block>,
    pub freed: HashSet<usize>,
    /// While set, worker threads leave queued work items in the queue.
    pub hold_work_items: bool,
    pub drivers: HashMap<usize, DriverRecord>,
    pub devices: HashMap<usize, DeviceRecord>,
    pub work_items: HashMap<usize, WorkItemRecord>,
    pub queue: VecDeque<QueuedWork>,
    /// Work items taken off `queue` whose routine has not returned yet, by driver object (no
    /// entry: none). Counted by the worker threads, under this lock, from the moment they take
    /// an item off the queue until the routine returns, even if the routine freed its item
    /// first (the SDK's routines do): Windows keeps the device object referenced, and the
    /// driver loaded, for that long.
    pub running_work: HashMap<usize, usize>,
    pub debug: Vec<String>,
    pub shutdown: bool,
}

// SAFETY: the raw pointers in the state (driver and device objects, their links) point into
// boxes the state itself owns, and are only touched with the machine's state lock held.
unsafe impl Send for State {}

/// Pool allocations that fail: `skip` more succeed, then `count` fail.
#[derive(Default)]
pub(crate) struct Faults {
    pub skip: u64,
    pub count: u64,
}

/// One simulated machine.
pub(crate) struct Kernel {
    pub state: Mutex<State>,
    /// Fault injection for pool allocations. A lock of its own, never held while allocating, so
    /// the global allocator can consult it whatever locks its caller holds.
    pub faults: Mutex<Faults>,
    /// Blocks the global allocator took from pool for driver code (`Box`, `Vec`, `Arc`), by
    /// address. A leaf lock, like `faults`: see `global_alloc.rs`.
    pub global_pool: Mutex<HashMap<usize, Block>>,
    /// Signalled when work is queued or the machine shuts down.
    pub work_ready: Condvar,
    /// Signalled when a work item finishes.
    pub work_done: Condvar,
    /// Guards event waits; see `event.rs`.
    pub event_lock: Mutex<()>,
    pub event_signal: Condvar,
    pub echo_debug: bool,
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
    /// Signalled when a pended classification is completed.
    pub wfp_pend: Condvar,
    /// I/O requests, file objects, symbolic links and device security (`irp.rs`).
    pub irp: super::irp::IoManager,
    /// The interrupt-time clock: host monotonic time since the machine started, plus
    /// `clock_offset` (100-ns ticks) that the harness adds with `Machine::advance_clock`.
    pub clock_start: std::time::Instant,
    pub clock_offset: AtomicU64,
}

static NEXT_THREAD_ID: AtomicU64 = AtomicU64::new(1);

/// What a simulated processor knows about the thread running on it.
pub(crate) struct ThreadState {
    pub kernel: RefCell<Option<Arc<Kernel>>>,
    pub irql: Cell<KIRQL>,
    /// The work item whose routine this thread is running (0: none).
    pub work_item: Cell<usize>,
    pub id: u64,
}

thread_local! {
    pub(crate) static THREAD: ThreadState = ThreadState {
        kernel: RefCell::new(None),
        irql: Cell::new(PASSIVE_LEVEL),
        work_item: Cell::new(0),
        id: NEXT_THREAD_ID.fetch_add(1, Ordering::Relaxed),
    };
}

impl Kernel {
    pub(crate) fn new(workers: usize) -> Arc<Kernel> {
        let kernel = Arc::new(Kernel {
            state: Mutex::new(State::default()),
            faults: Mutex::new(Faults::default()),
            global_pool: Mutex::new(HashMap::new()),
            work_ready: Condvar::new(),
            work_done: Condvar::new(),
            event_lock: Mutex::new(()),
            event_signal: Condvar::new(),
            echo_debug: std::env::var_os("WFP_SIM_ECHO").is_some(),
            workers: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            wfp: Mutex::new(super::wfp::Bfe::default()),
            wfp_idle: Condvar::new(),
            wfp_txn: Condvar::new(),
            flt: super::flt::FilterManager::default(),
            wfp_pend: Condvar::new(),
            irp: super::irp::IoManager::default(),
            clock_start: std::time::Instant::now(),
            clock_offset: AtomicU64::new(0),
        });
        let mut handles = Vec::with_capacity(workers);
        for index in 0..workers {
            let kernel = Arc::clone(&kernel);
            let handle = std::thread::Builder::new()
                .name(format!("sim-worker-{index}"))
                .spawn(move || super::io::worker_thread(kernel))
                .expect("the host could not start a simulator worker thread");
            handles.push(handle);
        }
        *kernel.workers.lock().unwrap() = handles;
        kernel
    }

    /// Whether the next pool allocation is one the harness asked to fail.
    pub(crate) fn injected_failure(&self) -> bool {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if faults.count == 0 {
            return false;
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
        let _ = self
            .clock_offset
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |offset| {
                Some(offset.saturating_add(ticks))
            });
    }

    /// Stops the worker threads (the harness's `Machine` drop).
    pub(crate) fn shut_down(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.lock().shutdown = true;
        self.work_ready.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock().unwrap());
        for handle in handles {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
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
    THREAD.with(|t| t.irql.set(irql));
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
    /// failure before), or the simulator's own code.
    pub(crate) fn enter() -> KernelCode {
        super::global_alloc::forget_failure();
        KernelCode::for_allocator()
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

/// Runs `f` with this thread entered into `kernel` at `irql`, charged to `driver`, and restores
/// the thread's previous state afterwards. With a driver, `f` runs as that driver's code: what
/// it allocates through the global allocator is the driver's pool (`global_alloc.rs`).
pub(crate) fn with_context<R>(
    kernel: &Arc<Kernel>,
    irql: KIRQL,
    driver: usize,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore {
        kernel: Option<Arc<Kernel>>,
        irql: KIRQL,
        running: Running,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // The allocator's view first: it must not point at a machine this thread may be
            // about to release.
            super::global_alloc::forget_failure();
            RUNNING.with(|r| r.set(self.running));
            THREAD.with(|t| {
                *t.kernel.borrow_mut() = self.kernel.take();
                t.irql.set(self.irql);
            });
        }
    }
    let _restore = THREAD.with(|t| {
        let previous = Restore {
            kernel: t.kernel.replace(Some(Arc::clone(kernel))),
            irql: t.irql.get(),
            running: running(),
        };
        t.irql.set(irql);
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

/// The verifier's IRQL check at the top of every simulated routine: calling `routine` above
/// `max` stops the machine with `IRQL_NOT_LESS_OR_EQUAL`, parameters as the debugger shows them
/// (address, IRQL, operation, instruction): here 0, the current IRQL, 8 (execute: the routine
/// is pageable code, or requires a wait), 0. The maximum is in the explanation.
pub(crate) fn require_irql(routine: &str, max: KIRQL) {
    let now = irql();
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
    crate::irql::Irql(irql).name().unwrap_or("device level")
}

/// `DbgPrintEx`. The simulator formats exactly what the safe layer passes: the format `%.*s`
/// followed by a length and a pointer to the text. Any other format is recorded verbatim.
///
/// # Safety
///
/// `Format` must be a NUL-terminated string; for `%.*s`, `Text` must point to `Length` bytes.
pub unsafe extern "C" fn DbgPrintEx(
    ComponentId: ULONG,
    Level: ULONG,
    Format: PCSTR,
    Length: i32,
    Text: *const u8,
) -> ULONG {
    let _kernel = KernelCode::enter();
    let _ = (ComponentId, Level);
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
    let kernel = current();
    if kernel.echo_debug {
        eprint!("{text}");
    }
    kernel.lock().debug.push(text);
    0
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
