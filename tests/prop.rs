//! The simulator's property harness (`wfp_rs_sim::prop`) finds and shrinks a driver's bug: a
//! test-only driver that blocks every inbound IPv6 TCP connection — except when an allocation
//! in its `classifyFn` fails, where it fails open. Only a case with an inbound IPv6 connection
//! and an allocation failure that reaches its classification shows it; the harness must find
//! one within a stated number of seeds and shrink it to that connection and that fault.

#![cfg(any(not(windows), feature = "sim"))]

use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, Match};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::AleAuthRecvAcceptV6;
use wfp_rs::layer::fields;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::AleIrql;
use wfp_rs_sim::prop::{
    AllocationFailure, Answer, Case, ConnectionCase, Data, FaultPlan, Generation, Harness, Run,
    ServiceBody,
};

const PROVIDER: Guid = guid!("6f1f0b0e-8a43-4d57-9a0f-3f0b6a1c5d21");
const SUBLAYER: Guid = guid!("0c5e7d32-94b1-4f4e-8d6e-2b7f1c9a4e10");
const CALLOUT: CalloutKey<AleAuthRecvAcceptV6> =
    CalloutKey::new(guid!("b7d2c8a4-51e3-4c0f-a6b9-7e2d9f3c1a58"));
const FILTER: Guid = guid!("e3a9f6d1-2c4b-4b8e-9f7a-5d1c8e2b6f94");

/// What the test driver does when its scratch buffer cannot be allocated.
#[derive(Clone, Copy)]
enum WithoutMemory {
    /// Permits (the bug: it should block).
    FailsOpen,
    /// Panics, which stops the machine (another bug).
    Panics,
    /// Does not check: allocates with `Vec::with_capacity`, whose failure aborts (`handle_alloc_error`).
    Assumes,
}

/// Blocks, after taking a scratch buffer; without one, see [`WithoutMemory`].
struct FailsOpenWithoutMemory {
    without: WithoutMemory,
}

impl Callout<AleAuthRecvAcceptV6> for FailsOpenWithoutMemory {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthRecvAcceptV6>) {
        if let WithoutMemory::Assumes = self.without {
            std::hint::black_box(Vec::<u8>::with_capacity(64));
            c.out.block();
            return;
        }
        let mut scratch: Vec<u8> = Vec::new();
        if scratch.try_reserve(64).is_err() {
            assert!(
                !matches!(self.without, WithoutMemory::Panics),
                "no scratch buffer"
            );
            let _ = c.out.permit();
            return;
        }
        c.out.block();
    }
}

struct Buggy {
    engine: Engine,
    callout: CalloutRegistration<AleAuthRecvAcceptV6, FailsOpenWithoutMemory>,
}

impl DriverState for Buggy {
    fn unload(self, irql: &mut PassiveLevel<'_>) {
        let _ = self.engine.close(irql);
        let _ = self.callout.unregister(irql);
    }
}

mod fails_open {
    #[wfp_rs::driver_entry]
    fn entry(
        irql: &mut super::PassiveLevel<'_>,
        driver: &mut super::Driver<'_>,
    ) -> Result<super::Buggy, super::Status> {
        super::start(irql, driver, super::WithoutMemory::FailsOpen)
    }
}

mod stops {
    #[wfp_rs::driver_entry]
    fn entry(
        irql: &mut super::PassiveLevel<'_>,
        driver: &mut super::Driver<'_>,
    ) -> Result<super::Buggy, super::Status> {
        super::start(irql, driver, super::WithoutMemory::Panics)
    }
}

mod aborts {
    #[wfp_rs::driver_entry]
    fn entry(
        irql: &mut super::PassiveLevel<'_>,
        driver: &mut super::Driver<'_>,
    ) -> Result<super::Buggy, super::Status> {
        super::start(irql, driver, super::WithoutMemory::Assumes)
    }
}

