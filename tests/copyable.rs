//! The examples a user copies (docs/firewall.md, "Copying the firewall into your product").
//!
//! Every example driver crate builds and tests as it is when copied out of the repository with
//! its sibling crates: each group of folders is copied into a temporary directory, outside any
//! workspace, and each crate in it runs its own `cargo test --offline` there; then each driver
//! builds its kernel image for Windows from the copy, which needs the copy's own
//! `.cargo/config.toml` (`panic = "abort"`, the `rust-lld` linker).
//!
//! The copies depend on the SDK as a user's crate does (`wfp-rs = "0.1.0"`); the SDK crates come
//! from this checkout through the same `[patch.crates-io]` entries the workspace root uses,
//! given on cargo's command line (`--config patch.crates-io.<crate>.path=...`), as a user whose
//! wfp-rs is not from crates.io would give them. This checkout's `Cargo.lock` is copied in, so
//! that the build is offline and tests the registry crates tested here.
//!
//! All copies build in one target directory, `<target>/copyable`: dependencies compile once,
//! and the nested cargo never waits for the lock of the `cargo test` that runs this file. Each
//! test prints how long it took (on stderr, uncaptured).
//!
//! The identifier tables of the docs (the keys, names and tags a product must change) are
//! checked against the source here too, both ways: each listed value is where the table says,
//! and every GUID, pool tag, port or device name and INF string of the example is listed.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use object::pe;
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};

const WINDOWS_TARGET: &str = "x86_64-pc-windows-msvc";

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// A test's own message, written to stderr directly: libtest captures `println!` and
/// `eprintln!` of passing tests, and timings and skips must show in a plain `cargo test`.
fn note(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("expected to read {}, found error: {e}", path.display()))
}

fn parse_toml(path: &Path) -> toml::Table {
    read(path)
        .parse()
        .unwrap_or_else(|e| panic!("expected {} to be TOML, found error: {e}", path.display()))
}

/// `--config` arguments that patch crates.io with every SDK crate the workspace root patches,
/// by absolute path.
fn sdk_patches() -> Vec<String> {
    let root = parse_toml(&workspace().join("Cargo.toml"));
    let patches = root
        .get("patch")
        .and_then(|patch| patch.get("crates-io"))
        .and_then(toml::Value::as_table)
        .expect("expected a [patch.crates-io] table in the workspace's Cargo.toml");
    assert!(
        patches.contains_key("wfp-rs"),
        "expected [patch.crates-io] to patch wfp-rs, found {:?}",
        patches.keys().collect::<Vec<_>>()
    );
    patches
        .iter()
        .map(|(name, patch)| {
            let path = patch
                .get("path")
                .and_then(toml::Value::as_str)
                .unwrap_or_else(|| panic!("expected patch `{name}` to be a path, found {patch}"));
            let path = workspace().join(path);
            // A TOML literal string: no escapes, so a Windows path needs none either.
            format!("patch.crates-io.{name}.path='{}'", path.display())
        })
        .flat_map(|setting| ["--config".to_owned(), setting])
        .collect()
}

/// Copies the directory `from` to `to`, hidden entries included (`.cargo/config.toml` is part
/// of an example), without build output or a lock file.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to)
        .unwrap_or_else(|e| panic!("expected to create {}, found error: {e}", to.display()));
    let entries = std::fs::read_dir(from)
        .unwrap_or_else(|e| panic!("expected to list {}, found error: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("expected a readable directory entry");
        let name = entry.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let (source, destination) = (entry.path(), to.join(&name));
        if entry.file_type().expect("expected a file type").is_dir() {
            copy_dir(&source, &destination);
        } else {
            std::fs::copy(&source, &destination).unwrap_or_else(|e| {
                panic!(
                    "expected to copy {} to {}, found error: {e}",
                    source.display(),
                    destination.display()
                )
            });
        }
    }
}

/// A temporary directory holding copies of the `folders` of `examples/`, side by side as they
/// are in the repository.
struct Copy {
    dir: tempfile::TempDir,
}

