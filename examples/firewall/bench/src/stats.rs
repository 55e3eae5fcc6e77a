//! Percentiles of per-connection latencies.

use std::time::Duration;

/// Latencies collected over a run; criterion reports means, these give the median and the tail.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// No samples yet.
    pub fn new() -> Latencies {
        Latencies(Vec::new())
    }

    /// Adds samples.
    pub fn extend(&mut self, samples: impl IntoIterator<Item = Duration>) {
        self.0.extend(samples);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`-th percentile (0 < p <= 100), nearest rank; `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        // Nearest rank: the smallest sample with at least p% of the samples at or below it.
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::new();
        assert_eq!(l.percentile(50.0), None);
        l.extend((1..=100).map(Duration::from_micros));
        assert_eq!(l.percentile(50.0), Some(Duration::from_micros(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_micros(100)));
        l.extend([Duration::from_secs(1)]);
        assert_eq!(l.percentile(100.0), Some(Duration::from_secs(1)));
        assert_eq!(l.percentile(50.0), Some(Duration::from_micros(51)));
    }
}
