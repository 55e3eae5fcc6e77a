//! Repository tasks for wfp-rs, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! `cargo xtask driver <package>` builds a workspace package as a Windows kernel driver image
//! for `x86_64-pc-windows-msvc`, copies `<crate>.dll` to `<crate>.sys` next to it and prints the
//! path of the `.sys` file on stdout (progress and errors go to stderr). The driver integration
//! test (`tests/driver_image.rs`) runs this command, so the build-and-rename logic lives only
//! here.
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

use std::collections::BTreeMap;
use std::env;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde_json::Value;

/// The target triple of Windows kernel drivers on x64.
const DRIVER_TARGET: &str = "x86_64-pc-windows-msvc";

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
    cargo xtask publishable
    cargo xtask docs-rs
    cargo xtask --help

COMMANDS:
    driver <package>    Build <package> as a Windows kernel driver image:
                          cargo build --release --target x86_64-pc-windows-msvc -p <package>
                        then copy <crate>.dll to <crate>.sys next to it and print the path
                        of the .sys file. The package needs a `cdylib` library target; the
                        link flags come from its build.rs and .cargo/config.toml (rust-lld,
                        so no Windows SDK or WDK is needed).
    stack <package>     Build the image as `driver` does, then compute the worst-case
                        stack depth of every routine the kernel can call (DriverEntry,
                        exports, every function whose address is taken) from the image's
                        x64 unwind data and call graph, print the report, and fail when a
                        bounded path exceeds the budget. Recursion and indirect calls are
                        listed as unbounded sites. See docs/building-drivers.md.
    publishable         Print the workspace packages that may be published (every one
                        without `publish = false`), one per line, in workspace order.
    docs-rs             Print the documentation builds docs.rs runs for each publishable
                        package, one per line: `<package> <target> [<feature flags>...]`,
                        from its [package.metadata.docs.rs] (default-target, targets,
                        features, all-features, no-default-features). Only the targets
                        x86_64-unknown-linux-gnu and x86_64-pc-windows-msvc are printed;
                        others a package asks for are named on stderr.

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
        Some("publishable") => {
            let workspace = workspace_root();
            for package in Metadata::read(&workspace)?.publishable {
                println!("{}", package.name);
            }
            Ok(())
        }
        Some("docs-rs") => {
            let workspace = workspace_root();
            for package in Metadata::read(&workspace)?.publishable {
                for target in package.docs_rs.targets() {
                    if !DOCS_RS_TARGETS_CHECKED.contains(&target) {
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
        Some(other) => Err(Error::Usage(format!(
            "unknown command `{other}` (the commands are `driver`, `stack`, `publishable` and \
             `docs-rs`)"
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

/// Builds `options.package` for [`DRIVER_TARGET`], copies the `.dll` to a `.sys` next to it (and
/// the linker map to a `.map`, when there is one) and returns the path of the `.sys`.
fn build_driver(options: &DriverOptions) -> Result<PathBuf, Error> {
    check_target_installed()?;

    let workspace = workspace_root();
    let metadata = Metadata::read(&workspace)?;
    let crate_name = metadata.cdylib_name(&options.package)?;

    let mut build = cargo(&workspace);
    build.args(["build", "--target", DRIVER_TARGET, "-p", &options.package]);
    keep_config_rustflags(&mut build)?;
    if options.release {
        build.arg("--release");
    }
    eprintln!(
        "xtask: cargo build{} --target {DRIVER_TARGET} -p {}",
        if options.release { " --release" } else { "" },
        options.package
    );
    let status = build
        .status()
        .map_err(|e| Error::Failed(format!("could not run cargo: {e}")))?;
    if !status.success() {
        return Err(Error::Failed(format!(
            "`cargo build` for `{}` failed ({status})",
            options.package
        )));
    }

    let profile_dir = if options.release { "release" } else { "debug" };
    let out_dir = metadata
        .target_directory
        .join(DRIVER_TARGET)
        .join(profile_dir);
    let dll = out_dir.join(format!("{crate_name}.dll"));
    let sys = dll.with_extension("sys");
    if !dll.is_file() {
        return Err(Error::Failed(format!(
            "the build succeeded but {} does not exist",
            dll.display()
        )));
    }
    fs::copy(&dll, &sys).map_err(|e| {
        Error::Failed(format!(
            "could not copy {} to {}: {e}",
            dll.display(),
            sys.display()
        ))
    })?;
    // The linker map (`/MAP` from wfp-rs-build) stays in deps/; put it beside the image, where
    // `cargo xtask stack` looks for function names. An image linked without it has none.
    let map = sys.with_extension("map");
    let linked_map = out_dir.join("deps").join(format!("{crate_name}.map"));
    if linked_map.is_file() {
        fs::copy(&linked_map, &map).map_err(|e| {
            Error::Failed(format!(
                "could not copy {} to {}: {e}",
                linked_map.display(),
                map.display()
            ))
        })?;
    } else if map.is_file() {
        // A stale map from an earlier link would name the wrong functions.
        fs::remove_file(&map)
            .map_err(|e| Error::Failed(format!("could not remove {}: {e}", map.display())))?;
    }
    Ok(sys)
}

/// The workspace this xtask belongs to (its package sits in `<workspace>/xtask`).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command run from the workspace root, so that the workspace's `.cargo/config.toml`
/// (linker and link flags) applies whatever the caller's directory.
fn cargo(workspace: &Path) -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(workspace);
    // A relative CARGO_TARGET_DIR means "relative to where the user ran cargo"; keep that
    // meaning although the child runs in the workspace root.
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_relative()
            && let Ok(cwd) = env::current_dir()
        {
            command.env("CARGO_TARGET_DIR", cwd.join(dir));
        }
    }
    command
}

/// The environment variable that adds rustflags for [`DRIVER_TARGET`] only.
const TARGET_RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_RUSTFLAGS";

/// `RUSTFLAGS` and `CARGO_ENCODED_RUSTFLAGS` (CI often sets `RUSTFLAGS=-Dwarnings`) *replace*
/// the `target.x86_64-pc-windows-msvc.rustflags` of `.cargo/config.toml`, and with them
/// `-Clinker-flavor=lld-link`, without which the driver does not link. Cargo merges the
/// target-specific variable with the config instead, so the flags move there. (With `--target`
/// they applied only to target crates anyway, so nothing else changes.)
fn keep_config_rustflags(build: &mut Command) -> Result<(), Error> {
    let flags: Vec<String> = if let Some(encoded) = env::var_os("CARGO_ENCODED_RUSTFLAGS") {
        let encoded = encoded
            .into_string()
            .map_err(|_| Error::Failed("CARGO_ENCODED_RUSTFLAGS is not valid UTF-8".into()))?;
        let flags: Vec<String> = encoded
            .split('\x1f')
            .filter(|flag| !flag.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(flag) = flags.iter().find(|flag| flag.contains(char::is_whitespace)) {
            return Err(Error::Failed(format!(
                "CARGO_ENCODED_RUSTFLAGS would replace the driver's rustflags from \
                 .cargo/config.toml, and its flag `{flag}` contains whitespace, so it cannot be \
                 moved to {TARGET_RUSTFLAGS_VAR}; unset CARGO_ENCODED_RUSTFLAGS"
            )));
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
        "xtask: passing `{}` as {TARGET_RUSTFLAGS_VAR} so that the target rustflags in \
         .cargo/config.toml (the linker flavor) still apply",
        flags.join(" ")
    );
    build.env(TARGET_RUSTFLAGS_VAR, target_flags);
    Ok(())
}

/// Fails with [`Error::TargetMissing`] unless `core` is installed for [`DRIVER_TARGET`]
/// (otherwise the build would stop with "can't find crate for `core`").
fn check_target_installed() -> Result<(), Error> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", DRIVER_TARGET])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| {
            Error::Failed(format!(
                "could not run `{} --print target-libdir`: {e}",
                rustc.to_string_lossy()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::TargetMissing(format!(
            "`rustc --print target-libdir --target {DRIVER_TARGET}` failed ({}); \
             is the target known to this toolchain?",
            output.status
        )));
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
        Err(Error::TargetMissing(format!(
            "the Rust standard library for {DRIVER_TARGET} is not installed (no libcore-*.rlib in {})",
            libdir.display()
        )))
    }
}

/// The parts of `cargo metadata --no-deps` this task needs.
#[derive(Debug)]
struct Metadata {
    target_directory: PathBuf,
    /// Workspace package name → its library target's name and crate types.
    libraries: BTreeMap<String, Option<(String, Vec<String>)>>,
    /// The packages that may be published, in workspace order. `publish = false` is `[]` in
    /// the metadata; `null` (any registry) or a list of registries is publishable.
    publishable: Vec<Publishable>,
}

/// The targets `cargo xtask docs-rs` prints: the two the workspace is built for.
const DOCS_RS_TARGETS_CHECKED: [&str; 2] = ["x86_64-unknown-linux-gnu", "x86_64-pc-windows-msvc"];

/// The targets docs.rs documents when a package names none (<https://docs.rs/about/metadata>).
const DOCS_RS_DEFAULT_TARGETS: [&str; 5] = [
    "x86_64-unknown-linux-gnu",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
    "aarch64-unknown-linux-gnu",
    "i686-pc-windows-msvc",
];

/// A package that may be published.
#[derive(Debug, PartialEq, Eq)]
struct Publishable {
    name: String,
    docs_rs: DocsRs,
}

/// A package's `[package.metadata.docs.rs]`, the parts that choose what is documented.
#[derive(Debug, Default, PartialEq, Eq)]
struct DocsRs {
    default_target: Option<String>,
    targets: Option<Vec<String>>,
    features: Vec<String>,
    all_features: bool,
    no_default_features: bool,
}

impl DocsRs {
    fn from_metadata(package: &Value) -> Self {
        // `[package.metadata.docs.rs]` is the table `rs` inside the table `docs`.
        let Some(table) = package.pointer("/metadata/docs/rs") else {
            return Self::default();
        };
        let strings = |key: &str| {
            table.get(key).and_then(Value::as_array).map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        };
        let flag = |key: &str| table.get(key).and_then(Value::as_bool).unwrap_or(false);
        Self {
            default_target: table
                .get("default-target")
                .and_then(Value::as_str)
                .map(str::to_owned),
            targets: strings("targets"),
            features: strings("features").unwrap_or_default(),
            all_features: flag("all-features"),
            no_default_features: flag("no-default-features"),
        }
    }

    /// The targets docs.rs documents, its landing page's first: `default-target` and then
    /// `targets`; without `default-target`, `targets` (its first is the landing page); without
    /// either, docs.rs's own list.
    fn targets(&self) -> Vec<&str> {
        let mut targets: Vec<&str> = Vec::new();
        if let Some(default) = &self.default_target {
            targets.push(default);
        }
        match &self.targets {
            Some(listed) => targets.extend(listed.iter().map(String::as_str)),
            None if self.default_target.is_none() => targets.extend(DOCS_RS_DEFAULT_TARGETS),
            None => {}
        }
        let mut seen = Vec::new();
        targets.retain(|target| {
            let new = !seen.contains(target);
            seen.push(*target);
            new
        });
        targets
    }

    /// The `cargo doc` flags that select the features docs.rs documents.
    fn feature_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.all_features {
            flags.push("--all-features".to_owned());
        }
        if self.no_default_features {
            flags.push("--no-default-features".to_owned());
        }
        if !self.features.is_empty() {
            flags.push("--features".to_owned());
            flags.push(self.features.join(","));
        }
        flags
    }
}

impl Metadata {
    fn read(workspace: &Path) -> Result<Self, Error> {
        let output = cargo(workspace)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| Error::Failed(format!("could not run cargo metadata: {e}")))?;
        if !output.status.success() {
            return Err(Error::Failed(format!(
                "`cargo metadata` failed ({})",
                output.status
            )));
        }
        let text = String::from_utf8(output.stdout)
            .map_err(|_| Error::Failed("`cargo metadata` printed invalid UTF-8".into()))?;
        Self::from_json(&text)
            .map_err(|e| Error::Failed(format!("could not read `cargo metadata` output: {e}")))
    }

    fn from_json(text: &str) -> Result<Self, String> {
        let root: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let target_directory = root
            .get("target_directory")
            .and_then(Value::as_str)
            .ok_or("no `target_directory`")?;
        let mut libraries = BTreeMap::new();
        let mut publishable = Vec::new();
        for package in root
            .get("packages")
            .and_then(Value::as_array)
            .ok_or("no `packages`")?
        {
            let name = package
                .get("name")
                .and_then(Value::as_str)
                .ok_or("a package without `name`")?;
            let targets = package
                .get("targets")
                .and_then(Value::as_array)
                .ok_or("a package without `targets`")?;
            let library = targets.iter().find_map(|target| {
                let kinds = target.get("kind")?.as_array()?;
                let is_lib = kinds
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|kind| matches!(kind, "lib" | "rlib" | "dylib" | "cdylib" | "staticlib"));
                if !is_lib {
                    return None;
                }
                let crate_types = target
                    .get("crate_types")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
                Some((target.get("name")?.as_str()?.to_owned(), crate_types))
            });
            libraries.insert(name.to_owned(), library);
            let unpublishable = package
                .get("publish")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            if !unpublishable {
                publishable.push(Publishable {
                    name: name.to_owned(),
                    docs_rs: DocsRs::from_metadata(package),
                });
            }
        }
        Ok(Self {
            target_directory: PathBuf::from(target_directory),
            libraries,
            publishable,
        })
    }

    /// The crate name of `package`'s cdylib (the stem of the `.dll` rustc writes).
    fn cdylib_name(&self, package: &str) -> Result<String, Error> {
        let Some(library) = self.libraries.get(package) else {
            let known: Vec<&str> = self.libraries.keys().map(String::as_str).collect();
            return Err(Error::Usage(format!(
                "unknown package `{package}`; the workspace packages are: {}",
                known.join(", ")
            )));
        };
        match library {
            Some((name, crate_types)) if crate_types.iter().any(|t| t == "cdylib") => {
                Ok(name.replace('-', "_"))
            }
            _ => Err(Error::Failed(format!(
                "package `{package}` has no `cdylib` library target, so it cannot be a driver \
                 image; add `crate-type = [\"cdylib\", \"rlib\"]` under `[lib]` in its Cargo.toml"
            ))),
        }
    }
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

    #[test]
    fn metadata() {
        let text = r#"{"packages":[
            {"name":"minimal-driver","publish":[],"targets":[
                {"name":"minimal_driver","kind":["cdylib","rlib"],"crate_types":["cdylib","rlib"]},
                {"name":"build-script-build","kind":["custom-build"],"crate_types":["bin"]}]},
            {"name":"wfp-rs","publish":null,"targets":[{"name":"wfp_rs","kind":["lib"],"crate_types":["lib"]}],
             "metadata":{"docs":{"rs":{"default-target":"x86_64-pc-windows-msvc",
                "targets":["x86_64-pc-windows-msvc","x86_64-unknown-linux-gnu"],"features":["user","x"],
                "no-default-features":true}}}},
            {"name":"in-house","publish":["internal"],"targets":[]},
            {"name":"xtask","publish":[],"targets":[{"name":"xtask","kind":["bin"],"crate_types":["bin"]}]}],
            "target_directory":"C:\\work\\target"}"#;
        let metadata = Metadata::from_json(text).unwrap();
        assert_eq!(metadata.target_directory, PathBuf::from(r"C:\work\target"));
        assert_eq!(
            metadata.cdylib_name("minimal-driver").unwrap(),
            "minimal_driver"
        );
        assert!(matches!(
            metadata.cdylib_name("wfp-rs"),
            Err(Error::Failed(_))
        ));
        assert!(matches!(
            metadata.cdylib_name("xtask"),
            Err(Error::Failed(_))
        ));
        let Err(Error::Usage(msg)) = metadata.cdylib_name("nope") else {
            panic!("an unknown package must be a usage error");
        };
        assert!(
            msg.contains("in-house, minimal-driver, wfp-rs, xtask"),
            "{msg}"
        );
        let names: Vec<&str> = metadata
            .publishable
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["wfp-rs", "in-house"]);
        let wfp_rs = &metadata.publishable[0].docs_rs;
        assert_eq!(
            wfp_rs.targets(),
            ["x86_64-pc-windows-msvc", "x86_64-unknown-linux-gnu"]
        );
        assert_eq!(
            wfp_rs.feature_flags(),
            ["--no-default-features", "--features", "user,x"]
        );
        let in_house = &metadata.publishable[1].docs_rs;
        assert_eq!(in_house.targets(), DOCS_RS_DEFAULT_TARGETS);
        assert!(in_house.feature_flags().is_empty());
    }

    #[test]
    fn docs_rs_targets() {
        let only_default = DocsRs {
            default_target: Some("x86_64-pc-windows-msvc".into()),
            ..DocsRs::default()
        };
        assert_eq!(only_default.targets(), ["x86_64-pc-windows-msvc"]);
        let listed = DocsRs {
            targets: Some(vec!["x86_64-unknown-linux-gnu".into()]),
            all_features: true,
            ..DocsRs::default()
        };
        assert_eq!(listed.targets(), ["x86_64-unknown-linux-gnu"]);
        assert_eq!(listed.feature_flags(), ["--all-features"]);
    }
}
