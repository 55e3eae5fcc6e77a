//! The few things `cargo wfp package` reads from and writes into a driver's INF.
//!
//! Facts from Microsoft's documentation of the INF `DriverVer` directive: its value is
//! `mm/dd/yyyy,w.x.y.z`, the month and day with two digits and the year with four; each of
//! `w`, `x`, `y`, `z` is an integer at least 0 and less than 65535, and `0.0.0.0` is not valid.
//! The date should be the most recent date of any file in the package, so it is stamped when
//! the package is made.

use std::collections::BTreeMap;

use crate::Error;

/// `DriverVer`'s value for crate version `version` (`MAJOR.MINOR.PATCH`, any pre-release or
/// build suffix ignored) on `date`: `mm/dd/yyyy,MAJOR.MINOR.PATCH.0`.
///
/// ```
/// let date = time::Date::from_calendar_date(2026, time::Month::March, 9).unwrap();
/// assert_eq!(
///     cargo_wfp::inf::driver_ver("1.2.3", date).unwrap(),
///     "03/09/2026,1.2.3.0"
/// );
/// assert!(cargo_wfp::inf::driver_ver("0.0.0", date).is_err());
/// assert!(cargo_wfp::inf::driver_ver("65535.0.0", date).is_err());
/// ```
pub fn driver_ver(version: &str, date: time::Date) -> Result<String, Error> {
    let core = version.split(['-', '+']).next().unwrap_or(version);
    let parts: Vec<&str> = core.split('.').collect();
    let numbers: Option<Vec<u32>> = parts.iter().map(|p| p.parse().ok()).collect();
    let numbers = match numbers {
        Some(numbers) if numbers.len() == 3 => numbers,
        _ => {
            return Err(Error::failed(format!(
                "crate version `{version}` is not MAJOR.MINOR.PATCH"
            )));
        }
    };
    if let Some(big) = numbers.iter().find(|&&n| n >= 65535) {
        return Err(Error::failed(format!(
            "crate version `{version}`: each part of an INF DriverVer version must be less than \
             65535, found {big}"
        )));
    }
    if numbers.iter().all(|&n| n == 0) {
        return Err(Error::failed(format!(
            "crate version `{version}` would be DriverVer 0.0.0.0, which Windows does not accept"
        ))
        .with_hint("set a version such as 0.1.0 in the driver's Cargo.toml"));
    }
    Ok(format!(
        "{:02}/{:02}/{:04},{}.{}.{}.0",
        u8::from(date.month()),
        date.day(),
        date.year(),
        numbers[0],
        numbers[1],
        numbers[2]
    ))
}

/// `inf` with the `DriverVer` of its `[Version]` section set to `value` (added after
/// `Signature` when there is none). Other lines, comments and line endings are kept.
///
/// ```
/// let inf = "[Version]\r\nSignature = \"$Windows NT$\"\r\nDriverVer = 01/01/2000,1.0.0.0 ; old\r\n";
/// let stamped = cargo_wfp::inf::stamp_driver_ver(inf, "03/09/2026,0.1.0.0").unwrap();
/// assert_eq!(
///     stamped,
///     "[Version]\r\nSignature = \"$Windows NT$\"\r\nDriverVer   = 03/09/2026,0.1.0.0\r\n"
/// );
/// ```
pub fn stamp_driver_ver(inf: &str, value: &str) -> Result<String, Error> {
    let newline = if inf.contains("\r\n") { "\r\n" } else { "\n" };
    let line = format!("DriverVer   = {value}");
    let mut out = Vec::new();
    let mut section = String::new();
    let mut stamped = false;
    let mut signature_at = None;
    for raw in inf.split_inclusive('\n') {
        let text = raw.trim_end_matches(['\r', '\n']);
        let code = strip_comment(text).trim();
        if let Some(name) = section_name(code) {
            section = name.to_ascii_lowercase();
        } else if section == "version" {
            let key = code.split('=').next().unwrap_or("").trim();
            if key.eq_ignore_ascii_case("DriverVer") {
                if !stamped {
                    out.push(format!("{line}{newline}"));
                    stamped = true;
                }
                continue;
            }
            if key.eq_ignore_ascii_case("Signature") {
                signature_at = Some(out.len());
            }
        }
        out.push(raw.to_owned());
    }
    if !stamped {
        let at = signature_at
            .ok_or_else(|| Error::failed("the INF has no [Version] section with a Signature"))?;
        out.insert(at + 1, format!("{line}{newline}"));
    }
    Ok(out.concat())
}

/// What `cargo wfp package` needs to know about an INF.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InfSummary {
    /// Every section's `key = value` lines, `%strings%` substituted, section names in lower
    /// case; repeated keys keep every value.
    pub sections: BTreeMap<String, Vec<(String, String)>>,
}

