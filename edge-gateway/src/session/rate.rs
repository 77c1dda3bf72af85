//! The per-connection message rate: a token bucket.
//!
//! Every message a device sends, heartbeats included, takes a token; with none left the
//! session stops reading its socket until one refills (back-pressure, not loss). This
//! is the session's silence, not the device's: it does not count towards idleness.

use std::time::Duration;

use tokio::time::Instant;

/// Messages per second and burst of one connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// A token bucket. `f32` tokens and one `Instant`: every idle session carries one.
pub(crate) struct RateBudget {
    tokens: f32,
    refilled: Instant,
}

impl RateBudget {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> Self {
        RateBudget { tokens: limit.burst as f32, refilled: Instant::now() }
    }

    fn refill(&mut self, limit: RateLimit) {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f32() * limit.per_second as f32;
        self.tokens = (self.tokens + refill).min(limit.burst as f32);
        self.refilled = now;
    }

    /// Whether a message may be taken now.
    pub fn has_token(&mut self, limit: RateLimit) -> bool {
        self.refill(limit);
        self.tokens >= 1.0
    }

    /// Takes one message's token (may go below one: the next waits longer).
    pub fn spend(&mut self) {
        self.tokens -= 1.0;
    }

    /// Whether the bucket is short of its burst (after refilling): the budget still
    /// remembers recent messages.
    pub fn is_spent(&mut self, limit: RateLimit) -> bool {
        self.refill(limit);
        self.tokens < limit.burst as f32
    }

    /// When a token will be there again; None while there is one.
    pub fn next_token_at(&self, limit: RateLimit) -> Option<Instant> {
        (self.tokens < 1.0).then(|| {
            let wait = (1.0 - self.tokens) / limit.per_second as f32;
            self.refilled + Duration::from_secs_f32(wait)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit { per_second: 10, burst: 3 };

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_token_per_period() {
        let mut budget = RateBudget::new(LIMIT);
        for _ in 0..3 {
            assert!(budget.has_token(LIMIT));
            budget.spend();
        }
        assert!(!budget.has_token(LIMIT), "the burst is spent");
        let next = budget.next_token_at(LIMIT).expect("empty bucket");
        let wait = next - Instant::now();
        assert!(wait.abs_diff(Duration::from_millis(100)) < Duration::from_millis(1), "{wait:?}");
        tokio::time::sleep(Duration::from_millis(98)).await;
        assert!(!budget.has_token(LIMIT));
        tokio::time::sleep_until(next).await;
        assert!(budget.has_token(LIMIT));
        assert_eq!(budget.next_token_at(LIMIT), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_refills_only_up_to_the_burst() {
        let mut budget = RateBudget::new(LIMIT);
        budget.spend();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert!(budget.has_token(LIMIT));
            budget.spend();
        }
        assert!(!budget.has_token(LIMIT), "an hour of silence is worth one burst, not 36,000");
    }
}
