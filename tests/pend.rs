//! Pending, completing and reauthorizing, in the simulator: the pattern a callout needs when it
//! must ask someone (user mode) before it can decide.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer;
use wfp_rs::layer::value::{IpProtocol, ReauthorizeReasons};
use wfp_rs::metadata::Direction;
use wfp_rs::pend::{ConnectionKey, PendError, TableFull, VerdictTable};
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{AleIrql, Connection, LoadedDriver, Machine, WaitSpin};
use wfp_rs_tests::install::{Installed, install};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: Guid = guid!("50000000-0000-0000-0000-000000000001");
const FILTER: Guid = guid!("50000000-0000-0000-0000-000000000002");

/// The policy the "service" applies: even remote ports are blocked.
fn policy(port: u16) -> bool {
    port % 2 == 1
}

/// How the asking callout behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Pend, decide in a work item, record, complete; answer the reauthorization from the record.
    Ask,
    /// Pend, and drop the pended classification without recording anything.
    DropThePend,
    /// Also try to pend during the reauthorization, and record what the engine said.
    PendTwice,
}

struct Shared {
    verdicts: VerdictTable<bool, 1024>,
    pended: AtomicU32,
    reauthorized: AtomicU32,
    refused: std::sync::Mutex<Vec<PendError>>,
    /// `reauthorization_reason()` as each classification saw it.
    reasons: std::sync::Mutex<Vec<Option<ReauthorizeReasons>>>,
}

struct Asker {
    mode: Mode,
    queue: WorkQueue,
    shared: Arc<Shared>,
}

impl Callout<layer::AleAuthConnectV4> for Asker {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let Some(key) = ConnectionKey::of(c) else {
            c.out.block();
            return;
        };
        // The test's records: harness memory, not the driver's.
        let reason = c.reauthorization_reason();
        wfp_rs_sim::as_harness(|| self.shared.reasons.lock().unwrap().push(reason));
        if c.is_reauthorization() {
            self.shared.reauthorized.fetch_add(1, Ordering::SeqCst);
            if self.mode == Mode::PendTwice {
                let error = c.pend().expect_err("pending a reauthorization must fail");
                wfp_rs_sim::as_harness(|| self.shared.refused.lock().unwrap().push(error));
            }
            match self.shared.verdicts.take(irql, &key) {
                Some(true) => {
                    let _ = c.out.permit();
                }
                // No record (or a block): the default is to block.
                _ => {
                    c.out.block();
                }
            }
            return;
        }
        let pended = match c.pend() {
            Ok(pended) => pended,
            Err(_) => {
                c.out.block();
                return;
            }
        };
        self.shared.pended.fetch_add(1, Ordering::SeqCst);
        if self.mode == Mode::DropThePend {
            drop(pended);
            return;
        }
        let shared = Arc::clone(&self.shared);
        let port = key.remote.1;
        let queued = self.queue.queue(irql, move |passive| {
            // At PASSIVE_LEVEL: this is where the service would be asked.
            shared.verdicts.record(&mut *passive, key, policy(port));
            pended.complete(passive);
        });
        // If it could not be queued, the closure comes back and dropping it completes the pend.
        drop(queued);
    }
}

struct Setup {
    machine: Machine,
    driver: LoadedDriver,
    installed: Option<Installed<layer::AleAuthConnectV4, Asker>>,
    shared: Arc<Shared>,
}

fn setup(mode: Mode) -> Setup {
    let machine = Machine::with_worker_threads(3);
    let driver = machine.load_driver("asker", host::DriverEntry).unwrap();
    let shared = Arc::new(Shared {
        verdicts: VerdictTable::new(),
        pended: AtomicU32::new(0),
        reauthorized: AtomicU32::new(0),
        refused: std::sync::Mutex::new(Vec::new()),
        reasons: std::sync::Mutex::new(Vec::new()),
    });
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |d| {
        Asker {
            mode,
            queue: d.work_queue(),
            shared: Arc::clone(&shared),
        }
    });
    Setup {
        machine,
        driver,
        installed: Some(installed),
        shared,
    }
}

impl Setup {
    fn teardown(mut self) {
        self.installed
            .take()
            .unwrap()
            .remove(&self.machine, &self.driver);
        let driver = self.driver;
        self.machine.unload_driver(driver).unwrap();
        assert!(
            self.machine.pool_blocks().is_empty(),
            "left: {:?}",
            self.machine.pool_blocks()
        );
    }
}

