//! `#[repr(C)]` types and constants of the Windows Filtering Platform, shared by both backends.
//!
//! Transcribed for x64 from the WDK 10.0.22621 kernel headers (`km/fwpsk.h`, `km/fwpmk.h`) and
//! the shared SDK headers they include (`shared/fwptypes.h`, `shared/fwpstypes.h`,
//! `shared/fwpmtypes.h`, as shipped in SDK 10.0.22000; `ws2def.h`, `ws2ipdef.h`, `inaddr.h`,
//! `in6addr.h`, `netioapi.h` and `ntddndis.h` for the socket-address and vSwitch types that
//! `FWPS_INCOMING_METADATA_VALUES0` embeds). Where a header has `NTDDI_VERSION` branches, the
//! Windows 10 (`NTDDI_WIN10_RS3` and later) branch is the one transcribed.
//!
//! As in `types.rs`, only fixed-width Rust types stand for Windows typedefs (`u32` for
//! UINT32/ULONG/DWORD, `i32` for BOOL and the 32-bit C enums, `u16` for WCHAR, raw pointers for
//! HANDLE and pointers), so the layouts are the same when compiled for Linux (the simulator) and
//! for Windows. The assertions at the end pin every size and every offset this crate
//! touches; the expected numbers were computed independently from the C definitions (compiled
//! with fixed-width LLP64 typedefs), not from these Rust definitions.
//!
//! C enums are `i32` type aliases with one constant per enumerator. Anonymous C unions are
//! `#[repr(C)] union`s named `<STRUCT>_u`, held in a field named `u`.
//!
//! Only *runtime* layer ids 0..=81 (`FWPS_LAYER_*`) are defined: they are the same in every WDK
//! for Windows 8.1 and later, while the ids above 81 are renumbered from one WDK to the next
//! (e.g. `FWPS_LAYER_IPSEC_KM_DEMUX_V4` is 91 in WDK 19041, 85 in WDK 22000, 87 in WDK 22621;
//! id 82 is `RESERVED_LAYER_1` in 19041 and `INBOUND_RESERVED2` from 22000 on).

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::c_void;
use core::mem::{align_of, offset_of, size_of};

use static_assertions::{assert_eq_size, const_assert_eq};

use super::types::{GUID, NTSTATUS};

// ---------------------------------------------------------------------------------------------
// Enumerations (fwptypes.h, fwpstypes.h). C enums are 32-bit on x64.
// ---------------------------------------------------------------------------------------------

/// `FWP_DIRECTION` (fwptypes.h).
pub type FWP_DIRECTION = i32;
pub const FWP_DIRECTION_OUTBOUND: FWP_DIRECTION = 0;
pub const FWP_DIRECTION_INBOUND: FWP_DIRECTION = 1;
pub const FWP_DIRECTION_MAX: FWP_DIRECTION = 2;

/// `FWP_IP_VERSION` (fwptypes.h).
pub type FWP_IP_VERSION = i32;
pub const FWP_IP_VERSION_V4: FWP_IP_VERSION = 0;
pub const FWP_IP_VERSION_V6: FWP_IP_VERSION = 1;
pub const FWP_IP_VERSION_NONE: FWP_IP_VERSION = 2;
pub const FWP_IP_VERSION_MAX: FWP_IP_VERSION = 3;

/// `FWP_DATA_TYPE` (fwptypes.h): the tag of `FWP_VALUE0` and `FWP_CONDITION_VALUE0`.
pub type FWP_DATA_TYPE = i32;
pub const FWP_EMPTY: FWP_DATA_TYPE = 0;
pub const FWP_UINT8: FWP_DATA_TYPE = 1;
pub const FWP_UINT16: FWP_DATA_TYPE = 2;
pub const FWP_UINT32: FWP_DATA_TYPE = 3;
pub const FWP_UINT64: FWP_DATA_TYPE = 4;
pub const FWP_INT8: FWP_DATA_TYPE = 5;
pub const FWP_INT16: FWP_DATA_TYPE = 6;
pub const FWP_INT32: FWP_DATA_TYPE = 7;
pub const FWP_INT64: FWP_DATA_TYPE = 8;
pub const FWP_FLOAT: FWP_DATA_TYPE = 9;
pub const FWP_DOUBLE: FWP_DATA_TYPE = 10;
pub const FWP_BYTE_ARRAY16_TYPE: FWP_DATA_TYPE = 11;
pub const FWP_BYTE_BLOB_TYPE: FWP_DATA_TYPE = 12;
pub const FWP_SID: FWP_DATA_TYPE = 13;
pub const FWP_SECURITY_DESCRIPTOR_TYPE: FWP_DATA_TYPE = 14;
pub const FWP_TOKEN_INFORMATION_TYPE: FWP_DATA_TYPE = 15;
pub const FWP_TOKEN_ACCESS_INFORMATION_TYPE: FWP_DATA_TYPE = 16;
pub const FWP_UNICODE_STRING_TYPE: FWP_DATA_TYPE = 17;
pub const FWP_BYTE_ARRAY6_TYPE: FWP_DATA_TYPE = 18;
/// Present in some SDK releases' `fwptypes.h` (not in SDK 10.0.22000 nor in `windows-sys`);
/// the kernel may still hand it out, so a reader must not assume the list above is complete.
pub const FWP_BITMAP_INDEX_TYPE: FWP_DATA_TYPE = 19;
/// See [`FWP_BITMAP_INDEX_TYPE`]; the value is a pointer to [`FWP_BITMAP_ARRAY64`].
pub const FWP_BITMAP_ARRAY64_TYPE: FWP_DATA_TYPE = 20;
pub const FWP_SINGLE_DATA_TYPE_MAX: FWP_DATA_TYPE = 0xff;
pub const FWP_V4_ADDR_MASK: FWP_DATA_TYPE = 0x100;
pub const FWP_V6_ADDR_MASK: FWP_DATA_TYPE = 0x101;
pub const FWP_RANGE_TYPE: FWP_DATA_TYPE = 0x102;
pub const FWP_DATA_TYPE_MAX: FWP_DATA_TYPE = 0x103;

/// `FWP_MATCH_TYPE` (fwptypes.h).
pub type FWP_MATCH_TYPE = i32;
pub const FWP_MATCH_EQUAL: FWP_MATCH_TYPE = 0;
pub const FWP_MATCH_GREATER: FWP_MATCH_TYPE = 1;
pub const FWP_MATCH_LESS: FWP_MATCH_TYPE = 2;
pub const FWP_MATCH_GREATER_OR_EQUAL: FWP_MATCH_TYPE = 3;
pub const FWP_MATCH_LESS_OR_EQUAL: FWP_MATCH_TYPE = 4;
pub const FWP_MATCH_RANGE: FWP_MATCH_TYPE = 5;
pub const FWP_MATCH_FLAGS_ALL_SET: FWP_MATCH_TYPE = 6;
pub const FWP_MATCH_FLAGS_ANY_SET: FWP_MATCH_TYPE = 7;
pub const FWP_MATCH_FLAGS_NONE_SET: FWP_MATCH_TYPE = 8;
pub const FWP_MATCH_EQUAL_CASE_INSENSITIVE: FWP_MATCH_TYPE = 9;
pub const FWP_MATCH_NOT_EQUAL: FWP_MATCH_TYPE = 10;
pub const FWP_MATCH_PREFIX: FWP_MATCH_TYPE = 11;
pub const FWP_MATCH_NOT_PREFIX: FWP_MATCH_TYPE = 12;
pub const FWP_MATCH_TYPE_MAX: FWP_MATCH_TYPE = 13;

/// `FWPS_CALLOUT_NOTIFY_TYPE` (fwpstypes.h): why `notifyFn` is called.
pub type FWPS_CALLOUT_NOTIFY_TYPE = i32;
pub const FWPS_CALLOUT_NOTIFY_ADD_FILTER: FWPS_CALLOUT_NOTIFY_TYPE = 0;
pub const FWPS_CALLOUT_NOTIFY_DELETE_FILTER: FWPS_CALLOUT_NOTIFY_TYPE = 1;
pub const FWPS_CALLOUT_NOTIFY_ADD_FILTER_POST_COMMIT: FWPS_CALLOUT_NOTIFY_TYPE = 2;
pub const FWPS_CALLOUT_NOTIFY_TYPE_MAX: FWPS_CALLOUT_NOTIFY_TYPE = 3;

/// `FWPS_DISCARD_MODULE0` (fwpstypes.h).
pub type FWPS_DISCARD_MODULE0 = i32;
pub const FWPS_DISCARD_MODULE_NETWORK: FWPS_DISCARD_MODULE0 = 0;
pub const FWPS_DISCARD_MODULE_TRANSPORT: FWPS_DISCARD_MODULE0 = 1;
pub const FWPS_DISCARD_MODULE_GENERAL: FWPS_DISCARD_MODULE0 = 2;
pub const FWPS_DISCARD_MODULE_MAX: FWPS_DISCARD_MODULE0 = 3;

