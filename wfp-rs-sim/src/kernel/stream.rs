//! The stream data the simulated TCP stack hands callouts at the stream layers: a real
//! `FWPS_STREAM_CALLOUT_IO_PACKET0` whose `FWPS_STREAM_DATA0` describes the indicated bytes in
//! one `NET_BUFFER_LIST` with one `NET_BUFFER` over a chain of MDLs, one MDL per piece the
//! harness gives, so a callout that reads the stream reads across MDLs.
//!
//! Modelled from `fwpsk.h` and Microsoft's documentation of the structures: the direction flag
//! (`FWPS_STREAM_FLAG_SEND` or `FWPS_STREAM_FLAG_RECEIVE`), `dataOffset` at the first byte of
//! the indication, `dataLength`, and the callout's answer (`streamAction`,
//! `countBytesRequired`, `countBytesEnforced`) starting as `FWPS_STREAM_ACTION_NONE` and 0.
//! INFERRED: how the TCP stack cuts a stream into indications and buffers (here: as the harness
//! says); `missedBytes` is always 0 (no heavier callout skips data here).

use wfp_rs::sys::{
    FWPS_STREAM_ACTION_NONE, FWPS_STREAM_CALLOUT_IO_PACKET0, FWPS_STREAM_DATA_OFFSET0,
    FWPS_STREAM_DATA0, MDL, NET_BUFFER, NET_BUFFER_LIST, PVOID,
};

use super::packet::mdl_over;

/// One stream indication: the structures and the bytes they describe, at stable heap
/// addresses, freed together when the classification is over.
pub(crate) struct SimStream {
    io_packet: Box<FWPS_STREAM_CALLOUT_IO_PACKET0>,
    _data: Box<FWPS_STREAM_DATA0>,
    _nbl: Box<NET_BUFFER_LIST>,
    _net_buffer: Box<NET_BUFFER>,
    _mdls: Box<[MDL]>,
    _pieces: Vec<Box<[u8]>>,
}

// SAFETY: the raw pointers inside point only into the indication's own boxes; moving it to
// another thread moves their sole owner.
unsafe impl Send for SimStream {}

impl SimStream {
    /// An indication of the bytes of `pieces`, in order, one MDL per non-empty piece, with the
    /// `FWPS_STREAM_FLAG_*` bits `flags`.
    pub(crate) fn build(pieces: &[&[u8]], flags: u32) -> SimStream {
        let mut pieces: Vec<Box<[u8]>> = pieces
            .iter()
            .filter(|piece| !piece.is_empty())
            .map(|piece| Box::from(*piece))
            .collect();
        let mut mdls: Box<[MDL]> = pieces
            .iter_mut()
            .map(|piece| mdl_over(piece, core::ptr::null_mut()))
            .collect();
        // Linked once the MDLs are at their final addresses (inside the box).
        for index in 1..mdls.len() {
            let next = &raw mut mdls[index];
            mdls[index - 1].Next = next;
        }
        let length: usize = pieces.iter().map(|piece| piece.len()).sum();
        let first_mdl = mdls
            .first_mut()
            .map_or(core::ptr::null_mut(), |mdl| mdl as *mut MDL);
        // SAFETY: the NDIS structures are plain data (integers and raw pointers): zero is a valid
        // value of each, an unlinked, empty one.
        let mut net_buffer: Box<NET_BUFFER> = Box::new(unsafe { core::mem::zeroed() });
        net_buffer.MdlChain = first_mdl;
        net_buffer.CurrentMdl = first_mdl;
        net_buffer.DataLength = length;
        // SAFETY: as above.
        let mut nbl: Box<NET_BUFFER_LIST> = Box::new(unsafe { core::mem::zeroed() });
        nbl.FirstNetBuffer = &raw mut *net_buffer;
        let mut data = Box::new(FWPS_STREAM_DATA0 {
            flags,
            dataOffset: FWPS_STREAM_DATA_OFFSET0 {
                netBufferList: &raw mut *nbl,
                netBuffer: &raw mut *net_buffer,
                mdl: first_mdl,
                mdlOffset: 0,
                netBufferOffset: 0,
                streamDataOffset: 0,
            },
            dataLength: length,
            netBufferListChain: &raw mut *nbl,
        });
        let io_packet = Box::new(FWPS_STREAM_CALLOUT_IO_PACKET0 {
            streamData: &raw mut *data,
            missedBytes: 0,
            countBytesRequired: 0,
            countBytesEnforced: 0,
            streamAction: FWPS_STREAM_ACTION_NONE,
        });
        SimStream {
            io_packet,
            _data: data,
            _nbl: nbl,
            _net_buffer: net_buffer,
            _mdls: mdls,
            _pieces: pieces,
        }
    }

    /// The `layerData` pointer: the io packet.
    pub(crate) fn layer_data(&mut self) -> PVOID {
        (&raw mut *self.io_packet).cast()
    }

    /// What the callouts left in the io packet: `streamAction`, `countBytesRequired`,
    /// `countBytesEnforced`.
    pub(crate) fn answer(&self) -> (i32, u32, usize) {
        let packet = &*self.io_packet;
        (
            packet.streamAction,
            packet.countBytesRequired,
            packet.countBytesEnforced,
        )
    }
}
