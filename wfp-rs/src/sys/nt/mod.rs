//! The real Windows kernel.
//!
//! Imports are declared with `raw-dylib` and `+verbatim`, so `rustc` writes the import table
//! itself and the exact module name (`ntoskrnl.exe`, not `ntoskrnl.exe.dll`) is used: a driver
//! links with `rust-lld` on any host, without the WDK's import libraries.
//!
//! Prototypes follow WDK 10.0.22621 `km/wdm.h`.

use super::fwp::*;
use super::types::*;

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn KeAcquireSpinLockRaiseToDpc(SpinLock: *mut KSPIN_LOCK) -> KIRQL;
    pub fn KeReleaseSpinLock(SpinLock: *mut KSPIN_LOCK, NewIrql: KIRQL);

    pub fn ExAllocatePool2(Flags: POOL_FLAGS, NumberOfBytes: SIZE_T, Tag: ULONG) -> PVOID;
    pub fn ExFreePoolWithTag(P: PVOID, Tag: ULONG);

    pub fn KeBugCheckEx(
        BugCheckCode: ULONG,
        BugCheckParameter1: ULONG_PTR,
        BugCheckParameter2: ULONG_PTR,
        BugCheckParameter3: ULONG_PTR,
        BugCheckParameter4: ULONG_PTR,
    ) -> !;

    pub fn IoCreateDevice(
        DriverObject: *mut DRIVER_OBJECT,
        DeviceExtensionSize: ULONG,
        DeviceName: *const UNICODE_STRING,
        DeviceType: DEVICE_TYPE,
        DeviceCharacteristics: ULONG,
        Exclusive: BOOLEAN,
        DeviceObject: *mut *mut DEVICE_OBJECT,
    ) -> NTSTATUS;
    pub fn IoDeleteDevice(DeviceObject: *mut DEVICE_OBJECT);
    pub fn IoAllocateDriverObjectExtension(
        DriverObject: *mut DRIVER_OBJECT,
        ClientIdentificationAddress: PVOID,
        DriverObjectExtensionSize: ULONG,
        DriverObjectExtension: *mut PVOID,
    ) -> NTSTATUS;
    pub fn IoGetDriverObjectExtension(
        DriverObject: *mut DRIVER_OBJECT,
        ClientIdentificationAddress: PVOID,
    ) -> PVOID;

    pub fn IoAllocateWorkItem(DeviceObject: *mut DEVICE_OBJECT) -> *mut IO_WORKITEM;
    pub fn IoQueueWorkItem(
        IoWorkItem: *mut IO_WORKITEM,
        WorkerRoutine: PIO_WORKITEM_ROUTINE,
        QueueType: WORK_QUEUE_TYPE,
        Context: PVOID,
    );
    pub fn IoFreeWorkItem(IoWorkItem: *mut IO_WORKITEM);

    pub fn KeInitializeEvent(Event: *mut KEVENT, Type: EVENT_TYPE, State: BOOLEAN);
    pub fn KeSetEvent(Event: *mut KEVENT, Increment: KPRIORITY, Wait: BOOLEAN) -> LONG;
    pub fn KeClearEvent(Event: *mut KEVENT);

    /// Exported since Windows 8.1; callable at any IRQL.
    pub fn KeQueryInterruptTimePrecise(QpcTimeStamp: *mut ULONG64) -> ULONG64;
    pub fn KeWaitForSingleObject(
        Object: PVOID,
        WaitReason: i32,
        WaitMode: KPROCESSOR_MODE,
        Alertable: BOOLEAN,
        Timeout: *const LARGE_INTEGER,
    ) -> NTSTATUS;
}

// C-variadic, so declared with the "C" ABI (identical to "system" on x64).
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn DbgPrintEx(ComponentId: ULONG, Level: ULONG, Format: PCSTR, ...) -> ULONG;
}

// What `core` and `alloc` need from the C runtime on x86_64-pc-windows-msvc; ntoskrnl.exe
// exports all four.
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8;
    pub fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8;
    pub fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8;
    pub fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32;
}

/// `KeGetCurrentIrql`: on x64 the IRQL is the task-priority register, CR8 (wdm.h inlines this).
#[inline]
pub fn KeGetCurrentIrql() -> KIRQL {
    let irql: u64;
    // SAFETY: reading CR8 is allowed in kernel mode at any IRQL and has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr8", out(reg) irql, options(nomem, nostack, preserves_flags))
    };
    irql as KIRQL
}

