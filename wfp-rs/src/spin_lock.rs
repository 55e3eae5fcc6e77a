//! Executive spin locks, held for the duration of a closure that receives the value and the
//! IRQL token of the raised level.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;

use crate::irql::{DispatchLevel, RaiseIrql};
use crate::sys;

/// A value protected by a kernel spin lock (`KSPIN_LOCK`).
///
/// Locking raises the IRQL to `DISPATCH_LEVEL`. [`lock`](Self::lock) therefore takes the caller's
/// IRQL token borrowed exclusively ([`RaiseIrql`]: `&mut PassiveLevel`, `&mut ApcLevel` or `&mut
/// DispatchLevel`) and runs a closure with the value and a `&mut DispatchLevel`; the lock is
/// released and the IRQL restored when the closure returns. The caller's token cannot be used
/// (say, to wait or to send a message to user mode) while the lock is held, and no guard exists
/// that could be leaked with the lock still held.
///
/// ```
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn count(irql: &mut PassiveLevel, hits: &SpinLock<u64>) -> u64 {
///     hits.lock(irql, |hits, _irql| {
///         *hits += 1;
///         *hits
///     })
/// }
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// # let hits = SpinLock::new(0);
/// # assert_eq!(count(irql, &hits), 1);
/// # });
/// ```
///
/// The caller's token is unusable inside the closure:
///
/// ```compile_fail,E0502
/// use wfp_rs::irql::{AtMostApc, PassiveLevel};
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn wait_for_user_mode(_irql: &impl AtMostApc) {}
///
/// fn bad(irql: &mut PassiveLevel, lock: &SpinLock<u32>) {
///     lock.lock(&mut *irql, |_, _| {
///         wait_for_user_mode(irql); // still holding the lock at DISPATCH_LEVEL
///     });
/// }
/// ```
///
/// To take a second lock while holding one, lock it with the token the first closure receives;
/// the locks are released in reverse order of acquisition:
///
/// ```
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn transfer(irql: &mut PassiveLevel, from: &SpinLock<u32>, to: &SpinLock<u32>) {
///     from.lock(irql, |source, irql| {
///         to.lock(irql, |target, _| *target += 1);
///         *source -= 1;
///     });
/// }
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// # let (a, b) = (SpinLock::new(1), SpinLock::new(0));
/// # transfer(irql, &a, &b);
/// # assert_eq!((a.into_inner(), b.into_inner()), (0, 1));
/// # });
/// ```
pub struct SpinLock<T: ?Sized> {
    lock: UnsafeCell<sys::KSPIN_LOCK>,
    value: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `value`, so sharing the lock shares `T` only with
// one holder at a time, which needs `T: Send` (as for `std::sync::Mutex`).
unsafe impl<T: ?Sized + Send> Sync for SpinLock<T> {}
// SAFETY: moving the lock moves `T`; an unlocked `KSPIN_LOCK` is plain data with no address
// identity.
unsafe impl<T: ?Sized + Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// Creates an unlocked spin lock (`KeInitializeSpinLock`).
    pub const fn new(value: T) -> Self {
        SpinLock {
            lock: UnsafeCell::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Initialises an unlocked lock at `this`, and its value in place with `init_value` (given
    /// a pointer to the value), without building either on the stack.
    ///
    /// # Safety
    ///
    /// `this` must be valid for writes and aligned; `init_value` must leave the value it is
    /// given a pointer to fully initialised, without reading it first.
    pub(crate) unsafe fn init_in_place(this: *mut SpinLock<T>, init_value: impl FnOnce(*mut T))
    where
        T: Sized,
    {
        // SAFETY: `this` is valid and aligned (the contract); the projection creates no reference.
        let lock = unsafe { &raw mut (*this).lock };
        // SAFETY: valid for writes (the contract); an unlocked KSPIN_LOCK is 0, as in `new`.
        unsafe { UnsafeCell::raw_get(lock).write(0) };
        // SAFETY: as for `lock`.
        let value = unsafe { &raw mut (*this).value };
        init_value(UnsafeCell::raw_get(value));
    }

    /// Consumes the lock and returns the value.
    pub fn into_inner(self) -> T {
        self.value.into_inner()
    }
}

impl<T: ?Sized> SpinLock<T> {
    /// Acquires the lock, raising the IRQL to `DISPATCH_LEVEL`, runs `f` with the value and a
    /// `DISPATCH_LEVEL` token, then releases the lock and restores the IRQL seen on entry — also
    /// if `f` unwinds (in the simulator; kernel code does not unwind). Wraps
    /// `KeAcquireSpinLockRaiseToDpc` and `KeReleaseSpinLock`.
    ///
    /// `irql` is the caller's token borrowed exclusively (`&mut PassiveLevel`, `&mut ApcLevel` or
    /// `&mut DispatchLevel`); it stays borrowed for the call, so nothing can use it at the raised
    /// IRQL. Passing it moves the borrow: pass `&mut *irql` to use the token again afterwards.
    /// The closure's token takes further locks (nested, released in reverse order).
    ///
    /// Taking a lock that this processor already holds deadlocks on Windows; the simulator
    /// stops with `DRIVER_VERIFIER_DETECTED_VIOLATION` (0xC4, 0x1000: deadlock detection) instead.
    pub fn lock<R>(
        &self,
        irql: impl RaiseIrql,
        f: impl FnOnce(&mut T, &mut DispatchLevel<'_>) -> R,
    ) -> R {
        crate::irql::verify(&irql);
        // SAFETY: the lock word belongs to this `SpinLock`, which outlives the call; the token
        // proves the IRQL is at most DISPATCH_LEVEL, as KeAcquireSpinLockRaiseToDpc requires.
        let old_irql = unsafe { sys::KeAcquireSpinLockRaiseToDpc(self.lock.get()) };
        // Releases on return and on unwind; private, so it cannot be leaked.
        let held = Held {
            lock: &self.lock,
            old_irql,
            _not_send: PhantomData,
        };
        // SAFETY: the processor is at DISPATCH_LEVEL until `held` drops, after `f` returns; the
        // caller's own token is exclusively borrowed (`irql`, kept alive below) for the whole
        // call, and the token lives only for the call of `f`.
        let mut token = unsafe { DispatchLevel::new_unchecked() };
        // SAFETY: the lock is held, so no other reference to the value exists; the reference
        // lives only for the call of `f`, within the lock.
        let value = unsafe { &mut *self.value.get() };
        let result = f(value, &mut token);
        drop(held);
        drop(irql);
        result
    }

    /// Mutable access without locking: `&mut self` proves no one else holds the lock.
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

impl<T: Default> Default for SpinLock<T> {
    fn default() -> Self {
        SpinLock::new(T::default())
    }
}

impl<T: ?Sized> fmt::Debug for SpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock").finish_non_exhaustive()
    }
}

/// The lock held by [`SpinLock::lock`]; dropping it releases the lock and restores the IRQL.
struct Held<'g> {
    lock: &'g UnsafeCell<sys::KSPIN_LOCK>,
    old_irql: sys::KIRQL,
    // A spin lock must be released on the processor that acquired it.
    _not_send: PhantomData<*mut ()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // SAFETY: `SpinLock::lock` acquired the lock on this processor and has not released it;
        // `old_irql` is what KeAcquireSpinLockRaiseToDpc returned.
        unsafe { sys::KeReleaseSpinLock(self.lock.get(), self.old_irql) }
    }
}
