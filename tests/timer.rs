//! Kernel timers (`wfp_rs::timer`) in the simulator: they expire when the machine's clock passes
//! their due time (`Machine::advance_clock`, so no test sleeps), their DPC runs at
//! DISPATCH_LEVEL on the machine's DPC thread, and the unload and pool rules hold.
//!
//! Due times are an hour or more, so the real time a test takes never expires a timer by
//! itself; a step that must not fire stays a minute short of the due time.

#![cfg(any(not(windows), feature = "sim"))]

use core::time::Duration;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use wfp_rs::driver::Driver;
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::timer::Timer;
use wfp_rs::{Status, sys};
use wfp_rs_sim::{Machine, bugcheck_test};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

mod host {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
        Ok(())
    }
}

/// A counter a timer routine increments, and the routine.
fn counting() -> (
    Arc<AtomicU32>,
    impl Fn(&mut wfp_rs::irql::DispatchLevel<'_>) + Send + Sync + 'static,
) {
    let fired = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&fired);
    (fired, move |_: &mut wfp_rs::irql::DispatchLevel<'_>| {
        counter.fetch_add(1, Ordering::SeqCst);
    })
}

fn after(machine: &Machine, by: Duration) {
    machine.advance_clock(by);
    machine.wait_for_dpcs();
}

#[test]
fn a_one_shot_timer_fires_once_when_the_clock_passes_its_due_time() {
    let machine = Machine::new();
    let (fired, routine) = counting();
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(routine, irql).unwrap();
        assert!(!timer.set(irql, HOUR, None), "a new timer is not set");
        timer
    });
    after(&machine, HOUR - MINUTE);
    assert_eq!(fired.load(Ordering::SeqCst), 0, "fired before its due time");
    after(&machine, 2 * MINUTE);
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    after(&machine, 10 * HOUR);
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "a one-shot timer fired again"
    );
    machine.at_passive(|irql| {
        assert!(
            !timer.cancel(irql),
            "an expired one-shot timer is no longer set"
        );
        timer.shut_down(irql);
    });
    assert!(
        machine.pool_blocks().is_empty(),
        "{:?}",
        machine.pool_blocks()
    );
}

#[test]
fn a_periodic_timer_fires_once_per_period() {
    let machine = Machine::new();
    let (fired, routine) = counting();
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(routine, irql).unwrap();
        timer.set(irql, HOUR, Some(2 * HOUR));
        timer
    });
    after(&machine, HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    after(&machine, HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 1, "fired before its period");
    for expected in 2..=4 {
        after(&machine, HOUR + MINUTE);
        after(&machine, HOUR - MINUTE);
        assert_eq!(fired.load(Ordering::SeqCst), expected);
    }
    machine.at_passive(|irql| {
        assert!(timer.cancel(irql), "a periodic timer stays set");
        timer.shut_down(irql);
    });
    after(&machine, 10 * HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 4, "fired after cancel");
}

#[test]
fn a_timer_cancelled_before_its_due_time_never_fires() {
    let machine = Machine::new();
    let (fired, routine) = counting();
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(routine, irql).unwrap();
        timer.set(irql, HOUR, None);
        assert!(timer.cancel(irql), "it was set");
        assert!(!timer.cancel(irql), "cancelled already");
        timer
    });
    after(&machine, 10 * HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 0);
    machine.at_passive(|irql| timer.shut_down(irql));
}

#[test]
fn setting_a_set_timer_resets_its_due_time() {
    let machine = Machine::new();
    let (fired, routine) = counting();
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(routine, irql).unwrap();
        assert!(!timer.set(irql, HOUR, None));
        assert!(timer.set(irql, 3 * HOUR, None), "it was set: reset");
        timer
    });
    after(&machine, 2 * HOUR);
    assert_eq!(
        fired.load(Ordering::SeqCst),
        0,
        "fired at the first due time"
    );
    after(&machine, HOUR + MINUTE);
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    machine.at_passive(|irql| timer.shut_down(irql));
}

