//! The inverted call: user mode keeps I/O control requests pending at the driver, and the driver
//! answers the next one when it has something to say.
//!
//! A driver cannot call user mode. What it can do is hold on to requests user mode sent it, and
//! complete one later with data. A user-mode service opens the driver's device (`CreateFile`),
//! sends a few `DeviceIoControl` requests with the queue's [`ControlCode`] and an output buffer
//! (overlapped, so they stay pending), and waits. When the driver has a message (a connection
//! to decide, say), [`InvertedQueue::complete_next`] copies it into the oldest pending request
//! and completes it; the service reads it, sends a new request to take that one's place, and
//! answers through whatever channel the protocol uses.
//!
//! Completing an IRP is allowed at `DISPATCH_LEVEL`, so `complete_next` takes any token: a
//! `classifyFn` can hand a message to user mode directly, without a work item.
//!
//! When the driver needs an answer back — a verdict for a pended connection — use the question
//! channel built on this queue, [`AskChannel`](crate::ask::AskChannel): it adds the answer
//! request, a deadline per question and exactly one decision each.
//!
//! ```
//! use wfp_rs::inverted::{ControlCode, InvertedQueue, RequiredAccess};
//! use wfp_rs::irql::DispatchLevel;
//!
//! /// The code the service sends; both sides share this constant.
//! const WAIT_FOR_EVENT: ControlCode = ControlCode::buffered(0x8000, 0x800, RequiredAccess::Any);
//!
//! fn report(irql: &DispatchLevel, queue: &InvertedQueue, pid: u64) {
//!     if let Err(undelivered) = queue.complete_next(irql, pid.to_le_bytes()) {
//!         // No request is waiting (or the message is too large): the bytes come back, so the
//!         // driver can keep them for later instead of losing them.
//!         let _kept: [u8; 8] = undelivered.into_inner();
//!     }
//! }
//! # let machine = wfp_rs_sim::Machine::new();
//! # let driver = machine.load_driver("doc", minimal::DriverEntry).unwrap();
//! # let queue = driver
//! #     .run_in_driver(&machine, |irql, d| InvertedQueue::new(irql, d, "WfpRsDoc", WAIT_FOR_EVENT, 8))
//! #     .unwrap()
//! #     .unwrap();
//! # let service = machine.open_device(r"\\.\WfpRsDoc", wfp_rs_sim::Caller::System).unwrap();
//! # let pending = service.device_io_control(WAIT_FOR_EVENT.raw(), &[], 8);
//! # machine.at_dispatch(|irql| report(irql, &queue, 42));
//! # assert_eq!(pending.wait().output, 42u64.to_le_bytes());
//! # drop(service);
//! # machine.at_passive(|irql| queue.close(irql));
//! # machine.unload_driver(driver).unwrap();
//! # mod minimal {
//! #     #[wfp_rs::driver_entry]
//! #     fn entry(
//! #         _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
//! #         _driver: &mut wfp_rs::driver::Driver<'_>,
//! #     ) -> Result<(), wfp_rs::Status> {
//! #         Ok(())
//! #     }
//! # }
//! ```
//!
//! # The device
//!
//! [`InvertedQueue::new`] creates a named device `\Device\<name>` with a symbolic link
//! `\??\<name>` (user mode opens `\\.\<name>`). Only SYSTEM and the Administrators group may
//! open it: the device gets the DACL `D:P(A;;FA;;;SY)(A;;FA;;;BA)`, which is what `wdmsec.h`
//! calls `SDDL_DEVOBJ_SYS_ALL_ADM_ALL` with the file rights spelled out. (`IoCreateDeviceSecure`
//! would take that SDDL string, but it lives in the static library `wdmsec.lib`, which this crate's
//! import-library-free build cannot link; so the SDK opens a kernel handle to the new device with
//! `ObOpenObjectByPointer` and sets the DACL with `ZwSetSecurityObject`, all exports of
//! `ntoskrnl.exe`, before the device can be opened.) Requests for the device go through the SDK's
//! dispatch routine; a request with another control code fails with
//! `STATUS_INVALID_DEVICE_REQUEST`, and one whose output buffer is smaller than the queue's
//! maximum message size fails at once with `STATUS_BUFFER_TOO_SMALL`, so every waiting request
//! can hold every message.
//!
//! # Cancellation and teardown
//!
//! Pending requests live in a cancel-safe queue (`IoCsqInitializeEx` and friends): the kernel's
//! cancel logic removes a request the user cancels (`CancelIoEx`, or the thread exits) and
//! completes it with `STATUS_CANCELLED`, without the races a hand-written cancel routine has to
//! get right. Closing a handle (`IRP_MJ_CLEANUP`) completes the requests sent through that handle
//! with `STATUS_CANCELLED`. [`InvertedQueue::close`], or dropping the queue at `PASSIVE_LEVEL`,
//! deletes the link, refuses new requests with `STATUS_DELETE_PENDING`, completes every waiting
//! request with `STATUS_CANCELLED`, waits until no dispatch or cancel routine of the queue is
//! still running, and deletes the device. Keep the queue in the driver state and it is closed at
//! unload.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::dispatch::{DeviceHeader, Request};
use crate::driver::Driver;
use crate::event::{Event, EventKind};
use crate::irql::{AtMostDispatch, AtPassive, Irql, PassiveLevel};
use crate::secure_device::{self, WideName, callback_token};
use crate::status::Status;
use crate::sys;

