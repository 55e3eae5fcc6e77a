//! Redirecting a connection: the writable connect request of ALE_CONNECT_REDIRECT, and the
//! writable bind request of ALE_BIND_REDIRECT (see [Redirecting a bind](#redirecting-a-bind)).
//!
//! At ALE_CONNECT_REDIRECT_V4/V6 `layerData` is an `FWPS_CONNECT_REQUEST0`: the connection's
//! local and remote address and port. A callout changes where the connection goes by taking a
//! *writable copy* of it (`FwpsAcquireClassifyHandle0`, then
//! `FwpsAcquireWritableLayerDataPointer0`), changing the copy, and handing it back
//! (`FwpsApplyModifiedLayerData0`, then `FwpsReleaseClassifyHandle0`). The rules, from
//! Microsoft's `FwpsAcquireWritableLayerDataPointer0`, `FWPS_CONNECT_REQUEST0` and "Using Bind
//! or Connect Redirection" pages, and how this module keeps them:
//!
//! - The copy is taken in `classifyFn`, or later from the pend of the classification.
//!   [`Classify::connect_request`] borrows the classification and
//!   [`PendedRedirect::connect_request`] the pend, so the copy cannot outlive either.
//! - Every acquire needs exactly one apply, even when nothing changed, or the classification may
//!   not complete. [`WritableConnectRequest::apply`] consumes the copy; dropping it un-applied
//!   restores what it held and applies that, so the modifications are discarded and the
//!   connection goes where it was going.
//! - Only the remote address and port (and the local-redirect fields) may be changed at
//!   ALE_CONNECT_REDIRECT; the local address is changed at ALE_BIND_REDIRECT.
//! - Redirected connections come back: a proxy's own outbound connection crosses
//!   ALE_CONNECT_REDIRECT again, and other callouts may have redirected this one already. From
//!   Windows 8 the callout queries the connection's redirect state
//!   ([`Classify::redirect_state`], `FwpsQueryConnectionRedirectState0`) with its
//!   [`RedirectHandle`] before redirecting, and redirects only a connection nobody redirected
//!   (or one another callout redirected, if it does not trust that one). The copy's history
//!   (`previousVersion`, each version with the `modifierFilterId` of the filter that made it)
//!   also says who changed it
//!   ([`redirected_by_this_filter`](WritableConnectRequest::redirected_by_this_filter)).
//! - A redirect to a proxy on this host ([`WritableConnectRequest::redirect_locally`]) names
//!   the proxy's process id (`localRedirectTargetPID`, without which the engine refuses a
//!   loopback redirect) and, from Windows 8, a redirect handle (`localRedirectHandle`, which
//!   "must be populated for redirection to work"). [`RedirectHandle`] is created once at
//!   `PASSIVE_LEVEL` (`FwpsRedirectHandleCreate0`) and destroyed at unload
//!   (`FwpsRedirectHandleDestroy0`).
//! - Redirection can be asynchronous: [`Classify::pend_redirect`] pends the classification
//!   (`FwpsPendClassify0`); later, from a work item or any thread at IRQL <= `DISPATCH_LEVEL`,
//!   [`PendedRedirect::connect_request`] acquires the request with the classify handle, it is
//!   applied (optionally with `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS`), and
//!   [`PendedRedirect::complete`] completes the pend (`FwpsCompleteClassify0`) and releases the
//!   handle. The request borrows the pend, so completing before applying does not compile.
//!
//! Acquiring sets the classify-out to BLOCK with the write right cleared (as the documentation
//! says). INFERRED: that guards a classification that returns mid-modification; when the copy is
//! applied (or dropped) this module puts the action and rights back as they were before the
//! acquire, and the callout then decides as usual (typically
//! [`permit`](crate::classify::ClassifyOut::permit)).
//!
//! Not offered yet: the redirect context (`localRedirectContext`, pool WFP takes ownership of
//! and frees when the proxied flow goes away).
//!
//! ```
//! use core::net::SocketAddr;
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleConnectRedirectV4;
//!
//! struct ToProxy {
//!     proxy: SocketAddr,
//! }
//!
//! impl Callout<AleConnectRedirectV4> for ToProxy {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleConnectRedirectV4>) {
//!         if let Ok(mut request) = c.connect_request(irql) {
//!             // Our own redirect coming back (or the proxy's connection): leave it alone.
//!             if !request.redirected_by_this_filter() && request.remote() != Some(self.proxy) {
//!                 let _ = request.set_remote(self.proxy);
//!             }
//!             request.apply(irql);
//!         }
//!         let _ = c.out.permit();
//!     }
//! }
//! ```
//!
//! # Redirecting a bind
//!
//! At ALE_BIND_REDIRECT_V4/V6 `layerData` is an `FWPS_BIND_REQUEST0`: the local address and
//! port a socket is binding to, and the port reservation token. The same acquire/apply rules
//! hold; [`Classify::bind_request`] returns a [`WritableBindRequest`], whose local address and
//! port ([`set_local`](WritableBindRequest::set_local)) and reservation token are the only
//! things the `FWPS_BIND_REQUEST0` page lets a callout change. A change there affects every
//! connection that uses the socket ("Using Bind or Connect Redirection"); a change of the local
//! endpoint at ALE_CONNECT_REDIRECT is not supported by Windows, which is why
//! [`WritableConnectRequest`] has no `set_local`.
//!
//! ```
//! use core::net::{Ipv4Addr, SocketAddr};
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::AleBindRedirectV4;
//!
//! /// Binds every IPv4 socket to one source address, keeping its port.
//! struct SourceAddress(Ipv4Addr);
//!
//! impl Callout<AleBindRedirectV4> for SourceAddress {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleBindRedirectV4>) {
//!         if let Ok(mut request) = c.bind_request(irql) {
//!             if let Some(local) = request.local()
//!                 && !request.redirected_by_this_filter()
//!             {
//!                 let _ = request.set_local(SocketAddr::new(self.0.into(), local.port()));
//!             }
//!             request.apply(irql);
//!         }
//!         let _ = c.out.permit();
//!     }
//! }
//! ```

