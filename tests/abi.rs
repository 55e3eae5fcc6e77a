//! The hand-written WFP ABI in `wfp_rs::sys` checked against an independent transcription: the
//! `windows-sys` crate, generated from Microsoft's Win32 metadata.
//!
//! Only user-visible types exist in `windows-sys` (the `FWP_*`/`FWPM_*` types, the socket
//! address types, and the `FWPS_*` flag constants); the kernel-only `FWPS_*` structures are
//! pinned by the static assertions in `wfp-rs/src/sys/fwp.rs`. These are pure layout and value
//! checks, so they run on every host and with either backend.
//!
//! Each test collects every difference it finds and fails once, listing all of them.

use core::mem::{align_of, offset_of, size_of};

use wfp_rs::sys as ours;
use windows_sys::Win32::NetworkManagement::IpHelper as iphlp;
use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform as wfp;
use windows_sys::Win32::Networking::WinSock as ws;
use windows_sys::Win32::Security as sec;

/// The size of the type a field projection returns, without needing a value.
fn field_size<T, F>(_: impl Fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Compares the offset and size of one field; `ours_field` and `theirs_field` differ only where
/// the crates name an anonymous union differently (`u` here, `Anonymous` in windows-sys).
macro_rules! check_field {
    ($diffs:ident, $ours:ty, $theirs:ty, $of:ident) => {
        check_field!($diffs, $ours, $theirs, $of, $of)
    };
    ($diffs:ident, $ours:ty, $theirs:ty, $of:ident, $tf:ident) => {{
        let (o, t) = (offset_of!($ours, $of), offset_of!($theirs, $tf));
        if o != t {
            $diffs.push(format!(
                "{}.{}: offset {o} here, {t} in windows-sys ({}.{})",
                stringify!($ours),
                stringify!($of),
                stringify!($theirs),
                stringify!($tf),
            ));
        }
        let (o, t) = (
            field_size(|s: &$ours| &s.$of),
            field_size(|s: &$theirs| &s.$tf),
        );
        if o != t {
            $diffs.push(format!(
                "{}.{}: {o} bytes here, {t} in windows-sys ({}.{})",
                stringify!($ours),
                stringify!($of),
                stringify!($theirs),
                stringify!($tf),
            ));
        }
    }};
}

/// Compares size and alignment of two types, then the listed fields (`field` when both crates
/// use the same name, `ours => theirs` otherwise).
macro_rules! check_layout {
    ($diffs:ident, $ours:ty, $theirs:ty $(, $of:ident $(=> $tf:ident)?)* $(,)?) => {{
        let (o, t) = (size_of::<$ours>(), size_of::<$theirs>());
        if o != t {
            $diffs.push(format!(
                "size_of::<{}>() is {o}, windows-sys {} is {t}",
                stringify!($ours),
                stringify!($theirs),
            ));
        }
        let (o, t) = (align_of::<$ours>(), align_of::<$theirs>());
        if o != t {
            $diffs.push(format!(
                "align_of::<{}>() is {o}, windows-sys {} is {t}",
                stringify!($ours),
                stringify!($theirs),
            ));
        }
        $(check_field!($diffs, $ours, $theirs, $of $(, $tf)?);)*
    }};
}

/// Compares constants of the same name (values widened to i64: the crates sometimes pick
/// different integer types for the same C `#define`).
macro_rules! check_consts {
    ($diffs:ident, $theirs:ident: $($name:ident),* $(,)?) => {
        $(
            let (o, t) = (ours::$name as i64, $theirs::$name as i64);
            if o != t {
                $diffs.push(format!(
                    "{}: {o:#x} here, {t:#x} in windows-sys",
                    stringify!($name),
                ));
            }
        )*
    };
}

fn assert_no_diffs(what: &str, diffs: &[String]) {
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s) from windows-sys:\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );
}

