//! How the harness's waits spin before they park (`Machine::set_wait_spin`).
//!
//! Two harness waits are on the critical path of a pended decision: `Machine::connect` holding
//! a pended connection until the callout completes it, and a service's `IoRequest::wait` for its
//! request's completion. Parking a host thread at once and waking it later costs, on a virtual
//! machine whose CPU went idle meanwhile, from a few to tens of microseconds — a cost of the
//! host, not of anything the simulated kernel does. The standard library's channels avoid it by
//! spinning and yielding a little before they park; these waits do the same, and by default
//! learn how long spinning pays off ([`WaitSpin::Adaptive`]). Spinning changes which host thread
//! runs when, never what the simulated kernel checks or decides: a wait that stops spinning
//! parks on its condition variable and re-checks its condition as before.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the harness's waits spin before they park; [`crate::Machine::set_wait_spin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitSpin {
    /// The default: each kind of wait spins up to a budget it learns from its own recent waits —
    /// up to 64 µs while waits end within it (a lone connection's round trip), halved by every
    /// wait that outlasts it, so that under load (many threads, a slow service) waits park at
    /// once; one wait in 32 tries the whole 64 µs again, so the budget comes back when the load
    /// goes.
    Adaptive,
    /// Spin up to this long, whatever happened before; [`Duration::ZERO`] parks at once.
    Fixed(Duration),
}

/// The most an adaptive wait spins.
const MAX_SPIN_NANOS: u64 = 64_000;
/// An adaptive budget below this is no budget: the wait parks at once.
const MIN_SPIN_NANOS: u64 = 1_000;
/// With no budget, one adaptive wait in this many spins the whole [`MAX_SPIN_NANOS`], so that the
/// budget comes back once waits get short again.
const PROBE_EVERY: u32 = 32;
/// [`Spinner::mode`]'s value for [`WaitSpin::Adaptive`]; any other value is a fixed spin in
/// nanoseconds.
const ADAPTIVE: u64 = u64::MAX;

/// The machine's wait-spin setting, and how many of its waits spin now.
pub(crate) struct Spinner {
    mode: AtomicU64,
    /// Waits spinning now. No more than the host has CPUs spin at once: with more, a spinner
    /// would take the CPU from the thread it waits for (a thousand connections waiting at once
    /// park at once, whatever their budget).
    spinning: AtomicU32,
    most_spinning: u32,
}

impl Default for Spinner {
    fn default() -> Self {
        Spinner {
            mode: AtomicU64::new(ADAPTIVE),
            spinning: AtomicU32::new(0),
            most_spinning: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        }
    }
}

/// One spinning wait's slot among the machine's [`Spinner::most_spinning`]; given back on drop.
struct SpinSlot<'a>(&'a AtomicU32);

impl Drop for SpinSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spinner {
    pub(crate) fn set(&self, spin: WaitSpin) {
        let mode = match spin {
            WaitSpin::Adaptive => ADAPTIVE,
            // One nanosecond short of "adaptive" for a spin of 584 years.
            WaitSpin::Fixed(spin) => {
                u64::try_from(spin.as_nanos()).map_or(ADAPTIVE - 1, |n| n.min(ADAPTIVE - 1))
            }
        };
        self.mode.store(mode, Ordering::Relaxed);
    }

    fn slot(&self) -> Option<SpinSlot<'_>> {
        let slot = SpinSlot(&self.spinning);
        (self.spinning.fetch_add(1, Ordering::Relaxed) < self.most_spinning).then_some(slot)
    }
}

/// One kind of harness wait: what an adaptive spin learned about it, and a count of the
/// completions such a wait may be waiting for, so that a spinning wait takes the lock its
/// condition needs only after something completed.
pub(crate) struct WaitSite {
    /// The adaptive budget in nanoseconds.
    budget_nanos: AtomicU64,
    probes: AtomicU32,
    completions: AtomicU64,
}

impl Default for WaitSite {
    fn default() -> Self {
        WaitSite {
            // A new machine's first waits spin: nothing has shown yet that spinning is in vain.
            budget_nanos: AtomicU64::new(MAX_SPIN_NANOS),
            probes: AtomicU32::new(0),
            completions: AtomicU64::new(0),
        }
    }
}

impl WaitSite {
    /// Called after a completion's state change is visible under its lock, before the
    /// completion's condition variable is notified.
    pub(crate) fn completed(&self) {
        self.completions.fetch_add(1, Ordering::Release);
    }

    fn adaptive_limit(&self) -> u64 {
        match self.budget_nanos.load(Ordering::Relaxed) {
            0 if self
                .probes
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(PROBE_EVERY) =>
            {
                MAX_SPIN_NANOS
            }
            budget => budget,
        }
    }

