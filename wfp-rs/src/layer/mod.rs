//! WFP layers and their fields, as types.
//!
//! Each filtering layer is a type implementing [`Layer`] (its runtime id, its management key,
//! its address family, if it has one), and each data field is a type implementing [`FieldKind`] (its
//! management condition key and the Rust type of its value). A field is readable at a layer only
//! if the pair implements [`Field`], which carries the layer-specific index
//! (`FWPS_FIELD_<LAYER>_<FIELD>`): reading a field a layer does not have is a compile error, not
//! a wrong index.
//!
//! Not every layer is an IP layer: the MAC frame and vSwitch Ethernet layers see Ethernet frames
//! and have no IP version. They have `IP_VERSION` `None` and the uninhabited
//! [`NoAddress`](value::NoAddress) as their `Address`; no address field is implemented at them, so
//! no address can be read or matched there, while code generic over every layer (`L: Layer`,
//! `L::Address: Into<IpAddr>`) still compiles for them.
//!
//! The tables in `defs.rs` are transcribed from the WDK 10.0.22621 headers (`km/fwpsk.h` for
//! runtime layer ids and field indices, `shared/fwpmu.h`/`fwpmk.h` for the layer and condition
//! GUIDs).

use core::fmt;
use core::marker::PhantomData;
use core::net::{Ipv4Addr, Ipv6Addr};

use crate::guid::Guid;
pub use crate::packet::{DataStart, LayerData};
use crate::sys;
use value::{AddressValue, Decode, FieldError, HasRepr, Repr, ValueKind};

mod defs;
pub use defs::*;

/// The IP version of a layer's traffic. A layer below IP (MAC frame, vSwitch Ethernet) has none:
/// see [`Layer::IP_VERSION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4: addresses are `UINT32` in host byte order.
    V4,
    /// IPv6: addresses are pointers to `FWP_BYTE_ARRAY16`, in network byte order.
    V6,
}

mod sealed {
    pub trait Sealed {}
}

/// A WFP filtering layer.
pub trait Layer: sealed::Sealed + Copy + fmt::Debug + Send + Sync + 'static {
    /// The runtime layer id (`FWPS_LAYER_*`, the `layerId` a callout sees).
    const ID: u16;
    /// The management key (`FWPM_LAYER_*`), used when adding filters and callouts.
    const KEY: Guid;
    /// The C name without the `FWPM_LAYER_` prefix, e.g. `ALE_AUTH_CONNECT_V4`.
    const NAME: &'static str;
    /// The IP version of the traffic at this layer; `None` at the layers that see Ethernet frames
    /// (MAC frame, vSwitch Ethernet), where `Address` is [`NoAddress`](value::NoAddress).
    const IP_VERSION: Option<IpVersion>;
    /// How many fields the layer has (`FWPS_FIELD_<LAYER>_MAX`).
    const FIELD_COUNT: u32;
    /// The type of the layer's address fields: `Ipv4Addr` or `Ipv6Addr`, or the uninhabited
    /// [`NoAddress`](value::NoAddress) at a layer without an IP version.
    type Address: AddressValue;
    /// The fields, for tables and the simulator.
    const FIELDS: &'static [FieldInfo];
    /// What the engine passes a callout's `classifyFn` in `layerData` at this layer.
    const DATA: LayerData;
}

/// A layer whose `classifyFn` gets a packet: `layerData` is a `NET_BUFFER_LIST` (or null, where
/// the layer has none for a classification), read with
/// [`Classify::packet`](crate::callout::Classify::packet). Where the data starts in it is
/// [`Layer::DATA`].
#[diagnostic::on_unimplemented(
    message = "the layer `{Self}` passes no packet to classifyFn",
    label = "no NET_BUFFER_LIST at this layer",
    note = "packets are read at the IP packet, transport, datagram, ICMP error, forward, MAC/vSwitch, ALE_AUTH_CONNECT, ALE_AUTH_RECV_ACCEPT and ALE_FLOW_ESTABLISHED layers, stream data at the stream layers with `Classify::stream`; see `wfp_rs::packet` and docs/packets.md"
)]
pub trait PacketLayer: Layer {}

/// A stream layer (`STREAM_V4`/`STREAM_V6` and their discard layers): `layerData` is an
/// `FWPS_STREAM_CALLOUT_IO_PACKET0`, read with [`Classify::stream`](crate::callout::Classify::stream).
#[diagnostic::on_unimplemented(
    message = "the layer `{Self}` passes no stream data to classifyFn",
    label = "not a stream layer",
    note = "stream data is read at STREAM_V4/STREAM_V6 (and their discard layers); see `wfp_rs::packet`"
)]
pub trait StreamLayer: Layer {}