#[test]
fn the_routine_runs_at_dispatch_level_on_another_thread() {
    let machine = Machine::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let test_thread = std::thread::current().id();
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(
            move |_dispatch| {
                let other = std::thread::current().id() != test_thread;
                record
                    .lock()
                    .unwrap()
                    .push((sys::KeGetCurrentIrql(), other));
            },
            irql,
        )
        .unwrap();
        timer.set(irql, HOUR, None);
        timer
    });
    after(&machine, HOUR);
    assert_eq!(*seen.lock().unwrap(), [(sys::DISPATCH_LEVEL, true)]);
    machine.at_passive(|irql| timer.shut_down(irql));
}

#[test]
fn a_timer_is_set_and_cancelled_at_dispatch_level() {
    let machine = Machine::new();
    let (fired, routine) = counting();
    let lock = SpinLock::new(0u32);
    let timer = machine.at_passive(|irql| Timer::try_new(routine, irql).unwrap());
    machine.at_passive(|irql| {
        lock.lock(&mut *irql, |_, dispatch| {
            assert!(!timer.set(dispatch, HOUR, None));
        });
    });
    after(&machine, HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    machine.at_dispatch(|dispatch| {
        timer.set(&*dispatch, HOUR, None);
        assert!(timer.cancel(&*dispatch));
    });
    after(&machine, 2 * HOUR);
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "fired after cancel at DISPATCH_LEVEL"
    );
    machine.at_passive(|irql| timer.shut_down(irql));
}

#[test]
fn a_driver_that_shuts_its_timers_down_unloads_cleanly() {
    let machine = Machine::new();
    let driver = machine.load_driver("timers", host::DriverEntry).unwrap();
    let (fired, routine) = counting();
    let timer = driver
        .run_in_driver(&machine, |irql, _driver| {
            let timer = Timer::try_new(routine, irql).unwrap();
            timer.set(irql, HOUR, Some(HOUR));
            timer
        })
        .unwrap();
    after(&machine, HOUR);
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    // Dropped at PASSIVE_LEVEL: cancelled, flushed and freed.
    driver.run_in_driver(&machine, move |_irql, _driver| drop(timer));
    machine.unload_driver(driver).unwrap();
}

#[test]
fn dropping_a_timer_at_passive_level_waits_for_its_running_routine() {
    let machine = Machine::new();
    static STATE: AtomicU8 = AtomicU8::new(0); // 0 idle, 1 in the routine, 2 routine done
    static RELEASE: AtomicU8 = AtomicU8::new(0);
    let timer = machine.at_passive(|irql| {
        let timer = Timer::try_new(
            |_dispatch| {
                STATE.store(1, Ordering::SeqCst);
                while RELEASE.load(Ordering::SeqCst) == 0 {
                    core::hint::spin_loop();
                }
                STATE.store(2, Ordering::SeqCst);
            },
            irql,
        )
        .unwrap();
        timer.set(irql, HOUR, None);
        timer
    });
    machine.advance_clock(HOUR);
    while STATE.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Lets the routine go only after the drop below has started waiting (a short real
            // delay; the assertion holds however long it is).
            std::thread::sleep(Duration::from_millis(20));
            RELEASE.store(1, Ordering::SeqCst);
        });
        machine.at_passive(|_irql| drop(timer));
        assert_eq!(
            STATE.load(Ordering::SeqCst),
            2,
            "freed while its routine ran"
        );
    });
}

bugcheck_test! {
    /// A timer still set at unload would fire into the unloaded image.
    fn unloading_with_a_set_timer_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        let machine = Machine::new();
        let driver = machine.load_driver("timers", host::DriverEntry).unwrap();
        driver.run_in_driver(&machine, |irql, _driver| {
            let timer = Timer::try_new(|_dispatch| {}, irql).unwrap();
            timer.set(irql, HOUR, None);
            std::mem::forget(timer);
        });
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    /// A timer dropped above PASSIVE_LEVEL cannot wait for its DPC, so its memory is leaked
    /// (never freed under a DPC that may still run); the leak shows at unload.
    fn a_timer_dropped_at_dispatch_level_is_leaked_and_reported_at_unload() expects DRIVER_VERIFIER_DETECTED_VIOLATION (0x62) {
        let machine = Machine::new();
        let driver = machine.load_driver("timers", host::DriverEntry).unwrap();
        driver.run_in_driver(&machine, |irql, _driver| {
            let timer = Timer::try_new(|_dispatch| {}, irql).unwrap();
            timer.set(irql, HOUR, None);
            let lock = SpinLock::new(Some(timer));
            lock.lock(&mut *irql, |timer, _dispatch| drop(timer.take()));
        });
        let _ = machine.unload_driver(driver);
    }
}

