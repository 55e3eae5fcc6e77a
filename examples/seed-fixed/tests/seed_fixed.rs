//! The seed scenario, fixed, in the simulator, in both designs: the driver pends each outbound
//! TCP connection and asks a simulated user-mode service — through the question channel from
//! classify (`Design::QuestionChannel`, the service a harness thread with
//! `wfp_rs::user::AskClient` through the simulator's bridge), or from a PASSIVE_LEVEL work item
//! over the filter-manager port (`Design::WorkItemAndPort`, the service a harness thread on the
//! port) — and completes the pend with the answer, or, when the service cannot answer, with the
//! configured default.
//!
//! Every test checks that each connection got exactly one final decision (pended once,
//! reauthorized once), that it is the service's answer or the documented default, and that after
//! unload no pool is left (the simulator itself stops the process on any rule it enforces, so a
//! test that returns did not bugcheck).
//!
//! Nothing here waits for a time to make something "probably" happen: the service thread
//! replies after it has received, tests wait for states (`wait_for_port_listener`, messages
//! received, connections pended, joins), port timeouts are tested with a service that never
//! replies, which gives the same outcome however long the timeout takes, and the channel's
//! deadlines by moving the machine's clock (`Machine::advance_clock`).

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread;
use std::time::Duration;

use seed_fixed::protocol::{MESSAGE_LEN, Verdict, VerdictReply, VerdictRequest};
use seed_fixed::{Config, Design, PORT_NAME};
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6, Layer};
use wfp_rs::metadata::Direction;
use wfp_rs::port::Message;
use wfp_rs_sim::{
    AleIrql, Caller, ConnectOutcome, Connection, DeviceHandle, LoadedDriver, Machine, PortClient,
};

const APP: &str = r"\device\harddiskvolume3\program files\seed\app.exe";

/// Long enough never to expire while the service is answering, however slow the machine.
const PATIENT: Duration = Duration::from_secs(120);

/// Drivers with the configurations the tests need: `DriverEntry` with `Config::DEFAULT` is the
/// product; these call `seed_fixed::start` with another configuration, as a test (or a product
/// reading its registry) does.
macro_rules! configured_driver {
    ($module:ident, $config:expr) => {
        mod $module {
            use super::*;

            #[wfp_rs::driver_entry]
            fn entry(
                irql: &mut wfp_rs::irql::PassiveLevel<'_>,
                driver: &mut wfp_rs::driver::Driver<'_>,
            ) -> Result<seed_fixed::SeedFixed, Status> {
                seed_fixed::start(irql, driver, $config)
            }
        }
    };
}

// The work item + port design.
configured_driver!(
    patient,
    Config {
        design: Design::WorkItemAndPort,
        timeout: PATIENT,
        ..Config::DEFAULT
    }
);
configured_driver!(
    fail_open,
    Config {
        design: Design::WorkItemAndPort,
        timeout: PATIENT,
        default: Verdict::Allow,
        ..Config::DEFAULT
    }
);
configured_driver!(
    impatient,
    Config {
        design: Design::WorkItemAndPort,
        timeout: Duration::from_millis(50),
        ..Config::DEFAULT
    }
);
configured_driver!(
    port_defaults,
    Config {
        design: Design::WorkItemAndPort,
        ..Config::DEFAULT
    }
);
// The question channel design (`Config::DEFAULT`'s).
configured_driver!(
    channel_patient,
    Config {
        timeout: PATIENT,
        ..Config::DEFAULT
    }
);
configured_driver!(
    channel_fail_open,
    Config {
        timeout: PATIENT,
        default: Verdict::Allow,
        ..Config::DEFAULT
    }
);

/// The service's policy in these tests: odd process ids may connect.
fn rule(pid: u64) -> Verdict {
    if pid % 2 == 1 {
        Verdict::Allow
    } else {
        Verdict::Block
    }
}

fn action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Allow => Action::Permit,
        Verdict::Block => Action::Block,
    }
}

fn reply_bytes(pid: u64, verdict: Verdict) -> Vec<u8> {
    let mut out = vec![0u8; MESSAGE_LEN];
    let len = VerdictReply { pid, verdict }.encode(&mut out).unwrap();
    out.truncate(len);
    out
}

/// An outbound TCP connection by process `pid` from local port `local_port` to `remote` (the
/// local address has the remote's IP version).
fn connection(pid: u64, local_port: u16, remote: SocketAddr) -> Connection {
    let local_ip = match remote.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    };
    Connection {
        pid,
        app: APP.into(),
        protocol: IpProtocol::Tcp,
        local: SocketAddr::new(local_ip, local_port),
        remote,
        direction: Direction::Outbound,
    }
}

fn web(pid: u64, local_port: u16) -> Connection {
    connection(
        pid,
        local_port,
        SocketAddr::new(Ipv4Addr::new(192, 0, 2, 80).into(), 443),
    )
}

fn load(machine: &Machine, entry: wfp_rs_sim::DriverEntryFn) -> LoadedDriver {
    machine.load_driver("seed-fixed", entry).expect("loads")
}

fn connected_client(machine: &Machine) -> PortClient {
    let mut client = machine.port_client(PORT_NAME);
    client.connect(&[]).expect("the service connects");
    client
}

/// Starts the simulated service: a thread with its own connection that answers every request
/// with `answer(pid)` until the connection goes away (at unload, when the driver unregisters its
/// minifilter). Returns the process ids it was asked about, in order.
fn serve(
    machine: &Machine,
    answer: impl Fn(u64) -> Verdict + Send + 'static,
) -> thread::JoinHandle<Vec<u64>> {
    let client = connected_client(machine);
    thread::spawn(move || {
        let mut asked = Vec::new();
        while let Some(message) = client.get_message(None) {
            assert_eq!(
                message.reply_length as usize,
                16 + MESSAGE_LEN,
                "the driver waits for a FILTER_REPLY_HEADER and a SEED_REPLY"
            );
            let request = VerdictRequest::decode(&message.data).expect("the driver's encoding");
            asked.push(request.pid);
            match client.reply(message.id, &reply_bytes(request.pid, answer(request.pid))) {
                Ok(()) => {}
                // The driver closed the connection (`stopping`, at unload): nobody waits for
                // this reply, and no request will come any more.
                Err(Status::PORT_DISCONNECTED) => break,
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
        asked
    })
}

/// The decisions the driver logged, as (pid, verdict, reason), in order.
fn decisions(machine: &Machine) -> Vec<(u64, String, String)> {
    machine
        .debug_output()
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("seed-fixed: pid ")?;
            let (pid, rest) = rest.split_once(": ")?;
            let (verdict, reason) = rest.split_once(" (")?;
            if verdict != "allow" && verdict != "block" {
                return None;
            }
            let reason = reason.strip_suffix(")\n")?;
            Some((pid.parse().ok()?, verdict.to_owned(), reason.to_owned()))
        })
        .collect()
}

/// How many connections the driver has pended so far (it logs each).
fn pended(machine: &Machine) -> usize {
    machine
        .debug_output()
        .iter()
        .filter(|line| line.ends_with(": pended, asking the service\n"))
        .count()
}

