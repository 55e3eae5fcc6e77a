//! `cargo +nightly fuzz run seed_messages`: the property check `fuzz_props::seed_messages` (tests/fuzz-props), which
//! `cargo test -p fuzz-props` replays over this target's corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_props::seed_messages(data);
});
