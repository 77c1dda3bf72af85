//! Session routing: which edge pod and which connection hold a device.
//!
//! [`RouteStore`] is the seam the all-in-one swaps (in-process map instead of Redis).
//! Routes are fenced twice:
//! - by the connection id: removal is compare-and-delete, so a late close on an old pod
//!   never deletes the route of the device's newer connection;
//! - by an epoch: every route carries its connection's epoch (raised above the one it
//!   replaced), and the periodic re-assert writes a route back only over an older epoch,
//!   so after Redis lost routes a stale connection never wins one back from a newer.
//!
//! Each pod keeps a liveness key alive, lists itself in the set of edge pods and the
//! devices it routes in its own set, so that a live pod can find and reap the routes of
//! a dead one (see `healing`).

use std::time::Duration;

use futures::future::BoxFuture;
use tcpc_proto::connect::{Batch, Lua, RedisConnection, UrlError};
use tcpc_proto::names;

pub use tcpc_proto::route::Route;

/// A route as a connection claims it: the route and its epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub route: Route,
    pub epoch: u64,
}

/// What registering a route did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The connection whose route this replaced.
    pub replaced: Option<String>,
    /// The epoch the route holds (at least the one claimed).
    pub epoch: u64,
}

/// What a pod left in the route store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Routes that still name the pod.
    pub routes: Vec<Route>,
    /// Devices in the pod's set with no route at all: their route was removed without
    /// an offline event (e.g. a worker purged it when a downlink found the pod dead).
    pub orphans: Vec<String>,
}

/// What re-asserting a route found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reasserted {
    /// The route still named the connection.
    Held,
    /// The route was missing (or older) and is written again.
    Restored,
    /// A newer connection of the device holds the route: this one is stale.
    Superseded,
}

/// A route-store step failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("register route: {0}")]
    Register(#[source] redis::RedisError),
    #[error("remove route: {0}")]
    Remove(#[source] redis::RedisError),
    #[error("refresh pod liveness: {0}")]
    Liveness(#[source] redis::RedisError),
    #[error("route store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("route store URL: {0}")]
    Url(#[source] UrlError),
    #[error("re-assert routes: {0}")]
    Reassert(#[source] redis::RedisError),
    #[error("reap a dead pod's routes: {0}")]
    Reap(#[source] redis::RedisError),
}

/// Device → (pod, connection) routing with fencing.
pub trait RouteStore: Send + Sync + 'static {
    /// Makes the claimed route the device's route, whatever route it had.
    fn register<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Registered, RouteError>>;

    /// Writes every claim again unless a newer epoch holds its device (one pipeline);
    /// one outcome per claim, in order.
    fn reassert<'a>(&'a self, claims: &'a [Claim]) -> BoxFuture<'a, Result<Vec<Reasserted>, RouteError>>;

    /// Removes the device's route if it still names `connection_id` (of `pod`); true if
    /// removed (this connection owned the route).
    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>>;

    /// Marks the pod alive for a while; called periodically.
    fn keep_alive<'a>(&'a self, pod: &'a str, grpc_addr: &'a str) -> BoxFuture<'a, Result<(), RouteError>>;

    /// Marks the pod gone (clean shutdown).
    fn forget_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>>;

    /// Edge pods other than `me` that have routes but no liveness key, each claimed for
    /// `me` to reap (one reaper per dead pod); a pod `me` claimed at an earlier round and
    /// has not finished reaping is claimed again.
    fn claim_dead_pods<'a>(&'a self, me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RouteError>>;

    /// What `pod` left behind (its devices that reconnected elsewhere are dropped from
    /// its set).
    fn leftovers_of_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<Leftovers, RouteError>>;

    /// Removes the leftovers of `pod` once their offline events are stored: each route
    /// compare-and-deleted on its connection, every device taken out of the pod's set
    /// (pipelined).
    fn clear_leftovers<'a>(
        &'a self,
        pod: &'a str,
        routes: &'a [Route],
        orphans: &'a [String],
    ) -> BoxFuture<'a, Result<(), RouteError>>;

    /// Done reaping `pod`: its set is empty, it leaves the watch list.
    fn reaped<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>>;
}

/// Routes in Redis (`tcpc:route:<device>` hashes, `tcpc:pod:<pod>` liveness keys), on
/// one server, a Redis Cluster or behind Sentinel: each script touches one key, and
/// pipelines are [`Batch`]es (grouped by slot on a cluster).
pub struct RedisRoutes {
    connection: RedisConnection,
    register: Lua,
    reassert: Lua,
    remove: Lua,
    claim: Lua,
    timeout: Duration,
}

/// Devices per pipeline of the re-assert and the reaper.
const BATCH: usize = 1000;

/// Claims a dead pod for `ARGV[1]` to reap: taken if nobody holds the claim, and held
/// still if `ARGV[1]` took it at an earlier round, so that a reaper whose round failed
/// half-way (a publish or a Redis call that timed out) tries again at its next round
/// rather than once its own claim has expired. Its expiry is left as it was: a reaper
/// that keeps failing gives the pod up to another once it expires. 1 if claimed.
/// `KEYS[1]`: the claim; `ARGV`: the claiming pod, the claim's seconds.
const REAP_CLAIM_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"#;

impl RedisRoutes {
    /// Connects lazily and reconnects by itself: the edge starts and keeps serving
    /// uplinks while Redis is down (routes then fail with an error, logged by callers).
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, RouteError> {
        Ok(RedisRoutes {
            connection: RedisConnection::open(url, timeout).map_err(RouteError::Url)?,
            register: Lua::new(names::ROUTE_REGISTER_SCRIPT),
            reassert: Lua::new(names::ROUTE_REASSERT_SCRIPT),
            remove: Lua::new(names::ROUTE_REMOVE_SCRIPT),
            claim: Lua::new(REAP_CLAIM_SCRIPT),
            timeout,
        })
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
        step: fn(redis::RedisError) -> RouteError,
    ) -> Result<T, RouteError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| RouteError::Timeout(self.timeout))?
            .map_err(step)
    }
}

