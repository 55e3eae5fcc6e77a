//! Redirecting a connection to a local proxy at ALE_CONNECT_REDIRECT, in the simulator: the
//! redirect handle (`FwpsRedirectHandleCreate0`), the redirect state
//! (`FwpsQueryConnectionRedirectState0`) of the connection and of the proxy's own connections,
//! a local redirect without a handle not taking effect, pended redirection from a work item
//! (also of a connection a bind redirect rebound), the reauthorization
//! `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` asks for when another filter changes
//! a pended request, and the misuses that stop the machine.

#![cfg(any(not(windows), feature = "sim"))]

use core::net::SocketAddr;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{self, fields};
use wfp_rs::metadata::Direction;
use wfp_rs::pend::FinalAction;
use wfp_rs::redirect::{RedirectError, RedirectHandle, RedirectState};
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{AleIrql, Connection, LoadedDriver, Machine, RedirectRecords};
use wfp_rs_tests::install::{Installed, install};
use wfp_rs_tests::raw_redirect;

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const PROVIDER: Guid = guid!("53000000-0000-0000-0000-0000000000aa");
const REDIRECT_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000001");
const REDIRECT_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000002");
const AUTH_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000003");
const AUTH_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000004");

const APP_PID: u64 = 4242;
const PROXY_PID: u32 = 777;
const OTHER_PROXY_PID: u32 = 778;
const ORIGINAL: &str = "192.0.2.7:443";
const LOCAL: &str = "10.0.0.1:50123";
const PROXY: &str = "127.0.0.1:3128";
const OTHER_PROXY: &str = "127.0.0.1:8080";

