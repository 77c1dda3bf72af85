//! Consuming the uplink stream with any number of workers, each device in order.
//!
//! The stream is cut into partitions by device (`tcpc.up.<p>`); each partition has one
//! durable consumer and is owned by one worker at a time, through a Redis lease:
//!
//! - Workers announce themselves in a sorted set (expiring in 6 s unless renewed every
//!   2 s). Partition `p` belongs to the `p mod n`-th live worker in name order; each
//!   worker takes the leases of its partitions (`SET NX PX`), renews them, and lets go
//!   of partitions that now belong to another (the other waits for the release or the
//!   expiry). A worker that cannot renew a lease stops consuming that partition.
//! - Inside a partition, envelopes are handled in stream order: a batch's messages are
//!   handed to the platform sink in order (one MQTT connection keeps that order), and
//!   the batch is acknowledged (AckPolicy::All, one ack for the batch) only after the
//!   broker acknowledged every message. A failure retries the batch: at-least-once.
//! - On taking a partition over, its consumer is recreated to start right after its
//!   ack floor: whatever the previous owner had fetched but not acknowledged is
//!   delivered again first, in stream order, so per-device order holds across a
//!   failover; messages that had been published but not acknowledged are published
//!   twice (duplicates, never gaps or reordering).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use redis::aio::ConnectionManager;
use tcpc_proto::backoff::Backoff;
use tcpc_proto::names;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::pipeline::{HandleError, Pipeline};

/// How often membership and leases are renewed.
const TICK: Duration = Duration::from_secs(2);
/// How long a membership or a lease lives without renewal.
const LEASE: Duration = Duration::from_secs(6);
/// How soon a worker tries again for a partition another worker is handing over.
const HAND_OVER_POLL: Duration = Duration::from_millis(200);
/// Envelopes fetched per batch.
const BATCH: usize = 256;

/// Takes the lease or renews ours; 1 if we hold it. `KEYS[1]`: the lease; `ARGV`: worker, ms.
const TAKE_LEASE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"#;
/// Renews this worker's membership on Redis's clock (one clock decides who is alive,
/// not each worker's), drops expired members, and lists the live ones. `KEYS[1]`: the
/// workers' sorted set; `ARGV`: worker, ms.
const MEMBERSHIP: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;
/// Releases the lease if it is ours. `KEYS[1]`: the lease; `ARGV[1]`: the worker.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// This process's identity in leases and membership: the worker's name and a nonce
/// drawn at start. Two processes started with the same POD_NAME (a restart racing the
/// old pod, a copy-pasted manifest) are two members and never share a lease.
pub fn boot_identity(worker: &str) -> String {
    format!("{worker}#{:08x}", rand::random::<u32>())
}

/// How much of a lease this worker does not count on: the renewal's round trip and
/// the drift between its clock and Redis's.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Until when this worker may act for a partition: the last successful renewal's send
/// time plus the lease, less a margin, on this process's monotonic clock. The consumer
/// checks it before each fetch, publish and ack: a worker paused past its lease
/// (SIGSTOP, a stalled VM) must not act for a partition another worker may own by now —
/// the lease loop that would notice runs no sooner than the consumer on resume.
#[derive(Clone)]
pub struct Lease {
    /// Milliseconds from `epoch`.
    until: Arc<AtomicU64>,
    epoch: Instant,
}

impl Lease {
    fn new() -> Self {
        Lease { until: Arc::default(), epoch: Instant::now() }
    }

