//! Devices from the platform, cached so that the platform is asked rarely.
//!
//! - Configs are cached in memory and in Redis (shared by every worker), positive ones
//!   for an hour, unknown tokens for 30 s, each up to a tenth less by its digest (so
//!   that the configs fetched in a mass reconnect do not all expire together, and every
//!   worker agrees on when one does); `device/disconnect` drops a device's entry.
//! - The platform allows one call per voucher per 3 s: calls are single-flight per
//!   voucher in a worker, and across workers a Redis key taken with `SET NX PX 3000`
//!   admits one caller per voucher per 3 s.
//! - When the platform is down, calls back off (1 s doubling to 30 s) and known
//!   devices keep authenticating from their (stale) cached config.
//! - A known device's config past its TTL is served as it is while it is asked again
//!   behind the caller (once per device at a time): the hourly refresh never holds up
//!   the partition whose message needed it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tcpc_proto::backoff::Backoff;
use tcpc_proto::connect::{Batch, RedisConnection};
use tcpc_proto::names;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::client::{ConfigQuery, PlatformClient, PlatformError};
use super::voucher;
use crate::devices::Device;
use crate::source::{DeviceSource, Lookup, SourceError, Target};

/// How long a known device's config is used without asking again.
const POSITIVE_TTL: Duration = Duration::from_secs(3600);
/// How long an unknown token stays unknown without asking again.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Cached entries beyond which unknown tokens are forgotten.
const MAX_CACHED: usize = 100_000;
/// The platform's per-voucher rate limit.
const PER_VOUCHER: Duration = Duration::from_secs(3);
/// Longest back-off while the platform is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the shared cache is looked at while another worker asks the platform.
const SHARED_POLL: Duration = Duration::from_millis(50);

/// Deadline of each Redis call: the cache must never hold up authentication long.
const REDIS_DEADLINE: Duration = Duration::from_millis(500);

/// What Redis holds per voucher digest.
#[derive(Serialize, Deserialize)]
struct Shared {
    device: Option<Device>,
    fetched_ms: i64,
}

#[derive(Clone)]
struct Cached {
    device: Option<Arc<Device>>,
    fetched: Instant,
}

/// How long the entry of `digest` is used without asking again: its kind's TTL less up
/// to a tenth, spread by the digest (a hash, so spread evenly).
fn fresh_for(known: bool, digest: &str) -> Duration {
    let ttl = if known { POSITIVE_TTL } else { NEGATIVE_TTL };
    let spread = (ttl / 10).as_millis() as u64;
    let hash = u64::from_str_radix(digest.get(..12).unwrap_or(digest), 16).unwrap_or_default();
    ttl - Duration::from_millis(hash % spread)
}

impl Cached {
    fn is_fresh(&self, digest: &str) -> bool {
        self.fetched.elapsed() < fresh_for(self.device.is_some(), digest)
    }

    fn lookup(&self) -> Lookup {
        match &self.device {
            Some(device) => Lookup::Found(device.clone()),
            None => Lookup::Unknown("unknown access token".to_owned()),
        }
    }
}

#[derive(Default)]
struct Memory {
    by_digest: HashMap<String, Cached>,
    digest_of_id: HashMap<String, String>,
    /// Downlink targets (device and sub-device ids and numbers) of cached devices.
    targets: HashMap<String, Target>,
    last_call: HashMap<String, Instant>,
}

struct Outage {
    until: Option<Instant>,
    backoff: Backoff,
}

/// The platform as a device source.
pub struct PlatformDevices {
    /// Itself, for refreshes that outlive the lookup that started them.
    me: Weak<PlatformDevices>,
    client: PlatformClient,
    redis: Option<RedisConnection>,
    /// Digests being refreshed behind their callers.
    refreshing: Mutex<HashSet<String>>,
    memory: Mutex<Memory>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    outage: Mutex<Outage>,
}

