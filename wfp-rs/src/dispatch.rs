//! The driver's dispatch routine: routes `IRP_MJ_CREATE`, `IRP_MJ_CLEANUP`, `IRP_MJ_CLOSE` and
//! `IRP_MJ_DEVICE_CONTROL` to the SDK device that receives them.
//!
//! Dispatch routines belong to the driver object (`DRIVER_OBJECT::MajorFunction`), not to a
//! device, so one routine serves every device of the driver. Each device the SDK creates with an
//! extension starts that extension with a [`DeviceHeader`]: a marker unique to this crate and
//! the handler for the device's requests. A device without one (the unnamed device every SDK
//! driver has, which user mode cannot open) gets the I/O manager's default answers: create and
//! every other request fail with `STATUS_INVALID_DEVICE_REQUEST`, cleanup and close succeed.
//!
//! Before an SDK device's handler sees an `IRP_MJ_CREATE`, the client check of
//! [`crate::client`] runs: a driver that restricted its clients
//! ([`Driver::admit_only`](crate::driver::Driver::admit_only)) refuses other processes here,
//! for every kind of SDK device.
//!
//! Devices that a driver creates itself with the raw `IoCreateDevice` must either have no
//! extension or install dispatch routines of their own.

use core::ptr::NonNull;

use crate::irql::PassiveLevel;
use crate::status::Status;
use crate::sys;

/// The major functions this module routes.
const ROUTED: [u8; 4] = [
    sys::IRP_MJ_CREATE,
    sys::IRP_MJ_CLOSE,
    sys::IRP_MJ_CLEANUP,
    sys::IRP_MJ_DEVICE_CONTROL,
];

/// Handles one request for a device whose extension starts with the [`DeviceHeader`] at
/// `header`. It owns `request` and must complete it (or queue it and return `STATUS_PENDING`).
///
/// # Safety
///
/// Called only by [`dispatch`], with the arguments the I/O manager passed and the device's own
/// header.
pub(crate) type Handler = unsafe fn(
    device: NonNull<sys::DEVICE_OBJECT>,
    header: NonNull<DeviceHeader>,
    request: Request,
) -> sys::NTSTATUS;

/// The start of the extension of every SDK device that handles requests.
#[repr(C)]
pub(crate) struct DeviceHeader {
    marker: *const u8,
    handler: Handler,
}

/// Any address unique to this crate identifies its device headers.
static MARKER: u8 = 0;

impl DeviceHeader {
    /// A header that routes the device's requests to `handler`.
    pub(crate) fn new(handler: Handler) -> DeviceHeader {
        DeviceHeader {
            marker: &raw const MARKER,
            handler,
        }
    }
}

/// Points the driver's create, cleanup, close and device-control entries at [`dispatch`]. The
/// SDK's `DriverEntry` glue calls this before the driver's entry function runs, so requests for
/// devices created there are routed from the start.
pub(crate) fn install(object: NonNull<sys::DRIVER_OBJECT>) {
    for major in ROUTED {
        // SAFETY: `object` is the driver's own object during DriverEntry (or while the driver is
        // loaded and before it created a device that could receive these requests); the table
        // has IRP_MJ_MAXIMUM_FUNCTION + 1 entries.
        unsafe { (*object.as_ptr()).MajorFunction[usize::from(major)] = Some(dispatch) };
    }
}

/// Installs [`dispatch`] where the driver left the entries empty, and fails with
/// `STATUS_INVALID_DEVICE_STATE` if the driver installed routines of its own there: its devices
/// would never see their requests.
pub(crate) fn ensure_installed(object: NonNull<sys::DRIVER_OBJECT>) -> Result<(), Status> {
    let ours = dispatch as *const () as usize;
    for major in ROUTED {
        // SAFETY: as in `install`; the entry is read by this thread only while no device of the
        // driver can receive this major function through the SDK yet.
        let entry = unsafe { (*object.as_ptr()).MajorFunction[usize::from(major)] };
        match entry {
            None => {}
            Some(routine) if routine as *const () as usize == ours => {}
            Some(_) => return Err(Status::INVALID_DEVICE_STATE),
        }
    }
    install(object);
    Ok(())
}

