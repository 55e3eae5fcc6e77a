//! The example firewall on its default design, the question channel ([`AskVia::Channel`]), in
//! the simulator, with the service played by harness threads on the channel's device
//! ([`ASK_DEVICE_PATH`]). `tests/firewall.rs` runs the scenarios of the port + work item design.
//!
//! Every connection attempt must get exactly one final decision (a pended one: the pend and one
//! reauthorization), the service's verdict when the service's answer was taken and the
//! fail-closed default otherwise; after unload no pend and no pool are left. Timeouts come from
//! the machine's clock (`Machine::advance_clock`), never from waiting; random choices come from
//! a seeded generator whose seed is printed (`WFP_TEST_SEED` replays it).

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use firewall_driver::{AskVia, Config, Stats};
use firewall_protocol::{
    ASK_CHANNEL, ASK_DEVICE_PATH, ASK_MAX_PATH_UNITS, ConnectionReply, ConnectionRequest,
    PORT_NAME, Verdict,
};
use wfp_rs::Status;
use wfp_rs::ask::{QuestionId, decode_message, encode_header};
use wfp_rs::classify::Action;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{AleAuthConnectV4, AleAuthRecvAcceptV4, Layer};
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs::port::Message;
use wfp_rs_sim::{
    AleIrql, Caller, ConnectOutcome, Connection, DeviceHandle, IoRequest, LoadedDriver, Machine,
    Process,
};

/// Deadlines no machine is slow enough to reach by itself: the tests move the clock.
const PATIENT: Duration = Duration::from_secs(3600);
const SUCCESS: i32 = 0;
/// The wait requests each simulated service handle keeps pending.
const K: usize = 4;

macro_rules! configured_driver {
    ($module:ident, $config:expr) => {
        mod $module {
            use super::*;

            pub static STATS: Stats = Stats::new();

            #[wfp_rs::driver_entry]
            fn entry(
                irql: &mut wfp_rs::irql::PassiveLevel<'_>,
                driver: &mut wfp_rs::driver::Driver<'_>,
            ) -> Result<firewall_driver::Firewall, Status> {
                firewall_driver::start(
                    irql,
                    driver,
                    Config {
                        stats: Some(&STATS),
                        ..$config
                    },
                )
            }
        }
    };
}

/// The default configuration (the channel), with a deadline the clock alone reaches.
const CHANNEL_CONFIG: Config = Config {
    timeout: PATIENT,
    ..Config::DEFAULT
};

configured_driver!(race, CHANNEL_CONFIG);
configured_driver!(no_service, CHANNEL_CONFIG);
configured_driver!(long_path, CHANNEL_CONFIG);
configured_driver!(no_work_item, CHANNEL_CONFIG);
configured_driver!(
    only_service,
    Config {
        service_sid: Some(SERVICE_SID),
        ..CHANNEL_CONFIG
    }
);

const SERVICE_SID: &str = "S-1-5-80-1111111111-2222222222-3333333333-4044444444-555555555";

// --- the policy: allow the browser to port 443, deny everything else ----------------------------

const BROWSER: &str = r"\device\harddiskvolume3\apps\browser.exe";
const OTHER: &str = r"\device\harddiskvolume3\apps\other.exe";

/// The service's verdict for a question.
fn rule(request: &ConnectionRequest) -> Verdict {
    let app: String = request.image_path.chars_lossy().collect();
    if app == BROWSER && request.remote_port == 443 {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// The same, for an attempt.
fn rule_for(c: &Connection) -> Action {
    if c.app == BROWSER && c.remote.port() == 443 {
        Action::Permit
    } else {
        Action::Block
    }
}

fn reply_bytes(request: &ConnectionRequest) -> Vec<u8> {
    // No cache lifetime: every outbound attempt is asked, so every race is run.
    let reply: ConnectionReply = request.reply(rule(request));
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    let len = reply.encode(&mut out).unwrap();
    out.truncate(len);
    out
}

// --- attempts ----------------------------------------------------------------------------------

fn attempt(pid: u64, app: &str, direction: SimDirection, local_port: u16, port: u16) -> Connection {
    Connection {
        pid,
        app: app.into(),
        protocol: IpProtocol::Tcp,
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), local_port),
        remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), port),
        direction,
    }
}

