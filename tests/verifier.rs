//! The simulator is a verifier: every rule that makes Windows (with Driver Verifier) bugcheck
//! stops the simulated machine with the same stop code. Each rule has a test that breaks it and
//! a test that follows it and runs clean.
//!
//! The breaking scenarios run in a child process (`bugcheck_test!`), because a bug check ends the
//! process the way it stops a machine.

#![cfg(any(not(windows), feature = "sim"))]
#![expect(
    clippy::multiple_unsafe_ops_per_block,
    reason = "each unsafe block is one deliberate misuse of the raw ABI, argued as a whole"
)]

use core::ptr::{null, null_mut};

use wfp_rs::bugcheck::verifier;
use wfp_rs::event::{Event, EventKind};
use wfp_rs::irql::{Irql, PassiveLevel};
use wfp_rs::pool::{PoolBox, PoolTag};
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::sys;
use wfp_rs_sim::Machine;
use wfp_rs_sim::bugcheck_test;

const TAG: u32 = u32::from_le_bytes(*b"Test");

// --- calling a routine above its maximum IRQL ---------------------------------------------

bugcheck_test! {
    /// KeWaitForSingleObject with a timeout requires IRQL <= APC_LEVEL.
    fn waiting_at_dispatch_stops_with_irql_not_less_or_equal() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|irql| {
            let event = Event::try_new(EventKind::Notification, true, irql).unwrap();
            let raw = &event as *const Event;
            // SAFETY: deliberately breaking the IRQL rule; the event pointer is only used as an
            // address the simulator rejects before it dereferences anything.
            unsafe {
                sys::KeWaitForSingleObject(raw as sys::PVOID, sys::Executive, sys::KernelMode, 0, null());
            }
        });
    }
}

bugcheck_test! {
    /// IoCreateDevice is PASSIVE_LEVEL only.
    fn creating_a_device_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_irql| {
            let mut device = null_mut();
            // SAFETY: deliberately breaking the IRQL rule; the simulator stops before using the
            // (null) driver object.
            unsafe { sys::IoCreateDevice(null_mut(), 0, null(), 0, 0, 0, &mut device) };
        });
    }
}

bugcheck_test! {
    /// `PassiveLevel::assume` checks the IRQL it assumes.
    fn assuming_passive_level_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_irql| {
            // SAFETY: deliberately wrong; the debug check must catch it.
            let _token = unsafe { PassiveLevel::assume() };
        });
    }
}

bugcheck_test! {
    /// Two tokens on one thread (only possible with `unsafe` now): raising through one leaves
    /// the other claiming PASSIVE_LEVEL. `Event::set` itself is allowed at DISPATCH_LEVEL, so
    /// only the SDK's check of the token can catch this, at the call that misuses it.
    fn a_token_used_above_its_bound_stops_at_the_call() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        let lock = SpinLock::new(());
        machine.at_passive(|irql| {
            let event = Event::try_new(EventKind::Notification, false, irql).unwrap();
            let misuse = |second: &mut wfp_rs::irql::DispatchLevel<'_>| {
                lock.lock(second, |_, _| event.set(irql));
            };
            // SAFETY: NOT upheld, on purpose: `irql` is usable while `misuse` runs. The scenario
            // checks the run-time backstop for exactly this broken promise.
            unsafe { wfp_rs::irql::DispatchLevel::try_current(misuse) };
        });
    }
}

#[test]
fn waiting_at_passive_level_runs_clean() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let event = Event::try_new(EventKind::Synchronization, true, irql).unwrap();
        event.wait(irql);
        // A synchronization event resets when a wait is satisfied.
        assert!(!event.wait_timeout(irql, core::time::Duration::ZERO));
        event.set(irql);
        assert!(event.wait_timeout(irql, core::time::Duration::ZERO));
    });
}

