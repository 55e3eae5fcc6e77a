//! Compile-fail tests: every IRQL rule (and every misuse the macros reject) has a file in `ui/`
//! that must not compile, with the compiler's exact output committed next to it as `.stderr`.
//!
//! After a deliberate change to a message, regenerate with
//! `TRYBUILD=overwrite cargo test -p wfp-rs-tests --test ui` and read every changed `.stderr`:
//! each must fail for the reason its file names, not for a typo.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/*.rs");
}
