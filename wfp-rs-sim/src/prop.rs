//! A property harness for any driver: random workloads and fault plans on
//! [deterministic](crate::Machine::deterministic) machines, the invariants every driver must
//! keep, the driver's own properties, and failing cases shrunk to a minimal one.
//!
//! A [`Case`] is a workload — connections in and out, over IPv4 and IPv6, from one or more
//! caller contexts at their own pace, each with the answer the simulated service should give
//! when asked about it ([`Answer`]: a verdict, garbage, silence until the driver's deadline,
//! hanging up, or an allow sent late) and what it does once established ([`Data`]: a packet,
//! perhaps after a policy change that reauthorizes it) — and a [`FaultPlan`] (allocation
//! failures from the Nth allocation of the workload, unload while the callers connect, the
//! service restarted after it hung up, user mode cancelling its pending requests, the clock
//! jumping). [`Harness::check`] generates one case per seed (with
//! [`proptest`](mod@proptest)'s strategies), runs it on a machine deterministic in the same
//! seed, and checks:
//!
//! - every connection was decided exactly once: [`Machine::connect`] returned (it waits for a
//!   pended classification's completion), each classification the driver pended was followed by
//!   one decision at its layer (the completion's or the reauthorization's; at
//!   `ALE_AUTH_RECV_ACCEPT`, which is not reauthorized, at most the reinjected packet's), and no
//!   classification is still pended once the callers are done;
//! - the driver unloads ([`Machine::unload_driver`] succeeds) and leaves nothing: no pool block,
//!   no pended classification, no I/O request pending (the simulator's own unload checks stop
//!   the machine on a work item, timer or handle still alive);
//! - the driver's own properties, closures over the [`Run`] ([`Harness::property`]).
//!
//! And it counts the cases that reached each effect the driver's author names
//! ([`Harness::effect`]: a pended connection, a reply refused, a flow cut), failing
//! [`Harness::assert_holds`] if one was never reached: a property whose situation never comes up
//! holds vacuously.
//!
//! A failing case shrinks (proptest's value trees: fewer connections, fewer faults, simpler
//! answers) to a minimal one that still fails, which [`Counterexample`] prints with its seed and
//! the command that replays it: `WFP_SIM_SEED=<seed>` makes `check` run that seed only, and the
//! same seed gives the same case, the same schedule and the same shrinking.
//!
//! A bug check ends the process, as it stops Windows (see [`run_isolated`](crate::run_isolated)).
//! [`Harness::check`] puts the case it runs into the stop report ([`Machine::set_stop_note`]),
//! with its seed and the replay command, so a bug check found by a random case replays too
//! (also an allocation failure that driver code cannot handle, `Box::new` on a low-memory path,
//! which aborts from the allocator: its report is written without allocating, with the note and
//! the seed); it does not shrink. [`Harness::check_isolated`] runs the cases in child processes
//! instead, so that a bug check is a failure like any other, shrunk like any other.
//!
//! ```
//! use wfp_rs_sim::prop::{Harness, ServiceBody};
//!
//! // A driver that registers nothing: every connection is permitted by the filter engine.
//! #[wfp_rs::driver_entry]
//! fn entry(
//!     _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
//!     _driver: &mut wfp_rs::driver::Driver<'_>,
//! ) -> Result<(), wfp_rs::Status> {
//!     Ok(())
//! }
//!
//! let harness = Harness::new("nothing", DriverEntry, |_machine, _case| -> ServiceBody<'_, ()> {
//!     Box::new(|| ())
//! })
//! .property("nothing is blocked", |run| {
//!     match run.outcomes.iter().find(|(_, o)| o.decision.action != wfp_rs::classify::Action::Permit) {
//!         Some((c, _)) => Err(format!("pid {} was blocked", c.pid)),
//!         None => Ok(()),
//!     }
//! });
//! harness.assert_holds(0..4);
//! ```

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction;

use crate::{AleIrql, ConnectOutcome, Connection, Decision, DriverEntryFn, Machine};

/// What the simulated service should do when the driver asks it about a connection. The
/// harness does not play the service: the driver's own service closure
/// ([`Harness::new`]) reads the answer for the process it was asked about
/// ([`Case::answer_for`]) and acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Answer {
    /// Allow the connection.
    Allow,
    /// Block it.
    Block,
    /// Reply with something the driver must refuse (too short, wrong magic, another process).
    Malformed,
    /// Never reply: the driver's deadline passes (virtual time jumps to it when every context
    /// waits).
    Silent,
    /// Disconnect (the service is killed) instead of replying, and answer nothing after —
    /// unless the fault plan restarts it ([`FaultPlan::service_restart`]).
    Hangup,
    /// Allow, but only after [`Case::reply_delay`] of virtual time, during which the service
    /// answers nothing else (it is one thread, busy). The delay may be shorter or longer than
    /// the driver's deadline: a reply that comes after the driver gave up must be refused.
    Delayed,
}

/// What a connection does once it is established, after [`Machine::connect`] returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Data {
    /// Nothing.
    #[default]
    None,
    /// One packet of the connection crosses the transport layer ([`Machine::packet`]), in the
    /// connection's direction.
    Packet,
    /// Another provider changes the policy at the flow-authorizing layers
    /// ([`Machine::another_provider_changes_policy`]), then one packet crosses the transport
    /// layer: the flow is reauthorized first (`FWP_CONDITION_FLAG_IS_REAUTHORIZE`, reason
    /// `POLICY_CHANGE`), and cut if the reauthorization does not permit it.
    AfterPolicyChange,
}

