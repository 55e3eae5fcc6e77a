//! The example drivers' kernel images, checked the way Windows looks at a driver before it
//! loads it, and checked for stack depth: every example driver's image, release and debug, must
//! pass `wfp-rs-stack`'s check (no bounded path from a routine the kernel calls deeper than
//! the budget; see docs/building-drivers.md).
//!
//! The image is built by `cargo xtask driver minimal-driver`, the command a user runs, so the
//! link flags, the `.dll` → `.sys` rename and the xtask itself are tested together. It is built
//! in its own target directory, `<target>/driver-image`, so the nested cargo never waits for the
//! lock of the `cargo test` that runs this file.
//!
//! When the standard library for `x86_64-pc-windows-msvc` is not installed, the xtask exits
//! with status 3 and this test prints `SKIPPED: <reason>` (on stderr, uncaptured) and returns; every other failure to
//! build fails the test.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};
use object::{FileKind, LittleEndian as LE, NameOrOrdinal, Object as _, pe};

/// The only modules a driver may import from: they are loaded in kernel space. Anything else
/// (`kernel32.dll`, the C runtime, `api-ms-win-*` sets) exists only in user mode and the image
/// would fail to load.
const KERNEL_MODULES: &[&str] = &[
    "ntoskrnl.exe",
    "hal.dll",
    "fwpkclnt.sys",
    "fltmgr.sys",
    "netio.sys",
    "ndis.sys",
];

/// Prefixes of user-mode modules that show up when the C runtime or std leaks into an image.
const USER_MODE_MODULES: &[&str] = &["kernel32", "ucrt", "vcruntime", "msvcrt", "api-ms-"];

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

/// Asserts that `sys` is a 64-bit native WDM driver that imports only kernel modules.
fn check_driver_image(sys: &Path) {
    assert_eq!(
        sys.extension().and_then(|e| e.to_str()),
        Some("sys"),
        "expected the driver image to be named *.sys, found {}",
        sys.display()
    );
    let data = std::fs::read(sys)
        .unwrap_or_else(|e| panic!("expected to read {}, found error: {e}", sys.display()));

    let kind = FileKind::parse(&*data);
    assert!(
        matches!(kind, Ok(FileKind::Pe64)),
        "expected a PE32+ image (FileKind::Pe64), found {kind:?}"
    );
    let image = PeFile64::parse(&*data).expect("expected a PE32+ image that object can parse");
    let headers = image.nt_headers();
    let file_header = headers.file_header();
    let optional = headers.optional_header();

    let magic = optional.magic();
    assert_eq!(
        magic,
        pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC,
        "expected optional header magic {:#x} (PE32+), found {magic:#x}",
        pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC
    );
    let machine = file_header.machine.get(LE);
    assert_eq!(
        machine,
        pe::IMAGE_FILE_MACHINE_AMD64,
        "expected machine AMD64 ({:#06x}), found {:#06x}",
        pe::IMAGE_FILE_MACHINE_AMD64.0,
        machine.0
    );
    let subsystem = optional.subsystem();
    assert_eq!(
        subsystem,
        pe::IMAGE_SUBSYSTEM_NATIVE,
        "expected subsystem NATIVE ({}), found {}",
        pe::IMAGE_SUBSYSTEM_NATIVE.0,
        subsystem.0
    );
    let dll_characteristics = optional.dll_characteristics().0;
    let wdm = pe::IMAGE_DLLCHARACTERISTICS_WDM_DRIVER.0;
    assert_eq!(
        dll_characteristics & wdm,
        wdm,
        "expected DllCharacteristics to include IMAGE_DLLCHARACTERISTICS_WDM_DRIVER ({wdm:#06x}), \
         found {dll_characteristics:#06x}"
    );

    check_entry_point(&image, optional.address_of_entry_point());
    check_imports(&image);

    let tls = image.data_directory(pe::IMAGE_DIRECTORY_ENTRY_TLS);
    assert!(
        tls.is_none(),
        "expected no TLS directory (the kernel does not run TLS callbacks), found {tls:?}"
    );

    let stored = optional.check_sum();
    assert_ne!(
        stored, 0,
        "expected a non-zero PE checksum (linked with /RELEASE), found 0"
    );
    let nt_headers_offset = image.dos_header().nt_headers_offset() as usize;
    let computed = pe_checksum(&data, nt_headers_offset);
    assert_eq!(
        stored, computed,
        "expected the stored PE checksum to match the image, stored {stored:#010x}, computed {computed:#010x}"
    );
}