fn app_connection() -> Connection {
    Connection {
        pid: APP_PID,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: LOCAL.parse().unwrap(),
        remote: ORIGINAL.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

/// The proxy's own outbound connection to where the application wanted to go.
fn proxy_connection(pid: u32) -> Connection {
    Connection {
        pid: u64::from(pid),
        app: "\\device\\harddiskvolume1\\proxy.exe".into(),
        protocol: IpProtocol::Tcp,
        local: "10.0.0.1:50999".parse().unwrap(),
        remote: ORIGINAL.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

/// Creates a redirect handle inside the driver (so the driver owns it, as on Windows).
fn create_handle(machine: &Machine, driver: &LoadedDriver) -> RedirectHandle {
    driver
        .run_in_driver(machine, |irql, _| RedirectHandle::create(irql, PROVIDER))
        .expect("an SDK driver")
        .expect("creates a redirect handle")
}

/// Records the remote endpoint ALE_AUTH_CONNECT sees, and permits.
#[derive(Default)]
struct Witness {
    seen: Mutex<Vec<SocketAddr>>,
}

impl Callout<layer::AleAuthConnectV4> for Witness {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let address = c.values.get::<fields::IpRemoteAddress>().unwrap();
        let port = c.values.get::<fields::IpRemotePort>().unwrap();
        self.seen
            .lock()
            .unwrap()
            .push(SocketAddr::new(address.into(), port));
        let _ = c.out.permit();
    }
}

/// Two redirect handles in one callout, standing for two proxying callouts: each call records
/// the state of the connection relative to both, then redirects with the handle its plan
/// names (to that handle's proxy) or lets the connection through.
struct TwoProxies {
    handles: [RedirectHandle; 2],
    plan: Mutex<VecDeque<Option<usize>>>,
    states: Mutex<Vec<[RedirectState; 2]>>,
}

impl Callout<layer::AleConnectRedirectV4> for TwoProxies {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let states = [
            c.redirect_state(irql, &self.handles[0]),
            c.redirect_state(irql, &self.handles[1]),
        ];
        self.states.lock().unwrap().push(states);
        if let Some(Some(which)) = self.plan.lock().unwrap().pop_front() {
            let (proxy, pid) = [(PROXY, PROXY_PID), (OTHER_PROXY, OTHER_PROXY_PID)][which];
            let mut request = c.connect_request(irql).expect("acquires");
            request
                .redirect_locally(proxy.parse().unwrap(), &self.handles[which], pid)
                .expect("a local redirect of the connection's IP version");
            request.apply(irql);
        }
        let _ = c.out.permit();
    }
}

struct Setup<C: Callout<layer::AleConnectRedirectV4>> {
    machine: Machine,
    driver: LoadedDriver,
    redirect: Installed<layer::AleConnectRedirectV4, C>,
    auth: Installed<layer::AleAuthConnectV4, Witness>,
}

/// Loads a driver, creates two redirect handles in it, and installs the callout `make` builds
/// from them at ALE_CONNECT_REDIRECT_V4, and a [`Witness`] at ALE_AUTH_CONNECT_V4.
fn setup<C: Callout<layer::AleConnectRedirectV4>>(
    machine: Machine,
    make: impl FnOnce([RedirectHandle; 2], &mut Driver<'_>) -> C,
) -> Setup<C> {
    let driver = machine
        .load_driver("local-proxy", host::DriverEntry)
        .unwrap();
    let handles = [
        create_handle(&machine, &driver),
        create_handle(&machine, &driver),
    ];
    let redirect = install(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |d| make(handles, d),
    );
    let auth = install(
        &machine,
        &driver,
        CalloutKey::new(AUTH_CALLOUT),
        AUTH_FILTER,
        |_| Witness::default(),
    );
    Setup {
        machine,
        driver,
        redirect,
        auth,
    }
}

impl<C: Callout<layer::AleConnectRedirectV4>> Setup<C> {
    /// Removes the callouts (their redirect handles are dropped, so destroyed, at
    /// PASSIVE_LEVEL in the driver) and unloads: no handle, pend or pool is left.
    fn teardown(self) {
        let Setup {
            machine,
            driver,
            redirect,
            auth,
        } = self;
        redirect.remove(&machine, &driver);
        auth.remove(&machine, &driver);
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "{:?}",
            machine.pool_blocks()
        );
    }
}

#[test]
fn a_local_redirect_with_a_handle_reaches_the_proxy_and_the_proxy_gets_through() {
    let setup = setup(Machine::new(), |handles, _| TwoProxies {
        handles,
        plan: Mutex::new([Some(0), None].into()),
        states: Mutex::new(Vec::new()),
    });
    let proxy: SocketAddr = PROXY.parse().unwrap();
    let original: SocketAddr = ORIGINAL.parse().unwrap();

    let redirected = setup.machine.connect(&app_connection(), AleIrql::Dispatch);
    assert_eq!(redirected.decision.action, Action::Permit);
    assert_eq!(redirected.remote, proxy);
    assert_eq!(redirected.redirect_records.len(), 1);

    // The proxy sets the records on its own connection: the callout recognises its redirect
    // and lets it go where the application wanted.
    let proxied = setup.machine.connect_with_redirect_records(
        &proxy_connection(PROXY_PID),
        AleIrql::Dispatch,
        &redirected.redirect_records,
    );
    assert_eq!(proxied.decision.action, Action::Permit);
    assert_eq!(proxied.remote, original);
    assert_eq!(proxied.redirect_records, redirected.redirect_records);

    assert_eq!(
        *setup.auth.callout().seen.lock().unwrap(),
        [proxy, original],
        "ALE_AUTH_CONNECT sees the proxy, then the proxy's connection to the original"
    );
    assert_eq!(
        setup.redirect.callout().states.lock().unwrap()[..],
        [
            [RedirectState::NotRedirected; 2],
            [
                RedirectState::RedirectedBySelf,
                RedirectState::RedirectedByOther
            ],
        ]
    );
    setup.teardown();
}

#[test]
fn the_redirect_state_tells_self_other_and_previously_self_apart() {
    // Handle 0 proxies the application; handle 1, finding the proxy's connection redirected by
    // another, proxies it again; the second proxy's connection is then "previously redirected
    // by self" for handle 0, which must not redirect it again.
    let setup = setup(Machine::new(), |handles, _| TwoProxies {
        handles,
        plan: Mutex::new([Some(0), Some(1), None].into()),
        states: Mutex::new(Vec::new()),
    });
    let first = setup.machine.connect(&app_connection(), AleIrql::Passive);
    assert_eq!(first.remote, PROXY.parse().unwrap());
    let second = setup.machine.connect_with_redirect_records(
        &proxy_connection(PROXY_PID),
        AleIrql::Passive,
        &first.redirect_records,
    );
    assert_eq!(second.remote, OTHER_PROXY.parse().unwrap());
    assert_eq!(second.redirect_records.len(), 2);
    let third = setup.machine.connect_with_redirect_records(
        &proxy_connection(OTHER_PROXY_PID),
        AleIrql::Passive,
        &second.redirect_records,
    );
    assert_eq!(third.remote, ORIGINAL.parse().unwrap());
    assert_eq!(
        setup.redirect.callout().states.lock().unwrap()[..],
        [
            [RedirectState::NotRedirected, RedirectState::NotRedirected],
            [
                RedirectState::RedirectedBySelf,
                RedirectState::RedirectedByOther
            ],
            [
                RedirectState::PreviouslyRedirectedBySelf,
                RedirectState::RedirectedBySelf
            ],
        ]
    );
    // A connection whose socket carries no records is not redirected, whoever asks.
    let fresh = setup.machine.connect_with_redirect_records(
        &app_connection(),
        AleIrql::Passive,
        &RedirectRecords::default(),
    );
    assert_eq!(
        fresh.remote,
        ORIGINAL.parse().unwrap(),
        "the plan is used up"
    );
    assert_eq!(
        setup.redirect.callout().states.lock().unwrap()[3],
        [RedirectState::NotRedirected; 2]
    );
    setup.teardown();
}

#[test]
fn redirect_locally_refuses_process_id_zero_and_another_ip_version() {
    struct Refusals {
        handle: RedirectHandle,
        results: Mutex<Vec<Result<(), RedirectError>>>,
    }
    impl Callout<layer::AleConnectRedirectV4> for Refusals {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleConnectRedirectV4>,
        ) {
            let mut request = c.connect_request(irql).expect("acquires");
            let mut results = self.results.lock().unwrap();
            results.push(request.redirect_locally(PROXY.parse().unwrap(), &self.handle, 0));
            results.push(request.redirect_locally(
                "[::1]:3128".parse().unwrap(),
                &self.handle,
                PROXY_PID,
            ));
            results.push(request.set_remote(PROXY.parse().unwrap()));
            request.apply(irql);
            let _ = c.out.permit();
        }
    }
    let setup = setup(Machine::new(), |[handle, _], _| Refusals {
        handle,
        results: Mutex::new(Vec::new()),
    });
    let outcome = setup.machine.connect(&app_connection(), AleIrql::Dispatch);
    assert_eq!(outcome.remote, ORIGINAL.parse().unwrap());
    assert!(outcome.redirect_records.is_empty());
    assert_eq!(
        setup.redirect.callout().results.lock().unwrap()[..],
        [
            Err(RedirectError::NoTargetProcess),
            Err(RedirectError::WrongIpVersion),
            Err(RedirectError::Loopback),
        ]
    );
    setup.teardown();
}

/// What a raw callout writes into the connect request before applying it.
#[derive(Clone, Copy)]
struct RawLocal {
    remote: &'static str,
    pid: u32,
    with_handle: bool,
}

/// Redirects with the raw functions, so it can leave out what the safe API requires.
struct RawRedirect {
    handle: RedirectHandle,
    how: RawLocal,
}

impl Callout<layer::AleConnectRedirectV4> for RawRedirect {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let (handle, data) = raw_redirect::connect_request(c);
        // SAFETY: the writable copy the engine just handed out.
        let request = unsafe { &mut *data };
        request.remoteAddressAndPort =
            wfp_rs::redirect::storage_from_socket_address(self.how.remote.parse().unwrap());
        request.localRedirectTargetPID = self.how.pid;
        if self.how.with_handle {
            request.localRedirectHandle = self.handle.raw();
        }
        // SAFETY: the copy acquired above, applied once, then the handle released once.
        unsafe { sys::FwpsApplyModifiedLayerData0(handle, data.cast(), 0) };
        // SAFETY: acquired above, applied, released once.
        unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        let _ = c.out.permit();
    }
}

