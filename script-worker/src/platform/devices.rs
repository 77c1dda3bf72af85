//! Devices from the platform, cached so that the platform is asked rarely.
//!
//! - Configs are cached in memory and in Redis (shared by every worker), positive ones
//!   for an hour, unknown tokens for 30 s, each up to a tenth less by its digest (so
//!   that the configs fetched in a mass reconnect do not all expire together, and every
//!   worker agrees on when one does); `device/disconnect` drops a device's entry.
//! - A device's config answers for every form a lookup may name it by (its voucher, its
//!   id, its number): cached under each in memory, and in Redis once under its voucher
//!   with the other forms pointing there, so that the platform is asked once per device
//!   whichever form comes first.
//! - The platform allows one call per voucher per 3 s: calls are single-flight per
//!   voucher in a worker, and across workers a Redis key taken with `SET NX PX 3000`
//!   admits one caller per voucher per 3 s. A known device is gated by its voucher
//!   whichever form it is asked again by.
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
/// Bytes of configs (and unknown tokens) kept in memory, about: past it the least
/// recently used go, and come back from Redis when asked for again. A device is a few
/// hundred bytes without scripts, so this holds a large fleet; scripts make it less.
const CONFIGS_KEPT: u64 = 256 << 20;
/// Device ids (to their digest) and downlink targets kept in memory, each.
const REFERENCES_KEPT: u64 = 1 << 20;
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

/// The digest a device asked for by its id is cached under.
fn id_digest(id: &str) -> String {
    voucher::digest(&format!("device:{id}"))
}

/// The digest a device asked for by its number is cached under.
fn number_digest(number: &str) -> String {
    voucher::digest(&format!("number:{number}"))
}

/// The digest that stands for `device`: its voucher's when the platform gave it, else
/// `asked` (the one it was looked up by).
fn main_digest(device: &Device, asked: &str) -> String {
    if device.voucher_digest.is_empty() { asked.to_owned() } else { device.voucher_digest.clone() }
}

/// Every digest `device`'s config answers for: its voucher's, its id's and its number's,
/// and `asked` when it names the device (an old token's digest, asked by id after the
/// token was changed, must not authenticate with the new config). Not its
/// sub-devices': asked for by their own id the platform answers with the sub-device's
/// config, not the gateway's.
fn digests_of(device: &Device, asked: &str) -> Vec<String> {
    let mut digests = vec![id_digest(&device.id), number_digest(&device.number)];
    if device.voucher_digest.is_empty() || digests.iter().any(|digest| digest == asked) {
        digests.push(asked.to_owned());
    }
    if !device.voucher_digest.is_empty() {
        digests.push(device.voucher_digest.clone());
    }
    digests.sort_unstable();
    digests.dedup();
    digests
}

impl Cached {
    fn is_fresh(&self, digest: &str) -> bool {
        self.fetched.elapsed() < fresh_for(self.device.is_some(), digest)
    }

    /// Bytes the entry under `digest` holds, about: its config as JSON under the
    /// device's main digest, the entry alone under its other forms (they share the one
    /// config).
    fn weight(&self, digest: &str) -> usize {
        const OVERHEAD: usize = 64;
        let config = match &self.device {
            Some(device) if device.voucher_digest.is_empty() || device.voucher_digest == digest => {
                serde_json::to_vec(device.as_ref()).map_or(0, |json| json.len())
            }
            _ => 0,
        };
        OVERHEAD + config
    }

    fn lookup(&self) -> Lookup {
        match &self.device {
            Some(device) => Lookup::Found(device.clone()),
            None => Lookup::Unknown("unknown access token".to_owned()),
        }
    }
}

/// What this worker keeps in memory: bounded caches, each dropping its least recently
/// used entries past its bound (a miss costs a Redis read, at worst a platform call).
struct Memory {
    /// Configs and unknown tokens, by digest, within a byte budget.
    by_digest: moka::sync::Cache<String, Cached>,
    /// The main digest of a device, by id.
    digest_of_id: moka::sync::Cache<String, String>,
    /// Downlink targets (device and sub-device ids and numbers) of cached devices.
    targets: moka::sync::Cache<String, Target>,
}

