//! `#[repr(C)]` types of packet data as the filter engine hands it to `classifyFn` in
//! `layerData`: the NDIS buffer structures (`km/ndis/nbl.h`), the MDL (`km/wdm.h`), and the stream
//! layer's structures (`km/fwpsk.h`).
//!
//! Transcribed for x64 from the WDK 10.0.22621 headers, with the same fixed-width conventions as
//! `types.rs`. The anonymous unions at the start of `NET_BUFFER` and `NET_BUFFER_LIST` (the data
//! fields, overlaid by a 16-byte `SLIST_HEADER` used while the structure sits in a free list) are
//! flattened into their data arm; the overlay's only effect on the layout, the 16-byte alignment,
//! is kept with `align(16)`, which the `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)` members
//! require anyway. The numbers in the assertions at the end were produced by compiling the C
//! definitions with fixed-width LLP64 typedefs (gcc, x86_64) and printing `sizeof`/`offsetof`.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::c_void;
use core::mem::{align_of, offset_of, size_of};

use static_assertions::const_assert_eq;

/// `MDL` (wdm.h): describes one virtually contiguous buffer of `ByteCount` bytes starting
/// `ByteOffset` bytes into the page at `StartVa`; the PFN array follows the structure.
#[repr(C)]
pub struct MDL {
    pub Next: *mut MDL,
    /// `CSHORT`.
    pub Size: i16,
    /// `CSHORT`: the `MDL_*` flags.
    pub MdlFlags: i16,
    pub Process: *mut c_void,
    /// The system-space address of the buffer's first byte, valid when `MdlFlags` has
    /// `MDL_MAPPED_TO_SYSTEM_VA` or `MDL_SOURCE_IS_NONPAGED_POOL`.
    pub MappedSystemVa: *mut c_void,
    pub StartVa: *mut c_void,
    pub ByteCount: u32,
    pub ByteOffset: u32,
}

pub const MDL_MAPPED_TO_SYSTEM_VA: i16 = 0x0001;
pub const MDL_PAGES_LOCKED: i16 = 0x0002;
pub const MDL_SOURCE_IS_NONPAGED_POOL: i16 = 0x0004;

/// `MM_PAGE_PRIORITY::NormalPagePriority` (wdm.h).
pub const NormalPagePriority: u32 = 16;
/// `MdlMappingNoExecute` (wdm.h), OR'd into the priority of `MmGetSystemAddressForMdlSafe`.
pub const MdlMappingNoExecute: u32 = 0x4000_0000;

/// `NET_BUFFER` (nbl.h): one packet's data, `DataLength` bytes starting `DataOffset` bytes into
/// the MDL chain `MdlChain` — at `CurrentMdlOffset` bytes into `CurrentMdl`. The bytes of the
/// chain before `DataOffset` are the "used data space" a layer has advanced past.
#[repr(C, align(16))]
pub struct NET_BUFFER {
    pub Next: *mut NET_BUFFER,
    pub CurrentMdl: *mut MDL,
    pub CurrentMdlOffset: u32,
    /// `union { ULONG DataLength; SIZE_T stDataLength; }`: `DataLength` is the low 4 bytes
    /// (x64 is little-endian); the union takes 8.
    pub DataLength: usize,
    pub MdlChain: *mut MDL,
    pub DataOffset: u32,
    /// The tail of the 48-byte union the data fields share with `Link` (not a C member).
    pub _union_tail: u32,
    pub ChecksumBias: u16,
    pub Reserved: u16,
    pub NdisPoolHandle: *mut c_void,
    pub NdisReserved: Aligned16<[*mut c_void; 2]>,
    pub ProtocolReserved: Aligned16<[*mut c_void; 6]>,
    pub MiniportReserved: Aligned16<[*mut c_void; 4]>,
    /// `PHYSICAL_ADDRESS` (a `LARGE_INTEGER`).
    pub DataPhysicalAddress: i64,
    /// `union { NET_BUFFER_SHARED_MEMORY *SharedMemoryInfo; SCATTER_GATHER_LIST *ScatterGatherList; }`.
    pub SharedMemoryInfo: *mut c_void,
}

/// `NET_BUFFER_LIST` (nbl.h): a list of `NET_BUFFER`s with the same out-of-band data; `Next`
/// chains lists.
#[repr(C, align(16))]
pub struct NET_BUFFER_LIST {
    pub Next: *mut NET_BUFFER_LIST,
    pub FirstNetBuffer: *mut NET_BUFFER,
    pub Context: *mut c_void,
    pub ParentNetBufferList: *mut NET_BUFFER_LIST,
    pub NdisPoolHandle: *mut c_void,
    pub NdisReserved: Aligned16<[*mut c_void; 2]>,
    pub ProtocolReserved: Aligned16<[*mut c_void; 4]>,
    pub MiniportReserved: Aligned16<[*mut c_void; 2]>,
    pub Scratch: *mut c_void,
    pub SourceHandle: *mut c_void,
    pub NblFlags: u32,
    pub ChildRefCount: i32,
    pub Flags: u32,
    /// `union { NDIS_STATUS Status; ULONG NdisReserved2; }`.
    pub Status: i32,
    /// `NetBufferListInfo[MaxNetBufferListInfo]`; 27 on x64 with NDIS 6.80 and later
    /// (nblinfo.h). The SDK never reads it; only its length depends on the NDIS version.
    pub NetBufferListInfo: [*mut c_void; MaxNetBufferListInfo],
}

