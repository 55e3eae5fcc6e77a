//! The question channel (`wfp_rs::ask`): every outcome on its own, the answer checks
//! (malformed, late, duplicate, foreign), teardown that waits for no service, the service's
//! side over the simulator's bridge, and a seeded race of thousands of questions against
//! answers, timeouts, a service that is killed, cancels and close, with exactly one decision
//! per question.
//!
//! No assertion depends on the wall clock: deadlines are hours long and the tests move the
//! machine's clock (`Machine::advance_clock`).

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wfp_rs::Status;
use wfp_rs::ask::{
    AskChannel, ChannelSpec, NotAskedReason, Outcome, QuestionHandler, QuestionId, decode_message,
    encode_header,
};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::inverted::{ControlCode, RequiredAccess};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::pool::{PoolArc, PoolTag};
use wfp_rs_sim::{Caller, DeviceHandle, IoRequest, LoadedDriver, Machine, UnloadError};

const SPEC: ChannelSpec = ChannelSpec {
    wait: ControlCode::buffered(0x8000, 0x820, RequiredAccess::Any),
    answer: ControlCode::buffered(0x8000, 0x821, RequiredAccess::Any),
    max_question: 24,
    max_answer: 4,
};
const NAME: &str = "WfpRsAsk";
const PATH: &str = r"\\.\WfpRsAsk";
const HOUR: Duration = Duration::from_secs(3600);
const SUCCESS: i32 = 0;

type Log = Arc<Mutex<Vec<(u64, Outcome<u8>)>>>;

/// Records every decision in a log that outlives the channel: the context is the question's
/// number, the answer one byte (0 or 1).
struct Recorder {
    decisions: Log,
}

impl QuestionHandler for Recorder {
    type Context = u64;
    type Answer = u8;

    fn decode(&self, answer: &[u8]) -> Option<u8> {
        match answer {
            [verdict @ (0 | 1)] => Some(*verdict),
            _ => None,
        }
    }

    fn decide(&self, _irql: &mut DispatchLevel<'_>, context: u64, outcome: Outcome<u8>) {
        self.decisions.lock().unwrap().push((context, outcome));
    }
}

/// A log the harness allocates, large enough that `decide` (driver code, whose allocations are
/// the driver's pool and must be freed before it unloads) never grows it.
fn new_log() -> Log {
    Arc::new(Mutex::new(Vec::with_capacity(LOG_CAPACITY)))
}

const LOG_CAPACITY: usize = 8192;

/// The decisions logged so far, in a vector of the harness's; the log keeps its buffer.
fn take(log: &Log) -> Vec<(u64, Outcome<u8>)> {
    log.lock().unwrap().drain(..).collect()
}

mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

struct Setup {
    machine: Machine,
    driver: LoadedDriver,
    channel: AskChannel<Recorder>,
    log: Log,
}

fn setup(capacity: usize) -> Setup {
    let machine = Machine::new();
    let driver = machine.load_driver("asker", plain::DriverEntry).unwrap();
    let log = new_log();
    let recorder = Recorder {
        decisions: Arc::clone(&log),
    };
    let channel = driver
        .run_in_driver(&machine, |irql, d| {
            AskChannel::new(irql, d, NAME, &SPEC, capacity, recorder)
        })
        .expect("an SDK driver")
        .expect("the channel is created");
    Setup {
        machine,
        driver,
        channel,
        log,
    }
}

impl Setup {
    fn ask(&self, question: &[u8], timeout: Duration, context: u64) -> QuestionId {
        self.machine
            .at_dispatch(|irql| self.channel.ask(irql, question, timeout, context))
            .expect("asked")
    }

    fn open(&self) -> DeviceHandle {
        self.machine.open_device(PATH, Caller::System).unwrap()
    }

    fn decisions(&self) -> Vec<(u64, Outcome<u8>)> {
        take(&self.log)
    }

    fn outstanding(&self) -> usize {
        self.machine
            .at_dispatch(|irql| self.channel.outstanding(irql))
    }

    /// Closes the channel, unloads the driver and checks that nothing is left behind; returns
    /// the decisions made since the last look (those of the close among them).
    fn teardown(self) -> Vec<(u64, Outcome<u8>)> {
        let Setup {
            machine,
            driver,
            channel,
            log,
        } = self;
        machine.at_passive(|irql| channel.close(irql));
        let handler_log = take(&log);
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
        assert!(machine.symbolic_links().is_empty());
        assert_eq!(machine.pending_io_requests(), 0);
        handler_log
    }
}

fn wait_request(handle: &DeviceHandle) -> IoRequest {
    handle.device_io_control(SPEC.wait.raw(), &[], SPEC.wait_output_len())
}

/// The id and body of a question a wait request received.
fn question_of(request: &IoRequest) -> (QuestionId, Vec<u8>) {
    let completion = request.wait();
    assert_eq!(completion.status, SUCCESS, "{completion:?}");
    let (id, body) = decode_message(&completion.output).expect("a well-formed question");
    (id, body.to_vec())
}

fn answer_bytes(id: QuestionId, body: &[u8]) -> Vec<u8> {
    let mut input = encode_header(id, body.len()).to_vec();
    input.extend_from_slice(body);
    input
}

/// Sends an answer and returns the status it completed with.
fn answer(handle: &DeviceHandle, id: QuestionId, body: &[u8]) -> i32 {
    answer_raw(handle, &answer_bytes(id, body))
}

fn answer_raw(handle: &DeviceHandle, input: &[u8]) -> i32 {
    handle
        .device_io_control(SPEC.answer.raw(), input, 0)
        .wait()
        .status
}

// --- one outcome at a time ----------------------------------------------------------------------

