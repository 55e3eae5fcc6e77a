//! Whole drivers in the simulator: load, work, unload, and the failure paths in between.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use wfp_rs::Status;
use wfp_rs::bugcheck::verifier;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::irql::{Irql, PassiveLevel};
use wfp_rs::pool::{PoolBox, PoolTag};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{Machine, UnloadError};

#[test]
fn minimal_driver_runs_its_work_items_and_unloads_clean() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .expect("loads");
    machine.unload_driver(driver).expect("unloads");
    let output = machine.debug_output().concat();
    assert!(
        output.contains(
            "minimal-driver: loaded from \\REGISTRY\\MACHINE\\SYSTEM\\CurrentControlSet\\Services\\minimal"
        ),
        "{output}"
    );
    for n in 0..minimal_driver::GREETINGS {
        assert!(
            output.contains(&format!("work item {n} ran at PASSIVE_LEVEL")),
            "{output}"
        );
    }
    // Unload waits for the work items, so the count is always complete.
    assert!(
        output.contains("unloading after 4 work item(s)"),
        "{output}"
    );
    assert!(
        machine.pool_blocks().is_empty(),
        "pool left behind: {:?}",
        machine.pool_blocks()
    );
}

#[test]
fn minimal_driver_loads_and_unloads_repeatedly() {
    let machine = Machine::with_worker_threads(3);
    for _ in 0..20 {
        let driver = machine
            .load_driver("minimal", minimal_driver::DriverEntry)
            .expect("loads");
        machine.unload_driver(driver).expect("unloads");
    }
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn every_allocation_failure_during_load_is_reported_and_leaks_nothing() {
    let machine = Machine::new();
    let mut failures = 0;
    for skip in 0.. {
        machine.fail_allocations(skip, 1);
        match machine.load_driver("minimal", minimal_driver::DriverEntry) {
            Ok(driver) => machine.unload_driver(driver).expect("unloads"),
            Err(status) => {
                assert_eq!(status, Status::INSUFFICIENT_RESOURCES, "allocation {skip}");
                failures += 1;
            }
        }
        assert!(
            machine.pool_blocks().is_empty(),
            "allocation {skip}: {:?}",
            machine.pool_blocks()
        );
        if machine.pending_allocation_failures() == 1 {
            // The load made fewer than `skip + 1` allocations: every point has been tried.
            machine.fail_allocations(0, 0);
            break;
        }
    }
    // Extension, two events, the counter, and one job block plus one work item per greeting.
    let expected = 4 + 2 * minimal_driver::GREETINGS as usize;
    assert_eq!(failures, expected, "allocation points exercised");
}

mod failing {
    use super::*;

    pub static WORK_RAN: AtomicU32 = AtomicU32::new(0);

    /// Queues work, then fails: the SDK must wait for the work and clean up.
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<(), Status> {
        driver
            .work_queue()
            .queue(irql, |_| {
                WORK_RAN.fetch_add(1, Ordering::SeqCst);
            })
            .map_err(Status::from)?;
        Err(Status::ACCESS_DENIED)
    }
}

#[test]
fn a_failing_driver_entry_is_cleaned_up_after_its_work_ran() {
    let machine = Machine::new();
    let status = machine
        .load_driver("failing", failing::DriverEntry)
        .unwrap_err();
    assert_eq!(status, Status::ACCESS_DENIED);
    assert_eq!(
        failing::WORK_RAN.load(Ordering::SeqCst),
        1,
        "teardown waited for the work item"
    );
    assert!(machine.pool_blocks().is_empty());
}

mod success_as_error {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Err(Status::from_raw(0))
    }
}

#[test]
fn an_error_carrying_a_success_code_still_fails_the_load() {
    let machine = Machine::new();
    let status = machine
        .load_driver("odd", success_as_error::DriverEntry)
        .unwrap_err();
    assert_eq!(status, Status::UNSUCCESSFUL);
}

mod leaky {
    use super::*;

    pub struct Leaky;
    impl DriverState for Leaky {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            let block = PoolBox::try_new([0u8; 100], PoolTag::new(b"Leak"), irql).unwrap();
            PoolBox::into_raw(block);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<Leaky, Status> {
        Ok(Leaky)
    }
}

bugcheck_test! {
    fn a_driver_that_leaks_pool_stops_at_unload() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::POOL_LEAKED_AT_UNLOAD) {
        let machine = Machine::new();
        let driver = machine.load_driver("leaky", leaky::DriverEntry).unwrap();
        let _ = machine.unload_driver(driver);
    }
}

