//! The soak: the firewall driver through a large number of connections (a million by default,
//! `cargo xtask soak`) with random faults, on real host threads or on a deterministic machine,
//! checking every decision.
//!
//! Connections come from [`SoakConfig::clients`] threads in phases of [`PHASE`] connections
//! ([`SoakConfig::phase`]),
//! out and in, TCP and UDP, IPv4 and IPv6, at `PASSIVE_LEVEL` and `DISPATCH_LEVEL`, each from
//! its own local endpoint (the local address changes every 60,000 ports, so a million
//! connections never reuse one). A simulated service answers by [`RULES`] and, at random,
//! replies short, oversized, malformed or about another question, stalls past the driver's
//! timeout, or is killed mid-question and restarts. In one phase of five, pool allocations fail
//! at random too (armed by a fault thread on real threads, by the clients before each connection
//! on a deterministic machine).
//!
//! What is checked, per connection: it was decided exactly once (one classification, or a pend
//! and one reauthorization, or a pend and the reinjected clone's classification), by the
//! driver's filter, and established only if permitted; its decision is the rules' verdict or
//! the driver's default (deny) and nothing else; if the service's valid answer reached the
//! driver, the decision is that answer (except in allocation-fault phases, where a later
//! allocation may still fail into the default). At the end the driver unloads, and the
//! simulator's unload checks find nothing left (pool, pends, work items, timers, handles).
//!
//! The run is seeded: the seed fixes the connections and the service's and the fault thread's
//! choices. On real threads ([`SoakConfig::deterministic`] false) the host schedules the
//! threads, so a run does not replay exactly. On a deterministic machine
//! ([`Machine::deterministic_with_worker_threads`]) the clients, the service and the fault
//! injector are contexts the machine schedules from the same seed, and time is virtual (the
//! driver's timeouts and the service's stalls cost no host time), so one seed gives one run:
//! [`SoakReport::schedule`] fingerprints the schedule to show it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use firewall_driver::{AskVia, Config, Firewall, Stats, StatsSnapshot};
use firewall_protocol::{CacheLifetime, ConnectionReply, ConnectionRequest, Direction, Verdict};
use firewall_rules::{Rules, VolumeMap};
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs::port::Message;
use wfp_rs_sim::{AleIrql, ConnectOutcome, Connection, Machine};

use crate::service_end::ServiceEnd;

/// Connections per phase by default: the service's log is checked, and cleared, between
/// phases.
pub const PHASE: u64 = 10_000;

/// The driver's reply timeout in the soak: short, so stalls time out quickly, and long enough
/// that a service answering at once is never late on a loaded host.
pub const TIMEOUT: Duration = Duration::from_millis(250);

/// How long a stalling service sits on a question: past [`TIMEOUT`].
const STALL: Duration = Duration::from_millis(300);

/// The service's policy.
pub const RULES: &str = r#"
default = "deny"

[[rule]]
name = "web"
action = "allow"
app = 'C:\apps\browser.exe'
protocol = "tcp"
port = [80, 443]

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
name = "high-ports-in"
action = "allow"
direction = "inbound"
local_port = "40000-65535"
app = 'C:\apps\tool.exe'
"#;

const APPS: [&str; 3] = [
    r"\device\harddiskvolume3\apps\browser.exe",
    r"\device\harddiskvolume3\apps\tool.exe",
    r"\device\harddiskvolume3\apps\other.exe",
];

static CHANNEL_STATS: Stats = Stats::new();
static PORT_STATS: Stats = Stats::new();

/// Held by a soak while it runs: the driver's statistics are statics, one per design, so two
/// soaks at once in one process (parallel tests) would count each other's decisions.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The soak's firewall on the question channel (its default design).
pub mod channel_design {
    use super::*;

    /// `DriverEntry`: [`Config::DEFAULT`] with the soak's [`TIMEOUT`].
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                timeout: TIMEOUT,
                stats: Some(&CHANNEL_STATS),
                ..Config::DEFAULT
            },
        )
    }
}

/// The soak's firewall asking from work items over the port.
pub mod port_design {
    use super::*;

