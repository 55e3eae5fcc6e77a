//! The example firewall driver in the simulator, with the service played by harness threads
//! deciding with the `firewall-rules` crate.
//!
//! Every scenario runs on both designs, as `on_channel::…` (the question channel, the default)
//! and `on_port::…` (the filter-manager port and a work item): the service answers where the
//! driver asks ([`ServiceClient`]), and the scenario expects the same decisions; only what the
//! designs log differently is spelled out per design. A few tests load the shipped
//! `DriverEntry` (the default design) or test only the load, and run once. `tests/channel.rs`
//! covers what only the channel does (foreign and duplicate answers, the clock's deadlines).
//!
//! Every test checks that each connection attempt got exactly one final decision (an outbound
//! attempt the driver pended: the pended classification and one reauthorization; an inbound
//! one: the pended classification, and its reinjected clone's if the verdict allowed; anything
//! else: one classification), that the decision is what the rules say or
//! the documented default, and that after unload no pool is left (work items and their
//! closures, the cache, every pend's bookkeeping). The simulator stops the process on any rule
//! it enforces, so a test that returns did not bugcheck.
//!
//! Nothing waits for a time to make something "probably" happen: services reply after they
//! received, tests wait for states (log lines, counters, joins), timeouts are caused by a
//! service that never replies, and random choices (latency, faults, connections) come from a
//! seeded generator whose seed is printed on failure (`WFP_TEST_SEED` replays it).

#![cfg(any(not(windows), feature = "sim"))]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use firewall_driver::{AskVia, Config, Stats};
use firewall_protocol::control::{
    CONTROL_DEVICE_PATH, MAX_REVOKE_IDS, REVOKE, REVOKE_MAX_LEN, Revoke, Revoked,
};
use firewall_protocol::{
    ASK_CHANNEL, ASK_DEVICE_PATH, CacheLifetime, ConnectionReply, ConnectionRequest, Direction,
    PORT_NAME, Verdict,
};
use firewall_rules::{Rules, VolumeMap};
use wfp_rs::Status;
use wfp_rs::ask::{QuestionId, decode_message, encode_header};
use wfp_rs::classify::Action;
use wfp_rs::inverted::{ControlCode, RequiredAccess};
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::layer::{
    AleAuthConnectV4, AleAuthConnectV6, AleAuthRecvAcceptV4, AleAuthRecvAcceptV6, Layer,
};
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs::port::Message;
use wfp_rs_sim::{
    AleIrql, Caller, ClassifyRequest, ConnectOutcome, Connection, Decision, DeviceHandle,
    IoRequest, LoadedDriver, Machine, PortClient, Process,
};

/// Long enough never to expire while a service is answering, however slow the machine.
const PATIENT: Duration = Duration::from_secs(120);

/// A driver of the configuration the tests need on each design, with its own counters.
#[derive(Clone, Copy)]
struct Configured {
    entry: wfp_rs_sim::DriverEntryFn,
    stats: &'static Stats,
}

/// Drivers with the configurations the tests need, each on both designs (`$module::on(design)`),
/// each with its own counters.
macro_rules! configured_driver {
    ($module:ident, $config:expr) => {
        mod $module {
            use super::*;

            configured_driver!(@on channel, AskVia::Channel, $config);
            configured_driver!(@on port, AskVia::PortAndWorkItem, $config);

            /// This configuration, asking through `design`.
            pub fn on(design: AskVia) -> Configured {
                match design {
                    AskVia::Channel => Configured {
                        entry: channel::DriverEntry,
                        stats: &channel::STATS,
                    },
                    AskVia::PortAndWorkItem => Configured {
                        entry: port::DriverEntry,
                        stats: &port::STATS,
                    },
                }
            }
        }
    };
    (@on $design:ident, $ask_via:expr, $config:expr) => {
        pub mod $design {
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
                        ask_via: $ask_via,
                        ..$config
                    },
                )
            }
        }
    };
}

/// Every scenario taking the design as `fn scenario(design: AskVia)`, as a test on each:
/// `on_channel::scenario` and `on_port::scenario`.
macro_rules! on_both_designs {
    ($($scenario:ident),* $(,)?) => {
        mod on_channel {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(firewall_driver::AskVia::Channel);
                }
            )*
        }
        mod on_port {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(firewall_driver::AskVia::PortAndWorkItem);
                }
            )*
        }
    };
}

/// Deadlines the tests never reach by waiting; each `configured_driver!` sets the design.
const PATIENT_CONFIG: Config = Config {
    timeout: PATIENT,
    ..Config::DEFAULT
};

