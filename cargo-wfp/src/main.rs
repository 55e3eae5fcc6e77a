//! `cargo wfp`: create, build, check and package wfp-rs drivers. See `cargo wfp --help` and the
//! library's documentation.

use std::path::PathBuf;
use std::process::ExitCode;

use cargo_wfp::build::BuildOptions;
use cargo_wfp::new::{NewOptions, Template};
use cargo_wfp::package::PackageOptions;
use cargo_wfp::{Error, image};
use clap::{Args, Parser, Subcommand};

/// Cargo runs `cargo-wfp wfp ARGS` for `cargo wfp ARGS`.
#[derive(Parser)]
#[command(name = "cargo", bin_name = "cargo")]
enum Cargo {
    /// Create, build, check and package Windows Filtering Platform drivers written with wfp-rs.
    #[command(version, about, long_about = None)]
    Wfp(Wfp),
}

#[derive(Args)]
struct Wfp {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a driver project (a crate, or a workspace for `firewall`) that builds and tests
    /// as generated.
    New {
        /// The project name: lower-case letters, digits and `-` (e.g. `acme-guard`).
        name: String,
        /// minimal: an entry point and work items; callout: a callout that logs and blocks
        /// connections; firewall: driver, protocol, rules and user-mode service.
        #[arg(long, default_value = "minimal", value_parser = parse_template)]
        template: Template,
        /// The folder to create (default: ./NAME).
        #[arg(long, value_name = "DIR")]
        path: Option<PathBuf>,
        /// Use a local checkout of wfp-rs: writes `[patch.crates-io]` entries that point the
        /// SDK crates at DIR.
        #[arg(long, value_name = "DIR")]
        sdk_path: Option<PathBuf>,
    },
    /// Build the driver packages as kernel images (NAME.sys) for x86_64-pc-windows-msvc and
    /// check them (native subsystem, WDM, kernel imports only, entry point, stack depth).
    Build {
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Build, check and write an installable folder per driver: NAME.sys (test-signed where
    /// osslsigncode is installed), the INF with DriverVer stamped, INSTALL.txt.
    Package {
        #[command(flatten)]
        build: BuildArgs,
        /// The folder to write (default: target/wfp-package/PKG).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// Build the release profile.
    #[arg(long)]
    release: bool,
    /// A driver package to build (repeatable; default: every driver package).
    #[arg(short = 'p', long = "package", value_name = "PKG")]
    packages: Vec<String>,
    /// Path to Cargo.toml.
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
    /// The budget in bytes for the driver's own stack frames on any path.
    #[arg(long, value_name = "BYTES", default_value_t = wfp_rs_stack::DEFAULT_BUDGET)]
    stack_budget: u64,
}

impl BuildArgs {
    fn options(&self) -> BuildOptions {
        BuildOptions {
            manifest_path: self.manifest_path.clone(),
            packages: self.packages.clone(),
            release: self.release,
        }
    }
}

fn parse_template(s: &str) -> Result<Template, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn main() -> ExitCode {
    // `cargo wfp ...` runs `cargo-wfp wfp ...`; accept `cargo-wfp ...` run directly too.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|arg| arg != "wfp") {
        args.insert(1, "wfp".into());
    }
    let Cargo::Wfp(wfp) = Cargo::parse_from(args);
    match run(wfp.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            if let Some(hint) = error.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(error.kind().exit_code())
        }
    }
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::New {
            name,
            template,
            path,
            sdk_path,
        } => {
            let sdk_path = match sdk_path {
                Some(dir) => Some(check_sdk(&dir)?),
                None => None,
            };
            let options = NewOptions {
                name: name.clone(),
                template,
                sdk_path,
            };
            let project = cargo_wfp::new::generate(&options, &mut uuid::Uuid::new_v4)?;
            let dir = path.unwrap_or_else(|| PathBuf::from(&name));
            cargo_wfp::new::write(&project, &dir)?;
            let guids = match project.guids.len() {
                0 => String::new(),
                n => format!(", with {n} fresh GUID(s) for its keys"),
            };
            eprintln!(
                "cargo wfp: created `{name}` ({template} template) in {}{guids}",
                dir.display(),
            );
            eprintln!(
                "next: cd {} && cargo test && cargo wfp build --release; README.md lists what \
                 to change before shipping",
                dir.display()
            );
            println!("{}", dir.display());
            Ok(())
        }
        Command::Build { build } => {
            let (_, built) = cargo_wfp::build::build(&build.options())?;
            for driver in &built {
                let (summary, report) = image::check_file(&driver.sys, build.stack_budget)
                    .map_err(|problems| {
                        Error::failed(format!(
                            "{} is not a loadable driver image: {problems}",
                            driver.sys.display()
                        ))
                    })?;
                eprintln!(
                    "cargo wfp: {} checked: native WDM driver, DriverEntry at {:#x}, imports \
                     from {}; deepest stack path {} of {} bytes",
                    driver.sys.display(),
                    summary.entry_point,
                    summary
                        .imports
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    report.deepest().map_or(0, |entry| entry.depth.bytes),
                    report.budget
                );
                println!("{}", driver.sys.display());
            }
            Ok(())
        }
        Command::Package { build, out } => {
            let packaged = cargo_wfp::package::package(&PackageOptions {
                build: build.options(),
                out,
                stack_budget: build.stack_budget,
            })?;
            for package in &packaged {
                match (&package.certificate, &package.unsigned_reason) {
                    (Some(cer), _) => eprintln!(
                        "cargo wfp: {} test-signed; its certificate is {}",
                        package.sys.display(),
                        cer.display()
                    ),
                    (None, Some(reason)) => eprintln!("cargo wfp: note: {reason}"),
                    (None, None) => {}
                }
                eprintln!(
                    "cargo wfp: packaged in {} (DriverVer {}); the Windows commands are in \
                     INSTALL.txt",
                    package.dir.display(),
                    package.driver_ver
                );
                println!("{}", package.dir.display());
            }
            Ok(())
        }
    }
}

/// `dir` made absolute, if it is a wfp-rs checkout.
fn check_sdk(dir: &std::path::Path) -> Result<PathBuf, Error> {
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::usage(format!("--sdk-path {}: {e}", dir.display())))?;
    if !dir.join("wfp-rs").join("Cargo.toml").is_file() {
        return Err(Error::usage(format!(
            "--sdk-path {}: not a wfp-rs checkout (no wfp-rs/Cargo.toml in it)",
            dir.display()
        )));
    }
    Ok(dir)
}
