//! The I/O manager: driver and device objects, driver object extensions, and work items run by
//! system worker threads at `PASSIVE_LEVEL`.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::collections::hash_map::Entry;
use std::sync::Arc;

use super::bugcheck::stop;
use super::pool::{kernel_allocate, kernel_free};
use super::state::{
    DeviceRecord, Kernel, QueuedWork, Routine, RoutineKind, THREAD, WorkItemRecord, WorkItemState,
    current, current_driver, irql, require_irql, thread_id,
};
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::sys::*;

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_INSUFFICIENT_RESOURCES: NTSTATUS = 0xC000_009Au32 as i32;
const STATUS_OBJECT_NAME_COLLISION: NTSTATUS = 0xC000_0035u32 as i32;
const STATUS_INVALID_PARAMETER: NTSTATUS = 0xC000_000Du32 as i32;

/// Pool tag the simulated I/O manager charges work items with ("IoWk").
pub(crate) const WORK_ITEM_TAG: u32 = u32::from_le_bytes(*b"IoWk");
/// Size of the simulated IO_WORKITEM block (the real one is opaque; this is its x64 size).
const WORK_ITEM_SIZE: usize = 0x58;

pub(super) fn read_unicode(name: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: callers pass null or a valid UNICODE_STRING whose buffer holds `Length` bytes.
    let name = unsafe { name.as_ref() }?;
    let chars = usize::from(name.Length / 2);
    if chars == 0 || name.Buffer.is_null() {
        return Some(String::new());
    }
    // SAFETY: see above.
    let units = unsafe { core::slice::from_raw_parts(name.Buffer, chars) };
    Some(String::from_utf16_lossy(units))
}

/// `IoCreateDevice`.
///
/// # Safety
///
/// `DriverObject` must be the caller's driver object; `DeviceObject` writable; `DeviceName`
/// null or valid.
pub unsafe extern "system" fn IoCreateDevice(
    DriverObject: *mut DRIVER_OBJECT,
    DeviceExtensionSize: ULONG,
    DeviceName: *const UNICODE_STRING,
    DeviceType: DEVICE_TYPE,
    DeviceCharacteristics: ULONG,
    Exclusive: BOOLEAN,
    DeviceObject: *mut *mut DEVICE_OBJECT,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = Exclusive;
    require_irql("IoCreateDevice", PASSIVE_LEVEL);
    let name = read_unicode(DeviceName);
    let kernel = current();
    let mut state = kernel.lock();
    if !state.drivers.contains_key(&(DriverObject as usize)) {
        drop(state);
        return STATUS_INVALID_PARAMETER;
    }
    if name.is_some() && state.devices.values().any(|d| d.name == name) {
        return STATUS_OBJECT_NAME_COLLISION;
    }
    // SAFETY: DEVICE_OBJECT is plain data (integers and raw pointers), valid when zeroed.
    // `Box` allocates with the type's alignment: 16 bytes, as `DECLSPEC_ALIGN` in wdm.h and
    // the pool the I/O manager takes device objects from give on x64.
    let mut object: Box<DEVICE_OBJECT> = unsafe { Box::new_zeroed().assume_init() };
    let extension = if DeviceExtensionSize > 0 {
        let size = DeviceExtensionSize as usize;
        // SAFETY: non-zero size, pool alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(super::pool::layout(size)) };
        if ptr.is_null() {
            return STATUS_INSUFFICIENT_RESOURCES;
        }
        Some((ptr as usize, size))
    } else {
        None
    };
    object.Type = 3; // IO_TYPE_DEVICE
    object.Size = core::mem::size_of::<DEVICE_OBJECT>() as u16;
    object.DriverObject = DriverObject;
    object.DeviceType = DeviceType;
    object.Characteristics = DeviceCharacteristics;
    object.StackSize = 1;
    object.DeviceExtension = extension.map_or(core::ptr::null_mut(), |(p, _)| p as PVOID);
    let driver = state
        .drivers
        .get_mut(&(DriverObject as usize))
        .expect("checked above");
    object.NextDevice = driver.object.DeviceObject;
    let raw = &mut *object as *mut DEVICE_OBJECT;
    driver.object.DeviceObject = raw;
    state.devices.insert(
        raw as usize,
        DeviceRecord {
            driver: DriverObject as usize,
            object,
            extension,
            name,
        },
    );
    // SAFETY: the caller passes a writable out pointer.
    unsafe { DeviceObject.write(raw) };
    STATUS_SUCCESS
}

