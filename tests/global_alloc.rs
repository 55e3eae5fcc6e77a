//! The global allocator in the simulator: driver code's `Box`, `Vec` and `Arc` come from its pool
//! as they do on Windows through `PoolAllocator` — charged to the driver and checked at unload,
//! hit by injected failures, refused above 16-byte alignment, stopped above `DISPATCH_LEVEL` —
//! while the test harness and the simulator itself allocate from the host.

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::TryReserveError;
use std::sync::Arc;

use wfp_rs::bugcheck::{BugCheckCode, verifier};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::{Status, kd_print};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{GLOBAL_ALLOCATOR_TAG, LoadedDriver, Machine, PoolBlock, run_isolated};

/// 64-byte aligned: more than pool gives.
#[repr(align(64))]
struct CacheLine([u8; 64]);

impl Default for CacheLine {
    fn default() -> Self {
        CacheLine([0; 64])
    }
}

/// A driver that does nothing by itself; tests run code as it with `run_in_driver`.
mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// A driver whose state owns a `Vec`: freed by unload, so no leak.
mod keeper {
    use super::*;

    pub struct State {
        pub _names: Vec<u32>,
    }

    impl DriverState for State {}

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<State, Status> {
        let mut names = Vec::new();
        names
            .try_reserve(8)
            .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
        names.extend([1, 2, 3]);
        Ok(State { _names: names })
    }
}

/// A driver that leaks a `Box` in `DriverEntry`.
mod leaker {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Box::leak(Box::new([7u8; 40]));
        Ok(())
    }
}

fn load(machine: &Machine, name: &str) -> LoadedDriver {
    machine.load_driver(name, plain::DriverEntry).unwrap()
}

/// The blocks driver code took through the global allocator (the SDK's own tagged pool aside).
fn blocks_of(machine: &Machine, name: &str) -> Vec<PoolBlock> {
    machine
        .pool_blocks()
        .into_iter()
        .filter(|b| b.driver.as_deref() == Some(name) && b.tag == GLOBAL_ALLOCATOR_TAG)
        .collect()
}

#[test]
fn a_drivers_box_is_its_pool_until_freed_and_unload_is_clean_after() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    let boxed = driver
        .run_in_driver(&machine, |_irql, _driver| Box::new([1u64; 5]))
        .unwrap();
    assert_eq!(
        blocks_of(&machine, "plain"),
        [PoolBlock {
            tag: GLOBAL_ALLOCATOR_TAG,
            size: 40,
            driver: Some("plain".into()),
        }]
    );
    // Freed by the test, outside the driver: the pool block goes.
    drop(boxed);
    assert!(blocks_of(&machine, "plain").is_empty());
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
}

#[test]
fn memory_the_driver_keeps_in_its_state_is_freed_by_unload() {
    let machine = Machine::new();
    let driver = machine.load_driver("keeper", keeper::DriverEntry).unwrap();
    assert_eq!(blocks_of(&machine, "keeper").len(), 1);
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
}