mod raises_and_returns {
    use super::*;

    /// Raises the IRQL through the raw ABI and returns without lowering it (the safe
    /// `SpinLock` cannot: it releases when its closure returns).
    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        // SAFETY: deliberately raising without lowering; the simulator must stop at the return.
        let _old = unsafe { wfp_rs::sys::KfRaiseIrql(wfp_rs::sys::DISPATCH_LEVEL) };
        Ok(())
    }
}

bugcheck_test! {
    fn a_driver_entry_returning_at_dispatch_level_stops() expects IRQL_UNEXPECTED_VALUE ((2 << 16) | 2) {
        let machine = Machine::new();
        let _ = machine.load_driver("raises", raises_and_returns::DriverEntry);
    }
}

mod state_sees_unload {
    use super::*;

    pub static UNLOADS: AtomicU32 = AtomicU32::new(0);
    pub static DROPS: AtomicU32 = AtomicU32::new(0);

    pub struct State;
    impl DriverState for State {
        fn unload(self, _irql: &mut PassiveLevel<'_>) {
            assert_eq!(Irql::current(), Irql::PASSIVE);
            assert_eq!(
                DROPS.load(Ordering::SeqCst),
                0,
                "unload runs before the drop"
            );
            UNLOADS.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl Drop for State {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<State, Status> {
        Ok(State)
    }
}

#[test]
fn unload_calls_the_state_hook_then_drops_the_state() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("state", state_sees_unload::DriverEntry)
        .unwrap();
    assert_eq!(state_sees_unload::UNLOADS.load(Ordering::SeqCst), 0);
    machine.unload_driver(driver).unwrap();
    assert_eq!(state_sees_unload::UNLOADS.load(Ordering::SeqCst), 1);
    assert_eq!(state_sees_unload::DROPS.load(Ordering::SeqCst), 1);
}

#[test]
fn work_queued_from_dispatch_level_runs_at_passive_level_before_unload_finishes() {
    const ITEMS: u32 = 200;
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    let queue = driver.work_queue(&machine).expect("an SDK driver");
    let ran = Arc::new(AtomicU32::new(0));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let queue = queue.clone();
            let ran = Arc::clone(&ran);
            let machine = &machine;
            scope.spawn(move || {
                machine.at_dispatch(|irql| {
                    for _ in 0..ITEMS / 4 {
                        let ran = Arc::clone(&ran);
                        queue
                            .queue(irql, move |_passive| {
                                assert_eq!(Irql::current(), Irql::PASSIVE);
                                ran.fetch_add(1, Ordering::SeqCst);
                            })
                            .unwrap();
                    }
                });
            });
        }
    });
    drop(queue);
    machine.unload_driver(driver).unwrap();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        ITEMS,
        "unload waited for every queued item"
    );
    assert!(machine.pool_blocks().is_empty());
}

