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
//!
//! # One layer per key
//!
//! A callout is named by a [`CalloutKey<L>`]: a GUID that carries its layer in its type. The
//! registration ([`CalloutRegistration::register`]), the callout entry
//! ([`CalloutEntry::new`](crate::engine::CalloutEntry::new)) and the filter action
//! ([`FilterAction`](crate::filter::FilterAction)) all take the key, so they cannot name
//! different layers: a key of another layer is a compile error that names both layers
//! (`expected CalloutKey<AleAuthConnectV4>, found CalloutKey<OutboundTransportV4>`).
//!
//! The compiler cannot see two key constants that share a GUID, nor a persistent callout entry
//! an earlier version of the driver left at another layer. If a classification still arrives at
//! a layer other than `L` (`inFixedValues->layerId != L::ID`, checked in release builds too),
//! the SDK does not call [`Callout::classify`], whose fields would be read at the wrong
//! indices. It blocks instead when the classify-out has the write right (and clears the
//! write right: a hard block), leaves the classify-out untouched without it, and prints one
//! error line per registration to the kernel debugger. A `flowDeleteFn` at another layer hands
//! back a context this SDK did not associate, so it is left alone (and reported the same way).
//! `notifyFn` cannot be checked (`FWPS_FILTER3` carries no layer), and needs no check:
//! [`FilterEvent`] exposes nothing read by `L`'s field indices. When the callout is registered
//! before its entry is added, [`Engine::add_callout`](crate::engine::Engine::add_callout)
//! already refuses an entry at another layer.

use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU16, AtomicU32, Ordering};

use crate::classify::ClassifyOut;
use crate::driver::Driver;
use crate::guid::Guid;
use crate::irql::{AtPassive, DispatchLevel, Irql, PassiveLevel, RaiseIrql, Token};
use crate::layer::value::ConditionFlags;
use crate::layer::{
    FieldKind, IncomingValues, Layer, PacketLayer, StreamLayer, field_index, fields,
};
use crate::metadata::Metadata;
use crate::packet::{NetBufferList, StreamData};
use crate::pool::{PoolBox, PoolTag};
use crate::status::Status;
use crate::sys;

/// The key of a callout at layer `L` (`FWPS_CALLOUT3::calloutKey`, `FWPM_CALLOUT0::calloutKey`):
/// a GUID that carries its layer in its type.
///
/// The same key registers the callout ([`CalloutRegistration::register`]), adds its callout
/// entry ([`CalloutEntry::new`](crate::engine::CalloutEntry::new)) and names it in a filter's
/// action ([`FilterAction`](crate::filter::FilterAction)), so all three are at layer `L`. In C
/// they meet only through the GUID, and `FwpsCalloutRegister3` takes no layer: a callout
/// registered for one layer and filtered at another compiles, registers, and reads every field
/// at the wrong index. Here it does not compile:
///
/// ```compile_fail,E0308
/// use wfp_rs::callout::CalloutKey;
/// use wfp_rs::engine::CalloutEntry;
/// use wfp_rs::guid;
/// use wfp_rs::layer::{AleAuthConnectV4, OutboundTransportV4};
///
/// const COUNT: CalloutKey<OutboundTransportV4> =
///     CalloutKey::new(guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e151"));
/// // error[E0308]: expected `CalloutKey<AleAuthConnectV4>`, found `CalloutKey<OutboundTransportV4>`
/// let entry = CalloutEntry::<AleAuthConnectV4>::new(COUNT);
/// ```
///
/// A driver with the same logic at several layers (IPv4 and IPv6, say) has one key per layer
/// and one generic callout type; the layer follows from the key wherever it is used:
///
/// ```
/// use wfp_rs::callout::CalloutKey;
/// use wfp_rs::engine::CalloutEntry;
/// use wfp_rs::guid;
/// use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6};
///
/// const CONNECT_V4: CalloutKey<AleAuthConnectV4> =
///     CalloutKey::new(guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e152"));
/// const CONNECT_V6: CalloutKey<AleAuthConnectV6> =
///     CalloutKey::new(guid!("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e153"));
///
/// let v4 = CalloutEntry::new(CONNECT_V4).name("connect (IPv4)"); // CalloutEntry<AleAuthConnectV4>
/// let v6 = CalloutEntry::new(CONNECT_V6).name("connect (IPv6)"); // CalloutEntry<AleAuthConnectV6>
/// assert_eq!(v4.key(), CONNECT_V4);
/// # let _ = v6;
/// ```
///
/// Give every key its own GUID: two keys with one GUID at two layers compile (the compiler
/// cannot compare constants), and then the classification check of the
/// [module documentation](self#one-layer-per-key) blocks at run time.
pub struct CalloutKey<L: Layer> {
    guid: Guid,
    _layer: PhantomData<fn() -> L>,
}

impl<L: Layer> CalloutKey<L> {
    /// The key `guid` for a callout at layer `L`.
    pub const fn new(guid: Guid) -> CalloutKey<L> {
        CalloutKey {
            guid,
            _layer: PhantomData,
        }
    }

    /// The GUID.
    pub const fn guid(self) -> Guid {
        self.guid
    }
}

impl<L: Layer> Clone for CalloutKey<L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<L: Layer> Copy for CalloutKey<L> {}