#[test]
fn a_question_goes_to_the_waiting_request_at_once_and_the_answer_decides_it() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    assert!(wait.is_pending());
    let id = setup.ask(b"may 42 connect?", HOUR, 7);
    assert!(!wait.is_pending(), "delivered inside `ask`");
    let completion = wait.wait();
    assert_eq!(completion.information, 16 + 15);
    let (got, body) = question_of(&wait);
    assert_eq!((got, body.as_slice()), (id, &b"may 42 connect?"[..]));
    assert_eq!(setup.outstanding(), 1);
    assert!(
        setup.decisions().is_empty(),
        "not decided before the answer"
    );
    assert_eq!(answer(&service, id, &[1]), SUCCESS);
    assert_eq!(setup.decisions(), [(7, Outcome::Answered(1))]);
    assert_eq!(setup.outstanding(), 0);
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn a_question_asked_with_no_request_waiting_goes_to_the_next_request() {
    let setup = setup(4);
    // The service has the channel open, but no request of its waits (it is busy).
    let service = setup.open();
    let first = setup.ask(b"one", HOUR, 1);
    let second = setup.ask(b"two", HOUR, 2);
    let (a, b) = (wait_request(&service), wait_request(&service));
    assert_eq!(question_of(&a), (first, b"one".to_vec()), "oldest first");
    assert_eq!(question_of(&b), (second, b"two".to_vec()));
    assert_eq!(answer(&service, second, &[0]), SUCCESS);
    assert_eq!(answer(&service, first, &[1]), SUCCESS);
    assert_eq!(
        setup.decisions(),
        [(2, Outcome::Answered(0)), (1, Outcome::Answered(1))]
    );
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn the_deadline_decides_a_question_nobody_answers_and_a_late_answer_is_refused() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    let id = setup.ask(b"q", HOUR, 5);
    let queued = setup.ask(b"never delivered", 2 * HOUR, 6);
    setup.machine.advance_clock(HOUR - Duration::from_secs(1));
    setup.machine.wait_for_dpcs();
    assert!(setup.decisions().is_empty(), "not before the deadline");
    setup.machine.advance_clock(Duration::from_secs(1));
    setup.machine.wait_for_dpcs();
    assert_eq!(setup.decisions(), [(5, Outcome::TimedOut)]);
    let (got, _) = question_of(&wait);
    assert_eq!(got, id);
    assert_eq!(
        answer(&service, id, &[1]),
        Status::NOT_FOUND.raw(),
        "late: the question had its decision"
    );
    setup.machine.advance_clock(HOUR);
    setup.machine.wait_for_dpcs();
    assert_eq!(
        setup.decisions(),
        [(6, Outcome::TimedOut)],
        "a queued question times out too"
    );
    assert_eq!(
        answer(&service, queued, &[1]),
        Status::NOT_FOUND.raw(),
        "an id never delivered"
    );
    assert!(setup.decisions().is_empty(), "nothing decided twice");
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn malformed_answers_decide_with_malformed_and_say_so() {
    let setup = setup(8);
    let service = setup.open();
    let mut questions = Vec::new();
    for n in 0..4 {
        let wait = wait_request(&service);
        setup.ask(b"q", HOUR, n);
        questions.push(question_of(&wait).0);
    }
    // The driver's decoder refuses the value.
    assert_eq!(
        answer(&service, questions[0], &[2]),
        Status::INVALID_PARAMETER.raw()
    );
    // Longer than max_answer.
    assert_eq!(
        answer(&service, questions[1], &[1; 5]),
        Status::INVALID_PARAMETER.raw()
    );
    // The header's length disagrees with the request's size.
    let mut lying = answer_bytes(questions[2], &[1]);
    lying.push(0);
    assert_eq!(
        answer_raw(&service, &lying),
        Status::INVALID_PARAMETER.raw()
    );
    // The reserved field is not zero.
    let mut reserved = answer_bytes(questions[3], &[1]);
    reserved[15] = 1;
    assert_eq!(
        answer_raw(&service, &reserved),
        Status::INVALID_PARAMETER.raw()
    );
    let decisions = setup.decisions();
    assert_eq!(
        decisions,
        (0..4).map(|n| (n, Outcome::Malformed)).collect::<Vec<_>>()
    );
    // Too short to name a question: nothing to decide.
    assert_eq!(
        answer_raw(&service, &[1, 2, 3]),
        Status::INVALID_BUFFER_SIZE.raw()
    );
    // A request with an unknown code.
    let other = service.device_io_control(
        ControlCode::buffered(0x8000, 0x822, RequiredAccess::Any).raw(),
        &[],
        0,
    );
    assert_eq!(other.wait().status, Status::INVALID_DEVICE_REQUEST.raw());
    assert_eq!(setup.outstanding(), 0);
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn a_duplicate_or_unknown_answer_is_refused_and_decides_nothing() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    let id = setup.ask(b"q", HOUR, 1);
    question_of(&wait);
    assert_eq!(answer(&service, id, &[1]), SUCCESS);
    assert_eq!(answer(&service, id, &[0]), Status::NOT_FOUND.raw());
    // The slot is reused: the old id still does not match.
    let wait = wait_request(&service);
    let reused = setup.ask(b"q2", HOUR, 2);
    assert_eq!(
        (reused.raw() & 0xFFFF_FFFF, reused == id),
        (id.raw() & 0xFFFF_FFFF, false)
    );
    question_of(&wait);
    assert_eq!(answer(&service, id, &[0]), Status::NOT_FOUND.raw());
    assert_eq!(
        answer(&service, QuestionId::from_raw(u64::MAX), &[0]),
        Status::NOT_FOUND.raw()
    );
    assert_eq!(answer(&service, reused, &[0]), SUCCESS);
    assert_eq!(
        setup.decisions(),
        [(1, Outcome::Answered(1)), (2, Outcome::Answered(0))]
    );
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn a_foreign_answer_is_refused_and_the_question_keeps_waiting_for_its_own() {
    let setup = setup(4);
    let (mine, foreign) = (setup.open(), setup.open());
    let wait = wait_request(&mine);
    let id = setup.ask(b"q", HOUR, 3);
    question_of(&wait);
    assert_eq!(answer(&foreign, id, &[1]), Status::ACCESS_DENIED.raw());
    assert!(setup.decisions().is_empty());
    assert_eq!(answer(&mine, id, &[0]), SUCCESS);
    assert_eq!(setup.decisions(), [(3, Outcome::Answered(0))]);
    drop((mine, foreign));
    assert!(setup.teardown().is_empty());
}

#[test]
fn closing_the_services_handle_decides_its_questions_and_another_handle_takes_the_queued_ones() {
    let setup = setup(4);
    let service = setup.open();
    let (a, b) = (wait_request(&service), wait_request(&service));
    let id_a = setup.ask(b"a", HOUR, 1);
    setup.ask(b"b", HOUR, 2);
    let queued = setup.ask(b"c", HOUR, 3);
    question_of(&a);
    question_of(&b);
    // The service restarts: the new instance opens the channel before the old one is gone.
    let restarted = setup.open();
    drop(service); // the old instance was killed
    let mut decisions = setup.decisions();
    decisions.sort_by_key(|d| d.0);
    assert_eq!(
        decisions,
        [(1, Outcome::ServiceGone), (2, Outcome::ServiceGone)]
    );
    let wait = wait_request(&restarted);
    assert_eq!(question_of(&wait), (queued, b"c".to_vec()));
    assert_eq!(answer(&restarted, id_a, &[1]), Status::NOT_FOUND.raw());
    assert_eq!(answer(&restarted, queued, &[1]), SUCCESS);
    assert_eq!(setup.decisions(), [(3, Outcome::Answered(1))]);
    drop(restarted);
    assert!(setup.teardown().is_empty());
}

/// With no handle open on the channel nobody can answer before the deadline: `ask` refuses at
/// once with `NoService` and hands the context back, so the driver applies its default now.
#[test]
fn without_a_service_a_question_is_not_asked_and_the_driver_decides_at_once() {
    let setup = setup(4);
    let refused = setup
        .machine
        .at_dispatch(|irql| setup.channel.ask(irql, b"q", HOUR, 1))
        .unwrap_err();
    assert_eq!(refused.reason(), NotAskedReason::NoService);
    assert_eq!(
        refused.to_string(),
        "no service has the question channel open"
    );
    assert_eq!(refused.into_context(), 1);
    assert_eq!(setup.outstanding(), 0, "no slot taken");
    // A service that opened the channel, even with no request waiting, is asked.
    let service = setup.open();
    let id = setup.ask(b"q", HOUR, 2);
    assert_eq!(setup.outstanding(), 1);
    let wait = wait_request(&service);
    assert_eq!(question_of(&wait).0, id);
    drop(service);
    assert_eq!(setup.decisions(), [(2, Outcome::ServiceGone)]);
    let refused = setup
        .machine
        .at_passive(|irql| setup.channel.ask(irql, b"q", HOUR, 3))
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        NotAskedReason::NoService,
        "the service went away"
    );
    assert!(
        setup.decisions().is_empty(),
        "a question not asked is not decided"
    );
    assert!(setup.teardown().is_empty());
}

/// The last handle closing decides the questions still queued at once (`ServiceGone`), not at
/// their deadlines; while another handle is open they stay queued for its requests.
#[test]
fn the_last_handle_closing_decides_the_queued_questions_at_once() {
    let setup = setup(8);
    let (first, second) = (setup.open(), setup.open());
    let wait = wait_request(&first);
    setup.ask(b"delivered to the first", HOUR, 1);
    setup.ask(b"queued", HOUR, 2);
    setup.ask(b"queued too", 2 * HOUR, 3);
    question_of(&wait);
    drop(first);
    assert_eq!(
        setup.decisions(),
        [(1, Outcome::ServiceGone)],
        "the second handle is still open: the queued questions wait for it"
    );
    assert_eq!(setup.outstanding(), 2);
    drop(second);
    let mut decisions = setup.decisions();
    decisions.sort_by_key(|d| d.0);
    assert_eq!(
        decisions,
        [(2, Outcome::ServiceGone), (3, Outcome::ServiceGone)],
        "decided when the last handle closed, without the clock moving"
    );
    assert_eq!(setup.outstanding(), 0);
    setup.machine.advance_clock(3 * HOUR);
    setup.machine.wait_for_dpcs();
    assert!(
        setup.decisions().is_empty(),
        "no timeout after the decision"
    );
    // A service that comes back is asked again.
    let back = setup.open();
    let wait = wait_request(&back);
    let id = setup.ask(b"again", HOUR, 4);
    assert_eq!(question_of(&wait).0, id);
    assert_eq!(answer(&back, id, &[1]), SUCCESS);
    assert_eq!(setup.decisions(), [(4, Outcome::Answered(1))]);
    drop(back);
    assert!(setup.teardown().is_empty());
}

#[test]
fn a_cancelled_wait_request_takes_no_question_with_it() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    assert!(wait.cancel());
    assert_eq!(wait.wait().status, Status::CANCELLED.raw());
    let id = setup.ask(b"q", HOUR, 9);
    let next = wait_request(&service);
    assert_eq!(question_of(&next).0, id);
    drop(service);
    assert_eq!(setup.decisions(), [(9, Outcome::ServiceGone)]);
    assert!(setup.teardown().is_empty());
}

