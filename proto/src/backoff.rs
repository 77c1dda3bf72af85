//! The one back-off policy of both services: exponential, capped, with jitter.
//!
//! Jitter matters at fleet scale: after an outage every session and every worker loop
//! retries, and without it they all retry at the same instants (a thundering herd that
//! can knock the dependency over again). Each delay is drawn from the upper half of the
//! current step ("equal jitter"): never shorter than half the step, so a retry loop
//! still backs off, but spread over the other half.

use std::time::Duration;

/// Delays for one retry loop: `initial`, doubling up to `max`, each jittered.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failures since the last reset.
    attempt: u32,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, attempt: 0 }
    }

    /// The delay before the next attempt; each call doubles the step up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = delay(self.initial, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Whether no failure happened since the last reset.
    pub fn is_reset(&self) -> bool {
        self.attempt == 0
    }
}

/// The delay before retry number `attempt` (0 = the first) of a loop that keeps only a
/// counter: `initial * 2^attempt`, capped at `max`, jittered. For state that must stay
/// small (one per device session); [`Backoff`] is the same policy as a value.
pub fn delay(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    jitter(initial.saturating_mul(factor).min(max))
}

/// A duration drawn uniformly from `[d / 2, d]`.
pub fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let steps = [100, 200, 400, 400, 400];
        for step in steps.map(Duration::from_millis) {
            let delay = backoff.next_delay();
            assert!(delay >= step / 2 && delay <= step, "{delay:?} not within [{:?}, {step:?}]", step / 2);
        }
        assert!(!backoff.is_reset());
        backoff.reset();
        assert!(backoff.is_reset());
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn delay_by_attempt_is_capped() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert!(delay(initial, max, 0) <= initial);
        assert!(delay(initial, max, 3) >= Duration::from_millis(400));
        assert!(delay(initial, max, 40) <= max, "no overflow past the cap");
    }

    #[test]
    fn jitter_spreads() {
        let delays: std::collections::HashSet<_> = (0..32).map(|_| jitter(Duration::from_secs(1))).collect();
        assert!(delays.len() > 16, "jittered delays should differ: {delays:?}");
    }
}
