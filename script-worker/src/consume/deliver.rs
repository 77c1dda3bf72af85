//! Delivering one partition: a continuous pull from its consumer; envelopes handed to
//! the platform in order (the stream's, each connection's own restored by the reorder)
//! while the ones before still wait for the broker's acknowledgement; one JetStream ack
//! (AckPolicy::All) for everything delivered so far.
//!
//! Why pipelined: a fetch → deliver → wait for every PUBACK → ack cycle made each
//! envelope at moderate rates pay its own pull request, PUBACK wait and ack (a fetch
//! found about one envelope): NATS spent 40–60 µs of CPU per message on it. Here pull
//! requests stay outstanding, the next envelopes are mapped and queued while the broker
//! acknowledges the previous ones, and an ack goes out per [`ACK_EVERY`] envelopes or
//! [`ACK_DELAY`] after the first one it covers.
//!
//! Order and retries: envelopes are handed in order, all to the sink connection
//! (its epoch) that the oldest one in flight went to. That connection acknowledges in
//! order, and a lost one fails every later message of its epoch, so what fails is a
//! suffix starting at the oldest envelope in flight: the whole suffix is handed again,
//! in order, after a back-off (duplicates, never gaps or reordering). A mapping that
//! fails (a lookup the platform or Redis could not answer) stops the handing at that
//! envelope until the back-off; the ones before it settle meanwhile, and if they fail
//! the retry starts with them.
//!
//! Each connection's order: an edge with several publishes in flight may have them
//! stored out of order across a NATS reconnect; envelopes pass through a
//! [`Reorder`] first, which holds those past a gap until it fills (or for
//! [`reorder::HOLD`], or until their connection's Offline event comes). The ack never
//! covers an envelope still held or under way: a ledger of everything received, in
//! stream order, says up to where all is delivered.
//!
//! Redeliveries: JetStream redelivers what stays unacknowledged past the consumer's
//! `ack_wait` (a long outage of the platform broker, a lost ack). Every envelope up to
//! the highest stream sequence received is either delivered or still under way here,
//! so a redelivery is dropped (and acknowledged again if it was delivered).
//!
//! Deliveries lost in transit (this worker's NATS connection broke while some were on
//! their way) show as a jump in the consumer's delivery sequence. Nothing past the jump
//! is taken: what came before is finished and acknowledged, the delivery ends, and the
//! partition's consumer is made again to start after its ack floor (`take_over`), so
//! the lost ones come next, in order, instead of after `ack_wait` behind newer ones
//! whose ack would have covered them unseen.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt};
use prost::Message as _;
use tcpc_observe::Chain;
use tcpc_proto::backoff::Backoff;
use tcpc_proto::v1::{SessionState, UplinkEnvelope, uplink_envelope};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Lease, Partitions};
use crate::metrics::ReasonLabel;
use crate::pipeline::{HandleError, Handled};
use crate::reorder::{self, Reorder};
use crate::sink::Epoch;

/// Envelopes asked for per pull request; another is asked once half have come.
const PULL_BATCH: usize = 256;
/// Envelopes received and not yet delivered (held in the reorder included), at most:
/// past it the pull waits.
const MAX_IN_FLIGHT: usize = 1024;
/// Envelopes received and not yet acknowledged, at most (below the consumer's
/// `max_ack_pending`): envelopes delivered behind one held in the reorder wait here for
/// the ack. Reached, the reorder gives up its gaps at once: a pull stopped behind a gap
/// could never receive the envelope that would fill it.
const MAX_UNACKNOWLEDGED: usize = 8192;
/// Envelopes handed per turn of the loop, at most, so that acks, stops and settled
/// deliveries are seen in between.
const HAND_PER_TURN: usize = 64;
/// Delivered envelopes that one ack covers, at most.
const ACK_EVERY: usize = 256;
/// How long a delivered envelope waits for its ack, at most, when nothing held before it
/// holds the ack back: what a crashed worker's successor delivers twice.
const ACK_DELAY: Duration = Duration::from_millis(100);
/// How often the partition's resume point is recorded in Redis while delivering.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// The consumer's idle heartbeat: a pull that hears nothing for twice this is renewed.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// An envelope received and not yet delivered.
pub(super) struct Undelivered {
    message: jetstream::Message,
    /// Its stream sequence.
    sequence: u64,
    /// Its delivery under way; None until handed (again).
    handled: Option<Handled>,
}

