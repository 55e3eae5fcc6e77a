//! The messages of the example firewall, as they cross the filter-manager port between its
//! callout driver and its user-mode service.
//!
//! The driver asks with a [`ConnectionRequest`] ("may this process make this connection?") and
//! the service answers with a [`ConnectionReply`]. [`FirewallProtocol`] pairs them, so the driver
//! opens a `ServerPort<FirewallProtocol>`; the service, which receives and sends raw bytes through
//! `wfp_rs::user`, calls the same [`Message::decode`] and [`Message::encode`]. The crate is
//! `#![no_std]` (with `alloc`), so both sides link the one implementation.
//!
//! The driver does not build a [`ConnectionRequest`] (whose [`ImagePath`] owns up to 64 KiB):
//! it takes the image path where the classification holds it ([`PathBytes`]) and encodes the
//! request with its other fields ([`RequestHead`]) into one buffer of exactly the request's
//! length ([`RequestHead::encode_with_path`], which allocates nothing), then sends those bytes
//! as they are (`ServerPort::send_encoded`). The service decodes them into a
//! [`ConnectionRequest`].
//!
//! # Wire format
//!
//! Every integer is little-endian. Addresses are in network byte order (the octets as written,
//! `192.0.2.1` is `c0 00 02 01`); an IPv4 address fills the first 4 of its 16 bytes and the other
//! 12 are zero. Every reserved field and every unused flag bit is zero, and a decoder rejects a
//! message where it is not, so that a later version can give them a meaning.
//!
//! ## Request (driver → service): a 72-byte header, then the whole image path
//!
//! The header is [`RawRequestHeader`] (`#[repr(C)]`, no padding; its layout is pinned at compile
//! time):
//!
//! | Offset | Size | Field            | Meaning                                                  |
//! |-------:|-----:|------------------|----------------------------------------------------------|
//! | 0      | 4    | `magic`          | `"FWRQ"` ([`REQUEST_MAGIC`])                             |
//! | 4      | 2    | `version`        | [`VERSION`] (2)                                          |
//! | 6      | 2    | `reserved0`      | 0                                                        |
//! | 8      | 8    | `request_id`     | chosen by the driver, echoed by the reply                |
//! | 16     | 8    | `process_id`     | the connecting process                                   |
//! | 24     | 1    | `direction`      | 0 = outbound, 1 = inbound ([`Direction`])                |
//! | 25     | 1    | `ip_protocol`    | IANA protocol number (6 = TCP, 17 = UDP, ...)            |
//! | 26     | 1    | `ip_version`     | 4 or 6, for both addresses                               |
//! | 27     | 1    | `flags`          | 0 (no flag is defined in version 2)                      |
//! | 28     | 2    | `path_len`       | image path length in UTF-16 units, without the NUL, at most [`MAX_PATH_UNITS`] |
//! | 30     | 2    | `reserved1`      | 0                                                        |
//! | 32     | 2    | `local_port`     | local port (0 for protocols without ports)               |
//! | 34     | 2    | `remote_port`    | remote port                                              |
//! | 36     | 4    | `message_len`    | the whole request's length in bytes, `72 + 2 × (path_len + 1)` |
//! | 40     | 16   | `local_address`  | local address                                            |
//! | 56     | 16   | `remote_address` | remote address                                           |
//! | 72     | 2 × (`path_len` + 1) | path | the process image as an NT device path (`\Device\HarddiskVolume3\...`), UTF-16LE, then one NUL unit |
//!
//! A request is therefore between [`REQUEST_MIN_LEN`] (74, an empty path: the image is unknown,
//! as for the System process) and [`REQUEST_MAX_LEN`] (65608) bytes. Its length is stated twice,
//! by `message_len` and by `path_len`, and a decoder rejects the request unless both agree with
//! the number of bytes it received: a transport that hands over a buffer larger than the
//! message (an I/O control request's output buffer) cannot make a short request look longer,
//! nor a long one shorter. The path holds no NUL before its terminator. It is not required to
//! be well-formed UTF-16 (NT names may hold unpaired surrogates), so the service converts it
//! lossily for display and matching.
//!
//! ### The whole path, never a part of it
//!
//! A request carries the image path whole, or it is not sent. [`MAX_PATH_UNITS`] is 32767
//! UTF-16 units, `UNICODE_STRING_MAX_CHARS` of `ntdef.h`: a `UNICODE_STRING` states its length
//! in bytes in a `USHORT`, so no NT path is longer. The application id WFP hands a callout
//! (`FWPM_CONDITION_ALE_APP_ID`, an `FWP_BYTE_BLOB`) is such a path with a NUL after it
//! (INFERRED: that WFP builds it from the process image's `UNICODE_STRING`; the documentation
//! gives its type, not its bound). So every path Windows can produce fits, and there is no
//! "truncated" flag: version 1 cut paths at 520 units and marked them, and under a
//! default-allow policy a program started from a longer path escaped a deny rule naming its
//! file (`app = '**\nc.exe'`), which matched neither the cut path nor, in the service, one
//! marked as cut.
//!
//! The one bound left is defensive: an application id this format cannot carry whole (longer
//! than [`MAX_PATH_UNITS`], an odd number of bytes, a NUL inside) makes
//! [`PathBytes::from_app_id`] fail, and a driver must then decide without asking, never more
//! permissively than the service could have: the example driver denies such a connection,
//! whatever its default, counts it and logs it.
//!
//! ## Reply (service → driver): 24 bytes
//!
//! [`RawReply`] (`#[repr(C)]`, no padding):
//!
//! | Offset | Size | Field           | Meaning                                                   |
//! |-------:|-----:|-----------------|-----------------------------------------------------------|
//! | 0      | 4    | `magic`         | `"FWRP"` ([`REPLY_MAGIC`])                                |
//! | 4      | 2    | `version`       | [`VERSION`] (2)                                           |
//! | 6      | 1    | `verdict`       | 0 = deny, 1 = allow ([`Verdict`])                         |
//! | 7      | 1    | `reserved0`     | 0                                                         |
//! | 8      | 8    | `request_id`    | the request's, echoed                                     |
//! | 16     | 4    | `cache_seconds` | 0 = do not cache; else how long the driver may reuse the verdict, at most [`MAX_CACHE_SECONDS`] |
//! | 20     | 4    | `reserved1`     | 0                                                         |
//!
//! ## Commands (service → driver)
//!
//! The service also sends the driver commands — today one, revoking cached verdicts after a
//! rules reload — as buffered I/O control requests to the driver's control device; see
//! [`control`].
//!
//! # Validation
//!
//! Messages are encoded and decoded field by field, never by casting a buffer: a reply comes
//! from a user-mode process and is untrusted input to the kernel. `decode` accepts a message only
//! if re-encoding it gives back the same bytes, and otherwise returns a [`Malformed`] naming the
//! first field that is wrong; it never panics, whatever the input. The driver must still check
//! that a reply's `request_id` is the one it asked about ([`ConnectionReply::answers`]).
//!
//! # Example
//!
//! ```
//! use core::net::{IpAddr, Ipv4Addr};
//! use firewall_protocol::{
//!     CacheLifetime, ConnectionReply, ConnectionRequest, Direction, PathBytes, RequestHead,
//!     Verdict, ip_protocol, request_len,
//! };
//! use wfp_rs::port::Message;
//!
//! // The driver describes the connection, and takes the image path from the application id
//! // (UTF-16LE with a NUL after it) as it is...
//! let head = RequestHead {
//!     request_id: 1,
//!     process_id: 4242,
//!     direction: Direction::Outbound,
//!     ip_protocol: ip_protocol::TCP,
//!     local_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
//!     local_port: 50_000,
//!     remote_address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
//!     remote_port: 443,
//! };
//! let app_id: Vec<u8> = concat!(r"\device\harddiskvolume3\app.exe", "\0")
//!     .encode_utf16()
//!     .flat_map(u16::to_le_bytes)
//!     .collect();
//! let path = PathBytes::from_app_id(&app_id)?;
//! // ...into a buffer of exactly the request's length (in a driver: one pool allocation).
//! let mut bytes = vec![0u8; request_len(path.units())];
//! let len = head.encode_with_path(path, &mut bytes)?;
//! assert_eq!(len, bytes.len());
//!
//! // The service decodes it and answers...
//! let asked = ConnectionRequest::decode(&bytes)?;
//! assert_eq!(asked.head(), head);
//! assert_eq!(asked.image_path.to_string(), r"\device\harddiskvolume3\app.exe");
//! let reply = asked.reply(Verdict::Allow).cached_for(CacheLifetime::from_secs(60)?);
//! let mut reply_bytes = [0u8; ConnectionReply::MAX_LEN];
//! let reply_len = reply.encode(&mut reply_bytes)?;
//!
//! // ...and the driver checks the answer.
//! let answer = ConnectionReply::decode(&reply_bytes[..reply_len])?;
//! assert!(answer.answers(&asked));
//! assert_eq!(answer.request_id, head.request_id);
//! assert_eq!(answer.verdict, Verdict::Allow);
//! # Ok::<(), wfp_rs::port::Malformed>(())
//! ```