impl Copy {
    fn of(folders: &[&str]) -> Copy {
        let dir = tempfile::Builder::new()
            .prefix("wfp-rs-copy-")
            .tempdir()
            .expect("expected a temporary directory");
        assert!(
            !dir.path().starts_with(workspace()),
            "expected the temporary directory {} to be outside the workspace",
            dir.path().display()
        );
        for folder in folders {
            copy_dir(
                &workspace().join("examples").join(folder),
                &dir.path().join(folder),
            );
        }
        Copy { dir }
    }

    fn path(&self, crate_dir: &str) -> PathBuf {
        self.dir.path().join(crate_dir)
    }

    /// Runs `cargo <args>` in the copied crate `crate_dir`, as its own root, with the SDK
    /// patches and this checkout's lock file; fails the test with cargo's output if it fails.
    fn cargo(&self, crate_dir: &str, args: &[&str]) -> std::process::Output {
        let dir = self.path(crate_dir);
        let lock = dir.join("Cargo.lock");
        if !lock.exists() {
            std::fs::copy(workspace().join("Cargo.lock"), &lock)
                .expect("expected to copy the workspace's Cargo.lock");
        }
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let target_dir = tmp.parent().unwrap_or(tmp).join("copyable");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let start = Instant::now();
        let output = Command::new(&cargo)
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target_dir)
            .args(sdk_patches())
            .args(args)
            .arg("--offline")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "expected to run {}, but it failed to start: {e}",
                    Path::new(&cargo).display()
                )
            });
        assert!(
            output.status.success(),
            "expected `cargo {}` in the copy of {crate_dir} to succeed, found {}\n\
             --- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        note(&format!(
            "copyable:   cargo {} in {crate_dir}: {:.1} s",
            args.join(" "),
            start.elapsed().as_secs_f64()
        ));
        output
    }

    /// `cargo test` in each copied crate of `crate_dirs`.
    fn test(&self, crate_dirs: &[&str]) {
        for crate_dir in crate_dirs {
            let output = self.cargo(crate_dir, &["test"]);
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                stdout.contains("test result: ok."),
                "expected `cargo test` in the copy of {crate_dir} to run tests, found\n{stdout}"
            );
        }
    }

    /// Builds the kernel image of the copied driver crate `crate_dir` (release) and checks it
    /// is a native WDM driver image: the copy's build script, linker configuration and
    /// `panic = "abort"` profile all took effect. Skipped, saying so, when the Windows target's
    /// standard library is not installed.
    fn build_image(&self, crate_dir: &str, lib_name: &str) {
        if !windows_target_installed(&self.path(crate_dir)) {
            note(&format!(
                "SKIPPED: the {crate_dir} image from its copy: the standard library for \
                 {WINDOWS_TARGET} is not installed (rustup target add {WINDOWS_TARGET})"
            ));
            return;
        }
        self.cargo(
            crate_dir,
            &["build", "--release", "--target", WINDOWS_TARGET],
        );
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let image = tmp
            .parent()
            .unwrap_or(tmp)
            .join("copyable")
            .join(WINDOWS_TARGET)
            .join("release")
            .join(format!("{lib_name}.dll"));
        let data = std::fs::read(&image)
            .unwrap_or_else(|e| panic!("expected the image {}, found error: {e}", image.display()));
        let file = PeFile64::parse(&*data).unwrap_or_else(|e| {
            panic!(
                "expected {} to be a PE32+ image, found {e}",
                image.display()
            )
        });
        let optional = file.nt_headers().optional_header();
        assert_eq!(
            optional.subsystem(),
            pe::IMAGE_SUBSYSTEM_NATIVE,
            "expected {} to have the native subsystem (a kernel image)",
            image.display()
        );
        let wdm = pe::IMAGE_DLLCHARACTERISTICS_WDM_DRIVER.0;
        assert_eq!(
            optional.dll_characteristics().0 & wdm,
            wdm,
            "expected {} to be marked as a WDM driver",
            image.display()
        );
    }
}

/// Whether the standard library for the Windows target is installed for the toolchain cargo
/// uses in `dir` (otherwise the build would stop with "can't find crate for `core`").
fn windows_target_installed(dir: &Path) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    Command::new(rustc)
        .current_dir(dir)
        .args(["--print", "target-libdir", "--target", WINDOWS_TARGET])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .is_some_and(|libdir| {
            std::fs::read_dir(libdir).is_ok_and(|entries| {
                entries.flatten().any(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("libcore-") && name.ends_with(".rlib")
                })
            })
        })
}