configured_driver!(stress, PATIENT_CONFIG);
configured_driver!(chaos, PATIENT_CONFIG);
configured_driver!(killed, PATIENT_CONFIG);
configured_driver!(killed_inbound, PATIENT_CONFIG);
configured_driver!(replies, PATIENT_CONFIG);
configured_driver!(alloc, PATIENT_CONFIG);
configured_driver!(unload_busy, PATIENT_CONFIG);
configured_driver!(unload_silent, PATIENT_CONFIG);
configured_driver!(
    unload_fail_open,
    Config {
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);
configured_driver!(no_service, PATIENT_CONFIG);
configured_driver!(caching, PATIENT_CONFIG);
configured_driver!(inbound, PATIENT_CONFIG);
configured_driver!(inbound_local_port, PATIENT_CONFIG);
configured_driver!(
    inbound_unpended,
    Config {
        max_pending: 0,
        ..PATIENT_CONFIG
    }
);
configured_driver!(loopback, PATIENT_CONFIG);
configured_driver!(revoking, PATIENT_CONFIG);
configured_driver!(established, PATIENT_CONFIG);
configured_driver!(reload, PATIENT_CONFIG);
configured_driver!(expiry, PATIENT_CONFIG);
configured_driver!(burst, PATIENT_CONFIG);
configured_driver!(overload, PATIENT_CONFIG);
configured_driver!(unload_reserved, PATIENT_CONFIG);
configured_driver!(
    overload_small,
    Config {
        max_pending: 3,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    overload_fail_open,
    Config {
        max_pending: 3,
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    overload_permits,
    Config {
        max_pending: 3,
        default: Verdict::Allow,
        overload: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    impatient,
    Config {
        timeout: Duration::from_millis(50),
        ..PATIENT_CONFIG
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
        max_pending: 0,
        background_asks: 3,
        ..PATIENT_CONFIG
    }
);
/// The service's per-service SID in these tests (any S-1-5-80 SID will do).
const SERVICE_SID: &str = "S-1-5-80-1111111111-2222222222-3333333333-4044444444-555555555";
const SERVICE_IMAGE: &str = r"\Device\HarddiskVolume3\Program Files\Firewall\firewall.exe";
configured_driver!(
    only_service,
    Config {
        service_sid: Some(SERVICE_SID),
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    only_service_image,
    Config {
        service_image: Some(SERVICE_IMAGE),
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    bad_service_sid,
    Config {
        service_sid: Some("S-1-5-80-not-a-number"),
        ..PATIENT_CONFIG
    }
);
// The channel's question slots each have a timer, an allocation: the default 2056 would make
// the load's allocation-failure test quadratic.
configured_driver!(
    load,
    Config {
        max_pending: 3,
        background_asks: 1,
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
local_port = 22

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
    verdict_of(rules.decide(&rules_connection(request)).verdict)
}

/// A request as the service's rules see it.
fn rules_connection(request: &ConnectionRequest) -> firewall_rules::Connection {
    let app: String = request.image_path.chars_lossy().collect();
    firewall_rules::Connection {
        app: volumes().to_dos_path(&app),
        remote: request.remote_address,
        port: request.remote_port,
        local_port: request.local_port,
        protocol: request.ip_protocol,
        direction: match request.direction {
            Direction::Outbound => firewall_rules::Direction::Outbound,
            Direction::Inbound => firewall_rules::Direction::Inbound,
        },
    }
}

/// What the rules say about a connection, as the test sees it.
fn decide_connection(rules: &Rules, c: &Connection) -> Verdict {
    let connection = firewall_rules::Connection {
        app: volumes().to_dos_path(&c.app),
        remote: c.remote.ip(),
        port: c.remote.port(),
        local_port: c.local.port(),
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
/// with whether the attempt was pended. An outbound attempt the driver pended is classified
/// twice at its layer (the pend, and its one reauthorization); an inbound one is classified
/// once (the pend, which absorbs its packet), and once more only if the verdict allowed: its
/// reinjected clone, which the driver permits as its own.
fn decided_once(c: &Connection, outcome: &ConnectOutcome, what: &str) -> (Action, bool) {
    let layer = auth_layer(c);
    let at_auth: Vec<_> = outcome
        .layers
        .iter()
        .filter(|(name, _)| *name == layer)
        .map(|(_, decision)| *decision)
        .collect();
    if outcome.pended {
        assert!(
            at_auth[0].absorbed && at_auth[0].action == Action::Block,
            "{what}: a pended classification is BLOCK + ABSORB: {outcome:?}"
        );
        match c.direction {
            SimDirection::Outbound => assert_eq!(
                at_auth.len(),
                2,
                "{what}: a pended attempt is classified twice, the pend and its one reauthorization: {outcome:?}"
            ),
            SimDirection::Inbound if at_auth.len() == 1 => {
                // Denied: the clone was freed, the absorbed packet is gone.
                assert_eq!(outcome.flow_handle, None, "{what}: {outcome:?}");
                assert_eq!(outcome.decision.action, Action::Block, "{what}");
                return (Action::Block, true);
            }
            SimDirection::Inbound => assert_eq!(
                at_auth.len(),
                2,
                "{what}: a pended inbound attempt is classified once more only as its reinjected clone: {outcome:?}"
            ),
        }
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

fn load(machine: &Machine, entry: wfp_rs_sim::DriverEntryFn) -> LoadedDriver {
    machine.load_driver("firewall", entry).expect("loads")
}

/// Unloads and checks that nothing is left behind.
fn unload_clean(machine: &Machine, driver: LoadedDriver) {
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

/// The wait requests a simulated service keeps pending on the question channel's device.
const WAITS: usize = 8;

/// How long a channel client waits for its channel before it looks at the port again.
const POLL: Duration = Duration::from_millis(2);

/// Which question a [`Received`] is, to answer it where it came from.
#[derive(Clone, Copy, Debug)]
enum QuestionFrom {
    Port(u64),
    Channel(QuestionId),
}

/// A question the simulated service received, on the port or the channel.
#[derive(Clone, Debug)]
struct Received {
    id: QuestionFrom,
    /// The request, as the driver encoded it.
    data: Vec<u8>,
}

/// The service's end of the question channel: a handle to its device with [`WAITS`] wait
/// requests pending, oldest first (the driver completes the oldest first).
struct ChannelEnd {
    handle: DeviceHandle,
    waits: Mutex<std::collections::VecDeque<IoRequest>>,
}

impl ChannelEnd {
    fn wait_request(&self) -> IoRequest {
        self.handle
            .device_io_control(ASK_CHANNEL.wait.raw(), &[], ASK_CHANNEL.wait_output_len())
    }

    /// The next question delivered within `within`: `Err` once the channel is closed (unload)
    /// or the handle is.
    fn next(&self, within: Duration) -> Result<Option<Received>, ()> {
        let Some(wait) = self.waits.lock().unwrap().pop_front() else {
            // Every wait is with another of the service's threads.
            thread::sleep(within);
            return Ok(None);
        };
        let Some(completion) = wait.wait_timeout(within) else {
            self.waits.lock().unwrap().push_front(wait);
            return Ok(None);
        };
        if completion.status != 0 {
            return Err(());
        }
        self.waits.lock().unwrap().push_back(self.wait_request());
        let (id, body) = decode_message(&completion.output).expect("the channel's framing");
        Ok(Some(Received {
            id: QuestionFrom::Channel(id),
            data: body.to_vec(),
        }))
    }
}

/// The simulated service, on the design the driver asks through: a connection to the port and,
/// on the channel design, the question channel's device too — a question too long for the
/// channel's slots comes through the port even then, so the service listens on both, as the
/// real one does. Several threads may share one.
///
/// A reply is refused as on the port whatever the design, so the scenarios read the same: the
/// channel's `STATUS_NOT_FOUND` (the question was decided without it: late, or by unload) is
/// `STATUS_FLT_NO_WAITER_FOR_REPLY`, and `STATUS_DELETE_PENDING` (the channel is gone) is
/// `STATUS_PORT_DISCONNECTED`. A malformed answer is taken as on the port, where user mode is
/// not told: the driver decided with its default, and the channel's `STATUS_INVALID_PARAMETER`
/// says so.
struct ServiceClient {
    port: PortClient,
    channel: Option<ChannelEnd>,
}

impl ServiceClient {
    /// Connects as `process` (the port, then the channel's device).
    fn connect_as(machine: &Machine, design: AskVia, process: Process) -> Result<Self, Status> {
        let mut port = machine.port_client(PORT_NAME).as_process(process.clone());
        port.connect(&[])?;
        let channel = match design {
            AskVia::PortAndWorkItem => None,
            AskVia::Channel => {
                let handle = machine.open_device(ASK_DEVICE_PATH, process)?;
                let end = ChannelEnd {
                    handle,
                    waits: Mutex::default(),
                };
                for _ in 0..WAITS {
                    let wait = end.wait_request();
                    end.waits.lock().unwrap().push_back(wait);
                }
                Some(end)
            }
        };
        Ok(ServiceClient { port, channel })
    }

    /// Connects as LocalSystem.
    fn connect(machine: &Machine, design: AskVia) -> Result<Self, Status> {
        ServiceClient::connect_as(machine, design, Process::from(Caller::System))
    }

    /// The next question, waiting at most `timeout` (`None`: until one comes); `None` on
    /// timeout or once the driver closed the port (and the channel).
    fn get_message(&self, timeout: Option<Duration>) -> Option<Received> {
        let from_port = |message: wfp_rs_sim::PortMessage| Received {
            id: QuestionFrom::Port(message.id),
            data: message.data,
        };
        let Some(channel) = &self.channel else {
            return self.port.get_message(timeout).map(from_port);
        };
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(message) = self.port.get_message(Some(Duration::ZERO)) {
                return Some(from_port(message));
            }
            match channel.next(POLL) {
                Ok(Some(question)) => return Some(question),
                Ok(None) => {}
                Err(()) => return None,
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return None;
            }
        }
    }

    /// Replies to `id`, where it came from (see the type's documentation for the statuses).
    fn reply(&self, id: QuestionFrom, reply: &[u8]) -> Result<(), Status> {
        let (channel, id) = match (id, &self.channel) {
            (QuestionFrom::Port(id), _) => return self.port.reply(id, reply),
            (QuestionFrom::Channel(id), Some(channel)) => (channel, id),
            (QuestionFrom::Channel(_), None) => panic!("a channel question on the port design"),
        };
        let mut input = encode_header(id, reply.len()).to_vec();
        input.extend_from_slice(reply);
        let status = channel
            .handle
            .device_io_control(ASK_CHANNEL.answer.raw(), &input, 0)
            .wait()
            .status;
        if status == 0 {
            return Ok(());
        }
        match Status::from_raw(status) {
            Status::INVALID_PARAMETER => Ok(()),
            Status::NOT_FOUND => Err(Status::FLT_NO_WAITER_FOR_REPLY),
            Status::DELETE_PENDING => Err(Status::PORT_DISCONNECTED),
            other => Err(other),
        }
    }

    /// Whether the driver still listens: the port connection is open and, on the channel
    /// design, a wait request is still pending (unload closes both).
    fn is_connected(&self) -> bool {
        let waiting =
            |end: &ChannelEnd| end.waits.lock().unwrap().iter().any(IoRequest::is_pending);
        self.port.is_connected() && self.channel.as_ref().is_none_or(waiting)
    }

    /// Killed: closes the port connection and the channel's handle, with whatever questions
    /// they hold unanswered.
    fn disconnect(&mut self) {
        self.port.disconnect();
        self.channel = None;
    }
}

fn connected_client(machine: &Machine, design: AskVia) -> ServiceClient {
    ServiceClient::connect(machine, design).expect("the service connects")
}

fn encode_reply(reply: ConnectionReply) -> Vec<u8> {
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    let len = reply.encode(&mut out).unwrap();
    out.truncate(len);
    out
}

/// The reply the service gives under `rules`, cached for a minute unless, like the service, it
/// must not be: an outbound verdict that depends on the local port, which the driver's cache
/// key leaves out.
fn answer(rules: &Rules, request: &ConnectionRequest) -> (Verdict, Vec<u8>) {
    let decision = rules.decide(&rules_connection(request));
    let verdict = verdict_of(decision.verdict);
    let mut reply = request.reply(verdict);
    if !(decision.local_port_matters && request.direction == Direction::Outbound) {
        reply = reply.cached_for(CacheLifetime::from_secs(60).unwrap());
    }
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
    design: AskVia,
    rules: Arc<Mutex<Rules>>,
    threads: u64,
    seed: u64,
) -> (Log, Vec<thread::JoinHandle<()>>) {
    let client = Arc::new(connected_client(machine, design));
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
                        // Decided without it: on the channel, `stopping` decides the questions it holds.
                        Err(Status::FLT_NO_WAITER_FOR_REPLY) if client.channel.is_some() => {}
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

// --- every scenario, on both designs ---------------------------------------------------------

on_both_designs! {
    ten_thousand_attempts_from_eight_threads_are_each_decided_once_by_the_rules,
    faults_under_load_give_the_rules_or_the_default_and_nothing_else,
    a_killed_service_gives_the_default_until_it_is_restarted,
    a_killed_service_gives_the_default_to_pended_inbound_attempts,
    no_reply_within_the_timeout_gives_the_default,
    short_oversized_malformed_and_mismatched_replies_give_the_default,
    allocation_failures_fall_back_to_the_default,
    unload_with_questions_outstanding_decides_every_pended_connection,
    unload_with_inbound_pends_outstanding_reinjects_them_when_failing_open,
    unload_under_load_decides_every_attempt_once,
    without_a_service_everything_gets_the_fail_closed_default,
    a_fail_open_configuration_permits_without_a_service,
    the_cache_answers_known_connections_at_once,
    a_full_cache_evicts_the_oldest_verdict,
    inbound_first_attempts_get_the_services_verdict,
    inbound_beyond_the_bound_gets_the_default_then_the_services_cached_verdict,
    inbound_verdicts_are_cached_per_local_port,
    inbound_background_asks_are_bounded,
    loopback_is_permitted_without_asking_unless_configured_otherwise,
    the_revoke_command_forgets_cached_verdicts,
    a_rules_change_cuts_the_established_connections_the_new_rules_deny,
    a_rules_reload_with_revoke_mid_stream_gives_no_stale_verdict,
    cached_verdicts_expire_after_their_lifetime,
    a_burst_beyond_the_old_table_size_gets_every_services_verdict,
    beyond_the_verdict_table_new_connections_get_the_overload_decision_and_nothing_recorded_is_lost,
    max_pending_counts_connections_waiting_for_the_service,
    a_fail_open_default_does_not_open_the_firewall_to_a_burst,
    an_overload_decision_of_allow_permits_and_is_counted,
    unload_waits_for_the_reauthorizations_of_completed_pends,
    every_allocation_failure_during_load_is_reported_and_leaks_nothing,
    only_the_configured_service_may_connect_or_send_commands,
    while_the_service_restarts_another_admin_cannot_answer,
    a_configured_image_refuses_other_executables,
    a_malformed_service_sid_fails_the_load,
    without_an_identity_the_driver_warns_that_any_admin_may_answer,
    a_program_from_a_long_path_is_denied_by_the_rule_naming_its_file,
    a_path_no_request_can_carry_whole_is_denied_without_asking,
    the_questions_of_the_moment_hold_at_most_question_bytes_of_pool,
    an_image_crafted_to_collide_under_fnv1a_does_not_inherit_a_cached_verdict,
}

// --- the tests -------------------------------------------------------------------------------

/// Issue 5, point 6: 10,000 attempts from 8 threads, out and in, TCP and UDP, IPv4 and IPv6, at
/// PASSIVE_LEVEL and DISPATCH_LEVEL, with a service of 4 threads answering after a random
/// latency. Every attempt is decided once: outbound exactly as the rules say (asked, or from
/// the cache), inbound too — its first attempt pended, asked and its packet reinjected if
/// allowed. The service was asked once per pended attempt, about that attempt, and never about
/// a reinjected packet.
fn ten_thousand_attempts_from_eight_threads_are_each_decided_once_by_the_rules(design: AskVia) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 1_250;
    let seed = seed();
    let machine = Machine::with_worker_threads(8);
    let driver = load(&machine, stress::on(design).entry);
    let policy = Arc::new(Mutex::new(rules(RULES)));
    let (log, service) = serve(&machine, design, Arc::clone(&policy), 4, seed);

    let attempts = run_attempts(&machine, seed, THREADS, PER_THREAD, 1_024);
    assert_eq!(machine.pending_classifications(), 0);
    // The inbound misses' background questions are answered before the unload.
    let misses = stress::on(design).stats.snapshot();
    wait_for_background_asks(
        &machine,
        (misses.background_asks + misses.background_skipped) as usize,
    );
    unload_clean(&machine, driver);
    let stats = stress::on(design).stats.snapshot();
    asked_only_via(design, &stats);
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
    let (mut pended, mut inbound_pended) = (0, 0);
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
            // A first attempt too: pended, asked, and reinjected if allowed.
            SimDirection::Inbound => {
                assert_eq!(*decided, rule, "{what}");
                if *was_pended {
                    inbound_pended += 1;
                }
            }
        }
    }
    let outbound_asked = log
        .iter()
        .filter(|a| a.request.direction == Direction::Outbound)
        .count();
    assert_eq!(outbound_asked, pended, "one question per pended attempt");
    assert_eq!(
        log.len() - outbound_asked,
        inbound_pended,
        "one question per pended inbound attempt, none about its reinjected packet"
    );
    assert_eq!(stats.inbound_pended as usize, inbound_pended, "{stats:?}");
    assert_eq!(
        stats.reinjected + stats.clones_dropped,
        stats.inbound_pended,
        "every clone reinjected or freed: {stats:?}"
    );
    assert_eq!(stats.own_reinjections, stats.reinjected, "{stats:?}");
    assert_eq!(stats.inbound_not_pended, 0, "{stats:?}");
    assert_eq!(stats.asked as usize, log.len(), "every question answered");
    assert_eq!(stats.answered, stats.asked);
    assert!(
        stats.cache_hits > 1_000,
        "repeated keys are answered from the cache: {stats:?}"
    );
    assert!(pended > 100, "and new ones are asked: {pended}");
    assert_eq!(stats.defaults, 0, "{stats:?}");
    for version_v4 in [true, false] {
        assert!(
            attempts
                .iter()
                .any(|(c, _, p)| *p && c.remote.is_ipv4() == version_v4),
            "both IP versions were pended (seed {seed:#x})"
        );
    }
    eprintln!(
        "{} attempts: {pended} pended outbound, {inbound_pended} inbound; {stats:?}",
        attempts.len()
    );
}

/// The outbound decisions the driver logged, as (request id, verdict, reason), in order.
fn logged_decisions(machine: &Machine) -> Vec<(u64, String, String)> {
    machine
        .debug_output()
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("firewall: #")?;
            let (id, rest) = rest.split_once(": ")?;
            let (verdict, reason) = rest.split_once(" (")?;
            if verdict != "allow" && verdict != "deny" {
                return None;
            }
            let reason = reason.strip_suffix(")\n")?;
            Some((id.parse().ok()?, verdict.to_owned(), reason.to_owned()))
        })
        .collect()
}

/// Checks that every question went the design's own way: through the channel, or a work item
/// and the port (on the channel design a question goes through the port only when it is too
/// long for the channel's slots, which none of these scenarios' questions is).
fn asked_only_via(design: AskVia, stats: &firewall_driver::StatsSnapshot) {
    let (own, other) = match design {
        AskVia::Channel => (stats.asked_via_channel, stats.asked_via_port),
        AskVia::PortAndWorkItem => (stats.asked_via_port, stats.asked_via_channel),
    };
    assert_eq!(
        (own, other),
        (stats.asked, 0),
        "asked via {design}: {stats:?}"
    );
    assert!(stats.asked > 0, "{stats:?}");
}

/// How the driver logs a verdict of the service's, `cached` being its `CachedFor` (", cached for
/// 60 s" or nothing).
fn by_the_service(design: AskVia, cached: &str) -> String {
    match design {
        AskVia::PortAndWorkItem => format!("service{cached}"),
        AskVia::Channel => format!("service, channel{cached}"),
    }
}

/// How the driver logs the default for a question nobody answered because no service was
/// there: the port design's work item finds no client connected; the channel design asks
/// nobody (no service has the channel open, and the service opens both).
fn no_service_default(design: AskVia) -> &'static str {
    match design {
        AskVia::PortAndWorkItem => "default: no client is connected to the port",
        AskVia::Channel => "default: no service has the question channel open",
    }
}

/// How the driver logs the default for a question delivered to a service that was then killed.
fn service_gone_default(design: AskVia) -> &'static str {
    match design {
        AskVia::PortAndWorkItem => "default: the client disconnected before it replied",
        AskVia::Channel => "default: the service went away before replying",
    }
}

/// The counters once every inbound pend's question has ended: its clone reinjected or freed.
/// The driver counts a reinjection after the injection returns, and the simulator may deliver
/// the packet (ending the attempt) before that: a test that read the counters right after its
/// attempt could miss it.
fn inbound_settled(stats: &Stats) -> firewall_driver::StatsSnapshot {
    loop {
        let snapshot = stats.snapshot();
        if snapshot.reinjected + snapshot.clones_dropped == snapshot.inbound_pended {
            return snapshot;
        }
        thread::yield_now();
    }
}

/// Waits until `n` inbound background asks have ended (answered or not, queued or not), by
/// the driver's log: one line each.
fn wait_for_background_asks(machine: &Machine, n: usize) {
    let ended = |line: &String| {
        line.contains(" for later attempts (")
            || line.contains(": not asked (")
            || line.contains("; not asking: ")
    };
    // Counted in the driver's log rather than with `Machine::wait_for_work_items`, which would
    // also wait for every other work item of the machine.
    while machine.debug_output().iter().filter(|l| ended(l)).count() < n {
        thread::yield_now();
    }
}

/// A service that reads every request and answers none, until its connection goes away,
/// counting what it read in `read`. Returns the requests it read.
fn silent_service(client: &ServiceClient, read: &AtomicUsize) -> Vec<ConnectionRequest> {
    let mut requests = Vec::new();
    while let Some(message) = client.get_message(None) {
        requests.push(ConnectionRequest::decode(&message.data).expect("the driver's encoding"));
        read.fetch_add(1, Ordering::SeqCst);
    }
    requests
}

/// One thread answering by `rules`, no latency, until the connection goes away; returns how
/// many it answered.
fn serve_simply(client: ServiceClient, policy: &str) -> thread::JoinHandle<usize> {
    let policy = rules(policy);
    thread::spawn(move || {
        let mut answered = 0;
        while let Some(message) = client.get_message(None) {
            let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
            let (_, bytes) = answer(&policy, &request);
            match client.reply(message.id, &bytes) {
                Ok(()) => answered += 1,
                Err(Status::PORT_DISCONNECTED) => break,
                // Decided without it: on the channel, `stopping` decides the questions it holds.
                Err(Status::FLT_NO_WAITER_FOR_REPLY) if client.channel.is_some() => {}
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
        answered
    })
}

/// Faults, at random, under load: 8 threads of attempts while the service answers most
/// requests but sometimes replies short, oversized, huge, malformed (bad magic, bad verdict,
/// reserved bits, a cache lifetime beyond the maximum) or about another request, and sometimes
/// is killed in the middle of a request and restarted. Each attempt is decided once; an
/// outbound attempt the service validly answered gets the rules' verdict, every other pended
/// one the default; attempts answered from the cache get the rules' verdict (only valid
/// replies are cached); inbound attempts get the rules' verdict or the default.
fn faults_under_load_give_the_rules_or_the_default_and_nothing_else(design: AskVia) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 250;
    let seed = seed();
    let machine = Machine::with_worker_threads(8);
    let driver = load(&machine, chaos::on(design).entry);
    let policy = rules(RULES);
    let log: Log = Arc::default();
    let done = AtomicBool::new(false);
    let kills = thread::scope(|s| {
        let supervisor = s.spawn(|| {
            let mut rng = Rng::new(seed, 77);
            let mut kills = 0;
            'lives: while !done.load(Ordering::SeqCst) {
                let Ok(mut client) = ServiceClient::connect(&machine, design) else {
                    thread::yield_now();
                    continue;
                };
                loop {
                    // Polls, so it can notice the end of the test; the timeout decides nothing.
                    let Some(message) = client.get_message(Some(Duration::from_millis(5))) else {
                        if done.load(Ordering::SeqCst) {
                            break 'lives;
                        }
                        continue;
                    };
                    let request = ConnectionRequest::decode(&message.data).unwrap();
                    thread::sleep(rng.latency());
                    let (verdict, valid) = answer(&policy, &request);
                    let id = request.request_id;
                    let fault: Option<Vec<u8>> = match rng.below(20) {
                        0 => Some(valid[..23].to_vec()),
                        1 => Some([valid.as_slice(), &[0]].concat()),
                        2 => Some(vec![0xA5; 4096]),
                        3 => Some([b"XXXX", &valid[4..]].concat()),
                        4 => {
                            let mut bad = valid.clone();
                            bad[6] = 2;
                            Some(bad)
                        }
                        5 => {
                            let mut bad = valid.clone();
                            bad[20] = 1;
                            Some(bad)
                        }
                        6 => {
                            let mut bad = valid.clone();
                            bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
                            Some(bad)
                        }
                        7 => Some(encode_reply(ConnectionReply::allow(id + 1))),
                        8 => {
                            // Killed mid-request: the connection closes without a reply.
                            log.lock().unwrap().push(Answered {
                                request,
                                valid: None,
                            });
                            client.disconnect();
                            kills += 1;
                            continue 'lives;
                        }
                        _ => None,
                    };
                    let valid_verdict = fault.is_none().then_some(verdict);
                    let bytes = fault.unwrap_or(valid);
                    match client.reply(message.id, &bytes) {
                        Ok(()) => log.lock().unwrap().push(Answered {
                            request,
                            valid: valid_verdict,
                        }),
                        Err(status) => panic!("the driver is waiting for this reply: {status}"),
                    }
                }
            }
            kills
        });
        let attempts = run_attempts(&machine, seed, THREADS, PER_THREAD, 2_000);
        done.store(true, Ordering::SeqCst);
        let kills = supervisor.join().expect("the service supervisor");

        let log = log.lock().unwrap();
        let by_port: HashMap<u16, &Answered> = log
            .iter()
            .filter(|a| a.request.direction == Direction::Outbound)
            .map(|a| (a.request.local_port, a))
            .collect();
        let mut faulted = 0;
        for (c, decided, pended) in &attempts {
            let what = format!("{c:?} (seed {seed:#x})");
            let rule = action(decide_connection(&policy, c));
            match (c.direction, pended) {
                (SimDirection::Outbound, true) => {
                    match by_port.get(&c.local.port()).and_then(|a| a.valid) {
                        Some(verdict) => assert_eq!(*decided, action(verdict), "{what}"),
                        None => {
                            assert_eq!(*decided, Action::Block, "{what}: the default");
                            faulted += 1;
                        }
                    }
                }
                (SimDirection::Outbound, false) => assert_eq!(*decided, rule, "{what}: cached"),
                (SimDirection::Inbound, _) => assert!(
                    *decided == rule || *decided == Action::Block,
                    "{what}: the rules or the default"
                ),
            }
        }
        assert!(faulted > 20, "faults happened (seed {seed:#x}): {faulted}");
        kills
    });
    assert!(kills > 0, "the service was killed (seed {seed:#x})");
    unload_clean(&machine, driver);
    eprintln!(
        "faults under load: {kills} kills; {:?}",
        chaos::on(design).stats.snapshot()
    );
}

/// The service is killed while the driver waits for its reply: that connection gets the
/// default at once (not at the timeout); with no service, the next one too; once it is
/// restarted, connections get its verdict again.
fn a_killed_service_gives_the_default_until_it_is_restarted(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, killed::on(design).entry);
    let mut client = connected_client(&machine, design);
    let outcome = thread::scope(|s| {
        let attempt = s.spawn(|| machine.connect(&browser(40_000, web(7, 443)), AleIrql::Dispatch));
        let message = client.get_message(None).expect("the request");
        ConnectionRequest::decode(&message.data).unwrap();
        // Killed with the request unanswered.
        client.disconnect();
        attempt.join().unwrap()
    });
    let c = browser(40_000, web(7, 443));
    assert_eq!(decided_once(&c, &outcome, "killed"), (Action::Block, true));

    let c = browser(40_001, web(7, 443));
    let outcome = machine.connect(&c, AleIrql::Passive);
    assert_eq!(
        decided_once(&c, &outcome, "no service"),
        (Action::Block, true)
    );

    let service = serve_simply(connected_client(&machine, design), RULES);
    let c = browser(40_002, web(7, 443));
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "restarted"),
        (Action::Permit, true)
    );

    let reasons: Vec<String> = logged_decisions(&machine)
        .into_iter()
        .map(|(_, verdict, reason)| format!("{verdict} ({reason})"))
        .collect();
    assert_eq!(
        reasons,
        [
            format!("deny ({})", service_gone_default(design)),
            format!("deny ({})", no_service_default(design)),
            format!("allow ({})", by_the_service(design, ", cached for 60 s")),
        ]
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 1);
}

/// The same for inbound attempts, which the driver pends too: the one whose question the
/// killed service had read gets the default at once (its clone freed), the next one too (no
/// service), and once the service is back the rules' verdict (its clone reinjected).
fn a_killed_service_gives_the_default_to_pended_inbound_attempts(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, killed_inbound::on(design).entry);
    let mut client = connected_client(&machine, design);
    // `ssh-in` allows them all: only the default denies.
    let ssh = |remote_port: u16| {
        connection(
            9,
            APPS[2],
            IpProtocol::Tcp,
            SimDirection::Inbound,
            22,
            web(30, remote_port),
        )
    };
    let outcome = thread::scope(|s| {
        let attempt = s.spawn(|| machine.connect(&ssh(41_000), AleIrql::Dispatch));
        let message = client.get_message(None).expect("the request");
        let request = ConnectionRequest::decode(&message.data).unwrap();
        assert_eq!(request.direction, Direction::Inbound);
        // Killed with the request unanswered.
        client.disconnect();
        attempt.join().unwrap()
    });
    assert_eq!(
        decided_once(&ssh(41_000), &outcome, "killed"),
        (Action::Block, true)
    );
    let c = ssh(41_001);
    let outcome = machine.connect(&c, AleIrql::Passive);
    assert_eq!(
        decided_once(&c, &outcome, "no service"),
        (Action::Block, true)
    );
    let service = serve_simply(connected_client(&machine, design), RULES);
    let c = ssh(41_002);
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "restarted"),
        (Action::Permit, true)
    );
    let reasons: Vec<String> = logged_decisions(&machine)
        .into_iter()
        .map(|(_, verdict, reason)| format!("{verdict} ({reason})"))
        .collect();
    assert_eq!(
        reasons,
        [
            format!("deny ({})", service_gone_default(design)),
            format!("deny ({})", no_service_default(design)),
            format!("allow ({})", by_the_service(design, ", cached for 60 s")),
        ]
    );
    let stats = inbound_settled(killed_inbound::on(design).stats);
    assert_eq!(
        (
            stats.inbound_pended,
            stats.clones_dropped,
            stats.reinjected,
            stats.own_reinjections,
            stats.defaults
        ),
        (3, 2, 1, 1, 2),
        "{stats:?}"
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 1);
}