#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;
use core::mem::{offset_of, size_of};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::num::NonZeroU32;

use static_assertions::const_assert_eq;
use wfp_rs::ask::ChannelSpec;
use wfp_rs::inverted::{ControlCode, RequiredAccess};
use wfp_rs::port::{Malformed, Message, Protocol};

pub mod control;

/// The filter-manager port the driver creates and the service connects to.
pub const PORT_NAME: &str = r"\WfpRsFirewallPort";

/// The question channel's device, as the driver names it (`\Device\WfpRsFirewallAsk`): the
/// default way the driver asks (see [`ASK_CHANNEL`]).
pub const ASK_DEVICE_NAME: &str = "WfpRsFirewallAsk";
/// The question channel's device as user mode opens it (`wfp_rs::user::AskClient::open`).
pub const ASK_DEVICE_PATH: &str = r"\\.\WfpRsFirewallAsk";

/// The question channel ([`wfp_rs::ask`]) on [`ASK_DEVICE_NAME`]: the driver asks from
/// `classifyFn` without a work item, the service keeps wait requests pending and answers.
///
/// A question's body is an encoded [`ConnectionRequest`] whose image path has at most
/// [`ASK_MAX_PATH_UNITS`] units ([`ASK_MAX_QUESTION`] bytes, `max_question`), an answer's body an encoded [`ConnectionReply`] ([`REPLY_LEN`]
/// bytes, `max_answer`): the same messages as over the port, after the channel's own 16-byte
/// header (`wfp_rs::ask::encode_header`). The driver checks an answer as it checks a port reply:
/// it must decode and [`answer`](ConnectionReply::answers) the request it was asked for.
///
/// The codes are `CTL_CODE(0x8A5E, 0x810 / 0x811, METHOD_BUFFERED, FILE_ANY_ACCESS)`; who may
/// open the device at all is the driver's business (only its configured service).
pub const ASK_CHANNEL: ChannelSpec = ChannelSpec {
    wait: ControlCode::buffered(0x8A5E, 0x810, RequiredAccess::Any),
    answer: ControlCode::buffered(0x8A5E, 0x811, RequiredAccess::Any),
    max_question: ASK_MAX_QUESTION,
    max_answer: REPLY_LEN,
};