use core::fmt;
use core::marker::PhantomData;
use core::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use core::ptr::NonNull;

use crate::callout::Classify;
use crate::guid::Guid;
use crate::irql::{AtMostDispatch, AtPassive, Irql};
use crate::layer::Layer;
use crate::pend::{FinalAction, PendError, PendableByClassifyHandle, PendedDecision};
use crate::status::Status;
use crate::sys;

/// The layers whose `layerData` is a connect request (`FWPS_CONNECT_REQUEST0`):
/// ALE_CONNECT_REDIRECT_V4 and ALE_CONNECT_REDIRECT_V6. Only these have
/// [`Classify::connect_request`], [`Classify::redirect_state`] and [`Classify::pend_redirect`];
/// elsewhere they do not compile.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no connect request to redirect",
    label = "only ALE_CONNECT_REDIRECT_V4 and ALE_CONNECT_REDIRECT_V6 have a connect request (and redirect records)",
    note = "register the callout at ALE_CONNECT_REDIRECT to change where a connection goes; at other layers permit or block it"
)]
pub trait ConnectRedirectLayer: Layer + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

impl sealed::Sealed for crate::layer::AleConnectRedirectV4 {}
impl ConnectRedirectLayer for crate::layer::AleConnectRedirectV4 {}
impl sealed::Sealed for crate::layer::AleConnectRedirectV6 {}
impl ConnectRedirectLayer for crate::layer::AleConnectRedirectV6 {}

/// Why a connect or bind request could not be acquired or changed. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    /// The callout does not have the write right: a higher-priority filter decided.
    #[error("a higher-priority filter made a hard decision; nothing can be redirected")]
    NoWriteRight,
    /// The engine handed no classify context.
    #[error("this classification has no classify context")]
    NoClassifyContext,
    /// `FwpsAcquireClassifyHandle0` or `FwpsAcquireWritableLayerDataPointer0` failed.
    #[error("the filter engine refused: {0}")]
    Refused(Status),
    /// The new address is not of the IP version of the connection (or, for a bind, of the
    /// layer).
    #[error("the new address is not of the connection's IP version")]
    WrongIpVersion,
    /// A loopback address given to [`WritableConnectRequest::set_remote`]: a redirect to a
    /// local proxy needs the redirect handle and the proxy's process id, which
    /// [`WritableConnectRequest::redirect_locally`] sets.
    #[error(
        "a loopback address needs redirect_locally, with a redirect handle and the proxy's process id"
    )]
    Loopback,
    /// [`WritableConnectRequest::redirect_locally`] with process id 0: the engine accepts a
    /// loopback redirect only with the proxy's process id (`localRedirectTargetPID`).
    #[error("a local redirect needs the proxy's process id")]
    NoTargetProcess,
}

impl From<RedirectError> for Status {
    fn from(error: RedirectError) -> Status {
        match error {
            RedirectError::Refused(status) => status,
            RedirectError::NoWriteRight
            | RedirectError::NoClassifyContext
            | RedirectError::WrongIpVersion
            | RedirectError::Loopback
            | RedirectError::NoTargetProcess => Status::INVALID_PARAMETER,
        }
    }
}

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// Acquires the writable copy of this connection's connect request
    /// (`FwpsAcquireClassifyHandle0`, then `FwpsAcquireWritableLayerDataPointer0`). Apply it with
    /// [`WritableConnectRequest::apply`]; dropping it discards the changes. See
    /// [`crate::redirect`].
    ///
    /// Refused with [`RedirectError::NoWriteRight`] when a higher-priority filter decided.
    pub fn connect_request(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<WritableConnectRequest<'_>, RedirectError>
    where
        L: ConnectRedirectLayer,
    {
        // SAFETY: `layerData` at ALE_CONNECT_REDIRECT (the `L` bound) is an
        // FWPS_CONNECT_REQUEST0.
        let data = unsafe { self.acquire_writable::<sys::FWPS_CONNECT_REQUEST0>(irql) }?;
        Ok(WritableConnectRequest { data })
    }

    /// Whether this connection was redirected, and by whom, relative to `handle`
    /// (`FwpsQueryConnectionRedirectState0` with the redirect records of the classification's
    /// metadata). [`RedirectState::NotRedirected`] if the metadata carries no redirect records.
    ///
    /// Query it before redirecting, as "Using Bind or Connect Redirection" requires from
    /// Windows 8: redirect only a connection that is [`NotRedirected`](RedirectState::NotRedirected)
    /// (or, if you do not trust the other callout, [`RedirectedByOther`](RedirectState::RedirectedByOther)).
    pub fn redirect_state(
        &self,
        irql: &impl AtMostDispatch,
        handle: &RedirectHandle,
    ) -> RedirectState
    where
        L: ConnectRedirectLayer,
    {
        crate::irql::verify(irql);
        let Some(records) = self.metadata.redirect_records() else {
            return RedirectState::NotRedirected;
        };
        // SAFETY: the records handle is the engine's for this classification, in progress; the
        // redirect handle is live (borrowed); IRQL <= DISPATCH_LEVEL (the token); a null
        // context pointer is allowed.
        let raw = unsafe {
            sys::FwpsQueryConnectionRedirectState0(records, handle.raw(), core::ptr::null_mut())
        };
        RedirectState::from_raw(raw)
    }

    /// Pends this classification by classify handle (`FwpsAcquireClassifyHandle0`, then
    /// `FwpsPendClassify0`), as [`pend_decision`](Self::pend_decision) does, keeping what it
    /// takes to redirect the connection later from another context: the asynchronous
    /// redirection of "Using Bind or Connect Redirection". From a work item or any thread at
    /// IRQL <= `DISPATCH_LEVEL`, [`PendedRedirect::connect_request`] acquires the writable
    /// connect request, which is applied, and then [`PendedRedirect::complete`] gives the final
    /// decision.
    ///
    /// Refused with [`PendError::Refused`]`(STATUS_FWP_CANNOT_PEND)` during a reauthorization.
    pub fn pend_redirect(&mut self) -> Result<PendedRedirect, PendError>
    where
        L: ConnectRedirectLayer + PendableByClassifyHandle,
    {
        let filter_id = self.filter.id();
        let decision = self.pend_decision()?;
        Ok(PendedRedirect {
            decision,
            filter_id,
        })
    }
}