// ---------------------------------------------------------------------------------------------
// Actions, rights and flags.
// ---------------------------------------------------------------------------------------------

/// `FWP_ACTION_TYPE` (fwptypes.h): a `UINT32`, not an enum.
pub type FWP_ACTION_TYPE = u32;
pub const FWP_ACTION_FLAG_TERMINATING: u32 = 0x0000_1000;
pub const FWP_ACTION_FLAG_NON_TERMINATING: u32 = 0x0000_2000;
pub const FWP_ACTION_FLAG_CALLOUT: u32 = 0x0000_4000;
pub const FWP_ACTION_BLOCK: FWP_ACTION_TYPE = 0x1 | FWP_ACTION_FLAG_TERMINATING;
pub const FWP_ACTION_PERMIT: FWP_ACTION_TYPE = 0x2 | FWP_ACTION_FLAG_TERMINATING;
pub const FWP_ACTION_CALLOUT_TERMINATING: FWP_ACTION_TYPE =
    0x3 | FWP_ACTION_FLAG_CALLOUT | FWP_ACTION_FLAG_TERMINATING;
pub const FWP_ACTION_CALLOUT_INSPECTION: FWP_ACTION_TYPE =
    0x4 | FWP_ACTION_FLAG_CALLOUT | FWP_ACTION_FLAG_NON_TERMINATING;
pub const FWP_ACTION_CALLOUT_UNKNOWN: FWP_ACTION_TYPE = 0x5 | FWP_ACTION_FLAG_CALLOUT;
pub const FWP_ACTION_CONTINUE: FWP_ACTION_TYPE = 0x6 | FWP_ACTION_FLAG_NON_TERMINATING;
pub const FWP_ACTION_NONE: FWP_ACTION_TYPE = 0x7;
pub const FWP_ACTION_NONE_NO_MATCH: FWP_ACTION_TYPE = 0x8;

/// `FWPS_RIGHT_ACTION_WRITE` (fwpstypes.h): bit of `FWPS_CLASSIFY_OUT0::rights`.
pub const FWPS_RIGHT_ACTION_WRITE: u32 = 0x0000_0001;

/// `FWPS_CLASSIFY_OUT_FLAG_*` (fwpstypes.h): bits of `FWPS_CLASSIFY_OUT0::flags`.
pub const FWPS_CLASSIFY_OUT_FLAG_ABSORB: u32 = 0x0000_0001;
pub const FWPS_CLASSIFY_OUT_FLAG_BUFFER_LIMIT_REACHED: u32 = 0x0000_0002;
pub const FWPS_CLASSIFY_OUT_FLAG_NO_MORE_DATA: u32 = 0x0000_0004;
pub const FWPS_CLASSIFY_OUT_FLAG_ALE_FAST_CACHE_CHECK: u32 = 0x0000_0008;
pub const FWPS_CLASSIFY_OUT_FLAG_ALE_FAST_CACHE_POSSIBLE: u32 = 0x0000_0010;

/// `FWPS_INCOMING_FLAG_*` (fwpstypes.h): bits of `FWPS_INCOMING_METADATA_VALUES0::flags`.
pub const FWPS_INCOMING_FLAG_CACHE_SAFE: u32 = 0x0000_0001;
pub const FWPS_INCOMING_FLAG_ENFORCE_QUERY: u32 = 0x0000_0002;
pub const FWPS_INCOMING_FLAG_ABSORB: u32 = 0x0000_0004;
pub const FWPS_INCOMING_FLAG_CONNECTION_FAILING_INDICATION: u32 = 0x0000_0008;
pub const FWPS_INCOMING_FLAG_MID_STREAM_INSPECTION: u32 = 0x0000_0010;
pub const FWPS_INCOMING_FLAG_RECLASSIFY: u32 = 0x0000_0020;
pub const FWPS_INCOMING_FLAG_IS_LOOSE_SOURCE_FLOW: u32 = 0x0000_0040;
pub const FWPS_INCOMING_FLAG_IS_LOCAL_ONLY_FLOW: u32 = 0x0000_0080;
pub const FWPS_INCOMING_FLAG_RESERVED0: u32 = 0x0000_0100;

/// `FWP_CONDITION_FLAG_*` (fwptypes.h): bits of a layer's `FLAGS` field (an `FWP_UINT32`).
pub const FWP_CONDITION_FLAG_IS_LOOPBACK: u32 = 0x0000_0001;
pub const FWP_CONDITION_FLAG_IS_IPSEC_SECURED: u32 = 0x0000_0002;
pub const FWP_CONDITION_FLAG_IS_REAUTHORIZE: u32 = 0x0000_0004;
pub const FWP_CONDITION_FLAG_IS_WILDCARD_BIND: u32 = 0x0000_0008;
pub const FWP_CONDITION_FLAG_IS_RAW_ENDPOINT: u32 = 0x0000_0010;
pub const FWP_CONDITION_FLAG_IS_FRAGMENT: u32 = 0x0000_0020;
pub const FWP_CONDITION_FLAG_IS_FRAGMENT_GROUP: u32 = 0x0000_0040;
pub const FWP_CONDITION_FLAG_IS_IPSEC_NATT_RECLASSIFY: u32 = 0x0000_0080;
pub const FWP_CONDITION_FLAG_REQUIRES_ALE_CLASSIFY: u32 = 0x0000_0100;
pub const FWP_CONDITION_FLAG_IS_IMPLICIT_BIND: u32 = 0x0000_0200;
pub const FWP_CONDITION_FLAG_IS_REASSEMBLED: u32 = 0x0000_0400;
pub const FWP_CONDITION_FLAG_IS_NAME_APP_SPECIFIED: u32 = 0x0000_4000;
pub const FWP_CONDITION_FLAG_IS_PROMISCUOUS: u32 = 0x0000_8000;
pub const FWP_CONDITION_FLAG_IS_AUTH_FW: u32 = 0x0001_0000;
pub const FWP_CONDITION_FLAG_IS_RECLASSIFY: u32 = 0x0002_0000;
pub const FWP_CONDITION_FLAG_IS_OUTBOUND_PASS_THRU: u32 = 0x0004_0000;
pub const FWP_CONDITION_FLAG_IS_INBOUND_PASS_THRU: u32 = 0x0008_0000;
pub const FWP_CONDITION_FLAG_IS_CONNECTION_REDIRECTED: u32 = 0x0010_0000;
pub const FWP_CONDITION_FLAG_IS_PROXY_CONNECTION: u32 = 0x0020_0000;
pub const FWP_CONDITION_FLAG_IS_APPCONTAINER_LOOPBACK: u32 = 0x0040_0000;
pub const FWP_CONDITION_FLAG_IS_NON_APPCONTAINER_LOOPBACK: u32 = 0x0080_0000;
pub const FWP_CONDITION_FLAG_IS_RESERVED: u32 = 0x0100_0000;
pub const FWP_CONDITION_FLAG_IS_HONORING_POLICY_AUTHORIZE: u32 = 0x0200_0000;

/// `FWP_CONDITION_REAUTHORIZE_REASON_*` (fwptypes.h): bits of a layer's `REAUTHORIZE_REASON`
/// field, present when `FWP_CONDITION_FLAG_IS_REAUTHORIZE` is set.
pub const FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE: u32 = 0x0000_0001;
pub const FWP_CONDITION_REAUTHORIZE_REASON_NEW_ARRIVAL_INTERFACE: u32 = 0x0000_0002;
pub const FWP_CONDITION_REAUTHORIZE_REASON_NEW_NEXTHOP_INTERFACE: u32 = 0x0000_0004;
pub const FWP_CONDITION_REAUTHORIZE_REASON_PROFILE_CROSSING: u32 = 0x0000_0008;
pub const FWP_CONDITION_REAUTHORIZE_REASON_CLASSIFY_COMPLETION: u32 = 0x0000_0010;
pub const FWP_CONDITION_REAUTHORIZE_REASON_IPSEC_PROPERTIES_CHANGED: u32 = 0x0000_0020;
pub const FWP_CONDITION_REAUTHORIZE_REASON_MID_STREAM_INSPECTION: u32 = 0x0000_0040;
pub const FWP_CONDITION_REAUTHORIZE_REASON_SOCKET_PROPERTY_CHANGED: u32 = 0x0000_0080;
pub const FWP_CONDITION_REAUTHORIZE_REASON_NEW_INBOUND_MCAST_BCAST_PACKET: u32 = 0x0000_0100;
pub const FWP_CONDITION_REAUTHORIZE_REASON_EDP_POLICY_CHANGED: u32 = 0x0000_0200;
pub const FWP_CONDITION_REAUTHORIZE_REASON_PROXY_HANDLE_CHANGED: u32 = 0x0000_4000;
pub const FWP_CONDITION_REAUTHORIZE_REASON_CHECK_OFFLOAD: u32 = 0x0001_0000;

