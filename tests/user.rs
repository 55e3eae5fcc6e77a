//! The user-mode side (`wfp_rs::user`, feature `user`) against a simulated machine served on a
//! Unix domain socket (`Machine::serve_user_mode`): in this process, and from a service in
//! another process that is killed mid-request and restarted.
//!
//! No test depends on timing to pass: "the client is waiting" is a state the harness waits for
//! (`Machine::wait_for_port_listener`), the child service says on its stdout when it is connected
//! and when it holds a request, and timeouts only bound waits whose outcome does not depend on
//! them.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::inverted::{ControlCode, InvertedQueue, RequiredAccess};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::port::{ConnectionId, Filter, Malformed, Message, PortEvents, SendError, ServerPort};
use wfp_rs::user::{self, Device, PortConnection, Request};
use wfp_rs_sim::{LoadedDriver, Machine, UserModeBridge};
use wfp_rs_tests::protocol::{Ask, Firewall, Verdict};

/// The service's policy: pid 666 is blocked.
fn policy(request: &Request) -> Vec<u8> {
    let ask = Ask::decode(&request.data).expect("the driver's encoding");
    vec![b'V', u8::from(ask.pid != 666)]
}

/// Counts disconnections, so a test can wait for the driver to have seen one (the bridge closes a
/// dead client's connection on its own thread).
#[derive(Default)]
struct Disconnects {
    count: Mutex<u32>,
    changed: Condvar,
}

impl PortEvents for Disconnects {
    fn disconnected(&self, _irql: &mut PassiveLevel<'_>, _connection: ConnectionId) {
        *self.count.lock().unwrap() += 1;
        self.changed.notify_all();
    }
}

const PORT: &str = "\\WfpRsUserPort";
const EVENTS: ControlCode = ControlCode::buffered(0x8000, 0x800, RequiredAccess::Any);
const MAX: usize = 32;
const DEVICE: &str = "WfpRsUserEvents";
const DEVICE_PATH: &str = r"\\.\WfpRsUserEvents";
/// An upper bound for waits that end by themselves; never reached when the code is right.
const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(20);

