//! Deadlocks: Driver Verifier's deadlock detection for spin locks (lock order, recursion,
//! releases by the wrong processor), and waits at unload that would hang forever on Windows,
//! which the simulator gives up with a stop naming what it waited for.
//!
//! Every breaking scenario runs in a child process (`bugcheck_test!` / `run_isolated`). The
//! unload scenarios hang for real; a short `Machine::set_unload_wait_limit` only makes them end
//! sooner, so they pass whatever the machine's speed.

#![cfg(any(not(windows), feature = "sim"))]
#![expect(
    clippy::multiple_unsafe_ops_per_block,
    reason = "each unsafe block is one deliberate use (or misuse) of the raw ABI, argued as a whole"
)]

use core::ptr::{null, null_mut};
use core::time::Duration;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use wfp_rs::Status;
use wfp_rs::bugcheck::{BugCheckCode, unload_wait, verifier};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::event::{Event, EventKind};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::sys;
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{Machine, run_isolated};

/// A short unload wait limit: the hangs below are real, this only shortens them.
const SHORT: Duration = Duration::from_millis(300);

// --- lock order ------------------------------------------------------------------------------

/// The classic inversion, across two processors and at different times: no hang happens in
/// the run (the first thread is done before the second starts), but Verifier reports the
/// second order at the acquisition that closes the cycle.
#[test]
fn a_lock_order_inversion_across_processors_stops_even_without_a_hang() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_lock_order_inversion_across_processors_stops_even_without_a_hang",
        ),
        || {
            static A: SpinLock<()> = SpinLock::new(());
            static B: SpinLock<()> = SpinLock::new(());
            let machine = Machine::new();
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        machine.at_dispatch(|irql| {
                            A.lock(&mut *irql, |_, irql| {
                                B.lock(irql, |_, _| ());
                            });
                        });
                    })
                    .join()
                    .unwrap();
                scope
                    .spawn(|| {
                        machine.at_dispatch(|irql| {
                            B.lock(&mut *irql, |_, irql| {
                                A.lock(irql, |_, _| ()); // closes the cycle
                            });
                        });
                    })
                    .join()
                    .unwrap();
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION);
    assert_eq!(
        report.params[0],
        verifier::DEADLOCK_LOCK_ORDER,
        "{}",
        outcome.stderr
    );
    assert_ne!(report.params[1], 0);
    assert_ne!(report.params[2], 0);
    assert_ne!(report.params[1], report.params[2], "{}", outcome.stderr);
    // The report says where the other order was taken: this file, in the first thread.
    assert!(
        outcome
            .stderr
            .lines()
            .any(|l| l.starts_with("before: ") && l.contains("deadlock.rs:")),
        "{}",
        outcome.stderr
    );
}

bugcheck_test! {
    /// A cycle through three locks, each pair taken in a consistent order by itself.
    fn a_three_lock_cycle_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_LOCK_ORDER) {
        static A: SpinLock<()> = SpinLock::new(());
        static B: SpinLock<()> = SpinLock::new(());
        static C: SpinLock<()> = SpinLock::new(());
        let machine = Machine::new();
        machine.at_passive(|irql| {
            {
                A.lock(&mut *irql, |_, irql| {
                    B.lock(irql, |_, _| ());
                });
            }
            {
                B.lock(&mut *irql, |_, irql| {
                    C.lock(irql, |_, _| ());
                });
            }
            C.lock(&mut *irql, |_, irql| {
                A.lock(irql, |_, _| ()); // C → A closes A → B → C
            });
        });
    }
}

bugcheck_test! {
    /// The raw ABI: the cycle is found whichever API takes the locks.
    fn a_lock_order_inversion_through_the_raw_abi_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_LOCK_ORDER) {
        static mut FIRST: sys::KSPIN_LOCK = 0;
        static mut SECOND: sys::KSPIN_LOCK = 0;
        Machine::new().at_dispatch(|_irql| {
            let a = &raw mut FIRST;
            let b = &raw mut SECOND;
            // Each acquisition is released in reverse order, at DISPATCH_LEVEL.
            // SAFETY: initialised locks that live for the process, released in reverse order.
            unsafe {
                let old_a = sys::KeAcquireSpinLockRaiseToDpc(a);
                let old_b = sys::KeAcquireSpinLockRaiseToDpc(b);
                sys::KeReleaseSpinLock(b, old_b);
                sys::KeReleaseSpinLock(a, old_a);
                let old_b = sys::KeAcquireSpinLockRaiseToDpc(b);
                let _ = sys::KeAcquireSpinLockRaiseToDpc(a);
                sys::KeReleaseSpinLock(b, old_b);
            }
        });
    }
}

