//! Callouts in the simulated filter engine: typed values at every layer, WFP's arbitration
//! across sublayers, the rights rules, unregistered callouts, and unload checks.
//!
//! Filters are added here with the raw management ABI (`Fwpm*`), so these tests pin the
//! simulated engine itself; the safe management API has its own tests.

#![cfg(any(not(windows), feature = "sim"))]
#![expect(
    clippy::multiple_unsafe_ops_per_block,
    reason = "each raw management call is one unsafe block with its pointer arguments"
)]

use core::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify, FilterEvent};
use wfp_rs::classify::{Action, RightsError};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::irql::{DispatchLevel, Irql, PassiveLevel};
use wfp_rs::layer::value::{ConditionFlags, IpProtocol};
use wfp_rs::layer::{self, Layer, fields};
use wfp_rs::{Guid, Status, guid, sys};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{ClassifyRequest, LoadedDriver, Machine};

/// The driver the tests register their callouts in.
mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// What a scripted callout does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Script {
    Permit,
    PermitHard,
    Block,
    Continue,
    /// Returns without touching the decision.
    Nothing,
    /// Refuses filters in notify.
    RefuseFilters,
}

/// What a callout saw.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    layer_id: u16,
    irql: Irql,
    could_write: bool,
    permit_result: Option<Result<(), RightsError>>,
    remote_port: Option<u16>,
    remote_v4: Option<Ipv4Addr>,
    remote_v6: Option<Ipv6Addr>,
    protocol: Option<IpProtocol>,
    app: Option<String>,
    pid: Option<u64>,
    filter_context: u64,
}

struct Scripted {
    script: Script,
    seen: Mutex<Vec<Seen>>,
    notified: AtomicU32,
}

impl Scripted {
    fn new(script: Script) -> Scripted {
        Scripted {
            script,
            seen: Mutex::new(Vec::new()),
            notified: AtomicU32::new(0),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl<L: Layer> Callout<L> for Scripted {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let mut seen = Seen {
            layer_id: L::ID,
            irql: Irql::current(),
            could_write: c.out.can_write(),
            permit_result: None,
            remote_port: None,
            remote_v4: None,
            remote_v6: None,
            protocol: None,
            app: c.metadata.process_path().map(|p| p.to_string()),
            pid: c.metadata.process_id(),
            filter_context: c.filter.context(),
        };
        match self.script {
            Script::Permit => seen.permit_result = Some(c.out.permit()),
            Script::PermitHard => seen.permit_result = Some(c.out.permit_hard()),
            Script::Block => {
                c.out.block();
            }
            Script::Continue => {
                let _ = c.out.continue_to_next_filter();
            }
            Script::Nothing | Script::RefuseFilters => {}
        }
        record_typed::<L>(c, &mut seen);
        self.seen.lock().unwrap().push(seen);
    }

    fn notify(&self, _irql: &mut DispatchLevel<'_>, event: FilterEvent<'_>) -> Result<(), Status> {
        self.notified.fetch_add(1, Ordering::SeqCst);
        match (self.script, event) {
            (Script::RefuseFilters, FilterEvent::Added(_)) => Err(Status::ACCESS_DENIED),
            _ => Ok(()),
        }
    }
}

/// Reads the typed fields at the two layers the typed tests use.
fn record_typed<L: Layer>(c: &Classify<'_, L>, seen: &mut Seen) {
    // The typed API needs the concrete layer; dispatch on the id for the recorder.
    if L::ID == layer::AleAuthConnectV4::ID {
        let values = unsafe_cast::<L, layer::AleAuthConnectV4>(c);
        seen.remote_port = values.values.get::<fields::IpRemotePort>().ok();
        seen.remote_v4 = values.values.get::<fields::IpRemoteAddress>().ok();
        seen.protocol = values.values.get::<fields::IpProtocol>().ok();
    } else if L::ID == layer::AleAuthConnectV6::ID {
        let values = unsafe_cast::<L, layer::AleAuthConnectV6>(c);
        seen.remote_port = values.values.get::<fields::IpRemotePort>().ok();
        seen.remote_v6 = values.values.get::<fields::IpRemoteAddress>().ok();
        seen.protocol = values.values.get::<fields::IpProtocol>().ok();
    }
}

/// Views a `Classify<L>` as the concrete layer `M` it is (checked by id).
fn unsafe_cast<'c, 'a, L: Layer, M: Layer>(c: &'c Classify<'a, L>) -> &'c Classify<'a, M> {
    assert_eq!(L::ID, M::ID);
    // The types differ only in a phantom layer type, and the ids match (asserted above).
    // SAFETY: so the values really are `M`'s.
    unsafe { &*(c as *const Classify<'a, L>).cast::<Classify<'a, M>>() }
}

// --- raw management helpers ---------------------------------------------------------------------

fn utf16(text: &str) -> Vec<u16> {
    text.encode_utf16().chain([0]).collect()
}

struct Session(sys::HANDLE);

fn open(dynamic: bool) -> Session {
    // SAFETY: plain data (integers and pointers), valid when zeroed.
    let mut session: sys::FWPM_SESSION0 = unsafe { core::mem::zeroed() };
    session.flags = if dynamic {
        sys::FWPM_SESSION_FLAG_DYNAMIC
    } else {
        0
    };
    let mut handle = core::ptr::null_mut();
    // SAFETY: kernel-mode open with a valid session and out pointer.
    let status = unsafe {
        sys::FwpmEngineOpen0(
            core::ptr::null(),
            0xFFFF_FFFF,
            core::ptr::null_mut(),
            &session,
            &mut handle,
        )
    };
    assert_eq!(status, 0);
    Session(handle)
}

impl Session {
    fn sublayer(&self, key: Guid, weight: u16) {
        let mut name = utf16("test sublayer");
        // SAFETY: plain data, valid when zeroed.
        let mut sublayer: sys::FWPM_SUBLAYER0 = unsafe { core::mem::zeroed() };
        sublayer.subLayerKey = key.0;
        sublayer.displayData.name = name.as_mut_ptr();
        sublayer.weight = weight;
        assert_eq!(
            // SAFETY: valid structure for the call.
            unsafe { sys::FwpmSubLayerAdd0(self.0, &sublayer, core::ptr::null_mut()) },
            0
        );
    }

    fn callout<L: Layer>(&self, key: Guid) {
        let mut name = utf16("test callout");
        // SAFETY: plain data, valid when zeroed.
        let mut callout: sys::FWPM_CALLOUT0 = unsafe { core::mem::zeroed() };
        callout.calloutKey = key.0;
        callout.displayData.name = name.as_mut_ptr();
        callout.applicableLayer = L::KEY.0;
        assert_eq!(
            // SAFETY: valid structure for the call.
            unsafe {
                sys::FwpmCalloutAdd0(
                    self.0,
                    &callout,
                    core::ptr::null_mut(),
                    core::ptr::null_mut(),
                )
            },
            0
        );
    }

    /// Adds a filter; `conditions` are (field key, match type, value as u16 port or u32 address).
    fn filter<L: Layer>(&self, spec: FilterSpec) -> Result<u64, Status> {
        let mut name = utf16("test filter");
        let mut weight = spec.weight;
        let mut raw_conditions: Vec<sys::FWPM_FILTER_CONDITION0> = spec
            .ports
            .iter()
            .map(|&(match_type, port)| sys::FWPM_FILTER_CONDITION0 {
                fieldKey: <fields::IpRemotePort as layer::FieldKind>::CONDITION.0,
                matchType: match_type,
                conditionValue: sys::FWP_CONDITION_VALUE0 {
                    r#type: sys::FWP_UINT16,
                    u: sys::FWP_CONDITION_VALUE0_u { uint16: port },
                },
            })
            .collect();
        // SAFETY: plain data, valid when zeroed.
        let mut filter: sys::FWPM_FILTER0 = unsafe { core::mem::zeroed() };
        filter.filterKey = spec.key.0;
        filter.displayData.name = name.as_mut_ptr();
        filter.layerKey = L::KEY.0;
        filter.subLayerKey = spec.sublayer.0;
        filter.weight = sys::FWP_VALUE0 {
            r#type: sys::FWP_UINT64,
            u: sys::FWP_VALUE0_u {
                uint64: &mut weight,
            },
        };
        filter.numFilterConditions = raw_conditions.len() as u32;
        filter.filterCondition = raw_conditions.as_mut_ptr();
        filter.flags = spec.flags;
        filter.action.r#type = spec.action;
        filter.action.u.calloutKey = spec.callout.0;
        filter.u.rawContext = spec.context;
        let mut id = 0;
        let reserved = core::ptr::null_mut();
        // SAFETY: the filter and everything it points to live across the call.
        let status = unsafe { sys::FwpmFilterAdd0(self.0, &filter, reserved, &mut id) };
        Status::from_ntstatus(status).map(|()| id)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: our handle.
        unsafe { sys::FwpmEngineClose0(self.0) };
    }
}

#[derive(Clone)]
struct FilterSpec {
    key: Guid,
    sublayer: Guid,
    weight: u64,
    action: u32,
    callout: Guid,
    flags: u32,
    context: u64,
    ports: Vec<(sys::FWP_MATCH_TYPE, u16)>,
}

impl FilterSpec {
    fn new(action: u32) -> FilterSpec {
        FilterSpec {
            key: Guid::default(),
            sublayer: Guid::default(),
            weight: 1,
            action,
            callout: Guid::default(),
            flags: 0,
            context: 0,
            ports: Vec::new(),
        }
    }
    fn callout(callout: Guid) -> FilterSpec {
        FilterSpec {
            callout,
            ..FilterSpec::new(sys::FWP_ACTION_CALLOUT_TERMINATING)
        }
    }
    fn in_sublayer(mut self, sublayer: Guid) -> Self {
        self.sublayer = sublayer;
        self
    }
}

const HIGH: Guid = guid!("10000000-0000-0000-0000-000000000001");
const LOW: Guid = guid!("10000000-0000-0000-0000-000000000002");
const CALLOUT_A: Guid = guid!("20000000-0000-0000-0000-00000000000a");
const CALLOUT_B: Guid = guid!("20000000-0000-0000-0000-00000000000b");

fn connect_v4(port: u16) -> ClassifyRequest<layer::AleAuthConnectV4> {
    ClassifyRequest::new()
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, 7))
        .with::<fields::IpRemotePort>(port)
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::AleAppId>("\\device\\harddiskvolume3\\tools\\curl.exe")
        .with::<fields::Flags>(ConditionFlags::empty())
        .process(4242, "\\device\\harddiskvolume3\\tools\\curl.exe")
}

/// Loads the host driver and registers `callout` under `key` at layer `L`.
fn register<L: Layer>(
    machine: &Machine,
    driver: &LoadedDriver,
    key: Guid,
    callout: Scripted,
) -> CalloutRegistration<L, Scripted> {
    driver
        .run_in_driver(machine, |irql, d| {
            CalloutRegistration::<L, Scripted>::register(irql, d, CalloutKey::new(key), callout)
                .expect("registers")
        })
        .expect("an SDK driver")
}

fn unregister<L: Layer>(
    machine: &Machine,
    driver: &LoadedDriver,
    registration: CalloutRegistration<L, Scripted>,
) {
    driver.run_in_driver(machine, |irql, _| {
        registration
            .unregister(irql)
            .map_err(|(_, s)| s)
            .expect("unregisters")
    });
}

// --- typed values -----------------------------------------------------------------------------

#[test]
fn a_v4_connection_reaches_the_callout_with_typed_values() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Permit),
    );
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        let mut spec = FilterSpec::callout(CALLOUT_A);
        spec.context = 0xC0FFEE;
        session.filter::<layer::AleAuthConnectV4>(spec).unwrap();
        let decision = machine.classify(Irql::DISPATCH, &connect_v4(443));
        assert_eq!(decision.action, Action::Permit);
        drop(session);
    });
    let seen = registration.callout().seen();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.layer_id, 48);
    assert_eq!(seen.irql, Irql::DISPATCH);
    assert_eq!(seen.remote_port, Some(443));
    assert_eq!(seen.remote_v4, Some(Ipv4Addr::new(192, 0, 2, 7)));
    assert_eq!(seen.protocol, Some(IpProtocol::Tcp));
    assert_eq!(
        seen.app.as_deref(),
        Some("\\device\\harddiskvolume3\\tools\\curl.exe")
    );
    assert_eq!(seen.pid, Some(4242));
    assert_eq!(seen.filter_context, 0xC0FFEE);
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_v6_connection_reaches_the_callout_with_an_ipv6_address() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV6>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Block),
    );
    let remote: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV6>(CALLOUT_A);
        session
            .filter::<layer::AleAuthConnectV6>(FilterSpec::callout(CALLOUT_A))
            .unwrap();
        let request = ClassifyRequest::<layer::AleAuthConnectV6>::new()
            .with::<fields::IpRemoteAddress>(remote)
            .with::<fields::IpRemotePort>(8443u16)
            .with::<fields::IpProtocol>(IpProtocol::Udp);
        let decision = machine.classify(Irql::PASSIVE, &request);
        assert_eq!(decision.action, Action::Block);
        assert!(decision.hard, "a callout block clears the write right");
    });
    let seen = registration.callout().seen();
    assert_eq!(seen[0].remote_v6, Some(remote));
    assert_eq!(seen[0].remote_port, Some(8443));
    assert_eq!(seen[0].protocol, Some(IpProtocol::Udp));
    assert_eq!(seen[0].irql, Irql::PASSIVE);
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
}

