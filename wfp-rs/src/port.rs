//! Filter-manager communication ports: typed messages between a driver and its user-mode
//! service.
//!
//! A callout driver that asks a service for verdicts talks to it through a *communication port*
//! of the filter manager (`fltmgr.sys`): the driver registers a [`Filter`] (with no file-system
//! callbacks: it exists for its ports), creates a [`ServerPort`], the service connects with
//! `FilterConnectCommunicationPort`, and the driver sends requests with [`ServerPort::send`]
//! (`FltSendMessage`), which waits for the service's reply.
//!
//! Waiting is the catch. `FltSendMessage` requires IRQL <= `APC_LEVEL`, and a `classifyFn` may
//! run at `DISPATCH_LEVEL`, so [`send`](ServerPort::send) takes `&impl AtMostApc`: a classify
//! callback, which has a `&DispatchLevel`, cannot call it. That is the bug this crate was built
//! around (on Windows the machine stops with `INVALID_PROCESS_ATTACH_ATTEMPT`), turned into a
//! compile error:
//!
//! ```compile_fail
//! use core::time::Duration;
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::port::{Protocol, ServerPort};
//!
//! fn classify<P: Protocol>(irql: &DispatchLevel<'_>, port: &ServerPort<P>, ask: &P::Request) {
//!     let _ = port.send(irql, ask, Duration::from_secs(1)); // error: may be DISPATCH_LEVEL
//! }
//! ```
//!
//! The same code with a `&PassiveLevel` (a work item's token) compiles:
//!
//! ```
//! use core::time::Duration;
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs::port::{Protocol, SendError, ServerPort};
//!
//! fn work_item<P: Protocol>(
//!     irql: &PassiveLevel<'_>,
//!     port: &ServerPort<P>,
//!     ask: &P::Request,
//! ) -> Result<P::Reply, SendError> {
//!     port.send(irql, ask, Duration::from_secs(1))
//! }
//! ```
//!
//! So the classify callback pends the classification and queues a work item
//! ([`WorkQueue::queue`](crate::work_item::WorkQueue::queue)); the work item sends, and completes
//! the pended classification with the answer.
//!
//! # Messages are typed, replies are untrusted
//!
//! A [`Protocol`] names the request and reply types; both implement [`Message`]: they encode to
//! and decode from bytes, within declared length bounds. The reply comes from a user-mode
//! process, so it is input to validate, not a structure to trust: a reply outside the bounds, or
//! one [`Message::decode`] rejects, is a [`SendError`], never a crash.
//!
//! ```
//! use wfp_rs::port::{Malformed, Message, Protocol};
//!
//! /// Driver → service: may process `pid` connect?
//! struct Ask {
//!     pid: u32,
//! }
//!
//! /// Service → driver.
//! #[derive(Debug, PartialEq)]
//! enum Verdict {
//!     Allow,
//!     Block,
//! }
//!
//! impl Message for Ask {
//!     const MIN_LEN: usize = 4;
//!     const MAX_LEN: usize = 4;
//!
//!     fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
//!         let out = out.get_mut(..4).ok_or(Malformed("an Ask needs 4 bytes"))?;
//!         out.copy_from_slice(&self.pid.to_le_bytes());
//!         Ok(4)
//!     }
//!
//!     fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
//!         let pid = bytes.try_into().map_err(|_| Malformed("an Ask is 4 bytes"))?;
//!         Ok(Ask { pid: u32::from_le_bytes(pid) })
//!     }
//! }
//!
//! impl Message for Verdict {
//!     const MIN_LEN: usize = 1;
//!     const MAX_LEN: usize = 1;
//!
//!     fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
//!         let byte = out.first_mut().ok_or(Malformed("a Verdict needs 1 byte"))?;
//!         *byte = match self {
//!             Verdict::Block => 0,
//!             Verdict::Allow => 1,
//!         };
//!         Ok(1)
//!     }
//!
//!     fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
//!         match bytes {
//!             [0] => Ok(Verdict::Block),
//!             [1] => Ok(Verdict::Allow),
//!             _ => Err(Malformed("a Verdict is 0 or 1")),
//!         }
//!     }
//! }
//!
//! /// The firewall's protocol.
//! struct Firewall;
//!
//! impl Protocol for Firewall {
//!     type Request = Ask;
//!     type Reply = Verdict;
//! }
//! # let mut buf = [0u8; 4];
//! # assert_eq!(Ask { pid: 7 }.encode(&mut buf), Ok(4));
//! # assert_eq!(Verdict::decode(&[2]), Err(Malformed("a Verdict is 0 or 1")));
//! ```
//!
//! # A round trip in the simulator
//!
//! ```
//! # use wfp_rs::port::{Malformed, Message, Protocol};
//! # struct Ask { pid: u32 }
//! # #[derive(Debug, PartialEq)] enum Verdict { Allow, Block }
//! # impl Message for Ask {
//! #     const MIN_LEN: usize = 4; const MAX_LEN: usize = 4;
//! #     fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
//! #         out.get_mut(..4).ok_or(Malformed("short"))?.copy_from_slice(&self.pid.to_le_bytes()); Ok(4)
//! #     }
//! #     fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
//! #         Ok(Ask { pid: u32::from_le_bytes(bytes.try_into().map_err(|_| Malformed("len"))?) })
//! #     }
//! # }
//! # impl Message for Verdict {
//! #     const MIN_LEN: usize = 1; const MAX_LEN: usize = 1;
//! #     fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
//! #         *out.first_mut().ok_or(Malformed("short"))? = u8::from(*self == Verdict::Allow); Ok(1)
//! #     }
//! #     fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
//! #         match bytes { [0] => Ok(Verdict::Block), [1] => Ok(Verdict::Allow), _ => Err(Malformed("0 or 1")) }
//! #     }
//! # }
//! # struct Firewall;
//! # impl Protocol for Firewall { type Request = Ask; type Reply = Verdict; }
//! use core::time::Duration;
//! use wfp_rs::driver::Driver;
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs::port::{Filter, ServerPort};
//! use wfp_rs_sim::Machine;
//! use wfp_rs::Status;
//!
//! #[wfp_rs::driver_entry]
//! fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
//!     Ok(())
//! }
//!
//! let machine = Machine::new();
//! let driver = machine.load_driver("doc", DriverEntry)?;
//! // As the driver (usually in its entry function, kept in its state):
//! let (filter, port) = driver
//!     .run_in_driver(&machine, |irql, d| -> Result<_, Status> {
//!         let filter = Filter::register(irql, d)?;
//!         let port = ServerPort::<Firewall>::create(irql, &filter, "\\DocFirewall", 1, ())?;
//!         Ok((filter, port))
//!     })
//!     .expect("an SDK driver")?;
//!
//! // The service (user mode) connects, waits for a message and answers it.
//! let mut service = machine.port_client("\\DocFirewall");
//! service.connect(&[])?;
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         let message = service.get_message(None).expect("a message");
//!         let ask = Ask::decode(&message.data).expect("the driver's encoding");
//!         let verdict = if ask.pid == 666 { 0 } else { 1 };
//!         service.reply(message.id, &[verdict]).expect("the driver waits");
//!     });
//!     // The driver asks, at PASSIVE_LEVEL (in a real driver: a work item).
//!     let verdict = machine.at_passive(|irql| port.send(irql, &Ask { pid: 42 }, Duration::from_secs(30)));
//!     assert_eq!(verdict, Ok(Verdict::Allow));
//! });
//!
//! // Unload closes the port and unregisters the filter (here done by hand).
//! driver.run_in_driver(&machine, |irql, _| {
//!     port.close(irql);
//!     filter.close(irql);
//! });
//! assert!(!service.is_connected());
//! machine.unload_driver(driver)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Deployment
//!
//! `FltRegisterFilter` succeeds only for a driver installed as a minifilter: its service key
//! needs an `Instances` subkey with a `DefaultInstance` and an instance with an `Altitude`
//! (otherwise `STATUS_OBJECT_NAME_NOT_FOUND`). The filter registers no file-system callbacks
//! and no `FilterUnloadCallback`, so `fltmc unload` refuses to unload it; the driver stops
//! through its own unload routine (the SDK's, which [`Filter::register`] keeps in place where
//! the filter manager would remove it): [`DriverState::unload`] (or dropping the state) closes
//! the ports and unregisters the filter.
//!
//! # Lifetimes
//!
//! The filter stays registered while a [`Filter`] or any [`ServerPort`] of it lives; the port
//! stays open while any clone of its [`ServerPort`] lives. Closing happens when the last handle
//! is dropped (or [`close`](ServerPort::close)d), and needs a low IRQL (`PASSIVE_LEVEL` for a
//! port, `APC_LEVEL` for the filter): keep the handles in the driver state and in work items,
//! so the last one goes at unload or in a work item. A last handle dropped at `DISPATCH_LEVEL`
//! cannot close anything: it is reported with `kd_print!` and leaked, and the simulator stops
//! at unload (`DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`).
//!
//! Unregistering the filter disconnects every client (their disconnect callbacks run first).
//!
//! [`DriverState::unload`]: crate::driver::DriverState::unload

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use core::time::Duration;