/// Asserts that `outcome` is one pended connection attempt decided exactly once, `expected`.
fn assert_decided_once(outcome: &ConnectOutcome, expected: Verdict, what: &str) {
    assert!(
        outcome.pended,
        "{what}: the callout pends every new connection"
    );
    let at_auth_connect: Vec<_> = outcome
        .layers
        .iter()
        .filter(|(name, _)| *name == AleAuthConnectV4::NAME || *name == AleAuthConnectV6::NAME)
        .collect();
    assert_eq!(
        at_auth_connect.len(),
        2,
        "{what}: ALE_AUTH_CONNECT classified twice, the pend and its one reauthorization: {:?}",
        outcome.layers
    );
    let (_, pended) = at_auth_connect[0];
    assert!(
        pended.absorbed && pended.action == Action::Block,
        "{what}: a pended classification is BLOCK + ABSORB: {pended:?}"
    );
    let (_, reauthorized) = at_auth_connect[1];
    assert_eq!(reauthorized.action, action(expected), "{what}: the verdict");
    assert_eq!(outcome.decision.action, action(expected), "{what}: final");
    assert_eq!(
        outcome.flow_handle.is_some(),
        expected == Verdict::Allow,
        "{what}: only a permitted connection is established"
    );
}

/// Unloads and checks that nothing is left behind.
fn unload_clean(machine: &Machine, driver: LoadedDriver) {
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
    assert_eq!(
        machine.debug_output().last().map(String::as_str),
        Some("seed-fixed: unloaded\n"),
        "unload reported no error"
    );
}

// --- seeded randomness ---------------------------------------------------------------------------

/// The seed: `WFP_TEST_SEED` (decimal or 0x-hex) to replay a failure, or a fixed default.
fn seed() -> u64 {
    std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(0x5EED_F1CE_D000_0001)
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn irql(&mut self) -> AleIrql {
        if self.next() & 1 == 0 {
            AleIrql::Passive
        } else {
            AleIrql::Dispatch
        }
    }

    /// A remote endpoint, IPv4 or IPv6.
    fn remote(&mut self) -> SocketAddr {
        let port = (self.next() % 65_535) as u16 + 1;
        let host = self.next();
        if host & 1 == 0 {
            SocketAddr::new(Ipv4Addr::new(198, 51, 100, (host >> 8) as u8).into(), port)
        } else {
            let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (host >> 8) as u16);
            SocketAddr::new(ip.into(), port)
        }
    }
}

/// Runs `per_thread` connections on each of `threads` threads; connection `n` of thread `t`
/// comes from local port `base + t * per_thread + n`, so concurrent attempts never share a key.
/// Pids, remotes and IRQLs come from the seeded generator. Returns every connection with its
/// outcome.
fn connect_concurrently(
    machine: &Machine,
    seed: u64,
    threads: u64,
    per_thread: u64,
    base: u16,
) -> Vec<(Connection, ConnectOutcome)> {
    let run = || {
        thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut rng = Rng::new(seed, t + 1);
                        (0..per_thread)
                            .map(|n| {
                                let pid = rng.next() % 100_000 + 4;
                                let local = base + (t * per_thread + n) as u16;
                                let c = connection(pid, local, rng.remote());
                                let outcome = machine.connect(&c, rng.irql());
                                (c, outcome)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a connection thread panicked"))
                .collect()
        })
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(outcomes) => outcomes,
        Err(panic) => {
            eprintln!("replay with WFP_TEST_SEED={seed:#x}");
            std::panic::resume_unwind(panic)
        }
    }
}

// --- the tests -------------------------------------------------------------------------------

/// 8 threads × 50 connections, IPv4 and IPv6, at PASSIVE_LEVEL and DISPATCH_LEVEL, with the
/// service answering each: every connection gets the service's verdict, exactly once.
#[test]
fn many_concurrent_connections_each_get_the_services_verdict_once() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 50;
    let seed = seed();
    let machine = Machine::with_worker_threads(4);
    let driver = load(&machine, patient::DriverEntry);
    let service = serve(&machine, rule);
    let queued_before = machine.work_items_queued();

    let outcomes = connect_concurrently(&machine, seed, THREADS, PER_THREAD, 10_000);
    let total = (THREADS * PER_THREAD) as usize;
    assert_eq!(
        machine.work_items_queued() - queued_before,
        total as u64,
        "one work item (a system worker thread's time) per connection (seed {seed:#x})"
    );
    unload_clean(&machine, driver);
    let mut asked = service.join().expect("the service thread");

    assert_eq!(outcomes.len(), total, "seed {seed:#x}");
    for (c, outcome) in &outcomes {
        let what = format!("pid {} {} -> {} (seed {seed:#x})", c.pid, c.local, c.remote);
        assert_decided_once(outcome, rule(c.pid), &what);
    }
    let ipv6 = outcomes.iter().filter(|(c, _)| c.remote.is_ipv6()).count();
    assert!(
        ipv6 > 0 && ipv6 < total,
        "both IP versions ran (seed {seed:#x})"
    );

    // The service was asked exactly once per connection, about its process.
    let mut pids: Vec<u64> = outcomes.iter().map(|(c, _)| c.pid).collect();
    pids.sort_unstable();
    asked.sort_unstable();
    assert_eq!(asked, pids, "one request per connection (seed {seed:#x})");

    // And the driver logged one decision per connection, each the service's.
    let logged = decisions(&machine);
    assert_eq!(logged.len(), total, "seed {seed:#x}");
    for (pid, verdict, reason) in &logged {
        assert_eq!(reason, "service", "pid {pid} (seed {seed:#x})");
        assert_eq!(*verdict, rule(*pid).as_str(), "pid {pid} (seed {seed:#x})");
    }
}

/// No service connected: every connection is blocked (the fail-closed default), at once.
#[test]
fn without_a_service_every_connection_gets_the_fail_closed_default() {
    let seed = seed();
    let machine = Machine::new();
    let driver = load(&machine, patient::DriverEntry);

    let outcomes = connect_concurrently(&machine, seed, 4, 10, 20_000);
    for (c, outcome) in &outcomes {
        let what = format!("pid {} (seed {seed:#x})", c.pid);
        assert_decided_once(outcome, Verdict::Block, &what);
    }
    let logged = decisions(&machine);
    assert_eq!(logged.len(), outcomes.len(), "seed {seed:#x}");
    assert!(
        logged.iter().all(|(_, verdict, reason)| verdict == "block"
            && reason == "default: no client is connected to the port"),
        "{logged:?}"
    );
    unload_clean(&machine, driver);
}

/// The default is configuration: fail-open permits when no service is connected.
#[test]
fn a_fail_open_configuration_permits_without_a_service() {
    let machine = Machine::new();
    let driver = load(&machine, fail_open::DriverEntry);
    for (n, irql) in [AleIrql::Passive, AleIrql::Dispatch]
        .into_iter()
        .enumerate()
    {
        let outcome = machine.connect(&web(2, 30_000 + n as u16), irql);
        assert_decided_once(&outcome, Verdict::Allow, "even pid, fail-open");
    }
    assert_eq!(
        decisions(&machine),
        [
            (
                2,
                "allow".into(),
                "default: no client is connected to the port".into()
            ),
            (
                2,
                "allow".into(),
                "default: no client is connected to the port".into()
            ),
        ]
    );
    unload_clean(&machine, driver);
}