/// `FWP_CALLOUT_FLAG_*` (fwptypes.h): bits of `FWPS_CALLOUT3::flags`. (The WDK defines no
/// `FWPS_CALLOUT_FLAG_*`; these are the flags `FwpsCalloutRegister3` takes.)
pub const FWP_CALLOUT_FLAG_CONDITIONAL_ON_FLOW: u32 = 0x0000_0001;
pub const FWP_CALLOUT_FLAG_ALLOW_OFFLOAD: u32 = 0x0000_0002;
pub const FWP_CALLOUT_FLAG_ENABLE_COMMIT_ADD_NOTIFY: u32 = 0x0000_0004;
pub const FWP_CALLOUT_FLAG_ALLOW_MID_STREAM_INSPECTION: u32 = 0x0000_0008;
pub const FWP_CALLOUT_FLAG_ALLOW_RECLASSIFY: u32 = 0x0000_0010;
pub const FWP_CALLOUT_FLAG_RESERVED1: u32 = 0x0000_0020;
pub const FWP_CALLOUT_FLAG_ALLOW_RSC: u32 = 0x0000_0040;
pub const FWP_CALLOUT_FLAG_ALLOW_L2_BATCH_CLASSIFY: u32 = 0x0000_0080;
pub const FWP_CALLOUT_FLAG_ALLOW_USO: u32 = 0x0000_0100;
pub const FWP_CALLOUT_FLAG_ALLOW_URO: u32 = 0x0000_0200;
pub const FWP_CALLOUT_FLAG_RESERVED2: u32 = 0x0000_0400;

/// `FWPS_FILTER_FLAG_*` (fwpstypes.h): bits of `FWPS_FILTER3::flags` (a `UINT16`).
pub const FWPS_FILTER_FLAG_CLEAR_ACTION_RIGHT: u16 = 0x0001;
pub const FWPS_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED: u16 = 0x0002;
pub const FWPS_FILTER_FLAG_OR_CONDITIONS: u16 = 0x0004;
pub const FWPS_FILTER_FLAG_HAS_SECURITY_REALM_PROVIDER_CONTEXT: u16 = 0x0008;
pub const FWPS_FILTER_FLAG_SILENT_MODE: u16 = 0x0010;
pub const FWPS_FILTER_FLAG_IPSEC_NO_ACQUIRE_INITIATE: u16 = 0x0020;
pub const FWPS_FILTER_FLAG_RESERVED0: u16 = 0x0040;
pub const FWPS_FILTER_FLAG_RESERVED1: u16 = 0x0080;

/// `FWPS_METADATA_FIELD_*` (fwpsk.h): bits of
/// `FWPS_INCOMING_METADATA_VALUES0::currentMetadataValues` saying which members are valid.
pub const FWPS_METADATA_FIELD_DISCARD_REASON: u32 = 0x0000_0001;
pub const FWPS_METADATA_FIELD_FLOW_HANDLE: u32 = 0x0000_0002;
pub const FWPS_METADATA_FIELD_IP_HEADER_SIZE: u32 = 0x0000_0004;
pub const FWPS_METADATA_FIELD_PROCESS_PATH: u32 = 0x0000_0008;
pub const FWPS_METADATA_FIELD_TOKEN: u32 = 0x0000_0010;
pub const FWPS_METADATA_FIELD_PROCESS_ID: u32 = 0x0000_0020;
pub const FWPS_METADATA_FIELD_SYSTEM_FLAGS: u32 = 0x0000_0040;
pub const FWPS_METADATA_FIELD_RESERVED: u32 = 0x0000_0080;
pub const FWPS_METADATA_FIELD_SOURCE_INTERFACE_INDEX: u32 = 0x0000_0100;
pub const FWPS_METADATA_FIELD_DESTINATION_INTERFACE_INDEX: u32 = 0x0000_0200;
pub const FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE: u32 = 0x0000_0400;
pub const FWPS_METADATA_FIELD_COMPARTMENT_ID: u32 = 0x0000_0800;
pub const FWPS_METADATA_FIELD_FRAGMENT_DATA: u32 = 0x0000_1000;
pub const FWPS_METADATA_FIELD_PATH_MTU: u32 = 0x0000_2000;
pub const FWPS_METADATA_FIELD_COMPLETION_HANDLE: u32 = 0x0000_4000;
pub const FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE: u32 = 0x0000_8000;
pub const FWPS_METADATA_FIELD_TRANSPORT_CONTROL_DATA: u32 = 0x0001_0000;
pub const FWPS_METADATA_FIELD_REMOTE_SCOPE_ID: u32 = 0x0002_0000;
pub const FWPS_METADATA_FIELD_PACKET_DIRECTION: u32 = 0x0004_0000;
pub const FWPS_METADATA_FIELD_PACKET_SYSTEM_CRITICAL: u32 = 0x0008_0000;
pub const FWPS_METADATA_FIELD_FORWARD_LAYER_OUTBOUND_PASS_THRU: u32 = 0x0010_0000;
pub const FWPS_METADATA_FIELD_FORWARD_LAYER_INBOUND_PASS_THRU: u32 = 0x0020_0000;
pub const FWPS_METADATA_FIELD_ALE_CLASSIFY_REQUIRED: u32 = 0x0040_0000;
pub const FWPS_METADATA_FIELD_TRANSPORT_HEADER_INCLUDE_HEADER: u32 = 0x0080_0000;
pub const FWPS_METADATA_FIELD_DESTINATION_PREFIX: u32 = 0x0100_0000;
pub const FWPS_METADATA_FIELD_ETHER_FRAME_LENGTH: u32 = 0x0200_0000;
pub const FWPS_METADATA_FIELD_PARENT_ENDPOINT_HANDLE: u32 = 0x0400_0000;
pub const FWPS_METADATA_FIELD_ICMP_ID_AND_SEQUENCE: u32 = 0x0800_0000;
pub const FWPS_METADATA_FIELD_LOCAL_REDIRECT_TARGET_PID: u32 = 0x1000_0000;
pub const FWPS_METADATA_FIELD_ORIGINAL_DESTINATION: u32 = 0x2000_0000;
pub const FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE: u32 = 0x4000_0000;
pub const FWPS_METADATA_FIELD_SUB_PROCESS_TAG: u32 = 0x8000_0000;

/// `FWPS_L2_METADATA_FIELD_*` (fwpsk.h): bits of
/// `FWPS_INCOMING_METADATA_VALUES0::currentL2MetadataValues`.
pub const FWPS_L2_METADATA_FIELD_ETHERNET_MAC_HEADER_SIZE: u32 = 0x0000_0001;
pub const FWPS_L2_METADATA_FIELD_WIFI_OPERATION_MODE: u32 = 0x0000_0002;
pub const FWPS_L2_METADATA_FIELD_VSWITCH_SOURCE_PORT_ID: u32 = 0x0000_0004;
pub const FWPS_L2_METADATA_FIELD_VSWITCH_SOURCE_NIC_INDEX: u32 = 0x0000_0008;
pub const FWPS_L2_METADATA_FIELD_VSWITCH_PACKET_CONTEXT: u32 = 0x0000_0010;
pub const FWPS_L2_METADATA_FIELD_VSWITCH_DESTINATION_PORT_ID: u32 = 0x0000_0020;
pub const FWPS_L2_METADATA_FIELD_RESERVED: u32 = 0x8000_0000;

/// `FWPM_SESSION_FLAG_*` (fwpmtypes.h).
pub const FWPM_SESSION_FLAG_DYNAMIC: u32 = 0x0000_0001;
pub const FWPM_SESSION_FLAG_RESERVED: u32 = 0x1000_0000;

/// `FWPM_PROVIDER_FLAG_*` (fwpmtypes.h).
pub const FWPM_PROVIDER_FLAG_PERSISTENT: u32 = 0x0000_0001;
pub const FWPM_PROVIDER_FLAG_DISABLED: u32 = 0x0000_0010;

/// `FWPM_SUBLAYER_FLAG_*` (fwpmtypes.h).
pub const FWPM_SUBLAYER_FLAG_PERSISTENT: u32 = 0x0000_0001;

/// `FWPM_CALLOUT_FLAG_*` (fwpmtypes.h).
pub const FWPM_CALLOUT_FLAG_PERSISTENT: u32 = 0x0001_0000;
pub const FWPM_CALLOUT_FLAG_USES_PROVIDER_CONTEXT: u32 = 0x0002_0000;
pub const FWPM_CALLOUT_FLAG_REGISTERED: u32 = 0x0004_0000;