/// One partition's delivery state.
pub(super) struct Delivery<'a> {
    partitions: &'a Partitions,
    partition: u32,
    lease: &'a Lease,
    /// Each connection's envelopes put back in order (see [`crate::reorder`]): those
    /// past a gap wait there. The consumer's, kept across its deliveries.
    reorder: &'a mut Reorder<Undelivered>,
    /// Its gaps and late envelopes counted so far (the metrics count the differences).
    reorder_counts: (u64, u64),
    /// Released by the reorder and not delivered, in that order; the first `handed`
    /// are in flight.
    undelivered: VecDeque<Undelivered>,
    handed: usize,
    /// The sink connection the envelopes in flight went to.
    epoch: Epoch,
    /// After a failure, handing waits until then.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// The highest stream sequence received: anything at or below it is a redelivery.
    received: u64,
    /// The consumer's last delivery sequence (every delivery raises it by one,
    /// redeliveries included): a jump is deliveries lost in transit.
    delivery_sequence: u64,
    /// Every envelope received and not yet acknowledged, in stream order, with its
    /// message once delivered: an ack (AckPolicy::All) covers the delivered ones before
    /// the first that is not, never one held in the reorder or still under way.
    ledger: VecDeque<(u64, Option<jetstream::Message>)>,
    /// The newest envelope delivered and not acknowledged, how many it covers, and when
    /// the first of them was delivered.
    unacked: Option<(jetstream::Message, usize, Instant)>,
    /// The highest stream sequence delivered with all before it, and the last one
    /// recorded in Redis (when).
    delivered: u64,
    recorded: (u64, Instant),
}

/// What the delivery loop waited for.
#[expect(
    clippy::large_enum_variant,
    reason = "one on the stack per turn; boxing would allocate per envelope"
)]
enum Event {
    /// The oldest envelope in flight was delivered, or not.
    Settled(Result<(), HandleError>),
    RetryDue,
    AckDue,
    /// Envelopes held past a gap waited for it long enough.
    HoldOver,
    /// The lease lapses now unless it was renewed: an idle partition must notice too.
    LeaseDue,
    /// Asked to stop (shutdown, hand-over): what is in flight is finished and
    /// acknowledged first.
    Stop,
    /// The pull's next envelope; None once the pull is over.
    Pulled(Option<Result<jetstream::Message, consumer::pull::MessagesError>>),
}

/// The lease may have lapsed: nothing more is done for the partition.
struct LeaseLapsed;

/// Deliveries were lost on their way to this worker: the delivery starts over.
struct LostInTransit;

impl<'a> Delivery<'a> {
    pub(super) fn new(
        partitions: &'a Partitions,
        partition: u32,
        lease: &'a Lease,
        reorder: &'a mut Reorder<Undelivered>,
    ) -> Self {
        Delivery {
            partitions,
            partition,
            lease,
            reorder_counts: (reorder.gaps(), reorder.late()),
            reorder,
            undelivered: VecDeque::new(),
            handed: 0,
            epoch: partitions.pipeline.sink.epoch(),
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            received: 0,
            delivery_sequence: 0,
            ledger: VecDeque::new(),
            unacked: None,
            delivered: 0,
            recorded: (0, Instant::now()),
        }
    }

