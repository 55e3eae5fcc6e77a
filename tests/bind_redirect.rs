//! Redirecting a bind at ALE_BIND_REDIRECT (`FwpsAcquireWritableLayerDataPointer0` +
//! `FwpsApplyModifiedLayerData0` on an `FWPS_BIND_REQUEST0`), in the simulator: the implicit bind
//! of an outbound connection crosses ALE_BIND_REDIRECT, and an applied change of the local
//! address and port is what ALE_RESOURCE_ASSIGNMENT and every later layer see; a discarded or
//! dropped request leaves the bind as it was; misusing the raw functions stops the machine.

#![cfg(any(not(windows), feature = "sim"))]

use core::net::SocketAddr;
use std::sync::Mutex;

use wfp_rs::callout::{Callout, CalloutKey, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{self, fields};
use wfp_rs::metadata::Direction;
use wfp_rs::redirect::{BindRedirectLayer, RedirectError};
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{AleIrql, Connection, LoadedDriver, Machine};
use wfp_rs_tests::install::{Installed, install};
use wfp_rs_tests::raw_redirect::{Misuse, Raw};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const BIND_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000001");
const BIND_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000002");
const WITNESS_CALLOUTS: [Guid; 5] = [
    guid!("53000000-0000-0000-0000-000000000011"),
    guid!("53000000-0000-0000-0000-000000000012"),
    guid!("53000000-0000-0000-0000-000000000013"),
    guid!("53000000-0000-0000-0000-000000000014"),
    guid!("53000000-0000-0000-0000-000000000015"),
];
const WITNESS_FILTERS: [Guid; 5] = [
    guid!("53000000-0000-0000-0000-000000000021"),
    guid!("53000000-0000-0000-0000-000000000022"),
    guid!("53000000-0000-0000-0000-000000000023"),
    guid!("53000000-0000-0000-0000-000000000024"),
    guid!("53000000-0000-0000-0000-000000000025"),
];

const LOCAL: &str = "10.0.0.1:50123";
const REBOUND: &str = "10.0.0.99:40000";
const REMOTE: &str = "192.0.2.7:443";
const TOKEN: u64 = 0x7011_0000_0000_0042;

fn connection() -> Connection {
    Connection {
        pid: 4343,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: LOCAL.parse().unwrap(),
        remote: REMOTE.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

/// What the rebinding callout does with the request once it changed it.
#[derive(Clone, Copy, PartialEq)]
enum Finish {
    Apply,
    Discard,
    Drop,
}

/// Binds every socket to `to` (and a port reservation token), then finishes as told.
struct Rebind {
    to: SocketAddr,
    finish: Finish,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Clone, Debug, PartialEq)]
struct Seen {
    local: Option<SocketAddr>,
    token: u64,
    modifiers: Vec<u64>,
    wrong_version: Result<(), RedirectError>,
    changed_to: Option<SocketAddr>,
    rights_after: bool,
}

impl<L: BindRedirectLayer> Callout<L> for Rebind {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let mut request = c.bind_request(irql).expect("acquires the bind request");
        let local = request.local();
        let token = request.port_reservation_token();
        let modifiers = request.previous_modifiers().collect();
        let wrong_version = request.set_local(match self.to {
            SocketAddr::V4(_) => "[2001:db8::99]:1".parse().unwrap(),
            SocketAddr::V6(_) => "192.0.2.99:1".parse().unwrap(),
        });
        request.set_local(self.to).expect("the layer's IP version");
        request.set_port_reservation_token(TOKEN);
        let changed_to = request.local();
        assert_eq!(request.port_reservation_token(), TOKEN);
        match self.finish {
            Finish::Apply => request.apply(irql),
            Finish::Discard => request.discard(irql),
            Finish::Drop => drop(request),
        }
        let rights_after = c.out.can_write();
        self.seen.lock().unwrap().push(Seen {
            local,
            token,
            modifiers,
            wrong_version,
            changed_to,
            rights_after,
        });
        c.out.permit().expect("the write right is back");
    }
}

/// Records the local endpoint a later layer sees, and permits.
#[derive(Default)]
struct Witness {
    seen: Mutex<Vec<SocketAddr>>,
}

macro_rules! witness_at {
    ($($layer:ident),*) => {$(
        impl Callout<layer::$layer> for Witness {
            fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, layer::$layer>) {
                let address = c.values.get::<fields::IpLocalAddress>().unwrap();
                let port = c.values.get::<fields::IpLocalPort>().unwrap();
                self.seen.lock().unwrap().push(SocketAddr::new(address.into(), port));
                let _ = c.out.permit();
            }
        }
    )*};
}

witness_at!(
    AleResourceAssignmentV4,
    AleConnectRedirectV4,
    AleAuthConnectV4,
    OutboundTransportV4,
    AleFlowEstablishedV4
);

