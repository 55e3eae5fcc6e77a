// Keeping a token after the scope that proved the IRQL has ended: `try_current` checked the IRQL
// once, so the token must not outlive the closure it was handed to.

use wfp_rs::irql::PassiveLevel;

fn returned() {
    let _kept = PassiveLevel::try_current(|irql| irql);
}

fn stored_outside() {
    let mut kept = None;
    PassiveLevel::try_current(|irql| kept = Some(irql));
    drop(kept);
}

fn main() {}
