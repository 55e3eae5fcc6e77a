//! The I/O manager's request side: IRPs, file objects, the cancel spin lock, cancel-safe queues,
//! symbolic links and device security, plus the user-mode side the harness drives (open a
//! device by name, send `DeviceIoControl` requests that stay pending, cancel them, close the
//! handle).
//!
//! What it checks, as Windows with Driver Verifier's I/O verification does:
//!
//! | the driver | stop |
//! |---|---|
//! | completes an IRP twice, or completes something that is not an IRP | `MULTIPLE_IRP_COMPLETE_REQUESTS` (0x44), parameter 1 = the IRP |
//! | completes an IRP with its cancel routine still set | `DRIVER_VERIFIER_IOMANAGER_VIOLATION` (0xC9), 0x07 |
//! | completes an IRP with `STATUS_PENDING` | 0xC9, 0x06 |
//! | completes an IRP above `DISPATCH_LEVEL` | 0xC9, 0x0E |
//! | returns from a dispatch routine at another IRQL | 0xC9, 0x05 |
//! | returns `STATUS_PENDING` without `IoMarkIrpPending` | 0xC9, 0x23D |
//! | marks the IRP pending and returns something else | 0xC9, 0x23E |
//! | returns neither `STATUS_PENDING` nor the status it completed the IRP with | 0xC9, 0x224 / 0x226 |
//! | completes an I/O control request with more output than the caller's buffer holds | 0xC9, 0x200 (the simulator's choice: Windows copies past the buffer) |
//! | unloads with IRPs still pending | `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (0xCE), parameter 1 = the IRP |
//!
//! Where the simulator differs from Windows, and says so:
//!
//! - Windows does not call `DriverUnload` while handles to the driver's devices are open; the
//!   harness may unload anyway. Handles still open are then orphaned: requests on them fail with
//!   `STATUS_DELETE_PENDING` and closing them calls nothing.
//! - `IoDeleteDevice` frees the device object at once, even with handles open (Windows keeps it
//!   until they close and still sends their requests to the driver). Requests on such handles
//!   fail with `STATUS_DELETE_PENDING` without reaching the driver. Do not delete a device while
//!   another thread sends requests to it.
//! - `IoCsqInsertIrpEx` marks the IRP pending whether or not the queue takes it (as the
//!   reference implementations do; Microsoft documents only the success case), so a dispatch
//!   routine must return `STATUS_PENDING` after calling it.
//! - Only `METHOD_BUFFERED` and `METHOD_NEITHER` I/O control codes are simulated (direct I/O,
//!   which needs MDLs, completes with `STATUS_NOT_IMPLEMENTED` without reaching the driver). For
//!   `METHOD_NEITHER` the "user-mode" buffers are host memory the driver may read and write
//!   without faulting, where Windows would need `ProbeForRead` under `__try`. `ObOpenObjectByPointer` opens
//!   device objects only, in kernel mode; `ZwSetSecurityObject` sets DACLs only, and the access
//!   check evaluates allow and deny ACEs (others are ignored).
//! - Completed IRPs stay allocated until the machine is dropped, so a driver touching one after
//!   completion is caught by the completion checks instead of corrupting host memory.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use std::collections::VecDeque;

use rustc_hash::{FxHashMap, FxHashSet};

use super::bugcheck::stop;
use super::io::read_unicode;
use super::process::Process;
use super::state::{Kernel, current, irql, level_name, require_irql, with_context};
use wfp_rs::bugcheck::{BugCheckCode, iomanager};
use wfp_rs::status::Status;
use wfp_rs::sys::*;

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_ACCESS_VIOLATION: NTSTATUS = 0xC000_0005u32 as i32;
const STATUS_UNKNOWN_REVISION: NTSTATUS = 0xC000_0058u32 as i32;

/// The size of a file object on x64 (`FILE_OBJECT` is opaque to this crate; the simulator
/// allocates the real size so a driver that pokes at it touches memory it may touch).
const FILE_OBJECT_SIZE: usize = 0xD8;

/// An IRP with its one stack location right after it, as the I/O manager allocates them.
#[repr(C)]
struct IrpBlock {
    irp: IRP,
    stack: IO_STACK_LOCATION,
}

#[repr(C, align(16))]
struct FileBlock([u8; FILE_OBJECT_SIZE]);

/// Who opens a device: the token of the user-mode process that calls `CreateFile`, for the
/// device's access check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// LocalSystem (a service running as SYSTEM): S-1-5-18, and member of Administrators.
    System,
    /// An elevated administrator: member of BUILTIN\Administrators.
    Administrator,
    /// A standard user (or an administrator without elevation).
    User,
}

/// How a completed request ended, as user mode sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoCompletion {
    /// The final `NTSTATUS` (`GetLastError` maps it to a Win32 error).
    pub status: NTSTATUS,
    /// `IoStatus.Information`: for `DeviceIoControl`, the bytes returned.
    pub information: usize,
    /// The output buffer's contents the I/O manager copied back (the first `information` bytes,
    /// for a request that did not fail).
    pub output: Vec<u8>,
}

impl IoCompletion {
    /// `Ok(output)` for a success or warning status, the status as an error otherwise.
    pub fn ok(&self) -> Result<&[u8], Status> {
        if nt_error(self.status) {
            Err(Status::from_raw(self.status))
        } else {
            Ok(&self.output)
        }
    }
}

#[derive(Clone, Debug)]
enum Phase {
    /// Sent, not yet handed to the driver: the I/O manager still checks the device.
    Sending,
    /// In the driver's dispatch routine.
    Dispatching,
    /// The dispatch routine returned `STATUS_PENDING` and the IRP is not completed yet.
    Pending,
    Completed(Completion),
}

#[derive(Clone, Debug)]
struct Completion {
    result: IoCompletion,
    pending_returned: bool,
}

struct IrpRecord {
    block: *mut IrpBlock,
    /// The system buffer of a buffered request, or the caller's input and output buffers (one
    /// block, input first) of a `METHOD_NEITHER` request: address and length.
    buffer: Option<(*mut u8, usize)>,
    /// Where in `buffer` the output starts: 0 for a buffered request (input and output share
    /// the system buffer), the input's length for `METHOD_NEITHER`.
    output_at: usize,
    driver: usize,
    device: usize,
    file: usize,
    major: u8,
    output_len: usize,
    phase: Phase,
    /// Whoever sent the request no longer asks how it ended (its [`IoRequest`] was dropped, or
    /// the I/O manager read the result of its own create, cleanup or close): the record goes
    /// when the request completes.
    released: bool,
    /// The order requests were sent in, on this machine (addresses are the host's).
    serial: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilePhase {
    /// `IRP_MJ_CREATE` is being processed.
    Opening,
    Open,
    /// `IRP_MJ_CLEANUP` was sent; `IRP_MJ_CLOSE` waits until its IRPs are completed.
    CleanedUp,
    Closed,
    /// The driver unloaded with the handle open.
    Orphaned,
}

struct FileRecord {
    /// The process that opened the handle: the driver's dispatch routines for it run there.
    process: Arc<Process>,
    block: *mut FileBlock,
    device: usize,
    device_serial: u64,
    driver: usize,
    phase: FilePhase,
}

struct LinkRecord {
    name: String,
    target: String,
}

#[derive(Clone, Debug)]
struct Ace {
    allow: bool,
    mask: u32,
    sid: Vec<u8>,
}

struct DeviceSecurity {
    serial: u64,
    /// `None`: a NULL DACL, which grants everything.
    dacl: Option<Vec<Ace>>,
}

struct KernelHandle {
    object: usize,
    serial: u64,
    granted: u32,
}

#[derive(Default)]
struct IoState {
    irps: FxHashMap<usize, IrpRecord>,
    /// The next request's [`IrpRecord::serial`].
    next_irp_serial: u64,
    files: FxHashMap<usize, FileRecord>,
    /// By lower-case name (`\??\name`).
    links: FxHashMap<String, LinkRecord>,
    /// By device object address.
    security: FxHashMap<usize, DeviceSecurity>,
    handles: FxHashMap<usize, KernelHandle>,
    next_handle: usize,
    /// How many files are [`FilePhase::CleanedUp`]: while none is, a request's end has no close
    /// to send, without a look at every file.
    cleaned_up: usize,
    /// The buffers and IRP blocks of completed requests, oldest first, and their bytes: see
    /// [`QUARANTINE`].
    retired: VecDeque<Retired>,
    retired_bytes: usize,
    /// The addresses of the IRP blocks in `retired`: completing one of them again is a double
    /// completion, not a completion of something that never was an IRP.
    retired_irps: FxHashSet<usize>,
    /// Calls the I/O manager is making into each driver now, by driver: dispatch routines, from
    /// the request's hand-over to the routine's return (whether or not it completed its request
    /// before returning), and cancel routines (`CancelIoEx` from user mode). An unload waits for
    /// them ([`wait_for_dispatch_calls`]).
    calls_in_driver: FxHashMap<usize, usize>,
}

/// What the quarantine holds.
enum Retired {
    /// A request's buffer: a boxed slice, address and length.
    Buffer(*mut u8, usize),
    /// A completed request's IRP, whose record is gone.
    Irp(*mut IrpBlock),
}

/// How many bytes of completed requests' buffers and IRPs the simulator keeps allocated. Windows
/// frees a buffered request's system buffer when the request completes, and the IRP once its
/// result is copied back; a driver that touches either after completing the request uses freed
/// memory. The simulator keeps the most recent ones allocated (a quarantine, as memory sanitizers
/// do) so such a driver reads memory the test process still owns instead of corrupting it, and
/// frees the oldest past this bound, so the memory a machine holds does not grow with every
/// request (a question channel's wait requests are 64 KiB each).
const QUARANTINE: usize = 16 << 20;

/// The simulated I/O manager's request state; one per machine (`Kernel::irp`). Lock order: the
/// machine's state lock, then this one; never the other way round, and never held while driver
/// code runs.
pub(crate) struct IoManager {
    state: Mutex<IoState>,
    /// Signalled when an IRP completes: the one for the IRP's stripe ([`IoManager::completed`]),
    /// so that a completion wakes the threads waiting for that request (and the few sharing its
    /// stripe), not every thread waiting for any request — on Windows each overlapped request
    /// signals its own event.
    changed: [Condvar; COMPLETION_STRIPES],
    /// A harness thread waiting for a request's completion (`IoRequest::wait`), as a spinning
    /// wait sees it.
    pub(crate) waits: super::spin::WaitSite,
    /// The system cancel spin lock (`IoAcquireCancelSpinLock`), a `KSPIN_LOCK`.
    cancel_lock: AtomicUsize,
    /// Signalled when a dispatch or cancel routine returns (`IoState::calls_in_driver` went
    /// down).
    call_returned: Condvar,
}

// SAFETY: the raw pointers in the records point to blocks this manager allocated and frees only
// in its destructor; they are used with the state lock held or handed to driver code, as the
// kernel hands IRPs to drivers.
unsafe impl Send for IoManager {}
// SAFETY: as above; all mutable state is behind the mutex or atomic.
unsafe impl Sync for IoManager {}

/// How many condition variables the I/O manager spreads its requests' waiters over
/// (`1 << COMPLETION_STRIPE_BITS`): enough that the requests a busy service keeps pending (64 in
/// benchmark (c)) rarely share one, so a completion wakes about one thread.
const COMPLETION_STRIPE_BITS: u32 = 10;
const COMPLETION_STRIPES: usize = 1 << COMPLETION_STRIPE_BITS;

impl IoManager {
    /// The condition variable signalled when `irp` completes (waited on with the state lock).
    fn completed(&self, irp: usize) -> &Condvar {
        // IRP blocks are heap addresses: drop the alignment bits, mix, take a stripe.
        let mixed = ((irp >> 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.changed[(mixed >> (64 - COMPLETION_STRIPE_BITS)) as usize]
    }
}

impl Default for IoManager {
    fn default() -> Self {
        IoManager {
            state: Mutex::new(IoState {
                next_handle: 1,
                ..IoState::default()
            }),
            changed: std::array::from_fn(|_| Condvar::new()),
            waits: super::spin::WaitSite::default(),
            cancel_lock: AtomicUsize::new(0),
            call_returned: Condvar::new(),
        }
    }
}

impl Drop for IoManager {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, record) in state.irps.drain() {
            // SAFETY: allocated with Box::into_raw in `new_irp`, freed once, here, when no thread
            // uses the machine any more.
            drop(unsafe { Box::from_raw(record.block) });
            if let Some((ptr, len)) = record.buffer {
                // SAFETY: as above, a boxed slice of `len` bytes.
                drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(ptr, len)) });
            }
        }
        for (_, file) in state.files.drain() {
            // SAFETY: allocated with Box::into_raw in `open`, freed once, here.
            drop(unsafe { Box::from_raw(file.block) });
        }
        while state.free_oldest_retired() {}
    }
}