fn raw_outcome(how: RawLocal) -> SocketAddr {
    let setup = setup(Machine::new(), |[handle, _], _| RawRedirect { handle, how });
    let outcome = setup.machine.connect(&app_connection(), AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    let seen = setup.auth.callout().seen.lock().unwrap().clone();
    assert_eq!(seen, [outcome.remote], "ALE_AUTH_CONNECT agrees");
    setup.teardown();
    outcome.remote
}

#[test]
fn a_local_redirect_without_a_redirect_handle_does_not_take_effect() {
    let original: SocketAddr = ORIGINAL.parse().unwrap();
    // Loopback, and this host's own address: both are local.
    for remote in [PROXY, "10.0.0.1:3128"] {
        let without_handle = RawLocal {
            remote,
            pid: PROXY_PID,
            with_handle: false,
        };
        assert_eq!(
            raw_outcome(without_handle),
            original,
            "{remote} without a handle"
        );
        let without_pid = RawLocal {
            remote,
            pid: 0,
            with_handle: true,
        };
        assert_eq!(
            raw_outcome(without_pid),
            original,
            "{remote} without a process"
        );
        let complete = RawLocal {
            remote,
            pid: PROXY_PID,
            with_handle: true,
        };
        assert_eq!(raw_outcome(complete), remote.parse().unwrap());
    }
    // A remote proxy needs neither.
    let remote = RawLocal {
        remote: "198.51.100.80:3128",
        pid: 0,
        with_handle: false,
    };
    assert_eq!(raw_outcome(remote), "198.51.100.80:3128".parse().unwrap());
}

/// Pends every connection it did not redirect itself, and redirects it to the local proxy from
/// a work item at PASSIVE_LEVEL, then completes the pend with a permit.
struct PendedProxy {
    queue: WorkQueue,
    handle: Arc<RedirectHandle>,
    states: Mutex<Vec<RedirectState>>,
}

impl Callout<layer::AleConnectRedirectV4> for PendedProxy {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let state = c.redirect_state(irql, &self.handle);
        self.states.lock().unwrap().push(state);
        if state != RedirectState::NotRedirected {
            let _ = c.out.permit();
            return;
        }
        let Ok(mut pended) = c.pend_redirect() else {
            let _ = c.out.permit();
            return;
        };
        let handle = Arc::clone(&self.handle);
        let queued = self.queue.queue(irql, move |passive| {
            if let Ok(mut request) = pended.connect_request(passive) {
                let _ = request.redirect_locally(PROXY.parse().unwrap(), &handle, PROXY_PID);
                request.apply_reauthorize_if_modified_by_others(passive);
            }
            pended.complete(passive, FinalAction::Permit);
        });
        drop(queued);
    }
}

#[test]
fn a_pended_redirect_applied_from_a_work_item_reaches_the_proxy() {
    let setup = setup(Machine::with_worker_threads(2), |[handle, _], d| {
        PendedProxy {
            queue: d.work_queue(),
            handle: Arc::new(handle),
            states: Mutex::new(Vec::new()),
        }
    });
    let proxy: SocketAddr = PROXY.parse().unwrap();
    for irql in [AleIrql::Passive, AleIrql::Dispatch] {
        let outcome = setup.machine.connect(&app_connection(), irql);
        assert!(outcome.pended);
        assert_eq!(outcome.decision.action, Action::Permit);
        assert_eq!(outcome.remote, proxy);
        assert_eq!(outcome.redirect_records.len(), 1);
        let proxied = setup.machine.connect_with_redirect_records(
            &proxy_connection(PROXY_PID),
            irql,
            &outcome.redirect_records,
        );
        assert!(!proxied.pended, "its own redirect is let through at once");
        assert_eq!(proxied.remote, ORIGINAL.parse().unwrap());
    }
    assert_eq!(
        *setup.auth.callout().seen.lock().unwrap(),
        [
            proxy,
            ORIGINAL.parse().unwrap(),
            proxy,
            ORIGINAL.parse().unwrap()
        ]
    );
    assert_eq!(
        setup.redirect.callout().states.lock().unwrap()[..],
        [
            RedirectState::NotRedirected,
            RedirectState::RedirectedBySelf,
            RedirectState::NotRedirected,
            RedirectState::RedirectedBySelf,
        ]
    );
    setup.teardown();
}

