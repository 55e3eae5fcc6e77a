//! `cargo +nightly fuzz run ask_answer`: the property check `fuzz_props::ask_answer` (tests/fuzz-props), which
//! `cargo test -p fuzz-props` replays over this target's corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_props::ask_answer(data);
});
