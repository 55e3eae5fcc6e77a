//! Worst-case stack depth of a Windows x64 kernel driver image.
//!
//! A kernel thread's stack is small (`KERNEL_STACK_SIZE`, 24 KiB on x64) and a WFP callback
//! runs on a stack the network stack has already used part of. An overflow is a bug check, and
//! the simulator (which runs drivers on a big user-mode thread stack) cannot see it. This crate
//! computes, from the compiled image alone, how deep each routine the kernel can call may take
//! the stack:
//!
//! - **Frame sizes** come from the x64 unwind data: each `.pdata` `RUNTIME_FUNCTION` points at
//!   an `UNWIND_INFO` whose codes say how far the prolog moves `RSP` (pushes, allocations, a
//!   machine frame; chained entries add their primary's). A function's frame is that plus its
//!   8-byte return address. Code with no `.pdata` entry is a *leaf* in the x64 ABI's sense:
//!   the ABI requires a table entry for every function that allocates stack or calls another,
//!   so a leaf's frame is its return address alone. The analysis checks that claim on the
//!   code and flags a leaf that calls or moves `RSP`.
//! - **The call graph** comes from decoding each function with `iced-x86`: `call rel32` edges,
//!   tail calls (a jump to outside the function: its frame is gone, the callee runs at the
//!   caller's depth), calls through the import address table (kernel routines: counted as
//!   their return address only — the budget keeps room for the kernel's frames), and indirect
//!   calls through registers or memory outside the IAT (flagged: their target is unknown).
//! - **Entry points** are every function the kernel can call: the image entry point
//!   (`DriverEntry`), exports, and every function whose address is taken — by a RIP-relative
//!   `lea` of its first byte, or by an absolute pointer to it stored in the image (found
//!   through the base relocations). Callbacks (unload, classify, notify, flow delete, work
//!   items, dispatch routines, port callbacks) are all passed to the kernel by address, so the
//!   set is a conservative superset of them.
//!
//! The worst-case depth of an entry point is the largest sum of frames along a call path from
//! it. A path through recursion or an indirect call has no static bound: those sites are
//! reported as *unbounded*, with the function and the instruction, and never counted as
//! bounded. The check fails when a bounded path is deeper than the budget
//! ([`DEFAULT_BUDGET`]); see [`Report::passed`] for how unbounded sites count.
//!
//! ```no_run
//! let bytes = std::fs::read("minimal_driver.sys").unwrap();
//! let report = wfp_rs_stack::analyze_pe(&bytes, &wfp_rs_stack::Options::default()).unwrap();
//! print!("{report}");
//! assert!(report.passed());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};

pub mod map;
mod pe;
pub mod unwind;

pub use unwind::{Frame, RuntimeFunction, UnwindError};

/// The size of an x64 kernel thread's stack: `KERNEL_STACK_SIZE` (0x6000) in wdm.h.
pub const KERNEL_STACK_SIZE: u64 = 0x6000;

/// The default budget for the driver's own frames on any path from an entry point: half of
/// [`KERNEL_STACK_SIZE`], 12 KiB.
///
/// INFERRED engineering margin, not a Windows rule: a WFP callback runs on a stack the network
/// stack (and whatever called it: a system call, a DPC, the NDIS receive path) has already
/// used part of, and the kernel routines the driver calls (counted here as their return
/// address only) need stack of their own below the driver's deepest frame. Neither is
/// documented; half of the stack for the driver leaves the other half for both.
pub const DEFAULT_BUDGET: u64 = KERNEL_STACK_SIZE / 2;

/// Frame of a function without unwind data: its return address.
const RETURN_ADDRESS: u64 = 8;

/// The longest stretch of code decoded for a leaf function whose end is not known.
const MAX_LEAF_LEN: u32 = 0x1_0000;

/// An x64 image as the analysis sees it: memory by RVA, unwind entries, imports, pointers.
///
/// [`analyze_pe`] reads one from a PE file; tests build small ones by hand.
#[derive(Clone, Debug, Default)]
pub struct Image {
    /// The sections, each with its memory (zero-filled up to the virtual size).
    pub sections: Vec<Section>,
    /// The `.pdata` entries.
    pub runtime_functions: Vec<RuntimeFunction>,
    /// Import address table slots: slot RVA → `module!routine`.
    pub imports: BTreeMap<u32, String>,
    /// The image entry point (`AddressOfEntryPoint`), if any.
    pub entry_point: Option<u32>,
    /// Exported routines: RVA → name.
    pub exports: BTreeMap<u32, String>,
    /// Absolute pointers stored in the image (from its base relocations): the RVA where the
    /// pointer is stored → the RVA it points at.
    pub data_pointers: BTreeMap<u32, u32>,
    /// Names of functions by RVA, when a linker map or other symbol source is available.
    pub symbols: BTreeMap<u32, String>,
}