/// The index of the field whose management key is `condition` in a layer's table, if the
/// layer has one. `const`, so callers can look up once per layer at compile time.
pub(crate) const fn field_index(fields: &[FieldInfo], condition: Guid) -> Option<u32> {
    let (want, mut i) = (condition.0, 0);
    while i < fields.len() {
        let have = fields[i].condition.0;
        let mut same =
            have.Data1 == want.Data1 && have.Data2 == want.Data2 && have.Data3 == want.Data3;
        let mut b = 0;
        while same && b < 8 {
            same = have.Data4[b] == want.Data4[b];
            b += 1;
        }
        if same {
            return Some(fields[i].index);
        }
        i += 1;
    }
    None
}

/// A field of a layer, as a table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    /// The index in `FWPS_INCOMING_VALUES0::incomingValue`.
    pub index: u32,
    /// The field kind's Rust name.
    pub name: &'static str,
    /// The management condition key.
    pub condition: Guid,
    /// What the value holds.
    pub kind: ValueKind,
}

/// A layer's description at run time, found by id with [`layer_by_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The C name without the `FWPM_LAYER_` prefix.
    pub name: &'static str,
    /// The runtime id.
    pub id: u16,
    /// The management key.
    pub key: Guid,
    /// The IP version; `None` at the layers that see Ethernet frames.
    pub ip_version: Option<IpVersion>,
    /// `FWPS_FIELD_<LAYER>_MAX`.
    pub field_count: u32,
    /// The fields that have a condition key.
    pub fields: &'static [FieldInfo],
    /// What `layerData` is at this layer.
    pub data: LayerData,
}

/// The layer with runtime id `id`, if this crate knows it: every kernel layer a callout can be
/// classified at, ids 0..=59 and 62..=77. Ids above 81 are never found: their numbering differs
/// between Windows builds (see the table's notes in `defs.rs`), so none is a constant here.
pub fn layer_by_id(id: u16) -> Option<&'static LayerInfo> {
    ALL_LAYERS.iter().find(|layer| layer.id == id)
}

/// The layer with management key `key`, if this crate knows it.
pub fn layer_by_key(key: &Guid) -> Option<&'static LayerInfo> {
    ALL_LAYERS.iter().find(|layer| layer.key == *key)
}

/// The incoming values of a classification at layer `L`, read by typed field.
///
/// ```compile_fail
/// use wfp_rs::layer::{fields, AleResourceAssignmentV4, IncomingValues};
/// fn read(values: &IncomingValues<'_, AleResourceAssignmentV4>) {
///     // A bind has no remote endpoint: ALE_RESOURCE_ASSIGNMENT has no IP_REMOTE_PORT field.
///     let _ = values.get::<fields::IpRemotePort>();
/// }
/// ```
pub struct IncomingValues<'v, L: Layer> {
    raw: &'v sys::FWPS_INCOMING_VALUES0,
    _layer: PhantomData<L>,
}

impl<'v, L: Layer> IncomingValues<'v, L> {
    /// Wraps the values the filter engine passed for a classification at layer `L`.
    ///
    /// # Safety
    ///
    /// `raw` must be the engine's `FWPS_INCOMING_VALUES0` for a classification at `L` (its
    /// `layerId` is `L::ID`), valid for `'v`.
    pub(crate) unsafe fn new(raw: &'v sys::FWPS_INCOMING_VALUES0) -> IncomingValues<'v, L> {
        debug_assert_eq!(raw.layerId, L::ID);
        IncomingValues {
            raw,
            _layer: PhantomData,
        }
    }

    /// Reads field `K`.
    // Inlined: the read is a bounds check, a tag compare and a load, which the caller's code
    // around it (the cache-hit path) should not pay a call for.
    #[inline]
    pub fn get<K>(&self) -> Result<<K::Repr as Decode<'v, L>>::Out, FieldError>
    where
        K: Field<L> + HasRepr,
        K::Repr: Decode<'v, L>,
    {
        let value = self.raw_value(K::INDEX)?;
        <K::Repr as Decode<'v, L>>::decode(value)
    }

    /// The raw value at `index`, for fields this crate does not type.
    pub fn raw_value(&self, index: u32) -> Result<&'v sys::FWP_VALUE0, FieldError> {
        if index >= self.raw.valueCount || self.raw.incomingValue.is_null() {
            return Err(FieldError::Missing {
                index,
                count: self.raw.valueCount,
            });
        }
        // SAFETY: the engine's array holds `valueCount` values, valid for 'v (`new`'s contract),
        // so the element at `index < valueCount` is in bounds.
        let element = unsafe { self.raw.incomingValue.add(index as usize) };
        // SAFETY: as above, the element is initialised and valid for 'v.
        Ok(unsafe { &(*element).value })
    }

