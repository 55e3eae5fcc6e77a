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
//! - An API states the weakest bound it needs with a sealed trait: [`AtPassive`], [`AtMostApc`]
//!   or [`AtMostDispatch`], taken as `&impl AtMostApc` and so on.
//! - Tokens are handed out by the SDK's trampolines (driver entry, unload and work items get
//!   `&mut PassiveLevel`; WFP callbacks get `&mut DispatchLevel`) and by a locked
//!   [`SpinLock`] to its closure. Minting one anywhere else is `unsafe`
//!   ([`try_current`](PassiveLevel::try_current), which checks the IRQL, and `assume`): a token
//!   proves the IRQL only if no second token is usable on the same thread.
//! - Raising the IRQL takes an exclusive borrow of a token itself ([`RaiseIrql`]: `&mut
//!   PassiveLevel`, never `&PassiveLevel` or `&mut` of a copy of one), so no token that claims the
//!   lower level can be used while the IRQL is raised. A generic helper that raises the IRQL
//!   takes `&mut impl` [`Token`].
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
//! [`SpinLock`]: crate::spin_lock::SpinLock

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
    /// # wfp_rs_sim::Machine::new().run(|| {
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
///
/// The compiler's "cannot be sent / shared between threads safely" error for a token names
/// `*mut ThisProcessorOnly`: a token, or a reference to one, was moved to or shared with another
/// thread (a spawned thread, a work item, a callout's state); use the token that thread's code
/// is given instead.
pub struct ThisProcessorOnly(PhantomData<*mut ThisProcessorOnly>);

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
            /// The SDK's trampolines use this where the kernel documents the IRQL.
            ///
            /// # Safety
            ///
            /// The current IRQL must satisfy the token's bound for the whole lifetime of the
            /// token (except while the token itself is borrowed exclusively to raise it), and no
            /// other token may be usable on this thread while it lives: either there is none, or
            /// the other one is exclusively borrowed for the whole lifetime of this one.
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
    /// only safe way to raise the IRQL is through an API that borrows this token itself
    /// exclusively ([`RaiseIrql`], such as [`SpinLock::lock`](crate::spin_lock::SpinLock::lock)),
    /// which makes the token unusable until the IRQL is lowered again; and no second token is
    /// usable on the same thread (minting one outside the SDK's trampolines is `unsafe`).
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
    /// always did. A locked [`SpinLock`](crate::spin_lock::SpinLock) hands one to its closure.
    ///
    /// # Invariants
    ///
    /// While a `&DispatchLevel` is usable, the current processor runs at an IRQL of at most
    /// `DISPATCH_LEVEL`.
    DispatchLevel
}