/// `KfRaiseIrql` as wdm.h inlines it on x64 for levels up to `DISPATCH_LEVEL`.
///
/// # Safety
///
/// `NewIrql` must be at least the current IRQL and at most `DISPATCH_LEVEL`.
#[inline]
pub unsafe fn KfRaiseIrql(NewIrql: KIRQL) -> KIRQL {
    let old = KeGetCurrentIrql();
    // SAFETY: the caller guarantees a valid, non-lowering level; CR8 writes are how x64 changes
    // IRQL.
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) NewIrql as u64, options(nomem, nostack, preserves_flags))
    };
    old
}

/// `KeLowerIrql` as wdm.h inlines it on x64.
///
/// # Safety
///
/// `NewIrql` must be at most the current IRQL and be the level saved when it was raised.
#[inline]
pub unsafe fn KeLowerIrql(NewIrql: KIRQL) {
    // SAFETY: the caller guarantees the level is the one saved by the matching raise.
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) NewIrql as u64, options(nomem, nostack, preserves_flags))
    };
}

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn strlen(s: *const u8) -> usize;
}

// The stack probe. For x86_64-pc-windows-msvc, rustc calls `__chkstk` in the prologue of every
// function whose frame is larger than a page (debug builds have many: every temporary gets its
// own slot), so the pages of the new frame are touched in order and the stack's guard page is
// hit before anything below it. The user-mode C runtime that defines it is not in a kernel
// image, but ntoskrnl.exe exports `__chkstk` on x64, next to `__C_specific_handler` (the
// export tables of Wine's and ReactOS's ntoskrnl.exe, written to load Windows drivers, list it
// for x86_64 only). The thunk rustc writes for a raw-dylib import is a single `jmp` through the
// import address table, so the probe's own convention (size in rax, every register but
// r10/r11 and the flags preserved) reaches ntoskrnl intact. Never called from Rust: declared so
// the import is written.
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn __chkstk();
}

/// Referenced by the compiler whenever floating-point code is present (MSVC convention); the
/// kernel C runtime would define it, and drivers have none.
#[unsafe(no_mangle)]
#[used]
pub static _fltused: i32 = 0;

/// The precompiled `core`/`alloc` for this target carry unwind tables that name the C++ frame
/// handler. Drivers are built with `panic = "abort"`, so no exception ever unwinds through Rust
/// frames and this is never called; if it were, the only safe answer is to stop.
///
/// # Safety
///
/// Never called.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __CxxFrameHandler3(
    _record: *mut core::ffi::c_void,
    _frame: *mut core::ffi::c_void,
    _context: *mut core::ffi::c_void,
    _dispatcher: *mut core::ffi::c_void,
) -> i32 {
    crate::bugcheck::bug_check(
        crate::bugcheck::BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        0,
        0,
        0,
        0,
    )
}

// The WFP kernel client (fwpsk.h, fwpmk.h of WDK 10.0.22621). Every management routine
// (`Fwpm*`) requires PASSIVE_LEVEL; FwpsCalloutRegister3/UnregisterById0 too.
#[link(name = "fwpkclnt.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FwpsCalloutRegister3(
        deviceObject: *mut core::ffi::c_void,
        callout: *const FWPS_CALLOUT3,
        calloutId: *mut u32,
    ) -> NTSTATUS;
    pub fn FwpsCalloutUnregisterById0(calloutId: u32) -> NTSTATUS;

    pub fn FwpmEngineOpen0(
        serverName: *const u16,
        authnService: u32,
        authIdentity: *mut core::ffi::c_void,
        session: *const FWPM_SESSION0,
        engineHandle: *mut HANDLE,
    ) -> NTSTATUS;
    pub fn FwpmEngineClose0(engineHandle: HANDLE) -> NTSTATUS;
    pub fn FwpmTransactionBegin0(engineHandle: HANDLE, flags: u32) -> NTSTATUS;
    pub fn FwpmTransactionCommit0(engineHandle: HANDLE) -> NTSTATUS;
    pub fn FwpmTransactionAbort0(engineHandle: HANDLE) -> NTSTATUS;
    pub fn FwpmProviderAdd0(
        engineHandle: HANDLE,
        provider: *const FWPM_PROVIDER0,
        sd: *mut core::ffi::c_void,
    ) -> NTSTATUS;
    pub fn FwpmProviderDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
    pub fn FwpmSubLayerAdd0(
        engineHandle: HANDLE,
        subLayer: *const FWPM_SUBLAYER0,
        sd: *mut core::ffi::c_void,
    ) -> NTSTATUS;
    pub fn FwpmSubLayerDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
    pub fn FwpmCalloutAdd0(
        engineHandle: HANDLE,
        callout: *const FWPM_CALLOUT0,
        sd: *mut core::ffi::c_void,
        id: *mut u32,
    ) -> NTSTATUS;
    pub fn FwpmCalloutDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
    pub fn FwpmFilterAdd0(
        engineHandle: HANDLE,
        filter: *const FWPM_FILTER0,
        sd: *mut core::ffi::c_void,
        id: *mut u64,
    ) -> NTSTATUS;
    pub fn FwpmFilterDeleteById0(engineHandle: HANDLE, id: u64) -> NTSTATUS;
}

