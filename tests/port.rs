//! Filter-manager communication ports: the ABI against `windows-sys`, then the safe API
//! (`wfp_rs::port`) and the simulated filter manager, with a user-mode client driven by the
//! harness (`Machine::port_client`).
//!
//! Every simulator rule has a test that breaks it (in a child process, since a bug check ends
//! the process) and a test that follows it. No test depends on timing to pass: the client
//! thread replies only after it has received; timeouts are tested with a client that never
//! replies; "the client is waiting" is a state the harness waits for
//! (`Machine::wait_for_port_listener`).

use core::mem::{offset_of, size_of};

use wfp_rs::sys as ours;

mod abi {
    use super::*;
    use windows_sys::Wdk::Foundation as wdk;
    use windows_sys::Wdk::Storage::FileSystem::Minifilters as flt;
    use windows_sys::Win32::Foundation as foundation;
    use windows_sys::Win32::Storage::FileSystem as fs;
    use windows_sys::Win32::Storage::InstallableFileSystems as fltuser;

    macro_rules! same_layout {
        ($diffs:ident, $ours:ty, $theirs:ty, $($field:ident),* $(,)?) => {{
            if size_of::<$ours>() != size_of::<$theirs>() {
                $diffs.push(format!(
                    "size_of::<{}>() is {}, windows-sys says {}",
                    stringify!($ours),
                    size_of::<$ours>(),
                    size_of::<$theirs>()
                ));
            }
            $(
                if offset_of!($ours, $field) != offset_of!($theirs, $field) {
                    $diffs.push(format!(
                        "{}.{} at {}, windows-sys says {}",
                        stringify!($ours),
                        stringify!($field),
                        offset_of!($ours, $field),
                        offset_of!($theirs, $field)
                    ));
                }
            )*
        }};
    }

    #[test]
    fn structures_match_windows_sys() {
        let mut d = Vec::new();
        same_layout!(
            d,
            ours::FILTER_MESSAGE_HEADER,
            fltuser::FILTER_MESSAGE_HEADER,
            ReplyLength,
            MessageId
        );
        same_layout!(
            d,
            ours::FILTER_REPLY_HEADER,
            fltuser::FILTER_REPLY_HEADER,
            Status,
            MessageId
        );
        same_layout!(
            d,
            ours::FLT_REGISTRATION,
            flt::FLT_REGISTRATION,
            Size,
            Version,
            Flags,
            ContextRegistration,
            OperationRegistration,
            FilterUnloadCallback,
            InstanceSetupCallback,
            InstanceQueryTeardownCallback,
            InstanceTeardownStartCallback,
            InstanceTeardownCompleteCallback,
            GenerateFileNameCallback,
            NormalizeNameComponentCallback,
            NormalizeContextCleanupCallback,
            TransactionNotificationCallback,
            NormalizeNameComponentExCallback,
            SectionNotificationCallback,
        );
        same_layout!(
            d,
            ours::OBJECT_ATTRIBUTES,
            wdk::OBJECT_ATTRIBUTES,
            Length,
            RootDirectory,
            ObjectName,
            Attributes,
            SecurityDescriptor,
            SecurityQualityOfService,
        );
        for (name, ours, theirs) in [
            (
                "PFLT_CONNECT_NOTIFY",
                size_of::<ours::PFLT_CONNECT_NOTIFY>(),
                size_of::<flt::PFLT_CONNECT_NOTIFY>(),
            ),
            (
                "PFLT_DISCONNECT_NOTIFY",
                size_of::<ours::PFLT_DISCONNECT_NOTIFY>(),
                size_of::<flt::PFLT_DISCONNECT_NOTIFY>(),
            ),
            (
                "PFLT_MESSAGE_NOTIFY",
                size_of::<ours::PFLT_MESSAGE_NOTIFY>(),
                size_of::<flt::PFLT_MESSAGE_NOTIFY>(),
            ),
            (
                "PFLT_PORT",
                size_of::<ours::PFLT_PORT>(),
                size_of::<flt::PFLT_PORT>(),
            ),
        ] {
            if ours != theirs {
                d.push(format!("{name}: {ours} bytes, windows-sys says {theirs}"));
            }
        }
        assert!(
            d.is_empty(),
            "differences from windows-sys:\n  {}",
            d.join("\n  ")
        );
    }

    #[test]
    fn constants_match_windows_sys() {
        assert_eq!(ours::FLT_PORT_CONNECT, flt::FLT_PORT_CONNECT);
        assert_eq!(ours::STANDARD_RIGHTS_ALL, fs::STANDARD_RIGHTS_ALL);
        assert_eq!(
            ours::FLT_PORT_ALL_ACCESS,
            flt::FLT_PORT_CONNECT | fs::STANDARD_RIGHTS_ALL
        );
        assert_eq!(ours::OBJ_KERNEL_HANDLE, foundation::OBJ_KERNEL_HANDLE);
        assert_eq!(ours::OBJ_CASE_INSENSITIVE, foundation::OBJ_CASE_INSENSITIVE);
        assert_eq!(
            u32::from(ours::FLT_REGISTRATION_VERSION),
            flt::FLT_REGISTRATION_VERSION
        );
    }

    #[test]
    fn statuses_match_windows_sys() {
        use wfp_rs::Status;
        for (ours, theirs) in [
            (
                Status::PORT_DISCONNECTED,
                foundation::STATUS_PORT_DISCONNECTED,
            ),
            (Status::BUFFER_OVERFLOW, foundation::STATUS_BUFFER_OVERFLOW),
            (
                Status::OBJECT_NAME_NOT_FOUND,
                foundation::STATUS_OBJECT_NAME_NOT_FOUND,
            ),
            (
                Status::CONNECTION_COUNT_LIMIT,
                foundation::STATUS_CONNECTION_COUNT_LIMIT,
            ),
            (
                Status::FLT_NO_WAITER_FOR_REPLY,
                foundation::STATUS_FLT_NO_WAITER_FOR_REPLY,
            ),
        ] {
            assert_eq!(ours.raw(), theirs, "{ours}");
        }
    }
}

