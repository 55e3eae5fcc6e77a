//! Commands from a user-mode service: `DeviceIoControl` requests that a driver-provided
//! [`CommandHandler`] answers at once, in the sender's thread.
//!
//! The filter-manager port's message callback would be the other way for a service to send the
//! driver something, but it hands the driver raw user-mode pointers that must be read under
//! structured exception handling (`__try`/`__except`), which Rust cannot express. A
//! `METHOD_BUFFERED` I/O control request needs none: the I/O manager copies the input into a
//! kernel buffer (`Irp->AssociatedIrp.SystemBuffer`) before the driver sees it, and copies the
//! output back after the driver completes it. [`ControlDevice`] creates a device that takes such
//! requests and calls its handler with plain, non-aliasing slices.
//!
//! ```
//! use wfp_rs::Status;
//! use wfp_rs::control::{CommandHandler, ControlDevice};
//! use wfp_rs::inverted::{ControlCode, RequiredAccess};
//! use wfp_rs::irql::PassiveLevel;
//!
//! /// The codes the service sends; both sides share these constants.
//! const PING: ControlCode = ControlCode::buffered(0x8000, 0x900, RequiredAccess::Any);
//!
//! struct Commands;
//!
//! impl CommandHandler for Commands {
//!     fn command(
//!         &self,
//!         _irql: &mut PassiveLevel<'_>,
//!         code: ControlCode,
//!         input: &[u8],
//!         output: &mut [u8],
//!     ) -> Result<usize, Status> {
//!         match code {
//!             PING => {
//!                 let reply = output.get_mut(..input.len()).ok_or(Status::BUFFER_TOO_SMALL)?;
//!                 reply.copy_from_slice(input);
//!                 Ok(input.len())
//!             }
//!             _ => Err(Status::INVALID_DEVICE_REQUEST),
//!         }
//!     }
//! }
//!
//! fn create(irql: &PassiveLevel<'_>, driver: &wfp_rs::driver::Driver<'_>)
//!     -> Result<ControlDevice<Commands>, Status>
//! {
//!     // User mode opens \\.\WfpRsDocCommands (SYSTEM and Administrators only).
//!     ControlDevice::new(irql, driver, "WfpRsDocCommands", Commands)
//! }
//! # let machine = wfp_rs_sim::Machine::new();
//! # let driver = machine.load_driver("doc", minimal::DriverEntry).unwrap();
//! # let device = driver.run_in_driver(&machine, |irql, d| create(irql, d)).unwrap().unwrap();
//! # let service = machine.open_device(r"\\.\WfpRsDocCommands", wfp_rs_sim::Caller::System).unwrap();
//! # let answer = service.device_io_control(PING.raw(), b"hello", 16).wait();
//! # assert_eq!(answer.ok(), Ok(&b"hello"[..]));
//! # drop(service);
//! # machine.at_passive(|irql| device.close(irql));
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
//! [`ControlDevice::new`] creates `\Device\<name>` with the link `\??\<name>` (user mode opens
//! `\\.\<name>`), of type `FILE_DEVICE_UNKNOWN`, with the same security as the
//! [`InvertedQueue`](crate::inverted::InvertedQueue)'s device: only SYSTEM and the
//! Administrators group may open it (`D:P(A;;FA;;;SY)(A;;FA;;;BA)`). Create, cleanup and close
//! succeed; there is no per-handle state.
//!
//! # Requests
//!
//! - A code whose transfer method is not `METHOD_BUFFERED` fails with
//!   `STATUS_INVALID_DEVICE_REQUEST`, without reaching the handler. Every `METHOD_BUFFERED` code
//!   reaches it: the handler answers codes it does not know with an error of its choice
//!   (`STATUS_INVALID_DEVICE_REQUEST` is the convention).
//! - An input longer than [`MAX_INPUT`] bytes fails with `STATUS_INVALID_BUFFER_SIZE`. The
//!   input is copied out of the system buffer (into non-paged pool; `STATUS_INSUFFICIENT_RESOURCES`
//!   if there is none) because input and output share that buffer; the output slice is zeroed
//!   before the handler runs, so bytes it reports but did not write are zeros, never stale
//!   kernel memory.
//! - `Ok(n)` completes the request with `STATUS_SUCCESS` and `n` bytes of output. An `n` larger
//!   than the output slice is a bug in the handler: the request fails with
//!   `STATUS_INTERNAL_ERROR` and no output (never more than the caller's buffer holds), and the
//!   debugger is told.
//! - `Err(status)` completes the request with `status` and no output. `status` must be an error
//!   or warning code; a success-severity value (such as `STATUS_TIMEOUT`, or `STATUS_PENDING`,
//!   which would claim the request is still pending) is a handler bug, answered with
//!   `STATUS_INTERNAL_ERROR`.
//!
//! The handler runs in the sender's thread, at `PASSIVE_LEVEL` (the I/O manager calls the
//! dispatch routine of the top-level driver there; a request arriving at a higher IRQL, which
//! only another kernel component could send, fails with `STATUS_INVALID_DEVICE_STATE`), while
//! the sender waits. Several senders may run it at once, hence `Sync`. It may wait, briefly:
//! [`ControlDevice::close`] and unload wait for running calls.
//!
//! # Teardown
//!
//! [`ControlDevice::close`], or dropping the device at `PASSIVE_LEVEL`, deletes the link,
//! refuses new requests (and new handles) with `STATUS_DELETE_PENDING`, waits until no handler
//! call is running, drops the handler and deletes the device. Keep the device in the driver
//! state and unload does this. Do not close the device from its own handler: the close would
//! wait for itself. Dropped above `PASSIVE_LEVEL`, the device refuses new requests but cannot be
//! deleted: it, its link and its handler are leaked, with a debugger message.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use crate::dispatch::{DeviceHeader, Request};
use crate::driver::Driver;
use crate::event::{Event, EventKind};
use crate::inverted::ControlCode;
use crate::irql::{AtPassive, DispatchLevel, Irql, PassiveLevel};
use crate::pool::{PoolBytes, PoolTag};
use crate::secure_device::{self, WideName, callback_token};
use crate::spin_lock::SpinLock;
use crate::status::Status;
use crate::sys;