#[test]
fn try_current_refuses_a_passive_token_at_dispatch() {
    let machine = Machine::new();
    // SAFETY: the closures bind no token (`|_irql|` is unused), so no other token is usable.
    let refused = machine.at_dispatch(|_| unsafe { PassiveLevel::try_current(|_| ()) }.is_none());
    assert!(
        refused,
        "try_current must not mint a PassiveLevel token at DISPATCH_LEVEL"
    );
    // SAFETY: as above.
    let granted = machine.at_passive(|_| unsafe { PassiveLevel::try_current(|_| ()) }.is_some());
    assert!(granted);
}

/// A harness call that hands out a token refuses to run where another token may be live on the
/// thread: `at_dispatch` inside `at_passive` would otherwise raise the IRQL with the outer
/// `&mut PassiveLevel` still usable in the closure.
#[test]
#[should_panic(expected = "Machine::at_dispatch called where an IRQL token may already be live")]
fn a_harness_token_scope_cannot_nest() {
    let machine = Machine::new();
    machine.at_passive(|_outer| machine.at_dispatch(|_inner| ()));
}

/// The same through `Machine::run`, which hands out no token but does not hide the outer one:
/// it would run its closure at `PASSIVE_LEVEL` on a thread at `DISPATCH_LEVEL`.
#[test]
#[should_panic(expected = "nothing lowers the IRQL under running code")]
fn a_harness_token_scope_cannot_nest_through_run() {
    let machine = Machine::new();
    machine.at_dispatch(|_outer| machine.run(|| machine.at_passive(|_inner| ())));
}

/// `run_in_driver` hands out a `&mut PassiveLevel` too: not inside another token scope.
#[test]
#[should_panic(
    expected = "LoadedDriver::run_in_driver called where an IRQL token may already be live"
)]
fn run_in_driver_cannot_nest_in_a_token_scope() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    machine.at_passive(|_outer| driver.run_in_driver(&machine, |_inner, _| ()));
}

/// A harness entry point that would run code at a lower IRQL than the thread's refuses: a
/// "PASSIVE_LEVEL" classification inside a DPC would let the callout wait at DISPATCH_LEVEL.
#[test]
#[should_panic(expected = "nothing lowers the IRQL under running code")]
fn a_classification_cannot_lower_the_irql_of_the_harness() {
    let machine = Machine::new();
    machine.at_dispatch(|_| {
        machine.classify::<wfp_rs::layer::AleAuthConnectV4>(
            Irql::PASSIVE,
            &wfp_rs_sim::ClassifyRequest::new(),
        )
    });
}

/// Driver code that kept a `Machine` cannot use the harness to leave its routine and IRQL
/// (`Machine::run` from a callback would run the rest at `PASSIVE_LEVEL` as harness code): the
/// refusal is a panic in driver code, so the machine stops as a driver's panic stops Windows.
#[test]
fn the_harness_refuses_driver_code() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(module_path!(), "the_harness_refuses_driver_code"),
        || {
            let machine = Machine::new();
            let driver = machine
                .load_driver("minimal", minimal_driver::DriverEntry)
                .unwrap();
            driver.run_in_driver(&machine, |_irql, _| machine.run(|| ()));
        },
    );
    let report =
        outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED);
    assert!(
        report.explanation.contains("was called from driver code"),
        "{}",
        outcome.stderr
    );
}

/// A panic in driver code — here a work item routine, called through the SDK's
/// `extern "system"` trampoline — stops with `KMODE_EXCEPTION_NOT_HANDLED`, parameter 1
/// "Rust" and parameter 2 the panic's line, as the driver's panic handler does on Windows.
#[test]
fn a_panic_in_a_work_item_stops_with_kmode_exception_not_handled() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "a_panic_in_a_work_item_stops_with_kmode_exception_not_handled",
        ),
        || {
            let machine = Machine::new();
            let driver = machine
                .load_driver("minimal", minimal_driver::DriverEntry)
                .unwrap();
            let queue = driver.work_queue(&machine).expect("an SDK driver");
            machine.at_passive(|irql| {
                queue
                    .queue(irql, |_passive| panic!("the work item gives up")) // work item panic
                    .unwrap_or_else(|_| unreachable!("queued"));
            });
            machine.wait_for_work_items();
        },
    );
    let report =
        outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED);
    let line = include_str!("verifier.rs")
        .lines()
        .position(|l| l.ends_with("// work item panic"))
        .map(|index| index + 1)
        .expect("the line is in this file");
    assert_eq!(report.params[0], 0x5275_7374, "{}", outcome.stderr);
    assert_eq!(report.params[1], line, "{}", outcome.stderr);
    assert!(
        report.explanation.contains("the work item gives up")
            && report.routine.contains("work item routine"),
        "{}",
        outcome.stderr
    );
}

