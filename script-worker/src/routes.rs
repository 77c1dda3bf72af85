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
use secrecy::ExposeSecret;
use tcpc_observe::{GrpcSecurity, GrpcTlsFiles};
use tcpc_proto::connect::{Batch, RedisConnection};
use tcpc_proto::names;
use tcpc_proto::route::Route;
use tcpc_proto::v1::edge_gateway_client::EdgeGatewayClient;
use tcpc_proto::v1::{DeliverRequest, DeliverStatus, DisconnectRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument as _;

/// Deadline of a route read or an edge call other than a delivery (whose caller
/// chooses its own, see [`EdgeClients::deliver`]).
const DEADLINE: Duration = Duration::from_secs(3);

/// A route store call failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteLookupError {
    #[error("route store did not answer within {DEADLINE:?}")]
    Timeout,
    #[error("route store")]
    Store(#[source] redis::RedisError),
    #[error("in-process route table")]
    Local(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Reads device routes.
pub trait RouteLookup: Send + Sync + 'static {
    /// The device's current route, if it has one.
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, RouteLookupError>>;
    /// Whether an edge pod is alive (its liveness key exists).
    fn pod_alive<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<bool, RouteLookupError>>;
    /// Removes `route` if it is still the device's route (compare-and-delete).
    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), RouteLookupError>>;
    /// Claims the downlink named `digest` for this worker and reads `device_id`'s route,
    /// in one round trip: the claim costs a downlink no wait of its own. The claim is
    /// taken by the time the answer comes, so whatever is delivered after it was claimed.
    fn claim_and_route<'a>(&'a self, digest: &'a str, device_id: &'a str) -> BoxFuture<'a, ClaimAndRoute>;
}

/// A downlink's claim and its device's route, read together. Each may fail alone: on a
/// Redis Cluster the two keys may live on different nodes, and a failed claim must not
/// cost the delivery (a duplicate is possible then, a loss is not).
#[derive(Debug)]
pub struct ClaimAndRoute {
    /// True for the first claim (kept for [`names::DOWNLINK_CLAIM_TTL`]), false when
    /// another worker has it.
    pub claim: Result<bool, RouteLookupError>,
    pub route: Result<Option<Route>, RouteLookupError>,
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
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, RouteLookupError>> {
        Box::pin(async move {
            let mut read = Batch::new();
            Route::read(&mut read, device_id);
            let replies: Vec<[Option<String>; 3]> =
                tokio::time::timeout(DEADLINE, read.query(&self.connection))
                    .await
                    .map_err(|_| RouteLookupError::Timeout)?
                    .map_err(RouteLookupError::Store)?;
            Ok(replies.into_iter().next().and_then(|values| Route::from_values(device_id, values)))
        })
    }

    fn pod_alive<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<bool, RouteLookupError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            tokio::time::timeout(DEADLINE, connection.exists(names::pod_liveness_key(pod)))
                .await
                .map_err(|_| RouteLookupError::Timeout)?
                .map_err(RouteLookupError::Store)
        })
    }

    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), RouteLookupError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let script = redis::Script::new(names::ROUTE_REMOVE_SCRIPT);
            let mut invocation = script.key(names::route_key(&route.device_id));
            invocation.arg(&route.connection_id);
            tokio::time::timeout(DEADLINE, invocation.invoke_async::<i64>(&mut connection))
                .await
                .map_err(|_| RouteLookupError::Timeout)?
                .map(drop)
                .map_err(RouteLookupError::Store)
        })
    }

    fn claim_and_route<'a>(&'a self, digest: &'a str, device_id: &'a str) -> BoxFuture<'a, ClaimAndRoute> {
        Box::pin(async move {
            // A batch, not a script: the two keys are in different slots of a cluster.
            let mut batch = Batch::new();
            batch
                .command("SET", &names::downlink_claim_key(digest))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(names::DOWNLINK_CLAIM_TTL.as_millis() as u64);
            Route::read(&mut batch, device_id);
            let mut replies = batch.query_each::<redis::Value>(&self.connection, DEADLINE).await.into_iter();
            let mut next = || -> Result<redis::Value, RouteLookupError> {
                replies.next().expect("a reply per step").map_err(RouteLookupError::Store)
            };
            let claim = next().and_then(|taken| Ok(parse::<Option<String>>(taken)?.is_some()));
            let route = next().and_then(|values| Ok(Route::from_values(device_id, parse(values)?)));
            ClaimAndRoute { claim, route }
        })
    }
}

