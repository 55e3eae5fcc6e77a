//! `firewall demo`: the whole firewall in the simulator (Linux and macOS hosts).
//!
//! 1. Boots a simulated machine ([`wfp_rs_sim::Machine`]) and loads the firewall's callout
//!    driver (`firewall_driver::start`, through this module's own `#[driver_entry]`, with the
//!    configuration the demo chose: fail-closed unless `--fail-open`).
//! 2. Serves the machine's ports and devices on a Unix socket
//!    ([`Machine::serve_user_mode`]) and starts the service as its own process: this same
//!    binary, `firewall serve`, with `WFP_RS_SIM_SOCKET` pointing at the socket, exactly as it
//!    would run against the real driver on Windows.
//! 3. Replays a scenario — the built-in one ([`builtin_scenario`]), or a trace file — through
//!    the simulated network stack ([`Machine::connect`]): each attempt passes the driver's
//!    callouts, which answer from their cache, ask the service, or fall back to the default.
//! 4. Prints one row per attempt (process, image, direction, protocol, remote endpoint,
//!    decision, and who decided: the service's rule, the driver's cache, or the driver's
//!    default), the service's log lines as they come, and a summary; then unloads the driver and
//!    checks that it left no pool behind.
//!
//! # Trace files
//!
//! One JSON object per line; blank lines and lines starting with `#` are skipped. `step` says
//! what the line does:
//!
//! ```text
//! {"step":"connect","pid":1200,"image":"\\Device\\HarddiskVolume3\\Program Files\\Browser\\browser.exe","protocol":"tcp","direction":"outbound","remote":"192.0.2.10:443","expect":"allow"}
//! {"step":"reload","rules":"other-rules.toml"}
//! {"step":"kill-service"}
//! {"step":"start-service"}
//! {"step":"note","text":"a heading for what follows"}
//! {"step":"send","connection":"tab","expect":"cut"}
//! ```
//!
//! For `connect`: `pid` and `remote` are required; `image` (an NT path; empty: unknown) defaults
//! to empty, `protocol` (`tcp`, `udp`, `icmp`, `icmpv6` or a number) to `tcp`, `direction`
//! (`outbound` or `inbound`) to `outbound`, `local` to `10.0.0.2` (or `fd00::2`) with a fresh
//! port for outbound attempts and port 22 for inbound ones. `expect` (`allow` or `deny`) makes
//! the demo check the decision and fail if it differs. `hold` (a name) keeps the connection
//! open, if the driver allows it, for later `send` steps. A `reload` path is relative to the
//! trace file. The service maps `\Device\HarddiskVolume3` to `C:`.
//!
//! `send` makes a held connection send data: after a rules change WFP reauthorizes it at its
//! next packet, the driver keeps it while it asks the service, and a deny cuts it (see the
//! driver's "Established connections"). The demo sends until the connection is cut or the
//! driver has nothing more to ask; `expect` (`flows` or `cut`) is checked like a `connect`'s.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use firewall_driver::{AskVia, Config, Firewall, Stats, StatsSnapshot};
use firewall_protocol::{PORT_NAME, Verdict};
use firewall_rules::{Rules, VolumeMap};
use serde::Deserialize;
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction as SimDirection;
use wfp_rs_sim::{AleIrql, Connection, Machine};

use crate::audit::AuditRecord;

/// The policy the demo runs with unless `--rules` names another.
pub const DEMO_RULES: &str = include_str!("../demo-rules.toml");

/// The NT device the demo's images live on, and its drive letter.
pub const DEMO_VOLUME: (&str, char) = (r"\Device\HarddiskVolume3", 'C');

/// The identity the demo's driver admits: the per-service SID of a Windows service named
/// `WfpRsFirewallService`, which is what `sc showsid WfpRsFirewallService` would print (INFERRED:
/// derived as Windows derives per-service SIDs, `S-1-5-80-` and the SHA-1 of the upper-cased
/// UTF-16LE name as five little-endian 32-bit numbers; the same derivation gives
/// TrustedInstaller's published SID). The bridge puts it in the token of the service's process
/// only (see [`run`]); on hosts where the bridge cannot tell its peers apart (not Linux), the
/// demo admits any process instead.
pub const DEMO_SERVICE_SID: &str = "S-1-5-80-331628208-403515586-3174771387-4129996829-10248734";

/// How long the demo waits for the service to do something it must do (start, reload).
const PATIENCE: Duration = Duration::from_secs(60);

/// The configuration the demo's driver entry starts the driver with (set before loading it).
static CONFIG: Mutex<Config> = Mutex::new(Config::DEFAULT);
/// The driver's counters, read between attempts to tell who decided.
static STATS: Stats = Stats::new();

#[wfp_rs::driver_entry]
fn demo_entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
    let config = *CONFIG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    firewall_driver::start(irql, driver, config)
}

/// Makes the command that runs `firewall` with `args` (the service: `serve ...`).
pub type Launcher = fn(args: &[OsString]) -> std::io::Result<Command>;

/// Runs this program (`std::env::current_exe`) with `args`: the `firewall` binary starts its
/// own service.
pub fn this_program(args: &[OsString]) -> std::io::Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(args);
    Ok(command)
}

/// What `firewall demo` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Replay this trace file instead of the built-in scenario.
    pub trace: Option<PathBuf>,
    /// Run with this rules file instead of [`DEMO_RULES`].
    pub rules: Option<PathBuf>,
    /// The driver allows what it cannot get an answer for.
    pub fail_open: bool,
    /// The driver allows new connections beyond its bound of pending questions (otherwise it
    /// denies them, whatever `fail_open` says).
    pub permit_on_overload: bool,
    /// Keep the audit log here (otherwise it is written to a temporary directory and removed).
    pub audit: Option<PathBuf>,
    /// Show the driver's debug output as it comes.
    pub verbose: bool,
    /// How the driver asks the service (`--ask-via channel|port`).
    pub ask_via: AskVia,
    /// How to start the service; `None`: [`this_program`].
    pub launcher: Option<Launcher>,
}