/// One connection attempt of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionCase {
    /// The process id, unique in its case (the service's answer is looked up by it).
    pub pid: u64,
    /// Accepted from outside (`ALE_AUTH_RECV_ACCEPT`) instead of connecting out.
    pub inbound: bool,
    /// IPv6 instead of IPv4.
    pub ipv6: bool,
    /// UDP instead of TCP.
    pub udp: bool,
    /// The IRQL the ALE authorization layers run at.
    pub irql: AleIrql,
    /// Which caller context makes the attempt (callers connect concurrently, each in order).
    pub caller: usize,
    /// What the service should answer when asked about it.
    pub answer: Answer,
    /// What the connection does once established (nothing if it was not).
    pub data: Data,
    /// How long its caller waits (virtual time, [`Machine::sleep`]) before the attempt: the
    /// workload's pace, so that an attempt can come while the service is busy, gone or back.
    pub pause: core::time::Duration,
}

/// The application every connection of a generated workload comes from.
pub const APP: &str = r"\device\harddiskvolume3\program files\prop\app.exe";

impl ConnectionCase {
    /// The attempt as [`Machine::connect`] takes it: local port `40000 + pid % 20000`, remote
    /// `192.0.2.80:443` or `[2001:db8::80]:443` (outbound; inbound the local side listens on
    /// 443 and the remote port varies).
    pub fn connection(&self) -> Connection {
        let (local_ip, remote_ip): (IpAddr, IpAddr) = if self.ipv6 {
            (
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80).into(),
            )
        } else {
            (
                Ipv4Addr::new(10, 0, 0, 1).into(),
                Ipv4Addr::new(192, 0, 2, 80).into(),
            )
        };
        let ephemeral = 40_000 + u16::try_from(self.pid % 20_000).unwrap_or(0);
        let (local_port, remote_port, direction) = if self.inbound {
            (443, ephemeral, Direction::Inbound)
        } else {
            (ephemeral, 443, Direction::Outbound)
        };
        Connection {
            pid: self.pid,
            app: APP.to_owned(),
            protocol: if self.udp {
                IpProtocol::Udp
            } else {
                IpProtocol::Tcp
            },
            local: SocketAddr::new(local_ip, local_port),
            remote: SocketAddr::new(remote_ip, remote_port),
            direction,
        }
    }
}

/// Allocation failure at the Nth allocation: `skip` allocations succeed and the next `count`
/// fail ([`Machine::fail_allocations_in`]), counted from the end of the plan's window before
/// (the first: from the start of the workload, once the driver loaded and its service started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationFailure {
    /// Allocations that succeed first.
    pub skip: u64,
    /// Allocations that fail then.
    pub count: u64,
}

/// The faults of a case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Windows of pool allocations that fail, in order; the first counted from the start of the
    /// workload, each other from the end of the one before.
    pub allocation_failures: Vec<AllocationFailure>,
    /// Unload from a context of its own, concurrently with the callers (the schedule decides
    /// when it runs), instead of after every connection was decided.
    pub unload_while_connecting: bool,
    /// After the service hung up ([`Answer::Hangup`]), start it again once this much virtual
    /// time has passed: the harness calls the driver's `start_service` again (from the
    /// service's context, perhaps while the driver unloads) and runs the new body. Generated
    /// only for cases with a hang-up.
    pub service_restart: Option<core::time::Duration>,
    /// After this much virtual time, user mode cancels every request it has pending on the
    /// driver's devices ([`Machine::cancel_io_requests`]: `CancelIoEx`, as a service does when
    /// it stops waiting); the service's body sees them complete with `STATUS_CANCELLED`. No
    /// effect on a driver that user mode reaches only through communication ports.
    pub cancel_io_after: Option<core::time::Duration>,
    /// The clock jumps ([`Machine::advance_clock`]): the interrupt time counts time the machine
    /// spent asleep, so on resume every deadline and timer that passed meanwhile is due at once.
    pub clock_jump: Option<ClockJump>,
}

/// A jump of the machine's clock ([`FaultPlan::clock_jump`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockJump {
    /// When, in virtual time from the start of the workload.
    pub after: core::time::Duration,
    /// By how much.
    pub by: core::time::Duration,
}

impl FaultPlan {
    /// Whether the plan has no fault.
    pub fn is_empty(&self) -> bool {
        self.allocation_failures.is_empty()
            && !self.unload_while_connecting
            && self.service_restart.is_none()
            && self.cancel_io_after.is_none()
            && self.clock_jump.is_none()
    }
}

/// One generated case: the workload, the faults, and the seed of the machine's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The seed of the [deterministic](Machine::deterministic) machine the case runs on (the
    /// seed the case was generated from: shrinking keeps it).
    pub schedule_seed: u64,
    /// The connection attempts, in the order each caller makes its own.
    pub connections: Vec<ConnectionCase>,
    /// The faults.
    pub faults: FaultPlan,
    /// How long the service waits before a [`Answer::Delayed`] reply, in virtual time.
    pub reply_delay: core::time::Duration,
}

impl Case {
    /// The answer the service should give about process `pid` (`None`: no connection of the
    /// case has that pid).
    pub fn answer_for(&self, pid: u64) -> Option<Answer> {
        self.connections
            .iter()
            .find(|c| c.pid == pid)
            .map(|c| c.answer)
    }

    /// Whether any connection's answer is [`Answer::Hangup`] (after which the service answers
    /// nothing, unless it is restarted).
    pub fn service_hangs_up(&self) -> bool {
        self.connections.iter().any(|c| c.answer == Answer::Hangup)
    }

