//! Driver entry and unload.
//!
//! A driver is a function marked [`#[driver_entry]`](crate::driver_entry) that receives a
//! `&mut PassiveLevel` and a [`Driver`], and returns the driver's state. At unload, at
//! `PASSIVE_LEVEL`, the SDK
//!
//! 1. waits until no work item is queued or running,
//! 2. calls [`DriverState::unload`] and drops the state,
//! 3. waits until every [`WorkQueue`] handle is gone (and with it any work queued in step 2),
//! 4. deletes its device object.
//!
//! A driver written this way cannot forget to clean up.
//!
//! ```
//! use wfp_rs::driver::{Driver, DriverState};
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs::Status;
//!
//! struct Counter;
//! impl DriverState for Counter {}
//!
//! #[wfp_rs::driver_entry]
//! fn entry(_irql: &mut PassiveLevel, driver: &mut Driver) -> Result<Counter, Status> {
//!     wfp_rs::kd_print!("loaded from {}\n", driver.registry_path());
//!     Ok(Counter)
//! }
//!
//! let machine = wfp_rs_sim::Machine::new();
//! let loaded = machine.load_driver("counter", DriverEntry).unwrap();
//! machine.unload_driver(loaded).unwrap();
//! ```

use core::fmt;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::client::ClientIdentity;
use crate::event::{Event, EventKind};
use crate::irql::{AtPassive, DispatchLevel, PassiveLevel};
use crate::pool::{PoolBox, PoolTag};
use crate::spin_lock::SpinLock;
use crate::status::Status;
use crate::sys;
use crate::work_item::WorkQueue;

pub use crate::registry::MAX_PARAMETER_LEN;

/// The state a driver keeps from `DriverEntry` to unload.
///
/// It is shared with callbacks that may run on any processor, hence `Send + Sync`.
pub trait DriverState: Send + Sync + 'static {
    /// Called at `PASSIVE_LEVEL` when the driver starts to unload, before the SDK waits for work
    /// items to finish: the place to make waiting work return early — set a flag that stops new
    /// requests, close client connections ([`ServerPort::disconnect_all`]) so sends in progress
    /// fail at once instead of running into their timeout. The state is still shared with the
    /// work items; [`unload`](Self::unload) follows once they are done. The default does nothing.
    ///
    /// [`ServerPort::disconnect_all`]: crate::port::ServerPort::disconnect_all
    fn stopping(&self, irql: &mut PassiveLevel<'_>) {
        let _ = irql;
    }

    /// Called at `PASSIVE_LEVEL` when the driver unloads, with the state by value, so teardown
    /// can consume its parts in order (`Engine::close(self, ..)`,
    /// `CalloutRegistration::unregister(self, ..)`). The default drops the state.
    fn unload(self, irql: &mut PassiveLevel<'_>)
    where
        Self: Sized,
    {
        let _ = irql;
    }
}

impl DriverState for () {}

/// What the SDK shares between the driver object, its work items and its handles.
pub(crate) struct Shared {
    pub(crate) device: NonNull<sys::DEVICE_OBJECT>,
    /// One reference for the loaded driver plus one per live [`WorkQueue`] handle (queued work
    /// items hold one). Unload drops the driver's and waits for zero.
    pub(crate) references: AtomicUsize,
    pub(crate) drained: Event,
    /// Work items queued or running. `idle` is signalled exactly when this is zero; both change
    /// under the lock so they cannot disagree.
    jobs: SpinLock<usize>,
    idle: Event,
    /// The only client the driver's devices and ports admit ([`Driver::admit_only`]): null
    /// until set, then set once and freed at teardown, so readers never see it change; or
    /// [`open_to_all`] once a client was admitted without a restriction, which then can no
    /// longer be added (that client is already in).
    admitted: AtomicPtr<ClientIdentity>,
}

impl Shared {
    /// A token for the SDK's own bookkeeping, which runs at IRQL <= DISPATCH_LEVEL (all driver
    /// code does) and only takes short spin locks.
    fn bookkeeping_token<'t>() -> DispatchLevel<'t> {
        // SAFETY: driver code never runs above DISPATCH_LEVEL, and the token is used only to
        // take `jobs`, which raises and restores the IRQL itself.
        unsafe { DispatchLevel::new_unchecked() }
    }

