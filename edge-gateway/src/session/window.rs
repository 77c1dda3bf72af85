//! The publish window of one session: envelopes handed to the bus and not yet
//! acknowledged, in order.
//!
//! Ordering and loss: envelopes are published in arrival order with message ids
//! `<connection>-<sequence>`; the window holds each until the bus acknowledged it; a
//! failed publish or acknowledgement re-sends the window from its head, in order, after
//! a jittered back-off (the bus stores a repeated id once), one envelope at a time, each
//! after the previous one's acknowledgement, until the window is empty: an overloaded
//! JetStream whose acks time out gets each envelope once more, not the whole window
//! again per failure. While the window is full or recovering the session does not read
//! its socket: back-pressure reaches the device as TCP flow control.
//!
//! Memory: the window's storage is released when it empties, so an idle session holds
//! none.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tcpc_proto::names;
use tokio::time::Instant;
use tracing::{Instrument as _, debug};

use crate::registry::ConnectionId;
use crate::uplink::{AckFuture, BusError, UplinkBus};

/// First re-send delay after a failure; doubles per consecutive failure.
const RESEND_INITIAL: Duration = Duration::from_millis(100);
/// Longest re-send delay.
const RESEND_MAX: Duration = Duration::from_secs(5);

/// Where a session's envelopes go.
#[derive(Clone, Copy)]
pub(crate) struct Outlet<'a> {
    pub bus: &'a dyn UplinkBus,
    /// The device's partition of the uplink stream.
    pub partition: u32,
    pub connection: ConnectionId,
    /// Deadline of handing one envelope to the bus.
    pub timeout: Duration,
}

/// One envelope the bus has not acknowledged yet.
struct InFlight {
    sequence: u64,
    envelope: Bytes,
    /// None until (re)published.
    ack: Option<AckFuture>,
    /// When it was first handed to the bus (the publish latency's start).
    since: Instant,
    /// Its publish span, ended by the acknowledgement (or the session giving up on it).
    span: tracing::Span,
}

/// The unacknowledged envelopes of one session.
#[derive(Default)]
pub(crate) struct Window {
    entries: VecDeque<InFlight>,
    /// A failed publish or ack: the window is re-sent at this time.
    resend_at: Option<Instant>,
    /// Consecutive failures, for the back-off.
    failures: u8,
    /// Since a failure, until the window empties: one envelope in flight at a time.
    recovering: bool,
}

impl Window {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether another envelope may go out now: fewer than `max` in flight, no re-send
    /// pending and not recovering from a failure.
    pub fn has_room(&self, max: usize) -> bool {
        self.resend_at.is_none() && !self.recovering && self.entries.len() < max
    }

    /// When the pending re-send is due.
    pub fn resend_at(&self) -> Option<Instant> {
        self.resend_at
    }

    /// Appends an envelope and publishes it, unless a re-send is pending or under way
    /// (then it goes out in its turn, in order).
    pub async fn publish(&mut self, outlet: Outlet<'_>, sequence: u64, envelope: Bytes) {
        let span = tcpc_proto::nats_span!(
            "publish",
            "producer",
            "send",
            "publish",
            names::uplink_subject(outlet.partition),
            "messaging.message.id" = %names::uplink_message_id(&outlet.connection.to_string(), sequence),
            "messaging.message.body.size" = envelope.len(),
        );
        let mut entry = InFlight { sequence, envelope, ack: None, since: Instant::now(), span };
        if self.resend_at.is_none() && !self.recovering {
            let publish = publish_one(outlet, sequence, entry.envelope.clone());
            match publish.instrument(entry.span.clone()).await {
                Some(ack) => entry.ack = Some(ack),
                None => self.schedule_resend(),
            }
        }
        self.entries.push_back(entry);
    }

    fn schedule_resend(&mut self) {
        // Every ack in the window is abandoned: the whole window goes out again, in order.
        for entry in &mut self.entries {
            entry.ack = None;
        }
        self.recovering = true;
        let delay = tcpc_proto::backoff::delay(RESEND_INITIAL, RESEND_MAX, self.failures.into());
        self.failures = self.failures.saturating_add(1);
        self.resend_at = Some(Instant::now() + delay);
    }