/// One connection attempt of a scenario.
#[derive(Clone, Debug, Deserialize)]
pub struct Attempt {
    /// The process.
    pub pid: u64,
    /// Its image, as an NT path; empty: unknown.
    #[serde(default)]
    pub image: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or a number.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `outbound` or `inbound`.
    #[serde(default = "default_direction")]
    pub direction: String,
    /// The remote endpoint.
    pub remote: SocketAddr,
    /// The local endpoint (see the [module documentation](self) for the default).
    #[serde(default)]
    pub local: Option<SocketAddr>,
    /// The decision the scenario expects, checked if given: `allow` or `deny`.
    #[serde(default)]
    pub expect: Option<String>,
    /// Whether the expectation relies on the driver having revoked a verdict it cached before
    /// a reload (it does not hold, and is not checked, when the driver has no control device).
    #[serde(skip)]
    pub after_revoke: bool,
    /// Keep the connection open under this name, if the driver allows it, for `send` steps.
    #[serde(default)]
    pub hold: Option<String>,
}

fn default_protocol() -> String {
    "tcp".to_owned()
}

fn default_direction() -> String {
    "outbound".to_owned()
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    /// A heading.
    Note(String),
    /// A connection attempt.
    Connect(Attempt),
    /// Replace the rules file's text (the service notices and reloads).
    Reload {
        /// The new text.
        text: String,
        /// What the change is, for the output.
        what: String,
        /// Whether the service must accept it (otherwise it must refuse it).
        valid: bool,
    },
    /// Kill the service's process.
    KillService,
    /// Start the service again.
    StartService,
    /// A held connection sends data (see the [module documentation](self)).
    Send {
        /// The name an attempt's `hold` gave it.
        connection: String,
        /// `flows` or `cut`, checked if given.
        expect: Option<String>,
    },
}

/// A line of a trace file.
#[derive(Debug, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
enum TraceLine {
    Note {
        text: String,
    },
    Connect(Attempt),
    Reload {
        rules: PathBuf,
    },
    KillService,
    StartService,
    Send {
        connection: String,
        #[serde(default)]
        expect: Option<String>,
    },
}

/// Reads a trace file into steps (see the [module documentation](self)).
pub fn read_trace(path: &Path) -> Result<Vec<Step>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut steps = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: &dyn std::fmt::Display| format!("{}:{}: {e}", path.display(), number + 1);
        let parsed: TraceLine = serde_json::from_str(line).map_err(|e| at(&e))?;
        steps.push(match parsed {
            TraceLine::Note { text } => Step::Note(text),
            TraceLine::Connect(attempt) => {
                check_attempt(&attempt).map_err(|e| at(&e))?;
                Step::Connect(attempt)
            }
            TraceLine::Reload { rules } => {
                let file = base.join(rules);
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| at(&format!("{}: cannot read: {e}", file.display())))?;
                let valid = Rules::parse(&text).is_ok();
                Step::Reload {
                    text,
                    what: format!("the rules of {}", file.display()),
                    valid,
                }
            }
            TraceLine::KillService => Step::KillService,
            TraceLine::StartService => Step::StartService,
            TraceLine::Send { connection, expect } => {
                if let Some(expect) = &expect {
                    parse_flow(expect).map_err(|e| at(&e))?;
                }
                Step::Send { connection, expect }
            }
        });
    }
    Ok(steps)
}

fn parse_protocol(text: &str) -> Result<u8, String> {
    crate::cli::parse_protocol(text).map_err(|error| format!("protocol {error}"))
}

fn parse_direction(text: &str) -> Result<SimDirection, String> {
    match text {
        "outbound" => Ok(SimDirection::Outbound),
        "inbound" => Ok(SimDirection::Inbound),
        other => Err(format!("direction `{other}` is not outbound or inbound")),
    }
}

fn parse_verdict(text: &str) -> Result<Verdict, String> {
    match text {
        "allow" => Ok(Verdict::Allow),
        "deny" => Ok(Verdict::Deny),
        other => Err(format!("expected verdict `{other}` is not allow or deny")),
    }
}

/// `flows` (true) or `cut` (false).
fn parse_flow(text: &str) -> Result<bool, String> {
    match text {
        "flows" => Ok(true),
        "cut" => Ok(false),
        other => Err(format!("expected `{other}` is not flows or cut")),
    }
}

fn check_attempt(attempt: &Attempt) -> Result<(), String> {
    parse_protocol(&attempt.protocol)?;
    parse_direction(&attempt.direction)?;
    if let Some(expect) = &attempt.expect {
        parse_verdict(expect)?;
    }
    if let Some(local) = attempt.local
        && local.is_ipv4() != attempt.remote.is_ipv4()
    {
        return Err("local and remote are of different IP versions".to_owned());
    }
    if attempt.image.contains('\0') {
        return Err("the image path contains a NUL".to_owned());
    }
    Ok(())
}

const BROWSER: &str = r"\Device\HarddiskVolume3\Program Files\Browser\browser.exe";
const UPDATER: &str = r"\Device\HarddiskVolume3\Program Files\Updater\update.exe";
const CURL: &str = r"\Device\HarddiskVolume3\Windows\System32\curl.exe";
const SVCHOST: &str = r"\Device\HarddiskVolume3\Windows\System32\svchost.exe";
const GAME: &str = r"\Device\HarddiskVolume3\Users\alice\Downloads\game.exe";
const SSHD: &str = r"\Device\HarddiskVolume3\Program Files\OpenSSH\sshd.exe";

