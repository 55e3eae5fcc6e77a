//! The filter manager, as far as communication ports need it: one filter registration per
//! driver, server ports, client connections and the messages exchanged over them — and the
//! user-mode side of those connections (`FilterConnectCommunicationPort`, `FilterGetMessage`,
//! `FilterReplyMessage`, `CloseHandle`), which the harness drives through
//! [`crate::PortClient`].
//!
//! The rules it checks, with what Windows does:
//!
//! - `FltSendMessage` at `DISPATCH_LEVEL` stops with `INVALID_PROCESS_ATTACH_ATTEMPT` (0x5), the
//!   stop code of the bug this crate exists for (see [`FltSendMessage`] for why that code); above
//!   `DISPATCH_LEVEL`, and every other routine above its maximum, with `IRQL_NOT_LESS_OR_EQUAL`.
//! - `FltUnregisterFilter` while a server port of the filter is still open: on Windows the call
//!   waits forever (the port holds a reference on the filter; Microsoft's documentation tells
//!   drivers to close the port first "to prevent the system from hanging"). A test cannot wait
//!   forever, so the simulator stops with `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`.
//! - A driver that unloads with a filter, a server port or a client connection still open: see
//!   [`check_unload`].
//! - A pointer that is not a live filter, port or security descriptor: the filter manager would
//!   dereference it; the simulator stops with `KMODE_EXCEPTION_NOT_HANDLED` (an access violation
//!   in kernel mode) instead of corrupting memory.
//!
//! Messages follow the documented protocol: each `FltSendMessage` gets a unique message id; a
//! message is delivered at once to a client with a `FilterGetMessage` pending, and otherwise
//! queued; the sender waits until the message is delivered (no reply buffer) or replied to (reply
//! buffer), the connection breaks (`STATUS_PORT_DISCONNECTED`) or the timeout expires
//! (`STATUS_TIMEOUT`; the message is withdrawn, and a late reply fails with
//! `STATUS_FLT_NO_WAITER_FOR_REPLY`). A reply longer than the driver's reply buffer is cut to
//! the buffer and the driver gets `STATUS_BUFFER_OVERFLOW`.
//!
//! Where the documentation is silent the simulator makes a choice and says so:
//!
//! | question | the simulator's answer |
//! |---|---|
//! | who may connect to a port created without a security descriptor | everyone |
//! | a port created with a security descriptor not built by `FltBuildDefaultSecurityDescriptor` | refused with `STATUS_NOT_IMPLEMENTED` |
//! | connections beyond `MaxConnections` | `STATUS_CONNECTION_COUNT_LIMIT` |
//! | a second `FltRegisterFilter` by the same driver | `STATUS_OBJECT_NAME_COLLISION` |
//! | registrations with operation, context, instance, name-provider or unload callbacks | refused with `STATUS_NOT_IMPLEMENTED` (only ports are simulated) |
//! | what user mode sees when its reply is too long for the driver | success |
//! | `DisconnectNotify` after the driver closed the client port itself | not called |
//! | `FltCloseClientPort` on a variable that is already null | nothing happens |
//! | `FltUnregisterFilter` while a process's connect or disconnect runs the driver's `ConnectNotify` or `DisconnectNotify` | waits for it (the callback holds the filter), then disconnects a connection it accepted; in an unload routine, after the unload wait limit, stops with 0xCE |
//!
//! `FltRegisterFilter` without a `FilterUnloadCallback` clears the driver object's
//! `DriverUnload`, as `fltmgr.sys` does (Microsoft documents that such a filter "cannot be
//! unloaded"). `wfp_rs::port::Filter::register` puts the SDK's unload routine back (and during
//! `DriverEntry` the SDK has not installed it yet), so SDK drivers stay unloadable and tear the
//! filter down themselves.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::bugcheck::stop;
use super::pool::{kernel_allocate, kernel_free};
use super::state::{
    self as kernel, Deadline, Kernel, current, current_driver, irql, level_name, require_irql,
};
use wfp_rs::bugcheck::{BugCheckCode, verifier};
use wfp_rs::status::Status;
use wfp_rs::sys::*;

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_TIMEOUT: NTSTATUS = Status::TIMEOUT.raw();
const STATUS_BUFFER_OVERFLOW: NTSTATUS = Status::BUFFER_OVERFLOW.raw();
const STATUS_INVALID_PARAMETER: NTSTATUS = Status::INVALID_PARAMETER.raw();
const STATUS_INSUFFICIENT_RESOURCES: NTSTATUS = Status::INSUFFICIENT_RESOURCES.raw();
const STATUS_NOT_IMPLEMENTED: NTSTATUS = Status::NOT_IMPLEMENTED.raw();
const STATUS_ACCESS_DENIED: NTSTATUS = Status::ACCESS_DENIED.raw();
const STATUS_OBJECT_NAME_NOT_FOUND: NTSTATUS = Status::OBJECT_NAME_NOT_FOUND.raw();
const STATUS_OBJECT_NAME_COLLISION: NTSTATUS = Status::OBJECT_NAME_COLLISION.raw();
const STATUS_PORT_DISCONNECTED: NTSTATUS = Status::PORT_DISCONNECTED.raw();
const STATUS_CONNECTION_COUNT_LIMIT: NTSTATUS = Status::CONNECTION_COUNT_LIMIT.raw();
const STATUS_FLT_NO_WAITER_FOR_REPLY: NTSTATUS = Status::FLT_NO_WAITER_FOR_REPLY.raw();

/// Pool tag of the security descriptors `FltBuildDefaultSecurityDescriptor` allocates.
const DESCRIPTOR_TAG: u32 = u32::from_le_bytes(*b"FlSd");
/// Their size: a self-relative descriptor with a two-entry DACL (SYSTEM, Administrators).
const DESCRIPTOR_SIZE: usize = 0x50;
/// The size of `FILTER_REPLY_HEADER`, which user mode puts in front of each reply.
const REPLY_HEADER_LEN: u32 = core::mem::size_of::<FILTER_REPLY_HEADER>() as u32;

type ConnectFn = unsafe extern "system" fn(PFLT_PORT, PVOID, PVOID, ULONG, *mut PVOID) -> NTSTATUS;
type DisconnectFn = unsafe extern "system" fn(PVOID);

