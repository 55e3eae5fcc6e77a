//! The service's tests. They are unit tests of the library, not integration tests in `tests/`,
//! because the package depends on the driver crate (`firewall-driver`, for the demo), which is
//! a `cdylib` + `rlib`: integration tests make cargo build the `firewall` binary too, with the
//! dev profile's `panic = "abort"`, next to the tests' unwinding build, and the two builds of the
//! driver crate write the same unhashed file (cargo issue 6313), so one build links the other's
//! library. Without integration tests there is one build.
//!
//! Tests that need `firewall` as a separate process (the command line, `serve`, the demo's
//! service) run this test binary again with [`CHILD_ARGS`] set: [`child_cli`] then runs
//! [`crate::cli::run`] with those arguments, which is what the binary's `main` does.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Command;

mod cli;
#[cfg(unix)]
mod demo;
#[cfg(unix)]
mod serve;
mod service;

/// Set in a child process: the command line to run, as a JSON array of strings.
const CHILD_ARGS: &str = "FIREWALL_TEST_CHILD_ARGS";
/// Set in a child process: files to write the command's output and errors to (the test harness
/// writes its own lines to standard output).
const CHILD_OUT: &str = "FIREWALL_TEST_CHILD_OUT";
const CHILD_ERR: &str = "FIREWALL_TEST_CHILD_ERR";

/// Runs the command line in [`CHILD_ARGS`] (only in a child process) and exits with its code.
#[test]
#[ignore = "the `firewall` command line of a child process; run by the tests that need one"]
fn child_cli() {
    let Some(args) = std::env::var_os(CHILD_ARGS) else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args.to_string_lossy()).unwrap();
    let open = |var: &str| -> Box<dyn std::io::Write> {
        match std::env::var_os(var) {
            Some(path) => Box::new(std::fs::File::create(path).unwrap()),
            None if var == CHILD_OUT => Box::new(std::io::stdout()),
            None => Box::new(std::io::stderr()),
        }
    };
    let (mut out, mut err) = (open(CHILD_OUT), open(CHILD_ERR));
    let code = crate::cli::run(
        std::iter::once("firewall".to_owned()).chain(args),
        &mut out,
        &mut err,
    );
    drop((out, err));
    std::process::exit(i32::from(code));
}

/// A command that runs `firewall ARGS` in a child process (this test binary, through
/// [`child_cli`]); its standard error is the command's, its standard output starts with the
/// harness's lines.
fn firewall_command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "tests::child_cli",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ARGS, serde_json::to_string(&args).unwrap());
    command
}

/// The demo's [`Launcher`](crate::demo::Launcher) in tests: the service is `firewall serve` in a
/// child process of this test binary.
#[cfg(unix)]
fn launcher(args: &[OsString]) -> std::io::Result<Command> {
    Ok(firewall_command(args))
}

/// What `firewall ARGS` printed and returned.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `firewall ARGS` in a child process and collects its output.
fn firewall(args: &[&str]) -> Output {
    let dir = temp_dir("child");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let status = firewall_command(args)
        .env(CHILD_OUT, &out)
        .env(CHILD_ERR, &err)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let output = Output {
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
    };
    let _ = std::fs::remove_dir_all(&dir);
    output
}

/// A fresh directory for one test (and one call), removed by the caller.
fn temp_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "firewall-test-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
