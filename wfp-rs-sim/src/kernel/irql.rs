//! IRQL and spin locks on simulated processors.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::sync::atomic::{AtomicUsize, Ordering};

use super::bugcheck::stop;
use super::state::{THREAD, irql, level_name, set_irql};
use wfp_rs::bugcheck::{BugCheckCode, verifier};
use wfp_rs::sys::*;

/// `KeGetCurrentIrql`.
pub extern "system" fn KeGetCurrentIrql() -> KIRQL {
    irql()
}

/// `KfRaiseIrql` (`KeRaiseIrql`). Raising to a lower level is a verifier violation.
///
/// # Safety
///
/// As in the kernel: the caller must lower the IRQL again with the returned value.
pub unsafe extern "system" fn KfRaiseIrql(NewIrql: KIRQL) -> KIRQL {
    let old = irql();
    if NewIrql < old || NewIrql > HIGH_LEVEL {
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::RAISE_IRQL_TO_LOWER_LEVEL,
                old as usize,
                NewIrql as usize,
                0,
            ],
            &format!("KeRaiseIrql from {old} to {NewIrql}, which is not a raise"),
        );
    }
    set_irql(NewIrql);
    old
}

/// `KeLowerIrql`. Lowering to a higher level is a verifier violation.
///
/// # Safety
///
/// As in the kernel: `NewIrql` must be the value saved by the matching raise.
pub unsafe extern "system" fn KeLowerIrql(NewIrql: KIRQL) {
    let now = irql();
    if NewIrql > now {
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::LOWER_IRQL_TO_HIGHER_LEVEL,
                now as usize,
                NewIrql as usize,
                0,
            ],
            &format!("KeLowerIrql from {now} to {NewIrql}, which is not a lowering"),
        );
    }
    set_irql(NewIrql);
}

/// The lock word holds 0 when free and the owner's simulated thread id when held, so the
/// verifier can tell who holds it.
fn word<'a>(lock: *mut KSPIN_LOCK) -> &'a AtomicUsize {
    // SAFETY: callers pass a valid, aligned KSPIN_LOCK that outlives the call (the routine's
    // contract); KSPIN_LOCK is a usize, which AtomicUsize shares the layout of, and every
    // access to it goes through these atomics.
    unsafe { AtomicUsize::from_ptr(lock) }
}

/// `KeAcquireSpinLockRaiseToDpc`. Driver Verifier's deadlock detection runs first (see
/// `deadlock.rs`): acquiring a lock this processor holds stops with 0xC4 / 0x1000, an
/// acquisition that closes a cycle in the order locks have been taken in with 0xC4 / 0x1001.
///
/// # Safety
///
/// `SpinLock` must point to an initialised `KSPIN_LOCK` that outlives the hold.
pub unsafe extern "system" fn KeAcquireSpinLockRaiseToDpc(SpinLock: *mut KSPIN_LOCK) -> KIRQL {
    let _kernel = super::state::KernelCode::enter();
    // One look at the thread's state for the whole acquisition: this runs for every spin lock.
    THREAD.with(|t| {
        let old = t.irql.get();
        super::state::require_irql_at("KeAcquireSpinLockRaiseToDpc", old, DISPATCH_LEVEL);
        let me = t.id as usize;
        let lock = word(SpinLock);
        super::deadlock::before_acquire(t, SpinLock as usize);
        let machine = super::sched::any_live().then(|| t.kernel.borrow());
        let sched = machine
            .as_ref()
            .and_then(|k| k.as_ref())
            .and_then(|k| k.sched.as_deref());
        if let Some(sched) = sched {
            sched.point("KeAcquireSpinLock");
        }
        t.irql.set(DISPATCH_LEVEL);
        super::watchdog::track(t);
        let mut spins = 0u32;
        while lock
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            if let Some(sched) = sched {
                // The holder is another task: only it can release the lock, so this processor
                // waits until another task has made progress.
                sched.block("KeAcquireSpinLock: spins on a held lock", None);
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                // The holder is a host thread the host may have preempted; let it run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Some(sched) = sched {
            sched.progressed();
        }
        super::deadlock::acquired(t, SpinLock as usize);
        old
    })
}

/// `KeReleaseSpinLock`. Releasing a lock nobody holds stops with 0xC4 / 0x1007, one another
/// processor holds with 0xC4 / 0x1004 (deadlock detection, see `deadlock.rs`).
///
/// # Safety
///
/// `SpinLock` must be held by this processor; `NewIrql` must be the value its acquisition
/// returned.
pub unsafe extern "system" fn KeReleaseSpinLock(SpinLock: *mut KSPIN_LOCK, NewIrql: KIRQL) {
    let _kernel = super::state::KernelCode::enter();
    let now = irql();
    if now != DISPATCH_LEVEL {
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::RELEASE_SPIN_LOCK_NOT_AT_DISPATCH,
                now as usize,
                SpinLock as usize,
                0,
            ],
            &format!(
                "KeReleaseSpinLock at IRQL {now} ({}); it must be called at DISPATCH_LEVEL",
                level_name(now)
            ),
        );
    }
    let me = super::state::thread_id() as usize;
    let lock = word(SpinLock);
    if let Err(owner) = lock.compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed) {
        if owner == 0 {
            stop(
                BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
                [
                    verifier::DEADLOCK_UNACQUIRED_RELEASE,
                    SpinLock as usize,
                    0,
                    0,
                ],
                "deadlock detection: KeReleaseSpinLock on a spin lock nobody holds",
            );
        }
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::DEADLOCK_WRONG_THREAD_RELEASE,
                SpinLock as usize,
                owner,
                me,
            ],
            &format!(
                "deadlock detection: KeReleaseSpinLock on a spin lock another processor (thread {owner}) holds"
            ),
        );
    }
    THREAD.with(|t| super::deadlock::released(t, SpinLock as usize));
    // SAFETY: the lock was released; lowering to the saved level is the routine's own contract.
    unsafe { KeLowerIrql(NewIrql) };
    if super::sched::any_live() {
        THREAD.with(|t| {
            if let Some(sched) = t.kernel.borrow().as_ref().and_then(|k| k.sched.as_deref()) {
                sched.point("KeReleaseSpinLock");
            }
        });
    }
}
