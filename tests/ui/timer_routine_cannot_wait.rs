// A timer's routine runs in a DPC, at DISPATCH_LEVEL: it cannot wait for an event (nor call
// anything else that needs IRQL <= APC_LEVEL), even though the timer was set at PASSIVE_LEVEL.

use std::sync::Arc;
use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::timer::Timer;

fn arm(irql: &PassiveLevel, reply: Arc<Event>) {
    let _timer = Timer::try_new(move |dispatch| reply.wait(dispatch), irql);
}

fn main() {}
