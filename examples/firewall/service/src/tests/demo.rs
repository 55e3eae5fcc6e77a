//! `firewall demo`, run as the built binary: the driver in the simulator, the service as its own
//! process, and the built-in scenario or a trace.

use std::sync::Mutex;

use crate::demo::{DemoOptions, Summary, run};

/// The demo's driver configuration and counters are process-wide: one demo at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the demo in this process (its service in a child process); what it printed, and how it
/// ended.
fn demo(options: DemoOptions) -> (String, Result<Summary, String>) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let options = DemoOptions {
        launcher: Some(super::launcher),
        ..options
    };
    let mut out = Vec::new();
    let result = run(&options, &mut out);
    let out = String::from_utf8(out).unwrap();
    eprintln!("{out}");
    (out, result)
}

/// Whether the run succeeded as the `firewall demo` command judges it.
fn passed(result: &Result<Summary, String>) -> bool {
    result
        .as_ref()
        .is_ok_and(|s| s.unexpected.is_empty() && s.problems.is_empty())
}

/// The table row of attempt `n`.
fn row(stdout: &str, n: usize) -> &str {
    let prefix = format!("{n:>5}  ");
    stdout
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row {n} in:\n{stdout}"))
}

/// `--ask-via port`: the same scenario, the same decisions, on the port + work item design; the
/// rows and the summary say which design decided.
#[test]
fn the_port_design_decides_the_same_and_says_so() {
    let (stdout, result) = demo(DemoOptions {
        ask_via: firewall_driver::AskVia::PortAndWorkItem,
        ..DemoOptions::default()
    });
    assert!(passed(&result), "{result:?}\n{stdout}");
    assert!(
        stdout.contains("every decision was the expected one"),
        "{stdout}"
    );
    assert!(
        stdout.contains("asking through the port and a work item"),
        "{stdout}"
    );
    assert!(row(&stdout, 1).contains("allow    service (port): rule 3 \"browser-web\""));
    assert!(
        stdout
            .contains("the service's answers reached the driver through the port and a work item"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(0 through the question channel,"),
        "{stdout}"
    );
}

#[test]
fn the_builtin_scenario_decides_as_expected() {
    let (stdout, result) = demo(DemoOptions::default());
    assert!(passed(&result), "{result:?}\n{stdout}");
    assert!(
        stdout.contains("every decision was the expected one"),
        "{stdout}"
    );
    assert!(stdout.contains("the driver unloaded cleanly"), "{stdout}");
    assert!(
        stdout.contains("the service's answers reached the driver through the question channel"),
        "{stdout}"
    );
    assert!(
        stdout.contains("through the port and a work item), "),
        "{stdout}"
    );
    // The service answered through the restriction to its own identity (Linux: the bridge
    // tells its peers apart there).
    assert_eq!(
        stdout.contains("only the service's process (per-service SID S-1-5-80-"),
        cfg!(target_os = "linux"),
        "{stdout}"
    );
    // Asked, cached, denied by a rule, IPv6, inbound asked (first attempt) then cache, no
    // service.
    assert!(row(&stdout, 1).contains("allow    service (channel): rule 3 \"browser-web\""));
    assert!(row(&stdout, 2).contains("allow    driver cache: rule 3 \"browser-web\""));
    assert!(row(&stdout, 5).contains("[2001:db8:bad::1]:80"));
    assert!(row(&stdout, 5).contains("deny     service (channel): rule 2 \"block-trackers\""));
    assert!(row(&stdout, 14).contains("allow    service (channel): rule 6 \"lan-in\""));
    assert!(row(&stdout, 15).contains("allow    driver cache: rule 6 \"lan-in\""));
    assert!(
        stdout.contains(
            ":8:10: `192.0.2.300` is not an IP address or CIDR; the policy in force stays"
        )
    );
    assert!(row(&stdout, 23).contains("deny     driver default (no service)"));
    assert!(row(&stdout, 25).contains("allow    service (channel): rule 5 \"updater\""));
    // With the driver's control device, the reload revokes the cached allow, and the restarted
    // service has every cached verdict revoked.
    assert!(
        stdout.contains("revoked 1 cached verdicts (1 entries removed)"),
        "{stdout}"
    );
    assert!(row(&stdout, 18).contains("deny     driver cache: rule 1 \"quarantine-192.0.2.10\""));
    assert!(row(&stdout, 24).contains("allow    service (channel): rule 4 \"browser-web\""));
    // Connections held open meet the new rules: the quarantined one is kept while the service
    // is asked, and its next packet is dropped; the other flows (its verdict was not revoked).
    // The new attempt to the quarantined address then meets the deny in the cache (row 18).
    assert!(
        stdout.contains(
            "[demo] the browser's tab (C:\\Program Files\\Browser\\browser.exe -> 192.0.2.10:443) sends: cut: packet 2 dropped"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "[demo] curl's download (C:\\Windows\\System32\\curl.exe -> 10.1.2.3:8080) sends: flows"
        ),
        "{stdout}"
    );
    let summary = result.unwrap();
    assert_eq!(
        (
            summary.attempts,
            summary.allowed,
            summary.denied,
            summary.cut
        ),
        (25, 15, 10, 1),
        "{stdout}"
    );
}

#[test]
fn fail_open_lets_through_what_nobody_answered() {
    let (stdout, result) = demo(DemoOptions {
        fail_open: true,
        ..DemoOptions::default()
    });
    assert!(passed(&result), "{result:?}\n{stdout}");
    assert!(stdout.contains("fail-open"));
    // Fail-open is the answer to "no answer", not to overload.
    assert!(stdout.contains("then deny on overload)"), "{stdout}");
    assert!(stdout.contains(", 0 overloaded"), "{stdout}");
    assert_eq!(result.as_ref().map(|s| s.by_overload).ok(), Some(0));
    // An inbound first attempt is asked like an outbound one, fail-open or not.
    assert!(
        row(&stdout, 14).contains("allow    service (channel): rule 6 \"lan-in\""),
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
    let (stdout, result) = demo(DemoOptions {
        trace: Some(trace.into()),
        ..DemoOptions::default()
    });
    assert!(passed(&result), "{result:?}\n{stdout}");
    assert!(
        stdout.contains("every decision was the expected one"),
        "{stdout}"
    );
    assert!(
        row(&stdout, 9).contains("deny     service (channel): default"),
        "{stdout}"
    );
}

#[test]
fn a_bad_trace_line_is_reported_with_its_line() {
    let dir = super::temp_dir("bad-trace");
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "# comment\n\n{\"step\":\"connect\",\"pid\":1,\"remote\":\"192.0.2.1:1\",\"protocol\":\"sctp\"}\n",
    )
    .unwrap();
    let (_, result) = demo(DemoOptions {
        trace: Some(trace.clone()),
        ..DemoOptions::default()
    });
    assert_eq!(
        result.unwrap_err(),
        format!(
            "{}:3: protocol `sctp` is not tcp, udp, icmp, icmpv6 or 0 to 255",
            trace.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_expectation_that_fails_fails_the_demo() {
    let dir = super::temp_dir("failing-trace");
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"step\":\"connect\",\"pid\":1,\"remote\":\"203.0.113.1:443\",\"expect\":\"allow\"}\n",
    )
    .unwrap();
    let (stdout, result) = demo(DemoOptions {
        trace: Some(trace),
        ..DemoOptions::default()
    });
    assert!(!passed(&result), "{stdout}");
    assert_eq!(result.unwrap().unexpected, vec![1]);
    assert!(row(&stdout, 1).contains("<< expected allow"), "{stdout}");
    assert!(
        stdout.contains("UNEXPECTED decisions at attempts [1]"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
