//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! `edge_connections{listener}` is the autoscaling signal. No device id is ever a label.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The edge's metrics.
pub struct Metrics {
    registry: Registry,
    /// Open connections, authenticated or not.
    pub connections: Family<ListenerLabel, Gauge>,
    /// Authentication outcomes.
    pub auth: Family<ReasonLabel, Counter>,
    /// Uplink messages acknowledged by the bus.
    pub uplinks: Counter,
    /// Publishes re-sent after a failed acknowledgement.
    pub republished: Counter,
    /// Connections closed, by cause.
    pub closed: Family<ReasonLabel, Counter>,
    /// Connections refused at accept, by cause.
    pub refused: Family<ReasonLabel, Counter>,
    /// Downlink deliveries, by outcome.
    pub downlinks: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ListenerLabel, Gauge>::default();
        registry.register("edge_connections", "Open device connections", connections.clone());
        let auth = Family::<ReasonLabel, Counter>::default();
        registry.register("edge_auth", "Device authentications by outcome", auth.clone());
        let uplinks = Counter::default();
        registry.register("edge_uplinks", "Uplink messages stored in the bus", uplinks.clone());
        let republished = Counter::default();
        registry.register(
            "edge_republished",
            "Uplink publishes re-sent after a failure",
            republished.clone(),
        );
        let closed = Family::<ReasonLabel, Counter>::default();
        registry.register("edge_connections_closed", "Connections closed by cause", closed.clone());
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register("edge_connections_refused", "Connections refused at accept", refused.clone());
        let downlinks = Family::<ReasonLabel, Counter>::default();
        registry.register("edge_downlinks", "Downlink deliveries by outcome", downlinks.clone());
        Metrics { registry, connections, auth, uplinks, republished, closed, refused, downlinks }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the health endpoints look at.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Ready to take connections: set false first on shutdown (readiness 503).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    pub draining: Arc<AtomicBool>,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        health.metrics.render(),
    )
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !(health.ready)() {
        (StatusCode::SERVICE_UNAVAILABLE, "uplink bus unavailable")
    } else {
        (StatusCode::OK, "ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn health(ready: bool) -> Health {
        Health {
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(move || ready),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn exposes_the_connection_gauge_by_listener() {
        let health = health(true);
        health.metrics.connections.get_or_create(&ListenerLabel { listener: "official" }).set(3);
        let (status, body) = get(router(health), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("edge_connections{listener=\"official\"} 3"), "{body}");
    }

    #[tokio::test]
    async fn readiness_follows_the_bus_and_draining() {
        assert_eq!(get(router(health(true)), "/readyz").await, (StatusCode::OK, "ready".into()));
        assert_eq!(get(router(health(true)), "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(router(health(false)), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let draining = health(true);
        draining.draining.store(true, Ordering::Release);
        assert_eq!(
            get(router(draining), "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "draining".into())
        );
    }
}
