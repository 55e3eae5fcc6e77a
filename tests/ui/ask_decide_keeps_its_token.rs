// A careless author keeps the token `decide` received, to answer or ask from it later (after
// the decision, when the IRQL may be anything): the token does not outlive the call.

use std::sync::Mutex;
use wfp_rs::ask::{Outcome, QuestionHandler};
use wfp_rs::irql::DispatchLevel;

struct Keeps(Mutex<Option<&'static mut DispatchLevel<'static>>>);

impl QuestionHandler for Keeps {
    type Context = ();
    type Answer = ();

    fn decode(&self, _answer: &[u8]) -> Option<()> {
        Some(())
    }

    fn decide(&self, irql: &mut DispatchLevel<'_>, _context: (), _outcome: Outcome<()>) {
        *self.0.lock().unwrap() = Some(irql);
    }
}

fn main() {}
