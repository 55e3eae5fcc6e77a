//! The simulator backend of [`crate::user`]: a client of the bridge a simulated machine serves
//! (`wfp_rs_sim::Machine::serve_user_mode`), through its Unix domain socket.

#[allow(unused_imports)]
use std::{borrow::ToOwned, format, string::String, vec::Vec};

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::{Request, SIM_SOCKET_VARIABLE, cancelled, closed};
use crate::__sim::bridge::{Answer, Call, exchange};
use crate::Status;

/// The bridge's socket, from [`SIM_SOCKET_VARIABLE`].
fn socket_from_environment() -> io::Result<PathBuf> {
    std::env::var_os(SIM_SOCKET_VARIABLE)
        .map(PathBuf::from)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{SIM_SOCKET_VARIABLE} is not set: the simulator backend of wfp_rs::user needs \
                     the socket path of a simulated machine's bridge (Machine::serve_user_mode)"
                ),
            )
        })
}

/// The `io::Error` for a simulated `NTSTATUS`.
fn status_error(status: i32) -> io::Error {
    let status = Status::from_raw(status);
    let kind = match status {
        Status::CANCELLED => return cancelled(),
        Status::DELETE_PENDING => return closed(),
        Status::OBJECT_NAME_NOT_FOUND => io::ErrorKind::NotFound,
        Status::ACCESS_DENIED => io::ErrorKind::PermissionDenied,
        Status::PORT_DISCONNECTED => io::ErrorKind::NotConnected,
        Status::NOT_FOUND => io::ErrorKind::NotFound,
        Status::INVALID_PARAMETER => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{status}"))
}

fn unexpected(answer: &Answer) -> io::Error {
    match answer {
        Answer::Failed(status) => status_error(*status),
        Answer::Unknown => io::Error::new(
            io::ErrorKind::NotConnected,
            "the simulator's bridge no longer knows this handle",
        ),
        other => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer from the simulator's bridge: {other:?}"),
        ),
    }
}

/// Opens a session: the owner stream stays open as long as the handle.
fn open_session(socket: &Path, call: &Call) -> io::Result<(UnixStream, u64)> {
    let mut owner = UnixStream::connect(socket)?;
    match exchange(&mut owner, call)? {
        Answer::Done(session) => Ok((owner, session)),
        other => Err(unexpected(&other)),
    }
}

/// One call on its own stream, so that calls blocking in the simulator do not hold up others.
fn call(socket: &Path, call: &Call) -> io::Result<Answer> {
    let mut stream = UnixStream::connect(socket)?;
    exchange(&mut stream, call)
}

pub(super) struct Port {
    socket: PathBuf,
    session: u64,
    /// Closing it closes the connection.
    _owner: UnixStream,
}

impl Port {
    pub(super) fn connect(name: &str, context: &[u8]) -> io::Result<Port> {
        Port::connect_at(&socket_from_environment()?, name, context)
    }

    pub(super) fn connect_at(socket: &Path, name: &str, context: &[u8]) -> io::Result<Port> {
        if u16::try_from(context.len()).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a connection context is at most 65535 bytes",
            ));
        }
        let (owner, session) = open_session(
            socket,
            &Call::PortConnect {
                name: name.to_owned(),
                context: context.to_vec(),
            },
        )?;
        Ok(Port {
            socket: socket.to_path_buf(),
            session,
            _owner: owner,
        })
    }

    pub(super) fn get_message(&self, timeout: Option<Duration>) -> io::Result<Option<Request>> {
        let answer = call(
            &self.socket,
            &Call::GetMessage {
                session: self.session,
                timeout,
            },
        )?;
        match answer {
            Answer::Message {
                id,
                reply_length,
                data,
            } => Ok(Some(Request {
                id,
                reply_length,
                data,
            })),
            // Without a timeout, only a broken connection ends the wait without a message.
            Answer::NoMessage if timeout.is_none() => {
                Err(status_error(Status::PORT_DISCONNECTED.raw()))
            }
            Answer::NoMessage => Ok(None),
            Answer::Failed(status) => Err(status_error(status)),
            other => Err(unexpected(&other)),
        }
    }

    pub(super) fn reply(&self, message_id: u64, reply: &[u8]) -> io::Result<()> {
        let answer = call(
            &self.socket,
            &Call::Reply {
                session: self.session,
                message_id,
                reply: reply.to_vec(),
            },
        )?;
        match answer {
            Answer::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

pub(super) struct Device {
    socket: PathBuf,
    session: u64,
    /// Closing it closes the handle; [`Call::DeviceClose`] closes it earlier.
    owner: Mutex<UnixStream>,
}

/// An operation's id at the bridge.
pub(super) struct Op(u64);

impl Device {
    pub(super) fn open(path: &str) -> io::Result<Device> {
        Device::open_at(&socket_from_environment()?, path)
    }

    pub(super) fn open_at(socket: &Path, path: &str) -> io::Result<Device> {
        let (owner, session) = open_session(
            socket,
            &Call::DeviceOpen {
                path: path.to_owned(),
            },
        )?;
        Ok(Device {
            socket: socket.to_path_buf(),
            session,
            owner: Mutex::new(owner),
        })
    }

    pub(super) fn request(&self, code: u32, input: &[u8], output_len: usize) -> io::Result<Op> {
        let answer = call(
            &self.socket,
            &Call::IoControl {
                session: self.session,
                code,
                input: input.to_vec(),
                output_len: output_len as u64,
            },
        )?;
        match answer {
            Answer::Done(id) => Ok(Op(id)),
            other => Err(unexpected(&other)),
        }
    }

    pub(super) fn wait(&self, op: &Op, timeout: Option<Duration>) -> io::Result<Option<Vec<u8>>> {
        let answer = call(
            &self.socket,
            &Call::Wait {
                session: self.session,
                operation: op.0,
                timeout,
            },
        )?;
        match answer {
            Answer::Completed { status, output, .. } => {
                // NT_ERROR: severity 3.
                if status.cast_unsigned() >> 30 == 3 {
                    Err(status_error(status))
                } else {
                    Ok(Some(output))
                }
            }
            Answer::Pending => Ok(None),
            other => Err(unexpected(&other)),
        }
    }

    pub(super) fn cancel(&self, op: &Op) -> io::Result<()> {
        let answer = call(
            &self.socket,
            &Call::Cancel {
                session: self.session,
                operation: op.0,
            },
        )?;
        match answer {
            Answer::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Cancels `op` if pending, waits until the driver lets it go and forgets it. Errors mean the
    /// bridge or the session is gone, and the operation with it.
    pub(super) fn release(&self, op: Op) {
        let _ = self.cancel(&op);
        let _ = self.wait(&op, None);
        let _ = call(
            &self.socket,
            &Call::Release {
                session: self.session,
                operation: op.0,
            },
        );
    }

    /// `CloseHandle` at the bridge: the driver cancels the handle's requests. Operations can
    /// still be waited for.
    pub(super) fn cancel_all(&self) {
        let mut owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = exchange(&mut owner, &Call::DeviceClose);
    }
}
