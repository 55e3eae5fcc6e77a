// Using the PASSIVE_LEVEL token while a spin lock is held: `lock` raised the IRQL to
// DISPATCH_LEVEL and borrowed the token mutably until the guard is dropped.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn bump_and_wait(irql: &mut PassiveLevel, hits: &SpinLock<u32>, reply: &Event) {
    let mut guard = hits.lock(irql);
    *guard += 1;
    reply.wait(irql);
    drop(guard);
}

fn main() {}
