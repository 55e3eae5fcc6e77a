//! Benchmark (a)'s baseline: the firewall's cache-hit classification written as a C driver
//! would write it — an `unsafe extern "system"` classifyFn registered with
//! `FwpsCalloutRegister3`, reading `FWPS_INCOMING_VALUES0` by raw pointer and index, with no
//! type checks, and a global for its state.
//!
//! It does the work the firewall's outbound callout does on a cache hit, in the same order, with
//! the firewall's own [`VerdictCache`] (`firewall_driver::cache`): the loopback flag, the
//! connection's fields and the keyed hash of its application id (`wfp_rs::pend::app_hash`), the reauthorization flag, the
//! set-associative lookup under the cache's spin lock, the hit counted twice (the firewall as
//! the benchmarks load it counts in its own counters and in `Config::stats`), and the verdict in
//! the classify-out. It only skips what the SDK adds: finding the callout instance from the
//! filter's callout id, and checking each value's type.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::Duration;

use firewall_driver::cache::{Answer, CacheKey, Lookup, VerdictCache};
use firewall_protocol::{Direction, Verdict};
use wfp_rs::callout::CalloutKey;
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::Engine;
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::pend::app_hash;
use wfp_rs::time::Instant;
use wfp_rs::{Guid, Status, guid, sys};

use crate::raw_callout::{apply, begin, register, unregister};

/// The baseline's callout at `ALE_AUTH_CONNECT_V4`.
pub const CALLOUT: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("3b0f2a6e-8d61-4c1e-9a57-0c4e2f7b9d13"));
const PROVIDER: Guid = guid!("5d2c8e41-7a93-4f0b-b6e2-19a4c3d5e7f8");
const SUBLAYER: Guid = guid!("a7e1c9d3-2b48-4f6a-8c05-d3e9f1a2b4c6");
const FILTER: Guid = guid!("c4f8a2e6-1d37-4b9c-a5e0-7f2d6b8c3e19");

/// What the callout uses, reached through [`STATE`] as a C driver reaches its globals.
struct State {
    cache: VerdictCache,
    permit_loopback: bool,
    default: Verdict,
    hits: AtomicU64,
    /// A second hit counter: the firewall, as the benchmarks configure it
    /// (`Config::stats`), counts each hit in its own counters and in the harness's.
    harness_hits: AtomicU64,
    loopback: AtomicU64,
    defaults: AtomicU64,
}

/// Set before the callout is registered, cleared after it is unregistered.
static STATE: AtomicPtr<State> = AtomicPtr::new(core::ptr::null_mut());

/// Cache hits counted by the baseline callout since the process started.
pub fn hits() -> u64 {
    // `hits` is called by the harness between loads.
    // SAFETY: the pointer is null or a live `State`, freed only after unregistration.
    unsafe { STATE.load(Ordering::Acquire).as_ref() }
        .map_or(0, |state| state.hits.load(Ordering::Relaxed))
}

/// The classifyFn.
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
    if state.permit_loopback && fields.flags & sys::FWP_CONDITION_FLAG_IS_LOOPBACK != 0 {
        state.loopback.fetch_add(1, Ordering::Relaxed);
        apply(out, Verdict::Allow);
        return;
    }
    // The firewall's key hashes the image as `ConnectionKey::of` does; `None` only before any
    // driver loaded, which cannot be while this callout is registered.
    // SAFETY: the engine's blob, valid for the call.
    let Some(app) = app_hash(unsafe { fields.app_bytes() }) else {
        state.defaults.fetch_add(1, Ordering::Relaxed);
        apply(out, state.default);
        return;
    };
    let key = CacheKey {
        pid: fields.pid,
        app,
        direction: Direction::Outbound,
        protocol: fields.protocol,
        remote: fields.remote,
        // Outbound: the firewall keys on the remote endpoint only (a fresh local port each time).
        local_port: 0,
    };
    // The firewall answers a reauthorization from its table of pended verdicts first; this
    // baseline never pends, so the flag only costs the test.
    let _reauthorization = fields.flags & sys::FWP_CONDITION_FLAG_IS_REAUTHORIZE != 0;
    let _local = fields.local;
    // classifyFn runs at IRQL <= DISPATCH_LEVEL, and the engine calls a raw one with no token.
    // SAFETY: IRQL <= DISPATCH_LEVEL; the only token on this thread, for this call only.
    let mut irql = unsafe { DispatchLevel::assume() };
    match state.cache.lookup(&mut irql, &key, Instant::now()) {
        Lookup::Hit(verdict) => {
            state.hits.fetch_add(1, Ordering::Relaxed);
            state.harness_hits.fetch_add(1, Ordering::Relaxed);
            apply(out, verdict);
        }
        Lookup::Miss | Lookup::Expired => {
            state.defaults.fetch_add(1, Ordering::Relaxed);
            apply(out, state.default);
        }
    }
}