    /// `DriverEntry`: [`channel_design::DriverEntry`]'s configuration with
    /// `ask_via: AskVia::PortAndWorkItem`.
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                ask_via: AskVia::PortAndWorkItem,
                timeout: TIMEOUT,
                stats: Some(&PORT_STATS),
                ..Config::DEFAULT
            },
        )
    }
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct SoakConfig {
    /// How many connections.
    pub connections: u64,
    /// The seed of every random choice the harness makes.
    pub seed: u64,
    /// Threads opening connections.
    pub clients: u64,
    /// Connections per phase (at least one; [`PHASE`] in the soak command): one phase in five,
    /// chosen by the seed, has allocation failures.
    pub phase: u64,
    /// How the driver asks the service.
    pub design: AskVia,
    /// Whether to run on a deterministic machine (seeded scheduling, virtual time) instead of
    /// real threads.
    pub deterministic: bool,
}

/// What a deterministic run's schedule was: its length, a hash of every step, and the virtual
/// time at its end. Two runs of one seed give equal fingerprints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleFingerprint {
    /// Steps (a context giving up the processor at a yield point or a wait).
    pub steps: u64,
    /// A hash of every step ([`wfp_rs_sim::ScheduleFingerprint::hash`]).
    pub hash: u64,
    /// The machine's virtual interrupt time at the end of the run.
    pub virtual_time: Duration,
}

/// What a soak did: decisions, faults, leaks and time.
#[derive(Clone, Debug)]
pub struct SoakReport {
    /// The configuration it ran.
    pub config: SoakConfig,
    /// Connections permitted and blocked.
    pub permitted: u64,
    /// See [`permitted`](Self::permitted).
    pub blocked: u64,
    /// Connections pended (asked about), outbound and inbound.
    pub pended_outbound: u64,
    /// See [`pended_outbound`](Self::pended_outbound).
    pub pended_inbound: u64,
    /// Decisions compared with a valid answer the service gave.
    pub checked_answers: u64,
    /// Replies the service made invalid on purpose.
    pub garbage_replies: u64,
    /// Questions the service sat on past the driver's timeout.
    pub stalls: u64,
    /// Times the service was killed mid-question (and restarted).
    pub kills: u64,
    /// Allocation failures injected (that happened).
    pub allocation_failures: u64,
    /// Classifications the driver answered from its verdict cache.
    pub cache_hits: u64,
    /// Pended classifications the driver decided by the service's answer.
    pub answered: u64,
    /// Classifications the driver decided with its default.
    pub defaults: u64,
    /// Why, by the reason the driver logged, most frequent first.
    pub default_reasons: Vec<(String, u64)>,
    /// Pool blocks, I/O requests and pended classifications left after the unload.
    pub leaked_pool_blocks: usize,
    /// See [`leaked_pool_blocks`](Self::leaked_pool_blocks).
    pub leaked_io_requests: usize,
    /// See [`leaked_pool_blocks`](Self::leaked_pool_blocks).
    pub leaked_pends: usize,
    /// How long it took.
    pub elapsed: Duration,
    /// The process's peak resident memory, where the host says (Linux).
    pub peak_memory_bytes: Option<u64>,
    /// On a deterministic machine: its schedule's fingerprint.
    pub schedule: Option<ScheduleFingerprint>,
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let design = match c.design {
            AskVia::Channel => "question channel",
            AskVia::PortAndWorkItem => "port and work items",
        };
        if c.deterministic {
            writeln!(
                f,
                "soak: {} connections on a deterministic machine (seed {:#x}, {} client \
                 contexts, {design}; seeded scheduling, virtual time)",
                c.connections, c.seed, c.clients
            )?;
        } else {
            writeln!(
                f,
                "soak: {} connections on real threads (seed {:#x}, {} client threads, {design})",
                c.connections, c.seed, c.clients
            )?;
        }
        writeln!(
            f,
            "decisions: {} permitted, {} blocked; pended {} outbound, {} inbound; driver: {} \
             cache hits, {} answered, {} defaults",
            self.permitted,
            self.blocked,
            self.pended_outbound,
            self.pended_inbound,
            self.cache_hits,
            self.answered,
            self.defaults
        )?;
        let reasons: Vec<String> = self
            .default_reasons
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        writeln!(f, "defaults by reason: {}", reasons.join("; "))?;
        writeln!(
            f,
            "faults: {} garbage replies, {} stalls past the timeout, {} service kills, {} \
             allocation failures",
            self.garbage_replies, self.stalls, self.kills, self.allocation_failures
        )?;
        writeln!(
            f,
            "checks: every connection decided once, by the rules or the default; {} decisions \
             compared with the service's valid answer, none differed",
            self.checked_answers
        )?;
        writeln!(
            f,
            "leaks after unload: {} pool blocks, {} I/O requests, {} pends",
            self.leaked_pool_blocks, self.leaked_io_requests, self.leaked_pends
        )?;
        let secs = self.elapsed.as_secs_f64();
        let memory = self
            .peak_memory_bytes
            .map_or("unknown".to_string(), |b| format!("{} MiB", b / (1 << 20)));
        write!(
            f,
            "time: {secs:.1} s ({:.0} connections/s); peak memory {memory}",
            c.connections as f64 / secs.max(f64::EPSILON)
        )?;
        if let Some(schedule) = &self.schedule {
            write!(
                f,
                "\nschedule: {} steps, {:.1} s of virtual time, fingerprint {:#018x}\nreplay: \
                 {}",
                schedule.steps,
                schedule.virtual_time.as_secs_f64(),
                schedule.hash,
                replay_command(c)
            )?;
        }
        Ok(())
    }
}