/// `wait_for_work_items` returns only once every routine has returned. The SDK frees its work
/// item before it runs the closure, so the item being gone says nothing: here the closure
/// blocks until the test releases it, and the waiter, on another thread, must still be waiting.
#[test]
fn wait_for_work_items_waits_for_a_routine_that_freed_its_item() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .expect("loads");
    let queue = driver.work_queue(&machine).expect("an SDK driver");
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let routine_finished = Arc::clone(&finished);
    machine.at_passive(|irql| {
        queue
            .queue(irql, move |_passive| {
                // The test's channels: harness code, not the driver's memory.
                wfp_rs_sim::as_harness(|| {
                    started_tx.send(()).expect("the test waits for the start");
                    // Released by the test; an error means the test already failed and went away.
                    let _ = release_rx.recv();
                });
                routine_finished.store(true, Ordering::SeqCst);
            })
            .map_err(|_| "out of pool")
            .expect("queues");
    });
    started_rx.recv().expect("the routine runs");
    // The routine runs, and the SDK has freed its work item.
    std::thread::scope(|scope| {
        let (returned_tx, returned_rx) = mpsc::channel();
        let machine = &machine;
        let finished = &finished;
        scope.spawn(move || {
            machine.wait_for_work_items();
            let _ = returned_tx.send(finished.load(Ordering::SeqCst));
        });
        // Time for a waiter that does not wait to show itself; waiting longer or shorter does
        // not change whether a correct one passes.
        let early = returned_rx.recv_timeout(Duration::from_millis(200));
        // Released before asserting, so a failure does not leave the waiter blocked.
        release_tx
            .send(())
            .expect("the routine is blocked on the release");
        assert!(
            early.is_err(),
            "expected wait_for_work_items to wait while the routine is blocked, \
             but it returned (routine finished at that point: {early:?})"
        );
        let finished_at_return = returned_rx.recv().expect("the waiter reports");
        assert!(
            finished_at_return,
            "expected the routine to have returned when wait_for_work_items returned, \
             but it had not"
        );
    });
    drop(queue);
    machine.unload_driver(driver).expect("unloads");
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_driver_without_an_unload_routine_cannot_be_stopped() {
    unsafe extern "system" fn entry(
        _object: *mut wfp_rs::sys::DRIVER_OBJECT,
        _path: *const wfp_rs::sys::UNICODE_STRING,
    ) -> wfp_rs::sys::NTSTATUS {
        0
    }
    let machine = Machine::new();
    let driver = machine.load_driver("stuck", entry).unwrap();
    match machine.unload_driver(driver) {
        Err(UnloadError::NotUnloadable(driver)) => assert_eq!(driver.name(), "stuck"),
        other => panic!("expected NotUnloadable, got {other:?}"),
    }
}

mod stops_early {
    use super::*;
    use core::time::Duration;
    use std::sync::Mutex;
    use wfp_rs::event::{Event, EventKind};

    /// What happened, in order.
    pub static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

    pub struct State {
        release: Arc<Event>,
    }

    impl DriverState for State {
        fn stopping(&self, irql: &mut PassiveLevel<'_>) {
            // The test's log, not the driver's memory.
            wfp_rs_sim::as_harness(|| LOG.lock().unwrap().push("stopping"));
            self.release.set(irql);
        }

        fn unload(self, _irql: &mut PassiveLevel<'_>) {
            wfp_rs_sim::as_harness(|| LOG.lock().unwrap().push("unload"));
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let release = Arc::new(Event::try_new(EventKind::Notification, false, irql)?);
        let waiting = Arc::clone(&release);
        driver
            .work_queue()
            .queue(irql, move |passive| {
                // Stands for a send waiting on a silent service: only `stopping` ends it early.
                // The timeout is an upper bound that only matters if the hook never runs.
                let woken = waiting.wait_timeout(passive, Duration::from_secs(600));
                let event = if woken {
                    "work item released"
                } else {
                    "work item timed out"
                };
                wfp_rs_sim::as_harness(|| LOG.lock().unwrap().push(event));
            })
            .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
        Ok(State { release })
    }
}

#[test]
fn stopping_runs_before_unload_waits_for_work_items() {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("stops", stops_early::DriverEntry)
        .unwrap();
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(
        *stops_early::LOG.lock().unwrap(),
        ["stopping", "work item released", "unload"]
    );
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_pool_arc_is_freed_by_its_last_clone_on_any_thread() {
    use wfp_rs::pool::PoolArc;
    struct Counted(Arc<AtomicU32>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = Arc::new(AtomicU32::new(0));
    let machine = Machine::new();
    let tag = PoolTag::new(b"Arc ");
    let shared = machine.at_passive(|irql| {
        PoolArc::try_new(Counted(Arc::clone(&drops)), tag, irql).expect("allocates")
    });
    assert_eq!(machine.pool_blocks().len(), 1);
    let clones: Vec<_> = (0..4).map(|_| PoolArc::clone(&shared)).collect();
    assert_eq!(PoolArc::strong_count(&shared), 5);
    assert!(clones.iter().all(|c| PoolArc::ptr_eq(c, &shared)));
    std::thread::scope(|s| {
        for clone in clones {
            let machine = &machine;
            s.spawn(move || machine.at_dispatch(|_| drop(clone)));
        }
    });
    assert_eq!(drops.load(Ordering::SeqCst), 0, "one clone is left");
    let shared = machine
        .at_passive(|_| PoolArc::try_unwrap(shared).map_err(|_| ()))
        .expect("the only clone");
    assert!(
        machine.pool_blocks().is_empty(),
        "unwrapping frees the block"
    );
    drop(shared);
    assert_eq!(drops.load(Ordering::SeqCst), 1);

    let last = machine.at_passive(|irql| PoolArc::try_new(7u64, tag, irql).unwrap());
    let other = PoolArc::clone(&last);
    let last = PoolArc::try_unwrap(last).expect_err("another clone exists");
    assert_eq!(*last, 7);
    machine.at_dispatch(|_| {
        drop(last);
        drop(other);
    });
    assert!(
        machine.pool_blocks().is_empty(),
        "the last clone frees the block"
    );
}

#[test]
fn a_pool_arc_that_cannot_be_allocated_hands_the_value_back() {
    use wfp_rs::pool::PoolArc;
    let machine = Machine::new();
    machine.fail_allocations(0, 1);
    let error = machine
        .at_passive(|irql| PoolArc::try_new(String::from("kept"), PoolTag::new(b"Arc "), irql))
        .expect_err("the allocation fails");
    assert_eq!(error.status(), Status::INSUFFICIENT_RESOURCES);
    assert_eq!(error.into_inner(), "kept");
    assert!(machine.pool_blocks().is_empty());
}

/// Counts how often it is formatted.
struct Counted<'a>(&'a AtomicU32);

impl std::fmt::Display for Counted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fetch_add(1, Ordering::SeqCst);
        f.write_str("counted")
    }
}

