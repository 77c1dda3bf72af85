//! One device connection: authentication, then frames in and downlinks out.
//!
//! A task per connection, its state in [`Session`], one `select!` over socket
//! readiness, the head publish's acknowledgement, the mailbox and one timer.
//!
//! Memory: an idle authenticated session keeps no read buffer (it is allocated when the
//! socket is readable and released once every byte is decoded) and no publish window
//! (the window's storage is released when it empties), so an idle session is its task,
//! its socket and its [`SessionHandle`].
//!
//! Ordering and loss: envelopes are published in arrival order with message ids
//! `<connection>-<sequence>`; the window holds each until the bus acknowledged it; a
//! failed acknowledgement re-sends the whole window from its head, in order (the bus
//! stores a repeated id once). While the window is full or a re-send is pending the
//! socket is not read: back-pressure reaches the device as TCP flow control.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tcpc_proto::names;
use tcpc_proto::v1::{
    AuthReply, AuthRequest, Protocol, SessionEvent, SessionState, Uplink, UplinkEnvelope, UplinkKind,
    uplink_envelope,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tracing::{Instrument, debug, field, info, warn};

use crate::Shared;
use crate::codec::{self, Frame, FrameType, TpCodec};
use crate::framing::{self, CustomFramer};
use crate::metrics::{ListenerLabel, ReasonLabel};
use crate::registry::{CloseOrder, ConnectionId, SessionHandle};
use crate::routes::Route;
use crate::uplink::AckFuture;

/// Bytes reserved when a readable socket has no room in its buffer.
const READ_CHUNK: usize = 1024;
/// How long a closing session waits for its window to be acknowledged.
const CLOSE_FLUSH: Duration = Duration::from_secs(10);
/// Deadline of the courtesy error frame sent before closing.
const ERROR_FRAME_DEADLINE: Duration = Duration::from_secs(1);

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    PeerClosed,
    Io(String),
    AuthTimeout,
    AuthRefused(String),
    AuthUnavailable,
    Protocol(String),
    IdleTimeout,
    WriteFailed,
    Order(CloseOrder),
}

impl Close {
    /// The metric label.
    fn label(&self) -> &'static str {
        match self {
            Close::PeerClosed => "peer_closed",
            Close::Io(_) => "io_error",
            Close::AuthTimeout => "auth_timeout",
            Close::AuthRefused(_) => "auth_refused",
            Close::AuthUnavailable => "auth_unavailable",
            Close::Protocol(_) => "protocol_error",
            Close::IdleTimeout => "idle_timeout",
            Close::WriteFailed => "write_failed",
            Close::Order(CloseOrder::Disconnected) => "disconnected",
            Close::Order(CloseOrder::Superseded) => "superseded",
            Close::Order(CloseOrder::Draining) => "draining",
        }
    }

    /// What the device is told before the close, if anything.
    fn device_message(&self) -> Option<String> {
        Some(match self {
            Close::PeerClosed | Close::Io(_) | Close::WriteFailed => return None,
            Close::AuthTimeout => "no authentication within the deadline".to_owned(),
            Close::AuthRefused(message) => message.clone(),
            Close::AuthUnavailable => "authentication unavailable, retry later".to_owned(),
            Close::Protocol(message) => message.clone(),
            Close::IdleTimeout => "idle timeout".to_owned(),
            Close::Order(CloseOrder::Disconnected) => "disconnected by the platform".to_owned(),
            Close::Order(CloseOrder::Superseded) => "replaced by a newer connection".to_owned(),
            Close::Order(CloseOrder::Draining) => "server shutting down, reconnect".to_owned(),
        })
    }
}

