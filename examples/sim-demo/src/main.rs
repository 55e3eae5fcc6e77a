//! The simulator demo: boot a simulated Windows machine on this host, load the minimal driver,
//! drive it from DISPATCH_LEVEL, unload it, and show the verifier stopping a buggy driver.
//!
//! Run: `cargo run -p sim-demo` (on a Windows host: `cargo run -p sim-demo --features sim`).

#[cfg(any(not(windows), feature = "sim"))]
mod demo;

#[cfg(any(not(windows), feature = "sim"))]
fn main() -> std::process::ExitCode {
    demo::run()
}

#[cfg(all(windows, not(feature = "sim")))]
fn main() -> std::process::ExitCode {
    eprintln!("the demo runs on the simulator: cargo run -p sim-demo --features sim");
    std::process::ExitCode::FAILURE
}
