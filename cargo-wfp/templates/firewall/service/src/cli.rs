//! The `firewall` command line: `serve`, `check-rules`, `decide` and `demo`.
//!
//! [`main`] is the binary's `main`; [`run`] runs one command line with its output and errors
//! going to the writers it is given (the tests run it in a child process and read them).

use std::ffi::OsString;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::serve::{ServeOptions, serve};
use crate::service::{LoadError, Service, load_rules};
use firewall_protocol::{CacheLifetime, MAX_CACHE_SECONDS};
use firewall_rules::{Direction, VolumeMap};

/// The example wfp-rs firewall: a user-mode service that answers its callout driver's questions
/// ("may this process make this connection?") from a TOML rules file.
///
/// The driver holds each new connection and asks over the filter-manager port
/// \WfpRsFirewallPort; the service decides with the first matching rule (or the default), replies
/// with a verdict the driver may cache for --cache-seconds, and appends one JSON line per
/// decision to the audit log. Rules files are described in `firewall check-rules --help`.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: answer the driver, audit, reload the rules on change.
    ///
    /// Connects to the driver's port (retrying with backoff while the driver is not loaded, and
    /// again whenever it goes away) and first tells the driver to forget every cached verdict,
    /// since an earlier instance may have granted them. Every request is decided by the rules and
    /// audited. The rules file is read every --poll-ms; when its text changes it is reloaded: a
    /// bad file is reported as FILE:LINE:COL: MESSAGE and the policy in force stays; a good one
    /// replaces it, and the cached verdicts it changes are revoked at the driver (through its
    /// control device \\.\WfpRsFirewall; if that cannot be opened, they expire on their own), so
    /// the new rules apply to new connections at once. A request that cannot be decoded is
    /// logged and not answered: the driver applies its own default when its wait times out.
    /// Logs go to standard error. Stop it with Ctrl-C.
    ///
    /// With the simulator (on Linux or macOS), set WFP_RS_SIM_SOCKET to the socket of the
    /// simulated machine's bridge.
    Serve(ServeArgs),
    /// Check a rules file; exit 0 and summarise it, or exit 1 with FILE:LINE:COL: MESSAGE.
    ///
    /// A rules file is TOML: `default = "allow"|"deny"` and an ordered list of [[rule]] tables,
    /// each with `action = "allow"|"deny"` and optional match fields: `name`, `app` (a glob on
    /// the DOS path of the program: `?`, `*` within a folder, `**` across folders,
    /// case-insensitive), `remote` (address or CIDR, or a list), `port` (the remote port: number
    /// or "low-high", or a list), `local_port` (this machine's port, the same way: for inbound
    /// connections, the port connected to), `protocol` ("tcp", "udp", "icmp", "icmpv6", "any" or
    /// a number) and `direction` ("outbound", "inbound" or "any"). An inbound rule names the
    /// service it admits with `local_port` (`local_port = 22` for SSH): its `port` is the peer's
    /// source port. The first rule whose fields all match decides; if none does, the default
    /// does.
    CheckRules {
        /// The rules file to check.
        file: PathBuf,
    },
    /// Decide one connection against a rules file, and say which rule decided.
    ///
    /// For trying out a policy before `serve` uses it:
    /// `firewall decide --rules rules.toml --app 'C:\Windows\System32\curl.exe' --remote 192.0.2.7 --port 443`,
    /// or for an inbound connection to this machine's SSH server:
    /// `firewall decide --rules rules.toml --direction inbound --remote 10.1.2.3 --port 50123 --local-port 22`.
    Decide(DecideArgs),
    /// Run the whole firewall in the simulator: driver, service, and a scenario of connections.
    ///
    /// On a Linux or macOS host: boots a simulated machine, loads
    /// the firewall driver, starts `firewall serve` as its own process against it, replays a
    /// scenario of connection attempts (several programs; allowed, denied and unknown destinations;
    /// IPv4 and IPv6; a rules reload; the service killed and restarted) and prints each decision
    /// and a summary. Exits 1 if a decision differs from what the scenario expects.
    ///
    /// A trace file has one JSON object per line: {"step":"connect","pid":1200,"image":"\\Device\\HarddiskVolume3\\app.exe","protocol":"tcp","direction":"outbound","remote":"192.0.2.1:443","expect":"allow"},
    /// {"step":"reload","rules":"FILE"}, {"step":"kill-service"}, {"step":"start-service"} or
    /// {"step":"note","text":"..."}; see demo-trace.jsonl beside the service's Cargo.toml.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The rules file (TOML; see `firewall check-rules --help`).
    #[arg(long, value_name = "FILE", default_value = "rules.toml")]
    rules: PathBuf,
    /// Where to append the audit log (one JSON object per decision and line); `-` for standard
    /// output.
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    audit: PathBuf,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    volumes: VolumeArgs,
    /// How often to read the rules file for changes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    poll_ms: u64,
    /// The longest wait between two attempts to connect to the driver, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    max_backoff_ms: u64,
    /// How many threads wait for the driver's questions on its question channel.
    #[arg(long, value_name = "N", default_value_t = crate::serve::DEFAULT_ASK_THREADS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..64))]
    ask_threads: usize,
    /// How many wait requests each of them keeps pending on the channel (K).
    #[arg(long, value_name = "K", default_value_t = crate::serve::DEFAULT_ASK_OUTSTANDING, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..1024))]
    ask_outstanding: usize,
}