/// A reply as `T`.
fn parse<T: redis::FromRedisValue>(reply: redis::Value) -> Result<T, RouteLookupError> {
    redis::from_redis_value(reply).map_err(|error| RouteLookupError::Store(error.into()))
}

/// The client span of an EdgeGateway call (RPC semantic conventions); the edge's server
/// span is its child.
fn client_span(method: &'static str, route: &Route) -> tracing::Span {
    let (host, port) = route.grpc_addr.rsplit_once(':').unwrap_or((&route.grpc_addr, ""));
    tcpc_proto::edge_rpc_span!(
        "client",
        method,
        "server.address" = host,
        "server.port" = port.parse::<u16>().ok(),
        "tcpc.device.id" = route.device_id.as_str(),
        "tcpc.pod" = route.pod.as_str(),
    )
}

fn record_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
}

/// One gRPC channel per edge pod, made on first use and kept. Each call bounds its own
/// wait (the channel has no request timeout of its own, which would race it).
#[derive(Default)]
pub struct EdgeClients {
    channels: Mutex<HashMap<String, EdgeGatewayClient<Channel>>>,
    /// Mutual TLS with the edges, when configured: the current client configuration.
    tls: Option<Mutex<ClientTls>>,
    token: Option<MetadataValue<Ascii>>,
}

/// The worker's side of the edges' mutual TLS, and the bytes it was made from.
struct ClientTls {
    files: GrpcTlsFiles,
    server_name: String,
    read: [Vec<u8>; 3],
    config: ClientTlsConfig,
}

/// How often the client certificate files are read again.
const TLS_RELOAD: Duration = Duration::from_secs(30);

impl ClientTls {
    fn load(files: GrpcTlsFiles, server_name: String) -> Result<Self, String> {
        let read = Self::read(&files)?;
        let config = Self::config(&read, &server_name);
        Ok(ClientTls { files, server_name, read, config })
    }

    fn read(files: &GrpcTlsFiles) -> Result<[Vec<u8>; 3], String> {
        let read =
            |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        Ok([read(&files.cert)?, read(&files.key)?, read(&files.ca)?])
    }

    fn config([cert, key, ca]: &[Vec<u8>; 3], server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .ca_certificate(Certificate::from_pem(ca))
            // Every edge pod presents one certificate for this name, whatever its IP.
            .domain_name(server_name)
    }
}

impl EdgeClients {
    /// Clients that authenticate to the edges with `security`; mutual TLS verifies the
    /// edges' certificate for `server_name`.
    ///
    /// # Errors
    /// A TLS file cannot be read, or the token is not a valid header value.
    pub fn new(security: &GrpcSecurity, server_name: &str) -> Result<Self, String> {
        let tls = security.tls()?.map(|files| ClientTls::load(files, server_name.to_owned())).transpose()?;
        let token = security
            .grpc_token
            .as_ref()
            .map(|token| format!("Bearer {}", token.expose_secret()).parse())
            .transpose()
            .map_err(|_| "the gRPC token is not a valid header value".to_owned())?;
        Ok(EdgeClients { channels: Mutex::default(), tls: tls.map(Mutex::new), token })
    }