struct Setup {
    machine: Machine,
    driver: LoadedDriver,
    rebind: Installed<layer::AleBindRedirectV4, Rebind>,
    resource: Installed<layer::AleResourceAssignmentV4, Witness>,
    connect_redirect: Installed<layer::AleConnectRedirectV4, Witness>,
    auth: Installed<layer::AleAuthConnectV4, Witness>,
    transport: Installed<layer::OutboundTransportV4, Witness>,
    established: Installed<layer::AleFlowEstablishedV4, Witness>,
}

fn witness<L: layer::Layer>(
    machine: &Machine,
    driver: &LoadedDriver,
    at: usize,
) -> Installed<L, Witness>
where
    Witness: Callout<L>,
{
    install(
        machine,
        driver,
        CalloutKey::new(WITNESS_CALLOUTS[at]),
        WITNESS_FILTERS[at],
        |_| Witness::default(),
    )
}

fn setup(finish: Finish) -> Setup {
    let machine = Machine::new();
    let driver = machine.load_driver("rebind", host::DriverEntry).unwrap();
    let rebind = install(
        &machine,
        &driver,
        CalloutKey::new(BIND_CALLOUT),
        BIND_FILTER,
        |_| Rebind {
            to: REBOUND.parse().unwrap(),
            finish,
            seen: Mutex::new(Vec::new()),
        },
    );
    Setup {
        resource: witness(&machine, &driver, 0),
        connect_redirect: witness(&machine, &driver, 1),
        auth: witness(&machine, &driver, 2),
        transport: witness(&machine, &driver, 3),
        established: witness(&machine, &driver, 4),
        machine,
        driver,
        rebind,
    }
}

impl Setup {
    fn witnessed(&self) -> [Vec<SocketAddr>; 5] {
        [
            self.resource.callout().seen.lock().unwrap().clone(),
            self.connect_redirect.callout().seen.lock().unwrap().clone(),
            self.auth.callout().seen.lock().unwrap().clone(),
            self.transport.callout().seen.lock().unwrap().clone(),
            self.established.callout().seen.lock().unwrap().clone(),
        ]
    }

    fn teardown(self) {
        let Setup {
            machine,
            driver,
            rebind,
            resource,
            connect_redirect,
            auth,
            transport,
            established,
        } = self;
        rebind.remove(&machine, &driver);
        resource.remove(&machine, &driver);
        connect_redirect.remove(&machine, &driver);
        auth.remove(&machine, &driver);
        transport.remove(&machine, &driver);
        established.remove(&machine, &driver);
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
    }
}

#[test]
fn an_applied_bind_redirect_moves_the_local_endpoint_for_every_later_layer() {
    let setup = setup(Finish::Apply);
    for irql in [AleIrql::Passive, AleIrql::Dispatch] {
        let outcome = setup.machine.connect(&connection(), irql);
        assert_eq!(outcome.decision.action, Action::Permit);
        assert!(outcome.flow_handle.is_some());
        assert_eq!(outcome.local, REBOUND.parse().unwrap());
        assert_eq!(
            outcome.remote,
            REMOTE.parse().unwrap(),
            "the remote is left"
        );
        assert_eq!(outcome.layers[0].0, "ALE_BIND_REDIRECT_V4");
        assert_eq!(outcome.layers[1].0, "ALE_RESOURCE_ASSIGNMENT_V4");
    }
    let rebound: SocketAddr = REBOUND.parse().unwrap();
    for seen in setup.witnessed() {
        assert_eq!(
            seen,
            [rebound, rebound],
            "every later layer sees the new bind"
        );
    }
    let seen = setup.rebind.callout().seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for call in seen {
        assert_eq!(
            call,
            Seen {
                local: Some(LOCAL.parse().unwrap()),
                token: 0,
                modifiers: vec![],
                wrong_version: Err(RedirectError::WrongIpVersion),
                changed_to: Some(rebound),
                rights_after: true,
            }
        );
    }
    setup.teardown();
}

fn assert_unchanged(finish: Finish) {
    let setup = setup(finish);
    let outcome = setup.machine.connect(&connection(), AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.local, LOCAL.parse().unwrap());
    let local: SocketAddr = LOCAL.parse().unwrap();
    for seen in setup.witnessed() {
        assert_eq!(seen, [local], "the bind is where it was");
    }
    let seen = setup.rebind.callout().seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].changed_to, Some(REBOUND.parse().unwrap()));
    assert!(seen[0].rights_after);
    setup.teardown();
}

#[test]
fn a_discarded_bind_request_leaves_the_bind_unchanged() {
    assert_unchanged(Finish::Discard);
}

#[test]
fn a_bind_request_dropped_without_apply_leaves_the_bind_unchanged() {
    assert_unchanged(Finish::Drop);
}

