//! The edge's Prometheus metrics (served by `tcpc_observe::router`).
//!
//! `edge_connections{listener}` is the autoscaling signal. No device id is ever a label.

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
    /// Uplinks read from a device and never stored, by cause (see the session's close).
    pub lost: Family<ReasonLabel, Counter>,
    /// Routes found missing by the re-assert and written again.
    pub routes_restored: Counter,
    /// Routes of dead pods removed, their devices reported offline.
    pub routes_reaped: Counter,
    /// Changes of the device TLS certificate files, by outcome (reloaded, refused).
    pub tls_reloads: Family<ReasonLabel, Counter>,
}

impl Metrics {
    /// Registers every metric of the edge in the process's one `registry`.
    pub fn new(registry: &mut Registry) -> Self {
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
        let lost = Family::<ReasonLabel, Counter>::default();
        registry.register("edge_uplinks_lost", "Uplinks read and never stored, by cause", lost.clone());
        let routes_restored = Counter::default();
        registry.register(
            "edge_routes_restored",
            "Routes re-asserted after the store lost them",
            routes_restored.clone(),
        );
        let routes_reaped = Counter::default();
        registry.register("edge_routes_reaped", "Routes of dead pods removed", routes_reaped.clone());
        let tls_reloads = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "edge_tls_certificate_reloads",
            "Changes of the device TLS certificate files, by outcome",
            tls_reloads.clone(),
        );
        Metrics {
            connections,
            auth,
            uplinks,
            republished,
            closed,
            refused,
            downlinks,
            lost,
            routes_restored,
            routes_reaped,
            tls_reloads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_connection_gauge_by_listener() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.connections.get_or_create(&ListenerLabel { listener: "official" }).set(3);
        assert!(tcpc_observe::render(&registry).contains("edge_connections{listener=\"official\"} 3"));
    }
}
