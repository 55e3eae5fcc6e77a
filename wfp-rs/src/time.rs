//! Kernel time: [`Instant`], a point on the machine's monotonic interrupt-time clock.
//!
//! Interrupt time counts 100-nanosecond ticks since the machine started, including time spent
//! asleep or hibernating, and never goes back (the system time can: the user or NTP sets it).
//! It is what a driver measures timeouts and cache lifetimes with. Reading it is allowed at any
//! IRQL, so [`Instant::now`] needs no token.
//!
//! In the simulator, each machine has its own clock: real monotonic time since the machine
//! started, plus an offset a test adds with `Machine::advance_clock`, so expiry can be tested
//! without sleeping.
//!
//! ```no_run
//! use core::time::Duration;
//! use wfp_rs::time::Instant;
//!
//! let expires = Instant::now().checked_add(Duration::from_secs(30));
//! // Later, at any IRQL:
//! let expired = expires.is_none_or(|deadline| Instant::now() >= deadline);
//! # let _ = expired;
//! ```

use core::fmt;
use core::time::Duration;

use crate::sys;

/// Nanoseconds per tick of interrupt time.
const NANOS_PER_TICK: u128 = 100;

/// A point in time on the machine's interrupt-time clock: monotonic, in 100-ns ticks since the
/// machine started, including sleep.
///
/// Instants are comparable and hashable; the difference of two is a [`Duration`]. Arithmetic is
/// checked or saturating: nothing here panics.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The current interrupt time (`KeQueryInterruptTimePrecise`, accurate to about a
    /// microsecond). Callable at any IRQL.
    ///
    /// In the simulator it must be called on a thread running in a machine (a driver's code, a
    /// work item, `Machine::run`, `Machine::at_dispatch`); see `Machine::now` for the harness.
    pub fn now() -> Instant {
        let mut qpc: sys::ULONG64 = 0;
        // SAFETY: `qpc` is a live, writable ULONG64 for the duration of the call; the routine
        // may be called at any IRQL.
        Instant(unsafe { sys::KeQueryInterruptTimePrecise(&mut qpc) })
    }

    /// The instant `ticks` 100-ns units after the machine started (the value the kernel's
    /// interrupt-time routines return).
    pub const fn from_ticks(ticks: u64) -> Instant {
        Instant(ticks)
    }

    /// This instant in 100-ns units since the machine started.
    pub const fn as_ticks(self) -> u64 {
        self.0
    }

    /// `self + duration`, or `None` if it does not fit. A duration that is not a whole number of
    /// ticks is rounded up, so a deadline is never earlier than asked for.
    pub fn checked_add(self, duration: Duration) -> Option<Instant> {
        self.0.checked_add(ticks_rounded_up(duration)?).map(Instant)
    }

    /// `self + duration`, or the last representable instant if it does not fit (a deadline
    /// that never comes). Rounds up like [`checked_add`](Self::checked_add).
    pub fn saturating_add(self, duration: Duration) -> Instant {
        self.checked_add(duration).unwrap_or(Instant(u64::MAX))
    }

    /// `self - duration`, or `None` if that is before the machine started. A duration that is
    /// not a whole number of ticks is rounded up.
    pub fn checked_sub(self, duration: Duration) -> Option<Instant> {
        self.0.checked_sub(ticks_rounded_up(duration)?).map(Instant)
    }

    /// The time from `earlier` to `self`, or `None` if `earlier` is later than `self`.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        self.0.checked_sub(earlier.0).map(ticks_to_duration)
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later than `self`.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        self.checked_duration_since(earlier)
            .unwrap_or(Duration::ZERO)
    }

    /// The time from `earlier` to `self`; zero if `earlier` is later (as `std`'s `Instant`
    /// does since Rust 1.60, rather than panicking).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }

    /// The time since `self`, [`Instant::now`] minus `self` (zero if `self` is in the future).
    pub fn elapsed(self) -> Duration {
        Instant::now().saturating_duration_since(self)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Instant({:?} since boot)", ticks_to_duration(self.0))
    }
}

/// `duration` in ticks, rounded up; `None` if that does not fit in a `u64`.
fn ticks_rounded_up(duration: Duration) -> Option<u64> {
    u64::try_from(duration.as_nanos().div_ceil(NANOS_PER_TICK)).ok()
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::new(ticks / 10_000_000, (ticks % 10_000_000) as u32 * 100)
}

#[cfg(all(test, wfp_sim))]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_rounds_durations_up_to_whole_ticks_and_never_panics() {
        let start = Instant::from_ticks(1_000);
        assert_eq!(
            start
                .checked_add(Duration::from_nanos(1))
                .unwrap()
                .as_ticks(),
            1_001
        );
        assert_eq!(
            start
                .checked_add(Duration::from_nanos(200))
                .unwrap()
                .as_ticks(),
            1_002
        );
        assert_eq!(
            start
                .checked_sub(Duration::from_nanos(150))
                .unwrap()
                .as_ticks(),
            998
        );
        assert_eq!(start.checked_sub(Duration::from_micros(101)), None);
        assert_eq!(
            Instant::from_ticks(u64::MAX).checked_add(Duration::from_nanos(1)),
            None
        );
        assert_eq!(start.checked_add(Duration::MAX), None);
        assert_eq!(start.saturating_add(Duration::MAX).as_ticks(), u64::MAX);
        let later = Instant::from_ticks(1_000 + 12_345_678);
        assert_eq!(
            later.checked_duration_since(start),
            Some(Duration::from_nanos(1_234_567_800))
        );
        assert_eq!(start.checked_duration_since(later), None);
        assert_eq!(start.saturating_duration_since(later), Duration::ZERO);
        assert_eq!(
            later.duration_since(start),
            Duration::from_nanos(1_234_567_800)
        );
        assert_eq!(
            format!("{:?}", Instant::from_ticks(15_000_000)),
            "Instant(1.5s since boot)"
        );
    }
}
