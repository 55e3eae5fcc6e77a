//! A callout's layer. The compiler keeps the registration, the callout entry and the filter at
//! one layer (`CalloutKey<L>`; `ui/callout_key_wrong_layer.rs`); these tests cover what it cannot
//! see — two keys sharing one GUID, raw `sys` calls — and check that the SDK fails safe: a
//! classification at another layer never reaches `classify` (whose fields would be read at the
//! wrong indices), is blocked when the SDK may write, and is reported once.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, FilterFlags};
use wfp_rs::irql::{DispatchLevel, Irql, PassiveLevel};
use wfp_rs::layer::{AleAuthConnectV4, Layer, OutboundTransportV4};
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::{ClassifyRequest, LoadedDriver, Machine};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// The mistake the compiler cannot see: a key copied for a second layer, its layer changed and
/// its GUID not.
const SHARED: Guid = guid!("c4a1e0d2-5b3f-4e79-8a06-1d2c3b4a5f60");
const COUNT_OUTBOUND: CalloutKey<OutboundTransportV4> = CalloutKey::new(SHARED);
const ASK_CONNECT: CalloutKey<AleAuthConnectV4> = CalloutKey::new(SHARED);

const FILTER: Guid = guid!("c4a1e0d2-5b3f-4e79-8a06-1d2c3b4a5f61");
const HARD_PERMIT: Guid = guid!("c4a1e0d2-5b3f-4e79-8a06-1d2c3b4a5f62");
const LOW_SUBLAYER: Guid = guid!("c4a1e0d2-5b3f-4e79-8a06-1d2c3b4a5f63");

/// Counts what reaches it; permits everything it is asked about (so a block can only come from
/// the SDK).
#[derive(Default)]
struct Counting {
    classified: AtomicU32,
    flows_deleted: AtomicU32,
}

impl<L: Layer> Callout<L, u32> for Counting {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L, u32>) {
        self.classified.fetch_add(1, Ordering::SeqCst);
        let _ = c.out.permit();
    }

    fn flow_deleted(&self, _irql: &mut DispatchLevel<'_>, _layer_id: u16, _context: u32) {
        self.flows_deleted.fetch_add(1, Ordering::SeqCst);
    }
}

type Registration = CalloutRegistration<OutboundTransportV4, Counting, u32>;

/// The SDK's reports about callouts at the wrong layer.
fn wrong_layer_reports(machine: &Machine) -> Vec<String> {
    machine
        .debug_output()
        .into_iter()
        .filter(|line| line.contains("One CalloutKey and GUID per layer"))
        .collect()
}

fn classify_report(outcome: &str) -> String {
    format!(
        "wfp-rs: callout {SHARED} (layer OUTBOUND_TRANSPORT_V4): classifyFn at layer \
         ALE_AUTH_CONNECT_V4; {outcome}. One CalloutKey and GUID per layer; reported once\n"
    )
}

/// Adds the callout entry and a terminating filter for `ASK_CONNECT` (in `sublayer`, if any),
/// then registers `Counting` under `COUNT_OUTBOUND`: the order in which the SDK cannot refuse
/// the entry, so the classification reaches the trampoline at the wrong layer.
fn install_mismatched(
    machine: &Machine,
    driver: &LoadedDriver,
    sublayer: Option<Guid>,
) -> (Registration, Engine) {
    driver
        .run_in_driver(machine, |irql, d| {
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(ASK_CONNECT).name("ask"))
                .unwrap();
            let mut filter = Filter::new(FILTER)
                .name("ask")
                .action(FilterAction::CalloutTerminating(ASK_CONNECT));
            if let Some(sublayer) = sublayer {
                filter = filter.sublayer(sublayer);
            }
            engine.add_filter(irql, &filter).unwrap();
            let registration =
                CalloutRegistration::register(irql, d, COUNT_OUTBOUND, Counting::default())
                    .unwrap_or_else(|e| panic!("registers: {}", e.status));
            (registration, engine)
        })
        .expect("an SDK driver")
}

