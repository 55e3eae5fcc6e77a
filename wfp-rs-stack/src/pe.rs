//! Reading an [`Image`] out of a PE32+ file with the `object` crate.

use std::collections::{BTreeMap, BTreeSet};

use object::LittleEndian as LE;
use object::pe;
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, Import, PeFile64};

use crate::unwind::read_runtime_function;
use crate::{Error, Image, Section};

/// Reads the parts of a PE32+ (x64) image the analysis needs.
pub fn read(bytes: &[u8]) -> Result<Image, Error> {
    let invalid = |what: &str, e: object::Error| Error::Image(format!("{what}: {e}"));
    let file = PeFile64::parse(bytes).map_err(|e| invalid("not a PE32+ image", e))?;
    let headers = file.nt_headers();
    let machine = headers.file_header().machine.get(LE);
    if machine != pe::IMAGE_FILE_MACHINE_AMD64 {
        return Err(Error::Image(format!(
            "machine {:#06x} is not AMD64; only x64 images have the unwind data this reads",
            machine.0
        )));
    }
    let optional = headers.optional_header();
    let image_base = optional.image_base();

    let section_table = file.section_table();
    let mut sections = Vec::new();
    for header in section_table.iter() {
        let name = String::from_utf8_lossy(header.raw_name())
            .trim_end_matches('\0')
            .to_owned();
        let mut data = header
            .pe_data(bytes)
            .map_err(|e| invalid("section data", e))?
            .to_vec();
        // Memory past the raw data up to the virtual size is zero-filled by the loader.
        let virtual_size = header.virtual_size.get(LE) as usize;
        if data.len() < virtual_size {
            data.resize(virtual_size, 0);
        }
        let characteristics = header.characteristics.get(LE);
        sections.push(Section {
            name,
            rva: header.virtual_address.get(LE),
            data,
            executable: characteristics.0 & pe::IMAGE_SCN_MEM_EXECUTE.0 != 0,
        });
    }
    let mut image = Image {
        sections,
        entry_point: match optional.address_of_entry_point() {
            0 => None,
            rva => Some(rva),
        },
        ..Image::default()
    };

    // .pdata: the exception directory is an array of RUNTIME_FUNCTION.
    if let Some(dir) = file.data_directory(pe::IMAGE_DIRECTORY_ENTRY_EXCEPTION) {
        let (rva, size) = (dir.virtual_address.get(LE), dir.size.get(LE));
        for index in 0..size / 12 {
            let entry = read_runtime_function(&image, rva + index * 12).ok_or_else(|| {
                Error::Image("the exception directory lies outside the image".into())
            })?;
            image.runtime_functions.push(entry);
        }
    }

    // Imports: the RVA of each IAT slot and the routine it is bound to.
    if let Some(table) = file
        .import_table()
        .map_err(|e| invalid("import table", e))?
    {
        let mut descriptors = table
            .descriptors()
            .map_err(|e| invalid("import descriptors", e))?;
        while let Some(descriptor) = descriptors
            .next()
            .map_err(|e| invalid("import descriptor", e))?
        {
            let module = String::from_utf8_lossy(
                table
                    .name(descriptor.name.get(LE))
                    .map_err(|e| invalid("import module name", e))?,
            )
            .into_owned();
            let iat = descriptor.first_thunk.get(LE);
            let lookup = match descriptor.original_first_thunk.get(LE) {
                0 => iat,
                rva => rva,
            };
            let mut thunks = table
                .thunks(lookup)
                .map_err(|e| invalid("import thunks", e))?;
            let mut index = 0u32;
            while let Some(thunk) = thunks
                .next::<pe::ImageNtHeaders64>()
                .map_err(|e| invalid("import thunk", e))?
            {
                let name = match table
                    .import::<pe::ImageNtHeaders64>(thunk)
                    .map_err(|e| invalid("import", e))?
                {
                    Import::Name(_, name) => String::from_utf8_lossy(name).into_owned(),
                    Import::Ordinal(ordinal) => format!("#{ordinal}"),
                };
                image
                    .imports
                    .insert(iat + index * 8, format!("{module}!{name}"));
                index += 1;
            }
        }
    }

    // Exports.
    if let Some(table) = file
        .export_table()
        .map_err(|e| invalid("export table", e))?
    {
        for export in table.exports().map_err(|e| invalid("exports", e))? {
            if let (Some(name), object::read::pe::ExportTarget::Address(rva)) =
                (export.name, export.target)
            {
                image
                    .exports
                    .insert(rva, String::from_utf8_lossy(name).into_owned());
            }
        }
    }

    // Base relocations: every absolute 64-bit address stored in the image. Those that point
    // into it are where code or data keeps a pointer (callback tables, vtables, statics).
    let mut pointers = BTreeSet::new();
    if let Some(mut blocks) = file
        .data_directories()
        .relocation_blocks(bytes, &section_table)
        .map_err(|e| invalid("base relocations", e))?
    {
        while let Some(block) = blocks.next().map_err(|e| invalid("relocation block", e))? {
            for relocation in block {
                if relocation.typ != pe::IMAGE_REL_BASED_DIR64 {
                    continue;
                }
                let Some(value) = image.read(relocation.virtual_address, 8) else {
                    continue;
                };
                let value = u64::from_le_bytes(value.try_into().expect("read returned 8 bytes"));
                if let Some(rva) = value
                    .checked_sub(image_base)
                    .and_then(|rva| u32::try_from(rva).ok())
                {
                    pointers.insert((relocation.virtual_address, rva));
                }
            }
        }
    }
    image.data_pointers = pointers.into_iter().collect::<BTreeMap<u32, u32>>();
    Ok(image)
}
