//! A session with the filter engine: add and delete providers, sublayers, callouts and filters,
//! in transactions. Wraps `FwpmEngineOpen0` and the `Fwpm*` management functions of `fwpmk.h`.
//!
//! Every management function requires `PASSIVE_LEVEL`, so every method here takes
//! `&impl` [`AtPassive`], which only a `&PassiveLevel` satisfies: driver
//! entry, unload and work items have one; a classify callback, which may run at
//! `DISPATCH_LEVEL`, does not, and cannot add or delete a filter.
//!
//! ```
//! use wfp_rs::callout::CalloutKey;
//! use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
//! use wfp_rs::filter::{Filter, FilterAction, Match};
//! use wfp_rs::layer::{fields, AleAuthConnectV4};
//! use wfp_rs::{guid, Guid};
//!
//! const PROVIDER: Guid = guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e101");
//! const SUBLAYER: Guid = guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e102");
//! const CALLOUT: CalloutKey<AleAuthConnectV4> =
//!     CalloutKey::new(guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e103"));
//! const FILTER: Guid = guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e104");
//!
//! # wfp_rs_sim::Machine::new().at_passive(|irql| {
//! // A dynamic session: everything it adds is deleted when it closes (or is dropped).
//! let engine = Engine::open(irql, SessionOptions::new().dynamic().name("example firewall"))?;
//!
//! // All or nothing: the transaction is aborted unless it is committed.
//! let txn = engine.transaction(irql)?;
//! txn.add_provider(irql, &Provider::new(PROVIDER).name("Example"))?;
//! txn.add_sublayer(irql, &Sublayer::new(SUBLAYER).name("Example rules").provider(PROVIDER))?;
//! txn.add_callout(irql, &CalloutEntry::new(CALLOUT).name("Ask the service"))?;
//! let filter = Filter::<AleAuthConnectV4>::new(FILTER)
//!     .name("Outbound TCP to the callout")
//!     .sublayer(SUBLAYER)
//!     .action(FilterAction::CalloutTerminating(CALLOUT))
//!     .condition::<fields::IpProtocol>(Match::Equal(wfp_rs::layer::value::IpProtocol::Tcp));
//! let filter_id = txn.add_filter(irql, &filter)?;
//! txn.commit(irql)?;
//!
//! engine.delete_filter(irql, filter_id)?;
//! engine.close(irql)?;
//! # Ok::<(), wfp_rs::Status>(())
//! # }).unwrap();
//! ```
//!
//! # Dropping at the wrong IRQL
//!
//! [`Engine`] and [`Transaction`] clean up when dropped (`FwpmEngineClose0`,
//! `FwpmTransactionAbort0`), and both of those require `PASSIVE_LEVEL`. `Drop` cannot take a
//! token, so it checks the IRQL at run time: above `PASSIVE_LEVEL` (for example, the last
//! `Arc<Engine>` released in a classify callback) it does **not** call the function, prints an
//! error to the kernel debugger and leaks the session (or leaves the transaction open, to be
//! aborted when the session closes). Close explicitly with [`Engine::close`] and
//! [`Transaction::commit`]/[`Transaction::abort`] from `PASSIVE_LEVEL` code to avoid that.
//!
//! A leaked session stays open after the driver unloads — on Windows nothing closes it, so the
//! filters of a dynamic session keep acting (a terminating filter whose callout is unregistered
//! blocks). The simulator stops with `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`
//! (0xCE, parameter 2 = the engine handle, parameter 3 = 4) when a driver unloads with a session
//! it opened still open: leaked this way, forgotten, or kept in a static.
//!
//! # Memory
//!
//! Display names and the other strings the engine takes as NUL-terminated UTF-16 are converted
//! into [`alloc::vec::Vec<u16>`] buffers that live for the duration of the call. Names have no
//! length limit that way, and a failed allocation is reported as
//! `STATUS_INSUFFICIENT_RESOURCES` (the buffers are reserved with `try_reserve`), not a panic.
//! A driver image therefore needs a global allocator, such as
//! [`PoolAllocator`](crate::pool::PoolAllocator) (see `examples/minimal-driver`).

use alloc::vec::Vec;
use core::fmt;
use core::mem::ManuallyDrop;
use core::ops::Deref;
use core::ptr;
use core::time::Duration;

