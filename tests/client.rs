//! Only the service may answer: a driver that admits one client identity
//! (`Driver::admit_only`) refuses every other process at its ports and devices with
//! `STATUS_ACCESS_DENIED`, before a connection slot is taken, while the slot is free and while
//! the service restarts; then the real service connects and answers. Wrong SIDs, wrong images,
//! deny-only groups; the simulator's token and image queries; the bridge's peer identities.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use wfp_rs::ask::{
    AskChannel, ChannelSpec, Outcome, QuestionHandler, decode_message, encode_header,
};
use wfp_rs::client::{ClientIdentity, Sid};
use wfp_rs::control::{CommandHandler, ControlDevice};
use wfp_rs::inverted::{ControlCode, InvertedQueue, RequiredAccess};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::port::{ConnectionId, Filter, Malformed, Message, PortEvents, Protocol, ServerPort};
use wfp_rs::{Status, sys};
use wfp_rs_sim::{Caller, LoadedDriver, Machine, Process};

const SERVICE_SID: &str = "S-1-5-80-3232863133-3453406364-1395306153-1264843240-2178131108";
const SERVICE_IMAGE: &str = r"\Device\HarddiskVolume3\Program Files\Firewall\service.exe";
const PORT: &str = "\\WfpRsOnlyService";
const DEVICE: &str = "WfpRsOnlyServiceCommands";
const DEVICE_PATH: &str = r"\\.\WfpRsOnlyServiceCommands";
const QUEUE: &str = "WfpRsOnlyServiceQueue";
const QUEUE_PATH: &str = r"\\.\WfpRsOnlyServiceQueue";
const PING: ControlCode = ControlCode::buffered(0x8000, 0x900, RequiredAccess::Any);
const WAIT: ControlCode = ControlCode::buffered(0x8000, 0x901, RequiredAccess::Any);

mod plain {
    #[wfp_rs::driver_entry]
    fn entry(
        _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
        _driver: &mut wfp_rs::driver::Driver<'_>,
    ) -> Result<(), wfp_rs::Status> {
        Ok(())
    }
}

fn service_sid() -> Sid {
    Sid::parse(SERVICE_SID).unwrap()
}

/// The real service: LocalSystem, with its per-service SID in its token.
fn service() -> Process {
    Process::new(812, SERVICE_IMAGE, Caller::System).with_group(service_sid())
}

/// Another elevated process, on the same machine.
fn intruder() -> Process {
    Process::new(
        4242,
        r"\Device\HarddiskVolume3\Users\admin\Desktop\allow-all.exe",
        Caller::Administrator,
    )
}

/// One byte each way.
struct Byte(u8);

impl Message for Byte {
    const MIN_LEN: usize = 1;
    const MAX_LEN: usize = 1;

    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
        *out.first_mut().ok_or(Malformed("short"))? = self.0;
        Ok(1)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        match bytes {
            [b] => Ok(Byte(*b)),
            _ => Err(Malformed("one byte")),
        }
    }
}

struct Ask;
impl Protocol for Ask {
    type Request = Byte;
    type Reply = Byte;
}

/// Counts the connections the driver's own callback saw.
#[derive(Default)]
struct Seen(Arc<AtomicUsize>);

impl PortEvents for Seen {
    fn connected(
        &self,
        _irql: &mut PassiveLevel<'_>,
        _connection: ConnectionId,
        _context: &[u8],
    ) -> Result<(), Status> {
        wfp_rs_sim::as_harness(|| self.0.fetch_add(1, Ordering::SeqCst));
        Ok(())
    }
}

struct Commands;

