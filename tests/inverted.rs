//! The inverted call: a service keeps I/O control requests pending at the driver, the driver
//! completes them with data, cancellation and unload complete the rest. And the simulator's I/O
//! manager: every rule a driver can break with an IRP stops the machine with the bug check
//! Windows (with Driver Verifier's I/O verification) raises; every rule has a test that breaks it
//! and one that follows it.

#![cfg(any(not(windows), feature = "sim"))]

use core::ptr::null_mut;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wfp_rs::bugcheck::iomanager;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::inverted::{ControlCode, InvertedQueue, Reason, RequiredAccess};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::{Status, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{Caller, LoadedDriver, Machine, UnloadError};
use wfp_rs_tests::race::{Gate, assert_keeps_waiting};

/// The code the tests' service sends.
const EVENTS: ControlCode = ControlCode::buffered(0x8000, 0x800, RequiredAccess::Any);
/// The queue's maximum message size.
const MAX: usize = 32;
const NAME: &str = "WfpRsEvents";
const PATH: &str = r"\\.\WfpRsEvents";

const SUCCESS: i32 = 0;

/// A driver that does nothing by itself; the tests create queues on its behalf.
mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// A driver that keeps its queue in its state, so unload closes it.
mod holder {
    use super::*;

    /// The driver state.
    pub struct State {
        /// Dropped (and so closed) at unload.
        #[expect(
            dead_code,
            reason = "held for its Drop, which closes the queue at unload"
        )]
        pub queue: InvertedQueue,
    }

    impl DriverState for State {}

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        Ok(State {
            queue: InvertedQueue::new(irql, driver, NAME, EVENTS, MAX)?,
        })
    }
}

/// A machine with the plain driver and a queue named [`NAME`].
fn setup() -> (Machine, LoadedDriver, InvertedQueue) {
    let machine = Machine::new();
    let driver = machine.load_driver("plain", plain::DriverEntry).unwrap();
    let queue = driver
        .run_in_driver(&machine, |irql, d| {
            InvertedQueue::new(irql, d, NAME, EVENTS, MAX)
        })
        .expect("an SDK driver")
        .expect("the queue is created");
    (machine, driver, queue)
}

/// Closes the queue, unloads the driver and checks that nothing is left behind.
fn teardown(machine: Machine, driver: LoadedDriver, queue: InvertedQueue) {
    machine.at_passive(|irql| queue.close(irql));
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
    assert!(
        machine.symbolic_links().is_empty(),
        "{:?}",
        machine.symbolic_links()
    );
    assert_eq!(machine.pending_io_requests(), 0);
}

// --- the correct pattern ----------------------------------------------------------------------

#[test]
fn a_pending_request_is_completed_with_data_from_dispatch_level() {
    let (machine, driver, queue) = setup();
    assert_eq!(
        machine.symbolic_links(),
        [(
            r"\??\WfpRsEvents".to_owned(),
            r"\Device\WfpRsEvents".to_owned()
        )]
    );
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let request = service.device_io_control(EVENTS.raw(), &[], MAX);
    assert!(request.is_pending());
    assert_eq!(machine.at_dispatch(|irql| queue.waiting(irql)), 1);

    let delivered = machine.at_dispatch(|irql| queue.complete_next(irql, b"connect pid 42"));
    assert!(delivered.is_ok());
    let completion = request.wait();
    assert_eq!(completion.status, SUCCESS);
    assert_eq!(completion.information, 14);
    assert_eq!(completion.ok(), Ok(&b"connect pid 42"[..]));
    assert_eq!(machine.at_dispatch(|irql| queue.waiting(irql)), 0);

    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn requests_are_answered_oldest_first() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::Administrator).unwrap();
    let requests: Vec<_> = (0..3)
        .map(|_| service.device_io_control(EVENTS.raw(), &[], MAX))
        .collect();
    for n in 0u8..3 {
        machine
            .at_dispatch(|irql| queue.complete_next(irql, [n; 4]))
            .unwrap();
    }
    for (n, request) in (0u8..3).zip(&requests) {
        assert_eq!(request.wait().output, [n; 4]);
    }
    drop(service);
    teardown(machine, driver, queue);
}

/// A service whose waits spin before they park (`Machine::set_wait_spin`) gets each completion
/// made on another thread, whenever it comes: before, during or after the spin.
#[test]
fn a_spinning_wait_gets_each_completion_from_another_thread() {
    const COUNT: u8 = 50;
    let (machine, driver, queue) = setup();
    machine.set_wait_spin(wfp_rs_sim::WaitSpin::Fixed(
        std::time::Duration::from_micros(20),
    ));
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let requests: Vec<_> = (0..COUNT)
        .map(|_| service.device_io_control(EVENTS.raw(), &[], MAX))
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for n in 0..COUNT {
                machine
                    .at_dispatch(|irql| queue.complete_next(irql, [n; 4]))
                    .unwrap();
                std::thread::yield_now();
            }
        });
        for (n, request) in (0..COUNT).zip(&requests) {
            assert_eq!(request.wait().output, [n; 4]);
        }
    });
    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn a_message_built_in_place_is_delivered() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let request = service.device_io_control(EVENTS.raw(), &[], 2 * MAX);
    let written = machine.at_dispatch(|irql| {
        queue.complete_next_with(irql, |buffer| {
            // The request's own buffer, as large as user mode made it.
            assert_eq!(buffer.len(), 2 * MAX);
            buffer[..3].copy_from_slice(b"abc");
            3
        })
    });
    assert_eq!(written.ok(), Some(3));
    assert_eq!(request.wait().output, b"abc");
    // Without a waiting request the closure is not called and comes back.
    let undelivered = machine
        .at_dispatch(|irql| queue.complete_next_with(irql, |_: &mut [u8]| 1))
        .unwrap_err();
    assert_eq!(undelivered.reason(), Reason::NoWaiter);
    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn without_a_waiting_request_the_payload_comes_back() {
    let (machine, driver, queue) = setup();
    let message = vec![7u8; 10];
    let undelivered = machine
        .at_dispatch(|irql| queue.complete_next(irql, message))
        .unwrap_err();
    assert_eq!(undelivered.reason(), Reason::NoWaiter);
    assert_eq!(
        undelivered.to_string(),
        "no request from user mode is waiting"
    );
    assert_eq!(undelivered.into_inner(), vec![7u8; 10], "no data is lost");
    teardown(machine, driver, queue);
}

