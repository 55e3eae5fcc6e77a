//! The kernel's side of untrusted input, end to end in the simulator: the bytes go in as a
//! user-mode service sends them (a `DeviceIoControl` request on the driver's device), through
//! the SDK's dispatch routine, to the code that decodes them, and the request's status, output
//! and the decisions taken are checked against what the documentation promises.
//!
//! Each target keeps one simulated machine for many inputs (loading a driver per input would
//! spend the time on loading): a driver with a question channel, or the example firewall, and a
//! handle of its service. The machine prints only error messages (`DbgPrintEx` level 0), so its
//! debug log does not grow with every refused input; and it is replaced, driver unloaded, every
//! [`INPUTS_PER_MACHINE`] inputs, because the simulator keeps a record of every request it
//! completed (its I/O state's IRP table): one machine serving millions of requests would grow
//! by about a kilobyte a request and slow down as the table grows.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use firewall_protocol::control::{CONTROL_DEVICE_PATH, REVOKE, REVOKED_LEN, Revoke, Revoked};
use firewall_protocol::{ASK_CHANNEL, ConnectionReply};
use wfp_rs::Status;
use wfp_rs::ask::{AskChannel, Outcome, QuestionHandler, QuestionId, decode_message};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::port::Message;
use wfp_rs_sim::{Caller, DeviceHandle, LoadedDriver, Machine};

const SUCCESS: i32 = 0;

/// The question channel's handler: the firewall's decoder, and a record of every decision.
struct Recorder {
    decided: Mutex<Vec<(u64, Outcome<ConnectionReply>)>>,
}

impl QuestionHandler for Recorder {
    type Context = u64;
    type Answer = ConnectionReply;

    fn decode(&self, answer: &[u8]) -> Option<ConnectionReply> {
        // As the example firewall's handler does.
        ConnectionReply::decode(answer).ok()
    }

    fn decide(&self, _irql: &mut DispatchLevel<'_>, question: u64, outcome: Outcome<Self::Answer>) {
        lock(&self.decided).push((question, outcome));
    }
}

/// A mutex's contents, also after a panic elsewhere (the replay test catches panics).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many inputs one simulated machine serves before the harness replaces it.
pub(crate) const INPUTS_PER_MACHINE: u64 = 10_000;

/// A harness that is made on first use and replaced every [`INPUTS_PER_MACHINE`] inputs.
struct Renewing<H> {
    harness: Option<H>,
    served: u64,
}

/// Runs `f` with the harness in `cell`, made by `make` if there is none, and retired (`retire`)
/// after it served [`INPUTS_PER_MACHINE`] inputs.
fn with_harness<H, R>(
    cell: &'static OnceLock<Mutex<Renewing<H>>>,
    make: fn() -> H,
    retire: fn(H),
    f: impl FnOnce(&mut H) -> R,
) -> R {
    let mut renewing = lock(cell.get_or_init(|| {
        Mutex::new(Renewing {
            harness: None,
            served: 0,
        })
    }));
    if renewing.served >= INPUTS_PER_MACHINE {
        renewing.served = 0;
        if let Some(old) = renewing.harness.take() {
            retire(old);
        }
    }
    renewing.served += 1;
    let harness = renewing.harness.get_or_insert_with(make);
    f(harness)
}

struct AskHarness {
    machine: Machine,
    channel: AskChannel<Recorder>,
    service: DeviceHandle,
    asked: u64,
    driver: LoadedDriver,
}

mod channel_driver {
    #[wfp_rs::driver_entry]
    fn entry(
        _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
        _driver: &mut wfp_rs::driver::Driver<'_>,
    ) -> Result<(), wfp_rs::Status> {
        Ok(())
    }
}

fn make_ask_harness() -> AskHarness {
    let machine = Machine::new();
    machine.set_debug_filter_mask(0);
    let driver = machine
        .load_driver("fuzz-ask", channel_driver::DriverEntry)
        .expect("the channel's driver loads");
    let channel = driver
        .run_in_driver(&machine, |irql, driver| {
            let handler = Recorder {
                decided: Mutex::new(Vec::new()),
            };
            AskChannel::new(irql, driver, "WfpRsFuzzAsk", &ASK_CHANNEL, 1, handler)
        })
        .expect("a driver_entry driver")
        .expect("the channel is created");
    let service = machine
        .open_device(r"\\.\WfpRsFuzzAsk", Caller::System)
        .expect("the service opens the channel");
    AskHarness {
        machine,
        channel,
        service,
        asked: 0,
        driver,
    }
}

fn retire_ask_harness(harness: AskHarness) {
    let AskHarness {
        machine,
        channel,
        service,
        driver,
        ..
    } = harness;
    drop(service);
    machine.at_passive(|irql| channel.close(irql));
    machine
        .unload_driver(driver)
        .expect("the channel's driver unloads");
}

/// `AskChannel`'s answer path: one question is asked and delivered, then the bytes are sent as
/// the answer (with the first byte's bit 0 set, and at least 8 bytes after it, the question's
/// id replaces the first 8, so that the fuzzer reaches the checks after the id). The request's
/// status and the decision follow the table in `wfp_rs::ask`; a question the answer did not
/// decide is still waiting (a cancel decides it), so each gets exactly one decision.
pub(crate) fn ask_answer(data: &[u8]) -> bool {
    static HARNESS: OnceLock<Mutex<Renewing<AskHarness>>> = OnceLock::new();
    with_harness(&HARNESS, make_ask_harness, retire_ask_harness, |harness| {
        answer_one(harness, data)
    })
}

