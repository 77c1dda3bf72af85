//! One device connection: authentication, then frames in and downlinks out.
//!
//! A task per connection, its state in [`Session`], one `select!` over socket
//! readiness, the head publish's acknowledgement, the mailbox and one timer.
//!
//! - [`auth`]: the PROXY header, the source's limits, the token, the route.
//! - [`window`]: envelopes published and not yet acknowledged, re-sent in order.
//! - [`rate`]: the per-connection message budget.
//! - [`close`]: why a connection ends and what the device reads about it.
//! - this module: the run loop and the close, which first handles what was read.
//!
//! Memory: an idle authenticated session keeps no read buffer (it is allocated when the
//! socket is readable and released once every byte is decoded) and no publish window,
//! so an idle session is its task, its socket and its [`SessionHandle`].
//!
//! Closing: whatever the reason (device closed, close order, idle timeout, I/O error),
//! the session stops reading, then handles the complete messages it has already read
//! (a peer close also ends a message in progress) and waits for their acknowledgement,
//! within the flush budget. Only what still cannot go by then is lost, counted in
//! `edge_uplinks_lost_total` and logged.

mod auth;
mod close;
pub(crate) mod rate;
mod stream;
mod window;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tcpc_proto::v1::{
    Protocol, SessionEvent, SessionState, Uplink, UplinkEnvelope, UplinkKind, uplink_envelope,
};
use tokio::net::TcpStream;

use self::stream::DeviceStream;
use crate::tls::ServerTls;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tracing::{Instrument, debug, error, field, info, warn};

pub(crate) use close::{Close, error_bytes};
use rate::RateBudget;
use window::{Outlet, Window};

use crate::Shared;
use crate::codec::{self, Frame, FrameType, TpCodec};
use crate::framing::CustomFramer;
use crate::metrics::{ListenerLabel, ReasonLabel};
use crate::registry::{ConnectionId, SessionHandle};

/// Bytes reserved when a readable socket has no room in its buffer.
const READ_CHUNK: usize = 1024;
/// Deadline of the courtesy error frame sent before closing.
const ERROR_FRAME_DEADLINE: Duration = Duration::from_secs(1);

/// How a listener's stream is cut.
enum Inbound {
    Tp(TpCodec),
    /// Boxed: most connections are TP, and every byte of a session counts.
    Custom(Box<CustomFramer>),
}

/// Why [`Session::decode_available`] stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Decoded {
    /// No complete message is left in the buffer.
    Drained,
    /// The window or the rate budget has no room; messages may be left.
    Blocked,
}

/// A close under way: the reason, and until when what was read may still be flushed.
struct Closing {
    close: Close,
    until: Instant,
}

/// The state of one connection.
struct Session {
    shared: Arc<Shared>,
    stream: DeviceStream,
    protocol: Protocol,
    id: ConnectionId,
    /// The client's address (from the PROXY header when enabled), once admitted by the
    /// source limits; released when the session ends.
    source: Option<IpAddr>,
    buf: BytesMut,
    inbound: Inbound,
    /// Last byte (custom) or frame (official) from the device.
    last_input: Instant,
    handle: Option<Arc<SessionHandle>>,
    /// The device's partition of the uplink stream.
    partition: u32,
    sequence: u64,
    window: Window,
    rate: Option<RateBudget>,
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
    _permit: OwnedSemaphorePermit,
) {
    let listener = listener_label(protocol);
    let gauge = shared.metrics.connections.get_or_create(&ListenerLabel { listener }).clone();
    gauge.inc();
    shared.metrics.listener(protocol).accepted.inc();
    let id = shared.ids.next();
    // Two fields only: a span's formatted fields live as long as the session does.
    // At DEBUG: an idle session holds no span at the default level (its registry entry
    // and formatted fields, ~0.35 KiB for the session's life); the session's own events
    // at INFO and above name `conn` and `device_id` themselves.
    let span = tracing::debug_span!("session", conn = %id, device_id = field::Empty);
    let mut session = Session::new(shared, stream, protocol, id);
    async move {
        debug!(%peer, listener, "connection accepted");
        // Boxed: the auth phase's state is gone once it is done, so it does not
        // weigh on every idle session.
        let close = match Box::pin(session.authenticate(peer, tls.as_deref())).await {
            Ok(()) => session.run().await,
            Err(close) => close,
        };
        Box::pin(session.finish(close)).await;
    }
    .instrument(span)
    .await;
    gauge.dec();
}

/// Where a session's envelopes go (a function of fields, so that the window can be
/// borrowed mutably beside it).
fn outlet(shared: &Shared, partition: u32, connection: ConnectionId) -> Outlet<'_> {
    Outlet { bus: &*shared.bus, partition, connection, timeout: shared.config.limits.publish_timeout }
}