impl<L: Layer> PartialEq for CalloutKey<L> {
    fn eq(&self, other: &Self) -> bool {
        self.guid == other.guid
    }
}

impl<L: Layer> Eq for CalloutKey<L> {}

impl<L: Layer> Hash for CalloutKey<L> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.guid.hash(state);
    }
}

impl<L: Layer> From<CalloutKey<L>> for Guid {
    fn from(key: CalloutKey<L>) -> Guid {
        key.guid
    }
}

impl<L: Layer> fmt::Debug for CalloutKey<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CalloutKey<{}>({})", L::NAME, self.guid)
    }
}

impl<L: Layer> fmt::Display for CalloutKey<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.guid, f)
    }
}

/// A callout at layer `L`, whose flow contexts (if it uses any) are values of type `F`.
///
/// Most callouts keep no per-flow state and implement `Callout<L>` (`F` is `()`). A callout that
/// does implements `Callout<L, MyFlowState>`: it attaches a value to a flow with
/// [`Classify::associate_flow_context`], finds it again in later classifications of the flow
/// with [`Classify::flow_context`], and gets it back in [`flow_deleted`](Self::flow_deleted)
/// when the flow ends.
pub trait Callout<L: Layer, F: Send + Sync + 'static = ()>: Send + Sync + 'static {
    /// Decides (or inspects) one classification. Called at IRQL <= `DISPATCH_LEVEL`, and only
    /// for classifications at `L`: one that arrives at another layer is blocked without calling
    /// it (see the [module documentation](self#one-layer-per-key)).
    fn classify(&self, irql: &mut DispatchLevel<'_>, classify: &mut Classify<'_, L, F>);

    /// A filter naming this callout was added or deleted. Returning an error when a filter is
    /// added makes the filter engine refuse the filter. The default accepts everything.
    ///
    /// The engine's notification (`FWPS_FILTER3`) does not say at which layer the filter is,
    /// so it cannot be checked against `L`; nothing in [`FilterEvent`] is read by `L`'s field
    /// indices either (its conditions are raw).
    fn notify(&self, irql: &mut DispatchLevel<'_>, event: FilterEvent<'_>) -> Result<(), Status> {
        let _ = (irql, event);
        Ok(())
    }

    /// A flow context of this callout is gone (`flowDeleteFn`): its flow ended, or it was
    /// removed. The value is handed back; the default drops it. `layer_id` is always `L::ID`:
    /// the SDK associates contexts only at `L`, and a `flowDeleteFn` for another layer (a
    /// context associated through `sys` directly) is not passed on.
    fn flow_deleted(&self, irql: &mut DispatchLevel<'_>, layer_id: u16, context: F) {
        let _ = (irql, layer_id, context);
    }
}

/// One classification, as a callout sees it. `F` is the callout's flow context type.
pub struct Classify<'a, L: Layer, F: 'static = ()> {
    /// The layer's data fields.
    pub values: IncomingValues<'a, L>,
    /// The classification's metadata.
    pub metadata: Metadata<'a>,
    /// The filter that matched and named this callout.
    pub filter: FilterInfo<'a>,
    /// The decision, with WFP's rights rules enforced.
    pub out: ClassifyOut<'a>,
    flow_context: u64,
    pub(crate) classify_context: *const core::ffi::c_void,
    /// `layerData`: what it points to depends on `L` (`L::DATA`).
    layer_data: *const core::ffi::c_void,
    callout_id: u32,
    flows: &'a Flows,
    _context: PhantomData<fn() -> F>,
}

impl<'a, L: Layer, F: 'static> Classify<'a, L, F> {
    /// The packet being classified (`layerData` as a `NET_BUFFER_LIST`), at a layer that passes
    /// one; `None` when the engine passed none (`layerData` null, as at ALE_AUTH_CONNECT for TCP).
    /// Where its data starts is `L::DATA`; see [`crate::packet`].
    ///
    /// ```compile_fail
    /// # use wfp_rs::callout::Classify;
    /// # use wfp_rs::layer::AleResourceAssignmentV4;
    /// fn bind(c: &Classify<'_, AleResourceAssignmentV4>) {
    ///     let _ = c.packet(); // a bind has no packet
    /// }
    /// ```
    ///
    /// The view borrows the classification, so it ends before `pend` (after which the operation
    /// may be completed on another processor while this one still runs):
    ///
    /// ```compile_fail,E0502
    /// # use wfp_rs::callout::Classify;
    /// # use wfp_rs::layer::AleAuthRecvAcceptV4;
    /// fn read_after_pend(c: &mut Classify<'_, AleAuthRecvAcceptV4>) {
    ///     let packet = c.packet();
    ///     let _pended = c.pend();
    ///     let _ = packet.and_then(|list| list.first()).map(|nb| nb.read_array::<8>(0));
    /// }
    /// ```
    pub fn packet(&self) -> Option<NetBufferList<'_>>
    where
        L: PacketLayer,
    {
        // SAFETY: at a packet layer (`L: PacketLayer`, and the trampoline checked the layer id),
        // a non-null `layerData` is the engine's NET_BUFFER_LIST, valid and unchanged for the
        // classification ('a), which outlives the borrow of `self` the view keeps.
        unsafe { NetBufferList::from_layer_data(self.layer_data) }
    }

    /// `layerData`, for the SDK's clone and injection-state routines (which move the data
    /// start of the engine's packet and back, as the engine allows during classifyFn).
    pub(crate) fn layer_data_mut(&self) -> *mut core::ffi::c_void {
        self.layer_data.cast_mut()
    }

    /// The stream data being classified (`layerData` as an `FWPS_STREAM_CALLOUT_IO_PACKET0`), at
    /// a stream layer; `None` when the engine passed none.
    /// Like [`packet`](Self::packet), the view borrows the classification.
    pub fn stream(&self) -> Option<StreamData<'_>>
    where
        L: StreamLayer,
    {
        // SAFETY: at a stream layer (`L: StreamLayer`, layer id checked by the trampoline), a
        // non-null `layerData` is the engine's FWPS_STREAM_CALLOUT_IO_PACKET0, valid for 'a,
        // which outlives the borrow of `self` the view keeps.
        unsafe { StreamData::from_layer_data(self.layer_data) }
    }
}

