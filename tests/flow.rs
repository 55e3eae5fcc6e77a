//! Flow contexts: a callout attaches state to a flow, finds it in later classifications, and
//! gets it back when the flow ends — or when it unregisters with contexts still attached.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{self, Layer, value::IpProtocol};
use wfp_rs::metadata::Direction;
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{AleIrql, Connection, Machine};
use wfp_rs_tests::install::install;

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: Guid = guid!("60000000-0000-0000-0000-000000000001");
const FILTER: Guid = guid!("60000000-0000-0000-0000-000000000002");

/// Per-flow state: packets seen.
#[derive(Debug)]
struct PacketCount(AtomicU32);

/// Counts the packets of each flow at OUTBOUND_TRANSPORT_V4.
#[derive(Default)]
struct Counter {
    associate_errors: Mutex<Vec<Status>>,
    /// Shared with the test, so it outlives the registration.
    deleted: std::sync::Arc<Mutex<Vec<(u16, u32)>>>,
}

impl Callout<layer::OutboundTransportV4, PacketCount> for Counter {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::OutboundTransportV4, PacketCount>,
    ) {
        match c.flow_context() {
            Some(count) => {
                count.0.fetch_add(1, Ordering::SeqCst);
            }
            None => {
                if let Err(error) = c.associate_flow_context(irql, PacketCount(AtomicU32::new(1))) {
                    assert_eq!(
                        error.value.0.load(Ordering::SeqCst),
                        1,
                        "the value comes back"
                    );
                    self.associate_errors.lock().unwrap().push(error.status);
                }
            }
        }
        let _ = c.out.permit();
    }

    fn flow_deleted(&self, _irql: &mut DispatchLevel<'_>, layer_id: u16, context: PacketCount) {
        let entry = (layer_id, context.0.load(Ordering::SeqCst));
        wfp_rs_sim::as_harness(|| self.deleted.lock().unwrap().push(entry));
    }
}

fn connection(local_port: u16) -> Connection {
    Connection {
        pid: 5,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: format!("10.0.0.1:{local_port}").parse().unwrap(),
        remote: "192.0.2.1:443".parse().unwrap(),
        direction: Direction::Outbound,
    }
}