impl IoState {
    /// Keeps a completed request's buffer in the quarantine, freeing the oldest past
    /// [`QUARANTINE`] bytes.
    fn retire(&mut self, (ptr, len): (*mut u8, usize)) {
        self.retired.push_back(Retired::Buffer(ptr, len));
        self.retired_bytes += len;
        while self.retired_bytes > QUARANTINE && self.free_oldest_retired() {}
    }

    /// Forgets the record of `irp` if it is completed and its sender no longer asks how it
    /// ended, and puts its IRP in the quarantine; a pending one is forgotten when it completes.
    fn release(&mut self, irp: usize) {
        let Some(record) = self.irps.get_mut(&irp) else {
            return;
        };
        record.released = true;
        self.forget_if_done(irp);
    }

    /// The second half of [`release`](Self::release), also called when a request completes.
    fn forget_if_done(&mut self, irp: usize) {
        let done = self
            .irps
            .get(&irp)
            .is_some_and(|r| r.released && matches!(r.phase, Phase::Completed(_)));
        if !done {
            return;
        }
        let Some(record) = self.irps.remove(&irp) else {
            return;
        };
        if let Some(buffer) = record.buffer {
            self.retire(buffer);
        }
        self.retired.push_back(Retired::Irp(record.block));
        self.retired_irps.insert(irp);
        self.retired_bytes += core::mem::size_of::<IrpBlock>();
        while self.retired_bytes > QUARANTINE && self.free_oldest_retired() {}
    }

    /// Frees the oldest entry of the quarantine; `false` if it is empty.
    fn free_oldest_retired(&mut self) -> bool {
        match self.retired.pop_front() {
            None => false,
            Some(Retired::Buffer(ptr, len)) => {
                self.retired_bytes -= len;
                // SAFETY: a boxed slice of `len` bytes from `new_irp`, taken out of its record
                // when the request completed (so no record frees it again), and popped here once.
                drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(ptr, len)) });
                true
            }
            Some(Retired::Irp(block)) => {
                self.retired_bytes -= core::mem::size_of::<IrpBlock>();
                self.retired_irps.remove(&(block as usize));
                // SAFETY: allocated with Box::into_raw in `new_irp`; its record was removed when
                // it went to the quarantine (so nothing else frees it), and it is popped once.
                drop(unsafe { Box::from_raw(block) });
                true
            }
        }
    }
}

fn io(kernel: &Kernel) -> MutexGuard<'_, IoState> {
    kernel
        .irp
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn nt_error(status: NTSTATUS) -> bool {
    (status as u32) >> 30 == 3
}

fn nt_success(status: NTSTATUS) -> bool {
    status >= 0
}

// --- device identity ----------------------------------------------------------------------------

/// Device objects are freed by `IoDeleteDevice` and their addresses reused; a serial number
/// stamped into kernel-owned bytes of the object tells a new device from an old one.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);
/// Where the serial lives in `DEVICE_OBJECT::KernelOwned` (offset 0x50 of the object).
const SERIAL_AT: usize = 3;

/// The serial of a live device (stamped on first use). Call with the machine's state lock held
/// and `device` in its device table.
fn serial_of(device: usize) -> u64 {
    let object = device as *mut DEVICE_OBJECT;
    // SAFETY: the caller holds the state lock and the device is in the table, so the object is
    // alive and no one else writes its kernel-owned bytes.
    let owned = unsafe { &mut (*object).KernelOwned };
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&owned[SERIAL_AT..SERIAL_AT + 8]);
    let serial = u64::from_le_bytes(bytes);
    if serial != 0 {
        return serial;
    }
    let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
    owned[SERIAL_AT..SERIAL_AT + 8].copy_from_slice(&serial.to_le_bytes());
    serial
}

/// Whether `device` is still the device with `serial`.
fn device_alive(kernel: &Kernel, device: usize, serial: u64) -> bool {
    let state = kernel.lock();
    state.devices.contains_key(&device) && serial_of(device) == serial
}

// --- IRPs ---------------------------------------------------------------------------------------

struct NewIrp<'input> {
    driver: usize,
    device: usize,
    file: usize,
    major: u8,
    /// The control code, the caller's input (copied into the IRP's own buffer, never handed to
    /// the driver) and the output length.
    control: Option<(u32, &'input [u8], usize)>,
}

/// Allocates an IRP with one stack location and records it; returns its address.
fn new_irp(kernel: &Kernel, request: NewIrp<'_>) -> usize {
    let mut system_buffer: PVOID = core::ptr::null_mut();
    let mut user_buffer: PVOID = core::ptr::null_mut();
    let (buffer, output_at, parameters, output_len) = match request.control {
        Some((code, input, output_len)) => {
            let neither = code & 3 == METHOD_NEITHER;
            // Buffered: one system buffer, max(input, output) bytes, the input copied in.
            // Neither: the caller's own buffers, input then output, passed as they are.
            let len = if neither {
                input.len() + output_len
            } else {
                input.len().max(output_len)
            };
            let buffer = (len > 0).then(|| {
                // The input copied in, the rest zeroed: one allocation, each byte written once.
                let mut bytes = Vec::with_capacity(len);
                bytes.extend_from_slice(input);
                bytes.resize(len, 0u8);
                (Box::into_raw(bytes.into_boxed_slice()).cast::<u8>(), len)
            });
            let base = buffer.map_or(core::ptr::null_mut(), |(ptr, _)| ptr);
            let mut type3_input: PVOID = core::ptr::null_mut();
            let output_at = if neither {
                if !input.is_empty() {
                    type3_input = base.cast();
                }
                if output_len > 0 {
                    user_buffer = base.wrapping_add(input.len()).cast();
                }
                input.len()
            } else {
                system_buffer = base.cast();
                0
            };
            let parameters = IO_STACK_LOCATION_PARAMETERS {
                DeviceIoControl: IO_STACK_LOCATION_DEVICE_IO_CONTROL::new(
                    output_len as u32,
                    input.len() as u32,
                    code,
                    type3_input,
                ),
            };
            (buffer, output_at, parameters, output_len)
        }
        None => (
            None,
            0,
            IO_STACK_LOCATION_PARAMETERS {
                Others: [core::ptr::null_mut(); 4],
            },
            0,
        ),
    };
    // SAFETY: IRP and IO_STACK_LOCATION are plain data (integers, raw and optional function
    // pointers, unions of those), valid when zeroed.
    let mut block: Box<IrpBlock> = unsafe { Box::new_zeroed().assume_init() };
    block.stack.MajorFunction = request.major;
    block.stack.Parameters = parameters;
    block.stack.DeviceObject = request.device as *mut DEVICE_OBJECT;
    block.stack.FileObject = request.file as *mut FILE_OBJECT;
    let block = Box::into_raw(block);
    // SAFETY: freshly allocated and not shared yet.
    let irp = unsafe { &mut (*block).irp };
    irp.Type = IO_TYPE_IRP;
    irp.Size = core::mem::size_of::<IrpBlock>() as u16;
    irp.StackCount = 1;
    irp.CurrentLocation = 1;
    irp.RequestorMode = UserMode;
    irp.AssociatedIrp = IRP_ASSOCIATED_IRP {
        SystemBuffer: system_buffer,
    };
    irp.UserBuffer = user_buffer;
    irp.Tail = IRP_TAIL {
        Overlay: IRP_TAIL_OVERLAY {
            DriverContext: [core::ptr::null_mut(); 4],
            Thread: core::ptr::null_mut(),
            AuxiliaryBuffer: core::ptr::null_mut(),
            ListEntry: LIST_ENTRY {
                Flink: core::ptr::null_mut(),
                Blink: core::ptr::null_mut(),
            },
            // SAFETY: the stack location is inside the same allocation.
            CurrentStackLocation: unsafe { &raw mut (*block).stack },
            OriginalFileObject: request.file as *mut FILE_OBJECT,
        },
    };
    let address = block as usize;
    let mut state = io(kernel);
    state.next_irp_serial += 1;
    let serial = state.next_irp_serial;
    state.irps.insert(
        address,
        IrpRecord {
            block,
            buffer,
            output_at,
            driver: request.driver,
            device: request.device,
            file: request.file,
            major: request.major,
            output_len,
            phase: Phase::Sending,
            released: false,
            serial,
        },
    );
    address
}