impl Memory {
    fn new(configs_kept: u64, references_kept: u64) -> Self {
        Memory {
            by_digest: moka::sync::Cache::builder()
                .max_capacity(configs_kept)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .weigher(|digest: &String, cached: &Cached| {
                    u32::try_from(digest.len() + cached.weight(digest)).unwrap_or(u32::MAX)
                })
                .build(),
            digest_of_id: moka::sync::Cache::builder()
                .max_capacity(references_kept)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            targets: moka::sync::Cache::builder()
                .max_capacity(references_kept)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }
}

/// The platform calls of the last [`PER_VOUCHER`], pruned at most once a second (a
/// cold storm makes thousands a second: not a pass over all of them per call).
struct LastCalls {
    at: HashMap<String, Instant>,
    pruned: Instant,
}

impl LastCalls {
    fn new() -> Self {
        LastCalls { at: HashMap::new(), pruned: Instant::now() }
    }

    /// Records a call for `gate` now, unless one was made within [`PER_VOUCHER`].
    fn admit(&mut self, gate: &str) -> bool {
        let now = Instant::now();
        if self.at.get(gate).is_some_and(|at| now.duration_since(*at) < PER_VOUCHER) {
            return false;
        }
        if now.duration_since(self.pruned) >= Duration::from_secs(1) {
            self.at.retain(|_, at| now.duration_since(*at) < PER_VOUCHER);
            self.pruned = now;
        }
        self.at.insert(gate.to_owned(), now);
        true
    }
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
    memory: Memory,
    /// When this worker last called the platform, by gate digest (the last 3 s).
    last_call: Mutex<LastCalls>,
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
            memory: Memory::new(CONFIGS_KEPT, REFERENCES_KEPT),
            last_call: Mutex::new(LastCalls::new()),
            flights: Mutex::default(),
            outage: Mutex::new(Outage {
                until: None,
                backoff: Backoff::new(Duration::from_secs(1), MAX_BACKOFF),
            }),
        })
    }

    fn cached(&self, digest: &str) -> Option<Cached> {
        self.memory.by_digest.get(digest)
    }

    fn remember(&self, digest: &str, device: Option<Arc<Device>>, fetched: Instant) {
        let memory = &self.memory;
        let Some(device) = device else {
            memory.by_digest.insert(digest.to_owned(), Cached { device: None, fetched });
            return;
        };
        memory.digest_of_id.insert(device.id.clone(), main_digest(&device, digest));
        for (reference, target) in crate::source::targets_of(&device) {
            memory.targets.insert(reference, target);
        }
        for digest in digests_of(&device, digest) {
            memory.by_digest.insert(digest, Cached { device: Some(device.clone()), fetched });
        }
    }

    /// One call per voucher at a time in this worker.
    fn flight(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.retain(|_, lock| Arc::strong_count(lock) > 1);
        flights.entry(digest.to_owned()).or_default().clone()
    }

    /// The config Redis keeps under `digest`, or under the digest its alias there names
    /// (both asked in one round trip; the aliased config in a second).
    async fn shared_get(&self, digest: &str) -> Option<Cached> {
        let redis = self.redis.as_ref()?;
        let mut batch = Batch::new();
        batch.command("GET", &names::device_config_key(digest));
        batch.command("GET", &names::device_config_alias_key(digest));
        let answers: Vec<Option<String>> =
            tokio::time::timeout(REDIS_DEADLINE, batch.query(redis)).await.ok()?.ok()?;
        let text = match answers.as_slice() {
            [Some(text), _] => text.clone(),
            [None, Some(main)] => {
                let mut redis = redis.clone();
                let text: Option<String> =
                    tokio::time::timeout(REDIS_DEADLINE, redis.get(names::device_config_key(main)))
                        .await
                        .ok()?
                        .ok()?;
                text?
            }
            _ => return None,
        };
        let shared: Shared = serde_json::from_str(&text).ok()?;
        let age = Duration::from_millis((tcpc_proto::now_ms() - shared.fetched_ms).max(0) as u64);
        Some(Cached {
            device: shared.device.map(Arc::new),
            fetched: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        })
    }

    /// The main digest of a device as Redis has it (set by whichever worker fetched it).
    async fn shared_main_digest(&self, device_id: &str) -> Option<String> {
        let mut redis = self.redis.clone()?;
        tokio::time::timeout(REDIS_DEADLINE, redis.get(names::device_voucher_key(device_id)))
            .await
            .ok()?
            .ok()?
    }

    async fn shared_put(&self, digest: &str, device: Option<&Device>) {
        let Some(redis) = &self.redis else { return };
        let shared = Shared { device: device.cloned(), fetched_ms: tcpc_proto::now_ms() };
        let Ok(text) = serde_json::to_string(&shared) else { return };
        // A known device's entry is kept a day (stale, it still authenticates the device
        // in an outage); an unknown token's only as long as it counts as unknown.
        let ttl = if device.is_some() { 24 * 3600 } else { NEGATIVE_TTL.as_secs() };
        // Keys of several slots: a batch, which a Redis Cluster takes apart. The config
        // once, under the device's main digest; its other forms point there.
        let mut batch = Batch::new();
        let main = device.map_or_else(|| digest.to_owned(), |device| main_digest(device, digest));
        batch.command("SET", &names::device_config_key(&main)).arg(&text).arg("EX").arg(ttl);
        if let Some(device) = device {
            for alias in digests_of(device, digest).iter().filter(|alias| **alias != main) {
                batch.command("SET", &names::device_config_alias_key(alias)).arg(&main).arg("EX").arg(ttl);
            }
            batch.command("SET", &names::device_voucher_key(&device.id)).arg(&main).arg("EX").arg(ttl);
        }
        let stored = tokio::time::timeout(REDIS_DEADLINE, batch.query::<()>(redis)).await;
        if !matches!(stored, Ok(Ok(_))) {
            debug!("device config not shared in Redis");
        }
    }

    /// Whether this worker may call the platform for the device of `gate` (its main
    /// digest) now: the platform is not backing off, and no call for it (here or by
    /// another worker) in 3 s.
    async fn may_call(&self, gate: &str) -> Result<(), SourceError> {
        {
            let outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
            if outage.until.is_some_and(|until| Instant::now() < until) {
                return Err(SourceError::BackingOff);
            }
        }
        {
            if !self.last_call.lock().unwrap_or_else(|e| e.into_inner()).admit(gate) {
                return Err(SourceError::RateGated);
            }
        }
        if let Some(mut redis) = self.redis.clone() {
            let taken: Result<Result<Option<String>, _>, _> = tokio::time::timeout(
                REDIS_DEADLINE,
                redis::cmd("SET")
                    .arg(names::platform_call_key(gate))
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
        // A known device is gated by its voucher, whichever form it is asked by now.
        let gate = match stale.as_ref().and_then(|stale| stale.device.as_deref()) {
            Some(device) => main_digest(device, digest),
            None => digest.to_owned(),
        };
        if let Err(gated) = self.may_call(&gate).await {
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
            if let Some(target) = self.memory.targets.get(reference) {
                return Ok(Some(target));
            }
            // By id, then by number (v1.1.10+ topics); a form whose config is cached
            // here first, so that no platform call is made for a device known here.
            let mut forms = vec![
                (id_digest(reference), ConfigQuery::DeviceId(reference)),
                (number_digest(reference), ConfigQuery::DeviceNumber(reference)),
            ];
            forms.sort_by_key(|(digest, _)| self.cached(digest).and_then(|cached| cached.device).is_none());
            for (digest, query) in forms {
                if let Some(device) = self.fetch(&digest, query).await?.device {
                    // From the config itself: the targets cache may have let it go while
                    // the configs cache kept it.
                    let mut found = None;
                    for (named, target) in crate::source::targets_of(&device) {
                        if named == reference {
                            found = Some(target.clone());
                        }
                        self.memory.targets.insert(named, target);
                    }
                    return Ok(found);
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
            let digest = match self.memory.digest_of_id.get(device_id) {
                Some(digest) => Some(digest),
                None => self.shared_main_digest(device_id).await,
            };
            let digest = digest.unwrap_or_else(|| id_digest(device_id));
            Ok(self.fetch(&digest, ConfigQuery::DeviceId(device_id)).await?.device)
        })
    }

    fn forget<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let memory = &self.memory;
            // Its config, from memory or else from Redis (another worker's copy): every
            // form it is cached under goes, here and in Redis.
            let main = match memory.digest_of_id.remove(device_id) {
                Some(main) => Some(main),
                None => self.shared_main_digest(device_id).await,
            };
            let main = main.unwrap_or_else(|| id_digest(device_id));
            let device = match memory.by_digest.get(&main).and_then(|cached| cached.device) {
                Some(device) => Some(device),
                None => self.shared_get(&main).await.and_then(|cached| cached.device),
            };
            let mut digests = vec![main.clone(), id_digest(device_id)];
            if let Some(device) = &device {
                digests.extend(digests_of(device, &main));
                for (reference, _) in crate::source::targets_of(device) {
                    memory.targets.invalidate(&reference);
                }
            }
            digests.sort_unstable();
            digests.dedup();
            for digest in &digests {
                memory.by_digest.invalidate(digest);
            }
            let Some(redis) = &self.redis else { return };
            // Keys of several slots: one DEL each, in a batch a Redis Cluster takes apart.
            let mut batch = Batch::new();
            batch.command("DEL", &names::device_voucher_key(device_id));
            for digest in &digests {
                batch.command("DEL", &names::device_config_key(digest));
                batch.command("DEL", &names::device_config_alias_key(digest));
            }
            let _ = tokio::time::timeout(REDIS_DEADLINE, batch.query::<()>(redis)).await;
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
            voucher_digest: digest.clone(),
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

    fn device(n: usize) -> Arc<Device> {
        Arc::new(Device {
            id: format!("dev-{n}"),
            number: format!("N{n}"),
            voucher_digest: voucher::digest(&voucher::of_token(&format!("token-{n}"))),
            kind: crate::devices::DeviceKind::Gateway,
            sub_devices: vec![crate::devices::SubDevice {
                id: format!("sub-{n}"),
                number: format!("S{n}"),
                address: "1".into(),
            }],
            settings: Default::default(),
        })
    }

    /// A fleet larger than the memory bounds: the least recently used go, the rest stay
    /// within the bounds.
    #[test]
    fn the_memory_caches_keep_within_their_bounds() {
        let memory = Memory::new(64 << 10, 500);
        let first = device(0);
        let weight =
            Cached { device: Some(first.clone()), fetched: Instant::now() }.weight(&first.voucher_digest);
        for n in 0..2000 {
            let device = device(n);
            memory.by_digest.insert(
                device.voucher_digest.clone(),
                Cached { device: Some(device.clone()), fetched: Instant::now() },
            );
            for (reference, target) in crate::source::targets_of(&device) {
                memory.targets.insert(reference, target);
            }
        }
        memory.by_digest.run_pending_tasks();
        memory.targets.run_pending_tasks();
        assert!(memory.by_digest.weighted_size() <= 64 << 10, "{}", memory.by_digest.weighted_size());
        assert!(memory.by_digest.entry_count() as usize >= (32 << 10) / (weight + 64), "the bound is used");
        assert!(memory.targets.entry_count() <= 500);
    }

    /// Forgetting a device (the platform's `device/disconnect`) drops its config under
    /// every form it was cached by, and its sub-devices' targets.
    #[tokio::test]
    async fn a_forgotten_device_is_gone_in_every_form() {
        let client = PlatformClient::new("http://127.0.0.1:9", Duration::from_secs(1));
        let devices = PlatformDevices::new(client, None);
        let gateway = device(7);
        devices.remember(
            &voucher::digest(&voucher::of_token("token-7")),
            Some(gateway.clone()),
            Instant::now(),
        );
        for digest in [gateway.voucher_digest.clone(), id_digest("dev-7"), number_digest("N7")] {
            assert!(devices.cached(&digest).is_some(), "cached under each form");
        }
        assert!(devices.memory.targets.get("S7").is_some());
        devices.forget("dev-7").await;
        for digest in [gateway.voucher_digest.clone(), id_digest("dev-7"), number_digest("N7")] {
            assert!(devices.cached(&digest).is_none(), "forgotten under each form");
        }
        assert!(devices.memory.targets.get("S7").is_none(), "its sub-device too");
    }

    /// A device whose downlink target the targets cache let go is still found from its
    /// cached config, with no platform call (here a platform that cannot be reached).
    #[tokio::test]
    async fn a_device_is_resolved_from_its_config_when_its_target_was_evicted() {
        let client = PlatformClient::new("http://127.0.0.1:9", Duration::from_secs(1));
        let devices = PlatformDevices::new(client, None);
        let gateway = device(3);
        devices.remember(&gateway.voucher_digest, Some(gateway.clone()), Instant::now());
        devices.memory.targets.invalidate_all();
        let target = devices.resolve("N3").await.unwrap().expect("found by its number");
        assert_eq!(target.carrier.id, "dev-3");
        assert!(devices.memory.targets.get("S3").is_some(), "the config's targets are back");
    }

    /// Asked by id after its token changed, a device's new config is not cached under
    /// the old token's digest: the old token must not authenticate with it.
    #[test]
    fn a_config_is_cached_only_under_the_forms_that_name_its_device() {
        let device = device(5);
        let old_token = voucher::digest(&voucher::of_token("token-before"));
        let forms = digests_of(&device, &old_token);
        assert!(!forms.contains(&old_token));
        assert!(forms.contains(&device.voucher_digest));
        assert!(forms.contains(&id_digest("dev-5")) && forms.contains(&number_digest("N5")));
        assert_eq!(digests_of(&device, &id_digest("dev-5")).len(), 3, "no duplicate forms");
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
