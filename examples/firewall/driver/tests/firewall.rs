//! The example firewall driver in the simulator, with the service played by harness threads on
//! the filter-manager port, deciding with the `firewall-rules` crate.
//!
//! Every test checks that each connection attempt got exactly one final decision (an outbound
//! attempt the driver pended: the pended classification and one reauthorization; anything
//! else: one classification, never pended inbound), that the decision is what the rules say or
//! the documented default, and that after unload no pool is left (work items and their
//! closures, the cache, every pend's bookkeeping). The simulator stops the process on any rule
//! it enforces, so a test that returns did not bugcheck.
//!
//! Nothing waits for a time to make something "probably" happen: services reply after they
//! received, tests wait for states (`wait_for_work_items`, joins), timeouts are caused by a
//! service that never replies, and random choices (latency, faults, connections) come from a
//! seeded generator whose seed is printed on failure (`WFP_TEST_SEED` replays it).

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use firewall_driver::{Config, Stats};
use firewall_protocol::{
    CacheLifetime, ConnectionReply, ConnectionRequest, Direction, PORT_NAME, Verdict,
};
use firewall_rules::{Rules, VolumeMap};
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{
    AleAuthConnectV4, AleAuthConnectV6, AleAuthRecvAcceptV4, AleAuthRecvAcceptV6, Layer,
};
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs::port::Message;
use wfp_rs::sim::{AleIrql, ConnectOutcome, Connection, LoadedDriver, Machine, PortClient};

/// Long enough never to expire while a service is answering, however slow the machine.
const PATIENT: Duration = Duration::from_secs(120);

/// Drivers with the configurations the tests need, each with its own counters.
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

const PATIENT_CONFIG: Config = Config {
    timeout: PATIENT,
    ..Config::DEFAULT
};

configured_driver!(stress, PATIENT_CONFIG);
configured_driver!(chaos, PATIENT_CONFIG);
configured_driver!(killed, PATIENT_CONFIG);
configured_driver!(replies, PATIENT_CONFIG);
configured_driver!(alloc, PATIENT_CONFIG);
configured_driver!(unload_busy, PATIENT_CONFIG);
configured_driver!(unload_silent, PATIENT_CONFIG);
configured_driver!(no_service, PATIENT_CONFIG);
configured_driver!(caching, PATIENT_CONFIG);
configured_driver!(inbound, PATIENT_CONFIG);
configured_driver!(loopback, PATIENT_CONFIG);
configured_driver!(
    impatient,
    Config {
        timeout: Duration::from_millis(50),
        ..Config::DEFAULT
    }
);
configured_driver!(
    fail_open,
    Config {
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    small_cache,
    Config {
        cache_capacity: 4,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    no_cache,
    Config {
        cache_capacity: 0,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    inbound_bounded,
    Config {
        background_asks: 3,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    loopback_asked,
    Config {
        permit_loopback: false,
        ..PATIENT_CONFIG
    }
);

// --- the policy --------------------------------------------------------------------------------

const RULES: &str = r#"
default = "deny"

[[rule]]
name = "blocked-net"
action = "deny"
remote = "198.51.100.0/26"

[[rule]]
name = "browser"
action = "allow"
app = 'C:\apps\browser.exe'
protocol = "tcp"
port = [80, 443]
direction = "outbound"

[[rule]]
name = "dns"
action = "allow"
protocol = "udp"
port = 53
direction = "outbound"

[[rule]]
name = "ssh-in"
action = "allow"
direction = "inbound"
protocol = "tcp"
port = 22

[[rule]]
name = "tool"
action = "allow"
app = 'C:\apps\tool.exe'
"#;

/// The same policy after a reload: the tool may no longer connect, port 8080 may.
const RELOADED_RULES: &str = r#"
default = "deny"

[[rule]]
name = "tool-banned"
action = "deny"
app = 'C:\apps\tool.exe'

[[rule]]
name = "web-8080"
action = "allow"
port = 8080
"#;

const APPS: [&str; 3] = [
    r"\device\harddiskvolume3\apps\browser.exe",
    r"\device\harddiskvolume3\apps\tool.exe",
    r"\device\harddiskvolume3\apps\other.exe",
];

fn rules(text: &str) -> Rules {
    Rules::parse_named("test-rules.toml", text).expect("the test policy parses")
}

fn volumes() -> VolumeMap {
    let mut volumes = VolumeMap::new();
    volumes.insert(r"\device\harddiskvolume3", 'C');
    volumes
}

fn verdict_of(verdict: firewall_rules::Verdict) -> Verdict {
    match verdict {
        firewall_rules::Verdict::Allow => Verdict::Allow,
        firewall_rules::Verdict::Deny => Verdict::Deny,
    }
}

/// What the rules say about a request, as the service decides it.
fn decide_request(rules: &Rules, request: &ConnectionRequest) -> Verdict {
    let app: String = request.image_path.chars_lossy().collect();
    let connection = firewall_rules::Connection {
        app: volumes().to_dos_path(&app),
        remote: request.remote_address,
        port: request.remote_port,
        protocol: request.ip_protocol,
        direction: match request.direction {
            Direction::Outbound => firewall_rules::Direction::Outbound,
            Direction::Inbound => firewall_rules::Direction::Inbound,
        },
    };
    verdict_of(rules.decide(&connection).verdict)
}

/// What the rules say about a connection, as the test sees it.
fn decide_connection(rules: &Rules, c: &Connection) -> Verdict {
    let connection = firewall_rules::Connection {
        app: volumes().to_dos_path(&c.app),
        remote: c.remote.ip(),
        port: c.remote.port(),
        protocol: c.protocol.into(),
        direction: match c.direction {
            SimDirection::Outbound => firewall_rules::Direction::Outbound,
            SimDirection::Inbound => firewall_rules::Direction::Inbound,
        },
    };
    verdict_of(rules.decide(&connection).verdict)
}

fn action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Allow => Action::Permit,
        Verdict::Deny => Action::Block,
    }
}

// --- connections ---------------------------------------------------------------------------------

fn local_ip(remote: IpAddr) -> IpAddr {
    match remote {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    }
}

fn connection(
    pid: u64,
    app: &str,
    protocol: IpProtocol,
    direction: SimDirection,
    local_port: u16,
    remote: SocketAddr,
) -> Connection {
    Connection {
        pid,
        app: app.into(),
        protocol,
        local: SocketAddr::new(local_ip(remote.ip()), local_port),
        remote,
        direction,
    }
}

/// The browser (pid 100) connects out over TCP to `remote`.
fn browser(local_port: u16, remote: SocketAddr) -> Connection {
    connection(
        100,
        APPS[0],
        IpProtocol::Tcp,
        SimDirection::Outbound,
        local_port,
        remote,
    )
}

fn web(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(192, 0, 2, last).into(), port)
}

/// The layer the driver decides at for `c`.
fn auth_layer(c: &Connection) -> &'static str {
    match (c.direction, c.remote.is_ipv4()) {
        (SimDirection::Outbound, true) => AleAuthConnectV4::NAME,
        (SimDirection::Outbound, false) => AleAuthConnectV6::NAME,
        (SimDirection::Inbound, true) => AleAuthRecvAcceptV4::NAME,
        (SimDirection::Inbound, false) => AleAuthRecvAcceptV6::NAME,
    }
}