/// One section of an [`Image`].
#[derive(Clone, Debug, Default)]
pub struct Section {
    /// Its name (`.text`, `.pdata`, ...).
    pub name: String,
    /// Where it is loaded, relative to the image base.
    pub rva: u32,
    /// Its memory.
    pub data: Vec<u8>,
    /// Whether it is mapped executable (`IMAGE_SCN_MEM_EXECUTE`).
    pub executable: bool,
}

impl Image {
    /// `len` bytes of memory at `rva`, if they lie in one section.
    pub fn read(&self, rva: u32, len: usize) -> Option<&[u8]> {
        let section = self.section_of(rva)?;
        let start = (rva - section.rva) as usize;
        section.data.get(start..start.checked_add(len)?)
    }

    fn section_of(&self, rva: u32) -> Option<&Section> {
        self.sections.iter().find(|section| {
            rva >= section.rva && ((rva - section.rva) as usize) < section.data.len()
        })
    }

    fn is_code(&self, rva: u32) -> bool {
        self.section_of(rva)
            .is_some_and(|section| section.executable)
    }
}

/// Why an image could not be analysed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The file is not a readable PE32+ x64 image.
    Image(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Image(message) => write!(f, "cannot read the image: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// How to judge the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The most stack, in bytes, any bounded path of the driver's own frames may use
    /// ([`DEFAULT_BUDGET`] unless changed).
    pub budget: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET,
        }
    }
}

/// Reads a PE32+ x64 image and analyses it.
pub fn analyze_pe(bytes: &[u8], options: &Options) -> Result<Report, Error> {
    let image = pe::read(bytes)?;
    Ok(analyze(&image, options))
}

/// Reads the image at `path` and, if there is one beside it, its linker map (`path` with the
/// extension `map`, as wfp-rs-build's linker arguments leave it) for function names, and
/// analyses it.
pub fn analyze_file(path: &std::path::Path, options: &Options) -> Result<Report, Error> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Image(format!("cannot read {}: {e}", path.display())))?;
    let mut image = pe::read(&bytes)?;
    if let Ok(text) = std::fs::read_to_string(path.with_extension("map")) {
        image.symbols = map::parse(&text);
    }
    Ok(analyze(&image, options))
}

/// Reads a PE32+ x64 image for [`analyze`] (to add [`Image::symbols`] first, for instance).
pub fn read_pe(bytes: &[u8]) -> Result<Image, Error> {
    pe::read(bytes)
}

/// How a function's frame size is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameSource {
    /// From the unwind info of its `.pdata` entry.
    Unwind(Frame),
    /// It has no `.pdata` entry: a leaf (return address only).
    Leaf,
}

/// One function of the image: a `.pdata` entry, or leaf code reached by a call or jump.
#[derive(Clone, Debug)]
pub struct Function {
    /// First byte (RVA).
    pub start: u32,
    /// One past the last byte decoded.
    pub end: u32,
    /// Stack it uses itself: the return address, the prolog's pushes and allocations, and the
    /// worst stack realignment (`and rsp, -N`) and the most stack pushed or allocated in its
    /// body past the prolog (compilers for x64 do not, but hand-written code may).
    pub frame: u64,
    /// Where the frame size comes from.
    pub source: FrameSource,
    /// What it calls.
    pub edges: Vec<Edge>,
}

/// A transfer of control out of a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// RVA of the instruction.
    pub site: u32,
    /// Where it goes.
    pub kind: EdgeKind,
}

/// Kinds of [`Edge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EdgeKind {
    /// `call rel32` (or a call into a chained fragment): the callee's frame adds to ours.
    Call(u32),
    /// A jump to outside the function (tail call, or a jump into a chained fragment, whose
    /// frame already includes ours): the target runs at our depth.
    Tail(u32),
    /// A call or jump through the import address table: a kernel routine.
    Import(String),
    /// A call or tail call through a register or memory outside the IAT. Flagged.
    Indirect {
        /// Whether it is a tail call (`rex.w jmp` through a register or memory).
        tail: bool,
    },
}

/// A site the analysis cannot bound.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flag {
    /// The function it is in.
    pub function: u32,
    /// The instruction.
    pub site: u32,
    /// What it is.
    pub kind: FlagKind,
}

/// Kinds of [`Flag`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlagKind {
    /// A call through a register or memory that is not an import: the target is unknown.
    IndirectCall,
    /// A tail call through a register or memory that is not an import.
    IndirectTailCall,
    /// A call (or tail call) that closes a cycle in the call graph: recursion.
    Recursion {
        /// The function called, which is already on the path.
        callee: u32,
    },
    /// `sub rsp, reg`: a stack allocation of run-time size.
    DynamicAllocation,
    /// Code without unwind data calls or moves `RSP`, which the x64 ABI does not allow.
    LeafMovesStack,
    /// The unwind info could not be read.
    BadUnwindInfo(String),
    /// A call or jump to an address outside the image's code.
    TargetOutsideCode(u32),
}

