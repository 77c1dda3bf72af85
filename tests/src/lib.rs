//! Fixtures of the end-to-end tests: real `redis-server` and `nats-server -js` on free
//! loopback ports (killed on drop, restartable), edges run in-process on pre-bound
//! listeners, an auth responder double, a JetStream reader of uplink envelopes, and a
//! TP device client.
//!
//! Every fixture returns only when ready; every wait has a deadline.

pub mod auth;
pub mod device;
pub mod edge;
pub mod servers;
pub mod stream;

use std::time::Duration;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Waits until `check` is true, polling; panics with `what` after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs of the code under test, at `RUST_LOG` (default warn), once per test binary.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
