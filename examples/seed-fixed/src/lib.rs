//! The seed scenario, fixed: a callout that asks a user-mode service whether a process may
//! connect — without bringing the machine down.
//!
//! # The bug
//!
//! wfp-rs exists because of one driver. Its callout sent the process id of every connection
//! attempt to a user-mode service with `FltSendMessage`, straight from `classifyFn`, and waited
//! for an allow/deny reply:
//!
//! ```c
//! void NTAPI ClassifyFn(const FWPS_INCOMING_VALUES0 *inFixedValues,
//!                       const FWPS_INCOMING_METADATA_VALUES0 *inMetaValues, void *layerData,
//!                       const void *classifyContext, const FWPS_FILTER3 *filter,
//!                       UINT64 flowContext, FWPS_CLASSIFY_OUT0 *classifyOut)
//! {
//!     SEED_REQUEST request = { SEED_REQUEST_MAGIC, 1, 0, inMetaValues->processId };
//!     SEED_REPLY reply;
//!     ULONG replyLength = sizeof(reply);
//!     LARGE_INTEGER timeout = { .QuadPart = -500 * 10000LL };
//!     NTSTATUS status = FltSendMessage(gFilter, &gClientPort, &request, sizeof(request),
//!                                      &reply, &replyLength, &timeout);
//!     classifyOut->actionType =
//!         NT_SUCCESS(status) && reply.Verdict == 1 ? FWP_ACTION_PERMIT : FWP_ACTION_BLOCK;
//! }
//! ```
//!
//! WFP calls `classifyFn` at IRQL <= `DISPATCH_LEVEL` — at `PASSIVE_LEVEL` for one connection,
//! at `DISPATCH_LEVEL` for the next, depending on the path through the network stack.
//! `FltSendMessage` waits, and must be called at IRQL <= `APC_LEVEL`. It compiled without a
//! warning and passed testing; the first classification at `DISPATCH_LEVEL` stopped the machine
//! with `INVALID_PROCESS_ATTACH_ATTEMPT` (0x5).
//!
//! # The same mistake with wfp-rs does not compile
//!
//! Written with this SDK, the original callout holds a port to the service
//! ([`ServerPort::send`] is `FltSendMessage`) and calls it from [`Callout::classify`]:
//!
//! ```compile_fail,E0277
//! use core::time::Duration;
//!
//! use seed_fixed::protocol::{Verdict, VerdictProtocol, VerdictRequest};
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleAuthConnectV4;
//! use wfp_rs::port::ServerPort;
//!
//! /// The seed driver's callout, as it was first written.
//! struct AskInClassify {
//!     port: ServerPort<VerdictProtocol>,
//! }
//!
//! impl Callout<AleAuthConnectV4> for AskInClassify {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         let request = VerdictRequest { pid: c.metadata.process_id().unwrap_or(0) };
//!         // FltSendMessage from classifyFn: waits for the service's reply.
//!         match self.port.send(irql, &request, Duration::from_millis(500)) {
//!             Ok(reply) if reply.verdict == Verdict::Allow => {
//!                 let _ = c.out.permit();
//!             }
//!             _ => {
//!                 c.out.block();
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! `classify` receives a `&mut DispatchLevel`, because it may run at `DISPATCH_LEVEL`, and
//! `send` takes `&impl AtMostApc`, which only `&PassiveLevel` and `&ApcLevel` satisfy. The
//! compiler says so, and says what to do instead:
//!
//! ```text
//! error[E0277]: `DispatchLevel<'_>` may be DISPATCH_LEVEL, but this call requires IRQL <= APC_LEVEL
//!    |
//!    |         match self.port.send(irql, &request, Duration::from_millis(500)) {
//!    |                         ---- ^^^^ this does not prove IRQL <= APC_LEVEL
//!    |                         |
//!    |                         required by a bound introduced by this call
//!    |
//!    = help: the trait `AtMostApc` is not implemented for `DispatchLevel<'_>`
//!    = note: only `&PassiveLevel` and `&ApcLevel` prove IRQL <= APC_LEVEL; a WFP callback such as classifyFn, or code holding a spin lock, has only a `&DispatchLevel`
//!    = note: to make this call from such code, queue a work item (`WorkQueue::queue`) and make the call in its closure, which receives a `&mut PassiveLevel`
//! ```
//!
//! That is one of the two fixes below. The other asks without waiting at all, so the
//! `&mut DispatchLevel` that `classify` holds is all it needs ([`AskChannel::ask`]).
//!
//! # Two fixes
//!
//! Leave `DISPATCH_LEVEL` before waiting, or do not wait at all — and hold the connection
//! meanwhile. [`AskTheService`], this crate's callout at `ALE_AUTH_CONNECT_V4` and `_V6`, does
//! either, as [`Config::design`] says; both begin and end the same way:
//!
//! 1. `classify` **pends** the classification ([`Classify::pend`], `FwpsPendOperation0`): WFP
//!    holds the connection, and `classify` returns at once;
//! 2. the service is asked, without waiting at `DISPATCH_LEVEL` — the two designs differ here;
//! 3. the decision **records** the verdict in a [`VerdictTable`] under the connection's
//!    [`ConnectionKey`] and **completes** the pend ([`PendedClassify::complete`],
//!    `FwpsCompleteOperation0`);
//! 4. WFP then **reauthorizes** the connection: `classify` runs again, with
//!    `FWP_CONDITION_FLAG_IS_REAUTHORIZE`, and answers from the record.
//!
//! ## The question channel ([`Design::QuestionChannel`], the default)
//!
//! `classify` hands the question to an [`AskChannel`] ([`AskChannel::ask`] is allowed at
//! `DISPATCH_LEVEL` and allocates nothing) and returns. The service keeps I/O control requests
//! pending on the channel's device ([`ASK_DEVICE_PATH`]); the question completes one of them, and
//! the service answers with a request of its own (`wfp_rs::user::AskClient`). The channel checks
//! the answer and calls the driver's [`QuestionHandler::decide`] exactly once per question —
//! with the answer, or when the deadline passes, the service's handle closes, or the driver
//! unloads — and `decide` records the verdict and completes the pend. Nothing waits: no work
//! item, no blocked thread. Condensed (the real one is in this crate's source):
//!
//! ```
//! use core::time::Duration;
//!
//! use seed_fixed::protocol::{CHANNEL, Verdict, VerdictReply, VerdictRequest};
//! use wfp_rs::ask::{AskChannel, Outcome, QuestionHandler};
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleAuthConnectV4;
//! use wfp_rs::pend::{ConnectionKey, PendedClassify, VerdictTable};
//! use wfp_rs::port::Message;
//!
//! struct Decisions {
//!     verdicts: VerdictTable<Verdict, 64>,
//! }
//!
//! impl QuestionHandler for Decisions {
//!     type Context = (ConnectionKey, PendedClassify);
//!     type Answer = VerdictReply;
//!
//!     fn decode(&self, answer: &[u8]) -> Option<VerdictReply> {
//!         VerdictReply::decode(answer).ok() // untrusted: `None` is `Outcome::Malformed`
//!     }
//!
//!     fn decide(&self, irql: &mut DispatchLevel<'_>, (key, pended): Self::Context, outcome: Outcome<VerdictReply>) {
//!         // Exactly once: the answer, or the default (deadline, service gone, unload, ...).
//!         let verdict = match outcome {
//!             Outcome::Answered(reply) if reply.pid == key.pid => reply.verdict,
//!             _ => Verdict::Block,
//!         };
//!         self.verdicts.record(&mut *irql, key, verdict);
//!         pended.complete(irql);
//!     }
//! }
//!
//! struct AskThroughTheChannel {
//!     channel: AskChannel<Decisions>,
//! }
//!
//! impl Callout<AleAuthConnectV4> for AskThroughTheChannel {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         // (A reauthorization would be answered from the record here.)
//!         let Some(key) = ConnectionKey::of(c) else { c.out.block(); return };
//!         let Ok(pended) = c.pend() else { c.out.block(); return };
//!         let mut question = [0u8; 16];
//!         let _ = VerdictRequest { pid: key.pid }.encode(&mut question);
//!         // DISPATCH_LEVEL is fine: `ask` does not wait.
//!         let asked = self.channel.ask(&mut *irql, &question, Duration::from_millis(500), (key, pended));
//!         if let Err(not_asked) = asked {
//!             // Every slot taken: the context comes back; decide at once.
//!             let (key, pended) = not_asked.into_context();
//!             self.channel.handler().verdicts.record(&mut *irql, key, Verdict::Block);
//!             pended.complete(irql);
//!         }
//!     }
//! }
//! # let _ = CHANNEL;
//! ```
//!
//! ## A work item and a port ([`Design::WorkItemAndPort`])
//!
//! `classify` **queues a work item** ([`WorkQueue::queue`], `IoQueueWorkItem`), whose closure
//! runs on a system worker thread and receives a `&mut PassiveLevel` — the token `send` accepts
//! — and there **asks the service** over the filter-manager port ([`ServerPort::send`], with a
//! timeout), records and completes. Condensed:
//!
//! ```
//! use core::time::Duration;
//!
//! use seed_fixed::protocol::{Verdict, VerdictProtocol, VerdictRequest};
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleAuthConnectV4;
//! use wfp_rs::port::ServerPort;
//! use wfp_rs::work_item::WorkQueue;
//!
//! struct AskFromAWorkItem {
//!     port: ServerPort<VerdictProtocol>,
//!     queue: WorkQueue,
//! }
//!
//! impl Callout<AleAuthConnectV4> for AskFromAWorkItem {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         // (A reauthorization would be answered from the record here.)
//!         let Ok(pended) = c.pend() else {
//!             c.out.block();
//!             return;
//!         };
//!         let request = VerdictRequest { pid: c.metadata.process_id().unwrap_or(0) };
//!         let port = self.port.clone();
//!         let queued = self.queue.queue(irql, move |passive| {
//!             // PASSIVE_LEVEL: the same call compiles here.
//!             let _allow = matches!(
//!                 port.send(passive, &request, Duration::from_millis(500)),
//!                 Ok(reply) if reply.verdict == Verdict::Allow && reply.pid == request.pid
//!             );
//!             // ... record the verdict, then:
//!             pended.complete(passive);
//!         });
//!         // Not queued: the closure comes back and is dropped, and dropping the pend inside it
//!         // completes it; the reauthorization then finds no record and blocks.
//!         drop(queued);
//!     }
//! }
//! ```
//!
//! ## Which to pick
//!
//! | | question channel | work item + port |
//! |---|---|---|
//! | while the service thinks | nothing waits | a system worker thread per question, blocked in `FltSendMessage` |
//! | questions in flight | at most [`CHANNEL_CAPACITY`] (fixed at load; more get the default at once) | as many as the system lends worker threads |
//! | the service | `AskClient`: `DeviceIoControl` requests kept pending on [`ASK_DEVICE_PATH`] | `PortConnection` on [`PORT_NAME`] |
//! | no service running | the default at once (no handle open on the channel: `NotAskedReason::NoService`) | the default at once |
//! | the service runs but does not answer | each question waits for its deadline | the same |
//! | the service's handle closes with a question | that question: the default at once | the same |
//! | answers checked by | the channel (the handle it was delivered to, its id, its size) and [`VerdictReply`]'s decoding | the port's length check and the decoding |
//! | installation | a plain driver | a minifilter (the port needs one: INF sections, an altitude) |
//!
//! **Pick the question channel**: a burst of connections then costs slots, not threads, and
//! the answer decides the connection in the service's own thread, with no hop through a work
//! item. The port is the simpler model where a blocked thread per question is affordable (rare
//! questions, a fast service), the driver is a minifilter anyway, or the filter manager's
//! connect and disconnect notifications are wanted. `DriverEntry` uses the channel; the work
//! item design stays selectable ([`Config::design`]), and both run the same tests.
//!
//! # What happens when the service cannot answer: fail closed
//!
//! Every pended connection gets exactly one decision. When the service gives none, the
//! configured default applies ([`Config::default`]; [`Verdict::Block`] in [`Config::DEFAULT`],
//! which `DriverEntry` uses): a firewall that asks before letting a process connect should not
//! let it connect because nobody answered. Each case is logged (`kd_print!`) with its reason.
//!
//! | situation | decision |
//! |---|---|
//! | the service replies with a valid [`VerdictReply`] for the process asked about | its verdict |
//! | channel: no service has the device open, or it does not answer, within [`Config::timeout`] (the question's deadline, a kernel timer) | the default, at the deadline |
//! | channel: the service's handle closes (it exited or was killed) holding the question | the default, at once |
//! | channel: an answer through another handle than the one the question went to, a late answer, a second answer | refused (the service's request fails); the question keeps its one decision |
//! | channel: every one of the [`CHANNEL_CAPACITY`] slots is taken | the default, at once |
//! | port: no service connected ([`SendError::NotConnected`]) | the default, at once |
//! | port: the service disconnects before replying ([`SendError::Disconnected`]) | the default |
//! | port: no reply within [`Config::timeout`] ([`SendError::Timeout`]); a late reply is discarded | the default |
//! | a reply too short, too long, or malformed (wrong magic or version, a verdict other than 0/1, reserved bytes set), or about another process | the default |
//! | port: no pool to send ([`SendError::Status`]) | the default |
//! | port: the work item cannot be queued (no pool): the default is recorded, and the closure that came back is dropped with the pend in it, which completes it | the default |
//! | the verdict was evicted from the table (more than [`VERDICT_SLOTS`] completions waiting for their reauthorization) | no record: the default |
//! | a reauthorization this callout did not cause (WFP reauthorizes connections when policy changes) | no record: the default |
//! | the connection's key cannot be read, or the classification cannot be pended (no completion handle, refused) | the default, at once |
//! | a heavier sublayer already decided hard (no write right): nothing to ask | that decision stands |
//! | the driver is unloading: nothing is pended any more, and questions outstanding are decided | the default, at once |
//!
//! "No record" also means the default: the table answers only the reauthorization its own
//! decision caused, and anything else is treated as unknown. With a fail-open configuration
//! ([`Verdict::Allow`] as the default) every "default" row above permits instead, including
//! reauthorizations of connections that existed before the driver loaded.
//!
//! The driver logs each pend (`seed-fixed: pid 42: pended, asking the service`) and each
//! decision with its reason (`seed-fixed: pid 42: block (default: no reply within the
//! timeout)`); the tests read these lines from the simulator's debugger output.
//!
//! # Configuration
//!
//! [`Config`] holds the design, the port's and the device's names, the timeout and the default.
//! `DriverEntry` uses [`Config::DEFAULT`] (the question channel, a 500 ms timeout,
//! fail-closed); a product would read its settings from its service key. Without a registry,
//! another configuration is a `#[driver_entry]` of your own that calls [`start`] — which is
//! what the tests do:
//!
//! ```
//! use core::time::Duration;
//! use seed_fixed::{Config, Design, SeedFixed};
//! use wfp_rs::driver::Driver;
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs::Status;
//!
//! #[wfp_rs::driver_entry]
//! fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<SeedFixed, Status> {
//!     let config = Config {
//!         design: Design::WorkItemAndPort,
//!         timeout: Duration::from_millis(50),
//!         ..Config::DEFAULT
//!     };
//!     seed_fixed::start(irql, driver, config)
//! }
//! # let machine = wfp_rs_sim::Machine::new();
//! # let driver = machine.load_driver("seed-fixed", DriverEntry).unwrap();
//! # machine.unload_driver(driver).unwrap();
//! # assert!(machine.pool_blocks().is_empty());
//! ```
//!
//! # Loading and unloading
//!
//! `DriverEntry` creates the service's end — the question channel's device [`ASK_DEVICE_NAME`]
//! with its [`CHANNEL_CAPACITY`] slots and timers; or, in the work item design, the minifilter
//! ([`Filter`]; the driver must then be installed as a minifilter, see [`wfp_rs::port`]) and the
//! port [`PORT_NAME`] for one service connection —; registers the callouts; and only then, in a
//! dynamic session and one transaction, adds the provider, the sublayer, the callout entries
//! and two terminating filters for outbound TCP at `ALE_AUTH_CONNECT_V4`/`_V6` — so no
//! connection ever meets a filter whose callout is missing.
//!
//! Unload must leave no pend behind, must not let a pended connection through by accident,
//! and should not wait for a silent service. The order:
//!
//! 1. [`SeedFixed::stopping`](DriverState::stopping), before the SDK waits for anything, sets
//!    the "unloading" flag — from then on a new connection gets the default at once instead of
//!    being pended, and a work item that has not asked yet does not — and ends the questions
//!    waiting: it stops the question channel ([`AskChannel::stop`]: each outstanding question
//!    is decided with the default and its pend completed, now, while the filters exist), or
//!    closes the service's port connection ([`ServerPort::disconnect_all`]), so a send waiting for a reply
//!    fails at once instead of running into [`Config::timeout`].
//! 2. The SDK waits until no work item is queued or running: every work item has completed its
//!    pend, with the service's answer or the default.
//! 3. [`SeedFixed::unload`](DriverState::unload) waits until every pend it made is completed
//!    *and reauthorized*. Completing a pend only asks WFP to reauthorize; the reauthorization
//!    comes later, on another thread. If the filters were deleted first, it would meet no filter
//!    and the connection would be permitted whatever the verdict. The wait ends when no
//!    connection of this driver is being decided and the [`VerdictTable`] is empty (every
//!    recorded verdict taken), or after [`Config::timeout`] + [`REAUTHORIZATION_GRACE`] without
//!    progress (a reauthorization that never comes; logged).
//! 4. It closes the engine session: the filters go before the callouts, because a terminating
//!    filter whose callout is gone blocks everything it matches.
//! 5. It unregisters the callouts; then it closes the question channel's device (the service's
//!    waiting requests complete as cancelled), or, in the work item design, the port and the
//!    minifilter.
//!
//! So every pended connection gets exactly one decision, and unload does not wait for the
//! service. Connections that arrive after step 4 are not filtered by this driver, as after any
//! unload.
//!
//! The channel is stopped in step 1, not only closed in step 5 with the callouts gone: closing
//! decides the questions still outstanding, and the reauthorizations those decisions cause must
//! still meet the filters. A classification that asks after the stop gets its question back
//! ([`NotAskedReason::Closed`]) and applies the default.
//!
//! # Running it
//!
//! Build the kernel image: `cargo xtask driver seed-fixed`
//! (or `cargo build --release --target x86_64-pc-windows-msvc -p seed-fixed`).
//! In the simulator, `cargo test -p seed-fixed` plays the service on harness threads — with
//! `wfp_rs::user::AskClient` through the simulator's bridge for the channel, on the port's
//! client for the work item design — and drives hundreds of concurrent connections through the
//! driver in each design.
//!
//! [`ServerPort::send`]: wfp_rs::port::ServerPort::send
//! [`Callout::classify`]: wfp_rs::callout::Callout::classify
//! [`Classify::pend`]: wfp_rs::callout::Classify::pend
//! [`WorkQueue::queue`]: wfp_rs::work_item::WorkQueue::queue
//! [`VerdictTable`]: wfp_rs::pend::VerdictTable
//! [`ConnectionKey`]: wfp_rs::pend::ConnectionKey
//! [`PendedClassify::complete`]: wfp_rs::pend::PendedClassify::complete
//! [`SendError::NotConnected`]: wfp_rs::port::SendError::NotConnected
//! [`SendError::Disconnected`]: wfp_rs::port::SendError::Disconnected
//! [`SendError::Timeout`]: wfp_rs::port::SendError::Timeout
//! [`SendError::Status`]: wfp_rs::port::SendError::Status
//! [`VerdictReply`]: protocol::VerdictReply
//! [`Verdict::Block`]: protocol::Verdict::Block
//! [`Verdict::Allow`]: protocol::Verdict::Allow
//! [`Filter`]: wfp_rs::port::Filter
//! [`AskChannel`]: wfp_rs::ask::AskChannel
//! [`AskChannel::ask`]: wfp_rs::ask::AskChannel::ask
//! [`AskChannel::stop`]: wfp_rs::ask::AskChannel::stop
//! [`NotAskedReason::Closed`]: wfp_rs::ask::NotAskedReason::Closed
//! [`QuestionHandler::decide`]: wfp_rs::ask::QuestionHandler::decide
//! [`ServerPort::disconnect_all`]: wfp_rs::port::ServerPort::disconnect_all

