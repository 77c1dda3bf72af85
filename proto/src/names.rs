//! Names that cross pods: NATS subjects and stream, Redis keys, route scripts.
//!
//! Services never `format!` one of these inline; a rename here is a protocol change.

use std::time::Duration;

/// The JetStream stream that carries uplink envelopes from edges to workers.
pub const UPLINK_STREAM: &str = "TCPC_UPLINK";
/// Every subject of [`UPLINK_STREAM`].
pub const UPLINK_SUBJECTS: &str = "tcpc.up.>";
/// Default number of device partitions. Edges and workers must agree on it.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// JetStream de-duplication window: a publish retried within it is stored once.
pub const UPLINK_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The subject a device's envelopes go to: one per partition, so that a partition's
/// consumer sees each device's envelopes in order.
pub fn uplink_subject(partition: u32) -> String {
    format!("tcpc.up.{partition}")
}

/// The partition of a device: FNV-1a of its id, stable across builds and languages.
pub fn partition_of(device_id: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in device_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// JetStream message id of an envelope: connection id and sequence, so that a retried
/// publish is stored once.
pub fn uplink_message_id(connection_id: &str, sequence: u64) -> String {
    format!("{connection_id}-{sequence}")
}

/// Request/reply subject of device authentication (edge asks, a worker answers).
pub const AUTH_SUBJECT: &str = "tcpc.auth";
/// Queue group of the auth responders, so that exactly one worker answers.
pub const AUTH_QUEUE_GROUP: &str = "tcpc-auth";

/// Redis hash holding a device's route: fields [`ROUTE_CONNECTION`], [`ROUTE_POD`],
/// [`ROUTE_GRPC_ADDR`], [`ROUTE_SINCE_MS`].
pub fn route_key(device_id: &str) -> String {
    format!("tcpc:route:{device_id}")
}
/// Route field: the connection id, the fence.
pub const ROUTE_CONNECTION: &str = "conn";
/// Route field: the edge pod's name.
pub const ROUTE_POD: &str = "pod";
/// Route field: where workers reach that pod's gRPC.
pub const ROUTE_GRPC_ADDR: &str = "addr";
/// Route field: when the route was written, Unix milliseconds.
pub const ROUTE_SINCE_MS: &str = "since";
/// Route field: the route's epoch, the fence between two connections of a device when
/// Redis lost both routes (the newer connection's is higher).
pub const ROUTE_EPOCH: &str = "epoch";

/// Redis set of the devices whose routes an edge pod wrote, so that the routes of a
/// dead pod can be found without scanning every route.
pub fn pod_routes_key(pod: &str) -> String {
    format!("tcpc:pod-routes:{pod}")
}
/// Redis set of the edge pods that have written routes (the reaper's watch list).
pub const EDGE_PODS_KEY: &str = "tcpc:edge-pods";
/// Redis: held by the one edge pod that reaps a dead pod's routes.
pub fn pod_reap_key(pod: &str) -> String {
    format!("tcpc:reap:{pod}")
}
/// How long a reap claim holds; a reaper that died mid-way is replaced after it.
pub const POD_REAP_CLAIM: Duration = Duration::from_secs(60);
/// JetStream message id of the offline event a reaper publishes for a dead pod's
/// connection: one per connection, so two reapers store it once.
pub fn reaped_message_id(connection_id: &str) -> String {
    format!("{connection_id}-reaped")
}

/// Redis key that exists while an edge pod is alive (value: its gRPC address). A route
/// whose pod has no liveness key belongs to a dead pod.
pub fn pod_liveness_key(pod: &str) -> String {
    format!("tcpc:pod:{pod}")
}
/// How long a liveness key lives without refresh.
pub const POD_LIVENESS_TTL: Duration = Duration::from_secs(15);
/// How often a live pod refreshes its key.
pub const POD_LIVENESS_REFRESH: Duration = Duration::from_secs(5);

/// Writes a route, replacing any older one: a new connection always wins. Its epoch is
/// the one asked (the connection's time, µs) raised above the epoch held, so a newer
/// connection's epoch is always higher. Returns `[replaced conn or nil, epoch]`.
/// `KEYS[1]`: the route key; `ARGV`: conn, pod, addr, since, epoch.
pub const ROUTE_REGISTER_SCRIPT: &str = r#"
local old = redis.call('HMGET', KEYS[1], 'conn', 'epoch')
local epoch = tonumber(ARGV[5])
local held = tonumber(old[2])
if held and held >= epoch then epoch = held + 1 end
epoch = string.format('%d', epoch)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'conn', ARGV[1], 'pod', ARGV[2], 'addr', ARGV[3], 'since', ARGV[4], 'epoch', epoch)
return {old[1], epoch}
"#;

