//! Pending by classify handle (`FwpsAcquireClassifyHandle0` + `FwpsPendClassify0`), in the
//! simulator: ALE_CONNECT_REDIRECT and ALE_ENDPOINT_CLOSURE, where the completion carries the
//! final decision or asks for a reauthorization.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{self, Layer};
use wfp_rs::metadata::Direction;
use wfp_rs::pend::{FinalAction, PendError};
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{AleIrql, Connection, LoadedDriver, Machine};
use wfp_rs_tests::install::{Installed, install};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: Guid = guid!("51000000-0000-0000-0000-000000000001");
const FILTER: Guid = guid!("51000000-0000-0000-0000-000000000002");

/// How the redirect callout finishes a pend.
#[derive(Clone, Copy, PartialEq)]
enum Finish {
    /// From a work item: permit odd remote ports, block even ones.
    Decide,
    /// From a work item, without a decision: the stack classifies again.
    Reauthorize,
    /// Drop the pend in classify.
    Drop,
}

struct Redirector {
    finish: Finish,
    queue: WorkQueue,
    calls: AtomicU32,
    refused: Mutex<Vec<PendError>>,
}

impl<L: wfp_rs::pend::PendableByClassifyHandle> Callout<L> for Redirector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let remote_port = c
            .values
            .raw_value(remote_port_index::<L>())
            .ok()
            // SAFETY: the remote port field is a UINT16 at these layers.
            .map(|v| unsafe { v.u.uint16 })
            .unwrap_or(0);
        let pended = match c.pend_decision() {
            Ok(pended) => pended,
            Err(error) => {
                self.refused.lock().unwrap().push(error);
                let _ = c.out.permit();
                return;
            }
        };
        match self.finish {
            Finish::Drop => drop(pended),
            Finish::Decide => {
                let queued = self.queue.queue(irql, move |passive| {
                    let action = if remote_port % 2 == 1 {
                        FinalAction::Permit
                    } else {
                        FinalAction::Block
                    };
                    pended.complete(passive, action);
                });
                drop(queued);
            }
            Finish::Reauthorize => {
                let queued = self
                    .queue
                    .queue(irql, move |passive| pended.reauthorize(passive));
                drop(queued);
            }
        }
    }
}

fn remote_port_index<L: Layer>() -> u32 {
    L::FIELDS
        .iter()
        .find(|f| f.name == "IpRemotePort")
        .expect("the layer has a remote port")
        .index
}

struct Setup<L: wfp_rs::pend::PendableByClassifyHandle> {
    machine: Machine,
    driver: LoadedDriver,
    installed: Installed<L, Redirector>,
}

fn setup<L: wfp_rs::pend::PendableByClassifyHandle>(finish: Finish) -> Setup<L> {
    let machine = Machine::with_worker_threads(2);
    let driver = machine
        .load_driver("redirector", host::DriverEntry)
        .unwrap();
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |d| {
        Redirector {
            finish,
            queue: d.work_queue(),
            calls: AtomicU32::new(0),
            refused: Mutex::new(Vec::new()),
        }
    });
    Setup {
        machine,
        driver,
        installed,
    }
}

impl<L: wfp_rs::pend::PendableByClassifyHandle> Setup<L> {
    fn calls(&self) -> u32 {
        self.installed.callout().calls.load(Ordering::SeqCst)
    }

    fn refused(&self) -> Vec<PendError> {
        self.installed.callout().refused.lock().unwrap().clone()
    }

    fn teardown(self) {
        let Setup {
            machine,
            driver,
            installed,
        } = self;
        installed.remove(&machine, &driver);
        machine.unload_driver(driver).unwrap();
        assert!(
            machine.pool_blocks().is_empty(),
            "left: {:?}",
            machine.pool_blocks()
        );
    }
}

fn connection(remote_port: u16) -> Connection {
    Connection {
        pid: 4242,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: "10.0.0.1:50123".parse().unwrap(),
        remote: format!("192.0.2.7:{remote_port}").parse().unwrap(),
        direction: Direction::Outbound,
    }
}

fn layer_count(outcome: &wfp_rs_sim::ConnectOutcome, name: &str) -> usize {
    outcome.layers.iter().filter(|(n, _)| *n == name).count()
}

