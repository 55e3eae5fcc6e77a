// Minting a token with a struct literal in safe code. Only the SDK's trampolines, the `unsafe`
// `try_current` and `assume`, and a locked spin lock produce tokens; the fields are private.

use std::marker::PhantomData;
use wfp_rs::irql::PassiveLevel;

fn main() {
    let _irql = PassiveLevel {
        _not_send: PhantomData,
        _scope: PhantomData,
    };
}
