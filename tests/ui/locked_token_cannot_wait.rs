// Waiting while holding a spin lock: the token the locked closure receives proves only
// IRQL <= DISPATCH_LEVEL, so it cannot be passed to an API that needs IRQL <= APC_LEVEL.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn bump_and_wait(irql: &mut PassiveLevel, hits: &SpinLock<u32>, reply: &Event) {
    hits.lock(irql, |hits, irql| {
        *hits += 1;
        reply.wait(irql);
    });
}

fn main() {}