use crate::callout::CalloutKey;
use crate::filter::{EMPTY_BLOB, Filter, FilterId, try_vec};
use crate::guid::Guid;
use crate::irql::{AtPassive, Irql, verify};
use crate::kd_print;
use crate::layer::Layer;
use crate::status::Status;
use crate::sys;

/// `RPC_C_AUTHN_DEFAULT` (rpcdce.h): the authentication service kernel-mode callers pass to
/// `FwpmEngineOpen0` (the only other one allowed is `RPC_C_AUTHN_WINNT`).
const RPC_C_AUTHN_DEFAULT: u32 = 0xFFFF_FFFF;

/// `INFINITE` (winbase.h), as a transaction wait timeout.
const INFINITE: u32 = 0xFFFF_FFFF;

/// How to open a session: [`Engine::open`]'s options. Wraps `FWPM_SESSION0`.
///
/// ```
/// use core::time::Duration;
/// use wfp_rs::engine::SessionOptions;
///
/// let options = SessionOptions::new()
///     .dynamic()
///     .name("my firewall")
///     .txn_wait_timeout(Duration::from_secs(5));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct SessionOptions<'a> {
    dynamic: bool,
    name: Option<&'a str>,
    description: Option<&'a str>,
    txn_wait_timeout_ms: u32,
}

impl<'a> SessionOptions<'a> {
    /// A non-dynamic session with no name and the engine's default transaction wait timeout.
    pub const fn new() -> SessionOptions<'a> {
        SessionOptions {
            dynamic: false,
            name: None,
            description: None,
            txn_wait_timeout_ms: 0,
        }
    }

    /// `FWPM_SESSION_FLAG_DYNAMIC`: every object added in the session is deleted when the
    /// session closes. Persistent objects cannot be added in a dynamic session.
    pub const fn dynamic(mut self) -> Self {
        self.dynamic = true;
        self
    }

    /// The session's display name (`displayData.name`).
    pub const fn name(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }

    /// The session's description (`displayData.description`).
    pub const fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// How long [`Engine::transaction`] waits for another session's transaction to end
    /// (`txnWaitTimeoutInMSec`). Rounded up to whole milliseconds and at least 1 ms (0 would
    /// select the engine's default); `u32::MAX` milliseconds or more wait forever (`INFINITE`).
    /// Without this option the engine's default applies (15 seconds, as documented).
    pub fn txn_wait_timeout(mut self, timeout: Duration) -> Self {
        let rounded_up =
            timeout.as_millis() + u128::from(!timeout.subsec_nanos().is_multiple_of(1_000_000));
        self.txn_wait_timeout_ms = u32::try_from(rounded_up.max(1)).unwrap_or(INFINITE);
        self
    }
}

/// An open session with the filter engine (an engine handle from `FwpmEngineOpen0`).
///
/// Methods work inside and outside a [`Transaction`]: while one is open, everything done with
/// the session (also through `&Engine`, also from another thread) belongs to it.
///
/// The session is closed by [`close`](Engine::close) or when the `Engine` is dropped at
/// `PASSIVE_LEVEL` (see the [module documentation](self) for drops at a higher IRQL). An
/// `Engine` may be shared between threads (the engine handle is not tied to a thread), for
/// example in a driver's state.
pub struct Engine {
    handle: sys::HANDLE,
}

// SAFETY: the handle names a session of the filter engine, not anything of the opening thread;
// the management functions may be called with it from any thread at PASSIVE_LEVEL.
unsafe impl Send for Engine {}
// SAFETY: `&Engine` only lets callers pass the handle (by value) to management functions; the
// engine serialises the calls of a session (they are requests to the filter engine, which
// applies them one transaction at a time), so concurrent calls with one handle are sound.
unsafe impl Sync for Engine {}

