//! The example drivers' kernel images, checked the way Windows looks at a driver before it
//! loads it, and checked for stack depth: every example driver's image, release and debug, must
//! pass `wfp-rs-stack`'s check (no bounded path from a routine the kernel calls deeper than
//! the budget; see docs/building-drivers.md).
//!
//! The image is built by `cargo xtask driver minimal-driver`, which builds as `cargo wfp build`
//! does (through cargo-wfp's library) and whose image checks are `cargo wfp build`'s, so the link
//! flags, the `.dll` → `.sys` rename and the xtask itself are tested together. It is built
//! in its own target directory, `<target>/driver-image`, so the nested cargo never waits for the
//! lock of the `cargo test` that runs this file.
//!
//! When the standard library for `x86_64-pc-windows-msvc` is not installed, the xtask exits
//! with status 3 and this test prints `SKIPPED: <reason>` (on stderr, uncaptured) and returns; every other failure to
//! build fails the test.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::read::pe::PeFile64;
use object::{NameOrOrdinal, Object as _};

/// The xtask's exit status for "the target's standard library is not installed".
const XTASK_TARGET_MISSING: i32 = 3;

#[test]
fn minimal_driver_image_is_a_wdm_kernel_driver() {
    let Some(sys) = build_driver_image("minimal-driver", Profile::Release) else {
        return;
    };
    check_driver_image(&sys);
    check_stack(&sys);
}

/// The example firewall's driver: a bigger driver (port, control device, four callouts) whose
/// classify path once needed a stack probe (`__chkstk`) the kernel image could not link.
#[test]
fn firewall_driver_image_is_a_wdm_kernel_driver() {
    let Some(sys) = build_driver_image("firewall-driver", Profile::Release) else {
        return;
    };
    check_driver_image(&sys);
    check_stack(&sys);
}

/// rustc calls the stack probe `__chkstk` in the prologue of every function whose frame is
/// larger than a page. No C runtime is linked into a kernel image, so wfp-rs imports the probe
/// from ntoskrnl.exe: wherever the debug image of seed-fixed has such a frame (the stack
/// check's unwind data tells), `__chkstk` must be among ntoskrnl.exe's imports and no other
/// module's; and it is imported from nowhere else in any case. (seed-fixed once had several
/// such frames; since its verdict table lives in pool it may have none.)
#[test]
fn debug_image_imports_chkstk_from_ntoskrnl_where_a_frame_needs_it() {
    let Some(sys) = build_driver_image("seed-fixed", Profile::Debug) else {
        return;
    };
    check_driver_image(&sys);
    check_stack(&sys);

    let data = std::fs::read(&sys)
        .unwrap_or_else(|e| panic!("expected to read {}, found error: {e}", sys.display()));
    let providers = chkstk_providers(&data);
    let report = wfp_rs_stack::analyze_pe(&data, &wfp_rs_stack::Options::default())
        .expect("expected the image to be analysable");
    let page_frames = report
        .functions
        .values()
        .filter(|function| function.frame > 4096)
        .count();
    let expected: &[&str] = if page_frames > 0 {
        &["ntoskrnl.exe"]
    } else {
        &[]
    };
    assert!(
        providers == expected || (page_frames == 0 && providers == ["ntoskrnl.exe"]),
        "expected the debug image of seed-fixed ({page_frames} frame(s) over a page) to import \
         __chkstk from {expected:?}, found it imported from {providers:?}"
    );
}

/// The modules the image `data` imports `__chkstk` from.
fn chkstk_providers(data: &[u8]) -> Vec<String> {
    let image = PeFile64::parse(data).expect("expected a PE32+ image that object can parse");
    image
        .imports()
        .expect("expected a readable import table")
        .map(|import| import.expect("expected a readable import"))
        .filter(|import| import.name() == NameOrOrdinal::Name(b"__chkstk".as_slice()))
        .map(|import| String::from_utf8_lossy(import.library()).into_owned())
        .collect()
}

