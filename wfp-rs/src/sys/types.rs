//! `#[repr(C)]` kernel types shared by both backends.
//!
//! Layouts are transcribed from the Windows Driver Kit 10.0.22621 headers (`km/wdm.h`,
//! `km/ntdef.h`, `shared/guiddef.h`) for x64. Windows is LLP64 and Linux is LP64, so only
//! fixed-width Rust types stand for Windows typedefs (`u32` for ULONG, `i32` for LONG and
//! NTSTATUS, `u16` for WCHAR); the assertions at the end of this file hold on both hosts.
//!
//! The names are the C names on purpose: a reader who knows the WDK finds every type by grep.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::c_void;
use static_assertions::{assert_eq_size, const_assert_eq};

pub type NTSTATUS = i32;
pub type KIRQL = u8;
pub type KSPIN_LOCK = usize;
pub type BOOLEAN = u8;
pub type ULONG = u32;
pub type ULONG64 = u64;
pub type LONG = i32;
pub type ULONG_PTR = usize;
pub type SIZE_T = usize;
pub type POOL_FLAGS = u64;
pub type PVOID = *mut c_void;
pub type HANDLE = *mut c_void;
pub type PCSTR = *const u8;
pub type DEVICE_TYPE = u32;
pub type LARGE_INTEGER = i64;
pub type KPRIORITY = i32;
pub type KPROCESSOR_MODE = i8;
/// `BCRYPT_ALG_HANDLE` (bcrypt.h): a CNG algorithm provider; null with
/// [`BCRYPT_USE_SYSTEM_PREFERRED_RNG`].
pub type BCRYPT_ALG_HANDLE = PVOID;

pub const FALSE: BOOLEAN = 0;
pub const TRUE: BOOLEAN = 1;

pub const PASSIVE_LEVEL: KIRQL = 0;
pub const APC_LEVEL: KIRQL = 1;
pub const DISPATCH_LEVEL: KIRQL = 2;
pub const HIGH_LEVEL: KIRQL = 15;

/// `BCryptGenRandom`'s flag (bcrypt.h): the system-preferred RNG, with a null algorithm handle;
/// only at `PASSIVE_LEVEL`.
pub const BCRYPT_USE_SYSTEM_PREFERRED_RNG: ULONG = 0x0000_0002;

pub const POOL_FLAG_UNINITIALIZED: POOL_FLAGS = 0x2;
pub const POOL_FLAG_NON_PAGED: POOL_FLAGS = 0x40;
pub const POOL_FLAG_PAGED: POOL_FLAGS = 0x100;

/// `FILE_DEVICE_NETWORK` (devioctl.h).
pub const FILE_DEVICE_NETWORK: DEVICE_TYPE = 0x12;
/// `FILE_DEVICE_SECURE_OPEN` (wdm.h).
pub const FILE_DEVICE_SECURE_OPEN: ULONG = 0x100;

/// `IRP_MJ_MAXIMUM_FUNCTION` (wdm.h).
pub const IRP_MJ_MAXIMUM_FUNCTION: usize = 0x1b;

/// `DPFLTR_IHVDRIVER_ID` (dpfilter.h): the component id for third-party drivers.
pub const DPFLTR_IHVDRIVER_ID: ULONG = 77;
/// `DPFLTR_ERROR_LEVEL` .. `DPFLTR_INFO_LEVEL` (dpfilter.h).
pub const DPFLTR_ERROR_LEVEL: ULONG = 0;
pub const DPFLTR_WARNING_LEVEL: ULONG = 1;
pub const DPFLTR_TRACE_LEVEL: ULONG = 2;
pub const DPFLTR_INFO_LEVEL: ULONG = 3;

/// `WORK_QUEUE_TYPE` (wdm.h).
pub type WORK_QUEUE_TYPE = i32;
pub const CriticalWorkQueue: WORK_QUEUE_TYPE = 0;
pub const DelayedWorkQueue: WORK_QUEUE_TYPE = 1;

/// `EVENT_TYPE` (ntdef.h).
pub type EVENT_TYPE = i32;
pub const NotificationEvent: EVENT_TYPE = 0;
pub const SynchronizationEvent: EVENT_TYPE = 1;

/// `KWAIT_REASON::Executive` (wdm.h) and `KernelMode` (wdm.h).
pub const Executive: i32 = 0;
pub const KernelMode: KPROCESSOR_MODE = 0;

