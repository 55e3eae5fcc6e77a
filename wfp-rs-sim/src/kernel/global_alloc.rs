//! The global allocator of every program built with the simulator backend.
//!
//! On Windows a driver's `Box`, `Vec` and `Arc` come from non-paged pool through
//! [`PoolAllocator`](wfp_rs::pool::PoolAllocator). In the simulator the driver is host code in
//! the test's process, so this allocator decides per call who is allocating:
//!
//! - **Driver code** — a thread inside a machine, running a driver's code (its `DriverEntry`,
//!   unload, callbacks, work items, `LoadedDriver::run_in_driver`), and not inside a simulated
//!   kernel routine the driver called: the allocation behaves as `PoolAllocator`'s would. An
//!   alignment above [`POOL_ALIGNMENT`] is refused with null, before the pool is asked (as
//!   `PoolAllocator` does); above `DISPATCH_LEVEL` the machine stops (`ExAllocatePool2`'s rule
//!   for non-paged pool); an injected failure (`Machine::fail_allocations`) returns null and
//!   counts as one `ExAllocatePool2` call; otherwise the block is zeroed, charged to the driver
//!   under [`GLOBAL_ALLOCATOR_TAG`], and still allocated at unload it is a leak
//!   (`DRIVER_VERIFIER_DETECTED_VIOLATION` 0x62, like the driver's tagged pool).
//! - **Everything else** — the test harness, the simulator's own bookkeeping (every simulated
//!   kernel routine runs as kernel code, see [`KernelCode`]), user-mode service code in the same
//!   process, threads outside any machine: the host allocator, unchanged.
//!
//! Every block starts [`HEADER`] bytes before the pointer handed out, and the word just before
//! the pointer says where the block came from, so a block is freed correctly whoever frees it:
//! a `Vec` the driver allocated and the test drops, or the reverse. (A registry lookup on every
//! free would cost every test in the process a lock; the header costs 16 bytes.) A pool block's
//! header also holds a counted reference to its machine, whose table of such blocks
//! (`Kernel::global_pool`) is a leaf lock: this allocator takes it with nothing else held and
//! allocates from the host while holding it, so a caller holding any other simulator lock cannot
//! deadlock here. Whoever else takes it (the harness's `pool_blocks`, the unload check) runs as
//! kernel code while holding it, so its own allocations do not come back for it.
//!
//! The thread-locals read here ([`RUNNING`](super::state::RUNNING), `FAILED`) are
//! `const`-initialised `Copy` cells: no lazy initialisation that could allocate, no destructor
//! after which they are gone, so an allocation during thread teardown is safe.
//!
//! When driver code's allocation fails and the caller cannot handle it (`Box::new`, `Vec::push`:
//! anything but `try_reserve` and the like), Rust calls `handle_alloc_error`. In a driver that
//! panics, and the driver's panic handler bug checks with `KMODE_EXCEPTION_NOT_HANDLED`
//! ([`wfp_rs::panic`]). In a host program std prints "memory allocation of N bytes failed" and
//! aborts; on Unix hosts the simulator catches that abort and prints the stop a driver would
//! give (see `report_unhandled_failure`).

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use super::state::{self as kernel, Block, Kernel, KernelCode, Running};
use crate::GLOBAL_ALLOCATOR_TAG;
use wfp_rs::pool::POOL_ALIGNMENT;
use wfp_rs::sys::*;

/// Bytes in front of every block: the machine (pool blocks) and the kind. As large as the pool
/// alignment, so blocks keep it.
const HEADER: usize = POOL_ALIGNMENT;
/// The kind word of a block from the host.
const HOST: usize = 0x486F_5374_426C_6F6B;
/// The kind word of a block from a machine's pool, charged to a driver.
const POOL: usize = 0x506F_6F6C_426C_6F6B;

/// The allocator.
pub(crate) struct SimAllocator;

#[global_allocator]
static ALLOCATOR: SimAllocator = SimAllocator;

thread_local! {
    /// The last allocation of driver code on this thread that got null, as (size, alignment),
    /// until the driver's code calls into the kernel or returns to it: a failure nothing has
    /// handled yet. (Not until the next allocation: std's path from the null to its abort may
    /// allocate, to read `RUST_BACKTRACE` or capture a backtrace.)
    static FAILED: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Whether an allocation now is the driver's: see the module documentation.
fn is_driver_code(running: Running) -> bool {
    running.driver != 0 && !running.in_kernel && !running.kernel.is_null()
}

/// The host layout of a block for `layout`, and the offset of the pointer handed out.
fn host_layout(layout: Layout) -> Option<(Layout, usize)> {
    let offset = layout.align().max(HEADER);
    let size = layout.size().checked_add(offset)?;
    Some((Layout::from_size_align(size, offset).ok()?, offset))
}

/// The host layout of a pool block of `size` bytes.
fn pool_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(HEADER)?, POOL_ALIGNMENT).ok()
}