impl Engine {
    /// Opens a session with the local filter engine, in kernel mode. Wraps `FwpmEngineOpen0`
    /// (no server name, `RPC_C_AUTHN_DEFAULT`, no identity).
    ///
    /// ```
    /// use wfp_rs::engine::{Engine, SessionOptions};
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
    /// engine.close(irql)?;
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    pub fn open(irql: &impl AtPassive, options: SessionOptions<'_>) -> Result<Engine, Status> {
        verify(irql);
        let mut display = DisplayData::new(options.name.unwrap_or(""), options.description)?;
        let session = sys::FWPM_SESSION0 {
            sessionKey: Guid::default().0,
            displayData: display.raw(),
            flags: if options.dynamic {
                sys::FWPM_SESSION_FLAG_DYNAMIC
            } else {
                0
            },
            txnWaitTimeoutInMSec: options.txn_wait_timeout_ms,
            processId: 0,
            sid: ptr::null_mut(),
            username: ptr::null_mut(),
            kernelMode: 0,
        };
        let mut handle: sys::HANDLE = ptr::null_mut();
        // SAFETY: PASSIVE_LEVEL (the token). `session` and the strings it points to live until
        // the call returns; a null server name and identity select the local engine in kernel
        // mode; `handle` is writable.
        let status = unsafe {
            sys::FwpmEngineOpen0(
                ptr::null(),
                RPC_C_AUTHN_DEFAULT,
                ptr::null_mut(),
                &session,
                &mut handle,
            )
        };
        Status::from_ntstatus(status)?;
        Ok(Engine { handle })
    }

    /// Closes the session, reporting the engine's status. Wraps `FwpmEngineClose0`. A
    /// transaction still open is aborted (the engine does that). In a dynamic session, every
    /// object the session added is deleted; a non-dynamic session's objects stay until deleted.
    pub fn close(self, irql: &impl AtPassive) -> Result<(), Status> {
        verify(irql);
        let this = ManuallyDrop::new(self);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open, and `this` is not dropped, so
        // it is closed exactly once.
        Status::from_ntstatus(unsafe { sys::FwpmEngineClose0(this.handle) })
    }