/// Binds every IPv4 socket to one source address, keeping its port (ALE_BIND_REDIRECT).
struct SourceAddress(SocketAddr);

impl Callout<layer::AleBindRedirectV4> for SourceAddress {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleBindRedirectV4>,
    ) {
        if let Ok(mut request) = c.bind_request(irql) {
            if let Some(local) = request.local() {
                let _ = request.set_local(SocketAddr::new(self.0.ip(), local.port()));
            }
            request.apply(irql);
        }
        let _ = c.out.permit();
    }
}

/// The bind request (main's shared acquire/apply) and the pended local redirect (the same
/// plumbing, acquired from the pend) on one connection: the implicit bind is rebound first,
/// then the connect request, acquired from a work item, sends it to the proxy.
#[test]
fn a_rebound_connection_is_redirected_to_the_local_proxy_from_a_pend() {
    const BIND_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000005");
    const BIND_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000006");
    let setup = setup(Machine::with_worker_threads(2), |[handle, _], d| {
        PendedProxy {
            queue: d.work_queue(),
            handle: Arc::new(handle),
            states: Mutex::new(Vec::new()),
        }
    });
    let source: SocketAddr = "10.0.0.9:0".parse().unwrap();
    let bind = install(
        &setup.machine,
        &setup.driver,
        CalloutKey::new(BIND_CALLOUT),
        BIND_FILTER,
        |_| SourceAddress(source),
    );
    let outcome = setup.machine.connect(&app_connection(), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    let local: SocketAddr = LOCAL.parse().unwrap();
    assert_eq!(outcome.local, SocketAddr::new(source.ip(), local.port()));
    assert_eq!(outcome.remote, PROXY.parse().unwrap());
    assert_eq!(outcome.redirect_records.len(), 1);
    assert_eq!(
        outcome.layers.first().map(|(name, _)| *name),
        Some("ALE_BIND_REDIRECT_V4")
    );
    bind.remove(&setup.machine, &setup.driver);
    setup.teardown();
}

/// Pends the classification with the raw routines (`FwpsAcquireClassifyHandle0`,
/// `FwpsPendClassify0`) and blocks it for now: the classify handle, the filter id and the
/// classify-out the completion will hand back.
fn pend_raw(
    c: &mut Classify<'_, layer::AleConnectRedirectV4>,
) -> (u64, u64, sys::FWPS_CLASSIFY_OUT0) {
    let mut handle = 0u64;
    // SAFETY: the classification's own classify context, during classifyFn.
    let status = unsafe {
        sys::FwpsAcquireClassifyHandle0(c.raw_classify_context().cast_mut(), 0, &mut handle)
    };
    assert_eq!(status, 0);
    let filter_id = c.filter.id();
    let mut out = sys::FWPS_CLASSIFY_OUT0 {
        actionType: sys::FWP_ACTION_BLOCK,
        outContext: 0,
        filterId: 0,
        rights: 0,
        flags: 0,
        reserved: 0,
    };
    // SAFETY: the handle was just acquired; `out` stands in for the classify-out.
    let status = unsafe { sys::FwpsPendClassify0(handle, filter_id, 0, &mut out) };
    assert_eq!(status, 0);
    c.out.block();
    (handle, filter_id, out)
}

/// Pends, acquires the connect request in classifyFn and hands the copy to a work item, which
/// changes, applies and completes after (or while) classifyFn returns: the copy of a pended
/// classification may be held across the return.
struct HandOff {
    queue: WorkQueue,
}

impl Callout<layer::AleConnectRedirectV4> for HandOff {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let (handle, filter_id, mut out) = pend_raw(c);
        let mut data: sys::PVOID = core::ptr::null_mut();
        assert_eq!(acquire_pended(handle, filter_id, &mut data, &mut out), 0);
        let data = data as usize;
        drop(self.queue.queue(irql, move |_passive| {
            let request = data as *mut sys::FWPS_CONNECT_REQUEST0;
            // SAFETY: the copy acquired in classifyFn, still outstanding: the pend holds it.
            unsafe {
                (*request).remoteAddressAndPort = wfp_rs::redirect::storage_from_socket_address(
                    "198.51.100.80:3128".parse().unwrap(),
                );
            }
            // SAFETY: the copy acquired in classifyFn, applied once.
            unsafe { sys::FwpsApplyModifiedLayerData0(handle, request.cast(), 0) };
            out.actionType = sys::FWP_ACTION_PERMIT;
            // SAFETY: pended in classifyFn, completed once, then released once.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, &out) };
            // SAFETY: completed above, released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        }));
    }
}

#[test]
fn a_pended_classification_s_copy_may_be_applied_after_classify_returns() {
    let setup = setup(Machine::with_worker_threads(2), |_, d| HandOff {
        queue: d.work_queue(),
    });
    let outcome = setup.machine.connect(&app_connection(), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(outcome.remote, "198.51.100.80:3128".parse().unwrap());
    assert_eq!(
        *setup.auth.callout().seen.lock().unwrap(),
        ["198.51.100.80:3128".parse::<SocketAddr>().unwrap()]
    );
    setup.teardown();
}

bugcheck_test! {
    /// A redirect handle still alive when the driver unloads: fwpkclnt.sys would keep it.
    fn unloading_with_a_redirect_handle_never_destroyed_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("leaky", host::DriverEntry).unwrap();
        core::mem::forget(create_handle(&machine, &driver));
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    fn destroying_a_redirect_handle_twice_stops() expects WFP_INVALID_OPERATION(0x8000_0020) {
        let machine = Machine::new();
        let driver = machine.load_driver("twice", host::DriverEntry).unwrap();
        let handle = create_handle(&machine, &driver);
        let raw = handle.raw();
        driver.run_in_driver(&machine, |irql, _| {
            handle.destroy(irql);
            // SAFETY: none; the handle was destroyed just above, the simulator stops here.
            unsafe { sys::FwpsRedirectHandleDestroy0(raw) };
        });
    }
}

/// How a raw pended redirect misuses the functions. The first two happen in classifyFn itself
/// (Windows 8 allows every step of an asynchronous redirection there), so they do not race
/// with classifyFn's return; the third in a work item.
#[derive(Clone, Copy)]
enum PendedMisuse {
    CompleteBeforeApply,
    AcquireAfterComplete,
    ApplyTwiceFromAWorkItem,
}

struct RawPended {
    queue: WorkQueue,
    how: PendedMisuse,
}

/// `FwpsAcquireWritableLayerDataPointer0` with a pended classification's handle.
fn acquire_pended(
    handle: u64,
    filter_id: u64,
    data: &mut sys::PVOID,
    out: &mut sys::FWPS_CLASSIFY_OUT0,
) -> i32 {
    // SAFETY: the pended classification's handle; `data` writable; `out` the deep copy of the
    // classify-out (or, after the completion, the misuse under test).
    unsafe { sys::FwpsAcquireWritableLayerDataPointer0(handle, filter_id, 0, data, out) }
}

impl Callout<layer::AleConnectRedirectV4> for RawPended {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let (handle, filter_id, mut out) = pend_raw(c);
        let mut data: sys::PVOID = core::ptr::null_mut();
        match self.how {
            PendedMisuse::CompleteBeforeApply => {
                assert_eq!(acquire_pended(handle, filter_id, &mut data, &mut out), 0);
                // SAFETY: none; the copy is not applied, the simulator stops here.
                unsafe { sys::FwpsCompleteClassify0(handle, 0, &out) };
            }
            PendedMisuse::AcquireAfterComplete => {
                // SAFETY: pended above, completed once.
                unsafe { sys::FwpsCompleteClassify0(handle, 0, &out) };
                // The simulator stops in here.
                acquire_pended(handle, filter_id, &mut data, &mut out);
            }
            PendedMisuse::ApplyTwiceFromAWorkItem => {
                drop(self.queue.queue(irql, move |_passive| {
                    let mut data: sys::PVOID = core::ptr::null_mut();
                    assert_eq!(acquire_pended(handle, filter_id, &mut data, &mut out), 0);
                    // SAFETY: the copy acquired above, applied once.
                    unsafe { sys::FwpsApplyModifiedLayerData0(handle, data, 0) };
                    // SAFETY: none; the second apply is the misuse, the simulator stops here.
                    unsafe { sys::FwpsApplyModifiedLayerData0(handle, data, 0) };
                }));
            }
        }
    }
}

fn pended_misuse(how: PendedMisuse) {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("raw-pended", host::DriverEntry)
        .unwrap();
    let _installed = install(
        &machine,
        &driver,
        CalloutKey::new(REDIRECT_CALLOUT),
        REDIRECT_FILTER,
        |d| RawPended {
            queue: d.work_queue(),
            how,
        },
    );
    machine.connect(&app_connection(), AleIrql::Dispatch);
}

bugcheck_test! {
    /// The pend completed while its connect request is acquired and not applied.
    fn completing_a_pended_redirect_before_the_apply_stops() expects WFP_INVALID_OPERATION(0x8000_0022) {
        pended_misuse(PendedMisuse::CompleteBeforeApply);
    }
}

bugcheck_test! {
    /// Once the pend is completed the stack has taken the connect request back.
    fn acquiring_after_the_completion_stops() expects WFP_INVALID_OPERATION(0x8000_0007) {
        pended_misuse(PendedMisuse::AcquireAfterComplete);
    }
}

bugcheck_test! {
    fn applying_a_pended_redirect_twice_stops() expects WFP_INVALID_OPERATION(0x8000_0008) {
        pended_misuse(PendedMisuse::ApplyTwiceFromAWorkItem);
    }
}

bugcheck_test! {
    /// The request names a redirect handle that was destroyed: WFP would use a freed object.
    fn applying_a_request_naming_a_destroyed_redirect_handle_stops() expects WFP_INVALID_OPERATION(0x8000_0020) {
        let machine = Machine::new();
        let driver = machine.load_driver("stale-handle", host::DriverEntry).unwrap();
        let stale = create_handle(&machine, &driver);
        let raw = stale.raw();
        driver.run_in_driver(&machine, |irql, _| stale.destroy(irql));
        struct Stale(usize);
        impl Callout<layer::AleConnectRedirectV4> for Stale {
            fn classify(
                &self,
                _irql: &mut DispatchLevel<'_>,
                c: &mut Classify<'_, layer::AleConnectRedirectV4>,
            ) {
                // The safe API cannot name a destroyed handle (the request borrows it): the raw
                // functions can.
                let (handle, data) = raw_redirect::connect_request(c);
                // SAFETY: the writable copy the engine just handed out.
                let copy = unsafe { &mut *data };
                copy.remoteAddressAndPort =
                    wfp_rs::redirect::storage_from_socket_address(PROXY.parse().unwrap());
                copy.localRedirectTargetPID = PROXY_PID;
                copy.localRedirectHandle = self.0 as sys::HANDLE;
                // SAFETY: none; the copy names a destroyed handle, the simulator stops here.
                unsafe { sys::FwpsApplyModifiedLayerData0(handle, data.cast(), 0) };
            }
        }
        let _installed = install(
            &machine,
            &driver,
            CalloutKey::new(REDIRECT_CALLOUT),
            REDIRECT_FILTER,
            |_| Stale(raw as usize),
        );
        machine.connect(&app_connection(), AleIrql::Dispatch);
    }
}

/// Keeps the redirect records of the first connection and queries them in the second.
struct KeepsRecords {
    handle: RedirectHandle,
    kept: Mutex<Option<usize>>,
}

impl Callout<layer::AleConnectRedirectV4> for KeepsRecords {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let current = c.metadata.redirect_records().expect("records") as usize;
        let kept = *self.kept.lock().unwrap().get_or_insert(current);
        if kept != current {
            // SAFETY: none; the first connection's records are gone, the simulator stops here.
            unsafe {
                sys::FwpsQueryConnectionRedirectState0(
                    kept as sys::HANDLE,
                    self.handle.raw(),
                    core::ptr::null_mut(),
                )
            };
        }
        let _ = c.out.permit();
    }
}

bugcheck_test! {
    /// Redirect records belong to the classification that handed them out.
    fn querying_redirect_records_kept_after_classify_stops() expects WFP_INVALID_OPERATION(0x8000_0021) {
        let machine = Machine::new();
        let driver = machine.load_driver("keeps-records", host::DriverEntry).unwrap();
        let handle = create_handle(&machine, &driver);
        let _installed = install(
            &machine,
            &driver,
            CalloutKey::new(REDIRECT_CALLOUT),
            REDIRECT_FILTER,
            |_| KeepsRecords {
                handle,
                kept: Mutex::new(None),
            },
        );
        machine.connect(&app_connection(), AleIrql::Dispatch);
        machine.connect(&app_connection(), AleIrql::Dispatch);
    }
}

// --- FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS ----------------------------------------

const PENDING_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000011");
const PENDING_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000012");
const MEDDLING_CALLOUT: Guid = guid!("53000000-0000-0000-0000-000000000013");
const MEDDLING_FILTER: Guid = guid!("53000000-0000-0000-0000-000000000014");
/// Above the default sublayer (weight 0x8000), where `install` puts the meddling filter: the
/// pending callout is classified first.
const HIGH_SUBLAYER: Guid = guid!("53000000-0000-0000-0000-000000000015");
const PENDING_TARGET: &str = "198.51.100.10:443";
const MEDDLING_TARGET: &str = "198.51.100.20:443";

/// A pended callout's work, handed over to be queued once the other callout has run.
type Deferred = Box<dyn FnOnce(&mut PassiveLevel<'_>) + Send>;

/// What a callout saw in one of its calls.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observation {
    reauthorization: bool,
    filter_id: u64,
    /// The request's previous modifiers, newest first, if it acquired the request.
    modifiers: Option<Vec<u64>>,
}

/// Pends the first classification of a connection; its work (handed to `relay`, so
/// [`Meddler`] queues it after its own classification and the order is fixed) acquires the
/// request, sends it to `PENDING_TARGET`, applies it with or without the flag, and completes
/// with a permit. A reauthorization is let through, after reading the request's history.
struct Pender {
    flagged: bool,
    relay: Arc<Mutex<Option<Deferred>>>,
    seen: Arc<Mutex<Vec<Observation>>>,
}

impl Callout<layer::AleConnectRedirectV4> for Pender {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let filter_id = c.filter.id();
        if c.is_reauthorization() {
            let request = c
                .connect_request(irql)
                .expect("the write right, first sublayer");
            let modifiers = request.previous_modifiers().collect();
            request.discard(irql);
            self.seen.lock().unwrap().push(Observation {
                reauthorization: true,
                filter_id,
                modifiers: Some(modifiers),
            });
            let _ = c.out.permit();
            return;
        }
        self.seen.lock().unwrap().push(Observation {
            reauthorization: false,
            filter_id,
            modifiers: None,
        });
        let mut pended = c.pend_redirect().expect("pends the first classification");
        let (flagged, seen) = (self.flagged, Arc::clone(&self.seen));
        let work: Deferred = Box::new(move |passive| {
            let mut request = pended
                .connect_request(passive)
                .expect("acquires while pended");
            let modifiers = request.previous_modifiers().collect();
            request
                .set_remote(PENDING_TARGET.parse().unwrap())
                .expect("an IPv4 address");
            if flagged {
                request.apply_reauthorize_if_modified_by_others(passive);
            } else {
                request.apply(passive);
            }
            seen.lock().unwrap().push(Observation {
                reauthorization: false,
                filter_id,
                modifiers: Some(modifiers),
            });
            pended.complete(passive, FinalAction::Permit);
        });
        *self.relay.lock().unwrap() = Some(work);
    }
}

/// Another callout driver, in a lower sublayer: classified after the pend, in the same
/// classification. With `changes`, it redirects the first classification of a connection to
/// `MEDDLING_TARGET` with the raw functions (the pend took the write right, which the safe
/// API requires and the raw functions do not check), applying with `apply_flags`. Then it
/// queues the pended callout's work.
struct Meddler {
    changes: bool,
    apply_flags: u32,
    relay: Arc<Mutex<Option<Deferred>>>,
    queue: WorkQueue,
    seen: Mutex<Vec<Observation>>,
}

impl Callout<layer::AleConnectRedirectV4> for Meddler {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        self.seen.lock().unwrap().push(Observation {
            reauthorization: c.is_reauthorization(),
            filter_id: c.filter.id(),
            modifiers: None,
        });
        if self.changes && !c.is_reauthorization() {
            let (handle, data) = raw_redirect::connect_request(c);
            // SAFETY: the writable copy the engine just handed out.
            let request = unsafe { &mut *data };
            request.remoteAddressAndPort =
                wfp_rs::redirect::storage_from_socket_address(MEDDLING_TARGET.parse().unwrap());
            // SAFETY: the copy acquired above, applied once, then the handle released once.
            unsafe { sys::FwpsApplyModifiedLayerData0(handle, data.cast(), self.apply_flags) };
            // SAFETY: acquired above, applied, released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        }
        if let Some(work) = self.relay.lock().unwrap().take() {
            assert!(
                self.queue.queue(irql, work).is_ok(),
                "queues the pended work"
            );
        }
        let _ = c.out.permit();
    }
}

/// What one connection through a [`Pender`] and a [`Meddler`] shows.
struct Crossing {
    outcome: wfp_rs_sim::ConnectOutcome,
    pender: Vec<Observation>,
    meddler: Vec<Observation>,
}

/// Connects once through a [`Pender`] (in a sublayer above the default one) and a [`Meddler`]
/// (in the default sublayer), then removes both and unloads.
fn cross(flagged: bool, changes: bool) -> Crossing {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("reauthorize-if-modified", host::DriverEntry)
        .unwrap();
    let relay: Arc<Mutex<Option<Deferred>>> = Arc::default();
    let pender_seen: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let pender_key = CalloutKey::<layer::AleConnectRedirectV4>::new(PENDING_CALLOUT);
    let pender = driver
        .run_in_driver(&machine, |irql, d| {
            let callout = Pender {
                flagged,
                relay: Arc::clone(&relay),
                seen: Arc::clone(&pender_seen),
            };
            let registration = CalloutRegistration::register(irql, d, pender_key, callout)
                .unwrap_or_else(|e| panic!("registers: {}", e.status));
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).expect("opens");
            engine
                .add_sublayer(
                    irql,
                    &Sublayer::new(HIGH_SUBLAYER).name("high").weight(0x9000),
                )
                .expect("adds the sublayer");
            engine
                .add_callout(irql, &CalloutEntry::new(pender_key).name("pender"))
                .expect("adds the callout entry");
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::AleConnectRedirectV4>::new(PENDING_FILTER)
                        .name("pender")
                        .sublayer(HIGH_SUBLAYER)
                        .action(FilterAction::CalloutTerminating(pender_key)),
                )
                .expect("adds the filter");
            Installed {
                registration,
                engine,
            }
        })
        .expect("an SDK driver");
    let meddler = install(
        &machine,
        &driver,
        CalloutKey::new(MEDDLING_CALLOUT),
        MEDDLING_FILTER,
        |d| Meddler {
            changes,
            apply_flags: 0,
            relay: Arc::clone(&relay),
            queue: d.work_queue(),
            seen: Mutex::new(Vec::new()),
        },
    );
    let outcome = machine.connect(&app_connection(), AleIrql::Passive);
    let meddler_seen = meddler.callout().seen.lock().unwrap().clone();
    pender.remove(&machine, &driver);
    meddler.remove(&machine, &driver);
    // What the callouts recorded was allocated in the driver (pool): copied out, then freed
    // there before the unload checks for leaks.
    let pender_copy = pender_seen.lock().unwrap().clone();
    driver.run_in_driver(&machine, |_, _| drop(pender_seen));
    machine.unload_driver(driver).unwrap();
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
    Crossing {
        outcome,
        pender: pender_copy,
        meddler: meddler_seen,
    }
}