#[derive(Debug, Args)]
struct CacheArgs {
    /// How long the driver may reuse a verdict for the same program, remote endpoint and
    /// protocol (and, inbound, local port) without asking, in seconds; 0: never cache. An
    /// outbound verdict that a rule's `local_port` decides is never cached (each outbound
    /// connection has a fresh local port, which the driver's cache does not key on). The service remembers what it let
    /// the driver cache, to revoke it when the rules change; when that memory is full
    /// (--max-remembered) it answers without caching.
    #[arg(long, value_name = "N", default_value_t = crate::service::DEFAULT_CACHE_SECONDS,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_CACHE_SECONDS)))]
    cache_seconds: u32,
    /// How many cacheable verdicts the service remembers at most.
    #[arg(long, value_name = "N", default_value_t = crate::service::DEFAULT_MEMORY_CAPACITY)]
    max_remembered: usize,
}

impl CacheArgs {
    fn lifetime(&self) -> Option<CacheLifetime> {
        CacheLifetime::from_secs(self.cache_seconds).ok()
    }
}

#[derive(Debug, Args)]
struct VolumeArgs {
    /// Map an NT device to a drive letter, so that image paths like
    /// \Device\HarddiskVolume3\Windows\System32\curl.exe match rules written as
    /// C:\Windows\System32\curl.exe. Repeat for each volume. On Windows the drive letters'
    /// devices are mapped already (QueryDosDevice, when the command starts); these add to or
    /// replace them. Paths on unmapped devices are matched as the driver reports them.
    #[arg(long = "volume", value_name = r"\Device\NAME=LETTER", value_parser = parse_volume)]
    volumes: Vec<(String, char)>,
}

impl VolumeArgs {
    fn map(&self) -> VolumeMap {
        let mut map = crate::service::system_volumes();
        for (device, letter) in &self.volumes {
            map.insert(device, *letter);
        }
        map
    }
}

fn parse_volume(text: &str) -> Result<(String, char), String> {
    let (device, letter) = text.rsplit_once('=').ok_or_else(|| {
        format!(r"`{text}` is not DEVICE=LETTER (like \Device\HarddiskVolume3=C)")
    })?;
    let letter = letter.strip_suffix(':').unwrap_or(letter);
    let mut chars = letter.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() && !device.is_empty() => {
            Ok((device.to_owned(), c))
        }
        _ => Err(format!(
            r"`{text}` is not DEVICE=LETTER (like \Device\HarddiskVolume3=C)"
        )),
    }
}

