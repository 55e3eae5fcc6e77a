//! Network and forward injection: a packet cloned at INBOUND_IPPACKET, OUTBOUND_IPPACKET or
//! IPFORWARD, the original absorbed, the clone injected back with a handle of the right kind;
//! the stack gets the whole IP packet, the SDK's completion routine frees the clone, and a
//! handle of the wrong IP version is refused with the clone handed back.

#![cfg(any(not(windows), feature = "sim"))]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::callout::{Callout, CalloutKey, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::inject::{Forward, InjectionHandle, InjectionState, Network};
use wfp_rs::irql::{DispatchLevel, Irql, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{self, IpVersion, fields};
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::bugcheck_test;
use wfp_rs_sim::{ClassifyRequest, LoadedDriver, Machine};
use wfp_rs_tests::install::install;

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const FILTER: Guid = guid!("63000000-0000-0000-0000-000000000002");

fn source() -> SocketAddr {
    "192.0.2.7:50000".parse().unwrap()
}

fn destination() -> SocketAddr {
    "10.0.0.1:443".parse().unwrap()
}

/// The IPv4 header the simulator builds for [`source`] → [`destination`], TCP, and the SYN:
/// 20 + 20 bytes, version 4.
fn is_the_whole_ip_packet(packet: &[u8]) -> bool {
    packet.len() == 40 && packet[0] >> 4 == 4 && packet[9] == 6 && packet[12..16] == [192, 0, 2, 7]
}

/// Absorbs every packet it did not inject and injects a clone of it with a network handle;
/// what each injection returned is kept.
struct NetworkReinjector {
    handle: InjectionHandle<Network>,
    results: Mutex<Vec<Result<(), Status>>>,
    /// Its own injections, indicated to it again and permitted.
    own: AtomicU32,
}

impl Callout<layer::InboundIpPacketV4> for NetworkReinjector {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::InboundIpPacketV4>,
    ) {
        if c.injection_state(irql, &self.handle) == InjectionState::InjectedBySelf {
            self.own.fetch_add(1, Ordering::SeqCst);
            let _ = c.out.permit();
            return;
        }
        let clone = c
            .clone_for_network_receive(irql)
            .expect("an inbound IP packet to clone");
        c.out.block();
        let result = clone.inject(irql, &self.handle).map_err(|e| e.status);
        self.results.lock().unwrap().push(result);
    }
}

impl Callout<layer::OutboundIpPacketV4> for NetworkReinjector {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::OutboundIpPacketV4>,
    ) {
        if c.injection_state(irql, &self.handle) == InjectionState::InjectedBySelf {
            self.own.fetch_add(1, Ordering::SeqCst);
            let _ = c.out.permit();
            return;
        }
        let clone = c
            .clone_for_network_send(irql)
            .expect("an outbound IP packet to clone");
        c.out.block();
        let result = clone.inject(irql, &self.handle).map_err(|e| {
            // The clone comes back; dropping it frees it.
            drop(e.packet);
            e.status
        });
        self.results.lock().unwrap().push(result);
    }
}

/// The same at IPFORWARD, with a forward handle.
struct ForwardReinjector {
    handle: InjectionHandle<Forward>,
    results: Mutex<Vec<Result<(), Status>>>,
}

impl Callout<layer::IpForwardV4> for ForwardReinjector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, layer::IpForwardV4>) {
        let clone = c
            .clone_for_forward(irql)
            .expect("a forwarded packet to clone");
        c.out.block();
        let result = clone.inject(irql, &self.handle).map_err(|e| e.status);
        self.results.lock().unwrap().push(result);
    }
}

fn network_handle(
    machine: &Machine,
    driver: &LoadedDriver,
    version: IpVersion,
) -> InjectionHandle<Network> {
    driver
        .run_in_driver(machine, |irql, _| InjectionHandle::network(irql, version))
        .expect("an SDK driver")
        .expect("creates the handle")
}

#[test]
fn an_inbound_ip_packet_is_cloned_from_its_ip_header_and_injected_into_the_receive_path() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let handle = network_handle(&machine, &driver, IpVersion::V4);
    let installed = install(
        &machine,
        &driver,
        CalloutKey::<layer::InboundIpPacketV4>::new(guid!("63000000-0000-0000-0000-000000000001")),
        FILTER,
        |_| NetworkReinjector {
            handle,
            results: Mutex::default(),
            own: AtomicU32::new(0),
        },
    );
    let request = ClassifyRequest::<layer::InboundIpPacketV4>::new()
        .with::<fields::InterfaceIndex>(7u32)
        .with::<fields::SubInterfaceIndex>(1u32)
        .with_packet(IpProtocol::Tcp, source(), destination());
    let decision = machine.classify(Irql::DISPATCH, &request);
    assert_eq!(decision.action, Action::Block, "the original is absorbed");
    assert_eq!(*installed.callout().results.lock().unwrap(), [Ok(())]);
    let injected = machine.injected_packets();
    assert_eq!(injected.len(), 1);
    assert_eq!(injected[0].routine, "FwpsInjectNetworkReceiveAsync0");
    assert_eq!(injected[0].status.raw(), 0, "delivered");
    assert!(
        is_the_whole_ip_packet(&injected[0].packet),
        "the clone starts at the IP header the layer's data start is past: {:?}",
        injected[0].packet
    );
    assert_eq!(
        (
            injected[0].reindicated,
            installed.callout().own.load(Ordering::SeqCst)
        ),
        (Some(Action::Permit), 1),
        "the injected packet was indicated to INBOUND_IPPACKET again, recognised and permitted"
    );
    installed.remove(&machine, &driver);
    // Unloading checks that the clone was freed (the SDK's completion routine) and the handle
    // destroyed (dropped with the callout, at PASSIVE_LEVEL).
    machine.unload_driver(driver).unwrap();
}