macro_rules! every_layer_reaches_its_callout {
    ($($layer:ident),*) => {
        #[test]
        fn every_layer_reaches_a_registered_callout() {
            let machine = Machine::new();
            let driver = machine.load_driver("host", host::DriverEntry).unwrap();
            $(
                {
                    let registration = register::<layer::$layer>(&machine, &driver, CALLOUT_A, Scripted::new(Script::Block));
                    machine.at_passive(|_| {
                        let session = open(true);
                        session.callout::<layer::$layer>(CALLOUT_A);
                        session.filter::<layer::$layer>(FilterSpec::callout(CALLOUT_A)).unwrap();
                        let decision = machine.classify(Irql::DISPATCH, &ClassifyRequest::<layer::$layer>::new());
                        assert_eq!(decision.action, Action::Block, "{}", <layer::$layer as Layer>::NAME);
                    });
                    let seen = registration.callout().seen();
                    assert_eq!(seen.len(), 1, "{}", <layer::$layer as Layer>::NAME);
                    assert_eq!(seen[0].layer_id, <layer::$layer as Layer>::ID);
                    unregister(&machine, &driver, registration);
                }
            )*
            machine.unload_driver(driver).unwrap();
        }
    };
}

every_layer_reaches_its_callout!(
    AleAuthConnectV4,
    AleAuthConnectV6,
    AleAuthRecvAcceptV4,
    AleAuthRecvAcceptV6,
    AleFlowEstablishedV4,
    AleFlowEstablishedV6,
    OutboundTransportV4,
    OutboundTransportV6,
    InboundTransportV4,
    InboundTransportV6,
    AleEndpointClosureV4,
    AleEndpointClosureV6,
    AleConnectRedirectV4,
    AleConnectRedirectV6,
    AleResourceAssignmentV4,
    AleResourceAssignmentV6,
    InboundIpPacketV4,
    InboundIpPacketV4Discard,
    InboundIpPacketV6,
    InboundIpPacketV6Discard,
    OutboundIpPacketV4,
    OutboundIpPacketV4Discard,
    OutboundIpPacketV6,
    OutboundIpPacketV6Discard,
    IpForwardV4,
    IpForwardV4Discard,
    IpForwardV6,
    IpForwardV6Discard,
    InboundTransportV4Discard,
    InboundTransportV6Discard,
    OutboundTransportV4Discard,
    OutboundTransportV6Discard,
    StreamV4,
    StreamV4Discard,
    StreamV6,
    StreamV6Discard,
    DatagramDataV4,
    DatagramDataV4Discard,
    DatagramDataV6,
    DatagramDataV6Discard,
    InboundIcmpErrorV4,
    InboundIcmpErrorV4Discard,
    InboundIcmpErrorV6,
    InboundIcmpErrorV6Discard,
    OutboundIcmpErrorV4,
    OutboundIcmpErrorV4Discard,
    OutboundIcmpErrorV6,
    OutboundIcmpErrorV6Discard,
    AleResourceAssignmentV4Discard,
    AleResourceAssignmentV6Discard,
    AleAuthListenV4,
    AleAuthListenV4Discard,
    AleAuthListenV6,
    AleAuthListenV6Discard,
    AleAuthRecvAcceptV4Discard,
    AleAuthRecvAcceptV6Discard,
    AleAuthConnectV4Discard,
    AleAuthConnectV6Discard,
    AleFlowEstablishedV4Discard,
    AleFlowEstablishedV6Discard,
    AleResourceReleaseV4,
    AleResourceReleaseV6,
    AleBindRedirectV4,
    AleBindRedirectV6,
    StreamPacketV4,
    StreamPacketV6,
    InboundMacFrameEthernet,
    OutboundMacFrameEthernet,
    InboundMacFrameNative,
    OutboundMacFrameNative,
    IngressVswitchEthernet,
    EgressVswitchEthernet,
    IngressVswitchTransportV4,
    IngressVswitchTransportV6,
    EgressVswitchTransportV4,
    EgressVswitchTransportV6
);