/// The service reads a request and disconnects without replying: that connection gets the
/// default. After it reconnects, connections get its answers again.
#[test]
fn a_service_that_disconnects_mid_request_leaves_the_default_then_reconnects() {
    let machine = Machine::new();
    let driver = load(&machine, patient::DriverEntry);

    let mut client = connected_client(&machine);
    let quitter = thread::spawn(move || {
        let message = client.get_message(None).expect("the request");
        let request = VerdictRequest::decode(&message.data).expect("the driver's encoding");
        // The service crashes: its handle is closed before it replies.
        client.disconnect();
        request.pid
    });
    // Pid 7 would be allowed; the service never says so.
    let outcome = machine.connect(&web(7, 40_000), AleIrql::Dispatch);
    assert_decided_once(&outcome, Verdict::Block, "the disconnected request");
    // Joined before reconnecting: the driver's disconnect callback has returned, so the port's
    // one connection slot is free again.
    assert_eq!(quitter.join().unwrap(), 7, "the service had the request");

    let service = serve(&machine, rule);
    let allowed = machine.connect(&web(9, 40_001), AleIrql::Passive);
    assert_decided_once(&allowed, Verdict::Allow, "after reconnecting, pid 9");
    let blocked = machine.connect(&web(10, 40_002), AleIrql::Dispatch);
    assert_decided_once(&blocked, Verdict::Block, "after reconnecting, pid 10");

    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), [9, 10]);
    assert_eq!(
        decisions(&machine),
        [
            (
                7,
                "block".into(),
                "default: the client disconnected before it replied".into()
            ),
            (9, "allow".into(), "service".into()),
            (10, "block".into(), "service".into()),
        ]
    );
}

/// A service that reads a request but never replies: after the (configured, short) timeout the
/// connection gets the default, and the service's late reply finds nobody waiting. A service
/// that never even reads gets the same result, and the request is withdrawn.
#[test]
fn a_service_that_never_replies_times_out_to_the_default() {
    let machine = Machine::new();
    let driver = load(&machine, impatient::DriverEntry);
    let client = connected_client(&machine);

    thread::scope(|s| {
        let reader = s.spawn(|| client.get_message(None).expect("the request"));
        // A FilterGetMessage is pending, so the request is delivered as soon as it is sent.
        machine.wait_for_port_listener(PORT_NAME);
        let outcome = machine.connect(&web(11, 41_000), AleIrql::Dispatch);
        assert_decided_once(&outcome, Verdict::Block, "read, never answered");
        let message = reader.join().unwrap();
        assert_eq!(
            VerdictRequest::decode(&message.data),
            Ok(VerdictRequest { pid: 11 })
        );
        assert_eq!(
            client.reply(message.id, &reply_bytes(11, Verdict::Allow)),
            Err(Status::FLT_NO_WAITER_FOR_REPLY),
            "the late reply is discarded"
        );
    });

    // Nobody reads at all.
    let outcome = machine.connect(&web(13, 41_001), AleIrql::Passive);
    assert_decided_once(&outcome, Verdict::Block, "never read");
    assert_eq!(
        client.get_message(Some(Duration::ZERO)),
        None,
        "a request that timed out before delivery is withdrawn"
    );

    assert_eq!(
        decisions(&machine),
        [
            (
                11,
                "block".into(),
                "default: no reply within the timeout".into()
            ),
            (
                13,
                "block".into(),
                "default: no reply within the timeout".into()
            ),
        ]
    );
    unload_clean(&machine, driver);
    assert!(!client.is_connected(), "unload disconnected the service");
}

/// Replies are untrusted: too short, too long, malformed or about another process, each gets
/// the default (every pid here is odd, so the rule would allow it) — and the driver keeps
/// working: a valid reply afterwards is honoured.
#[test]
fn malformed_short_and_oversized_replies_get_the_default() {
    let valid = |pid: u64| reply_bytes(pid, Verdict::Allow);
    let with = |pid: u64, offset: usize, byte: u8| {
        let mut bytes = valid(pid);
        bytes[offset] = byte;
        bytes
    };
    #[allow(clippy::type_complexity)]
    let cases: Vec<(u64, Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>, &str)> = vec![
        (
            101,
            Box::new(|_| Vec::new()),
            "default: the reply has 0 bytes, fewer than the 16 the protocol requires",
        ),
        (
            103,
            Box::new(move |pid| valid(pid)[..15].to_vec()),
            "default: the reply has 15 bytes, fewer than the 16 the protocol requires",
        ),
        (
            105,
            Box::new(move |pid| [valid(pid), vec![0]].concat()),
            "default: the reply is longer than the 16 bytes the protocol allows",
        ),
        (
            107,
            Box::new(|_| vec![0xA5; 4096]),
            "default: the reply is longer than the 16 bytes the protocol allows",
        ),
        (
            109,
            Box::new(move |pid| with(pid, 0, b'X')),
            "default: malformed reply: bad magic",
        ),
        (
            111,
            Box::new(move |pid| with(pid, 4, 2)),
            "default: malformed reply: unsupported protocol version",
        ),
        (
            113,
            Box::new(move |pid| with(pid, 6, 2)),
            "default: malformed reply: the verdict is 0 (block) or 1 (allow)",
        ),
        (
            115,
            Box::new(move |pid| with(pid, 7, 1)),
            "default: malformed reply: reserved byte is not zero",
        ),
        (
            117,
            Box::new(move |pid| valid(pid + 2)),
            "default: the reply is about pid 119, not 117",
        ),
        (
            121,
            // The request, echoed back.
            Box::new(|pid| {
                let mut out = vec![0u8; MESSAGE_LEN];
                VerdictRequest { pid }.encode(&mut out).unwrap();
                out
            }),
            "default: malformed reply: bad magic",
        ),
        (123, Box::new(valid), "service"),
    ];

    let machine = Machine::new();
    let driver = load(&machine, patient::DriverEntry);
    let client = connected_client(&machine);
    thread::scope(|s| {
        let replies: Vec<_> = cases.iter().map(|(_, reply, _)| reply).collect();
        let client = &client;
        s.spawn(move || {
            for reply in replies {
                let message = client.get_message(None).expect("a request");
                let request = VerdictRequest::decode(&message.data).unwrap();
                // User mode is not told that its reply was refused.
                client.reply(message.id, &reply(request.pid)).unwrap();
            }
        });
        for (n, (pid, _, _)) in cases.iter().enumerate() {
            let expected = if *pid == 123 {
                Verdict::Allow
            } else {
                Verdict::Block
            };
            let irql = if n % 2 == 0 {
                AleIrql::Dispatch
            } else {
                AleIrql::Passive
            };
            let outcome = machine.connect(&web(*pid, 42_000 + n as u16), irql);
            assert_decided_once(&outcome, expected, &format!("pid {pid}"));
        }
    });

    let logged = decisions(&machine);
    let expected: Vec<(u64, String, String)> = cases
        .iter()
        .map(|(pid, _, reason)| {
            let verdict = if *pid == 123 { "allow" } else { "block" };
            (*pid, verdict.to_owned(), (*reason).to_owned())
        })
        .collect();
    assert_eq!(logged, expected);
    unload_clean(&machine, driver);
}

