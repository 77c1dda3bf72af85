//! The worker's Prometheus metrics (served by `tcpc_observe::router`). No device id is
//! ever a label. Names follow Prometheus's conventions: the unit in the name, `_total`
//! on counters (prometheus-client appends it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Which script function ran: `decode` (uplinks) or `encode` (downlinks).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallReasonLabel {
    pub call: &'static str,
    pub reason: &'static str,
}

/// Script calls: 20 µs to 0.33 s (past the default CPU limit of 100 ms).
fn script_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.00002, 2.0, 15))
}

/// The worker's metrics.
pub struct Metrics {
    /// Envelopes taken from the bus and done with (published or skipped).
    pub envelopes: Counter,
    /// Platform messages acknowledged by the broker.
    pub published: Counter,
    /// Uplinks not delivered, by cause (script errors among them).
    pub uplink_errors: Family<ReasonLabel, Counter>,
    /// Authentication answers, by outcome.
    pub auth: Family<ReasonLabel, Counter>,
    /// Uplink partitions this worker owns.
    pub partitions: Gauge,
    /// Downlinks by outcome (delivered, offline, failed, queued, …).
    pub downlinks: Family<ReasonLabel, Counter>,
    /// Envelopes that can never be delivered, kept as dead letters, by cause.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Uplink deliveries retried after a transient failure (the ack held meanwhile).
    pub retries: Counter,
    /// Uplink envelopes delivered out of their connection's order: `gap`, stretches of
    /// missing envelopes given up on (the held ones after them released); `late`, ones that came after
    /// their place had passed (see `crate::reorder`).
    pub uplink_out_of_order: Family<ReasonLabel, Counter>,
    /// Partition leases found taken by another worker while this one held them.
    pub partitions_lost: Counter,
    /// Rounds of the lease loop (membership and every lease renewed).
    pub lease_rounds: Counter,
    /// Downlink subscriptions the broker refused (each asked again with back-off).
    pub subscription_refusals: Counter,
    /// Edge pods found gone in Kubernetes, their routes handed to the reaper.
    pub edge_pods_purged: Counter,
    /// Time of one script call on its engine thread, by function.
    pub script_duration: Family<CallLabel, Histogram>,
    /// Script calls that failed, by function and cause.
    pub script_errors: Family<CallReasonLabel, Counter>,
    /// A downlink's arrival from the broker until its delivery's outcome (the edge's
    /// answer, or why there was none).
    pub downlink_duration: Histogram,
    /// Uplink envelopes in JetStream not yet delivered to this worker's partition
    /// consumers (the backlog KEDA scales on).
    pub uplink_pending: Gauge,
}

impl Metrics {
    /// Registers every metric of the worker in the process's one `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let envelopes = Counter::default();
        registry.register("worker_envelopes", "Envelopes handled", envelopes.clone());
        let published = Counter::default();
        registry.register(
            "worker_published",
            "Platform messages acknowledged by the broker",
            published.clone(),
        );
        let uplink_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("worker_uplink_errors", "Uplinks not delivered, by cause", uplink_errors.clone());
        let auth = Family::<ReasonLabel, Counter>::default();
        registry.register("worker_auth", "Authentication answers by outcome", auth.clone());
        let partitions = Gauge::default();
        registry.register("worker_partitions", "Uplink partitions owned", partitions.clone());
        let downlinks = Family::<ReasonLabel, Counter>::default();
        registry.register("worker_downlinks", "Downlinks by outcome", downlinks.clone());
        let dead_letters = Family::<ReasonLabel, Counter>::default();
        registry.register("worker_dead_letters", "Envelopes dead-lettered, by cause", dead_letters.clone());
        let retries = Counter::default();
        registry.register(
            "worker_uplink_retries",
            "Uplink batches retried after a transient failure",
            retries.clone(),
        );
        let uplink_out_of_order = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "worker_uplink_out_of_order",
            "Uplink envelopes delivered out of their connection's order, by cause",
            uplink_out_of_order.clone(),
        );
        let partitions_lost = Counter::default();
        registry.register(
            "worker_partitions_lost",
            "Partition leases lost while held",
            partitions_lost.clone(),
        );
        let lease_rounds = Counter::default();
        registry.register("worker_lease_rounds", "Rounds of the partition lease loop", lease_rounds.clone());
        let subscription_refusals = Counter::default();
        registry.register(
            "worker_downlink_subscription_refusals",
            "Downlink subscriptions the broker refused",
            subscription_refusals.clone(),
        );
        let edge_pods_purged = Counter::default();
        registry.register(
            "worker_edge_pods_purged",
            "Edge pods gone from Kubernetes whose routes were purged",
            edge_pods_purged.clone(),
        );
        let script_duration =
            Family::<CallLabel, Histogram>::new_with_constructor(script_buckets as fn() -> _);
        registry.register_with_unit(
            "worker_script_duration",
            "One script call on its engine thread",
            Unit::Seconds,
            script_duration.clone(),
        );
        let script_errors = Family::<CallReasonLabel, Counter>::default();
        registry.register(
            "worker_script_errors",
            "Script calls that failed, by cause",
            script_errors.clone(),
        );
        // 0.2 ms to 6.5 s: a delivery takes a millisecond, the answer bound is 4 s.
        let downlink_duration = Histogram::new(exponential_buckets(0.0002, 2.0, 16));
        registry.register_with_unit(
            "worker_downlink_duration",
            "A downlink's arrival until its delivery's outcome",
            Unit::Seconds,
            downlink_duration.clone(),
        );
        let uplink_pending = Gauge::default();
        registry.register(
            "worker_uplink_pending_messages",
            "Uplink envelopes in JetStream not yet delivered to this worker's partitions",
            uplink_pending.clone(),
        );
        Metrics {
            script_duration,
            script_errors,
            downlink_duration,
            uplink_pending,
            envelopes,
            published,
            uplink_errors,
            auth,
            partitions,
            downlinks,
            dead_letters,
            retries,
            uplink_out_of_order,
            partitions_lost,
            lease_rounds,
            subscription_refusals,
            edge_pods_purged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_the_chart_scales_and_charts_on() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.script_duration.get_or_create(&CallLabel { call: "decode" }).observe(0.001);
        metrics.downlink_duration.observe(0.01);
        metrics.uplink_pending.set(7);
        metrics.script_errors.get_or_create(&CallReasonLabel { call: "encode", reason: "timeout" }).inc();
        let text = tcpc_observe::render(&registry);
        assert!(text.contains("worker_script_duration_seconds_count{call=\"decode\"} 1"), "{text}");
        assert!(text.contains("worker_downlink_duration_seconds_count 1"), "{text}");
        assert!(text.contains("\nworker_uplink_pending_messages 7\n"), "{text}");
        assert!(text.contains("worker_script_errors_total{call=\"encode\",reason=\"timeout\"} 1"), "{text}");
    }
}
