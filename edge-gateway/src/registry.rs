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

/// A connection's id: unique across pods and restarts (random per process, then a
/// counter), the fence of the device's route. Shown as 16 hex digits.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ConnectionId {
    type Err = std::num::ParseIntError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(text, 16).map(ConnectionId)
    }
}

/// Hands out connection ids: a random 32-bit process prefix and a 32-bit counter.
pub struct ConnectionIds {
    next: AtomicU64,
}

impl Default for ConnectionIds {
    fn default() -> Self {
        let prefix = u64::from(rand::random::<u32>()) << 32;
        ConnectionIds { next: AtomicU64::new(prefix) }
    }
}

impl ConnectionIds {
    pub fn next(&self) -> ConnectionId {
        ConnectionId(self.next.fetch_add(1, Ordering::Relaxed))
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
    /// connection closed first (the caller reads that as offline).
    pub done: oneshot::Sender<Result<(), String>>,
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
            mailbox: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Queues bytes for the device; the receiver answers once they are written.
    ///
    /// # Errors
    /// The session ended, or `limit` writes are already queued.
    pub fn deliver(
        &self,
        bytes: Bytes,
        limit: usize,
    ) -> Result<oneshot::Receiver<Result<(), String>>, QueueError> {
        let (done, answer) = oneshot::channel();
        {
            let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
            if mailbox.ended || mailbox.close.is_some() {
                return Err(QueueError::Ended);
            }
            if mailbox.queue.len() >= limit {
                return Err(QueueError::Full);
            }
            mailbox.queue.push_back(Outbound { bytes, done });
        }
        self.wake.notify_one();
        Ok(answer)
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

    /// Every session of a device on this pod (normally one; two while a reconnect
    /// supersedes the older).
    pub fn of_device(&self, device_id: &str) -> Vec<Arc<SessionHandle>> {
        self.lock().values().filter(|h| &*h.device_id == device_id).cloned().collect()
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
        let id = ConnectionId(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!("0123456789abcdef".parse::<ConnectionId>().unwrap(), id);
        let ids = ConnectionIds::default();
        assert_ne!(ids.next(), ids.next());
    }

    #[tokio::test]
    async fn mailbox_bounds_orders_and_ends() {
        let handle = SessionHandle::new("d", ConnectionId(1), Protocol::Official);
        let first = handle.deliver(Bytes::from_static(b"1"), 2).unwrap();
        let _second = handle.deliver(Bytes::from_static(b"2"), 2).unwrap();
        assert_eq!(handle.deliver(Bytes::from_static(b"3"), 2).unwrap_err(), QueueError::Full);
        handle.woken().await; // the permit left by deliver
        let (queue, close) = handle.take();
        assert_eq!(queue.iter().map(|o| &o.bytes[..]).collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(close, None);
        drop(queue);
        assert!(first.await.is_err(), "dropped unanswered = offline");

        handle.close(CloseOrder::Superseded);
        handle.close(CloseOrder::Draining);
        assert_eq!(handle.take().1, Some(CloseOrder::Superseded));
        assert_eq!(handle.deliver(Bytes::new(), 2).unwrap_err(), QueueError::Ended);
    }
}