/// The writable copy of a connection's connect request, from [`Classify::connect_request`] or
/// [`PendedRedirect::connect_request`]. Apply it once with [`apply`](Self::apply); dropping it
/// restores and applies what it held (the connection continues unchanged). Acquired in
/// classifyFn, the classify handle is released with the apply.
#[must_use = "dropping the request discards the changes; call `apply` to redirect"]
pub struct WritableConnectRequest<'a> {
    /// Borrows the classification or the pend, and the redirect handle a local redirect names.
    data: WritableLayerData<'a, sys::FWPS_CONNECT_REQUEST0>,
}

impl<'a> WritableConnectRequest<'a> {
    fn data(&self) -> &sys::FWPS_CONNECT_REQUEST0 {
        self.data.get()
    }

    /// The remote address and port the connection goes to (`remoteAddressAndPort`); `None` for
    /// an address family other than IPv4 or IPv6.
    pub fn remote(&self) -> Option<SocketAddr> {
        socket_address_from_storage(&self.data().remoteAddressAndPort)
    }

    /// The local address and port (`localAddressAndPort`, read-only at this layer).
    pub fn local(&self) -> Option<SocketAddr> {
        socket_address_from_storage(&self.data().localAddressAndPort)
    }

    /// Sends the connection to `remote` instead. It must be of the connection's IP version and
    /// not a loopback address: a connection to this host needs
    /// [`redirect_locally`](Self::redirect_locally) (see [`crate::redirect`]).
    pub fn set_remote(&mut self, remote: SocketAddr) -> Result<(), RedirectError> {
        if remote.ip().is_loopback() {
            return Err(RedirectError::Loopback);
        }
        self.write_remote(remote)
    }

    /// Sends the connection to a proxy process on this host: `proxy` (a loopback address, or
    /// this host's own address, of the connection's IP version) served by process
    /// `target_pid`, redirected with `handle` (`remoteAddressAndPort`, `localRedirectTargetPID`
    /// and `localRedirectHandle`). From Windows 8 the redirect handle is what makes a local
    /// redirect work, and it is what [`Classify::redirect_state`] recognises the connection by
    /// when the proxy's own connection comes back. The handle stays borrowed until the request
    /// is applied, so it cannot be destroyed before.
    ///
    /// Refused with [`RedirectError::NoTargetProcess`] for process id 0 (the engine accepts no
    /// loopback redirect without the proxy's process id), and
    /// [`RedirectError::WrongIpVersion`]. No redirect context (`localRedirectContext`) is set:
    /// WFP takes ownership of it and frees it, which this SDK does not model yet.
    pub fn redirect_locally(
        &mut self,
        proxy: SocketAddr,
        handle: &'a RedirectHandle,
        target_pid: u32,
    ) -> Result<(), RedirectError> {
        if target_pid == 0 {
            return Err(RedirectError::NoTargetProcess);
        }
        self.write_remote(proxy)?;
        let request = self.data.get_mut();
        request.localRedirectTargetPID = target_pid;
        request.localRedirectHandle = handle.raw();
        Ok(())
    }

    fn write_remote(&mut self, remote: SocketAddr) -> Result<(), RedirectError> {
        let same_version = matches!(
            (self.remote(), remote),
            (Some(SocketAddr::V4(_)), SocketAddr::V4(_))
                | (Some(SocketAddr::V6(_)), SocketAddr::V6(_))
        );
        if !same_version {
            return Err(RedirectError::WrongIpVersion);
        }
        self.data.get_mut().remoteAddressAndPort = storage_from_socket_address(remote);
        Ok(())
    }