/// Writes a route again (the periodic re-assert): 1 if it still names this connection;
/// 2 if it was missing or held by an older epoch and is restored; 0 if a newer
/// connection holds it (the fence: a stale connection never wins a route back).
/// `KEYS[1]`: the route key; `ARGV`: conn, pod, addr, since, epoch.
pub const ROUTE_REASSERT_SCRIPT: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'conn', 'epoch')
if cur[1] == ARGV[1] then return 1 end
if cur[1] and (tonumber(cur[2]) or 0) >= tonumber(ARGV[5]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'conn', ARGV[1], 'pod', ARGV[2], 'addr', ARGV[3], 'since', ARGV[4], 'epoch', ARGV[5])
return 2
"#;

/// Deletes a route only if it still names this connection (the fence): a late close on
/// an old pod never deletes a newer route. Returns 1 if deleted. `KEYS[1]`: the route key;
/// `ARGV[1]`: the connection id.
pub const ROUTE_REMOVE_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'conn') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Redis: a device config the workers fetched from the platform, by voucher digest
/// (JSON; shared by every worker so that the platform is asked once).
pub fn device_config_key(voucher_digest: &str) -> String {
    format!("tcpc:config:{voucher_digest}")
}

/// Redis: the digest a device's config is kept under (its voucher's), by the digest of
/// another form that names the device (its id, its number): the config is stored once.
/// A key of its own, not a `tcpc:config:` entry, so that a worker that does not know
/// it (a rolling update) sees a miss, never an unknown device.
pub fn device_config_alias_key(digest: &str) -> String {
    format!("tcpc:config-alias:{digest}")
}

/// Redis: the voucher digest of a device id, so that `device/disconnect` (which names
/// the device) can drop the cached config.
pub fn device_voucher_key(device_id: &str) -> String {
    format!("tcpc:config-of:{device_id}")
}
/// Redis: taken by the one worker that handles a downlink (`SET NX`), so that a
/// partition's successor replaying the downlinks of a hand-over never handles one
/// twice. `digest` names the downlink (its topic and payload).
pub fn downlink_claim_key(digest: &str) -> String {
    format!("tcpc:downlink:{digest}")
}
/// How long a downlink claim is kept: past any replay of it.
pub const DOWNLINK_CLAIM_TTL: Duration = Duration::from_secs(60);

/// Redis: held for the platform's 3 s per-voucher rate limit by the one worker that
/// calls the platform for that voucher.
pub fn platform_call_key(voucher_digest: &str) -> String {
    format!("tcpc:platform-call:{voucher_digest}")
}

/// Core NATS subject on which a worker that was told a device's config changed tells
/// every other worker to drop its cached copy (payload: the device id).
pub const DEVICE_FORGET_SUBJECT: &str = "tcpc.device.forget";

/// Redis sorted set of live workers (score: expiry, Unix ms).
pub const WORKERS_KEY: &str = "tcpc:workers";

/// Redis: the lease of an uplink partition (value: the owning worker). The partition in
/// braces puts its lease, generation and resume point in one Redis Cluster slot, so
/// that one script can touch them together.
pub fn partition_lease_key(partition: u32) -> String {
    format!("tcpc:lease:{{{partition}}}")
}