    pub(crate) fn job_queued(&self) {
        let mut token = Self::bookkeeping_token();
        self.jobs.lock(&mut token, |jobs, irql| {
            *jobs += 1;
            if *jobs == 1 {
                self.idle.clear(irql);
            }
        });
    }

    pub(crate) fn job_finished(&self) {
        let mut token = Self::bookkeeping_token();
        self.jobs.lock(&mut token, |jobs, irql| {
            *jobs -= 1;
            if *jobs == 0 {
                self.idle.set(irql);
            }
        });
    }

    /// Waits until no work item is queued or running.
    fn wait_for_jobs(&self, irql: &mut PassiveLevel<'_>) {
        while self.jobs.lock(&mut *irql, |jobs, _| *jobs) != 0 {
            self.idle.wait(irql);
        }
    }

    pub(crate) fn acquire(&self) {
        self.references.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn release(&self) {
        if self.references.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: all Rust code in a driver runs at IRQL <= DISPATCH_LEVEL, where KeSetEvent
            // is allowed; no token is at hand in `Drop`, which is where this runs.
            let irql = unsafe { DispatchLevel::new_unchecked() };
            self.drained.set(&irql);
        }
    }
}

/// The block the SDK keeps in the driver object extension. `repr(C)` puts `shared` first for
/// every `D`, so code that does not know `D` can still find it.
#[repr(C)]
struct Extension<D> {
    shared: Shared,
    state: MaybeUninit<D>,
}

/// Identifies the SDK's driver object extension (`ClientIdentificationAddress`): any address
/// unique to this crate will do.
static EXTENSION_ID: u8 = 0;

fn extension_id() -> sys::PVOID {
    (&raw const EXTENSION_ID).cast_mut().cast()
}

/// A new [`WorkQueue`] handle for an SDK driver, found from its driver object (for the
/// simulator harness, which has no access to the driver's state).
#[cfg(wfp_sim)]
pub(crate) fn work_queue_of(object: *mut sys::DRIVER_OBJECT) -> Option<WorkQueue> {
    // SAFETY: the harness passes the object of a loaded driver; a driver that does not use the
    // SDK glue simply has no extension under this id.
    let extension = unsafe { sys::IoGetDriverObjectExtension(object, extension_id()) };
    // SAFETY: the SDK's extension starts with its `Shared` block (repr(C)), initialised before
    // DriverEntry returned, and alive until unload.
    NonNull::new(extension.cast::<Shared>())
        .map(|shared| WorkQueue::new(unsafe { shared.as_ref() }))
}

/// What the SDK's unload glue of driver `object` waits for when it waits on the event at
/// `waited_on` (for the simulator's report when a wait at unload gives up). `None` if the
/// driver does not use the SDK glue or the event is not one of its unload events.
#[cfg(wfp_sim)]
pub(crate) fn unload_wait_reason(
    object: *mut sys::DRIVER_OBJECT,
    waited_on: usize,
) -> Option<std::string::String> {
    // SAFETY: as in `work_queue_of`; unload has not torn the extension down while it waits.
    let extension = unsafe { sys::IoGetDriverObjectExtension(object, extension_id()) };
    let shared = NonNull::new(extension.cast::<Shared>())?;
    // SAFETY: the extension starts with the `Shared` block, alive until unload's teardown, which
    // is the wait this reports on.
    let shared = unsafe { shared.as_ref() };
    if waited_on == shared.idle.address() {
        Some(
            "work items queued through the driver's WorkQueue that have not finished (the SDK \
             waits for them before DriverState::unload)"
                .into(),
        )
    } else if waited_on == shared.drained.address() {
        let handles = shared.references.load(Ordering::Relaxed);
        Some(std::format!(
            "{handles} WorkQueue handle(s) (or queued work items holding one) still alive (the SDK \
             waits for every handle to drop before it deletes the device)"
        ))
    } else {
        None
    }
}

