//! `cargo wfp build`: build driver packages as Windows kernel images.
//!
//! A driver package is a workspace member with a `cdylib` library that depends on `wfp-rs`.
//! Each one is built on its own (`cargo build -p PKG`), so that a user-mode service in the same
//! workspace, which turns on wfp-rs's `user` feature (std, Win32), is not unified into it. The
//! link settings are passed with `--config`, so a project needs no `.cargo/config.toml`:
//!
//! ```text
//! cargo build --target x86_64-pc-windows-msvc -p PKG [--release]
//!     --config target.x86_64-pc-windows-msvc.linker="rust-lld"
//!     --config target.x86_64-pc-windows-msvc.rustflags=["-Clinker-flavor=lld-link"]
//!     --config profile.dev.panic="abort" --config profile.release.panic="abort"
//! ```
//!
//! The `.dll` cargo writes is copied to `NAME.sys` beside it, and the linker map
//! (`wfp-rs-build` links with `/MAP`) to `NAME.map`, where the stack check finds names.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cargo_metadata::{CrateType, DependencyKind, Metadata, MetadataCommand, Package, TargetKind};

use crate::{DRIVER_TARGET, Error, ErrorKind};

/// The link settings `cargo wfp build` passes with `--config`, so that a project needs no
/// `.cargo/config.toml`: rustup's LLVM linker in its `link.exe` flavor, and no unwinding
/// (kernel code cannot unwind).
pub const CONFIG: &[&str] = &[
    "target.x86_64-pc-windows-msvc.linker=\"rust-lld\"",
    "target.x86_64-pc-windows-msvc.rustflags=[\"-Clinker-flavor=lld-link\"]",
    "profile.dev.panic=\"abort\"",
    "profile.release.panic=\"abort\"",
];

/// What to build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// The project's `Cargo.toml` (default: cargo's search from the current directory).
    pub manifest_path: Option<PathBuf>,
    /// The driver packages to build (default: every driver package of the workspace).
    pub packages: Vec<String>,
    /// Build the `release` profile instead of `dev`.
    pub release: bool,
}

/// A driver package of a workspace, as `cargo metadata` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverPackage {
    /// The package name (`-p` takes it).
    pub name: String,
    /// The library's crate name: the stem of the `.dll` and `.sys`.
    pub crate_name: String,
    /// The package version (the INF's `DriverVer` is stamped from it).
    pub version: String,
    /// The directory of the package's `Cargo.toml`.
    pub dir: PathBuf,
}

/// A driver image `cargo wfp build` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltDriver {
    /// The package it was built from.
    pub package: DriverPackage,
    /// `<target>/x86_64-pc-windows-msvc/<profile>/<crate>.sys`.
    pub sys: PathBuf,
    /// The linker map beside it, when the link wrote one.
    pub map: Option<PathBuf>,
}

/// The project `cargo wfp` works on: its metadata and its driver packages.
#[derive(Clone, Debug)]
pub struct Project {
    /// The workspace's target directory.
    pub target_directory: PathBuf,
    /// The workspace root (where `Cargo.lock` is).
    pub workspace_root: PathBuf,
    /// The workspace's driver packages, in `cargo metadata` order.
    pub drivers: Vec<DriverPackage>,
    /// Every workspace member's name, for messages.
    pub members: Vec<String>,
    metadata: Metadata,
}

impl Project {
    /// Reads the project with `cargo metadata --no-deps`.
    pub fn read(manifest_path: Option<&Path>) -> Result<Self, Error> {
        let mut command = MetadataCommand::new();
        command.no_deps().cargo_path(cargo_program());
        if let Some(path) = manifest_path {
            command.manifest_path(path);
        }
        let metadata = command.exec().map_err(|e| {
            let text = e.to_string();
            let error = Error::failed(format!("`cargo metadata` failed: {}", text.trim()));
            if text.contains("could not find `Cargo.toml`") {
                error.with_hint(
                    "run `cargo wfp` in the driver's folder (or pass --manifest-path), or \
                         start a driver with `cargo wfp new NAME`",
                )
            } else {
                error
            }
        })?;
        let members: Vec<&Package> = metadata.workspace_packages();
        let drivers = members
            .iter()
            .filter_map(|package| driver_package(package))
            .collect();
        Ok(Self {
            target_directory: metadata.target_directory.clone().into_std_path_buf(),
            workspace_root: metadata.workspace_root.clone().into_std_path_buf(),
            drivers,
            members: members.iter().map(|p| p.name.to_string()).collect(),
            metadata,
        })
    }

