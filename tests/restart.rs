//! A simulated restart (`Machine::restart`, `Machine::start_bfe`): what the filter engine keeps
//! across a reboot (persistent objects, boot-time filters), what it enforces while the machine
//! boots and once BFE runs, the lifetime rules for persistent and boot-time objects, and
//! deleting them by key.

#![cfg(any(not(windows), feature = "sim"))]

use core::net::Ipv4Addr;

use wfp_rs::callout::CalloutKey;
use wfp_rs::classify::Action;
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, FilterFlags, Match};
use wfp_rs::irql::{Irql, PassiveLevel};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{AleAuthConnectV4, fields};
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{
    ClassifyRequest, EngineObject, EngineObjectKind, Lifetime, Machine, RestartError,
};

const PROVIDER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c01");
const SUBLAYER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c02");
const CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c03"));
const PERSISTENT_FILTER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c04");
const BOOT_FILTER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c05");
const STATIC_FILTER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c06");
const DYNAMIC_FILTER: Guid = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c07");

/// `RPC_NT_SERVER_UNAVAILABLE`: what opening a session returns before BFE runs (INFERRED).
const BFE_NOT_RUNNING: Status = Status::from_raw(0xC002_0017_u32 as i32);

fn open(irql: &PassiveLevel<'_>, dynamic: bool) -> Engine {
    let options = SessionOptions::new().name("restart tests");
    let options = if dynamic { options.dynamic() } else { options };
    Engine::open(irql, options).expect("opens")
}

/// A TCP connection to 192.0.2.1:`port`.
fn connect(port: u16) -> ClassifyRequest<AleAuthConnectV4> {
    ClassifyRequest::new()
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, 1))
        .with::<fields::IpRemotePort>(port)
}

/// The decision for a TCP connection to `port`, and the key-less id of the filter that made
/// it.
fn decide(machine: &Machine, port: u16) -> (Action, Option<u64>) {
    let decision = machine.at_passive(|_| machine.classify(Irql::DISPATCH, &connect(port)));
    (decision.action, decision.filter_id)
}

/// A filter that blocks TCP to `port`.
fn block_port(key: Guid, port: u16, flags: FilterFlags) -> Filter<'static, AleAuthConnectV4> {
    Filter::new(key)
        .name("block a port")
        .action(FilterAction::Block)
        .condition::<fields::IpRemotePort>(Match::Equal(port))
        .flags(flags)
}

fn lifetimes(machine: &Machine) -> Vec<(EngineObjectKind, Guid, Lifetime)> {
    let mut list: Vec<_> = machine
        .engine_objects()
        .into_iter()
        .map(
            |EngineObject {
                 kind,
                 key,
                 lifetime,
             }| (kind, key, lifetime),
        )
        .collect();
    list.sort_by_key(|(kind, key, _)| (*kind as u8, key.to_string()));
    list
}

