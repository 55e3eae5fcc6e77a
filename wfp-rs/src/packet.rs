//! Packet data in a classification: what `layerData` is at each layer, and read-only views of it.
//!
//! `classifyFn` gets a `layerData` pointer whose meaning depends on the layer (Microsoft's "Data
//! offset positions" page): a `NET_BUFFER_LIST` at the layers that filter packets, an
//! `FWPS_STREAM_CALLOUT_IO_PACKET0` at the stream layers, a connect or bind request at the
//! redirect layers, nothing at the other ALE layers. It may also be null where the layer has no
//! packet for a classification. [`Layer::DATA`](crate::layer::Layer::DATA) says which, and the
//! marker traits [`PacketLayer`](crate::layer::PacketLayer) and
//! [`StreamLayer`](crate::layer::StreamLayer) make the accessors
//! [`Classify::packet`](crate::callout::Classify::packet) and
//! [`Classify::stream`](crate::callout::Classify::stream) exist only where they mean something:
//! asking for the packet at ALE_RESOURCE_ASSIGNMENT does not compile.
//!
//! # Reading a packet
//!
//! A [`NetBufferList`] holds [`NetBuffer`]s; each describes one packet's bytes spread over a chain
//! of MDLs. Its data starts `DataOffset` bytes into the chain — at the position the layer has
//! advanced to ([`DataStart`]) — and is `DataLength` bytes long. [`NetBuffer::read`] copies bytes
//! of the data into a caller's buffer, across MDL boundaries (what `NdisGetDataBuffer` does when
//! it has to copy; no allocation), and [`NetBuffer::read_behind`] the bytes the layer advanced
//! past (the IP header at the inbound transport layer: `FWPS_INCOMING_METADATA_VALUES0`'s
//! `ipHeaderSize` and `transportHeaderSize` say how many), without moving the data start as
//! `NdisRetreatNetBufferDataStart` would.
//!
//! Nothing here trusts the lengths: a read beyond the data, before the start of the chain, or
//! past the end of the MDLs (a `DataLength` or `DataOffset` larger than the MDLs' `ByteCount`s
//! add up to) is an error, never a read out of bounds, and never a panic.
//!
//! Only MDLs with a system-space mapping are read (`MDL_MAPPED_TO_SYSTEM_VA` or
//! `MDL_SOURCE_IS_NONPAGED_POOL` set: then `MappedSystemVa` is the address
//! `MmGetSystemAddressForMdlSafe` would return, without mapping anything). The network stack's
//! buffers are taken to be mapped (INFERRED: Microsoft's pages do not say so for every layer); an
//! unmapped MDL is [`PacketError::NotMapped`].

use core::ffi::c_void;
use core::fmt;

use crate::sys;

/// What `layerData` is at a layer (Microsoft's "Data offset positions" table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerData {
    /// Nothing ("not applicable"): the resource assignment, listen, resource release and endpoint
    /// closure layers.
    None,
    /// A `NET_BUFFER_LIST`, its data starting where [`DataStart`] says.
    Packet(DataStart),
    /// An `FWPS_STREAM_CALLOUT_IO_PACKET0` (the stream layers).
    Stream,
    /// An `FWPS_CONNECT_REQUEST0`, the writable request of ALE_CONNECT_REDIRECT: see
    /// [`crate::redirect`].
    ConnectRequest,
    /// An `FWPS_BIND_REQUEST0`, the writable request of ALE_BIND_REDIRECT (bound in
    /// [`crate::sys`], not wrapped yet).
    BindRequest,
}