#[test]
fn a_completed_decision_at_connect_redirect_is_final() {
    for (port, expected) in [(443u16, Action::Permit), (8080, Action::Block)] {
        let setup = setup::<layer::AleConnectRedirectV4>(Finish::Decide);
        let outcome = setup.machine.connect(&connection(port), AleIrql::Dispatch);
        assert!(outcome.pended, "port {port}");
        assert_eq!(outcome.decision.action, expected, "port {port}");
        // The pended classification and the decision that completed it; no reauthorization.
        assert_eq!(layer_count(&outcome, "ALE_CONNECT_REDIRECT_V4"), 2);
        assert_eq!(setup.calls(), 1, "the callout was asked once");
        let pended = outcome
            .layers
            .iter()
            .find(|(n, _)| *n == "ALE_CONNECT_REDIRECT_V4")
            .unwrap()
            .1;
        assert!(pended.absorbed && pended.action == Action::Block);
        assert_eq!(
            layer_count(&outcome, "ALE_AUTH_CONNECT_V4"),
            usize::from(expected == Action::Permit),
            "a block at the redirect layer stops the connection there"
        );
        setup.teardown();
    }
}

#[test]
fn completing_without_a_decision_reauthorizes_and_pending_again_is_refused() {
    let setup = setup::<layer::AleConnectRedirectV4>(Finish::Reauthorize);
    let began = std::time::Instant::now();
    let outcome = setup.machine.connect(&connection(443), AleIrql::Passive);
    let connect_took = began.elapsed();
    assert!(outcome.pended);
    // The pended round trip is part of the connection's time.
    let round_trip = outcome
        .pend_round_trip
        .expect("a pended connection's round trip");
    assert!(
        round_trip <= connect_took,
        "{round_trip:?} > {connect_took:?}"
    );
    assert_eq!(
        outcome.decision.action,
        Action::Permit,
        "the callout permits when it cannot pend"
    );
    assert_eq!(
        setup.calls(),
        2,
        "the pended classification and the reauthorization"
    );
    assert_eq!(
        setup.refused(),
        [PendError::Refused(Status::FWP_CANNOT_PEND)]
    );
    setup.teardown();
}

#[test]
fn a_dropped_pended_decision_reauthorizes_and_is_reported() {
    let setup = setup::<layer::AleConnectRedirectV4>(Finish::Drop);
    let outcome = setup.machine.connect(&connection(443), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(setup.calls(), 2);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert!(
        setup
            .machine
            .debug_output()
            .concat()
            .contains("pended decision was dropped without being completed")
    );
    setup.teardown();
}

#[test]
fn an_endpoint_closure_is_held_until_its_pend_completes() {
    let setup = setup::<layer::AleEndpointClosureV4>(Finish::Decide);
    let decision = setup.machine.close(&connection(8080));
    assert!(decision.pending.is_some());
    assert_eq!(decision.action, Action::Block);
    assert_eq!(setup.calls(), 1);
    setup.teardown();
}

#[test]
fn ipv6_connect_redirect_pends_too() {
    let setup = setup::<layer::AleConnectRedirectV6>(Finish::Decide);
    let mut v6 = connection(8081);
    v6.local = "[2001:db8::1]:50123".parse().unwrap();
    v6.remote = "[2001:db8::7]:8081".parse().unwrap();
    let outcome = setup.machine.connect(&v6, AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    setup.teardown();
}

// --- what the simulator stops on ---------------------------------------------------------------

/// A callout that pends through the raw ABI and keeps the classify handle, to misuse it.
struct RawPender(Mutex<Option<u64>>);

impl Callout<layer::AleConnectRedirectV4> for RawPender {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let mut handle = 0u64;
        // SAFETY: the classify context of the classification in progress.
        let status = unsafe {
            sys::FwpsAcquireClassifyHandle0(c.raw_classify_context().cast_mut(), 0, &mut handle)
        };
        assert_eq!(status, 0);
        let mut out = sys::FWPS_CLASSIFY_OUT0 {
            actionType: sys::FWP_ACTION_BLOCK,
            outContext: 0,
            filterId: 0,
            rights: 0,
            flags: 0,
            reserved: 0,
        };
        // SAFETY: the handle was just acquired; `out` stands in for the classify-out.
        let status = unsafe { sys::FwpsPendClassify0(handle, c.filter.id(), 0, &mut out) };
        assert_eq!(status, 0);
        *self.0.lock().unwrap() = Some(handle);
        c.out.block();
    }
}

fn raw_pend(
    machine: &Machine,
    driver: &LoadedDriver,
) -> (u64, Installed<layer::AleConnectRedirectV4, RawPender>) {
    let installed = install(machine, driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        RawPender(Mutex::new(None))
    });
    let request = wfp_rs_sim::ClassifyRequest::<layer::AleConnectRedirectV4>::new();
    let decision = machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
    assert!(decision.pending.is_some());
    let handle = installed.callout().0.lock().unwrap().expect("pended");
    (handle, installed)
}

