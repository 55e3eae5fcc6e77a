//! The safe management API (`wfp_rs::engine`, `wfp_rs::filter`) against the simulated filter
//! engine: sessions, transactions, object lifetimes, errors, and filters whose typed conditions
//! match (or do not match) real classifications.

#![cfg(any(not(windows), feature = "sim"))]

use core::net::{Ipv4Addr, Ipv6Addr};

use wfp_rs::callout::CalloutKey;
use wfp_rs::classify::Action;
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{AppPath, Filter, FilterAction, FilterId, Match, Weight};
use wfp_rs::irql::{Irql, PassiveLevel};
use wfp_rs::layer::value::{ConditionFlags, IpProtocol};
use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6, fields};
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{ClassifyRequest, Machine};

const PROVIDER: Guid = guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e01");
const SUBLAYER: Guid = guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e02");
const CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e03"));
const CALLOUT_V6: CalloutKey<AleAuthConnectV6> =
    CalloutKey::new(guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e06"));
const FILTER_A: Guid = guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e04");
const FILTER_B: Guid = guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9e05");
const UNKNOWN: Guid = guid!("3c1f7a52-9e0b-4d6a-b8e4-5f2a1c0d9eff");

fn dynamic(irql: &PassiveLevel<'_>) -> Engine {
    Engine::open(irql, SessionOptions::new().dynamic().name("engine tests")).expect("opens")
}

fn block(key: Guid) -> Filter<'static, AleAuthConnectV4> {
    Filter::new(key).name("block").action(FilterAction::Block)
}

#[test]
fn dynamic_session_opens_and_closes() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = Engine::open(
            irql,
            SessionOptions::new()
                .dynamic()
                .name("opens and closes")
                .description("a test session")
                .txn_wait_timeout(core::time::Duration::from_secs(1)),
        )
        .expect("opens");
        assert!(!engine.as_raw_handle().is_null());
        engine.close(irql).expect("closes");

        // Dropping closes too: a second session works, and its own close succeeds.
        drop(dynamic(irql));
        dynamic(irql).close(irql).expect("closes");
    });
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn committed_transaction_keeps_its_filter() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        let id = txn.add_filter(irql, &block(FILTER_A)).expect("adds");
        txn.commit(irql).expect("commits");

        assert_eq!(
            engine.add_filter(irql, &block(FILTER_A)),
            Err(Status::FWP_ALREADY_EXISTS),
            "the committed filter is still there"
        );
        engine
            .delete_filter(irql, id)
            .expect("deletes the committed filter");
        assert_eq!(
            engine.delete_filter(irql, id),
            Err(Status::FWP_FILTER_NOT_FOUND)
        );
    });
}

#[test]
fn aborted_transaction_rolls_back_its_filter() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        let id = txn.add_filter(irql, &block(FILTER_A)).expect("adds");
        txn.abort(irql).expect("aborts");

        assert_eq!(
            engine.delete_filter(irql, id),
            Err(Status::FWP_FILTER_NOT_FOUND),
            "the aborted filter is gone"
        );
        engine
            .add_filter(irql, &block(FILTER_A))
            .expect("its key is free again");
    });
}

#[test]
fn dropped_transaction_aborts() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        {
            let txn = engine.transaction(irql).expect("begins");
            txn.add_sublayer(irql, &Sublayer::new(SUBLAYER).name("rolled back"))
                .expect("adds the sublayer");
            txn.add_filter(irql, &block(FILTER_A).sublayer(SUBLAYER))
                .expect("adds the filter");
            // Dropped without commit.
        }
        engine
            .add_filter(irql, &block(FILTER_A))
            .expect("the filter's key is free again");
        assert_eq!(
            engine.add_filter(irql, &block(FILTER_B).sublayer(SUBLAYER)),
            Err(Status::FWP_SUBLAYER_NOT_FOUND),
            "the sublayer was rolled back too"
        );
        // The session has no transaction left open: a new one begins.
        engine
            .transaction(irql)
            .expect("begins again")
            .commit(irql)
            .expect("commits");
    });
    assert!(
        machine.debug_output().is_empty(),
        "{:?}",
        machine.debug_output()
    );
}

#[test]
fn one_transaction_at_a_time_per_session() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        assert_eq!(
            engine.transaction(irql).map(|_| ()),
            Err(Status::FWP_TXN_IN_PROGRESS)
        );
        txn.commit(irql).expect("the first one still commits");
    });
}

