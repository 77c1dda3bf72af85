//! Consuming the uplink stream with any number of workers, each device in order.
//!
//! The stream is cut into partitions by device (`tcpc.up.<p>`); each partition has one
//! durable consumer and is owned by one worker at a time, through a Redis lease:
//!
//! - Workers announce themselves in a sorted set (expiring in 6 s unless renewed every
//!   2 s). Partition `p` belongs to the `p mod n`-th live worker in name order; each
//!   worker takes the leases of its partitions (`SET NX PX`), renews them, and lets go
//!   of partitions that now belong to another (the other waits for the release or the
//!   expiry). A worker that cannot renew a lease stops consuming that partition once
//!   the lease could have expired.
//! - Inside a partition, envelopes are handled in stream order ([`deliver`]): pulled
//!   continuously, handed to the platform sink in order (one MQTT connection keeps that
//!   order) while earlier ones await the broker's acknowledgement, and acknowledged
//!   (AckPolicy::All, one ack for many) only once the broker acknowledged every one up
//!   to it. A failure hands the unacknowledged ones again, in order: at-least-once.
//! - Each take of a lease raises the partition's generation; the taker consumes
//!   through a consumer of its own, named by that generation, created to start right
//!   after the previous consumer's ack floor and only then is the previous one deleted.
//!   Whatever the previous owner had fetched but not acknowledged is delivered again
//!   first, in stream order, so per-device order holds across a failover; messages that
//!   had been published but not acknowledged are published twice (duplicates, never
//!   gaps or reordering). A stale owner's late ack (AckPolicy::All) lands on its own
//!   consumer, never on the successor's. If the previous consumer is gone, the
//!   successor resumes after the last envelope delivered to the platform (kept in
//!   Redis per partition); only a partition that never had one starts from the
//!   beginning of the stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tcpc_proto::backoff::Backoff;
use tcpc_proto::connect::{Batch, Lua, RedisConnection};
use tcpc_proto::names;
use tcpc_proto::stream::{StreamCheck, StreamError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::pipeline::Pipeline;
use crate::reorder::{self, Reorder};
use deliver::Delivery;

mod deliver;

/// How often membership and leases are renewed.
const TICK: Duration = Duration::from_secs(2);
/// How long a membership or a lease lives without renewal.
const LEASE: Duration = Duration::from_secs(6);
/// How soon a worker tries again for a partition another worker is handing over.
const HAND_OVER_POLL: Duration = Duration::from_millis(200);

/// Takes the lease (a new generation) or renews ours; the generation we hold, 0 if
/// none. A generation gone while its lease is held (evicted, deleted) is replaced by a
/// new one, which the holder takes as a new take: renewing with none would keep a
/// lease nobody consumes under. A new generation is above the last one and not below
/// Redis's clock in ms: a replica promoted in a failover may not have the last take
/// (replication is asynchronous), and counting on from what it has would hand out a
/// generation again, two owners sharing one consumer. `KEYS`: the lease, its
/// generation; `ARGV`: worker, ms.
const TAKE_LEASE: &str = r#"
local function new_generation()
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local generation = string.format('%d', math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, now))
  redis.call('SET', KEYS[2], generation)
  return tonumber(generation)
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return new_generation() end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2])) or new_generation()
end
return 0
"#;
/// [`TAKE_LEASE`], as batches send it (by digest).
static TAKE_LEASE_SCRIPT: std::sync::LazyLock<Lua> = std::sync::LazyLock::new(|| Lua::new(TAKE_LEASE));
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
/// checks it before it hands an envelope on and before each ack: a worker paused past its lease
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

    /// When the partition stops being ours for sure, unless renewed before.
    fn lapses_at(&self) -> Instant {
        self.epoch + Duration::from_millis(self.until.load(Ordering::Relaxed))
    }
}

/// The partitions a worker owns, each with its lease, for whoever needs to know (the
/// downlinks). A partition leaves it before its lease is let go and joins it once the
/// lease is held, so that two workers never both count it as theirs.
#[derive(Clone, Default)]
pub struct OwnedPartitions(Arc<std::sync::RwLock<HashMap<u32, Lease>>>);