    /// The filter ids of the earlier modifications, newest first (the `modifierFilterId` of
    /// each `previousVersion`). Empty if no filter has changed the request.
    pub fn previous_modifiers(&self) -> PreviousModifiers<'_> {
        self.data.previous_modifiers()
    }

    /// Whether the filter that called this callout changed the request before: the connection
    /// was redirected by this callout already (redirect it again and it loops).
    pub fn redirected_by_this_filter(&self) -> bool {
        self.data.redirected_by_this_filter()
    }

    /// Hands the copy back to the engine (`FwpsApplyModifiedLayerData0`), so the connection
    /// continues to the addresses it holds; acquired in classifyFn, the classify handle is
    /// released. The classify-out's action and rights are put back as they were before the
    /// acquire.
    pub fn apply(self, irql: &impl AtMostDispatch) {
        self.data.apply(irql);
    }

    /// [`apply`](Self::apply) with `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS`, for a
    /// request acquired from a [`PendedRedirect`]: the documentation offers the flag there,
    /// to be reauthorized if another callout changes the request further. Acquired in
    /// classifyFn, the flag is not passed (the header allows it after a pended classify only).
    /// With the flag, if another filter changes the request after the pend and before
    /// [`PendedRedirect::complete`], the completion's action does not decide: the stack
    /// classifies the connection again at ALE_CONNECT_REDIRECT with the request as it then
    /// stands (the simulator models this; the window from the pend is INFERRED).
    pub fn apply_reauthorize_if_modified_by_others(self, irql: &impl AtMostDispatch) {
        let flags = match self.data.origin {
            Origin::Pended => sys::FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS,
            Origin::Inline => 0,
        };
        self.data.apply_with_flags(irql, flags);
    }

    /// Discards the changes: the copy gets back what it held when acquired and is applied
    /// unchanged (the documentation requires an apply for every acquire); acquired in
    /// classifyFn, the classify handle is released. Dropping the request does the same.
    pub fn discard(self, irql: &impl AtMostDispatch) {
        self.data.discard(irql);
    }
}

impl fmt::Debug for WritableConnectRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritableConnectRequest")
            .field("local", &self.local())
            .field("remote", &self.remote())
            .field("filter_id", &self.data.filter_id)
            .finish_non_exhaustive()
    }
}

/// A connect-redirect classification pended for redirection from another context, from
/// [`Classify::pend_redirect`]. Send it to a work item (or keep it for any thread at IRQL <=
/// `DISPATCH_LEVEL`); there acquire the connect request with
/// [`connect_request`](Self::connect_request), change and apply it, then
/// [`complete`](Self::complete) the pend. The request borrows the pend, so the pend cannot be
/// completed before the request is applied.
///
/// Dropping it uncompleted reauthorizes, as a dropped [`PendedDecision`] does.
#[must_use = "a pended classification holds the connection until it is completed"]
pub struct PendedRedirect {
    decision: PendedDecision,
    filter_id: u64,
}

impl PendedRedirect {
    /// Acquires the writable copy of the pended connection's connect request
    /// (`FwpsAcquireWritableLayerDataPointer0` with the classify handle that pended it). Apply
    /// it (or drop it, which discards the changes) before completing the pend.
    pub fn connect_request(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<WritableConnectRequest<'_>, RedirectError> {
        crate::irql::verify(irql);
        let handle = self
            .decision
            .classify_handle()
            .ok_or(RedirectError::NoClassifyContext)?;
        let filter_id = self.filter_id;
        let out = self.decision.classify_out_mut();
        // SAFETY: the handle pended a classification at ALE_CONNECT_REDIRECT (only
        // `Classify::pend_redirect` makes a `PendedRedirect`), not completed yet (`self` is
        // borrowed); `out` is the pend's copy of its classify-out; `layerData` there is an
        // FWPS_CONNECT_REQUEST0.
        let data = unsafe { WritableLayerData::acquire(handle, filter_id, out, Origin::Pended) }?;
        Ok(WritableConnectRequest { data })
    }

    /// Completes the pend with `action` as the final decision, as
    /// [`PendedDecision::complete`] does; the applied redirection stands.
    pub fn complete(self, irql: &impl AtMostDispatch, action: FinalAction) {
        self.decision.complete(irql, action);
    }

    /// Completes the pend without a decision, as [`PendedDecision::reauthorize`] does: the stack
    /// classifies the connection again at ALE_CONNECT_REDIRECT, with the request as applied.
    pub fn reauthorize(self, irql: &impl AtMostDispatch) {
        self.decision.reauthorize(irql);
    }
}

impl fmt::Debug for PendedRedirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendedRedirect")
            .field("decision", &self.decision)
            .field("filter_id", &self.filter_id)
            .finish()
    }
}

/// A redirect handle (`FwpsRedirectHandleCreate0`), which a callout puts in the connect request
/// to redirect a connection to a local process ([`WritableConnectRequest::redirect_locally`])
/// and by which it recognises its own redirections ([`Classify::redirect_state`]).
///
/// Create it once (at `PASSIVE_LEVEL`, typically in `DriverEntry`) and keep it in the driver's
/// state, as the documentation advises. Dropping it at `PASSIVE_LEVEL` destroys it
/// (`FwpsRedirectHandleDestroy0`); dropped above `PASSIVE_LEVEL` it cannot be, so it is leaked
/// with a debugger message — and the simulator stops at unload, as it does for every redirect
/// handle left undestroyed.
pub struct RedirectHandle {
    raw: NonNull<core::ffi::c_void>,
}

// SAFETY: a redirect handle is a kernel handle, usable from any thread.
unsafe impl Send for RedirectHandle {}
// SAFETY: every use through `&self` passes the handle to a routine that may run concurrently.
unsafe impl Sync for RedirectHandle {}