/// Records an IRP as completed by the I/O manager itself (no driver involved). Its buffer goes
/// to the quarantine, as a driver-completed request's does.
fn complete_internally(kernel: &Kernel, irp: usize, status: NTSTATUS) {
    let mut state = io(kernel);
    let buffer = state.irps.get_mut(&irp).and_then(|record| {
        record.phase = Phase::Completed(Completion {
            result: IoCompletion {
                status,
                information: 0,
                output: Vec::new(),
            },
            pending_returned: false,
        });
        record.buffer.take()
    });
    if let Some(buffer) = buffer {
        state.retire(buffer);
    }
    state.forget_if_done(irp);
    drop(state);
    kernel.irp.waits.completed();
    kernel.irp.completed(irp).notify_all();
}

fn stack_control(block: *mut IrpBlock) -> u8 {
    // SAFETY: IRP blocks stay allocated until the machine is dropped; the control byte is only
    // written by the dispatch routine before it returns, and read here after.
    unsafe { (*block).stack.Control }
}

/// Sends `irp` to its driver's dispatch routine at `PASSIVE_LEVEL`, as `IoCallDriver` from the
/// requesting thread (in the process that opened the handle), and applies the verifier's checks
/// to what the routine did. Returns what the dispatch routine returned.
fn call_driver(kernel: &Arc<Kernel>, irp: usize) -> NTSTATUS {
    let (block, device, driver, major, process) = {
        let state = io(kernel);
        let record = &state.irps[&irp];
        let process = state
            .files
            .get(&record.file)
            .map(|file| Arc::clone(&file.process));
        (
            record.block,
            record.device,
            record.driver,
            record.major,
            process,
        )
    };
    match process {
        Some(process) => super::process::with_process(&process, || {
            dispatch_irp(kernel, irp, block, device, driver, major)
        }),
        None => dispatch_irp(kernel, irp, block, device, driver, major),
    }
}

fn dispatch_irp(
    kernel: &Arc<Kernel>,
    irp: usize,
    block: *mut IrpBlock,
    device: usize,
    driver: usize,
    major: u8,
) -> NTSTATUS {
    // The device is looked up again, under the same locks as the request is marked as in the
    // driver: a device its driver deleted meanwhile (unloading) gets no more requests, and an
    // unload waits for those it got (`wait_for_dispatch_calls`).
    let routine = {
        let state = kernel.lock();
        let mut requests = io(kernel);
        let serial = requests
            .irps
            .get(&irp)
            .and_then(|record| requests.files.get(&record.file))
            .map(|file| file.device_serial);
        let alive = state.devices.contains_key(&device)
            && serial.is_none_or(|serial| serial_of(device) == serial);
        if !alive {
            drop((requests, state));
            let status = Status::DELETE_PENDING.raw();
            complete_internally(kernel, irp, status);
            return status;
        }
        let routine = state
            .drivers
            .get(&driver)
            .and_then(|record| record.object.MajorFunction[usize::from(major)]);
        if routine.is_some()
            && let Some(record) = requests.irps.get_mut(&irp)
        {
            record.phase = Phase::Dispatching;
            requests.call_started(driver);
        }
        routine
    };
    let Some(routine) = routine else {
        // The I/O manager's IopInvalidDeviceRequest.
        let status = Status::INVALID_DEVICE_REQUEST.raw();
        complete_internally(kernel, irp, status);
        return status;
    };
    let returned = with_context(kernel, PASSIVE_LEVEL, driver, || {
        let before = irql();
        let dispatch = super::state::Routine::new(
            super::state::RoutineKind::Dispatch,
            driver,
            usize::from(major),
        );
        let returned = super::state::with_routine(dispatch, || {
            // SAFETY: the driver installed this routine for the major function; the device is
            // its own and alive (checked by the callers), and the IRP is a fresh packet it now
            // owns.
            unsafe { routine(device as *mut DEVICE_OBJECT, block.cast::<IRP>()) }
        });
        let after = irql();
        if after != before {
            stop(
                BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
                [
                    iomanager::IRQL_CHANGED_BY_DISPATCH,
                    device,
                    before as usize,
                    after as usize,
                ],
                &format!(
                    "a dispatch routine returned at IRQL {after} ({}); it was called at {before} ({})",
                    level_name(after),
                    level_name(before)
                ),
            );
        }
        check_dispatch_result(kernel, irp, block, routine as usize, returned);
        returned
    });
    call_returned(kernel, driver);
    returned
}

impl IoState {
    /// A dispatch or cancel routine of `driver` is about to run; [`call_returned`] when it
    /// returns.
    fn call_started(&mut self, driver: usize) {
        *self.calls_in_driver.entry(driver).or_default() += 1;
    }
}

/// A dispatch or cancel routine of `driver` returned ([`IoState::call_started`]).
fn call_returned(kernel: &Kernel, driver: usize) {
    {
        let mut requests = io(kernel);
        if let Some(calls) = requests.calls_in_driver.get_mut(&driver) {
            *calls -= 1;
            if *calls == 0 {
                requests.calls_in_driver.remove(&driver);
            }
        }
    }
    kernel.irp.call_returned.notify_all();
}

fn check_dispatch_result(
    kernel: &Kernel,
    irp: usize,
    block: *mut IrpBlock,
    routine: usize,
    returned: NTSTATUS,
) {
    let mut state = io(kernel);
    let record = state.irps.get_mut(&irp).expect("IRPs are never forgotten");
    // (pending returned, status) of a completion in the dispatch routine: all the checks need
    // of it (not a copy of its output).
    let completed = match &record.phase {
        Phase::Completed(completion) => {
            Some((completion.pending_returned, completion.result.status))
        }
        _ => None,
    };
    let marked = completed.map_or(
        stack_control(block) & SL_PENDING_RETURNED != 0,
        |(pending_returned, _)| pending_returned,
    );
    if returned == STATUS_PENDING {
        if !marked {
            drop(state);
            stop(
                BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
                [
                    iomanager::PENDING_NOT_MARKED,
                    routine,
                    irp,
                    returned as usize,
                ],
                "a dispatch routine returned STATUS_PENDING without calling IoMarkIrpPending",
            );
        }
        if completed.is_none() {
            record.phase = Phase::Pending;
        }
        return;
    }
    let Some((_, completed_with)) = completed else {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [iomanager::NOT_COMPLETED_NOR_PENDING, routine, irp, 0],
            &format!(
                "a dispatch routine returned {returned:#010X} without completing the IRP and \
                 without returning STATUS_PENDING"
            ),
        );
    };
    if marked {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [
                iomanager::MARKED_PENDING_NOT_RETURNED,
                routine,
                irp,
                returned as usize,
            ],
            &format!(
                "a dispatch routine marked the IRP pending but returned {returned:#010X}, not \
                 STATUS_PENDING"
            ),
        );
    }
    if completed_with != returned {
        let expected = completed_with;
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [iomanager::STATUS_MISMATCH, routine, irp, expected as usize],
            &format!(
                "a dispatch routine completed the IRP with {expected:#010X} but returned \
                 {returned:#010X}"
            ),
        );
    }
}