fn connection(port: u16, local_port: u16) -> Connection {
    Connection {
        pid: 1000 + u64::from(local_port),
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: format!("10.0.0.1:{local_port}").parse().unwrap(),
        remote: format!("192.0.2.1:{port}").parse().unwrap(),
        direction: Direction::Outbound,
    }
}

#[test]
fn a_pended_connection_is_reauthorized_from_the_recorded_verdict() {
    let setup = setup(Mode::Ask);
    for (port, expected) in [(443u16, Action::Permit), (8080, Action::Block)] {
        let outcome = setup
            .machine
            .connect(&connection(port, 40000 + port), AleIrql::Dispatch);
        assert!(outcome.pended);
        assert_eq!(outcome.decision.action, expected, "port {port}");
        let connect_layers: Vec<_> = outcome
            .layers
            .iter()
            .filter(|(name, _)| *name == "ALE_AUTH_CONNECT_V4")
            .collect();
        assert_eq!(
            connect_layers.len(),
            2,
            "the pended classification and its reauthorization"
        );
        assert!(
            connect_layers[0].1.absorbed,
            "a pended classification is absorbed"
        );
        assert_eq!(connect_layers[0].1.action, Action::Block);
        assert_eq!(outcome.flow_handle.is_some(), expected == Action::Permit);
    }
    assert_eq!(setup.shared.pended.load(Ordering::SeqCst), 2);
    assert_eq!(setup.shared.reauthorized.load(Ordering::SeqCst), 2);
    // The first classification is no reauthorization; the second follows the completion.
    let completion = Some(ReauthorizeReasons::CLASSIFY_COMPLETION);
    assert_eq!(
        *setup.shared.reasons.lock().unwrap(),
        [None, completion, None, completion]
    );
    setup.machine.at_dispatch(|irql| {
        assert!(
            setup.shared.verdicts.is_empty(irql),
            "every verdict was taken"
        )
    });
    setup.teardown();
}

#[test]
fn pending_a_reauthorization_is_refused() {
    let setup = setup(Mode::PendTwice);
    let outcome = setup
        .machine
        .connect(&connection(443, 40001), AleIrql::Passive);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert_eq!(
        *setup.shared.refused.lock().unwrap(),
        [PendError::Refused(Status::FWP_CANNOT_PEND)]
    );
    setup.teardown();
}