impl RedirectHandle {
    /// Creates a redirect handle for the provider `provider` (`FwpsRedirectHandleCreate0`,
    /// flags 0). `PASSIVE_LEVEL`. Windows 8 and later.
    pub fn create(irql: &impl AtPassive, provider: Guid) -> Result<Self, Status> {
        crate::irql::verify(irql);
        let key = provider.0;
        let mut raw: sys::HANDLE = core::ptr::null_mut();
        // SAFETY: PASSIVE_LEVEL (the token); `key` and `raw` are valid for the call.
        let status = unsafe { sys::FwpsRedirectHandleCreate0(&key, 0, &mut raw) };
        Status::from_ntstatus(status)?;
        let raw = NonNull::new(raw).ok_or(Status::FWP_NULL_POINTER)?;
        Ok(RedirectHandle { raw })
    }

    /// Destroys the handle (`FwpsRedirectHandleDestroy0`). `PASSIVE_LEVEL`.
    pub fn destroy(self, irql: &impl AtPassive) {
        crate::irql::verify(irql);
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is live and, `this` not being dropped,
        // destroyed exactly once.
        unsafe { sys::FwpsRedirectHandleDestroy0(this.raw.as_ptr()) };
    }

    /// The raw handle, for the `sys` routines.
    pub fn raw(&self) -> sys::HANDLE {
        self.raw.as_ptr()
    }
}

impl Drop for RedirectHandle {
    /// Destroys the handle at `PASSIVE_LEVEL`; above it, leaks it with a debugger message.
    fn drop(&mut self) {
        let irql = Irql::current();
        if irql != Irql::PASSIVE {
            crate::kd_print!(
                Error,
                "wfp-rs: a RedirectHandle was dropped at {irql}; FwpsRedirectHandleDestroy0 \
                 requires PASSIVE_LEVEL, so the handle is leaked (drop it at unload)\n"
            );
            return;
        }
        // SAFETY: PASSIVE_LEVEL (checked above); the handle is live and destroyed only here
        // (`destroy` does not run this destructor).
        unsafe { sys::FwpsRedirectHandleDestroy0(self.raw.as_ptr()) };
    }
}

impl fmt::Debug for RedirectHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedirectHandle").field(&self.raw).finish()
    }
}

/// What `FwpsQueryConnectionRedirectState0` says of a connection, relative to a redirect handle
/// ([`Classify::redirect_state`]), and what the documentation tells the callout to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedirectState {
    /// Not redirected (`FWPS_CONNECTION_NOT_REDIRECTED`): the callout may proxy it.
    NotRedirected,
    /// Redirected with this handle (`FWPS_CONNECTION_REDIRECTED_BY_SELF`), e.g. the proxy's own
    /// connection: permit (or continue), do not redirect again.
    RedirectedBySelf,
    /// Redirected with another handle (`FWPS_CONNECTION_REDIRECTED_BY_OTHER`): the callout may
    /// proxy it if it does not trust the other inspector.
    RedirectedByOther,
    /// Redirected with this handle, then again with another
    /// (`FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF`): must not redirect; permit or block it
    /// (at ALE_AUTH_CONNECT).
    PreviouslyRedirectedBySelf,
    /// A value this crate does not know, kept as is.
    Other(i32),
}

impl RedirectState {
    /// Interprets a raw `FWPS_CONNECTION_REDIRECT_STATE`.
    pub const fn from_raw(raw: sys::FWPS_CONNECTION_REDIRECT_STATE) -> RedirectState {
        match raw {
            sys::FWPS_CONNECTION_NOT_REDIRECTED => RedirectState::NotRedirected,
            sys::FWPS_CONNECTION_REDIRECTED_BY_SELF => RedirectState::RedirectedBySelf,
            sys::FWPS_CONNECTION_REDIRECTED_BY_OTHER => RedirectState::RedirectedByOther,
            sys::FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF => {
                RedirectState::PreviouslyRedirectedBySelf
            }
            other => RedirectState::Other(other),
        }
    }
}

/// At most this many versions of history are read: a longer chain is taken to be a cycle.
const MAX_HISTORY: usize = 64;

/// The earlier modifiers of a connect request (`R` = `FWPS_CONNECT_REQUEST0`) or a bind request
/// (`FWPS_BIND_REQUEST0`): see [`WritableConnectRequest::previous_modifiers`] and
/// [`WritableBindRequest::previous_modifiers`].
pub struct PreviousModifiers<'r, R = sys::FWPS_CONNECT_REQUEST0> {
    next: *mut R,
    remaining: usize,
    _request: PhantomData<&'r R>,
}

impl<R: history::Versioned> Iterator for PreviousModifiers<'_, R> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // SAFETY: `previousVersion` links are the engine's read-only history, valid while the
        // writable copy they hang from is (borrowed for 'r); null ends the chain.
        let version = unsafe { self.next.as_ref() }?;
        self.next = version.previous_version();
        Some(version.modifier_filter_id())
    }
}

impl<R> fmt::Debug for PreviousModifiers<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreviousModifiers").finish_non_exhaustive()
    }
}

/// The bytes of a `SOCKADDR_STORAGE`, in memory order.
fn storage_bytes(storage: &sys::SOCKADDR_STORAGE) -> [u8; 128] {
    let mut bytes = [0u8; 128];
    bytes[0..2].copy_from_slice(&storage.ss_family.to_ne_bytes());
    for (byte, pad) in bytes[2..8].iter_mut().zip(storage.__ss_pad1) {
        *byte = pad.to_ne_bytes()[0];
    }
    bytes[8..16].copy_from_slice(&storage.__ss_align.to_ne_bytes());
    for (byte, pad) in bytes[16..].iter_mut().zip(storage.__ss_pad2) {
        *byte = pad.to_ne_bytes()[0];
    }
    bytes
}