// --- arbitration --------------------------------------------------------------------------------

/// Runs one classification with: a static filter in the high sublayer, and a callout filter in
/// the low sublayer; returns the decision and what the callout saw.
fn two_sublayers(
    high_action: u32,
    high_flags: u32,
    low_script: Script,
) -> (wfp_rs_sim::Decision, Vec<Seen>) {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(low_script),
    );
    let decision = machine.at_passive(|_| {
        let session = open(true);
        session.sublayer(HIGH, 0x9000);
        session.sublayer(LOW, 0x1000);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        let mut high = FilterSpec::new(high_action).in_sublayer(HIGH);
        high.flags = high_flags;
        session.filter::<layer::AleAuthConnectV4>(high).unwrap();
        session
            .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A).in_sublayer(LOW))
            .unwrap();
        machine.classify(Irql::DISPATCH, &connect_v4(80))
    });
    let seen = registration.callout().seen();
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
    (decision, seen)
}

#[test]
fn a_lower_sublayer_callout_blocks_over_a_soft_permit() {
    let (decision, seen) = two_sublayers(sys::FWP_ACTION_PERMIT, 0, Script::Block);
    assert_eq!(decision.action, Action::Block);
    assert!(!decision.vetoed, "overriding a soft permit is not a veto");
    assert!(seen[0].could_write, "a soft permit leaves the write right");
}

#[test]
fn a_lower_sublayer_callout_vetoes_a_hard_permit() {
    let (decision, seen) = two_sublayers(
        sys::FWP_ACTION_PERMIT,
        sys::FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT,
        Script::Block,
    );
    assert_eq!(decision.action, Action::Block);
    assert!(decision.vetoed);
    assert!(!seen[0].could_write);
}

#[test]
fn without_the_write_right_a_callout_cannot_permit_and_the_hard_decision_stands() {
    let (decision, seen) = two_sublayers(sys::FWP_ACTION_BLOCK, 0, Script::Permit);
    assert_eq!(decision.action, Action::Block, "a static block is hard");
    assert!(!seen[0].could_write);
    assert_eq!(
        seen[0].permit_result,
        Some(Err(RightsError::NoWriteRight {
            current: Action::Block
        })),
        "the SDK refuses to override a hard decision"
    );
}

#[test]
fn a_hard_permit_from_a_callout_beats_a_static_block_below_it() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::PermitHard),
    );
    let decision = machine.at_passive(|_| {
        let session = open(true);
        session.sublayer(HIGH, 0x9000);
        session.sublayer(LOW, 0x1000);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        session
            .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A).in_sublayer(HIGH))
            .unwrap();
        session
            .filter::<layer::AleAuthConnectV4>(
                FilterSpec::new(sys::FWP_ACTION_BLOCK).in_sublayer(LOW),
            )
            .unwrap();
        machine.classify(Irql::DISPATCH, &connect_v4(80))
    });
    assert_eq!(
        decision.action,
        Action::Permit,
        "a static block cannot veto"
    );
    assert!(decision.hard);
    assert_eq!(registration.callout().seen()[0].permit_result, Some(Ok(())));
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn a_terminating_callout_without_a_decision_keeps_the_one_in_force_or_blocks() {
    let (decision, _) = two_sublayers(sys::FWP_ACTION_PERMIT, 0, Script::Nothing);
    // The callout left the soft permit it was handed in place: permit stands.
    assert_eq!(decision.action, Action::Permit);
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Continue),
    );
    let decision = machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        session
            .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
            .unwrap();
        machine.classify(Irql::DISPATCH, &connect_v4(80))
    });
    assert_eq!(
        decision.action,
        Action::Block,
        "CONTINUE from a terminating callout counts as block"
    );
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn within_a_sublayer_the_heaviest_matching_filter_decides() {
    let machine = Machine::new();
    let decision = machine.at_passive(|_| {
        let session = open(true);
        let mut permit = FilterSpec::new(sys::FWP_ACTION_PERMIT);
        permit.weight = 10;
        let mut block = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        block.weight = 20;
        block.ports = vec![(sys::FWP_MATCH_EQUAL, 1234)];
        let permit_id = session.filter::<layer::AleAuthConnectV4>(permit).unwrap();
        let block_id = session.filter::<layer::AleAuthConnectV4>(block).unwrap();
        let blocked = machine.classify(Irql::DISPATCH, &connect_v4(1234));
        let allowed = machine.classify(Irql::DISPATCH, &connect_v4(80));
        assert_eq!(blocked.filter_id, Some(block_id));
        assert_eq!(allowed.filter_id, Some(permit_id));
        (blocked.action, allowed.action)
    });
    assert_eq!(decision, (Action::Block, Action::Permit));
}

#[test]
fn conditions_on_the_same_field_are_ored_and_ranges_match() {
    let machine = Machine::new();
    machine.at_passive(|_| {
        let session = open(true);
        let mut block = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        block.ports = vec![(sys::FWP_MATCH_EQUAL, 21), (sys::FWP_MATCH_EQUAL, 23)];
        session.filter::<layer::AleAuthConnectV4>(block).unwrap();
        for (port, expected) in [
            (21, Action::Block),
            (23, Action::Block),
            (22, Action::Permit),
        ] {
            assert_eq!(
                machine.classify(Irql::PASSIVE, &connect_v4(port)).action,
                expected,
                "port {port}"
            );
        }
    });
}

#[test]
fn no_matching_filter_permits() {
    let machine = Machine::new();
    let decision = machine.at_passive(|_| machine.classify(Irql::DISPATCH, &connect_v4(80)));
    assert_eq!(decision.action, Action::Permit);
    assert_eq!(decision.filter_id, None);
}

// --- unregistered callouts -----------------------------------------------------------------------

fn unregistered(action: u32, flags: u32) -> Action {
    let machine = Machine::new();
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_B);
        let mut spec = FilterSpec::callout(CALLOUT_B);
        spec.action = action;
        spec.flags = flags;
        session.filter::<layer::AleAuthConnectV4>(spec).unwrap();
        machine.classify(Irql::DISPATCH, &connect_v4(80)).action
    })
}

#[test]
fn a_filter_naming_an_unregistered_callout_acts_as_documented() {
    assert_eq!(
        unregistered(sys::FWP_ACTION_CALLOUT_TERMINATING, 0),
        Action::Block
    );
    assert_eq!(
        unregistered(sys::FWP_ACTION_CALLOUT_UNKNOWN, 0),
        Action::Block
    );
    assert_eq!(
        unregistered(sys::FWP_ACTION_CALLOUT_INSPECTION, 0),
        Action::Permit,
        "inspection is skipped"
    );
    assert_eq!(
        unregistered(
            sys::FWP_ACTION_CALLOUT_TERMINATING,
            sys::FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED
        ),
        Action::Permit
    );
}

// --- management validation and notify ------------------------------------------------------------

#[test]
fn the_engine_refuses_malformed_filters() {
    let machine = Machine::new();
    machine.at_passive(|_| {
        let session = open(true);
        // A callout filter whose callout was never added.
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_B)),
            Err(Status::FWP_CALLOUT_NOT_FOUND)
        );
        // A sublayer that does not exist.
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(
                FilterSpec::new(sys::FWP_ACTION_BLOCK).in_sublayer(HIGH)
            ),
            Err(Status::FWP_SUBLAYER_NOT_FOUND)
        );
        // A callout added for another layer.
        session.callout::<layer::AleAuthConnectV6>(CALLOUT_A);
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A)),
            Err(Status::FWP_INCOMPATIBLE_LAYER)
        );
        // A remote port condition at a layer without that field.
        let mut spec = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        spec.ports = vec![(sys::FWP_MATCH_EQUAL, 80)];
        assert_eq!(
            session.filter::<layer::AleResourceAssignmentV4>(spec),
            Err(Status::FWP_CONDITION_NOT_FOUND)
        );
        // A match type the field's type does not support.
        let mut spec = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        spec.ports = vec![(sys::FWP_MATCH_EQUAL_CASE_INSENSITIVE, 80)];
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(spec),
            Err(Status::FWP_MATCH_TYPE_MISMATCH)
        );
        // Duplicate keys.
        let mut keyed = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        keyed.key = guid!("30000000-0000-0000-0000-000000000001");
        session
            .filter::<layer::AleAuthConnectV4>(keyed.clone())
            .unwrap();
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(keyed),
            Err(Status::FWP_ALREADY_EXISTS)
        );
    });
}

