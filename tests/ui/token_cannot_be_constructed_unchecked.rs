// Minting a token through the SDK's own unchecked constructor, or through `Default`. (A separate
// file from the struct literal: rustc reports privacy of fields only when type checking passed.)

use wfp_rs::irql::PassiveLevel;

fn main() {
    let _unchecked = unsafe { PassiveLevel::new_unchecked() };
    let _default: PassiveLevel = Default::default();
}