/// The driver's code calls into the kernel or returns to it: a failure before was handled.
pub(crate) fn forget_failure() {
    if FAILED.with(Cell::get).is_some() {
        FAILED.with(|f| f.set(None));
    }
}

/// Driver code's allocation fails: null, remembered in case nothing handles it.
fn fail(layout: Layout) -> *mut u8 {
    FAILED.with(|f| f.set(Some((layout.size(), layout.align()))));
    report_unhandled_failure::arm();
    core::ptr::null_mut()
}

/// Reads a block's kind word.
///
/// # Safety
///
/// `ptr` was handed out by this allocator and is live.
unsafe fn kind(ptr: *mut u8) -> usize {
    let word = ptr
        .wrapping_sub(core::mem::size_of::<usize>())
        .cast::<usize>();
    // SAFETY: every block has its header in front of the pointer (the kind word last), written
    // when it was allocated; the block is live.
    unsafe { word.read() }
}

/// Writes a block's header: `machine` (null for host blocks) and `kind`.
///
/// # Safety
///
/// `ptr` is `HEADER` or more bytes into a fresh block of this allocator, 16-byte aligned.
unsafe fn write_header(ptr: *mut u8, machine: *const Kernel, kind: usize) {
    let header = ptr.wrapping_sub(HEADER).cast::<usize>();
    // SAFETY: per the contract, the header's two words are in the block and aligned.
    unsafe { header.write(machine as usize) };
    // SAFETY: as above.
    unsafe { header.wrapping_add(1).write(kind) };
}

fn host_alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    let Some((host, offset)) = host_layout(layout) else {
        return core::ptr::null_mut();
    };
    let base = if zeroed {
        // SAFETY: `host` has a non-zero size (it includes the header).
        unsafe { System.alloc_zeroed(host) }
    } else {
        // SAFETY: as above.
        unsafe { System.alloc(host) }
    };
    if base.is_null() {
        return base;
    }
    // Within the block: its size is `offset` plus the caller's.
    let ptr = base.wrapping_add(offset);
    // SAFETY: `ptr` is `offset >= HEADER` bytes into a fresh block, aligned to `offset >= 16`.
    unsafe { write_header(ptr, core::ptr::null(), HOST) };
    ptr
}

/// `PoolAllocator::alloc` as it runs on Windows: `ExAllocatePool2(POOL_FLAG_NON_PAGED, size,
/// tag)` unless the alignment is above what pool gives.
fn pool_alloc(running: Running, layout: Layout) -> *mut u8 {
    if layout.align() > POOL_ALIGNMENT {
        return fail(layout);
    }
    // From here on the simulator's own allocations (the block table, a stop report) are the
    // kernel's.
    let _kernel = KernelCode::for_allocator();
    super::pool::require_allocation_irql(
        kernel::irql(),
        POOL_FLAG_NON_PAGED,
        layout.size(),
        "the global allocator (non-paged pool)",
    );
    // SAFETY: `with_context` set `running.kernel` from the `Arc` it keeps in this thread's
    // state until it resets `RUNNING`, so the machine is alive.
    let machine = unsafe { &*running.kernel };
    if machine.injected_failure() {
        return fail(layout);
    }
    let Some(host) = pool_layout(layout.size()) else {
        return fail(layout);
    };
    // SAFETY: `host` has a non-zero size. Pool comes zeroed (no POOL_FLAG_UNINITIALIZED).
    let base = unsafe { System.alloc_zeroed(host) };
    if base.is_null() {
        return fail(layout);
    }
    // Within the block: it is `HEADER` bytes longer than the caller's size.
    let ptr = base.wrapping_add(HEADER);
    // SAFETY: the machine is alive (above); the header's reference keeps it so until the block
    // is freed, wherever that happens.
    unsafe { Arc::increment_strong_count(running.kernel) };
    // SAFETY: `ptr` is `HEADER` bytes into a fresh 16-byte aligned block.
    unsafe { write_header(ptr, running.kernel, POOL) };
    if tracing() {
        std::eprintln!(
            "wfp-rs simulator: driver code allocated {:p} ({} bytes) through the global allocator at\n{}",
            ptr,
            layout.size(),
            std::backtrace::Backtrace::force_capture()
        );
    }
    machine
        .global_pool
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            ptr as usize,
            Block {
                size: layout.size(),
                tag: GLOBAL_ALLOCATOR_TAG.raw(),
                flags: POOL_FLAG_NON_PAGED,
                driver: running.driver,
            },
        );
    ptr
}

