//! Flow contexts: a callout attaches state to a flow, finds it in later classifications, and
//! gets it back when the flow ends — or when it unregisters with contexts still attached.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{self, Layer, value::IpProtocol};
use wfp_rs::metadata::Direction;
use wfp_rs::sim::{AleIrql, Connection, Machine};
use wfp_rs::{Guid, Status, guid};
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
        wfp_rs::sim::as_harness(|| self.deleted.lock().unwrap().push(entry));
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
    driver: &wfp_rs::sim::LoadedDriver,
) -> (
    CalloutRegistration<layer::OutboundTransportV4, Counter, PacketCount>,
    Engine,
) {
    driver
        .run_in_driver(machine, |irql, d| {
            let registration =
                // The counter's log is the test's: allocated as harness code.
                CalloutRegistration::register(irql, d, CALLOUT, wfp_rs::sim::as_harness(Counter::default))
                    .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(
                    irql,
                    &CalloutEntry::<layer::OutboundTransportV4>::new(CALLOUT).name("count"),
                )
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::OutboundTransportV4>::new(FILTER)
                        .name("count")
                        .action(FilterAction::CalloutInspection(CALLOUT)),
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
    let installed = install(&machine, &driver, CALLOUT, FILTER, |_| {
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
