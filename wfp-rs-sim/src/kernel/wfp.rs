//! The filter engine (BFE and the WFP kernel client): sessions, transactions, providers,
//! sublayers, callouts and filters; callout registration; and classification with WFP's
//! arbitration rules.
//!
//! Behaviour follows Microsoft's documentation ("Filter Arbitration", `FWPS_ACTION0`,
//! `FWPM_FILTER0`, `FwpsCalloutRegister*`). Where the documentation is silent the choice is
//! marked INFERRED below and in `docs/simulator.md`:
//! - the `actionType` a callout sees on entry: the decision so far, or `FWP_ACTION_CONTINUE`;
//! - no matching filter in any sublayer: permit;
//! - the universal (default) sublayer's weight: 0x8000;
//! - automatic filter weights: the number of conditions (more specific first), then insertion;
//! - a completion handle or classify context that is not live (kept after its classification
//!   returned, or never handed out) stops the machine with `WFP_INVALID_OPERATION`, parameter 1
//!   = 0x80000004 / 0x80000005 (see [`FwpsPendOperation0`]).
//! - across a simulated restart ([`restart`], [`start_bfe`]): sessions cannot be opened before
//!   BFE starts ([`BFE_NOT_RUNNING`]); a boot-time filter added while BFE runs waits for the
//!   next boot; persistent objects may name only persistent ones, and boot-time filters no
//!   provider or sublayer of their own (`STATUS_FWP_LIFETIME_MISMATCH`); a callout no driver has
//!   registered since the boot blocks like an unregistered one.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::bugcheck::stop;
use super::state::{THREAD, current, current_driver, irql, level_name, require_irql};
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::layer::value::ValueKind;
use wfp_rs::layer::{IpVersion, LayerInfo, layer_by_id, layer_by_key};
use wfp_rs::status::Status;
use wfp_rs::sys::*;

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_PENDING: NTSTATUS = 0x0000_0103;
const ZERO: GUID = GUID {
    Data1: 0,
    Data2: 0,
    Data3: 0,
    Data4: [0; 8],
};

/// How long a write waits for another session's transaction when the session does not say.
const DEFAULT_TXN_WAIT: Duration = Duration::from_secs(15);

/// INFERRED: the weight of `FWPM_SUBLAYER_UNIVERSAL`, where filters without a sublayer go.
pub(crate) const UNIVERSAL_SUBLAYER_WEIGHT: u16 = 0x8000;

/// Callout ids are unique across every simulated machine in the process, so the SDK's registry
/// (which maps a callout id to its instance) never confuses two machines' callouts.
static NEXT_CALLOUT_ID: AtomicU32 = AtomicU32::new(1);

/// A condition or field value, owned.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SimValue {
    Empty,
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Bytes16([u8; 16]),
    // Shared, not owned: the harness presents one app id at every layer of a connection, and
    // the engine copies values into fresh storage for each classification anyway.
    Blob(Arc<[u8]>),
    Sid(Arc<[u8]>),
    SecurityDescriptor(Arc<[u8]>),
    TokenAccess(Arc<[u8]>),
    Unicode(Vec<u16>),
    V4Mask { addr: u32, mask: u32 },
    V6Mask { addr: [u8; 16], prefix: u8 },
    Range(Box<SimValue>, Box<SimValue>),
}

impl SimValue {
    fn integer(&self) -> Option<u64> {
        match *self {
            SimValue::U8(v) => Some(v.into()),
            SimValue::U16(v) => Some(v.into()),
            SimValue::U32(v) => Some(v.into()),
            SimValue::U64(v) => Some(v),
            _ => None,
        }
    }

    fn same_type(&self, other: &SimValue) -> bool {
        core::mem::discriminant(self) == core::mem::discriminant(other)
    }
}

#[derive(Clone, Debug)]
struct Condition {
    field_index: u32,
    match_type: FWP_MATCH_TYPE,
    value: SimValue,
}

#[derive(Clone, Debug)]
struct FilterRecord {
    id: u64,
    key: GUID,
    layer_id: u16,
    sublayer: GUID,
    weight: u64,
    flags: u32,
    action: FWP_ACTION_TYPE,
    callout_key: GUID,
    raw_context: u64,
    conditions: Vec<Condition>,
    session: usize,
    provider: Option<GUID>,
}

#[derive(Clone, Debug)]
struct Owned<T> {
    session: usize,
    /// Added with its `*_FLAG_PERSISTENT`: kept across a restart ([`restart`]).
    persistent: bool,
    /// The provider the object names, if any (a provider in use cannot be deleted).
    provider: Option<GUID>,
    data: T,
}

#[derive(Clone, Default)]
struct Objects {
    providers: FxHashMap<GUID, Owned<()>>,
    sublayers: FxHashMap<GUID, Owned<u16>>,
    /// Callout key → (applicable layer, id).
    callouts: FxHashMap<GUID, Owned<(GUID, u32)>>,
    filters: BTreeMap<u64, FilterRecord>,
}

struct Session {
    dynamic: bool,
    /// How long a write waits for another session's transaction (`None`: forever).
    txn_wait: Option<Duration>,
    /// The driver whose code opened it (0: the test harness), checked at its unload.
    driver: usize,
}

struct Transaction {
    session: usize,
    snapshot: Objects,
}

/// A callout registered with `FwpsCalloutRegister3`.
struct RuntimeCallout {
    key: GUID,
    classify: FWPS_CALLOUT_CLASSIFY_FN3,
    notify: FWPS_CALLOUT_NOTIFY_FN3,
    flow_delete: FWPS_CALLOUT_FLOW_DELETE_NOTIFY_FN0,
    /// The driver whose code the callbacks are (charged for pool, checked at unload).
    driver: usize,
    /// Calls into the callout under way; unregistration waits for zero.
    in_flight: usize,
}

#[derive(Default)]
pub(crate) struct Bfe {
    next_handle: usize,
    next_filter_id: u64,
    sessions: FxHashMap<usize, Session>,
    txn: Option<Transaction>,
    objects: Objects,
    callout_ids: FxHashMap<GUID, u32>,
    runtime: FxHashMap<u32, RuntimeCallout>,
    next_pend: usize,
    /// Completion handles of classifications in progress (valid only during the classify).
    completion_handles: FxHashMap<usize, CompletionHandle>,
    /// Pended classifications, by completion context.
    pends: FxHashMap<usize, Pend>,
    /// Flow contexts, by (flow id, layer id, callout id).
    flow_contexts: FxHashMap<FlowKey, u64>,
    /// Classifications in progress, by the flow handle in their metadata (those without one are
    /// not counted).
    classifying_flows: FxHashMap<u64, usize>,
    /// Contexts removed while a classification of their flow was in progress, waiting for the
    /// last one to return before they go to `flowDeleteFn`.
    deferred_flow_deletes: Vec<(FlowKey, u64)>,
    /// Classifications in progress, by the classify context handed to callouts.
    live_classifications: FxHashMap<usize, LiveClassification>,
    /// Classify handles acquired and not yet released.
    classify_handles: FxHashMap<usize, ClassifyHandle>,
    /// Completion handles of classifications that returned, the most recent ones.
    retired_completion_handles: Retired,
    /// Classify contexts of classifications that returned, the most recent ones.
    retired_classify_contexts: Retired,
    /// How many times the committed filters of each layer where ALE flows are authorized
    /// changed (by layer id): an ALE flow authorized at an older count is reauthorized by its
    /// next packet (`Machine::packet`; Microsoft's "ALE Reauthorization").
    policy_changes: FxHashMap<u16, u64>,
    /// Where the machine is in its boot: which filters are enforced, whether sessions open.
    phase: Phase,
    /// Redirect handles from `FwpsRedirectHandleCreate0`, not destroyed yet.
    redirect_handles: FxHashMap<usize, RedirectHandleRecord>,
    /// Redirect handles destroyed, the most recent ones (for the stop's report).
    destroyed_redirect_handles: Retired,
    /// The redirect records of the connections being classified at ALE_CONNECT_REDIRECT, by
    /// the handle their metadata carries (`redirectRecords`): the redirect handles that
    /// redirected each connection, oldest first.
    redirect_records: FxHashMap<usize, Vec<RedirectRecord>>,
    /// Classifications pended at ALE_CONNECT_REDIRECT whose classifyFn returned, by classify
    /// context: their connect request stays writable, through the classify handle that pended
    /// them, until the pend is completed.
    pended_redirects: FxHashMap<usize, LiveClassification>,
    /// The versions of the history of each stack request (by its address) whose
    /// classifications have ended: the request's `previousVersion` may point into them, and a
    /// reauthorization's copy reads the chain, so they live as long as the request
    /// ([`forget_request`], when the stack drops it), not as the classification.
    request_versions: FxHashMap<usize, Vec<RequestVersion>>,
}

/// A redirect handle from `FwpsRedirectHandleCreate0`.
struct RedirectHandleRecord {
    /// The driver that created it (checked at unload).
    driver: usize,
}

/// One redirection of a connection: the redirect handle a callout put in the connect request
/// it applied (`localRedirectHandle`), and the context it gave (`localRedirectContext`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RedirectRecord {
    pub handle: usize,
    pub context: usize,
}

/// Where a simulated machine is in its boot ([`restart`], [`start_bfe`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Phase {
    /// BFE runs: the persistent and every other filter but the boot-time ones are enforced.
    #[default]
    Running,
    /// From a restart until BFE starts: only the boot-time filters are enforced, and no
    /// session can be opened.
    BootTime,
}

/// Whether `filter` is enforced in `phase`. Documented (`FWPM_FILTER0`, `FwpmProviderAdd0`):
/// boot-time objects are in force from when TCP/IP starts until BFE has initialized, and
/// persistent ones from when BFE starts. INFERRED: a boot-time filter added while BFE runs is
/// stored for the next boot and not enforced until then.
fn enforced(filter: &FilterRecord, phase: Phase) -> bool {
    let boot_time = filter.flags & FWPM_FILTER_FLAG_BOOTTIME != 0;
    match phase {
        Phase::Running => !boot_time,
        Phase::BootTime => boot_time,
    }
}

/// A flow context's place: (flow id, layer id, callout id).
type FlowKey = (u64, u16, u32);

/// The last [`Retired::CAPACITY`] values of one kind the engine handed out and invalidated.
/// Only the stop's report reads it (was the value handed out once, or never?): any value that
/// is not live stops the machine, so forgetting old ones changes the report, never the verdict.
#[derive(Default)]
struct Retired(VecDeque<usize>);

impl Retired {
    /// Bounded so a long simulation (millions of classifications) does not grow it without end.
    const CAPACITY: usize = 1024;

    fn retire(&mut self, value: usize) {
        if self.0.len() == Self::CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(value);
    }

    /// 1 if `value` is among the recently retired, 0 otherwise: parameter 3 of the stop.
    fn parameter(&self, value: usize) -> usize {
        usize::from(self.0.contains(&value))
    }
}

/// A classification in progress, as `FwpsAcquireClassifyHandle0`/`FwpsPendClassify0` see it.
struct LiveClassification {
    /// Whether a callout may pend it by classify handle.
    pendable: bool,
    /// The classify handle that pended it.
    pended: Option<usize>,
    /// `layerData` when it is a connect request (ALE_CONNECT_REDIRECT) or a bind request
    /// (ALE_BIND_REDIRECT): the address of the stack's request, which an applied modification
    /// rewrites.
    request: Option<LayerRequest>,
    /// The writable copy handed out and not applied yet.
    writable: Option<WritableCopy>,
    /// The versions the history of the copies handed out points to, freed with the
    /// classification.
    versions: Vec<RequestVersion>,
    /// The redirect records handle of the classification's metadata (ALE_CONNECT_REDIRECT).
    redirect_records: Option<usize>,
    /// The filter ids of the applied copies that changed the request, oldest first.
    changes: Vec<u64>,
    /// How many of `changes` there were when the classification was pended by classify handle.
    changes_at_pend: usize,
    /// The filter id of the pended callout's copy applied with
    /// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS`.
    reauthorize_if_modified_by_others: Option<u64>,
}

impl LiveClassification {
    /// Whether the completion of the pend reauthorizes the connection instead of deciding:
    /// the pended callout applied its copy with `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS`,
    /// and another filter changed the request while the classification was pended.
    /// INFERRED: the documentation says "if another callout driver modifies the data before
    /// the classification is completed"; the window is taken from the pend (when the callout
    /// last saw the request it decided on), not from the acquire, because a callout that
    /// acquires from its work item after another filter's change overwrites what that filter
    /// decided without that filter seeing the result. Another filter is a different filter id.
    fn modified_by_others_while_pended(&self) -> bool {
        self.reauthorize_if_modified_by_others.is_some_and(|own| {
            self.changes
                .get(self.changes_at_pend..)
                .is_some_and(|since| since.iter().any(|&filter| filter != own))
        })
    }
}

/// A writable copy of a connect or bind request, from `FwpsAcquireWritableLayerDataPointer0`.
struct WritableCopy {
    handle: usize,
    filter_id: u64,
    copy: RequestVersion,
}

/// The writable layer data of a redirect layer: the address of the stack's request, by type.
#[derive(Clone, Copy)]
enum LayerRequest {
    /// An `FWPS_CONNECT_REQUEST0` (ALE_CONNECT_REDIRECT).
    Connect(usize),
    /// An `FWPS_BIND_REQUEST0` (ALE_BIND_REDIRECT).
    Bind(usize),
}

/// A request of a redirect layer with its modification history.
trait RedirectRequest: Copy + 'static {
    fn history(&mut self) -> (&mut *mut Self, &mut u64);
    /// Takes from `modified` what a callout may change at the layer; whether anything changed.
    fn take_changes(&mut self, modified: &Self) -> bool;
}

impl RedirectRequest for FWPS_CONNECT_REQUEST0 {
    fn history(&mut self) -> (&mut *mut Self, &mut u64) {
        (&mut self.previousVersion, &mut self.modifierFilterId)
    }

    /// The remote address and port, the port reservation token, the loopback-redirect fields.
    /// A changed local address is ignored (INFERRED: "Using Bind or Connect Redirection" says it
    /// is only supported at ALE_BIND_REDIRECT).
    fn take_changes(&mut self, modified: &Self) -> bool {
        let changed =
            !same_socket_address(&self.remoteAddressAndPort, &modified.remoteAddressAndPort)
                || self.portReservationToken != modified.portReservationToken
                || self.localRedirectTargetPID != modified.localRedirectTargetPID
                || self.localRedirectHandle != modified.localRedirectHandle
                || self.localRedirectContext != modified.localRedirectContext
                || self.localRedirectContextSize != modified.localRedirectContextSize;
        if changed {
            self.remoteAddressAndPort = modified.remoteAddressAndPort;
            self.portReservationToken = modified.portReservationToken;
            self.localRedirectTargetPID = modified.localRedirectTargetPID;
            self.localRedirectHandle = modified.localRedirectHandle;
            self.localRedirectContext = modified.localRedirectContext;
            self.localRedirectContextSize = modified.localRedirectContextSize;
        }
        changed
    }
}

impl RedirectRequest for FWPS_BIND_REQUEST0 {
    fn history(&mut self) -> (&mut *mut Self, &mut u64) {
        (&mut self.previousVersion, &mut self.modifierFilterId)
    }

    /// The local address and port and the port reservation token: the only members the
    /// `FWPS_BIND_REQUEST0` page lets a callout modify.
    fn take_changes(&mut self, modified: &Self) -> bool {
        let changed =
            !same_socket_address(&self.localAddressAndPort, &modified.localAddressAndPort)
                || self.portReservationToken != modified.portReservationToken;
        if changed {
            self.localAddressAndPort = modified.localAddressAndPort;
            self.portReservationToken = modified.portReservationToken;
        }
        changed
    }
}

/// A version of a request the engine owns (its address is handed to the callout): an
/// `FWPS_CONNECT_REQUEST0` or an `FWPS_BIND_REQUEST0`.
struct RequestVersion(Box<dyn core::any::Any>);

impl RequestVersion {
    /// Boxes `request`; the address stays valid while the version lives (moving the box does
    /// not move the request).
    fn new<R: RedirectRequest>(request: R) -> (RequestVersion, *mut R) {
        let mut boxed = Box::new(request);
        let address: *mut R = &mut *boxed;
        (RequestVersion(boxed), address)
    }

    fn is_at(&self, address: PVOID) -> bool {
        core::ptr::eq(
            (&*self.0 as *const dyn core::any::Any).cast::<u8>(),
            address.cast(),
        )
    }

    fn get<R: RedirectRequest>(&self) -> Option<&R> {
        self.0.downcast_ref()
    }
}

// SAFETY: the raw pointers inside (`previousVersion`, the loopback-redirect fields) point to other
// versions the same classification owns or the request's earlier classifications left in
// `Bfe::request_versions`, or are the callout's; the engine reads them only under its lock.
unsafe impl Send for RequestVersion {}

/// A classify handle from `FwpsAcquireClassifyHandle0`.
struct ClassifyHandle {
    driver: usize,
    /// The classify context it was acquired for.
    classification: usize,
}

/// A completion handle handed to callouts in `FWPS_INCOMING_METADATA_VALUES0`.
struct CompletionHandle {
    reauthorization: bool,
    pended: Option<usize>,
}

/// A classification a callout pended with `FwpsPendOperation0`.
pub(crate) struct Pend {
    /// The driver that pended it.
    pub driver: usize,
    pub completed: bool,
    /// The final decision `FwpsCompleteClassify0` gave (`None`: reauthorize).
    pub decision: Option<FWP_ACTION_TYPE>,
}

impl Bfe {
    /// The committed objects: what classification sees while a transaction is open.
    fn committed(&self) -> &Objects {
        self.txn.as_ref().map_or(&self.objects, |t| &t.snapshot)
    }

    /// A filter at `layer_id` was added or deleted outside a transaction (one inside is counted
    /// when it commits, [`Bfe::count_committed_changes`]).
    fn policy_changed(&mut self, layer_id: u16) {
        if self.txn.is_none() && is_flow_authorizing_layer(layer_id) {
            *self.policy_changes.entry(layer_id).or_default() += 1;
        }
    }

    /// At a commit: counts a policy change at each flow-authorizing layer whose filters differ
    /// from the transaction's start.
    fn count_committed_changes(&mut self, snapshot: &Objects) {
        for layer in FLOW_AUTHORIZING_LAYERS {
            let ids = |objects: &Objects| {
                let mut ids: Vec<u64> = objects
                    .filters
                    .values()
                    .filter(|f| f.layer_id == layer && enforced(f, self.phase))
                    .map(|f| f.id)
                    .collect();
                ids.sort_unstable();
                ids
            };
            if ids(snapshot) != ids(&self.objects) {
                *self.policy_changes.entry(layer).or_default() += 1;
            }
        }
    }