/// `IofCompleteRequest` (`IoCompleteRequest`). Copies the output of a buffered request back to
/// "user mode" and wakes whoever waits for it.
///
/// # Safety
///
/// `Irp` must be an IRP the caller owns; the simulator checks that before touching it.
pub unsafe extern "system" fn IofCompleteRequest(Irp: *mut IRP, PriorityBoost: i8) {
    let _kernel = super::state::KernelCode::enter();
    let _ = PriorityBoost;
    let now = irql();
    let address = Irp as usize;
    if now > DISPATCH_LEVEL {
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [
                iomanager::COMPLETED_ABOVE_DISPATCH,
                now as usize,
                address,
                0,
            ],
            &format!(
                "IoCompleteRequest at IRQL {now} ({}); its maximum is DISPATCH_LEVEL",
                level_name(now)
            ),
        );
    }
    let kernel = current();
    let mut state = io(&kernel);
    let Some(record) = state.irps.get_mut(&address) else {
        let message = if state.retired_irps.contains(&address) {
            "IoCompleteRequest for an IRP that was already completed"
        } else {
            "IoCompleteRequest with a pointer that is not an IRP"
        };
        drop(state);
        stop(
            BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
            [address, 0, 0, 0],
            message,
        );
    };
    if matches!(record.phase, Phase::Completed(_)) {
        drop(state);
        stop(
            BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
            [address, 0, 0, 0],
            "IoCompleteRequest for an IRP that was already completed",
        );
    }
    let block = record.block;
    // SAFETY: a live IRP block of this machine (the record exists); the driver filled the
    // status block before completing, and owns the IRP until this call.
    let status_block = unsafe { (*block).irp.IoStatus };
    // SAFETY: drivers complete with the `Status` arm.
    let status = unsafe { status_block.Anonymous.Status };
    let information = status_block.Information;
    if status == STATUS_PENDING || status == -1 {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [
                iomanager::COMPLETED_WITH_PENDING_STATUS,
                status as u32 as usize,
                address,
                0,
            ],
            &format!("IoCompleteRequest with status {status:#010X}"),
        );
    }
    // SAFETY: as above.
    let field = unsafe { &raw mut (*block).irp.CancelRoutine };
    // SAFETY: the cancel routine slot is accessed atomically by IoSetCancelRoutine; a load of
    // the same slot is consistent with it.
    let cancel_routine =
        unsafe { core::sync::atomic::AtomicPtr::<core::ffi::c_void>::from_ptr(field.cast()) }
            .load(Ordering::SeqCst);
    if !cancel_routine.is_null() {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
            [
                iomanager::COMPLETED_WITH_CANCEL_ROUTINE,
                cancel_routine as usize,
                address,
                0,
            ],
            "IoCompleteRequest for an IRP whose cancel routine is still set",
        );
    }
    let pending_returned = stack_control(block) & SL_PENDING_RETURNED != 0;
    // SAFETY: as above; the I/O manager records PendingReturned from the stack location.
    unsafe { (*block).irp.PendingReturned = BOOLEAN::from(pending_returned) };
    let mut output = Vec::new();
    if record.major == IRP_MJ_DEVICE_CONTROL && !nt_error(status) && information > 0 {
        if information > record.output_len {
            let output_len = record.output_len;
            drop(state);
            stop(
                BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION,
                [iomanager::UNKNOWN, information, address, output_len],
                &format!(
                    "a buffered I/O control request was completed with Information = \
                     {information}, but its output buffer holds {output_len} bytes (Windows \
                     would copy past the end of the caller's buffer)"
                ),
            );
        }
        if let Some((buffer, _)) = record.buffer {
            let start = buffer.wrapping_add(record.output_at);
            // SAFETY: the output, at `output_at` in the block, holds `output_len` >= information
            // bytes (checked above).
            output = unsafe { core::slice::from_raw_parts(start, information) }.to_vec();
        }
    }
    record.phase = Phase::Completed(Completion {
        result: IoCompletion {
            status,
            information,
            output,
        },
        pending_returned,
    });
    if let Some(buffer) = record.buffer.take() {
        state.retire(buffer);
    }
    state.forget_if_done(address);
    drop(state);
    kernel.irp.waits.completed();
    kernel.irp.completed(address).notify_all();
    kernel.yield_point("IoCompleteRequest");
}

// --- the cancel spin lock -----------------------------------------------------------------------

fn cancel_lock(kernel: &Kernel) -> *mut KSPIN_LOCK {
    kernel.irp.cancel_lock.as_ptr()
}

/// `IoAcquireCancelSpinLock`.
///
/// # Safety
///
/// `Irql` must be writable; the caller releases the lock with `IoReleaseCancelSpinLock`.
pub unsafe extern "system" fn IoAcquireCancelSpinLock(Irql: *mut KIRQL) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoAcquireCancelSpinLock", DISPATCH_LEVEL);
    let kernel = current();
    // SAFETY: the machine's cancel lock word outlives the hold; the IRQL was checked.
    let old = unsafe { wfp_rs::sys::KeAcquireSpinLockRaiseToDpc(cancel_lock(&kernel)) };
    // SAFETY: the caller passes a writable KIRQL.
    unsafe { Irql.write(old) };
}

/// `IoReleaseCancelSpinLock`.
///
/// # Safety
///
/// This processor holds the cancel spin lock; `Irql` is the value its acquisition saved.
pub unsafe extern "system" fn IoReleaseCancelSpinLock(Irql: KIRQL) {
    let _kernel = super::state::KernelCode::enter();
    let kernel = current();
    // SAFETY: KeReleaseSpinLock checks the IRQL and the owner itself.
    unsafe { wfp_rs::sys::KeReleaseSpinLock(cancel_lock(&kernel), Irql) };
}

/// `IoCancelIrp`, as the I/O manager runs it for `CancelIoEx`: sets `Cancel`, takes the cancel
/// routine and calls it with the cancel spin lock held. Returns whether a routine was called.
fn cancel_irp(kernel: &Kernel, irp: usize) -> bool {
    let block = irp as *mut IrpBlock;
    let mut old = PASSIVE_LEVEL;
    // SAFETY: a local out parameter; the lock is released below or by the cancel routine.
    unsafe { IoAcquireCancelSpinLock(&mut old) };
    // SAFETY: IRP blocks stay allocated while the machine lives; `CancelIrql` belongs to the
    // I/O manager while it holds the cancel lock.
    unsafe { (*block).irp.CancelIrql = old };
    // SAFETY: as above.
    let field = unsafe { &raw mut (*block).irp.Cancel };
    // SAFETY: `Cancel` is accessed atomically by the simulated queue routines.
    unsafe { AtomicU8::from_ptr(field) }.store(TRUE, Ordering::SeqCst);
    // SAFETY: the IRP is valid; the exchange is atomic.
    let routine = unsafe { IoSetCancelRoutine(block.cast(), None) };
    let _ = kernel;
    match routine {
        Some(routine) => {
            // SAFETY: the stack location records the driver's device.
            let device = unsafe { (*block).stack.DeviceObject };
            // SAFETY: the device of a queued IRP is alive: it cannot be deleted with IRPs pending.
            let driver = unsafe { (*device).DriverObject } as usize;
            let cancel = super::state::Routine::new(super::state::RoutineKind::Cancel, driver, 0);
            super::state::with_routine(cancel, || {
                // SAFETY: the driver set this cancel routine for this IRP; it is called at
                // DISPATCH_LEVEL with the cancel spin lock held, and must release it.
                driver_code(|| unsafe { routine(device, block.cast()) })
            });
            let now = irql();
            if now != old {
                stop(
                    BugCheckCode::IRQL_UNEXPECTED_VALUE,
                    [((now as usize) << 16) | ((old as usize) << 8) | 2, 0, 0, 0],
                    &format!(
                        "a cancel routine returned at IRQL {now} ({}); it must release the cancel \
                         spin lock (IoReleaseCancelSpinLock), which restores {old} ({})",
                        level_name(now),
                        level_name(old)
                    ),
                );
            }
            true
        }
        None => {
            // SAFETY: acquired above on this processor.
            unsafe { IoReleaseCancelSpinLock(old) };
            false
        }
    }
}

// --- cancel-safe queues -------------------------------------------------------------------------

/// `IoCsqInitializeEx`: fills the queue's dispatch table.
///
/// # Safety
///
/// `Csq` must be writable and stay at its address while the queue is used.
pub unsafe extern "system" fn IoCsqInitializeEx(
    Csq: *mut IO_CSQ,
    CsqInsertIrp: PIO_CSQ_INSERT_IRP_EX,
    CsqRemoveIrp: PIO_CSQ_REMOVE_IRP,
    CsqPeekNextIrp: PIO_CSQ_PEEK_NEXT_IRP,
    CsqAcquireLock: PIO_CSQ_ACQUIRE_LOCK,
    CsqReleaseLock: PIO_CSQ_RELEASE_LOCK,
    CsqCompleteCanceledIrp: PIO_CSQ_COMPLETE_CANCELED_IRP,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    // SAFETY: the caller passes a writable IO_CSQ.
    unsafe {
        Csq.write(IO_CSQ {
            Type: IO_TYPE_CSQ_EX,
            CsqInsertIrp: IO_CSQ_INSERT_ROUTINE {
                CsqInsertIrpEx: CsqInsertIrp,
            },
            CsqRemoveIrp,
            CsqPeekNextIrp,
            CsqAcquireLock,
            CsqReleaseLock,
            CsqCompleteCanceledIrp,
            ReservePointer: core::ptr::null_mut(),
        })
    };
    STATUS_SUCCESS
}

/// A queue's callbacks, read from its `IO_CSQ` (as the kernel does, on every call).
struct Callbacks {
    csq: *mut IO_CSQ,
    table: IO_CSQ,
}

/// Calls a routine of the driver the kernel runs for (a queue or cancel routine) as its code.
fn driver_code<R>(f: impl FnOnce() -> R) -> R {
    super::state::as_driver(super::state::current_driver(), f)
}

fn missing(what: &str) -> ! {
    stop(
        BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        [STATUS_ACCESS_VIOLATION as u32 as usize, 0, 0, 0],
        &format!("a cancel-safe queue routine called a null {what} callback"),
    )
}

impl Callbacks {
    /// # Safety
    ///
    /// `csq` is an initialised `IO_CSQ`.
    unsafe fn of(csq: *mut IO_CSQ) -> Callbacks {
        Callbacks {
            csq,
            // SAFETY: per the contract.
            table: unsafe { csq.read() },
        }
    }

    fn acquire(&self) -> KIRQL {
        let acquire = self
            .table
            .CsqAcquireLock
            .unwrap_or_else(|| missing("CsqAcquireLock"));
        let mut old = PASSIVE_LEVEL;
        // SAFETY: the driver's lock routine, called as the kernel does.
        driver_code(|| unsafe { acquire(self.csq, &mut old) });
        old
    }

