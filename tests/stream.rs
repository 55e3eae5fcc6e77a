//! Stream data in classifications: `Machine::stream` classifies a TCP connection's data once at
//! STREAM_V4 or STREAM_V6 with a real `FWPS_STREAM_CALLOUT_IO_PACKET0`, and a callout reads the
//! bytes through `Classify::stream` — across MDLs — with the direction in the flags.

#![cfg(any(not(windows), feature = "sim"))]

use std::sync::{Arc, Mutex};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{self, Field, StreamLayer, fields, value::IpProtocol};
use wfp_rs::metadata::Direction;
use wfp_rs::sys::{FWPS_STREAM_ACTION_NONE, FWPS_STREAM_FLAG_RECEIVE, FWPS_STREAM_FLAG_SEND};
use wfp_rs::{Guid, Status, guid};
use wfp_rs_sim::{Connection, Machine};

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

const CALLOUT: Guid = guid!("62000000-0000-0000-0000-000000000001");
const FILTER: Guid = guid!("62000000-0000-0000-0000-000000000002");

/// What a callout saw of one indication.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    flags: u32,
    bytes: Vec<u8>,
    missed: usize,
    remote_port: Option<u16>,
    direction: Option<u32>,
    flow_handle: Option<u64>,
}

/// Records each indication, and blocks the data that starts with `BLOCK`.
#[derive(Default)]
struct StreamReader {
    seen: Arc<Mutex<Vec<Option<Seen>>>>,
}

impl<L: StreamLayer> Callout<L> for StreamReader
where
    fields::IpRemotePort: Field<L>,
    fields::Direction: Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        // The record is the harness's memory, not the driver's pool.
        let seen = wfp_rs_sim::as_harness(|| {
            c.stream().map(|stream| {
                let mut bytes = vec![0u8; stream.len()];
                stream.read(0, &mut bytes).expect("reads its own length");
                Seen {
                    flags: stream.flags(),
                    bytes,
                    missed: stream.missed_bytes(),
                    remote_port: c.values.get::<fields::IpRemotePort>().ok(),
                    direction: c.values.get::<fields::Direction>().ok(),
                    flow_handle: c.metadata.flow_handle(),
                }
            })
        });
        let block = seen.as_ref().is_some_and(|s| s.bytes.starts_with(b"BLOCK"));
        wfp_rs_sim::as_harness(|| self.seen.lock().unwrap().push(seen));
        if block {
            c.out.block();
        } else {
            let _ = c.out.permit();
        }
    }
}

/// Registers a [`StreamReader`] at `L` with a terminating filter calling it, runs `test`, and
/// returns what the reader saw; the driver unloads with no pool left.
fn with_reader<L: StreamLayer>(machine: &Machine, test: impl FnOnce(&Machine)) -> Vec<Option<Seen>>
where
    fields::IpRemotePort: Field<L>,
    fields::Direction: Field<L>,
{
    let driver = machine.load_driver("host", host::DriverEntry).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&seen);
    let (registration, engine) = driver
        .run_in_driver(machine, move |irql, d| {
            let key = CalloutKey::<L>::new(CALLOUT);
            let registration = CalloutRegistration::register(
                irql,
                d,
                key,
                wfp_rs_sim::as_harness(|| StreamReader { seen: shared }),
            )
            .unwrap();
            let engine = Engine::open(irql, SessionOptions::new().dynamic()).unwrap();
            engine
                .add_callout(irql, &CalloutEntry::new(key).name("stream"))
                .unwrap();
            engine
                .add_filter(
                    irql,
                    &Filter::<L>::new(FILTER)
                        .name("stream")
                        .action(FilterAction::CalloutTerminating(key)),
                )
                .unwrap();
            (registration, engine)
        })
        .unwrap();
    test(machine);
    driver.run_in_driver(machine, |irql, _| {
        engine.close(irql).unwrap();
        registration.unregister(irql).map_err(|(_, s)| s).unwrap();
    });
    machine.unload_driver(driver).unwrap();
    assert!(machine.pool_blocks().is_empty());
    seen.lock().unwrap().clone()
}

fn connection(local: &str, remote: &str) -> Connection {
    Connection {
        pid: 7,
        app: "\\device\\harddiskvolume1\\app.exe".into(),
        protocol: IpProtocol::Tcp,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        direction: Direction::Outbound,
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";

#[test]
fn outbound_v4_data_is_sent_and_read_across_the_mdls() {
    let conn = connection("10.0.0.1:50000", "192.0.2.7:80");
    let machine = Machine::new();
    let mut outcomes = Vec::new();
    let seen = with_reader::<layer::StreamV4>(&machine, |machine| {
        outcomes.push(machine.stream(&conn, 0x51, Direction::Outbound, REQUEST));
        // One byte per MDL: every read crosses MDLs.
        let bytes: Vec<&[u8]> = REQUEST.chunks(1).collect();
        outcomes.push(machine.stream_pieces(&conn, 0x51, Direction::Outbound, &bytes));
    });
    let expected = Some(Seen {
        flags: FWPS_STREAM_FLAG_SEND,
        bytes: REQUEST.to_vec(),
        missed: 0,
        remote_port: Some(80),
        direction: Some(wfp_rs::sys::FWP_DIRECTION_OUTBOUND as u32),
        flow_handle: Some(0x51),
    });
    assert_eq!(seen, [expected.clone(), expected]);
    for outcome in outcomes {
        assert_eq!(outcome.decision.action, Action::Permit);
        assert!(
            outcome.decision.filter_id.is_some(),
            "the callout's filter decided"
        );
        assert_eq!(outcome.stream_action, FWPS_STREAM_ACTION_NONE);
        assert_eq!(
            (outcome.count_bytes_required, outcome.count_bytes_enforced),
            (0, 0)
        );
    }
}

#[test]
fn inbound_v6_data_is_received_and_a_block_is_the_decision() {
    let conn = connection("[2001:db8::1]:50000", "[2001:db8::2]:80");
    let machine = Machine::new();
    let mut decisions = Vec::new();
    let seen = with_reader::<layer::StreamV6>(&machine, |machine| {
        decisions.push(machine.stream(&conn, 0x61, Direction::Inbound, b"HTTP/1.1 200 OK\r\n"));
        decisions.push(machine.stream(&conn, 0x61, Direction::Outbound, b"BLOCK me"));
        decisions.push(machine.stream(&conn, 0x61, Direction::Outbound, b""));
    });
    assert_eq!(seen.len(), 3);
    let first = seen[0].as_ref().expect("stream data");
    assert_eq!(first.flags, FWPS_STREAM_FLAG_RECEIVE);
    assert_eq!(first.bytes, b"HTTP/1.1 200 OK\r\n");
    assert_eq!(
        first.direction,
        Some(wfp_rs::sys::FWP_DIRECTION_INBOUND as u32)
    );
    assert_eq!(first.remote_port, Some(80));
    let empty = seen[2].as_ref().expect("stream data");
    assert_eq!((empty.flags, empty.bytes.len()), (FWPS_STREAM_FLAG_SEND, 0));
    let actions: Vec<Action> = decisions.iter().map(|o| o.decision.action).collect();
    assert_eq!(actions, [Action::Permit, Action::Block, Action::Permit]);
}

#[test]
#[should_panic(expected = "the stream layers see only TCP")]
fn udp_has_no_stream() {
    let mut conn = connection("10.0.0.1:50000", "192.0.2.7:53");
    conn.protocol = IpProtocol::Udp;
    Machine::new().stream(&conn, 1, Direction::Outbound, b"x");
}