#[cfg(any(not(windows), feature = "sim"))]
mod sim {
    use core::ptr::null_mut;
    use core::time::Duration;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Mutex, mpsc};

    use wfp_rs::bugcheck::{BugCheckCode, verifier};
    use wfp_rs::driver::{Driver, DriverState};
    use wfp_rs::irql::{DispatchLevel, PassiveLevel};
    use wfp_rs::port::{
        ConnectionId, Filter, Malformed, Message, PortEvents, Protocol, SendError, ServerPort,
    };
    use wfp_rs::spin_lock::SpinLock;
    use wfp_rs::{Status, sys};
    use wfp_rs_sim::bugcheck_test;
    use wfp_rs_sim::{LoadedDriver, Machine, PortClient, UnloadError, run_isolated};
    use wfp_rs_tests::protocol::{Ask, Firewall, Verdict};

    // --- the protocol the tests speak: wfp_rs_tests::protocol ----------------------------------

    /// Notifications: no reply.
    struct Notify;

    impl Protocol for Notify {
        type Request = Ask;
        type Reply = ();
    }

    fn verdict_bytes(verdict: Verdict) -> Vec<u8> {
        let mut out = vec![0u8; Verdict::MAX_LEN];
        let len = verdict.encode(&mut out).unwrap();
        out.truncate(len);
        out
    }

    /// The service's policy in these tests: pid 666 is blocked.
    fn policy(message: &wfp_rs_sim::PortMessage) -> Vec<u8> {
        let ask = Ask::decode(&message.data).expect("the driver's encoding");
        verdict_bytes(if ask.pid == 666 {
            Verdict::Block
        } else {
            Verdict::Allow
        })
    }

    /// Counts connection events and optionally insists on a context.
    #[derive(Default)]
    struct Counting {
        connects: AtomicU32,
        disconnects: AtomicU32,
        contexts: Mutex<Vec<Vec<u8>>>,
        require_context: AtomicBool,
    }

    impl PortEvents for Counting {
        fn connected(
            &self,
            irql: &mut PassiveLevel<'_>,
            connection: ConnectionId,
            context: &[u8],
        ) -> Result<(), Status> {
            let _ = (irql, connection);
            self.contexts.lock().unwrap().push(context.to_vec());
            if self.require_context.load(Ordering::SeqCst) && context != [1, 0] {
                return Err(Status::ACCESS_DENIED);
            }
            self.connects.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn disconnected(&self, irql: &mut PassiveLevel<'_>, connection: ConnectionId) {
            let _ = (irql, connection);
            self.disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }

    const PORT: &str = "\\WfpRsTestPort";
    const LONG: Duration = Duration::from_secs(60);
    const SHORT: Duration = Duration::from_millis(20);

    mod plain {
        use super::*;

        #[wfp_rs::driver_entry]
        fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
            Ok(())
        }
    }

    /// A loaded driver with a filter and a port created as the driver.
    struct Fixture {
        machine: Machine,
        driver: Option<LoadedDriver>,
        filter: Option<Filter>,
        port: Option<ServerPort<Firewall, Counting>>,
    }

    impl Fixture {
        fn new(max_connections: u32) -> Fixture {
            Fixture::with_events(max_connections, Counting::default())
        }

        fn with_events(max_connections: u32, events: Counting) -> Fixture {
            let machine = Machine::new();
            let driver = machine.load_driver("porty", plain::DriverEntry).unwrap();
            let (filter, port) = driver
                .run_in_driver(&machine, |irql, d| {
                    let filter = Filter::register(irql, d)?;
                    let port = ServerPort::create(irql, &filter, PORT, max_connections, events)?;
                    Ok::<_, Status>((filter, port))
                })
                .unwrap()
                .unwrap();
            Fixture {
                machine,
                driver: Some(driver),
                filter: Some(filter),
                port: Some(port),
            }
        }

        fn port(&self) -> &ServerPort<Firewall, Counting> {
            self.port.as_ref().unwrap()
        }

        fn client(&self) -> PortClient {
            let mut client = self.machine.port_client(PORT);
            client.connect(&[]).unwrap();
            client
        }

        fn send(&self, pid: u32, timeout: Duration) -> Result<Verdict, SendError> {
            let port = self.port();
            self.machine
                .at_passive(|irql| port.send(irql, &Ask { pid }, timeout))
        }

        /// Closes the port and the filter as the driver, unloads it, and checks that nothing is
        /// left behind.
        fn finish(mut self) {
            let driver = self.driver.take().unwrap();
            let (port, filter) = (self.port.take(), self.filter.take());
            driver.run_in_driver(&self.machine, |irql, _| {
                if let Some(port) = port {
                    port.close(irql);
                }
                if let Some(filter) = filter {
                    filter.close(irql);
                }
            });
            self.machine.unload_driver(driver).unwrap();
            assert!(
                self.machine.pool_blocks().is_empty(),
                "pool left: {:?}",
                self.machine.pool_blocks()
            );
        }
    }

    // --- the seed bug: FltSendMessage at DISPATCH_LEVEL ---------------------------------------

    bugcheck_test! {
        /// What the C driver did: FltSendMessage from classifyFn at DISPATCH_LEVEL. The safe API
        /// makes it a compile error (see the `compile_fail` example in `wfp_rs::port`); through
        /// the raw ABI the simulator stops the way Windows did.
        fn sending_at_dispatch_level_stops_with_invalid_process_attach_attempt() expects INVALID_PROCESS_ATTACH_ATTEMPT {
            let fixture = Fixture::new(1);
            let _client = fixture.client();
            let filter = fixture.filter.as_ref().unwrap().raw();
            fixture.machine.at_dispatch(|_irql| {
                let mut client_port: sys::PFLT_PORT = null_mut();
                let mut ask = [0u8; 4];
                // SAFETY: deliberately breaking the IRQL rule; the simulator stops before it
                // uses any argument.
                unsafe {
                    sys::FltSendMessage(filter, &mut client_port, ask.as_mut_ptr().cast(), 4, null_mut(), null_mut(), null_mut());
                }
            });
        }
    }

    bugcheck_test! {
        /// A client-port variable that still holds a port the filter manager has freed (the
        /// driver kept a copy past FltCloseClientPort) is a use after free on Windows; the
        /// simulator stops instead of answering STATUS_PORT_DISCONNECTED.
        fn sending_through_a_stale_client_port_stops() expects KMODE_EXCEPTION_NOT_HANDLED {
            let fixture = Fixture::new(1);
            let filter = fixture.filter.as_ref().unwrap().raw();
            fixture.machine.at_passive(|_irql| {
                let mut freed = [0u64; 4];
                let mut client_port: sys::PFLT_PORT = freed.as_mut_ptr().cast();
                let mut ask = [0u8; 4];
                // SAFETY: deliberately passing a pointer that is no client port; the simulator
                // stops before it dereferences it.
                unsafe {
                    sys::FltSendMessage(filter, &mut client_port, ask.as_mut_ptr().cast(), 4, null_mut(), null_mut(), null_mut());
                }
            });
        }
    }

    bugcheck_test! {
        /// Above DISPATCH_LEVEL FltSendMessage fails the ordinary IRQL check.
        fn sending_above_dispatch_level_stops_with_irql_not_less_or_equal() expects IRQL_NOT_LESS_OR_EQUAL {
            let fixture = Fixture::new(1);
            let filter = fixture.filter.as_ref().unwrap().raw();
            fixture.machine.run(|| {
                let mut client_port: sys::PFLT_PORT = null_mut();
                let mut ask = [0u8; 4];
                // SAFETY: deliberately raising to HIGH_LEVEL (never lowered: the machine stops).
                unsafe { sys::KfRaiseIrql(sys::HIGH_LEVEL) };
                // SAFETY: deliberately sending at HIGH_LEVEL; the simulator stops before it uses
                // any argument.
                unsafe {
                    sys::FltSendMessage(filter, &mut client_port, ask.as_mut_ptr().cast(), 4, null_mut(), null_mut(), null_mut());
                }
            });
        }
    }

    bugcheck_test! {
        /// Two tokens on one thread take `unsafe` now (`try_current` while holding a token breaks
        /// its contract); if code does it anyway, the SDK's token check in `send` stops at the
        /// call, before the filter manager is reached.
        fn a_passive_token_used_under_a_spin_lock_stops_at_send() expects IRQL_NOT_LESS_OR_EQUAL {
            let fixture = Fixture::new(1);
            let _client = fixture.client();
            let port = fixture.port();
            let lock = SpinLock::new(());
            fixture.machine.at_passive(|irql| {
                let misuse = |second: &mut DispatchLevel<'_>| {
                    lock.lock(second, |_, _| {
                        let _ = port.send(irql, &Ask { pid: 1 }, SHORT);
                    });
                };
                // SAFETY: NOT upheld, on purpose: `irql` is usable while `misuse` runs. The
                // scenario checks the run-time backstop for exactly this broken promise.
                unsafe { DispatchLevel::try_current(misuse) };
            });
        }
    }

    /// Eight readers on one connection, each waiting until a message comes, and eight senders at once: a
    /// message wakes one reader (as on Windows a message completes one pending read), and no
    /// message waits for a reader that was not woken. A lost wake-up would leave a message
    /// undelivered until its reader's wait ends (`LONG`), and its sender, which waits only
    /// `SEND_LIMIT`, would fail the assertion.
    #[test]
    fn many_readers_of_one_connection_answer_every_message_once() {
        const READERS: u32 = 8;
        const SENDERS: u32 = 8;
        const PER_SENDER: u32 = 40;
        /// The pid of a message that ends the reader that takes it.
        const STOP: u32 = 0;
        /// Far beyond what a reply takes here, far short of `LONG`.
        const SEND_LIMIT: Duration = Duration::from_secs(10);
        let fixture = Fixture::new(1);
        let client = fixture.client();
        let answered = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..READERS {
                s.spawn(|| {
                    // `LONG`, not for ever: if a wake-up were lost, the test fails instead of
                    // hanging.
                    while let Some(message) = client.get_message(Some(LONG)) {
                        // A reply to a sender that gave up fails; the sender's assertion says why.
                        let _ = client.reply(message.id, &policy(&message));
                        if Ask::decode(&message.data).unwrap().pid == STOP {
                            return;
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            std::thread::scope(|senders| {
                for sender in 0..SENDERS {
                    let fixture = &fixture;
                    senders.spawn(move || {
                        for n in 0..PER_SENDER {
                            let pid = if n % 7 == 0 {
                                666
                            } else {
                                1 + sender * 1000 + n
                            };
                            let expected = if pid == 666 {
                                Verdict::Block
                            } else {
                                Verdict::Allow
                            };
                            assert_eq!(fixture.send(pid, SEND_LIMIT), Ok(expected), "pid {pid}");
                        }
                    });
                }
            });
            // One stop message per reader: each wakes one reader, which answers and ends.
            for _ in 0..READERS {
                assert_eq!(fixture.send(STOP, SEND_LIMIT), Ok(Verdict::Allow));
            }
        });
        assert_eq!(answered.load(Ordering::SeqCst), SENDERS * PER_SENDER);
        drop(client);
        fixture.finish();
    }

    #[test]
    fn a_work_item_queued_at_dispatch_level_sends_and_gets_the_reply() {
        let fixture = Fixture::new(1);
        let client = fixture.client();
        let queue = fixture
            .driver
            .as_ref()
            .unwrap()
            .work_queue(&fixture.machine)
            .unwrap();
        let (results, received) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..2 {
                    let message = client.get_message(None).expect("a message");
                    client.reply(message.id, &policy(&message)).unwrap();
                }
            });
            // The classify callback's situation: DISPATCH_LEVEL, with a port handle in the state.
            fixture.machine.at_dispatch(|irql| {
                for pid in [42, 666] {
                    let port = fixture.port().clone();
                    let results = results.clone();
                    queue
                        .queue(irql, move |passive| {
                            let verdict = port.send(passive, &Ask { pid }, LONG);
                            // The test's channel: harness memory.
                            wfp_rs_sim::as_harness(|| results.send((pid, verdict)).unwrap());
                        })
                        .unwrap();
                }
            });
            let mut verdicts: Vec<_> = received.iter().take(2).collect();
            verdicts.sort_by_key(|(pid, _)| *pid);
            assert_eq!(
                verdicts,
                [(42, Ok(Verdict::Allow)), (666, Ok(Verdict::Block))]
            );
        });
        drop(queue);
        drop(client);
        fixture.finish();
    }

    // --- messages of variable length ------------------------------------------------------------

    /// A request as long as its bytes, up to 64 KiB: a long maximum that most messages are far
    /// from, as the firewall's requests with their whole image paths are.
    #[derive(Clone, Debug, PartialEq)]
    struct Blob(Vec<u8>);

    impl Message for Blob {
        const MIN_LEN: usize = 1;
        const MAX_LEN: usize = 65_536;

        fn encoded_len(&self) -> usize {
            self.0.len()
        }

        fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
            out.get_mut(..self.0.len())
                .ok_or(Malformed("short buffer"))?
                .copy_from_slice(&self.0);
            Ok(self.0.len())
        }

        fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
            Ok(Blob(bytes.to_vec()))
        }
    }

    struct Blobs;

    impl Protocol for Blobs {
        type Request = Blob;
        type Reply = Verdict;
    }

    const BLOB_PORT: &str = "\\WfpRsTestBlobPort";

    /// `send` allocates the message its `encoded_len`, not the protocol's maximum; and
    /// `send_encoded` sends bytes as they are, within the request's length bounds, or nothing.
    #[test]
    fn messages_are_sized_to_their_encoding_and_encoded_bytes_are_sent_as_they_are() {
        let machine = Machine::new();
        let driver = machine.load_driver("blobs", plain::DriverEntry).unwrap();
        let (filter, port) = driver
            .run_in_driver(&machine, |irql, d| {
                let filter = Filter::register(irql, d)?;
                let port = ServerPort::<Blobs>::create(irql, &filter, BLOB_PORT, 1, ())?;
                Ok::<_, Status>((filter, port))
            })
            .unwrap()
            .unwrap();
        let mut client = machine.port_client(BLOB_PORT);
        client.connect(&[]).unwrap();
        std::thread::scope(|s| {
            let service = s.spawn(|| {
                let mut received = Vec::new();
                for _ in 0..3 {
                    let message = client.get_message(None).expect("a message");
                    // While the driver waits, its message buffer is allocated: none of the
                    // SDK's blocks is anywhere near the protocol's 64 KiB.
                    let largest = machine
                        .pool_blocks()
                        .iter()
                        .filter(|b| b.tag == wfp_rs::pool::PoolTag::SDK)
                        .map(|b| b.size)
                        .max()
                        .unwrap_or(0);
                    assert!(largest < 4096, "an SDK block of {largest} bytes");
                    client
                        .reply(message.id, &verdict_bytes(Verdict::Allow))
                        .unwrap();
                    received.push(message.data);
                }
                received
            });
            let short = Blob(b"ten bytes!".to_vec());
            let sent = machine.at_passive(|irql| port.send(irql, &short, LONG));
            assert_eq!(sent, Ok(Verdict::Allow));
            let encoded = machine.at_passive(|irql| port.send_encoded(irql, b"as is", LONG));
            assert_eq!(encoded, Ok(Verdict::Allow));
            let longest = vec![7u8; Blob::MAX_LEN];
            let refused = [
                (vec![], "the request's length is outside MIN_LEN..=MAX_LEN"),
                (
                    vec![0u8; Blob::MAX_LEN + 1],
                    "the request's length is outside MIN_LEN..=MAX_LEN",
                ),
            ];
            for (bytes, reason) in refused {
                let result = machine.at_passive(|irql| port.send_encoded(irql, &bytes, LONG));
                assert_eq!(result, Err(SendError::Encode(Malformed(reason))));
            }
            let empty = machine.at_passive(|irql| port.send(irql, &Blob(vec![]), LONG));
            assert_eq!(
                empty,
                Err(SendError::Encode(Malformed(
                    "encoded_len returned a length outside MIN_LEN..=MAX_LEN"
                )))
            );
            // The longest is sent whole, from the caller's buffer: still no large SDK block.
            let whole = machine.at_passive(|irql| port.send_encoded(irql, &longest, LONG));
            assert_eq!(whole, Ok(Verdict::Allow));
            let received = service.join().unwrap();
            assert_eq!(received[0], b"ten bytes!");
            assert_eq!(received[1], b"as is");
            assert_eq!(received[2], longest);
        });
        drop(client);
        driver.run_in_driver(&machine, |irql, _| {
            port.close(irql);
            filter.close(irql);
        });
        machine.unload_driver(driver).unwrap();
        assert!(machine.pool_blocks().is_empty());
    }

    // --- message ids, replies, timeouts, disconnects -------------------------------------------

    #[test]
    fn replies_are_matched_to_their_messages_by_id() {
        let fixture = Fixture::new(1);
        let client = fixture.client();
        std::thread::scope(|s| {
            s.spawn(|| {
                // Both messages first, then the replies in reverse order.
                let first = client.get_message(None).unwrap();
                let second = client.get_message(None).unwrap();
                assert_ne!(first.id, second.id, "message ids are unique");
                for message in [&first, &second] {
                    assert_eq!(
                        message.reply_length as usize,
                        Verdict::MAX_LEN + core::mem::size_of::<sys::FILTER_REPLY_HEADER>(),
                        "the reply the driver waits for, header included"
                    );
                }
                client.reply(second.id, &policy(&second)).unwrap();
                client.reply(first.id, &policy(&first)).unwrap();
                assert_eq!(
                    client.reply(first.id, &policy(&first)),
                    Err(Status::FLT_NO_WAITER_FOR_REPLY),
                    "a message is answered once"
                );
            });
            let allowed = s.spawn(|| fixture.send(7, LONG));
            let blocked = s.spawn(|| fixture.send(666, LONG));
            assert_eq!(allowed.join().unwrap(), Ok(Verdict::Allow));
            assert_eq!(blocked.join().unwrap(), Ok(Verdict::Block));
        });
        drop(client);
        fixture.finish();
    }

    #[test]
    fn sending_without_a_client_is_not_connected() {
        let fixture = Fixture::new(1);
        assert!(!fixture.port().has_client());
        assert_eq!(fixture.send(1, LONG), Err(SendError::NotConnected));
        fixture.finish();
    }

    #[test]
    fn a_client_that_never_reads_times_out_and_never_sees_the_message() {
        let fixture = Fixture::new(1);
        let client = fixture.client();
        assert_eq!(fixture.send(1, SHORT), Err(SendError::Timeout));
        assert_eq!(
            client.get_message(Some(Duration::ZERO)),
            None,
            "a message that timed out before delivery is withdrawn"
        );
        drop(client);
        fixture.finish();
    }

    #[test]
    fn a_client_that_reads_but_never_replies_times_out_and_its_late_reply_finds_no_waiter() {
        let fixture = Fixture::new(1);
        let client = fixture.client();
        std::thread::scope(|s| {
            let reader = s.spawn(|| client.get_message(None).expect("delivered"));
            // A FilterGetMessage is pending: the message is delivered as it is sent.
            fixture.machine.wait_for_port_listener(PORT);
            assert_eq!(fixture.send(1, SHORT), Err(SendError::Timeout));
            let message = reader.join().unwrap();
            assert_eq!(Ask::decode(&message.data), Ok(Ask { pid: 1 }));
            assert_eq!(
                client.reply(message.id, &verdict_bytes(Verdict::Allow)),
                Err(Status::FLT_NO_WAITER_FOR_REPLY)
            );
        });
        drop(client);
        fixture.finish();
    }

    #[test]
    fn a_client_that_disconnects_before_replying_fails_the_send() {
        let fixture = Fixture::new(1);
        let mut client = fixture.client();
        std::thread::scope(|s| {
            s.spawn(|| {
                client.get_message(None).expect("a message");
                client.disconnect();
            });
            assert_eq!(fixture.send(1, LONG), Err(SendError::Disconnected));
        });
        let events = fixture.port().events();
        assert_eq!(events.connects.load(Ordering::SeqCst), 1);
        assert_eq!(events.disconnects.load(Ordering::SeqCst), 1);
        assert!(!fixture.port().has_client());
        fixture.finish();
    }

    #[test]
    fn disconnect_all_fails_a_waiting_send_at_once_and_later_sends_find_no_client() {
        let fixture = Fixture::new(2);
        let client = fixture.client();
        let (read, was_read) = mpsc::channel();
        let (client_ref, fixture_ref) = (&client, &fixture);
        let closed = std::thread::scope(|s| {
            s.spawn(move || {
                client_ref.get_message(None).expect("a message");
                read.send(()).unwrap();
                // Never replies: only the driver closing the connection ends the send.
            });
            let closer = s.spawn(move || {
                was_read.recv().unwrap();
                fixture_ref
                    .machine
                    .at_passive(|irql| fixture_ref.port().disconnect_all(irql))
            });
            assert_eq!(fixture.send(1, LONG), Err(SendError::Disconnected));
            closer.join().unwrap()
        });
        assert_eq!(closed, 1);
        assert!(!fixture.port().has_client());
        assert_eq!(fixture.send(2, LONG), Err(SendError::NotConnected));
        assert_eq!(
            fixture
                .machine
                .at_passive(|irql| fixture.port().disconnect_all(irql)),
            0,
            "nothing left to close"
        );
        drop(client);
        fixture.finish();
    }

    #[test]
    fn replies_are_validated_and_a_bad_one_is_an_error() {
        let fixture = Fixture::new(1);
        let client = fixture.client();
        let cases: Vec<(Vec<u8>, Result<Verdict, SendError>)> = vec![
            (b"V\x01".to_vec(), Ok(Verdict::Allow)),
            (b"V\x00\0\0\0\0\0\0".to_vec(), Ok(Verdict::Block)),
            (
                b"V\x01\0\0\0\0\0\0\0".to_vec(),
                Err(SendError::ReplyTooLong { max: 8 }),
            ),
            (
                b"V".to_vec(),
                Err(SendError::ReplyTooShort { len: 1, min: 2 }),
            ),
            (Vec::new(), Err(SendError::ReplyTooShort { len: 0, min: 2 })),
            (
                b"X\x01".to_vec(),
                Err(SendError::Malformed(Malformed("bad magic"))),
            ),
            (
                b"V\x02".to_vec(),
                Err(SendError::Malformed(Malformed("the verdict is 0 or 1"))),
            ),
            (
                b"V\x01\0\x07".to_vec(),
                Err(SendError::Malformed(Malformed(
                    "reserved bytes are not zero",
                ))),
            ),
        ];
        std::thread::scope(|s| {
            let replies: Vec<Vec<u8>> = cases.iter().map(|(reply, _)| reply.clone()).collect();
            let client = &client;
            s.spawn(move || {
                for reply in replies {
                    let message = client.get_message(None).unwrap();
                    // User mode is not told that its reply was too long for the driver.
                    client.reply(message.id, &reply).unwrap();
                }
            });
            for (pid, (reply, expected)) in cases.iter().enumerate() {
                assert_eq!(
                    &fixture.send(pid as u32, LONG),
                    expected,
                    "reply {reply:02x?}"
                );
            }
        });
        drop(client);
        fixture.finish();
    }

    #[test]
    fn a_notification_returns_once_the_client_has_it() {
        let machine = Machine::new();
        let driver = machine.load_driver("notify", plain::DriverEntry).unwrap();
        let (filter, port) = driver
            .run_in_driver(&machine, |irql, d| {
                let filter = Filter::register(irql, d)?;
                let port = ServerPort::<Notify>::create(irql, &filter, "\\Notify", 1, ())?;
                Ok::<_, Status>((filter, port))
            })
            .unwrap()
            .unwrap();
        let mut client = machine.port_client("\\Notify");
        client.connect(&[]).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| client.get_message(None).unwrap());
            assert_eq!(
                machine.at_passive(|irql| port.send(irql, &Ask { pid: 9 }, LONG)),
                Ok(())
            );
            let message = reader.join().unwrap();
            assert_eq!(message.reply_length, 0, "no reply is expected");
            assert_eq!(
                client.reply(message.id, &[]),
                Err(Status::FLT_NO_WAITER_FOR_REPLY)
            );
        });
        client.disconnect();
        driver.run_in_driver(&machine, |irql, _| {
            port.close(irql);
            filter.close(irql);
        });
        machine.unload_driver(driver).unwrap();
    }

    #[test]
    fn sends_take_turns_between_connected_clients() {
        let fixture = Fixture::new(2);
        let (first, second) = (fixture.client(), fixture.client());
        assert_eq!(fixture.port().connections(), 2);
        std::thread::scope(|s| {
            for client in [&first, &second] {
                s.spawn(move || {
                    let message = client.get_message(None).unwrap();
                    client.reply(message.id, &policy(&message)).unwrap();
                });
            }
            // Each client answers exactly one message, so both sends finish only if each went
            // to a different client.
            assert_eq!(fixture.send(1, LONG), Ok(Verdict::Allow));
            assert_eq!(fixture.send(666, LONG), Ok(Verdict::Block));
        });
        drop((first, second));
        fixture.finish();
    }

    // --- connections ------------------------------------------------------------------------

    #[test]
    fn only_administrators_and_system_may_connect() {
        let fixture = Fixture::new(1);
        let mut user = fixture.machine.port_client(PORT).as_standard_user();
        assert_eq!(user.connect(&[]), Err(Status::ACCESS_DENIED));
        assert!(!user.is_connected());
        let mut admin = fixture.machine.port_client(PORT);
        assert_eq!(admin.connect(&[]), Ok(()));
        assert!(admin.is_connected());
        assert_eq!(fixture.port().events().connects.load(Ordering::SeqCst), 1);
        drop((user, admin));
        fixture.finish();
    }

    #[test]
    fn the_port_accepts_at_most_its_maximum_of_connections() {
        let fixture = Fixture::new(1);
        let mut first = fixture.client();
        let mut second = fixture.machine.port_client(PORT);
        assert_eq!(second.connect(&[]), Err(Status::CONNECTION_COUNT_LIMIT));
        first.disconnect();
        assert_eq!(second.connect(&[]), Ok(()), "the slot is free again");
        drop(second);
        fixture.finish();
    }

    #[test]
    fn the_connect_callback_sees_the_context_and_may_refuse() {
        let events = Counting::default();
        events.require_context.store(true, Ordering::SeqCst);
        let fixture = Fixture::with_events(2, events);
        let mut stranger = fixture.machine.port_client(PORT);
        assert_eq!(stranger.connect(b"hello"), Err(Status::ACCESS_DENIED));
        let mut friend = fixture.machine.port_client(PORT);
        assert_eq!(friend.connect(&[1, 0]), Ok(()));
        let events = fixture.port().events();
        assert_eq!(
            *events.contexts.lock().unwrap(),
            [b"hello".to_vec(), vec![1, 0]]
        );
        assert_eq!(events.connects.load(Ordering::SeqCst), 1);
        assert_eq!(
            fixture.port().connections(),
            1,
            "the refusal freed its slot"
        );
        drop((stranger, friend));
        fixture.finish();
    }

    #[test]
    fn connecting_to_a_missing_port_fails() {
        let machine = Machine::new();
        let mut client = machine.port_client("\\Nobody");
        assert_eq!(client.connect(&[]), Err(Status::OBJECT_NAME_NOT_FOUND));
    }

    #[test]
    fn port_names_are_unique_and_the_events_come_back() {
        let fixture = Fixture::new(1);
        let driver = fixture.driver.as_ref().unwrap();
        let filter = fixture.filter.as_ref().unwrap();
        let error = driver
            .run_in_driver(&fixture.machine, |irql, _| {
                // Names are case-insensitive.
                ServerPort::<Firewall, Seven>::create(irql, filter, "\\wfprstestport", 1, Seven(7))
                    .unwrap_err()
            })
            .unwrap();
        assert_eq!(error.status, Status::OBJECT_NAME_COLLISION);
        assert_eq!(error.events.0, 7);
        let bad = driver
            .run_in_driver(&fixture.machine, |irql, _| {
                ServerPort::<Firewall>::create(irql, filter, "\\Other", 0, ()).unwrap_err()
            })
            .unwrap();
        assert_eq!(bad.status, Status::INVALID_PARAMETER);
        fixture.finish();
    }

    /// The port block is allocated and initialised in place (not built on the stack and
    /// moved): when its allocation fails, the events must still come back, and nothing leaks.
    #[test]
    fn the_events_come_back_when_the_port_block_cannot_be_allocated() {
        let fixture = Fixture::new(1);
        let driver = fixture.driver.as_ref().unwrap();
        let filter = fixture.filter.as_ref().unwrap();
        let before = fixture.machine.pool_blocks().len();
        // Fail each allocation of `create` in turn (the name's buffer, the block, what the
        // kernel allocates for it) until one attempt succeeds.
        let mut skip = 0;
        let port = loop {
            fixture.machine.fail_allocations(skip, 1);
            let result = driver
                .run_in_driver(&fixture.machine, |irql, _| {
                    ServerPort::<Firewall, Seven>::create(irql, filter, "\\Low", 1, Seven(8))
                })
                .unwrap();
            fixture.machine.fail_allocations(0, 0);
            match result {
                Ok(port) => break port,
                Err(error) => {
                    assert_eq!(error.status, Status::INSUFFICIENT_RESOURCES, "skip {skip}");
                    assert_eq!(error.events.0, 8, "skip {skip}");
                    assert_eq!(fixture.machine.pool_blocks().len(), before, "skip {skip}");
                }
            }
            skip += 1;
        };
        assert!(skip >= 2, "the name and the block are allocated: {skip}");
        assert_eq!(port.events().0, 8);
        driver
            .run_in_driver(&fixture.machine, |irql, _| port.close(irql))
            .unwrap();
        fixture.finish();
    }

    struct Seven(u8);

    impl PortEvents for Seven {}

    #[test]
    fn start_filtering_works_once() {
        let fixture = Fixture::new(1);
        let filter = fixture.filter.as_ref().unwrap();
        let results = fixture
            .machine
            .at_passive(|irql| (filter.start_filtering(irql), filter.start_filtering(irql)));
        assert_eq!(results, (Ok(()), Err(Status::INVALID_PARAMETER)));
        fixture.finish();
    }

    // --- unload -------------------------------------------------------------------------------

    mod stateful {
        use super::*;

        pub static DISCONNECTS: AtomicU32 = AtomicU32::new(0);

        pub struct Events;

        impl PortEvents for Events {
            fn disconnected(&self, _irql: &mut PassiveLevel<'_>, _connection: ConnectionId) {
                DISCONNECTS.fetch_add(1, Ordering::SeqCst);
            }
        }

        /// The shape of a real driver: the filter and the port live in the state.
        pub struct State<E: PortEvents = Events> {
            pub _filter: Filter,
            pub _port: ServerPort<Firewall, E>,
        }

        impl<E: PortEvents> DriverState for State<E> {}

        /// Registers the filter and creates the port `name` (one connection) with `events`.
        pub fn register<E: PortEvents>(
            irql: &mut PassiveLevel<'_>,
            driver: &mut Driver<'_>,
            name: &str,
            events: E,
        ) -> Result<State<E>, Status> {
            let filter = Filter::register(irql, driver)?;
            let port = ServerPort::create(irql, &filter, name, 1, events)?;
            Ok(State {
                _filter: filter,
                _port: port,
            })
        }

        #[wfp_rs::driver_entry]
        fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<State, Status> {
            register(irql, driver, "\\Stateful", Events)
        }
    }

    #[test]
    fn unload_closes_the_port_disconnects_clients_and_runs_clean() {
        let machine = Machine::new();
        let driver = machine
            .load_driver("stateful", stateful::DriverEntry)
            .unwrap();
        let mut client = machine.port_client("\\Stateful");
        client.connect(&[]).unwrap();
        machine.unload_driver(driver).unwrap();
        assert_eq!(stateful::DISCONNECTS.load(Ordering::SeqCst), 1);
        assert!(!client.is_connected());
        assert_eq!(client.get_message(None), None, "the connection is gone");
        assert!(machine.pool_blocks().is_empty());
        // The name is free again, and the driver loads again.
        let driver = machine
            .load_driver("stateful", stateful::DriverEntry)
            .unwrap();
        machine.unload_driver(driver).unwrap();
    }

    /// A driver whose `ConnectNotify` waits at a gate the test opens: a process connecting while
    /// the driver unloads.
    mod slow_connect {
        use super::*;
        use wfp_rs_tests::race::Gate;

        pub static DISCONNECTS: AtomicU32 = AtomicU32::new(0);
        /// Where `ConnectNotify` waits.
        pub static CONNECTING: Gate = Gate::new();

        pub struct Events;

        impl PortEvents for Events {
            fn connected(
                &self,
                _irql: &mut PassiveLevel<'_>,
                _connection: ConnectionId,
                _context: &[u8],
            ) -> Result<(), Status> {
                CONNECTING.pass();
                Ok(())
            }

            fn disconnected(&self, _irql: &mut PassiveLevel<'_>, _connection: ConnectionId) {
                DISCONNECTS.fetch_add(1, Ordering::SeqCst);
            }
        }

        #[wfp_rs::driver_entry]
        fn entry(
            irql: &mut PassiveLevel<'_>,
            driver: &mut Driver<'_>,
        ) -> Result<stateful::State<Events>, Status> {
            stateful::register(irql, driver, "\\SlowConnect", Events)
        }
    }

    /// A process connecting while the driver unloads: its `ConnectNotify` runs in the driver,
    /// so `FltUnregisterFilter` waits for it (INFERRED: the callback holds a reference on the
    /// filter), and then disconnects the connection it accepted. A simulator that did not wait
    /// unloaded the driver (and freed the port the callback was using) with its code still
    /// running.
    #[test]
    fn a_connect_in_progress_holds_the_unload_until_its_callback_returns() {
        let machine = Machine::new();
        let driver = machine
            .load_driver("slow-connect", slow_connect::DriverEntry)
            .unwrap();
        std::thread::scope(|scope| {
            let connecting = scope.spawn(|| {
                let mut client = machine.port_client("\\SlowConnect");
                let connected = client.connect(&[]);
                (connected, client)
            });
            slow_connect::CONNECTING.wait_for_a_routine();
            let unloading = scope.spawn(|| machine.unload_driver(driver));
            wfp_rs_tests::race::assert_keeps_waiting(
                &unloading,
                "the driver unloaded while its ConnectNotify was still running",
            );
            slow_connect::CONNECTING.open();
            unloading.join().unwrap().unwrap();
            let (connected, client) = connecting.join().unwrap();
            assert_eq!(connected, Ok(()), "the driver accepted the connection");
            assert!(!client.is_connected(), "the unload disconnected it");
        });
        assert_eq!(slow_connect::DISCONNECTS.load(Ordering::SeqCst), 1);
        assert!(machine.pool_blocks().is_empty());
    }

    /// A `ConnectNotify` that never returns: Windows' `FltUnregisterFilter` waits for it forever;
    /// the simulator stops after the unload wait limit and says which callbacks it waited for.
    #[test]
    fn a_connect_callback_that_never_returns_stops_the_unload() {
        let outcome = run_isolated(
            "sim::a_connect_callback_that_never_returns_stops_the_unload",
            || {
                let machine = Machine::new();
                machine.set_unload_wait_limit(Duration::from_millis(200));
                let driver = machine
                    .load_driver("slow-connect", slow_connect::DriverEntry)
                    .unwrap();
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        let mut client = machine.port_client("\\SlowConnect");
                        let _ = client.connect(&[]);
                    });
                    slow_connect::CONNECTING.wait_for_a_routine();
                    let _ = machine.unload_driver(driver);
                });
            },
        );
        let report = outcome
            .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
        assert_eq!(
            report.params[3],
            wfp_rs::bugcheck::unload_wait::PORT_CALLBACKS,
            "{}",
            outcome.stderr
        );
        assert!(
            report.explanation.contains(
                "waited 0.2 s for 1 ConnectNotify or DisconnectNotify call(s) by connecting or disconnecting processes to return (FltUnregisterFilter waits for them)"
            ),
            "{}",
            outcome.stderr
        );
    }

    mod forgets {
        use super::*;

        pub struct KeepsFilter {
            _filter: Filter,
        }
        impl DriverState for KeepsFilter {}

        /// Forgets its port: the filter is dropped at unload, but the port keeps it registered.
        #[wfp_rs::driver_entry]
        fn entry(
            irql: &mut PassiveLevel<'_>,
            driver: &mut Driver<'_>,
        ) -> Result<KeepsFilter, Status> {
            let filter = Filter::register(irql, driver)?;
            let port = ServerPort::<Firewall>::create(irql, &filter, "\\Forgotten", 1, ())?;
            core::mem::forget(port);
            Ok(KeepsFilter { _filter: filter })
        }

        pub mod filter {
            use super::*;

            /// Forgets its filter.
            #[wfp_rs::driver_entry]
            fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<(), Status> {
                core::mem::forget(Filter::register(irql, driver)?);
                Ok(())
            }
        }
    }

    /// Runs `scenario` in a child process; it must stop with 0xCE for an object of `kind`
    /// (parameter 3: 1 server port, 2 client connection, 3 filter).
    fn expect_unload_stop(test: &str, kind: usize, scenario: impl FnOnce()) {
        let outcome = run_isolated(test, scenario);
        let report = outcome
            .expect_bugcheck(BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS);
        assert_eq!(report.params[2], kind, "kind\n{}", outcome.stderr);
        assert_eq!(report.params[3], 1, "count\n{}", outcome.stderr);
    }

    #[test]
    fn unloading_with_the_port_open_stops() {
        expect_unload_stop("sim::unloading_with_the_port_open_stops", 1, || {
            let machine = Machine::new();
            let driver = machine
                .load_driver("forgets", forgets::DriverEntry)
                .unwrap();
            let _ = machine.unload_driver(driver);
        });
    }

    #[test]
    fn unloading_with_the_filter_registered_stops() {
        expect_unload_stop("sim::unloading_with_the_filter_registered_stops", 3, || {
            let machine = Machine::new();
            let driver = machine
                .load_driver("forgets", forgets::filter::DriverEntry)
                .unwrap();
            let _ = machine.unload_driver(driver);
        });
    }

    #[test]
    fn unloading_with_a_client_connection_open_stops() {
        expect_unload_stop(
            "sim::unloading_with_a_client_connection_open_stops",
            2,
            || {
                let mut fixture = Fixture::new(1);
                let client = fixture.client();
                let driver = fixture.driver.take().unwrap();
                let (port, filter) = (fixture.port.take().unwrap(), fixture.filter.take());
                driver.run_in_driver(&fixture.machine, |irql, _| port.close(irql));
                // The filter (and with it the connection) is never closed.
                core::mem::forget(filter);
                let _ = fixture.machine.unload_driver(driver);
                drop(client);
            },
        );
    }

    bugcheck_test! {
        /// On Windows FltUnregisterFilter with a server port open waits forever; the simulator
        /// stops instead.
        fn unregistering_the_filter_with_its_port_open_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
            let fixture = Fixture::new(1);
            let filter = fixture.filter.as_ref().unwrap().raw();
            fixture.driver.as_ref().unwrap().run_in_driver(&fixture.machine, |_irql, _| {
                // SAFETY: deliberately unregistering under the port's feet.
                unsafe { sys::FltUnregisterFilter(filter) };
            });
        }
    }

    bugcheck_test! {
        /// The default security descriptor is pool charged to the driver: one never freed with
        /// FltFreeSecurityDescriptor is a leak at unload.
        fn a_security_descriptor_never_freed_is_a_pool_leak() expects DRIVER_VERIFIER_DETECTED_VIOLATION (verifier::POOL_LEAKED_AT_UNLOAD) {
            let machine = Machine::new();
            let driver = machine.load_driver("sd", plain::DriverEntry).unwrap();
            driver.run_in_driver(&machine, |_irql, _| {
                let mut descriptor = null_mut();
                // SAFETY: a valid call whose result is deliberately never freed.
                let status = unsafe {
                    sys::FltBuildDefaultSecurityDescriptor(&mut descriptor, sys::FLT_PORT_ALL_ACCESS)
                };
                assert_eq!(status, 0);
            });
            let _ = machine.unload_driver(driver);
        }
    }

    /// A C-style driver: sets its unload routine, then registers a filter without a
    /// FilterUnloadCallback, which makes the filter manager take the unload routine away.
    unsafe extern "system" fn c_style_entry(
        object: *mut sys::DRIVER_OBJECT,
        _path: *const sys::UNICODE_STRING,
    ) -> sys::NTSTATUS {
        unsafe extern "system" fn unload(_object: *mut sys::DRIVER_OBJECT) {}
        // SAFETY: the I/O manager passes our driver object.
        unsafe { (*object).DriverUnload = Some(unload) };
        // SAFETY: a zeroed registration is valid (no callbacks); the out pointer is a local.
        let mut registration: sys::FLT_REGISTRATION = unsafe { core::mem::zeroed() };
        registration.Size = core::mem::size_of::<sys::FLT_REGISTRATION>() as u16;
        registration.Version = sys::FLT_REGISTRATION_VERSION;
        let mut filter = null_mut();
        // SAFETY: as above.
        unsafe { sys::FltRegisterFilter(object, &registration, &mut filter) }
    }

    #[test]
    fn a_filter_without_unload_callback_takes_the_unload_routine_but_sdk_drivers_keep_theirs() {
        let machine = Machine::new();
        let c_driver = machine.load_driver("c-style", c_style_entry).unwrap();
        assert!(matches!(
            machine.unload_driver(c_driver),
            Err(UnloadError::NotUnloadable(_))
        ));
        // The SDK installs its unload routine after the entry function returned, so a driver
        // that registers its filter in its entry function stays unloadable.
        let sdk_driver = machine
            .load_driver("stateful", stateful::DriverEntry)
            .unwrap();
        machine.unload_driver(sdk_driver).unwrap();
    }

    // --- low memory ---------------------------------------------------------------------------

    #[test]
    fn every_allocation_failure_is_reported_and_leaks_nothing() {
        fn blocks(machine: &Machine) -> Vec<String> {
            let mut blocks: Vec<String> = machine
                .pool_blocks()
                .iter()
                .map(|b| format!("{} {}", b.tag, b.size))
                .collect();
            blocks.sort();
            blocks
        }
        let machine = Machine::new();
        let driver = machine.load_driver("lowmem", plain::DriverEntry).unwrap();
        let baseline = blocks(&machine);
        let mut client = machine.port_client(PORT);
        let mut failures = 0;
        for skip in 0.. {
            machine.fail_allocations(skip, 1);
            let created = driver
                .run_in_driver(&machine, |irql, d| {
                    let filter = Filter::register(irql, d)?;
                    match ServerPort::<Firewall>::create(irql, &filter, PORT, 1, ()) {
                        Ok(port) => Ok((filter, port)),
                        Err(error) => {
                            filter.close(irql);
                            Err(error.status)
                        }
                    }
                })
                .unwrap();
            let outcome = match created {
                Err(status) => Err(SendError::Status(status)),
                Ok((filter, port)) => {
                    client.connect(&[]).unwrap();
                    let mut handles = Some((filter, port));
                    let outcome = std::thread::scope(|s| {
                        let reader = &client;
                        s.spawn(move || {
                            if let Some(message) = reader.get_message(None) {
                                let _ = reader.reply(message.id, &policy(&message));
                            }
                        });
                        let (_, port) = handles.as_ref().unwrap();
                        let outcome =
                            machine.at_passive(|irql| port.send(irql, &Ask { pid: 5 }, LONG));
                        // Unregistering the filter breaks the connection, which also releases
                        // a reader still waiting for a message that failed to go out.
                        let (filter, port) = handles.take().unwrap();
                        driver.run_in_driver(&machine, |irql, _| {
                            port.close(irql);
                            filter.close(irql);
                        });
                        outcome
                    });
                    client.disconnect();
                    outcome
                }
            };
            match outcome {
                Ok(verdict) => assert_eq!(verdict, Verdict::Allow),
                Err(error) => {
                    assert_eq!(
                        error,
                        SendError::Status(Status::INSUFFICIENT_RESOURCES),
                        "allocation {skip}"
                    );
                    failures += 1;
                }
            }
            assert_eq!(blocks(&machine), baseline, "allocation {skip}");
            if machine.pending_allocation_failures() == 1 {
                machine.fail_allocations(0, 0);
                break;
            }
        }
        // Filter block, registration, port block, the port name in UTF-16 (a `Vec`, through the
        // global allocator), descriptor, port creation, request buffer, reply buffer, the message
        // inside FltSendMessage.
        assert_eq!(failures, 9, "allocation points exercised");
        machine.unload_driver(driver).unwrap();
        assert!(machine.pool_blocks().is_empty());
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn both<T: Send + Sync>() {}
        both::<Filter>();
        both::<ServerPort<Firewall, Counting>>();
        both::<PortClient>();
    }
}