/// Where a packet layer's data (`NET_BUFFER`'s `DataOffset`) starts, per Microsoft's "Data
/// offset positions" table. The bytes before it — the headers the layer advanced past — are
/// still in the MDL chain: see [`NetBuffer::read_behind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataStart {
    /// At the IP header: outbound IP packet, IP forward (and its discard layer), the vSwitch
    /// transport layers, and INBOUND_MAC_FRAME_ETHERNET (as the table says).
    IpHeader,
    /// At the transport header: inbound IP packet, outbound transport (and its discard layer).
    TransportHeader,
    /// ALE_AUTH_CONNECT (and its discard layer): at the transport header for non-TCP traffic;
    /// for TCP the table says "not applicable" (expect no packet).
    TransportHeaderUnlessTcp,
    /// Past the transport header, at the payload: inbound transport (and its discard layer), and
    /// for inbound packets received on the ICMP socket, at the ICMP header. The IP and transport
    /// headers are `ipHeaderSize + transportHeaderSize` bytes behind.
    Payload,
    /// Inbound: at the payload (as [`Payload`](Self::Payload)); outbound: at the transport
    /// header. Datagram data, ALE_AUTH_RECV_ACCEPT, ALE_FLOW_ESTABLISHED, stream packet (and
    /// their discard layers).
    ByDirection,
    /// At the inner IP header of the ICMP error (inbound ICMP error layers).
    InnerIpHeader,
    /// At the ICMP header (outbound ICMP error layers).
    IcmpHeader,
    /// At the MAC header (OUTBOUND_MAC_FRAME_ETHERNET, the native MAC frame layers).
    MacHeader,
    /// At the Ethernet header (the vSwitch Ethernet layers).
    EthernetHeader,
    /// Where the TCP/IP stack stopped processing (the IP packet discard layers).
    WhereProcessingStopped,
}

/// Why bytes of a packet could not be read. The caller's buffer is left in an unspecified state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The bytes asked for go past the end of the net buffer's data.
    #[error("{len} bytes at offset {offset} of the packet data: the data has {data_length} bytes")]
    OutOfRange {
        /// The offset asked for, from the data start.
        offset: u32,
        /// How many bytes were asked for.
        len: usize,
        /// The net buffer's `DataLength`.
        data_length: u32,
    },
    /// [`NetBuffer::read_behind`] went further back than the start of the MDL chain.
    #[error(
        "{back} bytes behind the data start: the data starts {data_offset} bytes into its MDL chain"
    )]
    BeforeChain {
        /// How far back the read started.
        back: u32,
        /// The net buffer's `DataOffset`.
        data_offset: u32,
    },
    /// The MDL chain ends before the bytes the net buffer says it holds (a malformed net buffer:
    /// `DataOffset + DataLength` beyond the sum of its MDLs' `ByteCount`).
    #[error("the MDL chain ends before the net buffer's data does")]
    ChainTooShort,
    /// The MDL chain or the net buffer list has more links than any real packet
    /// ([`MAX_CHAIN`]): taken to be a cycle.
    #[error("more than {MAX_CHAIN} links in a chain: taken to be a cycle")]
    ChainTooLong,
    /// An MDL with the bytes has no system-space mapping.
    #[error("an MDL holding the bytes has no system-space mapping")]
    NotMapped,
    /// The bytes asked for go past the end of a stream indication (`dataLength`).
    #[error("{len} bytes at offset {offset} of the stream data: it has {data_length} bytes")]
    StreamOutOfRange {
        /// The offset asked for, from the start of the indicated section.
        offset: usize,
        /// How many bytes were asked for.
        len: usize,
        /// The indication's `dataLength`.
        data_length: usize,
    },
    /// The stream data's `dataOffset` does not point into its net buffer's data (its MDL is not
    /// in the net buffer's chain, or lies before the data start).
    #[error("the stream data's offset is not in its net buffer's data")]
    StreamOffsetOutsideData,
}

/// The most MDLs walked in one read, and net buffers in one list, before a chain is taken to be
/// a cycle: far more than a packet has (a 64 KiB packet in 1-byte MDLs would need 65,536 — no
/// stack builds that), small enough that a corrupted chain costs a bounded walk.
pub const MAX_CHAIN: usize = 1 << 16;

/// A read-only view of a `NET_BUFFER_LIST` the filter engine passed to `classifyFn`, valid for
/// the classification (`'a`).
#[derive(Clone, Copy)]
pub struct NetBufferList<'a> {
    raw: &'a sys::NET_BUFFER_LIST,
}

