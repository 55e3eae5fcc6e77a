//! Filters: the rules that tell the filter engine which traffic a layer permits, blocks, or
//! hands to a callout. Wraps `FWPM_FILTER0` and `FWPM_FILTER_CONDITION0`.
//!
//! A [`Filter`] is built for one layer, `Filter::<L>`, and its conditions are typed by that
//! layer: a condition on a field the layer does not have, or with a value of the wrong type, does
//! not compile. Add it with [`Engine::add_filter`].
//!
//! ```
//! use core::net::Ipv4Addr;
//! use wfp_rs::engine::{Engine, SessionOptions};
//! use wfp_rs::filter::{Filter, FilterAction, Match, Weight};
//! use wfp_rs::layer::value::IpProtocol;
//! use wfp_rs::layer::{fields, AleAuthConnectV4};
//! use wfp_rs::{guid, Guid};
//!
//! const BLOCK_TELNET: Guid = guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a01");
//!
//! # wfp_rs_sim::Machine::new().at_passive(|irql| {
//! let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
//! let filter = Filter::<AleAuthConnectV4>::new(BLOCK_TELNET)
//!     .name("Block telnet to 10.0.0.0/8")
//!     .weight(Weight::Range(10))
//!     .action(FilterAction::Block)
//!     .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
//!     .condition::<fields::IpRemotePort>(Match::Equal(23))
//!     .condition::<fields::IpRemoteAddress>(Match::AddressMask(Ipv4Addr::new(10, 0, 0, 0), 8));
//! let id = engine.add_filter(irql, &filter)?;
//! engine.delete_filter(irql, id)?;
//! # Ok::<(), wfp_rs::Status>(())
//! # }).unwrap();
//! ```
//!
//! A condition on a field the layer lacks is a compile error (a bind has no remote endpoint:
//! `ALE_RESOURCE_ASSIGNMENT` has no `IP_REMOTE_PORT` field):
//!
//! ```compile_fail,E0277
//! use wfp_rs::filter::{Filter, Match};
//! use wfp_rs::layer::{fields, AleResourceAssignmentV4};
//! # const KEY: wfp_rs::Guid = wfp_rs::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a02");
//!
//! let filter = Filter::<AleResourceAssignmentV4>::new(KEY)
//!     .condition::<fields::IpRemotePort>(Match::Equal(443));
//! ```
//!
//! So is a value of the wrong type (a port is a `u16`, not an address):
//!
//! ```compile_fail,E0308
//! use core::net::Ipv4Addr;
//! use wfp_rs::filter::{Filter, Match};
//! use wfp_rs::layer::{fields, AleAuthConnectV4};
//! # const KEY: wfp_rs::Guid = wfp_rs::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a03");
//!
//! let filter = Filter::<AleAuthConnectV4>::new(KEY)
//!     .condition::<fields::IpRemotePort>(Match::Equal(Ipv4Addr::LOCALHOST));
//! ```
//!
//! and an IPv6 address at an IPv4 layer:
//!
//! ```compile_fail,E0308
//! use core::net::Ipv6Addr;
//! use wfp_rs::filter::{Filter, Match};
//! use wfp_rs::layer::{fields, AleAuthConnectV4};
//! # const KEY: wfp_rs::Guid = wfp_rs::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a04");
//!
//! let filter = Filter::<AleAuthConnectV4>::new(KEY)
//!     .condition::<fields::IpRemoteAddress>(Match::Equal(Ipv6Addr::LOCALHOST));
//! ```
//!
//! # Memory
//!
//! The builder borrows its strings and byte slices; conditions are kept in an
//! [`alloc::vec::Vec`], and [`Engine::add_filter`] builds the C structures in `Vec`s that live
//! for the duration of the `FwpmFilterAdd0` call (the engine copies the filter). Every
//! allocation is fallible (`try_reserve`): running out of memory is reported as
//! `STATUS_INSUFFICIENT_RESOURCES`, never as a panic. A driver image therefore needs a global
//! allocator, such as [`PoolAllocator`](crate::pool::PoolAllocator) (see
//! `examples/minimal-driver`).
//!
//! [`Engine::add_filter`]: crate::engine::Engine::add_filter

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::net::{Ipv4Addr, Ipv6Addr};
use core::ptr;

use crate::callout::CalloutKey;
use crate::engine::DisplayData;
use crate::guid::Guid;
use crate::layer::value::{AppId, ConditionFlags, HasRepr, IpProtocol, Repr, repr};
use crate::layer::{Field, Layer};
use crate::status::Status;
use crate::sys;

/// A filter's identifier at run time, as `FwpmFilterAdd0` returns it and as a callout sees it
/// (`FWPS_FILTER3::filterId`). The engine assigns it when the filter is added; to name a filter
/// across sessions and reboots, use its key (a [`Guid`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilterId(u64);

impl FilterId {
    /// Wraps a raw filter id, for example `FWPS_FILTER3::filterId` in a classify callback.
    pub const fn from_raw(id: u64) -> FilterId {
        FilterId(id)
    }

    /// The raw `UINT64` id.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FilterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The weight of a filter within its sublayer: higher weights are evaluated first.
/// Wraps `FWPM_FILTER0::weight`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Weight {
    /// `FWP_EMPTY`: the engine chooses a weight from the filter's conditions (more specific
    /// filters first).
    #[default]
    Auto,
    /// `FWP_UINT8`: a weight range from 0 to 15; the engine orders filters within the range by
    /// their conditions. A value above 15 makes [`Engine::add_filter`] fail with
    /// `STATUS_FWP_INVALID_WEIGHT`.
    ///
    /// [`Engine::add_filter`]: crate::engine::Engine::add_filter
    Range(u8),
    /// `FWP_UINT64`: this exact weight.
    Exact(u64),
}

/// What a filter at layer `L` does with traffic its conditions match. Wraps `FWPM_ACTION0`.
///
/// A callout action names the callout by its [`CalloutKey<L>`], the key the callout is
/// registered and added with, so a filter cannot call out to a callout of another layer: a key
/// of another layer does not compile (`expected CalloutKey<AleAuthConnectV4>, found
/// CalloutKey<OutboundTransportV4>`).
///
/// ```
/// use wfp_rs::callout::CalloutKey;
/// use wfp_rs::filter::{Filter, FilterAction};
/// use wfp_rs::layer::AleAuthConnectV4;
/// use wfp_rs::guid;
///
/// const VERDICTS: CalloutKey<AleAuthConnectV4> =
///     CalloutKey::new(guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a06"));
/// let filter = Filter::new(guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a07"))
///     .action(FilterAction::CalloutTerminating(VERDICTS)); // a Filter<AleAuthConnectV4>
/// # let _ = filter;
/// ```
pub enum FilterAction<L: Layer> {
    /// `FWP_ACTION_PERMIT`.
    Permit,
    /// `FWP_ACTION_BLOCK`.
    Block,
    /// `FWP_ACTION_CALLOUT_TERMINATING`: the callout with this key decides, and must return
    /// permit or block.
    CalloutTerminating(CalloutKey<L>),
    /// `FWP_ACTION_CALLOUT_INSPECTION`: the callout with this key inspects the traffic and
    /// always returns continue.
    CalloutInspection(CalloutKey<L>),
    /// `FWP_ACTION_CALLOUT_UNKNOWN`: the callout with this key may decide or continue.
    CalloutUnknown(CalloutKey<L>),
}

