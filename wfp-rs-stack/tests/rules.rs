//! Each rule of the analysis on a hand-built image: a few bytes of x64 code per function and
//! the unwind info a compiler would write for it.

use std::collections::BTreeMap;

use wfp_rs_stack::{
    EdgeKind, EntryKind, FlagKind, Image, Options, Report, RuntimeFunction, Section, analyze,
};

const TEXT: u32 = 0x1000;
const XDATA: u32 = 0x8000;
const DATA: u32 = 0x9000;

/// Unwind operation codes (`UWOP_*`).
const PUSH_NONVOL: u8 = 0;
const ALLOC_LARGE: u8 = 1;
const ALLOC_SMALL: u8 = 2;
const PUSH_MACHFRAME: u8 = 10;
/// `UNW_FLAG_CHAININFO`.
const CHAININFO: u8 = 0x4;

/// A code slot: the prolog offset, the operation and its info.
fn code(offset: u8, op: u8, info: u8) -> u16 {
    u16::from_le_bytes([offset, op | (info << 4)])
}

#[derive(Default)]
struct Builder {
    code: Vec<u8>,
    xdata: Vec<u8>,
    functions: Vec<RuntimeFunction>,
    imports: BTreeMap<u32, String>,
    data: Vec<u8>,
    data_pointers: BTreeMap<u32, u32>,
}

impl Builder {
    /// The RVA the next function will start at (functions are 16-byte aligned).
    fn next(&self) -> u32 {
        TEXT + (self.code.len().next_multiple_of(16)) as u32
    }

    /// Adds leaf code (no `.pdata` entry) and returns its RVA.
    fn leaf(&mut self, body: impl FnOnce(u32) -> Vec<u8>) -> u32 {
        let start = self.next();
        self.code.resize((start - TEXT) as usize, 0xcc);
        let bytes = body(start);
        self.code.extend(bytes);
        start
    }

    /// Adds a function with unwind info (`slots` in the order a compiler writes them, last
    /// prolog operation first), an optional chained entry and a prolog size, and returns its
    /// RVA.
    fn function_with(
        &mut self,
        prolog: u8,
        slots: &[u16],
        chained: Option<RuntimeFunction>,
        body: impl FnOnce(u32) -> Vec<u8>,
    ) -> u32 {
        let start = self.leaf(body);
        let end = TEXT + self.code.len() as u32;
        let info = XDATA + self.xdata.len() as u32;
        let flags = if chained.is_some() { CHAININFO } else { 0 };
        self.xdata
            .extend([1 | (flags << 3), prolog, slots.len() as u8, 0]);
        for slot in slots {
            self.xdata.extend(slot.to_le_bytes());
        }
        if slots.len() % 2 == 1 {
            self.xdata.extend([0, 0]);
        }
        if let Some(chained) = chained {
            for word in [chained.begin, chained.end, chained.unwind_info] {
                self.xdata.extend(word.to_le_bytes());
            }
        }
        self.functions.push(RuntimeFunction {
            begin: start,
            end,
            unwind_info: info,
        });
        start
    }

    fn function(&mut self, slots: &[u16], body: impl FnOnce(u32) -> Vec<u8>) -> u32 {
        self.function_with(0, slots, None, body)
    }

    fn runtime_function(&self, start: u32) -> RuntimeFunction {
        *self
            .functions
            .iter()
            .find(|f| f.begin == start)
            .expect("a function added before")
    }

    fn import(&mut self, name: &str) -> u32 {
        let slot = DATA + self.data.len() as u32;
        self.data.extend([0; 8]);
        self.imports.insert(slot, name.to_owned());
        slot
    }

    fn pointer_to(&mut self, target: u32) {
        let at = DATA + self.data.len() as u32;
        self.data.extend(u64::from(target).to_le_bytes());
        self.data_pointers.insert(at, target);
    }

