//! What both C-style callouts of the benchmarks ([`raw_lookup`](crate::raw_lookup) and
//! [`blocking`](crate::blocking)) do alike, as a C driver would write it: read the
//! `ALE_AUTH_CONNECT_V4` fields by raw pointer and index, start a classifyFn from a global,
//! write a verdict into the classify-out, register and unregister the callout.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicPtr, Ordering};

use firewall_protocol::Verdict;
use wfp_rs::callout::CalloutKey;
use wfp_rs::driver::Driver;
use wfp_rs::engine::Engine;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::layer::{AleAuthConnectV4, Layer};
use wfp_rs::{Status, kd_print, sys};

/// `FWPS_FIELD_ALE_AUTH_CONNECT_V4_*` (fwpsk.h), as a C driver spells them.
pub(crate) mod index {
    pub const ALE_APP_ID: usize = 0;
    pub const IP_LOCAL_ADDRESS: usize = 2;
    pub const IP_LOCAL_PORT: usize = 4;
    pub const IP_PROTOCOL: usize = 5;
    pub const IP_REMOTE_ADDRESS: usize = 6;
    pub const IP_REMOTE_PORT: usize = 7;
    pub const FLAGS: usize = 12;
}

/// The value at `index`.
///
/// # Safety
///
/// `fixed` points to the engine's incoming values of an `ALE_AUTH_CONNECT_V4` classification in
/// progress, which has more than `index` fields.
pub(crate) unsafe fn value(
    fixed: *const sys::FWPS_INCOMING_VALUES0,
    index: usize,
) -> sys::FWP_VALUE0_u {
    // SAFETY: `fixed` is valid (the caller's contract).
    let values = unsafe { (*fixed).incomingValue };
    // SAFETY: the array has more than `index` entries (the caller's contract).
    let slot = unsafe { values.add(index) };
    // SAFETY: in bounds, initialised by the engine.
    unsafe { (*slot).value.u }
}

/// The connection fields a C callout reads, unchecked (the engine's types for this layer:
/// `FWP_BYTE_BLOB_TYPE`, `FWP_UINT32` addresses in host order, `FWP_UINT16` ports, `FWP_UINT8`
/// protocol, `FWP_UINT32` flags).
pub(crate) struct RawFields {
    pub flags: u32,
    pub app: *const sys::FWP_BYTE_BLOB,
    pub protocol: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub pid: u64,
}

impl RawFields {
    /// Reads them.
    ///
    /// # Safety
    ///
    /// As [`value`], and `meta` points to the classification's metadata.
    pub(crate) unsafe fn read(
        fixed: *const sys::FWPS_INCOMING_VALUES0,
        meta: *const sys::FWPS_INCOMING_METADATA_VALUES0,
    ) -> RawFields {
        // Each read below is of the engine's values for this layer (the caller's contract).
        // SAFETY: as above.
        let flags = unsafe { value(fixed, index::FLAGS) };
        // SAFETY: as above.
        let app = unsafe { value(fixed, index::ALE_APP_ID) };
        // SAFETY: as above.
        let protocol = unsafe { value(fixed, index::IP_PROTOCOL) };
        // SAFETY: as above.
        let local_address = unsafe { value(fixed, index::IP_LOCAL_ADDRESS) };
        // SAFETY: as above.
        let local_port = unsafe { value(fixed, index::IP_LOCAL_PORT) };
        // SAFETY: as above.
        let remote_address = unsafe { value(fixed, index::IP_REMOTE_ADDRESS) };
        // SAFETY: as above.
        let remote_port = unsafe { value(fixed, index::IP_REMOTE_PORT) };
        // SAFETY: `meta` is valid (the caller's contract).
        let meta = unsafe { &*meta };
        let pid = if meta.currentMetadataValues & sys::FWPS_METADATA_FIELD_PROCESS_ID != 0 {
            meta.processId
        } else {
            0
        };
        RawFields {
            // SAFETY: the arm of the field's type at this layer; each union read below likewise.
            flags: unsafe { flags.uint32 },
            // SAFETY: as above.
            app: unsafe { app.byteBlob },
            // SAFETY: as above.
            protocol: unsafe { protocol.uint8 },
            local: (
                // SAFETY: as above.
                IpAddr::V4(Ipv4Addr::from(unsafe { local_address.uint32 })),
                // SAFETY: as above.
                unsafe { local_port.uint16 },
            ),
            remote: (
                // SAFETY: as above.
                IpAddr::V4(Ipv4Addr::from(unsafe { remote_address.uint32 })),
                // SAFETY: as above.
                unsafe { remote_port.uint16 },
            ),
            pid,
        }
    }

    /// The application id's bytes.
    ///
    /// # Safety
    ///
    /// `self.app` is the engine's blob of a classification in progress, valid for `'a`.
    pub(crate) unsafe fn app_bytes<'a>(&self) -> &'a [u8] {
        // SAFETY: the caller's contract.
        let Some(blob) = (unsafe { self.app.as_ref() }) else {
            return &[];
        };
        if blob.data.is_null() {
            return &[];
        }
        // SAFETY: the engine's blob: `size` bytes at `data`.
        unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) }
    }
}