/// The longest input a command may carry, in bytes; longer ones fail with
/// `STATUS_INVALID_BUFFER_SIZE` before the handler runs.
pub const MAX_INPUT: usize = 4096;

/// `STATUS_SUCCESS`.
const SUCCESS: sys::NTSTATUS = 0;

/// Answers the commands a [`ControlDevice`] receives.
pub trait CommandHandler: Send + Sync + 'static {
    /// Handles one `METHOD_BUFFERED` I/O control request: `input` is a copy of the caller's
    /// input (at most [`MAX_INPUT`] bytes), `output` the caller's output buffer (zeroed, as long
    /// as the caller made it). Returns how many bytes of `output` to return, or the status to
    /// fail the request with.
    ///
    /// Runs in the sender's thread at `PASSIVE_LEVEL` (the `IRP_MJ_DEVICE_CONTROL` dispatch of a
    /// top-level driver), possibly on several threads at once. See the
    /// [module documentation](self) for what happens to each result.
    fn command(
        &self,
        irql: &mut PassiveLevel<'_>,
        code: ControlCode,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, Status>;
}

/// A named device, only Administrators and SYSTEM can open, whose `METHOD_BUFFERED` I/O
/// control requests a [`CommandHandler`] answers synchronously. See the
/// [module documentation](self).
pub struct ControlDevice<H: CommandHandler> {
    device: NonNull<sys::DEVICE_OBJECT>,
    extension: NonNull<ControlExtension<H>>,
    _handler: PhantomData<H>,
}

// SAFETY: the device object and its extension live until `close`; the extension's state is
// behind a spin lock, its event is usable from any thread, and the handler is `Send + Sync`.
unsafe impl<H: CommandHandler> Send for ControlDevice<H> {}
// SAFETY: as above; `&self` gives only `&H` (`H: Sync`).
unsafe impl<H: CommandHandler> Sync for ControlDevice<H> {}