/// The `DRIVER_DISPATCH` routine of SDK drivers for the routed major functions. Called at
/// `PASSIVE_LEVEL` (the I/O manager calls the dispatch routines of the highest-level driver in
/// the requesting thread).
unsafe extern "system" fn dispatch(
    device: *mut sys::DEVICE_OBJECT,
    irp: *mut sys::IRP,
) -> sys::NTSTATUS {
    let (Some(device), Some(irp)) = (NonNull::new(device), NonNull::new(irp)) else {
        return Status::INVALID_PARAMETER.raw();
    };
    // SAFETY: the I/O manager hands the IRP to this dispatch routine, which now owns it.
    let request = unsafe { Request::from_raw(irp) };
    // SAFETY: the device object is valid for the call; its extension is null or the block
    // IoCreateDevice allocated with it.
    let extension = unsafe { (*device.as_ptr()).DeviceExtension };
    let header = NonNull::new(extension.cast::<DeviceHeader>())
        // SAFETY: every SDK device with an extension starts it with a `DeviceHeader`; devices
        // the driver creates itself have none or their own dispatch routines (module docs).
        .filter(|header| unsafe { header.as_ref() }.marker == &raw const MARKER);
    match header {
        Some(header) => {
            if request.major() == sys::IRP_MJ_CREATE
                && let Err(status) = admit(device)
            {
                request.complete(status.raw(), 0);
                return status.raw();
            }
            // SAFETY: checked above: an SDK header, alive with the device.
            let handler = unsafe { header.as_ref() }.handler;
            // SAFETY: the header belongs to this device, which the handler was written for.
            unsafe { handler(device, header, request) }
        }
        None => default_dispatch(request),
    }
}

/// The client check of [`crate::client`] for an `IRP_MJ_CREATE`: it runs in the thread of the
/// process that opens the device (the I/O manager calls the create dispatch routine of the
/// highest-level driver there), at `PASSIVE_LEVEL`. A create that arrives at a higher IRQL (no
/// user-mode open does) is refused when the driver restricted its clients.
fn admit(device: NonNull<sys::DEVICE_OBJECT>) -> Result<(), Status> {
    // SAFETY: the device object is valid for the call.
    let object = unsafe { (*device.as_ptr()).DriverObject };
    // SAFETY: SDK code that uses the token only for the check's kernel calls.
    let admitted =
        unsafe { PassiveLevel::try_current_in_sdk(|irql| crate::client::admit(object, irql)) };
    admitted.unwrap_or_else(|| {
        crate::driver::with_admitted_client(object, |identity| match identity {
            Some(_) => Err(Status::ACCESS_DENIED),
            None => Ok(()),
        })
    })
}

/// What the I/O manager answers for a device that handles nothing.
fn default_dispatch(request: Request) -> sys::NTSTATUS {
    let status = match request.major() {
        sys::IRP_MJ_CLEANUP | sys::IRP_MJ_CLOSE => 0,
        _ => Status::INVALID_DEVICE_REQUEST.raw(),
    };
    request.complete(status, 0);
    status
}

/// The parameters of an `IRP_MJ_DEVICE_CONTROL` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceControl {
    pub(crate) code: u32,
    pub(crate) input_len: usize,
    pub(crate) output_len: usize,
}

/// An IRP owned by the code holding this value: between the dispatch routine (or a queue's
/// removal routine) that got it and the `IofCompleteRequest` that gives it back. Not `Clone`:
/// an IRP is completed once.
#[derive(Debug)]
pub(crate) struct Request(NonNull<sys::IRP>);

impl Request {
    /// Takes ownership of an IRP.
    ///
    /// # Safety
    ///
    /// The caller owns the IRP (it was passed to a dispatch routine or removed from a queue) and
    /// hands that ownership to the returned value.
    pub(crate) unsafe fn from_raw(irp: NonNull<sys::IRP>) -> Request {
        Request(irp)
    }

    /// Gives up ownership without completing the IRP (it was queued).
    pub(crate) fn into_raw(self) -> NonNull<sys::IRP> {
        self.0
    }

    fn stack(&self) -> &sys::IO_STACK_LOCATION {
        // SAFETY: this value owns the IRP.
        let stack = unsafe { sys::IoGetCurrentIrpStackLocation(self.0.as_ptr()) };
        // SAFETY: the current stack location stays valid (and is not written by anyone else)
        // until the IRP is completed, which consumes `self`.
        unsafe { &*stack }
    }

    /// The major function (`IRP_MJ_*`).
    pub(crate) fn major(&self) -> u8 {
        self.stack().MajorFunction
    }

