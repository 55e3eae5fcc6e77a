// Issue 9's seed of the copy hole: `&PassiveLevel` is `Copy`, so locking with `&mut` of a copy
// would raise the IRQL while the original stays usable, and `send` would wait at
// DISPATCH_LEVEL. Raising the IRQL takes only an exclusive borrow of a token itself.

use core::time::Duration;

use wfp_rs::irql::PassiveLevel;
use wfp_rs::port::{Protocol, ServerPort};
use wfp_rs::spin_lock::SpinLock;

fn flush<P: Protocol>(
    irql: &PassiveLevel<'_>,
    pending: &SpinLock<Vec<P::Request>>,
    port: &ServerPort<P>,
) {
    let mut token = irql; // a copy of the shared reference
    pending.lock(&mut token, |queue, _| {
        for ask in queue.iter() {
            let _ = port.send(irql, ask, Duration::from_secs(1));
        }
    });
}

fn main() {}
