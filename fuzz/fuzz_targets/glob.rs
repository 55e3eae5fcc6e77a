//! `cargo +nightly fuzz run glob`: the property check `fuzz_props::glob` (tests/fuzz-props), which
//! `cargo test -p fuzz-props` replays over this target's corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_props::glob(data);
});