#[test]
fn an_outbound_ip_packet_is_injected_into_the_send_path_and_a_handle_of_the_other_version_is_refused()
 {
    for (version, expected) in [
        (IpVersion::V4, Ok(())),
        (IpVersion::V6, Err(Status::INVALID_PARAMETER)),
    ] {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let handle = network_handle(&machine, &driver, version);
        let installed = install(
            &machine,
            &driver,
            CalloutKey::<layer::OutboundIpPacketV4>::new(guid!(
                "63000000-0000-0000-0000-000000000003"
            )),
            FILTER,
            |_| NetworkReinjector {
                handle,
                results: Mutex::default(),
                own: AtomicU32::new(0),
            },
        );
        let request = ClassifyRequest::<layer::OutboundIpPacketV4>::new().with_packet(
            IpProtocol::Tcp,
            source(),
            destination(),
        );
        machine.classify(Irql::DISPATCH, &request);
        assert_eq!(*installed.callout().results.lock().unwrap(), [expected]);
        let injected = machine.injected_packets();
        match expected {
            Ok(()) => {
                assert_eq!(injected.len(), 1, "{version:?}");
                assert_eq!(injected[0].routine, "FwpsInjectNetworkSendAsync0");
                assert!(is_the_whole_ip_packet(&injected[0].packet));
                assert_eq!(injected[0].reindicated, Some(Action::Permit));
                assert_eq!(installed.callout().own.load(Ordering::SeqCst), 1);
            }
            // Refused before the stack took it: the clone came back and was freed by the
            // callout (else the unload below would stop).
            Err(_) => assert!(injected.is_empty(), "{injected:?}"),
        }
        installed.remove(&machine, &driver);
        machine.unload_driver(driver).unwrap();
    }
}

#[test]
fn a_forwarded_packet_is_injected_into_the_forwarding_path() {
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let handle = driver
        .run_in_driver(&machine, |irql, _| InjectionHandle::forward(irql, None))
        .expect("an SDK driver")
        .expect("creates the handle");
    let installed = install(
        &machine,
        &driver,
        CalloutKey::<layer::IpForwardV4>::new(guid!("63000000-0000-0000-0000-000000000004")),
        FILTER,
        |_| ForwardReinjector {
            handle,
            results: Mutex::default(),
        },
    );
    let request = ClassifyRequest::<layer::IpForwardV4>::new()
        .with::<fields::DestinationInterfaceIndex>(3u32)
        .with_packet(IpProtocol::Tcp, source(), destination());
    let decision = machine.classify(Irql::DISPATCH, &request);
    assert_eq!(decision.action, Action::Block);
    assert_eq!(*installed.callout().results.lock().unwrap(), [Ok(())]);
    let injected = machine.injected_packets();
    assert_eq!(injected.len(), 1);
    assert_eq!(injected[0].routine, "FwpsInjectForwardAsync0");
    assert!(is_the_whole_ip_packet(&injected[0].packet));
    assert_eq!(
        injected[0].reindicated, None,
        "a forward-injected packet is not classified again"
    );
    installed.remove(&machine, &driver);
    machine.unload_driver(driver).unwrap();
}

/// Injects every packet it sees, its own injections included: on Windows a loop for ever.
struct Loops {
    handle: InjectionHandle<Network>,
}

impl Callout<layer::OutboundIpPacketV4> for Loops {
    fn classify(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, layer::OutboundIpPacketV4>,
    ) {
        if let Ok(clone) = c.clone_for_network_send(irql) {
            c.out.block();
            let _ = clone.inject(irql, &self.handle);
        }
    }
}

bugcheck_test! {
    /// A callout that does not recognise its own network injections injects each again.
    fn injecting_its_own_injections_again_stops_as_a_loop() expects WFP_INVALID_OPERATION (0x8000_0013) {
        let machine = Machine::new();
        let driver = machine.load_driver("host", host::DriverEntry).unwrap();
        let handle = network_handle(&machine, &driver, IpVersion::V4);
        let _installed = install(
            &machine,
            &driver,
            CalloutKey::<layer::OutboundIpPacketV4>::new(guid!(
                "63000000-0000-0000-0000-000000000005"
            )),
            FILTER,
            |_| Loops { handle },
        );
        let request = ClassifyRequest::<layer::OutboundIpPacketV4>::new().with_packet(
            IpProtocol::Tcp,
            source(),
            destination(),
        );
        machine.classify(Irql::DISPATCH, &request);
    }
}