#[test]
fn the_driver_cancels_a_question_once() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    let id = setup.ask(b"q", HOUR, 4);
    let queued = setup.ask(b"r", HOUR, 5);
    question_of(&wait);
    let machine = &setup.machine;
    assert!(machine.at_dispatch(|irql| setup.channel.cancel(irql, id)));
    assert!(!machine.at_dispatch(|irql| setup.channel.cancel(irql, id)));
    assert!(machine.at_passive(|irql| setup.channel.cancel(irql, queued)));
    assert_eq!(
        setup.decisions(),
        [(4, Outcome::Cancelled), (5, Outcome::Cancelled)]
    );
    assert_eq!(answer(&service, id, &[1]), Status::NOT_FOUND.raw());
    let wait = wait_request(&service);
    assert!(wait.is_pending(), "the cancelled queued question is gone");
    setup.machine.advance_clock(2 * HOUR);
    setup.machine.wait_for_dpcs();
    assert!(setup.decisions().is_empty(), "no timeout after a cancel");
    drop(service);
    assert!(setup.teardown().is_empty());
}

#[test]
fn a_full_channel_and_a_large_question_hand_the_context_back() {
    let setup = setup(2);
    let service = setup.open();
    setup.ask(b"1", HOUR, 1);
    setup.ask(b"2", HOUR, 2);
    let full = setup
        .machine
        .at_dispatch(|irql| setup.channel.ask(irql, b"3", HOUR, 3))
        .unwrap_err();
    assert_eq!(full.reason(), NotAskedReason::Full);
    assert_eq!(
        full.to_string(),
        "every slot of the question channel is taken"
    );
    assert_eq!(full.into_context(), 3);
    let large = setup
        .machine
        .at_dispatch(|irql| setup.channel.ask(irql, &[0; 25], HOUR, 4))
        .unwrap_err();
    assert_eq!(
        large.reason(),
        NotAskedReason::TooLarge { len: 25, max: 24 }
    );
    assert_eq!(large.into_context(), 4);
    assert_eq!(setup.outstanding(), 2);
    let mut closing = setup.teardown();
    drop(service);
    closing.sort_by_key(|d| d.0);
    assert_eq!(closing, [(1, Outcome::Closing), (2, Outcome::Closing)]);
}

#[test]
fn close_decides_everything_and_waits_for_no_service() {
    let setup = setup(8);
    let service = setup.open();
    let (first, second) = (wait_request(&service), wait_request(&service));
    setup.ask(b"delivered", HOUR, 1);
    setup.ask(b"delivered too", HOUR, 2);
    setup.ask(b"queued", HOUR, 3);
    question_of(&first);
    question_of(&second);
    let Setup {
        machine,
        driver,
        channel,
        log,
    } = setup;
    // The service holds two questions and never answers; close must not wait for it. (If it
    // did, this test would hang rather than fail: the service's only thread is this one.)
    machine.at_passive(|irql| channel.close(irql));
    let mut decided = take(&log);
    decided.sort_by_key(|d| d.0);
    assert_eq!(
        decided,
        [
            (1, Outcome::Closing),
            (2, Outcome::Closing),
            (3, Outcome::Closing)
        ]
    );
    let late = answer(&service, QuestionId::from_raw(1), &[1]);
    assert_eq!(late, Status::DELETE_PENDING.raw(), "the device is gone");
    assert_eq!(
        wait_request(&service).wait().status,
        Status::DELETE_PENDING.raw()
    );
    drop(service);
    machine.unload_driver(driver).unwrap();
    assert!(take(&log).is_empty(), "decided once");
    assert!(machine.pool_blocks().is_empty());
    assert_eq!(machine.pending_io_requests(), 0);
}

#[test]
fn close_completes_the_waiting_requests_as_cancelled() {
    let setup = setup(2);
    let service = setup.open();
    let idle = wait_request(&service);
    let closing = setup.teardown();
    assert!(closing.is_empty());
    assert_eq!(idle.wait().status, Status::CANCELLED.raw());
    drop(service);
}

/// A driver that keeps its channel in its state, so unload closes it.
mod holder {
    use super::*;

    /// The log of the channel the driver state holds.
    pub static LOG: Mutex<Vec<(u64, Outcome<u8>)>> = Mutex::new(Vec::new());

    pub struct Logger;

    impl QuestionHandler for Logger {
        type Context = u64;
        type Answer = u8;

        fn decode(&self, answer: &[u8]) -> Option<u8> {
            answer.first().copied()
        }

        fn decide(&self, _irql: &mut DispatchLevel<'_>, context: u64, outcome: Outcome<u8>) {
            LOG.lock().unwrap().push((context, outcome));
        }
    }

