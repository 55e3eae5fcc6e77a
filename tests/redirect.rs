//! Redirecting a connection at ALE_CONNECT_REDIRECT (`FwpsAcquireWritableLayerDataPointer0` +
//! `FwpsApplyModifiedLayerData0`), in the simulator: the later layers see the new remote
//! endpoint; a request dropped without being applied leaves the connection where it was going;
//! misusing the raw functions stops the machine.

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
use wfp_rs::redirect::RedirectError;
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

const REDIRECT_CALLOUT: Guid = guid!("52000000-0000-0000-0000-000000000001");
const REDIRECT_FILTER: Guid = guid!("52000000-0000-0000-0000-000000000002");
const AUTH_CALLOUT: Guid = guid!("52000000-0000-0000-0000-000000000003");
const AUTH_FILTER: Guid = guid!("52000000-0000-0000-0000-000000000004");
const TRANSPORT_CALLOUT: Guid = guid!("52000000-0000-0000-0000-000000000005");
const TRANSPORT_FILTER: Guid = guid!("52000000-0000-0000-0000-000000000006");
const ESTABLISHED_CALLOUT: Guid = guid!("52000000-0000-0000-0000-000000000007");
const ESTABLISHED_FILTER: Guid = guid!("52000000-0000-0000-0000-000000000008");

/// What the redirect callout does with the request it acquires.
#[derive(Clone, Copy, PartialEq)]
enum Finish {
    Apply,
    Drop,
}

/// Sends every connection that is not its own redirect to `proxy`.
struct ToProxy {
    proxy: SocketAddr,
    finish: Finish,
    /// Per call: the remote it found, whether this filter had redirected it, and what setting a
    /// loopback and a wrong-version address returned.
    seen: Mutex<Vec<Seen>>,
}

#[derive(Clone, Debug, PartialEq)]
struct Seen {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    redirected_by_this_filter: bool,
    loopback: Result<(), RedirectError>,
    wrong_version: Result<(), RedirectError>,
    rights_after: bool,
}

impl<L: wfp_rs::redirect::ConnectRedirectLayer> Callout<L> for ToProxy {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let mut request = c
            .connect_request(irql)
            .expect("acquires the connect request");
        let remote = request.remote();
        let loopback = request.set_remote("127.0.0.1:3128".parse().unwrap());
        let wrong_version = request.set_remote(match self.proxy {
            SocketAddr::V4(_) => "[2001:db8::99]:3128".parse().unwrap(),
            SocketAddr::V6(_) => "192.0.2.99:3128".parse().unwrap(),
        });
        let redirected_by_this_filter = request.redirected_by_this_filter();
        let local = request.local();
        request.set_remote(self.proxy).expect("same IP version");
        match self.finish {
            Finish::Apply => request.apply(irql),
            Finish::Drop => drop(request),
        }
        let rights_after = c.out.can_write();
        self.seen.lock().unwrap().push(Seen {
            remote,
            local,
            redirected_by_this_filter,
            loopback,
            wrong_version,
            rights_after,
        });
        c.out
            .permit()
            .expect("the write right is back after the apply");
    }
}

/// Records the remote endpoint a later layer sees, and permits.
#[derive(Default)]
struct Witness {
    seen: Mutex<Vec<SocketAddr>>,
}

macro_rules! witness_at {
    ($($layer:ident),*) => {$(
        impl Callout<layer::$layer> for Witness {
            fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, layer::$layer>) {
                let address = c.values.get::<fields::IpRemoteAddress>().unwrap();
                let port = c.values.get::<fields::IpRemotePort>().unwrap();
                self.seen.lock().unwrap().push(SocketAddr::new(address.into(), port));
                let _ = c.out.permit();
            }
        }
    )*};
}

witness_at!(AleAuthConnectV4, OutboundTransportV4, AleFlowEstablishedV4);

struct Setup {
    machine: Machine,
    driver: LoadedDriver,
    redirect: Installed<layer::AleConnectRedirectV4, ToProxy>,
    auth: Installed<layer::AleAuthConnectV4, Witness>,
    transport: Installed<layer::OutboundTransportV4, Witness>,
    established: Installed<layer::AleFlowEstablishedV4, Witness>,
}

fn setup(finish: Finish) -> Setup {
    let machine = Machine::new();
    let driver = machine.load_driver("to-proxy", host::DriverEntry).unwrap();
    let redirect = install(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |_| ToProxy {
            proxy: PROXY.parse().unwrap(),
            finish,
            seen: Mutex::new(Vec::new()),
        },
    );
    let auth = install(
        &machine,
        &driver,
        CalloutKey::new(AUTH_CALLOUT),
        AUTH_FILTER,
        |_| Witness::default(),
    );
    let transport = install(
        &machine,
        &driver,
        CalloutKey::new(TRANSPORT_CALLOUT),
        TRANSPORT_FILTER,
        |_| Witness::default(),
    );
    let established = install(
        &machine,
        &driver,
        CalloutKey::new(ESTABLISHED_CALLOUT),
        ESTABLISHED_FILTER,
        |_| Witness::default(),
    );
    Setup {
        machine,
        driver,
        redirect,
        auth,
        transport,
        established,
    }
}

impl Setup {
    fn witnessed(&self) -> [Vec<SocketAddr>; 3] {
        [
            self.auth.callout().seen.lock().unwrap().clone(),
            self.transport.callout().seen.lock().unwrap().clone(),
            self.established.callout().seen.lock().unwrap().clone(),
        ]
    }