/// The `{"result":1,"message":"…"}` payload of refusals and error frames.
pub(crate) fn error_payload(message: &str) -> Bytes {
    // Written by hand so that `result` comes first, as the protocol documents it.
    let message = serde_json::Value::from(message);
    format!(r#"{{"result":1,"message":{message}}}"#).into()
}

/// What a refusal or error looks like on a listener's wire.
pub(crate) fn error_bytes(protocol: Protocol, during_auth: bool, message: &str) -> Bytes {
    match protocol {
        Protocol::Official => {
            let cmd = if during_auth { codec::cmd::AUTH } else { codec::cmd::ERROR };
            Frame::data(cmd, error_payload(message)).to_bytes()
        }
        // Custom devices speak their own protocol; a JSON line is the least surprising
        // thing to read in a terminal, and the connection closes right after it.
        _ => [&error_payload(message)[..], b"\n"].concat().into(),
    }
}

/// How a listener's stream is cut.
enum Inbound {
    Tp(TpCodec),
    /// Boxed: most connections are TP, and every byte of a session counts.
    Custom(Box<CustomFramer>),
}

/// One envelope the bus has not acknowledged yet.
struct InFlight {
    sequence: u64,
    envelope: Bytes,
    /// None until (re)published.
    ack: Option<AckFuture>,
}

/// Token bucket of the per-connection message rate.
struct RateBudget {
    tokens: f32,
    refilled: Instant,
}

/// The state of one connection.
struct Session {
    shared: Arc<Shared>,
    stream: TcpStream,
    protocol: Protocol,
    id: ConnectionId,
    buf: BytesMut,
    inbound: Inbound,
    /// Last byte (custom) or frame (official) from the device.
    last_input: Instant,
    handle: Option<Arc<SessionHandle>>,
    /// The device's partition of the uplink stream.
    partition: u32,
    sequence: u64,
    window: VecDeque<InFlight>,
    /// A failed publish or ack: the window is re-sent at this time.
    resend_at: Option<Instant>,
    backoff: Duration,
    rate: Option<RateBudget>,
    /// The route write failed; retried on the next heartbeat.
    route_pending: bool,
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    _permit: OwnedSemaphorePermit,
) {
    let listener = listener_label(protocol);
    let gauge = shared.metrics.connections.get_or_create(&ListenerLabel { listener }).clone();
    gauge.inc();
    let id = shared.ids.next();
    // Two fields only: a span's formatted fields live as long as the session does.
    let span = tracing::info_span!("session", conn = %id, device_id = field::Empty);
    let mut session = Session::new(shared, stream, protocol, id);
    async move {
        debug!(%peer, listener, "connection accepted");
        // Boxed: the auth phase's state is gone once it is done, so it does not
        // weigh on every idle session.
        let close = match Box::pin(session.authenticate(peer)).await {
            Ok(()) => session.run().await,
            Err(close) => close,
        };
        Box::pin(session.finish(close)).await;
    }
    .instrument(span)
    .await;
    gauge.dec();
}

pub(crate) fn listener_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Custom => "custom",
        _ => "official",
    }
}

impl Session {
    fn new(shared: Arc<Shared>, stream: TcpStream, protocol: Protocol, id: ConnectionId) -> Self {
        let max_frame = shared.config.limits.max_frame;
        let rate = (shared.config.limits.rate_limit > 0)
            .then(|| RateBudget { tokens: shared.config.limits.rate_burst as f32, refilled: Instant::now() });
        Session {
            inbound: match protocol {
                Protocol::Custom => Inbound::Custom(Box::new(CustomFramer::FixedLength(1))),
                _ => Inbound::Tp(TpCodec::new(max_frame)),
            },
            shared,
            stream,
            protocol,
            id,
            buf: BytesMut::new(),
            last_input: Instant::now(),
            handle: None,
            partition: 0,
            sequence: 0,
            window: VecDeque::new(),
            resend_at: None,
            backoff: Duration::ZERO,
            rate,
            route_pending: false,
        }
    }

    /// Waits until the socket has bytes and reads them into the buffer.
    ///
    /// Cancel-safe: `readable()` is, and the read itself does not await.
    async fn read_some(&mut self) -> Result<(), Close> {
        let before = self.buf.len();
        while self.buf.len() == before {
            self.stream.readable().await.map_err(|e| Close::Io(e.to_string()))?;
            self.try_read()?;
        }
        Ok(())
    }

