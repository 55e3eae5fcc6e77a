//! Packets in classifications: the simulator hands callouts a real NET_BUFFER_LIST at the
//! layers that carry one, with the data start where Microsoft's "Data offset positions" table
//! puts it, and the callout reads the connection's ports out of the bytes — across MDLs.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::{Arc, Mutex};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{self, DataStart, Layer, LayerData, PacketLayer, value::IpProtocol};
use wfp_rs::metadata::Direction;
use wfp_rs::packet::PacketError;
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

/// What a callout read from the packet of one classification.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// (source port, destination port) of the transport header.
    ports: Result<(u16, u16), PacketError>,
    /// The IP header's first byte and protocol, where the IP header is behind the data start.
    ip: Option<Result<(u8, u8), PacketError>>,
    /// The data length of the first net buffer.
    data_length: u32,
    /// How many net buffers the list has.
    net_buffers: usize,
}

/// Reads the transport header's ports out of the packet, wherever the layer's data starts.
#[derive(Default)]
struct PortReader {
    seen: Arc<Mutex<Vec<Option<Seen>>>>,
}

impl<L: PacketLayer> Callout<L> for PortReader {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let seen = c.packet().and_then(|packet| {
            let first = packet.first()?;
            let ip_size = c.metadata.ip_header_size().unwrap_or(0);
            let transport_size = c.metadata.transport_header_size().unwrap_or(0);
            let mut ports = [0u8; 4];
            let (ports, ip) = match L::DATA {
                // Past both headers: the transport header is `transport_size` bytes behind,
                // the IP header `ip_size` more.
                LayerData::Packet(DataStart::Payload | DataStart::ByDirection)
                    if c.metadata.direction() == Some(Direction::Inbound) =>
                {
                    let ports = first
                        .read_behind(transport_size, &mut ports)
                        .map(|()| ports);
                    let mut ip = [0u8; 10];
                    let ip = first
                        .read_behind(ip_size + transport_size, &mut ip)
                        .map(|()| (ip[0], ip[if ip[0] >> 4 == 4 { 9 } else { 6 }]));
                    (ports, Some(ip))
                }
                _ => (first.read(0, &mut ports).map(|()| ports), None),
            };
            Some(Seen {
                ports: ports.map(|p| {
                    (
                        u16::from_be_bytes([p[0], p[1]]),
                        u16::from_be_bytes([p[2], p[3]]),
                    )
                }),
                ip,
                data_length: first.len(),
                net_buffers: packet.net_buffers().count(),
            })
        });
        wfp_rs_sim::as_harness(|| self.seen.lock().unwrap().push(seen));
        let _ = c.out.permit();
    }
}

