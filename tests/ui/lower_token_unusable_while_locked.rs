// Using the PASSIVE_LEVEL token while a spin lock is held: `lock` raised the IRQL to
// DISPATCH_LEVEL and borrows the token exclusively until its closure returns.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn bump_and_wait(irql: &mut PassiveLevel, hits: &SpinLock<u32>, reply: &Event) {
    hits.lock(&mut *irql, |hits, _| {
        *hits += 1;
        reply.wait(irql);
    });
}

fn main() {}
