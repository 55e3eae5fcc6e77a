//! The `firewall` command line, run as the built binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn firewall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_firewall"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A file in a fresh temporary directory for this test.
fn temp_file(test: &str, name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("firewall-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
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

#[test]
fn check_rules_summarises_a_good_file() {
    let path = temp_file("good", "rules.toml", GOOD);
    let out = firewall(&["check-rules", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}: ok: 3 rules, default deny\n    1  line 3    allow  dns\n    2  line 9    deny   (unnamed)\n    3  line 13   allow  curl\n",
            path.display()
        )
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn check_rules_reports_a_bad_file_with_line_and_column() {
    let bad = GOOD.replace("port = 53", "port = 70000");
    let path = temp_file("bad", "rules.toml", &bad);
    let out = firewall(&["check-rules", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        format!("{}:7:8: port out of range (0 to 65535)\n", path.display())
    );
}

#[test]
fn check_rules_reports_a_missing_file() {
    let out = firewall(&["check-rules", "/nonexistent/rules.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("/nonexistent/rules.toml: cannot read: "),
        "{stderr}"
    );
}

#[test]
fn the_shipped_demo_rules_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo-rules.toml");
    let out = firewall(&["check-rules", path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
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
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "allow by rule 3 \"curl\", line 13\n  app C:\\Windows\\System32\\curl.exe, remote 192.0.2.7:443, protocol tcp, outbound\n"
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
        text(&out.stdout),
        "allow by rule 1 \"dns\", line 3\n  app (unknown), remote [2001:db8::1]:53, protocol udp, inbound\n"
    );
    let out = firewall(&["decide", "--rules", rules, "--remote", "203.0.113.1"]);
    assert!(text(&out.stdout).starts_with("deny by rule 2, line 9\n"));
    let out = firewall(&["decide", "--rules", rules, "--remote", "198.51.100.1"]);
    assert!(text(&out.stdout).starts_with("deny by default\n"));
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
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("error:"), "{args:?}");
    }
}

#[test]
fn serve_refuses_to_start_with_a_bad_rules_file() {
    let path = temp_file("serve-bad", "rules.toml", "default = \"maybe\"\n");
    let out = firewall(&["serve", "--rules", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "firewall: {}:1:11: unknown default `maybe` (expected \"allow\" or \"deny\")\n",
            path.display()
        )
    );
}

#[test]
fn help_explains_every_command() {
    let out = firewall(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for command in ["serve", "check-rules", "decide", "demo"] {
        assert!(help.contains(command), "{help}");
    }
    let out = firewall(&["serve", "--help"]);
    let help = text(&out.stdout);
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
