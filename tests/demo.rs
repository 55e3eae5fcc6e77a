//! The README's demos must work: `cargo run --release -p firewall -- demo` (its first command) and
//! `cargo run -p sim-demo`, each run here as a user would (in its own target directory, so the
//! nested cargo never waits for the lock of this `cargo test`), and checked for what it reports.

#![cfg(any(not(windows), feature = "sim"))]

use std::path::Path;
use std::process::Command;

/// Runs `cargo <args>` from the workspace root with its own target directory `name`; returns
/// standard output after checking that it succeeded.
fn cargo_run(name: &str, args: &[&str]) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().unwrap_or(tmp).join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(args)
        .output()
        .expect("cargo starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`cargo {}` failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        args.join(" ")
    );
    stdout
}

#[test]
fn the_readme_first_command_runs_the_firewall_demo() {
    let stdout = cargo_run(
        "readme-firewall-demo",
        &[
            "run",
            "--quiet",
            "--release",
            "-p",
            "firewall",
            "--",
            "demo",
        ],
    );
    for expected in [
        // The default design, named on each row the service decided and in the summary.
        "service (channel): rule",
        "the service's answers reached the driver through the question channel",
        "driver cache:",
        "driver default (no service)",
        "[2001:db8::10]:443",
        "is not an IP address or CIDR; the policy in force stays",
        "every decision was the expected one",
        "the driver unloaded cleanly: no pool left, no pended connection left",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}:\n{stdout}");
    }
}

#[test]
fn the_readme_demo_runs_the_driver_and_shows_the_verifier_stop() {
    let stdout = cargo_run("readme-demo", &["run", "--quiet", "-p", "sim-demo"]);
    assert!(
        stdout.contains("work items from DISPATCH_LEVEL run at PASSIVE 100/100"),
        "{stdout}"
    );
    assert!(
        stdout.contains("WORKER_THREAD_RETURNED_AT_BAD_IRQL 0x000000E1"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "summary: driver loaded, 100/100 work items ran at PASSIVE_LEVEL, unload clean, verifier caught the bug"
        ),
        "{stdout}"
    );
}