/// Checks that `outcome` is exactly one final decision of the driver's for `c` (a pended
/// attempt: the pend and one reauthorization); returns it and whether it was pended.
fn decided_once(c: &Connection, outcome: &ConnectOutcome, what: &str) -> (Action, bool) {
    let layer = match c.direction {
        SimDirection::Outbound => AleAuthConnectV4::NAME,
        SimDirection::Inbound => AleAuthRecvAcceptV4::NAME,
    };
    let at_auth: Vec<_> = outcome
        .layers
        .iter()
        .filter(|(name, _)| *name == layer)
        .map(|(_, decision)| *decision)
        .collect();
    if outcome.pended {
        assert!(at_auth[0].absorbed, "{what}: {outcome:?}");
        if c.direction == SimDirection::Inbound && at_auth.len() == 1 {
            // Denied: its clone was freed, the absorbed packet is gone.
            assert_eq!(outcome.flow_handle, None, "{what}: {outcome:?}");
            return (Action::Block, true);
        }
        // Outbound: the pend and one reauthorization; inbound: the pend and its reinjected
        // clone, permitted as the driver's own.
        assert_eq!(
            at_auth.len(),
            2,
            "{what}: the pend and one more classification: {outcome:?}"
        );
    } else {
        assert_eq!(at_auth.len(), 1, "{what}: classified once: {outcome:?}");
    }
    let last = at_auth.last().expect("classified");
    assert!(last.pending.is_none(), "{what}: nothing left pending");
    assert_eq!(outcome.decision.action, last.action, "{what}");
    (last.action, outcome.pended)
}

fn unload_clean(machine: &Machine, driver: LoadedDriver) {
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pending_classifications(), 0, "no pend left");
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
}

