// A question channel's `decide` may run at DISPATCH_LEVEL (in the deadline's DPC, in the caller
// of `cancel`): it cannot wait for an event (nor call anything else that needs
// IRQL <= APC_LEVEL), even when the answer that decides arrives at PASSIVE_LEVEL.

use wfp_rs::ask::{Outcome, QuestionHandler};
use wfp_rs::event::Event;
use wfp_rs::irql::DispatchLevel;

struct Waits(Event);

impl QuestionHandler for Waits {
    type Context = ();
    type Answer = ();

    fn decode(&self, _answer: &[u8]) -> Option<()> {
        Some(())
    }

    fn decide(&self, irql: &mut DispatchLevel<'_>, _context: (), _outcome: Outcome<()>) {
        self.0.wait(irql);
    }
}

fn main() {}
