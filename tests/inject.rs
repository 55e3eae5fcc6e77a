//! Clone and inject: an inbound connection pended at ALE_AUTH_RECV_ACCEPT completes only when
//! the callout reinjects a clone of its absorbed packet, which crosses the layers again and is
//! recognised by its own callout; a denied clone is freed; leaks and misuse stop the machine.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::inject::{InjectionHandle, InjectionState};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{self, IpVersion};
use wfp_rs::metadata::Direction;
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{AleIrql, Connection, LoadedDriver, Machine};
use wfp_rs_tests::install::install;

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: CalloutKey<layer::AleAuthRecvAcceptV4> =
    CalloutKey::new(guid!("62000000-0000-0000-0000-000000000001"));
const FILTER: Guid = guid!("62000000-0000-0000-0000-000000000002");

/// Pends every new inbound connection, clones its packet, and from a work item completes the
/// pend and reinjects the clone (`allow`) or drops it; permits its own reinjections.
struct AskThenReinject {
    injection: Arc<InjectionHandle>,
    queue: WorkQueue,
    allow: bool,
    /// Classifications of packets this callout did not inject.
    decided: AtomicU32,
    /// Classifications of its own reinjected packets.
    own_reinjections: AtomicU32,
}

impl Callout<layer::AleAuthRecvAcceptV4> for AskThenReinject {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthRecvAcceptV4>,
    ) {
        if c.injection_state(irql, &self.injection) == InjectionState::InjectedBySelf {
            self.own_reinjections.fetch_add(1, Ordering::SeqCst);
            let _ = c.out.permit();
            return;
        }
        self.decided.fetch_add(1, Ordering::SeqCst);
        let clone = c
            .clone_for_receive(irql)
            .expect("an inbound packet to clone");
        let pended = c.pend().expect("pends");
        let (injection, allow) = (Arc::clone(&self.injection), self.allow);
        let queued = self
            .queue
            .queue(irql, move |passive: &mut PassiveLevel<'_>| {
                pended.complete(passive);
                if allow {
                    clone.inject(passive, &injection).expect("injects");
                } else {
                    drop(clone);
                }
            });
        assert!(queued.is_ok(), "queues the work item");
    }
}

fn inbound() -> Connection {
    Connection {
        pid: 7,
        app: "\\device\\harddiskvolume1\\server.exe".into(),
        protocol: IpProtocol::Tcp,
        local: "10.0.0.1:443".parse().unwrap(),
        remote: "10.0.0.2:50000".parse().unwrap(),
        direction: Direction::Inbound,
    }
}

fn injection_handle(machine: &Machine, driver: &LoadedDriver) -> InjectionHandle {
    driver
        .run_in_driver(machine, |irql, _| {
            InjectionHandle::create(irql, Some(IpVersion::V4))
        })
        .expect("an SDK driver")
        .expect("creates the handle")
}

/// Runs one inbound attempt against an [`AskThenReinject`] callout; returns the outcome and
/// the callout's counts (decided, own reinjections). Unloads the driver (any leak stops).
fn attempt(allow: bool, ale: AleIrql) -> (wfp_rs_sim::ConnectOutcome, u32, u32) {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let injection = Arc::new(injection_handle(&machine, &driver));
    let installed = install(&machine, &driver, CALLOUT, FILTER, |d| AskThenReinject {
        injection,
        queue: d.work_queue(),
        allow,
        decided: AtomicU32::new(0),
        own_reinjections: AtomicU32::new(0),
    });
    let outcome = machine.connect(&inbound(), ale);
    machine.wait_for_work_items();
    let decided = installed.callout().decided.load(Ordering::SeqCst);
    let own = installed.callout().own_reinjections.load(Ordering::SeqCst);
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty(), "no pool left");
    (outcome, decided, own)
}

#[test]
fn a_reinjected_clone_completes_the_inbound_connection() {
    for ale in [AleIrql::Passive, AleIrql::Dispatch] {
        let (outcome, decided, own) = attempt(true, ale);
        assert!(outcome.pended);
        assert!(
            outcome.flow_handle.is_some(),
            "the connection is established: {:?}",
            outcome.layers
        );
        assert_eq!(outcome.decision.action, Action::Permit);
        let names: Vec<&str> = outcome.layers.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "INBOUND_TRANSPORT_V4",
                "ALE_AUTH_RECV_ACCEPT_V4",
                // The reinjected clone crosses the inbound layers again.
                "INBOUND_TRANSPORT_V4",
                "ALE_AUTH_RECV_ACCEPT_V4",
                "ALE_FLOW_ESTABLISHED_V4",
            ]
        );
        // Decided once; its own reinjection was recognised, not decided again (no loop).
        assert_eq!((decided, own), (1, 1));
    }
}

