//! Service → driver commands, sent as `METHOD_BUFFERED` I/O control requests to the driver's
//! control device ([`CONTROL_DEVICE_PATH`]).
//!
//! Requests (driver → service) travel over the filter-manager port; commands travel the other
//! way over a device instead, because the I/O manager copies a buffered request's input into
//! kernel memory before the driver sees it, while a port message would hand the driver a raw
//! user-mode pointer that must be read under structured exception handling.
//!
//! There is one command, [`REVOKE`]: forget cached verdicts, so the next connection they would
//! have answered is asked about again. The service sends it after a rules reload, naming the
//! requests whose cached verdict the new rules no longer give, and once with [`Revoke::All`]
//! when it starts (it does not know what an earlier instance let the driver cache).
//!
//! ## Revoke request: a 16-byte header, then the request ids
//!
//! | Offset | Size | Field      | Meaning                                                      |
//! |-------:|-----:|------------|--------------------------------------------------------------|
//! | 0      | 4    | `magic`    | `"FWRV"` ([`REVOKE_MAGIC`])                                  |
//! | 4      | 2    | `version`  | [`VERSION`] (1)                                              |
//! | 6      | 2    | `flags`    | bit 0: [`REVOKE_ALL`]; other bits 0                          |
//! | 8      | 4    | `count`    | number of request ids that follow; 0 with `REVOKE_ALL`, at most [`MAX_REVOKE_IDS`] |
//! | 12     | 4    | `reserved` | 0                                                            |
//! | 16     | 8 × `count` | ids | the `request_id`s of the replies whose cached verdicts go, LE |
//!
//! ## Revoke reply: 8 bytes
//!
//! `"FWRD"` ([`REVOKED_MAGIC`]), then the number of cache entries removed (u32 LE).

use core::fmt;

use wfp_rs::inverted::{ControlCode, RequiredAccess};
use wfp_rs::port::Malformed;

/// The driver's control device, as the driver names it (`\Device\WfpRsFirewall`).
pub const CONTROL_DEVICE_NAME: &str = "WfpRsFirewall";
/// The control device as user mode opens it.
pub const CONTROL_DEVICE_PATH: &str = r"\\.\WfpRsFirewall";

/// `CTL_CODE(0x8A5E, 0x801, METHOD_BUFFERED, FILE_WRITE_ACCESS)`: revoke cached verdicts.
pub const REVOKE: ControlCode = ControlCode::buffered(0x8A5E, 0x801, RequiredAccess::Write);

/// The version of the control commands' format, which is the port messages' own
/// ([`crate::VERSION`]): the commands did not change when the requests did.
pub const VERSION: u16 = 1;

/// The revoke request's magic, `"FWRV"`.
pub const REVOKE_MAGIC: [u8; 4] = *b"FWRV";
/// The revoke reply's magic, `"FWRD"`.
pub const REVOKED_MAGIC: [u8; 4] = *b"FWRD";
/// `flags` bit 0: revoke every cached verdict.
pub const REVOKE_ALL: u16 = 0x0001;
/// The length of a revoke request's header.
pub const REVOKE_HEADER_LEN: usize = 16;
/// The most request ids one revoke request carries; send more in several requests.
pub const MAX_REVOKE_IDS: usize = 255;
/// The longest revoke request, in bytes (2056).
pub const REVOKE_MAX_LEN: usize = REVOKE_HEADER_LEN + 8 * MAX_REVOKE_IDS;
/// The length of a revoke reply.
pub const REVOKED_LEN: usize = 8;

/// A decoded revoke request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Revoke<'a> {
    /// Every cached verdict.
    All,
    /// The verdicts cached from the replies to these requests.
    Requests(RequestIds<'a>),
}

