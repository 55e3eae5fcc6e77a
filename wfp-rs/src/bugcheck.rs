//! Bug check codes: how the machine stops when a driver breaks a kernel rule.
//!
//! On Windows, `KeBugCheckEx` stops the machine. In the simulator the same call prints the stop
//! code and ends the process, so a test can assert that a rule fires
//! (see `wfp_rs_sim::run_isolated` in the simulator backend).

use core::fmt;

use crate::irql::Irql;
use crate::sys;

/// A bug check code (the first argument of `KeBugCheckEx`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BugCheckCode(pub u32);

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:expr;)*) => {
        impl BugCheckCode {
            $($(#[$doc])* pub const $name: BugCheckCode = BugCheckCode($value);)*

            /// The symbolic name, as the debugger prints it.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// 0x5: a thread attached to a process it may not attach to (the classic result of calling
    /// `FltSendMessage` from `classifyFn` at `DISPATCH_LEVEL`).
    INVALID_PROCESS_ATTACH_ATTEMPT = 0x5;
    /// 0x9: the IRQL was raised to a level below the current one.
    IRQL_NOT_GREATER_OR_EQUAL = 0x9;
    /// 0xA: a routine was called, or memory touched, at an IRQL that is too high.
    IRQL_NOT_LESS_OR_EQUAL = 0xA;
    /// 0xF: a processor tried to acquire a spin lock it already holds.
    SPIN_LOCK_ALREADY_OWNED = 0xF;
    /// 0x10: a spin lock was released that the caller does not hold.
    SPIN_LOCK_NOT_OWNED = 0x10;
    /// 0x1E: a kernel-mode exception (here: a Rust panic in a driver) was not handled.
    KMODE_EXCEPTION_NOT_HANDLED = 0x1E;
    /// 0x44: an IRP was completed that is already completed (or is not an IRP); parameter 1 is
    /// its address.
    MULTIPLE_IRP_COMPLETE_REQUESTS = 0x44;
    /// 0xC2: a bad pool request (for example, freeing with the wrong tag).
    BAD_POOL_CALLER = 0xC2;
    /// 0xC4: Driver Verifier caught a violation; parameter 1 says which ([`verifier`]).
    DRIVER_VERIFIER_DETECTED_VIOLATION = 0xC4;
    /// 0xC7: a kernel timer or DPC was found in memory being freed. Parameter 1: 0 = a timer,
    /// 1 = a DPC, 2 = a DPC routine; parameter 2 its address; parameters 3 and 4 the freed range.
    TIMER_OR_DPC_INVALID = 0xC7;
    /// 0xC8: the IRQL is not what it should be, typically after a callback returned without
    /// restoring it.
    IRQL_UNEXPECTED_VALUE = 0xC8;
    /// 0xC9: Driver Verifier's I/O verification caught a misuse of an IRP; parameter 1 says
    /// which ([`iomanager`]).
    DRIVER_VERIFIER_IOMANAGER_VIOLATION = 0xC9;
    /// 0xCE: a driver unloaded while work it had queued was still pending.
    DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS = 0xCE;
    /// 0xE1: a work item routine returned at an IRQL other than `PASSIVE_LEVEL`.
    WORKER_THREAD_RETURNED_AT_BAD_IRQL = 0xE1;
    /// 0xE4: a work item was queued twice, or freed while queued.
    WORKER_INVALID = 0xE4;
    /// 0x133: a processor ran at `DISPATCH_LEVEL` or above too long — a single DPC past its
    /// allotment (parameter 1 = 0) or too long without a break (parameter 1 = 1: the DPC
    /// watchdog; parameter 2 is its period in clock ticks).
    DPC_WATCHDOG_VIOLATION = 0x133;
    /// 0x1D3: a WFP callout performed an invalid operation.
    WFP_INVALID_OPERATION = 0x1D3;
}

impl fmt::Debug for BugCheckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#X})", self.0),
            None => write!(f, "BugCheckCode({:#X})", self.0),
        }
    }
}