/// The longest image path a question on the channel carries, in UTF-16 units: `MAX_PATH`. The
/// channel allocates a slot of [`ASK_MAX_QUESTION`] bytes per question it may hold, at load
/// (about 1.2 MiB of non-paged pool for the driver's 2056 slots); a slot for a question of
/// [`REQUEST_MAX_LEN`] (64 KiB) would make that 128 MiB. The driver asks a question with a
/// longer path through the port instead, whole.
pub const ASK_MAX_PATH_UNITS: usize = 260;
/// The longest question on the channel: a request with a path of [`ASK_MAX_PATH_UNITS`] units.
pub const ASK_MAX_QUESTION: usize = request_len(ASK_MAX_PATH_UNITS);

/// `RawRequestHeader::magic`: `"FWRQ"` in memory.
pub const REQUEST_MAGIC: [u8; 4] = *b"FWRQ";
/// `RawReply::magic`: `"FWRP"` in memory.
pub const REPLY_MAGIC: [u8; 4] = *b"FWRP";
/// The protocol version both sides must speak. Version 2 carries the whole image path (see
/// [the crate documentation](crate#the-whole-path-never-a-part-of-it)).
pub const VERSION: u16 = 2;
/// The longest image path a request carries, in UTF-16 units, not counting the NUL terminator:
/// `UNICODE_STRING_MAX_CHARS` (`ntdef.h`), the longest NT path there is.
pub const MAX_PATH_UNITS: usize = 32_767;
/// The longest cache lifetime a reply may grant: one day.
pub const MAX_CACHE_SECONDS: u32 = 86_400;
/// The size of a request's fixed header, in bytes.
pub const REQUEST_HEADER_LEN: usize = size_of::<RawRequestHeader>();
/// The shortest request: the header and the terminator of an empty path.
pub const REQUEST_MIN_LEN: usize = request_len(0);
/// The longest request, 65608 bytes: the header and a path of [`MAX_PATH_UNITS`] units with its
/// terminator. A transport that carries requests (the filter-manager port, an inverted call's
/// output buffer) must take messages of this size.
pub const REQUEST_MAX_LEN: usize = request_len(MAX_PATH_UNITS);
/// The size of a reply, in bytes.
pub const REPLY_LEN: usize = size_of::<RawReply>();

/// The length of a request whose image path has `path_units` units.
pub const fn request_len(path_units: usize) -> usize {
    REQUEST_HEADER_LEN + 2 * (path_units + 1)
}

/// IANA numbers of the IP protocols a firewall usually names, for
/// [`ConnectionRequest::ip_protocol`] (any other number is carried as is).
pub mod ip_protocol {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
}

/// The fixed header of a request exactly as it lies on the wire (see the
/// [crate documentation](crate) for each field). Decoding goes bytes → `RawRequestHeader`
/// (lossless, never fails) → [`ConnectionRequest`] (validated).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawRequestHeader {
    /// [`REQUEST_MAGIC`].
    pub magic: [u8; 4],
    /// [`VERSION`].
    pub version: u16,
    /// Zero.
    pub reserved0: u16,
    /// The driver's identifier for this request, echoed by the reply.
    pub request_id: u64,
    /// The connecting process.
    pub process_id: u64,
    /// 0 = outbound, 1 = inbound.
    pub direction: u8,
    /// IANA protocol number.
    pub ip_protocol: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// Zero: no flag is defined.
    pub flags: u8,
    /// Image path length in UTF-16 units, without the terminator.
    pub path_len: u16,
    /// Zero.
    pub reserved1: u16,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// The whole request's length in bytes: [`request_len`]`(path_len)`.
    pub message_len: u32,
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub local_address: [u8; 16],
    /// Remote address, network byte order; IPv4 in the first 4 bytes.
    pub remote_address: [u8; 16],
}

