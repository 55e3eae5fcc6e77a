//! The `firewall` command line, run as the built binary.

use std::path::PathBuf;

use super::{firewall, temp_dir};

/// A file in a fresh temporary directory for this test.
fn temp_file(test: &str, name: &str, contents: &str) -> PathBuf {
    let path = temp_dir(test).join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

const GOOD: &str = r#"default = "deny"

[[rule]]
name = "dns"
action = "allow"
protocol = "udp"
port = 53

[[rule]]
action = "deny"
remote = "203.0.113.0/24"

[[rule]]
name = "curl"
action = "allow"
app = '**\system32\curl.exe'
"#;

/// An inbound SSH rule, named by the local (listening) port.
const SSH: &str = r#"default = "deny"

[[rule]]
name = "ssh-in"
action = "allow"
direction = "inbound"
protocol = "tcp"
local_port = 22
remote = "10.0.0.0/8"
"#;

#[test]
fn check_rules_summarises_a_good_file() {
    let path = temp_file("good", "rules.toml", GOOD);
    let out = firewall(&["check-rules", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
    assert_eq!(
        out.stdout.clone(),
        format!(
            "{}: ok: 3 rules, default deny\n    1  line 3    allow  dns\n    2  line 9    deny   (unnamed)\n    3  line 13   allow  curl\n",
            path.display()
        )
    );
    assert_eq!(out.stderr.clone(), "");
}

#[test]
fn check_rules_reports_a_bad_file_with_line_and_column() {
    let bad = GOOD.replace("port = 53", "port = 70000");
    let path = temp_file("bad", "rules.toml", &bad);
    let out = firewall(&["check-rules", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert_eq!(out.stdout.clone(), "");
    assert_eq!(
        out.stderr.clone(),
        format!("{}:7:8: port out of range (0 to 65535)\n", path.display())
    );
}

#[test]
fn check_rules_reports_a_missing_file() {
    let out = firewall(&["check-rules", "/nonexistent/rules.toml"]);
    assert_eq!(out.code, Some(1));
    let stderr = out.stderr.clone();
    assert!(
        stderr.starts_with("/nonexistent/rules.toml: cannot read: "),
        "{stderr}"
    );
}

#[test]
fn the_shipped_demo_rules_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo-rules.toml");
    let out = firewall(&["check-rules", path]);
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
}

#[test]
fn decide_names_the_rule_that_decided() {
    let path = temp_file("decide", "rules.toml", GOOD);
    let rules = path.to_str().unwrap();
    let out = firewall(&[
        "decide",
        "--rules",
        rules,
        "--volume",
        r"\Device\HarddiskVolume3=C:",
        "--app",
        r"\Device\HarddiskVolume3\Windows\System32\curl.exe",
        "--remote",
        "192.0.2.7",
        "--port",
        "443",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
    assert_eq!(
        out.stdout.clone(),
        "allow by rule 3 \"curl\", line 13\n  app C:\\Windows\\System32\\curl.exe, remote 192.0.2.7:443, local port 0, protocol tcp, outbound\n"
    );
    let out = firewall(&[
        "decide",
        "--rules",
        rules,
        "--remote",
        "2001:db8::1",
        "--port",
        "53",
        "--protocol",
        "17",
        "--direction",
        "inbound",
    ]);
    assert_eq!(
        out.stdout.clone(),
        "allow by rule 1 \"dns\", line 3\n  app (unknown), remote [2001:db8::1]:53, local port 0, protocol udp, inbound\n"
    );
    let out = firewall(&["decide", "--rules", rules, "--remote", "203.0.113.1"]);
    assert!(out.stdout.clone().starts_with("deny by rule 2, line 9\n"));
    let out = firewall(&["decide", "--rules", rules, "--remote", "198.51.100.1"]);
    assert!(out.stdout.clone().starts_with("deny by default\n"));
}

#[test]
fn decide_matches_local_port_against_the_local_port() {
    let path = temp_file("decide-local-port", "rules.toml", SSH);
    let rules = path.to_str().unwrap();
    let inbound = |port: &str, local_port: &str| {
        firewall(&[
            "decide",
            "--rules",
            rules,
            "--direction",
            "inbound",
            "--remote",
            "10.1.2.3",
            "--port",
            port,
            "--local-port",
            local_port,
        ])
    };
    let out = inbound("50123", "22");
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
    assert_eq!(
        out.stdout.clone(),
        "allow by rule 1 \"ssh-in\", line 3\n  app (unknown), remote 10.1.2.3:50123, local port 22, protocol tcp, inbound\n"
    );
    // A peer whose source port is 22, to another local port, is not SSH.
    assert_eq!(
        inbound("22", "50123").stdout.clone(),
        "deny by default\n  app (unknown), remote 10.1.2.3:22, local port 50123, protocol tcp, inbound\n"
    );
    let out = firewall(&["decide", "--help"]);
    assert!(
        out.stdout.clone().contains("--local-port"),
        "{}",
        out.stdout.clone()
    );
}

#[test]
fn check_rules_reports_a_bad_local_port() {
    let path = temp_file(
        "bad-local-port",
        "rules.toml",
        &SSH.replace("local_port = 22", "local_port = \"2222-22\""),
    );
    let out = firewall(&["check-rules", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.clone(),
        format!(
            "{}:8:14: local_port range 2222-22 is reversed\n",
            path.display()
        )
    );
    let out = firewall(&["check-rules", "--help"]);
    assert!(
        out.stdout.clone().contains("`local_port`"),
        "{}",
        out.stdout.clone()
    );
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["serve", "--cache-seconds", "86401"][..],
        &["serve", "--volume", "C"],
        &["serve", "--volume", r"\Device\HarddiskVolume3=CD"],
        &[
            "decide",
            "--rules",
            "x",
            "--remote",
            "1.2.3.4",
            "--protocol",
            "sctp",
        ],
        &["frobnicate"],
    ] {
        let out = firewall(args);
        assert_eq!(out.code, Some(2), "{args:?}");
        assert!(out.stderr.clone().contains("error:"), "{args:?}");
    }
}

#[test]
fn serve_refuses_to_start_with_a_bad_rules_file() {
    let path = temp_file("serve-bad", "rules.toml", "default = \"maybe\"\n");
    let out = firewall(&["serve", "--rules", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.clone(),
        format!(
            "firewall: {}:1:11: unknown default `maybe` (expected \"allow\" or \"deny\")\n",
            path.display()
        )
    );
}

#[test]
fn help_explains_every_command() {
    let out = firewall(&["--help"]);
    assert_eq!(out.code, Some(0));
    let help = out.stdout.clone();
    for command in ["serve", "check-rules", "decide", "demo"] {
        assert!(help.contains(command), "{help}");
    }
    let out = firewall(&["serve", "--help"]);
    let help = out.stdout.clone();
    for option in [
        "--rules",
        "--audit",
        "--cache-seconds",
        "--volume",
        "--poll-ms",
    ] {
        assert!(help.contains(option), "{help}");
    }
    assert!(help.contains("WFP_RS_SIM_SOCKET"), "{help}");
}
