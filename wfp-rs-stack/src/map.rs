//! Function names from a linker map (`/MAP`), as `lld-link` and `link.exe` write it.
//!
//! Release kernel images carry no symbol table. When the image was linked with `/MAP` (the
//! `wfp-rs-build` link arguments ask for it), the map lists every public symbol with its
//! address; [`parse`] turns those lines into RVA → demangled name (without the hash suffix).
//!
//! The lines read are those of the "Publics by Value" table:
//!
//! ```text
//!  Preferred load address is 0000000180000000
//!  0001:00000000       _ZN4core3fmt5write17h...E 0000000180001000     core-....rlib:core....o
//! ```

use std::collections::BTreeMap;

/// RVA → demangled name of every public symbol in `map` (the first name wins where several
/// share an address). Lines that are not symbol lines are skipped.
pub fn parse(map: &str) -> BTreeMap<u32, String> {
    let mut base = None;
    let mut names = BTreeMap::new();
    for line in map.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Preferred load address is ") {
            base = u64::from_str_radix(rest.trim(), 16).ok();
            continue;
        }
        let Some(base) = base else { continue };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [section_offset, symbol, address, ..] = fields[..] else {
            continue;
        };
        let is_section_offset = section_offset.split_once(':').is_some_and(|(s, o)| {
            s.len() == 4
                && o.len() == 8
                && s.chars().chain(o.chars()).all(|c| c.is_ascii_hexdigit())
        });
        if !is_section_offset || address.len() != 16 {
            continue;
        }
        let Ok(address) = u64::from_str_radix(address, 16) else {
            continue;
        };
        let Some(rva) = address
            .checked_sub(base)
            .and_then(|rva| u32::try_from(rva).ok())
        else {
            continue;
        };
        names
            .entry(rva)
            .or_insert_with(|| format!("{:#}", rustc_demangle::demangle(symbol)));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_publics_and_demangles_them() {
        let map = " firewall_driver\n\n Preferred load address is 0000000180000000\n\n  \
            Address         Publics by Value              Rva+Base               Lib:Object\n\n \
            0001:00000000       _ZN4core3fmt5write17h0123456789abcdefE 0000000180001000     a.o\n \
            0001:00000010       DriverEntry 0000000180001010     b.o\n \
            0001:00000010       alias 0000000180001010     b.o\n \
            0001:00000000 000545ccH .text                   CODE\n";
        let names = parse(map);
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[&0x1000], "core::fmt::write");
        assert_eq!(names[&0x1010], "DriverEntry");
    }
}