/// A service that reads requests and never answers: with a 50 ms timeout, every connection
/// gets the default, however long the timeout takes on this machine.
fn no_reply_within_the_timeout_gives_the_default(design: AskVia) {
    let machine = Machine::with_worker_threads(4);
    let driver = load(&machine, impatient::on(design).entry);
    let client = connected_client(&machine, design);
    let counted = AtomicUsize::new(0);
    let (outcomes, read) = thread::scope(|s| {
        let service = s.spawn(|| silent_service(&client, &counted));
        let attempts: Vec<_> = (0..4u16)
            .map(|n| {
                let machine = &machine;
                s.spawn(move || {
                    let c = browser(41_000 + n, web(10 + n as u8, 443));
                    let outcome = machine.connect(&c, AleIrql::Dispatch);
                    (c, outcome)
                })
            })
            .collect();
        let outcomes: Vec<_> = attempts.into_iter().map(|a| a.join().unwrap()).collect();
        machine.unload_driver(driver).expect("unloads");
        (outcomes, service.join().unwrap())
    });
    for (c, outcome) in &outcomes {
        assert_eq!(decided_once(c, outcome, "timed out"), (Action::Block, true));
    }
    assert_eq!(read.len(), 4, "each was asked");
    let logged = logged_decisions(&machine);
    assert_eq!(logged.len(), 4);
    assert!(
        logged.iter().all(|(_, verdict, reason)| verdict == "deny"
            && reason == "default: no reply within the timeout"),
        "{logged:?}"
    );
    assert_eq!(machine.pool_blocks(), []);
}

/// Every kind of bad reply gives the default, and only a valid reply to the request asked
/// gives the service's verdict. User mode is not told that its reply was refused.
fn short_oversized_malformed_and_mismatched_replies_give_the_default(design: AskVia) {
    type Corrupt = Box<dyn Fn(&ConnectionRequest, Vec<u8>) -> Vec<u8> + Send + Sync>;
    let set = |at: usize, bytes: &'static [u8]| -> Corrupt {
        Box::new(move |_, mut valid| {
            valid[at..at + bytes.len()].copy_from_slice(bytes);
            valid
        })
    };
    let cases: Vec<(Corrupt, &str)> = vec![
        (
            Box::new(|_, valid| valid[..23].to_vec()),
            "default: the reply has 23 bytes, fewer than the 24 the protocol requires",
        ),
        (
            Box::new(|_, _| Vec::new()),
            "default: the reply has 0 bytes, fewer than the 24 the protocol requires",
        ),
        (
            Box::new(|_, valid| [valid, vec![0]].concat()),
            "default: the reply is longer than the 24 bytes the protocol allows",
        ),
        (
            Box::new(|_, _| vec![0xA5; 4096]),
            "default: the reply is longer than the 24 bytes the protocol allows",
        ),
        (set(0, b"FWRQ"), "default: malformed reply: bad reply magic"),
        (
            set(4, &[1, 0]),
            "default: malformed reply: unsupported protocol version",
        ),
        (
            set(6, &[2]),
            "default: malformed reply: the verdict is 0 (deny) or 1 (allow)",
        ),
        (
            set(7, &[1]),
            "default: malformed reply: reserved reply fields are not zero",
        ),
        (
            set(20, &[0, 0, 0, 1]),
            "default: malformed reply: reserved reply fields are not zero",
        ),
        (
            Box::new(|r, _| encode_reply(ConnectionReply::allow(r.request_id + 1))),
            "default: the reply answers request #{next}, not #{id}",
        ),
        (
            Box::new(|_, _| encode_reply(ConnectionReply::allow(0))),
            "default: the reply answers request #0, not #{id}",
        ),
        (Box::new(|_, valid| valid), "service, cached for 60 s"),
    ];
    let machine = Machine::new();
    let driver = load(&machine, replies::on(design).entry);
    let client = connected_client(&machine, design);
    let policy = rules(RULES);
    let mut ids = Vec::new();
    thread::scope(|s| {
        let corruptions: Vec<_> = cases.iter().map(|(corrupt, _)| corrupt).collect();
        let (client, policy) = (&client, &policy);
        let service = s.spawn(move || {
            let mut ids = Vec::new();
            for corrupt in corruptions {
                let message = client.get_message(None).expect("a request");
                let request = ConnectionRequest::decode(&message.data).unwrap();
                let (_, valid) = answer(policy, &request);
                client.reply(message.id, &corrupt(&request, valid)).unwrap();
                ids.push(request.request_id);
            }
            ids
        });
        for (n, _) in cases.iter().enumerate() {
            // A remote of its own each time: nothing is answered from the cache.
            let c = browser(42_000 + n as u16, web(100 + n as u8, 443));
            let irql = if n % 2 == 0 {
                AleIrql::Dispatch
            } else {
                AleIrql::Passive
            };
            let expected = if n == cases.len() - 1 {
                Action::Permit
            } else {
                Action::Block
            };
            let outcome = machine.connect(&c, irql);
            assert_eq!(
                decided_once(&c, &outcome, &format!("case {n}")),
                (expected, true)
            );
        }
        ids = service.join().unwrap();
    });
    let logged = logged_decisions(&machine);
    let expected: Vec<(u64, String, String)> = cases
        .iter()
        .zip(&ids)
        .map(|((_, reason), id)| {
            let verdict = if reason.starts_with("service") {
                "allow"
            } else {
                "deny"
            };
            let reason = match (design, reason.starts_with("default: the reply answers ")) {
                // The channel's `decode` refuses what does not decode, without saying why
                // (`Outcome::Malformed`).
                (AskVia::Channel, false) if verdict == "deny" => {
                    "default: a malformed reply".to_owned()
                }
                _ => reason.replace("service", &by_the_service(design, "")),
            };
            let reason = reason
                .replace("{id}", &id.to_string())
                .replace("{next}", &(id + 1).to_string());
            (*id, verdict.to_owned(), reason)
        })
        .collect();
    assert_eq!(logged, expected);
    let stats = replies::on(design).stats.snapshot();
    assert_eq!((stats.asked, stats.answered, stats.cached), (12, 1, 1));
    unload_clean(&machine, driver);
}

/// Every pool allocation on an outbound connection's path is made to fail in turn (the request;
/// on the port, also the work item and its `IO_WORKITEM`, the message buffers and the filter
/// manager's message — the channel allocated its slots at load): the connection is decided
/// once, by the default — at once when the request cannot be allocated, after its pend
/// otherwise; then, with no failure left to inject, by the service.
/// The same for an inbound attempt, whose background ask is then simply not made. Nothing
/// leaks.
fn allocation_failures_fall_back_to_the_default(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, alloc::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    let (mut failures, mut unpended) = (0, 0);
    for skip in 0.. {
        assert!(skip < 100, "the path has a bounded number of allocations");
        machine.fail_allocations(skip, 1);
        // The same key each time: a default is not cached, so each attempt is asked about.
        let c = browser(43_000 + skip as u16, web(7, 443));
        let outcome = machine.connect(&c, AleIrql::Dispatch);
        let injected = machine.pending_allocation_failures() == 0;
        machine.fail_allocations(0, 0);
        let (decided, pended) = decided_once(&c, &outcome, &format!("allocation {skip}"));
        // Only a failure to allocate the request itself decides before the pend.
        unpended += usize::from(!pended);
        if !injected {
            assert_eq!(decided, Action::Permit, "no failure: the service's verdict");
            break;
        }
        failures += 1;
        assert_eq!(
            decided,
            Action::Block,
            "allocation {skip} failed: fail closed"
        );
    }
    let logged = logged_decisions(&machine);
    assert_eq!(logged.len(), failures + 1, "{logged:#?}");
    let (last, failed) = logged.split_last().unwrap();
    assert_eq!(last.1, "allow");
    let request = "default: no pool for the request";
    let queueing = "default: could not queue a work item: out of non-paged pool";
    let sending = "default: FltSendMessage failed: STATUS_INSUFFICIENT_RESOURCES";
    assert!(
        failed.iter().all(|(_, verdict, reason)| verdict == "deny"
            && (reason == request || reason == queueing || reason.starts_with(sending))),
        "{logged:#?}"
    );
    let at_once = failed.iter().filter(|(_, _, reason)| reason == request);
    assert_eq!(at_once.count(), unpended, "{logged:#?}");
    assert_eq!(unpended, 1, "one allocation before the pend");
    match design {
        AskVia::PortAndWorkItem => {
            assert!(failed.iter().any(|(_, _, reason)| reason == queueing));
            assert!(
                failed
                    .iter()
                    .any(|(_, _, reason)| reason.starts_with(sending))
            );
        }
        // No work item, no message: the channel's slots were allocated at load, so the
        // request is the one allocation on the path.
        AskVia::Channel => assert_eq!(failures, 1, "{logged:#?}"),
    }

    // Inbound: whatever allocation fails (the clone, the request, the work item, the message),
    // the attempt gets the default (a refused attempt: its clone is freed), pended or not;
    // with no failure, the service's verdict, its clone reinjected.
    let mut inbound_failures = 0;
    for skip in 0.. {
        assert!(skip < 100, "the path has a bounded number of allocations");
        machine.fail_allocations(skip, 1);
        let c = connection(
            300 + skip,
            APPS[2],
            IpProtocol::Tcp,
            SimDirection::Inbound,
            22,
            SocketAddr::new(Ipv4Addr::new(192, 0, 2, 200).into(), 50_000),
        );
        let outcome = machine.connect(&c, AleIrql::Dispatch);
        let injected = machine.pending_allocation_failures() == 0;
        machine.fail_allocations(0, 0);
        let what = format!("inbound, allocation {skip}");
        let (decided, pended) = decided_once(&c, &outcome, &what);
        if !injected {
            assert_eq!((decided, pended), (Action::Permit, true), "{what}");
            break;
        }
        inbound_failures += 1;
        assert_eq!(decided, Action::Block, "{what}: fail closed");
    }
    assert!(inbound_failures > 0);
    // Every clone reinjected or freed (this waits for that).
    let stats = inbound_settled(alloc::on(design).stats);
    assert!(stats.reinjected >= 1, "{stats:?}");
    unload_clean(&machine, driver);
    service.join().unwrap();
}

/// Unload while connections, out and in, are pended and their questions wait for a service
/// that reads them but never answers, with a two-minute timeout: `stopping` closes the
/// service's port connection, so every waiting send fails at once (port), or decides every
/// question on the channel (channel); each pend is completed with the default (fail-closed)
/// and, outbound, reauthorized before the filters go; inbound, its clone is freed. Nothing
/// leaks: no pend, clone, injection handle or pool.
fn unload_with_questions_outstanding_decides_every_pended_connection(design: AskVia) {
    unload_with_questions_outstanding(design, unload_silent::on(design), Verdict::Deny);
}

/// The same with a fail-open default: each inbound pend's clone is reinjected while the
/// driver stops (its connection established), and the injection handle is destroyed only
/// after those injections completed.
fn unload_with_inbound_pends_outstanding_reinjects_them_when_failing_open(design: AskVia) {
    unload_with_questions_outstanding(design, unload_fail_open::on(design), Verdict::Allow);
}

/// Unloads a driver with 10 attempts pended (even: outbound, odd: inbound) and waiting for a
/// silent service; each gets `default`.
fn unload_with_questions_outstanding(design: AskVia, configured: Configured, default: Verdict) {
    const PENDED: u16 = 10;
    let machine = Machine::with_worker_threads(PENDED as usize);
    let driver = load(&machine, configured.entry);
    let client = connected_client(&machine, design);
    let counted = AtomicUsize::new(0);
    let (outcomes, read) = thread::scope(|s| {
        let service = s.spawn(|| silent_service(&client, &counted));
        let attempts: Vec<_> = (0..PENDED)
            .map(|n| {
                let machine = &machine;
                s.spawn(move || {
                    let c = browser(44_000 + n, web(20 + n as u8, 443));
                    let (c, irql) = if n % 2 == 0 {
                        (c, AleIrql::Dispatch)
                    } else {
                        let inbound = Connection {
                            direction: SimDirection::Inbound,
                            ..c
                        };
                        (inbound, AleIrql::Passive)
                    };
                    let outcome = machine.connect(&c, irql);
                    (c, outcome)
                })
            })
            .collect();
        // Every question waits for the service.
        while counted.load(Ordering::SeqCst) < PENDED as usize {
            thread::yield_now();
        }
        let unloader = s.spawn(|| machine.unload_driver(driver));
        let outcomes: Vec<_> = attempts.into_iter().map(|a| a.join().unwrap()).collect();
        unloader.join().unwrap().expect("unloads");
        (outcomes, service.join().unwrap())
    });
    for (c, outcome) in &outcomes {
        if c.direction == SimDirection::Inbound && default == Verdict::Allow {
            // Reinjected while the driver stopped: the clone's classification may come after
            // the filters are gone (then nobody's, and permitted).
            assert!(
                outcome.pended && outcome.flow_handle.is_some(),
                "{c:?}: {outcome:?}"
            );
            continue;
        }
        assert_eq!(
            decided_once(c, outcome, "unloaded"),
            (action(default), true),
            "{c:?}"
        );
    }
    assert_eq!(read.len(), PENDED as usize);
    assert_eq!(
        read.iter()
            .filter(|r| r.direction == Direction::Inbound)
            .count(),
        PENDED as usize / 2
    );
    let stats = configured.stats.snapshot();
    let (reinjected, dropped) = match default {
        Verdict::Allow => (PENDED / 2, 0),
        Verdict::Deny => (0, PENDED / 2),
    };
    assert_eq!(
        (stats.inbound_pended, stats.reinjected, stats.clones_dropped),
        (
            u64::from(PENDED / 2),
            u64::from(reinjected),
            u64::from(dropped)
        ),
        "{stats:?}"
    );
    assert!(stats.own_reinjections <= u64::from(reinjected), "{stats:?}");
    let logged = logged_decisions(&machine);
    assert_eq!(logged.len(), PENDED as usize);
    let verdict = default.to_string();
    assert!(
        logged.iter().all(|(_, logged, reason)| *logged == verdict
            && reason
                == match design {
                    // `stopping` closes the service's connection: every waiting send fails.
                    AskVia::PortAndWorkItem => service_gone_default(design),
                    // `stopping` decides every question on the channel.
                    AskVia::Channel => "default: unloading",
                }),
        "{logged:?}"
    );
    assert_eq!(machine.pending_classifications(), 0);
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
    assert!(!client.is_connected(), "unload disconnected the service");
}

