//! Decoding field values (`FWP_VALUE0`) into Rust types, checking the type tag first.
//!
//! A value whose tag is not what the field's table says is an error ([`FieldError`]), never a
//! reinterpretation of the union: the union's 64-bit and blob arms are pointers, and reading the
//! wrong arm would dereference an integer.

use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr};

use super::{IpVersion, Layer};
use crate::sys;

/// Why a field value could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The layer delivered fewer values than the field's index needs (an older Windows version
    /// whose layer has fewer fields).
    #[error("field index {index} is beyond the {count} values the layer delivered")]
    Missing {
        /// The field's index.
        index: u32,
        /// How many values there were.
        count: u32,
    },
    /// The value is `FWP_EMPTY`: the field has no value for this classification.
    #[error("the field is empty")]
    Empty,
    /// The value's type tag is not the one the field has.
    #[error("the field has type tag {found}, expected {expected}")]
    WrongType {
        /// The `FWP_DATA_TYPE` the field should have.
        expected: i32,
        /// The `FWP_DATA_TYPE` it has.
        found: i32,
    },
    /// A pointer arm of the value is null.
    #[error("the field's value pointer is null")]
    Null,
}

/// What a field holds, as the tables name it. Used by the simulator to build values and by the
/// condition builder to check condition types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueKind {
    /// `FWP_UINT8`.
    U8,
    /// `FWP_UINT16`.
    U16,
    /// `FWP_UINT32`.
    U32,
    /// `FWP_UINT64`.
    U64,
    /// An IP address: `FWP_UINT32` at V4 layers, `FWP_BYTE_ARRAY16_TYPE` at V6 layers.
    Address,
    /// An application id: `FWP_BYTE_BLOB_TYPE` holding a NUL-terminated UTF-16 NT path.
    AppId,
    /// Any other `FWP_BYTE_BLOB_TYPE`.
    ByteBlob,
    /// `FWP_SID`.
    Sid,
    /// `FWP_SECURITY_DESCRIPTOR_TYPE`.
    SecurityDescriptor,
    /// `FWP_TOKEN_ACCESS_INFORMATION_TYPE`.
    TokenAccessInformation,
    /// `FWP_TOKEN_INFORMATION_TYPE`.
    TokenInformation,
    /// The `FLAGS` field: `FWP_UINT32` of `FWP_CONDITION_FLAG_*`.
    ConditionFlags,
    /// The IP protocol: `FWP_UINT8`.
    IpProtocol,
    /// `FWP_UNICODE_STRING_TYPE`.
    UnicodeString,
    /// A non-address `FWP_BYTE_ARRAY16_TYPE`.
    ByteArray16,
    /// `FWP_BYTE_ARRAY6_TYPE`: a MAC address.
    ByteArray6,
}

impl ValueKind {
    /// The `FWP_DATA_TYPE` a field of this kind carries at a layer of `version` (`None`: a layer
    /// without an IP version, where an address field has no type and is `FWP_EMPTY`).
    pub const fn data_type(self, version: Option<IpVersion>) -> sys::FWP_DATA_TYPE {
        match self {
            ValueKind::U8 | ValueKind::IpProtocol => sys::FWP_UINT8,
            ValueKind::U16 => sys::FWP_UINT16,
            ValueKind::U32 | ValueKind::ConditionFlags => sys::FWP_UINT32,
            ValueKind::U64 => sys::FWP_UINT64,
            ValueKind::Address => match version {
                Some(IpVersion::V4) => sys::FWP_UINT32,
                Some(IpVersion::V6) => sys::FWP_BYTE_ARRAY16_TYPE,
                None => sys::FWP_EMPTY,
            },
            ValueKind::AppId | ValueKind::ByteBlob => sys::FWP_BYTE_BLOB_TYPE,
            ValueKind::Sid => sys::FWP_SID,
            ValueKind::SecurityDescriptor => sys::FWP_SECURITY_DESCRIPTOR_TYPE,
            ValueKind::TokenAccessInformation => sys::FWP_TOKEN_ACCESS_INFORMATION_TYPE,
            ValueKind::TokenInformation => sys::FWP_TOKEN_INFORMATION_TYPE,
            ValueKind::UnicodeString => sys::FWP_UNICODE_STRING_TYPE,
            ValueKind::ByteArray16 => sys::FWP_BYTE_ARRAY16_TYPE,
            ValueKind::ByteArray6 => sys::FWP_BYTE_ARRAY6_TYPE,
        }
    }
}