    fn release(&self, old: KIRQL, before: KIRQL) {
        let release = self
            .table
            .CsqReleaseLock
            .unwrap_or_else(|| missing("CsqReleaseLock"));
        // SAFETY: the lock was taken with the driver's acquire routine, which saved `old`.
        driver_code(|| unsafe { release(self.csq, old) });
        let now = irql();
        if now != before {
            stop(
                BugCheckCode::IRQL_UNEXPECTED_VALUE,
                [
                    ((now as usize) << 16) | ((before as usize) << 8) | 2,
                    0,
                    0,
                    0,
                ],
                &format!(
                    "a cancel-safe queue's CsqReleaseLock left the IRQL at {now} ({}); it was {before} \
                     ({}) before CsqAcquireLock",
                    level_name(now),
                    level_name(before)
                ),
            );
        }
    }

    fn remove(&self, irp: *mut IRP) {
        let remove = self
            .table
            .CsqRemoveIrp
            .unwrap_or_else(|| missing("CsqRemoveIrp"));
        // SAFETY: the driver's routine, with its lock held and an IRP in its queue.
        driver_code(|| unsafe { remove(self.csq, irp) });
    }

    fn peek(&self, irp: *mut IRP, context: PVOID) -> *mut IRP {
        let peek = self
            .table
            .CsqPeekNextIrp
            .unwrap_or_else(|| missing("CsqPeekNextIrp"));
        // SAFETY: the driver's routine, with its lock held.
        driver_code(|| unsafe { peek(self.csq, irp, context) })
    }

    fn complete_canceled(&self, irp: *mut IRP) {
        let complete = self
            .table
            .CsqCompleteCanceledIrp
            .unwrap_or_else(|| missing("CsqCompleteCanceledIrp"));
        // SAFETY: the driver's routine, for a cancelled IRP removed from its queue.
        driver_code(|| unsafe { complete(self.csq, irp) });
    }
}

/// The `DriverContext[3]` slot the queue routines keep their context in.
fn context_slot(irp: *mut IRP) -> *mut PVOID {
    // SAFETY: a live IRP; the tail overlay is the arm in use while a driver owns the packet.
    let overlay = unsafe { &raw mut (*irp).Tail }.cast::<IRP_TAIL_OVERLAY>();
    // SAFETY: as above; DriverContext[3] is reserved for the cancel-safe queue.
    unsafe { &raw mut (*overlay).DriverContext[3] }
}

/// `IoCsqInsertIrpEx`: marks the IRP pending, inserts it with the driver's routine, and sets the
/// queue's cancel routine; an IRP already cancelled is taken out again and completed as
/// cancelled.
///
/// # Safety
///
/// `Csq` is an initialised queue; `Irp` an IRP the caller owns; `Context` null or writable.
pub unsafe extern "system" fn IoCsqInsertIrpEx(
    Csq: *mut IO_CSQ,
    Irp: *mut IRP,
    Context: *mut IO_CSQ_IRP_CONTEXT,
    InsertContext: PVOID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoCsqInsertIrpEx", DISPATCH_LEVEL);
    let before = irql();
    // SAFETY: per the contract.
    let queue = unsafe { Callbacks::of(Csq) };
    let old = queue.acquire();
    // SAFETY: the caller owns the IRP.
    unsafe { IoMarkIrpPending(Irp) };
    let stored: PVOID = if Context.is_null() {
        Csq.cast()
    } else {
        // SAFETY: the caller passes a writable context.
        unsafe {
            Context.write(IO_CSQ_IRP_CONTEXT {
                Type: IO_TYPE_CSQ_IRP_CONTEXT,
                Irp,
                Csq,
            })
        };
        Context.cast()
    };
    // SAFETY: DriverContext[3] belongs to the queue routines.
    unsafe { context_slot(Irp).write(stored) };
    let status = if queue.table.Type == IO_TYPE_CSQ_EX {
        // SAFETY: an IO_TYPE_CSQ_EX queue stores the Ex routine in this arm.
        let insert = unsafe { queue.table.CsqInsertIrp.CsqInsertIrpEx };
        let insert = insert.unwrap_or_else(|| missing("CsqInsertIrpEx"));
        // SAFETY: the driver's routine, with its lock held.
        driver_code(|| unsafe { insert(Csq, Irp, InsertContext) })
    } else {
        // SAFETY: an IO_TYPE_CSQ queue stores the plain routine in this arm.
        let insert = unsafe { queue.table.CsqInsertIrp.CsqInsertIrp };
        let insert = insert.unwrap_or_else(|| missing("CsqInsertIrp"));
        // SAFETY: as above.
        driver_code(|| unsafe { insert(Csq, Irp) });
        STATUS_SUCCESS
    };
    if !nt_success(status) {
        // SAFETY: as above.
        unsafe { context_slot(Irp).write(core::ptr::null_mut()) };
        queue.release(old, before);
        return status;
    }
    // SAFETY: the IRP is queued; the routine is the kernel's and stays valid.
    unsafe { IoSetCancelRoutine(Irp, Some(csq_cancel_routine)) };
    // SAFETY: the caller owns the IRP.
    let field = unsafe { &raw mut (*Irp).Cancel };
    // SAFETY: `Cancel` is written atomically by `cancel_irp`.
    let cancelled = unsafe { AtomicU8::from_ptr(field) }.load(Ordering::SeqCst);
    // SAFETY: as above; clearing the routine again decides who completes the IRP.
    if cancelled != 0 && unsafe { IoSetCancelRoutine(Irp, None) }.is_some() {
        // Cancelled before the routine was set: nobody else will complete it.
        queue.remove(Irp);
        // SAFETY: as above.
        unsafe { context_slot(Irp).write(core::ptr::null_mut()) };
        queue.release(old, before);
        queue.complete_canceled(Irp);
        return status;
    }
    queue.release(old, before);
    status
}

/// `IoCsqRemoveNextIrp`: the first IRP the driver's peek routine offers whose cancel routine can
/// still be cleared (the others are being cancelled and are left to the cancel routine).
///
/// # Safety
///
/// `Csq` is an initialised queue.
pub unsafe extern "system" fn IoCsqRemoveNextIrp(Csq: *mut IO_CSQ, PeekContext: PVOID) -> *mut IRP {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoCsqRemoveNextIrp", DISPATCH_LEVEL);
    let before = irql();
    // SAFETY: per the contract.
    let queue = unsafe { Callbacks::of(Csq) };
    let old = queue.acquire();
    let mut irp = queue.peek(core::ptr::null_mut(), PeekContext);
    while !irp.is_null() {
        // SAFETY: a queued IRP; the exchange is atomic.
        if unsafe { IoSetCancelRoutine(irp, None) }.is_some() {
            queue.remove(irp);
            forget_context(irp);
            break;
        }
        irp = queue.peek(irp, PeekContext);
    }
    queue.release(old, before);
    irp
}

/// Clears `DriverContext[3]`, and the IRP in its `IO_CSQ_IRP_CONTEXT` if it has one.
fn forget_context(irp: *mut IRP) {
    // SAFETY: a live IRP removed from a queue.
    let stored = unsafe { context_slot(irp).read() };
    if !stored.is_null() {
        // SAFETY: the slot holds the IO_CSQ or an IO_CSQ_IRP_CONTEXT; both start with a ULONG
        // type.
        let kind = unsafe { stored.cast::<ULONG>().read() };
        if kind == IO_TYPE_CSQ_IRP_CONTEXT {
            // SAFETY: it is the caller's context record, alive while the IRP is queued.
            unsafe { (*stored.cast::<IO_CSQ_IRP_CONTEXT>()).Irp = core::ptr::null_mut() };
        }
    }
    // SAFETY: as above.
    unsafe { context_slot(irp).write(core::ptr::null_mut()) };
}

/// The cancel routine the queue routines set: removes the IRP with the driver's routine and has
/// the driver complete it.
unsafe extern "system" fn csq_cancel_routine(_device: *mut DEVICE_OBJECT, irp: *mut IRP) {
    let _kernel = super::state::KernelCode::enter();
    // SAFETY: the I/O manager calls this with the cancel spin lock held, for an IRP it took the
    // routine from; the lock must be released first.
    let cancel_irql = unsafe { (*irp).CancelIrql };
    // SAFETY: held by this processor, saved when it was acquired.
    unsafe { IoReleaseCancelSpinLock(cancel_irql) };
    // SAFETY: a queued IRP's slot holds the queue or a context record.
    let stored = unsafe { context_slot(irp).read() };
    // SAFETY: as in `forget_context`.
    let kind = unsafe { stored.cast::<ULONG>().read() };
    let csq = if kind == IO_TYPE_CSQ_IRP_CONTEXT {
        // SAFETY: a context record, which names its queue.
        unsafe { (*stored.cast::<IO_CSQ_IRP_CONTEXT>()).Csq }
    } else {
        stored.cast::<IO_CSQ>()
    };
    let before = irql();
    // SAFETY: the queue the IRP was inserted into, still initialised while it has IRPs.
    let queue = unsafe { Callbacks::of(csq) };
    let old = queue.acquire();
    queue.remove(irp);
    forget_context(irp);
    queue.release(old, before);
    queue.complete_canceled(irp);
}

// --- symbolic links -----------------------------------------------------------------------------

/// `\DosDevices\x` and `\GLOBAL??\x` are `\??\x`; names compare without case.
fn link_key(name: &str) -> String {
    let lower = name.to_lowercase();
    for prefix in ["\\dosdevices\\", "\\global??\\"] {
        if let Some(rest) = lower.strip_prefix(prefix) {
            return format!("\\??\\{rest}");
        }
    }
    lower
}

/// `IoCreateSymbolicLink`.
///
/// # Safety
///
/// Both names must be valid `UNICODE_STRING`s.
pub unsafe extern "system" fn IoCreateSymbolicLink(
    SymbolicLinkName: *const UNICODE_STRING,
    DeviceName: *const UNICODE_STRING,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoCreateSymbolicLink", PASSIVE_LEVEL);
    let (Some(name), Some(target)) = (read_unicode(SymbolicLinkName), read_unicode(DeviceName))
    else {
        return Status::INVALID_PARAMETER.raw();
    };
    if name.is_empty() || !name.starts_with('\\') {
        return Status::OBJECT_NAME_INVALID.raw();
    }
    let kernel = current();
    let mut state = io(&kernel);
    let key = link_key(&name);
    if state.links.contains_key(&key) {
        return Status::OBJECT_NAME_COLLISION.raw();
    }
    state.links.insert(key, LinkRecord { name, target });
    STATUS_SUCCESS
}