    fn image(self, entry: u32) -> Image {
        Image {
            sections: vec![
                Section {
                    name: ".text".into(),
                    rva: TEXT,
                    data: self.code,
                    executable: true,
                },
                Section {
                    name: ".xdata".into(),
                    rva: XDATA,
                    data: self.xdata,
                    executable: false,
                },
                Section {
                    name: ".data".into(),
                    rva: DATA,
                    data: self.data,
                    executable: false,
                },
            ],
            runtime_functions: self.functions,
            imports: self.imports,
            entry_point: Some(entry),
            data_pointers: self.data_pointers,
            ..Image::default()
        }
    }
}

/// `call rel32` at `site` to `target`.
fn call(site: u32, target: u32) -> Vec<u8> {
    rel32(0xe8, site, target)
}

/// `jmp rel32` at `site` to `target`.
fn jmp(site: u32, target: u32) -> Vec<u8> {
    rel32(0xe9, site, target)
}

fn rel32(opcode: u8, site: u32, target: u32) -> Vec<u8> {
    let rel = target.wrapping_sub(site + 5) as i32;
    let mut bytes = vec![opcode];
    bytes.extend(rel.to_le_bytes());
    bytes
}

/// `call qword ptr [rip + slot]` at `site`.
fn call_slot(site: u32, slot: u32) -> Vec<u8> {
    let rel = slot.wrapping_sub(site + 6) as i32;
    let mut bytes = vec![0xff, 0x15];
    bytes.extend(rel.to_le_bytes());
    bytes
}

/// `lea rcx, [rip + target]` at `site`.
fn lea(site: u32, target: u32) -> Vec<u8> {
    let rel = target.wrapping_sub(site + 7) as i32;
    let mut bytes = vec![0x48, 0x8d, 0x0d];
    bytes.extend(rel.to_le_bytes());
    bytes
}

const RET: u8 = 0xc3;

fn report(image: &Image) -> Report {
    analyze(image, &Options::default())
}

fn depth(report: &Report, rva: u32) -> u64 {
    report.depths[&rva].bytes
}

#[test]
fn frame_is_pushes_and_small_allocation_and_return_address() {
    let mut b = Builder::default();
    // push rbx; sub rsp, 0x20 → ALLOC_SMALL info 3 (3 × 8 + 8 = 32), PUSH_NONVOL.
    let f = b.function(&[code(5, ALLOC_SMALL, 3), code(1, PUSH_NONVOL, 3)], |_| {
        vec![RET]
    });
    let report = report(&b.image(f));
    assert_eq!(report.functions[&f].frame, 8 + 32 + 8);
    assert_eq!(depth(&report, f), 48);
    assert!(report.passed(), "{report}");
}

#[test]
fn alloc_large_has_a_16_bit_and_a_32_bit_form() {
    let mut b = Builder::default();
    // info 0: the next slot × 8.
    let small = b.function(&[code(7, ALLOC_LARGE, 0), 0x0200], |_| vec![RET]);
    // info 1: the next two slots as a 32-bit size.
    let large = b.function(&[code(7, ALLOC_LARGE, 1), 0x2345, 0x0001], |_| vec![RET]);
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, small);
        body.extend(call(site + 5, large));
        body.push(RET);
        body
    });
    let report = analyze(&b.image(entry), &Options { budget: 1 << 20 });
    assert_eq!(report.functions[&small].frame, 8 + 0x200 * 8);
    assert_eq!(report.functions[&large].frame, 8 + 0x1_2345);
    assert_eq!(depth(&report, entry), 8 + 40 + 8 + 0x1_2345);
    assert_eq!(report.deepest().unwrap().depth.path, vec![entry, large]);
}

#[test]
fn machine_frame_counts_40_or_48_bytes() {
    let mut b = Builder::default();
    let plain = b.function(&[code(0, PUSH_MACHFRAME, 0)], |_| vec![RET]);
    let with_code = b.function(&[code(0, PUSH_MACHFRAME, 1)], |_| vec![RET]);
    let report = report(&b.image(plain));
    assert_eq!(report.functions[&plain].frame, 8 + 40);
    assert_eq!(report.functions[&with_code].frame, 8 + 48);
}