/// The access a handle must have been opened with to send an I/O control code (bits 14-15 of
/// the code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequiredAccess {
    /// `FILE_ANY_ACCESS`.
    Any,
    /// `FILE_READ_ACCESS`.
    Read,
    /// `FILE_WRITE_ACCESS`.
    Write,
    /// `FILE_READ_ACCESS | FILE_WRITE_ACCESS`.
    ReadWrite,
}

impl RequiredAccess {
    const fn bits(self) -> u32 {
        match self {
            RequiredAccess::Any => sys::FILE_ANY_ACCESS,
            RequiredAccess::Read => sys::FILE_READ_ACCESS,
            RequiredAccess::Write => sys::FILE_WRITE_ACCESS,
            RequiredAccess::ReadWrite => sys::FILE_READ_ACCESS | sys::FILE_WRITE_ACCESS,
        }
    }
}

/// An I/O control code (`CTL_CODE`), the number the user-mode side passes to `DeviceIoControl`.
/// Define it once, in a crate both sides share.
///
/// ```
/// use wfp_rs::inverted::{ControlCode, RequiredAccess};
/// // CTL_CODE(0x8000, 0x800, METHOD_BUFFERED, FILE_ANY_ACCESS)
/// const NEXT_EVENT: ControlCode = ControlCode::buffered(0x8000, 0x800, RequiredAccess::Any);
/// assert_eq!(NEXT_EVENT.raw(), 0x8000_2000);
/// assert_eq!((NEXT_EVENT.device_type(), NEXT_EVENT.function()), (0x8000, 0x800));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ControlCode(u32);

impl ControlCode {
    /// A `METHOD_BUFFERED` code: `CTL_CODE(device_type, function, METHOD_BUFFERED, access)`.
    /// Device types from 0x8000 and functions from 0x800 are the ones Microsoft leaves to
    /// vendors. The device the queue creates gets `device_type` as its type.
    ///
    /// # Panics
    ///
    /// If `function` does not fit its 12 bits (0x1000 or more). Define codes in `const` items,
    /// where this is a compile error.
    pub const fn buffered(device_type: u16, function: u16, access: RequiredAccess) -> ControlCode {
        assert!(function < 0x1000, "an I/O control function has 12 bits");
        ControlCode(sys::CTL_CODE(
            device_type as u32,
            function as u32,
            sys::METHOD_BUFFERED,
            access.bits(),
        ))
    }

    /// A code from its raw value (which may use any transfer method; the queue accepts only
    /// `METHOD_BUFFERED` codes).
    pub const fn from_raw(raw: u32) -> ControlCode {
        ControlCode(raw)
    }

    /// The value passed to `DeviceIoControl`.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// Bits 16-31: the device type.
    pub const fn device_type(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Bits 2-13: the function.
    pub const fn function(self) -> u16 {
        ((self.0 >> 2) & 0xFFF) as u16
    }

    /// Bits 0-1: the transfer method (`METHOD_BUFFERED` is 0).
    pub const fn method(self) -> u32 {
        self.0 & 3
    }
}

impl fmt::Debug for ControlCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlCode({:#010X})", self.0)
    }
}

/// Why [`InvertedQueue::complete_next`] delivered nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No request is waiting: user mode has not sent one (or all were completed already).
    NoWaiter,
    /// The message is larger than the queue's maximum message size.
    TooLarge {
        /// The message's size.
        len: usize,
        /// The queue's maximum message size.
        max: usize,
    },
}

/// A message [`InvertedQueue::complete_next`] could not deliver, handed back with the reason.
pub struct Undelivered<P> {
    payload: P,
    reason: Reason,
}

impl<P> Undelivered<P> {
    /// Why the message was not delivered.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The message (or, for [`InvertedQueue::complete_next_with`], the closure), unchanged.
    pub fn into_inner(self) -> P {
        self.payload
    }
}

impl<P> fmt::Debug for Undelivered<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Undelivered")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl<P> fmt::Display for Undelivered<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::NoWaiter => f.write_str("no request from user mode is waiting"),
            Reason::TooLarge { len, max } => write!(
                f,
                "a {len}-byte message is larger than the queue's maximum of {max} bytes"
            ),
        }
    }
}

impl<P> core::error::Error for Undelivered<P> {}

/// The longest device name [`InvertedQueue::new`] and
/// [`ControlDevice::new`](crate::control::ControlDevice::new) accept, in UTF-16 units.
pub const MAX_NAME_LEN: usize = crate::secure_device::MAX_NAME_LEN;
/// `STATUS_SUCCESS`.
const SUCCESS: sys::NTSTATUS = 0;

/// What a device built on the queue adds to it: the question channel
/// ([`AskChannel`](crate::ask::AskChannel)) answers a second control code and keeps state per
/// handle. Every call runs inside the queue's reference count, so
/// [`InvertedQueue::close`] waits for calls in progress.
pub(crate) trait QueueHooks: Sync {
    /// An I/O control request with another code than the queue's, at `PASSIVE_LEVEL` in the
    /// sender's thread. The hook owns the request and completes it; it returns the status it
    /// completed it with.
    fn control(&self, request: Request) -> sys::NTSTATUS;

    /// A request waits in the queue now: deliver to it what waits for a request.
    fn waiter_queued(&self, waiters: Waiters<'_>);

    /// A handle to the device was opened (`IRP_MJ_CREATE`, admitted by the client check of
    /// [`crate::client`]); `file` is its file object, which [`cleanup`](Self::cleanup) names
    /// once its last handle closes. Called before the create completes.
    fn opened(&self, file: *mut sys::FILE_OBJECT);

    /// The last handle to `file` was closed (`IRP_MJ_CLEANUP`); its waiting requests are
    /// cancelled already.
    fn cleanup(&self, file: *mut sys::FILE_OBJECT);
}

/// The queue's waiting requests, as the hooks and the channel use them.
#[derive(Clone, Copy)]
pub(crate) struct Waiters<'a>(&'a QueueDevice);