/// Unload while connections are pended and their work items are waiting for a service that
/// reads the requests but never answers, with a timeout of two minutes: `stopping` raises the
/// unloading flag and closes the service's connection, so every waiting send fails at once and
/// no work item runs into the timeout; each completes its pend with the default, unload waits
/// for their reauthorizations, and only then deletes the filters. Every connection gets exactly
/// one decision, nothing leaks.
///
/// (However slow the machine, the reasons are only those three: a work item that had not asked
/// yet sees the flag, one that asks after the disconnection finds no client, one waiting for a
/// reply sees the disconnection.)
#[test]
fn unload_with_requests_outstanding_decides_every_pended_connection() {
    const PENDED: usize = 12;
    // One worker per connection: every work item waits in `send` at the same time.
    let machine = Machine::with_worker_threads(PENDED);
    let driver = load(&machine, patient::DriverEntry);
    let client = connected_client(&machine);

    let (outcomes, messages) = thread::scope(|s| {
        // The service reads every request and answers none, until unload disconnects it.
        let service = s.spawn(|| {
            let mut messages = Vec::new();
            while let Some(message) = client.get_message(None) {
                messages.push(message);
            }
            messages
        });
        let connections: Vec<_> = (0..PENDED)
            .map(|n| {
                let machine = &machine;
                s.spawn(move || {
                    let c = web(2 * n as u64 + 1, 43_000 + n as u16);
                    let irql = if n % 2 == 0 {
                        AleIrql::Dispatch
                    } else {
                        AleIrql::Passive
                    };
                    (c.clone(), machine.connect(&c, irql))
                })
            })
            .collect();
        // Every connection is pended (its work item queued). Unload from another thread.
        while pended(&machine) < PENDED {
            thread::yield_now();
        }
        let unloader = s.spawn(|| machine.unload_driver(driver));
        let outcomes: Vec<_> = connections
            .into_iter()
            .map(|c| c.join().expect("a connection thread"))
            .collect();
        unloader.join().unwrap().expect("unloads");
        (outcomes, service.join().unwrap())
    });

    for (c, outcome) in &outcomes {
        assert_decided_once(outcome, Verdict::Block, &format!("pid {}", c.pid));
    }
    let pids: Vec<u64> = outcomes.iter().map(|(c, _)| c.pid).collect();
    for message in &messages {
        let request = VerdictRequest::decode(&message.data).expect("the driver's encoding");
        assert!(pids.contains(&request.pid), "{request:?}");
    }
    let logged = decisions(&machine);
    assert_eq!(logged.len(), PENDED);
    let fast = [
        "default: unloading",
        "default: no client is connected to the port",
        "default: the client disconnected before it replied",
    ];
    assert!(
        logged
            .iter()
            .all(|(_, verdict, reason)| verdict == "block" && fast.contains(&reason.as_str())),
        "{logged:?}"
    );
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
    assert!(!client.is_connected(), "unload disconnected the service");
    if let Some(message) = messages.first() {
        let late = client.reply(message.id, &reply_bytes(1, Verdict::Allow));
        assert!(late.is_err(), "nobody waits for a reply any more: {late:?}");
    }
}

/// Unload while connections keep arriving and the service keeps answering: each attempt still
/// gets exactly one decision — the service's verdict or the default while the driver is
/// loaded, or no filter at all once its session is closed. No pended attempt is reauthorized
/// after the filters are gone (which would let it through unfiltered): unload stops pending and
/// waits for those reauthorizations first. Unload leaves nothing behind.
#[test]
fn unload_under_load_decides_every_connection_once() {
    let machine = Machine::with_worker_threads(3);
    let driver = load(&machine, patient::DriverEntry);
    let service = serve(&machine, rule);
    unload_under_load(&machine, driver, service);
}

/// The body of the unload-under-load tests of both designs: `service` answers with [`rule`]
/// until unload ends it, and returns the process ids it was asked about.
fn unload_under_load(
    machine: &Machine,
    driver: LoadedDriver,
    service: thread::JoinHandle<Vec<u64>>,
) {
    const THREADS: u16 = 4;
    let seed = seed();
    let unloaded = std::sync::atomic::AtomicBool::new(false);

    let outcomes: Vec<(Connection, ConnectOutcome)> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let unloaded = &unloaded;
                s.spawn(move || {
                    let mut rng = Rng::new(seed, u64::from(t) + 100);
                    let mut outcomes = Vec::new();
                    // At least a few attempts before the unload, then until it has finished.
                    for n in 0u16.. {
                        if n >= 5 && unloaded.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let local = 50_000 + t * 2_000 + n % 2_000;
                        let c = connection(rng.next() % 1_000 + 4, local, rng.remote());
                        let outcome = machine.connect(&c, rng.irql());
                        outcomes.push((c, outcome));
                    }
                    outcomes
                })
            })
            .collect();
        // Once the service has answered some, unload in the middle of the traffic.
        while decisions(machine).len() < 8 {
            thread::yield_now();
        }
        unload_clean(machine, driver);
        unloaded.store(true, std::sync::atomic::Ordering::SeqCst);
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a connection thread"))
            .collect()
    });
    let asked = service.join().unwrap();

    // How each attempt was decided.
    let mut by_driver = 0;
    let mut after_its_filters = 0;
    for (c, outcome) in &outcomes {
        let what = format!("pid {} {} (seed {seed:#x}): {outcome:?}", c.pid, c.local);
        let at_auth_connect: Vec<_> = outcome
            .layers
            .iter()
            .filter(|(name, _)| *name == AleAuthConnectV4::NAME || *name == AleAuthConnectV6::NAME)
            .map(|(_, decision)| decision)
            .collect();
        let last = at_auth_connect.last().expect("ALE_AUTH_CONNECT ran");
        if outcome.pended {
            assert_eq!(at_auth_connect.len(), 2, "{what}: one reauthorization");
        } else {
            assert_eq!(at_auth_connect.len(), 1, "{what}: classified once");
        }
        if last.filter_id.is_none() {
            // The session was closed before this attempt: the driver's filters were gone and
            // nothing filtered it, as after any unload. Never a pended attempt: unload waits
            // for the reauthorizations of its pends before it deletes the filters.
            assert!(
                !outcome.pended,
                "{what}: reauthorized after the filters were gone"
            );
            assert_eq!(outcome.decision.action, Action::Permit, "{what}");
            after_its_filters += 1;
        } else {
            // Decided by the driver: the service's verdict, or the fail-closed default
            // (asked while unloading).
            let expected = action(rule(c.pid));
            assert!(
                last.action == expected || last.action == Action::Block,
                "{what}"
            );
            by_driver += 1;
        }
    }
    assert!(
        by_driver >= 8,
        "connections were decided before the unload (seed {seed:#x})"
    );
    eprintln!(
        "unload under load (seed {seed:#x}): {} attempts, {by_driver} decided by the driver, \
         {after_its_filters} after its filters were gone",
        outcomes.len()
    );
    let logged = decisions(machine);
    assert!(
        logged.len() >= asked.len(),
        "every request the service answered was logged"
    );
    assert_eq!(machine.pool_blocks(), []);
}

/// The work item design with the product's settings (500 ms, fail-closed) loads, says how it is
/// configured, blocks over both IP versions while no service is connected, and unloads clean.
/// (The tests that need answers use a patient timeout, so that a slow machine cannot turn an
/// answer into a timeout.)
#[test]
fn the_work_item_design_with_default_settings_fails_closed_over_both_ip_versions() {
    let machine = Machine::new();
    let driver = load(&machine, port_defaults::DriverEntry);
    assert_eq!(
        machine.debug_output()[0],
        "seed-fixed: asking the service on \\WfpRsSeedPort (500 ms timeout, default block)\n"
    );
    let v6 = connection(
        21,
        44_000,
        SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 443),
    );
    let outcomes: BTreeMap<u64, ConnectOutcome> = [
        (21, machine.connect(&v6, AleIrql::Dispatch)),
        (23, machine.connect(&web(23, 44_001), AleIrql::Passive)),
    ]
    .into_iter()
    .collect();
    assert_decided_once(&outcomes[&21], Verdict::Block, "pid 21 over IPv6");
    assert_decided_once(&outcomes[&23], Verdict::Block, "pid 23 over IPv4");
    assert_eq!(
        outcomes[&21].layers[3].0,
        AleAuthConnectV6::NAME,
        "the IPv6 callout decided"
    );
    unload_clean(&machine, driver);
}