/// Redis: a partition's lease generation, incremented each time a worker takes the
/// lease (never on renewal); it names the taker's consumer.
pub fn partition_generation_key(partition: u32) -> String {
    format!("tcpc:lease-generation:{{{partition}}}")
}

/// Redis: the stream sequence of the last envelope of a partition whose batch was
/// delivered to the platform, where a successor resumes if the partition's consumer is
/// gone (rather than from the start of the stream's retention).
pub fn partition_resume_key(partition: u32) -> String {
    format!("tcpc:resume:{{{partition}}}")
}

/// JetStream durable consumer of a partition for one lease generation: each taker
/// consumes through its own, so that a stale owner's acknowledgement (AckPolicy::All)
/// lands on the old consumer and never on what the new owner has not yet published.
pub fn partition_consumer(partition: u32, generation: u64) -> String {
    format!("tcpc-p{partition}-g{generation}")
}

/// Whether `name` is a consumer of `partition`: any generation's, or the single durable
/// consumer that releases before lease generations used (`tcpc-p<partition>`).
pub fn is_partition_consumer(name: &str, partition: u32) -> bool {
    let Some(rest) = name.strip_prefix("tcpc-p").and_then(|rest| rest.strip_prefix(&partition.to_string()))
    else {
        return false;
    };
    rest.is_empty()
        || rest.strip_prefix("-g").is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
}

/// JetStream stream of dead letters: envelopes a worker could never deliver (a topic
/// the broker refuses, an output over the limit, a script that fails on them), kept with
/// their reason for an operator, and acknowledged on the uplink stream so that they do
/// not stall their partition.
pub const DEAD_LETTER_STREAM: &str = "TCPC_DEAD";
/// The subject of [`DEAD_LETTER_STREAM`]: the envelope as the edge published it.
pub const DEAD_LETTER_SUBJECT: &str = "tcpc.dead";
/// Header of a dead letter: why it was not delivered.
pub const DEAD_LETTER_REASON_HEADER: &str = "Tcpc-Dead-Reason";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_fnv1a() {
        // FNV-1a 32 of "a" is 0xe40c292c; pinned so that a change of hash is noticed.
        assert_eq!(partition_of("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_of("device", 1), 0);
        assert!(partition_of("6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10", 16) < 16);
        assert_eq!(partition_of("x", 0), 0, "zero partitions is treated as one");
    }

    #[test]
    fn names() {
        assert_eq!(uplink_subject(3), "tcpc.up.3");
        assert_eq!(uplink_message_id("c1", 7), "c1-7");
        assert_eq!(route_key("d"), "tcpc:route:d");
        assert_eq!(pod_liveness_key("edge-0"), "tcpc:pod:edge-0");
        assert_eq!(partition_lease_key(3), "tcpc:lease:{3}");
        assert_eq!(partition_consumer(3, 7), "tcpc-p3-g7");
    }

    #[test]
    fn a_partitions_keys_share_a_redis_cluster_slot() {
        // TAKE_LEASE touches the lease and the generation in one script: on a Redis
        // Cluster both must hash to one slot, which the partition in braces does.
        use redis::cluster_routing::Slot;
        for partition in [0, 7, 15, 1000] {
            let slot = Slot::for_key(partition_lease_key(partition));
            assert_eq!(Slot::for_key(partition_generation_key(partition)), slot);
            assert_eq!(Slot::for_key(partition_resume_key(partition)), slot);
        }
    }

    #[test]
    fn partition_consumers_are_told_apart() {
        assert!(is_partition_consumer(&partition_consumer(1, 7), 1));
        assert!(is_partition_consumer("tcpc-p1", 1), "the consumer before generations");
        assert!(!is_partition_consumer(&partition_consumer(10, 7), 1), "partition 10 is not 1");
        assert!(!is_partition_consumer("tcpc-p10", 1));
        assert!(!is_partition_consumer("tcpc-p1-g", 1));
        assert!(!is_partition_consumer("tcpc-p1-gx", 1));
        assert!(!is_partition_consumer("other", 1));
    }
}