#[test]
fn a_dropped_pend_is_completed_and_the_default_applies() {
    let setup = setup(Mode::DropThePend);
    let outcome = setup
        .machine
        .connect(&connection(443, 40002), AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(
        outcome.decision.action,
        Action::Block,
        "no verdict was recorded: the default blocks"
    );
    assert!(
        setup
            .machine
            .debug_output()
            .concat()
            .contains("dropped without being completed")
    );
    setup.teardown();
}

#[test]
fn many_concurrent_connections_each_get_exactly_one_decision() {
    many_concurrent_connections(WaitSpin::Fixed(std::time::Duration::ZERO));
}

/// The same with `Machine::connect` spinning before it parks (`Machine::set_wait_spin`), for a
/// fixed time or as long as the adaptive default learns: only the host's scheduling changes,
/// not one decision.
#[test]
fn many_concurrent_connections_each_get_exactly_one_decision_with_spinning_waits() {
    many_concurrent_connections(WaitSpin::Fixed(std::time::Duration::from_micros(20)));
    many_concurrent_connections(WaitSpin::Adaptive);
}

fn many_concurrent_connections(wait_spin: WaitSpin) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 60;
    let seed: u64 = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0001);
    let setup = setup(Mode::Ask);
    setup.machine.set_wait_spin(wait_spin);
    let wrong = AtomicU32::new(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (machine, wrong) = (&setup.machine, &wrong);
                scope.spawn(move || {
                    let mut state = seed ^ (thread.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for n in 0..PER_THREAD {
                        // xorshift64: deterministic per seed.
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let port = (state % 60_000) as u16 + 1;
                        let irql = if state & (1 << 40) != 0 {
                            AleIrql::Dispatch
                        } else {
                            AleIrql::Passive
                        };
                        let local = (20_000 + thread * PER_THREAD + n) as u16;
                        let outcome = machine.connect(&connection(port, local), irql);
                        let expected = if policy(port) {
                            Action::Permit
                        } else {
                            Action::Block
                        };
                        if outcome.decision.action != expected || !outcome.pended {
                            wrong.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
    }));
    assert!(
        result.is_ok(),
        "a connection thread panicked (seed {seed:#x})"
    );
    assert_eq!(
        wrong.load(Ordering::SeqCst),
        0,
        "connections decided against the policy (seed {seed:#x})"
    );
    let total = (THREADS * PER_THREAD) as u32;
    assert_eq!(
        setup.shared.pended.load(Ordering::SeqCst),
        total,
        "seed {seed:#x}"
    );
    assert_eq!(
        setup.shared.reauthorized.load(Ordering::SeqCst),
        total,
        "exactly one reauthorization each (seed {seed:#x})"
    );
    setup.teardown();
}

#[test]
fn a_classification_without_a_completion_handle_cannot_pend() {
    // At other layers `pend` does not compile (tests/ui/pend_at_a_layer_without_completion.rs);
    // here the layer allows it but this classification carries no completion handle.
    struct TryPend(std::sync::Mutex<Option<PendError>>);
    impl Callout<layer::AleAuthConnectV4> for TryPend {
        fn classify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            *self.0.lock().unwrap() = c.pend().err();
            let _ = c.out.permit();
        }
    }
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        TryPend(std::sync::Mutex::new(None))
    });
    let request = wfp_rs_sim::ClassifyRequest::<layer::AleAuthConnectV4>::new();
    let decision = machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
    assert_eq!(decision.action, Action::Permit);
    assert_eq!(decision.pending, None);
    assert_eq!(
        *installed.callout().0.lock().unwrap(),
        Some(PendError::NotPendable)
    );
    assert_eq!(
        Status::from(PendError::NotPendable),
        Status::FWP_CANNOT_PEND
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn an_inbound_pend_at_recv_accept_is_not_reauthorized() {
    struct PendAndComplete;
    impl Callout<layer::AleAuthRecvAcceptV4> for PendAndComplete {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthRecvAcceptV4>,
        ) {
            let pended = c.pend().expect("RECV_ACCEPT can pend");
            pended.complete(irql);
        }
    }
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        PendAndComplete
    });
    let mut inbound = connection(50000, 22);
    inbound.direction = Direction::Inbound;
    let outcome = machine.connect(&inbound, AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(
        outcome.decision.action,
        Action::Block,
        "without reinjection the attempt is dropped"
    );
    assert_eq!(
        outcome
            .layers
            .iter()
            .filter(|(n, _)| *n == "ALE_AUTH_RECV_ACCEPT_V4")
            .count(),
        1,
        "no reauthorization"
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

// --- what the simulator stops on ---------------------------------------------------------------

/// A callout that pends through the raw ABI and keeps the context, to misuse it.
struct RawPender(std::sync::Mutex<Option<usize>>);

impl Callout<layer::AleAuthConnectV4> for RawPender {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let handle = c.metadata.completion_handle().expect("pendable");
        let mut context = core::ptr::null_mut();
        // SAFETY: the completion handle of the classification in progress.
        let status = unsafe { sys::FwpsPendOperation0(handle, &mut context) };
        assert_eq!(status, 0);
        *self.0.lock().unwrap() = Some(context as usize);
        c.out.block();
    }
}

fn raw_pend(
    machine: &Machine,
    driver: &LoadedDriver,
) -> (usize, Installed<layer::AleAuthConnectV4, RawPender>) {
    let installed = install(machine, driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        RawPender(std::sync::Mutex::new(None))
    });
    let request = wfp_rs_sim::ClassifyRequest::<layer::AleAuthConnectV4>::new().pendable();
    let decision = machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
    assert!(decision.pending.is_some());
    let context = installed.callout().0.lock().unwrap().expect("pended");
    (context, installed)
}

bugcheck_test! {
    fn completing_a_pend_twice_stops() expects WFP_INVALID_OPERATION (0x8000_0001) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (context, _installed) = raw_pend(&machine, &driver);
        machine.at_dispatch(|_| {
            // SAFETY: a context from FwpsPendOperation0, completed once.
            unsafe { sys::FwpsCompleteOperation0(context as sys::HANDLE, core::ptr::null_mut()) };
            // SAFETY: deliberately completed a second time: the rule under test.
            unsafe { sys::FwpsCompleteOperation0(context as sys::HANDLE, core::ptr::null_mut()) };
        });
    }
}

bugcheck_test! {
    fn unloading_with_a_pend_outstanding_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let (_context, installed) = raw_pend(&machine, &driver);
        installed.remove(&machine, &driver);
        let _ = machine.unload_driver(driver);
    }
}