impl<L: Layer> FilterAction<L> {
    /// The action type and the callout key (null for permit and block).
    fn parts(self) -> (sys::FWP_ACTION_TYPE, Guid) {
        match self {
            FilterAction::Permit => (sys::FWP_ACTION_PERMIT, Guid::default()),
            FilterAction::Block => (sys::FWP_ACTION_BLOCK, Guid::default()),
            FilterAction::CalloutTerminating(key) => {
                (sys::FWP_ACTION_CALLOUT_TERMINATING, key.guid())
            }
            FilterAction::CalloutInspection(key) => {
                (sys::FWP_ACTION_CALLOUT_INSPECTION, key.guid())
            }
            FilterAction::CalloutUnknown(key) => (sys::FWP_ACTION_CALLOUT_UNKNOWN, key.guid()),
        }
    }

    fn raw(self) -> sys::FWPM_ACTION0 {
        let (kind, key) = self.parts();
        sys::FWPM_ACTION0 {
            r#type: kind,
            u: sys::FWPM_ACTION0_u { calloutKey: key.0 },
        }
    }
}

// By hand: derives would require `L: PartialEq + Eq + Hash` of the layer marker.
impl<L: Layer> Clone for FilterAction<L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<L: Layer> Copy for FilterAction<L> {}

impl<L: Layer> PartialEq for FilterAction<L> {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl<L: Layer> Eq for FilterAction<L> {}

impl<L: Layer> core::hash::Hash for FilterAction<L> {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl<L: Layer> fmt::Debug for FilterAction<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterAction::Permit => f.write_str("Permit"),
            FilterAction::Block => f.write_str("Block"),
            FilterAction::CalloutTerminating(key) => {
                f.debug_tuple("CalloutTerminating").field(key).finish()
            }
            FilterAction::CalloutInspection(key) => {
                f.debug_tuple("CalloutInspection").field(key).finish()
            }
            FilterAction::CalloutUnknown(key) => {
                f.debug_tuple("CalloutUnknown").field(key).finish()
            }
        }
    }
}

bitflags::bitflags! {
    /// `FWPM_FILTER_FLAG_*`: the filter flags a caller may set when adding a filter. Left out:
    /// `DISABLED` (only ever reported by the engine) and the provider-context flags (not
    /// wrapped yet).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct FilterFlags: u32 {
        /// `FWPM_FILTER_FLAG_PERSISTENT`: the filter survives a reboot. Not allowed in a
        /// dynamic session; a persistent filter that calls out should name a persistent
        /// callout.
        const PERSISTENT = sys::FWPM_FILTER_FLAG_PERSISTENT;
        /// `FWPM_FILTER_FLAG_BOOTTIME`: the filter is enforced at boot, from when the TCP/IP
        /// stack starts until the filter engine (BFE) has started, and not after that (BFE
        /// then enforces its persistent filters). Cannot be combined with
        /// [`PERSISTENT`](Self::PERSISTENT); not allowed in a dynamic session. The way to keep
        /// connections from being made before a callout driver and its persistent filters are
        /// in place (see the repository's `docs/firewall.md`, "Fail-closed from boot").
        const BOOT_TIME = sys::FWPM_FILTER_FLAG_BOOTTIME;
        /// `FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT`: the filter's permit or block is final for
        /// lower-weight sublayers (clears `FWPS_RIGHT_ACTION_WRITE`), unless a veto overrides it.
        const CLEAR_ACTION_RIGHT = sys::FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT;
        /// `FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED`: if the callout is not registered,
        /// the filter permits rather than blocks. Only for
        /// [`CalloutTerminating`](FilterAction::CalloutTerminating) and
        /// [`CalloutUnknown`](FilterAction::CalloutUnknown) actions.
        const PERMIT_IF_CALLOUT_UNREGISTERED = sys::FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED;
        /// `FWPM_FILTER_FLAG_INDEXED`: ask the engine to index the filter for faster lookup
        /// during classification (Windows 8 and later).
        const INDEXED = sys::FWPM_FILTER_FLAG_INDEXED;
    }
}

/// How a condition compares the layer's value of a field with the condition value `T`.
/// Wraps `FWP_MATCH_TYPE` and the condition-value types that go with it.
///
/// `T` is the field's value type at the filter's layer: `u16` for ports, `Ipv4Addr` or
/// `Ipv6Addr` for addresses (by the layer's IP version), [`IpProtocol`], [`ConditionFlags`],
/// [`AppPath`] for application ids, `&[u8]` for other byte blobs, `u8`/`u32`/`u64` for the
/// plain integer fields.
///
/// Not every match suits every value; the engine documents which data types support which
/// match, and a filter with an unsupported combination fails to add with
/// `STATUS_FWP_MATCH_TYPE_MISMATCH`:
///
/// | match | supported by |
/// |---|---|
/// | `Equal` | every value type |
/// | `NotEqual`, `Greater`, `GreaterOrEqual`, `Less`, `LessOrEqual`, `Range` | every value type here (integers, addresses, byte blobs are "sortable") |
/// | `AddressMask` | addresses only |
/// | `FlagsAllSet`, `FlagsAnySet`, `FlagsNoneSet` | unsigned integers: every integer field, [`ConditionFlags`], [`IpProtocol`] and IPv4 addresses; not IPv6 addresses or byte blobs |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Match<T> {
    /// `FWP_MATCH_EQUAL`.
    Equal(T),
    /// `FWP_MATCH_NOT_EQUAL` (Windows 7 and later).
    NotEqual(T),
    /// `FWP_MATCH_GREATER`.
    Greater(T),
    /// `FWP_MATCH_GREATER_OR_EQUAL`.
    GreaterOrEqual(T),
    /// `FWP_MATCH_LESS`.
    Less(T),
    /// `FWP_MATCH_LESS_OR_EQUAL`.
    LessOrEqual(T),
    /// `FWP_MATCH_RANGE` with an `FWP_RANGE0` of `(low, high)`, both inclusive.
    Range(T, T),
    /// `FWP_MATCH_EQUAL` with an address and a prefix length: `FWP_V4_ADDR_MASK` (the prefix
    /// length becomes a host-order `UINT32` mask, at most 32) or `FWP_V6_ADDR_MASK` (the prefix
    /// length as is, at most 128). The address bits beyond the prefix are cleared. A longer
    /// prefix makes [`Engine::add_filter`] fail with `STATUS_INVALID_PARAMETER`.
    ///
    /// [`Engine::add_filter`]: crate::engine::Engine::add_filter
    AddressMask(T, u8),
    /// `FWP_MATCH_FLAGS_ALL_SET`: every bit of the condition value is set in the field.
    FlagsAllSet(T),
    /// `FWP_MATCH_FLAGS_ANY_SET`: at least one bit of the condition value is set.
    FlagsAnySet(T),
    /// `FWP_MATCH_FLAGS_NONE_SET`: no bit of the condition value is set.
    FlagsNoneSet(T),
}