    /// The file object (the handle) the request came through.
    pub(crate) fn file_object(&self) -> *mut sys::FILE_OBJECT {
        self.stack().FileObject
    }

    /// The parameters of a device-control request; `None` for other major functions.
    pub(crate) fn device_control(&self) -> Option<DeviceControl> {
        let stack = self.stack();
        if stack.MajorFunction != sys::IRP_MJ_DEVICE_CONTROL {
            return None;
        }
        // SAFETY: for IRP_MJ_DEVICE_CONTROL the I/O manager fills the DeviceIoControl arm.
        let parameters = unsafe { stack.Parameters.DeviceIoControl };
        Some(DeviceControl {
            code: parameters.IoControlCode,
            input_len: parameters.InputBufferLength as usize,
            output_len: parameters.OutputBufferLength as usize,
        })
    }

    /// The output buffer of a `METHOD_BUFFERED` device-control request: the system buffer, as
    /// long as `OutputBufferLength`. Empty for other requests, or when there is no output buffer.
    pub(crate) fn buffered_output(&mut self) -> &mut [u8] {
        let Some(control) = self.device_control() else {
            return &mut [];
        };
        if control.code & 3 != sys::METHOD_BUFFERED || control.output_len == 0 {
            return &mut [];
        }
        // SAFETY: this value owns the IRP.
        let irp = unsafe { self.0.as_ref() };
        // SAFETY: the I/O manager fills `SystemBuffer` for buffered requests.
        let buffer = unsafe { irp.AssociatedIrp.SystemBuffer }.cast::<u8>();
        if buffer.is_null() {
            return &mut [];
        }
        // SAFETY: for METHOD_BUFFERED the system buffer holds max(input, output) bytes, so at
        // least `output_len`; it belongs to the IRP, which this value owns (hence `&mut self`),
        // until completion.
        unsafe { core::slice::from_raw_parts_mut(buffer, control.output_len) }
    }

    /// The input buffer of a `METHOD_BUFFERED` device-control request: the system buffer, as
    /// long as `InputBufferLength`. Empty for other requests, or when there is no input buffer.
    /// It is the same memory as [`buffered_output`](Self::buffered_output): copy what is needed
    /// before writing output.
    pub(crate) fn buffered_input(&self) -> &[u8] {
        let Some(control) = self.device_control() else {
            return &[];
        };
        if control.code & 3 != sys::METHOD_BUFFERED || control.input_len == 0 {
            return &[];
        }
        // SAFETY: this value owns the IRP.
        let irp = unsafe { self.0.as_ref() };
        // SAFETY: the I/O manager fills `SystemBuffer` for buffered requests.
        let buffer = unsafe { irp.AssociatedIrp.SystemBuffer }.cast::<u8>();
        if buffer.is_null() {
            return &[];
        }
        // SAFETY: for METHOD_BUFFERED the system buffer holds max(input, output) bytes, the
        // input copied in first, so at least `input_len`; it belongs to the IRP, which this value
        // owns, until completion, and `&self` keeps `buffered_output` from writing meanwhile.
        unsafe { core::slice::from_raw_parts(buffer, control.input_len) }
    }

    /// Whether `IoMarkIrpPending` was called for the current stack location: the dispatch
    /// routine must then return `STATUS_PENDING`, even if it completes the IRP itself.
    pub(crate) fn is_marked_pending(&self) -> bool {
        self.stack().Control & sys::SL_PENDING_RETURNED != 0
    }

    /// Sets the final status and completes the IRP (`IofCompleteRequest`). Callers run at IRQL
    /// <= DISPATCH_LEVEL, as every path of this crate that owns an IRP does.
    pub(crate) fn complete(self, status: sys::NTSTATUS, information: usize) {
        let irp = self.0.as_ptr();
        // SAFETY: this value owns the IRP; its status block is the driver's to fill before
        // completion.
        unsafe { (*irp).IoStatus.Anonymous = sys::IO_STATUS_BLOCK_0 { Status: status } };
        // SAFETY: as above.
        unsafe { (*irp).IoStatus.Information = information };
        // SAFETY: the IRP is owned here and completed exactly once (`self` is consumed); no
        // cancel routine is set (the cancel-safe queue clears it on removal).
        unsafe { sys::IofCompleteRequest(irp, sys::IO_NO_INCREMENT) };
    }
}
