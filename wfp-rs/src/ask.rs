//! The question channel: ask a user-mode service from `classifyFn`, at `DISPATCH_LEVEL`, without
//! a work item and without blocking a thread, and get exactly one decision per question.
//!
//! An [`AskChannel`] is an [inverted call](crate::inverted) with a way back. The service keeps
//! a few requests with the channel's *wait* code pending on the channel's device; the driver
//! [`ask`](AskChannel::ask)s a question (copying its bytes and the driver's per-question
//! context into a slot allocated at creation), and the channel hands it to a waiting request at
//! once, or to the next one that arrives. The service answers with a request with the *answer*
//! code, in its own thread; the channel checks the answer (size, id, the handle it came
//! through, and the driver's own [`decode`](QuestionHandler::decode)) and calls the driver's
//! [`decide`](QuestionHandler::decide) with the context and the [`Outcome`]. A kernel timer per
//! slot enforces the question's deadline. With no service at all — no handle open on the
//! device — `ask` does not wait for a deadline nobody could beat: it refuses with
//! [`NotAskedReason::NoService`] and hands the context back, for the driver's default now.
//!
//! ```
//! use core::time::Duration;
//! use std::sync::Mutex;
//! use wfp_rs::ask::{AskChannel, ChannelSpec, Outcome, QuestionHandler};
//! use wfp_rs::inverted::{ControlCode, RequiredAccess};
//! use wfp_rs::irql::DispatchLevel;
//!
//! /// Both sides share this, in a protocol crate.
//! const SPEC: ChannelSpec = ChannelSpec {
//!     wait: ControlCode::buffered(0x8000, 0x810, RequiredAccess::Any),
//!     answer: ControlCode::buffered(0x8000, 0x811, RequiredAccess::Any),
//!     max_question: 64,
//!     max_answer: 1,
//! };
//!
//! /// Decides connections: the context is the connection's number (a real driver keeps its
//! /// `PendedClassify` there), the answer one byte, 1 = allow.
//! struct Verdicts(Mutex<Vec<(u32, bool)>>);
//!
//! impl QuestionHandler for Verdicts {
//!     type Context = u32;
//!     type Answer = bool;
//!
//!     fn decode(&self, answer: &[u8]) -> Option<bool> {
//!         match answer {
//!             [0] => Some(false),
//!             [1] => Some(true),
//!             _ => None, // malformed: the driver's default applies
//!         }
//!     }
//!
//!     fn decide(&self, _irql: &mut DispatchLevel<'_>, connection: u32, outcome: Outcome<bool>) {
//!         // Exactly once per question, whatever came first: the answer, the deadline, the
//!         // service going away, a cancel, or closing the channel.
//!         let allow = outcome.answer().unwrap_or(false); // fail closed
//!         self.0.lock().unwrap().push((connection, allow));
//!     }
//! }
//!
//! fn on_connect(irql: &mut DispatchLevel<'_>, channel: &AskChannel<Verdicts>, connection: u32) {
//!     if let Err(not_asked) = channel.ask(&mut *irql, b"may pid 42 connect?", Duration::from_secs(5), connection) {
//!         // Full, no service, or closed: the context comes back; decide at once.
//!         let _connection: u32 = not_asked.into_context();
//!     }
//! }
//! # let machine = wfp_rs_sim::Machine::new();
//! # let driver = machine.load_driver("doc", minimal::DriverEntry).unwrap();
//! # let channel = driver.run_in_driver(&machine, |irql, d| {
//! #     AskChannel::new(irql, d, "WfpRsDocAsk", &SPEC, 16, Verdicts(Mutex::new(Vec::new())))
//! # }).unwrap().unwrap();
//! # let service = machine.open_device(r"\\.\WfpRsDocAsk", wfp_rs_sim::Caller::System).unwrap();
//! # let wait = service.device_io_control(SPEC.wait.raw(), &[], SPEC.wait_output_len());
//! # machine.at_dispatch(|irql| on_connect(irql, &channel, 7));
//! # let question = wait.wait().output;
//! # let (id, body) = wfp_rs::ask::decode_message(&question).unwrap();
//! # assert_eq!(body, b"may pid 42 connect?");
//! # let mut answer = wfp_rs::ask::encode_header(id, 1).to_vec();
//! # answer.push(1);
//! # assert_eq!(service.device_io_control(SPEC.answer.raw(), &answer, 0).wait().status, 0);
//! # assert_eq!(*channel.handler().0.lock().unwrap(), [(7, true)]);
//! # drop(service);
//! # machine.at_passive(|irql| channel.close(irql));
//! # machine.unload_driver(driver).unwrap();
//! # mod minimal {
//! #     #[wfp_rs::driver_entry]
//! #     fn entry(
//! #         _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
//! #         _driver: &mut wfp_rs::driver::Driver<'_>,
//! #     ) -> Result<(), wfp_rs::Status> {
//! #         Ok(())
//! #     }
//! # }
//! ```
//!
//! # Exactly one decision
//!
//! Each question has a slot whose phase changes only under the channel's spin lock: free, queued
//! (waiting for a request), or delivered (to the handle whose request carried it). Whoever moves
//! the slot back to free — the answer, the deadline's DPC, [`AskChannel::cancel`], the service's
//! handle closing, or [`AskChannel::close`] — takes the context out and calls `decide`, after
//! releasing the lock; everyone else finds the slot free (or reused under a new id) and does
//! nothing. The [`Outcome`]s:
//!
//! | what came first | outcome | the answer request completes with |
//! |---|---|---|
//! | an answer that decodes, from the handle the question was delivered to | `Answered(a)` | `STATUS_SUCCESS` |
//! | an answer from that handle that does not (a header whose length field disagrees with the request's size, a body over `max_answer`, or `decode` refusing it) | `Malformed` | `STATUS_INVALID_PARAMETER` |
//! | the deadline | `TimedOut` | — |
//! | the driver's [`cancel`](AskChannel::cancel) | `Cancelled` | — |
//! | the handle the question was delivered to closed (the service exited or was killed), or the last handle closed while it was still queued | `ServiceGone` | — |
//! | [`close`](AskChannel::close), or unload with the channel in the driver state | `Closing` | — |
//!
//! An answer that decides nothing completes with a status the service can log: shorter than the
//! 8-byte id, `STATUS_INVALID_BUFFER_SIZE`; an id no delivered question has (never asked, not
//! delivered yet, or already decided: a duplicate or late answer, whose question got its one
//! decision already), `STATUS_NOT_FOUND`; a question delivered to *another* handle (a foreign
//! answer), `STATUS_ACCESS_DENIED` — the question is not decided by it, and keeps waiting for its
//! own handle's answer or its deadline (a process that may open the device still cannot decide
//! questions asked of another); the channel closing, `STATUS_DELETE_PENDING`.
//!
//! Ids are 64-bit: the slot's index and a generation counted per slot, so an answer for an
//! earlier question of a reused slot never matches.
//!
//! When the handle a question was delivered to closes before it answered, the question is
//! decided at once with `ServiceGone` rather than asked again: the service may have acted on it
//! half-way, a question that crashes the service would crash every restart, and the driver's
//! default is what the service's absence means anyway. Questions not delivered yet stay queued
//! for the next request, whichever handle sends it, as long as a handle is open (a service
//! restarting with its new instance's handle open first loses none); when the last handle
//! closes they are decided at once with `ServiceGone` too, not at their deadlines.
//!
//! # No service
//!
//! The channel counts the handles open on its device: an `IRP_MJ_CREATE` it completed (after
//! the driver's client check, [`Driver::admit_only`](crate::driver::Driver::admit_only)) until
//! that file object's `IRP_MJ_CLEANUP`. While none is open, [`ask`](AskChannel::ask) refuses
//! with [`NotAskedReason::NoService`] — no slot taken, no timer set, no `decide` — so a driver
//! whose service is not running yet (at boot) or exited applies its default in `classifyFn`
//! instead of pending every connection until its deadline. A service that has the device open
//! but sends no request yet (busy, starting its readers) is asked: its questions wait in the
//! queue. (INFERRED: Windows sends one cleanup for every file object whose create succeeded,
//! also when the open fails later in the I/O manager; if one did not come, the count would stay
//! up and questions would wait for their deadlines, as before this rule.)
//!
//! # Where `decide` runs
//!
//! `decide` receives a `&mut DispatchLevel` and may run at `DISPATCH_LEVEL`: in the deadline's
//! DPC, in the service's thread (the answer, at `PASSIVE_LEVEL`), in the thread closing the
//! handle, in the caller of `cancel`, or in `close`. It may complete a pended classification,
//! record a verdict, take spin locks; it must not wait. It never runs under the channel's lock,
//! so it may call [`ask`](AskChannel::ask) or [`cancel`](AskChannel::cancel) itself. Nor does
//! the completion of the request that carries a question (`IofCompleteRequest`): the question
//! is written into the request and marked delivered under the lock, and the request completes
//! after it is released.
//!
//! # Memory
//!
//! [`AskChannel::new`] (at `PASSIVE_LEVEL`) allocates everything: `capacity` slots, a
//! `max_question`-byte buffer per slot and a timer (`KTIMER` + `KDPC`) per slot, in non-paged
//! pool. [`ask`](AskChannel::ask) allocates nothing: it copies the question into its slot and
//! keeps the context there. When every slot is taken, `ask` fails with [`NotAskedReason::Full`]
//! and hands the context back.
//!
//! # The wire
//!
//! A question, as the service's wait request receives it, and an answer, as the service sends
//! it, are both a 16-byte header ([`encode_header`]) and a body: the id (`u64`, little-endian),
//! the body's length (`u32`, little-endian, equal to what follows the header) and a reserved
//! `u32` that must be 0. [`decode_message`] checks a header. The service's side is
//! `wfp_rs::user::AskClient` (feature `user`).
//!
//! # Teardown
//!
//! [`AskChannel::close`], or dropping the channel at `PASSIVE_LEVEL` (keep it in the driver
//! state and unload does it), refuses new questions, closes the device (waiting requests complete
//! with `STATUS_CANCELLED`, new ones fail with `STATUS_DELETE_PENDING`, answers being processed
//! finish), decides every question still outstanding with `Closing`, and shuts the timers down.
//! It waits for no user-mode thread: only for the dispatch calls already inside the driver and
//! for DPCs already queued. [`AskChannel::stop`] does the same through a shared reference (from
//! `DriverState::stopping`, say) except deleting the device and shutting the timers down, which
//! it leaves to `close`: the service sees what `close` shows it. Dropped above `PASSIVE_LEVEL`, the channel decides the outstanding
//! questions and cancels the timers, but the device and the memory are leaked, as for
//! [`InvertedQueue`] (a device left behind keeps the driver from unloading: Windows leaves it
//! "unload pending", the simulator's `unload_driver` says `DeviceObjectsRemain`).
//!
//! On Windows the unload routine runs only once no handle to the driver's devices is open and
//! no request to them is outstanding (documented: "Unload Routine Environment"), so a service
//! with the channel open keeps the driver from unloading — `sc stop` leaves it `STOP_PENDING`
//! and the driver is not told — until the service closes its handle: stop the service before the
//! driver (make it depend on the driver). `close` from the unload routine then finds no service;
//! `close` or `stop` at another time (the driver reconfiguring itself) is where the service sees
//! the channel close. The simulator does not enforce that order yet (docs/simulator.md, "Known
//! limits"): its `unload_driver` runs the unload routine with a service's handle open.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::time::Duration;