/// The filter manager of one machine: a field of [`Kernel`].
pub(crate) struct FilterManager {
    state: Mutex<State>,
    /// Signalled on every change `wait_for_listener` may wait for, and with
    /// [`FilterManager::notify_everyone`] on every change a sender may wait for too. Readers
    /// wait on their connection's own condition variable (`ClientRecord::readable`).
    changed: Condvar,
    /// Signalled for the sender of a message, by its id's stripe ([`FilterManager::sender`]):
    /// a reply wakes the thread waiting in `FltSendMessage` for it (and the few sharing its
    /// stripe), not every sender and reader of every port — on Windows the reply signals the
    /// waiting sender alone.
    senders: [Condvar; 1 << SENDER_STRIPE_BITS],
}

/// The senders' condition variables are `1 << SENDER_STRIPE_BITS`: enough that a thousand
/// threads waiting in `FltSendMessage` at once rarely share one, so a reply wakes about one.
const SENDER_STRIPE_BITS: u32 = 10;

impl Default for FilterManager {
    fn default() -> Self {
        FilterManager {
            state: Mutex::default(),
            changed: Condvar::new(),
            senders: std::array::from_fn(|_| Condvar::new()),
        }
    }
}

impl FilterManager {
    /// The condition variable the sender of message `id` waits on.
    fn sender(&self, id: u64) -> &Condvar {
        let mixed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.senders[(mixed >> (64 - SENDER_STRIPE_BITS)) as usize]
    }

    /// Wakes every listener's waiter and every sender (a port or a connection changed); the
    /// readers of a changed connection are woken with `wake_all_readers`.
    fn notify_everyone(&self) {
        self.changed.notify_all();
        for sender in &self.senders {
            sender.notify_all();
        }
    }
}

#[derive(Default)]
struct State {
    filters: FxHashMap<usize, FilterRecord>,
    servers: FxHashMap<usize, ServerRecord>,
    clients: FxHashMap<usize, ClientRecord>,
    messages: FxHashMap<u64, MessageRecord>,
    descriptors: FxHashMap<usize, DescriptorRecord>,
    next_message_id: u64,
}

struct FilterRecord {
    driver: usize,
    started: bool,
    /// `ConnectNotify` and `DisconnectNotify` calls other threads are making now (a process
    /// connecting or disconnecting): `FltUnregisterFilter` waits for them (INFERRED: on Windows a
    /// callback in progress holds a reference on the filter, and unregistering waits for the
    /// filter's references). Decremented with [`FilterManager::changed`] notified.
    callbacks: usize,
}

/// Who a port's security descriptor lets connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// No descriptor.
    Everyone,
    /// `FltBuildDefaultSecurityDescriptor`: SYSTEM and Administrators get this access mask.
    AdministratorsAndSystem(ACCESS_MASK),
}

struct ServerRecord {
    filter: usize,
    driver: usize,
    name: String,
    case_insensitive: bool,
    cookie: usize,
    connect: ConnectFn,
    disconnect: DisconnectFn,
    max_connections: u32,
    access: Access,
}

impl ServerRecord {
    fn is_named(&self, name: &str) -> bool {
        if self.case_insensitive {
            self.name.to_lowercase() == name.to_lowercase()
        } else {
            self.name == name
        }
    }
}

struct ClientRecord {
    server: usize,
    filter: usize,
    driver: usize,
    disconnect: DisconnectFn,
    /// The driver's connection cookie (`ConnectionPortCookie`).
    cookie: usize,
    /// `ConnectNotify` accepted the connection.
    accepted: bool,
    /// The user-mode handle is open.
    user_open: bool,
    /// The driver has not closed the client port (`FltCloseClientPort`), and the filter manager
    /// has not closed it for an unregistering filter.
    driver_open: bool,
    /// `DisconnectNotify` was called (or is being called).
    notified: bool,
    /// `FilterGetMessage` calls waiting.
    readers: usize,
    /// Messages sent but not yet delivered.
    queued: VecDeque<u64>,
    /// Messages delivered to a waiting `FilterGetMessage` that has not returned yet.
    delivered: VecDeque<UserMessage>,
    /// What this connection's `FilterGetMessage` calls wait on: a message wakes one of them (on
    /// Windows a message completes one pending read), a change of the connection all of them.
    readable: Arc<Condvar>,
}

impl ClientRecord {
    fn is_live(&self) -> bool {
        self.accepted && self.user_open && self.driver_open
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum MessageState {
    Queued,
    Delivered,
    Replied(Vec<u8>),
}

struct MessageRecord {
    client: usize,
    data: Vec<u8>,
    /// The driver's reply buffer size, if it waits for a reply.
    reply_capacity: Option<u32>,
    state: MessageState,
}

struct DescriptorRecord {
    access: ACCESS_MASK,
}

/// A message as `FilterGetMessage` returns it (the header's fields, then the bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UserMessage {
    pub(crate) id: u64,
    /// `FILTER_MESSAGE_HEADER::ReplyLength`: the reply the driver waits for, including the
    /// `FILTER_REPLY_HEADER`; 0 if it waits for none.
    pub(crate) reply_length: u32,
    pub(crate) data: Vec<u8>,
}

impl State {
    /// A `ConnectNotify` or `DisconnectNotify` of `filter` is about to run on a process's thread
    /// ([`FilterRecord::callbacks`]).
    fn callback_started(&mut self, filter: usize) {
        if let Some(record) = self.filters.get_mut(&filter) {
            record.callbacks += 1;
        }
    }

    /// It returned; the caller notifies [`FilterManager::changed`] after releasing the lock.
    fn callback_returned(&mut self, filter: usize) {
        if let Some(record) = self.filters.get_mut(&filter) {
            record.callbacks = record.callbacks.saturating_sub(1);
        }
    }
}

fn lock(kernel: &Kernel) -> MutexGuard<'_, State> {
    // A poisoned lock means a harness thread panicked holding it; the bookkeeping is still
    // consistent.
    kernel
        .flt
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wait<'a>(
    kernel: &'a Kernel,
    guard: MutexGuard<'a, State>,
    deadline: Option<Deadline>,
) -> MutexGuard<'a, State> {
    wait_on(kernel, &kernel.flt.changed, guard, deadline)
}

/// Wakes every `FilterGetMessage` waiting on these connections: they changed (closed, or their
/// filter unregistered), and each reader must look again.
fn wake_all_readers(readable: &[Arc<Condvar>]) {
    for condvar in readable {
        condvar.notify_all();
    }
}

fn wait_on<'a>(
    kernel: &'a Kernel,
    condvar: &Condvar,
    guard: MutexGuard<'a, State>,
    deadline: Option<Deadline>,
) -> MutexGuard<'a, State> {
    kernel.wait_once(
        &kernel.flt.state,
        guard,
        condvar,
        deadline,
        "filter manager: waits on a communication port",
    )
}