/// Connects a field kind to the marker type that decodes it.
pub trait HasRepr {
    /// The marker in [`repr`].
    type Repr: Repr;
}

/// A value representation: its kind, and how to decode it at layer `L`.
pub trait Repr: 'static {
    /// The kind, for tables.
    const KIND: ValueKind;
}

/// Decodes a value of this representation at layer `L`.
pub trait Decode<'v, L: Layer>: Repr {
    /// The Rust type of the value.
    type Out;
    /// Reads `value`, checking its tag.
    fn decode(value: &'v sys::FWP_VALUE0) -> Result<Self::Out, FieldError>;
}

fn check(value: &sys::FWP_VALUE0, expected: sys::FWP_DATA_TYPE) -> Result<(), FieldError> {
    match value.r#type {
        found if found == expected => Ok(()),
        sys::FWP_EMPTY => Err(FieldError::Empty),
        found => Err(FieldError::WrongType { expected, found }),
    }
}

/// Reads a blob arm as bytes.
///
/// # Safety
///
/// `blob` must be null or point to an `FWP_BYTE_BLOB` whose `data` holds `size` bytes, valid for
/// `'v` (the filter engine guarantees this for the values it passes to `classifyFn`).
unsafe fn blob_bytes<'v>(blob: *const sys::FWP_BYTE_BLOB) -> Result<&'v [u8], FieldError> {
    // SAFETY: per the contract, null or a valid blob for 'v.
    let blob = unsafe { blob.as_ref() }.ok_or(FieldError::Null)?;
    if blob.size == 0 {
        return Ok(&[]);
    }
    if blob.data.is_null() {
        return Err(FieldError::Null);
    }
    // SAFETY: per the contract, `data` holds `size` bytes for 'v.
    Ok(unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) })
}

/// The marker types naming each representation.
pub mod repr {
    use super::*;