impl<'a> Waiters<'a> {
    /// Takes the oldest waiting request out of the queue (`IoCsqRemoveNextIrp`), or `None` if
    /// none waits. Callable at <= `DISPATCH_LEVEL`, also under a spin lock of the caller's (the
    /// queue's lock is taken and released inside): the caller fills the request's output under
    /// its lock and lets the [`Taken`] go after releasing it, which completes the request.
    pub(crate) fn take_next(self) -> Option<Taken<'a>> {
        let request = self.0.remove_next(core::ptr::null_mut())?;
        Some(Taken {
            queue: self.0,
            request: Some(request),
            written: 0,
        })
    }
}

/// A waiting request taken out of the queue: no cancel routine and no cleanup reaches it any
/// more. Dropping it completes it with `STATUS_SUCCESS` and the output
/// [`set_written`](Self::set_written) counted (`IofCompleteRequest`, allowed at
/// `DISPATCH_LEVEL`), exactly once.
pub(crate) struct Taken<'a> {
    queue: &'a QueueDevice,
    request: Option<Request>,
    written: usize,
}

impl Taken<'_> {
    /// The file object (the handle) the request came through.
    pub(crate) fn file(&self) -> *mut sys::FILE_OBJECT {
        self.request
            .as_ref()
            .map_or(core::ptr::null_mut(), Request::file_object)
    }

    /// The request's output buffer: at least the queue's maximum message size.
    pub(crate) fn output(&mut self) -> &mut [u8] {
        match self.request.as_mut() {
            Some(request) => request.buffered_output(),
            None => &mut [],
        }
    }

    /// How many bytes of the output the request completes with (at most the buffer's length).
    pub(crate) fn set_written(&mut self, written: usize) {
        self.written = written;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(mut request) = self.request.take() {
            let written = self.written.min(request.buffered_output().len());
            self.queue.finish(request, SUCCESS, written);
        }
    }
}

/// A queue of pending I/O control requests from user mode, on a named device only
/// Administrators and SYSTEM can open. See the [module documentation](self).
pub struct InvertedQueue {
    device: NonNull<sys::DEVICE_OBJECT>,
    queue: NonNull<QueueDevice>,
}

// SAFETY: the queue is used through the kernel's cancel-safe queue routines and a spin lock, all
// callable from any thread; the device object and its extension live until `close`.
unsafe impl Send for InvertedQueue {}
// SAFETY: as above: every method takes `&self` and synchronises through the queue's spin lock.
unsafe impl Sync for InvertedQueue {}

impl InvertedQueue {
    /// Creates the device `\Device\<name>` with the link `\??\<name>`, accessible to SYSTEM and
    /// Administrators only, whose pending requests with `code` this queue answers. Requests whose
    /// output buffer is smaller than `max_message` bytes are refused. Wraps `IoCreateDevice`,
    /// `ObOpenObjectByPointer` + `ZwSetSecurityObject`, `IoCreateSymbolicLink` and
    /// `IoCsqInitializeEx`.
    ///
    /// Errors: `STATUS_OBJECT_NAME_INVALID` for an empty name, one longer than
    /// [`MAX_NAME_LEN`] or one with a backslash or NUL; `STATUS_INVALID_PARAMETER` for a code
    /// that is not `METHOD_BUFFERED` or a `max_message` over 4 GiB;
    /// `STATUS_OBJECT_NAME_COLLISION` if the device or the link exists;
    /// `STATUS_INVALID_DEVICE_STATE` if the driver installed dispatch routines of its own for
    /// create, cleanup, close or device control; otherwise what the kernel returned.
    pub fn new(
        irql: &impl AtPassive,
        driver: &Driver<'_>,
        name: &str,
        code: ControlCode,
        max_message: usize,
    ) -> Result<InvertedQueue, Status> {
        // SAFETY: no hooks.
        unsafe { Self::with_hooks(irql, driver, name, code, max_message, None) }
    }

    /// [`new`](Self::new), with `hooks` called for other control codes, after a request is
    /// queued, and at cleanup.
    ///
    /// # Safety
    ///
    /// `hooks`, if any, stays valid until the queue is closed (by `close`, drop, or a failure
    /// of this function).
    pub(crate) unsafe fn with_hooks(
        irql: &impl AtPassive,
        driver: &Driver<'_>,
        name: &str,
        code: ControlCode,
        max_message: usize,
        hooks: Option<NonNull<dyn QueueHooks>>,
    ) -> Result<InvertedQueue, Status> {
        crate::irql::verify(irql);
        let mut names = secure_device::Names::EMPTY;
        names.set(name)?;
        if code.method() != sys::METHOD_BUFFERED {
            return Err(Status::INVALID_PARAMETER);
        }
        let max_message = u32::try_from(max_message).map_err(|_| Status::INVALID_PARAMETER)?;
        let idle = Event::try_new(EventKind::Notification, false, irql)?;
        let (device, extension) = secure_device::create(
            irql,
            driver,
            &names,
            core::mem::size_of::<QueueDevice>(),
            sys::DEVICE_TYPE::from(code.device_type()),
        )?;
        // Pool-aligned (16, checked below at compile time), `size_of::<QueueDevice>()` bytes.
        let queue = extension.cast::<QueueDevice>();
        // SAFETY: the extension is ours, unused and large enough; no request can reach the
        // device yet (it is still initializing and has no link).
        unsafe { QueueDevice::init(queue, code, max_message, &names.link, idle, hooks) };
        let this = InvertedQueue { device, queue };

        // From here on, dropping `this` at PASSIVE_LEVEL tears everything down.
        if let Err(status) = secure_device::publish(irql, device, &names) {
            this.discard_unpublished(irql);
            return Err(status);
        }
        Ok(this)
    }