use crate::driver::Driver;
use crate::irql::{ApcLevel, AtMostApc, AtMostDispatch, AtPassive, Irql, PassiveLevel};
use crate::pool::{PoolBox, PoolBytes, PoolTag};
use crate::status::Status;
use crate::sys;
use crate::unicode::{counted, wide};

// --- messages -----------------------------------------------------------------------------------

/// A message that crosses a communication port: encoded to bytes by the sender, decoded (and
/// validated) by the receiver.
///
/// Both ends use the same implementation: the driver encodes requests and decodes replies, the
/// service decodes requests and encodes replies. `decode` receives bytes from the other side of
/// a trust boundary and must reject anything it does not fully understand; it must not panic.
pub trait Message: Sized {
    /// The shortest valid encoding, in bytes. A reply shorter than this is
    /// [`SendError::ReplyTooShort`] without being decoded.
    const MIN_LEN: usize;
    /// The longest valid encoding, in bytes: the bound on a request's length (a transport
    /// that carries the messages must take this many), and the size of the reply buffer the
    /// driver offers. A longer reply is [`SendError::ReplyTooLong`].
    const MAX_LEN: usize;

    /// How many bytes `encode` writes for this message: the size of the buffer
    /// [`send`](ServerPort::send) allocates for it. `MAX_LEN` unless the message says
    /// otherwise; a message of variable length returns its own length, so that a long maximum
    /// (a path of up to 32767 UTF-16 units) does not cost every message that much pool.
    fn encoded_len(&self) -> usize {
        Self::MAX_LEN
    }

    /// Writes the message to `out` (at least [`encoded_len`](Self::encoded_len) bytes, zeroed)
    /// and returns how many bytes it wrote, at least `MIN_LEN` and at most `MAX_LEN`.
    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed>;

    /// Reads a message from `bytes` (between `MIN_LEN` and `MAX_LEN` bytes long), validating
    /// every field.
    fn decode(bytes: &[u8]) -> Result<Self, Malformed>;
}

/// No message: a protocol whose `Reply` is `()` sends notifications, and
/// [`send`](ServerPort::send) returns once the service has received the message.
impl Message for () {
    const MIN_LEN: usize = 0;
    const MAX_LEN: usize = 0;

    fn encode(&self, _out: &mut [u8]) -> Result<usize, Malformed> {
        Ok(0)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(Malformed("expected no data"))
        }
    }
}

/// The messages of one port: what the driver sends and what it expects back.
pub trait Protocol: 'static {
    /// What the driver sends.
    type Request: Message;
    /// What the service replies (`()` for none).
    type Reply: Message;
}

/// A message could not be encoded or decoded; the text says what was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// Why [`ServerPort::send`] produced no reply. The request was only borrowed, so the caller
/// still has it (to retry, or to apply a default decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No user-mode client is connected: the message was not sent.
    #[error("no client is connected to the port")]
    NotConnected,
    /// The client disconnected before it replied (`STATUS_PORT_DISCONNECTED`); it may or may not
    /// have received the message.
    #[error("the client disconnected before it replied")]
    Disconnected,
    /// The timeout expired (`STATUS_TIMEOUT`) before the client received the message or before
    /// it replied; a late reply is discarded by the filter manager.
    #[error("no reply within the timeout")]
    Timeout,
    /// The reply is shorter than the protocol's [`Message::MIN_LEN`].
    #[error("the reply has {len} bytes, fewer than the {min} the protocol requires")]
    ReplyTooShort {
        /// The reply's length.
        len: usize,
        /// The protocol's minimum.
        min: usize,
    },
    /// The reply is longer than the protocol's [`Message::MAX_LEN`] (`STATUS_BUFFER_OVERFLOW`).
    #[error("the reply is longer than the {max} bytes the protocol allows")]
    ReplyTooLong {
        /// The protocol's maximum.
        max: usize,
    },
    /// The reply has a valid length, but [`Message::decode`] rejected it.
    #[error("malformed reply: {0}")]
    Malformed(Malformed),
    /// The request could not be encoded (or its encoding broke the protocol's length bounds).
    #[error("the request could not be encoded: {0}")]
    Encode(Malformed),
    /// Another failure: no pool for the buffers, or another status from `FltSendMessage`.
    #[error("FltSendMessage failed: {0}")]
    Status(Status),
}

