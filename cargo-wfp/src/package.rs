//! `cargo wfp package`: an installable folder for each driver.
//!
//! The folder holds `NAME.sys`, the INF with `DriverVer` stamped from the crate version and the
//! date, `INSTALL.txt` with the Windows commands, and — where `osslsigncode` is on the `PATH` —
//! an Authenticode test signature on the `.sys` made with a self-signed code-signing test
//! certificate, written beside it as `NAME-test.cer`. Without `osslsigncode` the image is
//! unsigned, which is said, not an error.
//!
//! What still needs Windows: a catalog file (`Inf2Cat`, then signing it) for `pnputil`
//! installs, and production signing (attestation signing through Partner Center with an EV
//! certificate) for machines without test signing.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use time::{Date, OffsetDateTime};

use crate::Error;
use crate::build::{BuildOptions, BuiltDriver};
use crate::image;
use crate::inf::{self, InfSummary};

/// What to package.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackageOptions {
    /// What to build.
    pub build: BuildOptions,
    /// The folder to write (with several drivers, one folder per package below it); default
    /// `<target>/wfp-package/<package>`.
    pub out: Option<PathBuf>,
    /// The stack budget the image is checked against.
    pub stack_budget: u64,
}

/// A folder `cargo wfp package` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packaged {
    /// The folder.
    pub dir: PathBuf,
    /// The image in it.
    pub sys: PathBuf,
    /// The stamped INF in it.
    pub inf: PathBuf,
    /// The `DriverVer` value stamped into the INF.
    pub driver_ver: String,
    /// The test certificate beside a signed image (`None`: unsigned).
    pub certificate: Option<PathBuf>,
    /// Why the image is unsigned, when it is.
    pub unsigned_reason: Option<String>,
}

/// The tool that signs on non-Windows hosts.
pub const SIGNING_TOOL: &str = "osslsigncode";

/// Builds, checks and packages every driver `options` asks for.
pub fn package(options: &PackageOptions) -> Result<Vec<Packaged>, Error> {
    let (project, built) = crate::build::build(&options.build)?;
    let date = package_date()?;
    let several = built.len() > 1;
    let mut packaged = Vec::new();
    for driver in &built {
        image::check_file(&driver.sys, options.stack_budget).map_err(|problems| {
            Error::failed(format!(
                "{} is not a loadable driver image: {problems}",
                driver.sys.display()
            ))
        })?;
        let dir = match &options.out {
            Some(out) if several => out.join(&driver.package.name),
            Some(out) => out.clone(),
            None => project
                .target_directory
                .join("wfp-package")
                .join(&driver.package.name),
        };
        let certificates = project
            .target_directory
            .join("wfp-package")
            .join("test-certificate");
        packaged.push(package_one(driver, &dir, &certificates, date)?);
    }
    Ok(packaged)
}

/// The package date: `SOURCE_DATE_EPOCH` (for reproducible packages) or today, in UTC.
fn package_date() -> Result<Date, Error> {
    match env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => {
            let seconds: i64 = epoch.trim().parse().map_err(|_| {
                Error::usage(format!(
                    "SOURCE_DATE_EPOCH=`{epoch}` is not a number of seconds"
                ))
            })?;
            OffsetDateTime::from_unix_timestamp(seconds)
                .map(OffsetDateTime::date)
                .map_err(|e| Error::usage(format!("SOURCE_DATE_EPOCH=`{epoch}`: {e}")))
        }
        Err(_) => Ok(OffsetDateTime::now_utc().date()),
    }
}

