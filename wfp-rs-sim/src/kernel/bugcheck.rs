//! How the simulated machine stops.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::backtrace::{Backtrace, BacktraceStatus};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use super::state::{Routine, RoutineKind};

use wfp_rs::bugcheck::BugCheckCode as Code;
use wfp_rs::sys::*;

/// The line a bug check prints first; [`crate::run_isolated`] parses it.
pub(crate) const STOP_PREFIX: &str = "*** STOP: ";
/// The line that says which driver routine the thread was running.
pub(crate) const IN_PREFIX: &str = "in: ";
/// The line that gives the source location of the innermost driver frame.
pub(crate) const AT_PREFIX: &str = "at: ";

/// "Rust" in ASCII: parameter 1 of the bug check a driver's panic handler gives.
const RUST_PANIC: usize = 0x5275_7374;

/// Makes a panic in driver code stop the machine as the driver's panic handler stops Windows:
/// `KMODE_EXCEPTION_NOT_HANDLED` (0x1E), parameter 1 `0x52757374` ("Rust"), parameter 2 the
/// panic's line (see `wfp_rs::panic_handler!`). Without it the panic would reach the SDK's
/// `extern "system"` trampoline and abort the process with no stop report. Panics of harness
/// code (assertions of a test) go to the hook that was there before. Installed once per
/// process, by the first machine.
pub(crate) fn install_driver_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let running = super::state::running();
            if running.driver != 0 && !running.in_kernel && !running.kernel.is_null() {
                let line = info.location().map_or(0, |l| l.line() as usize);
                stop(
                    Code::KMODE_EXCEPTION_NOT_HANDLED,
                    [RUST_PANIC, line, 0, 0],
                    &format!("driver code panicked: {info}"),
                );
            }
            previous(info);
        }));
    });
}

/// Stops the machine: prints the stop code the way the kernel debugger shows it, with the
/// simulator's explanation, and aborts the process. Nothing after a bug check runs, as on
/// Windows, so no test can pass by accident after one.
pub(crate) fn stop(code: Code, params: [usize; 4], why: &str) -> ! {
    stop_with_details(code, params, why, "")
}

/// [`stop`], with more lines after the report's header (`details`; empty for none).
///
/// The report's first five lines, always in this order:
///
/// ```text
/// *** STOP: 0x000000C4 (0x0000000000001001, 0x…, 0x…, 0x…)
/// DRIVER_VERIFIER_DETECTED_VIOLATION
/// wfp-rs simulator: <one-line explanation>
/// in: <the driver routine the thread runs>; thread <name> [<id>], IRQL <n>
/// at: <file>:<line>:<column> (<function>)   — the innermost frame of driver code
/// ```
pub(crate) fn stop_with_details(code: Code, params: [usize; 4], why: &str, details: &str) -> ! {
    report(code, params, why, details, None)
}

/// [`stop_with_details`] from a thread that stops the machine on behalf of another (the DPC
/// watchdog's monitor): `in_line` and `at_line` replace what the `in:` and `at:` lines would say
/// about the stopping thread itself.
pub(crate) fn stop_on_behalf(
    code: Code,
    params: [usize; 4],
    why: &str,
    details: &str,
    in_line: &str,
    at_line: &str,
) -> ! {
    report(code, params, why, details, Some((in_line, at_line)))
}