/// The ways to obtain a token outside the SDK's trampolines. Both are `unsafe`: a token proves
/// the IRQL only if it is the one token usable on its thread (see the `# Safety` sections).
macro_rules! checked_constructors {
    ($name:ident, $bound:expr, $level:literal) => {
        impl<'a> $name<'a> {
            #[doc = concat!("Runs `f` with a `", stringify!($name), "` token if the current IRQL is at most `", $level, "`; returns `None` without calling `f` otherwise.")]
            ///
            /// This is the checked way to obtain a token in code the SDK did not call with one (a
            /// callback registered by other means, library code whose caller passed none). The
            /// token lives only for the call of `f`.
            ///
            /// # Safety
            ///
            /// No other IRQL token may be usable on this thread while `f` runs: the caller holds
            /// none (it was given none, and `f` captures none), and `f` obtains none except by
            /// borrowing the one it is given (as [`SpinLock::lock`] does). A token proves the IRQL
            /// only while nothing raises it; the sole safe way to raise it is an exclusive borrow
            /// of a token ([`RaiseIrql`]), which freezes *that* token but not a second one, so a
            /// second token would go on claiming a level that no longer holds.
            ///
            /// Every SDK call checks its token again at run time in debug builds and always in
            /// the simulator, so a broken promise stops the machine with `IRQL_NOT_LESS_OR_EQUAL`
            /// at the first call that relies on it.
            ///
            /// [`SpinLock::lock`]: crate::spin_lock::SpinLock::lock
            ///
            /// ```
            /// # wfp_rs_sim::Machine::new().run(|| {
            /// // SAFETY: this code holds no other token.
            #[doc = concat!("let ran = unsafe { wfp_rs::irql::", stringify!($name), "::try_current(|_irql| 42) };")]
            /// assert_eq!(ran, Some(42)); // the harness runs at PASSIVE_LEVEL
            /// # });
            /// ```
            pub unsafe fn try_current<R>(
                f: impl for<'t> FnOnce(&'t mut $name<'t>) -> R,
            ) -> Option<R> {
                if Irql::current() > $bound {
                    return None;
                }
                // SAFETY: the IRQL is within the bound now. It can rise only through an exclusive
                // borrow of a usable token, and the caller promises the token made here is the
                // only one usable on this thread while `f` runs; it lives for that call only.
                let mut token = unsafe { $name::new_unchecked() };
                Some(f(&mut token))
            }

            #[doc = concat!("[`try_current`](Self::try_current) for the SDK's own code reached without a token: `Drop` implementations and kernel callbacks the SDK wraps where the IRQL is not documented. Runs `f` with a `", stringify!($name), "` if the current IRQL is at most `", $level, "`.")]
            ///
            /// # Safety
            ///
            /// `f` is SDK code that neither receives nor reaches any other token of this thread,
            /// and runs no driver code that could (a token the driver holds in an outer frame,
            /// around a `drop`, stays untouched there until `f` returns); it raises the IRQL only
            /// through the token it is given, and the IRQL is back where it was when it returns.
            #[allow(dead_code, reason = "the SDK needs it for some token types only")]
            pub(crate) unsafe fn try_current_in_sdk<R>(
                f: impl for<'t> FnOnce(&'t mut $name<'t>) -> R,
            ) -> Option<R> {
                // SAFETY: the caller's promise (no other token of this thread is reached or used
                // while `f` runs) is `try_current`'s contract.
                unsafe { Self::try_current(f) }
            }

            /// Creates a token, checking the IRQL in debug builds (and always in the simulator),
            /// where a wrong assumption stops the machine with `IRQL_NOT_LESS_OR_EQUAL`.
            ///
            /// # Safety
            ///
            #[doc = concat!("The IRQL is at most `", $level, "` now and stays so for all of `'a` except while the returned token itself is borrowed exclusively to raise it; and no other IRQL token is usable on this thread while the returned one lives (see [`try_current`](Self::try_current)).")]
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

    /// Seals [`Token`](super::Token): only the three token types themselves, never a reference.
    pub trait SealedToken {}
    impl SealedToken for super::PassiveLevel<'_> {}
    impl SealedToken for super::ApcLevel<'_> {}
    impl SealedToken for super::DispatchLevel<'_> {}
}

/// Implemented by tokens that prove the IRQL is `PASSIVE_LEVEL`: [`PassiveLevel`] (and references
/// to it). Sealed. PASSIVE-only APIs (opening a filter engine session, registering a callout,
/// creating a communication port, …) take `&impl AtPassive`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` may be above PASSIVE_LEVEL, but this call requires PASSIVE_LEVEL",
    label = "this does not prove IRQL == PASSIVE_LEVEL",
    note = "only `&PassiveLevel` proves PASSIVE_LEVEL; a WFP callback such as classifyFn, or code holding a spin lock, has only a `&DispatchLevel` (it may run at DISPATCH_LEVEL)",
    note = "to make this call from such code, queue a work item (`WorkQueue::queue`) and make the call in its closure, which receives a `&mut PassiveLevel`"
)]
pub trait AtPassive: AtMostApc + sealed::Sealed {}

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
// a token or already a reference to one. This is sound because only an exclusive borrow of a
// token itself can raise the IRQL ([`RaiseIrql`]), and that borrow cannot coexist with these.
impl<T: AtPassive + ?Sized> AtPassive for &T {}
impl<T: AtPassive + ?Sized> AtPassive for &mut T {}
impl<T: AtMostApc + ?Sized> AtMostApc for &T {}
impl<T: AtMostApc + ?Sized> AtMostApc for &mut T {}
impl<T: AtMostDispatch + ?Sized> AtMostDispatch for &T {
    const BOUND: Irql = T::BOUND;
}
impl<T: AtMostDispatch + ?Sized> AtMostDispatch for &mut T {
    const BOUND: Irql = T::BOUND;
}