use crate::dispatch::Request;
use crate::driver::Driver;
use crate::inverted::{ControlCode, InvertedQueue, QueueHooks, Taken, Waiters};
use crate::irql::{DispatchLevel, Irql, PassiveLevel, RaiseIrql, Token};
use crate::pool::{PoolArc, PoolTag, try_box};
use crate::spin_lock::SpinLock;
use crate::status::Status;
use crate::sys;
use crate::time::Instant;
use crate::timer::Timer;

/// The size of the header before a question's or an answer's body.
pub const HEADER_LEN: usize = 16;

/// The most slots a channel can have.
pub const MAX_CAPACITY: usize = 1 << 16;

/// The largest `max_question` and `max_answer` a channel accepts (64 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// `STATUS_SUCCESS`.
const SUCCESS: sys::NTSTATUS = 0;

/// The identity of one question: its slot and the slot's generation. Unique among the questions
/// a channel asked recently; an id of a question that was decided never matches again until its
/// slot's 32-bit generation counter wraps around.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuestionId(u64);

impl QuestionId {
    fn new(slot: usize, generation: u32) -> QuestionId {
        QuestionId((u64::from(generation) << 32) | slot as u64)
    }

    /// An id from its wire value.
    ///
    /// ```
    /// let id = wfp_rs::ask::QuestionId::from_raw(0x1_0000_0002);
    /// assert_eq!(id.raw(), 0x1_0000_0002);
    /// ```
    pub const fn from_raw(raw: u64) -> QuestionId {
        QuestionId(raw)
    }