#![no_std]

extern crate alloc;

pub mod protocol;

use core::fmt;
use core::net::IpAddr;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use core::time::Duration;

use wfp_rs::ask::{AskChannel, NotAskedReason, Outcome, QuestionHandler};
use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::ClassifyOut;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::event::{Event, EventKind};
use wfp_rs::filter::{Filter as WfpFilter, FilterAction, Match};
use wfp_rs::irql::{AtMostApc, AtMostDispatch, DispatchLevel, PassiveLevel, Token};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6, Field, Layer, fields};
use wfp_rs::pend::{
    ConnectionKey, PendError, PendableByCompletionHandle, PendedClassify, VerdictTable,
};
use wfp_rs::pool::{PoolArc, PoolBox, PoolTag};
use wfp_rs::port::{Filter, Message, SendError, ServerPort};
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, kd_print};

use protocol::{CHANNEL, MESSAGE_LEN, Verdict, VerdictProtocol, VerdictReply, VerdictRequest};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator =
    wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"Seed"));

/// The tag of the state the callouts and their work items share.
const SHARED_TAG: PoolTag = PoolTag::new(b"SdSh");

/// The tag of the pool block that holds the question channel, which the two callouts and the
/// driver's state share.
const CHANNEL_TAG: PoolTag = PoolTag::new(b"SdCh");

