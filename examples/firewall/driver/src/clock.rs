//! The clock that ages cached verdicts, behind one function so its source is one line.

use core::time::Duration;

/// 100-nanosecond ticks per second.
const TICKS_PER_SECOND: u64 = 10_000_000;

/// A point on the kernel's monotonic clock, in 100 ns ticks since an arbitrary origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ticks(u64);

impl Ticks {
    /// A point `ticks` after the clock's origin.
    #[cfg(test)]
    pub(crate) const fn from_ticks(ticks: u64) -> Ticks {
        Ticks(ticks)
    }

    /// The point `duration` after this one; the end of time if that does not fit (a cached
    /// verdict that never expires is still revocable and evictable).
    pub(crate) fn after(self, duration: Duration) -> Ticks {
        let ticks = duration
            .as_secs()
            .saturating_mul(TICKS_PER_SECOND)
            .saturating_add(u64::from(duration.subsec_nanos() / 100));
        Ticks(self.0.saturating_add(ticks))
    }
}

/// Now, at any IRQL: the kernel's interrupt time, which does not jump when the wall clock is
/// set and keeps counting through sleep.
pub(crate) fn now() -> Ticks {
    Ticks(wfp_rs::time::Instant::now().as_ticks())
}