#[test]
fn a_message_larger_than_the_maximum_comes_back_and_the_request_stays() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let request = service.device_io_control(EVENTS.raw(), &[], MAX);
    let undelivered = machine
        .at_dispatch(|irql| queue.complete_next(irql, [1u8; MAX + 1]))
        .unwrap_err();
    assert_eq!(
        undelivered.reason(),
        Reason::TooLarge {
            len: MAX + 1,
            max: MAX
        }
    );
    assert_eq!(undelivered.into_inner(), [1u8; MAX + 1]);
    assert!(request.is_pending(), "the waiting request was not used up");
    machine
        .at_dispatch(|irql| queue.complete_next(irql, [2u8; MAX]))
        .unwrap();
    assert_eq!(request.wait().output, [2u8; MAX]);
    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn requests_that_cannot_hold_a_message_or_carry_another_code_are_refused_at_once() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let small = service.device_io_control(EVENTS.raw(), &[], MAX - 1);
    assert_eq!(
        small.result().map(|c| c.status),
        Some(Status::BUFFER_TOO_SMALL.raw())
    );
    let other = ControlCode::buffered(0x8000, 0x801, RequiredAccess::Any);
    let wrong = service.device_io_control(other.raw(), &[1, 2, 3], MAX);
    assert_eq!(
        wrong.result().map(|c| c.status),
        Some(Status::INVALID_DEVICE_REQUEST.raw())
    );
    assert_eq!(machine.at_dispatch(|irql| queue.waiting(irql)), 0);
    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn cancel_io_ex_completes_the_request_as_cancelled() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let first = service.device_io_control(EVENTS.raw(), &[], MAX);
    let second = service.device_io_control(EVENTS.raw(), &[], MAX);
    assert!(first.cancel(), "the queue's cancel routine ran");
    let cancelled = first.wait();
    assert_eq!(cancelled.status, Status::CANCELLED.raw());
    assert!(cancelled.output.is_empty());
    assert!(
        !first.cancel(),
        "a completed request cannot be cancelled again"
    );
    // The next message goes to the request that is still waiting.
    machine
        .at_dispatch(|irql| queue.complete_next(irql, b"next"))
        .unwrap();
    assert_eq!(second.wait().output, b"next");
    drop(service);
    teardown(machine, driver, queue);
}

#[test]
fn user_mode_cancels_every_pending_request() {
    let (machine, driver, queue) = setup();
    let one = machine.open_device(PATH, Caller::System).unwrap();
    let two = machine.open_device(PATH, Caller::System).unwrap();
    let requests = [
        one.device_io_control(EVENTS.raw(), &[], MAX),
        two.device_io_control(EVENTS.raw(), &[], MAX),
        one.device_io_control(EVENTS.raw(), &[], MAX),
    ];
    assert_eq!(machine.cancel_io_requests(), 3, "three cancel routines ran");
    for request in &requests {
        assert_eq!(request.wait().status, Status::CANCELLED.raw());
    }
    assert_eq!(machine.at_dispatch(|irql| queue.waiting(irql)), 0);
    assert_eq!(machine.cancel_io_requests(), 0, "nothing left to cancel");
    // A request sent after it waits as usual.
    let later = one.device_io_control(EVENTS.raw(), &[], MAX);
    machine
        .at_dispatch(|irql| queue.complete_next(irql, b"after"))
        .unwrap();
    assert_eq!(later.wait().output, b"after");
    drop((one, two));
    teardown(machine, driver, queue);
}

#[test]
fn closing_a_handle_cancels_its_requests_and_only_its() {
    let (machine, driver, queue) = setup();
    let closing = machine.open_device(PATH, Caller::System).unwrap();
    let staying = machine.open_device(PATH, Caller::System).unwrap();
    let mine = [
        closing.device_io_control(EVENTS.raw(), &[], MAX),
        closing.device_io_control(EVENTS.raw(), &[], MAX),
    ];
    let other = staying.device_io_control(EVENTS.raw(), &[], MAX);
    closing.close();
    for request in &mine {
        assert_eq!(request.wait().status, Status::CANCELLED.raw());
    }
    assert!(other.is_pending());
    machine
        .at_dispatch(|irql| queue.complete_next(irql, b"still here"))
        .unwrap();
    assert_eq!(other.wait().output, b"still here");
    drop(staying);
    teardown(machine, driver, queue);
}

#[test]
fn close_completes_waiting_requests_and_removes_the_device() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let requests = [
        service.device_io_control(EVENTS.raw(), &[], MAX),
        service.device_io_control(EVENTS.raw(), &[], MAX),
    ];
    machine.at_passive(|irql| queue.close(irql));
    for request in &requests {
        assert_eq!(request.wait().status, Status::CANCELLED.raw());
    }
    assert!(machine.symbolic_links().is_empty(), "the link is deleted");
    assert_eq!(
        machine.open_device(PATH, Caller::System).unwrap_err(),
        Status::OBJECT_NAME_NOT_FOUND
    );
    // A handle opened before still works, but the device takes no requests any more.
    let late = service.device_io_control(EVENTS.raw(), &[], MAX);
    assert_eq!(late.wait().status, Status::DELETE_PENDING.raw());
    drop(service);
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
}

#[test]
fn dropping_the_queue_above_passive_level_completes_requests_and_leaks_the_device() {
    let (machine, driver, queue) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let request = service.device_io_control(EVENTS.raw(), &[], MAX);
    machine.at_dispatch(|_irql| drop(queue));
    assert_eq!(request.wait().status, Status::CANCELLED.raw());
    let output = machine.debug_output().concat();
    assert!(
        output.contains("InvertedQueue was dropped at DISPATCH_LEVEL"),
        "{output}"
    );
    // The device stays (deleting it needs PASSIVE_LEVEL), closed: the driver itself refuses
    // new handles and new requests.
    let late = service.device_io_control(EVENTS.raw(), &[], MAX);
    assert_eq!(late.wait().status, Status::DELETE_PENDING.raw());
    assert_eq!(
        machine.open_device(PATH, Caller::System).unwrap_err(),
        Status::DELETE_PENDING
    );
    drop(service);
    // Windows keeps a driver whose device was not deleted loaded, and so does the simulator.
    assert!(matches!(
        machine.unload_driver(driver),
        Err(UnloadError::DeviceObjectsRemain { devices: 1, .. })
    ));
}

#[test]
fn unload_completes_every_waiting_request() {
    let machine = Machine::new();
    let driver = machine.load_driver("holder", holder::DriverEntry).unwrap();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let requests: Vec<_> = (0..3)
        .map(|_| service.device_io_control(EVENTS.raw(), &[], MAX))
        .collect();
    // The driver state owns the queue; unload drops it at PASSIVE_LEVEL, which drains it.
    machine.unload_driver(driver).unwrap();
    for request in &requests {
        assert_eq!(request.wait().status, Status::CANCELLED.raw());
    }
    assert_eq!(machine.pending_io_requests(), 0);
    assert!(machine.symbolic_links().is_empty());
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
    // The handle outlived the driver (Windows would have waited for it before unloading);
    // closing it now calls nothing.
    drop(service);
}

#[test]
fn the_driver_can_be_loaded_again_after_unload() {
    let machine = Machine::new();
    for _ in 0..3 {
        let driver = machine.load_driver("holder", holder::DriverEntry).unwrap();
        let service = machine.open_device(PATH, Caller::System).unwrap();
        let request = service.device_io_control(EVENTS.raw(), &[], MAX);
        service.close();
        assert_eq!(request.wait().status, Status::CANCELLED.raw());
        machine.unload_driver(driver).unwrap();
    }
    assert!(machine.pool_blocks().is_empty());
}

// --- the device and its security ----------------------------------------------------------------