/// `IoDeleteDevice`.
///
/// # Safety
///
/// `DeviceObject` must be a device the caller created and has not deleted.
pub unsafe extern "system" fn IoDeleteDevice(DeviceObject: *mut DEVICE_OBJECT) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoDeleteDevice", PASSIVE_LEVEL);
    let kernel = current();
    let mut state = kernel.lock();
    let Some(record) = state.devices.remove(&(DeviceObject as usize)) else {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0xCA, DeviceObject as usize, 0, 0],
            "IoDeleteDevice on a device object that does not exist (deleted twice?)",
        );
    };
    if let Some(driver) = state.drivers.get_mut(&record.driver) {
        // Unlink from the driver's device list.
        let after = record.object.NextDevice;
        if driver.object.DeviceObject == DeviceObject {
            driver.object.DeviceObject = after;
        } else {
            let mut current = driver.object.DeviceObject;
            while !current.is_null() {
                // SAFETY: the list links device objects owned by `state.devices`, all valid while
                // the state lock is held.
                let device = unsafe { &mut *current };
                if device.NextDevice == DeviceObject {
                    device.NextDevice = after;
                    break;
                }
                current = device.NextDevice;
            }
        }
    }
    if let Some((ptr, size)) = record.extension {
        // SAFETY: allocated in IoCreateDevice with this size.
        unsafe { std::alloc::dealloc(ptr as *mut u8, super::pool::layout(size)) };
    }
}

/// `IoAllocateDriverObjectExtension`.
///
/// # Safety
///
/// `DriverObject` must be the caller's; `DriverObjectExtension` writable.
pub unsafe extern "system" fn IoAllocateDriverObjectExtension(
    DriverObject: *mut DRIVER_OBJECT,
    ClientIdentificationAddress: PVOID,
    DriverObjectExtensionSize: ULONG,
    DriverObjectExtension: *mut PVOID,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoAllocateDriverObjectExtension", APC_LEVEL);
    // SAFETY: the caller passes a writable out pointer.
    unsafe { DriverObjectExtension.write(core::ptr::null_mut()) };
    let kernel = current();
    let id = ClientIdentificationAddress as usize;
    {
        let state = kernel.lock();
        let Some(driver) = state.drivers.get(&(DriverObject as usize)) else {
            return STATUS_INVALID_PARAMETER;
        };
        if driver.extensions.iter().any(|&(client, _, _)| client == id) {
            return STATUS_OBJECT_NAME_COLLISION;
        }
    }
    let size = DriverObjectExtensionSize as usize;
    let ptr = kernel_allocate(size, u32::from_le_bytes(*b"DrvX"), 0);
    if ptr.is_null() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    let mut state = kernel.lock();
    let driver = state
        .drivers
        .get_mut(&(DriverObject as usize))
        .expect("checked above");
    driver.extensions.push((id, ptr as usize, size));
    // SAFETY: as above.
    unsafe { DriverObjectExtension.write(ptr.cast()) };
    STATUS_SUCCESS
}

/// `IoGetDriverObjectExtension`.
///
/// # Safety
///
/// `DriverObject` must be valid.
pub unsafe extern "system" fn IoGetDriverObjectExtension(
    DriverObject: *mut DRIVER_OBJECT,
    ClientIdentificationAddress: PVOID,
) -> PVOID {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoGetDriverObjectExtension", APC_LEVEL);
    let kernel = current();
    let state = kernel.lock();
    state
        .drivers
        .get(&(DriverObject as usize))
        .and_then(|d| {
            d.extensions
                .iter()
                .find(|e| e.0 == ClientIdentificationAddress as usize)
        })
        .map_or(core::ptr::null_mut(), |&(_, ptr, _)| ptr as PVOID)
}