/// Why a flow context could not be associated; the value is handed back.
#[derive(Debug)]
pub struct FlowContextError<F> {
    /// The failure: `STATUS_FWP_NOT_FOUND` without a flow handle, `STATUS_INSUFFICIENT_RESOURCES`,
    /// `STATUS_OBJECT_NAME_EXISTS` when this callout already has a context on the flow at this
    /// layer (remove it first), or another status `FwpsFlowAssociateContext0` returned.
    pub status: Status,
    /// The value that was not associated.
    pub value: F,
}

impl<F> fmt::Display for FlowContextError<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "flow context not associated: {}", self.status)
    }
}

impl<F: fmt::Debug> core::error::Error for FlowContextError<F> {}

impl<L: Layer, F: Send + Sync + 'static> Classify<'_, L, F> {
    /// This callout's context of the flow being classified, if one is associated at this layer:
    /// the one the engine passed to this classification, or the one
    /// [`associate_flow_context`](Self::associate_flow_context) attached during it. `None` after
    /// [`remove_flow_context`](Self::remove_flow_context) in this classification.
    pub fn flow_context(&self) -> Option<&F> {
        let pointer = NonNull::new(self.flow_context as *mut F)?;
        // SAFETY: a non-zero `self.flow_context` is a `PoolBox<F>` this registration associated
        // with the flow being classified (the registration's type fixes `F`). It is freed only by
        // flowDeleteFn, and the engine does not call flowDeleteFn for a context of a flow while a
        // classification of that flow is in progress: `FwpsFlowRemoveContext0` returns
        // STATUS_PENDING then and calls it later (its reference page; the simulator models it),
        // and a flow does not end under its own classification. The one removal that may
        // complete synchronously is this callout's own (`remove_flow_context`), which takes
        // `&mut self` — so no `&F` from here is alive — and zeroes the field first.
        Some(unsafe { pointer.as_ref() })
    }

    /// Attaches `value` to the flow being classified, at this layer (`FwpsFlowAssociateContext0`):
    /// later classifications of the flow at this layer see it in [`flow_context`](Self::flow_context),
    /// and [`Callout::flow_deleted`] receives it when the flow ends. Needs the flow handle
    /// metadata (ALE_FLOW_ESTABLISHED, transport and stream layers have it).
    ///
    /// One context per flow, layer and callout: while one is associated, this fails with
    /// `STATUS_OBJECT_NAME_EXISTS` and hands `value` back. To replace it, call
    /// [`remove_flow_context`](Self::remove_flow_context) first (in the same classification
    /// is fine).
    pub fn associate_flow_context(
        &mut self,
        irql: &mut DispatchLevel<'_>,
        value: F,
    ) -> Result<(), FlowContextError<F>> {
        let Some(flow) = self.metadata.flow_handle() else {
            return Err(FlowContextError {
                status: Status::FWP_NOT_FOUND,
                value,
            });
        };
        let boxed = match PoolBox::try_new(value, PoolTag::SDK, irql) {
            Ok(boxed) => boxed,
            Err(error) => {
                return Err(FlowContextError {
                    status: Status::INSUFFICIENT_RESOURCES,
                    value: error.into_inner(),
                });
            }
        };
        let pointer = PoolBox::into_raw(boxed);
        let context = pointer.as_ptr() as u64;
        // Tracked before it is associated, so unregistration can always find it.
        if !self.flows.insert(irql, flow, L::ID, context) {
            // SAFETY: the pointer came from `into_raw` above and was never shared.
            let boxed = unsafe { PoolBox::from_raw(pointer, PoolTag::SDK) };
            return Err(FlowContextError {
                status: Status::INSUFFICIENT_RESOURCES,
                value: PoolBox::into_inner(boxed),
            });
        }
        // SAFETY: IRQL <= DISPATCH_LEVEL (the token); the flow and callout ids are the engine's.
        let status =
            unsafe { sys::FwpsFlowAssociateContext0(flow, L::ID, self.callout_id, context) };
        // A context already associated is reported with an informational status, which
        // `from_ntstatus` would take for success: the new one was not associated.
        let associated = if status == Status::OBJECT_NAME_EXISTS.raw() {
            Err(Status::OBJECT_NAME_EXISTS)
        } else {
            Status::from_ntstatus(status)
        };
        if let Err(status) = associated {
            self.flows.remove(irql, context);
            // SAFETY: not associated, so the SDK still owns the box.
            let boxed = unsafe { PoolBox::from_raw(pointer, PoolTag::SDK) };
            return Err(FlowContextError {
                status,
                value: PoolBox::into_inner(boxed),
            });
        }
        // Associated with the flow being classified: alive until a flowDeleteFn that cannot run
        // before this classification returns (see `flow_context`).
        self.flow_context = context;
        Ok(())
    }