fn storage_from_bytes(bytes: &[u8; 128]) -> sys::SOCKADDR_STORAGE {
    let mut storage = sys::SOCKADDR_STORAGE {
        ss_family: u16::from_ne_bytes([bytes[0], bytes[1]]),
        __ss_pad1: [0; 6],
        __ss_align: 0,
        __ss_pad2: [0; 112],
    };
    for (pad, byte) in storage.__ss_pad1.iter_mut().zip(&bytes[2..8]) {
        *pad = i8::from_ne_bytes([*byte]);
    }
    let mut align = [0u8; 8];
    align.copy_from_slice(&bytes[8..16]);
    storage.__ss_align = i64::from_ne_bytes(align);
    for (pad, byte) in storage.__ss_pad2.iter_mut().zip(&bytes[16..]) {
        *pad = i8::from_ne_bytes([*byte]);
    }
    storage
}

/// The socket address a `SOCKADDR_STORAGE` holds, read as the `SOCKADDR_IN` or `SOCKADDR_IN6`
/// its `ss_family` says; `None` for another family.
pub fn socket_address_from_storage(storage: &sys::SOCKADDR_STORAGE) -> Option<SocketAddr> {
    let b = storage_bytes(storage);
    let port = u16::from_be_bytes([b[2], b[3]]);
    match storage.ss_family {
        sys::AF_INET => {
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        sys::AF_INET6 => {
            let flow_info = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[8..24]);
            let scope_id = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip, port, flow_info, scope_id,
            )))
        }
        _ => None,
    }
}

/// A `SOCKADDR_STORAGE` holding `address` as a `SOCKADDR_IN` or `SOCKADDR_IN6` (port, address
/// and flow info in network byte order, as ws2def.h has them), the rest zero.
pub fn storage_from_socket_address(address: SocketAddr) -> sys::SOCKADDR_STORAGE {
    let mut b = [0u8; 128];
    b[2..4].copy_from_slice(&address.port().to_be_bytes());
    let family = match address {
        SocketAddr::V4(v4) => {
            b[4..8].copy_from_slice(&v4.ip().octets());
            sys::AF_INET
        }
        SocketAddr::V6(v6) => {
            b[4..8].copy_from_slice(&v6.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&v6.ip().octets());
            b[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            sys::AF_INET6
        }
    };
    b[0..2].copy_from_slice(&family.to_ne_bytes());
    storage_from_bytes(&b)
}

// --- Redirecting a bind, and the acquire/apply plumbing both requests share ------------------

/// The layers whose `layerData` is a bind request (`FWPS_BIND_REQUEST0`):
/// ALE_BIND_REDIRECT_V4 and ALE_BIND_REDIRECT_V6. Only these have [`Classify::bind_request`];
/// elsewhere it does not compile.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no bind request to redirect",
    label = "`bind_request` is only for ALE_BIND_REDIRECT_V4 and ALE_BIND_REDIRECT_V6",
    note = "register the callout at ALE_BIND_REDIRECT to change the local address or port a socket binds to"
)]
pub trait BindRedirectLayer: Layer + bind_sealed::Sealed {}

mod bind_sealed {
    pub trait Sealed {}
}

impl bind_sealed::Sealed for crate::layer::AleBindRedirectV4 {}
impl BindRedirectLayer for crate::layer::AleBindRedirectV4 {}
impl bind_sealed::Sealed for crate::layer::AleBindRedirectV6 {}
impl BindRedirectLayer for crate::layer::AleBindRedirectV6 {}

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// Acquires the writable copy of this socket's bind request (`FwpsAcquireClassifyHandle0`,
    /// then `FwpsAcquireWritableLayerDataPointer0`). Apply it with
    /// [`WritableBindRequest::apply`]; dropping it discards the changes. See
    /// [Redirecting a bind](crate::redirect#redirecting-a-bind).
    ///
    /// Refused with [`RedirectError::NoWriteRight`] when a higher-priority filter decided.
    pub fn bind_request(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<WritableBindRequest<'_>, RedirectError>
    where
        L: BindRedirectLayer,
    {
        let ipv4 = L::ID == crate::layer::AleBindRedirectV4::ID;
        // SAFETY: `layerData` at ALE_BIND_REDIRECT (the `L` bound) is an FWPS_BIND_REQUEST0.
        let data = unsafe { self.acquire_writable::<sys::FWPS_BIND_REQUEST0>(irql) }?;
        Ok(WritableBindRequest { data, ipv4 })
    }

    /// `FwpsAcquireClassifyHandle0` + `FwpsAcquireWritableLayerDataPointer0`: the writable copy
    /// of this classification's layer data, which must be a `T`.
    ///
    /// # Safety
    ///
    /// `T` is the type of `layerData` at layer `L`.
    unsafe fn acquire_writable<T: Copy>(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<WritableLayerData<'_, T>, RedirectError> {
        crate::irql::verify(irql);
        if !self.out.can_write() {
            return Err(RedirectError::NoWriteRight);
        }
        if self.classify_context.is_null() {
            return Err(RedirectError::NoClassifyContext);
        }
        let mut handle: u64 = 0;
        // SAFETY: the classify context is the engine's for this classification, in progress
        // (we are in classifyFn: `self` is borrowed from the trampoline); IRQL <= DISPATCH_LEVEL.
        let status = unsafe {
            sys::FwpsAcquireClassifyHandle0(self.classify_context.cast_mut(), 0, &mut handle)
        };
        Status::from_ntstatus(status).map_err(RedirectError::Refused)?;
        let filter_id = self.filter.id();
        let out = self.out.raw();
        // SAFETY: the handle was just acquired for this classification, in progress; `out` is
        // its classify-out; `T` is its layer data's type (this function's contract).
        let acquired =
            unsafe { WritableLayerData::acquire(handle, filter_id, out, Origin::Inline) };
        if acquired.is_err() {
            // SAFETY: acquired above, nothing acquired with it (the acquire failed), released
            // once.
            unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
        }
        acquired
    }
}

