//! Publishes handed to the NATS client in bursts.
//!
//! Why: the NATS client writes whatever is queued when its task runs, so publishes that
//! arrive one at a time (a thousand devices each sending now and then) each cost a
//! write here, a read and a store wake-up in nats-server, an acknowledgement written
//! back, and the same again on the worker's side of the stream. Held for a short
//! linger, the publishes of that moment reach the client together and go out in one
//! write; nats-server then reads, stores, acknowledges and delivers them as one batch.
//! The price is the linger, added to each envelope's way. At rates that fill a burst
//! without waiting, nothing is held (see [`BURST`]).
//!
//! One task per bus runs the bursts: it queues each publish on the client in arrival
//! order (so one caller's envelopes still reach the bus in call order) and awaits the
//! acknowledgements, each handed to its caller.

use std::pin::pin;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{AckFuture, BusError};

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
    pub fn spawn(jetstream: jetstream::Context, linger: Duration) -> Self {
        Self::spawn_to(jetstream, linger)
    }

    fn spawn_to(to: impl Client, linger: Duration) -> Self {
        let (requests, queued) = mpsc::channel(QUEUED);
        tokio::spawn(run(queued, to, linger));
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

async fn run(mut queued: mpsc::Receiver<Request>, to: impl Client, linger: Duration) {
    // The acknowledgements awaited, each resolving its caller's: polled alongside
    // everything else this task waits on, since the client's in-flight budget is only
    // given back as they complete.
    let mut acks: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut burst = Vec::with_capacity(BURST);
    loop {
        tokio::select! {
            received = queued.recv_many(&mut burst, BURST) => if received == 0 { break },
            Some(()) = acks.next() => continue,
        }
        if burst.len() < BURST && !linger.is_zero() {
            let mut lingering = pin!(tokio::time::sleep_until(Instant::now() + linger));
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
                        Ok(ack) => acks.push(Box::pin(async move {
                            let _ = acked.send(ack.await);
                        })),
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
    use std::sync::{Arc, Mutex};

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

    async fn publish(linger: &Linger, subject: &str) -> AckFuture {
        linger.publish(subject.to_owned(), PublishMessage::build()).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_of_one_moment_go_out_together_once_the_first_has_lingered() {
        let recorder = Recorder::default();
        let linger = Linger::spawn_to(recorder.clone(), LINGER);
        let start = Instant::now();
        let a = publish(&linger, "a").await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let b = publish(&linger, "b").await;
        a.await.unwrap();
        b.await.unwrap();
        let at = start + LINGER;
        assert_eq!(recorder.sent(), [("a".to_owned(), at), ("b".to_owned(), at)], "in order, together");
        // The next publish lingers from its own arrival.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = publish(&linger, "c").await;
        c.await.unwrap();
        assert_eq!(recorder.sent()[2], ("c".to_owned(), start + LINGER + Duration::from_millis(10) + LINGER));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_burst_goes_out_without_lingering() {
        let recorder = Recorder::default();
        let linger = Linger::spawn_to(recorder.clone(), LINGER);
        let start = Instant::now();
        // All queued before the burst task runs (no co-operative yield in between).
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
        assert_eq!(sent.len(), BURST);
        assert!(sent.iter().all(|(_, at)| *at == start), "none waited");
        let order: Vec<String> = (0..BURST).map(|n| n.to_string()).collect();
        assert_eq!(sent.into_iter().map(|(subject, _)| subject).collect::<Vec<_>>(), order);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_waits_for_what_was_queued_before_it() {
        let recorder = Recorder::default();
        let linger = Linger::spawn_to(recorder.clone(), LINGER);
        let start = Instant::now();
        let _ack = publish(&linger, "a").await;
        linger.sent().await.unwrap();
        assert_eq!(recorder.sent(), [("a".to_owned(), start + LINGER)]);
    }
}