const_assert_eq!(size_of::<RawRequestHeader>(), 72);
const_assert_eq!(offset_of!(RawRequestHeader, magic), 0);
const_assert_eq!(offset_of!(RawRequestHeader, version), 4);
const_assert_eq!(offset_of!(RawRequestHeader, reserved0), 6);
const_assert_eq!(offset_of!(RawRequestHeader, request_id), 8);
const_assert_eq!(offset_of!(RawRequestHeader, process_id), 16);
const_assert_eq!(offset_of!(RawRequestHeader, direction), 24);
const_assert_eq!(offset_of!(RawRequestHeader, ip_protocol), 25);
const_assert_eq!(offset_of!(RawRequestHeader, ip_version), 26);
const_assert_eq!(offset_of!(RawRequestHeader, flags), 27);
const_assert_eq!(offset_of!(RawRequestHeader, path_len), 28);
const_assert_eq!(offset_of!(RawRequestHeader, reserved1), 30);
const_assert_eq!(offset_of!(RawRequestHeader, local_port), 32);
const_assert_eq!(offset_of!(RawRequestHeader, remote_port), 34);
const_assert_eq!(offset_of!(RawRequestHeader, message_len), 36);
const_assert_eq!(REQUEST_MAX_LEN, 65_608);
const_assert_eq!(offset_of!(RawRequestHeader, local_address), 40);
const_assert_eq!(offset_of!(RawRequestHeader, remote_address), 56);

/// A reply exactly as it lies on the wire (see the [crate documentation](crate) for each field).
/// Decoding goes bytes → `RawReply` (lossless, never fails) → [`ConnectionReply`] (validated).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawReply {
    /// [`REPLY_MAGIC`].
    pub magic: [u8; 4],
    /// [`VERSION`].
    pub version: u16,
    /// 0 = deny, 1 = allow.
    pub verdict: u8,
    /// Zero.
    pub reserved0: u8,
    /// The request's identifier, echoed.
    pub request_id: u64,
    /// 0, or the seconds the verdict may be cached (at most [`MAX_CACHE_SECONDS`]).
    pub cache_seconds: u32,
    /// Zero.
    pub reserved1: u32,
}

const_assert_eq!(size_of::<RawReply>(), 24);
const_assert_eq!(offset_of!(RawReply, magic), 0);
const_assert_eq!(offset_of!(RawReply, version), 4);
const_assert_eq!(offset_of!(RawReply, verdict), 6);
const_assert_eq!(offset_of!(RawReply, reserved0), 7);
const_assert_eq!(offset_of!(RawReply, request_id), 8);
const_assert_eq!(offset_of!(RawReply, cache_seconds), 16);
const_assert_eq!(offset_of!(RawReply, reserved1), 20);

/// `N` bytes of `bytes` from `at`. Callers pass fixed-size arrays and constant offsets that the
/// layout assertions above keep in bounds.
fn take<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Writes `value` into `out` at `at`.
fn put(out: &mut [u8], at: usize, value: &[u8]) {
    out[at..at + value.len()].copy_from_slice(value);
}

impl RawRequestHeader {
    /// Reads a header from its wire bytes, without validating anything.
    pub fn from_bytes(bytes: &[u8; REQUEST_HEADER_LEN]) -> Self {
        type H = RawRequestHeader;
        RawRequestHeader {
            magic: take(bytes, offset_of!(H, magic)),
            version: u16::from_le_bytes(take(bytes, offset_of!(H, version))),
            reserved0: u16::from_le_bytes(take(bytes, offset_of!(H, reserved0))),
            request_id: u64::from_le_bytes(take(bytes, offset_of!(H, request_id))),
            process_id: u64::from_le_bytes(take(bytes, offset_of!(H, process_id))),
            direction: bytes[offset_of!(H, direction)],
            ip_protocol: bytes[offset_of!(H, ip_protocol)],
            ip_version: bytes[offset_of!(H, ip_version)],
            flags: bytes[offset_of!(H, flags)],
            path_len: u16::from_le_bytes(take(bytes, offset_of!(H, path_len))),
            reserved1: u16::from_le_bytes(take(bytes, offset_of!(H, reserved1))),
            local_port: u16::from_le_bytes(take(bytes, offset_of!(H, local_port))),
            remote_port: u16::from_le_bytes(take(bytes, offset_of!(H, remote_port))),
            message_len: u32::from_le_bytes(take(bytes, offset_of!(H, message_len))),
            local_address: take(bytes, offset_of!(H, local_address)),
            remote_address: take(bytes, offset_of!(H, remote_address)),
        }
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        type H = RawRequestHeader;
        let mut out = [0u8; REQUEST_HEADER_LEN];
        put(&mut out, offset_of!(H, magic), &self.magic);
        put(
            &mut out,
            offset_of!(H, version),
            &self.version.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, reserved0),
            &self.reserved0.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, request_id),
            &self.request_id.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, process_id),
            &self.process_id.to_le_bytes(),
        );
        out[offset_of!(H, direction)] = self.direction;
        out[offset_of!(H, ip_protocol)] = self.ip_protocol;
        out[offset_of!(H, ip_version)] = self.ip_version;
        out[offset_of!(H, flags)] = self.flags;
        put(
            &mut out,
            offset_of!(H, path_len),
            &self.path_len.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, reserved1),
            &self.reserved1.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, local_port),
            &self.local_port.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, remote_port),
            &self.remote_port.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(H, message_len),
            &self.message_len.to_le_bytes(),
        );
        put(&mut out, offset_of!(H, local_address), &self.local_address);
        put(
            &mut out,
            offset_of!(H, remote_address),
            &self.remote_address,
        );
        out
    }
}