#[test]
fn a_leaked_box_stops_at_unload_naming_its_tag_and_size() {
    let outcome = run_isolated(
        "a_leaked_box_stops_at_unload_naming_its_tag_and_size",
        || {
            let machine = Machine::new();
            let driver = machine.load_driver("leaker", leaker::DriverEntry).unwrap();
            let _ = machine.unload_driver(driver);
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION);
    assert_eq!(report.params[0], verifier::POOL_LEAKED_AT_UNLOAD);
    assert_eq!(report.params[3], 1, "one block leaked");
    assert!(
        outcome
            .stderr
            .contains("driver leaker unloaded without freeing 1 pool allocation(s)")
            && outcome.stderr.contains("tag Rust (40 bytes)"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn memory_from_the_test_freed_or_grown_by_the_driver_is_accounted_correctly() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    // Host memory freed by driver code.
    let from_test = vec![1u8; 100];
    driver
        .run_in_driver(&machine, move |_irql, _driver| drop(from_test))
        .unwrap();
    // Host memory grown by driver code: the new block is the driver's, the old one goes back to
    // the host.
    let mut grown = Vec::<u8>::with_capacity(1);
    grown.push(1);
    let grown = driver
        .run_in_driver(&machine, move |_irql, _driver| {
            grown.try_reserve_exact(999).unwrap();
            grown
        })
        .unwrap();
    assert_eq!(blocks_of(&machine, "plain").len(), 1);
    assert_eq!(blocks_of(&machine, "plain")[0].size, 1000);
    // Pool memory grown by the test: back to the host.
    let mut grown = grown;
    grown.reserve_exact(5000);
    assert!(blocks_of(&machine, "plain").is_empty());
    drop(grown);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn injected_failures_hit_the_drivers_allocations_and_try_reserve_recovers() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    machine.fail_allocations(1, 1);
    let (first, second, third) = driver
        .run_in_driver(&machine, |_irql, _driver| {
            let mut a: Vec<u32> = Vec::new();
            let mut b: Vec<u32> = Vec::new();
            let first = a.try_reserve(16); // skipped
            let second: Result<(), TryReserveError> = b.try_reserve(16); // fails
            let third = b.try_reserve(16); // succeeds again
            (first.is_ok(), second.is_ok(), third.is_ok())
        })
        .unwrap();
    assert_eq!((first, second, third), (true, false, true));
    assert_eq!(machine.pending_allocation_failures(), 0);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn failure_windows_follow_each_other() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    // The 2nd allocation fails, then (after two more) the 5th and 6th.
    machine.fail_allocations_in(&[(1, 1), (2, 2)]);
    assert_eq!(machine.pending_allocation_failures(), 3);
    let outcomes = driver
        .run_in_driver(&machine, |_irql, _driver| {
            // An array: collecting into a Vec would allocate too.
            let mut outcomes = [false; 8];
            for outcome in &mut outcomes {
                *outcome = Vec::<u32>::new().try_reserve(16).is_ok();
            }
            outcomes
        })
        .unwrap();
    assert_eq!(
        outcomes,
        [true, false, true, true, false, false, true, true]
    );
    assert_eq!(machine.pending_allocation_failures(), 0);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn the_harness_and_the_kernel_allocate_from_the_host() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    machine.fail_allocations(0, u64::MAX);
    // Test code inside the machine: not a driver, so neither failures nor pool.
    let aligned = machine.run(|| {
        let mut v = vec![1u32; 1000];
        v.push(2);
        Arc::new(CacheLine::default())
    });
    assert_eq!(aligned.0.len(), 64);
    // A kernel routine the driver calls (DbgPrintEx keeps a copy of the text) allocates as the
    // kernel: the driver's failing pool does not fail it, and nothing is charged to the driver.
    driver
        .run_in_driver(&machine, |_irql, _driver| {
            kd_print!("the kernel copies this text\n");
        })
        .unwrap();
    // Harness instrumentation inside driver code, marked as such.
    let log = driver
        .run_in_driver(&machine, |_irql, _driver| {
            wfp_rs_sim::as_harness(|| vec![String::from("instrumentation")])
        })
        .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(machine.pending_allocation_failures(), u64::MAX);
    machine.fail_allocations(0, 0);
    assert!(blocks_of(&machine, "plain").is_empty());
    assert!(
        machine
            .debug_output()
            .concat()
            .contains("the kernel copies this text")
    );
    machine.unload_driver(driver).unwrap();
}

#[test]
fn alignment_above_sixteen_bytes_is_refused_to_driver_code() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    let (over, at_limit) = driver
        .run_in_driver(&machine, |_irql, _driver| {
            #[repr(align(16))]
            struct Sixteen(#[expect(dead_code, reason = "only its layout matters")] u8);
            let mut over: Vec<CacheLine> = Vec::new();
            let mut at_limit: Vec<Sixteen> = Vec::new();
            (
                over.try_reserve(1).is_err(),
                at_limit.try_reserve(1).is_ok(),
            )
        })
        .unwrap();
    assert!(
        over,
        "a 64-byte alignment must fail as PoolAllocator fails it"
    );
    assert!(at_limit, "16-byte alignment is what pool gives");
    machine.unload_driver(driver).unwrap();
}

#[test]
fn memory_outliving_its_machine_is_freed_safely() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    let boxed = driver
        .run_in_driver(&machine, |_irql, _driver| Box::new(5u32))
        .unwrap();
    // The machine goes (its driver still loaded); the block keeps what it needs to be freed.
    let _ = driver;
    drop(machine);
    assert_eq!(*boxed, 5);
    drop(boxed);
}

bugcheck_test! {
    /// `Arc::new` of an over-aligned value in driver code: PoolAllocator returns null, and the
    /// alloc error handler's panic bug checks.
    fn an_over_aligned_arc_in_driver_code_stops() expects KMODE_EXCEPTION_NOT_HANDLED (0x5275_7374) {
        let machine = Machine::new();
        let driver = load(&machine, "plain");
        driver.run_in_driver(&machine, |_irql, _driver| {
            let shared = Arc::new(CacheLine::default());
            assert_eq!(shared.0.len(), 64);
        });
    }
}

bugcheck_test! {
    /// An injected failure on an infallible path (`Box::new`) stops as a driver does.
    fn an_unhandled_allocation_failure_in_driver_code_stops() expects KMODE_EXCEPTION_NOT_HANDLED (0x5275_7374) {
        let machine = Machine::new();
        let driver = load(&machine, "plain");
        machine.fail_allocations(0, 1);
        driver.run_in_driver(&machine, |_irql, _driver| {
            let boxed = Box::new(1u64);
            assert_eq!(*boxed, 1);
        });
    }
}

bugcheck_test! {
    /// Non-paged pool may be allocated at DISPATCH_LEVEL at most.
    fn a_box_above_dispatch_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::NONPAGED_ALLOCATION_ABOVE_DISPATCH) {
        let machine = Machine::new();
        let driver = load(&machine, "plain");
        driver.run_in_driver(&machine, |_irql, _driver| {
            // SAFETY: deliberately raising above DISPATCH_LEVEL; the scenario stops before the
            // IRQL would have to be lowered.
            let _old = unsafe { wfp_rs::sys::KfRaiseIrql(wfp_rs::sys::HIGH_LEVEL) };
            let boxed = Box::new(1u64);
            assert_eq!(*boxed, 1);
        });
    }
}

bugcheck_test! {
    /// Non-paged pool may be freed at DISPATCH_LEVEL at most, whoever allocated it.
    fn a_box_freed_above_dispatch_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::NONPAGED_FREE_ABOVE_DISPATCH) {
        let machine = Machine::new();
        let driver = load(&machine, "plain");
        driver.run_in_driver(&machine, |_irql, _driver| {
            let boxed = Box::new(1u64);
            // SAFETY: deliberately raising above DISPATCH_LEVEL; the scenario stops before the
            // IRQL would have to be lowered.
            let _old = unsafe { wfp_rs::sys::KfRaiseIrql(wfp_rs::sys::HIGH_LEVEL) };
            drop(boxed);
        });
    }
}

