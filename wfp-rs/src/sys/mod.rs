//! The kernel's C ABI, with two interchangeable backends.
//!
//! - `nt` (compiling for Windows without the `sim` feature): `raw-dylib` imports from
//!   `ntoskrnl.exe`, `fwpkclnt.sys`, `fltmgr.sys` and `cng.sys`; no WDK and no import libraries are needed.
//! - `sim` (everywhere else): every function calls through a table that a simulated kernel
//!   installs — the `wfp-rs-sim` crate, which implements the same functions with the same
//!   signatures in Rust and stops with the real bug check where Windows would. Without it,
//!   calling one panics with a message that says to add `wfp-rs-sim`.
//!
//! The `#[repr(C)]` types are the same on both, and each function is declared once, for both
//! (`functions.rs`). The safe layer calls these functions by the same paths on both backends,
//! so the code that runs in the simulator is the code that runs in the kernel.
//!
//! Everything here is raw FFI: the names are the C names, and every function is `unsafe` with
//! the contract the WDK documents for it.

#![allow(
    non_snake_case,
    non_camel_case_types,
    non_upper_case_globals,
    missing_docs
)]

pub(crate) mod types;
pub use types::*;
mod fwp;
pub use fwp::*;
mod irp;
pub use irp::*;
mod flt;
pub use flt::*;
mod ndis;
pub use ndis::*;

mod functions;
pub use functions::*;

#[cfg(wfp_nt)]
mod nt;
#[cfg(wfp_nt)]
pub use nt::*;