impl CommandHandler for Commands {
    fn command(
        &self,
        _irql: &mut PassiveLevel<'_>,
        _code: ControlCode,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, Status> {
        let out = output
            .get_mut(..input.len())
            .ok_or(Status::BUFFER_TOO_SMALL)?;
        out.copy_from_slice(input);
        Ok(input.len())
    }
}

struct Setup {
    machine: Machine,
    driver: LoadedDriver,
    filter: Filter,
    port: ServerPort<Ask, Seen>,
    device: ControlDevice<Commands>,
    queue: InvertedQueue,
    seen: Arc<AtomicUsize>,
}

/// A driver with a one-slot port, a control device and an inverted-call queue, that admits
/// `identity` (or anyone, for `None`).
fn setup(identity: Option<ClientIdentity>) -> Setup {
    let machine = Machine::new();
    let driver = machine
        .load_driver("onlyservice", plain::DriverEntry)
        .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let events = Seen(Arc::clone(&seen));
    let (filter, port, device, queue) = driver
        .run_in_driver(&machine, |irql, d| -> Result<_, Status> {
            if let Some(identity) = identity {
                d.admit_only(irql, identity)?;
            }
            let filter = Filter::register(irql, d)?;
            let port = ServerPort::<Ask, Seen>::create(irql, &filter, PORT, 1, events)?;
            let device = ControlDevice::new(irql, d, DEVICE, Commands)?;
            let queue = InvertedQueue::new(irql, d, QUEUE, WAIT, 16)?;
            Ok((filter, port, device, queue))
        })
        .expect("an SDK driver")
        .expect("the objects are created");
    Setup {
        machine,
        driver,
        filter,
        port,
        device,
        queue,
        seen,
    }
}

impl Setup {
    /// Closes everything, unloads, and checks nothing is left: every token answer was freed.
    fn teardown(self) {
        let Setup {
            machine,
            driver,
            filter,
            port,
            device,
            queue,
            ..
        } = self;
        driver.run_in_driver(&machine, |irql, _| {
            device.close(irql);
            queue.close(irql);
            port.close(irql);
            filter.close(irql);
        });
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
    }

    /// The driver asks over the port and returns the answer.
    fn ask(&self, answerer: &wfp_rs_sim::PortClient, question: u8) -> Result<u8, Status> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let message = answerer.get_message(None).expect("a message");
                answerer
                    .reply(message.id, &[message.data[0] + 1])
                    .expect("the driver waits");
            });
            self.machine
                .at_passive(|irql| {
                    self.port
                        .send(irql, &Byte(question), Duration::from_secs(30))
                })
                .map(|b| b.0)
                .map_err(Status::from)
        })
    }
}

// --- the port ------------------------------------------------------------------------------------

#[test]
fn another_admin_cannot_take_the_free_slot_and_the_service_then_answers() {
    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    let mut intruder_client = setup.machine.port_client(PORT).as_process(intruder());
    assert_eq!(intruder_client.connect(&[]), Err(Status::ACCESS_DENIED));
    // Refused before a slot was claimed and before the driver's own callback ran.
    assert_eq!(setup.port.connections(), 0);
    assert_eq!(setup.seen.load(Ordering::SeqCst), 0);

    let mut service_client = setup.machine.port_client(PORT).as_process(service());
    service_client.connect(&[]).unwrap();
    assert_eq!(setup.port.connections(), 1);
    assert_eq!(setup.ask(&service_client, 41), Ok(42));
    drop(service_client);
    drop(intruder_client);
    setup.teardown();
}

#[test]
fn while_the_service_restarts_another_admin_is_still_refused() {
    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    let mut service_client = setup.machine.port_client(PORT).as_process(service());
    service_client.connect(&[]).unwrap();
    // The service stops (crash, update): its connection goes, the slot is free.
    service_client.disconnect();
    assert_eq!(setup.port.connections(), 0);
    for process in [
        intruder(),
        Process::from(Caller::System),
        Process::from(Caller::Administrator),
    ] {
        let mut other = setup.machine.port_client(PORT).as_process(process.clone());
        assert_eq!(
            other.connect(&[]),
            Err(Status::ACCESS_DENIED),
            "{process:?}"
        );
    }
    assert_eq!(setup.port.connections(), 0);
    // Nobody answers meanwhile: the driver's send finds no client (its default applies).
    assert_eq!(
        setup.machine.at_passive(|irql| setup
            .port
            .send(irql, &Byte(1), Duration::from_millis(1))
            .err()),
        Some(wfp_rs::port::SendError::NotConnected)
    );
    // The restarted service (a new process id, the same identity) gets the slot back.
    let restarted = Process::new(913, SERVICE_IMAGE, Caller::System).with_group(service_sid());
    let mut service_client = setup.machine.port_client(PORT).as_process(restarted);
    service_client.connect(&[]).unwrap();
    assert_eq!(setup.ask(&service_client, 9), Ok(10));
    assert_eq!(setup.seen.load(Ordering::SeqCst), 2);
    drop(service_client);
    setup.teardown();
}

