// Waiting while holding a spin lock: the guard's token proves only IRQL <= DISPATCH_LEVEL, so it
// cannot be passed to an API that needs IRQL <= APC_LEVEL.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn bump_and_wait(irql: &mut PassiveLevel, hits: &SpinLock<u32>, reply: &Event) {
    let mut guard = hits.lock(irql);
    *guard += 1;
    reply.wait(guard.irql());
}

fn main() {}