/// The command that runs `config` again (on a deterministic machine: the same run).
pub fn replay_command(config: &SoakConfig) -> String {
    format!(
        "cargo xtask soak --seed {:#x} --connections {} --clients {} --phase {} --design {}{}",
        config.seed,
        config.connections,
        config.clients,
        config.phase,
        match config.design {
            AskVia::Channel => "channel",
            AskVia::PortAndWorkItem => "port",
        },
        if config.deterministic {
            " --deterministic"
        } else {
            ""
        }
    )
}

/// The fingerprint of `machine`'s schedule so far (`None` on real threads).
fn fingerprint(machine: &Machine) -> Option<ScheduleFingerprint> {
    let whole = machine.schedule_fingerprint()?;
    Some(ScheduleFingerprint {
        steps: whole.steps,
        hash: whole.hash,
        virtual_time: Duration::from_nanos(machine.now().as_ticks().saturating_mul(100)),
    })
}

/// Why a soak failed: what was wrong, with the seed that chose the run.
#[derive(Clone, Debug)]
pub struct SoakFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for SoakFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "soak failed (seed {:#x}): {}", self.seed, self.message)
    }
}

impl std::error::Error for SoakFailure {}

/// xorshift64*: the harness's seeded choices (its streams are independent of each other).
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
}

/// Connection `n` of the run: drawn from a small population (so the cache answers repeats), from
/// its own local endpoint.
fn attempt(rng: &mut Rng, n: u64) -> Connection {
    let pid = 100 + rng.below(12);
    let app = APPS[(pid % 3) as usize];
    let protocol = if rng.below(3) == 0 {
        IpProtocol::Udp
    } else {
        IpProtocol::Tcp
    };
    let direction = if rng.below(5) == 0 {
        SimDirection::Inbound
    } else {
        SimDirection::Outbound
    };
    let v6 = rng.below(3) == 0;
    let remote: IpAddr = match (v6, rng.below(3)) {
        (false, 0) => Ipv4Addr::new(192, 0, 2, 7).into(),
        (false, 1) => Ipv4Addr::new(198, 51, 100, 9).into(),
        (false, _) => Ipv4Addr::new(203, 0, 113, 80).into(),
        (true, 0) => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80).into(),
        (true, _) => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53).into(),
    };
    let remote_port = [22, 53, 80, 443, 8080][rng.below(5) as usize];
    // 60,000 local ports per local address, so no two connections share a local endpoint.
    let local_port = 2_000 + (n % 60_000) as u16;
    let host = (n / 60_000) as u16 + 1;
    let local: IpAddr = if v6 {
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, host).into()
    } else {
        Ipv4Addr::new(10, 0, (host >> 8) as u8, host as u8).into()
    };
    let inbound_port = [22, 8080, 45_000][rng.below(3) as usize];
    let (local, remote) = match direction {
        SimDirection::Outbound => (
            SocketAddr::new(local, local_port),
            SocketAddr::new(remote, remote_port),
        ),
        // Inbound: the peer's port is the unique one, the local port a service's.
        SimDirection::Inbound => (
            SocketAddr::new(local, inbound_port),
            SocketAddr::new(remote, local_port),
        ),
    };
    Connection {
        pid,
        app: app.into(),
        protocol,
        local,
        remote,
        direction,
    }
}