#[test]
fn a_denied_clone_is_freed_and_the_attempt_fails() {
    let (outcome, decided, own) = attempt(false, AleIrql::Dispatch);
    assert!(outcome.pended);
    assert_eq!(outcome.flow_handle, None);
    assert_eq!(outcome.layers.len(), 2, "{:?}", outcome.layers);
    assert_eq!((decided, own), (1, 0));
    // `attempt` unloaded the driver: the dropped clone was freed, or that would have stopped.
}

/// Records the injection state its packets have for its own handle and for another one.
struct StateProbe {
    mine: InjectionHandle,
    other: InjectionHandle,
    seen: std::sync::Mutex<Vec<(InjectionState, InjectionState)>>,
}

impl Callout<layer::InboundTransportV4> for StateProbe {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::InboundTransportV4>,
    ) {
        let states = (
            c.injection_state(irql, &self.mine),
            c.injection_state(irql, &self.other),
        );
        wfp_rs_sim::as_harness(|| self.seen.lock().unwrap().push(states));
        let _ = c.out.permit();
    }
}

#[test]
fn a_reinjected_packet_is_injected_by_other_for_another_handle() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let injection = Arc::new(injection_handle(&machine, &driver));
    let (mine, other) = (
        injection_handle(&machine, &driver),
        injection_handle(&machine, &driver),
    );
    let probe = install(
        &machine,
        &driver,
        CalloutKey::<layer::InboundTransportV4>::new(guid!("62000000-0000-0000-0000-000000000003")),
        guid!("62000000-0000-0000-0000-000000000004"),
        |_| StateProbe {
            mine,
            other,
            seen: std::sync::Mutex::new(Vec::new()),
        },
    );
    let decider = install(&machine, &driver, CALLOUT, FILTER, |d| AskThenReinject {
        injection,
        queue: d.work_queue(),
        allow: true,
        decided: AtomicU32::new(0),
        own_reinjections: AtomicU32::new(0),
    });
    let outcome = machine.connect(&inbound(), AleIrql::Dispatch);
    machine.wait_for_work_items();
    assert!(outcome.flow_handle.is_some());
    let seen = probe.callout().seen.lock().unwrap().clone();
    // The first packet is nobody's injection; the reinjected one is another handle's for both
    // of the probe's handles (the decider injected it).
    assert_eq!(
        seen,
        [
            (InjectionState::NotInjected, InjectionState::NotInjected),
            (
                InjectionState::InjectedByOther,
                InjectionState::InjectedByOther
            ),
        ]
    );
    decider.remove(&machine, &driver);
    probe.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

/// Holds every outbound packet: clones it for send, absorbs the original, and injects the clone
/// at once (a pass-through, the skeleton of a packet modifier).
struct SendsClones {
    injection: InjectionHandle,
    injected: AtomicU32,
    /// Its own injections, indicated to it again at OUTBOUND_TRANSPORT and permitted.
    own: AtomicU32,
}