/// `MaxNetBufferListInfo` (nblinfo.h, x64, `NDIS_SUPPORT_NDIS680`, without `NDIS_WRAPPER`).
pub const MaxNetBufferListInfo: usize = 27;

/// A member declared `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)` (16 on x64).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Aligned16<T>(pub T);

/// `FWPS_STREAM_DATA_OFFSET0` (fwpsk.h): a position in stream data.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_STREAM_DATA_OFFSET0 {
    pub netBufferList: *mut NET_BUFFER_LIST,
    pub netBuffer: *mut NET_BUFFER,
    pub mdl: *mut MDL,
    pub mdlOffset: u32,
    /// Reserved for the system.
    pub netBufferOffset: u32,
    /// Reserved for the system.
    pub streamDataOffset: usize,
}

/// `FWPS_STREAM_DATA0` (fwpsk.h): a section of a stream, `dataLength` bytes from `dataOffset`
/// in the chain `netBufferListChain`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_STREAM_DATA0 {
    /// The `FWPS_STREAM_FLAG_*` bits.
    pub flags: u32,
    pub dataOffset: FWPS_STREAM_DATA_OFFSET0,
    pub dataLength: usize,
    pub netBufferListChain: *mut NET_BUFFER_LIST,
}

pub type FWPS_STREAM_ACTION_TYPE = i32;
pub const FWPS_STREAM_ACTION_NONE: FWPS_STREAM_ACTION_TYPE = 0;
pub const FWPS_STREAM_ACTION_NEED_MORE_DATA: FWPS_STREAM_ACTION_TYPE = 1;
pub const FWPS_STREAM_ACTION_DROP_CONNECTION: FWPS_STREAM_ACTION_TYPE = 2;
pub const FWPS_STREAM_ACTION_DEFER: FWPS_STREAM_ACTION_TYPE = 3;
pub const FWPS_STREAM_ACTION_ALLOW_CONNECTION: FWPS_STREAM_ACTION_TYPE = 4;

pub const FWPS_STREAM_FLAG_RECEIVE: u32 = 0x0000_0001;
pub const FWPS_STREAM_FLAG_RECEIVE_EXPEDITED: u32 = 0x0000_0002;
pub const FWPS_STREAM_FLAG_RECEIVE_DISCONNECT: u32 = 0x0000_0004;
pub const FWPS_STREAM_FLAG_RECEIVE_ABORT: u32 = 0x0000_0008;
pub const FWPS_STREAM_FLAG_RECEIVE_PUSH: u32 = 0x0000_0010;
pub const FWPS_STREAM_FLAG_SEND: u32 = 0x0001_0000;
pub const FWPS_STREAM_FLAG_SEND_EXPEDITED: u32 = 0x0002_0000;
pub const FWPS_STREAM_FLAG_SEND_NODELAY: u32 = 0x0004_0000;
pub const FWPS_STREAM_FLAG_SEND_DISCONNECT: u32 = 0x0008_0000;
pub const FWPS_STREAM_FLAG_SEND_ABORT: u32 = 0x0010_0000;

/// `FWPS_STREAM_CALLOUT_IO_PACKET0` (fwpsk.h): what `layerData` points to at the stream layers.
/// `streamData` and `missedBytes` are in; the rest is the callout's answer.
#[repr(C)]
pub struct FWPS_STREAM_CALLOUT_IO_PACKET0 {
    pub streamData: *mut FWPS_STREAM_DATA0,
    pub missedBytes: usize,
    pub countBytesRequired: u32,
    pub countBytesEnforced: usize,
    pub streamAction: FWPS_STREAM_ACTION_TYPE,
}

/// `NDIS_STATUS` (ndis/types.h): an NTSTATUS-compatible code.
pub type NDIS_STATUS = i32;
pub const NDIS_STATUS_SUCCESS: NDIS_STATUS = 0;
/// `NDIS_STATUS_RESOURCES` (`STATUS_INSUFFICIENT_RESOURCES`).
pub const NDIS_STATUS_RESOURCES: NDIS_STATUS = 0xC000_009A_u32 as i32;
/// `NDIS_STATUS_FAILURE` (`STATUS_UNSUCCESSFUL`).
pub const NDIS_STATUS_FAILURE: NDIS_STATUS = 0xC000_0001_u32 as i32;

/// `NET_BUFFER_ALLOCATE_MDL` (nblapi.h): the optional allocator `NdisRetreatNetBufferDataStart`
/// calls when the used data space is too short.
pub type NET_BUFFER_ALLOCATE_MDL =
    Option<unsafe extern "system" fn(BufferSize: *mut u32) -> *mut MDL>;
/// `NET_BUFFER_FREE_MDL` (nblapi.h): the optional routine `NdisAdvanceNetBufferDataStart` frees
/// MDLs with.
pub type NET_BUFFER_FREE_MDL = Option<unsafe extern "system" fn(Mdl: *mut MDL)>;