#[test]
fn chained_unwind_info_adds_the_primary_entry() {
    let mut b = Builder::default();
    // The primary: `jne` to its split-off fragment (placed right after it), then `nop; ret`.
    let fragment_at = b.next() + 16;
    let primary = b.function(&[code(4, ALLOC_SMALL, 15)], |site| {
        // jne rel32 (0f 85) to the fragment.
        let rel = fragment_at.wrapping_sub(site + 6) as i32;
        let mut body = vec![0x0f, 0x85];
        body.extend(rel.to_le_bytes());
        body.extend([0x90, RET]);
        body
    });
    let chained = b.runtime_function(primary);
    let back_into_primary = primary + 6;
    // The fragment (cold code split from `primary`) has one more push of its own and jumps back
    // into the primary's body when done.
    let fragment = b.function_with(1, &[code(1, PUSH_NONVOL, 6)], Some(chained), |site| {
        jmp(site, back_into_primary)
    });
    assert_eq!(fragment, fragment_at);
    let report = report(&b.image(primary));
    assert_eq!(report.functions[&fragment].frame, 8 + 8 + 128);
    let wfp_rs_stack::FrameSource::Unwind(frame) = &report.functions[&fragment].source else {
        panic!("expected unwind data for the fragment");
    };
    assert_eq!(frame.chain, vec![primary]);
    // The jump into the fragment is an edge; the jump back is within one function, not a cycle.
    assert_eq!(
        report.functions[&primary].edges[0].kind,
        EdgeKind::Tail(fragment)
    );
    assert!(report.functions[&fragment].edges.is_empty());
    assert!(report.flags.is_empty(), "{report}");
    // The primary's worst case is the fragment's frame, which includes its own.
    assert_eq!(depth(&report, primary), 8 + 8 + 128);
}

#[test]
fn a_tail_call_runs_at_the_callers_depth_and_a_call_below_its_frame() {
    let mut b = Builder::default();
    let callee = b.function(&[code(7, ALLOC_LARGE, 0), 0x0100], |_| vec![RET]); // 0x808
    let tail = b.function(&[code(4, ALLOC_SMALL, 15)], |site| jmp(site, callee));
    let caller = b.function(&[code(4, ALLOC_SMALL, 15)], |site| {
        let mut body = call(site, callee);
        body.push(RET);
        body
    });
    let report = report(&b.image(caller));
    let callee_depth = 8 + 0x800;
    assert_eq!(depth(&report, callee), callee_depth);
    assert_eq!(
        report.functions[&tail].edges[0].kind,
        EdgeKind::Tail(callee)
    );
    // The tail caller's frame is gone when the callee runs.
    assert_eq!(depth(&report, tail), callee_depth);
    assert_eq!(report.depths[&tail].path, vec![callee]);
    // A real call adds the caller's frame.
    assert_eq!(depth(&report, caller), 8 + 128 + callee_depth);
}

#[test]
fn a_call_through_the_iat_is_a_kernel_import_counted_as_its_return_address() {
    let mut b = Builder::default();
    let slot = b.import("ntoskrnl.exe!KeBugCheckEx");
    let f = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call_slot(site, slot);
        body.push(RET);
        body
    });
    let report = report(&b.image(f));
    assert_eq!(
        report.functions[&f].edges[0].kind,
        EdgeKind::Import("ntoskrnl.exe!KeBugCheckEx".into())
    );
    assert!(report.flags.is_empty(), "{report}");
    assert_eq!(depth(&report, f), 8 + 40 + 8);
}

/// `mov rax, qword ptr [rip + slot]` at `site`.
fn mov_rax_slot(site: u32, slot: u32) -> Vec<u8> {
    let rel = slot.wrapping_sub(site + 7) as i32;
    let mut bytes = vec![0x48, 0x8b, 0x05];
    bytes.extend(rel.to_le_bytes());
    bytes
}