/// The INF of `driver`: the one in its package folder that lists `<crate>.sys`.
pub fn find_inf(driver: &BuiltDriver) -> Result<(PathBuf, String), Error> {
    let sys_name = format!("{}.sys", driver.package.crate_name);
    let dir = &driver.package.dir;
    let mut infs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::failed(format!("could not read {}: {e}", dir.display())))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("inf"))
        })
        .collect();
    infs.sort();
    if infs.is_empty() {
        return Err(Error::failed(format!(
            "package `{}` has no INF in {}: Windows installs a driver from its INF",
            driver.package.name,
            dir.display()
        ))
        .with_hint(missing_inf_hint(
            &driver.package.name,
            &driver.package.crate_name,
            dir,
        )));
    }
    let mut names = Vec::new();
    for path in &infs {
        let text = fs::read_to_string(path)
            .map_err(|e| Error::failed(format!("could not read {}: {e}", path.display())))?;
        let summary = InfSummary::parse(&text);
        if summary
            .source_files()
            .iter()
            .any(|file| file.eq_ignore_ascii_case(&sys_name))
        {
            return Ok((path.clone(), text));
        }
        names.push(path.display().to_string());
    }
    Err(Error::failed(format!(
        "no INF of package `{}` lists {sys_name} in [SourceDisksFiles] (looked at {})",
        driver.package.name,
        names.join(", ")
    ))
    .with_hint(format!(
        "the image is named after the library crate; list `{sys_name} = 1,,` under \
         [SourceDisksFiles] and use that name in the INF's CopyFiles and ServiceBinary"
    )))
}

/// What to do when a driver has no INF: the commands that take the one `cargo wfp new` writes
/// for a driver of the same name (a plain kernel service, named after the package), when
/// `package` is a name `cargo wfp new` accepts and the library is named after it.
fn missing_inf_hint(package: &str, crate_name: &str, dir: &Path) -> String {
    let inf = format!("{crate_name}.inf");
    match crate::new::Names::new(package) {
        Ok(names) if names.ident == crate_name => {
            let scratch = std::env::temp_dir().join(format!("{package}-inf"));
            format!(
                "start from the kernel-service INF `cargo wfp new` writes for a driver of this \
                 name, then edit its strings:\n\n    cargo wfp new {package} --path {scratch}\n    \
                 cp {scratch}/{inf} {dir}/\n",
                scratch = scratch.display(),
                dir = dir.display()
            )
        }
        _ => format!(
            "add {inf} (a kernel-service INF: `cargo wfp new --template minimal` writes one to \
             start from)"
        ),
    }
}