/// Runs `f` with the [`Driver`] handle of a loaded SDK driver (for the simulator harness, which
/// runs test code as if it were the driver's). `None` for drivers without the SDK's extension.
#[cfg(wfp_sim)]
pub(crate) fn with_driver_of<R>(
    object: *mut sys::DRIVER_OBJECT,
    registry_path: &sys::UNICODE_STRING,
    irql: &mut PassiveLevel<'_>,
    f: impl FnOnce(&mut PassiveLevel<'_>, &mut Driver<'_>) -> R,
) -> Option<R> {
    // SAFETY: as in `work_queue_of`.
    let extension = unsafe { sys::IoGetDriverObjectExtension(object, extension_id()) };
    let shared = NonNull::new(extension.cast::<Shared>())?;
    // SAFETY: the extension starts with the `Shared` block, alive while the driver is loaded.
    let shared = unsafe { shared.as_ref() };
    let mut driver = Driver {
        object: NonNull::new(object)?,
        registry_path,
        shared,
    };
    Some(f(irql, &mut driver))
}

/// Runs `f` with the client identity the driver of `object` admits (`None`: it did not restrict
/// its clients, or it is not an SDK driver).
pub(crate) fn with_admitted_client<R>(
    object: *mut sys::DRIVER_OBJECT,
    f: impl FnOnce(Option<&ClientIdentity>) -> R,
) -> R {
    if object.is_null() {
        return f(None);
    }
    // SAFETY: the object of a loaded driver (a device's or a port's owner, alive while requests
    // reach them); a driver without the SDK glue has no extension under this id.
    let extension = unsafe { sys::IoGetDriverObjectExtension(object, extension_id()) };
    let Some(shared) = NonNull::new(extension.cast::<Shared>()) else {
        return f(None);
    };
    // SAFETY: the extension starts with the `Shared` block, alive until unload's teardown,
    // which comes after every device and port of the driver is gone.
    let slot = &unsafe { shared.as_ref() }.admitted;
    // A client is about to be let in: an unrestricted driver stays so (see `admit_only`).
    let admitted = match slot.compare_exchange(
        core::ptr::null_mut(),
        open_to_all(),
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => open_to_all(),
        Err(published) => published,
    };
    if admitted == open_to_all() {
        return f(None);
    }
    // SAFETY: the identity `admit_only` published, never changed and freed only at teardown.
    f(unsafe { admitted.as_ref() })
}

/// The value of `Shared::admitted` once a client was admitted without a restriction: never an
/// allocation (dangling, aligned), so never read or freed.
fn open_to_all() -> *mut ClientIdentity {
    NonNull::dangling().as_ptr()
}

/// The driver being initialised, as `DriverEntry` sees it.
pub struct Driver<'a> {
    object: NonNull<sys::DRIVER_OBJECT>,
    registry_path: &'a sys::UNICODE_STRING,
    shared: &'a Shared,
}