fn attempt(pid: u64, image: &str, protocol: &str, remote: &str, expect: &str) -> Step {
    Step::Connect(Attempt {
        pid,
        image: image.to_owned(),
        protocol: protocol.to_owned(),
        direction: "outbound".to_owned(),
        remote: remote.parse().expect("a built-in endpoint"),
        local: None,
        expect: Some(expect.to_owned()),
        after_revoke: false,
        hold: None,
    })
}

/// An attempt whose connection the demo keeps open as `name`.
fn held(step: Step, name: &str) -> Step {
    match step {
        Step::Connect(mut a) => {
            a.hold = Some(name.to_owned());
            Step::Connect(a)
        }
        other => other,
    }
}

/// The held connection `name` sends; `expect`: `flows` or `cut`.
fn send(name: &str, expect: &str) -> Step {
    Step::Send {
        connection: name.to_owned(),
        expect: Some(expect.to_owned()),
    }
}

/// An attempt whose expectation holds only if the driver revoked what it had cached.
fn after_revoke(step: Step) -> Step {
    match step {
        Step::Connect(mut a) => {
            a.after_revoke = true;
            Step::Connect(a)
        }
        other => other,
    }
}

fn inbound(pid: u64, image: &str, remote: &str, expect: &str) -> Step {
    match attempt(pid, image, "tcp", remote, expect) {
        Step::Connect(mut a) => {
            a.direction = "inbound".to_owned();
            Step::Connect(a)
        }
        _ => unreachable!("attempt() makes a Connect step"),
    }
}

/// `rules` with `rule` inserted before its first rule, so that it comes first.
fn with_first_rule(rules: &str, rule: &str) -> String {
    match rules.find("[[rule]]") {
        Some(at) => format!("{}{rule}\n{}", &rules[..at], &rules[at..]),
        None => format!("{rules}\n{rule}"),
    }
}

/// The rule the built-in scenario's reload puts first.
const QUARANTINE: &str =
    "[[rule]]\nname = \"quarantine-192.0.2.10\"\naction = \"deny\"\nremote = \"192.0.2.10\"\n";

/// The built-in scenario, against `rules` (the text of the policy in force at start; the reload
/// step puts a rule in front of it). Expectations hold for [`DEMO_RULES`] with the driver
/// failing closed; the caller drops them otherwise.
pub fn builtin_scenario(rules: &str) -> Vec<Step> {
    let reloaded = with_first_rule(rules, QUARANTINE);
    vec![
        Step::Note("Programs connect out (the driver pends each new connection and asks the service)".into()),
        held(attempt(1200, BROWSER, "tcp", "192.0.2.10:443", "allow"), "the browser's tab"),
        attempt(1200, BROWSER, "tcp", "192.0.2.10:443", "allow"),
        attempt(1200, BROWSER, "tcp", "[2001:db8::10]:443", "allow"),
        attempt(1200, BROWSER, "tcp", "203.0.113.5:443", "deny"),
        attempt(1200, BROWSER, "tcp", "[2001:db8:bad::1]:80", "deny"),
        attempt(1600, SVCHOST, "udp", "10.0.0.53:53", "allow"),
        attempt(1600, SVCHOST, "udp", "[2001:db8::53]:53", "allow"),
        attempt(1300, UPDATER, "tcp", "198.51.100.20:443", "allow"),
        attempt(1300, UPDATER, "tcp", "192.0.2.99:443", "deny"),
        held(attempt(1400, CURL, "tcp", "10.1.2.3:8080", "allow"), "curl's download"),
        attempt(1400, CURL, "tcp", "[fd00::5]:443", "allow"),
        attempt(1500, GAME, "tcp", "198.51.100.7:6667", "deny"),
        attempt(1500, GAME, "udp", "[2001:db8:77::1]:3478", "deny"),
        Step::Note("Peers connect in (the driver pends each new connection with a copy of its first packet, asks the service, and reinjects the copy if it allows: the first attempt gets the service's verdict)".into()),
        inbound(1700, SSHD, "10.9.8.7:51000", "allow"),
        inbound(1700, SSHD, "10.9.8.7:51000", "allow"),
        inbound(1700, SSHD, "198.51.100.66:40000", "deny"),
        inbound(1700, SSHD, "198.51.100.66:40000", "deny"),
        Step::Note("The rules change: 192.0.2.10 is quarantined (the browser's cached allow is revoked)".into()),
        Step::Reload {
            text: reloaded.clone(),
            what: format!("a rule in front: {}", QUARANTINE.lines().nth(1).unwrap_or_default()),
            valid: true,
        },
        Step::Note("Connections already open meet the new rules: the driver has WFP reauthorize them, keeps each while it asks the service, and the quarantined one is cut".into()),
        send("the browser's tab", "cut"),
        send("curl's download", "flows"),
        Step::Note("New connections meet them too".into()),
        after_revoke(attempt(1200, BROWSER, "tcp", "192.0.2.10:443", "deny")),
        attempt(1200, BROWSER, "tcp", "[2001:db8::10]:443", "allow"),
        Step::Note("A broken rules file: the service says where, and the policy in force stays".into()),
        Step::Reload {
            text: reloaded.replace("action = \"deny\"\nremote = \"192.0.2.10\"", "action = \"deny\"\nremote = \"192.0.2.300\""),
            what: "a typo in an address".into(),
            valid: false,
        },
        attempt(1400, CURL, "tcp", "10.7.7.7:8443", "allow"),
        after_revoke(attempt(1200, BROWSER, "tcp", "192.0.2.10:443", "deny")),
        Step::Reload {
            text: reloaded.clone(),
            what: "the typo fixed".into(),
            valid: true,
        },
        Step::Note("The service is killed: cached verdicts still answer, anything new gets the driver's default".into()),
        Step::KillService,
        attempt(1200, BROWSER, "tcp", "[2001:db8::10]:443", "allow"),
        attempt(1300, UPDATER, "tcp", "198.51.100.21:443", "deny"),
        Step::Note("The service comes back: it has the driver revoke every cached verdict, and answers again".into()),
        Step::StartService,
        attempt(1200, BROWSER, "tcp", "[2001:db8::10]:443", "allow"),
        attempt(1300, UPDATER, "tcp", "198.51.100.21:443", "allow"),
    ]
}

