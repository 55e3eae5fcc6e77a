//! I/O request packets, cancel-safe queues, symbolic links and object security: the `#[repr(C)]`
//! types and inline routines of `km/wdm.h` (WDK 10.0.22621, x64) that both backends share.
//!
//! Every layout is pinned by the assertions at the end of this file to the offsets of the header;
//! `tests/inverted.rs` checks them again against `windows-sys` where that crate is right
//! (`windows-sys` 0.61 lays out `Parameters.DeviceIoControl` without the header's
//! `POINTER_ALIGNMENT`, microsoft/windows-rs#4404, so that member is checked against the header
//! only).
//!
//! `IoGetCurrentIrpStackLocation`, `IoMarkIrpPending` and `IoSetCancelRoutine` are
//! `FORCEINLINE` functions in wdm.h, not exports of `ntoskrnl.exe`; they are implemented here
//! once, and the simulator runs the same code as the kernel build.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use super::ndis::MDL;
use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, Ordering};

use static_assertions::{assert_eq_align, assert_eq_size, const_assert_eq};

use super::types::*;

// --- major functions, flags and constants -------------------------------------------------------

/// `IRP_MJ_CREATE` (wdm.h): a handle is being opened.
pub const IRP_MJ_CREATE: u8 = 0x00;
/// `IRP_MJ_CLOSE`: the last reference to a file object is gone.
pub const IRP_MJ_CLOSE: u8 = 0x02;
/// `IRP_MJ_DEVICE_CONTROL`: `DeviceIoControl` from user mode.
pub const IRP_MJ_DEVICE_CONTROL: u8 = 0x0e;
/// `IRP_MJ_CLEANUP`: the last handle to a file object was closed.
pub const IRP_MJ_CLEANUP: u8 = 0x12;

/// `SL_PENDING_RETURNED` (wdm.h), in `IO_STACK_LOCATION::Control`; set by `IoMarkIrpPending`.
pub const SL_PENDING_RETURNED: u8 = 0x01;

/// `IO_NO_INCREMENT` (wdm.h): the priority boost for `IofCompleteRequest`.
pub const IO_NO_INCREMENT: i8 = 0;

/// `IO_TYPE_FILE` and `IO_TYPE_IRP` (wdm.h): the `Type` of file objects and IRPs.
pub const IO_TYPE_FILE: i16 = 5;
pub const IO_TYPE_IRP: i16 = 6;

/// `DO_BUFFERED_IO` and `DO_DEVICE_INITIALIZING` (wdm.h), in `DEVICE_OBJECT::Flags`.
pub const DO_BUFFERED_IO: ULONG = 0x0000_0004;
pub const DO_DEVICE_INITIALIZING: ULONG = 0x0000_0080;

/// `FILE_DEVICE_UNKNOWN` (devioctl.h).
pub const FILE_DEVICE_UNKNOWN: DEVICE_TYPE = 0x22;

/// `METHOD_BUFFERED` .. `METHOD_NEITHER` (devioctl.h): the transfer type in bits 0-1 of an I/O
/// control code.
pub const METHOD_BUFFERED: u32 = 0;
pub const METHOD_IN_DIRECT: u32 = 1;
pub const METHOD_OUT_DIRECT: u32 = 2;
pub const METHOD_NEITHER: u32 = 3;

/// `FILE_ANY_ACCESS`, `FILE_READ_ACCESS`, `FILE_WRITE_ACCESS` (devioctl.h): the required access
/// in bits 14-15 of an I/O control code.
pub const FILE_ANY_ACCESS: u32 = 0;
pub const FILE_READ_ACCESS: u32 = 1;
pub const FILE_WRITE_ACCESS: u32 = 2;

/// `CTL_CODE` (devioctl.h): `(DeviceType << 16) | (Access << 14) | (Function << 2) | Method`.
pub const fn CTL_CODE(DeviceType: u32, Function: u32, Method: u32, Access: u32) -> u32 {
    (DeviceType << 16) | (Access << 14) | (Function << 2) | Method
}

/// `UserMode` (wdm.h `MODE`); `KernelMode` is in the shared types.
pub const UserMode: KPROCESSOR_MODE = 1;

/// `STATUS_PENDING` (ntstatus.h): returned by a dispatch routine that did not complete the IRP.
pub const STATUS_PENDING: NTSTATUS = 0x0000_0103;

