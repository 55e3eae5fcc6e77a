//! The README's first command must work: run the demo binary and check what it reports.

#![cfg(any(not(windows), feature = "sim"))]

use std::process::Command;

#[test]
fn demo_runs_the_driver_and_shows_the_verifier_stop() {
    let output = Command::new(env!("CARGO_BIN_EXE_sim-demo")).output().expect("the demo starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("100/100"), "{stdout}");
    assert!(stdout.contains("WORKER_THREAD_RETURNED_AT_BAD_IRQL 0x000000E1"), "{stdout}");
    assert!(
        stdout.contains("summary: driver loaded, 100/100 work items ran at PASSIVE_LEVEL, unload clean, verifier caught the bug"),
        "{stdout}"
    );
}
