//! The minimal driver in the simulator: it loads, its work items run at PASSIVE_LEVEL, it
//! unloads without leaking pool, and a failed allocation during load is reported and leaks
//! nothing.

#![cfg(any(not(windows), feature = "sim"))]

use wfp_rs::Status;
use wfp_rs_sim::Machine;

#[test]
fn runs_its_work_items_and_unloads_clean() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal-driver", minimal_driver::DriverEntry)
        .expect("loads");
    machine.unload_driver(driver).expect("unloads");

    let output = machine.debug_output();
    assert!(
        output[0].starts_with("minimal-driver: loaded from "),
        "{output:?}"
    );
    for n in 0..minimal_driver::GREETINGS {
        let line = format!("minimal-driver: work item {n} ran at PASSIVE_LEVEL\n");
        assert!(output.contains(&line), "expected {line:?} in {output:?}");
    }
    // Unload waits for the work items, so the count is always complete.
    assert_eq!(
        output.last().map(String::as_str),
        Some("minimal-driver: unloading after 4 work item(s)\n")
    );
    assert_eq!(machine.pool_blocks(), []);
}

#[test]
fn a_failed_allocation_during_load_is_reported_and_leaks_nothing() {
    let machine = Machine::new();
    // The first allocation of the load fails: the load must fail with it, cleanly.
    machine.fail_allocations(0, 1);
    assert_eq!(
        machine
            .load_driver("minimal-driver", minimal_driver::DriverEntry)
            .map(|_| ()),
        Err(Status::INSUFFICIENT_RESOURCES)
    );
    assert_eq!(machine.pool_blocks(), []);

    let driver = machine
        .load_driver("minimal-driver", minimal_driver::DriverEntry)
        .expect("loads once allocations succeed");
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), []);
}