/// `IoDeleteSymbolicLink`.
///
/// # Safety
///
/// The name must be a valid `UNICODE_STRING`.
pub unsafe extern "system" fn IoDeleteSymbolicLink(
    SymbolicLinkName: *const UNICODE_STRING,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoDeleteSymbolicLink", PASSIVE_LEVEL);
    let Some(name) = read_unicode(SymbolicLinkName) else {
        return Status::INVALID_PARAMETER.raw();
    };
    let kernel = current();
    match io(&kernel).links.remove(&link_key(&name)) {
        Some(_) => STATUS_SUCCESS,
        None => Status::OBJECT_NAME_NOT_FOUND.raw(),
    }
}

// --- object security ----------------------------------------------------------------------------

/// `ObOpenObjectByPointer`, for device objects in kernel mode.
///
/// # Safety
///
/// `Handle` must be writable.
pub unsafe extern "system" fn ObOpenObjectByPointer(
    Object: PVOID,
    HandleAttributes: ULONG,
    PassedAccessState: PVOID,
    DesiredAccess: u32,
    ObjectType: PVOID,
    AccessMode: KPROCESSOR_MODE,
    Handle: *mut HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (PassedAccessState, ObjectType);
    require_irql("ObOpenObjectByPointer", APC_LEVEL);
    if AccessMode != KernelMode {
        return Status::NOT_IMPLEMENTED.raw();
    }
    let kernel = current();
    let serial = {
        let state = kernel.lock();
        if !state.devices.contains_key(&(Object as usize)) {
            return Status::OBJECT_TYPE_MISMATCH.raw();
        }
        serial_of(Object as usize)
    };
    let mut state = io(&kernel);
    let number = state.next_handle;
    state.next_handle += 1;
    // Kernel handles have the top bit set on x64.
    let value = if HandleAttributes & 0x200 != 0 {
        0xFFFF_FFFF_8000_0000usize | (number * 4)
    } else {
        number * 4
    };
    state.handles.insert(
        value,
        KernelHandle {
            object: Object as usize,
            serial,
            granted: map_generic(DesiredAccess),
        },
    );
    // SAFETY: the caller passes a writable handle.
    unsafe { Handle.write(value as HANDLE) };
    STATUS_SUCCESS
}

/// `ZwSetSecurityObject`, for the DACL of a device object.
///
/// # Safety
///
/// `SecurityDescriptor` must be null or a valid security descriptor.
pub unsafe extern "system" fn ZwSetSecurityObject(
    Handle: HANDLE,
    SecurityInformation: u32,
    SecurityDescriptor: PVOID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("ZwSetSecurityObject", PASSIVE_LEVEL);
    let kernel = current();
    let (object, serial, granted) = {
        let state = io(&kernel);
        let Some(handle) = state.handles.get(&(Handle as usize)) else {
            return Status::INVALID_HANDLE.raw();
        };
        (handle.object, handle.serial, handle.granted)
    };
    if !device_alive(&kernel, object, serial) {
        return Status::INVALID_HANDLE.raw();
    }
    if SecurityInformation != DACL_SECURITY_INFORMATION {
        return Status::NOT_IMPLEMENTED.raw();
    }
    if granted & WRITE_DAC == 0 {
        return Status::ACCESS_DENIED.raw();
    }
    if SecurityDescriptor.is_null() {
        return STATUS_ACCESS_VIOLATION;
    }
    // SAFETY: per the contract.
    let dacl = match unsafe { parse_dacl(SecurityDescriptor.cast()) } {
        Ok(dacl) => dacl,
        Err(status) => return status,
    };
    io(&kernel)
        .security
        .insert(object, DeviceSecurity { serial, dacl });
    STATUS_SUCCESS
}

/// `ZwClose`, for handles from `ObOpenObjectByPointer` and `ZwOpenKey`.
///
/// # Safety
///
/// None beyond the kernel's.
pub unsafe extern "system" fn ZwClose(Handle: HANDLE) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("ZwClose", PASSIVE_LEVEL);
    let kernel = current();
    if io(&kernel).handles.remove(&(Handle as usize)).is_some()
        || super::registry::close(&kernel, Handle as usize)
    {
        STATUS_SUCCESS
    } else {
        Status::INVALID_HANDLE.raw()
    }
}

/// The generic rights mapped as for files and devices.
fn map_generic(mask: u32) -> u32 {
    let mut mapped = mask & !(GENERIC_READ | GENERIC_WRITE | GENERIC_EXECUTE | GENERIC_ALL);
    if mask & GENERIC_READ != 0 {
        mapped |= FILE_GENERIC_READ;
    }
    if mask & GENERIC_WRITE != 0 {
        mapped |= FILE_GENERIC_WRITE;
    }
    if mask & GENERIC_EXECUTE != 0 {
        mapped |= FILE_GENERIC_EXECUTE;
    }
    if mask & GENERIC_ALL != 0 {
        mapped |= FILE_ALL_ACCESS;
    }
    mapped
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The DACL of a security descriptor in absolute or self-relative form: `None` for a NULL DACL
/// (or none present, which grants everything too).
///
/// # Safety
///
/// `sd` points to a valid security descriptor.
unsafe fn parse_dacl(sd: *const u8) -> Result<Option<Vec<Ace>>, NTSTATUS> {
    // SAFETY: every descriptor starts with revision, padding and control.
    let header = unsafe { core::slice::from_raw_parts(sd, 4) };
    if header[0] != SECURITY_DESCRIPTOR_REVISION {
        return Err(STATUS_UNKNOWN_REVISION);
    }
    let control = u16_at(header, 2);
    if control & SE_DACL_PRESENT == 0 {
        return Ok(None);
    }
    let acl: *const u8 = if control & SE_SELF_RELATIVE != 0 {
        // SAFETY: a self-relative descriptor has its 20-byte header.
        let header = unsafe { core::slice::from_raw_parts(sd, 20) };
        match u32_at(header, 16) {
            0 => return Ok(None),
            // SAFETY: the offset points into the same descriptor.
            offset => unsafe { sd.add(offset as usize) },
        }
    } else {
        // SAFETY: an absolute descriptor is a SECURITY_DESCRIPTOR (pointers, aligned).
        unsafe { (*sd.cast::<SECURITY_DESCRIPTOR>()).Dacl }.cast::<u8>()
    };
    if acl.is_null() {
        return Ok(None);
    }
    // SAFETY: a valid ACL starts with its 8-byte header.
    let acl_header = unsafe { core::slice::from_raw_parts(acl, 8) };
    if !matches!(acl_header[0], 2 | 4) {
        return Err(Status::INVALID_ACL.raw());
    }
    let size = usize::from(u16_at(acl_header, 2));
    let count = usize::from(u16_at(acl_header, 4));
    if size < 8 {
        return Err(Status::INVALID_ACL.raw());
    }
    // SAFETY: a valid ACL is `AclSize` bytes long.
    let bytes = unsafe { core::slice::from_raw_parts(acl, size) };
    let mut aces = Vec::with_capacity(count);
    let mut at = 8;
    for _ in 0..count {
        if at + 4 > size {
            return Err(Status::INVALID_ACL.raw());
        }
        let (kind, flags, ace_size) =
            (bytes[at], bytes[at + 1], usize::from(u16_at(bytes, at + 2)));
        if ace_size < 8 || at + ace_size > size {
            return Err(Status::INVALID_ACL.raw());
        }
        if matches!(kind, ACCESS_ALLOWED_ACE_TYPE | ACCESS_DENIED_ACE_TYPE)
            && flags & INHERIT_ONLY_ACE == 0
        {
            let sid = &bytes[at + 8..at + ace_size];
            let sid_len = sid.get(1).map(|&n| 8 + 4 * usize::from(n));
            match sid_len {
                Some(len) if sid[0] == 1 && sid[1] <= 15 && len <= sid.len() => {
                    aces.push(Ace {
                        allow: kind == ACCESS_ALLOWED_ACE_TYPE,
                        mask: map_generic(u32_at(bytes, at + 4)),
                        sid: sid[..len].to_vec(),
                    });
                }
                _ => return Err(Status::INVALID_SID.raw()),
            }
        }
        at += ace_size;
    }
    Ok(Some(aces))
}

const EVERYONE: &[u8] = &[1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
const AUTHENTICATED_USERS: &[u8] = &[1, 1, 0, 0, 0, 0, 0, 5, 11, 0, 0, 0];
const LOCAL_SYSTEM: &[u8] = &[1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
const ADMINISTRATORS: &[u8] = &[1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 0x02, 0, 0];
const USERS: &[u8] = &[1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x21, 0x02, 0, 0];
/// S-1-5-21-1-2-3-1001: the interactive user.
const A_USER: &[u8] = &[
    1, 5, 0, 0, 0, 0, 0, 5, 21, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0xE9, 0x03, 0, 0,
];

pub(crate) fn token_sids(caller: Caller) -> &'static [&'static [u8]] {
    match caller {
        Caller::System => &[LOCAL_SYSTEM, ADMINISTRATORS, EVERYONE, AUTHENTICATED_USERS],
        Caller::Administrator => &[A_USER, ADMINISTRATORS, USERS, EVERYONE, AUTHENTICATED_USERS],
        Caller::User => &[A_USER, USERS, EVERYONE, AUTHENTICATED_USERS],
    }
}

/// The DACL access check: ACEs in order, a matching deny for a still-wanted right denies, allows
/// accumulate until everything wanted is granted.
fn access_check(dacl: &Option<Vec<Ace>>, caller: Caller, desired: u32) -> bool {
    let Some(aces) = dacl else {
        return true;
    };
    let sids = token_sids(caller);
    let mut remaining = desired;
    for ace in aces {
        if remaining == 0 {
            break;
        }
        if !sids.contains(&ace.sid.as_slice()) {
            continue;
        }
        if ace.allow {
            remaining &= !ace.mask;
        } else if ace.mask & remaining != 0 {
            return false;
        }
    }
    remaining == 0
}

// --- the user-mode side -------------------------------------------------------------------------

/// A handle to a device, as `CreateFile` returns it in a user-mode process. Dropping it closes
/// it (`CloseHandle`).
pub struct DeviceHandle {
    kernel: Arc<Kernel>,
    file: usize,
    closed: bool,
}

/// A `DeviceIoControl` request sent with an `OVERLAPPED`: it may still be pending.
pub struct IoRequest {
    kernel: Arc<Kernel>,
    irp: usize,
}

impl core::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("file", &format_args!("{:#x}", self.file))
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for IoRequest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IoRequest")
            .field("irp", &format_args!("{:#x}", self.irp))
            .field("result", &self.result())
            .finish()
    }
}