    /// Reads what the socket has, allocating room only now that bytes are there; a
    /// stale readiness (it stays set until a read would block) reads nothing.
    fn try_read(&mut self) -> Result<(), Close> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.stream.try_read_buf(&mut self.buf) {
            Ok(0) => Err(Close::PeerClosed),
            Ok(_) => {
                self.last_input = Instant::now();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Do not keep the buffer allocated while waiting for the next bytes.
                self.release_idle_buffer();
                Ok(())
            }
            Err(e) => Err(Close::Io(e.to_string())),
        }
    }

    /// Gives back the read buffer once every byte in it is decoded.
    fn release_idle_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Close> {
        match tokio::time::timeout(self.shared.config.limits.write_timeout, self.stream.write_all(bytes))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "write failed");
                Err(Close::WriteFailed)
            }
            Err(_) => {
                debug!("write timed out");
                Err(Close::WriteFailed)
            }
        }
    }

    // ---- authentication ----

    async fn authenticate(&mut self, peer: SocketAddr) -> Result<(), Close> {
        let deadline = Instant::now() + self.shared.config.limits.auth_timeout;
        let token = match self.protocol {
            Protocol::Custom => self.read_token(deadline).await?,
            _ => self.read_auth_frame(deadline).await?,
        };
        let request = AuthRequest {
            protocol: self.protocol.into(),
            access_token: token,
            connection_id: self.id.to_string(),
            pod: self.shared.pod.clone(),
            remote_addr: peer.to_string(),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let reply = match tokio::time::timeout(remaining, self.shared.bus.authenticate(request, remaining))
            .await
        {
            Err(_) => return Err(Close::AuthTimeout),
            Ok(Err(error)) => {
                warn!(%error, "authentication request failed");
                return Err(Close::AuthUnavailable);
            }
            Ok(Ok(reply)) if !reply.ok => {
                let message =
                    if reply.message.is_empty() { "authentication failed".to_owned() } else { reply.message };
                return Err(Close::AuthRefused(message));
            }
            Ok(Ok(reply)) => reply,
        };
        self.authenticated(reply, peer).await
    }

    async fn read_auth_frame(&mut self, deadline: Instant) -> Result<String, Close> {
        let frame = loop {
            if let Some(frame) = self.decode_tp()? {
                break frame;
            }
            tokio::time::timeout_at(deadline, self.read_some()).await.map_err(|_| Close::AuthTimeout)??;
        };
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
        let Inbound::Tp(codec) = &mut self.inbound else {
            return Ok(None);
        };
        codec.decode(&mut self.buf).map_err(|e| Close::Protocol(e.to_string()))
    }

    async fn authenticated(&mut self, reply: AuthReply, peer: SocketAddr) -> Result<(), Close> {
        if let Inbound::Custom(framer) = &mut self.inbound {
            **framer = CustomFramer::from_proto(reply.framing.as_ref(), self.shared.config.limits.max_frame)
                .map_err(|e| {
                    warn!(error = %e, "device config has an unusable framing");
                    Close::AuthRefused("device framing misconfigured".to_owned())
                })?;
        }
        let shared = self.shared.clone();
        tracing::Span::current().record("device_id", reply.device_id.as_str());
        let handle = Arc::new(SessionHandle::new(&reply.device_id, self.id, self.protocol));
        shared.registry.insert(handle.clone());
        self.handle = Some(handle);
        self.partition = names::partition_of(&reply.device_id, shared.config.uplink_partitions);
        self.register_route().await;
        if self.protocol == Protocol::Official {
            self.write(&Frame::data(codec::cmd::AUTH, &b"{\"result\":0}"[..]).to_bytes()).await?;
        }
        shared.metrics.auth.get_or_create(&ReasonLabel { reason: "ok" }).inc();
        info!(%peer, listener = listener_label(self.protocol), "device authenticated");
        // The online event is the session's sequence 0: before any of its data.
        self.publish(self.session_event(SessionState::Online, "", true)).await;
        Ok(())
    }

    /// Writes the route; an older connection of the device on this pod is closed.
    async fn register_route(&mut self) {
        let Some(handle) = &self.handle else { return };
        let route = Route {
            device_id: handle.device_id.to_string(),
            connection_id: self.id.to_string(),
            pod: self.shared.pod.clone(),
            grpc_addr: self.shared.grpc_addr.clone(),
        };
        match self.shared.routes.register(&route).await {
            Ok(replaced) => {
                self.route_pending = false;
                let older =
                    replaced.and_then(|id| id.parse::<ConnectionId>().ok()).filter(|&id| id != self.id);
                if let Some(older) = older.and_then(|id| self.shared.registry.get(id)) {
                    older.close(CloseOrder::Superseded);
                }
            }
            Err(error) => {
                self.route_pending = true;
                warn!(%error, "route not registered; downlinks cannot reach this device until it is");
            }
        }
    }

    fn session_event(&self, state: SessionState, reason: &str, owned_route: bool) -> uplink_envelope::Body {
        let device_id = self.handle.as_ref().map(|h| h.device_id.to_string()).unwrap_or_default();
        uplink_envelope::Body::Session(SessionEvent {
            device_id,
            connection_id: self.id.to_string(),
            state: state.into(),
            pod: self.shared.pod.clone(),
            at_ms: tcpc_proto::now_ms(),
            sequence: self.sequence,
            reason: reason.to_owned(),
            owned_route,
            protocol: self.protocol.into(),
        })
    }

    // ---- publishing ----

    /// Appends an envelope to the window and publishes it, unless a re-send is pending
    /// (then it goes out with the re-send, in order).
    async fn publish(&mut self, body: uplink_envelope::Body) {
        let sequence = self.sequence;
        self.sequence += 1;
        let envelope: Bytes = UplinkEnvelope { body: Some(body) }.encode_to_vec().into();
        let mut entry = InFlight { sequence, envelope, ack: None };
        if self.resend_at.is_none() {
            match publish_one(&self.shared, self.partition, self.id, sequence, entry.envelope.clone()).await {
                Some(ack) => entry.ack = Some(ack),
                None => self.schedule_resend(),
            }
        }
        self.window.push_back(entry);
    }

    fn schedule_resend(&mut self) {
        // Every ack in the window is abandoned: the whole window goes out again, in order.
        for entry in &mut self.window {
            entry.ack = None;
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        self.resend_at = Some(Instant::now() + self.backoff);
    }

    async fn resend(&mut self) {
        self.resend_at = None;
        for index in 0..self.window.len() {
            let (sequence, envelope) = (self.window[index].sequence, self.window[index].envelope.clone());
            match publish_one(&self.shared, self.partition, self.id, sequence, envelope).await {
                Some(ack) => {
                    self.window[index].ack = Some(ack);
                    self.shared.metrics.republished.inc();
                }
                None => return self.schedule_resend(),
            }
        }
    }

    /// Waits for the acknowledgement of the window's head. Cancel-safe: the ack future
    /// stays in the window.
    async fn head_ack(window: &mut VecDeque<InFlight>) -> Result<(), crate::uplink::BusError> {
        match window.front_mut().and_then(|entry| entry.ack.as_mut()) {
            Some(ack) => ack.await,
            None => std::future::pending().await,
        }
    }

    fn on_ack(&mut self, result: Result<(), crate::uplink::BusError>) {
        match result {
            Ok(()) => {
                self.window.pop_front();
                self.backoff = Duration::ZERO;
                self.shared.metrics.uplinks.inc();
                if self.window.is_empty() {
                    // Give back the window's storage: idle sessions hold none.
                    self.window = VecDeque::new();
                }
            }
            Err(error) => {
                debug!(%error, "uplink not acknowledged; re-sending the window");
                self.schedule_resend();
            }
        }
    }

    // ---- serving ----

    fn has_room(&self) -> bool {
        self.resend_at.is_none() && self.window.len() < self.shared.config.limits.max_in_flight
    }

    fn within_rate(&mut self) -> bool {
        let Some(rate) = &mut self.rate else { return true };
        let per_second = self.shared.config.limits.rate_limit as f32;
        let now = Instant::now();
        let refill = now.duration_since(rate.refilled).as_secs_f32() * per_second;
        rate.tokens = (rate.tokens + refill).min(self.shared.config.limits.rate_burst as f32);
        rate.refilled = now;
        rate.tokens >= 1.0
    }

    fn spend_rate(&mut self) {
        if let Some(rate) = &mut self.rate {
            rate.tokens -= 1.0;
        }
    }

    /// When the timer should next fire.
    fn next_deadline(&self, closing_until: Option<Instant>) -> Instant {
        let config = &self.shared.config;
        let mut deadline = closing_until.unwrap_or(self.last_input + config.limits.idle_timeout);
        if let Some(at) = self.resend_at {
            deadline = deadline.min(at);
        }
        if let Some(rate) = &self.rate
            && rate.tokens < 1.0
        {
            let wait = (1.0 - rate.tokens) / config.limits.rate_limit as f32;
            deadline = deadline.min(rate.refilled + Duration::from_secs_f32(wait));
        }
        if let Inbound::Custom(framer) = &self.inbound
            && let Some(gap) = framer.idle_gap()
            && !self.buf.is_empty()
        {
            deadline = deadline.min(self.last_input + gap);
        }
        deadline
    }

    /// The authenticated session's loop; returns why it ended once its window is
    /// flushed (or the flush deadline passed).
    async fn run(&mut self) -> Close {
        let handle = self.handle.clone().expect("run after authentication");
        let mut closing: Option<(Close, Instant)> = None;
        let timer = tokio::time::sleep_until(self.next_deadline(None));
        tokio::pin!(timer);
        loop {
            // The handlers' futures are boxed: they run briefly, and inline they would
            // weigh on every idle session's task for its whole life.
            if closing.is_none()
                && let Err(close) = Box::pin(self.decode_available()).await
            {
                closing = Some((close, Instant::now() + CLOSE_FLUSH));
            }
            if let Some((close, until)) = &closing
                && (self.window.is_empty() || Instant::now() >= *until)
            {
                return close.clone();
            }
            self.release_idle_buffer();
            let reading = closing.is_none() && self.has_room() && self.within_rate();
            timer.as_mut().reset(self.next_deadline(closing.as_ref().map(|c| c.1)));
            let outcome: Result<(), Close> = tokio::select! {
                ack = Self::head_ack(&mut self.window) => {
                    self.on_ack(ack);
                    Ok(())
                }
                ready = self.stream.readable(), if reading => match ready {
                    Ok(()) => self.try_read(),
                    Err(error) => Err(Close::Io(error.to_string())),
                },
                _ = handle.woken() => Box::pin(self.serve_mailbox(&handle)).await,
                _ = &mut timer => Box::pin(self.on_timer(closing.is_some())).await,
            };
            if let Err(close) = outcome
                && closing.is_none()
            {
                closing = Some((close, Instant::now() + CLOSE_FLUSH));
            }
        }
    }

    /// Decodes and handles every complete message in the buffer while the window and
    /// the rate allow.
    async fn decode_available(&mut self) -> Result<(), Close> {
        while self.has_room() && self.within_rate() {
            match &mut self.inbound {
                Inbound::Tp(codec) => match codec.decode(&mut self.buf) {
                    Ok(Some(frame)) => self.on_frame(frame).await?,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(Close::Protocol(error.to_string())),
                },
                Inbound::Custom(framer) => match framer.decode(&mut self.buf) {
                    Ok(Some(message)) => self.on_message(UplinkKind::Raw, message).await,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(Close::Protocol(error.to_string())),
                },
            }
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Close> {
        if frame.frame_type == FrameType::Heartbeat {
            if self.route_pending {
                self.register_route().await;
            }
            return self.write(&Frame::heartbeat(frame.cmd).to_bytes()).await;
        }
        let kind = match frame.cmd {
            codec::cmd::ATTRIBUTES => UplinkKind::Attributes,
            codec::cmd::EVENTS => UplinkKind::Events,
            codec::cmd::TELEMETRY => UplinkKind::Telemetry,
            codec::cmd::COMMAND_RESPONSE => UplinkKind::CommandResponse,
            codec::cmd::ATTRIBUTE_SET_RESPONSE => UplinkKind::AttributeSetResponse,
            codec::cmd::AUTH => return Err(Close::Protocol("already authenticated".to_owned())),
            other => return Err(Close::Protocol(format!("unknown CMD {other:#04x}"))),
        };
        self.on_message(kind, frame.payload).await;
        Ok(())
    }

    async fn on_message(&mut self, kind: UplinkKind, payload: Bytes) {
        self.spend_rate();
        let handle = self.handle.as_ref().expect("messages after authentication");
        let uplink = Uplink {
            device_id: handle.device_id.to_string(),
            connection_id: self.id.to_string(),
            protocol: self.protocol.into(),
            kind: kind.into(),
            payload,
            received_at_ms: tcpc_proto::now_ms(),
            sequence: self.sequence,
        };
        self.publish(uplink_envelope::Body::Uplink(uplink)).await;
    }

    async fn serve_mailbox(&mut self, handle: &SessionHandle) -> Result<(), Close> {
        let (writes, order) = handle.take();
        for outbound in writes {
            let result = self.write(&outbound.bytes).await;
            let _ = outbound.done.send(result.clone().map_err(|_| "write to the device failed".to_owned()));
            result?;
        }
        order.map_or(Ok(()), |order| Err(Close::Order(order)))
    }

    async fn on_timer(&mut self, closing: bool) -> Result<(), Close> {
        let now = Instant::now();
        if self.resend_at.is_some_and(|at| at <= now) {
            self.resend().await;
        }
        if let Inbound::Custom(framer) = &self.inbound
            && framer.idle_gap().is_some_and(|gap| self.last_input + gap <= now)
            && let Some(message) = framer.flush_on_gap(&mut self.buf)
        {
            self.on_message(UplinkKind::Raw, message).await;
        }
        if !closing && self.last_input + self.shared.config.limits.idle_timeout <= now {
            // A device is idle only if the edge was willing to read from it: a full
            // window or a pending re-send is the edge's silence, not the device's.
            if self.window.is_empty() {
                return Err(Close::IdleTimeout);
            }
            self.last_input = now;
        }
        Ok(())
    }

    // ---- closing ----

    async fn finish(&mut self, close: Close) {
        let shared = self.shared.clone();
        shared.metrics.closed.get_or_create(&ReasonLabel { reason: close.label() }).inc();
        match &close {
            Close::PeerClosed => debug!("closed by the device"),
            Close::Io(error) => debug!(%error, "connection failed"),
            Close::Protocol(error) => warn!(%error, "malformed input; closing"),
            Close::AuthRefused(_) | Close::AuthTimeout | Close::AuthUnavailable => {
                shared.metrics.auth.get_or_create(&ReasonLabel { reason: close.label() }).inc();
                info!(reason = close.label(), "authentication failed");
            }
            other => info!(reason = other.label(), "closing"),
        }
        if let Some(message) = close.device_message() {
            let bytes = error_bytes(self.protocol, self.handle.is_none(), &message);
            let _ = tokio::time::timeout(ERROR_FRAME_DEADLINE, self.stream.write_all(&bytes)).await;
        }
        let _ = tokio::time::timeout(ERROR_FRAME_DEADLINE, self.stream.shutdown()).await;
        let Some(handle) = self.handle.take() else { return };
        handle.end();
        shared.registry.remove(self.id);
        if !self.window.is_empty() {
            tracing::error!(
                unacknowledged = self.window.len(),
                "uplinks not stored before the connection closed"
            );
        }
        // Only the owner of the route reports the device offline; when the route store
        // cannot tell, the worker checks the route before believing the offline.
        let owned_route = match shared.routes.remove(&handle.device_id, &self.id.to_string()).await {
            Ok(true) => true,
            Ok(false) => {
                debug!("route already taken by a newer connection; no offline event");
                return;
            }
            Err(error) => {
                warn!(%error, "route not removed");
                false
            }
        };
        self.handle = Some(handle);
        self.window.clear();
        self.resend_at = None;
        self.publish(self.session_event(SessionState::Offline, close.label(), owned_route)).await;
        let deadline = Instant::now() + shared.config.limits.publish_timeout;
        while !self.window.is_empty() && Instant::now() < deadline {
            tokio::select! {
                ack = Self::head_ack(&mut self.window) => self.on_ack(ack),
                _ = tokio::time::sleep_until(self.resend_at.unwrap_or(deadline)) => self.resend().await,
            }
        }
        if !self.window.is_empty() {
            warn!("offline event not stored");
        }
    }
}

/// Hands one envelope to the bus; None when that failed (the caller schedules a re-send).
async fn publish_one(
    shared: &Shared,
    partition: u32,
    id: ConnectionId,
    sequence: u64,
    envelope: Bytes,
) -> Option<AckFuture> {
    let message_id = names::uplink_message_id(&id.to_string(), sequence);
    let publish = shared.bus.publish(names::uplink_subject(partition), message_id, envelope);
    match tokio::time::timeout(shared.config.limits.publish_timeout, publish).await {
        Ok(Ok(ack)) => Some(ack),
        Ok(Err(error)) => {
            debug!(%error, "publish failed");
            None
        }
        Err(_) => {
            debug!("publish timed out");
            None
        }
    }
}
