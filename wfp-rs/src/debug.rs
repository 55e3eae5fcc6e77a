//! Debug output through `DbgPrintEx`.
//!
//! In the kernel the text goes to the kernel debugger (or DebugView); in the simulator it is
//! collected per machine (`wfp_rs_sim::Machine::debug_output`) and
//! echoed to stderr when `WFP_SIM_ECHO` is set.
//!
//! A message whose level the debugger's filter does not let through is not formatted at all:
//! [`print()`] asks the kernel first ([`enabled`]), so a driver's `Info` lines cost a call, not
//! the formatting, on a machine with Windows' default filter.

use core::fmt::{self, Write};

use crate::sys;

/// Importance of a debug message, as the `DPFLTR_*_LEVEL` values.
///
/// Messages go out under the component `DPFLTR_IHVDRIVER_ID`. By default Windows shows only
/// [`Level::Error`] for it; to see the others, set the mask for that component — in the
/// debugger `ed nt!Kd_IHVDRIVER_Mask 0xf`, or persistently the `DWORD` value `IHVDRIVER` = `0xf`
/// under `HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Debug Print Filter`
/// (read at boot). A simulated machine lets every level through unless its test sets a mask
/// (`wfp_rs_sim::Machine::set_debug_filter_mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `DPFLTR_ERROR_LEVEL`: always shown by the debugger.
    Error,
    /// `DPFLTR_WARNING_LEVEL`.
    Warning,
    /// `DPFLTR_TRACE_LEVEL`.
    Trace,
    /// `DPFLTR_INFO_LEVEL`.
    Info,
}

impl Level {
    const fn raw(self) -> u32 {
        match self {
            Level::Error => sys::DPFLTR_ERROR_LEVEL,
            Level::Warning => sys::DPFLTR_WARNING_LEVEL,
            Level::Trace => sys::DPFLTR_TRACE_LEVEL,
            Level::Info => sys::DPFLTR_INFO_LEVEL,
        }
    }
}

/// Bytes formatted per `DbgPrintEx` call. Longer text is split; the buffer lives on the stack,
/// so it stays far below a kernel stack page.
const CHUNK: usize = 256;

struct DbgWriter<'a> {
    level: Level,
    buf: &'a mut [u8; CHUNK],
    len: usize,
}

impl DbgWriter<'_> {
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the format string is NUL-terminated and `%.*s` consumes exactly the length
        // (an int) and the pointer that follow; `buf[..len]` is initialised. DbgPrintEx may be
        // called at any IRQL for text without Unicode conversions.
        unsafe {
            sys::DbgPrintEx(
                sys::DPFLTR_IHVDRIVER_ID,
                self.level.raw(),
                c"%.*s".as_ptr().cast(),
                self.len as i32,
                self.buf.as_ptr(),
            );
        }
        self.len = 0;
    }
}

impl Write for DbgWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Copied a run at a time, not byte by byte: a connection's log line is a few dozen
        // pieces.
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            if self.len == CHUNK {
                self.flush();
            }
            let free = &mut self.buf[self.len..];
            let n = rest.len().min(free.len());
            free[..n].copy_from_slice(&rest[..n]);
            self.len += n;
            rest = &rest[n..];
        }
        Ok(())
    }
}

/// Whether the debugger's filter lets messages of `level` through now: the component filter
/// mask of `DPFLTR_IHVDRIVER_ID`, which a debugger or the registry may change at any time, so
/// the answer is not kept. For a driver that builds an expensive message itself; [`print()`]
/// asks by itself. Callable at any IRQL. Wraps `DbgQueryDebugFilterState`.
///
/// ```
/// use wfp_rs::debug::{Level, enabled};
/// # wfp_rs_sim::Machine::new().run(|| {
/// if enabled(Level::Trace) {
///     wfp_rs::kd_print!(Trace, "state: {}\n", 42);
/// }
/// # });
/// ```
pub fn enabled(level: Level) -> bool {
    // SAFETY: the routine takes two integers and only reads the filter masks. INFERRED: it may
    // be called at any IRQL, as `DbgPrintEx` may, which consults the same masks.
    let state = unsafe { sys::DbgQueryDebugFilterState(sys::DPFLTR_IHVDRIVER_ID, level.raw()) };
    // Only a clear FALSE skips a message: an error status (an unknown component, which the SDK
    // never passes) leaves the decision to `DbgPrintEx`.
    state != i32::from(sys::FALSE)
}

/// Writes formatted text to the kernel debugger at `level`, if the debugger's filter lets
/// `level` through ([`enabled`]; errors are not asked about: Windows lets them through by
/// default, and they are rare). Callable at any IRQL; does not allocate. Prefer the
/// [`kd_print!`](crate::kd_print) macro.
pub fn print(level: Level, args: fmt::Arguments<'_>) {
    // Formatting is most of a message's cost; a message nobody sees should not pay it.
    if level != Level::Error && !enabled(level) {
        return;
    }
    // The buffer is a local of its own that the writer borrows: built inside the writer, it
    // would be built in a temporary and copied, two buffers in this frame in a debug build.
    let mut buf = [0; CHUNK];
    let mut writer = DbgWriter {
        level,
        buf: &mut buf,
        len: 0,
    };
    // Writing to the stack buffer cannot fail.
    let _ = writer.write_fmt(args);
    writer.flush();
}

pub(crate) fn print_error(args: fmt::Arguments<'_>) {
    print(Level::Error, args);
}

/// Prints to the kernel debugger, like `print!` (no newline is added). The arguments are
/// formatted only if the debugger's filter lets the level through ([`debug::enabled`]).
///
/// [`debug::enabled`]: crate::debug::enabled
///
/// ```
/// # wfp_rs_sim::Machine::new().run(|| {
/// wfp_rs::kd_print!("blocked {} connections\n", 3);
/// wfp_rs::kd_print!(Error, "unexpected status {:#x}\n", 0xC000_0001u32);
/// # });
/// ```
#[macro_export]
macro_rules! kd_print {
    (Error, $($arg:tt)*) => { $crate::debug::print($crate::debug::Level::Error, format_args!($($arg)*)) };
    (Warning, $($arg:tt)*) => { $crate::debug::print($crate::debug::Level::Warning, format_args!($($arg)*)) };
    (Trace, $($arg:tt)*) => { $crate::debug::print($crate::debug::Level::Trace, format_args!($($arg)*)) };
    ($($arg:tt)*) => { $crate::debug::print($crate::debug::Level::Info, format_args!($($arg)*)) };
}
