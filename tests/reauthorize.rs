//! Policy-change reauthorization of established flows (Microsoft's "ALE Reauthorization"): a
//! filter added to or deleted from the layer that authorized a flow makes the flow's next
//! packet, whatever its direction, reauthorize the flow at that layer, with
//! `FWP_CONDITION_FLAG_IS_REAUTHORIZE` and the reason `POLICY_CHANGE`; a reauthorization that
//! does not permit tears the flow down.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::FilterId;
use wfp_rs::filter::{Filter, FilterAction, Match};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{self, Layer, fields, value::IpProtocol};
use wfp_rs::metadata::Direction;
use wfp_rs::sys::FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE;
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{AleIrql, Connection, Machine};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: Guid = guid!("61000000-0000-0000-0000-000000000001");
const FILTER: Guid = guid!("61000000-0000-0000-0000-000000000002");
const POLICY_BUMP: Guid = guid!("61000000-0000-0000-0000-000000000003");
const ELSEWHERE: Guid = guid!("61000000-0000-0000-0000-000000000004");

/// Authorizes outbound connections at ALE_AUTH_CONNECT_V4: permits unless `deny` is set, and
/// records what each classification said about itself.
#[derive(Default)]
struct Gate {
    deny: AtomicBool,
    /// (is a reauthorization, REAUTHORIZE_REASON, packet direction from the metadata) per
    /// classification.
    seen: Mutex<Vec<(bool, u32, u32)>>,
}

impl Callout<layer::AleAuthConnectV4> for Gate {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let reason = c.values.get::<fields::ReauthorizeReason>().unwrap_or(0);
        let direction = match c.metadata.direction() {
            Some(Direction::Outbound) => OUTBOUND,
            Some(Direction::Inbound) => INBOUND,
            None => u32::MAX,
        };
        let entry = (c.is_reauthorization(), reason, direction);
        wfp_rs_sim::as_harness(|| self.seen.lock().unwrap().push(entry));
        if self.deny.load(Ordering::SeqCst) {
            let _ = c.out.block();
        } else {
            let _ = c.out.permit();
        }
    }
}

struct Setup {
    machine: Machine,
    driver: wfp_rs_sim::LoadedDriver,
    registration: CalloutRegistration<layer::AleAuthConnectV4, Gate>,
    engine: Engine,
}

