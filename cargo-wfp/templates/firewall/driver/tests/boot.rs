//! Fail-closed from boot ([`Config::fail_closed_at_boot`]) in the simulator, across simulated
//! restarts (`Machine::restart`, `Machine::start_bfe`): connections are blocked while the
//! machine boots (the boot-time filters), once BFE runs and the driver is not loaded yet (the
//! persistent filters, whose callouts nobody has registered), and once the driver is loaded
//! and no service answers (the default, deny); the service's rules decide once it is up; a load
//! with the option off removes every object the option installed, and after the next restart
//! nothing of the firewall's is left and connections are allowed. Without the option a restart
//! leaves nothing behind.
//!
//! The connections of each phase are drawn at random (direction, IP version, protocol, remote)
//! from a seeded generator; the seed is printed, and `WFP_TEST_SEED` replays it.

#![cfg(any(not(windows), feature = "sim"))]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread;

use firewall_driver::{AskVia, Config};
use firewall_protocol::{ConnectionRequest, PORT_NAME, Verdict};
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction;
use wfp_rs::port::Message;
use wfp_rs_sim::{
    AleIrql, Connection, EngineObjectKind, Lifetime, LoadedDriver, Machine, PortClient,
};

/// The port the service's rules allow; every other remote port is denied.
const ALLOWED_PORT: u16 = 443;

macro_rules! driver_with {
    ($name:ident, $config:expr) => {
        mod $name {
            use super::*;

            #[wfp_rs::driver_entry]
            fn entry(
                irql: &mut wfp_rs::irql::PassiveLevel<'_>,
                driver: &mut wfp_rs::driver::Driver<'_>,
            ) -> Result<firewall_driver::Firewall, Status> {
                firewall_driver::start(irql, driver, $config)
            }
        }
    };
}

driver_with!(
    fail_closed,
    Config {
        fail_closed_at_boot: true,
        ask_via: AskVia::PortAndWorkItem,
        ..Config::DEFAULT
    }
);
driver_with!(
    plain,
    Config {
        ask_via: AskVia::PortAndWorkItem,
        ..Config::DEFAULT
    }
);
driver_with!(
    fail_closed_on_channel,
    Config {
        fail_closed_at_boot: true,
        ask_via: AskVia::Channel,
        ..Config::DEFAULT
    }
);
driver_with!(
    plain_on_channel,
    Config {
        ask_via: AskVia::Channel,
        ..Config::DEFAULT
    }
);
driver_with!(
    fail_closed_but_open,
    Config {
        fail_closed_at_boot: true,
        default: Verdict::Allow,
        ..Config::DEFAULT
    }
);

/// SplitMix64, seeded from `WFP_TEST_SEED` (decimal or 0x-hex) or a fixed default.
struct Rng(u64);