fn report(
    code: Code,
    params: [usize; 4],
    why: &str,
    details: &str,
    on_behalf: Option<(&str, &str)>,
) -> ! {
    // The report is the kernel's: it must not come out of the driver's pool (which may be
    // failing on purpose) when a driver's code is what stopped. Not `KernelCode::enter`: its
    // watchdog check would stop again from inside the stop.
    super::global_alloc::forget_failure();
    let _kernel = super::state::KernelCode::for_allocator();
    // One bug check per process, as per machine: a second processor that stops while the first
    // one's report is being written waits for the end instead of interleaving its own.
    static STOPPING: AtomicBool = AtomicBool::new(false);
    if STOPPING.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    let name = code.name().unwrap_or("UNKNOWN_BUGCHECK");
    let why = why.replace('\n', " ");
    let (in_line, location) = match on_behalf {
        Some((in_line, at_line)) => (in_line.replace('\n', " "), at_line.replace('\n', " ")),
        None => {
            let routine = super::state::current_routine()
                .map_or_else(|| "kernel or harness code".to_owned(), describe_routine);
            let current = std::thread::current();
            let thread = format!(
                "{} [{}]",
                current.name().unwrap_or("<unnamed>"),
                super::state::thread_id()
            );
            let irql = super::state::irql();
            let location = first_driver_frame(&Backtrace::force_capture()).map_or_else(
                || "(no driver frame on the stack)".to_owned(),
                |(function, at)| format!("{at} ({function})"),
            );
            (format!("{routine}; thread {thread}, IRQL {irql}"), location)
        }
    };
    let mut text = format!(
        "{STOP_PREFIX}{:#010X} ({:#018X}, {:#018X}, {:#018X}, {:#018X})\n{name}\nwfp-rs simulator: {why}\n{IN_PREFIX}{in_line}\n{AT_PREFIX}{location}\n",
        code.0, params[0], params[1], params[2], params[3],
    );
    if !details.is_empty() {
        text.push_str(details);
        text.push('\n');
    }
    if let Some(kernel) = current_kernel()
        && let Some(sched) = &kernel.sched
    {
        text.push_str(&format!(
            "deterministic machine, seed {}\n{}\n",
            sched.seed(),
            sched.replay()
        ));
    }
    if let Some(note) = stop_note() {
        text.push_str(&note);
        text.push('\n');
    }
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
    std::process::abort();
}

/// The notes machines add to a stop report (`Machine::set_stop_note`), by the address of their
/// kernel. Process-wide, not a field of the kernel: a thread that stops outside any machine's
/// context (the global allocator's failure path, a panic hook) still finds the note.
static STOP_NOTES: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());

/// Sets (or, with `None`, removes) the stop note of the machine whose kernel is at `kernel`.
pub(crate) fn set_stop_note(kernel: usize, note: Option<String>) {
    let mut notes = STOP_NOTES.lock().unwrap_or_else(|p| p.into_inner());
    notes.retain(|(k, _)| *k != kernel);
    if let Some(note) = note {
        notes.push((kernel, note));
    }
}

/// What [`stop`] adds to a report after the bug check, for a report that must be written
/// without allocating (the global allocator's failure path, in a signal handler): calls
/// `report` with the seed and replay line of the deterministic machine this thread runs in, if
/// it runs in one, and the stop note [`stop_note`] would find. Borrows, never clones.
pub(crate) fn with_stop_context(report: impl FnOnce(Option<(u64, &str)>, Option<&str>)) {
    let kernel = current_kernel();
    let sched = kernel
        .as_ref()
        .and_then(|k| k.sched.as_ref())
        .map(|s| (s.seed(), s.replay()));
    let notes = STOP_NOTES.try_lock().ok();
    let key = kernel.as_ref().map(|k| std::sync::Arc::as_ptr(k) as usize);
    let note = notes.as_deref().and_then(|notes| match key {
        Some(key) => notes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, n)| n.as_str()),
        None => match notes.as_slice() {
            [(_, note)] => Some(note.as_str()),
            _ => None,
        },
    });
    report(sched, note);
}

/// The note for this stop: the note of the machine this thread runs in, or, when the thread is
/// in none, of the only machine that has one (with several, which one stopped is unknown).
/// `try_lock`: the stopping thread may be the one setting a note.
fn stop_note() -> Option<String> {
    let notes = STOP_NOTES.try_lock().ok()?;
    let kernel = current_kernel().map(|k| std::sync::Arc::as_ptr(&k) as usize);
    match kernel {
        Some(kernel) => notes
            .iter()
            .find(|(k, _)| *k == kernel)
            .map(|(_, n)| n.clone()),
        None => match notes.as_slice() {
            [(_, note)] => Some(note.clone()),
            _ => None,
        },
    }
}

/// The name of driver object `driver`, if the machine's state can be read without waiting (a
/// stop may come while this thread holds the state lock).
fn driver_name(driver: usize) -> String {
    let name = current_kernel().and_then(|kernel| {
        let state = kernel.state.try_lock().ok()?;
        state.drivers.get(&driver).map(|d| d.name.clone())
    });
    name.unwrap_or_else(|| format!("{driver:#x}"))
}

