//! Pending a classification: decide later, after asking someone who may take time.
//!
//! A callout at ALE_AUTH_CONNECT or ALE_AUTH_RECV_ACCEPT may not know the answer yet (it must ask
//! a user-mode service, which needs `PASSIVE_LEVEL` and time). It *pends* the classification
//! (`FwpsPendOperation0`): the connection is held, the classify returns at once with BLOCK +
//! ABSORB and the write right cleared. Later — from a work item, another thread, any IRQL up to
//! `DISPATCH_LEVEL` — it completes the pend (`FwpsCompleteOperation0`). At ALE_AUTH_CONNECT, WFP
//! then classifies the connection again (a *reauthorization*, where pending is refused), and the
//! callout answers from the verdict it recorded: [`VerdictTable`] does that bookkeeping.
//!
//! ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT and ALE_ENDPOINT_CLOSURE have no completion handle;
//! there a callout pends by classify handle with [`Classify::pend_decision`], and the completion
//! carries the final decision ([`PendedDecision::complete`]) or asks for a reauthorization.
//!
//! ```
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleAuthConnectV4;
//! use wfp_rs::work_item::WorkQueue;
//!
//! struct AskUserMode {
//!     queue: WorkQueue,
//! }
//!
//! impl Callout<AleAuthConnectV4> for AskUserMode {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         let Ok(pended) = c.pend() else {
//!             let _ = c.out.permit(); // a reauthorization: answer from the record instead
//!             return;
//!         };
//!         let queued = self.queue.queue(irql, move |passive| {
//!             // ... ask the service at PASSIVE_LEVEL, record the verdict ...
//!             pended.complete(passive);
//!         });
//!         // If the work item could not be queued, the closure (and the pend in it) comes back
//!         // and is dropped here, which completes the pend: nothing is left hanging.
//!         drop(queued);
//!     }
//! }
//! ```

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::callout::Classify;
use crate::irql::{AtMostDispatch, RaiseIrql};
use crate::layer::Layer;
use crate::status::Status;
use crate::sys;

/// Why a classification could not be pended. The classification is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PendError {
    /// The layer handed no completion handle: it cannot be pended with `FwpsPendOperation0`.
    #[error("this classification has no completion handle and cannot be pended")]
    NotPendable,
    /// The callout does not have the write right, so it may not take over the decision.
    #[error("a higher-priority filter made a hard decision; the classification cannot be pended")]
    NoWriteRight,
    /// The filter engine refused, e.g. `STATUS_FWP_CANNOT_PEND` during a reauthorization.
    #[error("the filter engine refused to pend: {0}")]
    Refused(Status),
}

impl From<PendError> for Status {
    fn from(error: PendError) -> Status {
        match error {
            PendError::Refused(status) => status,
            PendError::NotPendable | PendError::NoWriteRight => Status::FWP_CANNOT_PEND,
        }
    }
}

/// Layers whose classifications are pended with the completion handle in the metadata
/// (`FwpsPendOperation0`): ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT. Only these have
/// [`Classify::pend`]; elsewhere it does not compile. (fwpsk's documentation also names
/// ALE_RESOURCE_ASSIGNMENT and ALE_AUTH_LISTEN; what follows a completion there is not
/// documented, so the SDK does not offer it yet.)
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot pend with a completion handle",
    label = "`pend` is only for ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT",
    note = "at ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT and ALE_ENDPOINT_CLOSURE, use `Classify::pend_decision` (classify handle); elsewhere decide inline, or keep per-flow state and decide on a later packet"
)]
pub trait PendableByCompletionHandle: Layer + sealed::Sealed {}

macro_rules! pendable_by_completion_handle {
    ($($layer:ident),* $(,)?) => {$(
        impl sealed::Sealed for crate::layer::$layer {}
        impl PendableByCompletionHandle for crate::layer::$layer {}
    )*};
}