impl From<SendError> for Status {
    /// The closest `NTSTATUS`: `STATUS_PORT_DISCONNECTED` when no client got the message,
    /// `STATUS_TIMEOUT`, `STATUS_BUFFER_OVERFLOW` for a reply too long, and
    /// `STATUS_INVALID_PARAMETER` for a malformed message either way.
    fn from(error: SendError) -> Status {
        match error {
            SendError::NotConnected | SendError::Disconnected => Status::PORT_DISCONNECTED,
            SendError::Timeout => Status::TIMEOUT,
            SendError::ReplyTooLong { .. } => Status::BUFFER_OVERFLOW,
            SendError::ReplyTooShort { .. } | SendError::Malformed(_) | SendError::Encode(_) => {
                Status::INVALID_PARAMETER
            }
            SendError::Status(status) => status,
        }
    }
}

/// `len` zeroed bytes of non-paged pool for a message: messages can be far larger than a kernel
/// stack allows.
fn message_buffer(len: usize, irql: &impl AtMostDispatch) -> Result<PoolBytes, SendError> {
    PoolBytes::try_zeroed(len, PoolTag::SDK, irql)
        .map_err(|_| SendError::Status(Status::INSUFFICIENT_RESOURCES))
}

/// The relative timeout `FltSendMessage` takes: negative, in 100 ns units, and never 0 (the
/// documentation reads a zero timeout as "wait forever" in one place and the kernel's waits as
/// "do not wait" elsewhere; a duration below 100 ns becomes 100 ns).
fn relative_timeout(timeout: Duration) -> i64 {
    let ticks = i64::try_from(timeout.as_nanos() / 100).unwrap_or(i64::MAX);
    -ticks.max(1)
}

// --- the filter -------------------------------------------------------------------------------

/// A minifilter registration (`FltRegisterFilter`) with no file-system callbacks: what a driver
/// needs to create communication ports.
///
/// The filter is unregistered (`FltUnregisterFilter`) when this handle and every
/// [`ServerPort`] created from it are gone. Register it in `DriverEntry` and keep it in the
/// driver state.
pub struct Filter {
    inner: NonNull<FilterInner>,
}

struct FilterInner {
    raw: sys::PFLT_FILTER,
    /// The registering driver's object, for the client check of its ports ([`crate::client`]).
    driver: *mut sys::DRIVER_OBJECT,
    /// This handle plus one per group of port handles.
    refs: AtomicUsize,
    /// The blocks of this filter's ports, freed once the filter is unregistered (after which
    /// the filter manager calls none of their callbacks).
    ports: AtomicPtr<PortHeader>,
}

// SAFETY: the filter pointer may be used from any thread; the rest is atomics.
unsafe impl Send for Filter {}
// SAFETY: as above; `&Filter` only reads the pointer and takes references atomically.
unsafe impl Sync for Filter {}

impl Filter {
    /// Registers the driver as a minifilter (`FltRegisterFilter`) with an `FLT_REGISTRATION`
    /// that has no callbacks. Fails with `STATUS_OBJECT_NAME_NOT_FOUND` if the driver is not
    /// installed as a minifilter (see the [module documentation](self#deployment)).
    pub fn register(irql: &impl AtMostApc, driver: &Driver<'_>) -> Result<Filter, Status> {
        crate::irql::verify(irql);
        let blank = FilterInner {
            raw: core::ptr::null_mut(),
            driver: driver.raw_object(),
            refs: AtomicUsize::new(1),
            ports: AtomicPtr::new(core::ptr::null_mut()),
        };
        let mut inner = PoolBox::try_new(blank, PoolTag::SDK, irql)?;
        let registration = sys::FLT_REGISTRATION {
            Size: core::mem::size_of::<sys::FLT_REGISTRATION>() as u16,
            Version: sys::FLT_REGISTRATION_VERSION,
            Flags: 0,
            ContextRegistration: core::ptr::null(),
            OperationRegistration: core::ptr::null(),
            FilterUnloadCallback: None,
            InstanceSetupCallback: core::ptr::null_mut(),
            InstanceQueryTeardownCallback: core::ptr::null_mut(),
            InstanceTeardownStartCallback: core::ptr::null_mut(),
            InstanceTeardownCompleteCallback: core::ptr::null_mut(),
            GenerateFileNameCallback: core::ptr::null_mut(),
            NormalizeNameComponentCallback: core::ptr::null_mut(),
            NormalizeContextCleanupCallback: core::ptr::null_mut(),
            TransactionNotificationCallback: core::ptr::null_mut(),
            NormalizeNameComponentExCallback: core::ptr::null_mut(),
            SectionNotificationCallback: core::ptr::null_mut(),
        };
        let object = driver.raw_object();
        // FltRegisterFilter replaces the driver's unload routine with the filter manager's, or,
        // for a registration without FilterUnloadCallback like this one, with none ("cannot be
        // unloaded"). The SDK's unload routine is what unregisters the filter, so it is put
        // back: registering after DriverEntry (when the SDK has installed it) must not make the
        // driver impossible to stop.
        // SAFETY: the caller's driver object, valid while the driver is loaded; only the driver
        // and, during FltRegisterFilter, the filter manager write this field.
        let unload = unsafe { (*object).DriverUnload };
        let mut raw = core::ptr::null_mut();
        // SAFETY: IRQL <= APC_LEVEL (the token); the driver object is the caller's; the
        // registration and the out pointer are locals valid for the call (the filter manager
        // copies the registration).
        let status = unsafe { sys::FltRegisterFilter(object, &registration, &mut raw) };
        // SAFETY: as above; FltRegisterFilter has returned.
        unsafe { (*object).DriverUnload = unload };
        Status::from_ntstatus(status)?;
        if raw.is_null() {
            return Err(Status::UNSUCCESSFUL);
        }
        inner.raw = raw;
        Ok(Filter {
            inner: PoolBox::into_raw(inner),
        })
    }

