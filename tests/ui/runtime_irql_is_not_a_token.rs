// Passing the run-time IRQL value where a token is expected: `Irql::current()` reports the IRQL
// at one instant, it proves nothing about the IRQL during the call.

use wfp_rs::event::Event;
use wfp_rs::irql::Irql;

fn signal(reply: &Event) {
    reply.set(&Irql::current());
}

fn main() {}
