// Minting a token outside the SDK's trampolines: `try_current` checks the IRQL, but a second
// token on a thread that holds one would stay usable while the first raises the IRQL, so it is
// `unsafe` (no other token may be usable while its closure runs).

use wfp_rs::irql::{DispatchLevel, PassiveLevel};

fn mint_another(_irql: &mut PassiveLevel<'_>) {
    let _ = DispatchLevel::try_current(|_second| ());
}

fn main() {}
