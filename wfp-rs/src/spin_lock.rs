//! Executive spin locks whose guard carries the IRQL they raise to.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use crate::irql::{AtMostDispatch, DispatchLevel};
use crate::sys;

/// A value protected by a kernel spin lock (`KSPIN_LOCK`).
///
/// Locking raises the IRQL to `DISPATCH_LEVEL`. [`lock`](Self::lock) therefore borrows the
/// caller's IRQL token *mutably* for as long as the guard lives: a `&PassiveLevel` cannot be used
/// (say, to wait or to send a message to user mode) while the lock is held. The guard hands out
/// a [`DispatchLevel`] token instead.
///
/// ```
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn count(irql: &mut PassiveLevel, hits: &SpinLock<u64>) -> u64 {
///     let mut guard = hits.lock(irql);
///     *guard += 1;
///     *guard
/// }
/// # wfp_rs::sim::Machine::new().run(|| {
/// # let hits = SpinLock::new(0);
/// # assert_eq!(PassiveLevel::try_current(|irql| count(irql, &hits)), Some(1));
/// # });
/// ```
///
/// The lower token is unusable while the guard lives:
///
/// ```compile_fail,E0502
/// use wfp_rs::irql::{AtMostApc, PassiveLevel};
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn wait_for_user_mode(_irql: &impl AtMostApc) {}
///
/// fn bad(irql: &mut PassiveLevel, lock: &SpinLock<u32>) {
///     let guard = lock.lock(irql);
///     wait_for_user_mode(irql); // still holding the lock at DISPATCH_LEVEL
///     drop(guard);
/// }
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
    /// Acquires the lock, raising the IRQL to `DISPATCH_LEVEL`. Wraps
    /// `KeAcquireSpinLockRaiseToDpc`; the guard's drop calls `KeReleaseSpinLock` with the IRQL
    /// seen on entry.
    ///
    /// Taking a lock that this processor already holds deadlocks on Windows; the simulator
    /// stops with `DRIVER_VERIFIER_DETECTED_VIOLATION` (0xC4, 0x1000: deadlock detection) instead.
    pub fn lock<'g, L: AtMostDispatch>(&'g self, irql: &'g mut L) -> SpinLockGuard<'g, T> {
        crate::irql::verify(irql);
        // SAFETY: the lock word belongs to this `SpinLock` and outlives the guard; the token
        // proves the IRQL is at most DISPATCH_LEVEL, as KeAcquireSpinLockRaiseToDpc requires.
        let old_irql = unsafe { sys::KeAcquireSpinLockRaiseToDpc(self.lock.get()) };
        SpinLockGuard {
            lock: self,
            old_irql,
            // SAFETY: the processor is at DISPATCH_LEVEL until the guard drops, and the caller's
            // own token is mutably borrowed for the guard's lifetime, so no other token of this
            // thread can lower the IRQL under it.
            token: unsafe { DispatchLevel::new_unchecked() },
            _not_send: PhantomData,
        }
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

/// Holds a [`SpinLock`] at `DISPATCH_LEVEL`; releasing it restores the IRQL seen on entry.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct SpinLockGuard<'g, T: ?Sized> {
    lock: &'g SpinLock<T>,
    old_irql: sys::KIRQL,
    token: DispatchLevel<'g>,
    // A spin lock must be released on the processor that acquired it.
    _not_send: PhantomData<*mut ()>,
}

impl<'g, T: ?Sized> SpinLockGuard<'g, T> {
    /// The proof that this processor is at `DISPATCH_LEVEL` while the lock is held.
    pub fn irql(&self) -> &DispatchLevel<'g> {
        &self.token
    }

    /// The same proof, mutably: to take a second lock while this one is held. The inner guard
    /// borrows this one, so locks are released in reverse order of acquisition.
    ///
    /// ```
    /// use wfp_rs::irql::PassiveLevel;
    /// use wfp_rs::spin_lock::SpinLock;
    ///
    /// fn transfer(irql: &mut PassiveLevel, from: &SpinLock<u32>, to: &SpinLock<u32>) {
    ///     let mut source = from.lock(irql);
    ///     let mut target = to.lock(source.irql_mut());
    ///     *target += 1;
    ///     drop(target);
    ///     *source -= 1;
    /// }
    /// # wfp_rs::sim::Machine::new().at_passive(|irql| {
    /// # let (a, b) = (SpinLock::new(1), SpinLock::new(0));
    /// # transfer(irql, &a, &b);
    /// # assert_eq!((a.into_inner(), b.into_inner()), (0, 1));
    /// # });
    /// ```
    pub fn irql_mut(&mut self) -> &mut DispatchLevel<'g> {
        &mut self.token
    }
}

impl<T: ?Sized> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T: ?Sized> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, and `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T: ?Sized> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard acquired the lock on this processor and has not released it;
        // `old_irql` is what KeAcquireSpinLockRaiseToDpc returned.
        unsafe { sys::KeReleaseSpinLock(self.lock.lock.get(), self.old_irql) }
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for SpinLockGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