pendable_by_completion_handle!(
    AleAuthConnectV4,
    AleAuthConnectV6,
    AleAuthRecvAcceptV4,
    AleAuthRecvAcceptV6,
);

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// Pends this classification (`FwpsPendOperation0`) and sets the decision WFP requires for
    /// a pended classification: BLOCK with `FWPS_CLASSIFY_OUT_FLAG_ABSORB`, write right cleared.
    ///
    /// The returned [`PendedClassify`] must be completed; dropping it completes it too. Refused
    /// with [`PendError::Refused`]`(STATUS_FWP_CANNOT_PEND)` during a reauthorization, and with
    /// [`PendError::NotPendable`] if the engine handed no completion handle.
    pub fn pend(&mut self) -> Result<PendedClassify, PendError>
    where
        L: PendableByCompletionHandle,
    {
        let handle = self
            .metadata
            .completion_handle()
            .ok_or(PendError::NotPendable)?;
        if !self.out.can_write() {
            return Err(PendError::NoWriteRight);
        }
        let mut context: sys::HANDLE = core::ptr::null_mut();
        // SAFETY: the completion handle is the engine's for this classification, which is in
        // progress; classifyFn runs at IRQL <= DISPATCH_LEVEL, as FwpsPendOperation0 requires.
        let status = unsafe { sys::FwpsPendOperation0(handle, &mut context) };
        Status::from_ntstatus(status).map_err(PendError::Refused)?;
        let context = NonNull::new(context).ok_or(PendError::Refused(Status::FWP_NULL_POINTER))?;
        self.out.mark_pended();
        Ok(PendedClassify {
            context: Some(context),
        })
    }
}

/// A pended classification. Complete it once, from any thread at IRQL <= `DISPATCH_LEVEL`;
/// completing consumes it, so it cannot be completed twice.
///
/// Dropping it uncompleted completes it (and reports that to the debugger): at ALE_AUTH_CONNECT
/// the reauthorization then asks the callout again, which answers from whatever it recorded —
/// typically nothing, so its default applies. Leaking it (`mem::forget`, an `Arc` cycle) is safe
/// Rust and leaves the connection waiting; unloading with it outstanding stops the simulator with
/// `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`.
#[must_use = "a pended classification holds the connection until it is completed"]
pub struct PendedClassify {
    context: Option<NonNull<core::ffi::c_void>>,
}

// SAFETY: a completion context is a kernel handle that may be completed from any thread.
unsafe impl Send for PendedClassify {}
// SAFETY: no method works through `&self` except reading nothing; sharing is harmless.
unsafe impl Sync for PendedClassify {}

impl PendedClassify {
    /// Completes the pend (`FwpsCompleteOperation0`). At ALE_AUTH_CONNECT the connection is then
    /// reauthorized; record the verdict before calling this.
    pub fn complete(mut self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        self.complete_inner();
    }

    fn complete_inner(&mut self) {
        if let Some(context) = self.context.take() {
            // SAFETY: the context came from FwpsPendOperation0 and is completed exactly once
            // (taken out of the option); all Rust code in a driver runs at <= DISPATCH_LEVEL.
            unsafe { sys::FwpsCompleteOperation0(context.as_ptr(), core::ptr::null_mut()) };
        }
    }
}

impl Drop for PendedClassify {
    fn drop(&mut self) {
        if self.context.is_some() {
            crate::kd_print!(
                Warning,
                "wfp-rs: a pended classification was dropped without being completed; completing it now\n"
            );
            self.complete_inner();
        }
    }
}

impl fmt::Debug for PendedClassify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendedClassify")
            .field("completed", &self.context.is_none())
            .finish()
    }
}

/// Layers whose classifications are pended by *classify handle* (`FwpsAcquireClassifyHandle0` +
/// `FwpsPendClassify0`) instead of a completion handle: ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT
/// and ALE_ENDPOINT_CLOSURE. Only these have [`Classify::pend_decision`]; elsewhere it does not
/// compile.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not pend by classify handle",
    label = "`pend_decision` is only for ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT and ALE_ENDPOINT_CLOSURE",
    note = "at ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT, use `Classify::pend` (completion handle) and answer the reauthorization"
)]
pub trait PendableByClassifyHandle: Layer + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! pendable_by_classify_handle {
    ($($layer:ident),* $(,)?) => {$(
        impl sealed::Sealed for crate::layer::$layer {}
        impl PendableByClassifyHandle for crate::layer::$layer {}
    )*};
}

