//! Work items: run a closure at `PASSIVE_LEVEL` on a system worker thread.
//!
//! This is how code at `DISPATCH_LEVEL` (a `classifyFn`, a spin-lock holder) gets work done that
//! needs `PASSIVE_LEVEL` — waiting, talking to user mode, calling PASSIVE-only routines: it
//! queues a closure, and the closure receives a `&mut PassiveLevel`.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use wfp_rs::irql::DispatchLevel;
//! use wfp_rs::work_item::WorkQueue;
//!
//! fn from_dispatch(irql: &DispatchLevel, queue: &WorkQueue, done: Arc<AtomicU32>) {
//!     queue
//!         .queue(irql, move |_passive| {
//!             // PASSIVE_LEVEL: may wait, may call FltSendMessage.
//!             done.fetch_add(1, Ordering::SeqCst);
//!         })
//!         .unwrap_or_else(|e| wfp_rs::kd_print!(Error, "{e}\n"));
//! }
//! ```

use core::fmt;
use core::ptr::NonNull;

use crate::driver::Shared;
use crate::irql::{AtMostDispatch, PassiveLevel};
use crate::pool::{PoolBox, PoolTag};
use crate::status::Status;
use crate::sys;

/// A handle for queueing work items on behalf of a driver. Obtained from
/// [`Driver::work_queue`](crate::driver::Driver::work_queue); clone it freely.
///
/// Unload waits until every handle is dropped and every queued closure has run, so closures and
/// handles may be kept in the driver state, but not leaked: a leaked handle makes unload wait
/// forever (in the simulator, until `Machine::set_unload_wait_limit`, then it stops with
/// `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` naming the handles).
pub struct WorkQueue {
    shared: NonNull<Shared>,
}

// SAFETY: `Shared` is only used through atomics and kernel objects that are safe to use from
// any thread (the reference count, a KEVENT, the device pointer).
unsafe impl Send for WorkQueue {}
// SAFETY: as above.
unsafe impl Sync for WorkQueue {}

impl WorkQueue {
    pub(crate) fn new(shared: &Shared) -> WorkQueue {
        shared.acquire();
        WorkQueue {
            shared: NonNull::from(shared),
        }
    }

    fn shared(&self) -> &Shared {
        // SAFETY: the handle holds a reference on `Shared`, which unload waits for before it
        // drops it.
        unsafe { self.shared.as_ref() }
    }

    /// Queues `work` to run once at `PASSIVE_LEVEL` on a system worker thread. Wraps
    /// `IoAllocateWorkItem` + `IoQueueWorkItem`; the SDK frees the work item when the closure
    /// starts.
    ///
    /// On failure (no pool for the closure or the work item) the closure is handed back inside
    /// the error, not lost.
    ///
    /// The closure must be a [`WorkItem`]: `FnOnce(&mut PassiveLevel) + Send + 'static`. It runs
    /// on another thread, later, so it owns what it uses and cannot capture the caller's IRQL
    /// token (it receives its own).
    pub fn queue<F>(&self, irql: &impl AtMostDispatch, work: F) -> Result<(), QueueError<F>>
    where
        F: WorkItem,
    {
        let job = Job {
            work,
            item: core::ptr::null_mut(),
            queue: self.clone(),
        };
        let mut job = match PoolBox::try_new(job, PoolTag::SDK, irql) {
            Ok(job) => job,
            Err(error) => {
                return Err(QueueError {
                    work: error.into_inner().work,
                });
            }
        };
        // SAFETY: the device belongs to this driver and lives until unload, which waits for
        // this handle; IoAllocateWorkItem may be called at <= DISPATCH_LEVEL.
        let item = unsafe { sys::IoAllocateWorkItem(self.shared().device.as_ptr()) };
        if item.is_null() {
            return Err(QueueError {
                work: PoolBox::into_inner(job).work,
            });
        }
        job.item = item;
        // Counted before it is queued: the routine may finish before IoQueueWorkItem returns.
        self.shared().job_queued();
        let context = PoolBox::into_raw(job);
        // SAFETY: `item` is a fresh work item; `context` is a live PoolBox<Job<F>> that
        // `run_job::<F>` takes back exactly once.
        unsafe {
            sys::IoQueueWorkItem(
                item,
                Some(run_job::<F>),
                sys::DelayedWorkQueue,
                context.as_ptr().cast(),
            );
        }
        Ok(())
    }
}