    macro_rules! markers {
        ($($(#[$doc:meta])* $name:ident;)*) => {$(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug)]
            pub struct $name;
            impl Repr for $name {
                const KIND: ValueKind = ValueKind::$name;
            }
        )*};
    }

    markers! {
        /// `FWP_UINT8`.
        U8;
        /// `FWP_UINT16`.
        U16;
        /// `FWP_UINT32`.
        U32;
        /// `FWP_UINT64`.
        U64;
        /// An IP address.
        Address;
        /// An application id.
        AppId;
        /// A byte blob.
        ByteBlob;
        /// A SID.
        Sid;
        /// A security descriptor.
        SecurityDescriptor;
        /// Token access information.
        TokenAccessInformation;
        /// Token information.
        TokenInformation;
        /// Condition flags.
        ConditionFlags;
        /// An IP protocol number.
        IpProtocol;
        /// A NUL-terminated UTF-16 string.
        UnicodeString;
        /// Sixteen bytes.
        ByteArray16;
        /// Six bytes: a MAC address.
        ByteArray6;
    }

    macro_rules! inline_arm {
        ($marker:ident, $out:ty, $tag:ident, $arm:ident) => {
            impl<'v, L: Layer> Decode<'v, L> for $marker {
                type Out = $out;
                fn decode(value: &'v sys::FWP_VALUE0) -> Result<$out, FieldError> {
                    check(value, sys::$tag)?;
                    // SAFETY: the tag says this arm is the active one; it is plain data.
                    Ok(unsafe { value.u.$arm })
                }
            }
        };
    }

    inline_arm!(U8, u8, FWP_UINT8, uint8);
    inline_arm!(U16, u16, FWP_UINT16, uint16);
    inline_arm!(U32, u32, FWP_UINT32, uint32);

    impl<'v, L: Layer> Decode<'v, L> for U64 {
        type Out = u64;
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<u64, FieldError> {
            check(value, sys::FWP_UINT64)?;
            // SAFETY: the tag says the `uint64` arm (a pointer) is active.
            let ptr = unsafe { value.u.uint64 };
            // SAFETY: the engine's pointer is null or valid for the classify call ('v).
            unsafe { ptr.as_ref() }.copied().ok_or(FieldError::Null)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for Address {
        type Out = L::Address;
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<L::Address, FieldError> {
            L::Address::decode(value)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for ByteArray16 {
        type Out = [u8; 16];
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<[u8; 16], FieldError> {
            check(value, sys::FWP_BYTE_ARRAY16_TYPE)?;
            // SAFETY: the tag says the `byteArray16` arm (a pointer) is active.
            let ptr = unsafe { value.u.byteArray16 };
            // SAFETY: null or valid for 'v, as the engine passes it.
            unsafe { ptr.as_ref() }
                .map(|a| a.byteArray16)
                .ok_or(FieldError::Null)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for ByteArray6 {
        type Out = [u8; 6];
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<[u8; 6], FieldError> {
            check(value, sys::FWP_BYTE_ARRAY6_TYPE)?;
            // SAFETY: the tag says the `byteArray6` arm (a pointer) is active.
            let ptr = unsafe { value.u.byteArray6 };
            // SAFETY: null or valid for 'v, as the engine passes it.
            unsafe { ptr.as_ref() }
                .map(|a| a.byteArray6)
                .ok_or(FieldError::Null)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for AppId {
        type Out = super::AppId<'v>;
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<super::AppId<'v>, FieldError> {
            check(value, sys::FWP_BYTE_BLOB_TYPE)?;
            // SAFETY: the tag says the `byteBlob` arm is active.
            let blob = unsafe { value.u.byteBlob };
            // SAFETY: the engine's blob is null or valid for 'v.
            let bytes = unsafe { blob_bytes(blob) }?;
            Ok(super::AppId::from_bytes(bytes))
        }
    }

    macro_rules! blob_arm {
        ($marker:ident, $tag:ident, $arm:ident) => {
            impl<'v, L: Layer> Decode<'v, L> for $marker {
                type Out = &'v [u8];
                fn decode(value: &'v sys::FWP_VALUE0) -> Result<&'v [u8], FieldError> {
                    check(value, sys::$tag)?;
                    // SAFETY: the tag says this blob arm is active.
                    let blob = unsafe { value.u.$arm };
                    // SAFETY: the engine's blob is null or valid for 'v.
                    unsafe { blob_bytes(blob) }
                }
            }
        };
    }

    blob_arm!(ByteBlob, FWP_BYTE_BLOB_TYPE, byteBlob);
    blob_arm!(SecurityDescriptor, FWP_SECURITY_DESCRIPTOR_TYPE, sd);
    blob_arm!(
        TokenAccessInformation,
        FWP_TOKEN_ACCESS_INFORMATION_TYPE,
        tokenAccessInformation
    );

    impl<'v, L: Layer> Decode<'v, L> for Sid {
        type Out = &'v [u8];
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<&'v [u8], FieldError> {
            check(value, sys::FWP_SID)?;
            // SAFETY: the tag says the `sid` arm is active.
            let sid = unsafe { value.u.sid };
            if sid.is_null() {
                return Err(FieldError::Null);
            }
            // A SID is 8 bytes of header then 4 bytes per sub-authority; the count is byte 1.
            // SAFETY: a non-null SID from the engine has at least its 8-byte header.
            let count_byte = unsafe { sid.cast::<u8>().add(1) };
            // SAFETY: byte 1 of the header is in bounds and initialised.
            let count = unsafe { *count_byte } as usize;
            // SAFETY: and `count` sub-authorities after it, valid for 'v.
            Ok(unsafe { core::slice::from_raw_parts(sid.cast::<u8>(), 8 + 4 * count) })
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for TokenInformation {
        type Out = &'v sys::FWP_TOKEN_INFORMATION;
        fn decode(
            value: &'v sys::FWP_VALUE0,
        ) -> Result<&'v sys::FWP_TOKEN_INFORMATION, FieldError> {
            check(value, sys::FWP_TOKEN_INFORMATION_TYPE)?;
            // SAFETY: the tag says the `tokenInformation` arm is active.
            let ptr = unsafe { value.u.tokenInformation };
            // SAFETY: null or valid for 'v.
            unsafe { ptr.as_ref() }.ok_or(FieldError::Null)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for ConditionFlags {
        type Out = super::ConditionFlags;
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<super::ConditionFlags, FieldError> {
            <U32 as Decode<'v, L>>::decode(value).map(super::ConditionFlags::from_bits_retain)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for IpProtocol {
        type Out = super::IpProtocol;
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<super::IpProtocol, FieldError> {
            <U8 as Decode<'v, L>>::decode(value).map(super::IpProtocol::from)
        }
    }

    impl<'v, L: Layer> Decode<'v, L> for UnicodeString {
        type Out = &'v [u16];
        fn decode(value: &'v sys::FWP_VALUE0) -> Result<&'v [u16], FieldError> {
            check(value, sys::FWP_UNICODE_STRING_TYPE)?;
            // SAFETY: the tag says the `unicodeString` arm is active.
            let text = unsafe { value.u.unicodeString };
            if text.is_null() {
                return Err(FieldError::Null);
            }
            let mut len = 0;
            loop {
                // `wrapping_add` is safe; the read below is what needs the string's validity.
                let unit = text.wrapping_add(len);
                // SAFETY: the engine passes a NUL-terminated string valid for 'v, and reading
                // stops at the terminator, so every unit read is in bounds.
                if unsafe { *unit } == 0 {
                    break;
                }
                len += 1;
            }
            // SAFETY: `len` code units before the terminator were just read.
            Ok(unsafe { core::slice::from_raw_parts(text, len) })
        }
    }
}

/// An address type that can be read from a layer's address fields.
pub trait AddressValue:
    Copy + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static
{
    /// Reads the value, checking its tag.
    fn decode(value: &sys::FWP_VALUE0) -> Result<Self, FieldError>;
}

impl AddressValue for Ipv4Addr {
    fn decode(value: &sys::FWP_VALUE0) -> Result<Ipv4Addr, FieldError> {
        check(value, sys::FWP_UINT32)?;
        // SAFETY: the tag says the `uint32` arm is active. WFP delivers IPv4 addresses as a
        // UINT32 in host byte order, so its numeric value is the address (a.b.c.d = a<<24|...).
        Ok(Ipv4Addr::from(unsafe { value.u.uint32 }))
    }
}

impl AddressValue for Ipv6Addr {
    fn decode(value: &sys::FWP_VALUE0) -> Result<Ipv6Addr, FieldError> {
        check(value, sys::FWP_BYTE_ARRAY16_TYPE)?;
        // SAFETY: the tag says the `byteArray16` arm (a pointer) is active.
        let ptr = unsafe { value.u.byteArray16 };
        // SAFETY: null or valid for the call; IPv6 addresses are in network byte order.
        unsafe { ptr.as_ref() }
            .map(|a| Ipv6Addr::from(a.byteArray16))
            .ok_or(FieldError::Null)
    }
}

/// The address type of a layer without an IP version (MAC frame, vSwitch Ethernet): it has no
/// values. No address field is implemented at such a layer, so a typed read never gets here; a
/// raw decode reports the field as [`FieldError::Empty`], which it is at a layer below IP.
///
/// It converts into [`IpAddr`](core::net::IpAddr) (vacuously), so driver code generic over every
/// layer with `L::Address: Into<IpAddr>` compiles for these layers too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoAddress {}

impl fmt::Display for NoAddress {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl AddressValue for NoAddress {
    fn decode(_value: &sys::FWP_VALUE0) -> Result<NoAddress, FieldError> {
        Err(FieldError::Empty)
    }
}

impl From<NoAddress> for core::net::IpAddr {
    fn from(never: NoAddress) -> core::net::IpAddr {
        match never {}
    }
}

/// An application id: the NT device path of the executable, as WFP delivers it (UTF-16,
/// NUL-terminated, usually lower case), e.g. `\device\harddiskvolume3\windows\system32\curl.exe`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AppId<'v> {
    bytes: &'v [u8],
}

impl<'v> AppId<'v> {
    /// Wraps the raw blob bytes.
    pub fn from_bytes(bytes: &'v [u8]) -> AppId<'v> {
        AppId { bytes }
    }

    /// The raw bytes, terminator included.
    pub fn as_bytes(&self) -> &'v [u8] {
        self.bytes
    }

    /// The UTF-16 code units without the terminator. Decoded on the fly, so no alignment of the
    /// blob is assumed.
    pub fn units(&self) -> impl Iterator<Item = u16> + 'v {
        self.bytes
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .take_while(|&unit| unit != 0)
    }

    /// Whether the path equals `path`, ignoring ASCII case (NT paths are case-insensitive).
    pub fn eq_ignore_ascii_case(&self, path: &str) -> bool {
        let mut ours = char::decode_utf16(self.units());
        let mut theirs = path.chars();
        loop {
            match (ours.next(), theirs.next()) {
                (None, None) => return true,
                (Some(Ok(a)), Some(b)) if a.eq_ignore_ascii_case(&b) => {}
                _ => return false,
            }
        }
    }
}

impl fmt::Display for AppId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in char::decode_utf16(self.units()) {
            fmt::Write::write_char(f, c.unwrap_or(char::REPLACEMENT_CHARACTER))?;
        }
        Ok(())
    }
}

impl fmt::Debug for AppId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppId(\"{self}\")")
    }
}

bitflags::bitflags! {
    /// Why a connection is being reauthorized: the `REAUTHORIZE_REASON` field at
    /// ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT (`FWP_CONDITION_REAUTHORIZE_REASON_*`). Read it
    /// with [`Classify::reauthorization_reason`](crate::callout::Classify::reauthorization_reason).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ReauthorizeReasons: u32 {
        /// The filtering policy changed (filters added or removed).
        const POLICY_CHANGE = sys::FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE;
        /// Traffic arrived on another interface.
        const NEW_ARRIVAL_INTERFACE = sys::FWP_CONDITION_REAUTHORIZE_REASON_NEW_ARRIVAL_INTERFACE;
        /// Traffic leaves through another next-hop interface.
        const NEW_NEXTHOP_INTERFACE = sys::FWP_CONDITION_REAUTHORIZE_REASON_NEW_NEXTHOP_INTERFACE;
        /// The network profile changed (for example from private to public).
        const PROFILE_CROSSING = sys::FWP_CONDITION_REAUTHORIZE_REASON_PROFILE_CROSSING;
        /// A pended classification was completed: the answer the callout recorded is due.
        const CLASSIFY_COMPLETION = sys::FWP_CONDITION_REAUTHORIZE_REASON_CLASSIFY_COMPLETION;
        /// The connection's IPsec properties changed.
        const IPSEC_PROPERTIES_CHANGED =
            sys::FWP_CONDITION_REAUTHORIZE_REASON_IPSEC_PROPERTIES_CHANGED;
        /// A callout asked for mid-stream inspection.
        const MID_STREAM_INSPECTION = sys::FWP_CONDITION_REAUTHORIZE_REASON_MID_STREAM_INSPECTION;
        /// A socket property changed.
        const SOCKET_PROPERTY_CHANGED =
            sys::FWP_CONDITION_REAUTHORIZE_REASON_SOCKET_PROPERTY_CHANGED;
        /// A new inbound multicast or broadcast packet.
        const NEW_INBOUND_MCAST_BCAST_PACKET =
            sys::FWP_CONDITION_REAUTHORIZE_REASON_NEW_INBOUND_MCAST_BCAST_PACKET;
        /// The enterprise data protection policy changed.
        const EDP_POLICY_CHANGED = sys::FWP_CONDITION_REAUTHORIZE_REASON_EDP_POLICY_CHANGED;
        /// The proxy handle changed.
        const PROXY_HANDLE_CHANGED = sys::FWP_CONDITION_REAUTHORIZE_REASON_PROXY_HANDLE_CHANGED;
        /// Offload is being checked.
        const CHECK_OFFLOAD = sys::FWP_CONDITION_REAUTHORIZE_REASON_CHECK_OFFLOAD;
    }
}

bitflags::bitflags! {
    /// The `FLAGS` field (`FWP_CONDITION_FLAG_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ConditionFlags: u32 {
        /// `FWP_CONDITION_FLAG_IS_LOOPBACK`.
        const IS_LOOPBACK = sys::FWP_CONDITION_FLAG_IS_LOOPBACK;
        /// `FWP_CONDITION_FLAG_IS_IPSEC_SECURED`.
        const IS_IPSEC_SECURED = sys::FWP_CONDITION_FLAG_IS_IPSEC_SECURED;
        /// `FWP_CONDITION_FLAG_IS_REAUTHORIZE`: this classification re-authorizes a connection
        /// (after a pended classification was completed, or after a policy change).
        const IS_REAUTHORIZE = sys::FWP_CONDITION_FLAG_IS_REAUTHORIZE;
        /// `FWP_CONDITION_FLAG_IS_WILDCARD_BIND`.
        const IS_WILDCARD_BIND = sys::FWP_CONDITION_FLAG_IS_WILDCARD_BIND;
        /// `FWP_CONDITION_FLAG_IS_RAW_ENDPOINT`.
        const IS_RAW_ENDPOINT = sys::FWP_CONDITION_FLAG_IS_RAW_ENDPOINT;
        /// `FWP_CONDITION_FLAG_IS_FRAGMENT`.
        const IS_FRAGMENT = sys::FWP_CONDITION_FLAG_IS_FRAGMENT;
        /// `FWP_CONDITION_FLAG_IS_OUTBOUND_PASS_THRU`.
        const IS_OUTBOUND_PASS_THRU = sys::FWP_CONDITION_FLAG_IS_OUTBOUND_PASS_THRU;
        /// `FWP_CONDITION_FLAG_IS_INBOUND_PASS_THRU`.
        const IS_INBOUND_PASS_THRU = sys::FWP_CONDITION_FLAG_IS_INBOUND_PASS_THRU;
        /// `FWP_CONDITION_FLAG_IS_CONNECTION_REDIRECTED`.
        const IS_CONNECTION_REDIRECTED = sys::FWP_CONDITION_FLAG_IS_CONNECTION_REDIRECTED;
        /// `FWP_CONDITION_FLAG_IS_PROXY_CONNECTION`.
        const IS_PROXY_CONNECTION = sys::FWP_CONDITION_FLAG_IS_PROXY_CONNECTION;
        /// `FWP_CONDITION_FLAG_IS_NON_APPCONTAINER_LOOPBACK`.
        const IS_NON_APPCONTAINER_LOOPBACK = sys::FWP_CONDITION_FLAG_IS_NON_APPCONTAINER_LOOPBACK;
    }
}

/// An IP protocol number (the `IP_PROTOCOL` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// ICMP (1).
    Icmp,
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMPv6 (58).
    IcmpV6,
    /// Any other protocol number.
    Other(u8),
}

impl From<u8> for IpProtocol {
    fn from(number: u8) -> IpProtocol {
        match number {
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            58 => IpProtocol::IcmpV6,
            other => IpProtocol::Other(other),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(protocol: IpProtocol) -> u8 {
        match protocol {
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::IcmpV6 => 58,
            IpProtocol::Other(other) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::repr;
    use super::*;
    use crate::layer::{InboundMacFrameEthernet, InboundTransportV4};

    fn value(r#type: sys::FWP_DATA_TYPE, u: sys::FWP_VALUE0_u) -> sys::FWP_VALUE0 {
        sys::FWP_VALUE0 { r#type, u }
    }

    #[test]
    fn a_mac_address_reads_as_six_bytes_after_its_tag_is_checked() {
        let mut mac = sys::FWP_BYTE_ARRAY6 {
            byteArray6: [0x00, 0x15, 0x5d, 0x01, 0x02, 0x03],
        };
        let raw = value(
            sys::FWP_BYTE_ARRAY6_TYPE,
            sys::FWP_VALUE0_u {
                byteArray6: &raw mut mac,
            },
        );
        let read = <repr::ByteArray6 as Decode<'_, InboundMacFrameEthernet>>::decode(&raw);
        assert_eq!(read, Ok([0x00, 0x15, 0x5d, 0x01, 0x02, 0x03]));

        let wrong = value(sys::FWP_UINT16, sys::FWP_VALUE0_u { uint16: 6 });
        assert_eq!(
            <repr::ByteArray6 as Decode<'_, InboundMacFrameEthernet>>::decode(&wrong),
            Err(FieldError::WrongType {
                expected: sys::FWP_BYTE_ARRAY6_TYPE,
                found: sys::FWP_UINT16
            })
        );
        let null = value(
            sys::FWP_BYTE_ARRAY6_TYPE,
            sys::FWP_VALUE0_u {
                byteArray6: core::ptr::null_mut(),
            },
        );
        assert_eq!(
            <repr::ByteArray6 as Decode<'_, InboundMacFrameEthernet>>::decode(&null),
            Err(FieldError::Null)
        );
    }

    #[test]
    fn a_layer_without_an_ip_version_has_no_address_value() {
        // Even a well-formed IPv4 value is not an address at a frame layer.
        let v4 = value(
            sys::FWP_UINT32,
            sys::FWP_VALUE0_u {
                uint32: 0x0A00_0001,
            },
        );
        assert_eq!(
            <repr::Address as Decode<'_, InboundMacFrameEthernet>>::decode(&v4),
            Err(FieldError::Empty)
        );
        assert_eq!(
            <repr::Address as Decode<'_, InboundTransportV4>>::decode(&v4),
            Ok(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(ValueKind::Address.data_type(None), sys::FWP_EMPTY);
        assert_eq!(
            ValueKind::Address.data_type(Some(IpVersion::V6)),
            sys::FWP_BYTE_ARRAY16_TYPE
        );
        assert_eq!(
            ValueKind::ByteArray6.data_type(None),
            sys::FWP_BYTE_ARRAY6_TYPE
        );
    }
}