#[test]
fn notify_sees_filters_come_and_go_and_can_refuse_them() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let accepting = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Permit),
    );
    let refusing = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_B,
        Scripted::new(Script::RefuseFilters),
    );
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_B);
        session
            .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
            .unwrap();
        assert_eq!(
            session.filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_B)),
            Err(Status::FWP_CALLOUT_NOTIFICATION_FAILED)
        );
        // Closing the dynamic session deletes the filter: a second notification.
    });
    assert_eq!(
        accepting.callout().notified.load(Ordering::SeqCst),
        2,
        "added, then deleted"
    );
    assert_eq!(refusing.callout().notified.load(Ordering::SeqCst), 1);
    unregister(&machine, &driver, accepting);
    unregister(&machine, &driver, refusing);
    machine.unload_driver(driver).unwrap();
}

bugcheck_test! {
    /// A driver must unregister its callouts before it unloads.
    fn unloading_with_a_registered_callout_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let registration = register::<layer::AleAuthConnectV4>(&machine, &driver, CALLOUT_A, Scripted::new(Script::Permit));
        std::mem::forget(registration);
        let _ = machine.unload_driver(driver);
    }
}

/// A driver whose callout, once in `classifyFn`, spins until the driver's unload lets it go —
/// after unregistering the callout, which waits for the call in progress: on Windows the unload
/// never ends.
mod spins_until_unload {
    use super::*;
    use std::sync::atomic::AtomicBool;

    pub static ENTERED: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);

    pub struct Spinner;

    impl Callout<layer::AleAuthConnectV4> for Spinner {
        fn classify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            ENTERED.store(true, Ordering::SeqCst);
            while !RELEASE.load(Ordering::SeqCst) {
                core::hint::spin_loop();
            }
            let _ = c.out.permit();
        }

        fn notify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            _event: FilterEvent<'_>,
        ) -> Result<(), Status> {
            Ok(())
        }
    }

    pub struct State {
        registration: CalloutRegistration<layer::AleAuthConnectV4, Spinner>,
    }

    impl DriverState for State {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            // The mistake: the release comes after the unregistration that waits for it.
            let _ = self.registration.unregister(irql);
            RELEASE.store(true, Ordering::SeqCst);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
        let registration =
            CalloutRegistration::register(irql, driver, CalloutKey::new(CALLOUT_A), Spinner)?;
        Ok(State { registration })
    }
}

/// `FwpsCalloutUnregisterById0` in an unload routine waits for a `classifyFn` that never
/// returns: the machine stops with 0xCE (wait kind 3, the callout's id) instead of hanging.
#[test]
fn unregistering_at_unload_while_classify_never_returns_stops_instead_of_hanging() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "unregistering_at_unload_while_classify_never_returns_stops_instead_of_hanging",
        ),
        || {
            let machine = Machine::new();
            machine.set_unload_wait_limit(core::time::Duration::from_millis(300));
            let driver = machine
                .load_driver("spins", spins_until_unload::DriverEntry)
                .unwrap();
            let session = machine.at_passive(|_| {
                let session = open(true);
                session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
                session
                    .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
                    .unwrap();
                session
            });
            std::thread::scope(|scope| {
                let machine = &machine;
                scope.spawn(move || {
                    let _ = machine.classify(Irql::DISPATCH, &connect_v4(80));
                });
                while !spins_until_unload::ENTERED.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                let _ = machine.unload_driver(driver);
            });
            drop(session);
        },
    );
    let report = outcome.expect_bugcheck(
        wfp_rs::bugcheck::BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
    );
    assert_eq!(
        report.params[3],
        wfp_rs::bugcheck::unload_wait::CALLOUT_CALLS,
        "{}",
        outcome.stderr
    );
    assert!(
        report.explanation.contains("1 call(s) into callout"),
        "{}",
        outcome.stderr
    );
}

/// A callout that takes its counter's lock, then calls a helper that takes it again — the
/// copy-paste recursion safe code allows. Deadlock detection stops it inside `classifyFn`, and
/// the report names the callout and the line of the second acquisition.
mod relocks {
    use super::*;
    use wfp_rs::spin_lock::SpinLock;

    static HITS: SpinLock<u64> = SpinLock::new(0);

    fn count(irql: &mut DispatchLevel<'_>) {
        HITS.lock(irql, |hits, _| *hits += 1); // relocks: second acquisition
    }

    pub struct Relocks;

    impl Callout<layer::AleAuthConnectV4> for Relocks {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            HITS.lock(&mut *irql, |hits, irql| {
                *hits += 1;
                count(irql);
            });
            let _ = c.out.permit();
        }

        fn notify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            _event: FilterEvent<'_>,
        ) -> Result<(), Status> {
            Ok(())
        }
    }
}

#[test]
fn relocking_in_classify_stops_and_the_report_names_the_callout_and_the_line() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "relocking_in_classify_stops_and_the_report_names_the_callout_and_the_line",
        ),
        || {
            let machine = Machine::new();
            let driver = machine.load_driver("host", host::DriverEntry).unwrap();
            let _registration = driver
                .run_in_driver(&machine, |irql, d| {
                    CalloutRegistration::<layer::AleAuthConnectV4, relocks::Relocks>::register(
                        irql,
                        d,
                        CalloutKey::new(CALLOUT_A),
                        relocks::Relocks,
                    )
                    .expect("registers")
                })
                .expect("an SDK driver");
            machine.at_passive(|_| {
                let session = open(true);
                session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
                session
                    .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
                    .unwrap();
                machine.classify(Irql::DISPATCH, &connect_v4(80));
            });
        },
    );
    let report =
        outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION);
    assert_eq!(
        report.params[0],
        wfp_rs::bugcheck::verifier::DEADLOCK_SELF,
        "{}",
        outcome.stderr
    );
    assert!(
        report.routine.starts_with("classifyFn of callout ")
            && report
                .routine
                .contains(&format!("{{{CALLOUT_A}}} of driver host; ")),
        "{}",
        outcome.stderr
    );
    let line = include_str!("callout.rs")
        .lines()
        .position(|l| l.ends_with("// relocks: second acquisition"))
        .map(|index| index + 1)
        .expect("the line is in this file");
    assert!(
        report.location.contains(&format!("callout.rs:{line}:"))
            && report.location.contains("relocks::count"),
        "{}",
        outcome.stderr
    );
}

/// A callout that queues a work item and waits for it under a spin lock, at `DISPATCH_LEVEL`
/// — the work item runs at `PASSIVE_LEVEL`, so on a processor that spins it never runs, and on a
/// machine whose processors all spin (or with one processor) nowhere.
mod waits_for_its_work_item {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use wfp_rs::spin_lock::SpinLock;
    use wfp_rs::work_item::WorkQueue;

    static DONE: AtomicBool = AtomicBool::new(false);
    static LOCK: SpinLock<u64> = SpinLock::new(0);

    pub struct Waits {
        pub queue: WorkQueue,
    }

    impl Callout<layer::AleAuthConnectV4> for Waits {
        fn classify(
            &self,
            irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::AleAuthConnectV4>,
        ) {
            if self
                .queue
                .queue(&*irql, |_| DONE.store(true, Ordering::SeqCst))
                .is_err()
            {
                return;
            }
            LOCK.lock(irql, |count, _| {
                *count += 1;
                while !DONE.load(Ordering::SeqCst) {
                    core::hint::spin_loop();
                }
            });
            let _ = c.out.permit();
        }

        fn notify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            _event: FilterEvent<'_>,
        ) -> Result<(), Status> {
            Ok(())
        }
    }
}

/// The simulator's worker threads would run the work item at once on another host thread and
/// end the spin; held (as the one processor of a small machine would hold it), the spin never
/// ends and the DPC watchdog stops the machine, naming the callout.
#[test]
fn classify_spinning_for_its_work_item_under_a_spin_lock_trips_the_dpc_watchdog() {
    let outcome = wfp_rs_sim::run_isolated(
        &wfp_rs_sim::__test_name(
            module_path!(),
            "classify_spinning_for_its_work_item_under_a_spin_lock_trips_the_dpc_watchdog",
        ),
        || {
            let machine = Machine::new();
            machine.set_dpc_watchdog_limit(core::time::Duration::from_millis(200));
            machine.hold_work_items(true);
            let driver = machine.load_driver("host", host::DriverEntry).unwrap();
            let _registration = driver
                .run_in_driver(&machine, |irql, d| {
                    let waits = waits_for_its_work_item::Waits {
                        queue: d.work_queue(),
                    };
                    CalloutRegistration::<layer::AleAuthConnectV4, _>::register(
                        irql,
                        d,
                        CalloutKey::new(CALLOUT_A),
                        waits,
                    )
                    .expect("registers")
                })
                .expect("an SDK driver");
            // Kept to the end: the machine stops before anything is torn down.
            let _session = machine.at_passive(|_| {
                let session = open(true);
                session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
                session
                    .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
                    .unwrap();
                session
            });
            machine.classify(Irql::DISPATCH, &connect_v4(80));
        },
    );
    let report = outcome.expect_bugcheck(wfp_rs::bugcheck::BugCheckCode::DPC_WATCHDOG_VIOLATION);
    assert_eq!(report.params, [1, 13, 0, 0], "{}", outcome.stderr);
    assert!(
        report.routine.starts_with("classifyFn of callout ")
            && report
                .routine
                .contains(&format!("{{{CALLOUT_A}}} of driver host; ")),
        "{}",
        outcome.stderr
    );
    assert!(
        report.explanation.contains("in classifyFn of callout "),
        "{}",
        outcome.stderr
    );
}