    /// Re-sends the window's head if the re-send is due and it is not in flight; how
    /// many envelopes went out again (0 or 1).
    pub async fn resend_if_due(&mut self, outlet: Outlet<'_>) -> usize {
        if self.resend_at.is_none_or(|at| at > Instant::now()) {
            return 0;
        }
        self.resend_at = None;
        let Some(head) = self.entries.front() else { return 0 };
        if head.ack.is_some() {
            return 0;
        }
        let publish = publish_one(outlet, head.sequence, head.envelope.clone());
        match publish.instrument(head.span.clone()).await {
            Some(ack) => {
                self.entries[0].ack = Some(ack);
                1
            }
            None => {
                self.schedule_resend();
                0
            }
        }
    }

    /// Waits for the acknowledgement of the window's head; pending forever while there
    /// is none to wait for. Cancel-safe: the ack future stays in the window.
    pub async fn head_ack(&mut self) -> Result<(), BusError> {
        match self.entries.front_mut().and_then(|entry| entry.ack.as_mut()) {
            Some(ack) => ack.await,
            None => std::future::pending().await,
        }
    }

    /// Applies the head's acknowledgement; when an envelope was stored, how long it took
    /// from its first publish.
    pub fn on_ack(&mut self, result: Result<(), BusError>) -> Option<Duration> {
        match result {
            Ok(()) => {
                let stored = self.entries.pop_front()?;
                self.failures = 0;
                if self.entries.is_empty() {
                    // Give back the window's storage: idle sessions hold none.
                    self.entries = VecDeque::new();
                    self.recovering = false;
                } else if self.recovering {
                    // The next one goes out again at once.
                    self.resend_at = Some(Instant::now());
                }
                Some(stored.since.elapsed())
            }
            Err(error) => {
                debug!(%error, "uplink not acknowledged; re-sending the window");
                self.schedule_resend();
                None
            }
        }
    }

    /// Forgets every envelope (the session gave up on them); how many there were.
    pub fn abandon(&mut self) -> usize {
        self.resend_at = None;
        self.recovering = false;
        std::mem::take(&mut self.entries).len()
    }
}