pendable_by_classify_handle!(
    AleConnectRedirectV4,
    AleConnectRedirectV6,
    AleBindRedirectV4,
    AleBindRedirectV6,
    AleEndpointClosureV4,
    AleEndpointClosureV6,
);

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// Pends this classification by classify handle (`FwpsAcquireClassifyHandle0`, then
    /// `FwpsPendClassify0`) and sets BLOCK with `FWPS_CLASSIFY_OUT_FLAG_ABSORB`, write right
    /// cleared. Unlike [`pend`](Self::pend), the completion carries the final decision itself:
    /// [`PendedDecision::complete`] gives it, [`PendedDecision::reauthorize`] asks the stack to
    /// classify again.
    ///
    /// Refused with [`PendError::Refused`]`(STATUS_FWP_CANNOT_PEND)` during a reauthorization.
    pub fn pend_decision(&mut self) -> Result<PendedDecision, PendError>
    where
        L: PendableByClassifyHandle,
    {
        if !self.out.can_write() {
            return Err(PendError::NoWriteRight);
        }
        if self.classify_context.is_null() {
            return Err(PendError::NotPendable);
        }
        let mut handle: u64 = 0;
        // SAFETY: the classify context is the engine's for this classification, in progress;
        // classifyFn runs at IRQL <= DISPATCH_LEVEL.
        let status = unsafe {
            sys::FwpsAcquireClassifyHandle0(self.classify_context.cast_mut(), 0, &mut handle)
        };
        Status::from_ntstatus(status).map_err(PendError::Refused)?;
        let filter_id = self.filter.id();
        let out = self.out.raw();
        // The deep copy FwpsCompleteClassify0 wants, taken before the pend changes the decision.
        let original = *out;
        // SAFETY: the handle was just acquired for this classification; `out` is its
        // classify-out.
        let status = unsafe { sys::FwpsPendClassify0(handle, filter_id, 0, out) };
        if let Err(status) = Status::from_ntstatus(status) {
            // SAFETY: acquired above, not pended, released once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
            return Err(PendError::Refused(status));
        }
        self.out.mark_pended();
        Ok(PendedDecision {
            handle: Some(handle),
            out: original,
        })
    }
}

/// The decision that completes a [`PendedDecision`]: permit or block, nothing else.
///
/// A pended classification must end with a decision. `FWP_ACTION_CONTINUE` ("the next filter
/// decides") or another action type is not one, so this type has no way to say it:
///
/// ```compile_fail,E0599
/// use wfp_rs::pend::FinalAction;
/// let _ = FinalAction::Continue;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinalAction {
    /// `FWP_ACTION_PERMIT`, hard.
    Permit,
    /// `FWP_ACTION_BLOCK`, hard.
    Block,
}

impl From<FinalAction> for crate::classify::Action {
    fn from(action: FinalAction) -> Self {
        match action {
            FinalAction::Permit => crate::classify::Action::Permit,
            FinalAction::Block => crate::classify::Action::Block,
        }
    }
}

impl fmt::Display for FinalAction {
    /// `permit` or `block`, as [`Action`](crate::classify::Action) displays them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::classify::Action::from(*self), f)
    }
}

/// A classification pended by classify handle. Complete it once, from any thread at IRQL <=
/// `DISPATCH_LEVEL`, with the final decision or a request to reauthorize; either consumes it and
/// releases the classify handle.
///
/// Dropping it uncompleted reauthorizes (and reports that to the debugger): the stack asks the
/// callout again, where pending is refused and it answers from what it recorded.
#[must_use = "a pended classification holds the connection until it is completed"]
pub struct PendedDecision {
    handle: Option<u64>,
    out: sys::FWPS_CLASSIFY_OUT0,
}

// SAFETY: a classify handle may be completed and released from any thread; `out` is plain data.
unsafe impl Send for PendedDecision {}
// SAFETY: nothing is reachable through `&self`.
unsafe impl Sync for PendedDecision {}

