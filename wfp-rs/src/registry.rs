//! Reading the driver's configuration: string values under its service key's `Parameters`
//! subkey, which an installer writes (`HKR,"Parameters",...` in an INF, or `reg add`).

use alloc::string::String;
use alloc::vec::Vec;

use crate::irql::AtPassive;
use crate::status::Status;
use crate::sys;

/// The longest parameter value read, in UTF-16 units (without the terminating NUL).
pub const MAX_PARAMETER_LEN: usize = 4096;

const SUBKEY: &str = "\\Parameters";

/// Reads the `REG_SZ` (or `REG_EXPAND_SZ`, unexpanded) value `name` of
/// `<registry_path>\Parameters`: `Ok(None)` if the key or the value does not exist;
/// `STATUS_OBJECT_TYPE_MISMATCH` for another type; `STATUS_BUFFER_OVERFLOW` for a value longer
/// than [`MAX_PARAMETER_LEN`]; `STATUS_INVALID_PARAMETER` for an empty name or text that is not
/// UTF-16.
pub(crate) fn read_string(
    irql: &impl AtPassive,
    registry_path: &[u16],
    name: &str,
) -> Result<Option<String>, Status> {
    crate::irql::verify(irql);
    if name.is_empty() || name.len() > 255 {
        return Err(Status::INVALID_PARAMETER);
    }
    let mut path = Vec::new();
    path.try_reserve_exact(registry_path.len() + SUBKEY.len())
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    path.extend_from_slice(registry_path);
    path.extend(SUBKEY.encode_utf16());
    let value_name = crate::unicode::wide(name)?;

    let mut key_name = crate::unicode::counted(&path)?;
    let attributes = sys::OBJECT_ATTRIBUTES {
        Length: core::mem::size_of::<sys::OBJECT_ATTRIBUTES>() as u32,
        RootDirectory: core::ptr::null_mut(),
        ObjectName: &mut key_name,
        Attributes: sys::OBJ_KERNEL_HANDLE | sys::OBJ_CASE_INSENSITIVE,
        SecurityDescriptor: core::ptr::null_mut(),
        SecurityQualityOfService: core::ptr::null_mut(),
    };
    let mut key: sys::HANDLE = core::ptr::null_mut();
    // SAFETY: PASSIVE_LEVEL (the token); the attributes and the name they point to are locals
    // valid for the call; the out pointer is a local.
    let status = unsafe { sys::ZwOpenKey(&mut key, sys::KEY_QUERY_VALUE, &attributes) };
    if status == Status::OBJECT_NAME_NOT_FOUND.raw() {
        return Ok(None);
    }
    Status::from_ntstatus(status)?;
    let value = query(key, &value_name);
    // SAFETY: PASSIVE_LEVEL; the kernel handle opened above, closed once.
    let closed = unsafe { sys::ZwClose(key) };
    let value = value?;
    Status::from_ntstatus(closed)?;
    Ok(value)
}

fn query(key: sys::HANDLE, name: &[u16]) -> Result<Option<String>, Status> {
    const HEADER: usize = core::mem::offset_of!(sys::KEY_VALUE_PARTIAL_INFORMATION, Data);
    const { assert!(HEADER.is_multiple_of(4)) };
    // The header, the text and its NUL, in 32-bit words (the structure's alignment).
    let words = (HEADER + 2 * (MAX_PARAMETER_LEN + 1)).div_ceil(4);
    let mut buffer: Vec<u32> = Vec::new();
    buffer
        .try_reserve_exact(words)
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    buffer.resize(words, 0);
    let value_name = crate::unicode::counted(name)?;
    let mut returned = 0u32;
    // SAFETY: PASSIVE_LEVEL; an open key handle; the name and the out length are locals; the
    // buffer holds `4 * words` bytes, 4-byte aligned, valid for the call.
    let status = unsafe {
        sys::ZwQueryValueKey(
            key,
            &value_name,
            sys::KeyValuePartialInformation,
            buffer.as_mut_ptr().cast(),
            (4 * words) as u32,
            &mut returned,
        )
    };
    if status == Status::OBJECT_NAME_NOT_FOUND.raw() {
        return Ok(None);
    }
    if status == Status::BUFFER_OVERFLOW.raw() || status == Status::BUFFER_TOO_SMALL.raw() {
        return Err(Status::BUFFER_OVERFLOW);
    }
    Status::from_ntstatus(status)?;
    // TitleIndex, Type, DataLength, then the data.
    let (kind, length) = (buffer[1], buffer[2] as usize);
    if kind != sys::REG_SZ && kind != sys::REG_EXPAND_SZ {
        return Err(Status::OBJECT_TYPE_MISMATCH);
    }
    // The length comes from a value anyone with write access to the key set: checked.
    if length > 4 * words - HEADER {
        return Err(Status::BUFFER_OVERFLOW);
    }
    let mut units: Vec<u16> = Vec::new();
    units
        .try_reserve_exact(length / 2)
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    // The data starts on a word (HEADER is 12); each little-endian word holds two units.
    units.extend(
        buffer[HEADER / 4..]
            .iter()
            .flat_map(|word| [*word as u16, (*word >> 16) as u16])
            .take(length / 2),
    );
    // REG_SZ data usually ends with its NUL (and may have more than one).
    while units.last() == Some(&0) {
        units.pop();
    }
    if units.len() > MAX_PARAMETER_LEN {
        return Err(Status::BUFFER_OVERFLOW);
    }
    let mut text = String::new();
    text.try_reserve_exact(units.len() * 3)
        .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
    for c in char::decode_utf16(units.iter().copied()) {
        text.push(c.map_err(|_| Status::INVALID_PARAMETER)?);
    }
    Ok(Some(text))
}