impl Driver<'_> {
    /// A handle for queueing work items to system worker threads.
    pub fn work_queue(&self) -> WorkQueue {
        WorkQueue::new(self.shared)
    }

    /// The driver's registry key (`\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services\<name>`).
    pub fn registry_path(&self) -> UnicodeStr<'_> {
        UnicodeStr(self.registry_path)
    }

    /// The raw driver object, for calls this crate does not wrap.
    pub fn raw_object(&self) -> *mut sys::DRIVER_OBJECT {
        self.object.as_ptr()
    }

    /// The unnamed device object the SDK created for this driver (WFP callout registration and
    /// work items need one).
    pub fn raw_device(&self) -> *mut sys::DEVICE_OBJECT {
        self.shared.device.as_ptr()
    }

    /// From now on, only processes that match `identity` may open the driver's SDK devices
    /// ([`ControlDevice`](crate::control::ControlDevice),
    /// [`InvertedQueue`](crate::inverted::InvertedQueue)) or connect to its
    /// [`ServerPort`](crate::port::ServerPort)s; every other process gets `STATUS_ACCESS_DENIED`
    /// (see [`crate::client`]). Call it in `DriverEntry`, before creating them. It can be set
    /// once: a second call fails with `STATUS_INVALID_DEVICE_STATE` (a restriction never loosens
    /// while the driver runs), and so does a call after any process has opened one of them or
    /// connected to a port without the restriction (a port is open to connections as soon as
    /// it is created): that process is already in, so the restriction would be a false
    /// promise. `STATUS_INSUFFICIENT_RESOURCES` without pool.
    pub fn admit_only(
        &self,
        irql: &impl AtPassive,
        identity: ClientIdentity,
    ) -> Result<(), Status> {
        let block = PoolBox::into_raw(PoolBox::try_new(identity, PoolTag::SDK, irql)?);
        let published = self.shared.admitted.compare_exchange(
            core::ptr::null_mut(),
            block.as_ptr(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if published.is_err() {
            // SAFETY: allocated just above with the SDK tag, never published.
            drop(unsafe { PoolBox::from_raw(block, PoolTag::SDK) });
            return Err(Status::INVALID_DEVICE_STATE);
        }
        Ok(())
    }

    /// Reads the string value `name` of the driver's `Parameters` key
    /// (`<registry path>\Parameters`), where an installer puts the driver's configuration:
    /// `Ok(None)` if the key or the value does not exist. A `REG_SZ` or `REG_EXPAND_SZ` value
    /// (not expanded), without its terminating NULs. Fails with `STATUS_OBJECT_TYPE_MISMATCH` for
    /// another type, `STATUS_BUFFER_OVERFLOW` for a value longer than [`MAX_PARAMETER_LEN`]
    /// units, `STATUS_INVALID_PARAMETER` for an empty name (or one over 255 bytes) or text that is
    /// not UTF-16. Wraps `ZwOpenKey` and `ZwQueryValueKey` (`KeyValuePartialInformation`).
    ///
    /// ```
    /// use wfp_rs::driver::Driver;
    /// use wfp_rs::irql::PassiveLevel;
    /// use wfp_rs::Status;
    ///
    /// #[wfp_rs::driver_entry]
    /// fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<(), Status> {
    ///     let mode = driver.parameter(irql, "Mode")?;
    ///     wfp_rs::kd_print!("mode: {}\n", mode.as_deref().unwrap_or("(default)"));
    ///     Ok(())
    /// }
    /// let machine = wfp_rs_sim::Machine::new();
    /// machine.set_driver_parameter("doc", "Mode", "strict");
    /// let loaded = machine.load_driver("doc", DriverEntry).unwrap();
    /// assert!(machine.debug_output().iter().any(|line| line == "mode: strict\n"));
    /// machine.unload_driver(loaded).unwrap();
    /// ```
    pub fn parameter(
        &self,
        irql: &impl AtPassive,
        name: &str,
    ) -> Result<Option<alloc::string::String>, Status> {
        crate::registry::read_string(irql, UnicodeStr(self.registry_path).as_utf16(), name)
    }

    /// The client identity set with [`admit_only`](Self::admit_only), if any.
    pub fn admitted(&self) -> Option<&ClientIdentity> {
        let admitted = self.shared.admitted.load(Ordering::Acquire);
        if admitted == open_to_all() {
            return None;
        }
        // SAFETY: null or the published identity, unchanged until teardown, which comes after
        // every `Driver` handle is gone.
        unsafe { admitted.as_ref() }
    }
}

impl fmt::Debug for Driver<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("registry_path", &self.registry_path())
            .finish()
    }
}

/// A borrowed `UNICODE_STRING`, displayed as text.
#[derive(Clone, Copy)]
pub struct UnicodeStr<'a>(&'a sys::UNICODE_STRING);

impl UnicodeStr<'_> {
    /// The UTF-16 code units.
    pub fn as_utf16(&self) -> &[u16] {
        if self.0.Buffer.is_null() {
            return &[];
        }
        // SAFETY: a UNICODE_STRING from the kernel holds `Length` bytes at `Buffer`, valid for
        // the borrow.
        unsafe { core::slice::from_raw_parts(self.0.Buffer, usize::from(self.0.Length / 2)) }
    }
}