    fn callout_id(&mut self, key: GUID) -> u32 {
        *self
            .callout_ids
            .entry(key)
            .or_insert_with(|| NEXT_CALLOUT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// The pends `driver` has not completed and the classify handles it has not released
    /// (checked at unload).
    pub(crate) fn pends_of(&self, driver: usize) -> usize {
        let mut open: std::collections::BTreeSet<usize> = self
            .pends
            .iter()
            .filter(|(_, p)| p.driver == driver && !p.completed)
            .map(|(context, _)| *context)
            .collect();
        open.extend(
            self.classify_handles
                .iter()
                .filter(|(_, h)| h.driver == driver)
                .map(|(handle, _)| *handle),
        );
        open.len()
    }

    /// The keys of the callouts `driver` still has registered (checked at unload).
    pub(crate) fn callouts_of(&self, driver: usize) -> Vec<String> {
        self.runtime
            .values()
            .filter(|c| c.driver == driver)
            .map(|c| wfp_rs::guid::Guid(c.key).to_string())
            .collect()
    }
}

/// The layers where ALE flows are authorized: ALE_AUTH_CONNECT_V4/V6 and
/// ALE_AUTH_RECV_ACCEPT_V4/V6. A filter added or deleted at one of them is the policy change
/// that reauthorizes the flows it authorized.
const FLOW_AUTHORIZING_LAYERS: [u16; 4] = {
    use wfp_rs::layer::{
        AleAuthConnectV4, AleAuthConnectV6, AleAuthRecvAcceptV4, AleAuthRecvAcceptV6, Layer,
    };
    [
        AleAuthConnectV4::ID,
        AleAuthConnectV6::ID,
        AleAuthRecvAcceptV4::ID,
        AleAuthRecvAcceptV6::ID,
    ]
};

fn is_flow_authorizing_layer(layer_id: u16) -> bool {
    FLOW_AUTHORIZING_LAYERS.contains(&layer_id)
}

/// How many policy changes the flow-authorizing layer `layer_id` has seen (see
/// [`Bfe::policy_changes`]).
pub(crate) fn policy_changes(layer_id: u16) -> u64 {
    with_bfe(|bfe| bfe.policy_changes.get(&layer_id).copied().unwrap_or(0))
}

/// Another provider (a user-mode firewall, group policy) added or deleted a filter at every
/// flow-authorizing layer: each counts a policy change, as [`Bfe::policy_changed`] does for a
/// filter of the machine's drivers. The filter itself is not modelled: only its effect on
/// established flows, which are reauthorized at their next packet. Inside an open transaction
/// the change is counted at its commit, as a filter added in it would be.
pub(crate) fn another_provider_changed_policy() {
    with_bfe(|bfe| {
        for layer in FLOW_AUTHORIZING_LAYERS {
            bfe.policy_changed(layer);
        }
    });
}

impl Bfe {
    /// Keeps a finished classification's history versions with its request (see
    /// [`Bfe::request_versions`]).
    fn retain_versions(&mut self, mut live: LiveClassification) {
        let (Some(LayerRequest::Connect(request) | LayerRequest::Bind(request)), false) =
            (live.request, live.versions.is_empty())
        else {
            return;
        };
        self.request_versions
            .entry(request)
            .or_default()
            .append(&mut live.versions);
    }
}

/// The stack dropped its request at `request` (the connection left the redirect layer): the
/// versions its history pointed to go with it.
pub(crate) fn forget_request(request: usize) {
    let versions = with_bfe(|bfe| bfe.request_versions.remove(&request));
    drop(versions);
}

fn with_bfe<R>(f: impl FnOnce(&mut Bfe) -> R) -> R {
    let kernel = current();
    let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut bfe)
}

fn session_of(bfe: &Bfe, handle: HANDLE) -> Result<usize, NTSTATUS> {
    let key = handle as usize;
    if bfe.sessions.contains_key(&key) {
        Ok(key)
    } else {
        Err(Status::INVALID_PARAMETER.raw())
    }
}

/// Wakes the writers waiting for a transaction when dropped.
struct WakeTxnWaiters;

impl Drop for WakeTxnWaiters {
    fn drop(&mut self) {
        current().wfp_txn.notify_all();
    }
}

fn status(result: Result<(), NTSTATUS>) -> NTSTATUS {
    result.err().unwrap_or(STATUS_SUCCESS)
}

// --- sessions and transactions -----------------------------------------------------------------

/// What [`FwpmEngineOpen0`] returns before BFE has started (after a [`restart`], until
/// [`start_bfe`]): `RPC_NT_SERVER_UNAVAILABLE`. INFERRED: the documentation says a callout
/// driver must wait for BFE to run (`FwpmBfeStateGet0`, `FwpmBfeStateSubscribeChanges0`) but
/// not what opening a session earlier returns; the management calls are requests to the BFE
/// service, and this is the status of a request to a server that is not running.
pub(crate) const BFE_NOT_RUNNING: NTSTATUS = 0xC002_0017_u32 as NTSTATUS;

/// `FwpmEngineOpen0` (kernel mode: `serverName` must be null). Fails with
/// [`BFE_NOT_RUNNING`] while the machine boots ([`Phase::BootTime`]).
///
/// # Safety
///
/// `session` null or valid; `engineHandle` writable.
pub unsafe extern "system" fn FwpmEngineOpen0(
    serverName: *const u16,
    authnService: u32,
    authIdentity: PVOID,
    session: *const FWPM_SESSION0,
    engineHandle: *mut HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (authnService, authIdentity);
    require_irql("FwpmEngineOpen0", PASSIVE_LEVEL);
    if !serverName.is_null() || engineHandle.is_null() {
        return Status::INVALID_PARAMETER.raw();
    }
    // SAFETY: null or a valid session per the contract.
    let options = unsafe { session.as_ref() };
    let dynamic = options.is_some_and(|s| s.flags & FWPM_SESSION_FLAG_DYNAMIC != 0);
    // 0 selects BFE's default wait; INFINITE (0xFFFFFFFF) waits forever.
    let txn_wait = match options.map_or(0, |s| s.txnWaitTimeoutInMSec) {
        0 => Some(DEFAULT_TXN_WAIT),
        u32::MAX => None,
        ms => Some(Duration::from_millis(ms.into())),
    };
    let driver = current_driver();
    let handle = with_bfe(|bfe| {
        if bfe.phase == Phase::BootTime {
            return Err(BFE_NOT_RUNNING);
        }
        bfe.next_handle += 1;
        let handle = 0x5E55_0000 + bfe.next_handle;
        bfe.sessions.insert(
            handle,
            Session {
                dynamic,
                txn_wait,
                driver,
            },
        );
        Ok(handle)
    });
    let handle = match handle {
        Ok(handle) => handle,
        Err(status) => return status,
    };
    // SAFETY: writable per the contract.
    unsafe { engineHandle.write(handle as HANDLE) };
    STATUS_SUCCESS
}

/// `FwpmEngineClose0`: aborts the session's transaction (as documented: "If this function is
/// called with a transaction in progress, the transaction will be aborted"), which deletes the
/// filters added in it as [`FwpmTransactionAbort0`] does, and, for a dynamic session, deletes
/// every object it added. Objects a non-dynamic session added stay in the engine after it
/// closes (until deleted, or persistent ones for good), as on Windows.
///
/// # Safety
///
/// None beyond the handle being the caller's.
pub unsafe extern "system" fn FwpmEngineClose0(engineHandle: HANDLE) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmEngineClose0", PASSIVE_LEVEL);
    // Whatever happens, a transaction may have ended: let waiting writers look again.
    let _wake = WakeTxnWaiters;
    let removed = with_bfe(|bfe| {
        let session = session_of(bfe, engineHandle)?;
        let mut removed = Vec::new();
        if bfe.txn.as_ref().is_some_and(|t| t.session == session) {
            let txn = bfe.txn.take().expect("checked");
            // The filters added in the aborted transaction are deleted: their callouts are told.
            removed.extend(
                bfe.objects
                    .filters
                    .values()
                    .filter(|f| !txn.snapshot.filters.contains_key(&f.id))
                    .cloned(),
            );
            bfe.objects = txn.snapshot;
        }
        let dynamic = bfe.sessions.remove(&session).is_some_and(|s| s.dynamic);
        if dynamic {
            let ids: Vec<u64> = bfe
                .objects
                .filters
                .values()
                .filter(|f| f.session == session)
                .map(|f| f.id)
                .collect();
            for id in ids {
                if let Some(filter) = bfe.objects.filters.remove(&id) {
                    bfe.policy_changed(filter.layer_id);
                    removed.push(filter);
                }
            }
            bfe.objects.callouts.retain(|_, c| c.session != session);
            bfe.objects.sublayers.retain(|_, s| s.session != session);
            bfe.objects.providers.retain(|_, p| p.session != session);
        }
        Ok(removed)
    });
    match removed {
        Ok(removed) => {
            for filter in &removed {
                notify_delete(filter);
            }
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// Parameter 3 of the `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` stop for a
/// filter-engine session still open at unload (1 to 3 are the filter manager's: server port,
/// client connection, minifilter).
pub(crate) const UNLOAD_SESSION_OPEN: usize = 4;

/// The unload check for the filter engine: a session the driver opened (`FwpmEngineOpen0` in its
/// code) and did not close stops the machine with 0xCE, parameter 2 = the engine handle,
/// parameter 3 = [`UNLOAD_SESSION_OPEN`], parameter 4 = how many of its sessions are open (the
/// lowest handle is reported).
///
/// INFERRED: Microsoft documents no stop for it. On Windows nothing closes a kernel-mode session
/// for the driver, so everything it owns outlives the driver: a dynamic session's filters stay
/// in force (a terminating callout filter keeps blocking once its callout is unregistered), and
/// its open transaction, if any, keeps every other session's writes waiting. The simulator
/// reports it the way it reports the driver's other leftovers at unload, and changes nothing:
/// the objects stay where the driver left them.
pub(crate) fn check_unload(kernel: &super::state::Kernel, driver: usize, name: &str) {
    let bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    let mut open: Vec<(usize, bool)> = bfe
        .sessions
        .iter()
        .filter(|(_, s)| s.driver == driver)
        .map(|(&handle, s)| (handle, s.dynamic))
        .collect();
    open.sort_unstable();
    let Some(&(handle, dynamic)) = open.first() else {
        return;
    };
    let objects = &bfe.objects;
    let filters = objects
        .filters
        .values()
        .filter(|f| f.session == handle)
        .count();
    let callouts = objects
        .callouts
        .values()
        .filter(|c| c.session == handle)
        .count();
    let sublayers = objects
        .sublayers
        .values()
        .filter(|x| x.session == handle)
        .count();
    let providers = objects
        .providers
        .values()
        .filter(|p| p.session == handle)
        .count();
    let txn = bfe.txn.as_ref().is_some_and(|t| t.session == handle);
    drop(bfe);
    let kind = if dynamic { "dynamic" } else { "non-dynamic" };
    let txn = if txn {
        ", its transaction still open (every other session's writes wait for it)"
    } else {
        ""
    };
    let consequence = if dynamic {
        "a dynamic session's objects are deleted only when it closes, so they outlive the driver \
         and its filters keep acting (a filter naming an unregistered callout blocks)"
    } else {
        "the session is never closed"
    };
    stop(
        BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
        [0, handle, UNLOAD_SESSION_OPEN, open.len()],
        &format!(
            "driver {name} unloaded with {} filter engine session(s) still open (engine handle \
             {handle:#x}: {kind}{txn}; it owns {filters} filter(s), {callouts} callout(s), \
             {sublayers} sublayer(s), {providers} provider(s)); {consequence}. Close every \
             Engine (Engine::close) before unload returns",
            open.len()
        ),
    );
}

// --- restart -------------------------------------------------------------------------------------

/// The filter engine's part of a simulated restart (`Machine::restart`): every session ends
/// (an open transaction with it, uncommitted), and with them every object that is not stored
/// across a reboot: dynamic and static (non-persistent) providers, sublayers, callouts and
/// filters. Persistent objects stay, and boot-time filters stay stored; the engine enters
/// [`Phase::BootTime`], where only the boot-time filters are enforced, until [`start_bfe`].
/// Flows and their contexts end (no connection survives a reboot). Returns how many objects
/// were dropped. The caller makes sure no driver is loaded: no callout is registered and no
/// classification is pended.
pub(crate) fn restart(kernel: &super::state::Kernel) -> usize {
    let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    debug_assert!(bfe.runtime.is_empty() && bfe.pends.values().all(|p| p.completed));
    if let Some(txn) = bfe.txn.take() {
        bfe.objects = txn.snapshot;
    }
    bfe.sessions.clear();
    let objects = &mut bfe.objects;
    let before = objects.providers.len()
        + objects.sublayers.len()
        + objects.callouts.len()
        + objects.filters.len();
    objects
        .filters
        .retain(|_, f| f.flags & (FWPM_FILTER_FLAG_PERSISTENT | FWPM_FILTER_FLAG_BOOTTIME) != 0);
    objects.callouts.retain(|_, c| c.persistent);
    objects.sublayers.retain(|_, s| s.persistent);
    objects.providers.retain(|_, p| p.persistent);
    let after = objects.providers.len()
        + objects.sublayers.len()
        + objects.callouts.len()
        + objects.filters.len();
    bfe.pends.clear();
    bfe.flow_contexts.clear();
    bfe.deferred_flow_deletes.clear();
    bfe.classify_handles.clear();
    bfe.pended_redirects.clear();
    bfe.request_versions.clear();
    bfe.redirect_handles.clear();
    bfe.phase = Phase::BootTime;
    drop(bfe);
    kernel.wfp_txn.notify_all();
    before - after
}

/// BFE starts after a restart: the persistent objects are enforced again and the boot-time
/// filters no longer (they stay stored for the next boot); sessions can be opened. Returns
/// `false` if BFE was running already.
pub(crate) fn start_bfe(kernel: &super::state::Kernel) -> bool {
    let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    if bfe.phase == Phase::Running {
        return false;
    }
    bfe.phase = Phase::Running;
    // The enforced filters changed at every layer.
    for layer in FLOW_AUTHORIZING_LAYERS {
        *bfe.policy_changes.entry(layer).or_default() += 1;
    }
    true
}

/// Whether BFE runs (see [`Phase`]).
pub(crate) fn bfe_running(kernel: &super::state::Kernel) -> bool {
    kernel.wfp.lock().unwrap_or_else(|p| p.into_inner()).phase == Phase::Running
}

/// Every provider, sublayer, callout and filter in the engine (committed or not), for
/// `Machine::engine_objects`.
pub(crate) fn objects(kernel: &super::state::Kernel) -> Vec<crate::EngineObject> {
    use crate::{EngineObject, EngineObjectKind as Kind, Lifetime};
    let bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    let lifetime = |session: usize, persistent: bool, boot_time: bool| {
        if boot_time {
            Lifetime::BootTime
        } else if persistent {
            Lifetime::Persistent
        } else if bfe.sessions.get(&session).is_some_and(|s| s.dynamic) {
            Lifetime::Dynamic
        } else {
            Lifetime::Static
        }
    };
    let object = |kind, key: &GUID, lifetime| EngineObject {
        kind,
        key: wfp_rs::Guid(*key),
        lifetime,
    };
    let objects = &bfe.objects;
    let mut list = Vec::new();
    for (key, p) in &objects.providers {
        list.push(object(
            Kind::Provider,
            key,
            lifetime(p.session, p.persistent, false),
        ));
    }
    for (key, s) in &objects.sublayers {
        list.push(object(
            Kind::Sublayer,
            key,
            lifetime(s.session, s.persistent, false),
        ));
    }
    for (key, c) in &objects.callouts {
        list.push(object(
            Kind::Callout,
            key,
            lifetime(c.session, c.persistent, false),
        ));
    }
    for f in objects.filters.values() {
        let persistent = f.flags & FWPM_FILTER_FLAG_PERSISTENT != 0;
        let boot_time = f.flags & FWPM_FILTER_FLAG_BOOTTIME != 0;
        list.push(object(
            Kind::Filter,
            &f.key,
            lifetime(f.session, persistent, boot_time),
        ));
    }
    list
}

/// `FwpmTransactionBegin0`. One transaction at a time, machine-wide.
///
/// # Safety
///
/// None beyond the handle being the caller's.
pub unsafe extern "system" fn FwpmTransactionBegin0(engineHandle: HANDLE, flags: u32) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = flags;
    require_irql("FwpmTransactionBegin0", PASSIVE_LEVEL);
    status(with_write(engineHandle, |bfe, session| {
        // `with_write` waited out other sessions' transactions; a second one of this session is
        // an error.
        if bfe.txn.is_some() {
            return Err(Status::FWP_TXN_IN_PROGRESS.raw());
        }
        bfe.txn = Some(Transaction {
            session,
            snapshot: bfe.objects.clone(),
        });
        Ok(())
    }))
}

/// `FwpmTransactionCommit0`.
///
/// # Safety
///
/// None beyond the handle being the caller's.
pub unsafe extern "system" fn FwpmTransactionCommit0(engineHandle: HANDLE) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmTransactionCommit0", PASSIVE_LEVEL);
    // Whatever happens, a transaction may have ended: let waiting writers look again.
    let _wake = WakeTxnWaiters;
    status(with_bfe(|bfe| {
        let session = session_of(bfe, engineHandle)?;
        match &bfe.txn {
            Some(txn) if txn.session == session => {
                let txn = bfe.txn.take().expect("matched");
                bfe.count_committed_changes(&txn.snapshot);
                Ok(())
            }
            _ => Err(Status::FWP_NO_TXN_IN_PROGRESS.raw()),
        }
    }))
}

/// `FwpmTransactionAbort0`: restores the objects as they were at `FwpmTransactionBegin0`.
///
/// # Safety
///
/// None beyond the handle being the caller's.
pub unsafe extern "system" fn FwpmTransactionAbort0(engineHandle: HANDLE) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmTransactionAbort0", PASSIVE_LEVEL);
    // Whatever happens, a transaction may have ended: let waiting writers look again.
    let _wake = WakeTxnWaiters;
    let removed = with_bfe(|bfe| {
        let session = session_of(bfe, engineHandle)?;
        match bfe.txn.take() {
            Some(txn) if txn.session == session => {
                let removed: Vec<FilterRecord> = bfe
                    .objects
                    .filters
                    .values()
                    .filter(|f| !txn.snapshot.filters.contains_key(&f.id))
                    .cloned()
                    .collect();
                bfe.objects = txn.snapshot;
                Ok(removed)
            }
            other => {
                bfe.txn = other;
                Err(Status::FWP_NO_TXN_IN_PROGRESS.raw())
            }
        }
    });
    match removed {
        Ok(removed) => {
            for filter in &removed {
                notify_delete(filter);
            }
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// Runs a write by the session `handle`: waits while another session's transaction is open, up
/// to the session's transaction wait timeout (`STATUS_FWP_TIMEOUT` then), as BFE does.
fn with_write<R>(
    handle: HANDLE,
    f: impl FnOnce(&mut Bfe, usize) -> Result<R, NTSTATUS>,
) -> Result<R, NTSTATUS> {
    let kernel = current();
    let bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    let session = session_of(&bfe, handle)?;
    let deadline = bfe.sessions[&session]
        .txn_wait
        .map(|wait| kernel.deadline_in(wait));
    // An infinite transaction wait in DriverEntry or an unload routine is bounded by the
    // machine's unload wait limit (on Windows: a hang).
    let unload_deadline = if deadline.is_none() {
        kernel.load_or_unload_deadline()
    } else {
        None
    };
    // The session may be closed while this thread waits: that ends the wait too.
    let (mut bfe, timed_out) = kernel.wait_while(
        &kernel.wfp,
        bfe,
        &kernel.wfp_txn,
        deadline.or(unload_deadline),
        "filter engine: waits for another session's transaction",
        |bfe| {
            bfe.txn.as_ref().is_some_and(|txn| txn.session != session)
                && session_of(bfe, handle).is_ok()
        },
    );
    session_of(&bfe, handle)?;
    if timed_out {
        if deadline.is_none() {
            let holder = bfe.txn.as_ref().map_or(0, |txn| txn.session);
            drop(bfe);
            kernel.unload_wait_expired(
                super::state::current_driver(),
                [
                    handle as usize,
                    0,
                    0,
                    wfp_rs::bugcheck::unload_wait::TRANSACTION,
                ],
                &format!(
                    "another session's filter engine transaction to end (session {holder:#x} keeps one open; this session waits with an infinite transaction wait timeout)"
                ),
            );
        }
        return Err(Status::FWP_TIMEOUT.raw());
    }
    f(&mut bfe, session)
}

/// Whether an object of `session` may refer to one owned by `owner`: a dynamic session's
/// objects may be referred to only by objects of the same session.
fn lifetime_ok(bfe: &Bfe, session: usize, owner: usize) -> bool {
    owner == session || !bfe.sessions.get(&owner).is_some_and(|s| s.dynamic)
}

/// Whether a persistent object (`referrer_persistent`) may refer to one that is
/// (`target_persistent`) or is not: only to a persistent one, which is there again after a
/// restart. (`STATUS_FWP_LIFETIME_MISMATCH` is documented as two objects of incompatible
/// lifetimes; that a persistent filter, sublayer or callout needs a persistent provider,
/// sublayer and callout is INFERRED from it.)
fn persistence_ok(referrer_persistent: bool, target_persistent: bool) -> bool {
    !referrer_persistent || target_persistent
}

/// Checks a reference to provider `key` by a new object of `session`, persistent or not.
fn check_provider(
    bfe: &Bfe,
    session: usize,
    key: Option<GUID>,
    persistent: bool,
) -> Result<(), NTSTATUS> {
    let Some(key) = key else { return Ok(()) };
    let provider = bfe
        .objects
        .providers
        .get(&key)
        .ok_or(Status::FWP_PROVIDER_NOT_FOUND.raw())?;
    if lifetime_ok(bfe, session, provider.session)
        && persistence_ok(persistent, provider.persistent)
    {
        Ok(())
    } else {
        Err(Status::FWP_LIFETIME_MISMATCH.raw())
    }
}

/// Persistent objects outlive every session, so a dynamic session cannot add them.
fn check_persistence(bfe: &Bfe, session: usize, persistent: bool) -> Result<(), NTSTATUS> {
    if persistent && bfe.sessions[&session].dynamic {
        Err(Status::FWP_DYNAMIC_SESSION_IN_PROGRESS.raw())
    } else {
        Ok(())
    }
}

/// BFE requires a display name on every object.
fn check_name(display: &FWPM_DISPLAY_DATA0) -> Result<(), NTSTATUS> {
    if display.name.is_null() {
        Err(Status::FWP_NULL_DISPLAY_NAME.raw())
    } else {
        Ok(())
    }
}

// --- providers, sublayers, callouts ------------------------------------------------------------

/// `FwpmProviderAdd0`.
///
/// # Safety
///
/// `provider` must be valid.
pub unsafe extern "system" fn FwpmProviderAdd0(
    engineHandle: HANDLE,
    provider: *const FWPM_PROVIDER0,
    sd: PVOID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = sd;
    require_irql("FwpmProviderAdd0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(provider) = (unsafe { provider.as_ref() }) else {
        return Status::FWP_NULL_POINTER.raw();
    };
    status(with_write(engineHandle, |bfe, session| {
        check_name(&provider.displayData)?;
        let persistent = provider.flags & FWPM_PROVIDER_FLAG_PERSISTENT != 0;
        check_persistence(bfe, session, persistent)?;
        if bfe.objects.providers.contains_key(&provider.providerKey) {
            return Err(Status::FWP_ALREADY_EXISTS.raw());
        }
        bfe.objects.providers.insert(
            provider.providerKey,
            Owned {
                session,
                persistent,
                provider: None,
                data: (),
            },
        );
        Ok(())
    }))
}

/// `FwpmProviderDeleteByKey0`.
///
/// # Safety
///
/// `key` must be valid.
pub unsafe extern "system" fn FwpmProviderDeleteByKey0(
    engineHandle: HANDLE,
    key: *const GUID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmProviderDeleteByKey0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(key) = (unsafe { key.as_ref() }).copied() else {
        return Status::FWP_NULL_POINTER.raw();
    };
    status(with_write(engineHandle, |bfe, _session| {
        if !bfe.objects.providers.contains_key(&key) {
            return Err(Status::FWP_PROVIDER_NOT_FOUND.raw());
        }
        let objects = &bfe.objects;
        let named = objects.sublayers.values().any(|o| o.provider == Some(key))
            || objects.callouts.values().any(|o| o.provider == Some(key))
            || objects.filters.values().any(|f| f.provider == Some(key));
        if named {
            // An object cannot be deleted while others refer to it.
            return Err(Status::FWP_IN_USE.raw());
        }
        bfe.objects.providers.remove(&key);
        Ok(())
    }))
}

/// `FwpmSubLayerAdd0`.
///
/// # Safety
///
/// `subLayer` must be valid.
pub unsafe extern "system" fn FwpmSubLayerAdd0(
    engineHandle: HANDLE,
    subLayer: *const FWPM_SUBLAYER0,
    sd: PVOID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = sd;
    require_irql("FwpmSubLayerAdd0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(sublayer) = (unsafe { subLayer.as_ref() }) else {
        return Status::FWP_NULL_POINTER.raw();
    };
    // SAFETY: the provider key is null or valid per the contract.
    let provider = unsafe { sublayer.providerKey.as_ref() }.copied();
    status(with_write(engineHandle, |bfe, session| {
        check_name(&sublayer.displayData)?;
        let persistent = sublayer.flags & FWPM_SUBLAYER_FLAG_PERSISTENT != 0;
        check_persistence(bfe, session, persistent)?;
        check_provider(bfe, session, provider, persistent)?;
        let key = if sublayer.subLayerKey == ZERO {
            // BFE generates a key for a sublayer that has none.
            bfe.next_handle += 1;
            GUID {
                Data1: 0x5AB1_0000,
                Data2: 0,
                Data3: 0,
                Data4: (bfe.next_handle as u64).to_le_bytes(),
            }
        } else {
            sublayer.subLayerKey
        };
        if bfe.objects.sublayers.contains_key(&key) {
            return Err(Status::FWP_ALREADY_EXISTS.raw());
        }
        bfe.objects.sublayers.insert(
            key,
            Owned {
                session,
                persistent,
                provider,
                data: sublayer.weight,
            },
        );
        Ok(())
    }))
}

/// `FwpmSubLayerDeleteByKey0`. A sublayer that still holds filters is in use.
///
/// # Safety
///
/// `key` must be valid.
pub unsafe extern "system" fn FwpmSubLayerDeleteByKey0(
    engineHandle: HANDLE,
    key: *const GUID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmSubLayerDeleteByKey0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(key) = (unsafe { key.as_ref() }).copied() else {
        return Status::FWP_NULL_POINTER.raw();
    };
    status(with_write(engineHandle, |bfe, _session| {
        if !bfe.objects.sublayers.contains_key(&key) {
            return Err(Status::FWP_SUBLAYER_NOT_FOUND.raw());
        }
        if bfe.objects.filters.values().any(|f| f.sublayer == key) {
            return Err(Status::FWP_IN_USE.raw());
        }
        bfe.objects.sublayers.remove(&key);
        Ok(())
    }))
}

/// `FwpmCalloutAdd0`. The callout's id is shared with `FwpsCalloutRegister3` through its key.
///
/// # Safety
///
/// `callout` must be valid; `id` null or writable.
pub unsafe extern "system" fn FwpmCalloutAdd0(
    engineHandle: HANDLE,
    callout: *const FWPM_CALLOUT0,
    sd: PVOID,
    id: *mut u32,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = sd;
    require_irql("FwpmCalloutAdd0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(callout) = (unsafe { callout.as_ref() }) else {
        return Status::FWP_NULL_POINTER.raw();
    };
    // SAFETY: the provider key is null or valid per the contract.
    let provider = unsafe { callout.providerKey.as_ref() }.copied();
    let result = with_write(engineHandle, |bfe, session| {
        check_name(&callout.displayData)?;
        let persistent = callout.flags & FWPM_CALLOUT_FLAG_PERSISTENT != 0;
        check_persistence(bfe, session, persistent)?;
        check_provider(bfe, session, provider, persistent)?;
        if layer_by_key(&wfp_rs::guid::Guid(callout.applicableLayer)).is_none() {
            return Err(Status::FWP_LAYER_NOT_FOUND.raw());
        }
        if bfe.objects.callouts.contains_key(&callout.calloutKey) {
            return Err(Status::FWP_ALREADY_EXISTS.raw());
        }
        let callout_id = bfe.callout_id(callout.calloutKey);
        bfe.objects.callouts.insert(
            callout.calloutKey,
            Owned {
                session,
                persistent,
                provider,
                data: (callout.applicableLayer, callout_id),
            },
        );
        Ok(callout_id)
    });
    match result {
        Ok(callout_id) => {
            if !id.is_null() {
                // SAFETY: writable per the contract.
                unsafe { id.write(callout_id) };
            }
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// `FwpmCalloutDeleteByKey0`. A callout still named by a filter is in use.
///
/// # Safety
///
/// `key` must be valid.
pub unsafe extern "system" fn FwpmCalloutDeleteByKey0(
    engineHandle: HANDLE,
    key: *const GUID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmCalloutDeleteByKey0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(key) = (unsafe { key.as_ref() }).copied() else {
        return Status::FWP_NULL_POINTER.raw();
    };
    status(with_write(engineHandle, |bfe, _session| {
        if !bfe.objects.callouts.contains_key(&key) {
            return Err(Status::FWP_CALLOUT_NOT_FOUND.raw());
        }
        if bfe
            .objects
            .filters
            .values()
            .any(|f| f.action & FWP_ACTION_FLAG_CALLOUT != 0 && f.callout_key == key)
        {
            return Err(Status::FWP_IN_USE.raw());
        }
        bfe.objects.callouts.remove(&key);
        Ok(())
    }))
}

// --- filters -----------------------------------------------------------------------------------

/// Copies a byte blob out of the engine's structures.
///
/// # Safety
///
/// `ptr` must be null or point to a valid `FWP_BYTE_BLOB`.
unsafe fn read_blob(ptr: *const FWP_BYTE_BLOB) -> Result<Arc<[u8]>, NTSTATUS> {
    // SAFETY: null or valid per the contract.
    let blob = unsafe { ptr.as_ref() }.ok_or(Status::FWP_NULL_POINTER.raw())?;
    if blob.size == 0 {
        return Ok(Arc::from(&[][..]));
    }
    if blob.data.is_null() {
        return Err(Status::FWP_NULL_POINTER.raw());
    }
    // SAFETY: a valid blob holds `size` bytes at `data`.
    Ok(unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) }.into())
}

/// Copies a SID (8-byte header, then 4 bytes per sub-authority; the count is byte 1).
///
/// # Safety
///
/// `sid` must be null or point to a valid SID.
unsafe fn read_sid(sid: *const SID) -> Result<Arc<[u8]>, NTSTATUS> {
    let bytes = sid.cast::<u8>();
    if bytes.is_null() {
        return Err(Status::FWP_NULL_POINTER.raw());
    }
    // SAFETY: a valid SID has its 8-byte header; byte 1 is the sub-authority count.
    let count = unsafe { bytes.wrapping_add(1).read() } as usize;
    // SAFETY: a valid SID holds `8 + 4 * count` bytes.
    Ok(unsafe { core::slice::from_raw_parts(bytes, 8 + 4 * count) }.into())
}

/// Copies a NUL-terminated UTF-16 string.
///
/// # Safety
///
/// `text` must be null or point to a NUL-terminated string.
unsafe fn read_units(text: *const u16) -> Result<Vec<u16>, NTSTATUS> {
    if text.is_null() {
        return Err(Status::FWP_NULL_POINTER.raw());
    }
    let mut units = Vec::new();
    loop {
        let next = text.wrapping_add(units.len());
        // SAFETY: the string is NUL-terminated and reading stops at the terminator.
        let unit = unsafe { next.read() };
        if unit == 0 {
            return Ok(units);
        }
        units.push(unit);
    }
}

/// Reads a value from the arms both `FWP_VALUE0_u` and `FWP_CONDITION_VALUE0_u` have, by tag;
/// `None` for tags only condition values have.
macro_rules! read_common_arms {
    ($tag:expr, $u:expr) => {{
        let u = $u;
        let null = Status::FWP_NULL_POINTER.raw();
        // SAFETY (each block in this macro): `$tag` names the active arm, and pointer arms are
        // null (checked) or valid per the calling function's contract.
        match $tag {
            FWP_EMPTY => Some(SimValue::Empty),
            // SAFETY: see above.
            FWP_UINT8 => Some(SimValue::U8(unsafe { u.uint8 })),
            // SAFETY: see above.
            FWP_UINT16 => Some(SimValue::U16(unsafe { u.uint16 })),
            // SAFETY: see above.
            FWP_UINT32 => Some(SimValue::U32(unsafe { u.uint32 })),
            FWP_UINT64 => {
                // SAFETY: see above.
                let ptr = unsafe { u.uint64 };
                // SAFETY: see above.
                Some(SimValue::U64(unsafe { ptr.as_ref() }.copied().ok_or(null)?))
            }
            FWP_BYTE_ARRAY16_TYPE => {
                // SAFETY: see above.
                let ptr = unsafe { u.byteArray16 };
                // SAFETY: see above.
                let array = unsafe { ptr.as_ref() };
                Some(SimValue::Bytes16(array.ok_or(null)?.byteArray16))
            }
            FWP_BYTE_BLOB_TYPE => {
                // SAFETY: see above.
                let blob = unsafe { u.byteBlob };
                // SAFETY: see above.
                Some(SimValue::Blob(unsafe { read_blob(blob) }?))
            }
            FWP_SECURITY_DESCRIPTOR_TYPE => {
                // SAFETY: see above.
                let blob = unsafe { u.sd };
                // SAFETY: see above.
                Some(SimValue::SecurityDescriptor(unsafe { read_blob(blob) }?))
            }
            FWP_TOKEN_ACCESS_INFORMATION_TYPE => {
                // SAFETY: see above.
                let blob = unsafe { u.tokenAccessInformation };
                // SAFETY: see above.
                Some(SimValue::TokenAccess(unsafe { read_blob(blob) }?))
            }
            FWP_SID => {
                // SAFETY: see above.
                let sid = unsafe { u.sid };
                // SAFETY: see above.
                Some(SimValue::Sid(unsafe { read_sid(sid) }?))
            }
            FWP_UNICODE_STRING_TYPE => {
                // SAFETY: see above.
                let text = unsafe { u.unicodeString };
                // SAFETY: see above.
                Some(SimValue::Unicode(unsafe { read_units(text) }?))
            }
            _ => None,
        }
    }};
}

/// Reads an `FWP_VALUE0` into an owned value.
///
/// # Safety
///
/// The pointer arm its tag names must be null or valid.
unsafe fn read_value(value: &FWP_VALUE0) -> Result<Option<SimValue>, NTSTATUS> {
    Ok(read_common_arms!(value.r#type, &value.u))
}

/// Reads an `FWP_CONDITION_VALUE0` into an owned value.
///
/// # Safety
///
/// The pointer arm its tag names must be null or valid, recursively for ranges.
unsafe fn read_condition(value: &FWP_CONDITION_VALUE0) -> Result<SimValue, NTSTATUS> {
    let null = Status::FWP_NULL_POINTER.raw();
    let u = &value.u;
    let owned = match value.r#type {
        FWP_V4_ADDR_MASK => {
            // SAFETY: the tag names this arm; the pointer is null or valid per the contract.
            let mask = unsafe { u.v4AddrMask.as_ref() }.ok_or(null)?;
            SimValue::V4Mask {
                addr: mask.addr,
                mask: mask.mask,
            }
        }
        FWP_V6_ADDR_MASK => {
            // SAFETY: as above.
            let mask = unsafe { u.v6AddrMask.as_ref() }.ok_or(null)?;
            if mask.prefixLength > 128 {
                return Err(Status::FWP_INVALID_PARAMETER.raw());
            }
            SimValue::V6Mask {
                addr: mask.addr,
                prefix: mask.prefixLength,
            }
        }
        FWP_RANGE_TYPE => {
            // SAFETY: as above.
            let range = unsafe { u.rangeValue.as_ref() }.ok_or(null)?;
            // SAFETY: the range's ends are values valid per the contract.
            let low =
                unsafe { read_value(&range.valueLow) }?.ok_or(Status::FWP_TYPE_MISMATCH.raw())?;
            // SAFETY: as above.
            let high =
                unsafe { read_value(&range.valueHigh) }?.ok_or(Status::FWP_TYPE_MISMATCH.raw())?;
            SimValue::Range(Box::new(low), Box::new(high))
        }
        tag => read_common_arms!(tag, u).ok_or(Status::FWP_TYPE_MISMATCH.raw())?,
    };
    Ok(owned)
}

/// The value type a field of `kind` takes in a condition, and whether `value` fits it.
fn condition_fits(
    kind: ValueKind,
    version: Option<IpVersion>,
    value: &SimValue,
) -> Result<(), NTSTATUS> {
    let sample = |v: &SimValue| -> bool {
        matches!(
            (kind, v),
            (ValueKind::U8 | ValueKind::IpProtocol, SimValue::U8(_))
                | (ValueKind::U16, SimValue::U16(_))
                | (ValueKind::U32 | ValueKind::ConditionFlags, SimValue::U32(_))
                | (ValueKind::U64, SimValue::U64(_))
                | (ValueKind::AppId | ValueKind::ByteBlob, SimValue::Blob(_))
                | (ValueKind::Sid, SimValue::Sid(_))
                | (ValueKind::UnicodeString, SimValue::Unicode(_))
                | (ValueKind::ByteArray16, SimValue::Bytes16(_))
        ) || matches!(
            (kind, version, v),
            (
                ValueKind::Address,
                Some(IpVersion::V4),
                SimValue::U32(_) | SimValue::V4Mask { .. }
            ) | (
                ValueKind::Address,
                Some(IpVersion::V6),
                SimValue::Bytes16(_) | SimValue::V6Mask { .. }
            )
        )
    };
    match value {
        SimValue::Range(low, high) if sample(low) && low.same_type(high) => Ok(()),
        // Identity fields are matched with a security descriptor through an access check, which
        // the simulator does not implement: refuse rather than never match.
        SimValue::SecurityDescriptor(_) => Err(Status::NOT_IMPLEMENTED.raw()),
        v if sample(v) => Ok(()),
        _ => Err(Status::FWP_TYPE_MISMATCH.raw()),
    }
}

fn match_type_fits(match_type: FWP_MATCH_TYPE, value: &SimValue) -> Result<(), NTSTATUS> {
    let ok = match match_type {
        FWP_MATCH_EQUAL | FWP_MATCH_NOT_EQUAL => !matches!(value, SimValue::Range(..)),
        FWP_MATCH_GREATER
        | FWP_MATCH_LESS
        | FWP_MATCH_GREATER_OR_EQUAL
        | FWP_MATCH_LESS_OR_EQUAL => order_key(value).is_some(),
        FWP_MATCH_RANGE => matches!(value, SimValue::Range(..)),
        FWP_MATCH_FLAGS_ALL_SET | FWP_MATCH_FLAGS_ANY_SET | FWP_MATCH_FLAGS_NONE_SET => {
            value.integer().is_some()
        }
        FWP_MATCH_EQUAL_CASE_INSENSITIVE => matches!(value, SimValue::Unicode(_)),
        FWP_MATCH_PREFIX | FWP_MATCH_NOT_PREFIX => return Err(Status::NOT_IMPLEMENTED.raw()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Status::FWP_MATCH_TYPE_MISMATCH.raw())
    }
}

/// `FwpmFilterAdd0`. Validates the filter as BFE does, calls the callout's `notifyFn` with
/// `FWPS_CALLOUT_NOTIFY_ADD_FILTER` if the callout is registered (a failure there refuses the
/// filter), and assigns the filter id.
///
/// # Safety
///
/// `filter` and everything it points to must be valid; `id` null or writable.
pub unsafe extern "system" fn FwpmFilterAdd0(
    engineHandle: HANDLE,
    filter: *const FWPM_FILTER0,
    sd: PVOID,
    id: *mut u64,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = sd;
    require_irql("FwpmFilterAdd0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(filter) = (unsafe { filter.as_ref() }) else {
        return Status::FWP_NULL_POINTER.raw();
    };
    // SAFETY: the filter and its pointers are valid per the contract.
    let record = match unsafe { parse_filter(filter) } {
        Ok(record) => record,
        Err(status) => return status,
    };
    let prepared = with_write(
        engineHandle,
        |bfe, session| -> Result<(FilterRecord, Option<Notify>), NTSTATUS> {
            let mut record = record;
            record.session = session;
            let persistent = record.flags & FWPM_FILTER_FLAG_PERSISTENT != 0;
            let boot_time = record.flags & FWPM_FILTER_FLAG_BOOTTIME != 0;
            // A boot-time filter is stored for the next boot like a persistent one, so a
            // dynamic session cannot add it either (INFERRED).
            check_persistence(bfe, session, persistent || boot_time)?;
            if boot_time && (record.provider.is_some() || record.sublayer != ZERO) {
                // INFERRED: at boot, before BFE, none of BFE's providers and sublayers exist
                // (persistent objects are added when BFE starts), so a boot-time filter can
                // name only the built-in default sublayer.
                return Err(Status::FWP_LIFETIME_MISMATCH.raw());
            }
            check_provider(bfe, session, record.provider, persistent)?;
            if record.sublayer != ZERO {
                let sublayer = bfe
                    .objects
                    .sublayers
                    .get(&record.sublayer)
                    .ok_or(Status::FWP_SUBLAYER_NOT_FOUND.raw())?;
                if !lifetime_ok(bfe, session, sublayer.session)
                    || !persistence_ok(persistent, sublayer.persistent)
                {
                    return Err(Status::FWP_LIFETIME_MISMATCH.raw());
                }
            }
            if record.key != ZERO && bfe.objects.filters.values().any(|f| f.key == record.key) {
                return Err(Status::FWP_ALREADY_EXISTS.raw());
            }
            let mut notify = None;
            if record.action & FWP_ACTION_FLAG_CALLOUT != 0 {
                let Some(callout) = bfe.objects.callouts.get(&record.callout_key) else {
                    return Err(Status::FWP_CALLOUT_NOT_FOUND.raw());
                };
                if !lifetime_ok(bfe, session, callout.session)
                    || !persistence_ok(persistent, callout.persistent)
                {
                    return Err(Status::FWP_LIFETIME_MISMATCH.raw());
                }
                let layer = layer_by_id(record.layer_id).expect("parsed from a known layer");
                if callout.data.0 != layer.key.0 {
                    return Err(Status::FWP_INCOMPATIBLE_LAYER.raw());
                }
                let callout_id = callout.data.1;
                notify = begin_call(bfe, callout_id)
                    .and_then(|(call, rt)| rt.notify.map(|f| Notify { call, f }));
            }
            bfe.next_filter_id += 1;
            record.id = bfe.next_filter_id;
            if record.key == ZERO {
                // BFE generates a key for a filter that has none.
                record.key = GUID {
                    Data1: 0x5157_0000,
                    Data2: 0,
                    Data3: 0,
                    Data4: record.id.to_le_bytes(),
                };
            }
            Ok((record, notify))
        },
    );
    let (record, notify) = match prepared {
        Ok(prepared) => prepared,
        Err(status) => return status,
    };
    if let Some(notify) = notify {
        let verdict = notify.call(FWPS_CALLOUT_NOTIFY_ADD_FILTER, &record);
        if verdict < 0 {
            return Status::FWP_CALLOUT_NOTIFICATION_FAILED.raw();
        }
    }
    let inserted = with_bfe(|bfe| {
        if bfe.objects.filters.values().any(|f| f.key == record.key) {
            return Err(Status::FWP_ALREADY_EXISTS.raw());
        }
        bfe.objects.filters.insert(record.id, record.clone());
        if enforced(&record, bfe.phase) {
            bfe.policy_changed(record.layer_id);
        }
        Ok(record.id)
    });
    match inserted {
        Ok(filter_id) => {
            if !id.is_null() {
                // SAFETY: writable per the contract.
                unsafe { id.write(filter_id) };
            }
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// Turns an `FWPM_FILTER0` into a record, checking what BFE checks.
///
/// # Safety
///
/// `filter` and its pointers must be valid.
unsafe fn parse_filter(filter: &FWPM_FILTER0) -> Result<FilterRecord, NTSTATUS> {
    let layer = layer_by_key(&wfp_rs::guid::Guid(filter.layerKey))
        .ok_or(Status::FWP_LAYER_NOT_FOUND.raw())?;
    let action = filter.action.r#type;
    let callout_key = if action & FWP_ACTION_FLAG_CALLOUT != 0 {
        // SAFETY: the action's union holds the callout key when the callout flag is set.
        unsafe { filter.action.u.calloutKey }
    } else {
        ZERO
    };
    check_name(&filter.displayData)?;
    if filter.flags & FWPM_FILTER_FLAG_DISABLED != 0 {
        // A filter cannot be added disabled.
        return Err(Status::FWP_INVALID_FLAGS.raw());
    }
    let boot_time = filter.flags & FWPM_FILTER_FLAG_BOOTTIME != 0;
    if boot_time && filter.flags & FWPM_FILTER_FLAG_PERSISTENT != 0 {
        // FWPM_FILTER0: the two flags cannot be set together.
        return Err(Status::FWP_INVALID_FLAGS.raw());
    }
    if boot_time && action & FWP_ACTION_FLAG_CALLOUT != 0 {
        // Boot-time callouts are not simulated: refused rather than never called.
        return Err(Status::NOT_IMPLEMENTED.raw());
    }
    match action {
        FWP_ACTION_PERMIT
        | FWP_ACTION_BLOCK
        | FWP_ACTION_CALLOUT_TERMINATING
        | FWP_ACTION_CALLOUT_INSPECTION
        | FWP_ACTION_CALLOUT_UNKNOWN => {}
        _ => return Err(Status::FWP_INVALID_ACTION_TYPE.raw()),
    }
    if filter.flags & FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED != 0
        && !matches!(
            action,
            FWP_ACTION_CALLOUT_TERMINATING | FWP_ACTION_CALLOUT_UNKNOWN
        )
    {
        return Err(Status::FWP_INVALID_FLAGS.raw());
    }
    // SAFETY: the weight's pointer arms are valid per the contract.
    let weight_value =
        unsafe { read_value(&filter.weight) }?.ok_or(Status::FWP_INVALID_WEIGHT.raw())?;
    let conditions = if filter.numFilterConditions == 0 {
        Vec::new()
    } else {
        if filter.filterCondition.is_null() {
            return Err(Status::FWP_NULL_POINTER.raw());
        }
        // SAFETY: the array holds `numFilterConditions` conditions per the contract.
        let raw = unsafe {
            core::slice::from_raw_parts(filter.filterCondition, filter.numFilterConditions as usize)
        };
        let mut conditions = Vec::with_capacity(raw.len());
        for condition in raw {
            let field = layer
                .fields
                .iter()
                .find(|f| f.condition.0 == condition.fieldKey)
                .ok_or(Status::FWP_CONDITION_NOT_FOUND.raw())?;
            // SAFETY: the condition value's pointer arms are valid per the contract.
            let value = unsafe { read_condition(&condition.conditionValue) }?;
            condition_fits(field.kind, layer.ip_version, &value)?;
            match_type_fits(condition.matchType, &value)?;
            conditions.push(Condition {
                field_index: field.index,
                match_type: condition.matchType,
                value,
            });
        }
        conditions
    };
    // INFERRED auto weight: more conditions (more specific) first.
    let auto = conditions.len() as u64;
    let weight = match weight_value {
        SimValue::Empty => auto,
        SimValue::U8(range) if range <= 15 => (u64::from(range) << 60) | auto,
        SimValue::U64(weight) => weight,
        _ => return Err(Status::FWP_INVALID_WEIGHT.raw()),
    };
    Ok(FilterRecord {
        id: 0,
        key: filter.filterKey,
        layer_id: layer.id,
        sublayer: filter.subLayerKey,
        weight,
        flags: filter.flags,
        action,
        callout_key,
        raw_context: if filter.flags & FWPM_FILTER_FLAG_HAS_PROVIDER_CONTEXT == 0 {
            // SAFETY: without HAS_PROVIDER_CONTEXT the union holds the raw context.
            unsafe { filter.u.rawContext }
        } else {
            0
        },
        conditions,
        session: 0,
        // SAFETY: the provider key is null or valid per the contract.
        provider: unsafe { filter.providerKey.as_ref() }.copied(),
    })
}

/// `FwpmFilterDeleteById0`: calls the callout's `notifyFn` with
/// `FWPS_CALLOUT_NOTIFY_DELETE_FILTER`.
///
/// # Safety
///
/// None beyond the handle being the caller's.
pub unsafe extern "system" fn FwpmFilterDeleteById0(engineHandle: HANDLE, id: u64) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmFilterDeleteById0", PASSIVE_LEVEL);
    let removed = with_write(engineHandle, |bfe, _session| {
        let filter = bfe
            .objects
            .filters
            .remove(&id)
            .ok_or(Status::FWP_FILTER_NOT_FOUND.raw())?;
        if enforced(&filter, bfe.phase) {
            bfe.policy_changed(filter.layer_id);
        }
        Ok(filter)
    });
    match removed {
        Ok(filter) => {
            notify_delete(&filter);
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// `FwpmFilterDeleteByKey0`: as [`FwpmFilterDeleteById0`], for the filter with that key.
///
/// # Safety
///
/// `key` must be valid.
pub unsafe extern "system" fn FwpmFilterDeleteByKey0(
    engineHandle: HANDLE,
    key: *const GUID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpmFilterDeleteByKey0", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(key) = (unsafe { key.as_ref() }).copied() else {
        return Status::FWP_NULL_POINTER.raw();
    };
    let removed = with_write(engineHandle, |bfe, _session| {
        let id = bfe
            .objects
            .filters
            .values()
            .find(|f| f.key == key)
            .map(|f| f.id)
            .ok_or(Status::FWP_FILTER_NOT_FOUND.raw())?;
        let filter = bfe.objects.filters.remove(&id).expect("found");
        if enforced(&filter, bfe.phase) {
            bfe.policy_changed(filter.layer_id);
        }
        Ok(filter)
    });
    match removed {
        Ok(filter) => {
            notify_delete(&filter);
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

// --- callout registration ----------------------------------------------------------------------

/// `FwpsCalloutRegister3`.
///
/// # Safety
///
/// `deviceObject` must be the caller's device; `callout` valid; `calloutId` null or writable.
pub unsafe extern "system" fn FwpsCalloutRegister3(
    deviceObject: PVOID,
    callout: *const FWPS_CALLOUT3,
    calloutId: *mut u32,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsCalloutRegister3", PASSIVE_LEVEL);
    // SAFETY: valid per the contract.
    let Some(callout) = (unsafe { callout.as_ref() }) else {
        return Status::FWP_NULL_POINTER.raw();
    };
    let driver = {
        let kernel = current();
        let state = kernel.lock();
        match state.devices.get(&(deviceObject as usize)) {
            Some(device) => device.driver,
            None => return Status::INVALID_PARAMETER.raw(),
        }
    };
    if callout.classifyFn.is_none() || callout.notifyFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    let result = with_bfe(|bfe| {
        let id = bfe.callout_id(callout.calloutKey);
        if bfe.runtime.contains_key(&id) {
            return Err(Status::FWP_ALREADY_EXISTS.raw());
        }
        bfe.runtime.insert(
            id,
            RuntimeCallout {
                key: callout.calloutKey,
                classify: callout.classifyFn,
                notify: callout.notifyFn,
                flow_delete: callout.flowDeleteFn,
                driver,
                in_flight: 0,
            },
        );
        Ok(id)
    });
    match result {
        Ok(id) => {
            if !calloutId.is_null() {
                // SAFETY: writable per the contract.
                unsafe { calloutId.write(id) };
            }
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// `FwpsCalloutUnregisterById0`: waits for calls into the callout that are under way, so no
/// callback runs after it returns.
///
/// # Safety
///
/// None.
pub unsafe extern "system" fn FwpsCalloutUnregisterById0(calloutId: u32) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsCalloutUnregisterById0", PASSIVE_LEVEL);
    let kernel = current();
    let bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    if bfe
        .flow_contexts
        .keys()
        .any(|&(_, _, callout)| callout == calloutId)
        || bfe
            .deferred_flow_deletes
            .iter()
            .any(|&((_, _, callout), _)| callout == calloutId)
    {
        // Flows still carry this callout's contexts (or a removed one still waits for its
        // flowDeleteFn): the driver must remove them first, and try again.
        return Status::DEVICE_BUSY.raw();
    }
    // From an unload routine (or DriverEntry) the wait is bounded, as every wait the I/O
    // manager's unload depends on (`Machine::set_unload_wait_limit`).
    let deadline = kernel.load_or_unload_deadline();
    let (bfe, timed_out) = kernel.wait_while(
        &kernel.wfp,
        bfe,
        &kernel.wfp_idle,
        deadline,
        "FwpsCalloutUnregisterById0: waits for calls into the callout",
        |bfe| {
            bfe.runtime
                .get(&calloutId)
                .is_some_and(|callout| callout.in_flight > 0)
        },
    );
    let mut bfe = bfe;
    match bfe.runtime.get(&calloutId) {
        None => return Status::FWP_CALLOUT_NOT_FOUND.raw(),
        Some(callout) if timed_out => {
            let calls = callout.in_flight;
            drop(bfe);
            kernel.unload_wait_expired(
                super::state::current_driver(),
                [
                    calloutId as usize,
                    0,
                    0,
                    wfp_rs::bugcheck::unload_wait::CALLOUT_CALLS,
                ],
                &format!(
                    "{calls} call(s) into callout {calloutId} to return (FwpsCalloutUnregisterById0 waits for callbacks in progress)"
                ),
            );
        }
        Some(_) => {}
    }
    bfe.runtime.remove(&calloutId);
    STATUS_SUCCESS
}

/// The key of callout `id`, for the stop report: `None` if the engine is busy on this thread (a
/// stop may come while it holds the engine lock) or the callout is gone.
pub(crate) fn callout_key(kernel: &super::state::Kernel, id: u32) -> Option<GUID> {
    let bfe = kernel.wfp.try_lock().ok()?;
    bfe.runtime.get(&id).map(|callout| callout.key)
}

/// A call into a registered callout, counted so unregistration waits for it.
struct Call {
    id: u32,
    driver: usize,
}

impl Drop for Call {
    fn drop(&mut self) {
        let kernel = current();
        if let Some(callout) = kernel
            .wfp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .runtime
            .get_mut(&self.id)
        {
            callout.in_flight -= 1;
        }
        kernel.wfp_idle.notify_all();
    }
}

/// Starts a call into callout `id` if it is registered.
fn begin_call(bfe: &mut Bfe, id: u32) -> Option<(Call, &RuntimeCallout)> {
    let callout = bfe.runtime.get_mut(&id)?;
    callout.in_flight += 1;
    let driver = callout.driver;
    Some((Call { id, driver }, &*callout))
}

struct Notify {
    call: Call,
    f: unsafe extern "system" fn(
        FWPS_CALLOUT_NOTIFY_TYPE,
        *const GUID,
        *mut FWPS_FILTER3,
    ) -> NTSTATUS,
}

impl Notify {
    fn call(self, kind: FWPS_CALLOUT_NOTIFY_TYPE, record: &FilterRecord) -> NTSTATUS {
        let mut storage = FilterStorage::new(record, 0, self.call.id);
        let key = record.key;
        let driver = self.call.driver;
        let status = in_driver(driver, self.call.id, "notifyFn", || {
            // SAFETY: the callout registered this notifyFn; the key and filter are valid for the
            // call, and notifyFn is called at PASSIVE_LEVEL here (the management call's IRQL).
            unsafe { (self.f)(kind, &key, storage.filter()) }
        });
        drop(self.call);
        status
    }
}

fn notify_delete(record: &FilterRecord) {
    if record.action & FWP_ACTION_FLAG_CALLOUT == 0 {
        return;
    }
    let notify = with_bfe(|bfe| {
        let id = *bfe.callout_ids.get(&record.callout_key)?;
        begin_call(bfe, id).and_then(|(call, rt)| rt.notify.map(|f| Notify { call, f }))
    });
    if let Some(notify) = notify {
        let _ = notify.call(FWPS_CALLOUT_NOTIFY_DELETE_FILTER, record);
    }
}

/// Runs driver code on this thread, charged to `driver`, and checks that it returns at the IRQL
/// it was called at.
pub(crate) fn in_driver<R>(
    driver: usize,
    callout: u32,
    callback: &'static str,
    f: impl FnOnce() -> R,
) -> R {
    let before = irql();
    let routine = super::state::Routine::new(
        super::state::RoutineKind::Callout(callback),
        driver,
        callout as usize,
    );
    // The IRQL is checked as the callback's return, so the report names the callback.
    super::state::with_routine(routine, || {
        let result = super::state::as_driver(driver, f);
        let after = irql();
        if after != before {
            stop(
                BugCheckCode::IRQL_UNEXPECTED_VALUE,
                [
                    ((after as usize) << 16) | ((before as usize) << 8) | 2,
                    0,
                    0,
                    0,
                ],
                &format!(
                    "{callback} returned at IRQL {after} ({}); it was called at {before} ({})",
                    level_name(after),
                    level_name(before)
                ),
            );
        }
        result
    })
}

/// The `FWPS_FILTER3` handed to a callout, with the storage its pointers refer to.
struct FilterStorage {
    filter: Box<FilterAndWeight>,
    // The filter's conditions, and the values they point into.
    _conditions: Vec<FWPS_FILTER_CONDITION0>,
    _values: ValueStorage,
}

/// An `FWPS_FILTER3` and the weight its `weight` value points to, in one allocation (the box
/// keeps the weight's address as the storage moves).
struct FilterAndWeight {
    filter: FWPS_FILTER3,
    weight: u64,
}

impl FilterStorage {
    /// The filter `record` as handed to callout `callout_id` (the id its callout key maps to,
    /// known to the caller from the call it began).
    fn new(record: &FilterRecord, sublayer_weight: u16, callout_id: u32) -> FilterStorage {
        let mut flags = 0u16;
        if record.flags & FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT != 0 {
            flags |= FWPS_FILTER_FLAG_CLEAR_ACTION_RIGHT;
        }
        if record.flags & FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED != 0 {
            flags |= FWPS_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED;
        }
        let callout_id = if record.action & FWP_ACTION_FLAG_CALLOUT != 0 {
            callout_id
        } else {
            0
        };
        let mut values = ValueStorage::new(record.conditions.iter().map(|c| &c.value));
        let mut conditions: Vec<FWPS_FILTER_CONDITION0> = record
            .conditions
            .iter()
            .map(|condition| {
                let (tag, u) = values.raw_condition(&condition.value);
                FWPS_FILTER_CONDITION0 {
                    fieldId: condition.field_index as u16,
                    reserved: 0,
                    matchType: condition.match_type,
                    conditionValue: FWP_CONDITION_VALUE0 { r#type: tag, u },
                }
            })
            .collect();
        let mut filter = Box::new(FilterAndWeight {
            filter: FWPS_FILTER3 {
                filterId: record.id,
                weight: FWP_VALUE0 {
                    r#type: FWP_UINT64,
                    u: FWP_VALUE0_u {
                        uint64: core::ptr::null_mut(),
                    },
                },
                subLayerWeight: sublayer_weight,
                flags,
                numFilterConditions: conditions.len() as u32,
                filterCondition: if conditions.is_empty() {
                    core::ptr::null_mut()
                } else {
                    conditions.as_mut_ptr()
                },
                action: FWPS_ACTION0 {
                    r#type: record.action,
                    calloutId: callout_id,
                },
                context: record.raw_context,
                providerContext: core::ptr::null_mut(),
            },
            weight: record.weight,
        });
        let parts = &mut *filter;
        parts.filter.weight.u = FWP_VALUE0_u {
            uint64: &raw mut parts.weight,
        };
        FilterStorage {
            filter,
            _conditions: conditions,
            _values: values,
        }
    }

    fn filter(&mut self) -> *mut FWPS_FILTER3 {
        &raw mut self.filter.filter
    }
}

// --- classification ----------------------------------------------------------------------------

/// The outcome of classifying at one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// `FWP_ACTION_PERMIT` or `FWP_ACTION_BLOCK`.
    pub action: FWP_ACTION_TYPE,
    /// Whether the decision is hard (the write right was cleared).
    pub hard: bool,
    /// Whether a callout vetoed a hard permit.
    pub vetoed: bool,
    /// Whether the deciding callout set `FWPS_CLASSIFY_OUT_FLAG_ABSORB`.
    pub absorbed: bool,
    /// The filter that decided, if any did.
    pub filter_id: Option<u64>,
    /// The completion context, if a callout pended the classification.
    pub pended: Option<usize>,
}

/// The incoming values and metadata of one classification, owned; the raw structures handed to
/// callouts point into it.
pub(crate) struct Incoming<'a> {
    pub layer: &'static LayerInfo,
    pub values: Values<'a>,
    pub metadata: FWPS_INCOMING_METADATA_VALUES0,
    /// The process path (`FWP_BYTE_BLOB` bytes) for `metadata.processPath`, copied for the
    /// callouts when the first is called (the caller sets `FWPS_METADATA_FIELD_PROCESS_PATH`);
    /// `None` if the caller points `processPath` somewhere itself.
    pub process_path: Option<&'a [u8]>,
    pub layer_data: PVOID,
    /// Builds the packet `layer_data` points to for callouts, when the first is called (a
    /// classification that calls none hands it to nobody); `None` leaves `layer_data` as is.
    pub packet: Option<&'a dyn Fn() -> super::packet::SimPacket>,
    pub classify_context: *const core::ffi::c_void,
    pub flow_context: u64,
    /// Whether the layer lets callouts pend (a completion handle goes in the metadata).
    pub pendable: bool,
    /// Whether this is the reauthorization after a completed pend (pending is refused).
    pub reauthorization: bool,
}

/// A classification's field values, built when something needs them: a filter with conditions
/// to match, or a callout to call. Most classifications of a connection cross layers where no
/// filter has conditions and no callout is called, and nothing can observe values nobody reads.
pub(crate) struct Values<'a> {
    build: &'a dyn Fn() -> Vec<SimValue>,
    built: Option<Vec<SimValue>>,
}

impl<'a> Values<'a> {
    /// The values `build` returns, built at most once, on first use. `build` must not touch the
    /// engine: it may run with the engine locked.
    pub(crate) fn new(build: &'a dyn Fn() -> Vec<SimValue>) -> Self {
        Values { build, built: None }
    }

    fn get(&mut self) -> &[SimValue] {
        self.built.get_or_insert_with(self.build)
    }
}

struct Matched {
    record: FilterRecord,
    sublayer_weight: u16,
    callout: Option<Option<(Call, FWPS_CALLOUT_CLASSIFY_FN3)>>,
}

/// The value as something ordered, for the "sortable" types: integers, byte arrays, blobs and
/// strings (compared byte by byte, or unit by unit).
fn order_key(value: &SimValue) -> Option<OrderKey<'_>> {
    match value {
        v if v.integer().is_some() => v.integer().map(OrderKey::Integer),
        SimValue::Bytes16(bytes) => Some(OrderKey::Bytes(bytes)),
        SimValue::Blob(bytes) => Some(OrderKey::Bytes(bytes)),
        SimValue::Unicode(units) => Some(OrderKey::Units(units)),
        _ => None,
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum OrderKey<'a> {
    Integer(u64),
    Bytes(&'a [u8]),
    Units(&'a [u16]),
}

/// Compares two sortable values of the same type.
fn compare(value: &SimValue, condition: &SimValue) -> Option<core::cmp::Ordering> {
    match (order_key(value)?, order_key(condition)?) {
        (a @ OrderKey::Integer(_), b @ OrderKey::Integer(_))
        | (a @ OrderKey::Bytes(_), b @ OrderKey::Bytes(_))
        | (a @ OrderKey::Units(_), b @ OrderKey::Units(_)) => Some(a.cmp(&b)),
        _ => None,
    }
}

fn condition_holds(condition: &Condition, value: &SimValue) -> bool {
    use core::cmp::Ordering::{Equal, Greater, Less};
    let c = &condition.value;
    match condition.match_type {
        FWP_MATCH_EQUAL => equal(c, value),
        FWP_MATCH_NOT_EQUAL => !matches!(value, SimValue::Empty) && !equal(c, value),
        FWP_MATCH_EQUAL_CASE_INSENSITIVE => match (c, value) {
            (SimValue::Unicode(a), SimValue::Unicode(b)) => {
                let lower = |u: u16| {
                    if (0x41..=0x5A).contains(&u) {
                        u + 0x20
                    } else {
                        u
                    }
                };
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| lower(*x) == lower(*y))
            }
            _ => false,
        },
        FWP_MATCH_RANGE => match c {
            SimValue::Range(low, high) => {
                matches!(compare(value, low), Some(Greater | Equal))
                    && matches!(compare(value, high), Some(Less | Equal))
            }
            _ => false,
        },
        FWP_MATCH_GREATER => compare(value, c) == Some(Greater),
        FWP_MATCH_LESS => compare(value, c) == Some(Less),
        FWP_MATCH_GREATER_OR_EQUAL => matches!(compare(value, c), Some(Greater | Equal)),
        FWP_MATCH_LESS_OR_EQUAL => matches!(compare(value, c), Some(Less | Equal)),
        op => match (value.integer(), c.integer()) {
            (Some(v), Some(c)) => match op {
                FWP_MATCH_FLAGS_ALL_SET => v & c == c,
                FWP_MATCH_FLAGS_ANY_SET => v & c != 0,
                FWP_MATCH_FLAGS_NONE_SET => v & c == 0,
                _ => false,
            },
            _ => false,
        },
    }
}

fn equal(condition: &SimValue, value: &SimValue) -> bool {
    match (condition, value) {
        (SimValue::V4Mask { addr, mask }, SimValue::U32(v)) => v & mask == addr & mask,
        (SimValue::V6Mask { addr, prefix }, SimValue::Bytes16(v)) => {
            let bits = u32::from(*prefix);
            let a = u128::from_be_bytes(*addr);
            let b = u128::from_be_bytes(*v);
            bits == 0 || (a ^ b) >> (128 - bits) == 0
        }
        (c, v) => c == v,
    }
}

/// Whether a filter's conditions hold: consecutive conditions on the same field are OR'ed,
/// groups of different fields are AND'ed.
fn filter_matches(record: &FilterRecord, values: &[SimValue]) -> bool {
    let mut index = 0;
    while index < record.conditions.len() {
        let field = record.conditions[index].field_index;
        let group_end = record.conditions[index..]
            .iter()
            .position(|c| c.field_index != field)
            .map_or(record.conditions.len(), |n| index + n);
        let value = values.get(field as usize).unwrap_or(&SimValue::Empty);
        if !record.conditions[index..group_end]
            .iter()
            .any(|c| condition_holds(c, value))
        {
            return false;
        }
        index = group_end;
    }
    true
}

/// The raw forms of values as the engine hands them to callouts (the `FWPS_INCOMING_VALUE0`
/// array of a classification, the `FWP_CONDITION_VALUE0`s of a filter), with the data their
/// pointers refer to. Built anew for each classification and each filter handed to a callout,
/// so a callout always sees fresh copies, and freed when that call returns.
///
/// The data lives in a few pools, each usually a single allocation (a box or vector per value
/// was most of the engine's cost per classification): `words` holds everything pointed to
/// that holds no pointer itself (64-bit integers, byte arrays, blob bytes, SIDs, strings,
/// address masks), each value from an 8-byte boundary so a `UINT64` or a SID is aligned for
/// its type, zero-padded; `blobs` holds the `FWP_BYTE_BLOB` headers that point into
/// `words`. Pointers into a pool are taken only once it is complete, so no push can move what
/// they point to.
struct ValueStorage {
    values: Vec<FWPS_INCOMING_VALUE0>,
    words: Vec<u64>,
    blobs: Vec<FWP_BYTE_BLOB>,
    /// Ranges (condition values only, rare): boxed, as each is pointed to while more are added.
    #[expect(
        clippy::vec_box,
        reason = "each box gives its range an address that pushing cannot move"
    )]
    ranges: Vec<Box<FWP_RANGE0>>,
    /// Where the next value's data and blob header are, as [`raw`](Self::raw) hands them out
    /// in the order the storage was built in.
    next_word: usize,
    next_blob: usize,
}

/// Whether `value` keeps anything beside its tag and union (most values do not: the loops over
/// a classification's values skip them at this test).
#[inline(always)]
fn carries_data(value: &SimValue) -> bool {
    !matches!(
        value,
        SimValue::Empty | SimValue::U8(_) | SimValue::U16(_) | SimValue::U32(_)
    )
}

/// What `value` keeps beside its tag and union: words of data, blob headers.
fn footprint(value: &SimValue) -> (usize, usize) {
    let words = |bytes: usize| bytes.div_ceil(8);
    match value {
        SimValue::Empty | SimValue::U8(_) | SimValue::U16(_) | SimValue::U32(_) => (0, 0),
        SimValue::U64(_) | SimValue::V4Mask { .. } => (1, 0),
        SimValue::Bytes16(_) => (2, 0),
        SimValue::V6Mask { .. } => (words(size_of::<FWP_V6_ADDR_AND_MASK>()), 0),
        SimValue::Blob(bytes)
        | SimValue::SecurityDescriptor(bytes)
        | SimValue::TokenAccess(bytes) => (words(bytes.len()), 1),
        SimValue::Sid(bytes) => (words(bytes.len()), 0),
        // NUL-terminated.
        SimValue::Unicode(units) => (words(2 * (units.len() + 1)), 0),
        SimValue::Range(low, high) => range_footprint(low, high),
    }
}

// The ranges' recursion lives out of line, so the per-value functions inline into the loops
// over a classification's values.
#[inline(never)]
fn range_footprint(low: &SimValue, high: &SimValue) -> (usize, usize) {
    let (low_words, low_blobs) = footprint(low);
    let (high_words, high_blobs) = footprint(high);
    (low_words + high_words, low_blobs + high_blobs)
}

/// Appends `bytes` to `words`, zero-padded to a whole word.
fn push_bytes(words: &mut Vec<u64>, bytes: &[u8]) {
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        words.push(u64::from_ne_bytes(word));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        words.push(u64::from_ne_bytes(word));
    }
}

/// Appends the data `value` points to (its [`footprint`]'s words) to `words`.
fn push_data(words: &mut Vec<u64>, value: &SimValue) {
    #[cfg(debug_assertions)]
    let start = words.len();
    match value {
        SimValue::Empty | SimValue::U8(_) | SimValue::U16(_) | SimValue::U32(_) => {}
        SimValue::U64(v) => words.push(*v),
        SimValue::Bytes16(bytes) => push_bytes(words, bytes),
        // `FWP_V4_ADDR_AND_MASK`: `addr` at offset 0, `mask` at 4.
        SimValue::V4Mask { addr, mask } => {
            let mut word = [0u8; 8];
            word[..4].copy_from_slice(&addr.to_ne_bytes());
            word[4..].copy_from_slice(&mask.to_ne_bytes());
            words.push(u64::from_ne_bytes(word));
        }
        // `FWP_V6_ADDR_AND_MASK`: `addr` at offset 0, `prefixLength` at 16.
        SimValue::V6Mask { addr, prefix } => {
            push_bytes(words, addr);
            push_bytes(words, &[*prefix]);
        }
        SimValue::Blob(bytes)
        | SimValue::SecurityDescriptor(bytes)
        | SimValue::TokenAccess(bytes)
        | SimValue::Sid(bytes) => push_bytes(words, bytes),
        SimValue::Unicode(units) => {
            let mut word = [0u8; 8];
            let mut filled = 0;
            for unit in units.iter().copied().chain([0]) {
                word[filled..filled + 2].copy_from_slice(&unit.to_ne_bytes());
                filled += 2;
                if filled == word.len() {
                    words.push(u64::from_ne_bytes(word));
                    word = [0u8; 8];
                    filled = 0;
                }
            }
            if filled > 0 {
                words.push(u64::from_ne_bytes(word));
            }
        }
        SimValue::Range(low, high) => push_range_data(words, low, high),
    }
    #[cfg(debug_assertions)]
    debug_assert_eq!(words.len() - start, footprint(value).0, "{value:?}");
}

#[inline(never)]
fn push_range_data(words: &mut Vec<u64>, low: &SimValue, high: &SimValue) {
    push_data(words, low);
    push_data(words, high);
}

/// Appends the blob headers `value` needs to `blobs`, pointing into the complete data pool at
/// `base` from word `*at` on; advances `*at` past the value's data.
fn push_blob_headers(
    blobs: &mut Vec<FWP_BYTE_BLOB>,
    base: *mut u64,
    at: &mut usize,
    value: &SimValue,
) {
    match value {
        SimValue::Blob(bytes)
        | SimValue::SecurityDescriptor(bytes)
        | SimValue::TokenAccess(bytes) => {
            blobs.push(FWP_BYTE_BLOB {
                size: bytes.len() as u32,
                data: base.wrapping_add(*at).cast::<u8>(),
            });
        }
        SimValue::Range(low, high) => return push_range_blob_headers(blobs, base, at, low, high),
        _ => {}
    }
    *at += footprint(value).0;
}

#[inline(never)]
fn push_range_blob_headers(
    blobs: &mut Vec<FWP_BYTE_BLOB>,
    base: *mut u64,
    at: &mut usize,
    low: &SimValue,
    high: &SimValue,
) {
    push_blob_headers(blobs, base, at, low);
    push_blob_headers(blobs, base, at, high);
}

impl ValueStorage {
    /// Storage for `values`, in this order: their data, then the blob headers pointing into
    /// it. Take each value's raw form with [`raw`](Self::raw) or
    /// [`raw_condition`](Self::raw_condition), in the same order.
    fn new<'v>(values: impl Iterator<Item = &'v SimValue> + Clone) -> ValueStorage {
        // A word per value is usually room enough (most values carry no data, an app id about a
        // dozen words); growing is harmless while nothing points into the pool yet.
        let (_, size_hint) = values.size_hint();
        let mut words = Vec::with_capacity(size_hint.unwrap_or(0));
        let (mut words_len, mut blobs_len) = (0, 0);
        for value in values.clone().filter(|v| carries_data(v)) {
            let (value_words, value_blobs) = footprint(value);
            words_len += value_words;
            blobs_len += value_blobs;
            push_data(&mut words, value);
        }
        // The footprints' total, whatever `push_data` did (it matches them, checked in debug
        // builds): every offset `take` derives from the footprints then falls inside `words`.
        words.resize(words_len, 0);
        // `words` is complete: from here on it is only pointed into.
        let base = words.as_mut_ptr();
        let mut blobs = Vec::with_capacity(blobs_len);
        let mut at = 0;
        if blobs_len > 0 {
            for value in values.filter(|v| carries_data(v)) {
                push_blob_headers(&mut blobs, base, &mut at, value);
            }
        }
        ValueStorage {
            values: Vec::new(),
            words,
            blobs,
            ranges: Vec::new(),
            next_word: 0,
            next_blob: 0,
        }
    }

    /// `values` as a classification's `FWPS_INCOMING_VALUE0` array (in `values`).
    fn incoming(values: &[SimValue]) -> ValueStorage {
        let mut storage = ValueStorage::new(values.iter());
        let mut raw = Vec::with_capacity(values.len());
        for value in values {
            let (tag, u) = storage.raw(value);
            raw.push(FWPS_INCOMING_VALUE0 {
                value: FWP_VALUE0 { r#type: tag, u },
            });
        }
        storage.values = raw;
        storage
    }

    /// The next value's data and blob header: where its [`footprint`] is in the pools.
    #[inline]
    fn take(&mut self, value: &SimValue) -> (*mut u64, *mut FWP_BYTE_BLOB) {
        let (words, blobs) = footprint(value);
        // `as_mut_ptr` keeps pointers taken before valid; the offsets stay inside the pools (or
        // one past their end, for a value with no data, never read through).
        let data = self.words.as_mut_ptr().wrapping_add(self.next_word);
        let blob = self.blobs.as_mut_ptr().wrapping_add(self.next_blob);
        self.next_word += words;
        self.next_blob += blobs;
        (data, blob)
    }

    /// A condition value as the engine hands it to callouts in `FWPS_FILTER3::filterCondition`.
    fn raw_condition(&mut self, value: &SimValue) -> (FWP_DATA_TYPE, FWP_CONDITION_VALUE0_u) {
        let u = match value {
            SimValue::V4Mask { .. } => {
                let v4AddrMask = self.take(value).0.cast::<FWP_V4_ADDR_AND_MASK>();
                return (FWP_V4_ADDR_MASK, FWP_CONDITION_VALUE0_u { v4AddrMask });
            }
            SimValue::V6Mask { .. } => {
                let v6AddrMask = self.take(value).0.cast::<FWP_V6_ADDR_AND_MASK>();
                return (FWP_V6_ADDR_MASK, FWP_CONDITION_VALUE0_u { v6AddrMask });
            }
            SimValue::Range(low, high) => {
                let (low_tag, low) = self.raw(low);
                let (high_tag, high) = self.raw(high);
                let mut boxed = Box::new(FWP_RANGE0 {
                    valueLow: FWP_VALUE0 {
                        r#type: low_tag,
                        u: low,
                    },
                    valueHigh: FWP_VALUE0 {
                        r#type: high_tag,
                        u: high,
                    },
                });
                let rangeValue = &mut *boxed as *mut FWP_RANGE0;
                self.ranges.push(boxed);
                return (FWP_RANGE_TYPE, FWP_CONDITION_VALUE0_u { rangeValue });
            }
            other => other,
        };
        let (tag, raw) = self.raw(u);
        const _: () = assert!(size_of::<FWP_VALUE0_u>() == size_of::<FWP_CONDITION_VALUE0_u>());
        // Every arm of `FWP_VALUE0_u` is an arm of `FWP_CONDITION_VALUE0_u` with the same type
        // at offset 0, and the two unions have one size, so the active arm's bits carry over
        // unchanged and `tag` still names it.
        // SAFETY: as above; a union may hold any bytes, uninitialised ones outside its active
        // arm included.
        let u = unsafe { core::mem::transmute::<FWP_VALUE0_u, FWP_CONDITION_VALUE0_u>(raw) };
        (tag, u)
    }

    /// The next value as an `FWP_VALUE0`'s tag and union, pointing into the pools.
    #[inline]
    fn raw(&mut self, value: &SimValue) -> (FWP_DATA_TYPE, FWP_VALUE0_u) {
        match value {
            SimValue::Empty => (
                FWP_EMPTY,
                FWP_VALUE0_u {
                    uint64: core::ptr::null_mut(),
                },
            ),
            SimValue::U8(v) => (FWP_UINT8, FWP_VALUE0_u { uint8: *v }),
            SimValue::U16(v) => (FWP_UINT16, FWP_VALUE0_u { uint16: *v }),
            SimValue::U32(v) => (FWP_UINT32, FWP_VALUE0_u { uint32: *v }),
            _ => self.raw_with_data(value),
        }
    }

    /// [`raw`](Self::raw) for a value that [carries data](carries_data).
    fn raw_with_data(&mut self, value: &SimValue) -> (FWP_DATA_TYPE, FWP_VALUE0_u) {
        let (data, blob) = self.take(value);
        match value {
            SimValue::Empty | SimValue::U8(_) | SimValue::U16(_) | SimValue::U32(_) => {
                unreachable!("raw handles the values without data")
            }
            SimValue::U64(_) => (FWP_UINT64, FWP_VALUE0_u { uint64: data }),
            SimValue::Bytes16(_) => (
                FWP_BYTE_ARRAY16_TYPE,
                FWP_VALUE0_u {
                    byteArray16: data.cast::<FWP_BYTE_ARRAY16>(),
                },
            ),
            SimValue::Blob(_) => (FWP_BYTE_BLOB_TYPE, FWP_VALUE0_u { byteBlob: blob }),
            SimValue::SecurityDescriptor(_) => {
                (FWP_SECURITY_DESCRIPTOR_TYPE, FWP_VALUE0_u { sd: blob })
            }
            SimValue::TokenAccess(_) => (
                FWP_TOKEN_ACCESS_INFORMATION_TYPE,
                FWP_VALUE0_u {
                    tokenAccessInformation: blob,
                },
            ),
            SimValue::Sid(_) => (
                FWP_SID,
                FWP_VALUE0_u {
                    sid: data.cast::<SID>(),
                },
            ),
            SimValue::Unicode(_) => (
                FWP_UNICODE_STRING_TYPE,
                FWP_VALUE0_u {
                    unicodeString: data.cast::<u16>(),
                },
            ),
            SimValue::V4Mask { .. } | SimValue::V6Mask { .. } | SimValue::Range(..) => {
                unreachable!("condition-only value types are never incoming values")
            }
        }
    }
}

/// An opaque value the simulated engine hands out (a classify context, a completion handle, a
/// classify handle): its kind in the top 16 bits and a serial below them, so values of different
/// kinds never collide, however many the machine issues.
fn opaque_value(kind: u16, serial: usize) -> usize {
    const SERIAL_BITS: u32 = 48;
    (usize::from(kind) << SERIAL_BITS) | (serial & ((1 << SERIAL_BITS) - 1))
}

/// Classifies `incoming` at its layer on this thread, at the thread's current IRQL, calling the
/// matching callouts through their registered `classifyFn` and arbitrating as WFP does.
pub(crate) fn classify(incoming: &mut Incoming<'_>) -> Verdict {
    // Where a deterministic machine may run another context before this classification.
    current().yield_point("classify");
    let layer = incoming.layer;
    let flow = enter_flow(&incoming.metadata);
    // Collect the matching filters from the committed objects, in evaluation order, and count a
    // call into each registered callout among them.
    let mut matched: Vec<Matched> = with_bfe(|bfe| {
        let objects = bfe.committed();
        let phase = bfe.phase;
        let mut list: Vec<(u16, GUID, FilterRecord)> = objects
            .filters
            .values()
            .filter(|f| {
                f.layer_id == layer.id
                    && enforced(f, phase)
                    && (f.conditions.is_empty() || filter_matches(f, incoming.values.get()))
            })
            .map(|f| {
                let sublayer_weight = if f.sublayer == ZERO {
                    UNIVERSAL_SUBLAYER_WEIGHT
                } else {
                    objects.sublayers.get(&f.sublayer).map_or(0, |s| s.data)
                };
                (sublayer_weight, f.sublayer, f.clone())
            })
            .collect();
        list.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| guid_order(&a.1).cmp(&guid_order(&b.1)))
                .then_with(|| b.2.weight.cmp(&a.2.weight))
                .then_with(|| a.2.id.cmp(&b.2.id))
        });
        list.into_iter()
            .map(|(sublayer_weight, _, record)| {
                let callout = if record.action & FWP_ACTION_FLAG_CALLOUT != 0 {
                    let id = bfe
                        .callout_ids
                        .get(&record.callout_key)
                        .copied()
                        .unwrap_or(0);
                    Some(begin_call(bfe, id).map(|(call, rt)| (call, rt.classify)))
                } else {
                    None
                };
                Matched {
                    record,
                    sublayer_weight,
                    callout,
                }
            })
            .collect()
    });

    // Registered when the first callout is called: only callouts see them.
    let mut handles: Option<Handles> = None;
    // The raw values every callout of this classification gets, built for the first one called
    // (a classification that calls none has nobody to hand them to).
    let mut raw_values: Option<(ValueStorage, FWPS_INCOMING_VALUES0)> = None;
    // The packet every callout of this classification gets, likewise built for the first one;
    // freed when the classification returns (a callout that keeps it must clone it).
    let mut packet: Option<super::packet::SimPacket> = None;

    let mut current = Verdict {
        pended: None,
        action: FWP_ACTION_NONE,
        hard: false,
        vetoed: false,
        absorbed: false,
        filter_id: None,
    };
    let mut index = 0;
    while index < matched.len() {
        let sublayer = matched[index].record.sublayer;
        let end = matched[index..]
            .iter()
            .position(|m| m.record.sublayer != sublayer)
            .map_or(matched.len(), |n| index + n);
        // Within a sublayer: the first filter that permits or blocks decides.
        let mut decision: Option<(FWP_ACTION_TYPE, bool, bool, bool, u64)> = None;
        for entry in &mut matched[index..end] {
            let record = &entry.record;
            let soft_permit_rights = record.flags & FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT == 0;
            match (record.action, entry.callout.as_mut()) {
                (FWP_ACTION_PERMIT, _) => {
                    decision = Some((
                        FWP_ACTION_PERMIT,
                        !soft_permit_rights,
                        false,
                        false,
                        record.id,
                    ));
                }
                (FWP_ACTION_BLOCK, _) => {
                    decision = Some((FWP_ACTION_BLOCK, true, false, false, record.id))
                }
                (action, Some(registered)) => match registered.take() {
                    None => {
                        // An unregistered callout: terminating and unknown filters block (or
                        // permit, when the filter asks to); inspection filters are skipped.
                        // Documented in the remarks of FwpsCalloutUnregisterById0 ("treated as
                        // FWP_ACTION_BLOCK"; https://learn.microsoft.com/windows-hardware/drivers/ddi/fwpsk/nf-fwpsk-fwpscalloutunregisterbyid0)
                        // and by FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED (FWPM_FILTER0).
                        // INFERRED: a callout no driver has registered since the boot (its
                        // persistent filter back when BFE starts) is treated the same way.
                        if action == FWP_ACTION_CALLOUT_INSPECTION {
                            continue;
                        }
                        decision = if record.flags & FWPM_FILTER_FLAG_PERMIT_IF_CALLOUT_UNREGISTERED
                            != 0
                        {
                            Some((
                                FWP_ACTION_PERMIT,
                                !soft_permit_rights,
                                false,
                                false,
                                record.id,
                            ))
                        } else {
                            Some((FWP_ACTION_BLOCK, true, false, false, record.id))
                        };
                    }
                    Some((call, classify_fn)) => {
                        handles.get_or_insert_with(|| Handles::hand_out(incoming));
                        if packet.is_none()
                            && let Some(build) = incoming.packet
                        {
                            let built = packet.insert(build());
                            incoming.layer_data = built.layer_data();
                            built.describe(&mut incoming.metadata);
                        }
                        let (_, fixed) = raw_values.get_or_insert_with(|| {
                            let mut storage = ValueStorage::incoming(incoming.values.get());
                            let fixed = FWPS_INCOMING_VALUES0 {
                                layerId: layer.id,
                                valueCount: storage.values.len() as u32,
                                incomingValue: storage.values.as_mut_ptr(),
                            };
                            (storage, fixed)
                        });
                        let outcome = call_classify(
                            incoming,
                            fixed,
                            record,
                            entry.sublayer_weight,
                            &current,
                            call,
                            classify_fn,
                        );
                        if action == FWP_ACTION_CALLOUT_INSPECTION {
                            continue;
                        }
                        let (returned, rights, absorbed) = outcome;
                        if current.hard {
                            // Without the write right only a veto counts.
                            if current.action == FWP_ACTION_PERMIT && returned == FWP_ACTION_BLOCK {
                                decision =
                                    Some((FWP_ACTION_BLOCK, true, true, absorbed, record.id));
                            } else {
                                continue;
                            }
                        } else {
                            let returned = match (action, returned) {
                                (_, FWP_ACTION_PERMIT | FWP_ACTION_BLOCK) => returned,
                                // Anything else from a terminating callout counts as a block.
                                (FWP_ACTION_CALLOUT_TERMINATING, _) => FWP_ACTION_BLOCK,
                                _ => continue,
                            };
                            decision = Some((
                                returned,
                                rights & FWPS_RIGHT_ACTION_WRITE == 0,
                                false,
                                absorbed,
                                record.id,
                            ));
                        }
                    }
                },
                _ => continue,
            }
            break;
        }
        // Calls not made (filters after the deciding one) are released here.
        for entry in &mut matched[index..end] {
            if let Some(registered) = entry.callout.as_mut() {
                drop(registered.take());
            }
        }
        if let Some((action, hard, vetoed, absorbed, filter_id)) = decision
            && (!current.hard || vetoed)
        {
            {
                current = Verdict {
                    pended: None,
                    action,
                    hard,
                    vetoed: vetoed || current.vetoed,
                    absorbed,
                    filter_id: Some(filter_id),
                };
            }
        }
        index = end;
    }
    if current.action == FWP_ACTION_NONE {
        // INFERRED: no filter decided, so the traffic is permitted.
        current.action = FWP_ACTION_PERMIT;
    }
    if let Some(handles) = handles {
        current.pended = handles.take_back();
    }
    if packet.take().is_some() {
        incoming.layer_data = core::ptr::null_mut();
    }
    leave_flow(flow);
    current
}

/// What a classification hands its callouts beside its values: the classify context (for
/// `FwpsAcquireClassifyHandle0`) and, where the layer lets callouts pend, the completion handle
/// (for `FwpsPendOperation0`). Both are valid only during the classification. They are
/// registered when the first callout is about to be called: a classification that calls none
/// hands them to nobody, so registering them would only cost.
struct Handles {
    classification: usize,
    completion_handle: Option<usize>,
    /// The stack's copy of the process path, which `processPath` points to.
    _process_path: Option<Box<ProcessPath>>,
}

/// A process path and the blob describing it (boxed, so the blob's address is stable).
struct ProcessPath {
    bytes: Vec<u8>,
    blob: FWP_BYTE_BLOB,
}

impl Handles {
    /// Registers the handles and puts them in `incoming`, with the copy of the process path.
    fn hand_out(incoming: &mut Incoming<'_>) -> Handles {
        let (classification, completion_handle) = with_bfe(|bfe| {
            bfe.next_pend += 1;
            let classification = opaque_value(0xC1A0, bfe.next_pend);
            bfe.live_classifications.insert(
                classification,
                LiveClassification {
                    pendable: pendable_by_classify_handle(incoming.layer)
                        && !incoming.reauthorization,
                    pended: None,
                    request: layer_request(incoming.layer, incoming.layer_data),
                    writable: None,
                    versions: Vec::new(),
                    redirect_records: (incoming.metadata.currentMetadataValues
                        & FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE
                        != 0)
                        .then_some(incoming.metadata.redirectRecords as usize),
                    changes: Vec::new(),
                    changes_at_pend: 0,
                    reauthorize_if_modified_by_others: None,
                },
            );
            let completion_handle = incoming.pendable.then(|| {
                bfe.next_pend += 1;
                let handle = opaque_value(0xC0A1, bfe.next_pend);
                bfe.completion_handles.insert(
                    handle,
                    CompletionHandle {
                        reauthorization: incoming.reauthorization,
                        pended: None,
                    },
                );
                handle
            });
            (classification, completion_handle)
        });
        incoming.classify_context = classification as *const core::ffi::c_void;
        if let Some(handle) = completion_handle {
            incoming.metadata.currentMetadataValues |= FWPS_METADATA_FIELD_COMPLETION_HANDLE;
            incoming.metadata.completionHandle = handle as HANDLE;
        }
        let process_path = incoming.process_path.map(|path| {
            let mut copy = Box::new(ProcessPath {
                bytes: path.to_vec(),
                blob: FWP_BYTE_BLOB {
                    size: path.len() as u32,
                    data: core::ptr::null_mut(),
                },
            });
            copy.blob.data = copy.bytes.as_mut_ptr();
            incoming.metadata.processPath = &mut copy.blob;
            copy
        });
        Handles {
            classification,
            completion_handle,
            _process_path: process_path,
        }
    }

    /// The classification returned: the handles are retired, so a callout that kept one and
    /// uses it later stops the machine. Returns the pend, if a callout pended the
    /// classification (by completion handle, or by classify handle).
    ///
    /// A writable copy of the layer data acquired and never applied stops the machine:
    /// WFP_INVALID_OPERATION, parameter 1 = [`WRITABLE_DATA_NOT_APPLIED`], parameter 2 the
    /// classify handle. (INFERRED: the documentation says only that the classification may not
    /// complete correctly without the apply.) Not while the classification is pended at
    /// ALE_CONNECT_REDIRECT: the copy may be applied until the pend is completed, and
    /// completing with it outstanding stops instead ([`COMPLETED_WITH_WRITABLE_DATA`]).
    fn take_back(self) -> Option<usize> {
        let (pended, not_applied) = with_bfe(|bfe| {
            let by_completion_handle = self.completion_handle.and_then(|handle| {
                bfe.retired_completion_handles.retire(handle);
                bfe.completion_handles.remove(&handle)?.pended
            });
            bfe.retired_classify_contexts.retire(self.classification);
            let live = bfe.live_classifications.remove(&self.classification);
            let by_classify_handle = live.as_ref().and_then(|c| c.pended);
            let still_pended = by_classify_handle
                .is_some_and(|handle| bfe.pends.get(&handle).is_some_and(|p| !p.completed));
            let mut not_applied = None;
            if let Some(live) = live {
                if still_pended && matches!(live.request, Some(LayerRequest::Connect(_))) {
                    // Pended at ALE_CONNECT_REDIRECT: the stack holds the connection and its
                    // connect request, which the callout may still acquire, change and apply
                    // from another context (a worker may hold the copy right now) before it
                    // completes the pend ("Using Bind or Connect Redirection", asynchronous
                    // redirection).
                    bfe.pended_redirects.insert(self.classification, live);
                } else {
                    not_applied = live.writable.as_ref().map(|w| w.handle);
                    bfe.retain_versions(live);
                }
            }
            (by_completion_handle.or(by_classify_handle), not_applied)
        });
        if let Some(handle) = not_applied {
            stop(
                BugCheckCode::WFP_INVALID_OPERATION,
                [WRITABLE_DATA_NOT_APPLIED, handle, 0, 0],
                "classifyFn returned with writable layer data acquired and never applied (FwpsApplyModifiedLayerData0 is required once per acquire)",
            );
        }
        pended
    }
}

/// The layers whose classifications are pended with a classify handle (`FwpsPendClassify0`)
/// rather than a completion handle. INFERRED from fwpsk.h and the redirect documentation:
/// ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT and ALE_ENDPOINT_CLOSURE; elsewhere the simulator
/// refuses with `STATUS_FWP_CANNOT_PEND`.
fn pendable_by_classify_handle(layer: &LayerInfo) -> bool {
    use wfp_rs::layer::{
        AleBindRedirectV4, AleBindRedirectV6, AleConnectRedirectV4, AleConnectRedirectV6,
        AleEndpointClosureV4, AleEndpointClosureV6, Layer,
    };
    [
        AleConnectRedirectV4::ID,
        AleConnectRedirectV6::ID,
        AleBindRedirectV4::ID,
        AleBindRedirectV6::ID,
        AleEndpointClosureV4::ID,
        AleEndpointClosureV6::ID,
    ]
    .contains(&layer.id)
}

/// `layerData` as a request callouts may rewrite: an `FWPS_CONNECT_REQUEST0` at
/// ALE_CONNECT_REDIRECT_V4/V6, an `FWPS_BIND_REQUEST0` at ALE_BIND_REDIRECT_V4/V6.
fn layer_request(layer: &LayerInfo, layer_data: *mut core::ffi::c_void) -> Option<LayerRequest> {
    use wfp_rs::layer::{
        AleBindRedirectV4, AleBindRedirectV6, AleConnectRedirectV4, AleConnectRedirectV6, Layer,
    };
    let address = (!layer_data.is_null()).then_some(layer_data as usize)?;
    if layer.id == AleConnectRedirectV4::ID || layer.id == AleConnectRedirectV6::ID {
        Some(LayerRequest::Connect(address))
    } else if layer.id == AleBindRedirectV4::ID || layer.id == AleBindRedirectV6::ID {
        Some(LayerRequest::Bind(address))
    } else {
        None
    }
}

/// Orders sublayers of equal weight deterministically.
fn guid_order(guid: &GUID) -> (u32, u16, u16, [u8; 8]) {
    (guid.Data1, guid.Data2, guid.Data3, guid.Data4)
}

/// Calls one callout's `classifyFn`; returns (action, rights, absorbed) as it left them.
fn call_classify(
    incoming: &mut Incoming<'_>,
    fixed: &FWPS_INCOMING_VALUES0,
    record: &FilterRecord,
    sublayer_weight: u16,
    current: &Verdict,
    call: Call,
    classify_fn: FWPS_CALLOUT_CLASSIFY_FN3,
) -> (FWP_ACTION_TYPE, u32, bool) {
    let flow_context = incoming_flow_context(incoming, call.id);
    let mut storage = FilterStorage::new(record, sublayer_weight, call.id);
    let mut out = FWPS_CLASSIFY_OUT0 {
        // INFERRED: the decision so far, or CONTINUE if there is none.
        actionType: if current.action == FWP_ACTION_NONE {
            FWP_ACTION_CONTINUE
        } else {
            current.action
        },
        outContext: 0,
        filterId: 0,
        rights: if current.hard {
            0
        } else {
            FWPS_RIGHT_ACTION_WRITE
        },
        flags: 0,
        reserved: 0,
    };
    let driver = call.driver;
    if let Some(classify_fn) = classify_fn {
        in_driver(driver, call.id, "classifyFn", || {
            // SAFETY: the callout registered this classifyFn; every pointer is valid for the call
            // (owned by this frame or by `incoming`), as the filter engine guarantees.
            unsafe {
                classify_fn(
                    fixed,
                    &incoming.metadata,
                    incoming.layer_data,
                    incoming.classify_context,
                    storage.filter(),
                    flow_context,
                    &mut out,
                )
            }
        });
    }
    drop(call);
    (
        out.actionType,
        out.rights,
        out.flags & FWPS_CLASSIFY_OUT_FLAG_ABSORB != 0,
    )
}

// --- direct calls (benchmarks) ------------------------------------------------------------------

/// A classification prepared once and handed straight to one callout's `classifyFn`, without the
/// filter matching, arbitration and pend bookkeeping of [`classify`]: what
/// `sim::DirectClassify` wraps, so that a benchmark measures the callout and not the simulated
/// engine. Holds a call into the callout for its whole life (unregistration waits for it, as
/// for a classification in progress).
pub(crate) struct Direct {
    kernel: std::sync::Arc<super::state::Kernel>,
    call: Option<Call>,
    classify_fn: unsafe extern "system" fn(
        *const FWPS_INCOMING_VALUES0,
        *const FWPS_INCOMING_METADATA_VALUES0,
        PVOID,
        *const core::ffi::c_void,
        *const FWPS_FILTER3,
        u64,
        *mut FWPS_CLASSIFY_OUT0,
    ),
    metadata: Box<FWPS_INCOMING_METADATA_VALUES0>,
    fixed: Box<FWPS_INCOMING_VALUES0>,
    // What `fixed` and `filter` point into.
    _values: ValueStorage,
    filter: FilterStorage,
}

impl Direct {
    /// Prepares `values` and `metadata` at `layer` for the callout `callout_key`, with the first
    /// committed filter at that layer that calls it (the filter a callout sees identifies it:
    /// the SDK's trampoline finds its callout by the filter's callout id). Runs in a machine
    /// context.
    pub(crate) fn prepare(
        layer: &'static LayerInfo,
        values: &[SimValue],
        metadata: FWPS_INCOMING_METADATA_VALUES0,
        callout_key: GUID,
    ) -> Result<Direct, &'static str> {
        let found = with_bfe(|bfe| {
            let record = bfe
                .committed()
                .filters
                .values()
                .filter(|f| {
                    f.layer_id == layer.id
                        && f.action & FWP_ACTION_FLAG_CALLOUT != 0
                        && f.callout_key == callout_key
                })
                .min_by_key(|f| f.id)
                .cloned()
                .ok_or("no committed filter at this layer calls the callout")?;
            let sublayer_weight = if record.sublayer == ZERO {
                UNIVERSAL_SUBLAYER_WEIGHT
            } else {
                bfe.committed()
                    .sublayers
                    .get(&record.sublayer)
                    .map_or(0, |s| s.data)
            };
            let id = *bfe
                .callout_ids
                .get(&callout_key)
                .ok_or("the callout is not registered")?;
            let (call, runtime) = begin_call(bfe, id).ok_or("the callout is not registered")?;
            let classify_fn = runtime.classify;
            Ok::<_, &'static str>((record, sublayer_weight, call, classify_fn))
        });
        let (record, sublayer_weight, call, classify_fn) = found?;
        let Some(classify_fn) = classify_fn else {
            // Released in this machine context.
            drop(call);
            return Err("the callout has no classifyFn");
        };
        let mut values_storage = ValueStorage::incoming(values);
        let filter = FilterStorage::new(&record, sublayer_weight, call.id);
        let fixed = Box::new(FWPS_INCOMING_VALUES0 {
            layerId: layer.id,
            valueCount: values_storage.values.len() as u32,
            incomingValue: values_storage.values.as_mut_ptr(),
        });
        Ok(Direct {
            kernel: current(),
            call: Some(call),
            classify_fn,
            metadata: Box::new(metadata),
            fixed,
            _values: values_storage,
            filter,
        })
    }

    /// Whether this thread runs in the machine the classification was prepared in.
    pub(crate) fn in_its_machine(&self) -> bool {
        THREAD.with(|t| {
            t.kernel
                .borrow()
                .as_ref()
                .is_some_and(|k| std::sync::Arc::ptr_eq(k, &self.kernel))
        })
    }

    /// Calls the callout's `classifyFn` once, on this thread at its IRQL, with a fresh
    /// classify-out (`CONTINUE`, the write right). Returns (action, rights, absorbed) as the
    /// callout left them.
    pub(crate) fn call(&mut self) -> (FWP_ACTION_TYPE, u32, bool) {
        let mut out = FWPS_CLASSIFY_OUT0 {
            actionType: FWP_ACTION_CONTINUE,
            outContext: 0,
            filterId: 0,
            rights: FWPS_RIGHT_ACTION_WRITE,
            flags: 0,
            reserved: 0,
        };
        let driver = self.call.as_ref().map_or(0, |call| call.driver);
        let callout = self.call.as_ref().map_or(0, |call| call.id);
        let classify_fn = self.classify_fn;
        let (fixed, metadata) = (&*self.fixed, &*self.metadata);
        let filter = self.filter.filter();
        let flow = enter_flow(metadata);
        in_driver(driver, callout, "classifyFn", || {
            // SAFETY: the callout registered this classifyFn and cannot be unregistered while
            // `self.call` is held; every pointer is owned by `self` (values, metadata, filter)
            // or by this frame (`out`), valid for the call. No completion handle or classify
            // context is given: the classification cannot be pended.
            unsafe {
                classify_fn(
                    fixed,
                    metadata,
                    core::ptr::null_mut(),
                    core::ptr::null(),
                    filter,
                    0,
                    &mut out,
                )
            }
        });
        leave_flow(flow);
        (
            out.actionType,
            out.rights,
            out.flags & FWPS_CLASSIFY_OUT_FLAG_ABSORB != 0,
        )
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // `Call` releases itself in the current machine's context: give it this one's.
        let call = self.call.take();
        super::state::with_context(&self.kernel, PASSIVE_LEVEL, 0, move || drop(call));
    }
}

// --- pending -------------------------------------------------------------------------------------

/// What `FwpsCompleteOperation0` on a context that is not pending means: on Windows the context
/// was freed by the first completion, and the second one corrupts memory. Windows documents no
/// stop code for it; the simulator stops with WFP's own, parameter 1 marking this rule.
pub(crate) const INVALID_COMPLETION: usize = 0x8000_0001;

/// Why a routine given a completion handle or classify context does not succeed.
enum Refusal {
    /// A status for the caller.
    Status(NTSTATUS),
    /// The value is not live: a stop, with this parameter 3 (1 = recently retired).
    Stale(usize),
}

/// `FwpsPendOperation0` with a completion handle that is not live: parameter 1 of the
/// simulator's WFP_INVALID_OPERATION stop. See [`FwpsPendOperation0`] for why this code.
pub(crate) const STALE_COMPLETION_HANDLE: usize = 0x8000_0004;

/// `FwpsPendOperation0`: pends the classification whose completion handle this is. Only during
/// the classification, and not during a reauthorization (`STATUS_FWP_CANNOT_PEND`).
///
/// A completion handle that is not live — its classification returned (the callout kept the
/// value), or the engine never handed it out (null, another kind of handle, garbage) — stops
/// the machine. INFERRED: Microsoft documents no check and no stop for it; the handle points
/// into the engine's state for the classification, which is gone once the classification
/// returns, so Windows would read freed memory (an access violation, or a corruption found
/// later). The simulator stops with WFP's own code, as it does for the other dead WFP handles
/// (a completed context, a released classify handle), parameter 1 = 0x80000004 naming this rule,
/// parameter 2 the handle, parameter 3 = 1 if it is one of the last 1024 the engine retired
/// (a use after the classification returned) and 0 otherwise (never handed out, or retired
/// long ago). `KMODE_EXCEPTION_NOT_HANDLED` stays the filter manager's stop for its pointers.
///
/// # Safety
///
/// `completionContext` must be writable.
pub unsafe extern "system" fn FwpsPendOperation0(
    completionHandle: HANDLE,
    completionContext: *mut HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsPendOperation0", DISPATCH_LEVEL);
    if completionContext.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    let driver = super::state::current_driver();
    let value = completionHandle as usize;
    let result = with_bfe(|bfe| {
        let Some(handle) = bfe.completion_handles.get_mut(&value) else {
            return Err(Refusal::Stale(
                bfe.retired_completion_handles.parameter(value),
            ));
        };
        if handle.reauthorization || handle.pended.is_some() {
            return Err(Refusal::Status(Status::FWP_CANNOT_PEND.raw()));
        }
        bfe.next_pend += 1;
        let context = opaque_value(0xC0A2, bfe.next_pend);
        handle.pended = Some(context);
        bfe.pends.insert(
            context,
            Pend {
                driver,
                completed: false,
                decision: None,
            },
        );
        Ok(context)
    });
    match result {
        Ok(context) => {
            // SAFETY: writable per the contract.
            unsafe { completionContext.write(context as HANDLE) };
            STATUS_SUCCESS
        }
        Err(Refusal::Status(status)) => status,
        Err(Refusal::Stale(retired)) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [STALE_COMPLETION_HANDLE, value, retired, 0],
            if retired == 1 {
                "FwpsPendOperation0 with the completion handle of a classification that already returned (kept after classifyFn?)"
            } else {
                "FwpsPendOperation0 with a completion handle the engine never handed out (or retired long ago)"
            },
        ),
    }
}

/// `FwpsCompleteOperation0`: ends a pend. At ALE_AUTH_CONNECT the network stack then
/// reauthorizes the connection; at ALE_AUTH_RECV_ACCEPT it does not (the callout reinjects).
/// Completing a context that is not pending stops the machine.
///
/// # Safety
///
/// `completionContext` must come from `FwpsPendOperation0`.
pub unsafe extern "system" fn FwpsCompleteOperation0(
    completionContext: HANDLE,
    netBufferList: PVOID,
) {
    let _kernel = super::state::KernelCode::enter();
    let _ = netBufferList;
    require_irql("FwpsCompleteOperation0", DISPATCH_LEVEL);
    let kernel = current();
    let completed = {
        let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
        let context = completionContext as usize;
        // A classify handle is another object: completing it here is the same corruption.
        let by_classify_handle = bfe.classify_handles.contains_key(&context);
        match bfe.pends.get_mut(&context) {
            Some(pend) if !pend.completed && !by_classify_handle => {
                pend.completed = true;
                true
            }
            _ => false,
        }
    };
    if !completed {
        stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INVALID_COMPLETION, completionContext as usize, 0, 0],
            "FwpsCompleteOperation0 on a completion context that is not pending (completed twice, or never pended)",
        );
    }
    kernel.wfp_pend_wait.completed();
    pend_completed(&kernel, completionContext as usize).notify_all();
    kernel.yield_point("FwpsCompleteOperation0");
}

/// The condition variable signalled when the pend `context` (a completion context or a classify
/// handle) is completed; waited on with the filter engine's lock.
fn pend_completed(kernel: &super::state::Kernel, context: usize) -> &std::sync::Condvar {
    // Heap addresses or handles: drop the low bits, mix, take a stripe.
    let mixed = ((context >> 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    &kernel.wfp_pend[(mixed >> (64 - PEND_STRIPE_BITS)) as usize]
}

/// The pend stripes are `1 << PEND_STRIPE_BITS` condition variables: enough that a thousand
/// connections waiting at once rarely share one, so a completion wakes about one thread.
pub(crate) const PEND_STRIPE_BITS: u32 = 10;

/// Waits until the pend `context` is completed (harness: the connection's `connect` call);
/// returns the final decision `FwpsCompleteClassify0` gave, if it gave one.
pub(crate) fn wait_for_completion(context: usize) -> Option<FWP_ACTION_TYPE> {
    let kernel = current();
    let waiting = |bfe: &Bfe| bfe.pends.get(&context).is_some_and(|p| !p.completed);
    let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    if waiting(&bfe) {
        drop(bfe);
        super::spin::spin_before_parking(&kernel, &kernel.wfp_pend_wait, || {
            !waiting(&kernel.wfp.lock().unwrap_or_else(|p| p.into_inner()))
        });
        bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    }
    let (mut bfe, _) = kernel.wait_while(
        &kernel.wfp,
        bfe,
        pend_completed(&kernel, context),
        None,
        "waits for a pended classification's completion",
        |bfe| waiting(bfe),
    );
    bfe.pends.remove(&context).and_then(|p| p.decision)
}

/// `FwpsReleaseClassifyHandle0` on a handle that is not acquired (released twice, or never
/// acquired): parameter 1 of the simulator's WFP_INVALID_OPERATION stop.
pub(crate) const INVALID_CLASSIFY_HANDLE: usize = 0x8000_0002;
/// `FwpsReleaseClassifyHandle0` on a handle whose pended classification is not completed.
pub(crate) const RELEASED_WHILE_PENDED: usize = 0x8000_0003;
/// `FwpsAcquireClassifyHandle0` with a classify context that is not live.
pub(crate) const STALE_CLASSIFY_CONTEXT: usize = 0x8000_0005;

/// `FwpsAcquireClassifyHandle0`: a handle for the classification `classifyContext` names,
/// which must be in progress.
///
/// A classify context that is not live — its classification returned (the callout kept the
/// pointer), or the engine never handed it out (null, garbage) — stops the machine, for the
/// reason [`FwpsPendOperation0`] gives for a completion handle (INFERRED likewise: the context
/// points into the engine's state for the classification, freed when it returns):
/// WFP_INVALID_OPERATION, parameter 1 = 0x80000005, parameter 2 the context, parameter 3 = 1
/// if it is one of the last 1024 contexts the engine retired, 0 otherwise.
///
/// # Safety
///
/// `classifyHandle` must be writable.
pub unsafe extern "system" fn FwpsAcquireClassifyHandle0(
    classifyContext: *mut core::ffi::c_void,
    reserved: u32,
    classifyHandle: *mut u64,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = reserved;
    require_irql("FwpsAcquireClassifyHandle0", DISPATCH_LEVEL);
    if classifyHandle.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    let driver = super::state::current_driver();
    let result = with_bfe(|bfe| {
        let classification = classifyContext as usize;
        if !bfe.live_classifications.contains_key(&classification) {
            return Err(bfe.retired_classify_contexts.parameter(classification));
        }
        bfe.next_pend += 1;
        let handle = opaque_value(0xC1A1, bfe.next_pend);
        bfe.classify_handles.insert(
            handle,
            ClassifyHandle {
                driver,
                classification,
            },
        );
        Ok(handle)
    });
    match result {
        Ok(handle) => {
            // SAFETY: writable per the contract.
            unsafe { classifyHandle.write(handle as u64) };
            STATUS_SUCCESS
        }
        Err(retired) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [STALE_CLASSIFY_CONTEXT, classifyContext as usize, retired, 0],
            if retired == 1 {
                "FwpsAcquireClassifyHandle0 with the classify context of a classification that already returned (kept after classifyFn?)"
            } else {
                "FwpsAcquireClassifyHandle0 with a classify context the engine never handed out (or retired long ago)"
            },
        ),
    }
}

/// `FwpsPendClassify0`: pends the classification the classify handle was acquired for. Only
/// during that classification, once, at a layer that pends by classify handle, and not during a
/// reauthorization (`STATUS_FWP_CANNOT_PEND`).
///
/// # Safety
///
/// `classifyOut` must be the classification's.
pub unsafe extern "system" fn FwpsPendClassify0(
    classifyHandle: u64,
    filterId: u64,
    flags: u32,
    classifyOut: *mut FWPS_CLASSIFY_OUT0,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (filterId, flags);
    require_irql("FwpsPendClassify0", DISPATCH_LEVEL);
    if classifyOut.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    let handle = classifyHandle as usize;
    if !with_bfe(|bfe| bfe.classify_handles.contains_key(&handle)) {
        // Never acquired, or released: on Windows a freed object.
        stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INVALID_CLASSIFY_HANDLE, handle, 0, 0],
            "FwpsPendClassify0 with a classify handle that is not acquired (released already?)",
        );
    }
    let pended = with_bfe(|bfe| {
        let Some(acquired) = bfe.classify_handles.get(&handle) else {
            return Ok(Err(Status::INVALID_PARAMETER.raw()));
        };
        let driver = acquired.driver;
        let Some(live) = bfe.live_classifications.get_mut(&acquired.classification) else {
            return Err(());
        };
        if !live.pendable || live.pended.is_some() {
            return Ok(Err(Status::FWP_CANNOT_PEND.raw()));
        }
        live.pended = Some(handle);
        live.changes_at_pend = live.changes.len();
        bfe.pends.insert(
            handle,
            Pend {
                driver,
                completed: false,
                decision: None,
            },
        );
        Ok(Ok(()))
    });
    match pended {
        Ok(result) => status(result),
        // INFERRED: the handle outlives its classification, but `classifyOut` and the
        // classification's state do not: pending after classifyFn returned writes through a
        // dead classify-out on Windows.
        Err(()) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [PEND_AFTER_CLASSIFICATION, handle, 0, 0],
            "FwpsPendClassify0 after the classification returned: pend from within classifyFn, with its classify-out",
        ),
    }
}

/// Parameter 1 of the stop for `FwpsPendClassify0` with an acquired classify handle whose
/// classification has already returned (simulator-specific, like the other `0x8000_000x`).
pub(crate) const PEND_AFTER_CLASSIFICATION: usize = 0x8000_0006;

/// `FwpsCompleteClassify0`: ends a pend by classify handle. With `classifyOut`, its action is
/// the callout's final decision; without, the stack reauthorizes. So it does, whatever the
/// classify-out, when the callout applied its connect request with
/// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` and another filter changed the request
/// while the classification was pended ([`FwpsApplyModifiedLayerData0`]). Completing a handle
/// that is not pending stops the machine, as `FwpsCompleteOperation0` does.
///
/// # Safety
///
/// `classifyOut` null or valid.
pub unsafe extern "system" fn FwpsCompleteClassify0(
    classifyHandle: u64,
    flags: u32,
    classifyOut: *const FWPS_CLASSIFY_OUT0,
) {
    let _kernel = super::state::KernelCode::enter();
    let _ = flags;
    require_irql("FwpsCompleteClassify0", DISPATCH_LEVEL);
    // SAFETY: null or valid per the contract.
    let decision = unsafe { classifyOut.as_ref() }.map(|out| out.actionType);
    let kernel = current();
    let handle = classifyHandle as usize;
    let writable_outstanding = with_bfe(|bfe| {
        let classification = bfe.classify_handles.get(&handle)?.classification;
        let pended = bfe
            .live_classifications
            .get(&classification)
            .or_else(|| bfe.pended_redirects.get(&classification))
            .filter(|live| live.pended == Some(handle))?;
        pended.writable.as_ref().map(|w| w.handle)
    });
    if writable_outstanding.is_some() {
        stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [COMPLETED_WITH_WRITABLE_DATA, handle, 0, 0],
            "FwpsCompleteClassify0 with the connect request acquired and not applied: apply it (FwpsApplyModifiedLayerData0) before completing",
        );
    }
    let completed = {
        let mut bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
        let acquired = bfe.classify_handles.contains_key(&handle);
        let mut reauthorize = false;
        if let Some(classification) = bfe.classify_handles.get(&handle).map(|h| h.classification) {
            let bfe = &mut *bfe;
            if let Some(live) = bfe
                .live_classifications
                .get(&classification)
                .filter(|live| live.pended == Some(handle))
            {
                // Completed inline, from classifyFn: the classification is still in progress.
                reauthorize = live.modified_by_others_while_pended();
            } else if bfe
                .pended_redirects
                .get(&classification)
                .is_some_and(|live| live.pended == Some(handle))
            {
                // The pend ends: the stack takes the connect request back.
                if let Some(live) = bfe.pended_redirects.remove(&classification) {
                    reauthorize = live.modified_by_others_while_pended();
                    bfe.retain_versions(live);
                }
            }
        }
        match bfe.pends.get_mut(&handle) {
            Some(pend) if acquired && !pend.completed => {
                pend.completed = true;
                // FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS with another filter's
                // change: the stack classifies the connection again, as for a completion
                // without a classify-out, instead of taking this one's action.
                pend.decision = if reauthorize { None } else { decision };
                true
            }
            _ => false,
        }
    };
    if !completed {
        stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INVALID_COMPLETION, classifyHandle as usize, 0, 0],
            "FwpsCompleteClassify0 on a classify handle that is not pending (completed twice, never pended, or released)",
        );
    }
    kernel.wfp_pend_wait.completed();
    pend_completed(&kernel, classifyHandle as usize).notify_all();
    kernel.yield_point("FwpsCompleteClassify0");
}

