//! Session routing: which edge pod and which connection hold a device.
//!
//! [`RouteStore`] is the seam the all-in-one swaps (in-process map instead of Redis).
//! Routes are fenced by the connection id: registering replaces any older route, and
//! removal is compare-and-delete, so a late close on an old pod never deletes the route
//! of the device's newer connection. Each pod keeps a liveness key alive so that routes
//! of a dead pod can be recognised.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tcpc_proto::names;

pub use tcpc_proto::route::Route;

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
    #[error("route store: {0}")]
    Connect(#[source] redis::RedisError),
}

/// Device → (pod, connection) routing with fencing.
pub trait RouteStore: Send + Sync + 'static {
    /// Makes `route` the device's route; returns the connection id it replaced.
    fn register<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<Option<String>, RouteError>>;

    /// Removes the device's route if it still names `connection_id`; true if removed
    /// (this connection owned the route).
    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>>;

    /// Marks the pod alive for a while; called periodically.
    fn keep_alive<'a>(&'a self, pod: &'a str, grpc_addr: &'a str) -> BoxFuture<'a, Result<(), RouteError>>;

    /// Marks the pod gone (clean shutdown).
    fn forget_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>>;
}

/// Routes in Redis (`tcpc:route:<device>` hashes, `tcpc:pod:<pod>` liveness keys).
pub struct RedisRoutes {
    connection: ConnectionManager,
    register: redis::Script,
    remove: redis::Script,
    timeout: Duration,
}

impl RedisRoutes {
    /// Connects lazily and reconnects by itself: the edge starts and keeps serving
    /// uplinks while Redis is down (routes then fail with an error, logged by callers).
    ///
    /// # Errors
    /// The URL is invalid.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, RouteError> {
        let client = redis::Client::open(url).map_err(RouteError::Connect)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_max_delay(Duration::from_secs(2));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(RouteError::Connect)?;
        Ok(RedisRoutes {
            connection,
            register: redis::Script::new(names::ROUTE_REGISTER_SCRIPT),
            remove: redis::Script::new(names::ROUTE_REMOVE_SCRIPT),
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
    fn register<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<Option<String>, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut invocation = self.register.key(names::route_key(&route.device_id));
            invocation
                .arg(&route.connection_id)
                .arg(&route.pod)
                .arg(&route.grpc_addr)
                .arg(tcpc_proto::now_ms());
            self.bounded(invocation.invoke_async(&mut connection), RouteError::Register).await
        })
    }

    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut invocation = self.remove.key(names::route_key(device_id));
            invocation.arg(connection_id);
            let removed: i64 =
                self.bounded(invocation.invoke_async(&mut connection), RouteError::Remove).await?;
            Ok(removed == 1)
        })
    }

    fn keep_alive<'a>(&'a self, pod: &'a str, grpc_addr: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let ttl = names::POD_LIVENESS_TTL.as_secs();
            let mut command = redis::cmd("SET");
            command.arg(names::pod_liveness_key(pod)).arg(grpc_addr).arg("EX").arg(ttl);
            self.bounded(command.query_async::<()>(&mut connection), RouteError::Liveness).await
        })
    }

    fn forget_pod<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut command = redis::cmd("DEL");
            command.arg(names::pod_liveness_key(pod));
            self.bounded(command.query_async::<()>(&mut connection), RouteError::Liveness).await
        })
    }
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