fn seed() -> u64 {
    let seed = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(0xC4A7_11E1_0000_0011);
    eprintln!("seed {seed:#x} (replay with WFP_TEST_SEED={seed:#x})");
    seed
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

// --- the simulated service on the channel ------------------------------------------------------

fn open(machine: &Machine) -> Option<DeviceHandle> {
    machine.open_device(ASK_DEVICE_PATH, Caller::System).ok()
}

fn wait_request(handle: &DeviceHandle) -> IoRequest {
    handle.device_io_control(ASK_CHANNEL.wait.raw(), &[], ASK_CHANNEL.wait_output_len())
}

fn answer(handle: &DeviceHandle, id: QuestionId, body: &[u8]) -> i32 {
    let mut input = encode_header(id, body.len()).to_vec();
    input.extend_from_slice(body);
    handle
        .device_io_control(ASK_CHANNEL.answer.raw(), &input, 0)
        .wait()
        .status
}

/// What one simulated service saw and did.
#[derive(Default)]
struct Seen {
    /// Local port of each outbound question whose answer the driver took (SUCCESS).
    taken: Vec<u16>,
    /// Answers refused as late (the question was decided before): NOT_FOUND.
    late: usize,
    malformed: usize,
    foreign: usize,
    duplicates: usize,
    kills: usize,
    violations: Vec<String>,
}

/// A service on the channel that, per question, answers (usually), answers malformed, answers
/// from a foreign handle first, answers twice, holds the question and answers it after the
/// clock moved past its deadline (late), or is killed (its handles close with questions
/// delivered), until the channel goes away. With `silent` set it holds every question.
fn run_service(
    machine: &Machine,
    seed: u64,
    clock: &AtomicU64,
    silent: &AtomicBool,
    closing: &AtomicBool,
) -> Seen {
    let mut rng = Rng::new(seed, 0);
    let mut seen = Seen::default();
    // A late answer also meets the channel closing at unload.
    let refused_late =
        |status: i32| status == Status::NOT_FOUND.raw() || status == Status::DELETE_PENDING.raw();
    'restart: loop {
        let (Some(handle), Some(foreign)) = (open(machine), open(machine)) else {
            return seen; // the device is gone: unloaded
        };
        let mut held: Vec<(QuestionId, Vec<u8>, u64)> = Vec::new();
        let mut waits: std::collections::VecDeque<IoRequest> =
            (0..K).map(|_| wait_request(&handle)).collect();
        while let Some(wait) = waits.pop_front() {
            let completion = wait.wait();
            if completion.status != SUCCESS {
                if !closing.load(Ordering::SeqCst) {
                    seen.violations
                        .push(format!("a wait ended with {:#x}", completion.status));
                }
                return seen;
            }
            let Some((id, body)) = decode_message(&completion.output) else {
                seen.violations.push("a malformed question".into());
                return seen;
            };
            let request = match ConnectionRequest::decode(body) {
                Ok(request) => request,
                Err(error) => {
                    seen.violations
                        .push(format!("undecodable question: {error:?}"));
                    return seen;
                }
            };
            let port = request.local_port;
            let reply = reply_bytes(&request);
            let correctly = |handle: &DeviceHandle, seen: &mut Seen| {
                let status = answer(handle, id, &reply);
                if status == SUCCESS {
                    seen.taken.push(port);
                } else if refused_late(status) {
                    seen.late += 1;
                } else {
                    seen.violations.push(format!("answer #{port}: {status:#x}"));
                }
                status
            };
            // Held questions whose deadline the clock has passed since: answered late.
            let now = clock.load(Ordering::SeqCst);
            for (id, reply, at) in std::mem::take(&mut held) {
                // Two ticks: the second one's jump started after the question was delivered
                // (the first may have jumped before it was asked).
                if now >= at.saturating_add(2) && !silent.load(Ordering::SeqCst) {
                    let status = answer(&handle, id, &reply);
                    if refused_late(status) {
                        seen.late += 1;
                    } else {
                        seen.violations.push(format!(
                            "an answer after its deadline's DPC ran completed with {status:#x}"
                        ));
                    }
                } else {
                    held.push((id, reply, at));
                }
            }
            if silent.load(Ordering::SeqCst) {
                held.push((id, reply, u64::MAX));
                waits.push_back(wait_request(&handle));
                continue;
            }
            match rng.below(100) {
                0..55 => {
                    correctly(&handle, &mut seen);
                }
                55..63 => {
                    // A reply that does not decode: the driver's default.
                    let status = answer(&handle, id, b"allow everything");
                    if status == Status::INVALID_PARAMETER.raw() {
                        seen.malformed += 1;
                    } else if refused_late(status) {
                        seen.late += 1;
                    } else {
                        seen.violations
                            .push(format!("malformed #{port}: {status:#x}"));
                    }
                }
                63..71 => {
                    // Another handle of the service's may not decide it; then the right one.
                    let status = answer(&foreign, id, &reply);
                    if status == Status::ACCESS_DENIED.raw() {
                        seen.foreign += 1;
                    } else if !refused_late(status) {
                        seen.violations
                            .push(format!("foreign #{port}: {status:#x}"));
                    }
                    correctly(&handle, &mut seen);
                }
                71..79 => {
                    let first = correctly(&handle, &mut seen);
                    let second = answer(&handle, id, &reply);
                    if refused_late(second) {
                        seen.duplicates += 1;
                    } else {
                        seen.violations
                            .push(format!("duplicate #{port}: {second:#x} after {first:#x}"));
                    }
                }
                79..91 => held.push((id, reply, clock.load(Ordering::SeqCst))),
                91..94 => {
                    // Killed: both handles close with whatever they hold; a new instance
                    // starts.
                    seen.kills += 1;
                    drop(waits);
                    drop(handle);
                    drop(foreign);
                    continue 'restart;
                }
                _ => {
                    correctly(&handle, &mut seen);
                }
            }
            waits.push_back(wait_request(&handle));
        }
    }
}

// --- the tests ----------------------------------------------------------------------------------