/// `FwpsReleaseClassifyHandle0`. Releasing a handle twice, or while its pend is not completed,
/// stops the machine (on Windows the first frees what the pended classification still uses).
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn FwpsReleaseClassifyHandle0(classifyHandle: u64) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsReleaseClassifyHandle0", DISPATCH_LEVEL);
    let handle = classifyHandle as usize;
    let problem = with_bfe(|bfe| {
        if !bfe.classify_handles.contains_key(&handle) {
            return Some(INVALID_CLASSIFY_HANDLE);
        }
        if bfe.pends.get(&handle).is_some_and(|p| !p.completed) {
            return Some(RELEASED_WHILE_PENDED);
        }
        bfe.classify_handles.remove(&handle);
        None
    });
    match problem {
        Some(INVALID_CLASSIFY_HANDLE) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INVALID_CLASSIFY_HANDLE, handle, 0, 0],
            "FwpsReleaseClassifyHandle0 on a classify handle that is not acquired (released twice?)",
        ),
        Some(parameter) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [parameter, handle, 0, 0],
            "FwpsReleaseClassifyHandle0 while its pended classification is not completed",
        ),
        None => {}
    }
}

/// Parameter 1 of the stop for `FwpsAcquireWritableLayerDataPointer0` after the classification
/// returned (simulator-specific, like the other `0x8000_000x`).
pub(crate) const WRITABLE_DATA_AFTER_CLASSIFICATION: usize = 0x8000_0007;
/// Parameter 1 of the stop for `FwpsApplyModifiedLayerData0` with data that is not the
/// outstanding writable copy of the handle's classification: never acquired, applied already,
/// or another pointer.
pub(crate) const APPLY_WITHOUT_ACQUIRE: usize = 0x8000_0008;
/// Parameter 1 of the stop for a classification that returned with a writable copy acquired
/// and not applied.
pub(crate) const WRITABLE_DATA_NOT_APPLIED: usize = 0x8000_0009;