fn answer_one(harness: &mut AskHarness, data: &[u8]) -> bool {
    let spec = ASK_CHANNEL;
    harness.asked += 1;
    let asked = harness.asked;
    let wait = harness
        .service
        .device_io_control(spec.wait.raw(), &[], spec.wait_output_len());
    let id = harness
        .machine
        .at_dispatch(|irql| {
            harness
                .channel
                .ask(irql, b"question", Duration::from_secs(3600), asked)
        })
        .unwrap_or_else(|_| panic!("question {asked} is not asked"));
    let delivered = wait.wait();
    assert_eq!(
        delivered.status, SUCCESS,
        "the wait request carries the question"
    );
    assert_eq!(
        decode_message(&delivered.output),
        Some((id, &b"question"[..]))
    );

    let mut input = data.get(1..).unwrap_or_default().to_vec();
    if data.first().is_some_and(|flags| flags & 1 == 1) && input.len() >= 8 {
        input[..8].copy_from_slice(&id.raw().to_le_bytes());
    }
    let status = harness
        .service
        .device_io_control(spec.answer.raw(), &input, 0)
        .wait()
        .status;
    let decided = std::mem::take(&mut *lock(&harness.channel.handler().decided));

    let named = input
        .first_chunk::<8>()
        .map(|id| QuestionId::from_raw(u64::from_le_bytes(*id)));
    let accepted = match named {
        None => {
            assert_eq!(
                status,
                Status::INVALID_BUFFER_SIZE.raw(),
                "shorter than an id"
            );
            false
        }
        Some(named) if named != id => {
            assert_eq!(status, Status::NOT_FOUND.raw(), "an id never asked");
            false
        }
        Some(_) => {
            let expected = decode_message(&input)
                .filter(|(_, body)| body.len() <= spec.max_answer)
                .and_then(|(_, body)| ConnectionReply::decode(body).ok());
            let (want_status, want_outcome) = match expected {
                Some(reply) => (SUCCESS, Outcome::Answered(reply)),
                None => (Status::INVALID_PARAMETER.raw(), Outcome::Malformed),
            };
            assert_eq!(status, want_status, "the answer's status");
            assert_eq!(decided, [(asked, want_outcome)], "the answer decides");
            return true;
        }
    };
    assert!(
        decided.is_empty(),
        "a refused answer decides nothing: {decided:?}"
    );
    let cancelled = harness
        .machine
        .at_dispatch(|irql| harness.channel.cancel(irql, id));
    assert!(cancelled, "the question still waited for its answer");
    let decided = std::mem::take(&mut *lock(&harness.channel.handler().decided));
    assert_eq!(decided, [(asked, Outcome::Cancelled)]);
    accepted
}

struct FirewallHarness {
    machine: Machine,
    control: DeviceHandle,
    driver: LoadedDriver,
}

fn make_firewall_harness() -> FirewallHarness {
    let machine = Machine::new();
    machine.set_debug_filter_mask(0);
    let driver = machine
        .load_driver("firewall", firewall_driver::DriverEntry)
        .expect("the firewall loads");
    let control = machine
        .open_device(CONTROL_DEVICE_PATH, Caller::System)
        .expect("the service opens the control device");
    FirewallHarness {
        machine,
        control,
        driver,
    }
}

fn retire_firewall_harness(harness: FirewallHarness) {
    drop(harness.control);
    harness
        .machine
        .unload_driver(harness.driver)
        .expect("the firewall unloads");
}

/// The example firewall's control device: the bytes are the input of a `REVOKE` request. It
/// succeeds exactly when `Revoke::decode` accepts them, with a `Revoked` answer (nothing is
/// cached: no connection was made), and fails with `STATUS_INVALID_PARAMETER` otherwise
/// (`STATUS_INVALID_BUFFER_SIZE` past the control device's `MAX_INPUT`).
pub(crate) fn firewall_control(data: &[u8]) -> bool {
    static HARNESS: OnceLock<Mutex<Renewing<FirewallHarness>>> = OnceLock::new();
    with_harness(
        &HARNESS,
        make_firewall_harness,
        retire_firewall_harness,
        |harness| revoke_one(harness, data),
    )
}

fn revoke_one(harness: &FirewallHarness, data: &[u8]) -> bool {
    let completion = harness
        .control
        .device_io_control(REVOKE.raw(), data, REVOKED_LEN)
        .wait();
    if data.len() > wfp_rs::control::MAX_INPUT {
        assert_eq!(completion.status, Status::INVALID_BUFFER_SIZE.raw());
        return false;
    }
    match Revoke::decode(data) {
        Ok(_) => {
            assert_eq!(completion.status, SUCCESS, "an accepted revoke succeeds");
            assert_eq!(
                Revoked::decode(&completion.output),
                Ok(Revoked { removed: 0 }),
                "nothing was cached"
            );
            true
        }
        Err(_) => {
            assert_eq!(
                completion.status,
                Status::INVALID_PARAMETER.raw(),
                "a malformed revoke is refused"
            );
            assert!(completion.output.is_empty(), "and answered with nothing");
            false
        }
    }
}