impl Callout<layer::OutboundTransportV4> for SendsClones {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::OutboundTransportV4>,
    ) {
        if c.injection_state(irql, &self.injection) == InjectionState::InjectedBySelf {
            self.own.fetch_add(1, Ordering::SeqCst);
            let _ = c.out.permit();
            return;
        }
        let clone = c.clone_for_send(irql).expect("an outbound packet to clone");
        c.out.block();
        if clone.inject(irql, &self.injection).is_ok() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn a_send_clone_is_injected_and_freed_by_the_completion() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let injection = injection_handle(&machine, &driver);
    let installed = install(
        &machine,
        &driver,
        CalloutKey::<layer::OutboundTransportV4>::new(guid!(
            "62000000-0000-0000-0000-000000000005"
        )),
        guid!("62000000-0000-0000-0000-000000000006"),
        |_| SendsClones {
            injection,
            injected: AtomicU32::new(0),
            own: AtomicU32::new(0),
        },
    );
    let mut connection = inbound();
    connection.direction = Direction::Outbound;
    let outcome = machine.connect(&connection, AleIrql::Dispatch);
    // The original was blocked (the clone went out in its place).
    assert_eq!(
        outcome.layers.last().map(|(name, d)| (*name, d.action)),
        Some(("OUTBOUND_TRANSPORT_V4", Action::Block))
    );
    assert_eq!(installed.callout().injected.load(Ordering::SeqCst), 1);
    assert_eq!(
        installed.callout().own.load(Ordering::SeqCst),
        1,
        "the injected clone was indicated at OUTBOUND_TRANSPORT again and recognised"
    );
    installed.remove(&machine, &driver);
    // Unloading checks that the clone was freed (by the SDK's completion routine) and the
    // handle destroyed (when the callout was dropped, at PASSIVE_LEVEL).
    machine.unload_driver(driver).unwrap();
}

/// Clones every packet and forgets the clone: a leak.
struct LeaksClones;

impl Callout<layer::AleAuthRecvAcceptV4> for LeaksClones {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthRecvAcceptV4>,
    ) {
        if let Ok(clone) = c.clone_for_receive(irql) {
            core::mem::forget(clone);
        }
        let _ = c.out.permit();
    }
}

bugcheck_test! {
    fn unloading_with_a_clone_never_freed_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let installed = install(&machine, &driver, CALLOUT, FILTER, |_| LeaksClones);
        let outcome = machine.connect(&inbound(), AleIrql::Dispatch);
        assert!(outcome.flow_handle.is_some());
        installed.remove(&machine, &driver);
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    fn unloading_with_an_injection_handle_never_destroyed_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        core::mem::forget(injection_handle(&machine, &driver));
        let _ = machine.unload_driver(driver);
    }
}

/// A packet of the simulator's kind built by hand (an IPv4 header and a UDP header), to clone
/// through the raw functions.
struct HandBuilt {
    nbl: Box<sys::NET_BUFFER_LIST>,
    nb: Box<sys::NET_BUFFER>,
    _mdl: Box<sys::MDL>,
    _bytes: Box<[u8; 28]>,
}

fn hand_built() -> HandBuilt {
    let mut bytes = Box::new([0u8; 28]);
    bytes[0] = 0x45;
    let mdl = Box::new(sys::MDL {
        Next: core::ptr::null_mut(),
        Size: 48,
        MdlFlags: sys::MDL_SOURCE_IS_NONPAGED_POOL,
        Process: core::ptr::null_mut(),
        MappedSystemVa: bytes.as_mut_ptr().cast(),
        StartVa: core::ptr::null_mut(),
        ByteCount: 28,
        ByteOffset: 0,
    });
    // SAFETY: plain data; zero is an empty, unlinked structure.
    let mut nb: Box<sys::NET_BUFFER> = Box::new(unsafe { core::mem::zeroed() });
    nb.MdlChain = (&raw const *mdl).cast_mut();
    nb.CurrentMdl = nb.MdlChain;
    nb.DataLength = 28;
    // SAFETY: as above.
    let mut nbl: Box<sys::NET_BUFFER_LIST> = Box::new(unsafe { core::mem::zeroed() });
    nbl.FirstNetBuffer = &raw mut *nb;
    HandBuilt {
        nbl,
        nb,
        _mdl: mdl,
        _bytes: bytes,
    }
}

/// Clones `packet` through the raw function, at `DISPATCH_LEVEL` in `machine`.
fn raw_clone(packet: &mut HandBuilt) -> *mut sys::NET_BUFFER_LIST {
    let mut clone = core::ptr::null_mut();
    // SAFETY: a valid list (hand-built, alive for the call); `clone` is writable.
    let status = unsafe {
        sys::FwpsAllocateCloneNetBufferList0(
            &raw mut *packet.nbl,
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            0,
            &mut clone,
        )
    };
    assert_eq!(status, 0);
    clone
}

/// A completion routine that leaves the clone alone (the misuse tests never get that far).
unsafe extern "system" fn ignore(_: *mut core::ffi::c_void, _: *mut sys::NET_BUFFER_LIST, _: u8) {}