    fn queue(&self) -> &QueueDevice {
        // SAFETY: the extension lives as long as the device object, which lives until `close`.
        unsafe { self.queue.as_ref() }
    }

    /// Completes the oldest pending request with `payload` as its output
    /// (`IoStatus.Information` = its length, status `STATUS_SUCCESS`). Allowed at
    /// `DISPATCH_LEVEL`. Wraps `IoCsqRemoveNextIrp` + `IofCompleteRequest`.
    ///
    /// If no request is waiting, or the payload is larger than the queue's maximum message
    /// size, nothing is completed and the payload comes back in the error, so the caller can
    /// keep it.
    pub fn complete_next<P: AsRef<[u8]>>(
        &self,
        irql: &impl AtMostDispatch,
        payload: P,
    ) -> Result<(), Undelivered<P>> {
        crate::irql::verify(irql);
        let len = payload.as_ref().len();
        let max = self.queue().max_message as usize;
        if len > max {
            return Err(Undelivered {
                payload,
                reason: Reason::TooLarge { len, max },
            });
        }
        let Some(mut request) = self.queue().remove_next(core::ptr::null_mut()) else {
            return Err(Undelivered {
                payload,
                reason: Reason::NoWaiter,
            });
        };
        // Every queued request's output buffer holds at least `max` bytes (dispatch checks).
        let output = request.buffered_output();
        let written = len.min(output.len());
        output[..written].copy_from_slice(&payload.as_ref()[..written]);
        self.queue().finish(request, SUCCESS, written);
        Ok(())
    }

    /// Completes the oldest pending request with what `fill` writes into its output buffer
    /// (at least the queue's maximum message size long); `fill` returns how many bytes it
    /// wrote. For messages built in place, without a copy on the (small) kernel stack. Allowed
    /// at `DISPATCH_LEVEL`. If no request is waiting, `fill` is not called and comes back in the
    /// error.
    pub fn complete_next_with<F>(
        &self,
        irql: &impl AtMostDispatch,
        fill: F,
    ) -> Result<usize, Undelivered<F>>
    where
        F: FnOnce(&mut [u8]) -> usize,
    {
        crate::irql::verify(irql);
        let Some(mut request) = self.queue().remove_next(core::ptr::null_mut()) else {
            return Err(Undelivered {
                payload: fill,
                reason: Reason::NoWaiter,
            });
        };
        let output = request.buffered_output();
        let limit = output.len();
        let written = fill(output).min(limit);
        self.queue().finish(request, SUCCESS, written);
        Ok(written)
    }

    /// The waiting requests, for the channel built on this queue.
    pub(crate) fn waiters(&self) -> Waiters<'_> {
        Waiters(self.queue())
    }

    /// Refuses every request from now on as [`close`](Self::close) does — opens and new
    /// requests fail with `STATUS_DELETE_PENDING`, waiting requests complete with
    /// `STATUS_CANCELLED` — but keeps the device (and its link) until `close`: for the question
    /// channel's `stop`, which has the queue by reference only.
    pub(crate) fn refuse_requests(&self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        let queue = self.queue();
        queue.close();
        queue.drain();
    }

    /// How many requests are waiting now.
    pub fn waiting(&self, irql: &impl AtMostDispatch) -> usize {
        crate::irql::verify(irql);
        self.queue().lock().waiting
    }

    /// The largest message the queue delivers; every waiting request can hold it.
    pub fn max_message(&self) -> usize {
        self.queue().max_message as usize
    }

    /// Deletes the link, completes every waiting request with `STATUS_CANCELLED`, refuses new
    /// ones with `STATUS_DELETE_PENDING`, waits until no dispatch or cancel routine of the queue
    /// runs any more, and deletes the device (`IoDeleteSymbolicLink`, `IoDeleteDevice`).
    /// Dropping the queue at `PASSIVE_LEVEL` does the same.
    pub fn close(self, irql: &impl AtPassive) {
        let this = ManuallyDrop::new(self);
        this.shut_down(irql, true);
    }

    /// `new` failed after the device was set up: tear it down (there is no link to delete).
    fn discard_unpublished(self, irql: &impl AtPassive) {
        let this = ManuallyDrop::new(self);
        this.shut_down(irql, false);
    }

    fn shut_down(&self, irql: &impl AtPassive, delete_link: bool) {
        crate::irql::verify(irql);
        let queue = self.queue();
        if delete_link {
            // The link was created by `new` and is deleted once, here.
            secure_device::delete_link(irql, &queue.link);
        }
        queue.close();
        queue.drain();
        // Wait until every dispatch call and every accepted request is finished, if any was in
        // progress when the queue closed: the last one signals `idle` while holding the lock
        // (see `leave`); taking the lock once more after the wait makes sure it has also
        // released it, its last touch of the extension.
        if queue.lock().last_leave_signals {
            queue.idle().wait(irql);
            drop(queue.lock());
        }
        // SAFETY: no reference is left and none can be taken (the queue is closed), so nothing
        // else uses the event.
        let idle = unsafe { &mut *queue.idle.get() };
        // SAFETY: as above; it is dropped exactly once, here (`close` and `drop` do not both run).
        unsafe { ManuallyDrop::drop(idle) };
        // SAFETY: PASSIVE_LEVEL (the token); the device is ours, empty and deleted once. Its
        // extension stays valid while handles to it are open, and then only answers
        // `STATUS_DELETE_PENDING` (the queue is closed).
        unsafe { sys::IoDeleteDevice(self.device.as_ptr()) };
    }

    /// Dropped above `PASSIVE_LEVEL`: the waiting requests are completed, but the link and the
    /// device (and with them the extension) have to be leaked.
    fn abandon(&self) {
        let queue = self.queue();
        queue.close();
        queue.drain();
        crate::kd_print!(
            Error,
            "wfp-rs: an InvertedQueue was dropped at {}; deleting its device needs PASSIVE_LEVEL, \
             so the device and its link are leaked (close it with InvertedQueue::close)\n",
            Irql::current()
        );
    }
}