fn setup() -> Setup {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = driver
        .run_in_driver(&machine, |irql, d| {
            let key = CalloutKey::<layer::AleAuthConnectV4>::new(CALLOUT);
            let registration =
                CalloutRegistration::register(irql, d, key, wfp_rs_sim::as_harness(Gate::default))
                    .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(key).name("gate"))
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::AleAuthConnectV4>::new(FILTER)
                        .name("gate")
                        .action(FilterAction::CalloutTerminating(key)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap();
    Setup {
        machine,
        driver,
        registration,
        engine,
    }
}

impl Setup {
    fn seen(&self) -> Vec<(bool, u32, u32)> {
        self.registration.callout().seen.lock().unwrap().clone()
    }

    /// A policy change at `L`: a filter added that decides nothing (it matches only local port
    /// 0, which no connection has).
    fn change_policy<L: Layer>(&self, key: Guid) -> FilterId
    where
        fields::IpLocalPort: layer::Field<L>,
    {
        self.driver
            .run_in_driver(&self.machine, |irql, _| {
                self.engine
                    .add_filter(
                        irql,
                        &Filter::<L>::new(key)
                            .name("policy change")
                            .condition::<fields::IpLocalPort>(Match::Equal(0))
                            .action(FilterAction::Permit),
                    )
                    .unwrap()
            })
            .unwrap()
    }

    fn delete_filter(&self, id: FilterId) {
        self.driver
            .run_in_driver(&self.machine, |irql, _| {
                self.engine.delete_filter(irql, id).unwrap()
            })
            .unwrap();
    }

    fn teardown(self) {
        let Setup {
            machine,
            driver,
            registration,
            engine,
        } = self;
        driver.run_in_driver(&machine, |irql, _| {
            engine.close(irql).unwrap();
            registration.unregister(irql).map_err(|(_, s)| s).unwrap();
        });
        machine.unload_driver(driver).unwrap();
        assert!(machine.pool_blocks().is_empty());
    }
}

fn connection(local_port: u16) -> Connection {
    Connection {
        pid: 9,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: format!("10.0.0.1:{local_port}").parse().unwrap(),
        remote: "192.0.2.1:443".parse().unwrap(),
        direction: Direction::Outbound,
    }
}

const OUTBOUND: u32 = 1; // FWP_DIRECTION_OUTBOUND
const INBOUND: u32 = 0; // FWP_DIRECTION_INBOUND

#[test]
fn without_a_policy_change_an_established_flow_is_not_asked_again() {
    let setup = setup();
    let conn = connection(43000);
    let flow = setup
        .machine
        .connect(&conn, AleIrql::Dispatch)
        .flow_handle
        .expect("established");
    // The gate would deny now, but nothing changed at its layer: the flow goes on.
    setup
        .registration
        .callout()
        .deny
        .store(true, Ordering::SeqCst);
    for direction in [Direction::Outbound, Direction::Inbound] {
        assert_eq!(
            setup.machine.packet(&conn, flow, direction).action,
            Action::Permit
        );
    }
    assert_eq!(
        setup.seen(),
        [(false, 0, OUTBOUND)],
        "asked once, at connect"
    );
    assert!(!setup.machine.is_flow_cut(flow));
    setup.teardown();
}

#[test]
fn a_policy_change_reauthorizes_the_next_packet_once_and_a_block_cuts_the_flow() {
    let setup = setup();
    let (kept, cut) = (connection(43001), connection(43002));
    let kept_flow = setup
        .machine
        .connect(&kept, AleIrql::Dispatch)
        .flow_handle
        .unwrap();
    let cut_flow = setup
        .machine
        .connect(&cut, AleIrql::Dispatch)
        .flow_handle
        .unwrap();
    let bump = setup.change_policy::<layer::AleAuthConnectV4>(POLICY_BUMP);

    // The kept flow's next packet is inbound: it is reauthorized at ALE_AUTH_CONNECT all the
    // same, as an inbound packet, once.
    assert_eq!(
        setup
            .machine
            .packet(&kept, kept_flow, Direction::Inbound)
            .action,
        Action::Permit
    );
    assert_eq!(
        setup
            .machine
            .packet(&kept, kept_flow, Direction::Inbound)
            .action,
        Action::Permit
    );
    let reauthorized = (
        true,
        FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE,
        INBOUND,
    );
    assert_eq!(
        setup.seen(),
        [(false, 0, OUTBOUND), (false, 0, OUTBOUND), reauthorized],
        "two connects, one reauthorization"
    );

    // The rules change: the other flow's next packet is reauthorized, denied, and the flow is
    // torn down; its later packets are dropped without asking anyone.
    setup
        .registration
        .callout()
        .deny
        .store(true, Ordering::SeqCst);
    let dropped = setup.machine.packet(&cut, cut_flow, Direction::Outbound);
    assert_eq!(dropped.action, Action::Block);
    assert!(setup.machine.is_flow_cut(cut_flow));
    assert_eq!(
        setup
            .machine
            .packet(&cut, cut_flow, Direction::Outbound)
            .action,
        Action::Block
    );
    assert_eq!(setup.seen().len(), 4, "the dropped packet asked nobody");
    assert_eq!(
        setup.seen()[3],
        (
            true,
            FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE,
            OUTBOUND
        )
    );

    // The kept flow was reauthorized before the change of rules and no policy changed since.
    assert_eq!(
        setup
            .machine
            .packet(&kept, kept_flow, Direction::Outbound)
            .action,
        Action::Permit
    );
    // Deleting a filter is a policy change too: now the kept flow is cut as well.
    setup.delete_filter(bump);
    assert_eq!(
        setup
            .machine
            .packet(&kept, kept_flow, Direction::Outbound)
            .action,
        Action::Block
    );
    assert!(setup.machine.is_flow_cut(kept_flow));
    assert_eq!(setup.machine.end_flow(cut_flow), 0);
    assert!(
        !setup.machine.is_flow_cut(cut_flow),
        "an ended flow is forgotten"
    );
    setup.teardown();
}

#[test]
fn a_policy_change_at_another_layer_reauthorizes_nothing() {
    let setup = setup();
    let conn = connection(43003);
    let flow = setup
        .machine
        .connect(&conn, AleIrql::Dispatch)
        .flow_handle
        .unwrap();
    setup
        .registration
        .callout()
        .deny
        .store(true, Ordering::SeqCst);
    // ALE_AUTH_RECV_ACCEPT authorizes inbound flows, not this one; the IPv6 connect layer
    // not the IPv4 one.
    setup.change_policy::<layer::AleAuthRecvAcceptV4>(ELSEWHERE);
    setup.change_policy::<layer::AleAuthConnectV6>(POLICY_BUMP);
    assert_eq!(
        setup
            .machine
            .packet(&conn, flow, Direction::Outbound)
            .action,
        Action::Permit
    );
    assert_eq!(setup.seen().len(), 1);
    setup.teardown();
}
