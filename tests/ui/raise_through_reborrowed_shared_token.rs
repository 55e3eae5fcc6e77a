// Raising the IRQL through `&mut` of a fresh shared reborrow of the token (`&mut &*irql`): the
// token itself is only shared-borrowed, so it stays usable at DISPATCH_LEVEL.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn bump_and_wait(irql: &mut PassiveLevel<'_>, hits: &SpinLock<u32>, reply: &Event) {
    hits.lock(&mut &*irql, |hits, _| {
        *hits += 1;
        reply.wait(irql);
    });
}

fn main() {}