    /// The driver packages `names` asks for (all of them when it is empty), or an error that
    /// says which packages are drivers.
    pub fn select(&self, names: &[String]) -> Result<Vec<DriverPackage>, Error> {
        if self.drivers.is_empty() {
            return Err(Error::failed(format!(
                "no driver package in this workspace (members: {}); a driver package has a \
                 `cdylib` library and depends on wfp-rs",
                self.members.join(", ")
            ))
            .with_hint(
                "add `crate-type = [\"cdylib\", \"rlib\"]` under `[lib]` in the driver's \
                 Cargo.toml, or start from `cargo wfp new NAME`",
            ));
        }
        if names.is_empty() {
            return Ok(self.drivers.clone());
        }
        let driver_list = self
            .drivers
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut selected = Vec::new();
        for name in names {
            if let Some(driver) = self.drivers.iter().find(|d| &d.name == name) {
                selected.push(driver.clone());
                continue;
            }
            let first = &self.drivers[0].name;
            let error = if self.members.iter().any(|m| m == name) {
                Error::usage(format!(
                    "`{name}` is not a driver package (no `cdylib` library depending on wfp-rs); \
                     the driver packages are: {driver_list}. A service or other user-mode crate \
                     is built with plain `cargo build`, never together with the driver: it turns \
                     on wfp-rs's `user` feature, which would be unified into the driver"
                ))
            } else {
                Error::usage(format!(
                    "no package `{name}` in this workspace; the driver packages are: {driver_list}"
                ))
            };
            return Err(error.with_hint(format!(
                "build a driver on its own: cargo wfp build -p {first}"
            )));
        }
        Ok(selected)
    }

    /// Fails with the lines to add when `driver` has no build script or does not use
    /// `wfp-rs-build` in it: without the kernel link flags the image would be a user-mode DLL.
    pub fn check_build_script(&self, driver: &DriverPackage) -> Result<(), Error> {
        let Some(package) = self
            .metadata
            .workspace_packages()
            .into_iter()
            .find(|p| p.name.as_str() == driver.name)
        else {
            return Ok(());
        };
        let has_script = package
            .targets
            .iter()
            .any(|t| t.kind.contains(&TargetKind::CustomBuild));
        let has_helper = package
            .dependencies
            .iter()
            .any(|d| d.name == "wfp-rs-build" && d.kind == DependencyKind::Build);
        if has_script && has_helper {
            return Ok(());
        }
        let manifest = driver.dir.join("Cargo.toml");
        let mut missing = Vec::new();
        if !has_helper {
            missing.push(format!(
                "add to {}:\n\n    [build-dependencies]\n    wfp-rs-build = \"0.1\"\n",
                manifest.display()
            ));
        }
        if !has_script {
            missing.push(format!(
                "create {}:\n\n    fn main() {{\n        wfp_rs_build::driver();\n    }}\n",
                driver.dir.join("build.rs").display()
            ));
        } else {
            missing.push(format!(
                "call `wfp_rs_build::driver();` from main() in {}\n",
                driver.dir.join("build.rs").display()
            ));
        }
        Err(Error::failed(format!(
            "driver package `{}` does not link as a kernel image: it has {}; wfp-rs-build's \
             build script adds the kernel-image linker arguments (/DRIVER:WDM, \
             /SUBSYSTEM:NATIVE, /ENTRY:DriverEntry, ...)",
            driver.name,
            if has_script {
                "a build script that does not use wfp-rs-build"
            } else {
                "no build script"
            }
        ))
        .with_hint(missing.join("\n")))
    }
}