/// Token scopes one after the other, on one thread, are fine.
#[test]
fn harness_token_scopes_in_sequence_are_allowed() {
    let machine = Machine::new();
    machine.at_passive(|_| ());
    machine.at_dispatch(|_| ());
    assert_eq!(machine.at_passive(|_| Irql::current()), Irql::PASSIVE);
}

// --- pool ------------------------------------------------------------------------------------

bugcheck_test! {
    fn paged_pool_above_apc_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::PAGED_ALLOCATION_ABOVE_APC) {
        let machine = Machine::new();
        machine.at_dispatch(|_irql| {
            // SAFETY: deliberately breaking the IRQL rule for paged pool.
            unsafe { sys::ExAllocatePool2(sys::POOL_FLAG_PAGED, 64, TAG) };
        });
    }
}

bugcheck_test! {
    fn zero_byte_allocation_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::ZERO_BYTE_ALLOCATION) {
        Machine::new().run(|| {
            // SAFETY: deliberately requesting zero bytes.
            unsafe { sys::ExAllocatePool2(sys::POOL_FLAG_NON_PAGED, 0, TAG) };
        });
    }
}

bugcheck_test! {
    fn double_free_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DOUBLE_FREE) {
        Machine::new().run(|| {
            // SAFETY: a valid allocation, then deliberately freed twice.
            unsafe {
                let block = sys::ExAllocatePool2(sys::POOL_FLAG_NON_PAGED, 32, TAG);
                sys::ExFreePoolWithTag(block, TAG);
                sys::ExFreePoolWithTag(block, TAG);
            }
        });
    }
}

bugcheck_test! {
    fn freeing_with_the_wrong_tag_stops() expects BAD_POOL_CALLER (0x0A) {
        Machine::new().run(|| {
            // SAFETY: a valid allocation, deliberately freed with another tag.
            unsafe {
                let block = sys::ExAllocatePool2(sys::POOL_FLAG_NON_PAGED, 32, TAG);
                sys::ExFreePoolWithTag(block, u32::from_le_bytes(*b"Othr"));
            }
        });
    }
}

#[test]
fn non_paged_pool_at_dispatch_runs_clean_and_is_zeroed() {
    let machine = Machine::new();
    machine.at_dispatch(|irql| {
        let block = PoolBox::try_new([0u8; 48], PoolTag::new(b"Test"), irql).unwrap();
        assert_eq!(*block, [0u8; 48]);
        assert_eq!(PoolBox::tag(&block), PoolTag::new(b"Test"));
    });
    assert!(
        machine.pool_blocks().is_empty(),
        "the PoolBox was freed on drop"
    );
}

#[test]
fn uninitialized_pool_is_filled_with_a_pattern() {
    Machine::new().run(|| {
        // SAFETY: a valid allocation that is read (as bytes) and freed with its tag.
        unsafe {
            let block = sys::ExAllocatePool2(
                sys::POOL_FLAG_NON_PAGED | sys::POOL_FLAG_UNINITIALIZED,
                8,
                TAG,
            );
            assert_eq!(*block.cast::<[u8; 8]>(), [0xCD; 8]);
            sys::ExFreePoolWithTag(block, TAG);
        }
    });
}