// Pending (fwpsk.h). Both at IRQL <= DISPATCH_LEVEL.
#[link(name = "fwpkclnt.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FwpsPendOperation0(completionHandle: HANDLE, completionContext: *mut HANDLE)
    -> NTSTATUS;
    pub fn FwpsCompleteOperation0(completionContext: HANDLE, netBufferList: PVOID);
}

// Flow contexts (fwpsk.h). Both at IRQL <= DISPATCH_LEVEL.
#[link(name = "fwpkclnt.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FwpsFlowAssociateContext0(
        flowId: u64,
        layerId: u16,
        calloutId: u32,
        flowContext: u64,
    ) -> NTSTATUS;
    pub fn FwpsFlowRemoveContext0(flowId: u64, layerId: u16, calloutId: u32) -> NTSTATUS;
}

// The filter manager (fltKernel.h of WDK 10.0.22621): a filter registration and communication
// ports. FltSendMessage is at most APC_LEVEL (it waits, and it attaches to the client's process
// to copy the message); FltRegisterFilter, FltStartFiltering, FltUnregisterFilter and the
// security descriptor routines at most APC_LEVEL; the port routines PASSIVE_LEVEL.
use super::flt::*;

#[link(name = "fltmgr.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FltRegisterFilter(
        Driver: *mut DRIVER_OBJECT,
        Registration: *const FLT_REGISTRATION,
        RetFilter: *mut PFLT_FILTER,
    ) -> NTSTATUS;
    pub fn FltStartFiltering(Filter: PFLT_FILTER) -> NTSTATUS;
    pub fn FltUnregisterFilter(Filter: PFLT_FILTER);
    pub fn FltBuildDefaultSecurityDescriptor(
        SecurityDescriptor: *mut PSECURITY_DESCRIPTOR,
        DesiredAccess: ACCESS_MASK,
    ) -> NTSTATUS;
    pub fn FltFreeSecurityDescriptor(SecurityDescriptor: PSECURITY_DESCRIPTOR);
    pub fn FltCreateCommunicationPort(
        Filter: PFLT_FILTER,
        ServerPort: *mut PFLT_PORT,
        ObjectAttributes: *const OBJECT_ATTRIBUTES,
        ServerPortCookie: PVOID,
        ConnectNotifyCallback: PFLT_CONNECT_NOTIFY,
        DisconnectNotifyCallback: PFLT_DISCONNECT_NOTIFY,
        MessageNotifyCallback: PFLT_MESSAGE_NOTIFY,
        MaxConnections: LONG,
    ) -> NTSTATUS;
    pub fn FltCloseCommunicationPort(ServerPort: PFLT_PORT);
    pub fn FltCloseClientPort(Filter: PFLT_FILTER, ClientPort: *mut PFLT_PORT);
    pub fn FltSendMessage(
        Filter: PFLT_FILTER,
        ClientPort: *mut PFLT_PORT,
        SenderBuffer: PVOID,
        SenderBufferLength: ULONG,
        ReplyBuffer: PVOID,
        ReplyLength: *mut ULONG,
        Timeout: *const LARGE_INTEGER,
    ) -> NTSTATUS;
}