/// `package` as a driver package, if it is one: a `cdylib` library and a dependency on wfp-rs.
fn driver_package(package: &Package) -> Option<DriverPackage> {
    let library = package
        .targets
        .iter()
        .find(|t| t.crate_types.contains(&CrateType::CDyLib))?;
    let uses_sdk = package
        .dependencies
        .iter()
        .any(|d| d.name == "wfp-rs" && d.kind == DependencyKind::Normal);
    if !uses_sdk {
        return None;
    }
    Some(DriverPackage {
        name: package.name.to_string(),
        crate_name: library.name.replace('-', "_"),
        version: package.version.to_string(),
        dir: package
            .manifest_path
            .parent()
            .map(|p| p.as_std_path().to_path_buf())
            .unwrap_or_default(),
    })
}

/// The cargo to run: the one that ran `cargo wfp` (cargo sets `CARGO` for subcommands).
pub fn cargo_program() -> PathBuf {
    env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// Builds the drivers `options` asks for and writes their `.sys` files. Each image is built
/// with its own `cargo build -p`; the first failure stops.
pub fn build(options: &BuildOptions) -> Result<(Project, Vec<BuiltDriver>), Error> {
    check_target_installed()?;
    let project = Project::read(options.manifest_path.as_deref())?;
    let drivers = project.select(&options.packages)?;
    let mut built = Vec::new();
    for driver in drivers {
        project.check_build_script(&driver)?;
        built.push(build_one(&project, &driver, options)?);
    }
    Ok((project, built))
}

/// Builds one driver package and writes its `.sys` (and `.map`).
fn build_one(
    project: &Project,
    driver: &DriverPackage,
    options: &BuildOptions,
) -> Result<BuiltDriver, Error> {
    let mut command = Command::new(cargo_program());
    command.args(["build", "--target", DRIVER_TARGET, "-p", &driver.name]);
    command.arg("--manifest-path");
    command.arg(project.workspace_root.join("Cargo.toml"));
    if options.release {
        command.arg("--release");
    }
    for config in CONFIG {
        command.args(["--config", config]);
    }
    keep_target_rustflags(&mut command)?;
    eprintln!(
        "cargo wfp: cargo build --target {DRIVER_TARGET} -p {}{}",
        driver.name,
        if options.release { " --release" } else { "" }
    );
    let (status, stderr) = run_teeing_stderr(&mut command)?;
    if !status.success() {
        let mut error = Error::failed(format!(
            "`cargo build` of `{}` failed ({status})",
            driver.name
        ));
        if let Some(hint) = diagnose(&stderr, &driver.name) {
            error = error.with_hint(hint);
        }
        return Err(error);
    }

    let out_dir = project
        .target_directory
        .join(DRIVER_TARGET)
        .join(if options.release { "release" } else { "debug" });
    let dll = out_dir.join(format!("{}.dll", driver.crate_name));
    let sys = dll.with_extension("sys");
    if !dll.is_file() {
        return Err(Error::failed(format!(
            "the build succeeded but {} does not exist",
            dll.display()
        )));
    }
    copy(&dll, &sys)?;
    // The linker map (`/MAP` from wfp-rs-build) stays in deps/; put it beside the image, where
    // the stack check looks for function names. An image linked without it has none.
    let map = sys.with_extension("map");
    let linked_map = out_dir
        .join("deps")
        .join(format!("{}.map", driver.crate_name));
    let map = if linked_map.is_file() {
        copy(&linked_map, &map)?;
        Some(map)
    } else {
        if map.is_file() {
            // A stale map from an earlier link would name the wrong functions.
            fs::remove_file(&map)
                .map_err(|e| Error::failed(format!("could not remove {}: {e}", map.display())))?;
        }
        None
    };
    Ok(BuiltDriver {
        package: driver.clone(),
        sys,
        map,
    })
}

fn copy(from: &Path, to: &Path) -> Result<(), Error> {
    fs::copy(from, to).map(drop).map_err(|e| {
        Error::failed(format!(
            "could not copy {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Runs `command`, passing its stderr through line by line and keeping a copy to diagnose.
fn run_teeing_stderr(command: &mut Command) -> Result<(std::process::ExitStatus, String), Error> {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::failed(format!("could not run cargo: {e}")))?;
    let mut kept = String::new();
    if let Some(stderr) = child.stderr.take() {
        let mut out = std::io::stderr();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(out, "{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::failed(format!("could not wait for cargo: {e}")))?;
    Ok((status, kept))
}

/// What to do about a failed driver build, from cargo's and the linker's messages.
///
/// ```
/// let hint = cargo_wfp::build::diagnose(
///     "rust-lld: error: could not open 'kernel32.lib': No such file or directory",
///     "my-driver",
/// )
/// .unwrap();
/// assert!(hint.contains("cargo wfp build -p my-driver"));
///
/// let hint = cargo_wfp::build::diagnose(
///     "error[E0152]: found duplicate lang item `panic_impl`\n  = note: the lang item is first \
///      defined in crate `std` (which `my_driver` depends on)",
///     "my-driver",
/// )
/// .unwrap();
/// assert!(hint.contains("`#![no_std]`"));
/// ```
pub fn diagnose(stderr: &str, package: &str) -> Option<String> {
    // `#[driver_entry]` defines the image's panic handler; std has one too.
    const STD_PANIC_HANDLER: &str = "first defined in crate `std` (which `";
    if stderr.contains("duplicate lang item `panic_impl`")
        && let Some(rest) = stderr.split(STD_PANIC_HANDLER).nth(1)
    {
        let linker_of_std = rest.split('`').next().unwrap_or_default();
        return Some(if linker_of_std == package.replace('-', "_") {
            format!(
                "the driver crate links std, which a kernel image cannot have: put \
                 `#![no_std]` (and `extern crate alloc;` for Box, Vec, ...) at the top of \
                 {package}'s src/lib.rs"
            )
        } else {
            format!(
                "`{linker_of_std}` links std into the driver, which a kernel image cannot \
                 have: depend on it without its std feature (`default-features = false`, if it \
                 has a no_std mode) or use a no_std crate instead"
            )
        });
    }
    let user_mode_library = [
        "kernel32.lib",
        "ntdll.lib",
        "msvcrt.lib",
        "ucrt.lib",
        "ws2_32.lib",
    ]
    .iter()
    .any(|lib| stderr.to_ascii_lowercase().contains(lib));
    if user_mode_library {
        return Some(format!(
            "user-mode code was linked into the driver: wfp-rs's `user` feature (std and Win32, \
             for a service) was turned on for it. Cargo unifies features across the packages \
             of one command, so a driver built together with a service gets it: build the \
             driver alone with `cargo wfp build -p {package}` (plain cargo: `cargo build \
             --target {DRIVER_TARGET} -p {package}`). If it still fails, the driver itself \
             enables `user` through one of its dependencies; `cargo tree -p {package} --target \
             {DRIVER_TARGET} -e features -i wfp-rs` shows which"
        ));
    }
    if stderr.contains("unwinding panics are not supported without std") {
        return Some(
            "the driver was compiled with unwinding: kernel code needs `panic = \"abort\"`. \
             cargo wfp passes it for the dev and release profiles; a custom profile needs \
             `panic = \"abort\"` in its [profile.NAME] of the workspace's Cargo.toml"
                .into(),
        );
    }
    if stderr.contains("can't find crate for `core`")
        || stderr.contains("can't find crate for `std`")
    {
        return Some(format!("rustup target add {DRIVER_TARGET}"));
    }
    None
}

/// The environment variable that adds rustflags for [`DRIVER_TARGET`] only.
const TARGET_RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_RUSTFLAGS";

/// `RUSTFLAGS` and `CARGO_ENCODED_RUSTFLAGS` (CI often sets `RUSTFLAGS=-Dwarnings`) *replace*
/// the target rustflags of the configuration, and with them `-Clinker-flavor=lld-link`,
/// without which the driver does not link. Cargo merges the target-specific variable with the
/// configuration instead, so the flags move there. (With `--target` they applied only to
/// target crates anyway, so nothing else changes.)
fn keep_target_rustflags(build: &mut Command) -> Result<(), Error> {
    let flags: Vec<String> = if let Some(encoded) = env::var_os("CARGO_ENCODED_RUSTFLAGS") {
        let encoded = encoded
            .into_string()
            .map_err(|_| Error::failed("CARGO_ENCODED_RUSTFLAGS is not valid UTF-8"))?;
        let flags: Vec<String> = encoded
            .split('\x1f')
            .filter(|flag| !flag.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(flag) = flags.iter().find(|flag| flag.contains(char::is_whitespace)) {
            return Err(Error::failed(format!(
                "CARGO_ENCODED_RUSTFLAGS would replace the driver's link rustflags, and its flag \
                 `{flag}` contains whitespace, so it cannot be moved to {TARGET_RUSTFLAGS_VAR}"
            ))
            .with_hint("unset CARGO_ENCODED_RUSTFLAGS"));
        }
        flags
    } else if let Some(plain) = env::var_os("RUSTFLAGS") {
        plain
            .to_string_lossy()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    } else {
        return Ok(());
    };
    build.env_remove("CARGO_ENCODED_RUSTFLAGS");
    build.env_remove("RUSTFLAGS");
    if flags.is_empty() {
        return Ok(());
    }
    let mut target_flags = env::var(TARGET_RUSTFLAGS_VAR).unwrap_or_default();
    for flag in &flags {
        if !target_flags.is_empty() {
            target_flags.push(' ');
        }
        target_flags.push_str(flag);
    }
    eprintln!(
        "cargo wfp: passing `{}` as {TARGET_RUSTFLAGS_VAR} so that the linker flavor still applies",
        flags.join(" ")
    );
    build.env(TARGET_RUSTFLAGS_VAR, target_flags);
    Ok(())
}

/// Fails with [`ErrorKind::TargetMissing`] and the `rustup` line to run unless `core` is
/// installed for [`DRIVER_TARGET`] (otherwise the build would stop with "can't find crate for
/// `core`"). Asks the `rustc` in `RUSTC`, or on the path.
pub fn check_target_installed() -> Result<(), Error> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let hint = format!("rustup target add {DRIVER_TARGET}");
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", DRIVER_TARGET])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| {
            Error::failed(format!(
                "could not run `{} --print target-libdir`: {e}",
                rustc.to_string_lossy()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::new(
            ErrorKind::TargetMissing,
            format!(
                "`rustc --print target-libdir --target {DRIVER_TARGET}` failed ({}); is the \
                 target known to this toolchain?",
                output.status
            ),
        )
        .with_hint(hint));
    }
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let has_core = fs::read_dir(&libdir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libcore-") && name.ends_with(".rlib")
        })
    });
    if has_core {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::TargetMissing,
            format!(
                "the Rust standard library for {DRIVER_TARGET} is not installed (no \
                 libcore-*.rlib in {}); drivers are built for that target on any host",
                libdir.display()
            ),
        )
        .with_hint(hint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_mode_import_library_means_user_was_unified() {
        let hint = diagnose(
            "error: linking with `rust-lld` failed\n  = note: rust-lld: error: could not open \
             'kernel32.lib': No such file or directory\n",
            "acme-driver",
        )
        .expect("a hint");
        assert!(hint.contains("`user` feature"), "{hint}");
        assert!(hint.contains("cargo wfp build -p acme-driver"), "{hint}");
    }

    #[test]
    fn unknown_failures_get_no_hint() {
        assert_eq!(diagnose("error[E0425]: cannot find value `x`", "d"), None);
    }
}