fn start(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    without: WithoutMemory,
) -> Result<Buggy, Status> {
    let callout =
        CalloutRegistration::register(irql, driver, CALLOUT, FailsOpenWithoutMemory { without })?;
    let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
    let txn = engine.transaction(irql)?;
    txn.add_provider(irql, &Provider::new(PROVIDER))?;
    txn.add_sublayer(irql, &Sublayer::new(SUBLAYER).provider(PROVIDER))?;
    txn.add_callout(irql, &CalloutEntry::new(CALLOUT).provider(PROVIDER))?;
    txn.add_filter(
        irql,
        &Filter::<AleAuthRecvAcceptV6>::new(FILTER)
            .provider(PROVIDER)
            .sublayer(SUBLAYER)
            .action(FilterAction::CalloutTerminating(CALLOUT))
            .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp)),
    )?;
    txn.commit(irql)?;
    Ok(Buggy { engine, callout })
}

/// The driver asks no service.
fn no_service<'m>(
    _machine: &'m wfp_rs_sim::Machine,
    _case: &wfp_rs_sim::prop::Case,
) -> ServiceBody<'m, ()> {
    Box::new(|| ())
}

/// The driver's policy: an inbound IPv6 TCP connection is blocked — unless the driver was
/// already unloaded when it came.
fn inbound_ipv6_is_blocked(run: &Run<()>) -> Result<(), String> {
    if run.case.faults.unload_while_connecting {
        return Ok(());
    }
    match run.outcomes.iter().find(|(c, outcome)| {
        c.inbound && c.ipv6 && !c.udp && outcome.decision.action == Action::Permit
    }) {
        Some((c, _)) => Err(format!("pid {} (inbound, IPv6) permitted", c.pid)),
        None => Ok(()),
    }
}

fn harness() -> Harness<()> {
    harness_of(fails_open::DriverEntry)
}

fn harness_of(entry: wfp_rs_sim::DriverEntryFn) -> Harness<()> {
    Harness::new("buggy", entry, no_service)
        .generation(Generation {
            max_connections: 5,
            answers: vec![Answer::Allow],
            // One of the first two allocations after load fails, when a case has the fault: with
            // this generator about one seed in twelve shows the bug.
            max_allocation_skip: 1,
            ..Generation::default()
        })
        .property("inbound IPv6 is blocked", inbound_ipv6_is_blocked)
}

/// Found within 64 seeds, shrunk to one inbound IPv6 connection and the allocation failure.
#[test]
fn the_harness_finds_and_shrinks_a_fail_open_on_allocation_failure() {
    let counterexample = harness()
        .check(0..64)
        .expect_err("a case with an inbound IPv6 connection and an allocation failure fails");
    eprintln!("{counterexample}");
    let minimal = &counterexample.minimal;
    assert_eq!(counterexample.failure.property, "inbound IPv6 is blocked");
    assert_eq!(minimal.connections.len(), 1, "one connection: {minimal:#?}");
    let connection = &minimal.connections[0];
    assert!(connection.inbound && connection.ipv6 && !connection.udp);
    assert_eq!(connection.caller, 0, "shrunk to the first caller");
    assert_eq!(connection.data, Data::None, "no data: {minimal:#?}");
    assert!(connection.pause.is_zero(), "no pause: {minimal:#?}");
    assert!(
        !minimal.faults.unload_while_connecting
            && minimal.faults.service_restart.is_none()
            && minimal.faults.cancel_io_after.is_none()
            && minimal.faults.clock_jump.is_none(),
        "only the allocation failure is needed: {minimal:#?}"
    );
    assert_eq!(
        minimal.faults.allocation_failures,
        [AllocationFailure { skip: 0, count: 1 }],
        "the first allocation of the workload, once"
    );
    // The shrunk case fails again, and without its fault it passes.
    let harness = harness();
    assert!(harness.run_case(minimal, counterexample.seed).is_err());
    let mut without_fault = minimal.clone();
    without_fault.faults.allocation_failures.clear();
    harness
        .run_case(&without_fault, counterexample.seed)
        .expect("without the allocation failure the driver blocks");
    // One seed, one case: replaying the seed finds the same minimal case.
    let again = harness
        .check(counterexample.seed..counterexample.seed + 1)
        .expect_err("the seed fails again");
    assert_eq!(again.minimal, *minimal);
}