/// An application, for conditions on `ALE_APP_ID` (and `ALE_ORIGINAL_APP_ID`): the NT device
/// path of its executable, as the engine identifies applications, e.g.
/// `\device\harddiskvolume3\windows\system32\curl.exe`.
///
/// A drive-letter path (`C:\...`) never matches: kernel code has no `FwpmGetAppIdFromFileName0`,
/// so resolve the volume yourself, or take the path from a classification
/// ([`AppId`], which converts with `From` and is used byte for byte).
///
/// Paths given as text are lower-cased (each character that lower-cases to exactly one
/// character, which covers ASCII and most scripts) and encoded as the engine stores app ids:
/// a byte blob of NUL-terminated UTF-16LE.
///
/// ```
/// use wfp_rs::filter::AppPath;
/// let curl = AppPath::new(r"\Device\HarddiskVolume3\Windows\System32\curl.exe");
/// assert_eq!(curl.to_string(), r"\device\harddiskvolume3\windows\system32\curl.exe");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppPath<'a>(AppPathRepr<'a>);

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum AppPathRepr<'a> {
    /// Text, lower-cased and encoded when the filter is added.
    Text(&'a str),
    /// The blob exactly as the engine delivered it (NUL-terminated UTF-16LE).
    Blob(&'a [u8]),
}

impl<'a> AppPath<'a> {
    /// An application by its NT device path.
    pub const fn new(nt_path: &'a str) -> AppPath<'a> {
        AppPath(AppPathRepr::Text(nt_path))
    }

    /// The number of bytes of the app-id blob: UTF-16 code units, terminator included, times 2.
    fn blob_len(&self) -> usize {
        match self.0 {
            AppPathRepr::Text(text) => {
                2 * (text.chars().map(|c| lower(c).len_utf16()).sum::<usize>() + 1)
            }
            AppPathRepr::Blob(bytes) => bytes.len(),
        }
    }

    /// Writes the app-id blob into `out`, which has room for `blob_len()` more bytes.
    fn write_blob(&self, out: &mut Vec<u8>) {
        match self.0 {
            AppPathRepr::Text(text) => {
                let mut units = [0u16; 2];
                for c in text.chars() {
                    for unit in lower(c).encode_utf16(&mut units) {
                        out.extend_from_slice(&unit.to_le_bytes());
                    }
                }
                out.extend_from_slice(&[0, 0]);
            }
            AppPathRepr::Blob(bytes) => out.extend_from_slice(bytes),
        }
    }
}

impl<'a> From<AppId<'a>> for AppPath<'a> {
    /// The application of a classification, byte for byte (the engine's own encoding).
    fn from(app: AppId<'a>) -> AppPath<'a> {
        AppPath(AppPathRepr::Blob(app.as_bytes()))
    }
}

impl fmt::Display for AppPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            AppPathRepr::Text(text) => {
                for c in text.chars() {
                    fmt::Write::write_char(f, lower(c))?;
                }
                Ok(())
            }
            AppPathRepr::Blob(bytes) => fmt::Display::fmt(&AppId::from_bytes(bytes), f),
        }
    }
}

impl fmt::Debug for AppPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppPath(\"{self}\")")
    }
}

/// Lower-cases `c` where that gives exactly one character (a simple, length-preserving case
/// mapping, as the engine's app ids use); otherwise keeps `c`.
fn lower(c: char) -> char {
    let mut lowered = c.to_lowercase();
    match (lowered.next(), lowered.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::repr::U8 {}
    impl Sealed for super::repr::U16 {}
    impl Sealed for super::repr::U32 {}
    impl Sealed for super::repr::U64 {}
    impl Sealed for super::repr::Address {}
    impl Sealed for super::repr::AppId {}
    impl Sealed for super::repr::ByteBlob {}
    impl Sealed for super::repr::ConditionFlags {}
    impl Sealed for super::repr::IpProtocol {}

    /// The address types of the layers, as condition values.
    pub trait Address: Sized {
        /// Whether `FWP_MATCH_FLAGS_*` applies (an unsigned integer).
        const FLAGS: bool;
        fn scalar<'a>(self) -> super::Scalar<'a>;
        fn mask<'a>(self, prefix: u8) -> Result<super::Operand<'a>, super::Status>;
    }
}

/// A value representation (a marker in [`repr`]) that filter conditions support at layer `L`,
/// and the Rust type of its condition values. Sealed.
///
/// Supported: the integers (`u8`, `u16`, `u32`, `u64`), addresses (the layer's `Ipv4Addr` or
/// `Ipv6Addr`), application ids ([`AppPath`]), other byte blobs (`&[u8]`),
/// [`ConditionFlags`] and [`IpProtocol`].
#[diagnostic::on_unimplemented(
    message = "filter conditions on `{Self}` values are not supported",
    label = "this field's condition type is not supported by `Filter::condition`",
    note = "supported: integer fields, addresses, IP protocol, condition flags, application ids and byte blobs; SID, security-descriptor and token fields are not"
)]
pub trait ConditionRepr<'a, L: Layer>: Repr + sealed::Sealed {
    /// The Rust type of a condition value.
    type Value;

    /// Encodes a match on a value of this representation.
    #[doc(hidden)]
    fn encode(matching: Match<Self::Value>) -> Result<Encoded<'a>, Status>;
}

/// A condition, encoded but not yet laid out as C structures. Not part of the API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Encoded<'a> {
    match_type: sys::FWP_MATCH_TYPE,
    operand: Operand<'a>,
}

/// A condition value.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    One(Scalar<'a>),
    Range(Scalar<'a>, Scalar<'a>),
    V4Mask { addr: u32, mask: u32 },
    V6Mask { addr: [u8; 16], prefix: u8 },
}

/// A single value, as one arm of `FWP_VALUE0`.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Scalar<'a> {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Array16([u8; 16]),
    Blob(&'a [u8]),
    AppId(AppPath<'a>),
}

/// Maps a [`Match`] to a match type and operand. `flags` says whether the value is an unsigned
/// integer (`FWP_MATCH_FLAGS_*`); `mask` encodes [`Match::AddressMask`] where it applies.
fn encode_with<'a, T>(
    matching: Match<T>,
    flags: bool,
    scalar: impl Fn(T) -> Scalar<'a>,
    mask: impl FnOnce(T, u8) -> Result<Operand<'a>, Status>,
) -> Result<Encoded<'a>, Status> {
    let one = |match_type, value| {
        Ok(Encoded {
            match_type,
            operand: Operand::One(scalar(value)),
        })
    };
    match matching {
        Match::Equal(v) => one(sys::FWP_MATCH_EQUAL, v),
        Match::NotEqual(v) => one(sys::FWP_MATCH_NOT_EQUAL, v),
        Match::Greater(v) => one(sys::FWP_MATCH_GREATER, v),
        Match::GreaterOrEqual(v) => one(sys::FWP_MATCH_GREATER_OR_EQUAL, v),
        Match::Less(v) => one(sys::FWP_MATCH_LESS, v),
        Match::LessOrEqual(v) => one(sys::FWP_MATCH_LESS_OR_EQUAL, v),
        Match::FlagsAllSet(v) if flags => one(sys::FWP_MATCH_FLAGS_ALL_SET, v),
        Match::FlagsAnySet(v) if flags => one(sys::FWP_MATCH_FLAGS_ANY_SET, v),
        Match::FlagsNoneSet(v) if flags => one(sys::FWP_MATCH_FLAGS_NONE_SET, v),
        Match::FlagsAllSet(_) | Match::FlagsAnySet(_) | Match::FlagsNoneSet(_) => {
            Err(Status::FWP_MATCH_TYPE_MISMATCH)
        }
        Match::Range(low, high) => Ok(Encoded {
            match_type: sys::FWP_MATCH_RANGE,
            operand: Operand::Range(scalar(low), scalar(high)),
        }),
        Match::AddressMask(value, prefix) => Ok(Encoded {
            match_type: sys::FWP_MATCH_EQUAL,
            operand: mask(value, prefix)?,
        }),
    }
}