/// The names of the layers a connection crossed, in order.
fn layer_names(outcome: &wfp_rs_sim::ConnectOutcome) -> Vec<&'static str> {
    outcome.layers.iter().map(|(name, _)| *name).collect()
}

#[test]
fn a_flagged_pended_redirect_modified_by_another_filter_is_reauthorized() {
    let crossing = cross(true, true);
    let outcome = &crossing.outcome;
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    let [first, pended, reauthorized] = &crossing.pender[..] else {
        panic!(
            "classified, pended work, reauthorized: {:?}",
            crossing.pender
        );
    };
    let (pender_filter, meddler_filter) = (first.filter_id, crossing.meddler[0].filter_id);
    assert_ne!(pender_filter, meddler_filter);
    assert_eq!(
        *pended,
        Observation {
            reauthorization: false,
            filter_id: pender_filter,
            modifiers: Some(vec![meddler_filter]),
        },
        "the work item acquires after the other filter's change"
    );
    assert_eq!(
        *reauthorized,
        Observation {
            reauthorization: true,
            filter_id: pender_filter,
            modifiers: Some(vec![pender_filter, meddler_filter]),
        },
        "the reauthorization sees both changes, newest first"
    );
    assert_eq!(
        crossing
            .meddler
            .iter()
            .map(|o| o.reauthorization)
            .collect::<Vec<_>>(),
        [false, true],
        "the other callout is classified again too"
    );
    assert_eq!(
        layer_names(outcome),
        [
            "ALE_BIND_REDIRECT_V4",
            "ALE_RESOURCE_ASSIGNMENT_V4",
            "ALE_CONNECT_REDIRECT_V4",
            "ALE_CONNECT_REDIRECT_V4",
            "ALE_AUTH_CONNECT_V4",
            "OUTBOUND_TRANSPORT_V4",
            "ALE_FLOW_ESTABLISHED_V4",
        ]
    );
    // The reauthorization's decision is the classification's (the last soft permit, the
    // meddling filter's), not the completion's (which would keep the pending filter).
    assert_eq!(outcome.layers[3].1.filter_id, Some(meddler_filter));
    assert_eq!(outcome.remote, PENDING_TARGET.parse().unwrap());
}