    /// The wire value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    fn slot(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Debug for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuestionId({:#x})", self.0)
    }
}

/// What the driver and its service agree on: the two control codes of the channel's device and
/// the largest question and answer bodies. Define it once, as a `const` in a crate both sides
/// share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    /// The code of the requests the service leaves pending for questions (output buffer at
    /// least [`wait_output_len`](Self::wait_output_len) bytes).
    pub wait: ControlCode,
    /// The code of the requests that carry answers (input buffer: header and body).
    pub answer: ControlCode,
    /// The largest question body, in bytes.
    pub max_question: usize,
    /// The largest answer body, in bytes.
    pub max_answer: usize,
}

impl ChannelSpec {
    /// The output buffer a wait request needs: the header and the largest question.
    ///
    /// ```
    /// # use wfp_rs::ask::ChannelSpec;
    /// # use wfp_rs::inverted::{ControlCode, RequiredAccess};
    /// const SPEC: ChannelSpec = ChannelSpec {
    ///     wait: ControlCode::buffered(0x8000, 0x810, RequiredAccess::Any),
    ///     answer: ControlCode::buffered(0x8000, 0x811, RequiredAccess::Any),
    ///     max_question: 100,
    ///     max_answer: 8,
    /// };
    /// assert_eq!(SPEC.wait_output_len(), 116);
    /// ```
    pub const fn wait_output_len(&self) -> usize {
        HEADER_LEN + self.max_question
    }
}

/// The header of a question or an answer whose body is `body_len` bytes long: the id, the
/// length, and a reserved zero.
///
/// ```
/// use wfp_rs::ask::{QuestionId, decode_message, encode_header};
/// let id = QuestionId::from_raw(7);
/// let mut message = encode_header(id, 2).to_vec();
/// message.extend_from_slice(b"ok");
/// assert_eq!(decode_message(&message), Some((id, &b"ok"[..])));
/// ```
pub fn encode_header(id: QuestionId, body_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&id.raw().to_le_bytes());
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header
}

/// Splits a question or an answer into its id and its body; `None` if it is shorter than the
/// header, its length field is not the length of what follows, or the reserved field is not 0.
///
/// ```
/// use wfp_rs::ask::{QuestionId, decode_message, encode_header};
/// let header = encode_header(QuestionId::from_raw(7), 3);
/// assert_eq!(decode_message(&header), None, "the header promises 3 bytes");
/// assert_eq!(decode_message(&header[..15]), None, "cut short");
/// ```
pub fn decode_message(message: &[u8]) -> Option<(QuestionId, &[u8])> {
    let (header, body) = message.split_at_checked(HEADER_LEN)?;
    let id = u64::from_le_bytes(header[..8].try_into().ok()?);
    let len = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let reserved = u32::from_le_bytes(header[12..16].try_into().ok()?);
    if reserved != 0 || usize::try_from(len).ok()? != body.len() {
        return None;
    }
    Some((QuestionId(id), body))
}

/// How a question was decided. [`QuestionHandler::decide`] receives exactly one per question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<A> {
    /// The service answered, through the handle the question was delivered to, and the answer
    /// decoded.
    Answered(A),
    /// The service answered through that handle, but the answer did not pass the checks (its
    /// header, its size, or [`QuestionHandler::decode`]). Apply the default.
    Malformed,
    /// The deadline passed first. Apply the default.
    TimedOut,
    /// The driver withdrew it with [`AskChannel::cancel`].
    Cancelled,
    /// The handle the question was delivered to was closed before it answered (the service
    /// exited, was killed, or closed it), or the last handle open on the channel closed while
    /// the question still waited for a request. Apply the default.
    ServiceGone,
    /// The channel was closed (or the driver unloads) first. Apply the default.
    Closing,
}

impl<A> Outcome<A> {
    /// The answer, for [`Outcome::Answered`]; `None` for every outcome that means "apply the
    /// default".
    ///
    /// ```
    /// use wfp_rs::ask::Outcome;
    /// assert_eq!(Outcome::Answered(true).answer(), Some(true));
    /// assert_eq!(Outcome::<bool>::TimedOut.answer(), None);
    /// ```
    pub fn answer(self) -> Option<A> {
        match self {
            Outcome::Answered(answer) => Some(answer),
            _ => None,
        }
    }
}

/// The driver's side of a channel: how answers decode, and what a decision does.
pub trait QuestionHandler: Send + Sync + 'static {
    /// What the driver keeps per question until it is decided (a `PendedClassify` and the
    /// connection's key, say). It travels with the question and comes back to
    /// [`decide`](Self::decide), or to the caller of [`AskChannel::ask`] if the question could
    /// not be asked.
    type Context: Send + 'static;

    /// An answer, decoded and validated.
    type Answer;

    /// Decodes and validates an answer's body (at most `max_answer` bytes; the header is
    /// checked already). `None` refuses it: the question is decided with
    /// [`Outcome::Malformed`]. The body is untrusted input from user mode. Runs at
    /// `PASSIVE_LEVEL` in the service's thread, before the channel knows whether the answer
    /// decides anything (it runs for late and foreign answers too), so it has no side effects.
    fn decode(&self, answer: &[u8]) -> Option<Self::Answer>;

    /// Acts on a decision: called exactly once per question asked, with its context. May run
    /// at `DISPATCH_LEVEL` (see the [module documentation](self#where-decide-runs)).
    fn decide(
        &self,
        irql: &mut DispatchLevel<'_>,
        context: Self::Context,
        outcome: Outcome<Self::Answer>,
    );
}

/// Why [`AskChannel::ask`] did not ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAskedReason {
    /// Every slot holds a question that is not decided yet.
    Full,
    /// The question is longer than the channel's `max_question`. Checked before everything
    /// else: it is a property of the question, not of the moment, so a driver that sends long
    /// questions another way (the example firewall asks them through its port) learns it even
    /// when no service has the channel open.
    TooLarge {
        /// The question's length.
        len: usize,
        /// The channel's `max_question`.
        max: usize,
    },
    /// The channel is closing.
    Closed,
    /// No service has the channel's device open: no handle is open on it (the service is not
    /// running yet, or it exited), so nobody could answer before the deadline. Apply the
    /// driver's "no service" default now.
    NoService,
}

/// A question [`AskChannel::ask`] did not ask, with the context handed back.
pub struct NotAsked<C> {
    reason: NotAskedReason,
    context: C,
}

impl<C> NotAsked<C> {
    /// Why it was not asked.
    pub fn reason(&self) -> NotAskedReason {
        self.reason
    }