/// What identifies a connection in the service's log: its endpoints and direction.
type Key = (IpAddr, u16, IpAddr, u16, Direction);

fn key_of_connection(c: &Connection) -> Key {
    let direction = match c.direction {
        SimDirection::Outbound => Direction::Outbound,
        SimDirection::Inbound => Direction::Inbound,
    };
    (
        c.local.ip(),
        c.local.port(),
        c.remote.ip(),
        c.remote.port(),
        direction,
    )
}

fn key_of_request(r: &ConnectionRequest) -> Key {
    (
        r.local_address,
        r.local_port,
        r.remote_address,
        r.remote_port,
        r.direction,
    )
}

fn volumes() -> VolumeMap {
    let mut volumes = VolumeMap::new();
    volumes.insert(r"\device\harddiskvolume3", 'C');
    volumes
}

fn rules_direction(direction: Direction) -> firewall_rules::Direction {
    match direction {
        Direction::Outbound => firewall_rules::Direction::Outbound,
        Direction::Inbound => firewall_rules::Direction::Inbound,
    }
}

fn action(verdict: firewall_rules::Verdict) -> Action {
    match verdict {
        firewall_rules::Verdict::Allow => Action::Permit,
        firewall_rules::Verdict::Deny => Action::Block,
    }
}

/// What the rules say about a connection, as the harness sees it.
fn rule_for(rules: &Rules, volumes: &VolumeMap, c: &Connection) -> Action {
    let direction = key_of_connection(c).4;
    action(
        rules
            .decide(&firewall_rules::Connection {
                app: volumes.to_dos_path(&c.app),
                remote: c.remote.ip(),
                port: c.remote.port(),
                local_port: c.local.port(),
                protocol: c.protocol.into(),
                direction: rules_direction(direction),
            })
            .verdict,
    )
}

/// The service's valid reply to `request` under `rules`, cached for a minute unless the verdict
/// depends on the local port (which the driver's outbound cache key leaves out).
fn valid_reply(
    rules: &Rules,
    volumes: &VolumeMap,
    request: &ConnectionRequest,
) -> (Action, Vec<u8>) {
    let app: String = request.image_path.chars_lossy().collect();
    let decision = rules.decide(&firewall_rules::Connection {
        app: volumes.to_dos_path(&app),
        remote: request.remote_address,
        port: request.remote_port,
        local_port: request.local_port,
        protocol: request.ip_protocol,
        direction: rules_direction(request.direction),
    });
    let verdict = match decision.verdict {
        firewall_rules::Verdict::Allow => Verdict::Allow,
        firewall_rules::Verdict::Deny => Verdict::Deny,
    };
    let mut reply = request.reply(verdict);
    if !(decision.local_port_matters && request.direction == Direction::Outbound) {
        reply = reply.cached_for(CacheLifetime::from_secs(60).expect("a valid lifetime"));
    }
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    let len = reply.encode(&mut out).expect("a reply fits");
    out.truncate(len);
    (action(decision.verdict), out)
}

/// What the harness shares between its threads.
struct Shared {
    seed: u64,
    rules: Rules,
    volumes: VolumeMap,
    /// The valid answers the driver took in this phase, by connection.
    answered: Mutex<HashMap<Key, Action>>,
    /// Questions the service is answering: while none is, every answer in `answered` is one
    /// the driver took (an answer is logged before it is sent, and taken out again if the
    /// driver refuses it).
    in_flight: AtomicUsize,
    done: AtomicBool,
    garbage: AtomicU64,
    stalls: AtomicU64,
    kills: AtomicU64,
}