mod plain {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// A driver with a port and an inverted-call queue, and the machine's bridge.
struct Fixture {
    machine: Machine,
    driver: Option<LoadedDriver>,
    filter: Option<Filter>,
    port: Option<ServerPort<Firewall, Disconnects>>,
    queue: Option<InvertedQueue>,
    bridge: Option<UserModeBridge>,
    socket: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let machine = Machine::new();
        let driver = machine.load_driver("usery", plain::DriverEntry).unwrap();
        let (filter, port, queue) = driver
            .run_in_driver(&machine, |irql, d| {
                let filter = Filter::register(irql, d)?;
                let port = ServerPort::create(irql, &filter, PORT, 1, Disconnects::default())?;
                let queue = InvertedQueue::new(irql, d, DEVICE, EVENTS, MAX)?;
                Ok::<_, Status>((filter, port, queue))
            })
            .unwrap()
            .unwrap();
        let socket =
            std::env::temp_dir().join(format!("wfp-rs-{}-{test}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let bridge = machine.serve_user_mode(&socket).unwrap();
        assert_eq!(bridge.socket_path(), socket);
        Fixture {
            machine,
            driver: Some(driver),
            filter: Some(filter),
            port: Some(port),
            queue: Some(queue),
            bridge: Some(bridge),
            socket,
        }
    }

    fn port(&self) -> &ServerPort<Firewall, Disconnects> {
        self.port.as_ref().unwrap()
    }

    fn queue(&self) -> &InvertedQueue {
        self.queue.as_ref().unwrap()
    }

    fn send(&self, pid: u32, timeout: Duration) -> Result<Verdict, SendError> {
        let port = self.port();
        self.machine
            .at_passive(|irql| port.send(irql, &Ask { pid }, timeout))
    }

    /// Waits until the driver has seen `n` disconnections in all.
    fn wait_for_disconnects(&self, n: u32) {
        let events = self.port().events();
        let mut count = events.count.lock().unwrap();
        while *count < n {
            count = events.changed.wait(count).unwrap();
        }
    }

    fn connect(&self) -> PortConnection {
        PortConnection::connect_at(&self.socket, PORT, &[]).unwrap()
    }

    /// Stops the bridge (closing what clients left open), closes the driver's objects, unloads
    /// it and checks that nothing is left behind.
    fn finish(mut self) {
        drop(self.bridge.take());
        assert!(!self.socket.exists(), "the bridge removes its socket");
        let driver = self.driver.take().unwrap();
        let (port, filter, queue) = (self.port.take(), self.filter.take(), self.queue.take());
        driver.run_in_driver(&self.machine, |irql, _| {
            port.unwrap().close(irql);
            filter.unwrap().close(irql);
            queue.unwrap().close(irql);
        });
        self.machine.unload_driver(driver).unwrap();
        assert!(
            self.machine.pool_blocks().is_empty(),
            "{:?}",
            self.machine.pool_blocks()
        );
        assert_eq!(self.machine.pending_io_requests(), 0);
    }
}

// --- ports, in this process ---------------------------------------------------------------------

#[test]
fn a_request_gets_the_services_reply_through_the_bridge() {
    let fixture = Fixture::new("roundtrip");
    let connection = fixture.connect();
    assert!(fixture.port().has_client());
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..2 {
                let request = connection.get_message(None).unwrap().expect("a message");
                assert!(request.wants_reply());
                connection.reply(&request, &policy(&request)).unwrap();
            }
        });
        assert_eq!(fixture.send(42, LONG), Ok(Verdict::Allow));
        assert_eq!(fixture.send(666, LONG), Ok(Verdict::Block));
    });
    drop(connection);
    fixture.finish();
}

#[test]
fn get_message_times_out_and_an_unanswered_send_times_out() {
    let fixture = Fixture::new("timeout");
    let connection = fixture.connect();
    assert_eq!(
        connection.get_message(Some(Duration::ZERO)).unwrap(),
        None,
        "nothing was sent"
    );
    std::thread::scope(|s| {
        let reader = s.spawn(|| connection.get_message(None).unwrap().expect("delivered"));
        // The bridge's FilterGetMessage is pending: the message is delivered as it is sent.
        fixture.machine.wait_for_port_listener(PORT);
        assert_eq!(fixture.send(1, SHORT), Err(SendError::Timeout));
        let request = reader.join().unwrap();
        assert_eq!(Ask::decode(&request.data), Ok(Ask { pid: 1 }));
        let late = connection.reply(&request, b"V\x01").unwrap_err();
        assert!(
            late.to_string().contains("FLT_NO_WAITER_FOR_REPLY"),
            "a late reply finds no waiter: {late}"
        );
    });
    drop(connection);
    fixture.finish();
}

#[test]
fn get_message_with_a_timeout_reports_a_broken_connection_as_an_error() {
    let fixture = Fixture::new("brokenwait");
    let connection = fixture.connect();
    let closed = fixture
        .machine
        .at_passive(|irql| fixture.port().disconnect_all(irql));
    assert_eq!(closed, 1);
    // Not `Ok(None)`, which would read as "no message yet" and keep a service waiting on a
    // connection that is gone.
    let error = connection
        .get_message(Some(Duration::from_secs(30)))
        .expect_err("the connection is gone");
    assert_eq!(error.kind(), std::io::ErrorKind::NotConnected, "{error}");
    drop(connection);
    fixture.finish();
}