#[test]
fn only_administrators_and_system_can_open_the_device() {
    let (machine, driver, queue) = setup();
    assert_eq!(
        machine.open_device(PATH, Caller::User).unwrap_err(),
        Status::ACCESS_DENIED
    );
    for path in [
        PATH,
        r"\??\WfpRsEvents",
        r"\DosDevices\wfprsevents",
        r"\Device\WfpRsEvents",
    ] {
        for caller in [Caller::System, Caller::Administrator] {
            let handle = machine.open_device(path, caller);
            assert!(handle.is_ok(), "{path} as {caller:?}: {handle:?}");
        }
        assert_eq!(
            machine.open_device(path, Caller::User).unwrap_err(),
            Status::ACCESS_DENIED,
            "{path}"
        );
    }
    assert_eq!(
        machine
            .open_device(r"\\.\NoSuchDevice", Caller::System)
            .unwrap_err(),
        Status::OBJECT_NAME_NOT_FOUND
    );
    teardown(machine, driver, queue);
}

#[test]
fn names_codes_and_collisions_are_checked() {
    let (machine, driver, queue) = setup();
    let create = |name: &str, code: ControlCode| {
        driver
            .run_in_driver(&machine, |irql, d| {
                InvertedQueue::new(irql, d, name, code, MAX).map(|queue| queue.close(irql))
            })
            .unwrap()
    };
    assert_eq!(create(NAME, EVENTS), Err(Status::OBJECT_NAME_COLLISION));
    assert_eq!(create("", EVENTS), Err(Status::OBJECT_NAME_INVALID));
    assert_eq!(create("a\\b", EVENTS), Err(Status::OBJECT_NAME_INVALID));
    let direct = ControlCode::from_raw(sys::CTL_CODE(0x8000, 0x800, sys::METHOD_OUT_DIRECT, 0));
    assert_eq!(create("Direct", direct), Err(Status::INVALID_PARAMETER));
    assert_eq!(
        create("Second", EVENTS),
        Ok(()),
        "a second queue under another name"
    );
    assert_eq!(
        machine.symbolic_links().len(),
        1,
        "the failed attempts left nothing"
    );
    teardown(machine, driver, queue);
}