#[test]
fn without_a_restriction_the_first_admin_takes_the_slot() {
    // The gap this closes, shown: with no identity configured, the intruder locks the service
    // out of the one-slot port.
    let setup = setup(None);
    let mut intruder_client = setup.machine.port_client(PORT).as_process(intruder());
    intruder_client.connect(&[]).unwrap();
    let mut service_client = setup.machine.port_client(PORT).as_process(service());
    assert_eq!(
        service_client.connect(&[]),
        Err(Status::CONNECTION_COUNT_LIMIT)
    );
    assert_eq!(setup.ask(&intruder_client, 1), Ok(2));
    drop(intruder_client);
    setup.teardown();
}

#[test]
fn a_standard_user_is_still_refused_by_the_descriptor() {
    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    // Even with the service SID as a group, a non-admin token fails the port's DACL first.
    let user = Process::new(77, SERVICE_IMAGE, Caller::User).with_group(service_sid());
    let mut client = setup.machine.port_client(PORT).as_process(user);
    assert_eq!(client.connect(&[]), Err(Status::ACCESS_DENIED));
    drop(client);
    setup.teardown();
}

// --- the devices ---------------------------------------------------------------------------------

#[test]
fn every_sdk_device_refuses_other_processes() {
    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    for path in [DEVICE_PATH, QUEUE_PATH] {
        assert_eq!(
            setup.machine.open_device(path, intruder()).err(),
            Some(Status::ACCESS_DENIED),
            "{path}"
        );
        assert_eq!(
            setup.machine.open_device(path, Caller::System).err(),
            Some(Status::ACCESS_DENIED),
            "{path}"
        );
        assert_eq!(
            setup.machine.open_device(path, Caller::User).err(),
            Some(Status::ACCESS_DENIED),
            "{path}"
        );
        let handle = setup.machine.open_device(path, service()).unwrap();
        drop(handle);
    }
    // The service's handle works; its requests run in its process too.
    let handle = setup.machine.open_device(DEVICE_PATH, service()).unwrap();
    let answer = handle.device_io_control(PING.raw(), b"only me", 16).wait();
    assert_eq!(answer.ok(), Ok(&b"only me"[..]));
    drop(handle);
    setup.teardown();
}

/// Each decision: the question's number and the answer, if one decided it.
type Decisions = Arc<std::sync::Mutex<Vec<(u32, Option<u8>)>>>;

/// Records the decisions; the context is the question's number, the answer one byte.
struct FirstByte(Decisions);

impl QuestionHandler for FirstByte {
    type Context = u32;
    type Answer = u8;

    fn decode(&self, answer: &[u8]) -> Option<u8> {
        match answer {
            [b] => Some(*b),
            _ => None,
        }
    }

    fn decide(&self, _irql: &mut DispatchLevel<'_>, question: u32, outcome: Outcome<u8>) {
        // The log is the harness's: a push that grows it is not the driver's allocation.
        wfp_rs_sim::as_harness(|| self.0.lock().unwrap().push((question, outcome.answer())));
    }
}

