//! The worker's Prometheus metrics (served by `tcpc_observe::router`). No device id is
//! ever a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
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
    /// Uplink batches retried after a transient failure (the ack held meanwhile).
    pub retries: Counter,
    /// Partition leases found taken by another worker while this one held them.
    pub partitions_lost: Counter,
    /// Rounds of the lease loop (membership and every lease renewed).
    pub lease_rounds: Counter,
    /// Downlink subscriptions the broker refused (each asked again with back-off).
    pub subscription_refusals: Counter,
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
        Metrics {
            envelopes,
            published,
            uplink_errors,
            auth,
            partitions,
            downlinks,
            dead_letters,
            retries,
            partitions_lost,
            lease_rounds,
            subscription_refusals,
        }
    }
}