/// Persistent objects stay across a restart; static and dynamic ones go. While the machine
/// boots only the boot-time filter blocks; once BFE starts, the persistent ones do, and the
/// boot-time one no longer (it stays stored for the next boot).
#[test]
fn a_restart_keeps_persistent_and_boot_time_objects_and_enforces_each_in_its_phase() {
    let machine = Machine::new();
    let dynamic_session = machine.at_passive(|irql| {
        let engine = open(irql, false);
        let txn = engine.transaction(irql).unwrap();
        txn.add_provider(irql, &Provider::new(PROVIDER).name("p").persistent())
            .unwrap();
        txn.add_sublayer(
            irql,
            &Sublayer::new(SUBLAYER)
                .name("s")
                .provider(PROVIDER)
                .weight(0x100)
                .persistent(),
        )
        .unwrap();
        let persistent = block_port(PERSISTENT_FILTER, 1001, FilterFlags::PERSISTENT)
            .sublayer(SUBLAYER)
            .provider(PROVIDER);
        txn.add_filter(irql, &persistent).unwrap();
        txn.add_filter(irql, &block_port(BOOT_FILTER, 1002, FilterFlags::BOOT_TIME))
            .unwrap();
        txn.add_filter(irql, &block_port(STATIC_FILTER, 1003, FilterFlags::empty()))
            .unwrap();
        txn.commit(irql).unwrap();
        engine.close(irql).unwrap();
        // A dynamic session still open at the restart: it ends with it.
        let dynamic = open(irql, true);
        dynamic
            .add_filter(
                irql,
                &block_port(DYNAMIC_FILTER, 1004, FilterFlags::empty()),
            )
            .unwrap();
        let handle = dynamic.as_raw_handle() as usize;
        core::mem::forget(dynamic);
        handle
    });
    // Before the restart: the boot-time filter is stored, not enforced.
    assert_eq!(decide(&machine, 1001).0, Action::Block);
    assert_eq!(decide(&machine, 1002), (Action::Permit, None));
    assert_eq!(decide(&machine, 1003).0, Action::Block);
    assert_eq!(decide(&machine, 1004).0, Action::Block);

    machine.restart().expect("no driver is loaded");
    assert!(!machine.is_bfe_running());
    assert_eq!(
        lifetimes(&machine),
        {
            let mut expected = vec![
                (EngineObjectKind::Provider, PROVIDER, Lifetime::Persistent),
                (EngineObjectKind::Sublayer, SUBLAYER, Lifetime::Persistent),
                (
                    EngineObjectKind::Filter,
                    PERSISTENT_FILTER,
                    Lifetime::Persistent,
                ),
                (EngineObjectKind::Filter, BOOT_FILTER, Lifetime::BootTime),
            ];
            expected.sort_by_key(|(kind, key, _)| (*kind as u8, key.to_string()));
            expected
        },
        "only persistent and boot-time objects are kept"
    );
    // Booting: only the boot-time filter.
    assert_eq!(decide(&machine, 1001), (Action::Permit, None));
    assert_eq!(decide(&machine, 1002).0, Action::Block);
    assert_eq!(decide(&machine, 1003), (Action::Permit, None));
    assert_eq!(decide(&machine, 1004), (Action::Permit, None));
    // No session before BFE runs.
    machine.at_passive(|irql| {
        assert_eq!(
            Engine::open(irql, SessionOptions::new()).err(),
            Some(BFE_NOT_RUNNING)
        );
    });

    machine.start_bfe();
    assert!(machine.is_bfe_running());
    assert_eq!(decide(&machine, 1001).0, Action::Block);
    assert_eq!(decide(&machine, 1002), (Action::Permit, None));
    assert_eq!(decide(&machine, 1003), (Action::Permit, None));
    assert_eq!(decide(&machine, 1004), (Action::Permit, None));
    machine.at_passive(|irql| {
        // The dynamic session ended with the restart: its handle is gone.
        // SAFETY: closing a handle value the engine does not know is refused, not undefined.
        let status = unsafe { wfp_rs::sys::FwpmEngineClose0(dynamic_session as _) };
        assert_eq!(Status::from_raw(status), Status::INVALID_PARAMETER);
        // A new session can delete the persistent and boot-time filters by key.
        let engine = open(irql, false);
        engine
            .delete_filter_by_key(irql, PERSISTENT_FILTER)
            .unwrap();
        engine.delete_filter_by_key(irql, BOOT_FILTER).unwrap();
        assert_eq!(
            engine.delete_filter_by_key(irql, BOOT_FILTER),
            Err(Status::FWP_FILTER_NOT_FOUND)
        );
        engine.delete_sublayer(irql, SUBLAYER).unwrap();
        engine.delete_provider(irql, PROVIDER).unwrap();
        engine.close(irql).unwrap();
    });
    machine.restart().unwrap();
    assert_eq!(lifetimes(&machine), [], "nothing is left");
    assert_eq!(decide(&machine, 1002), (Action::Permit, None));
    machine.start_bfe();
    assert_eq!(decide(&machine, 1001), (Action::Permit, None));
}

/// A persistent filter whose callout is persistent too comes back when BFE starts, before any
/// driver registers the callout: it blocks (the documented treatment of a filter whose callout
/// is not registered), unless it asks to permit.
#[test]
fn a_persistent_callout_filter_blocks_until_its_callout_is_registered() {
    let machine = Machine::new();
    let permit_key = guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c08");
    machine.at_passive(|irql| {
        let engine = open(irql, false);
        engine
            .add_callout(irql, &CalloutEntry::new(CALLOUT).name("c").persistent())
            .unwrap();
        let to_callout = |key, port: u16, flags| {
            Filter::<AleAuthConnectV4>::new(key)
                .name("to the callout")
                .action(FilterAction::CalloutTerminating(CALLOUT))
                .condition::<fields::IpRemotePort>(Match::Equal(port))
                .flags(flags)
        };
        engine
            .add_filter(
                irql,
                &to_callout(PERSISTENT_FILTER, 443, FilterFlags::PERSISTENT),
            )
            .unwrap();
        engine
            .add_filter(
                irql,
                &to_callout(
                    permit_key,
                    80,
                    FilterFlags::PERSISTENT | FilterFlags::PERMIT_IF_CALLOUT_UNREGISTERED,
                ),
            )
            .unwrap();
        engine.close(irql).unwrap();
    });
    machine.restart().unwrap();
    machine.start_bfe();
    let (action, by) = decide(&machine, 443);
    assert_eq!(action, Action::Block);
    assert!(by.is_some(), "the persistent filter decided");
    assert_eq!(decide(&machine, 80).0, Action::Permit);
    assert!(
        machine
            .engine_objects()
            .iter()
            .any(|o| o.kind == EngineObjectKind::Callout && o.lifetime == Lifetime::Persistent)
    );
}