bugcheck_test! {
    /// A work item's routine is driver code too: what it leaks is the driver's.
    fn a_box_leaked_by_a_work_item_stops_at_unload() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::POOL_LEAKED_AT_UNLOAD) {
        let machine = Machine::new();
        let driver = load(&machine, "plain");
        let queue = driver.work_queue(&machine).expect("an SDK driver");
        machine.at_passive(|irql| {
            queue
                .queue(irql, |_passive| {
                    Box::leak(Box::new(3u32));
                })
                .unwrap();
        });
        machine.wait_for_work_items();
        drop(queue);
        let _ = machine.unload_driver(driver);
    }
}

#[test]
fn the_harness_api_called_from_driver_code_does_not_deadlock_on_the_allocator() {
    let machine = Machine::new();
    let driver = load(&machine, "plain");
    // `pool_blocks` allocates while it holds the table of driver code's blocks, which driver
    // code's allocations take: it runs as harness code whoever calls it.
    let (seen, ours) = driver
        .run_in_driver(&machine, |_irql, _driver| {
            let kept = Box::new(1u8);
            let seen = blocks_of(&machine, "plain").len();
            drop(kept);
            (seen, blocks_of(&machine, "plain").len())
        })
        .unwrap();
    assert_eq!((seen, ours), (1, 0), "only the Box is the driver's");
    machine.unload_driver(driver).unwrap();
}

/// A zero-sized `PoolBox` takes no pool: `ExAllocatePool2` is never asked for 0 bytes.
#[test]
fn zero_sized_pool_boxes_do_not_allocate() {
    use wfp_rs::pool::{PoolBox, PoolTag};
    let machine = Machine::new();
    machine.at_dispatch(|irql| {
        let unit = PoolBox::try_new((), PoolTag::SDK, irql).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "a ZST must not reach ExAllocatePool2"
        );
        drop(unit);
    });
}