/// A token type itself: [`PassiveLevel`], [`ApcLevel`] or [`DispatchLevel`], never a reference to
/// one. Sealed.
///
/// This is the bound for a generic helper that raises the IRQL (takes a spin lock): it takes
/// `irql: &mut impl Token` (or `&mut L` with `L: Token`), and `&mut L` is then a [`RaiseIrql`].
/// A helper that does not raise the IRQL takes `&impl AtMostDispatch` (or `AtMostApc`,
/// `AtPassive`) instead, which also accepts references.
///
/// ```
/// use wfp_rs::irql::{AtMostApc, Token};
/// use wfp_rs::spin_lock::SpinLock;
///
/// // Callable with `&mut PassiveLevel`, `&mut ApcLevel` or `&mut DispatchLevel`.
/// fn bump(irql: &mut impl Token, hits: &SpinLock<u64>) -> u64 {
///     hits.lock(irql, |hits, _irql| {
///         *hits += 1;
///         *hits
///     })
/// }
///
/// // Raises the IRQL and, once it is lowered again, waits: `Token + AtMostApc`.
/// fn bump_then_wait<L: Token + AtMostApc>(irql: &mut L, hits: &SpinLock<u64>, done: &wfp_rs::event::Event) {
///     bump(irql, hits);
///     done.wait_timeout(irql, core::time::Duration::ZERO);
/// }
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// # let hits = SpinLock::new(0);
/// # let done = wfp_rs::event::Event::try_new(wfp_rs::event::EventKind::Notification, true, irql).unwrap();
/// # bump_then_wait(irql, &hits, &done);
/// # assert_eq!(hits.into_inner(), 1);
/// # });
/// ```
///
/// A reference to a token is not a `Token`, so a helper cannot raise the IRQL through a copy of
/// a shared reference:
///
/// ```compile_fail,E0277
/// use wfp_rs::irql::{AtMostApc, PassiveLevel, Token};
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn bump(irql: &mut impl Token, hits: &SpinLock<u64>) {
///     hits.lock(irql, |hits, _| *hits += 1);
/// }
///
/// fn wrong(irql: &PassiveLevel, hits: &SpinLock<u64>) {
///     let mut copy = irql;
///     bump(&mut copy, hits); // `&PassiveLevel` is not a `Token`
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an IRQL token itself, so it cannot be borrowed to raise the IRQL",
    label = "expected `PassiveLevel`, `ApcLevel` or `DispatchLevel` behind a single `&mut`",
    note = "a shared reference to a token (`&PassiveLevel`) is `Copy`: raising the IRQL through a copy would leave the original usable at DISPATCH_LEVEL, so a function that has only `&PassiveLevel` must take `&mut PassiveLevel` from its caller instead",
    note = "if you hold `irql: &mut PassiveLevel`, pass `irql` itself (or `&mut *irql` to keep using it afterwards), not `&mut irql`"
)]
pub trait Token: AtMostDispatch + sealed::Sealed + sealed::SealedToken {}

impl Token for PassiveLevel<'_> {}
impl Token for ApcLevel<'_> {}
impl Token for DispatchLevel<'_> {}