#[test]
fn failed_allocations_hand_the_value_back() {
    let machine = Machine::new();
    machine.fail_allocations(0, 1);
    machine.at_passive(|irql| {
        let error = PoolBox::try_new(String::from("kept"), PoolTag::SDK, irql).unwrap_err();
        assert_eq!(
            error.to_string(),
            "non-paged pool allocation of 24 bytes failed"
        );
        assert_eq!(error.into_inner(), "kept");
        assert!(
            PoolBox::try_new(1u32, PoolTag::SDK, irql).is_ok(),
            "only one failure was injected"
        );
    });
}

// --- IRQL and spin locks ---------------------------------------------------------------------

bugcheck_test! {
    fn releasing_a_spin_lock_below_dispatch_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::RELEASE_SPIN_LOCK_NOT_AT_DISPATCH) {
        Machine::new().run(|| {
            let mut lock: sys::KSPIN_LOCK = 0;
            // SAFETY: deliberately lowering the IRQL while the lock is held, then releasing.
            unsafe {
                let old = sys::KeAcquireSpinLockRaiseToDpc(&mut lock);
                sys::KeLowerIrql(old);
                sys::KeReleaseSpinLock(&mut lock, old);
            }
        });
    }
}

bugcheck_test! {
    fn acquiring_a_held_spin_lock_on_the_same_processor_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_SELF) {
        let machine = Machine::new();
        machine.at_passive(|irql| {
            let lock = SpinLock::new(0u32);
            lock.lock(irql, |_, irql| {
                // Deadlocks on Windows; the safe API allows it because the lock is shared.
                lock.lock(irql, |_, _| ());
            });
        });
    }
}

bugcheck_test! {
    fn releasing_a_spin_lock_that_is_not_held_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::DEADLOCK_UNACQUIRED_RELEASE) {
        Machine::new().at_dispatch(|_irql| {
            let mut lock: sys::KSPIN_LOCK = 0;
            // SAFETY: deliberately releasing a lock nobody holds, at the right IRQL.
            unsafe { sys::KeReleaseSpinLock(&mut lock, sys::DISPATCH_LEVEL) };
        });
    }
}

bugcheck_test! {
    fn lowering_the_irql_to_a_higher_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::LOWER_IRQL_TO_HIGHER_LEVEL) {
        Machine::new().run(|| {
            // SAFETY: deliberately "lowering" from PASSIVE_LEVEL to DISPATCH_LEVEL.
            unsafe { sys::KeLowerIrql(sys::DISPATCH_LEVEL) };
        });
    }
}

bugcheck_test! {
    fn raising_the_irql_to_a_lower_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::RAISE_IRQL_TO_LOWER_LEVEL) {
        Machine::new().at_dispatch(|_irql| {
            // SAFETY: deliberately "raising" from DISPATCH_LEVEL to PASSIVE_LEVEL.
            unsafe { sys::KfRaiseIrql(sys::PASSIVE_LEVEL) };
        });
    }
}

bugcheck_test! {
    /// A callback that returns with a spin lock still held (taken through the raw ABI: the safe
    /// `SpinLock` releases when its closure returns) leaves the IRQL raised.
    fn returning_from_a_callback_with_a_lock_held_stops() expects IRQL_UNEXPECTED_VALUE ((2 << 16) | 2) {
        let machine = Machine::new();
        let mut lock: sys::KSPIN_LOCK = 0;
        machine.at_passive(|_irql| {
            // SAFETY: a valid lock at PASSIVE_LEVEL; deliberately never released.
            let _old = unsafe { sys::KeAcquireSpinLockRaiseToDpc(&mut lock) };
        });
    }
}