/// The minimal case of the test above: one inbound IPv6 connection, whose classification's
/// allocation fails.
fn inbound_ipv6_without_memory() -> Case {
    Case {
        schedule_seed: 5,
        connections: vec![ConnectionCase {
            pid: 101,
            inbound: true,
            ipv6: true,
            udp: false,
            irql: AleIrql::Passive,
            caller: 0,
            answer: Answer::Allow,
            data: Data::None,
            pause: std::time::Duration::ZERO,
        }],
        faults: FaultPlan {
            allocation_failures: vec![AllocationFailure { skip: 0, count: 1 }],
            unload_while_connecting: false,
            service_restart: None,
            cancel_io_after: None,
            clock_jump: None,
        },
        reply_delay: std::time::Duration::ZERO,
    }
}

/// A bug check ends the process, so the harness cannot shrink it; the stop report names the case
/// the harness was running, its seed and the command that replays it.
#[test]
fn a_bug_check_in_a_case_reports_the_case_and_its_seed() {
    // With `stops` the allocation failure stops the machine. (One failing allocation: the
    // panic's own message must not fail too.)
    let case = inbound_ipv6_without_memory();
    let outcome = wfp_rs_sim::run_isolated(
        "a_bug_check_in_a_case_reports_the_case_and_its_seed",
        || {
            let _ = harness_of(stops::DriverEntry).run_case(&case, 5);
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED);
    assert!(
        report.explanation.contains("no scratch buffer"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(
            "property harness: running the case of seed 5 (or a case shrunk from it), \
             replayed by WFP_SIM_SEED=5"
        ),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("inbound: true, ipv6: true"),
        "{}",
        outcome.stderr
    );
}

/// Run isolated, the harness shrinks a bug check as any failure: each candidate runs in a child
/// process, and a candidate that stops the machine fails.
#[test]
fn isolated_the_harness_shrinks_a_bug_check() {
    let counterexample = harness_of(stops::DriverEntry)
        .check_isolated("isolated_the_harness_shrinks_a_bug_check", 0..64)
        .expect_err("a case with an inbound IPv6 connection and an allocation failure stops");
    eprintln!("{counterexample}");
    assert_eq!(counterexample.failure.property, "no bug check");
    for expected in [
        "KMODE_EXCEPTION_NOT_HANDLED",
        "no scratch buffer",
        "classifyFn",
    ] {
        assert!(
            counterexample.failure.message.contains(expected),
            "{expected:?} in {}",
            counterexample.failure.message
        );
    }
    assert!(counterexample.shrink_runs > 0);
    let minimal = &counterexample.minimal;
    assert_eq!(minimal.connections.len(), 1, "{minimal:#?}");
    assert!(minimal.connections[0].inbound && minimal.connections[0].ipv6);
    // The same minimal case as the in-process harness finds for the fail-open variant, whose
    // failure needs the same connection and fault.
    let in_process = harness().check(0..64).expect_err("fails in process too");
    assert_eq!(counterexample.seed, in_process.seed);
    assert_eq!(
        (
            &counterexample.minimal.connections,
            &counterexample.minimal.faults
        ),
        (&in_process.minimal.connections, &in_process.minimal.faults)
    );
}

/// Run isolated, a property that fails is reported as in process: same seed, same minimal case,
/// same failure.
#[test]
fn isolated_a_failing_property_is_reported_as_in_process() {
    let isolated = harness()
        .check_isolated(
            "isolated_a_failing_property_is_reported_as_in_process",
            0..64,
        )
        .expect_err("fails isolated");
    let in_process = harness().check(0..64).expect_err("fails in process");
    assert_eq!(isolated.seed, in_process.seed);
    assert_eq!(isolated.cases_run, in_process.cases_run);
    assert_eq!(isolated.minimal, in_process.minimal);
    assert_eq!(isolated.failure, in_process.failure);
    assert_eq!(isolated.shrink_runs, in_process.shrink_runs);
}

/// An allocation failure driver code does not handle aborts from the allocator, whose report is
/// written without allocating: it still names the case, its seed and the replay command.
#[test]
fn an_unhandled_allocation_failure_in_a_case_reports_the_case_and_its_seed() {
    let case = inbound_ipv6_without_memory();
    let outcome = wfp_rs_sim::run_isolated(
        "an_unhandled_allocation_failure_in_a_case_reports_the_case_and_its_seed",
        || {
            let _ = harness_of(aborts::DriverEntry).run_case(&case, 5);
        },
    );
    let report = outcome.expect_bugcheck(BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED);
    assert!(
        report.explanation.contains("could not handle it"),
        "{}",
        outcome.stderr
    );
    for expected in [
        "deterministic machine, seed 5\nreplay: WFP_SIM_SEED=5",
        "property harness: running the case of seed 5 (or a case shrunk from it), \
         replayed by WFP_SIM_SEED=5",
        "inbound: true, ipv6: true",
    ] {
        assert!(
            outcome.stderr.contains(expected),
            "{expected:?} in {}",
            outcome.stderr
        );
    }
}

/// One seed, one case; the generator keeps to its bounds; pids are unique.
#[test]
fn cases_are_a_function_of_the_seed_within_the_generations_bounds() {
    let harness = harness_of(fails_open::DriverEntry).generation(Generation {
        max_connections: 3,
        callers: 1,
        inbound: false,
        ipv6: false,
        udp: false,
        answers: vec![Answer::Block, Answer::Silent],
        faults: false,
        max_allocation_skip: 0,
        data: false,
        max_reply_delay: std::time::Duration::from_millis(300),
    });
    let mut sizes = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let case = harness.case(seed);
        assert_eq!(case, harness.case(seed), "seed {seed}: two cases");
        assert_eq!(case.schedule_seed, seed);
        assert!((1..=3).contains(&case.connections.len()), "{case:?}");
        assert!(case.faults.is_empty(), "{case:?}");
        assert!(case.reply_delay <= std::time::Duration::from_millis(300));
        let mut pids = std::collections::BTreeSet::new();
        for c in &case.connections {
            assert!(
                !c.inbound && !c.ipv6 && !c.udp && c.caller == 0 && c.data == Data::None,
                "{case:?}"
            );
            assert!(
                matches!(c.answer, Answer::Block | Answer::Silent),
                "{case:?}"
            );
            assert!(pids.insert(c.pid), "pid {} twice: {case:?}", c.pid);
            assert_eq!(case.answer_for(c.pid), Some(c.answer));
        }
        sizes.insert(case.connections.len());
    }
    assert_eq!(
        sizes.len(),
        3,
        "every workload size from 1 to 3 within 64 seeds"
    );
}

/// Effects count the cases that reached them; `assert_holds` fails when one was never reached,
/// and the isolated harness counts them in its child.
#[test]
fn effects_are_counted_and_one_never_reached_fails() {
    let harness = || {
        Harness::new("buggy", fails_open::DriverEntry, no_service)
            .generation(Generation {
                max_connections: 3,
                answers: vec![Answer::Allow],
                faults: false,
                ..Generation::default()
            })
            .effect("an inbound connection", |run| {
                run.outcomes.iter().any(|(c, _)| c.inbound)
            })
            .effect("more than three connections", |run| run.outcomes.len() > 3)
    };
    let counted = harness();
    assert_eq!(counted.check(0..32).expect("holds"), 32);
    let effects = counted.effects();
    assert_eq!(effects[0].0, "an inbound connection");
    assert!(effects[0].1 > 0 && effects[0].1 <= 32, "{effects:?}");
    assert_eq!(effects[1].1, 0, "{effects:?}");
    let unreached = std::panic::catch_unwind(|| harness().assert_holds(0..32))
        .expect_err("an effect never reached fails");
    let message = unreached
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("no case reached the effect \"more than three connections\""),
        "{message}"
    );
    let isolated = harness();
    isolated
        .check_isolated("effects_are_counted_and_one_never_reached_fails", 0..32)
        .expect("holds");
    assert_eq!(isolated.effects(), effects, "counted in the child");
}
