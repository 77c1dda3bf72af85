//! The auth phase of a session: the PROXY header (when enabled), the source address's
//! limits, the AccessToken, the worker's answer, the route.
//!
//! Everything here runs under the auth deadline, and costs the platform nothing until
//! the source address passed its limits and a pod-wide auth slot is free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tcpc_proto::names;
use tcpc_proto::v1::{AuthReply, AuthRequest, Protocol, SessionState};
use tokio::time::Instant;
use tracing::{Instrument as _, field, info, warn};

use super::{Close, Inbound, Session};
use crate::codec::{self, Frame, FrameType, TpCodec};
use crate::framing::{self, CustomFramer};
use crate::metrics::ReasonLabel;
use crate::proxy;
use crate::registry::{CloseOrder, SessionHandle};
use crate::routes::{Claim, Route};
use crate::tls::ServerTls;

impl Session {
    /// Authenticates the device; on success the session is registered, routed and its
    /// online event published.
    pub(super) async fn authenticate(
        &mut self,
        tcp_peer: SocketAddr,
        tls: Option<&ServerTls>,
    ) -> Result<(), Close> {
        let limits = &self.shared.config.limits;
        let deadline = Instant::now() + limits.auth_timeout;
        let peer =
            if limits.proxy_protocol { self.read_proxy_header(deadline, tcp_peer).await? } else { tcp_peer };
        self.shared.sources.admit(peer.ip()).map_err(Close::Refused)?;
        self.source = Some(peer.ip());
        // After the source limits: a handshake costs CPU, a flood of them is limited too.
        if let Some(tls) = tls {
            let first = self.buf.split().freeze();
            tokio::time::timeout_at(deadline, self.stream.start_tls(tls, first))
                .await
                .map_err(|_| Close::AuthTimeout)?
                .map_err(|error| Close::Tls(error.to_string()))?;
        }
        let token = match self.protocol {
            Protocol::Custom => self.read_token(deadline).await?,
            _ => self.read_auth_frame(deadline).await?,
        };
        self.shared.sources.attempt(peer.ip()).map_err(Close::Refused)?;
        // Pod-wide: a bounded number of authentications wait on the workers at once;
        // past it a device waits for a slot within its own deadline.
        let shared = self.shared.clone();
        let slot = tokio::time::timeout_at(deadline, shared.auth_slots.acquire())
            .await
            .map_err(|_| Close::AuthUnavailable)?
            .map_err(|_| Close::AuthUnavailable)?;
        // A connection's authentication is one trace: the request to the workers (never
        // the token), their answer, the route and the online event.
        let span = tcpc_proto::nats_span!(
            "authenticate",
            "client",
            "send",
            "send",
            names::AUTH_SUBJECT,
            "client.address" = %peer.ip(),
            "tcpc.connection.id" = %self.id,
            "tcpc.listener" = super::listener_label(self.protocol),
            "tcpc.device.id" = field::Empty,
            "tcpc.auth.outcome" = field::Empty,
        );
        let outcome = match self.ask_workers(token, peer, deadline, slot).instrument(span.clone()).await {
            Ok(reply) => {
                // The session's span (current here, outside the authentication's).
                tracing::Span::current().record("device_id", reply.device_id.as_str());
                span.record("tcpc.device.id", reply.device_id.as_str());
                self.authenticated(reply, peer).instrument(span.clone()).await
            }
            Err(close) => Err(close),
        };
        span.record(
            "tcpc.auth.outcome",
            match &outcome {
                Ok(()) => "ok",
                Err(close) => close.label(),
            },
        );
        outcome
    }