/// Checks that `outcome` is exactly one final decision by the driver for `c`, and returns it
/// with whether the attempt was pended.
fn decided_once(c: &Connection, outcome: &ConnectOutcome, what: &str) -> (Action, bool) {
    let layer = auth_layer(c);
    let at_auth: Vec<_> = outcome
        .layers
        .iter()
        .filter(|(name, _)| *name == layer)
        .map(|(_, decision)| *decision)
        .collect();
    if outcome.pended {
        assert_eq!(
            c.direction,
            SimDirection::Outbound,
            "{what}: never pended inbound"
        );
        assert_eq!(
            at_auth.len(),
            2,
            "{what}: a pended attempt is classified twice, the pend and its one reauthorization: {outcome:?}"
        );
        assert!(
            at_auth[0].absorbed && at_auth[0].action == Action::Block,
            "{what}: a pended classification is BLOCK + ABSORB: {outcome:?}"
        );
    } else {
        assert_eq!(at_auth.len(), 1, "{what}: classified once: {outcome:?}");
    }
    let last = at_auth.last().expect("classified");
    assert!(
        last.filter_id.is_some(),
        "{what}: the driver's filter decided: {outcome:?}"
    );
    assert!(last.pending.is_none(), "{what}: nothing left pending");
    assert_eq!(outcome.decision.action, last.action, "{what}: final");
    assert_eq!(
        outcome.flow_handle.is_some(),
        last.action == Action::Permit,
        "{what}: only a permitted connection is established"
    );
    (last.action, outcome.pended)
}

fn load(machine: &Machine, entry: wfp_rs::sim::DriverEntryFn) -> LoadedDriver {
    machine.load_driver("firewall", entry).expect("loads")
}

/// Unloads and checks that nothing is left behind.
fn unload_clean(machine: &Machine, driver: LoadedDriver) {
    assert_eq!(machine.pending_classifications(), 0, "no pend left");
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pending_classifications(), 0, "no pend left");
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
    let last = machine.debug_output().last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("firewall: unloaded ("),
        "unload reported no error: {last:?}"
    );
}