/// Receive-injects `clone` with `handle` through the raw function.
fn raw_inject(handle: sys::HANDLE, clone: *mut sys::NET_BUFFER_LIST) -> i32 {
    // SAFETY: the misuse under test is in the arguments; the call itself is well-formed.
    unsafe {
        sys::FwpsInjectTransportReceiveAsync0(
            handle,
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            0,
            sys::AF_INET,
            1,
            2,
            0,
            clone,
            Some(ignore),
            core::ptr::null_mut(),
        )
    }
}

fn raw_handle(machine: &Machine) -> sys::HANDLE {
    machine.at_passive(|_| {
        let mut handle = core::ptr::null_mut();
        // SAFETY: PASSIVE_LEVEL; `handle` is writable.
        let status = unsafe {
            sys::FwpsInjectionHandleCreate0(
                sys::AF_INET,
                sys::FWPS_INJECTION_TYPE_TRANSPORT,
                &mut handle,
            )
        };
        assert_eq!(status, 0);
        handle
    })
}

#[test]
fn a_raw_clone_copies_the_packet_and_injects_once() {
    let machine = Machine::new();
    let handle = raw_handle(&machine);
    let mut packet = hand_built();
    let delivered = machine.at_dispatch(|_| {
        let clone = raw_clone(&mut packet);
        // SAFETY: the clone the call returned, alive until its injection completes below.
        let list = unsafe { &*clone };
        // SAFETY: its first net buffer, alive as long.
        let first = unsafe { &*list.FirstNetBuffer };
        assert_eq!((first.DataOffset, first.DataLength as u32), (0, 28));
        // Not the original's structures: a clone of its own.
        assert!(!core::ptr::eq(first, &*packet.nb));
        /// Frees the clone it is handed back, and counts.
        unsafe extern "system" fn free(
            context: *mut core::ffi::c_void,
            nbl: *mut sys::NET_BUFFER_LIST,
            _: u8,
        ) {
            // SAFETY: the context is the test's counter, alive across the injection.
            let count = unsafe { &*context.cast::<AtomicU32>() };
            count.fetch_add(1, Ordering::SeqCst);
            // SAFETY: the clone is handed back once, and freed once.
            unsafe { sys::FwpsFreeCloneNetBufferList0(nbl, 0) };
        }
        let count = AtomicU32::new(0);
        // SAFETY: a live clone and handle; `count` outlives the completion, which runs before
        // the call returns for a packet no connection waits for.
        let status = unsafe {
            sys::FwpsInjectTransportReceiveAsync0(
                handle,
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                0,
                sys::AF_INET,
                1,
                2,
                0,
                clone,
                Some(free),
                (&raw const count).cast_mut().cast(),
            )
        };
        assert_eq!(status, 0);
        count.load(Ordering::SeqCst)
    });
    assert_eq!(delivered, 1, "the completion routine ran once");
    machine.at_passive(|_| {
        // SAFETY: PASSIVE_LEVEL; the handle is live.
        assert_eq!(unsafe { sys::FwpsInjectionHandleDestroy0(handle) }, 0);
    });
}

/// Records the status the injection ended with, and frees the clone.
unsafe extern "system" fn record_status(
    context: *mut core::ffi::c_void,
    nbl: *mut sys::NET_BUFFER_LIST,
    _: u8,
) {
    // SAFETY: the context is the test's cell, alive across the injection.
    let cell = unsafe { &*context.cast::<std::sync::atomic::AtomicI32>() };
    // SAFETY: the clone handed back, valid until freed below.
    cell.store(unsafe { (*nbl).Status }, Ordering::SeqCst);
    // SAFETY: handed back once, freed once.
    unsafe { sys::FwpsFreeCloneNetBufferList0(nbl, 0) };
}

