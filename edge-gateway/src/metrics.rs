//! The edge's Prometheus metrics (served by `tcpc_observe::router`).
//!
//! `edge_connections{listener}` is the autoscaling signal. No device id is ever a label.
//! Names follow Prometheus's conventions: the unit in the name, `_total` on counters
//! (prometheus-client appends it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tcpc_proto::v1::Protocol;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A listener's traffic counters, resolved once so that a session counts without a
/// lookup (and holds nothing for them).
pub struct ListenerMetrics {
    /// Connections accepted.
    pub accepted: Counter,
    /// Frames (TP) or messages (custom) read from devices, the TP auth frame included.
    pub frames_received: Counter,
    /// Frames written to devices: answers, heartbeats, downlinks, error frames.
    pub frames_sent: Counter,
    /// Bytes read from devices (after TLS).
    pub received_bytes: Counter,
    /// Bytes written to devices (before TLS).
    pub sent_bytes: Counter,
}

impl ListenerMetrics {
    fn of(families: &[&Family<ListenerLabel, Counter>; 5], listener: &'static str) -> Self {
        let label = ListenerLabel { listener };
        let [accepted, frames_received, frames_sent, received_bytes, sent_bytes] =
            families.map(|family| family.get_or_create(&label).clone());
        ListenerMetrics { accepted, frames_received, frames_sent, received_bytes, sent_bytes }
    }
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
    /// The TP listeners' traffic (plaintext and TLS).
    pub official: ListenerMetrics,
    /// The custom listeners' traffic (plaintext and TLS).
    pub custom: ListenerMetrics,
    /// An uplink's first publish until JetStream's acknowledgement (re-sends included).
    pub publish_duration: Histogram,
    /// Rounds of the route re-assert, by outcome (ok, failed).
    pub reassert_rounds: Family<ReasonLabel, Counter>,
    /// Sessions found stale by the re-assert (their device's route has a newer epoch).
    pub routes_superseded: Counter,
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
        let traffic = [
            ("edge_connections_accepted", "Device connections accepted, by listener", None),
            ("edge_frames_received", "Frames (TP) or messages (custom) read from devices", None),
            ("edge_frames_sent", "Frames written to devices", None),
            ("edge_received", "Bytes read from devices", Some(Unit::Bytes)),
            ("edge_sent", "Bytes written to devices", Some(Unit::Bytes)),
        ]
        .map(|(name, help, unit)| {
            let family = Family::<ListenerLabel, Counter>::default();
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
                None => registry.register(name, help, family.clone()),
            }
            family
        });
        let families = [&traffic[0], &traffic[1], &traffic[2], &traffic[3], &traffic[4]];
        // 0.5 ms to 8 s: a local JetStream acks in about a millisecond, a struggling one in seconds.
        let publish_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        registry.register_with_unit(
            "edge_publish_duration",
            "An uplink's publish until JetStream acknowledged it",
            Unit::Seconds,
            publish_duration.clone(),
        );
        let reassert_rounds = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "edge_route_reassert_rounds",
            "Rounds of the route re-assert, by outcome",
            reassert_rounds.clone(),
        );
        let routes_superseded = Counter::default();
        registry.register(
            "edge_routes_superseded",
            "Sessions closed by the re-assert because their device connected elsewhere since",
            routes_superseded.clone(),
        );
        Metrics {
            official: ListenerMetrics::of(&families, "official"),
            custom: ListenerMetrics::of(&families, "custom"),
            publish_duration,
            reassert_rounds,
            routes_superseded,
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

impl Metrics {
    /// The traffic counters of a protocol's listeners.
    pub fn listener(&self, protocol: Protocol) -> &ListenerMetrics {
        match protocol {
            Protocol::Custom => &self.custom,
            _ => &self.official,
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

    #[test]
    fn names_carry_units_and_counters_end_in_total() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.listener(Protocol::Custom).received_bytes.inc_by(12);
        metrics.publish_duration.observe(0.002);
        let text = tcpc_observe::render(&registry);
        assert!(text.contains("edge_received_bytes_total{listener=\"custom\"} 12"), "{text}");
        assert!(text.contains("edge_sent_bytes_total{listener=\"official\"} 0"), "{text}");
        assert!(text.contains("edge_publish_duration_seconds_count 1"), "{text}");
        assert!(text.contains("edge_frames_received_total{listener=\"official\"} 0"), "{text}");
    }
}