#[test]
fn value_types_match_windows_sys() {
    let mut d = Vec::new();
    check_layout!(
        d,
        ours::GUID,
        windows_sys::core::GUID,
        Data1 => data1,
        Data2 => data2,
        Data3 => data3,
        Data4 => data4,
    );
    check_layout!(
        d,
        ours::SID_AND_ATTRIBUTES,
        sec::SID_AND_ATTRIBUTES,
        Sid,
        Attributes
    );
    check_layout!(d, ours::FWP_BYTE_ARRAY6, wfp::FWP_BYTE_ARRAY6, byteArray6);
    check_layout!(
        d,
        ours::FWP_BYTE_ARRAY16,
        wfp::FWP_BYTE_ARRAY16,
        byteArray16
    );
    check_layout!(d, ours::FWP_BYTE_BLOB, wfp::FWP_BYTE_BLOB, size, data);
    check_layout!(
        d,
        ours::FWP_TOKEN_INFORMATION,
        wfp::FWP_TOKEN_INFORMATION,
        sidCount,
        sids,
        restrictedSidCount,
        restrictedSids,
    );
    check_layout!(d, ours::FWP_VALUE0_u, wfp::FWP_VALUE0_0);
    check_layout!(d, ours::FWP_VALUE0, wfp::FWP_VALUE0, r#type, u => Anonymous);
    check_layout!(
        d,
        ours::FWP_V4_ADDR_AND_MASK,
        wfp::FWP_V4_ADDR_AND_MASK,
        addr,
        mask
    );
    check_layout!(
        d,
        ours::FWP_V6_ADDR_AND_MASK,
        wfp::FWP_V6_ADDR_AND_MASK,
        addr,
        prefixLength,
    );
    check_layout!(d, ours::FWP_RANGE0, wfp::FWP_RANGE0, valueLow, valueHigh);
    check_layout!(d, ours::FWP_CONDITION_VALUE0_u, wfp::FWP_CONDITION_VALUE0_0);
    check_layout!(
        d,
        ours::FWP_CONDITION_VALUE0,
        wfp::FWP_CONDITION_VALUE0,
        r#type,
        u => Anonymous,
    );
    check_layout!(
        d,
        ours::FWPM_DISPLAY_DATA0,
        wfp::FWPM_DISPLAY_DATA0,
        name,
        description
    );
    assert_no_diffs("FWP value types", &d);
}

#[test]
fn management_types_match_windows_sys() {
    let mut d = Vec::new();
    check_layout!(
        d,
        ours::FWPM_SESSION0,
        wfp::FWPM_SESSION0,
        sessionKey,
        displayData,
        flags,
        txnWaitTimeoutInMSec,
        processId,
        sid,
        username,
        kernelMode,
    );
    check_layout!(
        d,
        ours::FWPM_PROVIDER0,
        wfp::FWPM_PROVIDER0,
        providerKey,
        displayData,
        flags,
        providerData,
        serviceName,
    );
    check_layout!(
        d,
        ours::FWPM_SUBLAYER0,
        wfp::FWPM_SUBLAYER0,
        subLayerKey,
        displayData,
        flags,
        providerKey,
        providerData,
        weight,
    );
    check_layout!(
        d,
        ours::FWPM_CALLOUT0,
        wfp::FWPM_CALLOUT0,
        calloutKey,
        displayData,
        flags,
        providerKey,
        providerData,
        applicableLayer,
        calloutId,
    );
    check_layout!(d, ours::FWPM_ACTION0_u, wfp::FWPM_ACTION0_0);
    check_layout!(d, ours::FWPM_ACTION0, wfp::FWPM_ACTION0, r#type, u => Anonymous);
    check_layout!(
        d,
        ours::FWPM_FILTER_CONDITION0,
        wfp::FWPM_FILTER_CONDITION0,
        fieldKey,
        matchType,
        conditionValue,
    );
    check_layout!(d, ours::FWPM_FILTER0_u, wfp::FWPM_FILTER0_0);
    check_layout!(
        d,
        ours::FWPM_FILTER0,
        wfp::FWPM_FILTER0,
        filterKey,
        displayData,
        flags,
        providerKey,
        providerData,
        layerKey,
        subLayerKey,
        weight,
        numFilterConditions,
        filterCondition,
        action,
        u => Anonymous,
        reserved,
        filterId,
        effectiveWeight,
    );
    assert_no_diffs("FWPM management types", &d);
}

#[test]
fn socket_address_types_match_windows_sys() {
    let mut d = Vec::new();
    check_layout!(d, ours::SCOPE_ID, ws::SCOPE_ID);
    check_layout!(d, ours::IN_ADDR, ws::IN_ADDR, S_un);
    check_layout!(d, ours::IN6_ADDR, ws::IN6_ADDR, u);
    check_layout!(d, ours::SOCKADDR, ws::SOCKADDR, sa_family, sa_data);
    check_layout!(
        d,
        ours::SOCKADDR_IN,
        ws::SOCKADDR_IN,
        sin_family,
        sin_port,
        sin_addr,
        sin_zero,
    );
    check_layout!(
        d,
        ours::SOCKADDR_IN6,
        ws::SOCKADDR_IN6,
        sin6_family,
        sin6_port,
        sin6_flowinfo,
        sin6_addr,
        u => Anonymous,
    );
    check_layout!(d, ours::SOCKADDR_INET, ws::SOCKADDR_INET);
    check_layout!(
        d,
        ours::SOCKADDR_STORAGE,
        ws::SOCKADDR_STORAGE,
        ss_family,
        __ss_pad1,
        __ss_align,
        __ss_pad2,
    );
    check_layout!(
        d,
        ours::IP_ADDRESS_PREFIX,
        iphlp::IP_ADDRESS_PREFIX,
        Prefix,
        PrefixLength,
    );
    // windows-sys names `_WSACMSGHDR` by its POSIX alias.
    check_layout!(
        d,
        ours::WSACMSGHDR,
        ws::CMSGHDR,
        cmsg_len,
        cmsg_level,
        cmsg_type,
    );
    assert_no_diffs("socket address types", &d);
}

#[test]
fn enum_values_match_windows_sys() {
    let mut d = Vec::new();
    check_consts!(d, wfp:
        FWP_DIRECTION_OUTBOUND, FWP_DIRECTION_INBOUND, FWP_DIRECTION_MAX,
        FWP_IP_VERSION_V4, FWP_IP_VERSION_V6, FWP_IP_VERSION_NONE, FWP_IP_VERSION_MAX,
        FWP_EMPTY, FWP_UINT8, FWP_UINT16, FWP_UINT32, FWP_UINT64, FWP_INT8, FWP_INT16,
        FWP_INT32, FWP_INT64, FWP_FLOAT, FWP_DOUBLE, FWP_BYTE_ARRAY16_TYPE, FWP_BYTE_BLOB_TYPE,
        FWP_SID, FWP_SECURITY_DESCRIPTOR_TYPE, FWP_TOKEN_INFORMATION_TYPE,
        FWP_TOKEN_ACCESS_INFORMATION_TYPE, FWP_UNICODE_STRING_TYPE, FWP_BYTE_ARRAY6_TYPE,
        FWP_SINGLE_DATA_TYPE_MAX, FWP_V4_ADDR_MASK, FWP_V6_ADDR_MASK, FWP_RANGE_TYPE,
        FWP_DATA_TYPE_MAX,
        FWP_MATCH_EQUAL, FWP_MATCH_GREATER, FWP_MATCH_LESS, FWP_MATCH_GREATER_OR_EQUAL,
        FWP_MATCH_LESS_OR_EQUAL, FWP_MATCH_RANGE, FWP_MATCH_FLAGS_ALL_SET,
        FWP_MATCH_FLAGS_ANY_SET, FWP_MATCH_FLAGS_NONE_SET, FWP_MATCH_EQUAL_CASE_INSENSITIVE,
        FWP_MATCH_NOT_EQUAL, FWP_MATCH_PREFIX, FWP_MATCH_NOT_PREFIX, FWP_MATCH_TYPE_MAX,
    );
    assert_no_diffs("FWP enumerations", &d);
}

#[test]
fn action_and_classify_constants_match_windows_sys() {
    let mut d = Vec::new();
    check_consts!(d, wfp:
        FWP_ACTION_FLAG_TERMINATING, FWP_ACTION_FLAG_NON_TERMINATING, FWP_ACTION_FLAG_CALLOUT,
        FWP_ACTION_BLOCK, FWP_ACTION_PERMIT, FWP_ACTION_CALLOUT_TERMINATING,
        FWP_ACTION_CALLOUT_INSPECTION, FWP_ACTION_CALLOUT_UNKNOWN, FWP_ACTION_CONTINUE,
        FWP_ACTION_NONE, FWP_ACTION_NONE_NO_MATCH,
        FWPS_RIGHT_ACTION_WRITE,
        FWPS_CLASSIFY_OUT_FLAG_ABSORB, FWPS_CLASSIFY_OUT_FLAG_BUFFER_LIMIT_REACHED,
        FWPS_CLASSIFY_OUT_FLAG_NO_MORE_DATA, FWPS_CLASSIFY_OUT_FLAG_ALE_FAST_CACHE_CHECK,
        FWPS_CLASSIFY_OUT_FLAG_ALE_FAST_CACHE_POSSIBLE,
        FWPS_INCOMING_FLAG_CACHE_SAFE, FWPS_INCOMING_FLAG_ENFORCE_QUERY,
        FWPS_INCOMING_FLAG_ABSORB, FWPS_INCOMING_FLAG_CONNECTION_FAILING_INDICATION,
        FWPS_INCOMING_FLAG_MID_STREAM_INSPECTION, FWPS_INCOMING_FLAG_RECLASSIFY,
        FWPS_INCOMING_FLAG_IS_LOOSE_SOURCE_FLOW, FWPS_INCOMING_FLAG_IS_LOCAL_ONLY_FLOW,
        FWPS_INCOMING_FLAG_RESERVED0,
        FWPS_FILTER_FLAG_CLEAR_ACTION_RIGHT, FWPS_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED,
        FWPS_FILTER_FLAG_OR_CONDITIONS, FWPS_FILTER_FLAG_HAS_SECURITY_REALM_PROVIDER_CONTEXT,
        FWPS_FILTER_FLAG_SILENT_MODE, FWPS_FILTER_FLAG_IPSEC_NO_ACQUIRE_INITIATE,
        FWPS_FILTER_FLAG_RESERVED0, FWPS_FILTER_FLAG_RESERVED1,
        FWP_CALLOUT_FLAG_CONDITIONAL_ON_FLOW, FWP_CALLOUT_FLAG_ALLOW_OFFLOAD,
        FWP_CALLOUT_FLAG_ENABLE_COMMIT_ADD_NOTIFY, FWP_CALLOUT_FLAG_ALLOW_MID_STREAM_INSPECTION,
        FWP_CALLOUT_FLAG_ALLOW_RECLASSIFY, FWP_CALLOUT_FLAG_RESERVED1, FWP_CALLOUT_FLAG_ALLOW_RSC,
        FWP_CALLOUT_FLAG_ALLOW_L2_BATCH_CLASSIFY, FWP_CALLOUT_FLAG_ALLOW_USO,
        FWP_CALLOUT_FLAG_ALLOW_URO, FWP_CALLOUT_FLAG_RESERVED2,
    );
    assert_no_diffs("action, right and classify constants", &d);
}

#[test]
fn condition_flags_match_windows_sys() {
    let mut d = Vec::new();
    check_consts!(d, wfp:
        FWP_CONDITION_FLAG_IS_LOOPBACK, FWP_CONDITION_FLAG_IS_IPSEC_SECURED,
        FWP_CONDITION_FLAG_IS_REAUTHORIZE, FWP_CONDITION_FLAG_IS_WILDCARD_BIND,
        FWP_CONDITION_FLAG_IS_RAW_ENDPOINT, FWP_CONDITION_FLAG_IS_FRAGMENT,
        FWP_CONDITION_FLAG_IS_FRAGMENT_GROUP, FWP_CONDITION_FLAG_IS_IPSEC_NATT_RECLASSIFY,
        FWP_CONDITION_FLAG_REQUIRES_ALE_CLASSIFY, FWP_CONDITION_FLAG_IS_IMPLICIT_BIND,
        FWP_CONDITION_FLAG_IS_REASSEMBLED, FWP_CONDITION_FLAG_IS_NAME_APP_SPECIFIED,
        FWP_CONDITION_FLAG_IS_PROMISCUOUS, FWP_CONDITION_FLAG_IS_AUTH_FW,
        FWP_CONDITION_FLAG_IS_RECLASSIFY, FWP_CONDITION_FLAG_IS_OUTBOUND_PASS_THRU,
        FWP_CONDITION_FLAG_IS_INBOUND_PASS_THRU, FWP_CONDITION_FLAG_IS_CONNECTION_REDIRECTED,
        FWP_CONDITION_FLAG_IS_PROXY_CONNECTION, FWP_CONDITION_FLAG_IS_APPCONTAINER_LOOPBACK,
        FWP_CONDITION_FLAG_IS_NON_APPCONTAINER_LOOPBACK, FWP_CONDITION_FLAG_IS_RESERVED,
        FWP_CONDITION_FLAG_IS_HONORING_POLICY_AUTHORIZE,
        FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE,
        FWP_CONDITION_REAUTHORIZE_REASON_NEW_ARRIVAL_INTERFACE,
        FWP_CONDITION_REAUTHORIZE_REASON_NEW_NEXTHOP_INTERFACE,
        FWP_CONDITION_REAUTHORIZE_REASON_PROFILE_CROSSING,
        FWP_CONDITION_REAUTHORIZE_REASON_CLASSIFY_COMPLETION,
        FWP_CONDITION_REAUTHORIZE_REASON_IPSEC_PROPERTIES_CHANGED,
        FWP_CONDITION_REAUTHORIZE_REASON_MID_STREAM_INSPECTION,
        FWP_CONDITION_REAUTHORIZE_REASON_SOCKET_PROPERTY_CHANGED,
        FWP_CONDITION_REAUTHORIZE_REASON_NEW_INBOUND_MCAST_BCAST_PACKET,
        FWP_CONDITION_REAUTHORIZE_REASON_EDP_POLICY_CHANGED,
        FWP_CONDITION_REAUTHORIZE_REASON_PROXY_HANDLE_CHANGED,
        FWP_CONDITION_REAUTHORIZE_REASON_CHECK_OFFLOAD,
    );
    assert_no_diffs("condition flags", &d);
}

#[test]
fn metadata_field_bits_match_windows_sys() {
    let mut d = Vec::new();
    check_consts!(d, wfp:
        FWPS_METADATA_FIELD_DISCARD_REASON, FWPS_METADATA_FIELD_FLOW_HANDLE,
        FWPS_METADATA_FIELD_IP_HEADER_SIZE, FWPS_METADATA_FIELD_PROCESS_PATH,
        FWPS_METADATA_FIELD_TOKEN, FWPS_METADATA_FIELD_PROCESS_ID,
        FWPS_METADATA_FIELD_SYSTEM_FLAGS, FWPS_METADATA_FIELD_RESERVED,
        FWPS_METADATA_FIELD_SOURCE_INTERFACE_INDEX,
        FWPS_METADATA_FIELD_DESTINATION_INTERFACE_INDEX,
        FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE, FWPS_METADATA_FIELD_COMPARTMENT_ID,
        FWPS_METADATA_FIELD_FRAGMENT_DATA, FWPS_METADATA_FIELD_PATH_MTU,
        FWPS_METADATA_FIELD_COMPLETION_HANDLE, FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE,
        FWPS_METADATA_FIELD_TRANSPORT_CONTROL_DATA, FWPS_METADATA_FIELD_REMOTE_SCOPE_ID,
        FWPS_METADATA_FIELD_PACKET_DIRECTION, FWPS_METADATA_FIELD_PACKET_SYSTEM_CRITICAL,
        FWPS_METADATA_FIELD_FORWARD_LAYER_OUTBOUND_PASS_THRU,
        FWPS_METADATA_FIELD_FORWARD_LAYER_INBOUND_PASS_THRU,
        FWPS_METADATA_FIELD_ALE_CLASSIFY_REQUIRED,
        FWPS_METADATA_FIELD_TRANSPORT_HEADER_INCLUDE_HEADER,
        FWPS_METADATA_FIELD_DESTINATION_PREFIX, FWPS_METADATA_FIELD_ETHER_FRAME_LENGTH,
        FWPS_METADATA_FIELD_PARENT_ENDPOINT_HANDLE, FWPS_METADATA_FIELD_ICMP_ID_AND_SEQUENCE,
        FWPS_METADATA_FIELD_LOCAL_REDIRECT_TARGET_PID, FWPS_METADATA_FIELD_ORIGINAL_DESTINATION,
        FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE, FWPS_METADATA_FIELD_SUB_PROCESS_TAG,
        FWPS_L2_METADATA_FIELD_ETHERNET_MAC_HEADER_SIZE,
        FWPS_L2_METADATA_FIELD_WIFI_OPERATION_MODE,
        FWPS_L2_METADATA_FIELD_VSWITCH_SOURCE_PORT_ID,
        FWPS_L2_METADATA_FIELD_VSWITCH_SOURCE_NIC_INDEX,
        FWPS_L2_METADATA_FIELD_VSWITCH_PACKET_CONTEXT,
        FWPS_L2_METADATA_FIELD_VSWITCH_DESTINATION_PORT_ID, FWPS_L2_METADATA_FIELD_RESERVED,
    );
    assert_no_diffs("FWPS_METADATA_FIELD_* bits", &d);
}

#[test]
fn management_flags_match_windows_sys() {
    let mut d = Vec::new();
    check_consts!(d, wfp:
        FWPM_SESSION_FLAG_DYNAMIC, FWPM_SESSION_FLAG_RESERVED,
        FWPM_PROVIDER_FLAG_PERSISTENT, FWPM_PROVIDER_FLAG_DISABLED,
        FWPM_SUBLAYER_FLAG_PERSISTENT,
        FWPM_CALLOUT_FLAG_PERSISTENT, FWPM_CALLOUT_FLAG_USES_PROVIDER_CONTEXT,
        FWPM_CALLOUT_FLAG_REGISTERED,
        FWPM_FILTER_FLAG_NONE, FWPM_FILTER_FLAG_PERSISTENT, FWPM_FILTER_FLAG_BOOTTIME,
        FWPM_FILTER_FLAG_HAS_PROVIDER_CONTEXT, FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT,
        FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED, FWPM_FILTER_FLAG_DISABLED,
        FWPM_FILTER_FLAG_INDEXED, FWPM_FILTER_FLAG_HAS_SECURITY_REALM_PROVIDER_CONTEXT,
        FWPM_FILTER_FLAG_SYSTEMOS_ONLY, FWPM_FILTER_FLAG_GAMEOS_ONLY,
        FWPM_FILTER_FLAG_SILENT_MODE, FWPM_FILTER_FLAG_IPSEC_NO_ACQUIRE_INITIATE,
        FWPM_FILTER_FLAG_RESERVED0, FWPM_FILTER_FLAG_RESERVED1,
    );
    assert_no_diffs("FWPM_*_FLAG_* constants", &d);
}

/// Compares a `GUID` from `windows-sys` with ours.
fn same_guid(theirs: windows_sys::core::GUID, ours: wfp_rs::Guid) -> bool {
    let o = ours.raw();
    theirs.data1 == o.Data1
        && theirs.data2 == o.Data2
        && theirs.data3 == o.Data3
        && theirs.data4 == o.Data4
}

macro_rules! guid_table {
    ($trait_:ident :: $const_:ident; $($ours:path => $theirs:ident,)*) => {{
        let mut diffs = Vec::new();
        $(
            let key = <$ours as wfp_rs::layer::$trait_>::$const_;
            if !same_guid(wfp::$theirs, key) {
                diffs.push(format!("{}: ours {key}, windows-sys differs", stringify!($theirs)));
            }
        )*
        diffs
    }};
}

#[test]
fn layer_keys_match_windows_sys() {
    use wfp_rs::layer as l;
    let diffs = guid_table!(Layer::KEY;
        l::InboundIpPacketV4 => FWPM_LAYER_INBOUND_IPPACKET_V4,
        l::InboundIpPacketV4Discard => FWPM_LAYER_INBOUND_IPPACKET_V4_DISCARD,
        l::InboundIpPacketV6 => FWPM_LAYER_INBOUND_IPPACKET_V6,
        l::InboundIpPacketV6Discard => FWPM_LAYER_INBOUND_IPPACKET_V6_DISCARD,
        l::OutboundIpPacketV4 => FWPM_LAYER_OUTBOUND_IPPACKET_V4,
        l::OutboundIpPacketV4Discard => FWPM_LAYER_OUTBOUND_IPPACKET_V4_DISCARD,
        l::OutboundIpPacketV6 => FWPM_LAYER_OUTBOUND_IPPACKET_V6,
        l::OutboundIpPacketV6Discard => FWPM_LAYER_OUTBOUND_IPPACKET_V6_DISCARD,
        l::IpForwardV4 => FWPM_LAYER_IPFORWARD_V4,
        l::IpForwardV4Discard => FWPM_LAYER_IPFORWARD_V4_DISCARD,
        l::IpForwardV6 => FWPM_LAYER_IPFORWARD_V6,
        l::IpForwardV6Discard => FWPM_LAYER_IPFORWARD_V6_DISCARD,
        l::InboundTransportV4 => FWPM_LAYER_INBOUND_TRANSPORT_V4,
        l::InboundTransportV4Discard => FWPM_LAYER_INBOUND_TRANSPORT_V4_DISCARD,
        l::InboundTransportV6 => FWPM_LAYER_INBOUND_TRANSPORT_V6,
        l::InboundTransportV6Discard => FWPM_LAYER_INBOUND_TRANSPORT_V6_DISCARD,
        l::OutboundTransportV4 => FWPM_LAYER_OUTBOUND_TRANSPORT_V4,
        l::OutboundTransportV4Discard => FWPM_LAYER_OUTBOUND_TRANSPORT_V4_DISCARD,
        l::OutboundTransportV6 => FWPM_LAYER_OUTBOUND_TRANSPORT_V6,
        l::OutboundTransportV6Discard => FWPM_LAYER_OUTBOUND_TRANSPORT_V6_DISCARD,
        l::StreamV4 => FWPM_LAYER_STREAM_V4,
        l::StreamV4Discard => FWPM_LAYER_STREAM_V4_DISCARD,
        l::StreamV6 => FWPM_LAYER_STREAM_V6,
        l::StreamV6Discard => FWPM_LAYER_STREAM_V6_DISCARD,
        l::DatagramDataV4 => FWPM_LAYER_DATAGRAM_DATA_V4,
        l::DatagramDataV4Discard => FWPM_LAYER_DATAGRAM_DATA_V4_DISCARD,
        l::DatagramDataV6 => FWPM_LAYER_DATAGRAM_DATA_V6,
        l::DatagramDataV6Discard => FWPM_LAYER_DATAGRAM_DATA_V6_DISCARD,
        l::InboundIcmpErrorV4 => FWPM_LAYER_INBOUND_ICMP_ERROR_V4,
        l::InboundIcmpErrorV4Discard => FWPM_LAYER_INBOUND_ICMP_ERROR_V4_DISCARD,
        l::InboundIcmpErrorV6 => FWPM_LAYER_INBOUND_ICMP_ERROR_V6,
        l::InboundIcmpErrorV6Discard => FWPM_LAYER_INBOUND_ICMP_ERROR_V6_DISCARD,
        l::OutboundIcmpErrorV4 => FWPM_LAYER_OUTBOUND_ICMP_ERROR_V4,
        l::OutboundIcmpErrorV4Discard => FWPM_LAYER_OUTBOUND_ICMP_ERROR_V4_DISCARD,
        l::OutboundIcmpErrorV6 => FWPM_LAYER_OUTBOUND_ICMP_ERROR_V6,
        l::OutboundIcmpErrorV6Discard => FWPM_LAYER_OUTBOUND_ICMP_ERROR_V6_DISCARD,
        l::AleResourceAssignmentV4 => FWPM_LAYER_ALE_RESOURCE_ASSIGNMENT_V4,
        l::AleResourceAssignmentV4Discard => FWPM_LAYER_ALE_RESOURCE_ASSIGNMENT_V4_DISCARD,
        l::AleResourceAssignmentV6 => FWPM_LAYER_ALE_RESOURCE_ASSIGNMENT_V6,
        l::AleResourceAssignmentV6Discard => FWPM_LAYER_ALE_RESOURCE_ASSIGNMENT_V6_DISCARD,
        l::AleAuthListenV4 => FWPM_LAYER_ALE_AUTH_LISTEN_V4,
        l::AleAuthListenV4Discard => FWPM_LAYER_ALE_AUTH_LISTEN_V4_DISCARD,
        l::AleAuthListenV6 => FWPM_LAYER_ALE_AUTH_LISTEN_V6,
        l::AleAuthListenV6Discard => FWPM_LAYER_ALE_AUTH_LISTEN_V6_DISCARD,
        l::AleAuthRecvAcceptV4 => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
        l::AleAuthRecvAcceptV4Discard => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4_DISCARD,
        l::AleAuthRecvAcceptV6 => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
        l::AleAuthRecvAcceptV6Discard => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6_DISCARD,
        l::AleAuthConnectV4 => FWPM_LAYER_ALE_AUTH_CONNECT_V4,
        l::AleAuthConnectV4Discard => FWPM_LAYER_ALE_AUTH_CONNECT_V4_DISCARD,
        l::AleAuthConnectV6 => FWPM_LAYER_ALE_AUTH_CONNECT_V6,
        l::AleAuthConnectV6Discard => FWPM_LAYER_ALE_AUTH_CONNECT_V6_DISCARD,
        l::AleFlowEstablishedV4 => FWPM_LAYER_ALE_FLOW_ESTABLISHED_V4,
        l::AleFlowEstablishedV4Discard => FWPM_LAYER_ALE_FLOW_ESTABLISHED_V4_DISCARD,
        l::AleFlowEstablishedV6 => FWPM_LAYER_ALE_FLOW_ESTABLISHED_V6,
        l::AleFlowEstablishedV6Discard => FWPM_LAYER_ALE_FLOW_ESTABLISHED_V6_DISCARD,
        l::InboundMacFrameEthernet => FWPM_LAYER_INBOUND_MAC_FRAME_ETHERNET,
        l::OutboundMacFrameEthernet => FWPM_LAYER_OUTBOUND_MAC_FRAME_ETHERNET,
        l::InboundMacFrameNative => FWPM_LAYER_INBOUND_MAC_FRAME_NATIVE,
        l::OutboundMacFrameNative => FWPM_LAYER_OUTBOUND_MAC_FRAME_NATIVE,
        l::AleResourceReleaseV4 => FWPM_LAYER_ALE_RESOURCE_RELEASE_V4,
        l::AleResourceReleaseV6 => FWPM_LAYER_ALE_RESOURCE_RELEASE_V6,
        l::AleEndpointClosureV4 => FWPM_LAYER_ALE_ENDPOINT_CLOSURE_V4,
        l::AleEndpointClosureV6 => FWPM_LAYER_ALE_ENDPOINT_CLOSURE_V6,
        l::AleConnectRedirectV4 => FWPM_LAYER_ALE_CONNECT_REDIRECT_V4,
        l::AleConnectRedirectV6 => FWPM_LAYER_ALE_CONNECT_REDIRECT_V6,
        l::AleBindRedirectV4 => FWPM_LAYER_ALE_BIND_REDIRECT_V4,
        l::AleBindRedirectV6 => FWPM_LAYER_ALE_BIND_REDIRECT_V6,
        l::StreamPacketV4 => FWPM_LAYER_STREAM_PACKET_V4,
        l::StreamPacketV6 => FWPM_LAYER_STREAM_PACKET_V6,
        l::IngressVswitchEthernet => FWPM_LAYER_INGRESS_VSWITCH_ETHERNET,
        l::EgressVswitchEthernet => FWPM_LAYER_EGRESS_VSWITCH_ETHERNET,
        l::IngressVswitchTransportV4 => FWPM_LAYER_INGRESS_VSWITCH_TRANSPORT_V4,
        l::IngressVswitchTransportV6 => FWPM_LAYER_INGRESS_VSWITCH_TRANSPORT_V6,
        l::EgressVswitchTransportV4 => FWPM_LAYER_EGRESS_VSWITCH_TRANSPORT_V4,
        l::EgressVswitchTransportV6 => FWPM_LAYER_EGRESS_VSWITCH_TRANSPORT_V6,
    );
    assert_no_diffs("FWPM_LAYER_* keys", &diffs);
}

#[test]
fn condition_keys_match_windows_sys() {
    use wfp_rs::layer::fields as f;
    let diffs = guid_table!(FieldKind::CONDITION;
        f::AleAppId => FWPM_CONDITION_ALE_APP_ID,
        f::AleEffectiveName => FWPM_CONDITION_ALE_EFFECTIVE_NAME,
        f::AleOriginalAppId => FWPM_CONDITION_ALE_ORIGINAL_APP_ID,
        f::AlePackageId => FWPM_CONDITION_ALE_PACKAGE_ID,
        f::AlePromiscuousMode => FWPM_CONDITION_ALE_PROMISCUOUS_MODE,
        f::AleRemoteMachineId => FWPM_CONDITION_ALE_REMOTE_MACHINE_ID,
        f::AleRemoteUserId => FWPM_CONDITION_ALE_REMOTE_USER_ID,
        f::AleSecurityAttributeFqbnValue => FWPM_CONDITION_ALE_SECURITY_ATTRIBUTE_FQBN_VALUE,
        f::AleUserId => FWPM_CONDITION_ALE_USER_ID,
        f::ArrivalInterfaceIndex => FWPM_CONDITION_ARRIVAL_INTERFACE_INDEX,
        f::ArrivalInterfaceType => FWPM_CONDITION_ARRIVAL_INTERFACE_TYPE,
        f::ArrivalTunnelType => FWPM_CONDITION_ARRIVAL_TUNNEL_TYPE,
        f::CompartmentId => FWPM_CONDITION_COMPARTMENT_ID,
        f::CurrentProfileId => FWPM_CONDITION_CURRENT_PROFILE_ID,
        f::Direction => FWPM_CONDITION_DIRECTION,
        f::Flags => FWPM_CONDITION_FLAGS,
        f::InterfaceIndex => FWPM_CONDITION_INTERFACE_INDEX,
        f::InterfaceQuarantineEpoch => FWPM_CONDITION_INTERFACE_QUARANTINE_EPOCH,
        f::InterfaceType => FWPM_CONDITION_INTERFACE_TYPE,
        f::IpArrivalInterface => FWPM_CONDITION_IP_ARRIVAL_INTERFACE,
        f::IpDestinationAddressType => FWPM_CONDITION_IP_DESTINATION_ADDRESS_TYPE,
        f::IpLocalAddress => FWPM_CONDITION_IP_LOCAL_ADDRESS,
        f::IpLocalAddressType => FWPM_CONDITION_IP_LOCAL_ADDRESS_TYPE,
        f::IpLocalInterface => FWPM_CONDITION_IP_LOCAL_INTERFACE,
        f::IpLocalPort => FWPM_CONDITION_IP_LOCAL_PORT,
        f::IpNexthopInterface => FWPM_CONDITION_IP_NEXTHOP_INTERFACE,
        f::IpProtocol => FWPM_CONDITION_IP_PROTOCOL,
        f::IpRemoteAddress => FWPM_CONDITION_IP_REMOTE_ADDRESS,
        f::IpRemotePort => FWPM_CONDITION_IP_REMOTE_PORT,
        f::IpsecSecurityRealmId => FWPM_CONDITION_IPSEC_SECURITY_REALM_ID,
        f::LocalInterfaceProfileId => FWPM_CONDITION_LOCAL_INTERFACE_PROFILE_ID,
        f::NapContext => FWPM_CONDITION_ALE_NAP_CONTEXT,
        f::NexthopInterfaceIndex => FWPM_CONDITION_NEXTHOP_INTERFACE_INDEX,
        f::NexthopInterfaceType => FWPM_CONDITION_NEXTHOP_INTERFACE_TYPE,
        f::NexthopSubInterfaceIndex => FWPM_CONDITION_NEXTHOP_SUB_INTERFACE_INDEX,
        f::NexthopTunnelType => FWPM_CONDITION_NEXTHOP_TUNNEL_TYPE,
        f::OriginalIcmpType => FWPM_CONDITION_ORIGINAL_ICMP_TYPE,
        f::OriginalProfileId => FWPM_CONDITION_ORIGINAL_PROFILE_ID,
        f::PeerName => FWPM_CONDITION_PEER_NAME,
        f::ReauthorizeReason => FWPM_CONDITION_REAUTHORIZE_REASON,
        f::SioFirewallSocketProperty => FWPM_CONDITION_ALE_SIO_FIREWALL_SYSTEM_PORT,
        f::SubInterfaceIndex => FWPM_CONDITION_SUB_INTERFACE_INDEX,
        f::TunnelType => FWPM_CONDITION_TUNNEL_TYPE,
        f::ArrivalInterfaceProfileId => FWPM_CONDITION_ARRIVAL_INTERFACE_PROFILE_ID,
        f::DestinationInterfaceIndex => FWPM_CONDITION_DESTINATION_INTERFACE_INDEX,
        f::DestinationSubInterfaceIndex => FWPM_CONDITION_DESTINATION_SUB_INTERFACE_INDEX,
        f::EmbeddedLocalAddressType => FWPM_CONDITION_EMBEDDED_LOCAL_ADDRESS_TYPE,
        f::EmbeddedLocalPort => FWPM_CONDITION_EMBEDDED_LOCAL_PORT,
        f::EmbeddedProtocol => FWPM_CONDITION_EMBEDDED_PROTOCOL,
        f::EmbeddedRemoteAddress => FWPM_CONDITION_EMBEDDED_REMOTE_ADDRESS,
        f::EmbeddedRemotePort => FWPM_CONDITION_EMBEDDED_REMOTE_PORT,
        f::IpDestinationAddress => FWPM_CONDITION_IP_DESTINATION_ADDRESS,
        f::IpForwardInterface => FWPM_CONDITION_IP_FORWARD_INTERFACE,
        f::IpPhysicalArrivalInterface => FWPM_CONDITION_IP_PHYSICAL_ARRIVAL_INTERFACE,
        f::IpPhysicalNexthopInterface => FWPM_CONDITION_IP_PHYSICAL_NEXTHOP_INTERFACE,
        f::IpSourceAddress => FWPM_CONDITION_IP_SOURCE_ADDRESS,
        f::NexthopInterfaceProfileId => FWPM_CONDITION_NEXTHOP_INTERFACE_PROFILE_ID,
        f::SourceInterfaceIndex => FWPM_CONDITION_SOURCE_INTERFACE_INDEX,
        f::SourceSubInterfaceIndex => FWPM_CONDITION_SOURCE_SUB_INTERFACE_INDEX,
        f::EtherType => FWPM_CONDITION_ETHER_TYPE,
        f::InterfaceMacAddress => FWPM_CONDITION_INTERFACE_MAC_ADDRESS,
        f::IpDestinationPort => FWPM_CONDITION_IP_DESTINATION_PORT,
        f::IpSourcePort => FWPM_CONDITION_IP_SOURCE_PORT,
        f::L2Flags => FWPM_CONDITION_L2_FLAGS,
        f::MacDestinationAddress => FWPM_CONDITION_MAC_DESTINATION_ADDRESS,
        f::MacDestinationAddressType => FWPM_CONDITION_MAC_DESTINATION_ADDRESS_TYPE,
        f::MacLocalAddress => FWPM_CONDITION_MAC_LOCAL_ADDRESS,
        f::MacLocalAddressType => FWPM_CONDITION_MAC_LOCAL_ADDRESS_TYPE,
        f::MacRemoteAddress => FWPM_CONDITION_MAC_REMOTE_ADDRESS,
        f::MacRemoteAddressType => FWPM_CONDITION_MAC_REMOTE_ADDRESS_TYPE,
        f::MacSourceAddress => FWPM_CONDITION_MAC_SOURCE_ADDRESS,
        f::MacSourceAddressType => FWPM_CONDITION_MAC_SOURCE_ADDRESS_TYPE,
        f::NdisMediaType => FWPM_CONDITION_NDIS_MEDIA_TYPE,
        f::NdisPhysicalMediaType => FWPM_CONDITION_NDIS_PHYSICAL_MEDIA_TYPE,
        f::NdisPort => FWPM_CONDITION_NDIS_PORT,
        f::VlanId => FWPM_CONDITION_VLAN_ID,
        f::VswitchDestinationInterfaceId => FWPM_CONDITION_VSWITCH_DESTINATION_INTERFACE_ID,
        f::VswitchDestinationInterfaceType => FWPM_CONDITION_VSWITCH_DESTINATION_INTERFACE_TYPE,
        f::VswitchDestinationVmId => FWPM_CONDITION_VSWITCH_DESTINATION_VM_ID,
        f::VswitchId => FWPM_CONDITION_VSWITCH_ID,
        f::VswitchNetworkType => FWPM_CONDITION_VSWITCH_NETWORK_TYPE,
        f::VswitchSourceInterfaceId => FWPM_CONDITION_VSWITCH_SOURCE_INTERFACE_ID,
        f::VswitchSourceInterfaceType => FWPM_CONDITION_VSWITCH_SOURCE_INTERFACE_TYPE,
        f::VswitchSourceVmId => FWPM_CONDITION_VSWITCH_SOURCE_VM_ID,
        f::VswitchTenantNetworkId => FWPM_CONDITION_VSWITCH_TENANT_NETWORK_ID,
    );
    assert_no_diffs("FWPM_CONDITION_* keys", &diffs);
}

/// Runtime layer ids and field counts, as transcribed from WDK 10.0.22621 `km/fwpsk.h`
/// (`FWPS_BUILTIN_LAYERS`, and `FWPS_FIELD_<LAYER>_MAX` of each layer's `FWPS_FIELDS_*` enum; a
/// `_DISCARD` layer has its base layer's fields). Every id is below 82, so the same in the
/// 19041, 20348 and 22621 WDKs: the table's ids and counts are the header's, and every layer the
/// crate knows is found by its id and its key.
#[test]
fn layer_ids_are_the_headers() {
    let expected: &[(&str, u16, u32)] = &[
        ("INBOUND_IPPACKET_V4", 0, 10),
        ("INBOUND_IPPACKET_V4_DISCARD", 1, 10),
        ("INBOUND_IPPACKET_V6", 2, 10),
        ("INBOUND_IPPACKET_V6_DISCARD", 3, 10),
        ("OUTBOUND_IPPACKET_V4", 4, 10),
        ("OUTBOUND_IPPACKET_V4_DISCARD", 5, 10),
        ("OUTBOUND_IPPACKET_V6", 6, 10),
        ("OUTBOUND_IPPACKET_V6_DISCARD", 7, 10),
        ("IPFORWARD_V4", 8, 15),
        ("IPFORWARD_V4_DISCARD", 9, 15),
        ("IPFORWARD_V6", 10, 15),
        ("IPFORWARD_V6_DISCARD", 11, 15),
        ("INBOUND_TRANSPORT_V4", 12, 15),
        ("INBOUND_TRANSPORT_V4_DISCARD", 13, 15),
        ("INBOUND_TRANSPORT_V6", 14, 15),
        ("INBOUND_TRANSPORT_V6_DISCARD", 15, 15),
        ("OUTBOUND_TRANSPORT_V4", 16, 16),
        ("OUTBOUND_TRANSPORT_V4_DISCARD", 17, 16),
        ("OUTBOUND_TRANSPORT_V6", 18, 16),
        ("OUTBOUND_TRANSPORT_V6_DISCARD", 19, 16),
        ("STREAM_V4", 20, 8),
        ("STREAM_V4_DISCARD", 21, 8),
        ("STREAM_V6", 22, 8),
        ("STREAM_V6_DISCARD", 23, 8),
        ("DATAGRAM_DATA_V4", 24, 14),
        ("DATAGRAM_DATA_V4_DISCARD", 25, 14),
        ("DATAGRAM_DATA_V6", 26, 14),
        ("DATAGRAM_DATA_V6_DISCARD", 27, 14),
        ("INBOUND_ICMP_ERROR_V4", 28, 22),
        ("INBOUND_ICMP_ERROR_V4_DISCARD", 29, 22),
        ("INBOUND_ICMP_ERROR_V6", 30, 22),
        ("INBOUND_ICMP_ERROR_V6_DISCARD", 31, 22),
        ("OUTBOUND_ICMP_ERROR_V4", 32, 14),
        ("OUTBOUND_ICMP_ERROR_V4_DISCARD", 33, 14),
        ("OUTBOUND_ICMP_ERROR_V6", 34, 14),
        ("OUTBOUND_ICMP_ERROR_V6_DISCARD", 35, 14),
        ("ALE_RESOURCE_ASSIGNMENT_V4", 36, 18),
        ("ALE_RESOURCE_ASSIGNMENT_V4_DISCARD", 37, 18),
        ("ALE_RESOURCE_ASSIGNMENT_V6", 38, 18),
        ("ALE_RESOURCE_ASSIGNMENT_V6_DISCARD", 39, 18),
        ("ALE_AUTH_LISTEN_V4", 40, 14),
        ("ALE_AUTH_LISTEN_V4_DISCARD", 41, 14),
        ("ALE_AUTH_LISTEN_V6", 42, 14),
        ("ALE_AUTH_LISTEN_V6_DISCARD", 43, 14),
        ("ALE_AUTH_RECV_ACCEPT_V4", 44, 39),
        ("ALE_AUTH_RECV_ACCEPT_V4_DISCARD", 45, 39),
        ("ALE_AUTH_RECV_ACCEPT_V6", 46, 39),
        ("ALE_AUTH_RECV_ACCEPT_V6_DISCARD", 47, 39),
        ("ALE_AUTH_CONNECT_V4", 48, 41),
        ("ALE_AUTH_CONNECT_V4_DISCARD", 49, 41),
        ("ALE_AUTH_CONNECT_V6", 50, 41),
        ("ALE_AUTH_CONNECT_V6_DISCARD", 51, 41),
        ("ALE_FLOW_ESTABLISHED_V4", 52, 24),
        ("ALE_FLOW_ESTABLISHED_V4_DISCARD", 53, 24),
        ("ALE_FLOW_ESTABLISHED_V6", 54, 24),
        ("ALE_FLOW_ESTABLISHED_V6_DISCARD", 55, 24),
        ("INBOUND_MAC_FRAME_ETHERNET", 56, 12),
        ("OUTBOUND_MAC_FRAME_ETHERNET", 57, 12),
        ("INBOUND_MAC_FRAME_NATIVE", 58, 8),
        ("OUTBOUND_MAC_FRAME_NATIVE", 59, 8),
        ("ALE_RESOURCE_RELEASE_V4", 62, 11),
        ("ALE_RESOURCE_RELEASE_V6", 63, 11),
        ("ALE_ENDPOINT_CLOSURE_V4", 64, 13),
        ("ALE_ENDPOINT_CLOSURE_V6", 65, 13),
        ("ALE_CONNECT_REDIRECT_V4", 66, 14),
        ("ALE_CONNECT_REDIRECT_V6", 67, 14),
        ("ALE_BIND_REDIRECT_V4", 68, 10),
        ("ALE_BIND_REDIRECT_V6", 69, 10),
        ("STREAM_PACKET_V4", 70, 12),
        ("STREAM_PACKET_V6", 71, 12),
        ("INGRESS_VSWITCH_ETHERNET", 72, 14),
        ("EGRESS_VSWITCH_ETHERNET", 73, 17),
        ("INGRESS_VSWITCH_TRANSPORT_V4", 74, 14),
        ("INGRESS_VSWITCH_TRANSPORT_V6", 75, 14),
        ("EGRESS_VSWITCH_TRANSPORT_V4", 76, 17),
        ("EGRESS_VSWITCH_TRANSPORT_V6", 77, 17),
    ];
    assert_eq!(wfp_rs::layer::ALL_LAYERS.len(), expected.len());
    for &(name, id, field_count) in expected {
        let layer = wfp_rs::layer::ALL_LAYERS
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(layer.id, id, "{name}");
        assert_eq!(layer.field_count, field_count, "{name}");
        assert!(id < 82, "{name}: ids above 81 differ between WDKs");
        assert_eq!(wfp_rs::layer::layer_by_id(id).map(|l| l.name), Some(name));
        assert_eq!(
            wfp_rs::layer::layer_by_key(&layer.key).map(|l| l.id),
            Some(id)
        );
        // Every typed field's index is inside the layer, and no two fields share one.
        for (i, field) in layer.fields.iter().enumerate() {
            assert!(field.index < field_count, "{name}: {}", field.name);
            assert!(
                layer.fields[..i].iter().all(|f| f.index != field.index),
                "{name}: index {} twice",
                field.index
            );
        }
    }
    // Spot checks of field indices against the header's FWPS_FIELDS_* enums.
    use wfp_rs::layer::{AleAuthConnectV4, Field, InboundTransportV4, OutboundTransportV4, fields};
    assert_eq!(
        <fields::IpRemoteAddress as Field<OutboundTransportV4>>::INDEX,
        3
    );
    assert_eq!(
        <fields::IpRemoteAddress as Field<InboundTransportV4>>::INDEX,
        2
    );
    assert_eq!(<fields::AleAppId as Field<AleAuthConnectV4>>::INDEX, 0);
    assert_eq!(<fields::IpRemotePort as Field<AleAuthConnectV4>>::INDEX, 7);
    // And at layers added after the first 16 (indices read off the header by hand).
    use wfp_rs::layer as l;
    assert_eq!(<fields::IpRemoteAddress as Field<l::StreamV4>>::INDEX, 2);
    assert_eq!(<fields::Direction as Field<l::StreamV4>>::INDEX, 5);
    assert_eq!(<fields::Direction as Field<l::StreamV4Discard>>::INDEX, 5);
    assert_eq!(<fields::IpRemotePort as Field<l::DatagramDataV6>>::INDEX, 5);
    assert_eq!(<fields::Direction as Field<l::DatagramDataV6>>::INDEX, 9);
    assert_eq!(
        <fields::EmbeddedRemoteAddress as Field<l::InboundIcmpErrorV4>>::INDEX,
        3
    );
    // ICMP_TYPE is FWPM_CONDITION_ICMP_TYPE, a #define of IP_LOCAL_PORT.
    assert_eq!(
        <fields::IpLocalPort as Field<l::InboundIcmpErrorV4>>::INDEX,
        8
    );
    assert_eq!(
        <fields::IpDestinationAddress as Field<l::IpForwardV4>>::INDEX,
        1
    );
    assert_eq!(
        <fields::IpForwardInterface as Field<l::IpForwardV4>>::INDEX,
        4
    );
    assert_eq!(
        <fields::IpLocalPort as Field<l::AleBindRedirectV6>>::INDEX,
        4
    );
    assert_eq!(<fields::Direction as Field<l::StreamPacketV4>>::INDEX, 7);
    assert_eq!(
        <fields::SioFirewallSocketProperty as Field<l::AleAuthListenV4>>::INDEX,
        10
    );
    assert_eq!(
        <fields::MacRemoteAddress as Field<l::InboundMacFrameEthernet>>::INDEX,
        2
    );
    assert_eq!(
        <fields::EtherType as Field<l::InboundMacFrameEthernet>>::INDEX,
        5
    );
    // The MAC layers' INTERFACE is FWPM_CONDITION_INTERFACE, a #define of IP_LOCAL_INTERFACE.
    assert_eq!(
        <fields::IpLocalInterface as Field<l::InboundMacFrameEthernet>>::INDEX,
        7
    );
    assert_eq!(
        <fields::NdisPhysicalMediaType as Field<l::OutboundMacFrameNative>>::INDEX,
        1
    );
    assert_eq!(
        <fields::NdisPort as Field<l::OutboundMacFrameNative>>::INDEX,
        5
    );
    assert_eq!(
        <fields::VswitchDestinationVmId as Field<l::EgressVswitchEthernet>>::INDEX,
        14
    );
    assert_eq!(
        <fields::L2Flags as Field<l::EgressVswitchEthernet>>::INDEX,
        15
    );
    assert_eq!(
        <fields::IpDestinationAddress as Field<l::IngressVswitchTransportV4>>::INDEX,
        1
    );
    assert_eq!(
        <fields::IpSourcePort as Field<l::IngressVswitchTransportV4>>::INDEX,
        3
    );
    assert_eq!(
        <fields::VswitchId as Field<l::IngressVswitchTransportV4>>::INDEX,
        7
    );
}

/// The layers below IP have no IP version (and so no address type); every other layer has the
/// version its name ends with.
#[test]
fn only_the_frame_layers_have_no_ip_version() {
    use wfp_rs::layer::IpVersion;
    for layer in wfp_rs::layer::ALL_LAYERS {
        let expected = if layer.name.contains("V4") {
            Some(IpVersion::V4)
        } else if layer.name.contains("V6") {
            Some(IpVersion::V6)
        } else {
            assert!(
                layer.name.contains("MAC_FRAME") || layer.name.contains("VSWITCH_ETHERNET"),
                "{}",
                layer.name
            );
            None
        };
        assert_eq!(layer.ip_version, expected, "{}", layer.name);
        if expected.is_none() {
            let address = wfp_rs::layer::value::ValueKind::Address;
            assert!(
                layer.fields.iter().all(|f| f.kind != address),
                "{}",
                layer.name
            );
        }
    }
}

/// `KDPC` and `KTIMER`: the DPC as windows-sys has it; the timer's members up to `Dpc` too.
/// windows-sys's `KTIMER` ends with a lone `ULONG Period` (an older wdm.h); WDK 10.0.22621
/// has `ULONG Processor; ULONG Period;` there, so the size agrees (0x40) and `Period` is pinned
/// to the header's offset, 0x3C.
#[test]
fn timer_and_dpc_match_windows_sys() {
    use windows_sys::Wdk::Foundation as wdk;
    use windows_sys::Wdk::System::SystemServices as svc;
    let mut diffs = Vec::new();
    check_layout!(
        diffs,
        ours::KDPC,
        wdk::KDPC,
        TargetInfoAsUlong => Anonymous,
        DpcListEntry,
        ProcessorHistory,
        DeferredRoutine,
        DeferredContext,
        SystemArgument1,
        SystemArgument2,
        DpcData,
    );
    check_layout!(
        diffs,
        ours::KTIMER,
        svc::KTIMER,
        Header,
        DueTime,
        TimerListEntry,
        Dpc,
    );
    if offset_of!(ours::KTIMER, Period) != 0x3C {
        diffs.push("KTIMER.Period: not at 0x3C (wdm.h, x64)".into());
    }
    assert_no_diffs("KDPC/KTIMER", &diffs);
}

/// `DEVICE_OBJECT`: the fields drivers touch at the offsets windows-sys has, the size of the real
/// structure, and the 16-byte alignment wdm.h gives it with
/// `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)` (x64: 16). windows-sys drops that alignment
/// (its `DEVICE_OBJECT` is 8-aligned), so the alignment is pinned to the header's value.
#[test]
fn device_object_matches_windows_sys_and_the_header_alignment() {
    use windows_sys::Wdk::Foundation as wdk;
    let mut diffs = Vec::new();
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, Type);
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, Size);
    check_field!(
        diffs,
        ours::DEVICE_OBJECT,
        wdk::DEVICE_OBJECT,
        ReferenceCount
    );
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, DriverObject);
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, NextDevice);
    check_field!(
        diffs,
        ours::DEVICE_OBJECT,
        wdk::DEVICE_OBJECT,
        AttachedDevice
    );
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, CurrentIrp);
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, Flags);
    check_field!(
        diffs,
        ours::DEVICE_OBJECT,
        wdk::DEVICE_OBJECT,
        Characteristics
    );
    check_field!(
        diffs,
        ours::DEVICE_OBJECT,
        wdk::DEVICE_OBJECT,
        DeviceExtension
    );
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, DeviceType);
    check_field!(diffs, ours::DEVICE_OBJECT, wdk::DEVICE_OBJECT, StackSize);
    // windows-sys's members end at 0x148; the header's 16-byte alignment pads the structure to
    // 0x150, the size `IoCreateDevice` allocates and `DEVICE_OBJECT::Size` reports.
    if size_of::<ours::DEVICE_OBJECT>() != size_of::<wdk::DEVICE_OBJECT>().next_multiple_of(16) {
        diffs.push(format!(
            "DEVICE_OBJECT: {} bytes here, {} in windows-sys (before the 16-byte alignment)",
            size_of::<ours::DEVICE_OBJECT>(),
            size_of::<wdk::DEVICE_OBJECT>()
        ));
    }
    // wdm.h, x64: sizeof(DEVICE_OBJECT) == 0x150, __declspec(align(16)).
    if size_of::<ours::DEVICE_OBJECT>() != 0x150 {
        diffs.push("DEVICE_OBJECT: not 0x150 bytes".into());
    }
    if align_of::<ours::DEVICE_OBJECT>() != 16 {
        diffs.push(format!(
            "DEVICE_OBJECT: aligned to {}, wdm.h declares 16 (MEMORY_ALLOCATION_ALIGNMENT)",
            align_of::<ours::DEVICE_OBJECT>()
        ));
    }
    assert_no_diffs("DEVICE_OBJECT", &diffs);
}