/// Unload while 6 threads keep connecting, out and in, and the service keeps answering: each
/// attempt is decided once — by the driver (the rules or the default), or, once its session is
/// closed, by nobody (permitted, as after any unload); never a pended attempt reauthorized
/// after the filters are gone. Nothing leaks.
fn unload_under_load_decides_every_attempt_once(design: AskVia) {
    const THREADS: u64 = 6;
    let seed = seed();
    let machine = Machine::with_worker_threads(4);
    let driver = load(&machine, unload_busy::on(design).entry);
    let policy = Arc::new(Mutex::new(rules(RULES)));
    let (_log, service) = serve(&machine, design, Arc::clone(&policy), 2, seed);
    let unloaded = AtomicBool::new(false);
    let attempts: Vec<(Connection, ConnectOutcome)> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (machine, unloaded) = (&machine, &unloaded);
                s.spawn(move || {
                    let mut rng = Rng::new(seed, 200 + t);
                    let mut attempts = Vec::new();
                    for n in 0u64..100_000 {
                        if n >= 5 && unloaded.load(Ordering::SeqCst) {
                            break;
                        }
                        let local = 20_000 + (t * 3_000 + n % 3_000) as u16;
                        let c = rng.attempt(local);
                        let outcome = machine.connect(&c, rng.irql());
                        attempts.push((c, outcome));
                    }
                    attempts
                })
            })
            .collect();
        while unload_busy::on(design).stats.snapshot().answered < 20 {
            thread::yield_now();
        }
        // The connecting threads stop once this is over, failed or not.
        let unloading = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            unload_clean(&machine, driver)
        }));
        unloaded.store(true, Ordering::SeqCst);
        if let Err(panic) = unloading {
            std::panic::resume_unwind(panic);
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a connection thread"))
            .collect()
    });
    for thread in service {
        thread.join().unwrap();
    }
    let policy = policy.lock().unwrap();
    let (mut by_driver, mut after) = (0, 0);
    for (c, outcome) in &attempts {
        let what = format!("{c:?} (seed {seed:#x}): {outcome:?}");
        let layer = auth_layer(c);
        let at_auth: Vec<_> = outcome
            .layers
            .iter()
            .filter(|(name, _)| *name == layer)
            .map(|(_, d)| *d)
            .collect();
        let last = at_auth.last().expect("classified");
        let rule = action(decide_connection(&policy, c));
        if outcome.pended && c.direction == SimDirection::Inbound {
            // Pended by the driver; its clone reinjected (a second classification, the
            // driver's own packet, or nobody's once the filters are gone) or freed.
            assert!(at_auth[0].filter_id.is_some(), "{what}");
            assert!(at_auth.len() <= 2, "{what}");
            let decided = if outcome.flow_handle.is_some() {
                Action::Permit
            } else {
                Action::Block
            };
            assert_eq!(at_auth.len() == 2, decided == Action::Permit, "{what}");
            assert!(
                decided == rule || decided == Action::Block,
                "{what}: the rules or the default"
            );
            by_driver += 1;
            continue;
        }
        assert_eq!(at_auth.len(), if outcome.pended { 2 } else { 1 }, "{what}");
        if last.filter_id.is_none() {
            assert!(
                !outcome.pended,
                "{what}: reauthorized after the filters were gone"
            );
            assert_eq!(outcome.decision.action, Action::Permit, "{what}");
            after += 1;
        } else {
            assert!(
                last.action == rule || last.action == Action::Block,
                "{what}: the rules or the default"
            );
            by_driver += 1;
        }
    }
    assert!(
        by_driver >= 20,
        "decided before the unload (seed {seed:#x})"
    );
    eprintln!(
        "unload under load: {} attempts, {by_driver} by the driver, {after} after its filters",
        attempts.len()
    );
}

/// No service connected: every attempt gets the default (fail-closed), outbound after a pend,
/// inbound at once; nothing is cached.
fn without_a_service_everything_gets_the_fail_closed_default(design: AskVia) {
    let seed = seed();
    let machine = Machine::with_worker_threads(2);
    let driver = load(&machine, no_service::on(design).entry);
    let attempts = run_attempts(&machine, seed, 4, 50, 45_000);
    for (c, decided, _) in &attempts {
        assert_eq!(*decided, Action::Block, "{c:?} (seed {seed:#x})");
    }
    let stats = no_service::on(design).stats.snapshot();
    assert_eq!((stats.answered, stats.cached, stats.cache_hits), (0, 0, 0));
    assert!(
        logged_decisions(&machine)
            .iter()
            .all(|(_, verdict, reason)| verdict == "deny" && reason == no_service_default(design))
    );
    unload_clean(&machine, driver);
}

/// The default is configuration: fail-open permits when no service answers.
fn a_fail_open_configuration_permits_without_a_service(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, fail_open::on(design).entry);
    let out = browser(46_000, web(7, 443));
    let outcome = machine.connect(&out, AleIrql::Dispatch);
    assert_eq!(decided_once(&out, &outcome, "out"), (Action::Permit, true));
    let inbound = connection(
        7,
        APPS[2],
        IpProtocol::Tcp,
        SimDirection::Inbound,
        22,
        web(9, 50_000),
    );
    // Pended like any inbound miss; the default lets its reinjected packet through.
    assert_eq!(
        decided_once(&inbound, &machine.connect(&inbound, AleIrql::Passive), "in"),
        (Action::Permit, true)
    );
    let stats = inbound_settled(fail_open::on(design).stats);
    assert_eq!(
        (
            stats.inbound_pended,
            stats.reinjected,
            stats.own_reinjections
        ),
        (1, 1, 1),
        "{stats:?}"
    );
    unload_clean(&machine, driver);
}

/// The cache answers a repeated (process, image, direction, protocol, remote endpoint) at once,
/// whatever the local port; another process, another image under a reused process id, another
/// protocol or remote is asked about. A reply with no lifetime is not cached.
fn the_cache_answers_known_connections_at_once(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, caching::on(design).entry);
    let client = connected_client(&machine, design);
    let policy = rules(RULES);
    let asked = Mutex::new(Vec::new());
    thread::scope(|s| {
        let service = s.spawn(|| {
            while let Some(message) = client.get_message(None) {
                let request = ConnectionRequest::decode(&message.data).unwrap();
                let verdict = decide_request(&policy, &request);
                // Port 80 answers are not to be cached.
                let reply = if request.remote_port == 80 {
                    request.reply(verdict)
                } else {
                    request
                        .reply(verdict)
                        .cached_for(CacheLifetime::from_secs(60).unwrap())
                };
                asked.lock().unwrap().push(request.clone());
                if client.reply(message.id, &encode_reply(reply)).is_err() {
                    break;
                }
            }
        });
        let mut port = 47_000;
        let mut attempt = |c: Connection| {
            port += 1;
            let c = Connection {
                local: SocketAddr::new(c.local.ip(), port),
                ..c
            };
            let outcome = machine.connect(&c, AleIrql::Dispatch);
            decided_once(&c, &outcome, &format!("{c:?}"))
        };
        let b = browser(0, web(7, 443));
        assert_eq!(attempt(b.clone()), (Action::Permit, true), "asked");
        assert_eq!(attempt(b.clone()), (Action::Permit, false), "cached");
        assert_eq!(attempt(b.clone()), (Action::Permit, false), "cached");
        let denied = browser(0, web(7, 25));
        assert_eq!(attempt(denied.clone()), (Action::Block, true), "asked");
        assert_eq!(
            attempt(denied),
            (Action::Block, false),
            "a deny is cached too"
        );
        let other_pid = Connection {
            pid: 101,
            ..b.clone()
        };
        assert_eq!(
            attempt(other_pid),
            (Action::Permit, true),
            "another process"
        );
        let reused_pid = Connection {
            app: APPS[2].into(),
            ..b.clone()
        };
        assert_eq!(
            attempt(reused_pid),
            (Action::Block, true),
            "another image, same pid"
        );
        let udp = Connection {
            protocol: IpProtocol::Udp,
            ..b.clone()
        };
        assert_eq!(attempt(udp), (Action::Block, true), "another protocol");
        let other_remote = browser(0, web(8, 443));
        assert_eq!(
            attempt(other_remote),
            (Action::Permit, true),
            "another remote"
        );
        let uncached = browser(0, web(7, 80));
        assert_eq!(attempt(uncached.clone()), (Action::Permit, true), "asked");
        assert_eq!(
            attempt(uncached),
            (Action::Permit, true),
            "no lifetime: asked again"
        );
        unload_clean(&machine, driver);
        service.join().unwrap();
    });
    let stats = caching::on(design).stats.snapshot();
    asked_only_via(design, &stats);
    assert_eq!(
        (stats.cache_hits, stats.asked, stats.cached),
        (3, 8, 6),
        "{stats:?}"
    );
    assert_eq!(asked.lock().unwrap().len(), 8);
}

/// The cache is bounded: with 4 entries (one set), a fifth verdict evicts the oldest, which is
/// asked about again; the others are still answered from the cache. With no cache, everything
/// is asked every time.
fn a_full_cache_evicts_the_oldest_verdict(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, small_cache::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    let mut port = 48_000;
    let mut attempt = |remote: u8| {
        port += 1;
        let c = browser(port, web(remote, 443));
        decided_once(
            &c,
            &machine.connect(&c, AleIrql::Passive),
            &format!("{remote}"),
        )
        .1
    };
    for remote in 1..=4 {
        assert!(attempt(remote), "{remote}: asked");
    }
    for remote in 1..=4 {
        assert!(!attempt(remote), "{remote}: cached");
    }
    assert!(attempt(5), "5: asked, evicting 1");
    assert!(attempt(1), "1: evicted, asked again (evicting 2)");
    for remote in [3, 4, 5, 1] {
        assert!(!attempt(remote), "{remote}: still cached");
    }
    let stats = small_cache::on(design).stats.snapshot();
    assert_eq!(
        (stats.asked, stats.evicted, stats.cache_hits),
        (6, 2, 8),
        "{stats:?}"
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 6);

    let machine = Machine::new();
    let driver = load(&machine, no_cache::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    for n in 0..3 {
        let c = browser(48_100 + n, web(7, 443));
        assert_eq!(
            decided_once(&c, &machine.connect(&c, AleIrql::Passive), "no cache"),
            (Action::Permit, true)
        );
    }
    assert_eq!(no_cache::on(design).stats.snapshot().cached, 0);
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 3);
}

/// A peer's first attempt gets the service's verdict: the driver pends it, clones its packet
/// and asks; an allow reinjects the clone, which crosses ALE_AUTH_RECV_ACCEPT again and is
/// permitted as the driver's own without asking (one question per attempt), and the connection
/// is established; a deny frees the clone and the attempt fails. The next attempts are answered
/// from the cache.
fn inbound_first_attempts_get_the_services_verdict(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, inbound::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    // The rules allow the tool everything, and nothing else in.
    let peer = |app: &str, local_port: u16, remote: SocketAddr| {
        connection(
            4,
            app,
            IpProtocol::Tcp,
            SimDirection::Inbound,
            local_port,
            remote,
        )
    };
    let v6 = SocketAddr::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).into(),
        50_000,
    );
    let v4 = web(9, 50_001);
    for (n, remote) in [v6, v4].into_iter().enumerate() {
        let (ssh, other) = (peer(APPS[1], 22, remote), peer(APPS[2], 23, remote));
        for (irql, what) in [(AleIrql::Dispatch, "first"), (AleIrql::Passive, "again")] {
            let pended = what == "first";
            let outcome = machine.connect(&ssh, irql);
            assert_eq!(
                decided_once(&ssh, &outcome, what),
                (Action::Permit, pended),
                "the rules allow the tool in"
            );
            if pended {
                // The reinjected clone crossed the inbound layers again.
                let layers: Vec<&str> = outcome.layers.iter().map(|(name, _)| *name).collect();
                assert_eq!(layers.len(), 5, "{layers:?}");
            }
            assert_eq!(
                decided_once(&other, &machine.connect(&other, irql), what),
                (Action::Block, pended),
                "the rules deny the rest"
            );
        }
        let stats = inbound_settled(inbound::on(design).stats);
        let n = n as u64 + 1;
        assert_eq!(
            (
                stats.inbound_pended,
                stats.reinjected,
                stats.clones_dropped,
                stats.own_reinjections,
            ),
            (2 * n, n, n, n),
            "{stats:?}"
        );
        assert_eq!(
            (
                stats.asked,
                stats.answered,
                stats.cache_hits,
                stats.defaults
            ),
            (2 * n, 2 * n, 2 * n, 0),
            "asked once per first attempt, never about a reinjected packet: {stats:?}"
        );
    }
    let stats = inbound_settled(inbound::on(design).stats);
    assert_eq!(
        (stats.background_asks, stats.inbound_not_pended),
        (0, 0),
        "{stats:?}"
    );
    asked_only_via(design, &stats);
    let lines = machine.debug_output();
    assert!(
        lines.iter().any(|l| l.ends_with(&format!(
            ": allow ({})\n",
            by_the_service(design, ", cached for 60 s")
        ))),
        "{lines:#?}"
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 4);
}

/// Beyond the bound (here `max_pending: 0`: nothing is pended) an inbound miss is not pended:
/// a peer's first attempt gets the default at once while the service is asked in the
/// background; the next attempt gets the service's cached verdict, allow or deny.
fn inbound_beyond_the_bound_gets_the_default_then_the_services_cached_verdict(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, inbound_unpended::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    // The rules allow the tool everything, and nothing else in.
    let peer = |app: &str, local_port: u16, remote_port: u16| {
        connection(
            4,
            app,
            IpProtocol::Tcp,
            SimDirection::Inbound,
            local_port,
            SocketAddr::new(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).into(),
                remote_port,
            ),
        )
    };
    let ssh = peer(APPS[1], 22, 50_000);
    let other = peer(APPS[2], 23, 50_001);
    for c in [&ssh, &other] {
        assert_eq!(
            decided_once(c, &machine.connect(c, AleIrql::Dispatch), "first"),
            (Action::Block, false),
            "the default at once"
        );
    }
    wait_for_background_asks(&machine, 2);
    assert_eq!(
        decided_once(
            &ssh,
            &machine.connect(&ssh, AleIrql::Dispatch),
            "retransmitted"
        ),
        (Action::Permit, false),
        "the rules allow the tool in: cached"
    );
    assert_eq!(
        decided_once(
            &other,
            &machine.connect(&other, AleIrql::Passive),
            "retransmitted"
        ),
        (Action::Block, false),
        "the rules deny the rest: cached"
    );
    let stats = inbound_unpended::on(design).stats.snapshot();
    assert_eq!(
        (
            stats.background_asks,
            stats.answered,
            stats.cache_hits,
            stats.defaults
        ),
        (2, 2, 2, 2),
        "{stats:?}"
    );
    assert_eq!((stats.inbound_not_pended, stats.inbound_pended), (2, 0));
    let lines = machine.debug_output();
    assert!(
        lines.iter().any(|l| l.ends_with(&format!(
            ": allow for later attempts ({})\n",
            by_the_service(design, ", cached for 60 s")
        ))),
        "{lines:#?}"
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 2);
}

/// An inbound verdict is cached for the local port it was decided for: a rule's `local_port`
/// (`ssh-in`: 22) admits the peer on that port, and the same peer endpoint on another local
/// port of the same process gets its own verdict, not the cached one.
fn inbound_verdicts_are_cached_per_local_port(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, inbound_local_port::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    // One process listening on two ports; one peer endpoint (source port 22 on purpose: `port`
    // is the remote port, which `ssh-in` does not name).
    let peer = |local_port: u16| {
        connection(
            7,
            APPS[2],
            IpProtocol::Tcp,
            SimDirection::Inbound,
            local_port,
            SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), 22),
        )
    };
    let (ssh, other) = (peer(22), peer(2222));
    assert_eq!(
        decided_once(&ssh, &machine.connect(&ssh, AleIrql::Dispatch), "first"),
        (Action::Permit, true),
        "ssh-in allows local port 22: asked"
    );
    assert_eq!(
        decided_once(&ssh, &machine.connect(&ssh, AleIrql::Dispatch), "again"),
        (Action::Permit, false),
        "ssh-in allows local port 22: cached"
    );
    assert_eq!(
        decided_once(&other, &machine.connect(&other, AleIrql::Dispatch), "first"),
        (Action::Block, true),
        "not the verdict cached for port 22: asked"
    );
    assert_eq!(
        decided_once(&other, &machine.connect(&other, AleIrql::Passive), "again"),
        (Action::Block, false),
        "the rules deny local port 2222: cached"
    );
    assert_eq!(
        decided_once(&ssh, &machine.connect(&ssh, AleIrql::Passive), "third"),
        (Action::Permit, false),
        "port 22's verdict is still cached"
    );
    let stats = inbound_local_port::on(design).stats.snapshot();
    assert_eq!(
        (
            stats.background_asks,
            stats.answered,
            stats.cache_hits,
            stats.defaults
        ),
        (0, 2, 3, 0),
        "{stats:?}"
    );
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 2);
}