    /// Whether any connection's answer is [`Answer::Delayed`]: the service is then busy for
    /// [`reply_delay`](Self::reply_delay), and the questions behind that one wait too.
    pub fn service_delays(&self) -> bool {
        self.connections.iter().any(|c| c.answer == Answer::Delayed)
    }

    /// Whether another provider changes the policy in this case ([`Data::AfterPolicyChange`]):
    /// every flow established before is then reauthorized at its next packet, including
    /// flows whose own data is only [`Data::Packet`].
    pub fn changes_policy(&self) -> bool {
        self.connections
            .iter()
            .any(|c| c.data == Data::AfterPolicyChange)
    }
}

/// What the workloads are made of: the generator's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// At most this many connections per case (at least one).
    pub max_connections: usize,
    /// Caller contexts (at least one).
    pub callers: usize,
    /// Generate inbound connections too.
    pub inbound: bool,
    /// Generate IPv6 connections too.
    pub ipv6: bool,
    /// Generate UDP connections too.
    pub udp: bool,
    /// The answers the service may be told to give, each equally likely (list one twice to make
    /// it likelier).
    pub answers: Vec<Answer>,
    /// Generate fault plans (otherwise every plan is empty).
    pub faults: bool,
    /// The largest `skip` of an [`AllocationFailure`].
    pub max_allocation_skip: u64,
    /// Generate data on established connections, and policy changes that reauthorize them
    /// ([`Data`]).
    pub data: bool,
    /// The longest [`Case::reply_delay`] (make it longer than the driver's deadline, so that
    /// some delayed replies come too late).
    pub max_reply_delay: core::time::Duration,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            max_connections: 6,
            callers: 2,
            inbound: true,
            ipv6: true,
            udp: false,
            // Verdicts likelier than the faults among the answers.
            answers: vec![
                Answer::Allow,
                Answer::Allow,
                Answer::Block,
                Answer::Block,
                Answer::Malformed,
                Answer::Silent,
                Answer::Hangup,
                Answer::Delayed,
            ],
            faults: true,
            max_allocation_skip: 24,
            data: true,
            max_reply_delay: core::time::Duration::from_secs(1),
        }
    }
}

/// What happened in one case, for the driver's properties.
#[derive(Debug)]
pub struct Run<S> {
    /// The case.
    pub case: Case,
    /// Each connection (in the case's order) with what [`Machine::connect`] returned.
    pub outcomes: Vec<(ConnectionCase, ConnectOutcome)>,
    /// Each established connection that sent data ([`ConnectionCase::data`]), in the case's
    /// order, with what became of its packet.
    pub packets: Vec<(ConnectionCase, PacketOutcome)>,
    /// What the service closure returned (what it saw).
    pub service: S,
    /// What the restarted service's body returned, when the fault plan restarted it
    /// ([`FaultPlan::service_restart`]) after it hung up.
    pub restarted_service: Option<S>,
    /// The driver's debugger output (`DbgPrintEx`), as [`Machine::debug_output`] gave it after
    /// unload.
    pub debug_output: Vec<String>,
}

/// What became of an established connection's packet ([`Data`]).
#[derive(Clone, Copy, Debug)]
pub struct PacketOutcome {
    /// The flow's handle.
    pub flow_handle: u64,
    /// The filter engine's decision for the packet: the transport layer's, or the stack's drop
    /// when the flow was cut (by this packet's reauthorization or an earlier one).
    pub decision: Decision,
    /// Whether a reauthorization that did not permit the flow tore it down
    /// ([`Machine::is_flow_cut`]).
    pub cut: bool,
}

/// The body of a simulated service, which the harness runs as a context of the machine
/// ([`Machine::spawn`]). It must return once the driver has unloaded (a port client's
/// `get_message` returns `None` when the driver closes the port, for example) or once it hung
/// up; what it returns goes to the properties ([`Run::service`], [`Run::restarted_service`]).
pub type ServiceBody<'m, S> = Box<dyn FnOnce() -> S + Send + 'm>;

type StartService<S> = dyn for<'m> Fn(&'m Machine, &Case) -> ServiceBody<'m, S> + Sync;
type Property<S> = dyn Fn(&Run<S>) -> Result<(), String> + Sync;

type Reached<S> = dyn Fn(&Run<S>) -> bool + Sync;

/// An effect a case may reach ([`Harness::effect`]), and how many checked cases did.
struct Effect<S> {
    name: String,
    reached: Box<Reached<S>>,
    cases: AtomicU64,
}

/// A failed check: which invariant or property, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The invariant's or property's name.
    pub property: String,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.property, self.message)
    }
}

/// A case that failed, shrunk.
#[derive(Clone, Debug)]
pub struct Counterexample {
    /// The seed the failing case was generated from (`WFP_SIM_SEED` replays it).
    pub seed: u64,
    /// How many cases ran before it (itself included), over every seed checked.
    pub cases_run: u64,
    /// The case as generated.
    pub original: Case,
    /// The smallest case that still failed.
    pub minimal: Case,
    /// How the minimal case failed.
    pub failure: Failure,
    /// How many shrunk cases were run.
    pub shrink_runs: u32,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "property harness: the case of seed {} failed (case {} of the run; {} shrinking runs)",
            self.seed, self.cases_run, self.shrink_runs
        )?;
        writeln!(f, "failure: {}", self.failure)?;
        writeln!(f, "minimal case: {:#?}", self.minimal)?;
        write!(f, "{}", crate::kernel::sched::replay_hint(self.seed))
    }
}

/// The most shrinking runs for one failing case.
const MAX_SHRINK_RUNS: u32 = 256;

