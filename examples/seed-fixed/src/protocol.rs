//! The messages between the driver and its user-mode service, as they cross the filter-manager
//! port or the question channel ([`CHANNEL`]).
//!
//! Both are 16 bytes, little-endian, laid out as these C structures (no padding):
//!
//! ```c
//! // Driver -> service: may this process connect?
//! typedef struct SEED_REQUEST {
//!     UINT32 Magic;      // 'SEDQ': SEED_REQUEST_MAGIC
//!     UINT16 Version;    // SEED_PROTOCOL_VERSION (1)
//!     UINT16 Reserved;   // 0
//!     UINT64 ProcessId;
//! } SEED_REQUEST;
//!
//! // Service -> driver (after the FILTER_REPLY_HEADER): the answer.
//! typedef struct SEED_REPLY {
//!     UINT32 Magic;      // 'SEDA': SEED_REPLY_MAGIC
//!     UINT16 Version;    // SEED_PROTOCOL_VERSION (1)
//!     UINT8  Verdict;    // 0 = block, 1 = allow
//!     UINT8  Reserved;   // 0
//!     UINT64 ProcessId;  // the request's, echoed
//! } SEED_REPLY;
//! ```
//!
//! They are encoded and decoded by hand through [`Message`], never by casting a buffer: the
//! reply comes from a user-mode process, so it is untrusted input to the kernel. `decode`
//! rejects anything it does not fully understand (wrong magic or version, a verdict other than
//! 0 or 1, non-zero reserved bytes), and the driver also checks that the echoed process id is
//! the one it asked about. Replies of the wrong length never reach `decode`: the SDK rejects
//! them against [`Message::MIN_LEN`] and [`Message::MAX_LEN`].
//!
//! The service side uses the same implementations: it decodes requests and encodes replies.
//!
//! Through the question channel the same two messages are the bodies of a question and of its
//! answer; the channel adds its own header (the question's id and the body's length) around
//! them, and the service's [`AskClient`] takes it off and puts it on.
//!
//! [`AskClient`]: https://docs.rs/wfp-rs/latest/wfp_rs/user/struct.AskClient.html
//!
//! ```
//! use seed_fixed::protocol::{Verdict, VerdictReply, VerdictRequest};
//! use wfp_rs::port::Message;
//!
//! // What the service does with a message from the driver.
//! let mut request = [0u8; 16];
//! VerdictRequest { pid: 4242 }.encode(&mut request).unwrap();
//! let asked = VerdictRequest::decode(&request).unwrap();
//! let mut reply = [0u8; 16];
//! VerdictReply { pid: asked.pid, verdict: Verdict::Allow }.encode(&mut reply).unwrap();
//! assert_eq!(VerdictReply::decode(&reply).unwrap().verdict, Verdict::Allow);
//! ```

use wfp_rs::ask::ChannelSpec;
use wfp_rs::inverted::{ControlCode, RequiredAccess};
use wfp_rs::port::{Malformed, Message, Protocol};

/// `SEED_REQUEST::Magic`: `"SEDQ"` in memory.
pub const REQUEST_MAGIC: [u8; 4] = *b"SEDQ";
/// `SEED_REPLY::Magic`: `"SEDA"` in memory.
pub const REPLY_MAGIC: [u8; 4] = *b"SEDA";
/// The protocol version both sides must speak.
pub const VERSION: u16 = 1;
/// The size of both messages, in bytes.
pub const MESSAGE_LEN: usize = 16;

/// The question channel both sides agree on (the driver's `AskChannel`, the service's
/// `AskClient`): a [`VerdictRequest`] is the question, a [`VerdictReply`] the answer.
///
/// ```
/// use seed_fixed::protocol::{CHANNEL, MESSAGE_LEN};
/// // What the service's wait requests must hold: the channel's 16-byte header and a request.
/// assert_eq!(CHANNEL.wait_output_len(), 16 + MESSAGE_LEN);
/// ```
pub const CHANNEL: ChannelSpec = ChannelSpec {
    // Function codes 0x800 and up are the vendor's; the device type too (0x8000 and up).
    wait: ControlCode::buffered(0x8000, 0x8A0, RequiredAccess::Any),
    answer: ControlCode::buffered(0x8000, 0x8A1, RequiredAccess::Any),
    max_question: MESSAGE_LEN,
    max_answer: MESSAGE_LEN,
};

/// The service's answer, and the driver's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the connection through.
    Allow,
    /// Block it.
    Block,
}

impl Verdict {
    /// `"allow"` or `"block"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
        }
    }
}

impl core::fmt::Display for Verdict {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Driver → service: may process `pid` connect?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictRequest {
    /// The process id of the connecting process (`FWPS_METADATA_FIELD_PROCESS_ID`).
    pub pid: u64,
}

/// Service → driver: the verdict for the process the request named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictReply {
    /// The process id of the request, echoed; the driver ignores a reply about another one.
    pub pid: u64,
    /// The answer.
    pub verdict: Verdict,
}

/// The port's protocol: a [`VerdictRequest`] out, a [`VerdictReply`] back.
#[derive(Debug)]
pub struct VerdictProtocol;

impl Protocol for VerdictProtocol {
    type Request = VerdictRequest;
    type Reply = VerdictReply;
}