/// Object addresses: kernel-looking, unique for the life of the process, never dereferenced.
static NEXT_OBJECT: AtomicUsize = AtomicUsize::new(0xFFFF_B20C_0000_1000);

fn new_object() -> usize {
    NEXT_OBJECT.fetch_add(0x80, Ordering::Relaxed)
}

/// The filter manager dereferences whatever pointer it is given; an address that is not a live
/// object of the kind expected would fault in kernel mode.
fn bad_object(routine: &str, what: &str, address: usize) -> ! {
    stop(
        BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        [0xC000_0005, 0, 0, address],
        &format!(
            "{routine}: {address:#x} is not a live {what}; the filter manager would dereference it (an access violation in kernel mode)"
        ),
    )
}

/// The client port a driver's variable holds. The driver's variable is read and written as an
/// atomic, as the SDK keeps it (`AtomicPtr`): the filter manager synchronises the reads in
/// `FltSendMessage` with the write in `FltCloseClientPort`.
///
/// # Safety
///
/// `variable` must be valid, aligned, and only accessed atomically while this runs.
unsafe fn port_variable<'a>(variable: *mut PFLT_PORT) -> &'a AtomicPtr<FLT_PORT> {
    // SAFETY: forwarded to the caller; `AtomicPtr<T>` has the layout of `*mut T`.
    unsafe { AtomicPtr::from_ptr(variable) }
}

/// Calls a driver routine the way the filter manager does: on this thread, at `PASSIVE_LEVEL`,
/// as the driver, and checks that it returns at `PASSIVE_LEVEL`.
fn call_driver<R>(
    kernel: &Arc<Kernel>,
    driver: usize,
    routine: &'static str,
    f: impl FnOnce() -> R,
) -> R {
    kernel::with_context(kernel, PASSIVE_LEVEL, driver, || {
        let port = kernel::Routine::new(kernel::RoutineKind::Port(routine), driver, 0);
        let result = kernel::with_routine(port, f);
        let now = irql();
        if now != PASSIVE_LEVEL {
            stop(
                BugCheckCode::IRQL_UNEXPECTED_VALUE,
                [((now as usize) << 16) | 2, 0, 0, 0],
                &format!(
                    "the driver's {routine} returned at IRQL {now} ({}); it was called at PASSIVE_LEVEL",
                    level_name(now)
                ),
            );
        }
        result
    })
}

fn injected_failure() -> bool {
    current().injected_failure()
}

// --- registration ---------------------------------------------------------------------------

/// `FltRegisterFilter`. Only registrations without callbacks are simulated (a filter that
/// exists for its communication ports); anything else is refused with `STATUS_NOT_IMPLEMENTED`.
///
/// # Safety
///
/// `Driver` must be the caller's driver object, `Registration` a valid `FLT_REGISTRATION`,
/// `RetFilter` writable.
pub unsafe extern "system" fn FltRegisterFilter(
    Driver: *mut DRIVER_OBJECT,
    Registration: *const FLT_REGISTRATION,
    RetFilter: *mut PFLT_FILTER,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltRegisterFilter", APC_LEVEL);
    if RetFilter.is_null() {
        bad_object("FltRegisterFilter", "output pointer", 0);
    }
    // SAFETY: the caller passes a writable out pointer.
    unsafe { RetFilter.write(core::ptr::null_mut()) };
    // SAFETY: the caller passes a valid registration (or null, rejected here).
    let Some(registration) = (unsafe { Registration.as_ref() }) else {
        bad_object("FltRegisterFilter", "FLT_REGISTRATION", 0);
    };
    if registration.Version >> 8 != FLT_REGISTRATION_VERSION >> 8 {
        return STATUS_INVALID_PARAMETER;
    }
    let callbacks = [
        registration.ContextRegistration.cast_mut(),
        registration.OperationRegistration.cast_mut(),
        registration.InstanceSetupCallback,
        registration.InstanceQueryTeardownCallback,
        registration.InstanceTeardownStartCallback,
        registration.InstanceTeardownCompleteCallback,
        registration.GenerateFileNameCallback,
        registration.NormalizeNameComponentCallback,
        registration.NormalizeContextCleanupCallback,
        registration.TransactionNotificationCallback,
        registration.NormalizeNameComponentExCallback,
        registration.SectionNotificationCallback,
    ];
    if registration.FilterUnloadCallback.is_some() || callbacks.iter().any(|p| !p.is_null()) {
        return STATUS_NOT_IMPLEMENTED;
    }
    let kernel = current();
    let driver = Driver as usize;
    {
        let state = kernel.lock();
        if !state.drivers.contains_key(&driver) {
            return STATUS_INVALID_PARAMETER;
        }
        if kernel.injected_failure() {
            return STATUS_INSUFFICIENT_RESOURCES;
        }
    }
    let mut flt = lock(&kernel);
    if flt.filters.values().any(|f| f.driver == driver) {
        return STATUS_OBJECT_NAME_COLLISION;
    }
    let filter = new_object();
    flt.filters.insert(
        filter,
        FilterRecord {
            driver,
            started: false,
            callbacks: 0,
        },
    );
    drop(flt);
    // fltmgr.sys keeps the driver's DriverUnload, to call after the FilterUnloadCallback, and
    // installs its own unload routine in its place; without a FilterUnloadCallback it installs
    // none, so the driver cannot be stopped (Microsoft: such a filter "cannot be unloaded").
    // SAFETY: `Driver` is a loaded driver's object (checked above), which lives in the driver
    // table until it is unloaded; only the driver and this routine write the field.
    unsafe { (*Driver).DriverUnload = None };
    // SAFETY: as above.
    unsafe { RetFilter.write(filter as PFLT_FILTER) };
    STATUS_SUCCESS
}

/// `FltStartFiltering`. A second call fails with `STATUS_INVALID_PARAMETER`, as documented.
///
/// # Safety
///
/// `Filter` must come from `FltRegisterFilter`.
pub unsafe extern "system" fn FltStartFiltering(Filter: PFLT_FILTER) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltStartFiltering", APC_LEVEL);
    let kernel = current();
    let mut flt = lock(&kernel);
    let Some(record) = flt.filters.get_mut(&(Filter as usize)) else {
        drop(flt);
        bad_object("FltStartFiltering", "filter", Filter as usize);
    };
    if record.started {
        return STATUS_INVALID_PARAMETER;
    }
    record.started = true;
    STATUS_SUCCESS
}