/// What an isolated child of [`Harness::check_isolated`] runs (see `run_in_child`).
const ISOLATED_RUN_VARIABLE: &str = "WFP_SIM_PROP_RUN";
/// How a child reports a failed case: this, the seed, the property, the message's lines (each
/// after `| `), then [`CHILD_END`].
const CHILD_FAILED: &str = "wfp-rs property harness: a case failed, seed ";
const CHILD_END: &str = "wfp-rs property harness: end of failure";
/// How a scanning child reports an effect's count: this, the effect's index, a space, the count.
const CHILD_EFFECT: &str = "wfp-rs property harness: effect ";
/// The stop note's opening, before the seed: how the parent finds which case bug-checked.
const CASE_NOTE_PREFIX: &str = "property harness: running the case of seed ";

/// `seeds`, or the one seed `WFP_SIM_SEED` names.
fn seeds_to_check(seeds: core::ops::Range<u64>) -> core::ops::Range<u64> {
    match std::env::var(crate::SEED_VARIABLE) {
        Ok(seed) => {
            let seed = seed
                .trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{}={seed:?} is not a seed", crate::SEED_VARIABLE));
            seed..seed.saturating_add(1)
        }
        Err(_) => seeds,
    }
}

/// Proptest's own shrinking loop: simplify while the case fails, complicate (step back towards
/// the last failing value) while it passes. `run` runs a candidate, given too as the steps that
/// lead to it from the generated case (`s` simplify, `c` complicate), for a child process to
/// rebuild it.
fn shrink(
    tree: &mut impl ValueTree<Value = Case>,
    mut minimal: Case,
    mut failure: Failure,
    mut run: impl FnMut(&Case, &str) -> Result<(), Failure>,
) -> (Case, Failure, u32) {
    let mut runs = 0;
    let mut steps = String::from("s");
    if !tree.simplify() {
        return (minimal, failure, runs);
    }
    while runs < MAX_SHRINK_RUNS {
        runs += 1;
        let candidate = tree.current();
        match run(&candidate, &steps) {
            Err(f) => {
                minimal = candidate;
                failure = f;
                steps.push('s');
                if !tree.simplify() {
                    break;
                }
            }
            Ok(()) => {
                steps.push('c');
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    (minimal, failure, runs)
}

/// The property harness for one driver; see the [module](self).
pub struct Harness<S> {
    name: String,
    entry: DriverEntryFn,
    start_service: Box<StartService<S>>,
    properties: Vec<(String, Box<Property<S>>)>,
    effects: Vec<Effect<S>>,
    generation: Generation,
}

impl<S> fmt::Debug for Harness<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("name", &self.name)
            .field("generation", &self.generation)
            .field(
                "properties",
                &self.properties.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "effects",
                &self
                    .effects
                    .iter()
                    .map(|e| (&e.name, e.cases.load(Ordering::Relaxed)))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<S: Send> Harness<S> {
    /// A harness for the driver loaded as `name` with `entry`. `start_service` starts its
    /// service side for a case: it runs on the harness's thread once the driver is loaded (to
    /// connect a port client, open a device), and returns the service's body, which the harness
    /// runs as a context of the machine beside the callers.
    ///
    /// When the fault plan restarts the service ([`FaultPlan::service_restart`]),
    /// `start_service` is called a second time, from the service's context and perhaps while
    /// the driver unloads or after it has: if it cannot connect then, it must return a body that
    /// returns at once (as a real service finds no driver to talk to), not panic.
    pub fn new(
        name: &str,
        entry: DriverEntryFn,
        start_service: impl for<'m> Fn(&'m Machine, &Case) -> ServiceBody<'m, S> + Sync + 'static,
    ) -> Self {
        Harness {
            name: name.to_owned(),
            entry,
            start_service: Box::new(start_service),
            properties: Vec::new(),
            effects: Vec::new(),
            generation: Generation::default(),
        }
    }

    /// Adds an effect the workloads should reach — a pended connection, a reply refused, a
    /// flow cut — counted over the cases [`check`](Self::check) runs (each case that passed
    /// and for which `reached` holds; shrinking runs do not count).
    /// [`assert_holds`](Self::assert_holds) prints the counts and fails if an effect was never
    /// reached, so that a property that holds only because its situation never came up (a
    /// generator change, a fault that stopped reaching the driver) does not pass unnoticed.
    #[must_use]
    pub fn effect(
        mut self,
        name: &str,
        reached: impl Fn(&Run<S>) -> bool + Sync + 'static,
    ) -> Self {
        self.effects.push(Effect {
            name: name.to_owned(),
            reached: Box::new(reached),
            cases: AtomicU64::new(0),
        });
        self
    }

    /// Each effect ([`effect`](Self::effect)) with how many checked cases reached it so far.
    pub fn effects(&self) -> Vec<(String, u64)> {
        self.effects
            .iter()
            .map(|e| (e.name.clone(), e.cases.load(Ordering::Relaxed)))
            .collect()
    }

    /// Adds a property of the driver's own, checked after every case that kept the invariants:
    /// `Err` with what was wrong fails the case.
    #[must_use]
    pub fn property(
        mut self,
        name: &str,
        check: impl Fn(&Run<S>) -> Result<(), String> + Sync + 'static,
    ) -> Self {
        self.properties.push((name.to_owned(), Box::new(check)));
        self
    }

    /// Replaces the generator's bounds ([`Generation::default`] otherwise).
    #[must_use]
    pub fn generation(mut self, generation: Generation) -> Self {
        self.generation = generation;
        self
    }

    /// The strategy that generates cases for `seed` (the schedule seed is `seed`).
    fn strategy(&self, seed: u64) -> impl Strategy<Value = Case> + use<S> {
        let g = self.generation.clone();
        let answers = if g.answers.is_empty() {
            vec![Answer::Allow]
        } else {
            g.answers.clone()
        };
        let callers = g.callers.max(1);
        // Simpler first, for shrinking: outbound, IPv4, TCP, PASSIVE_LEVEL, caller 0, and the
        // answers in the order given.
        let connection = (
            any::<bool>().prop_map(move |b| b && g.inbound),
            any::<bool>().prop_map(move |b| b && g.ipv6),
            any::<bool>().prop_map(move |b| b && g.udp),
            any::<bool>(),
            0..callers,
            0..answers.len(),
            // None first (simplest), then a packet, then a policy change before it.
            (0..3u8).prop_map(move |d| match d {
                _ if !g.data => Data::None,
                0 => Data::None,
                1 => Data::Packet,
                _ => Data::AfterPolicyChange,
            }),
            // Most attempts at once, some after up to a second.
            prop_oneof![2 => Just(0u64), 1 => 0..=1000u64],
        )
            .prop_map(
                move |(inbound, ipv6, udp, dispatch, caller, answer, data, pause)| ConnectionCase {
                    pid: 0,
                    inbound,
                    ipv6,
                    udp,
                    irql: if dispatch {
                        AleIrql::Dispatch
                    } else {
                        AleIrql::Passive
                    },
                    caller,
                    answer: answers[answer],
                    data,
                    pause: core::time::Duration::from_millis(pause),
                },
            );
        let connections = proptest::collection::vec(connection, 1..=g.max_connections.max(1));
        let faults = (
            // None, one window or up to three (simpler first, for shrinking); the first few
            // allocations after load more often: most drivers allocate a little per connection,
            // and a workload has a few connections.
            {
                let window = (
                    prop_oneof![
                        3 => 0..=g.max_allocation_skip.min(4),
                        1 => 0..=g.max_allocation_skip,
                    ],
                    1..=3u64,
                );
                prop_oneof![
                    2 => Just(Vec::new()),
                    2 => proptest::collection::vec(window.clone(), 1..=1),
                    1 => proptest::collection::vec(window, 2..=3),
                ]
            },
            // One case in four: an unload early in the schedule decides most connections
            // without the driver, so more would leave fewer cases that exercise it.
            proptest::bool::weighted(0.25),
            // A restart (kept only for cases where the service hangs up), in whole
            // milliseconds up to a second: at once, or after questions went unanswered.
            proptest::option::of(prop_oneof![Just(0u64), 0..=1000u64]),
            // One case in five each: user mode cancels its requests, the clock jumps (by a
            // second, a minute or an hour: past deadlines, cache lifetimes, everything).
            proptest::option::weighted(0.2, 0..=1000u64),
            proptest::option::weighted(
                0.2,
                (0..=1000u64, prop_oneof![Just(1u64), Just(60), Just(3600)]),
            ),
        )
            .prop_map(move |(allocation, unload, restart, cancel, jump)| {
                if g.faults {
                    FaultPlan {
                        allocation_failures: allocation
                            .into_iter()
                            .map(|(skip, count)| AllocationFailure { skip, count })
                            .collect(),
                        unload_while_connecting: unload,
                        service_restart: restart.map(core::time::Duration::from_millis),
                        cancel_io_after: cancel.map(core::time::Duration::from_millis),
                        clock_jump: jump.map(|(after, by)| ClockJump {
                            after: core::time::Duration::from_millis(after),
                            by: core::time::Duration::from_secs(by),
                        }),
                    }
                } else {
                    FaultPlan::default()
                }
            });
        let max_delay_ms =
            u64::try_from(self.generation.max_reply_delay.as_millis()).unwrap_or(u64::MAX);
        (connections, faults, 0..=max_delay_ms).prop_map(
            move |(mut connections, mut faults, delay_ms)| {
                // Pids by position, so that they stay unique (and small) as the case shrinks.
                for (index, c) in connections.iter_mut().enumerate() {
                    c.pid = 101 + index as u64;
                }
                if !connections.iter().any(|c| c.answer == Answer::Hangup) {
                    faults.service_restart = None;
                }
                Case {
                    schedule_seed: seed,
                    connections,
                    faults,
                    reply_delay: core::time::Duration::from_millis(delay_ms),
                }
            },
        )
    }

    /// Generates the case of `seed`.
    pub fn case(&self, seed: u64) -> Case {
        self.tree(seed).current()
    }

    fn tree(&self, seed: u64) -> impl ValueTree<Value = Case> + use<S> {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
        );
        self.strategy(seed)
            .new_tree(&mut runner)
            .expect("the case strategy never rejects")
    }

    /// Checks one case for each seed in `seeds` (or, when `WFP_SIM_SEED` is set, that seed
    /// only), and shrinks the first that fails. Returns how many cases ran.
    ///
    /// # Errors
    ///
    /// The first failing case, shrunk.
    ///
    /// # Panics
    ///
    /// When `WFP_SIM_SEED` is set but not a number.
    pub fn check(&self, seeds: core::ops::Range<u64>) -> Result<u64, Box<Counterexample>> {
        let mut cases_run = 0;
        for seed in seeds_to_check(seeds) {
            cases_run += 1;
            let mut tree = self.tree(seed);
            let original = tree.current();
            let Err(failure) = self.run_counting(&original, seed, true) else {
                continue;
            };
            let (minimal, failure, shrink_runs) =
                shrink(&mut tree, original.clone(), failure, |case, _| {
                    self.run_case(case, seed)
                });
            return Err(Box::new(Counterexample {
                seed,
                cases_run,
                original,
                minimal,
                failure,
                shrink_runs,
            }));
        }
        Ok(cases_run)
    }

    /// [`check`](Self::check), panicking with the counterexample.
    ///
    /// # Panics
    ///
    /// When a case fails: the message is the [`Counterexample`] (minimal case, seed, replay
    /// command).
    #[track_caller]
    pub fn assert_holds(&self, seeds: core::ops::Range<u64>) {
        if let Err(counterexample) = self.check(seeds) {
            panic!("{counterexample}");
        }
        self.assert_effects_reached();
    }

    /// Prints each effect's count, and panics if one was never reached — unless `WFP_SIM_SEED`
    /// replays one seed, whose case need not reach them all.
    #[track_caller]
    fn assert_effects_reached(&self) {
        let effects = self.effects();
        for (name, cases) in &effects {
            std::eprintln!("{}: {name}: {cases} case(s)", self.name);
        }
        if std::env::var(crate::SEED_VARIABLE).is_err()
            && let Some((name, _)) = effects.iter().find(|(_, cases)| *cases == 0)
        {
            panic!(
                "property harness: no case reached the effect {name:?} (the workloads or faults \
                 no longer bring it about, and the properties that need it hold vacuously)"
            );
        }
    }

    /// [`check`](Self::check), with every case run in a child process (see
    /// [`run_isolated`](crate::run_isolated)), so that a case that bug-checks — which ends the
    /// process it runs in, as it stops Windows — is a failure like any other ("no bug check",
    /// with the stop code, parameters and explanation), shrunk like any other, each candidate in
    /// a child of its own. `test_name` is the calling test's libtest name (`module::test`,
    /// without the crate name), which the children re-run.
    ///
    /// One child runs the seeds in order until a case fails (about as fast as `check`); only a
    /// failure costs a child per shrinking run.
    ///
    /// # Errors
    ///
    /// The first failing case, shrunk.
    ///
    /// # Panics
    ///
    /// When `WFP_SIM_SEED` is set but not a number, or a child ends in a way it cannot
    /// (`test_name` is wrong, the harness itself panicked): the message has the child's stderr.
    pub fn check_isolated(
        &self,
        test_name: &str,
        seeds: core::ops::Range<u64>,
    ) -> Result<u64, Box<Counterexample>> {
        if let Ok(mode) = std::env::var(ISOLATED_RUN_VARIABLE) {
            // In a child: run what the parent asked for, report it on stderr, and exit.
            crate::run_isolated_with(test_name, &[], || self.run_in_child(&mode));
        }
        let seeds = seeds_to_check(seeds);
        let first = seeds.start;
        let scan = self.run_child(test_name, &format!("scan:{}:{}", seeds.start, seeds.end));
        let Some((seed, failure)) = scan else {
            return Ok(seeds.end.saturating_sub(seeds.start));
        };
        let mut tree = self.tree(seed);
        let original = tree.current();
        let (minimal, failure, shrink_runs) =
            shrink(&mut tree, original.clone(), failure, |_, steps| match self
                .run_child(test_name, &format!("case:{seed}:{steps}"))
            {
                Some((_, failure)) => Err(failure),
                None => Ok(()),
            });
        Err(Box::new(Counterexample {
            seed,
            cases_run: seed - first + 1,
            original,
            minimal,
            failure,
            shrink_runs,
        }))
    }

    /// [`check_isolated`](Self::check_isolated), panicking with the counterexample.
    ///
    /// # Panics
    ///
    /// When a case fails (a bug check included): the message is the [`Counterexample`].
    #[track_caller]
    pub fn assert_holds_isolated(&self, test_name: &str, seeds: core::ops::Range<u64>) {
        if let Err(counterexample) = self.check_isolated(test_name, seeds) {
            panic!("{counterexample}");
        }
        self.assert_effects_reached();
    }

    /// Runs a child for `mode`; `Some` with the seed and the failure if a case failed. The
    /// effects a scanning child counted are added to this harness's.
    fn run_child(&self, test_name: &str, mode: &str) -> Option<(u64, Failure)> {
        let child = crate::run_isolated_with(test_name, &[(ISOLATED_RUN_VARIABLE, mode)], || {});
        for line in child.stderr.lines() {
            let Some((index, cases)) = line
                .strip_prefix(CHILD_EFFECT)
                .and_then(|rest| rest.split_once(' '))
            else {
                continue;
            };
            if let (Ok(index), Ok(cases)) = (index.parse::<usize>(), cases.parse::<u64>())
                && let Some(effect) = self.effects.get(index)
            {
                effect.cases.fetch_add(cases, Ordering::Relaxed);
            }
        }
        if let Some(stop) = &child.bugcheck {
            let seed = child
                .stderr
                .split(CASE_NOTE_PREFIX)
                .nth(1)
                .and_then(|rest| rest.split(' ').next()?.parse::<u64>().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "property harness: a child stopped outside a case\n--- child stderr ---\n{}",
                        child.stderr
                    )
                });
            let params = stop.params.map(|p| format!("{p:#x}")).join(", ");
            return Some((
                seed,
                Failure {
                    property: "no bug check".to_owned(),
                    message: format!(
                        "{} ({params}): {}; in: {}; at: {}",
                        stop.code, stop.explanation, stop.routine, stop.location
                    ),
                },
            ));
        }
        if let Some(report) = child.stderr.split(CHILD_FAILED).nth(1) {
            let mut lines = report.lines();
            let seed = lines.next().and_then(|l| l.trim().parse::<u64>().ok());
            let property = lines.next().map(ToOwned::to_owned);
            let message: Vec<&str> = lines
                .take_while(|l| *l != CHILD_END)
                .map(|l| l.strip_prefix("| ").unwrap_or(l))
                .collect();
            if let (Some(seed), Some(property)) = (seed, property) {
                return Some((
                    seed,
                    Failure {
                        property,
                        message: message.join("\n"),
                    },
                ));
            }
        }
        assert!(
            child.completed,
            "property harness: a child ended without a result (is `{test_name}` the test's \
             name?)\n--- child stderr ---\n{}",
            child.stderr
        );
        None
    }

    /// In a child: `scan:<first>:<end>` runs the seeds' cases until one fails;
    /// `case:<seed>:<steps>` runs the case of `seed` after the shrinking steps (`s` simplify,
    /// `c` complicate). A failure is written to stderr for [`run_child`](Self::run_child).
    fn run_in_child(&self, mode: &str) {
        let fields: Vec<&str> = mode.split(':').collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (seeds, steps) = match (fields.first(), number(1), number(2)) {
            (Some(&"scan"), Some(first), Some(end)) => (first..end, None),
            (Some(&"case"), Some(seed), _) => (seed..seed + 1, fields.get(2).copied()),
            _ => panic!("property harness: {ISOLATED_RUN_VARIABLE}={mode:?} is not a mode"),
        };
        for seed in seeds {
            let mut tree = self.tree(seed);
            for step in steps.unwrap_or_default().chars() {
                let _ = if step == 's' {
                    tree.simplify()
                } else {
                    tree.complicate()
                };
            }
            if let Err(failure) = self.run_counting(&tree.current(), seed, steps.is_none()) {
                let mut report = format!("{CHILD_FAILED}{seed}\n{}\n", failure.property);
                for line in failure.message.lines() {
                    report.push_str("| ");
                    report.push_str(line);
                    report.push('\n');
                }
                eprintln!("{report}{CHILD_END}");
                return;
            }
        }
        for (index, effect) in self.effects.iter().enumerate() {
            eprintln!(
                "{CHILD_EFFECT}{index} {}",
                effect.cases.load(Ordering::Relaxed)
            );
        }
    }

    /// Runs `case` on a fresh deterministic machine and checks the invariants and the
    /// properties. `seed` is the seed the case was generated from, for the stop report.
    ///
    /// # Errors
    ///
    /// The first invariant or property that did not hold.
    pub fn run_case(&self, case: &Case, seed: u64) -> Result<(), Failure> {
        self.run_counting(case, seed, false)
    }

    /// [`run_case`](Self::run_case), counting the effects the case reached if it passed and
    /// `count` is set.
    fn run_counting(&self, case: &Case, seed: u64, count: bool) -> Result<(), Failure> {
        let fail = |property: &str, message: String| Failure {
            property: property.to_owned(),
            message,
        };
        let machine = Machine::deterministic(case.schedule_seed);
        machine.set_stop_note(Some(format!(
            "{CASE_NOTE_PREFIX}{seed} (or a case shrunk from it), \
             replayed by WFP_SIM_SEED={seed} with the same test: {case:?}"
        )));
        let driver = machine
            .load_driver(&self.name, self.entry)
            .map_err(|status| fail("the driver loads", format!("{status}")))?;
        let callers = case
            .connections
            .iter()
            .map(|c| c.caller)
            .max()
            .map_or(0, |m| m + 1);
        let mut driver = Some(driver);
        let (outcomes, callers_panicked, still_pended, unloaded, service) =
            std::thread::scope(|scope| {
                let machine = &machine;
                let body = (self.start_service)(machine, case);
                // Armed once the service has started: the faults are the workload's, not the
                // test setup's.
                if !case.faults.allocation_failures.is_empty() {
                    let windows: Vec<(u64, u64)> = case
                        .faults
                        .allocation_failures
                        .iter()
                        .map(|a| (a.skip, a.count))
                        .collect();
                    machine.fail_allocations_in(&windows);
                }
                let start_service = &*self.start_service;
                let service = machine.spawn(scope, "service", move || {
                    let first = body();
                    let restarted = case.faults.service_restart.map(|after| {
                        machine.sleep(after);
                        start_service(machine, case)()
                    });
                    (first, restarted)
                });
                let timed_faults = (case.faults.cancel_io_after.is_some()
                    || case.faults.clock_jump.is_some())
                .then(|| machine.spawn(scope, "faults", move || timed_faults(machine, case)));
                let unloader = if case.faults.unload_while_connecting {
                    driver
                        .take()
                        .map(|d| machine.spawn(scope, "unloader", move || machine.unload_driver(d)))
                } else {
                    None
                };
                let running: Vec<_> = (0..callers)
                    .map(|caller| {
                        machine.spawn(scope, &format!("caller-{caller}"), move || {
                            case.connections
                                .iter()
                                .enumerate()
                                .filter(|(_, c)| c.caller == caller)
                                .map(|(index, c)| {
                                    if !c.pause.is_zero() {
                                        machine.sleep(c.pause);
                                    }
                                    let connection = c.connection();
                                    let outcome = machine.connect(&connection, c.irql);
                                    let packet = outcome
                                        .flow_handle
                                        .filter(|_| c.data != Data::None)
                                        .map(|flow_handle| {
                                            send_data(machine, c, &connection, flow_handle)
                                        });
                                    (index, outcome, packet)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                let mut outcomes: Vec<Option<(ConnectOutcome, Option<PacketOutcome>)>> =
                    vec![None; case.connections.len()];
                let mut callers_panicked = false;
                for caller in running {
                    match caller.join() {
                        Ok(done) => {
                            for (index, outcome, packet) in done {
                                outcomes[index] = Some((outcome, packet));
                            }
                        }
                        Err(_) => callers_panicked = true,
                    }
                }
                let still_pended = machine.pending_classifications();
                let unloaded = match (unloader, driver.take()) {
                    (Some(unloader), _) => unloader
                        .join()
                        .map_err(|_| "the unload panicked".to_owned())
                        .and_then(|r| r.map_err(|e| e.to_string())),
                    (None, Some(d)) => machine.unload_driver(d).map_err(|e| e.to_string()),
                    (None, None) => Ok(()),
                };
                let service = service.join();
                let faults_panicked = timed_faults.is_some_and(|f| f.join().is_err());
                (
                    outcomes,
                    callers_panicked || faults_panicked,
                    still_pended,
                    unloaded,
                    service,
                )
            });
        machine.fail_allocations(0, 0);
        if callers_panicked {
            return Err(fail(
                "every connection returns",
                "a caller panicked".to_owned(),
            ));
        }
        unloaded.map_err(|e| fail("the driver unloads", e))?;
        let (service, restarted_service) =
            service.map_err(|_| fail("the service returns", "the service panicked".to_owned()))?;
        if still_pended != 0 {
            return Err(fail(
                "every classification is decided exactly once",
                format!(
                    "{still_pended} classification(s) still pended after every connection returned"
                ),
            ));
        }
        let outcomes: Vec<(ConnectionCase, (ConnectOutcome, Option<PacketOutcome>))> = case
            .connections
            .iter()
            .cloned()
            .zip(outcomes)
            .map(|(c, o)| o.map(|o| (c, o)))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                fail(
                    "every connection returns",
                    "a connection has no outcome".to_owned(),
                )
            })?;
        let packets = outcomes
            .iter()
            .filter_map(|(c, (_, packet))| packet.map(|p| (c.clone(), p)))
            .collect();
        let outcomes: Vec<(ConnectionCase, ConnectOutcome)> =
            outcomes.into_iter().map(|(c, (o, _))| (c, o)).collect();
        for (c, outcome) in &outcomes {
            decided_once(outcome).map_err(|m| {
                fail(
                    "every classification is decided exactly once",
                    format!("pid {}: {m}", c.pid),
                )
            })?;
        }
        let left = machine.pool_blocks();
        if !left.is_empty() {
            return Err(fail(
                "nothing is left after unload",
                format!("pool blocks: {left:?}"),
            ));
        }
        let pended = machine.pending_classifications();
        if pended != 0 {
            return Err(fail(
                "nothing is left after unload",
                format!("{pended} pended classification(s)"),
            ));
        }
        let io = machine.pending_io_requests();
        if io != 0 {
            return Err(fail(
                "nothing is left after unload",
                format!("{io} I/O request(s) pending"),
            ));
        }
        let run = Run {
            case: case.clone(),
            outcomes,
            packets,
            service,
            restarted_service,
            debug_output: machine.debug_output(),
        };
        for (name, property) in &self.properties {
            let held = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| property(&run)))
                .unwrap_or_else(|_| Err("the property panicked".to_owned()));
            held.map_err(|m| fail(name, m))?;
        }
        if count {
            for effect in &self.effects {
                let reached = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    (effect.reached)(&run)
                }))
                .map_err(|_| fail(&effect.name, "the effect's closure panicked".to_owned()))?;
                if reached {
                    effect.cases.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// The faults that come at a time ([`FaultPlan::cancel_io_after`], [`FaultPlan::clock_jump`]),
/// in the order of their times, from a context of their own.
fn timed_faults(machine: &Machine, case: &Case) {
    let cancel = case.faults.cancel_io_after.map(|at| (at, None));
    let jump = case.faults.clock_jump.map(|j| (j.after, Some(j.by)));
    let mut events: Vec<_> = cancel.into_iter().chain(jump).collect();
    events.sort();
    let mut now = core::time::Duration::ZERO;
    for (at, jump_by) in events {
        if at > now {
            machine.sleep(at - now);
            now = at;
        }
        match jump_by {
            Some(by) => machine.advance_clock(by),
            None => {
                machine.cancel_io_requests();
            }
        }
    }
}

/// An established connection's data ([`ConnectionCase::data`]), after another provider's policy
/// change if the case says so.
fn send_data(
    machine: &Machine,
    c: &ConnectionCase,
    connection: &Connection,
    flow_handle: u64,
) -> PacketOutcome {
    if c.data == Data::AfterPolicyChange {
        machine.another_provider_changes_policy();
    }
    let decision = machine.packet(connection, flow_handle, connection.direction);
    PacketOutcome {
        flow_handle,
        decision,
        cut: machine.is_flow_cut(flow_handle),
    }
}

/// Whether `outcome` is one final decision at each layer: a pended classification is followed
/// by exactly one decision at its layer (the completion's, or the reauthorization's). At
/// `ALE_AUTH_RECV_ACCEPT` a completion causes no reauthorization: the layer is crossed again
/// only by a packet the callout reinjected, so at most once. (That the pend was completed at all
/// is [`Machine::connect`] returning, and no classification being pended afterwards.)
fn decided_once(outcome: &ConnectOutcome) -> Result<(), String> {
    for (at, (layer, decision)) in outcome.layers.iter().enumerate() {
        if decision.pending.is_none() {
            continue;
        }
        let after = outcome.layers[at + 1..]
            .iter()
            .filter(|(l, _)| l == layer)
            .count();
        let once = if layer.starts_with("ALE_AUTH_RECV_ACCEPT") {
            after <= 1
        } else {
            after == 1
        };
        if !once {
            return Err(format!(
                "{layer}: a pended classification followed by {after} decisions at its layer: {:?}",
                outcome.layers
            ));
        }
    }
    Ok(())
}