/// What went wrong in a writable-layer-data call, found under the engine lock.
enum WritableMisuse {
    NotAcquired,
    ClassificationReturned,
    NotOutstanding,
    /// The copy names a redirect handle that is not live; with the stop's parameter 3.
    RedirectHandleNotLive(usize, usize),
    /// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` on a copy whose classification the
    /// handle did not pend.
    ReauthorizeFlagInline,
    Status(NTSTATUS),
}

/// The classification whose connect request a classify handle reaches: one in progress, or one
/// pended at ALE_CONNECT_REDIRECT whose pend is not completed yet.
fn writable_classification<'b>(
    live: &'b mut FxHashMap<usize, LiveClassification>,
    pended: &'b mut FxHashMap<usize, LiveClassification>,
    classification: usize,
) -> Option<&'b mut LiveClassification> {
    match live.get_mut(&classification) {
        Some(live) => Some(live),
        None => pended.get_mut(&classification),
    }
}

/// Whether a connect request now goes to this host: a loopback address, or the connection's
/// own local address (the two ways "Using Bind or Connect Redirection" points a connection at
/// a local proxy).
fn is_local_redirect(request: &FWPS_CONNECT_REQUEST0) -> bool {
    let remote = wfp_rs::redirect::socket_address_from_storage(&request.remoteAddressAndPort);
    let local = wfp_rs::redirect::socket_address_from_storage(&request.localAddressAndPort);
    match remote {
        Some(remote) => {
            remote.ip().is_loopback() || local.is_some_and(|local| local.ip() == remote.ip())
        }
        None => false,
    }
}