#[test]
fn a_failed_call_does_not_spoil_the_transaction() {
    // "If an operation fails during the course of a transaction, it does not affect the overall
    // state of the transaction" (WFP, Object Management).
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        txn.add_filter(irql, &block(FILTER_A)).expect("adds");
        assert_eq!(
            txn.add_filter(irql, &block(FILTER_B).sublayer(UNKNOWN)),
            Err(Status::FWP_SUBLAYER_NOT_FOUND)
        );
        txn.commit(irql).expect("commits");
        assert_eq!(
            engine.add_filter(irql, &block(FILTER_A)),
            Err(Status::FWP_ALREADY_EXISTS),
            "the filter added before the failure was committed"
        );
        engine
            .add_filter(irql, &block(FILTER_B))
            .expect("the failed one was never added");
    });
}

#[test]
fn unknown_sublayer_is_not_found() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        assert_eq!(
            engine.add_filter(irql, &block(FILTER_A).sublayer(UNKNOWN)),
            Err(Status::FWP_SUBLAYER_NOT_FOUND)
        );
        engine
            .add_sublayer(irql, &Sublayer::new(UNKNOWN).name("now known"))
            .expect("adds the sublayer");
        engine
            .add_filter(irql, &block(FILTER_A).sublayer(UNKNOWN))
            .expect("the sublayer exists now");
        assert_eq!(
            engine.delete_sublayer(irql, UNKNOWN),
            Err(Status::FWP_IN_USE),
            "a sublayer that holds a filter cannot be deleted"
        );
    });
}

#[test]
fn callout_filter_needs_the_callout_added() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let filter = Filter::<AleAuthConnectV4>::new(FILTER_A)
            .name("to the callout")
            .action(FilterAction::CalloutTerminating(CALLOUT));
        assert_eq!(
            engine.add_filter(irql, &filter),
            Err(Status::FWP_CALLOUT_NOT_FOUND)
        );

        let callout_id = engine
            .add_callout(irql, &CalloutEntry::new(CALLOUT).name("verdicts"))
            .expect("adds the callout");
        assert_ne!(callout_id, 0, "the engine assigns a runtime id");
        let id = engine
            .add_filter(irql, &filter)
            .expect("the callout exists now");

        assert_eq!(
            engine.delete_callout(irql, CALLOUT),
            Err(Status::FWP_IN_USE),
            "a callout a filter calls cannot be deleted"
        );
        engine.delete_filter(irql, id).expect("deletes the filter");
        engine
            .delete_callout(irql, CALLOUT)
            .expect("deletes the callout");
        assert_eq!(
            engine.delete_callout(irql, CALLOUT),
            Err(Status::FWP_CALLOUT_NOT_FOUND)
        );
    });
}

#[test]
fn dynamic_session_close_deletes_its_objects() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let add_all = |engine: &Engine| -> Result<FilterId, Status> {
            engine.add_provider(irql, &Provider::new(PROVIDER).name("provider"))?;
            engine.add_sublayer(
                irql,
                &Sublayer::new(SUBLAYER).name("sublayer").provider(PROVIDER),
            )?;
            engine.add_callout(
                irql,
                &CalloutEntry::new(CALLOUT)
                    .name("callout")
                    .provider(PROVIDER),
            )?;
            engine.add_filter(
                irql,
                &Filter::<AleAuthConnectV4>::new(FILTER_A)
                    .name("filter")
                    .provider(PROVIDER)
                    .sublayer(SUBLAYER)
                    .action(FilterAction::CalloutInspection(CALLOUT)),
            )
        };

        let first = dynamic(irql);
        add_all(&first).expect("the first session adds everything");
        first.close(irql).expect("closes");

        // Closing deleted everything: the same keys can be added again.
        let second = dynamic(irql);
        add_all(&second).expect("the second session adds everything again");
        // Dropping deletes everything too.
        drop(second);

        let third = dynamic(irql);
        add_all(&third).expect("and a third");
    });
    assert!(machine.pool_blocks().is_empty());
}

#[test]
fn static_session_objects_outlive_the_session() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let first = Engine::open(irql, SessionOptions::new()).expect("opens");
        let id = first.add_filter(irql, &block(FILTER_A)).expect("adds");
        first.close(irql).expect("closes");

        let second = dynamic(irql);
        assert_eq!(
            second.add_filter(irql, &block(FILTER_A)),
            Err(Status::FWP_ALREADY_EXISTS),
            "objects of a non-dynamic session live until deleted"
        );
        second
            .delete_filter(irql, id)
            .expect("any session may delete it");
    });
}