#[test]
fn an_import_loaded_into_a_register_and_called_at_once_is_a_kernel_import() {
    let mut b = Builder::default();
    let slot = b.import("ntoskrnl.exe!DbgPrintEx");
    // Unoptimised code: mov rax, [rip + __imp_DbgPrintEx]; call rax; ret
    let f = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = mov_rax_slot(site, slot);
        body.extend([0xff, 0xd0, RET]);
        body
    });
    // Argument set-up between the load and the call (`mov ecx, 77`) leaves rax alone.
    let h = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = mov_rax_slot(site, slot);
        body.extend([0xb9, 77, 0, 0, 0, 0xff, 0xd0, RET]);
        body
    });
    // An instruction between them that writes rax (`mov eax, ecx`): the call is an unknown
    // indirect call.
    let g = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = mov_rax_slot(site, slot);
        body.extend([0x89, 0xc8, 0xff, 0xd0, RET]);
        body
    });
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, f);
        body.extend(call(site + 5, g));
        body.extend(call(site + 10, h));
        body.push(RET);
        body
    });
    let report = report(&b.image(entry));
    for import in [f, h] {
        assert_eq!(
            report.functions[&import].edges[0].kind,
            EdgeKind::Import("ntoskrnl.exe!DbgPrintEx".into())
        );
    }
    assert_eq!(
        report.functions[&g].edges[0].kind,
        EdgeKind::Indirect { tail: false }
    );
    let flagged: Vec<u32> = report.flags.iter().map(|flag| flag.function).collect();
    assert_eq!(flagged, vec![g], "{report}");
}

#[test]
fn an_indirect_call_is_flagged_and_reported_on_every_entry_that_reaches_it() {
    let mut b = Builder::default();
    // call rax; ret
    let indirect = b.function(&[code(4, ALLOC_SMALL, 4)], |_| vec![0xff, 0xd0, RET]);
    // rex.w jmp rax: an indirect tail call.
    let tail = b.function(&[code(4, ALLOC_SMALL, 4)], |_| vec![0x48, 0xff, 0xe0]);
    // jmp rax without REX.W: a jump table inside the function, not flagged.
    let switch = b.function(&[code(4, ALLOC_SMALL, 4)], |_| vec![0xff, 0xe0, RET]);
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, indirect);
        body.extend(call(site + 5, switch));
        body.push(RET);
        body
    });
    let report = report(&b.image(entry));
    let kinds: Vec<(u32, &FlagKind)> = report.flags.iter().map(|f| (f.function, &f.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (indirect, &FlagKind::IndirectCall),
            (tail, &FlagKind::IndirectTailCall)
        ],
        "{report}"
    );
    let entry_report = report.entries.iter().find(|e| e.rva == entry).unwrap();
    assert_eq!(entry_report.depth.unbounded.len(), 1);
    // The indirect call is made with the entry's and `indirect`'s frames in use.
    assert_eq!(entry_report.depth.indirect_base, Some(48 + 48));
    assert_eq!(report.depths[&tail].indirect_base, Some(0));
    assert_eq!(report.depths[&switch].indirect_base, None);
    assert!(report.to_string().contains("indirect call at"), "{report}");
    // Unbounded sites are reported, not failed.
    assert!(report.passed());
}

#[test]
fn recursion_is_flagged_with_the_call_that_closes_the_cycle() {
    let mut b = Builder::default();
    let first = b.next();
    // first → second → first, and third → itself.
    let second_at = first + 16;
    let first = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, second_at);
        body.push(RET);
        body
    });
    let second = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, first);
        body.push(RET);
        body
    });
    assert_eq!(second, second_at);
    let third = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, site);
        body.push(RET);
        body
    });
    let report = report(&b.image(first));
    let recursion: Vec<(u32, u32)> = report
        .flags
        .iter()
        .filter_map(|f| match f.kind {
            FlagKind::Recursion { callee } => Some((f.function, callee)),
            _ => None,
        })
        .collect();
    assert!(recursion.contains(&(second, first)), "{report}");
    assert!(recursion.contains(&(third, third)), "{report}");
    assert!(!report.depths[&first].unbounded.is_empty());
    assert!(report.to_string().contains("recursion at"), "{report}");
}