impl Clone for WorkQueue {
    fn clone(&self) -> Self {
        WorkQueue::new(self.shared())
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        self.shared().release();
    }
}

impl fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue").finish_non_exhaustive()
    }
}

/// A closure that can run as a work item: `FnOnce(&mut PassiveLevel) + Send + 'static`.
/// Implemented for every such closure; it exists so that a closure that is not one gets an
/// error in IRQL terms.
///
/// A work item runs later, on a system worker thread at `PASSIVE_LEVEL`. The token of the code
/// that queued it proves nothing there (and is `!Send`, so it cannot be captured); the closure
/// receives its own `&mut PassiveLevel`:
///
/// ```compile_fail,E0277
/// use wfp_rs::irql::DispatchLevel;
/// use wfp_rs::work_item::WorkQueue;
///
/// fn classify(irql: &DispatchLevel, queue: &WorkQueue) {
///     let _ = queue.queue(irql, move |_passive| {
///         let _captured = irql; // the caller's token, on another thread
///     });
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "this closure cannot be a work item: a work item runs later, on a system worker thread at PASSIVE_LEVEL",
    label = "must be `FnOnce(&mut PassiveLevel) + Send + 'static`, so it cannot capture the caller's IRQL token or anything else tied to this thread",
    note = "if it captures the caller's IRQL token: a token proves the IRQL of the code that received it, not of the worker thread; use the `&mut PassiveLevel` the closure receives (`move |passive| ...`)",
    note = "whatever else it captures must be `Send + 'static` too (not an `Rc`, not a reference to the caller's locals): move the data the work item needs into the closure, and share state through an `Arc`"
)]
pub trait WorkItem: FnOnce(&mut PassiveLevel<'_>) + Send + 'static {}

// `do_not_recommend`: a closure that is not `Send` (it captured a token) is reported as not
// being a `WorkItem`, with the message above, instead of as "`*mut ()` cannot be sent between
// threads safely".
#[diagnostic::do_not_recommend]
impl<F: FnOnce(&mut PassiveLevel<'_>) + Send + 'static> WorkItem for F {}

struct Job<F> {
    work: F,
    item: *mut sys::IO_WORKITEM,
    // Keeps the driver from finishing unload until the closure has run.
    queue: WorkQueue,
}

// SAFETY: `F: Send`; the work item pointer is only used by the worker thread that runs the job.
unsafe impl<F: Send> Send for Job<F> {}

unsafe extern "system" fn run_job<F>(_device: *mut sys::DEVICE_OBJECT, context: sys::PVOID)
where
    F: WorkItem,
{
    // SAFETY: the I/O manager passes the non-null context given to IoQueueWorkItem.
    let context = unsafe { NonNull::new_unchecked(context.cast::<Job<F>>()) };
    // SAFETY: `context` is the pointer `queue` produced with `PoolBox::into_raw` for a `Job<F>`
    // with the SDK tag, and the I/O manager passes it to this routine exactly once.
    let job = unsafe { PoolBox::from_raw(context, PoolTag::SDK) };
    let Job { work, item, queue } = PoolBox::into_inner(job);
    // SAFETY: the system dequeued the item before calling its routine, so the routine may free
    // it; nothing else refers to it.
    unsafe { sys::IoFreeWorkItem(item) };
    // SAFETY: system worker threads call work item routines at PASSIVE_LEVEL; the token lives
    // for this call only.
    let mut irql = unsafe { PassiveLevel::new_unchecked() };
    work(&mut irql);
    queue.shared().job_finished();
    // Dropped last: once this handle is gone the driver may finish unloading. The image stays
    // mapped until this routine returns, because IoQueueWorkItem holds the device object.
    drop(queue);
}

/// A work item could not be queued; the closure is handed back.
pub struct QueueError<F> {
    work: F,
}

impl<F> QueueError<F> {
    /// The closure that was not queued.
    pub fn into_inner(self) -> F {
        self.work
    }
}

impl<F> fmt::Debug for QueueError<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueError").finish_non_exhaustive()
    }
}

impl<F> fmt::Display for QueueError<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not queue a work item: out of non-paged pool")
    }
}

impl<F> core::error::Error for QueueError<F> {}

impl<F> From<QueueError<F>> for Status {
    fn from(_: QueueError<F>) -> Status {
        Status::INSUFFICIENT_RESOURCES
    }
}