    /// Begins an explicit transaction in this session. Wraps `FwpmTransactionBegin0`.
    ///
    /// The transaction is aborted (everything done in it is rolled back) unless
    /// [`Transaction::commit`] is called. A session has at most one transaction at a time:
    /// beginning another fails with `STATUS_FWP_TXN_IN_PROGRESS`.
    ///
    /// ```
    /// use wfp_rs::engine::{Engine, SessionOptions, Sublayer};
    /// use wfp_rs::guid;
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
    /// let txn = engine.transaction(irql)?;
    /// txn.add_sublayer(irql, &Sublayer::new(guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e111")))?;
    /// txn.commit(irql)?;
    /// # Ok::<(), wfp_rs::Status>(())
    /// # }).unwrap();
    /// ```
    pub fn transaction(&self, irql: &impl AtPassive) -> Result<Transaction<'_>, Status> {
        verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open. Flags 0: a read-write
        // transaction.
        Status::from_ntstatus(unsafe { sys::FwpmTransactionBegin0(self.handle, 0) })?;
        Ok(Transaction { engine: self })
    }

    /// Adds a provider. Wraps `FwpmProviderAdd0` (no security descriptor).
    pub fn add_provider(
        &self,
        irql: &impl AtPassive,
        provider: &Provider<'_>,
    ) -> Result<(), Status> {
        verify(irql);
        let mut display = DisplayData::new(provider.name, provider.description)?;
        let raw = sys::FWPM_PROVIDER0 {
            providerKey: provider.key.0,
            displayData: display.raw(),
            flags: if provider.persistent {
                sys::FWPM_PROVIDER_FLAG_PERSISTENT
            } else {
                0
            },
            providerData: EMPTY_BLOB,
            serviceName: ptr::null_mut(),
        };
        // SAFETY: PASSIVE_LEVEL (the token); `raw` and the strings it points to live until the
        // call returns (the engine copies them); a null security descriptor is allowed.
        let status = unsafe { sys::FwpmProviderAdd0(self.handle, &raw, ptr::null_mut()) };
        Status::from_ntstatus(status)
    }

    /// Adds a sublayer. Wraps `FwpmSubLayerAdd0` (no security descriptor).
    pub fn add_sublayer(
        &self,
        irql: &impl AtPassive,
        sublayer: &Sublayer<'_>,
    ) -> Result<(), Status> {
        verify(irql);
        let mut display = DisplayData::new(sublayer.name, sublayer.description)?;
        let mut provider = sublayer.provider.map(|key| key.0);
        let raw = sys::FWPM_SUBLAYER0 {
            subLayerKey: sublayer.key.0,
            displayData: display.raw(),
            flags: if sublayer.persistent {
                sys::FWPM_SUBLAYER_FLAG_PERSISTENT
            } else {
                0
            },
            providerKey: provider.as_mut().map_or(ptr::null_mut(), ptr::from_mut),
            providerData: EMPTY_BLOB,
            weight: sublayer.weight,
        };
        // SAFETY: PASSIVE_LEVEL (the token); `raw` and everything it points to live until the
        // call returns (the engine copies them); a null security descriptor is allowed.
        let status = unsafe { sys::FwpmSubLayerAdd0(self.handle, &raw, ptr::null_mut()) };
        Status::from_ntstatus(status)
    }

    /// Adds a callout's management object (its key, layer and name) and returns the callout's
    /// runtime id. Wraps `FwpmCalloutAdd0` (no security descriptor). The layer is the key's
    /// ([`CalloutKey<L>`]), the one the callout is registered for.
    ///
    /// If this driver has registered the key's GUID for another layer (two `CalloutKey`s with
    /// one GUID), the entry is deleted again and `STATUS_FWP_INCOMPATIBLE_LAYER` returned, with
    /// a debugger message: every classification would reach the callout at the wrong layer.
    /// (Registered after the entry is added, the same mistake is caught at the first
    /// classification; see [`callout`](crate::callout#one-layer-per-key).)
    ///
    /// Filters can name a callout as their action only once it is added here. Its classify
    /// function is registered separately (`FwpsCalloutRegister3`), in either order; while it is
    /// not registered, a filter that calls it with a terminating or unknown action blocks,
    /// unless the filter has
    /// [`PERMIT_IF_CALLOUT_UNREGISTERED`](crate::filter::FilterFlags::PERMIT_IF_CALLOUT_UNREGISTERED).
    pub fn add_callout<L: Layer>(
        &self,
        irql: &impl AtPassive,
        callout: &CalloutEntry<'_, L>,
    ) -> Result<u32, Status> {
        verify(irql);
        let mut display = DisplayData::new(callout.name, callout.description)?;
        let mut provider = callout.provider.map(|key| key.0);
        let raw = sys::FWPM_CALLOUT0 {
            calloutKey: callout.key.guid().0,
            displayData: display.raw(),
            flags: if callout.persistent {
                sys::FWPM_CALLOUT_FLAG_PERSISTENT
            } else {
                0
            },
            providerKey: provider.as_mut().map_or(ptr::null_mut(), ptr::from_mut),
            providerData: EMPTY_BLOB,
            applicableLayer: L::KEY.0,
            calloutId: 0,
        };
        let mut id = 0u32;
        // SAFETY: PASSIVE_LEVEL (the token); `raw` and everything it points to live until the
        // call returns (the engine copies them); a null security descriptor is allowed; `id` is
        // writable.
        let status = unsafe { sys::FwpmCalloutAdd0(self.handle, &raw, ptr::null_mut(), &mut id) };
        Status::from_ntstatus(status)?;
        // The runtime id is the one `FwpsCalloutRegister3` returned for the key (as
        // `FwpmCalloutAdd0`'s reference page documents): if this driver registered the key's
        // GUID for another layer (two `CalloutKey`s sharing a GUID, which the compiler cannot
        // see), every classification would be at the wrong layer.
        if let Some(registered) = crate::callout::registered_layer(id)
            && registered != L::ID
        {
            let name = |id| crate::layer::layer_by_id(id).map_or("unknown", |l| l.name);
            kd_print!(
                Error,
                "wfp-rs: callout {} is registered at layer {}, not added at {}; one CalloutKey \
                 and GUID per layer\n",
                callout.key,
                name(registered),
                L::NAME
            );
            // SAFETY: PASSIVE_LEVEL (the token); the handle is open; the key lives for the call.
            let _ = unsafe { sys::FwpmCalloutDeleteByKey0(self.handle, &raw.calloutKey) };
            return Err(Status::FWP_INCOMPATIBLE_LAYER);
        }
        Ok(id)
    }

    /// Adds a filter and returns its runtime id. Wraps `FwpmFilterAdd0` (no security
    /// descriptor).
    ///
    /// Besides the engine's errors (`STATUS_FWP_SUBLAYER_NOT_FOUND`,
    /// `STATUS_FWP_CALLOUT_NOT_FOUND`, `STATUS_FWP_ALREADY_EXISTS`, ...), this reports what the
    /// [`Filter`] builder met without calling the engine: no action
    /// (`STATUS_FWP_INVALID_ACTION_TYPE`), a weight range above 15
    /// (`STATUS_FWP_INVALID_WEIGHT`), a match the value type does not support
    /// (`STATUS_FWP_MATCH_TYPE_MISMATCH`), a prefix length beyond the address
    /// (`STATUS_INVALID_PARAMETER`), or no memory (`STATUS_INSUFFICIENT_RESOURCES`).
    pub fn add_filter<L: Layer>(
        &self,
        irql: &impl AtPassive,
        filter: &Filter<'_, L>,
    ) -> Result<FilterId, Status> {
        verify(irql);
        let mut id = 0u64;
        let status = filter.with_raw(|raw| {
            // SAFETY: PASSIVE_LEVEL (the token); `raw` and every structure it points to live
            // until `with_raw` returns, after this call (the engine copies the filter); a null
            // security descriptor is allowed; `id` is writable.
            unsafe { sys::FwpmFilterAdd0(self.handle, raw, ptr::null_mut(), &mut id) }
        })?;
        Status::from_ntstatus(status)?;
        Ok(FilterId::from_raw(id))
    }

    /// Deletes a filter. Wraps `FwpmFilterDeleteById0`. Fails with
    /// `STATUS_FWP_FILTER_NOT_FOUND` if there is no filter with that id.
    pub fn delete_filter(&self, irql: &impl AtPassive, id: FilterId) -> Result<(), Status> {
        verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open.
        Status::from_ntstatus(unsafe { sys::FwpmFilterDeleteById0(self.handle, id.raw()) })
    }

    /// Deletes the filter with key `key`. Wraps `FwpmFilterDeleteByKey0`. Fails with
    /// `STATUS_FWP_FILTER_NOT_FOUND` if there is none. A filter's key stays the same across
    /// reboots (its id does not), so this is how an installer removes the
    /// [persistent](crate::filter::FilterFlags::PERSISTENT) and
    /// [boot-time](crate::filter::FilterFlags::BOOT_TIME) filters an earlier run added.
    ///
    /// ```
    /// use wfp_rs::engine::{Engine, SessionOptions};
    /// use wfp_rs::filter::{Filter, FilterAction};
    /// use wfp_rs::layer::AleAuthConnectV4;
    /// use wfp_rs::{guid, Guid, Status};
    ///
    /// const FILTER: Guid = guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e121");
    /// # wfp_rs_sim::Machine::new().at_passive(|irql| {
    /// let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
    /// let block = Filter::<AleAuthConnectV4>::new(FILTER).name("Block").action(FilterAction::Block);
    /// engine.add_filter(irql, &block)?;
    /// engine.delete_filter_by_key(irql, FILTER)?;
    /// assert_eq!(engine.delete_filter_by_key(irql, FILTER), Err(Status::FWP_FILTER_NOT_FOUND));
    /// engine.close(irql)?;
    /// # Ok::<(), Status>(())
    /// # }).unwrap();
    /// ```
    pub fn delete_filter_by_key(&self, irql: &impl AtPassive, key: Guid) -> Result<(), Status> {
        verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open; `key` lives for the call.
        Status::from_ntstatus(unsafe { sys::FwpmFilterDeleteByKey0(self.handle, key.raw()) })
    }

    /// Deletes a callout's management object. Wraps `FwpmCalloutDeleteByKey0`. Fails with
    /// `STATUS_FWP_IN_USE` while filters use the callout.
    pub fn delete_callout<L: Layer>(
        &self,
        irql: &impl AtPassive,
        key: CalloutKey<L>,
    ) -> Result<(), Status> {
        verify(irql);
        let key = key.guid();
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open; `key` lives for the call.
        Status::from_ntstatus(unsafe { sys::FwpmCalloutDeleteByKey0(self.handle, key.raw()) })
    }

    /// Deletes a sublayer. Wraps `FwpmSubLayerDeleteByKey0`. Fails with `STATUS_FWP_IN_USE`
    /// while filters are in the sublayer.
    pub fn delete_sublayer(&self, irql: &impl AtPassive, key: Guid) -> Result<(), Status> {
        verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open; `key` lives for the call.
        Status::from_ntstatus(unsafe { sys::FwpmSubLayerDeleteByKey0(self.handle, key.raw()) })
    }

    /// Deletes a provider. Wraps `FwpmProviderDeleteByKey0`.
    pub fn delete_provider(&self, irql: &impl AtPassive, key: Guid) -> Result<(), Status> {
        verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is open; `key` lives for the call.
        Status::from_ntstatus(unsafe { sys::FwpmProviderDeleteByKey0(self.handle, key.raw()) })
    }

    /// The engine handle, for `Fwpm*` functions this crate does not wrap. It stays owned by the
    /// `Engine`: do not close it.
    pub fn as_raw_handle(&self) -> sys::HANDLE {
        self.handle
    }
}