impl PendedDecision {
    /// Completes the pend with `action` as the callout's final decision
    /// (`FwpsCompleteClassify0` with a classify-out), then releases the classify handle. The
    /// decision is hard: the write right is cleared, as [`ClassifyOut::block`] does.
    ///
    /// Only a permit or a block can complete a pend ([`FinalAction`]): "continue" or any other
    /// action type is no decision, and a connection must not be left with none. To have the
    /// stack ask again instead, [`reauthorize`](Self::reauthorize).
    ///
    /// [`ClassifyOut::block`]: crate::classify::ClassifyOut::block
    pub fn complete(mut self, irql: &impl AtMostDispatch, action: FinalAction) {
        crate::irql::verify(irql);
        let mut out = self.out;
        out.actionType = crate::classify::Action::from(action).raw();
        out.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
        self.finish(Some(&out));
    }

    /// Completes the pend without a decision (`FwpsCompleteClassify0` with no classify-out): the
    /// stack classifies again, as a reauthorization. Then releases the classify handle.
    pub fn reauthorize(mut self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        self.finish(None);
    }

    /// The classify handle that pended the classification, until it is completed (for
    /// [`crate::redirect::PendedRedirect`], which acquires the connect request with it).
    pub(crate) fn classify_handle(&self) -> Option<u64> {
        self.handle
    }

    /// The deep copy of the classify-out the completion hands back.
    pub(crate) fn classify_out_mut(&mut self) -> &mut sys::FWPS_CLASSIFY_OUT0 {
        &mut self.out
    }

    fn finish(&mut self, out: Option<&sys::FWPS_CLASSIFY_OUT0>) {
        if let Some(handle) = self.handle.take() {
            let out = out.map_or(core::ptr::null(), |out| out as *const _);
            // SAFETY: the handle was pended by `pend_decision` and is completed exactly once
            // (taken out of the option); `out` is null or valid for the call; all Rust code in a
            // driver runs at <= DISPATCH_LEVEL.
            unsafe { sys::FwpsCompleteClassify0(handle, 0, out) };
            // SAFETY: completed just above, released exactly once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        }
    }
}

impl Drop for PendedDecision {
    fn drop(&mut self) {
        if self.handle.is_some() {
            crate::kd_print!(
                Warning,
                "wfp-rs: a pended decision was dropped without being completed; reauthorizing\n"
            );
            self.finish(None);
        }
    }
}

impl fmt::Debug for PendedDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendedDecision")
            .field("completed", &self.handle.is_none())
            .finish()
    }
}

/// Identifies one connection attempt across its pended classification and its
/// reauthorization: the process (id and image, so a reused process id is a different key), the
/// protocol and both endpoints (so two concurrent attempts to the same destination, which have
/// different local ports, are different keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// The process id (`FWPS_METADATA_FIELD_PROCESS_ID`; 0 if absent).
    pub pid: u64,
    /// The process image: [`app_hash`] of the application id (the image's NT path), a hash
    /// keyed with a secret drawn when the driver loaded, so a crafted path cannot be made to
    /// hash like another image's.
    pub app: u64,
    /// The IP protocol number.
    pub protocol: u8,
    /// The local address and port.
    pub local: (core::net::IpAddr, u16),
    /// The remote address and port.
    pub remote: (core::net::IpAddr, u16),
}

impl ConnectionKey {
    /// The key of the connection being classified, from the layer's fields and metadata; `None`
    /// if a field is missing or malformed, or if [`app_hash`] has no secret yet (never in a
    /// loaded driver: see there).
    #[inline]
    pub fn of<L, F: 'static>(c: &Classify<'_, L, F>) -> Option<ConnectionKey>
    where
        L: Layer,
        L::Address: Into<core::net::IpAddr>,
        crate::layer::fields::AleAppId: crate::layer::Field<L>,
        crate::layer::fields::IpProtocol: crate::layer::Field<L>,
        crate::layer::fields::IpLocalAddress: crate::layer::Field<L>,
        crate::layer::fields::IpLocalPort: crate::layer::Field<L>,
        crate::layer::fields::IpRemoteAddress: crate::layer::Field<L>,
        crate::layer::fields::IpRemotePort: crate::layer::Field<L>,
    {
        use crate::layer::fields;
        // Every field is read before the hash, which is a call: what is read after it would
        // have to keep the classification's pointers alive across the call (spilled and
        // reloaded, about 40 instructions on a cache hit, callgrind).
        let app = c.values.get::<fields::AleAppId>().ok()?;
        let protocol = c.values.get::<fields::IpProtocol>().ok()?.into();
        let local = (
            c.values.get::<fields::IpLocalAddress>().ok()?.into(),
            c.values.get::<fields::IpLocalPort>().ok()?,
        );
        let remote = (
            c.values.get::<fields::IpRemoteAddress>().ok()?.into(),
            c.values.get::<fields::IpRemotePort>().ok()?,
        );
        let pid = c.metadata.process_id().unwrap_or(0);
        Some(ConnectionKey {
            pid,
            app: app_hash(app.as_bytes())?,
            protocol,
            local,
            remote,
        })
    }
}

