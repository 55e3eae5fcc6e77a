//! IRQL in the type system.
//!
//! Windows runs kernel code at an *interrupt request level*. Code at `DISPATCH_LEVEL` may not
//! wait, touch pageable memory or call routines documented for `PASSIVE_LEVEL`/`APC_LEVEL`; if it
//! does, the machine bugchecks, sometimes only under load. The classic case is a WFP `classifyFn`
//! (which may run at `DISPATCH_LEVEL`) calling `FltSendMessage` (at most `APC_LEVEL`).
//!
//! This module turns those rules into types:
//!
//! - A token proves an upper bound on the current IRQL for as long as it is borrowed:
//!   [`PassiveLevel`] (IRQL is `PASSIVE_LEVEL`), [`ApcLevel`] (at most `APC_LEVEL`) and
//!   [`DispatchLevel`] (at most `DISPATCH_LEVEL`; the SDK treats it as "may be exactly
//!   `DISPATCH_LEVEL`").
//! - An API states the weakest bound it needs with a sealed trait: [`AtMostApc`] or
//!   [`AtMostDispatch`]; an API that needs `PASSIVE_LEVEL` takes `&PassiveLevel`.
//! - Tokens are handed out by the SDK's trampolines (driver entry, unload and work items get
//!   `&PassiveLevel`; WFP callbacks get `&DispatchLevel`), by a [`SpinLockGuard`], or by the
//!   checked [`try_current`](PassiveLevel::try_current) and `unsafe` `assume` functions.
//! - Raising the IRQL borrows the lower token mutably ([`SpinLock::lock`]), so the lower token
//!   cannot be used while the IRQL is raised.
//!
//! ```compile_fail
//! use wfp_rs::irql::{AtMostApc, DispatchLevel};
//!
//! fn wants_apc(_irql: &impl AtMostApc) {}
//!
//! fn classify(irql: &DispatchLevel) {
//!     wants_apc(irql); // error: `DispatchLevel` may be DISPATCH_LEVEL
//! }
//! ```
//!
//! [`SpinLock::lock`]: crate::spin_lock::SpinLock::lock
//! [`SpinLockGuard`]: crate::spin_lock::SpinLockGuard

use core::fmt;
use core::marker::PhantomData;

use crate::sys;

/// A run-time IRQL value, as returned by `KeGetCurrentIrql`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Irql(pub u8);

impl Irql {
    /// `PASSIVE_LEVEL` (0): threads run here; everything may be called.
    pub const PASSIVE: Irql = Irql(sys::PASSIVE_LEVEL);
    /// `APC_LEVEL` (1): asynchronous procedure calls are masked.
    pub const APC: Irql = Irql(sys::APC_LEVEL);
    /// `DISPATCH_LEVEL` (2): the scheduler is masked; no waiting, no paged memory.
    pub const DISPATCH: Irql = Irql(sys::DISPATCH_LEVEL);
    /// `HIGH_LEVEL` (15 on x64).
    pub const HIGH: Irql = Irql(sys::HIGH_LEVEL);

    /// The IRQL of the calling processor. Wraps `KeGetCurrentIrql`.
    ///
    /// ```
    /// # wfp_rs::sim::Machine::new().run(|| {
    /// use wfp_rs::irql::Irql;
    /// assert_eq!(Irql::current(), Irql::PASSIVE);
    /// # });
    /// ```
    pub fn current() -> Irql {
        Irql(sys::KeGetCurrentIrql())
    }

    /// The C name of the level (`"DISPATCH_LEVEL"`), or `None` for a device level.
    pub const fn name(self) -> Option<&'static str> {
        match self.0 {
            sys::PASSIVE_LEVEL => Some("PASSIVE_LEVEL"),
            sys::APC_LEVEL => Some("APC_LEVEL"),
            sys::DISPATCH_LEVEL => Some("DISPATCH_LEVEL"),
            sys::HIGH_LEVEL => Some("HIGH_LEVEL"),
            _ => None,
        }
    }
}

impl fmt::Debug for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Irql({})", self.0),
        }
    }
}

impl fmt::Display for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Names the reason a token is neither `Send` nor `Sync` in the compiler's error: the IRQL is a
/// property of one processor, and a token moved to another thread would prove nothing there.
pub struct ThisProcessorOnly(PhantomData<*mut ()>);

/// Makes a token type: zero-sized, `!Send`, `!Sync`, invariant in its lifetime, and not
/// constructible outside this crate.
macro_rules! token {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name<'a> {
            // `*mut ()` makes the token neither `Send` nor `Sync`: the IRQL is a property of one
            // processor, and a token moved to another thread would prove nothing there.
            // `fn(&'a ()) -> &'a ()` makes `'a` invariant so a token cannot be coerced to live
            // longer than the frame that minted it.
            _not_send: PhantomData<ThisProcessorOnly>,
            _scope: PhantomData<fn(&'a ()) -> &'a ()>,
        }

        impl $name<'_> {
            /// Mints a token without any check.
            ///
            /// # Safety
            ///
            /// The current IRQL must satisfy the token's bound for the whole lifetime of the
            /// token, and no other token of this thread may be used to raise the IRQL while it
            /// lives.
            pub(crate) const unsafe fn new_unchecked() -> Self {
                $name { _not_send: PhantomData, _scope: PhantomData }
            }
        }

        impl fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($name))
            }
        }
    };
}