/// The device object name a path opens: `\\.\x`, `\??\x`, `\DosDevices\x` and `\GLOBAL??\x` go
/// through the symbolic link `\??\x`.
fn resolve(kernel: &Kernel, path: &str) -> Result<String, Status> {
    let mut name = match path.strip_prefix("\\\\.\\") {
        Some(rest) => format!("\\??\\{rest}"),
        None => path.to_owned(),
    };
    for _ in 0..8 {
        let key = link_key(&name);
        if !key.starts_with("\\??\\") {
            return Ok(name);
        }
        match io(kernel).links.get(&key) {
            Some(link) => name = link.target.clone(),
            None => return Err(Status::OBJECT_NAME_NOT_FOUND),
        }
    }
    Err(Status::OBJECT_NAME_INVALID)
}

/// `CreateFile(path, GENERIC_READ | GENERIC_WRITE, ...)` from a process running as `caller`.
pub(crate) fn open(
    kernel: &Arc<Kernel>,
    path: &str,
    process: Process,
) -> Result<DeviceHandle, Status> {
    let caller = process.caller();
    let process = Arc::new(process);
    run_due_closes(kernel);
    let target = resolve(kernel, path)?.to_lowercase();
    let (device, driver, serial) = {
        let state = kernel.lock();
        let found = state
            .devices
            .iter()
            .find(|(_, record)| {
                record.name.as_deref().map(str::to_lowercase) == Some(target.clone())
            })
            .map(|(&address, record)| (address, record.driver));
        let Some((device, driver)) = found else {
            return Err(Status::OBJECT_NAME_NOT_FOUND);
        };
        (device, driver, serial_of(device))
    };
    let allowed = {
        let state = io(kernel);
        match state.security.get(&device) {
            Some(security) if security.serial == serial => access_check(
                &security.dacl,
                caller,
                map_generic(GENERIC_READ | GENERIC_WRITE),
            ),
            // The default device security descriptor: everyone may read and write.
            _ => true,
        }
    };
    if !allowed {
        return Err(Status::ACCESS_DENIED);
    }
    let mut block = Box::new(FileBlock([0; FILE_OBJECT_SIZE]));
    block.0[..2].copy_from_slice(&IO_TYPE_FILE.to_le_bytes());
    block.0[2..4].copy_from_slice(&(FILE_OBJECT_SIZE as u16).to_le_bytes());
    block.0[8..16].copy_from_slice(&device.to_le_bytes());
    let block = Box::into_raw(block);
    let file = block as usize;
    io(kernel).files.insert(
        file,
        FileRecord {
            process,
            block,
            device,
            device_serial: serial,
            driver,
            phase: FilePhase::Opening,
        },
    );
    let irp = new_irp(
        kernel,
        NewIrp {
            driver,
            device,
            file,
            major: IRP_MJ_CREATE,
            control: None,
        },
    );
    call_driver(kernel, irp);
    let status = wait_for(kernel, irp).status;
    io(kernel).release(irp);
    let mut state = io(kernel);
    let record = state
        .files
        .get_mut(&file)
        .expect("files are never forgotten");
    if nt_error(status) {
        record.phase = FilePhase::Closed;
        return Err(Status::from_raw(status));
    }
    record.phase = FilePhase::Open;
    Ok(DeviceHandle {
        kernel: Arc::clone(kernel),
        file,
        closed: false,
    })
}

/// Blocks until `irp` is completed (by whichever thread) and returns how it ended.
fn wait_for(kernel: &Kernel, irp: usize) -> IoCompletion {
    let mut state = io(kernel);
    if !matches!(state.irps[&irp].phase, Phase::Completed(_)) {
        drop(state);
        super::spin::spin_before_parking(kernel, &kernel.irp.waits, || {
            matches!(io(kernel).irps[&irp].phase, Phase::Completed(_))
        });
        state = io(kernel);
    }
    let (state, _) = kernel.wait_while(
        &kernel.irp.state,
        state,
        kernel.irp.completed(irp),
        None,
        "waits for an I/O request's completion",
        |state| !matches!(state.irps[&irp].phase, Phase::Completed(_)),
    );
    match &state.irps[&irp].phase {
        Phase::Completed(completion) => completion.result.clone(),
        _ => unreachable!("the wait ends when the request is completed"),
    }
}

/// Whether `file` still has IRPs that are not completed.
fn has_open_irps(state: &IoState, file: usize) -> bool {
    state
        .irps
        .values()
        .any(|irp| irp.file == file && !matches!(irp.phase, Phase::Completed(_)))
}

/// Sends the `IRP_MJ_CLOSE` of every cleaned-up file whose last IRP has completed since.
fn run_due_closes(kernel: &Arc<Kernel>) {
    let due: Vec<usize> = {
        let mut state = io(kernel);
        if state.cleaned_up == 0 {
            return;
        }
        let due: Vec<usize> = state
            .files
            .iter()
            .filter(|(_, f)| f.phase == FilePhase::CleanedUp)
            .map(|(&file, _)| file)
            .filter(|&file| !has_open_irps(&state, file))
            .collect();
        for file in &due {
            if let Some(record) = state.files.get_mut(file) {
                record.phase = FilePhase::Closed;
            }
        }
        state.cleaned_up -= due.len();
        due
    };
    for file in due {
        send_simple(kernel, file, IRP_MJ_CLOSE);
    }
}

/// Sends a create/cleanup/close IRP for `file` and waits for its completion.
fn send_simple(kernel: &Arc<Kernel>, file: usize, major: u8) {
    let (device, serial, driver) = {
        let state = io(kernel);
        let record = &state.files[&file];
        (record.device, record.device_serial, record.driver)
    };
    if !device_alive(kernel, device, serial) {
        return;
    }
    let irp = new_irp(
        kernel,
        NewIrp {
            driver,
            device,
            file,
            major,
            control: None,
        },
    );
    call_driver(kernel, irp);
    wait_for(kernel, irp);
    io(kernel).release(irp);
}

impl DeviceHandle {
    /// `DeviceIoControl(handle, code, input, output_len)` with an `OVERLAPPED`: sends the request
    /// and returns at once, whether the driver completed it or left it pending. Only
    /// `METHOD_BUFFERED` and `METHOD_NEITHER` codes are simulated (direct I/O completes with
    /// `STATUS_NOT_IMPLEMENTED`).
    pub fn device_io_control(&self, code: u32, input: &[u8], output_len: usize) -> IoRequest {
        // Where a deterministic machine may run another context before the request is sent.
        self.kernel.yield_point("DeviceIoControl");
        run_due_closes(&self.kernel);
        let (device, serial, driver, phase) = {
            let state = io(&self.kernel);
            let record = &state.files[&self.file];
            (
                record.device,
                record.device_serial,
                record.driver,
                record.phase,
            )
        };
        let irp = new_irp(
            &self.kernel,
            NewIrp {
                driver,
                device,
                file: self.file,
                major: IRP_MJ_DEVICE_CONTROL,
                control: Some((code, input, output_len)),
            },
        );
        let request = IoRequest {
            kernel: Arc::clone(&self.kernel),
            irp,
        };
        if phase != FilePhase::Open || !device_alive(&self.kernel, device, serial) {
            complete_internally(&self.kernel, irp, Status::DELETE_PENDING.raw());
        } else if code & 3 != METHOD_BUFFERED && code & 3 != METHOD_NEITHER {
            complete_internally(&self.kernel, irp, Status::NOT_IMPLEMENTED.raw());
        } else {
            call_driver(&self.kernel, irp);
        }
        request
    }

    /// `CloseHandle`: `IRP_MJ_CLEANUP`, then `IRP_MJ_CLOSE` once no request of this handle is
    /// pending any more (right away if the driver completed them in its cleanup routine).
    pub fn close(mut self) {
        self.close_inner();
    }

    fn close_inner(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        run_due_closes(&self.kernel);
        let phase = io(&self.kernel).files[&self.file].phase;
        if phase != FilePhase::Open {
            return;
        }
        send_simple(&self.kernel, self.file, IRP_MJ_CLEANUP);
        {
            let mut state = io(&self.kernel);
            let record = state
                .files
                .get_mut(&self.file)
                .expect("files are never forgotten");
            if record.phase != FilePhase::CleanedUp {
                record.phase = FilePhase::CleanedUp;
                state.cleaned_up += 1;
            }
        }
        run_due_closes(&self.kernel);
    }
}

impl Drop for DeviceHandle {
    fn drop(&mut self) {
        self.close_inner();
    }
}

impl Drop for IoRequest {
    fn drop(&mut self) {
        // Nobody can ask how the request ended any more: its record goes when it completes.
        io(&self.kernel).release(self.irp);
    }
}

