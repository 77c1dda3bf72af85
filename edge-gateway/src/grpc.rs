//! The `EdgeGateway` gRPC service: workers deliver downlinks to, and disconnect, the
//! sessions this pod holds.
//!
//! Statuses are answers, not errors: a device that is not here is `OFFLINE` (the worker
//! tells the platform at once), a write that failed is `FAILED`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use tcpc_proto::v1::edge_gateway_server::EdgeGateway;
use tcpc_proto::v1::{
    DeliverReply, DeliverRequest, DeliverStatus, DisconnectReply, DisconnectRequest, Protocol,
};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, debug, field, warn};

use crate::Shared;
use crate::codec::Frame;
use crate::metrics::ReasonLabel;
use crate::registry::{CloseOrder, ConnectionId, QueueError, QueueLimits, SessionHandle};
use crate::tls::ServerTls;

pub(crate) struct EdgeGatewayService {
    pub shared: Arc<Shared>,
}

fn reply(status: DeliverStatus, message: &str) -> DeliverReply {
    DeliverReply { status: status.into(), message: message.to_owned() }
}

impl EdgeGatewayService {
    /// The session a request names, if it is here and still the device's.
    fn session(&self, device_id: &str, connection_id: &str) -> Option<Arc<SessionHandle>> {
        let id = connection_id.parse::<ConnectionId>().ok()?;
        self.shared.registry.get(id).filter(|handle| &*handle.device_id == device_id)
    }

    async fn deliver_to(&self, request: DeliverRequest) -> DeliverReply {
        let Some(handle) = self.session(&request.device_id, &request.connection_id) else {
            return reply(DeliverStatus::Offline, "device not connected");
        };
        let limits = &self.shared.config.limits;
        // The caller's deadline, or the write timeout: past it the answer is "failed"
        // and the queued write is skipped (the session sees the receiver gone).
        let wait = match request.timeout_ms {
            0 => limits.write_timeout,
            ms => Duration::from_millis(ms.into()),
        };
        if request.payload.len() > limits.max_frame {
            return reply(DeliverStatus::Failed, "payload exceeds the maximum frame length");
        }
        let bytes: Bytes = if handle.protocol == Protocol::Official && request.tp_cmd != 0 {
            let Ok(cmd) = u8::try_from(request.tp_cmd) else {
                return reply(DeliverStatus::Failed, "tp_cmd does not fit a TP CMD byte");
            };
            Frame::data(cmd, request.payload).to_bytes()
        } else {
            request.payload
        };
        let queue = QueueLimits { writes: limits.downlink_queue, bytes: limits.downlink_queue_bytes };
        let written = match handle.deliver(bytes, queue) {
            Ok(written) => written,
            Err(QueueError::Ended) => return reply(DeliverStatus::Offline, "device not connected"),
            Err(QueueError::Full) => return reply(DeliverStatus::Failed, "downlink queue full"),
        };
        // The session answers after the write, bounded by its write timeout, or drops
        // the sender when the connection closes first.
        match tokio::time::timeout(wait, written).await {
            Ok(Ok(Ok(()))) => reply(DeliverStatus::Delivered, ""),
            Ok(Ok(Err(message))) => reply(DeliverStatus::Failed, &message),
            Ok(Err(_)) => reply(DeliverStatus::Offline, "connection closed"),
            Err(_) => reply(DeliverStatus::Failed, "not written within the caller's deadline"),
        }
    }
}

/// The server span of an EdgeGateway call (RPC semantic conventions), a child of the
/// worker's client span whose context the request's metadata carries.
fn server_span(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span = tcpc_proto::edge_rpc_span!(
        "server",
        method,
        "tcpc.device.id" = field::Empty,
        "tcpc.connection.id" = field::Empty,
        "tcpc.outcome" = field::Empty,
    );
    tcpc_proto::trace::follow_metadata(&span, metadata);
    span
}

#[tonic::async_trait]
impl EdgeGateway for EdgeGatewayService {
    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverReply>, Status> {
        let span = server_span("Deliver", request.metadata());
        let request = request.into_inner();
        span.record("tcpc.device.id", request.device_id.as_str());
        span.record("tcpc.connection.id", request.connection_id.as_str());
        let answer = self.deliver_to(request).instrument(span.clone()).await;
        let reason = match answer.status() {
            DeliverStatus::Delivered => "delivered",
            DeliverStatus::Offline => "offline",
            _ => "failed",
        };
        span.record("tcpc.outcome", reason);
        span.record("rpc.grpc.status_code", 0);
        self.shared.metrics.downlinks.get_or_create(&ReasonLabel { reason }).inc();
        Ok(Response::new(answer))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let span = server_span("Disconnect", request.metadata());
        let request = request.into_inner();
        span.record("tcpc.device.id", request.device_id.as_str());
        span.record("tcpc.connection.id", request.connection_id.as_str());
        // One named connection: "any connection of the device" would let a caller that
        // knows only device ids cut them off.
        if request.connection_id.is_empty() {
            span.record("rpc.grpc.status_code", tonic::Code::InvalidArgument as i32);
            return Err(Status::invalid_argument("connection_id is required"));
        }
        let session = self.session(&request.device_id, &request.connection_id);
        if let Some(session) = &session {
            session.close(CloseOrder::Disconnected);
        }
        span.record("rpc.grpc.status_code", 0);
        span.record("tcpc.outcome", if session.is_some() { "closed" } else { "not_here" });
        Ok(Response::new(DisconnectReply { closed: u32::from(session.is_some()) }))
    }
}

/// Refuses calls without the shared token (`authorization: Bearer <token>`), when one
/// is configured; compared in constant time.
pub(crate) fn token_check(token: Option<SecretString>) -> impl tonic::service::Interceptor + Clone {
    // The header a caller must send, made once rather than on every call.
    let expected: Option<SecretString> =
        token.map(|token| format!("Bearer {}", token.expose_secret()).into());
    move |request: Request<()>| {
        let Some(expected) = &expected else { return Ok(request) };
        let given = request.metadata().get("authorization").map(|value| value.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, expected.expose_secret().as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("a valid token is required"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// TLS connections of the gRPC port, handshaken concurrently (a client that never
/// finishes its handshake holds up no other) within [`HANDSHAKE_DEADLINE`].
pub(crate) fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerTls>,
    stop: CancellationToken,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (accepted, mut incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        warn!(%error, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tls, accepted) = (tls.clone(), accepted.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_DEADLINE, tls.acceptor().accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = accepted.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => warn!(%peer, %error, "gRPC client refused by TLS"),
                    Err(_) => debug!(%peer, "gRPC TLS handshake not completed in time"),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| incoming.poll_recv(cx))
}

/// How long a gRPC client has to complete its TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut impl tonic::service::Interceptor, authorization: Option<&str>) -> bool {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        check.call(request).is_ok()
    }

    #[test]
    fn calls_need_the_token_when_there_is_one() {
        let mut check = token_check(Some("s3cret".into()));
        assert!(call(&mut check, Some("Bearer s3cret")));
        assert!(call(&mut check, Some("Bearer s3cret")), "again: the expected header is kept");
        assert!(!call(&mut check, Some("Bearer s3cre")));
        assert!(!call(&mut check, Some("s3cret")));
        assert!(!call(&mut check, None));
        assert!(call(&mut token_check(None), None), "no token configured: open");
    }
}