/// The lifetime rules: a persistent object refers only to persistent ones; a boot-time filter
/// is not persistent too, not added in a dynamic session, and names no provider or sublayer.
#[test]
fn persistent_and_boot_time_objects_follow_the_lifetime_rules() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = open(irql, false);
        engine
            .add_provider(irql, &Provider::new(PROVIDER).name("static provider"))
            .unwrap();
        engine
            .add_sublayer(irql, &Sublayer::new(SUBLAYER).name("static sublayer"))
            .unwrap();
        engine
            .add_callout(irql, &CalloutEntry::new(CALLOUT).name("static callout"))
            .unwrap();
        let persistent = || block_port(PERSISTENT_FILTER, 1, FilterFlags::PERSISTENT);
        assert_eq!(
            engine.add_filter(irql, &persistent().sublayer(SUBLAYER)),
            Err(Status::FWP_LIFETIME_MISMATCH),
            "a persistent filter in a static sublayer"
        );
        assert_eq!(
            engine.add_filter(irql, &persistent().provider(PROVIDER)),
            Err(Status::FWP_LIFETIME_MISMATCH),
            "a persistent filter of a static provider"
        );
        assert_eq!(
            engine.add_filter(
                irql,
                &Filter::<AleAuthConnectV4>::new(PERSISTENT_FILTER)
                    .name("to a static callout")
                    .action(FilterAction::CalloutTerminating(CALLOUT))
                    .flags(FilterFlags::PERSISTENT)
            ),
            Err(Status::FWP_LIFETIME_MISMATCH),
            "a persistent filter naming a static callout"
        );
        assert_eq!(
            engine.add_sublayer(
                irql,
                &Sublayer::new(guid!("b7a1c2d3-0e4f-4a5b-8c6d-7e8f9a0b1c09"))
                    .name("persistent sublayer")
                    .provider(PROVIDER)
                    .persistent()
            ),
            Err(Status::FWP_LIFETIME_MISMATCH),
            "a persistent sublayer of a static provider"
        );
        assert_eq!(
            engine.add_filter(
                irql,
                &block_port(
                    BOOT_FILTER,
                    1,
                    FilterFlags::BOOT_TIME | FilterFlags::PERSISTENT
                )
            ),
            Err(Status::FWP_INVALID_FLAGS),
            "boot-time and persistent together"
        );
        assert_eq!(
            engine.add_filter(
                irql,
                &block_port(BOOT_FILTER, 1, FilterFlags::BOOT_TIME).sublayer(SUBLAYER)
            ),
            Err(Status::FWP_LIFETIME_MISMATCH),
            "a boot-time filter in a sublayer that does not exist at boot"
        );
        // A static filter may use static objects, as before.
        engine
            .add_filter(
                irql,
                &block_port(STATIC_FILTER, 1, FilterFlags::empty())
                    .sublayer(SUBLAYER)
                    .provider(PROVIDER),
            )
            .unwrap();
        engine.close(irql).unwrap();

        let dynamic = open(irql, true);
        assert_eq!(
            dynamic.add_filter(irql, &block_port(BOOT_FILTER, 1, FilterFlags::BOOT_TIME)),
            Err(Status::FWP_DYNAMIC_SESSION_IN_PROGRESS),
            "a dynamic session adds no boot-time filter"
        );
        dynamic.close(irql).unwrap();
    });
}

/// A restart with a driver loaded is refused, and names the driver; after its unload it works.
#[test]
fn a_restart_needs_every_driver_unloaded() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .expect("loads");
    assert_eq!(
        machine.restart(),
        Err(RestartError::DriversLoaded(vec!["minimal".into()]))
    );
    assert!(machine.is_bfe_running(), "nothing changed");
    machine.unload_driver(driver).unwrap();
    machine.restart().unwrap();
    machine.start_bfe();
}

