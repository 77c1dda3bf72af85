//! Latencies in an HDR histogram (microseconds, 3 significant digits), mergeable across
//! the run's processes: it travels as its recorded (value, count) pairs.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency recorded as itself; longer ones are recorded as this.
const HIGHEST_US: u64 = 3_600_000_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, micros: u64) {
        self.record_n(micros, 1);
    }

    fn record_n(&mut self, micros: u64, count: u64) {
        // Within the bounds, so that recording cannot fail.
        self.0.saturating_record_n(micros.clamp(1, HIGHEST_US), count);
    }

    pub fn merge(&mut self, other: &Latency) {
        for (value, count) in Vec::from(other.clone()) {
            self.record_n(value, count);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// p50, p90, p99 and max in milliseconds (None when nothing was recorded).
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            max_ms: ms(self.0.max()),
        })
    }
}

impl From<Latency> for Vec<(u64, u64)> {
    fn from(latency: Latency) -> Self {
        latency.0.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
    }
}

impl From<Vec<(u64, u64)>> for Latency {
    fn from(pairs: Vec<(u64, u64)>) -> Self {
        let mut latency = Latency::default();
        for (value, count) in pairs {
            latency.record_n(value, count);
        }
        latency
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_halves_give_the_whole_percentiles() {
        let (mut whole, mut even, mut odd) = (Latency::default(), Latency::default(), Latency::default());
        for micros in 1..=10_000 {
            whole.record(micros);
            if micros % 2 == 0 { even.record(micros) } else { odd.record(micros) }
        }
        let json = serde_json::to_string(&odd).unwrap();
        even.merge(&serde_json::from_str(&json).unwrap());
        assert_eq!(even.count(), 10_000);
        assert_eq!(even.percentiles(), whole.percentiles());
        let p = whole.percentiles().unwrap();
        assert!((4.99..=5.01).contains(&p.p50_ms), "{p:?}");
        assert!((9.89..=9.91).contains(&p.p99_ms), "{p:?}");
        assert_eq!(Latency::default().percentiles(), None);
    }
}