/// The entry point must be the exported `DriverEntry` (linked with `/ENTRY:DriverEntry`).
fn check_entry_point(image: &PeFile64<'_>, entry_rva: u32) {
    assert_ne!(entry_rva, 0, "expected a non-zero entry point RVA, found 0");
    let exports = image
        .export_table()
        .expect("expected a well-formed export table")
        .expect("expected an export table (DriverEntry is exported), found none")
        .exports()
        .expect("expected readable exports");
    let names: Vec<String> = exports
        .iter()
        .filter_map(|export| export.name)
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    let driver_entry = exports
        .iter()
        .find(|export| export.name == Some(b"DriverEntry".as_slice()))
        .unwrap_or_else(|| panic!("expected an export named DriverEntry, found {names:?}"));
    let object::read::pe::ExportTarget::Address(export_rva) = driver_entry.target else {
        panic!(
            "expected DriverEntry to be exported by address, found {:?}",
            driver_entry.target
        );
    };
    assert_eq!(
        entry_rva, export_rva,
        "expected the entry point RVA to be DriverEntry's ({export_rva:#x}), found {entry_rva:#x}"
    );
}

/// Every imported module (plain or delay-loaded) must be a kernel module.
fn check_imports(image: &PeFile64<'_>) {
    let mut modules = BTreeSet::new();
    if let Some(table) = image
        .import_table()
        .expect("expected a well-formed import table")
    {
        let mut descriptors = table.descriptors().expect("expected import descriptors");
        while let Some(descriptor) = descriptors.next().expect("expected a readable descriptor") {
            let name = table
                .name(descriptor.name.get(LE))
                .expect("expected a readable module name");
            modules.insert(String::from_utf8_lossy(name).into_owned());
        }
    }
    let delay_loaded = image
        .delay_load_import_table()
        .expect("expected a well-formed delay-load import table");
    assert!(
        delay_loaded.is_none(),
        "expected no delay-load imports (the kernel does not resolve them), found a delay-load table"
    );

    let user_mode: Vec<&String> = modules
        .iter()
        .filter(|module| {
            let lower = module.to_ascii_lowercase();
            USER_MODE_MODULES
                .iter()
                .any(|prefix| lower.starts_with(prefix))
        })
        .collect();
    assert!(
        user_mode.is_empty(),
        "expected no user-mode imports (kernel32, ucrt, vcruntime, msvcrt, api-ms-*), found {user_mode:?}"
    );
    let not_kernel: Vec<&String> = modules
        .iter()
        .filter(|module| {
            !KERNEL_MODULES
                .iter()
                .any(|kernel| module.eq_ignore_ascii_case(kernel))
        })
        .collect();
    assert!(
        not_kernel.is_empty(),
        "expected only kernel modules {KERNEL_MODULES:?} to be imported, found {not_kernel:?} \
         (all imports: {modules:?})"
    );
    assert!(
        modules
            .iter()
            .any(|m| m.eq_ignore_ascii_case("ntoskrnl.exe")),
        "expected ntoskrnl.exe among the imported modules, found {modules:?}"
    );
}

/// The PE checksum as `CheckSumMappedFile` computes it: the one's-complement-style 16-bit sum
/// of the file with the checksum field taken as zero, plus the file length.
fn pe_checksum(data: &[u8], nt_headers_offset: usize) -> u32 {
    // Signature (4) + IMAGE_FILE_HEADER (20) + 64 bytes into the optional header, for both
    // PE32 and PE32+.
    let checksum_offset = nt_headers_offset + 4 + 20 + 64;
    let mut sum: u64 = 0;
    for (index, chunk) in data.chunks(2).enumerate() {
        let offset = index * 2;
        if (checksum_offset..checksum_offset + 4).contains(&offset) {
            continue;
        }
        let word = u16::from_le_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u64::from(word);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    let sum = u32::try_from(sum).expect("a folded sum fits in 16 bits");
    let len = u32::try_from(data.len()).expect("a PE image is smaller than 4 GiB");
    sum.wrapping_add(len)
}

#[test]
fn pe_checksum_skips_the_checksum_field_and_adds_the_length() {
    // A fake header: NT headers at 0, so the checksum field is bytes 88..92.
    let mut data = vec![0u8; 100];
    data[0] = 0x01;
    data[1] = 0x02; // word 0x0201
    data[88..92].copy_from_slice(&[0xff; 4]); // ignored
    data[99] = 0x80; // word 0x8000
    assert_eq!(pe_checksum(&data, 0), 0x0201 + 0x8000 + 100);
    // Carries fold back into the low 16 bits.
    let data = vec![0xff; 4];
    assert_eq!(pe_checksum(&data, 1000), 0xffff + 4);
}