impl Drop for InvertedQueue {
    /// Closes the queue at `PASSIVE_LEVEL` (see [`close`](Self::close)); above it, completes the
    /// waiting requests and leaks the device with a debugger message.
    fn drop(&mut self) {
        // SAFETY: `shut_down` is SDK code; it reaches no token of the driver's (a token the
        // dropping code holds stays in its frame) and runs no driver code but the drop of the
        // queue's own state, which receives no token; it does not change the IRQL.
        if unsafe { PassiveLevel::try_current_in_sdk(|irql| self.shut_down(irql, true)) }.is_none()
        {
            self.abandon();
        }
    }
}

impl fmt::Debug for InvertedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvertedQueue")
            .field("code", &self.queue().code)
            .field("max_message", &self.queue().max_message)
            .finish_non_exhaustive()
    }
}

// --- the device extension -----------------------------------------------------------------------

/// What the lock protects.
struct QueueState {
    /// The waiting IRPs, linked through `Tail.Overlay.ListEntry` (the driver's while it owns
    /// the IRP), oldest first.
    head: sys::LIST_ENTRY,
    waiting: usize,
    /// Whether references were held when the queue closed: then the `leave` that drops the
    /// last one signals `idle`, and closing waits for it.
    last_leave_signals: bool,
}

/// The bit of [`QueueDevice::references`] that says the queue is closed (by `close`, drop or
/// `refuse_requests`): no new requests are accepted, no reference can be taken.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// The device extension of a queue's device. `header` comes first, for the dispatch routine.
#[repr(C)]
struct QueueDevice {
    header: DeviceHeader,
    /// The kernel reads and writes it through the pointer the queue routines get.
    csq: UnsafeCell<sys::IO_CSQ>,
    lock: UnsafeCell<sys::KSPIN_LOCK>,
    state: UnsafeCell<QueueState>,
    /// Dispatch calls in progress plus requests accepted into the queue and not completed yet,
    /// and [`CLOSED`]. An atomic rather than under the lock: every dispatch call takes and drops
    /// a reference, and a lock for each would be two more spin lock round trips per request.
    /// The bit is set under the lock (so a request the queue inserts under it either sees it or
    /// is drained after it); closing waits for the count to reach zero.
    references: AtomicUsize,
    /// Signalled when the queue is closed and the last reference goes.
    idle: UnsafeCell<ManuallyDrop<Event>>,
    code: ControlCode,
    max_message: u32,
    link: WideName,
    /// Valid until the queue is closed (the contract of `with_hooks`).
    hooks: Option<NonNull<dyn QueueHooks>>,
}

const _: () = assert!(core::mem::align_of::<QueueDevice>() <= crate::pool::POOL_ALIGNMENT);

/// The lock held; the guard gives the state and releases the lock (restoring the IRQL) on drop.
struct Locked<'a> {
    queue: &'a QueueDevice,
    old_irql: sys::KIRQL,
}

impl core::ops::Deref for Locked<'_> {
    type Target = QueueState;
    fn deref(&self) -> &QueueState {
        // SAFETY: the guard holds the lock, which serialises all access to the state.
        unsafe { &*self.queue.state.get() }
    }
}

impl core::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut QueueState {
        // SAFETY: as above; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.queue.state.get() }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard acquired the lock on this processor and releases it once.
        unsafe { self.queue.release(self.old_irql) };
    }
}

/// The offset of `Tail.Overlay.ListEntry` in an IRP.
const LIST_ENTRY_OFFSET: usize =
    core::mem::offset_of!(sys::IRP, Tail) + core::mem::offset_of!(sys::IRP_TAIL_OVERLAY, ListEntry);

/// The list entry of an IRP the driver owns or has queued.
fn entry_of(irp: *mut sys::IRP) -> *mut sys::LIST_ENTRY {
    irp.cast::<u8>().wrapping_add(LIST_ENTRY_OFFSET).cast()
}

/// The IRP whose `Tail.Overlay.ListEntry` is `entry`.
fn irp_of(entry: *mut sys::LIST_ENTRY) -> *mut sys::IRP {
    entry.cast::<u8>().wrapping_sub(LIST_ENTRY_OFFSET).cast()
}