/// `FWPM_FILTER_FLAG_*` (fwpmtypes.h).
pub const FWPM_FILTER_FLAG_NONE: u32 = 0x0000_0000;
pub const FWPM_FILTER_FLAG_PERSISTENT: u32 = 0x0000_0001;
pub const FWPM_FILTER_FLAG_BOOTTIME: u32 = 0x0000_0002;
pub const FWPM_FILTER_FLAG_HAS_PROVIDER_CONTEXT: u32 = 0x0000_0004;
pub const FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT: u32 = 0x0000_0008;
pub const FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED: u32 = 0x0000_0010;
pub const FWPM_FILTER_FLAG_DISABLED: u32 = 0x0000_0020;
pub const FWPM_FILTER_FLAG_INDEXED: u32 = 0x0000_0040;
pub const FWPM_FILTER_FLAG_HAS_SECURITY_REALM_PROVIDER_CONTEXT: u32 = 0x0000_0080;
pub const FWPM_FILTER_FLAG_SYSTEMOS_ONLY: u32 = 0x0000_0100;
pub const FWPM_FILTER_FLAG_GAMEOS_ONLY: u32 = 0x0000_0200;
pub const FWPM_FILTER_FLAG_SILENT_MODE: u32 = 0x0000_0400;
pub const FWPM_FILTER_FLAG_IPSEC_NO_ACQUIRE_INITIATE: u32 = 0x0000_0800;
pub const FWPM_FILTER_FLAG_RESERVED0: u32 = 0x0000_1000;
pub const FWPM_FILTER_FLAG_RESERVED1: u32 = 0x0000_2000;

// ---------------------------------------------------------------------------------------------
// Runtime layer ids: FWPS_BUILTIN_LAYERS (fwpsk.h), the `layerId` a callout sees.
//
// The C type is an enum, but every place the id appears in an ABI (`FWPS_INCOMING_VALUES0`,
// `FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0`, `FwpsFlowAssociateContext0`) is a UINT16, so the
// constants are `u16`. Ids 0..=81 hold for NTDDI_WINBLUE and later (58/59 are named
// RESERVED1_V4/V6 when compiling for exactly NTDDI_WIN7). All ids below are <= 81; nothing
// above 81 is defined here on purpose (see the module documentation).
// ---------------------------------------------------------------------------------------------

pub const FWPS_LAYER_INBOUND_IPPACKET_V4: u16 = 0;
pub const FWPS_LAYER_INBOUND_IPPACKET_V4_DISCARD: u16 = 1;
pub const FWPS_LAYER_INBOUND_IPPACKET_V6: u16 = 2;
pub const FWPS_LAYER_INBOUND_IPPACKET_V6_DISCARD: u16 = 3;
pub const FWPS_LAYER_OUTBOUND_IPPACKET_V4: u16 = 4;
pub const FWPS_LAYER_OUTBOUND_IPPACKET_V4_DISCARD: u16 = 5;
pub const FWPS_LAYER_OUTBOUND_IPPACKET_V6: u16 = 6;
pub const FWPS_LAYER_OUTBOUND_IPPACKET_V6_DISCARD: u16 = 7;
pub const FWPS_LAYER_IPFORWARD_V4: u16 = 8;
pub const FWPS_LAYER_IPFORWARD_V4_DISCARD: u16 = 9;
pub const FWPS_LAYER_IPFORWARD_V6: u16 = 10;
pub const FWPS_LAYER_IPFORWARD_V6_DISCARD: u16 = 11;
pub const FWPS_LAYER_INBOUND_TRANSPORT_V4: u16 = 12;
pub const FWPS_LAYER_INBOUND_TRANSPORT_V4_DISCARD: u16 = 13;
pub const FWPS_LAYER_INBOUND_TRANSPORT_V6: u16 = 14;
pub const FWPS_LAYER_INBOUND_TRANSPORT_V6_DISCARD: u16 = 15;
pub const FWPS_LAYER_OUTBOUND_TRANSPORT_V4: u16 = 16;
pub const FWPS_LAYER_OUTBOUND_TRANSPORT_V4_DISCARD: u16 = 17;
pub const FWPS_LAYER_OUTBOUND_TRANSPORT_V6: u16 = 18;
pub const FWPS_LAYER_OUTBOUND_TRANSPORT_V6_DISCARD: u16 = 19;
pub const FWPS_LAYER_STREAM_V4: u16 = 20;
pub const FWPS_LAYER_STREAM_V4_DISCARD: u16 = 21;
pub const FWPS_LAYER_STREAM_V6: u16 = 22;
pub const FWPS_LAYER_STREAM_V6_DISCARD: u16 = 23;
pub const FWPS_LAYER_DATAGRAM_DATA_V4: u16 = 24;
pub const FWPS_LAYER_DATAGRAM_DATA_V4_DISCARD: u16 = 25;
pub const FWPS_LAYER_DATAGRAM_DATA_V6: u16 = 26;
pub const FWPS_LAYER_DATAGRAM_DATA_V6_DISCARD: u16 = 27;
pub const FWPS_LAYER_INBOUND_ICMP_ERROR_V4: u16 = 28;
pub const FWPS_LAYER_INBOUND_ICMP_ERROR_V4_DISCARD: u16 = 29;
pub const FWPS_LAYER_INBOUND_ICMP_ERROR_V6: u16 = 30;
pub const FWPS_LAYER_INBOUND_ICMP_ERROR_V6_DISCARD: u16 = 31;
pub const FWPS_LAYER_OUTBOUND_ICMP_ERROR_V4: u16 = 32;
pub const FWPS_LAYER_OUTBOUND_ICMP_ERROR_V4_DISCARD: u16 = 33;
pub const FWPS_LAYER_OUTBOUND_ICMP_ERROR_V6: u16 = 34;
pub const FWPS_LAYER_OUTBOUND_ICMP_ERROR_V6_DISCARD: u16 = 35;
pub const FWPS_LAYER_ALE_RESOURCE_ASSIGNMENT_V4: u16 = 36;
pub const FWPS_LAYER_ALE_RESOURCE_ASSIGNMENT_V4_DISCARD: u16 = 37;
pub const FWPS_LAYER_ALE_RESOURCE_ASSIGNMENT_V6: u16 = 38;
pub const FWPS_LAYER_ALE_RESOURCE_ASSIGNMENT_V6_DISCARD: u16 = 39;
pub const FWPS_LAYER_ALE_AUTH_LISTEN_V4: u16 = 40;
pub const FWPS_LAYER_ALE_AUTH_LISTEN_V4_DISCARD: u16 = 41;
pub const FWPS_LAYER_ALE_AUTH_LISTEN_V6: u16 = 42;
pub const FWPS_LAYER_ALE_AUTH_LISTEN_V6_DISCARD: u16 = 43;
pub const FWPS_LAYER_ALE_AUTH_RECV_ACCEPT_V4: u16 = 44;
pub const FWPS_LAYER_ALE_AUTH_RECV_ACCEPT_V4_DISCARD: u16 = 45;
pub const FWPS_LAYER_ALE_AUTH_RECV_ACCEPT_V6: u16 = 46;
pub const FWPS_LAYER_ALE_AUTH_RECV_ACCEPT_V6_DISCARD: u16 = 47;
pub const FWPS_LAYER_ALE_AUTH_CONNECT_V4: u16 = 48;
pub const FWPS_LAYER_ALE_AUTH_CONNECT_V4_DISCARD: u16 = 49;
pub const FWPS_LAYER_ALE_AUTH_CONNECT_V6: u16 = 50;
pub const FWPS_LAYER_ALE_AUTH_CONNECT_V6_DISCARD: u16 = 51;
pub const FWPS_LAYER_ALE_FLOW_ESTABLISHED_V4: u16 = 52;
pub const FWPS_LAYER_ALE_FLOW_ESTABLISHED_V4_DISCARD: u16 = 53;
pub const FWPS_LAYER_ALE_FLOW_ESTABLISHED_V6: u16 = 54;
pub const FWPS_LAYER_ALE_FLOW_ESTABLISHED_V6_DISCARD: u16 = 55;
pub const FWPS_LAYER_INBOUND_MAC_FRAME_ETHERNET: u16 = 56;
pub const FWPS_LAYER_OUTBOUND_MAC_FRAME_ETHERNET: u16 = 57;
pub const FWPS_LAYER_INBOUND_MAC_FRAME_NATIVE: u16 = 58;
pub const FWPS_LAYER_OUTBOUND_MAC_FRAME_NATIVE: u16 = 59;
pub const FWPS_LAYER_NAME_RESOLUTION_CACHE_V4: u16 = 60;
pub const FWPS_LAYER_NAME_RESOLUTION_CACHE_V6: u16 = 61;
pub const FWPS_LAYER_ALE_RESOURCE_RELEASE_V4: u16 = 62;
pub const FWPS_LAYER_ALE_RESOURCE_RELEASE_V6: u16 = 63;
pub const FWPS_LAYER_ALE_ENDPOINT_CLOSURE_V4: u16 = 64;
pub const FWPS_LAYER_ALE_ENDPOINT_CLOSURE_V6: u16 = 65;
pub const FWPS_LAYER_ALE_CONNECT_REDIRECT_V4: u16 = 66;
pub const FWPS_LAYER_ALE_CONNECT_REDIRECT_V6: u16 = 67;
pub const FWPS_LAYER_ALE_BIND_REDIRECT_V4: u16 = 68;
pub const FWPS_LAYER_ALE_BIND_REDIRECT_V6: u16 = 69;
pub const FWPS_LAYER_STREAM_PACKET_V4: u16 = 70;
pub const FWPS_LAYER_STREAM_PACKET_V6: u16 = 71;
pub const FWPS_LAYER_INGRESS_VSWITCH_ETHERNET: u16 = 72;
pub const FWPS_LAYER_EGRESS_VSWITCH_ETHERNET: u16 = 73;
pub const FWPS_LAYER_INGRESS_VSWITCH_TRANSPORT_V4: u16 = 74;
pub const FWPS_LAYER_INGRESS_VSWITCH_TRANSPORT_V6: u16 = 75;
pub const FWPS_LAYER_EGRESS_VSWITCH_TRANSPORT_V4: u16 = 76;
pub const FWPS_LAYER_EGRESS_VSWITCH_TRANSPORT_V6: u16 = 77;
pub const FWPS_LAYER_INBOUND_TRANSPORT_FAST: u16 = 78;
pub const FWPS_LAYER_OUTBOUND_TRANSPORT_FAST: u16 = 79;
pub const FWPS_LAYER_INBOUND_MAC_FRAME_NATIVE_FAST: u16 = 80;
pub const FWPS_LAYER_OUTBOUND_MAC_FRAME_NATIVE_FAST: u16 = 81;