fn setup(
    machine: &Machine,
    driver: &wfp_rs_sim::LoadedDriver,
) -> (
    CalloutRegistration<layer::OutboundTransportV4, Counter, PacketCount>,
    Engine,
) {
    driver
        .run_in_driver(machine, |irql, d| {
            let key = CalloutKey::<layer::OutboundTransportV4>::new(CALLOUT);
            let registration =
                // The counter's log is the test's: allocated as harness code.
                CalloutRegistration::register(irql, d, key, wfp_rs_sim::as_harness(Counter::default))
                    .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(key).name("count"))
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::OutboundTransportV4>::new(FILTER)
                        .name("count")
                        .action(FilterAction::CalloutInspection(key)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap()
}

#[test]
fn a_flow_context_follows_the_flow_and_comes_back_when_it_ends() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = setup(&machine, &driver);
    let conn = connection(41000);
    // The connection's first packet (inside connect) attaches the context; three more count.
    let outcome = machine.connect(&conn, AleIrql::Passive);
    let flow = outcome.flow_handle.expect("established");
    for _ in 0..3 {
        assert_eq!(
            machine.packet(&conn, flow, Direction::Outbound).action,
            Action::Permit
        );
    }
    assert_eq!(machine.end_flow(flow), 1, "one context was attached");
    assert_eq!(
        *registration.callout().deleted.lock().unwrap(),
        [(layer::OutboundTransportV4::ID, 4)]
    );
    assert_eq!(machine.end_flow(flow), 0, "a context is handed back once");
    driver.run_in_driver(&machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn unregistering_removes_the_contexts_still_attached() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = setup(&machine, &driver);
    let mut flows = Vec::new();
    for port in 42000..42005 {
        flows.push(
            machine
                .connect(&connection(port), AleIrql::Dispatch)
                .flow_handle
                .expect("established"),
        );
    }
    assert!(flows.windows(2).all(|w| w[0] != w[1]));
    let deleted = std::sync::Arc::clone(&registration.callout().deleted);
    assert!(deleted.lock().unwrap().is_empty());
    driver.run_in_driver(&machine, move |irql, _| {
        engine.close(irql).unwrap();
        // The engine answers STATUS_DEVICE_BUSY while contexts remain; the SDK removes them
        // (each comes back through flow_deleted) and unregisters.
        registration
            .unregister(irql)
            .map_err(|(_, s)| s)
            .expect("unregisters once the contexts are removed");
    });
    let deleted = deleted.lock().unwrap().clone();
    assert_eq!(
        deleted.len(),
        flows.len(),
        "every attached context came back"
    );
    assert!(
        deleted
            .iter()
            .all(|&(layer, packets)| layer == layer::OutboundTransportV4::ID && packets == 1)
    );
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty(), "every context was freed");
}

#[test]
fn without_a_flow_handle_the_value_is_handed_back() {
    struct AtConnect(Mutex<Option<(Status, u32)>>);
    impl Callout<layer::AleAuthConnectV4, PacketCount> for AtConnect {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4, PacketCount>,
        ) {
            let error = c
                .associate_flow_context(irql, PacketCount(AtomicU32::new(7)))
                .expect_err("no flow yet");
            *self.0.lock().unwrap() = Some((error.status, error.value.0.load(Ordering::SeqCst)));
            let _ = c.out.permit();
        }
    }
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        AtConnect(Mutex::new(None))
    });
    assert_eq!(
        machine
            .connect(&connection(43000), AleIrql::Dispatch)
            .decision
            .action,
        Action::Permit
    );
    assert_eq!(
        *installed.callout().0.lock().unwrap(),
        Some((Status::FWP_NOT_FOUND, 7))
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

// --- removal during a classification -----------------------------------------------------------
//
// FwpsFlowRemoveContext0's reference page: STATUS_SUCCESS means flowDeleteFn was called
// synchronously (from inside the call); STATUS_PENDING means a classification is in progress and
// flowDeleteFn runs later. The simulator defers it until the flow's last classification returns.

mod scripted {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc::{Receiver, Sender};
    use wfp_rs::spin_lock::SpinLock;

    /// A flow context that says who it is.
    #[derive(Debug)]
    pub struct Label(pub u32);

    /// What the callout does in its next classification.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Step {
        /// Attach `Label(n)` and read it back.
        Attach(u32),
        /// Read the context, remove it with the safe API, read again.
        RemoveThenRead,
        /// Remove with the raw `FwpsFlowRemoveContext0`, recording its status.
        RawRemove,
        /// Remove while holding the spin lock `flow_deleted` takes.
        RemoveUnderLock,
        /// Remove, then attach `Label(n)` in the same classification.
        Replace(u32),
        /// Tell the test it is inside, and wait until the test says go.
        Wait,
    }

    /// Does its script, logging what it sees; permits.
    pub struct Scripted {
        pub step: Mutex<Step>,
        pub log: Arc<Mutex<Vec<String>>>,
        /// Taken by `flow_deleted`.
        pub lock: SpinLock<u32>,
        pub inside: Mutex<Option<Sender<()>>>,
        pub go: Mutex<Option<Receiver<()>>>,
    }

    impl Scripted {
        pub fn new(log: Arc<Mutex<Vec<String>>>) -> Scripted {
            Scripted {
                step: Mutex::new(Step::Attach(1)),
                log,
                lock: SpinLock::new(0),
                inside: Mutex::new(None),
                go: Mutex::new(None),
            }
        }

        /// Logs `line` for the test: the log's copy is the harness's memory, so it does not
        /// count as the driver's pool at unload (`line` itself is freed here, by driver code).
        fn note(&self, line: String) {
            wfp_rs_sim::as_harness(|| self.log.lock().unwrap().push(line.clone()));
        }
    }

    /// `Ok`, or the failure's NTSTATUS in hex.
    fn outcome(result: Result<(), Status>) -> String {
        match result {
            Ok(()) => "Ok".into(),
            Err(status) => format!("{:#x}", status.raw()),
        }
    }

    fn label(context: Option<&Label>) -> Option<u32> {
        context.map(|l| l.0)
    }

    impl Callout<layer::OutboundTransportV4, Label> for Scripted {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::OutboundTransportV4, Label>,
        ) {
            let step = *self.step.lock().unwrap();
            match step {
                Step::Attach(n) => match c.associate_flow_context(irql, Label(n)) {
                    Ok(()) => self.note(format!("attached, reads {:?}", label(c.flow_context()))),
                    Err(error) => self.note(format!(
                        "not attached {:#x}, {} back, reads {:?}",
                        error.status.raw(),
                        error.value.0,
                        label(c.flow_context())
                    )),
                },
                Step::RemoveThenRead => {
                    self.note(format!("reads {:?}", label(c.flow_context())));
                    self.note(format!("removed {}", outcome(c.remove_flow_context(irql))));
                    self.note(format!("reads {:?}", label(c.flow_context())));
                }
                Step::RawRemove => {
                    let flow = c.metadata.flow_handle().unwrap();
                    let callout = c.filter.raw().action.calloutId;
                    // SAFETY: IRQL <= DISPATCH_LEVEL (classify); a context of this callout at
                    // this layer; nothing here reads it afterwards.
                    let status = unsafe {
                        wfp_rs::sys::FwpsFlowRemoveContext0(
                            flow,
                            layer::OutboundTransportV4::ID,
                            callout,
                        )
                    };
                    self.note(format!("raw remove {status:#x}"));
                }
                Step::RemoveUnderLock => {
                    let removed = self.lock.lock(&mut *irql, |count, irql| {
                        *count += 1;
                        c.remove_flow_context(irql)
                    });
                    self.note(format!("removed under the lock {}", outcome(removed)));
                }
                Step::Replace(n) => {
                    self.note(format!("removed {}", outcome(c.remove_flow_context(irql))));
                    c.associate_flow_context(irql, Label(n)).unwrap();
                    self.note(format!("attached, reads {:?}", label(c.flow_context())));
                }
                Step::Wait => {
                    let inside = self.inside.lock().unwrap().take().unwrap();
                    let go = self.go.lock().unwrap().take().unwrap();
                    // The channels are the test's: their lazily allocated blocks too.
                    wfp_rs_sim::as_harness(|| {
                        inside.send(()).unwrap();
                        go.recv().unwrap();
                    });
                    self.note(format!("waited, reads {:?}", label(c.flow_context())));
                }
            }
            self.note("classify returns".into());
            let _ = c.out.permit();
        }

        fn flow_deleted(&self, irql: &mut DispatchLevel<'_>, _layer_id: u16, context: Label) {
            self.lock.lock(irql, |_, _| ());
            self.note(format!("deleted {}", context.0));
        }
    }
}

