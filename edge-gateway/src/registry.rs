//! The pod's table of authenticated sessions, and each session's mailbox.
//!
//! gRPC calls and the drain reach a session only through its [`SessionHandle`]: they
//! queue a write or a close and wake the session's task, which does the I/O. A handle is
//! a few hundred bytes, and holds no buffer while its queue is empty.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tcpc_proto::v1::Protocol;
use tokio::sync::{Notify, oneshot};

/// A connection's id: unique across pods and restarts, the fence of the device's route
/// and the prefix of its envelopes' JetStream message ids. Shown as 32 hex digits.
///
/// 128 bits: a random 64-bit process prefix and a 64-bit counter. With 64 bits (32 of
/// them random per process) two of a large fleet's pods collide with a real chance over
/// a year of restarts, and a collision makes JetStream de-duplicate one pod's envelopes
/// as another's repeats: lost data. Two `u64`s rather than a `u128`, whose 16-byte
/// alignment would pad every session and registry entry.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnectionId {
    pub process: u64,
    pub counter: u64,
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.process, self.counter)
    }
}

/// Not a connection id of this format.
#[derive(Debug, thiserror::Error)]
#[error("not a connection id (32 hex digits)")]
pub struct ParseConnectionIdError;

impl std::str::FromStr for ConnectionId {
    type Err = ParseConnectionIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 32 || !text.is_ascii() {
            return Err(ParseConnectionIdError);
        }
        let (process, counter) = text.split_at(16);
        let hex = |part| u64::from_str_radix(part, 16).map_err(|_| ParseConnectionIdError);
        Ok(ConnectionId { process: hex(process)?, counter: hex(counter)? })
    }
}

/// Hands out connection ids: a random process prefix and a counter.
pub struct ConnectionIds {
    process: u64,
    next: AtomicU64,
}

impl Default for ConnectionIds {
    fn default() -> Self {
        ConnectionIds { process: rand::random(), next: AtomicU64::new(0) }
    }
}

impl ConnectionIds {
    pub fn next(&self) -> ConnectionId {
        ConnectionId { process: self.process, counter: self.next.fetch_add(1, Ordering::Relaxed) }
    }

    /// How every connection id of this process starts, as shown.
    pub fn process_prefix(&self) -> String {
        format!("{:016x}", self.process)
    }
}

/// Why a session is asked to close from outside its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOrder {
    /// The platform asked (device/disconnect, config change).
    Disconnected,
    /// The device connected again; this is the older connection.
    Superseded,
    /// The pod is shutting down.
    Draining,
}

/// A downlink write queued for a session.
pub struct Outbound {
    pub bytes: Bytes,
    /// Answered after the write completed or failed; dropped unanswered when the
    /// connection closed first (the caller reads that as offline). Closed when the
    /// caller gave up waiting: the session then skips the write.
    pub done: oneshot::Sender<Result<(), String>>,
    /// The span of the write (a child of the Deliver call's), ended once written or skipped.
    pub span: tracing::Span,
}

impl Outbound {
    /// The caller stopped waiting (its deadline passed): writing now would run a
    /// command the platform was already told failed.
    pub fn abandoned(&self) -> bool {
        self.done.is_closed()
    }
}

/// Bounds of one session's downlink queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub writes: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Outbound>,
    close: Option<CloseOrder>,
    /// The session has ended: nothing more is accepted.
    ended: bool,
}

/// How gRPC and the drain reach one session.
pub struct SessionHandle {
    pub device_id: Box<str>,
    pub connection_id: ConnectionId,
    pub protocol: Protocol,
    /// The epoch of the session's route (0 until registered), re-asserted with it.
    route_epoch: AtomicU64,
    mailbox: Mutex<Mailbox>,
    wake: Notify,
}

/// A delivery could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The session ended.
    Ended,
    /// Its queue is at the limit.
    Full,
}

