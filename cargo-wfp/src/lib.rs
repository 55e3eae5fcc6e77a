//! `cargo wfp`: create, build, check and package Windows Filtering Platform callout drivers
//! written with [wfp-rs](https://docs.rs/wfp-rs), on any host and without the WDK.
//!
//! The binary (`cargo install cargo-wfp`, then `cargo wfp --help`) has three commands:
//!
//! - `cargo wfp new NAME [--template minimal|callout|firewall]` writes a project that builds
//!   and tests as generated ([`new`]);
//! - `cargo wfp build [--release] [-p PKG]` builds the driver packages as kernel images
//!   (`NAME.sys`) for `x86_64-pc-windows-msvc` and checks them ([`build`], [`image`]);
//! - `cargo wfp package [--release] [-p PKG] [--out DIR]` writes an installable folder: the
//!   image, the INF with its `DriverVer` stamped, a test signature where `osslsigncode` is
//!   installed, and the Windows commands to install it ([`package`], [`inf`]).
//!
//! This library is what the binary runs; the wfp-rs repository's own tasks and tests use it
//! too. See the [README](https://github.com/wfp-rs/wfp-rs/blob/main/cargo-wfp/README.md) and
//! the guide [Building a driver image](https://github.com/wfp-rs/wfp-rs/blob/main/docs/building-drivers.md).

pub mod build;
pub mod error;
pub mod image;
pub mod inf;
pub mod new;
pub mod package;

pub use error::{Error, ErrorKind};

/// The target triple of Windows kernel drivers on x64.
pub const DRIVER_TARGET: &str = "x86_64-pc-windows-msvc";