bugcheck_test! {
    /// The classic WDM inversion: a dispatch path that takes the cancel spin lock while holding
    /// its queue lock, and a cancel routine (called with the cancel spin lock held) that takes
    /// the queue lock before releasing it.
    fn the_cancel_spin_lock_and_a_queue_lock_in_both_orders_stop() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_LOCK_ORDER) {
        static mut QUEUE: sys::KSPIN_LOCK = 0;
        Machine::new().at_dispatch(|_irql| {
            let queue = &raw mut QUEUE;
            let mut cancel_irql = 0;
            // SAFETY: a lock that lives for the process and the system cancel spin lock, each
            // released in reverse order at DISPATCH_LEVEL.
            unsafe {
                // "Dispatch": queue lock, then the cancel spin lock.
                let old = sys::KeAcquireSpinLockRaiseToDpc(queue);
                sys::IoAcquireCancelSpinLock(&mut cancel_irql);
                sys::IoReleaseCancelSpinLock(cancel_irql);
                sys::KeReleaseSpinLock(queue, old);
                // "Cancel routine": the cancel spin lock, then the queue lock.
                sys::IoAcquireCancelSpinLock(&mut cancel_irql);
                let _ = sys::KeAcquireSpinLockRaiseToDpc(queue);
            }
        });
    }
}

/// Many processors taking the same locks in the same order, over and over: a consistent order is
/// never reported.
#[test]
fn a_consistent_lock_order_on_eight_processors_runs_clean() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 500;
    let machine = Machine::new();
    let (outer, inner) = (SpinLock::new(0u64), SpinLock::new(0u64));
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                machine.at_passive(|irql| {
                    for _ in 0..ROUNDS {
                        outer.lock(&mut *irql, |o, irql| {
                            *o += 1;
                            inner.lock(irql, |i, _| *i += 1);
                        });
                    }
                });
            });
        }
    });
    assert_eq!(outer.into_inner(), (THREADS * ROUNDS) as u64);
    assert_eq!(inner.into_inner(), (THREADS * ROUNDS) as u64);
}

/// Takes two spin locks that live in this frame, in the order `swap` says.
#[inline(never)]
fn nest_on_the_stack(irql: &mut PassiveLevel<'_>, swap: bool) {
    let first = SpinLock::new(());
    let second = SpinLock::new(());
    let (x, y) = if swap {
        (&second, &first)
    } else {
        (&first, &second)
    };
    x.lock(&mut *irql, |_, irql| {
        y.lock(irql, |_, _| ());
    });
}

/// Locks on the stack are gone when their frame returns; new locks at the same addresses, taken
/// in the other order, are other locks.
#[test]
fn stack_locks_are_forgotten_when_their_frame_returns() {
    let machine = Machine::new();
    machine.at_passive(|irql| nest_on_the_stack(irql, false));
    assert_eq!(
        machine.remembered_spin_locks(),
        0,
        "forgotten when the frame they lived in returned"
    );
    // The same call path puts the new locks at the same addresses (in a debug build, always):
    // taking them in the other order is then exactly the reuse that must not report a cycle.
    machine.at_passive(|irql| nest_on_the_stack(irql, true));
    assert_eq!(machine.remembered_spin_locks(), 0);
}

/// Takes the two spin locks at the start of `block`, the second first if `swap`.
///
/// # Safety
///
/// `block` points to two unlocked `KSPIN_LOCK`s; the caller runs at `DISPATCH_LEVEL`.
unsafe fn nest_in(block: *mut sys::KSPIN_LOCK, swap: bool) {
    // SAFETY: the caller's contract; each acquisition is released in reverse order.
    unsafe {
        let (a, b) = if swap {
            (block.add(1), block)
        } else {
            (block, block.add(1))
        };
        let old_a = sys::KeAcquireSpinLockRaiseToDpc(a);
        let old_b = sys::KeAcquireSpinLockRaiseToDpc(b);
        sys::KeReleaseSpinLock(b, old_b);
        sys::KeReleaseSpinLock(a, old_a);
    }
}

/// Locks in a pool block are gone when it is freed: deadlock detection forgets them, so locks
/// later allocated at the same address, taken in the other order, are other locks.
#[test]
fn locks_in_freed_pool_are_forgotten() {
    const TAG: u32 = u32::from_le_bytes(*b"Lock");
    let machine = Machine::new();
    machine.at_dispatch(|_irql| {
        // SAFETY: a zeroed block of two unlocked KSPIN_LOCKs, freed once, at DISPATCH_LEVEL.
        unsafe {
            let block = sys::ExAllocatePool2(sys::POOL_FLAG_NON_PAGED, 16, TAG);
            assert!(!block.is_null());
            nest_in(block.cast(), false);
            assert_eq!(machine.remembered_spin_locks(), 2);
            sys::ExFreePoolWithTag(block, TAG);
        }
        assert_eq!(machine.remembered_spin_locks(), 0);
    });
}

