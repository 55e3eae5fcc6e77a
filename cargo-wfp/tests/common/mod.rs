//! What the end-to-end tests share: where the repository and the generated projects' target
//! folder are, the environment nested cargo commands run in, and how a failed command reads.

#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a part of it"
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `cargo wfp build`'s exit status when the target's standard library is missing.
pub const TARGET_MISSING: i32 = 3;

/// The wfp-rs checkout this crate is in.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cargo-wfp is inside the repository")
}

/// The target folder all generated projects share, so that the SDK and the other dependencies
/// compile once for all of them, and not in the target folder of the `cargo test` running the
/// test (whose lock it holds).
pub fn projects_target() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("cargo-wfp-projects")
}

/// Prints `line` to stderr directly: libtest captures `eprintln!` of passing tests, and a skip
/// or a timing must be visible in a plain `cargo test` run.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `command` with the environment every nested cargo shares: the shared target folder, and
/// none of the variables the `cargo test` running this set for its own package.
pub fn nested(mut command: Command) -> Command {
    command
        .env("CARGO_TARGET_DIR", projects_target())
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_PRIMARY_PACKAGE");
    command
}

/// The cargo that runs this test.
pub fn cargo_program() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into())
}

/// `what` ran with `output`: its status, stdout and stderr, for a failure message.
pub fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Panics with the whole output unless `output` is a success.
#[track_caller]
pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "expected success, {}",
        describe(what, output)
    );
}

/// Whether this runs in the wfp-rs repository (the published crate has no SDK beside it to
/// build generated projects against); prints why not.
pub fn in_repository(what: &str) -> bool {
    let inside = repo().join("wfp-rs/Cargo.toml").is_file() && repo().join("Cargo.lock").is_file();
    if !inside {
        say(&format!(
            "SKIPPED: {what}: not in the wfp-rs repository (no SDK to build against)"
        ));
    }
    inside
}