/// `FltUnregisterFilter`: waits for the `ConnectNotify` and `DisconnectNotify` calls other
/// threads are making, disconnects every client of the filter's ports (calling the driver's
/// `DisconnectNotify` for each) and removes the filter. With a server port of the filter still
/// open, or a callback that does not return, Windows waits forever; the simulator stops.
///
/// # Safety
///
/// `Filter` must come from `FltRegisterFilter` and not be unregistered yet.
pub unsafe extern "system" fn FltUnregisterFilter(Filter: PFLT_FILTER) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltUnregisterFilter", APC_LEVEL);
    let kernel = current();
    let filter = Filter as usize;
    let mut flt = {
        let flt = lock(&kernel);
        if !flt.filters.contains_key(&filter) {
            drop(flt);
            bad_object("FltUnregisterFilter", "registered filter", filter);
        }
        if let Some((&server, record)) = flt.servers.iter().find(|(_, s)| s.filter == filter) {
            let (connect, name) = (record.connect as usize, record.name.clone());
            drop(flt);
            stop(
                BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                [connect, server, filter, 0],
                &format!(
                    "FltUnregisterFilter with the communication server port \"{name}\" still open; on Windows the call waits forever for the port's reference on the filter (close the port with FltCloseCommunicationPort first)"
                ),
            );
        }
        flt
    };
    // A connect or disconnect another thread is making holds the filter: its ConnectNotify or
    // DisconnectNotify runs in the driver (and may close its client port), so wait for it. A
    // connection accepted meanwhile is disconnected like the others. No new connect can start:
    // the server ports are closed (checked above).
    // From an unload routine the wait is bounded, as every wait the unload depends on.
    let deadline = kernel.load_or_unload_deadline();
    loop {
        let (guard, timed_out) = kernel.wait_while(
            &kernel.flt.state,
            flt,
            &kernel.flt.changed,
            deadline,
            "FltUnregisterFilter: waits for ConnectNotify and DisconnectNotify calls in progress",
            |state| {
                state
                    .filters
                    .get(&filter)
                    .is_some_and(|record| record.callbacks > 0)
            },
        );
        if timed_out {
            let calls = guard
                .filters
                .get(&filter)
                .map_or(0, |record| record.callbacks);
            drop(guard);
            kernel.unload_wait_expired(
                super::state::current_driver(),
                [filter, 0, 0, wfp_rs::bugcheck::unload_wait::PORT_CALLBACKS],
                &format!(
                    "{calls} ConnectNotify or DisconnectNotify call(s) by connecting or disconnecting processes to return (FltUnregisterFilter waits for them)"
                ),
            );
        }
        flt = guard;
        let calls: Vec<(DisconnectFn, usize, usize)> = flt
            .clients
            .values_mut()
            .filter(|c| c.filter == filter && c.accepted && !c.notified)
            .map(|c| {
                c.notified = true;
                (c.disconnect, c.cookie, c.driver)
            })
            .collect();
        if calls.is_empty() {
            break;
        }
        drop(flt);
        for (disconnect, cookie, driver) in calls {
            call_driver(&kernel, driver, "DisconnectNotify", || {
                // SAFETY: the driver registered this routine for its port and is still loaded;
                // the cookie is the one its ConnectNotify returned.
                unsafe { disconnect(cookie as PVOID) }
            });
        }
        flt = lock(&kernel);
    }
    // The filter manager closes every client port the driver has not closed.
    let mut closed = Vec::new();
    for client in flt.clients.values_mut().filter(|c| c.filter == filter) {
        client.driver_open = false;
        closed.push(Arc::clone(&client.readable));
    }
    flt.clients.retain(|_, c| c.user_open);
    flt.filters.remove(&filter);
    drop(flt);
    kernel.flt.notify_everyone();
    wake_all_readers(&closed);
}

// --- security descriptors ------------------------------------------------------------------------

/// `FltBuildDefaultSecurityDescriptor`: a descriptor that grants `DesiredAccess` to SYSTEM and
/// the Administrators group only. It is pool charged to the caller, so a descriptor never freed
/// with `FltFreeSecurityDescriptor` is a pool leak at unload.
///
/// # Safety
///
/// `SecurityDescriptor` must be writable.
pub unsafe extern "system" fn FltBuildDefaultSecurityDescriptor(
    SecurityDescriptor: *mut PSECURITY_DESCRIPTOR,
    DesiredAccess: ACCESS_MASK,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltBuildDefaultSecurityDescriptor", APC_LEVEL);
    if SecurityDescriptor.is_null() {
        bad_object("FltBuildDefaultSecurityDescriptor", "output pointer", 0);
    }
    // SAFETY: the caller passes a writable out pointer.
    unsafe { SecurityDescriptor.write(core::ptr::null_mut()) };
    let block = kernel_allocate(DESCRIPTOR_SIZE, DESCRIPTOR_TAG, current_driver());
    if block.is_null() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    let kernel = current();
    lock(&kernel).descriptors.insert(
        block as usize,
        DescriptorRecord {
            access: DesiredAccess,
        },
    );
    // SAFETY: as above.
    unsafe { SecurityDescriptor.write(block.cast()) };
    STATUS_SUCCESS
}

/// `FltFreeSecurityDescriptor`.
///
/// # Safety
///
/// `SecurityDescriptor` must come from `FltBuildDefaultSecurityDescriptor` and not be freed yet.
pub unsafe extern "system" fn FltFreeSecurityDescriptor(SecurityDescriptor: PSECURITY_DESCRIPTOR) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltFreeSecurityDescriptor", APC_LEVEL);
    let kernel = current();
    let known = lock(&kernel)
        .descriptors
        .remove(&(SecurityDescriptor as usize))
        .is_some();
    if !known {
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                verifier::FREE_OF_UNALLOCATED_ADDRESS,
                SecurityDescriptor as usize,
                0,
                0,
            ],
            "FltFreeSecurityDescriptor on a pointer FltBuildDefaultSecurityDescriptor did not return (freed twice?)",
        );
    }
    kernel_free(SecurityDescriptor.cast());
}

// --- server ports ---------------------------------------------------------------------------------

fn read_name(name: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: callers pass null or a valid UNICODE_STRING whose buffer holds `Length` bytes.
    let name = unsafe { name.as_ref() }?;
    let chars = usize::from(name.Length / 2);
    if chars == 0 || name.Buffer.is_null() {
        return None;
    }
    // SAFETY: as above.
    let units = unsafe { core::slice::from_raw_parts(name.Buffer, chars) };
    Some(String::from_utf16_lossy(units))
}