#[test]
fn every_allocation_failure_while_creating_a_queue_is_reported_and_leaks_nothing() {
    let machine = Machine::new();
    let driver = machine.load_driver("plain", plain::DriverEntry).unwrap();
    let baseline = machine.pool_blocks().len();
    for skip in 0.. {
        machine.fail_allocations(skip, 1);
        let created = driver
            .run_in_driver(&machine, |irql, d| {
                InvertedQueue::new(irql, d, NAME, EVENTS, MAX)
            })
            .unwrap();
        match created {
            Ok(queue) => machine.at_passive(|irql| queue.close(irql)),
            Err(status) => assert_eq!(status, Status::INSUFFICIENT_RESOURCES, "allocation {skip}"),
        }
        assert_eq!(machine.pool_blocks().len(), baseline, "allocation {skip}");
        assert!(machine.symbolic_links().is_empty(), "allocation {skip}");
        if machine.pending_allocation_failures() == 1 {
            machine.fail_allocations(0, 0);
            break;
        }
    }
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

// --- many processors ----------------------------------------------------------------------------

#[test]
fn concurrent_requests_cancels_and_completions_lose_nothing() {
    const SERVICES: usize = 4;
    const REQUESTS: usize = 60;
    let (machine, driver, queue) = setup();
    let next = AtomicU64::new(0);
    let delivered = std::sync::Mutex::new(Vec::new());
    let handles: Vec<_> = (0..SERVICES)
        .map(|_| machine.open_device(PATH, Caller::System).unwrap())
        .collect();
    let results = std::thread::scope(|scope| {
        let senders: Vec<_> = handles
            .iter()
            .map(|service| {
                scope.spawn(|| {
                    let mut sent = Vec::new();
                    for n in 0..REQUESTS {
                        let request = service.device_io_control(EVENTS.raw(), &[], MAX);
                        let cancelled = n % 3 == 0 && request.cancel();
                        sent.push((request, cancelled));
                    }
                    sent
                })
            })
            .collect();
        // Another processor hands out messages meanwhile.
        scope.spawn(|| {
            for _ in 0..SERVICES * REQUESTS {
                let value = next.fetch_add(1, Ordering::SeqCst);
                let outcome =
                    machine.at_dispatch(|irql| queue.complete_next(irql, value.to_le_bytes()));
                match outcome {
                    Ok(()) => delivered.lock().unwrap().push(value),
                    Err(undelivered) => assert_eq!(undelivered.reason(), Reason::NoWaiter),
                }
            }
        });
        senders
            .into_iter()
            .flat_map(|sender| sender.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Answer whatever is still waiting.
    loop {
        let value = next.fetch_add(1, Ordering::SeqCst);
        match machine.at_dispatch(|irql| queue.complete_next(irql, value.to_le_bytes())) {
            Ok(()) => delivered.lock().unwrap().push(value),
            Err(_) => break,
        }
    }
    let mut received = BTreeSet::new();
    let mut cancelled = 0;
    for (request, cancel_ran) in &results {
        let completion = request.wait();
        match completion.status {
            SUCCESS => {
                assert!(
                    !cancel_ran,
                    "a request whose cancel routine ran was also answered"
                );
                let value = u64::from_le_bytes(completion.output.try_into().unwrap());
                assert!(received.insert(value), "{value} delivered twice");
            }
            status => {
                assert_eq!(status, Status::CANCELLED.raw());
                assert!(cancel_ran, "only cancelled requests end cancelled");
                cancelled += 1;
            }
        }
    }
    let delivered: BTreeSet<u64> = delivered.into_inner().unwrap().into_iter().collect();
    assert_eq!(
        received, delivered,
        "every message delivered reached exactly one request"
    );
    assert_eq!(received.len() + cancelled, SERVICES * REQUESTS);
    drop(handles);
    teardown(machine, driver, queue);
}

// --- a driver written against the raw ABI, to break the rules -----------------------------------

/// Function codes of the raw driver's I/O control codes, each a different (mis)behaviour.
mod behaviour {
    /// Marks pending, keeps the IRP (no cancel routine), returns STATUS_PENDING.
    pub const PEND: u16 = 0x801;
    /// As PEND, with a cancel routine that releases the cancel lock and completes the IRP.
    pub const PEND_CANCELABLE: u16 = 0x802;
    /// Completes the IRP twice.
    pub const COMPLETE_TWICE: u16 = 0x803;
    /// Sets a cancel routine and completes the IRP.
    pub const COMPLETE_WITH_CANCEL_ROUTINE: u16 = 0x804;
    /// Completes with STATUS_PENDING as the status.
    pub const COMPLETE_WITH_PENDING_STATUS: u16 = 0x805;
    /// Keeps the IRP and returns STATUS_PENDING without marking it pending.
    pub const PEND_UNMARKED: u16 = 0x806;
    /// Returns STATUS_SUCCESS without completing the IRP.
    pub const RETURN_WITHOUT_COMPLETING: u16 = 0x807;
    /// Completes with STATUS_SUCCESS and returns STATUS_UNSUCCESSFUL.
    pub const RETURN_ANOTHER_STATUS: u16 = 0x808;
    /// Marks pending, completes, returns STATUS_SUCCESS.
    pub const MARK_PENDING_RETURN_SUCCESS: u16 = 0x809;
    /// Completes with more output than the buffer holds.
    pub const OVERSTATE_OUTPUT: u16 = 0x80A;
    /// Returns with the IRQL raised to DISPATCH_LEVEL.
    pub const RAISE_IRQL: u16 = 0x80B;
    /// Completes with STATUS_SUCCESS and the input echoed back.
    pub const ECHO: u16 = 0x80C;
    /// Completes with STATUS_SUCCESS, then waits at the raw driver's gate before it returns.
    pub const COMPLETE_THEN_WAIT: u16 = 0x80D;
    /// As PEND_CANCELABLE, with a cancel routine that waits at the gate before it completes.
    pub const PEND_SLOW_CANCEL: u16 = 0x80E;
}

fn raw_code(function: u16) -> u32 {
    sys::CTL_CODE(
        0x8000,
        u32::from(function),
        sys::METHOD_BUFFERED,
        sys::FILE_ANY_ACCESS,
    )
}

#[expect(
    clippy::multiple_unsafe_ops_per_block,
    reason = "a raw driver; each block is one step of a C-style dispatch routine, argued as a whole"
)]
mod raw {
    use super::*;

    /// The IRPs the driver keeps pending, by device (tests run in parallel, each with its own
    /// machine and so its own device).
    static KEPT: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

    fn keep(device: *mut sys::DEVICE_OBJECT, irp: *mut sys::IRP) {
        // The test's record of what the driver keeps: harness memory.
        wfp_rs_sim::as_harness(|| KEPT.lock().unwrap().push((device as usize, irp as usize)));
    }

    /// Takes the IRP kept for the raw driver's device.
    pub fn take_kept(driver: &LoadedDriver) -> *mut sys::IRP {
        // SAFETY: the driver object is valid while the driver is loaded.
        let device = unsafe { (*driver.driver_object()).DeviceObject } as usize;
        let mut kept = KEPT.lock().unwrap();
        let index = kept
            .iter()
            .position(|&(d, _)| d == device)
            .expect("an IRP is kept");
        kept.remove(index).1 as *mut sys::IRP
    }

    fn wide(text: &str) -> Vec<u16> {
        text.encode_utf16().collect()
    }

    fn unicode(units: &mut [u16]) -> sys::UNICODE_STRING {
        sys::UNICODE_STRING {
            Length: (units.len() * 2) as u16,
            MaximumLength: (units.len() * 2) as u16,
            Buffer: units.as_mut_ptr(),
        }
    }

    /// Creates `\Device\WfpRsRaw` with the link `\??\WfpRsRaw` and installs its own dispatch.
    pub unsafe extern "system" fn entry(
        object: *mut sys::DRIVER_OBJECT,
        _registry_path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        let (mut name, mut link) = (wide(r"\Device\WfpRsRaw"), wide(r"\??\WfpRsRaw"));
        let (name, link) = (unicode(&mut name), unicode(&mut link));
        let mut device = null_mut();
        // Called by the simulated I/O manager at PASSIVE_LEVEL with a valid driver object.
        // SAFETY: as above; the strings are locals.
        unsafe {
            let status = sys::IoCreateDevice(object, 0, &name, 0x8000, 0, 0, &mut device);
            assert_eq!(status, 0);
            assert_eq!(sys::IoCreateSymbolicLink(&link, &name), 0);
            for major in [
                sys::IRP_MJ_CREATE,
                sys::IRP_MJ_CLEANUP,
                sys::IRP_MJ_CLOSE,
                sys::IRP_MJ_DEVICE_CONTROL,
            ] {
                (*object).MajorFunction[usize::from(major)] = Some(dispatch);
            }
            (*object).DriverUnload = Some(unload);
        }
        0
    }

    unsafe extern "system" fn unload(object: *mut sys::DRIVER_OBJECT) {
        let mut link = wide(r"\??\WfpRsRaw");
        let link = unicode(&mut link);
        // SAFETY: the driver created exactly this link and one device in `entry`.
        unsafe {
            sys::IoDeleteSymbolicLink(&link);
            sys::IoDeleteDevice((*object).DeviceObject);
        }
    }

    /// Completes `irp` with `status` and `information` output bytes.
    ///
    /// # Safety
    ///
    /// The caller owns `irp`.
    pub unsafe fn complete(irp: *mut sys::IRP, status: sys::NTSTATUS, information: usize) {
        // SAFETY: per the contract.
        unsafe {
            (*irp).IoStatus.Anonymous = sys::IO_STATUS_BLOCK_0 { Status: status };
            (*irp).IoStatus.Information = information;
            sys::IofCompleteRequest(irp, sys::IO_NO_INCREMENT);
        }
    }

    /// A cancel routine done right: release the cancel lock, complete as cancelled.
    unsafe extern "system" fn cancel(_device: *mut sys::DEVICE_OBJECT, irp: *mut sys::IRP) {
        KEPT.lock()
            .unwrap()
            .retain(|&(_, kept)| kept != irp as usize);
        // SAFETY: called with the cancel spin lock held, for the IRP this driver keeps.
        unsafe {
            sys::IoReleaseCancelSpinLock((*irp).CancelIrql);
            complete(irp, Status::CANCELLED.raw(), 0);
        }
    }

    /// A cancel routine that releases the cancel lock and waits at the gate before it completes
    /// the IRP as cancelled.
    unsafe extern "system" fn slow_cancel(_device: *mut sys::DEVICE_OBJECT, irp: *mut sys::IRP) {
        KEPT.lock()
            .unwrap()
            .retain(|&(_, kept)| kept != irp as usize);
        // SAFETY: called with the cancel spin lock held, for the IRP this driver keeps.
        unsafe { sys::IoReleaseCancelSpinLock((*irp).CancelIrql) };
        IN_CANCEL.pass();
        // SAFETY: the IRP is still this driver's: its cancel routine owns it now.
        unsafe { complete(irp, Status::CANCELLED.raw(), 0) };
    }

    unsafe extern "system" fn dispatch(
        device: *mut sys::DEVICE_OBJECT,
        irp: *mut sys::IRP,
    ) -> sys::NTSTATUS {
        // Each arm below is one behaviour, the wrong ones on purpose.
        // SAFETY: the I/O manager hands over a valid IRP.
        unsafe {
            let stack = sys::IoGetCurrentIrpStackLocation(irp);
            if (*stack).MajorFunction != sys::IRP_MJ_DEVICE_CONTROL {
                complete(irp, SUCCESS, 0);
                return SUCCESS;
            }
            let control = (*stack).Parameters.DeviceIoControl;
            let function = ((control.IoControlCode >> 2) & 0xFFF) as u16;
            match function {
                behaviour::PEND => {
                    sys::IoMarkIrpPending(irp);
                    keep(device, irp);
                    sys::STATUS_PENDING
                }
                behaviour::PEND_CANCELABLE => {
                    sys::IoMarkIrpPending(irp);
                    keep(device, irp);
                    sys::IoSetCancelRoutine(irp, Some(cancel));
                    sys::STATUS_PENDING
                }
                behaviour::PEND_SLOW_CANCEL => {
                    sys::IoMarkIrpPending(irp);
                    keep(device, irp);
                    sys::IoSetCancelRoutine(irp, Some(slow_cancel));
                    sys::STATUS_PENDING
                }
                behaviour::COMPLETE_TWICE => {
                    complete(irp, SUCCESS, 0);
                    complete(irp, SUCCESS, 0);
                    SUCCESS
                }
                behaviour::COMPLETE_WITH_CANCEL_ROUTINE => {
                    sys::IoSetCancelRoutine(irp, Some(cancel));
                    complete(irp, SUCCESS, 0);
                    SUCCESS
                }
                behaviour::COMPLETE_WITH_PENDING_STATUS => {
                    complete(irp, sys::STATUS_PENDING, 0);
                    sys::STATUS_PENDING
                }
                behaviour::PEND_UNMARKED => {
                    keep(device, irp);
                    sys::STATUS_PENDING
                }
                behaviour::RETURN_WITHOUT_COMPLETING => SUCCESS,
                behaviour::RETURN_ANOTHER_STATUS => {
                    complete(irp, SUCCESS, 0);
                    Status::UNSUCCESSFUL.raw()
                }
                behaviour::MARK_PENDING_RETURN_SUCCESS => {
                    sys::IoMarkIrpPending(irp);
                    complete(irp, SUCCESS, 0);
                    SUCCESS
                }
                behaviour::OVERSTATE_OUTPUT => {
                    complete(irp, SUCCESS, control.OutputBufferLength as usize + 1);
                    SUCCESS
                }
                behaviour::RAISE_IRQL => {
                    complete(irp, SUCCESS, 0);
                    sys::KfRaiseIrql(sys::DISPATCH_LEVEL);
                    SUCCESS
                }
                behaviour::COMPLETE_THEN_WAIT => {
                    complete(irp, SUCCESS, 0);
                    AFTER_COMPLETING.pass();
                    SUCCESS
                }
                behaviour::ECHO => {
                    let length = (control.InputBufferLength as usize)
                        .min(control.OutputBufferLength as usize);
                    if control.IoControlCode & 3 == sys::METHOD_NEITHER && length > 0 {
                        // The caller's own buffers, no system buffer (a real driver would
                        // probe them under __try).
                        assert!((*irp).AssociatedIrp.SystemBuffer.is_null());
                        let to = (*irp).UserBuffer.cast::<u8>();
                        to.copy_from_nonoverlapping(control.Type3InputBuffer.cast(), length);
                    }
                    complete(irp, SUCCESS, length);
                    SUCCESS
                }
                _ => {
                    complete(irp, Status::INVALID_DEVICE_REQUEST.raw(), 0);
                    Status::INVALID_DEVICE_REQUEST.raw()
                }
            }
        }
    }

    /// Where `COMPLETE_THEN_WAIT`'s dispatch waits, after completing its request.
    pub static AFTER_COMPLETING: Gate = Gate::new();
    /// Where `PEND_SLOW_CANCEL`'s cancel routine waits, before completing its request.
    pub static IN_CANCEL: Gate = Gate::new();

    /// Loads the raw driver and opens its device.
    pub fn load(machine: &Machine) -> (LoadedDriver, wfp_rs_sim::DeviceHandle) {
        let driver = machine.load_driver("raw", entry).unwrap();
        let handle = machine
            .open_device(r"\\.\WfpRsRaw", Caller::User)
            .expect("a device without a DACL is open to everyone");
        (driver, handle)
    }

    /// Completes the kept IRP from DISPATCH_LEVEL with `output` copied into its system buffer.
    pub fn complete_kept(machine: &Machine, driver: &LoadedDriver, output: &[u8]) {
        let irp = take_kept(driver);
        machine.at_dispatch(|_irql| {
            // SAFETY: the driver owns the kept IRP (no cancel routine is set); its buffered
            // output holds at least `output.len()` bytes (the tests make sure).
            unsafe {
                let buffer = (*irp).AssociatedIrp.SystemBuffer.cast::<u8>();
                buffer.copy_from_nonoverlapping(output.as_ptr(), output.len());
                complete(irp, SUCCESS, output.len());
            }
        });
    }
}

#[test]
fn a_raw_driver_that_pends_and_completes_from_dispatch_level_runs_clean() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let echo = handle.device_io_control(raw_code(behaviour::ECHO), b"ping", 8);
    assert_eq!(
        echo.result().unwrap().output,
        b"ping",
        "completed synchronously"
    );
    let request = handle.device_io_control(raw_code(behaviour::PEND), &[], 16);
    assert!(request.is_pending());
    assert!(
        !request.cancel(),
        "without a cancel routine, CancelIoEx only sets the flag"
    );
    assert!(request.is_pending(), "the driver still owns the IRP");
    raw::complete_kept(&machine, &driver, b"late answer");
    let completion = request.wait();
    assert_eq!(
        (completion.status, completion.output),
        (SUCCESS, b"late answer".to_vec())
    );
    drop(handle);
    machine.unload_driver(driver).unwrap();
    assert!(machine.symbolic_links().is_empty());
}

/// A dispatch routine that completed its request and has not returned yet is still driver code
/// running: the unload waits for it (on Windows the I/O manager's reference on the device defers
/// the unload until the call returns).
#[test]
fn an_unload_waits_for_a_dispatch_routine_that_completed_its_request_and_runs_on() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            handle
                .device_io_control(raw_code(behaviour::COMPLETE_THEN_WAIT), &[], 0)
                .wait()
                .status
        });
        raw::AFTER_COMPLETING.wait_for_a_routine();
        let unloading = scope.spawn(|| machine.unload_driver(driver));
        assert_keeps_waiting(
            &unloading,
            "the driver unloaded while its dispatch routine was still running",
        );
        raw::AFTER_COMPLETING.open();
        assert_eq!(sending.join().unwrap(), SUCCESS);
        unloading.join().unwrap().unwrap();
    });
}

