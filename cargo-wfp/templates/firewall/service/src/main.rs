//! `firewall`: the example firewall's user-mode service and its operator tools
//! (`firewall --help`).

fn main() -> std::process::ExitCode {
    firewall::cli::main()
}