    /// Delivers the partition's envelopes until `stop` or the lease lapses.
    ///
    /// A batch under way is finished and acknowledged even when asked to stop (shutdown,
    /// hand-over): what the platform already has must not come again from the next
    /// owner. The caller bounds the wait (see `Partitions::release`) and aborts past
    /// it; a lost lease aborts at once.
    pub(super) async fn run(mut self, consumer: &consumer::PullConsumer, stop: &CancellationToken) {
        let Some(mut pulled) = Self::pull(self.partition, consumer, stop).await else { return };
        let mut draining = false;
        loop {
            if !self.lease.is_held() {
                return self.lease_lapsed();
            }
            if draining && self.handed == 0 {
                break;
            }
            if !draining && let Err(LeaseLapsed) = self.hand().await {
                return self.lease_lapsed();
            }
            if self.ledger.len() >= MAX_UNACKNOWLEDGED && self.reorder.held() > 0 {
                warn!(
                    partition = self.partition,
                    held = self.reorder.held(),
                    "unacknowledged envelopes at their bound; the reorder gives up its gaps"
                );
                let released = self.reorder.expire(Instant::now() + reorder::HOLD);
                self.undelivered.extend(released);
                self.count_reordering();
            }
            let receiving = !draining && self.receiving();
            let retry_at = self.retry_at.unwrap_or_else(Instant::now);
            let hold_over_at = self.reorder.next_deadline();
            let ack_at = self.unacked.as_ref().map_or_else(Instant::now, |(_, _, since)| *since + ACK_DELAY);
            let front = self.undelivered.front_mut().and_then(|first| first.handled.as_mut());
            let event = tokio::select! {
                biased;
                settled = async { front.expect("one is in flight").await }, if self.handed > 0 => Event::Settled(settled),
                () = tokio::time::sleep_until(retry_at), if self.retry_at.is_some() => Event::RetryDue,
                () = tokio::time::sleep_until(ack_at), if self.unacked.is_some() => Event::AckDue,
                () = tokio::time::sleep_until(hold_over_at.unwrap_or_else(Instant::now)), if hold_over_at.is_some() => Event::HoldOver,
                () = tokio::time::sleep_until(self.lease.lapses_at()) => Event::LeaseDue,
                () = stop.cancelled(), if !draining => Event::Stop,
                next = pulled.next(), if receiving => Event::Pulled(next),
            };
            match event {
                Event::Settled(settled) => self.settle(settled),
                Event::RetryDue => self.retry_at = None,
                // Checked at the top of the loop.
                Event::LeaseDue => {}
                Event::AckDue => self.acknowledge(false).await,
                Event::HoldOver => {
                    let released = self.reorder.expire(Instant::now());
                    self.undelivered.extend(released);
                    self.count_reordering();
                }
                Event::Stop => draining = true,
                Event::Pulled(next) => {
                    draining = self.take(next).await;
                    // What else the pull has ready comes in now: handed together, its
                    // scripts run in one go.
                    for _ in 1..HAND_PER_TURN {
                        if draining || !self.receiving() {
                            break;
                        }
                        let Some(next) = pulled.next().now_or_never() else { break };
                        draining = self.take(next).await;
                    }
                }
            }
            if self.unacked.as_ref().is_some_and(|(_, covered, _)| *covered >= ACK_EVERY) {
                self.acknowledge(false).await;
            }
        }
        self.acknowledge(true).await;
    }

    /// Whether another envelope may come in (no retry pending, room in flight and
    /// unacknowledged).
    fn receiving(&self) -> bool {
        self.retry_at.is_none()
            && self.undelivered.len() + self.reorder.held() < MAX_IN_FLIGHT
            && self.ledger.len() < MAX_UNACKNOWLEDGED
    }

    /// Takes what the pull gave; whether the delivery must end (drain what is in
    /// flight, then stop).
    async fn take(
        &mut self,
        next: Option<Result<jetstream::Message, consumer::pull::MessagesError>>,
    ) -> bool {
        match next {
            Some(Ok(message)) => matches!(self.receive(message).await, Err(LostInTransit)),
            Some(Err(error)) if is_pull_over(&error) => {
                warn!(partition = self.partition, %error, "partition pull ended");
                true
            }
            Some(Err(error)) => {
                warn!(partition = self.partition, %error, "partition pull interrupted");
                false
            }
            None => true,
        }
    }

    /// The consumer's continuous pull, opened again with back-off until `stop`.
    async fn pull(
        partition: u32,
        consumer: &consumer::PullConsumer,
        stop: &CancellationToken,
    ) -> Option<consumer::pull::Stream> {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        super::retry_until_stopped(partition, "partition pull not opened", backoff, stop, || {
            consumer.stream().max_messages_per_batch(PULL_BATCH).heartbeat(HEARTBEAT).messages()
        })
        .await
    }