/// A callout that keeps the classify context of the first classification it sees and acquires a
/// classify handle with it in the next one: a driver that stored the raw pointer to pend later.
struct KeepsContext(Mutex<Option<usize>>);

impl Callout<layer::AleConnectRedirectV4> for KeepsContext {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let live = c.raw_classify_context() as usize;
        let kept = *self.0.lock().unwrap().get_or_insert(live);
        if kept != live {
            let mut handle = 0u64;
            // SAFETY: deliberately the context of a classification that returned: the rule
            // under test. The handle is writable.
            let _ = unsafe {
                sys::FwpsAcquireClassifyHandle0(kept as *mut core::ffi::c_void, 0, &mut handle)
            };
        }
        let _ = c.out.permit();
    }
}

/// Two classifications; the second acquires with the first one's (retired) classify context.
fn acquire_with_a_kept_classify_context() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let _installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        KeepsContext(Mutex::new(None))
    });
    let request = wfp_rs_sim::ClassifyRequest::<layer::AleConnectRedirectV4>::new();
    let first = machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
    assert!(first.pending.is_none());
    machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
}

/// A null classify context, as a classification outside the engine would have.
fn acquire_with_a_classify_context_never_handed_out() {
    let machine = Machine::new();
    machine.at_dispatch(|_| {
        let mut handle = 0u64;
        // SAFETY: deliberately no classify context: the rule under test.
        let _ = unsafe { sys::FwpsAcquireClassifyHandle0(core::ptr::null_mut(), 0, &mut handle) };
    });
}

bugcheck_test! {
    fn acquiring_with_a_kept_classify_context_stops() expects WFP_INVALID_OPERATION (0x8000_0005) {
        acquire_with_a_kept_classify_context();
    }
}

bugcheck_test! {
    fn acquiring_with_a_classify_context_never_handed_out_stops() expects WFP_INVALID_OPERATION (0x8000_0005) {
        acquire_with_a_classify_context_never_handed_out();
    }
}

/// A callout that acquires a classify handle and keeps it past its classification, to pend
/// later: a driver that saved the handle instead of pending from within classifyFn.
struct PendsLater;

/// The handle `PendsLater` kept.
static KEPT_HANDLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Callout<layer::AleConnectRedirectV4> for PendsLater {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleConnectRedirectV4>,
    ) {
        let mut handle = 0u64;
        let context = c.raw_classify_context().cast_mut();
        // SAFETY: the live classification's context; the handle is writable.
        let status = unsafe { sys::FwpsAcquireClassifyHandle0(context, 0, &mut handle) };
        assert_eq!(status, 0);
        KEPT_HANDLE.store(handle, std::sync::atomic::Ordering::SeqCst);
        let _ = c.out.permit();
    }
}

bugcheck_test! {
    /// Pending needs the classification's classify-out, which is gone once classifyFn returns;
    /// the handle alone does not make a later pend valid.
    fn pending_with_a_kept_handle_after_the_classification_returned_stops() expects WFP_INVALID_OPERATION (0x8000_0006) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let _installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| PendsLater);
        let request = wfp_rs_sim::ClassifyRequest::<layer::AleConnectRedirectV4>::new().pendable();
        machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
        let handle = KEPT_HANDLE.load(std::sync::atomic::Ordering::SeqCst);
        assert_ne!(handle, 0, "the callout acquired a handle");
        machine.at_dispatch(|_| {
            // SAFETY: zeroed is a valid classify-out (integers only).
            let mut out: sys::FWPS_CLASSIFY_OUT0 = unsafe { core::mem::zeroed() };
            // SAFETY: deliberately pending after the classification returned: the rule under
            // test; `out` is writable.
            let _ = unsafe { sys::FwpsPendClassify0(handle, 0, 0, &mut out) };
        });
    }
}

/// Runs `scenario` in a child process; it must stop for a stale classify context, parameter 3
/// saying whether the engine retired the value (1) or never handed it out (0).
fn expect_stale_classify_context(test: &str, retired: usize, scenario: fn()) {
    let outcome = wfp_rs_sim::run_isolated(test, scenario);
    let report = outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::WFP_INVALID_OPERATION);
    assert_eq!(
        report.params[0], 0x8000_0005,
        "parameter 1\n{}",
        outcome.stderr
    );
    assert_eq!(report.params[2], retired, "parameter 3\n{}", outcome.stderr);
}

#[test]
fn a_kept_classify_context_is_reported_as_retired() {
    expect_stale_classify_context(
        "a_kept_classify_context_is_reported_as_retired",
        1,
        acquire_with_a_kept_classify_context,
    );
}

