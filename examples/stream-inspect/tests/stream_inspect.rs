//! The stream-inspect driver in the simulator: the host of an outbound HTTP request is logged
//! (read across MDLs), a denied host's flow is blocked, anything else — garbage, truncated
//! requests, requests without a `Host` — is permitted without a panic, over both IP versions,
//! and the driver unloads clean.

#![cfg(any(not(windows), feature = "sim"))]

use wfp_rs::classify::Action;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::metadata::Direction;
use wfp_rs_sim::{Connection, Machine};

const BROWSER: &str = r"\device\harddiskvolume3\program files\browser\browser.exe";

fn connection(remote: &str) -> Connection {
    let local = if remote.starts_with('[') {
        "[2001:db8::1]:50000"
    } else {
        "10.0.0.1:50000"
    };
    Connection {
        pid: 4242,
        app: BROWSER.into(),
        protocol: IpProtocol::Tcp,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

/// Loads the driver, with `DeniedHosts` set to `denied` if given.
fn load(machine: &Machine, denied: Option<&str>) -> wfp_rs_sim::LoadedDriver {
    if let Some(denied) = denied {
        machine.set_driver_parameter("stream-inspect", "DeniedHosts", denied);
    }
    machine
        .load_driver("stream-inspect", stream_inspect::DriverEntry)
        .expect("loads")
}

/// Ends the flows, unloads, and checks nothing is left.
fn unload(machine: &Machine, driver: wfp_rs_sim::LoadedDriver, flows: &[u64]) {
    for &flow in flows {
        machine.end_flow(flow);
    }
    machine.unload_driver(driver).expect("unloads");
    assert_eq!(machine.pool_blocks(), [], "no pool left");
}

fn lines_with(machine: &Machine, prefix: &str) -> Vec<String> {
    machine
        .debug_output()
        .into_iter()
        .filter(|line| line.starts_with(prefix))
        .collect()
}

#[test]
fn logs_the_host_of_a_request_split_across_mdls() {
    let machine = Machine::new();
    let driver = load(&machine, None);
    let conn = connection("192.0.2.7:80");
    let request: &[u8] = b"GET /index.html HTTP/1.1\r\nhOsT: Example.com:80\r\nAccept: */*\r\n\r\n";
    // The MDLs split the header name, the value, and the line end.
    let at = |needle: &[u8]| {
        request
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    let (a, b, c) = (at(b"sT:"), at(b"ple.com"), at(b"\nAccept"));
    let pieces = [&request[..a], &request[a..b], &request[b..c], &request[c..]];
    let outcome = machine.stream_pieces(&conn, 0x100, Direction::Outbound, &pieces);
    assert_eq!(outcome.decision.action, Action::Permit);
    assert!(
        outcome.decision.filter_id.is_some(),
        "the driver's filter matched"
    );
    assert_eq!(
        lines_with(&machine, "stream-inspect: host"),
        ["stream-inspect: host Example.com\n"]
    );
    // The rest of the flow passes without another search.
    let body = machine.stream(
        &conn,
        0x100,
        Direction::Outbound,
        b"Host: blocked.example\r\n",
    );
    assert_eq!(body.decision.action, Action::Permit);
    assert_eq!(lines_with(&machine, "stream-inspect: host").len(), 1);
    // Another port is not the driver's.
    let https = machine.stream(
        &connection("192.0.2.7:443"),
        0x101,
        Direction::Outbound,
        request,
    );
    assert_eq!(https.decision.filter_id, None);
    assert_eq!(lines_with(&machine, "stream-inspect: host").len(), 1);
    unload(&machine, driver, &[0x100, 0x101]);
}

#[test]
fn a_denied_host_blocks_the_flow_over_both_ip_versions() {
    for remote in ["192.0.2.7:80", "[2001:db8::7]:80"] {
        let machine = Machine::new();
        let driver = load(&machine, Some("ads.example, Tracker.Example."));
        let conn = connection(remote);
        let request =
            b"POST /collect HTTP/1.1\r\nHost: tracker.example\r\nContent-Length: 2\r\n\r\n";
        let blocked = machine.stream(&conn, 0x200, Direction::Outbound, request);
        assert_eq!(blocked.decision.action, Action::Block, "{remote}");
        assert!(blocked.decision.hard);
        assert_eq!(
            lines_with(&machine, "stream-inspect: "),
            [
                "stream-inspect: denying ads.example, Tracker.Example.\n",
                "stream-inspect: host tracker.example\n",
                "stream-inspect: blocked tracker.example\n",
            ]
        );
        // The rest of the flow, both ways, is blocked too.
        for direction in [Direction::Outbound, Direction::Inbound] {
            let later = machine.stream(&conn, 0x200, direction, b"{}");
            assert_eq!(
                later.decision.action,
                Action::Block,
                "{remote} {direction:?}"
            );
        }
        // Another flow to an allowed host passes.
        let allowed = b"GET / HTTP/1.0\r\nHost: [2001:db8::7]:80\r\n\r\n";
        let permitted = machine.stream(&conn, 0x201, Direction::Outbound, allowed);
        assert_eq!(permitted.decision.action, Action::Permit);
        assert_eq!(
            lines_with(&machine, "stream-inspect: host").last().unwrap(),
            "stream-inspect: host [2001:db8::7]\n"
        );
        unload(&machine, driver, &[0x200, 0x201]);
    }
}

#[test]
fn the_default_deny_list_applies_without_the_registry_value() {
    let machine = Machine::new();
    let driver = load(&machine, None);
    let conn = connection("[2001:db8::9]:80");
    let request = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST:blocked.example\r\n\r\n";
    let outcome = machine.stream(&conn, 0x300, Direction::Outbound, request);
    assert_eq!(outcome.decision.action, Action::Block);
    // The driver leaves the io packet's stream action alone (the SDK's view is read-only).
    assert_eq!(outcome.stream_action, wfp_rs::sys::FWPS_STREAM_ACTION_NONE);
    // Unloading with the flow still open: unregistering removes its context.
    unload(&machine, driver, &[]);
}

#[test]
fn requests_without_a_usable_host_are_permitted() {
    let machine = Machine::new();
    let driver = load(&machine, None);
    let cases: &[&[u8]] = &[
        b"",
        b"GET / HTTP/1.1\r\nHost: blocked.exam", // cut short: the line never ends
        b"GET / HTTP/1.1\r\n\r\nHost: blocked.example\r\n", // after the headers
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", // no Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS hello on port 80
        b"get / HTTP/1.1\r\nHost: blocked.example\r\n\r\n", // not a request line
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",     // empty
        b"GET / HTTP/1.1\r\nHost: bl\xffocked.example\r\n\r\n", // not ASCII
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", // an unclosed IPv6 literal
    ];
    for (flow, data) in (0x400..).zip(cases) {
        let outcome = machine.stream(&connection("192.0.2.7:80"), flow, Direction::Outbound, data);
        assert_eq!(
            outcome.decision.action,
            Action::Permit,
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
    assert_eq!(
        lines_with(&machine, "stream-inspect: host"),
        Vec::<String>::new()
    );
    // A Host line past the scan limit is not found.
    let mut long = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
    long.resize(stream_inspect::http::SCAN_LIMIT, b'a');
    long.extend_from_slice(b"\r\nHost: blocked.example\r\n\r\n");
    let outcome = machine.stream(
        &connection("192.0.2.7:80"),
        0x500,
        Direction::Outbound,
        &long,
    );
    assert_eq!(outcome.decision.action, Action::Permit);
    let flows: Vec<u64> = (0x400..0x400 + cases.len() as u64).chain([0x500]).collect();
    unload(&machine, driver, &flows);
}

/// xorshift64: deterministic per seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_bytes_are_permitted_without_a_panic() {
    let seed: u64 = std::env::var("WFP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5743_0001);
    eprintln!("seed {seed:#x} (set WFP_TEST_SEED to replay)");
    let mut state = seed | 1;
    let machine = Machine::new();
    let driver = load(&machine, Some("blocked.example"));
    let alphabet = b"GET HTTP/1.1\r\n:Host hOST blocked.example [] \x00\xff";
    let mut flows = Vec::new();
    let mut blocked = 0;
    for flow in 0x600..0x600 + 300u64 {
        let length = (next(&mut state) % 1500) as usize;
        let mode = next(&mut state) % 3;
        let mut data: Vec<u8> = (0..length)
            .map(|_| {
                let r = next(&mut state);
                if mode == 0 {
                    r as u8
                } else {
                    alphabet[(r % alphabet.len() as u64) as usize]
                }
            })
            .collect();
        if mode == 2 {
            // A denied request, cut at a random point, before the random bytes.
            let request = b"GET / HTTP/1.1\r\nHost: blocked.example\r\n";
            let cut = (next(&mut state) as usize) % (request.len() + 1);
            data.splice(0..0, request[..cut].iter().copied());
        }
        // Random MDL boundaries.
        let mut pieces = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = 1 + (next(&mut state) as usize % rest.len().min(64));
            let (piece, later) = rest.split_at(n);
            pieces.push(piece);
            rest = later;
        }
        let outcome = machine.stream_pieces(
            &connection("192.0.2.7:80"),
            flow,
            Direction::Outbound,
            &pieces,
        );
        // Whatever the bytes, the verdict is the parser's.
        let host = stream_inspect::http::request_host(
            &data[..data.len().min(stream_inspect::http::SCAN_LIMIT)],
        );
        let denied = host.is_some_and(|h| stream_inspect::http::is_denied(h, "blocked.example"));
        let expected = if denied {
            Action::Block
        } else {
            Action::Permit
        };
        assert_eq!(
            outcome.decision.action, expected,
            "seed {seed:#x}, flow {flow:#x}"
        );
        blocked += usize::from(denied);
        flows.push(flow);
    }
    assert!(
        blocked > 0,
        "seed {seed:#x}: expected some complete denied requests"
    );
    assert!(
        blocked > 0,
        "seed {seed:#x}: expected some complete denied requests"
    );
    unload(&machine, driver, &flows);
}