/// `IO_TYPE_CSQ_IRP_CONTEXT`, `IO_TYPE_CSQ`, `IO_TYPE_CSQ_EX` (wdm.h): the `Type` of
/// `IO_CSQ_IRP_CONTEXT` and `IO_CSQ`.
pub const IO_TYPE_CSQ_IRP_CONTEXT: ULONG = 1;
pub const IO_TYPE_CSQ: ULONG = 2;
pub const IO_TYPE_CSQ_EX: ULONG = 3;

// --- access rights and security descriptors (wdm.h, ntifs.h) ------------------------------------

/// `SYNCHRONIZE`, `WRITE_DAC` (wdm.h): standard access rights.
pub const SYNCHRONIZE: u32 = 0x0010_0000;
pub const WRITE_DAC: u32 = 0x0004_0000;
/// `STANDARD_RIGHTS_REQUIRED` (wdm.h): DELETE | READ_CONTROL | WRITE_DAC | WRITE_OWNER.
pub const STANDARD_RIGHTS_REQUIRED: u32 = 0x000F_0000;
/// `GENERIC_READ` .. `GENERIC_ALL` (wdm.h).
pub const GENERIC_READ: u32 = 0x8000_0000;
pub const GENERIC_WRITE: u32 = 0x4000_0000;
pub const GENERIC_EXECUTE: u32 = 0x2000_0000;
pub const GENERIC_ALL: u32 = 0x1000_0000;
/// `FILE_ALL_ACCESS` (wdm.h): `STANDARD_RIGHTS_REQUIRED | SYNCHRONIZE | 0x1FF`.
pub const FILE_ALL_ACCESS: u32 = STANDARD_RIGHTS_REQUIRED | SYNCHRONIZE | 0x1FF;
/// `FILE_GENERIC_READ`, `FILE_GENERIC_WRITE`, `FILE_GENERIC_EXECUTE` (wdm.h): what the generic
/// rights map to for files and devices.
pub const FILE_GENERIC_READ: u32 = 0x0012_0089;
pub const FILE_GENERIC_WRITE: u32 = 0x0012_0116;
pub const FILE_GENERIC_EXECUTE: u32 = 0x0012_00A0;

/// `DACL_SECURITY_INFORMATION` (wdm.h): `ZwSetSecurityObject` sets the DACL.
pub const DACL_SECURITY_INFORMATION: u32 = 0x0000_0004;

/// `SECURITY_DESCRIPTOR_REVISION` (wdm.h).
pub const SECURITY_DESCRIPTOR_REVISION: u8 = 1;
/// `SE_DACL_PRESENT`, `SE_DACL_PROTECTED`, `SE_SELF_RELATIVE` (ntifs.h): security descriptor
/// control bits.
pub const SE_DACL_PRESENT: u16 = 0x0004;
pub const SE_DACL_PROTECTED: u16 = 0x1000;
pub const SE_SELF_RELATIVE: u16 = 0x8000;
/// `ACL_REVISION` (wdm.h).
pub const ACL_REVISION: u8 = 2;
/// `ACCESS_ALLOWED_ACE_TYPE`, `ACCESS_DENIED_ACE_TYPE` (ntifs.h).
pub const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;
pub const ACCESS_DENIED_ACE_TYPE: u8 = 1;
/// `INHERIT_ONLY_ACE` (ntifs.h): an ACE that applies only to children, not to the object.
pub const INHERIT_ONLY_ACE: u8 = 0x08;

/// `SECURITY_DESCRIPTOR_RELATIVE` (ntifs.h): the self-relative form, with offsets from its
/// start instead of pointers. Owner, group and SACL may be 0 (absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SECURITY_DESCRIPTOR_RELATIVE {
    pub Revision: u8,
    pub Sbz1: u8,
    pub Control: u16,
    pub Owner: ULONG,
    pub Group: ULONG,
    pub Sacl: ULONG,
    pub Dacl: ULONG,
}

/// `SECURITY_DESCRIPTOR` (ntifs.h): the absolute form, with pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SECURITY_DESCRIPTOR {
    pub Revision: u8,
    pub Sbz1: u8,
    pub Control: u16,
    pub Owner: PVOID,
    pub Group: PVOID,
    pub Sacl: *mut ACL,
    pub Dacl: *mut ACL,
}