/// Locks in a `Box` of driver code live in the driver's pool (the simulator's global
/// allocator): dropping the box forgets them too, while the driver stays loaded.
#[test]
fn locks_in_a_dropped_box_of_driver_code_are_forgotten() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    driver
        .run_in_driver(&machine, |irql, _| {
            let locks = Box::new((SpinLock::new(()), SpinLock::new(())));
            locks.0.lock(&mut *irql, |_, irql| {
                locks.1.lock(irql, |_, _| ());
            });
            assert_eq!(machine.remembered_spin_locks(), 2);
            drop(locks);
            assert_eq!(machine.remembered_spin_locks(), 0);
        })
        .unwrap();
    machine.unload_driver(driver).unwrap();
}

/// The locks a driver ordered are forgotten when it unloads (its memory is gone with it, pool or
/// not).
#[test]
fn locks_a_driver_ordered_are_forgotten_at_its_unload() {
    static OUTER: SpinLock<()> = SpinLock::new(());
    static INNER: SpinLock<()> = SpinLock::new(());
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    driver
        .run_in_driver(&machine, |irql, _| {
            OUTER.lock(&mut *irql, |_, irql| {
                INNER.lock(irql, |_, _| ());
            });
        })
        .unwrap();
    assert_eq!(machine.remembered_spin_locks(), 2);
    machine.unload_driver(driver).unwrap();
    assert_eq!(machine.remembered_spin_locks(), 0);
}

// --- recursion and releases ------------------------------------------------------------------

bugcheck_test! {
    /// The raw ABI's recursive acquisition: deadlock detection reports it before the kernel would
    /// spin forever.
    fn acquiring_a_spin_lock_twice_through_the_raw_abi_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_SELF) {
        Machine::new().at_dispatch(|_irql| {
            let mut lock: sys::KSPIN_LOCK = 0;
            // SAFETY: deliberately acquiring a held lock again.
            unsafe {
                let _ = sys::KeAcquireSpinLockRaiseToDpc(&mut lock);
                let _ = sys::KeAcquireSpinLockRaiseToDpc(&mut lock);
            }
        });
    }
}

/// A processor that releases a spin lock another one holds: 0x1004, with the owner and the
/// releasing thread.
#[test]
fn releasing_a_spin_lock_another_processor_holds_stops() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "releasing_a_spin_lock_another_processor_holds_stops",
        ),
        || {
            static mut LOCK: sys::KSPIN_LOCK = 0;
            let machine = Machine::new();
            let (held, release) = mpsc::channel::<()>();
            std::thread::scope(|scope| {
                let machine = &machine;
                scope.spawn(move || {
                    machine.at_dispatch(|_irql| {
                        // SAFETY: taken and kept; the process ends with the other thread's stop.
                        let _ = unsafe { sys::KeAcquireSpinLockRaiseToDpc(&raw mut LOCK) };
                        held.send(()).unwrap();
                        loop {
                            std::thread::park();
                        }
                    });
                });
                release.recv().unwrap();
                machine.at_dispatch(|_irql| {
                    // SAFETY: deliberately releasing a lock the other thread holds.
                    unsafe { sys::KeReleaseSpinLock(&raw mut LOCK, sys::DISPATCH_LEVEL) };
                });
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION);
    assert_eq!(
        report.params[0],
        verifier::DEADLOCK_WRONG_THREAD_RELEASE,
        "{}",
        outcome.stderr
    );
    assert_ne!(report.params[2], 0, "the owner");
    assert_ne!(
        report.params[2], report.params[3],
        "owner and releaser differ"
    );
}

// --- waits at unload ---------------------------------------------------------------------------

/// A `WorkQueue` handle kept past unload: the SDK's unload waits for every handle (on Windows:
/// forever); the simulator gives up and names the handles.
#[test]
fn a_work_queue_handle_kept_past_unload_stops_instead_of_hanging() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_work_queue_handle_kept_past_unload_stops_instead_of_hanging",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(SHORT);
            let driver = machine
                .load_driver("minimal", minimal_driver::DriverEntry)
                .unwrap();
            let kept = driver.work_queue(&machine).unwrap();
            let _ = machine.unload_driver(driver);
            drop(kept);
        },
    );
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(report.params[3], unload_wait::EVENT, "{}", outcome.stderr);
    let explanation = outcome.stderr.lines().nth(2).unwrap_or_default();
    assert!(
        explanation.contains("the unload routine of driver minimal")
            && explanation.contains("1 WorkQueue handle(s)"),
        "{}",
        outcome.stderr
    );
}