    /// The context, unchanged, so the driver can decide at once.
    ///
    /// See [`AskChannel::ask`] for an example.
    pub fn into_context(self) -> C {
        self.context
    }
}

impl<C> fmt::Debug for NotAsked<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotAsked")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl<C> fmt::Display for NotAsked<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            NotAskedReason::Full => f.write_str("every slot of the question channel is taken"),
            NotAskedReason::TooLarge { len, max } => write!(
                f,
                "a {len}-byte question is larger than the channel's maximum of {max} bytes"
            ),
            NotAskedReason::Closed => f.write_str("the question channel is closing"),
            NotAskedReason::NoService => f.write_str("no service has the question channel open"),
        }
    }
}

impl<C> core::error::Error for NotAsked<C> {}

/// A question channel on a named device only Administrators and SYSTEM can open. See the
/// [module documentation](self).
pub struct AskChannel<Q: QuestionHandler> {
    /// Closed before `inner` goes: the device's hooks point into `inner`.
    queue: ManuallyDrop<InvertedQueue>,
    inner: ManuallyDrop<PoolArc<Inner<Q>>>,
}

impl<Q: QuestionHandler> AskChannel<Q> {
    /// Creates the device `\Device\<name>` (user mode opens `\\.\<name>`), secured and
    /// dispatched like an [`InvertedQueue`]'s, with `capacity` question slots and their timers.
    /// Wraps what [`InvertedQueue::new`] wraps, plus `KeInitializeTimerEx` and
    /// `KeInitializeDpc` per slot.
    ///
    /// Errors: `STATUS_INVALID_PARAMETER` for a `capacity` of 0 or over [`MAX_CAPACITY`], a
    /// `max_question` or `max_answer` over [`MAX_BODY`], codes that are not `METHOD_BUFFERED`
    /// or are equal; `STATUS_INSUFFICIENT_RESOURCES` when non-paged pool runs out; otherwise
    /// what [`InvertedQueue::new`] returns. The handler is dropped on failure.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, ChannelSpec, QuestionHandler};
    /// # use wfp_rs::{Status, driver::Driver, irql::PassiveLevel};
    /// fn create<Q: QuestionHandler>(
    ///     irql: &mut PassiveLevel<'_>,
    ///     driver: &Driver<'_>,
    ///     spec: &ChannelSpec,
    ///     handler: Q,
    /// ) -> Result<AskChannel<Q>, Status> {
    ///     // \\.\WfpRsAsk for the service; 1024 questions in flight at most.
    ///     AskChannel::new(irql, driver, "WfpRsAsk", spec, 1024, handler)
    /// }
    /// ```
    pub fn new(
        irql: &mut PassiveLevel<'_>,
        driver: &Driver<'_>,
        name: &str,
        spec: &ChannelSpec,
        capacity: usize,
        handler: Q,
    ) -> Result<AskChannel<Q>, Status> {
        crate::irql::verify(irql);
        if capacity == 0
            || capacity > MAX_CAPACITY
            || spec.max_question > MAX_BODY
            || spec.max_answer > MAX_BODY
            || spec.wait.method() != sys::METHOD_BUFFERED
            || spec.answer.method() != sys::METHOD_BUFFERED
            || spec.wait == spec.answer
        {
            return Err(Status::INVALID_PARAMETER);
        }
        let state = State::try_new(capacity, spec.max_question)?;
        let inner = Inner {
            state: SpinLock::new(state),
            handler,
            capacity,
            max_question: spec.max_question,
            max_answer: spec.max_answer,
            answer_code: spec.answer.raw(),
        };
        let inner = PoolArc::try_new(inner, PoolTag::SDK, irql).map_err(Status::from)?;
        if let Err(status) = arm_timers(irql, &inner, capacity) {
            inner.shut_down_timers(irql);
            return Err(status);
        }
        let hooks: NonNull<dyn QueueHooks> = NonNull::from(&*inner);
        // SAFETY: the hooks live in `inner`, which this channel keeps until after it has closed
        // the queue (`shut_down`), or leaks (`abandon`); on failure the queue is closed before
        // `with_hooks` returns.
        let queue = unsafe {
            InvertedQueue::with_hooks(
                &*irql,
                driver,
                name,
                spec.wait,
                spec.wait_output_len(),
                Some(hooks),
            )
        };
        match queue {
            Ok(queue) => Ok(AskChannel {
                queue: ManuallyDrop::new(queue),
                inner: ManuallyDrop::new(inner),
            }),
            Err(status) => {
                inner.shut_down_timers(irql);
                Err(status)
            }
        }
    }

    fn inner(&self) -> &Inner<Q> {
        &self.inner
    }

    /// The handler, for the driver's own use (the state it shares with its decisions).
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// fn handler_of<Q: QuestionHandler>(channel: &AskChannel<Q>) -> &Q {
    ///     channel.handler()
    /// }
    /// ```
    pub fn handler(&self) -> &Q {
        &self.inner().handler
    }

    /// How many slots the channel has.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// fn describe<Q: QuestionHandler>(channel: &AskChannel<Q>) -> (usize, usize) {
    ///     (channel.capacity(), channel.max_question())
    /// }
    /// ```
    pub fn capacity(&self) -> usize {
        self.inner().capacity
    }

    /// The largest question body it takes.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// fn fits<Q: QuestionHandler>(channel: &AskChannel<Q>, question: &[u8]) -> bool {
    ///     question.len() <= channel.max_question()
    /// }
    /// ```
    pub fn max_question(&self) -> usize {
        self.inner().max_question
    }