/// A callout that keeps the completion handle of the first classification it sees and pends the
/// next one with it: a driver that stored the raw handle instead of pending at once.
struct KeepsHandle(std::sync::Mutex<Option<usize>>);

impl Callout<layer::AleAuthConnectV4> for KeepsHandle {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let live = c.metadata.completion_handle().expect("pendable") as usize;
        let kept = *self.0.lock().unwrap().get_or_insert(live);
        if kept != live {
            let mut context = core::ptr::null_mut();
            // SAFETY: deliberately the handle of a classification that returned: the rule under
            // test. The context is writable.
            let _ = unsafe { sys::FwpsPendOperation0(kept as sys::HANDLE, &mut context) };
        }
        let _ = c.out.permit();
    }
}

/// Two classifications; the second pends with the first one's (retired) completion handle.
fn pend_with_a_kept_completion_handle() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let _installed = install(&machine, &driver, CalloutKey::new(CALLOUT), FILTER, |_| {
        KeepsHandle(std::sync::Mutex::new(None))
    });
    let request = wfp_rs_sim::ClassifyRequest::<layer::AleAuthConnectV4>::new().pendable();
    let first = machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
    assert!(first.pending.is_none());
    machine.classify(wfp_rs::irql::Irql::DISPATCH, &request);
}

/// A null completion handle: a driver that did not check `FWPS_METADATA_FIELD_COMPLETION_HANDLE`.
fn pend_with_a_completion_handle_never_handed_out() {
    let machine = Machine::new();
    machine.at_dispatch(|_| {
        let mut context = core::ptr::null_mut();
        // SAFETY: deliberately no completion handle: the rule under test.
        let _ = unsafe { sys::FwpsPendOperation0(core::ptr::null_mut(), &mut context) };
    });
}

bugcheck_test! {
    fn pending_with_a_kept_completion_handle_stops() expects WFP_INVALID_OPERATION (0x8000_0004) {
        pend_with_a_kept_completion_handle();
    }
}

bugcheck_test! {
    fn pending_with_a_completion_handle_never_handed_out_stops() expects WFP_INVALID_OPERATION (0x8000_0004) {
        pend_with_a_completion_handle_never_handed_out();
    }
}

/// Runs `scenario` in a child process; it must stop for a stale completion handle, parameter 3
/// saying whether the engine retired the value (1) or never handed it out (0).
fn expect_stale_completion_handle(test: &str, retired: usize, scenario: fn()) {
    let outcome = wfp_rs_sim::run_isolated(test, scenario);
    let report = outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::WFP_INVALID_OPERATION);
    assert_eq!(
        report.params[0], 0x8000_0004,
        "parameter 1\n{}",
        outcome.stderr
    );
    assert_eq!(report.params[2], retired, "parameter 3\n{}", outcome.stderr);
}

#[test]
fn a_kept_completion_handle_is_reported_as_retired() {
    expect_stale_completion_handle(
        "a_kept_completion_handle_is_reported_as_retired",
        1,
        pend_with_a_kept_completion_handle,
    );
}

#[test]
fn a_null_completion_handle_is_reported_as_never_handed_out() {
    expect_stale_completion_handle(
        "a_null_completion_handle_is_reported_as_never_handed_out",
        0,
        pend_with_a_completion_handle_never_handed_out,
    );
}

#[test]
fn a_completed_raw_pend_unloads_clean() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (context, installed) = raw_pend(&machine, &driver);
    assert_eq!(machine.pending_classifications(), 1);
    machine.at_dispatch(|_| {
        // SAFETY: the context from FwpsPendOperation0, completed once.
        unsafe { sys::FwpsCompleteOperation0(context as sys::HANDLE, core::ptr::null_mut()) };
    });
    assert_eq!(machine.pending_classifications(), 0);
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn the_verdict_table_replaces_by_key_and_evicts_the_oldest_when_full() {
    let key = |port: u16| ConnectionKey {
        pid: 7,
        app: 0xA9,
        protocol: 6,
        local: ("10.0.0.1".parse().unwrap(), 40_000 + port),
        remote: ("192.0.2.1".parse().unwrap(), 443),
    };
    let machine = Machine::new();
    machine.at_dispatch(|irql| {
        let table: VerdictTable<u16, 3> = VerdictTable::new();
        assert_eq!(table.record(&mut *irql, key(1), 10), None);
        assert_eq!(table.record(&mut *irql, key(2), 20), None);
        assert_eq!(
            table.record(&mut *irql, key(1), 11),
            None,
            "same key: replaced"
        );
        assert_eq!(table.record(&mut *irql, key(3), 30), None);
        // Full: key 2 is now the oldest (key 1 was refreshed by its replacement).
        assert_eq!(table.record(&mut *irql, key(4), 40), Some((key(2), 20)));
        assert_eq!(table.take(&mut *irql, &key(1)), Some(11));
        assert_eq!(table.take(&mut *irql, &key(2)), None);
        // A freed slot is reused without evicting.
        assert_eq!(table.record(&mut *irql, key(5), 50), None);
        for (k, v) in [(3, 30), (4, 40), (5, 50)] {
            assert_eq!(table.take(&mut *irql, &key(k)), Some(v));
        }
        assert!(table.is_empty(&mut *irql));
    });
}

