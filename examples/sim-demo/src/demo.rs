//! The demo itself; see the crate documentation.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use wfp_rs::irql::Irql;
use wfp_rs_sim::Machine;

/// Set in the child process that runs the deliberately broken scenario.
const BROKEN_CHILD: &str = "WFP_DEMO_BROKEN_CHILD";

/// Runs the demo; the exit code says whether everything it shows happened.
pub fn run() -> ExitCode {
    if std::env::var_os(BROKEN_CHILD).is_some() {
        broken_scenario();
        return ExitCode::SUCCESS;
    }
    println!("wfp-rs simulator demo\n");
    let machine = Machine::new();

    println!(
        "1. Loading minimal-driver (DriverEntry runs at PASSIVE_LEVEL and queues 4 work items)"
    );
    let driver = match machine.load_driver("minimal", minimal_driver::DriverEntry) {
        Ok(driver) => driver,
        Err(status) => {
            eprintln!("DriverEntry failed: {status}");
            return ExitCode::FAILURE;
        }
    };

    println!("2. Four simulated processors at DISPATCH_LEVEL queue 25 work items each");
    let queue = driver
        .work_queue(&machine)
        .expect("minimal-driver is an SDK driver");
    let ran_at_passive = Arc::new(AtomicU32::new(0));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let (queue, ran, machine) = (queue.clone(), Arc::clone(&ran_at_passive), &machine);
            scope.spawn(move || {
                machine.at_dispatch(|irql| {
                    for _ in 0..25 {
                        let ran = Arc::clone(&ran);
                        let queued = queue.queue(irql, move |_passive| {
                            if Irql::current() == Irql::PASSIVE {
                                ran.fetch_add(1, Ordering::SeqCst);
                            }
                        });
                        if let Err(error) = queued {
                            eprintln!("could not queue: {error}");
                        }
                    }
                });
            });
        }
    });
    drop(queue);

    println!("3. Unloading (the SDK waits for every work item, then checks for leaks)");
    if let Err(error) = machine.unload_driver(driver) {
        eprintln!("unload failed: {error}");
        return ExitCode::FAILURE;
    }

    println!("\nKernel debugger output:");
    for line in machine.debug_output() {
        print!("  {line}");
    }
    let ran = ran_at_passive.load(Ordering::SeqCst);
    println!(
        "\n{:<44} {:>6}",
        "work items from DISPATCH_LEVEL run at PASSIVE",
        format!("{ran}/100")
    );
    println!(
        "{:<44} {:>6}",
        "pool blocks left after unload",
        machine.pool_blocks().len()
    );

    println!(
        "\n4. A buggy driver: a work item returns holding a spin lock it took through the raw kernel API"
    );
    let outcome = run_broken_scenario();
    match outcome {
        Some(stop) => println!("   the simulator stopped the machine, as Windows would: {stop}"),
        None => {
            eprintln!("   expected a bug check, but the broken scenario ran to the end");
            return ExitCode::FAILURE;
        }
    }
    if ran == 100 && machine.pool_blocks().is_empty() {
        println!(
            "\nsummary: driver loaded, 100/100 work items ran at PASSIVE_LEVEL, unload clean, verifier caught the bug"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("\nsummary: unexpected result");
        ExitCode::FAILURE
    }
}

/// Runs [`broken_scenario`] in a child process (a bug check ends the process, like a machine)
/// and returns the stop line it printed.
fn run_broken_scenario() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let output = Command::new(exe).env(BROKEN_CHILD, "1").output().ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut lines = stderr.lines().skip_while(|l| !l.starts_with("*** STOP"));
    let stop = lines.next()?;
    let name = lines.next().unwrap_or("");
    Some(format!("{name} {}", stop.trim_start_matches("*** STOP: ")))
}

/// The mistake the types cannot see: `wfp_rs::sys` is the raw, `unsafe` kernel ABI, which takes
/// no token (the safe `SpinLock` releases its lock when its closure returns, so it cannot do
/// this).
fn broken_scenario() {
    struct RawLock(core::cell::UnsafeCell<wfp_rs::sys::KSPIN_LOCK>);
    // SAFETY: the lock word is only touched by the kernel's spin-lock routines, which serialise.
    unsafe impl Sync for RawLock {}
    static LOCK: RawLock = RawLock(core::cell::UnsafeCell::new(0));
    let machine = Machine::new();
    let driver = machine
        .load_driver("minimal", minimal_driver::DriverEntry)
        .expect("loads");
    let queue = driver.work_queue(&machine).expect("SDK driver");
    machine.at_passive(|irql| {
        let _ = queue.queue(irql, |_passive| {
            // The bug is what follows: the routine returns without KeReleaseSpinLock, still at
            // DISPATCH_LEVEL.
            // SAFETY: a valid, initialised spin lock, acquired at PASSIVE_LEVEL.
            let _old_irql = unsafe { wfp_rs::sys::KeAcquireSpinLockRaiseToDpc(LOCK.0.get()) };
        });
    });
    // Not past this: the worker thread stops the machine when the routine returns.
    machine.wait_for_work_items();
}