#[derive(Debug, Args)]
struct DecideArgs {
    /// The rules file.
    #[arg(long, value_name = "FILE")]
    rules: PathBuf,
    /// The program's path: a DOS path, or an NT path mapped with --volume. Empty: unknown.
    #[arg(long, value_name = "PATH", default_value = "")]
    app: String,
    /// The remote address.
    #[arg(long, value_name = "ADDRESS")]
    remote: IpAddr,
    /// The remote port: the server's for an outbound connection, the peer's source port for an
    /// inbound one. Rules match it with `port`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    port: u16,
    /// This machine's port: the port connected to for an inbound connection, the source port for
    /// an outbound one. Rules match it with `local_port`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    local_port: u16,
    /// The protocol: tcp, udp, icmp, icmpv6, or a number.
    #[arg(long, value_name = "PROTOCOL", default_value = "tcp", value_parser = parse_protocol)]
    protocol: u8,
    /// outbound or inbound.
    #[arg(long, value_name = "DIRECTION", default_value = "outbound", value_parser = parse_direction)]
    direction: Direction,
    #[command(flatten)]
    volumes: VolumeArgs,
}

/// A protocol as the command line and trace files name it: `tcp`, `udp`, `icmp`, `icmpv6` (in
/// any case) or an IANA number.
pub(crate) fn parse_protocol(text: &str) -> Result<u8, String> {
    use firewall_protocol::ip_protocol::*;
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(TCP),
        "udp" => Ok(UDP),
        "icmp" => Ok(ICMP),
        "icmpv6" => Ok(ICMPV6),
        other => other
            .parse()
            .map_err(|_| format!("`{text}` is not tcp, udp, icmp, icmpv6 or 0 to 255")),
    }
}

fn parse_direction(text: &str) -> Result<Direction, String> {
    match text {
        "outbound" | "out" => Ok(Direction::Outbound),
        "inbound" | "in" => Ok(Direction::Inbound),
        _ => Err(format!("`{text}` is not outbound or inbound")),
    }
}

/// `firewall demo`'s options.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Replay the connection attempts in this JSON-lines file instead of the built-in scenario.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Use this rules file instead of the built-in demo policy.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Configure the driver to allow (instead of deny) connections it cannot get an answer for.
    #[arg(long)]
    fail_open: bool,
    /// Configure the driver to allow (instead of deny) new connections beyond its bound of
    /// pending questions (overload), whatever `--fail-open` says.
    #[arg(long)]
    permit_on_overload: bool,
    /// Keep the service's audit log in this file (otherwise it is removed with the demo's
    /// temporary directory).
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Also print the driver's debug output.
    #[arg(long)]
    verbose: bool,
    /// How the driver asks the service: `channel` (the question channel, the default) or
    /// `port` (the filter-manager port and a work item, the first design).
    #[arg(long, value_name = "DESIGN", default_value = "channel", value_parser = ["channel", "port"])]
    ask_via: String,
}

/// Runs the command line of this process, printing to standard output and standard error.
pub fn main() -> ExitCode {
    let code = run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    ExitCode::from(code)
}

/// Runs the command line `args` (the program name first), printing results to `out` and errors
/// to `err`; returns the exit code: 0 success, 1 failure (a bad rules file, a failed demo), 2 a
/// bad command line. `serve` returns only if it cannot start.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let text = error.render().to_string();
            // --help and --version are "errors" that succeed, and print to standard output.
            let code = if error.use_stderr() {
                let _ = write!(err, "{text}");
                2
            } else {
                let _ = write!(out, "{text}");
                0
            };
            return code;
        }
    };
    let code = match cli.command {
        Command::Serve(args) => run_serve(args, err),
        Command::CheckRules { file } => check_rules(&file, out, err),
        Command::Decide(args) => decide(&args, out, err),
        Command::Demo(args) => demo(&args, out, err),
    };
    let _ = out.flush();
    let _ = err.flush();
    code
}

