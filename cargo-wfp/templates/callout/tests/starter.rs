//! The starter driver in the simulator: the connections it logs, the one it blocks, how it
//! defers to a heavier sublayer's hard permit, and a clean unload.

#![cfg(any(not(windows), feature = "sim"))]

use core::net::{Ipv4Addr, Ipv6Addr};

use wfp_rs::classify::Action;
use wfp_rs::engine::{Engine, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, FilterFlags};
use wfp_rs::irql::Irql;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6, Layer, fields};
use wfp_rs::metadata::Direction;
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{AleIrql, ClassifyRequest, Connection, Decision, Machine};

const CURL: &str = r"\device\harddiskvolume3\windows\system32\curl.exe";
const PID: u64 = 4242;
const LOADED: &str = "starter: watching outbound TCP connections, blocking port 1234\n";

fn remote_v4() -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 7)
}

fn remote_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)
}

fn connect_v4(protocol: IpProtocol, port: u16) -> ClassifyRequest<AleAuthConnectV4> {
    ClassifyRequest::new()
        .with::<fields::IpProtocol>(protocol)
        .with::<fields::IpRemoteAddress>(remote_v4())
        .with::<fields::IpRemotePort>(port)
        .with::<fields::AleAppId>(CURL)
        .process(PID, CURL)
}

fn connect_v6(protocol: IpProtocol, port: u16) -> ClassifyRequest<AleAuthConnectV6> {
    ClassifyRequest::new()
        .with::<fields::IpProtocol>(protocol)
        .with::<fields::IpRemoteAddress>(remote_v6())
        .with::<fields::IpRemotePort>(port)
        .with::<fields::AleAppId>(CURL)
        .process(PID, CURL)
}

/// What the engine decides when no filter matches: permit, and no callout is called.
const UNFILTERED: Decision = Decision {
    action: Action::Permit,
    hard: false,
    vetoed: false,
    absorbed: false,
    filter_id: None,
    pending: None,
};

/// The debug output since `from`.
fn output_since(machine: &Machine, from: usize) -> Vec<String> {
    machine.debug_output().split_off(from)
}

/// The line the starter logs for curl's connection to `remote`.
fn line(remote: &str, verdict: &str) -> String {
    format!("starter: pid {PID} {CURL} -> {remote}: {verdict}\n")
}

#[test]
fn logs_tcp_connections_and_blocks_port_1234_over_both_ip_versions() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("starter", starter::DriverEntry)
        .expect("loads");
    assert_eq!(machine.debug_output(), [LOADED]);

    let blocked = machine.classify(Irql::DISPATCH, &connect_v4(IpProtocol::Tcp, 1234));
    assert_eq!(blocked.action, Action::Block);
    assert!(blocked.hard, "a callout's block is hard");
    assert!(!blocked.vetoed, "nothing was permitted hard before it");
    assert!(blocked.filter_id.is_some());

    let permitted = machine.classify(Irql::PASSIVE, &connect_v4(IpProtocol::Tcp, 443));
    assert_eq!(permitted.action, Action::Permit);
    assert!(!permitted.hard, "the starter permits soft");
    assert_eq!(permitted.filter_id, blocked.filter_id, "the same filter");

    let udp = machine.classify(Irql::DISPATCH, &connect_v4(IpProtocol::Udp, 1234));
    assert_eq!(udp, UNFILTERED, "no filter matches UDP");

    let blocked_v6 = machine.classify(Irql::DISPATCH, &connect_v6(IpProtocol::Tcp, 1234));
    assert_eq!((blocked_v6.action, blocked_v6.hard), (Action::Block, true));
    assert_ne!(
        blocked_v6.filter_id, blocked.filter_id,
        "the IPv6 layer has its own filter"
    );
    let permitted_v6 = machine.classify(Irql::PASSIVE, &connect_v6(IpProtocol::Tcp, 443));
    assert_eq!(permitted_v6.action, Action::Permit);
    let udp_v6 = machine.classify(Irql::DISPATCH, &connect_v6(IpProtocol::Udp, 1234));
    assert_eq!((udp_v6.action, udp_v6.filter_id), (Action::Permit, None));

    assert_eq!(
        machine.debug_output()[1],
        "starter: pid 4242 \\device\\harddiskvolume3\\windows\\system32\\curl.exe -> 192.0.2.7:1234: blocked\n"
    );
    assert_eq!(
        output_since(&machine, 1),
        [
            line("192.0.2.7:1234", "blocked"),
            line("192.0.2.7:443", "permitted"),
            line("[2001:db8::7]:1234", "blocked"),
            line("[2001:db8::7]:443", "permitted"),
        ],
        "one line per TCP connection, none for UDP"
    );

    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), []);
    assert_eq!(
        machine.debug_output().len(),
        5,
        "unload reports no error: {:?}",
        machine.debug_output()
    );
    assert_eq!(
        machine.classify(Irql::DISPATCH, &connect_v4(IpProtocol::Tcp, 1234)),
        UNFILTERED,
        "unload deleted the filters"
    );
}