// ---------------------------------------------------------------------------------------------
// Security types (winnt.h), only as pointer targets.
// ---------------------------------------------------------------------------------------------

/// `SID` (winnt.h). Variable-length; only ever handled by pointer here.
#[repr(C)]
pub struct SID {
    _opaque: [u8; 0],
}

/// `SID_AND_ATTRIBUTES` (winnt.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SID_AND_ATTRIBUTES {
    pub Sid: *mut SID,
    pub Attributes: u32,
}

// ---------------------------------------------------------------------------------------------
// Values (fwptypes.h).
// ---------------------------------------------------------------------------------------------

/// `FWP_BYTE_ARRAY6` (fwptypes.h): a MAC address.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FWP_BYTE_ARRAY6 {
    pub byteArray6: [u8; 6],
}

/// `FWP_BYTE_ARRAY16` (fwptypes.h): an IPv6 address, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FWP_BYTE_ARRAY16 {
    pub byteArray16: [u8; 16],
}

/// `FWP_BITMAP_ARRAY64` (fwptypes.h of the SDK releases that have `FWP_BITMAP_ARRAY64_TYPE`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FWP_BITMAP_ARRAY64 {
    pub bitmapArray64: [u8; 8],
}

/// `FWP_BYTE_BLOB` (fwptypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWP_BYTE_BLOB {
    pub size: u32,
    pub data: *mut u8,
}

/// `FWP_TOKEN_INFORMATION` (fwptypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWP_TOKEN_INFORMATION {
    pub sidCount: u32,
    pub sids: *mut SID_AND_ATTRIBUTES,
    pub restrictedSidCount: u32,
    pub restrictedSids: *mut SID_AND_ATTRIBUTES,
}

/// The anonymous union of `FWP_VALUE0` (fwptypes.h). The 64-bit integer and double arms are
/// *pointers*; only the arms up to 32 bits (and `float32`) are stored inline.
#[repr(C)]
#[derive(Clone, Copy)]
pub union FWP_VALUE0_u {
    pub uint8: u8,
    pub uint16: u16,
    pub uint32: u32,
    pub uint64: *mut u64,
    pub int8: i8,
    pub int16: i16,
    pub int32: i32,
    pub int64: *mut i64,
    pub float32: f32,
    pub double64: *mut f64,
    pub byteArray16: *mut FWP_BYTE_ARRAY16,
    pub byteBlob: *mut FWP_BYTE_BLOB,
    pub sid: *mut SID,
    pub sd: *mut FWP_BYTE_BLOB,
    pub tokenInformation: *mut FWP_TOKEN_INFORMATION,
    pub tokenAccessInformation: *mut FWP_BYTE_BLOB,
    /// `LPWSTR`: NUL-terminated UTF-16.
    pub unicodeString: *mut u16,
    pub byteArray6: *mut FWP_BYTE_ARRAY6,
    pub bitmapArray64: *mut FWP_BITMAP_ARRAY64,
}

/// `FWP_VALUE0` (fwptypes.h): a tagged value; `type` selects the arm of `u`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWP_VALUE0 {
    pub r#type: FWP_DATA_TYPE,
    pub u: FWP_VALUE0_u,
}

/// `FWP_V4_ADDR_AND_MASK` (fwptypes.h), host byte order.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FWP_V4_ADDR_AND_MASK {
    pub addr: u32,
    pub mask: u32,
}

/// `FWP_V6_ADDR_AND_MASK` (fwptypes.h).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FWP_V6_ADDR_AND_MASK {
    pub addr: [u8; 16],
    pub prefixLength: u8,
}

/// `FWP_RANGE0` (fwptypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWP_RANGE0 {
    pub valueLow: FWP_VALUE0,
    pub valueHigh: FWP_VALUE0,
}

/// The anonymous union of `FWP_CONDITION_VALUE0` (fwptypes.h): the `FWP_VALUE0` arms plus
/// address/mask and range pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub union FWP_CONDITION_VALUE0_u {
    pub uint8: u8,
    pub uint16: u16,
    pub uint32: u32,
    pub uint64: *mut u64,
    pub int8: i8,
    pub int16: i16,
    pub int32: i32,
    pub int64: *mut i64,
    pub float32: f32,
    pub double64: *mut f64,
    pub byteArray16: *mut FWP_BYTE_ARRAY16,
    pub byteBlob: *mut FWP_BYTE_BLOB,
    pub sid: *mut SID,
    pub sd: *mut FWP_BYTE_BLOB,
    pub tokenInformation: *mut FWP_TOKEN_INFORMATION,
    pub tokenAccessInformation: *mut FWP_BYTE_BLOB,
    pub unicodeString: *mut u16,
    pub byteArray6: *mut FWP_BYTE_ARRAY6,
    pub bitmapArray64: *mut FWP_BITMAP_ARRAY64,
    pub v4AddrMask: *mut FWP_V4_ADDR_AND_MASK,
    pub v6AddrMask: *mut FWP_V6_ADDR_AND_MASK,
    pub rangeValue: *mut FWP_RANGE0,
}

/// `FWP_CONDITION_VALUE0` (fwptypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWP_CONDITION_VALUE0 {
    pub r#type: FWP_DATA_TYPE,
    pub u: FWP_CONDITION_VALUE0_u,
}

/// `FWPM_DISPLAY_DATA0` (fwptypes.h). Strings are NUL-terminated UTF-16 (`wchar_t*` on Windows).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_DISPLAY_DATA0 {
    pub name: *mut u16,
    pub description: *mut u16,
}

// ---------------------------------------------------------------------------------------------
// Socket addresses and friends (ws2def.h, inaddr.h, in6addr.h, ws2ipdef.h, netioapi.h), as
// embedded in or pointed to by FWPS_INCOMING_METADATA_VALUES0.
// ---------------------------------------------------------------------------------------------

/// `ADDRESS_FAMILY` (ws2def.h).
pub type ADDRESS_FAMILY = u16;
pub const AF_UNSPEC: ADDRESS_FAMILY = 0;
pub const AF_INET: ADDRESS_FAMILY = 2;
pub const AF_INET6: ADDRESS_FAMILY = 23;

/// `SCOPE_ID` (ws2def.h): a union of `Value` with the bit fields `Zone` (bits 0..28) and
/// `Level` (bits 28..32), modelled as the `ULONG` it is.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SCOPE_ID {
    pub Value: u32,
}

/// The `S_un` union of `IN_ADDR` (inaddr.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub union IN_ADDR_u {
    pub S_un_b: [u8; 4],
    pub S_un_w: [u16; 2],
    pub S_addr: u32,
}

/// `IN_ADDR` (inaddr.h), network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IN_ADDR {
    pub S_un: IN_ADDR_u,
}

/// The `u` union of `IN6_ADDR` (in6addr.h); its `Word` arm makes the type 2-byte aligned.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IN6_ADDR_u {
    pub Byte: [u8; 16],
    pub Word: [u16; 8],
}

/// `IN6_ADDR` (in6addr.h), network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IN6_ADDR {
    pub u: IN6_ADDR_u,
}

/// `SOCKADDR` (ws2def.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SOCKADDR {
    pub sa_family: ADDRESS_FAMILY,
    pub sa_data: [i8; 14],
}

/// `SOCKADDR_IN` (ws2def.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SOCKADDR_IN {
    pub sin_family: ADDRESS_FAMILY,
    pub sin_port: u16,
    pub sin_addr: IN_ADDR,
    pub sin_zero: [i8; 8],
}