    /// Starts filtering (`FltStartFiltering`). A filter that exists for its ports does not need
    /// it: ports work without it. A second call fails with `STATUS_INVALID_PARAMETER`.
    pub fn start_filtering(&self, irql: &impl AtMostApc) -> Result<(), Status> {
        crate::irql::verify(irql);
        // SAFETY: IRQL <= APC_LEVEL (the token); the filter is registered while `self` lives.
        Status::from_ntstatus(unsafe { sys::FltStartFiltering(self.raw()) })
    }

    /// Drops this handle at a known IRQL; the filter is unregistered if no port of it is left.
    pub fn close(self, irql: &impl AtMostApc) {
        crate::irql::verify(irql);
        drop(self);
    }

    /// The raw filter pointer, for calls this crate does not wrap.
    pub fn raw(&self) -> sys::PFLT_FILTER {
        self.inner().raw
    }

    fn inner(&self) -> &FilterInner {
        // SAFETY: the block lives until the last reference is released, and `self` holds one.
        unsafe { self.inner.as_ref() }
    }

    /// Another reference, for a port's handles.
    fn reference(&self) -> Filter {
        self.inner().refs.fetch_add(1, Ordering::Relaxed);
        Filter { inner: self.inner }
    }

    /// Takes charge of a port block, to free it once the filter is unregistered.
    fn adopt(&self, port: NonNull<PortHeader>) {
        let ports = &self.inner().ports;
        let mut head = ports.load(Ordering::Acquire);
        loop {
            // SAFETY: the block is not shared with other threads' writers: its `next` is only
            // written here, before it is published by the exchange below.
            unsafe { (*port.as_ptr()).next = head };
            match ports.compare_exchange_weak(
                head,
                port.as_ptr(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if self.inner().refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let inner = self.inner;
        let unregister = || {
            // SAFETY: IRQL <= APC_LEVEL (checked); this was the last reference, so no port
            // handle is left and every server port of the filter is closed (the last handle of
            // a port closes it before it releases its reference); the filter was registered in
            // `register` and is unregistered only here.
            unsafe { sys::FltUnregisterFilter(inner_raw(inner)) };
            // SAFETY: the filter manager calls no port callback after FltUnregisterFilter
            // returned, so the port blocks are unused; each was adopted once.
            unsafe { free_ports(inner) };
            // SAFETY: the block came from `PoolBox::into_raw` in `register` (SDK tag) and is
            // taken back once, by the last reference.
            drop(unsafe { PoolBox::from_raw(inner, PoolTag::SDK) });
        };
        // SAFETY: `unregister` is SDK code that uses no token at all and runs no driver code.
        let unregistered = unsafe { ApcLevel::try_current_in_sdk(|_irql| unregister()) };
        if unregistered.is_none() {
            crate::kd_print!(
                Error,
                "wfp-rs: minifilter released at {}; FltUnregisterFilter needs IRQL <= APC_LEVEL, so the filter stays registered and its memory is leaked\n",
                Irql::current()
            );
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter").field("raw", &self.raw()).finish()
    }
}

/// The raw filter pointer of a live block.
fn inner_raw(inner: NonNull<FilterInner>) -> sys::PFLT_FILTER {
    // SAFETY: callers pass the block of a filter they hold the last reference of.
    unsafe { inner.as_ref() }.raw
}

/// Frees every port block a filter adopted.
///
/// # Safety
///
/// The filter is unregistered (no callback can use the blocks), and this runs once.
unsafe fn free_ports(inner: NonNull<FilterInner>) {
    // SAFETY: the caller holds the last reference to the block.
    let ports = unsafe { &inner.as_ref().ports };
    let mut next = ports.swap(core::ptr::null_mut(), Ordering::AcqRel);
    while let Some(header) = NonNull::new(next) {
        let (free, following) = {
            // SAFETY: a published header of a live port block.
            let header = unsafe { header.as_ref() };
            (header.free, header.next)
        };
        // SAFETY: the header's own destructor, called once (the list is consumed).
        unsafe { free(header) };
        next = following;
    }
}

// --- ports ----------------------------------------------------------------------------------

/// The most connections one [`ServerPort`] accepts.
pub const MAX_PORT_CONNECTIONS: u32 = 16;

/// A connection to a [`ServerPort`], as its [`PortEvents`] see it: a slot number below the
/// port's maximum, reused after a disconnection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(u32);

impl ConnectionId {
    /// The slot number, below the port's maximum number of connections.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// What a driver wants to know about the connections to its port. Both callbacks run at
/// `PASSIVE_LEVEL` in the thread of the connecting (or disconnecting) process.
///
/// ```
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::port::{ConnectionId, PortEvents};
/// use wfp_rs::Status;
///
/// /// Accepts only clients that say which protocol version they speak.
/// struct VersionCheck;
///
/// impl PortEvents for VersionCheck {
///     fn connected(
///         &self,
///         _irql: &mut PassiveLevel<'_>,
///         _connection: ConnectionId,
///         context: &[u8],
///     ) -> Result<(), Status> {
///         match context {
///             [1, 0] => Ok(()),
///             _ => Err(Status::ACCESS_DENIED),
///         }
///     }
/// }
/// ```
pub trait PortEvents: Send + Sync + 'static {
    /// A process connected, passing `context` to `FilterConnectCommunicationPort` (untrusted
    /// bytes). An error refuses the connection; the process gets that status. The default
    /// accepts every connection (the port's security descriptor already admits only
    /// administrators and SYSTEM).
    fn connected(
        &self,
        irql: &mut PassiveLevel<'_>,
        connection: ConnectionId,
        context: &[u8],
    ) -> Result<(), Status> {
        let _ = (irql, connection, context);
        Ok(())
    }

    /// A connection ended: the process closed its handle (or exited), or the filter is being
    /// unregistered. The SDK has closed the driver's end already; messages waiting on it failed
    /// with [`SendError::Disconnected`].
    fn disconnected(&self, irql: &mut PassiveLevel<'_>, connection: ConnectionId) {
        let _ = (irql, connection);
    }
}

/// No connection events.
impl PortEvents for () {}

/// A communication server port (`FltCreateCommunicationPort`) that user mode connects to, and
/// through which the driver sends [`Protocol`] requests.
///
/// Only administrators and SYSTEM may connect: the port's security descriptor is the filter
/// manager's default one (`FltBuildDefaultSecurityDescriptor` with `FLT_PORT_ALL_ACCESS`). A
/// driver that restricted its clients ([`Driver::admit_only`](crate::driver::Driver::admit_only))
/// also refuses every process but that one, before it takes a connection slot (see
/// [`crate::client`]).
///
/// Clone it to hand it to work items; the port is closed (`FltCloseCommunicationPort`) when the
/// last clone is dropped, at `PASSIVE_LEVEL`. Closing stops new connections; connections that
/// exist last until their process closes them or the filter is unregistered.
pub struct ServerPort<P: Protocol, E: PortEvents = ()> {
    shared: NonNull<PortShared<P, E>>,
}

// SAFETY: the port block is used through atomics and the filter manager's thread-safe routines;
// `E: Send + Sync` is what the callbacks share across threads.
unsafe impl<P: Protocol, E: PortEvents> Send for ServerPort<P, E> {}
// SAFETY: as above; every `&self` method is safe to call concurrently.
unsafe impl<P: Protocol, E: PortEvents> Sync for ServerPort<P, E> {}

/// The start of every port block, so the filter can free blocks of any `P` and `E`.
#[repr(C)]
struct PortHeader {
    next: *mut PortHeader,
    free: unsafe fn(NonNull<PortHeader>),
}

/// One connection slot. Its `client` is the variable whose address the filter manager gets:
/// `FltSendMessage` reads it and `FltCloseClientPort` clears it under the filter manager's lock,
/// which is why it is an atomic with a fixed address.
struct Slot {
    client: AtomicPtr<sys::FLT_PORT>,
    claimed: AtomicBool,
    /// The block this slot is in (the connection cookie points to the slot).
    owner: AtomicPtr<()>,
    index: u32,
}

/// The block behind a port: the cookie the filter manager passes to the callbacks. `repr(C)`
/// keeps the header first. It lives until the filter is unregistered.
#[repr(C)]
struct PortShared<P: Protocol, E: PortEvents> {
    header: PortHeader,
    raw_filter: sys::PFLT_FILTER,
    /// The driver's object: whose client restriction the port applies.
    driver: *mut sys::DRIVER_OBJECT,
    server: AtomicPtr<sys::FLT_PORT>,
    /// Clones of the `ServerPort`.
    handles: AtomicUsize,
    /// The handles' reference on the filter; taken by the last handle, which alone touches it.
    filter: UnsafeCell<Option<Filter>>,
    /// Where the next send starts looking for a client (round robin).
    next: AtomicUsize,
    slots: [Slot; MAX_PORT_CONNECTIONS as usize],
    slot_count: usize,
    events: E,
    _protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol, E: PortEvents> PortShared<P, E> {
    fn slots(&self) -> &[Slot] {
        &self.slots[..self.slot_count]
    }

    /// A slot with a connected client, starting after the one used last.
    fn pick(&self) -> Option<&Slot> {
        let slots = self.slots();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        slots
            .iter()
            .cycle()
            .skip(start)
            .take(slots.len())
            .find(|slot| !slot.client.load(Ordering::Acquire).is_null())
    }

    /// A free slot, claimed.
    fn claim(&self) -> Option<&Slot> {
        self.slots().iter().find(|slot| {
            slot.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }
}

/// Frees a port block.
///
/// # Safety
///
/// `header` is the header of a `PortShared<P, E>` from `PoolBox::into_raw` (SDK tag), no longer
/// used by anyone; called once.
unsafe fn free_port<P: Protocol, E: PortEvents>(header: NonNull<PortHeader>) {
    // SAFETY: the header is the first field of the repr(C) block (per the contract).
    drop(unsafe { PoolBox::from_raw(header.cast::<PortShared<P, E>>(), PoolTag::SDK) });
}

/// A port could not be created; the events are handed back.
pub struct CreatePortError<E> {
    /// The failure.
    pub status: Status,
    /// The events that were to be attached to the port.
    pub events: E,
}

impl<E> fmt::Debug for CreatePortError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatePortError")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<E> fmt::Display for CreatePortError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "communication port not created: {}", self.status)
    }
}

impl<E> core::error::Error for CreatePortError<E> {}

impl<E> From<CreatePortError<E>> for Status {
    fn from(error: CreatePortError<E>) -> Status {
        error.status
    }
}

impl<P: Protocol, E: PortEvents> ServerPort<P, E> {
    /// Creates a communication server port named `name` (for example `"\\WfpRsFirewall"`;
    /// user mode connects with the same name), accepting at most `max_connections` clients at a
    /// time (1..=[`MAX_PORT_CONNECTIONS`]).
    ///
    /// Wraps `FltBuildDefaultSecurityDescriptor` (`FLT_PORT_ALL_ACCESS`: only administrators and
    /// SYSTEM may connect), `FltCreateCommunicationPort` (`OBJ_KERNEL_HANDLE`, case-insensitive
    /// name) and `FltFreeSecurityDescriptor`. On failure (`STATUS_OBJECT_NAME_COLLISION` for a
    /// name in use, `STATUS_INVALID_PARAMETER` for a bad name or count, ...) `events` is handed
    /// back.
    pub fn create(
        irql: &impl AtPassive,
        filter: &Filter,
        name: &str,
        max_connections: u32,
        events: E,
    ) -> Result<ServerPort<P, E>, CreatePortError<E>> {
        crate::irql::verify(irql);
        if max_connections == 0 || max_connections > MAX_PORT_CONNECTIONS {
            return Err(CreatePortError {
                status: Status::INVALID_PARAMETER,
                events,
            });
        }
        let name = match wide(name) {
            Ok(name) => name,
            Err(status) => return Err(CreatePortError { status, events }),
        };
        let mut object_name = match counted(&name) {
            Ok(object_name) => object_name,
            Err(status) => return Err(CreatePortError { status, events }),
        };
        let block = match Self::allocate_block(irql, filter, max_connections, events) {
            Ok(block) => block,
            Err(events) => {
                return Err(CreatePortError {
                    status: Status::INSUFFICIENT_RESOURCES,
                    events,
                });
            }
        };
        // From here on the block is only used through shared references: once the port exists,
        // the callbacks may use it on other threads.
        // SAFETY: the block is live (just allocated) and freed only by `fail` below or by the
        // filter after it is unregistered.
        let port = unsafe { block.as_ref() };
        let fail = |status: Status| {
            // SAFETY: no port exists (creation failed), so no callback refers to the block; it
            // came from `into_raw` above and is taken back once. Dropping it releases the
            // filter reference (not the last: the caller's `&Filter` holds one).
            let shared = unsafe { PoolBox::from_raw(block, PoolTag::SDK) };
            Err(CreatePortError {
                status,
                events: PoolBox::into_inner(shared).events,
            })
        };

        let mut descriptor: sys::PSECURITY_DESCRIPTOR = core::ptr::null_mut();
        // SAFETY: IRQL is PASSIVE_LEVEL (the token); the out pointer is a local.
        let status = unsafe {
            sys::FltBuildDefaultSecurityDescriptor(&mut descriptor, sys::FLT_PORT_ALL_ACCESS)
        };
        if let Err(status) = Status::from_ntstatus(status) {
            return fail(status);
        }
        let attributes = sys::OBJECT_ATTRIBUTES {
            Length: core::mem::size_of::<sys::OBJECT_ATTRIBUTES>() as u32,
            RootDirectory: core::ptr::null_mut(),
            ObjectName: &mut object_name,
            Attributes: sys::OBJ_KERNEL_HANDLE | sys::OBJ_CASE_INSENSITIVE,
            SecurityDescriptor: descriptor,
            SecurityQualityOfService: core::ptr::null_mut(),
        };
        let mut server: sys::PFLT_PORT = core::ptr::null_mut();
        // SAFETY: PASSIVE_LEVEL (the token); the filter is registered (the caller's `&Filter`);
        // the attributes, the name and the descriptor are valid for the call; the cookie is the
        // port block, which lives until the filter is unregistered (after which no callback
        // comes), or is freed by `fail` if no port was created; the trampolines have the
        // callback signatures and expect exactly this block type.
        let status = unsafe {
            sys::FltCreateCommunicationPort(
                filter.raw(),
                &mut server,
                &attributes,
                block.as_ptr().cast(),
                Some(connect_notify::<P, E>),
                Some(disconnect_notify::<P, E>),
                None,
                max_connections as i32,
            )
        };
        // The port captured the descriptor; it is freed either way.
        // SAFETY: the descriptor came from FltBuildDefaultSecurityDescriptor and is freed once,
        // at PASSIVE_LEVEL.
        unsafe { sys::FltFreeSecurityDescriptor(descriptor) };
        if let Err(status) = Status::from_ntstatus(status) {
            return fail(status);
        }
        port.server.store(server, Ordering::Release);
        filter.adopt(block.cast());
        Ok(ServerPort { shared: block })
    }

    /// Allocates the port block (one handle, the filter reference, `max_connections` free
    /// slots, `events`) and initialises it in place, one field at a time. With its slots the
    /// block is over 600 bytes: built on the stack and moved into the pool, it was copied
    /// several times in [`create`](Self::create)'s frame in a debug build, a frame that lies
    /// under the rest of the port's creation (`cargo xtask stack --debug` measures it). Without
    /// pool, `events` comes back.
    #[inline(never)]
    fn allocate_block(
        irql: &impl AtPassive,
        filter: &Filter,
        max_connections: u32,
        events: E,
    ) -> Result<NonNull<PortShared<P, E>>, E> {
        // Moved into the block by `init`, which runs only if the allocation succeeds.
        let mut events = ManuallyDrop::new(events);
        let init = |block: NonNull<PortShared<P, E>>| {
            let block = block.as_ptr();
            // SAFETY: `block` is valid for writes and aligned (try_new_in_place's promise); the
            // projection creates no reference to the uninitialised block.
            let slots = unsafe { &raw mut (*block).slots }.cast::<Slot>();
            for index in 0..MAX_PORT_CONNECTIONS as usize {
                let slot = Slot {
                    client: AtomicPtr::new(core::ptr::null_mut()),
                    claimed: AtomicBool::new(false),
                    owner: AtomicPtr::new(block.cast()),
                    index: index as u32,
                };
                // SAFETY: `index < MAX_PORT_CONNECTIONS`: an element of the array, valid for
                // writes.
                unsafe { slots.wrapping_add(index).write(slot) };
            }
            // The other fields, one at a time: each projection stays inside the block (valid
            // for writes, as above) and creates no reference; each field is written once.
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).header };
            // SAFETY: valid for writes, as above.
            unsafe {
                field.write(PortHeader {
                    next: core::ptr::null_mut(),
                    free: free_port::<P, E>,
                })
            };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).raw_filter };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(filter.raw()) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).driver };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(filter.inner().driver) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).server };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(AtomicPtr::new(core::ptr::null_mut())) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).handles };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(AtomicUsize::new(1)) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).filter };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(UnsafeCell::new(Some(filter.reference()))) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).next };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(AtomicUsize::new(0)) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).slot_count };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(max_connections as usize) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block)._protocol };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(PhantomData) };
            // SAFETY: as above.
            let field = unsafe { &raw mut (*block).events };
            // SAFETY: taken once: `init` runs at most once, and only if the allocation
            // succeeded, when the events are not given back below.
            let events = unsafe { ManuallyDrop::take(&mut events) };
            // SAFETY: valid for writes, as above.
            unsafe { field.write(events) };
        };
        // SAFETY: `init` writes every field of the block (each slot of the array, then the
        // others) without reading any.
        match unsafe { PoolBox::try_new_in_place(PoolTag::SDK, irql, init) } {
            Some(block) => Ok(PoolBox::into_raw(block)),
            // `init` did not run: the events are still here.
            None => Err(ManuallyDrop::into_inner(events)),
        }
    }

    fn shared(&self) -> &PortShared<P, E> {
        // SAFETY: the block lives until the filter is unregistered, which needs this handle's
        // filter reference to be released first.
        unsafe { self.shared.as_ref() }
    }

    /// Sends `request` to a connected client (`FltSendMessage`) and waits up to `timeout` for
    /// its reply, which is validated against the protocol: its length, then
    /// [`Message::decode`]. With several clients connected, successive sends go to them in
    /// turn.
    ///
    /// Requires IRQL <= `APC_LEVEL`, because it waits (and the filter manager attaches to the
    /// client's process to copy the message): call it from a work item, never from a classify
    /// callback. The request is borrowed, so on failure the caller still has it.
    ///
    /// `timeout` covers delivery and reply together, as `FltSendMessage`'s does; durations
    /// below 100 ns count as 100 ns.
    pub fn send(
        &self,
        irql: &impl AtMostApc,
        request: &P::Request,
        timeout: Duration,
    ) -> Result<P::Reply, SendError> {
        crate::irql::verify(irql);
        if !self.has_client() {
            return Err(SendError::NotConnected);
        }
        let size = request.encoded_len();
        if !(P::Request::MIN_LEN..=P::Request::MAX_LEN).contains(&size) {
            return Err(SendError::Encode(Malformed(
                "encoded_len returned a length outside MIN_LEN..=MAX_LEN",
            )));
        }
        let mut message = message_buffer(size, irql)?;
        let len = request.encode(&mut message).map_err(SendError::Encode)?;
        let encoded = message.get(..len).ok_or(SendError::Encode(Malformed(
            "encode returned a length beyond encoded_len",
        )))?;
        self.send_encoded(irql, encoded, timeout)
    }

    /// Sends `request`, a [`P::Request`](Protocol::Request) already encoded, as
    /// [`send`](Self::send) does after encoding: for a driver that builds the message's bytes
    /// itself, in the one buffer it allocated for them (from the classify callback, with the
    /// fields at hand), rather than a typed request that `send` would encode into a second.
    /// The bytes go to the filter manager as they are: nothing checks that they decode, only
    /// that their length is within the request's `MIN_LEN..=MAX_LEN`
    /// ([`SendError::Encode`] otherwise). The reply is validated as by `send`.
    pub fn send_encoded(
        &self,
        irql: &impl AtMostApc,
        request: &[u8],
        timeout: Duration,
    ) -> Result<P::Reply, SendError> {
        crate::irql::verify(irql);
        const {
            assert!(
                P::Request::MIN_LEN >= 1 && P::Request::MIN_LEN <= P::Request::MAX_LEN,
                "a request is at least one byte, and MIN_LEN <= MAX_LEN"
            );
            assert!(
                P::Reply::MIN_LEN <= P::Reply::MAX_LEN,
                "a reply's MIN_LEN <= MAX_LEN"
            );
            assert!(
                P::Request::MAX_LEN <= u32::MAX as usize && P::Reply::MAX_LEN <= u32::MAX as usize,
                "messages are at most u32::MAX bytes"
            );
        };
        let len = request.len();
        if !(P::Request::MIN_LEN..=P::Request::MAX_LEN).contains(&len) {
            return Err(SendError::Encode(Malformed(
                "the request's length is outside MIN_LEN..=MAX_LEN",
            )));
        }
        let shared = self.shared();
        let slot = shared.pick().ok_or(SendError::NotConnected)?;
        let mut reply = message_buffer(P::Reply::MAX_LEN, irql)?;
        // Null for no reply buffer (the filter manager's "no reply").
        let reply_ptr = if reply.is_empty() {
            core::ptr::null_mut()
        } else {
            reply.as_mut_ptr()
        };
        let mut reply_len = P::Reply::MAX_LEN as u32;
        let reply_len_ptr: *mut u32 = if P::Reply::MAX_LEN == 0 {
            core::ptr::null_mut()
        } else {
            &mut reply_len
        };
        let timeout = relative_timeout(timeout);
        // SAFETY: IRQL <= APC_LEVEL (the token); the filter is registered while this handle
        // lives (the handles hold a reference on it); `slot.client` is the variable the filter
        // manager reads and clears atomically under its lock; the request buffer holds `len`
        // bytes, which the filter manager only reads (`SenderBuffer` is an in parameter), and
        // the reply buffer `reply_len` bytes (or is null with a null length), both alive for
        // the call; the timeout is a local.
        let status = unsafe {
            sys::FltSendMessage(
                shared.raw_filter,
                slot.client.as_ptr(),
                request.as_ptr().cast_mut().cast(),
                len as u32,
                reply_ptr.cast(),
                reply_len_ptr,
                &timeout,
            )
        };
        match status {
            s if s == Status::TIMEOUT.raw() => return Err(SendError::Timeout),
            s if s == Status::PORT_DISCONNECTED.raw() => return Err(SendError::Disconnected),
            s if s == Status::BUFFER_OVERFLOW.raw() => {
                return Err(SendError::ReplyTooLong {
                    max: P::Reply::MAX_LEN,
                });
            }
            s => Status::from_ntstatus(s).map_err(SendError::Status)?,
        }
        // The length comes from another component: checked, not trusted.
        let got = reply_len as usize;
        if got > P::Reply::MAX_LEN {
            return Err(SendError::ReplyTooLong {
                max: P::Reply::MAX_LEN,
            });
        }
        if got < P::Reply::MIN_LEN {
            return Err(SendError::ReplyTooShort {
                len: got,
                min: P::Reply::MIN_LEN,
            });
        }
        P::Reply::decode(&reply[..got]).map_err(SendError::Malformed)
    }

    /// How many clients are connected now.
    pub fn connections(&self) -> usize {
        self.shared()
            .slots()
            .iter()
            .filter(|slot| !slot.client.load(Ordering::Acquire).is_null())
            .count()
    }

    /// Whether a client is connected now (a send may still find it gone).
    pub fn has_client(&self) -> bool {
        self.connections() > 0
    }

    /// Closes the driver's end of every connection (`FltCloseClientPort`): sends waiting for a
    /// reply fail at once with [`SendError::Disconnected`], later ones with
    /// [`SendError::NotConnected`] until a client connects again. Returns how many connections it
    /// closed.
    ///
    /// For unload: call it from [`DriverState::stopping`](crate::driver::DriverState::stopping),
    /// after setting whatever flag stops new requests, so that work items blocked in `send`
    /// return before the SDK waits for them.
    pub fn disconnect_all(&self, irql: &impl AtPassive) -> usize {
        crate::irql::verify(irql);
        let shared = self.shared();
        let mut closed = 0;
        for slot in shared.slots() {
            if slot.client.load(Ordering::Acquire).is_null() {
                continue;
            }
            // SAFETY: PASSIVE_LEVEL (the token); the filter is registered while a port handle
            // exists; the variable is the slot's, which the filter manager clears under its lock
            // (a variable already cleared by a concurrent disconnect makes this a no-op).
            unsafe { sys::FltCloseClientPort(shared.raw_filter, slot.client.as_ptr()) };
            closed += 1;
        }
        closed
    }

    /// The port's connection events.
    pub fn events(&self) -> &E {
        &self.shared().events
    }

    /// Drops this handle at `PASSIVE_LEVEL`; if it is the last, the port is closed and its
    /// reference on the filter released.
    pub fn close(self, irql: &impl AtPassive) {
        crate::irql::verify(irql);
        drop(self);
    }
}