/// The hash [`ConnectionKey::of`] gives a process image: SipHash-2-4 of `app_id` (the bytes
/// of the application id, `FWPS_FIELD_*_ALE_APP_ID`) under a 128-bit secret the SDK draws from
/// the kernel's random number generator (`BCryptGenRandom`, system-preferred RNG) when the
/// driver loads, before the driver's entry function runs. `None` only before that draw: never
/// in code a loaded driver runs; in host code (a test) that calls it before any driver loaded.
///
/// Keyed because a process image is what a verdict is cached for: with an unkeyed hash (FNV-1a,
/// which this replaced), anyone can compute offline a path that hashes like an allowed image's,
/// and a process started from it under a reused process id would be answered with the allowed
/// image's cached verdict. Without the secret, finding such a path is guessing. The secret never
/// leaves the driver; use this function (not a hash of your own) wherever a value must match
/// `ConnectionKey::app`.
///
/// The secret is per driver image: drawn once per load of the image and kept until it
/// unloads. A driver whose `DriverEntry` cannot draw it fails to load with the RNG's status,
/// rather than hash without it. (In the simulator, every driver and machine of a host process
/// shares the SDK's statics: each load still draws, so that a load fails as on Windows when the
/// RNG does, but only the first draw of the process becomes the secret, so keys computed for
/// one loaded driver stay valid when another loads.)
///
/// ```
/// # let machine = wfp_rs_sim::Machine::new();
/// # #[wfp_rs::driver_entry]
/// # fn entry(_: &mut wfp_rs::irql::PassiveLevel<'_>, _: &mut wfp_rs::driver::Driver<'_>) -> Result<(), wfp_rs::Status> { Ok(()) }
/// # let _driver = machine.load_driver("doc", DriverEntry).unwrap();
/// use wfp_rs::pend::app_hash;
///
/// let app = app_hash(br"\device\harddiskvolume1\app.exe").expect("a driver has loaded");
/// assert_eq!(Some(app), app_hash(br"\device\harddiskvolume1\app.exe"));
/// assert_ne!(Some(app), app_hash(br"\device\harddiskvolume1\other.exe"));
/// ```
#[inline]
pub fn app_hash(app_id: &[u8]) -> Option<u64> {
    let secret = APP_SECRET.get()?;
    Some(keyed_app_hash(secret, app_id))
}

fn keyed_app_hash(secret: (u64, u64), app_id: &[u8]) -> u64 {
    use core::hash::Hasher;
    let mut hasher = siphasher::sip::SipHasher24::new_with_keys(secret.0, secret.1);
    hasher.write(app_id);
    hasher.finish()
}

/// Draws the secret of [`app_hash`] (`BCryptGenRandom` with `BCRYPT_USE_SYSTEM_PREFERRED_RNG`,
/// which is PASSIVE_LEVEL only), for the SDK's `DriverEntry` to call before the driver's entry
/// function. Fails with the RNG's status.
pub(crate) fn draw_app_secret(_irql: &crate::irql::PassiveLevel<'_>) -> Result<(), Status> {
    let mut secret = [0u64; 2];
    // SAFETY: the buffer is ours, 16 writable bytes, and any bytes are a valid `u64`; a null
    // handle is what BCRYPT_USE_SYSTEM_PREFERRED_RNG requires; the token proves PASSIVE_LEVEL.
    let status = unsafe {
        sys::BCryptGenRandom(
            core::ptr::null_mut(),
            secret.as_mut_ptr().cast::<u8>(),
            core::mem::size_of_val(&secret) as sys::ULONG,
            sys::BCRYPT_USE_SYSTEM_PREFERRED_RNG,
        )
    };
    Status::from_ntstatus(status)?;
    APP_SECRET.publish((secret[0], secret[1]));
    Ok(())
}