impl QueueDevice {
    /// Writes a fresh queue into the extension at `this` and registers its callbacks.
    ///
    /// # Safety
    ///
    /// `this` is the unused, suitably sized and aligned extension of a device no request can
    /// reach yet.
    unsafe fn init(
        this: NonNull<QueueDevice>,
        code: ControlCode,
        max_message: u32,
        link: &WideName,
        idle: Event,
        hooks: Option<NonNull<dyn QueueHooks>>,
    ) {
        let raw = this.as_ptr();
        // SAFETY: per the contract, the memory is ours to initialise.
        unsafe {
            raw.write(QueueDevice {
                header: DeviceHeader::new(dispatch),
                // IoCsqInitializeEx fills it below.
                csq: UnsafeCell::new(sys::IO_CSQ {
                    Type: 0,
                    CsqInsertIrp: sys::IO_CSQ_INSERT_ROUTINE {
                        CsqInsertIrpEx: None,
                    },
                    CsqRemoveIrp: None,
                    CsqPeekNextIrp: None,
                    CsqAcquireLock: None,
                    CsqReleaseLock: None,
                    CsqCompleteCanceledIrp: None,
                    ReservePointer: core::ptr::null_mut(),
                }),
                lock: UnsafeCell::new(0),
                state: UnsafeCell::new(QueueState {
                    head: sys::LIST_ENTRY {
                        Flink: core::ptr::null_mut(),
                        Blink: core::ptr::null_mut(),
                    },
                    waiting: 0,
                    last_leave_signals: false,
                }),
                references: AtomicUsize::new(0),
                idle: UnsafeCell::new(ManuallyDrop::new(idle)),
                code,
                max_message,
                link: link.clone(),
                hooks,
            })
        };
        // SAFETY: initialised above; not shared with anyone yet.
        let queue = unsafe { &*raw };
        // SAFETY: as above, so this is the only reference to the state; the list head points at
        // itself (empty) now that it has its final address.
        let state = unsafe { &mut *queue.state.get() };
        let head = &raw mut state.head;
        state.head.Flink = head;
        state.head.Blink = head;
        // SAFETY: the IO_CSQ lives in the extension, at a fixed address, as long as the device;
        // the callbacks match the prototypes IoCsqInitializeEx expects. It always succeeds.
        unsafe {
            sys::IoCsqInitializeEx(
                queue.csq.get(),
                Some(csq_insert),
                Some(csq_remove),
                Some(csq_peek_next),
                Some(csq_acquire_lock),
                Some(csq_release_lock),
                Some(csq_complete_canceled),
            )
        };
    }

    /// The queue whose `IO_CSQ` is at `csq`.
    ///
    /// # Safety
    ///
    /// `csq` is the `csq` field of a live `QueueDevice` (the kernel passes back the pointer the
    /// queue registered).
    unsafe fn from_csq<'a>(csq: *mut sys::IO_CSQ) -> &'a QueueDevice {
        let offset = core::mem::offset_of!(QueueDevice, csq);
        let queue = csq.cast::<u8>().wrapping_sub(offset).cast::<QueueDevice>();
        // SAFETY: per the contract, stepping back from the field reaches its live `QueueDevice`.
        unsafe { &*queue }
    }

    /// Acquires the spin lock (`KeAcquireSpinLockRaiseToDpc`); returns the IRQL to restore.
    ///
    /// # Safety
    ///
    /// The caller runs at IRQL <= DISPATCH_LEVEL, does not hold the lock, and releases it with
    /// [`release`](Self::release) on this processor.
    unsafe fn acquire(&self) -> sys::KIRQL {
        // SAFETY: the lock word lives in the extension; the caller's contract covers the rest.
        unsafe { sys::KeAcquireSpinLockRaiseToDpc(self.lock.get()) }
    }

    /// Releases the spin lock (`KeReleaseSpinLock`).
    ///
    /// # Safety
    ///
    /// This processor holds the lock; `old_irql` is what [`acquire`](Self::acquire) returned.
    unsafe fn release(&self, old_irql: sys::KIRQL) {
        // SAFETY: per the contract.
        unsafe { sys::KeReleaseSpinLock(self.lock.get(), old_irql) }
    }