/// A work item that waits for an event only the driver's unload sets: the SDK's unload waits for
/// the work item first, so neither ever runs on Windows. The report names the work items and
/// the blocked thread.
mod waits_for_unload {
    use super::*;

    pub struct State {
        pub release: Arc<Event>,
    }

    impl DriverState for State {
        // The mistake: the release belongs in `stopping`, which runs before the SDK waits for
        // work items; `unload` runs after.
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            self.release.set(irql);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let release = Arc::new(Event::try_new(EventKind::Notification, false, irql)?);
        let waiting = Arc::clone(&release);
        driver
            .work_queue()
            .queue(irql, move |passive| waiting.wait(passive))
            .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
        Ok(State { release })
    }
}

#[test]
fn a_work_item_waiting_for_unload_stops_instead_of_hanging() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_work_item_waiting_for_unload_stops_instead_of_hanging",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(SHORT);
            let driver = machine
                .load_driver("waits", waits_for_unload::DriverEntry)
                .unwrap();
            let _ = machine.unload_driver(driver);
        },
    );
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(report.params[3], unload_wait::EVENT, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("work items queued through the driver's WorkQueue"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.lines().any(|l| l.starts_with("blocked: ")
            && l.contains("a work item routine")
            && l.contains("of driver waits")),
        "{}",
        outcome.stderr
    );
}

/// A driver on the raw ABI whose work item routine never returns: its unload routine returns,
/// and the I/O manager's wait for the routine gives up.
mod raw_blocked {
    use super::*;

    use std::sync::atomic::{AtomicBool, Ordering};

    // SAFETY: a KEVENT is plain data; all zeroes is a valid (unsignalled) value, initialised
    // again in `entry`.
    pub static mut EVENT: sys::KEVENT = unsafe { core::mem::zeroed() };
    static mut DEVICE: usize = 0;
    /// Set by the routine before it blocks, so the test unloads while it runs.
    pub static STARTED: AtomicBool = AtomicBool::new(false);

    unsafe extern "system" fn blocked(device: *mut sys::DEVICE_OBJECT, item: sys::PVOID) {
        let _ = device;
        // SAFETY: the routine owns its item; the event is initialised in `entry` and never set.
        unsafe {
            sys::IoFreeWorkItem(item.cast());
            STARTED.store(true, Ordering::SeqCst);
            sys::KeWaitForSingleObject(
                (&raw mut EVENT).cast(),
                sys::Executive,
                sys::KernelMode,
                0,
                null(),
            );
        }
    }

    pub unsafe extern "system" fn entry(
        object: *mut sys::DRIVER_OBJECT,
        _path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        let mut device = null_mut();
        // SAFETY: DriverEntry at PASSIVE_LEVEL; the event lives for the process.
        unsafe {
            sys::KeInitializeEvent(&raw mut EVENT, sys::NotificationEvent, 0);
            let status = sys::IoCreateDevice(object, 0, null(), 0x22, 0, 0, &mut device);
            if status != 0 {
                return status;
            }
            DEVICE = device as usize;
            let item = sys::IoAllocateWorkItem(device);
            sys::IoQueueWorkItem(item, Some(blocked), sys::DelayedWorkQueue, item.cast());
            (*object).DriverUnload = Some(unload);
        }
        0
    }

    unsafe extern "system" fn unload(_object: *mut sys::DRIVER_OBJECT) {
        // SAFETY: the device created in `entry`, deleted once.
        unsafe { sys::IoDeleteDevice(DEVICE as *mut sys::DEVICE_OBJECT) };
    }
}

#[test]
fn a_work_item_routine_that_never_returns_stops_the_unload() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_work_item_routine_that_never_returns_stops_the_unload",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(SHORT);
            let driver = machine.load_driver("rawblock", raw_blocked::entry).unwrap();
            while !raw_blocked::STARTED.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let _ = machine.unload_driver(driver);
        },
    );
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(
        report.params[3],
        unload_wait::WORK_ITEM_ROUTINES,
        "{}",
        outcome.stderr
    );
    assert!(
        outcome
            .stderr
            .contains("work item routine(s) of driver rawblock that have not returned"),
        "{}",
        outcome.stderr
    );
}

// --- the harness's own waits -------------------------------------------------------------------

/// Queues a work item on `machine`'s minimal driver that blocks for good, and returns once its
/// routine runs. The driver stays loaded (the test is about what happens next).
fn block_a_worker(machine: &Machine) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    let queue = driver.work_queue(machine).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    machine.at_passive(|irql| {
        let queued = queue.queue(irql, move |passive| {
            let never = Event::try_new(EventKind::Notification, false, passive).unwrap();
            flag.store(true, Ordering::SeqCst);
            never.wait(passive);
        });
        assert!(queued.is_ok());
        drop(queue);
    });
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    std::mem::forget(driver);
}