/// Issue 11 point 3: thousands of connections from several threads against a service on the
/// channel that answers, answers malformed, from a foreign handle, twice, late, or is killed,
/// while the clock jumps past deadlines; then unload with questions held by a silent service.
/// Every attempt gets exactly one decision: the rules' when the driver took the service's
/// answer, the fail-closed default otherwise; no question goes through the port, no pend or
/// pool is left, and unload waits for none of the service's threads.
#[test]
fn every_connection_gets_exactly_one_decision_under_channel_races_and_unload() {
    const THREADS: u64 = 6;
    const PER_THREAD: u64 = 500;
    const SERVICES: u64 = 3;
    const AT_UNLOAD: u64 = 24;
    let seed = seed();
    let machine = Machine::with_worker_threads(4);
    let driver = machine
        .load_driver("firewall", race::DriverEntry)
        .expect("loads");
    let queued_before = machine.work_items_queued();
    let clock = AtomicU64::new(0);
    let silent = AtomicBool::new(false);
    let closing = AtomicBool::new(false);
    let connecting = AtomicUsize::new(THREADS as usize);
    let (machine, clock, silent, closing, connecting) =
        (&machine, &clock, &silent, &closing, &connecting);

    let (attempts, held_at_unload, seen) = thread::scope(|s| {
        let services: Vec<_> = (0..SERVICES)
            .map(|n| s.spawn(move || run_service(machine, seed ^ (n + 1), clock, silent, closing)))
            .collect();
        // The deadline: every question outstanding when the clock jumps is decided.
        let ticker = s.spawn(move || {
            while connecting.load(Ordering::SeqCst) > 0 {
                thread::sleep(Duration::from_millis(3));
                machine.advance_clock(PATIENT * 2);
                machine.wait_for_dpcs();
                clock.fetch_add(1, Ordering::SeqCst);
            }
        });
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng::new(seed, t + 1);
                    let attempts: Vec<_> = (0..PER_THREAD)
                        .map(|n| {
                            let local = 1024 + (t * PER_THREAD + n) as u16;
                            let app = if rng.below(2) == 0 { BROWSER } else { OTHER };
                            let direction = if rng.below(8) == 0 {
                                SimDirection::Inbound
                            } else {
                                SimDirection::Outbound
                            };
                            let port = [443, 80][rng.below(2) as usize];
                            let c = attempt(100 + t, app, direction, local, port);
                            let irql = if rng.below(2) == 0 {
                                AleIrql::Passive
                            } else {
                                AleIrql::Dispatch
                            };
                            let outcome = machine.connect(&c, irql);
                            let (action, pended) =
                                decided_once(&c, &outcome, &format!("{c:?} (seed {seed:#x})"));
                            (c, action, pended)
                        })
                        .collect();
                    connecting.fetch_sub(1, Ordering::SeqCst);
                    attempts
                })
            })
            .collect();
        let mut attempts: Vec<_> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a connection thread"))
            .collect();
        ticker.join().unwrap();

        // Unload under load: the services hold every new question; the attempts wait in
        // their pends until unload decides them.
        silent.store(true, Ordering::SeqCst);
        let base = machine.pending_classifications();
        let last: Vec<_> = (0..AT_UNLOAD)
            .map(|n| {
                s.spawn(move || {
                    let c = attempt(900, BROWSER, SimDirection::Outbound, 60_000 + n as u16, 443);
                    let outcome = machine.connect(&c, AleIrql::Dispatch);
                    let (action, pended) = decided_once(&c, &outcome, &format!("{c:?}"));
                    (c, action, pended)
                })
            })
            .collect();
        while machine.pending_classifications() < base + AT_UNLOAD as usize {
            thread::yield_now();
        }
        closing.store(true, Ordering::SeqCst);
        // The services' threads are blocked in their waits and hold questions: unload
        // decides those questions and waits for none of the threads.
        unload_clean(machine, driver);
        let held: Vec<_> = last.into_iter().map(|h| h.join().unwrap()).collect();
        attempts.extend(held.iter().cloned());
        let seen: Vec<Seen> = services.into_iter().map(|h| h.join().unwrap()).collect();
        (attempts, held, seen)
    });

    let mut taken: HashMap<u16, usize> = HashMap::new();
    for port in seen.iter().flat_map(|s| s.taken.iter()) {
        *taken.entry(*port).or_default() += 1;
    }
    for s in &seen {
        assert!(
            s.violations.is_empty(),
            "seed {seed:#x}: {:?}",
            s.violations
        );
    }
    let mut by_service = 0;
    for (c, action, pended) in &attempts {
        let what = format!("{c:?} (seed {seed:#x})");
        // Out and in alike: nothing is cached, so it was pended and asked.
        assert!(*pended, "{what}: nothing is cached, so it was asked");
        match taken.get(&c.local.port()) {
            Some(1) => {
                by_service += 1;
                assert_eq!(*action, rule_for(c), "{what}: the service's verdict");
            }
            None => assert_eq!(*action, Action::Block, "{what}: the default"),
            Some(n) => panic!("{what}: {n} answers taken for one question"),
        }
    }
    for (c, action, _) in &held_at_unload {
        assert_eq!(
            *action,
            Action::Block,
            "{c:?}: decided by unload, the default"
        );
    }
    let stats = race::STATS.snapshot();
    let sum = |f: fn(&Seen) -> usize| seen.iter().map(f).sum::<usize>();
    eprintln!(
        "{} attempts, {by_service} by the service; late {}, malformed {}, foreign {}, duplicates {}, kills {}; {stats}",
        attempts.len(),
        sum(|s| s.late),
        sum(|s| s.malformed),
        sum(|s| s.foreign),
        sum(|s| s.duplicates),
        sum(|s| s.kills)
    );
    assert_eq!(
        stats.asked_via_port, 0,
        "every question went through the channel"
    );
    assert_eq!(
        machine.work_items_queued(),
        queued_before,
        "no work item for any question, outbound or inbound (seed {seed:#x})"
    );
    assert_eq!(
        stats.answered as usize,
        taken.values().sum::<usize>(),
        "the driver took exactly the answers the service saw taken (outbound and inbound)"
    );
    assert!(by_service > 100, "the service decided many: {by_service}");
    for (name, n) in [
        ("malformed", sum(|s| s.malformed)),
        ("foreign", sum(|s| s.foreign)),
        ("duplicate", sum(|s| s.duplicates)),
        ("kill", sum(|s| s.kills)),
        ("late", sum(|s| s.late)),
    ] {
        assert!(n > 0, "the race ran the {name} case (seed {seed:#x})");
    }
}