fn package_one(
    driver: &BuiltDriver,
    dir: &Path,
    certificates: &Path,
    date: Date,
) -> Result<Packaged, Error> {
    let (inf_path, inf_text) = find_inf(driver)?;
    let driver_ver = inf::driver_ver(&driver.package.version, date)?;
    let stamped = inf::stamp_driver_ver(&inf_text, &driver_ver)?;
    fs::create_dir_all(dir)
        .map_err(|e| Error::failed(format!("could not create {}: {e}", dir.display())))?;
    let inf_name = inf_path
        .file_name()
        .ok_or_else(|| Error::failed("an INF path without a file name"))?;
    let inf_out = dir.join(inf_name);
    write(&inf_out, stamped.as_bytes())?;

    let sys_name = format!("{}.sys", driver.package.crate_name);
    let sys_out = dir.join(&sys_name);
    let cer_name = format!("{}-test.cer", driver.package.name);
    let cer_out = dir.join(&cer_name);
    let (certificate, unsigned_reason) = match find_on_path(SIGNING_TOOL) {
        Some(tool) => {
            let (cert_pem, key_pem, cert_der) =
                test_certificate(certificates, &driver.package.name)?;
            // osslsigncode refuses to overwrite; sign into a fresh file.
            let _ = fs::remove_file(&sys_out);
            let output = Command::new(&tool)
                .args(["sign", "-h", "sha256", "-n"])
                .arg(&driver.package.name)
                .arg("-certs")
                .arg(&cert_pem)
                .arg("-key")
                .arg(&key_pem)
                .arg("-in")
                .arg(&driver.sys)
                .arg("-out")
                .arg(&sys_out)
                .output()
                .map_err(|e| Error::failed(format!("could not run {}: {e}", tool.display())))?;
            if !output.status.success() {
                return Err(Error::failed(format!(
                    "`{SIGNING_TOOL} sign` failed ({}): {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
            write(&cer_out, &cert_der)?;
            (Some(cer_out.clone()), None)
        }
        None => {
            fs::copy(&driver.sys, &sys_out).map_err(|e| {
                Error::failed(format!(
                    "could not copy {} to {}: {e}",
                    driver.sys.display(),
                    sys_out.display()
                ))
            })?;
            let _ = fs::remove_file(&cer_out);
            (
                None,
                Some(format!(
                    "{SIGNING_TOOL} is not on the PATH, so {sys_name} is unsigned: install it \
                     (e.g. `apt install osslsigncode`, `brew install osslsigncode`) and run \
                     `cargo wfp package` again, or sign on Windows with signtool"
                )),
            )
        }
    };
    let data = fs::read(&sys_out)
        .map_err(|e| Error::failed(format!("could not read {}: {e}", sys_out.display())))?;
    let summary = image::check(&data).map_err(|problems| {
        Error::failed(format!(
            "the packaged image {} is not a loadable driver image: {problems}",
            sys_out.display()
        ))
    })?;
    if certificate.is_some() && !summary.signed {
        return Err(Error::failed(format!(
            "{SIGNING_TOOL} succeeded but {} has no signature",
            sys_out.display()
        )));
    }

    let inf_summary = InfSummary::parse(&stamped);
    let instructions = install_instructions(
        &Instructions {
            package: &driver.package.name,
            sys: &sys_name,
            inf: &inf_name.to_string_lossy(),
            certificate: certificate.as_ref().map(|_| cer_name.as_str()),
            driver_ver: &driver_ver,
        },
        &inf_summary,
    );
    write(&dir.join("INSTALL.txt"), instructions.as_bytes())?;
    Ok(Packaged {
        dir: dir.to_path_buf(),
        sys: sys_out,
        inf: inf_out,
        driver_ver,
        certificate,
        unsigned_reason,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), Error> {
    fs::write(path, data)
        .map_err(|e| Error::failed(format!("could not write {}: {e}", path.display())))
}

/// `program` in a folder of the `PATH`, if there is one.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).find_map(|dir| {
        [program.to_owned(), format!("{program}.exe")]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// The project's code-signing test certificate (certificate PEM path, key PEM path,
/// certificate DER), made once in `dir` and reused, so that a test machine trusts it once.
fn test_certificate(dir: &Path, package: &str) -> Result<(PathBuf, PathBuf, Vec<u8>), Error> {
    let cert_pem = dir.join(format!("{package}-test.cer.pem"));
    let key_pem = dir.join(format!("{package}-test.key.pem"));
    let cert_der = dir.join(format!("{package}-test.cer"));
    if cert_pem.is_file()
        && key_pem.is_file()
        && let Ok(der) = fs::read(&cert_der)
    {
        return Ok((cert_pem, key_pem, der));
    }
    fs::create_dir_all(dir)
        .map_err(|e| Error::failed(format!("could not create {}: {e}", dir.display())))?;
    let (cert, key, der) = make_test_certificate(package)?;
    write(&cert_pem, cert.as_bytes())?;
    write(&key_pem, key.as_bytes())?;
    write(&cert_der, &der)?;
    Ok((cert_pem, key_pem, der))
}

/// A self-signed code-signing certificate for test-signing `package`'s driver: RSA 2048 with
/// SHA-256 (what kernel-mode code signing accepts; INFERRED for other key types), the
/// code-signing extended key usage, valid for five years. Returns (certificate PEM, private key
/// PEM, certificate DER).
pub fn make_test_certificate(package: &str) -> Result<(String, String, Vec<u8>), Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .map_err(|e| Error::failed(format!("could not make an RSA key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, certificate_name(package));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(5 * 365);
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::failed(format!("could not make the test certificate: {e}")))?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
}

/// The common name of `package`'s test certificate.
pub fn certificate_name(package: &str) -> String {
    format!("{package} test signing (cargo wfp; not for production)")
}

/// What [`install_instructions`] writes about.
#[derive(Clone, Copy, Debug)]
pub struct Instructions<'a> {
    /// The package name.
    pub package: &'a str,
    /// The image's file name.
    pub sys: &'a str,
    /// The INF's file name.
    pub inf: &'a str,
    /// The test certificate's file name, when the image is signed.
    pub certificate: Option<&'a str>,
    /// The stamped `DriverVer`.
    pub driver_ver: &'a str,
}

/// `INSTALL.txt`: the Windows commands, for an elevated Command Prompt opened in the folder.
pub fn install_instructions(what: &Instructions<'_>, inf: &InfSummary) -> String {
    let service = inf.service_name().unwrap_or(what.package);
    let minifilter = inf.is_minifilter();
    let mut t = String::new();
    let mut line = |s: &str| {
        t.push_str(s);
        t.push_str("\r\n");
    };
    line(&format!(
        "{} {} (DriverVer {}) - installing on a Windows test machine",
        what.package, what.sys, what.driver_ver
    ));
    line("");
    line("Run every command in an elevated Command Prompt (Run as administrator) opened in this");
    line("folder. Use a test machine or a virtual machine: a driver bug stops the machine.");
    line("");
    line("1. Trust the test certificate (once per machine)");
    match what.certificate {
        Some(cer) => {
            line(&format!("   certutil -addstore -f Root {cer}"));
            line(&format!("   certutil -addstore -f TrustedPublisher {cer}"));
        }
        None => {
            line(&format!(
                "   {} is UNSIGNED: {SIGNING_TOOL} was not installed where it was packaged.",
                what.sys
            ));
            line("   Sign it on Windows first (signtool from the Windows SDK, with a test");
            line("   certificate: New-SelfSignedCertificate -Type CodeSigningCert), or install");
            line(&format!(
                "   {SIGNING_TOOL} and run `cargo wfp package` again."
            ));
        }
    }
    line("");
    line("2. Allow test-signed drivers (once per machine), then restart");
    line("   bcdedit /set testsigning on");
    line("   shutdown /r /t 0");
    line("   (If bcdedit says the value is protected by Secure Boot policy, turn Secure Boot");
    line("   off in the firmware. With memory integrity (HVCI) on, test-signed drivers may");
    line("   still be refused: turn it off on the test machine.)");
    line("");
    line("3. Install");
    if minifilter {
        let strings = |key: &str| inf.string(key).map(str::to_owned);
        let instance = strings("Instance1.Name").unwrap_or_else(|| format!("{service} Instance"));
        let altitude = strings("Instance1.Altitude").unwrap_or_else(|| "370000".into());
        let flags = strings("Instance1.Flags").unwrap_or_else(|| "0x1".into());
        let group = inf
            .sections
            .values()
            .flatten()
            .find(|(k, _)| k.eq_ignore_ascii_case("LoadOrderGroup"))
            .map(|(_, v)| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "FSFilter Activity Monitor".into());
        line("   This driver is a file-system minifilter (it owns a filter-manager port), so the");
        line("   filter manager needs its instance keys and altitude. Without a catalog file:");
        line(&format!(
            "   sc create {service} type= filesys start= demand depend= FltMgr group= \"{group}\" binPath= \"%CD%\\{}\"",
            what.sys
        ));
        for key in [
            format!("HKLM\\SYSTEM\\CurrentControlSet\\Services\\{service}\\Instances"),
            format!("HKLM\\SYSTEM\\CurrentControlSet\\Services\\{service}\\Parameters\\Instances"),
        ] {
            line(&format!(
                "   reg add \"{key}\" /v DefaultInstance /t REG_SZ /d \"{instance}\" /f"
            ));
            line(&format!(
                "   reg add \"{key}\\{instance}\" /v Altitude /t REG_SZ /d {altitude} /f"
            ));
            line(&format!(
                "   reg add \"{key}\\{instance}\" /v Flags /t REG_DWORD /d {flags} /f"
            ));
        }
        line("   (Windows 11 24H2 and later read the keys under Parameters, earlier builds the");
        line("   ones directly under the service: the INF writes the ones the running Windows");
        line("   reads; by hand, writing both does no harm - INFERRED.)");
        line(&format!(
            "   The altitude {altitude} is a PLACEHOLDER for testing: a product must request its"
        ));
        line("   own altitude from Microsoft (minifilter altitude request).");
        line("   With a signed catalog file (see below) install from the INF instead:");
        line(&format!("   pnputil /add-driver {} /install", what.inf));
    } else {
        line("   A kernel service, without a catalog file:");
        line(&format!(
            "   sc create {service} type= kernel start= demand binPath= \"%CD%\\{}\"",
            what.sys
        ));
        line("   With a signed catalog file (see below) install from the INF instead:");
        line(&format!("   pnputil /add-driver {} /install", what.inf));
    }
    line("");
    line("4. Start, and check that it runs");
    if minifilter {
        line(&format!("   fltmc load {service}"));
        line("   fltmc filters");
    } else {
        line(&format!("   sc start {service}"));
    }
    line(&format!("   sc query {service}"));
    line("   netsh wfp show state file=wfpstate.xml");
    line("   (wfpstate.xml lists the registered callouts, sublayers, providers and filters:");
    line("   look for the driver's GUIDs. Its kd_print! lines appear in a kernel debugger or in");
    line("   DebugView with Capture Kernel on; Windows shows only the error-level ones unless");
    line("   the debug print filter lets the others through (read at boot: set it, restart):");
    line(
        "   reg add \"HKLM\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Debug Print Filter\" /v IHVDRIVER /t REG_DWORD /d 0xf /f",
    );
    line("   or, in a kernel debugger, ed nt!Kd_IHVDRIVER_Mask 0xf)");
    line("");
    line("5. Stop and remove");
    line("   First stop every program that has one of the driver's devices open (its service):");
    line("   Windows calls a driver's unload routine only once no handle to its devices is open");
    line("   and no request to them is outstanding; until then the driver stays STOP_PENDING.");
    line(&format!("   sc stop {service}"));
    if minifilter {
        line("   (Not fltmc unload: it asks the filter's FilterUnloadCallback, which wfp-rs");
        line("   drivers do not register, so the filter manager refuses; sc stop runs the");
        line("   driver's own unload routine.)");
    }
    line(&format!("   sc delete {service}"));
    line("   (Installed with pnputil instead: pnputil /enum-drivers, then");
    line("   pnputil /delete-driver oemNN.inf /uninstall with the oemNN.inf it lists.)");
    if what.certificate.is_some() {
        line(&format!(
            "   certutil -delstore Root \"{}\"",
            certificate_name(what.package)
        ));
        line(&format!(
            "   certutil -delstore TrustedPublisher \"{}\"",
            certificate_name(what.package)
        ));
    }
    line("   bcdedit /set testsigning off");
    line("");
    line("What still needs Windows");
    line("- A catalog file: `pnputil /add-driver` and right-click > Install verify the package");
    line("  against the catalog its INF names (CatalogFile). Make it with the WDK's Inf2Cat");
    line("  (Inf2Cat /driver:. /os:10_X64) and sign it with signtool; `sc create` above");
    line("  needs no catalog (the kernel checks the image's own signature).");
    line("- Production signing: machines without test signing load only drivers signed by");
    line("  Microsoft. Submit the package for attestation signing through the Partner Center");
    line("  hardware dashboard, which requires an EV code-signing certificate.");
    line("- infverif /v /u on the INF (WDK), and Driver Verifier on the test machine");
    line(&format!(
        "  (verifier /standard /driver {}) before shipping.",
        what.sys
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_inf_gets_the_commands_that_write_one() {
        let hint = missing_inf_hint("my-driver", "my_driver", Path::new("/src/my-driver"));
        assert!(hint.contains("cargo wfp new my-driver --path "), "{hint}");
        assert!(hint.contains("/my_driver.inf /src/my-driver/"), "{hint}");
        // A library named otherwise, or a name `cargo wfp new` refuses: the general advice.
        let hint = missing_inf_hint("my-driver", "kernel", Path::new("/src/my-driver"));
        assert!(hint.starts_with("add kernel.inf"), "{hint}");
        let hint = missing_inf_hint("My_Driver", "My_Driver", Path::new("/src"));
        assert!(hint.starts_with("add My_Driver.inf"), "{hint}");
    }
}
