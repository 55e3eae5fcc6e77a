//! The packets the simulated network stack hands callouts in `layerData`: a real
//! `NET_BUFFER_LIST` with one `NET_BUFFER` over a chain of two MDLs, holding the IP header and a
//! TCP SYN or UDP header of a connection, with the data start where Microsoft's "Data offset
//! positions" table puts it for the layer.
//!
//! The chain is split in two MDLs three bytes into the transport header, so the transport
//! header's source port is in the first MDL and its destination port straddles both: a driver
//! that reads ports reads across MDLs, as it must on Windows, where the stack splits headers
//! from payload and miniports chain buffers.
//!
//! Modelled, not observed (INFERRED): at the outbound layers (OUTBOUND_TRANSPORT, an outbound
//! ALE_AUTH_CONNECT, ALE_FLOW_ESTABLISHED) the IP header does not exist yet — the stack adds it
//! below the transport layer — so the chain starts at the transport header and nothing lies
//! behind the data start. The TCP and UDP checksums are left 0 (as with checksum offload); the
//! IPv4 header checksum is computed.

use std::net::{IpAddr, SocketAddr};

use wfp_rs::layer::value::IpProtocol;
use wfp_rs::sys::{
    FWPS_INCOMING_METADATA_VALUES0, FWPS_METADATA_FIELD_IP_HEADER_SIZE,
    FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE, MDL, MDL_SOURCE_IS_NONPAGED_POOL, NET_BUFFER,
    NET_BUFFER_LIST, PVOID,
};

/// Where the data of the packet starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Past the IP and transport headers (inbound transport, ALE_AUTH_RECV_ACCEPT, inbound
    /// ALE_FLOW_ESTABLISHED).
    Payload,
    /// At the transport header, with no IP header built yet (the outbound layers).
    TransportHeader,
    /// At the transport header, the IP header behind it (the inbound IP packet layers).
    PastIpHeader,
    /// At the IP header (the outbound IP packet and forward layers).
    IpHeader,
}

/// What a packet is built from: a connection's endpoints and protocol, as they travel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Endpoints {
    pub protocol: IpProtocol,
    /// The sender's endpoint.
    pub source: SocketAddr,
    /// The receiver's endpoint.
    pub destination: SocketAddr,
}

/// A built packet: the structures and the bytes they describe, at stable heap addresses, freed
/// together when the classification is over.
pub(crate) struct SimPacket {
    nbl: Box<NET_BUFFER_LIST>,
    _net_buffer: Box<NET_BUFFER>,
    _mdls: Box<[MDL; 2]>,
    _bytes: Box<[u8]>,
    ip_header_size: u32,
    transport_header_size: u32,
}

// SAFETY: the raw pointers inside point only into the packet's own boxes; moving the packet to
// another thread moves its sole owner.
unsafe impl Send for SimPacket {}

/// The IPv4 header checksum: the ones' complement of the ones' complement sum of its 16-bit
/// words.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The transport header of a connection's first packet: a TCP SYN, a UDP header (no payload),
/// or nothing for other protocols.
fn transport_header(endpoints: &Endpoints) -> Vec<u8> {
    let (source, destination) = (endpoints.source.port(), endpoints.destination.port());
    match endpoints.protocol {
        IpProtocol::Tcp => {
            let mut tcp = Vec::with_capacity(20);
            tcp.extend_from_slice(&source.to_be_bytes());
            tcp.extend_from_slice(&destination.to_be_bytes());
            // The initial sequence number: any value; fixed, so runs repeat.
            tcp.extend_from_slice(&0x0001_0000u32.to_be_bytes());
            tcp.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment number
            tcp.push(5 << 4); // data offset: 5 words, no options
            tcp.push(0x02); // SYN
            tcp.extend_from_slice(&64_240u16.to_be_bytes()); // window
            tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum (offloaded), urgent pointer
            tcp
        }
        IpProtocol::Udp => {
            let mut udp = Vec::with_capacity(8);
            udp.extend_from_slice(&source.to_be_bytes());
            udp.extend_from_slice(&destination.to_be_bytes());
            udp.extend_from_slice(&8u16.to_be_bytes()); // length: the header alone
            udp.extend_from_slice(&[0, 0]); // checksum (offloaded)
            udp
        }
        _ => Vec::new(),
    }
}