impl RouteStore for RedisRoutes {
    fn register<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Registered, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let route = &claim.route;
            let mut invocation = self.register.key(names::route_key(&route.device_id));
            invocation
                .arg(&route.connection_id)
                .arg(&route.pod)
                .arg(&route.grpc_addr)
                .arg(tcpc_proto::now_ms())
                .arg(claim.epoch);
            let (replaced, epoch): (Option<String>, String) =
                self.bounded(invocation.invoke_async(&mut connection), RouteError::Register).await?;
            // The pod's set of routed devices: not in the script, whose keys must share
            // one slot (Redis Cluster).
            let mut index = redis::cmd("SADD");
            index.arg(names::pod_routes_key(&route.pod)).arg(&route.device_id);
            self.bounded(index.query_async::<()>(&mut connection), RouteError::Register).await?;
            Ok(Registered { replaced, epoch: epoch.parse().unwrap_or(claim.epoch) })
        })
    }

    fn reassert<'a>(&'a self, claims: &'a [Claim]) -> BoxFuture<'a, Result<Vec<Reasserted>, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut outcomes = Vec::with_capacity(claims.len());
            for batch in claims.chunks(BATCH) {
                // The pod's set first (one key, one command): a route written without
                // its entry there would escape the reaper; an entry without a route is
                // reaped as an orphan.
                for (pod, devices) in by_pod(batch.iter().map(|claim| &claim.route)) {
                    let mut index = redis::cmd("SADD");
                    index.arg(names::pod_routes_key(pod)).arg(devices);
                    self.bounded(index.query_async::<()>(&mut connection), RouteError::Reassert).await?;
                }
                let mut scripts = Batch::new();
                for Claim { route, epoch } in batch {
                    scripts
                        .script(&self.reassert, &[names::route_key(&route.device_id)])
                        .arg(&route.connection_id)
                        .arg(&route.pod)
                        .arg(&route.grpc_addr)
                        .arg(tcpc_proto::now_ms())
                        .arg(epoch);
                }
                let codes: Vec<i64> =
                    self.bounded(scripts.query(&self.connection), RouteError::Reassert).await?;
                outcomes.extend(codes.into_iter().map(|code| match code {
                    1 => Reasserted::Held,
                    2 => Reasserted::Restored,
                    _ => Reasserted::Superseded,
                }));
            }
            Ok(outcomes)
        })
    }

    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut invocation = self.remove.key(names::route_key(device_id));
            invocation.arg(connection_id);
            let removed: i64 =
                self.bounded(invocation.invoke_async(&mut connection), RouteError::Remove).await?;
            if removed == 1 {
                // Only the owner drops the device from its pod's set: a newer connection
                // on the same pod keeps it there.
                let mut index = redis::cmd("SREM");
                index.arg(names::pod_routes_key(pod)).arg(device_id);
                self.bounded(index.query_async::<()>(&mut connection), RouteError::Remove).await?;
            }
            Ok(removed == 1)
        })
    }

    fn keep_alive<'a>(&'a self, pod: &'a str, grpc_addr: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let ttl = names::POD_LIVENESS_TTL.as_secs();
            let mut batch = Batch::new();
            batch.command("SET", &names::pod_liveness_key(pod)).arg(grpc_addr).arg("EX").arg(ttl);
            batch.command("SADD", names::EDGE_PODS_KEY).arg(pod);
            self.bounded(batch.query::<()>(&self.connection), RouteError::Liveness).await.map(drop)
        })
    }

    fn forget_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut command = redis::cmd("DEL");
            command.arg(names::pod_liveness_key(pod));
            self.bounded(command.query_async::<()>(&mut connection), RouteError::Liveness).await?;
            // With routes left (sessions the drain abandoned), the pod stays on the watch
            // list and a live pod reaps them.
            self.reaped(pod).await
        })
    }

    fn claim_dead_pods<'a>(&'a self, me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut members = redis::cmd("SMEMBERS");
            members.arg(names::EDGE_PODS_KEY);
            let pods: Vec<String> =
                self.bounded(members.query_async(&mut connection), RouteError::Reap).await?;
            let pods: Vec<String> = pods.into_iter().filter(|pod| pod != me).collect();
            if pods.is_empty() {
                return Ok(pods);
            }
            let mut batch = Batch::new();
            for pod in &pods {
                batch.command("EXISTS", &names::pod_liveness_key(pod));
            }
            let alive: Vec<bool> = self.bounded(batch.query(&self.connection), RouteError::Reap).await?;
            let mut claimed = Vec::new();
            for (pod, _) in pods.into_iter().zip(alive).filter(|(_, alive)| !alive) {
                let mut claim = self.claim.key(names::pod_reap_key(&pod));
                claim.arg(me).arg(names::POD_REAP_CLAIM.as_secs());
                let won: i64 = self.bounded(claim.invoke_async(&mut connection), RouteError::Reap).await?;
                if won == 1 {
                    claimed.push(pod);
                }
            }
            Ok(claimed)
        })
    }

    fn leftovers_of_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<Leftovers, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut members = redis::cmd("SMEMBERS");
            members.arg(names::pod_routes_key(pod));
            let devices: Vec<String> =
                self.bounded(members.query_async(&mut connection), RouteError::Reap).await?;
            let mut leftovers = Leftovers::default();
            for batch in devices.chunks(BATCH) {
                let mut reads = Batch::new();
                for device in batch {
                    Route::read(&mut reads, device);
                }
                let hashes: Vec<[Option<String>; 3]> =
                    self.bounded(reads.query(&self.connection), RouteError::Reap).await?;
                let mut moved = Vec::new();
                for (device, values) in batch.iter().zip(hashes) {
                    match Route::from_values(device, values) {
                        Some(route) if route.pod == pod => leftovers.routes.push(route),
                        // Routed by another pod now: not this pod's any more.
                        Some(_) => moved.push(device),
                        None => leftovers.orphans.push(device.clone()),
                    }
                }
                // An empty SREM is an error, not a no-op.
                if !moved.is_empty() {
                    let mut forget = redis::cmd("SREM");
                    forget.arg(names::pod_routes_key(pod)).arg(moved);
                    self.bounded(forget.query_async::<()>(&mut connection), RouteError::Reap).await?;
                }
            }
            Ok(leftovers)
        })
    }

    fn clear_leftovers<'a>(
        &'a self,
        pod: &'a str,
        routes: &'a [Route],
        orphans: &'a [String],
    ) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            for batch in routes.chunks(BATCH) {
                let mut removals = Batch::new();
                for route in batch {
                    removals
                        .script(&self.remove, &[names::route_key(&route.device_id)])
                        .arg(&route.connection_id);
                }
                self.bounded(removals.query::<()>(&self.connection), RouteError::Reap).await?;
                // Out of the pod's set once their routes are gone (one key, one command).
                let devices: Vec<&str> = batch.iter().map(|route| route.device_id.as_str()).collect();
                let mut srem = redis::cmd("SREM");
                srem.arg(names::pod_routes_key(pod)).arg(devices);
                self.bounded(srem.query_async::<()>(&mut connection), RouteError::Reap).await?;
            }
            for batch in orphans.chunks(BATCH) {
                let mut srem = redis::cmd("SREM");
                srem.arg(names::pod_routes_key(pod)).arg(batch);
                self.bounded(srem.query_async::<()>(&mut connection), RouteError::Reap).await?;
            }
            Ok(())
        })
    }

    fn reaped<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut count = redis::cmd("SCARD");
            count.arg(names::pod_routes_key(pod));
            let left: u64 = self.bounded(count.query_async(&mut connection), RouteError::Reap).await?;
            if left == 0 {
                let mut batch = Batch::new();
                batch.command("SREM", names::EDGE_PODS_KEY).arg(pod);
                batch.command("DEL", &names::pod_reap_key(pod));
                self.bounded(batch.query::<()>(&self.connection), RouteError::Reap).await?;
            }
            Ok(())
        })
    }
}

/// The devices of `routes` by the pod that routes them, in the order met.
fn by_pod<'r>(routes: impl Iterator<Item = &'r Route>) -> Vec<(&'r str, Vec<&'r str>)> {
    let mut pods: Vec<(&str, Vec<&str>)> = Vec::new();
    for route in routes {
        match pods.iter_mut().find(|(pod, _)| *pod == route.pod) {
            Some((_, devices)) => devices.push(&route.device_id),
            None => pods.push((&route.pod, vec![&route.device_id])),
        }
    }
    pods
}

/// Keeps this pod's liveness key alive until `shutdown`, then deletes it.
pub async fn keep_pod_alive(
    store: &dyn RouteStore,
    pod: &str,
    grpc_addr: &str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(names::POD_LIVENESS_REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                if let Err(error) = store.keep_alive(pod, grpc_addr).await {
                    tracing::warn!(%error, "pod liveness not refreshed");
                }
            }
        }
    }
    if let Err(error) = store.forget_pod(pod).await {
        tracing::warn!(%error, "pod liveness key not removed at shutdown");
    }
}