/// `FltCreateCommunicationPort`. The security descriptor is captured at creation, so it may be
/// freed as soon as this returns.
///
/// # Safety
///
/// As in the kernel: `Filter` from `FltRegisterFilter`, `ServerPort` writable, `ObjectAttributes`
/// valid, the callbacks valid until the port and all its connections are closed.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "system" fn FltCreateCommunicationPort(
    Filter: PFLT_FILTER,
    ServerPort: *mut PFLT_PORT,
    ObjectAttributes: *const OBJECT_ATTRIBUTES,
    ServerPortCookie: PVOID,
    ConnectNotifyCallback: PFLT_CONNECT_NOTIFY,
    DisconnectNotifyCallback: PFLT_DISCONNECT_NOTIFY,
    MessageNotifyCallback: PFLT_MESSAGE_NOTIFY,
    MaxConnections: LONG,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    // User mode cannot send to the driver in the simulator (there is no FilterSendMessage), so
    // the message callback is never called.
    let _ = MessageNotifyCallback;
    require_irql("FltCreateCommunicationPort", PASSIVE_LEVEL);
    if ServerPort.is_null() {
        bad_object("FltCreateCommunicationPort", "output pointer", 0);
    }
    // SAFETY: the caller passes a writable out pointer.
    unsafe { ServerPort.write(core::ptr::null_mut()) };
    // SAFETY: the caller passes valid object attributes (or null, rejected here).
    let Some(attributes) = (unsafe { ObjectAttributes.as_ref() }) else {
        bad_object("FltCreateCommunicationPort", "OBJECT_ATTRIBUTES", 0);
    };
    let kernel = current();
    if !lock(&kernel).filters.contains_key(&(Filter as usize)) {
        bad_object(
            "FltCreateCommunicationPort",
            "registered filter",
            Filter as usize,
        );
    }
    if attributes.Attributes & OBJ_KERNEL_HANDLE == 0 || MaxConnections <= 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let (Some(connect), Some(disconnect)) = (ConnectNotifyCallback, DisconnectNotifyCallback)
    else {
        return STATUS_INVALID_PARAMETER;
    };
    let Some(name) = read_name(attributes.ObjectName) else {
        return STATUS_INVALID_PARAMETER;
    };
    if injected_failure() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    let mut flt = lock(&kernel);
    let access = if attributes.SecurityDescriptor.is_null() {
        Access::Everyone
    } else {
        match flt
            .descriptors
            .get(&(attributes.SecurityDescriptor as usize))
        {
            Some(descriptor) => Access::AdministratorsAndSystem(descriptor.access),
            // The simulator does not parse security descriptors: it would have to guess.
            None => return STATUS_NOT_IMPLEMENTED,
        }
    };
    if flt.servers.values().any(|s| s.is_named(&name)) {
        return STATUS_OBJECT_NAME_COLLISION;
    }
    let server = new_object();
    let driver = flt.filters.get(&(Filter as usize)).map_or(0, |f| f.driver);
    flt.servers.insert(
        server,
        ServerRecord {
            filter: Filter as usize,
            driver,
            name,
            case_insensitive: attributes.Attributes & OBJ_CASE_INSENSITIVE != 0,
            cookie: ServerPortCookie as usize,
            connect,
            disconnect,
            max_connections: MaxConnections.unsigned_abs(),
            access,
        },
    );
    // SAFETY: as above.
    unsafe { ServerPort.write(server as PFLT_PORT) };
    STATUS_SUCCESS
}

/// `FltCloseCommunicationPort`: no new connections; existing ones stay open.
///
/// # Safety
///
/// `ServerPort` must come from `FltCreateCommunicationPort` and not be closed yet.
pub unsafe extern "system" fn FltCloseCommunicationPort(ServerPort: PFLT_PORT) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltCloseCommunicationPort", PASSIVE_LEVEL);
    let kernel = current();
    let removed = lock(&kernel).servers.remove(&(ServerPort as usize));
    if removed.is_none() {
        bad_object(
            "FltCloseCommunicationPort",
            "server port",
            ServerPort as usize,
        );
    }
}

/// `FltCloseClientPort`: closes the driver's end of a connection and sets the variable to null.
/// Messages waiting on the connection fail with `STATUS_PORT_DISCONNECTED`.
///
/// # Safety
///
/// `ClientPort` must point to the variable holding the client port, accessed only atomically.
pub unsafe extern "system" fn FltCloseClientPort(Filter: PFLT_FILTER, ClientPort: *mut PFLT_PORT) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FltCloseClientPort", PASSIVE_LEVEL);
    if ClientPort.is_null() {
        bad_object("FltCloseClientPort", "client port variable", 0);
    }
    let kernel = current();
    let mut flt = lock(&kernel);
    if !flt.filters.contains_key(&(Filter as usize)) {
        drop(flt);
        bad_object("FltCloseClientPort", "registered filter", Filter as usize);
    }
    // SAFETY: the caller passes the variable, which the SDK accesses only atomically; the read
    // and the write below happen under the filter manager's lock, as FltSendMessage's read does.
    let variable = unsafe { port_variable(ClientPort) };
    let client = variable.load(Ordering::SeqCst) as usize;
    if client == 0 {
        return;
    }
    let Some(record) = flt.clients.get_mut(&client) else {
        drop(flt);
        bad_object("FltCloseClientPort", "client port", client);
    };
    record.driver_open = false;
    let user_open = record.user_open;
    let readable = Arc::clone(&record.readable);
    if !user_open {
        flt.clients.remove(&client);
    }
    variable.store(core::ptr::null_mut(), Ordering::SeqCst);
    drop(flt);
    kernel.flt.notify_everyone();
    wake_all_readers(&[readable]);
}

// --- messages ----------------------------------------------------------------------------------

