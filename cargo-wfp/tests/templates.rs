//! The templates `cargo wfp new` generates projects from are copies of the repository's
//! examples (`cargo xtask templates` writes them). This test fails when a copy is stale, so the
//! generated projects cannot drift from the examples, which the workspace's own tests check.
//!
//! Copies rather than a comparison of generated output with the examples modulo renames: the
//! published crate cannot read the examples, so it must carry copies anyway, and an exact
//! comparison of the copies is the strictest check there is. The generation itself (renames,
//! GUIDs, manifests) is checked by building and testing its output (`tests/new_build_package.rs`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

#[test]
fn templates_are_the_examples() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = crate_dir
        .parent()
        .expect("cargo-wfp is inside the repository");
    if !repo.join("examples").is_dir() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: no examples/ beside cargo-wfp (not the wfp-rs repository)"
        );
        return;
    }
    let expected = cargo_wfp::new::templates_from_examples(repo).expect("reads the examples");
    let embedded: BTreeMap<String, Vec<u8>> = cargo_wfp::new::embedded_templates()
        .into_iter()
        .map(|(path, data)| (path, data.to_vec()))
        .collect();

    let mut stale = Vec::new();
    for (path, data) in &expected {
        match embedded.get(path) {
            None => stale.push(format!("missing: templates/{path}")),
            Some(copy) if copy != data => stale.push(format!("differs: templates/{path}")),
            Some(_) => {}
        }
    }
    for path in embedded.keys() {
        if !expected.contains_key(path) {
            stale.push(format!("no longer in the examples: templates/{path}"));
        }
    }
    assert!(
        stale.is_empty(),
        "expected cargo-wfp/templates/ to be a copy of the examples, found:\n  {}\n\
         run `cargo xtask templates` and commit the result",
        stale.join("\n  ")
    );
    assert!(
        expected.len() > 20,
        "expected the templates to hold the four example crates, found {} files",
        expected.len()
    );
}
