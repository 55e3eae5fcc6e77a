//! The user-mode bridge: a simulated machine's communication ports and devices, served on a Unix
//! domain socket so that a user-mode service can be another process ([`crate::user`] is the
//! client).
//!
//! # The protocol
//!
//! Every message is a frame: a little-endian `u32` length, then that many bytes. A client opens
//! one stream per port connection or device handle (the *owner* stream) and sends
//! [`Call::PortConnect`] or [`Call::DeviceOpen`] on it; the answer carries the session id. The
//! session lives as long as the owner stream: when it closes — the client dropped its handle, or
//! its process died — the bridge closes the connection (`CloseHandle`), which disconnects the
//! port or cancels the device's requests exactly as Windows does for a dying process.
//!
//! Every other call names its session and travels on a stream of its own (one call, one answer),
//! so that a call that blocks (`FilterGetMessage`, waiting for an I/O request) does not hold up
//! the others, as on Windows where one handle serves several threads.
//!
//! The only other call on an owner stream is [`Call::DeviceClose`]: it closes the device handle
//! (cancelling its requests) while the operations started on it can still be waited for.

// The client half (`exchange`, `Call::encode`, `Answer::decode`) is used by `wfp_rs::user`.
#![cfg_attr(
    not(feature = "user"),
    allow(
        dead_code,
        reason = "the client half is used by wfp_rs::user (feature `user`)"
    )
)]

#[allow(unused_imports)]
use std::{boxed::Box, string::String, vec::Vec};

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::sys::sim::irp::{Caller, DeviceHandle, IoRequest};
use crate::sys::sim::kernel::Kernel;

/// The largest frame either side accepts (a message, a reply or an output buffer is far smaller).
const MAX_FRAME: usize = 16 << 20;

/// A request from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// `FilterConnectCommunicationPort`: opens a port session (owner stream).
    PortConnect { name: String, context: Vec<u8> },
    /// `FilterGetMessage`.
    GetMessage {
        session: u64,
        timeout: Option<Duration>,
    },
    /// `FilterReplyMessage`.
    Reply {
        session: u64,
        message_id: u64,
        reply: Vec<u8>,
    },
    /// `CreateFile` on a device: opens a device session (owner stream).
    DeviceOpen { path: String },
    /// `DeviceIoControl` with an `OVERLAPPED`: starts an operation.
    IoControl {
        session: u64,
        code: u32,
        input: Vec<u8>,
        output_len: u64,
    },
    /// Waits for an operation, at most `timeout`.
    Wait {
        session: u64,
        operation: u64,
        timeout: Option<Duration>,
    },
    /// `CancelIoEx` for one operation.
    Cancel { session: u64, operation: u64 },
    /// Forgets a completed operation.
    Release { session: u64, operation: u64 },
    /// `CloseHandle` on the device (owner stream only).
    DeviceClose,
}

/// The bridge's answer to a [`Call`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Success, with a session id, an operation id, a flag or 0.
    Done(u64),
    /// The simulated call failed with this `NTSTATUS`.
    Failed(i32),
    /// A message from the driver.
    Message {
        id: u64,
        reply_length: u32,
        data: Vec<u8>,
    },
    /// `FilterGetMessage` found no message within its timeout (a broken connection is
    /// `Failed(STATUS_PORT_DISCONNECTED)`).
    NoMessage,
    /// The operation completed.
    Completed {
        status: i32,
        information: u64,
        output: Vec<u8>,
    },
    /// The operation is still pending.
    Pending,
    /// The call named a session or operation the bridge does not know.
    Unknown,
}

// --- encoding ---------------------------------------------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    fn timeout(&mut self, v: Option<Duration>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(t) => self.u8(1).u64(t.as_secs()).u32(t.subsec_nanos()),
        }
    }
}

struct Reader<'a>(&'a [u8]);

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed bridge frame")
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| malformed())?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| malformed())?))
    }
    fn i32(&mut self) -> io::Result<i32> {
        Ok(self.u32()?.cast_signed())
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed())
    }
    fn timeout(&mut self) -> io::Result<Option<Duration>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(Duration::new(self.u64()?, self.u32()?)),
        })
    }
    fn end(&self) -> io::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(malformed())
        }
    }
}