/// `ACL` (wdm.h): the header; `AceCount` ACEs follow, `AclSize` bytes in all.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ACL {
    pub AclRevision: u8,
    pub Sbz1: u8,
    pub AclSize: u16,
    pub AceCount: u16,
    pub Sbz2: u16,
}

/// `ACE_HEADER` (ntifs.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ACE_HEADER {
    pub AceType: u8,
    pub AceFlags: u8,
    pub AceSize: u16,
}

// --- processes and tokens (wdm.h, ntddk.h, ntifs.h) ---------------------------------------------

/// `PEPROCESS` (wdm.h): a process object, opaque.
pub type PEPROCESS = *mut c_void;
/// `PACCESS_TOKEN` (wdm.h): a token object, opaque.
pub type PACCESS_TOKEN = *mut c_void;
/// `PSID` (ntifs.h): a security identifier (`SID`, variable length).
pub type PSID = *mut super::fwp::SID;

/// `TOKEN_INFORMATION_CLASS` (ntifs.h), an enum: what `SeQueryInformationToken` returns.
pub type TOKEN_INFORMATION_CLASS = i32;
/// `TokenUser` (1): a `TOKEN_USER`.
pub const TokenUser: TOKEN_INFORMATION_CLASS = 1;
/// `TokenGroups` (2): a `TOKEN_GROUPS`.
pub const TokenGroups: TOKEN_INFORMATION_CLASS = 2;

/// `TOKEN_USER` (ntifs.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TOKEN_USER {
    pub User: super::fwp::SID_AND_ATTRIBUTES,
}

/// `TOKEN_GROUPS` (ntifs.h): `GroupCount` entries, of which the declaration shows the first
/// (`ANYSIZE_ARRAY`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TOKEN_GROUPS {
    pub GroupCount: ULONG,
    pub Groups: [super::fwp::SID_AND_ATTRIBUTES; 1],
}

/// `SE_GROUP_ENABLED`, `SE_GROUP_USE_FOR_DENY_ONLY` (winnt.h): group attributes in a token.
pub const SE_GROUP_ENABLED: ULONG = 0x0000_0004;
pub const SE_GROUP_USE_FOR_DENY_ONLY: ULONG = 0x0000_0010;

/// `SID_MAX_SUB_AUTHORITIES` (ntifs.h).
pub const SID_MAX_SUB_AUTHORITIES: u8 = 15;
/// `SID_REVISION` (ntifs.h).
pub const SID_REVISION: u8 = 1;

// --- the registry (wdm.h) -----------------------------------------------------------------------

/// `KEY_QUERY_VALUE` (wdm.h): the right to read a key's values.
pub const KEY_QUERY_VALUE: u32 = 0x0001;
/// `KEY_VALUE_INFORMATION_CLASS` (wdm.h), an enum.
pub type KEY_VALUE_INFORMATION_CLASS = i32;
/// `KeyValuePartialInformation` (2): a `KEY_VALUE_PARTIAL_INFORMATION`.
pub const KeyValuePartialInformation: KEY_VALUE_INFORMATION_CLASS = 2;
/// `REG_SZ`, `REG_EXPAND_SZ` (wdm.h): NUL-terminated UTF-16 strings.
pub const REG_SZ: ULONG = 1;
pub const REG_EXPAND_SZ: ULONG = 2;

/// `KEY_VALUE_PARTIAL_INFORMATION` (wdm.h): `DataLength` bytes of data start at `Data` (the
/// declaration shows the first).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KEY_VALUE_PARTIAL_INFORMATION {
    pub TitleIndex: ULONG,
    pub Type: ULONG,
    pub DataLength: ULONG,
    pub Data: [u8; 1],
}

// --- IRP ----------------------------------------------------------------------------------------

/// `IO_STATUS_BLOCK` (wdm.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IO_STATUS_BLOCK {
    pub Anonymous: IO_STATUS_BLOCK_0,
    pub Information: ULONG_PTR,
}

/// The unnamed union at the start of `IO_STATUS_BLOCK`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IO_STATUS_BLOCK_0 {
    pub Status: NTSTATUS,
    pub Pointer: PVOID,
}

/// `FILE_OBJECT` is handled by pointer only (the kernel owns it; drivers use its address to tell
/// handles apart).
#[repr(C)]
pub struct FILE_OBJECT {
    _opaque: [u8; 0],
}

pub type PDRIVER_CANCEL =
    Option<unsafe extern "system" fn(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP)>;