#[test]
fn a_spin_lock_is_released_when_its_closure_unwinds() {
    let machine = Machine::new();
    let lock = SpinLock::new(0u32);
    machine.at_passive(|irql| {
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lock.lock(&mut *irql, |value, _| {
                *value += 1;
                panic!("the closure fails while the lock is held");
            })
        }));
        assert!(unwound.is_err());
        assert_eq!(
            Irql::current(),
            Irql::PASSIVE,
            "unwinding out of the closure restores the IRQL"
        );
        // The lock is free again: taking it does not stop with 0xC4 / 0x1000 (self-deadlock).
        assert_eq!(lock.lock(irql, |value, _| *value), 1);
    });
}

#[test]
fn nested_spin_locks_restore_the_irql_in_order() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let (a, b) = (SpinLock::new(1u32), SpinLock::new(2u32));
        a.lock(&mut *irql, |first, irql| {
            assert_eq!(Irql::current(), Irql::DISPATCH);
            b.lock(irql, |second, _| *second += 1);
            assert_eq!(
                Irql::current(),
                Irql::DISPATCH,
                "the outer lock is still held"
            );
            *first += 1;
        });
        assert_eq!(
            Irql::current(),
            Irql::PASSIVE,
            "releasing the outer lock restores PASSIVE_LEVEL"
        );
        let first = a.lock(&mut *irql, |first, _| *first);
        let second = b.lock(irql, |second, _| *second);
        assert_eq!((first, second), (2, 3));
    });
}

#[test]
fn spin_lock_serialises_many_processors() {
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 2_000;
    let machine = Machine::new();
    let counter = SpinLock::new(0u64);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                machine.at_passive(|irql| {
                    for _ in 0..ROUNDS {
                        counter.lock(&mut *irql, |count, _| {
                            // A non-atomic read-modify-write: lost updates would show a broken
                            // lock.
                            let seen = *count;
                            std::hint::black_box(());
                            *count = seen + 1;
                        });
                    }
                });
            });
        }
    });
    assert_eq!(counter.into_inner(), THREADS * ROUNDS);
}

// --- work items --------------------------------------------------------------------------------

/// A driver written against the raw ABI, for rules the safe API makes impossible to break.
mod raw_driver {
    use super::*;

    /// A work routine that does nothing.
    pub unsafe extern "system" fn noop(_device: *mut sys::DEVICE_OBJECT, _context: sys::PVOID) {}

    /// Creates a device and stores nothing else; unload deletes the device.
    pub unsafe extern "system" fn entry(
        object: *mut sys::DRIVER_OBJECT,
        _registry_path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        let mut device = null_mut();
        // SAFETY: called by the simulated I/O manager at PASSIVE_LEVEL with a valid driver object.
        unsafe {
            let status = sys::IoCreateDevice(
                object,
                0,
                null(),
                sys::FILE_DEVICE_NETWORK,
                0,
                0,
                &mut device,
            );
            assert_eq!(status, 0);
            (*object).DriverUnload = Some(unload);
        }
        0
    }

    pub unsafe extern "system" fn unload(object: *mut sys::DRIVER_OBJECT) {
        // SAFETY: the driver created exactly one device in `entry`.
        unsafe { sys::IoDeleteDevice((*object).DeviceObject) };
    }

    /// The driver's device object.
    pub fn device(driver: &wfp_rs_sim::LoadedDriver) -> *mut sys::DEVICE_OBJECT {
        // SAFETY: the driver object stays valid while the driver is loaded.
        unsafe { (*driver.driver_object()).DeviceObject }
    }
}

bugcheck_test! {
    fn freeing_a_queued_work_item_stops() expects WORKER_INVALID (2) {
        let machine = Machine::new();
        machine.hold_work_items(true);
        let driver = machine.load_driver("raw", raw_driver::entry).unwrap();
        let device = raw_driver::device(&driver);
        machine.run(|| {
            // SAFETY: a valid item queued with a valid routine, then deliberately freed while
            // queued (the workers are held, so it is still queued).
            unsafe {
                let item = sys::IoAllocateWorkItem(device);
                sys::IoQueueWorkItem(item, Some(raw_driver::noop), sys::DelayedWorkQueue, null_mut());
                sys::IoFreeWorkItem(item);
            }
        });
    }
}

