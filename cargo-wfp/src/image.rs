//! What Windows checks about a driver image before it loads it, checked on any host.
//!
//! [`check`] reads a `.sys` file's PE headers the way the loader does and reports every problem
//! it finds at once; [`check_file`] adds the file name and the stack check of
//! [`wfp_rs_stack`].

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use object::read::pe::{ExportTarget, ImageNtHeaders, ImageOptionalHeader, PeFile64};
use object::{FileKind, LittleEndian as LE, pe};

/// The only modules a driver may import from: they are loaded in kernel space. Anything else
/// (`kernel32.dll`, the C runtime, `api-ms-win-*` sets) exists only in user mode and the image
/// would fail to load.
pub const KERNEL_MODULES: &[&str] = &[
    "ntoskrnl.exe",
    "hal.dll",
    "fwpkclnt.sys",
    "fltmgr.sys",
    "netio.sys",
    "ndis.sys",
    // CNG's kernel module: `BCryptGenRandom`, from which the SDK draws its secret at load.
    "cng.sys",
];

/// What a driver image is, as far as the checks read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSummary {
    /// The modules the image imports from, as the import table spells them.
    pub imports: BTreeSet<String>,
    /// The RVA of the entry point (that of the exported `DriverEntry`).
    pub entry_point: u32,
    /// Whether the image has an Authenticode signature (a certificate table, the security
    /// data directory). Its validity is not checked here.
    pub signed: bool,
}

/// Why an image is not a loadable driver: every problem found, each a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageProblems(pub Vec<String>);

impl fmt::Display for ImageProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            f.write_str(problem)?;
        }
        Ok(())
    }
}

impl std::error::Error for ImageProblems {}

/// Checks that `data` is a 64-bit native WDM driver image that imports only kernel modules:
/// PE32+ for AMD64, subsystem `NATIVE`, the WDM-driver DLL characteristic, the entry point is
/// the exported `DriverEntry`, every import from a kernel module and none delay-loaded, no TLS
/// directory, and a PE checksum that is non-zero and matches the file.
///
/// ```
/// let problems = cargo_wfp::image::check(b"MZ not really").unwrap_err();
/// assert!(problems.to_string().contains("PE32+"));
/// ```
pub fn check(data: &[u8]) -> Result<ImageSummary, ImageProblems> {
    let mut problems = Vec::new();
    let kind = FileKind::parse(data);
    if !matches!(kind, Ok(FileKind::Pe64)) {
        return Err(ImageProblems(vec![format!(
            "expected a PE32+ image, found {}",
            match kind {
                Ok(kind) => format!("{kind:?}"),
                Err(e) => e.to_string(),
            }
        )]));
    }
    let image = PeFile64::parse(data)
        .map_err(|e| ImageProblems(vec![format!("expected a readable PE32+ image: {e}")]))?;
    let headers = image.nt_headers();
    let optional = headers.optional_header();

    let machine = headers.file_header().machine.get(LE);
    if machine != pe::IMAGE_FILE_MACHINE_AMD64 {
        problems.push(format!(
            "expected machine AMD64 ({:#06x}), found {machine:#06x}",
            pe::IMAGE_FILE_MACHINE_AMD64
        ));
    }
    let subsystem = optional.subsystem();
    if subsystem != pe::IMAGE_SUBSYSTEM_NATIVE {
        problems.push(format!(
            "expected subsystem NATIVE ({}), found {subsystem} (is the crate linked with \
             wfp-rs-build's /SUBSYSTEM:NATIVE? see its build.rs)",
            pe::IMAGE_SUBSYSTEM_NATIVE
        ));
    }
    let characteristics = optional.dll_characteristics();
    let wdm = pe::IMAGE_DLLCHARACTERISTICS_WDM_DRIVER;
    if characteristics & wdm != wdm {
        problems.push(format!(
            "expected the WDM-driver DLL characteristic ({wdm:#06x}), found characteristics \
             {characteristics:#06x} (linked without /DRIVER:WDM)"
        ));
    }

    let entry_point = optional.address_of_entry_point();
    check_entry_point(&image, entry_point, &mut problems);
    let imports = imports(&image, &mut problems);

    if image
        .data_directory(pe::IMAGE_DIRECTORY_ENTRY_TLS)
        .is_some()
    {
        problems
            .push("expected no TLS directory (the kernel runs no TLS callbacks), found one".into());
    }
    let stored = optional.check_sum();
    let computed = pe_checksum(data, image.dos_header().nt_headers_offset() as usize);
    if stored == 0 {
        problems.push("expected a non-zero PE checksum (linked with /RELEASE), found 0".into());
    } else if stored != computed {
        problems.push(format!(
            "expected the stored PE checksum to match the file, stored {stored:#010x}, \
             computed {computed:#010x}"
        ));
    }
    let signed = image
        .data_directory(pe::IMAGE_DIRECTORY_ENTRY_SECURITY)
        .is_some_and(|directory| directory.size.get(LE) > 0);

    if problems.is_empty() {
        Ok(ImageSummary {
            imports,
            entry_point,
            signed,
        })
    } else {
        Err(ImageProblems(problems))
    }
}