/// `IRP::AssociatedIrp`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IRP_ASSOCIATED_IRP {
    pub MasterIrp: *mut IRP,
    pub IrpCount: LONG,
    /// The system buffer of a buffered request (`METHOD_BUFFERED` I/O control codes).
    pub SystemBuffer: PVOID,
}

/// `IRP::Overlay.AsynchronousParameters`, reduced to its two pointer-sized unions.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IRP_ASYNCHRONOUS_PARAMETERS {
    pub UserApcRoutine: PVOID,
    pub UserApcContext: PVOID,
}

/// `IRP::Overlay`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IRP_OVERLAY {
    pub AsynchronousParameters: IRP_ASYNCHRONOUS_PARAMETERS,
    pub AllocationSize: LARGE_INTEGER,
}

/// `IRP::Tail.Overlay`: what a driver may use while it owns the IRP. `DriverContext` shares its
/// storage with `DeviceQueueEntry`; the cancel-safe queue routines use `DriverContext[3]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IRP_TAIL_OVERLAY {
    pub DriverContext: [PVOID; 4],
    pub Thread: PVOID,
    pub AuxiliaryBuffer: *mut u8,
    pub ListEntry: LIST_ENTRY,
    /// Shares its storage with `PacketType`. Drivers read it with
    /// [`IoGetCurrentIrpStackLocation`].
    pub CurrentStackLocation: *mut IO_STACK_LOCATION,
    pub OriginalFileObject: *mut FILE_OBJECT,
}

/// `KAPC` (wdm.h), opaque: only its size (0x58 on x64) matters here.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KAPC {
    _opaque: [u64; 11],
}

/// `IRP::Tail`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IRP_TAIL {
    pub Overlay: IRP_TAIL_OVERLAY,
    pub Apc: KAPC,
    pub CompletionKey: PVOID,
}

/// `IRP` (wdm.h), `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)`: 16 on x64. The stack locations
/// follow it in memory.
#[repr(C, align(16))]
pub struct IRP {
    pub Type: i16,
    pub Size: u16,
    pub MdlAddress: *mut MDL,
    pub Flags: ULONG,
    pub AssociatedIrp: IRP_ASSOCIATED_IRP,
    pub ThreadListEntry: LIST_ENTRY,
    pub IoStatus: IO_STATUS_BLOCK,
    pub RequestorMode: KPROCESSOR_MODE,
    pub PendingReturned: BOOLEAN,
    pub StackCount: i8,
    pub CurrentLocation: i8,
    pub Cancel: BOOLEAN,
    pub CancelIrql: KIRQL,
    pub ApcEnvironment: i8,
    pub AllocationFlags: u8,
    /// Shares its storage with `IoRingContext`.
    pub UserIosb: *mut IO_STATUS_BLOCK,
    pub UserEvent: *mut KEVENT,
    pub Overlay: IRP_OVERLAY,
    /// `__volatile`: set and cleared with [`IoSetCancelRoutine`] only.
    pub CancelRoutine: PDRIVER_CANCEL,
    pub UserBuffer: PVOID,
    pub Tail: IRP_TAIL,
}

// --- IO_STACK_LOCATION --------------------------------------------------------------------------

/// `IO_STACK_LOCATION::Parameters.DeviceIoControl`. On x64 `InputBufferLength` and
/// `IoControlCode` are `POINTER_ALIGNMENT` (8), hence the padding.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IO_STACK_LOCATION_DEVICE_IO_CONTROL {
    pub OutputBufferLength: ULONG,
    _align_input: u32,
    pub InputBufferLength: ULONG,
    _align_code: u32,
    pub IoControlCode: ULONG,
    _align_type3: u32,
    pub Type3InputBuffer: PVOID,
}

impl IO_STACK_LOCATION_DEVICE_IO_CONTROL {
    /// The parameters of a `DeviceIoControl` request (the padding is zero).
    pub const fn new(output: ULONG, input: ULONG, code: ULONG, type3_input: PVOID) -> Self {
        IO_STACK_LOCATION_DEVICE_IO_CONTROL {
            OutputBufferLength: output,
            _align_input: 0,
            InputBufferLength: input,
            _align_code: 0,
            IoControlCode: code,
            _align_type3: 0,
            Type3InputBuffer: type3_input,
        }
    }
}

