// Minting a token with a struct literal in safe code. Only the SDK's trampolines, the checked
// `try_current` and the `unsafe` `assume` produce tokens; the fields are private.

use std::marker::PhantomData;
use wfp_rs::irql::PassiveLevel;

fn main() {
    let _irql = PassiveLevel {
        _not_send: PhantomData,
        _scope: PhantomData,
    };
}
