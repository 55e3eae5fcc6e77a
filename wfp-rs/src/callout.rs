//! Callouts: Rust types whose `classify` the filter engine calls for matching traffic.
//!
//! A callout implements [`Callout<L>`] for a layer `L`. [`CalloutRegistration::register`] hands
//! it to the filter engine (`FwpsCalloutRegister3`) behind trampolines that turn the C arguments
//! into typed ones: the layer's [`IncomingValues`], the [`Metadata`], the [`FilterInfo`] that
//! matched, and a [`ClassifyOut`] that enforces the rights rules. `classify` receives a
//! `&DispatchLevel`, because WFP may call it at `DISPATCH_LEVEL`.
//!
//! ```
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::layer::{fields, AleAuthConnectV4};
//!
//! /// Blocks outbound connections to port 1234.
//! struct BlockPort;
//!
//! impl Callout<AleAuthConnectV4> for BlockPort {
//!     fn classify(&self, _irql: &mut DispatchLevel, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         if c.values.get::<fields::IpRemotePort>() == Ok(1234) {
//!             c.out.block();
//!         } else {
//!             let _ = c.out.permit();
//!         }
//!     }
//! }
//! ```
//!
//! Register callouts before adding the filters that name them: until `FwpsCalloutRegister3`
//! returns, the SDK cannot route a classification to the instance, and the trampoline leaves
//! the decision untouched (a terminating filter then blocks).

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::classify::ClassifyOut;
use crate::driver::Driver;
use crate::guid::Guid;
use crate::irql::{DispatchLevel, Irql, PassiveLevel};
use crate::layer::value::ConditionFlags;
use crate::layer::{IncomingValues, Layer, fields};
use crate::metadata::Metadata;
use crate::pool::{PoolBox, PoolTag};
use crate::status::Status;
use crate::sys;

/// A callout at layer `L`.
pub trait Callout<L: Layer>: Send + Sync + 'static {
    /// Decides (or inspects) one classification. Called at IRQL <= `DISPATCH_LEVEL`.
    fn classify(&self, irql: &mut DispatchLevel<'_>, classify: &mut Classify<'_, L>);

    /// A filter naming this callout was added or deleted. Returning an error when a filter is
    /// added makes the filter engine refuse the filter. The default accepts everything.
    fn notify(&self, irql: &mut DispatchLevel<'_>, event: FilterEvent<'_>) -> Result<(), Status> {
        let _ = (irql, event);
        Ok(())
    }
}

/// One classification, as a callout sees it.
pub struct Classify<'a, L: Layer> {
    /// The layer's data fields.
    pub values: IncomingValues<'a, L>,
    /// The classification's metadata.
    pub metadata: Metadata<'a>,
    /// The filter that matched and named this callout.
    pub filter: FilterInfo<'a>,
    /// The decision, with WFP's rights rules enforced.
    pub out: ClassifyOut<'a>,
    flow_context: u64,
}

impl<L: Layer> Classify<'_, L> {
    /// The context associated with the flow (0 if none).
    pub fn flow_context(&self) -> u64 {
        self.flow_context
    }

    /// Whether this classification re-authorizes a connection (the layer's `FLAGS` field has
    /// `FWP_CONDITION_FLAG_IS_REAUTHORIZE`). Always `false` at layers without a `FLAGS` field.
    pub fn is_reauthorization(&self) -> bool {
        let Some(field) = L::FIELDS
            .iter()
            .find(|f| f.condition == <fields::Flags as crate::layer::FieldKind>::CONDITION)
        else {
            return false;
        };
        match self.values.raw_value(field.index) {
            Ok(value) if value.r#type == sys::FWP_UINT32 => {
                // SAFETY: the tag says the `uint32` arm is active.
                let flags = ConditionFlags::from_bits_retain(unsafe { value.u.uint32 });
                flags.contains(ConditionFlags::IS_REAUTHORIZE)
            }
            _ => false,
        }
    }
}