/// The first 16 bytes of `out`, or an error for a shorter buffer.
fn message_buffer(out: &mut [u8]) -> Result<&mut [u8; MESSAGE_LEN], Malformed> {
    out.get_mut(..MESSAGE_LEN)
        .and_then(|out| out.try_into().ok())
        .ok_or(Malformed("a message needs 16 bytes"))
}

/// `bytes` as a whole message, checking its magic and version.
fn message_bytes(bytes: &[u8], magic: [u8; 4]) -> Result<&[u8; MESSAGE_LEN], Malformed> {
    let bytes: &[u8; MESSAGE_LEN] = bytes
        .try_into()
        .map_err(|_| Malformed("a message is 16 bytes"))?;
    if bytes[0..4] != magic {
        return Err(Malformed("bad magic"));
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != VERSION {
        return Err(Malformed("unsupported protocol version"));
    }
    Ok(bytes)
}

/// The process id at offset 8.
fn pid_at_8(bytes: &[u8; MESSAGE_LEN]) -> u64 {
    let mut pid = [0u8; 8];
    pid.copy_from_slice(&bytes[8..16]);
    u64::from_le_bytes(pid)
}

impl Message for VerdictRequest {
    const MIN_LEN: usize = MESSAGE_LEN;
    const MAX_LEN: usize = MESSAGE_LEN;

    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
        let out = message_buffer(out)?;
        out[0..4].copy_from_slice(&REQUEST_MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.pid.to_le_bytes());
        Ok(MESSAGE_LEN)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        let bytes = message_bytes(bytes, REQUEST_MAGIC)?;
        if bytes[6..8] != [0, 0] {
            return Err(Malformed("reserved bytes are not zero"));
        }
        Ok(VerdictRequest {
            pid: pid_at_8(bytes),
        })
    }
}

impl Message for VerdictReply {
    const MIN_LEN: usize = MESSAGE_LEN;
    const MAX_LEN: usize = MESSAGE_LEN;

    fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
        let out = message_buffer(out)?;
        out[0..4].copy_from_slice(&REPLY_MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = match self.verdict {
            Verdict::Block => 0,
            Verdict::Allow => 1,
        };
        out[7] = 0;
        out[8..16].copy_from_slice(&self.pid.to_le_bytes());
        Ok(MESSAGE_LEN)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        let bytes = message_bytes(bytes, REPLY_MAGIC)?;
        let verdict = match bytes[6] {
            0 => Verdict::Block,
            1 => Verdict::Allow,
            _ => return Err(Malformed("the verdict is 0 (block) or 1 (allow)")),
        };
        if bytes[7] != 0 {
            return Err(Malformed("reserved byte is not zero"));
        }
        Ok(VerdictReply {
            pid: pid_at_8(bytes),
            verdict,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_bytes(pid: u64, verdict: Verdict) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        assert_eq!(VerdictReply { pid, verdict }.encode(&mut out), Ok(16));
        out
    }

    #[test]
    fn messages_round_trip_in_the_documented_layout() {
        let mut out = [0u8; MESSAGE_LEN];
        assert_eq!(VerdictRequest { pid: 0x0102 }.encode(&mut out), Ok(16));
        assert_eq!(
            out,
            *b"SEDQ\x01\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(
            VerdictRequest::decode(&out),
            Ok(VerdictRequest { pid: 0x0102 })
        );
        assert_eq!(
            reply_bytes(7, Verdict::Allow),
            *b"SEDA\x01\x00\x01\x00\x07\x00\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(
            VerdictReply::decode(&reply_bytes(7, Verdict::Block)),
            Ok(VerdictReply {
                pid: 7,
                verdict: Verdict::Block
            })
        );
    }

    #[test]
    fn replies_are_validated_field_by_field() {
        let good = reply_bytes(7, Verdict::Allow);
        let with = |offset: usize, byte: u8| {
            let mut bytes = good;
            bytes[offset] = byte;
            VerdictReply::decode(&bytes)
        };
        assert_eq!(with(0, b'X'), Err(Malformed("bad magic")));
        assert_eq!(with(4, 2), Err(Malformed("unsupported protocol version")));
        assert_eq!(with(5, 1), Err(Malformed("unsupported protocol version")));
        assert_eq!(
            with(6, 2),
            Err(Malformed("the verdict is 0 (block) or 1 (allow)"))
        );
        assert_eq!(with(7, 1), Err(Malformed("reserved byte is not zero")));
        assert_eq!(
            VerdictReply::decode(&good[..15]),
            Err(Malformed("a message is 16 bytes"))
        );
        assert_eq!(
            VerdictReply::decode(&[0u8; 17]),
            Err(Malformed("a message is 16 bytes"))
        );
        // A request is not a reply.
        let mut request = [0u8; MESSAGE_LEN];
        VerdictRequest { pid: 7 }.encode(&mut request).unwrap();
        assert_eq!(VerdictReply::decode(&request), Err(Malformed("bad magic")));
    }

    #[test]
    fn encoding_into_a_short_buffer_is_an_error_not_a_panic() {
        assert_eq!(
            VerdictRequest { pid: 1 }.encode(&mut [0u8; 15]),
            Err(Malformed("a message needs 16 bytes"))
        );
    }
}