impl Call {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Call::PortConnect { name, context } => w.u8(1).bytes(name.as_bytes()).bytes(context),
            Call::GetMessage { session, timeout } => w.u8(2).u64(*session).timeout(*timeout),
            Call::Reply {
                session,
                message_id,
                reply,
            } => w.u8(3).u64(*session).u64(*message_id).bytes(reply),
            Call::DeviceOpen { path } => w.u8(4).bytes(path.as_bytes()),
            Call::IoControl {
                session,
                code,
                input,
                output_len,
            } => w
                .u8(5)
                .u64(*session)
                .u32(*code)
                .bytes(input)
                .u64(*output_len),
            Call::Wait {
                session,
                operation,
                timeout,
            } => w.u8(6).u64(*session).u64(*operation).timeout(*timeout),
            Call::Cancel { session, operation } => w.u8(7).u64(*session).u64(*operation),
            Call::Release { session, operation } => w.u8(8).u64(*session).u64(*operation),
            Call::DeviceClose => w.u8(9),
        };
        w.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> io::Result<Call> {
        let mut r = Reader(bytes);
        let call = match r.u8()? {
            1 => Call::PortConnect {
                name: r.string()?,
                context: r.bytes()?,
            },
            2 => Call::GetMessage {
                session: r.u64()?,
                timeout: r.timeout()?,
            },
            3 => Call::Reply {
                session: r.u64()?,
                message_id: r.u64()?,
                reply: r.bytes()?,
            },
            4 => Call::DeviceOpen { path: r.string()? },
            5 => Call::IoControl {
                session: r.u64()?,
                code: r.u32()?,
                input: r.bytes()?,
                output_len: r.u64()?,
            },
            6 => Call::Wait {
                session: r.u64()?,
                operation: r.u64()?,
                timeout: r.timeout()?,
            },
            7 => Call::Cancel {
                session: r.u64()?,
                operation: r.u64()?,
            },
            8 => Call::Release {
                session: r.u64()?,
                operation: r.u64()?,
            },
            9 => Call::DeviceClose,
            _ => return Err(malformed()),
        };
        r.end()?;
        Ok(call)
    }
}

impl Answer {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Answer::Done(v) => w.u8(1).u64(*v),
            Answer::Failed(status) => w.u8(2).u32(status.cast_unsigned()),
            Answer::Message {
                id,
                reply_length,
                data,
            } => w.u8(3).u64(*id).u32(*reply_length).bytes(data),
            Answer::NoMessage => w.u8(4),
            Answer::Completed {
                status,
                information,
                output,
            } => w
                .u8(5)
                .u32(status.cast_unsigned())
                .u64(*information)
                .bytes(output),
            Answer::Pending => w.u8(6),
            Answer::Unknown => w.u8(7),
        };
        w.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> io::Result<Answer> {
        let mut r = Reader(bytes);
        let answer = match r.u8()? {
            1 => Answer::Done(r.u64()?),
            2 => Answer::Failed(r.i32()?),
            3 => Answer::Message {
                id: r.u64()?,
                reply_length: r.u32()?,
                data: r.bytes()?,
            },
            4 => Answer::NoMessage,
            5 => Answer::Completed {
                status: r.i32()?,
                information: r.u64()?,
                output: r.bytes()?,
            },
            6 => Answer::Pending,
            7 => Answer::Unknown,
            _ => return Err(malformed()),
        };
        r.end()?;
        Ok(answer)
    }
}

/// Writes one frame.
pub(crate) fn write_frame(stream: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| malformed())?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)
}

/// Reads one frame; `Ok(None)` if the stream ended cleanly before it.
pub(crate) fn read_frame(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(malformed());
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Sends `call` and reads the answer (the client's half of one exchange).
pub(crate) fn exchange(stream: &mut UnixStream, call: &Call) -> io::Result<Answer> {
    write_frame(stream, &call.encode())?;
    match read_frame(stream)? {
        Some(body) => Answer::decode(&body),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the simulator's user-mode bridge closed the stream",
        )),
    }
}

// --- the server -------------------------------------------------------------------------------

/// One open port connection or device handle of a client.
enum Session {
    Port {
        client: usize,
        open: AtomicBool,
    },
    Device {
        handle: Mutex<Option<DeviceHandle>>,
        operations: Mutex<HashMap<u64, Arc<IoRequest>>>,
    },
}

struct Shared {
    kernel: Arc<Kernel>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Every stream accepted and not finished, to shut them down when the bridge stops.
    streams: Mutex<HashMap<u64, UnixStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn session(&self, id: u64) -> Option<Arc<Session>> {
        lock(&self.sessions).get(&id).cloned()
    }