fn no_mask<'a, T>(_: T, _: u8) -> Result<Operand<'a>, Status> {
    Err(Status::FWP_MATCH_TYPE_MISMATCH)
}

macro_rules! integer_repr {
    ($($marker:ident => $ty:ty, $scalar:expr;)*) => {$(
        impl<'a, L: Layer> ConditionRepr<'a, L> for repr::$marker {
            type Value = $ty;
            fn encode(matching: Match<$ty>) -> Result<Encoded<'a>, Status> {
                encode_with(matching, true, $scalar, no_mask)
            }
        }
    )*};
}

integer_repr! {
    U8 => u8, Scalar::U8;
    U16 => u16, Scalar::U16;
    U32 => u32, Scalar::U32;
    U64 => u64, Scalar::U64;
    ConditionFlags => ConditionFlags, |flags: ConditionFlags| Scalar::U32(flags.bits());
    IpProtocol => IpProtocol, |protocol: IpProtocol| Scalar::U8(u8::from(protocol));
}

impl<'a, L: Layer> ConditionRepr<'a, L> for repr::Address
where
    L::Address: sealed::Address,
{
    type Value = L::Address;
    fn encode(matching: Match<L::Address>) -> Result<Encoded<'a>, Status> {
        use sealed::Address;
        encode_with(
            matching,
            L::Address::FLAGS,
            L::Address::scalar,
            L::Address::mask,
        )
    }
}

impl sealed::Address for Ipv4Addr {
    // An IPv4 address is an FWP_UINT32.
    const FLAGS: bool = true;

    fn scalar<'a>(self) -> Scalar<'a> {
        // Host byte order: a.b.c.d is a<<24 | b<<16 | c<<8 | d, which is what `From` gives.
        Scalar::U32(u32::from(self))
    }

    fn mask<'a>(self, prefix: u8) -> Result<Operand<'a>, Status> {
        let mask = match prefix {
            0 => 0,
            1..=32 => u32::MAX << (32 - u32::from(prefix)),
            _ => return Err(Status::INVALID_PARAMETER),
        };
        Ok(Operand::V4Mask {
            addr: u32::from(self) & mask,
            mask,
        })
    }
}

impl sealed::Address for Ipv6Addr {
    // An IPv6 address is an FWP_BYTE_ARRAY16_TYPE, not an integer.
    const FLAGS: bool = false;

    fn scalar<'a>(self) -> Scalar<'a> {
        // Network byte order, as the engine stores IPv6 addresses.
        Scalar::Array16(self.octets())
    }

    fn mask<'a>(self, prefix: u8) -> Result<Operand<'a>, Status> {
        let mask = match prefix {
            0 => 0,
            1..=128 => u128::MAX << (128 - u32::from(prefix)),
            _ => return Err(Status::INVALID_PARAMETER),
        };
        Ok(Operand::V6Mask {
            addr: (u128::from(self) & mask).to_be_bytes(),
            prefix,
        })
    }
}

impl<'a, L: Layer> ConditionRepr<'a, L> for repr::AppId {
    type Value = AppPath<'a>;
    fn encode(matching: Match<AppPath<'a>>) -> Result<Encoded<'a>, Status> {
        encode_with(matching, false, Scalar::AppId, no_mask)
    }
}

impl<'a, L: Layer> ConditionRepr<'a, L> for repr::ByteBlob {
    type Value = &'a [u8];
    fn encode(matching: Match<&'a [u8]>) -> Result<Encoded<'a>, Status> {
        encode_with(matching, false, Scalar::Blob, no_mask)
    }
}

/// One condition of a filter.
#[derive(Clone, Copy, Debug)]
struct Condition<'a> {
    field: Guid,
    encoded: Encoded<'a>,
}

/// A filter for layer `L`, built step by step and added with
/// [`Engine::add_filter`](crate::engine::Engine::add_filter). Wraps `FWPM_FILTER0`.
///
/// Only the key is required. Unless set: the display name is empty (the engine requires one, so
/// an empty string is passed), there is no description, the sublayer is the engine's default
/// sublayer (a null key, `FWPM_SUBLAYER_UNIVERSAL`), the weight is [`Weight::Auto`], no flags
/// are set, the raw context is 0, and there are no conditions (the filter matches all traffic
/// at the layer). There is no default [action](Filter::action): a filter without one fails to
/// add with `STATUS_FWP_INVALID_ACTION_TYPE`.
///
/// Mistakes the compiler cannot see (a match that does not suit the value, an out-of-range
/// weight or prefix length, running out of memory while building) are reported by
/// `add_filter`, so the builder methods chain without `?`.
///
/// See the [module documentation](self) for an example.
#[derive(Clone)]
#[must_use = "a filter does nothing until it is added with `Engine::add_filter`"]
pub struct Filter<'a, L: Layer> {
    key: Guid,
    name: &'a str,
    description: Option<&'a str>,
    sublayer: Guid,
    provider: Option<Guid>,
    weight: Weight,
    action: Option<FilterAction<L>>,
    flags: FilterFlags,
    raw_context: u64,
    conditions: Vec<Condition<'a>>,
    /// The first error a builder method met, reported by `add_filter`.
    error: Option<Status>,
    _layer: PhantomData<L>,
}