impl OwnedPartitions {
    /// Whether `partition` is this worker's now: taken, and its lease still held for
    /// sure (a lease that lapsed here, the worker frozen or cut off from Redis, may be
    /// another worker's already, before the lease loop notices).
    pub fn holds(&self, partition: u32) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(&partition).is_some_and(Lease::is_held)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Lease>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The partition owner.
pub struct Partitions {
    pub jetstream: jetstream::Context,
    /// The uplink stream as this worker creates it.
    pub stream: StreamCheck,
    pub redis: RedisConnection,
    /// Who holds the leases: [`boot_identity`].
    pub worker: String,
    pub partitions: u32,
    pub pipeline: Arc<Pipeline>,
    /// Kept equal to the partitions consumed here.
    pub owned: OwnedPartitions,
    pub kept_order: KeptOrder,
}

/// Each partition's reorder between its deliveries under one lease generation: a
/// delivery that ends (its NATS connection lost, deliveries lost in transit) leaves what
/// it held unacknowledged, and the next one, after the partition is taken again, must
/// hold it again behind the same gaps. Under another generation (another worker may
/// have delivered meanwhile) the partition starts afresh.
#[derive(Default)]
pub struct KeptOrder(std::sync::Mutex<HashMap<u32, (u64, Reorder<deliver::Undelivered>)>>);

impl KeptOrder {
    fn take(&self, partition: u32, generation: u64) -> Reorder<deliver::Undelivered> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&partition) {
            Some((kept, reorder)) if kept == generation => reorder,
            _ => Reorder::new(reorder::HOLD),
        }
    }

    fn keep(&self, partition: u32, generation: u64, mut reorder: Reorder<deliver::Undelivered>) {
        reorder.drop_held();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(partition, (generation, reorder));
    }
}

struct Owned {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    lease: Lease,
    /// The lease generation this consumer was started for.
    generation: u64,
    /// Envelopes of the partition not yet delivered to its consumer (kept by the
    /// consumer's task, see [`keep_pending`]).
    pending: Arc<AtomicU64>,
}