/// `Machine::wait_for_work_items` with a routine that never returns: a panic that lists the
/// blocked thread, not a hung test.
#[test]
#[should_panic(expected = "Machine::wait_for_work_items waited")]
fn waiting_for_a_work_item_that_never_returns_panics_instead_of_hanging() {
    let machine = Machine::new();
    machine.set_unload_wait_limit(SHORT);
    block_a_worker(&machine);
    machine.wait_for_work_items();
}

/// Dropping a machine whose worker thread is stuck in a routine: a panic, not a hung test.
#[test]
#[should_panic(expected = "the machine was dropped while 1 system worker thread(s) still ran")]
fn dropping_a_machine_with_a_stuck_work_item_panics_instead_of_hanging() {
    let machine = Machine::new();
    machine.set_unload_wait_limit(SHORT);
    block_a_worker(&machine);
    drop(machine);
}

/// An unload whose filter engine write waits, with an infinite transaction wait timeout, for
/// another session's transaction that never ends.
mod waits_for_a_transaction {
    use super::*;
    use wfp_rs::engine::{Engine, SessionOptions};

    pub struct State {
        pub engine: Engine,
    }

    impl DriverState for State {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            let _ = self
                .engine
                .delete_provider(irql, wfp_rs::guid!("5b0f3c2e-6a57-4f0e-9d0c-1b3e7f2a4c11"));
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<State, Status> {
        let options = SessionOptions::new().txn_wait_timeout(Duration::MAX);
        Ok(State {
            engine: Engine::open(irql, options)?,
        })
    }
}

#[test]
fn an_unload_waiting_for_another_sessions_transaction_stops_instead_of_hanging() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "an_unload_waiting_for_another_sessions_transaction_stops_instead_of_hanging",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(SHORT);
            let driver = machine
                .load_driver("txn", waits_for_a_transaction::DriverEntry)
                .unwrap();
            let (open, opened) = mpsc::channel();
            std::thread::scope(|scope| {
                let machine = &machine;
                scope.spawn(move || {
                    machine.at_passive(|irql| {
                        let other = wfp_rs::engine::Engine::open(
                            irql,
                            wfp_rs::engine::SessionOptions::new(),
                        )
                        .unwrap();
                        let _txn = other.transaction(irql).unwrap();
                        open.send(()).unwrap();
                        loop {
                            std::thread::park();
                        }
                    });
                });
                opened.recv().unwrap();
                let _ = machine.unload_driver(driver);
            });
        },
    );
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(
        report.params[3],
        unload_wait::TRANSACTION,
        "{}",
        outcome.stderr
    );
    assert!(
        report
            .routine
            .starts_with("the unload routine of driver txn"),
        "{}",
        outcome.stderr
    );
}

/// A driver on the raw ABI whose unload sends a message with no timeout to a connected client
/// that never reads: `FltSendMessage` waits for user mode for ever on Windows.
mod raw_sender {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub const PORT: &str = "\\RawSender";
    static FILTER: AtomicUsize = AtomicUsize::new(0);
    static SERVER: AtomicUsize = AtomicUsize::new(0);
    static CLIENT: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "system" fn connect(
        client: sys::PFLT_PORT,
        _server_cookie: sys::PVOID,
        _context: sys::PVOID,
        _size: sys::ULONG,
        _connection_cookie: *mut sys::PVOID,
    ) -> sys::NTSTATUS {
        CLIENT.store(client as usize, Ordering::SeqCst);
        0
    }

    unsafe extern "system" fn disconnect(_cookie: sys::PVOID) {}