/// A cancel routine (`CancelIoEx` from the service) still running when the driver unloads: the
/// unload waits for it, and the request it completes is not "pending at unload".
#[test]
fn an_unload_waits_for_a_cancel_routine_that_is_running() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let request = handle.device_io_control(raw_code(behaviour::PEND_SLOW_CANCEL), &[], 0);
    assert!(request.is_pending());
    std::thread::scope(|scope| {
        let cancelling = scope.spawn(|| request.cancel());
        raw::IN_CANCEL.wait_for_a_routine();
        let unloading = scope.spawn(|| machine.unload_driver(driver));
        assert_keeps_waiting(
            &unloading,
            "the driver unloaded while its cancel routine was still running",
        );
        raw::IN_CANCEL.open();
        assert!(cancelling.join().unwrap(), "the cancel routine ran");
        unloading.join().unwrap().unwrap();
    });
    assert_eq!(request.wait().status, Status::CANCELLED.raw());
}

/// One that never returns: the simulator stops after the unload wait limit.
#[test]
fn a_dispatch_routine_that_never_returns_stops_the_unload() {
    let outcome = wfp_rs_sim::run_isolated(
        "a_dispatch_routine_that_never_returns_stops_the_unload",
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(std::time::Duration::from_millis(200));
            let (driver, handle) = raw::load(&machine);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let _ =
                        handle.device_io_control(raw_code(behaviour::COMPLETE_THEN_WAIT), &[], 0);
                });
                raw::AFTER_COMPLETING.wait_for_a_routine();
                let _ = machine.unload_driver(driver);
            });
        },
    );
    let report = outcome.expect_bugcheck(
        wfp_rs::bugcheck::BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
    );
    assert_eq!(
        (report.params[1], report.params[3]),
        (1, wfp_rs::bugcheck::unload_wait::DISPATCH_ROUTINES),
        "{}",
        outcome.stderr
    );
    assert!(
        report.explanation.contains(
            "waited 0.2 s for 1 dispatch or cancel routine(s) running on other threads (a service's requests) to return"
        ),
        "{}",
        outcome.stderr
    );
}