/// `FltSendMessage`.
///
/// At `DISPATCH_LEVEL` the machine stops with `INVALID_PROCESS_ATTACH_ATTEMPT` (0x5). That is the
/// stop code Windows shows for the bug this crate was built around, and the reason is in what
/// the routine does: the message is copied into the buffer of the `FilterGetMessage` the client
/// process has pending, a user-mode address that is only mapped in that process, so the filter
/// manager attaches the calling thread to the client's process (`KeStackAttachProcess`) to
/// write it; attaching at `DISPATCH_LEVEL`, where the thread cannot be rescheduled (a DPC, or a
/// `classifyFn` at `DISPATCH_LEVEL`), is an invalid process attach. (On Windows a send that
/// finds no reader pending waits instead, and the stop is then whatever that wait at
/// `DISPATCH_LEVEL` produces; the simulator reports 0x5 for every call at `DISPATCH_LEVEL`, so
/// the mistake fails the same way every time.) Parameters: the client port the driver's
/// variable holds (standing in for the client process), 0, 0, and 1 ("a DPC is running").
///
/// Above `DISPATCH_LEVEL` it stops with `IRQL_NOT_LESS_OR_EQUAL`, as every routine does.
///
/// # Safety
///
/// `Filter` from `FltRegisterFilter`; `ClientPort` the variable holding the client port
/// (accessed only atomically); `SenderBuffer` readable for `SenderBufferLength` bytes;
/// `ReplyBuffer` null or writable for `*ReplyLength` bytes; `ReplyLength` null or valid;
/// `Timeout` null or valid.
pub unsafe extern "system" fn FltSendMessage(
    Filter: PFLT_FILTER,
    ClientPort: *mut PFLT_PORT,
    SenderBuffer: PVOID,
    SenderBufferLength: ULONG,
    ReplyBuffer: PVOID,
    ReplyLength: *mut ULONG,
    Timeout: *const LARGE_INTEGER,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let now = irql();
    if now == DISPATCH_LEVEL {
        let client = if ClientPort.is_null() {
            0
        } else {
            // SAFETY: the caller passes the variable holding the client port.
            unsafe { port_variable(ClientPort) }.load(Ordering::SeqCst) as usize
        };
        stop(
            BugCheckCode::INVALID_PROCESS_ATTACH_ATTEMPT,
            [client, 0, 0, 1],
            "FltSendMessage was called at DISPATCH_LEVEL (2): it attaches to the client's process to copy the message into its buffer, and a thread at DISPATCH_LEVEL cannot attach to a process; its maximum is APC_LEVEL (1). Pend the classification and send from a work item (PASSIVE_LEVEL).",
        );
    }
    require_irql("FltSendMessage", APC_LEVEL);
    if ClientPort.is_null() {
        bad_object("FltSendMessage", "client port variable", 0);
    }
    if SenderBuffer.is_null() {
        bad_object("FltSendMessage", "sender buffer", 0);
    }
    if !ReplyBuffer.is_null() && ReplyLength.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    // SAFETY: the caller passes null or a valid timeout.
    let timeout = unsafe { Timeout.as_ref() }.copied();
    let deadline = match timeout {
        None => None,
        Some(ticks) if ticks < 0 => Some(current().deadline_in(Duration::from_nanos(
            ticks.unsigned_abs().saturating_mul(100),
        ))),
        // Absolute times (and zero) are treated as already expired.
        Some(_) => Some(current().deadline_in(Duration::ZERO)),
    };
    // With no timeout in DriverEntry or an unload routine, the I/O manager's load or unload
    // waits on the service: bounded by the machine's unload wait limit (on Windows: a hang).
    let unload_deadline = if deadline.is_none() {
        current().load_or_unload_deadline()
    } else {
        None
    };
    let reply_capacity = if ReplyBuffer.is_null() {
        None
    } else {
        // SAFETY: non-null with a reply buffer (checked above).
        Some(unsafe { ReplyLength.read() })
    };
    // SAFETY: the caller passes `SenderBufferLength` readable bytes.
    let data = unsafe {
        core::slice::from_raw_parts(SenderBuffer.cast::<u8>(), SenderBufferLength as usize)
    }
    .to_vec();
    if injected_failure() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    let kernel = current();
    let mut flt = lock(&kernel);
    if !flt.filters.contains_key(&(Filter as usize)) {
        drop(flt);
        bad_object("FltSendMessage", "registered filter", Filter as usize);
    }
    // SAFETY: the caller passes the variable holding the client port; it is read under the
    // filter manager's lock, which FltCloseClientPort holds while it clears it.
    let client = unsafe { port_variable(ClientPort) }.load(Ordering::SeqCst) as usize;
    if client != 0 && !flt.clients.contains_key(&client) {
        // The variable still points at a client port the filter manager has freed (closed with
        // FltCloseClientPort and copied elsewhere, or never a port): Windows would dereference
        // it.
        drop(flt);
        bad_object("FltSendMessage", "client port", client);
    }
    if !flt.clients.get(&client).is_some_and(ClientRecord::is_live) {
        return STATUS_PORT_DISCONNECTED;
    }
    flt.next_message_id += 1;
    let id = flt.next_message_id;
    let record = flt.clients.get_mut(&client).expect("checked above");
    let state = if record.readers > record.delivered.len() {
        // A FilterGetMessage is pending: the message is copied into its buffer right away.
        record.delivered.push_back(UserMessage {
            id,
            reply_length: reply_capacity.map_or(0, |c| c.saturating_add(REPLY_HEADER_LEN)),
            data: data.clone(),
        });
        MessageState::Delivered
    } else {
        record.queued.push_back(id);
        MessageState::Queued
    };
    flt.messages.insert(
        id,
        MessageRecord {
            client,
            data,
            reply_capacity,
            state,
        },
    );
    // A reader of this connection may take it now (one is enough: any of them takes any
    // message); no other sender waits for it.
    if let Some(record) = flt.clients.get(&client) {
        record.readable.notify_one();
    }
    // From the send until the call returns the sender waits for its reply.
    let _blocked = super::blocked::BlockedWait::enter(&kernel);
    loop {
        let message = flt.messages.get(&id).expect("only the sender removes it");
        match (&message.state, reply_capacity) {
            (MessageState::Replied(reply), Some(capacity)) => {
                let copied = reply.len().min(capacity as usize);
                let overflow = reply.len() > capacity as usize;
                let reply = flt.messages.remove(&id).map(|m| m.state);
                drop(flt);
                if let Some(MessageState::Replied(reply)) = reply {
                    // SAFETY: the caller passes a reply buffer of `capacity` bytes and a
                    // writable length; `copied <= capacity`.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            reply.as_ptr(),
                            ReplyBuffer.cast::<u8>(),
                            copied,
                        );
                    }
                    // SAFETY: as above.
                    unsafe { ReplyLength.write(copied as ULONG) };
                }
                return if overflow {
                    STATUS_BUFFER_OVERFLOW
                } else {
                    STATUS_SUCCESS
                };
            }
            (MessageState::Delivered, None) => {
                flt.messages.remove(&id);
                return STATUS_SUCCESS;
            }
            _ => {}
        }
        if !flt.clients.get(&client).is_some_and(ClientRecord::is_live) {
            withdraw(&mut flt, client, id);
            return STATUS_PORT_DISCONNECTED;
        }
        if deadline.is_some_and(|d| kernel.has_passed(d)) {
            withdraw(&mut flt, client, id);
            return STATUS_TIMEOUT;
        }
        if unload_deadline.is_some_and(|d| kernel.has_passed(d)) {
            let delivered = matches!(flt.messages[&id].state, MessageState::Delivered);
            drop(flt);
            kernel.unload_wait_expired(
                kernel::current_driver(),
                [client, 0, 0, wfp_rs::bugcheck::unload_wait::PORT_MESSAGE],
                &format!(
                    "user mode to {} message {id} sent with FltSendMessage with no timeout",
                    if delivered { "reply to" } else { "receive" }
                ),
            );
        }
        flt = wait_on(
            &kernel,
            kernel.flt.sender(id),
            flt,
            deadline.or(unload_deadline),
        );
    }
}