impl<L: Layer> fmt::Debug for Classify<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classify")
            .field("layer", &L::NAME)
            .field("metadata", &self.metadata)
            .field("filter", &self.filter)
            .field("out", &self.out)
            .finish()
    }
}

/// The filter that led to a callout (`FWPS_FILTER3`).
#[derive(Clone, Copy)]
pub struct FilterInfo<'a> {
    raw: &'a sys::FWPS_FILTER3,
}

impl<'a> FilterInfo<'a> {
    /// The filter's runtime id.
    pub fn id(&self) -> u64 {
        self.raw.filterId
    }

    /// The filter's raw context (`FWPM_FILTER0::rawContext`).
    pub fn context(&self) -> u64 {
        self.raw.context
    }

    /// The weight of the filter's sublayer.
    pub fn sublayer_weight(&self) -> u16 {
        self.raw.subLayerWeight
    }

    /// Whether the filter asks for hard decisions (`FWPS_FILTER_FLAG_CLEAR_ACTION_RIGHT`).
    pub fn clears_action_right(&self) -> bool {
        self.raw.flags & sys::FWPS_FILTER_FLAG_CLEAR_ACTION_RIGHT != 0
    }

    /// The raw structure.
    pub fn raw(&self) -> &'a sys::FWPS_FILTER3 {
        self.raw
    }
}

impl fmt::Debug for FilterInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterInfo")
            .field("id", &self.id())
            .field("context", &self.context())
            .finish()
    }
}