/// The name of the communication port the service connects to
/// (`FilterConnectCommunicationPort(L"\\WfpRsSeedPort", ...)`), in the work item design.
pub const PORT_NAME: &str = "\\WfpRsSeedPort";

/// The name of the question channel's device (`\Device\WfpRsSeedAsk`), in the channel design;
/// the service opens [`ASK_DEVICE_PATH`].
pub const ASK_DEVICE_NAME: &str = "WfpRsSeedAsk";

/// Where the service opens the question channel (`AskClient::open`, `CreateFileW`).
pub const ASK_DEVICE_PATH: &str = r"\\.\WfpRsSeedAsk";

/// How long the service has to answer by default (the work item's send, or the question's
/// deadline).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// How many service connections the port accepts at a time. One service, one connection: a
/// second instance is refused (`STATUS_CONNECTION_COUNT_LIMIT`) until the first disconnects.
pub const SERVICE_CONNECTIONS: u32 = 1;

/// How many questions the channel holds at once (asked and not decided yet). A connection that
/// finds every slot taken gets the default at once. Allocated at load: each slot is a
/// [`MESSAGE_LEN`]-byte buffer and a kernel timer.
pub const CHANNEL_CAPACITY: usize = 64;

/// How many verdicts wait for their reauthorization at most. An entry lives only from the
/// decision's `record` to the reauthorization's `take`, so this bounds completions in flight,
/// not connections; when it is exceeded the oldest entry is evicted and its connection gets the
/// default. (`examples/firewall/driver` avoids that under bursts: it reserves a slot before each
/// pend and records with `VerdictTable::try_record`, which never evicts.)
pub const VERDICT_SLOTS: usize = 64;

