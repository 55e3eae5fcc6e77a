//! How the simulated machine stops.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::io::Write;

use crate::bugcheck::BugCheckCode as Code;
use crate::sys::types::*;

/// The line a bug check prints first; [`crate::sim::run_isolated`] parses it.
pub(crate) const STOP_PREFIX: &str = "*** STOP: ";

/// Stops the machine: prints the stop code the way the kernel debugger shows it, with the
/// simulator's explanation, and aborts the process. Nothing after a bug check runs, as on
/// Windows, so no test can pass by accident after one.
pub(crate) fn stop(code: Code, params: [usize; 4], why: &str) -> ! {
    // The report is the kernel's: it must not come out of the driver's pool (which may be
    // failing on purpose) when a driver's code is what stopped.
    let _kernel = super::kernel::KernelCode::enter();
    let name = code.name().unwrap_or("UNKNOWN_BUGCHECK");
    let text = format!(
        "\n{STOP_PREFIX}{:#010X} ({:#018X}, {:#018X}, {:#018X}, {:#018X})\n{name}\nwfp-rs simulator: {why}\nthread: {}\n",
        code.0,
        params[0],
        params[1],
        params[2],
        params[3],
        std::thread::current().name().unwrap_or("<unnamed>"),
    );
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
    std::process::abort();
}

/// `KeBugCheckEx`.
///
/// # Safety
///
/// None beyond the kernel's: it never returns.
pub unsafe extern "system" fn KeBugCheckEx(
    BugCheckCode: ULONG,
    BugCheckParameter1: ULONG_PTR,
    BugCheckParameter2: ULONG_PTR,
    BugCheckParameter3: ULONG_PTR,
    BugCheckParameter4: ULONG_PTR,
) -> ! {
    let _kernel = super::kernel::KernelCode::enter();
    stop(
        Code(BugCheckCode),
        [
            BugCheckParameter1,
            BugCheckParameter2,
            BugCheckParameter3,
            BugCheckParameter4,
        ],
        "KeBugCheckEx was called",
    )
}