/// `IoAllocateWorkItem`. The item is pool memory charged to the calling driver, so one that is
/// never freed shows up as a pool leak at unload.
///
/// # Safety
///
/// `DeviceObject` must be a device of the calling driver.
pub unsafe extern "system" fn IoAllocateWorkItem(
    DeviceObject: *mut DEVICE_OBJECT,
) -> *mut IO_WORKITEM {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoAllocateWorkItem", DISPATCH_LEVEL);
    let kernel = current();
    let driver = {
        let state = kernel.lock();
        match state.devices.get(&(DeviceObject as usize)) {
            Some(device) => device.driver,
            None => {
                drop(state);
                stop(
                    BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
                    [0xCA, DeviceObject as usize, 0, 0],
                    "IoAllocateWorkItem with a pointer that is not a device object",
                );
            }
        }
    };
    let charged_to = if current_driver() != 0 {
        current_driver()
    } else {
        driver
    };
    let item = kernel_allocate(WORK_ITEM_SIZE, WORK_ITEM_TAG, charged_to);
    if item.is_null() {
        return core::ptr::null_mut();
    }
    kernel.lock().work_items.insert(
        item as usize,
        WorkItemRecord {
            driver,
            device: DeviceObject as usize,
            state: WorkItemState::Idle,
        },
    );
    item.cast()
}

/// `IoQueueWorkItem`. Queueing an item that is already queued stops the machine with
/// `WORKER_INVALID`; an item whose routine is running may be queued again (the system dequeued
/// it before calling the routine).
///
/// # Safety
///
/// `IoWorkItem` must come from `IoAllocateWorkItem`; `Context` must stay valid until the routine
/// runs.
pub unsafe extern "system" fn IoQueueWorkItem(
    IoWorkItem: *mut IO_WORKITEM,
    WorkerRoutine: PIO_WORKITEM_ROUTINE,
    QueueType: WORK_QUEUE_TYPE,
    Context: PVOID,
) {
    let _kernel = super::state::KernelCode::enter();
    let _ = QueueType;
    require_irql("IoQueueWorkItem", DISPATCH_LEVEL);
    let kernel = current();
    let mut state = kernel.lock();
    let Some(record) = state.work_items.get_mut(&(IoWorkItem as usize)) else {
        drop(state);
        stop(
            BugCheckCode::WORKER_INVALID,
            [3, IoWorkItem as usize, 0, 0],
            "IoQueueWorkItem with a work item that was freed or never allocated",
        );
    };
    if record.state == WorkItemState::Queued {
        drop(state);
        stop(
            BugCheckCode::WORKER_INVALID,
            [1, IoWorkItem as usize, 0, 0],
            "a work item was queued while it was already queued",
        );
    }
    let Some(routine) = WorkerRoutine else {
        drop(state);
        stop(
            BugCheckCode::WORKER_INVALID,
            [7, IoWorkItem as usize, 0, 0],
            "IoQueueWorkItem without a routine",
        );
    };
    record.state = WorkItemState::Queued;
    let device = record.device;
    state.work_items_queued += 1;
    state.queue.push_back(QueuedWork {
        item: IoWorkItem as usize,
        routine,
        device,
        context: Context as usize,
    });
    drop(state);
    kernel.work_ready.notify_one();
    kernel.yield_point("IoQueueWorkItem");
}