/// Where a writable copy was acquired, which decides whether its apply releases the classify
/// handle.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// In classifyFn: the copy owns the classify handle and releases it after the apply.
    Inline,
    /// From a [`PendedRedirect`], which owns the handle and releases it after the completion.
    Pended,
}

/// The engine's writable copy of a classification's layer data (a `T`), and what handing it
/// back takes. Applied once, by [`apply`](Self::apply) or, with what it held when acquired, on
/// drop; either way the classify-out's action and rights are put back as they were before the
/// acquire, and a copy acquired in classifyFn ([`Origin::Inline`]) releases the classify
/// handle.
struct WritableLayerData<'a, T: Copy> {
    handle: u64,
    filter_id: u64,
    writable: NonNull<T>,
    /// What the copy held when acquired, restored if it is dropped un-applied.
    original: T,
    out: NonNull<sys::FWPS_CLASSIFY_OUT0>,
    action_before: u32,
    rights_before: u32,
    origin: Origin,
    /// Applied (by `apply`, or by `drop`), and released if the copy owns the handle.
    released: bool,
    /// Borrows the classification or the pend (and its classify-out) mutably, and whatever the
    /// copy points into (a connect request's redirect handle); not `Send`.
    _classification: PhantomData<&'a mut sys::FWPS_CLASSIFY_OUT0>,
}

impl<'a, T: Copy> WritableLayerData<'a, T> {
    /// `FwpsAcquireWritableLayerDataPointer0` with `handle`; on failure the caller still owns
    /// the handle.
    ///
    /// # Safety
    ///
    /// `handle` is a classify handle of a classification in progress, or pended and not
    /// completed, whose `layerData` is a `T`; `out` is its classify-out (or the pend's copy of
    /// it).
    unsafe fn acquire(
        handle: u64,
        filter_id: u64,
        out: &'a mut sys::FWPS_CLASSIFY_OUT0,
        origin: Origin,
    ) -> Result<Self, RedirectError> {
        let (action_before, rights_before) = (out.actionType, out.rights);
        let mut data: sys::PVOID = core::ptr::null_mut();
        // SAFETY: by this function's contract; `data` is writable.
        let status = unsafe {
            sys::FwpsAcquireWritableLayerDataPointer0(handle, filter_id, 0, &mut data, out)
        };
        Status::from_ntstatus(status).map_err(RedirectError::Refused)?;
        // INFERRED: success without data does not happen.
        let writable = NonNull::new(data.cast::<T>())
            .ok_or(RedirectError::Refused(Status::FWP_NULL_POINTER))?;
        // SAFETY: the engine returned a valid, writable copy of the layer data, a `T` by this
        // function's contract.
        let original = unsafe { writable.as_ptr().read() };
        Ok(WritableLayerData {
            handle,
            filter_id,
            writable,
            original,
            out: NonNull::from(out),
            action_before,
            rights_before,
            origin,
            released: false,
            _classification: PhantomData,
        })
    }

    fn get(&self) -> &T {
        // SAFETY: the engine's writable copy, valid until it is applied (which consumes `self`).
        unsafe { self.writable.as_ref() }
    }

    fn get_mut(&mut self) -> &mut T {
        // SAFETY: the engine's writable copy, valid until applied; `self` is borrowed mutably,
        // so no reference from `get` is alive.
        unsafe { self.writable.as_mut() }
    }

    fn apply(self, irql: &impl AtMostDispatch) {
        self.apply_with_flags(irql, 0);
    }

    /// Applies with `flags` for `FwpsApplyModifiedLayerData0`.
    fn apply_with_flags(mut self, irql: &impl AtMostDispatch, flags: u32) {
        crate::irql::verify(irql);
        self.apply_and_release(flags);
    }

    fn discard(self, irql: &impl AtMostDispatch) {
        crate::irql::verify(irql);
        drop(self);
    }

    fn apply_and_release(&mut self, flags: u32) {
        if self.released {
            return;
        }
        self.released = true;
        // SAFETY: the copy the engine handed out with this handle, applied once (`released`
        // guards it); IRQL <= DISPATCH_LEVEL.
        unsafe {
            sys::FwpsApplyModifiedLayerData0(self.handle, self.writable.as_ptr().cast(), flags);
        }
        // SAFETY: the classify-out of the classification (or the pend's copy) `self` borrows.
        let out = unsafe { self.out.as_mut() };
        out.actionType = self.action_before;
        out.rights = self.rights_before;
        if self.origin == Origin::Inline {
            // SAFETY: acquired in `acquire_writable`, released once, after its apply.
            unsafe { sys::FwpsReleaseClassifyHandle0(self.handle) };
        }
    }
}