impl<H: CommandHandler> ControlDevice<H> {
    /// Creates the device `\Device\<name>` with the link `\??\<name>`, accessible to SYSTEM and
    /// Administrators only, whose commands `handler` answers. Wraps `IoCreateDevice`,
    /// `ObOpenObjectByPointer` + `ZwSetSecurityObject` and `IoCreateSymbolicLink`.
    ///
    /// Errors: `STATUS_OBJECT_NAME_INVALID` for an empty name, one longer than
    /// [`MAX_NAME_LEN`](crate::inverted::MAX_NAME_LEN) or one with a backslash or NUL;
    /// `STATUS_OBJECT_NAME_COLLISION` if the device or the link exists;
    /// `STATUS_INVALID_DEVICE_STATE` if the driver installed dispatch routines of its own for
    /// create, cleanup, close or device control; otherwise what the kernel returned. The handler
    /// is dropped on failure.
    pub fn new(
        irql: &impl AtPassive,
        driver: &Driver<'_>,
        name: &str,
        handler: H,
    ) -> Result<ControlDevice<H>, Status> {
        const {
            assert!(
                core::mem::align_of::<ControlExtension<H>>() <= crate::pool::POOL_ALIGNMENT,
                "the device extension is 16-byte aligned: the handler cannot need more"
            )
        };
        crate::irql::verify(irql);
        let mut names = secure_device::Names::EMPTY;
        names.set(name)?;
        let idle = Event::try_new(EventKind::Notification, false, irql)?;
        let (device, extension) = secure_device::create(
            irql,
            driver,
            &names,
            core::mem::size_of::<ControlExtension<H>>(),
            sys::FILE_DEVICE_UNKNOWN,
        )?;
        let extension = extension.cast::<ControlExtension<H>>();
        // SAFETY: the extension is ours, unused, `size_of::<ControlExtension<H>>()` bytes and
        // pool-aligned (checked above); no request can reach the device yet (it is still
        // initializing and has no link).
        unsafe {
            extension.as_ptr().write(ControlExtension {
                header: DeviceHeader::new(dispatch::<H>),
                state: SpinLock::new(GateState {
                    references: 0,
                    closed: false,
                }),
                idle: UnsafeCell::new(ManuallyDrop::new(idle)),
                handler: UnsafeCell::new(ManuallyDrop::new(handler)),
                link: names.link.clone(),
            })
        };
        let this = ControlDevice {
            device,
            extension,
            _handler: PhantomData,
        };
        // From here on, dropping `this` at PASSIVE_LEVEL tears everything down.
        if let Err(status) = secure_device::publish(irql, device, &names) {
            this.discard_unpublished(irql);
            return Err(status);
        }
        Ok(this)
    }

    fn extension(&self) -> &ControlExtension<H> {
        // SAFETY: the extension lives as long as the device object, which lives until `close`.
        unsafe { self.extension.as_ref() }
    }

    /// The handler, for the driver's own use (the state it shares with its commands).
    pub fn handler(&self) -> &H {
        self.extension().handler()
    }

    /// Deletes the link, refuses new requests with `STATUS_DELETE_PENDING`, waits until no
    /// handler call is running, drops the handler and deletes the device
    /// (`IoDeleteSymbolicLink`, `IoDeleteDevice`). Dropping the device at `PASSIVE_LEVEL` does
    /// the same.
    pub fn close(self, irql: &impl AtPassive) {
        let this = ManuallyDrop::new(self);
        this.shut_down(irql, true);
    }

    /// `new` failed after the extension was written: tear it down (there is no link).
    fn discard_unpublished(self, irql: &impl AtPassive) {
        let this = ManuallyDrop::new(self);
        this.shut_down(irql, false);
    }

    fn shut_down(&self, irql: &impl AtPassive, delete_link: bool) {
        crate::irql::verify(irql);
        let extension = self.extension();
        if delete_link {
            // Created by `new`, deleted once, here.
            secure_device::delete_link(irql, &extension.link);
        }
        extension.locked(|state, _| state.closed = true);
        // Wait until every handler call has finished. The last one signals `idle` while holding
        // the lock; taking the lock once more after the wait makes sure it has also released
        // it, its last touch of the extension.
        loop {
            if extension.locked(|state, _| state.references == 0) {
                break;
            }
            extension.idle().wait(irql);
        }
        // `ManuallyDrop<T>` is `repr(transparent)`: dropping in place through a `*mut T` drops
        // the value.
        // SAFETY: no reference is left and none can be taken (the device is closed), so nothing
        // else uses the handler; it is dropped exactly once, here (`close` and `drop` do not
        // both run).
        unsafe { core::ptr::drop_in_place(extension.handler.get().cast::<H>()) };
        // SAFETY: as above, for the event.
        unsafe { core::ptr::drop_in_place(extension.idle.get().cast::<Event>()) };
        // SAFETY: PASSIVE_LEVEL (the token); the device is ours and deleted once. Its extension
        // stays valid while handles to it are open, and then only answers
        // `STATUS_DELETE_PENDING` (the device is closed).
        unsafe { sys::IoDeleteDevice(self.device.as_ptr()) };
    }

