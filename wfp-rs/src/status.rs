//! `NTSTATUS` values as a Rust error type.

use core::fmt;

use crate::sys::NTSTATUS;

/// An `NTSTATUS` that is not a success code.
///
/// Every fallible kernel call in this crate returns `Result<T, Status>`. `Display` shows the
/// symbolic name where this crate knows it, and always the hexadecimal value:
///
/// ```
/// use wfp_rs::Status;
/// assert_eq!(Status::INSUFFICIENT_RESOURCES.to_string(), "STATUS_INSUFFICIENT_RESOURCES (0xC000009A)");
/// assert_eq!(Status::from_ntstatus(0), Ok(()));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{}", DisplayStatus(self.0))]
pub struct Status(NTSTATUS);

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = $value:expr;)*) => {
        impl Status {
            $($(#[$doc])* pub const $name: Status = Status($value as u32 as i32);)*
        }

        /// The `STATUS_*` name of a known value.
        pub fn name_of(status: NTSTATUS) -> Option<&'static str> {
            match status as u32 {
                0 => Some("STATUS_SUCCESS"),
                $($value => Some(concat!("STATUS_", stringify!($name))),)*
                _ => None,
            }
        }
    };
}

statuses! {
    /// `STATUS_UNSUCCESSFUL`.
    UNSUCCESSFUL = 0xC000_0001;
    /// `STATUS_NOT_IMPLEMENTED`.
    NOT_IMPLEMENTED = 0xC000_0002;
    /// `STATUS_INVALID_PARAMETER`.
    INVALID_PARAMETER = 0xC000_000D;
    /// `STATUS_INVALID_HANDLE`.
    INVALID_HANDLE = 0xC000_0008;
    /// `STATUS_INVALID_DEVICE_REQUEST`: the device does not handle this request (for example, an
    /// I/O control code it does not know).
    INVALID_DEVICE_REQUEST = 0xC000_0010;
    /// `STATUS_BUFFER_TOO_SMALL`: the buffer cannot hold what the request needs.
    BUFFER_TOO_SMALL = 0xC000_0023;
    /// `STATUS_OBJECT_TYPE_MISMATCH`.
    OBJECT_TYPE_MISMATCH = 0xC000_0024;
    /// `STATUS_OBJECT_NAME_INVALID`: a device or link name is empty, too long or malformed.
    OBJECT_NAME_INVALID = 0xC000_0033;
    /// `STATUS_DELETE_PENDING`: the device is being deleted and takes no new requests.
    DELETE_PENDING = 0xC000_0056;
    /// `STATUS_INVALID_ACL`.
    INVALID_ACL = 0xC000_0077;
    /// `STATUS_INVALID_SID`.
    INVALID_SID = 0xC000_0078;
    /// `STATUS_INVALID_SECURITY_DESCR`.
    INVALID_SECURITY_DESCR = 0xC000_0079;
    /// `STATUS_INVALID_DEVICE_STATE`: the object is not in a state that allows the request.
    INVALID_DEVICE_STATE = 0xC000_0184;
    /// `STATUS_NO_MEMORY`.
    NO_MEMORY = 0xC000_0017;
    /// `STATUS_ACCESS_DENIED`.
    ACCESS_DENIED = 0xC000_0022;
    /// `STATUS_OBJECT_NAME_NOT_FOUND`: for example, no communication port has that name.
    OBJECT_NAME_NOT_FOUND = 0xC000_0034;
    /// `STATUS_OBJECT_NAME_EXISTS`: an informational status, not an error by its severity (so
    /// [`Status::from_ntstatus`] accepts it). `FwpsFlowAssociateContext0` returns it when the
    /// callout already has a context on the flow, without associating the new one.
    OBJECT_NAME_EXISTS = 0x4000_0000;
    /// `STATUS_OBJECT_NAME_COLLISION`.
    OBJECT_NAME_COLLISION = 0xC000_0035;
    /// `STATUS_PORT_DISCONNECTED`: the other end of a communication port went away.
    PORT_DISCONNECTED = 0xC000_0037;
    /// `STATUS_INSUFFICIENT_RESOURCES`.
    INSUFFICIENT_RESOURCES = 0xC000_009A;
    /// `STATUS_INTERNAL_ERROR`: the driver broke its own contract (for example, a command
    /// handler reported more output than the buffer holds).
    INTERNAL_ERROR = 0xC000_00E5;
    /// `STATUS_INVALID_BUFFER_SIZE`: a buffer's size is not one the request accepts.
    INVALID_BUFFER_SIZE = 0xC000_0206;
    /// `STATUS_NOT_FOUND`: the object the request names does not exist (for example, an answer
    /// for a question no longer waiting for one).
    NOT_FOUND = 0xC000_0225;
    /// `STATUS_DEVICE_BUSY`.
    DEVICE_BUSY = 0x8000_0011;
    /// `STATUS_CANCELLED`.
    CANCELLED = 0xC000_0120;
    /// `STATUS_CONNECTION_COUNT_LIMIT`: a port already has its maximum number of connections.
    CONNECTION_COUNT_LIMIT = 0xC000_0246;
    /// `STATUS_BUFFER_OVERFLOW` (a warning code): the data did not fit the buffer and was cut.
    BUFFER_OVERFLOW = 0x8000_0005;
    /// `STATUS_FLT_NO_WAITER_FOR_REPLY`: a reply came for a message nobody waits for any more.
    FLT_NO_WAITER_FOR_REPLY = 0xC01C_0020;
    /// `STATUS_TIMEOUT` (a success-severity code that callers usually treat as an error).
    TIMEOUT = 0x0000_0102;
    /// `STATUS_FWP_CALLOUT_NOT_FOUND`.
    FWP_CALLOUT_NOT_FOUND = 0xC022_0001;
    /// `STATUS_FWP_CONDITION_NOT_FOUND`: a filter condition names a field the layer lacks.
    FWP_CONDITION_NOT_FOUND = 0xC022_0002;
    /// `STATUS_FWP_FILTER_NOT_FOUND`.
    FWP_FILTER_NOT_FOUND = 0xC022_0003;
    /// `STATUS_FWP_LAYER_NOT_FOUND`.
    FWP_LAYER_NOT_FOUND = 0xC022_0004;
    /// `STATUS_FWP_PROVIDER_NOT_FOUND`.
    FWP_PROVIDER_NOT_FOUND = 0xC022_0005;
    /// `STATUS_FWP_SUBLAYER_NOT_FOUND`.
    FWP_SUBLAYER_NOT_FOUND = 0xC022_0007;
    /// `STATUS_FWP_NOT_FOUND`.
    FWP_NOT_FOUND = 0xC022_0008;
    /// `STATUS_FWP_ALREADY_EXISTS`.
    FWP_ALREADY_EXISTS = 0xC022_0009;
    /// `STATUS_FWP_IN_USE`.
    FWP_IN_USE = 0xC022_000A;
    /// `STATUS_FWP_DYNAMIC_SESSION_IN_PROGRESS`: a dynamic session cannot add persistent
    /// objects.
    FWP_DYNAMIC_SESSION_IN_PROGRESS = 0xC022_000B;
    /// `STATUS_FWP_WRONG_SESSION`.
    FWP_WRONG_SESSION = 0xC022_000C;
    /// `STATUS_FWP_NO_TXN_IN_PROGRESS`.
    FWP_NO_TXN_IN_PROGRESS = 0xC022_000D;
    /// `STATUS_FWP_TXN_IN_PROGRESS`.
    FWP_TXN_IN_PROGRESS = 0xC022_000E;
    /// `STATUS_FWP_TIMEOUT`: another session's transaction did not end in time.
    FWP_TIMEOUT = 0xC022_0012;
    /// `STATUS_FWP_INCOMPATIBLE_LAYER`.
    FWP_INCOMPATIBLE_LAYER = 0xC022_0014;
    /// `STATUS_FWP_LIFETIME_MISMATCH`: an object refers to another session's dynamic object.
    FWP_LIFETIME_MISMATCH = 0xC022_0016;
    /// `STATUS_FWP_NULL_POINTER`.
    FWP_NULL_POINTER = 0xC022_001C;
    /// `STATUS_FWP_INVALID_FLAGS`.
    FWP_INVALID_FLAGS = 0xC022_001E;
    /// `STATUS_FWP_NULL_DISPLAY_NAME`: every object needs a display name.
    FWP_NULL_DISPLAY_NAME = 0xC022_0023;
    /// `STATUS_FWP_INVALID_ACTION_TYPE`.
    FWP_INVALID_ACTION_TYPE = 0xC022_0024;
    /// `STATUS_FWP_INVALID_WEIGHT`.
    FWP_INVALID_WEIGHT = 0xC022_0025;
    /// `STATUS_FWP_MATCH_TYPE_MISMATCH`.
    FWP_MATCH_TYPE_MISMATCH = 0xC022_0026;
    /// `STATUS_FWP_TYPE_MISMATCH`.
    FWP_TYPE_MISMATCH = 0xC022_0027;
    /// `STATUS_FWP_INVALID_PARAMETER`.
    FWP_INVALID_PARAMETER = 0xC022_0035;
    /// `STATUS_FWP_CALLOUT_NOTIFICATION_FAILED`: a callout's notifyFn refused a filter.
    FWP_CALLOUT_NOTIFICATION_FAILED = 0xC022_0037;
    /// `STATUS_FWP_CANNOT_PEND`: pending is not possible here (for example, in a
    /// reauthorization).
    FWP_CANNOT_PEND = 0xC022_0103;
}