fn run_serve(args: ServeArgs, err: &mut dyn Write) -> u8 {
    let mut options = ServeOptions::new(args.rules);
    options.audit = args.audit;
    options.cache = args.cache.lifetime();
    options.memory_capacity = args.cache.max_remembered;
    options.volumes = args.volumes.map();
    options.poll_interval = Duration::from_millis(args.poll_ms);
    options.max_backoff = Duration::from_millis(args.max_backoff_ms);
    options.ask_threads = args.ask_threads;
    options.ask_outstanding = args.ask_outstanding;
    let Err(error) = serve(options);
    let _ = writeln!(err, "firewall: {error}");
    1
}

fn check_rules(file: &std::path::Path, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match load_rules(file) {
        Ok(rules) => {
            let _ = writeln!(
                out,
                "{}: ok: {} rules, default {}",
                file.display(),
                rules.rules().len(),
                rules.default_action()
            );
            for (index, rule) in rules.rules().iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  {:>3}  line {:<4} {:<5}  {}",
                    index + 1,
                    rule.line,
                    rule.action.as_str(),
                    rule.name.as_deref().unwrap_or("(unnamed)")
                );
            }
            0
        }
        Err(error) => {
            let _ = writeln!(err, "{error}");
            1
        }
    }
}

fn decide(args: &DecideArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let rules = match load_rules(&args.rules) {
        Ok(rules) => rules,
        Err(error @ (LoadError::Read { .. } | LoadError::Rules(_))) => {
            let _ = writeln!(err, "{error}");
            return 1;
        }
    };
    let service = Service::new(
        rules,
        args.rules.display().to_string(),
        args.volumes.map(),
        None,
    );
    let (connection, verdict, by) = service.explain(
        &args.app,
        args.remote,
        args.port,
        args.local_port,
        args.protocol,
        args.direction,
    );
    let line = match service.rules().decide(&connection).by {
        firewall_rules::DecidedBy::Rule { index, .. } => {
            format!(", line {}", service.rules().rules()[index].line)
        }
        firewall_rules::DecidedBy::Default => String::new(),
    };
    let _ = writeln!(out, "{verdict} by {by}{line}");
    let _ = writeln!(
        out,
        "  app {}, remote {}, local port {}, protocol {}, {}",
        if connection.app.is_empty() {
            "(unknown)"
        } else {
            &connection.app
        },
        std::net::SocketAddr::new(connection.remote, connection.port),
        connection.local_port,
        crate::audit::protocol_name(connection.protocol)
            .map_or_else(|| connection.protocol.to_string(), str::to_owned),
        connection.direction
    );
    0
}

#[cfg(unix)]
fn demo(args: &DemoArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let options = crate::demo::DemoOptions {
        trace: args.trace.clone(),
        rules: args.rules.clone(),
        fail_open: args.fail_open,
        permit_on_overload: args.permit_on_overload,
        audit: args.audit.clone(),
        verbose: args.verbose,
        ask_via: match args.ask_via.as_str() {
            "port" => firewall_driver::AskVia::PortAndWorkItem,
            _ => firewall_driver::AskVia::Channel,
        },
        launcher: None,
    };
    match crate::demo::run(&options, out) {
        Ok(summary) if summary.unexpected.is_empty() && summary.problems.is_empty() => 0,
        Ok(_) => 1,
        Err(error) => {
            let _ = writeln!(err, "firewall: demo: {error}");
            1
        }
    }
}

#[cfg(not(unix))]
fn demo(args: &DemoArgs, _out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let _ = args;
    let _ = writeln!(
        err,
        "firewall: demo: the simulator demo runs on a Linux or macOS host (its bridge is a Unix \
         socket); on Windows, load the driver and run `firewall serve`"
    );
    1
}