    /// How many values the layer delivered.
    pub fn len(&self) -> u32 {
        self.raw.valueCount
    }

    /// Whether the layer delivered no values.
    pub fn is_empty(&self) -> bool {
        self.raw.valueCount == 0
    }
}

impl<L: Layer> fmt::Debug for IncomingValues<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingValues")
            .field("layer", &L::NAME)
            .field("count", &self.raw.valueCount)
            .finish()
    }
}

/// A data field (a filtering condition), independent of the layer it appears at.
pub trait FieldKind: Copy + fmt::Debug + 'static {
    /// The management key (`FWPM_CONDITION_*`), used in filter conditions.
    const CONDITION: Guid;
    /// The field's name in this crate, e.g. `IpRemotePort` (`FWPM_CONDITION_IP_REMOTE_PORT`).
    const NAME: &'static str;
}

/// `L` has the field `Self`, at index [`INDEX`](Field::INDEX).
#[diagnostic::on_unimplemented(
    message = "the layer `{L}` has no field `{Self}`",
    label = "not a field of `{L}`",
    note = "each WFP layer has its own set of fields (FWPS_FIELDS_* in fwpsk.h); see the `layer` module for which layer has which"
)]
pub trait Field<L: Layer>: FieldKind {
    /// The field's index in `FWPS_INCOMING_VALUES0::incomingValue` at layer `L`.
    const INDEX: u32;
}

/// Declares field kinds: `Name: ValueRepr = "condition-guid";`
macro_rules! field_kinds {
    ($($(#[$doc:meta])* $name:ident : $repr:ident = $key:literal ;)*) => {
        /// The data fields, one type per `FWPM_CONDITION_*`.
        pub mod fields {
            use super::*;
            $(
                $(#[$doc])*
                #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
                pub struct $name;

                impl FieldKind for $name {
                    const CONDITION: Guid = wfp_rs_macros::guid!($key);
                    const NAME: &'static str = stringify!($name);
                }

                impl HasRepr for $name {
                    type Repr = value::repr::$repr;
                }
            )*
        }
    };
}

/// Declares layers with their fields.
macro_rules! layers {
    ($(
        $(#[$doc:meta])*
        $name:ident {
            c_name: $c_name:literal,
            id: $id:literal,
            key: $key:literal,
            ip_version: $version:ident,
            field_count: $count:literal,
            data: $data:ident $(($start:ident))?,
            fields: { $($field:ident = $index:literal),* $(,)? } $(,)?
        }
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
            pub struct $name;

            impl sealed::Sealed for $name {}

            impl Layer for $name {
                const ID: u16 = $id;
                const KEY: Guid = wfp_rs_macros::guid!($key);
                const NAME: &'static str = $c_name;
                const IP_VERSION: Option<IpVersion> = layers!(@version $version);
                const FIELD_COUNT: u32 = $count;
                const DATA: LayerData = layers!(@data $data $($start)?);
                type Address = layers!(@address $version);
                const FIELDS: &'static [FieldInfo] = &[$(
                    FieldInfo {
                        index: $index,
                        name: <fields::$field as FieldKind>::NAME,
                        condition: <fields::$field as FieldKind>::CONDITION,
                        kind: <<fields::$field as HasRepr>::Repr as Repr>::KIND,
                    },
                )*];
            }

            layers!(@data_impl $name $data);

            $(
                impl Field<$name> for fields::$field {
                    const INDEX: u32 = $index;
                }
            )*
        )*

        /// Every layer this crate knows.
        pub const ALL_LAYERS: &[LayerInfo] = &[$(
            LayerInfo {
                name: $c_name,
                id: $id,
                key: <$name as Layer>::KEY,
                ip_version: layers!(@version $version),
                field_count: $count,
                fields: <$name as Layer>::FIELDS,
                data: <$name as Layer>::DATA,
            },
        )*];
    };
    (@address V4) => { Ipv4Addr };
    (@address V6) => { Ipv6Addr };
    (@address None) => { value::NoAddress };
    (@version None) => { None };
    (@data Packet $start:ident) => { LayerData::Packet(DataStart::$start) };
    (@data $data:ident) => { LayerData::$data };
    (@data_impl $name:ident Packet) => { impl PacketLayer for $name {} };
    (@data_impl $name:ident Stream) => { impl StreamLayer for $name {} };
    (@data_impl $name:ident $data:ident) => {};
    (@version $version:ident) => { Some(IpVersion::$version) };
}
use {field_kinds, layers};

pub mod value;