impl PlatformDevices {
    /// Without `redis` the caches and the rate gate are this process's only.
    pub fn new(client: PlatformClient, redis: Option<RedisConnection>) -> Arc<Self> {
        Arc::new_cyclic(|me| PlatformDevices {
            me: me.clone(),
            client,
            redis,
            refreshing: Mutex::default(),
            memory: Mutex::default(),
            flights: Mutex::default(),
            outage: Mutex::new(Outage {
                until: None,
                backoff: Backoff::new(Duration::from_secs(1), MAX_BACKOFF),
            }),
        })
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, digest: &str) -> Option<Cached> {
        self.memory().by_digest.get(digest).cloned()
    }

    fn remember(&self, digest: &str, device: Option<Arc<Device>>, fetched: Instant) {
        let mut memory = self.memory();
        match &device {
            Some(device) => {
                memory.digest_of_id.insert(device.id.clone(), digest.to_owned());
                memory.targets.extend(crate::source::targets_of(device));
            }
            // Unknown tokens are whatever a client sends: past a bound they are dropped
            // (all at once, so the pass is paid once per bound's worth of inserts).
            None if memory.by_digest.len() >= MAX_CACHED => {
                memory.by_digest.retain(|_, cached| cached.device.is_some());
            }
            None => {}
        }
        memory.by_digest.insert(digest.to_owned(), Cached { device, fetched });
    }

    /// One call per voucher at a time in this worker.
    fn flight(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.retain(|_, lock| Arc::strong_count(lock) > 1);
        flights.entry(digest.to_owned()).or_default().clone()
    }

    async fn shared_get(&self, digest: &str) -> Option<Cached> {
        let mut redis = self.redis.clone()?;
        let text: Option<String> =
            tokio::time::timeout(REDIS_DEADLINE, redis.get(names::device_config_key(digest)))
                .await
                .ok()?
                .ok()?;
        let shared: Shared = serde_json::from_str(&text?).ok()?;
        let age = Duration::from_millis((tcpc_proto::now_ms() - shared.fetched_ms).max(0) as u64);
        Some(Cached {
            device: shared.device.map(Arc::new),
            fetched: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        })
    }

    async fn shared_put(&self, digest: &str, device: Option<&Device>) {
        let Some(redis) = &self.redis else { return };
        let shared = Shared { device: device.cloned(), fetched_ms: tcpc_proto::now_ms() };
        let Ok(text) = serde_json::to_string(&shared) else { return };
        // A known device's entry is kept a day (stale, it still authenticates the device
        // in an outage); an unknown token's only as long as it counts as unknown.
        let ttl = if device.is_some() { 24 * 3600 } else { NEGATIVE_TTL.as_secs() };
        // Two keys of two slots: a batch, which a Redis Cluster takes apart.
        let mut batch = Batch::new();
        batch.command("SET", &names::device_config_key(digest)).arg(text).arg("EX").arg(ttl);
        if let Some(device) = device {
            batch.command("SET", &names::device_voucher_key(&device.id)).arg(digest).arg("EX").arg(24 * 3600);
        }
        let stored = tokio::time::timeout(REDIS_DEADLINE, batch.query::<()>(redis)).await;
        if !matches!(stored, Ok(Ok(_))) {
            debug!("device config not shared in Redis");
        }
    }

    /// Whether this worker may call the platform for `digest` now: the platform is
    /// not backing off, and no call for it (here or by another worker) in 3 s.
    async fn may_call(&self, digest: &str) -> Result<(), SourceError> {
        {
            let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
            if outage.until.is_some_and(|until| Instant::now() < until) {
                return Err(SourceError::BackingOff);
            }
        }
        {
            let mut memory = self.memory();
            if memory.last_call.get(digest).is_some_and(|at| at.elapsed() < PER_VOUCHER) {
                return Err(SourceError::RateGated);
            }
            memory.last_call.retain(|_, at| at.elapsed() < PER_VOUCHER);
            memory.last_call.insert(digest.to_owned(), Instant::now());
        }
        if let Some(mut redis) = self.redis.clone() {
            let taken: Result<Result<Option<String>, _>, _> = tokio::time::timeout(
                REDIS_DEADLINE,
                redis::cmd("SET")
                    .arg(names::platform_call_key(digest))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(PER_VOUCHER.as_millis() as u64)
                    .query_async(&mut redis),
            )
            .await;
            // Redis down: the local gate above still holds; the platform's own limit
            // answers 201003 to the rare second caller.
            if let Ok(Ok(None)) = taken {
                return Err(SourceError::AnotherWorker);
            }
        }
        Ok(())
    }