#[test]
fn kd_print_formats_only_the_levels_the_debug_filter_lets_through() {
    use wfp_rs::debug::{Level, enabled};
    let machine = Machine::new();
    let formatted = AtomicU32::new(0);
    let print_every_level = || {
        let c = Counted(&formatted);
        wfp_rs::kd_print!(Error, "error {c}\n");
        wfp_rs::kd_print!(Warning, "warning {c}\n");
        wfp_rs::kd_print!(Trace, "trace {c}\n");
        wfp_rs::kd_print!("info {c}\n");
    };
    let levels = || [Level::Error, Level::Warning, Level::Trace, Level::Info].map(enabled);

    // A new machine lets every level through.
    machine.run(print_every_level);
    assert_eq!(formatted.swap(0, Ordering::SeqCst), 4);
    assert_eq!(machine.run(levels), [true; 4]);

    // Windows' default: only errors; the others are not even formatted.
    machine.set_debug_filter_mask(0);
    machine.run(print_every_level);
    assert_eq!(formatted.swap(0, Ordering::SeqCst), 1);
    assert_eq!(machine.run(levels), [true, false, false, false]);

    // Bit 3: DPFLTR_INFO_LEVEL (and errors, always).
    machine.set_debug_filter_mask(1 << 3);
    machine.run(print_every_level);
    assert_eq!(formatted.swap(0, Ordering::SeqCst), 2);
    assert_eq!(machine.run(levels), [true, false, false, true]);

    assert_eq!(
        machine.debug_output(),
        [
            "error counted\n",
            "warning counted\n",
            "trace counted\n",
            "info counted\n",
            "error counted\n",
            "error counted\n",
            "info counted\n",
        ]
    );
}

#[test]
fn kd_print_sends_long_text_in_dbg_print_ex_calls_of_at_most_256_bytes() {
    let machine = Machine::new();
    // Pieces of every size: short ones that fill a chunk exactly and straddle its end, and one
    // longer than a chunk.
    let long = "x".repeat(300);
    let pieces: Vec<String> = (0..40)
        .map(|n| format!("{n:>width$};", width = n % 9))
        .collect();
    machine.run(|| {
        wfp_rs::kd_print!("{}|{long}|{}\n", pieces.concat(), pieces.concat());
    });
    let expected = format!("{}|{long}|{}\n", pieces.concat(), pieces.concat());
    let output = machine.debug_output();
    assert_eq!(output.concat(), expected);
    assert_eq!(output.len(), expected.len().div_ceil(256), "{output:?}");
    assert!(
        output[..output.len() - 1]
            .iter()
            .all(|call| call.len() == 256),
        "every call but the last is full: {output:?}"
    );
}