/// Whether `WFP_SIM_TRACE_ALLOC` is set: then every pool block driver code takes through the
/// global allocator is printed with a backtrace, so a leak reported at unload can be found by
/// its address. Read once.
fn tracing() -> bool {
    static TRACING: AtomicU8 = AtomicU8::new(0);
    match TRACING.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("WFP_SIM_TRACE_ALLOC").is_some();
            TRACING.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        state => state == 2,
    }
}

/// `PoolAllocator::dealloc`: `ExFreePoolWithTag`, from whichever code frees the block.
///
/// # Safety
///
/// `ptr` is a live pool block of this allocator.
unsafe fn pool_free(ptr: *mut u8) {
    let _kernel = KernelCode::for_allocator();
    let header = ptr.wrapping_sub(HEADER).cast::<*const Kernel>();
    // SAFETY: a pool block's header starts with its machine (written by `pool_alloc`).
    let machine_ptr = unsafe { header.read() };
    // A thread outside every machine is at PASSIVE_LEVEL; one inside is at its own IRQL.
    let now = kernel::irql();
    if !kernel::running().kernel.is_null()
        && !super::pool::free_irql_allowed(now, POOL_FLAG_NON_PAGED)
    {
        super::pool::stop_free_above_irql(
            now,
            POOL_FLAG_NON_PAGED,
            ptr as usize,
            "a global-allocator pool block",
        );
    }
    // SAFETY: the header holds a strong reference to the machine, taken in `pool_alloc`.
    let machine = unsafe { Arc::from_raw(machine_ptr) };
    let block = machine
        .global_pool
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(ptr as usize));
    let size = block.map_or(0, |b| b.size);
    // A spin lock that lived in the block is gone: deadlock detection forgets its orders, so a
    // lock the address is reused for starts afresh.
    super::deadlock::forget_range(&machine, ptr as usize, size);
    let host = pool_layout(size).expect("the block was allocated with this layout");
    // SAFETY: allocated by `pool_alloc` with this layout (its size is the table's), freed once:
    // it was just removed from the table.
    unsafe { System.dealloc(ptr.wrapping_sub(HEADER), host) };
    // The last block of a dropped machine frees the machine here, as kernel code.
    drop(machine);
}