    fn record_outcome(&self, result: &Result<Option<Device>, PlatformError>) {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Err(PlatformError::Unreachable(error)) => {
                let backoff = outage.backoff.next_delay();
                outage.until = Some(Instant::now() + backoff);
                warn!(%error, ?backoff, "platform unreachable; known devices are served from cache");
            }
            _ => {
                outage.backoff.reset();
                outage.until = None;
            }
        }
    }

    /// Cache (a known device's stale entry too, refreshed behind the caller), then the
    /// shared cache, then (rate-gated) the platform; a stale entry when the platform
    /// cannot answer.
    async fn fetch(&self, digest: &str, query: ConfigQuery<'_>) -> Result<Cached, SourceError> {
        if let Some(cached) = self.cached(digest) {
            if cached.is_fresh(digest) {
                return Ok(cached);
            }
            if cached.device.is_some() {
                self.refresh_behind(digest, query);
                return Ok(cached);
            }
        }
        self.ask(digest, query).await
    }

    /// Asks again for a stale known device, once at a time per digest, on a task of
    /// its own.
    fn refresh_behind(&self, digest: &str, query: ConfigQuery<'_>) {
        let Some(this) = self.me.upgrade() else { return };
        if !self.refreshing.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.to_owned()) {
            return;
        }
        let (digest, query) = (digest.to_owned(), query.to_owned());
        tokio::spawn(async move {
            if let Err(error) = this.ask(&digest, query.as_query()).await {
                debug!(%error, "device config not refreshed; the cached one stays in use");
            }
            this.refreshing.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest);
        });
    }

    /// The shared cache, then (rate-gated) the platform; a stale entry when the platform
    /// cannot answer.
    async fn ask(&self, digest: &str, query: ConfigQuery<'_>) -> Result<Cached, SourceError> {
        let flight = self.flight(digest);
        let _one_at_a_time = flight.lock().await;
        if let Some(cached) = self.cached(digest).filter(|cached| cached.is_fresh(digest)) {
            return Ok(cached);
        }
        let shared = self.shared_get(digest).await;
        if let Some(cached) = shared.clone().filter(|cached| cached.is_fresh(digest)) {
            self.remember(digest, cached.device.clone(), cached.fetched);
            return Ok(cached);
        }
        let stale = self.cached(digest).or(shared);
        if let Err(gated) = self.may_call(digest).await {
            if matches!(gated, SourceError::AnotherWorker) {
                // Its answer lands in the shared cache within the call's deadline.
                let deadline = Instant::now() + PER_VOUCHER;
                while Instant::now() < deadline {
                    tokio::time::sleep(SHARED_POLL).await;
                    if let Some(cached) =
                        self.shared_get(digest).await.filter(|cached| cached.is_fresh(digest))
                    {
                        self.remember(digest, cached.device.clone(), cached.fetched);
                        return Ok(cached);
                    }
                }
            }
            return stale.ok_or(gated);
        }
        let result = self.client.device_config(query).await;
        self.record_outcome(&result);
        match result {
            Ok(device) => {
                self.shared_put(digest, device.as_ref()).await;
                let device = device.map(Arc::new);
                self.remember(digest, device.clone(), Instant::now());
                Ok(Cached { device, fetched: Instant::now() })
            }
            Err(error) => stale.ok_or(SourceError::Platform(error)),
        }
    }
}

impl DeviceSource for PlatformDevices {
    fn resolve<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<Option<Target>, SourceError>> {
        Box::pin(async move {
            if let Some(target) = self.memory().targets.get(reference).cloned() {
                return Ok(Some(target));
            }
            // Not cached: the platform, by id, then by number (v1.1.10+ topics).
            for query in [ConfigQuery::DeviceId(reference), ConfigQuery::DeviceNumber(reference)] {
                let key = match query {
                    ConfigQuery::DeviceNumber(_) => format!("number:{reference}"),
                    _ => format!("device:{reference}"),
                };
                if self.fetch(&voucher::digest(&key), query).await?.device.is_some() {
                    return Ok(self.memory().targets.get(reference).cloned());
                }
            }
            Ok(None)
        })
    }