bugcheck_test! {
    /// Driver Verifier finds a set timer in pool that is being freed.
    fn freeing_pool_that_holds_a_set_timer_stops() expects TIMER_OR_DPC_INVALID (0) {
        let machine = Machine::new();
        machine.at_passive(|irql| {
            let timer = wfp_rs::pool::PoolBox::try_new(
                // SAFETY: KTIMER is plain data, valid zeroed (KeInitializeTimerEx initialises it).
                unsafe { core::mem::zeroed::<sys::KTIMER>() },
                wfp_rs::pool::PoolTag::SDK,
                irql,
            )
            .unwrap();
            let raw = core::ptr::from_ref(&*timer).cast_mut();
            // SAFETY: the timer is in pool that does not move.
            unsafe { sys::KeInitializeTimerEx(raw, sys::NotificationTimer) };
            // SAFETY: initialised just above; PASSIVE_LEVEL is allowed. Freeing it while set is
            // the violation under test.
            unsafe { sys::KeSetTimerEx(raw, -1_000_000_000, 0, core::ptr::null_mut()) };
            drop(timer);
        });
    }
}

bugcheck_test! {
    /// `KeFlushQueuedDpcs` waits, so it is PASSIVE_LEVEL only.
    fn flushing_dpcs_at_dispatch_level_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_dispatch| {
            // SAFETY: the call is the violation under test; the simulator stops before it waits.
            unsafe { sys::KeFlushQueuedDpcs() };
        });
    }
}

bugcheck_test! {
    /// A timer kept in a static is never dropped, so never shut down: still set when its driver
    /// unloads, it would fire into the unloaded image.
    fn a_timer_kept_in_a_static_past_unload_stops() expects DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS {
        static KEPT: std::sync::OnceLock<Timer<fn(&mut DispatchLevel<'_>)>> =
            std::sync::OnceLock::new();
        let machine = Machine::new();
        let driver = machine.load_driver("timers", host::DriverEntry).unwrap();
        driver.run_in_driver(&machine, |irql, _driver| {
            let timer = Timer::try_new((|_| {}) as fn(&mut DispatchLevel<'_>), irql).unwrap();
            timer.set(irql, HOUR, Some(HOUR));
            assert!(KEPT.set(timer).is_ok());
        });
        let _ = machine.unload_driver(driver);
    }
}

/// A routine that can own its own timer (through a slot it shares with the driver).
type SelfOwning = Box<dyn Fn(&mut DispatchLevel<'_>) + Send + Sync>;

bugcheck_test! {
    /// A routine that holds the last reference to its own timer and drops it, in its DPC: the
    /// memory the routine runs from is not freed under it (that would need `KeFlushQueuedDpcs`,
    /// which is PASSIVE_LEVEL only and would stop with 0xA) but leaked, and the leak shows at
    /// unload.
    fn a_timer_dropped_by_its_own_routine_is_leaked_not_freed_under_it() expects DRIVER_VERIFIER_DETECTED_VIOLATION (0x62) {
        let machine = Machine::new();
        let driver = machine.load_driver("timers", host::DriverEntry).unwrap();
        let fired = Arc::new(AtomicU32::new(0));
        driver.run_in_driver(&machine, |irql, _driver| {
            let slot: Arc<Mutex<Option<Arc<Timer<SelfOwning>>>>> = Arc::default();
            let (own, counter) = (Arc::clone(&slot), Arc::clone(&fired));
            let routine: SelfOwning = Box::new(move |_dispatch| {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(own.lock().unwrap().take());
            });
            let timer = Arc::new(Timer::try_new(routine, irql).unwrap());
            timer.set(irql, HOUR, None);
            *slot.lock().unwrap() = Some(timer);
        });
        after(&machine, HOUR);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        let _ = machine.unload_driver(driver);
    }
}