impl fmt::Display for BugCheckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Parameter 1 values of [`BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION`].
pub mod verifier {
    /// A zero-byte pool allocation was requested.
    pub const ZERO_BYTE_ALLOCATION: usize = 0x00;
    /// Paged pool was allocated above `APC_LEVEL`.
    pub const PAGED_ALLOCATION_ABOVE_APC: usize = 0x01;
    /// Non-paged pool was allocated above `DISPATCH_LEVEL`.
    pub const NONPAGED_ALLOCATION_ABOVE_DISPATCH: usize = 0x02;
    /// An address that no allocation returned was freed.
    pub const FREE_OF_UNALLOCATED_ADDRESS: usize = 0x10;
    /// Paged pool was freed above `APC_LEVEL`.
    pub const PAGED_FREE_ABOVE_APC: usize = 0x11;
    /// Non-paged pool was freed above `DISPATCH_LEVEL`.
    pub const NONPAGED_FREE_ABOVE_DISPATCH: usize = 0x12;
    /// Pool that was already freed was freed again.
    pub const DOUBLE_FREE: usize = 0x13;
    /// `KeRaiseIrql` to a level below the current one.
    pub const RAISE_IRQL_TO_LOWER_LEVEL: usize = 0x30;
    /// `KeLowerIrql` to a level above the current one.
    pub const LOWER_IRQL_TO_HIGHER_LEVEL: usize = 0x31;
    /// The driver unloaded without freeing all its pool allocations; parameter 4 is the count.
    pub const POOL_LEAKED_AT_UNLOAD: usize = 0x62;
    /// `KeReleaseSpinLock` called at an IRQL other than `DISPATCH_LEVEL`; parameter 2 is the
    /// IRQL, parameter 3 the lock.
    pub const RELEASE_SPIN_LOCK_NOT_AT_DISPATCH: usize = 0x32;
    /// Deadlock detection: a processor acquired a spin lock it already holds (self-deadlock);
    /// parameter 2 is the lock.
    pub const DEADLOCK_SELF: usize = 0x1000;
    /// Deadlock detection: a lock hierarchy violation — the acquisition closes a cycle in the
    /// order locks have been taken in; parameter 2 is the lock being acquired (the "final
    /// cause"), parameter 3 (reserved in Microsoft's reference; the simulator's choice) the
    /// held lock the cycle closes with.
    pub const DEADLOCK_LOCK_ORDER: usize = 0x1001;
    /// Deadlock detection: a spin lock was released by another processor than the one that
    /// holds it; parameter 2 is the lock, 3 the owner's thread, 4 the releasing thread.
    pub const DEADLOCK_WRONG_THREAD_RELEASE: usize = 0x1004;
    /// Deadlock detection: a spin lock nobody holds was released; parameter 2 is the lock.
    pub const DEADLOCK_UNACQUIRED_RELEASE: usize = 0x1007;
}

/// Parameter 4 values of the simulator's
/// [`BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`] stop for a wait at
/// unload that gave up (`Machine::set_unload_wait_limit` in the simulator). On Windows such a
/// wait never returns and unload hangs (INFERRED: Windows has no bug check for it); the simulator
/// stops with 0xCE because the work the driver waits for is work left pending at unload.
/// Parameter 1 is the object waited on, parameter 2 is 0, parameter 3 a routine that is still
/// running (0 if none is known).
pub mod unload_wait {
    /// `KeWaitForSingleObject` with no timeout in `DriverEntry` or the unload routine (the SDK's
    /// unload waits for work items and `WorkQueue` handles this way); parameter 1 is the event.
    pub const EVENT: usize = 1;
    /// The I/O manager waited for work item routines that had not returned after the unload
    /// routine did; parameter 1 is the work item (0 if its routine freed it, as the SDK's do),
    /// parameter 3 the routine of one that is blocked in a wait (0 if none is).
    pub const WORK_ITEM_ROUTINES: usize = 2;
    /// `FwpsCalloutUnregisterById0` waited for calls into the callout that did not return;
    /// parameter 1 is the callout id.
    pub const CALLOUT_CALLS: usize = 3;
    /// `FltSendMessage` with no timeout waited for user mode to receive or answer; parameter 1
    /// is the client port.
    pub const PORT_MESSAGE: usize = 4;
    /// A filter engine write with an infinite transaction wait timeout waited for another
    /// session's transaction; parameter 1 is the waiting session's handle.
    pub const TRANSACTION: usize = 5;
    /// `FltUnregisterFilter` waited for `ConnectNotify` or `DisconnectNotify` calls (a process
    /// connecting or disconnecting) that did not return; parameter 1 is the filter.
    pub const PORT_CALLBACKS: usize = 6;
    /// The I/O manager's unload waited for dispatch or cancel routines still running on other
    /// threads (a service's requests); parameter 2 is how many.
    pub const DISPATCH_ROUTINES: usize = 7;
}

