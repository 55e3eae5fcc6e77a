//! Replays every file of every fuzz target's corpus (`fuzz/corpus/<target>/`) through the
//! target's property check, on the stable toolchain: a corpus file that breaks a property fails
//! `cargo test`, whether the fuzzer found it or someone added it as a regression input.

#![cfg(any(not(windows), feature = "sim"))]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fuzz_props::{TARGETS, Target, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted, with their contents.
fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("expected a corpus at {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("expected a readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("expected to read {}: {e}", path.display()));
            (path, bytes)
        })
        .collect()
}

/// Runs `check` over every input; returns the names of the inputs whose check panicked.
fn failures(inputs: &[(PathBuf, Vec<u8>)], check: fn(&[u8]) -> bool) -> Vec<String> {
    inputs
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| check(bytes))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect()
}

#[test]
fn every_corpus_file_keeps_its_targets_properties() {
    let mut broken = Vec::new();
    for target in TARGETS {
        let inputs = corpus(&fuzz_dir().join("corpus").join(target.name));
        assert!(
            !inputs.is_empty(),
            "expected a non-empty corpus for the target {}",
            target.name
        );
        broken.extend(failures(&inputs, target.check));
        println!("{}: {} files", target.name, inputs.len());
    }
    assert!(
        broken.is_empty(),
        "expected every corpus file to keep its target's properties; these do not \
         (reproduce with `cargo +nightly fuzz run <target> <file>` in fuzz/): {broken:#?}"
    );
}

#[test]
fn the_targets_corpora_and_fuzz_targets_are_the_same_set() {
    let names = |dir: &Path, strip: &str| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("expected to list {}: {e}", dir.display()))
            .map(|entry| entry.expect("expected an entry").file_name())
            .map(|name| name.to_string_lossy().trim_end_matches(strip).to_owned())
            .collect();
        names.sort();
        names
    };
    let mut expected: Vec<String> = TARGETS.iter().map(|t| t.name.to_owned()).collect();
    expected.sort();
    assert_eq!(names(&fuzz_dir().join("corpus"), ""), expected);
    assert_eq!(names(&fuzz_dir().join("fuzz_targets"), ".rs"), expected);
}

#[test]
fn every_seed_is_accepted_or_refused_as_named_and_keeps_the_properties() {
    let seeds = seeds();
    for target in TARGETS {
        assert!(
            seeds.iter().any(|seed| seed.target == target.name),
            "expected seeds for {}",
            target.name
        );
    }
    for seed in seeds {
        let target: &Target = TARGETS
            .iter()
            .find(|t| t.name == seed.target)
            .unwrap_or_else(|| panic!("expected a target named {}", seed.target));
        let refused = seed.name.starts_with("refused-");
        assert_eq!(
            (target.check)(&seed.bytes),
            !refused,
            "expected {}'s decoder to {} the seed {}",
            target.name,
            if refused { "refuse" } else { "accept" },
            seed.name
        );
    }
}

#[test]
fn a_check_that_panics_is_reported_with_its_file() {
    let inputs = vec![
        (PathBuf::from("good"), vec![0u8]),
        (PathBuf::from("bad"), vec![1u8]),
    ];
    fn odd_is_broken(bytes: &[u8]) -> bool {
        assert!(bytes[0].is_multiple_of(2), "an odd byte");
        true
    }
    assert_eq!(failures(&inputs, odd_is_broken), ["bad"]);
}