#[test]
fn without_the_flag_or_without_another_change_the_completion_decides() {
    for (flagged, changes) in [(false, true), (true, false), (false, false)] {
        let crossing = cross(flagged, changes);
        let outcome = &crossing.outcome;
        let case = format!("flagged {flagged}, another change {changes}");
        assert!(outcome.pended, "{case}");
        assert_eq!(outcome.decision.action, Action::Permit, "{case}");
        assert_eq!(crossing.pender.len(), 2, "{case}: {:?}", crossing.pender);
        let other_changes: Vec<u64> = if changes {
            vec![crossing.meddler[0].filter_id]
        } else {
            vec![]
        };
        assert_eq!(
            crossing.pender[1].modifiers,
            Some(other_changes),
            "{case}: the work item's copy"
        );
        assert!(
            crossing.pender.iter().all(|o| !o.reauthorization),
            "{case}: {:?}",
            crossing.pender
        );
        assert_eq!(crossing.meddler.len(), 1, "{case}: {:?}", crossing.meddler);
        let pender_filter = crossing.pender[0].filter_id;
        assert_eq!(
            layer_names(outcome)[2..4],
            ["ALE_CONNECT_REDIRECT_V4"; 2],
            "{case}"
        );
        assert_eq!(
            outcome.layers[3].1.filter_id,
            Some(pender_filter),
            "{case}: the completion's classify-out decides"
        );
        assert_eq!(outcome.remote, PENDING_TARGET.parse().unwrap(), "{case}");
    }
}

