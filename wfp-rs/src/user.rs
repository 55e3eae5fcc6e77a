//! The user-mode side (feature `user`): what a service uses to talk to a wfp-rs driver.
//!
//! - [`PortConnection`]: a filter-manager communication port (the driver's
//!   [`ServerPort`](crate::port::ServerPort)): receive what the driver sends with
//!   `FltSendMessage` and reply to it.
//! - [`Device`] and [`Operation`]: the inverted call (the driver's
//!   [`InvertedQueue`](crate::inverted::InvertedQueue)): leave I/O control requests pending at the
//!   driver, which completes them when it has something to say. The same calls send commands
//!   to a [`ControlDevice`](crate::control::ControlDevice), which completes them at once: send
//!   the request and [`wait`](Operation::wait) for it.
//! - [`AskClient`]: the question channel (the driver's
//!   [`AskChannel`](crate::ask::AskChannel)): keeps wait requests pending, receives the
//!   driver's questions and sends the answers.
//!
//! # Two backends
//!
//! On Windows (without the `sim` feature) the calls are the Win32 ones, through `windows-sys`:
//! `FilterConnectCommunicationPort`, `FilterGetMessage`, `FilterReplyMessage`, `CreateFileW`,
//! `DeviceIoControl`, `GetOverlappedResultEx` and `CancelIoEx`, with overlapped I/O for timeouts.
//! That backend compiles and passes clippy in CI but has not been run on a Windows machine yet.
//!
//! Everywhere else (and with the `sim` feature, on Unix hosts) the same API talks to a
//! simulated machine, possibly in another process: the machine serves its ports and devices with
//! `wfp_rs_sim::Machine::serve_user_mode`, and the service finds that
//! bridge through the environment variable [`SIM_SOCKET_VARIABLE`] (`WFP_RS_SIM_SOCKET`), the
//! path of its Unix domain socket. Killing the service process closes its connections, as
//! Windows does: the driver sees the port disconnect and its pending requests cancelled.
//!
//! The feature links `std`: a service is a user-mode program, never the driver itself. (A driver
//! crate defines the kernel's panic handler, through `#[driver_entry]`; wfp-rs itself defines
//! none, so a service can depend on wfp-rs in the same workspace as the drivers.)
//!
//! ```no_run
//! use std::time::Duration;
//! use wfp_rs::user::PortConnection;
//!
//! let port = PortConnection::connect("\\WfpRsFirewall", &[])?;
//! while let Some(request) = port.get_message(Some(Duration::from_secs(30)))? {
//!     let allow = request.data != b"666";
//!     port.reply(&request, &[b'V', u8::from(allow)])?;
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

#[allow(unused_imports)]
use std::{boxed::Box, string::String, vec::Vec};

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

mod ask;
pub use ask::{AskClient, Question};

#[cfg(wfp_sim)]
mod sim;
#[cfg(wfp_sim)]
use sim as imp;
#[cfg(wfp_nt)]
mod windows;
#[cfg(wfp_nt)]
use windows as imp;

/// The environment variable that tells a service using the simulator backend where the
/// simulated machine's bridge listens: the path of the Unix domain socket passed to
/// `wfp_rs_sim::Machine::serve_user_mode`. Unused on Windows.
pub const SIM_SOCKET_VARIABLE: &str = "WFP_RS_SIM_SOCKET";

/// The longest message [`PortConnection::get_message`] receives, in bytes (the
/// `FILTER_MESSAGE_HEADER` before it not counted): the size of the buffer it gives
/// `FilterGetMessage`. A protocol whose requests can be longer cannot be served; check it where
/// both are known, as the example firewall's service does:
///
/// ```
/// # const REQUEST_MAX_LEN: usize = 65_608;
/// const _: () = assert!(REQUEST_MAX_LEN <= wfp_rs::user::MAX_MESSAGE_LEN);
/// ```
pub const MAX_MESSAGE_LEN: usize = 128 * 1024;

/// A message the driver sent (`FltSendMessage`), as [`PortConnection::get_message`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `FILTER_MESSAGE_HEADER::MessageId`: identifies the message to [`PortConnection::reply`].
    pub id: u64,
    /// `FILTER_MESSAGE_HEADER::ReplyLength`: the size of the reply the driver waits for, the
    /// 16-byte `FILTER_REPLY_HEADER` included; 0 if the driver waits for no reply.
    pub reply_length: u32,
    /// The message, as the driver encoded it.
    pub data: Vec<u8>,
}

impl Request {
    /// Whether the driver waits for a reply to this message.
    pub fn wants_reply(&self) -> bool {
        self.reply_length != 0
    }
}

