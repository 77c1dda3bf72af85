//! Reading device routes, and reaching the edge pod a route names.
//!
//! [`RouteLookup`] is the seam the all-in-one swaps (its in-process route table);
//! [`RedisRoutes`] reads the hashes the edges write. [`EdgeClients`] keeps one
//! long-lived gRPC channel per edge pod.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tcpc_proto::names;
use tcpc_proto::route::Route;
use tcpc_proto::v1::edge_gateway_client::EdgeGatewayClient;
use tcpc_proto::v1::{DeliverRequest, DeliverStatus, DisconnectRequest};
use tonic::transport::{Channel, Endpoint};

/// Deadline of a route read or an edge call (a delivery waits for the write to the
/// device, which the edge bounds by its write timeout).
const DEADLINE: Duration = Duration::from_secs(3);

/// Reads device routes.
pub trait RouteLookup: Send + Sync + 'static {
    /// The device's current route, if it has one.
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, String>>;
    /// Whether an edge pod is alive (its liveness key exists).
    fn pod_alive<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<bool, String>>;
    /// Removes `route` if it is still the device's route (compare-and-delete).
    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), String>>;
}

/// Routes in Redis.
pub struct RedisRoutes {
    connection: ConnectionManager,
}

impl RedisRoutes {
    pub fn new(connection: ConnectionManager) -> Self {
        RedisRoutes { connection }
    }
}

impl RouteLookup for RedisRoutes {
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, String>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let fields: HashMap<String, String> =
                tokio::time::timeout(DEADLINE, connection.hgetall(names::route_key(device_id)))
                    .await
                    .map_err(|_| "route store did not answer".to_owned())?
                    .map_err(|e| format!("route store: {e}"))?;
            Ok(Route::from_fields(device_id, &fields))
        })
    }

    fn pod_alive<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            tokio::time::timeout(DEADLINE, connection.exists(names::pod_liveness_key(pod)))
                .await
                .map_err(|_| "route store did not answer".to_owned())?
                .map_err(|e| format!("route store: {e}"))
        })
    }

    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let script = redis::Script::new(names::ROUTE_REMOVE_SCRIPT);
            let mut invocation = script.key(names::route_key(&route.device_id));
            invocation.arg(&route.connection_id);
            tokio::time::timeout(DEADLINE, invocation.invoke_async::<i64>(&mut connection))
                .await
                .map_err(|_| "route store did not answer".to_owned())?
                .map(drop)
                .map_err(|e| format!("route store: {e}"))
        })
    }
}

/// One gRPC channel per edge pod, made on first use and kept.
#[derive(Default)]
pub struct EdgeClients {
    channels: Mutex<HashMap<String, EdgeGatewayClient<Channel>>>,
}

impl EdgeClients {
    fn client(&self, addr: &str) -> Result<EdgeGatewayClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = channels.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("edge address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(DEADLINE)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let client = EdgeGatewayClient::new(endpoint.connect_lazy());
        channels.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Writes bytes to the connection a route names (framed as TP with `tp_cmd` on
    /// official connections, when not 0); the edge's answer.
    ///
    /// # Errors
    /// The edge pod cannot be reached or did not answer in time.
    pub async fn deliver(
        &self,
        route: &Route,
        payload: Bytes,
        tp_cmd: u32,
    ) -> Result<(DeliverStatus, String), String> {
        let mut client = self.client(&route.grpc_addr)?;
        let request = DeliverRequest {
            device_id: route.device_id.clone(),
            connection_id: route.connection_id.clone(),
            payload,
            tp_cmd,
            // The edge skips the write once this caller has given up: a command the
            // platform heard "offline" for must not reach the device afterwards.
            timeout_ms: DEADLINE.as_millis() as u32,
        };
        let reply = client.deliver(request).await.map_err(|e| e.message().to_owned())?.into_inner();
        Ok((reply.status(), reply.message))
    }

    /// Closes the connection a route names; how many were closed.
    ///
    /// # Errors
    /// The edge pod cannot be reached.
    pub async fn disconnect(&self, route: &Route, reason: &str) -> Result<u32, String> {
        let mut client = self.client(&route.grpc_addr)?;
        let request = DisconnectRequest {
            device_id: route.device_id.clone(),
            connection_id: route.connection_id.clone(),
            reason: reason.to_owned(),
        };
        let reply =
            client.disconnect(request).await.map_err(|e| format!("edge {}: {}", route.pod, e.message()))?;
        Ok(reply.into_inner().closed)
    }
}