impl Drop for Engine {
    /// Closes the session at `PASSIVE_LEVEL`; above it, leaks the session with a debugger
    /// message (see the [module documentation](self)).
    fn drop(&mut self) {
        let irql = Irql::current();
        if irql != Irql::PASSIVE {
            kd_print!(
                Error,
                "wfp-rs: an Engine was dropped at {irql}; FwpmEngineClose0 requires \
                 PASSIVE_LEVEL, so the session is leaked (close it with Engine::close at \
                 PASSIVE_LEVEL)\n"
            );
            return;
        }
        // SAFETY: the IRQL is PASSIVE_LEVEL (checked above); the handle is open and is closed
        // only here (`close` does not run this destructor).
        let status = unsafe { sys::FwpmEngineClose0(self.handle) };
        if let Err(error) = Status::from_ntstatus(status) {
            kd_print!(
                Error,
                "wfp-rs: FwpmEngineClose0 failed when an Engine was dropped: {error}\n"
            );
        }
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("handle", &self.handle)
            .finish()
    }
}

/// An explicit transaction of a session, from [`Engine::transaction`].
///
/// It dereferences to the [`Engine`], so the engine's methods are called on it directly. Unless
/// [`commit`](Transaction::commit) is called, it is aborted when dropped (at `PASSIVE_LEVEL`;
/// see the [module documentation](self) for other levels): everything done in it is rolled back.
#[must_use = "a transaction is aborted when dropped; call `commit` to keep its changes"]
pub struct Transaction<'e> {
    engine: &'e Engine,
}