    fn lease_lapsed(&self) {
        warn!(
            partition = self.partition,
            "partition lease not renewed in time; stopping without acting on it"
        );
    }

    /// Takes in a pulled envelope, or drops a redelivery; refuses it, and every later
    /// one, after deliveries lost in transit.
    async fn receive(&mut self, message: jetstream::Message) -> Result<(), LostInTransit> {
        let (sequence, delivery) = match message.info() {
            Ok(info) => (info.stream_sequence, info.consumer_sequence),
            Err(error) => {
                warn!(partition = self.partition, %error, "envelope without a stream sequence; skipped");
                return Ok(());
            }
        };
        if self.delivery_sequence != 0 && delivery != self.delivery_sequence + 1 {
            warn!(
                partition = self.partition,
                expected = self.delivery_sequence + 1,
                delivery,
                "deliveries lost in transit; starting again after the acknowledged floor"
            );
            return Err(LostInTransit);
        }
        self.delivery_sequence = delivery;
        if sequence <= self.received {
            // Delivered already: ack it again, or JetStream would keep redelivering it
            // to an idle partition. Still under way: its own ack will come.
            if sequence <= self.delivered
                && self.lease.is_held()
                && let Err(error) = message.ack().await
            {
                warn!(partition = self.partition, %error, "redelivered envelope's ack not sent");
            }
            return Ok(());
        }
        self.received = sequence;
        self.ledger.push_back((sequence, None));
        let id =
            message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|id| id.as_str().to_owned());
        let released = self.reorder.push(
            id.as_deref(),
            Undelivered { message, sequence, handled: None },
            Instant::now(),
            |undelivered| is_offline(&undelivered.message.payload),
        );
        self.undelivered.extend(released);
        self.count_reordering();
        Ok(())
    }

    /// Counts the reorder's gaps given up on and late envelopes since the last count.
    fn count_reordering(&mut self) {
        let counts = (self.reorder.gaps(), self.reorder.late());
        if counts != self.reorder_counts {
            let out_of_order = &self.partitions.pipeline.metrics.uplink_out_of_order;
            out_of_order
                .get_or_create(&ReasonLabel { reason: "gap" })
                .inc_by(counts.0 - self.reorder_counts.0);
            out_of_order
                .get_or_create(&ReasonLabel { reason: "late" })
                .inc_by(counts.1 - self.reorder_counts.1);
            self.reorder_counts = counts;
        }
    }

    /// Hands the envelopes not in flight to the pipeline, in order and together (their
    /// scripts run in one go), unless a retry is pending; stops at the first that fails
    /// (it is retried after a back-off).
    async fn hand(&mut self) -> Result<(), LeaseLapsed> {
        let until = (self.handed + HAND_PER_TURN).min(self.undelivered.len());
        if self.handed == until || self.retry_at.is_some() {
            return Ok(());
        }
        if !self.lease.is_held() {
            return Err(LeaseLapsed);
        }
        if self.handed == 0 {
            // Nothing in flight: the sink's current connection.
            self.epoch = self.partitions.pipeline.sink.epoch();
        }
        let envelopes = self
            .undelivered
            .range(self.handed..until)
            .map(|undelivered| {
                let message = &undelivered.message;
                // One uplink, one trace: a child of the edge's publish, whose context the
                // message's headers carry.
                let span = tcpc_proto::nats_span!(
                    "process",
                    "consumer",
                    "process",
                    "process",
                    message.subject,
                    "messaging.message.id" =
                        message.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|id| id.as_str()),
                    "messaging.message.body.size" = message.payload.len(),
                );
                tcpc_proto::trace::follow_nats(&span, message.headers.as_ref());
                (message.payload.clone(), span)
            })
            .collect::<Vec<_>>();
        let count = envelopes.len();
        let lease = self.lease;
        let handled = self.partitions.pipeline.handle_all(envelopes, self.epoch, &|| lease.is_held()).await;
        let short = handled.len() < count;
        for handled in handled {
            match handled {
                Ok(handled) => {
                    self.undelivered[self.handed].handled = Some(handled);
                    self.handed += 1;
                }
                Err(error) => {
                    self.retry(&error);
                    break;
                }
            }
        }
        if short && !self.lease.is_held() {
            return Err(LeaseLapsed);
        }
        Ok(())
    }

    /// Applies the oldest envelope's outcome: delivered, or it and every later one in
    /// flight are handed again after a back-off.
    fn settle(&mut self, settled: Result<(), HandleError>) {
        match settled {
            Ok(()) => {
                let delivered = self.undelivered.pop_front().expect("one was in flight");
                self.handed -= 1;
                self.backoff.reset();
                let at = self
                    .ledger
                    .binary_search_by_key(&delivered.sequence, |(sequence, _)| *sequence)
                    .expect("every envelope received is in the ledger until acknowledged");
                self.ledger[at].1 = Some(delivered.message);
                while let Some((_, Some(_))) = self.ledger.front() {
                    let (sequence, message) = self.ledger.pop_front().expect("checked");
                    self.delivered = sequence;
                    let (covered, since) = match self.unacked.take() {
                        Some((_, covered, since)) => (covered + 1, since),
                        None => (1, Instant::now()),
                    };
                    self.unacked = Some((message.expect("checked"), covered, since));
                }
            }
            Err(error) => {
                for undelivered in self.undelivered.iter_mut().take(self.handed) {
                    undelivered.handled = None;
                }
                self.handed = 0;
                self.retry(&error);
            }
        }
    }

    /// Schedules the retry after a transient failure (permanent ones were dead-lettered).
    fn retry(&mut self, error: &HandleError) {
        let retry_in = self.backoff.next_delay();
        self.partitions.pipeline.metrics.retries.inc();
        warn!(partition = self.partition, error = %Chain(error), ?retry_in, "envelope not delivered to the platform");
        self.retry_at = Some(Instant::now() + retry_in);
    }

    /// Acknowledges every envelope delivered so far (one ack: AckPolicy::All), and
    /// records the resume point if it is due (or `last`: the delivery ends).
    async fn acknowledge(&mut self, last: bool) {
        if !self.lease.is_held() {
            // Unacknowledged: whoever holds the lease now takes them again.
            return;
        }
        let unacked = self.unacked.take().map(|(message, _, _)| message);
        let ack = async {
            match &unacked {
                Some(message) => message.ack().await,
                None => Ok(()),
            }
        };
        // Recorded alongside the ack, not after it: the envelopes were delivered,
        // whatever becomes of the ack.
        let (partitions, partition, delivered, (recorded, at)) =
            (self.partitions, self.partition, self.delivered, self.recorded);
        let record = async move {
            if delivered > recorded && (last || at.elapsed() >= RECORD_EVERY) {
                partitions.record_delivered(partition, delivered).await;
                Some((delivered, Instant::now()))
            } else {
                None
            }
        };
        let (acked, recorded) = tokio::join!(ack, record);
        if let Some(recorded) = recorded {
            self.recorded = recorded;
        }
        if let Err(error) = acked {
            warn!(partition = self.partition, %error, "ack not sent; the envelopes will be redelivered");
        }
    }
}

/// Whether a pull error ends the pull (the consumer is gone or refuses it): the
/// partition is taken again (see `Partitions::run`).
fn is_pull_over(error: &consumer::pull::MessagesError) -> bool {
    use consumer::pull::MessagesErrorKind as Kind;
    matches!(error.kind(), Kind::ConsumerDeleted | Kind::PushBasedConsumer | Kind::RequestLimitExceeded)
}

/// Whether an envelope is a connection's Offline session event: its connection's last
/// (see [`crate::reorder`]). Decoded here only for an envelope held past a gap; one that
/// does not decode is not (the pipeline dead-letters it).
fn is_offline(envelope: &Bytes) -> bool {
    match UplinkEnvelope::decode(envelope.clone()) {
        Ok(UplinkEnvelope { body: Some(uplink_envelope::Body::Session(event)) }) => {
            event.state() == SessionState::Offline
        }
        _ => false,
    }
}

/// The header JetStream de-duplicates by (the edge's `<connection>-<sequence>`).
const NATS_MESSAGE_ID: &str = "Nats-Msg-Id";