/// The images the tests above do not build already, each checked the same way: with them every
/// example driver is checked in both profiles (the debug images have much bigger frames: no
/// optimisation, a stack slot for every temporary).
#[test]
fn other_example_images_pass_the_stack_check_in_both_profiles() {
    for (package, profile) in [
        ("minimal-driver", Profile::Debug),
        ("starter", Profile::Release),
        ("starter", Profile::Debug),
        ("seed-fixed", Profile::Release),
        ("stream-inspect", Profile::Release),
        ("stream-inspect", Profile::Debug),
        ("firewall-driver", Profile::Debug),
    ] {
        let Some(sys) = build_driver_image(package, profile) else {
            return;
        };
        check_driver_image(&sys);
        check_stack(&sys);
    }
}

/// The check must catch the mistake it exists for: `tests/deep-stack-driver` keeps a 64 KiB
/// buffer on the stack of a work item (it runs silently in the simulator). `cargo xtask stack`
/// must exit with status 1 and name the work-item trampoline and the function, and the library
/// must find the path.
#[test]
fn a_work_item_with_64_kib_of_locals_fails_the_stack_check() {
    let output = xtask(&["stack", "deep-stack-driver"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(XTASK_TARGET_MISSING) {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: cannot build the deep-stack-driver image: {}",
            stderr
                .lines()
                .filter(|l| l.starts_with("error:"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        return;
    }
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected `cargo xtask stack deep-stack-driver` to fail the check (status 1), found {}\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    for expected in [
        "OVER BUDGET",
        "wfp_rs::work_item::run_job",
        "deep_stack_driver::checksum",
        "stack check: FAIL",
    ] {
        assert!(
            stdout.contains(expected),
            "expected the report to contain `{expected}`, found:\n{stdout}"
        );
    }

    let sys = PathBuf::from(stdout.lines().next().unwrap_or_default().trim());
    let report = wfp_rs_stack::analyze_file(&sys, &wfp_rs_stack::Options::default())
        .unwrap_or_else(|e| panic!("expected {} to be analysable, found: {e}", sys.display()));
    let over = report.over_budget();
    let checksum = report
        .names
        .iter()
        .find(|(_, name)| name.as_str() == "deep_stack_driver::checksum")
        .map(|(rva, _)| *rva)
        .expect("expected the map to name deep_stack_driver::checksum");
    assert!(
        report.functions[&checksum].frame >= 64 * 1024,
        "expected checksum's frame to hold its 64 KiB buffer, found {} bytes",
        report.functions[&checksum].frame
    );
    assert!(
        over.iter()
            .any(|entry| entry.depth.path.contains(&checksum) && entry.depth.bytes > 64 * 1024),
        "expected an entry point over the budget through checksum, found:\n{report}"
    );

    // A frame over a page calls the stack probe, which the image imports from ntoskrnl.exe
    // (no C runtime is linked into a kernel image); the image links and loads that way.
    check_driver_image(&sys);
    let data = std::fs::read(&sys)
        .unwrap_or_else(|e| panic!("expected to read {}, found error: {e}", sys.display()));
    assert_eq!(
        chkstk_providers(&data),
        ["ntoskrnl.exe"],
        "expected the deep-stack-driver image (a 64 KiB frame) to import __chkstk from \
         ntoskrnl.exe only"
    );
}

/// Asserts that the image at `sys` passes the stack check with the default budget, printing
/// the report when it does not. The image's linker map, which `cargo xtask driver` leaves
/// beside it, names the functions; the check asserts it was found.
fn check_stack(sys: &Path) {
    assert!(
        sys.with_extension("map").is_file(),
        "expected the linker map {} beside the image (wfp-rs-build links with /MAP and the \
         xtask copies it), found none",
        sys.with_extension("map").display()
    );
    let report = wfp_rs_stack::analyze_file(sys, &wfp_rs_stack::Options::default())
        .unwrap_or_else(|e| panic!("expected {} to be analysable, found: {e}", sys.display()));
    assert!(
        report.names.values().any(|name| name == "DriverEntry"),
        "expected the map to name DriverEntry"
    );
    assert!(
        report.passed(),
        "expected {} to pass the stack check (budget {} bytes), found:\n{report}",
        sys.display(),
        report.budget
    );
    let deepest = report.deepest().map_or(0, |entry| entry.depth.bytes);
    assert!(
        deepest > 0 && report.entries.len() > 1,
        "expected entry points with a depth in {}, found:\n{report}",
        sys.display()
    );
}

/// Which cargo profile `cargo xtask driver` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// `release`, the default of the xtask.
    Release,
    /// `dev`, with `--debug`.
    Debug,
}

/// Runs `cargo xtask driver <package>` in `<target>/driver-image` and returns the `.sys` path
/// it prints, or `None` (after printing `SKIPPED: ...`) when the Windows target is missing.
fn build_driver_image(package: &str, profile: Profile) -> Option<PathBuf> {
    let mut args = vec!["driver", package];
    let flag = match profile {
        Profile::Release => "",
        Profile::Debug => " --debug",
    };
    if profile == Profile::Debug {
        args.push("--debug");
    }
    let output = xtask(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    if output.status.code() == Some(XTASK_TARGET_MISSING) {
        let reason = stderr
            .lines()
            .filter(|line| line.starts_with("error:") || line.starts_with("hint:"))
            .collect::<Vec<_>>()
            .join(" ");
        // Written to stderr directly: libtest captures `println!` of passing tests, and a skip
        // must be visible in a plain `cargo test` run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: cannot build the {package} driver image: {reason}"
        );
        return None;
    }
    assert!(
        output.status.success(),
        "expected `cargo xtask driver {package}{flag}` to succeed, found {}\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    let path = stdout.lines().last().unwrap_or_default().trim();
    assert!(
        !path.is_empty(),
        "expected `cargo xtask driver {package}{flag}` to print the image path, found no output\n\
         --- stderr ---\n{stderr}"
    );
    Some(PathBuf::from(path))
}

/// Runs `cargo xtask <args>` in `<target>/driver-image` (see the module documentation).
fn xtask(args: &[&str]) -> std::process::Output {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().unwrap_or(tmp).join("driver-image");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());

    // The same command as the `cargo xtask` alias, spelled out so it does not depend on the
    // alias being picked up from the caller's directory.
    Command::new(&cargo)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["run", "--quiet", "-p", "xtask", "--"])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "expected to run {}, but it failed to start: {e}",
                Path::new(&cargo).display()
            )
        })
}

/// Asserts that `sys` is a 64-bit native WDM driver that imports only kernel modules, with the
/// checks `cargo wfp build` makes (`cargo_wfp::image::check`: PE32+ for AMD64, subsystem
/// NATIVE, the WDM-driver characteristic, the exported `DriverEntry` as entry point, imports
/// from kernel modules only and none delay-loaded, no TLS directory, a matching PE checksum).
fn check_driver_image(sys: &Path) {
    assert_eq!(
        sys.extension().and_then(|e| e.to_str()),
        Some("sys"),
        "expected the driver image to be named *.sys, found {}",
        sys.display()
    );
    let data = std::fs::read(sys)
        .unwrap_or_else(|e| panic!("expected to read {}, found error: {e}", sys.display()));
    let summary = cargo_wfp::image::check(&data).unwrap_or_else(|problems| {
        panic!(
            "expected {} to be a loadable WDM kernel driver image, found: {problems}",
            sys.display()
        )
    });
    assert!(
        summary.imports.contains("ntoskrnl.exe"),
        "expected ntoskrnl.exe among the imported modules, found {:?}",
        summary.imports
    );
    assert!(
        !summary.signed,
        "expected the image cargo builds to be unsigned (signing is `cargo wfp package`)"
    );
}