/// `FwpsAcquireWritableLayerDataPointer0`: a writable copy of the classification's connect
/// request (ALE_CONNECT_REDIRECT_V4/V6) or bind request (ALE_BIND_REDIRECT_V4/V6), for a
/// classify handle acquired for a classification in progress, or for one pended at
/// ALE_CONNECT_REDIRECT whose pend is not completed (from any context at IRQL <=
/// `DISPATCH_LEVEL`). Sets the classify-out to BLOCK and clears its write
/// right, as the documentation says.
///
/// The copy's `previousVersion` is the history: null if no filter modified the request yet,
/// otherwise the current version, whose `modifierFilterId` is the filter that made it and whose
/// own `previousVersion` goes further back. INFERRED: the documentation says the chain records
/// the modifications and ends in null, not which version each link is.
///
/// A classify handle that is not acquired stops the machine as for `FwpsPendClassify0`; so does
/// a classification that has returned (parameter 1 = [`WRITABLE_DATA_AFTER_CLASSIFICATION`]).
/// A layer without writable data, or a copy still outstanding for the classification, returns
/// `STATUS_INVALID_PARAMETER` (INFERRED: the documentation lists no specific status).
///
/// # Safety
///
/// `writableLayerData` writable; `classifyOut` null or the classification's.
pub unsafe extern "system" fn FwpsAcquireWritableLayerDataPointer0(
    classifyHandle: u64,
    filterId: u64,
    flags: u32,
    writableLayerData: *mut PVOID,
    classifyOut: *mut FWPS_CLASSIFY_OUT0,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = flags;
    require_irql("FwpsAcquireWritableLayerDataPointer0", DISPATCH_LEVEL);
    if writableLayerData.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    let handle = classifyHandle as usize;
    let acquired = with_bfe(|bfe| {
        let acquired = bfe
            .classify_handles
            .get(&handle)
            .ok_or(WritableMisuse::NotAcquired)?;
        if bfe.pends.get(&handle).is_some_and(|p| p.completed) {
            // The pend this handle made is completed: the stack has taken the connect request
            // back, even if classifyFn (which completed it inline) has not returned yet.
            return Err(WritableMisuse::ClassificationReturned);
        }
        let live = writable_classification(
            &mut bfe.live_classifications,
            &mut bfe.pended_redirects,
            acquired.classification,
        )
        .ok_or(WritableMisuse::ClassificationReturned)?;
        let request = live
            .request
            .ok_or(WritableMisuse::Status(Status::INVALID_PARAMETER.raw()))?;
        if live.writable.is_some() {
            return Err(WritableMisuse::Status(Status::INVALID_PARAMETER.raw()));
        }
        let (copy, address) = match request {
            // SAFETY: the stack's request for this classification, alive while it is live.
            LayerRequest::Connect(request) => unsafe {
                writable_copy::<FWPS_CONNECT_REQUEST0>(request, &mut live.versions)
            },
            // SAFETY: as above.
            LayerRequest::Bind(request) => unsafe {
                writable_copy::<FWPS_BIND_REQUEST0>(request, &mut live.versions)
            },
        };
        live.writable = Some(WritableCopy {
            handle,
            filter_id: filterId,
            copy,
        });
        Ok(address)
    });
    match acquired {
        Ok(address) => {
            // SAFETY: writable per the contract.
            unsafe { writableLayerData.write(address.cast()) };
            // SAFETY: null or the classification's classify-out, per the contract.
            if let Some(out) = unsafe { classifyOut.as_mut() } {
                out.actionType = FWP_ACTION_BLOCK;
                out.rights &= !FWPS_RIGHT_ACTION_WRITE;
            }
            STATUS_SUCCESS
        }
        Err(misuse) => writable_misuse("FwpsAcquireWritableLayerDataPointer0", handle, misuse),
    }
}

