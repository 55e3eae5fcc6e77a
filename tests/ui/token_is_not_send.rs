// A token proves the IRQL of the processor it was handed out on; moving it, or a reference to
// it, to another thread would let that thread claim an IRQL it does not run at. (Scoped threads,
// so that `Send` is the only thing wrong: `std::thread::spawn` would also need `'static`.)

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;

fn by_reference(irql: &PassiveLevel, reply: &Event) {
    std::thread::scope(|scope| {
        scope.spawn(move || reply.wait(irql));
    });
}

fn by_mutable_reference(irql: &mut PassiveLevel, reply: &Event) {
    std::thread::scope(|scope| {
        scope.spawn(move || reply.wait(irql));
    });
}

fn main() {}
