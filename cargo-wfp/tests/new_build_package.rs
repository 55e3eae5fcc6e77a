//! `cargo wfp` end to end, as a user runs it, offline and in temporary folders: for each
//! template, `cargo wfp new` (against this repository's crates through `--sdk-path`, so no
//! registry is needed), the generated project's own `cargo test`, `cargo wfp build --release`
//! with the image checked, and `cargo wfp package` with the folder checked (the INF's fields
//! and `DriverVer`, the image, and its signature when `osslsigncode` is installed; without it
//! the signature checks are skipped with a printed reason). Then the messages a newcomer meets:
//! a missing target, a missing build script, a service named as the driver, and `user`
//! unified into a driver.
//!
//! Every generated project builds into one target folder, `<target>/cargo-wfp-projects`, so
//! the SDK and the other dependencies compile once for all of them, and not in the target
//! folder of the `cargo test` running this (whose lock it holds). The workspace's `Cargo.lock`
//! is copied into each project so that `--offline` resolves to the versions already
//! downloaded. GUIDs are random, and no assertion depends on their values.
//!
//! When the standard library for `x86_64-pc-windows-msvc` is not installed, `cargo wfp build`
//! exits with status 3 and the image and package steps print `SKIPPED: ...`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use cargo_wfp::inf::InfSummary;
use common::{
    TARGET_MISSING, assert_success, cargo_program, describe, nested, projects_target, repo, say,
};

/// 2026-01-01T00:00:00Z: packages are dated from `SOURCE_DATE_EPOCH`, so `DriverVer` is known.
const EPOCH: &str = "1767225600";
const DRIVER_VER: &str = "01/01/2026,0.1.0.0";

/// `command` with the environment every step shares: offline, the shared target folder.
fn prepared(command: Command) -> Command {
    let mut command = nested(command);
    command
        .env("CARGO_NET_OFFLINE", "true")
        .env("SOURCE_DATE_EPOCH", EPOCH);
    command
}

fn cargo_wfp(dir: &Path, args: &[&str]) -> Output {
    let mut command = prepared(Command::new(env!("CARGO_BIN_EXE_cargo-wfp")));
    command.current_dir(dir).arg("wfp").args(args);
    command
        .output()
        .unwrap_or_else(|e| panic!("expected to run cargo-wfp, found: {e}"))
}

fn cargo(dir: &Path, args: &[&str]) -> Output {
    let mut command = prepared(Command::new(cargo_program()));
    command.current_dir(dir).args(args);
    command
        .output()
        .unwrap_or_else(|e| panic!("expected to run cargo, found: {e}"))
}

/// Whether this runs in the wfp-rs repository; prints why not.
fn in_repository() -> bool {
    common::in_repository("cargo wfp end to end")
}

/// Runs `cargo wfp new NAME --template TEMPLATE` in `parent` against this repository and
/// copies the workspace's lock file in; returns the project folder.
fn new_project(parent: &Path, name: &str, template: &str) -> PathBuf {
    let dir = parent.join(name);
    let output = cargo_wfp(
        parent,
        &[
            "new",
            name,
            "--template",
            template,
            "--path",
            &dir.to_string_lossy(),
            "--sdk-path",
            &repo().to_string_lossy(),
        ],
    );
    assert_success(
        &format!("cargo wfp new {name} --template {template}"),
        &output,
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        dir.to_string_lossy(),
        "expected `cargo wfp new` to print the project folder"
    );
    fs::copy(repo().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copies Cargo.lock");
    dir
}

/// Every file of `dir` (but `target/`), relative path → text.
fn files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).expect("reads the project") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else if let Ok(text) = fs::read_to_string(&path) {
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), text));
            }
        }
    }
    out
}

/// The GUIDs written as `guid!("...")` in `text`.
fn guids(text: &str) -> Vec<String> {
    text.match_indices("guid!(\"")
        .filter_map(|(at, m)| text.get(at + m.len()..at + m.len() + 36))
        .map(str::to_owned)
        .collect()
}

/// What a generated project must be, by template.
struct Expect {
    template: &'static str,
    name: &'static str,
    /// The driver's library crate name (the image's stem).
    crate_name: &'static str,
    /// The example it was generated from.
    example: &'static str,
    /// The service name in the INF.
    service: &'static str,
    /// 1: kernel driver; 2: file-system minifilter.
    service_type: u32,
    /// Remove `.cargo/config.toml` before building: `cargo wfp build` must not need it.
    without_cargo_config: bool,
}

