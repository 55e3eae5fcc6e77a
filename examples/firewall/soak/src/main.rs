//! `firewall-soak`: the example firewall through a million connections with random faults, in
//! the simulator on real threads or, with `--deterministic`, on a deterministic machine
//! (`cargo xtask soak`; what it checks: `firewall_bench::soak`).

use std::process::ExitCode;

#[cfg(any(not(windows), feature = "sim"))]
mod cli;

#[cfg(any(not(windows), feature = "sim"))]
fn main() -> ExitCode {
    cli::main()
}

/// On a Windows host the simulator is built only with `--features sim`.
#[cfg(all(windows, not(feature = "sim")))]
fn main() -> ExitCode {
    eprintln!(
        "firewall-soak runs the firewall in the simulator: on Windows, build it with \
         `--features sim`"
    );
    ExitCode::from(2)
}