impl RawReply {
    /// Reads a reply from its wire bytes, without validating anything.
    pub fn from_bytes(bytes: &[u8; REPLY_LEN]) -> Self {
        type R = RawReply;
        RawReply {
            magic: take(bytes, offset_of!(R, magic)),
            version: u16::from_le_bytes(take(bytes, offset_of!(R, version))),
            verdict: bytes[offset_of!(R, verdict)],
            reserved0: bytes[offset_of!(R, reserved0)],
            request_id: u64::from_le_bytes(take(bytes, offset_of!(R, request_id))),
            cache_seconds: u32::from_le_bytes(take(bytes, offset_of!(R, cache_seconds))),
            reserved1: u32::from_le_bytes(take(bytes, offset_of!(R, reserved1))),
        }
    }

    /// The reply's wire bytes.
    pub fn to_bytes(&self) -> [u8; REPLY_LEN] {
        type R = RawReply;
        let mut out = [0u8; REPLY_LEN];
        put(&mut out, offset_of!(R, magic), &self.magic);
        put(
            &mut out,
            offset_of!(R, version),
            &self.version.to_le_bytes(),
        );
        out[offset_of!(R, verdict)] = self.verdict;
        out[offset_of!(R, reserved0)] = self.reserved0;
        put(
            &mut out,
            offset_of!(R, request_id),
            &self.request_id.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(R, cache_seconds),
            &self.cache_seconds.to_le_bytes(),
        );
        put(
            &mut out,
            offset_of!(R, reserved1),
            &self.reserved1.to_le_bytes(),
        );
        out
    }
}

/// Which way a connection goes, seen from this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This machine connects out (ALE_AUTH_CONNECT). Wire value 0.
    Outbound,
    /// A remote peer connects in (ALE_AUTH_RECV_ACCEPT). Wire value 1.
    Inbound,
}

impl Direction {
    /// `"outbound"` or `"inbound"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    const fn to_wire(self) -> u8 {
        match self {
            Direction::Outbound => 0,
            Direction::Inbound => 1,
        }
    }

    const fn from_wire(byte: u8) -> Result<Self, Malformed> {
        match byte {
            0 => Ok(Direction::Outbound),
            1 => Ok(Direction::Inbound),
            _ => Err(Malformed("the direction is 0 (outbound) or 1 (inbound)")),
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The service's answer, and the driver's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the connection through. Wire value 1.
    Allow,
    /// Block it. Wire value 0.
    Deny,
}

impl Verdict {
    /// `"allow"` or `"deny"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }

    const fn to_wire(self) -> u8 {
        match self {
            Verdict::Deny => 0,
            Verdict::Allow => 1,
        }
    }

    const fn from_wire(byte: u8) -> Result<Self, Malformed> {
        match byte {
            0 => Ok(Verdict::Deny),
            1 => Ok(Verdict::Allow),
            _ => Err(Malformed("the verdict is 0 (deny) or 1 (allow)")),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A process image path: an NT device path (`\Device\HarddiskVolume3\Windows\app.exe`) of at
/// most [`MAX_PATH_UNITS`] UTF-16 units with no NUL in it, whole: there is no truncated path.
///
/// It owns its units (a heap allocation sized to the path): it is what the service decodes. A
/// driver builds its requests without it, from the application id's bytes ([`PathBytes`],
/// [`RequestHead::encode_with_path`]).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ImagePath {
    /// At most `MAX_PATH_UNITS` units, none of them NUL.
    units: Vec<u16>,
}

impl ImagePath {
    /// The empty path: the image is unknown (the System process).
    pub const fn empty() -> Self {
        ImagePath { units: Vec::new() }
    }

    /// The path `units` (without a terminator). Longer than [`MAX_PATH_UNITS`] is an error, as
    /// is a NUL unit: a path is carried whole or not at all.
    pub fn new(units: &[u16]) -> Result<Self, Malformed> {
        Self::from_units(units.iter().copied())
    }

    /// The path made of `units`, checked as by [`new`](Self::new); reads at most one unit past
    /// [`MAX_PATH_UNITS`].
    fn from_units(units: impl Iterator<Item = u16>) -> Result<Self, Malformed> {
        // Copied in one pass into a vector sized once, then checked, rather than checked and
        // pushed a unit at a time: the service decodes a path per question. A NUL among the
        // units read is reported before the length, as a unit-by-unit check would.
        let mut path = Vec::with_capacity(units.size_hint().0.min(MAX_PATH_UNITS + 1));
        path.extend(units.take(MAX_PATH_UNITS + 1));
        if path.contains(&0) {
            return Err(Malformed("the image path contains a NUL unit"));
        }
        if path.len() > MAX_PATH_UNITS {
            return Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
        }
        Ok(ImagePath { units: path })
    }

    /// The path's UTF-16 units, without a terminator.
    pub fn as_units(&self) -> &[u16] {
        &self.units
    }

    /// Its length in UTF-16 units.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether the path is empty (the image is unknown).
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The path's characters, with U+FFFD for each unpaired surrogate.
    pub fn chars_lossy(&self) -> impl Iterator<Item = char> + '_ {
        char::decode_utf16(self.units.iter().copied())
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
    }
}

/// `path` encoded as UTF-16; a NUL character, or more than [`MAX_PATH_UNITS`] units, is an
/// error.
impl core::str::FromStr for ImagePath {
    type Err = Malformed;

    fn from_str(path: &str) -> Result<Self, Malformed> {
        Self::from_units(path.encode_utf16())
    }
}

/// The path, lossily (see [`ImagePath::chars_lossy`]).
impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.chars_lossy() {
            f.write_char(c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImagePath(\"{self}\")")
    }
}

/// An image path as the bytes a request carries it in (UTF-16LE, without the terminator),
/// borrowed from wherever it lies and checked to fit a request whole: what a driver takes from
/// the `ALE_APP_ID` field of a classification and copies into its request as it is, with no
/// intermediate buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PathBytes<'a> {
    /// An even number of bytes, at most `2 * MAX_PATH_UNITS`, with no NUL unit.
    bytes: &'a [u8],
}

impl<'a> PathBytes<'a> {
    /// The path of an application id (`FWP_BYTE_BLOB` data): UTF-16LE units, the last of which
    /// may be a NUL terminator (dropped). An odd number of bytes, a NUL unit before the last,
    /// or more than [`MAX_PATH_UNITS`] units is an error: such a path cannot be carried whole,
    /// and a request never carries a part of one. An empty blob is the empty path.
    pub fn from_app_id(bytes: &'a [u8]) -> Result<Self, Malformed> {
        if !bytes.len().is_multiple_of(2) {
            return Err(Malformed(
                "the application id is not whole UTF-16 units (an odd number of bytes)",
            ));
        }
        let bytes = match bytes {
            [path @ .., 0, 0] => path,
            path => path,
        };
        if bytes.chunks_exact(2).any(|unit| unit == [0, 0]) {
            return Err(Malformed("the image path contains a NUL unit"));
        }
        if bytes.len() / 2 > MAX_PATH_UNITS {
            return Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
        }
        Ok(PathBytes { bytes })
    }

    /// The path's length in UTF-16 units.
    pub fn units(&self) -> usize {
        self.bytes.len() / 2
    }

    /// The path's bytes: UTF-16LE, without a terminator.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl fmt::Debug for PathBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = self
            .bytes
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]));
        f.write_str("PathBytes(\"")?;
        for c in char::decode_utf16(units) {
            fmt::Write::write_char(f, c.unwrap_or(char::REPLACEMENT_CHARACTER))?;
        }
        f.write_str("\")")
    }
}

