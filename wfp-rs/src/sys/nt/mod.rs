//! The real Windows kernel: what only a kernel image needs, next to the imports the function
//! list declares (`super::functions`): the IRQL routines wdm.h inlines on x64, and what `core`,
//! `alloc` and the MSVC target expect from a C runtime a driver does not have.
//!
//! Prototypes follow WDK 10.0.22621 `km/wdm.h`.

use super::types::*;

// What `core` and `alloc` need from the C runtime on x86_64-pc-windows-msvc; ntoskrnl.exe
// exports all four.
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8;
    pub fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8;
    pub fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8;
    pub fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32;
}

/// `KeGetCurrentIrql`: on x64 the IRQL is the task-priority register, CR8 (wdm.h inlines this).
#[inline]
pub fn KeGetCurrentIrql() -> KIRQL {
    let irql: u64;
    // SAFETY: reading CR8 is allowed in kernel mode at any IRQL and has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr8", out(reg) irql, options(nomem, nostack, preserves_flags))
    };
    irql as KIRQL
}

/// `KfRaiseIrql` as wdm.h inlines it on x64 for levels up to `DISPATCH_LEVEL`.
///
/// # Safety
///
/// `NewIrql` must be at least the current IRQL and at most `DISPATCH_LEVEL`.
#[inline]
pub unsafe fn KfRaiseIrql(NewIrql: KIRQL) -> KIRQL {
    let old = KeGetCurrentIrql();
    // SAFETY: the caller guarantees a valid, non-lowering level; CR8 writes are how x64 changes
    // IRQL.
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) NewIrql as u64, options(nomem, nostack, preserves_flags))
    };
    old
}

/// `KeLowerIrql` as wdm.h inlines it on x64.
///
/// # Safety
///
/// `NewIrql` must be at most the current IRQL and be the level saved when it was raised.
#[inline]
pub unsafe fn KeLowerIrql(NewIrql: KIRQL) {
    // SAFETY: the caller guarantees the level is the one saved by the matching raise.
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) NewIrql as u64, options(nomem, nostack, preserves_flags))
    };
}

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn strlen(s: *const u8) -> usize;
}

// The stack probe. For x86_64-pc-windows-msvc, rustc calls `__chkstk` in the prologue of every
// function whose frame is larger than a page (debug builds have many: every temporary gets its
// own slot), so the pages of the new frame are touched in order and the stack's guard page is
// hit before anything below it. The user-mode C runtime that defines it is not in a kernel
// image, but ntoskrnl.exe exports `__chkstk` on x64, next to `__C_specific_handler` (the
// export tables of Wine's and ReactOS's ntoskrnl.exe, written to load Windows drivers, list it
// for x86_64 only). The thunk rustc writes for a raw-dylib import is a single `jmp` through the
// import address table, so the probe's own convention (size in rax, every register but
// r10/r11 and the flags preserved) reaches ntoskrnl intact. Never called from Rust: declared so
// the import is written.
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub fn __chkstk();
}

/// Referenced by the compiler whenever floating-point code is present (MSVC convention); the
/// kernel C runtime would define it, and drivers have none.
#[unsafe(no_mangle)]
#[used]
pub static _fltused: i32 = 0;

/// The precompiled `core`/`alloc` for this target carry unwind tables that name the C++ frame
/// handler. Drivers are built with `panic = "abort"`, so no exception ever unwinds through Rust
/// frames and this is never called; if it were, the only safe answer is to stop.
///
/// # Safety
///
/// Never called.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __CxxFrameHandler3(
    _record: *mut core::ffi::c_void,
    _frame: *mut core::ffi::c_void,
    _context: *mut core::ffi::c_void,
    _dispatcher: *mut core::ffi::c_void,
) -> i32 {
    crate::bugcheck::bug_check(
        crate::bugcheck::BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        0,
        0,
        0,
        0,
    )
}