impl Transaction<'_> {
    /// Commits the transaction. Wraps `FwpmTransactionCommit0`.
    ///
    /// If the commit fails, the transaction is aborted (`FwpmTransactionAbort0`, as the WDK
    /// samples do), so the session is left without a transaction either way, and the commit's
    /// error is returned.
    pub fn commit(self, irql: &impl AtPassive) -> Result<(), Status> {
        verify(irql);
        let this = ManuallyDrop::new(self);
        // SAFETY: PASSIVE_LEVEL (the token); the session's transaction is open (this value
        // stands for it), and `this` is not dropped, so it is ended only here.
        let committed =
            Status::from_ntstatus(unsafe { sys::FwpmTransactionCommit0(this.engine.handle) });
        if committed.is_err() {
            // The result is not interesting: if the failed commit already ended the
            // transaction, this reports STATUS_FWP_NO_TXN_IN_PROGRESS.
            // SAFETY: PASSIVE_LEVEL (the token); the handle is open.
            let _ = unsafe { sys::FwpmTransactionAbort0(this.engine.handle) };
        }
        committed
    }

    /// Aborts the transaction, rolling back everything done in it, and reports the engine's
    /// status. Wraps `FwpmTransactionAbort0`. (Dropping the transaction does the same, without
    /// the status.)
    pub fn abort(self, irql: &impl AtPassive) -> Result<(), Status> {
        verify(irql);
        let this = ManuallyDrop::new(self);
        // SAFETY: PASSIVE_LEVEL (the token); the session's transaction is open, and `this` is
        // not dropped, so it is ended only here.
        Status::from_ntstatus(unsafe { sys::FwpmTransactionAbort0(this.engine.handle) })
    }
}

impl Deref for Transaction<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.engine
    }
}