impl<P: Protocol, E: PortEvents> Clone for ServerPort<P, E> {
    fn clone(&self) -> Self {
        self.shared().handles.fetch_add(1, Ordering::Relaxed);
        ServerPort {
            shared: self.shared,
        }
    }
}

impl<P: Protocol, E: PortEvents> Drop for ServerPort<P, E> {
    fn drop(&mut self) {
        if self.shared().handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let block = self.shared;
        let close = || {
            // SAFETY: the block is live: its filter reference is still held (taken below).
            let shared = unsafe { block.as_ref() };
            // SAFETY: PASSIVE_LEVEL (checked); the port was opened in `create` and is closed
            // only here, by the last handle.
            unsafe { sys::FltCloseCommunicationPort(shared.server.load(Ordering::Acquire)) };
            // SAFETY: the last handle is the only user of the cell (the callbacks never touch
            // it), and it runs once.
            let filter = unsafe { (*shared.filter.get()).take() };
            // May unregister the filter, which frees this block: nothing touches it after.
            drop(filter);
        };
        // SAFETY: `close` is SDK code that uses no token and runs no driver code but the drop of
        // the filter handle (SDK code as well).
        let closed = unsafe { PassiveLevel::try_current_in_sdk(|_irql| close()) };
        if closed.is_none() {
            crate::kd_print!(
                Error,
                "wfp-rs: communication port released at {}; FltCloseCommunicationPort needs PASSIVE_LEVEL, so the port stays open and its filter registered\n",
                Irql::current()
            );
        }
    }
}

