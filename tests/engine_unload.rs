//! Filter-engine sessions and unload: a session a driver leaves open stops the machine at unload
//! (0xCE, parameter 3 = 4), as a port or a registration left open does; a session that closes
//! takes its dynamic objects and its open transaction with it; a non-dynamic session's objects
//! outlive it and the driver, as on Windows.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify, FilterEvent};
use wfp_rs::classify::Action;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, Irql, PassiveLevel};
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{ClassifyRequest, Machine, run_isolated};

const CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("7a000000-0000-0000-0000-000000000001"));
const FILTER: Guid = guid!("7a000000-0000-0000-0000-000000000002");
const OTHER_CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("7a000000-0000-0000-0000-000000000003"));
const OTHER_FILTER: Guid = guid!("7a000000-0000-0000-0000-000000000004");

/// Permits everything; counts the filters deleted under it.
struct Permits {
    deleted: &'static AtomicUsize,
}

impl Callout<AleAuthConnectV4> for Permits {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = c.out.permit();
    }

    fn notify(&self, _irql: &mut DispatchLevel<'_>, event: FilterEvent<'_>) -> Result<(), Status> {
        if let FilterEvent::Deleted(_) = event {
            self.deleted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn terminating(key: Guid) -> Filter<'static, AleAuthConnectV4> {
    Filter::new(key)
        .name("to the callout")
        .action(FilterAction::CalloutTerminating(CALLOUT))
}

/// Adds the callout entry and a terminating filter that names it.
fn add_callout_and_filter(irql: &PassiveLevel<'_>, engine: &Engine) -> Result<(), Status> {
    engine.add_callout(
        irql,
        &CalloutEntry::<AleAuthConnectV4>::new(CALLOUT).name("permits"),
    )?;
    engine.add_filter(irql, &terminating(FILTER))?;
    Ok(())
}

fn connect(machine: &Machine) -> Action {
    machine
        .classify::<AleAuthConnectV4>(Irql::DISPATCH, &ClassifyRequest::new())
        .action
}

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

mod slot {
    //! The driver: its session sits in a spin-lock-protected slot, and unload takes it
    //! out under the lock — so it is dropped at DISPATCH_LEVEL, where `Engine`'s destructor
    //! cannot close it, and leaks.
    use super::*;

    pub static DELETED: AtomicUsize = AtomicUsize::new(0);

    pub struct State {
        registration: CalloutRegistration<AleAuthConnectV4, Permits>,
        engine: SpinLock<Option<Engine>>,
    }

    impl DriverState for State {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            // The session is dropped inside the lock, at DISPATCH_LEVEL, where it cannot be
            // closed.
            self.engine.lock(&mut *irql, |slot, _| {
                slot.take();
            });
            let _ = self.registration.unregister(irql);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let registration =
            CalloutRegistration::register(irql, driver, CALLOUT, Permits { deleted: &DELETED })?;
        let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
        add_callout_and_filter(irql, &engine)?;
        Ok(State {
            registration,
            engine: SpinLock::new(Some(engine)),
        })
    }
}

mod forgets {
    //! Forgets its session in the middle of a transaction.
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
        let txn = engine.transaction(irql)?;
        txn.add_filter(
            irql,
            &Filter::<AleAuthConnectV4>::new(FILTER).action(FilterAction::Block),
        )?;
        core::mem::forget(txn);
        core::mem::forget(engine);
        Ok(())
    }
}

mod keeps {
    //! Keeps one session in a static (never dropped) and forgets a second, non-dynamic one.
    use super::*;

    pub static KEPT: Mutex<Option<Engine>> = Mutex::new(None);

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        *KEPT.lock().unwrap() = Some(Engine::open(irql, SessionOptions::new().dynamic())?);
        core::mem::forget(Engine::open(irql, SessionOptions::new())?);
        Ok(())
    }
}

mod tidy {
    //! Adds a terminating filter in a non-dynamic session, closes the session, and unregisters
    //! its callout at unload.
    use super::*;

    pub static DELETED: AtomicUsize = AtomicUsize::new(0);

    pub struct State {
        registration: CalloutRegistration<AleAuthConnectV4, Permits>,
    }

    impl DriverState for State {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            self.registration
                .unregister(irql)
                .map_err(|(_, status)| status)
                .expect("unregisters");
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let registration =
            CalloutRegistration::register(irql, driver, CALLOUT, Permits { deleted: &DELETED })?;
        let engine = Engine::open(irql, SessionOptions::new())?;
        add_callout_and_filter(irql, &engine)?;
        engine.close(irql)?;
        Ok(State { registration })
    }
}

/// Runs `scenario` in a child process: it must stop with 0xCE for an open session (parameter 3
/// = 4), `sessions` of them, naming `expected` in the explanation.
fn expect_session_stop(test: &str, sessions: usize, expected: &[&str], scenario: impl FnOnce()) {
    let outcome = run_isolated(test, scenario);
    let report = outcome
        .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
    assert_eq!(report.params[0], 0, "no routine\n{}", outcome.stderr);
    assert_eq!(
        report.params[1] >> 16,
        0x5E55,
        "parameter 2 is the engine handle\n{}",
        outcome.stderr
    );
    assert_eq!(report.params[2], 4, "kind: session\n{}", outcome.stderr);
    assert_eq!(report.params[3], sessions, "count\n{}", outcome.stderr);
    for text in expected {
        assert!(
            outcome.stderr.contains(text),
            "{text:?}\n{}",
            outcome.stderr
        );
    }
}

