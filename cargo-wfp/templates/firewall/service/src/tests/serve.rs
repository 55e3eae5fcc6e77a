//! `firewall serve` as its own process against a simulated machine: a test driver creates the
//! firewall's port and a stand-in for its control device, sends requests, and checks the
//! replies, the revocations, the log and the audit file.
//!
//! Nothing here depends on timing to pass: the test waits for lines the service logs and for
//! requests to be pending at the driver; timeouts only bound those waits.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use crate::audit::AuditRecord;
use firewall_protocol::control::{
    CONTROL_DEVICE_NAME, REVOKE, REVOKE_ALL, REVOKE_MAGIC, REVOKED_LEN, Revoked,
};
use firewall_protocol::{
    CacheLifetime, ConnectionReply, ConnectionRequest, Direction, FirewallProtocol, PORT_NAME,
    Verdict, ip_protocol,
};
use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::inverted::InvertedQueue;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::port::{Filter, SendError, ServerPort};
use wfp_rs::user::SIM_SOCKET_VARIABLE;
use wfp_rs_sim::{LoadedDriver, Machine, UserModeBridge};

/// Bounds waits that end by themselves when the code is right.
const LONG: Duration = Duration::from_secs(60);

mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// Kills the service when the test ends, however it ends.
struct Service {
    child: Child,
    log: Receiver<String>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start(socket: &Path, rules: &Path, audit: &Path) -> Service {
        let args: Vec<&OsStr> = vec![
            "serve".as_ref(),
            "--cache-seconds".as_ref(),
            "60".as_ref(),
            "--poll-ms".as_ref(),
            "10".as_ref(),
            "--max-backoff-ms".as_ref(),
            "20".as_ref(),
            "--rules".as_ref(),
            rules.as_os_str(),
            "--audit".as_ref(),
            audit.as_os_str(),
            "--volume".as_ref(),
            r"\Device\HarddiskVolume3=C".as_ref(),
        ];
        let mut child = super::firewall_command(&args)
            .env(SIM_SOCKET_VARIABLE, socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[service] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service { child, log }
    }

    /// Waits for a log line containing `expected`; returns it.
    fn wait_for(&self, expected: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(expected) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("the service never logged {expected:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the service ended before logging {expected:?}")
                }
            }
        }
    }
}