/// A connection to a driver's communication port (`FilterConnectCommunicationPort`). Dropping it
/// closes the connection (`CloseHandle`): messages the driver still waits a reply for fail with
/// `SendError::Disconnected`.
///
/// The methods take `&self`, so one thread can wait in [`get_message`](Self::get_message) while
/// another replies.
pub struct PortConnection {
    inner: imp::Port,
}

impl fmt::Debug for PortConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortConnection").finish_non_exhaustive()
    }
}

impl PortConnection {
    /// Connects to the port named `name` (for example `"\\WfpRsFirewall"`), passing `context` to
    /// the driver's connect callback (at most 65535 bytes). Fails with `NotFound` if no such port
    /// exists, `PermissionDenied` if its security descriptor refuses this process, and with the
    /// driver's refusal otherwise. In the simulator backend, fails when
    /// [`SIM_SOCKET_VARIABLE`] is unset or no bridge listens there.
    ///
    /// ```no_run
    /// let port = wfp_rs::user::PortConnection::connect("\\WfpRsFirewall", b"v1")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn connect(name: &str, context: &[u8]) -> io::Result<PortConnection> {
        Ok(PortConnection {
            inner: imp::Port::connect(name, context)?,
        })
    }

    /// Like [`connect`](Self::connect), through the bridge at `socket` instead of the one
    /// [`SIM_SOCKET_VARIABLE`] names (simulator backend only).
    ///
    /// ```no_run
    /// let port = wfp_rs::user::PortConnection::connect_at("/tmp/wfp.sock".as_ref(), "\\P", &[])?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[cfg(wfp_sim)]
    #[cfg_attr(docsrs, doc(cfg(any(not(windows), feature = "sim"))))]
    pub fn connect_at(
        socket: &std::path::Path,
        name: &str,
        context: &[u8],
    ) -> io::Result<PortConnection> {
        Ok(PortConnection {
            inner: imp::Port::connect_at(socket, name, context)?,
        })
    }

    /// Waits for the next message (`FilterGetMessage`), at most `timeout` (`None`: until one
    /// comes). `Ok(None)` when the timeout passed; an error (`NotConnected` in the simulator)
    /// when the connection is gone.
    ///
    /// ```no_run
    /// # let port = wfp_rs::user::PortConnection::connect("\\P", &[])?;
    /// if let Some(request) = port.get_message(Some(std::time::Duration::from_secs(1)))? {
    ///     port.reply(&request, b"ok")?;
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn get_message(&self, timeout: Option<Duration>) -> io::Result<Option<Request>> {
        self.inner.get_message(timeout)
    }

    /// Replies to `request` (`FilterReplyMessage`): `reply` is what follows the
    /// `FILTER_REPLY_HEADER`, and what the driver decodes. Fails when the driver no longer waits
    /// for this reply (it timed out, or was answered) and when the connection is gone.
    ///
    /// ```no_run
    /// # let port = wfp_rs::user::PortConnection::connect("\\P", &[])?;
    /// # let request = port.get_message(None)?.unwrap();
    /// port.reply(&request, b"V\x01")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn reply(&self, request: &Request, reply: &[u8]) -> io::Result<()> {
        self.reply_to(request.id, reply)
    }

    /// Replies to the message with id `message_id` (see [`reply`](Self::reply)).
    ///
    /// ```no_run
    /// # let port = wfp_rs::user::PortConnection::connect("\\P", &[])?;
    /// port.reply_to(7, b"V\x00")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn reply_to(&self, message_id: u64, reply: &[u8]) -> io::Result<()> {
        self.inner.reply(message_id, reply)
    }
}

/// A handle to a driver's device, opened for reading and writing with overlapped I/O
/// (`CreateFileW`). Dropping it cancels every request still pending on it (the driver's queue
/// completes them with `STATUS_CANCELLED`); the handle is closed once the last [`Operation`]
/// started on it is gone.
pub struct Device {
    inner: Arc<imp::Device>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the device at `path` (`\\.\Name`). Fails with `NotFound` if it does not exist and
    /// `PermissionDenied` if its security descriptor refuses this process. In the simulator
    /// backend, fails when [`SIM_SOCKET_VARIABLE`] is unset or no bridge listens there.
    ///
    /// ```no_run
    /// let device = wfp_rs::user::Device::open(r"\\.\WfpRsEvents")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open(path: &str) -> io::Result<Device> {
        Ok(Device {
            inner: Arc::new(imp::Device::open(path)?),
        })
    }

    /// Like [`open`](Self::open), through the bridge at `socket` instead of the one
    /// [`SIM_SOCKET_VARIABLE`] names (simulator backend only).
    ///
    /// ```no_run
    /// let device = wfp_rs::user::Device::open_at("/tmp/wfp.sock".as_ref(), r"\\.\Events")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[cfg(wfp_sim)]
    #[cfg_attr(docsrs, doc(cfg(any(not(windows), feature = "sim"))))]
    pub fn open_at(socket: &std::path::Path, path: &str) -> io::Result<Device> {
        Ok(Device {
            inner: Arc::new(imp::Device::open_at(socket, path)?),
        })
    }

    /// Sends I/O control request `code` with `input` and room for `output_len` bytes of output
    /// (`DeviceIoControl` with an `OVERLAPPED`), and returns without waiting for it: the driver
    /// may complete it at once or keep it pending. Wait for it with [`Operation::wait`].
    ///
    /// ```no_run
    /// # let device = wfp_rs::user::Device::open(r"\\.\WfpRsEvents")?;
    /// let event = device.request(0x8000_2000, &[], 64)?;
    /// let bytes = event.wait(None)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn request(&self, code: u32, input: &[u8], output_len: usize) -> io::Result<Operation> {
        let op = self.inner.request(code, input, output_len)?;
        Ok(Operation {
            device: Arc::clone(&self.inner),
            op: Some(op),
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.inner.cancel_all();
    }
}