#[test]
fn a_session_dropped_under_a_spin_lock_at_unload_stops() {
    expect_session_stop(
        "a_session_dropped_under_a_spin_lock_at_unload_stops",
        1,
        &[
            "1 filter engine session(s) still open",
            "dynamic;",
            "1 filter(s), 1 callout(s)",
        ],
        || {
            let machine = Machine::new();
            let driver = machine.load_driver("slot", slot::DriverEntry).unwrap();
            assert_eq!(connect(&machine), Action::Permit, "the callout decides");
            let _ = machine.unload_driver(driver);
        },
    );
}

#[test]
fn a_forgotten_session_with_its_transaction_open_stops_at_unload() {
    expect_session_stop(
        "a_forgotten_session_with_its_transaction_open_stops_at_unload",
        1,
        &["its transaction still open", "1 filter(s)"],
        || {
            let machine = Machine::new();
            let driver = machine
                .load_driver("forgets", forgets::DriverEntry)
                .unwrap();
            let _ = machine.unload_driver(driver);
        },
    );
}

#[test]
fn sessions_kept_in_a_static_or_forgotten_stop_at_unload() {
    expect_session_stop(
        "sessions_kept_in_a_static_or_forgotten_stop_at_unload",
        2,
        &["2 filter engine session(s) still open"],
        || {
            let machine = Machine::new();
            let driver = machine.load_driver("keeps", keeps::DriverEntry).unwrap();
            let _ = machine.unload_driver(driver);
        },
    );
}

#[test]
fn a_session_the_harness_opened_is_not_the_drivers() {
    let machine = Machine::new();
    let harness = machine.at_passive(|irql| Engine::open(irql, SessionOptions::new().dynamic()));
    let harness = harness.expect("opens");
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    machine.unload_driver(driver).expect("unloads");
    machine
        .at_passive(|irql| harness.close(irql))
        .expect("closes");
}

#[test]
fn a_non_dynamic_sessions_filter_outlives_the_session_and_the_driver_and_blocks() {
    let machine = Machine::new();
    let driver = machine.load_driver("tidy", tidy::DriverEntry).unwrap();
    assert_eq!(
        connect(&machine),
        Action::Permit,
        "the callout decides while it is registered"
    );
    machine.unload_driver(driver).expect("unloads clean");
    // As on Windows: the filter stays in the engine; its callout is gone, so it blocks.
    let decision = machine.classify::<AleAuthConnectV4>(Irql::DISPATCH, &ClassifyRequest::new());
    assert_eq!(decision.action, Action::Block);
    assert!(decision.hard);
    assert_eq!(
        tidy::DELETED.load(Ordering::SeqCst),
        0,
        "nothing deleted it"
    );
    // Only deleting it (from any session) ends that.
    machine.at_passive(|irql| {
        let engine = Engine::open(irql, SessionOptions::new()).unwrap();
        assert_eq!(
            engine.add_filter(irql, &terminating(FILTER)),
            Err(Status::FWP_ALREADY_EXISTS)
        );
        let id = decision.filter_id.expect("a filter decided");
        engine
            .delete_filter(irql, wfp_rs::filter::FilterId::from_raw(id))
            .unwrap();
        engine.close(irql).unwrap();
    });
    assert_eq!(connect(&machine), Action::Permit, "no filter left");
}

#[test]
fn closing_a_session_aborts_its_transaction_and_tells_the_callouts() {
    static DELETED: AtomicUsize = AtomicUsize::new(0);
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = driver
        .run_in_driver(&machine, |irql, d| {
            let registration = CalloutRegistration::register(
                irql,
                d,
                OTHER_CALLOUT,
                Permits { deleted: &DELETED },
            )
            .map_err(|e| e.status)
            .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::<AleAuthConnectV4>::new(OTHER_CALLOUT))
                .unwrap();
            let txn = engine.transaction(irql).unwrap();
            txn.add_filter(
                irql,
                &Filter::<AleAuthConnectV4>::new(OTHER_FILTER)
                    .action(FilterAction::CalloutTerminating(OTHER_CALLOUT)),
            )
            .unwrap();
            // The transaction is still open when the session closes ("If this function is
            // called with a transaction in progress, the transaction will be aborted").
            core::mem::forget(txn);
            engine.close(irql).unwrap();
            registration
        })
        .unwrap();
    assert_eq!(
        DELETED.load(Ordering::SeqCst),
        1,
        "the filter added in the aborted transaction was deleted, and its callout told"
    );
    driver.run_in_driver(&machine, |irql, _| {
        registration
            .unregister(irql)
            .map_err(|(_, status)| status)
            .unwrap();
    });
    machine.unload_driver(driver).expect("unloads clean");
}