    fn spun_until_done(&self, waited: Duration) {
        // Room for a wait up to four times as long as this one, within the bounds.
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let want = nanos
            .saturating_mul(4)
            .clamp(MIN_SPIN_NANOS, MAX_SPIN_NANOS);
        self.budget_nanos.fetch_max(want, Ordering::Relaxed);
    }

    fn spun_in_vain(&self) {
        let _ = self
            .budget_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |budget| {
                let half = budget / 2;
                Some(if half < MIN_SPIN_NANOS { 0 } else { half })
            });
    }
}

/// Spins, then yields, until `done` says the awaited event happened or the machine's spin for
/// this wait is over; returns whether it happened. The caller parks on its condition variable
/// if this returns false, and re-checks its condition there as it always does.
///
/// The rounds are those of the standard library's channels (which the benchmarks' floor uses):
/// 1, 2, 4 … 64 spin-loop hints, then a yield per round.
pub(crate) fn spin_before_parking(
    kernel: &super::state::Kernel,
    site: &WaitSite,
    mut done: impl FnMut() -> bool,
) -> bool {
    if kernel.sched.is_some() {
        // A deterministic machine's waits hand over the baton; spinning would only burn it.
        return false;
    }
    let mode = kernel.wait_spin.mode.load(Ordering::Relaxed);
    let adaptive = mode == ADAPTIVE;
    let limit = if adaptive {
        site.adaptive_limit()
    } else {
        mode
    };
    if limit == 0 {
        return false;
    }
    let Some(_slot) = kernel.wait_spin.slot() else {
        // As many waits spin as the host has CPUs: park, and leave the budget as it is.
        return false;
    };
    let limit = Duration::from_nanos(limit);
    let began = Instant::now();
    let mut seen = site.completions.load(Ordering::Acquire);
    if done() {
        return true;
    }
    let mut round = 0u32;
    loop {
        if round <= 6 {
            for _ in 0..1u32 << round {
                core::hint::spin_loop();
            }
            round += 1;
        } else {
            std::thread::yield_now();
        }
        let completions = site.completions.load(Ordering::Acquire);
        if completions != seen {
            seen = completions;
            if done() {
                if adaptive {
                    site.spun_until_done(began.elapsed());
                }
                return true;
            }
        }
        if began.elapsed() >= limit {
            if adaptive {
                site.spun_in_vain();
            }
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_that_outlast_the_spin_shrink_it_to_nothing_and_short_ones_bring_it_back() {
        let site = WaitSite::default();
        assert_eq!(site.adaptive_limit(), MAX_SPIN_NANOS);
        site.spun_in_vain();
        assert_eq!(site.adaptive_limit(), MAX_SPIN_NANOS / 2);
        for _ in 0..6 {
            site.spun_in_vain();
        }
        // 64 µs halved seven times is below a microsecond: no budget. One wait in 32 probes.
        let limits: Vec<u64> = (0..PROBE_EVERY * 2)
            .map(|_| site.adaptive_limit())
            .collect();
        assert_eq!(limits.iter().filter(|&&l| l == MAX_SPIN_NANOS).count(), 2);
        assert_eq!(limits.iter().filter(|&&l| l == 0).count(), 62);
        // A probe that ends in 3 µs leaves room for waits four times as long.
        site.spun_until_done(Duration::from_micros(3));
        assert_eq!(site.adaptive_limit(), 12_000);
        // A longer one widens it, never beyond the bound; a shorter one does not narrow it.
        site.spun_until_done(Duration::from_micros(1));
        assert_eq!(site.adaptive_limit(), 12_000);
        site.spun_until_done(Duration::from_millis(5));
        assert_eq!(site.adaptive_limit(), MAX_SPIN_NANOS);
    }

    #[test]
    fn a_fixed_spin_is_kept_as_given_and_adaptive_is_the_default() {
        let spinner = Spinner::default();
        assert_eq!(spinner.mode.load(Ordering::Relaxed), ADAPTIVE);
        spinner.set(WaitSpin::Fixed(Duration::from_micros(20)));
        assert_eq!(spinner.mode.load(Ordering::Relaxed), 20_000);
        spinner.set(WaitSpin::Fixed(Duration::MAX));
        assert_eq!(spinner.mode.load(Ordering::Relaxed), ADAPTIVE - 1);
        spinner.set(WaitSpin::Adaptive);
        assert_eq!(spinner.mode.load(Ordering::Relaxed), ADAPTIVE);
    }
}