impl<'a, L: Layer> Filter<'a, L> {
    /// A filter at layer `L` with the key `key` (`FWPM_FILTER0::filterKey`), which names it
    /// uniquely in the engine. (A null key lets the engine choose one.)
    pub fn new(key: Guid) -> Filter<'a, L> {
        Filter {
            key,
            name: "",
            description: None,
            sublayer: Guid::default(),
            provider: None,
            weight: Weight::Auto,
            action: None,
            flags: FilterFlags::empty(),
            raw_context: 0,
            conditions: Vec::new(),
            error: None,
            _layer: PhantomData,
        }
    }

    /// The display name (`displayData.name`), shown by `netsh wfp show filters`.
    pub fn name(mut self, name: &'a str) -> Self {
        self.name = name;
        self
    }

    /// The description (`displayData.description`).
    pub fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }

    /// The sublayer the filter belongs to (`subLayerKey`); it must exist, see
    /// [`Engine::add_sublayer`](crate::engine::Engine::add_sublayer).
    pub fn sublayer(mut self, key: Guid) -> Self {
        self.sublayer = key;
        self
    }

    /// The provider the filter belongs to (`providerKey`).
    pub fn provider(mut self, key: Guid) -> Self {
        self.provider = Some(key);
        self
    }

    /// The weight within the sublayer.
    pub fn weight(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    /// What the filter does with matching traffic. A callout action's key is of the filter's
    /// layer.
    pub fn action(mut self, action: FilterAction<L>) -> Self {
        self.action = Some(action);
        self
    }

    /// The filter flags (replacing any set before).
    pub fn flags(mut self, flags: FilterFlags) -> Self {
        self.flags = flags;
        self
    }

    /// A value the engine passes to the callout with the filter (`rawContext`, seen by the
    /// callout as `FWPS_FILTER3::context`).
    pub fn raw_context(mut self, context: u64) -> Self {
        self.raw_context = context;
        self
    }

    /// Adds a condition on field `K`, which must be a field of layer `L`; the value type is
    /// the field's (see [`Match`]). All conditions must hold for the filter to apply, except
    /// that *consecutive* conditions on the same field are alternatives (the engine ORs them,
    /// Windows 7 and later); conditions are passed in the order they are added.
    ///
    /// ```
    /// use wfp_rs::filter::{AppPath, Filter, FilterAction, Match};
    /// use wfp_rs::layer::value::ConditionFlags;
    /// use wfp_rs::layer::{fields, AleAuthConnectV6};
    /// use core::net::Ipv6Addr;
    /// # const KEY: wfp_rs::Guid = wfp_rs::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a05");
    ///
    /// let filter = Filter::<AleAuthConnectV6>::new(KEY)
    ///     .action(FilterAction::Block)
    ///     .condition::<fields::AleAppId>(Match::Equal(AppPath::new(
    ///         r"\device\harddiskvolume3\windows\system32\curl.exe",
    ///     )))
    ///     .condition::<fields::IpRemoteAddress>(Match::AddressMask(
    ///         Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
    ///         32,
    ///     ))
    ///     .condition::<fields::IpRemotePort>(Match::Range(1024, 65535))
    ///     .condition::<fields::Flags>(Match::FlagsNoneSet(ConditionFlags::IS_LOOPBACK));
    /// ```
    pub fn condition<K>(mut self, matching: Match<<K::Repr as ConditionRepr<'a, L>>::Value>) -> Self
    where
        K: Field<L> + HasRepr,
        K::Repr: ConditionRepr<'a, L>,
    {
        let encoded = match <K::Repr as ConditionRepr<'a, L>>::encode(matching) {
            Ok(encoded) => encoded,
            Err(status) => {
                self.error.get_or_insert(status);
                return self;
            }
        };
        if self.conditions.try_reserve(1).is_err() {
            self.error.get_or_insert(Status::INSUFFICIENT_RESOURCES);
            return self;
        }
        self.conditions.push(Condition {
            field: K::CONDITION,
            encoded,
        });
        self
    }

    /// The filter's key.
    pub fn key(&self) -> Guid {
        self.key
    }

    /// How many conditions the filter has.
    pub fn condition_count(&self) -> usize {
        self.conditions.len()
    }

    /// Lays the filter out as an `FWPM_FILTER0`, with every structure it points to, and calls
    /// `f` with it. The structures live until `f` returns.
    ///
    /// In three frames, so that no large temporary lies under the deepest calls (in a debug
    /// build every temporary has a stack slot of its own, and `cargo xtask stack --debug` counts
    /// them): this one checks the filter and holds only the display data and the vector of
    /// slots (both filled by calls that reach the allocator, the deepest part); [`Filter::slots`]
    /// fills the slots; [`Filter::lay_out`], called after it has returned, builds the
    /// `FWPM_FILTER0` and calls `f`.
    pub(crate) fn with_raw<R>(&self, f: impl FnOnce(&sys::FWPM_FILTER0) -> R) -> Result<R, Status> {
        if let Some(status) = self.error {
            return Err(status);
        }
        let Some(action) = self.action else {
            return Err(Status::FWP_INVALID_ACTION_TYPE);
        };
        if let Weight::Range(range) = self.weight
            && range > 15
        {
            return Err(Status::FWP_INVALID_WEIGHT);
        }
        let mut display = DisplayData::new(self.name, self.description)?;
        // The values the conditions point to. Filled completely before any pointer into it is
        // taken, and not touched again (so not moved) until `f` returns.
        let mut slots = self.slots()?;
        self.lay_out(action, &mut display, &mut slots, f)
    }

    /// A slot for each condition, filled with what its value points to.
    #[inline(never)]
    fn slots(&self) -> Result<Vec<Slot>, Status> {
        let mut slots = try_vec(self.conditions.len())?;
        for condition in &self.conditions {
            // Filled where it lies, in the vector (which has room: no reallocation moves it):
            // a `Slot` built and returned by value would be copied through several temporaries
            // in a debug build.
            slots.push(Slot::EMPTY);
            if let Some(slot) = slots.last_mut() {
                slot.fill(&condition.encoded.operand)?;
            }
        }
        Ok(slots)
    }

    /// The rest of [`Filter::with_raw`], once the slots are filled: the weight, the conditions pointing into `slots`, the `FWPM_FILTER0`, and the call of `f`.
    #[inline(never)]
    fn lay_out<R>(
        &self,
        action: FilterAction<L>,
        display: &mut DisplayData,
        slots: &mut [Slot],
        f: impl FnOnce(&sys::FWPM_FILTER0) -> R,
    ) -> Result<R, Status> {
        let action = action.raw();
        let mut provider = self.provider.map(|key| key.0);
        // What an FWP_UINT64 weight points to.
        let mut exact_weight = match self.weight {
            Weight::Exact(weight) => weight,
            Weight::Auto | Weight::Range(_) => 0,
        };
        let weight = match self.weight {
            Weight::Auto => EMPTY_VALUE,
            Weight::Range(range) if range <= 15 => Arm::U8(range).value(),
            Weight::Range(_) => return Err(Status::FWP_INVALID_WEIGHT),
            Weight::Exact(_) => Arm::U64(&raw mut exact_weight).value(),
        };

        let mut raw_conditions = try_vec(self.conditions.len())?;
        for (slot, condition) in slots.iter_mut().zip(&self.conditions) {
            raw_conditions.push(sys::FWPM_FILTER_CONDITION0 {
                fieldKey: condition.field.0,
                matchType: condition.encoded.match_type,
                conditionValue: slot.condition_value(&condition.encoded.operand)?,
            });
        }

        let raw = sys::FWPM_FILTER0 {
            filterKey: self.key.0,
            displayData: display.raw(),
            flags: self.flags.bits(),
            providerKey: provider.as_mut().map_or(ptr::null_mut(), ptr::from_mut),
            providerData: EMPTY_BLOB,
            layerKey: L::KEY.0,
            subLayerKey: self.sublayer.0,
            weight,
            numFilterConditions: u32::try_from(raw_conditions.len())
                .map_err(|_| Status::INVALID_PARAMETER)?,
            filterCondition: if raw_conditions.is_empty() {
                ptr::null_mut()
            } else {
                raw_conditions.as_mut_ptr()
            },
            action,
            u: sys::FWPM_FILTER0_u {
                rawContext: self.raw_context,
            },
            reserved: ptr::null_mut(),
            filterId: 0,
            effectiveWeight: EMPTY_VALUE,
        };
        Ok(f(&raw))
    }
}