impl<'a> NetBufferList<'a> {
    /// The list at `layer_data`, if it is not null.
    ///
    /// # Safety
    ///
    /// A non-null `layer_data` points to a `NET_BUFFER_LIST` whose net buffers and MDLs stay
    /// valid and unchanged for `'a` (the engine's, for a classification at a packet layer).
    pub(crate) unsafe fn from_layer_data(layer_data: *const c_void) -> Option<NetBufferList<'a>> {
        // SAFETY: the caller's contract.
        let raw = unsafe { layer_data.cast::<sys::NET_BUFFER_LIST>().as_ref() }?;
        Some(NetBufferList { raw })
    }

    /// The net buffers of this list, in order (one packet each).
    pub fn net_buffers(&self) -> NetBuffers<'a> {
        NetBuffers {
            next: self.raw.FirstNetBuffer,
            walked: 0,
            _list: core::marker::PhantomData,
        }
    }

    /// The first net buffer: the one holding the IP and transport headers, the whole packet at
    /// most layers. `None` for a list without net buffers.
    pub fn first(&self) -> Option<NetBuffer<'a>> {
        self.net_buffers().next()
    }

    /// The next list of a chain. WFP indicates a single list except at the stream layers and for
    /// IP fragment groups in the forward path (Microsoft's "Packet indication format" page).
    pub fn next_list(&self) -> Option<NetBufferList<'a>> {
        // SAFETY: a list's `Next` is null or the next list of the chain, valid as this one is.
        unsafe { NetBufferList::from_layer_data(self.raw.Next.cast_const().cast()) }
    }

    /// The public `NblFlags` (`NDIS_NBL_FLAGS_*`).
    pub fn flags(&self) -> u32 {
        self.raw.NblFlags
    }
}

impl fmt::Debug for NetBufferList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetBufferList")
            .field("flags", &self.raw.NblFlags)
            .field("first", &self.first())
            .finish_non_exhaustive()
    }
}

/// The net buffers of a [`NetBufferList`]. Stops after [`MAX_CHAIN`] (a cyclic list).
pub struct NetBuffers<'a> {
    next: *mut sys::NET_BUFFER,
    walked: usize,
    _list: core::marker::PhantomData<&'a sys::NET_BUFFER_LIST>,
}

impl<'a> Iterator for NetBuffers<'a> {
    type Item = NetBuffer<'a>;

    fn next(&mut self) -> Option<NetBuffer<'a>> {
        if self.walked >= MAX_CHAIN {
            return None;
        }
        // SAFETY: `next` is null or a net buffer of the list, valid for 'a (`from_layer_data`).
        let raw: &'a sys::NET_BUFFER = unsafe { self.next.as_ref() }?;
        self.walked += 1;
        self.next = raw.Next;
        Some(NetBuffer { raw })
    }
}

/// A read-only view of one `NET_BUFFER`: one packet's bytes, from the layer's data start.
#[derive(Clone, Copy)]
pub struct NetBuffer<'a> {
    raw: &'a sys::NET_BUFFER,
}

impl<'a> NetBuffer<'a> {
    /// How many bytes of data there are from the data start (`NET_BUFFER_DATA_LENGTH`).
    pub fn len(&self) -> u32 {
        // `DataLength` is the ULONG arm of a union with a SIZE_T; on little-endian x64 the ULONG
        // is the low half, which the truncation keeps.
        self.raw.DataLength as u32
    }

    /// Whether the data is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes into the MDL chain the data starts (`NET_BUFFER_DATA_OFFSET`): the bytes
    /// [`read_behind`](Self::read_behind) can reach.
    pub fn data_offset(&self) -> u32 {
        self.raw.DataOffset
    }

    /// Copies `out.len()` bytes of the data, starting `offset` bytes after the data start, into
    /// `out`, across MDLs.
    pub fn read(&self, offset: u32, out: &mut [u8]) -> Result<(), PacketError> {
        let data_length = self.len();
        if u64::from(offset) + out.len() as u64 > u64::from(data_length) {
            return Err(PacketError::OutOfRange {
                offset,
                len: out.len(),
                data_length,
            });
        }
        copy_from_chain(
            self.raw.MdlChain,
            u64::from(self.raw.DataOffset) + u64::from(offset),
            out,
        )
    }

    /// [`read`](Self::read) into an array: `N` bytes from `offset`.
    pub fn read_array<const N: usize>(&self, offset: u32) -> Result<[u8; N], PacketError> {
        let mut bytes = [0; N];
        self.read(offset, &mut bytes)?;
        Ok(bytes)
    }

