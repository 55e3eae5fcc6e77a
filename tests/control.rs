//! Commands from the service: a `ControlDevice` answers `METHOD_BUFFERED` I/O control requests
//! at once through its handler. Round trips through the simulator's user-mode side and through
//! `wfp_rs::user` over the bridge, every way a request is refused, the handler's broken promises,
//! security, and teardown while a handler runs (made deterministic with channels: the handler
//! says when it is running and waits to be released).

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use wfp_rs::control::{CommandHandler, ControlDevice, MAX_INPUT};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::inverted::{ControlCode, InvertedQueue, RequiredAccess};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::{Status, sys};
use wfp_rs_sim::{Caller, LoadedDriver, Machine, UnloadError};

/// Copies the input to the output.
const ECHO: ControlCode = ControlCode::buffered(0x8000, 0x900, RequiredAccess::Any);
/// Fails with the status in the input (a little-endian `i32`).
const FAIL: ControlCode = ControlCode::buffered(0x8000, 0x901, RequiredAccess::Any);
/// Reports one byte more than the output buffer holds.
const OVERREPORT: ControlCode = ControlCode::buffered(0x8000, 0x902, RequiredAccess::Any);
/// Says it is running, then waits until the test releases it; answers "done".
const BLOCK: ControlCode = ControlCode::buffered(0x8000, 0x903, RequiredAccess::Any);
/// Describes what it was given: input length, output length (little-endian `u32`s) and whether
/// the output was all zeros.
const INSPECT: ControlCode = ControlCode::buffered(0x8000, 0x904, RequiredAccess::Any);
/// A code the handler does not know.
const UNKNOWN: ControlCode = ControlCode::buffered(0x8000, 0x9FF, RequiredAccess::Any);

const NAME: &str = "WfpRsCommands";
const PATH: &str = r"\\.\WfpRsCommands";
const DEVICE_PATH: &str = r"\Device\WfpRsCommands";
const SUCCESS: i32 = 0;

/// What the test sees of the handler: how often it ran, what happened in which order, and the
/// channels of the blocking command.
struct Probe {
    calls: AtomicUsize,
    log: Mutex<Vec<&'static str>>,
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl Probe {
    fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }

    fn record(&self, event: &'static str) {
        // Called from the driver's handlers: the test's log is not the driver's memory.
        wfp_rs_sim::as_harness(|| self.log.lock().unwrap().push(event));
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The test's ends of the blocking command's channels.
struct Controls {
    probe: Arc<Probe>,
    entered: Receiver<()>,
    release: Sender<()>,
}

fn probe() -> Controls {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    Controls {
        probe: Arc::new(Probe {
            calls: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
        }),
        entered,
        release,
    }
}

struct Commands(Arc<Probe>);

impl CommandHandler for Commands {
    fn command(
        &self,
        _irql: &mut PassiveLevel<'_>,
        code: ControlCode,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        match code {
            ECHO => {
                let reply = output
                    .get_mut(..input.len())
                    .ok_or(Status::BUFFER_TOO_SMALL)?;
                reply.copy_from_slice(input);
                Ok(input.len())
            }
            FAIL => {
                let raw = input.try_into().map_err(|_| Status::INVALID_PARAMETER)?;
                Err(Status::from_raw(i32::from_le_bytes(raw)))
            }
            OVERREPORT => Ok(output.len() + 1),
            BLOCK => {
                // The test's channels allocate as the test's, not as the driver's.
                wfp_rs_sim::as_harness(|| {
                    self.0.entered.lock().unwrap().send(()).unwrap();
                    self.0.release.lock().unwrap().recv().unwrap();
                });
                self.0.record("handler returned");
                output[..4].copy_from_slice(b"done");
                Ok(4)
            }
            INSPECT => {
                let zeroed = output.iter().all(|&b| b == 0);
                let mut reply = [0u8; 9];
                reply[..4].copy_from_slice(&(input.len() as u32).to_le_bytes());
                reply[4..8].copy_from_slice(&(output.len() as u32).to_le_bytes());
                reply[8] = u8::from(zeroed);
                output[..9].copy_from_slice(&reply);
                Ok(9)
            }
            _ => Err(Status::INVALID_DEVICE_REQUEST),
        }
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        self.0.record("handler dropped");
    }
}

/// A driver that does nothing by itself; the tests create devices on its behalf.
mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// A driver that keeps its control device in its state, so unload closes it. Its handler's probe
/// is handed over through [`NEXT_PROBE`]; tests that load it hold [`HOLDER`].
mod holder {
    use super::*;

    /// Serialises the tests that load this driver (they share [`NEXT_PROBE`]).
    pub static HOLDER: Mutex<()> = Mutex::new(());
    /// The probe the next load's handler reports to.
    pub static NEXT_PROBE: Mutex<Option<Arc<Probe>>> = Mutex::new(None);

    pub fn serialise() -> MutexGuard<'static, ()> {
        HOLDER.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The driver state.
    pub struct State {
        /// Dropped (and so closed) at unload.
        #[expect(
            dead_code,
            reason = "held for its Drop, which closes the device at unload"
        )]
        pub device: ControlDevice<Commands>,
    }