bugcheck_test! {
    /// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` on an inline apply, where the
    /// documentation says flags must be 0 (results indeterminate).
    fn the_reauthorize_flag_on_an_inline_apply_stops() expects WFP_INVALID_OPERATION(0x8000_0023) {
        let machine = Machine::new();
        let driver = machine.load_driver("inline-flag", host::DriverEntry).unwrap();
        let _meddler = install(
            &machine,
            &driver,
            CalloutKey::new(MEDDLING_CALLOUT),
            MEDDLING_FILTER,
            |d| Meddler {
                changes: true,
                apply_flags: sys::FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS,
                relay: Arc::default(),
                queue: d.work_queue(),
                seen: Mutex::new(Vec::new()),
            },
        );
        machine.connect(&app_connection(), AleIrql::Dispatch);
    }
}

/// A careless author's ways around "apply every copy" in safe code: leaking the writable
/// request (`mem::forget`, or a `Box::leak` in a helper) skips its drop, which would have
/// applied it. The simulator stops where Windows' classification would be left broken.
struct ForgetsTheCopy {
    queue: WorkQueue,
    pended: bool,
}

impl Callout<layer::AleConnectRedirectV4> for ForgetsTheCopy {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        if !self.pended {
            if let Ok(request) = c.connect_request(irql) {
                core::mem::forget(request);
            }
            let _ = c.out.permit();
            return;
        }
        let Ok(mut pended) = c.pend_redirect() else {
            let _ = c.out.permit();
            return;
        };
        drop(self.queue.queue(irql, move |passive| {
            if let Ok(request) = pended.connect_request(passive) {
                // Kept "for later" in a helper that leaks it: the borrow of the pend ends.
                let _kept: &mut _ = Box::leak(Box::new(request));
            }
            pended.complete(passive, FinalAction::Permit);
        }));
    }
}

fn forget_the_copy(pended: bool) {
    let setup = setup(Machine::with_worker_threads(2), |_, d| ForgetsTheCopy {
        queue: d.work_queue(),
        pended,
    });
    setup.machine.connect(&app_connection(), AleIrql::Dispatch);
}

bugcheck_test! {
    /// `mem::forget` of the copy in classifyFn: it returns with the copy never applied.
    fn forgetting_the_copy_in_classify_stops() expects WFP_INVALID_OPERATION(0x8000_0009) {
        forget_the_copy(false);
    }
}

bugcheck_test! {
    /// A pended copy leaked from the work item, then the pend completed.
    fn leaking_a_pended_copy_then_completing_stops() expects WFP_INVALID_OPERATION(0x8000_0022) {
        forget_the_copy(true);
    }
}