/// `UNICODE_STRING` (ntdef.h). `Length` and `MaximumLength` count bytes, not characters.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UNICODE_STRING {
    pub Length: u16,
    pub MaximumLength: u16,
    pub Buffer: *mut u16,
}

/// `GUID` (guiddef.h).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct GUID {
    pub Data1: u32,
    pub Data2: u16,
    pub Data3: u16,
    pub Data4: [u8; 8],
}

/// `LIST_ENTRY` (ntdef.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LIST_ENTRY {
    pub Flink: *mut LIST_ENTRY,
    pub Blink: *mut LIST_ENTRY,
}

/// `DISPATCHER_HEADER` (wdm.h), reduced to the members whose offsets matter: the header is a
/// union of bit fields in the first 4 bytes, then `SignalState` and the wait list.
#[repr(C)]
pub struct DISPATCHER_HEADER {
    pub Lock: LONG,
    pub SignalState: LONG,
    pub WaitListHead: LIST_ENTRY,
}

/// `KEVENT` (wdm.h).
#[repr(C)]
pub struct KEVENT {
    pub Header: DISPATCHER_HEADER,
}

/// `TIMER_TYPE` (wdm.h): what a timer's expiry does to waiters.
pub type TIMER_TYPE = i32;
/// `NotificationTimer`: stays signalled, releasing every waiter, until set again.
pub const NotificationTimer: TIMER_TYPE = 0;
/// `SynchronizationTimer`: releases one waiter.
pub const SynchronizationTimer: TIMER_TYPE = 1;

/// `KDPC` (wdm.h): a deferred procedure call object, x64 layout.
#[repr(C)]
pub struct KDPC {
    /// The union of `TargetInfoAsUlong` and {`Type`, `Importance`, `Number`}.
    pub TargetInfoAsUlong: ULONG,
    pub DpcListEntry: *mut core::ffi::c_void,
    pub ProcessorHistory: usize,
    pub DeferredRoutine: PKDEFERRED_ROUTINE,
    pub DeferredContext: PVOID,
    pub SystemArgument1: PVOID,
    pub SystemArgument2: PVOID,
    pub DpcData: PVOID,
}

/// `PKDEFERRED_ROUTINE` (wdm.h): `VOID (KDPC*, PVOID DeferredContext, PVOID, PVOID)`.
pub type PKDEFERRED_ROUTINE = Option<unsafe extern "system" fn(*mut KDPC, PVOID, PVOID, PVOID)>;

/// `KTIMER` (wdm.h), x64 layout.
#[repr(C)]
pub struct KTIMER {
    pub Header: DISPATCHER_HEADER,
    /// A `ULARGE_INTEGER`.
    pub DueTime: u64,
    pub TimerListEntry: LIST_ENTRY,
    pub Dpc: *mut KDPC,
    pub Processor: ULONG,
    pub Period: ULONG,
}

/// `IO_WORKITEM` is opaque to drivers (wdm.h declares only the pointer type).
#[repr(C)]
pub struct IO_WORKITEM {
    _opaque: [u8; 0],
}

// `IRP` and the other I/O request types are laid out in `irp.rs`.
pub use super::irp::IRP;

/// `DRIVER_EXTENSION` (wdm.h).
#[repr(C)]
pub struct DRIVER_EXTENSION {
    pub DriverObject: *mut DRIVER_OBJECT,
    pub AddDevice: PVOID,
    pub Count: ULONG,
    pub ServiceKeyName: UNICODE_STRING,
}

pub type PDRIVER_UNLOAD = Option<unsafe extern "system" fn(DriverObject: *mut DRIVER_OBJECT)>;
pub type PDRIVER_DISPATCH =
    Option<unsafe extern "system" fn(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP) -> NTSTATUS>;
pub type PDRIVER_INITIALIZE = Option<
    unsafe extern "system" fn(
        DriverObject: *mut DRIVER_OBJECT,
        RegistryPath: *const UNICODE_STRING,
    ) -> NTSTATUS,
>;
pub type PIO_WORKITEM_ROUTINE =
    Option<unsafe extern "system" fn(DeviceObject: *mut DEVICE_OBJECT, Context: PVOID)>;