    /// Detaches this callout's context from the flow (`FwpsFlowRemoveContext0`); the engine then
    /// calls [`Callout::flow_deleted`] with it — after this classification returns, not during
    /// it: a classification of the flow is in progress (this one), so the engine answers
    /// `STATUS_PENDING` and calls `flowDeleteFn` when the flow's classifications have returned
    /// (`Ok(())` either way). So a spin lock that `flow_deleted` takes may be held here.
    ///
    /// From here on [`flow_context`](Self::flow_context) returns `None` in this classification
    /// (whatever the engine answered), and a new context may be associated. Fails with
    /// `STATUS_FWP_NOT_FOUND` without a flow handle, and with `STATUS_UNSUCCESSFUL` when no
    /// context of this callout is associated at this layer (also when another classification of
    /// the flow removed it first).
    pub fn remove_flow_context(&mut self, irql: &mut DispatchLevel<'_>) -> Result<(), Status> {
        crate::irql::verify(irql);
        let flow = self.metadata.flow_handle().ok_or(Status::FWP_NOT_FOUND)?;
        // Forgotten before the engine may free it, so no later `flow_context` can reach it.
        self.flow_context = 0;
        // SAFETY: IRQL <= DISPATCH_LEVEL (the token); the ids are the engine's.
        Status::from_ntstatus(unsafe { sys::FwpsFlowRemoveContext0(flow, L::ID, self.callout_id) })
    }
}

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// The raw classify context the engine passed to `classifyFn`, for calling
    /// `sys::FwpsAcquireClassifyHandle0` directly; [`pend_decision`](Self::pend_decision) is the
    /// safe way to use it. Valid only during this classification.
    pub fn raw_classify_context(&self) -> *const core::ffi::c_void {
        self.classify_context
    }

    /// Why this classification re-authorizes a connection: `None` if it does not
    /// ([`is_reauthorization`](Self::is_reauthorization) is `false`); otherwise the layer's
    /// `REAUTHORIZE_REASON` field, or empty reasons at layers without one.
    /// [`ReauthorizeReasons::CLASSIFY_COMPLETION`] marks the reauthorization that follows a
    /// completed pend: the one to answer from the recorded verdict.
    ///
    /// [`ReauthorizeReasons::CLASSIFY_COMPLETION`]: crate::layer::value::ReauthorizeReasons::CLASSIFY_COMPLETION
    pub fn reauthorization_reason(&self) -> Option<crate::layer::value::ReauthorizeReasons> {
        if !self.is_reauthorization() {
            return None;
        }
        let index = const {
            field_index(
                L::FIELDS,
                <fields::ReauthorizeReason as FieldKind>::CONDITION,
            )
        };
        let bits = self.uint32_field(index).unwrap_or(0);
        Some(crate::layer::value::ReauthorizeReasons::from_bits_retain(
            bits,
        ))
    }

    /// Whether this classification re-authorizes a connection (the layer's `FLAGS` field has
    /// `FWP_CONDITION_FLAG_IS_REAUTHORIZE`). Always `false` at layers without a `FLAGS` field.
    pub fn is_reauthorization(&self) -> bool {
        let index = const { field_index(L::FIELDS, <fields::Flags as FieldKind>::CONDITION) };
        self.uint32_field(index).is_some_and(|bits| {
            ConditionFlags::from_bits_retain(bits).contains(ConditionFlags::IS_REAUTHORIZE)
        })
    }

    /// The `UINT32` value at `index`, if the layer has the field and the value has that type.
    fn uint32_field(&self, index: Option<u32>) -> Option<u32> {
        let value = self.values.raw_value(index?).ok()?;
        if value.r#type != sys::FWP_UINT32 {
            return None;
        }
        // SAFETY: the tag says the `uint32` arm is active.
        Some(unsafe { value.u.uint32 })
    }
}

impl<L: Layer, F: 'static> fmt::Debug for Classify<'_, L, F> {
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

    /// The filter's conditions as the engine hands them over (`filterCondition`): each names the
    /// field by its index at this layer (`fieldId`), with the match type and the raw value.
    pub fn conditions(&self) -> &'a [sys::FWPS_FILTER_CONDITION0] {
        let count = self.raw.numFilterConditions as usize;
        if count == 0 || self.raw.filterCondition.is_null() {
            return &[];
        }
        // SAFETY: the engine passes `numFilterConditions` conditions at `filterCondition`, valid
        // for the classification (`'a`).
        unsafe { core::slice::from_raw_parts(self.raw.filterCondition, count) }
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
///
/// Open addressing keyed by the id itself: an id's home slot is `id % SLOTS`, and an id whose
/// home is taken goes to the next free slot after it. The filter engine hands out runtime ids
/// (INFERRED from what `FwpsCalloutRegister3` returns: small integers counted up as callouts
/// are registered, so one driver's ids are near each other and distinct modulo `SLOTS`), so a
/// lookup is one slot: the home, checked by id. Only ids placed away from their home (two ids
/// equal modulo `SLOTS` registered at once) make lookups probe further, and never further than
/// the longest displacement any insertion needed ([`MAX_PROBE`]), so the cost of a lookup does
/// not depend on how many callouts are registered or in which order.
mod registry {
    use core::sync::atomic::AtomicUsize;