/// Why a function is an entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    /// The image entry point (`DriverEntry`).
    ImageEntry,
    /// An exported routine.
    Export,
    /// Its address is loaded by a RIP-relative `lea` in the code (a callback handed over).
    AddressInCode,
    /// Its address is stored in the image (found by a base relocation: a table, a vtable).
    AddressInData,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::ImageEntry => "image entry",
            EntryKind::Export => "export",
            EntryKind::AddressInCode => "address taken in code",
            EntryKind::AddressInData => "address stored in data",
        })
    }
}

/// The worst-case stack depth from one function down.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Bytes of stack on the deepest bounded path, this function's frame included.
    pub bytes: u64,
    /// The functions on that path, this one first (a tail call replaces its caller, so the
    /// caller then does not appear).
    pub path: Vec<u32>,
    /// Indices into [`Report::flags`] of the unbounded sites reachable from here.
    pub unbounded: BTreeSet<usize>,
    /// When an indirect call or indirect tail call is reachable from here: the most stack, in
    /// bytes from this function's return address on, that is in use by the frames above its
    /// unknown target when it is made. The target's own depth adds to it, and is in no bound.
    pub indirect_base: Option<u64>,
}

/// An entry point and its worst-case depth.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its RVA.
    pub rva: u32,
    /// Why it is one (all reasons found).
    pub kinds: BTreeSet<EntryKind>,
    /// Its worst case.
    pub depth: Depth,
}

/// The result of [`analyze`].
#[derive(Clone, Debug)]
pub struct Report {
    /// The budget it was checked against.
    pub budget: u64,
    /// Every function found, by start RVA.
    pub functions: BTreeMap<u32, Function>,
    /// Worst-case depth of every function.
    pub depths: BTreeMap<u32, Depth>,
    /// The entry points, by RVA.
    pub entries: Vec<Entry>,
    /// The sites the analysis cannot bound, and malformed data it met.
    pub flags: Vec<Flag>,
    /// Function names (from [`Image::symbols`] and exports).
    pub names: BTreeMap<u32, String>,
    /// Imported routines by IAT slot.
    pub imports: BTreeMap<u32, String>,
}

