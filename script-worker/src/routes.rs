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
use tcpc_proto::connect::RedisConnection;
use tcpc_proto::names;
use tcpc_proto::route::Route;
use tcpc_proto::v1::edge_gateway_client::EdgeGatewayClient;
use tcpc_proto::v1::{DeliverRequest, DeliverStatus, DisconnectRequest};
use tonic::transport::{Channel, Endpoint};

/// Deadline of a route read or an edge call other than a delivery (whose caller
/// chooses its own, see [`EdgeClients::deliver`]).
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
    connection: RedisConnection,
}

impl RedisRoutes {
    pub fn new(connection: RedisConnection) -> Self {
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

/// One gRPC channel per edge pod, made on first use and kept. Each call bounds its own
/// wait (the channel has no request timeout of its own, which would race it).
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
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let client = EdgeGatewayClient::new(endpoint.connect_lazy());
        channels.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Writes bytes to the connection a route names (framed as TP with `tp_cmd` on
    /// official connections, when not 0); the edge's answer, within `timeout`.
    ///
    /// The edge is told the same `timeout` (`timeout_ms`), so that it skips the write
    /// once this caller has given up. The wait is bounded here and not by the channel's
    /// own request timeout alone: a pod whose address accepts TCP but never completes
    /// the HTTP/2 handshake (a dead pod's IP reused, a hung process) leaves the request
    /// waiting for a ready connection, which that timeout does not cover.
    ///
    /// # Errors
    /// The edge pod cannot be reached or did not answer in time.
    pub async fn deliver(
        &self,
        route: &Route,
        payload: Bytes,
        tp_cmd: u32,
        timeout: Duration,
    ) -> Result<(DeliverStatus, String), String> {
        let mut client = self.client(&route.grpc_addr)?;
        let request = DeliverRequest {
            device_id: route.device_id.clone(),
            connection_id: route.connection_id.clone(),
            payload,
            tp_cmd,
            // The edge skips the write once this caller has given up: a command the
            // platform heard "offline" for must not reach the device afterwards.
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let reply = tokio::time::timeout(timeout, client.deliver(request))
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|e| e.message().to_owned())?
            .into_inner();
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
        // Bounded here for the same reason as `deliver`.
        let reply = tokio::time::timeout(DEADLINE, client.disconnect(request))
            .await
            .map_err(|_| format!("edge {}: no answer within {DEADLINE:?}", route.pod))?
            .map_err(|e| format!("edge {}: {}", route.pod, e.message()))?;
        Ok(reply.into_inner().closed)
    }
}