#[test]
fn served_requests_are_forgotten_once_nobody_can_ask_how_they_ended() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let baseline = machine.tracked_io_requests();
    for _ in 0..1000 {
        let echo = handle.device_io_control(raw_code(behaviour::ECHO), b"ping", 8);
        assert_eq!(echo.result().unwrap().output, b"ping");
    }
    assert_eq!(
        machine.tracked_io_requests(),
        baseline,
        "a thousand completed, dropped requests leave no record behind"
    );
    let kept = handle.device_io_control(raw_code(behaviour::ECHO), b"kept", 8);
    assert_eq!(machine.tracked_io_requests(), baseline + 1);
    let pending = handle.device_io_control(raw_code(behaviour::PEND), &[], 16);
    drop(pending);
    assert_eq!(
        machine.tracked_io_requests(),
        baseline + 2,
        "a pending request stays known to the I/O manager after its sender stops asking"
    );
    raw::complete_kept(&machine, &driver, b"late answer");
    assert_eq!(machine.tracked_io_requests(), baseline + 1);
    assert_eq!(
        kept.result().unwrap().output,
        b"kept",
        "a request still held can be asked how it ended"
    );
    drop(kept);
    assert_eq!(machine.tracked_io_requests(), baseline);
    drop(handle);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn a_raw_cancel_routine_runs_with_the_cancel_lock_and_completes_the_request() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let request = handle.device_io_control(raw_code(behaviour::PEND_CANCELABLE), &[], 16);
    assert!(request.is_pending());
    assert!(request.cancel(), "the driver's cancel routine ran");
    assert_eq!(request.wait().status, Status::CANCELLED.raw());
    drop(handle);
    machine.unload_driver(driver).unwrap();
}

bugcheck_test! {
    /// IoCompleteRequest twice for the same IRP.
    fn completing_an_irp_twice_stops() expects MULTIPLE_IRP_COMPLETE_REQUESTS {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::COMPLETE_TWICE), &[], 0);
    }
}

bugcheck_test! {
    /// IoCompleteRequest with a pointer that no request ever had.
    fn completing_something_that_is_not_an_irp_stops() expects MULTIPLE_IRP_COMPLETE_REQUESTS {
        let machine = Machine::new();
        let mut fake = [0u64; 32];
        machine.run(|| {
            // SAFETY: deliberately wrong; the simulator rejects the pointer before touching it.
            unsafe { sys::IofCompleteRequest(fake.as_mut_ptr().cast(), 0) };
        });
    }
}

bugcheck_test! {
    /// Driver Verifier: "the driver called IoCompleteRequest while its cancel routine was still
    /// set" (0xC9, parameter 1 = 0x07).
    fn completing_with_a_cancel_routine_set_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::COMPLETED_WITH_CANCEL_ROUTINE) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::COMPLETE_WITH_CANCEL_ROUTINE), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: IoCompleteRequest with a status of STATUS_PENDING (0xC9, 0x06).
    fn completing_with_status_pending_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::COMPLETED_WITH_PENDING_STATUS) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::COMPLETE_WITH_PENDING_STATUS), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: IoCompleteRequest above DISPATCH_LEVEL (0xC9, 0x0E).
    fn completing_above_dispatch_level_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::COMPLETED_ABOVE_DISPATCH) {
        let machine = Machine::new();
        let (driver, handle) = raw::load(&machine);
        let _request = handle.device_io_control(raw_code(behaviour::PEND), &[], 0);
        let irp = raw::take_kept(&driver);
        machine.run(|| {
            // SAFETY: deliberately raising to HIGH_LEVEL (the machine stops before lowering).
            unsafe { sys::KfRaiseIrql(sys::HIGH_LEVEL) };
            // SAFETY: the kept IRP belongs to the driver, which completes it, at the wrong IRQL.
            unsafe { raw::complete(irp, SUCCESS, 0) };
        });
    }
}

bugcheck_test! {
    /// Driver Verifier: STATUS_PENDING returned without IoMarkIrpPending (0xC9, 0x23D).
    fn returning_pending_without_marking_the_irp_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::PENDING_NOT_MARKED) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::PEND_UNMARKED), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: a dispatch routine returned without completing the IRP or returning
    /// STATUS_PENDING (0xC9, 0x226).
    fn returning_without_completing_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::NOT_COMPLETED_NOR_PENDING) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::RETURN_WITHOUT_COMPLETING), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: the returned status differs from the completion status (0xC9, 0x224).
    fn returning_another_status_than_completed_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::STATUS_MISMATCH) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::RETURN_ANOTHER_STATUS), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: marked pending, but STATUS_PENDING not returned (0xC9, 0x23E).
    fn marking_pending_and_returning_success_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::MARKED_PENDING_NOT_RETURNED) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::MARK_PENDING_RETURN_SUCCESS), &[], 0);
    }
}

bugcheck_test! {
    /// Driver Verifier: the IRQL changed across the dispatch routine (0xC9, 0x05).
    fn returning_from_dispatch_at_another_irql_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::IRQL_CHANGED_BY_DISPATCH) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::RAISE_IRQL), &[], 0);
    }
}

bugcheck_test! {
    /// More output than the caller's buffer holds: Windows would copy past its end; the
    /// simulator stops (0xC9, 0x200).
    fn overstating_the_output_length_stops() expects DRIVER_VERIFIER_IOMANAGER_VIOLATION (iomanager::UNKNOWN) {
        let machine = Machine::new();
        let (_driver, handle) = raw::load(&machine);
        handle.device_io_control(raw_code(behaviour::OVERSTATE_OUTPUT), &[], 4);
    }
}