impl Report {
    /// Entry points whose deepest bounded path exceeds the budget.
    pub fn over_budget(&self) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|entry| entry.depth.bytes > self.budget)
            .collect()
    }

    /// Functions over the budget that no entry point found here reaches (code whose caller
    /// the analysis missed, e.g. a leaf thunk whose address is taken). Checked as well, so a
    /// missed entry point cannot hide a deep path.
    pub fn unreached_over_budget(&self) -> Vec<u32> {
        let reached: BTreeSet<u32> = self
            .entries
            .iter()
            .flat_map(|entry| entry.depth.path.iter().copied())
            .collect();
        self.depths
            .iter()
            .filter(|(rva, depth)| depth.bytes > self.budget && !reached.contains(rva))
            .map(|(rva, _)| *rva)
            .collect()
    }

    /// Flags that mean the analysis could not trust the image's data (malformed unwind info,
    /// a leaf that moves the stack, a jump outside the code): these fail the check.
    pub fn errors(&self) -> Vec<&Flag> {
        self.flags
            .iter()
            .filter(|flag| {
                matches!(
                    flag.kind,
                    FlagKind::BadUnwindInfo(_)
                        | FlagKind::LeafMovesStack
                        | FlagKind::TargetOutsideCode(_)
                        | FlagKind::DynamicAllocation
                )
            })
            .collect()
    }

    /// The check's verdict: no bounded path from any function exceeds the budget, and no
    /// [`errors`](Self::errors).
    ///
    /// Recursion and indirect calls do **not** fail it: they are reported (with every entry
    /// point whose paths pass through them), since Rust's `core::fmt` alone has both (a
    /// formatter calls `Display` implementations through function pointers). The bound an
    /// entry point shows is then the deepest *bounded* path; the part past such a site is not
    /// in it. An indirect call's target is always an address-taken function, and every one of
    /// those is an entry point checked against the budget on its own.
    pub fn passed(&self) -> bool {
        self.over_budget().is_empty()
            && self.unreached_over_budget().is_empty()
            && self.errors().is_empty()
    }

    /// The name of the function at `rva`, or its RVA.
    pub fn name(&self, rva: u32) -> String {
        match self.names.get(&rva) {
            Some(name) => format!("{rva:#x} {name}"),
            None => format!("{rva:#x}"),
        }
    }

    /// The deepest address-taken function (an [`EntryKind::AddressInCode`] or
    /// [`EntryKind::AddressInData`] entry point): every possible target of an indirect call is
    /// one of these.
    pub fn deepest_indirect_target(&self) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|entry| {
                entry.kinds.contains(&EntryKind::AddressInCode)
                    || entry.kinds.contains(&EntryKind::AddressInData)
            })
            .max_by_key(|entry| entry.depth.bytes)
    }

    /// The pessimistic depth of `entry` if each indirect call it reaches called the deepest
    /// address-taken function ([`deepest_indirect_target`](Self::deepest_indirect_target)).
    /// Information only: [`passed`](Self::passed) does not use it (the real targets are usually
    /// far shallower, and the search does not follow the targets' own indirect calls).
    pub fn pessimistic_depth(&self, entry: &Entry) -> u64 {
        let through_indirect = match (entry.depth.indirect_base, self.deepest_indirect_target()) {
            (Some(base), Some(target)) => base + target.depth.bytes,
            _ => 0,
        };
        entry.depth.bytes.max(through_indirect)
    }

    /// The deepest entry point, if any.
    pub fn deepest(&self) -> Option<&Entry> {
        self.entries.iter().max_by_key(|entry| entry.depth.bytes)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stack: {} functions, {} entry points, budget {} bytes for the driver's frames \
             (kernel stack {} bytes)",
            self.functions.len(),
            self.entries.len(),
            self.budget,
            KERNEL_STACK_SIZE
        )?;
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.depth.bytes));
        for entry in &entries {
            let kinds: Vec<String> = entry.kinds.iter().map(ToString::to_string).collect();
            let verdict = if entry.depth.bytes > self.budget {
                "OVER BUDGET"
            } else {
                "ok"
            };
            let unbounded = match (entry.depth.unbounded.len(), entry.depth.indirect_base) {
                (0, _) => String::new(),
                (count, None) => format!(", +unbounded through {count} flagged site(s)"),
                (count, Some(base)) => format!(
                    ", +unbounded through {count} flagged site(s); an indirect call made with \
                     {base} bytes in use"
                ),
            };
            writeln!(
                f,
                "  {:>6} bytes  {verdict:<11} {} [{}]{unbounded}",
                entry.depth.bytes,
                self.name(entry.rva),
                kinds.join(", ")
            )?;
            if entry.depth.bytes > self.budget {
                self.write_path(f, &entry.depth.path)?;
            }
        }
        if let Some(deepest) = entries.first() {
            writeln!(f, "deepest path ({} bytes):", deepest.depth.bytes)?;
            self.write_path(f, &deepest.depth.path)?;
        }
        if let Some(target) = self.deepest_indirect_target() {
            let worst = self
                .entries
                .iter()
                .max_by_key(|entry| self.pessimistic_depth(entry));
            if let Some(worst) = worst {
                writeln!(
                    f,
                    "through indirect calls (information, not checked): the deepest possible \
                     target is {} ({} bytes); with it, {} would reach {} bytes",
                    self.name(target.rva),
                    target.depth.bytes,
                    self.name(worst.rva),
                    self.pessimistic_depth(worst)
                )?;
            }
        }
        for rva in self.unreached_over_budget() {
            writeln!(
                f,
                "  OVER BUDGET: {} ({} bytes) is reached from no entry point found",
                self.name(rva),
                self.depths[&rva].bytes
            )?;
            self.write_path(f, &self.depths[&rva].path)?;
        }
        if !self.flags.is_empty() {
            writeln!(f, "flagged sites ({}):", self.flags.len())?;
            for flag in &self.flags {
                writeln!(f, "  {}", self.describe(flag))?;
            }
        }
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let deepest = self.deepest().map_or(0, |entry| entry.depth.bytes);
        writeln!(
            f,
            "stack check: {verdict} (deepest bounded path {deepest} of {} bytes; {} unbounded site(s) reported)",
            self.budget,
            self.flags.len() - self.errors().len()
        )
    }
}

impl Report {
    fn write_path(&self, f: &mut fmt::Formatter<'_>, path: &[u32]) -> fmt::Result {
        for rva in path {
            let frame = self.functions.get(rva).map_or(0, |function| function.frame);
            writeln!(f, "      {frame:>6}  {}", self.name(*rva))?;
        }
        Ok(())
    }

    /// One line describing `flag`.
    pub fn describe(&self, flag: &Flag) -> String {
        let place = format!("at {:#x} in {}", flag.site, self.name(flag.function));
        match &flag.kind {
            FlagKind::IndirectCall => format!("indirect call {place}: target unknown, unbounded"),
            FlagKind::IndirectTailCall => {
                format!("indirect tail call {place}: target unknown, unbounded")
            }
            FlagKind::Recursion { callee } => format!(
                "recursion {place}: calls {}, already on the path; unbounded",
                self.name(*callee)
            ),
            FlagKind::DynamicAllocation => {
                format!("ERROR: stack allocation of run-time size (sub rsp, reg) {place}")
            }
            FlagKind::LeafMovesStack => format!(
                "ERROR: code without unwind data calls or moves RSP {place} (the x64 ABI requires \
                 a .pdata entry for it)"
            ),
            FlagKind::BadUnwindInfo(message) => {
                format!("ERROR: unreadable unwind info {place}: {message}")
            }
            FlagKind::TargetOutsideCode(target) => {
                format!("ERROR: control transfer to {target:#x}, outside the code, {place}")
            }
        }
    }
}