/// With no service holding the channel open, a question is not asked at all (nor through the
/// port: the service opens both) and gets the default at once, without the clock reaching its
/// deadline. A service that has the channel open but no request waiting yet still
/// gets the question, queued, and decides it.
#[test]
fn without_a_service_the_default_comes_at_once() {
    assert_eq!(
        Config::DEFAULT.ask_via,
        AskVia::Channel,
        "the default design"
    );
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", no_service::DriverEntry)
        .expect("loads");
    let c = attempt(7, BROWSER, SimDirection::Outbound, 50_000, 443);
    let work_items = machine.work_items_queued();
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "no service"),
        (Action::Block, true)
    );
    let stats = no_service::STATS.snapshot();
    assert_eq!(
        (stats.asked, stats.defaults),
        (0, 1),
        "asked on neither the channel nor the port; the default"
    );
    assert_eq!(
        machine.work_items_queued(),
        work_items,
        "nobody to ask: no work item queued to find that out"
    );

    // A service that opened the channel and has not sent a request yet.
    let handle = open(&machine).expect("the service opens the channel");
    let c = attempt(7, BROWSER, SimDirection::Outbound, 50_001, 443);
    let outcome = thread::scope(|s| {
        let connecting = s.spawn(|| machine.connect(&c, AleIrql::Passive));
        while no_service::STATS.snapshot().asked_via_channel == 0 {
            thread::yield_now();
        }
        let completion = wait_request(&handle).wait();
        let (id, body) = decode_message(&completion.output).expect("a question");
        let request = ConnectionRequest::decode(body).expect("the driver's encoding");
        assert_eq!(request.local_port, 50_001);
        assert_eq!(answer(&handle, id, &reply_bytes(&request)), SUCCESS);
        connecting.join().unwrap()
    });
    assert_eq!(
        decided_once(&c, &outcome, "service without a request waiting"),
        (Action::Permit, true)
    );
    let stats = no_service::STATS.snapshot();
    assert_eq!(
        (stats.asked_via_channel, stats.answered, stats.defaults),
        (1, 1, 1)
    );
    drop(handle);
    unload_clean(&machine, driver);
}