/// The simulator's `IoCreateDevice` hands out device objects at 16-byte-aligned addresses, as
/// the I/O manager does (the object comes from pool, whose blocks are 16-aligned on x64), so code
/// that relies on the declared alignment (an interlocked 16-byte operation on a member, a
/// `DeviceExtension` placed after it) runs in the simulator as on Windows.
#[cfg(any(not(windows), feature = "sim"))]
#[test]
fn simulated_device_objects_are_16_byte_aligned() {
    use core::ptr::{null, null_mut};
    let machine = wfp_rs_sim::Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .unwrap();
    machine.run(|| {
        let mut devices = Vec::new();
        for extension in [0u32, 1, 24, 100] {
            let mut device = null_mut();
            // SAFETY: the driver object is a loaded driver's; unnamed devices, deleted below.
            let status = unsafe {
                ours::IoCreateDevice(
                    driver.driver_object(),
                    extension,
                    null(),
                    0x22,
                    0,
                    0,
                    &mut device,
                )
            };
            assert_eq!(status, 0);
            assert_eq!(device as usize % 16, 0, "device object at {device:p}");
            // SAFETY: just created.
            let ext = unsafe { (*device).DeviceExtension };
            assert_eq!(ext as usize % 16, 0, "device extension at {ext:p}");
            devices.push(device);
        }
        for device in devices {
            // SAFETY: created above, deleted once.
            unsafe { ours::IoDeleteDevice(device) };
        }
    });
    machine.unload_driver(driver).unwrap();
}