bugcheck_test! {
    /// Callout registration is PASSIVE_LEVEL only.
    fn registering_a_callout_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_| {
            // SAFETY: plain data (a GUID, flags and optional function pointers), valid zeroed.
            let callout: sys::FWPS_CALLOUT3 = unsafe { core::mem::zeroed() };
            // SAFETY: deliberately at the wrong IRQL; the simulator stops before using anything.
            unsafe { sys::FwpsCalloutRegister3(core::ptr::null_mut(), &callout, core::ptr::null_mut()) };
        });
    }
}

impl DriverState for Scripted {}

#[test]
fn bfe_rules_on_names_lifetimes_and_persistence() {
    let machine = Machine::new();
    machine.at_passive(|_| {
        let dynamic = open(true);
        let other = open(true);
        let static_session = open(false);
        // Every object needs a display name.
        // SAFETY: plain data, valid when zeroed.
        let mut nameless: sys::FWPM_SUBLAYER0 = unsafe { core::mem::zeroed() };
        nameless.subLayerKey = LOW.0;
        // SAFETY: a valid structure for the call.
        let status = unsafe { sys::FwpmSubLayerAdd0(dynamic.0, &nameless, core::ptr::null_mut()) };
        assert_eq!(
            Status::from_ntstatus(status),
            Err(Status::FWP_NULL_DISPLAY_NAME)
        );
        // Another session's dynamic sublayer cannot hold this session's filter, and a static
        // filter cannot refer to a dynamic sublayer.
        dynamic.sublayer(HIGH, 0x100);
        let in_high = FilterSpec::new(sys::FWP_ACTION_BLOCK).in_sublayer(HIGH);
        assert_eq!(
            other.filter::<layer::AleAuthConnectV4>(in_high.clone()),
            Err(Status::FWP_LIFETIME_MISMATCH)
        );
        assert_eq!(
            static_session.filter::<layer::AleAuthConnectV4>(in_high.clone()),
            Err(Status::FWP_LIFETIME_MISMATCH)
        );
        assert!(dynamic.filter::<layer::AleAuthConnectV4>(in_high).is_ok());
        // A dynamic session cannot add persistent objects.
        let mut persistent = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        persistent.flags = sys::FWPM_FILTER_FLAG_PERSISTENT;
        assert_eq!(
            dynamic.filter::<layer::AleAuthConnectV4>(persistent),
            Err(Status::FWP_DYNAMIC_SESSION_IN_PROGRESS)
        );
        // A filter cannot be added disabled.
        let mut disabled = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        disabled.flags = sys::FWPM_FILTER_FLAG_DISABLED;
        assert_eq!(
            dynamic.filter::<layer::AleAuthConnectV4>(disabled),
            Err(Status::FWP_INVALID_FLAGS)
        );
    });
}

#[test]
fn a_write_waits_for_another_sessions_transaction() {
    let machine = Machine::new();
    // A session that waits at most 1 ms gives up while the other transaction stays open.
    machine.at_passive(|_| {
        let holder = open(true);
        // SAFETY: our handle.
        assert_eq!(unsafe { sys::FwpmTransactionBegin0(holder.0, 0) }, 0);
        // SAFETY: plain data, valid when zeroed.
        let mut impatient: sys::FWPM_SESSION0 = unsafe { core::mem::zeroed() };
        impatient.txnWaitTimeoutInMSec = 1;
        let mut handle = core::ptr::null_mut();
        assert_eq!(
            // SAFETY: valid arguments.
            unsafe {
                sys::FwpmEngineOpen0(
                    core::ptr::null(),
                    0xFFFF_FFFF,
                    core::ptr::null_mut(),
                    &impatient,
                    &mut handle,
                )
            },
            0
        );
        let impatient = Session(handle);
        assert_eq!(
            impatient.filter::<layer::AleAuthConnectV4>(FilterSpec::new(sys::FWP_ACTION_BLOCK)),
            Err(Status::FWP_TIMEOUT)
        );
        // SAFETY: our handle.
        assert_eq!(unsafe { sys::FwpmTransactionCommit0(holder.0) }, 0);
        assert!(
            impatient
                .filter::<layer::AleAuthConnectV4>(FilterSpec::new(sys::FWP_ACTION_BLOCK))
                .is_ok()
        );
    });
    // A session with the default wait proceeds once the transaction commits, whichever thread
    // runs first.
    let holder_handle = machine.at_passive(|_| {
        let holder = open(true);
        // SAFETY: our handle.
        assert_eq!(unsafe { sys::FwpmTransactionBegin0(holder.0, 0) }, 0);
        let handle = holder.0 as usize;
        std::mem::forget(holder);
        handle
    });
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            machine.at_passive(|_| {
                let session = open(true);
                session.filter::<layer::AleAuthConnectV4>(FilterSpec::new(sys::FWP_ACTION_BLOCK))
            })
        });
        machine.at_passive(|_| {
            // SAFETY: the holder's handle, closed here exactly once (its Session was forgotten).
            unsafe {
                assert_eq!(sys::FwpmTransactionCommit0(holder_handle as sys::HANDLE), 0);
                sys::FwpmEngineClose0(holder_handle as sys::HANDLE);
            }
        });
        assert!(waiter.join().unwrap().is_ok());
    });
}

// --- whole connections ---------------------------------------------------------------------------

fn outbound(port: u16) -> wfp_rs_sim::Connection {
    wfp_rs_sim::Connection {
        pid: 77,
        app: "\\device\\harddiskvolume3\\apps\\browser.exe".into(),
        protocol: IpProtocol::Tcp,
        local: "10.0.0.5:50000".parse().unwrap(),
        remote: format!("198.51.100.9:{port}").parse().unwrap(),
        direction: wfp_rs::metadata::Direction::Outbound,
    }
}

#[test]
fn an_outbound_connection_runs_the_layers_in_order_and_stops_at_a_block() {
    use wfp_rs_sim::AleIrql;
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let connect = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Permit),
    );
    let transport = register::<layer::OutboundTransportV4>(
        &machine,
        &driver,
        CALLOUT_B,
        Scripted::new(Script::Permit),
    );
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        session.callout::<layer::OutboundTransportV4>(CALLOUT_B);
        session
            .filter::<layer::AleAuthConnectV4>(FilterSpec::callout(CALLOUT_A))
            .unwrap();
        session
            .filter::<layer::OutboundTransportV4>(FilterSpec::callout(CALLOUT_B))
            .unwrap();
        let mut block = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        block.weight = 100;
        block.ports = vec![(sys::FWP_MATCH_EQUAL, 1234)];
        session.filter::<layer::AleAuthConnectV4>(block).unwrap();

        let allowed = machine.connect(&outbound(443), AleIrql::Passive);
        let names: Vec<&str> = allowed.layers.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "ALE_BIND_REDIRECT_V4",
                "ALE_RESOURCE_ASSIGNMENT_V4",
                "ALE_CONNECT_REDIRECT_V4",
                "ALE_AUTH_CONNECT_V4",
                "OUTBOUND_TRANSPORT_V4",
                "ALE_FLOW_ESTABLISHED_V4"
            ]
        );
        assert_eq!(allowed.decision.action, Action::Permit);
        assert!(allowed.flow_handle.is_some());

        let blocked = machine.connect(&outbound(1234), AleIrql::Dispatch);
        assert_eq!(blocked.decision.action, Action::Block);
        assert_eq!(
            blocked.layers.len(),
            4,
            "nothing after ALE_AUTH_CONNECT runs"
        );
        assert_eq!(blocked.flow_handle, None);
    });
    let at_connect = connect.callout().seen();
    assert_eq!(
        at_connect.len(),
        1,
        "the heavier static block decided the second connection first"
    );
    assert_eq!(at_connect[0].irql, Irql::PASSIVE);
    assert_eq!(at_connect[0].remote_port, Some(443));
    assert_eq!(at_connect[0].pid, Some(77));
    assert_eq!(
        at_connect[0].app.as_deref(),
        Some("\\device\\harddiskvolume3\\apps\\browser.exe")
    );
    let at_transport = transport.callout().seen();
    assert_eq!(at_transport.len(), 1);
    assert_eq!(
        at_transport[0].irql,
        Irql::DISPATCH,
        "transport layers run at DISPATCH_LEVEL"
    );
    unregister(&machine, &driver, connect);
    unregister(&machine, &driver, transport);
    machine.unload_driver(driver).unwrap();
}