#[test]
fn a_malformed_reply_is_a_send_error() {
    let fixture = Fixture::new("malformed");
    let connection = fixture.connect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for reply in [&b"X\x01"[..], b"V", b"V\x01\0\0\0\0\0\0\0"] {
                let request = connection.get_message(None).unwrap().unwrap();
                connection.reply_to(request.id, reply).unwrap();
            }
        });
        assert_eq!(
            fixture.send(1, LONG),
            Err(SendError::Malformed(Malformed("bad magic")))
        );
        assert_eq!(
            fixture.send(2, LONG),
            Err(SendError::ReplyTooShort { len: 1, min: 2 })
        );
        assert_eq!(
            fixture.send(3, LONG),
            Err(SendError::ReplyTooLong { max: 8 })
        );
    });
    drop(connection);
    fixture.finish();
}

#[test]
fn dropping_the_connection_disconnects_a_waiting_send() {
    let fixture = Fixture::new("dropconn");
    let connection = fixture.connect();
    std::thread::scope(|s| {
        s.spawn(|| {
            connection.get_message(None).unwrap().unwrap();
            drop(connection);
        });
        assert_eq!(fixture.send(1, LONG), Err(SendError::Disconnected));
    });
    fixture.wait_for_disconnects(1);
    assert!(!fixture.port().has_client());
    assert_eq!(fixture.send(2, LONG), Err(SendError::NotConnected));
    fixture.finish();
}

#[test]
fn connecting_to_a_missing_port_or_without_a_bridge_fails_clearly() {
    let fixture = Fixture::new("missing");
    let error = PortConnection::connect_at(&fixture.socket, "\\Nobody", &[]).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    let error = Device::open_at(&fixture.socket, r"\\.\Nobody").unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    if std::env::var_os(user::SIM_SOCKET_VARIABLE).is_none() {
        let error = PortConnection::connect(PORT, &[]).unwrap_err();
        assert!(
            error.to_string().contains("WFP_RS_SIM_SOCKET"),
            "the error names the variable: {error}"
        );
    }
    fixture.finish();
}

// --- the inverted call, in this process ---------------------------------------------------------

#[test]
fn a_pending_request_is_completed_by_the_driver() {
    let fixture = Fixture::new("inverted");
    let device = Device::open_at(&fixture.socket, DEVICE_PATH).unwrap();
    let operation = device.request(EVENTS.raw(), &[], MAX).unwrap();
    assert_eq!(
        operation.wait(Some(Duration::ZERO)).unwrap(),
        None,
        "pending"
    );
    let queue = fixture.queue();
    assert_eq!(fixture.machine.at_dispatch(|irql| queue.waiting(irql)), 1);
    fixture
        .machine
        .at_dispatch(|irql| queue.complete_next(irql, b"connect pid 42"))
        .unwrap();
    assert_eq!(
        operation.wait(None).unwrap().as_deref(),
        Some(&b"connect pid 42"[..])
    );
    drop(operation);
    drop(device);
    fixture.finish();
}

#[test]
fn requests_are_cancelled_by_cancel_and_by_dropping_the_device() {
    let fixture = Fixture::new("cancel");
    let queue = fixture.queue();
    let device = Device::open_at(&fixture.socket, DEVICE_PATH).unwrap();
    let cancelled = device.request(EVENTS.raw(), &[], MAX).unwrap();
    let orphaned = device.request(EVENTS.raw(), &[], MAX).unwrap();
    assert_eq!(fixture.machine.at_dispatch(|irql| queue.waiting(irql)), 2);

    cancelled.cancel().unwrap();
    let error = cancelled.wait(None).unwrap_err();
    assert!(user::is_cancelled(&error), "{error}");
    assert_eq!(fixture.machine.at_dispatch(|irql| queue.waiting(irql)), 1);

    drop(device);
    let error = orphaned.wait(None).unwrap_err();
    assert!(user::is_cancelled(&error), "{error}");
    assert_eq!(fixture.machine.at_dispatch(|irql| queue.waiting(irql)), 0);
    // Nothing is waiting for the next message any more.
    assert!(
        fixture
            .machine
            .at_dispatch(|irql| queue.complete_next(irql, b"lost"))
            .is_err()
    );
    drop((cancelled, orphaned));
    fixture.finish();
}