impl IoRequest {
    /// Whether the request is still pending.
    pub fn is_pending(&self) -> bool {
        // Without copying the output, as `result` does.
        !matches!(io(&self.kernel).irps[&self.irp].phase, Phase::Completed(_))
    }

    /// How the request ended, or `None` while it is pending.
    pub fn result(&self) -> Option<IoCompletion> {
        match &io(&self.kernel).irps[&self.irp].phase {
            Phase::Completed(completion) => Some(completion.result.clone()),
            _ => None,
        }
    }

    /// Blocks until the request is completed (by the driver, on whichever thread) and returns
    /// how it ended.
    pub fn wait(&self) -> IoCompletion {
        let result = wait_for(&self.kernel, self.irp);
        run_due_closes(&self.kernel);
        result
    }

    /// Like [`wait`](Self::wait), for at most `timeout`: `None` if the request is still pending
    /// then (`GetOverlappedResultEx` failing with `WAIT_TIMEOUT`).
    pub fn wait_timeout(&self, timeout: core::time::Duration) -> Option<IoCompletion> {
        let kernel = &*self.kernel;
        let result = {
            let state = io(kernel);
            let (state, _) = kernel.wait_while(
                &kernel.irp.state,
                state,
                kernel.irp.completed(self.irp),
                Some(kernel.deadline_in(timeout)),
                "waits for an I/O request's completion",
                |state| !matches!(state.irps[&self.irp].phase, Phase::Completed(_)),
            );
            match &state.irps[&self.irp].phase {
                Phase::Completed(completion) => Some(completion.result.clone()),
                _ => None,
            }
        };
        if result.is_some() {
            run_due_closes(&self.kernel);
        }
        result
    }

    /// `CancelIoEx(handle, &overlapped)`: the I/O manager sets the IRP's `Cancel` flag and calls
    /// its cancel routine, if one is set. Returns whether a cancel routine was called (false if
    /// the request was completed already, or the driver holds it without a cancel routine).
    pub fn cancel(&self) -> bool {
        cancel_if_pending(&self.kernel, self.irp)
    }
}

/// `CancelIoEx` for the request `irp`, as user mode does it: nothing if it has completed (or
/// its record is gone), else its cancel routine runs, in its driver's context. Whether a cancel
/// routine ran.
fn cancel_if_pending(kernel: &Arc<Kernel>, irp: usize) -> bool {
    let driver = {
        let mut state = io(kernel);
        let driver = match state.irps.get(&irp) {
            Some(record) if !matches!(record.phase, Phase::Completed(_)) => record.driver,
            _ => return false,
        };
        // The cancel routine is the driver's code: an unload waits for it.
        state.call_started(driver);
        driver
    };
    let called = with_context(kernel, PASSIVE_LEVEL, driver, || {
        let _kernel = super::state::KernelCode::enter();
        cancel_irp(kernel, irp)
    });
    call_returned(kernel, driver);
    called
}

/// `CancelIoEx(handle, NULL)` on every handle user mode has open: every device control request
/// (the only requests the simulator's handles send besides create, cleanup and close) still
/// pending is cancelled, in the order they were sent (see [`IoRequest::cancel`]). Returns how
/// many cancel routines ran.
pub(crate) fn cancel_user_requests(kernel: &Arc<Kernel>) -> usize {
    let mut pending: Vec<(u64, usize)> = io(kernel)
        .irps
        .iter()
        .filter(|(_, r)| {
            r.major == IRP_MJ_DEVICE_CONTROL && !matches!(r.phase, Phase::Completed(_))
        })
        .map(|(&irp, r)| (r.serial, irp))
        .collect();
    pending.sort_unstable();
    // One may have completed since (by its driver, or by an earlier one's cancel routine).
    pending
        .into_iter()
        .filter(|&(_, irp)| cancel_if_pending(kernel, irp))
        .count()
}

// --- the harness's view and the unload check ----------------------------------------------------

/// The symbolic links that exist, as (link, target) pairs, sorted.
pub(crate) fn symbolic_links(kernel: &Kernel) -> Vec<(String, String)> {
    let mut links: Vec<(String, String)> = io(kernel)
        .links
        .values()
        .map(|link| (link.name.clone(), link.target.clone()))
        .collect();
    links.sort();
    links
}

/// How many requests the I/O manager keeps a record of: the pending ones, and the completed ones
/// whose sender may still ask how they ended.
pub(crate) fn tracked_irps(kernel: &Kernel) -> usize {
    io(kernel).irps.len()
}

/// How many IRPs of `driver` (any driver, for 0) are not completed.
pub(crate) fn pending_irps(kernel: &Kernel, driver: usize) -> usize {
    io(kernel)
        .irps
        .values()
        .filter(|irp| driver == 0 || irp.driver == driver)
        .filter(|irp| !matches!(irp.phase, Phase::Completed(_)))
        .count()
}

/// Waits until no dispatch or cancel routine of `driver` is running, up to the unload wait
/// limit; called after the driver's unload routine returned, before the unload checks, and
/// holding none of the machine's locks (the caller needs them to finish). On Windows the call
/// holds a reference to the device (a cancel: the request does), which defers the unload until
/// the routine returns — and then, the device deleted, further requests are refused. A service
/// thread that sends a new request, or cancels one, while the driver unloads is in that window;
/// so is a dispatch routine that completed its request and has not returned yet. A routine that
/// outlasts the limit stops the machine (0xCE): on Windows the unload would hang.
pub(crate) fn wait_for_dispatch_calls(kernel: &Kernel, driver: usize) {
    let deadline = kernel.deadline_in(kernel.unload_wait_limit());
    let (state, timed_out) = kernel.wait_while(
        &kernel.irp.state,
        io(kernel),
        &kernel.irp.call_returned,
        Some(deadline),
        "unload: waits for dispatch and cancel routines that are running",
        |state| state.calls_in_driver.contains_key(&driver),
    );
    if timed_out {
        let running = state.calls_in_driver.get(&driver).copied().unwrap_or(0);
        drop(state);
        kernel.unload_wait_expired(
            driver,
            [
                0,
                running,
                0,
                wfp_rs::bugcheck::unload_wait::DISPATCH_ROUTINES,
            ],
            &format!(
                "{running} dispatch or cancel routine(s) running on other threads (a service's requests) to return"
            ),
        );
    }
}

/// What the I/O manager checks after a driver's unload routine returned: no IRP sent to the
/// driver may still be pending (`DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`, with
/// the IRP as parameter 1). Handles still open to its devices are orphaned (Windows would not
/// have unloaded the driver while they were open).
pub(crate) fn check_unload(kernel: &Kernel, driver: usize, name: &str) {
    let mut state = io(kernel);
    // A request still being sent finds the device gone and is refused: not the driver's.
    let pending: Vec<usize> = state
        .irps
        .iter()
        .filter(|(_, irp)| {
            irp.driver == driver && matches!(irp.phase, Phase::Dispatching | Phase::Pending)
        })
        .map(|(&address, _)| address)
        .collect();
    if let Some(&first) = pending.iter().min() {
        let record = &state.irps[&first];
        let what = format!(
            "major function {:#04x}, {}",
            record.major,
            match record.phase {
                Phase::Dispatching => "its dispatch routine still running",
                _ => "pending",
            }
        );
        drop(state);
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [first, 0, 0, 0],
            &format!(
                "driver {name} unloaded with {} IRP(s) still pending (the first: {what}); \
                 complete (or cancel) every queued request before unload",
                pending.len()
            ),
        );
    }
    let mut no_longer_cleaned_up = 0;
    for file in state.files.values_mut() {
        if file.driver == driver && file.phase != FilePhase::Closed {
            if file.phase == FilePhase::CleanedUp {
                no_longer_cleaned_up += 1;
            }
            file.phase = FilePhase::Orphaned;
        }
    }
    state.cleaned_up -= no_longer_cleaned_up;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_normalised() {
        assert_eq!(link_key("\\DosDevices\\Foo"), "\\??\\foo");
        assert_eq!(link_key("\\GLOBAL??\\Foo"), "\\??\\foo");
        assert_eq!(link_key("\\??\\Foo"), "\\??\\foo");
        assert_eq!(link_key("\\Device\\Foo"), "\\device\\foo");
    }

    #[test]
    fn generic_rights_map_to_file_rights() {
        assert_eq!(map_generic(GENERIC_ALL), FILE_ALL_ACCESS);
        assert_eq!(map_generic(GENERIC_READ | GENERIC_WRITE), 0x0012_019F);
        assert_eq!(map_generic(WRITE_DAC), WRITE_DAC);
    }

    #[test]
    fn the_access_check_follows_ace_order() {
        let allow = |sid: &[u8], mask| Ace {
            allow: true,
            mask,
            sid: sid.to_vec(),
        };
        let deny = |sid: &[u8], mask| Ace {
            allow: false,
            mask,
            sid: sid.to_vec(),
        };
        let desired = map_generic(GENERIC_READ | GENERIC_WRITE);
        let admins_only = Some(vec![
            allow(LOCAL_SYSTEM, FILE_ALL_ACCESS),
            allow(ADMINISTRATORS, FILE_ALL_ACCESS),
        ]);
        assert!(access_check(&admins_only, Caller::System, desired));
        assert!(access_check(&admins_only, Caller::Administrator, desired));
        assert!(!access_check(&admins_only, Caller::User, desired));
        assert!(
            access_check(&None, Caller::User, desired),
            "a NULL DACL grants everything"
        );
        assert!(
            !access_check(&Some(Vec::new()), Caller::System, desired),
            "an empty DACL grants nothing"
        );
        let denied_first = Some(vec![
            deny(EVERYONE, FILE_GENERIC_WRITE),
            allow(EVERYONE, FILE_ALL_ACCESS),
        ]);
        assert!(!access_check(&denied_first, Caller::System, desired));
        let partial = Some(vec![allow(EVERYONE, FILE_GENERIC_READ)]);
        assert!(!access_check(&partial, Caller::System, desired));
    }
}