/// Why a partition's consumer could not be taken over; retried with back-off.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("ensure the uplink stream: {0}")]
    Stream(#[source] StreamError),
    #[error("list the partition's consumers: {0}")]
    ListConsumers(#[source] jetstream::stream::ConsumersError),
    #[error("read the partition's resume point: {0}")]
    ResumePoint(#[source] redis::RedisError),
    #[error("read the uplink stream's state: {0}")]
    StreamInfo(#[source] jetstream::stream::InfoError),
    #[error("open this generation's consumer: {0}")]
    OpenConsumer(#[source] async_nats::Error),
    #[error("create the partition's consumer: {0}")]
    CreateConsumer(#[source] jetstream::stream::ConsumerError),
    #[error("delete the previous consumer {name}: {source}")]
    DeleteConsumer {
        name: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
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
                    // Its downlinks too are no longer this worker's (its lease may have
                    // lapsed, and another worker hold it): kept for a hand-over until
                    // it is taken again, below if its lease is still ours.
                    warn!(partition, "partition consumer ended; taking it again");
                    this.owned.write().remove(partition);
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
            // A partition whose lease Redis did not answer for (down, slow, its Redis
            // Cluster node failing over) is neither renewed nor given up: its consumer
            // goes on while the lease it holds cannot have expired (`Lease::is_held`) and
            // stops by itself past that; those whose node answered are unaffected.
            let sent = Instant::now();
            let held: Vec<Option<Option<u64>>> =
                match tokio::time::timeout(TICK, this.take_leases(&desired)).await {
                    Ok(answers) => {
                        let failed = answers.iter().filter(|answer| answer.is_err()).count();
                        if let Some(Err(error)) = answers.iter().find(|answer| answer.is_err()) {
                            warn!(%error, partitions = failed, "leases not renewed");
                        }
                        answers.into_iter().map(Result::ok).collect()
                    }
                    Err(_) => {
                        warn!("leases not renewed in time");
                        vec![None; desired.len()]
                    }
                };
            for (&partition, answer) in desired.iter().zip(held) {
                let Some(generation) = answer else { continue };
                if let Some(current) = owned.get(&partition) {
                    if Some(current.generation) == generation {
                        current.lease.renewed(sent);
                        continue;
                    }
                    // Lost, or lapsed and taken again (another worker may have owned it
                    // in between): either way this consumer's generation is over.
                    warn!(partition, "partition lease lost; stopping its consumer");
                    this.pipeline.metrics.partitions_lost.inc();
                    this.owned.write().remove(&partition);
                    let lost = owned.remove(&partition).expect("held");
                    lost.stop.cancel();
                    lost.task.abort();
                }
                let Some(generation) = generation else {
                    next_round = HAND_OVER_POLL;
                    continue;
                };
                let (stop, lease) = (shutdown.child_token(), Lease::new());
                lease.renewed(sent);
                let pending = Arc::new(AtomicU64::new(0));
                let task = tokio::spawn(this.clone().consume(
                    partition,
                    generation,
                    stop.clone(),
                    lease.clone(),
                    pending.clone(),
                ));
                this.owned.write().insert(partition, lease.clone());
                owned.insert(partition, Owned { stop, task, lease, generation, pending });
                info!(partition, generation, "partition taken");
            }
            // Owned first, replayed after: a downlink of a partition taken (or whose
            // lease, lapsed here, was renewed) is then either handled as ours or replayed
            // here (`Downlinks::keep_unless_owned`).
            this.pipeline.mapper.downlinks.replay_hand_over();
            // Partitions that now belong to another worker, let go of together.
            let leaving: Vec<u32> = owned.keys().copied().filter(|p| !desired.contains(p)).collect();
            let releases = leaving.into_iter().map(|partition| {
                this.owned.write().remove(&partition);
                this.release(partition, owned.remove(&partition).expect("held"))
            });
            futures::future::join_all(releases).await;
            this.pipeline.metrics.lease_rounds.inc();
            this.pipeline.metrics.partitions.set(owned.len() as i64);
            let pending: u64 = owned.values().map(|held| held.pending.load(Ordering::Relaxed)).sum();
            this.pipeline.metrics.uplink_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        this.owned.write().clear();
        this.pipeline.metrics.uplink_pending.set(0);
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

    /// Takes or renews the leases of `partitions` in one round trip (one script per
    /// partition, whose keys share a slot, so that each runs in it on a Redis Cluster,
    /// where the batch is one pipeline per slot, sent at once); for each, the generation
    /// if it is ours, or the failure to learn it.
    async fn take_leases(&self, partitions: &[u32]) -> Vec<Result<Option<u64>, redis::RedisError>> {
        let mut batch = Batch::new();
        for &partition in partitions {
            let keys = [names::partition_lease_key(partition), names::partition_generation_key(partition)];
            batch.script(&TAKE_LEASE_SCRIPT, &keys).arg(&self.worker).arg(LEASE.as_millis() as u64);
        }
        // Half a round per node: the round goes on with the nodes that answered.
        let held: Vec<Result<u64, _>> = batch.query_each(&self.redis, TICK / 2).await;
        held.into_iter()
            .map(|generation| generation.map(|generation| (generation > 0).then_some(generation)))
            .collect()
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

    /// This generation's consumer of the partition, created to start after the previous
    /// consumers' ack floor, and then the previous ones deleted. A retry after a failure
    /// half-way finds its own consumer and goes on from there, unless that consumer has
    /// deliveries not acknowledged (a delivery that ended: its lease lapsed locally,
    /// its pull ended, deliveries were lost in transit): those would come again only
    /// after `ack_wait`, behind newer ones whose ack (AckPolicy::All) would cover them
    /// unseen, so the consumer is made again to start right after its ack floor.
    async fn take_over(
        &self,
        partition: u32,
        generation: u64,
    ) -> Result<consumer::PullConsumer, TakeOverError> {
        // Whichever starts first, edge or worker, creates the stream.
        let mut stream = self.stream.ensure(&self.jetstream).await.map_err(TakeOverError::Stream)?;
        let name = names::partition_consumer(partition, generation);
        let mut previous = Vec::new();
        let mut ours = None;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(TakeOverError::ListConsumers)?;
            if info.name == name {
                ours = Some(info);
            } else if names::is_partition_consumer(&info.name, partition) {
                previous.push(info);
            }
        }
        let consumer = if let Some(ours) = ours.as_ref().filter(|ours| ours.num_ack_pending == 0) {
            stream.get_consumer(&ours.name).await.map_err(TakeOverError::OpenConsumer)?
        } else {
            if let Some(ours) = ours {
                warn!(
                    partition,
                    unacknowledged = ours.num_ack_pending,
                    "partition consumer restarted with deliveries not acknowledged; starting again after its ack floor"
                );
                stream
                    .delete_consumer(&ours.name)
                    .await
                    .map_err(|source| TakeOverError::DeleteConsumer { name: ours.name.clone(), source })?;
                previous.push(ours);
            }
            // Every acknowledged envelope was delivered, whichever consumer it was
            // acknowledged on: after the highest floor is where nothing is skipped.
            let floor = previous.iter().map(|info| info.ack_floor.stream_sequence).max();
            let deliver_policy = match floor {
                Some(floor) => consumer::DeliverPolicy::ByStartSequence { start_sequence: floor + 1 },
                None => self.resume_point(partition, &mut stream).await?,
            };
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: names::uplink_subject(partition),
                    deliver_policy,
                    ack_policy: consumer::AckPolicy::All,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 10_000,
                    ..Default::default()
                })
                .await
                .map_err(TakeOverError::CreateConsumer)?
        };
        for info in previous.iter().filter(|info| info.name != name) {
            stream
                .delete_consumer(&info.name)
                .await
                .map_err(|source| TakeOverError::DeleteConsumer { name: info.name.clone(), source })?;
        }
        Ok(consumer)
    }

    /// Where a partition without a consumer starts: after the last envelope delivered
    /// to the platform, as recorded in Redis; from the beginning of the stream if none
    /// was ever recorded (a partition never consumed) or if the record is past the
    /// stream's end (the stream was recreated: nothing in it was delivered).
    async fn resume_point(
        &self,
        partition: u32,
        stream: &mut jetstream::stream::Stream,
    ) -> Result<consumer::DeliverPolicy, TakeOverError> {
        let delivered: Option<u64> =
            redis::AsyncCommands::get(&mut self.redis.clone(), names::partition_resume_key(partition))
                .await
                .map_err(TakeOverError::ResumePoint)?;
        let Some(delivered) = delivered else { return Ok(consumer::DeliverPolicy::All) };
        let last = stream.info().await.map_err(TakeOverError::StreamInfo)?.state.last_sequence;
        if delivered > last {
            warn!(partition, delivered, last, "resume point past the stream's end; the stream was recreated");
            return Ok(consumer::DeliverPolicy::All);
        }
        warn!(partition, delivered, "partition consumer gone; resuming after the last delivered envelope");
        Ok(consumer::DeliverPolicy::ByStartSequence { start_sequence: delivered + 1 })
    }

    /// Records that the partition's envelopes up to `sequence` were delivered. Any value
    /// recorded, even a stale owner's, is one that was delivered, so a successor starting
    /// after it never skips; a lost write only costs duplicates.
    async fn record_delivered(&self, partition: u32, sequence: u64) {
        let recorded: redis::RedisResult<()> = redis::AsyncCommands::set(
            &mut self.redis.clone(),
            names::partition_resume_key(partition),
            sequence,
        )
        .await;
        if let Err(error) = recorded {
            warn!(partition, %error, "resume point not recorded");
        }
    }

    /// Takes the partition over and delivers its envelopes until `stop` (or the lease
    /// lapses), keeping `pending` at its consumer's backlog meanwhile.
    async fn consume(
        self: Arc<Self>,
        partition: u32,
        generation: u64,
        stop: CancellationToken,
        lease: Lease,
        pending: Arc<AtomicU64>,
    ) {
        let Some(consumer) = self.consumer(partition, generation, &stop).await else { return };
        let mut reorder = self.kept_order.take(partition, generation);
        // Beside the delivery, not in its loop: a batch retried while the broker is
        // down is when the backlog grows, and must still be seen.
        tokio::select! {
            () = Delivery::new(&self, partition, &lease, &mut reorder).run(&consumer, &stop) => {}
            () = keep_pending(partition, &consumer, &pending) => {}
        }
        self.kept_order.keep(partition, generation, reorder);
        pending.store(0, Ordering::Relaxed);
    }

    /// This generation's consumer of the partition, retried with back-off until `stop`.
    async fn consumer(
        &self,
        partition: u32,
        generation: u64,
        stop: &CancellationToken,
    ) -> Option<consumer::PullConsumer> {
        let backoff = Backoff::new(TICK, Duration::from_secs(10));
        retry_until_stopped(partition, "partition consumer not ready", backoff, stop, || {
            self.take_over(partition, generation)
        })
        .await
    }
}

/// What `attempt` gives once it succeeds, tried again after each failure (logged as
/// `what`) with `backoff`; None once `stop` is cancelled.
async fn retry_until_stopped<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    partition: u32,
    what: &'static str,
    mut backoff: Backoff,
    stop: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        match outcome {
            Ok(value) => return Some(value),
            Err(error) => {
                let retry_in = backoff.next_delay();
                warn!(partition, %error, ?retry_in, "{what}; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
}

/// How often a partition's backlog is asked of JetStream.
const PENDING_REFRESH: Duration = Duration::from_secs(5);

/// Keeps `pending` at the consumer's undelivered envelopes, asking every
/// [`PENDING_REFRESH`]; never ends.
async fn keep_pending(partition: u32, consumer: &consumer::PullConsumer, pending: &AtomicU64) {
    loop {
        match consumer.get_info().await {
            Ok(info) => pending.store(info.num_pending, Ordering::Relaxed),
            Err(error) => tracing::debug!(partition, %error, "partition backlog not read"),
        }
        tokio::time::sleep(PENDING_REFRESH).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_partition_is_held_for_downlinks_only_while_its_lease_is() {
        let owned = OwnedPartitions::default();
        let lease = Lease::new();
        lease.renewed(Instant::now());
        owned.write().insert(3, lease.clone());
        assert!(owned.holds(3));
        assert!(!owned.holds(4), "not taken");
        tokio::time::advance(LEASE - LEASE_MARGIN).await;
        assert!(!owned.holds(3), "lapsed here: another worker's, perhaps, before the lease loop knows");
        lease.renewed(Instant::now());
        assert!(owned.holds(3), "renewed");
        owned.write().remove(&3);
        assert!(!owned.holds(3), "let go");
    }
}