#[test]
fn deleting_everything_in_reverse_order() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        txn.add_provider(
            irql,
            &Provider::new(PROVIDER)
                .name("Example")
                .description("test provider"),
        )
        .expect("adds the provider");
        txn.add_sublayer(
            irql,
            &Sublayer::new(SUBLAYER)
                .name("Example rules")
                .description("test sublayer")
                .provider(PROVIDER)
                .weight(0x100),
        )
        .expect("adds the sublayer");
        txn.add_callout(
            irql,
            &CalloutEntry::new(CALLOUT_V6)
                .name("Example callout")
                .description("test callout")
                .provider(PROVIDER),
        )
        .expect("adds the callout");
        let id = txn
            .add_filter(
                irql,
                &Filter::<AleAuthConnectV6>::new(FILTER_A)
                    .name("Example filter")
                    .description("every condition kind")
                    .provider(PROVIDER)
                    .sublayer(SUBLAYER)
                    .weight(Weight::Exact(1 << 40))
                    .action(FilterAction::CalloutUnknown(CALLOUT_V6))
                    .raw_context(0xC0FFEE)
                    .condition::<fields::AleAppId>(Match::Equal(AppPath::new(
                        r"\device\harddiskvolume3\windows\system32\curl.exe",
                    )))
                    .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
                    .condition::<fields::IpRemoteAddress>(Match::AddressMask(
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
                        32,
                    ))
                    .condition::<fields::IpRemotePort>(Match::Range(1, 1023))
                    .condition::<fields::IpLocalPort>(Match::GreaterOrEqual(1024))
                    .condition::<fields::IpLocalInterface>(Match::NotEqual(0))
                    .condition::<fields::Flags>(Match::FlagsNoneSet(ConditionFlags::IS_LOOPBACK)),
            )
            .expect("adds the filter");
        txn.commit(irql).expect("commits");

        engine.delete_filter(irql, id).expect("deletes the filter");
        engine
            .delete_callout(irql, CALLOUT_V6)
            .expect("deletes the callout");
        engine
            .delete_sublayer(irql, SUBLAYER)
            .expect("deletes the sublayer");
        engine
            .delete_provider(irql, PROVIDER)
            .expect("deletes the provider");
    });
}

#[test]
fn referenced_provider_cannot_be_deleted() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        engine
            .add_provider(irql, &Provider::new(PROVIDER).name("provider"))
            .expect("adds the provider");
        engine
            .add_sublayer(irql, &Sublayer::new(SUBLAYER).name("s").provider(PROVIDER))
            .expect("adds the sublayer");
        assert_eq!(
            engine.delete_provider(irql, PROVIDER),
            Err(Status::FWP_IN_USE)
        );
    });
}

#[test]
fn builder_errors_are_reported_without_adding() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        assert_eq!(
            engine.add_filter(irql, &Filter::<AleAuthConnectV4>::new(FILTER_A)),
            Err(Status::FWP_INVALID_ACTION_TYPE),
            "a filter needs an action"
        );
        assert_eq!(
            engine.add_filter(irql, &block(FILTER_A).weight(Weight::Range(16))),
            Err(Status::FWP_INVALID_WEIGHT)
        );
        assert_eq!(
            engine.add_filter(
                irql,
                &Filter::<AleAuthConnectV6>::new(FILTER_A)
                    .action(FilterAction::Block)
                    .condition::<fields::IpRemoteAddress>(Match::FlagsAnySet(Ipv6Addr::LOCALHOST)),
            ),
            Err(Status::FWP_MATCH_TYPE_MISMATCH),
            "an IPv6 address is not an integer"
        );
        assert_eq!(
            engine.add_filter(
                irql,
                &block(FILTER_A).condition::<fields::IpRemoteAddress>(Match::AddressMask(
                    Ipv4Addr::LOCALHOST,
                    33
                )),
            ),
            Err(Status::INVALID_PARAMETER)
        );
        engine
            .add_filter(irql, &block(FILTER_A))
            .expect("none of them was added");
    });
}

/// A connection attempt at ALE_AUTH_CONNECT_V4.
fn connect_v4(app: &str, remote: Ipv4Addr, port: u16) -> ClassifyRequest<AleAuthConnectV4> {
    ClassifyRequest::new()
        .with::<fields::AleAppId>(app)
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpRemoteAddress>(remote)
        .with::<fields::IpRemotePort>(port)
        .with::<fields::Flags>(ConditionFlags::empty())
}

