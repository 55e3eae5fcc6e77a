//! The kernel's CNG, as far as drivers use it: random numbers from the system-preferred RNG
//! (`BCryptGenRandom` with `BCRYPT_USE_SYSTEM_PREFERRED_RNG`), which the simulator takes from
//! the host's (`getrandom`). The harness can make it fail (`Machine::fail_random`).

use wfp_rs::sys::*;

use super::state::{KernelCode, current, require_irql};

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_UNSUCCESSFUL: NTSTATUS = 0xC000_0001u32 as i32;
const STATUS_INVALID_HANDLE: NTSTATUS = 0xC000_0008u32 as i32;
const STATUS_INVALID_PARAMETER: NTSTATUS = 0xC000_000Du32 as i32;

/// `BCRYPT_RNG_USE_ENTROPY_IN_BUFFER` (bcrypt.h): ignored since Windows 8, as documented.
const BCRYPT_RNG_USE_ENTROPY_IN_BUFFER: ULONG = 0x0000_0001;

/// `BCryptGenRandom`. With `BCRYPT_USE_SYSTEM_PREFERRED_RNG` the handle must be null and the
/// caller at `PASSIVE_LEVEL` (documented; above it the simulator stops with
/// `IRQL_NOT_LESS_OR_EQUAL`, as for the other PASSIVE_LEVEL routines). Without it a provider
/// handle is needed (`BCryptOpenAlgorithmProvider`), which the simulator does not offer: every
/// handle is `STATUS_INVALID_HANDLE`.
///
/// # Safety
///
/// `pbBuffer` points to `cbBuffer` writable bytes.
pub unsafe extern "system" fn BCryptGenRandom(
    hAlgorithm: BCRYPT_ALG_HANDLE,
    pbBuffer: *mut u8,
    cbBuffer: ULONG,
    dwFlags: ULONG,
) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    if dwFlags & BCRYPT_USE_SYSTEM_PREFERRED_RNG == 0 {
        return STATUS_INVALID_HANDLE;
    }
    require_irql(
        "BCryptGenRandom with BCRYPT_USE_SYSTEM_PREFERRED_RNG",
        PASSIVE_LEVEL,
    );
    if !hAlgorithm.is_null()
        || dwFlags & !(BCRYPT_USE_SYSTEM_PREFERRED_RNG | BCRYPT_RNG_USE_ENTROPY_IN_BUFFER) != 0
        || (pbBuffer.is_null() && cbBuffer != 0)
    {
        return STATUS_INVALID_PARAMETER;
    }
    if let Some(status) = current().lock().random_failure {
        return status;
    }
    if cbBuffer == 0 {
        return STATUS_SUCCESS;
    }
    // SAFETY: the caller passes `cbBuffer` writable bytes at `pbBuffer` (checked non-null).
    let buffer = unsafe { core::slice::from_raw_parts_mut(pbBuffer, cbBuffer as usize) };
    // A deterministic machine's random numbers come from its seed, so a run replays.
    if let Some(sched) = &current().sched {
        sched.fill_random(buffer);
        return STATUS_SUCCESS;
    }
    match getrandom::fill(buffer) {
        Ok(()) => STATUS_SUCCESS,
        // INFERRED: Windows documents no status for an RNG that cannot produce output.
        Err(_) => STATUS_UNSUCCESSFUL,
    }
}