    fn lock(&self) -> Locked<'_> {
        // SAFETY: every path of this module runs at <= DISPATCH_LEVEL and takes the lock only
        // through this guard or the queue callbacks, never nested; the guard releases it.
        let old_irql = unsafe { self.acquire() };
        Locked {
            queue: self,
            old_irql,
        }
    }

    /// The state, with the lock held by the kernel's queue routine that called back.
    ///
    /// # Safety
    ///
    /// The lock is held (the cancel-safe queue calls insert, remove and peek between its
    /// acquire and release callbacks), and no other reference to the state is alive.
    #[expect(
        clippy::mut_from_ref,
        reason = "the spin lock, held by the caller, makes it unique"
    )]
    unsafe fn state_locked(&self) -> &mut QueueState {
        // SAFETY: per the contract.
        unsafe { &mut *self.state.get() }
    }

    fn idle(&self) -> &Event {
        // SAFETY: the event is dropped only in `shut_down`, after the last reference; every
        // other access is shared (`Event::set` and `Event::wait` take `&self`).
        unsafe { &*self.idle.get() }
    }

    fn csq(&self) -> *mut sys::IO_CSQ {
        self.csq.get()
    }

    /// The hooks, while the caller holds a reference of the queue (`enter`, or an accepted
    /// request).
    fn hooks(&self) -> Option<&dyn QueueHooks> {
        // SAFETY: the hooks stay valid until the queue is closed (`with_hooks`), and `close`
        // waits until no reference is held before it returns.
        self.hooks.map(|hooks| unsafe { hooks.as_ref() })
    }

    /// Takes a reference for a dispatch call; false if the queue is closed.
    fn enter(&self) -> bool {
        self.references
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |references| {
                (references & CLOSED == 0).then_some(references + 1)
            })
            .is_ok()
    }

    /// Drops a reference (a dispatch call ended, or an accepted request was completed). After
    /// this the caller must not touch the queue.
    fn leave(&self) {
        // AcqRel: whatever the other holders did before their own `leave` happens before the
        // last one's signal (the decrements form one release sequence).
        if self.references.fetch_sub(1, Ordering::AcqRel) == CLOSED | 1 {
            // The last reference of a closed queue. The queue closed while references were held
            // (it accepts none after), so closing waits for this signal; set under the lock, so
            // that it can tell when this thread is done with the extension.
            let _locked = self.lock();
            self.idle().set(&callback_token());
        }
    }

    /// Closes the queue to new references and requests (idempotent). Under the lock: the
    /// queue's insert callback checks [`CLOSED`] under it.
    fn close(&self) {
        let mut state = self.lock();
        let before = self.references.fetch_or(CLOSED, Ordering::AcqRel);
        if before & CLOSED == 0 {
            state.last_leave_signals = before != 0;
        }
    }

    /// Removes the oldest waiting request, of `file` only if not null (`IoCsqRemoveNextIrp`).
    fn remove_next(&self, file: *mut sys::FILE_OBJECT) -> Option<Request> {
        // SAFETY: the IO_CSQ was initialised by `init` and lives with the device; this runs at
        // <= DISPATCH_LEVEL (callers hold a token or are dispatch routines) and not under the
        // queue lock.
        let irp = unsafe { sys::IoCsqRemoveNextIrp(self.csq(), file.cast()) };
        // SAFETY: the queue removed the IRP and cleared its cancel routine: it is ours now.
        NonNull::new(irp).map(|irp| unsafe { Request::from_raw(irp) })
    }

    /// Completes a request taken out of the queue and drops its reference.
    fn finish(&self, request: Request, status: sys::NTSTATUS, information: usize) {
        request.complete(status, information);
        self.leave();
    }

    /// Completes every waiting request with `STATUS_CANCELLED`.
    fn drain(&self) {
        while let Some(request) = self.remove_next(core::ptr::null_mut()) {
            self.finish(request, Status::CANCELLED.raw(), 0);
        }
    }

    /// `IRP_MJ_DEVICE_CONTROL`: queue a request with the right code and a large enough buffer.
    fn device_control(&self, request: Request) -> sys::NTSTATUS {
        let refuse = |request: Request, status: Status| {
            request.complete(status.raw(), 0);
            status.raw()
        };
        let Some(control) = request.device_control() else {
            return refuse(request, Status::INVALID_DEVICE_REQUEST);
        };
        if control.code != self.code.raw() {
            if self.hooks.is_none() {
                return refuse(request, Status::INVALID_DEVICE_REQUEST);
            }
            if !self.enter() {
                return refuse(request, Status::DELETE_PENDING);
            }
            let status = match self.hooks() {
                Some(hooks) => hooks.control(request),
                None => refuse(request, Status::INVALID_DEVICE_REQUEST),
            };
            self.leave();
            return status;
        }
        if control.output_len < self.max_message as usize {
            return refuse(request, Status::BUFFER_TOO_SMALL);
        }
        if !self.enter() {
            return refuse(request, Status::DELETE_PENDING);
        }
        let irp = request.into_raw();
        // SAFETY: the IO_CSQ is initialised; the IRP is ours to queue; PASSIVE_LEVEL.
        let status = unsafe {
            sys::IoCsqInsertIrpEx(
                self.csq(),
                irp.as_ptr(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
            )
        };
        let returned = if Status::from_ntstatus(status).is_ok() {
            // Queued: another thread may complete it any moment, so the IRP is not touched
            // again here.
            if let Some(hooks) = self.hooks() {
                hooks.waiter_queued(Waiters(self));
            }
            sys::STATUS_PENDING
        } else {
            // Refused (the queue closed meanwhile): the IRP is still ours.
            // SAFETY: the queue did not take the IRP.
            let request = unsafe { Request::from_raw(irp) };
            // The queue routine may have marked it pending; then STATUS_PENDING must be
            // returned even though it is completed here.
            let marked = request.is_marked_pending();
            request.complete(status, 0);
            if marked { sys::STATUS_PENDING } else { status }
        };
        self.leave();
        returned
    }
}

/// The dispatch handler of a queue's device.
///
/// # Safety
///
/// See [`crate::dispatch::Handler`]: `header` starts a `QueueDevice`.
unsafe fn dispatch(
    _device: NonNull<sys::DEVICE_OBJECT>,
    header: NonNull<DeviceHeader>,
    request: Request,
) -> sys::NTSTATUS {
    // SAFETY: the header is the first field of the repr(C) `QueueDevice` in this device's
    // extension, which lives while the device does (the request's file object holds it).
    let queue = unsafe { header.cast::<QueueDevice>().as_ref() };
    match request.major() {
        sys::IRP_MJ_CREATE => {
            let status = if queue.enter() {
                if let Some(hooks) = queue.hooks() {
                    hooks.opened(request.file_object());
                }
                queue.leave();
                SUCCESS
            } else {
                Status::DELETE_PENDING.raw()
            };
            request.complete(status, 0);
            status
        }
        sys::IRP_MJ_CLEANUP => {
            // The last handle to this file object is closed: its requests are cancelled.
            if queue.enter() {
                let file = request.file_object();
                while let Some(pending) = queue.remove_next(file) {
                    queue.finish(pending, Status::CANCELLED.raw(), 0);
                }
                if let Some(hooks) = queue.hooks() {
                    hooks.cleanup(file);
                }
                queue.leave();
            }
            request.complete(SUCCESS, 0);
            SUCCESS
        }
        sys::IRP_MJ_CLOSE => {
            request.complete(SUCCESS, 0);
            SUCCESS
        }
        sys::IRP_MJ_DEVICE_CONTROL => queue.device_control(request),
        _ => {
            let status = Status::INVALID_DEVICE_REQUEST.raw();
            request.complete(status, 0);
            status
        }
    }
}