/// `IO_STACK_LOCATION::Parameters`, reduced to the arms this crate reads; `Others` gives the
/// union its size (four pointers).
#[repr(C)]
#[derive(Clone, Copy)]
pub union IO_STACK_LOCATION_PARAMETERS {
    pub DeviceIoControl: IO_STACK_LOCATION_DEVICE_IO_CONTROL,
    pub Others: [PVOID; 4],
}

pub type PIO_COMPLETION_ROUTINE = Option<
    unsafe extern "system" fn(
        DeviceObject: *mut DEVICE_OBJECT,
        Irp: *mut IRP,
        Context: PVOID,
    ) -> NTSTATUS,
>;

/// `IO_STACK_LOCATION` (wdm.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IO_STACK_LOCATION {
    pub MajorFunction: u8,
    pub MinorFunction: u8,
    pub Flags: u8,
    pub Control: u8,
    pub Parameters: IO_STACK_LOCATION_PARAMETERS,
    pub DeviceObject: *mut DEVICE_OBJECT,
    pub FileObject: *mut FILE_OBJECT,
    pub CompletionRoutine: PIO_COMPLETION_ROUTINE,
    pub Context: PVOID,
}

// --- cancel-safe queues (wdm.h) -----------------------------------------------------------------

pub type PIO_CSQ_INSERT_IRP = Option<unsafe extern "system" fn(Csq: *mut IO_CSQ, Irp: *mut IRP)>;
pub type PIO_CSQ_INSERT_IRP_EX = Option<
    unsafe extern "system" fn(Csq: *mut IO_CSQ, Irp: *mut IRP, InsertContext: PVOID) -> NTSTATUS,
>;
pub type PIO_CSQ_REMOVE_IRP = Option<unsafe extern "system" fn(Csq: *mut IO_CSQ, Irp: *mut IRP)>;
pub type PIO_CSQ_PEEK_NEXT_IRP = Option<
    unsafe extern "system" fn(Csq: *mut IO_CSQ, Irp: *mut IRP, PeekContext: PVOID) -> *mut IRP,
>;
pub type PIO_CSQ_ACQUIRE_LOCK =
    Option<unsafe extern "system" fn(Csq: *mut IO_CSQ, Irql: *mut KIRQL)>;
pub type PIO_CSQ_RELEASE_LOCK = Option<unsafe extern "system" fn(Csq: *mut IO_CSQ, Irql: KIRQL)>;
pub type PIO_CSQ_COMPLETE_CANCELED_IRP =
    Option<unsafe extern "system" fn(Csq: *mut IO_CSQ, Irp: *mut IRP)>;

/// `IO_CSQ::CsqInsertIrp`: which arm is valid depends on `IO_CSQ::Type` (`IO_TYPE_CSQ` or
/// `IO_TYPE_CSQ_EX`). The C structure declares one pointer type and casts.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IO_CSQ_INSERT_ROUTINE {
    pub CsqInsertIrp: PIO_CSQ_INSERT_IRP,
    pub CsqInsertIrpEx: PIO_CSQ_INSERT_IRP_EX,
}

/// `IO_CSQ` (wdm.h): the dispatch table of a cancel-safe queue, filled by
/// `IoCsqInitialize(Ex)`. Opaque to drivers, which only keep it at a fixed address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IO_CSQ {
    pub Type: ULONG,
    pub CsqInsertIrp: IO_CSQ_INSERT_ROUTINE,
    pub CsqRemoveIrp: PIO_CSQ_REMOVE_IRP,
    pub CsqPeekNextIrp: PIO_CSQ_PEEK_NEXT_IRP,
    pub CsqAcquireLock: PIO_CSQ_ACQUIRE_LOCK,
    pub CsqReleaseLock: PIO_CSQ_RELEASE_LOCK,
    pub CsqCompleteCanceledIrp: PIO_CSQ_COMPLETE_CANCELED_IRP,
    pub ReservePointer: PVOID,
}

/// `IO_CSQ_IRP_CONTEXT` (wdm.h): ties a queued IRP to a caller-owned record, for
/// `IoCsqRemoveIrp`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IO_CSQ_IRP_CONTEXT {
    pub Type: ULONG,
    pub Irp: *mut IRP,
    pub Csq: *mut IO_CSQ,
}

// --- the inline routines of wdm.h ---------------------------------------------------------------