pub(crate) fn listener_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Custom => "custom",
        _ => "official",
    }
}

impl Session {
    /// The device's id once authenticated, else empty: for the session's own events.
    fn device_id(&self) -> &str {
        self.handle.as_ref().map_or("", |handle| &handle.device_id)
    }

    fn new(shared: Arc<Shared>, stream: TcpStream, protocol: Protocol, id: ConnectionId) -> Self {
        let stream = DeviceStream::Plain(stream);
        let rate = shared.rate_limit().map(RateBudget::new);
        Session {
            inbound: match protocol {
                // Until authenticated, a frame is at most an AccessToken.
                Protocol::Custom => Inbound::Custom(Box::new(CustomFramer::FixedLength(1))),
                _ => Inbound::Tp(TpCodec::new(shared.config.limits.max_token)),
            },
            shared,
            stream,
            protocol,
            id,
            source: None,
            buf: BytesMut::new(),
            last_input: Instant::now(),
            handle: None,
            partition: 0,
            sequence: 0,
            window: Window::default(),
            rate,
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
            Ok(read) => {
                self.shared.metrics.listener(self.protocol).received_bytes.inc_by(read as u64);
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

    /// Writes one frame to the device, within the write timeout.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Close> {
        match tokio::time::timeout(self.shared.config.limits.write_timeout, self.stream.write_all(bytes))
            .await
        {
            Ok(Ok(())) => {
                self.count_sent(bytes.len());
                Ok(())
            }
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

    fn count_sent(&self, bytes: usize) {
        let traffic = self.shared.metrics.listener(self.protocol);
        traffic.frames_sent.inc();
        traffic.sent_bytes.inc_by(bytes as u64);
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

    /// Appends an envelope to the window and publishes it (see [`Window::publish`]).
    async fn publish(&mut self, body: uplink_envelope::Body) {
        let sequence = self.sequence;
        self.sequence += 1;
        let envelope: Bytes = UplinkEnvelope { body: Some(body) }.encode_to_vec().into();
        self.window.publish(outlet(&self.shared, self.partition, self.id), sequence, envelope).await;
    }

    async fn resend_if_due(&mut self) {
        let resent = self.window.resend_if_due(outlet(&self.shared, self.partition, self.id)).await;
        self.shared.metrics.republished.inc_by(resent as u64);
    }

    fn on_ack(&mut self, result: Result<(), crate::uplink::BusError>) {
        if let Some(took) = self.window.on_ack(result) {
            self.shared.metrics.uplinks.inc();
            self.shared.metrics.publish_duration.observe(took.as_secs_f64());
        }
    }

    // ---- serving ----

    fn has_room(&self) -> bool {
        self.window.has_room(self.shared.config.limits.max_in_flight)
    }

    fn within_rate(&mut self) -> bool {
        let limit = self.shared.rate_limit();
        match (&mut self.rate, limit) {
            (Some(rate), Some(limit)) => rate.has_token(limit),
            _ => true,
        }
    }

    /// When the timer should next fire.
    fn next_deadline(&self, closing: Option<&Closing>) -> Instant {
        let config = &self.shared.config;
        let mut deadline = closing.map_or(self.last_input + config.limits.idle_timeout, |c| c.until);
        if let Some(at) = self.window.resend_at() {
            deadline = deadline.min(at);
        }
        if let (Some(rate), Some(limit)) = (&self.rate, self.shared.rate_limit())
            && let Some(at) = rate.next_token_at(limit)
        {
            deadline = deadline.min(at);
        }
        if let Some(gap) = self.pending_gap() {
            deadline = deadline.min(self.last_input + gap);
        }
        deadline
    }

    /// The idle gap that would end the message in the buffer (idle-gap framing only).
    fn pending_gap(&self) -> Option<Duration> {
        match &self.inbound {
            Inbound::Custom(framer) if !self.buf.is_empty() => framer.idle_gap(),
            _ => None,
        }
    }

    /// The authenticated session's loop; returns why it ended once what it read is
    /// flushed (or the flush budget is spent).
    async fn run(&mut self) -> Close {
        let handle = self.handle.clone().expect("run after authentication");
        let mut closing: Option<Closing> = None;
        let timer = tokio::time::sleep_until(self.next_deadline(None));
        tokio::pin!(timer);
        loop {
            // The handlers' futures are boxed: they run briefly, and inline they would
            // weigh on every idle session's task for its whole life.
            let decoded = match Box::pin(self.decode_available(closing.as_ref())).await {
                Ok(decoded) => decoded,
                Err(close) => {
                    self.begin_close(&mut closing, close);
                    Decoded::Drained
                }
            };
            if let Some(Closing { close, until }) = &closing
                && ((decoded == Decoded::Drained && self.window.is_empty()) || Instant::now() >= *until)
            {
                return close.clone();
            }
            self.release_idle_buffer();
            let reading = closing.is_none() && self.has_room() && self.within_rate();
            timer.as_mut().reset(self.next_deadline(closing.as_ref()));
            let outcome: Result<(), Close> = tokio::select! {
                // Cancel-safe: the ack future stays in the window.
                ack = self.window.head_ack() => {
                    self.on_ack(ack);
                    Ok(())
                }
                // Cancel-safe: readiness only; the read itself does not await.
                ready = self.stream.readable(), if reading => match ready {
                    Ok(()) => self.try_read(),
                    Err(error) => Err(Close::Io(error.to_string())),
                },
                // Cancel-safe: `Notify` keeps the wake-up.
                _ = handle.woken() => Box::pin(self.serve_mailbox(&handle, closing.is_some())).await,
                _ = &mut timer => Box::pin(self.on_timer(closing.is_some())).await,
            };
            if let Err(close) = outcome {
                self.begin_close(&mut closing, close);
            }
        }
    }

    /// Starts closing (the first reason wins): no more reads; what was read is
    /// flushed until the budget is spent.
    fn begin_close(&mut self, closing: &mut Option<Closing>, close: Close) {
        if closing.is_some() {
            return;
        }
        if !close.keeps_buffer() {
            self.buf.clear();
        }
        let until = self.shared.flush_deadline(Instant::now());
        *closing = Some(Closing { close, until });
    }

    /// Decodes and handles every complete message in the buffer while the window and
    /// the rate allow. A message in progress ends when its idle gap has passed, or when
    /// the device closed the connection.
    async fn decode_available(&mut self, closing: Option<&Closing>) -> Result<Decoded, Close> {
        loop {
            // Closing, the bytes are already read: the rate budget is about reading.
            if !self.has_room() || (closing.is_none() && !self.within_rate()) {
                return Ok(Decoded::Blocked);
            }
            let ends_message = closing.is_some_and(|c| c.close.ends_message())
                || self.pending_gap().is_some_and(|gap| self.last_input + gap <= Instant::now());
            match &mut self.inbound {
                Inbound::Tp(codec) => match codec.decode(&mut self.buf) {
                    Ok(Some(frame)) => self.on_frame(frame, closing.is_some()).await?,
                    Ok(None) => return Ok(Decoded::Drained),
                    Err(error) => return Err(Close::Protocol(error.to_string())),
                },
                Inbound::Custom(framer) => {
                    let message = match framer.decode(&mut self.buf) {
                        Ok(Some(message)) => message,
                        Ok(None) if ends_message => match framer.flush_at_end(&mut self.buf) {
                            Some(message) => message,
                            None => return Ok(Decoded::Drained),
                        },
                        Ok(None) => return Ok(Decoded::Drained),
                        Err(error) => return Err(Close::Protocol(error.to_string())),
                    };
                    self.shared.metrics.listener(self.protocol).frames_received.inc();
                    self.on_message(UplinkKind::Raw, message).await;
                }
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame, closing: bool) -> Result<(), Close> {
        self.shared.metrics.listener(self.protocol).frames_received.inc();
        if frame.frame_type == FrameType::Heartbeat {
            // A heartbeat costs a token like any frame: a flood of them is a flood.
            self.spend_rate();
            // Closing: the device gets no more answers.
            return if closing { Ok(()) } else { self.write(&Frame::heartbeat(frame.cmd).to_bytes()).await };
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

    fn spend_rate(&mut self) {
        if let Some(rate) = &mut self.rate {
            rate.spend();
        }
    }

    async fn on_message(&mut self, kind: UplinkKind, payload: Bytes) {
        self.spend_rate();
        let handle = self.handle.as_ref().expect("messages after authentication");
        // One uplink, one trace: this span is its root (the session's span is in logs
        // only). At DEBUG: without export it is not created at the default log level.
        let span = tracing::debug_span!(
            "receive",
            "otel.kind" = "server",
            "network.transport" = "tcp",
            "tcpc.listener" = listener_label(self.protocol),
            "tcpc.device.id" = %handle.device_id,
            "tcpc.connection.id" = %self.id,
            "tcpc.uplink.kind" = kind.as_str_name(),
            "messaging.message.body.size" = payload.len(),
        );
        let uplink = Uplink {
            device_id: handle.device_id.to_string(),
            connection_id: self.id.to_string(),
            protocol: self.protocol.into(),
            kind: kind.into(),
            payload,
            received_at_ms: tcpc_proto::now_ms(),
            sequence: self.sequence,
        };
        self.publish(uplink_envelope::Body::Uplink(uplink)).instrument(span).await;
    }

    /// Writes the queued downlinks whose callers still wait; takes a close order.
    async fn serve_mailbox(&mut self, handle: &SessionHandle, closing: bool) -> Result<(), Close> {
        let (writes, order) = handle.take();
        for outbound in writes {
            if outbound.abandoned() {
                // The caller answered the platform already (deadline): never write late.
                self.shared.metrics.downlinks.get_or_create(&ReasonLabel { reason: "abandoned" }).inc();
                continue;
            }
            if closing {
                // Dropped unanswered: the caller reads "offline".
                continue;
            }
            // The span of this write, a child of the worker's Deliver call.
            let result = self.write(&outbound.bytes).instrument(outbound.span.clone()).await;
            let _ = outbound.done.send(result.clone().map_err(|_| "write to the device failed".to_owned()));
            result?;
        }
        order.map_or(Ok(()), |order| Err(Close::Order(order)))
    }

    async fn on_timer(&mut self, closing: bool) -> Result<(), Close> {
        self.resend_if_due().await;
        let now = Instant::now();
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
            Close::Protocol(error) => {
                warn!(conn = %self.id, device_id = self.device_id(), %error, "malformed input; closing")
            }
            Close::Tls(error) => debug!(%error, "TLS handshake failed"),
            Close::AuthRefused(_) | Close::AuthTimeout | Close::AuthUnavailable => {
                shared.metrics.auth.get_or_create(&ReasonLabel { reason: close.label() }).inc();
                info!(conn = %self.id, reason = close.label(), "authentication failed");
            }
            Close::Refused(refusal) => debug!(reason = refusal.label(), "refused by the source limits"),
            other => info!(conn = %self.id, device_id = self.device_id(), reason = other.label(), "closing"),
        }
        if let Some(source) = self.source.take() {
            shared.sources.release(source);
        }
        if let Some(message) = close.device_message() {
            let bytes = error_bytes(self.protocol, self.handle.is_none(), &message);
            if let Ok(Ok(())) =
                tokio::time::timeout(ERROR_FRAME_DEADLINE, self.stream.write_all(&bytes)).await
            {
                self.count_sent(bytes.len());
            }
        }
        let _ = tokio::time::timeout(ERROR_FRAME_DEADLINE, self.stream.shutdown()).await;
        let Some(handle) = self.handle.take() else { return };
        handle.end();
        shared.registry.remove(self.id);
        self.count_lost(&handle.device_id);
        // Only the owner of the route reports the device offline; when the route store
        // cannot tell, the worker checks the route before believing the offline.
        let owned_route =
            match shared.routes.remove(&handle.device_id, &self.id.to_string(), &shared.pod).await {
                Ok(true) => true,
                Ok(false) => {
                    debug!("route already taken by a newer connection; no offline event");
                    return;
                }
                Err(error) => {
                    warn!(conn = %self.id, device_id = %handle.device_id, %error, "route not removed");
                    false
                }
            };
        self.handle = Some(handle);
        self.publish(self.session_event(SessionState::Offline, close.label(), owned_route)).await;
        let deadline = Instant::now() + shared.config.limits.publish_timeout;
        while !self.window.is_empty() && Instant::now() < deadline {
            let resend_at = self.window.resend_at().unwrap_or(deadline).min(deadline);
            tokio::select! {
                ack = self.window.head_ack() => self.on_ack(ack),
                _ = tokio::time::sleep_until(resend_at) => self.resend_if_due().await,
            }
        }
        if !self.window.is_empty() {
            warn!(conn = %self.id, device_id = self.device_id(), "offline event not stored");
        }
    }

    /// Counts and logs what the flush budget could not save: envelopes not acknowledged
    /// and bytes read but never a complete message.
    fn count_lost(&mut self, device_id: &str) {
        let unacknowledged = self.window.abandon();
        let unread = self.buf.len();
        self.buf = BytesMut::new();
        if unacknowledged > 0 {
            self.shared
                .metrics
                .lost
                .get_or_create(&ReasonLabel { reason: "unacknowledged" })
                .inc_by(unacknowledged as u64);
            error!(
                conn = %self.id,
                device_id,
                unacknowledged,
                "uplinks not stored before the connection closed"
            );
        }
        if unread > 0 {
            self.shared.metrics.lost.get_or_create(&ReasonLabel { reason: "incomplete" }).inc();
            warn!(
                conn = %self.id,
                device_id,
                bytes = unread,
                "bytes of an incomplete message dropped at close"
            );
        }
    }
}