#[test]
fn a_null_classify_context_is_reported_as_never_handed_out() {
    expect_stale_classify_context(
        "a_null_classify_context_is_reported_as_never_handed_out",
        0,
        acquire_with_a_classify_context_never_handed_out,
    );
}

bugcheck_test! {
    fn completing_a_classify_handle_twice_stops() expects WFP_INVALID_OPERATION (0x8000_0001) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: a pended classify handle, completed once.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, core::ptr::null()) };
            // SAFETY: deliberately completed a second time: the rule under test.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, core::ptr::null()) };
        });
    }
}

bugcheck_test! {
    fn completing_a_classify_handle_as_a_completion_context_stops() expects WFP_INVALID_OPERATION (0x8000_0001) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: deliberately the wrong completion routine for this pend: the rule under test.
            unsafe { sys::FwpsCompleteOperation0(handle as usize as sys::HANDLE, core::ptr::null_mut()) };
        });
    }
}

bugcheck_test! {
    fn pending_with_a_released_classify_handle_stops() expects WFP_INVALID_OPERATION (0x8000_0002) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            let mut out = sys::FWPS_CLASSIFY_OUT0 {
                actionType: sys::FWP_ACTION_CONTINUE,
                outContext: 0,
                filterId: 0,
                rights: 0,
                flags: 0,
                reserved: 0,
            };
            // SAFETY: the pended handle, completed once.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, core::ptr::null()) };
            // SAFETY: completed; released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
            // SAFETY: deliberately pending with the released handle: the rule under test.
            unsafe { sys::FwpsPendClassify0(handle, 0, 0, &mut out) };
        });
    }
}

bugcheck_test! {
    fn releasing_a_classify_handle_while_pended_stops() expects WFP_INVALID_OPERATION (0x8000_0003) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: deliberately released before completing: the rule under test.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        });
    }
}

bugcheck_test! {
    fn releasing_a_classify_handle_twice_stops() expects WFP_INVALID_OPERATION (0x8000_0002) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: a pended classify handle, completed once.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, core::ptr::null()) };
            // SAFETY: completed; released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
            // SAFETY: deliberately released a second time: the rule under test.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        });
    }
}

bugcheck_test! {
    fn unloading_with_a_classify_handle_unreleased_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (handle, installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: a pended classify handle, completed once but never released.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, core::ptr::null()) };
        });
        installed.remove(&machine, &driver);
        let _ = machine.unload_driver(driver);
    }
}

#[test]
fn a_completed_and_released_raw_pend_unloads_clean() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (handle, installed) = raw_pend(&machine, &driver);
    machine.at_dispatch(|_| {
        let out = sys::FWPS_CLASSIFY_OUT0 {
            actionType: sys::FWP_ACTION_PERMIT,
            outContext: 0,
            filterId: 0,
            rights: 0,
            flags: 0,
            reserved: 0,
        };
        // SAFETY: the pended handle, completed once.
        unsafe { sys::FwpsCompleteClassify0(handle, 0, &out) };
        // SAFETY: completed; released once.
        unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
    });
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn a_classify_handle_cannot_pend_at_auth_connect() {
    struct TryRawPend(Mutex<Option<i32>>);
    impl Callout<layer::AleAuthConnectV4> for TryRawPend {
        fn classify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            let mut handle = 0u64;
            let mut out = sys::FWPS_CLASSIFY_OUT0 {
                actionType: sys::FWP_ACTION_CONTINUE,
                outContext: 0,
                filterId: 0,
                rights: sys::FWPS_RIGHT_ACTION_WRITE,
                flags: 0,
                reserved: 0,
            };
            // SAFETY: the classify context of the classification in progress.
            let acquired = unsafe {
                sys::FwpsAcquireClassifyHandle0(c.raw_classify_context().cast_mut(), 0, &mut handle)
            };
            assert_eq!(acquired, 0);
            // SAFETY: the handle was just acquired; `out` stands in for the classify-out.
            let status = unsafe { sys::FwpsPendClassify0(handle, c.filter.id(), 0, &mut out) };
            // SAFETY: acquired, not pended; released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
            *self.0.lock().unwrap() = Some(status);
            let _ = c.out.permit();
        }
    }
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        TryRawPend(Mutex::new(None))
    });
    let outcome = machine.connect(&connection(443), AleIrql::Dispatch);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert!(!outcome.pended);
    assert_eq!(outcome.pend_round_trip, None, "nothing pended");
    assert_eq!(
        *installed.callout().0.lock().unwrap(),
        Some(Status::FWP_CANNOT_PEND.raw())
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}
