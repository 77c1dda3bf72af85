//! Graceful drain on SIGTERM: connections are closed spread over a window, so that a
//! fleet of devices reconnects to the other pods gradually instead of all at once.
//!
//! The sessions are taken once, when the drain starts: a session that authenticates
//! afterwards sees the drain itself and closes (see the session's auth phase), so the
//! drain never has to look at the registry again.

use std::time::Duration;

use tokio::time::Instant;

use crate::registry::{CloseOrder, Registry};

/// Granularity of the spread.
const TICK: Duration = Duration::from_millis(20);

/// Closes every session of `registry` over `window`, a proportional share per tick.
/// Returns once every session was told.
pub async fn spread_closes(registry: &Registry, window: Duration) {
    let mut sessions = registry.all();
    let start = Instant::now();
    let total = sessions.len();
    let mut ticker = tokio::time::interval(TICK);
    while !sessions.is_empty() {
        ticker.tick().await;
        // How many should be closed by now, in proportion to the time spent.
        let elapsed = start.elapsed().as_secs_f64() / window.as_secs_f64().max(f64::EPSILON);
        let due = ((total as f64 * elapsed).ceil() as usize).min(total);
        let closed = total - sessions.len();
        for session in sessions.drain(..due.saturating_sub(closed).min(sessions.len())) {
            session.close(CloseOrder::Draining);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tcpc_proto::v1::Protocol;

    use super::*;
    use crate::registry::{ConnectionId, SessionHandle};

    #[tokio::test(start_paused = true)]
    async fn closes_spread_evenly_over_the_window() {
        let registry = Registry::default();
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let handle = Arc::new(SessionHandle::new(
                    "d",
                    ConnectionId { process: 0, counter: i },
                    Protocol::Official,
                ));
                registry.insert(handle.clone());
                handle
            })
            .collect();
        let window = Duration::from_secs(10);
        let drain = tokio::spawn(async move { spread_closes(&registry, window).await });
        tokio::time::sleep(window / 2).await;
        let closed = handles.iter().filter(|h| h.is_closing()).count();
        assert!((45..=55).contains(&closed), "half the window, about half the sessions: {closed}");
        drain.await.unwrap();
        assert!(handles.iter().all(|h| h.is_closing()));
    }
}