    /// Copies bytes from before the data start: `out.len()` bytes starting `back` bytes before
    /// it (so `read_behind(n, &mut [0; n])` reads the `n` bytes the layer advanced past). The
    /// read may run on into the data, not past its end. The data start does not move.
    pub fn read_behind(&self, back: u32, out: &mut [u8]) -> Result<(), PacketError> {
        let data_offset = self.raw.DataOffset;
        let Some(start) = data_offset.checked_sub(back) else {
            return Err(PacketError::BeforeChain { back, data_offset });
        };
        let end = u64::from(start) + out.len() as u64;
        let data_end = u64::from(data_offset) + u64::from(self.len());
        if end > data_end {
            return Err(PacketError::OutOfRange {
                offset: 0,
                len: (end - u64::from(data_offset)) as usize,
                data_length: self.len(),
            });
        }
        copy_from_chain(self.raw.MdlChain, u64::from(start), out)
    }
}

impl fmt::Debug for NetBuffer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetBuffer")
            .field("data_offset", &self.data_offset())
            .field("len", &self.len())
            .finish()
    }
}

/// The bytes an MDL describes, if it has a system-space mapping.
fn mapped_bytes(mdl: &sys::MDL) -> Result<&[u8], PacketError> {
    let mapped = mdl.MdlFlags & (sys::MDL_MAPPED_TO_SYSTEM_VA | sys::MDL_SOURCE_IS_NONPAGED_POOL);
    if mapped == 0 || mdl.MappedSystemVa.is_null() {
        return Err(PacketError::NotMapped);
    }
    // SAFETY: with either flag set, `MappedSystemVa` is the system address of the buffer's first
    // byte and the buffer is `ByteCount` bytes (wdm.h, `MmGetSystemAddressForMdlSafe`); the MDL
    // is part of a packet that stays valid and unchanged for the classification.
    Ok(unsafe {
        core::slice::from_raw_parts(
            mdl.MappedSystemVa.cast_const().cast::<u8>(),
            mdl.ByteCount as usize,
        )
    })
}

/// Copies `out.len()` bytes starting `skip` bytes into the MDL chain at `first`.
fn copy_from_chain(
    first: *const sys::MDL,
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), PacketError> {
    let mut mdl = first;
    let mut rest = out;
    let mut walked = 0;
    while !rest.is_empty() {
        // SAFETY: `mdl` is null or an MDL of the chain of a net buffer valid for the
        // classification (`NetBufferList::from_layer_data`).
        let Some(current) = (unsafe { mdl.as_ref() }) else {
            return Err(PacketError::ChainTooShort);
        };
        walked += 1;
        if walked > MAX_CHAIN {
            return Err(PacketError::ChainTooLong);
        }
        mdl = current.Next;
        let count = u64::from(current.ByteCount);
        if skip >= count {
            // Skipped MDLs are not mapped: only the ones holding the bytes need to be.
            skip -= count;
            continue;
        }
        let bytes = mapped_bytes(current)?;
        let available = bytes.get(skip as usize..).unwrap_or_default();
        let n = available.len().min(rest.len());
        let (now, later) = rest.split_at_mut(n);
        now.copy_from_slice(&available[..n]);
        rest = later;
        skip = 0;
    }
    Ok(())
}

/// How many bytes into the MDL chain at `first` the byte `offset` bytes into `target` is.
fn position_in_chain(
    first: *const sys::MDL,
    target: *const sys::MDL,
    offset: u32,
) -> Result<u64, PacketError> {
    let mut mdl = first;
    let mut position = 0u64;
    for _ in 0..MAX_CHAIN {
        // SAFETY: `mdl` is null or an MDL of a chain valid for the classification.
        let Some(current) = (unsafe { mdl.as_ref() }) else {
            return Err(PacketError::StreamOffsetOutsideData);
        };
        if core::ptr::eq(mdl, target) {
            if offset > current.ByteCount {
                return Err(PacketError::StreamOffsetOutsideData);
            }
            return Ok(position + u64::from(offset));
        }
        position += u64::from(current.ByteCount);
        mdl = current.Next;
    }
    Err(PacketError::ChainTooLong)
}

/// A read-only view of the stream data passed at a stream layer
/// (`FWPS_STREAM_CALLOUT_IO_PACKET0` and its `FWPS_STREAM_DATA0`), valid for the classification.
#[derive(Clone, Copy)]
pub struct StreamData<'a> {
    packet: &'a sys::FWPS_STREAM_CALLOUT_IO_PACKET0,
    data: Option<&'a sys::FWPS_STREAM_DATA0>,
}