impl<T: Copy + history::Versioned> WritableLayerData<'_, T> {
    fn previous_modifiers(&self) -> PreviousModifiers<'_, T> {
        PreviousModifiers {
            next: self.get().previous_version(),
            remaining: MAX_HISTORY,
            _request: PhantomData,
        }
    }

    fn redirected_by_this_filter(&self) -> bool {
        self.previous_modifiers().any(|id| id == self.filter_id)
    }
}

impl<T: Copy> Drop for WritableLayerData<'_, T> {
    fn drop(&mut self) {
        if !self.released {
            *self.get_mut() = self.original;
            self.apply_and_release(0);
        }
    }
}

/// The writable copy of a socket's bind request, from [`Classify::bind_request`]. Apply it once
/// with [`apply`](Self::apply); dropping it restores and applies what it held (the socket binds
/// where it was binding). Either way the classify handle is released.
#[must_use = "dropping the request discards the changes; call `apply` to redirect"]
pub struct WritableBindRequest<'a> {
    data: WritableLayerData<'a, sys::FWPS_BIND_REQUEST0>,
    /// Whether the layer is ALE_BIND_REDIRECT_V4 (otherwise V6).
    ipv4: bool,
}

impl WritableBindRequest<'_> {
    /// The local address and port the socket binds to (`localAddressAndPort`); `None` for an
    /// address family other than IPv4 or IPv6. A port of 0 asks the stack to pick one.
    pub fn local(&self) -> Option<SocketAddr> {
        socket_address_from_storage(&self.data.get().localAddressAndPort)
    }

    /// Binds the socket to `local` instead (address and port). It must be of the layer's IP
    /// version (IPv4 at ALE_BIND_REDIRECT_V4, IPv6 at V6), or
    /// [`RedirectError::WrongIpVersion`] and nothing changes.
    pub fn set_local(&mut self, local: SocketAddr) -> Result<(), RedirectError> {
        if local.is_ipv4() != self.ipv4 {
            return Err(RedirectError::WrongIpVersion);
        }
        self.data.get_mut().localAddressAndPort = storage_from_socket_address(local);
        Ok(())
    }

    /// The port reservation token (`portReservationToken`): 0, or the token of a port reserved
    /// with `CreatePersistentTcpPortReservation`/`CreatePersistentUdpPortReservation`.
    pub fn port_reservation_token(&self) -> u64 {
        self.data.get().portReservationToken
    }

    /// Binds the socket through the port reservation `token` (0 for none).
    pub fn set_port_reservation_token(&mut self, token: u64) {
        self.data.get_mut().portReservationToken = token;
    }

    /// The filter ids of the earlier modifications, newest first (the `modifierFilterId` of
    /// each `previousVersion`). Empty if no filter has changed the request.
    pub fn previous_modifiers(&self) -> PreviousModifiers<'_, sys::FWPS_BIND_REQUEST0> {
        self.data.previous_modifiers()
    }

    /// Whether the filter that called this callout changed the request before: the bind was
    /// redirected by this callout already.
    pub fn redirected_by_this_filter(&self) -> bool {
        self.data.redirected_by_this_filter()
    }

    /// Hands the copy back to the engine (`FwpsApplyModifiedLayerData0`), so the socket binds to
    /// the address and port it holds, and releases the classify handle. The classify-out's
    /// action and rights are put back as they were before the acquire.
    pub fn apply(self, irql: &impl AtMostDispatch) {
        self.data.apply(irql);
    }

    /// Discards the changes: the copy gets back what it held when acquired and is applied
    /// unchanged (the documentation requires an apply for every acquire), and the classify
    /// handle is released. Dropping the request does the same.
    pub fn discard(self, irql: &impl AtMostDispatch) {
        self.data.discard(irql);
    }
}

impl fmt::Debug for WritableBindRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritableBindRequest")
            .field("local", &self.local())
            .field("port_reservation_token", &self.port_reservation_token())
            .field("filter_id", &self.data.filter_id)
            .finish_non_exhaustive()
    }
}

/// A request with a modification history: `previousVersion` and `modifierFilterId`.
mod history {
    use crate::sys;

    pub trait Versioned {
        fn previous_version(&self) -> *mut Self;
        fn modifier_filter_id(&self) -> u64;
    }

    impl Versioned for sys::FWPS_CONNECT_REQUEST0 {
        fn previous_version(&self) -> *mut Self {
            self.previousVersion
        }
        fn modifier_filter_id(&self) -> u64 {
            self.modifierFilterId
        }
    }

    impl Versioned for sys::FWPS_BIND_REQUEST0 {
        fn previous_version(&self) -> *mut Self {
            self.previousVersion
        }
        fn modifier_filter_id(&self) -> u64 {
            self.modifierFilterId
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_storage() {
        for address in [
            "192.0.2.7:8080".parse::<SocketAddr>().unwrap(),
            "[2001:db8::5]:443".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0x12345, 7)),
        ] {
            let storage = storage_from_socket_address(address);
            assert_eq!(socket_address_from_storage(&storage), Some(address));
        }
    }

    #[test]
    fn ipv4_storage_is_a_sockaddr_in_in_network_byte_order() {
        let storage = storage_from_socket_address("10.1.2.3:258".parse().unwrap());
        let bytes = storage_bytes(&storage);
        assert_eq!(&bytes[0..8], &[2, 0, 1, 2, 10, 1, 2, 3]);
        assert!(bytes[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn unknown_family_reads_as_none() {
        let mut storage = storage_from_socket_address("10.1.2.3:1".parse().unwrap());
        storage.ss_family = 1;
        assert_eq!(socket_address_from_storage(&storage), None);
    }
}
