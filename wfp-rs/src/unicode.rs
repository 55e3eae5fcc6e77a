//! Text for kernel calls that take a counted UTF-16 string (`UNICODE_STRING`): names of ports,
//! registry keys and values, image paths.

use alloc::vec::Vec;

use crate::status::Status;
use crate::sys;

/// The most UTF-16 units a `UNICODE_STRING` can count (its `Length` is a byte count in a `u16`).
pub(crate) const MAX_UNITS: usize = (u16::MAX / 2) as usize;

/// `text` as UTF-16 in a fresh allocation: `STATUS_INVALID_PARAMETER` if it is empty or longer
/// than [`MAX_UNITS`], `STATUS_INSUFFICIENT_RESOURCES` without pool.
pub(crate) fn wide(text: &str) -> Result<Vec<u16>, Status> {
    let len = text.encode_utf16().count();
    if len == 0 || len > MAX_UNITS {
        return Err(Status::INVALID_PARAMETER);
    }
    let mut units = Vec::new();
    units
        .try_reserve_exact(len)
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    units.extend(text.encode_utf16());
    Ok(units)
}

/// A `UNICODE_STRING` that borrows `units` (valid while they are neither moved nor freed);
/// `STATUS_INVALID_PARAMETER` for more than [`MAX_UNITS`]. The kernel routines the SDK passes it
/// to only read it, hence the `*mut` from a shared borrow.
pub(crate) fn counted(units: &[u16]) -> Result<sys::UNICODE_STRING, Status> {
    let bytes = u16::try_from(units.len() * 2).map_err(|_| Status::INVALID_PARAMETER)?;
    Ok(sys::UNICODE_STRING {
        Length: bytes,
        MaximumLength: bytes,
        Buffer: units.as_ptr().cast_mut(),
    })
}