    /// Reads the TLS files every [`TLS_RELOAD`] until `stop`; when they changed, the
    /// channels are dropped, so that every edge is reached again with the new
    /// certificate (a channel keeps the configuration it was made with).
    pub async fn keep_tls_current(&self, stop: tokio_util::sync::CancellationToken) {
        let Some(tls) = &self.tls else { return };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TLS_RELOAD) => {}
            }
            let changed = {
                let mut tls = tls.lock().unwrap_or_else(|e| e.into_inner());
                match ClientTls::read(&tls.files) {
                    Ok(read) if read != tls.read => {
                        tls.config = ClientTls::config(&read, &tls.server_name);
                        tls.read = read;
                        true
                    }
                    Ok(_) => false,
                    Err(error) => {
                        tracing::warn!(%error, "gRPC client certificate files not readable; keeping the last");
                        false
                    }
                }
            };
            // Not under the TLS lock: `client` takes the two the other way round.
            if changed {
                self.channels.lock().unwrap_or_else(|e| e.into_inner()).clear();
                tracing::info!("gRPC client certificate reloaded");
            }
        }
    }

    fn client(&self, addr: &str) -> Result<EdgeGatewayClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = channels.get(addr) {
            return Ok(client.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("edge address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            let config = tls.lock().unwrap_or_else(|e| e.into_inner()).config.clone();
            endpoint = endpoint.tls_config(config).map_err(|e| format!("edge TLS: {e}"))?;
        }
        let client = EdgeGatewayClient::new(endpoint.connect_lazy());
        channels.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Drops the channel to `addr` (a dead pod's); the next call to it makes a new one.
    pub fn forget(&self, addr: &str) {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
    }

    /// A request carrying the token, when there is one, and the current span's trace
    /// context (the call's client span: the callers run this in it).
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        tcpc_proto::trace::inject_metadata(request.metadata_mut());
        request
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
        let span = client_span("Deliver", route);
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
        let call = async { tokio::time::timeout(timeout, client.deliver(self.request(request))).await };
        let reply = call
            .instrument(span.clone())
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .inspect_err(|status| record_status(&span, status.code()))
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        record_status(&span, tonic::Code::Ok);
        Ok((reply.status(), reply.message))
    }

    /// Closes the connection a route names; how many were closed.
    ///
    /// # Errors
    /// The edge pod cannot be reached.
    pub async fn disconnect(&self, route: &Route, reason: &str) -> Result<u32, String> {
        let span = client_span("Disconnect", route);
        let mut client = self.client(&route.grpc_addr)?;
        let request = DisconnectRequest {
            device_id: route.device_id.clone(),
            connection_id: route.connection_id.clone(),
            reason: reason.to_owned(),
        };
        // Bounded here for the same reason as `deliver`.
        let call = async { tokio::time::timeout(DEADLINE, client.disconnect(self.request(request))).await };
        let reply = call
            .instrument(span.clone())
            .await
            .map_err(|_| format!("edge {}: no answer within {DEADLINE:?}", route.pod))?
            .inspect_err(|status| record_status(&span, status.code()))
            .map_err(|e| format!("edge {}: {}", route.pod, e.message()))?;
        record_status(&span, tonic::Code::Ok);
        Ok(reply.into_inner().closed)
    }
}

/// A route store with no routes that grants every claim (unit tests).
#[cfg(test)]
pub(crate) struct NoRoutes;

#[cfg(test)]
impl RouteLookup for NoRoutes {
    fn route<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<Route>, RouteLookupError>> {
        Box::pin(async { Ok(None) })
    }
    fn pod_alive<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<bool, RouteLookupError>> {
        Box::pin(async { Ok(true) })
    }
    fn purge<'a>(&'a self, _: &'a Route) -> BoxFuture<'a, Result<(), RouteLookupError>> {
        Box::pin(async { Ok(()) })
    }
    fn claim_and_route<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, ClaimAndRoute> {
        Box::pin(async { ClaimAndRoute { claim: Ok(true), route: Ok(None) } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_forgotten_pod_gives_back_its_channel() {
        let clients = EdgeClients::default();
        clients.client("10.0.0.7:50051").unwrap();
        clients.client("10.0.0.8:50051").unwrap();
        clients.forget("10.0.0.7:50051");
        let held: Vec<String> = clients.channels.lock().unwrap().keys().cloned().collect();
        assert_eq!(held, ["10.0.0.8:50051"]);
    }
}