#[test]
fn an_inbound_v6_connection_runs_transport_then_recv_accept() {
    use wfp_rs_sim::AleIrql;
    let machine = Machine::new();
    let mut connection = outbound(22);
    connection.direction = wfp_rs::metadata::Direction::Inbound;
    connection.local = "[2001:db8::5]:22".parse().unwrap();
    connection.remote = "[2001:db8::9]:50000".parse().unwrap();
    let outcome = machine.connect(&connection, AleIrql::Dispatch);
    let names: Vec<&str> = outcome.layers.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "INBOUND_TRANSPORT_V6",
            "ALE_AUTH_RECV_ACCEPT_V6",
            "ALE_FLOW_ESTABLISHED_V6"
        ]
    );
    assert_eq!(outcome.decision.action, Action::Permit);
}

// --- typed values at every layer, from whole connections ----------------------------------------

/// Records the typed local endpoint and protocol at any layer that has those fields.
struct Endpoints {
    seen: Mutex<Vec<(u16, std::net::IpAddr, u16, IpProtocol)>>,
}

impl<L: Layer> Callout<L> for Endpoints
where
    L::Address: Into<std::net::IpAddr>,
    fields::IpLocalAddress: layer::Field<L>,
    fields::IpLocalPort: layer::Field<L>,
    fields::IpProtocol: layer::Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let address = c
            .values
            .get::<fields::IpLocalAddress>()
            .expect("typed local address");
        let port = c
            .values
            .get::<fields::IpLocalPort>()
            .expect("typed local port");
        let protocol = c
            .values
            .get::<fields::IpProtocol>()
            .expect("typed protocol");
        self.seen
            .lock()
            .unwrap()
            .push((L::ID, address.into(), port, protocol));
        let _ = c.out.permit();
    }
}

#[test]
fn every_layer_delivers_the_connections_typed_values() {
    use wfp_rs::metadata::Direction;
    use wfp_rs_sim::{AleIrql, Connection};
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let session = std::cell::RefCell::new(None);
    macro_rules! watch {
        ($($layer:ident = $n:literal),*) => {{
            let mut registrations: Vec<Box<dyn core::any::Any>> = Vec::new();
            $(
                let key = Guid::from_fields(0x4000_0000 + $n, 0, 0, [0; 8]);
                let registration = driver
                    .run_in_driver(&machine, |irql, d| {
                        CalloutRegistration::<layer::$layer, _>::register(irql, d, CalloutKey::new(key), Endpoints { seen: Mutex::new(Vec::new()) }).unwrap()
                    })
                    .unwrap();
                machine.at_passive(|_| {
                    let mut slot = session.borrow_mut();
                    let engine = slot.get_or_insert_with(|| open(true));
                    engine.callout::<layer::$layer>(key);
                    let mut spec = FilterSpec::callout(key);
                    spec.action = sys::FWP_ACTION_CALLOUT_INSPECTION;
                    engine.filter::<layer::$layer>(spec).unwrap();
                });
                registrations.push(Box::new(registration));
            )*
            registrations
        }};
    }
    let registrations = watch!(
        AleAuthConnectV4 = 1,
        AleAuthConnectV6 = 2,
        AleAuthRecvAcceptV4 = 3,
        AleAuthRecvAcceptV6 = 4,
        AleFlowEstablishedV4 = 5,
        AleFlowEstablishedV6 = 6,
        OutboundTransportV4 = 7,
        OutboundTransportV6 = 8,
        InboundTransportV4 = 9,
        InboundTransportV6 = 10,
        AleEndpointClosureV4 = 11,
        AleEndpointClosureV6 = 12,
        AleConnectRedirectV4 = 13,
        AleConnectRedirectV6 = 14,
        AleResourceAssignmentV4 = 15,
        AleResourceAssignmentV6 = 16
    );
    let connections = [
        ("10.1.1.1:40001", "203.0.113.5:443", Direction::Outbound),
        (
            "[2001:db8::a]:40002",
            "[2001:db8::b]:443",
            Direction::Outbound,
        ),
        ("10.1.1.1:8080", "203.0.113.6:51000", Direction::Inbound),
        (
            "[2001:db8::a]:8081",
            "[2001:db8::c]:51001",
            Direction::Inbound,
        ),
    ];
    machine.at_passive(|_| {
        for (local, remote, direction) in connections {
            let connection = Connection {
                pid: 9,
                app: "\\device\\harddiskvolume1\\svc.exe".into(),
                protocol: IpProtocol::Tcp,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                direction,
            };
            let outcome = machine.connect(&connection, AleIrql::Dispatch);
            assert_eq!(outcome.decision.action, Action::Permit);
            let flow = outcome.flow_handle.expect("established");
            let opposite = if direction == Direction::Outbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            };
            assert_eq!(
                machine.packet(&connection, flow, opposite).action,
                Action::Permit
            );
            assert_eq!(machine.close(&connection).action, Action::Permit);
        }
        drop(session.borrow_mut().take());
    });
    // Every layer saw every connection that crosses it, with the connection's local endpoint.
    let mut total = 0;
    for registration in &registrations {
        let seen = if let Some(r) =
            registration.downcast_ref::<CalloutRegistration<layer::AleAuthConnectV4, Endpoints>>()
        {
            r.callout().seen.lock().unwrap().clone()
        } else {
            macro_rules! find {
                ($($layer:ident),*) => {{
                    let mut found = None;
                    $(
                        if let Some(r) = registration.downcast_ref::<CalloutRegistration<layer::$layer, Endpoints>>() {
                            found = Some(r.callout().seen.lock().unwrap().clone());
                        }
                    )*
                    found.expect("a registration of a known layer")
                }};
            }
            find!(
                AleAuthConnectV6,
                AleAuthRecvAcceptV4,
                AleAuthRecvAcceptV6,
                AleFlowEstablishedV4,
                AleFlowEstablishedV6,
                OutboundTransportV4,
                OutboundTransportV6,
                InboundTransportV4,
                InboundTransportV6,
                AleEndpointClosureV4,
                AleEndpointClosureV6,
                AleConnectRedirectV4,
                AleConnectRedirectV6,
                AleResourceAssignmentV4,
                AleResourceAssignmentV6
            )
        };
        assert!(!seen.is_empty(), "a layer saw nothing");
        for (layer_id, address, port, protocol) in &seen {
            let matching = connections.iter().any(|(local, _, _)| {
                let local: std::net::SocketAddr = local.parse().unwrap();
                local.ip() == *address && local.port() == *port
            });
            assert!(
                matching,
                "layer {layer_id} saw {address}:{port}, which is no connection's local endpoint"
            );
            assert_eq!(*protocol, IpProtocol::Tcp);
        }
        total += seen.len();
    }
    // Outbound: 5 layers + 1 inbound packet + closure; inbound: 3 layers + 1 outbound packet +
    // closure; for each IP version.
    assert_eq!(total, 2 * (5 + 1 + 1) + 2 * (3 + 1 + 1));
    // Dropped as the driver's own code would drop them: at PASSIVE_LEVEL, inside the machine.
    driver.run_in_driver(&machine, |_, _| drop(registrations));
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

/// The ALE identity values of one classification, as the raw structures held them.
#[derive(Clone, Debug, PartialEq)]
struct Identity {
    app_id: Vec<u8>,
    original_app_id: Vec<u8>,
    process_path: Vec<u8>,
    user_id: (sys::FWP_DATA_TYPE, Vec<u8>),
    package_id: (sys::FWP_DATA_TYPE, Vec<u8>),
}

/// Records the identity values it gets; if `scribble`, then overwrites every byte they point to,
/// as a careless driver could through the engine's `*mut` pointers.
struct IdentityReader {
    scribble: bool,
    seen: Mutex<Vec<Identity>>,
}

/// The bytes of a blob in the engine's structures, and a pointer to them.
///
/// # Safety
///
/// `blob` must be valid, holding `size` bytes at `data`.
unsafe fn blob_bytes(blob: *const sys::FWP_BYTE_BLOB) -> (*mut u8, Vec<u8>) {
    // SAFETY: valid per the contract.
    let blob = unsafe { *blob };
    // SAFETY: as above.
    let bytes = unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) };
    (blob.data, bytes.to_vec())
}

