// Keeping a token after the scope that proved the IRQL has ended: `try_current` checked the IRQL
// once, so the token must not outlive the closure it was handed to (`unsafe` promises only that
// no other token is usable meanwhile, not that this one may leave).

use wfp_rs::irql::PassiveLevel;

fn returned() {
    // SAFETY: no other token is usable here.
    let _kept = unsafe { PassiveLevel::try_current(|irql| irql) };
}

fn stored_outside() {
    let mut kept = None;
    // SAFETY: no other token is usable here.
    unsafe { PassiveLevel::try_current(|irql| kept = Some(irql)) };
    drop(kept);
}

fn main() {}
