//! Publishes handed to the NATS client in bursts.
//!
//! Why: the NATS client writes whatever is queued when its task runs, so publishes that
//! arrive one at a time (a thousand devices each sending now and then) each cost a
//! write here, a read and a store wake-up in nats-server, an acknowledgement written
//! back, and the same again on the worker's side of the stream. Bursts go at most once
//! per linger: a publish after a quiet spell goes at once, one within the linger of the
//! last burst waits for its end, with every other that comes meanwhile, and they go out
//! in one write; nats-server then reads, stores, acknowledges and delivers them as one
//! batch. The price is the wait, at most the linger (the timer's resolution is 1 ms),
//! and only when publishes come faster than one per linger. A full burst (see
//! [`BURST`]) never waits.
//!
//! One task per bus runs the bursts: it queues each publish on the client in arrival
//! order (so one caller's envelopes still reach the bus in call order) and awaits the
//! acknowledgements, each handed to its caller and the last one's time recorded
//! ([`LastAck`]: the stream probe's evidence).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{AckFuture, BusError, LastAck};

/// Most publishes in one burst; a burst this full goes out without waiting for the
/// linger (the rate alone coalesces).
const BURST: usize = 256;

/// Publishes waiting for their burst, at most (then callers wait: back-pressure).
const QUEUED: usize = 4 * BURST;

enum Request {
    Publish {
        subject: String,
        message: PublishMessage,
        acked: oneshot::Sender<Result<(), BusError>>,
    },
    /// Answered once every publish queued before it is on the client.
    Flush(oneshot::Sender<()>),
}

/// The handle of the burst task; the task ends when the handle is dropped, after
/// queueing what it holds and awaiting those acknowledgements.
pub(super) struct Linger {
    requests: mpsc::Sender<Request>,
}

impl Linger {
    pub fn spawn(jetstream: jetstream::Context, linger: Duration, last_ack: Arc<LastAck>) -> Self {
        Self::spawn_to(jetstream, linger, last_ack)
    }

    fn spawn_to(to: impl Client, linger: Duration, last_ack: Arc<LastAck>) -> Self {
        let (requests, queued) = mpsc::channel(QUEUED);
        tokio::spawn(run(queued, to, linger, last_ack));
        Linger { requests }
    }

    /// Queues one publish for its burst; the future resolves with its acknowledgement.
    pub async fn publish(&self, subject: String, message: PublishMessage) -> Result<AckFuture, BusError> {
        let (acked, ack) = oneshot::channel();
        self.requests
            .send(Request::Publish { subject, message, acked })
            .await
            .map_err(|_| BusError::Closed)?;
        Ok(Box::pin(async move { ack.await.unwrap_or(Err(BusError::Closed)) }))
    }

    /// Waits until every publish queued so far is on the client.
    pub async fn sent(&self) -> Result<(), BusError> {
        let (done, sent) = oneshot::channel();
        self.requests.send(Request::Flush(done)).await.map_err(|_| BusError::Closed)?;
        sent.await.map_err(|_| BusError::Closed)
    }
}

/// Where the bursts go: JetStream, or a recorder in tests.
trait Client: Send + 'static {
    type Ack: Future<Output = Result<(), BusError>> + Send + 'static;
    /// Queues one publish on the client; resolves once queued, with its acknowledgement.
    fn send(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> impl Future<Output = Result<Self::Ack, BusError>> + Send;
}

impl Client for jetstream::Context {
    type Ack = BoxFuture<'static, Result<(), BusError>>;

    async fn send(&self, subject: String, message: PublishMessage) -> Result<Self::Ack, BusError> {
        let ack = self.send_publish(subject, message).await.map_err(|e| BusError::Publish(e.into()))?;
        Ok(Box::pin(async move { ack.await.map(drop).map_err(|e| BusError::Ack(e.into())) }))
    }
}