/// Registers a [`PortReader`] at `L` with a filter calling it; returns what it will see.
fn with_reader<L: PacketLayer>(
    machine: &Machine,
    test: impl FnOnce(&Machine),
) -> Vec<Option<Seen>> {
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&seen);
    let (registration, engine) = driver
        .run_in_driver(machine, move |irql, d| {
            let key = CalloutKey::<L>::new(CALLOUT);
            let registration = CalloutRegistration::register(
                irql,
                d,
                key,
                wfp_rs_sim::as_harness(|| PortReader { seen: shared }),
            )
            .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(key).name("ports"))
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<L>::new(FILTER)
                        .name("ports")
                        .action(FilterAction::CalloutInspection(key)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap();
    test(machine);
    driver.run_in_driver(machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
    seen.lock().unwrap().clone()
}

fn connection(protocol: IpProtocol, local: &str, remote: &str, direction: Direction) -> Connection {
    Connection {
        pid: 7,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        direction,
    }
}

#[test]
fn inbound_transport_v4_reads_the_ports_and_the_ip_header_behind_the_data() {
    let conn = connection(
        IpProtocol::Tcp,
        "10.0.0.1:8080",
        "192.0.2.7:50123",
        Direction::Inbound,
    );
    let machine = Machine::new();
    let seen = with_reader::<layer::InboundTransportV4>(&machine, |machine| {
        machine.connect(&conn, AleIrql::Passive);
    });
    assert_eq!(
        seen,
        [Some(Seen {
            // The SYN travels from the remote end to the local one.
            ports: Ok((50123, 8080)),
            ip: Some(Ok((0x45, 6))),
            data_length: 0,
            net_buffers: 1,
        })]
    );
}

#[test]
fn ale_auth_recv_accept_v4_sees_the_same_packet() {
    let conn = connection(
        IpProtocol::Udp,
        "10.0.0.1:53",
        "192.0.2.9:40000",
        Direction::Inbound,
    );
    let machine = Machine::new();
    let seen = with_reader::<layer::AleAuthRecvAcceptV4>(&machine, |machine| {
        machine.connect(&conn, AleIrql::Dispatch);
    });
    assert_eq!(
        seen,
        [Some(Seen {
            ports: Ok((40000, 53)),
            ip: Some(Ok((0x45, 17))),
            data_length: 0,
            net_buffers: 1,
        })]
    );
}

#[test]
fn outbound_transport_v6_starts_at_the_transport_header() {
    let conn = connection(
        IpProtocol::Tcp,
        "[2001:db8::1]:41000",
        "[2001:db8::2]:443",
        Direction::Outbound,
    );
    let machine = Machine::new();
    let seen = with_reader::<layer::OutboundTransportV6>(&machine, |machine| {
        let flow = machine
            .connect(&conn, AleIrql::Passive)
            .flow_handle
            .expect("established");
        machine.packet(&conn, flow, Direction::Outbound);
    });
    let syn = Some(Seen {
        ports: Ok((41000, 443)),
        ip: None,
        // The SYN's TCP header, from the data start.
        data_length: 20,
        net_buffers: 1,
    });
    assert_eq!(seen, [syn.clone(), syn]);
}

#[test]
fn tcp_at_ale_auth_connect_has_no_packet_and_udp_has_one() {
    let tcp = connection(
        IpProtocol::Tcp,
        "10.0.0.1:41000",
        "192.0.2.1:443",
        Direction::Outbound,
    );
    let udp = connection(
        IpProtocol::Udp,
        "10.0.0.1:41001",
        "192.0.2.1:53",
        Direction::Outbound,
    );
    let machine = Machine::new();
    let seen = with_reader::<layer::AleAuthConnectV4>(&machine, |machine| {
        machine.connect(&tcp, AleIrql::Passive);
        machine.connect(&udp, AleIrql::Passive);
    });
    assert_eq!(
        seen,
        [
            None,
            Some(Seen {
                ports: Ok((41001, 53)),
                ip: None,
                data_length: 8,
                net_buffers: 1,
            })
        ]
    );
}

#[test]
fn reading_past_the_data_is_an_error() {
    struct PastTheEnd(Arc<Mutex<Vec<PacketError>>>);
    impl Callout<layer::OutboundTransportV4> for PastTheEnd {
        fn classify(
            &self,
            _irql: &mut DispatchLevel<'_>,
            c: &mut Classify<'_, layer::OutboundTransportV4>,
        ) {
            let first = c.packet().and_then(|p| p.first()).expect("a packet");
            let mut errors = Vec::new();
            errors.extend(first.read(16, &mut [0; 8]).err());
            errors.extend(first.read_behind(1, &mut [0; 1]).err());
            wfp_rs_sim::as_harness(|| self.0.lock().unwrap().extend(errors));
        }
    }
    let machine = Machine::new();
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&errors);
    let (registration, engine) = driver
        .run_in_driver(&machine, move |irql, d| {
            let key = CalloutKey::<layer::OutboundTransportV4>::new(CALLOUT);
            let registration = CalloutRegistration::register(
                irql,
                d,
                key,
                wfp_rs_sim::as_harness(|| PastTheEnd(shared)),
            )
            .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine.add_callout(irql, &CalloutEntry::new(key)).unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<layer::OutboundTransportV4>::new(FILTER)
                        .action(FilterAction::CalloutInspection(key)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap();
    let conn = connection(
        IpProtocol::Tcp,
        "10.0.0.1:41000",
        "192.0.2.1:443",
        Direction::Outbound,
    );
    machine.connect(&conn, AleIrql::Passive);
    driver.run_in_driver(&machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert_eq!(
        *errors.lock().unwrap(),
        [
            PacketError::OutOfRange {
                offset: 16,
                len: 8,
                data_length: 20
            },
            // Outbound, nothing lies behind the transport header yet.
            PacketError::BeforeChain {
                back: 1,
                data_offset: 0
            },
        ]
    );
}

#[test]
fn the_layer_tables_say_what_layer_data_is() {
    assert_eq!(
        layer::InboundTransportV4::DATA,
        LayerData::Packet(DataStart::Payload)
    );
    assert_eq!(
        layer::OutboundTransportV6::DATA,
        LayerData::Packet(DataStart::TransportHeader)
    );
    assert_eq!(layer::StreamV4::DATA, LayerData::Stream);
    assert_eq!(layer::AleConnectRedirectV4::DATA, LayerData::ConnectRequest);
    assert_eq!(layer::AleResourceAssignmentV6::DATA, LayerData::None);
    assert_eq!(
        layer::layer_by_id(layer::AleAuthRecvAcceptV4::ID)
            .unwrap()
            .data,
        LayerData::Packet(DataStart::ByDirection)
    );
}

#[test]
fn inbound_transport_v6_has_the_ipv6_header_behind_the_data() {
    let conn = connection(
        IpProtocol::Udp,
        "[2001:db8::1]:5353",
        "[2001:db8::9]:60000",
        Direction::Inbound,
    );
    let machine = Machine::new();
    let seen = with_reader::<layer::InboundTransportV6>(&machine, |machine| {
        machine.connect(&conn, AleIrql::Passive);
    });
    assert_eq!(
        seen,
        [Some(Seen {
            ports: Ok((60000, 5353)),
            // Version 6 in the first nibble; next header UDP.
            ip: Some(Ok((0x60, 17))),
            data_length: 0,
            net_buffers: 1,
        })]
    );
}