/// An I/O control request sent with [`Device::request`]: it may still be pending at the driver.
/// Dropping it cancels it if it is still pending and waits until the driver has let it go, so
/// its buffers are never freed under the driver.
pub struct Operation {
    device: Arc<imp::Device>,
    op: Option<imp::Op>,
}

impl fmt::Debug for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operation").finish_non_exhaustive()
    }
}

impl Operation {
    /// Waits for the request to complete, at most `timeout` (`None`: until it does), and returns
    /// the output the driver wrote: `Ok(None)` if it is still pending when the timeout passes.
    /// A request that was cancelled fails with an error for which [`is_cancelled`] is true; a
    /// request the driver failed, with its status.
    ///
    /// ```no_run
    /// # let device = wfp_rs::user::Device::open(r"\\.\WfpRsEvents")?;
    /// let event = device.request(0x8000_2000, &[], 64)?;
    /// match event.wait(Some(std::time::Duration::from_secs(5)))? {
    ///     Some(bytes) => println!("{bytes:02x?}"),
    ///     None => event.cancel()?,
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<Vec<u8>>> {
        match &self.op {
            Some(op) => self.device.wait(op, timeout),
            None => Err(io::Error::other("the operation was released")),
        }
    }

    /// Asks the driver to cancel the request (`CancelIoEx`); [`wait`](Self::wait) tells how it
    /// ended. Cancelling a request that already completed does nothing.
    ///
    /// ```no_run
    /// # let device = wfp_rs::user::Device::open(r"\\.\WfpRsEvents")?;
    /// let event = device.request(0x8000_2000, &[], 64)?;
    /// event.cancel()?;
    /// assert!(event.wait(None).is_err_and(|e| wfp_rs::user::is_cancelled(&e)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn cancel(&self) -> io::Result<()> {
        match &self.op {
            Some(op) => self.device.cancel(op),
            None => Ok(()),
        }
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.device.release(op);
        }
    }
}

/// The error of a cancelled request (`STATUS_CANCELLED`, `ERROR_OPERATION_ABORTED`).
#[derive(Debug)]
struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request was cancelled")
    }
}

impl std::error::Error for Cancelled {}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, Cancelled)
}

/// The error of a request the driver refused because it closed the device
/// (`STATUS_DELETE_PENDING`).
#[derive(Debug)]
struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the driver closed the device (STATUS_DELETE_PENDING)")
    }
}

impl std::error::Error for Closed {}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, Closed)
}

/// Whether `error` says that the driver closed the device the request went to: its queue,
/// question channel or control device refuses every request now (`STATUS_DELETE_PENDING`), and
/// no request on this handle will reach the driver again — open the device anew once the
/// driver is back. [`AskClient`] returns it once it knows its channel closed (see
/// [`AskClient::is_closed`]).
///
/// Windows reports `STATUS_DELETE_PENDING` to Win32 as `ERROR_ACCESS_DENIED`, which other
/// refusals share; the Windows backend gives this error where it can read the status itself
/// (`OVERLAPPED::Internal`), and `ERROR_ACCESS_DENIED` (`PermissionDenied`) otherwise.
///
/// ```
/// let error = std::io::Error::other("something else");
/// assert!(!wfp_rs::user::is_closed(&error));
/// ```
pub fn is_closed(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Closed>())
}

/// Whether `error` says that a request was cancelled (by [`Operation::cancel`], by dropping its
/// [`Device`], or by the driver closing its queue).
///
/// ```
/// let error = std::io::Error::other("something else");
/// assert!(!wfp_rs::user::is_cancelled(&error));
/// ```
pub fn is_cancelled(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Cancelled>())
}
