//! The README's first command must work: `cargo run -p sim-demo`, run here as a user would (in its
//! own target directory, so the nested cargo never waits for the lock of this `cargo test`), and
//! checked for what it reports.

#![cfg(any(not(windows), feature = "sim"))]

use std::path::Path;
use std::process::Command;

#[test]
fn the_readme_demo_runs_the_driver_and_shows_the_verifier_stop() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().unwrap_or(tmp).join("readme-demo");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["run", "--quiet", "-p", "sim-demo"])
        .output()
        .expect("cargo starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
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