/// Analyses `image` against `options`.
pub fn analyze(image: &Image, options: &Options) -> Report {
    let mut functions: BTreeMap<u32, Function> = BTreeMap::new();
    let mut flags: BTreeSet<Flag> = BTreeSet::new();
    let mut address_taken: BTreeSet<u32> = BTreeSet::new();

    // Functions with unwind data; their ranges, to map addresses to functions.
    let mut ranges: BTreeMap<u32, u32> = BTreeMap::new();
    let mut frames: BTreeMap<u32, FrameSource> = BTreeMap::new();
    for entry in &image.runtime_functions {
        if entry.end <= entry.begin {
            continue;
        }
        ranges.insert(entry.begin, entry.end);
        let source = match unwind::frame(image, entry) {
            Ok(frame) => FrameSource::Unwind(frame),
            Err(error) => {
                flags.insert(Flag {
                    function: entry.begin,
                    site: entry.begin,
                    kind: FlagKind::BadUnwindInfo(format!(
                        "{} (UNWIND_INFO at {:#x})",
                        error.message, error.unwind_info
                    )),
                });
                FrameSource::Unwind(Frame {
                    allocation: 0,
                    frame_register: false,
                    chain: Vec::new(),
                    prolog_size: 0,
                })
            }
        };
        frames.insert(entry.begin, source);
    }
    let containing = |rva: u32| -> Option<u32> {
        let (&begin, &end) = ranges.range(..=rva).next_back()?;
        (rva < end).then_some(begin)
    };

    let mut work: Vec<u32> = ranges.keys().copied().collect();
    // The entry point is code even without unwind data (then a leaf). An export is decoded
    // only when it has unwind data: exported data (`_fltused`) may sit in an executable
    // section (`/MERGE:.rdata=.text`) and must not be read as code.
    work.extend(image.entry_point);
    while let Some(start) = work.pop() {
        if functions.contains_key(&start) {
            continue;
        }
        let (end, source) = match (ranges.get(&start), frames.get(&start)) {
            (Some(&end), Some(source)) => (Some(end), source.clone()),
            _ => {
                if let Some(begin) = containing(start) {
                    // Inside a function with unwind data: not a function of its own.
                    work.push(begin);
                    continue;
                }
                if !image.is_code(start) {
                    continue;
                }
                (None, FrameSource::Leaf)
            }
        };
        let next_start = ranges.range(start + 1..).next().map(|(&begin, _)| begin);
        let decoded = decode(image, start, end, next_start, &source);
        let mut edges = Vec::new();
        for mut edge in decoded.edges {
            let target = match edge.kind {
                EdgeKind::Call(target) | EdgeKind::Tail(target) => target,
                EdgeKind::Indirect { tail } => {
                    flags.insert(Flag {
                        function: start,
                        site: edge.site,
                        kind: if tail {
                            FlagKind::IndirectTailCall
                        } else {
                            FlagKind::IndirectCall
                        },
                    });
                    edges.push(edge);
                    continue;
                }
                EdgeKind::Import(_) => {
                    edges.push(edge);
                    continue;
                }
            };
            if !image.is_code(target) {
                flags.insert(Flag {
                    function: start,
                    site: edge.site,
                    kind: FlagKind::TargetOutsideCode(target),
                });
                continue;
            }
            // A transfer into the middle of a function with unwind data goes to that function,
            // unless that function is the primary entry this fragment's unwind info chains to:
            // a jump back from split-off code into its own function's body is a jump within
            // one function, whose frame this fragment's already includes.
            let resolved = match containing(target) {
                Some(begin) => begin,
                None => target,
            };
            let chain = match &source {
                FrameSource::Unwind(frame) => frame.chain.as_slice(),
                FrameSource::Leaf => &[],
            };
            if resolved != target && chain.contains(&resolved) {
                continue;
            }
            match &mut edge.kind {
                EdgeKind::Call(t) | EdgeKind::Tail(t) => *t = resolved,
                _ => {}
            }
            work.push(resolved);
            edges.push(edge);
        }
        for flag in decoded.flags {
            flags.insert(Flag {
                function: start,
                site: flag.0,
                kind: flag.1,
            });
        }
        for target in decoded.lea_targets {
            if ranges.contains_key(&target) {
                address_taken.insert(target);
            }
        }
        let frame = match &source {
            FrameSource::Unwind(frame) => RETURN_ADDRESS + frame.allocation,
            FrameSource::Leaf => RETURN_ADDRESS,
        } + decoded.realignment
            + decoded.body_stack;
        functions.insert(
            start,
            Function {
                start,
                end: decoded.end,
                frame,
                source,
                edges,
            },
        );
    }

    // Entry points.
    let mut entries: BTreeMap<u32, BTreeSet<EntryKind>> = BTreeMap::new();
    if let Some(entry) = image.entry_point {
        entries
            .entry(entry)
            .or_default()
            .insert(EntryKind::ImageEntry);
    }
    for rva in image.exports.keys() {
        if functions.contains_key(rva) {
            entries.entry(*rva).or_default().insert(EntryKind::Export);
        }
    }
    for rva in address_taken {
        entries
            .entry(rva)
            .or_default()
            .insert(EntryKind::AddressInCode);
    }
    for target in image.data_pointers.values() {
        if functions.contains_key(target) {
            entries
                .entry(*target)
                .or_default()
                .insert(EntryKind::AddressInData);
        }
    }

    // Depths. Indirect-call flags are created as the edges are met; recursion flags as the
    // search closes a cycle.
    let mut flags: Vec<Flag> = flags.into_iter().collect();
    let mut search = Search {
        functions: &functions,
        depths: BTreeMap::new(),
        on_path: BTreeSet::new(),
        flags: &mut flags,
    };
    let starts: Vec<u32> = functions.keys().copied().collect();
    for start in starts {
        search.depth(start);
    }
    let depths = search.depths;

    let entries = entries
        .into_iter()
        .filter_map(|(rva, kinds)| {
            Some(Entry {
                rva,
                kinds,
                depth: depths.get(&rva)?.clone(),
            })
        })
        .collect();

    let mut names = image.symbols.clone();
    for (rva, name) in &image.exports {
        names.entry(*rva).or_insert_with(|| name.clone());
    }
    Report {
        budget: options.budget,
        functions,
        depths,
        entries,
        flags,
        names,
        imports: image.imports.clone(),
    }
}