/// `IoFreeWorkItem`. Freeing an item that is queued, or whose routine runs on another thread,
/// stops the machine with `WORKER_INVALID`; the routine may free its own item.
///
/// # Safety
///
/// `IoWorkItem` must come from `IoAllocateWorkItem`.
pub unsafe extern "system" fn IoFreeWorkItem(IoWorkItem: *mut IO_WORKITEM) {
    let _kernel = super::state::KernelCode::enter();
    require_irql("IoFreeWorkItem", DISPATCH_LEVEL);
    let kernel = current();
    let mut state = kernel.lock();
    let Some(record) = state.work_items.get(&(IoWorkItem as usize)) else {
        drop(state);
        stop(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                wfp_rs::bugcheck::verifier::DOUBLE_FREE,
                0,
                IoWorkItem as usize,
                0,
            ],
            "IoFreeWorkItem with a work item that was already freed or never allocated",
        );
    };
    match record.state {
        WorkItemState::Queued => {
            stop(
                BugCheckCode::WORKER_INVALID,
                [2, IoWorkItem as usize, work_routine(&state, IoWorkItem), 0],
                "a work item was freed while it was still queued",
            );
        }
        WorkItemState::Running(thread) if thread != thread_id() => {
            drop(state);
            stop(
                BugCheckCode::WORKER_INVALID,
                [0, IoWorkItem as usize, 0, 0],
                "a work item was freed by another thread while its routine was running",
            );
        }
        _ => {}
    }
    state.work_items.remove(&(IoWorkItem as usize));
    drop(state);
    kernel_free(IoWorkItem.cast());
}

/// The routine a queued item will run, for bug check parameters.
fn work_routine(state: &super::state::State, item: *mut IO_WORKITEM) -> usize {
    state
        .queue
        .iter()
        .find(|q| q.item == item as usize)
        .map_or(0, |q| q.routine as usize)
}

/// A system worker thread: runs queued work item routines at `PASSIVE_LEVEL` and checks that
/// each returns at `PASSIVE_LEVEL`.
pub(crate) fn worker_thread(kernel: Arc<Kernel>) {
    loop {
        let (work, driver) = {
            let state = kernel.lock();
            let (mut state, _) = kernel.wait_while(
                &kernel.state,
                state,
                &kernel.work_ready,
                None,
                "worker: waits for a work item",
                |state| !state.shutdown && (state.hold_work_items || state.queue.is_empty()),
            );
            if state.shutdown {
                return;
            }
            let work = state.queue.pop_front().expect("the wait saw a queued item");
            // Taken off the queue and counted as running under the same lock, so a waiter
            // never sees the item in neither place.
            let record = state
                .work_items
                .get_mut(&work.item)
                .expect("queued item is allocated");
            record.state = WorkItemState::Running(thread_id());
            let driver = record.driver;
            *state.running_work.entry(driver).or_insert(0) += 1;
            (work, driver)
        };
        super::state::with_context(&kernel, PASSIVE_LEVEL, driver, || {
            THREAD.with(|t| t.work_item.set(work.item));
            let routine = Routine::new(RoutineKind::WorkItem, driver, work.routine as usize);
            super::state::with_routine(routine, || {
                // SAFETY: the driver queued this routine with this context through
                // IoQueueWorkItem, whose contract makes both valid until the routine runs.
                unsafe { (work.routine)(work.device as *mut DEVICE_OBJECT, work.context as PVOID) };
                THREAD.with(|t| t.work_item.set(0));
                // Checked as the routine's return, so the report names the routine.
                let now = irql();
                if now != PASSIVE_LEVEL {
                    stop(
                        BugCheckCode::WORKER_THREAD_RETURNED_AT_BAD_IRQL,
                        [work.routine as usize, now as usize, work.context, work.item],
                        &format!("a work item routine returned at IRQL {now}, not PASSIVE_LEVEL"),
                    );
                }
            });
        });
        // The routine has returned, epilogue and all; the item itself may be gone already
        // (freed by its routine) or queued again.
        let mut state = kernel.lock();
        if let Some(record) = state.work_items.get_mut(&work.item)
            && record.state == WorkItemState::Running(thread_id())
        {
            record.state = WorkItemState::Idle;
        }
        if let Entry::Occupied(mut running) = state.running_work.entry(driver) {
            *running.get_mut() -= 1;
            if *running.get() == 0 {
                running.remove();
            }
        }
        drop(state);
        kernel.work_done.notify_all();
        kernel.yield_point("worker: a work item routine returned");
    }
}
