//! Graceful drain on SIGTERM: connections are closed spread over a window, so that a
//! fleet of devices reconnects to the other pods gradually instead of all at once.

use std::time::Duration;

use tokio::time::Instant;

use crate::registry::{CloseOrder, Registry};

/// Granularity of the spread.
const TICK: Duration = Duration::from_millis(20);

/// Closes every session of `registry` over `window`, a proportional share per tick;
/// sessions that authenticate meanwhile are closed too. Returns when none is left or
/// the window is over (what remains is closed at once then).
pub async fn spread_closes(registry: &Registry, window: Duration) {
    let deadline = Instant::now() + window;
    let mut ticker = tokio::time::interval(TICK);
    loop {
        ticker.tick().await;
        let sessions = registry.all();
        if sessions.is_empty() {
            return;
        }
        // Closed sessions stay registered until their window is flushed; count only
        // those not yet told.
        let sessions: Vec<_> = sessions.into_iter().filter(|s| !s.is_closing()).collect();
        let now = Instant::now();
        let ticks_left = (deadline.saturating_duration_since(now).as_millis() / TICK.as_millis()).max(1);
        let now_count = sessions.len().div_ceil(ticks_left as usize);
        for session in sessions.iter().take(now_count) {
            session.close(CloseOrder::Draining);
        }
        if now >= deadline {
            sessions.iter().for_each(|s| s.close(CloseOrder::Draining));
            return;
        }
    }
}
