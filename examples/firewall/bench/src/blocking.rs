//! Benchmark (c)'s other design, the seed's: a C-style classifyFn that sends the question to
//! the service over the filter-manager port and waits for the reply before it decides.
//!
//! The seed did this at whatever IRQL the classification came at, and `FltSendMessage` at
//! `DISPATCH_LEVEL` stops the machine (`INVALID_PROCESS_ATTACH_ATTEMPT`). Here the benchmark
//! drives it at `PASSIVE_LEVEL` only ([`wfp_rs_sim::AleIrql::Passive`]), where waiting is
//! allowed, and the callout checks: at any other IRQL it decides the default without asking.
//! Everything else is the seed's shape — no pend, no work item, no cache — with the firewall's
//! messages, port name, and the SDK's port (the same `FltSendMessage` path the firewall's work
//! items use), so that the benchmark compares the two designs and nothing else.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::Duration;

use firewall_protocol::{
    Direction, FirewallProtocol, PORT_NAME, PathBytes, RequestHead, Verdict, request_len,
};
use wfp_rs::callout::CalloutKey;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::Engine;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::port::{Filter, ServerPort};
use wfp_rs::{Guid, Status, guid, sys};

use crate::raw_callout::{apply, begin, register, unregister};

/// The blocking callout at `ALE_AUTH_CONNECT_V4`.
pub const CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("e2b7d4a9-6c15-4f83-9d0e-b1a3c5f7e924"));
const PROVIDER: Guid = guid!("8f3e5a17-b2c4-4d69-a0e8-3c7d9f1b5a26");
const SUBLAYER: Guid = guid!("1c9a7e35-d4f2-4b08-8e6a-5b2d0f4c7e93");
const FILTER: Guid = guid!("6a4d2f8c-e1b5-4c37-9f0a-d8e2b6c4a715");

/// How long a classification waits for the service before it decides the default.
pub const TIMEOUT: Duration = crate::firewall::PATIENT;

struct State {
    port: ServerPort<FirewallProtocol>,
    next_request: AtomicU64,
    asked: AtomicU64,
    defaults: AtomicU64,
}

/// Set before the callout is registered, cleared after it is unregistered.
static STATE: AtomicPtr<State> = AtomicPtr::new(core::ptr::null_mut());

/// The classifyFn: ask, wait, decide (the default, deny, when asking fails).
///
/// # Safety
///
/// Called by the filter engine, with valid structures for an `ALE_AUTH_CONNECT_V4`
/// classification, at IRQL <= `DISPATCH_LEVEL`.
unsafe extern "system" fn classify(
    in_fixed_values: *const sys::FWPS_INCOMING_VALUES0,
    in_meta_values: *const sys::FWPS_INCOMING_METADATA_VALUES0,
    _layer_data: *mut core::ffi::c_void,
    _classify_context: *const core::ffi::c_void,
    _filter: *const sys::FWPS_FILTER3,
    _flow_context: u64,
    classify_out: *mut sys::FWPS_CLASSIFY_OUT0,
) {
    // STATE is set before registration and freed after unregistration, which waits for calls
    // in progress; the arguments are the engine's for this layer, valid for the call.
    // SAFETY: as above; the classify-out is ours for the call.
    let begun = unsafe { begin(&STATE, in_fixed_values, in_meta_values, classify_out) };
    let Some((state, out, fields)) = begun else {
        return;
    };
    // SAFETY: the engine's blob, valid for the call.
    let app = unsafe { fields.app_bytes() };
    let head = RequestHead {
        request_id: state.next_request.fetch_add(1, Ordering::Relaxed) + 1,
        process_id: fields.pid,
        direction: Direction::Outbound,
        ip_protocol: fields.protocol,
        local_address: fields.local.0,
        local_port: fields.local.1,
        remote_address: fields.remote.0,
        remote_port: fields.remote.1,
    };
    // As the firewall builds its questions: the whole path, in one buffer of the request's
    // length (here through the global allocator, which the simulator backs with pool).
    let encoded = PathBytes::from_app_id(app).and_then(|path| {
        let mut bytes = vec![0u8; request_len(path.units())];
        head.encode_with_path(path, &mut bytes).map(|_| bytes)
    });
    let Ok(request) = encoded else {
        state.defaults.fetch_add(1, Ordering::Relaxed);
        apply(out, Verdict::Deny);
        return;
    };
    // The seed's design: the classification waits here for the service. Only at
    // PASSIVE_LEVEL; anywhere else sending would stop the machine.
    let ask = |passive: &mut PassiveLevel<'_>| {
        state.asked.fetch_add(1, Ordering::Relaxed);
        state.port.send_encoded(passive, &request, TIMEOUT)
    };
    // SAFETY: this raw classifyFn was called by the engine with no token, and holds none.
    let answer = unsafe { PassiveLevel::try_current(ask) };
    match answer {
        Some(Ok(reply)) if reply.request_id == head.request_id => apply(out, reply.verdict),
        _ => {
            state.defaults.fetch_add(1, Ordering::Relaxed);
            apply(out, Verdict::Deny);
        }
    }
}