/// At most `background_asks` inbound questions are in flight: with nothing pended
/// (`max_pending: 0`) and a silent service, the first three misses queue a question each, later
/// ones only get the default. Unload ends the waiting questions at once.
fn inbound_background_asks_are_bounded(design: AskVia) {
    let machine = Machine::with_worker_threads(4);
    let driver = load(&machine, inbound_bounded::on(design).entry);
    let client = connected_client(&machine, design);
    let read = AtomicUsize::new(0);
    thread::scope(|s| {
        let service = s.spawn(|| silent_service(&client, &read));
        for n in 0..6u16 {
            let c = connection(
                7,
                APPS[2],
                IpProtocol::Udp,
                SimDirection::Inbound,
                5_000,
                web(50 + n as u8, 40_000),
            );
            assert_eq!(
                decided_once(&c, &machine.connect(&c, AleIrql::Dispatch), "inbound"),
                (Action::Block, false)
            );
        }
        let stats = inbound_bounded::on(design).stats.snapshot();
        assert_eq!((stats.background_asks, stats.background_skipped), (3, 3));
        // The three questions wait for the service when the driver unloads.
        while read.load(Ordering::SeqCst) < 3 {
            thread::yield_now();
        }
        unload_clean(&machine, driver);
        assert_eq!(service.join().unwrap().len(), 3);
    });
}

/// Loopback is permitted without asking by default (even with no service); with
/// `permit_loopback: false` it is asked about like any other connection.
fn loopback_is_permitted_without_asking_unless_configured_otherwise(design: AskVia) {
    let local = |direction| {
        connection(
            100,
            APPS[2],
            IpProtocol::Tcp,
            direction,
            49_000,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8080),
        )
    };
    let machine = Machine::new();
    let driver = load(&machine, loopback::on(design).entry);
    for direction in [SimDirection::Outbound, SimDirection::Inbound] {
        let c = local(direction);
        assert_eq!(
            decided_once(&c, &machine.connect(&c, AleIrql::Dispatch), "loopback"),
            (Action::Permit, false)
        );
    }
    let v6 = Connection {
        remote: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 8080),
        local: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 49_001),
        ..local(SimDirection::Outbound)
    };
    assert_eq!(
        decided_once(&v6, &machine.connect(&v6, AleIrql::Passive), "loopback v6"),
        (Action::Permit, false)
    );
    let stats = loopback::on(design).stats.snapshot();
    assert_eq!((stats.loopback, stats.asked), (3, 0));
    unload_clean(&machine, driver);

    let machine = Machine::new();
    let driver = load(&machine, loopback_asked::on(design).entry);
    let c = local(SimDirection::Outbound);
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "asked"),
        (Action::Block, true),
        "asked, nobody answered: the default"
    );
    unload_clean(&machine, driver);
}

/// A classification whose fields cannot be read (here: no `ALE_APP_ID`) gets the default at
/// once, outbound and inbound, with the reason logged; nothing is pended or asked.
///
/// Once: it loads the shipped `DriverEntry`, which asks through the default design (the
/// channel); nothing in it depends on how the service is asked.
#[test]
fn a_connection_whose_fields_cannot_be_read_gets_the_default_at_once() {
    use wfp_rs::layer::fields;
    use wfp_rs::layer::value::ConditionFlags;
    let machine = Machine::new();
    let driver = load(&machine, firewall_driver::DriverEntry);
    let outbound = ClassifyRequest::<AleAuthConnectV4>::new()
        .process(100, APPS[0])
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpLocalAddress>(Ipv4Addr::new(10, 0, 0, 2))
        .with::<fields::IpLocalPort>(50_000u16)
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, 1))
        .with::<fields::IpRemotePort>(443u16)
        .with::<fields::Flags>(ConditionFlags::empty())
        .pendable();
    let decision = machine.classify(wfp_rs::irql::Irql::DISPATCH, &outbound);
    assert_eq!((decision.action, decision.pending), (Action::Block, None));
    let inbound = ClassifyRequest::<AleAuthRecvAcceptV4>::new()
        .process(100, APPS[0])
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpLocalAddress>(Ipv4Addr::new(10, 0, 0, 2))
        .with::<fields::IpLocalPort>(22u16)
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, 1))
        .with::<fields::IpRemotePort>(50_000u16)
        .with::<fields::Flags>(ConditionFlags::empty())
        .pendable();
    let decision = machine.classify(wfp_rs::irql::Irql::DISPATCH, &inbound);
    assert_eq!((decision.action, decision.pending), (Action::Block, None));
    let logged: Vec<String> = machine
        .debug_output()
        .into_iter()
        .filter(|line| line.contains("cannot be read"))
        .collect();
    assert_eq!(
        logged,
        [
            "firewall: outbound: deny (default: the connection's fields cannot be read)\n",
            "firewall: inbound: deny (default: the connection's fields cannot be read)\n",
        ]
    );
    unload_clean(&machine, driver);
}

/// TCP and UDP are filtered; ICMP is not (see the crate documentation): with no service, an
/// ICMP echo is not seen by the driver and passes.
///
/// Once: it loads the shipped `DriverEntry`, which asks through the default design (the
/// channel); nothing in it depends on how the service is asked.
#[test]
fn icmp_is_not_filtered() {
    let machine = Machine::new();
    let driver = load(&machine, firewall_driver::DriverEntry);
    assert_eq!(
        machine.debug_output()[0],
        "firewall: asking the service through the question channel on WfpRsFirewallAsk \
         (500 ms timeout, default deny, 1024 cache entries, 2048 pends at most, overload deny, \
         loopback permitted)\n"
    );
    let ping = Connection {
        protocol: IpProtocol::Icmp,
        ..browser(0, web(7, 0))
    };
    let outcome = machine.connect(&ping, AleIrql::Dispatch);
    assert!(!outcome.pended);
    assert_eq!(outcome.decision.action, Action::Permit);
    let (_, at_connect) = outcome
        .layers
        .iter()
        .find(|(name, _)| *name == AleAuthConnectV4::NAME)
        .expect("ALE_AUTH_CONNECT ran");
    assert_eq!(
        at_connect.filter_id, None,
        "no filter of the driver matched"
    );
    let udp = Connection {
        protocol: IpProtocol::Udp,
        ..browser(49_500, web(7, 53))
    };
    assert_eq!(
        decided_once(&udp, &machine.connect(&udp, AleIrql::Dispatch), "udp"),
        (Action::Block, true)
    );
    unload_clean(&machine, driver);
}

/// Sends the revoke command `input` as the service does, and decodes the driver's answer.
fn send_revoke(machine: &Machine, input: &[u8]) -> Result<u32, Status> {
    let device = machine
        .open_device(CONTROL_DEVICE_PATH, Caller::System)
        .expect("the service opens the control device");
    let completion = device
        .device_io_control(REVOKE.raw(), input, firewall_protocol::control::REVOKED_LEN)
        .wait();
    let output = completion.ok()?;
    Ok(Revoked::decode(output)
        .expect("the driver's answer")
        .removed)
}

fn revoke_all(machine: &Machine) -> Result<u32, Status> {
    let mut bytes = [0u8; REVOKE_MAX_LEN];
    let len = Revoke::encode_all(&mut bytes).unwrap();
    send_revoke(machine, &bytes[..len])
}

/// Revokes the verdicts of `ids`, in as many commands as it takes; returns how many went.
fn revoke_ids(machine: &Machine, ids: &[u64]) -> u32 {
    ids.chunks(MAX_REVOKE_IDS)
        .map(|chunk| {
            let mut bytes = [0u8; REVOKE_MAX_LEN];
            let len = Revoke::encode_requests(chunk, &mut bytes).unwrap();
            send_revoke(machine, &bytes[..len]).expect("revoked")
        })
        .sum()
}

/// The control device's revoke command removes the cached verdicts of the named requests, or
/// all of them, and those connections are asked about again; other codes, malformed commands
/// and a short output buffer are refused; a standard user cannot open the device.
fn the_revoke_command_forgets_cached_verdicts(design: AskVia) {
    let seed = seed();
    let machine = Machine::new();
    let driver = load(&machine, revoking::on(design).entry);
    let (log, service) = serve(
        &machine,
        design,
        Arc::new(Mutex::new(rules(RULES))),
        1,
        seed,
    );
    let mut port = 50_000;
    let mut attempt = |remote: u8| {
        port += 1;
        let c = browser(port, web(remote, 443));
        decided_once(
            &c,
            &machine.connect(&c, AleIrql::Dispatch),
            &format!("{remote}"),
        )
    };
    let id_of = |remote: u8| {
        let log = log.lock().unwrap();
        log.iter()
            .rev()
            .find(|a| a.request.remote_address == web(remote, 443).ip())
            .map(|a| a.request.request_id)
            .expect("asked")
    };
    assert_eq!(attempt(7), (Action::Permit, true));
    assert_eq!(attempt(8), (Action::Permit, true));
    assert_eq!(attempt(7), (Action::Permit, false), "cached");
    assert_eq!(attempt(8), (Action::Permit, false), "cached");

    assert_eq!(revoke_ids(&machine, &[id_of(7), 999_999]), 1);
    assert_eq!(attempt(7), (Action::Permit, true), "revoked: asked again");
    assert_eq!(
        attempt(8),
        (Action::Permit, false),
        "not named: still cached"
    );
    assert_eq!(revoke_all(&machine), Ok(2));
    assert_eq!(attempt(7), (Action::Permit, true), "asked again");
    assert_eq!(attempt(8), (Action::Permit, true), "asked again");
    assert_eq!(revoking::on(design).stats.snapshot().revoked, 3);

    // Refusals.
    let device = machine
        .open_device(CONTROL_DEVICE_PATH, Caller::Administrator)
        .unwrap();
    let other = ControlCode::buffered(0x8A5E, 0x802, RequiredAccess::Write);
    let refused = |code: ControlCode, input: &[u8], output_len: usize| {
        device
            .device_io_control(code.raw(), input, output_len)
            .wait()
            .ok()
            .map(<[u8]>::to_vec)
    };
    let mut buffer = [0u8; REVOKE_MAX_LEN];
    let len = Revoke::encode_all(&mut buffer).unwrap();
    let all = &buffer[..len];
    assert_eq!(refused(other, all, 8), Err(Status::INVALID_DEVICE_REQUEST));
    assert_eq!(
        refused(REVOKE, &all[..15], 8),
        Err(Status::INVALID_PARAMETER)
    );
    let mut bad_magic = all.to_vec();
    bad_magic[0] = b'X';
    assert_eq!(
        refused(REVOKE, &bad_magic, 8),
        Err(Status::INVALID_PARAMETER)
    );
    assert_eq!(refused(REVOKE, all, 7), Err(Status::BUFFER_TOO_SMALL));
    assert_eq!(
        machine.open_device(CONTROL_DEVICE_PATH, Caller::User).err(),
        Some(Status::ACCESS_DENIED)
    );
    drop(device);
    assert_eq!(
        attempt(8),
        (Action::Permit, false),
        "the refusals revoked nothing"
    );
    unload_clean(&machine, driver);
    for thread in service {
        thread.join().unwrap();
    }
}

/// Waits until the driver has made `n` policy changes in all (a revoke command makes one; a
/// verdict that denies an established connection another, from a work item).
fn wait_for_policy_changes(stats: &Stats, n: u64) {
    let mut rounds = 0u64;
    while stats.snapshot().policy_changes < n {
        rounds += 1;
        assert!(
            rounds < 50_000_000,
            "{} policy changes, not {n}",
            stats.snapshot().policy_changes
        );
        thread::yield_now();
    }
}

/// Issue 12, point 6: rules reach established connections. The service changes its rules and
/// revokes the cached verdicts; the driver makes a policy change (a filter added and deleted
/// at the ALE authorization layers), so WFP reauthorizes each established connection at its
/// next packet. The cache no longer knows them: each is kept while the service is asked; the
/// one the new rules deny makes another policy change, and its next packet is dropped and the
/// connection cut. The one they still allow runs on.
fn a_rules_change_cuts_the_established_connections_the_new_rules_deny(design: AskVia) {
    let seed = seed();
    let machine = Machine::new();
    let configured = established::on(design);
    let driver = load(&machine, configured.entry);
    let policy = Arc::new(Mutex::new(rules(RULES)));
    let (log, service) = serve(&machine, design, Arc::clone(&policy), 1, seed);
    let (kept, cut) = (browser(51_001, web(7, 443)), browser(51_002, web(8, 443)));
    let flow = |c: &Connection| {
        let outcome = machine.connect(c, AleIrql::Dispatch);
        assert_eq!(decided_once(c, &outcome, "before"), (Action::Permit, true));
        outcome.flow_handle.expect("established")
    };
    let (kept_flow, cut_flow) = (flow(&kept), flow(&cut));
    let packet = |c: &Connection, flow: u64| machine.packet(c, flow, SimDirection::Outbound).action;
    assert_eq!(packet(&kept, kept_flow), Action::Permit);
    assert_eq!(packet(&cut, cut_flow), Action::Permit);

    // The new rules deny 192.0.2.8; the service swaps them and revokes what it told the driver.
    *policy.lock().unwrap() = rules(&RULES.replacen(
        "[[rule]]",
        "[[rule]]\nname = \"cut\"\naction = \"deny\"\nremote = \"192.0.2.8/32\"\n\n[[rule]]",
        1,
    ));
    assert_eq!(revoke_all(&machine), Ok(2));
    assert_eq!(configured.stats.snapshot().policy_changes, 1);
    // Its next packet reauthorizes the connection: not cached, so kept while the service is
    // asked; the deny makes a policy change, and the packet after that cuts it.
    assert_eq!(packet(&cut, cut_flow), Action::Permit, "kept while asked");
    wait_for_policy_changes(configured.stats, 2);
    assert_eq!(packet(&cut, cut_flow), Action::Block, "cut");
    assert!(machine.is_flow_cut(cut_flow));
    assert_eq!(packet(&cut, cut_flow), Action::Block, "and stays cut");
    // The other one is reauthorized at its next packet too, kept while asked; the new rules
    // still allow it, so it runs on and its verdict makes no policy change.
    assert_eq!(packet(&kept, kept_flow), Action::Permit);
    let mut rounds = 0u64;
    while configured.stats.snapshot().answered < 4 {
        rounds += 1;
        assert!(
            rounds < 50_000_000,
            "the service answers the kept connection's question"
        );
        thread::yield_now();
    }
    for _ in 0..2 {
        assert_eq!(packet(&kept, kept_flow), Action::Permit);
    }
    assert!(!machine.is_flow_cut(kept_flow));
    let stats = configured.stats.snapshot();
    assert_eq!(
        stats.established_kept, 2,
        "each connection kept once while asked"
    );
    assert_eq!(stats.policy_changes, 2, "an allow makes no policy change");
    let asked_about = |remote: u8| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|a| a.request.remote_address == web(remote, 443).ip())
            .count()
    };
    assert_eq!(
        (asked_about(7), asked_about(8)),
        (2, 2),
        "at connect and after the change"
    );
    // New connections get the new rules too.
    let again = browser(51_003, web(8, 443));
    assert_eq!(
        decided_once(&again, &machine.connect(&again, AleIrql::Dispatch), "after"),
        (Action::Block, false),
        "the cached deny"
    );
    unload_clean(&machine, driver);
    for thread in service {
        thread.join().unwrap();
    }
}