impl fmt::Display for UnicodeStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in char::decode_utf16(self.as_utf16().iter().copied()) {
            fmt::Write::write_char(f, c.unwrap_or(char::REPLACEMENT_CHARACTER))?;
        }
        Ok(())
    }
}

impl fmt::Debug for UnicodeStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// The body of the `DriverEntry` that `#[driver_entry]` generates.
///
/// # Safety
///
/// Only the generated `DriverEntry` may call this, with the arguments the I/O manager passed.
///
/// Generic over the entry function (a function item, zero-sized) rather than taking a function
/// pointer: the call to the driver's function is then a direct call, which the stack check
/// (wfp-rs-stack) follows and counts; through a pointer its depth would be unbounded.
#[doc(hidden)]
pub unsafe fn __run_driver_entry<D: DriverState>(
    driver_object: *mut sys::DRIVER_OBJECT,
    registry_path: *const sys::UNICODE_STRING,
    entry: impl FnOnce(&mut PassiveLevel<'_>, &mut Driver<'_>) -> Result<D, Status>,
) -> sys::NTSTATUS {
    const { assert!(core::mem::align_of::<Extension<D>>() <= crate::pool::POOL_ALIGNMENT) };
    // SAFETY: the I/O manager calls DriverEntry at PASSIVE_LEVEL; the token lives for this call.
    let mut irql = unsafe { PassiveLevel::new_unchecked() };
    let (Some(object), Some(registry_path)) =
        // SAFETY: the I/O manager passes a valid registry path for the duration of the call.
        (NonNull::new(driver_object), unsafe { registry_path.as_ref() })
    else {
        return Status::INVALID_PARAMETER.raw();
    };
    // Before any of the driver's code, which may hash process images (`pend::app_hash`).
    if let Err(status) = crate::pend::draw_app_secret(&irql) {
        return failure(status);
    }
    match start::<D>(&mut irql, object, registry_path, entry) {
        Ok(()) => 0,
        Err(status) => failure(status),
    }
}

/// What `DriverEntry` returns when the load fails with `status`.
fn failure(status: Status) -> sys::NTSTATUS {
    // A success code would tell the I/O manager the driver loaded after it cleaned up.
    if status.raw() >= 0 {
        Status::UNSUCCESSFUL.raw()
    } else {
        status.raw()
    }
}

fn start<D: DriverState>(
    irql: &mut PassiveLevel<'_>,
    object: NonNull<sys::DRIVER_OBJECT>,
    registry_path: &sys::UNICODE_STRING,
    entry: impl FnOnce(&mut PassiveLevel<'_>, &mut Driver<'_>) -> Result<D, Status>,
) -> Result<(), Status> {
    // The driver's own function runs on top of this frame, so the setup's temporaries live in
    // a frame of their own that has returned by then (`cargo xtask stack` measures the path).
    let extension = prepare_extension::<D>(irql, object)?;
    // SAFETY: initialised by `prepare_extension` (all but the state); only this thread uses it
    // until DriverEntry returns.
    let extension = unsafe { &mut *extension.as_ptr() };

    let mut driver = Driver {
        object,
        registry_path,
        shared: &extension.shared,
    };
    // Requests for devices the driver creates in `entry` (an `InvertedQueue`'s) reach the SDK's
    // dispatch routine from the start.
    crate::dispatch::install(object);
    match run_entry(irql, &mut driver, &mut extension.state, entry) {
        Ok(()) => {
            // SAFETY: `object` is our driver object; setting the unload routine during
            // DriverEntry is how a driver becomes unloadable.
            unsafe { (*object.as_ptr()).DriverUnload = Some(unload_trampoline::<D>) };
            Ok(())
        }
        Err(status) => {
            // SAFETY: the state was never written; the shared part is torn down exactly once.
            unsafe { tear_down(irql, &mut extension.shared) };
            Err(status)
        }
    }
}