/// `DRIVER_OBJECT` (wdm.h).
#[repr(C)]
pub struct DRIVER_OBJECT {
    pub Type: i16,
    pub Size: i16,
    pub DeviceObject: *mut DEVICE_OBJECT,
    pub Flags: ULONG,
    pub DriverStart: PVOID,
    pub DriverSize: ULONG,
    pub DriverSection: PVOID,
    pub DriverExtension: *mut DRIVER_EXTENSION,
    pub DriverName: UNICODE_STRING,
    pub HardwareDatabase: *mut UNICODE_STRING,
    pub FastIoDispatch: PVOID,
    pub DriverInit: PDRIVER_INITIALIZE,
    pub DriverStartIo: PVOID,
    pub DriverUnload: PDRIVER_UNLOAD,
    pub MajorFunction: [PDRIVER_DISPATCH; IRP_MJ_MAXIMUM_FUNCTION + 1],
}

/// `DEVICE_OBJECT` (wdm.h). The members after `StackSize` (queue, DPC, device lock, ...) are
/// kernel-owned and kept as padding so the size matches. wdm.h declares it
/// `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)`: 16-byte aligned on x64.
#[repr(C, align(16))]
pub struct DEVICE_OBJECT {
    pub Type: i16,
    pub Size: u16,
    pub ReferenceCount: LONG,
    pub DriverObject: *mut DRIVER_OBJECT,
    pub NextDevice: *mut DEVICE_OBJECT,
    pub AttachedDevice: *mut DEVICE_OBJECT,
    pub CurrentIrp: *mut IRP,
    pub Timer: PVOID,
    pub Flags: ULONG,
    pub Characteristics: ULONG,
    pub Vpb: PVOID,
    pub DeviceExtension: PVOID,
    pub DeviceType: DEVICE_TYPE,
    pub StackSize: i8,
    pub KernelOwned: [u8; 0x150 - 0x4d],
}

// Pinned to the x64 layouts of WDK 10.0.22621 (wdm.h, ntdef.h, guiddef.h).
assert_eq_size!(UNICODE_STRING, [u8; 16]);
const_assert_eq!(core::mem::offset_of!(UNICODE_STRING, Buffer), 8);
assert_eq_size!(GUID, [u8; 16]);
assert_eq_size!(LIST_ENTRY, [u8; 16]);
assert_eq_size!(KEVENT, [u8; 0x18]);
assert_eq_size!(KDPC, [u8; 0x40]);
const_assert_eq!(core::mem::offset_of!(KDPC, DeferredRoutine), 0x18);
const_assert_eq!(core::mem::offset_of!(KDPC, DeferredContext), 0x20);
const_assert_eq!(core::mem::offset_of!(KDPC, DpcData), 0x38);
assert_eq_size!(KTIMER, [u8; 0x40]);
const_assert_eq!(core::mem::offset_of!(KTIMER, DueTime), 0x18);
const_assert_eq!(core::mem::offset_of!(KTIMER, Dpc), 0x30);
const_assert_eq!(core::mem::offset_of!(KTIMER, Period), 0x3c);
const_assert_eq!(core::mem::offset_of!(DISPATCHER_HEADER, SignalState), 4);
assert_eq_size!(DRIVER_EXTENSION, [u8; 0x28]);
const_assert_eq!(
    core::mem::offset_of!(DRIVER_EXTENSION, ServiceKeyName),
    0x18
);
assert_eq_size!(DRIVER_OBJECT, [u8; 0x150]);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, DeviceObject), 0x08);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, DriverExtension), 0x30);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, DriverName), 0x38);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, DriverInit), 0x58);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, DriverUnload), 0x68);
const_assert_eq!(core::mem::offset_of!(DRIVER_OBJECT, MajorFunction), 0x70);
assert_eq_size!(DEVICE_OBJECT, [u8; 0x150]);
const_assert_eq!(core::mem::align_of::<DEVICE_OBJECT>(), 16);
const_assert_eq!(core::mem::offset_of!(DEVICE_OBJECT, DriverObject), 0x08);
const_assert_eq!(core::mem::offset_of!(DEVICE_OBJECT, NextDevice), 0x10);
const_assert_eq!(core::mem::offset_of!(DEVICE_OBJECT, Flags), 0x30);
const_assert_eq!(core::mem::offset_of!(DEVICE_OBJECT, DeviceExtension), 0x40);
const_assert_eq!(core::mem::offset_of!(DEVICE_OBJECT, DeviceType), 0x48);