/// The IP header in front of `payload_length` bytes of `protocol`.
fn ip_header(endpoints: &Endpoints, payload_length: usize) -> Vec<u8> {
    let protocol = u8::from(endpoints.protocol);
    match (endpoints.source.ip(), endpoints.destination.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let total = (20 + payload_length) as u16;
            let mut ip = Vec::with_capacity(20);
            ip.extend_from_slice(&[0x45, 0]); // version 4, 5 words; DSCP/ECN
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0]); // identification; don't fragment
            ip.extend_from_slice(&[128, protocol, 0, 0]); // TTL, protocol, checksum (below)
            ip.extend_from_slice(&source.octets());
            ip.extend_from_slice(&destination.octets());
            let checksum = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            ip
        }
        (source, destination) => {
            let to_v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let mut ip = Vec::with_capacity(40);
            ip.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class, flow label
            ip.extend_from_slice(&(payload_length as u16).to_be_bytes());
            ip.extend_from_slice(&[protocol, 128]); // next header, hop limit
            ip.extend_from_slice(&to_v6(source).octets());
            ip.extend_from_slice(&to_v6(destination).octets());
            ip
        }
    }
}

/// An MDL describing `bytes`, mapped (built from non-paged memory).
pub(crate) fn mdl_over(bytes: &mut [u8], next: *mut MDL) -> MDL {
    let address = bytes.as_mut_ptr() as usize;
    MDL {
        Next: next,
        Size: size_of::<MDL>() as i16,
        MdlFlags: MDL_SOURCE_IS_NONPAGED_POOL,
        Process: core::ptr::null_mut(),
        MappedSystemVa: bytes.as_mut_ptr().cast(),
        StartVa: (address & !0xFFF) as PVOID,
        ByteCount: bytes.len() as u32,
        ByteOffset: (address & 0xFFF) as u32,
    }
}

impl SimPacket {
    /// The first packet of a connection travelling from `source` to `destination`, with its
    /// data starting at `start`.
    pub(crate) fn build(endpoints: &Endpoints, start: Start) -> SimPacket {
        let transport = transport_header(endpoints);
        let ip = match start {
            Start::Payload | Start::PastIpHeader | Start::IpHeader => {
                ip_header(endpoints, transport.len())
            }
            Start::TransportHeader => Vec::new(),
        };
        let (ip_header_size, transport_header_size) = (ip.len() as u32, transport.len() as u32);
        let mut bytes: Box<[u8]> = [ip, transport].concat().into_boxed_slice();
        let data_offset = match start {
            Start::Payload => ip_header_size + transport_header_size,
            Start::PastIpHeader => ip_header_size,
            Start::TransportHeader | Start::IpHeader => 0,
        };
        let split = (ip_header_size as usize + 3).min(bytes.len());
        let (first, second) = bytes.split_at_mut(split);
        let mut mdls = Box::new([
            mdl_over(first, core::ptr::null_mut()),
            mdl_over(second, core::ptr::null_mut()),
        ]);
        mdls[0].Next = &raw mut mdls[1];
        // SAFETY: the NDIS structures are plain data (integers and raw pointers): zero is a valid
        // value of each, an unlinked, empty one.
        let mut net_buffer: Box<NET_BUFFER> = Box::new(unsafe { core::mem::zeroed() });
        net_buffer.MdlChain = &raw mut mdls[0];
        net_buffer.DataOffset = data_offset;
        net_buffer.DataLength = (bytes.len() as u32 - data_offset) as usize;
        // The MDL holding the data start, and the start's offset in it.
        let (current, offset) = if data_offset < mdls[0].ByteCount {
            (0, data_offset)
        } else {
            (1, data_offset - mdls[0].ByteCount)
        };
        net_buffer.CurrentMdl = &raw mut mdls[current];
        net_buffer.CurrentMdlOffset = offset;
        // SAFETY: as above.
        let mut nbl: Box<NET_BUFFER_LIST> = Box::new(unsafe { core::mem::zeroed() });
        nbl.FirstNetBuffer = &raw mut *net_buffer;
        SimPacket {
            nbl,
            _net_buffer: net_buffer,
            _mdls: mdls,
            _bytes: bytes,
            ip_header_size,
            transport_header_size,
        }
    }

    /// Marks the packet as one of connection attempt `origin` (see `inject.rs`).
    pub(crate) fn set_origin(&mut self, origin: u64) {
        super::inject::set_origin(&mut self.nbl, origin);
    }

    /// The `layerData` pointer: the net buffer list.
    pub(crate) fn layer_data(&mut self) -> PVOID {
        (&raw mut *self.nbl).cast()
    }

    /// Sets `ipHeaderSize` and `transportHeaderSize` in the metadata, as the stack does where
    /// the headers are in the packet.
    pub(crate) fn describe(&self, metadata: &mut FWPS_INCOMING_METADATA_VALUES0) {
        if self.ip_header_size != 0 {
            metadata.ipHeaderSize = self.ip_header_size;
            metadata.currentMetadataValues |= FWPS_METADATA_FIELD_IP_HEADER_SIZE;
        }
        metadata.transportHeaderSize = self.transport_header_size;
        metadata.currentMetadataValues |= FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE;
    }
}