/// `IoGetCurrentIrpStackLocation` (wdm.h, `FORCEINLINE`).
///
/// # Safety
///
/// `Irp` must point to an IRP the caller owns (it was passed to the caller's dispatch routine
/// and not completed yet).
#[inline]
pub unsafe fn IoGetCurrentIrpStackLocation(Irp: *mut IRP) -> *mut IO_STACK_LOCATION {
    // SAFETY: the caller owns a valid IRP.
    let overlay = unsafe { &raw const (*Irp).Tail }.cast::<IRP_TAIL_OVERLAY>();
    // SAFETY: `Tail.Overlay` is the arm in use while a driver processes the packet.
    unsafe { (*overlay).CurrentStackLocation }
}

/// `IoMarkIrpPending` (wdm.h, `FORCEINLINE`): sets `SL_PENDING_RETURNED` in the current stack
/// location. A dispatch routine that marks an IRP pending must return `STATUS_PENDING`.
///
/// # Safety
///
/// As for [`IoGetCurrentIrpStackLocation`].
#[inline]
pub unsafe fn IoMarkIrpPending(Irp: *mut IRP) {
    // SAFETY: the caller owns a valid IRP whose current stack location is valid.
    let stack = unsafe { IoGetCurrentIrpStackLocation(Irp) };
    // SAFETY: as above; the stack location belongs to the caller while it owns the IRP.
    unsafe { (*stack).Control |= SL_PENDING_RETURNED };
}

/// `IoSetCancelRoutine` (wdm.h, `FORCEINLINE`): atomically exchanges `Irp->CancelRoutine`
/// (`InterlockedExchangePointer`) and returns the previous routine. A `None` result while
/// clearing means the I/O manager has already taken the routine to call it.
///
/// # Safety
///
/// `Irp` must point to a valid IRP; the routine, if any, must stay callable until it is cleared
/// or called.
#[inline]
pub unsafe fn IoSetCancelRoutine(Irp: *mut IRP, CancelRoutine: PDRIVER_CANCEL) -> PDRIVER_CANCEL {
    // SAFETY: the caller passes a valid IRP.
    let field = unsafe { &raw mut (*Irp).CancelRoutine };
    // SAFETY: the field is a pointer-sized, pointer-aligned slot, and every access to it is
    // atomic (this function and the I/O manager's exchange), as wdm.h requires.
    let slot = unsafe { AtomicPtr::<c_void>::from_ptr(field.cast()) };
    let new = CancelRoutine.map_or(core::ptr::null_mut(), |routine| routine as *mut c_void);
    let old = slot.swap(new, Ordering::SeqCst);
    if old.is_null() {
        None
    } else {
        // SAFETY: the slot only ever holds null or a `PDRIVER_CANCEL` stored by this function or
        // by the I/O manager; function and data pointers have the same size on every Windows
        // target.
        Some(unsafe {
            core::mem::transmute::<
                *mut c_void,
                unsafe extern "system" fn(*mut DEVICE_OBJECT, *mut IRP),
            >(old)
        })
    }
}