static APP_SECRET: AppSecret = AppSecret {
    state: AtomicU8::new(AppSecret::UNSET),
    words: [AtomicU64::new(0), AtomicU64::new(0)],
};

/// Set once, then read-only: 128 bits cannot be stored in one atomic operation on every target,
/// so a state says when both words are there.
struct AppSecret {
    state: AtomicU8,
    words: [AtomicU64; 2],
}

impl AppSecret {
    const UNSET: u8 = 0;
    const WRITING: u8 = 1;
    const SET: u8 = 2;

    #[inline]
    fn get(&self) -> Option<(u64, u64)> {
        (self.state.load(Ordering::Acquire) == Self::SET).then(|| {
            (
                self.words[0].load(Ordering::Relaxed),
                self.words[1].load(Ordering::Relaxed),
            )
        })
    }

    /// Keeps `secret` unless a secret is already set (or being set): one in use is never
    /// replaced, or the hashes computed with it would stop matching.
    fn publish(&self, secret: (u64, u64)) {
        match self.state.compare_exchange(
            Self::UNSET,
            Self::WRITING,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                self.words[0].store(secret.0, Ordering::Relaxed);
                self.words[1].store(secret.1, Ordering::Relaxed);
                self.state.store(Self::SET, Ordering::Release);
            }
            // Another load is writing its secret: two stores away from done. Only the
            // simulator gets here (drivers loading at once on host threads); on Windows a
            // driver image's DriverEntry runs once per load.
            Err(_) => {
                while self.state.load(Ordering::Acquire) != Self::SET {
                    core::hint::spin_loop();
                }
            }
        }
    }
}

/// Verdicts recorded for pended connections, for their reauthorization: the standard pattern is
/// to record the verdict, complete the pend, and [`take`](Self::take) the verdict in the
/// reauthorization classify. Bounded: at most `N` entries. Non-paged and lock-protected, usable
/// at `DISPATCH_LEVEL`.
///
/// Two ways to record, for two ways to bound the pends:
///
/// - [`try_record`](Self::try_record) never evicts: it refuses when the table is full. A driver
///   that reserves one slot per pend before pending (at most [`capacity`](Self::capacity)
///   pended or completed-but-not-reauthorized connections, counted by the driver) never sees
///   the refusal, and no recorded verdict is lost before its reauthorization takes it. This is
///   what `examples/firewall/driver` does; a connection that finds no slot is decided at once
///   instead of pended.
/// - [`record`](Self::record) evicts the oldest entry when full: the evicted connection's
///   reauthorization then falls back to the callout's default. Simpler, for a driver whose pends
///   are bounded some other way (`examples/seed-fixed`), but under a burst of more than `N`
///   completions waiting for their reauthorization it silently replaces answers with the
///   default.
///
/// Lookups scan the slots up to the highest one in use, so their cost follows the number of
/// recorded verdicts, not `N`. Each slot holds a [`ConnectionKey`], a `V` and a `u64` (80 bytes
/// for a one-byte `V`). A table beyond a few dozen slots does not fit on a kernel stack: make it
/// a `static`, or build it in pool with [`try_new_in_pool`](Self::try_new_in_pool) rather than
/// moving [`new`](Self::new)'s value into a larger structure.
///
/// ```
/// use wfp_rs::pend::{ConnectionKey, VerdictTable};
/// # use core::net::{IpAddr, Ipv4Addr};
/// static VERDICTS: VerdictTable<bool, 256> = VerdictTable::new();
/// # wfp_rs_sim::Machine::new().at_dispatch(|irql| {
/// # let key = ConnectionKey { pid: 1, app: 2, protocol: 6, local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 5000), remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 80) };
/// assert_eq!(VERDICTS.try_record(&mut *irql, key, true), Ok(None));
/// assert_eq!(VERDICTS.take(&mut *irql, &key), Some(true));
/// assert_eq!(VERDICTS.take(irql, &key), None, "a verdict answers one reauthorization");
/// # });
/// ```
pub struct VerdictTable<V: Copy + Send, const N: usize> {
    slots: crate::spin_lock::SpinLock<Slots<V, N>>,
}