    fn teardown(self) {
        let Setup {
            machine,
            driver,
            redirect,
            auth,
            transport,
            established,
        } = self;
        redirect.remove(&machine, &driver);
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

const PROXY: &str = "198.51.100.80:3128";
const ORIGINAL: &str = "192.0.2.7:443";
const LOCAL: &str = "10.0.0.1:50123";

fn connection() -> Connection {
    Connection {
        pid: 4242,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: LOCAL.parse().unwrap(),
        remote: ORIGINAL.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

#[test]
fn an_applied_redirect_sends_the_connection_to_the_proxy() {
    let setup = setup(Finish::Apply);
    for irql in [AleIrql::Passive, AleIrql::Dispatch] {
        let outcome = setup.machine.connect(&connection(), irql);
        assert_eq!(outcome.decision.action, Action::Permit);
        assert!(outcome.flow_handle.is_some());
        assert_eq!(outcome.remote, PROXY.parse().unwrap());
    }
    let proxy: SocketAddr = PROXY.parse().unwrap();
    for seen in setup.witnessed() {
        assert_eq!(seen, [proxy, proxy], "every later layer sees the proxy");
    }
    let seen = setup.redirect.callout().seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for call in seen {
        assert_eq!(
            call,
            Seen {
                remote: Some(ORIGINAL.parse().unwrap()),
                local: Some(LOCAL.parse().unwrap()),
                redirected_by_this_filter: false,
                loopback: Err(RedirectError::Loopback),
                wrong_version: Err(RedirectError::WrongIpVersion),
                rights_after: true,
            }
        );
    }
    setup.teardown();
}

#[test]
fn a_request_dropped_without_apply_leaves_the_connection_unchanged() {
    let setup = setup(Finish::Drop);
    let outcome = setup.machine.connect(&connection(), AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.remote, ORIGINAL.parse().unwrap());
    let original: SocketAddr = ORIGINAL.parse().unwrap();
    for seen in setup.witnessed() {
        assert_eq!(seen, [original]);
    }
    setup.teardown();
}

#[test]
fn without_a_redirect_callout_the_outcome_names_the_original_remote() {
    let machine = Machine::new();
    let outcome = machine.connect(&connection(), AleIrql::Passive);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.remote, ORIGINAL.parse().unwrap());
}

/// Redirects IPv6 connections (no witnesses: the IPv4 test covers the later layers).
#[test]
fn an_ipv6_connection_is_redirected_too() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("to-proxy-v6", host::DriverEntry)
        .unwrap();
    let proxy: SocketAddr = "[2001:db8::80]:3128".parse().unwrap();
    let installed = install::<layer::AleConnectRedirectV6, _, ()>(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |_| ToProxy {
            proxy,
            finish: Finish::Apply,
            seen: Mutex::new(Vec::new()),
        },
    );
    let mut v6 = connection();
    v6.local = "[2001:db8::1]:50123".parse().unwrap();
    v6.remote = "[2001:db8::7]:443".parse().unwrap();
    let outcome = machine.connect(&v6, AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.remote, proxy);
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

fn misuse(how: Misuse) {
    let machine = Machine::new();
    let driver = machine.load_driver("raw", host::DriverEntry).unwrap();
    let _installed = install::<layer::AleConnectRedirectV4, _, ()>(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |_| Raw(how),
    );
    machine.connect(&connection(), AleIrql::Dispatch);
}

bugcheck_test! {
    /// The second apply of one acquire: the copy is gone.
    fn applying_twice_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0008) {
        misuse(Misuse::ApplyTwice);
    }
}

bugcheck_test! {
    fn applying_data_never_acquired_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0008) {
        misuse(Misuse::ApplyWithoutAcquire);
    }
}

bugcheck_test! {
    /// classifyFn returned with the copy acquired and never applied.
    fn never_applying_stops_the_machine() expects WFP_INVALID_OPERATION(0x8000_0009) {
        misuse(Misuse::NeverApply);
    }
}

/// One classification as [`RedirectThenReauthorize`] saw it: whether this filter had redirected
/// the request, the earlier modifiers, the remote it found, and this filter's id.
type Call = (bool, Vec<u64>, Option<SocketAddr>, u64);

/// Redirects, then pends and asks for a reauthorization: the reauthorization at
/// ALE_CONNECT_REDIRECT sees the request as redirected, by this filter.
struct RedirectThenReauthorize {
    queue: wfp_rs::work_item::WorkQueue,
    calls: Mutex<Vec<Call>>,
}

impl Callout<layer::AleConnectRedirectV4> for RedirectThenReauthorize {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let filter_id = c.filter.id();
        let mut request = c.connect_request(irql).expect("acquires");
        let ours = request.redirected_by_this_filter();
        let modifiers: Vec<u64> = request.previous_modifiers().collect();
        let remote = request.remote();
        if !ours {
            request.set_remote(PROXY.parse().unwrap()).unwrap();
        }
        request.apply(irql);
        self.calls
            .lock()
            .unwrap()
            .push((ours, modifiers, remote, filter_id));
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
fn a_reauthorization_sees_its_own_earlier_redirect() {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("loop-check", host::DriverEntry)
        .unwrap();
    let installed = install(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |d| RedirectThenReauthorize {
            queue: d.work_queue(),
            calls: Mutex::new(Vec::new()),
        },
    );
    let outcome = machine.connect(&connection(), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.remote, PROXY.parse().unwrap());
    let calls = installed.callout().calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let filter_id = calls[0].3;
    assert_eq!(
        calls[0],
        (false, vec![], Some(ORIGINAL.parse().unwrap()), filter_id)
    );
    assert_eq!(
        calls[1],
        (
            true,
            vec![filter_id],
            Some(PROXY.parse().unwrap()),
            filter_id
        ),
        "the history names this filter, and the request already goes to the proxy"
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}