bugcheck_test! {
    /// A driver that unloads while it still holds a pending IRP.
    fn unloading_with_a_pending_irp_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let (driver, handle) = raw::load(&machine);
        let _request = handle.device_io_control(raw_code(behaviour::PEND), &[], 0);
        let _ = machine.unload_driver(driver);
    }
}

#[test]
fn method_neither_hands_the_driver_the_callers_buffers_and_direct_io_is_not_simulated() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let code = |method| {
        sys::CTL_CODE(
            0x8000,
            u32::from(behaviour::ECHO),
            method,
            sys::FILE_ANY_ACCESS,
        )
    };
    let echo = handle
        .device_io_control(code(sys::METHOD_NEITHER), b"neither", 16)
        .wait();
    assert_eq!(echo.status, SUCCESS);
    assert_eq!(echo.output, b"neither");
    for method in [sys::METHOD_IN_DIRECT, sys::METHOD_OUT_DIRECT] {
        let direct = handle.device_io_control(code(method), b"x", 1).wait();
        assert_eq!(direct.status, Status::NOT_IMPLEMENTED.raw());
    }
    drop(handle);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn unloading_after_completing_every_irp_runs_clean() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    let request = handle.device_io_control(raw_code(behaviour::PEND), &[], 0);
    raw::complete_kept(&machine, &driver, &[]);
    assert_eq!(request.wait().status, SUCCESS);
    drop(handle);
    machine.unload_driver(driver).unwrap();
    assert_eq!(machine.pending_io_requests(), 0);
}

bugcheck_test! {
    /// The system cancel spin lock is a spin lock: IoReleaseCancelSpinLock below DISPATCH_LEVEL
    /// (here: without holding it) is caught like any other.
    fn releasing_the_cancel_spin_lock_without_holding_it_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (wfp_rs::bugcheck::verifier::DEADLOCK_UNACQUIRED_RELEASE) {
        let machine = Machine::new();
        machine.at_dispatch(|_irql| {
            // SAFETY: deliberately releasing a lock this processor does not hold.
            unsafe { sys::IoReleaseCancelSpinLock(sys::DISPATCH_LEVEL) };
        });
    }
}

#[test]
fn the_cancel_spin_lock_raises_to_dispatch_and_restores() {
    let machine = Machine::new();
    machine.run(|| {
        let mut old = 0xFF;
        // SAFETY: acquired and released on this thread, at PASSIVE_LEVEL.
        unsafe { sys::IoAcquireCancelSpinLock(&mut old) };
        assert_eq!(old, sys::PASSIVE_LEVEL);
        assert_eq!(sys::KeGetCurrentIrql(), sys::DISPATCH_LEVEL);
        // SAFETY: held by this processor, with the IRQL it saved.
        unsafe { sys::IoReleaseCancelSpinLock(old) };
        assert_eq!(sys::KeGetCurrentIrql(), sys::PASSIVE_LEVEL);
    });
}

#[test]
fn kernel_handles_and_security_descriptors_are_validated() {
    let machine = Machine::new();
    let (driver, handle) = raw::load(&machine);
    drop(handle);
    let device = {
        // SAFETY: the driver object is valid while the driver is loaded.
        unsafe { (*driver.driver_object()).DeviceObject }
    };
    machine.run(|| {
        let mut handle: sys::HANDLE = null_mut();
        // SAFETY: a kernel-mode open of a live device, read access only; the out pointer is a
        // local.
        let status = unsafe {
            sys::ObOpenObjectByPointer(
                device.cast(),
                0x200,
                null_mut(),
                sys::GENERIC_READ,
                null_mut(),
                sys::KernelMode,
                &mut handle,
            )
        };
        assert_eq!(status, SUCCESS);
        let empty_dacl: [u8; 28] = [
            1, 0, 0x04, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, // header
            2, 0, 8, 0, 0, 0, 0, 0, // an ACL without ACEs
        ];
        // SAFETY: a valid self-relative descriptor on the stack, for a handle without WRITE_DAC.
        let status = unsafe {
            sys::ZwSetSecurityObject(
                handle,
                sys::DACL_SECURITY_INFORMATION,
                empty_dacl.as_ptr().cast_mut().cast(),
            )
        };
        assert_eq!(status, Status::ACCESS_DENIED.raw());
        // SAFETY: closes the handle opened above.
        assert_eq!(unsafe { sys::ZwClose(handle) }, SUCCESS);
        // SAFETY: closes it again (wrongly); the simulator answers STATUS_INVALID_HANDLE.
        let again = unsafe { sys::ZwClose(handle) };
        assert_eq!(again, Status::INVALID_HANDLE.raw());
        // SAFETY: as above, with WRITE_DAC.
        let status = unsafe {
            sys::ObOpenObjectByPointer(
                device.cast(),
                0x200,
                null_mut(),
                sys::WRITE_DAC,
                null_mut(),
                sys::KernelMode,
                &mut handle,
            )
        };
        assert_eq!(status, SUCCESS);
        let mut bad_acl = empty_dacl;
        bad_acl[20] = 9;
        // SAFETY: a descriptor whose ACL revision is wrong, which the kernel rejects.
        let status = unsafe {
            sys::ZwSetSecurityObject(
                handle,
                sys::DACL_SECURITY_INFORMATION,
                bad_acl.as_ptr().cast_mut().cast(),
            )
        };
        assert_eq!(status, Status::INVALID_ACL.raw());
        // SAFETY: a valid descriptor, an empty DACL: nobody may open the device.
        let status = unsafe {
            sys::ZwSetSecurityObject(
                handle,
                sys::DACL_SECURITY_INFORMATION,
                empty_dacl.as_ptr().cast_mut().cast(),
            )
        };
        assert_eq!(status, SUCCESS);
        // SAFETY: closes the handle once.
        assert_eq!(unsafe { sys::ZwClose(handle) }, SUCCESS);
    });
    assert_eq!(
        machine
            .open_device(r"\\.\WfpRsRaw", Caller::System)
            .unwrap_err(),
        Status::ACCESS_DENIED,
        "an empty DACL grants nothing, not even to SYSTEM"
    );
    machine.unload_driver(driver).unwrap();
}

// --- the ABI against windows-sys and the headers -------------------------------------------------

