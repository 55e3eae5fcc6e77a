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
//!
//! (`cargo wfp build` passes those settings itself.) When a Windows build has no linker
//! configured, [`driver`] prints a warning that says so, next to cargo's "linker `link.exe` not
//! found"; and on every target it warns when the library's `crate-type` lacks `cdylib` or
//! `rlib`.

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
///
/// When no linker is configured for a Windows target on a host that is not Windows, it also
/// prints a warning that says how to configure one: cargo would otherwise run Visual Studio's
/// `link.exe`, and the build would fail with "linker `link.exe` not found" and advice to install
/// Visual Studio, which a wfp-rs driver does not need.
pub fn driver() {
    println!("cargo::rerun-if-changed=build.rs");
    let target = env::var("TARGET").unwrap_or_default();
    for arg in link_args_for(&target) {
        println!("cargo::rustc-cdylib-link-arg={arg}");
    }
    if let Ok(dir) = env::var("CARGO_MANIFEST_DIR") {
        let manifest = std::path::Path::new(&dir).join("Cargo.toml");
        println!("cargo::rerun-if-changed={}", manifest.display());
        if let Ok(text) = std::fs::read_to_string(&manifest)
            && let Some(warning) = crate_type_warning(&text)
        {
            println!("cargo::warning={warning}");
        }
    }
    let host = env::var("HOST").unwrap_or_default();
    // Cargo sets RUSTC_LINKER for a build script when a linker is configured for the target.
    let linker_configured = env::var_os("RUSTC_LINKER").is_some();
    if let Some(warning) = missing_linker_warning(&target, &host, linker_configured) {
        println!("cargo::warning={warning}");
    }
}

/// What [`driver`] warns about when the `[lib]` of `manifest` (a driver's `Cargo.toml`) lists its
/// crate types without `cdylib` (the kernel image) or `rlib` (what the driver's tests and the
/// simulator link: without it a test's `use my_driver::...` fails with "unresolved module or
/// unlinked crate"). A manifest without `crate-type` gets no warning: `cargo wfp build` says
/// that it has no driver package.
pub fn crate_type_warning(manifest: &str) -> Option<String> {
    let mut in_lib = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_lib = line == "[lib]";
            continue;
        }
        let Some(value) = line.strip_prefix("crate-type") else {
            continue;
        };
        if !in_lib {
            continue;
        }
        let missing: Vec<&str> = ["cdylib", "rlib"]
            .into_iter()
            .filter(|kind| !value.contains(&format!("\"{kind}\"")))
            .collect();
        if missing.is_empty() {
            return None;
        }
        return Some(format!(
            "a wfp-rs driver's library is both a `cdylib` (the kernel image) and an `rlib` (what \
             its tests and the simulator link); this one lacks {}: write crate-type = \
             [\"cdylib\", \"rlib\"] under [lib]",
            missing.join(" and ")
        ));
    }
    None
}

/// What [`driver`] warns about when the kernel image would be linked with Visual Studio's
/// `link.exe`: a Windows MSVC `target`, a `host` that is not Windows (where `link.exe` may be
/// installed and links the image too), and no linker configured.
pub fn missing_linker_warning(target: &str, host: &str, linker_configured: bool) -> Option<String> {
    if !target.ends_with("-pc-windows-msvc") || host.contains("-windows-") || linker_configured {
        return None;
    }
    // Cargo replays a build script's warnings until the script runs again, and adding the
    // linker later does not run it again: the text says how to clear it.
    Some(format!(
        "no linker was configured for {target} when this build script ran, so cargo links the \
         driver with Visual Studio's `link.exe` (\"linker `link.exe` not found\" without it); \
         wfp-rs drivers link with rustup's rust-lld: build with `cargo wfp build` (cargo \
         install cargo-wfp), or add `[target.{target}]`, `linker = \"rust-lld\"`, \
         `rustflags = [\"-Clinker-flavor=lld-link\"]` to .cargo/config.toml (then `touch \
         build.rs` to clear this warning)"
    ))
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

    #[test]
    fn a_library_without_both_crate_types_gets_a_warning() {
        let both = "[package]\nname = \"d\"\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n";
        assert_eq!(crate_type_warning(both), None);
        let image_only = "[lib]\ncrate-type = [\"cdylib\"]\n[dependencies]\n";
        let warning = crate_type_warning(image_only).expect("a warning");
        assert!(warning.contains("lacks rlib"), "{warning}");
        // Not under [lib]: some other table's key.
        assert_eq!(
            crate_type_warning("[lib]\n[other]\ncrate-type = [\"cdylib\"]\n"),
            None
        );
        assert_eq!(crate_type_warning("[package]\nname = \"d\"\n"), None);
    }

    #[test]
    fn a_windows_image_without_a_linker_gets_a_warning_off_windows_only() {
        let windows = "x86_64-pc-windows-msvc";
        let linux = "x86_64-unknown-linux-gnu";
        let warning = missing_linker_warning(windows, linux, false).expect("a warning");
        assert!(warning.contains("cargo wfp build"), "{warning}");
        assert!(warning.contains(r#"linker = "rust-lld""#), "{warning}");
        assert_eq!(missing_linker_warning(windows, linux, true), None);
        assert_eq!(missing_linker_warning(windows, windows, false), None);
        assert_eq!(missing_linker_warning(linux, linux, false), None);
    }
}

/// The README's code, compiled as doctests so the crates.io page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