    pub struct State {
        #[expect(
            dead_code,
            reason = "held for its Drop, which closes the channel at unload"
        )]
        pub channel: PoolArc<AskChannel<Logger>>,
    }

    impl DriverState for State {}

    /// The harness's reference to the channel the state holds, so it can ask; taken out (and
    /// dropped) before the unload, which then drops the last reference.
    pub static SHARED: Mutex<Option<PoolArc<AskChannel<Logger>>>> = Mutex::new(None);

    /// Whether the entry's question, asked before any service was there, was refused.
    pub static REFUSED_WITHOUT_SERVICE: Mutex<Option<NotAskedReason>> = Mutex::new(None);

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let channel = AskChannel::new(irql, driver, NAME, &SPEC, 4, Logger)?;
        // No service has the channel open at load: not asked, the context comes back.
        if let Err(refused) = channel.ask(&mut *irql, b"q", HOUR, 10) {
            *REFUSED_WITHOUT_SERVICE.lock().unwrap() = Some(refused.reason());
        }
        let channel = PoolArc::try_new(channel, PoolTag::new(b"Test"), &*irql)?;
        *SHARED.lock().unwrap() = Some(PoolArc::clone(&channel));
        Ok(State { channel })
    }
}

#[test]
fn unload_with_the_channel_in_the_driver_state_decides_everything() {
    let machine = Machine::new();
    // Room for the decisions, allocated by the harness (see `new_log`).
    holder::LOG.lock().unwrap().reserve(16);
    let driver = machine.load_driver("holder", holder::DriverEntry).unwrap();
    assert_eq!(
        *holder::REFUSED_WITHOUT_SERVICE.lock().unwrap(),
        Some(NotAskedReason::NoService)
    );
    let service = machine.open_device(PATH, Caller::System).unwrap();
    let channel = holder::SHARED.lock().unwrap().take().unwrap();
    for n in [11, 12] {
        machine
            .at_dispatch(|irql| channel.ask(irql, b"q", HOUR, n))
            .expect("asked");
    }
    drop(channel);
    let (first, second) = (wait_request(&service), wait_request(&service));
    question_of(&first);
    question_of(&second);
    let idle = wait_request(&service);
    machine.unload_driver(driver).unwrap();
    let mut decided: Vec<_> = holder::LOG.lock().unwrap().drain(..).collect();
    decided.sort_by_key(|d| d.0);
    assert_eq!(decided, [(11, Outcome::Closing), (12, Outcome::Closing)]);
    assert_eq!(idle.wait().status, Status::CANCELLED.raw());
    drop(service);
    assert!(machine.pool_blocks().is_empty());
    assert_eq!(machine.pending_io_requests(), 0);
}

#[test]
fn a_leaked_channel_keeps_the_driver_from_unloading() {
    let setup = setup(2);
    let service = setup.open();
    let wait = wait_request(&service);
    setup.ask(b"q", HOUR, 1);
    let Setup {
        machine,
        driver,
        channel,
        ..
    } = setup;
    std::mem::forget(channel);
    // Its device remains, so Windows keeps the driver loaded ("unload pending"), as for any
    // device the driver did not delete; the simulator says so instead of unloading.
    assert!(matches!(
        machine.unload_driver(driver),
        Err(UnloadError::DeviceObjectsRemain { devices: 1, .. })
    ));
    question_of(&wait);
    drop(service);
}

#[test]
fn a_channel_dropped_at_dispatch_level_decides_its_questions() {
    let setup = setup(2);
    let service = setup.open();
    setup.ask(b"q", HOUR, 1);
    let Setup {
        machine,
        driver,
        channel,
        log,
    } = setup;
    machine.at_dispatch(move |_irql| drop(channel));
    assert_eq!(take(&log), [(1, Outcome::Closing)]);
    assert!(
        machine
            .debug_output()
            .iter()
            .any(|line| line.contains("an AskChannel was dropped at DISPATCH_LEVEL")),
        "{:?}",
        machine.debug_output()
    );
    // The device and the timers are leaked: unload reports it.
    drop(service);
    drop(driver);
}

#[test]
fn creation_checks_its_parameters_and_reports_every_allocation_failure() {
    let machine = Machine::new();
    let driver = machine.load_driver("asker", plain::DriverEntry).unwrap();
    let log = new_log();
    let bad = |spec: ChannelSpec, capacity: usize| {
        let recorder = Recorder {
            decisions: Arc::clone(&log),
        };
        driver
            .run_in_driver(&machine, |irql, d| {
                AskChannel::new(irql, d, NAME, &spec, capacity, recorder).map(drop)
            })
            .unwrap()
    };
    assert_eq!(bad(SPEC, 0), Err(Status::INVALID_PARAMETER));
    assert_eq!(
        bad(SPEC, wfp_rs::ask::MAX_CAPACITY + 1),
        Err(Status::INVALID_PARAMETER)
    );
    let same = ChannelSpec {
        answer: SPEC.wait,
        ..SPEC
    };
    assert_eq!(bad(same, 1), Err(Status::INVALID_PARAMETER));
    let neither = ChannelSpec {
        answer: ControlCode::from_raw(SPEC.answer.raw() | 3),
        ..SPEC
    };
    assert_eq!(bad(neither, 1), Err(Status::INVALID_PARAMETER));
    let huge = ChannelSpec {
        max_question: wfp_rs::ask::MAX_BODY + 1,
        ..SPEC
    };
    assert_eq!(bad(huge, 1), Err(Status::INVALID_PARAMETER));
    // Every allocation of a 3-slot channel fails in turn: an error each time, nothing leaks.
    let mut failures = 0;
    for skip in 0..64 {
        machine.fail_allocations(skip, 1);
        let result = bad(SPEC, 3);
        let unused = machine.pending_allocation_failures();
        machine.fail_allocations(0, 0);
        if unused > 0 {
            assert_eq!(result, Ok(()), "no allocation failed at skip {skip}");
            break;
        }
        assert_eq!(result, Err(Status::INSUFFICIENT_RESOURCES), "skip {skip}");
        failures += 1;
    }
    assert!(failures > 6, "only {failures} allocations");
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
    assert!(machine.symbolic_links().is_empty());
}

// --- many processors ----------------------------------------------------------------------------

/// xorshift64: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a service thread saw the driver accept: answers that completed with `STATUS_SUCCESS`
/// (number, verdict), answers that completed with `STATUS_INVALID_PARAMETER`, and statuses that
/// no answer of its kind may get.
#[derive(Default)]
struct Seen {
    accepted: Vec<(u64, u8)>,
    malformed: Vec<u64>,
    violations: Vec<String>,
}