/// A request's fields but the image path: what a driver knows of a connection besides its
/// path, small enough to keep on a kernel stack and in a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestHead {
    /// The driver's identifier for this request; the reply echoes it.
    pub request_id: u64,
    /// The connecting process (`FWPS_METADATA_FIELD_PROCESS_ID`).
    pub process_id: u64,
    /// Outbound or inbound.
    pub direction: Direction,
    /// IANA protocol number ([`ip_protocol`] names the usual ones).
    pub ip_protocol: u8,
    /// The local address. Must be of the same IP version as `remote_address`, or encoding
    /// fails.
    pub local_address: IpAddr,
    /// The local port (0 for protocols without ports).
    pub local_port: u16,
    /// The remote address.
    pub remote_address: IpAddr,
    /// The remote port (0 for protocols without ports).
    pub remote_port: u16,
}

impl RequestHead {
    /// Encodes the request made of this head and `path` into `out`, which must hold at least
    /// [`request_len`]`(path.units())` bytes, and returns that length. Allocates nothing and
    /// copies the path's bytes once: a driver sizes one buffer to the request and fills it
    /// here, at any IRQL.
    pub fn encode_with_path(
        &self,
        path: PathBytes<'_>,
        out: &mut [u8],
    ) -> Result<usize, Malformed> {
        let tail = self.encode_header(path.units(), out)?;
        let (units, terminator) = tail.split_at_mut(path.bytes.len());
        units.copy_from_slice(path.bytes);
        terminator.fill(0);
        Ok(request_len(path.units()))
    }

    /// Writes the header of a request with a path of `path_units` units and returns the
    /// `2 * (path_units + 1)` bytes after it, for the path and its terminator.
    fn encode_header<'o>(
        &self,
        path_units: usize,
        out: &'o mut [u8],
    ) -> Result<&'o mut [u8], Malformed> {
        if path_units > MAX_PATH_UNITS {
            return Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
        }
        let len = request_len(path_units);
        let out = out
            .get_mut(..len)
            .ok_or(Malformed("the buffer is too short for this request"))?;
        let (local_address, local_version) = address_to_wire(self.local_address);
        let (remote_address, remote_version) = address_to_wire(self.remote_address);
        if local_version != remote_version {
            return Err(Malformed(
                "the local and remote addresses are of different IP versions",
            ));
        }
        let header = RawRequestHeader {
            magic: REQUEST_MAGIC,
            version: VERSION,
            reserved0: 0,
            request_id: self.request_id,
            process_id: self.process_id,
            direction: self.direction.to_wire(),
            ip_protocol: self.ip_protocol,
            ip_version: local_version,
            flags: 0,
            // At most MAX_PATH_UNITS (32767), checked above.
            path_len: path_units as u16,
            reserved1: 0,
            local_port: self.local_port,
            remote_port: self.remote_port,
            // At most REQUEST_MAX_LEN (65608).
            message_len: len as u32,
            local_address,
            remote_address,
        };
        let (head, tail) = out.split_at_mut(REQUEST_HEADER_LEN);
        head.copy_from_slice(&header.to_bytes());
        Ok(tail)
    }
}