/// The machine this thread runs in, if it can be read without waiting.
fn current_kernel() -> Option<std::sync::Arc<super::state::Kernel>> {
    super::state::THREAD.with(|t| t.kernel.try_borrow().ok().and_then(|k| k.clone()))
}

/// "classifyFn of callout 3 of driver firewall", for the stop report.
pub(crate) fn describe_routine(routine: Routine) -> String {
    let driver = driver_name(routine.driver);
    match routine.kind {
        RoutineKind::DriverEntry => format!("DriverEntry of driver {driver}"),
        RoutineKind::DriverUnload => format!("the unload routine of driver {driver}"),
        RoutineKind::AfterUnload => {
            format!("the I/O manager, unloading driver {driver} (its unload routine has returned)")
        }
        RoutineKind::WorkItem => format!(
            "a work item routine ({:#x}) of driver {driver}",
            routine.object
        ),
        RoutineKind::Callout(callback) => {
            let id = u32::try_from(routine.object).unwrap_or(0);
            let key = current_kernel()
                .and_then(|kernel| super::wfp::callout_key(&kernel, id))
                .map_or_else(String::new, |key| format!(" {{{}}}", wfp_rs::Guid(key)));
            format!("{callback} of callout {id}{key} of driver {driver}")
        }
        RoutineKind::Dpc => format!("a DPC routine ({:#x}) of driver {driver}", routine.object),
        RoutineKind::Dispatch => format!(
            "the dispatch routine for major function {:#x} of driver {driver}",
            routine.object
        ),
        RoutineKind::Cancel => format!("a cancel routine of driver {driver}"),
        RoutineKind::Port(callback) => {
            format!("the communication port's {callback} of driver {driver}")
        }
        RoutineKind::Harness(method) => format!("test harness code ({method})"),
    }
}

/// Prefixes of functions that are not the driver's own code: the SDK, the simulator, the standard
/// library, the test harness and the C runtime.
const NOT_DRIVER: &[&str] = &[
    "wfp_rs::",
    "<wfp_rs::",
    "wfp_rs_sim::",
    "<wfp_rs_sim::",
    "std::",
    "<std::",
    "core::",
    "<core::",
    "alloc::",
    "<alloc::",
    "test::",
    "<test::",
    "<F as ",
    "<&F as ",
    "<&mut F as ",
    "__rust",
    "rust_begin_unwind",
    "_start",
    "__libc",
    "start_thread",
    "clone",
    "__clone",
];

/// The innermost frame of driver code in `backtrace`: its function and its source location
/// (`file:line:column`). Tests and drivers in the simulator are host builds with debug info.
pub(crate) fn first_driver_frame(backtrace: &Backtrace) -> Option<(String, String)> {
    if backtrace.status() != BacktraceStatus::Captured {
        return None;
    }
    // `Backtrace` lists frames as "  N: function" followed by "      at file:line:column".
    let text = backtrace.to_string();
    let mut function: Option<&str> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(location) = line.strip_prefix("at ") {
            if let Some(f) = function.take()
                && !NOT_DRIVER.iter().any(|p| f.starts_with(p))
                && !location.contains("/rustc/")
            {
                return Some((f.to_owned(), location.to_owned()));
            }
        } else if let Some((index, f)) = line.split_once(": ")
            && index.chars().all(|c| c.is_ascii_digit())
        {
            function = Some(f);
        }
    }
    None
}

/// `KeBugCheckEx`.
///
/// # Safety
///
/// None beyond the kernel's: it never returns.
pub unsafe extern "system" fn KeBugCheckEx(
    BugCheckCode: ULONG,
    BugCheckParameter1: ULONG_PTR,
    BugCheckParameter2: ULONG_PTR,
    BugCheckParameter3: ULONG_PTR,
    BugCheckParameter4: ULONG_PTR,
) -> ! {
    let _kernel = super::state::KernelCode::enter();
    stop(
        Code(BugCheckCode),
        [
            BugCheckParameter1,
            BugCheckParameter2,
            BugCheckParameter3,
            BugCheckParameter4,
        ],
        "KeBugCheckEx was called",
    )
}