// Packet injection (fwpsk.h).

/// `FWPS_INJECTION_TYPE_*`: what an injection handle injects into (`FwpsInjectionHandleCreate0`).
pub const FWPS_INJECTION_TYPE_STREAM: u32 = 0x0000_0001;
pub const FWPS_INJECTION_TYPE_TRANSPORT: u32 = 0x0000_0002;
pub const FWPS_INJECTION_TYPE_NETWORK: u32 = 0x0000_0004;
pub const FWPS_INJECTION_TYPE_FORWARD: u32 = 0x0000_0008;

/// `FWPS_PACKET_INJECTION_STATE` (fwpsk.h): what `FwpsQueryPacketInjectionState0` says of a
/// packet, relative to the injection handle it is asked with.
pub type FWPS_PACKET_INJECTION_STATE = i32;
pub const FWPS_PACKET_NOT_INJECTED: FWPS_PACKET_INJECTION_STATE = 0;
pub const FWPS_PACKET_INJECTED_BY_SELF: FWPS_PACKET_INJECTION_STATE = 1;
pub const FWPS_PACKET_INJECTED_BY_OTHER: FWPS_PACKET_INJECTION_STATE = 2;
pub const FWPS_PACKET_PREVIOUSLY_INJECTED_BY_SELF: FWPS_PACKET_INJECTION_STATE = 3;
pub const FWPS_PACKET_INJECTION_STATE_MAX: FWPS_PACKET_INJECTION_STATE = 4;

/// `FWPS_INJECT_COMPLETE0` (fwpsk.h): called when an injected net buffer list has been
/// delivered (or dropped); `dispatchLevel` says whether it runs at `DISPATCH_LEVEL`. The
/// injector frees the list here; its `Status` member says how the injection ended.
pub type FWPS_INJECT_COMPLETE0 = Option<
    unsafe extern "system" fn(
        context: *mut c_void,
        netBufferList: *mut NET_BUFFER_LIST,
        dispatchLevel: u8,
    ),
>;

/// `FWPS_TRANSPORT_SEND_PARAMS0` (fwpsk.h): where `FwpsInjectTransportSendAsync0` sends.
/// `remoteAddress` points to the remote IP address in network byte order (4 or 16 bytes);
/// `controlData` to `controlDataLength` bytes of socket control data, or null.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FWPS_TRANSPORT_SEND_PARAMS0 {
    pub remoteAddress: *mut u8,
    pub remoteScopeId: super::fwp::SCOPE_ID,
    pub controlData: *mut super::fwp::WSACMSGHDR,
    pub controlDataLength: u32,
}

macro_rules! assert_layout {
    ($t:ty, size $size:literal, align $align:literal { $($field:ident: $offset:expr),* $(,)? }) => {
        const_assert_eq!(size_of::<$t>(), $size);
        const_assert_eq!(align_of::<$t>(), $align);
        $(const_assert_eq!(offset_of!($t, $field), $offset);)*
    };
}

assert_layout!(MDL, size 48, align 8 {
    Next: 0, Size: 8, MdlFlags: 10, Process: 16, MappedSystemVa: 24, StartVa: 32,
    ByteCount: 40, ByteOffset: 44,
});
assert_layout!(NET_BUFFER, size 176, align 16 {
    Next: 0, CurrentMdl: 8, CurrentMdlOffset: 16, DataLength: 24, MdlChain: 32, DataOffset: 40,
    ChecksumBias: 48, Reserved: 50, NdisPoolHandle: 56, NdisReserved: 64, ProtocolReserved: 80,
    MiniportReserved: 128, DataPhysicalAddress: 160, SharedMemoryInfo: 168,
});
assert_layout!(NET_BUFFER_LIST, size 368, align 16 {
    Next: 0, FirstNetBuffer: 8, Context: 16, ParentNetBufferList: 24, NdisPoolHandle: 32,
    NdisReserved: 48, ProtocolReserved: 64, MiniportReserved: 96, Scratch: 112,
    SourceHandle: 120, NblFlags: 128, ChildRefCount: 132, Flags: 136, Status: 140,
    NetBufferListInfo: 144,
});
assert_layout!(FWPS_STREAM_DATA_OFFSET0, size 40, align 8 {
    netBufferList: 0, netBuffer: 8, mdl: 16, mdlOffset: 24, netBufferOffset: 28,
    streamDataOffset: 32,
});
assert_layout!(FWPS_STREAM_DATA0, size 64, align 8 {
    flags: 0, dataOffset: 8, dataLength: 48, netBufferListChain: 56,
});
assert_layout!(FWPS_STREAM_CALLOUT_IO_PACKET0, size 40, align 8 {
    streamData: 0, missedBytes: 8, countBytesRequired: 16, countBytesEnforced: 24,
    streamAction: 32,
});
assert_layout!(FWPS_TRANSPORT_SEND_PARAMS0, size 32, align 8 {
    remoteAddress: 0, remoteScopeId: 8, controlData: 16, controlDataLength: 24,
});