/// `FwpsApplyModifiedLayerData0`: hands the writable copy back. If the callout changed what may
/// be changed at the layer — at ALE_CONNECT_REDIRECT the remote address and port, the port
/// reservation token, the loopback-redirect fields; at ALE_BIND_REDIRECT the local address and
/// port and the port reservation token — the connection (or bind) continues with the copy's
/// values, and the new version records the filter (`modifierFilterId`, the filter id given at
/// the acquire) and the history; an unchanged copy records nothing (INFERRED). A changed local
/// address at ALE_CONNECT_REDIRECT is ignored (INFERRED: "Using Bind or Connect Redirection"
/// says it is only supported at ALE_BIND_REDIRECT).
///
/// `flags` = `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS`, from the callout that
/// pended the classification at ALE_CONNECT_REDIRECT (by this classify handle): if another
/// filter (a different filter id) applies a change to the connect request after the pend and
/// before the pend is completed, the completion does not decide the layer: the stack
/// classifies the connection again at ALE_CONNECT_REDIRECT with the request as it then stands
/// (reason `FWP_CONDITION_REAUTHORIZE_REASON_CLASSIFY_COMPLETION`), as for a completion without
/// a classify-out. INFERRED: the documentation says the data "should be reauthorized if another
/// callout driver modifies the data before the classification is completed"; the window is
/// counted from the pend (see `LiveClassification::modified_by_others_while_pended`). Without
/// the flag, or without another's change, the completion's classify-out decides as before. The
/// flag for a classification the handle did not pend (an inline classify, where `flags` must be
/// 0) stops the machine: WFP_INVALID_OPERATION, parameter 1 = [`REAUTHORIZE_FLAG_INLINE`]
/// (INFERRED: Microsoft says only that the results are indeterminate).
///
/// A connect request's change that sends the connection to this host (a loopback address, or
/// the connection's own local address) is dropped whole unless the copy names a redirect handle
/// (`localRedirectHandle`) and the proxy's process id (`localRedirectTargetPID`): see
/// [`is_local_redirect`]. An accepted change that names a redirect handle adds a record to the
/// connection's redirect records ([`FwpsQueryConnectionRedirectState0`]).
///
/// The classification may be in progress, or pended at ALE_CONNECT_REDIRECT and not completed
/// (asynchronous redirection: the copy is acquired and applied from another context with the
/// classify handle that pended it).
///
/// Applying data that is not the outstanding copy of the handle's classification — never
/// acquired, applied already, another pointer — stops the machine (INFERRED: on Windows the
/// engine would use freed or foreign memory): WFP_INVALID_OPERATION, parameter 1 =
/// [`APPLY_WITHOUT_ACQUIRE`], parameter 2 the classify handle. So does
/// a handle that is not acquired, or a classification that has returned.
///
/// # Safety
///
/// `modifiedLayerData` the pointer `FwpsAcquireWritableLayerDataPointer0` returned.
pub unsafe extern "system" fn FwpsApplyModifiedLayerData0(
    classifyHandle: u64,
    modifiedLayerData: PVOID,
    flags: u32,
) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsApplyModifiedLayerData0", DISPATCH_LEVEL);
    let reauthorize_if_modified =
        flags & wfp_rs::sys::FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS != 0;
    let handle = classifyHandle as usize;
    let applied = with_bfe(|bfe| {
        let acquired = bfe
            .classify_handles
            .get(&handle)
            .ok_or(WritableMisuse::NotAcquired)?;
        let live = writable_classification(
            &mut bfe.live_classifications,
            &mut bfe.pended_redirects,
            acquired.classification,
        )
        .ok_or(WritableMisuse::ClassificationReturned)?;
        let outstanding = live
            .writable
            .as_ref()
            .is_some_and(|w| w.handle == handle && w.copy.is_at(modifiedLayerData));
        let (Some(request), true) = (live.request, outstanding) else {
            return Err(WritableMisuse::NotOutstanding);
        };
        if reauthorize_if_modified && live.pended != Some(handle) {
            return Err(WritableMisuse::ReauthorizeFlagInline);
        }
        let redirect_handle = live
            .writable
            .as_ref()
            .and_then(|w| w.copy.get::<FWPS_CONNECT_REQUEST0>())
            .map_or(0, |request| request.localRedirectHandle as usize);
        if redirect_handle != 0 && !bfe.redirect_handles.contains_key(&redirect_handle) {
            return Err(WritableMisuse::RedirectHandleNotLive(
                redirect_handle,
                bfe.destroyed_redirect_handles.parameter(redirect_handle),
            ));
        }
        let Some(live) = writable_classification(
            &mut bfe.live_classifications,
            &mut bfe.pended_redirects,
            bfe.classify_handles
                .get(&handle)
                .map_or(0, |acquired| acquired.classification),
        ) else {
            return Err(WritableMisuse::ClassificationReturned);
        };
        let Some(WritableCopy {
            filter_id, copy, ..
        }) = live.writable.take()
        else {
            return Err(WritableMisuse::NotOutstanding);
        };
        match request {
            LayerRequest::Connect(request) => {
                let Some(modified) = copy.get::<FWPS_CONNECT_REQUEST0>() else {
                    return Err(WritableMisuse::NotOutstanding);
                };
                // A redirect to this host (a local proxy) is accepted only with a redirect
                // handle and the proxy's process id: documented for the process id ("must be
                // set for loopback redirect changes to be accepted"); INFERRED for the handle
                // from the FWPS_CONNECT_REQUEST0 page ("must be populated for redirection to
                // work", Windows 8 and later): the whole modification is dropped, and the
                // connection goes where it was going.
                let accepted = !is_local_redirect(modified)
                    || (redirect_handle != 0 && modified.localRedirectTargetPID != 0);
                let changed = accepted
                    // SAFETY: the stack's request for this classification, alive while it is
                    // live; the engine lock orders every access to it.
                    && unsafe { apply_copy::<FWPS_CONNECT_REQUEST0>(request, &copy, filter_id) };
                if changed {
                    live.changes.push(filter_id);
                }
                if changed
                    && redirect_handle != 0
                    && let Some(records) = live
                        .redirect_records
                        .and_then(|records| bfe.redirect_records.get_mut(&records))
                {
                    records.push(RedirectRecord {
                        handle: redirect_handle,
                        context: modified.localRedirectContext as usize,
                    });
                }
            }
            LayerRequest::Bind(request) => {
                // SAFETY: as above.
                if unsafe { apply_copy::<FWPS_BIND_REQUEST0>(request, &copy, filter_id) } {
                    live.changes.push(filter_id);
                }
            }
        }
        if reauthorize_if_modified {
            live.reauthorize_if_modified_by_others = Some(filter_id);
        }
        Ok(())
    });
    if let Err(misuse) = applied {
        writable_misuse("FwpsApplyModifiedLayerData0", handle, misuse);
    }
}