impl<L: Layer> Callout<L> for IdentityReader
where
    fields::AleAppId: layer::Field<L>,
    fields::AleOriginalAppId: layer::Field<L>,
    fields::AleUserId: layer::Field<L>,
    fields::AlePackageId: layer::Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let blob = |index: u32| {
            let value = c.values.raw_value(index).expect("the layer has the field");
            // SAFETY: the tag names the arm; every blob-like arm is a blob pointer the engine
            // keeps valid for the classification.
            let (data, bytes) = unsafe { blob_bytes(value.u.byteBlob) };
            (value.r#type, data, bytes)
        };
        let (_, app_data, app_id) = blob(<fields::AleAppId as layer::Field<L>>::INDEX);
        let (_, original_data, original_app_id) =
            blob(<fields::AleOriginalAppId as layer::Field<L>>::INDEX);
        let (user_type, user_data, user_bytes) =
            blob(<fields::AleUserId as layer::Field<L>>::INDEX);
        let package = c
            .values
            .raw_value(<fields::AlePackageId as layer::Field<L>>::INDEX)
            .unwrap();
        // SAFETY: a SID: its 8-byte header, then 4 bytes per sub-authority (count in byte 1).
        let package_bytes = unsafe {
            let sid = package.u.sid.cast::<u8>();
            core::slice::from_raw_parts(sid, 8 + 4 * usize::from(*sid.add(1))).to_vec()
        };
        let path = c.metadata.raw().processPath;
        // SAFETY: with the process-path bit set the engine passes a valid blob.
        let (path_data, process_path) = unsafe { blob_bytes(path) };
        if self.scribble {
            for (data, len) in [
                (app_data, app_id.len()),
                (original_data, original_app_id.len()),
                (user_data, user_bytes.len()),
                (path_data, process_path.len()),
            ] {
                // SAFETY: the engine's buffers of `len` bytes, writable (`*mut`), valid for the
                // classification.
                unsafe { core::ptr::write_bytes(data, 0xEE, len) };
            }
        }
        self.seen.lock().unwrap().push(Identity {
            app_id,
            original_app_id,
            process_path,
            user_id: (user_type, user_bytes),
            package_id: (package.r#type, package_bytes),
        });
    }
}

#[test]
fn a_connection_presents_its_identity_as_wfp_does_and_fresh_to_every_classification() {
    use wfp_rs_sim::{AleIrql, Connection};
    const APP: &str = "\\Device\\HarddiskVolume1\\ÄÖ\\x.exe";
    // Lower case, UTF-16LE, NUL-terminated.
    let expected: Vec<u8> = "\\device\\harddiskvolume1\\äö\\x.exe"
        .encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect();
    assert_eq!(wfp_rs_sim::app_id_bytes(APP), expected);

    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let reader = |scribble| IdentityReader {
        scribble,
        seen: Mutex::new(Vec::new()),
    };
    // The first ALE layer a connection crosses scribbles over its values; a later one reads.
    let (first, later) = driver
        .run_in_driver(&machine, |irql, d| {
            let first = CalloutRegistration::<layer::AleConnectRedirectV4, _>::register(
                irql,
                d,
                CalloutKey::new(CALLOUT_A),
                reader(true),
            )
            .unwrap();
            let later = CalloutRegistration::<layer::AleAuthConnectV4, _>::register(
                irql,
                d,
                CalloutKey::new(CALLOUT_B),
                reader(false),
            )
            .unwrap();
            (first, later)
        })
        .unwrap();
    let connection = |port: u16| Connection {
        pid: 31,
        app: APP.into(),
        protocol: IpProtocol::Tcp,
        local: "10.0.0.5:50001".parse().unwrap(),
        remote: format!("198.51.100.9:{port}").parse().unwrap(),
        direction: wfp_rs::metadata::Direction::Outbound,
    };
    machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::AleConnectRedirectV4>(CALLOUT_A);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_B);
        for (layer_filter, key) in [(0, CALLOUT_A), (1, CALLOUT_B)] {
            let mut spec = FilterSpec::callout(key);
            spec.action = sys::FWP_ACTION_CALLOUT_INSPECTION;
            match layer_filter {
                0 => session.filter::<layer::AleConnectRedirectV4>(spec),
                _ => session.filter::<layer::AleAuthConnectV4>(spec),
            }
            .unwrap();
        }
        // A static filter with a condition, at a layer no callout watches: its field values are
        // still there to match.
        let mut block = FilterSpec::new(sys::FWP_ACTION_BLOCK);
        block.ports = vec![(sys::FWP_MATCH_EQUAL, 8443)];
        session.filter::<layer::OutboundTransportV4>(block).unwrap();

        let permitted = machine.connect(&connection(443), AleIrql::Dispatch);
        assert_eq!(permitted.decision.action, Action::Permit);
        let blocked = machine.connect(&connection(8443), AleIrql::Dispatch);
        assert_eq!(blocked.decision.action, Action::Block);
        assert_eq!(
            blocked.layers.last().map(|(name, _)| *name),
            Some("OUTBOUND_TRANSPORT_V4")
        );
    });
    let pristine = Identity {
        app_id: expected.clone(),
        original_app_id: expected.clone(),
        process_path: expected.clone(),
        user_id: (sys::FWP_TOKEN_ACCESS_INFORMATION_TYPE, vec![0; 16]),
        // S-1-0-0: no AppContainer.
        package_id: (sys::FWP_SID, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    };
    let scribbled = first.callout().seen.lock().unwrap().clone();
    assert_eq!(scribbled, [pristine.clone(), pristine.clone()]);
    let read = later.callout().seen.lock().unwrap().clone();
    assert_eq!(
        read,
        [pristine.clone(), pristine],
        "each classification gets its own copies"
    );
    driver.run_in_driver(&machine, |_, _| drop((first, later)));
    machine.unload_driver(driver).unwrap();
}

// --- the filter a callout receives ---------------------------------------------------------------

/// Records the conditions of the filter that called it, decoded from the raw structures.
struct ConditionReader(Mutex<Vec<(u16, i32, i32, String)>>);