/// Takes back a message the sender no longer waits for; a late reply finds no waiter.
fn withdraw(flt: &mut State, client: usize, id: u64) {
    flt.messages.remove(&id);
    if let Some(record) = flt.clients.get_mut(&client) {
        record.queued.retain(|&queued| queued != id);
    }
}

// --- unload ------------------------------------------------------------------------------------

/// What the I/O manager finds after a driver's unload routine returned: the driver must have
/// closed its communication ports and unregistered its filter. Called by
/// `Machine::finish_unload`.
///
/// What Windows does otherwise decides the outcome, and it is a bug check in every case:
///
/// - A server port left open keeps the driver's `ConnectNotify` registered: the next process
///   that connects makes the filter manager call into the unloaded driver. A client connection
///   left open does the same with `DisconnectNotify` when the process closes its handle (or
///   exits). Calling into an unloaded driver is `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`
///   (0xCE) — the same rule as a callout left registered.
/// - A filter left registered (no ports) holds a reference on the driver object, so Windows never
///   finishes the unload: the image stays mapped with the driver's state gone and the service
///   cannot be started again until a reboot. That is a leak, not a crash; but nothing reports it
///   on Windows and nothing can repair it, so the simulator stops with the same 0xCE rather than
///   let a test pass with a driver that could never be updated.
///
/// Parameters: the routine the filter manager would call (0 for a filter), the object, the kind
/// (1 server port, 2 client port, 3 filter), and how many objects are left.
pub(crate) fn check_unload(kernel: &Kernel, driver: usize, name: &str) {
    let flt = lock(kernel);
    let servers: Vec<(usize, usize, String)> = flt
        .servers
        .iter()
        .filter(|(_, s)| s.driver == driver)
        .map(|(&port, s)| (port, s.connect as usize, s.name.clone()))
        .collect();
    let clients: Vec<(usize, usize)> = flt
        .clients
        .iter()
        .filter(|(_, c)| c.driver == driver && c.accepted && c.driver_open)
        .map(|(&port, c)| (port, c.disconnect as usize))
        .collect();
    let filters: Vec<usize> = flt
        .filters
        .iter()
        .filter(|(_, f)| f.driver == driver)
        .map(|(&filter, _)| filter)
        .collect();
    drop(flt);
    if let Some((port, routine, port_name)) = servers.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [*routine, *port, 1, servers.len()],
            &format!(
                "driver {name} unloaded with {} communication server port(s) still open (\"{port_name}\"); the next connection would call its ConnectNotify in unloaded code",
                servers.len()
            ),
        );
    }
    if let Some((port, routine)) = clients.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [*routine, *port, 2, clients.len()],
            &format!(
                "driver {name} unloaded with {} client connection(s) still open; closing them would call its DisconnectNotify in unloaded code",
                clients.len()
            ),
        );
    }
    if let Some(filter) = filters.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [0, *filter, 3, filters.len()],
            &format!(
                "driver {name} unloaded with its minifilter still registered (FltUnregisterFilter was not called); Windows would keep the image loaded with its state gone, and the driver could not be started again"
            ),
        );
    }
}

// --- the user-mode side ------------------------------------------------------------------------

/// `FilterConnectCommunicationPort` by a process that is an administrator (or SYSTEM) or not.
/// Calls the driver's `ConnectNotify` on this thread, as Windows does in the connecting thread.
pub(crate) fn user_connect(
    kernel: &Arc<Kernel>,
    name: &str,
    context: &[u8],
    process: &Arc<super::process::Process>,
) -> Result<usize, NTSTATUS> {
    let administrator = process.caller() != super::irp::Caller::User;
    let (client, connect, cookie, driver, filter) = {
        let mut flt = lock(kernel);
        let Some((&server, record)) = flt.servers.iter().find(|(_, s)| s.is_named(name)) else {
            return Err(STATUS_OBJECT_NAME_NOT_FOUND);
        };
        let allowed = match record.access {
            Access::Everyone => true,
            Access::AdministratorsAndSystem(mask) => administrator && mask & FLT_PORT_CONNECT != 0,
        };
        if !allowed {
            return Err(STATUS_ACCESS_DENIED);
        }
        let connections = flt
            .clients
            .values()
            .filter(|c| c.server == server && c.user_open && c.driver_open)
            .count();
        if connections >= record.max_connections as usize {
            return Err(STATUS_CONNECTION_COUNT_LIMIT);
        }
        let (filter, driver, connect, disconnect, cookie) = (
            record.filter,
            record.driver,
            record.connect,
            record.disconnect,
            record.cookie,
        );
        let client = new_object();
        flt.clients.insert(
            client,
            ClientRecord {
                server,
                filter,
                driver,
                disconnect,
                cookie: 0,
                accepted: false,
                user_open: true,
                driver_open: true,
                notified: false,
                readers: 0,
                queued: VecDeque::new(),
                delivered: VecDeque::new(),
                readable: Arc::new(Condvar::new()),
            },
        );
        // The ConnectNotify about to run holds the filter (`FltUnregisterFilter` waits for it).
        flt.callback_started(filter);
        (client, connect, cookie, driver, filter)
    };
    // The filter manager hands the driver a kernel copy of the context.
    let mut context = context.to_vec();
    let mut connection_cookie: PVOID = core::ptr::null_mut();
    // The connect callback runs in the context of the connecting process.
    let status = super::process::with_process(process, || {
        call_driver(kernel, driver, "ConnectNotify", || {
            let buffer = if context.is_empty() {
                core::ptr::null_mut()
            } else {
                context.as_mut_ptr().cast()
            };
            // SAFETY: the driver registered this routine for a port that is open; the context
            // buffer and the cookie are locals that outlive the call.
            unsafe {
                connect(
                    client as PFLT_PORT,
                    cookie as PVOID,
                    buffer,
                    context.len() as ULONG,
                    &mut connection_cookie,
                )
            }
        })
    });
    let mut flt = lock(kernel);
    flt.callback_returned(filter);
    let result = if status < 0 {
        flt.clients.remove(&client);
        Err(status)
    } else if let Some(record) = flt.clients.get_mut(&client) {
        record.accepted = true;
        record.cookie = connection_cookie as usize;
        Ok(client)
    } else {
        // Unreachable while FltUnregisterFilter waits for this call; kept for a machine whose
        // unload gave up waiting (it stopped).
        Err(STATUS_PORT_DISCONNECTED)
    };
    drop(flt);
    kernel.flt.notify_everyone();
    result
}

