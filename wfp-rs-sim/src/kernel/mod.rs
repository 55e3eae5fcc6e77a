//! The host simulator: the kernel functions of [`wfp_rs::sys`], implemented in Rust.
//!
//! Every function here has the name and signature of the kernel routine it stands for, and
//! checks the rules Windows (with Driver Verifier) enforces: the IRQL it may be called at, the
//! state of the object it is given, and what a driver must have released by unload. A broken
//! rule stops the simulated machine with the real bug check code (see [`bugcheck`]), including
//! Driver Verifier's deadlock detection for spin locks (`deadlock.rs`) and the DPC watchdog for
//! a thread that stays at `DISPATCH_LEVEL` too long (`watchdog.rs`).
//!
//! [`FUNCTIONS`] is the table of them that `wfp_rs::sys` calls through once a machine has
//! installed it (`wfp_rs::sys` declares each signature, the table's field types check ours).
//!
//! State lives in a [`Kernel`] per simulated machine; a thread belongs to at most one machine at
//! a time and carries its own IRQL, like a processor.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

pub(crate) mod blocked;
pub(crate) mod bugcheck;
mod cng;
mod deadlock;
mod event;
pub(crate) mod flt;
mod global_alloc;
pub(crate) mod inject;
mod io;
pub(crate) mod irp;
mod irql;
pub(crate) mod packet;
mod pool;
pub(crate) mod process;
pub(crate) mod registry;
pub(crate) mod sched;
pub(crate) mod spin;
pub(crate) mod state;
pub(crate) mod stream;
pub(crate) mod timer;
mod watchdog;
pub(crate) mod wfp;

pub(crate) use deadlock::{forget_driver as forget_locks_of, remembered as remembered_locks};
pub(crate) use pool::kernel_free as kernel_free_block;