    impl DriverState for State {}

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let probe = NEXT_PROBE
            .lock()
            .unwrap()
            .take()
            .ok_or(Status::INVALID_DEVICE_STATE)?;
        Ok(State {
            device: ControlDevice::new(irql, driver, NAME, Commands(probe))?,
        })
    }
}

fn load_holder(machine: &Machine, probe: &Arc<Probe>) -> LoadedDriver {
    *holder::NEXT_PROBE.lock().unwrap() = Some(Arc::clone(probe));
    machine.load_driver("holder", holder::DriverEntry).unwrap()
}

/// A machine with the plain driver and a control device named [`NAME`].
fn setup() -> (Machine, LoadedDriver, ControlDevice<Commands>, Controls) {
    let machine = Machine::new();
    let driver = machine.load_driver("plain", plain::DriverEntry).unwrap();
    let controls = probe();
    let probe = Arc::clone(&controls.probe);
    let device = driver
        .run_in_driver(&machine, |irql, d| {
            ControlDevice::new(irql, d, NAME, Commands(probe))
        })
        .expect("an SDK driver")
        .expect("the device is created");
    (machine, driver, device, controls)
}

/// Closes the device, unloads the driver and checks that nothing is left behind.
fn teardown(machine: Machine, driver: LoadedDriver, device: ControlDevice<Commands>) {
    machine.at_passive(|irql| device.close(irql));
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

fn status_input(status: Status) -> [u8; 4] {
    status.raw().to_le_bytes()
}

// --- round trips --------------------------------------------------------------------------------

#[test]
fn a_command_is_answered_at_once() {
    let (machine, driver, device, controls) = setup();
    assert_eq!(
        machine.symbolic_links(),
        [(r"\??\WfpRsCommands".to_owned(), DEVICE_PATH.to_owned())]
    );
    for caller in [Caller::System, Caller::Administrator] {
        let service = machine.open_device(PATH, caller).unwrap();
        let request = service.device_io_control(ECHO.raw(), b"revoke pid 42", 64);
        let completion = request
            .result()
            .expect("completed before DeviceIoControl returned");
        assert_eq!(completion.status, SUCCESS);
        assert_eq!(completion.information, 13);
        assert_eq!(completion.ok(), Ok(&b"revoke pid 42"[..]));
    }
    assert_eq!(controls.probe.calls(), 2);
    assert_eq!(machine.pending_io_requests(), 0);
    // The driver reaches its handler's state through the device.
    assert_eq!(device.handler().0.calls(), 2);
    teardown(machine, driver, device);
}

#[test]
fn the_handler_gets_a_copy_of_the_input_and_a_zeroed_output() {
    let (machine, driver, device, _controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    // Input longer than output, output longer than input: the system buffer holds the input in
    // its first bytes either way, and the handler must see neither aliasing nor stale bytes.
    for (input_len, output_len) in [
        (100usize, 16usize),
        (3, 200),
        (0, 9),
        (MAX_INPUT, MAX_INPUT),
    ] {
        let input = vec![0xAB; input_len];
        let completion = service
            .device_io_control(INSPECT.raw(), &input, output_len)
            .wait();
        assert_eq!(completion.status, SUCCESS, "{input_len}/{output_len}");
        let mut expected = Vec::new();
        expected.extend_from_slice(&(input_len as u32).to_le_bytes());
        expected.extend_from_slice(&(output_len as u32).to_le_bytes());
        expected.push(1);
        assert_eq!(completion.output, expected, "{input_len}/{output_len}");
    }
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn concurrent_commands_are_all_answered() {
    const SENDERS: usize = 4;
    const COMMANDS: usize = 50;
    let (machine, driver, device, controls) = setup();
    let handles: Vec<_> = (0..SENDERS)
        .map(|_| machine.open_device(PATH, Caller::System).unwrap())
        .collect();
    std::thread::scope(|scope| {
        for (sender, service) in handles.iter().enumerate() {
            scope.spawn(move || {
                for n in 0..COMMANDS {
                    let message = format!("{sender}:{n}");
                    let completion = service
                        .device_io_control(ECHO.raw(), message.as_bytes(), 16)
                        .wait();
                    assert_eq!(completion.ok(), Ok(message.as_bytes()));
                }
            });
        }
    });
    assert_eq!(controls.probe.calls(), SENDERS * COMMANDS);
    drop(handles);
    teardown(machine, driver, device);
}

// --- refusals and the handler's results ---------------------------------------------------------

#[test]
fn a_handler_error_fails_the_request_with_its_status_and_no_output() {
    let (machine, driver, device, _controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    for status in [
        Status::INVALID_PARAMETER,
        Status::ACCESS_DENIED,
        Status::BUFFER_OVERFLOW, // a warning code
    ] {
        let completion = service
            .device_io_control(FAIL.raw(), &status_input(status), 64)
            .wait();
        assert_eq!(completion.status, status.raw());
        assert_eq!(completion.information, 0);
        assert!(completion.output.is_empty());
    }
    // The handler's own answer to a code it does not know.
    let unknown = service.device_io_control(UNKNOWN.raw(), b"?", 8).wait();
    assert_eq!(unknown.status, Status::INVALID_DEVICE_REQUEST.raw());
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn a_success_code_as_an_error_is_an_internal_error_not_a_crash() {
    let (machine, driver, device, _controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    // STATUS_PENDING as the completion status would stop the machine (0xC9, 0x06); STATUS_TIMEOUT
    // would tell user mode the request succeeded.
    for raw in [sys::STATUS_PENDING, Status::TIMEOUT.raw(), 0] {
        let completion = service
            .device_io_control(FAIL.raw(), &raw.to_le_bytes(), 8)
            .wait();
        assert_eq!(completion.status, Status::INTERNAL_ERROR.raw(), "{raw:#x}");
        assert!(completion.output.is_empty());
    }
    let output = machine.debug_output().concat();
    assert!(
        output.contains("which is not an error or warning code"),
        "{output}"
    );
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn reporting_more_output_than_the_buffer_holds_fails_without_output() {
    let (machine, driver, device, _controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    for output_len in [0, 8] {
        let completion = service
            .device_io_control(OVERREPORT.raw(), b"", output_len)
            .wait();
        assert_eq!(completion.status, Status::INTERNAL_ERROR.raw());
        assert_eq!(completion.information, 0, "never over-reported");
        assert!(completion.output.is_empty());
    }
    let output = machine.debug_output().concat();
    assert!(
        output.contains("reported 9 bytes of output for a 8-byte buffer"),
        "{output}"
    );
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn input_longer_than_the_maximum_is_refused_before_the_handler() {
    let (machine, driver, device, controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let completion = service
        .device_io_control(ECHO.raw(), &vec![1; MAX_INPUT + 1], MAX_INPUT + 1)
        .wait();
    assert_eq!(completion.status, Status::INVALID_BUFFER_SIZE.raw());
    assert_eq!(controls.probe.calls(), 0);
    let at_the_limit = service
        .device_io_control(ECHO.raw(), &vec![2; MAX_INPUT], MAX_INPUT)
        .wait();
    assert_eq!(at_the_limit.ok(), Ok(&vec![2; MAX_INPUT][..]));
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn codes_with_another_transfer_method_never_reach_the_handler() {
    let (machine, driver, device, controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let code = |method| sys::CTL_CODE(0x8000, 0x900, method, sys::FILE_ANY_ACCESS);
    // METHOD_NEITHER reaches the driver with raw user-mode pointers; the device refuses it.
    let neither = service
        .device_io_control(code(sys::METHOD_NEITHER), b"abc", 8)
        .wait();
    assert_eq!(neither.status, Status::INVALID_DEVICE_REQUEST.raw());
    assert!(neither.output.is_empty());
    // Direct I/O is not simulated: the simulator's I/O manager refuses it before the driver.
    for method in [sys::METHOD_IN_DIRECT, sys::METHOD_OUT_DIRECT] {
        let direct = service.device_io_control(code(method), b"abc", 8).wait();
        assert_eq!(
            direct.status,
            Status::NOT_IMPLEMENTED.raw(),
            "method {method}"
        );
    }
    assert_eq!(controls.probe.calls(), 0);
    drop(service);
    teardown(machine, driver, device);
}

#[test]
fn without_pool_for_the_input_copy_the_request_fails_cleanly() {
    let (machine, driver, device, controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    machine.fail_allocations(0, 1);
    let completion = service.device_io_control(ECHO.raw(), b"abc", 8).wait();
    assert_eq!(completion.status, Status::INSUFFICIENT_RESOURCES.raw());
    assert_eq!(controls.probe.calls(), 0);
    assert_eq!(machine.pending_allocation_failures(), 0);
    machine.fail_allocations(0, 0);
    // An empty input needs no copy.
    machine.fail_allocations(0, 1);
    let empty = service.device_io_control(ECHO.raw(), b"", 8).wait();
    assert_eq!(empty.status, SUCCESS);
    assert_eq!(machine.pending_allocation_failures(), 1);
    machine.fail_allocations(0, 0);
    drop(service);
    teardown(machine, driver, device);
}

// --- the device ---------------------------------------------------------------------------------

#[test]
fn only_administrators_and_system_can_open_the_device() {
    let (machine, driver, device, controls) = setup();
    for path in [PATH, r"\??\WfpRsCommands", DEVICE_PATH] {
        assert_eq!(
            machine.open_device(path, Caller::User).unwrap_err(),
            Status::ACCESS_DENIED,
            "{path}"
        );
        for caller in [Caller::System, Caller::Administrator] {
            let handle = machine.open_device(path, caller);
            assert!(handle.is_ok(), "{path} as {caller:?}: {handle:?}");
        }
    }
    assert_eq!(controls.probe.calls(), 0);
    teardown(machine, driver, device);
}

#[test]
fn names_and_collisions_are_checked_and_queues_live_alongside() {
    let (machine, driver, device, controls) = setup();
    let create = |name: &str| {
        let probe = Arc::clone(&controls.probe);
        driver
            .run_in_driver(&machine, |irql, d| {
                ControlDevice::new(irql, d, name, Commands(probe)).map(|device| device.close(irql))
            })
            .unwrap()
    };
    assert_eq!(create(NAME), Err(Status::OBJECT_NAME_COLLISION));
    assert_eq!(create(""), Err(Status::OBJECT_NAME_INVALID));
    assert_eq!(create("a\\b"), Err(Status::OBJECT_NAME_INVALID));
    assert_eq!(create(&"x".repeat(65)), Err(Status::OBJECT_NAME_INVALID));
    assert_eq!(create("Second"), Ok(()));
    // Each refused or closed device dropped its handler.
    assert_eq!(controls.probe.log().len(), 5);
    // An inverted-call queue on the same driver: each device answers its own requests.
    const EVENTS: ControlCode = ControlCode::buffered(0x8000, 0x800, RequiredAccess::Any);
    let queue = driver
        .run_in_driver(&machine, |irql, d| {
            InvertedQueue::new(irql, d, "WfpRsCommandEvents", EVENTS, 8)
        })
        .unwrap()
        .unwrap();
    let events = machine
        .open_device(r"\\.\WfpRsCommandEvents", Caller::System)
        .unwrap();
    let commands = machine.open_device(PATH, Caller::System).unwrap();
    let waiting = events.device_io_control(EVENTS.raw(), &[], 8);
    assert_eq!(
        commands.device_io_control(ECHO.raw(), b"hi", 2).wait().ok(),
        Ok(&b"hi"[..])
    );
    machine
        .at_dispatch(|irql| queue.complete_next(irql, b"event"))
        .unwrap();
    assert_eq!(waiting.wait().output, b"event");
    drop((events, commands));
    machine.at_passive(|irql| queue.close(irql));
    teardown(machine, driver, device);
}

#[test]
fn device_creation_survives_every_allocation_failure() {
    let machine = Machine::new();
    let driver = machine.load_driver("plain", plain::DriverEntry).unwrap();
    let baseline = machine.pool_blocks().len();
    let controls = probe();
    for skip in 0.. {
        machine.fail_allocations(skip, 1);
        let probe = Arc::clone(&controls.probe);
        let created = driver
            .run_in_driver(&machine, |irql, d| {
                ControlDevice::new(irql, d, NAME, Commands(probe))
            })
            .unwrap();
        match created {
            Ok(device) => machine.at_passive(|irql| device.close(irql)),
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

// --- teardown -----------------------------------------------------------------------------------

#[test]
fn close_waits_for_a_running_handler_and_refuses_new_requests() {
    let (machine, driver, device, controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let probe = &controls.probe;
    let machine = &machine;
    std::thread::scope(|scope| {
        let blocked = scope.spawn(|| service.device_io_control(BLOCK.raw(), b"", 8).wait());
        controls.entered.recv().unwrap();
        let closer = scope.spawn(move || {
            machine.at_passive(|irql| device.close(irql));
            probe.record("close returned");
        });
        // Once close has marked the device closed, new requests are refused; it is then waiting
        // for the running handler. (Until then, requests are answered as usual.)
        loop {
            let completion = service.device_io_control(ECHO.raw(), b"", 0).wait();
            if completion.status == Status::DELETE_PENDING.raw() {
                break;
            }
            assert_eq!(completion.status, SUCCESS);
            std::thread::yield_now();
        }
        // The link is gone, the device is not: it refuses new handles itself.
        assert_eq!(
            machine.open_device(PATH, Caller::System).unwrap_err(),
            Status::OBJECT_NAME_NOT_FOUND
        );
        assert_eq!(
            machine
                .open_device(DEVICE_PATH, Caller::System)
                .unwrap_err(),
            Status::DELETE_PENDING,
            "the device still exists while its handler runs"
        );
        assert_eq!(machine.pending_io_requests(), 1, "the blocked command");
        assert!(probe.log().is_empty(), "{:?}", probe.log());

        controls.release.send(()).unwrap();
        let completion = blocked.join().unwrap();
        assert_eq!(completion.ok(), Ok(&b"done"[..]));
        closer.join().unwrap();
    });
    assert_eq!(
        probe.log(),
        ["handler returned", "handler dropped", "close returned"]
    );
    assert_eq!(
        machine
            .open_device(DEVICE_PATH, Caller::System)
            .unwrap_err(),
        Status::OBJECT_NAME_NOT_FOUND,
        "deleted"
    );
    // A handle opened before still works, but the device takes no requests any more.
    let late = service.device_io_control(ECHO.raw(), b"", 0).wait();
    assert_eq!(late.status, Status::DELETE_PENDING.raw());
    drop(service);
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
    assert!(machine.symbolic_links().is_empty());
}

#[test]
fn unload_waits_for_a_running_handler_before_deleting_the_device() {
    let _serial = holder::serialise();
    let machine = Machine::new();
    let controls = probe();
    let probe = &controls.probe;
    let driver = load_holder(&machine, probe);
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let machine = &machine;
    std::thread::scope(|scope| {
        let blocked = scope.spawn(|| service.device_io_control(BLOCK.raw(), b"", 8).wait());
        controls.entered.recv().unwrap();
        let unloader = scope.spawn(move || {
            let unloaded = machine.unload_driver(driver);
            probe.record("unload returned");
            unloaded
        });
        // The state's drop closes the device: the link goes first, then requests are refused
        // while the handler still runs.
        loop {
            let completion = service.device_io_control(ECHO.raw(), b"", 0).wait();
            if completion.status == Status::DELETE_PENDING.raw() {
                break;
            }
            assert_eq!(completion.status, SUCCESS);
            std::thread::yield_now();
        }
        assert_eq!(
            machine
                .open_device(DEVICE_PATH, Caller::System)
                .unwrap_err(),
            Status::DELETE_PENDING,
            "the device still exists while its handler runs"
        );
        assert!(probe.log().is_empty(), "{:?}", probe.log());
        controls.release.send(()).unwrap();
        assert_eq!(blocked.join().unwrap().ok(), Ok(&b"done"[..]));
        unloader.join().unwrap().unwrap();
    });
    assert_eq!(
        probe.log(),
        ["handler returned", "handler dropped", "unload returned"]
    );
    assert_eq!(machine.pending_io_requests(), 0);
    assert!(machine.symbolic_links().is_empty());
    assert!(machine.pool_blocks().is_empty());
    drop(service);
}

#[test]
fn unload_with_a_handle_open_closes_the_device_and_orphans_the_handle() {
    let _serial = holder::serialise();
    let machine = Machine::new();
    let controls = probe();
    for round in 0..2 {
        let driver = load_holder(&machine, &controls.probe);
        let service = machine.open_device(PATH, Caller::System).unwrap();
        assert_eq!(
            service.device_io_control(ECHO.raw(), b"1", 1).wait().ok(),
            Ok(&b"1"[..])
        );
        // Windows would not unload while the handle is open; the simulator does, and orphans it.
        machine.unload_driver(driver).unwrap();
        let late = service.device_io_control(ECHO.raw(), b"2", 1).wait();
        assert_eq!(late.status, Status::DELETE_PENDING.raw(), "round {round}");
        drop(service);
        assert!(machine.symbolic_links().is_empty());
        assert!(machine.pool_blocks().is_empty());
    }
    assert_eq!(controls.probe.calls(), 2);
    assert_eq!(controls.probe.log(), ["handler dropped", "handler dropped"]);
}

#[test]
fn dropping_the_device_above_passive_level_refuses_requests_and_leaks_it() {
    let (machine, driver, device, controls) = setup();
    let service = machine.open_device(PATH, Caller::System).unwrap();
    machine.at_dispatch(|_irql| drop(device));
    let output = machine.debug_output().concat();
    assert!(
        output.contains("ControlDevice was dropped at DISPATCH_LEVEL"),
        "{output}"
    );
    let late = service.device_io_control(ECHO.raw(), b"x", 1).wait();
    assert_eq!(late.status, Status::DELETE_PENDING.raw());
    assert_eq!(
        machine.open_device(PATH, Caller::System).unwrap_err(),
        Status::DELETE_PENDING
    );
    assert_eq!(controls.probe.calls(), 0);
    assert!(
        controls.probe.log().is_empty(),
        "the handler is leaked with the device"
    );
    drop(service);
    // Windows keeps a driver whose device was not deleted loaded, and so does the simulator.
    assert!(matches!(
        machine.unload_driver(driver),
        Err(UnloadError::DeviceObjectsRemain { devices: 1, .. })
    ));
}

// --- the service's side: wfp_rs::user over the bridge ------------------------------------------

#[cfg(unix)]
#[test]
fn a_service_sends_commands_through_wfp_rs_user() {
    use wfp_rs::user::Device;

    let (machine, driver, device, controls) = setup();
    let socket = std::env::temp_dir().join(format!("wfp-rs-{}-control.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let bridge = machine.serve_user_mode(&socket).unwrap();
    let service = Device::open_at(&socket, PATH).unwrap();
    let answer = service
        .request(ECHO.raw(), b"revoke 10.0.0.1:443", 64)
        .unwrap()
        .wait(None)
        .unwrap();
    assert_eq!(answer.as_deref(), Some(&b"revoke 10.0.0.1:443"[..]));
    let error = service
        .request(FAIL.raw(), &status_input(Status::INVALID_PARAMETER), 0)
        .unwrap()
        .wait(None)
        .unwrap_err();
    assert!(
        error.to_string().contains("STATUS_INVALID_PARAMETER"),
        "{error}"
    );
    let refused = service
        .request(ECHO.raw(), &vec![0; MAX_INPUT + 1], 8)
        .unwrap()
        .wait(None)
        .unwrap_err();
    assert!(
        refused.to_string().contains("STATUS_INVALID_BUFFER_SIZE"),
        "{refused}"
    );
    assert_eq!(controls.probe.calls(), 2);
    drop(service);
    drop(bridge);
    teardown(machine, driver, device);
}