#[test]
fn without_a_bind_redirect_callout_the_outcome_names_the_original_local() {
    let machine = Machine::new();
    let outcome = machine.connect(&connection(), AleIrql::Passive);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.local, LOCAL.parse().unwrap());
}

#[test]
fn an_ipv6_bind_is_redirected_too() {
    let machine = Machine::new();
    let driver = machine.load_driver("rebind-v6", host::DriverEntry).unwrap();
    let to: SocketAddr = "[2001:db8::99]:40000".parse().unwrap();
    let installed = install::<layer::AleBindRedirectV6, _, ()>(
        &machine,
        &driver,
        CalloutKey::new(BIND_CALLOUT),
        BIND_FILTER,
        |_| Rebind {
            to,
            finish: Finish::Apply,
            seen: Mutex::new(Vec::new()),
        },
    );
    let mut v6 = connection();
    v6.local = "[2001:db8::1]:50123".parse().unwrap();
    v6.remote = "[2001:db8::7]:443".parse().unwrap();
    let outcome = machine.connect(&v6, AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.local, to);
    assert_eq!(outcome.layers[0].0, "ALE_BIND_REDIRECT_V6");
    let seen = installed.callout().seen.lock().unwrap().clone();
    assert_eq!(seen[0].local, Some(v6.local));
    assert_eq!(seen[0].wrong_version, Err(RedirectError::WrongIpVersion));
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

/// One classification as [`RebindThenReauthorize`] saw it: whether this filter had redirected
/// the bind, the earlier modifiers, the local endpoint it found, and this filter's id.
type Call = (bool, Vec<u64>, Option<SocketAddr>, u64);

/// Rebinds, then pends and asks for a reauthorization: the reauthorization at
/// ALE_BIND_REDIRECT sees the request as redirected, by this filter.
struct RebindThenReauthorize {
    queue: wfp_rs::work_item::WorkQueue,
    calls: Mutex<Vec<Call>>,
}

impl Callout<layer::AleBindRedirectV4> for RebindThenReauthorize {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleBindRedirectV4>,
    ) {
        let filter_id = c.filter.id();
        let mut request = c.bind_request(irql).expect("acquires");
        let ours = request.redirected_by_this_filter();
        let modifiers: Vec<u64> = request.previous_modifiers().collect();
        let local = request.local();
        if !ours {
            request.set_local(REBOUND.parse().unwrap()).unwrap();
        }
        request.apply(irql);
        self.calls
            .lock()
            .unwrap()
            .push((ours, modifiers, local, filter_id));
        if ours {
            let _ = c.out.permit();
            return;
        }
        let pended = c.pend_decision().expect("pends the first classification");
        drop(
            self.queue
                .queue(irql, move |passive| pended.reauthorize(passive)),
        );
    }
}

#[test]
fn a_reauthorization_sees_its_own_earlier_bind_redirect() {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("bind-loop-check", host::DriverEntry)
        .unwrap();
    let installed = install(
        &machine,
        &driver,
        CalloutKey::new(BIND_CALLOUT),
        BIND_FILTER,
        |d| RebindThenReauthorize {
            queue: d.work_queue(),
            calls: Mutex::new(Vec::new()),
        },
    );
    let outcome = machine.connect(&connection(), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.local, REBOUND.parse().unwrap());
    let calls = installed.callout().calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let filter_id = calls[0].3;
    assert_eq!(
        calls[0],
        (false, vec![], Some(LOCAL.parse().unwrap()), filter_id)
    );
    assert_eq!(
        calls[1],
        (
            true,
            vec![filter_id],
            Some(REBOUND.parse().unwrap()),
            filter_id
        ),
        "the history names this filter, and the request already binds to the new endpoint"
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

fn misuse(how: Misuse) {
    let machine = Machine::new();
    let driver = machine.load_driver("raw-bind", host::DriverEntry).unwrap();
    let _installed = install::<layer::AleBindRedirectV4, _, ()>(
        &machine,
        &driver,
        CalloutKey::new(BIND_CALLOUT),
        BIND_FILTER,
        |_| Raw(how),
    );
    machine.connect(&connection(), AleIrql::Dispatch);
}

bugcheck_test! {
    /// The second apply of one acquire: the copy is gone.
    fn applying_a_bind_request_twice_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0008) {
        misuse(Misuse::ApplyTwice);
    }
}

bugcheck_test! {
    /// A copy of the writable request is not the engine's copy.
    fn applying_another_pointer_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0008) {
        misuse(Misuse::ApplyAnotherPointer);
    }
}

bugcheck_test! {
    fn applying_a_bind_request_never_acquired_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0008) {
        misuse(Misuse::ApplyWithoutAcquire);
    }
}

bugcheck_test! {
    /// classifyFn returned with the bind request acquired and never applied.
    fn never_applying_a_bind_request_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0009) {
        misuse(Misuse::NeverApply);
    }
}