#[test]
fn a_path_over_the_budget_fails_the_check_and_is_printed() {
    let mut b = Builder::default();
    // 8 KiB below a 6 KiB frame: 14 KiB > 12 KiB.
    let deep = b.function(&[code(7, ALLOC_LARGE, 0), 0x0400], |_| vec![RET]);
    let entry = b.function(&[code(7, ALLOC_LARGE, 0), 0x0300], |site| {
        let mut body = call(site, deep);
        body.push(RET);
        body
    });
    let report = report(&b.image(entry));
    assert_eq!(depth(&report, entry), 8 + 0x1800 + 8 + 0x2000);
    assert!(!report.passed(), "{report}");
    let over: Vec<u32> = report.over_budget().iter().map(|e| e.rva).collect();
    assert_eq!(over, vec![entry]);
    let text = report.to_string();
    assert!(text.contains("OVER BUDGET"), "{text}");
    assert!(text.contains("stack check: FAIL"), "{text}");
    // Under a budget that fits, it passes.
    assert!(analyze(&b_image_again(), &Options { budget: 0x4000 }).passed());

    fn b_image_again() -> Image {
        let mut b = Builder::default();
        let deep = b.function(&[code(7, ALLOC_LARGE, 0), 0x0400], |_| vec![RET]);
        let entry = b.function(&[code(7, ALLOC_LARGE, 0), 0x0300], |site| {
            let mut body = call(site, deep);
            body.push(RET);
            body
        });
        b.image(entry)
    }
}

#[test]
fn a_deep_function_no_entry_point_reaches_still_fails_the_check() {
    let mut b = Builder::default();
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |_| vec![RET]);
    let orphan = b.function(&[code(7, ALLOC_LARGE, 0), 0x0800], |_| vec![RET]);
    let report = report(&b.image(entry));
    assert_eq!(report.unreached_over_budget(), vec![orphan]);
    assert!(!report.passed());
}

#[test]
fn entry_points_are_the_image_entry_and_every_function_whose_address_is_taken() {
    let mut b = Builder::default();
    let in_code = b.function(&[code(4, ALLOC_SMALL, 1)], |_| vec![RET]);
    let in_data = b.function(&[code(4, ALLOC_SMALL, 2)], |_| vec![RET]);
    let never = b.function(&[code(4, ALLOC_SMALL, 3)], |_| vec![RET]);
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = lea(site, in_code);
        body.push(RET);
        body
    });
    b.pointer_to(in_data);
    let report = report(&b.image(entry));
    let entries: BTreeMap<u32, Vec<EntryKind>> = report
        .entries
        .iter()
        .map(|e| (e.rva, e.kinds.iter().copied().collect()))
        .collect();
    assert_eq!(entries[&entry], vec![EntryKind::ImageEntry]);
    assert_eq!(entries[&in_code], vec![EntryKind::AddressInCode]);
    assert_eq!(entries[&in_data], vec![EntryKind::AddressInData]);
    assert!(!entries.contains_key(&never));
}

#[test]
fn code_without_unwind_data_is_a_leaf_unless_it_moves_the_stack() {
    let mut b = Builder::default();
    let leaf = b.leaf(|_| vec![0x31, 0xc0, RET]); // xor eax, eax; ret
    let bad_leaf = b.leaf(|_| vec![0x53, 0x5b, RET]); // push rbx; pop rbx; ret
    let entry = b.function(&[code(4, ALLOC_SMALL, 4)], |site| {
        let mut body = call(site, leaf);
        body.extend(call(site + 5, bad_leaf));
        body.push(RET);
        body
    });
    let report = report(&b.image(entry));
    assert_eq!(report.functions[&leaf].frame, 8);
    assert_eq!(
        report.functions[&leaf].source,
        wfp_rs_stack::FrameSource::Leaf
    );
    assert_eq!(depth(&report, entry), 8 + 40 + 8);
    let errors: Vec<u32> = report.errors().iter().map(|f| f.function).collect();
    assert_eq!(errors, vec![bad_leaf, bad_leaf], "{report}");
    assert!(!report.passed());
}