#[test]
fn typed_conditions_match_what_the_engine_delivers() {
    const CURL: &str = r"\device\harddiskvolume3\windows\system32\curl.exe";
    const EDGE: &str = r"\device\harddiskvolume3\program files\edge\msedge.exe";
    let machine = Machine::new();
    let (engine, id) = machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let id = engine
            .add_filter(
                irql,
                &block(FILTER_A)
                    // Mixed case: app ids are matched lower-cased.
                    .condition::<fields::AleAppId>(Match::Equal(AppPath::new(
                        r"\Device\HarddiskVolume3\Windows\System32\CURL.EXE",
                    )))
                    .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
                    .condition::<fields::IpRemoteAddress>(Match::AddressMask(
                        Ipv4Addr::new(10, 0, 0, 0),
                        8,
                    ))
                    .condition::<fields::IpRemotePort>(Match::Range(440, 450))
                    .condition::<fields::Flags>(Match::FlagsNoneSet(ConditionFlags::IS_LOOPBACK)),
            )
            .expect("adds");
        (engine, id)
    });
    let decide =
        |request: &ClassifyRequest<AleAuthConnectV4>| machine.classify(Irql::DISPATCH, request);

    let hit = decide(&connect_v4(CURL, Ipv4Addr::new(10, 20, 30, 40), 443));
    assert_eq!(hit.action, Action::Block);
    assert_eq!(hit.filter_id, Some(id.raw()));

    for (why, miss) in [
        (
            "another app",
            connect_v4(EDGE, Ipv4Addr::new(10, 20, 30, 40), 443),
        ),
        (
            "outside 10/8",
            connect_v4(CURL, Ipv4Addr::new(11, 0, 0, 1), 443),
        ),
        (
            "port above the range",
            connect_v4(CURL, Ipv4Addr::new(10, 0, 0, 1), 451),
        ),
        (
            "UDP",
            connect_v4(CURL, Ipv4Addr::new(10, 0, 0, 1), 443)
                .with::<fields::IpProtocol>(IpProtocol::Udp),
        ),
        (
            "loopback",
            connect_v4(CURL, Ipv4Addr::new(10, 0, 0, 1), 443)
                .with::<fields::Flags>(ConditionFlags::IS_LOOPBACK),
        ),
    ] {
        assert_eq!(decide(&miss).action, Action::Permit, "{why}");
    }

    machine
        .at_passive(|irql| engine.close(irql))
        .expect("closes");
    assert_eq!(
        decide(&connect_v4(CURL, Ipv4Addr::new(10, 20, 30, 40), 443)).action,
        Action::Permit,
        "closing the dynamic session deleted the filter"
    );
}

#[test]
fn ipv6_conditions_match_what_the_engine_delivers() {
    let machine = Machine::new();
    let (engine, id) = machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let id = engine
            .add_filter(
                irql,
                &Filter::<AleAuthConnectV6>::new(FILTER_A)
                    .action(FilterAction::Block)
                    .condition::<fields::IpRemoteAddress>(Match::AddressMask(
                        Ipv6Addr::new(0x2001, 0xdb8, 0xabcd, 0, 0, 0, 0, 0),
                        48,
                    ))
                    .condition::<fields::IpRemotePort>(Match::NotEqual(53)),
            )
            .expect("adds");
        // The session (and so its filter) stays open past this closure.
        (engine, id)
    });
    let request = |address: Ipv6Addr, port: u16| {
        ClassifyRequest::<AleAuthConnectV6>::new()
            .with::<fields::IpRemoteAddress>(address)
            .with::<fields::IpRemotePort>(port)
    };
    let inside = Ipv6Addr::new(0x2001, 0xdb8, 0xabcd, 1, 2, 3, 4, 5);
    let outside = Ipv6Addr::new(0x2001, 0xdb8, 0xabce, 0, 0, 0, 0, 1);
    let hit = machine.classify(Irql::PASSIVE, &request(inside, 443));
    assert_eq!((hit.action, hit.filter_id), (Action::Block, Some(id.raw())));
    assert_eq!(
        machine
            .classify(Irql::PASSIVE, &request(outside, 443))
            .action,
        Action::Permit
    );
    assert_eq!(
        machine.classify(Irql::PASSIVE, &request(inside, 53)).action,
        Action::Permit
    );
    machine
        .at_passive(|irql| engine.close(irql))
        .expect("closes");
}