#[test]
fn the_question_channel_admits_only_the_service() {
    const SPEC: ChannelSpec = ChannelSpec {
        wait: ControlCode::buffered(0x8000, 0x902, RequiredAccess::Any),
        answer: ControlCode::buffered(0x8000, 0x903, RequiredAccess::Any),
        max_question: 8,
        max_answer: 1,
    };
    const ASK_PATH: &str = r"\\.\WfpRsOnlyServiceAsk";
    let machine = Machine::new();
    let driver = machine
        .load_driver("onlyservice", plain::DriverEntry)
        .unwrap();
    let decisions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = FirstByte(Arc::clone(&decisions));
    let channel = driver
        .run_in_driver(&machine, |irql, d| -> Result<_, Status> {
            d.admit_only(irql, ClientIdentity::sid(service_sid()))?;
            AskChannel::new(irql, d, "WfpRsOnlyServiceAsk", &SPEC, 4, handler)
        })
        .expect("an SDK driver")
        .expect("the channel is created");

    // Another administrator (or SYSTEM without the service's SID) cannot open the channel's
    // device, so it can neither take questions nor answer them.
    for other in [intruder(), Process::from(Caller::System)] {
        assert_eq!(
            machine.open_device(ASK_PATH, other).err(),
            Some(Status::ACCESS_DENIED)
        );
    }

    // The service can, and its answer decides.
    let service = machine.open_device(ASK_PATH, service()).unwrap();
    let wait = service.device_io_control(SPEC.wait.raw(), &[], SPEC.wait_output_len());
    machine.at_dispatch(|irql| {
        assert!(
            channel
                .ask(&mut *irql, b"pid 42?", Duration::from_secs(3600), 1)
                .is_ok()
        );
    });
    let question = wait.wait().output;
    let (id, body) = decode_message(&question).expect("a question");
    assert_eq!(body, b"pid 42?");
    let mut answer = encode_header(id, 1).to_vec();
    answer.push(1);
    assert_eq!(
        service
            .device_io_control(SPEC.answer.raw(), &answer, 0)
            .wait()
            .status,
        0
    );
    assert_eq!(*decisions.lock().unwrap(), [(1, Some(1))]);

    drop(service);
    machine.at_passive(|irql| channel.close(irql));
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
}

#[test]
fn a_deny_only_service_sid_does_not_count() {
    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    let filtered =
        Process::new(812, SERVICE_IMAGE, Caller::System).with_deny_only_group(service_sid());
    assert_eq!(
        setup
            .machine
            .open_device(DEVICE_PATH, filtered.clone())
            .err(),
        Some(Status::ACCESS_DENIED)
    );
    let mut client = setup.machine.port_client(PORT).as_process(filtered);
    assert_eq!(client.connect(&[]), Err(Status::ACCESS_DENIED));
    drop(client);
    setup.teardown();
}

#[test]
fn the_token_user_counts_as_well_as_a_group() {
    // A service running under its own account: the account's SID is the token's user.
    let setup = setup(Some(ClientIdentity::sid(Sid::parse("S-1-5-18").unwrap())));
    let handle = setup
        .machine
        .open_device(DEVICE_PATH, Caller::System)
        .unwrap();
    drop(handle);
    assert_eq!(
        setup
            .machine
            .open_device(DEVICE_PATH, Caller::Administrator)
            .err(),
        Some(Status::ACCESS_DENIED)
    );
    setup.teardown();
}

// --- images ------------------------------------------------------------------------------------

#[test]
fn a_wrong_image_is_refused_and_the_right_one_in_any_case_admitted() {
    let setup = setup(Some(ClientIdentity::image(SERVICE_IMAGE).unwrap()));
    let elsewhere = Process::new(
        812,
        r"\Device\HarddiskVolume3\Temp\service.exe",
        Caller::System,
    );
    assert_eq!(
        setup
            .machine
            .open_device(DEVICE_PATH, elsewhere.clone())
            .err(),
        Some(Status::ACCESS_DENIED)
    );
    let mut client = setup.machine.port_client(PORT).as_process(elsewhere);
    assert_eq!(client.connect(&[]), Err(Status::ACCESS_DENIED));
    let shouting = Process::new(812, &SERVICE_IMAGE.to_uppercase(), Caller::System);
    let handle = setup
        .machine
        .open_device(DEVICE_PATH, shouting.clone())
        .unwrap();
    drop(handle);
    let mut client = setup.machine.port_client(PORT).as_process(shouting);
    client.connect(&[]).unwrap();
    drop(client);
    setup.teardown();
}

