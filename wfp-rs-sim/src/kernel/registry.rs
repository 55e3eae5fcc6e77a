//! The registry, as far as a driver reads its configuration: keys the harness creates with
//! values (`Machine::set_registry_value`), opened by absolute name (`ZwOpenKey`) and read
//! (`ZwQueryValueKey` with `KeyValuePartialInformation`). Names are case-insensitive.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::sync::{Mutex, MutexGuard, PoisonError};

use rustc_hash::FxHashMap;

use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::status::Status;
use wfp_rs::sys::*;

use super::bugcheck::stop;
use super::state::{Kernel, KernelCode, current, require_irql};

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_NOT_IMPLEMENTED: NTSTATUS = 0xC000_0002u32 as i32;

/// The header of a `KEY_VALUE_PARTIAL_INFORMATION`: `TitleIndex`, `Type`, `DataLength`.
const PARTIAL_HEADER: usize = 12;

#[derive(Default)]
struct RegistryState {
    /// Key name (lower case) → value name (lower case) → (type, data).
    keys: FxHashMap<String, FxHashMap<String, (u32, Vec<u8>)>>,
    /// Open key handles → the key's name.
    handles: FxHashMap<usize, String>,
    next_handle: usize,
}

/// One machine's registry (`Kernel::registry`).
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<RegistryState>,
}

fn registry(kernel: &Kernel) -> MutexGuard<'_, RegistryState> {
    kernel
        .registry
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Creates `key` if needed and sets its value `name`.
pub(crate) fn set_value(kernel: &Kernel, key: &str, name: &str, kind: u32, data: &[u8]) {
    registry(kernel)
        .keys
        .entry(key.to_lowercase())
        .or_default()
        .insert(name.to_lowercase(), (kind, data.to_vec()));
}

/// Closes a key handle; false if `handle` is not one.
pub(crate) fn close(kernel: &Kernel, handle: usize) -> bool {
    registry(kernel).handles.remove(&handle).is_some()
}

/// The text of a `UNICODE_STRING` (the I/O manager's reader); a null pointer stops as the
/// kernel's dereference would.
///
/// # Safety
///
/// `string` is null or a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn text(routine: &str, string: *const UNICODE_STRING) -> String {
    super::io::read_unicode(string).unwrap_or_else(|| bad_pointer(routine, "UNICODE_STRING"))
}

fn bad_pointer(routine: &str, what: &str) -> ! {
    stop(
        BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        [0xC000_0005, 0, 0, 0],
        &format!("{routine}: the {what} pointer is null; the kernel would dereference it"),
    )
}

/// `ZwOpenKey` by absolute name (`\REGISTRY\MACHINE\...`); a name relative to `RootDirectory`
/// is not simulated (`STATUS_NOT_IMPLEMENTED`). `STATUS_OBJECT_NAME_NOT_FOUND` for a key the
/// harness did not create.
///
/// # Safety
///
/// `KeyHandle` is writable; `ObjectAttributes` is valid.
pub unsafe extern "system" fn ZwOpenKey(
    KeyHandle: *mut HANDLE,
    DesiredAccess: ACCESS_MASK,
    ObjectAttributes: *const OBJECT_ATTRIBUTES,
) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    require_irql("ZwOpenKey", PASSIVE_LEVEL);
    let _ = DesiredAccess;
    if KeyHandle.is_null() {
        bad_pointer("ZwOpenKey", "handle");
    }
    // SAFETY: the caller passes valid attributes (or null, refused here).
    let Some(attributes) = (unsafe { ObjectAttributes.as_ref() }) else {
        bad_pointer("ZwOpenKey", "OBJECT_ATTRIBUTES");
    };
    if !attributes.RootDirectory.is_null() {
        return STATUS_NOT_IMPLEMENTED;
    }
    // SAFETY: the attributes' name is valid (the caller's contract).
    let name = unsafe { text("ZwOpenKey", attributes.ObjectName) }.to_lowercase();
    let kernel = current();
    let mut state = registry(&kernel);
    if !state.keys.contains_key(&name) {
        return Status::OBJECT_NAME_NOT_FOUND.raw();
    }
    state.next_handle += 1;
    // Kernel handles have the top bit set on x64; this range is the registry's.
    let handle = 0xFFFF_FFFF_C000_0000usize | (state.next_handle * 4);
    state.handles.insert(handle, name);
    drop(state);
    // SAFETY: checked non-null; the caller passes a writable pointer.
    unsafe { KeyHandle.write(handle as HANDLE) };
    STATUS_SUCCESS
}

/// `ZwQueryValueKey` with `KeyValuePartialInformation` (other classes: `STATUS_NOT_IMPLEMENTED`).
/// A buffer shorter than the header gets `STATUS_BUFFER_TOO_SMALL`; one shorter than the whole
/// value gets the header and `STATUS_BUFFER_OVERFLOW` (INFERRED: the documentation says partial
/// data may be returned; the simulator returns none of it); `ResultLength` is always the size
/// needed.
///
/// # Safety
///
/// `ValueName` is valid; `KeyValueInformation` holds `Length` writable bytes; `ResultLength` is
/// writable.
pub unsafe extern "system" fn ZwQueryValueKey(
    KeyHandle: HANDLE,
    ValueName: *const UNICODE_STRING,
    KeyValueInformationClass: KEY_VALUE_INFORMATION_CLASS,
    KeyValueInformation: PVOID,
    Length: ULONG,
    ResultLength: *mut ULONG,
) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    require_irql("ZwQueryValueKey", PASSIVE_LEVEL);
    if ResultLength.is_null() {
        bad_pointer("ZwQueryValueKey", "result length");
    }
    if KeyValueInformationClass != KeyValuePartialInformation {
        return STATUS_NOT_IMPLEMENTED;
    }
    // SAFETY: the caller passes a valid name.
    let name = unsafe { text("ZwQueryValueKey", ValueName) }.to_lowercase();
    let kernel = current();
    let state = registry(&kernel);
    let Some(key) = state.handles.get(&(KeyHandle as usize)) else {
        return Status::INVALID_HANDLE.raw();
    };
    let Some((kind, data)) = state
        .keys
        .get(key)
        .and_then(|values| values.get(&name))
        .cloned()
    else {
        return Status::OBJECT_NAME_NOT_FOUND.raw();
    };
    drop(state);
    let needed = PARTIAL_HEADER + data.len();
    // SAFETY: checked non-null; the caller passes a writable pointer.
    unsafe { ResultLength.write(needed as ULONG) };
    let capacity = Length as usize;
    if capacity < PARTIAL_HEADER {
        return Status::BUFFER_TOO_SMALL.raw();
    }
    if KeyValueInformation.is_null() {
        bad_pointer("ZwQueryValueKey", "information");
    }
    let mut bytes = Vec::with_capacity(needed);
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&kind.to_le_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let status = if capacity < needed {
        Status::BUFFER_OVERFLOW.raw()
    } else {
        bytes.extend_from_slice(&data);
        STATUS_SUCCESS
    };
    // SAFETY: the caller's buffer holds `Length` >= `bytes.len()` writable bytes.
    unsafe {
        KeyValueInformation
            .cast::<u8>()
            .copy_from_nonoverlapping(bytes.as_ptr(), bytes.len())
    };
    status
}