    fn by_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Lookup, SourceError>> {
        Box::pin(async move {
            let voucher = voucher::of_token(token);
            let digest = voucher::digest(&voucher);
            Ok(self.fetch(&digest, ConfigQuery::Voucher(&voucher)).await?.lookup())
        })
    }

    fn by_id<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Arc<Device>>, SourceError>> {
        Box::pin(async move {
            let known = self.memory().digest_of_id.get(device_id).cloned();
            let digest = match known {
                Some(digest) => digest,
                None => match self.redis.clone() {
                    Some(mut redis) => {
                        let shared: Option<String> = tokio::time::timeout(
                            REDIS_DEADLINE,
                            redis.get(names::device_voucher_key(device_id)),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten();
                        shared.unwrap_or_else(|| voucher::digest(&format!("device:{device_id}")))
                    }
                    None => voucher::digest(&format!("device:{device_id}")),
                },
            };
            Ok(self.fetch(&digest, ConfigQuery::DeviceId(device_id)).await?.device)
        })
    }

    fn forget<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let digest = {
                let mut memory = self.memory();
                let digest = memory.digest_of_id.remove(device_id);
                if let Some(digest) = &digest {
                    memory.by_digest.remove(digest);
                }
                memory.targets.retain(|_, target| target.carrier.id != device_id);
                digest
            };
            let Some(mut redis) = self.redis.clone() else { return };
            let mut keys = vec![names::device_voucher_key(device_id)];
            keys.extend(digest.map(|d| names::device_config_key(&d)));
            let _ = tokio::time::timeout(REDIS_DEADLINE, redis.del::<_, ()>(keys)).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known device's config past its TTL is answered from the cache at once, with no
    /// wait for the platform (here one that never answers), and asked again behind.
    #[tokio::test(start_paused = true)]
    async fn a_stale_known_device_is_served_at_once_and_refreshed_behind() {
        // Accepts and never answers: a platform call waits for its timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client =
            PlatformClient::new(&format!("http://{}", silent.local_addr().unwrap()), Duration::from_secs(5));
        let devices = PlatformDevices::new(client, None);
        let voucher = voucher::of_token("known");
        let digest = voucher::digest(&voucher);
        let device = Device {
            id: "dev-known".into(),
            number: "K001".into(),
            kind: crate::devices::DeviceKind::Direct,
            sub_devices: Vec::new(),
            settings: Default::default(),
        };
        devices.remember(&digest, Some(Arc::new(device)), Instant::now());
        tokio::time::advance(POSITIVE_TTL).await;

        let asked = Instant::now();
        let lookup = devices.by_token("known").await.unwrap();
        assert!(matches!(lookup, Lookup::Found(device) if device.id == "dev-known"));
        assert_eq!(asked.elapsed(), Duration::ZERO, "no platform call waited for");
        assert!(devices.refreshing.lock().unwrap().contains(&digest), "asked again behind the caller");
        let _accepted = silent.accept().await.unwrap();
    }

    /// Configs fetched together (a mass reconnect) expire over the last tenth of the
    /// TTL, not in one instant: the platform is not asked for all of them at once.
    #[tokio::test(start_paused = true)]
    async fn configs_fetched_together_do_not_expire_together() {
        let digests: Vec<String> = (0..1000).map(|n| voucher::digest(&format!("token-{n}"))).collect();
        let fetched = Instant::now();
        let fresh =
            || digests.iter().filter(|digest| Cached { device: None, fetched }.is_fresh(digest)).count();
        tokio::time::advance(NEGATIVE_TTL - NEGATIVE_TTL / 10 - Duration::from_millis(1)).await;
        assert_eq!(fresh(), 1000, "none expires before the last tenth");
        tokio::time::advance(Duration::from_millis(1)).await;
        let mut expiring = Vec::new();
        for _ in 0..10 {
            let before = fresh();
            tokio::time::advance(NEGATIVE_TTL / 100).await;
            expiring.push(before - fresh());
        }
        assert_eq!(fresh(), 0, "all expired by the TTL");
        assert!(expiring.iter().all(|&n| n < 200), "spread over the last tenth: {expiring:?}");
    }
}