impl<'a> StreamData<'a> {
    /// The stream data at `layer_data`, if it is not null.
    ///
    /// # Safety
    ///
    /// A non-null `layer_data` points to an `FWPS_STREAM_CALLOUT_IO_PACKET0` whose stream data,
    /// net buffer lists and MDLs stay valid and unchanged for `'a`.
    pub(crate) unsafe fn from_layer_data(layer_data: *const c_void) -> Option<StreamData<'a>> {
        // SAFETY: the caller's contract.
        let packet = unsafe {
            layer_data
                .cast::<sys::FWPS_STREAM_CALLOUT_IO_PACKET0>()
                .as_ref()
        }?;
        // SAFETY: as above: `streamData` is null or valid for 'a.
        let data = unsafe { packet.streamData.cast_const().as_ref() };
        Some(StreamData { packet, data })
    }

    /// The `FWPS_STREAM_FLAG_*` bits (direction, push, disconnect, abort, ...); 0 without
    /// stream data.
    pub fn flags(&self) -> u32 {
        self.data.map_or(0, |data| data.flags)
    }

    /// How many bytes of the stream this indication carries (`dataLength`).
    pub fn len(&self) -> usize {
        self.data.map_or(0, |data| data.dataLength)
    }

    /// Whether the indication carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes of the stream the callout did not see (`missedBytes`).
    pub fn missed_bytes(&self) -> usize {
        self.packet.missedBytes
    }

    /// Copies `out.len()` bytes of the indicated section of the stream, starting `offset` bytes
    /// into it, into `out`: from `dataOffset` on, across MDLs, net buffers and the lists of the
    /// chain.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), PacketError> {
        let data_length = self.len();
        let out_of_range = PacketError::StreamOutOfRange {
            offset,
            len: out.len(),
            data_length,
        };
        match offset.checked_add(out.len()) {
            Some(end) if end <= data_length => {}
            _ => return Err(out_of_range),
        }
        if out.is_empty() {
            return Ok(());
        }
        let Some(data) = self.data else {
            return Err(out_of_range);
        };
        let at = data.dataOffset;
        // SAFETY: `from_layer_data`'s contract covers the stream data's lists and net buffers.
        let (Some(mut list), Some(first)) = (
            unsafe { NetBufferList::from_layer_data(at.netBufferList.cast_const().cast()) },
            unsafe { at.netBuffer.cast_const().as_ref() },
        ) else {
            return Err(PacketError::ChainTooShort);
        };
        let mut buffer = NetBuffer { raw: first };
        // Where the section starts in its net buffer's data.
        let start = position_in_chain(first.MdlChain, at.mdl, at.mdlOffset)?
            .checked_sub(u64::from(first.DataOffset))
            .ok_or(PacketError::StreamOffsetOutsideData)?;
        let mut skip = start + offset as u64;
        let mut rest = out;
        let mut walked = 0;
        loop {
            let length = u64::from(buffer.len());
            if skip < length {
                let n = ((length - skip) as usize).min(rest.len());
                let (now, later) = rest.split_at_mut(n);
                buffer.read(skip as u32, now)?;
                rest = later;
                skip = 0;
                if rest.is_empty() {
                    return Ok(());
                }
            } else {
                skip -= length;
            }
            walked += 1;
            if walked > MAX_CHAIN {
                return Err(PacketError::ChainTooLong);
            }
            // The next net buffer of this list, else the first of the next list.
            // SAFETY: as above: the chain's net buffers are valid for 'a.
            buffer = match unsafe { buffer.raw.Next.cast_const().as_ref() } {
                Some(raw) => NetBuffer { raw },
                None => {
                    list = list.next_list().ok_or(PacketError::ChainTooShort)?;
                    list.first().ok_or(PacketError::ChainTooShort)?
                }
            };
        }
    }

    /// The net buffer list chain holding the stream's bytes (`netBufferListChain`); the section
    /// this indication is about starts at `dataOffset` in it.
    pub fn chain(&self) -> Option<NetBufferList<'a>> {
        let chain = self.data?.netBufferListChain;
        // SAFETY: `from_layer_data`'s contract covers the chain.
        unsafe { NetBufferList::from_layer_data(chain.cast_const().cast()) }
    }
}

