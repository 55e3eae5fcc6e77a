// Capturing the queueing code's token in a work item: the closure runs later on a system worker
// thread, where that token proves nothing. It must use the `&mut PassiveLevel` it receives.

use wfp_rs::event::Event;
use wfp_rs::irql::DispatchLevel;
use wfp_rs::work_item::WorkQueue;

fn classify(irql: &DispatchLevel<'_>, queue: &WorkQueue, done: &'static Event) {
    let _ = queue.queue(irql, move |_passive| {
        done.set(irql);
    });
}

fn main() {}
