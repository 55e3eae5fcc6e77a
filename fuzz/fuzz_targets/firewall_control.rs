//! `cargo +nightly fuzz run firewall_control`: the property check `fuzz_props::firewall_control` (tests/fuzz-props), which
//! `cargo test -p fuzz-props` replays over this target's corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_props::firewall_control(data);
});