#[test]
fn irp_layouts_match_windows_sys() {
    use core::mem::{offset_of, size_of};
    use windows_sys::Wdk::Foundation as ws;
    use windows_sys::Wdk::System::SystemServices as wss;

    assert_eq!(size_of::<sys::IRP>(), size_of::<ws::IRP>());
    assert_eq!(
        offset_of!(sys::IRP, AssociatedIrp),
        offset_of!(ws::IRP, AssociatedIrp)
    );
    assert_eq!(
        offset_of!(sys::IRP, IoStatus),
        offset_of!(ws::IRP, IoStatus)
    );
    assert_eq!(
        offset_of!(sys::IRP, PendingReturned),
        offset_of!(ws::IRP, PendingReturned)
    );
    assert_eq!(offset_of!(sys::IRP, Cancel), offset_of!(ws::IRP, Cancel));
    assert_eq!(
        offset_of!(sys::IRP, CancelIrql),
        offset_of!(ws::IRP, CancelIrql)
    );
    assert_eq!(
        offset_of!(sys::IRP, CancelRoutine),
        offset_of!(ws::IRP, CancelRoutine)
    );
    assert_eq!(
        offset_of!(sys::IRP, UserBuffer),
        offset_of!(ws::IRP, UserBuffer)
    );
    assert_eq!(offset_of!(sys::IRP, Tail), offset_of!(ws::IRP, Tail));
    assert_eq!(size_of::<sys::IRP_TAIL>(), size_of::<ws::IRP_3>());
    assert_eq!(
        offset_of!(sys::IRP_TAIL_OVERLAY, Thread),
        offset_of!(ws::IRP_3_0, Thread)
    );
    assert_eq!(
        offset_of!(sys::IRP_TAIL_OVERLAY, ListEntry),
        offset_of!(ws::IRP_3_0, Anonymous2)
    );
    assert_eq!(
        offset_of!(sys::IRP_TAIL_OVERLAY, OriginalFileObject),
        offset_of!(ws::IRP_3_0, OriginalFileObject)
    );
    assert_eq!(
        size_of::<sys::IO_STACK_LOCATION>(),
        size_of::<ws::IO_STACK_LOCATION>()
    );
    assert_eq!(
        offset_of!(sys::IO_STACK_LOCATION, Parameters),
        offset_of!(ws::IO_STACK_LOCATION, Parameters)
    );
    assert_eq!(
        offset_of!(sys::IO_STACK_LOCATION, DeviceObject),
        offset_of!(ws::IO_STACK_LOCATION, DeviceObject)
    );
    assert_eq!(
        offset_of!(sys::IO_STACK_LOCATION, FileObject),
        offset_of!(ws::IO_STACK_LOCATION, FileObject)
    );
    // windows-sys 0.61 drops the POINTER_ALIGNMENT of InputBufferLength and IoControlCode
    // (microsoft/windows-rs#4404); the header has them at +8 and +0x10 on x64.
    assert_eq!(
        offset_of!(sys::IO_STACK_LOCATION_DEVICE_IO_CONTROL, InputBufferLength),
        8
    );
    assert_eq!(
        offset_of!(sys::IO_STACK_LOCATION_DEVICE_IO_CONTROL, IoControlCode),
        0x10
    );
    assert_eq!(size_of::<sys::IO_CSQ>(), size_of::<wss::IO_CSQ>());
    assert_eq!(
        offset_of!(sys::IO_CSQ, CsqCompleteCanceledIrp),
        offset_of!(wss::IO_CSQ, CsqCompleteCanceledIrp)
    );
    assert_eq!(
        size_of::<sys::IO_CSQ_IRP_CONTEXT>(),
        size_of::<wss::IO_CSQ_IRP_CONTEXT>()
    );
}

#[test]
fn constants_match_windows_sys() {
    use windows_sys::Win32::Foundation as f;
    use windows_sys::Win32::Security as s;
    use windows_sys::Win32::Storage::FileSystem as fs;
    use windows_sys::Win32::System::{Ioctl, SystemServices as ss};

    for (ours, theirs) in [
        (Status::BUFFER_TOO_SMALL, f::STATUS_BUFFER_TOO_SMALL),
        (Status::DELETE_PENDING, f::STATUS_DELETE_PENDING),
        (Status::INVALID_ACL, f::STATUS_INVALID_ACL),
        (
            Status::INVALID_DEVICE_REQUEST,
            f::STATUS_INVALID_DEVICE_REQUEST,
        ),
        (Status::INVALID_DEVICE_STATE, f::STATUS_INVALID_DEVICE_STATE),
        (Status::INVALID_HANDLE, f::STATUS_INVALID_HANDLE),
        (
            Status::INVALID_SECURITY_DESCR,
            f::STATUS_INVALID_SECURITY_DESCR,
        ),
        (Status::INVALID_SID, f::STATUS_INVALID_SID),
        (Status::OBJECT_NAME_INVALID, f::STATUS_OBJECT_NAME_INVALID),
        (Status::OBJECT_TYPE_MISMATCH, f::STATUS_OBJECT_TYPE_MISMATCH),
        (Status::CANCELLED, f::STATUS_CANCELLED),
    ] {
        assert_eq!(ours.raw(), theirs, "{ours}");
    }
    assert_eq!(sys::STATUS_PENDING, f::STATUS_PENDING);
    assert_eq!(sys::METHOD_BUFFERED, Ioctl::METHOD_BUFFERED);
    assert_eq!(sys::FILE_ANY_ACCESS, Ioctl::FILE_ANY_ACCESS);
    assert_eq!(sys::FILE_READ_ACCESS, Ioctl::FILE_READ_ACCESS);
    assert_eq!(sys::FILE_WRITE_ACCESS, Ioctl::FILE_WRITE_ACCESS);
    assert_eq!(sys::FILE_DEVICE_UNKNOWN, Ioctl::FILE_DEVICE_UNKNOWN);
    // IOCTL_STORAGE_QUERY_PROPERTY = CTL_CODE(IOCTL_STORAGE_BASE, 0x500, METHOD_BUFFERED,
    // FILE_ANY_ACCESS).
    assert_eq!(
        ControlCode::buffered(0x2D, 0x500, RequiredAccess::Any).raw(),
        Ioctl::IOCTL_STORAGE_QUERY_PROPERTY
    );
    assert_eq!(sys::FILE_ALL_ACCESS, fs::FILE_ALL_ACCESS);
    assert_eq!(sys::FILE_GENERIC_READ, fs::FILE_GENERIC_READ);
    assert_eq!(sys::FILE_GENERIC_WRITE, fs::FILE_GENERIC_WRITE);
    assert_eq!(sys::WRITE_DAC, fs::WRITE_DAC);
    assert_eq!(sys::DACL_SECURITY_INFORMATION, s::DACL_SECURITY_INFORMATION);
    assert_eq!(sys::SE_DACL_PRESENT, s::SE_DACL_PRESENT);
    assert_eq!(sys::SE_DACL_PROTECTED, s::SE_DACL_PROTECTED);
    assert_eq!(sys::SE_SELF_RELATIVE, s::SE_SELF_RELATIVE);
    assert_eq!(u32::from(sys::ACL_REVISION), s::ACL_REVISION);
    assert_eq!(
        u32::from(sys::ACCESS_ALLOWED_ACE_TYPE),
        ss::ACCESS_ALLOWED_ACE_TYPE
    );
    assert_eq!(
        u32::from(sys::SECURITY_DESCRIPTOR_REVISION),
        ss::SECURITY_DESCRIPTOR_REVISION
    );
    // The SIDs the device's DACL names: S-1-5-18 and S-1-5-32-544.
    assert_eq!(s::SECURITY_NT_AUTHORITY.Value, [0, 0, 0, 0, 0, 5]);
    assert_eq!(ss::SECURITY_LOCAL_SYSTEM_RID, 18);
    assert_eq!(ss::SECURITY_BUILTIN_DOMAIN_RID, 32);
    assert_eq!(ss::DOMAIN_ALIAS_RID_ADMINS, 544);
}
