//! The wire protocol of the simulator's user-mode bridge, shared by its server (in `wfp-rs-sim`,
//! `Machine::serve_user_mode`) and its client (the simulator backend of `wfp_rs::user`), so
//! the two cannot disagree: a simulated machine's communication ports and devices, served on a
//! Unix domain socket so that a user-mode service can be another process.
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

#[allow(unused_imports)]
use std::{boxed::Box, string::String, vec::Vec};

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The largest frame either side accepts (a message, a reply or an output buffer is far smaller).
const MAX_FRAME: usize = 16 << 20;

/// A request from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
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
pub enum Answer {
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

/// The error for a frame that does not decode.
pub fn malformed() -> io::Error {
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
    pub fn encode(&self) -> Vec<u8> {
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

    pub fn decode(bytes: &[u8]) -> io::Result<Call> {
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
    pub fn encode(&self) -> Vec<u8> {
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

    pub fn decode(bytes: &[u8]) -> io::Result<Answer> {
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
pub fn write_frame(stream: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| malformed())?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)
}

/// Reads one frame; `Ok(None)` if the stream ended cleanly before it.
pub fn read_frame(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
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
pub fn exchange(stream: &mut UnixStream, call: &Call) -> io::Result<Answer> {
    write_frame(stream, &call.encode())?;
    match read_frame(stream)? {
        Some(body) => Answer::decode(&body),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the simulator's user-mode bridge closed the stream",
        )),
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