/// The service: one thread, answering by the rules with faults, restarting when killed.
fn serve(machine: &Machine, design: AskVia, shared: &Shared) -> Result<(), String> {
    let mut rng = Rng::new(shared.seed, 0x05E4_F1CE);
    'lives: while !shared.done.load(Ordering::SeqCst) {
        let Ok(mut end) = ServiceEnd::connect(machine, design) else {
            // Refused (an allocation failure, or the previous connection still closing).
            let_others_run(machine);
            continue;
        };
        loop {
            let question = match end.next(Duration::from_millis(2)) {
                Ok(Some(question)) => question,
                Ok(None) => {
                    if shared.done.load(Ordering::SeqCst) {
                        break 'lives;
                    }
                    continue;
                }
                Err(()) => continue 'lives,
            };
            // Counted before its answer is logged (see `Shared::in_flight`), until this iteration
            // ends however it ends: a service that fails must not leave the phase waiting.
            let _answering = Answering::start(&shared.in_flight);
            let data = question.data();
            let request = ConnectionRequest::decode(data)
                .map_err(|e| format!("the driver sent a request that does not decode: {e:?}"))?;
            let (verdict, valid) = valid_reply(&shared.rules, &shared.volumes, &request);
            let id = request.request_id;
            let fault: Option<Vec<u8>> = match rng.below(400) {
                0 => Some(valid[..valid.len() - 1].to_vec()),
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
                    bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
                    Some(bad)
                }
                6 => {
                    let mut reply = vec![0u8; ConnectionReply::MAX_LEN];
                    let len = ConnectionReply::allow(id.wrapping_add(1))
                        .encode(&mut reply)
                        .expect("a reply fits");
                    reply.truncate(len);
                    Some(reply)
                }
                7 => {
                    // Killed mid-question: the connection closes without a reply.
                    shared.kills.fetch_add(1, Ordering::Relaxed);
                    drop(end);
                    continue 'lives;
                }
                8 if rng.below(8) == 0 => {
                    shared.stalls.fetch_add(1, Ordering::Relaxed);
                    machine.sleep(STALL);
                    None
                }
                _ => None,
            };
            let garbage = fault.is_some();
            let bytes = fault.unwrap_or(valid);
            // Logged before the reply, so that once the connection's decision is back, its
            // answer is in the log; taken out again if the driver did not take it.
            let key = key_of_request(&request);
            if !garbage {
                shared
                    .answered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, verdict);
            } else {
                shared.garbage.fetch_add(1, Ordering::Relaxed);
            }
            let taken = match end.reply(&question, &bytes) {
                Ok(taken) => taken,
                // The driver closed the connection (an unload, or the port refusing).
                Err(Status::PORT_DISCONNECTED | Status::DELETE_PENDING) => false,
                Err(status) => return Err(format!("replying failed: {status}")),
            };
            if !garbage && !taken {
                shared
                    .answered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
            }
        }
    }
    Ok(())
}

/// One question the service is answering, counted in `Shared::in_flight` while it lives.
struct Answering<'a>(&'a AtomicUsize);

