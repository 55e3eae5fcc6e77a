//! `#[repr(C)]` types of the filter manager's communication ports, shared by both backends.
//!
//! Layouts are transcribed from the Windows Driver Kit 10.0.22621 headers for x64: `km/fltKernel.h`
//! (`FLT_REGISTRATION`, the port callbacks, `FLT_PORT_ALL_ACCESS`), `shared/ntdef.h`
//! (`OBJECT_ATTRIBUTES`) and `shared/fltUserStructures.h` (the headers user mode sees around each
//! message). The assertions at the end pin them; `tests/port.rs` also checks them against the
//! `windows-sys` crate.
//!
//! Only what a driver needs for communication ports is here: a filter registered with no
//! operation callbacks, a server port, and the messages exchanged over it.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::c_void;
use static_assertions::{assert_eq_size, const_assert_eq};

use super::types::*;

/// `ACCESS_MASK` (winnt.h).
pub type ACCESS_MASK = u32;
/// `PSECURITY_DESCRIPTOR`: opaque to drivers that only pass it on.
pub type PSECURITY_DESCRIPTOR = PVOID;

/// The filter manager's filter object; drivers only hold pointers to it.
#[repr(C)]
pub struct FLT_FILTER {
    _opaque: [u8; 0],
}

/// The filter manager's port object (server or client port); drivers only hold pointers to it.
#[repr(C)]
pub struct FLT_PORT {
    _opaque: [u8; 0],
}

/// `PFLT_FILTER`.
pub type PFLT_FILTER = *mut FLT_FILTER;
/// `PFLT_PORT`.
pub type PFLT_PORT = *mut FLT_PORT;

/// `FLT_PORT_CONNECT` (fltKernel.h): the right to connect to a communication port.
pub const FLT_PORT_CONNECT: ACCESS_MASK = 0x0001;
/// `STANDARD_RIGHTS_ALL` (winnt.h).
pub const STANDARD_RIGHTS_ALL: ACCESS_MASK = 0x001F_0000;
/// `FLT_PORT_ALL_ACCESS` (fltKernel.h): `FLT_PORT_CONNECT | STANDARD_RIGHTS_ALL`.
pub const FLT_PORT_ALL_ACCESS: ACCESS_MASK = FLT_PORT_CONNECT | STANDARD_RIGHTS_ALL;

/// `OBJ_CASE_INSENSITIVE` (ntdef.h).
pub const OBJ_CASE_INSENSITIVE: ULONG = 0x0000_0040;
/// `OBJ_KERNEL_HANDLE` (ntdef.h): required by `FltCreateCommunicationPort`.
pub const OBJ_KERNEL_HANDLE: ULONG = 0x0000_0200;

/// `FLT_REGISTRATION_VERSION_0203` (fltKernel.h), the version `FLT_REGISTRATION_VERSION` names
/// when building for Windows 8 and later.
pub const FLT_REGISTRATION_VERSION_0203: u16 = 0x0203;
/// `FLT_REGISTRATION_VERSION` for the Windows versions this crate targets.
pub const FLT_REGISTRATION_VERSION: u16 = FLT_REGISTRATION_VERSION_0203;

/// `FLTFL_REGISTRATION_DO_NOT_SUPPORT_SERVICE_STOP` (fltKernel.h).
pub const FLTFL_REGISTRATION_DO_NOT_SUPPORT_SERVICE_STOP: ULONG = 0x0000_0001;

/// `PFLT_FILTER_UNLOAD_CALLBACK`.
pub type PFLT_FILTER_UNLOAD_CALLBACK = Option<unsafe extern "system" fn(Flags: ULONG) -> NTSTATUS>;

/// `PFLT_CONNECT_NOTIFY`: a user-mode process connected (`FilterConnectCommunicationPort`).
/// Called at `PASSIVE_LEVEL`.
pub type PFLT_CONNECT_NOTIFY = Option<
    unsafe extern "system" fn(
        ClientPort: PFLT_PORT,
        ServerPortCookie: PVOID,
        ConnectionContext: PVOID,
        SizeOfContext: ULONG,
        ConnectionPortCookie: *mut PVOID,
    ) -> NTSTATUS,
>;

/// `PFLT_DISCONNECT_NOTIFY`: the user-mode handle of a connection was closed, or the filter is
/// being unregistered. Called at `PASSIVE_LEVEL`.
pub type PFLT_DISCONNECT_NOTIFY = Option<unsafe extern "system" fn(ConnectionCookie: PVOID)>;

/// `PFLT_MESSAGE_NOTIFY`: user mode sent a message (`FilterSendMessage`). Called at
/// `PASSIVE_LEVEL`; the buffers are raw user-mode addresses.
pub type PFLT_MESSAGE_NOTIFY = Option<
    unsafe extern "system" fn(
        PortCookie: PVOID,
        InputBuffer: PVOID,
        InputBufferLength: ULONG,
        OutputBuffer: PVOID,
        OutputBufferLength: ULONG,
        ReturnOutputBufferLength: *mut ULONG,
    ) -> NTSTATUS,