token! {
    /// Proof that the current IRQL is `PASSIVE_LEVEL`.
    ///
    /// # Invariants
    ///
    /// While a `&PassiveLevel` is usable, the current processor runs at `PASSIVE_LEVEL`: the
    /// only safe way to raise the IRQL is through an API that borrows this token mutably
    /// (such as [`SpinLock::lock`](crate::spin_lock::SpinLock::lock)), which makes the token
    /// unusable until the IRQL is lowered again.
    ///
    /// The SDK hands this token to `DriverEntry`, to the unload routine and to work items.
    /// Safe code cannot create one:
    ///
    /// ```compile_fail
    /// let token = wfp_rs::irql::PassiveLevel { _not_send: Default::default(), _scope: Default::default() };
    /// ```
    PassiveLevel
}

token! {
    /// Proof that the current IRQL is at most `APC_LEVEL`.
    ///
    /// # Invariants
    ///
    /// As for [`PassiveLevel`], with the bound `APC_LEVEL`.
    ApcLevel
}

token! {
    /// Proof that the current IRQL is at most `DISPATCH_LEVEL`.
    ///
    /// WFP callbacks (`classifyFn`, `notifyFn`, `flowDeleteFn`, completion callbacks) receive
    /// `&DispatchLevel`: they *may* run at `DISPATCH_LEVEL`, so they are written as if they
    /// always did. A spin lock guard hands one out while the lock is held.
    ///
    /// # Invariants
    ///
    /// While a `&DispatchLevel` is usable, the current processor runs at an IRQL of at most
    /// `DISPATCH_LEVEL`.
    DispatchLevel
}

/// The checked ways to obtain a token, for code the SDK did not call with one.
macro_rules! checked_constructors {
    ($name:ident, $bound:expr, $level:literal) => {
        impl<'a> $name<'a> {
            #[doc = concat!("Runs `f` with a `", stringify!($name), "` token if the current IRQL is at most `", $level, "`; returns `None` without calling `f` otherwise.")]
            ///
            /// This is the checked way to obtain a token in code the SDK did not call with one (a
            /// library function, a callback registered by other means). Hold one token per
            /// thread at a time: a token proves the IRQL it saw, and raising the IRQL through
            /// *another* token while this one lives is not something the compiler can see. The
            /// simulator checks the IRQL again in every kernel routine and stops such code with a
            /// bug check.
            ///
            /// ```
            /// # wfp_rs::sim::Machine::new().run(|| {
            #[doc = concat!("let ran = wfp_rs::irql::", stringify!($name), "::try_current(|_irql| 42);")]
            /// assert_eq!(ran, Some(42)); // the harness runs at PASSIVE_LEVEL
            /// # });
            /// ```
            pub fn try_current<R>(f: impl for<'t> FnOnce(&'t mut $name<'t>) -> R) -> Option<R> {
                if Irql::current() > $bound {
                    return None;
                }
                // SAFETY: the IRQL is within the bound now; the token lives only for the call of
                // `f`, and safe code can raise the IRQL only through `&mut` of a token, which `f`
                // is given.
                let mut token = unsafe { $name::new_unchecked() };
                Some(f(&mut token))
            }

            /// Creates a token, checking the IRQL in debug builds (and always in the simulator),
            /// where a wrong assumption stops the machine with `IRQL_NOT_LESS_OR_EQUAL`.
            ///
            /// # Safety
            ///
            #[doc = concat!("The caller guarantees that the IRQL is at most `", $level, "` for all of `'a`, and that no other token of this thread is used to raise the IRQL while the returned token lives.")]
            pub unsafe fn assume() -> $name<'a> {
                assume_check($bound, concat!(stringify!($name), "::assume"));
                // SAFETY: forwarded to the caller.
                unsafe { $name::new_unchecked() }
            }
        }
    };
}

checked_constructors!(PassiveLevel, Irql::PASSIVE, "PASSIVE_LEVEL");
checked_constructors!(ApcLevel, Irql::APC, "APC_LEVEL");
checked_constructors!(DispatchLevel, Irql::DISPATCH, "DISPATCH_LEVEL");

