//! `firewall demo`, run as the built binary: the driver in the simulator, the service as its own
//! process, and the built-in scenario or a trace.

#![cfg(unix)]

use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_firewall"))
        .arg("demo")
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The table row of attempt `n`.
fn row(stdout: &str, n: usize) -> &str {
    let prefix = format!("{n:>5}  ");
    stdout
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row {n} in:\n{stdout}"))
}

#[test]
fn the_builtin_scenario_decides_as_expected() {
    let out = demo(&[]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("every decision was the expected one"),
        "{stdout}"
    );
    assert!(stdout.contains("the driver unloaded cleanly"), "{stdout}");
    // Asked, cached, denied by a rule, IPv6, inbound default then cache, no service.
    assert!(row(&stdout, 1).contains("allow    service: rule 3 \"browser-web\""));
    assert!(row(&stdout, 2).contains("allow    driver cache: rule 3 \"browser-web\""));
    assert!(row(&stdout, 5).contains("[2001:db8:bad::1]:80"));
    assert!(row(&stdout, 5).contains("deny     service: rule 2 \"block-trackers\""));
    assert!(row(&stdout, 14).contains("deny     driver default (asked in the background: allow"));
    assert!(row(&stdout, 15).contains("allow    driver cache: rule 6 \"lan-in\""));
    assert!(
        stdout.contains(
            ":8:10: `192.0.2.300` is not an IP address or CIDR; the policy in force stays"
        )
    );
    assert!(row(&stdout, 23).contains("deny     driver default (no service)"));
    assert!(row(&stdout, 25).contains("allow    service: rule 5 \"updater\""));
    assert!(
        stdout.contains("25 attempts: 16 allowed, 9 denied"),
        "{stdout}"
    );
}

#[test]
fn fail_open_lets_through_what_nobody_answered() {
    let out = demo(&["--fail-open"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("fail-open"));
    assert!(
        row(&stdout, 14).contains("allow    driver default"),
        "{stdout}"
    );
    assert!(
        row(&stdout, 23).contains("allow    driver default (no service)"),
        "{stdout}"
    );
}

#[test]
fn the_sample_trace_replays() {
    let trace = concat!(env!("CARGO_MANIFEST_DIR"), "/demo-trace.jsonl");
    let out = demo(&["--trace", trace]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("every decision was the expected one"),
        "{stdout}"
    );
    assert!(
        row(&stdout, 9).contains("deny     service: default"),
        "{stdout}"
    );
}

#[test]
fn a_bad_trace_line_is_reported_with_its_line() {
    let dir = std::env::temp_dir().join(format!("firewall-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "# comment\n\n{\"step\":\"connect\",\"pid\":1,\"remote\":\"192.0.2.1:1\",\"protocol\":\"sctp\"}\n",
    )
    .unwrap();
    let out = demo(&["--trace", trace.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "firewall: demo: {}:3: protocol `sctp` is not tcp, udp, icmp, icmpv6 or 0 to 255\n",
            trace.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_expectation_that_fails_fails_the_demo() {
    let dir = std::env::temp_dir().join(format!("firewall-demo-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"step\":\"connect\",\"pid\":1,\"remote\":\"203.0.113.1:443\",\"expect\":\"allow\"}\n",
    )
    .unwrap();
    let out = demo(&["--trace", trace.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(row(&stdout, 1).contains("<< expected allow"), "{stdout}");
    assert!(
        stdout.contains("UNEXPECTED decisions at attempts [1]"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