/// Issue 5, point 6: the rules are reloaded in the middle of 8 threads of attempts. The
/// service swaps its rules and revokes the cached verdicts the new rules no longer give, by
/// request id, as the real service does. Every attempt is decided once; an attempt that starts
/// after the revoke command returned gets the new rules (outbound) or the new rules or the
/// default (inbound) — never a stale cached verdict; attempts during the reload get the old
/// rules or the new ones (or the default, inbound).
fn a_rules_reload_with_revoke_mid_stream_gives_no_stale_verdict(design: AskVia) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 500;
    const MAX_PER_THREAD: u64 = 2_000;
    const AFTER: usize = 20;
    let seed = seed();
    let machine = Machine::with_worker_threads(8);
    let driver = load(&machine, reload::on(design).entry);
    let policy = Arc::new(Mutex::new(rules(RULES)));
    let (log, service) = serve(&machine, design, Arc::clone(&policy), 4, seed);
    let reloaded = AtomicBool::new(false);
    let (old, new) = (rules(RULES), rules(RELOADED_RULES));

    let (attempts, removed) = thread::scope(|s| {
        let reloader = s.spawn(|| {
            while reload::on(design).stats.snapshot().answered < 300 {
                thread::yield_now();
            }
            // What the service does on a reload: swap the rules, then revoke every cached
            // verdict it gave that the new rules do not give. Under the log's lock, so no
            // answer is being given meanwhile.
            let log = log.lock().unwrap();
            *policy.lock().unwrap() = rules(RELOADED_RULES);
            let stale: Vec<u64> = log
                .iter()
                .filter(|a| {
                    a.valid
                        .is_some_and(|v| v != decide_request(&new, &a.request))
                })
                .map(|a| a.request.request_id)
                .collect();
            let removed = revoke_ids(&machine, &stale);
            reloaded.store(true, Ordering::SeqCst);
            removed
        });
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (machine, reloaded) = (&machine, &reloaded);
                s.spawn(move || {
                    let mut rng = Rng::new(seed, 300 + t);
                    let mut attempts = Vec::new();
                    // PER_THREAD attempts, and on until AFTER of them started after the reload
                    // (however the threads were scheduled), within MAX_PER_THREAD.
                    let mut after_reload = 0;
                    for n in 0..MAX_PER_THREAD {
                        if n >= PER_THREAD && after_reload >= AFTER {
                            break;
                        }
                        let local = 2_000 + (t * MAX_PER_THREAD + n) as u16;
                        let c = rng.attempt(local);
                        let after = reloaded.load(Ordering::SeqCst);
                        after_reload += usize::from(after);
                        let outcome = machine.connect(&c, rng.irql());
                        let what = format!("{c:?} (seed {seed:#x})");
                        let (action, _) = decided_once(&c, &outcome, &what);
                        attempts.push((c, action, after));
                    }
                    attempts
                })
            })
            .collect();
        let attempts: Vec<_> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a connection thread"))
            .collect();
        (attempts, reloader.join().expect("the reloader"))
    });
    unload_clean(&machine, driver);
    for thread in service {
        thread.join().unwrap();
    }
    asked_only_via(design, &reload::on(design).stats.snapshot());

    let mut after_reload = 0;
    for (c, decided, after) in &attempts {
        let what = format!("{c:?} (seed {seed:#x})");
        let (old, new) = (
            action(decide_connection(&old, c)),
            action(decide_connection(&new, c)),
        );
        match (c.direction, after) {
            (SimDirection::Outbound, true) => assert_eq!(*decided, new, "{what}: new rules"),
            (SimDirection::Outbound, false) => {
                assert!(*decided == old || *decided == new, "{what}")
            }
            (SimDirection::Inbound, true) => {
                assert!(*decided == new || *decided == Action::Block, "{what}")
            }
            (SimDirection::Inbound, false) => assert!(
                *decided == old || *decided == new || *decided == Action::Block,
                "{what}"
            ),
        }
        after_reload += usize::from(*after);
    }
    assert!(
        removed > 0,
        "the reload revoked cached verdicts (seed {seed:#x})"
    );
    assert!(
        after_reload > 100,
        "attempts ran after the reload (seed {seed:#x}): {after_reload}"
    );
    eprintln!(
        "reload: {removed} verdicts revoked, {after_reload} attempts after; {:?}",
        reload::on(design).stats.snapshot()
    );
}

/// A second instance cannot load (the port's and the device's names are taken); its failed
/// `DriverEntry` undoes everything it did, and the first instance keeps working.
///
/// Once: it loads the shipped `DriverEntry`, which asks through the default design (the
/// channel); nothing in it depends on how the service is asked.
#[test]
fn a_second_instance_fails_to_load_and_leaves_nothing_behind() {
    let machine = Machine::new();
    let driver = load(&machine, firewall_driver::DriverEntry);
    let second = machine.load_driver("firewall-2", firewall_driver::DriverEntry);
    assert_eq!(second.err(), Some(Status::OBJECT_NAME_COLLISION));
    let c = browser(52_000, web(7, 443));
    assert_eq!(
        decided_once(
            &c,
            &machine.connect(&c, AleIrql::Dispatch),
            "first instance"
        ),
        (Action::Block, true)
    );
    unload_clean(&machine, driver);
}

/// A cached verdict answers until the lifetime the reply granted has passed on the kernel's
/// clock; then the connection is asked about again. Inbound likewise. (The simulated clock is
/// real time plus what the test adds, so "still cached" is checked right after caching, well
/// within the minute granted, and expiry by adding the whole minute; the exact boundary is a
/// unit test of the cache.)
fn cached_verdicts_expire_after_their_lifetime(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, expiry::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), RULES);
    let mut port = 51_000;
    let mut attempt = |c: Connection| {
        port += 1;
        let c = Connection {
            local: SocketAddr::new(c.local.ip(), port),
            ..c
        };
        decided_once(
            &c,
            &machine.connect(&c, AleIrql::Dispatch),
            &format!("{c:?}"),
        )
    };
    let out = browser(0, web(7, 443));
    assert_eq!(attempt(out.clone()), (Action::Permit, true), "asked");
    assert_eq!(attempt(out.clone()), (Action::Permit, false), "cached");
    machine.advance_clock(Duration::from_secs(60));
    assert_eq!(
        attempt(out.clone()),
        (Action::Permit, true),
        "60 s: expired, asked"
    );
    assert_eq!(
        attempt(out.clone()),
        (Action::Permit, false),
        "cached again"
    );

    let inbound = connection(
        4,
        APPS[1],
        IpProtocol::Tcp,
        SimDirection::Inbound,
        5_000,
        web(9, 40_000),
    );
    let inbound_attempt = |pended: bool| {
        let outcome = machine.connect(&inbound, AleIrql::Passive);
        assert_eq!(
            decided_once(&inbound, &outcome, "inbound"),
            (Action::Permit, pended)
        );
    };
    inbound_attempt(true);
    inbound_attempt(false);
    machine.advance_clock(Duration::from_secs(60));
    inbound_attempt(true);
    inbound_attempt(false);

    let stats = expiry::on(design).stats.snapshot();
    assert_eq!((stats.expired, stats.asked), (2, 4), "{stats:?}");
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 4);
}

// --- bursts and overload ----------------------------------------------------------------------

/// The browser's outbound TCP attempt from `local_port` to 192.0.2.`last`:443, as one
/// classification at ALE_AUTH_CONNECT_V4: the initial authorization (pendable), or its
/// reauthorization. Tests that drive the two halves of `Machine::connect` themselves use it, to
/// hold completed connections before their reauthorization.
fn auth_connect(
    local_port: u16,
    last: u8,
    reauthorization: bool,
) -> ClassifyRequest<AleAuthConnectV4> {
    use wfp_rs::layer::fields;
    use wfp_rs::layer::value::ConditionFlags;
    let request = ClassifyRequest::<AleAuthConnectV4>::new()
        .process(100, APPS[0])
        .with::<fields::AleAppId>(APPS[0])
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpLocalAddress>(Ipv4Addr::new(10, 0, 0, 2))
        .with::<fields::IpLocalPort>(local_port)
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, last))
        .with::<fields::IpRemotePort>(443u16);
    if reauthorization {
        // `reauthorization()` sets IS_REAUTHORIZE in FLAGS, as the engine presents one.
        request
            .with::<fields::Flags>(ConditionFlags::empty())
            .reauthorization()
    } else {
        request
            .with::<fields::Flags>(ConditionFlags::empty())
            .pendable()
    }
}

/// Classifies `request` at `DISPATCH_LEVEL`, as the network stack does at ALE_AUTH_CONNECT.
fn classify_connect(machine: &Machine, request: &ClassifyRequest<AleAuthConnectV4>) -> Decision {
    machine.classify(wfp_rs::irql::Irql::DISPATCH, request)
}

/// What the burst tests' service says: allow, except every seventh local port; never cached, so
/// only the verdict table can carry the answer to the reauthorization.
fn burst_verdict(local_port: u16) -> Verdict {
    if local_port.is_multiple_of(7) {
        Verdict::Deny
    } else {
        Verdict::Allow
    }
}

fn burst_reply(message: &Received) -> Vec<u8> {
    let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
    encode_reply(request.reply(burst_verdict(request.local_port)))
}

/// Pends every attempt and returns each pend, or the first attempt that was not pended.
fn pend_all(machine: &Machine, ports: &[u16]) -> Result<Vec<wfp_rs_sim::Pending>, String> {
    ports
        .iter()
        .map(|&port| {
            let decision = classify_connect(machine, &auth_connect(port, 1, false));
            match decision.pending {
                Some(pending) if decision.absorbed && decision.action == Action::Block => {
                    Ok(pending)
                }
                _ => Err(format!("port {port} was not pended: {decision:?}")),
            }
        })
        .collect()
}

/// Waits until the driver completed each pend; none is reauthorized yet, so every verdict
/// waits in the driver's table at once.
fn complete_all(machine: &Machine, pendings: Vec<wfp_rs_sim::Pending>) {
    for pending in pendings {
        assert_eq!(machine.wait_for_completion(pending), None, "reauthorize");
    }
}

/// Pends every attempt, checks it was pended, and waits until the driver completed each.
fn pend_and_complete(machine: &Machine, ports: &[u16]) {
    let pendings = pend_all(machine, ports).unwrap_or_else(|error| panic!("{error}"));
    complete_all(machine, pendings);
}

/// Reauthorizes every attempt and checks it gets the service's verdict.
fn reauthorize_all(machine: &Machine, ports: &[u16]) {
    for &port in ports {
        let decision = classify_connect(machine, &auth_connect(port, 1, true));
        assert_eq!(
            decision.action,
            action(burst_verdict(port)),
            "port {port}: the service's verdict, not the default: {decision:?}"
        );
        assert!(decision.pending.is_none());
    }
}

/// More connections pended at once than the verdict table held before (256), with the
/// service's replies held until every question has arrived (one worker thread per question, so
/// all are asked at once), then all answered, and every reauthorization held until every pend
/// is completed: every connection gets the service's own verdict; nothing is refused or
/// defaulted.
fn a_burst_beyond_the_old_table_size_gets_every_services_verdict(design: AskVia) {
    const N: u16 = 320;
    let machine = Machine::with_worker_threads(N as usize);
    let driver = load(&machine, burst::on(design).entry);
    let client = connected_client(&machine, design);
    let ports: Vec<u16> = (0..N).map(|n| 47_000 + n).collect();
    // Detached, so a failing test ends instead of waiting for questions that will not come.
    let service = thread::spawn(move || {
        // Nothing is answered until every connection is pended and asked about.
        let held: Vec<_> = (0..N)
            .map(|_| client.get_message(None).expect("a question"))
            .collect();
        for message in &held {
            client
                .reply(message.id, &burst_reply(message))
                .expect("replied");
        }
    });
    pend_and_complete(&machine, &ports);
    service.join().unwrap();
    reauthorize_all(&machine, &ports);
    let stats = burst::on(design).stats.snapshot();
    asked_only_via(design, &stats);
    assert_eq!(
        (
            stats.asked,
            stats.answered,
            stats.defaults,
            stats.overloaded
        ),
        (u64::from(N), u64::from(N), 0, 0),
        "{stats:?}"
    );
    assert!(
        !machine
            .debug_output()
            .iter()
            .any(|l| l.contains("full") || l.contains("pended or awaiting")),
        "no overload"
    );
    unload_clean(&machine, driver);
}

/// Lines the driver logs when an overload burst starts and ends.
fn overload_lines(machine: &Machine) -> (Vec<String>, Vec<String>) {
    let output = machine.debug_output();
    let started = output
        .iter()
        .filter(|l| l.contains("pended or awaiting reauthorization"))
        .cloned()
        .collect();
    let ended = output
        .iter()
        .filter(|l| l.contains("pending again"))
        .cloned()
        .collect();
    (started, ended)
}

/// A burst the size of the verdict table, completed and waiting for its reauthorizations, and
/// then more: the extra connections are not pended but get the overload decision (deny) at
/// once, are counted as overloaded (not as defaults) and logged once for the burst; every recorded verdict still answers its reauthorization;
/// once slots are free, new connections are pended again.
fn beyond_the_verdict_table_new_connections_get_the_overload_decision_and_nothing_recorded_is_lost(
    design: AskVia,
) {
    const EXTRA: u16 = 5;
    let capacity = u16::try_from(firewall_driver::VERDICT_SLOTS).unwrap();
    let machine = Machine::new();
    let driver = load(&machine, overload::on(design).entry);
    let client = connected_client(&machine, design);
    let ports: Vec<u16> = (0..capacity).map(|n| 10_000 + n).collect();
    // Detached, so a failing test ends; it ends at unload, when the driver disconnects it.
    let service = thread::spawn(move || {
        while let Some(message) = client.get_message(None) {
            match client.reply(message.id, &burst_reply(&message)) {
                Ok(()) => {}
                Err(Status::PORT_DISCONNECTED) => break,
                // Decided without it: on the channel, `stopping` decides the questions it holds.
                Err(Status::FLT_NO_WAITER_FOR_REPLY) if client.channel.is_some() => {}
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
    });
    pend_and_complete(&machine, &ports);
    // Every slot holds a verdict waiting for its reauthorization.
    for n in 0..EXTRA {
        let port = 30_000 + n;
        let decision = classify_connect(&machine, &auth_connect(port, 2, false));
        assert_eq!(
            (decision.action, decision.pending, decision.absorbed),
            (Action::Block, None, false),
            "port {port}: the overload decision at once, not pended"
        );
    }
    let stats = overload::on(design).stats.snapshot();
    assert_eq!(
        (stats.overloaded, stats.defaults, stats.asked),
        (u64::from(EXTRA), 0, u64::from(capacity)),
        "{stats:?}"
    );
    let (started, ended) = overload_lines(&machine);
    assert_eq!(
        (started.len(), ended.len()),
        (1, 0),
        "logged once: {started:?}"
    );
    // Every recorded verdict is still there for its reauthorization.
    reauthorize_all(&machine, &ports);
    // Slots are free again: a new connection is pended and asked about.
    let port = 40_000;
    let decision = classify_connect(&machine, &auth_connect(port, 3, false));
    let pending = decision.pending.expect("pended again");
    assert_eq!(machine.wait_for_completion(pending), None);
    let decision = classify_connect(&machine, &auth_connect(port, 3, true));
    assert_eq!(decision.action, action(burst_verdict(port)));
    let (started, ended) = overload_lines(&machine);
    assert_eq!(started.len(), 1);
    assert_eq!(ended.len(), 1, "the burst's end is logged once");
    assert!(
        ended[0].contains(&format!("{EXTRA} connection(s) got deny (overload)")),
        "{ended:?}"
    );
    unload_clean(&machine, driver);
    service.join().unwrap();
    let stats = overload::on(design).stats.snapshot();
    assert_eq!(
        (
            stats.overloaded,
            stats.defaults,
            stats.asked,
            stats.answered
        ),
        (
            u64::from(EXTRA),
            0,
            u64::from(capacity) + 1,
            u64::from(capacity) + 1
        ),
        "{stats:?}"
    );
}

/// Fills a `max_pending: 3` driver with 3 connections pended and held unanswered by the
/// service, classifies a fourth (the overload), then lets the service answer the three and
/// checks each gets the service's verdict. Returns the fourth's decision.
fn overload_a_driver_of_three(machine: &Machine, design: AskVia, stats: &Stats) -> Decision {
    const PORTS: [u16; 3] = [20_001, 20_002, 20_003];
    let client = connected_client(machine, design);
    let (asked_tx, asked_rx) = std::sync::mpsc::channel();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<()>();
    // Detached, so a failing test ends instead of waiting for questions that will not come.
    let service = thread::spawn(move || {
        let held: Vec<_> = (0..PORTS.len())
            .map(|_| client.get_message(None).expect("a question"))
            .collect();
        asked_tx.send(()).unwrap();
        answer_rx.recv().unwrap();
        for message in &held {
            client
                .reply(message.id, &burst_reply(message))
                .expect("replied");
        }
        // Held until the fourth is decided: no service means the default, not overload.
        client
    });
    let pendings: Vec<_> = PORTS
        .iter()
        .map(|&port| {
            classify_connect(machine, &auth_connect(port, 4, false))
                .pending
                .expect("pended")
        })
        .collect();
    asked_rx.recv().unwrap();
    // All three are with the service, unanswered.
    let overloaded = classify_connect(machine, &auth_connect(20_004, 4, false));
    assert_eq!(overloaded.pending, None, "not pended: {overloaded:?}");
    assert_eq!(stats.snapshot().overloaded, 1);
    answer_tx.send(()).unwrap();
    complete_all(machine, pendings);
    drop(service.join().unwrap());
    for port in PORTS {
        let decision = classify_connect(machine, &auth_connect(port, 4, true));
        assert_eq!(decision.action, action(burst_verdict(port)), "port {port}");
    }
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.overloaded, snapshot.defaults, snapshot.answered),
        (1, 0, 3),
        "overload is not counted as a default: {snapshot:?}"
    );
    overloaded
}

