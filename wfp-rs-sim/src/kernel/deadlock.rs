//! Driver Verifier's deadlock detection, for spin locks.
//!
//! Every processor (thread) keeps the spin locks it holds in the order it took them; the machine
//! keeps a graph of the order in which locks have ever been taken: an edge `A → B` means "some
//! processor took B while holding A". Taking B while holding A when the graph already leads from
//! B to A closes a cycle: two processors that each follow one of the orders at the same time
//! deadlock. Like Driver Verifier, the simulator stops at the acquisition that closes the cycle
//! even when no hang happens in this run (the orders may have been taken on different threads,
//! at different times).
//!
//! The stops, all `DRIVER_VERIFIER_DETECTED_VIOLATION` (0xC4) with parameter 1 from
//! [`wfp_rs::bugcheck::verifier`]:
//!
//! | parameter 1 | parameter 2 | parameter 3 | parameter 4 | when |
//! |---|---|---|---|---|
//! | 0x1000 | the lock | 0 | 0 | a processor takes a spin lock it holds (self-deadlock) |
//! | 0x1001 | the lock whose acquisition closes the cycle | the held lock it closes it with | 0 | lock hierarchy violation |
//! | 0x1004 | the lock | the owner's thread id | this thread's id | release by another processor than the owner |
//! | 0x1007 | the lock | 0 | 0 | release of a lock nobody holds |
//!
//! Microsoft documents parameters 3 and 4 of 0x1000/0x1001/0x1007 as reserved; the simulator
//! puts the held lock in parameter 3 of 0x1001 to help, and 0 elsewhere. Thread "addresses" are
//! the simulator's thread ids.
//!
//! INFERRED: on a free Windows kernel a recursive acquisition spins forever and a release by the
//! wrong processor goes unnoticed; `SPIN_LOCK_ALREADY_OWNED` (0xF) and `SPIN_LOCK_NOT_OWNED`
//! (0x10) come from the kernel's own checks inside the acquire and release routines. Driver
//! Verifier's deadlock detection sees the call first (it must, or it could never report a
//! recursive acquisition of a spin lock that never returns), so with it on — as the simulator
//! always is — 0xC4 with 0x1000 / 0x1004 / 0x1007 is what stops the machine.
//!
//! Not reported: 0x1003 (release out of order). Releasing spin locks in another order than they
//! were taken, with the saved IRQLs swapped, is how a WDM driver hands over from one lock to
//! another (a cancel routine does it with the cancel spin lock); the harmful form, lowering the
//! IRQL below `DISPATCH_LEVEL` while a lock is still held, stops at the next release (0xC4,
//! 0x32). INFERRED: Microsoft does not document which releases Verifier counts as out of order.
//!
//! Forgetting: a lock whose memory is freed no longer exists, and a new lock at the same address
//! is another lock. The graph forgets the locks in a pool block when it is freed, the locks first
//! ordered by a driver when that driver has unloaded, and locks on a thread's stack when the
//! simulator frame they live under returns (see `kernel::with_context`).

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::backtrace::Backtrace;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::{FxHashMap, FxHashSet};

use super::bugcheck::{describe_routine, first_driver_frame, stop_with_details};
use super::state::{Kernel, Routine, ThreadState, current_driver, current_routine};
use wfp_rs::bugcheck::{BugCheckCode, verifier};

/// Where one order (`A → B`) was first seen.
struct Edge {
    thread: String,
    routine: Option<Routine>,
    /// Captured unresolved, and shared by the edges one acquisition adds (they have the same
    /// stack); resolved only for a report.
    backtrace: Arc<Backtrace>,
}

/// A lock in the graph.
struct Node {
    /// The driver whose code first ordered it (0: harness or kernel).
    driver: usize,
}

#[derive(Default)]
struct Graph {
    nodes: BTreeMap<usize, Node>,
    /// `after[a][b]`: b was taken while a was held.
    after: FxHashMap<usize, FxHashMap<usize, Edge>>,
}

