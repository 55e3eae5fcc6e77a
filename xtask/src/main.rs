//! Repository tasks for wfp-rs, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! `cargo xtask driver <package>` builds a workspace package as a Windows kernel driver image
//! for `x86_64-pc-windows-msvc`, copies `<crate>.dll` to `<crate>.sys` next to it and prints the
//! path of the `.sys` file on stdout (progress and errors go to stderr). The driver integration
//! test (`tests/driver_image.rs`) runs this command. The build, the rename and the checks are
//! `cargo-wfp`'s library, the code behind `cargo wfp build`, so they exist once.
//!
//! `cargo xtask templates` copies the examples `cargo wfp new` generates projects from into
//! `cargo-wfp/templates/`.
//!
//! `cargo xtask stack <package>` builds the image the same way and checks its worst-case stack
//! depth with `wfp-rs-stack` (frame sizes from the x64 unwind data, the call graph from the
//! code); it exits with status 1 when a path exceeds the budget.
//!
//! `cargo xtask publishable` prints the workspace packages that may be published (those without
//! `publish = false`), one per line, for `.ci/run`'s packaging step: a new crate is packaged and
//! checked as soon as it joins the workspace. `cargo xtask docs-rs` prints, for each of them,
//! the documentation builds docs.rs would run (target and features from the package's
//! `[package.metadata.docs.rs]`), which `.ci/run` then runs.

mod publish;

use std::env;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cargo_wfp::DRIVER_TARGET;

/// Exit status when the command line is wrong.
const EXIT_USAGE: u8 = 2;

/// Exit status when the standard library for [`DRIVER_TARGET`] is not installed. The driver
/// image test treats this status (and only this one) as "skip".
const EXIT_TARGET_MISSING: u8 = 3;

const HELP: &str = "\
cargo xtask: repository tasks for wfp-rs

USAGE:
    cargo xtask driver <package> [--debug]
    cargo xtask stack <package> [--debug] [--budget <bytes>]
    cargo xtask templates
    cargo xtask publishable
    cargo xtask docs-rs
    cargo xtask soak [<firewall-soak options>]
    cargo xtask soak --prop <cases>
    cargo xtask --help