/// The anonymous scope-id union of `SOCKADDR_IN6` (ws2ipdef.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub union SOCKADDR_IN6_u {
    pub sin6_scope_id: u32,
    pub sin6_scope_struct: SCOPE_ID,
}

/// `SOCKADDR_IN6` (ws2ipdef.h; `SOCKADDR_IN6_LH` for Vista and later).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SOCKADDR_IN6 {
    pub sin6_family: ADDRESS_FAMILY,
    pub sin6_port: u16,
    pub sin6_flowinfo: u32,
    pub sin6_addr: IN6_ADDR,
    pub u: SOCKADDR_IN6_u,
}

/// `SOCKADDR_INET` (ws2ipdef.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub union SOCKADDR_INET {
    pub Ipv4: SOCKADDR_IN,
    pub Ipv6: SOCKADDR_IN6,
    pub si_family: ADDRESS_FAMILY,
}

/// `SOCKADDR_STORAGE` (ws2def.h; `SOCKADDR_STORAGE_LH`): room for any socket address, 8-byte
/// aligned. `ss_family` says which `SOCKADDR_*` the bytes hold.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SOCKADDR_STORAGE {
    pub ss_family: ADDRESS_FAMILY,
    pub __ss_pad1: [i8; 6],
    pub __ss_align: i64,
    pub __ss_pad2: [i8; 112],
}

/// `FWPS_CONNECT_REQUEST0` (fwpsk.h, the `NTDDI_WIN8` and later branch): `layerData` at
/// ALE_CONNECT_REDIRECT, and the writable copy `FwpsAcquireWritableLayerDataPointer0` returns
/// there. `previousVersion` and `modifierFilterId` are the modification history (read-only).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_CONNECT_REQUEST0 {
    pub localAddressAndPort: SOCKADDR_STORAGE,
    pub remoteAddressAndPort: SOCKADDR_STORAGE,
    pub portReservationToken: u64,
    pub localRedirectTargetPID: u32,
    pub previousVersion: *mut FWPS_CONNECT_REQUEST0,
    pub modifierFilterId: u64,
    pub localRedirectHandle: *mut c_void,
    pub localRedirectContext: *mut c_void,
    pub localRedirectContextSize: usize,
}

/// `FWPS_BIND_REQUEST0` (fwpsk.h): `layerData` at ALE_BIND_REDIRECT, and the writable copy
/// `FwpsAcquireWritableLayerDataPointer0` returns there.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_BIND_REQUEST0 {
    pub localAddressAndPort: SOCKADDR_STORAGE,
    pub portReservationToken: u64,
    pub previousVersion: *mut FWPS_BIND_REQUEST0,
    pub modifierFilterId: u64,
}

/// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` (fwpsk.h): for
/// `FwpsApplyModifiedLayerData0` after a pended classify only.
pub const FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS: u32 = 0x0000_0001;

/// `FWPS_CONNECTION_REDIRECT_STATE` (fwpsk.h, `NTDDI_WIN8` and later): what
/// `FwpsQueryConnectionRedirectState0` says of a connection, relative to a redirect handle.
pub type FWPS_CONNECTION_REDIRECT_STATE = i32;
pub const FWPS_CONNECTION_NOT_REDIRECTED: FWPS_CONNECTION_REDIRECT_STATE = 0;
pub const FWPS_CONNECTION_REDIRECTED_BY_SELF: FWPS_CONNECTION_REDIRECT_STATE = 1;
pub const FWPS_CONNECTION_REDIRECTED_BY_OTHER: FWPS_CONNECTION_REDIRECT_STATE = 2;
pub const FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF: FWPS_CONNECTION_REDIRECT_STATE = 3;
pub const FWPS_CONNECTION_REDIRECT_STATE_MAX: FWPS_CONNECTION_REDIRECT_STATE = 4;

/// `IP_ADDRESS_PREFIX` (netioapi.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IP_ADDRESS_PREFIX {
    pub Prefix: SOCKADDR_INET,
    pub PrefixLength: u8,
}

/// `WSACMSGHDR` (ws2def.h), followed in memory by the control data.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSACMSGHDR {
    pub cmsg_len: usize,
    pub cmsg_level: i32,
    pub cmsg_type: i32,
}

/// `NDIS_SWITCH_PORT_ID` (ntddndis.h).
pub type NDIS_SWITCH_PORT_ID = u32;
/// `NDIS_SWITCH_NIC_INDEX` (ntddndis.h).
pub type NDIS_SWITCH_NIC_INDEX = u16;

// ---------------------------------------------------------------------------------------------
// Callout runtime types (fwpstypes.h, fwpsk.h).
// ---------------------------------------------------------------------------------------------

/// `FWPS_INCOMING_VALUE0` (fwpstypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_INCOMING_VALUE0 {
    pub value: FWP_VALUE0,
}

/// `FWPS_INCOMING_VALUES0` (fwpstypes.h): the layer's data fields, indexed by
/// `FWPS_FIELD_<LAYER>_<FIELD>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_INCOMING_VALUES0 {
    pub layerId: u16,
    pub valueCount: u32,
    pub incomingValue: *mut FWPS_INCOMING_VALUE0,
}

/// `FWPS_DISCARD_METADATA0` (fwpstypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_DISCARD_METADATA0 {
    pub discardModule: FWPS_DISCARD_MODULE0,
    pub discardReason: u32,
    pub filterId: u64,
}

/// `FWPS_INBOUND_FRAGMENT_METADATA0` (fwpstypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_INBOUND_FRAGMENT_METADATA0 {
    pub fragmentIdentification: u32,
    pub fragmentOffset: u16,
    pub fragmentLength: u32,
}

/// `FWPS_INCOMING_METADATA_VALUES0` (fwpsk.h), the full structure as compiled for
/// `NTDDI_WIN8` and later. A member is valid only if its `FWPS_METADATA_FIELD_*` bit (or
/// `FWPS_L2_METADATA_FIELD_*` bit) is set.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_INCOMING_METADATA_VALUES0 {
    pub currentMetadataValues: u32,
    pub flags: u32,
    pub reserved: u64,
    pub discardMetadata: FWPS_DISCARD_METADATA0,
    pub flowHandle: u64,
    pub ipHeaderSize: u32,
    pub transportHeaderSize: u32,
    pub processPath: *mut FWP_BYTE_BLOB,
    pub token: u64,
    pub processId: u64,
    pub sourceInterfaceIndex: u32,
    pub destinationInterfaceIndex: u32,
    pub compartmentId: u32,
    pub fragmentMetadata: FWPS_INBOUND_FRAGMENT_METADATA0,
    pub pathMtu: u32,
    /// `HANDLE`.
    pub completionHandle: *mut c_void,
    pub transportEndpointHandle: u64,
    pub remoteScopeId: SCOPE_ID,
    pub controlData: *mut WSACMSGHDR,
    pub controlDataLength: u32,
    pub packetDirection: FWP_DIRECTION,
    pub headerIncludeHeader: *mut c_void,
    pub headerIncludeHeaderLength: u32,
    pub destinationPrefix: IP_ADDRESS_PREFIX,
    pub frameLength: u16,
    pub parentEndpointHandle: u64,
    pub icmpIdAndSequence: u32,
    pub localRedirectTargetPID: u32,
    pub originalDestination: *mut SOCKADDR,
    /// `HANDLE`.
    pub redirectRecords: *mut c_void,
    pub currentL2MetadataValues: u32,
    pub l2Flags: u32,
    pub ethernetMacHeaderSize: u32,
    pub wiFiOperationMode: u32,
    // With NDIS_SUPPORT_NDIS630 unset these three are `UINT32 padding0; USHORT padding1;
    // UINT32 padding2;`: the same layout.
    pub vSwitchSourcePortId: NDIS_SWITCH_PORT_ID,
    pub vSwitchSourceNicIndex: NDIS_SWITCH_NIC_INDEX,
    pub vSwitchDestinationPortId: NDIS_SWITCH_PORT_ID,
    /// `HANDLE`.
    pub vSwitchPacketContext: *mut c_void,
    pub subProcessTag: *mut c_void,
    pub reserved1: u64,
}

/// `FWPS_CLASSIFY_OUT0` (fwpstypes.h): the callout's decision.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_CLASSIFY_OUT0 {
    pub actionType: FWP_ACTION_TYPE,
    pub outContext: u64,
    pub filterId: u64,
    pub rights: u32,
    pub flags: u32,
    pub reserved: u32,
}

/// `FWPS_ACTION0` (fwpstypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_ACTION0 {
    pub r#type: FWP_ACTION_TYPE,
    pub calloutId: u32,
}

/// `FWPS_FILTER_CONDITION0` (fwpstypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_FILTER_CONDITION0 {
    pub fieldId: u16,
    pub reserved: u16,
    pub matchType: FWP_MATCH_TYPE,
    pub conditionValue: FWP_CONDITION_VALUE0,
}