struct Search<'a> {
    functions: &'a BTreeMap<u32, Function>,
    depths: BTreeMap<u32, Depth>,
    on_path: BTreeSet<u32>,
    flags: &'a mut Vec<Flag>,
}

impl Search<'_> {
    fn flag(&mut self, flag: Flag) -> usize {
        if let Some(index) = self.flags.iter().position(|f| *f == flag) {
            return index;
        }
        self.flags.push(flag);
        self.flags.len() - 1
    }

    fn depth(&mut self, start: u32) -> Depth {
        if let Some(depth) = self.depths.get(&start) {
            return depth.clone();
        }
        let Some(function) = self.functions.get(&start) else {
            return Depth::default();
        };
        self.on_path.insert(start);
        let mut unbounded: BTreeSet<usize> = self
            .flags
            .iter()
            .enumerate()
            .filter(|(_, flag)| flag.function == start)
            .map(|(index, _)| index)
            .collect();
        let mut indirect_base: Option<u64> = None;
        let mut raise = |base: u64| {
            indirect_base = Some(indirect_base.map_or(base, |old| old.max(base)));
        };
        // Below our frame (calls) and at our depth (tail calls).
        let mut deepest_call = (0u64, Vec::new());
        let mut deepest_tail = (0u64, Vec::new());
        for edge in &function.edges {
            match &edge.kind {
                EdgeKind::Call(target) | EdgeKind::Tail(target) => {
                    let tail = matches!(edge.kind, EdgeKind::Tail(_));
                    if self.on_path.contains(target) {
                        let index = self.flag(Flag {
                            function: start,
                            site: edge.site,
                            kind: FlagKind::Recursion { callee: *target },
                        });
                        unbounded.insert(index);
                        continue;
                    }
                    let callee = self.depth(*target);
                    unbounded.extend(callee.unbounded.iter().copied());
                    if let Some(base) = callee.indirect_base {
                        raise(if tail { base } else { function.frame + base });
                    }
                    let best = if tail {
                        &mut deepest_tail
                    } else {
                        &mut deepest_call
                    };
                    if callee.bytes > best.0 || best.1.is_empty() {
                        *best = (callee.bytes, callee.path);
                    }
                }
                EdgeKind::Indirect { tail } => {
                    // The target's depth counts its return address (ours, for a tail call).
                    raise(if *tail { 0 } else { function.frame });
                    if RETURN_ADDRESS > deepest_call.0 {
                        deepest_call = (RETURN_ADDRESS, Vec::new());
                    }
                }
                EdgeKind::Import(_) => {
                    // The return address the call pushes; the callee's own frames are the
                    // kernel's.
                    if RETURN_ADDRESS > deepest_call.0 {
                        deepest_call = (RETURN_ADDRESS, Vec::new());
                    }
                }
            }
        }
        self.on_path.remove(&start);
        let through_call = function.frame + deepest_call.0;
        let depth = if deepest_tail.0 > through_call {
            Depth {
                bytes: deepest_tail.0,
                path: deepest_tail.1,
                unbounded,
                indirect_base,
            }
        } else {
            let mut path = vec![start];
            path.extend(deepest_call.1);
            Depth {
                bytes: through_call,
                path,
                unbounded,
                indirect_base,
            }
        };
        self.depths.insert(start, depth.clone());
        depth
    }
}