impl<P: Protocol, E: PortEvents> fmt::Debug for ServerPort<P, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerPort")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// `ConnectNotify`: claims a slot, asks the driver's [`PortEvents::connected`], and publishes
/// the client port for sends.
unsafe extern "system" fn connect_notify<P: Protocol, E: PortEvents>(
    client_port: sys::PFLT_PORT,
    server_cookie: sys::PVOID,
    context: sys::PVOID,
    context_len: u32,
    connection_cookie: *mut sys::PVOID,
) -> sys::NTSTATUS {
    // SAFETY: the cookie is the port block given to FltCreateCommunicationPort, alive until the
    // filter is unregistered, after which the filter manager calls nothing.
    let Some(shared) = (unsafe { server_cookie.cast::<PortShared<P, E>>().as_ref() }) else {
        return Status::INVALID_PARAMETER.raw();
    };
    if connection_cookie.is_null() || client_port.is_null() {
        return Status::INVALID_PARAMETER.raw();
    }
    // Before a slot is claimed: a refused process must not take the one the service needs.
    let admitted = {
        // SAFETY: the filter manager calls ConnectNotify at PASSIVE_LEVEL, in the context of the
        // connecting process; the token lives for this block only, before the one below.
        let irql = unsafe { PassiveLevel::new_unchecked() };
        crate::client::admit(shared.driver, &irql)
    };
    if let Err(status) = admitted {
        return status.raw();
    }
    let Some(slot) = shared.claim() else {
        return Status::CONNECTION_COUNT_LIMIT.raw();
    };
    let context: &[u8] = if context.is_null() || context_len == 0 {
        &[]
    } else {
        // SAFETY: the filter manager passes its kernel copy of the process's context,
        // `context_len` bytes, valid for the call.
        unsafe { core::slice::from_raw_parts(context.cast::<u8>(), context_len as usize) }
    };
    // SAFETY: the filter manager calls ConnectNotify at PASSIVE_LEVEL; the token lives for
    // this call.
    let mut irql = unsafe { PassiveLevel::new_unchecked() };
    if let Err(status) = shared
        .events
        .connected(&mut irql, ConnectionId(slot.index), context)
    {
        slot.claimed.store(false, Ordering::Release);
        // Only a failure code refuses: a success or informational code would accept.
        return if status.raw() < 0 {
            status.raw()
        } else {
            Status::UNSUCCESSFUL.raw()
        };
    }
    slot.client.store(client_port, Ordering::Release);
    // SAFETY: checked non-null; the filter manager passes a writable cookie.
    unsafe { connection_cookie.write(core::ptr::from_ref(slot).cast_mut().cast()) };
    0
}