#[test]
fn a_run_time_sized_allocation_outside_the_prolog_fails_the_check() {
    let mut b = Builder::default();
    // mov eax, 0x2000; call __chkstk; sub rsp, rax — the prolog (its size: 13 bytes) — then a
    // second `sub rsp, rax` in the body.
    let probe = b.leaf(|_| vec![RET]);
    let f = b.function_with(13, &[code(13, ALLOC_LARGE, 0), 0x0400], None, |site| {
        let mut body = vec![0xb8, 0x00, 0x20, 0x00, 0x00];
        body.extend(call(site + 5, probe));
        body.extend([0x48, 0x29, 0xc4]); // sub rsp, rax (in the prolog)
        body.extend([0x48, 0x29, 0xc4]); // sub rsp, rax (in the body)
        body.push(RET);
        body
    });
    let report = report(&b.image(f));
    let sites: Vec<(u32, &FlagKind)> = report.flags.iter().map(|f| (f.site, &f.kind)).collect();
    assert_eq!(
        sites,
        vec![(f + 13, &FlagKind::DynamicAllocation)],
        "{report}"
    );
    assert!(!report.passed());
}

#[test]
fn unknown_unwind_operations_are_errors() {
    let mut b = Builder::default();
    let f = b.function(&[code(1, 15, 0)], |_| vec![RET]);
    let report = report(&b.image(f));
    assert!(
        matches!(report.flags[0].kind, FlagKind::BadUnwindInfo(_)),
        "{report}"
    );
    assert!(!report.passed());
}

#[test]
fn stack_pushed_in_the_body_past_the_prolog_adds_to_the_frame() {
    let mut b = Builder::default();
    // Prolog (4 bytes: sub rsp, 0x28), then push rax; push rcx; pop rcx; pop rax;
    // sub rsp, 0x100; add rsp, 0x100; ret — at most 16 + 0x100 more than the unwind codes say.
    let f = b.function_with(4, &[code(4, ALLOC_SMALL, 4)], None, |_| {
        let mut body = vec![0x48, 0x83, 0xec, 0x28];
        body.extend([0x50, 0x51, 0x59, 0x58]);
        body.extend([0x48, 0x81, 0xec, 0x00, 0x01, 0x00, 0x00]);
        body.extend([0x48, 0x81, 0xc4, 0x00, 0x01, 0x00, 0x00]);
        body.push(RET);
        body
    });
    let report = report(&b.image(f));
    assert_eq!(report.functions[&f].frame, 8 + 40 + 0x100);
}

#[test]
fn save_operations_take_their_slots_and_move_no_stack() {
    const SET_FPREG: u8 = 3;
    const SAVE_NONVOL: u8 = 4;
    const SAVE_NONVOL_FAR: u8 = 5;
    const SAVE_XMM128: u8 = 8;
    const SAVE_XMM128_FAR: u8 = 9;
    let mut b = Builder::default();
    // Each save carries its offset in the slots after it; read as operations, those slots
    // (0x0201 and 0x0202 decode as ALLOC_SMALL of 8 bytes) would add stack that is not there.
    let f = b.function(
        &[
            code(20, SAVE_XMM128_FAR, 6),
            0x0201,
            0x0000,
            code(16, SAVE_XMM128, 7),
            0x0202,
            code(12, SAVE_NONVOL_FAR, 3),
            0x0201,
            0x0000,
            code(8, SAVE_NONVOL, 5),
            0x0202,
            code(6, SET_FPREG, 0),
            code(4, ALLOC_SMALL, 7), // 64
            code(1, PUSH_NONVOL, 5),
        ],
        |_| vec![RET],
    );
    let report = report(&b.image(f));
    assert!(report.flags.is_empty(), "{report}");
    assert_eq!(report.functions[&f].frame, 8 + 64 + 8);
}