/// The simulated machine, a driver with the firewall's port and a control device whose revoke
/// requests the test answers by hand (an inverted-call queue for the REVOKE code).
struct Fixture {
    machine: Machine,
    driver: Option<LoadedDriver>,
    filter: Option<Filter>,
    port: Option<ServerPort<FirewallProtocol>>,
    control: Option<InvertedQueue>,
    bridge: Option<UserModeBridge>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let machine = Machine::new();
        let driver = machine.load_driver("firewall", plain::DriverEntry).unwrap();
        let (filter, control) = driver
            .run_in_driver(&machine, |irql, d| {
                let filter = Filter::register(irql, d)?;
                let control =
                    InvertedQueue::new(irql, d, CONTROL_DEVICE_NAME, REVOKE, REVOKED_LEN)?;
                Ok::<_, Status>((filter, control))
            })
            .unwrap()
            .unwrap();
        let dir =
            std::env::temp_dir().join(format!("firewall-serve-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("bridge.sock");
        let bridge = machine.serve_user_mode(&socket).unwrap();
        let mut fixture = Fixture {
            machine,
            driver: Some(driver),
            filter: Some(filter),
            port: None,
            control: Some(control),
            bridge: Some(bridge),
            socket,
            dir,
        };
        fixture.open_port();
        fixture
    }

    fn open_port(&mut self) {
        let filter = self.filter.as_ref().unwrap();
        let port = self
            .machine
            .at_passive(|irql| ServerPort::create(irql, filter, PORT_NAME, 1, ()))
            .unwrap();
        self.port = Some(port);
    }

    /// Closes the port the way an unloading driver's filter does: its clients are
    /// disconnected (closing the server port alone only stops new connections).
    fn close_port(&mut self) {
        let port = self.port.take().unwrap();
        self.machine.at_passive(|irql| {
            assert_eq!(port.disconnect_all(irql), 1);
            port.close(irql);
        });
    }

    fn ask(&self, request: &ConnectionRequest) -> Result<ConnectionReply, SendError> {
        let port = self.port.as_ref().unwrap();
        self.machine
            .at_passive(|irql| port.send(irql, request, LONG))
    }

    /// Waits for the service's next revoke request and answers that `removed` entries went;
    /// returns its flags.
    fn answer_revoke(&self, removed: u32) -> u16 {
        let control = self.control.as_ref().unwrap();
        let deadline = Instant::now() + LONG;
        while self.machine.at_dispatch(|irql| control.waiting(irql)) == 0 {
            assert!(Instant::now() < deadline, "no revoke request came");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut flags = None;
        self.machine
            .at_dispatch(|irql| {
                control.complete_next_with(irql, |buffer| {
                    // METHOD_BUFFERED: the output buffer (REVOKED_LEN bytes) starts as the
                    // first bytes of the input: magic, version, flags.
                    assert_eq!(buffer[..4], REVOKE_MAGIC);
                    assert_eq!(buffer[4..6], 1u16.to_le_bytes());
                    flags = Some(u16::from_le_bytes([buffer[6], buffer[7]]));
                    buffer[..REVOKED_LEN].copy_from_slice(&Revoked { removed }.to_bytes());
                    REVOKED_LEN
                })
            })
            .ok()
            .unwrap();
        flags.unwrap()
    }

    /// Waits for the service's next revoke request and fails it: the driver answers nothing
    /// (an empty output, which `Revoked::decode` refuses). Returns its flags.
    fn fail_revoke(&self) -> u16 {
        let control = self.control.as_ref().unwrap();
        self.wait_for_revoke_request();
        let mut flags = None;
        self.machine
            .at_dispatch(|irql| {
                control.complete_next_with(irql, |buffer| {
                    flags = Some(u16::from_le_bytes([buffer[6], buffer[7]]));
                    0
                })
            })
            .ok()
            .unwrap();
        flags.unwrap()
    }

    /// Waits until a revoke request is waiting at the control device.
    fn wait_for_revoke_request(&self) {
        let control = self.control.as_ref().unwrap();
        let deadline = Instant::now() + LONG;
        while self.machine.at_dispatch(|irql| control.waiting(irql)) == 0 {
            assert!(Instant::now() < deadline, "no revoke request came");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many revoke requests are waiting at the control device.
    fn revoke_requests_waiting(&self) -> usize {
        let control = self.control.as_ref().unwrap();
        self.machine.at_dispatch(|irql| control.waiting(irql))
    }

    fn finish(mut self) {
        drop(self.bridge.take());
        let driver = self.driver.take().unwrap();
        let (port, filter, control) = (self.port.take(), self.filter.take(), self.control.take());
        driver.run_in_driver(&self.machine, |irql, _| {
            if let Some(port) = port {
                port.close(irql);
            }
            filter.unwrap().close(irql);
            control.unwrap().close(irql);
        });
        self.machine.unload_driver(driver).unwrap();
        assert!(self.machine.pool_blocks().is_empty());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(id: u64, image: &str, remote: &str, port: u16, protocol: u8) -> ConnectionRequest {
    let remote: IpAddr = remote.parse().unwrap();
    ConnectionRequest {
        request_id: id,
        process_id: 100 + id,
        direction: Direction::Outbound,
        ip_protocol: protocol,
        local_address: if remote.is_ipv4() {
            "10.0.0.2".parse().unwrap()
        } else {
            "fd00::2".parse().unwrap()
        },
        local_port: 40_000,
        remote_address: remote,
        remote_port: port,
        image_path: image.parse().unwrap(),
    }
}

const CURL: &str = r"\Device\HarddiskVolume3\Windows\System32\curl.exe";

const RULES: &str = r#"default = "deny"

[[rule]]
name = "curl"
action = "allow"
app = '**\system32\curl.exe'
port = 443
"#;

const RULES_NO_CURL: &str = r#"default = "deny"

[[rule]]
name = "curl-lan-only"
action = "allow"
app = '**\system32\curl.exe'
remote = "10.0.0.0/8"
port = 443
"#;

/// Replaces the rules file in one step, so the service (polling every 10 ms) never reads it
/// half written.
fn write_rules(path: &Path, text: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

fn sixty() -> Option<CacheLifetime> {
    Some(CacheLifetime::from_secs(60).unwrap())
}

#[test]
fn serve_answers_reloads_revokes_and_reconnects() {
    let mut fixture = Fixture::new("e2e");
    let rules = fixture.dir.join("rules.toml");
    let audit = fixture.dir.join("audit.jsonl");
    std::fs::write(&rules, RULES).unwrap();
    let service = Service::start(&fixture.socket, &rules, &audit);

    // At start the service has every cached verdict revoked.
    assert_eq!(fixture.answer_revoke(3), REVOKE_ALL);
    service.wait_for("revoked every cached verdict (3 entries)");
    service.wait_for("serving \\WfpRsFirewallPort");

    let curl = request(1, CURL, "192.0.2.7", 443, ip_protocol::TCP);
    let reply = fixture.ask(&curl).unwrap();
    assert_eq!(
        (reply.request_id, reply.verdict, reply.cache),
        (1, Verdict::Allow, sixty())
    );
    let v6 = request(2, CURL, "2001:db8::7", 80, ip_protocol::TCP);
    let reply = fixture.ask(&v6).unwrap();
    assert_eq!((reply.verdict, reply.cache), (Verdict::Deny, sixty()));

    // A bad file: said where, and the policy in force stays.
    write_rules(&rules, &RULES.replace("port = 443", "port = 443443"));
    let line = service.wait_for("the policy in force stays");
    assert_eq!(
        line,
        format!(
            "firewall: {}:7:8: port out of range (0 to 65535); the policy in force stays",
            rules.display()
        )
    );
    let reply = fixture.ask(&request(3, CURL, "192.0.2.8", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Allow);

    // A good file that changes curl's verdicts: both of them (ids 1 and 3) are revoked.
    write_rules(&rules, RULES_NO_CURL);
    assert_eq!(fixture.answer_revoke(2), 0, "a revoke of request ids");
    service.wait_for("reloaded");
    service.wait_for("revoked 2 cached verdicts (2 entries removed)");
    let reply = fixture.ask(&request(4, CURL, "192.0.2.7", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Deny);
    let reply = fixture.ask(&request(5, CURL, "10.1.1.1", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Allow);

    // The port goes away (the driver is restarting, say) and comes back: the service
    // reconnects and revokes everything again.
    fixture.close_port();
    service.wait_for("lost \\WfpRsFirewallPort");
    fixture.open_port();
    assert_eq!(fixture.answer_revoke(0), REVOKE_ALL);
    service.wait_for("serving \\WfpRsFirewallPort");
    let reply = fixture.ask(&request(6, "", "10.1.1.1", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Deny);

    // The longest path there is crosses whole (a 65608-byte request) and is matched whole:
    // the rule names the file at its end.
    let prefix = r"\Device\HarddiskVolume3";
    let file = r"\System32\curl.exe";
    let longest_curl = format!(
        "{prefix}{}{file}",
        "x".repeat(firewall_protocol::MAX_PATH_UNITS - prefix.len() - file.len())
    );
    let longest = request(7, &longest_curl, "10.1.1.1", 443, 6);
    assert_eq!(
        firewall_protocol::request_len(longest.image_path.len()),
        firewall_protocol::REQUEST_MAX_LEN
    );
    let reply = fixture.ask(&longest).unwrap();
    assert_eq!(reply.verdict, Verdict::Allow);
    let other = longest_curl.replace("curl.exe", "cur1.exe");
    let reply = fixture
        .ask(&request(8, &other, "10.1.1.1", 443, 6))
        .unwrap();
    assert_eq!(reply.verdict, Verdict::Deny);

    drop(service);
    let records: Vec<AuditRecord> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let summary: Vec<(u64, &str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.request_id,
                r.verdict.as_str(),
                r.decided_by.as_str(),
                r.remote.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "allow", "rule 1 \"curl\"", "192.0.2.7:443"),
            (2, "deny", "default", "[2001:db8::7]:80"),
            (3, "allow", "rule 1 \"curl\"", "192.0.2.8:443"),
            (4, "deny", "default", "192.0.2.7:443"),
            (5, "allow", "rule 1 \"curl-lan-only\"", "10.1.1.1:443"),
            (6, "deny", "default", "10.1.1.1:443"),
            (7, "allow", "rule 1 \"curl-lan-only\"", "10.1.1.1:443"),
            (8, "deny", "default", "10.1.1.1:443"),
        ]
    );
    assert_eq!(records[6].image, longest_curl);
    assert_eq!(records[0].image_dos, r"C:\Windows\System32\curl.exe");
    assert_eq!(records[0].pid, 101);
    assert!(records.iter().all(|r| r.cache_seconds == 60));
    fixture.finish();
}

#[test]
fn without_a_control_device_the_service_serves_and_says_so() {
    let mut fixture = Fixture::new("nocontrol");
    let control = fixture.control.take().unwrap();
    fixture.machine.at_passive(|irql| control.close(irql));
    let rules = fixture.dir.join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let service = Service::start(&fixture.socket, &rules, Path::new("-"));
    service.wait_for("cannot open the control device \\\\.\\WfpRsFirewall");
    service.wait_for("serving");
    let reply = fixture.ask(&request(1, CURL, "192.0.2.7", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Allow);
    drop(service);
    fixture.control = Some(
        fixture
            .driver
            .as_ref()
            .unwrap()
            .run_in_driver(&fixture.machine, |irql, d| {
                InvertedQueue::new(irql, d, CONTROL_DEVICE_NAME, REVOKE, REVOKED_LEN)
            })
            .unwrap()
            .unwrap(),
    );
    fixture.finish();
}

/// Curl allowed only to 192.168.0.0/16: its verdicts for `10.0.0.0/8` change.
const RULES_CURL_ELSEWHERE: &str = r#"default = "deny"

[[rule]]
name = "curl-elsewhere"
action = "allow"
app = '**\system32\curl.exe'
remote = "192.168.0.0/16"
port = 443
"#;

/// No revocation is lost (issue 11, point 8): a revoke request the driver fails is kept and
/// sent again until the driver confirms it; a service killed between a reload and its revoke
/// has, once restarted, every cached verdict revoked (retried until confirmed), so no verdict
/// the reload changed outlives the revoke-all.
#[test]
fn revocations_survive_a_failed_request_and_a_killed_service() {
    let fixture = Fixture::new("revoke-retry");
    let rules = fixture.dir.join("rules.toml");
    let audit = fixture.dir.join("audit.jsonl");
    std::fs::write(&rules, RULES).unwrap();
    let service = Service::start(&fixture.socket, &rules, &audit);
    assert_eq!(fixture.answer_revoke(0), REVOKE_ALL);
    service.wait_for("serving \\WfpRsFirewallPort");
    let reply = fixture.ask(&request(1, CURL, "192.0.2.7", 443, 6)).unwrap();
    assert_eq!((reply.verdict, reply.cache), (Verdict::Allow, sixty()));

    // The reload's revoke fails: the id is kept and sent again.
    write_rules(&rules, RULES_NO_CURL);
    service.wait_for("1 cached verdicts to revoke");
    assert_eq!(fixture.fail_revoke(), 0, "a revoke of request ids");
    service.wait_for("revoking 1 cached verdicts not confirmed (1 failure(s) in a row)");
    assert_eq!(fixture.fail_revoke(), 0, "the same ids again");
    service.wait_for("(2 failure(s) in a row)");
    assert_eq!(
        fixture.answer_revoke(1),
        0,
        "and again, confirmed this time"
    );
    service.wait_for("revoked 1 cached verdicts (1 entries removed)");

    // Killed between the reload and the revoke: the revoke request is still waiting when the
    // service dies.
    let reply = fixture.ask(&request(2, CURL, "10.1.1.1", 443, 6)).unwrap();
    assert_eq!((reply.verdict, reply.cache), (Verdict::Allow, sixty()));
    write_rules(&rules, RULES_CURL_ELSEWHERE);
    service.wait_for("1 cached verdicts to revoke");
    fixture.wait_for_revoke_request();
    drop(service);
    // Its handle closed, its request is cancelled: nobody is left to confirm it.
    let deadline = Instant::now() + LONG;
    while fixture.revoke_requests_waiting() != 0 {
        assert!(
            Instant::now() < deadline,
            "the dead service's request stays"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The restarted service knows nothing of the lost ids, so it revokes everything as it
    // connects, and retries that until the driver confirms it (serving meanwhile: the stale
    // verdicts are in the driver's cache, which answers without asking anyway).
    let service = Service::start(&fixture.socket, &rules, &audit);
    assert_eq!(fixture.fail_revoke(), REVOKE_ALL);
    service.wait_for("revoking every cached verdict not confirmed (1 failure(s) in a row)");
    service.wait_for("serving \\WfpRsFirewallPort");
    assert_eq!(fixture.answer_revoke(1), REVOKE_ALL);
    service.wait_for("revoked every cached verdict (1 entries)");
    let reply = fixture.ask(&request(3, CURL, "10.1.1.1", 443, 6)).unwrap();
    assert_eq!(reply.verdict, Verdict::Deny, "the new rules decide");
    drop(service);
    fixture.finish();
}
