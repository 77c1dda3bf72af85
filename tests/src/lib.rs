//! Fixtures of the end-to-end tests: real `redis-server`, `nats-server -js` and
//! `mosquitto` on free loopback ports (killed on drop, restartable), clusters of them
//! (JetStream, Redis Cluster, Sentinel), edges run
//! in-process on pre-bound listeners, workers as processes (their real main), a fake
//! ThingsPanel backend, a fake Kubernetes API server, an auth responder double, a JetStream reader of uplink
//! envelopes, an MQTT watcher, device clients, test certificates with TLS clients, and
//! an OTLP collector.
//!
//! Every fixture returns only when ready; every wait has a deadline.

pub mod auth;
pub mod clusters;
pub mod device;
pub mod edge;
pub mod kube;
pub mod mqtt;
pub mod otlp;
pub mod platform;
pub mod servers;
pub mod stream;
pub mod tls;
pub mod worker;
pub mod world;

use std::time::Duration;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

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

/// The values in the order each was first seen (duplicates left out).
pub fn first_seen(seen: &[u64]) -> Vec<u64> {
    let mut counted = std::collections::HashSet::new();
    seen.iter().copied().filter(|n| counted.insert(*n)).collect()
}

/// A series' value in a Prometheus exposition (0 when absent), e.g.
/// `edge_connections{listener="official"}`.
pub fn metric_in(exposition: &str, series: &str) -> f64 {
    exposition.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

/// A binary of this package (the services' own mains): it sits in the profile folder,
/// beside the `deps/` folder of test executables (cargo builds it before running
/// integration tests), or beside the running binary (load tools).
pub fn binary(name: &str) -> std::path::PathBuf {
    let current = std::env::current_exe().expect("the running executable's path");
    let mut dir = current.parent().expect("a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The raw HTTP/1.0 response of a GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
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