impl<L: Layer> fmt::Debug for Filter<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("layer", &L::NAME)
            .field("key", &self.key)
            .field("name", &self.name)
            .field("sublayer", &self.sublayer)
            .field("weight", &self.weight)
            .field("action", &self.action)
            .field("flags", &self.flags)
            .field("conditions", &self.conditions.len())
            .finish_non_exhaustive()
    }
}

/// An empty `Vec` with room for `len` elements, or `STATUS_INSUFFICIENT_RESOURCES`.
pub(crate) fn try_vec<T>(len: usize) -> Result<Vec<T>, Status> {
    let mut vec = Vec::new();
    vec.try_reserve_exact(len)
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    Ok(vec)
}

const EMPTY_VALUE: sys::FWP_VALUE0 = sys::FWP_VALUE0 {
    r#type: sys::FWP_EMPTY,
    u: sys::FWP_VALUE0_u {
        uint64: ptr::null_mut(),
    },
};

pub(crate) const EMPTY_BLOB: sys::FWP_BYTE_BLOB = sys::FWP_BYTE_BLOB {
    size: 0,
    data: ptr::null_mut(),
};

/// One arm of `FWP_VALUE0` / `FWP_CONDITION_VALUE0`, with its tag. (The two unions share
/// these arms; building both from this avoids reading a union.)
#[derive(Clone, Copy)]
enum Arm {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(*mut u64),
    Array16(*mut sys::FWP_BYTE_ARRAY16),
    Blob(*mut sys::FWP_BYTE_BLOB),
}