impl Drop for Transaction<'_> {
    /// Aborts the transaction at `PASSIVE_LEVEL`; above it, leaves it open with a debugger
    /// message (see the [module documentation](self)).
    fn drop(&mut self) {
        let irql = Irql::current();
        if irql != Irql::PASSIVE {
            kd_print!(
                Error,
                "wfp-rs: a Transaction was dropped at {irql}; FwpmTransactionAbort0 requires \
                 PASSIVE_LEVEL, so the transaction stays open until the session closes\n"
            );
            return;
        }
        // SAFETY: the IRQL is PASSIVE_LEVEL (checked above); the session's transaction is open
        // and is ended only here (`commit` and `abort` do not run this destructor).
        let status = unsafe { sys::FwpmTransactionAbort0(self.engine.handle) };
        if let Err(error) = Status::from_ntstatus(status) {
            kd_print!(
                Error,
                "wfp-rs: FwpmTransactionAbort0 failed when a Transaction was dropped: {error}\n"
            );
        }
    }
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("engine", self.engine)
            .finish()
    }
}

/// A provider: names the software that owns sublayers, callouts and filters. Wraps
/// `FWPM_PROVIDER0`; add it with [`Engine::add_provider`].
///
/// ```
/// use wfp_rs::engine::Provider;
/// let provider = Provider::new(wfp_rs::guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e121"))
///     .name("Example Corp. firewall")
///     .description("Asks the firewall service about new connections");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a provider does nothing until it is added with `Engine::add_provider`"]
pub struct Provider<'a> {
    key: Guid,
    name: &'a str,
    description: Option<&'a str>,
    persistent: bool,
}

impl<'a> Provider<'a> {
    /// A provider with key `key`, an empty display name and no description.
    pub const fn new(key: Guid) -> Provider<'a> {
        Provider {
            key,
            name: "",
            description: None,
            persistent: false,
        }
    }

    /// The display name.
    pub const fn name(mut self, name: &'a str) -> Self {
        self.name = name;
        self
    }

    /// The description.
    pub const fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// `FWPM_PROVIDER_FLAG_PERSISTENT`: the provider survives a reboot. Not allowed in a
    /// dynamic session.
    pub const fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }
}

/// A sublayer: a group of filters evaluated together within a layer, ordered against other
/// sublayers by weight. Wraps `FWPM_SUBLAYER0`; add it with [`Engine::add_sublayer`].
///
/// ```
/// use wfp_rs::engine::Sublayer;
/// let sublayer = Sublayer::new(wfp_rs::guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e131"))
///     .name("Example rules")
///     .weight(0x100);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a sublayer does nothing until it is added with `Engine::add_sublayer`"]
pub struct Sublayer<'a> {
    key: Guid,
    name: &'a str,
    description: Option<&'a str>,
    provider: Option<Guid>,
    weight: u16,
    persistent: bool,
}

impl<'a> Sublayer<'a> {
    /// A sublayer with key `key`, an empty display name, weight 0, and no provider.
    pub const fn new(key: Guid) -> Sublayer<'a> {
        Sublayer {
            key,
            name: "",
            description: None,
            provider: None,
            weight: 0,
            persistent: false,
        }
    }

    /// The display name.
    pub const fn name(mut self, name: &'a str) -> Self {
        self.name = name;
        self
    }

    /// The description.
    pub const fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// The provider the sublayer belongs to (`providerKey`).
    pub const fn provider(mut self, key: Guid) -> Self {
        self.provider = Some(key);
        self
    }

    /// The weight against other sublayers of the same layer: higher weights are evaluated
    /// first.
    pub const fn weight(mut self, weight: u16) -> Self {
        self.weight = weight;
        self
    }

    /// `FWPM_SUBLAYER_FLAG_PERSISTENT`: the sublayer survives a reboot. Not allowed in a
    /// dynamic session.
    pub const fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }
}