/// How long unload waits, beyond [`Config::timeout`], for the reauthorizations of the
/// connections it completed before it deletes its filters (see the crate documentation).
pub const REAUTHORIZATION_GRACE: Duration = Duration::from_secs(2);

/// The weight of this driver's sublayer.
pub const SUBLAYER_WEIGHT: u16 = 0x7E00;

/// The provider that owns the sublayer, callout entries and filters.
pub const PROVIDER: Guid = guid!("cbbbfed6-d603-4f18-b043-37501c12d2a1");
/// The sublayer.
pub const SUBLAYER: Guid = guid!("6608b783-66e3-48e7-8b63-087ec5946782");
/// The callout at `ALE_AUTH_CONNECT_V4`.
pub const CALLOUT_V4: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("44f17202-bfff-4765-a718-2e50235b3b6e"));
/// The callout at `ALE_AUTH_CONNECT_V6`.
pub const CALLOUT_V6: CalloutKey<AleAuthConnectV6> =
    CalloutKey::new(guid!("cee9f9c2-acd8-4fb8-8321-1e31eb1beb48"));
/// The filter that hands outbound IPv4 TCP connections to [`CALLOUT_V4`].
pub const FILTER_V4: Guid = guid!("b464e9d2-83a5-4774-89e0-982737ecd9e1");
/// The filter that hands outbound IPv6 TCP connections to [`CALLOUT_V6`].
pub const FILTER_V6: Guid = guid!("bedc39da-0808-4aad-ba67-44e88a0cb3d3");