/// `FWPM_PROVIDER_CONTEXT3` (fwpmtypes.h), only ever handled by pointer here.
#[repr(C)]
pub struct FWPM_PROVIDER_CONTEXT3 {
    _opaque: [u8; 0],
}

/// `FWPS_FILTER3` (fwpstypes.h). `FWPS_FILTER0`..`2` have the same members and layout; they
/// differ only in the type `providerContext` points to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_FILTER3 {
    pub filterId: u64,
    pub weight: FWP_VALUE0,
    pub subLayerWeight: u16,
    pub flags: u16,
    pub numFilterConditions: u32,
    pub filterCondition: *mut FWPS_FILTER_CONDITION0,
    pub action: FWPS_ACTION0,
    pub context: u64,
    pub providerContext: *mut FWPM_PROVIDER_CONTEXT3,
}

/// `FWPS_CALLOUT_CLASSIFY_FN3` (fwpsk.h).
pub type FWPS_CALLOUT_CLASSIFY_FN3 = Option<
    unsafe extern "system" fn(
        inFixedValues: *const FWPS_INCOMING_VALUES0,
        inMetaValues: *const FWPS_INCOMING_METADATA_VALUES0,
        layerData: *mut c_void,
        classifyContext: *const c_void,
        filter: *const FWPS_FILTER3,
        flowContext: u64,
        classifyOut: *mut FWPS_CLASSIFY_OUT0,
    ),
>;

/// `FWPS_CALLOUT_NOTIFY_FN3` (fwpsk.h).
pub type FWPS_CALLOUT_NOTIFY_FN3 = Option<
    unsafe extern "system" fn(
        notifyType: FWPS_CALLOUT_NOTIFY_TYPE,
        filterKey: *const GUID,
        filter: *mut FWPS_FILTER3,
    ) -> NTSTATUS,
>;

/// `FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0` (fwpsk.h).
pub type FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0 =
    Option<unsafe extern "system" fn(layerId: u16, calloutId: u32, flowContext: u64)>;

/// `FWPS_CALLOUT3` (fwpsk.h): what `FwpsCalloutRegister3` registers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_CALLOUT3 {
    pub calloutKey: GUID,
    /// `FWP_CALLOUT_FLAG_*`.
    pub flags: u32,
    pub classifyFn: FWPS_CALLOUT_CLASSIFY_FN3,
    pub notifyFn: FWPS_CALLOUT_NOTIFY_FN3,
    pub flowDeleteFn: FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0,
}

// ---------------------------------------------------------------------------------------------
// Management types (fwpmtypes.h), for FwpmEngineOpen0 / FwpmCalloutAdd0 / FwpmFilterAdd0 ...
// ---------------------------------------------------------------------------------------------

/// `FWPM_SESSION0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_SESSION0 {
    pub sessionKey: GUID,
    pub displayData: FWPM_DISPLAY_DATA0,
    /// `FWPM_SESSION_FLAG_*`.
    pub flags: u32,
    pub txnWaitTimeoutInMSec: u32,
    pub processId: u32,
    pub sid: *mut SID,
    pub username: *mut u16,
    /// `BOOL`.
    pub kernelMode: i32,
}

/// `FWPM_PROVIDER0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_PROVIDER0 {
    pub providerKey: GUID,
    pub displayData: FWPM_DISPLAY_DATA0,
    /// `FWPM_PROVIDER_FLAG_*`.
    pub flags: u32,
    pub providerData: FWP_BYTE_BLOB,
    pub serviceName: *mut u16,
}

/// `FWPM_SUBLAYER0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_SUBLAYER0 {
    pub subLayerKey: GUID,
    pub displayData: FWPM_DISPLAY_DATA0,
    /// `FWPM_SUBLAYER_FLAG_*`.
    pub flags: u32,
    pub providerKey: *mut GUID,
    pub providerData: FWP_BYTE_BLOB,
    pub weight: u16,
}

/// `FWPM_CALLOUT0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_CALLOUT0 {
    pub calloutKey: GUID,
    pub displayData: FWPM_DISPLAY_DATA0,
    /// `FWPM_CALLOUT_FLAG_*`.
    pub flags: u32,
    pub providerKey: *mut GUID,
    pub providerData: FWP_BYTE_BLOB,
    pub applicableLayer: GUID,
    pub calloutId: u32,
}

/// The anonymous union of `FWPM_ACTION0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub union FWPM_ACTION0_u {
    pub filterType: GUID,
    pub calloutKey: GUID,
}

/// `FWPM_ACTION0` (fwpmtypes.h). 4-byte aligned: the union holds only GUIDs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_ACTION0 {
    pub r#type: FWP_ACTION_TYPE,
    pub u: FWPM_ACTION0_u,
}

/// `FWPM_FILTER_CONDITION0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_FILTER_CONDITION0 {
    pub fieldKey: GUID,
    pub matchType: FWP_MATCH_TYPE,
    pub conditionValue: FWP_CONDITION_VALUE0,
}

/// The anonymous union of `FWPM_FILTER0` (fwpmtypes.h): `providerContextKey` when
/// `FWPM_FILTER_FLAG_HAS_PROVIDER_CONTEXT` is set, `rawContext` otherwise.
#[repr(C)]
#[derive(Clone, Copy)]
pub union FWPM_FILTER0_u {
    pub rawContext: u64,
    pub providerContextKey: GUID,
}

/// `FWPM_FILTER0` (fwpmtypes.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPM_FILTER0 {
    pub filterKey: GUID,
    pub displayData: FWPM_DISPLAY_DATA0,
    /// `FWPM_FILTER_FLAG_*`.
    pub flags: u32,
    pub providerKey: *mut GUID,
    pub providerData: FWP_BYTE_BLOB,
    pub layerKey: GUID,
    pub subLayerKey: GUID,
    pub weight: FWP_VALUE0,
    pub numFilterConditions: u32,
    pub filterCondition: *mut FWPM_FILTER_CONDITION0,
    pub action: FWPM_ACTION0,
    pub u: FWPM_FILTER0_u,
    pub reserved: *mut GUID,
    pub filterId: u64,
    pub effectiveWeight: FWP_VALUE0,
}

// ---------------------------------------------------------------------------------------------
// Pinned to the x64 layouts of WDK 10.0.22621 / SDK 10.0.22000. The numbers were produced by
// compiling the C definitions with fixed-width LLP64 typedefs (gcc -mms-bitfields, x86_64) and
// printing sizeof/offsetof, not by reading them back from these Rust types.
// ---------------------------------------------------------------------------------------------

/// `const_assert_eq!(offset_of!(T, field), offset)` for each listed field.
macro_rules! assert_offsets {
    ($t:ty { $($field:ident: $offset:expr),* $(,)? }) => {
        $(const_assert_eq!(offset_of!($t, $field), $offset);)*
    };
}