impl fmt::Debug for StreamData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamData")
            .field("flags", &self.flags())
            .field("len", &self.len())
            .field("missed_bytes", &self.missed_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    /// A net buffer list over `pieces` (one MDL each), data starting `data_offset` bytes in and
    /// `data_length` long — whatever the MDLs hold, so malformed lists can be built.
    struct Built {
        nbl: Box<sys::NET_BUFFER_LIST>,
        _nb: Box<sys::NET_BUFFER>,
        mdls: Vec<sys::MDL>,
        _pieces: Vec<Vec<u8>>,
    }

    fn build(pieces: &[&[u8]], data_offset: u32, data_length: u32) -> Built {
        let mut pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let mut mdls: Vec<sys::MDL> = pieces
            .iter_mut()
            .map(|piece| sys::MDL {
                Next: core::ptr::null_mut(),
                Size: 48,
                MdlFlags: sys::MDL_SOURCE_IS_NONPAGED_POOL,
                Process: core::ptr::null_mut(),
                MappedSystemVa: piece.as_mut_ptr().cast(),
                StartVa: core::ptr::null_mut(),
                ByteCount: piece.len() as u32,
                ByteOffset: 0,
            })
            .collect();
        let base = mdls.as_mut_ptr();
        for i in 1..mdls.len() {
            // SAFETY: `i` is in bounds; the vector is not resized after this.
            mdls[i - 1].Next = unsafe { base.add(i) };
        }
        // SAFETY: plain data; zero is an empty, unlinked structure.
        let mut nb: Box<sys::NET_BUFFER> = Box::new(unsafe { core::mem::zeroed() });
        nb.MdlChain = base;
        nb.DataOffset = data_offset;
        nb.DataLength = data_length as usize;
        // SAFETY: as above.
        let mut nbl: Box<sys::NET_BUFFER_LIST> = Box::new(unsafe { core::mem::zeroed() });
        nbl.FirstNetBuffer = &raw mut *nb;
        Built {
            nbl,
            _nb: nb,
            mdls,
            _pieces: pieces,
        }
    }

    fn first(built: &Built) -> NetBuffer<'_> {
        // SAFETY: `built` owns the list and everything it points to, unchanged while borrowed.
        let list = unsafe { NetBufferList::from_layer_data((&raw const *built.nbl).cast()) };
        list.and_then(|l| l.first()).expect("one net buffer")
    }

    #[test]
    fn reads_cross_mdl_boundaries_from_the_data_start() {
        let built = build(&[b"hea", b"derpay", b"load"], 3, 10);
        let nb = first(&built);
        assert_eq!(nb.len(), 10);
        assert_eq!(&nb.read_array::<10>(0).unwrap(), b"derpayload");
        assert_eq!(&nb.read_array::<4>(4).unwrap(), b"aylo");
        let mut behind = [0; 5];
        nb.read_behind(3, &mut behind).unwrap();
        assert_eq!(&behind, b"heade");
    }

    #[test]
    fn reads_beyond_the_data_or_before_the_chain_are_errors() {
        let built = build(&[b"headerpayload"], 6, 7);
        let nb = first(&built);
        assert_eq!(
            nb.read(5, &mut [0; 3]),
            Err(PacketError::OutOfRange {
                offset: 5,
                len: 3,
                data_length: 7
            })
        );
        assert_eq!(
            nb.read(u32::MAX, &mut [0; 2]),
            Err(PacketError::OutOfRange {
                offset: u32::MAX,
                len: 2,
                data_length: 7
            })
        );
        assert_eq!(
            nb.read_behind(7, &mut [0; 1]),
            Err(PacketError::BeforeChain {
                back: 7,
                data_offset: 6
            })
        );
        assert!(matches!(
            nb.read_behind(6, &mut [0; 14]),
            Err(PacketError::OutOfRange { .. })
        ));
        assert_eq!(nb.read(7, &mut []), Ok(()));
    }

    #[test]
    fn a_data_length_beyond_the_mdls_is_an_error() {
        // 8 bytes of MDLs, but the net buffer claims 4 + 10.
        let built = build(&[b"abcd", b"efgh"], 4, 10);
        let nb = first(&built);
        assert_eq!(&nb.read_array::<4>(0).unwrap(), b"efgh");
        assert_eq!(nb.read(2, &mut [0; 4]), Err(PacketError::ChainTooShort));
        // A data offset past every MDL.
        let built = build(&[b"abcd"], 9, 1);
        assert_eq!(
            first(&built).read(0, &mut [0; 1]),
            Err(PacketError::ChainTooShort)
        );
    }

    #[test]
    fn unmapped_mdls_are_errors_only_when_their_bytes_are_read() {
        let mut built = build(&[b"abcd", b"efgh"], 0, 8);
        built.mdls[0].MdlFlags = 0;
        let nb = first(&built);
        assert_eq!(&nb.read_array::<2>(5).unwrap(), b"fg");
        assert_eq!(nb.read(0, &mut [0; 1]), Err(PacketError::NotMapped));
    }

    /// Stream data over two lists: `b"xxab"` (data from 2) then `b"cdef"`, the section starting
    /// at `b'b'` (MDL 0, byte 3) and `len` bytes long.
    fn stream_over(first: &mut Built, second: &mut Built, len: usize) -> sys::FWPS_STREAM_DATA0 {
        first.nbl.Next = &raw mut *second.nbl;
        let list = &raw mut *first.nbl;
        sys::FWPS_STREAM_DATA0 {
            flags: sys::FWPS_STREAM_FLAG_RECEIVE,
            dataOffset: sys::FWPS_STREAM_DATA_OFFSET0 {
                netBufferList: list,
                netBuffer: first.nbl.FirstNetBuffer,
                mdl: first.mdls.as_mut_ptr(),
                mdlOffset: 3,
                netBufferOffset: 0,
                streamDataOffset: 0,
            },
            dataLength: len,
            netBufferListChain: list,
        }
    }

    /// Reads `len` bytes from `offset` of `data`, through a fresh view.
    fn read_stream(
        data: &mut sys::FWPS_STREAM_DATA0,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, PacketError> {
        let mut packet = sys::FWPS_STREAM_CALLOUT_IO_PACKET0 {
            streamData: data,
            missedBytes: 0,
            countBytesRequired: 0,
            countBytesEnforced: 0,
            streamAction: sys::FWPS_STREAM_ACTION_NONE,
        };
        // SAFETY: everything it points to outlives the view, unchanged while it is used.
        let stream = unsafe { StreamData::from_layer_data((&raw mut packet).cast_const().cast()) }
            .expect("not null");
        assert_eq!(stream.flags(), sys::FWPS_STREAM_FLAG_RECEIVE);
        let mut out = alloc::vec![0; len];
        stream.read(offset, &mut out).map(|()| out)
    }

    #[test]
    fn stream_data_reads_from_its_offset_across_lists() {
        let mut first = build(&[b"xxab"], 2, 2);
        let mut second = build(&[b"cd", b"ef"], 0, 4);
        let mut data = stream_over(&mut first, &mut second, 5);
        assert_eq!(read_stream(&mut data, 0, 5).unwrap(), b"bcdef");
        assert_eq!(read_stream(&mut data, 3, 2).unwrap(), b"ef");
        assert_eq!(read_stream(&mut data, 5, 0).unwrap(), b"");
        assert_eq!(
            read_stream(&mut data, 4, 2),
            Err(PacketError::StreamOutOfRange {
                offset: 4,
                len: 2,
                data_length: 5
            })
        );
        // A section that claims more than the chain holds.
        data.dataLength = 9;
        assert_eq!(
            read_stream(&mut data, 0, 9),
            Err(PacketError::ChainTooShort)
        );
        // An offset before the data start of its net buffer.
        data.dataOffset.mdlOffset = 1;
        assert_eq!(
            read_stream(&mut data, 0, 1),
            Err(PacketError::StreamOffsetOutsideData)
        );
    }

    #[test]
    fn a_cyclic_mdl_chain_ends_in_an_error() {
        let mut built = build(&[b"", b""], 0, 1);
        let base = built.mdls.as_mut_ptr();
        built.mdls[1].Next = base;
        assert_eq!(
            first(&built).read(0, &mut [0; 1]),
            Err(PacketError::ChainTooLong)
        );
    }
}