/// How the driver asks the service (see the crate documentation for the trade-offs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Design {
    /// `classifyFn` pends and asks through a question channel ([`AskChannel`]) at once, at
    /// whatever IRQL it runs; the answer arrives as the service's I/O control request and is
    /// decided there. No work item, no thread waits. The service uses `AskClient`.
    QuestionChannel,
    /// `classifyFn` pends and queues a work item, which asks over a filter-manager port
    /// (`FltSendMessage`) at `PASSIVE_LEVEL`, blocking a system worker thread until the reply
    /// or the timeout. The service uses `PortConnection`.
    WorkItemAndPort,
}

/// The driver's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How the driver asks.
    pub design: Design,
    /// The name of the communication port ([`Design::WorkItemAndPort`]).
    pub port_name: &'static str,
    /// The name of the question channel's device ([`Design::QuestionChannel`]).
    pub device_name: &'static str,
    /// How long the service has to answer: the work item's wait (delivery and reply together),
    /// or the question's deadline (from the ask to the answer).
    pub timeout: Duration,
    /// The decision when the service gives none (see the crate documentation for every case).
    pub default: Verdict,
}

impl Config {
    /// What `DriverEntry` uses: the question channel on [`ASK_DEVICE_NAME`],
    /// [`DEFAULT_TIMEOUT`], fail-closed.
    pub const DEFAULT: Config = Config {
        design: Design::QuestionChannel,
        port_name: PORT_NAME,
        device_name: ASK_DEVICE_NAME,
        timeout: DEFAULT_TIMEOUT,
        default: Verdict::Block,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// Why the service's answer could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskError {
    /// The message was not sent, or no valid reply came back.
    Send(SendError),
    /// The reply is well-formed but about another process.
    WrongProcess {
        /// The process asked about.
        asked: u64,
        /// The process the reply named.
        answered: u64,
    },
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::Send(error) => error.fmt(f),
            AskError::WrongProcess { asked, answered } => {
                write!(f, "the reply is about pid {answered}, not {asked}")
            }
        }
    }
}

/// Asks the service connected to `port` whether process `pid` may connect, waiting at most
/// `timeout`, and validates the answer (the SDK checks the length and decodes; this checks the
/// process id it echoes).
///
/// Waits, so it needs IRQL <= `APC_LEVEL`: a work item's `&PassiveLevel` will do, a classify
/// callback's `&DispatchLevel` does not compile.
pub fn ask_service(
    irql: &impl AtMostApc,
    port: &ServerPort<VerdictProtocol>,
    pid: u64,
    timeout: Duration,
) -> Result<Verdict, AskError> {
    let reply = port
        .send(irql, &VerdictRequest { pid }, timeout)
        .map_err(AskError::Send)?;
    check_reply(pid, reply)
}

/// The reply's verdict, if it is about the process asked about.
fn check_reply(pid: u64, reply: VerdictReply) -> Result<Verdict, AskError> {
    if reply.pid != pid {
        return Err(AskError::WrongProcess {
            asked: pid,
            answered: reply.pid,
        });
    }
    Ok(reply.verdict)
}

/// The pool tag of the verdict table's allocation.
const VERDICTS_TAG: PoolTag = PoolTag::new(b"SfVt");

/// What the callouts share with their work items (or with the question channel's decisions).
struct Shared {
    config: Config,
    /// In a pool allocation of its own: the table is several KiB, which a debug build would
    /// otherwise copy through the stack of `start` (the stack check,
    /// `cargo xtask stack seed-fixed --debug`, measured 38 KiB).
    verdicts: PoolBox<VerdictTable<Verdict, VERDICT_SLOTS>>,
    /// Set at unload: work items and classifications apply the default instead of asking.
    unloading: AtomicBool,
    /// Classifications of new connections between their check of `unloading` and their
    /// decision (the end of their work item, the channel's `decide`, or the path that decided
    /// without asking).
    in_flight: AtomicUsize,
    /// Set, while unloading, when `in_flight` drops to zero or a recorded verdict is taken.
    progress: Event,
}

impl Shared {
    /// A new connection's classification, or its work item, is done.
    fn finished(&self, irql: &impl AtMostDispatch) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.unloading.load(Ordering::SeqCst)
        {
            self.progress.set(irql);
        }
    }

    /// At unload: stops new pends, then waits until every pend this driver made is completed
    /// and every verdict recorded for a reauthorization has been taken by it — so that no
    /// reauthorization arrives after the filters are deleted, where nothing would block it.
    /// Gives up after [`Config::timeout`] + [`REAUTHORIZATION_GRACE`] without progress (a
    /// reauthorization that never comes); returns whether everything settled.
    fn settle(&self, irql: &mut PassiveLevel<'_>) -> bool {
        // Sequentially consistent with `classify`'s increment of `in_flight` and its load of
        // `unloading`: either a classification sees the flag and does not pend, or this sees
        // it in flight and waits for it.
        self.unloading.store(true, Ordering::SeqCst);
        let patience = self.config.timeout.saturating_add(REAUTHORIZATION_GRACE);
        let settled = |irql: &mut PassiveLevel<'_>| {
            self.in_flight.load(Ordering::SeqCst) == 0 && self.verdicts.is_empty(irql)
        };
        loop {
            // Cleared before the check, so a signal after the check ends the wait.
            self.progress.clear(irql);
            if settled(irql) {
                return true;
            }
            if !self.progress.wait_timeout(irql, patience) {
                return settled(irql);
            }
        }
    }

    /// Records `verdict` for `key`'s reauthorization. Call it before completing the pend: the
    /// reauthorization may run before `complete` returns.
    fn record<I: Token>(&self, irql: &mut I, key: ConnectionKey, verdict: Verdict) {
        if let Some((evicted, _)) = self.verdicts.record(irql, key, verdict) {
            kd_print!(
                Warning,
                "seed-fixed: verdict table full; pid {} evicted, its reauthorization gets the default\n",
                evicted.pid
            );
        }
    }

    /// Decides a pended connection: records `verdict` for its reauthorization, completes the
    /// pend (which triggers the reauthorization), and counts the connection as finished.
    fn conclude(
        &self,
        irql: &mut DispatchLevel<'_>,
        key: ConnectionKey,
        pended: PendedClassify,
        verdict: Verdict,
    ) {
        self.record(&mut *irql, key, verdict);
        pended.complete(irql);
        self.finished(irql);
    }

    /// The work item's job: ask over `port` (unless unloading), log, and return the decision.
    fn ask_over_port(
        &self,
        irql: &PassiveLevel<'_>,
        port: &ServerPort<VerdictProtocol>,
        pid: u64,
    ) -> Verdict {
        let default = self.config.default;
        if self.unloading.load(Ordering::SeqCst) {
            kd_print!(
                Warning,
                "seed-fixed: pid {pid}: {default} (default: unloading)\n"
            );
            return default;
        }
        match ask_service(irql, port, pid, self.config.timeout) {
            Ok(verdict) => {
                kd_print!("seed-fixed: pid {pid}: {verdict} (service)\n");
                verdict
            }
            Err(error) => {
                kd_print!(
                    Warning,
                    "seed-fixed: pid {pid}: {default} (default: {error})\n"
                );
                default
            }
        }
    }
}