/// Parameter 1 values of [`BugCheckCode::DRIVER_VERIFIER_IOMANAGER_VIOLATION`], as the bug check
/// reference lists them (codes 0x200 and up are the "WDM DRIVER ERROR" I/O verification codes).
pub mod iomanager {
    /// The IRQL changed across a call to a dispatch routine; parameters 2-4: device object, IRQL
    /// before, IRQL after.
    pub const IRQL_CHANGED_BY_DISPATCH: usize = 0x05;
    /// `IoCompleteRequest` with a status of `STATUS_PENDING` (or -1); parameter 2 is the status,
    /// 3 the IRP.
    pub const COMPLETED_WITH_PENDING_STATUS: usize = 0x06;
    /// `IoCompleteRequest` while the IRP's cancel routine was still set; parameter 2 is the
    /// cancel routine, 3 the IRP.
    pub const COMPLETED_WITH_CANCEL_ROUTINE: usize = 0x07;
    /// `IoCompleteRequest` above `DISPATCH_LEVEL`; parameter 2 is the IRQL, 3 the IRP.
    pub const COMPLETED_ABOVE_DISPATCH: usize = 0x0E;
    /// An I/O verification error without a code of its own.
    pub const UNKNOWN: usize = 0x200;
    /// A dispatch routine returned a status other than the one it completed the IRP with;
    /// parameter 3 is the IRP, 4 the status it was completed with.
    pub const STATUS_MISMATCH: usize = 0x224;
    /// A dispatch routine returned without completing the IRP and without returning
    /// `STATUS_PENDING`; parameter 3 is the IRP.
    pub const NOT_COMPLETED_NOR_PENDING: usize = 0x226;
    /// A dispatch routine returned `STATUS_PENDING` without `IoMarkIrpPending`; parameter 3 is
    /// the IRP.
    pub const PENDING_NOT_MARKED: usize = 0x23D;
    /// A dispatch routine marked the IRP pending but did not return `STATUS_PENDING`; parameter
    /// 3 is the IRP, 4 the status it returned.
    pub const MARKED_PENDING_NOT_RETURNED: usize = 0x23E;
}

/// Stops the machine. Wraps `KeBugCheckEx`.
pub fn bug_check(code: BugCheckCode, p1: usize, p2: usize, p3: usize, p4: usize) -> ! {
    // SAFETY: KeBugCheckEx may be called at any IRQL and does not return.
    unsafe { sys::KeBugCheckEx(code.0, p1, p2, p3, p4) }
}

/// `IRQL_NOT_LESS_OR_EQUAL` for code that found itself above the IRQL it needs. Parameters as
/// the simulator's routine checks give them: address 0, the current IRQL, 8 (execute), 0.
pub(crate) fn irql_not_less_or_equal(now: Irql) -> ! {
    bug_check(
        BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
        0,
        now.0 as usize,
        8,
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn codes_have_their_debugger_names() {
        assert_eq!(BugCheckCode::IRQL_NOT_LESS_OR_EQUAL.0, 0xA);
        assert_eq!(
            BugCheckCode(0xC4).name(),
            Some("DRIVER_VERIFIER_DETECTED_VIOLATION")
        );
        assert_eq!(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS.to_string(),
            "DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS (0xCE)"
        );
        assert_eq!(BugCheckCode(0x1234).to_string(), "BugCheckCode(0x1234)");
    }
}