struct Slots<V, const N: usize> {
    entries: [Option<(ConnectionKey, V, u64)>; N],
    clock: u64,
    /// One past the highest slot in use: every entry is below it. New entries take the lowest
    /// free slot, so it stays near the number of entries and bounds every scan.
    high: usize,
}

impl<V, const N: usize> Slots<V, N> {
    /// The key's own slot, the lowest free slot, and the oldest entry's slot, in one pass.
    fn find(&self, key: &ConnectionKey) -> (Option<usize>, Option<usize>, Option<usize>) {
        let (mut free, mut oldest) = (None, None::<(usize, u64)>);
        for (index, entry) in self.entries[..self.high].iter().enumerate() {
            match entry {
                Some((k, _, _)) if k == key => return (Some(index), None, None),
                Some((_, _, age)) => {
                    if oldest.is_none_or(|(_, least)| *age < least) {
                        oldest = Some((index, *age));
                    }
                }
                None => {
                    free.get_or_insert(index);
                }
            }
        }
        if free.is_none() && self.high < N {
            free = Some(self.high);
        }
        (None, free, oldest.map(|(index, _)| index))
    }

    /// Puts `entry` in slot `index` and returns what was there.
    fn put(&mut self, index: usize, key: ConnectionKey, verdict: V) -> Option<(ConnectionKey, V)> {
        self.clock += 1;
        let stamp = self.clock;
        self.high = self.high.max(index + 1);
        self.entries[index]
            .replace((key, verdict, stamp))
            .map(|(k, v, _)| (k, v))
    }
}

/// [`VerdictTable::try_record`] refused: every slot holds another connection's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the verdict table is full")]
pub struct TableFull;

impl<V: Copy + Send, const N: usize> Default for VerdictTable<V, N> {
    fn default() -> Self {
        VerdictTable::new()
    }
}

impl<V: Copy + Send, const N: usize> VerdictTable<V, N> {
    /// An empty table.
    pub const fn new() -> Self {
        VerdictTable {
            slots: crate::spin_lock::SpinLock::new(Slots {
                entries: [const { None }; N],
                clock: 0,
                high: 0,
            }),
        }
    }

    /// An empty table in its own non-paged allocation tagged `tag`, built in place: a table
    /// of a few thousand slots is hundreds of KiB, far more than a kernel stack (12–24 KiB)
    /// could hold while [`new`](Self::new)'s value is moved into place. `None` if there is no
    /// pool.
    pub fn try_new_in_pool(
        tag: crate::pool::PoolTag,
        irql: &impl AtMostDispatch,
    ) -> Option<crate::pool::PoolBox<Self>> {
        let init = |table: NonNull<Self>| {
            // SAFETY: `table` is valid for writes and aligned (try_new_in_place's promise); the
            // projection creates no reference to the uninitialised table.
            let slots = unsafe { &raw mut (*table.as_ptr()).slots };
            // Every field written through raw pointers, one slot at a time: nothing large is
            // built on the stack, nothing uninitialised is read.
            let init_slots = |slots: *mut Slots<V, N>| {
                // SAFETY: `slots` is valid for writes and aligned (init_in_place's promise); the
                // projection creates no reference.
                let entries = unsafe { &raw mut (*slots).entries };
                // SAFETY: as for `entries`.
                let clock = unsafe { &raw mut (*slots).clock };
                // SAFETY: as for `entries`.
                let high = unsafe { &raw mut (*slots).high };
                let entries = entries.cast::<Option<(ConnectionKey, V, u64)>>();
                for index in 0..N {
                    // SAFETY: `index < N`: an element of the array, valid for writes.
                    unsafe { entries.wrapping_add(index).write(None) };
                }
                // SAFETY: valid for writes, as above.
                unsafe { clock.write(0) };
                // SAFETY: valid for writes, as above.
                unsafe { high.write(0) };
            };
            // SAFETY: `slots` is valid for writes and aligned; `init_slots` writes every field
            // of `Slots` without reading any.
            unsafe { crate::spin_lock::SpinLock::init_in_place(slots, init_slots) };
        };
        // SAFETY: `init` initialises every field of the table (the lock, each of the N
        // entries, the clock and the high-water mark) without reading any.
        unsafe { crate::pool::PoolBox::try_new_in_place(tag, irql, init) }
    }