/// Driver → service: may this process make this connection?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionRequest {
    /// The driver's identifier for this request; the reply echoes it.
    pub request_id: u64,
    /// The connecting process (`FWPS_METADATA_FIELD_PROCESS_ID`).
    pub process_id: u64,
    /// Outbound or inbound.
    pub direction: Direction,
    /// IANA protocol number ([`ip_protocol`] names the usual ones).
    pub ip_protocol: u8,
    /// The local address. Must be of the same IP version as `remote_address`, or `encode`
    /// fails.
    pub local_address: IpAddr,
    /// The local port (0 for protocols without ports).
    pub local_port: u16,
    /// The remote address.
    pub remote_address: IpAddr,
    /// The remote port (0 for protocols without ports).
    pub remote_port: u16,
    /// The process image, as an NT device path, whole; empty when unknown.
    pub image_path: ImagePath,
}

impl ConnectionRequest {
    /// The request made of `head` and `image_path`.
    pub fn new(head: RequestHead, image_path: ImagePath) -> Self {
        ConnectionRequest {
            request_id: head.request_id,
            process_id: head.process_id,
            direction: head.direction,
            ip_protocol: head.ip_protocol,
            local_address: head.local_address,
            local_port: head.local_port,
            remote_address: head.remote_address,
            remote_port: head.remote_port,
            image_path,
        }
    }

    /// Its fields but the image path.
    pub fn head(&self) -> RequestHead {
        RequestHead {
            request_id: self.request_id,
            process_id: self.process_id,
            direction: self.direction,
            ip_protocol: self.ip_protocol,
            local_address: self.local_address,
            local_port: self.local_port,
            remote_address: self.remote_address,
            remote_port: self.remote_port,
        }
    }

    /// The reply to this request with `verdict`, not to be cached.
    pub fn reply(&self, verdict: Verdict) -> ConnectionReply {
        ConnectionReply::new(self.request_id, verdict)
    }
}

/// How long the driver may answer the same connection from its cache: 1 to
/// [`MAX_CACHE_SECONDS`] seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheLifetime(NonZeroU32);

impl CacheLifetime {
    /// The longest lifetime, [`MAX_CACHE_SECONDS`].
    pub const MAX: CacheLifetime = match NonZeroU32::new(MAX_CACHE_SECONDS) {
        Some(secs) => CacheLifetime(secs),
        None => panic!("MAX_CACHE_SECONDS is not zero"),
    };

    /// `secs` seconds; 0 or more than [`MAX_CACHE_SECONDS`] is an error.
    pub const fn from_secs(secs: u32) -> Result<Self, Malformed> {
        if secs > MAX_CACHE_SECONDS {
            return Err(Malformed("the cache lifetime exceeds MAX_CACHE_SECONDS"));
        }
        match NonZeroU32::new(secs) {
            Some(secs) => Ok(CacheLifetime(secs)),
            None => Err(Malformed("a cache lifetime is at least one second")),
        }
    }

    /// The lifetime in seconds.
    pub const fn as_secs(self) -> u32 {
        self.0.get()
    }
}

/// Service → driver: the verdict for the request it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionReply {
    /// The request's identifier, echoed.
    pub request_id: u64,
    /// The answer.
    pub verdict: Verdict,
    /// How long the driver may reuse the verdict for the same process, remote endpoint and
    /// protocol (and, inbound, local port); `None`: ask again next time.
    pub cache: Option<CacheLifetime>,
}

impl ConnectionReply {
    /// `verdict` for request `request_id`, not to be cached.
    pub const fn new(request_id: u64, verdict: Verdict) -> Self {
        ConnectionReply {
            request_id,
            verdict,
            cache: None,
        }
    }

    /// Allow request `request_id`, not to be cached.
    pub const fn allow(request_id: u64) -> Self {
        Self::new(request_id, Verdict::Allow)
    }

    /// Deny request `request_id`, not to be cached.
    pub const fn deny(request_id: u64) -> Self {
        Self::new(request_id, Verdict::Deny)
    }

    /// This reply, with the verdict cacheable for `lifetime`.
    pub const fn cached_for(self, lifetime: CacheLifetime) -> Self {
        ConnectionReply {
            cache: Some(lifetime),
            ..self
        }
    }

    /// Whether this reply is the answer to `request` (its identifier is echoed).
    pub fn answers(&self, request: &ConnectionRequest) -> bool {
        self.request_id == request.request_id
    }
}

/// The firewall's port protocol: a [`ConnectionRequest`] out, a [`ConnectionReply`] back.
#[derive(Debug)]
pub struct FirewallProtocol;

impl Protocol for FirewallProtocol {
    type Request = ConnectionRequest;
    type Reply = ConnectionReply;
}