/// Runs one group's copy and builds, timed. One group at a time: the builds share a target
/// directory, whose lock would serialize them anyway, and a group's time is then its own.
fn timed(what: &str, run: impl FnOnce()) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    // A poisoned lock means another group failed; this one can still run.
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let start = Instant::now();
    run();
    note(&format!(
        "copyable: {what}: {:.1} s",
        start.elapsed().as_secs_f64()
    ));
}

#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn firewall_copied_with_its_siblings_builds_and_tests() {
    timed("firewall (driver, protocol, rules, service, bench)", || {
        let copy = Copy::of(&["firewall"]);
        copy.test(&[
            "firewall/protocol",
            "firewall/rules",
            "firewall/driver",
            "firewall/service",
            "firewall/bench",
        ]);
        copy.build_image("firewall/driver", "firewall_driver");
    });
}

/// The rename docs/firewall.md describes ("Renaming the crates"): every `firewall-driver`,
/// `firewall-protocol` and `firewall-rules` (and their `_` spellings) becomes `acme-...`, in
/// every file; the INF's file name follows the library's. The renamed driver's tests and
/// doctests pass, and its image is `acme_driver.dll`.
#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn firewall_renamed_builds_and_tests() {
    timed("firewall renamed to acme", || {
        let copy = Copy::of(&["firewall"]);
        rename_crates(
            copy.dir.path(),
            "firewall",
            "acme",
            &["driver", "protocol", "rules"],
        );
        let inf = copy.path("firewall/driver/firewall_driver.inf");
        std::fs::rename(&inf, copy.path("firewall/driver/acme_driver.inf"))
            .expect("expected to rename the INF");
        copy.test(&["firewall/driver", "firewall/service"]);
        copy.build_image("firewall/driver", "acme_driver");
    });
}

/// Replaces `<old>-<part>` and `<old>_<part>` by `<new>-<part>` and `<new>_<part>` in every
/// file under `dir`.
fn rename_crates(dir: &Path, old: &str, new: &str, parts: &[&str]) {
    for entry in std::fs::read_dir(dir).expect("expected a readable copy") {
        let path = entry.expect("expected a directory entry").path();
        if path.is_dir() {
            rename_crates(&path, old, new, parts);
            continue;
        }
        let Ok(mut text) = std::fs::read_to_string(&path) else {
            continue; // not text
        };
        for part in parts {
            for separator in ["-", "_"] {
                text = text.replace(
                    &format!("{old}{separator}{part}"),
                    &format!("{new}{separator}{part}"),
                );
            }
        }
        std::fs::write(&path, text).expect("expected to write the renamed file");
    }
}

#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn starter_copied_alone_builds_and_tests() {
    timed("starter", || {
        let copy = Copy::of(&["starter"]);
        copy.test(&["starter"]);
        copy.build_image("starter", "starter");
    });
}

#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn seed_fixed_copied_alone_builds_and_tests() {
    timed("seed-fixed", || {
        let copy = Copy::of(&["seed-fixed"]);
        copy.test(&["seed-fixed"]);
        copy.build_image("seed-fixed", "seed_fixed");
    });
}

#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn stream_inspect_copied_alone_builds_and_tests() {
    timed("stream-inspect", || {
        let copy = Copy::of(&["stream-inspect"]);
        copy.test(&["stream-inspect"]);
        copy.build_image("stream-inspect", "stream_inspect");
    });
}

/// The minimal driver alone, and the simulator demo with the minimal driver beside it.
#[test]
#[cfg_attr(
    windows,
    ignore = "the copies' tests need the simulator, which a Windows host selects per crate with --features sim"
)]
fn minimal_driver_and_sim_demo_copied_build_and_test() {
    timed("minimal-driver and sim-demo", || {
        let copy = Copy::of(&["minimal-driver", "sim-demo"]);
        copy.test(&["minimal-driver", "sim-demo"]);
        copy.build_image("minimal-driver", "minimal_driver");
    });
}