impl InfSummary {
    /// Reads `inf`.
    ///
    /// ```
    /// let inf = cargo_wfp::inf::InfSummary::parse(
    ///     "[Version]\nDriverVer = 01/02/2026,0.1.0.0\n[Svc]\nServiceType = 1 ; kernel\n\
    ///      AddService = %Name%,,Svc\n[Strings]\nName = \"Acme\"\n",
    /// );
    /// assert_eq!(inf.value("Version", "DriverVer"), Some("01/02/2026,0.1.0.0"));
    /// assert_eq!(inf.value("svc", "ServiceType"), Some("1"));
    /// assert_eq!(inf.value("Svc", "AddService"), Some("Acme,,Svc"));
    /// assert_eq!(inf.string("Name"), Some("Acme"));
    /// ```
    pub fn parse(inf: &str) -> Self {
        let mut raw: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut section = String::new();
        for line in inf.lines() {
            let code = strip_comment(line).trim();
            if let Some(name) = section_name(code) {
                section = name.to_ascii_lowercase();
                raw.entry(section.clone()).or_default();
            } else if let Some((key, value)) = code.split_once('=') {
                raw.entry(section.clone())
                    .or_default()
                    .push((key.trim().to_owned(), value.trim().to_owned()));
            } else if !code.is_empty() {
                raw.entry(section.clone())
                    .or_default()
                    .push((code.to_owned(), String::new()));
            }
        }
        let strings: BTreeMap<String, String> = raw
            .get("strings")
            .map(|entries| {
                entries
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), unquote(v).to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let substitute = |text: &str| {
            let mut out = String::new();
            let mut rest = text;
            while let Some(start) = rest.find('%') {
                out.push_str(&rest[..start]);
                let after = &rest[start + 1..];
                match after.find('%') {
                    Some(end) => {
                        let key = &after[..end];
                        match strings.get(&key.to_ascii_lowercase()) {
                            Some(value) => out.push_str(value),
                            None => {
                                out.push('%');
                                out.push_str(key);
                                out.push('%');
                            }
                        }
                        rest = &after[end + 1..];
                    }
                    None => {
                        out.push_str(&rest[start..]);
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            out
        };
        let sections = raw
            .into_iter()
            .map(|(name, entries)| {
                let entries = if name == "strings" {
                    entries
                        .into_iter()
                        .map(|(k, v)| (k, unquote(&v).to_owned()))
                        .collect()
                } else {
                    entries
                        .into_iter()
                        .map(|(k, v)| (substitute(&k), substitute(&v)))
                        .collect()
                };
                (name, entries)
            })
            .collect();
        Self { sections }
    }

    /// The first value of `key` in `section` (both case-insensitive), quotes removed.
    pub fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .get(&section.to_ascii_lowercase())?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| unquote(v))
    }

    /// `%key%` as the `[Strings]` section defines it.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.value("Strings", key)
    }

    /// The name of the first service an `AddService` directive installs.
    pub fn service_name(&self) -> Option<&str> {
        self.sections.values().flatten().find_map(|(k, v)| {
            k.eq_ignore_ascii_case("AddService")
                .then(|| unquote(v.split(',').next().unwrap_or("").trim()))
        })
    }

    /// The section an `AddService` directive names for the service's settings.
    fn service_section(&self) -> Option<&str> {
        self.sections.values().flatten().find_map(|(k, v)| {
            k.eq_ignore_ascii_case("AddService")
                .then(|| v.split(',').nth(2).map(str::trim))
                .flatten()
        })
    }

    /// The `ServiceType` of the service: 1 for a kernel driver, 2 for a file-system driver (a
    /// minifilter).
    pub fn service_type(&self) -> Option<u32> {
        let value = self.value(self.service_section()?, "ServiceType")?;
        let value = value.trim();
        match value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))
        {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    }

    /// Whether the INF installs a file-system minifilter (service type 2, or a dependency on
    /// `FltMgr`): such a driver is loaded with `fltmc load`.
    pub fn is_minifilter(&self) -> bool {
        self.service_type() == Some(2)
            || self.service_section().is_some_and(|section| {
                self.value(section, "Dependencies")
                    .is_some_and(|d| d.to_ascii_lowercase().contains("fltmgr"))
            })
    }

    /// The files `[SourceDisksFiles]` lists.
    pub fn source_files(&self) -> Vec<&str> {
        self.sections
            .get("sourcedisksfiles")
            .map(|entries| entries.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default()
    }
}

fn section_name(code: &str) -> Option<&str> {
    code.strip_prefix('[')?.strip_suffix(']').map(str::trim)
}

/// `line` without its `;` comment (a `;` inside double quotes is text).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (index, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..index],
            _ => {}
        }
    }
    line
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamping_adds_driver_ver_after_the_signature_when_missing() {
        let inf = "[Version]\nSignature = \"$Windows NT$\"\nClass = X\n";
        assert_eq!(
            stamp_driver_ver(inf, "01/02/2026,1.0.0.0").unwrap(),
            "[Version]\nSignature = \"$Windows NT$\"\nDriverVer   = 01/02/2026,1.0.0.0\nClass = X\n"
        );
        assert!(stamp_driver_ver("[Strings]\n", "x").is_err());
    }

    #[test]
    fn a_driver_ver_outside_version_is_left_alone() {
        let inf = "[Version]\nSignature=x\nDriverVer=1\n[Other]\nDriverVer=2\n";
        assert_eq!(
            stamp_driver_ver(inf, "v").unwrap(),
            "[Version]\nSignature=x\nDriverVer   = v\n[Other]\nDriverVer=2\n"
        );
    }

    #[test]
    fn minifilter_and_kernel_service() {
        let kernel = InfSummary::parse(
            "[DefaultInstall.NTamd64.Services]\nAddService = %S%,,Svc\n[Svc]\nServiceType = 1\n\
             [Strings]\nS = \"Acme\"\n",
        );
        assert_eq!(kernel.service_name(), Some("Acme"));
        assert_eq!(kernel.service_type(), Some(1));
        assert!(!kernel.is_minifilter());
        let filter = InfSummary::parse(
            "[I.Services]\nAddService = A,,Svc\n[Svc]\nServiceType = 2 ; fs\nDependencies = \"FltMgr\"\n",
        );
        assert!(filter.is_minifilter());
    }
}
