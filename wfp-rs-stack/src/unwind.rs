//! x64 unwind data: `RUNTIME_FUNCTION` entries of `.pdata` and the `UNWIND_INFO` they point at.
//!
//! Only what the stack depth needs is decoded: how far the prolog moves `RSP` (pushes, fixed
//! allocations, a machine frame), following chained unwind info to the primary entry. The layout
//! is the one of Microsoft's "x64 exception handling" reference: a 4-byte header (3-bit version,
//! 5-bit flags, prolog size, count of 16-bit code slots, frame register and offset), the code
//! slots (padded to an even count), then either an exception handler or, with
//! `UNW_FLAG_CHAININFO`, a `RUNTIME_FUNCTION` of the chained (primary) entry.

use crate::Image;

/// `UNW_FLAG_CHAININFO`: this unwind info continues the one of another `RUNTIME_FUNCTION`.
pub const UNW_FLAG_CHAININFO: u8 = 0x4;

/// Unwind operation codes (the low 4 bits of a code slot's second byte).
pub mod op {
    /// Push of a non-volatile register: 8 bytes. One slot.
    pub const PUSH_NONVOL: u8 = 0;
    /// Large allocation: info 0 → next slot × 8 (two slots); info 1 → next two slots as a
    /// 32-bit size (three slots).
    pub const ALLOC_LARGE: u8 = 1;
    /// Small allocation of `info × 8 + 8` bytes (8 to 128). One slot.
    pub const ALLOC_SMALL: u8 = 2;
    /// Establishes the frame register; moves no stack. One slot.
    pub const SET_FPREG: u8 = 3;
    /// Stores a register into the allocated area; moves no stack. Two slots.
    pub const SAVE_NONVOL: u8 = 4;
    /// As `SAVE_NONVOL` with a 32-bit offset. Three slots.
    pub const SAVE_NONVOL_FAR: u8 = 5;
    /// Version 1: `UWOP_SAVE_XMM` (two slots); version 2: `UWOP_EPILOG` (one slot). No stack.
    pub const EPILOG_OR_SAVE_XMM: u8 = 6;
    /// Version 1: `UWOP_SAVE_XMM_FAR` (three slots); version 2: `UWOP_SPARE`. No stack.
    pub const SAVE_XMM_FAR: u8 = 7;
    /// Stores an XMM register into the allocated area. Two slots.
    pub const SAVE_XMM128: u8 = 8;
    /// As `SAVE_XMM128` with a 32-bit offset. Three slots.
    pub const SAVE_XMM128_FAR: u8 = 9;
    /// A machine frame pushed by the processor (interrupt/exception): 40 bytes, 48 with an
    /// error code (info 1). One slot.
    pub const PUSH_MACHFRAME: u8 = 10;
}

/// One `.pdata` entry: a function (or a fragment of one) and its unwind info, all as RVAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuntimeFunction {
    /// First byte of the function.
    pub begin: u32,
    /// One past its last byte.
    pub end: u32,
    /// RVA of its `UNWIND_INFO`.
    pub unwind_info: u32,
}

/// What the unwind info of one `RUNTIME_FUNCTION` says about its stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Bytes the prolog moves `RSP` down by (pushes + allocations + machine frame), including
    /// those of every chained entry, *not* counting the return address.
    pub allocation: u64,
    /// A frame register is established (`UWOP_SET_FPREG`), which compilers do when they
    /// realign or dynamically size the stack.
    pub frame_register: bool,
    /// The primary entries this one chains to, nearest first (empty for a primary entry).
    pub chain: Vec<u32>,
    /// Size in bytes of this entry's own prolog (`SizeOfProlog`).
    pub prolog_size: u8,
}

/// Malformed unwind data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindError {
    /// The `UNWIND_INFO` RVA where it went wrong.
    pub unwind_info: u32,
    /// What is wrong.
    pub message: String,
}

/// The longest chain followed before the data is taken as circular.
const MAX_CHAIN: usize = 32;