// --- the cancel-safe queue callbacks ------------------------------------------------------------
//
// The kernel calls insert, remove and peek between acquire and release, so they find the lock
// held; complete-canceled runs after release.

unsafe extern "system" fn csq_acquire_lock(csq: *mut sys::IO_CSQ, irql: *mut sys::KIRQL) {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    // SAFETY: the queue routines run at <= DISPATCH_LEVEL and pair this with `csq_release_lock`
    // on the same processor.
    let old = unsafe { queue.acquire() };
    // SAFETY: the kernel passes a writable KIRQL.
    unsafe { irql.write(old) };
}

unsafe extern "system" fn csq_release_lock(csq: *mut sys::IO_CSQ, irql: sys::KIRQL) {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    // SAFETY: the kernel acquired the lock with `csq_acquire_lock`, which saved `irql`.
    unsafe { queue.release(irql) };
}

unsafe extern "system" fn csq_insert(
    csq: *mut sys::IO_CSQ,
    irp: *mut sys::IRP,
    _context: sys::PVOID,
) -> sys::NTSTATUS {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    // SAFETY: called with the lock held.
    let state = unsafe { queue.state_locked() };
    // `close` sets the bit under the lock this routine is called with.
    if queue.references.load(Ordering::Relaxed) & CLOSED != 0 {
        return Status::DELETE_PENDING.raw();
    }
    let head = &raw mut state.head;
    let entry = entry_of(irp);
    // The list links the head and queued IRPs (through `Tail.Overlay.ListEntry`, the driver's
    // while it owns the IRP); all are valid and only touched under the lock. Insert at the tail.
    // SAFETY: the head is valid (see above).
    let last = unsafe { (*head).Blink };
    // SAFETY: the new IRP is ours to link (see above).
    unsafe {
        entry.write(sys::LIST_ENTRY {
            Flink: head,
            Blink: last,
        })
    };
    // SAFETY: `last` is the head or a queued IRP's entry (see above).
    unsafe { (*last).Flink = entry };
    // SAFETY: the head is valid (see above).
    unsafe { (*head).Blink = entry };
    state.waiting += 1;
    // The request's own reference, dropped when it is completed. The dispatch call that
    // inserts it holds one, so the count cannot reach zero meanwhile.
    queue.references.fetch_add(1, Ordering::Relaxed);
    SUCCESS
}

unsafe extern "system" fn csq_remove(csq: *mut sys::IO_CSQ, irp: *mut sys::IRP) {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    // SAFETY: called with the lock held.
    let state = unsafe { queue.state_locked() };
    let entry = entry_of(irp);
    // The IRP is in the list (the kernel removes only IRPs it inserted), and its neighbours are
    // the head or queued IRPs' entries, all valid and only touched under the lock.
    // SAFETY: see above.
    let links = unsafe { entry.read() };
    // SAFETY: see above.
    unsafe { (*links.Blink).Flink = links.Flink };
    // SAFETY: see above.
    unsafe { (*links.Flink).Blink = links.Blink };
    state.waiting -= 1;
}

unsafe extern "system" fn csq_peek_next(
    csq: *mut sys::IO_CSQ,
    irp: *mut sys::IRP,
    peek_context: sys::PVOID,
) -> *mut sys::IRP {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    // SAFETY: called with the lock held.
    let state = unsafe { queue.state_locked() };
    let head = &raw mut state.head;
    let mut entry = if irp.is_null() {
        state.head.Flink
    } else {
        // SAFETY: `irp` is in the list (the kernel passes back what this routine returned).
        unsafe { (*entry_of(irp)).Flink }
    };
    while entry != head {
        let candidate = irp_of(entry);
        // SAFETY: a queued IRP we own.
        let stack = unsafe { sys::IoGetCurrentIrpStackLocation(candidate) };
        // SAFETY: its current stack location is valid while it is queued.
        let file = unsafe { (*stack).FileObject };
        if peek_context.is_null() || file.cast() == peek_context {
            return candidate;
        }
        // SAFETY: as above, a valid list entry.
        entry = unsafe { (*entry).Flink };
    }
    core::ptr::null_mut()
}

unsafe extern "system" fn csq_complete_canceled(csq: *mut sys::IO_CSQ, irp: *mut sys::IRP) {
    // SAFETY: the kernel passes our IO_CSQ.
    let queue = unsafe { QueueDevice::from_csq(csq) };
    let Some(irp) = NonNull::new(irp) else {
        return;
    };
    // SAFETY: the kernel removed the cancelled IRP from the queue and hands it to us to
    // complete.
    let request = unsafe { Request::from_raw(irp) };
    queue.finish(request, Status::CANCELLED.raw(), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_codes_follow_ctl_code() {
        let code = ControlCode::buffered(0x22, 0x800, RequiredAccess::ReadWrite);
        assert_eq!(code.raw(), (0x22 << 16) | (3 << 14) | (0x800 << 2));
        assert_eq!(code.method(), sys::METHOD_BUFFERED);
        assert_eq!(code.function(), 0x800);
        assert_eq!(format!("{code:?}"), "ControlCode(0x0022E000)");
    }
}