/// One service process: keeps `K` wait requests pending on its handle, answers what it gets
/// (correctly, malformed, twice, first through a foreign handle, or not at all), and now and
/// then is killed (its handle closed) and restarted, until the channel closes.
fn run_service(
    machine: &Machine,
    seed: u64,
    closing: &std::sync::atomic::AtomicBool,
    started: &std::sync::atomic::AtomicUsize,
) -> Seen {
    use std::sync::atomic::Ordering;
    let mut first_start = true;
    const K: usize = 4;
    let mut rng = Rng(seed);
    let mut seen = Seen::default();
    let late_ok =
        |status: i32| status == Status::NOT_FOUND.raw() || status == Status::DELETE_PENDING.raw();
    'restart: loop {
        let Ok(handle) = machine.open_device(PATH, Caller::System) else {
            return seen; // the device is gone: the channel closed
        };
        let Ok(foreign) = machine.open_device(PATH, Caller::System) else {
            return seen;
        };
        if std::mem::take(&mut first_start) {
            started.fetch_add(1, Ordering::SeqCst);
        }
        let mut waits: std::collections::VecDeque<IoRequest> =
            (0..K).map(|_| wait_request(&handle)).collect();
        while let Some(wait) = waits.pop_front() {
            let completion = wait.wait();
            if completion.status != SUCCESS {
                // Cancelled or refused: only closing the channel does that to a live handle.
                if !closing.load(Ordering::SeqCst) {
                    seen.violations.push(format!(
                        "a wait request ended with {:#x} before close",
                        completion.status
                    ));
                }
                return seen;
            }
            let Some((id, body)) = decode_message(&completion.output) else {
                seen.violations.push("a malformed question".into());
                return seen;
            };
            let number = u64::from_le_bytes(body.try_into().unwrap_or_default());
            let verdict = (number % 2) as u8;
            let answer_correctly = |handle: &DeviceHandle, seen: &mut Seen| {
                let status = answer(handle, id, &[verdict]);
                if status == SUCCESS {
                    seen.accepted.push((number, verdict));
                } else if !late_ok(status) {
                    seen.violations
                        .push(format!("answer to {number}: status {status:#x}"));
                }
                status
            };
            match rng.below(100) {
                0..50 => {
                    answer_correctly(&handle, &mut seen);
                }
                50..60 => {
                    let status = answer(&handle, id, &[7]);
                    if status == Status::INVALID_PARAMETER.raw() {
                        seen.malformed.push(number);
                    } else if !late_ok(status) {
                        seen.violations
                            .push(format!("malformed answer to {number}: {status:#x}"));
                    }
                }
                60..66 => {
                    let status = answer(&foreign, id, &[verdict]);
                    if status != Status::ACCESS_DENIED.raw() && !late_ok(status) {
                        seen.violations
                            .push(format!("foreign answer to {number}: {status:#x}"));
                    }
                    answer_correctly(&handle, &mut seen);
                }
                66..72 => {
                    let first = answer_correctly(&handle, &mut seen);
                    let second = answer(&handle, id, &[1 - verdict]);
                    if !late_ok(second)
                        || (first == SUCCESS
                            && second != Status::NOT_FOUND.raw()
                            && second != Status::DELETE_PENDING.raw())
                    {
                        seen.violations
                            .push(format!("duplicate answer to {number}: {second:#x}"));
                    }
                }
                72..80 => {} // never answered: its deadline, a kill or the close decides it
                80..84 => {
                    // Killed: the handles close with this question (and maybe others)
                    // delivered and unanswered, and the service starts again.
                    drop(waits);
                    drop(handle);
                    drop(foreign);
                    continue 'restart;
                }
                _ => {
                    answer_correctly(&handle, &mut seen);
                }
            }
            waits.push_back(wait_request(&handle));
        }
        return seen;
    }
}