/// A whole connection through the network stack's layers: the block happens at
/// ALE_AUTH_CONNECT, so the connection never reaches the transport layer.
#[test]
fn a_blocked_connection_stops_at_ale_auth_connect() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("starter", starter::DriverEntry)
        .expect("loads");
    let curl = |port| Connection {
        pid: PID,
        app: CURL.to_owned(),
        protocol: IpProtocol::Tcp,
        local: "192.0.2.1:50000".parse().unwrap(),
        remote: (remote_v4(), port).into(),
        direction: Direction::Outbound,
    };

    let blocked = machine.connect(&curl(1234), AleIrql::Dispatch);
    assert_eq!(blocked.decision.action, Action::Block);
    let (last, _) = blocked.layers.last().expect("a layer ran");
    assert_eq!(*last, AleAuthConnectV4::NAME);
    assert_eq!(blocked.flow_handle, None);

    let permitted = machine.connect(&curl(443), AleIrql::Passive);
    assert_eq!(permitted.decision.action, Action::Permit);
    assert!(
        permitted.flow_handle.is_some(),
        "the connection is established"
    );
    assert_eq!(
        output_since(&machine, 1),
        [
            line("192.0.2.7:1234", "blocked"),
            line("192.0.2.7:443", "permitted"),
        ],
        "called once per connection, at ALE_AUTH_CONNECT only"
    );

    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), []);
}

const ADMIN_SUBLAYER: Guid = guid!("ca276fd7-9d89-48da-9a92-ab97fc6300b9");
const ADMIN_FILTER_V4: Guid = guid!("c608a79d-1901-403f-8636-2dad1065b1f5");
const ADMIN_FILTER_V6: Guid = guid!("1b3e0f55-6c1a-4f0e-9d8b-3a0c2e7d4b61");

/// A hard permit of every connection at layer `L`, as another firewall's "always allow" rule.
fn hard_permit<L: Layer>(key: Guid) -> Filter<'static, L> {
    Filter::new(key)
        .name("allow everything, hard")
        .sublayer(ADMIN_SUBLAYER)
        .action(FilterAction::Permit)
        .flags(FilterFlags::CLEAR_ACTION_RIGHT)
}

/// WFP arbitration: a heavier sublayer's hard permit clears the write right before the starter's
/// callout runs. The callout cannot permit (nothing changes, the hard permit stands), and its
/// block for port 1234 is a veto: only a callout may override a hard permit, and it does, so the
/// connection is blocked.
#[test]
fn a_heavier_sublayers_hard_permit_stands_except_against_the_veto() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("starter", starter::DriverEntry)
        .expect("loads");
    let (admin, permit_v4, permit_v6) = machine
        .at_passive(|irql| {
            let admin = Engine::open(irql, SessionOptions::new().dynamic().name("admin"))?;
            admin.add_sublayer(
                irql,
                &Sublayer::new(ADMIN_SUBLAYER)
                    .name("admin")
                    .weight(starter::SUBLAYER_WEIGHT + 1),
            )?;
            let v4 = admin.add_filter(irql, &hard_permit::<AleAuthConnectV4>(ADMIN_FILTER_V4))?;
            let v6 = admin.add_filter(irql, &hard_permit::<AleAuthConnectV6>(ADMIN_FILTER_V6))?;
            Ok::<_, Status>((admin, v4, v6))
        })
        .expect("the admin filters are added");

    let permitted = machine.classify(Irql::DISPATCH, &connect_v4(IpProtocol::Tcp, 443));
    assert_eq!(
        permitted,
        Decision {
            action: Action::Permit,
            hard: true,
            vetoed: false,
            absorbed: false,
            filter_id: Some(permit_v4.raw()),
            pending: None,
        },
        "the hard permit decides"
    );
    let vetoed = machine.classify(Irql::DISPATCH, &connect_v4(IpProtocol::Tcp, 1234));
    assert_eq!((vetoed.action, vetoed.vetoed), (Action::Block, true));
    assert_ne!(
        vetoed.filter_id,
        Some(permit_v4.raw()),
        "the starter's filter decided"
    );

    let permitted_v6 = machine.classify(Irql::DISPATCH, &connect_v6(IpProtocol::Tcp, 443));
    assert_eq!(
        (permitted_v6.action, permitted_v6.filter_id),
        (Action::Permit, Some(permit_v6.raw()))
    );
    let vetoed_v6 = machine.classify(Irql::PASSIVE, &connect_v6(IpProtocol::Tcp, 1234));
    assert_eq!((vetoed_v6.action, vetoed_v6.vetoed), (Action::Block, true));

    assert_eq!(
        output_since(&machine, 1),
        [
            line("192.0.2.7:443", "not permitted: a hard decision stands"),
            line("192.0.2.7:1234", "blocked (veto of a hard permit)"),
            line("[2001:db8::7]:443", "not permitted: a hard decision stands"),
            line("[2001:db8::7]:1234", "blocked (veto of a hard permit)"),
        ]
    );

    machine
        .at_passive(|irql| admin.close(irql))
        .expect("closes");
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), []);
}

/// A failed `DriverEntry` leaves nothing behind: the transaction is aborted, the session
/// closed and the callouts unregistered (the simulator stops a failed load that leaves a
/// callout registered or pool allocated).
#[test]
fn a_failed_load_leaves_nothing_behind() {
    let machine = Machine::new();
    let squatter = machine
        .at_passive(|irql| {
            let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
            engine.add_filter(
                irql,
                &Filter::<AleAuthConnectV6>::new(starter::FILTER_V6).action(FilterAction::Permit),
            )?;
            Ok::<_, Status>(engine)
        })
        .expect("adds a filter under the starter's key");
    assert_eq!(
        machine
            .load_driver("starter", starter::DriverEntry)
            .map(|_| ()),
        Err(Status::FWP_ALREADY_EXISTS),
        "the last filter cannot be added"
    );
    assert_eq!(machine.pool_blocks(), []);

    machine
        .at_passive(|irql| squatter.close(irql))
        .expect("closes");
    let driver = machine
        .load_driver("starter", starter::DriverEntry)
        .expect("the provider, sublayer and callouts of the failed load are gone");
    let blocked = machine.classify(Irql::DISPATCH, &connect_v6(IpProtocol::Tcp, 1234));
    assert_eq!(blocked.action, Action::Block);
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), []);
}