/// Why `notify` is called.
#[derive(Clone, Copy, Debug)]
pub enum FilterEvent<'a> {
    /// A filter naming this callout is being added (`FWPS_CALLOUT_NOTIFY_ADD_FILTER`).
    Added(FilterInfo<'a>),
    /// A filter naming this callout was deleted (`FWPS_CALLOUT_NOTIFY_DELETE_FILTER`).
    Deleted(FilterInfo<'a>),
    /// A filter's addition was committed (`FWPS_CALLOUT_NOTIFY_ADD_FILTER_POST_COMMIT`).
    Committed(FilterInfo<'a>),
}

/// Maps runtime callout ids to instances. A fixed table: no allocation on the classify path, no
/// lock (slots are claimed with a compare-exchange on the id).
mod registry {
    use super::*;

    pub(super) const SLOTS: usize = 64;

    struct Slot {
        id: AtomicU32,
        instance: AtomicPtr<()>,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY: Slot = Slot {
        id: AtomicU32::new(0),
        instance: AtomicPtr::new(core::ptr::null_mut()),
    };
    static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

    /// Publishes `instance` under `id`; false if the table is full.
    pub(super) fn insert(id: u32, instance: *mut ()) -> bool {
        for slot in &TABLE {
            if slot
                .id
                .compare_exchange(0, id, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.instance.store(instance, Ordering::Release);
                return true;
            }
        }
        false
    }

    pub(super) fn lookup(id: u32) -> Option<NonNull<()>> {
        TABLE
            .iter()
            .find(|slot| slot.id.load(Ordering::Acquire) == id)
            .and_then(|slot| NonNull::new(slot.instance.load(Ordering::Acquire)))
    }

    /// Withdraws `id`. Only after the filter engine has stopped calling the callout.
    pub(super) fn remove(id: u32) {
        for slot in &TABLE {
            if slot.id.load(Ordering::Acquire) == id {
                slot.instance
                    .store(core::ptr::null_mut(), Ordering::Release);
                slot.id.store(0, Ordering::Release);
            }
        }
    }
}

unsafe extern "system" fn classify_trampoline<L: Layer, C: Callout<L>>(
    in_fixed_values: *const sys::FWPS_INCOMING_VALUES0,
    in_meta_values: *const sys::FWPS_INCOMING_METADATA_VALUES0,
    _layer_data: *mut core::ffi::c_void,
    _classify_context: *const core::ffi::c_void,
    filter: *const sys::FWPS_FILTER3,
    flow_context: u64,
    classify_out: *mut sys::FWPS_CLASSIFY_OUT0,
) {
    // SAFETY: the filter engine passes valid structures for the duration of the call.
    let (Some(fixed), Some(meta), Some(filter), Some(out)) = (
        unsafe { in_fixed_values.as_ref() },
        unsafe { in_meta_values.as_ref() },
        unsafe { filter.as_ref() },
        unsafe { classify_out.as_mut() },
    ) else {
        return;
    };
    let Some(instance) = registry::lookup(filter.action.calloutId) else {
        return;
    };
    // SAFETY: the registry holds a live `PoolBox<C>` for this id until the callout is
    // unregistered, and unregistration waits for calls in progress.
    let callout = unsafe { instance.cast::<C>().as_ref() };
    // SAFETY: classifyFn runs at IRQL <= DISPATCH_LEVEL; the token lives for this call.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    let mut classify = Classify {
        // SAFETY: the values are the engine's for a classification at the layer this callout
        // was registered for.
        values: unsafe { IncomingValues::new(fixed) },
        metadata: Metadata::new(meta),
        filter: FilterInfo { raw: filter },
        out: ClassifyOut::new(out),
        flow_context,
    };
    callout.classify(&mut irql, &mut classify);
}

unsafe extern "system" fn notify_trampoline<L: Layer, C: Callout<L>>(
    notify_type: sys::FWPS_CALLOUT_NOTIFY_TYPE,
    _filter_key: *const sys::GUID,
    filter: *mut sys::FWPS_FILTER3,
) -> sys::NTSTATUS {
    // SAFETY: the engine passes a valid filter for the duration of the call.
    let Some(filter) = (unsafe { filter.as_ref() }) else {
        return 0;
    };
    let Some(instance) = registry::lookup(filter.action.calloutId) else {
        return 0;
    };
    // SAFETY: as in `classify_trampoline`.
    let callout = unsafe { instance.cast::<C>().as_ref() };
    // SAFETY: notifyFn runs at IRQL <= DISPATCH_LEVEL; the token lives for this call.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    let info = FilterInfo { raw: filter };
    let event = match notify_type {
        sys::FWPS_CALLOUT_NOTIFY_ADD_FILTER => FilterEvent::Added(info),
        sys::FWPS_CALLOUT_NOTIFY_DELETE_FILTER => FilterEvent::Deleted(info),
        sys::FWPS_CALLOUT_NOTIFY_ADD_FILTER_POST_COMMIT => FilterEvent::Committed(info),
        _ => return 0,
    };
    match callout.notify(&mut irql, event) {
        Ok(()) => 0,
        Err(status) => status.raw(),
    }
}

/// A callout registered with the filter engine. Unregisters on drop (at `PASSIVE_LEVEL`;
/// prefer [`unregister`](Self::unregister), which reports failure).
pub struct CalloutRegistration<L: Layer, C: Callout<L>> {
    id: u32,
    key: Guid,
    instance: Option<PoolBox<C>>,
    _layer: PhantomData<fn() -> L>,
}

/// Why a callout could not be registered; the callout is handed back.
pub struct RegisterError<C> {
    /// The failure.
    pub status: Status,
    /// The callout that was not registered.
    pub callout: C,
}

impl<C> fmt::Debug for RegisterError<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterError")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<C> fmt::Display for RegisterError<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "callout registration failed: {}", self.status)
    }
}

impl<C> core::error::Error for RegisterError<C> {}

impl<C> From<RegisterError<C>> for Status {
    fn from(error: RegisterError<C>) -> Status {
        error.status
    }
}