// --- seeded randomness -------------------------------------------------------------------------

/// The seed: `WFP_TEST_SEED` (decimal or 0x-hex) to replay a failure, or a fixed default.
fn seed() -> u64 {
    let seed = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(0xF1_4E_3A_11_D0_00_00_05);
    eprintln!("seed {seed:#x} (replay with WFP_TEST_SEED={seed:#x})");
    seed
}

/// xorshift64*.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn irql(&mut self) -> AleIrql {
        if self.next() & 1 == 0 {
            AleIrql::Passive
        } else {
            AleIrql::Dispatch
        }
    }

    /// A service's thinking time: up to 300 µs, sometimes none.
    fn latency(&mut self) -> Duration {
        match self.below(4) {
            0 => Duration::ZERO,
            _ => Duration::from_micros(self.below(300)),
        }
    }

    /// A connection attempt from a small population, so keys repeat and the cache answers:
    /// 12 processes (each one of three apps), TCP or UDP, mostly outbound, to a few remotes
    /// over IPv4 and IPv6 and a few ports.
    fn attempt(&mut self, local_port: u16) -> Connection {
        let pid = 100 + self.below(12);
        let app = APPS[(pid % 3) as usize];
        let protocol = if self.below(3) == 0 {
            IpProtocol::Udp
        } else {
            IpProtocol::Tcp
        };
        let direction = if self.below(5) == 0 {
            SimDirection::Inbound
        } else {
            SimDirection::Outbound
        };
        let ip: IpAddr = match self.below(5) {
            0 => Ipv4Addr::new(192, 0, 2, 7).into(),
            1 => Ipv4Addr::new(198, 51, 100, 9).into(),
            2 => Ipv4Addr::new(203, 0, 113, 80).into(),
            3 => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80).into(),
            _ => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53).into(),
        };
        let port = [22, 53, 80, 443, 8080][self.below(5) as usize];
        connection(
            pid,
            app,
            protocol,
            direction,
            local_port,
            SocketAddr::new(ip, port),
        )
    }
}

// --- the simulated service ---------------------------------------------------------------------

fn connected_client(machine: &Machine) -> PortClient {
    let mut client = machine.port_client(PORT_NAME);
    client.connect(&[]).expect("the service connects");
    client
}

fn encode_reply(reply: ConnectionReply) -> Vec<u8> {
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    let len = reply.encode(&mut out).unwrap();
    out.truncate(len);
    out
}

/// The reply the service gives under `rules`, cached for a minute.
fn answer(rules: &Rules, request: &ConnectionRequest) -> (Verdict, Vec<u8>) {
    let verdict = decide_request(rules, request);
    let reply = request
        .reply(verdict)
        .cached_for(CacheLifetime::from_secs(60).unwrap());
    (verdict, encode_reply(reply))
}

/// What the service did with one request.
#[derive(Clone, Debug)]
struct Answered {
    request: ConnectionRequest,
    /// The verdict it sent in a valid reply, `None` for a fault (or no reply).
    valid: Option<Verdict>,
}

/// The answers, shared by the service's threads.
type Log = Arc<Mutex<Vec<Answered>>>;

/// A well-behaved service: `threads` threads share one connection and answer every request by
/// `rules` after a random latency, until the connection goes away. Returns the log and the
/// threads.
fn serve(
    machine: &Machine,
    rules: Arc<Mutex<Rules>>,
    threads: u64,
    seed: u64,
) -> (Log, Vec<thread::JoinHandle<()>>) {
    let client = Arc::new(connected_client(machine));
    let log: Log = Arc::default();
    let handles = (0..threads)
        .map(|t| {
            let (client, log, rules) = (Arc::clone(&client), Arc::clone(&log), Arc::clone(&rules));
            thread::spawn(move || {
                let mut rng = Rng::new(seed, 1000 + t);
                while let Some(message) = client.get_message(None) {
                    let request =
                        ConnectionRequest::decode(&message.data).expect("the driver's encoding");
                    thread::sleep(rng.latency());
                    // Decided and logged under the lock, so a reload is either before or after.
                    let mut log = log.lock().unwrap();
                    let (verdict, bytes) = answer(&rules.lock().unwrap(), &request);
                    match client.reply(message.id, &bytes) {
                        Ok(()) => log.push(Answered {
                            request,
                            valid: Some(verdict),
                        }),
                        // The driver closed the connection (at unload): nobody waits.
                        Err(Status::PORT_DISCONNECTED) => break,
                        Err(status) => panic!("the driver is waiting for this reply: {status}"),
                    }
                }
            })
        })
        .collect();
    (log, handles)
}