struct Decoded {
    end: u32,
    edges: Vec<Edge>,
    lea_targets: Vec<u32>,
    flags: Vec<(u32, FlagKind)>,
    realignment: u64,
    body_stack: u64,
}

/// Decodes the function at `start`: to `end` when its unwind entry gives it, else (a leaf) up
/// to the first return or unconditional jump past every forward branch seen, never past
/// `next_start` or the section's end.
fn decode(
    image: &Image,
    start: u32,
    end: Option<u32>,
    next_start: Option<u32>,
    source: &FrameSource,
) -> Decoded {
    let leaf = matches!(source, FrameSource::Leaf);
    // The prolog's own `sub rsp, rax` after `__chkstk` is the allocation its unwind codes
    // already count.
    let prolog_end = match source {
        FrameSource::Unwind(frame) => start + u32::from(frame.prolog_size),
        FrameSource::Leaf => start,
    };
    let section = image
        .section_of(start)
        .expect("functions are decoded only in the image's sections");
    let section_end = section.rva + section.data.len() as u32;
    let limit = match end {
        Some(end) => end.min(section_end),
        None => next_start
            .unwrap_or(section_end)
            .min(section_end)
            .min(start.saturating_add(MAX_LEAF_LEN)),
    };
    let bytes = &section.data[(start - section.rva) as usize..(limit - section.rva) as usize];
    let mut decoder = Decoder::with_ip(64, bytes, u64::from(start), DecoderOptions::NONE);
    let mut out = Decoded {
        end: limit,
        edges: Vec::new(),
        lea_targets: Vec::new(),
        flags: Vec::new(),
        realignment: 0,
        body_stack: 0,
    };
    // Stack moved past the prolog on the straight-line path being decoded: pushes and `sub
    // rsp, imm` add, pops and `add rsp, imm` (an epilog) take away; a return or a jump out
    // ends the path. Its maximum adds to the frame the unwind codes give.
    let mut body_now = 0u64;
    let mut body_move = |out: &mut Decoded, delta: i64| {
        body_now = body_now.saturating_add_signed(delta);
        out.body_stack = out.body_stack.max(body_now);
    };
    let inside = |target: u32| target >= start && target < limit;
    let mut furthest_branch = start;
    let mut instruction = Instruction::default();
    // The import whose address an earlier instruction loaded into a register (`mov rax,
    // [rip + __imp_X]`): unoptimised code calls imports as `mov`, argument set-up, `call rax`.
    // It holds along straight-line code only, while no instruction writes the register; any
    // branch (or branch target: a branch ends the run before one) forgets it.
    let mut loaded_import: Option<(Register, String)> = None;
    let mut info = InstructionInfoFactory::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let site = instruction.ip() as u32;
        let next = instruction.next_ip() as u32;
        let previous_load = loaded_import.take();
        if let Some((register, name)) = &previous_load
            && instruction.flow_control() == FlowControl::Next
            && !writes(&mut info, &instruction, *register)
        {
            loaded_import = Some((*register, name.clone()));
        }
        if instruction.mnemonic() == Mnemonic::Mov
            && instruction.op0_kind() == OpKind::Register
            && instruction.op0_register().is_gpr64()
            && instruction.is_ip_rel_memory_operand()
            && let Some(name) = image
                .imports
                .get(&(instruction.ip_rel_memory_address() as u32))
        {
            loaded_import = Some((instruction.op0_register(), name.clone()));
        }
        if instruction.is_invalid() {
            if leaf {
                out.end = site;
                break;
            }
            continue;
        }
        let raw = &bytes[(site - start) as usize..(next - start) as usize];
        if instruction.mnemonic() == Mnemonic::Lea && instruction.is_ip_rel_memory_operand() {
            out.lea_targets
                .push(instruction.ip_rel_memory_address() as u32);
        }
        if instruction.op0_kind() == OpKind::Register && instruction.op0_register() == Register::RSP
        {
            match instruction.mnemonic() {
                Mnemonic::Sub
                    if instruction.op1_kind() == OpKind::Register && site >= prolog_end =>
                {
                    out.flags.push((site, FlagKind::DynamicAllocation));
                }
                Mnemonic::And if is_immediate(instruction.op1_kind()) => {
                    // Realignment drops RSP by up to `alignment - 8` (RSP is 8-aligned).
                    let mask = instruction.immediate(1) as i64;
                    if mask < 0 {
                        let slack = mask.unsigned_abs().saturating_sub(RETURN_ADDRESS);
                        out.realignment = out.realignment.max(slack);
                    }
                }
                Mnemonic::Sub | Mnemonic::Add | Mnemonic::Mov | Mnemonic::Lea if leaf => {
                    out.flags.push((site, FlagKind::LeafMovesStack));
                }
                Mnemonic::Sub if is_immediate(instruction.op1_kind()) && site >= prolog_end => {
                    body_move(&mut out, instruction.immediate(1) as i64);
                }
                Mnemonic::Add if is_immediate(instruction.op1_kind()) && site >= prolog_end => {
                    body_move(&mut out, -(instruction.immediate(1) as i64));
                }
                _ => {}
            }
        }
        if !leaf && site >= prolog_end {
            match instruction.mnemonic() {
                Mnemonic::Push | Mnemonic::Pushfq => body_move(&mut out, 8),
                Mnemonic::Pop | Mnemonic::Popfq => body_move(&mut out, -8),
                _ => {}
            }
            if matches!(
                instruction.flow_control(),
                FlowControl::Return
                    | FlowControl::UnconditionalBranch
                    | FlowControl::IndirectBranch
            ) {
                body_move(&mut out, i64::MIN);
            }
        }
        match instruction.flow_control() {
            FlowControl::Call => {
                if leaf {
                    out.flags.push((site, FlagKind::LeafMovesStack));
                }
                out.edges.push(Edge {
                    site,
                    kind: EdgeKind::Call(instruction.near_branch_target() as u32),
                });
            }
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                if !is_near_branch(instruction.code()) {
                    continue;
                }
                let target = instruction.near_branch_target() as u32;
                if inside(target) {
                    furthest_branch = furthest_branch.max(target);
                } else {
                    out.edges.push(Edge {
                        site,
                        kind: EdgeKind::Tail(target),
                    });
                }
                if leaf
                    && instruction.flow_control() == FlowControl::UnconditionalBranch
                    && next > furthest_branch
                {
                    out.end = next;
                    break;
                }
            }
            FlowControl::IndirectCall => {
                if leaf {
                    out.flags.push((site, FlagKind::LeafMovesStack));
                }
                out.edges.push(match previous_load {
                    Some((register, name))
                        if instruction.op0_kind() == OpKind::Register
                            && instruction.op0_register() == register =>
                    {
                        Edge {
                            site,
                            kind: EdgeKind::Import(name),
                        }
                    }
                    _ => indirect(image, &instruction, site, false),
                });
            }
            FlowControl::IndirectBranch => {
                // Compilers mark an indirect *tail call* with a REX.W prefix (the x64 epilog
                // rules recognise `rex.w jmp` as leaving the function); a plain `jmp reg` in a
                // function is a jump table within it. Through the IAT it is an import either way.
                let import = instruction.is_ip_rel_memory_operand()
                    && image
                        .imports
                        .contains_key(&(instruction.ip_rel_memory_address() as u32));
                if import || has_rex_w(raw) || leaf {
                    out.edges.push(indirect(image, &instruction, site, true));
                }
                if leaf && next > furthest_branch {
                    out.end = next;
                    break;
                }
            }
            FlowControl::Return | FlowControl::Interrupt | FlowControl::Exception
                if leaf && next > furthest_branch =>
            {
                out.end = next;
                break;
            }
            _ => {
                if leaf
                    && matches!(
                        instruction.mnemonic(),
                        Mnemonic::Push | Mnemonic::Pop | Mnemonic::Enter | Mnemonic::Leave
                    )
                {
                    out.flags.push((site, FlagKind::LeafMovesStack));
                }
            }
        }
    }
    if let Some(frame_end) = end {
        out.end = frame_end;
    }
    out
}