// --- a service in another process -----------------------------------------------------------------

/// Set in the child process: run [`child_service`]'s service loop.
const CHILD: &str = "WFP_RS_USER_TEST_CHILD";
/// The pid the child service holds without replying, so the parent can kill it mid-request.
const HOLD: u32 = 13;

/// The child service (run only in the child process, which sets [`CHILD`]): connects through
/// `WFP_RS_SIM_SOCKET`, says "connected", answers with [`policy`]; on pid [`HOLD`] it says
/// "holding" and never replies.
#[test]
#[ignore = "the service of a child process; run by a_killed_service_disconnects_and_a_new_one_resumes"]
fn child_service() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let connection = PortConnection::connect(PORT, b"child").unwrap();
    say("connected");
    loop {
        let request = connection.get_message(None).unwrap().unwrap();
        if Ask::decode(&request.data) == Ok(Ask { pid: HOLD }) {
            say("holding");
            loop {
                std::thread::park();
            }
        }
        connection.reply(&request, &policy(&request)).unwrap();
    }
}

/// Tells the parent, on stdout (not through `println!`, which the test harness may capture).
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").unwrap();
    stdout.flush().unwrap();
}

/// Starts the child service and waits until it is connected.
fn start_child(fixture: &Fixture) -> (Child, std::io::Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_service",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env(user::SIM_SOCKET_VARIABLE, &fixture.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    wait_for_line(&mut lines, "connected");
    (child, lines)
}

fn wait_for_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, expected: &str) {
    for line in lines.by_ref() {
        // The harness's "test child_service ... " may precede the first line on the same line.
        if line.unwrap().trim_end().ends_with(expected) {
            return;
        }
    }
    panic!("the child service ended before saying {expected:?}");
}

#[test]
fn a_killed_service_disconnects_and_a_new_one_resumes() {
    let fixture = Fixture::new("crossprocess");
    let (mut child, mut lines) = start_child(&fixture);
    assert!(fixture.port().has_client());
    assert_eq!(fixture.send(42, LONG), Ok(Verdict::Allow), "served");

    std::thread::scope(|s| {
        let held = s.spawn(|| fixture.send(HOLD, LONG));
        wait_for_line(&mut lines, "holding");
        child.kill().unwrap();
        child.wait().unwrap();
        // The process died holding the request: the send fails at once, it does not wait for
        // its timeout.
        assert_eq!(held.join().unwrap(), Err(SendError::Disconnected));
    });
    fixture.wait_for_disconnects(1);
    assert!(!fixture.port().has_client());
    assert_eq!(fixture.send(7, LONG), Err(SendError::NotConnected));

    let (mut child, _lines) = start_child(&fixture);
    assert_eq!(
        fixture.send(42, LONG),
        Ok(Verdict::Allow),
        "service resumed"
    );
    assert_eq!(fixture.send(666, LONG), Ok(Verdict::Block));
    child.kill().unwrap();
    child.wait().unwrap();
    fixture.finish();
}

#[cfg(target_os = "linux")]
#[test]
fn a_bridge_whose_socket_file_was_removed_still_stops() {
    let machine = Machine::new();
    let socket =
        std::env::temp_dir().join(format!("wfp-rs-{}-removed-socket.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let bridge = machine.serve_user_mode(&socket).unwrap();
    std::fs::remove_file(&socket).unwrap();
    // Dropping the bridge must not wait for a connection that can no longer be made. (The bound
    // only turns a hang into a failure; the drop takes no measurable time when it works.)
    let (stopped, stopping) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(bridge);
        let _ = stopped.send(());
    });
    assert!(
        stopping.recv_timeout(Duration::from_secs(120)).is_ok(),
        "the bridge did not stop"
    );
}
