//! The command line of `firewall-soak` (see `main.rs`).

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use firewall_bench::soak::{self, SoakConfig};
use firewall_driver::AskVia;

/// The driver's design to soak.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Design {
    /// The question channel (the inverted call), the firewall's default.
    Channel,
    /// Work items asking over the filter-manager port.
    Port,
}

/// Drives the example firewall through many connections with random faults (garbage replies,
/// stalls past the timeout, the service killed and restarted, allocation failures) and checks
/// every decision and that nothing is left after unload.
#[derive(Parser, Debug)]
#[command(name = "firewall-soak")]
struct Args {
    /// How many connections.
    #[arg(long, default_value_t = 1_000_000)]
    connections: u64,
    /// The seed (decimal or 0x-hex); a new one each run if not given.
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Threads opening connections.
    #[arg(long, default_value_t = 4)]
    clients: u64,
    /// Connections per phase (one phase in five has allocation failures; the service's
    /// answers are checked after each).
    #[arg(long, default_value_t = soak::PHASE, value_parser = clap::value_parser!(u64).range(1..))]
    phase: u64,
    /// How the driver asks the service.
    #[arg(long, value_enum, default_value_t = Design::Channel)]
    design: Design,
    /// Run on a deterministic machine: the seed schedules every context and time is virtual,
    /// so the same seed replays the same run.
    #[arg(long)]
    deterministic: bool,
}

fn parse_seed(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("not a seed: {e}"))
}

/// Parses the command line, runs the soak, prints its report or why it failed.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let config = SoakConfig {
        connections: args.connections,
        seed,
        clients: args.clients,
        phase: args.phase,
        design: match args.design {
            Design::Channel => AskVia::Channel,
            Design::Port => AskVia::PortAndWorkItem,
        },
        deterministic: args.deterministic,
    };
    let tenth = (args.connections / 10).max(1);
    let progress = |done: u64| {
        if done % tenth < args.phase || done == args.connections {
            eprintln!("soak: {done} of {} connections", args.connections);
        }
    };
    match soak::run(config, &progress) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("{failure}");
            let replay = soak::replay_command(&config);
            if config.deterministic {
                eprintln!("replay: {replay}");
            } else {
                eprintln!(
                    "rerun with: {replay} (the seed fixes the connections and the faults, not \
                     the host's thread scheduling; add --deterministic for a run that replays)"
                );
            }
            ExitCode::FAILURE
        }
    }
}