/// A writable copy of the stack's request at `request`, whose `previousVersion` is the history:
/// null if no filter modified the request yet, otherwise a snapshot of the current version
/// (kept in `versions`), whose own `previousVersion` goes further back.
///
/// # Safety
///
/// `request` is the address of a live `R`.
unsafe fn writable_copy<R: RedirectRequest>(
    request: usize,
    versions: &mut Vec<RequestVersion>,
) -> (RequestVersion, PVOID) {
    // SAFETY: a live `R`, per the contract.
    let mut current = unsafe { *(request as *const R) };
    let previous = if *current.history().1 == 0 {
        core::ptr::null_mut()
    } else {
        let (snapshot, address) = RequestVersion::new(current);
        versions.push(snapshot);
        address
    };
    let mut copy = current;
    let (previous_version, modifier) = copy.history();
    *previous_version = previous;
    *modifier = 0;
    let (copy, address) = RequestVersion::new(copy);
    (copy, address.cast())
}

/// Applies the writable `copy` to the stack's request at `request`: what changed is taken, and
/// the new version records `filter_id` and the history. Whether anything changed.
///
/// # Safety
///
/// `request` is the address of a live `R`, accessed by nobody else meanwhile.
unsafe fn apply_copy<R: RedirectRequest>(
    request: usize,
    copy: &RequestVersion,
    filter_id: u64,
) -> bool {
    // SAFETY: a live `R`, exclusively ours, per the contract.
    let current = unsafe { &mut *(request as *mut R) };
    let Some(modified) = copy.get::<R>() else {
        return false;
    };
    let mut modified = *modified;
    let changed = current.take_changes(&modified);
    if changed {
        let (previous_version, modifier) = current.history();
        *previous_version = *modified.history().0;
        *modifier = filter_id;
    }
    changed
}

fn same_socket_address(a: &SOCKADDR_STORAGE, b: &SOCKADDR_STORAGE) -> bool {
    a.ss_family == b.ss_family
        && a.__ss_pad1 == b.__ss_pad1
        && a.__ss_align == b.__ss_align
        && a.__ss_pad2 == b.__ss_pad2
}

/// Stops the machine for a misused writable-layer-data call, or returns its status.
fn writable_misuse(function: &'static str, handle: usize, misuse: WritableMisuse) -> NTSTATUS {
    match misuse {
        WritableMisuse::Status(status) => status,
        WritableMisuse::NotAcquired => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INVALID_CLASSIFY_HANDLE, handle, 0, 0],
            if function.starts_with("FwpsApply") {
                "FwpsApplyModifiedLayerData0 with a classify handle that is not acquired (released already?)"
            } else {
                "FwpsAcquireWritableLayerDataPointer0 with a classify handle that is not acquired (released already?)"
            },
        ),
        WritableMisuse::ClassificationReturned => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [WRITABLE_DATA_AFTER_CLASSIFICATION, handle, 0, 0],
            "writable layer data acquired or applied after the classification returned (and was not pended, or its pend was completed): redirect from within classifyFn, or pend it and redirect before completing",
        ),
        WritableMisuse::RedirectHandleNotLive(redirect_handle, destroyed) => {
            redirect_handle_not_live(
                "FwpsApplyModifiedLayerData0 with a localRedirectHandle",
                redirect_handle,
                destroyed,
            )
        }
        WritableMisuse::ReauthorizeFlagInline => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [REAUTHORIZE_FLAG_INLINE, handle, 0, 0],
            "FwpsApplyModifiedLayerData0 with FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS for a classification the handle did not pend: the flag is for a pended classify only (inline, flags must be 0)",
        ),
        WritableMisuse::NotOutstanding => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [APPLY_WITHOUT_ACQUIRE, handle, 0, 0],
            "FwpsApplyModifiedLayerData0 with data that is not the outstanding writable copy (never acquired, applied twice, or another pointer)",
        ),
    }
}