/// Runs `per_thread` attempts on each of `threads` threads, attempt `n` of thread `t` from
/// local port `base + t * per_thread + n` (so no two attempts share a local port), drawn from
/// the seeded population; checks each was decided exactly once. Returns each attempt, its
/// decision and whether it was pended.
fn run_attempts(
    machine: &Machine,
    seed: u64,
    threads: u64,
    per_thread: u64,
    base: u16,
) -> Vec<(Connection, Action, bool)> {
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng::new(seed, t + 1);
                    (0..per_thread)
                        .map(|n| {
                            let local = base + (t * per_thread + n) as u16;
                            let c = rng.attempt(local);
                            let outcome = machine.connect(&c, rng.irql());
                            let what = format!("{c:?} (seed {seed:#x})");
                            let (action, pended) = decided_once(&c, &outcome, &what);
                            (c, action, pended)
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
}

// --- the tests -------------------------------------------------------------------------------

/// Issue 5, point 6: 10,000 attempts from 8 threads, out and in, TCP and UDP, IPv4 and IPv6, at
/// PASSIVE_LEVEL and DISPATCH_LEVEL, with a service of 4 threads answering after a random
/// latency. Every attempt is decided once: outbound exactly as the rules say (asked, or from
/// the cache); inbound as the rules say when cached, else the fail-closed default (so a permit
/// is always the rules'). The service was asked once per pended attempt, about that attempt.
#[test]
fn ten_thousand_attempts_from_eight_threads_are_each_decided_once_by_the_rules() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 1_250;
    let seed = seed();
    let machine = Machine::with_worker_threads(8);
    let driver = load(&machine, stress::DriverEntry);
    let policy = Arc::new(Mutex::new(rules(RULES)));
    let (log, service) = serve(&machine, Arc::clone(&policy), 4, seed);

    let attempts = run_attempts(&machine, seed, THREADS, PER_THREAD, 1_024);
    assert_eq!(machine.pending_classifications(), 0);
    machine.wait_for_work_items();
    let stats = stress::STATS.snapshot();
    unload_clean(&machine, driver);
    for thread in service {
        thread.join().expect("a service thread");
    }

    let policy = policy.lock().unwrap();
    let log = log.lock().unwrap();
    let by_port: HashMap<u16, &Answered> = log
        .iter()
        .filter(|a| a.request.direction == Direction::Outbound)
        .map(|a| (a.request.local_port, a))
        .collect();
    assert_eq!(attempts.len(), (THREADS * PER_THREAD) as usize);
    let (mut pended, mut inbound_defaults) = (0, 0);
    for (c, decided, was_pended) in &attempts {
        let what = format!("{c:?} (seed {seed:#x})");
        let rule = action(decide_connection(&policy, c));
        match c.direction {
            SimDirection::Outbound => {
                assert_eq!(*decided, rule, "{what}");
                if *was_pended {
                    pended += 1;
                    let asked = by_port.get(&c.local.port()).expect("asked about it");
                    assert_eq!(asked.request.process_id, c.pid, "{what}");
                    assert_eq!(asked.request.remote_address, c.remote.ip(), "{what}");
                    assert_eq!(asked.request.remote_port, c.remote.port(), "{what}");
                    assert_eq!(u8::from(c.protocol), asked.request.ip_protocol, "{what}");
                    let path: String = asked.request.image_path.chars_lossy().collect();
                    assert_eq!(path, c.app, "{what}");
                }
            }
            SimDirection::Inbound => {
                if *decided != rule {
                    assert_eq!(*decided, Action::Block, "{what}: the default");
                    inbound_defaults += 1;
                }
            }
        }
    }
    let outbound_asked = log
        .iter()
        .filter(|a| a.request.direction == Direction::Outbound)
        .count();
    assert_eq!(outbound_asked, pended, "one question per pended attempt");
    assert_eq!(stats.asked as usize, log.len(), "every question answered");
    assert_eq!(stats.answered, stats.asked);
    assert!(
        stats.cache_hits > 1_000,
        "repeated keys are answered from the cache: {stats:?}"
    );
    assert!(pended > 100, "and new ones are asked: {pended}");
    assert!(stats.defaults >= inbound_defaults, "{stats:?}");
    for version_v4 in [true, false] {
        assert!(
            attempts
                .iter()
                .any(|(c, _, p)| *p && c.remote.is_ipv4() == version_v4),
            "both IP versions were pended (seed {seed:#x})"
        );
    }
    eprintln!(
        "{} attempts: {pended} pended, {inbound_defaults} inbound defaults; {stats:?}",
        attempts.len()
    );
}