    /// Serves one accepted stream until it ends.
    fn serve(self: &Arc<Self>, mut stream: UnixStream) -> io::Result<()> {
        let Some(body) = read_frame(&mut stream)? else {
            return Ok(());
        };
        let call = Call::decode(&body)?;
        match call {
            Call::PortConnect { name, context } => {
                match crate::sys::sim::flt::user_connect(&self.kernel, &name, &context, true) {
                    Ok(client) => {
                        let session = Arc::new(Session::Port {
                            client,
                            open: AtomicBool::new(true),
                        });
                        self.own(stream, session)
                    }
                    Err(status) => write_frame(&mut stream, &Answer::Failed(status).encode()),
                }
            }
            Call::DeviceOpen { path } => {
                match crate::sys::sim::irp::open(&self.kernel, &path, Caller::System) {
                    Ok(handle) => {
                        let session = Arc::new(Session::Device {
                            handle: Mutex::new(Some(handle)),
                            operations: Mutex::new(HashMap::new()),
                        });
                        self.own(stream, session)
                    }
                    Err(status) => write_frame(&mut stream, &Answer::Failed(status.raw()).encode()),
                }
            }
            call => {
                let answer = self.answer(call);
                write_frame(&mut stream, &answer.encode())
            }
        }
    }

    /// Registers `session`, answers with its id, and closes it when the owner stream ends.
    fn own(&self, mut stream: UnixStream, session: Arc<Session>) -> io::Result<()> {
        let id = self.id();
        lock(&self.sessions).insert(id, Arc::clone(&session));
        let result = (|| {
            write_frame(&mut stream, &Answer::Done(id).encode())?;
            while let Some(body) = read_frame(&mut stream)? {
                if Call::decode(&body)? != Call::DeviceClose {
                    return Err(malformed());
                }
                if let Session::Device { handle, .. } = &*session {
                    let handle = lock(handle).take();
                    drop(handle);
                }
                write_frame(&mut stream, &Answer::Done(0).encode())?;
            }
            Ok(())
        })();
        // The client closed its handle or died: close the session as Windows closes the handles
        // of an exiting process.
        lock(&self.sessions).remove(&id);
        match &*session {
            Session::Port { client, open } => {
                if open.swap(false, Ordering::SeqCst) {
                    crate::sys::sim::flt::user_disconnect(&self.kernel, *client);
                }
            }
            Session::Device { handle, .. } => {
                let handle = lock(handle).take();
                drop(handle);
            }
        }
        result
    }

    /// Answers a call on a session.
    fn answer(&self, call: Call) -> Answer {
        use crate::sys::sim::flt;
        let session_id = match &call {
            Call::GetMessage { session, .. }
            | Call::Reply { session, .. }
            | Call::IoControl { session, .. }
            | Call::Wait { session, .. }
            | Call::Cancel { session, .. }
            | Call::Release { session, .. } => *session,
            _ => return Answer::Unknown,
        };
        let Some(session) = self.session(session_id) else {
            return Answer::Unknown;
        };
        match (&*session, call) {
            (Session::Port { client, open }, Call::GetMessage { timeout, .. }) => {
                let disconnected = Answer::Failed(crate::Status::PORT_DISCONNECTED.raw());
                if !open.load(Ordering::SeqCst) {
                    return disconnected;
                }
                match flt::user_get_message(&self.kernel, *client, timeout) {
                    Some(m) => Answer::Message {
                        id: m.id,
                        reply_length: m.reply_length,
                        data: m.data,
                    },
                    // No message: the timeout passed, or the connection broke — which the
                    // client must hear as an error, not as "nothing yet".
                    None if flt::user_is_connected(&self.kernel, *client) => Answer::NoMessage,
                    None => disconnected,
                }
            }
            (
                Session::Port { client, open },
                Call::Reply {
                    message_id, reply, ..
                },
            ) => {
                if !open.load(Ordering::SeqCst) {
                    return Answer::Failed(crate::Status::PORT_DISCONNECTED.raw());
                }
                match flt::user_reply(&self.kernel, *client, message_id, &reply) {
                    Ok(()) => Answer::Done(0),
                    Err(status) => Answer::Failed(status),
                }
            }
            (
                Session::Device { handle, operations },
                Call::IoControl {
                    code,
                    input,
                    output_len,
                    ..
                },
            ) => {
                let request = match &*lock(handle) {
                    Some(handle) => handle.device_io_control(
                        code,
                        &input,
                        usize::try_from(output_len).unwrap_or(usize::MAX),
                    ),
                    None => return Answer::Failed(crate::Status::INVALID_HANDLE.raw()),
                };
                let id = self.id();
                lock(operations).insert(id, Arc::new(request));
                Answer::Done(id)
            }
            (
                Session::Device { operations, .. },
                Call::Wait {
                    operation, timeout, ..
                },
            ) => {
                let Some(request) = lock(operations).get(&operation).cloned() else {
                    return Answer::Unknown;
                };
                let completion = match timeout {
                    None => Some(request.wait()),
                    Some(timeout) => request.wait_timeout(timeout),
                };
                match completion {
                    Some(c) => Answer::Completed {
                        status: c.status,
                        information: c.information as u64,
                        output: c.output,
                    },
                    None => Answer::Pending,
                }
            }
            (Session::Device { operations, .. }, Call::Cancel { operation, .. }) => {
                match lock(operations).get(&operation).cloned() {
                    Some(request) => Answer::Done(u64::from(request.cancel())),
                    None => Answer::Unknown,
                }
            }
            (Session::Device { operations, .. }, Call::Release { operation, .. }) => {
                match lock(operations).remove(&operation) {
                    Some(_) => Answer::Done(0),
                    None => Answer::Unknown,
                }
            }
            _ => Answer::Unknown,
        }
    }
}