/// `DisconnectNotify`: closes the driver's end (`FltCloseClientPort`, which clears the slot's
/// variable under the filter manager's lock), tells the driver, and frees the slot.
unsafe extern "system" fn disconnect_notify<P: Protocol, E: PortEvents>(
    connection_cookie: sys::PVOID,
) {
    // SAFETY: the cookie is a slot of a port block (ConnectNotify returned it), alive until the
    // filter is unregistered, after which the filter manager calls nothing.
    let Some(slot) = (unsafe { connection_cookie.cast::<Slot>().as_ref() }) else {
        return;
    };
    // SAFETY: `owner` was set at creation, before the port existed, to the block holding the
    // slot; its type is the one this trampoline was instantiated for.
    let Some(shared) = (unsafe {
        slot.owner
            .load(Ordering::Acquire)
            .cast::<PortShared<P, E>>()
            .as_ref()
    }) else {
        return;
    };
    // SAFETY: PASSIVE_LEVEL (DisconnectNotify's documented IRQL); the filter is registered
    // (disconnections come before FltUnregisterFilter returns); the variable is the slot's.
    unsafe { sys::FltCloseClientPort(shared.raw_filter, slot.client.as_ptr()) };
    // SAFETY: as above; the token lives for this call.
    let mut irql = unsafe { PassiveLevel::new_unchecked() };
    shared
        .events
        .disconnected(&mut irql, ConnectionId(slot.index));
    slot.claimed.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_relative_and_never_zero() {
        assert_eq!(relative_timeout(Duration::from_millis(1)), -10_000);
        assert_eq!(relative_timeout(Duration::ZERO), -1);
        assert_eq!(relative_timeout(Duration::MAX), -i64::MAX);
    }

    #[test]
    fn the_empty_message_is_empty() {
        assert_eq!(<() as Message>::decode(&[]), Ok(()));
        assert!(<() as Message>::decode(&[0]).is_err());
    }

    #[test]
    fn send_errors_map_to_statuses() {
        assert_eq!(Status::from(SendError::Timeout), Status::TIMEOUT);
        assert_eq!(
            Status::from(SendError::NotConnected),
            Status::PORT_DISCONNECTED
        );
        assert_eq!(
            Status::from(SendError::ReplyTooLong { max: 4 }),
            Status::BUFFER_OVERFLOW
        );
    }
}
