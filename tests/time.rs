//! The interrupt-time clock (`wfp_rs::time::Instant`) in the simulator: monotonic, per machine,
//! moved forward by `Machine::advance_clock`, and readable from work items and at
//! DISPATCH_LEVEL.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::mpsc;
use std::time::Duration;

use wfp_rs::irql::Irql;
use wfp_rs::time::Instant;
use wfp_rs_sim::Machine;
use wfp_rs_sim::bugcheck_test;

#[test]
fn the_clock_never_goes_back_on_any_thread() {
    let machine = Machine::new();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let machine = &machine;
            scope.spawn(move || {
                machine.run(|| {
                    let mut previous = Instant::now();
                    for _ in 0..10_000 {
                        let now = Instant::now();
                        assert!(now >= previous, "{now:?} after {previous:?}");
                        previous = now;
                    }
                });
            });
        }
        // Advances interleaved with the reads: the clock only jumps forward.
        for _ in 0..100 {
            machine.advance_clock(Duration::from_micros(7));
        }
    });
}

#[test]
fn advance_clock_moves_the_clock_by_at_least_the_offset_at_once() {
    let machine = Machine::new();
    machine.run(|| {
        let before = Instant::now();
        machine.advance_clock(Duration::from_secs(600));
        let after = Instant::now();
        assert!(
            after.duration_since(before) >= Duration::from_secs(600),
            "{before:?} -> {after:?}"
        );
        // A deadline set before the advance has passed after it, without sleeping.
        let deadline = before.checked_add(Duration::from_secs(599)).unwrap();
        assert!(Instant::now() >= deadline);
        // The harness's view is the same clock.
        assert!(machine.now() >= after);
    });
    // Sub-tick advances round up: the clock moves by at least one tick.
    let before = machine.now();
    machine.advance_clock(Duration::from_nanos(1));
    assert!(machine.now().as_ticks() > before.as_ticks());
}

#[test]
fn each_machine_has_its_own_clock() {
    let first = Machine::new();
    let second = Machine::new();
    let before = first.now();
    second.advance_clock(Duration::from_secs(24 * 3600));
    assert!(second.now().as_ticks() >= 24 * 3600 * 10_000_000);
    // Real time between the two reads is far less than a day.
    assert!(first.now().duration_since(before) < Duration::from_secs(24 * 3600));
}

#[test]
fn dispatch_level_code_and_work_items_read_the_advanced_clock() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    let queue = driver.work_queue(&machine).expect("an SDK driver");
    let start = machine.now();
    machine.advance_clock(Duration::from_secs(3600));
    let (sender, receiver) = mpsc::channel();
    let at_dispatch = machine.at_dispatch(|irql| {
        let at_dispatch = Instant::now();
        assert!(at_dispatch.duration_since(start) >= Duration::from_secs(3600));
        queue
            .queue(irql, move |_passive| {
                assert_eq!(Irql::current(), Irql::PASSIVE);
                let now = Instant::now();
                // The test's channel: harness memory.
                wfp_rs_sim::as_harness(|| sender.send(now).unwrap());
            })
            .unwrap();
        at_dispatch
    });
    let in_work_item = receiver
        .recv_timeout(Duration::from_secs(60))
        .expect("the work item ran");
    // Queued after the DISPATCH_LEVEL read, so run after it.
    assert!(
        in_work_item >= at_dispatch,
        "{in_work_item:?} < {at_dispatch:?}"
    );
    drop(queue);
    machine.unload_driver(driver).unwrap();
}

bugcheck_test! {
    /// The kernel writes the performance-counter value through the pointer it is given.
    fn a_null_qpc_pointer_stops_the_machine() expects KMODE_EXCEPTION_NOT_HANDLED (0xC000_0005) {
        let machine = Machine::new();
        machine.run(|| {
            // SAFETY: deliberately broken: the scenario is the null pointer.
            let _ = unsafe { wfp_rs::sys::KeQueryInterruptTimePrecise(std::ptr::null_mut()) };
        });
    }
}