/// `Config::max_pending` counts connections still waiting for the service too: with 3 pended
/// and unanswered, a fourth gets the overload decision (deny) at once; the 3 then get the
/// service's verdicts.
fn max_pending_counts_connections_waiting_for_the_service(design: AskVia) {
    let machine = Machine::with_worker_threads(3);
    let driver = load(&machine, overload_small::on(design).entry);
    let decision = overload_a_driver_of_three(&machine, design, overload_small::on(design).stats);
    assert_eq!(decision.action, Action::Block);
    unload_clean(&machine, driver);
}

/// Fail-open is an answer to "no service", not to overload: with the default `allow`, a
/// connection beyond `max_pending` is still blocked (the overload decision, deny by default),
/// counted as overloaded and logged as such; the default still applies when no service is
/// connected.
fn a_fail_open_default_does_not_open_the_firewall_to_a_burst(design: AskVia) {
    let machine = Machine::with_worker_threads(3);
    let driver = load(&machine, overload_fail_open::on(design).entry);
    let decision =
        overload_a_driver_of_three(&machine, design, overload_fail_open::on(design).stats);
    assert_eq!(decision.action, Action::Block, "{decision:?}");
    let (started, ended) = overload_lines(&machine);
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(started[0].contains("get deny (overload)"), "{started:?}");
    // The service is gone now: the default (allow), after a pend, counted as a default.
    let port = 20_005;
    let pending = classify_connect(&machine, &auth_connect(port, 4, false))
        .pending
        .expect("pended: slots are free again");
    let completed = machine.wait_for_completion(pending);
    assert_eq!(completed, None);
    let decision = classify_connect(&machine, &auth_connect(port, 4, true));
    assert_eq!(decision.action, Action::Permit, "the no-service default");
    let stats = overload_fail_open::on(design).stats.snapshot();
    assert_eq!((stats.overloaded, stats.defaults), (1, 1), "{stats:?}");
    let (_, ended_after) = overload_lines(&machine);
    assert_eq!((ended.len(), ended_after.len()), (0, 1));
    assert!(
        ended_after[0].contains("1 connection(s) got deny (overload)"),
        "{ended_after:?}"
    );
    unload_clean(&machine, driver);
}

/// The overload decision is configuration: `overload: allow` permits a connection beyond
/// `max_pending`, still counted as overloaded and not as a default.
fn an_overload_decision_of_allow_permits_and_is_counted(design: AskVia) {
    let machine = Machine::with_worker_threads(3);
    let driver = load(&machine, overload_permits::on(design).entry);
    let decision = overload_a_driver_of_three(&machine, design, overload_permits::on(design).stats);
    assert_eq!(decision.action, Action::Permit, "{decision:?}");
    let (started, _) = overload_lines(&machine);
    assert!(
        started.len() == 1 && started[0].contains("get allow (overload)"),
        "{started:?}"
    );
    unload_clean(&machine, driver);
}

/// Unload with verdicts recorded and their reauthorizations not yet run: it waits (the slots
/// are still reserved), the reauthorizations that come while it waits get the service's
/// verdicts, and it then finishes without giving up on them.
fn unload_waits_for_the_reauthorizations_of_completed_pends(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, unload_reserved::on(design).entry);
    let client = connected_client(&machine, design);
    let service = thread::spawn(move || {
        while let Some(message) = client.get_message(None) {
            match client.reply(message.id, &burst_reply(&message)) {
                Ok(()) => {}
                Err(Status::PORT_DISCONNECTED) => break,
                // Decided without it: on the channel, `stopping` decides the questions it holds.
                Err(Status::FLT_NO_WAITER_FOR_REPLY) if client.channel.is_some() => {}
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
    });
    let ports: Vec<u16> = (0..40).map(|n| 21_000 + n).collect();
    pend_and_complete(&machine, &ports);
    thread::scope(|s| {
        let unloader = s.spawn(|| machine.unload_driver(driver));
        // Unload has begun: no new pends, the service disconnected.
        while !machine
            .debug_output()
            .iter()
            .any(|l| l.starts_with("firewall: stopping"))
        {
            thread::yield_now();
        }
        reauthorize_all(&machine, &ports);
        unloader.join().unwrap().expect("unloads");
    });
    service.join().unwrap();
    let output = machine.debug_output();
    assert!(
        !output.iter().any(|l| l.contains("still outstanding")),
        "every reauthorization was waited for: {output:?}"
    );
    assert_eq!(machine.pending_classifications(), 0);
    assert_eq!(machine.pool_blocks(), [], "pool left after unload");
    let stats = unload_reserved::on(design).stats.snapshot();
    assert_eq!((stats.defaults, stats.overloaded), (0, 0), "{stats:?}");
}

/// Every pool allocation `DriverEntry` makes — its shared state included, which is a `PoolArc`
/// because `Arc::new` cannot report an exhausted pool — is made to fail in turn: the load fails
/// with `STATUS_INSUFFICIENT_RESOURCES`, never a bug check, and leaves nothing behind.
fn every_allocation_failure_during_load_is_reported_and_leaks_nothing(design: AskVia) {
    let entry = load::on(design).entry;
    let machine = Machine::new();
    let mut failures = 0;
    for skip in 0.. {
        assert!(skip < 1000, "the load has a bounded number of allocations");
        machine.fail_allocations(skip, 1);
        match machine.load_driver("firewall", entry) {
            Ok(driver) => {
                machine.fail_allocations(0, 0);
                unload_clean(&machine, driver);
                break;
            }
            Err(status) => {
                assert_eq!(status, Status::INSUFFICIENT_RESOURCES, "allocation {skip}");
                failures += 1;
            }
        }
        assert_eq!(machine.pool_blocks(), [], "allocation {skip}");
    }
    assert!(failures > 10, "{failures} allocation points");
}

// --- only the service answers ------------------------------------------------------------------

/// The firewall service: LocalSystem, with its per-service SID.
fn the_service() -> Process {
    Process::new(812, SERVICE_IMAGE, Caller::System)
        .with_group(wfp_rs::client::Sid::parse(SERVICE_SID).unwrap())
}

/// Another elevated process, which would answer "allow" to everything.
fn another_admin() -> Process {
    Process::new(
        4242,
        r"\Device\HarddiskVolume3\Users\admin\allow-all.exe",
        Caller::Administrator,
    )
}

/// With the service's SID configured, another administrator's process is refused at the port
/// and at the control device, before the service connects and while it restarts; connections
/// meanwhile get the default; the real service then connects and answers.
fn only_the_configured_service_may_connect_or_send_commands(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, only_service::on(design).entry);
    assert!(
        machine
            .debug_output()
            .iter()
            .any(|line| line.contains("only the service may connect")
                && line.contains(SERVICE_SID)),
        "{:?}",
        machine.debug_output()
    );
    let intruder = ServiceClient::connect_as(&machine, design, another_admin());
    assert_eq!(intruder.err(), Some(Status::ACCESS_DENIED));
    assert_eq!(
        machine
            .open_device(CONTROL_DEVICE_PATH, another_admin())
            .err(),
        Some(Status::ACCESS_DENIED)
    );
    // SYSTEM without the service SID is no better.
    assert_eq!(
        machine
            .open_device(CONTROL_DEVICE_PATH, Caller::System)
            .err(),
        Some(Status::ACCESS_DENIED)
    );

    let service =
        ServiceClient::connect_as(&machine, design, the_service()).expect("the service connects");
    let answering = serve_simply(service, RULES);
    let c = browser(47_000, web(7, 443));
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "service"),
        (Action::Permit, true)
    );
    let device = machine
        .open_device(CONTROL_DEVICE_PATH, the_service())
        .expect("the service opens the control device");
    let mut bytes = [0u8; REVOKE_MAX_LEN];
    let len = Revoke::encode_all(&mut bytes).unwrap();
    let revoked = device
        .device_io_control(
            REVOKE.raw(),
            &bytes[..len],
            firewall_protocol::control::REVOKED_LEN,
        )
        .wait();
    assert_eq!(Revoked::decode(revoked.ok().unwrap()).unwrap().removed, 1);
    drop(device);

    // The identity admits; it does not add slots: a second instance of the service waits (at
    // the port, which both designs connect to).
    let second = ServiceClient::connect_as(&machine, design, the_service());
    assert_eq!(second.err(), Some(Status::CONNECTION_COUNT_LIMIT));
    unload_clean(&machine, driver);
    assert_eq!(answering.join().unwrap(), 1);
}

/// While the service is down (killed between two connections), another administrator still
/// cannot take the slot; the connection meanwhile gets the default; the restarted service gets
/// the slot and answers.
fn while_the_service_restarts_another_admin_cannot_answer(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, only_service::on(design).entry);
    let service = ServiceClient::connect_as(&machine, design, the_service());
    drop(service.expect("the service connects"));

    let intruder = ServiceClient::connect_as(&machine, design, another_admin());
    assert_eq!(intruder.err(), Some(Status::ACCESS_DENIED));
    let c = browser(47_100, web(7, 443));
    let outcome = machine.connect(&c, AleIrql::Passive);
    assert_eq!(decided_once(&c, &outcome, "down"), (Action::Block, true));

    let restarted = Process::new(913, SERVICE_IMAGE, Caller::System)
        .with_group(wfp_rs::client::Sid::parse(SERVICE_SID).unwrap());
    let service = ServiceClient::connect_as(&machine, design, restarted)
        .expect("the restarted service connects");
    let answering = serve_simply(service, RULES);
    let c = browser(47_101, web(7, 443));
    let outcome = machine.connect(&c, AleIrql::Dispatch);
    assert_eq!(
        decided_once(&c, &outcome, "restarted"),
        (Action::Permit, true)
    );
    let reasons: Vec<String> = logged_decisions(&machine)
        .into_iter()
        .map(|(_, verdict, reason)| format!("{verdict} ({reason})"))
        .collect();
    assert_eq!(
        reasons,
        [
            format!("deny ({})", no_service_default(design)),
            format!("allow ({})", by_the_service(design, ", cached for 60 s")),
        ]
    );
    unload_clean(&machine, driver);
    assert_eq!(answering.join().unwrap(), 1);
}

/// A configured image: the same executable elsewhere on disk is refused.
fn a_configured_image_refuses_other_executables(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, only_service_image::on(design).entry);
    let copy = Process::new(
        4243,
        r"\Device\HarddiskVolume3\Temp\firewall.exe",
        Caller::System,
    );
    let client = ServiceClient::connect_as(&machine, design, copy.clone());
    assert_eq!(client.err(), Some(Status::ACCESS_DENIED));
    assert_eq!(
        machine.open_device(CONTROL_DEVICE_PATH, copy).err(),
        Some(Status::ACCESS_DENIED)
    );
    let service = Process::new(812, SERVICE_IMAGE, Caller::System);
    let client = ServiceClient::connect_as(&machine, design, service.clone())
        .expect("the service's executable connects");
    drop(machine.open_device(CONTROL_DEVICE_PATH, service).unwrap());
    drop(client);
    unload_clean(&machine, driver);
}

/// A malformed SID is a configuration error: the driver does not load.
fn a_malformed_service_sid_fails_the_load(design: AskVia) {
    let machine = Machine::new();
    assert_eq!(
        machine
            .load_driver("firewall", bad_service_sid::on(design).entry)
            .err(),
        Some(Status::INVALID_SID)
    );
    assert_eq!(machine.pool_blocks(), []);
}

/// Without an identity, any administrator may connect (the demo of the gap), and the driver
/// says so at load.
fn without_an_identity_the_driver_warns_that_any_admin_may_answer(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, stress::on(design).entry);
    assert!(
        machine
            .debug_output()
            .iter()
            .any(|line| line.contains("no service identity configured")),
        "{:?}",
        machine.debug_output()
    );
    let intruder = ServiceClient::connect_as(&machine, design, another_admin());
    drop(intruder.expect("no restriction"));
    unload_clean(&machine, driver);
}

/// The shipped `DriverEntry` reads the identity its installer wrote to `Parameters`: the
/// service's SID there admits the service alone.
///
/// Once: it loads the shipped `DriverEntry`, which asks through the default design (the
/// channel); nothing in it depends on how the service is asked.
#[test]
fn the_installed_identity_in_the_registry_admits_only_the_service() {
    let machine = Machine::new();
    machine.set_driver_parameter(
        "firewall",
        firewall_driver::SERVICE_SID_PARAMETER,
        SERVICE_SID,
    );
    let driver = load(&machine, firewall_driver::DriverEntry);
    assert!(
        machine
            .debug_output()
            .iter()
            .any(|line| line.contains("only the service may connect") && line.contains(SERVICE_SID)),
        "{:?}",
        machine.debug_output()
    );
    let mut intruder = machine.port_client(PORT_NAME).as_process(another_admin());
    assert_eq!(intruder.connect(&[]), Err(Status::ACCESS_DENIED));
    assert_eq!(
        machine
            .open_device(CONTROL_DEVICE_PATH, another_admin())
            .err(),
        Some(Status::ACCESS_DENIED)
    );
    let mut service = machine.port_client(PORT_NAME).as_process(the_service());
    service.connect(&[]).expect("the service connects");
    drop(
        machine
            .open_device(CONTROL_DEVICE_PATH, the_service())
            .unwrap(),
    );
    drop(service);
    drop(intruder);
    unload_clean(&machine, driver);
}

/// An installed image path works the same way; a malformed installed SID keeps the driver from
/// loading rather than running unrestricted.
///
/// Once: it loads the shipped `DriverEntry`, which asks through the default design (the
/// channel); nothing in it depends on how the service is asked.
#[test]
fn an_installed_image_admits_it_and_a_malformed_installed_sid_fails_the_load() {
    let machine = Machine::new();
    machine.set_driver_parameter(
        "firewall",
        firewall_driver::SERVICE_IMAGE_PARAMETER,
        SERVICE_IMAGE,
    );
    let driver = load(&machine, firewall_driver::DriverEntry);
    let mut elsewhere = machine.port_client(PORT_NAME).as_process(another_admin());
    assert_eq!(elsewhere.connect(&[]), Err(Status::ACCESS_DENIED));
    let mut service =
        machine
            .port_client(PORT_NAME)
            .as_process(Process::new(812, SERVICE_IMAGE, Caller::System));
    service
        .connect(&[])
        .expect("the service's executable connects");
    drop(service);
    drop(elsewhere);
    unload_clean(&machine, driver);

    let machine = Machine::new();
    machine.set_driver_parameter(
        "firewall",
        firewall_driver::SERVICE_SID_PARAMETER,
        "S-1-5-80-x",
    );
    assert_eq!(
        machine
            .load_driver("firewall", firewall_driver::DriverEntry)
            .err(),
        Some(Status::INVALID_SID)
    );
    assert_eq!(machine.pool_blocks(), []);
}

// --- the whole image path (issue 11, point 5) ---------------------------------------------------