bugcheck_test! {
    fn queueing_a_queued_work_item_again_stops() expects WORKER_INVALID (1) {
        let machine = Machine::new();
        machine.hold_work_items(true);
        let driver = machine.load_driver("raw", raw_driver::entry).unwrap();
        let device = raw_driver::device(&driver);
        machine.run(|| {
            // SAFETY: a valid item, deliberately queued twice.
            unsafe {
                let item = sys::IoAllocateWorkItem(device);
                sys::IoQueueWorkItem(item, Some(raw_driver::noop), sys::DelayedWorkQueue, null_mut());
                sys::IoQueueWorkItem(item, Some(raw_driver::noop), sys::DelayedWorkQueue, null_mut());
            }
        });
    }
}

bugcheck_test! {
    fn unloading_with_a_work_item_queued_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        machine.hold_work_items(true);
        let driver = machine.load_driver("raw", raw_driver::entry).unwrap();
        let device = raw_driver::device(&driver);
        machine.run(|| {
            // SAFETY: a valid item with a valid routine; the driver then unloads without
            // waiting for it, which is the bug under test.
            unsafe {
                let item = sys::IoAllocateWorkItem(device);
                sys::IoQueueWorkItem(item, Some(raw_driver::noop), sys::DelayedWorkQueue, null_mut());
            }
        });
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    fn unloading_with_an_unfreed_work_item_stops_as_a_pool_leak() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::POOL_LEAKED_AT_UNLOAD) {
        let machine = Machine::new();
        let driver = machine.load_driver("raw", raw_driver::entry).unwrap();
        let device = raw_driver::device(&driver);
        // Charged to the driver: allocated from its own code path.
        machine.run(|| {
            // SAFETY: a valid allocation that is deliberately never freed.
            unsafe { sys::IoAllocateWorkItem(device) };
        });
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    fn a_work_item_returning_at_dispatch_level_stops() expects WORKER_THREAD_RETURNED_AT_BAD_IRQL {
        let machine = Machine::new();
        let driver = machine.load_driver("minimal", minimal_driver::DriverEntry).unwrap();
        let queue = driver.work_queue(&machine).expect("an SDK driver");
        machine.at_passive(|irql| {
            queue
                .queue(irql, |_passive| {
                    // SAFETY: deliberately raising without lowering (the raw ABI; the safe
                    // `SpinLock` cannot leave the IRQL raised).
                    let _old = unsafe { sys::KfRaiseIrql(sys::DISPATCH_LEVEL) };
                })
                .unwrap();
        });
        machine.wait_for_work_items();
    }
}

#[test]
fn work_items_free_themselves_and_unload_runs_clean() {
    let machine = Machine::new();
    let driver = machine.load_driver("raw", raw_driver::entry).unwrap();
    let device = raw_driver::device(&driver);
    unsafe extern "system" fn free_self(_device: *mut sys::DEVICE_OBJECT, context: sys::PVOID) {
        // SAFETY: the context is this routine's own work item, which it may free (the system
        // dequeued it before calling the routine).
        unsafe { sys::IoFreeWorkItem(context.cast()) };
    }
    machine.run(|| {
        // SAFETY: a valid item whose routine frees it.
        unsafe {
            let item = sys::IoAllocateWorkItem(device);
            sys::IoQueueWorkItem(item, Some(free_self), sys::DelayedWorkQueue, item.cast());
        }
    });
    machine.wait_for_work_items();
    machine.unload_driver(driver).expect("unloads");
    assert!(
        machine.pool_blocks().is_empty(),
        "left: {:?}",
        machine.pool_blocks()
    );
}

// --- the stop report ---------------------------------------------------------------------------

/// A driver whose `DriverEntry` waits at `DISPATCH_LEVEL`, for the report's format.
mod waits_in_entry {
    use super::*;

