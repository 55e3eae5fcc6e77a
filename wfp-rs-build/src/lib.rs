//! Build-script support for wfp-rs driver crates.
//!
//! A driver crate is a `cdylib` (the kernel image) and an `rlib` (what the simulator and tests
//! link). When it is built for Windows, the cdylib must be linked as a kernel driver; this crate
//! adds the linker arguments for that, and nothing for any other target:
//!
//! ```text
//! // build.rs of a driver crate
//! fn main() {
//!     wfp_rs_build::driver();
//! }
//! ```
//!
//! `.cargo/config.toml` must select the LLVM linker for the target (see the repository's
//! `docs/building-drivers.md`):
//!
//! ```text
//! [target.x86_64-pc-windows-msvc]
//! linker = "rust-lld"
//! rustflags = ["-Clinker-flavor=lld-link"]
//! ```

use std::env;

/// The linker arguments of a WDM kernel driver image, with why each is there.
pub const DRIVER_LINK_ARGS: &[(&str, &str)] = &[
    ("/SUBSYSTEM:NATIVE,10.00", "a kernel-mode image"),
    (
        "/DRIVER:WDM",
        "sets the WDM-driver characteristic the loader expects",
    ),
    (
        "/ENTRY:DriverEntry",
        "the entry point #[driver_entry] exports",
    ),
    (
        "/NODEFAULTLIB",
        "no C runtime: nothing from user mode may be imported",
    ),
    (
        "/RELEASE",
        "writes the PE checksum Windows verifies for drivers",
    ),
    ("/MERGE:.rdata=.text", "fewer sections"),
    (
        "/MAP",
        "writes <crate>.map (every function's address) beside the image in deps/, which \
         the stack check (wfp-rs-stack, run by `cargo wfp build`) uses to name functions; the \
         image itself is unchanged",
    ),
];

/// Emits the kernel-image linker arguments when the crate is built for a Windows MSVC target,
/// and nothing otherwise. Call it from the driver crate's `build.rs`.
pub fn driver() {
    println!("cargo::rerun-if-changed=build.rs");
    let target = env::var("TARGET").unwrap_or_default();
    for arg in link_args_for(&target) {
        println!("cargo::rustc-cdylib-link-arg={arg}");
    }
}

/// The linker arguments [`driver`] emits for `target`.
pub fn link_args_for(target: &str) -> Vec<&'static str> {
    if target.ends_with("-pc-windows-msvc") {
        DRIVER_LINK_ARGS.iter().map(|(arg, _)| *arg).collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_windows_msvc_targets_get_driver_link_arguments() {
        assert_eq!(
            link_args_for("x86_64-unknown-linux-gnu"),
            Vec::<&str>::new()
        );
        let windows = link_args_for("x86_64-pc-windows-msvc");
        assert!(windows.contains(&"/DRIVER:WDM"));
        assert!(windows.contains(&"/ENTRY:DriverEntry"));
        assert_eq!(windows.len(), DRIVER_LINK_ARGS.len());
    }
}

/// The README's code, compiled as doctests so the crates.io page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