    /// Asks the workers who the token is: their answer that it is a device, or why not.
    async fn ask_workers(
        &mut self,
        token: String,
        peer: SocketAddr,
        deadline: Instant,
        slot: tokio::sync::SemaphorePermit<'_>,
    ) -> Result<AuthReply, Close> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let request = AuthRequest {
            protocol: self.protocol.into(),
            access_token: token,
            connection_id: self.id.to_string(),
            pod: self.shared.pod.clone(),
            remote_addr: peer.to_string(),
            // A worker that takes the request after this skips it: the device is gone.
            deadline_ms: tcpc_proto::now_ms() + remaining.as_millis() as i64,
        };
        let reply = match tokio::time::timeout_at(deadline, self.shared.bus.authenticate(request, remaining))
            .await
        {
            Err(_) => return Err(Close::AuthTimeout),
            Ok(Err(error)) => {
                warn!(conn = %self.id, %error, "authentication request failed");
                return Err(Close::AuthUnavailable);
            }
            Ok(Ok(reply)) if !reply.ok => {
                self.shared.sources.failed(peer.ip());
                let message =
                    if reply.message.is_empty() { "authentication failed".to_owned() } else { reply.message };
                return Err(Close::AuthRefused(message));
            }
            Ok(Ok(reply)) => reply,
        };
        drop(slot);
        Ok(reply)
    }

    /// Reads the PROXY protocol header a load balancer puts first; the client address
    /// it carries is the peer from here on.
    async fn read_proxy_header(
        &mut self,
        deadline: Instant,
        tcp_peer: SocketAddr,
    ) -> Result<SocketAddr, Close> {
        loop {
            match proxy::parse(&self.buf) {
                Ok(Some(header)) => {
                    let _ = self.buf.split_to(header.length);
                    return Ok(header.source.unwrap_or(tcp_peer));
                }
                Ok(None) => {}
                Err(error) => return Err(Close::Protocol(error.to_string())),
            }
            tokio::time::timeout_at(deadline, self.read_some()).await.map_err(|_| Close::AuthTimeout)??;
        }
    }

    async fn read_auth_frame(&mut self, deadline: Instant) -> Result<String, Close> {
        let frame = loop {
            if let Some(frame) = self.decode_tp()? {
                break frame;
            }
            tokio::time::timeout_at(deadline, self.read_some()).await.map_err(|_| Close::AuthTimeout)??;
        };
        self.shared.metrics.listener(self.protocol).frames_received.inc();
        if frame.frame_type != FrameType::Data || frame.cmd != codec::cmd::AUTH {
            return Err(Close::Protocol("the first frame must be auth (TYPE 0, CMD 0)".to_owned()));
        }
        let token = std::str::from_utf8(&frame.payload)
            .map_err(|_| Close::Protocol("access token is not UTF-8".to_owned()))?
            .trim();
        if token.is_empty() {
            return Err(Close::Protocol("empty access token".to_owned()));
        }
        Ok(token.to_owned())
    }

    async fn read_token(&mut self, deadline: Instant) -> Result<String, Close> {
        let max = self.shared.config.limits.max_token;
        let mut gap_elapsed = false;
        loop {
            match framing::take_token(&mut self.buf, max, gap_elapsed) {
                Ok(Some(token)) => return Ok(token),
                Ok(None) => {}
                Err(error) => return Err(Close::Protocol(error.to_string())),
            }
            // Before the first byte only the auth deadline counts; after it, a silence
            // of the token gap ends the token.
            let wait_until = if self.buf.is_empty() {
                deadline
            } else {
                deadline.min(self.last_input + self.shared.config.limits.token_gap)
            };
            match tokio::time::timeout_at(wait_until, self.read_some()).await {
                Ok(read) => read?,
                Err(_) if wait_until < deadline => gap_elapsed = true,
                Err(_) => return Err(Close::AuthTimeout),
            }
        }
    }

    fn decode_tp(&mut self) -> Result<Option<Frame>, Close> {
        use tokio_util::codec::Decoder as _;
        let Inbound::Tp(codec) = &mut self.inbound else {
            return Ok(None);
        };
        codec.decode(&mut self.buf).map_err(|e| Close::Protocol(e.to_string()))
    }

    async fn authenticated(&mut self, reply: AuthReply, peer: SocketAddr) -> Result<(), Close> {
        let max_frame = self.shared.config.limits.max_frame;
        match &mut self.inbound {
            // The auth frame was bounded by the token's size; data frames by the frame's.
            Inbound::Tp(codec) => *codec = TpCodec::new(max_frame),
            Inbound::Custom(framer) => {
                **framer = CustomFramer::from_proto(reply.framing.as_ref(), max_frame).map_err(|e| {
                    warn!(conn = %self.id, device_id = %reply.device_id, error = %e, "device config has an unusable framing");
                    Close::AuthRefused("device framing misconfigured".to_owned())
                })?;
            }
        }
        let shared = self.shared.clone();
        let handle = Arc::new(SessionHandle::new(&reply.device_id, self.id, self.protocol));
        shared.registry.insert(handle.clone());
        self.handle = Some(handle);
        // After the insert: either the drain sees this session, or it sees the drain.
        if shared.draining.load(Ordering::SeqCst) {
            return Err(Close::Order(CloseOrder::Draining));
        }
        self.partition = names::partition_of(&reply.device_id, shared.config.uplink_partitions);
        self.register_route().await;
        if self.protocol == Protocol::Official {
            self.write(&Frame::data(codec::cmd::AUTH, &b"{\"result\":0}"[..]).to_bytes()).await?;
        }
        shared.metrics.auth.get_or_create(&ReasonLabel { reason: "ok" }).inc();
        info!(
            conn = %self.id,
            device_id = %reply.device_id,
            %peer,
            listener = super::listener_label(self.protocol),
            "device authenticated"
        );
        // The online event is the session's sequence 0: before any of its data.
        self.publish(self.session_event(SessionState::Online, "", true)).await;
        Ok(())
    }

    /// Writes the route under a new epoch; an older connection of the device on this
    /// pod is closed. When Redis cannot answer, the route is written by the next
    /// re-assert round (see `routes::reassert_routes`).
    async fn register_route(&mut self) {
        let Some(handle) = &self.handle else { return };
        let claim = Claim {
            route: Route {
                device_id: handle.device_id.to_string(),
                connection_id: self.id.to_string(),
                pod: self.shared.pod.clone(),
                grpc_addr: self.shared.grpc_addr.clone(),
            },
            // The connection's time decides between two connections of a device if
            // Redis loses both routes; the store raises it above any epoch it holds.
            epoch: tcpc_proto::now_us(),
        };
        // Kept even if the write fails: the re-assert then writes the route under it.
        handle.set_route_epoch(claim.epoch);
        match self.shared.routes.register(&claim).await {
            Ok(registered) => {
                handle.set_route_epoch(registered.epoch);
                let older = registered
                    .replaced
                    .and_then(|id| id.parse().ok())
                    .filter(|&id| id != self.id)
                    .and_then(|id| self.shared.registry.get(id));
                if let Some(older) = older {
                    older.close(CloseOrder::Superseded);
                }
            }
            Err(error) => {
                warn!(
                    conn = %self.id,
                    device_id = %handle.device_id,
                    %error,
                    "route not registered; the next re-assert round retries"
                );
            }
        }
    }
}