/// The baseline driver's state: the engine session that holds its filter, and the runtime id.
pub struct RawLookup {
    engine: Option<Engine>,
    callout_id: u32,
}

impl DriverState for RawLookup {
    fn unload(mut self, irql: &mut PassiveLevel<'_>) {
        self.teardown(irql);
    }
}

impl RawLookup {
    fn teardown(&mut self, irql: &mut PassiveLevel<'_>) {
        unregister(irql, "raw-lookup", &mut self.engine, &mut self.callout_id);
        let state = STATE.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !state.is_null() {
            // SAFETY: from `Box::into_raw` in `entry`; no classifyFn runs any more.
            drop(unsafe { Box::from_raw(state) });
        }
    }
}

/// `DriverEntry`: the cache (1024 entries, as the firewall's default), holding an `Allow` for
/// [`crate::connection`]'s key for an hour; the callout; the filter that hands it outbound TCP
/// and UDP at `ALE_AUTH_CONNECT_V4`, in a sublayer of its own, as the firewall's.
#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<RawLookup, Status> {
    let cache = VerdictCache::new(firewall_driver::DEFAULT_CACHE_CAPACITY)?;
    let c = crate::connection(1);
    let key = CacheKey {
        pid: c.pid,
        // Drawn by the SDK's DriverEntry before this function runs.
        app: app_hash(&wfp_rs_sim::app_id_bytes(&c.app)).ok_or(Status::UNSUCCESSFUL)?,
        direction: Direction::Outbound,
        protocol: c.protocol.into(),
        remote: (c.remote.ip(), c.remote.port()),
        local_port: 0,
    };
    let now = Instant::now();
    let answer = Answer {
        verdict: Verdict::Allow,
        expires: now.saturating_add(Duration::from_secs(3600)),
        request_id: 1,
    };
    let generation = cache.generation();
    cache.insert(&mut *irql, key, answer, now, generation);
    let state = Box::into_raw(Box::new(State {
        cache,
        permit_loopback: true,
        default: Verdict::Deny,
        hits: AtomicU64::new(0),
        harness_hits: AtomicU64::new(0),
        loopback: AtomicU64::new(0),
        defaults: AtomicU64::new(0),
    }));
    STATE.store(state, Ordering::Release);
    let mut raw = RawLookup {
        engine: None,
        callout_id: 0,
    };
    if let Err(status) = register(irql, driver, CALLOUT, Some(classify), &mut raw.callout_id) {
        raw.teardown(irql);
        return Err(status);
    }
    match add_objects(irql) {
        Ok(engine) => {
            raw.engine = Some(engine);
            Ok(raw)
        }
        Err(status) => {
            raw.teardown(irql);
            Err(status)
        }
    }
}

fn add_objects(irql: &PassiveLevel<'_>) -> Result<Engine, Status> {
    crate::raw_objects::add(
        irql,
        &crate::raw_objects::Keys {
            name: "raw-lookup",
            provider: PROVIDER,
            sublayer: SUBLAYER,
            callout: CALLOUT,
            filter: FILTER,
        },
    )
}