// SAFETY: every block comes from `System` with room for its header in front and the caller's
// size and alignment after it (pool blocks are refused above 16-byte alignment, which
// `pool_layout` gives); `dealloc` and `realloc` find each block's kind in its header and
// return it to `System` with the layout it was allocated with. Nothing here unwinds: the only
// non-returning path is a bug check, which aborts.
unsafe impl GlobalAlloc for SimAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let running = kernel::running();
        if is_driver_code(running) {
            pool_alloc(running, layout)
        } else {
            host_alloc(layout, false)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let running = kernel::running();
        if is_driver_code(running) {
            // Pool blocks are zeroed.
            pool_alloc(running, layout)
        } else {
            host_alloc(layout, true)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of this allocator (GlobalAlloc contract).
        if unsafe { kind(ptr) } == POOL {
            // SAFETY: as above, and the kind says it is a pool block.
            unsafe { pool_free(ptr) };
        } else {
            let (host, offset) = host_layout(layout).expect("allocated with this layout");
            // SAFETY: a host block from `host_alloc` (or `realloc`) with this layout, `offset`
            // bytes into it.
            unsafe { System.dealloc(ptr.wrapping_sub(offset), host) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let running = kernel::running();
        // SAFETY: `ptr` is a live block of this allocator (GlobalAlloc contract).
        let from_host = unsafe { kind(ptr) } != POOL;
        if from_host && !is_driver_code(running) {
            // Host to host: in place when the host can, header included.
            let (old, offset) = host_layout(layout).expect("allocated with this layout");
            let Some(new_host_size) = new_size.checked_add(offset) else {
                return core::ptr::null_mut();
            };
            // SAFETY: `ptr - offset` is a host block with layout `old`; the new size is
            // non-zero and, rounded to the alignment, does not overflow (`Layout` checked by
            // the caller for `new_size`, plus `offset` which is a multiple of the alignment).
            let base = unsafe { System.realloc(ptr.wrapping_sub(offset), old, new_host_size) };
            if base.is_null() {
                return base;
            }
            // The header moved with the block.
            return base.wrapping_add(offset);
        }
        // Anything involving pool goes as `GlobalAlloc::realloc`'s default does on Windows: a
        // new block from whoever runs now (an `ExAllocatePool2` call for driver code), a copy,
        // and the old block freed.
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, fits a Layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size (GlobalAlloc contract).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct, each at least this long.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` is live with `layout`, and no longer used.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

/// Turns the abort that follows an unhandled allocation failure of driver code into the stop a
/// driver gives: `KMODE_EXCEPTION_NOT_HANDLED` (0x1E), parameter 1 `0x52757374` ("Rust", the
/// SDK's panic handler's mark).
///
/// On Windows `handle_alloc_error` panics ("memory allocation of N bytes failed") and the
/// driver's panic handler bug checks with the panic's line as parameter 2: a line inside the
/// `alloc` crate, which depends on the toolchain, so the simulator gives 0 there. Stable Rust
/// offers no hook between `handle_alloc_error` and std's abort, so the simulator catches the
/// abort itself (`SIGABRT`), on the thread whose allocation failed, if that thread's driver code
/// has not called into the kernel nor returned to it since (either means it handled the
/// failure). The handler only writes to stderr; the process then ends as every stop ends it.
#[cfg(unix)]
mod report_unhandled_failure {
    use core::ffi::c_int;
    use core::fmt::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::FAILED;
    use crate::kernel::bugcheck::STOP_PREFIX;

    const SIGABRT: c_int = 6;
    /// "Rust" in ASCII: parameter 1 of the SDK's panic handler's bug check.
    const RUST_PANIC: usize = 0x5275_7374;

    unsafe extern "C" {
        fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
        fn write(fd: c_int, buf: *const u8, count: usize) -> isize;
    }

    static ARMED: AtomicBool = AtomicBool::new(false);

    /// Installs the handler, once, when driver code's allocation first fails.
    pub(super) fn arm() {
        if !ARMED.swap(true, Ordering::Relaxed) {
            // SAFETY: `on_abort` is an `extern "C" fn(c_int)`, what `signal` expects, and only
            // reads a const thread-local, formats on its stack and writes to stderr.
            unsafe { signal(SIGABRT, on_abort) };
        }
    }

    /// The report, formatted on the stack: the handler must not allocate.
    struct Text {
        bytes: [u8; 1024],
        len: usize,
    }

    impl Write for Text {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.len + s.len();
            if end > self.bytes.len() {
                return Err(core::fmt::Error);
            }
            self.bytes[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    extern "C" fn on_abort(_signal: c_int) {
        let Some((size, align)) = FAILED.with(core::cell::Cell::get) else {
            return;
        };
        let mut text = Text {
            bytes: [0; 1024],
            len: 0,
        };
        let _ = write!(
            text,
            "\n{STOP_PREFIX}{:#010X} ({RUST_PANIC:#018X}, {:#018X}, {:#018X}, {:#018X})\n\
             KMODE_EXCEPTION_NOT_HANDLED\n\
             wfp-rs simulator: driver code's allocation of {size} bytes (alignment {align}) \
             through the global allocator failed and the caller could not handle it \
             (`Box::new`, `Vec::push`, `Arc::new`, ...: use `try_reserve` or the pool types on \
             paths that must survive low memory); on Windows `handle_alloc_error` panics \
             (\"memory allocation of {size} bytes failed\") and the driver's panic handler \
             bug checks\n",
            0x1E, 0, 0, 0
        );
        // The seed and the stop note (the property harness's case), as `stop` writes them:
        // borrowed, and written piece by piece, so nothing is allocated.
        crate::kernel::bugcheck::with_stop_context(|sched, note| {
            if let Some((seed, replay)) = sched {
                let _ = writeln!(text, "deterministic machine, seed {seed}");
                flush(&mut text);
                stderr(replay.as_bytes());
                stderr(b"\n");
            }
            if let Some(note) = note {
                flush(&mut text);
                stderr(note.as_bytes());
                stderr(b"\n");
            }
        });
        flush(&mut text);
    }

    fn stderr(bytes: &[u8]) {
        // SAFETY: `bytes` is a live slice of `bytes.len()` bytes; fd 2 is stderr.
        unsafe { write(2, bytes.as_ptr(), bytes.len()) };
    }

    /// Writes what `text` holds and empties it.
    fn flush(text: &mut Text) {
        stderr(&text.bytes[..text.len]);
        text.len = 0;
    }
}

/// Elsewhere the abort is std's ("memory allocation of N bytes failed"), without a stop line.
#[cfg(not(unix))]
mod report_unhandled_failure {
    pub(super) fn arm() {}
}