#[test]
fn thousands_of_questions_each_get_exactly_one_decision_under_every_race() {
    use std::sync::RwLock;
    use std::sync::atomic::{AtomicBool, Ordering};
    const ASKERS: u64 = 3;
    const PER_ASKER: u64 = 700;
    const SERVICES: u64 = 2;
    const TOTAL: u64 = ASKERS * PER_ASKER;
    let seed: u64 = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xA5C0_0001);
    eprintln!("seed {seed:#x} (set WFP_TEST_SEED to replay)");
    let Setup {
        machine,
        driver,
        channel,
        log,
    } = setup(64);
    let channel = RwLock::new(Some(channel));
    let refused = Mutex::new(Vec::with_capacity(TOTAL as usize));
    let no_service = Mutex::new(Vec::with_capacity(TOTAL as usize));
    let asking_done = AtomicBool::new(false);
    let closing = AtomicBool::new(false);
    let started = std::sync::atomic::AtomicUsize::new(0);
    let (machine, channel, refused, no_service, closing, asking_done, started) = (
        &machine,
        &channel,
        &refused,
        &no_service,
        &closing,
        &asking_done,
        &started,
    );
    let seen: Vec<Seen> = std::thread::scope(|scope| {
        let services: Vec<_> = (0..SERVICES)
            .map(|s| {
                let seed = seed ^ (s + 1).wrapping_mul(0x51_7CC1_B727_220A);
                scope.spawn(move || run_service(machine, seed, closing, started))
            })
            .collect();
        let askers: Vec<_> = (0..ASKERS)
            .map(|a| {
                scope.spawn(move || {
                    // Asking starts once every service has the channel open; later, only a
                    // kill of each at once leaves no service (`NoService`).
                    while started.load(Ordering::SeqCst) < SERVICES as usize {
                        std::thread::yield_now();
                    }
                    let guard = channel.read().unwrap();
                    let channel = guard.as_ref().unwrap();
                    let mut rng = Rng(seed ^ (a + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let mut asked: Vec<QuestionId> = Vec::new();
                    for n in 0..PER_ASKER {
                        let number = a * PER_ASKER + n;
                        let timeout = HOUR + Duration::from_secs(rng.below(3600));
                        let body = number.to_le_bytes();
                        let mut context = number;
                        // A full channel is retried a few times (the services catch up), then
                        // the asker decides by itself.
                        for attempt in 0..4 {
                            let result = if rng.below(2) == 0 {
                                machine
                                    .at_dispatch(|irql| channel.ask(irql, &body, timeout, context))
                            } else {
                                machine
                                    .at_passive(|irql| channel.ask(irql, &body, timeout, context))
                            };
                            match result {
                                Ok(id) => {
                                    asked.push(id);
                                    break;
                                }
                                // Between a kill and the restart no service may have the
                                // channel open: the asker decides at once.
                                Err(not_asked)
                                    if not_asked.reason() == NotAskedReason::NoService =>
                                {
                                    no_service.lock().unwrap().push(not_asked.into_context());
                                    break;
                                }
                                Err(not_asked) if attempt < 3 => {
                                    assert_eq!(not_asked.reason(), NotAskedReason::Full);
                                    context = not_asked.into_context();
                                    // Pacing only: no assertion depends on it.
                                    std::thread::sleep(Duration::from_micros(200));
                                }
                                Err(not_asked) => {
                                    assert_eq!(not_asked.reason(), NotAskedReason::Full);
                                    refused.lock().unwrap().push(not_asked.into_context());
                                }
                            }
                        }
                        if rng.below(100) == 0 {
                            // Deadlines pass while questions are being answered.
                            machine.advance_clock(Duration::from_secs(60 * (30 + rng.below(60))));
                        }
                        if rng.below(12) == 0 && !asked.is_empty() {
                            let id = asked.swap_remove(rng.below(asked.len() as u64) as usize);
                            machine.at_dispatch(|irql| channel.cancel(irql, id));
                        }
                    }
                })
            })
            .collect();
        // Time passes meanwhile: deadlines expire while answers are on their way.
        scope.spawn(move || {
            let mut rng = Rng(seed ^ 0xC10C);
            while !asking_done.load(Ordering::SeqCst) {
                machine.advance_clock(Duration::from_secs(60 * rng.below(6)));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        for asker in askers {
            asker.join().expect("an asker panicked");
        }
        asking_done.store(true, Ordering::SeqCst);
        // Close while the services still run, hold questions and send answers, and while
        // deadlines expire.
        machine.advance_clock(HOUR);
        closing.store(true, Ordering::SeqCst);
        let open = channel.write().unwrap().take().unwrap();
        machine.at_passive(|irql| open.close(irql));
        services
            .into_iter()
            .map(|service| service.join().expect("a service panicked"))
            .collect()
    });
    machine.wait_for_dpcs();
    let decisions = take(&log);
    let refused = std::mem::take(&mut *refused.lock().unwrap());
    let no_service = std::mem::take(&mut *no_service.lock().unwrap());

    // Exactly one decision per question: by the channel, or (when full, or no service had it
    // open) by the asker.
    let mut count = vec![0u32; TOTAL as usize];
    let mut outcome_of = HashMap::new();
    for (number, outcome) in &decisions {
        count[*number as usize] += 1;
        outcome_of.insert(*number, outcome.clone());
    }
    for number in refused.iter().chain(&no_service) {
        count[*number as usize] += 1;
    }
    let wrong: Vec<_> = count
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 1)
        .take(10)
        .collect();
    assert!(
        wrong.is_empty(),
        "decision counts (number, count) {wrong:?}; seed {seed:#x}"
    );

    // What the services saw accepted is what was decided, and nothing else decided with an
    // answer: a foreign, duplicate or late answer decided nothing.
    let violations: Vec<_> = seen.iter().flat_map(|s| s.violations.iter()).collect();
    assert!(violations.is_empty(), "{violations:?}; seed {seed:#x}");
    let accepted: HashMap<u64, u8> = seen
        .iter()
        .flat_map(|s| s.accepted.iter().copied())
        .collect();
    let malformed: std::collections::HashSet<u64> = seen
        .iter()
        .flat_map(|s| s.malformed.iter().copied())
        .collect();
    let mut tally: HashMap<&str, usize> = HashMap::new();
    for (number, outcome) in &outcome_of {
        let kind = match outcome {
            Outcome::Answered(verdict) => {
                assert_eq!(
                    accepted.get(number),
                    Some(verdict),
                    "{number}; seed {seed:#x}"
                );
                "answered"
            }
            Outcome::Malformed => {
                assert!(malformed.contains(number), "{number}; seed {seed:#x}");
                "malformed"
            }
            Outcome::TimedOut => "timed out",
            Outcome::Cancelled => "cancelled",
            Outcome::ServiceGone => "service gone",
            Outcome::Closing => "closing",
        };
        *tally.entry(kind).or_default() += 1;
    }
    assert_eq!(
        accepted.len(),
        tally.get("answered").copied().unwrap_or(0),
        "seed {seed:#x}"
    );
    assert_eq!(
        malformed.len(),
        tally.get("malformed").copied().unwrap_or(0),
        "seed {seed:#x}"
    );
    eprintln!(
        "outcomes {tally:?}, refused (full) {}, refused (no service) {}",
        refused.len(),
        no_service.len()
    );
    // The race reaches every outcome (for this seed; another seed may miss a rare one).
    if std::env::var("WFP_TEST_SEED").is_err() {
        for kind in [
            "answered",
            "malformed",
            "timed out",
            "cancelled",
            "service gone",
        ] {
            assert!(tally.contains_key(kind), "no {kind} in {tally:?}");
        }
        // Not asserted: that the channel filled up. Whether the askers outrun the services
        // depends on the host's scheduling, not on the seed (about 1 run in 30 it never
        // fills); a full channel is covered deterministically by
        // `a_full_channel_and_a_large_question_hand_the_context_back`, and here each refusal
        // that does happen is checked where it happens.
    }

    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
    assert_eq!(machine.pending_io_requests(), 0);
}

// --- the service's side -------------------------------------------------------------------------

/// `wfp_rs::user::AskClient` through the simulator's bridge (what a service process uses): it
/// keeps its requests outstanding, gets each question once, and its answers, refusals and
/// exit reach the driver.
#[cfg(unix)]
#[test]
fn the_service_side_over_the_bridge_answers_and_its_exit_decides_the_rest() {
    use wfp_rs::user::AskClient;

    let setup = setup(16);
    let socket =
        std::env::temp_dir().join(format!("wfp-rs-{}-ask-client.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let bridge = setup.machine.serve_user_mode(&socket).unwrap();
    let client = AskClient::open_at(&socket, PATH, &SPEC, 4).unwrap();
    assert_eq!(
        client
            .next_question(Some(Duration::from_millis(10)))
            .unwrap(),
        None,
        "nothing asked yet"
    );
    // Four questions find the client's requests waiting, six wait for its next ones.
    let ids: Vec<QuestionId> = (0..10u64)
        .map(|n| setup.ask(&[n as u8; 3], HOUR, n))
        .collect();
    let mut received = Vec::new();
    for _ in 0..10 {
        let question = client.next_question(None).unwrap().expect("a question");
        client.answer(question.id, &[question.body[0] % 2]).unwrap();
        received.push(question.id);
    }
    assert_eq!(received, ids, "each question once, oldest first");
    let mut decided = setup.decisions();
    decided.sort_by_key(|d| d.0);
    assert_eq!(
        decided,
        (0..10u64)
            .map(|n| (n, Outcome::Answered((n % 2) as u8)))
            .collect::<Vec<_>>()
    );
    let late = client.answer(ids[0], &[1]).unwrap_err();
    assert_eq!(late.kind(), std::io::ErrorKind::NotFound, "{late}");

    let malformed = setup.ask(b"m", HOUR, 20);
    let question = client.next_question(None).unwrap().unwrap();
    assert_eq!(question.id, malformed);
    let refused = client.answer(question.id, &[9]).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::InvalidInput,
        "{refused}"
    );
    assert_eq!(setup.decisions(), [(20, Outcome::Malformed)]);

    // The service exits holding a question.
    let held = setup.ask(b"h", HOUR, 30);
    assert_eq!(client.next_question(None).unwrap().unwrap().id, held);
    drop(client);
    assert_eq!(setup.decisions(), [(30, Outcome::ServiceGone)]);
    assert_eq!(setup.outstanding(), 0);
    drop(bridge);
    assert!(setup.teardown().is_empty());
}

/// The service's side tells a closed channel from every other refusal: when the driver stops
/// or closes the channel, `AskClient`'s calls fail with an error for which `user::is_closed` is
/// true, and `AskClient::is_closed` says so from then on; a foreign answer is not mistaken for
/// it.
#[cfg(unix)]
#[test]
fn the_service_side_tells_a_closed_channel_from_other_refusals() {
    use wfp_rs::user::{AskClient, is_cancelled, is_closed};

    for closing in ["stop", "close"] {
        let setup = setup(4);
        let socket = std::env::temp_dir().join(format!(
            "wfp-rs-{}-ask-closed-{closing}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&socket);
        let bridge = setup.machine.serve_user_mode(&socket).unwrap();
        let client = AskClient::open_at(&socket, PATH, &SPEC, 3).unwrap();
        let other = AskClient::open_at(&socket, PATH, &SPEC, 1).unwrap();
        let id = setup.ask(b"q", HOUR, 1);
        let question = client.next_question(None).unwrap().expect("a question");
        assert_eq!(question.id, id);
        let foreign = other.answer(id, &[1]).unwrap_err();
        assert_eq!(
            foreign.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{foreign}"
        );
        assert!(!is_closed(&foreign) && !other.is_closed(), "{foreign}");

        let Setup {
            machine,
            driver,
            channel,
            log,
        } = setup;
        // The client's wait requests are pending in the driver when it closes the channel: they
        // end cancelled, and the replacement the client sends is refused.
        let channel = match closing {
            "stop" => {
                machine.at_passive(|irql| channel.stop(irql));
                Some(channel)
            }
            _ => {
                machine.at_passive(|irql| channel.close(irql));
                None
            }
        };
        assert_eq!(take(&log), [(1, Outcome::Closing)]);
        assert!(
            !client.is_closed(),
            "{closing}: nothing told the client yet"
        );
        let error = client.next_question(None).unwrap_err();
        assert!(is_closed(&error), "{closing}: {error}");
        assert!(!is_cancelled(&error), "{closing}: {error}");
        assert_eq!(error.kind(), std::io::ErrorKind::NotConnected);
        assert!(client.is_closed(), "{closing}");
        let again = client.next_question(Some(Duration::ZERO)).unwrap_err();
        assert!(is_closed(&again), "{closing}: it stays closed: {again}");
        let late = other.answer(id, &[1]).unwrap_err();
        assert!(is_closed(&late), "{closing}: {late}");
        assert!(other.is_closed(), "{closing}");
        assert!(
            late.to_string().contains("STATUS_DELETE_PENDING"),
            "{closing}: {late}"
        );

        drop((client, other));
        drop(bridge);
        if let Some(channel) = channel {
            machine.at_passive(|irql| channel.close(irql));
        }
        machine.unload_driver(driver).unwrap();
        assert!(take(&log).is_empty(), "{closing}: decided once");
        assert!(machine.pool_blocks().is_empty());
        assert_eq!(machine.pending_io_requests(), 0);
    }
}

// --- from classifyFn ------------------------------------------------------------------------------

/// The channel as a callout uses it: `classifyFn` pends at ALE_AUTH_CONNECT and asks at
/// DISPATCH_LEVEL, `decide` records the verdict and completes the pend, the reauthorization
/// answers from the record. Connections from several threads, a service answering from its own.
mod classify {
    use super::*;
    use wfp_rs::callout::{Callout, CalloutKey, Classify};
    use wfp_rs::classify::Action;
    use wfp_rs::layer::{self, value::IpProtocol};
    use wfp_rs::metadata::Direction;
    use wfp_rs::pend::{ConnectionKey, PendedClassify, VerdictTable};
    use wfp_rs::{Guid, guid};
    use wfp_rs_sim::{AleIrql, Connection};
    use wfp_rs_tests::install::install;

    const CALLOUT: Guid = guid!("5a000000-0000-0000-0000-000000000001");
    const FILTER: Guid = guid!("5a000000-0000-0000-0000-000000000002");

    /// What the service answers: odd remote ports are allowed; for multiples of 7 it sends
    /// garbage, so the default (block) applies.
    fn expected(port: u16) -> Action {
        if port % 2 == 1 && !port.is_multiple_of(7) {
            Action::Permit
        } else {
            Action::Block
        }
    }

    struct PendDecisions {
        verdicts: Arc<VerdictTable<bool, 1024>>,
    }

    impl QuestionHandler for PendDecisions {
        type Context = (ConnectionKey, PendedClassify);
        type Answer = bool;

        fn decode(&self, answer: &[u8]) -> Option<bool> {
            match answer {
                [0] => Some(false),
                [1] => Some(true),
                _ => None,
            }
        }

        fn decide(
            &self,
            irql: &mut DispatchLevel<'_>,
            (key, pended): (ConnectionKey, PendedClassify),
            outcome: Outcome<bool>,
        ) {
            let allow = outcome.answer().unwrap_or(false);
            self.verdicts.record(&mut *irql, key, allow);
            pended.complete(irql);
        }
    }

    struct ChannelAsker {
        channel: AskChannel<PendDecisions>,
    }

    impl Callout<layer::AleAuthConnectV4> for ChannelAsker {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            let Some(key) = ConnectionKey::of(c) else {
                c.out.block();
                return;
            };
            let verdicts = &self.channel.handler().verdicts;
            if c.is_reauthorization() {
                match verdicts.take(&mut *irql, &key) {
                    Some(true) => {
                        let _ = c.out.permit();
                    }
                    _ => {
                        c.out.block();
                    }
                }
                return;
            }
            let Ok(pended) = c.pend() else {
                c.out.block();
                return;
            };
            let question = key.remote.1.to_le_bytes();
            let asked = self.channel.ask(&mut *irql, &question, HOUR, (key, pended));
            if let Err(not_asked) = asked {
                let (key, pended) = not_asked.into_context();
                verdicts.record(&mut *irql, key, false);
                pended.complete(irql);
            }
        }
    }

    fn connection(port: u16, local_port: u16) -> Connection {
        Connection {
            pid: 2000 + u64::from(local_port),
            app: "\\device\\harddiskvolume1\\app.exe".into(),
            protocol: IpProtocol::Tcp,
            local: format!("10.0.0.1:{local_port}").parse().unwrap(),
            remote: format!("192.0.2.1:{port}").parse().unwrap(),
            direction: Direction::Outbound,
        }
    }

    #[test]
    fn connections_pended_in_classify_are_decided_by_the_service_without_a_work_item() {
        const THREADS: u16 = 6;
        const PER_THREAD: u16 = 40;
        let machine = Machine::new();
        let driver = machine.load_driver("asker", plain::DriverEntry).unwrap();
        let verdicts = Arc::new(VerdictTable::new());
        let handler = PendDecisions {
            verdicts: Arc::clone(&verdicts),
        };
        let channel = driver
            .run_in_driver(&machine, |irql, d| {
                AskChannel::new(irql, d, NAME, &SPEC, 64, handler)
            })
            .unwrap()
            .unwrap();
        let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
            ChannelAsker { channel }
        });
        let service = machine.open_device(PATH, Caller::System).unwrap();
        let wrong = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            let service = &service;
            let answering = scope.spawn(move || {
                let mut waits: std::collections::VecDeque<IoRequest> =
                    (0..8).map(|_| wait_request(service)).collect();
                let mut answered = 0;
                while let Some(wait) = waits.pop_front() {
                    let completion = wait.wait();
                    if completion.status != SUCCESS {
                        break; // the channel closed
                    }
                    let (id, body) = decode_message(&completion.output).unwrap();
                    let port = u16::from_le_bytes(body.try_into().unwrap());
                    let reply = if port.is_multiple_of(7) {
                        9
                    } else {
                        u8::from(port % 2 == 1)
                    };
                    answer(service, id, &[reply]);
                    answered += 1;
                    waits.push_back(wait_request(service));
                }
                answered
            });
            let connecting: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (machine, wrong) = (&machine, &wrong);
                    scope.spawn(move || {
                        for n in 0..PER_THREAD {
                            let port = 1000 + t * PER_THREAD + n;
                            let irql = if n % 2 == 0 {
                                AleIrql::Dispatch
                            } else {
                                AleIrql::Passive
                            };
                            let outcome = machine.connect(&connection(port, 30000 + port), irql);
                            if !outcome.pended || outcome.decision.action != expected(port) {
                                wrong.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    })
                })
                .collect();
            for thread in connecting {
                thread.join().unwrap();
            }
            // Unregistering drops the callout and with it the channel (at PASSIVE_LEVEL): its
            // close ends the service's waiting requests.
            installed.remove(&machine, &driver);
            let answered = answering.join().unwrap();
            assert_eq!(answered, usize::from(THREADS * PER_THREAD));
        });
        assert_eq!(wrong.load(Ordering::SeqCst), 0);
        machine.at_dispatch(|irql| assert!(verdicts.is_empty(irql), "every verdict taken"));
        drop(service);
        assert_eq!(machine.pending_classifications(), 0);
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
        assert_eq!(machine.pending_io_requests(), 0);
    }
}

/// The statuses an answer completes with are Windows' own values (windows-sys as the oracle).
#[test]
fn answer_statuses_are_the_windows_values() {
    use windows_sys::Win32::Foundation as win;
    assert_eq!(Status::NOT_FOUND.raw(), win::STATUS_NOT_FOUND);
    assert_eq!(Status::ACCESS_DENIED.raw(), win::STATUS_ACCESS_DENIED);
    assert_eq!(
        Status::INVALID_PARAMETER.raw(),
        win::STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        Status::INVALID_BUFFER_SIZE.raw(),
        win::STATUS_INVALID_BUFFER_SIZE
    );
    assert_eq!(Status::DELETE_PENDING.raw(), win::STATUS_DELETE_PENDING);
    assert_eq!(
        wfp_rs::status::name_of(Status::NOT_FOUND.raw()),
        Some("STATUS_NOT_FOUND")
    );
}

#[test]
fn stop_decides_everything_now_and_leaves_the_device_until_close() {
    let setup = setup(4);
    let service = setup.open();
    let wait = wait_request(&service);
    let delivered = setup.ask(b"d", HOUR, 1);
    setup.ask(b"q", HOUR, 2);
    question_of(&wait);
    // "q" waits for a request; this one takes it, the next one waits.
    question_of(&wait_request(&service));
    let idle = wait_request(&service);
    setup.machine.at_passive(|irql| setup.channel.stop(irql));
    assert_eq!(idle.wait().status, Status::CANCELLED.raw());
    let mut decided = setup.decisions();
    decided.sort_by_key(|d| d.0);
    assert_eq!(decided, [(1, Outcome::Closing), (2, Outcome::Closing)]);
    assert_eq!(setup.outstanding(), 0);
    let refused = setup
        .machine
        .at_dispatch(|irql| setup.channel.ask(irql, b"late", HOUR, 3))
        .unwrap_err();
    assert_eq!(refused.reason(), NotAskedReason::Closed);
    assert_eq!(refused.into_context(), 3);
    assert_eq!(
        answer(&service, delivered, &[1]),
        Status::DELETE_PENDING.raw()
    );
    assert_eq!(
        wait_request(&service).wait().status,
        Status::DELETE_PENDING.raw(),
        "requests are refused as after close"
    );
    assert!(
        setup
            .machine
            .symbolic_links()
            .iter()
            .any(|(link, _)| link.contains(NAME)),
        "the device stays until close: {:?}",
        setup.machine.symbolic_links()
    );
    setup.machine.advance_clock(2 * HOUR);
    setup.machine.wait_for_dpcs();
    assert!(setup.teardown().is_empty(), "nothing decided twice");
    drop(service);
}

/// 1024 questions outstanding at once (the firewall's bound), all delivered and answered.
#[test]
fn a_thousand_and_twenty_four_questions_in_flight() {
    const N: u64 = 1024;
    let setup = setup(N as usize);
    let service = setup.open();
    for n in 0..N {
        setup.ask(&n.to_le_bytes(), HOUR, n);
    }
    let full = setup
        .machine
        .at_dispatch(|irql| setup.channel.ask(irql, b"one more", HOUR, N))
        .unwrap_err();
    assert_eq!(full.reason(), NotAskedReason::Full);
    assert_eq!(setup.outstanding(), N as usize);
    let mut waits: std::collections::VecDeque<IoRequest> =
        (0..64).map(|_| wait_request(&service)).collect();
    for n in 0..N {
        let wait = waits.pop_front().unwrap();
        let (id, body) = question_of(&wait);
        assert_eq!(body, n.to_le_bytes(), "oldest first");
        assert_eq!(answer(&service, id, &[(n % 2) as u8]), SUCCESS);
        waits.push_back(wait_request(&service));
    }
    let decided = setup.decisions();
    assert_eq!(decided.len(), N as usize);
    assert!(
        decided
            .iter()
            .all(|(n, outcome)| *outcome == Outcome::Answered((n % 2) as u8))
    );
    drop(waits);
    drop(service);
    assert!(setup.teardown().is_empty());
}

// --- what a careless driver author writes -------------------------------------------------------

/// A handler whose `decide` takes a spin lock of the driver's (as a verdict cache does).
struct Counts {
    cache: wfp_rs::spin_lock::SpinLock<u32>,
}

impl QuestionHandler for Counts {
    type Context = ();
    type Answer = u8;

    fn decode(&self, answer: &[u8]) -> Option<u8> {
        answer.first().copied()
    }

    fn decide(&self, irql: &mut DispatchLevel<'_>, _context: (), _outcome: Outcome<u8>) {
        self.cache.lock(&mut *irql, |decided, _| *decided += 1);
    }
}

fn counts_channel(machine: &Machine, driver: &LoadedDriver) -> AskChannel<Counts> {
    let counts = Counts {
        cache: wfp_rs::spin_lock::SpinLock::new(0),
    };
    driver
        .run_in_driver(machine, |irql, d| {
            AskChannel::new(irql, d, NAME, &SPEC, 2, counts)
        })
        .expect("an SDK driver")
        .expect("the channel is created")
}

wfp_rs_sim::bugcheck_test! {
    /// `cancel` runs `decide` in the caller's thread: cancelling under the lock `decide` takes
    /// is a recursive acquisition, which the simulator (Driver Verifier) stops instead of
    /// spinning forever.
    fn cancelling_under_a_lock_that_decide_takes_stops() expects DRIVER_VERIFIER_DETECTED_VIOLATION (wfp_rs::bugcheck::verifier::DEADLOCK_SELF) {
        let machine = Machine::new();
        let driver = machine.load_driver("asker", plain::DriverEntry).unwrap();
        let channel = counts_channel(&machine, &driver);
        let _service = machine.open_device(PATH, Caller::System).unwrap();
        let id = machine
            .at_dispatch(|irql| channel.ask(irql, b"q", HOUR, ()))
            .expect("asked");
        machine.at_dispatch(|irql| {
            channel.handler().cache.lock(irql, |_, irql| channel.cancel(irql, id))
        });
    }
}

/// A channel kept in a `static`, never closed: its device outlives the driver's unload, so
/// Windows leaves the driver "unload pending" and the simulator refuses the unload, saying why,
/// as for `mem::forget`.
#[test]
fn a_channel_in_a_static_never_closed_keeps_the_driver_from_unloading() {
    static CHANNEL: std::sync::OnceLock<AskChannel<Counts>> = std::sync::OnceLock::new();
    let machine = Machine::new();
    let driver = machine.load_driver("asker", plain::DriverEntry).unwrap();
    let channel = CHANNEL.get_or_init(|| counts_channel(&machine, &driver));
    let _service = machine.open_device(PATH, Caller::System).unwrap();
    machine
        .at_dispatch(|irql| channel.ask(irql, b"q", HOUR, ()))
        .expect("asked");
    assert!(matches!(
        machine.unload_driver(driver),
        Err(UnloadError::DeviceObjectsRemain { devices: 1, .. })
    ));
}