/// Every pool allocation on a connection's path is made to fail in turn (the work item and its
/// `IO_WORKITEM`; the request and reply buffers and the filter manager's message): the
/// connection is still pended once and decided once, by the default — the pend inside a work
/// item that could not be queued is completed by being dropped — never a crash, and nothing
/// leaks.
#[test]
fn allocation_failures_on_the_path_fall_back_to_the_default() {
    let machine = Machine::new();
    let driver = load(&machine, patient::DriverEntry);
    let service = serve(&machine, rule);
    let mut failures_seen = 0;
    for skip in 0.. {
        machine.fail_allocations(skip, 1);
        let outcome = machine.connect(&web(31, 45_000 + skip as u16), AleIrql::Dispatch);
        let injected = machine.pending_allocation_failures() == 0;
        machine.fail_allocations(0, 0);
        if !injected {
            // No allocation left to fail on this path: the service's verdict.
            assert_decided_once(&outcome, Verdict::Allow, "no failure");
            break;
        }
        failures_seen += 1;
        assert_decided_once(
            &outcome,
            Verdict::Block,
            &format!("allocation {skip} failed: fail closed"),
        );
        assert!(skip < 100, "the path has a bounded number of allocations");
    }
    // One decision per attempt: the default for each failure — where the work item could not
    // be queued, and where the message could not be sent — then the service's answer.
    let logged = decisions(&machine);
    assert_eq!(logged.len(), failures_seen + 1, "{logged:#?}");
    let (last, failed) = logged.split_last().unwrap();
    assert_eq!(*last, (31, "allow".into(), "service".into()));
    let queueing = "default: could not queue a work item: out of non-paged pool";
    let sending = "default: FltSendMessage failed: STATUS_INSUFFICIENT_RESOURCES";
    assert!(
        failed.iter().all(|(_, verdict, reason)| verdict == "block"
            && (reason == queueing || reason.starts_with(sending))),
        "{logged:#?}"
    );
    assert!(failed.iter().any(|(_, _, reason)| reason == queueing));
    assert!(
        failed
            .iter()
            .any(|(_, _, reason)| reason.starts_with(sending))
    );
    unload_clean(&machine, driver);
    service.join().unwrap();
}

/// Every pool allocation `DriverEntry` makes — the shared state included, a `PoolArc` because
/// `Arc::new` cannot report an exhausted pool — is made to fail in turn, in both designs: the
/// load fails with `STATUS_INSUFFICIENT_RESOURCES`, never a bug check, and leaves nothing
/// behind.
#[test]
fn every_allocation_failure_during_load_is_reported_and_leaks_nothing() {
    for entry in [
        seed_fixed::DriverEntry as wfp_rs_sim::DriverEntryFn,
        port_defaults::DriverEntry,
    ] {
        every_allocation_failure_during_load_of(entry);
    }
}

fn every_allocation_failure_during_load_of(entry: wfp_rs_sim::DriverEntryFn) {
    let machine = Machine::new();
    let mut failures = 0;
    for skip in 0.. {
        assert!(skip < 1000, "the load has a bounded number of allocations");
        machine.fail_allocations(skip, 1);
        match machine.load_driver("seed-fixed", entry) {
            Ok(driver) => {
                machine.fail_allocations(0, 0);
                machine.unload_driver(driver).expect("unloads");
                break;
            }
            Err(status) => {
                assert_eq!(status, Status::INSUFFICIENT_RESOURCES, "allocation {skip}");
                failures += 1;
            }
        }
        assert_eq!(machine.pool_blocks(), [], "allocation {skip}");
    }
    assert!(failures > 5, "{failures} allocation points");
    assert_eq!(machine.pool_blocks(), []);
}

// --- the question channel design ----------------------------------------------------------------
//
// The same scenarios with `Design::QuestionChannel`: classify asks through the channel, the
// service (a harness thread with `wfp_rs::user::AskClient`, through the simulator's bridge as a
// service process would) answers, the channel's `decide` completes the pend. Deadlines are the
// machine's clock: the tests move it (`Machine::advance_clock`) instead of waiting.

/// How many connections have been decided (the driver logs each decision).
fn decided(machine: &Machine) -> usize {
    decisions(machine).len()
}

/// Waits until `count` connections are pended and asked (the channel design logs it once the
/// question is in the channel, so its deadline is set).
fn wait_for_pended(machine: &Machine, count: usize) {
    while pended(machine) < count {
        thread::yield_now();
    }
}

/// Connects `c` on a thread of its own (the caller moves the clock or answers meanwhile).
fn connect_in_background<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    machine: &'scope Machine,
    c: Connection,
    irql: AleIrql,
) -> thread::ScopedJoinHandle<'scope, ConnectOutcome> {
    s.spawn(move || machine.connect(&c, irql))
}

/// A service that has the channel open and never asks for a question (nor answers): what the
/// driver sees of a hung service.
fn silent_service(machine: &Machine) -> DeviceHandle {
    machine
        .open_device(seed_fixed::ASK_DEVICE_PATH, Caller::System)
        .expect("the channel's device")
}

/// No service has the channel open: nobody could answer, so the question is not asked and the
/// connection gets the fail-closed default at once, without the clock moving and without a
/// work item.
#[test]
fn channel_without_a_service_each_connection_gets_the_default_at_once() {
    let machine = Machine::new();
    let driver = load(&machine, channel_patient::DriverEntry);
    let queued_before = machine.work_items_queued();
    for (n, irql) in [AleIrql::Dispatch, AleIrql::Passive]
        .into_iter()
        .enumerate()
    {
        let pid = 2 * n as u64 + 1; // the rule would allow it
        let outcome = machine.connect(&web(pid, 45_900 + n as u16), irql);
        assert_decided_once(&outcome, Verdict::Block, "no service");
    }
    let mut logged = decisions(&machine);
    logged.sort();
    assert_eq!(
        logged,
        [1, 3].map(|pid| (
            pid,
            "block".to_owned(),
            "default: no service has the channel open".to_owned()
        ))
    );
    assert_eq!(machine.work_items_queued(), queued_before, "no work item");
    unload_clean(&machine, driver);
}