// --- redirect handles and redirect records -------------------------------------------------------

/// Parameter 1 of the `WFP_INVALID_OPERATION` stop for a redirect handle that is not live
/// (destroyed, or never created) given to `FwpsRedirectHandleDestroy0`,
/// `FwpsQueryConnectionRedirectState0` or, as `localRedirectHandle`, to
/// `FwpsApplyModifiedLayerData0`; parameter 2 the handle, parameter 3 = 1 if it was destroyed
/// recently. INFERRED, like the other `0x8000_00xx`: Windows would use a freed object.
pub(crate) const REDIRECT_HANDLE_NOT_LIVE: usize = 0x8000_0020;
/// Parameter 1 of the stop for `FwpsQueryConnectionRedirectState0` with redirect records that
/// are not a classification's in progress (kept after classifyFn, or never handed out).
pub(crate) const REDIRECT_RECORDS_NOT_LIVE: usize = 0x8000_0021;
/// Parameter 1 of the stop for `FwpsCompleteClassify0` while the pended classification's
/// connect request is acquired and not applied (INFERRED: the documentation orders apply before
/// complete; completing first hands the stack a request the callout still writes).
pub(crate) const COMPLETED_WITH_WRITABLE_DATA: usize = 0x8000_0022;
/// Parameter 1 of the stop for `FwpsApplyModifiedLayerData0` with
/// `FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS` for a classification the classify
/// handle did not pend (INFERRED: the documentation says the flag is for a pended classify
/// only, that with an inline classify `flags` must be 0, and that the results are otherwise
/// indeterminate; the simulator stops rather than guess).
pub(crate) const REAUTHORIZE_FLAG_INLINE: usize = 0x8000_0023;
/// Parameter 3 of the unload stop for redirect handles never destroyed; parameter 4 how many.
pub(crate) const UNLOAD_REDIRECT_HANDLES_OPEN: usize = 7;

/// `FwpsRedirectHandleCreate0`: `PASSIVE_LEVEL`; `flags` is reserved and must be zero
/// (INFERRED: `STATUS_INVALID_PARAMETER` otherwise). The handle belongs to the calling driver:
/// unloading without destroying it stops the machine ([`check_unload_redirect_handles`]).
///
/// # Safety
///
/// `providerGuid` readable, `redirectHandle` writable.
pub unsafe extern "system" fn FwpsRedirectHandleCreate0(
    providerGuid: *const GUID,
    flags: u32,
    redirectHandle: *mut HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsRedirectHandleCreate0", PASSIVE_LEVEL);
    if providerGuid.is_null() || redirectHandle.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if flags != 0 {
        return Status::INVALID_PARAMETER.raw();
    }
    let driver = current_driver();
    let handle = with_bfe(|bfe| {
        bfe.next_pend += 1;
        let handle = opaque_value(0xDE1A, bfe.next_pend);
        bfe.redirect_handles
            .insert(handle, RedirectHandleRecord { driver });
        handle
    });
    // SAFETY: writable per the contract.
    unsafe { redirectHandle.write(handle as HANDLE) };
    STATUS_SUCCESS
}

/// `FwpsRedirectHandleDestroy0`: `PASSIVE_LEVEL`. A handle that is not live (destroyed twice,
/// never created) stops the machine: WFP_INVALID_OPERATION, parameter 1 =
/// [`REDIRECT_HANDLE_NOT_LIVE`].
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn FwpsRedirectHandleDestroy0(redirectHandle: HANDLE) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsRedirectHandleDestroy0", PASSIVE_LEVEL);
    let handle = redirectHandle as usize;
    let destroyed = with_bfe(|bfe| {
        if bfe.redirect_handles.remove(&handle).is_some() {
            bfe.destroyed_redirect_handles.retire(handle);
            Ok(())
        } else {
            Err(bfe.destroyed_redirect_handles.parameter(handle))
        }
    });
    if let Err(destroyed) = destroyed {
        redirect_handle_not_live(
            "FwpsRedirectHandleDestroy0 on a redirect handle",
            handle,
            destroyed,
        );
    }
}

/// Stops the machine for a redirect handle that is not live: WFP_INVALID_OPERATION,
/// parameter 1 = [`REDIRECT_HANDLE_NOT_LIVE`], parameter 2 the handle, parameter 3 `destroyed`
/// (1 if it was destroyed recently). `what` names the routine and the handle.
fn redirect_handle_not_live(what: &str, handle: usize, destroyed: usize) -> ! {
    let why = if destroyed == 1 {
        "that was already destroyed"
    } else {
        "FwpsRedirectHandleCreate0 never returned"
    };
    stop(
        BugCheckCode::WFP_INVALID_OPERATION,
        [REDIRECT_HANDLE_NOT_LIVE, handle, destroyed, 0],
        &format!("{what} {why}"),
    )
}

/// `FwpsQueryConnectionRedirectState0`: IRQL <= `DISPATCH_LEVEL`. What the redirect records
/// of a connection say relative to `redirectHandle` (fwpsk.h's meanings): no record,
/// `FWPS_CONNECTION_NOT_REDIRECTED`; the newest record is this handle's,
/// `FWPS_CONNECTION_REDIRECTED_BY_SELF`; an older one is, `FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF`;
/// none is, `FWPS_CONNECTION_REDIRECTED_BY_OTHER`. With a `redirectContext` pointer, it
/// receives the context of this handle's newest record in the two "self" states and null
/// otherwise (INFERRED: the documentation says only when it is returned).
///
/// A record is made when a callout applies a connect request that names a redirect handle
/// (`localRedirectHandle`) and is accepted; a proxy's own connection carries the records of
/// the connection it proxies when the harness says so
/// (`Machine::connect_with_redirect_records`, Winsock's
/// `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS`).
///
/// A redirect handle that is not live stops the machine ([`REDIRECT_HANDLE_NOT_LIVE`]); so do
/// records that are not a classification's in progress ([`REDIRECT_RECORDS_NOT_LIVE`],
/// INFERRED: they belong to the connection being classified).
///
/// # Safety
///
/// `redirectContext` null or writable.
pub unsafe extern "system" fn FwpsQueryConnectionRedirectState0(
    redirectRecords: HANDLE,
    redirectHandle: HANDLE,
    redirectContext: *mut *mut core::ffi::c_void,
) -> FWPS_CONNECTION_REDIRECT_STATE {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsQueryConnectionRedirectState0", DISPATCH_LEVEL);
    let (records, handle) = (redirectRecords as usize, redirectHandle as usize);
    let answer = with_bfe(|bfe| {
        if !bfe.redirect_handles.contains_key(&handle) {
            let destroyed = bfe.destroyed_redirect_handles.parameter(handle);
            return Err((REDIRECT_HANDLE_NOT_LIVE, handle, destroyed));
        }
        let Some(records) = bfe.redirect_records.get(&records) else {
            return Err((REDIRECT_RECORDS_NOT_LIVE, records, 0));
        };
        let newest_own = records.iter().rposition(|r| r.handle == handle);
        Ok(match (records.last(), newest_own) {
            (None, _) => (FWPS_CONNECTION_NOT_REDIRECTED, 0),
            (Some(last), Some(own)) if last.handle == handle => {
                (FWPS_CONNECTION_REDIRECTED_BY_SELF, records[own].context)
            }
            (Some(_), Some(own)) => (
                FWPS_CONNECTION_PREVIOUSLY_REDIRECTED_BY_SELF,
                records[own].context,
            ),
            (Some(_), None) => (FWPS_CONNECTION_REDIRECTED_BY_OTHER, 0),
        })
    });
    match answer {
        Ok((state, context)) => {
            // SAFETY: null or writable per the contract.
            if let Some(out) = unsafe { redirectContext.as_mut() } {
                *out = context as *mut core::ffi::c_void;
            }
            state
        }
        Err((REDIRECT_HANDLE_NOT_LIVE, handle, destroyed)) => redirect_handle_not_live(
            "FwpsQueryConnectionRedirectState0 with a redirect handle",
            handle,
            destroyed,
        ),
        Err((parameter, records, _)) => stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [parameter, records, 0, 0],
            "FwpsQueryConnectionRedirectState0 with redirect records that are not a classification's in progress (kept after classifyFn?)",
        ),
    }
}

/// Opens the redirect records of a connection about to cross ALE_CONNECT_REDIRECT (harness):
/// `initial` are the records its socket carries (empty for an application's connection).
/// Returns the handle the classification's metadata carries.
pub(crate) fn open_redirect_records(initial: Vec<RedirectRecord>) -> usize {
    with_bfe(|bfe| {
        bfe.next_pend += 1;
        let handle = opaque_value(0x5EC0, bfe.next_pend);
        bfe.redirect_records.insert(handle, initial);
        handle
    })
}

/// Closes the redirect records `handle` (harness, when the connection has crossed the layers)
/// and returns them.
pub(crate) fn close_redirect_records(handle: usize) -> Vec<RedirectRecord> {
    with_bfe(|bfe| bfe.redirect_records.remove(&handle).unwrap_or_default())
}

/// At unload of `driver`: a redirect handle it created and did not destroy stops the machine
/// with `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`, parameter 2 the lowest such
/// handle, parameter 3 [`UNLOAD_REDIRECT_HANDLES_OPEN`], parameter 4 how many. INFERRED, as for
/// injection handles: what fwpkclnt.sys allocated for the driver outlives it.
pub(crate) fn check_unload_redirect_handles(
    kernel: &super::state::Kernel,
    driver: usize,
    name: &str,
) {
    let bfe = kernel.wfp.lock().unwrap_or_else(|p| p.into_inner());
    let mut open: Vec<usize> = bfe
        .redirect_handles
        .iter()
        .filter(|(_, r)| r.driver == driver)
        .map(|(&h, _)| h)
        .collect();
    drop(bfe);
    open.sort_unstable();
    if let Some(&first) = open.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [0, first, UNLOAD_REDIRECT_HANDLES_OPEN, open.len()],
            &format!(
                "driver {name} unloaded with {} redirect handle(s) never destroyed (first \
                 {first:#x}). Destroy every handle (FwpsRedirectHandleDestroy0) before unload \
                 returns",
                open.len()
            ),
        );
    }
}

/// How many pended classifications (either kind) wait for completion, on the whole machine.
pub(crate) fn pends_outstanding() -> usize {
    with_bfe(|bfe| bfe.pends.values().filter(|p| !p.completed).count())
}

/// Whether the pend `context` is still waiting for completion.
pub(crate) fn is_pending(context: usize) -> bool {
    with_bfe(|bfe| bfe.pends.get(&context).is_some_and(|p| !p.completed))
}

// --- flow contexts -------------------------------------------------------------------------------

/// The context callout `callout` associated with the flow being classified, at this layer.
fn incoming_flow_context(incoming: &Incoming<'_>, callout: u32) -> u64 {
    if incoming.metadata.currentMetadataValues & FWPS_METADATA_FIELD_FLOW_HANDLE == 0 {
        return incoming.flow_context;
    }
    let key = (incoming.metadata.flowHandle, incoming.layer.id, callout);
    with_bfe(|bfe| bfe.flow_contexts.get(&key).copied()).unwrap_or(incoming.flow_context)
}

/// `FwpsFlowAssociateContext0`, as documented: `STATUS_INVALID_PARAMETER` for a zero context or
/// a callout that is not registered with a `flowDeleteFn`; `STATUS_OBJECT_NAME_EXISTS` (an
/// informational status, not an error code) when the callout already has a context on the flow
/// at this layer, which stays associated.
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn FwpsFlowAssociateContext0(
    flowId: u64,
    layerId: u16,
    calloutId: u32,
    flowContext: u64,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsFlowAssociateContext0", DISPATCH_LEVEL);
    if flowContext == 0 {
        return Status::INVALID_PARAMETER.raw();
    }
    status(with_bfe(|bfe| {
        if bfe
            .runtime
            .get(&calloutId)
            .is_none_or(|callout| callout.flow_delete.is_none())
        {
            return Err(Status::INVALID_PARAMETER.raw());
        }
        if bfe
            .flow_contexts
            .contains_key(&(flowId, layerId, calloutId))
        {
            return Err(Status::OBJECT_NAME_EXISTS.raw());
        }
        bfe.flow_contexts
            .insert((flowId, layerId, calloutId), flowContext);
        Ok(())
    }))
}

/// `FwpsFlowRemoveContext0`, as its reference page documents it: `STATUS_UNSUCCESSFUL` when no
/// context is associated; `STATUS_PENDING` while a classification of the flow is in progress,
/// and `flowDeleteFn` runs later — here when the last classification of the flow returns, on
/// its thread; otherwise `STATUS_SUCCESS`, having called `flowDeleteFn` synchronously, from
/// inside this call (so a caller holding a spin lock that its `flowDeleteFn` takes deadlocks on
/// Windows, and stops the simulator with deadlock detection's 0xC4 / 0x1000).
///
/// INFERRED: "a classification in progress" is counted per flow (any layer, any callout):
/// every classification whose metadata carries the flow's handle, including the one calling.
///
/// # Safety
///
/// None beyond the kernel's rules, which this function checks.
pub unsafe extern "system" fn FwpsFlowRemoveContext0(
    flowId: u64,
    layerId: u16,
    calloutId: u32,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsFlowRemoveContext0", DISPATCH_LEVEL);
    let removed = with_bfe(|bfe| {
        let context = bfe.flow_contexts.remove(&(flowId, layerId, calloutId))?;
        if bfe.classifying_flows.contains_key(&flowId) {
            bfe.deferred_flow_deletes
                .push(((flowId, layerId, calloutId), context));
            Some(None)
        } else {
            Some(Some(context))
        }
    });
    match removed {
        None => Status::UNSUCCESSFUL.raw(),
        Some(None) => STATUS_PENDING,
        Some(Some(context)) => {
            delete_flow_context(layerId, calloutId, context);
            STATUS_SUCCESS
        }
    }
}

/// A classification of a flow in progress, from [`enter_flow`] to [`leave_flow`].
#[must_use]
struct FlowClassification(Option<u64>);

/// Counts a classification of the flow in `metadata` (if it has a flow handle) as in progress.
fn enter_flow(metadata: &FWPS_INCOMING_METADATA_VALUES0) -> FlowClassification {
    if metadata.currentMetadataValues & FWPS_METADATA_FIELD_FLOW_HANDLE == 0 {
        return FlowClassification(None);
    }
    let flow = metadata.flowHandle;
    with_bfe(|bfe| *bfe.classifying_flows.entry(flow).or_insert(0) += 1);
    FlowClassification(Some(flow))
}

/// The classification returned: if it was the last one of its flow, the contexts removed from
/// the flow meanwhile go to their `flowDeleteFn` now, on this thread.
fn leave_flow(classification: FlowClassification) {
    let Some(flow) = classification.0 else {
        return;
    };
    let deferred: Vec<(FlowKey, u64)> = with_bfe(|bfe| {
        let count = bfe.classifying_flows.get_mut(&flow).expect("entered");
        *count -= 1;
        if *count > 0 {
            return Vec::new();
        }
        bfe.classifying_flows.remove(&flow);
        let (mine, others) = core::mem::take(&mut bfe.deferred_flow_deletes)
            .into_iter()
            .partition(|&((of, _, _), _)| of == flow);
        bfe.deferred_flow_deletes = others;
        mine
    });
    for ((_, layer, callout), context) in deferred {
        delete_flow_context(layer, callout, context);
    }
}

/// Hands a removed context to its callout's `flowDeleteFn`.
fn delete_flow_context(layer: u16, callout: u32, context: u64) {
    let call = with_bfe(|bfe| {
        begin_call(bfe, callout).and_then(|(call, rt)| rt.flow_delete.map(|f| (call, f)))
    });
    if let Some((call, flow_delete)) = call {
        let driver = call.driver;
        in_driver(driver, callout, "flowDeleteFn", || {
            // SAFETY: the callout registered this flowDeleteFn and the context it associated.
            unsafe { flow_delete(layer, callout, context) }
        });
        drop(call);
    }
}

/// A flow ends: every context associated with it goes to its callout's `flowDeleteFn` — at once,
/// or, while a classification of the flow is in progress, when the last one returns (INFERRED:
/// the classification holds the flow, as it does for [`FwpsFlowRemoveContext0`]). Returns how
/// many contexts were removed.
pub(crate) fn end_flow(flow: u64) -> usize {
    let (removed, count): (Vec<(FlowKey, u64)>, usize) = with_bfe(|bfe| {
        let keys: Vec<FlowKey> = bfe
            .flow_contexts
            .keys()
            .filter(|k| k.0 == flow)
            .copied()
            .collect();
        let removed: Vec<_> = keys
            .into_iter()
            .filter_map(|k| bfe.flow_contexts.remove(&k).map(|c| (k, c)))
            .collect();
        let count = removed.len();
        if bfe.classifying_flows.contains_key(&flow) {
            bfe.deferred_flow_deletes.extend(removed);
            return (Vec::new(), count);
        }
        (removed, count)
    });
    for &((_, layer, callout), context) in &removed {
        delete_flow_context(layer, callout, context);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_values_of_different_kinds_never_collide() {
        // The same serial under two kinds, and serials beyond the 16 bits the kinds once
        // shared with them.
        assert_ne!(opaque_value(0xC0A1, 7), opaque_value(0xC1A0, 7));
        assert_ne!(opaque_value(0xC0A1, 0x1_0000 + 7), opaque_value(0xC0A2, 7));
        assert_eq!(opaque_value(0xC0A1, 7) >> 48, 0xC0A1);
    }

    #[test]
    fn the_retired_set_forgets_the_oldest_beyond_its_capacity() {
        let mut retired = Retired::default();
        for value in 0..=Retired::CAPACITY {
            retired.retire(0x1000 + value);
        }
        assert_eq!(retired.0.len(), Retired::CAPACITY);
        assert_eq!(retired.parameter(0x1000), 0, "the oldest is forgotten");
        assert_eq!(retired.parameter(0x1001), 1);
        assert_eq!(retired.parameter(0x1000 + Retired::CAPACITY), 1);
        assert_eq!(retired.parameter(0x42), 0, "never retired");
    }

    fn bytes(data: &[u8]) -> Arc<[u8]> {
        Arc::from(data)
    }

    #[test]
    fn incoming_values_read_back_as_the_values_they_were_built_from() {
        // Every incoming type; blobs and strings of lengths that do and do not fill their last
        // word, an empty blob, data-carrying values between plain ones.
        let values = vec![
            SimValue::Blob(bytes(b"\\device\\odd length")),
            SimValue::Empty,
            SimValue::U8(7),
            SimValue::U64(u64::MAX - 3),
            SimValue::U16(0x1234),
            SimValue::Bytes16(core::array::from_fn(|i| i as u8 + 1)),
            SimValue::U32(0xDEAD_BEEF),
            SimValue::Blob(bytes(&[])),
            SimValue::Blob(bytes(&[9; 16])),
            SimValue::Sid(bytes(&[1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 32, 2, 0, 0])),
            SimValue::TokenAccess(bytes(&[0; 16])),
            SimValue::SecurityDescriptor(bytes(&[1, 0, 4, 0x80, 5])),
            SimValue::Unicode(vec![0x41, 0xC4, 0x42]),
            SimValue::Unicode(vec![1, 2, 3, 4]),
            SimValue::U64(5),
        ];
        let storage = ValueStorage::incoming(&values);
        assert_eq!(storage.values.len(), values.len());
        for (raw, value) in storage.values.iter().zip(&values) {
            // SAFETY: `storage` built the raw value and is alive.
            let back = unsafe { read_value(&raw.value) };
            assert_eq!(back, Ok(Some(value.clone())));
        }
        // A UINT64 and a SID are aligned as their types need.
        for index in [3, 14] {
            // SAFETY: the values at these indexes are UINT64s.
            let ptr = unsafe { storage.values[index].value.u.uint64 };
            assert_eq!(ptr as usize % align_of::<u64>(), 0);
        }
        // SAFETY: the value at index 9 is a SID.
        let sid = unsafe { storage.values[9].value.u.sid };
        assert_eq!(sid as usize % 4, 0);
    }

    #[test]
    fn condition_values_read_back_as_the_values_they_were_built_from() {
        let conditions = vec![
            SimValue::V4Mask {
                addr: 0x0A00_0000,
                mask: 0xFF00_0000,
            },
            SimValue::U16(443),
            SimValue::V6Mask {
                addr: core::array::from_fn(|i| 0x20 + i as u8),
                prefix: 64,
            },
            SimValue::Range(Box::new(SimValue::U64(10)), Box::new(SimValue::U64(20))),
            SimValue::Range(
                Box::new(SimValue::Blob(bytes(b"aaa"))),
                Box::new(SimValue::Blob(bytes(b"zzzzzzzzz"))),
            ),
            SimValue::Blob(bytes(b"after the ranges")),
        ];
        let mut storage = ValueStorage::new(conditions.iter());
        let raw: Vec<FWP_CONDITION_VALUE0> = conditions
            .iter()
            .map(|condition| {
                let (tag, u) = storage.raw_condition(condition);
                FWP_CONDITION_VALUE0 { r#type: tag, u }
            })
            .collect();
        for (raw, condition) in raw.iter().zip(&conditions) {
            // SAFETY: `storage` built the raw value and is alive.
            let back = unsafe { read_condition(raw) };
            assert_eq!(back, Ok(condition.clone()));
        }
    }
}