>;

/// `FLT_REGISTRATION` (fltKernel.h, with `FLT_MGR_LONGHORN` and `FLT_MGR_WIN8`).
///
/// The members this crate never sets (operation and context registration, instance and
/// name-provider callbacks) are typed as plain pointers: they stay null.
#[repr(C)]
pub struct FLT_REGISTRATION {
    pub Size: u16,
    pub Version: u16,
    pub Flags: ULONG,
    pub ContextRegistration: *const c_void,
    pub OperationRegistration: *const c_void,
    pub FilterUnloadCallback: PFLT_FILTER_UNLOAD_CALLBACK,
    pub InstanceSetupCallback: PVOID,
    pub InstanceQueryTeardownCallback: PVOID,
    pub InstanceTeardownStartCallback: PVOID,
    pub InstanceTeardownCompleteCallback: PVOID,
    pub GenerateFileNameCallback: PVOID,
    pub NormalizeNameComponentCallback: PVOID,
    pub NormalizeContextCleanupCallback: PVOID,
    pub TransactionNotificationCallback: PVOID,
    pub NormalizeNameComponentExCallback: PVOID,
    pub SectionNotificationCallback: PVOID,
}

/// `OBJECT_ATTRIBUTES` (ntdef.h).
#[repr(C)]
pub struct OBJECT_ATTRIBUTES {
    pub Length: ULONG,
    pub RootDirectory: HANDLE,
    pub ObjectName: *mut UNICODE_STRING,
    pub Attributes: ULONG,
    pub SecurityDescriptor: PSECURITY_DESCRIPTOR,
    pub SecurityQualityOfService: PVOID,
}

/// `FILTER_MESSAGE_HEADER` (fltUserStructures.h): what user mode receives in front of each message
/// (`FilterGetMessage`). `ReplyLength` is the length of the reply the driver waits for, including
/// the `FILTER_REPLY_HEADER`; 0 if it waits for none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FILTER_MESSAGE_HEADER {
    pub ReplyLength: ULONG,
    pub MessageId: u64,
}

/// `FILTER_REPLY_HEADER` (fltUserStructures.h): what user mode puts in front of each reply
/// (`FilterReplyMessage`). The driver's reply buffer receives only what follows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FILTER_REPLY_HEADER {
    pub Status: NTSTATUS,
    pub MessageId: u64,
}

// Pinned to the x64 layouts of WDK 10.0.22621.
assert_eq_size!(FLT_REGISTRATION, [u8; 0x70]);
const_assert_eq!(core::mem::offset_of!(FLT_REGISTRATION, Flags), 0x04);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, ContextRegistration),
    0x08
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, OperationRegistration),
    0x10
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, FilterUnloadCallback),
    0x18
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, InstanceSetupCallback),
    0x20
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, GenerateFileNameCallback),
    0x40
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, TransactionNotificationCallback),
    0x58
);
const_assert_eq!(
    core::mem::offset_of!(FLT_REGISTRATION, SectionNotificationCallback),
    0x68
);
assert_eq_size!(OBJECT_ATTRIBUTES, [u8; 0x30]);
const_assert_eq!(
    core::mem::offset_of!(OBJECT_ATTRIBUTES, RootDirectory),
    0x08
);
const_assert_eq!(core::mem::offset_of!(OBJECT_ATTRIBUTES, ObjectName), 0x10);
const_assert_eq!(core::mem::offset_of!(OBJECT_ATTRIBUTES, Attributes), 0x18);
const_assert_eq!(
    core::mem::offset_of!(OBJECT_ATTRIBUTES, SecurityDescriptor),
    0x20
);
const_assert_eq!(
    core::mem::offset_of!(OBJECT_ATTRIBUTES, SecurityQualityOfService),
    0x28
);
assert_eq_size!(FILTER_MESSAGE_HEADER, [u8; 0x10]);
const_assert_eq!(
    core::mem::offset_of!(FILTER_MESSAGE_HEADER, MessageId),
    0x08
);
assert_eq_size!(FILTER_REPLY_HEADER, [u8; 0x10]);
const_assert_eq!(core::mem::offset_of!(FILTER_REPLY_HEADER, MessageId), 0x08);
assert_eq_size!(PFLT_CONNECT_NOTIFY, usize);
assert_eq_size!(PFLT_DISCONNECT_NOTIFY, usize);
assert_eq_size!(PFLT_MESSAGE_NOTIFY, usize);
const_assert_eq!(FLT_PORT_ALL_ACCESS, 0x001F_0001);