/// The debug check behind the `assume` functions: a wrong assumption stops the machine the way
/// the violation itself eventually would, but at the point where it was made.
fn assume_check(bound: Irql, what: &'static str) {
    if cfg!(any(debug_assertions, wfp_sim)) {
        let now = Irql::current();
        if now > bound {
            crate::debug::print_error(format_args!(
                "wfp-rs: {what} claims IRQL <= {bound}, but the IRQL is {now}\n"
            ));
            crate::bugcheck::irql_not_less_or_equal(now);
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::PassiveLevel<'_> {}
    impl Sealed for super::ApcLevel<'_> {}
    impl Sealed for super::DispatchLevel<'_> {}
    impl<T: Sealed + ?Sized> Sealed for &T {}
    impl<T: Sealed + ?Sized> Sealed for &mut T {}
}

/// Implemented by tokens that prove the IRQL is at most `APC_LEVEL`: [`PassiveLevel`] and
/// [`ApcLevel`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` may be DISPATCH_LEVEL, but this call requires IRQL <= APC_LEVEL",
    label = "this does not prove IRQL <= APC_LEVEL",
    note = "only `&PassiveLevel` and `&ApcLevel` prove IRQL <= APC_LEVEL; a WFP callback such as classifyFn, or code holding a spin lock, has only a `&DispatchLevel`",
    note = "to make this call from such code, queue a work item (`WorkQueue::queue`) and make the call in its closure, which receives a `&mut PassiveLevel`"
)]
pub trait AtMostApc: AtMostDispatch + sealed::Sealed {}

/// Implemented by tokens that prove the IRQL is at most `DISPATCH_LEVEL`: every token. Sealed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an IRQL token",
    label = "expected `&PassiveLevel`, `&ApcLevel` or `&DispatchLevel`",
    note = "tokens are handed to your callbacks by the SDK; pass the one your callback received"
)]
pub trait AtMostDispatch: sealed::Sealed {
    /// The bound the token proves.
    const BOUND: Irql;
}

// A reference to a token proves what the token proves, so `wait(&irql)` works whether `irql` is
// a token or already a reference to one.
impl<T: AtMostApc + ?Sized> AtMostApc for &T {}
impl<T: AtMostApc + ?Sized> AtMostApc for &mut T {}
impl<T: AtMostDispatch + ?Sized> AtMostDispatch for &T {
    const BOUND: Irql = T::BOUND;
}
impl<T: AtMostDispatch + ?Sized> AtMostDispatch for &mut T {
    const BOUND: Irql = T::BOUND;
}

/// The run-time half of the IRQL rules, at the top of every API that takes a token: the token
/// says the IRQL is at most `L::BOUND`; in debug builds (and always in the simulator) this checks
/// it, so a token misused from safe code (two tokens on one thread, a forgotten spin-lock guard)
/// stops the machine at the call that went wrong rather than somewhere later. Release builds
/// for Windows compile it away.
#[inline]
pub(crate) fn verify<L: AtMostDispatch + ?Sized>(_irql: &L) {
    assume_check(L::BOUND, "an IRQL token");
}

impl AtMostApc for PassiveLevel<'_> {}
impl AtMostApc for ApcLevel<'_> {}
impl AtMostDispatch for PassiveLevel<'_> {
    const BOUND: Irql = Irql::PASSIVE;
}
impl AtMostDispatch for ApcLevel<'_> {
    const BOUND: Irql = Irql::APC;
}
impl AtMostDispatch for DispatchLevel<'_> {
    const BOUND: Irql = Irql::DISPATCH;
}

// The marker is what makes tokens `!Send` and `!Sync`; it must stay so.
static_assertions::assert_not_impl_any!(ThisProcessorOnly: Send, Sync);
static_assertions::assert_eq_size!(PassiveLevel<'static>, ());
static_assertions::assert_eq_size!(DispatchLevel<'static>, ());
static_assertions::assert_not_impl_any!(PassiveLevel<'static>: Send, Sync, Clone, Copy, Default);
static_assertions::assert_not_impl_any!(ApcLevel<'static>: Send, Sync, Clone, Copy, Default);
static_assertions::assert_not_impl_any!(DispatchLevel<'static>: Send, Sync, Clone, Copy, Default);

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    #[test]
    fn irql_values_print_their_c_names() {
        assert_eq!(Irql::DISPATCH.to_string(), "DISPATCH_LEVEL");
        assert_eq!(format!("{:?}", Irql(5)), "Irql(5)");
        assert!(Irql::PASSIVE < Irql::APC && Irql::APC < Irql::DISPATCH);
    }

    #[test]
    fn try_current_grants_only_the_bounds_that_hold() {
        let machine = crate::sim::Machine::new();
        let at_dispatch = machine.at_dispatch(|_| {
            (
                PassiveLevel::try_current(|_| ()).is_some(),
                ApcLevel::try_current(|_| ()).is_some(),
                DispatchLevel::try_current(|_| ()).is_some(),
            )
        });
        assert_eq!(at_dispatch, (false, false, true));
        let at_passive = machine.at_passive(|_| {
            (
                PassiveLevel::try_current(|_| ()).is_some(),
                ApcLevel::try_current(|_| ()).is_some(),
                DispatchLevel::try_current(|_| ()).is_some(),
            )
        });
        assert_eq!(at_passive, (true, true, true));
    }
}
