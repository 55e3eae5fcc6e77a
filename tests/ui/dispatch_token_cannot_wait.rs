// The seed bug: a classifyFn (which may run at DISPATCH_LEVEL) asks user mode for a verdict and
// waits for the reply. `Event::wait` stands in for FltSendMessage: both need IRQL <= APC_LEVEL.

use wfp_rs::event::Event;
use wfp_rs::irql::DispatchLevel;

fn classify(irql: &DispatchLevel, reply: &Event) {
    reply.wait(irql);
}

fn main() {}