/// Whether the connection is still usable from user mode.
pub(crate) fn user_is_connected(kernel: &Kernel, client: usize) -> bool {
    lock(kernel)
        .clients
        .get(&client)
        .is_some_and(ClientRecord::is_live)
}

/// `FilterGetMessage`: the next message, waiting up to `timeout` (`None`: until one comes or
/// the connection breaks). `None` on timeout or when the connection is gone.
pub(crate) fn user_get_message(
    kernel: &Kernel,
    client: usize,
    timeout: Option<Duration>,
) -> Option<UserMessage> {
    let deadline = timeout.map(|t| kernel.deadline_in(t));
    let mut flt = lock(kernel);
    let mut waiting = false;
    let result = loop {
        let State {
            clients, messages, ..
        } = &mut *flt;
        let Some(record) = clients.get_mut(&client) else {
            break None;
        };
        if let Some(message) = record.delivered.pop_front() {
            break Some(message);
        }
        if !record.is_live() {
            break None;
        }
        if let Some(id) = record.queued.pop_front() {
            let message = messages.get_mut(&id).expect("queued messages exist");
            message.state = MessageState::Delivered;
            break Some(UserMessage {
                id,
                reply_length: message
                    .reply_capacity
                    .map_or(0, |c| c.saturating_add(REPLY_HEADER_LEN)),
                data: message.data.clone(),
            });
        }
        if deadline.is_some_and(|d| kernel.has_passed(d)) {
            break None;
        }
        if !waiting {
            waiting = true;
            record.readers += 1;
            // For `wait_for_listener`; no sender waits for a reader.
            kernel.flt.changed.notify_all();
        }
        let readable = Arc::clone(&record.readable);
        flt = wait_on(kernel, &readable, flt, deadline);
    };
    if waiting && let Some(record) = flt.clients.get_mut(&client) {
        record.readers -= 1;
    }
    drop(flt);
    // `changed` is not signalled: what its waiters wait for (a reader waiting on a port, a
    // callback returning) does not come true when a read ends.
    // A sender waiting for delivery only (no reply buffer) is done now.
    if let Some(message) = &result {
        kernel.flt.sender(message.id).notify_all();
    }
    result
}

/// `FilterReplyMessage` with `reply` after the `FILTER_REPLY_HEADER`.
pub(crate) fn user_reply(
    kernel: &Kernel,
    client: usize,
    id: u64,
    reply: &[u8],
) -> Result<(), NTSTATUS> {
    let mut flt = lock(kernel);
    if !flt.clients.get(&client).is_some_and(ClientRecord::is_live) {
        return Err(STATUS_PORT_DISCONNECTED);
    }
    let Some(message) = flt.messages.get_mut(&id) else {
        return Err(STATUS_FLT_NO_WAITER_FOR_REPLY);
    };
    if message.client != client
        || message.state != MessageState::Delivered
        || message.reply_capacity.is_none()
    {
        return Err(STATUS_FLT_NO_WAITER_FOR_REPLY);
    }
    message.state = MessageState::Replied(reply.to_vec());
    drop(flt);
    kernel.flt.sender(id).notify_all();
    kernel.yield_point("FilterReplyMessage");
    Ok(())
}

/// `CloseHandle` on the connection: calls the driver's `DisconnectNotify` (on this thread) unless
/// the driver closed its end already.
pub(crate) fn user_disconnect(kernel: &Arc<Kernel>, client: usize) {
    let call = {
        let mut flt = lock(kernel);
        let Some(record) = flt.clients.get_mut(&client) else {
            return;
        };
        if !record.user_open {
            return;
        }
        record.user_open = false;
        let call = (record.accepted && record.driver_open && !record.notified).then(|| {
            record.notified = true;
            (
                record.disconnect,
                record.cookie,
                record.driver,
                record.filter,
            )
        });
        let readable = Arc::clone(&record.readable);
        if !record.driver_open {
            flt.clients.remove(&client);
        }
        if let Some((_, _, _, filter)) = call {
            flt.callback_started(filter);
        }
        (call, readable)
    };
    let (call, readable) = call;
    kernel.flt.notify_everyone();
    wake_all_readers(&[readable]);
    if let Some((disconnect, cookie, driver, _)) = call {
        call_driver(kernel, driver, "DisconnectNotify", || {
            // SAFETY: the driver registered this routine and, its connection being open, is
            // loaded; the cookie is the one its ConnectNotify returned.
            unsafe { disconnect(cookie as PVOID) }
        });
    }
    let mut flt = lock(kernel);
    if let Some((_, _, _, filter)) = call {
        flt.callback_returned(filter);
    }
    if flt
        .clients
        .get(&client)
        .is_some_and(|c| !c.user_open && !c.driver_open)
    {
        flt.clients.remove(&client);
    }
    drop(flt);
    if call.is_some() {
        // An unregistering filter may be waiting for this DisconnectNotify.
        kernel.flt.changed.notify_all();
    }
}

/// Waits until a client of port `name` has a `FilterGetMessage` pending, so a message sent now
/// is delivered at once (harness synchronisation: it waits on a state, not on time).
pub(crate) fn wait_for_listener(kernel: &Kernel, name: &str) {
    let mut flt = lock(kernel);
    loop {
        let listening = flt
            .servers
            .iter()
            .filter(|(_, s)| s.is_named(name))
            .any(|(&server, _)| {
                flt.clients
                    .values()
                    .any(|c| c.server == server && c.readers > c.delivered.len())
            });
        if listening {
            return;
        }
        flt = wait(kernel, flt, None);
    }
}