fn end_to_end(expect: &Expect) {
    if !in_repository() {
        return;
    }
    let started = Instant::now();
    let temp = tempfile::tempdir().expect("a temporary folder");
    let dir = new_project(temp.path(), expect.name, expect.template);

    // The product identifiers are the project's, and every GUID is fresh.
    let generated = files(&dir);
    let example_guids: Vec<String> = files(&repo().join(expect.example))
        .iter()
        .flat_map(|(_, text)| guids(text))
        .collect();
    for (path, text) in &generated {
        assert!(
            !text.contains("WfpRs"),
            "expected no example product name (WfpRs...) in {}, found one",
            path.display()
        );
        for guid in guids(text) {
            assert!(
                !example_guids.contains(&guid),
                "expected a fresh GUID in {}, found the example's {guid}",
                path.display()
            );
        }
    }
    let generated_guids = generated.iter().flat_map(|(_, t)| guids(t)).count();
    assert_eq!(
        generated_guids > 0,
        !example_guids.is_empty(),
        "expected guid! keys exactly where the example has them"
    );
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("a manifest");
    for expected in [
        "panic = \"abort\"",
        "[patch.crates-io]",
        "wfp-rs = { path = ",
    ] {
        assert!(
            manifest.contains(expected),
            "expected `{expected}` in the project's Cargo.toml, found:\n{manifest}"
        );
    }
    let after_new = started.elapsed();

    let output = cargo(&dir, &["test", "--offline"]);
    assert_success(
        &format!("cargo test in the {} project", expect.template),
        &output,
    );
    let after_test = started.elapsed();

    if expect.without_cargo_config {
        fs::remove_file(dir.join(".cargo/config.toml")).expect("removes .cargo/config.toml");
    }
    let output = cargo_wfp(&dir, &["build", "--release"]);
    if output.status.code() == Some(TARGET_MISSING) {
        say(&format!(
            "SKIPPED: the {} project's image and package: {}",
            expect.template,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
        return;
    }
    assert_success("cargo wfp build --release", &output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let sys = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert_eq!(
        sys.file_name().and_then(|n| n.to_str()),
        Some(format!("{}.sys", expect.crate_name).as_str()),
        "expected `cargo wfp build` to print the image path, found {stdout}"
    );
    let (summary, report) = cargo_wfp::image::check_file(&sys, wfp_rs_stack::DEFAULT_BUDGET)
        .unwrap_or_else(|problems| panic!("expected a loadable driver image, found: {problems}"));
    assert!(summary.imports.contains("ntoskrnl.exe"), "{summary:?}");
    assert!(!summary.signed, "the built image is not signed yet");
    assert!(
        report.names.values().any(|name| name == "DriverEntry"),
        "expected the linker map beside the image to name DriverEntry"
    );
    let after_build = started.elapsed();

    let out = temp.path().join("package");
    let output = cargo_wfp(
        &dir,
        &["package", "--release", "--out", &out.to_string_lossy()],
    );
    assert_success("cargo wfp package --release", &output);
    check_package(expect, &out, &String::from_utf8_lossy(&output.stderr));

    say(&format!(
        "TIMING: {} template: new {:.1}s, cargo test {:.1}s, cargo wfp build {:.1}s, package {:.1}s",
        expect.template,
        after_new.as_secs_f64(),
        (after_test - after_new).as_secs_f64(),
        (after_build - after_test).as_secs_f64(),
        (started.elapsed() - after_build).as_secs_f64()
    ));
}

fn check_package(expect: &Expect, out: &Path, stderr: &str) {
    let sys = out.join(format!("{}.sys", expect.crate_name));
    let inf_path = fs::read_dir(out)
        .expect("reads the package folder")
        .map(|e| e.expect("an entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "inf"))
        .unwrap_or_else(|| panic!("expected an INF in {}", out.display()));
    let inf_text = fs::read_to_string(&inf_path).expect("reads the INF");
    let inf = InfSummary::parse(&inf_text);
    assert_eq!(inf.value("Version", "DriverVer"), Some(DRIVER_VER));
    assert_eq!(
        inf.source_files(),
        [format!("{}.sys", expect.crate_name).as_str()],
        "expected the INF to ship the image"
    );
    assert_eq!(inf.service_name(), Some(expect.service));
    assert_eq!(inf.service_type(), Some(expect.service_type));
    assert_eq!(
        inf.value("Version", "Signature")
            .map(str::to_ascii_lowercase),
        Some("$windows nt$".to_owned())
    );

    let install = fs::read_to_string(out.join("INSTALL.txt")).expect("INSTALL.txt");
    let start = if expect.service_type == 2 {
        format!("fltmc load {}", expect.service)
    } else {
        format!("sc start {}", expect.service)
    };
    for expected in [
        format!("sc create {}", expect.service),
        start,
        format!("sc query {}", expect.service),
        "netsh wfp show state".to_owned(),
        // Minifilters too: `fltmc unload` needs a FilterUnloadCallback, which they lack.
        format!("sc stop {}", expect.service),
        format!("sc delete {}", expect.service),
        "bcdedit /set testsigning on".to_owned(),
        "Inf2Cat".to_owned(),
        "attestation signing".to_owned(),
    ] {
        assert!(
            install.contains(&expected),
            "expected `{expected}` in INSTALL.txt, found:\n{install}"
        );
    }

    let data = fs::read(&sys).expect("the packaged image");
    let summary = cargo_wfp::image::check(&data)
        .unwrap_or_else(|problems| panic!("expected a loadable packaged image: {problems}"));
    let certificate = out.join(format!("{}-test.cer", package_name(expect)));
    if cargo_wfp::package::find_on_path("osslsigncode").is_none() {
        say(&format!(
            "SKIPPED: the signature of the {} package: osslsigncode is not installed",
            expect.template
        ));
        assert!(
            !summary.signed,
            "expected an unsigned image without osslsigncode"
        );
        assert!(!certificate.exists());
        assert!(
            stderr.contains("unsigned"),
            "expected a note, found {stderr}"
        );
        assert!(install.contains("UNSIGNED"));
        return;
    }
    assert!(
        summary.signed,
        "expected an Authenticode signature in the image"
    );
    assert!(
        certificate.is_file(),
        "expected the test certificate {} beside the image",
        certificate.display()
    );
    assert!(install.contains(&format!(
        "certutil -addstore -f Root {}-test.cer",
        package_name(expect)
    )));
    let pem = projects_target()
        .join("wfp-package/test-certificate")
        .join(format!("{}-test.cer.pem", package_name(expect)));
    let verify = Command::new("osslsigncode")
        .args(["verify", "-CAfile"])
        .arg(&pem)
        .arg("-in")
        .arg(&sys)
        .output()
        .expect("runs osslsigncode");
    assert_success("osslsigncode verify", &verify);
}

/// The driver package's name (the test certificate is named after it).
fn package_name(expect: &Expect) -> String {
    if expect.template == "firewall" {
        format!("{}-driver", expect.name)
    } else {
        expect.name.to_owned()
    }
}

#[test]
fn minimal_template_builds_tests_and_packages() {
    end_to_end(&Expect {
        template: "minimal",
        name: "acme-min",
        crate_name: "acme_min",
        example: "examples/minimal-driver",
        service: "AcmeMin",
        service_type: 1,
        without_cargo_config: true,
    });
}

#[test]
fn callout_template_builds_tests_and_packages() {
    end_to_end(&Expect {
        template: "callout",
        name: "acme-callout",
        crate_name: "acme_callout",
        example: "examples/starter",
        service: "AcmeCallout",
        service_type: 1,
        without_cargo_config: false,
    });
}

#[test]
fn firewall_template_builds_tests_and_packages() {
    end_to_end(&Expect {
        template: "firewall",
        name: "acme-guard",
        crate_name: "acme_guard_driver",
        example: "examples/firewall",
        service: "AcmeGuard",
        service_type: 2,
        without_cargo_config: false,
    });
}

/// The messages a newcomer meets, each with what to do.
#[test]
fn failures_say_what_to_do() {
    if !in_repository() {
        return;
    }
    let temp = tempfile::tempdir().expect("a temporary folder");

    // A service named as the driver: build the driver alone, with the flag.
    let firewall = new_project(temp.path(), "acme-mixed", "firewall");
    let output = cargo_wfp(&firewall, &["build", "-p", "acme-mixed"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        describe("build -p service", &output)
    );
    assert!(
        stderr.contains("`acme-mixed` is not a driver package")
            && stderr
                .contains("hint: build a driver on its own: cargo wfp build -p acme-mixed-driver"),
        "{stderr}"
    );

    // No build script: the lines to add.
    let bare = new_project(temp.path(), "acme-bare", "minimal");
    fs::remove_file(bare.join("build.rs")).expect("removes build.rs");
    let manifest = fs::read_to_string(bare.join("Cargo.toml")).expect("reads the manifest");
    let manifest = manifest.replace("[build-dependencies]\nwfp-rs-build = \"0.1\"\n", "");
    assert!(!manifest.contains("wfp-rs-build = \"0.1\"\n["), "removed");
    fs::write(bare.join("Cargo.toml"), manifest).expect("writes the manifest");
    let output = cargo_wfp(&bare, &["build"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(TARGET_MISSING) {
        say("SKIPPED: the build-script message: the target is not installed");
    } else {
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}",
            describe("build without build.rs", &output)
        );
        for expected in [
            "has no build script",
            "[build-dependencies]\n    wfp-rs-build = \"0.1\"",
            "fn main() {\n        wfp_rs_build::driver();\n    }",
        ] {
            assert!(
                stderr.contains(expected),
                "expected `{expected}` in:\n{stderr}"
            );
        }
    }

    // The target's standard library missing: the rustup line. A stand-in rustc reports an
    // empty library folder.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let empty = temp.path().join("empty-libdir");
        fs::create_dir(&empty).expect("creates a folder");
        let rustc = temp.path().join("rustc");
        fs::write(&rustc, format!("#!/bin/sh\necho '{}'\n", empty.display()))
            .expect("writes the stand-in rustc");
        fs::set_permissions(&rustc, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut command = prepared(Command::new(env!("CARGO_BIN_EXE_cargo-wfp")));
        let output = command
            .current_dir(&bare)
            .env("RUSTC", &rustc)
            .args(["wfp", "build"])
            .output()
            .expect("runs cargo-wfp");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(TARGET_MISSING), "{stderr}");
        assert!(
            stderr.contains("hint: rustup target add x86_64-pc-windows-msvc"),
            "{stderr}"
        );
    }
}

/// wfp-rs's `user` feature (std, Win32: for a service) turned on for a driver: the link fails
/// on a user-mode import library, and the message says to build the driver alone and how to
/// find what enables the feature.
#[test]
fn user_feature_in_a_driver_is_explained() {
    if !in_repository() {
        return;
    }
    let temp = tempfile::tempdir().expect("a temporary folder");
    let dir = new_project(temp.path(), "acme-user", "minimal");
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("reads the manifest");
    let manifest = manifest.replacen(
        "wfp-rs = \"0.1\"",
        "wfp-rs = { version = \"0.1\", features = [\"user\"] }",
        1,
    );
    fs::write(dir.join("Cargo.toml"), manifest).expect("writes the manifest");
    let output = cargo_wfp(&dir, &["build", "--release"]);
    if output.status.code() == Some(TARGET_MISSING) {
        say("SKIPPED: the `user` message: the target is not installed");
        return;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        describe("build with user", &output)
    );
    assert!(
        stderr.contains("`user` feature") && stderr.contains("cargo wfp build -p acme-user"),
        "expected the hint about `user`, found:\n{stderr}"
    );
}

/// A plain `cargo build` for Windows without the project's settings, as a user who wrote the
/// crate by hand runs it: no linker configured (the build script warns that cargo will use
/// Visual Studio's `link.exe`, and says what to add) and no `panic = "abort"` profiles (the
/// driver does not compile, and the error names the profile settings instead of rustc's
/// suggestion of a nightly `-Zbuild-std`).
#[test]
fn plain_cargo_build_without_the_settings_is_explained() {
    if !in_repository() {
        return;
    }
    let temp = tempfile::tempdir().expect("a temporary folder");
    let dir = new_project(temp.path(), "acme-plain", "minimal");
    fs::remove_file(dir.join(".cargo/config.toml")).expect("removes .cargo/config.toml");
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("reads the manifest");
    let unwinding = manifest.replace("panic = \"abort\"", "panic = \"unwind\"");
    assert_ne!(unwinding, manifest, "the project sets panic = \"abort\"");
    fs::write(dir.join("Cargo.toml"), unwinding).expect("writes the manifest");
    let output = cargo(&dir, &["build", "--target", "x86_64-pc-windows-msvc"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("can't find crate for `core`") {
        say("SKIPPED: the plain cargo build messages: the target is not installed");
        return;
    }
    assert!(
        !output.status.success(),
        "{}",
        describe("plain build", &output)
    );
    for expected in [
        "no linker was configured for x86_64-pc-windows-msvc",
        "linker = \"rust-lld\"",
        "this driver is built with panic = \"unwind\"",
        "`[profile.dev] panic = \"abort\"` and `[profile.release] panic = \"abort\"`",
    ] {
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in:\n{stderr}"
        );
    }
}