#[test]
fn with_sid_and_image_both_must_match() {
    let identity = ClientIdentity::sid(service_sid())
        .and_image(SERVICE_IMAGE)
        .unwrap();
    let setup = setup(Some(identity));
    // The right SID in the wrong executable, the right executable without the SID.
    let wrong_image = Process::new(812, r"\Device\HarddiskVolume3\x.exe", Caller::System)
        .with_group(service_sid());
    let wrong_sid = Process::new(812, SERVICE_IMAGE, Caller::System)
        .with_group(Sid::parse("S-1-5-80-1-2-3-4-5").unwrap());
    for process in [wrong_image, wrong_sid] {
        assert_eq!(
            setup
                .machine
                .open_device(DEVICE_PATH, process.clone())
                .err(),
            Some(Status::ACCESS_DENIED),
            "{process:?}"
        );
        let mut client = setup.machine.port_client(PORT).as_process(process);
        assert_eq!(client.connect(&[]), Err(Status::ACCESS_DENIED));
    }
    let handle = setup.machine.open_device(DEVICE_PATH, service()).unwrap();
    drop(handle);
    setup.teardown();
}

// --- the restriction itself -------------------------------------------------------------------------

#[test]
fn the_restriction_is_set_once() {
    let machine = Machine::new();
    let driver = machine.load_driver("once", plain::DriverEntry).unwrap();
    let second = driver
        .run_in_driver(&machine, |irql, d| {
            assert_eq!(d.admitted(), None);
            d.admit_only(irql, ClientIdentity::sid(service_sid()))
                .unwrap();
            let loosen = d.admit_only(
                irql,
                ClientIdentity::sid(Sid::parse("S-1-5-32-544").unwrap()),
            );
            assert_eq!(
                d.admitted().and_then(ClientIdentity::required_sid),
                Some(&service_sid())
            );
            loosen
        })
        .unwrap();
    assert_eq!(second, Err(Status::INVALID_DEVICE_STATE));
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_restriction_after_a_client_got_in_is_refused() {
    // The careless order: the port exists (anyone may connect from then on), and only then
    // does the driver restrict its clients. The intruder that connected in between keeps its
    // connection, so the restriction would be a false promise: refused, and the driver knows.
    let setup = setup(None);
    let mut intruder_client = setup.machine.port_client(PORT).as_process(intruder());
    intruder_client.connect(&[]).unwrap();
    let late = setup
        .driver
        .run_in_driver(&setup.machine, |irql, d| {
            let late = d.admit_only(irql, ClientIdentity::sid(service_sid()));
            assert_eq!(d.admitted(), None);
            late
        })
        .unwrap();
    assert_eq!(late, Err(Status::INVALID_DEVICE_STATE));
    assert_eq!(setup.ask(&intruder_client, 1), Ok(2));
    drop(intruder_client);
    // The same for a device opened before the call.
    let handle = setup.machine.open_device(DEVICE_PATH, intruder()).unwrap();
    drop(handle);
    setup.teardown();
}

#[test]
fn a_restriction_before_any_client_still_applies() {
    // Creating the objects first is fine as long as nobody got in yet.
    let setup = setup(None);
    let set = setup
        .driver
        .run_in_driver(&setup.machine, |irql, d| {
            d.admit_only(irql, ClientIdentity::sid(service_sid()))
        })
        .unwrap();
    assert_eq!(set, Ok(()));
    let mut intruder_client = setup.machine.port_client(PORT).as_process(intruder());
    assert_eq!(intruder_client.connect(&[]), Err(Status::ACCESS_DENIED));
    assert_eq!(
        setup.machine.open_device(DEVICE_PATH, intruder()).err(),
        Some(Status::ACCESS_DENIED)
    );
    drop(intruder_client);
    setup.teardown();
}

#[test]
fn the_check_is_callable_by_driver_code_in_the_callers_context() {
    // A kernel thread (the harness's at_passive) runs in the System process: no service SID.
    let machine = Machine::new();
    let identity = ClientIdentity::sid(service_sid());
    assert_eq!(
        machine.at_passive(|irql| identity.check_current_process(irql)),
        Err(Status::ACCESS_DENIED)
    );
    let system = ClientIdentity::sid(Sid::parse("S-1-5-18").unwrap());
    assert_eq!(
        machine.at_passive(|irql| system.check_current_process(irql)),
        Ok(())
    );
}

// --- the ABI ----------------------------------------------------------------------------------

#[test]
fn token_structures_match_windows_sys() {
    use std::mem::{offset_of, size_of};
    use windows_sys::Win32::Security as sec;
    use windows_sys::Win32::System::SystemServices as ss;
    assert_eq!(size_of::<sys::TOKEN_USER>(), size_of::<sec::TOKEN_USER>());
    assert_eq!(
        size_of::<sys::TOKEN_GROUPS>(),
        size_of::<sec::TOKEN_GROUPS>()
    );
    assert_eq!(
        offset_of!(sys::TOKEN_GROUPS, Groups),
        offset_of!(sec::TOKEN_GROUPS, Groups)
    );
    assert_eq!(sys::TokenUser, sec::TokenUser);
    assert_eq!(sys::TokenGroups, sec::TokenGroups);
    assert_eq!(sys::SE_GROUP_ENABLED, ss::SE_GROUP_ENABLED as u32);
    assert_eq!(
        sys::SE_GROUP_USE_FOR_DENY_ONLY,
        ss::SE_GROUP_USE_FOR_DENY_ONLY as u32
    );
    assert_eq!(
        u32::from(sys::SID_MAX_SUB_AUTHORITIES),
        ss::SID_MAX_SUB_AUTHORITIES
    );
    assert_eq!(u32::from(sys::SID_REVISION), ss::SID_REVISION);
}

// --- the bridge --------------------------------------------------------------------------------

/// A process on the bridge is what Linux says it is: this test binary, with the groups the
/// bridge was told its executable gets, never an identity the client claims.
#[cfg(target_os = "linux")]
#[test]
fn bridge_clients_are_identified_by_their_executable() {
    use wfp_rs::user::{Device, PortConnection};

    let setup = setup(Some(ClientIdentity::sid(service_sid())));
    let socket =
        std::env::temp_dir().join(format!("wfp-rs-{}-onlyservice.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let bridge = setup.machine.serve_user_mode(&socket).unwrap();
    let denied = Device::open_at(&socket, DEVICE_PATH).unwrap_err();
    assert!(
        denied.to_string().contains("STATUS_ACCESS_DENIED"),
        "{denied}"
    );
    let denied = PortConnection::connect_at(&socket, PORT, &[]).unwrap_err();
    assert!(
        denied.to_string().contains("STATUS_ACCESS_DENIED"),
        "{denied}"
    );

    let me = std::env::current_exe().unwrap().canonicalize().unwrap();
    bridge.identify(&me, [service_sid()]);
    let device = Device::open_at(&socket, DEVICE_PATH).unwrap();
    let port = PortConnection::connect_at(&socket, PORT, &[]).unwrap();
    assert_eq!(setup.port.connections(), 1);
    drop(port);
    drop(device);
    drop(bridge);
    setup.teardown();
}

// --- the simulator's verifier on the new routines ----------------------------------------------

mod verifier_checks {
    use super::*;
    use core::ptr::null_mut;
    use wfp_rs::bugcheck::verifier;
    use wfp_rs_sim::bugcheck_test;

    bugcheck_test! {
        /// SeQueryInformationToken requires PASSIVE_LEVEL.
        fn querying_a_token_at_dispatch_level_stops() expects IRQL_NOT_LESS_OR_EQUAL {
            let machine = Machine::new();
            let token = machine.at_passive(|_irql| {
                // SAFETY: at PASSIVE_LEVEL.
                let process = unsafe { sys::IoGetCurrentProcess() };
                // SAFETY: at PASSIVE_LEVEL, the current process; never released (the machine
                // stops first).
                unsafe { sys::PsReferencePrimaryToken(process) }
            });
            machine.at_dispatch(|_irql| {
                let mut answer: sys::PVOID = null_mut();
                // SAFETY: deliberately breaking the IRQL rule; the simulator stops first.
                unsafe { sys::SeQueryInformationToken(token, sys::TokenUser, &mut answer) };
            });
        }
    }

    bugcheck_test! {
        /// PsDereferencePrimaryToken is documented for IRQL < DISPATCH_LEVEL: a token released
        /// from a DPC or under a spin lock stops.
        fn releasing_a_token_at_dispatch_level_stops() expects IRQL_NOT_LESS_OR_EQUAL {
            let machine = Machine::new();
            let token = machine.at_passive(|_irql| {
                // SAFETY: at PASSIVE_LEVEL.
                let process = unsafe { sys::IoGetCurrentProcess() };
                // SAFETY: at PASSIVE_LEVEL, the current process; released below.
                unsafe { sys::PsReferencePrimaryToken(process) }
            });
            machine.at_dispatch(|_irql| {
                // SAFETY: deliberately breaking the IRQL rule; the simulator stops first.
                unsafe { sys::PsDereferencePrimaryToken(token) };
            });
        }
    }

    bugcheck_test! {
        /// The answer is paged pool (documented): freeing it from a DPC or under a spin lock
        /// is what Driver Verifier stops.
        fn freeing_a_token_answer_at_dispatch_level_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::PAGED_FREE_ABOVE_APC) {
            let machine = Machine::new();
            let answer = machine.at_passive(|_irql| {
                // SAFETY: at PASSIVE_LEVEL.
                let process = unsafe { sys::IoGetCurrentProcess() };
                // SAFETY: at PASSIVE_LEVEL, the current process; released below.
                let token = unsafe { sys::PsReferencePrimaryToken(process) };
                let mut answer: sys::PVOID = null_mut();
                // SAFETY: a referenced token; the answer is freed below.
                let status = unsafe { sys::SeQueryInformationToken(token, sys::TokenUser, &mut answer) };
                assert_eq!(status, 0);
                // SAFETY: the reference taken above, released once.
                unsafe { sys::PsDereferencePrimaryToken(token) };
                answer as usize
            });
            machine.at_dispatch(|_irql| {
                // SAFETY: deliberately freeing paged pool at DISPATCH_LEVEL; the simulator stops
                // first.
                unsafe { sys::ExFreePool(answer as sys::PVOID) };
            });
        }
    }

    bugcheck_test! {
        /// A pointer that is not a process: Windows would dereference it.
        fn referencing_the_token_of_a_non_process_stops() expects KMODE_EXCEPTION_NOT_HANDLED {
            let machine = Machine::new();
            let mut not_a_process = [0u64; 8];
            machine.at_passive(|_irql| {
                // SAFETY: deliberately passing a pointer that is no process; the simulator
                // stops before it uses it.
                unsafe { sys::PsReferencePrimaryToken(not_a_process.as_mut_ptr().cast()) };
            });
        }
    }

    bugcheck_test! {
        /// The answer is the driver's pool: never freed with ExFreePool, it is a leak at
        /// unload.
        fn a_token_answer_never_freed_is_a_leak_at_unload() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::POOL_LEAKED_AT_UNLOAD) {
            let machine = Machine::new();
            let driver = machine.load_driver("leaky", plain::DriverEntry).unwrap();
            driver.run_in_driver(&machine, |_irql, _d| {
                // SAFETY: at PASSIVE_LEVEL.
                let process = unsafe { sys::IoGetCurrentProcess() };
                // SAFETY: at PASSIVE_LEVEL; the current process; released below.
                let token = unsafe { sys::PsReferencePrimaryToken(process) };
                let mut answer: sys::PVOID = null_mut();
                // SAFETY: a referenced token; the answer is deliberately never freed.
                let status = unsafe { sys::SeQueryInformationToken(token, sys::TokenGroups, &mut answer) };
                assert_eq!(status, 0);
                // SAFETY: the reference taken above, released once.
                unsafe { sys::PsDereferencePrimaryToken(token) };
            });
            let _ = machine.unload_driver(driver);
        }
    }
}

// --- the driver's configuration in the registry ----------------------------------------------

mod parameters {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(
        irql: &mut wfp_rs::irql::PassiveLevel<'_>,
        driver: &mut wfp_rs::driver::Driver<'_>,
    ) -> Result<(), Status> {
        for name in ["ServiceSid", "Missing", "Count", "Long", "Limit", "Broken"] {
            // Long texts are shown by their length.
            let read = driver.parameter(irql, name).map(|value| {
                value.map(|text| match text.len() {
                    0..=64 => text,
                    len => format!("{len} characters"),
                })
            });
            wfp_rs::kd_print!("{name}: {read:?}\n");
        }
        Ok(())
    }

    fn read(machine: &Machine) -> Vec<String> {
        let driver = machine.load_driver("configured", DriverEntry).unwrap();
        let lines = machine.debug_output();
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
        lines
    }

    #[test]
    fn a_driver_reads_strings_from_its_parameters_key() {
        let machine = Machine::new();
        let key = r"\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services\configured\Parameters";
        machine.set_registry_string(key, "ServiceSid", SERVICE_SID);
        machine.set_registry_value(key, "Count", 4, &7u32.to_le_bytes());
        let long: String = "x".repeat(wfp_rs::driver::MAX_PARAMETER_LEN + 1);
        machine.set_registry_string(key, "Long", &long);
        machine.set_registry_string(key, "Limit", &long[1..]);
        // A lone surrogate, then NUL.
        machine.set_registry_value(key, "Broken", sys::REG_SZ, &[0x00, 0xD8, 0, 0]);
        assert_eq!(
            read(&machine),
            [
                format!("ServiceSid: Ok(Some(\"{SERVICE_SID}\"))\n"),
                "Missing: Ok(None)\n".to_owned(),
                "Count: Err(Status(STATUS_OBJECT_TYPE_MISMATCH (0xC0000024)))\n".to_owned(),
                "Long: Err(Status(STATUS_BUFFER_OVERFLOW (0x80000005)))\n".to_owned(),
                "Limit: Ok(Some(\"4096 characters\"))\n".to_owned(),
                "Broken: Err(Status(STATUS_INVALID_PARAMETER (0xC000000D)))\n".to_owned(),
            ]
        );
    }

    #[test]
    fn without_a_parameters_key_every_value_is_absent() {
        let machine = Machine::new();
        // Another driver's key, in another case: not ours.
        machine.set_driver_parameter("Other", "ServiceSid", SERVICE_SID);
        let lines = read(&machine);
        assert!(
            lines.iter().all(|line| line.ends_with(": Ok(None)\n")),
            "{lines:?}"
        );
        // The names are case-insensitive.
        let machine = Machine::new();
        machine.set_driver_parameter("CONFIGURED", "servicesid", "S-1-5-18");
        assert_eq!(read(&machine)[0], "ServiceSid: Ok(Some(\"S-1-5-18\"))\n");
    }

    #[test]
    fn registry_structures_match_windows_sys() {
        use std::mem::{offset_of, size_of};
        use windows_sys::Wdk::System::Registry as reg;
        use windows_sys::Wdk::System::SystemServices as svc;
        use windows_sys::Win32::System::Registry as ureg;
        assert_eq!(
            size_of::<sys::KEY_VALUE_PARTIAL_INFORMATION>(),
            size_of::<svc::KEY_VALUE_PARTIAL_INFORMATION>()
        );
        assert_eq!(
            offset_of!(sys::KEY_VALUE_PARTIAL_INFORMATION, Data),
            offset_of!(svc::KEY_VALUE_PARTIAL_INFORMATION, Data)
        );
        assert_eq!(
            sys::KeyValuePartialInformation,
            reg::KeyValuePartialInformation
        );
        assert_eq!(sys::REG_SZ, ureg::REG_SZ);
        assert_eq!(sys::REG_EXPAND_SZ, ureg::REG_EXPAND_SZ);
        assert_eq!(sys::KEY_QUERY_VALUE, ureg::KEY_QUERY_VALUE);
    }
}