impl Status {
    /// Converts a raw `NTSTATUS`: `Ok(())` for `STATUS_SUCCESS` and the other success codes
    /// except `STATUS_TIMEOUT`, `Err` otherwise.
    pub const fn from_ntstatus(status: NTSTATUS) -> Result<(), Status> {
        if status >= 0 && status != Status::TIMEOUT.0 {
            Ok(())
        } else {
            Err(Status(status))
        }
    }

    /// Wraps a raw value without classifying it.
    pub const fn from_raw(status: NTSTATUS) -> Status {
        Status(status)
    }

    /// The raw `NTSTATUS`.
    pub const fn raw(self) -> NTSTATUS {
        self.0
    }

    /// The `STATUS_*` name, if this crate knows it.
    pub fn name(self) -> Option<&'static str> {
        name_of(self.0)
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({})", DisplayStatus(self.0))
    }
}

/// Formats an `NTSTATUS` as `NAME (0xVALUE)`.
struct DisplayStatus(NTSTATUS);

impl fmt::Display for DisplayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match name_of(self.0) {
            Some(name) => write!(f, "{name} ({:#010X})", self.0 as u32),
            None => write!(f, "NTSTATUS {:#010X}", self.0 as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    #[test]
    fn success_codes_are_ok_and_timeout_is_an_error() {
        assert_eq!(Status::from_ntstatus(0), Ok(()));
        // STATUS_PENDING (0x103) is a success code.
        assert_eq!(Status::from_ntstatus(0x103), Ok(()));
        assert_eq!(Status::from_ntstatus(0x102), Err(Status::TIMEOUT));
        assert_eq!(
            Status::from_ntstatus(0xC000_009Au32 as i32),
            Err(Status::INSUFFICIENT_RESOURCES)
        );
    }

    #[test]
    fn display_names_known_codes_and_shows_unknown_ones_in_hex() {
        assert_eq!(
            Status::FWP_CANNOT_PEND.to_string(),
            "STATUS_FWP_CANNOT_PEND (0xC0220103)"
        );
        assert_eq!(
            Status::from_raw(0xC0DE_0001u32 as i32).to_string(),
            "NTSTATUS 0xC0DE0001"
        );
        assert_eq!(
            format!("{:?}", Status::CANCELLED),
            "Status(STATUS_CANCELLED (0xC0000120))"
        );
        assert_eq!(Status::DEVICE_BUSY.name(), Some("STATUS_DEVICE_BUSY"));
    }
}