/// Replaces `path`'s contents in one step (a new file renamed over it), as an editor that saves
/// safely does: the service, which reads the file every few milliseconds, never sees it half
/// written. (It would say so, keep the policy in force, and reload once the whole text is there;
/// but the demo expects one outcome per change.)
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let staging = path.with_extension("toml.new");
    std::fs::write(&staging, text).map_err(|e| format!("{}: {e}", staging.display()))?;
    std::fs::rename(&staging, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The service's process and its log lines.
struct ServiceProcess {
    child: Child,
    log: Receiver<String>,
    /// Whether it said it cannot open the driver's control device.
    no_control_device: std::cell::Cell<bool>,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServiceProcess {
    fn start(
        launcher: Launcher,
        socket: &Path,
        rules: &Path,
        audit: &Path,
        out: &mut dyn Write,
    ) -> Result<ServiceProcess, String> {
        let volume = format!("{}={}", DEMO_VOLUME.0, DEMO_VOLUME.1);
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--poll-ms".into(),
            "20".into(),
            "--max-backoff-ms".into(),
            "100".into(),
            "--rules".into(),
            rules.into(),
            "--audit".into(),
            audit.into(),
            "--volume".into(),
            volume.into(),
        ];
        let mut child = launcher(&args)
            .map_err(|e| format!("cannot find the service's program: {e}"))?
            .env(wfp_rs::user::SIM_SOCKET_VARIABLE, socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the service: {e}"))?;
        let stderr = child.stderr.take().ok_or("the service has no stderr")?;
        let (sender, log) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let service = ServiceProcess {
            child,
            log,
            no_control_device: std::cell::Cell::new(false),
        };
        let _ = writeln!(
            out,
            "    [demo] started the service: pid {}",
            service.child.id()
        );
        Ok(service)
    }

    /// Prints the log lines that came so far.
    fn show_log(&self, out: &mut dyn Write) {
        while let Ok(line) = self.log.try_recv() {
            self.show_line(&line, out);
        }
    }

    /// Prints log lines until one contains `expected`; returns it.
    fn wait_for(&self, expected: &[&str], out: &mut dyn Write) -> Result<String, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.show_line(&line, out);
                    if expected.iter().any(|e| line.contains(e)) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("the service did not log {expected:?} in time"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the service ended before logging {expected:?}"));
                }
            }
        }
    }
}

impl ServiceProcess {
    fn show_line(&self, line: &str, out: &mut dyn Write) {
        if line.contains("cannot open the control device") {
            self.no_control_device.set(true);
        }
        let line = line.strip_prefix("firewall: ").unwrap_or(line);
        let _ = writeln!(out, "    [service] {line}");
    }
}

/// New records of the audit file, read as they are appended.
struct AuditReader {
    path: PathBuf,
    seen: usize,
}

impl AuditReader {
    fn read_new(&mut self) -> Vec<AuditRecord> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        // Records are written whole, one line each; a missing newline means a write in progress.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let new = text.get(self.seen..complete).unwrap_or_default();
        self.seen = complete.max(self.seen);
        new.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// The counters that changed from `base` to `now`.
fn since(now: StatsSnapshot, base: StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        cache_hits: now.cache_hits - base.cache_hits,
        asked: now.asked - base.asked,
        asked_via_channel: now.asked_via_channel - base.asked_via_channel,
        asked_via_port: now.asked_via_port - base.asked_via_port,
        answered: now.answered - base.answered,
        defaults: now.defaults - base.defaults,
        cached: now.cached - base.cached,
        revoked: now.revoked - base.revoked,
        overloaded: now.overloaded - base.overloaded,
        ..StatsSnapshot::default()
    }
}

/// Who decided an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    Service,
    Cache,
    Default,
    Loopback,
    Overload,
}

/// The outcome of a demo run.
#[derive(Debug, Default)]
pub struct Summary {
    /// Connection attempts replayed.
    pub attempts: usize,
    /// Allowed ones.
    pub allowed: usize,
    /// Denied ones.
    pub denied: usize,
    /// Decided by the service's rules.
    pub by_service: usize,
    /// Answered from the driver's cache.
    pub by_cache: usize,
    /// Given the driver's default.
    pub by_default: usize,
    /// Given the driver's overload decision (its bound of pending questions was reached).
    pub by_overload: usize,
    /// Attempts whose decision differed from the scenario's expectation.
    pub unexpected: Vec<usize>,
    /// Problems: a reload that did not go as the scenario said, pool left after unload.
    pub problems: Vec<String>,
    /// Held connections a rules change cut (`send` steps).
    pub cut: usize,
}

