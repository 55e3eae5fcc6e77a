//! The panic handler of driver images: [`panic_handler!`](crate::panic_handler).
//!
//! A panic in kernel code cannot unwind, and returning would continue in a broken state, so the
//! handler reports the location to the debugger and stops the machine with
//! `KMODE_EXCEPTION_NOT_HANDLED`.
//!
//! The handler is defined by the driver crate (through the macro, which `#[driver_entry]` expands
//! by default), not by this crate: a `#[panic_handler]` here would be linked into every crate
//! that depends on wfp-rs for Windows, including user-mode services that link std and its own
//! panic handler.

/// Defines the driver image's `#[panic_handler]`: print the panic to the kernel debugger, then
/// bug check with `KMODE_EXCEPTION_NOT_HANDLED` (0x1E), parameter 1 `0x52757374` ("Rust" in
/// ASCII) and parameter 2 the line of the panic.
///
/// `#[wfp_rs::driver_entry]` expands this macro, so a driver does not write it; a driver that
/// defines its own handler opts out with `#[driver_entry(no_panic_handler)]`. Invoke it once, at
/// the root of a driver crate that has no `#[driver_entry]` (for example a library image).
///
/// With the simulator backend it expands to nothing: there the driver is host code and panics
/// go through std, whose hook the simulator (`wfp-rs-sim`) sets so that a panic in driver code
/// stops the machine with the same `KMODE_EXCEPTION_NOT_HANDLED` (a panic in test code stays an
/// ordinary panic). It also expands to nothing when wfp-rs is built with the feature `user`,
/// which links std and with it std's panic handler: that happens
/// to a driver crate when a single cargo command builds it together with a service (cargo
/// unifies the feature), for example `cargo check --workspace`. Such a build checks, but is not
/// a driver image; build images on their own (`cargo wfp build -p <package>`).
///
/// A driver image built with `panic = "unwind"` does not compile: the macro says which profile
/// settings to add (rustc alone would say "unwinding panics are not supported without std" and
/// suggest a nightly `-Zbuild-std`).
#[cfg(all(wfp_nt, not(feature = "user")))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(windows, not(feature = "sim"), not(feature = "user"))))
)]
#[macro_export]
macro_rules! panic_handler {
    () => {
        // Evaluated in the driver crate, which is what the profile's `panic` applies to.
        #[cfg(all(panic = "unwind", not(doc)))]
        ::core::compile_error!(
            "a kernel image cannot unwind, but this driver is built with panic = \"unwind\": add \
             `[profile.dev] panic = \"abort\"` and `[profile.release] panic = \"abort\"` to the \
             Cargo.toml of the workspace root (the driver's own, outside a workspace), or build \
             with `cargo wfp build`, which sets them"
        );
        #[panic_handler]
        fn __wfp_rs_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::panic::__bug_check_on_panic(info)
        }
    };
}

/// Defines the driver image's `#[panic_handler]`: print the panic to the kernel debugger, then
/// bug check with `KMODE_EXCEPTION_NOT_HANDLED` (0x1E), parameter 1 `0x52757374` ("Rust" in
/// ASCII) and parameter 2 the line of the panic.
///
/// `#[wfp_rs::driver_entry]` expands this macro, so a driver does not write it; a driver that
/// defines its own handler opts out with `#[driver_entry(no_panic_handler)]`. Invoke it once, at
/// the root of a driver crate that has no `#[driver_entry]` (for example a library image).
///
/// With the simulator backend it expands to nothing: there the driver is host code and panics
/// go through std, whose hook the simulator (`wfp-rs-sim`) sets so that a panic in driver code
/// stops the machine with the same `KMODE_EXCEPTION_NOT_HANDLED` (a panic in test code stays an
/// ordinary panic). It also expands to nothing when wfp-rs is built with the feature `user`,
/// which links std and with it std's panic handler: that happens
/// to a driver crate when a single cargo command builds it together with a service (cargo
/// unifies the feature), for example `cargo check --workspace`. Such a build checks, but is not
/// a driver image; build images on their own (`cargo wfp build -p <package>`). This build is one
/// of those two cases.
#[cfg(any(wfp_sim, feature = "user"))]
#[cfg_attr(docsrs, doc(cfg(any(not(windows), feature = "sim", feature = "user"))))]
#[macro_export]
macro_rules! panic_handler {
    () => {};
}

#[cfg(wfp_nt)]
use core::panic::PanicInfo;

#[cfg(wfp_nt)]
use crate::bugcheck::{BugCheckCode, bug_check};

/// "Rust" in ASCII, as parameter 1: tells a crash-dump reader the exception was a Rust panic.
#[cfg(wfp_nt)]
const RUST_PANIC: usize = 0x5275_7374;

/// The body of the handler [`panic_handler!`](crate::panic_handler) defines.
#[cfg(wfp_nt)]
#[doc(hidden)]
pub fn __bug_check_on_panic(info: &PanicInfo<'_>) -> ! {
    crate::debug::print_error(format_args!("wfp-rs: driver panicked: {info}\n"));
    let line = info.location().map_or(0, |l| l.line() as usize);
    bug_check(
        BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        RUST_PANIC,
        line,
        0,
        0,
    )
}