/// `address` as the wire's 16 bytes and IP version.
fn address_to_wire(address: IpAddr) -> ([u8; 16], u8) {
    match address {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            (out, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

/// The address in `bytes`, for IP version `version` (already checked to be 4 or 6).
fn address_from_wire(bytes: [u8; 16], version: u8) -> Result<IpAddr, Malformed> {
    if version == 6 {
        return Ok(IpAddr::V6(Ipv6Addr::from(bytes)));
    }
    if bytes[4..] != [0u8; 12] {
        return Err(Malformed("an IPv4 address has non-zero padding"));
    }
    Ok(IpAddr::V4(Ipv4Addr::new(
        bytes[0], bytes[1], bytes[2], bytes[3],
    )))
}

impl Message for ConnectionRequest {
    const MIN_LEN: usize = REQUEST_MIN_LEN;
    const MAX_LEN: usize = REQUEST_MAX_LEN;

    fn encoded_len(&self) -> usize {
        request_len(self.image_path.len())
    }

    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
        let path = self.image_path.as_units();
        let tail = self.head().encode_header(path.len(), out)?;
        // `tail` is 2 * (path.len() + 1) bytes: the units, then the NUL.
        let units = path.iter().copied().chain(core::iter::once(0u16));
        for (slot, unit) in tail.chunks_exact_mut(2).zip(units) {
            slot.copy_from_slice(&unit.to_le_bytes());
        }
        Ok(request_len(path.len()))
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        if bytes.len() < REQUEST_MIN_LEN {
            return Err(Malformed(
                "a request is shorter than its header and path terminator",
            ));
        }
        if bytes.len() > REQUEST_MAX_LEN {
            return Err(Malformed("a request is longer than REQUEST_MAX_LEN"));
        }
        let (head, tail) = bytes.split_at(REQUEST_HEADER_LEN);
        let head: &[u8; REQUEST_HEADER_LEN] = head
            .try_into()
            .map_err(|_| Malformed("a request is shorter than its header"))?;
        let header = RawRequestHeader::from_bytes(head);
        if header.magic != REQUEST_MAGIC {
            return Err(Malformed("bad request magic"));
        }
        if header.version != VERSION {
            return Err(Malformed("unsupported protocol version"));
        }
        if header.reserved0 != 0 || header.reserved1 != 0 {
            return Err(Malformed("reserved request fields are not zero"));
        }
        // Both lengths are checked against the bytes received, before anything is read by
        // them.
        if usize::try_from(header.message_len).ok() != Some(bytes.len()) {
            return Err(Malformed(
                "the request's message_len is not the length received",
            ));
        }
        let path_len = usize::from(header.path_len);
        if path_len > MAX_PATH_UNITS {
            return Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
        }
        if bytes.len() != request_len(path_len) {
            return Err(Malformed(
                "the request length does not match its image path length",
            ));
        }
        let direction = Direction::from_wire(header.direction)?;
        if header.ip_version != 4 && header.ip_version != 6 {
            return Err(Malformed("the IP version is 4 or 6"));
        }
        let local_address = address_from_wire(header.local_address, header.ip_version)?;
        let remote_address = address_from_wire(header.remote_address, header.ip_version)?;
        if header.flags != 0 {
            return Err(Malformed("unknown request flags are set"));
        }
        // `tail` is exactly 2 * (path_len + 1) bytes: the path, then its terminator.
        let (path, terminator) = tail.split_at(2 * path_len);
        if terminator != [0, 0] {
            return Err(Malformed("the image path is not NUL-terminated"));
        }
        let image_path = ImagePath::from_units(
            path.chunks_exact(2)
                .map(|pair| u16::from_le_bytes([pair[0], pair[1]])),
        )?;
        Ok(ConnectionRequest {
            request_id: header.request_id,
            process_id: header.process_id,
            direction,
            ip_protocol: header.ip_protocol,
            local_address,
            local_port: header.local_port,
            remote_address,
            remote_port: header.remote_port,
            image_path,
        })
    }
}

impl Message for ConnectionReply {
    const MIN_LEN: usize = REPLY_LEN;
    const MAX_LEN: usize = REPLY_LEN;

    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
        let out = out
            .get_mut(..REPLY_LEN)
            .ok_or(Malformed("the buffer is too short for a reply"))?;
        let raw = RawReply {
            magic: REPLY_MAGIC,
            version: VERSION,
            verdict: self.verdict.to_wire(),
            reserved0: 0,
            request_id: self.request_id,
            cache_seconds: self.cache.map_or(0, CacheLifetime::as_secs),
            reserved1: 0,
        };
        out.copy_from_slice(&raw.to_bytes());
        Ok(REPLY_LEN)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        let bytes: &[u8; REPLY_LEN] = bytes
            .try_into()
            .map_err(|_| Malformed("a reply is 24 bytes"))?;
        let raw = RawReply::from_bytes(bytes);
        if raw.magic != REPLY_MAGIC {
            return Err(Malformed("bad reply magic"));
        }
        if raw.version != VERSION {
            return Err(Malformed("unsupported protocol version"));
        }
        let verdict = Verdict::from_wire(raw.verdict)?;
        if raw.reserved0 != 0 || raw.reserved1 != 0 {
            return Err(Malformed("reserved reply fields are not zero"));
        }
        let cache = match raw.cache_seconds {
            0 => None,
            secs => Some(CacheLifetime::from_secs(secs)?),
        };
        Ok(ConnectionReply {
            request_id: raw.request_id,
            verdict,
            cache,
        })
    }
}