    /// Dropped above `PASSIVE_LEVEL`: refuse new requests, but the device (with its handler)
    /// cannot be deleted there, nor running calls waited for.
    fn abandon(&self) {
        self.extension().locked(|state, _| state.closed = true);
        crate::kd_print!(
            Error,
            "wfp-rs: a ControlDevice was dropped at {}; deleting its device needs PASSIVE_LEVEL, \
             so the device, its link and its handler are leaked (close it with \
             ControlDevice::close)\n",
            Irql::current()
        );
    }
}

impl<H: CommandHandler> Drop for ControlDevice<H> {
    /// Closes the device at `PASSIVE_LEVEL` (see [`close`](Self::close)); above it, refuses new
    /// requests and leaks the device with a debugger message.
    fn drop(&mut self) {
        // SAFETY: `shut_down` is SDK code; it reaches no token of the driver's (a token the
        // dropping code holds stays in its frame) and runs no driver code but the handler's
        // drop, which receives no token; its spin lock restores the IRQL.
        if unsafe { PassiveLevel::try_current_in_sdk(|irql| self.shut_down(irql, true)) }.is_none()
        {
            self.abandon();
        }
    }
}

impl<H: CommandHandler> fmt::Debug for ControlDevice<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlDevice").finish_non_exhaustive()
    }
}

// --- the device extension -----------------------------------------------------------------------

/// What the lock protects.
struct GateState {
    /// Handler calls in progress. `close` waits for zero.
    references: usize,
    /// Set once by `close` (or drop): no new requests are accepted.
    closed: bool,
}

/// The device extension. `header` comes first, for the dispatch routine.
#[repr(C)]
struct ControlExtension<H> {
    header: DeviceHeader,
    state: SpinLock<GateState>,
    /// Signalled when the device is closed and the last handler call ends.
    idle: UnsafeCell<ManuallyDrop<Event>>,
    /// Dropped by `shut_down` once no call can reach it.
    handler: UnsafeCell<ManuallyDrop<H>>,
    link: WideName,
}