/// Calls the driver's entry function: a frame of its own, so that only this small frame of the
/// SDK's lies under the driver's function. It holds one temporary, the entry function's result,
/// which [`store_state`] then moves into the extension once the driver's function has returned.
#[inline(never)]
fn run_entry<D>(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    state: &mut MaybeUninit<D>,
    entry: impl FnOnce(&mut PassiveLevel<'_>, &mut Driver<'_>) -> Result<D, Status>,
) -> Result<(), Status> {
    store_state(entry(irql, driver), state)
}

/// Moves the state out of the entry function's result into `state`. Not inlined into
/// [`run_entry`]: in a debug build each move of the state is a copy with a stack slot of its
/// own (`MaybeUninit::write` alone makes several), and here they are in a frame that is only
/// on the stack after the driver's function has returned.
#[inline(never)]
fn store_state<D>(result: Result<D, Status>, state: &mut MaybeUninit<D>) -> Result<(), Status> {
    match result {
        Ok(value) => {
            state.write(value);
            Ok(())
        }
        Err(status) => Err(status),
    }
}

/// Allocates the driver object extension and creates the SDK's device and events in it; the
/// state is left uninitialised, for the driver's entry function to provide.
#[inline(never)]
fn prepare_extension<D: DriverState>(
    irql: &mut PassiveLevel<'_>,
    object: NonNull<sys::DRIVER_OBJECT>,
) -> Result<NonNull<Extension<D>>, Status> {
    let mut raw_extension: sys::PVOID = core::ptr::null_mut();
    // SAFETY: `object` is our driver object; the out pointer is a local. The extension is freed
    // by the I/O manager with the driver object.
    let status = unsafe {
        sys::IoAllocateDriverObjectExtension(
            object.as_ptr(),
            extension_id(),
            core::mem::size_of::<Extension<D>>() as u32,
            &mut raw_extension,
        )
    };
    Status::from_ntstatus(status)?;
    let extension =
        NonNull::new(raw_extension.cast::<Extension<D>>()).ok_or(Status::INSUFFICIENT_RESOURCES)?;

    let mut device: *mut sys::DEVICE_OBJECT = core::ptr::null_mut();
    // SAFETY: an unnamed device for our driver object; the out pointer is a local.
    let status = unsafe {
        sys::IoCreateDevice(
            object.as_ptr(),
            0,
            core::ptr::null(),
            sys::FILE_DEVICE_NETWORK,
            sys::FILE_DEVICE_SECURE_OPEN,
            sys::FALSE,
            &mut device,
        )
    };
    Status::from_ntstatus(status)?;
    let device = NonNull::new(device).ok_or(Status::UNSUCCESSFUL)?;
    let events = Event::try_new(EventKind::Notification, false, irql).and_then(|drained| {
        Ok((
            drained,
            Event::try_new(EventKind::Notification, true, irql)?,
        ))
    });
    let (drained, idle) = match events {
        Ok(events) => events,
        Err(status) => {
            // SAFETY: the device was created above and nothing else refers to it yet.
            unsafe { sys::IoDeleteDevice(device.as_ptr()) };
            return Err(status);
        }
    };
    // SAFETY: the extension is a fresh, suitably aligned block of the right size (alignment is
    // asserted at compile time against the pool's 16 bytes); the projection creates no reference.
    let shared = unsafe { &raw mut (*extension.as_ptr()).shared };
    // SAFETY: valid for writes (above); only the shared part is written, in place, and the state
    // stays uninitialised (`MaybeUninit`).
    unsafe {
        shared.write(Shared {
            device,
            references: AtomicUsize::new(1),
            drained,
            jobs: SpinLock::new(0),
            idle,
            admitted: AtomicPtr::new(core::ptr::null_mut()),
        })
    };
    Ok(extension)
}