    pub unsafe extern "system" fn entry(
        object: *mut sys::DRIVER_OBJECT,
        _path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        let registration = sys::FLT_REGISTRATION {
            Size: core::mem::size_of::<sys::FLT_REGISTRATION>() as u16,
            Version: sys::FLT_REGISTRATION_VERSION,
            Flags: 0,
            ContextRegistration: null(),
            OperationRegistration: null(),
            FilterUnloadCallback: None,
            InstanceSetupCallback: null_mut(),
            InstanceQueryTeardownCallback: null_mut(),
            InstanceTeardownStartCallback: null_mut(),
            InstanceTeardownCompleteCallback: null_mut(),
            GenerateFileNameCallback: null_mut(),
            NormalizeNameComponentCallback: null_mut(),
            NormalizeContextCleanupCallback: null_mut(),
            TransactionNotificationCallback: null_mut(),
            NormalizeNameComponentExCallback: null_mut(),
            SectionNotificationCallback: null_mut(),
        };
        let mut name: Vec<u16> = PORT.encode_utf16().collect();
        let mut unicode = sys::UNICODE_STRING {
            Length: (name.len() * 2) as u16,
            MaximumLength: (name.len() * 2) as u16,
            Buffer: name.as_mut_ptr(),
        };
        let attributes = sys::OBJECT_ATTRIBUTES {
            Length: core::mem::size_of::<sys::OBJECT_ATTRIBUTES>() as u32,
            RootDirectory: null_mut(),
            ObjectName: &mut unicode,
            Attributes: sys::OBJ_KERNEL_HANDLE | sys::OBJ_CASE_INSENSITIVE,
            SecurityDescriptor: null_mut(),
            SecurityQualityOfService: null_mut(),
        };
        let (mut filter, mut server) = (null_mut(), null_mut());
        // SAFETY: DriverEntry at PASSIVE_LEVEL with its own driver object; every pointer is a
        // local valid for the call.
        unsafe {
            let status = sys::FltRegisterFilter(object, &registration, &mut filter);
            assert_eq!(status, 0);
            let status = sys::FltCreateCommunicationPort(
                filter,
                &mut server,
                &attributes,
                null_mut(),
                Some(connect),
                Some(disconnect),
                None,
                1,
            );
            assert_eq!(status, 0);
            // FltRegisterFilter took the unload routine away (no FilterUnloadCallback).
            (*object).DriverUnload = Some(unload);
        }
        FILTER.store(filter as usize, Ordering::SeqCst);
        SERVER.store(server as usize, Ordering::SeqCst);
        0
    }

    unsafe extern "system" fn unload(_object: *mut sys::DRIVER_OBJECT) {
        let mut client = CLIENT.load(Ordering::SeqCst) as sys::PFLT_PORT;
        let mut message = *b"goodbye";
        // SAFETY: the filter and the client port are live; no reply is asked for; no timeout
        // (the mistake).
        unsafe {
            sys::FltSendMessage(
                FILTER.load(Ordering::SeqCst) as sys::PFLT_FILTER,
                &mut client,
                message.as_mut_ptr().cast(),
                message.len() as u32,
                null_mut(),
                null_mut(),
                null(),
            );
        }
    }
}

#[test]
fn an_unload_sending_with_no_timeout_to_a_silent_client_stops_instead_of_hanging() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "an_unload_sending_with_no_timeout_to_a_silent_client_stops_instead_of_hanging",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(SHORT);
            let driver = machine.load_driver("sender", raw_sender::entry).unwrap();
            let mut client = machine.port_client(raw_sender::PORT);
            client.connect(&[]).unwrap();
            let _ = machine.unload_driver(driver);
            drop(client);
        },
    );
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(
        report.params[3],
        unload_wait::PORT_MESSAGE,
        "{}",
        outcome.stderr
    );
    assert_ne!(
        report.params[0], 0,
        "parameter 1 is the client port: {}",
        outcome.stderr
    );
    assert!(
        report.explanation.contains("user mode to receive message"),
        "{}",
        outcome.stderr
    );
}

// --- the DPC watchdog --------------------------------------------------------------------------

/// A short DPC watchdog limit. The spins below never end, so they trip any limit; this only
/// makes them end sooner.
const WATCHDOG: Duration = Duration::from_millis(200);

/// 200 ms in 15.625 ms clock ticks, rounded up: parameter 2 of the stop.
const WATCHDOG_TICKS: usize = 13;