configured_driver!(
    long_paths,
    Config {
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);
configured_driver!(
    unaskable,
    Config {
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);

/// A default-allow policy whose one rule denies a program by its file name, wherever it is.
const OPEN_POLICY: &str = r#"
default = "allow"

[[rule]]
name = "no-nc"
action = "deny"
app = '**\nc.exe'
"#;

/// `\device\harddiskvolume3\<folders>\<file>`, exactly `units` UTF-16 units long (ASCII, so
/// as many bytes).
fn long_app(units: usize, file: &str) -> String {
    let prefix = r"\device\harddiskvolume3";
    let mut path = prefix.to_owned();
    let folders = units - 1 - file.len();
    while path.len() + r"\dir".len() <= folders {
        path.push_str(r"\dir");
    }
    while path.len() < folders {
        path.push('x');
    }
    path.push('\\');
    path.push_str(file);
    assert_eq!(path.len(), units);
    path
}

/// Issue 11, point 5: version 1 of the protocol cut an image path at 520 UTF-16 units, and
/// under a default-allow policy a program started from a longer path escaped a deny rule that
/// named its file. Now the whole path is asked about: the program is denied by the rule,
/// outbound (pended, the service's verdict) and inbound (the service's cached verdict for the
/// retransmission), from just past the old cut to the longest NT path; another program from the
/// same folders is allowed by the policy's default. The driver itself fails open, so a deny can
/// only be the rule's.
fn a_program_from_a_long_path_is_denied_by_the_rule_naming_its_file(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, long_paths::on(design).entry);
    let policy = Arc::new(Mutex::new(rules(OPEN_POLICY)));
    let (log, service) = serve(&machine, design, Arc::clone(&policy), 1, seed());
    let lengths = [521, 600, 4096, firewall_protocol::MAX_PATH_UNITS];
    for (n, &units) in lengths.iter().enumerate() {
        let n = n as u16;
        let nc = long_app(units, "nc.exe");
        let ok = long_app(units, "ok.exe");
        let out = |app: &str, local_port| {
            connection(
                500 + u64::from(n),
                app,
                IpProtocol::Tcp,
                SimDirection::Outbound,
                local_port,
                web(7, 443),
            )
        };
        let (denied, allowed) = (out(&nc, 40_000 + 2 * n), out(&ok, 40_001 + 2 * n));
        let what = format!("{units} units");
        assert_eq!(
            decided_once(&denied, &machine.connect(&denied, AleIrql::Dispatch), &what),
            (Action::Block, true),
            "{what}: asked, and denied by the rule"
        );
        // Pended, not answered from the cache: the same process and remote endpoint, paths
        // equal but for their last units, so the cache key must hash the whole path.
        assert_eq!(
            decided_once(
                &allowed,
                &machine.connect(&allowed, AleIrql::Dispatch),
                &what
            ),
            (Action::Permit, true),
            "{what}: another program from the same folders"
        );

        // Inbound: the first attempt is pended and gets the rule's verdict (not the fail-open
        // default), the retransmission the service's cached verdict.
        let peer = connection(
            600 + u64::from(n),
            &nc,
            IpProtocol::Tcp,
            SimDirection::Inbound,
            4_000,
            SocketAddr::new(Ipv4Addr::new(192, 0, 2, 99).into(), 50_000 + n),
        );
        assert_eq!(
            decided_once(&peer, &machine.connect(&peer, AleIrql::Dispatch), &what),
            (Action::Block, true),
            "{what}: inbound, the rule's verdict at the first attempt"
        );
        assert_eq!(
            decided_once(&peer, &machine.connect(&peer, AleIrql::Dispatch), &what),
            (Action::Block, false),
            "{what}: inbound, the cached verdict of the rule"
        );
    }
    let stats = long_paths::on(design).stats.snapshot();
    // Longer than the channel's slots: a work item asks over the port, on either design.
    assert_eq!(stats.asked_via_port, stats.asked, "{stats:?}");
    assert_eq!(stats.unaskable, 0, "{stats:?}");
    unload_clean(&machine, driver);
    for thread in service {
        thread.join().unwrap();
    }
    // The service saw each whole path, and decided by the rule.
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 3 * lengths.len());
    for answered in log.iter() {
        let path: String = answered.request.image_path.chars_lossy().collect();
        assert!(lengths.contains(&path.len()), "{}", path.len());
        let expected = if path.ends_with(r"\nc.exe") {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        assert_eq!(answered.valid, Some(expected), "{} units", path.len());
    }
}

/// The defensive bound: an application id a request cannot carry whole — longer than any NT
/// path, or not a path (a NUL inside) — is never asked about with a part of it, and never given
/// a decision more permissive than the service's could be: it is denied, whatever the default
/// (here allow), outbound and inbound, at once, counted and logged. The longest NT path is
/// asked about as usual.
fn a_path_no_request_can_carry_whole_is_denied_without_asking(design: AskVia) {
    let machine = Machine::new();
    let driver = load(&machine, unaskable::on(design).entry);
    let service = serve_simply(connected_client(&machine, design), OPEN_POLICY);
    let too_long = long_app(firewall_protocol::MAX_PATH_UNITS + 1, "ok.exe");
    let nul_inside = format!("{}\0{}", APPS[0], r"\nc.exe");
    let mut attempts = 0u16;
    for app in [&too_long, &nul_inside] {
        for direction in [SimDirection::Outbound, SimDirection::Inbound] {
            attempts += 1;
            let c = connection(
                700,
                app,
                IpProtocol::Tcp,
                direction,
                41_000 + attempts,
                web(8, 443),
            );
            let what = format!("{direction:?}, {} bytes", app.len());
            assert_eq!(
                decided_once(&c, &machine.connect(&c, AleIrql::Dispatch), &what),
                (Action::Block, false),
                "{what}: denied at once, not the default"
            );
        }
    }
    let stats = unaskable::on(design).stats.snapshot();
    assert_eq!(
        (stats.unaskable, stats.asked, stats.defaults),
        (4, 0, 0),
        "{stats:?}"
    );
    let denials: Vec<String> = machine
        .debug_output()
        .into_iter()
        .filter(|line| line.contains("cannot be sent whole"))
        .collect();
    assert_eq!(
        denials,
        [
            "firewall: pid 700 outbound: deny (the image path cannot be sent whole: the image path is longer than MAX_PATH_UNITS)\n",
            "firewall: pid 700 inbound: deny (the image path cannot be sent whole: the image path is longer than MAX_PATH_UNITS)\n",
            "firewall: pid 700 outbound: deny (the image path cannot be sent whole: the image path contains a NUL unit)\n",
            "firewall: pid 700 inbound: deny (the image path cannot be sent whole: the image path contains a NUL unit)\n",
        ]
    );
    // A reauthorization the driver did not cause (policy changed, say) finds nothing recorded
    // or cached: denied too, not the default.
    let reauthorized = classify_connect(&machine, &auth_connect_from(&too_long, 41_050, true));
    assert_eq!(reauthorized.action, Action::Block, "{reauthorized:?}");
    assert_eq!(unaskable::on(design).stats.snapshot().unaskable, 5);
    // The longest NT path is asked about, and the default-allow policy allows it.
    let longest = connection(
        701,
        &long_app(firewall_protocol::MAX_PATH_UNITS, "ok.exe"),
        IpProtocol::Tcp,
        SimDirection::Outbound,
        41_100,
        web(8, 443),
    );
    assert_eq!(
        decided_once(
            &longest,
            &machine.connect(&longest, AleIrql::Dispatch),
            "longest"
        ),
        (Action::Permit, true)
    );
    assert_eq!(unaskable::on(design).stats.snapshot().asked, 1);
    unload_clean(&machine, driver);
    assert_eq!(service.join().unwrap(), 1);
}

configured_driver!(
    question_budget,
    Config {
        default: Verdict::Allow,
        ..PATIENT_CONFIG
    }
);

/// The browser's outbound TCP attempt from `app` and `local_port` to 192.0.2.5:443 at
/// ALE_AUTH_CONNECT_V4, as `auth_connect` builds it for the browser.
fn auth_connect_from(
    app: &str,
    local_port: u16,
    reauthorization: bool,
) -> ClassifyRequest<AleAuthConnectV4> {
    use wfp_rs::layer::fields;
    use wfp_rs::layer::value::ConditionFlags;
    let request = ClassifyRequest::<AleAuthConnectV4>::new()
        .process(100, app)
        .with::<fields::AleAppId>(app)
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpLocalAddress>(Ipv4Addr::new(10, 0, 0, 2))
        .with::<fields::IpLocalPort>(local_port)
        .with::<fields::IpRemoteAddress>(Ipv4Addr::new(192, 0, 2, 5))
        .with::<fields::IpRemotePort>(443u16);
    if reauthorization {
        // `reauthorization()` sets IS_REAUTHORIZE in FLAGS, as the engine presents one.
        request
            .with::<fields::Flags>(ConditionFlags::empty())
            .reauthorization()
    } else {
        request
            .with::<fields::Flags>(ConditionFlags::empty())
            .pendable()
    }
}

/// Whole paths make questions of up to 64 KiB, so the questions of the moment are bounded in
/// bytes as well as in number: with the service holding its answers, as many longest-path
/// questions as fit in `QUESTION_BYTES` are pended, the next one gets the overload decision
/// (deny, although the default is allow) at once, counted and logged once, while a question
/// with a short path still fits in what is left. Once the service answers, every pended
/// connection gets its verdict, and long questions fit again.
fn the_questions_of_the_moment_hold_at_most_question_bytes_of_pool(design: AskVia) {
    let machine = Machine::with_worker_threads(2);
    let driver = load(&machine, question_budget::on(design).entry);
    let client = connected_client(&machine, design);
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<()>();
    // Holds what it reads until told, then answers everything until the driver goes away.
    let service = thread::spawn(move || {
        let mut held = Vec::new();
        loop {
            if answer_rx.try_recv().is_ok() {
                break;
            }
            if let Some(message) = client.get_message(Some(Duration::from_millis(10))) {
                held.push(message);
            }
        }
        for message in &held {
            client.reply(message.id, &burst_reply(message)).unwrap();
        }
        while let Some(message) = client.get_message(None) {
            match client.reply(message.id, &burst_reply(&message)) {
                Ok(()) => {}
                Err(Status::PORT_DISCONNECTED) => break,
                // Decided without it: on the channel, `stopping` decides the questions it holds.
                Err(Status::FLT_NO_WAITER_FOR_REPLY) if client.channel.is_some() => {}
                Err(status) => panic!("the driver is waiting for this reply: {status}"),
            }
        }
    });
    let longest = long_app(firewall_protocol::MAX_PATH_UNITS, "app.exe");
    let fits = firewall_driver::QUESTION_BYTES / firewall_protocol::REQUEST_MAX_LEN;
    assert_eq!(fits, 63);
    let ports: Vec<u16> = (0..fits as u16).map(|n| 30_001 + n).collect();
    let mut pendings: Vec<_> = ports
        .iter()
        .map(|&port| {
            let decision = classify_connect(&machine, &auth_connect_from(&longest, port, false));
            decision
                .pending
                .unwrap_or_else(|| panic!("port {port} pended: {decision:?}"))
        })
        .collect();
    let refused = classify_connect(&machine, &auth_connect_from(&longest, 30_100, false));
    assert_eq!(
        (refused.action, refused.pending),
        (Action::Block, None),
        "the overload decision, not the default (allow): {refused:?}"
    );
    let stats = question_budget::on(design).stats.snapshot();
    assert_eq!((stats.overloaded, stats.defaults), (1, 0), "{stats:?}");
    // An inbound miss is not pended either (its question does not fit): it gets the default
    // at once, and is not asked about in the background.
    let inbound = connection(
        100,
        &longest,
        IpProtocol::Tcp,
        SimDirection::Inbound,
        8_080,
        web(6, 50_000),
    );
    assert_eq!(
        decided_once(
            &inbound,
            &machine.connect(&inbound, AleIrql::Dispatch),
            "in"
        ),
        (Action::Permit, false)
    );
    wait_for_background_asks(&machine, 1);
    let stats = question_budget::on(design).stats.snapshot();
    assert_eq!(
        (
            stats.background_asks,
            stats.background_skipped,
            stats.defaults
        ),
        (0, 1, 1),
        "{stats:?}"
    );
    assert_eq!(
        (stats.inbound_not_pended, stats.inbound_pended),
        (1, 0),
        "{stats:?}"
    );
    assert!(
        machine.debug_output().iter().any(|l| l.ends_with(
            "not asking: the questions waiting for the service hold 4194304 bytes of pool)\n"
        )),
        "{:#?}",
        machine.debug_output()
    );
    // A short question still fits beside them.
    let short_port = 30_200;
    let short = classify_connect(&machine, &auth_connect_from(APPS[0], short_port, false));
    pendings.push(short.pending.expect("a short question fits"));
    let (started, _) = overload_lines(&machine);
    let budget_lines: Vec<_> = machine
        .debug_output()
        .into_iter()
        .filter(|l| l.contains("hold 4194304 bytes of pool; new connections"))
        .collect();
    assert_eq!(
        (started.len(), budget_lines.len()),
        (0, 1),
        "{budget_lines:?}"
    );

    answer_tx.send(()).unwrap();
    complete_all(&machine, pendings);
    for &port in ports.iter() {
        let decision = classify_connect(&machine, &auth_connect_from(&longest, port, true));
        assert_eq!(decision.action, action(burst_verdict(port)), "port {port}");
    }
    let decision = classify_connect(&machine, &auth_connect_from(APPS[0], short_port, true));
    assert_eq!(decision.action, action(burst_verdict(short_port)));
    // The questions are gone with their work items: a long one fits again.
    let again = classify_connect(&machine, &auth_connect_from(&longest, 30_300, false));
    complete_all(&machine, vec![again.pending.expect("pended again")]);
    let decision = classify_connect(&machine, &auth_connect_from(&longest, 30_300, true));
    assert_eq!(decision.action, action(burst_verdict(30_300)));
    let ended: Vec<_> = machine
        .debug_output()
        .into_iter()
        // The outbound connection refused, and the inbound one not pended.
        .filter(|l| l.contains("pending again; 2 connection(s) got deny (overload)"))
        .collect();
    assert_eq!(ended.len(), 1, "the burst's end is logged once");
    unload_clean(&machine, driver);
    service.join().unwrap();
    let stats = question_budget::on(design).stats.snapshot();
    assert_eq!(
        (stats.overloaded, stats.defaults, stats.answered),
        (1, 1, fits as u64 + 2),
        "{stats:?}"
    );
}

configured_driver!(crafted_image, PATIENT_CONFIG);

/// The cache keys a process image by a keyed hash (`wfp_rs::pend::app_hash`): a program started
/// under an allowed process's reused id, from a path crafted offline so that its application id
/// has the allowed image's FNV-1a-64 (the unkeyed hash the key used before), is asked about, not
/// answered with the allowed image's cached verdict.
fn an_image_crafted_to_collide_under_fnv1a_does_not_inherit_a_cached_verdict(design: AskVia) {
    // Found offline (Brent's cycle search); the same pair as tests/app_hash.rs.
    const ALLOWED: &str =
        "\\device\\harddiskvolume1\\\u{56ef}\u{5608}\u{4e48}\u{58e6}\u{548e}\\app.exe";
    const CRAFTED: &str =
        "\\device\\harddiskvolume1\\\u{5746}\u{58dd}\u{607e}\u{670d}\u{54f5}\\app.exe";
    let fnv1a = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (allowed_id, crafted_id) = (
        wfp_rs_sim::app_id_bytes(ALLOWED),
        wfp_rs_sim::app_id_bytes(CRAFTED),
    );
    assert_ne!(allowed_id, crafted_id);
    assert_eq!(
        fnv1a(&allowed_id),
        fnv1a(&crafted_id),
        "expected the crafted path to collide with the allowed one under FNV-1a"
    );

    let machine = Machine::new();
    let driver = load(&machine, crafted_image::on(design).entry);
    let client = connected_client(&machine, design);
    let asked = Mutex::new(Vec::new());
    thread::scope(|s| {
        s.spawn(|| {
            while let Some(message) = client.get_message(None) {
                let request = ConnectionRequest::decode(&message.data).unwrap();
                let image: String = request.image_path.chars_lossy().collect();
                let verdict = if image.eq_ignore_ascii_case(ALLOWED) {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                };
                let reply = request
                    .reply(verdict)
                    .cached_for(CacheLifetime::from_secs(60).unwrap());
                asked.lock().unwrap().push(image);
                if client.reply(message.id, &encode_reply(reply)).is_err() {
                    break;
                }
            }
        });
        let attempt = |app: &str, local_port: u16| {
            let c = connection(
                100,
                app,
                IpProtocol::Tcp,
                SimDirection::Outbound,
                local_port,
                web(7, 443),
            );
            let outcome = machine.connect(&c, AleIrql::Dispatch);
            decided_once(&c, &outcome, app)
        };
        let outcomes = [
            attempt(ALLOWED, 47_001),
            attempt(ALLOWED, 47_002),
            attempt(CRAFTED, 47_003),
            attempt(ALLOWED, 47_004),
        ];
        // Unloading closes the port, which ends the service thread; before asserting, so that
        // a failed assertion does not leave the scope waiting for that thread.
        unload_clean(&machine, driver);
        assert_eq!(
            outcomes,
            [
                (Action::Permit, true),
                (Action::Permit, false),
                // The crafted image under the reused pid is asked about, and denied.
                (Action::Block, true),
                // The allowed image is still answered from the cache.
                (Action::Permit, false),
            ],
            "(decision, asked) for: allowed, allowed again, crafted, allowed again"
        );
    });
    assert_eq!(
        asked.lock().unwrap().len(),
        2,
        "two questions: one per image"
    );
}