/// A question too long for the channel's slots (a path over `ASK_MAX_PATH_UNITS`) is asked
/// whole through the port and a work item, and the service's port answer decides it.
#[test]
fn a_path_longer_than_the_channels_slots_is_asked_through_the_port() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", long_path::DriverEntry)
        .expect("loads");
    let mut client = machine.port_client(PORT_NAME);
    client.connect(&[]).expect("the service connects");
    let deep = format!(
        r"\device\harddiskvolume3\{}\tool.exe",
        "d".repeat(ASK_MAX_PATH_UNITS)
    );
    let c = attempt(8, &deep, SimDirection::Outbound, 50_002, 443);
    let outcome = thread::scope(|s| {
        let connecting = s.spawn(|| machine.connect(&c, AleIrql::Dispatch));
        let message = client.get_message(None).expect("asked on the port");
        let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
        let path: String = request.image_path.chars_lossy().collect();
        assert_eq!(path, deep, "the whole path");
        client
            .reply(message.id, &reply_bytes(&request))
            .expect("the driver waits");
        connecting.join().unwrap()
    });
    assert_eq!(
        decided_once(&c, &outcome, "long path"),
        (Action::Block, true)
    );
    let stats = long_path::STATS.snapshot();
    assert_eq!((stats.asked_via_channel, stats.asked_via_port), (0, 1));
    assert_eq!(stats.answered, 1);
    drop(client);
    unload_clean(&machine, driver);
}

/// On the channel an outbound question queues no work item (`Machine::work_items_queued`) and
/// holds no request buffer while it waits: only the channel's slot (allocated at load). The
/// port design's work item would hold the question's buffer (tag `FwRq`) until it ends.
#[test]
fn the_channel_queues_no_work_item_for_outbound() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", no_work_item::DriverEntry)
        .expect("loads");
    let queued_before = machine.work_items_queued();
    let handle = open(&machine).expect("the service opens the channel");
    let waits: Vec<_> = (0..8).map(|_| wait_request(&handle)).collect();
    let request_tag = wfp_rs::pool::PoolTag::new(b"FwRq");
    thread::scope(|s| {
        let connecting: Vec<_> = (0..8u16)
            .map(|n| {
                let machine = &machine;
                s.spawn(move || {
                    let c = attempt(9, BROWSER, SimDirection::Outbound, 51_000 + n, 443);
                    machine.connect(&c, AleIrql::Dispatch)
                })
            })
            .collect();
        let questions: Vec<_> = waits
            .iter()
            .map(|w| {
                decode_message(&w.wait().output)
                    .map(|(id, b)| (id, b.to_vec()))
                    .unwrap()
            })
            .collect();
        // Eight connections pended and asked, none answered yet. Each classification drops
        // its question's buffer once the channel has copied it (after the delivery this
        // thread saw); a work item would hold it until the answer.
        assert_eq!(machine.pending_classifications(), 8);
        let buffers = || {
            machine
                .pool_blocks()
                .iter()
                .filter(|b| b.tag == request_tag)
                .count()
        };
        let mut spins = 0;
        while buffers() != 0 && spins < 100_000 {
            thread::yield_now();
            spins += 1;
        }
        assert_eq!(
            buffers(),
            0,
            "no question buffer, so no work item, holds a waiting question"
        );
        for (id, body) in questions {
            let request = ConnectionRequest::decode(&body).unwrap();
            assert_eq!(answer(&handle, id, &reply_bytes(&request)), SUCCESS);
        }
        for c in connecting {
            assert_eq!(c.join().unwrap().decision.action, Action::Permit);
        }
    });
    let stats = no_work_item::STATS.snapshot();
    assert_eq!((stats.asked_via_channel, stats.asked_via_port), (8, 0));
    assert_eq!(
        machine.work_items_queued(),
        queued_before,
        "eight questions asked and answered, no work item queued"
    );
    drop(handle);
    unload_clean(&machine, driver);
}

/// Only the configured service may open the channel's device: another administrator's process
/// cannot receive questions or answer them.
#[test]
fn only_the_configured_service_may_open_the_channel() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", only_service::DriverEntry)
        .expect("loads");
    let admin = Process::new(
        4242,
        r"\Device\HarddiskVolume3\Users\admin\allow-all.exe",
        Caller::Administrator,
    );
    assert_eq!(
        machine.open_device(ASK_DEVICE_PATH, admin).err(),
        Some(Status::ACCESS_DENIED)
    );
    let service = Process::new(
        812,
        r"\Device\HarddiskVolume3\fw\firewall.exe",
        Caller::System,
    )
    .with_group(wfp_rs::client::Sid::parse(SERVICE_SID).unwrap());
    let handle = machine
        .open_device(ASK_DEVICE_PATH, service)
        .expect("the service opens it");
    drop(handle);
    assert_eq!(only_service::STATS.snapshot().asked, 0);
    unload_clean(&machine, driver);
}