    /// Asks `question`, to be decided within `timeout`, keeping `context` until then. Allowed
    /// at `DISPATCH_LEVEL`; allocates nothing. If a request of the service waits, the question
    /// is delivered to it before this returns; otherwise it waits for the next request. The
    /// deadline's timer is set before the question can be delivered.
    ///
    /// Takes the channel's spin lock (hence the exclusive borrow of the caller's token). Fails,
    /// handing the context back, when the question is larger than `max_question`, the channel
    /// is closing, no handle is open on the channel's device ([`NotAskedReason::NoService`]:
    /// nobody could answer, so the driver's default should apply now rather than at the
    /// deadline), or every slot is taken.
    ///
    /// ```
    /// # use core::time::Duration;
    /// # use wfp_rs::ask::{AskChannel, NotAskedReason, QuestionHandler};
    /// # use wfp_rs::irql::DispatchLevel;
    /// fn ask_or_default<Q: QuestionHandler<Context = u32>>(
    ///     irql: &mut DispatchLevel<'_>,
    ///     channel: &AskChannel<Q>,
    ///     connection: u32,
    /// ) -> bool {
    ///     match channel.ask(&mut *irql, b"pid 42", Duration::from_secs(5), connection) {
    ///         Ok(_id) => true, // `decide` will run for it, exactly once
    ///         Err(not_asked) => {
    ///             // Full, TooLarge, Closed or NoService: the default, now.
    ///             let _no_service = not_asked.reason() == NotAskedReason::NoService;
    ///             let _connection = not_asked.into_context(); // decide it here
    ///             false
    ///         }
    ///     }
    /// }
    /// ```
    pub fn ask(
        &self,
        irql: impl RaiseIrql,
        question: &[u8],
        timeout: Duration,
        context: Q::Context,
    ) -> Result<QuestionId, NotAsked<Q::Context>> {
        crate::irql::verify(&irql);
        let inner = self.inner();
        if question.len() > inner.max_question {
            return Err(NotAsked {
                reason: NotAskedReason::TooLarge {
                    len: question.len(),
                    max: inner.max_question,
                },
                context,
            });
        }
        let waiters = self.queue.waiters();
        let asked = inner.state.lock(irql, |state, dispatch| {
            let reason = if state.closed {
                NotAskedReason::Closed
            } else if state.handles == 0 {
                NotAskedReason::NoService
            } else if let Some(index) = state.take_free() {
                let start = index * inner.max_question;
                if let Some(buffer) = state.questions.get_mut(start..start + question.len()) {
                    buffer.copy_from_slice(question);
                }
                let deadline = Instant::now().saturating_add(timeout);
                let slot = &mut state.slots[index];
                slot.generation = match slot.generation.wrapping_add(1) {
                    0 => 1,
                    next => next,
                };
                slot.context = Some(context);
                slot.deadline = deadline;
                slot.len = question.len();
                let id = QuestionId::new(index, slot.generation);
                if let Some(Some(timer)) = state.timers.get(index) {
                    timer.set(&*dispatch, timeout, None);
                }
                state.push_queued(index);
                state.outstanding += 1;
                return Ok((id, inner.deliver_one(state, waiters)));
            } else {
                NotAskedReason::Full
            };
            Err(NotAsked { reason, context })
        });
        // The request that carries the question (if one waited) completes now, outside the
        // channel's lock.
        asked.map(|(id, delivery)| {
            drop(delivery);
            id
        })
    }

    /// Withdraws a question that is not decided yet: `decide` runs with
    /// [`Outcome::Cancelled`] before this returns, in this thread. Returns false (and does
    /// nothing) if the question was decided already. Allowed at `DISPATCH_LEVEL`; do not hold
    /// a lock that `decide` takes.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler, QuestionId};
    /// # use wfp_rs::irql::DispatchLevel;
    /// /// The connection went away before its answer came.
    /// fn withdraw<Q: QuestionHandler>(irql: &mut DispatchLevel<'_>, channel: &AskChannel<Q>, id: QuestionId) {
    ///     if !channel.cancel(&mut *irql, id) {
    ///         // Decided already (answered, timed out, ...): `decide` ran for it then.
    ///     }
    /// }
    /// ```
    pub fn cancel(&self, mut irql: impl RaiseIrql, id: QuestionId) -> bool {
        crate::irql::verify(&irql);
        let inner = self.inner();
        let context = inner.state.lock(irql.reborrow(), |state, dispatch| {
            let index = state.live(id)?;
            state.release(index, dispatch)
        });
        match context {
            Some(context) => {
                // SAFETY: the caller's token is exclusively borrowed (`irql`, alive until the
                // end of this function) while this one is used, and the IRQL is at most
                // DISPATCH_LEVEL (the caller's token proves it).
                let mut token = unsafe { DispatchLevel::new_unchecked() };
                inner
                    .handler
                    .decide(&mut token, context, Outcome::Cancelled);
                true
            }
            None => false,
        }
    }

    /// How many questions are asked and not decided yet.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// # use wfp_rs::irql::DispatchLevel;
    /// fn load<Q: QuestionHandler>(irql: &mut DispatchLevel<'_>, channel: &AskChannel<Q>) -> usize {
    ///     100 * channel.outstanding(irql) / channel.capacity()
    /// }
    /// ```
    pub fn outstanding(&self, irql: impl RaiseIrql) -> usize {
        self.inner().state.lock(irql, |state, _| state.outstanding)
    }

    /// Refuses new questions from now on ([`NotAskedReason::Closed`]), refuses the service's
    /// requests as `close` does (waiting requests complete with `STATUS_CANCELLED`; new ones,
    /// answers and opens fail with `STATUS_DELETE_PENDING`, which `wfp_rs::user::AskClient`
    /// reports as the channel closed), and decides every outstanding question with
    /// [`Outcome::Closing`], before this returns; the device object stays until
    /// [`close`](Self::close) (or drop). For [`DriverState::stopping`], which has the state only
    /// by reference: a channel the driver's callout holds can decide its questions — and so
    /// complete their pends — while the filters are still there for the reauthorizations, and
    /// be dropped with the callout later. Waits for no user-mode thread.
    ///
    /// [`DriverState::stopping`]: crate::driver::DriverState::stopping
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// # use wfp_rs::irql::PassiveLevel;
    /// fn stopping<Q: QuestionHandler>(irql: &mut PassiveLevel<'_>, channel: &AskChannel<Q>) {
    ///     channel.stop(irql);
    ///     assert_eq!(channel.outstanding(irql), 0);
    /// }
    /// ```
    pub fn stop(&self, irql: &mut PassiveLevel<'_>) {
        crate::irql::verify(irql);
        let inner = self.inner();
        inner.state.lock(&mut *irql, |state, _| state.closed = true);
        // The service learns it as from `close`: its waiting requests complete as cancelled,
        // new ones (and answers) are refused with STATUS_DELETE_PENDING.
        self.queue.refuse_requests(&*irql);
        inner.decide_all(irql, |_| true, || Outcome::Closing);
    }

    /// Refuses new questions, closes the device, decides every outstanding question with
    /// [`Outcome::Closing`] and shuts the timers down. Waits for no user-mode thread (see the
    /// [module documentation](self#teardown)). Dropping the channel at `PASSIVE_LEVEL` does
    /// the same.
    ///
    /// ```
    /// # use wfp_rs::ask::{AskChannel, QuestionHandler};
    /// # use wfp_rs::irql::PassiveLevel;
    /// fn unload<Q: QuestionHandler>(irql: &mut PassiveLevel<'_>, channel: AskChannel<Q>) {
    ///     channel.close(irql); // every outstanding question: `decide` with `Outcome::Closing`
    /// }
    /// ```
    pub fn close(self, irql: &mut PassiveLevel<'_>) {
        let mut this = ManuallyDrop::new(self);
        this.shut_down(irql);
    }