/// The service has the channel open but never answers: each question waits for its deadline —
/// not a moment less, by the machine's clock — and then gets the fail-closed default, at either
/// IRQL.
#[test]
fn channel_a_silent_service_leaves_each_connection_the_default_at_its_deadline() {
    let machine = Machine::new();
    let driver = load(&machine, channel_patient::DriverEntry);
    let service = silent_service(&machine);
    let queued_before = machine.work_items_queued();
    thread::scope(|s| {
        let waiting: Vec<_> = [AleIrql::Dispatch, AleIrql::Passive]
            .into_iter()
            .enumerate()
            .map(|(n, irql)| {
                let pid = 2 * n as u64 + 1; // the rule would allow it
                connect_in_background(s, &machine, web(pid, 46_000 + n as u16), irql)
            })
            .collect();
        wait_for_pended(&machine, 2);
        // Half-way (a minute of margin for a slow host, whose real time moves the clock too).
        machine.advance_clock(PATIENT / 2);
        machine.wait_for_dpcs();
        assert_eq!(decided(&machine), 0, "decided before the deadline");
        machine.advance_clock(PATIENT / 2);
        machine.wait_for_dpcs();
        for connection in waiting {
            let outcome = connection.join().unwrap();
            assert_decided_once(&outcome, Verdict::Block, "no answer, deadline passed");
        }
    });
    drop(service);
    let mut logged = decisions(&machine);
    logged.sort();
    assert_eq!(
        logged,
        [1, 3].map(|pid| (
            pid,
            "block".to_owned(),
            "default: no reply within the timeout".to_owned()
        ))
    );
    assert_eq!(machine.work_items_queued(), queued_before, "no work item");
    unload_clean(&machine, driver);
}

/// The default is configuration in this design too: fail-open permits at the deadline.
#[test]
fn channel_a_fail_open_configuration_permits_at_the_deadline_without_an_answer() {
    let machine = Machine::new();
    let driver = load(&machine, channel_fail_open::DriverEntry);
    let service = silent_service(&machine);
    thread::scope(|s| {
        let waiting = connect_in_background(s, &machine, web(2, 46_100), AleIrql::Dispatch);
        wait_for_pended(&machine, 1);
        machine.advance_clock(PATIENT);
        let outcome = waiting.join().unwrap();
        assert_decided_once(&outcome, Verdict::Allow, "even pid, fail-open");
    });
    drop(service);
    assert_eq!(
        decisions(&machine),
        [(
            2,
            "allow".into(),
            "default: no reply within the timeout".into()
        )]
    );
    unload_clean(&machine, driver);
}

/// The product's own `DriverEntry` (the question channel, 500 ms, fail-closed) says how it is
/// configured and blocks over both IP versions when nobody answers within 500 ms of the
/// machine's clock.
#[test]
fn the_default_driver_entry_asks_through_the_channel_and_fails_closed_at_the_deadline() {
    let machine = Machine::new();
    let driver = load(&machine, seed_fixed::DriverEntry);
    let service = silent_service(&machine);
    assert_eq!(
        machine.debug_output()[0],
        "seed-fixed: asking the service through the question channel \\\\.\\WfpRsSeedAsk \
         (500 ms timeout, default block)\n"
    );
    let v6 = connection(
        21,
        44_100,
        SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 443),
    );
    thread::scope(|s| {
        let over_v6 = connect_in_background(s, &machine, v6, AleIrql::Dispatch);
        let over_v4 = connect_in_background(s, &machine, web(23, 44_101), AleIrql::Passive);
        wait_for_pended(&machine, 2);
        machine.advance_clock(seed_fixed::DEFAULT_TIMEOUT);
        let over_v6 = over_v6.join().unwrap();
        assert_decided_once(&over_v6, Verdict::Block, "pid 21 over IPv6");
        assert_eq!(
            over_v6.layers[3].0,
            AleAuthConnectV6::NAME,
            "the IPv6 callout decided"
        );
        let over_v4 = over_v4.join().unwrap();
        assert_decided_once(&over_v4, Verdict::Block, "pid 23 over IPv4");
    });
    drop(service);
    unload_clean(&machine, driver);
}

#[cfg(unix)]
mod channel_service {
    //! The tests in which a service answers: `AskClient` needs the simulator's bridge, a Unix
    //! domain socket.

    use super::*;
    use seed_fixed::ASK_DEVICE_PATH;
    use seed_fixed::protocol::CHANNEL;
    use std::io::ErrorKind;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use wfp_rs::user::AskClient;
    use wfp_rs_sim::UserModeBridge;

    /// The bridge a service process would reach the simulated machine through.
    struct Bridge {
        socket: PathBuf,
        _bridge: UserModeBridge,
    }