/// A spin under a spin lock, waiting for a flag nothing on this machine will set (on Windows:
/// a work item that cannot run while this processor spins), calling no kernel routine: the
/// watchdog's own thread stops the machine and names the spinning thread and its routine.
#[test]
fn spinning_under_a_spin_lock_for_ever_trips_the_dpc_watchdog() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "spinning_under_a_spin_lock_for_ever_trips_the_dpc_watchdog",
        ),
        || {
            static LOCK: SpinLock<()> = SpinLock::new(());
            static DONE: AtomicBool = AtomicBool::new(false);
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(WATCHDOG);
            machine.at_passive(|irql| {
                LOCK.lock(irql, |_, _| {
                    while !DONE.load(Ordering::SeqCst) {
                        core::hint::spin_loop();
                    }
                });
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(
        report.params,
        [1, WATCHDOG_TICKS, 0, 0],
        "cumulative, the period in ticks: {}",
        outcome.stderr
    );
    assert!(
        report
            .routine
            .starts_with("test harness code (Machine::at_passive); thread ")
            && report.routine.ends_with(", IRQL 2"),
        "the spinning thread, not the watchdog's: {}",
        outcome.stderr
    );
    assert!(
        report.explanation.contains("DISPATCH_LEVEL or above for ")
            && report.explanation.contains("limit of 0.200 s"),
        "{}",
        outcome.stderr
    );
    assert!(
        report.location.starts_with("(not available"),
        "{}",
        outcome.stderr
    );
}

/// The same spin in a loop that calls a kernel routine (the clock): the spinning thread stops
/// the machine itself, and the report has its own line.
#[test]
fn a_spin_at_dispatch_that_calls_the_kernel_stops_on_its_own_thread() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_spin_at_dispatch_that_calls_the_kernel_stops_on_its_own_thread",
        ),
        || {
            static DONE: AtomicBool = AtomicBool::new(false);
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(WATCHDOG);
            machine.at_dispatch(|_irql| {
                while !DONE.load(Ordering::SeqCst) {
                    let _ = wfp_rs::time::Instant::now(); // spins, reading the clock
                }
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(
        report.params,
        [1, WATCHDOG_TICKS, 0, 0],
        "{}",
        outcome.stderr
    );
    assert!(
        report
            .routine
            .starts_with("test harness code (Machine::at_dispatch); thread "),
        "{}",
        outcome.stderr
    );
    let line = include_str!("deadlock.rs")
        .lines()
        .position(|l| l.ends_with("// spins, reading the clock"))
        .map(|index| index + 1)
        .expect("the line is in this file");
    assert!(
        report.location.contains(&format!("deadlock.rs:{line}:")),
        "{}",
        outcome.stderr
    );
}

bugcheck_test! {
    /// Raising the IRQL by hand and spinning there counts the same as a spin lock.
    fn spinning_after_raising_the_irql_by_hand_trips_the_dpc_watchdog() expects DPC_WATCHDOG_VIOLATION (1) {
        static DONE: AtomicBool = AtomicBool::new(false);
        let machine = Machine::new();
        machine.set_dpc_watchdog_limit(WATCHDOG);
        machine.run(|| {
            // SAFETY: raised from PASSIVE_LEVEL to DISPATCH_LEVEL; never lowered, the machine stops.
            let _old = unsafe { sys::KfRaiseIrql(sys::DISPATCH_LEVEL) };
            while !DONE.load(Ordering::SeqCst) {
                core::hint::spin_loop();
            }
        });
    }
}

/// The limit is read again during a stay: lowered while a thread spins at DISPATCH_LEVEL calling
/// the kernel, the stay that has lasted longer than the new limit stops the machine on its own
/// thread (with the new limit in the report), not the default 10 s later.
#[test]
fn lowering_the_watchdog_limit_during_a_stay_applies_to_it() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "lowering_the_watchdog_limit_during_a_stay_applies_to_it",
        ),
        || {
            let machine = Machine::new();
            machine.at_dispatch(|_irql| {
                let _ = wfp_rs::time::Instant::now(); // a kernel call with the default limit
                machine.set_dpc_watchdog_limit(WATCHDOG);
                loop {
                    let _ = wfp_rs::time::Instant::now(); // spins, reading the clock
                }
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(
        report.params,
        [1, WATCHDOG_TICKS, 0, 0],
        "{}",
        outcome.stderr
    );
    assert!(
        report.explanation.starts_with("this processor ")
            && report.explanation.contains("limit of 0.200 s"),
        "{}",
        outcome.stderr
    );
}

/// And raised during a stay, it no longer stops a stay the old limit would have: the thread
/// spins calling the kernel for twice the old limit, then returns.
#[test]
fn raising_the_watchdog_limit_during_a_stay_applies_to_it() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "raising_the_watchdog_limit_during_a_stay_applies_to_it",
        ),
        || {
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(WATCHDOG);
            machine.at_dispatch(|_irql| {
                let _ = wfp_rs::time::Instant::now(); // a kernel call with the short limit
                machine.set_dpc_watchdog_limit(Duration::from_secs(3600));
                let start = std::time::Instant::now();
                while start.elapsed() < 2 * WATCHDOG {
                    let _ = wfp_rs::time::Instant::now();
                }
            });
        },
    );
    outcome.expect_completed();
}

/// A thread's stays are watched in every machine it enters: after a stay in one machine, a spin
/// in another, calling no kernel routine, is found by the second machine's watchdog thread.
#[test]
fn a_thread_that_stayed_in_another_machine_is_watched_in_the_next() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_thread_that_stayed_in_another_machine_is_watched_in_the_next",
        ),
        || {
            static DONE: AtomicBool = AtomicBool::new(false);
            let first = Machine::new();
            assert_eq!(first.at_dispatch(|_| 1), 1);
            let second = Machine::new();
            second.set_dpc_watchdog_limit(WATCHDOG);
            second.at_dispatch(|_irql| {
                while !DONE.load(Ordering::SeqCst) {
                    core::hint::spin_loop();
                }
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert!(
        report
            .routine
            .starts_with("test harness code (Machine::at_dispatch); thread ")
            && report.location.starts_with("(not available"),
        "the watchdog's thread reports the spinning thread: {}",
        outcome.stderr
    );
}

/// Many stays at DISPATCH_LEVEL, each far below the limit, adding up to more than it: a stay
/// ends when the processor drops below DISPATCH_LEVEL, so nothing fires. On several threads at
/// once, with the locks taken from PASSIVE_LEVEL and from DISPATCH_LEVEL, and work items running
/// in between.
#[test]
fn short_stays_at_dispatch_that_add_up_past_the_limit_do_not_trip_the_watchdog() {
    const THREADS: usize = 4;
    let machine = Machine::new();
    machine.set_dpc_watchdog_limit(WATCHDOG);
    let lock = SpinLock::new(0u64);
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                // Past twice the limit in all, in stays of a few microseconds.
                while start.elapsed() < 2 * WATCHDOG {
                    machine.at_passive(|irql| lock.lock(irql, |count, _| *count += 1));
                    machine.at_dispatch(|irql| lock.lock(irql, |count, _| *count += 1));
                    std::thread::yield_now();
                }
            });
        }
    });
    assert!(lock.into_inner() > 0);
    // The machine is still running: a stay now starts from zero.
    assert_eq!(machine.at_dispatch(|_| 1), 1);
}

