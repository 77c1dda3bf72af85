//! Uplinks as the platform receives them: each `devices/telemetry` message of the run
//! matched to its device and sequence, timed from its send, checked for duplicates,
//! order and (with `--device-id`) the device it is attributed to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::args::Pattern;
use crate::histogram::Latency;
use crate::seen::{Arrival, Seen};
use crate::stamp::{Stamp, now_us};

/// Where the worker publishes a direct device's telemetry.
pub const TOPIC: &str = "devices/telemetry";

/// The run's uplinks received so far.
pub struct Tally {
    run: Arc<str>,
    first: u64,
    device_id: Option<Pattern>,
    /// Per device, in index order.
    pub seen: Vec<Seen>,
    pub latency: Latency,
    /// Wall-clock microseconds of the last one.
    pub last_us: u64,
    /// Carried another device's id than the stamp's device.
    pub misattributed: u64,
    /// Distinct uplinks of the run received, read by the progress line and the drain.
    received: Arc<AtomicU64>,
}

impl Tally {
    pub fn new(run: Arc<str>, first: u64, count: u64, device_id: Option<Pattern>) -> Self {
        Tally {
            run,
            first,
            device_id,
            seen: vec![Seen::default(); count as usize],
            latency: Latency::default(),
            last_us: 0,
            misattributed: 0,
            received: Arc::default(),
        }
    }

    /// Distinct uplinks received, as they arrive.
    pub fn received(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    /// One `devices/telemetry` message; those of other runs and devices are ignored.
    pub fn take(&mut self, payload: &[u8]) {
        let now = now_us();
        let Some((device_id, values)) = crate::broker::envelope(payload) else { return };
        let Some(stamp) = Stamp::read(&self.run, &values) else { return };
        let Some(seen) = stamp.device.checked_sub(self.first).and_then(|at| self.seen.get_mut(at as usize))
        else {
            return;
        };
        if self.device_id.as_ref().is_some_and(|pattern| pattern.at(stamp.device) != device_id) {
            self.misattributed += 1;
        }
        if matches!(seen.record(stamp.seq), Arrival::New | Arrival::OutOfOrder) {
            self.received.fetch_add(1, Ordering::Relaxed);
            self.latency.record(now.saturating_sub(stamp.sent_us));
            self.last_us = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn message(device_id: &str, values: &str) -> Vec<u8> {
        let values = base64::engine::general_purpose::STANDARD.encode(values);
        serde_json::json!({"device_id": device_id, "values": values}).to_string().into_bytes()
    }

    #[test]
    fn counts_each_sequence_once_and_checks_the_device() {
        let mut tally = Tally::new("r1".into(), 10, 2, Some("dev-{i}".parse().unwrap()));
        let stamp = |device, seq| Stamp { device, seq, sent_us: now_us() }.to_json("r1", 0);
        for (id, device, seq) in [("dev-10", 10, 0), ("dev-10", 10, 0), ("dev-11", 11, 1), ("dev-10", 11, 0)]
        {
            tally.take(&message(id, &stamp(device, seq)));
        }
        // Not ours: another run, a device outside the range, not a stamp.
        tally.take(&message("dev-10", &Stamp { device: 10, seq: 5, sent_us: 0 }.to_json("r2", 0)));
        tally.take(&message("dev-12", &stamp(12, 0)));
        tally.take(&message("dev-10", r#"{"temperature":36.5}"#));
        assert_eq!(tally.received().load(Ordering::Relaxed), 3);
        assert_eq!((tally.seen[0].unique, tally.seen[0].duplicates), (1, 1));
        assert_eq!(tally.seen[1].unique, 2);
        assert_eq!(tally.seen[1].out_of_order, 1, "sequence 0 after 1");
        assert_eq!(tally.misattributed, 1, "device 11's message under dev-10");
        assert_eq!(tally.latency.count(), 3);
    }
}