#[test]
fn the_verdict_table_refuses_instead_of_evicting_with_try_record() {
    let key = |port: u16| ConnectionKey {
        pid: 7,
        app: 0xA9,
        protocol: 6,
        local: ("10.0.0.1".parse().unwrap(), 40_000 + port),
        remote: ("192.0.2.1".parse().unwrap(), 443),
    };
    let machine = Machine::new();
    machine.at_dispatch(|irql| {
        let table: VerdictTable<u16, 3> = VerdictTable::new();
        assert_eq!(table.capacity(), 3);
        assert_eq!(table.try_record(&mut *irql, key(1), 10), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(2), 20), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(3), 30), Ok(None));
        assert_eq!(
            table.try_record(&mut *irql, key(2), 21),
            Ok(Some(20)),
            "same key: replaced, even when full"
        );
        assert_eq!(table.try_record(&mut *irql, key(4), 40), Err(TableFull));
        assert_eq!(table.len(&mut *irql), 3, "nothing evicted");
        for (k, v) in [(1, 10), (2, 21), (3, 30)] {
            assert_eq!(table.take(&mut *irql, &key(k)), Some(v));
        }
        assert!(table.is_empty(&mut *irql));
        // Slots freed from the top and from the middle are found again.
        assert_eq!(table.try_record(&mut *irql, key(5), 50), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(6), 60), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(7), 70), Ok(None));
        assert_eq!(table.take(&mut *irql, &key(6)), Some(60));
        assert_eq!(table.take(&mut *irql, &key(7)), Some(70));
        assert_eq!(table.try_record(&mut *irql, key(8), 80), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(9), 90), Ok(None));
        assert_eq!(table.try_record(&mut *irql, key(10), 100), Err(TableFull));
        for (k, v) in [(5, 50), (8, 80), (9, 90)] {
            assert_eq!(table.take(&mut *irql, &key(k)), Some(v));
        }
        assert_eq!(table.take(&mut *irql, &key(5)), None);
        assert!(table.is_empty(&mut *irql));
    });
}

#[test]
fn a_verdict_table_built_in_pool_is_empty_usable_and_freed() {
    let key = |port: u16| ConnectionKey {
        pid: 9,
        app: 0xB1,
        protocol: 17,
        local: ("10.0.0.1".parse().unwrap(), port),
        remote: ("192.0.2.9".parse().unwrap(), 53),
    };
    let tag = wfp_rs::pool::PoolTag::new(b"VtTs");
    let machine = Machine::new();
    machine.at_dispatch(|irql| {
        machine.fail_allocations(0, 1);
        assert!(
            VerdictTable::<u16, 4096>::try_new_in_pool(tag, irql).is_none(),
            "no pool: None"
        );
        let table = VerdictTable::<u16, 4096>::try_new_in_pool(tag, irql).expect("pool");
        let blocks = machine.pool_blocks();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].tag, tag);
        assert_eq!(
            blocks[0].size,
            core::mem::size_of::<VerdictTable<u16, 4096>>()
        );
        assert!(table.is_empty(&mut *irql));
        for port in 0..4096 {
            assert_eq!(table.try_record(&mut *irql, key(port), port), Ok(None));
        }
        assert_eq!(table.try_record(&mut *irql, key(5000), 1), Err(TableFull));
        assert_eq!(table.take(&mut *irql, &key(4095)), Some(4095));
        assert_eq!(table.len(&mut *irql), 4095);
        drop(table);
    });
    assert_eq!(machine.pool_blocks(), [], "freed with its box");
}
