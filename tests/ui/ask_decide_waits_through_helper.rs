// A careless author hides the wait of `decide` in a generic helper and in a closure: both still
// need a token that proves IRQL <= APC_LEVEL, and `decide` has only a `&mut DispatchLevel`.

use wfp_rs::ask::{Outcome, QuestionHandler};
use wfp_rs::event::Event;
use wfp_rs::irql::{AtMostDispatch, DispatchLevel};

/// Looks harmless: "at most DISPATCH_LEVEL" is what `decide` has.
fn settle(irql: &impl AtMostDispatch, done: &Event) {
    done.wait(irql);
}

struct Waits(Event);

impl QuestionHandler for Waits {
    type Context = ();
    type Answer = ();

    fn decode(&self, _answer: &[u8]) -> Option<()> {
        Some(())
    }

    fn decide(&self, irql: &mut DispatchLevel<'_>, _context: (), _outcome: Outcome<()>) {
        settle(&*irql, &self.0);
        let wait_in_closure = |irql: &DispatchLevel<'_>| self.0.wait(irql);
        wait_in_closure(irql);
    }
}

fn main() {}