/// The question channel's decisions: each question's context is the connection's key and its
/// pend, and whatever decides it — the service's answer, the deadline, the service's handle
/// closing, unload — records the verdict and completes the pend, exactly once.
struct ChannelDecisions {
    shared: PoolArc<Shared>,
}

impl QuestionHandler for ChannelDecisions {
    type Context = (ConnectionKey, PendedClassify);
    type Answer = VerdictReply;

    fn decode(&self, answer: &[u8]) -> Option<VerdictReply> {
        // Untrusted input from user mode: anything not fully understood is `Malformed`.
        VerdictReply::decode(answer).ok()
    }

    fn decide(
        &self,
        irql: &mut DispatchLevel<'_>,
        (key, pended): Self::Context,
        outcome: Outcome<VerdictReply>,
    ) {
        let default = self.shared.config.default;
        let pid = key.pid;
        let reason = match outcome {
            Outcome::Answered(reply) => {
                let verdict = match check_reply(pid, reply) {
                    Ok(verdict) => {
                        kd_print!("seed-fixed: pid {pid}: {verdict} (service)\n");
                        verdict
                    }
                    Err(error) => {
                        kd_print!(
                            Warning,
                            "seed-fixed: pid {pid}: {default} (default: {error})\n"
                        );
                        default
                    }
                };
                self.shared.conclude(irql, key, pended, verdict);
                return;
            }
            Outcome::Malformed => "malformed answer",
            Outcome::TimedOut => "no reply within the timeout",
            Outcome::ServiceGone => "the service closed its handle before it answered",
            Outcome::Cancelled => "the question was withdrawn",
            Outcome::Closing => "unloading",
        };
        kd_print!(
            Warning,
            "seed-fixed: pid {pid}: {default} (default: {reason})\n"
        );
        self.shared.conclude(irql, key, pended, default);
    }
}

/// The question channel, shared by the two callouts and the driver's state.
type Channel = AskChannel<ChannelDecisions>;

/// Applies `verdict`: a soft permit (a lighter sublayer may still block) or a hard block.
fn apply(out: &mut ClassifyOut<'_>, verdict: Verdict) {
    match verdict {
        Verdict::Allow => {
            // Without the write right this changes nothing: a hard decision stands.
            let _ = out.permit();
        }
        Verdict::Block => {
            out.block();
        }
    }
}

/// How a callout asks, chosen at load ([`Config::design`]).
enum Asks {
    /// [`Design::QuestionChannel`]: from `classify`, through the channel.
    ThroughTheChannel(PoolArc<Channel>),
    /// [`Design::WorkItemAndPort`]: from a work item, over the port.
    FromAWorkItem {
        port: ServerPort<VerdictProtocol>,
        queue: WorkQueue,
    },
}

/// The callout: pends each new connection, asks the service (through the question channel, or
/// from a work item over the port), and answers the reauthorization from the verdict the
/// decision recorded. One type serves both IP versions and both designs.
pub struct AskTheService {
    shared: PoolArc<Shared>,
    asks: Asks,
}

impl AskTheService {
    /// [`Design::QuestionChannel`]: asks at once, at this IRQL; the channel's `decide` will
    /// complete the pend. Nothing waits.
    fn ask_through_the_channel(
        &self,
        irql: &mut DispatchLevel<'_>,
        channel: &Channel,
        key: ConnectionKey,
        pended: PendedClassify,
    ) {
        let mut question = [0u8; MESSAGE_LEN];
        // Cannot fail: the buffer is the message's size.
        let _ = VerdictRequest { pid: key.pid }.encode(&mut question);
        let timeout = self.shared.config.timeout;
        let pid = key.pid;
        match channel.ask(&mut *irql, &question, timeout, (key, pended)) {
            Ok(_) => kd_print!("seed-fixed: pid {pid}: pended, asking the service\n"),
            Err(not_asked) => {
                // The context comes back: decide at once.
                let reason = match not_asked.reason() {
                    NotAskedReason::Full => "every question slot is taken",
                    // Stopped by unload after this classification checked `unloading`.
                    NotAskedReason::Closed => "unloading",
                    NotAskedReason::TooLarge { .. } => "the question is too large",
                    NotAskedReason::NoService => "no service has the channel open",
                };
                let (key, pended) = not_asked.into_context();
                let default = self.shared.config.default;
                kd_print!(
                    Warning,
                    "seed-fixed: pid {}: {default} (default: {reason})\n",
                    key.pid
                );
                self.shared.conclude(irql, key, pended, default);
            }
        }
    }

    /// [`Design::WorkItemAndPort`]: queues a work item that asks at `PASSIVE_LEVEL`, records,
    /// and completes the pend.
    fn ask_from_a_work_item(
        &self,
        irql: &mut DispatchLevel<'_>,
        port: &ServerPort<VerdictProtocol>,
        queue: &WorkQueue,
        key: ConnectionKey,
        pended: PendedClassify,
    ) {
        let shared = &self.shared;
        let default = shared.config.default;
        kd_print!("seed-fixed: pid {}: pended, asking the service\n", key.pid);
        let work = PoolArc::clone(shared);
        let port = port.clone();
        let queued = queue.queue(irql, move |passive| {
            let verdict = work.ask_over_port(passive, &port, key.pid);
            work.record(passive, key, verdict);
            pended.complete(passive);
            work.finished(passive);
        });
        if let Err(not_queued) = queued {
            kd_print!(
                Warning,
                "seed-fixed: pid {}: {default} (default: {not_queued})\n",
                key.pid
            );
            shared.record(irql, key, default);
            // Dropping the closure drops the pend in it, which completes it; the
            // reauthorization finds the default recorded.
            drop(not_queued);
            shared.finished(irql);
        }
    }
}