    /// How many verdicts the table holds at most: `N`.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Records `verdict` for `key`, replacing an earlier one for the same key (returned), in the
    /// key's own slot or a free one. Never evicts: if every slot holds another key's verdict it
    /// refuses with [`TableFull`] and changes nothing.
    pub fn try_record(
        &self,
        irql: impl RaiseIrql,
        key: ConnectionKey,
        verdict: V,
    ) -> Result<Option<V>, TableFull> {
        self.slots.lock(irql, |slots, _| {
            let (same, free, _) = slots.find(&key);
            let index = same.or(free).ok_or(TableFull)?;
            Ok(slots.put(index, key, verdict).map(|(_, v)| v))
        })
    }

    /// Records `verdict` for `key`, replacing an earlier one for the same key. If the table is
    /// full, evicts the oldest entry to make room and returns it: that connection's
    /// reauthorization will find no verdict. [`try_record`](Self::try_record) refuses instead.
    pub fn record(
        &self,
        irql: impl RaiseIrql,
        key: ConnectionKey,
        verdict: V,
    ) -> Option<(ConnectionKey, V)> {
        self.slots.lock(irql, |slots, _| {
            let (same, free, oldest) = slots.find(&key);
            let evicting = same.is_none() && free.is_none();
            let index = same.or(free).or(oldest)?;
            let previous = slots.put(index, key, verdict);
            previous.filter(|_| evicting)
        })
    }

    /// Removes and returns the verdict recorded for `key`.
    pub fn take(&self, irql: impl RaiseIrql, key: &ConnectionKey) -> Option<V> {
        self.slots.lock(irql, |slots, _| {
            let high = slots.high;
            let index = slots.entries[..high]
                .iter()
                .position(|e| e.as_ref().is_some_and(|(k, _, _)| k == key))?;
            let taken = slots.entries[index].take().map(|(_, verdict, _)| verdict);
            if index + 1 == high {
                let in_use = slots.entries[..index].iter().rposition(Option::is_some);
                slots.high = in_use.map_or(0, |last| last + 1);
            }
            taken
        })
    }

    /// How many verdicts are recorded.
    pub fn len(&self, irql: impl RaiseIrql) -> usize {
        self.slots.lock(irql, |slots, _| {
            slots.entries[..slots.high].iter().flatten().count()
        })
    }

    /// Whether no verdict is recorded.
    pub fn is_empty(&self, irql: impl RaiseIrql) -> bool {
        self.len(irql) == 0
    }
}

impl<V: Copy + Send, const N: usize> fmt::Debug for VerdictTable<V, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerdictTable")
            .field("capacity", &N)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::keyed_app_hash;

    /// The key and messages of the SipHash paper's test vectors (Aumasson and Bernstein,
    /// appendix A): key bytes 00..0f, message bytes 00, 01, ...
    const PAPER_KEY: (u64, u64) = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);

    #[test]
    fn the_app_hash_is_siphash_2_4() {
        assert_eq!(keyed_app_hash(PAPER_KEY, &[]), 0x726f_db47_dd0e_0e31);
        let fifteen: [u8; 15] = core::array::from_fn(|i| i as u8);
        assert_eq!(keyed_app_hash(PAPER_KEY, &fifteen), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn the_app_hash_depends_on_the_secret_and_on_every_byte() {
        let path = br"\device\harddiskvolume1\app.exe";
        let hash = keyed_app_hash(PAPER_KEY, path);
        assert_ne!(hash, keyed_app_hash((PAPER_KEY.0 ^ 1, PAPER_KEY.1), path));
        assert_ne!(
            hash,
            keyed_app_hash((PAPER_KEY.0, PAPER_KEY.1 ^ (1 << 63)), path)
        );
        let mut other = *path;
        other[path.len() - 1] ^= 1;
        assert_ne!(hash, keyed_app_hash(PAPER_KEY, &other));
    }
}