/// Drops the driver's own reference, waits until every work item and handle is gone, deletes the
/// device, and drops the shared block.
///
/// # Safety
///
/// Called once, at PASSIVE_LEVEL, after the driver state is gone.
unsafe fn tear_down(irql: &mut PassiveLevel<'_>, shared: &mut Shared) {
    shared.release();
    shared.drained.wait(irql);
    // SAFETY: every reference is gone, so no work item can still use the device.
    unsafe { sys::IoDeleteDevice(shared.device.as_ptr()) };
    let admitted = shared
        .admitted
        .swap(core::ptr::null_mut(), Ordering::AcqRel);
    if let Some(admitted) = NonNull::new(admitted).filter(|_| admitted != open_to_all()) {
        // SAFETY: published by `admit_only` (SDK tag); the driver's devices and ports, the only
        // readers, are gone, and the swap makes this the one release.
        drop(unsafe { PoolBox::from_raw(admitted, PoolTag::SDK) });
    }
    // SAFETY: nothing refers to `shared` any more; it is dropped in place exactly once.
    unsafe { core::ptr::drop_in_place(shared) };
}

unsafe extern "system" fn unload_trampoline<D: DriverState>(
    driver_object: *mut sys::DRIVER_OBJECT,
) {
    // SAFETY: the I/O manager calls the unload routine at PASSIVE_LEVEL.
    let mut irql = unsafe { PassiveLevel::new_unchecked() };
    // SAFETY: the extension was allocated and initialised in `start` for this driver object.
    let extension = unsafe { sys::IoGetDriverObjectExtension(driver_object, extension_id()) };
    let Some(extension) = NonNull::new(extension.cast::<Extension<D>>()) else {
        return;
    };
    // SAFETY: `start` initialised both parts before it set this unload routine, and unload runs
    // once, when no other driver code runs on behalf of the I/O manager.
    let extension = unsafe { &mut *extension.as_ptr() };
    {
        // SAFETY: the state was written in `start` and is read out only below, after this
        // shared borrow ends.
        let state = unsafe { extension.state.assume_init_ref() };
        state.stopping(&mut irql);
    }
    extension.shared.wait_for_jobs(&mut irql);
    {
        // SAFETY: the state was written in `start` and is read out exactly once, here.
        let state = unsafe { extension.state.assume_init_read() };
        state.unload(&mut irql);
    }
    // SAFETY: the state is gone; this is the single teardown.
    unsafe { tear_down(&mut irql, &mut extension.shared) };
}

/// Exports the `DriverEntry` that the `#[driver_entry]` attribute asks for. On Windows it is the
/// image's entry point (`#[no_mangle]`); in the simulator it is an ordinary function that
/// `wfp_rs_sim::Machine::load_driver` calls, so several drivers can live
/// in one test binary.
#[cfg(wfp_nt)]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_driver_entry {
    ($entry:path) => {
        /// The driver's entry point, generated by `#[wfp_rs::driver_entry]`.
        ///
        /// # Safety
        ///
        /// Called by the I/O manager only.
        #[allow(non_snake_case)]
        #[unsafe(no_mangle)]
        pub unsafe extern "system" fn DriverEntry(
            driver_object: *mut $crate::sys::DRIVER_OBJECT,
            registry_path: *const $crate::sys::UNICODE_STRING,
        ) -> $crate::sys::NTSTATUS {
            // SAFETY: the I/O manager passes its own arguments through unchanged.
            unsafe { $crate::driver::__run_driver_entry(driver_object, registry_path, $entry) }
        }
    };
}

#[cfg(wfp_sim)]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_driver_entry {
    ($entry:path) => {
        /// The driver's entry point, generated by `#[wfp_rs::driver_entry]`; load it with
        /// `wfp_rs_sim::Machine::load_driver`.
        ///
        /// # Safety
        ///
        /// Called by the (simulated) I/O manager only.
        #[allow(non_snake_case)]
        pub unsafe extern "system" fn DriverEntry(
            driver_object: *mut $crate::sys::DRIVER_OBJECT,
            registry_path: *const $crate::sys::UNICODE_STRING,
        ) -> $crate::sys::NTSTATUS {
            // SAFETY: the I/O manager passes its own arguments through unchanged.
            unsafe { $crate::driver::__run_driver_entry(driver_object, registry_path, $entry) }
        }
    };
}