// I/O requests, cancel-safe queues, symbolic links and object security (wdm.h, ntifs.h of WDK
// 10.0.22621; all exported by ntoskrnl.exe). IofCompleteRequest is FASTCALL in the header, which
// on x64 is the one calling convention ("system"). IRQL: IofCompleteRequest, the IoCsq routines
// and IoAcquireCancelSpinLock at most DISPATCH_LEVEL (IoCsqInitializeEx any level);
// IoReleaseCancelSpinLock exactly DISPATCH_LEVEL; ObOpenObjectByPointer at most APC_LEVEL;
// IoCreateSymbolicLink, IoDeleteSymbolicLink, ZwSetSecurityObject and ZwClose PASSIVE_LEVEL.
// IoCreateDeviceSecure is not among them: it lives in the static library wdmsec.lib, which a
// raw-dylib build cannot link, so named devices get their DACL through ObOpenObjectByPointer +
// ZwSetSecurityObject instead (see `crate::inverted`).
use super::irp::*;

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn IofCompleteRequest(Irp: *mut IRP, PriorityBoost: i8);
    pub fn IoAcquireCancelSpinLock(Irql: *mut KIRQL);
    pub fn IoReleaseCancelSpinLock(Irql: KIRQL);
    pub fn IoCsqInitializeEx(
        Csq: *mut IO_CSQ,
        CsqInsertIrp: PIO_CSQ_INSERT_IRP_EX,
        CsqRemoveIrp: PIO_CSQ_REMOVE_IRP,
        CsqPeekNextIrp: PIO_CSQ_PEEK_NEXT_IRP,
        CsqAcquireLock: PIO_CSQ_ACQUIRE_LOCK,
        CsqReleaseLock: PIO_CSQ_RELEASE_LOCK,
        CsqCompleteCanceledIrp: PIO_CSQ_COMPLETE_CANCELED_IRP,
    ) -> NTSTATUS;
    pub fn IoCsqInsertIrpEx(
        Csq: *mut IO_CSQ,
        Irp: *mut IRP,
        Context: *mut IO_CSQ_IRP_CONTEXT,
        InsertContext: PVOID,
    ) -> NTSTATUS;
    pub fn IoCsqRemoveNextIrp(Csq: *mut IO_CSQ, PeekContext: PVOID) -> *mut IRP;
    pub fn IoCreateSymbolicLink(
        SymbolicLinkName: *const UNICODE_STRING,
        DeviceName: *const UNICODE_STRING,
    ) -> NTSTATUS;
    pub fn IoDeleteSymbolicLink(SymbolicLinkName: *const UNICODE_STRING) -> NTSTATUS;
    /// `DesiredAccess` is an `ACCESS_MASK`; `PassedAccessState` a `PACCESS_STATE`; `ObjectType`
    /// a `POBJECT_TYPE`, which may be null for `KernelMode`.
    pub fn ObOpenObjectByPointer(
        Object: PVOID,
        HandleAttributes: ULONG,
        PassedAccessState: PVOID,
        DesiredAccess: u32,
        ObjectType: PVOID,
        AccessMode: KPROCESSOR_MODE,
        Handle: *mut HANDLE,
    ) -> NTSTATUS;
    /// `SecurityInformation` is a `SECURITY_INFORMATION`; `SecurityDescriptor` a
    /// `PSECURITY_DESCRIPTOR` in absolute or self-relative form.
    pub fn ZwSetSecurityObject(
        Handle: HANDLE,
        SecurityInformation: u32,
        SecurityDescriptor: PVOID,
    ) -> NTSTATUS;
    pub fn ZwClose(Handle: HANDLE) -> NTSTATUS;
}

// Pending by classify handle (fwpsk.h), for layers without a completion handle
// (ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT, ALE_ENDPOINT_CLOSURE). All at IRQL <= DISPATCH_LEVEL.
#[link(name = "fwpkclnt.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FwpsAcquireClassifyHandle0(
        classifyContext: *mut core::ffi::c_void,
        reserved: u32,
        classifyHandle: *mut u64,
    ) -> NTSTATUS;
    pub fn FwpsReleaseClassifyHandle0(classifyHandle: u64);
    pub fn FwpsPendClassify0(
        classifyHandle: u64,
        filterId: u64,
        flags: u32,
        classifyOut: *mut FWPS_CLASSIFY_OUT0,
    ) -> NTSTATUS;
    pub fn FwpsCompleteClassify0(
        classifyHandle: u64,
        flags: u32,
        classifyOut: *const FWPS_CLASSIFY_OUT0,
    );
}