COMMANDS:
    driver <package>    Build <package> as a Windows kernel driver image as `cargo wfp build`
                        does (cargo-wfp's library):
                          cargo build --release --target x86_64-pc-windows-msvc -p <package>
                        with the linker settings passed by --config, then copy <crate>.dll to
                        <crate>.sys next to it and print the path of the .sys file. The
                        package needs a `cdylib` library target and wfp-rs-build's build
                        script (rust-lld, so no Windows SDK or WDK is needed).
    stack <package>     Build the image as `driver` does, then compute the worst-case
                        stack depth of every routine the kernel can call (DriverEntry,
                        exports, every function whose address is taken) from the image's
                        x64 unwind data and call graph, print the report, and fail when a
                        bounded path exceeds the budget. Recursion and indirect calls are
                        listed as unbounded sites. See docs/building-drivers.md.
    templates           Copy the examples that `cargo wfp new` generates projects from
                        (examples/minimal-driver, examples/starter, examples/firewall/*)
                        into cargo-wfp/templates/. Run it after changing an example;
                        cargo-wfp's test `templates_are_the_examples` fails until then.
    publishable         Print the workspace packages that may be published (every one
                        without `publish = false`), one per line, in workspace order.
    docs-rs             Print the documentation builds docs.rs runs for each publishable
                        package, one per line: `<package> <target> [<feature flags>...]`,
                        from its [package.metadata.docs.rs] (default-target, targets,
                        features, all-features, no-default-features). Only the targets
                        x86_64-unknown-linux-gnu and x86_64-pc-windows-msvc are printed;
                        others a package asks for are named on stderr.
    soak                Build the example firewall's soak (examples/firewall/soak)
                        in release and run it: a million connections through the firewall
                        in the simulator on real threads, with random service faults and
                        allocation failures, every decision checked, nothing left after
                        unload; prints decisions, faults, leaks and time. Options go to it:
                        --connections <n>, --seed <n>, --clients <n>, --phase <n>,
                        --design channel|port, and --deterministic for the other half: the
                        same workload on a deterministic machine (seeded scheduling, virtual
                        time; prints the schedule's fingerprint and the replay command)
                        (`cargo xtask soak --help`). See docs/reliability.md.
    soak --prop <cases> Run the property-harness tests of the example firewall
                        (firewall-bench's `properties`) and of seed-fixed (`properties`),
                        each on both of its designs, in release over <cases> seeds per
                        design (WFP_PROP_CASES=<cases>), instead of the connection soak.

OPTIONS:
    --debug             Build with the dev profile instead of release
                        (output in target/x86_64-pc-windows-msvc/debug/).
    --budget <bytes>    (stack) The budget for the driver's own frames
                        (default 12288: half of the 24 KiB x64 kernel stack).
    -h, --help          Print this help.

ENVIRONMENT:
    CARGO               The cargo to run (`cargo xtask` sets it; default: cargo).
    RUSTC               The rustc asked whether the target is installed (default: rustc).
    CARGO_TARGET_DIR    Where to build; like any other target-dir setting it is honoured
                        (the output path is read from `cargo metadata`).
    RUSTFLAGS           Passed on as CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_RUSTFLAGS, which
                        cargo adds to the target rustflags in .cargo/config.toml
                        (RUSTFLAGS itself would replace them, dropping -Clinker-flavor).

EXIT STATUS:
    0  success
    1  the build or the copy failed, or (stack) the stack check failed
    2  usage error
    3  the x86_64-pc-windows-msvc standard library is not installed
       (fix: rustup target add x86_64-pc-windows-msvc)

EXAMPLES:
    cargo xtask driver minimal-driver
    cargo xtask stack firewall-driver --debug
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}

/// The packages whose `properties` test `cargo xtask soak --prop` runs: the example firewall's
/// and seed-fixed's (each on both of its designs).
const PROPERTY_TEST_PACKAGES: [&str; 2] = ["firewall-bench", "seed-fixed"];

/// `cargo xtask soak --prop <cases>`: the drivers' property tests in release, in one build,
/// with `WFP_PROP_CASES=<cases>` (seeds per design); each test prints the cases
/// that reached each effect and cargo how long each binary took.
fn prop_soak(cases: u64) -> Result<(), Error> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "soak: the property tests of {} over {cases} cases each (release)",
        PROPERTY_TEST_PACKAGES.join(", ")
    );
    let started = std::time::Instant::now();
    let mut command = std::process::Command::new(&cargo);
    command
        .current_dir(workspace_root())
        .env("WFP_PROP_CASES", cases.to_string())
        .args(["test", "--release", "--quiet"]);
    for package in PROPERTY_TEST_PACKAGES {
        command.args(["-p", package]);
    }
    let status = command
        .args(["--test", "properties", "--", "--nocapture"])
        .status()
        .map_err(|e| Error::Failed(format!("could not run cargo: {e}")))?;
    if !status.success() {
        return Err(Error::Failed(format!(
            "a property test failed over {cases} cases ({status}); its output names the seed \
             and the command that replays it"
        )));
    }
    println!(
        "soak: {cases} cases per driver and design held every property, in {:.1} s (build \
         included)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Why a task failed.
#[derive(Debug)]
enum Error {
    /// The command line was wrong.
    Usage(String),
    /// The standard library for [`DRIVER_TARGET`] is not installed.
    TargetMissing(String),
    /// Anything else.
    Failed(String),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::TargetMissing(_) => EXIT_TARGET_MISSING,
            Error::Failed(_) => 1,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Error::Usage(_) => Some("run `cargo xtask --help` for usage".into()),
            Error::TargetMissing(_) => Some(format!("rustup target add {DRIVER_TARGET}")),
            Error::Failed(_) => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) | Error::TargetMissing(msg) | Error::Failed(msg) => f.write_str(msg),
        }
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    match args.first().map(String::as_str) {
        None => Err(Error::Usage("no command given".into())),
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            Ok(())
        }
        Some("driver") => {
            let options = DriverOptions::parse(&args[1..])?;
            let Some(options) = options else {
                print!("{HELP}");
                return Ok(());
            };
            let sys = build_driver(&options)?;
            println!("{}", sys.display());
            Ok(())
        }
        Some("stack") => {
            let (options, budget) = match StackOptions::parse(&args[1..])? {
                Some(parsed) => parsed,
                None => {
                    print!("{HELP}");
                    return Ok(());
                }
            };
            let sys = build_driver(&options)?;
            let report = wfp_rs_stack::analyze_file(&sys, &wfp_rs_stack::Options { budget })
                .map_err(|e| Error::Failed(format!("{}: {e}", sys.display())))?;
            println!("{}", sys.display());
            print!("{report}");
            if report.passed() {
                Ok(())
            } else {
                Err(Error::Failed(format!(
                    "the stack check of {} failed (see the report above)",
                    sys.display()
                )))
            }
        }
        Some("templates") => {
            let count = write_templates()?;
            eprintln!("xtask: wrote {count} template files to cargo-wfp/templates/");
            Ok(())
        }
        Some("publishable") => {
            for package in publish::publishable(&workspace_root()).map_err(Error::Failed)? {
                println!("{}", package.name);
            }
            Ok(())
        }
        Some("docs-rs") => {
            for package in publish::publishable(&workspace_root()).map_err(Error::Failed)? {
                for target in package.docs_rs.targets() {
                    if !publish::DOCS_RS_TARGETS_CHECKED.contains(&target) {
                        eprintln!(
                            "note: docs.rs also documents {} for {target}; not checked here",
                            package.name
                        );
                        continue;
                    }
                    let mut line = format!("{} {target}", package.name);
                    for flag in package.docs_rs.feature_flags() {
                        line.push(' ');
                        line.push_str(&flag);
                    }
                    println!("{line}");
                }
            }
            Ok(())
        }
        Some("soak") if args.get(1).is_some_and(|a| a == "--prop") => {
            let cases = match args.get(2).map(|n| n.parse::<u64>()) {
                Some(Ok(cases)) if cases > 0 && args.len() == 3 => cases,
                _ => {
                    return Err(Error::Usage(
                        "`cargo xtask soak --prop <cases>` takes a number of cases (at least \
                         one) and nothing else"
                            .into(),
                    ));
                }
            };
            prop_soak(cases)
        }
        Some("soak") => {
            let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(workspace_root())
                .args(["run", "--release", "--quiet", "-p", "firewall-soak", "--"])
                .args(&args[1..])
                .status()
                .map_err(|e| Error::Failed(format!("could not run cargo: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::Failed(format!("the soak failed ({status})")))
            }
        }
        Some(other) => Err(Error::Usage(format!(
            "unknown command `{other}` (the commands are `driver`, `stack`, `templates`, \
             `publishable`, `docs-rs` and `soak`)"
        ))),
    }
}

/// What `cargo xtask driver` was asked to do.
#[derive(Debug, PartialEq, Eq)]
struct DriverOptions {
    package: String,
    release: bool,
}

impl DriverOptions {
    /// Parses the arguments after `driver`; `Ok(None)` means help was asked for.
    fn parse(args: &[String]) -> Result<Option<Self>, Error> {
        let mut package = None;
        let mut release = true;
        for arg in args {
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--debug" => release = false,
                "--release" => release = true,
                flag if flag.starts_with('-') => {
                    return Err(Error::Usage(format!(
                        "unknown option `{flag}` for `driver`"
                    )));
                }
                name => {
                    if let Some(first) = &package {
                        return Err(Error::Usage(format!(
                            "`driver` takes one package, got `{first}` and `{name}`"
                        )));
                    }
                    package = Some(name.to_owned());
                }
            }
        }
        let package = package.ok_or_else(|| {
            Error::Usage(
                "`driver` needs a package name, e.g. `cargo xtask driver minimal-driver`".into(),
            )
        })?;
        Ok(Some(Self { package, release }))
    }
}

/// What `cargo xtask stack` was asked to do: the build, and the budget.
struct StackOptions;

impl StackOptions {
    /// Parses the arguments after `stack`; `Ok(None)` means help was asked for.
    fn parse(args: &[String]) -> Result<Option<(DriverOptions, u64)>, Error> {
        let mut rest = Vec::new();
        let mut budget = wfp_rs_stack::DEFAULT_BUDGET;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if arg == "--budget" {
                let value = args
                    .next()
                    .ok_or_else(|| Error::Usage("`--budget` needs a number of bytes".into()))?;
                budget = value.parse().map_err(|_| {
                    Error::Usage(format!("`--budget {value}`: expected a number of bytes"))
                })?;
            } else {
                rest.push(arg.clone());
            }
        }
        Ok(DriverOptions::parse(&rest)?.map(|options| (options, budget)))
    }
}

/// Builds `options.package` for [`DRIVER_TARGET`] with `cargo_wfp::build` (the code behind
/// `cargo wfp build`), which writes `<crate>.sys` beside the `.dll` (and the linker map beside
/// it), and returns the path of the `.sys`.
fn build_driver(options: &DriverOptions) -> Result<PathBuf, Error> {
    let (_, built) = cargo_wfp::build::build(&cargo_wfp::build::BuildOptions {
        manifest_path: Some(workspace_root().join("Cargo.toml")),
        packages: vec![options.package.clone()],
        release: options.release,
    })
    .map_err(|error| {
        let message = match error.hint() {
            Some(hint) => format!("{error}\nhint: {hint}"),
            None => error.to_string(),
        };
        match error.kind() {
            cargo_wfp::ErrorKind::Usage => Error::Usage(message),
            cargo_wfp::ErrorKind::TargetMissing => Error::TargetMissing(message),
            cargo_wfp::ErrorKind::Failed => Error::Failed(message),
        }
    })?;
    built
        .into_iter()
        .next()
        .map(|driver| driver.sys)
        .ok_or_else(|| Error::Failed(format!("`{}` built no image", options.package)))
}

/// Copies the examples into `cargo-wfp/templates/`, removing files no example has any more.
/// `cargo-wfp`'s test `templates_are_the_examples` fails until this has run after an example
/// changed.
fn write_templates() -> Result<usize, Error> {
    let workspace = workspace_root();
    let wanted = cargo_wfp::new::templates_from_examples(&workspace)
        .map_err(|e| Error::Failed(e.to_string()))?;
    let root = workspace.join("cargo-wfp").join("templates");
    if root.exists() {
        fs::remove_dir_all(&root)
            .map_err(|e| Error::Failed(format!("could not remove {}: {e}", root.display())))?;
    }
    for (path, data) in &wanted {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| {
                Error::Failed(format!("could not create {}: {e}", parent.display()))
            })?;
        }
        fs::write(&path, data)
            .map_err(|e| Error::Failed(format!("could not write {}: {e}", path.display())))?;
    }
    Ok(wanted.len())
}

/// The workspace this xtask belongs to (its package sits in `<workspace>/xtask`).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn driver_options() {
        assert_eq!(
            DriverOptions::parse(&args(&["minimal-driver"])).unwrap(),
            Some(DriverOptions {
                package: "minimal-driver".into(),
                release: true
            })
        );
        assert_eq!(
            DriverOptions::parse(&args(&["--debug", "minimal-driver"])).unwrap(),
            Some(DriverOptions {
                package: "minimal-driver".into(),
                release: false
            })
        );
        assert_eq!(DriverOptions::parse(&args(&["x", "--help"])).unwrap(), None);
        assert!(matches!(
            DriverOptions::parse(&args(&[])),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            DriverOptions::parse(&args(&["a", "b"])),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            DriverOptions::parse(&args(&["--frobnicate", "a"])),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn stack_options() {
        let (options, budget) = StackOptions::parse(&args(&["starter", "--debug"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            options,
            DriverOptions {
                package: "starter".into(),
                release: false
            }
        );
        assert_eq!(budget, wfp_rs_stack::DEFAULT_BUDGET);
        let (_, budget) = StackOptions::parse(&args(&["--budget", "8192", "starter"]))
            .unwrap()
            .unwrap();
        assert_eq!(budget, 8192);
        assert!(matches!(
            StackOptions::parse(&args(&["starter", "--budget"])),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            StackOptions::parse(&args(&["starter", "--budget", "12k"])),
            Err(Error::Usage(_))
        ));
        assert!(StackOptions::parse(&args(&["--help"])).unwrap().is_none());
    }
}