/// An exclusive borrow of a token itself: `&mut PassiveLevel`, `&mut ApcLevel` or
/// `&mut DispatchLevel`. Sealed. Every API that raises the IRQL (locking a
/// [`SpinLock`](crate::spin_lock::SpinLock), a [`VerdictTable`](crate::pend::VerdictTable), …)
/// takes one.
///
/// Raising the IRQL makes every token of the thread that claims a lower level false until the
/// IRQL is lowered again. An exclusive borrow of the token itself is the one borrow under which
/// no copy of it can be used: a `&PassiveLevel` is `Copy`, so `&mut` of a *copy* of one
/// (`&mut &PassiveLevel`) would leave the original usable at `DISPATCH_LEVEL`. Neither compiles:
///
/// ```compile_fail,E0277
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn wrong(irql: &PassiveLevel, hits: &SpinLock<u64>) {
///     let mut copy = irql;
///     hits.lock(&mut copy, |hits, _| *hits += 1);
/// }
/// ```
///
/// Passing the borrow moves it (it is a generic argument, so Rust does not reborrow it by
/// itself): to use the token again afterwards, pass `&mut *irql`.
///
/// ```
/// use wfp_rs::irql::DispatchLevel;
/// use wfp_rs::spin_lock::SpinLock;
///
/// fn twice(irql: &mut DispatchLevel, hits: &SpinLock<u64>) {
///     hits.lock(&mut *irql, |hits, _| *hits += 1);
///     hits.lock(irql, |hits, _| *hits += 1);
/// }
/// # wfp_rs_sim::Machine::new().at_dispatch(|irql| {
/// # let hits = SpinLock::new(0);
/// # twice(irql, &hits);
/// # assert_eq!(hits.into_inner(), 2);
/// # });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot raise the IRQL: that needs an IRQL token itself, borrowed exclusively (`&mut`)",
    label = "not `&mut PassiveLevel`, `&mut ApcLevel` or `&mut DispatchLevel`",
    note = "a shared reference to a token is `Copy`: raising the IRQL through it, or through `&mut` of a copy of it, would leave the original usable at DISPATCH_LEVEL",
    note = "pass the token you were given as `&mut` (`&mut *irql` to keep using it afterwards); a function that has only a `&PassiveLevel` must take `&mut PassiveLevel` from its caller; a generic helper takes `irql: &mut impl Token`"
)]
pub trait RaiseIrql: AtMostDispatch + sealed::Sealed {
    /// The token type borrowed.
    type Level: Token;

    /// The borrowed token, reborrowed: to use it for another call after passing `self` on.
    fn reborrow(&mut self) -> &mut Self::Level;
}

// `do_not_recommend`: an error names `&PassiveLevel` or `&mut &PassiveLevel` as not being a
// `RaiseIrql`, with this trait's message, instead of pointing into this impl.
#[diagnostic::do_not_recommend]
impl<L: Token> RaiseIrql for &mut L {
    type Level = L;

    fn reborrow(&mut self) -> &mut L {
        self
    }
}

/// The run-time half of the IRQL rules, at the top of every API that takes a token: the token
/// says the IRQL is at most `L::BOUND`; in debug builds (and always in the simulator) this checks
/// it, so a token misused from safe code stops the machine at the call that went wrong rather
/// than somewhere later. Release builds for Windows compile it away.
#[inline]
pub(crate) fn verify<L: AtMostDispatch + ?Sized>(_irql: &L) {
    assume_check(L::BOUND, "an IRQL token");
}

impl AtPassive for PassiveLevel<'_> {}
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

    /// A host build calls the kernel through the table a simulator installs; with none (no
    /// `wfp-rs-sim` in this test binary) the call says what to do instead of failing to link.
    #[cfg(wfp_sim)]
    #[test]
    #[should_panic(
        expected = "no simulated kernel is running, so there is no kernel function to \
                               call. Add `wfp-rs-sim` to [dev-dependencies]"
    )]
    fn kernel_calls_without_a_simulator_say_to_add_wfp_rs_sim() {
        let _ = Irql::current();
    }
}