#[test]
fn a_clone_that_does_not_start_at_the_ip_header_is_dropped() {
    let machine = Machine::new();
    let handle = raw_handle(&machine);
    let mut packet = hand_built();
    let status = std::sync::atomic::AtomicI32::new(i32::MIN);
    machine.at_dispatch(|_| {
        for (data_offset, expected) in [(20, Status::INVALID_PARAMETER.raw()), (0, 0)] {
            // The data start past the IP header, as the transport layers indicate it: the
            // caller did not retreat before cloning. Then at the IP header.
            packet.nb.DataOffset = data_offset;
            packet.nb.DataLength = 28 - data_offset as usize;
            let clone = raw_clone(&mut packet);
            // SAFETY: a live clone and handle; `status` outlives the injection, which completes
            // before the call returns (no connection waits for it).
            let injected = unsafe {
                sys::FwpsInjectTransportReceiveAsync0(
                    handle,
                    core::ptr::null_mut(),
                    core::ptr::null_mut(),
                    0,
                    sys::AF_INET,
                    1,
                    2,
                    0,
                    clone,
                    Some(record_status),
                    (&raw const status).cast_mut().cast(),
                )
            };
            assert_eq!(injected, 0, "the call itself succeeds");
            assert_eq!(status.load(Ordering::SeqCst), expected);
        }
    });
    machine.at_passive(|_| {
        // SAFETY: PASSIVE_LEVEL; the handle is live.
        assert_eq!(unsafe { sys::FwpsInjectionHandleDestroy0(handle) }, 0);
    });
}

bugcheck_test! {
    fn freeing_a_clone_twice_stops() expects WFP_INVALID_OPERATION (0x8000_0010) {
        let machine = Machine::new();
        let mut packet = hand_built();
        machine.at_dispatch(|_| {
            let clone = raw_clone(&mut packet);
            // SAFETY: a live clone, freed once.
            unsafe { sys::FwpsFreeCloneNetBufferList0(clone, 0) };
            // SAFETY: deliberately freed a second time: the rule under test.
            unsafe { sys::FwpsFreeCloneNetBufferList0(clone, 0) };
        });
    }
}

bugcheck_test! {
    fn injecting_a_freed_clone_stops() expects WFP_INVALID_OPERATION (0x8000_0010) {
        let machine = Machine::new();
        let handle = raw_handle(&machine);
        let mut packet = hand_built();
        machine.at_dispatch(|_| {
            let clone = raw_clone(&mut packet);
            // SAFETY: a live clone, freed once.
            unsafe { sys::FwpsFreeCloneNetBufferList0(clone, 0) };
            raw_inject(handle, clone);
        });
    }
}

bugcheck_test! {
    fn injecting_with_a_destroyed_handle_stops() expects WFP_INVALID_OPERATION (0x8000_0012) {
        let machine = Machine::new();
        let handle = raw_handle(&machine);
        machine.at_passive(|_| {
            // SAFETY: PASSIVE_LEVEL; the handle is live, destroyed once.
            unsafe { sys::FwpsInjectionHandleDestroy0(handle) };
        });
        let mut packet = hand_built();
        machine.at_dispatch(|_| {
            let clone = raw_clone(&mut packet);
            raw_inject(handle, clone);
        });
    }
}

bugcheck_test! {
    fn creating_an_injection_handle_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_| {
            let mut handle = core::ptr::null_mut();
            // SAFETY: deliberately at DISPATCH_LEVEL: the rule under test.
            let _ = unsafe {
                sys::FwpsInjectionHandleCreate0(sys::AF_INET, sys::FWPS_INJECTION_TYPE_TRANSPORT, &mut handle)
            };
        });
    }
}

/// Send-injects a clone of every outbound packet it sees, its own injections included.
struct SendsForEver {
    injection: InjectionHandle,
}

impl Callout<layer::OutboundTransportV4> for SendsForEver {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::OutboundTransportV4>,
    ) {
        if let Ok(clone) = c.clone_for_send(irql) {
            c.out.block();
            let _ = clone.inject(irql, &self.injection);
        }
    }
}

bugcheck_test! {
    /// A send-injected packet is indicated at OUTBOUND_TRANSPORT again: a callout that does not
    /// recognise its own injection injects it again, for ever on Windows.
    fn send_injecting_its_own_injections_again_stops_as_a_loop() expects WFP_INVALID_OPERATION (0x8000_0013) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let injection = injection_handle(&machine, &driver);
        let _installed = install(
            &machine,
            &driver,
            CalloutKey::<layer::OutboundTransportV4>::new(guid!(
                "62000000-0000-0000-0000-000000000009"
            )),
            guid!("62000000-0000-0000-0000-00000000000a"),
            |_| SendsForEver { injection },
        );
        let mut connection = inbound();
        connection.direction = Direction::Outbound;
        machine.connect(&connection, AleIrql::Dispatch);
    }
}