use scripted::{Scripted, Step};
use std::sync::Arc;
use wfp_rs::irql::Irql;
use wfp_rs_sim::ClassifyRequest;

const FLOW: u64 = 0x00F1_0000_0001;

struct Scene {
    machine: Machine,
    driver: wfp_rs_sim::LoadedDriver,
    installed:
        wfp_rs_tests::install::Installed<layer::OutboundTransportV4, Scripted, scripted::Label>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Scene {
    fn new() -> Scene {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let for_callout = Arc::clone(&log);
        let installed = install(
            &machine,
            &driver,
            CalloutKey::new(CALLOUT),
            FILTER,
            move |_| Scripted::new(for_callout),
        );
        let scene = Scene {
            machine,
            driver,
            installed,
            log,
        };
        scene.classify(Step::Attach(1));
        assert_eq!(
            scene.take_log(),
            ["attached, reads Some(1)", "classify returns"]
        );
        scene
    }

    /// One classification of FLOW at OUTBOUND_TRANSPORT_V4 doing `step`.
    fn classify(&self, step: Step) {
        *self.installed.callout().step.lock().unwrap() = step;
        let decision = self.machine.classify::<layer::OutboundTransportV4>(
            Irql::DISPATCH,
            &ClassifyRequest::new().flow_handle(FLOW),
        );
        assert_eq!(decision.action, Action::Permit);
    }

    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// Ends the flow, closes the session, unregisters and unloads; no pool is left.
    fn finish(self) {
        self.machine.end_flow(FLOW);
        self.installed.remove(&self.machine, &self.driver);
        self.machine.unload_driver(self.driver).unwrap();
        assert!(
            self.machine.pool_blocks().is_empty(),
            "every context was freed"
        );
    }
}

#[test]
fn a_context_removed_in_classify_is_handed_back_after_the_classification_returns() {
    let scene = Scene::new();
    scene.classify(Step::RemoveThenRead);
    assert_eq!(
        scene.take_log(),
        [
            "reads Some(1)",
            "removed Ok",
            // Gone for the rest of the classification, yet not freed under it.
            "reads None",
            "classify returns",
            "deleted 1",
        ]
    );
    // The next classification of the flow has no context.
    scene.classify(Step::RemoveThenRead);
    assert_eq!(
        scene.take_log(),
        [
            "reads None",
            "removed 0xc0000001", // STATUS_UNSUCCESSFUL
            "reads None",
            "classify returns"
        ]
    );
    scene.finish();
}

#[test]
fn removing_in_classify_returns_pending_and_outside_a_classification_succeeds_synchronously() {
    let scene = Scene::new();
    scene.classify(Step::RawRemove);
    assert_eq!(
        scene.take_log(),
        ["raw remove 0x103", "classify returns", "deleted 1"],
        "STATUS_PENDING, flowDeleteFn after the classification"
    );
    scene.classify(Step::Attach(2));
    scene.take_log();
    let callout_id = scene.installed.registration.id();
    let log = Arc::clone(&scene.log);
    let status = scene.machine.at_dispatch(|_irql| {
        // SAFETY: DISPATCH_LEVEL; a context the callout associated; no classification runs.
        let status = unsafe {
            wfp_rs::sys::FwpsFlowRemoveContext0(FLOW, layer::OutboundTransportV4::ID, callout_id)
        };
        log.lock().unwrap().push(format!("returned {status:#x}"));
        status
    });
    assert_eq!(status, 0, "STATUS_SUCCESS");
    assert_eq!(
        scene.take_log(),
        ["deleted 2", "returned 0x0"],
        "flowDeleteFn ran inside FwpsFlowRemoveContext0"
    );
    scene.finish();
}

#[test]
fn a_context_may_be_removed_in_classify_under_the_lock_flow_deleted_takes() {
    // Once a false stop (then SPIN_LOCK_ALREADY_OWNED, now 0xC4 / 0x1000): flowDeleteFn ran inside the removal, under the lock.
    let scene = Scene::new();
    scene.classify(Step::RemoveUnderLock);
    assert_eq!(
        scene.take_log(),
        ["removed under the lock Ok", "classify returns", "deleted 1"]
    );
    scene.finish();
}

#[test]
fn a_second_context_is_refused_and_handed_back() {
    let scene = Scene::new();
    scene.classify(Step::Attach(2));
    assert_eq!(
        scene.take_log(),
        [
            // STATUS_OBJECT_NAME_EXISTS: informational, yet the value was not associated.
            "not attached 0x40000000, 2 back, reads Some(1)",
            "classify returns"
        ]
    );
    scene.finish();
}

#[test]
fn a_context_replaced_in_classify_reads_as_the_new_one() {
    let scene = Scene::new();
    scene.classify(Step::Replace(2));
    assert_eq!(
        scene.take_log(),
        [
            "removed Ok",
            "attached, reads Some(2)",
            "classify returns",
            "deleted 1"
        ]
    );
    scene.classify(Step::RemoveThenRead);
    assert_eq!(
        scene.take_log(),
        [
            "reads Some(2)",
            "removed Ok",
            "reads None",
            "classify returns",
            "deleted 2"
        ]
    );
    scene.finish();
}

#[test]
fn a_removal_while_another_processor_classifies_the_flow_waits_for_it() {
    let scene = Scene::new();
    let (inside_tx, inside_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    *scene.installed.callout().inside.lock().unwrap() = Some(inside_tx);
    *scene.installed.callout().go.lock().unwrap() = Some(go_rx);
    let callout_id = scene.installed.registration.id();
    std::thread::scope(|s| {
        let classifying = s.spawn(|| scene.classify(Step::Wait));
        inside_rx.recv().unwrap();
        // Another processor removes the context (and then ends the flow) while it classifies.
        let status = scene.machine.at_dispatch(|_irql| {
            // SAFETY: DISPATCH_LEVEL; a context the callout associated; this thread reads none.
            unsafe {
                wfp_rs::sys::FwpsFlowRemoveContext0(
                    FLOW,
                    layer::OutboundTransportV4::ID,
                    callout_id,
                )
            }
        });
        assert_eq!(status, 0x103, "STATUS_PENDING");
        assert!(scene.log.lock().unwrap().is_empty(), "not deleted yet");
        // SAFETY: PASSIVE_LEVEL (harness); a callout id the test registered.
        let busy = scene
            .machine
            .run(|| unsafe { wfp_rs::sys::FwpsCalloutUnregisterById0(callout_id) });
        assert_eq!(
            busy,
            Status::DEVICE_BUSY.raw(),
            "its flowDeleteFn is still to come"
        );
        go_tx.send(()).unwrap();
        classifying.join().unwrap();
    });
    assert_eq!(
        scene.take_log(),
        ["waited, reads Some(1)", "classify returns", "deleted 1"]
    );
    scene.finish();
}

#[test]
fn a_flow_ending_during_its_classification_defers_flow_deleted() {
    let scene = Scene::new();
    let (inside_tx, inside_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    *scene.installed.callout().inside.lock().unwrap() = Some(inside_tx);
    *scene.installed.callout().go.lock().unwrap() = Some(go_rx);
    std::thread::scope(|s| {
        let classifying = s.spawn(|| scene.classify(Step::Wait));
        inside_rx.recv().unwrap();
        assert_eq!(scene.machine.end_flow(FLOW), 1, "one context removed");
        assert!(scene.log.lock().unwrap().is_empty(), "not deleted yet");
        go_tx.send(()).unwrap();
        classifying.join().unwrap();
    });
    assert_eq!(
        scene.take_log(),
        ["waited, reads Some(1)", "classify returns", "deleted 1"]
    );
    scene.finish();
}

wfp_rs_sim::bugcheck_test! {
    /// Outside a classification, FwpsFlowRemoveContext0 calls flowDeleteFn from inside itself
    /// (STATUS_SUCCESS, documented): a caller holding a lock that flowDeleteFn takes hangs on
    /// Windows. The simulator stops.
    fn removing_outside_a_classification_under_the_lock_flow_deleted_takes_stops()
        expects DRIVER_VERIFIER_DETECTED_VIOLATION(wfp_rs::bugcheck::verifier::DEADLOCK_SELF)
    {
        let scene = Scene::new();
        let callout_id = scene.installed.registration.id();
        scene.machine.at_dispatch(|irql| {
            scene.installed.callout().lock.lock(irql, |_, _| {
                // SAFETY: DISPATCH_LEVEL; a context the callout associated.
                unsafe {
                    wfp_rs::sys::FwpsFlowRemoveContext0(
                        FLOW,
                        layer::OutboundTransportV4::ID,
                        callout_id,
                    )
                };
            });
        });
    }
}