/// The machine's lock-order graph.
#[derive(Default)]
pub(crate) struct LockOrder {
    graph: Mutex<Graph>,
    /// How many nodes the graph has: lets frees skip the lock while the graph is empty.
    nodes: AtomicUsize,
}

impl LockOrder {
    fn lock(&self) -> MutexGuard<'_, Graph> {
        self.graph.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Graph {
    /// The path of edges from `from` to `to`, if the graph has one.
    fn path(&self, from: usize, to: usize) -> Option<Vec<(usize, usize)>> {
        let mut seen = FxHashSet::default();
        let mut stack = vec![(from, Vec::new())];
        while let Some((at, path)) = stack.pop() {
            if at == to {
                return Some(path);
            }
            if !seen.insert(at) {
                continue;
            }
            if let Some(next) = self.after.get(&at) {
                for &n in next.keys() {
                    let mut longer = path.clone();
                    longer.push((at, n));
                    stack.push((n, longer));
                }
            }
        }
        None
    }

    fn remove(&mut self, addresses: &[usize]) {
        for a in addresses {
            self.nodes.remove(a);
            self.after.remove(a);
        }
        for next in self.after.values_mut() {
            for a in addresses {
                next.remove(a);
            }
        }
    }
}

fn this_thread_name() -> String {
    let current = std::thread::current();
    format!(
        "{} [{}]",
        current.name().unwrap_or("<unnamed>"),
        super::state::thread_id()
    )
}

/// Whether `address` lies on this thread's stack, in a frame inside the machine.
fn on_this_stack(t: &ThreadState, address: usize) -> bool {
    let marker = 0u8;
    let sp = core::ptr::addr_of!(marker) as usize;
    let anchor = t.stack_anchor.get();
    anchor != 0 && sp <= address && address < anchor
}

/// Called by the acquire routines before they take `lock`: the self-deadlock and lock-order
/// checks. Returns with the graph updated; the caller takes the lock, then calls [`acquired`].
pub(crate) fn before_acquire(t: &ThreadState, lock: usize) {
    let held = t.held_locks.borrow();
    if held.contains(&lock) {
        drop(held);
        stop_with_details(
            BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
            [verifier::DEADLOCK_SELF, lock, 0, 0],
            &format!(
                "deadlock detection: spin lock {lock:#x} was acquired by the processor that already holds it (on Windows: a hang)"
            ),
            "",
        );
    }
    if held.is_empty() {
        return;
    }
    // Only nested acquisitions reach the machine's graph: a lock taken with none held adds
    // no order.
    let kernel = super::state::current();
    let mut graph = kernel.lock_order.lock();
    let new_edges: Vec<usize> = held
        .iter()
        .copied()
        .filter(|h| {
            !graph
                .after
                .get(h)
                .is_some_and(|next| next.contains_key(&lock))
        })
        .collect();
    drop(held);
    if new_edges.is_empty() {
        return;
    }
    for &h in &new_edges {
        if let Some(path) = graph.path(lock, h) {
            let report = cycle_report(&graph, lock, h, &path);
            drop(graph);
            stop_with_details(
                BugCheckCode::DRIVER_VERIFIER_DETECTED_VIOLATION,
                [verifier::DEADLOCK_LOCK_ORDER, lock, h, 0],
                &format!(
                    "deadlock detection: spin lock {lock:#x} taken while holding {h:#x}, but {lock:#x} was taken before {h:#x} elsewhere: two processors taking them in these orders deadlock"
                ),
                &report,
            );
        }
    }
    let driver = current_driver();
    let routine = current_routine();
    let backtrace = Arc::new(Backtrace::force_capture());
    let thread = this_thread_name();
    for &h in &new_edges {
        graph.after.entry(h).or_default().insert(
            lock,
            Edge {
                thread: thread.clone(),
                routine,
                backtrace: Arc::clone(&backtrace),
            },
        );
    }
    let mut added = Vec::new();
    for address in new_edges.iter().copied().chain([lock]) {
        if let std::collections::btree_map::Entry::Vacant(v) = graph.nodes.entry(address) {
            v.insert(Node { driver });
            added.push(address);
        }
    }
    kernel
        .lock_order
        .nodes
        .store(graph.nodes.len(), Ordering::Relaxed);
    drop(graph);
    let mut stack_locks = t.stack_locks.borrow_mut();
    for address in added {
        if on_this_stack(t, address) {
            stack_locks.push(address);
        }
    }
}

/// The lines after the stop header for a lock-order violation: where each order on the cycle
/// was first taken, and where this acquisition happens.
fn cycle_report(graph: &Graph, lock: usize, held: usize, path: &[(usize, usize)]) -> String {
    let mut lines = vec![format!(
        "now: {} takes {lock:#x} while holding {held:#x}",
        this_thread_name()
    )];
    for &(a, b) in path {
        let Some(edge) = graph.after.get(&a).and_then(|n| n.get(&b)) else {
            continue;
        };
        let routine = edge
            .routine
            .map_or_else(|| "harness code".to_owned(), describe_routine);
        let location = first_driver_frame(&edge.backtrace).map_or_else(
            || "(no driver frame)".to_owned(),
            |(f, at)| format!("{at} ({f})"),
        );
        lines.push(format!(
            "before: {} took {b:#x} while holding {a:#x}, in {routine}, at {location}",
            edge.thread
        ));
    }
    lines.join("\n")
}

/// Called by the acquire routines once they hold `lock`.
pub(crate) fn acquired(t: &ThreadState, lock: usize) {
    t.held_locks.borrow_mut().push(lock);
}

/// Called by the release routines once they have released `lock`.
pub(crate) fn released(t: &ThreadState, lock: usize) {
    let mut held = t.held_locks.borrow_mut();
    if let Some(at) = held.iter().rposition(|&l| l == lock) {
        held.remove(at);
    }
}

/// How many spin locks the graph remembers an order for.
pub(crate) fn remembered(kernel: &Kernel) -> usize {
    kernel.lock_order.lock().nodes.len()
}

/// Forgets the locks in `[start, start + len)`: their memory was freed.
pub(crate) fn forget_range(kernel: &Kernel, start: usize, len: usize) {
    if kernel.lock_order.nodes.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut graph = kernel.lock_order.lock();
    let gone: Vec<usize> = graph
        .nodes
        .range(start..start.saturating_add(len))
        .map(|(&a, _)| a)
        .collect();
    if !gone.is_empty() {
        graph.remove(&gone);
        kernel
            .lock_order
            .nodes
            .store(graph.nodes.len(), Ordering::Relaxed);
    }
}

/// Forgets the locks `driver` first ordered: it has unloaded, and its memory with it.
pub(crate) fn forget_driver(kernel: &Kernel, driver: usize) {
    if kernel.lock_order.nodes.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut graph = kernel.lock_order.lock();
    let gone: Vec<usize> = graph
        .nodes
        .iter()
        .filter(|(_, n)| n.driver == driver)
        .map(|(&a, _)| a)
        .collect();
    graph.remove(&gone);
    kernel
        .lock_order
        .nodes
        .store(graph.nodes.len(), Ordering::Relaxed);
}

/// Forgets this thread's stack locks below `frame`: the frames they lived in have returned.
pub(crate) fn forget_stack_below(kernel: &Kernel, t: &ThreadState, frame: usize) {
    let gone: Vec<usize> = {
        let mut stack_locks = t.stack_locks.borrow_mut();
        let (gone, kept) = stack_locks.iter().partition(|&&a| a < frame);
        *stack_locks = kept;
        gone
    };
    if gone.is_empty() {
        return;
    }
    let mut graph = kernel.lock_order.lock();
    graph.remove(&gone);
    kernel
        .lock_order
        .nodes
        .store(graph.nodes.len(), Ordering::Relaxed);
}