/// Hands one envelope to the bus; None when that failed (the caller schedules a re-send).
async fn publish_one(outlet: Outlet<'_>, sequence: u64, envelope: Bytes) -> Option<AckFuture> {
    let message_id = names::uplink_message_id(&outlet.connection.to_string(), sequence);
    let publish = outlet.bus.publish(names::uplink_subject(outlet.partition), message_id, envelope);
    match tokio::time::timeout(outlet.timeout, publish).await {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use tcpc_proto::v1::{AuthReply, AuthRequest};

    use super::*;

    /// A bus that records every publish and fails the ones its script says to.
    #[derive(Default)]
    struct ScriptedBus {
        /// (message id, payload) of every publish attempt, in order.
        published: Mutex<Vec<(String, Bytes)>>,
        /// Outcomes of the coming publishes: false = the ack fails. Empty = succeed.
        outcomes: Mutex<VecDeque<bool>>,
    }

    impl ScriptedBus {
        fn failing(n: usize) -> Self {
            ScriptedBus {
                outcomes: Mutex::new(std::iter::repeat_n(false, n).collect()),
                ..Default::default()
            }
        }

        fn ids(&self) -> Vec<String> {
            self.published.lock().unwrap().iter().map(|(id, _)| id.clone()).collect()
        }
    }

    impl UplinkBus for ScriptedBus {
        fn publish(
            &self,
            _subject: String,
            message_id: String,
            envelope: Bytes,
        ) -> BoxFuture<'_, Result<AckFuture, BusError>> {
            self.published.lock().unwrap().push((message_id, envelope));
            let ok = self.outcomes.lock().unwrap().pop_front().unwrap_or(true);
            Box::pin(async move {
                let ack: AckFuture = Box::pin(async move { if ok { Ok(()) } else { Err(BusError::Closed) } });
                Ok(ack)
            })
        }

        fn authenticate(&self, _: AuthRequest, _: Duration) -> BoxFuture<'_, Result<AuthReply, BusError>> {
            Box::pin(async { Err(BusError::Closed) })
        }

        fn is_ready(&self) -> bool {
            true
        }
    }

    fn outlet(bus: &ScriptedBus) -> Outlet<'_> {
        Outlet {
            bus,
            partition: 0,
            connection: ConnectionId { process: 0, counter: 7 },
            timeout: Duration::from_secs(1),
        }
    }

    fn id(sequence: u64) -> String {
        names::uplink_message_id(&ConnectionId { process: 0, counter: 7 }.to_string(), sequence)
    }

    /// Awaits the head's acknowledgement and applies it; whether it stored.
    async fn settle(window: &mut Window) -> bool {
        let ack = window.head_ack().await;
        window.on_ack(ack).is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_ack_resends_the_window_in_order_one_at_a_time_after_a_back_off() {
        let bus = ScriptedBus::failing(1);
        let mut window = Window::default();
        for sequence in 0..3 {
            window.publish(outlet(&bus), sequence, Bytes::from(vec![sequence as u8])).await;
        }
        assert!(!window.has_room(3));
        assert!(!settle(&mut window).await, "the head's ack failed");
        let due = window.resend_at().expect("a re-send is scheduled");
        assert!(due > Instant::now() && due <= Instant::now() + RESEND_INITIAL);
        assert_eq!(window.resend_if_due(outlet(&bus)).await, 0, "not before it is due");
        tokio::time::sleep_until(due).await;
        // One at a time, each after the previous one's ack; nothing new meanwhile.
        for resent in 0..3 {
            assert!(!window.has_room(3), "recovering");
            assert_eq!(window.resend_if_due(outlet(&bus)).await, 1);
            assert_eq!(window.resend_if_due(outlet(&bus)).await, 0, "the head is in flight");
            assert_eq!(bus.ids().len(), 4 + resent);
            assert!(settle(&mut window).await);
        }
        assert!(window.is_empty());
        assert_eq!(bus.ids(), [0, 1, 2, 0, 1, 2].map(id));
        assert!(window.has_room(1));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_back_off_exponentially_and_a_success_resets() {
        let bus = ScriptedBus::failing(4);
        let mut window = Window::default();
        window.publish(outlet(&bus), 0, Bytes::from_static(b"x")).await;
        let mut delays = Vec::new();
        for _ in 0..4 {
            let failed = window.head_ack().await;
            assert!(window.on_ack(failed).is_none());
            let due = window.resend_at().unwrap();
            delays.push(due - Instant::now());
            tokio::time::sleep_until(due).await;
            window.resend_if_due(outlet(&bus)).await;
        }
        // Jittered within [step/2, step] of 100, 200, 400, 800 ms.
        for (delay, step) in delays.iter().zip([100, 200, 400, 800].map(Duration::from_millis)) {
            assert!(*delay >= step / 2 && *delay <= step, "{delay:?} for a step of {step:?}");
        }
        assert!(settle(&mut window).await);
        assert_eq!(window.failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_during_a_pending_resend_waits_for_it() {
        let bus = ScriptedBus::failing(1);
        let mut window = Window::default();
        window.publish(outlet(&bus), 0, Bytes::from_static(b"a")).await;
        assert!(!settle(&mut window).await);
        window.publish(outlet(&bus), 1, Bytes::from_static(b"b")).await;
        assert_eq!(bus.ids(), [id(0)], "sequence 1 is held back behind the re-send");
        tokio::time::sleep_until(window.resend_at().unwrap()).await;
        assert_eq!(window.resend_if_due(outlet(&bus)).await, 1);
        assert!(settle(&mut window).await);
        assert_eq!(window.resend_if_due(outlet(&bus)).await, 1, "then the one that waited");
        assert_eq!(bus.ids(), [0, 0, 1].map(id));
        assert_eq!(window.abandon(), 1);
        assert!(window.is_empty());
        assert!(window.has_room(1), "a new start");
    }
}