/// Whether `instruction` writes `register` or any part of it (explicitly or implicitly).
fn writes(
    info: &mut InstructionInfoFactory,
    instruction: &Instruction,
    register: Register,
) -> bool {
    info.info(instruction).used_registers().iter().any(|used| {
        used.register().full_register() == register.full_register()
            && !matches!(
                used.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::None
            )
    })
}

fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8 | OpKind::Immediate32
    )
}

fn is_near_branch(code: Code) -> bool {
    !matches!(
        code,
        Code::Jmp_ptr1616 | Code::Jmp_ptr1632 | Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664
    )
}

/// An indirect call or tail call: an import when it reads an IAT slot, else flagged.
fn indirect(image: &Image, instruction: &Instruction, site: u32, tail: bool) -> Edge {
    if instruction.is_ip_rel_memory_operand() {
        let slot = instruction.ip_rel_memory_address() as u32;
        if let Some(name) = image.imports.get(&slot) {
            return Edge {
                site,
                kind: EdgeKind::Import(name.clone()),
            };
        }
    }
    Edge {
        site,
        kind: EdgeKind::Indirect { tail },
    }
}

/// Whether the instruction bytes carry a REX prefix with W set (after any legacy prefixes).
fn has_rex_w(raw: &[u8]) -> bool {
    raw.iter()
        .find(|byte| {
            !matches!(
                byte,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x64 | 0x65 | 0x36 | 0xf0
            )
        })
        .is_some_and(|byte| (0x48..=0x4f).contains(byte))
}

/// The README's code, compiled as doctests so the crates.io page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