/// Questions asked and defaults given by the blocking callout of the loaded driver (0, 0 when
/// none is loaded).
pub fn counts() -> (u64, u64) {
    // The harness calls this between loads, or while loaded.
    // SAFETY: the pointer is null or a live `State`, freed only at unload.
    unsafe { STATE.load(Ordering::Acquire).as_ref() }.map_or((0, 0), |state| {
        (
            state.asked.load(Ordering::Relaxed),
            state.defaults.load(Ordering::Relaxed),
        )
    })
}

/// The blocking driver's state.
pub struct Blocking {
    engine: Option<Engine>,
    callout_id: u32,
    filter: Option<Filter>,
}

impl DriverState for Blocking {
    fn stopping(&self, irql: &mut PassiveLevel<'_>) {
        // SAFETY: as in `counts`.
        if let Some(state) = unsafe { STATE.load(Ordering::Acquire).as_ref() } {
            // Classifications waiting for a reply fail now rather than at their timeout.
            state.port.disconnect_all(irql);
        }
    }

    fn unload(mut self, irql: &mut PassiveLevel<'_>) {
        self.teardown(irql);
    }
}

impl Blocking {
    fn teardown(&mut self, irql: &mut PassiveLevel<'_>) {
        unregister(irql, "blocking", &mut self.engine, &mut self.callout_id);
        let state = STATE.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !state.is_null() {
            // SAFETY: from `Box::into_raw` in `entry`; no classifyFn runs any more.
            let state = unsafe { Box::from_raw(state) };
            state.port.close(irql);
        }
        // The port before the filter: a filter with an open port cannot be unregistered.
        if let Some(filter) = self.filter.take() {
            filter.close(irql);
        }
    }
}

/// `DriverEntry`: the minifilter and the firewall's port ([`PORT_NAME`]), the callout, and the
/// filter that hands it outbound TCP and UDP at `ALE_AUTH_CONNECT_V4`.
#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Blocking, Status> {
    let filter = Filter::register(irql, driver)?;
    let port = match ServerPort::<FirewallProtocol>::create(irql, &filter, PORT_NAME, 1, ()) {
        Ok(port) => port,
        Err(error) => {
            filter.close(irql);
            return Err(error.status);
        }
    };
    let state = Box::into_raw(Box::new(State {
        port,
        next_request: AtomicU64::new(0),
        asked: AtomicU64::new(0),
        defaults: AtomicU64::new(0),
    }));
    STATE.store(state, Ordering::Release);
    let mut blocking = Blocking {
        engine: None,
        callout_id: 0,
        filter: Some(filter),
    };
    if let Err(status) = register(
        irql,
        driver,
        CALLOUT,
        Some(classify),
        &mut blocking.callout_id,
    ) {
        blocking.teardown(irql);
        return Err(status);
    }
    match add_objects(irql) {
        Ok(engine) => {
            blocking.engine = Some(engine);
            Ok(blocking)
        }
        Err(status) => {
            blocking.teardown(irql);
            Err(status)
        }
    }
}

fn add_objects(irql: &PassiveLevel<'_>) -> Result<Engine, Status> {
    crate::raw_objects::add(
        irql,
        &crate::raw_objects::Keys {
            name: "blocking",
            provider: PROVIDER,
            sublayer: SUBLAYER,
            callout: CALLOUT,
            filter: FILTER,
        },
    )
}