/// The entry point must be the exported `DriverEntry` (linked with `/ENTRY:DriverEntry`).
fn check_entry_point(image: &PeFile64<'_>, entry_rva: u32, problems: &mut Vec<String>) {
    if entry_rva == 0 {
        problems.push("expected an entry point, found none (RVA 0)".into());
        return;
    }
    let exports = match image.export_table() {
        Ok(Some(table)) => match table.exports() {
            Ok(exports) => exports,
            Err(e) => {
                problems.push(format!("expected readable exports: {e}"));
                return;
            }
        },
        Ok(None) => {
            problems.push(
                "expected an export table with DriverEntry (#[wfp_rs::driver_entry] exports it), \
                 found none"
                    .into(),
            );
            return;
        }
        Err(e) => {
            problems.push(format!("expected a well-formed export table: {e}"));
            return;
        }
    };
    match exports
        .iter()
        .find(|export| export.name == Some(b"DriverEntry".as_slice()))
    {
        Some(export) => match export.target {
            ExportTarget::Address(rva) if rva == entry_rva => {}
            ExportTarget::Address(rva) => problems.push(format!(
                "expected the entry point to be DriverEntry ({rva:#x}), found {entry_rva:#x} \
                 (linked without /ENTRY:DriverEntry)"
            )),
            other => problems.push(format!(
                "expected DriverEntry to be exported by address, found {other:?}"
            )),
        },
        None => problems.push(
            "expected an export named DriverEntry (does the crate have a \
             #[wfp_rs::driver_entry] function?), found none"
                .into(),
        ),
    }
}

/// The imported modules; every one (plain or delay-loaded) must be a kernel module.
fn imports(image: &PeFile64<'_>, problems: &mut Vec<String>) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    match image.import_table() {
        Ok(Some(table)) => match table.descriptors() {
            Ok(mut descriptors) => loop {
                match descriptors.next() {
                    Ok(Some(descriptor)) => match table.name(descriptor.name.get(LE)) {
                        Ok(name) => {
                            modules.insert(String::from_utf8_lossy(name).into_owned());
                        }
                        Err(e) => problems.push(format!("expected a readable module name: {e}")),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        problems.push(format!("expected readable import descriptors: {e}"));
                        break;
                    }
                }
            },
            Err(e) => problems.push(format!("expected import descriptors: {e}")),
        },
        Ok(None) => {}
        Err(e) => problems.push(format!("expected a well-formed import table: {e}")),
    }
    match image.delay_load_import_table() {
        Ok(None) => {}
        Ok(Some(_)) => problems.push(
            "expected no delay-load imports (the kernel does not resolve them), found a \
             delay-load table"
                .into(),
        ),
        Err(e) => problems.push(format!("expected a well-formed delay-load table: {e}")),
    }
    let foreign: Vec<&String> = modules
        .iter()
        .filter(|module| {
            !KERNEL_MODULES
                .iter()
                .any(|kernel| module.eq_ignore_ascii_case(kernel))
        })
        .collect();
    if !foreign.is_empty() {
        problems.push(format!(
            "expected imports from kernel modules only ({}), found {foreign:?}: user-mode code \
             (std, the C runtime, wfp-rs's `user` feature) was linked into the driver",
            KERNEL_MODULES.join(", ")
        ));
    }
    if !modules
        .iter()
        .any(|module| module.eq_ignore_ascii_case("ntoskrnl.exe"))
    {
        problems.push(format!(
            "expected ntoskrnl.exe among the imported modules, found {modules:?}"
        ));
    }
    modules
}

/// The PE checksum as `CheckSumMappedFile` computes it: the one's-complement-style 16-bit sum
/// of the file with the checksum field taken as zero, plus the file length.
///
/// ```
/// // NT headers at offset 0: the checksum field is bytes 88..92, and is skipped.
/// let mut data = vec![0u8; 100];
/// data[88..92].copy_from_slice(&[0xff; 4]);
/// data[0] = 1;
/// assert_eq!(cargo_wfp::image::pe_checksum(&data, 0), 1 + 100);
/// ```
pub fn pe_checksum(data: &[u8], nt_headers_offset: usize) -> u32 {
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
    // A folded sum fits in 16 bits; a PE image is smaller than 4 GiB (the format's offsets
    // are 32-bit), so the length wraps only for data that is no image anyway.
    (sum as u32).wrapping_add(data.len() as u32)
}

/// Checks the image at `sys` with [`check`], its name (`*.sys`), and its worst-case stack depth
/// with [`wfp_rs_stack`] and `budget` (the linker map beside it, if any, names functions).
/// Returns the summary and the stack report.
pub fn check_file(
    sys: &Path,
    budget: u64,
) -> Result<(ImageSummary, wfp_rs_stack::Report), ImageProblems> {
    let data = std::fs::read(sys)
        .map_err(|e| ImageProblems(vec![format!("could not read {}: {e}", sys.display())]))?;
    let mut problems = Vec::new();
    if sys.extension().and_then(|e| e.to_str()) != Some("sys") {
        problems.push(format!(
            "expected the driver image to be named *.sys, found {}",
            sys.display()
        ));
    }
    let summary = match check(&data) {
        Ok(summary) => Some(summary),
        Err(ImageProblems(found)) => {
            problems.extend(found);
            None
        }
    };
    let report = match wfp_rs_stack::analyze_file(sys, &wfp_rs_stack::Options { budget }) {
        Ok(report) => {
            if !report.passed() {
                problems.push(format!(
                    "the stack check failed (budget {budget} bytes):\n{report}\nmove large \
                     buffers to pool and big builders into functions of their own (see \
                     https://github.com/wfp-rs/wfp-rs/blob/main/docs/building-drivers.md)"
                ));
            }
            Some(report)
        }
        Err(e) => {
            problems.push(format!("the stack check could not read the image: {e}"));
            None
        }
    };
    match (summary, report) {
        (Some(summary), Some(report)) if problems.is_empty() => Ok((summary, report)),
        _ => Err(ImageProblems(problems)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_checksum_skips_the_checksum_field_and_adds_the_length() {
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

    #[test]
    fn not_an_image_is_one_problem() {
        let problems = check(b"not a PE file").unwrap_err();
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert!(
            problems.0[0].starts_with("expected a PE32+ image"),
            "{problems}"
        );
    }
}