/// The start of a classifyFn: its state, reached through the global `state` as a C driver
/// reaches its globals, the classify-out, and the connection's fields; `None` (decide nothing)
/// when the state is gone. A classification at another layer than `ALE_AUTH_CONNECT_V4` (the
/// callout entry added at another layer under this key) is blocked without reading a field, as
/// the SDK's trampoline does: the indices below are this layer's.
///
/// # Safety
///
/// `state` holds null or a pointer to a live `S` that stays live for `'a` (stored before the
/// callout is registered, freed only after it is unregistered, which waits for calls in
/// progress); `fixed`, `meta` and `classify_out` are the filter engine's arguments to a
/// classifyFn of a classification in progress, valid for `'a`, and the classify-out is the
/// caller's alone for `'a`.
pub(crate) unsafe fn begin<'a, S>(
    state: &AtomicPtr<S>,
    fixed: *const sys::FWPS_INCOMING_VALUES0,
    meta: *const sys::FWPS_INCOMING_METADATA_VALUES0,
    classify_out: *mut sys::FWPS_CLASSIFY_OUT0,
) -> Option<(&'a S, &'a mut sys::FWPS_CLASSIFY_OUT0, RawFields)> {
    // SAFETY: null or live for `'a` (the caller's contract).
    let state = unsafe { state.load(Ordering::Acquire).as_ref() }?;
    // The engine's classify-out is valid and the caller's alone for `'a` (its contract).
    // SAFETY: as above.
    let out = unsafe { &mut *classify_out };
    // SAFETY: the engine's incoming values, valid for `'a` (the caller's contract).
    if unsafe { (*fixed).layerId } != AleAuthConnectV4::ID {
        if out.rights & sys::FWPS_RIGHT_ACTION_WRITE != 0 {
            apply(out, Verdict::Deny);
        }
        return None;
    }
    // The layer was checked above; the structures are the engine's (the caller's contract).
    // SAFETY: the engine's structures for this layer, as `RawFields::read` requires.
    let fields = unsafe { RawFields::read(fixed, meta) };
    Some((state, out, fields))
}

/// The verdict into the classify-out: a soft permit (only with the write right), or a hard
/// block.
pub(crate) fn apply(out: &mut sys::FWPS_CLASSIFY_OUT0, verdict: Verdict) {
    match verdict {
        Verdict::Allow => {
            if out.rights & sys::FWPS_RIGHT_ACTION_WRITE != 0 {
                out.actionType = sys::FWP_ACTION_PERMIT;
            }
        }
        Verdict::Deny => {
            out.actionType = sys::FWP_ACTION_BLOCK;
            out.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
        }
    }
}

/// The notifyFn (required): accepts every filter.
///
/// # Safety
///
/// Called by the filter engine.
pub(crate) unsafe extern "system" fn notify(
    _notify_type: sys::FWPS_CALLOUT_NOTIFY_TYPE,
    _filter_key: *const sys::GUID,
    _filter: *mut sys::FWPS_FILTER3,
) -> sys::NTSTATUS {
    0
}

/// `FwpsCalloutRegister3`: `classify` (with [`notify`]) as the callout `key`, its runtime id
/// written to `callout_id`.
pub(crate) fn register(
    _irql: &PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    key: CalloutKey<AleAuthConnectV4>,
    classify: sys::FWPS_CALLOUT_CLASSIFY_FN3,
    callout_id: &mut u32,
) -> Result<(), Status> {
    let callout = sys::FWPS_CALLOUT3 {
        calloutKey: key.guid().0,
        flags: 0,
        classifyFn: classify,
        notifyFn: Some(notify),
        flowDeleteFn: None,
    };
    let device = driver.raw_device().cast();
    // PASSIVE_LEVEL (the token); the device is this driver's.
    // SAFETY: as above; the structure and the id are valid for the call.
    let status = unsafe { sys::FwpsCalloutRegister3(device, &callout, callout_id) };
    Status::from_ntstatus(status)
}

/// Closes `engine`'s session, which deletes the filter, then unregisters the callout
/// `callout_id` (if registered); logs failures under `name`, and leaves both empty.
pub(crate) fn unregister(
    irql: &mut PassiveLevel<'_>,
    name: &str,
    engine: &mut Option<Engine>,
    callout_id: &mut u32,
) {
    // The filter before the callout: a terminating filter whose callout is gone blocks.
    if let Some(engine) = engine.take()
        && let Err(status) = engine.close(irql)
    {
        kd_print!(Error, "{name}: closing the session failed: {status}\n");
    }
    if *callout_id != 0 {
        // SAFETY: PASSIVE_LEVEL (the token); our callout's id. Waits for calls under way.
        let status = unsafe { sys::FwpsCalloutUnregisterById0(*callout_id) };
        if status != 0 {
            kd_print!(Error, "{name}: unregistering failed: {status:#x}\n");
        }
        *callout_id = 0;
    }
}