impl Rng {
    fn seeded() -> (Rng, u64) {
        let seed = std::env::var("WFP_TEST_SEED")
            .ok()
            .and_then(|s| {
                let s = s.trim();
                s.strip_prefix("0x")
                    .map_or_else(|| s.parse().ok(), |hex| u64::from_str_radix(hex, 16).ok())
            })
            .unwrap_or(0xB007_F00D);
        eprintln!("seed {seed:#x} (set WFP_TEST_SEED to replay)");
        (Rng(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// A connection drawn at random: out or in, IPv4 or IPv6, TCP or UDP, to the allowed port or
/// another, from a fresh local port.
fn random_connection(rng: &mut Rng, local_port: u16) -> Connection {
    let v6 = rng.below(2) == 0;
    let remote_ip: IpAddr = if v6 {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + rng.below(200) as u16).into()
    } else {
        Ipv4Addr::new(192, 0, 2, 1 + rng.below(200) as u8).into()
    };
    let local_ip: IpAddr = if v6 {
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into()
    } else {
        Ipv4Addr::new(10, 0, 0, 2).into()
    };
    let direction = if rng.below(3) == 0 {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let protocol = if rng.below(2) == 0 {
        IpProtocol::Tcp
    } else {
        IpProtocol::Udp
    };
    let remote_port = if rng.below(2) == 0 {
        ALLOWED_PORT
    } else {
        1000 + rng.below(5000) as u16
    };
    // Inbound: the service's rule is on the remote (peer's) port too, so both directions have
    // an allowed and a denied case.
    Connection {
        pid: 100 + rng.below(4),
        app: r"\device\harddiskvolume3\apps\browser.exe".into(),
        protocol,
        local: SocketAddr::new(local_ip, local_port),
        remote: SocketAddr::new(remote_ip, remote_port),
        direction,
    }
}

/// A loopback connection (the boot-time filters leave it alone, as the callouts do).
fn loopback(local_port: u16) -> Connection {
    Connection {
        pid: 7,
        app: r"\device\harddiskvolume3\apps\tool.exe".into(),
        protocol: IpProtocol::Tcp,
        local: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local_port),
        remote: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8080),
        direction: Direction::Outbound,
    }
}

/// Draws `n` connections and checks that each gets `expected` (a function of the connection);
/// returns them.
fn attempts(
    machine: &Machine,
    rng: &mut Rng,
    seed: u64,
    phase: &str,
    n: usize,
    next_port: &mut u16,
    expected: impl Fn(&Connection) -> Action,
) {
    for _ in 0..n {
        *next_port += 1;
        let c = random_connection(rng, *next_port);
        let outcome = machine.connect(&c, AleIrql::Dispatch);
        assert_eq!(
            outcome.decision.action,
            expected(&c),
            "{phase}: {c:?}: {outcome:?} (seed {seed:#x})"
        );
        assert_eq!(
            outcome.flow_handle.is_some(),
            outcome.decision.action == Action::Permit,
            "{phase}: only a permitted connection is established (seed {seed:#x})"
        );
    }
}

/// The firewall's objects in the engine, by kind and lifetime.
fn ours(machine: &Machine) -> Vec<(EngineObjectKind, Lifetime)> {
    let keys = [
        firewall_driver::PROVIDER,
        firewall_driver::SUBLAYER,
        firewall_driver::CALLOUT_CONNECT_V4.guid(),
        firewall_driver::CALLOUT_CONNECT_V6.guid(),
        firewall_driver::CALLOUT_RECV_ACCEPT_V4.guid(),
        firewall_driver::CALLOUT_RECV_ACCEPT_V6.guid(),
        firewall_driver::FILTER_CONNECT_V4,
        firewall_driver::FILTER_CONNECT_V6,
        firewall_driver::FILTER_RECV_ACCEPT_V4,
        firewall_driver::FILTER_RECV_ACCEPT_V6,
        firewall_driver::BOOT_FILTER_CONNECT_V4,
        firewall_driver::BOOT_FILTER_CONNECT_V6,
        firewall_driver::BOOT_FILTER_RECV_ACCEPT_V4,
        firewall_driver::BOOT_FILTER_RECV_ACCEPT_V6,
    ];
    let mut list: Vec<_> = machine
        .engine_objects()
        .into_iter()
        .filter(|o| keys.contains(&o.key))
        .map(|o| (o.kind, o.lifetime))
        .collect();
    list.sort_by_key(|&(kind, lifetime)| (kind as u8, lifetime as u8));
    list
}

/// What fail-closed from boot installs: everything persistent, and four boot-time filters.
fn installed() -> Vec<(EngineObjectKind, Lifetime)> {
    let mut list = vec![
        (EngineObjectKind::Provider, Lifetime::Persistent),
        (EngineObjectKind::Sublayer, Lifetime::Persistent),
    ];
    list.extend([(EngineObjectKind::Callout, Lifetime::Persistent); 4]);
    list.extend([(EngineObjectKind::Filter, Lifetime::Persistent); 4]);
    list.extend([(EngineObjectKind::Filter, Lifetime::BootTime); 4]);
    list.sort_by_key(|&(kind, lifetime)| (kind as u8, lifetime as u8));
    list
}

/// What the driver adds without the option, while it is loaded: everything dynamic.
fn dynamic() -> Vec<(EngineObjectKind, Lifetime)> {
    let mut list = vec![
        (EngineObjectKind::Provider, Lifetime::Dynamic),
        (EngineObjectKind::Sublayer, Lifetime::Dynamic),
    ];
    list.extend([(EngineObjectKind::Callout, Lifetime::Dynamic); 4]);
    list.extend([(EngineObjectKind::Filter, Lifetime::Dynamic); 4]);
    list.sort_by_key(|&(kind, lifetime)| (kind as u8, lifetime as u8));
    list
}

/// Unloads and checks that nothing of the driver's is left (pool, pends).
fn unload_clean(machine: &Machine, driver: LoadedDriver) {
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pending_classifications(), 0, "no pend left");
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
}

/// The service: connects to the port and answers every request, allowing [`ALLOWED_PORT`]
/// and denying the rest, until the driver closes the connection.
fn serve(machine: &Machine) -> thread::JoinHandle<usize> {
    let mut client: PortClient = machine.port_client(PORT_NAME);
    client.connect(&[]).expect("the service connects");
    thread::spawn(move || {
        let mut answered = 0;
        while let Some(message) = client.get_message(None) {
            let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
            let verdict = if request.remote_port == ALLOWED_PORT {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            let mut reply = vec![0u8; firewall_protocol::ConnectionReply::MAX_LEN];
            let len = request.reply(verdict).encode(&mut reply).unwrap();
            match client.reply(message.id, &reply[..len]) {
                Ok(()) => answered += 1,
                Err(Status::PORT_DISCONNECTED) => break,
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
        answered
    })
}

fn by_rules(c: &Connection) -> Action {
    if c.remote.port() == ALLOWED_PORT {
        Action::Permit
    } else {
        Action::Block
    }
}

/// The whole life of fail-closed from boot, in order, on the port design, where the harness
/// plays the service.
#[test]
fn fail_closed_from_boot_blocks_until_the_service_decides_and_uninstalls_without_a_trace() {
    life_of_fail_closed_from_boot(fail_closed::DriverEntry, plain::DriverEntry, true);
}

/// The same on the question channel (the default design), but for the service's part (a
/// service on the channel is `tests/channel.rs`'s subject): the persistent and boot-time
/// filters, the default before the service and the uninstall do not depend on how the driver
/// asks.
#[test]
fn fail_closed_from_boot_on_the_question_channel() {
    life_of_fail_closed_from_boot(
        fail_closed_on_channel::DriverEntry,
        plain_on_channel::DriverEntry,
        false,
    );
}

fn life_of_fail_closed_from_boot(
    fail_closed: wfp_rs_sim::DriverEntryFn,
    plain: wfp_rs_sim::DriverEntryFn,
    with_service: bool,
) {
    let (mut rng, seed) = Rng::seeded();
    let mut port = 40_000u16;
    let machine = Machine::new();

    // Install: the first load with the option.
    let driver = machine.load_driver("firewall", fail_closed).expect("loads");
    assert_eq!(ours(&machine), installed(), "installed persistent");
    // Loaded, no service yet: the default, deny.
    attempts(
        &machine,
        &mut rng,
        seed,
        "loaded, no service",
        12,
        &mut port,
        |_| Action::Block,
    );
    unload_clean(&machine, driver);
    assert!(
        machine.debug_output().iter().any(|l| l.trim_end()
            == "firewall: fail-closed from boot stays installed: TCP and UDP connections are blocked until the driver is loaded again"),
        "unload says the protection stays"
    );
    assert_eq!(ours(&machine), installed(), "unload leaves them");
    // Unloaded: the persistent filters' callouts are not registered, so they block.
    attempts(&machine, &mut rng, seed, "unloaded", 12, &mut port, |_| {
        Action::Block
    });

    // Reboot. Booting, before BFE: the boot-time filters block (loopback excepted).
    machine.restart().expect("no driver is loaded");
    assert_eq!(ours(&machine), installed(), "kept across the restart");
    attempts(&machine, &mut rng, seed, "booting", 16, &mut port, |_| {
        Action::Block
    });
    port += 1;
    assert_eq!(
        machine
            .connect(&loopback(port), AleIrql::Dispatch)
            .decision
            .action,
        Action::Permit,
        "loopback is not blocked at boot"
    );

    // BFE runs, the driver is not loaded yet: the persistent filters block.
    machine.start_bfe();
    attempts(
        &machine,
        &mut rng,
        seed,
        "BFE up, no driver",
        16,
        &mut port,
        |_| Action::Block,
    );

    // The driver loads; no service yet: the default, deny.
    let driver = machine.load_driver("firewall", fail_closed).expect("loads");
    assert_eq!(ours(&machine), installed(), "reinstalled as it was");
    attempts(
        &machine,
        &mut rng,
        seed,
        "driver, no service",
        16,
        &mut port,
        |_| Action::Block,
    );

    // The service is up: its rules decide.
    if with_service {
        let service = serve(&machine);
        attempts(
            &machine,
            &mut rng,
            seed,
            "service up",
            40,
            &mut port,
            by_rules,
        );
        unload_clean(&machine, driver);
        assert!(service.join().unwrap() > 0, "the service answered");
    } else {
        unload_clean(&machine, driver);
    }

    // Uninstall: a load with the option off removes everything the option installed; its
    // unload removes its own (dynamic) objects.
    let driver = machine.load_driver("firewall", plain).expect("loads");
    assert_eq!(
        ours(&machine),
        dynamic(),
        "only the dynamic session's objects"
    );
    assert!(
        machine.debug_output().iter().any(|l| l.trim_end()
            == "firewall: fail-closed from boot is off: removed the 14 persistent and boot-time objects an earlier load installed"),
        "{:?}",
        machine.debug_output()
    );
    unload_clean(&machine, driver);
    assert_eq!(ours(&machine), [], "nothing of the firewall's is left");

    // Reboot: nothing blocks, booting or after.
    machine.restart().expect("no driver is loaded");
    assert_eq!(machine.engine_objects(), [], "nothing at all is left");
    attempts(
        &machine,
        &mut rng,
        seed,
        "booting, uninstalled",
        12,
        &mut port,
        |_| Action::Permit,
    );
    machine.start_bfe();
    attempts(
        &machine,
        &mut rng,
        seed,
        "BFE up, uninstalled",
        12,
        &mut port,
        |_| Action::Permit,
    );
}

/// Without the option, the driver's objects are dynamic: its unload removes them, and a restart
/// finds nothing of it; connections are allowed while the machine boots and after.
#[test]
fn without_the_option_a_restart_leaves_nothing_behind() {
    let (mut rng, seed) = Rng::seeded();
    let mut port = 50_000u16;
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", plain::DriverEntry)
        .expect("loads");
    assert_eq!(ours(&machine), dynamic());
    assert!(
        !machine
            .debug_output()
            .iter()
            .any(|l| l.contains("fail-closed from boot")),
        "nothing to say about an option that is off and was never on"
    );
    let service = serve(&machine);
    attempts(
        &machine,
        &mut rng,
        seed,
        "service up",
        20,
        &mut port,
        by_rules,
    );
    unload_clean(&machine, driver);
    service.join().unwrap();
    assert_eq!(machine.engine_objects(), []);
    // Unloaded, the filters are gone with the session: nothing blocks.
    attempts(&machine, &mut rng, seed, "unloaded", 8, &mut port, |_| {
        Action::Permit
    });
    machine.restart().expect("no driver is loaded");
    assert_eq!(machine.engine_objects(), []);
    attempts(&machine, &mut rng, seed, "booting", 8, &mut port, |_| {
        Action::Permit
    });
    machine.start_bfe();
    attempts(&machine, &mut rng, seed, "BFE up", 8, &mut port, |_| {
        Action::Permit
    });
}

/// Fail-closed from boot with a fail-open default would let connections through once the
/// driver is loaded: the driver refuses to load, and installs nothing.
#[test]
fn fail_closed_from_boot_needs_the_deny_default() {
    let machine = Machine::new();
    assert_eq!(
        machine
            .load_driver("firewall", fail_closed_but_open::DriverEntry)
            .err(),
        Some(Status::INVALID_PARAMETER)
    );
    assert_eq!(machine.engine_objects(), []);
    assert_eq!(machine.pool_blocks(), []);
}

/// The shipped `DriverEntry` reads the option from `Parameters\FailClosedAtBoot`: "1" installs,
/// "0" uninstalls, anything else keeps the driver from loading.
#[test]
fn the_shipped_driver_entry_reads_the_option_from_its_service_key() {
    let machine = Machine::new();
    let parameter = firewall_driver::FAIL_CLOSED_AT_BOOT_PARAMETER;
    machine.set_driver_parameter("firewall", parameter, "1");
    let driver = machine
        .load_driver("firewall", firewall_driver::DriverEntry)
        .expect("loads");
    assert_eq!(ours(&machine), installed());
    unload_clean(&machine, driver);
    assert_eq!(ours(&machine), installed());

    machine.set_driver_parameter("firewall", parameter, "yes");
    assert_eq!(
        machine
            .load_driver("firewall", firewall_driver::DriverEntry)
            .err(),
        Some(Status::INVALID_PARAMETER)
    );
    assert_eq!(ours(&machine), installed(), "a failed load changes nothing");

    machine.set_driver_parameter("firewall", parameter, "0");
    let driver = machine
        .load_driver("firewall", firewall_driver::DriverEntry)
        .expect("loads");
    assert_eq!(ours(&machine), dynamic());
    unload_clean(&machine, driver);
    assert_eq!(ours(&machine), []);
}
