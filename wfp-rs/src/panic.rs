//! The opt-in panic handler for driver images (feature `panic-handler`).
//!
//! A panic in kernel code cannot unwind, and returning would continue in a broken state, so the
//! handler reports the location to the debugger and stops the machine with
//! `KMODE_EXCEPTION_NOT_HANDLED`.

use core::panic::PanicInfo;

use crate::bugcheck::{BugCheckCode, bug_check};

/// "Rust" in ASCII, as parameter 1: tells a crash-dump reader the exception was a Rust panic.
const RUST_PANIC: usize = 0x5275_7374;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
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
