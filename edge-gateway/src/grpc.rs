//! The `EdgeGateway` gRPC service: workers deliver downlinks to, and disconnect, the
//! sessions this pod holds.
//!
//! Statuses are answers, not errors: a device that is not here is `OFFLINE` (the worker
//! tells the platform at once), a write that failed is `FAILED`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tcpc_proto::v1::edge_gateway_server::EdgeGateway;
use tcpc_proto::v1::{
    DeliverReply, DeliverRequest, DeliverStatus, DisconnectReply, DisconnectRequest, Protocol,
};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::codec::Frame;
use crate::metrics::ReasonLabel;
use crate::registry::{CloseOrder, ConnectionId, QueueError, QueueLimits, SessionHandle};

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

#[tonic::async_trait]
impl EdgeGateway for EdgeGatewayService {
    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverReply>, Status> {
        let answer = self.deliver_to(request.into_inner()).await;
        let reason = match answer.status() {
            DeliverStatus::Delivered => "delivered",
            DeliverStatus::Offline => "offline",
            _ => "failed",
        };
        self.shared.metrics.downlinks.get_or_create(&ReasonLabel { reason }).inc();
        Ok(Response::new(answer))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let request = request.into_inner();
        let sessions = if request.connection_id.is_empty() {
            self.shared.registry.of_device(&request.device_id)
        } else {
            self.session(&request.device_id, &request.connection_id).into_iter().collect()
        };
        for session in &sessions {
            session.close(CloseOrder::Disconnected);
        }
        Ok(Response::new(DisconnectReply { closed: sessions.len() as u32 }))
    }
}