impl<'a> Answering<'a> {
    fn start(in_flight: &'a AtomicUsize) -> Answering<'a> {
        in_flight.fetch_add(1, Ordering::SeqCst);
        Answering(in_flight)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The layer whose decision is the connection's.
fn auth_layer(c: &Connection) -> &'static str {
    let v6 = c.local.is_ipv6();
    match (c.direction, v6) {
        (SimDirection::Outbound, false) => "ALE_AUTH_CONNECT_V4",
        (SimDirection::Outbound, true) => "ALE_AUTH_CONNECT_V6",
        (SimDirection::Inbound, false) => "ALE_AUTH_RECV_ACCEPT_V4",
        (SimDirection::Inbound, true) => "ALE_AUTH_RECV_ACCEPT_V6",
    }
}

/// Checks that `outcome` decided `c` exactly once, by the driver's filter; returns the decision
/// and whether it was pended.
fn decided_once(c: &Connection, outcome: &ConnectOutcome) -> Result<(Action, bool), String> {
    let layer = auth_layer(c);
    let at_auth: Vec<_> = outcome
        .layers
        .iter()
        .filter(|(name, _)| *name == layer)
        .map(|(_, decision)| *decision)
        .collect();
    let fail = |what: &str| Err(format!("{c:?}: {what}: {outcome:?}"));
    let Some(last) = at_auth.last() else {
        return fail("never classified at its authorization layer");
    };
    if outcome.pended {
        if !(at_auth[0].absorbed && at_auth[0].action == Action::Block) {
            return fail("a pended classification is not BLOCK + ABSORB");
        }
        if c.direction == SimDirection::Inbound && at_auth.len() == 1 {
            // Denied: the clone was freed with the absorbed packet.
            if outcome.flow_handle.is_some() || outcome.decision.action != Action::Block {
                return fail("a refused inbound attempt was established");
            }
            return Ok((Action::Block, true));
        }
        if at_auth.len() != 2 {
            return fail(
                "a pended attempt is classified twice (pend, then reauthorization or the reinjected clone)",
            );
        }
    } else if at_auth.len() != 1 {
        return fail("classified more than once");
    }
    if last.filter_id.is_none() {
        return fail("not decided by the driver's filter");
    }
    if last.pending.is_some() {
        return fail("left pending");
    }
    if outcome.decision.action != last.action {
        return fail("the final decision is not the callout's");
    }
    if outcome.flow_handle.is_some() != (last.action == Action::Permit) {
        return fail("established without a permit, or permitted without a flow");
    }
    Ok((last.action, outcome.pended))
}

/// One connection's result, kept until its phase is checked.
struct Attempt {
    key: Key,
    decided: Action,
    rule: Action,
}

/// One phase of the run.
struct Phase<'a> {
    machine: &'a Machine,
    shared: &'a Shared,
    config: &'a SoakConfig,
    number: u64,
    /// Its first connection, and how many.
    first: u64,
    count: u64,
    /// Whether pool allocations fail at random during it.
    allocation_faults: bool,
}

/// Opens the phase's connections from the client threads (and, in an allocation-fault phase,
/// makes allocations fail from another thread meanwhile); returns each connection's result.
/// `counts`: permitted, blocked, pended outbound, pended inbound (the fifth is the caller's).
fn run_phase(
    phase: &Phase<'_>,
    counts: &Mutex<[u64; 5]>,
    failures: &AtomicU64,
) -> Result<Vec<Attempt>, String> {
    let clients = phase.config.clients.max(1);
    let seed = phase.config.seed;
    let machine = phase.machine;
    // On real threads the clients start together, to contend; on a deterministic machine the
    // seed decides who runs when (and a host barrier would keep the processor: it is not a
    // wait the machine knows).
    let barrier = (!phase.config.deterministic).then(|| Barrier::new(clients as usize + 1));
    let start = || {
        if let Some(barrier) = &barrier {
            barrier.wait();
        }
    };
    let phase_done = AtomicBool::new(false);
    thread::scope(|s| {
        // On real threads a fault thread keeps one allocation failure armed. On a deterministic
        // machine the clients arm it before each connection instead: a fault context would
        // have to wait between looks, and its timed wait ends only when every other context
        // waits too, so it would rarely look.
        let deterministic = phase.config.deterministic;
        let injector = (phase.allocation_faults && !deterministic).then(|| {
            let mut rng = Rng::new(seed, 0x000A_110C ^ phase.number);
            let (start, phase_done) = (&start, &phase_done);
            machine.spawn(s, "fault-injector", move || {
                start();
                while !phase_done.load(Ordering::SeqCst) {
                    if machine.pending_allocation_failures() == 0 {
                        failures.fetch_add(1, Ordering::Relaxed);
                        machine.fail_allocations(rng.below(400), 1);
                    }
                    thread::sleep(Duration::from_micros(200));
                }
                if machine.pending_allocation_failures() != 0 {
                    // The last one never happened.
                    failures.fetch_sub(1, Ordering::Relaxed);
                }
                machine.fail_allocations(0, 0);
            })
        });
        let workers: Vec<_> = (0..clients)
            .map(|t| {
                let start = &start;
                let name = format!("client-{t}");
                machine.spawn(s, &name, move || -> Result<Vec<Attempt>, String> {
                    let mut rng = Rng::new(seed, (phase.number << 8) | (t + 1));
                    let mut faults = (phase.allocation_faults && deterministic)
                        .then(|| Rng::new(seed, ((0x000A_110C ^ phase.number) << 8) | (t + 1)));
                    start();
                    let mut attempts = Vec::new();
                    let mut n = phase.first + t;
                    while n < phase.first + phase.count {
                        if let Some(faults) = &mut faults
                            && machine.pending_allocation_failures() == 0
                        {
                            failures.fetch_add(1, Ordering::Relaxed);
                            // Armed once per connection at most, not every 200 µs: sooner.
                            machine.fail_allocations(faults.below(40), 1);
                        }
                        let c = attempt(&mut rng, n);
                        let irql = if rng.below(2) == 0 {
                            AleIrql::Passive
                        } else {
                            AleIrql::Dispatch
                        };
                        let outcome = phase.machine.connect(&c, irql);
                        let (decided, _) = decided_once(&c, &outcome)?;
                        attempts.push(Attempt {
                            key: key_of_connection(&c),
                            decided,
                            rule: rule_for(&phase.shared.rules, &phase.shared.volumes, &c),
                        });
                        let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                        counts[usize::from(decided == Action::Block)] += 1;
                        if outcome.pended {
                            counts[2 + usize::from(c.direction == SimDirection::Inbound)] += 1;
                        }
                        n += clients;
                    }
                    Ok(attempts)
                })
            })
            .collect();
        if injector.is_none() {
            start();
        }
        let mut result = Ok(Vec::new());
        for worker in workers {
            match (worker.join(), &mut result) {
                (Ok(Ok(mut a)), Ok(all)) => all.append(&mut a),
                (Ok(Err(message)), _) => result = Err(message),
                (Err(_), _) => result = Err("a connection thread panicked".into()),
                (Ok(Ok(_)), Err(_)) => {}
            }
        }
        phase_done.store(true, Ordering::SeqCst);
        if phase.allocation_faults && deterministic {
            if machine.pending_allocation_failures() != 0 {
                // The last one the clients armed never happened.
                failures.fetch_sub(1, Ordering::Relaxed);
            }
            machine.fail_allocations(0, 0);
        }
        if let Some(injector) = injector {
            injector
                .join()
                .map_err(|_| "the fault thread panicked".to_string())?;
        }
        result
    })
}

/// Runs the soak. `progress` is called after each phase with the connections done so far.
pub fn run(config: SoakConfig, progress: &dyn Fn(u64)) -> Result<SoakReport, SoakFailure> {
    let fail = |message: String| SoakFailure {
        seed: config.seed,
        message,
    };
    // Taken before the machine exists, by a thread of no machine: no context waits on it.
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let stats = match config.design {
        AskVia::Channel => &CHANNEL_STATS,
        AskVia::PortAndWorkItem => &PORT_STATS,
    };
    let before = stats.snapshot();
    let machine = if config.deterministic {
        let machine = Machine::deterministic_with_worker_threads(config.seed, 4);
        // Tens of steps per connection: the fingerprint covers them all, the trace only the
        // last few (for the report if a schedule deadlocks).
        machine.set_schedule_trace_limit(Some(1_000));
        machine
    } else {
        Machine::with_worker_threads(4)
    };
    // The driver logs every decision; the soak reads the log after each phase (10,000
    // connections, a line or two each), so the machine's default limit loses none.
    let entry: wfp_rs_sim::DriverEntryFn = match config.design {
        AskVia::Channel => channel_design::DriverEntry,
        AskVia::PortAndWorkItem => port_design::DriverEntry,
    };
    let driver = machine
        .load_driver("firewall", entry)
        .map_err(|status| fail(format!("the firewall did not load: {status}")))?;
    let shared = Shared {
        seed: config.seed,
        rules: Rules::parse_named("soak-rules.toml", RULES).expect("the soak's rules parse"),
        volumes: volumes(),
        answered: Mutex::default(),
        in_flight: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        garbage: AtomicU64::new(0),
        stalls: AtomicU64::new(0),
        kills: AtomicU64::new(0),
    };
    let phase_len = config.phase.max(1);
    let phases = config.connections.div_ceil(phase_len);
    let counts = Mutex::new([0u64; 5]);
    let allocation_failures = AtomicU64::new(0);
    let mut reasons: HashMap<String, u64> = HashMap::new();
    let outcome: Result<(), String> = thread::scope(|s| {
        let service = machine.spawn(s, "service", || serve(&machine, config.design, &shared));
        let mut phases_run = || -> Result<(), String> {
            let mut fault_rng = Rng::new(config.seed, 0x00FA_0017);
            let mut log_seen = 0;
            for phase in 0..phases {
                let first = phase * phase_len;
                let count = phase_len.min(config.connections - first);
                let allocation_faults = fault_rng.below(5) == 0;
                let attempts = run_phase(
                    &Phase {
                        machine: &machine,
                        shared: &shared,
                        config: &config,
                        number: phase,
                        first,
                        count,
                        allocation_faults,
                    },
                    &counts,
                    &allocation_failures,
                )?;
                // Every answer the service is still writing down is for a connection of this
                // phase, already decided: wait for the log to be final.
                while shared.in_flight.load(Ordering::SeqCst) > 0 {
                    let_others_run(&machine);
                }
                let answered = std::mem::take(
                    &mut *shared
                        .answered
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                );
                let mut checked = 0;
                for a in &attempts {
                    if a.decided != a.rule && a.decided != Action::Block {
                        return Err(format!(
                            "{:?} was decided {:?}: neither the rules' {:?} nor the default",
                            a.key, a.decided, a.rule
                        ));
                    }
                    if let Some(&answer) = answered.get(&a.key) {
                        checked += 1;
                        if !allocation_faults && a.decided != answer {
                            return Err(format!(
                                "{:?} was decided {:?}, but the driver took the service's answer {:?}",
                                a.key, a.decided, answer
                            ));
                        }
                    }
                }
                counts.lock().unwrap_or_else(PoisonError::into_inner)[4] += checked;
                let (lines, seen) = machine.debug_output_after(log_seen);
                log_seen = seen;
                for line in &lines {
                    if let Some(reason) = default_reason(line) {
                        *reasons.entry(reason.to_owned()).or_default() += 1;
                    }
                }
                progress(first + count);
            }
            Ok(())
        };
        let result = phases_run();
        // Also on a failure: the scope waits for the service thread, which ends only then.
        shared.done.store(true, Ordering::SeqCst);
        let served = service
            .join()
            .unwrap_or_else(|_| Err("the service thread panicked".to_string()));
        result.and(served)
    });
    outcome.map_err(fail)?;
    if machine.pending_classifications() != 0 {
        return Err(fail(format!(
            "{} classifications still pended before the unload",
            machine.pending_classifications()
        )));
    }
    machine
        .unload_driver(driver)
        .map_err(|status| fail(format!("the firewall did not unload: {status}")))?;
    let counts = counts.into_inner().unwrap_or_else(PoisonError::into_inner);
    let after: StatsSnapshot = stats.snapshot();
    let mut default_reasons: Vec<(String, u64)> = reasons.into_iter().collect();
    default_reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let report = SoakReport {
        config,
        permitted: counts[0],
        blocked: counts[1],
        pended_outbound: counts[2],
        pended_inbound: counts[3],
        checked_answers: counts[4],
        garbage_replies: shared.garbage.load(Ordering::Relaxed),
        stalls: shared.stalls.load(Ordering::Relaxed),
        kills: shared.kills.load(Ordering::Relaxed),
        allocation_failures: allocation_failures.load(Ordering::Relaxed),
        cache_hits: after.cache_hits - before.cache_hits,
        answered: after.answered - before.answered,
        defaults: after.defaults - before.defaults,
        default_reasons,
        leaked_pool_blocks: machine.pool_blocks().len(),
        leaked_io_requests: machine.tracked_io_requests(),
        leaked_pends: machine.pending_classifications(),
        elapsed: started.elapsed(),
        peak_memory_bytes: peak_memory_bytes(),
        schedule: fingerprint(&machine),
    };
    if report.leaked_pool_blocks + report.leaked_io_requests + report.leaked_pends != 0 {
        return Err(fail(format!("left behind after unload: {report}")));
    }
    Ok(report)
}

/// Gives the other contexts a turn while this one polls harness state: a host yield on real
/// threads, a short wait in the schedule on a deterministic machine (where a host yield would
/// keep the processor).
fn let_others_run(machine: &Machine) {
    if machine.seed().is_some() {
        machine.sleep(Duration::from_micros(100));
    } else {
        thread::yield_now();
    }
}

/// The reason of a decision the driver logged as its default (`firewall: #<id>: <verdict>
/// (default: <reason>)`), without the details some reasons end with (a status, the request
/// ids of a mismatched reply), so that reasons of a kind count together.
fn default_reason(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("firewall: #")?;
    let (_, rest) = rest.split_once(": ")?;
    let (_, reason) = rest.split_once(" (default: ")?;
    let reason = reason.strip_suffix(")\n").unwrap_or(reason);
    let reason = reason.split_once(": ").map_or(reason, |(head, _)| head);
    Some(reason.split_once(" #").map_or(reason, |(head, _)| head))
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), on Linux.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