    fn shut_down(&mut self, irql: &mut PassiveLevel<'_>) {
        crate::irql::verify(irql);
        self.inner()
            .state
            .lock(&mut *irql, |state, _| state.closed = true);
        // SAFETY: `shut_down` runs once (from `close`, which keeps `drop` from running, or from
        // `drop`), so the queue is taken once and not used afterwards.
        let queue = unsafe { ManuallyDrop::take(&mut self.queue) };
        // Waiting requests complete as cancelled, answers being processed finish, the device
        // goes: no dispatch call can reach the hooks after this.
        queue.close(&*irql);
        self.inner()
            .decide_all(&mut *irql, |_| true, || Outcome::Closing);
        self.inner().shut_down_timers(irql);
        // SAFETY: as for the queue; the timers' clones are gone, so this drops the last
        // reference, at PASSIVE_LEVEL.
        drop(unsafe { ManuallyDrop::take(&mut self.inner) });
    }

    /// Dropped above `PASSIVE_LEVEL`: decide what is outstanding and stop the timers, but the
    /// device and the memory its hooks point into must be leaked.
    fn abandon(&mut self, irql: &mut DispatchLevel<'_>) {
        let inner = self.inner();
        inner.state.lock(&mut *irql, |state, dispatch| {
            state.closed = true;
            for timer in state.timers.iter().flatten() {
                timer.cancel(&*dispatch);
            }
        });
        inner.decide_all(irql, |_| true, || Outcome::Closing);
        crate::kd_print!(
            Error,
            "wfp-rs: an AskChannel was dropped at {}; closing its device and freeing its timers \
             needs PASSIVE_LEVEL, so they are leaked (close it with AskChannel::close)\n",
            Irql::current()
        );
        // SAFETY: dropped once, here (this is the `drop` path); the queue completes its waiting
        // requests and leaks its device, which keeps pointing at `inner`, leaked below.
        drop(unsafe { ManuallyDrop::take(&mut self.queue) });
    }
}

impl<Q: QuestionHandler> Drop for AskChannel<Q> {
    /// Closes the channel at `PASSIVE_LEVEL` (see [`close`](Self::close)); at `DISPATCH_LEVEL`,
    /// decides the outstanding questions and leaks the rest with a debugger message.
    fn drop(&mut self) {
        // SAFETY: `shut_down` is SDK code; it reaches no token of the driver's (a token the
        // dropping code holds stays in its frame); the driver code it runs, `decide` and the
        // handler's drop, gets only the tokens the SDK hands it; its spin locks restore the
        // IRQL.
        if unsafe { PassiveLevel::try_current_in_sdk(|irql| self.shut_down(irql)) }.is_some() {
            return;
        }
        // SAFETY: as above, for `abandon`: `decide` gets only this token.
        let abandoned = unsafe { DispatchLevel::try_current_in_sdk(|irql| self.abandon(irql)) };
        if abandoned.is_none() {
            // No spin lock can be taken above DISPATCH_LEVEL (and no safe code gets there):
            // nothing is decided, everything is leaked.
            crate::kd_print!(
                Error,
                "wfp-rs: an AskChannel was dropped at {}; its questions stay undecided and \
                 everything it holds is leaked\n",
                Irql::current()
            );
        }
    }
}

impl<Q: QuestionHandler> fmt::Debug for AskChannel<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AskChannel")
            .field("capacity", &self.capacity())
            .field("max_question", &self.inner().max_question)
            .field("max_answer", &self.inner().max_answer)
            .finish_non_exhaustive()
    }
}

// --- the shared state ---------------------------------------------------------------------------

/// No slot: the end of a list.
const NONE: usize = usize::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Free,
    /// Asked, waiting for a request to carry it.
    Queued,
    /// Carried by a request through the file object at this address.
    Delivered(usize),
    /// Still queued when the last handle, the file object at this address, closed: decided
    /// with `ServiceGone` by that handle's cleanup. No handle may answer it.
    Orphaned(usize),
}

struct Slot<C> {
    generation: u32,
    phase: Phase,
    context: Option<C>,
    deadline: Instant,
    len: usize,
    /// The free list (singly linked) or the queue (doubly linked).
    prev: usize,
    next: usize,
}