/// Random sets of filters of every lifetime, added by static and dynamic sessions (some still
/// open, some in a transaction left open) across restarts: after each restart exactly the
/// persistent and boot-time filters committed before it are left, and in each phase exactly
/// the filters of that phase block. Seeded (`WFP_TEST_SEED` replays a failure).
#[test]
fn random_objects_survive_restarts_by_their_lifetime() {
    let seed: u64 = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |hex| u64::from_str_radix(hex, 16).ok())
        })
        .unwrap_or(0x5EED_B007);
    eprintln!("seed {seed:#x} (set WFP_TEST_SEED to replay)");
    let mut state = seed;
    let mut next = move |n: u64| {
        // SplitMix64.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let machine = Machine::new();
    // Port → the lifetime its filter was added with (ports are unique across rounds).
    let mut stored: Vec<(u16, Lifetime)> = Vec::new();
    let mut port = 2000u16;
    for round in 0..6 {
        machine.at_passive(|irql| {
            let static_session = open(irql, false);
            let dynamic_session = open(irql, true);
            let txn_left_open = next(3) == 0;
            let drawn: Vec<(u16, Lifetime, FilterFlags)> = (0..(4 + next(8)))
                .map(|_| {
                    port += 1;
                    let (lifetime, flags) = match next(4) {
                        0 => (Lifetime::Persistent, FilterFlags::PERSISTENT),
                        1 => (Lifetime::BootTime, FilterFlags::BOOT_TIME),
                        2 => (Lifetime::Static, FilterFlags::empty()),
                        _ => (Lifetime::Dynamic, FilterFlags::empty()),
                    };
                    (port, lifetime, flags)
                })
                .collect();
            let filter = |port: u16, flags| {
                let key = Guid(wfp_rs::sys::GUID {
                    Data1: 0xB007_0000 | u32::from(port),
                    Data2: 0,
                    Data3: 0,
                    Data4: [0; 8],
                });
                block_port(key, port, flags)
            };
            // The dynamic session's first: a transaction left open makes other sessions' writes
            // wait for it.
            for &(port, lifetime, flags) in &drawn {
                if lifetime == Lifetime::Dynamic {
                    dynamic_session
                        .add_filter(irql, &filter(port, flags))
                        .unwrap();
                    stored.push((port, lifetime));
                }
            }
            let txn = txn_left_open.then(|| static_session.transaction(irql).unwrap());
            for &(port, lifetime, flags) in &drawn {
                if lifetime == Lifetime::Dynamic {
                    continue;
                }
                match &txn {
                    // Never committed: the restart drops them.
                    Some(txn) => drop(txn.add_filter(irql, &filter(port, flags)).unwrap()),
                    None => {
                        static_session
                            .add_filter(irql, &filter(port, flags))
                            .unwrap();
                        stored.push((port, lifetime));
                    }
                }
            }
            // Leave the sessions (and the transaction) open: the restart ends them.
            core::mem::forget(txn);
            core::mem::forget(static_session);
            core::mem::forget(dynamic_session);
        });
        let blocked_while_running = |lifetime: Lifetime| {
            matches!(
                lifetime,
                Lifetime::Persistent | Lifetime::Static | Lifetime::Dynamic
            )
        };
        for &(port, lifetime) in &stored {
            assert_eq!(
                decide(&machine, port).0 == Action::Block,
                blocked_while_running(lifetime),
                "round {round}, before the restart: port {port} ({lifetime:?}), seed {seed:#x}"
            );
        }
        machine.restart().unwrap();
        stored.retain(|(_, l)| matches!(l, Lifetime::Persistent | Lifetime::BootTime));
        let mut kept: Vec<Lifetime> = machine
            .engine_objects()
            .iter()
            .map(|o| o.lifetime)
            .collect();
        let mut expected: Vec<Lifetime> = stored.iter().map(|(_, l)| *l).collect();
        kept.sort_by_key(|l| *l as u8);
        expected.sort_by_key(|l| *l as u8);
        assert_eq!(kept, expected, "round {round}, seed {seed:#x}");
        for &(port, lifetime) in &stored {
            assert_eq!(
                decide(&machine, port).0 == Action::Block,
                lifetime == Lifetime::BootTime,
                "round {round}, booting: port {port} ({lifetime:?}), seed {seed:#x}"
            );
        }
        machine.start_bfe();
        for &(port, lifetime) in &stored {
            assert_eq!(
                decide(&machine, port).0 == Action::Block,
                lifetime == Lifetime::Persistent,
                "round {round}, BFE running: port {port} ({lifetime:?}), seed {seed:#x}"
            );
        }
    }
}
