//! The host simulator: the kernel functions of [`crate::sys`], implemented in Rust.
//!
//! Every function here has the name and signature of the kernel routine it stands for, and
//! checks the rules Windows (with Driver Verifier) enforces: the IRQL it may be called at, the
//! state of the object it is given, and what a driver must have released by unload. A broken
//! rule stops the simulated machine with the real bug check code (see [`bugcheck`]), including
//! Driver Verifier's deadlock detection for spin locks (`deadlock.rs`) and the DPC watchdog for
//! a thread that stays at `DISPATCH_LEVEL` too long (`watchdog.rs`).
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

pub(crate) mod bugcheck;
mod deadlock;
mod event;
pub(crate) mod flt;
mod global_alloc;
mod io;
pub(crate) mod irp;
mod irql;
pub(crate) mod kernel;
mod pool;
mod watchdog;
pub(crate) mod wfp;

pub(crate) use deadlock::{forget_driver as forget_locks_of, remembered as remembered_locks};
pub(crate) use pool::kernel_free as kernel_free_block;

/// The functions the safe layer calls, under their kernel names.
pub mod exports {
    pub use super::bugcheck::KeBugCheckEx;
    pub use super::event::{KeClearEvent, KeInitializeEvent, KeSetEvent, KeWaitForSingleObject};
    pub use super::flt::{
        FltBuildDefaultSecurityDescriptor, FltCloseClientPort, FltCloseCommunicationPort,
        FltCreateCommunicationPort, FltFreeSecurityDescriptor, FltRegisterFilter, FltSendMessage,
        FltStartFiltering, FltUnregisterFilter,
    };
    pub use super::io::{
        IoAllocateDriverObjectExtension, IoAllocateWorkItem, IoCreateDevice, IoDeleteDevice,
        IoFreeWorkItem, IoGetDriverObjectExtension, IoQueueWorkItem,
    };
    pub use super::irp::{
        IoAcquireCancelSpinLock, IoCreateSymbolicLink, IoCsqInitializeEx, IoCsqInsertIrpEx,
        IoCsqRemoveNextIrp, IoDeleteSymbolicLink, IoReleaseCancelSpinLock, IofCompleteRequest,
        ObOpenObjectByPointer, ZwClose, ZwSetSecurityObject,
    };
    pub use super::irql::{
        KeAcquireSpinLockRaiseToDpc, KeGetCurrentIrql, KeLowerIrql, KeReleaseSpinLock, KfRaiseIrql,
    };
    pub use super::kernel::{DbgPrintEx, KeQueryInterruptTimePrecise};
    pub use super::pool::{ExAllocatePool2, ExFreePoolWithTag};
    pub use super::wfp::{
        FwpmCalloutAdd0, FwpmCalloutDeleteByKey0, FwpmEngineClose0, FwpmEngineOpen0,
        FwpmFilterAdd0, FwpmFilterDeleteById0, FwpmProviderAdd0, FwpmProviderDeleteByKey0,
        FwpmSubLayerAdd0, FwpmSubLayerDeleteByKey0, FwpmTransactionAbort0, FwpmTransactionBegin0,
        FwpmTransactionCommit0, FwpsAcquireClassifyHandle0, FwpsCalloutRegister3,
        FwpsCalloutUnregisterById0, FwpsCompleteClassify0, FwpsCompleteOperation0,
        FwpsFlowAssociateContext0, FwpsFlowRemoveContext0, FwpsPendClassify0, FwpsPendOperation0,
        FwpsReleaseClassifyHandle0,
    };
}