    /// The lease was renewed by a call sent at `sent`.
    fn renewed(&self, sent: Instant) {
        let until = (sent + LEASE).saturating_duration_since(self.epoch).saturating_sub(LEASE_MARGIN);
        self.until.store(until.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the partition is still ours for sure.
    fn is_held(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.until.load(Ordering::Relaxed)
    }
}

/// The partitions a worker owns, for whoever needs to know (the downlinks).
pub type OwnedPartitions = Arc<std::sync::RwLock<std::collections::HashSet<u32>>>;

/// The partition owner.
pub struct Partitions {
    pub jetstream: jetstream::Context,
    pub redis: ConnectionManager,
    /// Who holds the leases: [`boot_identity`].
    pub worker: String,
    pub partitions: u32,
    pub pipeline: Arc<Pipeline>,
    /// Kept equal to the partitions consumed here.
    pub owned: OwnedPartitions,
}

struct Owned {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    lease: Lease,
}

impl Partitions {
    /// Owns and consumes partitions until `shutdown`, then lets them go.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut owned: HashMap<u32, Owned> = HashMap::new();
        // The first round at once; then every TICK, or sooner while a partition that is
        // ours is still held by its previous owner (so that a hand-over leaves it
        // without a consumer, and its downlinks without a handler, as briefly as can be).
        let mut next_round = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(next_round) => {}
            }
            next_round = TICK;
            owned.retain(|partition, o| {
                let alive = !o.task.is_finished();
                if !alive {
                    warn!(partition, "partition consumer ended; taking it again");
                }
                alive
            });
            let desired = match tokio::time::timeout(TICK, this.membership()).await {
                Ok(Ok(desired)) => desired,
                Err(_) => {
                    warn!("membership not renewed in time; keeping the partitions held");
                    continue;
                }
                Ok(Err(error)) => {
                    warn!(%error, "membership not renewed; keeping the partitions held");
                    continue;
                }
            };
            // Every lease of ours renewed (or taken) in one round trip, first: a round
            // never outlives a lease because of how many partitions it holds, nor
            // because of a hand-over below.
            let sent = Instant::now();
            let held = match tokio::time::timeout(TICK, this.take_leases(&desired)).await {
                Ok(Ok(held)) => held,
                Ok(Err(error)) => {
                    warn!(%error, "leases not renewed");
                    vec![false; desired.len()]
                }
                Err(_) => {
                    warn!("leases not renewed in time");
                    vec![false; desired.len()]
                }
            };
            for (&partition, held) in desired.iter().zip(held) {
                match (held, owned.contains_key(&partition)) {
                    (true, false) => {
                        let (stop, lease) = (shutdown.child_token(), Lease::new());
                        lease.renewed(sent);
                        let task = tokio::spawn(this.clone().consume(partition, stop.clone(), lease.clone()));
                        owned.insert(partition, Owned { stop, task, lease });
                        this.set_owned(partition, true);
                        info!(partition, "partition taken");
                    }
                    (true, true) => owned[&partition].lease.renewed(sent),
                    (false, false) => next_round = HAND_OVER_POLL,
                    (false, true) => {
                        warn!(partition, "partition lease lost; stopping its consumer");
                        this.pipeline.metrics.partitions_lost.inc();
                        this.set_owned(partition, false);
                        let lost = owned.remove(&partition).expect("held");
                        lost.stop.cancel();
                        lost.task.abort();
                    }
                }
            }
            // Partitions that now belong to another worker, let go of together.
            let leaving: Vec<u32> = owned.keys().copied().filter(|p| !desired.contains(p)).collect();
            let releases = leaving.into_iter().map(|partition| {
                this.set_owned(partition, false);
                this.release(partition, owned.remove(&partition).expect("held"))
            });
            futures::future::join_all(releases).await;
            this.pipeline.metrics.lease_rounds.inc();
            this.pipeline.metrics.partitions.set(owned.len() as i64);
        }
        this.owned.write().unwrap_or_else(|e| e.into_inner()).clear();
        let tracker = TaskTracker::new();
        for (partition, held) in owned.drain() {
            let this = this.clone();
            tracker.spawn(async move { this.release(partition, held).await });
        }
        tracker.close();
        tracker.wait().await;
        let mut redis = this.redis.clone();
        let _ =
            redis::cmd("ZREM").arg(names::WORKERS_KEY).arg(&this.worker).query_async::<()>(&mut redis).await;
    }

    /// Renews our membership; the partitions that are ours among the live workers.
    async fn membership(&self) -> Result<Vec<u32>, redis::RedisError> {
        let mut redis = self.redis.clone();
        let script = redis::Script::new(MEMBERSHIP);
        let mut invocation = script.key(names::WORKERS_KEY);
        invocation.arg(&self.worker).arg(LEASE.as_millis() as u64);
        let mut members: Vec<String> = invocation.invoke_async(&mut redis).await?;
        members.sort();
        let Some(index) = members.iter().position(|m| *m == self.worker) else { return Ok(Vec::new()) };
        let count = members.len() as u32;
        Ok((0..self.partitions).filter(|p| p % count == index as u32).collect())
    }

    /// Takes or renews the leases of `partitions` in one round trip (one single-key
    /// script each, so that each runs in its key's slot on a Redis Cluster); whether
    /// each is ours.
    async fn take_leases(&self, partitions: &[u32]) -> Result<Vec<bool>, redis::RedisError> {
        let mut pipe = redis::pipe();
        for &partition in partitions {
            pipe.cmd("EVAL")
                .arg(TAKE_LEASE)
                .arg(1)
                .arg(names::partition_lease_key(partition))
                .arg(&self.worker)
                .arg(LEASE.as_millis() as u64);
        }
        let held: Vec<i64> = pipe.query_async(&mut self.redis.clone()).await?;
        Ok(held.into_iter().map(|held| held == 1).collect())
    }

    /// Keeps the shared set of owned partitions exact: a partition leaves it before its
    /// lease is let go and joins it once the lease is held, so that two workers never
    /// both count it as theirs.
    fn set_owned(&self, partition: u32, owned: bool) {
        let mut set = self.owned.write().unwrap_or_else(|e| e.into_inner());
        if owned {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }

    async fn release(&self, partition: u32, held: Owned) {
        held.stop.cancel();
        // The consumer finishes the batch under way (published and acknowledged) and
        // stops; within TICK, so that a JetStream call that hangs does not hold the
        // whole lease loop (which must keep renewing the other leases) nor a shutdown.
        let mut task = held.task;
        if tokio::time::timeout(TICK, &mut task).await.is_err() {
            warn!(partition, "partition consumer slow to stop; aborting it");
            task.abort();
        }
        let mut redis = self.redis.clone();
        let script = redis::Script::new(RELEASE_LEASE);
        let mut invocation = script.key(names::partition_lease_key(partition));
        invocation.arg(&self.worker);
        let _ = invocation.invoke_async::<i64>(&mut redis).await;
        info!(partition, "partition released");
    }

    /// The partition's consumer, recreated to start after its ack floor.
    async fn take_over(&self, partition: u32) -> Result<consumer::PullConsumer, String> {
        // Whichever starts first, edge or worker, creates the stream.
        let stream = tcpc_proto::stream::ensure_uplink_stream(&self.jetstream).await?;
        let name = names::partition_consumer(partition);
        let deliver_policy = match stream.consumer_info(&name).await {
            Ok(info) => {
                stream.delete_consumer(&name).await.map_err(|e| e.to_string())?;
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence + 1,
                }
            }
            Err(_) => consumer::DeliverPolicy::All,
        };
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: names::uplink_subject(partition),
                deliver_policy,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn consume(self: Arc<Self>, partition: u32, stop: CancellationToken, lease: Lease) {
        let expired = || {
            let expired = !lease.is_held();
            if expired {
                warn!(partition, "partition lease not renewed in time; stopping without acting on it");
            }
            expired
        };
        let mut backoff = Backoff::new(TICK, Duration::from_secs(10));
        let consumer = loop {
            let taken = tokio::select! {
                _ = stop.cancelled() => return,
                taken = self.take_over(partition) => taken,
            };
            match taken {
                Ok(consumer) => break consumer,
                Err(error) => {
                    let retry_in = backoff.next_delay();
                    warn!(partition, %error, ?retry_in, "partition consumer not ready; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                }
            }
        };
        let mut fetch_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        while !stop.is_cancelled() {
            if expired() {
                return;
            }
            let fetched = tokio::select! {
                _ = stop.cancelled() => return,
                fetched = consumer.fetch().max_messages(BATCH).expires(Duration::from_millis(500)).messages() => fetched,
            };
            let mut batch = match fetched {
                Ok(batch) => {
                    fetch_backoff.reset();
                    batch
                }
                Err(error) => {
                    let retry_in = fetch_backoff.next_delay();
                    warn!(partition, %error, ?retry_in, "fetch failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                    continue;
                }
            };
            let mut messages = Vec::new();
            while let Some(message) = batch.next().await {
                match message {
                    Ok(message) => messages.push(message),
                    Err(error) => {
                        warn!(partition, %error, "fetch interrupted");
                        break;
                    }
                }
            }
            let Some(last) = messages.last() else { continue };
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            // Retry the batch until the platform took all of it: nothing is acked before.
            // Only transient failures come back here (permanent ones were dead-lettered).
            loop {
                // A batch under way is finished and acknowledged even when asked to
                // stop (shutdown, hand-over): what the platform already has must not
                // come again from the next owner. The caller bounds the wait (see
                // `release`) and aborts past it; a lost lease aborts at once.
                match self.handle_batch(&messages, &expired).await {
                    // Unacknowledged: whoever holds the lease now takes the batch again.
                    Ok(()) if expired() => return,
                    Ok(()) => {
                        if let Err(error) = last.ack().await {
                            warn!(partition, %error, "batch ack not sent; it will be redelivered");
                        }
                        break;
                    }
                    Err(HandleError::LeaseExpired) => return,
                    Err(error) if stop.is_cancelled() => {
                        // Not retried when stopping: unacknowledged, the next owner takes it.
                        warn!(partition, %error, "batch not delivered while stopping");
                        return;
                    }
                    Err(error) => {
                        let retry_in = backoff.next_delay();
                        self.pipeline.metrics.retries.inc();
                        warn!(partition, %error, ?retry_in, "batch not delivered to the platform");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(retry_in) => {}
                        }
                    }
                }
            }
        }
    }

    /// Hands a batch to the pipeline, message by message while the lease is held;
    /// resolves when the platform took all of it.
    async fn handle_batch(
        &self,
        messages: &[jetstream::Message],
        expired: &impl Fn() -> bool,
    ) -> Result<(), HandleError> {
        let mut handled = Vec::with_capacity(messages.len());
        for message in messages {
            if expired() {
                return Err(HandleError::LeaseExpired);
            }
            handled.push(self.pipeline.handle(message.payload.clone()).await?);
        }
        futures::future::try_join_all(handled).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_counted_on_from_the_renewal_sent_less_a_margin() {
        let lease = Lease::new();
        assert!(!lease.is_held(), "not before a renewal");
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(300)).await;
        lease.renewed(sent);
        assert!(lease.is_held());
        // From the send, not the answer: LEASE - LEASE_MARGIN after `sent`.
        tokio::time::advance(LEASE - LEASE_MARGIN - Duration::from_millis(301)).await;
        assert!(lease.is_held());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!lease.is_held(), "a stalled worker stops before the lease can have expired");
        lease.renewed(Instant::now());
        assert!(lease.is_held(), "renewed again");
    }
}