#[test]
fn engine_dropped_above_passive_is_leaked_with_a_message() {
    let machine = Machine::new();
    let engine = machine.at_passive(|irql| {
        let engine = dynamic(irql);
        engine.add_filter(irql, &block(FILTER_A)).expect("adds");
        engine
    });
    // As if the last reference went away in a classify callback.
    machine.at_dispatch(|_irql| drop(engine));
    let output = machine.debug_output().concat();
    assert!(
        output.contains("an Engine was dropped at DISPATCH_LEVEL")
            && output.contains("FwpmEngineClose0 requires PASSIVE_LEVEL"),
        "{output}"
    );
    machine.at_passive(|irql| {
        assert_eq!(
            dynamic(irql).add_filter(irql, &block(FILTER_A)),
            Err(Status::FWP_ALREADY_EXISTS),
            "the leaked session still owns its filter"
        );
    });
}

#[test]
fn transaction_dropped_above_passive_stays_open_with_a_message() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        txn.add_filter(irql, &block(FILTER_A)).expect("adds");
        // The transaction goes out of scope in DISPATCH_LEVEL code: under a spin lock.
        let lock = wfp_rs::spin_lock::SpinLock::new(());
        lock.lock(&mut *irql, |_, _| drop(txn));
        let output = machine.debug_output().concat();
        assert!(
            output.contains("a Transaction was dropped at DISPATCH_LEVEL"),
            "{output}"
        );
        assert_eq!(
            engine.transaction(irql).map(|_| ()),
            Err(Status::FWP_TXN_IN_PROGRESS),
            "the transaction is still open"
        );
        // Closing the session aborts it.
        engine.close(irql).expect("closes");
        dynamic(irql)
            .add_filter(irql, &block(FILTER_A))
            .expect("the filter was rolled back with the session");
    });
}

#[test]
fn no_pool_is_left_after_the_engines_are_dropped() {
    let machine = Machine::new();
    machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let txn = engine.transaction(irql).expect("begins");
        txn.add_sublayer(irql, &Sublayer::new(SUBLAYER).name("s"))
            .expect("adds");
        txn.add_callout(irql, &CalloutEntry::new(CALLOUT).name("c"))
            .expect("adds");
        txn.add_filter(
            irql,
            &block(FILTER_A)
                .sublayer(SUBLAYER)
                .condition::<fields::AleAppId>(Match::Equal(AppPath::new(r"\device\x\y.exe"))),
        )
        .expect("adds");
        txn.commit(irql).expect("commits");
        let aborted = engine.transaction(irql).expect("begins");
        aborted.add_filter(irql, &block(FILTER_B)).expect("adds");
        drop(aborted);
        let static_session = Engine::open(irql, SessionOptions::new()).expect("opens");
        drop(static_session);
        drop(engine);
    });
    assert_eq!(machine.pool_blocks(), []);
}

#[test]
fn consecutive_conditions_on_one_field_are_alternatives() {
    let machine = Machine::new();
    let (engine, id) = machine.at_passive(|irql| {
        let engine = dynamic(irql);
        let id = engine
            .add_filter(
                irql,
                &block(FILTER_A)
                    .condition::<fields::IpRemotePort>(Match::Equal(80))
                    .condition::<fields::IpRemotePort>(Match::Equal(443))
                    .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp)),
            )
            .expect("adds");
        (engine, id)
    });
    let request = |port: u16, protocol: IpProtocol| {
        ClassifyRequest::<AleAuthConnectV4>::new()
            .with::<fields::IpRemotePort>(port)
            .with::<fields::IpProtocol>(protocol)
    };
    for (port, protocol, expected) in [
        (80, IpProtocol::Tcp, Action::Block),
        (443, IpProtocol::Tcp, Action::Block),
        (8080, IpProtocol::Tcp, Action::Permit),
        (443, IpProtocol::Udp, Action::Permit),
    ] {
        let decision = machine.classify(Irql::DISPATCH, &request(port, protocol));
        assert_eq!(decision.action, expected, "{port}/{protocol:?}");
        if expected == Action::Block {
            assert_eq!(decision.filter_id, Some(id.raw()));
        }
    }
    machine
        .at_passive(|irql| engine.close(irql))
        .expect("closes");
}