impl<H: CommandHandler> ControlExtension<H> {
    /// Runs `f` with the lock held.
    fn locked<R>(&self, f: impl FnOnce(&mut GateState, &mut DispatchLevel<'_>) -> R) -> R {
        // Every path of this module runs at PASSIVE_LEVEL, or at DISPATCH_LEVEL in `abandon`,
        // and takes this lock alone, never nested.
        let mut token = callback_token();
        self.state.lock(&mut token, f)
    }

    fn idle(&self) -> &Event {
        // SAFETY: the event is dropped only in `shut_down`, after the last reference; every
        // other access is shared (`Event::set` and `Event::wait` take `&self`).
        unsafe { &*self.idle.get() }
    }

    fn handler(&self) -> &H {
        // SAFETY: the handler is dropped only in `shut_down`, after the last handler call and
        // with no `&ControlDevice` left to borrow it from; every other access is shared.
        unsafe { &*self.handler.get() }
    }

    fn is_closed(&self) -> bool {
        self.locked(|state, _| state.closed)
    }

    /// Takes a reference for a handler call; false if the device is closed.
    fn enter(&self) -> bool {
        self.locked(|state, _| {
            if state.closed {
                return false;
            }
            state.references += 1;
            true
        })
    }

    /// Drops a reference. After this the caller must not touch the extension.
    fn leave(&self) {
        self.locked(|state, irql| {
            state.references -= 1;
            if state.closed && state.references == 0 {
                // Under the lock: `shut_down` takes it once more after waking up, so it cannot
                // free the event before this call is done with it.
                self.idle().set(irql);
            }
        });
    }

    /// `IRP_MJ_DEVICE_CONTROL`: checks the request, runs the handler, completes the request.
    fn device_control(&self, request: Request) -> sys::NTSTATUS {
        let refuse = |request: Request, status: Status| {
            request.complete(status.raw(), 0);
            status.raw()
        };
        let Some(control) = request.device_control() else {
            return refuse(request, Status::INVALID_DEVICE_REQUEST);
        };
        let code = ControlCode::from_raw(control.code);
        if code.method() != sys::METHOD_BUFFERED {
            return refuse(request, Status::INVALID_DEVICE_REQUEST);
        }
        if control.input_len > MAX_INPUT {
            return refuse(request, Status::INVALID_BUFFER_SIZE);
        }
        if !self.enter() {
            return refuse(request, Status::DELETE_PENDING);
        }
        let mut request = request;
        let (status, information) =
            // SAFETY: a dispatch routine is a trampoline: the I/O manager calls it on the
            // requesting thread, where no driver code holds a token; the handler gets this one.
            unsafe {
                PassiveLevel::try_current_in_sdk(|irql| {
                    self.run(irql, &mut request, code, control.input_len)
                })
            }
                .unwrap_or_else(|| {
                    crate::kd_print!(
                        Error,
                        "wfp-rs: a command reached a ControlDevice at {}; its handler runs at \
                         PASSIVE_LEVEL only\n",
                        Irql::current()
                    );
                    (Status::INVALID_DEVICE_STATE.raw(), 0)
                });
        request.complete(status, information);
        self.leave();
        status
    }

    /// Copies the input out, calls the handler, and checks what it returned: the status and
    /// `Information` to complete the request with.
    fn run(
        &self,
        irql: &mut PassiveLevel<'_>,
        request: &mut Request,
        code: ControlCode,
        input_len: usize,
    ) -> (sys::NTSTATUS, usize) {
        let system_input = request.buffered_input();
        if system_input.len() != input_len {
            // An input length without a system buffer: nothing the I/O manager sends.
            return (Status::INVALID_PARAMETER.raw(), 0);
        }
        let Some(input) = PoolBytes::try_copy(system_input, PoolTag::SDK, irql) else {
            return (Status::INSUFFICIENT_RESOURCES.raw(), 0);
        };
        let output = request.buffered_output();
        output.fill(0);
        let limit = output.len();
        match self.handler().command(irql, code, &input, output) {
            Ok(written) if written <= limit => (SUCCESS, written),
            Ok(written) => {
                crate::kd_print!(
                    Error,
                    "wfp-rs: a command handler reported {written} bytes of output for a \
                     {limit}-byte buffer ({code:?}); the request fails with \
                     STATUS_INTERNAL_ERROR\n"
                );
                (Status::INTERNAL_ERROR.raw(), 0)
            }
            Err(status) if status.raw() < 0 => (status.raw(), 0),
            Err(status) => {
                crate::kd_print!(
                    Error,
                    "wfp-rs: a command handler failed with {status}, which is not an error or \
                     warning code ({code:?}); the request fails with STATUS_INTERNAL_ERROR\n"
                );
                (Status::INTERNAL_ERROR.raw(), 0)
            }
        }
    }
}

/// The dispatch handler of a control device.
///
/// # Safety
///
/// See [`crate::dispatch::Handler`]: `header` starts a `ControlExtension<H>`.
unsafe fn dispatch<H: CommandHandler>(
    _device: NonNull<sys::DEVICE_OBJECT>,
    header: NonNull<DeviceHeader>,
    request: Request,
) -> sys::NTSTATUS {
    // SAFETY: the header is the first field of the repr(C) `ControlExtension<H>` in this
    // device's extension (this handler was registered for that `H`), which lives while the
    // device does (the request's file object holds it).
    let extension = unsafe { header.cast::<ControlExtension<H>>().as_ref() };
    match request.major() {
        sys::IRP_MJ_CREATE => {
            let status = if extension.is_closed() {
                Status::DELETE_PENDING.raw()
            } else {
                SUCCESS
            };
            request.complete(status, 0);
            status
        }
        sys::IRP_MJ_CLEANUP | sys::IRP_MJ_CLOSE => {
            request.complete(SUCCESS, 0);
            SUCCESS
        }
        sys::IRP_MJ_DEVICE_CONTROL => extension.device_control(request),
        _ => {
            let status = Status::INVALID_DEVICE_REQUEST.raw();
            request.complete(status, 0);
            status
        }
    }
}