impl SessionHandle {
    pub fn new(device_id: &str, connection_id: ConnectionId, protocol: Protocol) -> Self {
        SessionHandle {
            device_id: device_id.into(),
            connection_id,
            protocol,
            route_epoch: AtomicU64::new(0),
            mailbox: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Queues bytes for the device; the receiver answers once they are written.
    ///
    /// # Errors
    /// The session ended, or the queue is at one of its limits.
    pub fn deliver(
        &self,
        bytes: Bytes,
        limits: QueueLimits,
    ) -> Result<oneshot::Receiver<Result<(), String>>, QueueError> {
        let (done, answer) = oneshot::channel();
        {
            let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
            if mailbox.ended || mailbox.close.is_some() {
                return Err(QueueError::Ended);
            }
            // Summed, not kept: the queue is short, and a field would weigh on every
            // idle session.
            let queued: usize = mailbox.queue.iter().map(|outbound| outbound.bytes.len()).sum();
            if mailbox.queue.len() >= limits.writes || queued + bytes.len() > limits.bytes {
                return Err(QueueError::Full);
            }
            let span = tracing::debug_span!(
                "write",
                "network.transport" = "tcp",
                "tcpc.connection.id" = %self.connection_id,
                "messaging.message.body.size" = bytes.len(),
            );
            mailbox.queue.push_back(Outbound { bytes, done, span });
        }
        self.wake.notify_one();
        Ok(answer)
    }

    pub fn route_epoch(&self) -> u64 {
        self.route_epoch.load(Ordering::Relaxed)
    }

    pub fn set_route_epoch(&self, epoch: u64) {
        self.route_epoch.store(epoch, Ordering::Relaxed);
    }

    /// Asks the session to close; the first order wins.
    pub fn close(&self, order: CloseOrder) {
        {
            let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
            mailbox.close.get_or_insert(order);
        }
        self.wake.notify_one();
    }

    /// Whether a close was ordered.
    pub fn is_closing(&self) -> bool {
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner()).close.is_some()
    }

    /// Resolves when something was queued. Cancel-safe: a wake-up is never lost
    /// (`Notify` keeps one permit).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Takes what is queued: the writes, and a close order if one came.
    pub fn take(&self) -> (VecDeque<Outbound>, Option<CloseOrder>) {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut mailbox.queue), mailbox.close)
    }

    /// Marks the session ended; queued writes are dropped (their callers see offline).
    pub fn end(&self) {
        let queue = {
            let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
            mailbox.ended = true;
            std::mem::take(&mut mailbox.queue)
        };
        drop(queue);
    }
}

/// The authenticated sessions of this pod, by connection id.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<ConnectionId, Arc<SessionHandle>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Arc<SessionHandle>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, handle: Arc<SessionHandle>) {
        self.lock().insert(handle.connection_id, handle);
    }

    pub fn remove(&self, id: ConnectionId) {
        self.lock().remove(&id);
    }

    pub fn get(&self, id: ConnectionId) -> Option<Arc<SessionHandle>> {
        self.lock().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_print_and_parse() {
        let id = ConnectionId { process: 0xfeed, counter: 0x0123_4567_89ab_cdef };
        assert_eq!(id.to_string(), "000000000000feed0123456789abcdef");
        assert_eq!("000000000000feed0123456789abcdef".parse::<ConnectionId>().unwrap(), id);
        assert!("0123456789abcdef".parse::<ConnectionId>().is_err(), "the old 64-bit form");
        let ids = ConnectionIds::default();
        let (first, second) = (ids.next(), ids.next());
        assert_ne!(first, second);
        assert!(first.to_string().starts_with(&ids.process_prefix()));
    }

    #[tokio::test]
    async fn mailbox_bounds_orders_and_ends() {
        let handle = SessionHandle::new("d", ConnectionId { process: 0, counter: 1 }, Protocol::Official);
        let limits = QueueLimits { writes: 2, bytes: 3 };
        let first = handle.deliver(Bytes::from_static(b"1"), limits).unwrap();
        assert_eq!(handle.deliver(Bytes::from_static(b"333"), limits).unwrap_err(), QueueError::Full);
        let second = handle.deliver(Bytes::from_static(b"2"), limits).unwrap();
        assert_eq!(handle.deliver(Bytes::from_static(b"3"), limits).unwrap_err(), QueueError::Full);
        handle.woken().await; // the permit left by deliver
        let (queue, close) = handle.take();
        assert_eq!(queue.iter().map(|o| &o.bytes[..]).collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(close, None);
        drop(second);
        assert_eq!(queue.iter().map(Outbound::abandoned).collect::<Vec<_>>(), [false, true]);
        drop(queue);
        assert!(first.await.is_err(), "dropped unanswered = offline");

        handle.close(CloseOrder::Superseded);
        handle.close(CloseOrder::Draining);
        assert_eq!(handle.take().1, Some(CloseOrder::Superseded));
        assert_eq!(handle.deliver(Bytes::new(), limits).unwrap_err(), QueueError::Ended);
    }
}