// fwptypes.h
assert_eq_size!(FWP_BITMAP_ARRAY64, [u8; 8]);
assert_eq_size!(FWP_BYTE_ARRAY6, [u8; 6]);
assert_eq_size!(FWP_BYTE_ARRAY16, [u8; 16]);
assert_eq_size!(FWP_BYTE_BLOB, [u8; 16]);
assert_offsets!(FWP_BYTE_BLOB { size: 0, data: 8 });
assert_eq_size!(SID_AND_ATTRIBUTES, [u8; 16]);
const_assert_eq!(offset_of!(SID_AND_ATTRIBUTES, Attributes), 8);
assert_eq_size!(FWP_TOKEN_INFORMATION, [u8; 32]);
assert_offsets!(FWP_TOKEN_INFORMATION {
    sids: 8,
    restrictedSidCount: 16,
    restrictedSids: 24,
});
assert_eq_size!(FWP_VALUE0_u, [u8; 8]);
assert_eq_size!(FWP_VALUE0, [u8; 16]);
const_assert_eq!(align_of::<FWP_VALUE0>(), 8);
assert_offsets!(FWP_VALUE0 { r#type: 0, u: 8 });
assert_eq_size!(FWP_V4_ADDR_AND_MASK, [u8; 8]);
const_assert_eq!(offset_of!(FWP_V4_ADDR_AND_MASK, mask), 4);
assert_eq_size!(FWP_V6_ADDR_AND_MASK, [u8; 17]);
const_assert_eq!(offset_of!(FWP_V6_ADDR_AND_MASK, prefixLength), 16);
assert_eq_size!(FWP_RANGE0, [u8; 32]);
const_assert_eq!(offset_of!(FWP_RANGE0, valueHigh), 16);
assert_eq_size!(FWP_CONDITION_VALUE0_u, [u8; 8]);
assert_eq_size!(FWP_CONDITION_VALUE0, [u8; 16]);
assert_offsets!(FWP_CONDITION_VALUE0 { r#type: 0, u: 8 });
assert_eq_size!(FWPM_DISPLAY_DATA0, [u8; 16]);
const_assert_eq!(offset_of!(FWPM_DISPLAY_DATA0, description), 8);

// ws2def.h, inaddr.h, in6addr.h, ws2ipdef.h, netioapi.h
assert_eq_size!(SCOPE_ID, [u8; 4]);
assert_eq_size!(IN_ADDR, [u8; 4]);
assert_eq_size!(IN6_ADDR, [u8; 16]);
const_assert_eq!(align_of::<IN6_ADDR>(), 2);
assert_eq_size!(SOCKADDR, [u8; 16]);
const_assert_eq!(offset_of!(SOCKADDR, sa_data), 2);
assert_eq_size!(SOCKADDR_IN, [u8; 16]);
assert_offsets!(SOCKADDR_IN {
    sin_port: 2,
    sin_addr: 4,
    sin_zero: 8,
});
assert_eq_size!(SOCKADDR_STORAGE, [u8; 128]);
const_assert_eq!(align_of::<SOCKADDR_STORAGE>(), 8);
assert_offsets!(SOCKADDR_STORAGE {
    ss_family: 0,
    __ss_pad1: 2,
    __ss_align: 8,
    __ss_pad2: 16,
});
// fwpsk.h, the redirect layers' writable data.
assert_eq_size!(FWPS_CONNECT_REQUEST0, [u8; 312]);
assert_offsets!(FWPS_CONNECT_REQUEST0 {
    localAddressAndPort: 0,
    remoteAddressAndPort: 128,
    portReservationToken: 256,
    localRedirectTargetPID: 264,
    previousVersion: 272,
    modifierFilterId: 280,
    localRedirectHandle: 288,
    localRedirectContext: 296,
    localRedirectContextSize: 304,
});
assert_eq_size!(FWPS_BIND_REQUEST0, [u8; 152]);
assert_offsets!(FWPS_BIND_REQUEST0 {
    localAddressAndPort: 0,
    portReservationToken: 128,
    previousVersion: 136,
    modifierFilterId: 144,
});
assert_eq_size!(SOCKADDR_IN6, [u8; 28]);
assert_offsets!(SOCKADDR_IN6 {
    sin6_port: 2,
    sin6_flowinfo: 4,
    sin6_addr: 8,
    u: 24,
});
assert_eq_size!(SOCKADDR_INET, [u8; 28]);
const_assert_eq!(align_of::<SOCKADDR_INET>(), 4);
assert_eq_size!(IP_ADDRESS_PREFIX, [u8; 32]);
const_assert_eq!(offset_of!(IP_ADDRESS_PREFIX, PrefixLength), 28);
assert_eq_size!(WSACMSGHDR, [u8; 16]);
assert_offsets!(WSACMSGHDR {
    cmsg_level: 8,
    cmsg_type: 12,
});

// fwpstypes.h
assert_eq_size!(FWPS_INCOMING_VALUE0, [u8; 16]);
assert_eq_size!(FWPS_INCOMING_VALUES0, [u8; 16]);
assert_offsets!(FWPS_INCOMING_VALUES0 {
    layerId: 0,
    valueCount: 4,
    incomingValue: 8,
});
assert_eq_size!(FWPS_DISCARD_METADATA0, [u8; 16]);
assert_offsets!(FWPS_DISCARD_METADATA0 {
    discardReason: 4,
    filterId: 8,
});
assert_eq_size!(FWPS_INBOUND_FRAGMENT_METADATA0, [u8; 12]);
assert_offsets!(FWPS_INBOUND_FRAGMENT_METADATA0 {
    fragmentOffset: 4,
    fragmentLength: 8,
});
assert_eq_size!(FWPS_CLASSIFY_OUT0, [u8; 40]);
assert_offsets!(FWPS_CLASSIFY_OUT0 {
    actionType: 0,
    outContext: 8,
    filterId: 16,
    rights: 24,
    flags: 28,
    reserved: 32,
});
assert_eq_size!(FWPS_ACTION0, [u8; 8]);
const_assert_eq!(offset_of!(FWPS_ACTION0, calloutId), 4);
assert_eq_size!(FWPS_FILTER_CONDITION0, [u8; 24]);
assert_offsets!(FWPS_FILTER_CONDITION0 {
    fieldId: 0,
    reserved: 2,
    matchType: 4,
    conditionValue: 8,
});
assert_eq_size!(FWPS_FILTER3, [u8; 64]);
assert_offsets!(FWPS_FILTER3 {
    filterId: 0,
    weight: 8,
    subLayerWeight: 24,
    flags: 26,
    numFilterConditions: 28,
    filterCondition: 32,
    action: 40,
    context: 48,
    providerContext: 56,
});

// fwpsk.h: every member of FWPS_INCOMING_METADATA_VALUES0.
assert_eq_size!(FWPS_INCOMING_METADATA_VALUES0, [u8; 280]);
assert_offsets!(FWPS_INCOMING_METADATA_VALUES0 {
    currentMetadataValues: 0,
    flags: 4,
    reserved: 8,
    discardMetadata: 16,
    flowHandle: 32,
    ipHeaderSize: 40,
    transportHeaderSize: 44,
    processPath: 48,
    token: 56,
    processId: 64,
    sourceInterfaceIndex: 72,
    destinationInterfaceIndex: 76,
    compartmentId: 80,
    fragmentMetadata: 84,
    pathMtu: 96,
    completionHandle: 104,
    transportEndpointHandle: 112,
    remoteScopeId: 120,
    controlData: 128,
    controlDataLength: 136,
    packetDirection: 140,
    headerIncludeHeader: 144,
    headerIncludeHeaderLength: 152,
    destinationPrefix: 156,
    frameLength: 188,
    parentEndpointHandle: 192,
    icmpIdAndSequence: 200,
    localRedirectTargetPID: 204,
    originalDestination: 208,
    redirectRecords: 216,
    currentL2MetadataValues: 224,
    l2Flags: 228,
    ethernetMacHeaderSize: 232,
    wiFiOperationMode: 236,
    vSwitchSourcePortId: 240,
    vSwitchSourceNicIndex: 244,
    vSwitchDestinationPortId: 248,
    vSwitchPacketContext: 256,
    subProcessTag: 264,
    reserved1: 272,
});

// fwpsk.h: callout registration.
const_assert_eq!(size_of::<FWPS_CALLOUT_CLASSIFY_FN3>(), 8);
const_assert_eq!(size_of::<FWPS_CALLOUT_NOTIFY_FN3>(), 8);
const_assert_eq!(size_of::<FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0>(), 8);
assert_eq_size!(FWPS_CALLOUT3, [u8; 48]);
assert_offsets!(FWPS_CALLOUT3 {
    calloutKey: 0,
    flags: 16,
    classifyFn: 24,
    notifyFn: 32,
    flowDeleteFn: 40,
});

// fwpmtypes.h
assert_eq_size!(FWPM_SESSION0, [u8; 72]);
assert_offsets!(FWPM_SESSION0 {
    displayData: 16,
    flags: 32,
    txnWaitTimeoutInMSec: 36,
    processId: 40,
    sid: 48,
    username: 56,
    kernelMode: 64,
});
assert_eq_size!(FWPM_PROVIDER0, [u8; 64]);
assert_offsets!(FWPM_PROVIDER0 {
    displayData: 16,
    flags: 32,
    providerData: 40,
    serviceName: 56,
});
assert_eq_size!(FWPM_SUBLAYER0, [u8; 72]);
assert_offsets!(FWPM_SUBLAYER0 {
    displayData: 16,
    flags: 32,
    providerKey: 40,
    providerData: 48,
    weight: 64,
});
assert_eq_size!(FWPM_CALLOUT0, [u8; 88]);
assert_offsets!(FWPM_CALLOUT0 {
    displayData: 16,
    flags: 32,
    providerKey: 40,
    providerData: 48,
    applicableLayer: 64,
    calloutId: 80,
});
assert_eq_size!(FWPM_ACTION0, [u8; 20]);
const_assert_eq!(align_of::<FWPM_ACTION0>(), 4);
assert_offsets!(FWPM_ACTION0 { r#type: 0, u: 4 });
assert_eq_size!(FWPM_FILTER_CONDITION0, [u8; 40]);
assert_offsets!(FWPM_FILTER_CONDITION0 {
    matchType: 16,
    conditionValue: 24,
});
assert_eq_size!(FWPM_FILTER0_u, [u8; 16]);
assert_eq_size!(FWPM_FILTER0, [u8; 200]);
assert_offsets!(FWPM_FILTER0 {
    displayData: 16,
    flags: 32,
    providerKey: 40,
    providerData: 48,
    layerKey: 64,
    subLayerKey: 80,
    weight: 96,
    numFilterConditions: 112,
    filterCondition: 120,
    action: 128,
    u: 152,
    reserved: 168,
    filterId: 176,
    effectiveWeight: 184,
});