impl<L: Layer, C: Callout<L>> CalloutRegistration<L, C> {
    /// Registers `callout` under `key` (`FwpsCalloutRegister3`) for `driver`'s device.
    pub fn register(
        irql: &PassiveLevel<'_>,
        driver: &Driver<'_>,
        key: Guid,
        callout: C,
    ) -> Result<Self, RegisterError<C>> {
        let instance =
            PoolBox::try_new(callout, PoolTag::SDK, irql).map_err(|e| RegisterError {
                status: Status::INSUFFICIENT_RESOURCES,
                callout: e.into_inner(),
            })?;
        let raw = sys::FWPS_CALLOUT3 {
            calloutKey: key.0,
            flags: 0,
            classifyFn: Some(classify_trampoline::<L, C>),
            notifyFn: Some(notify_trampoline::<L, C>),
            flowDeleteFn: None,
        };
        let mut id = 0u32;
        // SAFETY: PASSIVE_LEVEL (the token); the device is the driver's; `raw` and `id` are
        // locals valid for the call.
        let status =
            unsafe { sys::FwpsCalloutRegister3(driver.raw_device().cast(), &raw, &mut id) };
        if let Err(status) = Status::from_ntstatus(status) {
            return Err(RegisterError {
                status,
                callout: PoolBox::into_inner(instance),
            });
        }
        let pointer = PoolBox::into_raw(instance);
        if !registry::insert(id, pointer.as_ptr().cast()) {
            // SAFETY: just registered by us; nothing was routed to it (the registry lacks it).
            unsafe { sys::FwpsCalloutUnregisterById0(id) };
            // SAFETY: the pointer came from `into_raw` above, with the SDK tag.
            let instance = unsafe { PoolBox::from_raw(pointer, PoolTag::SDK) };
            return Err(RegisterError {
                status: Status::INSUFFICIENT_RESOURCES,
                callout: PoolBox::into_inner(instance),
            });
        }
        // SAFETY: the pointer came from `into_raw` above; the registry only borrows it.
        let instance = unsafe { PoolBox::from_raw(pointer, PoolTag::SDK) };
        Ok(CalloutRegistration {
            id,
            key,
            instance: Some(instance),
            _layer: PhantomData,
        })
    }

    /// The runtime callout id the filter engine assigned.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The callout key.
    pub fn key(&self) -> Guid {
        self.key
    }

    /// The registered callout.
    pub fn callout(&self) -> &C {
        self.instance.as_ref().expect("present until unregistered")
    }

    /// Unregisters (`FwpsCalloutUnregisterById0`). On failure the callout stays registered and
    /// is handed back with the status.
    pub fn unregister(mut self, irql: &PassiveLevel<'_>) -> Result<(), (Self, Status)> {
        match self.unregister_inner(irql) {
            Ok(()) => Ok(()),
            Err(status) => Err((self, status)),
        }
    }

    fn unregister_inner(&mut self, irql: &PassiveLevel<'_>) -> Result<(), Status> {
        crate::irql::verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the id is ours.
        let status = unsafe { sys::FwpsCalloutUnregisterById0(self.id) };
        Status::from_ntstatus(status)?;
        // The engine no longer calls the callout: withdraw and free the instance.
        registry::remove(self.id);
        self.instance = None;
        Ok(())
    }
}

impl<L: Layer, C: Callout<L>> Drop for CalloutRegistration<L, C> {
    fn drop(&mut self) {
        if self.instance.is_none() {
            return;
        }
        let result = PassiveLevel::try_current(|irql| self.unregister_inner(irql));
        match result {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                crate::kd_print!(
                    Error,
                    "wfp-rs: callout {} not unregistered ({status}); its instance is leaked\n",
                    self.key
                );
                core::mem::forget(self.instance.take());
            }
            None => {
                crate::kd_print!(
                    Error,
                    "wfp-rs: callout {} dropped at {}; unregistration needs PASSIVE_LEVEL, so it stays registered and its instance is leaked\n",
                    self.key,
                    Irql::current()
                );
                core::mem::forget(self.instance.take());
            }
        }
    }
}

impl<L: Layer, C: Callout<L>> fmt::Debug for CalloutRegistration<L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CalloutRegistration")
            .field("layer", &L::NAME)
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

// The table must be large enough for a driver that registers both IP versions of every layer.
static_assertions::const_assert!(registry::SLOTS >= 32);