/// Every package under `examples/`.
fn example_manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("expected a readable examples/") {
            let path = entry.expect("expected a directory entry").path();
            if path.is_dir() && path.file_name().is_some_and(|name| name != "target") {
                walk(&path, found);
            } else if path.file_name().is_some_and(|name| name == "Cargo.toml") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&workspace().join("examples"), &mut found);
    found.sort();
    found
}

/// A copied crate has no workspace to inherit from, so the examples write the workspace's lints
/// out; they must stay the workspace's (without its `check-cfg` for the SDK's own cfgs, which
/// the examples do not use), so that CI holds the examples to them.
#[test]
fn examples_write_out_the_workspace_lints() {
    let root = parse_toml(&workspace().join("Cargo.toml"));
    let mut expected = root
        .get("workspace")
        .and_then(|w| w.get("lints"))
        .and_then(toml::Value::as_table)
        .expect("expected [workspace.lints]")
        .clone();
    if let Some(rust) = expected.get_mut("rust").and_then(toml::Value::as_table_mut) {
        rust.remove("unexpected_cfgs");
    }
    let manifests = example_manifests();
    assert!(
        manifests.len() >= 8,
        "expected the example packages, found {manifests:?}"
    );
    for manifest in manifests {
        let text = read(&manifest);
        assert!(
            !text.contains("workspace = true") && !text.contains(".workspace"),
            "expected {} to inherit nothing from the workspace (a copy has none)",
            manifest.display()
        );
        let lints = parse_toml(&manifest)
            .get("lints")
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            lints,
            expected,
            "expected the [lints] of {} to be the workspace's",
            manifest.display()
        );
    }
}

/// The example folders that hold a driver, each with the `.cargo/config.toml` a copy needs.
const DRIVER_FOLDERS: &[&str] = &[
    "minimal-driver",
    "starter",
    "seed-fixed",
    "stream-inspect",
    "firewall",
];

/// Every example driver (a `cdylib`) is in a folder whose `.cargo/config.toml` sets
/// `panic = "abort"` for both profiles and links the Windows target as the repository does, so
/// a copy builds its kernel image (the copy tests above build it only where the Windows target
/// is installed).
#[test]
fn example_driver_folders_carry_the_kernel_build_settings() {
    for manifest in example_manifests() {
        if read(&manifest).contains("\"cdylib\"") {
            assert!(
                DRIVER_FOLDERS
                    .iter()
                    .any(|folder| manifest.starts_with(workspace().join("examples").join(folder))),
                "expected the driver {} to be in one of the folders {DRIVER_FOLDERS:?}",
                manifest.display()
            );
        }
    }
    let root = parse_toml(&workspace().join(".cargo/config.toml"));
    let windows = root
        .get("target")
        .and_then(|target| target.get(WINDOWS_TARGET))
        .expect("expected the repository's .cargo/config.toml to configure the Windows target");
    for folder in DRIVER_FOLDERS {
        let path = workspace()
            .join("examples")
            .join(folder)
            .join(".cargo/config.toml");
        let config = parse_toml(&path);
        for profile in ["dev", "release"] {
            let panic = config
                .get("profile")
                .and_then(|profiles| profiles.get(profile))
                .and_then(|settings| settings.get("panic"))
                .and_then(toml::Value::as_str);
            assert_eq!(
                panic,
                Some("abort"),
                "expected {} to set panic = \"abort\" for the {profile} profile",
                path.display()
            );
        }
        assert_eq!(
            config
                .get("target")
                .and_then(|target| target.get(WINDOWS_TARGET)),
            Some(windows),
            "expected {} to configure {WINDOWS_TARGET} as the repository does",
            path.display()
        );
    }
}

/// One row of an identifier table: a value that must be in `file`.
#[derive(Debug)]
struct Listed {
    identifier: String,
    value: String,
    file: PathBuf,
}