/// A callout's management object at layer `L`: its key, name and applicable layer. Wraps
/// `FWPM_CALLOUT0`; add it with [`Engine::add_callout`]. (Its classify function is registered
/// separately, with the same [`CalloutKey<L>`], so at the same layer.)
///
/// ```
/// use wfp_rs::callout::CalloutKey;
/// use wfp_rs::engine::CalloutEntry;
/// use wfp_rs::layer::AleAuthConnectV4;
///
/// const VERDICTS_V4: CalloutKey<AleAuthConnectV4> =
///     CalloutKey::new(wfp_rs::guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e141"));
/// let callout = CalloutEntry::new(VERDICTS_V4).name("Connect verdicts (IPv4)");
/// ```
#[derive(Clone, Copy)]
#[must_use = "a callout entry does nothing until it is added with `Engine::add_callout`"]
pub struct CalloutEntry<'a, L: Layer> {
    key: CalloutKey<L>,
    name: &'a str,
    description: Option<&'a str>,
    provider: Option<Guid>,
    persistent: bool,
}

impl<'a, L: Layer> CalloutEntry<'a, L> {
    /// A callout with key `key` at the key's layer `L` (`applicableLayer`), an empty display
    /// name and no provider.
    pub const fn new(key: CalloutKey<L>) -> CalloutEntry<'a, L> {
        CalloutEntry {
            key,
            name: "",
            description: None,
            provider: None,
            persistent: false,
        }
    }

    /// The display name.
    pub const fn name(mut self, name: &'a str) -> Self {
        self.name = name;
        self
    }

    /// The description.
    pub const fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// The provider the callout belongs to (`providerKey`).
    pub const fn provider(mut self, key: Guid) -> Self {
        self.provider = Some(key);
        self
    }

    /// `FWPM_CALLOUT_FLAG_PERSISTENT`: the callout survives a reboot. Not allowed in a dynamic
    /// session.
    pub const fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// The callout's key.
    pub const fn key(&self) -> CalloutKey<L> {
        self.key
    }
}

impl<L: Layer> fmt::Debug for CalloutEntry<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CalloutEntry")
            .field("layer", &L::NAME)
            .field("key", &self.key)
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

/// An `FWPM_DISPLAY_DATA0`'s strings, as NUL-terminated UTF-16, owned for the duration of a
/// call. The engine rejects a null name, so the name is always present (empty if unset).
pub(crate) struct DisplayData {
    name: Vec<u16>,
    description: Option<Vec<u16>>,
}

impl DisplayData {
    pub(crate) fn new(name: &str, description: Option<&str>) -> Result<DisplayData, Status> {
        Ok(DisplayData {
            name: wide(name)?,
            description: description.map(wide).transpose()?,
        })
    }

    /// The C structure, pointing into `self`, which must outlive its use and not change.
    pub(crate) fn raw(&mut self) -> sys::FWPM_DISPLAY_DATA0 {
        sys::FWPM_DISPLAY_DATA0 {
            name: self.name.as_mut_ptr(),
            description: self
                .description
                .as_mut()
                .map_or(ptr::null_mut(), Vec::as_mut_ptr),
        }
    }
}

/// `text` as NUL-terminated UTF-16. (A NUL inside `text` ends the string early for the engine.)
fn wide(text: &str) -> Result<Vec<u16>, Status> {
    let mut units = try_vec(text.encode_utf16().count() + 1)?;
    units.extend(text.encode_utf16());
    units.push(0);
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_wait_timeouts_round_up_and_saturate() {
        let ms = |d| {
            SessionOptions::new()
                .txn_wait_timeout(d)
                .txn_wait_timeout_ms
        };
        assert_eq!(
            SessionOptions::new().txn_wait_timeout_ms,
            0,
            "0: the engine's default"
        );
        assert_eq!(ms(Duration::ZERO), 1);
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_micros(1500)), 2);
        assert_eq!(ms(Duration::from_secs(5)), 5000);
        assert_eq!(ms(Duration::from_millis(u64::from(u32::MAX))), INFINITE);
        assert_eq!(ms(Duration::MAX), INFINITE);
    }

    #[test]
    fn display_strings_are_nul_terminated_utf16() {
        let mut display = DisplayData::new("Aé😀", None).unwrap();
        let raw = display.raw();
        assert!(raw.description.is_null());
        assert_eq!(display.name, [0x41, 0xE9, 0xD83D, 0xDE00, 0]);
        let mut empty = DisplayData::new("", Some("d")).unwrap();
        assert_eq!(empty.name, [0]);
        assert!(!empty.raw().description.is_null());
    }
}