/// Two processors: one spins for ever holding a spin lock, the other spins in the kernel's
/// acquisition of that lock. The watchdog reports the longer stay — the holder — and lists the
/// other processor at DISPATCH_LEVEL too.
#[test]
fn a_processor_spinning_for_a_lock_another_spins_under_trips_the_watchdog_for_the_holder() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_processor_spinning_for_a_lock_another_spins_under_trips_the_watchdog_for_the_holder",
        ),
        || {
            static LOCK: SpinLock<()> = SpinLock::new(());
            static DONE: AtomicBool = AtomicBool::new(false);
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(WATCHDOG);
            let (held, holding) = mpsc::channel::<()>();
            std::thread::scope(|scope| {
                let machine = &machine;
                std::thread::Builder::new()
                    .name("holder".into())
                    .spawn_scoped(scope, move || {
                        machine.at_dispatch(|irql| {
                            LOCK.lock(irql, |_, _| {
                                held.send(()).unwrap();
                                while !DONE.load(Ordering::SeqCst) {
                                    core::hint::spin_loop();
                                }
                            });
                        });
                    })
                    .unwrap();
                holding.recv().unwrap();
                std::thread::Builder::new()
                    .name("waiter".into())
                    .spawn_scoped(scope, move || {
                        machine.at_dispatch(|irql| LOCK.lock(irql, |_, _| ()));
                    })
                    .unwrap();
            });
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(
        report.params,
        [1, WATCHDOG_TICKS, 0, 0],
        "{}",
        outcome.stderr
    );
    assert!(
        report.routine.contains("; thread holder ["),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.lines().any(|l| {
            l.starts_with("also at DISPATCH_LEVEL: thread waiter [")
                && l.ends_with("in test harness code (Machine::at_dispatch)")
        }),
        "{}",
        outcome.stderr
    );
}

/// A work item routine (`PASSIVE_LEVEL`) that takes a spin lock and spins under it: its stay at
/// DISPATCH_LEVEL counts like any other, and the report names the work item routine and the
/// driver.
#[test]
fn a_work_item_spinning_under_a_spin_lock_trips_the_dpc_watchdog() {
    let outcome = run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_work_item_spinning_under_a_spin_lock_trips_the_dpc_watchdog",
        ),
        || {
            static LOCK: SpinLock<()> = SpinLock::new(());
            static DONE: AtomicBool = AtomicBool::new(false);
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(WATCHDOG);
            let driver = machine
                .load_driver("minimal", minimal_driver::DriverEntry)
                .unwrap();
            let queue = driver.work_queue(&machine).expect("an SDK driver");
            machine.at_passive(|irql| {
                let queued = queue.queue(&*irql, |passive| {
                    LOCK.lock(passive, |_, _| {
                        while !DONE.load(Ordering::SeqCst) {
                            core::hint::spin_loop();
                        }
                    });
                });
                assert!(queued.is_ok());
            });
            machine.wait_for_work_items();
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(
        report.params,
        [1, WATCHDOG_TICKS, 0, 0],
        "{}",
        outcome.stderr
    );
    assert!(
        report.routine.starts_with("a work item routine (")
            && report
                .routine
                .contains(" of driver minimal; thread sim-worker-"),
        "{}",
        outcome.stderr
    );
}