/// The identifier tables of `doc` (a path under docs/): each follows a line
/// `<!-- identifiers: <folder> -->`, and its `file` column is relative to that folder.
fn identifier_tables(doc: &str) -> Vec<(PathBuf, Vec<Listed>)> {
    let text = read(&workspace().join("docs").join(doc));
    let mut tables = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(folder) = line
            .strip_prefix("<!-- identifiers: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let folder = workspace().join(folder);
        let rows: Vec<Vec<String>> = lines
            .by_ref()
            .skip_while(|line| line.trim().is_empty())
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                line.trim_matches('|')
                    .split('|')
                    .map(|cell| cell.trim().to_owned())
                    .collect()
            })
            .collect();
        let header = rows
            .first()
            .unwrap_or_else(|| panic!("expected a table after the marker for {folder:?}"));
        let column = |name: &str| {
            header
                .iter()
                .position(|cell| cell == name)
                .unwrap_or_else(|| panic!("expected a `{name}` column in {doc}, found {header:?}"))
        };
        let (identifier, value, file) = (column("identifier"), column("value"), column("file"));
        let code = |cell: &str| {
            cell.split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("expected a `code` span in {doc}'s cell {cell:?}"))
                .to_owned()
        };
        let listed = rows
            .iter()
            .skip(2) // the header and the delimiter row
            .map(|row| Listed {
                identifier: row[identifier].clone(),
                value: code(&row[value]),
                file: folder.join(code(&row[file])),
            })
            .collect();
        tables.push((folder, listed));
    }
    assert!(!tables.is_empty(), "expected identifier tables in {doc}");
    tables
}

/// Every value that must be listed: the GUIDs, pool tags, port and device names of the
/// example's own code (tests and benchmarks excluded), and the quoted strings of its INF.
fn identifiers_in(folder: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("expected a readable example") {
            let path = entry.expect("expected a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                if !["tests", "bench", "benches", "target"].contains(&name) {
                    pending.push(path);
                }
                continue;
            }
            let text = read_if_source(&path);
            if name.ends_with(".rs") {
                found.extend(between_all(&text, "guid!(\"", "\")"));
                found.extend(between_all(&text, "PoolTag::new(b\"", "\")"));
                let names = |line: &&str| {
                    line.contains("PORT_NAME: &str = ") || line.contains("DEVICE_NAME: &str = ")
                };
                for line in text.lines().filter(names) {
                    let literal = line.split("= ").nth(1).unwrap_or_default();
                    let literal = literal.trim_end_matches(';').trim_start_matches('r');
                    found.insert(literal.trim_matches('"').replace("\\\\", "\\"));
                }
            } else if name.ends_with(".inf") {
                let strings = text.split("[Strings]").nth(1).unwrap_or_default();
                for line in strings.lines().filter(|line| !line.starts_with(';')) {
                    if let Some((_, value)) = line.split_once('=') {
                        let value = value.trim();
                        if value.starts_with('"') {
                            found.insert(value.trim_matches('"').to_owned());
                        }
                    }
                }
            }
        }
    }
    found
}

fn read_if_source(path: &Path) -> String {
    let is_source = path
        .extension()
        .is_some_and(|extension| extension == "rs" || extension == "inf");
    if is_source { read(path) } else { String::new() }
}

/// Every piece of `text` between `start` and the next `end`.
fn between_all(text: &str, start: &str, end: &str) -> Vec<String> {
    text.split(start)
        .skip(1)
        .filter_map(|rest| rest.split_once(end).map(|(inside, _)| inside.to_owned()))
        .collect()
}

/// The docs' tables of the identifiers a product must change are right and complete.
#[test]
fn identifier_tables_match_the_examples() {
    let mut checked = Vec::new();
    for doc in ["firewall.md", "callouts.md"] {
        for (folder, listed) in identifier_tables(doc) {
            for row in &listed {
                let text = read(&row.file);
                assert!(
                    text.contains(&row.value),
                    "expected {} to contain `{}` ({}), as docs/{doc} lists it",
                    row.file.display(),
                    row.value,
                    row.identifier
                );
            }
            let values: BTreeSet<&str> = listed.iter().map(|row| row.value.as_str()).collect();
            for identifier in identifiers_in(&folder) {
                assert!(
                    values.contains(identifier.as_str()),
                    "expected docs/{doc} to list `{identifier}` among the identifiers of {} \
                     a product must change",
                    folder.display()
                );
            }
            checked.push(folder);
        }
    }
    for example in ["firewall", "starter", "minimal-driver", "seed-fixed"] {
        assert!(
            checked.contains(&workspace().join("examples").join(example)),
            "expected an identifier table for examples/{example}, found tables for {checked:?}"
        );
    }
}