struct Demo<'o> {
    out: &'o mut dyn Write,
    launcher: Launcher,
    /// The driver's counters when this run started (they are process-wide).
    baseline: StatsSnapshot,
    machine: Machine,
    socket: PathBuf,
    rules_file: PathBuf,
    audit_file: PathBuf,
    service: Option<ServiceProcess>,
    audit: AuditReader,
    volumes: VolumeMap,
    /// The rule behind each verdict the service gave, by cache key, to explain cache hits.
    given: HashMap<(u64, String, u8, SocketAddr), String>,
    /// The connections attempts asked to hold, by name: the connection and its flow.
    held: HashMap<String, (Connection, u64)>,
    next_port: u16,
    summary: Summary,
    widths: [usize; 7],
    verbose: bool,
    debug_seen: usize,
    /// Whether the table's header was printed (at the first attempt, and after each note).
    header_shown: bool,
    /// Whether the service said it cannot reach the driver's control device (so revocations
    /// do not happen, and verdicts cached before a reload live out their lifetime).
    no_control_device: bool,
    /// The driver's design: with the question channel, a started service is ready once it
    /// has the channel open too.
    ask_via: AskVia,
}

/// Runs the demo and prints it; the summary says what happened.
pub fn run(options: &DemoOptions, out: &mut dyn Write) -> Result<Summary, String> {
    let (rules_text, builtin_rules) = match &options.rules {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("{}: cannot read: {e}", path.display()))?,
            false,
        ),
        None => (DEMO_RULES.to_owned(), true),
    };
    if let Err(error) = Rules::parse_named(
        &options
            .rules
            .as_ref()
            .map_or("demo-rules.toml".to_owned(), |p| p.display().to_string()),
        &rules_text,
    ) {
        return Err(error.to_string());
    }
    let steps = match &options.trace {
        Some(trace) => read_trace(trace)?,
        None => {
            let mut steps = builtin_scenario(&rules_text);
            if !builtin_rules || options.fail_open {
                for step in &mut steps {
                    match step {
                        Step::Connect(a) => a.expect = None,
                        Step::Send { expect, .. } => *expect = None,
                        _ => {}
                    }
                }
            }
            steps
        }
    };

    let dir = std::env::temp_dir().join(format!("firewall-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(options, &dir, &rules_text, steps, out);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    options: &DemoOptions,
    dir: &Path,
    rules_text: &str,
    steps: Vec<Step>,
    out: &mut dyn Write,
) -> Result<Summary, String> {
    let rules_file = dir.join("rules.toml");
    std::fs::write(&rules_file, rules_text).map_err(|e| e.to_string())?;
    let audit_file = options
        .audit
        .clone()
        .unwrap_or_else(|| dir.join("audit.jsonl"));
    let _ = std::fs::remove_file(&audit_file);

    let config = Config {
        ask_via: options.ask_via,
        default: if options.fail_open {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        overload: if options.permit_on_overload {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        // The service is another process on a possibly busy machine: be patient. (A dead
        // service is noticed at once, not after the timeout: the port disconnects.)
        timeout: Duration::from_secs(10),
        stats: Some(&STATS),
        // Only the service answers: another process on the bridge is refused at the port and
        // the control device.
        service_sid: cfg!(target_os = "linux").then_some(DEMO_SERVICE_SID),
        ..Config::DEFAULT
    };
    *CONFIG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = config;

    let baseline = STATS.snapshot();
    let machine = Machine::new();
    let driver = machine
        .load_driver("firewall", DriverEntry)
        .map_err(|s| format!("the firewall driver did not load: {s}"))?;
    let _ = writeln!(
        out,
        "firewall demo: a simulated machine with the firewall driver loaded, asking through {} (fail-{}, {} s timeout, {} cache entries, {} pending questions at most, then {} on overload)",
        config.ask_via,
        if options.fail_open { "open" } else { "closed" },
        config.timeout.as_secs(),
        config.cache_capacity,
        config.max_pending,
        config.overload
    );
    let socket = dir.join("bridge.sock");
    let bridge = machine.serve_user_mode(&socket).map_err(|e| {
        format!(
            "cannot serve the simulated machine on {}: {e}",
            socket.display()
        )
    })?;
    if let Some(sid) = config.service_sid {
        identify_service(&bridge, options.launcher.unwrap_or(this_program), sid)?;
        let _ = writeln!(
            out,
            "firewall demo: only the service's process (per-service SID {sid}) may connect to the port or open the question channel and the control device"
        );
    }
    let mut volumes = VolumeMap::new();
    volumes.insert(DEMO_VOLUME.0, DEMO_VOLUME.1);
    let mut demo = Demo {
        ask_via: config.ask_via,
        out,
        launcher: options.launcher.unwrap_or(this_program),
        baseline,
        machine,
        socket,
        audit: AuditReader {
            path: audit_file.clone(),
            seen: 0,
        },
        rules_file,
        audit_file,
        service: None,
        volumes,
        given: HashMap::new(),
        held: HashMap::new(),
        next_port: 49_152,
        summary: Summary::default(),
        widths: [3, 5, 38, 3, 5, 26, 7],
        verbose: options.verbose,
        debug_seen: 0,
        header_shown: false,
        no_control_device: false,
    };
    let outcome = demo.start_service().and_then(|()| {
        for step in steps {
            demo.step(step)?;
        }
        Ok(())
    });
    if let Some(service) = demo.service.take() {
        drop(service);
    }
    drop(bridge);
    let unloaded = demo.machine.unload_driver(driver);
    outcome?;
    let clean = match unloaded {
        Ok(()) if demo.machine.pool_blocks().is_empty() => true,
        Ok(()) => {
            demo.summary.problems.push(format!(
                "the driver left {} pool blocks behind",
                demo.machine.pool_blocks().len()
            ));
            false
        }
        Err(e) => {
            demo.summary
                .problems
                .push(format!("the driver did not unload: {e:?}"));
            false
        }
    };
    demo.print_summary(&since(STATS.snapshot(), demo.baseline));
    if clean {
        let _ = writeln!(
            demo.out,
            "  the driver unloaded cleanly: no pool left, no pended connection left"
        );
    }
    if options.audit.is_some() {
        let _ = writeln!(
            demo.out,
            "  the audit log is in {}",
            demo.audit_file.display()
        );
    }
    Ok(demo.summary)
}

/// Gives the service's program `sid` in its token on the bridge, as the service control manager
/// gives a service with `sc sidtype <name> unrestricted` its per-service SID: processes are
/// told apart by their executable (the program `launcher` runs), never by what they claim.
fn identify_service(
    bridge: &wfp_rs_sim::UserModeBridge,
    launcher: Launcher,
    sid: &str,
) -> Result<(), String> {
    let sid = wfp_rs::client::Sid::parse(sid).map_err(|s| format!("bad service SID {sid}: {s}"))?;
    let program = launcher(&[]).map_err(|e| format!("cannot find the service's program: {e}"))?;
    let program = Path::new(program.get_program())
        .canonicalize()
        .map_err(|e| {
            format!(
                "cannot resolve the service's program {}: {e}",
                program.get_program().to_string_lossy()
            )
        })?;
    bridge.identify(&program, [sid]);
    Ok(())
}

impl Demo<'_> {
    fn start_service(&mut self) -> Result<(), String> {
        let service = ServiceProcess::start(
            self.launcher,
            &self.socket,
            &self.rules_file,
            &self.audit_file,
            self.out,
        )?;
        service.wait_for(&["serving"], self.out)?;
        if self.ask_via == AskVia::Channel {
            // It connects to the port first: until it has the channel open too, a question
            // would go to the port (the driver's fallback), which the rows would show.
            service.wait_for(
                &["answering the question channel", "no question channel"],
                self.out,
            )?;
        }
        if service.no_control_device.get() {
            self.no_control_device = true;
        }
        self.service = Some(service);
        // The service's reader is waiting: the first question is delivered at once.
        self.machine.wait_for_port_listener(PORT_NAME);
        Ok(())
    }

    fn print_header(&mut self) {
        self.header_shown = true;
        let w = self.widths;
        let _ = writeln!(
            self.out,
            "  {:>w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {:<w5$}  {:<w6$}  decided by",
            "#",
            "pid",
            "image",
            "dir",
            "proto",
            "remote",
            "verdict",
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
            w5 = w[5],
            w6 = w[6],
        );
    }

    /// Prints the driver's new debug output (with `--verbose`).
    fn show_driver_output(&mut self) {
        if !self.verbose {
            return;
        }
        let output = self.machine.debug_output();
        for line in output.iter().skip(self.debug_seen) {
            let _ = writeln!(self.out, "    [driver] {}", line.trim_end());
        }
        self.debug_seen = output.len();
    }

    fn step(&mut self, step: Step) -> Result<(), String> {
        let result = self.run_step(step);
        self.show_driver_output();
        result
    }

    fn run_step(&mut self, step: Step) -> Result<(), String> {
        match step {
            Step::Note(text) => {
                let _ = writeln!(self.out, "\n{text}");
                self.print_header();
            }
            Step::Connect(attempt) => self.connect(&attempt)?,
            Step::Reload { text, what, valid } => {
                let _ = writeln!(self.out, "    [demo] rewriting the rules file: {what}");
                let unchanged = std::fs::read_to_string(&self.rules_file).is_ok_and(|t| t == text);
                write_atomically(&self.rules_file, &text)?;
                if unchanged {
                    // The service reloads when the text changes; there is nothing to wait for.
                    let _ = writeln!(
                        self.out,
                        "    [demo] (the text is the same: nothing to reload)"
                    );
                    return Ok(());
                }
                let Some(service) = &self.service else {
                    let _ = writeln!(
                        self.out,
                        "    [demo] (the service is not running; it reads the file when it starts)"
                    );
                    return Ok(());
                };
                let line =
                    service.wait_for(&["reloaded", "the policy in force stays"], self.out)?;
                let accepted = line.contains("reloaded");
                if accepted != valid {
                    self.summary.problems.push(format!(
                        "the service {} a reload the scenario expected it to {}",
                        if accepted { "accepted" } else { "refused" },
                        if valid { "accept" } else { "refuse" }
                    ));
                }
                // "...; N cached verdicts to revoke": wait until they are.
                let to_revoke = line
                    .rsplit("; ")
                    .next()
                    .and_then(|tail| tail.split(' ').next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                if accepted && to_revoke > 0 {
                    service.wait_for(&["revoked", "revoke request", "control device"], self.out)?;
                }
                if service.no_control_device.get() {
                    self.no_control_device = true;
                }
            }
            Step::KillService => {
                if let Some(mut service) = self.service.take() {
                    service.show_log(self.out);
                    let pid = service.child.id();
                    let _ = service.child.kill();
                    let _ = service.child.wait();
                    let _ = writeln!(self.out, "    [demo] killed the service (pid {pid})");
                }
            }
            Step::StartService => {
                if self.service.is_none() {
                    self.start_service()?;
                }
            }
            Step::Send { connection, expect } => {
                let expect = expect.as_deref().map(parse_flow).transpose()?;
                self.send(&connection, expect)?;
            }
        }
        Ok(())
    }

    /// The held connection `name` sends packets: one, and while the driver keeps it only to
    /// ask the service about it, another once the driver has its verdict (and, for a deny, has
    /// made the policy change that reauthorizes it again).
    fn send(&mut self, name: &str, expect: Option<bool>) -> Result<(), String> {
        let Some((connection, flow)) = self.held.get(name).cloned() else {
            self.summary.problems.push(format!(
                "`send` names `{name}`, which no allowed attempt held open"
            ));
            return Ok(());
        };
        let mut packets = 0;
        let flows = loop {
            let before = STATS.snapshot();
            let decision = self
                .machine
                .packet(&connection, flow, SimDirection::Outbound);
            packets += 1;
            if decision.action != Action::Permit {
                break false;
            }
            if STATS.snapshot().established_kept == before.established_kept {
                // Not reauthorized, or answered from the cache: nothing more will change.
                break true;
            }
            // Kept while asked: wait for the verdict, and for a deny's policy change.
            if !self.wait_for_established_verdict(before.policy_changes)? {
                break true;
            }
        };
        if let Some(service) = &self.service {
            service.show_log(self.out);
        }
        let what = if flows {
            format!("flows ({packets} packet(s) delivered)")
        } else {
            self.summary.cut += 1;
            format!(
                "cut: packet {packets} dropped (WFP reauthorized the connection after the rules change; the new rules deny it)"
            )
        };
        let mark = match expect {
            Some(expected) if expected != flows && self.no_control_device => format!(
                "  (not cut: this driver has no control device yet, so a rules change does not reach open connections; expected {} once it does)",
                if expected { "flows" } else { "cut" }
            ),
            Some(expected) if expected != flows => {
                self.summary.problems.push(format!(
                    "{name} {} where the scenario expected it to {}",
                    if flows { "flowed" } else { "was cut" },
                    if expected { "flow" } else { "be cut" }
                ));
                format!("  << expected {}", if expected { "flows" } else { "cut" })
            }
            _ => String::new(),
        };
        let _ = writeln!(
            self.out,
            "    [demo] {name} ({} -> {}) sends: {what}{mark}",
            self.volumes.to_dos_path(&connection.app),
            connection.remote
        );
        Ok(())
    }

    /// After a packet the driver kept while asking the service: waits for the driver's verdict
    /// line for that question; for a deny, also for the policy change it makes (past
    /// `policy_changes`). Whether another packet may meet a different decision.
    fn wait_for_established_verdict(&self, policy_changes: u64) -> Result<bool, String> {
        let asked = self
            .machine
            .debug_output()
            .iter()
            .rev()
            .find(|line| {
                line.contains("a policy change reauthorized it")
                    && line.contains("asking the service")
            })
            .and_then(|line| line.strip_prefix("firewall: #"))
            .and_then(|rest| rest.split(':').next())
            .map(|id| format!("firewall: #{id}: "));
        let Some(asked) = asked else {
            // Kept without asking (too many questions in flight): nothing will change now.
            return Ok(false);
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let verdict = self.machine.debug_output().iter().find_map(|line| {
                let rest = line.strip_prefix(&asked)?;
                if rest.starts_with("deny for an established connection") {
                    Some(true)
                } else if rest.contains("for an established connection") {
                    Some(false)
                } else {
                    None
                }
            });
            match verdict {
                Some(true) if STATS.snapshot().policy_changes > policy_changes => return Ok(true),
                Some(false) => return Ok(false),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(
                    "the driver did not settle an established connection in time".to_owned(),
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn connect(&mut self, attempt: &Attempt) -> Result<(), String> {
        if !self.header_shown {
            let _ = writeln!(self.out);
            self.print_header();
        }
        let protocol = parse_protocol(&attempt.protocol)?;
        let direction = parse_direction(&attempt.direction)?;
        let expect = attempt.expect.as_deref().map(parse_verdict).transpose()?;
        let local = attempt.local.unwrap_or_else(|| {
            let ip = match attempt.remote.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
            };
            let port = match direction {
                SimDirection::Inbound => 22,
                SimDirection::Outbound => {
                    self.next_port = self.next_port.checked_add(1).unwrap_or(49_152);
                    self.next_port
                }
            };
            SocketAddr::new(ip, port)
        });
        let connection = Connection {
            pid: attempt.pid,
            app: attempt.image.clone(),
            protocol: IpProtocol::from(protocol),
            local,
            remote: attempt.remote,
            direction,
        };
        let before = STATS.snapshot();
        let outcome = self.machine.connect(&connection, AleIrql::Passive);
        if let (Some(name), Some(flow)) = (&attempt.hold, outcome.flow_handle) {
            self.held.insert(name.clone(), (connection.clone(), flow));
        }
        // Inbound misses ask the service in the background: let that finish, so its verdict is
        // in the cache (and the audit log) before the next attempt.
        self.machine.wait_for_work_items();
        if STATS.snapshot().background_asks > before.background_asks {
            self.wait_for_background_ask()?;
        }
        let after = STATS.snapshot();
        if let Some(service) = &self.service {
            service.show_log(self.out);
        }
        let records = self.audit.read_new();
        let allowed = outcome.decision.action == Action::Permit;
        let verdict = if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let key = (
            attempt.pid,
            attempt.direction.clone(),
            protocol,
            attempt.remote,
        );
        let service_said = records
            .iter()
            .rev()
            .find(|r| r.pid == attempt.pid && r.remote == attempt.remote.to_string());
        if let Some(record) = service_said {
            self.given.insert(
                key.clone(),
                format!("{} ({})", record.decided_by, record.verdict),
            );
        }
        let (source, by) = if after.loopback > before.loopback {
            (Source::Loopback, "driver: loopback, not asked".to_owned())
        } else if after.cache_hits > before.cache_hits {
            let rule = self
                .given
                .get(&key)
                .map_or_else(|| "an earlier answer".to_owned(), Clone::clone);
            (Source::Cache, format!("driver cache: {rule}"))
        } else if after.overloaded > before.overloaded {
            // Not the default: overload has its own decision (the driver's "Overload").
            (
                Source::Overload,
                "driver overload decision (too many pending)".to_owned(),
            )
        } else if outcome.pended && after.answered > before.answered {
            let rule = service_said.map_or("?", |r| r.decided_by.as_str());
            let via = if after.asked_via_channel > before.asked_via_channel {
                "channel"
            } else {
                "port"
            };
            (Source::Service, format!("service ({via}): {rule}"))
        } else {
            let why = if self.service.is_none() {
                "no service".to_owned()
            } else if let Some(record) = service_said.filter(|_| direction == SimDirection::Inbound)
            {
                format!(
                    "asked in the background: {} by {}, cached for the next attempt",
                    record.verdict, record.decided_by
                )
            } else if direction == SimDirection::Inbound {
                "not asked".to_owned()
            } else {
                "no answer".to_owned()
            };
            (Source::Default, format!("driver default ({why})"))
        };
        self.summary.attempts += 1;
        if allowed {
            self.summary.allowed += 1;
        } else {
            self.summary.denied += 1;
        }
        match source {
            Source::Service => self.summary.by_service += 1,
            Source::Cache => self.summary.by_cache += 1,
            Source::Default | Source::Loopback => self.summary.by_default += 1,
            Source::Overload => self.summary.by_overload += 1,
        }
        let stale = attempt.after_revoke && self.no_control_device && source == Source::Cache;
        let mark = match expect {
            Some(expected) if expected != verdict && stale => format!(
                "  (not revoked: this driver has no control device yet, so the verdict cached before the reload lives out its lifetime; expected {expected} once it does)"
            ),
            Some(expected) if expected != verdict => {
                self.summary.unexpected.push(self.summary.attempts);
                format!("  << expected {expected}")
            }
            _ => String::new(),
        };
        let image = if attempt.image.is_empty() {
            "(unknown)".to_owned()
        } else {
            self.volumes.to_dos_path(&attempt.image)
        };
        let w = self.widths;
        let _ = writeln!(
            self.out,
            "  {:>w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {:<w5$}  {:<w6$}  {by}{mark}",
            self.summary.attempts,
            attempt.pid,
            image,
            if direction == SimDirection::Outbound {
                "out"
            } else {
                "in"
            },
            crate::audit::protocol_name(protocol)
                .map_or_else(|| protocol.to_string(), str::to_owned),
            attempt.remote.to_string(),
            verdict.as_str(),
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
            w5 = w[5],
            w6 = w[6],
        );
        Ok(())
    }

    /// Waits until the driver logged the end of its latest background ask (`#N: ... for later
    /// attempts`). `Machine::wait_for_work_items` alone can return while a worker thread has
    /// taken the work item off the queue but not yet marked it running; the driver's own line
    /// is the state to wait for.
    fn wait_for_background_ask(&self) -> Result<(), String> {
        let started = self
            .machine
            .debug_output()
            .iter()
            .rev()
            .find(|line| line.contains("asking the service for later attempts"))
            .and_then(|line| line.strip_prefix("firewall: #"))
            .and_then(|rest| rest.split(':').next())
            .map(|id| format!("firewall: #{id}: "))
            .ok_or("the driver did not log its background ask")?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let done = self.machine.debug_output().iter().any(|line| {
                line.starts_with(&started)
                    && line.contains("for later attempts")
                    && !line.contains("asking the service")
            });
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the driver's background ask did not finish in time".to_owned());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn print_summary(&mut self, stats: &StatsSnapshot) {
        let s = &self.summary;
        let _ = writeln!(self.out, "\nSummary");
        let design = match (stats.asked_via_channel, stats.asked_via_port) {
            (0, 0) => "nobody was asked (every decision came from the cache or the driver)",
            (_, 0) => "the question channel (asked from classifyFn, no work item)",
            (0, _) => "the port and a work item",
            _ => "both the question channel and the port (a mixed run)",
        };
        let _ = writeln!(
            self.out,
            "  the service's answers reached the driver through {design}"
        );
        let _ = writeln!(
            self.out,
            "  {} attempts: {} allowed, {} denied; {} open connection(s) cut by a rules change",
            s.attempts, s.allowed, s.denied, s.cut
        );
        let _ = writeln!(
            self.out,
            "  decided by the service's rules: {}, the driver's cache: {}, the driver's default: {}, the driver's overload decision: {}",
            s.by_service, s.by_cache, s.by_default, s.by_overload
        );
        let _ = writeln!(
            self.out,
            "  driver: {} questions asked ({} through the question channel, {} through the port and a work item), {} answered, {} verdicts cached, {} cache hits, {} revoked, {} defaults, {} overloaded",
            stats.asked,
            stats.asked_via_channel,
            stats.asked_via_port,
            stats.answered,
            stats.cached,
            stats.cache_hits,
            stats.revoked,
            stats.defaults,
            stats.overloaded
        );
        let records = std::fs::read_to_string(&self.audit_file)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        let _ = writeln!(
            self.out,
            "  audit log: {records} records (one JSON line per decision the service made)"
        );
        if s.unexpected.is_empty() {
            if s.attempts > 0 {
                let _ = writeln!(self.out, "  every decision was the expected one");
            }
        } else {
            let _ = writeln!(
                self.out,
                "  UNEXPECTED decisions at attempts {:?}",
                s.unexpected
            );
        }
        for problem in &s.problems {
            let _ = writeln!(self.out, "  PROBLEM: {problem}");
        }
    }
}