async fn run(mut queued: mpsc::Receiver<Request>, to: impl Client, linger: Duration, last_ack: Arc<LastAck>) {
    // The acknowledgements awaited, each resolving its caller's: polled alongside
    // everything else this task waits on, since the client's in-flight budget is only
    // given back as they complete.
    let mut acks: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut burst = Vec::with_capacity(BURST);
    // When the last burst went: the next goes no sooner than a linger after it.
    let mut last_sent: Option<Instant> = None;
    loop {
        tokio::select! {
            received = queued.recv_many(&mut burst, BURST) => if received == 0 { break },
            Some(()) = acks.next() => continue,
        }
        let due = last_sent.map(|at| at + linger).filter(|due| *due > Instant::now());
        if let Some(due) = due
            && burst.len() < BURST
        {
            let mut lingering = pin!(tokio::time::sleep_until(due));
            loop {
                tokio::select! {
                    () = &mut lingering => break,
                    Some(()) = acks.next() => {}
                }
            }
            while burst.len() < BURST
                && let Ok(request) = queued.try_recv()
            {
                burst.push(request);
            }
        }
        last_sent = Some(Instant::now());
        for request in burst.drain(..) {
            match request {
                Request::Publish { subject, message, acked } => {
                    let mut send = pin!(to.send(subject, message));
                    let sent = loop {
                        tokio::select! {
                            sent = &mut send => break sent,
                            Some(()) = acks.next() => {}
                        }
                    };
                    match sent {
                        Ok(ack) => {
                            let last_ack = last_ack.clone();
                            acks.push(Box::pin(async move {
                                let stored = ack.await;
                                if stored.is_ok() {
                                    last_ack.record();
                                }
                                let _ = acked.send(stored);
                            }));
                        }
                        Err(error) => {
                            let _ = acked.send(Err(error));
                        }
                    }
                }
                Request::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
    while acks.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::{self, Ready};

    use super::*;

    /// Records each publish's subject and when it was queued on the client.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, Instant)>>>);

    impl Client for Recorder {
        type Ack = Ready<Result<(), BusError>>;

        async fn send(&self, subject: String, _: PublishMessage) -> Result<Self::Ack, BusError> {
            self.0.lock().unwrap().push((subject, Instant::now()));
            Ok(future::ready(Ok(())))
        }
    }

    impl Recorder {
        fn sent(&self) -> Vec<(String, Instant)> {
            self.0.lock().unwrap().clone()
        }
    }

    const LINGER: Duration = Duration::from_millis(5);

    /// A linger to a recorder, the time it started, after its first publish ("a").
    async fn started() -> (Recorder, Linger, Instant) {
        let recorder = Recorder::default();
        let linger = Linger::spawn_to(recorder.clone(), LINGER, Arc::new(LastAck::new()));
        let start = Instant::now();
        publish(&linger, "a").await.await.unwrap();
        (recorder, linger, start)
    }

    async fn publish(linger: &Linger, subject: &str) -> AckFuture {
        linger.publish(subject.to_owned(), PublishMessage::build()).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_after_a_quiet_spell_goes_at_once_and_those_soon_after_wait_together() {
        let (recorder, linger, start) = started().await;
        assert_eq!(recorder.sent(), [("a".to_owned(), start)], "nothing went before it");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let b = publish(&linger, "b").await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let c = publish(&linger, "c").await;
        b.await.unwrap();
        c.await.unwrap();
        let at = start + LINGER;
        assert_eq!(recorder.sent()[1..], [("b".to_owned(), at), ("c".to_owned(), at)], "in order, together");
        // Quiet for longer than the linger: at once again.
        tokio::time::sleep(LINGER * 2).await;
        let quiet = Instant::now();
        publish(&linger, "d").await.await.unwrap();
        assert_eq!(recorder.sent()[3], ("d".to_owned(), quiet));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_burst_goes_out_without_lingering() {
        let (recorder, linger, start) = started().await;
        // Within the linger of that one, all queued before the burst task runs (no
        // co-operative yield in between).
        let acks = tokio::task::unconstrained(async {
            let mut acks = Vec::new();
            for n in 0..BURST {
                acks.push(publish(&linger, &n.to_string()).await);
            }
            acks
        })
        .await;
        for ack in acks {
            ack.await.unwrap();
        }
        let sent = recorder.sent();
        assert_eq!(sent.len(), 1 + BURST);
        assert!(sent.iter().all(|(_, at)| *at == start), "none waited");
        let order: Vec<String> =
            std::iter::once("a".to_owned()).chain((0..BURST).map(|n| n.to_string())).collect();
        assert_eq!(sent.into_iter().map(|(subject, _)| subject).collect::<Vec<_>>(), order);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_waits_for_what_was_queued_before_it() {
        let (recorder, linger, start) = started().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let _ack = publish(&linger, "b").await;
        linger.sent().await.unwrap();
        assert_eq!(recorder.sent(), [("a".to_owned(), start), ("b".to_owned(), start + LINGER)]);
    }
}