/// A deadline timer's routine. Boxed, so every slot's timer has the same type.
type DeadlineRoutine = Box<dyn Fn(&mut DispatchLevel<'_>) + Send + Sync>;

struct State<C> {
    slots: Vec<Slot<C>>,
    /// One per slot; `None` before `arm_timers` and after `shut_down_timers`.
    timers: Vec<Option<Timer<DeadlineRoutine>>>,
    /// `max_question` bytes per slot.
    questions: Vec<u8>,
    free: usize,
    head: usize,
    tail: usize,
    outstanding: usize,
    /// Handles open on the channel's device (file objects created and not cleaned up yet).
    handles: usize,
    closed: bool,
}

impl<C> State<C> {
    fn try_new(capacity: usize, max_question: usize) -> Result<State<C>, Status> {
        let no_memory = |_| Status::INSUFFICIENT_RESOURCES;
        let bytes = capacity
            .checked_mul(max_question)
            .ok_or(Status::INVALID_PARAMETER)?;
        let mut slots = Vec::new();
        slots.try_reserve_exact(capacity).map_err(no_memory)?;
        let mut timers = Vec::new();
        timers.try_reserve_exact(capacity).map_err(no_memory)?;
        let mut questions = Vec::new();
        questions.try_reserve_exact(bytes).map_err(no_memory)?;
        questions.resize(bytes, 0);
        for index in 0..capacity {
            slots.push(Slot {
                generation: 0,
                phase: Phase::Free,
                context: None,
                deadline: Instant::from_ticks(0),
                len: 0,
                prev: NONE,
                next: if index + 1 < capacity {
                    index + 1
                } else {
                    NONE
                },
            });
            timers.push(None);
        }
        Ok(State {
            slots,
            timers,
            questions,
            free: 0,
            head: NONE,
            tail: NONE,
            outstanding: 0,
            handles: 0,
            closed: false,
        })
    }

    fn take_free(&mut self) -> Option<usize> {
        let index = self.free;
        let slot = self.slots.get_mut(index)?;
        self.free = slot.next;
        slot.next = NONE;
        Some(index)
    }

    fn push_queued(&mut self, index: usize) {
        let tail = self.tail;
        let slot = &mut self.slots[index];
        slot.phase = Phase::Queued;
        slot.prev = tail;
        slot.next = NONE;
        match self.slots.get_mut(tail) {
            Some(last) => last.next = index,
            None => self.head = index,
        }
        self.tail = index;
    }

    fn unlink(&mut self, index: usize) {
        let (prev, next) = (self.slots[index].prev, self.slots[index].next);
        match self.slots.get_mut(prev) {
            Some(before) => before.next = next,
            None => self.head = next,
        }
        match self.slots.get_mut(next) {
            Some(after) => after.prev = prev,
            None => self.tail = prev,
        }
        let slot = &mut self.slots[index];
        slot.prev = NONE;
        slot.next = NONE;
    }

    /// The slot of a question that is asked and not decided, if `id` names one.
    fn live(&self, id: QuestionId) -> Option<usize> {
        let index = id.slot();
        let slot = self.slots.get(index)?;
        (slot.generation == id.generation() && slot.phase != Phase::Free).then_some(index)
    }

    /// Decides the question in `index`: stops its timer, frees the slot and returns its
    /// context, for `decide` once the lock is released.
    fn release(&mut self, index: usize, irql: &DispatchLevel<'_>) -> Option<C> {
        let phase = self.slots.get(index)?.phase;
        if phase == Phase::Free {
            return None;
        }
        if let Some(Some(timer)) = self.timers.get(index) {
            // A DPC it queued already still runs; it finds the slot free, or reused with a
            // later deadline, and does nothing.
            timer.cancel(irql);
        }
        if phase == Phase::Queued {
            self.unlink(index);
        }
        let free = self.free;
        let slot = &mut self.slots[index];
        slot.phase = Phase::Free;
        slot.next = free;
        self.free = index;
        self.outstanding -= 1;
        slot.context.take()
    }
}

struct Inner<Q: QuestionHandler> {
    state: SpinLock<State<Q::Context>>,
    handler: Q,
    capacity: usize,
    max_question: usize,
    max_answer: usize,
    answer_code: u32,
}

impl<Q: QuestionHandler> Inner<Q> {
    /// Hands the oldest queued question to the oldest waiting request: writes it into the
    /// request's output and marks it delivered to the request's handle, under the lock. The
    /// request completes when the caller drops the returned [`Taken`], after releasing the lock,
    /// so `IofCompleteRequest` never runs under the channel's lock. Taking the request out
    /// (`IoCsqRemoveNextIrp`) takes the queue's own lock inside this one: that order only, as
    /// nothing that holds the queue's lock takes the channel's. One at most: the callers
    /// each add one question or one request, and every question that was queued found no
    /// request waiting (and every request no question).
    fn deliver_one<'w>(
        &self,
        state: &mut State<Q::Context>,
        waiters: Waiters<'w>,
    ) -> Option<Taken<'w>> {
        if state.closed || state.head == NONE {
            return None;
        }
        let mut taken = waiters.take_next()?;
        let index = state.head;
        let slot = &state.slots[index];
        let id = QuestionId::new(index, slot.generation);
        let start = index * self.max_question;
        let body = state.questions.get(start..start + slot.len).unwrap_or(&[]);
        let Some(message) = taken.output().get_mut(..HEADER_LEN + body.len()) else {
            // Cannot happen: the queue takes only requests that hold the largest question. The
            // request completes empty; the question stays queued for the next one.
            return Some(taken);
        };
        message[..HEADER_LEN].copy_from_slice(&encode_header(id, body.len()));
        message[HEADER_LEN..].copy_from_slice(body);
        let written = message.len();
        taken.set_written(written);
        let file = taken.file() as usize;
        state.unlink(index);
        state.slots[index].phase = Phase::Delivered(file);
        Some(taken)
    }

    /// The deadline timer of slot `index` expired (its DPC).
    fn expire(&self, irql: &mut DispatchLevel<'_>, index: usize) {
        let context = self.state.lock(&mut *irql, |state, dispatch| {
            let slot = state.slots.get(index)?;
            if slot.phase == Phase::Free {
                return None;
            }
            let now = Instant::now();
            if now < slot.deadline {
                // A DPC queued for an earlier question of this slot, which was decided, or a
                // timer that expired before the deadline read from the precise clock (INFERRED:
                // Windows checks due times at clock ticks, against the coarser interrupt time):
                // the timer is set again for what remains, so the question still times out.
                let remaining = slot.deadline.saturating_duration_since(now);
                if let Some(Some(timer)) = state.timers.get(index) {
                    timer.set(&*dispatch, remaining, None);
                }
                return None;
            }
            state.release(index, dispatch)
        });
        if let Some(context) = context {
            self.handler.decide(irql, context, Outcome::TimedOut);
        }
    }

    /// Decides, one by one and each outside the lock, every question whose phase matches.
    fn decide_all<L: Token>(
        &self,
        irql: &mut L,
        matches: impl Fn(Phase) -> bool,
        outcome: impl Fn() -> Outcome<Q::Answer>,
    ) {
        crate::irql::verify(irql);
        // SAFETY: the caller's token is exclusively borrowed for the whole call, and proves the
        // IRQL is at most DISPATCH_LEVEL; nothing here raises it but the spin lock, through this
        // token.
        let mut token = unsafe { DispatchLevel::new_unchecked() };
        let mut from = 0;
        loop {
            let found = self.state.lock(&mut token, |state, dispatch| {
                let index = (from..state.slots.len()).find(|&i| {
                    let phase = state.slots[i].phase;
                    phase != Phase::Free && matches(phase)
                })?;
                Some((index, state.release(index, dispatch)))
            });
            let Some((index, context)) = found else {
                break;
            };
            from = index + 1;
            if let Some(context) = context {
                self.handler.decide(&mut token, context, outcome());
            }
        }
    }

    /// Takes every timer out and shuts it down (cancel, flush its DPC, free), which also drops
    /// the references to `self` their routines hold.
    fn shut_down_timers(&self, irql: &mut PassiveLevel<'_>) {
        for index in 0..self.capacity {
            let timer = self
                .state
                .lock(&mut *irql, |state, _| state.timers.get_mut(index)?.take());
            if let Some(timer) = timer {
                timer.shut_down(irql);
            }
        }
    }

    /// An answer request: validate, claim, decide. Returns the status to complete it with.
    fn answer(&self, request: &Request) -> sys::NTSTATUS {
        let Some(control) = request.device_control() else {
            return Status::INVALID_DEVICE_REQUEST.raw();
        };
        if control.code != self.answer_code {
            return Status::INVALID_DEVICE_REQUEST.raw();
        }
        let input = request.buffered_input();
        if input.len() != control.input_len {
            // An input length without a system buffer: nothing the I/O manager sends.
            return Status::INVALID_PARAMETER.raw();
        }
        let Some(id) = input
            .get(..8)
            .and_then(|bytes| bytes.try_into().ok())
            .map(|bytes| QuestionId(u64::from_le_bytes(bytes)))
        else {
            return Status::INVALID_BUFFER_SIZE.raw();
        };
        let decoded = match decode_message(input) {
            Some((_, body)) if body.len() <= self.max_answer => self.handler.decode(body),
            _ => None,
        };
        let file = request.file_object() as usize;
        let decided = with_dispatch_token(|token| {
            let claimed = self.state.lock(&mut *token, |state, dispatch| {
                if state.closed {
                    return Err(Status::DELETE_PENDING);
                }
                let index = state.live(id).ok_or(Status::NOT_FOUND)?;
                match state.slots[index].phase {
                    Phase::Delivered(to) if to == file => Ok(state.release(index, dispatch)),
                    Phase::Delivered(_) => Err(Status::ACCESS_DENIED),
                    // Not delivered yet (or taken by the cleanup of the last handle): no handle
                    // may answer it.
                    _ => Err(Status::NOT_FOUND),
                }
            });
            match claimed {
                Err(status) => status.raw(),
                Ok(context) => {
                    let status = if decoded.is_some() {
                        SUCCESS
                    } else {
                        Status::INVALID_PARAMETER.raw()
                    };
                    if let Some(context) = context {
                        let outcome = decoded.map_or(Outcome::Malformed, Outcome::Answered);
                        self.handler.decide(token, context, outcome);
                    }
                    status
                }
            }
        });
        // Not reached: the I/O manager sends requests at PASSIVE_LEVEL.
        decided.unwrap_or(Status::INVALID_DEVICE_STATE.raw())
    }
}