/// Reads the frame of `function` from its unwind info, following chained entries.
pub fn frame(image: &Image, function: &RuntimeFunction) -> Result<Frame, UnwindError> {
    let mut allocation = 0u64;
    let mut frame_register = false;
    let mut chain = Vec::new();
    let mut info_rva = function.unwind_info;
    let mut prolog_size = None;
    loop {
        if info_rva & 1 != 0 {
            // A `.pdata` entry whose unwind address has bit 0 set names another
            // RUNTIME_FUNCTION whose unwind info it shares (the indirect form of chaining).
            let entry = read_runtime_function(image, info_rva & !1).ok_or_else(|| UnwindError {
                unwind_info: info_rva,
                message: "indirect RUNTIME_FUNCTION outside the image".into(),
            })?;
            if chain.len() >= MAX_CHAIN {
                return Err(UnwindError {
                    unwind_info: function.unwind_info,
                    message: format!("chained unwind info longer than {MAX_CHAIN} entries"),
                });
            }
            chain.push(entry.begin);
            info_rva = entry.unwind_info;
            continue;
        }
        let info = parse_info(image, info_rva)?;
        prolog_size.get_or_insert(info.prolog_size);
        allocation += info.allocation;
        frame_register |= info.frame_register;
        let Some(next) = info.chained else {
            return Ok(Frame {
                allocation,
                frame_register,
                chain,
                prolog_size: prolog_size.unwrap_or(0),
            });
        };
        if chain.len() >= MAX_CHAIN {
            return Err(UnwindError {
                unwind_info: function.unwind_info,
                message: format!("chained unwind info longer than {MAX_CHAIN} entries"),
            });
        }
        chain.push(next.begin);
        info_rva = next.unwind_info;
    }
}

struct Info {
    prolog_size: u8,
    allocation: u64,
    frame_register: bool,
    chained: Option<RuntimeFunction>,
}

fn parse_info(image: &Image, rva: u32) -> Result<Info, UnwindError> {
    let error = |message: String| UnwindError {
        unwind_info: rva,
        message,
    };
    let header = image
        .read(rva, 4)
        .ok_or_else(|| error("UNWIND_INFO header outside the image".into()))?;
    let version = header[0] & 0x7;
    let flags = header[0] >> 3;
    let count = usize::from(header[2]);
    let frame_register = header[3] & 0xf != 0;
    if !(1..=2).contains(&version) {
        return Err(error(format!("unknown UNWIND_INFO version {version}")));
    }
    let codes = image
        .read(rva + 4, count * 2)
        .ok_or_else(|| error("unwind codes outside the image".into()))?;
    let slot = |index: usize| -> Result<u16, UnwindError> {
        if index >= count {
            return Err(error(format!(
                "an unwind code needs slot {index} of {count}"
            )));
        }
        Ok(u16::from_le_bytes([codes[index * 2], codes[index * 2 + 1]]))
    };

    let mut allocation = 0u64;
    let mut index = 0;
    while index < count {
        let code = slot(index)?;
        let operation = ((code >> 8) & 0xf) as u8;
        let info = (code >> 12) as u8;
        let slots = match operation {
            op::PUSH_NONVOL => {
                allocation += 8;
                1
            }
            op::ALLOC_LARGE => match info {
                0 => {
                    allocation += u64::from(slot(index + 1)?) * 8;
                    2
                }
                1 => {
                    let low = u64::from(slot(index + 1)?);
                    let high = u64::from(slot(index + 2)?);
                    allocation += low | (high << 16);
                    3
                }
                other => {
                    return Err(error(format!(
                        "UWOP_ALLOC_LARGE with operation info {other}"
                    )));
                }
            },
            op::ALLOC_SMALL => {
                allocation += u64::from(info) * 8 + 8;
                1
            }
            op::SET_FPREG => 1,
            op::SAVE_NONVOL | op::SAVE_XMM128 => 2,
            op::SAVE_NONVOL_FAR | op::SAVE_XMM128_FAR => 3,
            op::EPILOG_OR_SAVE_XMM if version == 2 => 1,
            op::EPILOG_OR_SAVE_XMM => 2,
            op::SAVE_XMM_FAR if version == 1 => 3,
            op::PUSH_MACHFRAME => {
                allocation += if info == 0 { 40 } else { 48 };
                1
            }
            other => return Err(error(format!("unknown unwind operation {other}"))),
        };
        index += slots;
    }

    let chained = if flags & UNW_FLAG_CHAININFO != 0 {
        let at = rva + 4 + (count.next_multiple_of(2) * 2) as u32;
        Some(
            read_runtime_function(image, at)
                .ok_or_else(|| error("chained RUNTIME_FUNCTION outside the image".into()))?,
        )
    } else {
        None
    };
    Ok(Info {
        prolog_size: header[1],
        allocation,
        frame_register,
        chained,
    })
}

/// Reads the 12-byte `RUNTIME_FUNCTION` at `rva`.
pub fn read_runtime_function(image: &Image, rva: u32) -> Option<RuntimeFunction> {
    let entry = image.read(rva, 12)?;
    let word = |i: usize| u32::from_le_bytes([entry[i], entry[i + 1], entry[i + 2], entry[i + 3]]);
    Some(RuntimeFunction {
        begin: word(0),
        end: word(4),
        unwind_info: word(8),
    })
}