impl<L: PendableByCompletionHandle> Callout<L> for AskTheService
where
    L::Address: Into<IpAddr>,
    fields::AleAppId: Field<L>,
    fields::IpProtocol: Field<L>,
    fields::IpLocalAddress: Field<L>,
    fields::IpLocalPort: Field<L>,
    fields::IpRemoteAddress: Field<L>,
    fields::IpRemotePort: Field<L>,
{
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let default = self.shared.config.default;
        let Some(key) = ConnectionKey::of(c) else {
            // ALE_AUTH_CONNECT always has these fields; without them there is no key to
            // record a verdict under, so nothing to ask about.
            apply(&mut c.out, default);
            return;
        };
        let shared = &self.shared;
        if c.is_reauthorization() {
            // The decision recorded the verdict before it completed the pend. No record: a
            // reauthorization this callout did not cause, or an evicted entry.
            let verdict = match shared.verdicts.take(&mut *irql, &key) {
                Some(verdict) => {
                    if shared.unloading.load(Ordering::SeqCst) {
                        shared.progress.set(irql);
                    }
                    verdict
                }
                None => default,
            };
            apply(&mut c.out, verdict);
            return;
        }
        // Counted before the flag is read (see `Shared::settle`).
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if shared.unloading.load(Ordering::SeqCst) {
            apply(&mut c.out, default);
            shared.finished(irql);
            return;
        }
        let pended = match c.pend() {
            Ok(pended) => pended,
            // A heavier sublayer decided hard; there is nothing to ask.
            Err(PendError::NoWriteRight) => {
                shared.finished(irql);
                return;
            }
            Err(error) => {
                kd_print!(
                    Warning,
                    "seed-fixed: pid {}: {default} (default: {error})\n",
                    key.pid
                );
                apply(&mut c.out, default);
                shared.finished(irql);
                return;
            }
        };
        match &self.asks {
            Asks::ThroughTheChannel(channel) => {
                self.ask_through_the_channel(irql, channel, key, pended);
            }
            Asks::FromAWorkItem { port, queue } => {
                self.ask_from_a_work_item(irql, port, queue, key, pended);
            }
        }
    }
}

/// The service's end the driver keeps, per design.
enum Service {
    /// The question channel.
    Channel(PoolArc<Channel>),
    /// The port, and the minifilter it needs.
    Port {
        port: ServerPort<VerdictProtocol>,
        filter: Filter,
    },
}

/// What the driver keeps while it is loaded.
pub struct SeedFixed {
    engine: Engine,
    v4: CalloutRegistration<AleAuthConnectV4, AskTheService>,
    v6: CalloutRegistration<AleAuthConnectV6, AskTheService>,
    shared: PoolArc<Shared>,
    service: Service,
}

impl DriverState for SeedFixed {
    fn stopping(&self, irql: &mut PassiveLevel<'_>) {
        // No new pends, and no new questions; then end the questions already waiting, so
        // nothing the SDK or `unload` waits for runs into the timeout.
        self.shared.unloading.store(true, Ordering::SeqCst);
        match &self.service {
            Service::Channel(channel) => {
                // New questions are refused, and each outstanding one is decided (the default,
                // "unloading") and its pend completed now, while the filters its
                // reauthorization needs still exist.
                let decided = channel.outstanding(&mut *irql);
                channel.stop(irql);
                kd_print!("seed-fixed: stopping; {decided} outstanding question(s) decided\n");
            }
            Service::Port { port, .. } => {
                // Sends waiting for a reply fail at once instead of at their timeout.
                let closed = port.disconnect_all(irql);
                kd_print!("seed-fixed: stopping; {closed} service connection(s) closed\n");
            }
        }
    }

    fn unload(self, irql: &mut PassiveLevel<'_>) {
        // The SDK always calls `stopping` first, which stopped the channel, and has waited for
        // every work item: no pend of either design is outstanding.
        let SeedFixed {
            engine,
            v4,
            v6,
            shared,
            service,
        } = self;
        // No new pends; wait for the reauthorizations of the pends completed so far, while the
        // filters that route them to this callout still exist.
        if !shared.settle(irql) {
            kd_print!(
                Warning,
                "seed-fixed: reauthorizations still outstanding at unload; they will not be filtered\n"
            );
        }
        // The filters go first, with the dynamic session: a terminating filter whose callout
        // is unregistered blocks everything it matches.
        if let Err(status) = engine.close(irql) {
            kd_print!(Error, "seed-fixed: closing the session failed: {status}\n");
        }
        if let Err((_, status)) = v4.unregister(&mut *irql) {
            kd_print!(Error, "seed-fixed: unregistering (IPv4) failed: {status}\n");
        }
        if let Err((_, status)) = v6.unregister(&mut *irql) {
            kd_print!(Error, "seed-fixed: unregistering (IPv6) failed: {status}\n");
        }
        drop(shared);
        match service {
            Service::Channel(channel) => match PoolArc::try_unwrap(channel) {
                // The callouts are gone with their references: the last one deletes the device
                // (the service's waiting requests complete as cancelled) and frees the timers.
                Ok(channel) => channel.close(irql),
                Err(channel) => drop(channel),
            },
            Service::Port { port, filter } => {
                // The port before the filter: a filter with an open port cannot be
                // unregistered. A work item queued by a classification that raced the
                // session's close may still hold a handle to the port; the port closes when it
                // finishes, at PASSIVE_LEVEL, and the SDK waits for it before the driver is
                // gone.
                port.close(irql);
                // Unregisters the minifilter (if no work item holds the port), which
                // disconnects the service.
                filter.close(irql);
            }
        }
        kd_print!("seed-fixed: unloaded\n");
    }
}