/// A simulated machine's communication ports and devices served to user-mode processes on a Unix
/// domain socket: see [`Machine::serve_user_mode`](super::Machine::serve_user_mode). Dropping it
/// stops the bridge: it closes every client's port connections and device handles (as if every
/// client process exited), waits for its threads and removes the socket file.
pub struct UserModeBridge {
    shared: Arc<Shared>,
    path: PathBuf,
    listener: Option<JoinHandle<()>>,
}

impl core::fmt::Debug for UserModeBridge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UserModeBridge")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl UserModeBridge {
    pub(crate) fn start(kernel: Arc<Kernel>, path: &Path) -> io::Result<UserModeBridge> {
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared {
            kernel,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accepting = Arc::clone(&shared);
        let listener = std::thread::Builder::new()
            .name("wfp-rs user-mode bridge".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if accepting.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let id = accepting.id();
                    if let Ok(clone) = stream.try_clone() {
                        lock(&accepting.streams).insert(id, clone);
                    }
                    let serving = Arc::clone(&accepting);
                    let thread = std::thread::spawn(move || {
                        // A client that breaks the protocol or dies mid-frame loses its stream;
                        // the bridge goes on serving the others.
                        let _ = serving.serve(stream);
                        lock(&serving.streams).remove(&id);
                    });
                    let mut threads = lock(&accepting.threads);
                    threads.retain(|t| !t.is_finished());
                    threads.push(thread);
                }
            })?;
        Ok(UserModeBridge {
            shared,
            path: path.to_path_buf(),
            listener: Some(listener),
        })
    }

    /// The socket's path: the value for `WFP_RS_SIM_SOCKET` in a client process.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UserModeBridge {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accepting thread, which then sees `stopping`.
        drop(UnixStream::connect(&self.path));
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        for stream in lock(&self.shared.streams).values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // Owner streams end: their sessions close, which ends blocked calls on them.
        let threads = core::mem::take(&mut *lock(&self.shared.threads));
        for thread in threads {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_and_answer_survives_the_wire_and_truncation_is_refused() {
        let calls = [
            Call::PortConnect {
                name: "\\P".into(),
                context: vec![1, 2],
            },
            Call::GetMessage {
                session: 3,
                timeout: Some(Duration::new(4, 5)),
            },
            Call::GetMessage {
                session: 3,
                timeout: None,
            },
            Call::Reply {
                session: 1,
                message_id: u64::MAX,
                reply: vec![9; 3],
            },
            Call::DeviceOpen {
                path: r"\\.\D".into(),
            },
            Call::IoControl {
                session: 2,
                code: 0x8000_2000,
                input: vec![7],
                output_len: 32,
            },
            Call::Wait {
                session: 2,
                operation: 6,
                timeout: Some(Duration::ZERO),
            },
            Call::Cancel {
                session: 2,
                operation: 6,
            },
            Call::Release {
                session: 2,
                operation: 6,
            },
            Call::DeviceClose,
        ];
        for call in calls {
            let bytes = call.encode();
            assert_eq!(Call::decode(&bytes).unwrap(), call);
            assert!(Call::decode(&bytes[..bytes.len() - 1]).is_err(), "{call:?}");
        }
        let answers = [
            Answer::Done(5),
            Answer::Failed(crate::Status::CANCELLED.raw()),
            Answer::Message {
                id: 1,
                reply_length: 24,
                data: vec![1, 2, 3],
            },
            Answer::NoMessage,
            Answer::Completed {
                status: 0,
                information: 2,
                output: vec![4, 5],
            },
            Answer::Pending,
            Answer::Unknown,
        ];
        for answer in answers {
            let bytes = answer.encode();
            assert_eq!(Answer::decode(&bytes).unwrap(), answer);
            assert!(
                Answer::decode(&bytes[..bytes.len() - 1]).is_err(),
                "{answer:?}"
            );
        }
        let mut framed = Vec::new();
        write_frame(&mut framed, b"abc").unwrap();
        let mut reader = &framed[..];
        assert_eq!(
            read_frame(&mut reader).unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(read_frame(&mut reader).unwrap(), None, "a clean end");
        assert!(read_frame(&mut &framed[..5]).is_err(), "a frame cut short");
    }
}