impl Arm {
    fn value(self) -> sys::FWP_VALUE0 {
        use sys::FWP_VALUE0_u as U;
        let (tag, u) = match self {
            Arm::U8(v) => (sys::FWP_UINT8, U { uint8: v }),
            Arm::U16(v) => (sys::FWP_UINT16, U { uint16: v }),
            Arm::U32(v) => (sys::FWP_UINT32, U { uint32: v }),
            Arm::U64(p) => (sys::FWP_UINT64, U { uint64: p }),
            Arm::Array16(p) => (sys::FWP_BYTE_ARRAY16_TYPE, U { byteArray16: p }),
            Arm::Blob(p) => (sys::FWP_BYTE_BLOB_TYPE, U { byteBlob: p }),
        };
        sys::FWP_VALUE0 { r#type: tag, u }
    }

    fn condition_value(self) -> sys::FWP_CONDITION_VALUE0 {
        use sys::FWP_CONDITION_VALUE0_u as U;
        let (tag, u) = match self {
            Arm::U8(v) => (sys::FWP_UINT8, U { uint8: v }),
            Arm::U16(v) => (sys::FWP_UINT16, U { uint16: v }),
            Arm::U32(v) => (sys::FWP_UINT32, U { uint32: v }),
            Arm::U64(p) => (sys::FWP_UINT64, U { uint64: p }),
            Arm::Array16(p) => (sys::FWP_BYTE_ARRAY16_TYPE, U { byteArray16: p }),
            Arm::Blob(p) => (sys::FWP_BYTE_BLOB_TYPE, U { byteBlob: p }),
        };
        sys::FWP_CONDITION_VALUE0 { r#type: tag, u }
    }
}

/// Storage for what one value points to.
struct Leaf {
    uint64: u64,
    array16: sys::FWP_BYTE_ARRAY16,
    blob: sys::FWP_BYTE_BLOB,
    /// An app id encoded from text.
    bytes: Vec<u8>,
}

impl Leaf {
    /// A leaf that points to nothing yet.
    const EMPTY: Leaf = Leaf {
        uint64: 0,
        array16: sys::FWP_BYTE_ARRAY16 {
            byteArray16: [0; 16],
        },
        blob: EMPTY_BLOB,
        bytes: Vec::new(),
    };

    /// Stores what `scalar` points to in this (empty) leaf.
    fn fill(&mut self, scalar: &Scalar<'_>) -> Result<(), Status> {
        match *scalar {
            Scalar::U64(v) => self.uint64 = v,
            Scalar::Array16(v) => self.array16.byteArray16 = v,
            Scalar::AppId(path) => {
                let len = path.blob_len();
                self.bytes
                    .try_reserve_exact(len)
                    .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
                path.write_blob(&mut self.bytes);
            }
            Scalar::U8(_) | Scalar::U16(_) | Scalar::U32(_) | Scalar::Blob(_) => {}
        }
        Ok(())
    }

    /// The arm for `scalar`, pointing into this leaf (or, for a borrowed blob, at the caller's
    /// bytes). The leaf must not move or be written while the arm is in use.
    fn arm(&mut self, scalar: &Scalar<'_>) -> Result<Arm, Status> {
        match *scalar {
            Scalar::U8(v) => Ok(Arm::U8(v)),
            Scalar::U16(v) => Ok(Arm::U16(v)),
            Scalar::U32(v) => Ok(Arm::U32(v)),
            Scalar::U64(_) => Ok(Arm::U64(&raw mut self.uint64)),
            Scalar::Array16(_) => Ok(Arm::Array16(&raw mut self.array16)),
            Scalar::Blob(bytes) | Scalar::AppId(AppPath(AppPathRepr::Blob(bytes))) => {
                self.blob_arm(bytes.as_ptr(), bytes.len())
            }
            Scalar::AppId(AppPath(AppPathRepr::Text(_))) => {
                let (data, len) = (self.bytes.as_ptr(), self.bytes.len());
                self.blob_arm(data, len)
            }
        }
    }

    /// A blob arm over `len` bytes at `data`, which stay alive and unchanged while it is used.
    fn blob_arm(&mut self, data: *const u8, len: usize) -> Result<Arm, Status> {
        self.blob = sys::FWP_BYTE_BLOB {
            size: u32::try_from(len).map_err(|_| Status::INVALID_PARAMETER)?,
            // The engine only reads through this pointer (it copies the filter).
            data: data.cast_mut(),
        };
        Ok(Arm::Blob(&raw mut self.blob))
    }
}

/// Storage for what one condition value points to.
struct Slot {
    low: Leaf,
    high: Leaf,
    range: sys::FWP_RANGE0,
    v4: sys::FWP_V4_ADDR_AND_MASK,
    v6: sys::FWP_V6_ADDR_AND_MASK,
}

impl Slot {
    /// A slot that holds nothing yet; [`Slot::fill`] fills it in place.
    const EMPTY: Slot = Slot {
        low: Leaf::EMPTY,
        high: Leaf::EMPTY,
        range: sys::FWP_RANGE0 {
            valueLow: EMPTY_VALUE,
            valueHigh: EMPTY_VALUE,
        },
        v4: sys::FWP_V4_ADDR_AND_MASK { addr: 0, mask: 0 },
        v6: sys::FWP_V6_ADDR_AND_MASK {
            addr: [0; 16],
            prefixLength: 0,
        },
    };

    /// Stores what `operand` points to in this (empty) slot.
    fn fill(&mut self, operand: &Operand<'_>) -> Result<(), Status> {
        match *operand {
            Operand::One(ref low) => self.low.fill(low)?,
            Operand::Range(ref low, ref high) => {
                self.low.fill(low)?;
                self.high.fill(high)?;
            }
            Operand::V4Mask { addr, mask } => self.v4 = sys::FWP_V4_ADDR_AND_MASK { addr, mask },
            Operand::V6Mask { addr, prefix } => {
                self.v6 = sys::FWP_V6_ADDR_AND_MASK {
                    addr,
                    prefixLength: prefix,
                }
            }
        }
        Ok(())
    }

    /// The condition value for `operand`, pointing into this slot, which must not move or be
    /// written while the value is in use. Each pointee is complete before its pointer is taken.
    fn condition_value(
        &mut self,
        operand: &Operand<'_>,
    ) -> Result<sys::FWP_CONDITION_VALUE0, Status> {
        use sys::FWP_CONDITION_VALUE0_u as U;
        Ok(match operand {
            Operand::One(value) => self.low.arm(value)?.condition_value(),
            Operand::Range(low, high) => {
                self.range = sys::FWP_RANGE0 {
                    valueLow: self.low.arm(low)?.value(),
                    valueHigh: self.high.arm(high)?.value(),
                };
                sys::FWP_CONDITION_VALUE0 {
                    r#type: sys::FWP_RANGE_TYPE,
                    u: U {
                        rangeValue: &raw mut self.range,
                    },
                }
            }
            Operand::V4Mask { .. } => sys::FWP_CONDITION_VALUE0 {
                r#type: sys::FWP_V4_ADDR_MASK,
                u: U {
                    v4AddrMask: &raw mut self.v4,
                },
            },
            Operand::V6Mask { .. } => sys::FWP_CONDITION_VALUE0 {
                r#type: sys::FWP_V6_ADDR_MASK,
                u: U {
                    v6AddrMask: &raw mut self.v6,
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{AleAuthConnectV4, AleAuthConnectV6, FieldKind, fields};
    use alloc::string::ToString;

    const KEY: Guid = crate::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a10");
    const CALLOUT: CalloutKey<AleAuthConnectV4> =
        CalloutKey::new(crate::guid!("6a3bd3e4-2f70-4b0e-9d55-0c2b7e0f1a11"));

    fn units(text: *const u16) -> alloc::vec::Vec<u16> {
        let mut out = alloc::vec::Vec::new();
        let mut at = text;
        // SAFETY: test helper over strings this module built, NUL-terminated.
        while unsafe { *at } != 0 {
            // SAFETY: as above; the terminator has not been reached.
            out.push(unsafe { *at });
            // SAFETY: within the string, as the terminator comes later.
            at = unsafe { at.add(1) };
        }
        out
    }

    #[test]
    fn lays_out_header_action_weight_and_context() {
        let filter = Filter::<AleAuthConnectV4>::new(KEY)
            .name("Block it")
            .description("a test")
            .provider(CALLOUT.guid())
            .weight(Weight::Exact(0x1234_5678_9abc))
            .action(FilterAction::CalloutTerminating(CALLOUT))
            .flags(FilterFlags::CLEAR_ACTION_RIGHT)
            .raw_context(77);
        filter
            .with_raw(|raw| {
                assert_eq!(raw.filterKey, KEY.0);
                assert_eq!(raw.layerKey, AleAuthConnectV4::KEY.0);
                assert_eq!(raw.subLayerKey, Guid::default().0);
                assert_eq!(raw.flags, sys::FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT);
                assert_eq!(raw.numFilterConditions, 0);
                assert!(raw.filterCondition.is_null());
                assert_eq!(raw.action.r#type, sys::FWP_ACTION_CALLOUT_TERMINATING);
                // SAFETY: a callout action's union holds the callout key.
                assert_eq!(unsafe { raw.action.u.calloutKey }, CALLOUT.guid().0);
                // SAFETY: no provider-context flag, so the union holds the raw context.
                assert_eq!(unsafe { raw.u.rawContext }, 77);
                // SAFETY: set from a live local for the duration of the call.
                assert_eq!(unsafe { *raw.providerKey }, CALLOUT.guid().0);
                assert_eq!(raw.weight.r#type, sys::FWP_UINT64);
                // SAFETY: the tag says uint64.
                assert_eq!(pointee(unsafe { raw.weight.u.uint64 }), 0x1234_5678_9abc);
                let name: alloc::vec::Vec<u16> = "Block it".encode_utf16().collect();
                assert_eq!(units(raw.displayData.name), name);
                let description: alloc::vec::Vec<u16> = "a test".encode_utf16().collect();
                assert_eq!(units(raw.displayData.description), description);
            })
            .unwrap();
    }

    #[test]
    fn defaults_are_an_empty_name_auto_weight_and_no_action() {
        let filter = Filter::<AleAuthConnectV4>::new(KEY).action(FilterAction::Permit);
        filter
            .with_raw(|raw| {
                assert!(!raw.displayData.name.is_null());
                assert!(units(raw.displayData.name).is_empty());
                assert!(raw.displayData.description.is_null());
                assert!(raw.providerKey.is_null());
                assert_eq!(raw.weight.r#type, sys::FWP_EMPTY);
                assert_eq!(raw.action.r#type, sys::FWP_ACTION_PERMIT);
            })
            .unwrap();
        let no_action = Filter::<AleAuthConnectV4>::new(KEY);
        assert_eq!(
            no_action.with_raw(|_| ()),
            Err(Status::FWP_INVALID_ACTION_TYPE)
        );
        let bad_weight = Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .weight(Weight::Range(16));
        assert_eq!(bad_weight.with_raw(|_| ()), Err(Status::FWP_INVALID_WEIGHT));
        Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .weight(Weight::Range(15))
            .with_raw(|raw| {
                assert_eq!(raw.weight.r#type, sys::FWP_UINT8);
                // SAFETY: FWP_UINT8 is stored inline.
                assert_eq!(unsafe { raw.weight.u.uint8 }, 15);
            })
            .unwrap();
    }

    /// What a pointer arm of a value built by `with_raw` points to, read during the call.
    fn pointee<T: Copy>(pointer: *mut T) -> T {
        assert!(!pointer.is_null());
        // SAFETY: the tests call this only inside `with_raw`'s closure, where every pointer of
        // the filter points into live storage.
        unsafe { *pointer }
    }

    fn conditions(raw: &sys::FWPM_FILTER0) -> &[sys::FWPM_FILTER_CONDITION0] {
        // SAFETY: the array holds `numFilterConditions` conditions during `with_raw`.
        unsafe {
            core::slice::from_raw_parts(raw.filterCondition, raw.numFilterConditions as usize)
        }
    }

    #[test]
    fn lays_out_typed_v4_conditions() {
        let filter = Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemotePort>(Match::Equal(443))
            .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Udp))
            .condition::<fields::IpRemoteAddress>(Match::AddressMask(Ipv4Addr::new(10, 1, 2, 3), 8))
            .condition::<fields::IpLocalAddress>(Match::Range(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(192, 168, 0, 9),
            ))
            .condition::<fields::Flags>(Match::FlagsAnySet(ConditionFlags::IS_LOOPBACK))
            .condition::<fields::IpLocalInterface>(Match::NotEqual(0xdead_beef_0000));
        filter
            .with_raw(|raw| {
                let c = conditions(raw);
                assert_eq!(c.len(), 6);

                assert_eq!(c[0].fieldKey, fields::IpRemotePort::CONDITION.0);
                assert_eq!(c[0].matchType, sys::FWP_MATCH_EQUAL);
                assert_eq!(c[0].conditionValue.r#type, sys::FWP_UINT16);
                // SAFETY: the tag says uint16.
                assert_eq!(unsafe { c[0].conditionValue.u.uint16 }, 443);

                assert_eq!(c[1].conditionValue.r#type, sys::FWP_UINT8);
                // SAFETY: the tag says uint8.
                assert_eq!(unsafe { c[1].conditionValue.u.uint8 }, 17);

                assert_eq!(c[2].matchType, sys::FWP_MATCH_EQUAL);
                assert_eq!(c[2].conditionValue.r#type, sys::FWP_V4_ADDR_MASK);
                // SAFETY: the tag says v4AddrMask.
                let mask = pointee(unsafe { c[2].conditionValue.u.v4AddrMask });
                assert_eq!(
                    mask,
                    sys::FWP_V4_ADDR_AND_MASK {
                        addr: 0x0A00_0000,
                        mask: 0xFF00_0000
                    }
                );

                assert_eq!(c[3].matchType, sys::FWP_MATCH_RANGE);
                assert_eq!(c[3].conditionValue.r#type, sys::FWP_RANGE_TYPE);
                // SAFETY: the tag says rangeValue.
                let range = pointee(unsafe { c[3].conditionValue.u.rangeValue });
                assert_eq!(range.valueLow.r#type, sys::FWP_UINT32);
                // SAFETY: the tags say uint32.
                assert_eq!(unsafe { range.valueLow.u.uint32 }, 0xC0A8_0001);
                // SAFETY: as above.
                assert_eq!(unsafe { range.valueHigh.u.uint32 }, 0xC0A8_0009);

                assert_eq!(c[4].matchType, sys::FWP_MATCH_FLAGS_ANY_SET);
                assert_eq!(c[4].conditionValue.r#type, sys::FWP_UINT32);
                // SAFETY: the tag says uint32.
                let flags = unsafe { c[4].conditionValue.u.uint32 };
                assert_eq!(flags, sys::FWP_CONDITION_FLAG_IS_LOOPBACK);

                assert_eq!(c[5].matchType, sys::FWP_MATCH_NOT_EQUAL);
                assert_eq!(c[5].conditionValue.r#type, sys::FWP_UINT64);
                // SAFETY: the tag says uint64.
                let interface = pointee(unsafe { c[5].conditionValue.u.uint64 });
                assert_eq!(interface, 0xdead_beef_0000);
            })
            .unwrap();
    }

    #[test]
    fn lays_out_v6_addresses_and_app_ids() {
        let address = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
        let delivered: &[u8] = &[b'a', 0, b'B', 0, 0, 0];
        let filter = Filter::<AleAuthConnectV6>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemoteAddress>(Match::Equal(address))
            .condition::<fields::IpLocalAddress>(Match::AddressMask(address, 36))
            .condition::<fields::AleAppId>(Match::Equal(AppPath::new(r"\Device\Ä\X.exe")))
            .condition::<fields::AleAppId>(Match::Equal(AppPath::from(AppId::from_bytes(
                delivered,
            ))));
        filter
            .with_raw(|raw| {
                let c = conditions(raw);
                assert_eq!(c[0].conditionValue.r#type, sys::FWP_BYTE_ARRAY16_TYPE);
                // SAFETY: the tag says byteArray16.
                let array = pointee(unsafe { c[0].conditionValue.u.byteArray16 });
                assert_eq!(array.byteArray16, address.octets());

                assert_eq!(c[1].conditionValue.r#type, sys::FWP_V6_ADDR_MASK);
                // SAFETY: the tag says v6AddrMask.
                let mask = pointee(unsafe { c[1].conditionValue.u.v6AddrMask });
                assert_eq!(mask.prefixLength, 36);
                assert_eq!(
                    mask.addr,
                    Ipv6Addr::new(0x2001, 0xdb8, 0xf000, 0, 0, 0, 0, 0).octets()
                );

                assert_eq!(c[2].conditionValue.r#type, sys::FWP_BYTE_BLOB_TYPE);
                // SAFETY: the tag says byteBlob.
                let blob = pointee(unsafe { c[2].conditionValue.u.byteBlob });
                // SAFETY: the blob holds `size` bytes.
                let bytes = unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) };
                let expected: alloc::vec::Vec<u8> = r"\device\ä\x.exe"
                    .encode_utf16()
                    .chain([0])
                    .flat_map(u16::to_le_bytes)
                    .collect();
                assert_eq!(bytes, expected.as_slice());

                // SAFETY: as above.
                let blob = pointee(unsafe { c[3].conditionValue.u.byteBlob });
                // SAFETY: as above.
                let bytes = unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) };
                assert_eq!(bytes, delivered, "a delivered app id is used byte for byte");
            })
            .unwrap();
    }

    #[test]
    fn unsupported_matches_and_prefixes_are_reported_when_added() {
        let flags_on_v6 = Filter::<AleAuthConnectV6>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemoteAddress>(Match::FlagsAllSet(Ipv6Addr::LOCALHOST));
        assert_eq!(
            flags_on_v6.with_raw(|_| ()),
            Err(Status::FWP_MATCH_TYPE_MISMATCH)
        );
        let mask_on_port = Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemotePort>(Match::AddressMask(80, 8));
        assert_eq!(
            mask_on_port.with_raw(|_| ()),
            Err(Status::FWP_MATCH_TYPE_MISMATCH)
        );
        let long_prefix = Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemoteAddress>(Match::AddressMask(Ipv4Addr::LOCALHOST, 33));
        assert_eq!(long_prefix.with_raw(|_| ()), Err(Status::INVALID_PARAMETER));
        let whole = Filter::<AleAuthConnectV4>::new(KEY)
            .action(FilterAction::Block)
            .condition::<fields::IpRemoteAddress>(Match::AddressMask(Ipv4Addr::BROADCAST, 0))
            .condition::<fields::IpLocalAddress>(Match::AddressMask(Ipv4Addr::BROADCAST, 32));
        whole
            .with_raw(|raw| {
                let c = conditions(raw);
                // SAFETY: the tags say v4AddrMask.
                let any = pointee(unsafe { c[0].conditionValue.u.v4AddrMask });
                // SAFETY: as above.
                let exact = pointee(unsafe { c[1].conditionValue.u.v4AddrMask });
                assert_eq!(any, sys::FWP_V4_ADDR_AND_MASK { addr: 0, mask: 0 });
                assert_eq!(
                    exact,
                    sys::FWP_V4_ADDR_AND_MASK {
                        addr: u32::MAX,
                        mask: u32::MAX
                    }
                );
            })
            .unwrap();
    }

    #[test]
    fn app_paths_display_lower_case() {
        assert_eq!(
            AppPath::new(r"\Device\X\CURL.EXE").to_string(),
            r"\device\x\curl.exe"
        );
        let delivered = [b'a', 0, b'B', 0, 0, 0];
        assert_eq!(
            AppPath::from(AppId::from_bytes(&delivered)).to_string(),
            "aB"
        );
    }
}