// Pinned to the x64 layouts of WDK 10.0.22621 km/wdm.h.
assert_eq_size!(IO_STATUS_BLOCK, [u8; 0x10]);
const_assert_eq!(core::mem::offset_of!(IO_STATUS_BLOCK, Information), 0x08);
assert_eq_size!(IRP, [u8; 0xD0]);
assert_eq_align!(IRP, u128);
const_assert_eq!(core::mem::offset_of!(IRP, MdlAddress), 0x08);
const_assert_eq!(core::mem::offset_of!(IRP, Flags), 0x10);
const_assert_eq!(core::mem::offset_of!(IRP, AssociatedIrp), 0x18);
const_assert_eq!(core::mem::offset_of!(IRP, ThreadListEntry), 0x20);
const_assert_eq!(core::mem::offset_of!(IRP, IoStatus), 0x30);
const_assert_eq!(core::mem::offset_of!(IRP, RequestorMode), 0x40);
const_assert_eq!(core::mem::offset_of!(IRP, PendingReturned), 0x41);
const_assert_eq!(core::mem::offset_of!(IRP, StackCount), 0x42);
const_assert_eq!(core::mem::offset_of!(IRP, CurrentLocation), 0x43);
const_assert_eq!(core::mem::offset_of!(IRP, Cancel), 0x44);
const_assert_eq!(core::mem::offset_of!(IRP, CancelIrql), 0x45);
const_assert_eq!(core::mem::offset_of!(IRP, UserIosb), 0x48);
const_assert_eq!(core::mem::offset_of!(IRP, UserEvent), 0x50);
const_assert_eq!(core::mem::offset_of!(IRP, Overlay), 0x58);
const_assert_eq!(core::mem::offset_of!(IRP, CancelRoutine), 0x68);
const_assert_eq!(core::mem::offset_of!(IRP, UserBuffer), 0x70);
const_assert_eq!(core::mem::offset_of!(IRP, Tail), 0x78);
assert_eq_size!(IRP_TAIL, [u8; 0x58]);
assert_eq_size!(IRP_TAIL_OVERLAY, [u8; 0x50]);
// Relative to `Tail` (0x78): DriverContext 0x78, Thread 0x98, ListEntry 0xA8,
// CurrentStackLocation 0xB8, OriginalFileObject 0xC0.
const_assert_eq!(core::mem::offset_of!(IRP_TAIL_OVERLAY, Thread), 0x20);
const_assert_eq!(core::mem::offset_of!(IRP_TAIL_OVERLAY, ListEntry), 0x30);
const_assert_eq!(
    core::mem::offset_of!(IRP_TAIL_OVERLAY, CurrentStackLocation),
    0x40
);
const_assert_eq!(
    core::mem::offset_of!(IRP_TAIL_OVERLAY, OriginalFileObject),
    0x48
);
assert_eq_size!(IO_STACK_LOCATION, [u8; 0x48]);
assert_eq_size!(IO_STACK_LOCATION_PARAMETERS, [u8; 0x20]);
const_assert_eq!(core::mem::offset_of!(IO_STACK_LOCATION, Control), 0x03);
const_assert_eq!(core::mem::offset_of!(IO_STACK_LOCATION, Parameters), 0x08);
const_assert_eq!(core::mem::offset_of!(IO_STACK_LOCATION, DeviceObject), 0x28);
const_assert_eq!(core::mem::offset_of!(IO_STACK_LOCATION, FileObject), 0x30);
const_assert_eq!(core::mem::offset_of!(IO_STACK_LOCATION, Context), 0x40);
// Parameters.DeviceIoControl: OutputBufferLength +0, InputBufferLength +8 (POINTER_ALIGNMENT),
// IoControlCode +0x10 (POINTER_ALIGNMENT), Type3InputBuffer +0x18; so IoControlCode is at 0x18
// of the stack location.
const_assert_eq!(
    core::mem::offset_of!(IO_STACK_LOCATION_DEVICE_IO_CONTROL, InputBufferLength),
    0x08
);
const_assert_eq!(
    core::mem::offset_of!(IO_STACK_LOCATION_DEVICE_IO_CONTROL, IoControlCode),
    0x10
);
const_assert_eq!(
    core::mem::offset_of!(IO_STACK_LOCATION_DEVICE_IO_CONTROL, Type3InputBuffer),
    0x18
);
assert_eq_size!(IO_CSQ, [u8; 0x40]);
const_assert_eq!(core::mem::offset_of!(IO_CSQ, CsqInsertIrp), 0x08);
const_assert_eq!(core::mem::offset_of!(IO_CSQ, CsqCompleteCanceledIrp), 0x30);
assert_eq_size!(IO_CSQ_IRP_CONTEXT, [u8; 0x18]);
assert_eq_size!(SECURITY_DESCRIPTOR_RELATIVE, [u8; 0x14]);
assert_eq_size!(SECURITY_DESCRIPTOR, [u8; 0x28]);
const_assert_eq!(core::mem::offset_of!(SECURITY_DESCRIPTOR, Dacl), 0x20);
assert_eq_size!(ACL, [u8; 8]);
assert_eq_size!(ACE_HEADER, [u8; 4]);
assert_eq_size!(TOKEN_USER, [u8; 0x10]);
assert_eq_size!(KEY_VALUE_PARTIAL_INFORMATION, [u8; 0x10]);
const_assert_eq!(
    core::mem::offset_of!(KEY_VALUE_PARTIAL_INFORMATION, Data),
    0x0C
);
assert_eq_size!(TOKEN_GROUPS, [u8; 0x18]);
const_assert_eq!(core::mem::offset_of!(TOKEN_GROUPS, Groups), 0x08);
const_assert_eq!(
    CTL_CODE(FILE_DEVICE_UNKNOWN, 0x800, METHOD_BUFFERED, FILE_ANY_ACCESS),
    0x0022_2000
);