/// The body of `DriverEntry`, with a configuration: creates the service's end (the question
/// channel's device, or the minifilter and its port), the callouts, and then the filters that
/// hand outbound TCP connections to them. On an error everything done so far is undone (the
/// locals are dropped in reverse order, at `PASSIVE_LEVEL`).
pub fn start(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    config: Config,
) -> Result<SeedFixed, Status> {
    let progress = Event::try_new(EventKind::Notification, false, irql)?;
    let verdicts =
        VerdictTable::try_new_in_pool(VERDICTS_TAG, irql).ok_or(Status::INSUFFICIENT_RESOURCES)?;
    // Fallible: `Arc::new` cannot report an exhausted pool, and in a driver its failure is a
    // bug check. On a failure the value comes back and is dropped like the other locals.
    let shared = PoolArc::try_new(
        Shared {
            config,
            verdicts,
            unloading: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            progress,
        },
        SHARED_TAG,
        irql,
    )
    .map_err(|e| e.status())?;
    let service = match config.design {
        Design::QuestionChannel => Service::Channel(open_channel(irql, driver, &shared)?),
        Design::WorkItemAndPort => open_port(irql, driver, config.port_name)?,
    };

    // Registered before the filters that name them exist, so no connection meets a filter
    // whose callout is missing (it would be blocked).
    let callout = || AskTheService {
        shared: PoolArc::clone(&shared),
        asks: match &service {
            Service::Channel(channel) => Asks::ThroughTheChannel(PoolArc::clone(channel)),
            Service::Port { port, .. } => Asks::FromAWorkItem {
                port: port.clone(),
                queue: driver.work_queue(),
            },
        },
    };
    let v4 = CalloutRegistration::register(irql, driver, CALLOUT_V4, callout())?;
    let v6 = CalloutRegistration::register(irql, driver, CALLOUT_V6, callout())?;

    // Dynamic: closing the session deletes everything added in it.
    let engine = Engine::open(
        irql,
        SessionOptions::new().dynamic().name("wfp-rs seed-fixed"),
    )?;
    // All or nothing: dropped on an error, the transaction is aborted.
    let txn = engine.transaction(irql)?;
    txn.add_provider(irql, &Provider::new(PROVIDER).name("wfp-rs seed-fixed"))?;
    txn.add_sublayer(
        irql,
        &Sublayer::new(SUBLAYER)
            .name("wfp-rs seed-fixed")
            .provider(PROVIDER)
            .weight(SUBLAYER_WEIGHT),
    )?;
    add_connect_filter(irql, &txn, CALLOUT_V4, FILTER_V4, "seed-fixed (IPv4)")?;
    add_connect_filter(irql, &txn, CALLOUT_V6, FILTER_V6, "seed-fixed (IPv6)")?;
    txn.commit(irql)?;

    match config.design {
        Design::QuestionChannel => kd_print!(
            "seed-fixed: asking the service through the question channel \\\\.\\{} ({} ms timeout, default {})\n",
            config.device_name,
            config.timeout.as_millis(),
            config.default
        ),
        Design::WorkItemAndPort => kd_print!(
            "seed-fixed: asking the service on {} ({} ms timeout, default {})\n",
            config.port_name,
            config.timeout.as_millis(),
            config.default
        ),
    }
    Ok(SeedFixed {
        engine,
        v4,
        v6,
        shared,
        service,
    })
}

/// Creates the question channel ([`Design::QuestionChannel`]): its device, [`CHANNEL_CAPACITY`]
/// slots and their timers, in the pool block the callouts share. A function of its own so that its
/// locals do not lie on the stack of the deepest load path (see [`add_callout_entry`]).
#[inline(never)]
fn open_channel(
    irql: &mut PassiveLevel<'_>,
    driver: &Driver<'_>,
    shared: &PoolArc<Shared>,
) -> Result<PoolArc<Channel>, Status> {
    let decisions = ChannelDecisions {
        shared: PoolArc::clone(shared),
    };
    let config = shared.config;
    let channel = AskChannel::new(
        irql,
        driver,
        config.device_name,
        &CHANNEL,
        CHANNEL_CAPACITY,
        decisions,
    )?;
    PoolArc::try_new(channel, CHANNEL_TAG, irql).map_err(|e| e.status())
}

/// Registers the minifilter and creates the port ([`Design::WorkItemAndPort`]). A function of
/// its own for the same reason as [`open_channel`].
#[inline(never)]
fn open_port(
    irql: &mut PassiveLevel<'_>,
    driver: &Driver<'_>,
    port_name: &str,
) -> Result<Service, Status> {
    let filter = Filter::register(irql, driver)?;
    let port =
        ServerPort::<VerdictProtocol>::create(irql, &filter, port_name, SERVICE_CONNECTIONS, ())?;
    Ok(Service::Port { port, filter })
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<SeedFixed, Status> {
    start(irql, driver, Config::DEFAULT)
}

/// Adds the callout entry `callout` at layer `L`. A function of its own, like [`tcp_filter`]:
/// in a debug build each builder step is a copy on the stack, and those copies must not lie
/// under [`Engine::add_filter`], the deepest path at load time (`cargo xtask stack seed-fixed
/// --debug` checks it).
#[inline(never)]
fn add_callout_entry<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    name: &str,
) -> Result<(), Status> {
    engine.add_callout(
        irql,
        &CalloutEntry::<L>::new(callout)
            .name(name)
            .provider(PROVIDER),
    )?;
    Ok(())
}

/// The terminating filter `filter` that hands outbound TCP connections to `callout`.
#[inline(never)]
fn tcp_filter<'a, L: Layer>(filter: Guid, callout: CalloutKey<L>, name: &'a str) -> WfpFilter<'a, L>
where
    fields::IpProtocol: Field<L>,
{
    WfpFilter::<L>::new(filter)
        .name(name)
        .provider(PROVIDER)
        .sublayer(SUBLAYER)
        .action(FilterAction::CalloutTerminating(callout))
        .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
}

/// Adds the callout entry `callout` at layer `L` and the terminating filter `filter` that hands
/// it every TCP connection attempt.
fn add_connect_filter<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    filter: Guid,
    name: &str,
) -> Result<(), Status>
where
    fields::IpProtocol: Field<L>,
{
    add_callout_entry::<L>(irql, engine, callout, name)?;
    let filter = tcp_filter::<L>(filter, callout, name);
    engine.add_filter(irql, &filter)?;
    Ok(())
}