fn remove(machine: &Machine, driver: LoadedDriver, registration: Registration, engine: Engine) {
    driver.run_in_driver(machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_classification_at_another_layer_is_blocked_without_calling_classify() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = install_mismatched(&machine, &driver, None);

    for _ in 0..3 {
        let decision =
            machine.classify(Irql::DISPATCH, &ClassifyRequest::<AleAuthConnectV4>::new());
        assert_eq!(decision.action, Action::Block, "fails closed");
        assert!(decision.hard, "the write right is cleared");
    }
    assert_eq!(
        registration.callout().classified.load(Ordering::SeqCst),
        0,
        "classify is never called with another layer's values"
    );
    assert_eq!(
        wrong_layer_reports(&machine),
        [classify_report("blocked, classify not called")],
        "reported once, not once per classification"
    );
    remove(&machine, driver, registration, engine);
}

#[test]
fn without_the_write_right_a_classification_at_another_layer_is_left_alone() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    // A hard permit in the default sublayer (weight 0x8000), above the callout's sublayer: the
    // callout is called without the write right.
    machine.at_passive(|irql| {
        let engine = Engine::open(irql, SessionOptions::new()).unwrap();
        engine
            .add_sublayer(irql, &Sublayer::new(LOW_SUBLAYER).name("low").weight(0x100))
            .unwrap();
        engine
            .add_filter(
                irql,
                &Filter::<AleAuthConnectV4>::new(HARD_PERMIT)
                    .name("hard permit")
                    .action(FilterAction::Permit)
                    .flags(FilterFlags::CLEAR_ACTION_RIGHT),
            )
            .unwrap();
        engine.close(irql).unwrap();
    });
    let (registration, engine) = install_mismatched(&machine, &driver, Some(LOW_SUBLAYER));

    let decision = machine.classify(Irql::DISPATCH, &ClassifyRequest::<AleAuthConnectV4>::new());
    assert_eq!(
        (decision.action, decision.hard, decision.vetoed),
        (Action::Permit, true, false),
        "the hard decision in force stands: no write right, no change"
    );
    assert_eq!(registration.callout().classified.load(Ordering::SeqCst), 0);
    assert_eq!(
        wrong_layer_reports(&machine),
        [classify_report(
            "left as is (no write right), not classified"
        )]
    );
    remove(&machine, driver, registration, engine);
}

#[test]
fn an_entry_at_another_layer_than_the_registration_is_refused() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = driver
        .run_in_driver(&machine, |irql, d| {
            // Registered first, as the guide says: the SDK knows the GUID's layer when the entry
            // comes.
            let registration: Registration =
                CalloutRegistration::register(irql, d, COUNT_OUTBOUND, Counting::default())
                    .unwrap_or_else(|e| panic!("registers: {}", e.status));
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            assert_eq!(
                engine.add_callout(irql, &CalloutEntry::new(ASK_CONNECT).name("ask")),
                Err(Status::FWP_INCOMPATIBLE_LAYER)
            );
            // The entry was not left behind: a filter cannot name it.
            assert_eq!(
                engine.add_filter(
                    irql,
                    &Filter::new(FILTER)
                        .name("ask")
                        .action(FilterAction::CalloutTerminating(ASK_CONNECT)),
                ),
                Err(Status::FWP_CALLOUT_NOT_FOUND)
            );
            // At the registration's own layer the same GUID is fine.
            engine
                .add_callout(irql, &CalloutEntry::new(COUNT_OUTBOUND).name("count"))
                .expect("the registration's layer");
            (registration, engine)
        })
        .unwrap();
    assert_eq!(
        machine
            .debug_output()
            .iter()
            .filter(|line| line.contains("not added at"))
            .cloned()
            .collect::<Vec<_>>(),
        [format!(
            "wfp-rs: callout {SHARED} is registered at layer OUTBOUND_TRANSPORT_V4, not added at \
             ALE_AUTH_CONNECT_V4; one CalloutKey and GUID per layer\n"
        )]
    );
    remove(&machine, driver, registration, engine);
}

#[test]
fn a_flow_context_deleted_at_another_layer_is_left_alone() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration: Registration = driver
        .run_in_driver(&machine, |irql, d| {
            CalloutRegistration::register(irql, d, COUNT_OUTBOUND, Counting::default())
                .unwrap_or_else(|e| panic!("registers: {}", e.status))
        })
        .unwrap();
    let id = registration.id();
    // Not a `PoolBox<u32>` the SDK made: an address nothing may read. Had the trampoline taken
    // it as this callout's context, the test would crash.
    let foreign: u64 = 0xDEAD_0000;
    driver.run_in_driver(&machine, |_irql, _| {
        let (flow, layer) = (7, AleAuthConnectV4::ID);
        // SAFETY: PASSIVE_LEVEL; the callout id is registered; this code never reads `foreign`.
        let status = unsafe { sys::FwpsFlowAssociateContext0(flow, layer, id, foreign) };
        assert_eq!(status, 0);
        // SAFETY: as above; the engine hands the context to the callout's flowDeleteFn.
        let status = unsafe { sys::FwpsFlowRemoveContext0(7, AleAuthConnectV4::ID, id) };
        assert_eq!(status, 0);
    });
    assert_eq!(
        registration.callout().flows_deleted.load(Ordering::SeqCst),
        0,
        "not handed to flow_deleted as a value of the callout's context type"
    );
    assert_eq!(
        wrong_layer_reports(&machine),
        [format!(
            "wfp-rs: callout {SHARED} (layer OUTBOUND_TRANSPORT_V4): flowDeleteFn at layer \
             ALE_AUTH_CONNECT_V4; its context is left alone. One CalloutKey and GUID per layer; \
             reported once\n"
        )]
    );
    driver.run_in_driver(&machine, |irql, _| {
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}