/// The simulated kernel, as the table `wfp_rs::sys` calls through: one implementation per kernel
/// function, each with the signature `wfp_rs::sys` declares for it (the table's field types
/// check that).
pub(crate) static FUNCTIONS: wfp_rs::__sim::KernelFunctions = wfp_rs::__sim::KernelFunctions {
    KeBugCheckEx: bugcheck::KeBugCheckEx,
    BCryptGenRandom: cng::BCryptGenRandom,
    KeClearEvent: event::KeClearEvent,
    KeInitializeEvent: event::KeInitializeEvent,
    KeSetEvent: event::KeSetEvent,
    KeWaitForSingleObject: event::KeWaitForSingleObject,
    FltBuildDefaultSecurityDescriptor: flt::FltBuildDefaultSecurityDescriptor,
    FltCloseClientPort: flt::FltCloseClientPort,
    FltCloseCommunicationPort: flt::FltCloseCommunicationPort,
    FltCreateCommunicationPort: flt::FltCreateCommunicationPort,
    FltFreeSecurityDescriptor: flt::FltFreeSecurityDescriptor,
    FltRegisterFilter: flt::FltRegisterFilter,
    FltSendMessage: flt::FltSendMessage,
    FltStartFiltering: flt::FltStartFiltering,
    FltUnregisterFilter: flt::FltUnregisterFilter,
    IoAllocateDriverObjectExtension: io::IoAllocateDriverObjectExtension,
    IoAllocateWorkItem: io::IoAllocateWorkItem,
    IoCreateDevice: io::IoCreateDevice,
    IoDeleteDevice: io::IoDeleteDevice,
    IoFreeWorkItem: io::IoFreeWorkItem,
    IoGetDriverObjectExtension: io::IoGetDriverObjectExtension,
    IoQueueWorkItem: io::IoQueueWorkItem,
    IoAcquireCancelSpinLock: irp::IoAcquireCancelSpinLock,
    IoCreateSymbolicLink: irp::IoCreateSymbolicLink,
    IoCsqInitializeEx: irp::IoCsqInitializeEx,
    IoCsqInsertIrpEx: irp::IoCsqInsertIrpEx,
    IoCsqRemoveNextIrp: irp::IoCsqRemoveNextIrp,
    IoDeleteSymbolicLink: irp::IoDeleteSymbolicLink,
    IoReleaseCancelSpinLock: irp::IoReleaseCancelSpinLock,
    IofCompleteRequest: irp::IofCompleteRequest,
    ObOpenObjectByPointer: irp::ObOpenObjectByPointer,
    ZwClose: irp::ZwClose,
    ZwSetSecurityObject: irp::ZwSetSecurityObject,
    KeCancelTimer: timer::KeCancelTimer,
    KeFlushQueuedDpcs: timer::KeFlushQueuedDpcs,
    KeInitializeDpc: timer::KeInitializeDpc,
    KeInitializeTimerEx: timer::KeInitializeTimerEx,
    KeSetTimerEx: timer::KeSetTimerEx,
    KeAcquireSpinLockRaiseToDpc: irql::KeAcquireSpinLockRaiseToDpc,
    KeGetCurrentIrql: irql::KeGetCurrentIrql,
    KeLowerIrql: irql::KeLowerIrql,
    KeReleaseSpinLock: irql::KeReleaseSpinLock,
    KfRaiseIrql: irql::KfRaiseIrql,
    ExAllocatePool2: pool::ExAllocatePool2,
    ExFreePoolWithTag: pool::ExFreePoolWithTag,
    ExFreePool: pool::ExFreePool,
    IoGetCurrentProcess: process::IoGetCurrentProcess,
    PsGetCurrentProcessId: process::PsGetCurrentProcessId,
    PsReferencePrimaryToken: process::PsReferencePrimaryToken,
    PsDereferencePrimaryToken: process::PsDereferencePrimaryToken,
    SeQueryInformationToken: process::SeQueryInformationToken,
    SeLocateProcessImageName: process::SeLocateProcessImageName,
    RtlEqualUnicodeString: process::RtlEqualUnicodeString,
    ZwOpenKey: registry::ZwOpenKey,
    ZwQueryValueKey: registry::ZwQueryValueKey,
    DbgPrintEx: state::DbgPrintEx,
    DbgQueryDebugFilterState: state::DbgQueryDebugFilterState,
    KeQueryInterruptTimePrecise: state::KeQueryInterruptTimePrecise,
    FwpmCalloutAdd0: wfp::FwpmCalloutAdd0,
    FwpmCalloutDeleteByKey0: wfp::FwpmCalloutDeleteByKey0,
    FwpmEngineClose0: wfp::FwpmEngineClose0,
    FwpmEngineOpen0: wfp::FwpmEngineOpen0,
    FwpmFilterAdd0: wfp::FwpmFilterAdd0,
    FwpmFilterDeleteById0: wfp::FwpmFilterDeleteById0,
    FwpmFilterDeleteByKey0: wfp::FwpmFilterDeleteByKey0,
    FwpmProviderAdd0: wfp::FwpmProviderAdd0,
    FwpmProviderDeleteByKey0: wfp::FwpmProviderDeleteByKey0,
    FwpmSubLayerAdd0: wfp::FwpmSubLayerAdd0,
    FwpmSubLayerDeleteByKey0: wfp::FwpmSubLayerDeleteByKey0,
    FwpmTransactionAbort0: wfp::FwpmTransactionAbort0,
    FwpmTransactionBegin0: wfp::FwpmTransactionBegin0,
    FwpmTransactionCommit0: wfp::FwpmTransactionCommit0,
    FwpsAcquireClassifyHandle0: wfp::FwpsAcquireClassifyHandle0,
    FwpsCalloutRegister3: wfp::FwpsCalloutRegister3,
    FwpsCalloutUnregisterById0: wfp::FwpsCalloutUnregisterById0,
    FwpsCompleteClassify0: wfp::FwpsCompleteClassify0,
    FwpsCompleteOperation0: wfp::FwpsCompleteOperation0,
    FwpsFlowAssociateContext0: wfp::FwpsFlowAssociateContext0,
    FwpsFlowRemoveContext0: wfp::FwpsFlowRemoveContext0,
    FwpsPendClassify0: wfp::FwpsPendClassify0,
    FwpsPendOperation0: wfp::FwpsPendOperation0,
    FwpsReleaseClassifyHandle0: wfp::FwpsReleaseClassifyHandle0,
    FwpsAcquireWritableLayerDataPointer0: wfp::FwpsAcquireWritableLayerDataPointer0,
    FwpsApplyModifiedLayerData0: wfp::FwpsApplyModifiedLayerData0,
    FwpsRedirectHandleCreate0: wfp::FwpsRedirectHandleCreate0,
    FwpsRedirectHandleDestroy0: wfp::FwpsRedirectHandleDestroy0,
    FwpsQueryConnectionRedirectState0: wfp::FwpsQueryConnectionRedirectState0,
    FwpsInjectionHandleCreate0: inject::FwpsInjectionHandleCreate0,
    FwpsInjectionHandleDestroy0: inject::FwpsInjectionHandleDestroy0,
    FwpsAllocateCloneNetBufferList0: inject::FwpsAllocateCloneNetBufferList0,
    FwpsFreeCloneNetBufferList0: inject::FwpsFreeCloneNetBufferList0,
    FwpsInjectTransportReceiveAsync0: inject::FwpsInjectTransportReceiveAsync0,
    FwpsInjectTransportSendAsync0: inject::FwpsInjectTransportSendAsync0,
    FwpsInjectNetworkSendAsync0: inject::FwpsInjectNetworkSendAsync0,
    FwpsInjectNetworkReceiveAsync0: inject::FwpsInjectNetworkReceiveAsync0,
    FwpsInjectForwardAsync0: inject::FwpsInjectForwardAsync0,
    FwpsQueryPacketInjectionState0: inject::FwpsQueryPacketInjectionState0,
    NdisRetreatNetBufferDataStart: inject::NdisRetreatNetBufferDataStart,
    NdisAdvanceNetBufferDataStart: inject::NdisAdvanceNetBufferDataStart,
};