    pub unsafe extern "system" fn entry(
        _object: *mut sys::DRIVER_OBJECT,
        _registry_path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        let mut event = std::mem::MaybeUninit::<sys::KEVENT>::uninit();
        // SAFETY: deliberately waiting at DISPATCH_LEVEL; the simulator stops before the wait.
        unsafe {
            sys::KeInitializeEvent(event.as_mut_ptr(), sys::NotificationEvent, 0);
            sys::KfRaiseIrql(sys::DISPATCH_LEVEL);
            // The report's `at:` line points at the next line.
            sys::KeWaitForSingleObject(
                event.as_mut_ptr().cast(),
                sys::Executive,
                sys::KernelMode,
                0,
                null(),
            );
        }
        0
    }
}

/// The first lines a stop prints are, in order: the stop code and its four parameters, the bug
/// check's name, the simulator's one-line explanation, the driver routine the thread ran (with
/// the thread and the IRQL), and the source location of the innermost frame of driver code.
#[test]
fn the_stop_report_starts_with_code_name_explanation_routine_and_driver_line() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "the_stop_report_starts_with_code_name_explanation_routine_and_driver_line",
        ),
        || {
            let machine = Machine::new();
            let _ = machine.load_driver("report", waits_in_entry::entry);
        },
    );
    let report = outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::IRQL_NOT_LESS_OR_EQUAL);
    let stop = outcome.stderr.find("*** STOP: ").expect("a STOP line");
    let lines: Vec<&str> = outcome.stderr[stop..].lines().take(5).collect();
    assert_eq!(
        lines[0],
        "*** STOP: 0x0000000A (0x0000000000000000, 0x0000000000000002, 0x0000000000000008, 0x0000000000000000)",
        "{}",
        outcome.stderr
    );
    assert_eq!(lines[1], "IRQL_NOT_LESS_OR_EQUAL");
    assert_eq!(
        lines[2],
        "wfp-rs simulator: KeWaitForSingleObject was called at IRQL 2 (DISPATCH_LEVEL); its maximum is 1 (APC_LEVEL)"
    );
    assert!(
        lines[3].starts_with("in: DriverEntry of driver report; thread ")
            && lines[3].ends_with(", IRQL 2"),
        "{}",
        lines[3]
    );
    // The wait is on the line after the comment that announces it (1-based line numbers).
    let wait_line = include_str!("verifier.rs")
        .lines()
        .position(|l| l.contains("The report's `at:` line points at the next line."))
        .map(|index| index + 2)
        .expect("the comment is in this file");
    assert!(
        lines[4].starts_with("at: ")
            && lines[4].contains(&format!("verifier.rs:{wait_line}:"))
            && lines[4].contains("waits_in_entry::entry"),
        "{}",
        lines[4]
    );
    // `run_isolated` parses the same lines.
    assert_eq!(report.params, [0, 2, 8, 0]);
    assert_eq!(
        report.explanation,
        lines[2].trim_start_matches("wfp-rs simulator: ")
    );
    assert_eq!(report.routine, lines[3].trim_start_matches("in: "));
    assert_eq!(report.location, lines[4].trim_start_matches("at: "));
}

/// `try_current` grants a token only for the bounds the current IRQL satisfies.
#[test]
fn try_current_grants_only_the_bounds_that_hold() {
    use wfp_rs::irql::{ApcLevel, DispatchLevel};
    fn grants() -> (bool, bool, bool) {
        // SAFETY: the callers bind no token (`|_|`), so none other is usable here.
        let passive = unsafe { PassiveLevel::try_current(|_| ()) }.is_some();
        // SAFETY: as above.
        let apc = unsafe { ApcLevel::try_current(|_| ()) }.is_some();
        // SAFETY: as above.
        let dispatch = unsafe { DispatchLevel::try_current(|_| ()) }.is_some();
        (passive, apc, dispatch)
    }
    let machine = Machine::new();
    assert_eq!(machine.at_dispatch(|_| grants()), (false, false, true));
    assert_eq!(machine.at_passive(|_| grants()), (true, true, true));
}