impl<'a> Revoke<'a> {
    /// Decodes and validates a revoke request (untrusted input: every field is checked, and the
    /// length must be exactly the header plus `count` ids).
    pub fn decode(bytes: &'a [u8]) -> Result<Revoke<'a>, Malformed> {
        if bytes.len() < REVOKE_HEADER_LEN {
            return Err(Malformed("a revoke request is shorter than its header"));
        }
        let (head, ids) = bytes.split_at(REVOKE_HEADER_LEN);
        if head[0..4] != REVOKE_MAGIC {
            return Err(Malformed("bad revoke magic"));
        }
        if u16::from_le_bytes([head[4], head[5]]) != VERSION {
            return Err(Malformed("unsupported protocol version"));
        }
        let flags = u16::from_le_bytes([head[6], head[7]]);
        if flags & !REVOKE_ALL != 0 {
            return Err(Malformed("unknown revoke flags are set"));
        }
        let count = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        if head[12..16] != [0; 4] {
            return Err(Malformed("reserved revoke fields are not zero"));
        }
        if count > MAX_REVOKE_IDS {
            return Err(Malformed("a revoke request names more than MAX_REVOKE_IDS"));
        }
        if ids.len() != 8 * count {
            return Err(Malformed(
                "the revoke request length does not match its count",
            ));
        }
        if flags & REVOKE_ALL != 0 {
            if count != 0 {
                return Err(Malformed("a revoke-all request names no request ids"));
            }
            return Ok(Revoke::All);
        }
        Ok(Revoke::Requests(RequestIds(ids)))
    }

    /// Encodes a request to revoke everything into `out`; returns the length.
    pub fn encode_all(out: &mut [u8]) -> Result<usize, Malformed> {
        encode(REVOKE_ALL, &[], out)
    }

    /// Encodes a request to revoke the verdicts of `ids` (at most [`MAX_REVOKE_IDS`]) into
    /// `out`; returns the length.
    pub fn encode_requests(ids: &[u64], out: &mut [u8]) -> Result<usize, Malformed> {
        encode(0, ids, out)
    }
}

impl fmt::Debug for Revoke<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revoke::All => f.write_str("Revoke::All"),
            Revoke::Requests(ids) => f.debug_list().entries(ids.iter()).finish(),
        }
    }
}

fn encode(flags: u16, ids: &[u64], out: &mut [u8]) -> Result<usize, Malformed> {
    if ids.len() > MAX_REVOKE_IDS {
        return Err(Malformed("a revoke request names more than MAX_REVOKE_IDS"));
    }
    let len = REVOKE_HEADER_LEN + 8 * ids.len();
    let out = out
        .get_mut(..len)
        .ok_or(Malformed("the buffer is too short for this revoke request"))?;
    let (head, tail) = out.split_at_mut(REVOKE_HEADER_LEN);
    head[0..4].copy_from_slice(&REVOKE_MAGIC);
    head[4..6].copy_from_slice(&VERSION.to_le_bytes());
    head[6..8].copy_from_slice(&flags.to_le_bytes());
    // At most MAX_REVOKE_IDS (255), checked above.
    head[8..12].copy_from_slice(&(ids.len() as u32).to_le_bytes());
    head[12..16].fill(0);
    for (slot, id) in tail.chunks_exact_mut(8).zip(ids) {
        slot.copy_from_slice(&id.to_le_bytes());
    }
    Ok(len)
}

/// The request ids of a decoded [`Revoke::Requests`], read from the message in place.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestIds<'a>(&'a [u8]);

impl<'a> RequestIds<'a> {
    /// How many ids there are.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ids, in message order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|chunk| {
            let mut id = [0u8; 8];
            id.copy_from_slice(chunk);
            u64::from_le_bytes(id)
        })
    }

    /// Whether `id` is among them.
    pub fn contains(&self, id: u64) -> bool {
        self.iter().any(|named| named == id)
    }
}

/// The driver's answer to a revoke request: how many cache entries it removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// Cache entries removed.
    pub removed: u32,
}

impl Revoked {
    /// The 8-byte encoding.
    pub fn to_bytes(self) -> [u8; REVOKED_LEN] {
        let mut out = [0u8; REVOKED_LEN];
        out[0..4].copy_from_slice(&REVOKED_MAGIC);
        out[4..8].copy_from_slice(&self.removed.to_le_bytes());
        out
    }

    /// Decodes the driver's answer.
    pub fn decode(bytes: &[u8]) -> Result<Revoked, Malformed> {
        let bytes: &[u8; REVOKED_LEN] = bytes
            .try_into()
            .map_err(|_| Malformed("a revoke reply is 8 bytes"))?;
        if bytes[0..4] != REVOKED_MAGIC {
            return Err(Malformed("bad revoke reply magic"));
        }
        Ok(Revoked {
            removed: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        })
    }
}