impl Callout<layer::AleAuthConnectV4> for ConditionReader {
    fn classify(
        &self,
        _irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::AleAuthConnectV4>,
    ) {
        let mut seen = Vec::new();
        for condition in c.filter.conditions() {
            let value = &condition.conditionValue;
            // Pointers are the engine's, valid for the classification.
            // SAFETY: each arm read is the one the tag names.
            let text = unsafe {
                match value.r#type {
                    sys::FWP_UINT16 => format!("{}", value.u.uint16),
                    sys::FWP_UINT8 => format!("{}", value.u.uint8),
                    sys::FWP_V4_ADDR_MASK => {
                        let mask = &*value.u.v4AddrMask;
                        format!("{}/{:#x}", Ipv4Addr::from(mask.addr), mask.mask)
                    }
                    sys::FWP_RANGE_TYPE => {
                        let range = &*value.u.rangeValue;
                        format!("{}..={}", range.valueLow.u.uint16, range.valueHigh.u.uint16)
                    }
                    other => format!("type {other}"),
                }
            };
            seen.push((condition.fieldId, condition.matchType, value.r#type, text));
        }
        *self.0.lock().unwrap() = seen;
        let _ = c.out.permit();
    }
}

#[test]
fn a_callout_receives_its_filters_conditions() {
    use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
    use wfp_rs::filter::{Filter, FilterAction, Match};
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let (registration, engine) = driver
        .run_in_driver(&machine, |irql, d| {
            let key = CalloutKey::<layer::AleAuthConnectV4>::new(CALLOUT_A);
            let registration = CalloutRegistration::register(
                irql,
                d,
                key,
                ConditionReader(Mutex::new(Vec::new())),
            )
            .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(key).name("reader"))
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::AleAuthConnectV4>::new(HIGH)
                        .name("reader")
                        .action(FilterAction::CalloutTerminating(key))
                        .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
                        .condition::<fields::IpRemoteAddress>(Match::AddressMask(
                            Ipv4Addr::new(192, 0, 2, 0),
                            24,
                        ))
                        .condition::<fields::IpRemotePort>(Match::Range(400, 500)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap();
    let decision = machine.classify(Irql::DISPATCH, &connect_v4(443));
    assert_eq!(decision.action, Action::Permit);
    let index = |name: &str| {
        layer::AleAuthConnectV4::FIELDS
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .index as u16
    };
    let mut seen = registration.callout().0.lock().unwrap().clone();
    seen.sort();
    let mut expected = vec![
        (
            index("IpProtocol"),
            sys::FWP_MATCH_EQUAL,
            sys::FWP_UINT8,
            "6".to_string(),
        ),
        (
            index("IpRemoteAddress"),
            sys::FWP_MATCH_EQUAL,
            sys::FWP_V4_ADDR_MASK,
            "192.0.2.0/0xffffff00".to_string(),
        ),
        (
            index("IpRemotePort"),
            sys::FWP_MATCH_RANGE,
            sys::FWP_RANGE_TYPE,
            "400..=500".to_string(),
        ),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    driver.run_in_driver(&machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn a_direct_classify_reaches_the_callout_as_the_engine_does() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = register::<layer::AleAuthConnectV4>(
        &machine,
        &driver,
        CALLOUT_A,
        Scripted::new(Script::Block),
    );
    // `run`, not `at_passive`: the classifications below run at DISPATCH_LEVEL on this thread,
    // where a PASSIVE_LEVEL token of this scope would prove nothing.
    machine.run(|| {
        let session = open(true);
        session.callout::<layer::AleAuthConnectV4>(CALLOUT_A);
        // No filter calls the callout yet: nothing to prepare.
        assert!(
            machine
                .direct_classify(CalloutKey::new(CALLOUT_A), &connect_v4(443))
                .is_err()
        );
        let mut spec = FilterSpec::callout(CALLOUT_A);
        spec.context = 0xC0FFEE;
        session.filter::<layer::AleAuthConnectV4>(spec).unwrap();
        let request = connect_v4(443);
        let mut direct = machine
            .direct_classify(CalloutKey::new(CALLOUT_A), &request)
            .unwrap();
        // The prepared classification owns copies of what it hands the callout.
        drop(request);
        for _ in 0..3 {
            assert_eq!(machine.at_dispatch(|irql| direct.call(irql)), Action::Block);
        }
        // Released, or unregistration would wait for it.
        drop(direct);
        let decision = machine.classify(Irql::DISPATCH, &connect_v4(443));
        assert_eq!(decision.action, Action::Block);
        drop(session);
    });
    // What the callout saw directly is what a classification through the engine shows it: the
    // filter and its context, the fields, the process, the IRQL, the write right.
    let seen = registration.callout().seen();
    assert_eq!(seen.len(), 4);
    for direct in &seen[..3] {
        assert_eq!(*direct, seen[3]);
    }
    assert_eq!(seen[3].filter_context, 0xC0FFEE);
    assert_eq!(seen[3].pid, Some(4242));
    assert_eq!(seen[3].remote_port, Some(443));
    unregister(&machine, &driver, registration);
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
}

// --- typed values at the layers beyond ALE and transport -----------------------------------------

/// Records what a stream, datagram or ICMP-error classification carries, read by typed field.
#[derive(Default)]
struct Carried {
    seen: Mutex<Vec<(u16, std::net::IpAddr, u16, u32)>>,
}

/// The stream and datagram layers: remote endpoint and direction.
impl<L: Layer> Callout<L> for Carried
where
    L::Address: Into<std::net::IpAddr>,
    fields::IpRemoteAddress: layer::Field<L>,
    fields::IpRemotePort: layer::Field<L>,
    fields::Direction: layer::Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let address = c.values.get::<fields::IpRemoteAddress>().expect("address");
        let port = c.values.get::<fields::IpRemotePort>().expect("port");
        let direction = c.values.get::<fields::Direction>().expect("direction");
        self.seen
            .lock()
            .unwrap()
            .push((L::ID, address.into(), port, direction));
        let _ = c.out.block();
    }
}

/// Registers `Carried` at `L` with a terminating callout filter, classifies `request` there and
/// returns the decision and what the callout read.
fn carried_at<L: Layer>(
    request: &ClassifyRequest<L>,
) -> (Action, Vec<(u16, std::net::IpAddr, u16, u32)>)
where
    Carried: Callout<L>,
{
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = driver
        .run_in_driver(&machine, |irql, d| {
            CalloutRegistration::<L, _>::register(
                irql,
                d,
                CalloutKey::new(CALLOUT_A),
                Carried::default(),
            )
            .unwrap()
        })
        .unwrap();
    let action = machine.at_passive(|_| {
        let session = open(true);
        session.callout::<L>(CALLOUT_A);
        session.filter::<L>(FilterSpec::callout(CALLOUT_A)).unwrap();
        machine.classify(Irql::DISPATCH, request).action
    });
    let seen = registration.callout().seen.lock().unwrap().clone();
    driver
        .run_in_driver(&machine, |irql, _| {
            registration
                .unregister(irql)
                .map_err(|(_, s)| s)
                .expect("unregisters")
        })
        .expect("an SDK driver");
    machine.unload_driver(driver).unwrap();
    (action, seen)
}

#[test]
fn a_stream_classification_carries_its_typed_fields() {
    let remote: Ipv4Addr = "198.51.100.7".parse().unwrap();
    let request = ClassifyRequest::<layer::StreamV4>::new()
        .with::<fields::IpRemoteAddress>(remote)
        .with::<fields::IpRemotePort>(443u16)
        .with::<fields::Direction>(sys::FWP_DIRECTION_INBOUND as u32);
    let (action, seen) = carried_at(&request);
    assert_eq!(action, Action::Block);
    assert_eq!(seen, [(20, remote.into(), 443, 1)]);
}

#[test]
fn datagram_layers_carry_their_typed_fields_at_both_versions_and_at_discard() {
    let remote: Ipv4Addr = "192.0.2.33".parse().unwrap();
    let request = ClassifyRequest::<layer::DatagramDataV4>::new()
        .with::<fields::IpRemoteAddress>(remote)
        .with::<fields::IpRemotePort>(53u16)
        .with::<fields::Direction>(0u32);
    let (action, seen) = carried_at(&request);
    assert_eq!(action, Action::Block);
    assert_eq!(seen, [(24, remote.into(), 53, 0)]);

    let remote: Ipv6Addr = "2001:db8::53".parse().unwrap();
    let request = ClassifyRequest::<layer::DatagramDataV6Discard>::new()
        .with::<fields::IpRemoteAddress>(remote)
        .with::<fields::IpRemotePort>(5353u16)
        .with::<fields::Direction>(1u32);
    let (_, seen) = carried_at(&request);
    assert_eq!(seen, [(27, remote.into(), 5353, 1)]);
}

/// Records what a frame classification carries: the Ethernet type, the VLAN tag and the interface.
#[derive(Default)]
struct Frames {
    seen: Mutex<Vec<(u16, u16, u16, u64)>>,
}

impl<L: Layer> Callout<L> for Frames
where
    fields::EtherType: layer::Field<L>,
    fields::VlanId: layer::Field<L>,
    fields::IpLocalInterface: layer::Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let ether_type = c.values.get::<fields::EtherType>().expect("ether type");
        let vlan = c.values.get::<fields::VlanId>().expect("vlan");
        let interface = c
            .values
            .get::<fields::IpLocalInterface>()
            .expect("interface");
        self.seen
            .lock()
            .unwrap()
            .push((L::ID, ether_type, vlan, interface));
        let _ = c.out.block();
    }
}

#[test]
fn a_mac_frame_classification_carries_its_typed_fields() {
    // A layer without an IP version: registration, filter and classification work as at any
    // other layer, and its frame fields read typed.
    assert_eq!(<layer::InboundMacFrameEthernet as Layer>::IP_VERSION, None);
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let registration = driver
        .run_in_driver(&machine, |irql, d| {
            CalloutRegistration::<layer::InboundMacFrameEthernet, _>::register(
                irql,
                d,
                CalloutKey::new(CALLOUT_A),
                Frames::default(),
            )
            .unwrap()
        })
        .unwrap();
    let action = machine.at_passive(|_| {
        let session = open(true);
        session.callout::<layer::InboundMacFrameEthernet>(CALLOUT_A);
        session
            .filter::<layer::InboundMacFrameEthernet>(FilterSpec::callout(CALLOUT_A))
            .unwrap();
        let request = ClassifyRequest::<layer::InboundMacFrameEthernet>::new()
            .with::<fields::EtherType>(0x86DDu16)
            .with::<fields::VlanId>(42u16)
            .with::<fields::IpLocalInterface>(0x0006_0000_0100_0000u64);
        machine.classify(Irql::DISPATCH, &request).action
    });
    assert_eq!(action, Action::Block);
    assert_eq!(
        *registration.callout().seen.lock().unwrap(),
        [(56, 0x86DD, 42, 0x0006_0000_0100_0000)]
    );
    driver
        .run_in_driver(&machine, |irql, _| {
            registration
                .unregister(irql)
                .map_err(|(_, s)| s)
                .expect("unregisters")
        })
        .expect("an SDK driver");
    machine.unload_driver(driver).unwrap();
}