/// `MDL` against windows-sys; the NDIS buffer structures, the stream layer's structures and the
/// injection types (absent from windows-sys) against the x64 sizes, offsets and values of WDK
/// 10.0.22621 `km/ndis/nbl.h` and `km/fwpsk.h`, computed by compiling the C definitions with
/// fixed-width LLP64 typedefs; the address families against windows-sys.
#[test]
fn packet_structures_match_windows_sys_and_the_headers() {
    use windows_sys::Wdk::Foundation as wdk;
    let mut diffs = Vec::new();
    check_layout!(
        diffs,
        ours::MDL,
        wdk::MDL,
        Next,
        Size,
        MdlFlags,
        Process,
        MappedSystemVa,
        StartVa,
        ByteCount,
        ByteOffset,
    );
    macro_rules! pin {
        ($t:ident, size $size:literal, align $align:literal { $($field:ident: $offset:literal),* $(,)? }) => {
            if size_of::<ours::$t>() != $size {
                diffs.push(format!("{}: {} bytes, the header has {}", stringify!($t), size_of::<ours::$t>(), $size));
            }
            if align_of::<ours::$t>() != $align {
                diffs.push(format!("{}: aligned to {}, the header to {}", stringify!($t), align_of::<ours::$t>(), $align));
            }
            $(
                if offset_of!(ours::$t, $field) != $offset {
                    diffs.push(format!(
                        "{}.{}: offset {}, the header has {}",
                        stringify!($t), stringify!($field), offset_of!(ours::$t, $field), $offset
                    ));
                }
            )*
        };
    }
    pin!(NET_BUFFER, size 176, align 16 {
        Next: 0, CurrentMdl: 8, CurrentMdlOffset: 16, DataLength: 24, MdlChain: 32,
        DataOffset: 40, ChecksumBias: 48, NdisPoolHandle: 56, NdisReserved: 64,
        ProtocolReserved: 80, MiniportReserved: 128, DataPhysicalAddress: 160,
        SharedMemoryInfo: 168,
    });
    pin!(NET_BUFFER_LIST, size 368, align 16 {
        Next: 0, FirstNetBuffer: 8, Context: 16, ParentNetBufferList: 24, NdisPoolHandle: 32,
        NdisReserved: 48, ProtocolReserved: 64, MiniportReserved: 96, Scratch: 112,
        SourceHandle: 120, NblFlags: 128, ChildRefCount: 132, Flags: 136, Status: 140,
        NetBufferListInfo: 144,
    });
    pin!(FWPS_STREAM_DATA_OFFSET0, size 40, align 8 {
        netBufferList: 0, netBuffer: 8, mdl: 16, mdlOffset: 24, netBufferOffset: 28,
        streamDataOffset: 32,
    });
    pin!(FWPS_STREAM_DATA0, size 64, align 8 {
        flags: 0, dataOffset: 8, dataLength: 48, netBufferListChain: 56,
    });
    pin!(FWPS_STREAM_CALLOUT_IO_PACKET0, size 40, align 8 {
        streamData: 0, missedBytes: 8, countBytesRequired: 16, countBytesEnforced: 24,
        streamAction: 32,
    });
    pin!(SOCKADDR_STORAGE, size 128, align 8 {
        ss_family: 0, __ss_pad1: 2, __ss_align: 8, __ss_pad2: 16,
    });
    pin!(FWPS_CONNECT_REQUEST0, size 312, align 8 {
        localAddressAndPort: 0, remoteAddressAndPort: 128, portReservationToken: 256,
        localRedirectTargetPID: 264, previousVersion: 272, modifierFilterId: 280,
        localRedirectHandle: 288, localRedirectContext: 296, localRedirectContextSize: 304,
    });
    pin!(FWPS_BIND_REQUEST0, size 152, align 8 {
        localAddressAndPort: 0, portReservationToken: 128, previousVersion: 136,
        modifierFilterId: 144,
    });
    pin!(FWPS_TRANSPORT_SEND_PARAMS0, size 32, align 8 {
        remoteAddress: 0, remoteScopeId: 8, controlData: 16, controlDataLength: 24,
    });
    for (name, ours, header) in [
        (
            "FWPS_INJECTION_TYPE_TRANSPORT",
            i64::from(ours::FWPS_INJECTION_TYPE_TRANSPORT),
            0x2,
        ),
        (
            "FWPS_INJECTION_TYPE_NETWORK",
            i64::from(ours::FWPS_INJECTION_TYPE_NETWORK),
            0x4,
        ),
        (
            "FWPS_PACKET_INJECTED_BY_SELF",
            i64::from(ours::FWPS_PACKET_INJECTED_BY_SELF),
            1,
        ),
        (
            "FWPS_PACKET_INJECTED_BY_OTHER",
            i64::from(ours::FWPS_PACKET_INJECTED_BY_OTHER),
            2,
        ),
        (
            "FWPS_PACKET_PREVIOUSLY_INJECTED_BY_SELF",
            i64::from(ours::FWPS_PACKET_PREVIOUSLY_INJECTED_BY_SELF),
            3,
        ),
        // fwpsk.h, FWPS_CONNECTION_REDIRECT_STATE (NTDDI_WIN8): an enum counted from 0.
        (
            "FWPS_CONNECTION_NOT_REDIRECTED",
            i64::from(ours::FWPS_CONNECTION_NOT_REDIRECTED),
            0,
        ),
        (
            "FWPS_CONNECTION_REDIRECTED_BY_SELF",
            i64::from(ours::FWPS_CONNECTION_REDIRECTED_BY_SELF),
            1,
        ),
        (
            "FWPS_CONNECTION_REDIRECTED_BY_OTHER",
            i64::from(ours::FWPS_CONNECTION_REDIRECTED_BY_OTHER),
            2,
        ),
        (
            "FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF",
            i64::from(ours::FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF),
            3,
        ),
        (
            "FWPS_CONNECTION_REDIRECT_STATE_MAX",
            i64::from(ours::FWPS_CONNECTION_REDIRECT_STATE_MAX),
            4,
        ),
        (
            "FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS",
            i64::from(ours::FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS),
            0x1,
        ),
        ("AF_INET", i64::from(ours::AF_INET), i64::from(ws::AF_INET)),
        (
            "AF_INET6",
            i64::from(ours::AF_INET6),
            i64::from(ws::AF_INET6),
        ),
        (
            "MDL_MAPPED_TO_SYSTEM_VA",
            i64::from(ours::MDL_MAPPED_TO_SYSTEM_VA),
            0x1,
        ),
        (
            "MDL_SOURCE_IS_NONPAGED_POOL",
            i64::from(ours::MDL_SOURCE_IS_NONPAGED_POOL),
            0x4,
        ),
        (
            "FWPS_STREAM_FLAG_SEND",
            i64::from(ours::FWPS_STREAM_FLAG_SEND),
            0x1_0000,
        ),
        (
            "FWPS_STREAM_ACTION_ALLOW_CONNECTION",
            i64::from(ours::FWPS_STREAM_ACTION_ALLOW_CONNECTION),
            4,
        ),
    ] {
        if ours != header {
            diffs.push(format!("{name}: {ours:#x} here, {header:#x} in the header"));
        }
    }
    assert_no_diffs("packet structures", &diffs);
}
