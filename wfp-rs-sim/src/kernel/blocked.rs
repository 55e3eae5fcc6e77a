//! How many threads a driver keeps blocked in kernel waits at once: system worker threads (a
//! work item routine waiting) and classifying threads (a `classifyFn` waiting), for benchmarks
//! that compare designs by the threads they hold.
//!
//! A thread counts as *blocked* from the moment it enters a kernel routine that puts it in a
//! wait state until that routine returns: `FltSendMessage` from the message's send until its
//! reply (or delivery, timeout or disconnection) ends the call, and `KeWaitForSingleObject` with
//! a timeout other than zero (a zero timeout only polls) for the whole call. That is the time
//! Windows keeps the thread off the processor waiting in `KeWaitForSingleObject` (which
//! `FltSendMessage` uses to wait for the reply, INFERRED from its documented blocking until
//! the reply or timeout): counting the whole call, also when the reply was already there, never
//! counts fewer blocked threads than Windows has.
//!
//! A *system worker thread* is a thread of the machine's pool running a routine queued with
//! `IoQueueWorkItem`; a *classifying thread* is one inside a `classifyFn` (on Windows: whatever
//! thread the network stack classified on, often the application's own).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::state::{Kernel, RoutineKind, THREAD, current_routine};

/// One kind of blocked thread: how many now, the most at once since the last reset.
#[derive(Default)]
struct Count {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Count {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts a new maximum from the threads blocked now.
    fn reset(&self) {
        self.max
            .store(self.now.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// The machine's counts (`Kernel::blocked`).
#[derive(Default)]
pub(crate) struct BlockedThreads {
    workers: Count,
    classifying: Count,
}

/// Which count a blocking call of this thread belongs to.
#[derive(Clone, Copy)]
enum Kind {
    Worker,
    Classifying,
}

impl BlockedThreads {
    /// The most system worker threads blocked at once since the last [`reset`](Self::reset).
    pub(crate) fn workers_max(&self) -> usize {
        self.workers.max.load(Ordering::SeqCst)
    }

    /// The most classifying threads blocked at once since the last [`reset`](Self::reset).
    pub(crate) fn classifying_max(&self) -> usize {
        self.classifying.max.load(Ordering::SeqCst)
    }

    /// Starts both maxima again from the threads blocked now.
    pub(crate) fn reset(&self) {
        self.workers.reset();
        self.classifying.reset();
    }

    fn count(&self, kind: Kind) -> &Count {
        match kind {
            Kind::Worker => &self.workers,
            Kind::Classifying => &self.classifying,
        }
    }
}

/// The calling thread's blocking wait, counted while this lives (see the module's doc).
pub(crate) struct BlockedWait<'k> {
    counted: Option<(&'k Kernel, Kind)>,
}

impl<'k> BlockedWait<'k> {
    /// Counts the calling thread as blocked in `kernel`, if it is a system worker thread
    /// running a work item or a thread inside a `classifyFn`; nothing otherwise.
    pub(crate) fn enter(kernel: &'k Kernel) -> BlockedWait<'k> {
        let kind = if THREAD.with(|t| t.work_item.get()) != 0 {
            Some(Kind::Worker)
        } else if current_routine().is_some_and(|r| r.kind == RoutineKind::Callout("classifyFn")) {
            Some(Kind::Classifying)
        } else {
            None
        };
        if let Some(kind) = kind {
            kernel.blocked.count(kind).enter();
        }
        BlockedWait {
            counted: kind.map(|kind| (kernel, kind)),
        }
    }
}

impl Drop for BlockedWait<'_> {
    fn drop(&mut self) {
        if let Some((kernel, kind)) = self.counted {
            kernel.blocked.count(kind).leave();
        }
    }
}