    fn bridge(machine: &Machine) -> Bridge {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let socket = std::env::temp_dir().join(format!(
            "wfp-rs-{}-seed-fixed-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_file(&socket);
        let bridge = machine.serve_user_mode(&socket).expect("the bridge");
        Bridge {
            socket,
            _bridge: bridge,
        }
    }

    impl Bridge {
        /// A service's client, with `outstanding` wait requests kept pending.
        fn client(&self, outstanding: usize) -> AskClient {
            AskClient::open_at(&self.socket, ASK_DEVICE_PATH, &CHANNEL, outstanding)
                .expect("the service opens the channel")
        }
    }

    /// Whether `error`, from `AskClient::next_question`, says that the driver closed the
    /// channel (`wfp_rs::user::is_closed`: the client tells it from other errors).
    fn channel_closed(error: &std::io::Error) -> bool {
        wfp_rs::user::is_closed(error)
    }

    /// The process a question asks about.
    fn pid_of(body: &[u8]) -> u64 {
        VerdictRequest::decode(body)
            .expect("the driver's encoding")
            .pid
    }

    /// Starts the simulated service: a thread with its own client that answers every question
    /// with `answer(pid)` until the channel closes (at unload). Returns the process ids it was
    /// asked about, in order. (The tests that use it check that each answer decided its
    /// connection: the driver logs "service" as the reason.)
    fn serve_questions(
        bridge: &Bridge,
        answer: impl Fn(u64) -> Verdict + Send + 'static,
    ) -> thread::JoinHandle<Vec<u64>> {
        let client = bridge.client(8);
        thread::spawn(move || {
            let mut asked = Vec::new();
            loop {
                let question = match client.next_question(None) {
                    Ok(Some(question)) => question,
                    Ok(None) => unreachable!("no timeout"),
                    Err(error) if channel_closed(&error) => break,
                    Err(error) => panic!("the channel failed: {error}"),
                };
                let pid = pid_of(&question.body);
                asked.push(pid);
                let reply = reply_bytes(pid, answer(pid));
                match client.answer(question.id, &reply) {
                    Ok(()) => {}
                    // Unload closed the channel meanwhile: the question was decided by the
                    // close (not found any more), or the answer arrived while it was closing.
                    Err(error) if error.kind() == ErrorKind::NotFound || channel_closed(&error) => {
                    }
                    Err(error) => panic!("the driver refused a timely answer: {error}"),
                }
            }
            asked
        })
    }

    /// 8 threads × 50 connections, IPv4 and IPv6, at PASSIVE_LEVEL and DISPATCH_LEVEL, with the
    /// service answering each through the channel: every connection gets the service's verdict,
    /// exactly once, and no work item runs.
    #[test]
    fn channel_many_concurrent_connections_each_get_the_services_verdict_once() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 50;
        let seed = seed();
        let machine = Machine::new();
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let service = serve_questions(&bridge, rule);
        let queued_before = machine.work_items_queued();

        let outcomes = connect_concurrently(&machine, seed, THREADS, PER_THREAD, 10_000);
        assert_eq!(
            machine.work_items_queued(),
            queued_before,
            "the channel design queues no work item (seed {seed:#x})"
        );
        unload_clean(&machine, driver);
        let mut asked = service.join().expect("the service thread");

        let total = (THREADS * PER_THREAD) as usize;
        assert_eq!(outcomes.len(), total, "seed {seed:#x}");
        for (c, outcome) in &outcomes {
            let what = format!("pid {} {} -> {} (seed {seed:#x})", c.pid, c.local, c.remote);
            assert_decided_once(outcome, rule(c.pid), &what);
        }
        let ipv6 = outcomes.iter().filter(|(c, _)| c.remote.is_ipv6()).count();
        assert!(
            ipv6 > 0 && ipv6 < total,
            "both IP versions ran (seed {seed:#x})"
        );
        let mut pids: Vec<u64> = outcomes.iter().map(|(c, _)| c.pid).collect();
        pids.sort_unstable();
        asked.sort_unstable();
        assert_eq!(asked, pids, "one question per connection (seed {seed:#x})");
        let logged = decisions(&machine);
        assert_eq!(logged.len(), total, "seed {seed:#x}");
        for (pid, verdict, reason) in &logged {
            assert_eq!(reason, "service", "pid {pid} (seed {seed:#x})");
            assert_eq!(*verdict, rule(*pid).as_str(), "pid {pid} (seed {seed:#x})");
        }
    }

    /// Unload while connections keep arriving and the service keeps answering through the
    /// channel: each attempt gets exactly one decision, no pended attempt is reauthorized after
    /// the filters are gone, nothing is left behind.
    #[test]
    fn channel_unload_under_load_decides_every_connection_once() {
        let machine = Machine::new();
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let service = serve_questions(&bridge, rule);
        unload_under_load(&machine, driver, service);
    }

    /// With the only system worker thread held (`Machine::hold_work_items`), the channel design
    /// still decides every connection, at both IRQLs: the question needs no thread while the
    /// service thinks. The work item design would wait here until the worker is released.
    #[test]
    fn the_channel_design_needs_no_system_worker_thread() {
        let machine = Machine::with_worker_threads(1);
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let service = serve_questions(&bridge, rule);
        machine.hold_work_items(true);
        let queued_before = machine.work_items_queued();
        for n in 0..10u16 {
            let irql = if n % 2 == 0 {
                AleIrql::Dispatch
            } else {
                AleIrql::Passive
            };
            let pid = u64::from(n) + 100;
            let outcome = machine.connect(&web(pid, 47_000 + n), irql);
            assert_decided_once(&outcome, rule(pid), &format!("pid {pid}"));
        }
        assert_eq!(machine.work_items_queued(), queued_before);
        machine.hold_work_items(false);
        unload_clean(&machine, driver);
        assert_eq!(service.join().unwrap(), (100..110).collect::<Vec<_>>());
    }

    /// The service's process dies holding a question: its handle closes, and that connection
    /// gets the default at once (not at its deadline). A new service then answers again.
    #[test]
    fn channel_a_service_killed_mid_question_leaves_the_default_then_a_new_one_answers() {
        let machine = Machine::new();
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let client = bridge.client(2);
        thread::scope(|s| {
            // Pid 7 would be allowed; the service never says so.
            let waiting = connect_in_background(s, &machine, web(7, 48_000), AleIrql::Dispatch);
            let question = client.next_question(None).unwrap().expect("the question");
            assert_eq!(pid_of(&question.body), 7);
            drop(client); // the process is killed: its handle closes
            let outcome = waiting.join().unwrap();
            assert_decided_once(&outcome, Verdict::Block, "the question its handle held");
        });
        let service = serve_questions(&bridge, rule);
        let allowed = machine.connect(&web(9, 48_001), AleIrql::Passive);
        assert_decided_once(&allowed, Verdict::Allow, "a new service, pid 9");
        let blocked = machine.connect(&web(10, 48_002), AleIrql::Dispatch);
        assert_decided_once(&blocked, Verdict::Block, "a new service, pid 10");
        unload_clean(&machine, driver);
        assert_eq!(service.join().unwrap(), [9, 10]);
        assert_eq!(
            decisions(&machine),
            [
                (
                    7,
                    "block".into(),
                    "default: the service closed its handle before it answered".into()
                ),
                (9, "allow".into(), "service".into()),
                (10, "block".into(), "service".into()),
            ]
        );
    }

    /// Answers are untrusted and checked: one through another handle than the question's
    /// (refused, and the question keeps waiting — here until its deadline), a late one (refused),
    /// a duplicate (refused; the first answer stands), a malformed one (refused, the default),
    /// one about another process (taken, the default). Every pid here is odd, so the rule would
    /// allow it; only pid 205's answer is honoured.
    #[test]
    fn channel_foreign_late_duplicate_and_malformed_answers_are_refused() {
        let machine = Machine::new();
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let service = bridge.client(1);
        thread::scope(|s| {
            // A foreign answer, then the deadline; then the late answer.
            let waiting = connect_in_background(s, &machine, web(201, 49_000), AleIrql::Dispatch);
            let question = service.next_question(None).unwrap().unwrap();
            assert_eq!(pid_of(&question.body), 201);
            let intruder = bridge.client(1);
            let foreign = intruder
                .answer(question.id, &reply_bytes(201, Verdict::Allow))
                .unwrap_err();
            assert_eq!(foreign.kind(), ErrorKind::PermissionDenied, "{foreign}");
            drop(intruder);
            assert_eq!(decided(&machine), 0, "the foreign answer decided nothing");
            machine.advance_clock(PATIENT);
            let outcome = waiting.join().unwrap();
            assert_decided_once(&outcome, Verdict::Block, "pid 201: the deadline");
            let late = service
                .answer(question.id, &reply_bytes(201, Verdict::Allow))
                .unwrap_err();
            assert_eq!(late.kind(), ErrorKind::NotFound, "{late}");

            // Malformed: too short, too long (the channel refuses answers over 16 bytes).
            for (n, len) in [15usize, 17].into_iter().enumerate() {
                let pid = 211 + 2 * n as u64;
                let waiting = connect_in_background(
                    s,
                    &machine,
                    web(pid, 49_010 + n as u16),
                    AleIrql::Dispatch,
                );
                let question = service.next_question(None).unwrap().unwrap();
                let mut answer = reply_bytes(pid, Verdict::Allow);
                answer.resize(len, 0);
                let refused = service.answer(question.id, &answer).unwrap_err();
                assert_eq!(
                    refused.kind(),
                    ErrorKind::InvalidInput,
                    "{len} bytes: {refused}"
                );
                assert_decided_once(
                    &waiting.join().unwrap(),
                    Verdict::Block,
                    &format!("pid {pid}"),
                );
            }

            // Malformed: a verdict other than 0 or 1.
            let waiting = connect_in_background(s, &machine, web(203, 49_001), AleIrql::Passive);
            let question = service.next_question(None).unwrap().unwrap();
            let mut bad = reply_bytes(203, Verdict::Allow);
            bad[6] = 2;
            let malformed = service.answer(question.id, &bad).unwrap_err();
            assert_eq!(malformed.kind(), ErrorKind::InvalidInput, "{malformed}");
            assert_decided_once(&waiting.join().unwrap(), Verdict::Block, "pid 203");

            // The first answer decides; the duplicate is refused.
            let waiting = connect_in_background(s, &machine, web(205, 49_002), AleIrql::Dispatch);
            let question = service.next_question(None).unwrap().unwrap();
            service
                .answer(question.id, &reply_bytes(205, Verdict::Allow))
                .unwrap();
            let duplicate = service
                .answer(question.id, &reply_bytes(205, Verdict::Block))
                .unwrap_err();
            assert_eq!(duplicate.kind(), ErrorKind::NotFound, "{duplicate}");
            assert_decided_once(&waiting.join().unwrap(), Verdict::Allow, "pid 205");

            // Well-formed, about another process.
            let waiting = connect_in_background(s, &machine, web(207, 49_003), AleIrql::Passive);
            let question = service.next_question(None).unwrap().unwrap();
            service
                .answer(question.id, &reply_bytes(209, Verdict::Allow))
                .unwrap();
            assert_decided_once(&waiting.join().unwrap(), Verdict::Block, "pid 207");
        });
        assert_eq!(
            decisions(&machine),
            [
                (
                    201,
                    "block".into(),
                    "default: no reply within the timeout".into()
                ),
                (211, "block".into(), "default: malformed answer".into()),
                (213, "block".into(), "default: malformed answer".into()),
                (203, "block".into(), "default: malformed answer".into()),
                (205, "allow".into(), "service".into()),
                (
                    207,
                    "block".into(),
                    "default: the reply is about pid 209, not 207".into()
                ),
            ]
        );
        drop(service);
        unload_clean(&machine, driver);
    }

    /// Unload while questions are outstanding — some delivered to a service that reads and
    /// never answers, some still waiting for a request — with a two-minute deadline that never
    /// passes: `stopping` stops the channel (`AskChannel::stop`), which decides each question
    /// once with the default and completes its pend while the filters still exist; unload waits
    /// for the reauthorizations, then closes the channel's device, and leaves no pend, request
    /// or pool behind. The service's requests are cancelled, and its late answers refused.
    #[test]
    fn channel_unload_with_questions_outstanding_decides_each_once() {
        const PENDED: usize = 12;
        let machine = Machine::new();
        let driver = load(&machine, channel_patient::DriverEntry);
        let bridge = bridge(&machine);
        let client = bridge.client(4);
        let reading = AtomicBool::new(true);

        let (outcomes, held) = thread::scope(|s| {
            // The service reads questions and answers none, until unload closes the channel.
            let service = s.spawn(|| {
                let mut held = Vec::new();
                while reading.load(Ordering::SeqCst) {
                    match client.next_question(None) {
                        Ok(Some(question)) => held.push(question),
                        Ok(None) => unreachable!("no timeout"),
                        Err(error) => {
                            assert!(channel_closed(&error), "{error}");
                            break;
                        }
                    }
                }
                held
            });
            let connections: Vec<_> = (0..PENDED)
                .map(|n| {
                    let irql = if n % 2 == 0 {
                        AleIrql::Dispatch
                    } else {
                        AleIrql::Passive
                    };
                    let c = web(2 * n as u64 + 1, 49_100 + n as u16);
                    (c.clone(), connect_in_background(s, &machine, c, irql))
                })
                .collect();
            wait_for_pended(&machine, PENDED);
            let unloader = s.spawn(|| machine.unload_driver(driver));
            let outcomes: Vec<_> = connections
                .into_iter()
                .map(|(c, connecting)| (c, connecting.join().expect("a connection thread")))
                .collect();
            unloader.join().unwrap().expect("unloads");
            reading.store(false, Ordering::SeqCst);
            (outcomes, service.join().unwrap())
        });

        for (c, outcome) in &outcomes {
            assert_decided_once(outcome, Verdict::Block, &format!("pid {}", c.pid));
        }
        let mut logged = decisions(&machine);
        logged.sort();
        let expected: Vec<(u64, String, String)> = outcomes
            .iter()
            .map(|(c, _)| (c.pid, "block".into(), "default: unloading".into()))
            .collect();
        assert_eq!(logged, expected, "each decided once, by the unload");
        assert!(
            machine.debug_output().contains(&format!(
                "seed-fixed: stopping; {PENDED} outstanding question(s) decided\n"
            )),
            "{:?}",
            machine.debug_output()
        );
        assert!(!held.is_empty() && held.len() <= PENDED, "{held:?}");
        for question in &held {
            let late = client.answer(
                question.id,
                &reply_bytes(pid_of(&question.body), Verdict::Allow),
            );
            assert!(late.is_err(), "the channel is gone: {late:?}");
        }
        assert_eq!(machine.pending_classifications(), 0);
        assert_eq!(machine.pool_blocks(), [], "pool left after unload");
        drop(client);
        assert_eq!(machine.pending_io_requests(), 0);
    }
}

// --- a deterministic machine ---------------------------------------------------------------------

/// The work item + port design on a deterministic machine (`Machine::deterministic`): two
/// connecting contexts and the service are tasks the seed schedules, with the system worker
/// threads that ask the service and the harness that unloads. Returns each connection's final
/// action, by process id, and the schedule.
fn deterministic_run(seed: u64) -> (BTreeMap<u64, Action>, Vec<wfp_rs_sim::ScheduleStep>) {
    const CALLERS: u64 = 2;
    const PER_CALLER: u64 = 3;
    let machine = Machine::deterministic(seed);
    let driver = load(&machine, patient::DriverEntry);
    let client = connected_client(&machine);
    let outcomes = thread::scope(|s| {
        let machine = &machine;
        let service = machine.spawn(s, "service", move || {
            let mut answered = 0;
            while let Some(message) = client.get_message(None) {
                let request = VerdictRequest::decode(&message.data).expect("the driver's encoding");
                match client.reply(message.id, &reply_bytes(request.pid, rule(request.pid))) {
                    Ok(()) => answered += 1,
                    Err(Status::PORT_DISCONNECTED) => break,
                    Err(status) => panic!("the driver is waiting for this reply: {status}"),
                }
            }
            answered
        });
        let callers: Vec<_> = (0..CALLERS)
            .map(|t| {
                machine.spawn(s, &format!("caller-{t}"), move || {
                    (0..PER_CALLER)
                        .map(|n| {
                            let pid = 10 + t * PER_CALLER + n;
                            let c = web(pid, 20_000 + pid as u16);
                            let irql = if n % 2 == 0 {
                                AleIrql::Passive
                            } else {
                                AleIrql::Dispatch
                            };
                            let outcome = machine.connect(&c, irql);
                            assert_decided_once(&outcome, rule(pid), &format!("pid {pid}"));
                            (pid, outcome.decision.action)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let outcomes: BTreeMap<u64, Action> = callers
            .into_iter()
            .flat_map(|caller| caller.join().expect("a caller"))
            .collect();
        unload_clean(machine, driver);
        assert_eq!(
            service.join().expect("the service"),
            CALLERS * PER_CALLER,
            "one question per connection"
        );
        outcomes
    });
    (outcomes, machine.schedule())
}

/// Every connection gets the service's verdict once, whatever the schedule; one seed gives one
/// schedule. A failure prints its seed and the command that replays it (`WFP_SIM_SEED`).
#[test]
fn on_a_deterministic_machine_one_seed_gives_one_schedule() {
    let mut schedules = Vec::new();
    wfp_rs_sim::for_each_seed(0..4, |seed| {
        let (outcomes, schedule) = deterministic_run(seed);
        assert_eq!(outcomes.len(), 6);
        for (pid, got) in &outcomes {
            assert_eq!(*got, action(rule(*pid)), "pid {pid}");
        }
        assert!(schedule.iter().any(|s| s.task == "service"));
        assert!(schedule.iter().any(|s| s.label == "classify"));
        let (_, again) = deterministic_run(seed);
        assert_eq!(schedule, again, "seed {seed}: two runs, two schedules");
        schedules.push(schedule);
    });
    if schedules.len() > 1 {
        assert!(
            schedules.iter().skip(1).any(|s| *s != schedules[0]),
            "four seeds gave one schedule"
        );
    }
}