    use super::*;

    pub(super) const SLOTS: usize = 64;
    const _: () = assert!(SLOTS.is_power_of_two());

    struct Slot {
        id: AtomicU32,
        instance: AtomicPtr<()>,
        /// The layer id the callout is registered for.
        layer: AtomicU16,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY: Slot = Slot {
        id: AtomicU32::new(0),
        instance: AtomicPtr::new(core::ptr::null_mut()),
        layer: AtomicU16::new(0),
    };
    static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

    /// The longest distance from its home slot at which an id was ever placed: lookups probe no
    /// further. It only grows (at most `SLOTS - 1`), so a lookup never stops short of an id
    /// inserted before it.
    static MAX_PROBE: AtomicUsize = AtomicUsize::new(0);

    /// The slot `distance` places after `id`'s home.
    fn slot(id: u32, distance: usize) -> &'static Slot {
        &TABLE[(id as usize).wrapping_add(distance) % SLOTS]
    }

    /// Publishes `instance`, registered for layer `layer`, under `id`; false if the table is
    /// full (or `id` is 0, which marks a free slot and no registration returns).
    pub(super) fn insert(id: u32, instance: *mut (), layer: u16) -> bool {
        if id == 0 {
            return false;
        }
        for distance in 0..SLOTS {
            let slot = slot(id, distance);
            if slot
                .id
                .compare_exchange(0, id, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Before the instance is published: a lookup that can see the instance can
                // reach its slot.
                MAX_PROBE.fetch_max(distance, Ordering::AcqRel);
                slot.layer.store(layer, Ordering::Relaxed);
                slot.instance.store(instance, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// The slot holding `id`, if any: its home, else at most [`MAX_PROBE`] slots after it.
    #[inline]
    fn find(id: u32) -> Option<&'static Slot> {
        if id == 0 {
            return None;
        }
        let home = slot(id, 0);
        if home.id.load(Ordering::Acquire) == id {
            return Some(home);
        }
        find_displaced(id)
    }

    #[cold]
    #[inline(never)]
    fn find_displaced(id: u32) -> Option<&'static Slot> {
        let max = MAX_PROBE.load(Ordering::Acquire);
        (1..=max)
            .map(|distance| slot(id, distance))
            .find(|slot| slot.id.load(Ordering::Acquire) == id)
    }

    /// The layer id the callout `id` is registered for, if this driver registered it.
    pub(super) fn layer(id: u32) -> Option<u16> {
        let slot = find(id)?;
        if slot.instance.load(Ordering::Acquire).is_null() {
            return None;
        }
        Some(slot.layer.load(Ordering::Relaxed))
    }

    /// The instance registered under `id`: `None` for an id that is not (or no longer, or not
    /// yet) published.
    #[inline]
    pub(super) fn lookup(id: u32) -> Option<NonNull<()>> {
        find(id).and_then(|slot| NonNull::new(slot.instance.load(Ordering::Acquire)))
    }

    /// Withdraws `id`. Only after the filter engine has stopped calling the callout.
    pub(super) fn remove(id: u32) {
        if let Some(slot) = find(id) {
            // The instance first: a slot whose id still matches never yields a freed instance.
            slot.instance
                .store(core::ptr::null_mut(), Ordering::Release);
            slot.id.store(0, Ordering::Release);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        // The table is shared by every test of this crate that registers a callout; ids far
        // above the simulator's keep these apart from them.
        const BASE: u32 = 0xfff0_0000;

        #[test]
        fn an_id_is_found_in_its_home_slot_and_displaced_ids_after_it() {
            let mut instances = [0u8; 3];
            let pointers: [*mut (); 3] = core::array::from_fn(|i| (&raw mut instances[i]).cast());
            // Equal modulo SLOTS: the second and third go after the first.
            let ids = [BASE, BASE + SLOTS as u32, BASE + 2 * SLOTS as u32];
            for (id, pointer) in ids.iter().zip(pointers) {
                assert!(insert(*id, pointer, 7));
            }
            for (id, pointer) in ids.iter().zip(pointers) {
                assert_eq!(lookup(*id).map(NonNull::as_ptr), Some(pointer));
                assert_eq!(layer(*id), Some(7));
            }
            assert!(MAX_PROBE.load(Ordering::Relaxed) >= 2);
            // An id never registered, at the same home: no instance.
            assert_eq!(lookup(BASE + 3 * SLOTS as u32), None);
            // Removing the first leaves the displaced ones reachable.
            remove(ids[0]);
            assert_eq!(lookup(ids[0]), None);
            assert_eq!(layer(ids[0]), None);
            assert_eq!(lookup(ids[2]).map(NonNull::as_ptr), Some(pointers[2]));
            remove(ids[1]);
            remove(ids[2]);
            for id in ids {
                assert_eq!(lookup(id), None, "{id:#x} withdrawn");
            }
        }

        #[test]
        fn id_zero_is_never_registered_nor_found() {
            let mut instance = 0u8;
            assert!(!insert(0, (&raw mut instance).cast(), 7));
            assert_eq!(lookup(0), None);
            assert_eq!(layer(0), None);
        }
    }
}

/// The layer id the callout with runtime id `callout_id` is registered for, if this driver
/// registered it with [`CalloutRegistration::register`].
pub(crate) fn registered_layer(callout_id: u32) -> Option<u16> {
    registry::layer(callout_id)
}

/// The flow contexts a registration has associated: (flow id, layer id, context). Kept so that
/// unregistration can remove the ones still attached (`FwpsCalloutUnregisterById0` refuses with
/// `STATUS_DEVICE_BUSY` while any is).
pub(crate) struct Flows {
    entries: crate::spin_lock::SpinLock<alloc::vec::Vec<(u64, u16, u64)>>,
}

impl Flows {
    const fn new() -> Flows {
        Flows {
            entries: crate::spin_lock::SpinLock::new(alloc::vec::Vec::new()),
        }
    }

    /// Records an association; false if there is no memory for it.
    fn insert(&self, irql: &mut DispatchLevel<'_>, flow: u64, layer: u16, context: u64) -> bool {
        self.entries.lock(irql, |entries, _| {
            if entries.try_reserve(1).is_err() {
                return false;
            }
            entries.push((flow, layer, context));
            true
        })
    }

    fn remove(&self, irql: &mut DispatchLevel<'_>, context: u64) {
        self.entries
            .lock(irql, |entries, _| entries.retain(|&(_, _, c)| c != context));
    }

    /// The (flow, layer) pairs still associated.
    fn snapshot(&self, irql: impl RaiseIrql) -> alloc::vec::Vec<(u64, u16)> {
        self.entries.lock(irql, |entries, _| {
            entries
                .iter()
                .map(|&(flow, layer, _)| (flow, layer))
                .collect()
        })
    }
}

/// What the registry points to: the callout and its flow bookkeeping.
struct Registered<C> {
    callout: C,
    flows: Flows,
    /// The callout's key, for messages.
    key: Guid,
    /// Set once a callback of this callout arrived at another layer and was reported, so a
    /// misconfiguration reports once instead of once per packet (at `DISPATCH_LEVEL`).
    wrong_layer_reported: AtomicBool,
}

impl<C> Registered<C> {
    /// Prints, once per registration, that a callback for layer `registered` arrived for
    /// `layer_id`, and what the SDK did instead of calling the callout. Cold and never inlined:
    /// its formatting buffer stays off the classify path's stack frame.
    #[cold]
    #[inline(never)]
    fn report_wrong_layer(&self, callback: &str, registered: &str, layer_id: u16, instead: &str) {
        if self.wrong_layer_reported.swap(true, Ordering::Relaxed) {
            return;
        }
        // One line under `DbgPrintEx`'s 256-byte chunks, also with the longest layer names.
        let arrived = crate::layer::layer_by_id(layer_id).map_or("unknown", |l| l.name);
        crate::kd_print!(
            Error,
            "wfp-rs: callout {} (layer {registered}): {callback} at layer {arrived}; {instead}. One CalloutKey and GUID per layer; reported once\n",
            self.key
        );
    }
}

/// What the classify trampoline does with a classification at a layer other than the
/// callout's (`registered`): the callout is not called. With the write right, the action becomes
/// a hard block (`FWP_ACTION_BLOCK`, write right cleared); without it, the classify-out is left
/// untouched (a hard decision above stands). Reported once per registration.
#[cold]
#[inline(never)]
fn classify_at_wrong_layer<C>(
    registered: &str,
    layer_id: u16,
    callout_id: u32,
    out: &mut sys::FWPS_CLASSIFY_OUT0,
) {
    let outcome = if out.rights & sys::FWPS_RIGHT_ACTION_WRITE != 0 {
        out.actionType = sys::FWP_ACTION_BLOCK;
        out.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
        "blocked, classify not called"
    } else {
        "left as is (no write right), not classified"
    };
    if let Some(instance) = registry::lookup(callout_id) {
        // SAFETY: as in `classify_trampoline`, whose caller this is: the registry holds a live
        // `PoolBox<Registered<C>>` for this id while the engine calls the callout.
        let registered_callout = unsafe { instance.cast::<Registered<C>>().as_ref() };
        registered_callout.report_wrong_layer("classifyFn", registered, layer_id, outcome);
    }
}

unsafe extern "system" fn classify_trampoline<
    L: Layer,
    F: Send + Sync + 'static,
    C: Callout<L, F>,
>(
    in_fixed_values: *const sys::FWPS_INCOMING_VALUES0,
    in_meta_values: *const sys::FWPS_INCOMING_METADATA_VALUES0,
    layer_data: *mut core::ffi::c_void,
    classify_context: *const core::ffi::c_void,
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
    let callout_id = filter.action.calloutId;
    // Checked in every build, before anything reads a field: the values' indices are those of
    // `fixed.layerId`, and `Classify<L>` would read them as `L`'s.
    if fixed.layerId != L::ID {
        classify_at_wrong_layer::<C>(L::NAME, fixed.layerId, callout_id, out);
        return;
    }
    let Some(instance) = registry::lookup(callout_id) else {
        return;
    };
    // SAFETY: the registry holds a live `PoolBox<Registered<C>>` for this id until the callout
    // is unregistered, and unregistration waits for calls in progress.
    let registered = unsafe { instance.cast::<Registered<C>>().as_ref() };
    // SAFETY: classifyFn runs at IRQL <= DISPATCH_LEVEL; the token lives for this call.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    let mut classify = Classify {
        // SAFETY: the values are the engine's for a classification at `L` (`layerId` was
        // checked above).
        values: unsafe { IncomingValues::new(fixed) },
        metadata: Metadata::new(meta),
        filter: FilterInfo { raw: filter },
        out: ClassifyOut::new(out),
        flow_context,
        classify_context,
        layer_data: layer_data.cast_const(),
        callout_id,
        flows: &registered.flows,
        _context: PhantomData,
    };
    registered.callout.classify(&mut irql, &mut classify);
}

unsafe extern "system" fn notify_trampoline<
    L: Layer,
    F: Send + Sync + 'static,
    C: Callout<L, F>,
>(
    notify_type: sys::FWPS_CALLOUT_NOTIFY_TYPE,
    _filter_key: *const sys::GUID,
    filter: *mut sys::FWPS_FILTER3,
) -> sys::NTSTATUS {
    // SAFETY: the engine passes a valid filter for the duration of the call.
    let Some(filter) = (unsafe { filter.as_ref() }) else {
        return 0;
    };
    // No layer check is possible here: FWPS_FILTER3 carries no layer id. None is needed for
    // soundness: `FilterEvent` exposes nothing typed by `L`.
    let Some(instance) = registry::lookup(filter.action.calloutId) else {
        return 0;
    };
    // SAFETY: as in `classify_trampoline`.
    let registered = unsafe { instance.cast::<Registered<C>>().as_ref() };
    // SAFETY: notifyFn runs at IRQL <= DISPATCH_LEVEL; the token lives for this call.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    let info = FilterInfo { raw: filter };
    let event = match notify_type {
        sys::FWPS_CALLOUT_NOTIFY_ADD_FILTER => FilterEvent::Added(info),
        sys::FWPS_CALLOUT_NOTIFY_DELETE_FILTER => FilterEvent::Deleted(info),
        sys::FWPS_CALLOUT_NOTIFY_ADD_FILTER_POST_COMMIT => FilterEvent::Committed(info),
        _ => return 0,
    };
    match registered.callout.notify(&mut irql, event) {
        Ok(()) => 0,
        Err(status) => status.raw(),
    }
}

unsafe extern "system" fn flow_delete_trampoline<
    L: Layer,
    F: Send + Sync + 'static,
    C: Callout<L, F>,
>(
    layer_id: u16,
    callout_id: u32,
    flow_context: u64,
) {
    let Some(context) = NonNull::new(flow_context as *mut F) else {
        return;
    };
    if layer_id != L::ID {
        // The SDK associates this callout's contexts only at `L` (a `Classify<L>`, which runs
        // only at `L`), so this one came from elsewhere (a raw `FwpsFlowAssociateContext0`):
        // it is not known to be a `PoolBox<F>`, and is left alone rather than reinterpreted.
        if let Some(instance) = registry::lookup(callout_id) {
            // SAFETY: as in `classify_trampoline`.
            let registered = unsafe { instance.cast::<Registered<C>>().as_ref() };
            registered.report_wrong_layer(
                "flowDeleteFn",
                L::NAME,
                layer_id,
                "its context is left alone",
            );
        }
        return;
    }
    // SAFETY: flowDeleteFn runs at IRQL <= DISPATCH_LEVEL; the token lives for this call.
    let mut irql = unsafe { DispatchLevel::new_unchecked() };
    let registered = registry::lookup(callout_id).map(|instance| {
        // SAFETY: as in `classify_trampoline`: the engine calls flowDeleteFn only while the
        // callout is registered.
        unsafe { instance.cast::<Registered<C>>().as_ref() }
    });
    // Forgotten before the box is freed: once freed, its address may be associated again (on
    // another processor), and that entry must survive.
    if let Some(registered) = registered {
        registered.flows.remove(&mut irql, flow_context);
    }
    // SAFETY: the context is a `PoolBox<F>` this registration associated, handed back exactly
    // once by the engine.
    let value = PoolBox::into_inner(unsafe { PoolBox::from_raw(context, PoolTag::SDK) });
    match registered {
        Some(registered) => registered.callout.flow_deleted(&mut irql, layer_id, value),
        None => drop(value),
    }
}

/// A callout registered with the filter engine. Unregisters on drop (at `PASSIVE_LEVEL`;
/// prefer [`unregister`](Self::unregister), which reports failure). `F` is the callout's flow
/// context type (`()` for callouts without flow contexts).
pub struct CalloutRegistration<L: Layer, C: Callout<L, F>, F: Send + Sync + 'static = ()> {
    id: u32,
    key: Guid,
    instance: Option<PoolBox<Registered<C>>>,
    _layer: PhantomData<fn() -> (L, F)>,
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

impl<L: Layer, F: Send + Sync + 'static, C: Callout<L, F>> CalloutRegistration<L, C, F> {
    /// Registers `callout` under `key` (`FwpsCalloutRegister3`) for `driver`'s device. The
    /// layer `L` is the key's: the callout entry and the filters that name the callout take the
    /// same key, so they are at the same layer.
    pub fn register(
        irql: &impl AtPassive,
        driver: &Driver<'_>,
        key: CalloutKey<L>,
        callout: C,
    ) -> Result<Self, RegisterError<C>> {
        let key = key.guid();
        let registered = Registered {
            callout,
            flows: Flows::new(),
            key,
            wrong_layer_reported: AtomicBool::new(false),
        };
        let instance =
            PoolBox::try_new(registered, PoolTag::SDK, irql).map_err(|e| RegisterError {
                status: Status::INSUFFICIENT_RESOURCES,
                callout: e.into_inner().callout,
            })?;
        let raw = sys::FWPS_CALLOUT3 {
            calloutKey: key.0,
            flags: 0,
            classifyFn: Some(classify_trampoline::<L, F, C>),
            notifyFn: Some(notify_trampoline::<L, F, C>),
            flowDeleteFn: Some(flow_delete_trampoline::<L, F, C>),
        };
        let mut id = 0u32;
        // SAFETY: PASSIVE_LEVEL (the token); the device is the driver's; `raw` and `id` are
        // locals valid for the call.
        let status =
            unsafe { sys::FwpsCalloutRegister3(driver.raw_device().cast(), &raw, &mut id) };
        if let Err(status) = Status::from_ntstatus(status) {
            return Err(RegisterError {
                status,
                callout: PoolBox::into_inner(instance).callout,
            });
        }
        let pointer = PoolBox::into_raw(instance);
        if !registry::insert(id, pointer.as_ptr().cast(), L::ID) {
            // SAFETY: just registered by us; nothing was routed to it (the registry lacks it).
            unsafe { sys::FwpsCalloutUnregisterById0(id) };
            // SAFETY: the pointer came from `into_raw` above, with the SDK tag.
            let instance = unsafe { PoolBox::from_raw(pointer, PoolTag::SDK) };
            return Err(RegisterError {
                status: Status::INSUFFICIENT_RESOURCES,
                callout: PoolBox::into_inner(instance).callout,
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
    pub fn key(&self) -> CalloutKey<L> {
        CalloutKey::new(self.key)
    }

    /// The registered callout.
    pub fn callout(&self) -> &C {
        &self
            .instance
            .as_ref()
            .expect("present until unregistered")
            .callout
    }

    /// Unregisters (`FwpsCalloutUnregisterById0`). On failure the callout stays registered and
    /// is handed back with the status.
    ///
    /// Flow contexts still attached are removed first (each comes back through
    /// [`Callout::flow_deleted`]). One whose flow is being classified on another processor at
    /// that moment is handed back only when that classification returns, so unregistration can
    /// fail with `STATUS_DEVICE_BUSY`: try again.
    ///
    /// `irql` is `&mut PassiveLevel`: unregistering takes a spin lock, so it raises the IRQL.
    pub fn unregister(
        mut self,
        mut irql: impl RaiseIrql<Level: AtPassive>,
    ) -> Result<(), (Self, Status)> {
        match self.unregister_inner(irql.reborrow()) {
            Ok(()) => Ok(()),
            Err(status) => Err((self, status)),
        }
    }

    /// Unregisters; while flow contexts remain (`STATUS_DEVICE_BUSY`), removes them — which
    /// hands each to [`Callout::flow_deleted`] — and tries again.
    fn unregister_inner<T: Token + AtPassive>(&mut self, irql: &mut T) -> Result<(), Status> {
        crate::irql::verify(irql);
        // SAFETY: PASSIVE_LEVEL (the token); the id is ours.
        let mut status = unsafe { sys::FwpsCalloutUnregisterById0(self.id) };
        if status == Status::DEVICE_BUSY.raw()
            && let Some(instance) = &self.instance
        {
            for (flow, layer) in instance.flows.snapshot(irql) {
                // SAFETY: IRQL <= DISPATCH_LEVEL; a flow context this callout associated. The
                // engine calls flowDeleteFn, which frees the value and forgets the entry.
                unsafe { sys::FwpsFlowRemoveContext0(flow, layer, self.id) };
            }
            // SAFETY: as above.
            status = unsafe { sys::FwpsCalloutUnregisterById0(self.id) };
        }
        Status::from_ntstatus(status)?;
        // The engine no longer calls the callout: withdraw and free the instance.
        registry::remove(self.id);
        self.instance = None;
        Ok(())
    }
}

impl<L: Layer, F: Send + Sync + 'static, C: Callout<L, F>> Drop for CalloutRegistration<L, C, F> {
    fn drop(&mut self) {
        if self.instance.is_none() {
            return;
        }
        // SAFETY: `unregister_inner` is SDK code; it reaches no token of the driver's (a token
        // the dropping code holds stays in its frame) and runs no driver code but the callout's
        // drop, which receives no token; its spin lock restores the IRQL.
        let result =
            unsafe { PassiveLevel::try_current_in_sdk(|irql| self.unregister_inner(irql)) };
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

impl<L: Layer, F: Send + Sync + 'static, C: Callout<L, F>> fmt::Debug
    for CalloutRegistration<L, C, F>
{
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