/// Runs `f` with a token for a dispatch routine's hook that calls the driver's `decide`:
/// checked, as a trampoline's, rather than assumed.
fn with_dispatch_token<R>(f: impl for<'t> FnOnce(&'t mut DispatchLevel<'t>) -> R) -> Option<R> {
    // SAFETY: the hooks are called from the SDK's dispatch routine, a trampoline: the I/O
    // manager calls it in the requesting thread, where no driver code holds a token; `decide`
    // gets only this one. The spin lock raises the IRQL through this token and restores it.
    let ran = unsafe { DispatchLevel::try_current_in_sdk(f) };
    if ran.is_none() {
        crate::kd_print!(
            Error,
            "wfp-rs: a request reached an AskChannel at {}, above DISPATCH_LEVEL; it decides \
             nothing\n",
            Irql::current()
        );
    }
    ran
}

impl<Q: QuestionHandler> QueueHooks for Inner<Q> {
    fn control(&self, request: Request) -> sys::NTSTATUS {
        let status = self.answer(&request);
        request.complete(status, 0);
        status
    }

    fn waiter_queued(&self, waiters: Waiters<'_>) {
        with_dispatch_token(|token| {
            let delivery = self
                .state
                .lock(&mut *token, |state, _| self.deliver_one(state, waiters));
            // Completes the request that took a question, outside the lock.
            drop(delivery);
        });
    }

    fn opened(&self, _file: *mut sys::FILE_OBJECT) {
        with_dispatch_token(|token| self.state.lock(&mut *token, |state, _| state.handles += 1));
    }

    fn cleanup(&self, file: *mut sys::FILE_OBJECT) {
        let file = file as usize;
        with_dispatch_token(|token| {
            self.state.lock(&mut *token, |state, _| {
                state.handles = state.handles.saturating_sub(1);
                if state.handles == 0 {
                    // The last handle: no request can come for the queued questions any more.
                    // They go to this cleanup, in the same acquisition as the count, so a
                    // question asked for a handle opened meanwhile is not among them.
                    while state.head != NONE {
                        let index = state.head;
                        state.unlink(index);
                        state.slots[index].phase = Phase::Orphaned(file);
                    }
                }
            });
            self.decide_all(
                token,
                |phase| phase == Phase::Delivered(file) || phase == Phase::Orphaned(file),
                || Outcome::ServiceGone,
            );
        });
    }
}

/// Creates each slot's deadline timer; its routine holds a reference to `inner` until the
/// timer is shut down.
fn arm_timers<Q: QuestionHandler>(
    irql: &mut PassiveLevel<'_>,
    inner: &PoolArc<Inner<Q>>,
    capacity: usize,
) -> Result<(), Status> {
    for index in 0..capacity {
        let owner = PoolArc::clone(inner);
        let routine: DeadlineRoutine =
            try_box(move |irql: &mut DispatchLevel<'_>| owner.expire(irql, index))
                .map_err(Status::from)?;
        let timer = Timer::try_new(routine, &*irql)?;
        inner.state.lock(&mut *irql, |state, _| {
            if let Some(place) = state.timers.get_mut(index) {
                *place = Some(timer);
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_slot_and_generation() {
        let id = QuestionId::new(5, 9);
        assert_eq!((id.slot(), id.generation()), (5, 9));
        assert_eq!(id.raw(), (9 << 32) | 5);
    }

    #[test]
    fn headers_are_checked() {
        let id = QuestionId::from_raw(0x1234_0000_0001);
        let mut message = encode_header(id, 3).to_vec();
        message.extend_from_slice(b"abc");
        assert_eq!(decode_message(&message), Some((id, &b"abc"[..])));
        let mut reserved = message.clone();
        reserved[12] = 1;
        assert_eq!(decode_message(&reserved), None);
        assert_eq!(decode_message(&message[..18]), None);
        message.push(0);
        assert_eq!(decode_message(&message), None);
    }

    #[test]
    fn the_queue_and_the_free_list_keep_their_links() {
        let mut state = State::<u32>::try_new(4, 1).unwrap();
        let slots: Vec<usize> = (0..4).map(|_| state.take_free().unwrap()).collect();
        assert_eq!(slots, [0, 1, 2, 3]);
        assert_eq!(state.take_free(), None);
        for &slot in &slots {
            state.push_queued(slot);
        }
        state.unlink(1);
        state.unlink(3);
        assert_eq!((state.head, state.tail), (0, 2));
        assert_eq!((state.slots[0].next, state.slots[2].prev), (2, 0));
        state.unlink(0);
        state.unlink(2);
        assert_eq!((state.head, state.tail), (NONE, NONE));
    }
}
